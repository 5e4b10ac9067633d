#!/usr/bin/env bash
# hack/mesh.sh: a multi-node wgmesh cluster on one machine, all real parts, no kubelet and no
# Docker: a control-plane network namespace (etcd, kube-apiserver, kube-controller-manager,
# wgmesh-operator), N node namespaces on a shared underlay (a bridge in a namespace of its
# own), each running wgmesh-agent, and pods as network namespaces plumbed by the CNI
# reference plugins with the configuration the agent wrote, as a container runtime would.
#
#   hack/mesh.sh up [--nodes N] [--dir DIR] [--id ID] [--release] [--host-gw] [--clouds]
#   hack/mesh.sh pod NODE POD          make a pod (netns ID-POD) on NODE via CNI ADD
#   hack/mesh.sh add-node NODE [SITE]  register one more node and start its agent (--clouds: at
#                                      SITE, default the table's site for NODE, else a)
#   hack/mesh.sh remove-node NODE      stop the node's agent, delete its Node and netns
#   hack/mesh.sh stop-agent NODE [SIG] stop a node's agent (default TERM; KILL for a crash)
#   hack/mesh.sh start-agent NODE      start a node's agent again
#   hack/mesh.sh upgrade-agent NODE    SIGTERM to a node's agent, then a new one at once, which
#                                      takes the datapath over; waits for the old one to exit
#   hack/mesh.sh stop-operator [SIG]   stop the operator (default TERM; KILL for a crash)
#   hack/mesh.sh start-operator        start the operator again
#   hack/mesh.sh down [--dir DIR]      stop everything, delete every namespace
#   hack/mesh.sh env [--dir DIR]       print the variables tests and people use
#   hack/mesh.sh address NODE          print the node's address (its Node's InternalIP)
# With --clouds only:
#   hack/mesh.sh site NODE             print the site the node is at now
#   hack/mesh.sh wan SITE              print the address of the site's NAT router on the internet
#   hack/mesh.sh flush-nat SITE        empty the site's NAT router's conntrack table (every
#                                      mapping is gone, as when a router reboots)
#   hack/mesh.sh move-node NODE SITE   move the node to SITE (its link goes to that site's LAN, it
#                                      gets the lowest free address there) and update its Node's
#                                      addresses as a kubelet would; its agent keeps running
#
# WGMESH_SKIP_BUILD=1: `up` runs the binaries in target/<profile> as they are, without cargo.
# WGMESH_AGENT_LOG: the agents' RUST_LOG (default info,kube=warn; for example
# info,kube=warn,kube_client=debug to see every request an agent makes).
#
# The underlay is a /24 of 198.18.0.0/15 (the range set aside for benchmarking networks, so
# it collides with no real one): nodes node-1..node-N are .11.., the API server .2, the
# underlay's gateway .1, and the host joins as .254 to reach the API server. Needs root.
#
# --clouds: the underlay is the "internet" between sites, and the nodes are those of the table
# in hack/lib/clouds.sh: sites a and f on the internet itself (node-1 and node-2 at a, node-8
# at f; public and dual-stack: their Nodes have an IPv6 and an IPv4 ExternalIP), sites b, c
# and d each a LAN behind a NAT router of its own (b and d endpoint-independent, c symmetric
# with an MTU of 1400; their Nodes have only their LAN address), and a spare site e with no
# node. hack/lib/clouds.sh says which addresses and rules each router has.
# Every Node carries its site as `topology.kubernetes.io/region`, the Mesh's location label.
#
# Every component runs under its own identity, as the Helm chart sets them up (the chart's
# RBAC and admission webhook, rendered with helm): the operator with its ServiceAccount's
# token, each agent with a token bound to a Pod object on its node, as a kubelet would
# give it. The API server reaches the operator's webhook at the control plane's address.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=hack/lib/common.sh
source "$here/lib/common.sh"
# shellcheck source=hack/lib/clouds.sh
source "$here/lib/clouds.sh"
WGMESH_LOG_PREFIX="[mesh]"

dir=${WGMESH_MESH_DIR:-/tmp/wgmesh-mesh}
nodes=3
id=""
profile=debug
hostgw=""
net=""
clouds=""
nodes_set=""

# The comment block at the top of this file.
usage() { sed -n '2,/^[^#]/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

cmd=${1:-}
[[ -n $cmd ]] || {
	usage
	exit 1
}
shift
args=()
while [[ $# -gt 0 ]]; do
	case "$1" in
	--dir) dir=$2; shift 2 ;;
	--nodes) nodes=$2; nodes_set=1; shift 2 ;;
	--id) id=$2; shift 2 ;;
	--net) net=$2; shift 2 ;;
	--release) profile=release; shift ;;
	--host-gw) hostgw=1; shift ;;
	--clouds) clouds=1; shift ;;
	-h | --help) usage; exit 0 ;;
	*) args+=("$1"); shift ;;
	esac
done

# Settings of a running mesh.
if [[ -f $dir/mesh.env ]]; then
	# shellcheck disable=SC1091
	source "$dir/mesh.env"
fi
# A mesh brought up before --clouds existed has no MESH_CLOUDS: a flat one.
MESH_CLOUDS=${MESH_CLOUDS:-0}
# Where hack/lib/clouds.sh records which node is at which site, with which address.
CLOUDS_DIR="$dir/clouds"

ns_ul() { echo "${MESH_ID}-ul"; }
ns_cp() { echo "${MESH_ID}-cp"; }
ns_node() { echo "${MESH_ID}-$1"; }
ns_pod() { echo "${MESH_ID}-$1"; }
node_index() { echo "${1#node-}"; }
node_ip() {
	if [[ $MESH_CLOUDS == 1 ]]; then
		clouds_node_address "$1"
	else
		echo "${MESH_NET}.$((10 + $(node_index "$1")))"
	fi
}
veth_node() { echo "m${MESH_ID}n$(node_index "$1")"; }
iface() { echo "wg-${MESH_ID}-n$(node_index "$1")"; }
kc() { KUBECONFIG="$dir/cp/kubeconfig" kubectl "$@"; }

# The namespace and release name the chart's identities are rendered for.
readonly SYSTEM_NS=wgmesh-system RELEASE=wgmesh
readonly WEBHOOK_PORT=9443

# The chart's RBAC and webhook, rendered by helm: the same objects a cluster gets. The
# webhook's Service has no pods to select here; its endpoint is the operator process.
install_identities() {
	local helm=${WGMESH_TOOLS_DIR:-$HOME/.cache/wgmesh/tools}/bin/helm
	[[ -x $helm ]] || die "no helm at $helm: run hack/lib/deps.sh"
	kc create namespace "$SYSTEM_NS" >/dev/null
	"$helm" template "$RELEASE" "$root/charts/wgmesh" --namespace "$SYSTEM_NS" \
		--set 'podCIDRPool.cidrs={10.244.0.0/16}' \
		--show-only templates/agent-rbac.yaml --show-only templates/operator-rbac.yaml \
		--show-only templates/webhook.yaml | kc apply -f - >/dev/null
	kc patch service -n "$SYSTEM_NS" "$RELEASE-operator" --type=json \
		-p '[{"op":"remove","path":"/spec/selector"}]' >/dev/null
	cat <<YAML | kc apply -f - >/dev/null
apiVersion: v1
kind: Endpoints
metadata: {name: $RELEASE-operator, namespace: $SYSTEM_NS}
subsets:
  - addresses: [{ip: "${MESH_NET}.2"}]
    ports: [{name: webhook, port: $WEBHOOK_PORT, protocol: TCP}]
YAML
	mkdir -p "$dir/webhook"
	local key
	for key in tls.crt tls.key; do
		kc get secret -n "$SYSTEM_NS" "$RELEASE-webhook-tls" -o "jsonpath={.data.${key//./\\.}}" |
			base64 -d >"$dir/webhook/$key"
	done
	chmod 600 "$dir/webhook/tls.key"
	kubeconfig_for "$dir/operator.kubeconfig" "$(token "$RELEASE-operator")"
}

# A token of ServiceAccount $1 in the system namespace (TokenRequest), bound to pod $2 if
# given (its name; the uid is looked up).
token() {
	local sa=$1 pod=${2:-} bound=""
	if [[ -n $pod ]]; then
		local uid
		uid=$(kc get pod -n "$SYSTEM_NS" "$pod" -o jsonpath='{.metadata.uid}')
		bound=", \"boundObjectRef\": {\"kind\": \"Pod\", \"apiVersion\": \"v1\", \"name\": \"$pod\", \"uid\": \"$uid\"}"
	fi
	echo "{\"apiVersion\": \"authentication.k8s.io/v1\", \"kind\": \"TokenRequest\", \"spec\": {\"expirationSeconds\": 86400$bound}}" |
		kc create --raw "/api/v1/namespaces/$SYSTEM_NS/serviceaccounts/$sa/token" -f - |
		python3 -c 'import json,sys; print(json.load(sys.stdin)["status"]["token"])'
}

# Writes kubeconfig $1: the control plane's server and CA, authenticated by token $2 only.
kubeconfig_for() {
	local file=$1 token=$2 server ca
	server=$(kc config view --raw --minify -o jsonpath='{.clusters[0].cluster.server}')
	ca=$(kc config view --raw --minify -o jsonpath='{.clusters[0].cluster.certificate-authority-data}')
	cat >"$file" <<YAML
apiVersion: v1
kind: Config
clusters: [{name: mesh, cluster: {server: "$server", certificate-authority-data: "$ca"}}]
users: [{name: sa, user: {token: "$token"}}]
contexts: [{name: mesh, context: {cluster: mesh, user: sa}}]
current-context: mesh
YAML
	chmod 600 "$file"
}

# The agent's identity on node $1: a Pod object on the node (never run: there is no kubelet
# here) and a token bound to it, which is what the webhook maps to the node.
agent_identity() {
	local node=$1 pod="$RELEASE-agent-$1"
	if ! kc get pod -n "$SYSTEM_NS" "$pod" >/dev/null 2>&1; then
		cat <<YAML | kc create -f - >/dev/null
apiVersion: v1
kind: Pod
metadata: {name: $pod, namespace: $SYSTEM_NS, labels: {app.kubernetes.io/component: agent}}
spec:
  nodeName: $node
  serviceAccountName: $RELEASE-agent
  automountServiceAccountToken: false
  # The node never becomes Ready (no kubelet): never evict the pod, its token dies with it.
  tolerations: [{operator: Exists}]
  containers: [{name: agent, image: wgmesh.local/none}]
YAML
	fi
	kubeconfig_for "$dir/nodes/$node/kubeconfig" "$(token "$RELEASE-agent" "$pod")"
}

start_agent() {
	local node=$1 nd="$dir/nodes/$1"
	mkdir -p "$nd/state" "$nd/cni" "$nd/ipam" "$dir/logs" "$dir/pids"
	[[ -f $nd/kubeconfig ]] || agent_identity "$node"
	# WGMESH_FAILPOINTS_DIR: a file named after a datapath thread appearing there makes that
	# thread panic (the supervision test, tests/tests/mesh.rs). WGMESH_HANDOVER_WAIT: at
	# SIGTERM, an agent waits that long for a new one to take its device over (upgrade-agent).
	ip netns exec "$(ns_node "$node")" env KUBECONFIG="$nd/kubeconfig" RUST_LOG="${WGMESH_AGENT_LOG:-info,kube=warn}" \
		WGMESH_FAILPOINTS_DIR="$nd/failpoints" WGMESH_HANDOVER_WAIT=3 \
		"$MESH_BIN/wgmesh-agent" run --node-name "$node" --interface "$(iface "$node")" \
		--state-dir "$nd/state" --cni-conf-dir "$nd/cni" --run-dir "$nd/run" --cni-ipam-data-dir "$nd/ipam" \
		--metrics-addr "$(node_ip "$node"):9091" \
		>>"$dir/logs/agent-$node.log" 2>&1 &
	echo $! >"$dir/pids/agent-$node"
}

# One identity across restarts, as a container restarted in its pod keeps its pod's
# name: a restarted operator renews its own lease at once instead of waiting for it to
# expire, so the lease can keep the default duration. (A shorter one makes a loaded
# machine's slow API answers look like a lost lease.)
start_operator() {
	mkdir -p "$dir/logs" "$dir/pids"
	ip netns exec "$(ns_cp)" env KUBECONFIG="$dir/operator.kubeconfig" RUST_LOG="${WGMESH_AGENT_LOG:-info,kube=warn}" \
		"$MESH_BIN/wgmesh-operator" --metrics-addr "${MESH_NET}.2:9090" \
		--identity "$RELEASE-operator-0" \
		--lease-namespace "$SYSTEM_NS" --lease-name "$RELEASE-operator" \
		--webhook-addr "0.0.0.0:$WEBHOOK_PORT" \
		--webhook-cert "$dir/webhook/tls.crt" --webhook-key "$dir/webhook/tls.key" \
		--operator-service-account "$SYSTEM_NS/$RELEASE-operator" \
		--agent-service-account "$SYSTEM_NS/$RELEASE-agent" \
		>>"$dir/logs/operator.log" 2>&1 &
	echo $! >"$dir/pids/operator"
}

# Waits up to TRIES × 20 ms for PID to exit; fails if it has not. Gone, or a zombie: it has
# exited (its descriptors are closed) and only waits to be reaped by whichever process
# adopted it, which may take a while.
wait_exit() {
	local pid=$1 tries=$2
	for _ in $(seq "$tries"); do
		kill -0 "$pid" 2>/dev/null || return 0
		[[ $(sed -n 's/^State:[[:space:]]*\(.\).*/\1/p' "/proc/$pid/status" 2>/dev/null) == Z ]] && return 0
		sleep 0.02
	done
	return 1
}

stop_pid() {
	local pidf=$1 sig=$2
	[[ -f $pidf ]] || return 0
	local pid
	pid=$(cat "$pidf")
	kill -"$sig" "$pid" 2>/dev/null || true
	wait_exit "$pid" 250 || true
	kill -KILL "$pid" 2>/dev/null || true
	rm -f "$pidf"
}

stop_agent() {
	stop_pid "$dir/pids/agent-$1" "${2:-TERM}"
}

# What an upgrade in place does: SIGTERM, then a new agent, which finds the old one's
# handover socket and takes the datapath over; the old one exits once it has.
upgrade_agent() {
	local node=$1 pidf="$dir/pids/agent-$1" old
	old=$(cat "$pidf")
	kill -TERM "$old"
	start_agent "$node"
	wait_exit "$old" 1500 && return 0
	echo "the old agent of $node did not exit within 30 s" >&2
	kill -KILL "$old" 2>/dev/null || true
	return 1
}

add_node() {
	local node=$1 site=${2:-} ns ip
	ns=$(ns_node "$node")
	ip netns add "$ns"
	ip -n "$ns" link set lo up
	if [[ $MESH_CLOUDS == 1 ]]; then
		[[ -n $site ]] || site=$(clouds_table_site "$node")
		[[ -n $site ]] || site=a
		ip link add "$(veth_node "$node")" type veth peer name eth0 netns "$ns"
		clouds_attach "$node" "$site" "$(veth_node "$node")" "" "$(ns_ul)"
		ip=$(clouds_node_address "$node")
		register_cloud_node "$node" "$site" "$ip"
		start_agent "$node"
		return 0
	fi
	ip=$(node_ip "$node")
	ip link add "m${MESH_ID}n$(node_index "$node")" type veth peer name eth0 netns "$ns"
	ip link set "m${MESH_ID}n$(node_index "$node")" netns "$(ns_ul)"
	ip -n "$(ns_ul)" link set "m${MESH_ID}n$(node_index "$node")" master ul0 up
	ip -n "$ns" addr add "$ip/24" dev eth0
	ip -n "$ns" link set eth0 up
	# A default gateway, as real nodes have: anything sent in the clear would show on the
	# underlay, which is what the fail-closed checks look for.
	ip -n "$ns" route add default via "${MESH_NET}.1"
	# As a kubelet registers it: the Node with its address in status (kept on create).
	cat <<YAML | kc create -f - >/dev/null
apiVersion: v1
kind: Node
metadata:
  name: $node
  labels: {kubernetes.io/hostname: $node}
status:
  addresses: [{type: InternalIP, address: "$ip"}]
YAML
	start_agent "$node"
}

# The addresses of Node NODE at SITE with address ADDR, as a kubelet reports them (a JSON
# list, YAML too): a public node's address is its InternalIP and, with its IPv6 address, its
# ExternalIPs; a node behind NAT knows only its LAN address.
cloud_node_addresses() {
	local node=$1 site=$2 addr=$3 nat
	nat=$(clouds_nat "$site")
	if [[ $nat == none ]]; then
		# Dual-stack: its IPv6 address first, the one nodes that have IPv6 prefer.
		echo "[{\"type\": \"InternalIP\", \"address\": \"$addr\"}, {\"type\": \"ExternalIP\", \"address\": \"$(clouds_node_address6 "$node")\"}, {\"type\": \"ExternalIP\", \"address\": \"$addr\"}]"
	else
		echo "[{\"type\": \"InternalIP\", \"address\": \"$addr\"}]"
	fi
}

# As a kubelet registers a node of site SITE at ADDR: its location label and addresses.
register_cloud_node() {
	local node=$1 site=$2 addr=$3 addresses
	addresses=$(cloud_node_addresses "$node" "$site" "$addr")
	cat <<YAML | kc create -f - >/dev/null
apiVersion: v1
kind: Node
metadata:
  name: $node
  labels: {kubernetes.io/hostname: $node, topology.kubernetes.io/region: $site}
status:
  addresses: $addresses
YAML
}

# What a kubelet does when its node's addresses change: it writes the Node's status. A PUT of
# the whole object to the status subresource, which every kubectl can send (`kubectl patch
# --subresource` is newer than Debian's kubectl 1.20); retried when another writer got there
# first (409).
update_node_addresses() {
	local node=$1 site=$2 addr=$3 addresses file
	addresses=$(cloud_node_addresses "$node" "$site" "$addr")
	file="$dir/nodes/$node/node-status.json"
	for _ in $(seq 10); do
		if kc get node "$node" -o json |
			ADDRESSES=$addresses python3 -c 'import json, os, sys
node = json.load(sys.stdin)
node.setdefault("status", {})["addresses"] = json.loads(os.environ["ADDRESSES"])
json.dump(node, sys.stdout)' >"$file" &&
			kc replace --raw "/api/v1/nodes/$node/status" -f "$file" >/dev/null; then
			return 0
		fi
		sleep 0.5
	done
	die "could not write the addresses of Node $node"
}

# Moves NODE to SITE: its link, its address, its default route, its Node's addresses. Its
# namespace, and with it its agent, its device and its pods' links, stay.
move_node() {
	local node=$1 site=$2 from from_nat from_ns addr
	[[ $MESH_CLOUDS == 1 ]] || die "move-node needs a mesh brought up with --clouds"
	from=$(clouds_node_site "$node")
	[[ -n $from ]] || die "$node is at no site"
	[[ $from != "$site" ]] || die "$node is at site $site already"
	from_nat=$(clouds_nat "$from")
	if [[ $from_nat == none ]]; then
		from_ns=$(ns_ul)
	else
		from_ns=$(clouds_ns_router "$from")
	fi
	clouds_attach "$node" "$site" "$(veth_node "$node")" "$from_ns" "$(ns_ul)"
	addr=$(clouds_node_address "$node")
	update_node_addresses "$node" "$site" "$addr"
	log "$node moved from site $from to site $site, at $addr"
}

# The site of NODE (--clouds).
node_site() {
	local site
	[[ $MESH_CLOUDS == 1 ]] || die "no sites: the mesh in $dir was not brought up with --clouds"
	site=$(clouds_node_site "$1")
	[[ -n $site ]] || die "$1 is at no site"
	echo "$site"
}

remove_node() {
	local node=$1
	stop_agent "$node" TERM
	kc delete node "$node" --wait=false >/dev/null 2>&1 || true
	# Its agent's identity goes with it (a token bound to a deleted pod is void anyway).
	kc delete pod -n "$SYSTEM_NS" "$RELEASE-agent-$node" --wait=false >/dev/null 2>&1 || true
	rm -f "$dir/nodes/$node/kubeconfig"
	while read -r pod; do
		ip netns del "$(ns_pod "$pod")" 2>/dev/null || true
	done < <(cat "$dir/pods/$node" 2>/dev/null || true)
	rm -f "$dir/pods/$node"
	ip netns del "$(ns_node "$node")" 2>/dev/null || true
	rm -f "$CLOUDS_DIR/$node"
}

make_pod() {
	local node=$1 pod=$2 ns conf
	ns=$(ns_pod "$pod")
	conf="$dir/nodes/$node/cni/10-wgmesh.conflist"
	for _ in $(seq 300); do
		[[ -f $conf ]] && break
		sleep 0.1
	done
	[[ -f $conf ]] || die "$node has no CNI configuration yet ($conf); is its agent running? see $dir/logs/agent-$node.log"
	ip netns add "$ns"
	ip -n "$ns" link set lo up
	ip netns exec "$(ns_node "$node")" "$MESH_BIN/cni-exec" add "$conf" "/var/run/netns/$ns" "$pod" eth0 >"$dir/nodes/$node/pod-$pod.json"
	echo "$pod" >>"$dir/pods/$node"
	ip -n "$ns" -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1
}

down() {
	[[ -f $dir/mesh.env ]] || {
		log "no mesh in $dir"
		return 0
	}
	for f in "$dir"/pids/agent-*; do
		[[ -f $f ]] && stop_agent "${f##*/agent-}" KILL
	done
	if [[ -f $dir/pids/operator ]]; then
		kill "$(cat "$dir/pids/operator")" 2>/dev/null || true
	fi
	bash "$here/cluster.sh" down --dir "$dir/cp" >/dev/null 2>&1 || true
	for ns in $(ip netns list | awk '{print $1}' | grep "^${MESH_ID}-" || true); do
		ip netns pids "$ns" 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
		ip netns del "$ns" 2>/dev/null || true
	done
	ip link del "m${MESH_ID}h" 2>/dev/null || true
	rm -f /var/run/wireguard/wg-"${MESH_ID}"-n*.sock /var/run/wireguard/wgx"${MESH_ID}".sock
	rm -rf "$dir"
	log "mesh ${MESH_ID} is down"
}

up() {
	need_root "hack/mesh.sh"
	[[ -f $dir/mesh.env ]] && die "a mesh is already up in $dir; run hack/mesh.sh down --dir $dir first"
	[[ -z $clouds || -z $nodes_set ]] || die "--nodes and --clouds: the nodes of --clouds are the table's in hack/lib/clouds.sh"
	# WGMESH_SKIP_DEPS=1: the caller ran hack/lib/deps.sh already (helm renders the identities).
	[[ ${WGMESH_SKIP_DEPS:-0} == 1 ]] || bash "$here/lib/deps.sh"
	bash "$here/cluster.sh" install
	[[ -n $id ]] || id=$(printf 'm%03d' $((RANDOM % 1000)))
	[[ -n $net ]] || net="198.18.$((RANDOM % 250))"
	if [[ ${WGMESH_SKIP_BUILD:-0} == 1 ]]; then
		local bin
		for bin in wgmesh-operator wgmesh-agent cni-exec; do
			[[ -x $root/target/$profile/$bin ]] || die "WGMESH_SKIP_BUILD=1 but there is no $root/target/$profile/$bin"
		done
		log "not building (WGMESH_SKIP_BUILD=1): the binaries in target/$profile as they are"
	else
		log "building ($profile)"
		local flags=()
		[[ $profile == release ]] && flags=(--release)
		(cd "$root" && cargo build -q "${flags[@]}" -p wgmesh-operator -p wgmesh-agent -p wgmesh-ctl -p wgmesh-tests --bin wgmesh-operator --bin wgmesh-agent --bin kubectl-wgmesh --bin cni-exec)
	fi
	mkdir -p "$dir/logs" "$dir/pids" "$dir/pods" "$dir/nodes"
	cat >"$dir/mesh.env" <<ENV
MESH_ID=$id
MESH_NET=$net
MESH_BIN=$root/target/$profile
MESH_CLOUDS=${clouds:-0}
ENV
	# shellcheck disable=SC1091
	source "$dir/mesh.env"

	log "underlay ${MESH_NET}.0/24 in netns $(ns_ul)"
	ip netns add "$(ns_ul)"
	ip -n "$(ns_ul)" link set lo up
	ip -n "$(ns_ul)" link add ul0 type bridge
	ip -n "$(ns_ul)" addr add "${MESH_NET}.1/24" dev ul0
	ip -n "$(ns_ul)" link set ul0 up
	# The host's leg, to reach the API server.
	ip link add "m${MESH_ID}h" type veth peer name "m${MESH_ID}hu"
	ip link set "m${MESH_ID}hu" netns "$(ns_ul)"
	ip -n "$(ns_ul)" link set "m${MESH_ID}hu" master ul0 up
	ip addr add "${MESH_NET}.254/24" dev "m${MESH_ID}h"
	ip link set "m${MESH_ID}h" up
	# The control plane's namespace.
	bridged_ns "$(ns_cp)" eth0 "${MESH_NET}.2/24" "m${MESH_ID}c" "$(ns_ul)"

	log "control plane in netns $(ns_cp)"
	bash "$here/cluster.sh" up --dir "$dir/cp" --netns "$(ns_cp)" --address "${MESH_NET}.2" --port 6443 >/dev/null
	kc apply -f "$root/crds" >/dev/null
	kc wait --for=condition=Established --timeout=60s -f "$root/crds" >/dev/null
	local transport="{hostGateway: Never}"
	[[ -n $hostgw ]] && transport="{hostGateway: OnLink}"
	# --clouds: the sites are the locations (the default label, written out).
	local topology=""
	[[ -z $clouds ]] || topology="topology: {locationLabel: topology.kubernetes.io/region}"
	cat <<YAML | kc apply -f - >/dev/null
apiVersion: wgmesh.dev/v1alpha1
kind: Mesh
metadata: {name: default}
spec:
  listenPort: 51820
  transport: $transport
  externalPeers: {allowedRanges: ["10.250.0.0/24"]}
  $topology
---
apiVersion: wgmesh.dev/v1alpha1
kind: PodCIDRPool
metadata: {name: default}
spec:
  cidrs: ["10.244.0.0/16", "fd00:10:244::/56"]
  nodePrefixLength: {ipv4: 24, ipv6: 64}
YAML
	install_identities
	start_operator

	if [[ -n $clouds ]]; then
		up_clouds
	else
		for i in $(seq "$nodes"); do
			log "node-$i at $(node_ip "node-$i") in netns $(ns_node "node-$i")"
			add_node "node-$i"
		done
	fi
	log "waiting for every node's peer to be Ready"
	kc wait --for=condition=Ready --timeout=120s meshpeers --all >/dev/null ||
		die "peers not Ready; see $dir/logs/"
	[[ -z $clouds ]] || nodes=$(clouds_nodes | wc -l)
	log "mesh ${MESH_ID} is up: $nodes nodes. KUBECONFIG=$dir/cp/kubeconfig"
}

# The NAT routers of hack/lib/clouds.sh's sites, then its nodes, each at its site.
up_clouds() {
	local site nat node
	# The internet is dual-stack.
	ip -n "$(ns_ul)" addr add "$(clouds_v6)::1/64" dev ul0 nodad
	for site in $(clouds_sites); do
		nat=$(clouds_nat "$site")
		[[ $nat != none ]] || continue
		log "site $site: NAT router ($nat) at $(clouds_wan "$site") in netns $(clouds_ns_router "$site"), LAN $(clouds_lan "$site").0/24"
		clouds_router_up "$site" "$(ns_ul)"
	done
	for node in $(clouds_nodes); do
		add_node "$node"
		log "$node at site $(clouds_node_site "$node"), $(node_ip "$node"), in netns $(ns_node "$node")"
	done
}

case "$cmd" in
up) up ;;
down) down ;;
env)
	[[ -f $dir/mesh.env ]] || die "no mesh in $dir"
	cat "$dir/mesh.env"
	echo "KUBECONFIG=$dir/cp/kubeconfig"
	;;
pod) make_pod "${args[0]:?NODE}" "${args[1]:?POD}" ;;
add-node)
	[[ $MESH_CLOUDS == 1 || -z ${args[1]:-} ]] || die "no sites: the mesh in $dir was not brought up with --clouds"
	add_node "${args[0]:?NODE}" "${args[1]:-}"
	;;
address) node_ip "${args[0]:?NODE}" ;;
site) node_site "${args[0]:?NODE}" ;;
wan)
	[[ $MESH_CLOUDS == 1 ]] || die "no sites: the mesh in $dir was not brought up with --clouds"
	clouds_wan "${args[0]:?SITE}"
	;;
flush-nat)
	[[ $MESH_CLOUDS == 1 ]] || die "no NAT: the mesh in $dir was not brought up with --clouds"
	clouds_flush "${args[0]:?SITE}"
	;;
move-node) move_node "${args[0]:?NODE}" "${args[1]:?SITE}" ;;
remove-node) remove_node "${args[0]:?NODE}" ;;
stop-agent) stop_agent "${args[0]:?NODE}" "${args[1]:-TERM}" ;;
start-agent) start_agent "${args[0]:?NODE}" ;;
upgrade-agent) upgrade_agent "${args[0]:?NODE}" ;;
stop-operator) stop_pid "$dir/pids/operator" "${args[0]:-TERM}" ;;
start-operator) start_operator ;;
*)
	usage
	exit 1
	;;
esac
