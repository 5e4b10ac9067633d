#!/usr/bin/env bash
# hack/demo.sh: the README's first command. Installs everything it needs, brings up a local
# 3-node Kubernetes cluster of real kubelet nodes (hack/nodes.sh: containerd and kubelet per
# node, each node in its own network namespace), builds the wgmesh image (hack/image.sh),
# installs wgmesh with `helm install` from charts/wgmesh, starts a test pod on every node,
# and shows the ping matrix and an HTTP request across nodes, `kubectl get pods -o wide`,
# `kubectl get meshpeers -o wide`, `kubectl get meshpeerreports`, `wg show` on each node and
# `kubectl wgmesh status`.
#
#   hack/demo.sh            set up and run the demo (the cluster keeps running)
#   hack/demo.sh down       stop everything the demo started
#
# Environment: WGMESH_DEMO_DIR (default /tmp/wgmesh-demo) holds the cluster's state.
# Needs root. The first run builds Kubernetes from Debian's source package (10-20 min).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=hack/lib/common.sh
source "$here/lib/common.sh"
WGMESH_LOG_PREFIX="[demo]"
dir=${WGMESH_DEMO_DIR:-/tmp/wgmesh-demo}
nodes=3
namespace=wgmesh-system
pool=10.244.0.0/16

case "${1:-up}" in
-h | --help)
	sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
	exit 0
	;;
down)
	bash "$here/nodes.sh" down --dir "$dir"
	exit 0
	;;
up) ;;
*) die "unknown command $1 (see --help)" ;;
esac

need_root "hack/demo.sh"
cd "$root"
# shellcheck source=hack/lib/deps.sh
source "$here/lib/deps.sh"
if [[ -e $dir ]]; then
	log "a demo is already up in $dir; replacing it"
	bash "$here/nodes.sh" down --dir "$dir"
fi

log "building the image"
archive=$(bash "$here/image.sh" --tag demo)
bash "$here/nodes.sh" up --nodes "$nodes" --dir "$dir"
eval "$(bash "$here/nodes.sh" env --dir "$dir")"
export KUBECONFIG
bash "$here/nodes.sh" load "$archive" --dir "$dir"

log "helm install wgmesh charts/wgmesh"
helm install wgmesh "$root/charts/wgmesh" --namespace "$namespace" --create-namespace \
	--set image.repository=wgmesh.local/wgmesh --set image.tag=demo --set image.pullPolicy=Never \
	--set k8sServiceHost="$APISERVER_HOST" --set k8sServicePort="$APISERVER_PORT" \
	--set "podCIDRPool.cidrs={$pool}" --wait --timeout 5m >/dev/null
kubectl wait --for=condition=Ready --timeout=120s nodes --all >/dev/null
kubectl wait --for=condition=Ready --timeout=120s meshpeers --all >/dev/null

log "a test pod on every node"
mapfile -t node_names < <(kubectl get nodes -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}')
for i in "${!node_names[@]}"; do
	node=${node_names[i]}
	kubectl apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata: {name: web-$((i + 1)), namespace: default, labels: {app: wgmesh-demo}}
spec:
  nodeName: $node
  terminationGracePeriodSeconds: 1
  containers:
  - name: web
    image: $BUSYBOX_IMAGE
    imagePullPolicy: Never
    command: [sh, -c, "mkdir -p /www && echo hello from $node > /www/index.html && exec httpd -f -p 8080 -h /www"]
YAML
done
kubectl wait --for=condition=Ready --timeout=120s pods -l app=wgmesh-demo >/dev/null

show() {
	printf '\n$ %s\n' "$*"
	"$@"
}
show kubectl get nodes -o wide
show kubectl get pods -A -o wide
show kubectl get meshes,podcidrpools
show kubectl get meshpeers -o wide
show kubectl get meshpeerreports

declare -A ip
for i in "${!node_names[@]}"; do
	pod=web-$((i + 1))
	ip[$pod]=$(kubectl get pod "$pod" -o jsonpath='{.status.podIP}')
done
printf '\nping matrix (kubectl exec web-N -- ping; rows ping columns):\n'
printf '%-8s' ""
for i in "${!node_names[@]}"; do printf '%-22s' "web-$((i + 1)) ${ip[web-$((i + 1))]}"; done
echo
failures=0
for i in "${!node_names[@]}"; do
	from=web-$((i + 1))
	printf '%-8s' "$from"
	for j in "${!node_names[@]}"; do
		to=web-$((j + 1))
		if [[ $i == "$j" ]]; then
			printf '%-22s' "-"
		elif kubectl exec "$from" -- ping -c 1 -W 2 "${ip[$to]}" >/dev/null 2>&1 ||
			kubectl exec "$from" -- ping -c 3 -W 2 "${ip[$to]}" >/dev/null 2>&1; then
			printf '%-22s' "ok"
		else
			printf '%-22s' "FAIL"
			failures=$((failures + 1))
		fi
	done
	echo
done

printf '\n$ kubectl exec web-1 -- nc %s 8080   (HTTP from %s to a pod on %s)\n' "${ip[web-2]}" "${node_names[0]}" "${node_names[1]}"
if ! answer=$(kubectl exec web-1 -- sh -c "printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 3 ${ip[web-2]} 8080") ||
	[[ $answer != *"hello from ${node_names[1]}"* ]]; then
	printf 'FAIL: %s\n' "${answer:-no answer}"
	failures=$((failures + 1))
else
	printf '%s\n' "$answer" | tail -n 1
fi

# After the pings, so the handshakes and transfer counters show.
for node in "${node_names[@]}"; do
	show bash "$here/nodes.sh" exec "$node" --dir "$dir" -- wg show
done

# The kubectl plugin (built with the image), found by kubectl on PATH: the mesh's health,
# each agent asked through the API server's node proxy. Exit 1 means a finding.
export PATH="$root/target/release:$PATH"
show kubectl wgmesh status -n "$namespace" || failures=$((failures + 1))

cat <<MSG

Every packet between the nodes above went through wgmesh's userspace WireGuard devices,
run by the agent DaemonSet that helm installed. Look around:
  export KUBECONFIG=$KUBECONFIG
  kubectl -n $namespace get pods -o wide
  kubectl describe meshpeer ${node_names[0]}
  PATH=$root/target/release:\$PATH kubectl wgmesh graph -o mesh.svg   # also: status, doctor, rotate, peer-config
  hack/nodes.sh exec ${node_names[0]} --dir $dir -- ip route      # routes through wgmesh0, blackholes behind them
  ip netns exec $UNDERLAY_NETNS tcpdump -i $UNDERLAY_BRIDGE -n    # the underlay: between nodes only UDP 51820 (and the API)
Logs: $dir/logs/
Tear it all down with:
  hack/demo.sh down
MSG
[[ $failures == 0 ]] || die "$failures checks failed"
