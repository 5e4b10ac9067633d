#!/usr/bin/env bash
# hack/demo.sh: the README's first command. Installs what it needs, starts a real control
# plane on this machine, installs the wgmesh CRDs and the example objects, and shows them.
#
#   hack/demo.sh         set up and run the demo (leaves the control plane running)
#   hack/demo.sh down    stop everything the demo started
#
# Environment: WGMESH_DEMO_DIR (default /tmp/wgmesh-demo) holds the control plane's state.
# Needs root.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=hack/lib/common.sh
source "$here/lib/common.sh"
WGMESH_LOG_PREFIX="[demo]"
dir=${WGMESH_DEMO_DIR:-/tmp/wgmesh-demo}

case "${1:-up}" in
-h | --help)
	sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
	exit 0
	;;
down)
	bash "$here/cluster.sh" down --dir "$dir"
	exit 0
	;;
up) ;;
*) die "unknown command $1 (see --help)" ;;
esac

need_root "hack/demo.sh"
cd "$root"

log "installing dependencies (the first run builds kube-apiserver: about 5 minutes)"
bash hack/cluster.sh install

log "starting the control plane in $dir"
bash hack/cluster.sh up --dir "$dir"
export KUBECONFIG="$dir/kubeconfig"

show() {
	printf '\n$ %s\n' "$*"
	"$@"
}

show kubectl apply -f crds/
kubectl wait --for=condition=Established --timeout=60s -f crds/ >/dev/null
show kubectl apply -f examples/
show kubectl get meshes,podcidrpools,meshpeers
show kubectl get meshpeers -o wide

cat <<MSG

The control plane keeps running. Use it with:
  export KUBECONFIG=$dir/kubeconfig
Stop everything the demo started with:
  hack/demo.sh down
MSG
