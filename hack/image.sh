#!/usr/bin/env bash
# hack/image.sh: builds wgmesh's one container image without Docker: the release binaries
# (wgmesh-operator, wgmesh-agent, and the kubectl plugin kubectl-wgmesh) on a base made of Debian packages (glibc, nftables' nft,
# wireguard-tools' wg, the CNI reference plugins), written as an OCI archive that
# `ctr images import`, `podman load` and `docker load` all take.
#
#   hack/image.sh [--tag TAG] [--repository REPO] [--out FILE]
#
# Defaults: REPO wgmesh.local/wgmesh, TAG the crate version plus the git commit
# (e.g. 0.1.0-1a2b3c4, -dirty when the tree has changes), FILE target/image/wgmesh-TAG.tar.
# Prints the archive's path on stdout; sizes and the digest on stderr.
# Containerfile at the repository's root builds the same image where podman or BuildKit is.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=hack/lib/common.sh
source "$here/lib/common.sh"
WGMESH_LOG_PREFIX="[image]"

# What the image carries from Debian, by need: the binaries' C runtime (libc6, libgcc-s1),
# `nft` for the agent's masquerade table, `wg` for people on the node, and the CNI plugins
# the init container copies to the node. Their dependencies are resolved by apt.
readonly BASE_PACKAGES=(libc6 libgcc-s1 nftables wireguard-tools containernetworking-plugins)
# Kept out of the image: documentation and translations nobody reads in a container, and
# glibc's character-set converters (nothing here calls iconv).
readonly PRUNE=(usr/share/doc usr/share/man usr/share/info usr/share/locale usr/share/lintian
	usr/share/bug usr/lib/x86_64-linux-gnu/gconv)
# Of the CNI reference plugins, the ones wgmesh's conflist calls (node-agent cni_install.rs).
readonly CNI_PLUGINS=(bridge host-local portmap loopback)

repository=wgmesh.local/wgmesh
tag=""
out=""
while [[ $# -gt 0 ]]; do
	case "$1" in
	--tag) tag=${2:?--tag needs a value}; shift 2 ;;
	--repository) repository=${2:?--repository needs a value}; shift 2 ;;
	--out) out=${2:?--out needs a value}; shift 2 ;;
	-h | --help)
		sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
		exit 0
		;;
	*) die "unknown option $1 (see --help)" ;;
	esac
done

need_root "hack/image.sh"
bash "$here/lib/deps.sh"

version=$(awk -F'"' '/^version *=/ { print $2; exit }' "$root/Cargo.toml")
if [[ -z $tag ]]; then
	tag="$version"
	if commit=$(git -C "$root" rev-parse --short=7 HEAD 2>/dev/null); then
		tag+="-$commit"
		[[ -z $(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null) ]] || tag+="-dirty"
	fi
fi
[[ $tag =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || die "'$tag' is not a valid image tag"
out=${out:-$root/target/image/wgmesh-$tag.tar}
cache=${XDG_CACHE_HOME:-$HOME/.cache}/wgmesh/image-base

# base_rootfs prints a directory holding the Debian packages unpacked, built once per set
# of package versions.
base_rootfs() {
	local -a pkgs
	mapfile -t pkgs < <(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
		--no-breaks --no-replaces --no-enhances "${BASE_PACKAGES[@]}" 2>/dev/null |
		grep -v '^[ <]' | sort -u)
	((${#pkgs[@]} >= ${#BASE_PACKAGES[@]})) || die "apt-cache could not resolve ${BASE_PACKAGES[*]}"
	local versions key dir
	versions=$(apt-cache policy "${pkgs[@]}" | awk '/^[^ ]/ { p = $1 } /Candidate:/ { print p $2 }')
	# The key covers how the base is made as well as what it is made of.
	key=$(printf '%s\n' "$versions" "${PRUNE[@]}" "${CNI_PLUGINS[@]}" | sha256sum | cut -c1-16)
	dir=$cache/$key
	if [[ -f $dir/.complete ]]; then
		printf '%s\n' "$dir/rootfs"
		return 0
	fi
	log "base: ${#pkgs[@]} Debian packages (${pkgs[*]})"
	rm -rf "$dir"
	mkdir -p "$dir/debs" "$dir/rootfs"
	# apt's download sandbox user (_apt) cannot write to root's cache.
	(cd "$dir/debs" && apt-get download -qq -o APT::Sandbox::User=root "${pkgs[@]}" >&2) ||
		die "apt-get download failed"
	local deb
	for deb in "$dir"/debs/*.deb; do
		dpkg-deb -x "$deb" "$dir/rootfs"
	done
	local p
	for p in "${PRUNE[@]}"; do rm -rf "${dir:?}/rootfs/$p"; done
	local plugin keep
	for plugin in "$dir"/rootfs/usr/lib/cni/*; do
		keep=0
		for p in "${CNI_PLUGINS[@]}"; do [[ ${plugin##*/} == "$p" ]] && keep=1; done
		((keep)) || rm -f "$plugin"
	done
	# What a process expects to find: a world-writable /tmp, /run, names for root and the
	# operator's unprivileged user (65532), and the linker cache.
	mkdir -p "$dir/rootfs"/{tmp,run,etc,var,proc,sys,dev}
	chmod 1777 "$dir/rootfs/tmp"
	ln -sfn ../run "$dir/rootfs/var/run"
	printf 'root:x:0:0:root:/root:/usr/sbin/nologin\nnonroot:x:65532:65532:nonroot:/nonexistent:/usr/sbin/nologin\n' \
		>"$dir/rootfs/etc/passwd"
	printf 'root:x:0:\nnonroot:x:65532:\n' >"$dir/rootfs/etc/group"
	ldconfig -r "$dir/rootfs" 2>/dev/null || true
	printf '%s\n' "$versions" >"$dir/packages.txt"
	rm -rf "$dir/debs"
	touch "$dir/.complete"
	printf '%s\n' "$dir/rootfs"
}

log "building the release binaries"
(cd "$root" && cargo build -q --release -p wgmesh-operator -p wgmesh-agent -p wgmesh-ctl --bin wgmesh-operator --bin wgmesh-agent --bin kubectl-wgmesh)

base=$(base_rootfs)
app=$(mktemp -d)
trap 'rm -rf "$app"' EXIT
mkdir -p "$app/usr/bin"
for bin in wgmesh-operator wgmesh-agent kubectl-wgmesh; do
	# Line tables stay out of the image; symbols stay for backtraces.
	strip --strip-debug -o "$app/usr/bin/$bin" "$root/target/release/$bin"
done

mkdir -p "$(dirname "$out")"
python3 "$here/lib/oci.py" --out "$out" --ref "$repository:$tag" \
	--layer "$base" --layer "$app" \
	--cmd '["/usr/bin/wgmesh-agent","--help"]' \
	--env PATH=/usr/sbin:/usr/bin:/sbin:/bin \
	--label "org.opencontainers.image.title=wgmesh" \
	--label "org.opencontainers.image.version=$version" \
	--label "org.opencontainers.image.revision=$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)" \
	--label "org.opencontainers.image.licenses=Apache-2.0" \
	--label "org.opencontainers.image.source=https://github.com/wgmesh/wgmesh"
log "image $repository:$tag: archive $(du -h "$out" | cut -f1), unpacked $(du -sch "$base" "$app" | awk 'END { print $1 }')"
printf '%s\n' "$out"
