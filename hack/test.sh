#!/usr/bin/env bash
# hack/test.sh: the README's second command. Installs what the tests need (hack/lib/deps.sh,
# hack/cluster.sh install), starts a real control plane, and runs every check CI runs:
# formatting, clippy, shellcheck, the CRD drift checks, the chart's lint and schema checks,
# the unit, integration and end-to-end tests (including helm install, upgrade and uninstall
# on real kubelet nodes), and the README's first command (hack/demo.sh, then down).
#
#   hack/test.sh            everything
#   hack/test.sh -- ARGS    pass ARGS to `cargo test` (e.g. `-- -p wgmesh-core`); skips the demo
#
# Needs root (apt-get, network namespaces). Leaves nothing running.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=hack/lib/common.sh
source "$here/lib/common.sh"
WGMESH_LOG_PREFIX="[test]"

cargo_args=()
while [[ $# -gt 0 ]]; do
	case "$1" in
	-h | --help)
		sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
		exit 0
		;;
	--)
		shift
		cargo_args=("$@")
		break
		;;
	*) die "unknown option $1 (see --help)" ;;
	esac
done

need_root "hack/test.sh"
cd "$root"
start=$(date +%s)

step() { log "── $* ($(($(date +%s) - start))s)"; }

step "installing dependencies"
# shellcheck source=hack/lib/deps.sh
source hack/lib/deps.sh
bash hack/cluster.sh install

step "formatting"
cargo fmt --all -- --check || die "cargo fmt --all -- --check failed: run cargo fmt --all"

step "CRD drift"
gen=$(mktemp -d)
cluster_dir=/tmp/wgmesh-test-cluster.$$
cleanup() {
	bash hack/cluster.sh down --dir "$cluster_dir" >/dev/null 2>&1 || true
	rm -rf "$gen"
}
trap cleanup EXIT
cargo run -q -p wgmesh-api --bin crdgen -- --out-dir "$gen" >/dev/null
diff -ru crds "$gen" || die "crds/ differs from what the Rust types generate: run cargo run -p wgmesh-api --bin crdgen -- --out-dir crds"
diff -ru crds charts/wgmesh/crds || die "charts/wgmesh/crds differs from crds/: run cp crds/*.yaml charts/wgmesh/crds/"

step "shellcheck"
shellcheck -x hack/*.sh hack/lib/*.sh

step "clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "control plane"
bash hack/cluster.sh up --dir "$cluster_dir" --port "${WGMESH_TEST_PORT:-16443}"
export WGMESH_TEST_KUBECONFIG="$cluster_dir/kubeconfig"

step "tests"
rm -f target/wgmesh-e2e-report.txt
cargo test --workspace "${cargo_args[@]}"
if [[ -f target/wgmesh-e2e-report.txt ]]; then
	step "end-to-end figures"
	cat target/wgmesh-e2e-report.txt
fi

if ((${#cargo_args[@]} == 0)); then
	step "the README's first command: hack/demo.sh"
	demo_dir=/tmp/wgmesh-test-demo.$$
	WGMESH_DEMO_DIR=$demo_dir bash hack/demo.sh ||
		{ WGMESH_DEMO_DIR=$demo_dir bash hack/demo.sh down; die "hack/demo.sh failed"; }
	WGMESH_DEMO_DIR=$demo_dir bash hack/demo.sh down
fi

step "all checks passed"
