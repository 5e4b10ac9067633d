#!/usr/bin/env bash
# hack/bench-agents.sh: the agents at scale. Brings up a mesh of real agents with
# hack/mesh.sh (release build; each agent in its own network namespace with its own
# userspace WireGuard device; the operator and its admission webhook; a real API server),
# registers simulated nodes until the mesh has N, each with an agent identity of its own
# that publishes a key and an endpoint once, then reports as a table:
#   - how long until every real agent's device has every peer, and the agents' memory;
#   - a steady minute: watch events per agent (and how many changed what a pass reads),
#     passes, status writes, API writes per node per minute, requests by verb and resource,
#     CPU per agent and of the API server;
#   - one more real node joining: the time until a pod on it answers a ping from every other
#     real node, and what the join cost each agent.
# Figures, not a pass/fail test.
#
#   hack/bench-agents.sh [--agents A] [--nodes N] [--steady SECONDS]
#       A real agents (default 20), N nodes in all (default 1000), a steady window of
#       SECONDS (default 60)
#
# Needs root. Stops everything it started.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=hack/lib/common.sh
source "$here/lib/common.sh"
WGMESH_LOG_PREFIX="[bench-agents]"

agents=20
nodes=1000
steady=60
while [[ $# -gt 0 ]]; do
	case "$1" in
	--agents)
		agents=${2:?--agents needs a number}
		shift 2
		;;
	--nodes)
		nodes=${2:?--nodes needs a number}
		shift 2
		;;
	--steady)
		steady=${2:?--steady needs a number of seconds}
		shift 2
		;;
	-h | --help)
		sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
		exit 0
		;;
	*) die "unknown option $1 (see --help)" ;;
	esac
done
((agents >= 1 && agents <= 200)) || die "--agents must be 1..200 (the underlay is one /24)"
((nodes > agents)) || die "--nodes must be more than --agents"

need_root "hack/bench-agents.sh"
cd "$root"
bash hack/lib/deps.sh
log "building release binaries"
cargo build -q --release -p wgmesh-tests --bin bench-agents

dir=/tmp/wgmesh-bench-agents.$$
logs=/tmp/wgmesh-bench-agents-logs
# The logs outlive the mesh, for a look at where a join's time went.
trap 'rm -rf "$logs"; cp -r "$dir/logs" "$logs" 2>/dev/null && log "logs kept in $logs"; bash hack/mesh.sh down --dir "$dir" >/dev/null 2>&1 || true' EXIT
WGMESH_SKIP_DEPS=1 bash hack/mesh.sh up --nodes "$agents" --release --dir "$dir"
target/release/bench-agents --dir "$dir" --nodes "$nodes" --steady "$steady"
