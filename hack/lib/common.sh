# shellcheck shell=bash
# Helpers shared by the hack/ scripts: messages, failure, small predicates.
# Sourced, never executed; it defines functions and does nothing else.

# log prints a progress line on stderr so stdout stays usable (e.g. `env`).
log() {
	printf '%s %s\n' "${WGMESH_LOG_PREFIX:-[wgmesh]}" "$*" >&2
}

# die prints an error on stderr and exits non-zero.
die() {
	printf '%s error: %s\n' "${WGMESH_LOG_PREFIX:-[wgmesh]}" "$*" >&2
	exit 1
}

# need_root fails unless we run as root: apt, netns and /etc writes need it.
need_root() {
	[[ ${EUID} -eq 0 ]] || die "$1 needs root (apt-get, ip netns); run it with sudo"
}

# have reports whether a command is on PATH.
have() {
	command -v "$1" >/dev/null 2>&1
}

# bridged_ns NS IFNAME CIDR VETH UL makes network namespace NS with link IFNAME at address
# CIDR, the other end of which (VETH) is a port of bridge ul0 in namespace UL.
bridged_ns() {
	local ns=$1 ifname=$2 cidr=$3 veth=$4 ul=$5
	ip netns add "$ns"
	ip -n "$ns" link set lo up
	ip link add "$veth" type veth peer name "$ifname" netns "$ns"
	ip link set "$veth" netns "$ul"
	ip -n "$ul" link set "$veth" master ul0 up
	ip -n "$ns" addr add "$cidr" dev "$ifname"
	ip -n "$ns" link set "$ifname" up
}
