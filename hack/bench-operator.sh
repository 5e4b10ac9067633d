#!/usr/bin/env bash
# hack/bench-operator.sh: how fast the operator brings N nodes into the mesh against a real
# kube-apiserver. Reports the time until every node has its subnets and every peer is Ready,
# allocations per second, and the operator's peak memory. Figures, not a pass/fail test.
#
#   hack/bench-operator.sh [--nodes N]     N defaults to 1000 (5000 works)
#
# Starts its own control plane and stops it afterwards. Needs root.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=hack/lib/common.sh
source "$here/lib/common.sh"
WGMESH_LOG_PREFIX="[bench-operator]"

nodes=1000
while [[ $# -gt 0 ]]; do
	case "$1" in
	--nodes)
		nodes=${2:?--nodes needs a number}
		shift 2
		;;
	-h | --help)
		sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
		exit 0
		;;
	*) die "unknown option $1 (see --help)" ;;
	esac
done

need_root "hack/bench-operator.sh"
cd "$root"
bash hack/cluster.sh install
log "building release binaries"
cargo build -q --release -p wgmesh-operator -p wgmesh-tests --bin wgmesh-operator --bin bench-operator

dir=/tmp/wgmesh-bench.$$
trap 'bash hack/cluster.sh down --dir "$dir" >/dev/null 2>&1 || true' EXIT
bash hack/cluster.sh up --dir "$dir" --port "${WGMESH_BENCH_PORT:-26443}"
export KUBECONFIG="$dir/kubeconfig"
kubectl apply -f crds/ >/dev/null
kubectl wait --for=condition=Established --timeout=60s -f crds/ >/dev/null

target/release/bench-operator --operator target/release/wgmesh-operator --nodes "$nodes"
