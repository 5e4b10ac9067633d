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
