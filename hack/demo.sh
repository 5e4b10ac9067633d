#!/usr/bin/env bash
# hack/demo.sh: the README's first command. Installs what it needs, builds wgmesh, and brings
# up a local 3-node encrypted mesh with a real control plane in network namespaces
# (hack/mesh.sh): one pod on each node, then shows the mesh's peers, a ping matrix between
# every pair of pods across nodes, and `wg show` on each node.
#
#   hack/demo.sh            set up and run the demo (the mesh keeps running)
#   hack/demo.sh down       stop everything the demo started
#
# Environment: WGMESH_DEMO_DIR (default /tmp/wgmesh-demo) holds the mesh's state.
# Needs root. The first run builds kube-apiserver from Debian's source package (5-15 min).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=hack/lib/common.sh
source "$here/lib/common.sh"
WGMESH_LOG_PREFIX="[demo]"
dir=${WGMESH_DEMO_DIR:-/tmp/wgmesh-demo}
nodes=3

case "${1:-up}" in
-h | --help)
	sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
	exit 0
	;;
down)
	bash "$here/mesh.sh" down --dir "$dir"
	exit 0
	;;
up) ;;
*) die "unknown command $1 (see --help)" ;;
esac

need_root "hack/demo.sh"
cd "$root"
if [[ -f $dir/mesh.env ]]; then
	log "a demo mesh is already up in $dir; replacing it"
	bash "$here/mesh.sh" down --dir "$dir"
fi
bash "$here/mesh.sh" up --id demo --nodes "$nodes" --dir "$dir"
# shellcheck disable=SC1091
source "$dir/mesh.env"
export KUBECONFIG="$dir/cp/kubeconfig"

declare -A pod_ip
for i in $(seq "$nodes"); do
	pod_ip[pod-$i]=$(bash "$here/mesh.sh" pod "node-$i" "pod-$i" --dir "$dir")
done

show() {
	printf '\n$ %s\n' "$*"
	"$@"
}
show kubectl get meshes,podcidrpools
show kubectl get meshpeers -o wide

printf '\nping matrix (pod network namespaces %s-pod-N; rows ping columns):\n' "$MESH_ID"
printf '%-8s' ""
for j in $(seq "$nodes"); do printf '%-22s' "pod-$j ${pod_ip[pod-$j]}"; done
echo
failures=0
for i in $(seq "$nodes"); do
	printf '%-8s' "pod-$i"
	for j in $(seq "$nodes"); do
		if [[ $i == "$j" ]]; then
			printf '%-22s' "-"
		elif ip netns exec "$MESH_ID-pod-$i" ping -c 1 -W 2 "${pod_ip[pod-$j]}" >/dev/null 2>&1 ||
			ip netns exec "$MESH_ID-pod-$i" ping -c 3 -W 2 "${pod_ip[pod-$j]}" >/dev/null 2>&1; then
			printf '%-22s' "ok"
		else
			printf '%-22s' "FAIL"
			failures=$((failures + 1))
		fi
	done
	echo
done

# After the pings, so the handshakes and transfer counters show.
for i in $(seq "$nodes"); do
	show wg show "wg-demo-n$i"
done

cat <<MSG

Every packet between the nodes above went through wgmesh's userspace WireGuard devices.
Look around:
  export KUBECONFIG=$KUBECONFIG
  kubectl describe meshpeer node-1
  ip netns exec demo-node-1 ip route          # routes through wg-demo-n1, blackholes behind them
  ip netns exec demo-ul tcpdump -i ul0 -n     # the underlay: between nodes only UDP 51820 (and the API)
  ip netns exec demo-pod-1 ping ${pod_ip[pod-2]}
Logs: $dir/logs/
Tear it all down with:
  hack/demo.sh down
MSG
[[ $failures == 0 ]] || die "$failures pod pairs could not reach each other"
