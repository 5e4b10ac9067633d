#!/usr/bin/env bash
# hack/release.sh: the release binary of the kubectl plugin, as a tarball with its SHA-256:
# target/dist/kubectl-wgmesh-VERSION-linux-ARCH.tar.gz (kubectl-wgmesh and the license)
# and target/dist/kubectl-wgmesh-VERSION-linux-ARCH.tar.gz.sha256. The operator and agent
# ship as the image (hack/image.sh), which carries the plugin too.
#
#   hack/release.sh
#
# Prints the tarball's path on stdout.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=hack/lib/common.sh
source "$here/lib/common.sh"
WGMESH_LOG_PREFIX="[release]"

cd "$root"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
[[ -n $version ]] || die "no version in Cargo.toml"
case "$(uname -m)" in
x86_64) arch=amd64 ;;
aarch64) arch=arm64 ;;
*) arch=$(uname -m) ;;
esac
name="kubectl-wgmesh-$version-linux-$arch"
log "building kubectl-wgmesh $version (release)"
cargo build -q --release --locked -p wgmesh-ctl --bin kubectl-wgmesh
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
strip --strip-debug -o "$stage/kubectl-wgmesh" target/release/kubectl-wgmesh
[[ -f LICENSE ]] && cp LICENSE "$stage/"
mkdir -p target/dist
tar -C "$stage" -czf "target/dist/$name.tar.gz" .
(cd target/dist && sha256sum "$name.tar.gz" >"$name.tar.gz.sha256")
log "$(cat "target/dist/$name.tar.gz.sha256")"
printf '%s\n' "$root/target/dist/$name.tar.gz"
