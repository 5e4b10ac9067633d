#!/usr/bin/env bash
# hack/nodes.sh: a real Kubernetes cluster on one machine: a control plane (etcd,
# kube-apiserver, kube-controller-manager, kube-scheduler) in a network namespace of its own,
# and N nodes, each a network namespace plus a mount namespace running its own containerd and
# kubelet, on a shared underlay (a bridge in a namespace of its own). No Docker, no registry:
# the pause and busybox images are built locally (hack/lib/node-images.sh) and imported.
#
#   hack/nodes.sh up [--nodes N] [--dir DIR] [--id ID]   start; wait until every Node exists
#   hack/nodes.sh add-node NAME                          one more node
#   hack/nodes.sh remove-node NAME                       stop a node, clean it, delete its Node
#   hack/nodes.sh load FILE.tar [NODE...]                import an OCI archive (all nodes)
#   hack/nodes.sh exec NODE -- CMD...                    run CMD inside a node
#   hack/nodes.sh env                                    print the cluster's settings
#   hack/nodes.sh down [--dir DIR]                       stop and remove everything
#
# No CNI configuration is written: nodes stay NotReady ("cni config uninitialized") until a
# network add-on (the wgmesh DaemonSet) writes one into the node's /etc/cni/net.d. Each node
# has private copies of the node-local paths (NODE_PATHS below: /etc/cni/net.d, /opt/cni/bin
# (seeded with Debian's CNI plugins), /var/lib/kubelet, /run/containerd, /var/log/pods, ...),
# bind-mounted from DIR/nodes/NAME/root/, so hostPath volumes land in that node's own files.
# The underlay is a /24 of 198.18.0.0/15: gateway .1, API server .2, nodes .11.., the host .254.
# Every command takes --dir DIR (default $WGMESH_NODES_DIR or /tmp/wgmesh-nodes). Needs root.
# WGMESH_SKIP_DEPS=1 makes up skip hack/lib/deps.sh, for callers that just ran it.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=hack/lib/common.sh
source "$here/lib/common.sh"
# shellcheck source=hack/lib/pki.sh
source "$here/lib/pki.sh"
# shellcheck source=hack/lib/node-images.sh
source "$here/lib/node-images.sh"
# shellcheck disable=SC2034 # read by log/die in common.sh
WGMESH_LOG_PREFIX="[nodes]"

dir=${WGMESH_NODES_DIR:-/tmp/wgmesh-nodes}
nodes=3
id=""

# Paths a node keeps to itself: bind-mounted in its mount namespace from DIR/nodes/NAME/root.
readonly NODE_PATHS=(
	/etc/cni/net.d /opt/cni/bin /var/lib/cni
	/var/lib/wgmesh /run/wgmesh /run/wireguard
	/var/log/pods /var/log/containers
	/var/lib/kubelet
	/run/containerd /var/lib/containerd
)
# Global sysctls the kubelet sets (setupKernelTunables); saved at up, restored at down.
readonly KUBELET_SYSCTLS=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
	kernel.keys.root_maxkeys kernel.keys.root_maxbytes)
readonly CONTAINERD_SOCK=/run/containerd/containerd.sock
readonly APISERVER_PORT=6443
readonly NODE_TIMEOUT=${WGMESH_NODE_TIMEOUT:-90}

usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; }

usage_command() {
	case $1 in
	up) printf '%s\n' "Usage: hack/nodes.sh up [--nodes N] [--dir DIR] [--id ID]" "" \
		"Installs what is missing (hack/lib/deps.sh, hack/cluster.sh install), builds the pause" \
		"and busybox images, starts the control plane, the scheduler and N nodes node-1..node-N," \
		"and waits until every Node object exists (they stay NotReady until a CNI is installed)." \
		"  --nodes N  number of nodes (default 3)" \
		"  --dir DIR  state directory (default \$WGMESH_NODES_DIR or /tmp/wgmesh-nodes)" \
		"  --id ID    prefix of namespaces, links and cgroups (default k + 3 random digits)" ;;
	add-node) printf '%s\n' "Usage: hack/nodes.sh add-node NAME [--dir DIR]" "" \
		"Starts one more node NAME (containerd, kubelet, images) and waits for its Node object." ;;
	remove-node) printf '%s\n' "Usage: hack/nodes.sh remove-node NAME [--dir DIR]" "" \
		"Stops NAME's kubelet, its pods and containerd, removes its namespaces, cgroups and" \
		"files, and deletes the Node object. No drain." ;;
	load) printf '%s\n' "Usage: hack/nodes.sh load FILE.tar [NODE...] [--dir DIR]" "" \
		"Imports an OCI or docker archive into the containerd (namespace k8s.io) of the given" \
		"nodes, or of every node. Use imagePullPolicy IfNotPresent or Never: there is no registry." ;;
	exec) printf '%s\n' "Usage: hack/nodes.sh exec NODE [--dir DIR] -- CMD..." "" \
		"Runs CMD in NODE's network and mount namespaces, e.g. wg show, ip route," \
		"ls /etc/cni/net.d, ctr -n k8s.io containers ls." ;;
	env) printf '%s\n' "Usage: hack/nodes.sh env [--dir DIR]" "" \
		"Prints shell assignments: KUBECONFIG, APISERVER_HOST, APISERVER_PORT, NODE_NAMES," \
		"NODE_IPS, NODE_NETNS (space-separated, same order), PAUSE_IMAGE, BUSYBOX_IMAGE," \
		"NODES_ID, NODES_DIR, UNDERLAY (the /24), UNDERLAY_NETNS, UNDERLAY_BRIDGE," \
		"CONTROL_PLANE_NETNS. Use: eval \"\$(hack/nodes.sh env)\"." ;;
	down) printf '%s\n' "Usage: hack/nodes.sh down [--dir DIR]" "" \
		"Removes pods with ctr, stops kubelets, containerd, the scheduler and the control plane," \
		"unmounts, removes cgroups, namespaces and links, restores sysctls and removes DIR." \
		"Idempotent; safe after a failed up." ;;
	*) usage ;;
	esac
}

# --- state ----------------------------------------------------------------------------------

load_state() {
	[[ -f $dir/nodes.env ]] || return 1
	# shellcheck disable=SC1091
	source "$dir/nodes.env"
}
need_state() { load_state || die "no cluster in $dir; start one with: hack/nodes.sh up --dir $dir"; }

ns_ul() { echo "${NODES_ID}-ul"; }
ns_cp() { echo "${NODES_ID}-cp"; }
ns_node() { echo "${NODES_ID}-$1"; }
node_dir() { echo "$dir/nodes/$1"; }
mnt_ns() { echo "$dir/ns/$1"; }
cgroup_name() { echo "wgmesh-${NODES_ID}-$1"; }
apiserver_ip() { echo "${NODES_NET}.2"; }
kc() { KUBECONFIG="$dir/cp/kubeconfig" kubectl "$@"; }
node_names() {
	local f
	for f in "$dir"/nodes/*/node.env; do
		[[ -f $f ]] || continue
		f=${f%/node.env}
		echo "${f##*/}"
	done
}
# node_var NODE KEY: a value from the node's node.env.
node_var() { awk -F= -v k="$2" '$1 == k { print $2 }' "$(node_dir "$1")/node.env"; }

# --- processes --------------------------------------------------------------------------------

# start_proc NAME CMD...: start CMD in its own session, logging to logs/NAME.log; the PID on
# file is CMD's own (the wrapper and nsenter exec).
start_proc() {
	local name=$1 pidfile=$dir/pids/$1 tries=0
	shift
	rm -f "$pidfile"
	# shellcheck disable=SC2016 # expanded by the inner bash
	setsid bash -c 'echo "$$" >"$0" && exec "$@"' "$pidfile" "$@" </dev/null >>"$dir/logs/$name.log" 2>&1 &
	until [[ -s $pidfile ]]; do
		((++tries < 50)) || die "$name did not start; see $dir/logs/$name.log"
		sleep 0.1
	done
}

alive() {
	local pid
	[[ -s $dir/pids/$1 ]] || return 1
	pid=$(<"$dir/pids/$1")
	kill -0 "$pid" 2>/dev/null
}

# stop_proc NAME: TERM, up to 10 s, then KILL.
stop_proc() {
	local pidfile=$dir/pids/$1 pid
	[[ -s $pidfile ]] || return 0
	pid=$(<"$pidfile")
	if kill -TERM "$pid" 2>/dev/null; then
		for _ in $(seq 100); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		kill -KILL "$pid" 2>/dev/null || true
	fi
	rm -f "$pidfile"
}

# in_node NODE CMD...: run CMD in the node's network and mount namespaces. Not `ip netns
# exec`: it remounts /sys, and a kubelet there finds no cgroups.
in_node() {
	local node=$1
	shift
	nsenter --net="/run/netns/$(ns_node "$node")" --mount="$(mnt_ns "$node")" -- "$@"
}

node_ctr() {
	local node=$1
	shift
	nsenter --mount="$(mnt_ns "$node")" -- ctr --address "$CONTAINERD_SOCK" -n k8s.io "$@"
}

# --- cgroups ----------------------------------------------------------------------------------

# cgroup_mounts: every cgroup hierarchy's mount point (v1 controllers, and the v2 one of a
# hybrid setup).
cgroup_mounts() { awk '$3 == "cgroup" || $3 == "cgroup2" { print $2 }' /proc/mounts; }

# make_cgroup NAME: /NAME in every hierarchy, with cpuset's cpus and mems filled in (a new
# cpuset takes no tasks until they are), so the kubelet can use it as --cgroup-root.
make_cgroup() {
	local m
	for m in $(cgroup_mounts); do
		mkdir -p "$m/$1"
		if [[ -f $m/$1/cpuset.cpus ]]; then
			cat "$m/cpuset.cpus" >"$m/$1/cpuset.cpus"
			cat "$m/cpuset.mems" >"$m/$1/cpuset.mems"
		fi
	done
}

# cgroup_pids NAME: every process in /NAME or below, in any hierarchy.
cgroup_pids() {
	local m
	for m in $(cgroup_mounts); do
		[[ -d $m/$1 ]] || continue
		find "$m/$1" -name cgroup.procs -exec cat {} + 2>/dev/null || true
	done | sort -un
}

# remove_cgroup NAME: kill what is left inside, then remove the tree, deepest first.
remove_cgroup() {
	local m pids
	for _ in 1 2 3 4 5; do
		pids=$(cgroup_pids "$1")
		[[ -n $pids ]] || break
		# shellcheck disable=SC2086 # a list of PIDs
		kill -KILL $pids 2>/dev/null || true
		sleep 0.2
	done
	for m in $(cgroup_mounts); do
		[[ -d $m/$1 ]] || continue
		find "$m/$1" -depth -type d -exec rmdir {} + 2>/dev/null || true
		[[ ! -d $m/$1 ]] || log "warning: could not remove cgroup $m/$1"
	done
}

# --- sysctls ----------------------------------------------------------------------------------

# Several clusters may run at once (parallel tests) and their kubelets change the same global
# sysctls, so the values from before the first one are kept once, in SHARED_DIR, with one
# file per running cluster in SHARED_DIR/users; the last `down` restores them. Under
# SHARED_DIR/lock, which also serialises picking an id and an underlay.
readonly SHARED_DIR=/run/wgmesh-nodes

# with_shared_lock CMD...: run CMD holding SHARED_DIR/lock.
with_shared_lock() {
	local fd status=0
	mkdir -p "$SHARED_DIR/users"
	exec {fd}>"$SHARED_DIR/lock"
	flock "$fd"
	"$@" || status=$?
	exec {fd}>&-
	return "$status"
}

# prune_users forgets clusters whose state directory is gone (a crash, a reboot of /tmp).
prune_users() {
	local f
	for f in "$SHARED_DIR"/users/*; do
		[[ -f $f ]] || continue
		[[ -f $(<"$f")/nodes.env ]] || rm -f "$f"
	done
}

save_sysctls() {
	local key
	prune_users
	if [[ ! -f $SHARED_DIR/sysctl.saved ]] || [[ -z $(ls -A "$SHARED_DIR/users") ]]; then
		for key in "${KUBELET_SYSCTLS[@]}"; do
			printf '%s=%s\n' "$key" "$(sysctl -n "$key")"
		done >"$SHARED_DIR/sysctl.saved"
	fi
	printf '%s\n' "$dir" >"$SHARED_DIR/users/$NODES_ID"
}

restore_sysctls() {
	local line
	rm -f "$SHARED_DIR/users/$NODES_ID"
	prune_users
	[[ -f $SHARED_DIR/sysctl.saved && -z $(ls -A "$SHARED_DIR/users") ]] || return 0
	while read -r line; do
		sysctl -qw "$line" >/dev/null || log "warning: could not restore $line"
	done <"$SHARED_DIR/sysctl.saved"
	rm -f "$SHARED_DIR/sysctl.saved"
}

# --- the underlay and the control plane -----------------------------------------------------

# claim_underlay (under the shared lock): picks an unused id and /24, writes DIR/nodes.env,
# saves the sysctls and creates the underlay, so a parallel up sees both taken.
claim_underlay() {
	if [[ -z $id ]]; then
		for _ in $(seq 50); do
			id=$(printf 'k%03d' $((RANDOM % 1000)))
			ip netns list | grep -q "^$id-" || [[ -e $SHARED_DIR/users/$id ]] || break
		done
	fi
	! ip netns list | grep -q "^$id-" || die "namespaces with prefix $id- exist already; pick another --id"
	cat >"$dir/nodes.env" <<ENV
NODES_ID=$id
NODES_NET=$(free_net)
KUBE_BIN=$KUBE_BIN
PAUSE_IMAGE=$PAUSE_IMAGE
PAUSE_TAR=$PAUSE_TAR
BUSYBOX_IMAGE=$BUSYBOX_IMAGE
BUSYBOX_TAR=$BUSYBOX_TAR
ENV
	load_state
	save_sysctls
	make_underlay
}

# free_net: a 198.18.X /24 that no route on this host uses yet.
free_net() {
	local x used
	used=$(ip -4 route show | awk '{ print $1 }')
	for _ in $(seq 100); do
		x=$((RANDOM % 250))
		grep -q "^198\.18\.$x\." <<<"$used" || {
			echo "198.18.$x"
			return 0
		}
	done
	die "no free /24 in 198.18.0.0/16"
}

make_underlay() {
	local ul cp
	ul=$(ns_ul)
	cp=$(ns_cp)
	log "underlay ${NODES_NET}.0/24 in netns $ul"
	ip netns add "$ul"
	ip -n "$ul" link set lo up
	ip -n "$ul" link add ul0 type bridge
	ip -n "$ul" addr add "${NODES_NET}.1/24" dev ul0
	ip -n "$ul" link set ul0 up
	# The host's leg, to reach the API server.
	ip link add "${NODES_ID}h" type veth peer name "${NODES_ID}hu"
	ip link set "${NODES_ID}hu" netns "$ul"
	ip -n "$ul" link set "${NODES_ID}hu" master ul0 up
	ip addr add "${NODES_NET}.254/24" dev "${NODES_ID}h"
	ip link set "${NODES_ID}h" up
	# The control plane's namespace.
	ip netns add "$cp"
	ip -n "$cp" link set lo up
	ip link add "${NODES_ID}c" type veth peer name eth0 netns "$cp"
	ip link set "${NODES_ID}c" netns "$ul"
	ip -n "$ul" link set "${NODES_ID}c" master ul0 up
	ip -n "$cp" addr add "$(apiserver_ip)/24" dev eth0
	ip -n "$cp" link set eth0 up
	ip -n "$cp" route add default via "${NODES_NET}.1"
}

# issue_client NAME SUBJECT: a client certificate from the cluster CA, in DIR/pki.
issue_client() {
	mkdir -p "$dir/pki"
	ln -sfn "$dir/cp/pki/ca.crt" "$dir/pki/ca.crt"
	ln -sfn "$dir/cp/pki/ca.key" "$dir/pki/ca.key"
	(cd "$dir/pki" && sign_cert "$1" "$2" "keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth")
}

# kubeconfig_for NAME: DIR/pki/NAME.kubeconfig with NAME's certificate.
kubeconfig_for() {
	write_kubeconfig "$dir/pki/$1.kubeconfig" "https://$(apiserver_ip):$APISERVER_PORT" \
		"$dir/pki/ca.crt" "$dir/pki/$1.crt" "$dir/pki/$1.key"
}

start_scheduler() {
	issue_client kube-scheduler "/CN=system:kube-scheduler"
	kubeconfig_for kube-scheduler
	# --port 0 --secure-port 0: nothing to serve, nothing to collide with.
	start_proc kube-scheduler nsenter --net="/run/netns/$(ns_cp)" -- \
		"$KUBE_BIN/kube-scheduler" --kubeconfig "$dir/pki/kube-scheduler.kubeconfig" \
		--leader-elect=false --port 0 --secure-port 0 --v 1
}

# --- nodes ----------------------------------------------------------------------------------

# pick_index NAME: node-K gets index K when free; anything else the lowest free index.
pick_index() {
	local name=$1 i used
	used=" $(for n in $(node_names); do node_var "$n" NODE_INDEX; done | tr '\n' ' ') "
	if [[ $name =~ ^node-([0-9]+)$ ]] && ((BASH_REMATCH[1] >= 1 && BASH_REMATCH[1] <= 240)) &&
		[[ $used != *" ${BASH_REMATCH[1]} "* ]]; then
		echo "${BASH_REMATCH[1]}"
		return 0
	fi
	for ((i = 1; i <= 240; i++)); do
		[[ $used == *" $i "* ]] || {
			echo "$i"
			return 0
		}
	done
	die "no free node address"
}

node_network() {
	local node=$1 index=$2 ns host
	ns=$(ns_node "$node")
	host="${NODES_ID}n${index}"
	ip netns add "$ns"
	ip -n "$ns" link set lo up
	ip link add "$host" type veth peer name eth0 netns "$ns"
	ip link set "$host" netns "$(ns_ul)"
	ip -n "$(ns_ul)" link set "$host" master ul0 up
	ip -n "$ns" addr add "${NODES_NET}.$((10 + index))/24" dev eth0
	ip -n "$ns" link set eth0 up
	ip -n "$ns" route add default via "${NODES_NET}.1"
	# As on any Kubernetes node (kubeadm's preflight requires it): the node routes for its
	# pods. A new network namespace starts with forwarding off.
	nsenter --net="/run/netns/$ns" sysctl -q -w net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
}

# node_mounts NODE: a persistent mount namespace (held by a bind mount of its nsfs file at
# DIR/ns/NODE, no process needed) in which NODE_PATHS are the node's own directories.
node_mounts() {
	local node=$1 nd p
	nd=$(node_dir "$node")
	for p in "${NODE_PATHS[@]}"; do
		mkdir -p "$nd/root$p" "$p" # the second: the mount point, on the host
	done
	# Debian's reference plugins, copied rather than linked: an add-on that installs its own
	# plugins into /opt/cni/bin must not write through to the host's.
	cp -a /usr/lib/cni/. "$nd/root/opt/cni/bin/"
	touch "$(mnt_ns "$node")"
	# Slave: mounts made on the host later (ip netns add) still show; nothing flows back.
	unshare --mount="$(mnt_ns "$node")" --propagation slave true
	# Inside: drop the copy of DIR/ns (it would keep the other nodes' namespaces alive), then
	# bind the node's directories over the shared paths. A hybrid host's cgroup2 mount
	# (/sys/fs/cgroup/unified) goes too: runc makes each container's cgroup there as well,
	# but the 1.20 kubelet, which manages cgroup v1 only, never removes the pod's, and then
	# never finishes deleting the pod.
	# shellcheck disable=SC2016 # expanded by the inner bash
	nsenter --mount="$(mnt_ns "$node")" -- bash -c '
		set -e
		umount -l "$1"
		if mountpoint -q /sys/fs/cgroup/unified; then umount -l /sys/fs/cgroup/unified; fi
		root=$2
		shift 2
		for p in "$@"; do mount --bind "$root$p" "$p"; done' \
		bash "$dir/ns" "$nd/root" "${NODE_PATHS[@]}"
}

write_containerd_config() {
	local nd=$1
	cat >"$nd/containerd.toml" <<TOML
# containerd of one hack/nodes.sh node; paths are the node's own (its mount namespace).
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "$CONTAINERD_SOCK"

[plugins."io.containerd.internal.v1.opt"]
  path = "/var/lib/containerd/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # Without it runc fails every sandbox: "can't get final child's PID from pipe: EOF".
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  # The node's private directories; the network add-on writes the configuration.
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
TOML
}

write_kubelet_config() {
	local nd=$1 ip=$2
	cat >"$nd/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $ip
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $dir/pki/ca.crt}
authorization: {mode: Webhook}
healthzBindAddress: 127.0.0.1
volumePluginDir: /var/lib/kubelet/volume-plugins
serializeImagePulls: false
# There is no registry to pull from again: never collect images, evict only on real need.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
YAML
}

start_node() {
	local node=$1 nd ip tries=0
	nd=$(node_dir "$node")
	ip=$(node_var "$node" NODE_IP)
	# in_node, spelled out: start_proc execs a command, not a function.
	local -a enter=(nsenter --net="/run/netns/$(ns_node "$node")" --mount="$(mnt_ns "$node")" --)
	start_proc "containerd-$node" "${enter[@]}" containerd --config "$nd/containerd.toml" --log-level warn
	until node_ctr "$node" version >/dev/null 2>&1; do
		alive "containerd-$node" || die "containerd on $node exited; see $dir/logs/containerd-$node.log"
		((++tries < 100)) || die "containerd on $node did not answer; see $dir/logs/containerd-$node.log"
		sleep 0.1
	done
	load_image "$node" "$PAUSE_TAR"
	load_image "$node" "$BUSYBOX_TAR"
	start_proc "kubelet-$node" "${enter[@]}" "$KUBE_BIN/kubelet" \
		--config "$nd/kubelet.yaml" --kubeconfig "$dir/pki/kubelet-$node.kubeconfig" \
		--hostname-override "$node" --node-ip "$ip" \
		--container-runtime remote --container-runtime-endpoint "unix://$CONTAINERD_SOCK" \
		--pod-infra-container-image "$PAUSE_IMAGE" \
		--cgroup-driver cgroupfs --cgroup-root "/$(cgroup_name "$node")" \
		--fail-swap-on=false --read-only-port 0 --v 1
}

# add_node NODE: everything a node needs, started; does not wait for the Node object.
add_node() {
	local node=$1 index nd
	[[ $node =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ && ${#node} -le 40 ]] ||
		die "node name '$node' is not a DNS label"
	nd=$(node_dir "$node")
	[[ ! -e $nd ]] || die "$node exists already"
	index=$(pick_index "$node")
	mkdir -p "$nd"
	printf 'NODE_INDEX=%s\nNODE_IP=%s\n' "$index" "${NODES_NET}.$((10 + index))" >"$nd/node.env"
	log "$node at ${NODES_NET}.$((10 + index)) in netns $(ns_node "$node")"
	node_network "$node" "$index"
	node_mounts "$node"
	make_cgroup "$(cgroup_name "$node")"
	issue_client "kubelet-$node" "/O=system:nodes/CN=system:node:$node"
	kubeconfig_for "kubelet-$node"
	write_containerd_config "$nd"
	write_kubelet_config "$nd" "${NODES_NET}.$((10 + index))"
	start_node "$node"
}

load_image() {
	local node=$1 tar=$2
	node_ctr "$node" images import --snapshotter overlayfs - <"$tar" >/dev/null ||
		die "importing $tar into $node failed"
}

wait_nodes() {
	local deadline=$((SECONDS + NODE_TIMEOUT)) node
	for node in "$@"; do
		until kc get node "$node" >/dev/null 2>&1; do
			alive "kubelet-$node" || die "the kubelet on $node exited; see $dir/logs/kubelet-$node.log"
			((SECONDS < deadline)) || die "$node did not register in ${NODE_TIMEOUT}s; see $dir/logs/kubelet-$node.log"
			sleep 0.5
		done
	done
}

# clean_node NODE: stop and remove everything of one node, on this machine (not the Node object).
clean_node() {
	local node=$1 nd ids pids nsid
	nd=$(node_dir "$node")
	stop_proc "kubelet-$node"
	if alive "containerd-$node"; then
		# Pods first, while containerd still knows them: their shims and processes go with them.
		ids=$(node_ctr "$node" tasks ls -q 2>/dev/null || true)
		for c in $ids; do node_ctr "$node" tasks kill -s KILL "$c" >/dev/null 2>&1 || true; done
		for c in $ids; do node_ctr "$node" tasks delete -f "$c" >/dev/null 2>&1 || true; done
		for c in $(node_ctr "$node" containers ls -q 2>/dev/null || true); do
			node_ctr "$node" containers delete "$c" >/dev/null 2>&1 || true
		done
	fi
	stop_proc "containerd-$node"
	remove_cgroup "$(cgroup_name "$node")"
	# Whatever still runs in the node's namespaces (shims, hostNetwork leftovers).
	if [[ -e $(mnt_ns "$node") ]] && nsid=$(nsenter --mount="$(mnt_ns "$node")" -- readlink /proc/self/ns/mnt 2>/dev/null); then
		pids=$(for p in /proc/[0-9]*; do
			[[ $(readlink "$p/ns/mnt" 2>/dev/null) == "$nsid" ]] && echo "${p#/proc/}"
		done || true)
		# shellcheck disable=SC2086 # a list of PIDs
		[[ -z $pids ]] || kill -KILL $pids 2>/dev/null || true
	fi
	ip netns pids "$(ns_node "$node")" 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
	# The last reference: the namespace goes, and every mount in it (the kubelet's too).
	umount "$(mnt_ns "$node")" 2>/dev/null || umount -l "$(mnt_ns "$node")" 2>/dev/null || true
	rm -f "$(mnt_ns "$node")"
	ip netns del "$(ns_node "$node")" 2>/dev/null || true
	[[ -z $(mounts_under "$nd") ]] || die "mounts left under $nd: $(mounts_under "$nd")"
	rm -rf "$nd"
}

# mounts_under PATH: this host's mount points at or below PATH.
mounts_under() { awk -v p="$1" '$2 == p || index($2, p "/") == 1 { print $2 }' /proc/mounts; }

# --- commands -------------------------------------------------------------------------------

up() {
	local started=$SECONDS i names=()
	need_root "hack/nodes.sh up"
	[[ ! -f $dir/nodes.env ]] || die "a cluster is already up in $dir; run hack/nodes.sh down --dir $dir first"
	if [[ ! $nodes =~ ^[0-9]+$ ]] || ((nodes < 1 || nodes > 200)); then
		die "--nodes must be 1-200"
	fi
	# WGMESH_SKIP_DEPS=1: the caller ran hack/lib/deps.sh already (it may build with cargo).
	[[ ${WGMESH_SKIP_DEPS:-0} == 1 ]] || bash "$here/lib/deps.sh"
	bash "$here/cluster.sh" install
	KUBE_BIN=$(readlink -f "${XDG_CACHE_HOME:-$HOME/.cache}/wgmesh/kube-current/bin")
	[[ -x $KUBE_BIN/kubelet && -x $KUBE_BIN/kube-scheduler ]] || die "no kubelet/kube-scheduler in $KUBE_BIN"
	node_images_build

	[[ -z $id || $id =~ ^[a-z][a-z0-9]{0,5}$ ]] ||
		die "--id must be 1-6 lowercase letters/digits, starting with a letter"
	mkdir -p "$dir"/{logs,pids,nodes,ns,pki}
	# From here on, a failure leaves state that `down` removes.
	trap 'status=$?; ((status == 0)) || log "up failed; logs in $dir/logs; clean up with: hack/nodes.sh down --dir $dir"' EXIT
	with_shared_lock claim_underlay
	# The namespace files' home: private, as unshare --mount=FILE needs.
	mount --bind "$dir/ns" "$dir/ns"
	mount --make-private "$dir/ns"
	log "control plane in netns $(ns_cp)"
	bash "$here/cluster.sh" up --dir "$dir/cp" --netns "$(ns_cp)" --address "$(apiserver_ip)" \
		--port "$APISERVER_PORT" >/dev/null
	start_scheduler
	for ((i = 1; i <= nodes; i++)); do
		add_node "node-$i"
		names+=("node-$i")
	done
	wait_nodes "${names[@]}"
	trap - EXIT
	log "up in $((SECONDS - started))s: $nodes nodes (NotReady until a CNI is installed)"
	log "KUBECONFIG=$dir/cp/kubeconfig; settings: hack/nodes.sh env --dir $dir"
}

down() {
	local node m
	need_root "hack/nodes.sh down"
	if ! load_state; then
		if [[ ! -e $dir ]]; then
			log "nothing to do: $dir does not exist"
			return 0
		fi
		log "no nodes.env in $dir; removing what is there"
		NODES_ID=""
	fi
	# Nodes in parallel: each waits for its own kubelet and containerd to exit.
	local -a jobs=()
	for node in $(node_names); do
		log "stopping $node"
		clean_node "$node" &
		jobs+=($!)
	done
	for m in "${jobs[@]}"; do
		wait "$m" || log "warning: a node did not clean up completely; continuing"
	done
	stop_proc kube-scheduler
	bash "$here/cluster.sh" down --dir "$dir/cp" >/dev/null 2>&1 || true
	if [[ -n $NODES_ID ]]; then
		for m in $(ip netns list | awk '{ print $1 }' | grep "^${NODES_ID}-" || true); do
			ip netns pids "$m" 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
			ip netns del "$m" 2>/dev/null || true
		done
		ip link del "${NODES_ID}h" 2>/dev/null || true
	fi
	for m in $(mounts_under "$dir" | sort -r); do
		umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
	done
	[[ -z $NODES_ID ]] || with_shared_lock restore_sysctls
	[[ -z $(mounts_under "$dir") ]] || die "could not unmount: $(mounts_under "$dir")"
	rm -rf "$dir"
	log "down: ${NODES_ID:-nothing was running} ($dir removed)"
}

env_cmd() {
	local names=() ips=() netns=() node
	need_state
	for node in $(node_names); do
		names+=("$node")
		ips+=("$(node_var "$node" NODE_IP)")
		netns+=("$(ns_node "$node")")
	done
	printf 'KUBECONFIG=%q\n' "$dir/cp/kubeconfig"
	# What a chart's k8sServiceHost/k8sServicePort take: there is no kube-proxy, so the
	# kubernetes Service IP leads nowhere.
	printf 'APISERVER_HOST=%s\nAPISERVER_PORT=%s\n' "$(apiserver_ip)" "$APISERVER_PORT"
	# Space-separated lists in the same order; names and addresses never contain quotes.
	printf "NODE_NAMES='%s'\nNODE_IPS='%s'\nNODE_NETNS='%s'\n" "${names[*]}" "${ips[*]}" "${netns[*]}"
	printf 'PAUSE_IMAGE=%q\nBUSYBOX_IMAGE=%q\n' "$PAUSE_IMAGE" "$BUSYBOX_IMAGE"
	printf 'NODES_ID=%s\nNODES_DIR=%q\nUNDERLAY=%s\nUNDERLAY_NETNS=%s\nUNDERLAY_BRIDGE=ul0\n' \
		"$NODES_ID" "$dir" "${NODES_NET}.0/24" "$(ns_ul)"
	printf 'CONTROL_PLANE_NETNS=%s\n' "$(ns_cp)"
}

cmd=${1:-}
[[ -n $cmd ]] || {
	usage >&2
	exit 2
}
shift
case $cmd in
-h | --help | help)
	usage
	exit 0
	;;
up | down | env | add-node | remove-node | load | exec) ;;
*) die "unknown command '$cmd' (try --help)" ;;
esac
args=()
while (($# > 0)); do
	case $1 in
	--dir | --nodes | --id)
		(($# >= 2)) || die "$1 needs a value"
		case $1 in
		--dir) dir=$2 ;;
		--nodes) nodes=$2 ;;
		--id) id=$2 ;;
		esac
		shift 2
		;;
	-h | --help)
		usage_command "$cmd"
		exit 0
		;;
	--)
		shift
		args+=(--)
		args+=("$@")
		break
		;;
	*)
		args+=("$1")
		shift
		;;
	esac
done
dir=$(realpath -m "$dir")

case $cmd in
up) up ;;
down) down ;;
env) env_cmd ;;
add-node)
	need_root "hack/nodes.sh add-node"
	need_state
	((${#args[@]} == 1)) || die "usage: hack/nodes.sh add-node NAME"
	add_node "${args[0]}"
	wait_nodes "${args[0]}"
	log "${args[0]} registered"
	;;
remove-node)
	need_root "hack/nodes.sh remove-node"
	need_state
	((${#args[@]} == 1)) || die "usage: hack/nodes.sh remove-node NAME"
	[[ -f $(node_dir "${args[0]}")/node.env ]] || die "no node ${args[0]} in $dir"
	clean_node "${args[0]}"
	kc delete node "${args[0]}" --ignore-not-found >/dev/null
	log "${args[0]} removed"
	;;
load)
	need_root "hack/nodes.sh load"
	need_state
	((${#args[@]} >= 1)) || die "usage: hack/nodes.sh load FILE.tar [NODE...]"
	[[ -r ${args[0]} ]] || die "cannot read ${args[0]}"
	targets=("${args[@]:1}")
	((${#targets[@]} > 0)) || mapfile -t targets < <(node_names)
	for node in "${targets[@]}"; do
		[[ -f $(node_dir "$node")/node.env ]] || die "no node $node in $dir"
		load_image "$node" "${args[0]}"
		log "loaded ${args[0]} into $node"
	done
	;;
exec)
	need_root "hack/nodes.sh exec"
	need_state
	if ((${#args[@]} < 3)) || [[ ${args[1]} != -- ]]; then
		die "usage: hack/nodes.sh exec NODE -- CMD..."
	fi
	[[ -f $(node_dir "${args[0]}")/node.env ]] || die "no node ${args[0]} in $dir"
	in_node "${args[0]}" "${args[@]:2}"
	;;
esac
