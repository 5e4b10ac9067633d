#!/usr/bin/env bash
# hack/lib/node-images.sh: the two images every node of hack/nodes.sh imports, built without a
# container engine or a registry, as OCI archives (hack/lib/oci.py) in a cache:
#
#   pause    the sandbox ("infra") container, compiled statically from the Kubernetes tree's
#            own build/pause/linux/pause.c, which `hack/cluster.sh install` keeps next to the
#            binaries; tagged wgmesh.local/pause:<TAG of the tree's build/pause/Makefile>
#   busybox  a test image: Debian's busybox-static with one symlink per applet; tagged
#            wgmesh.local/busybox:<Debian version, epoch dropped, [^A-Za-z0-9_.-] -> '-'>
#
#   bash hack/lib/node-images.sh [--cache DIR]   build what is missing; print the tags and
#                                                archives as shell assignments
#   source hack/lib/node-images.sh; node_images_build [DIR]   sets the same variables
#
# Variables: PAUSE_IMAGE, PAUSE_TAR, BUSYBOX_IMAGE, BUSYBOX_TAR. An archive is rebuilt only when
# its inputs change (a digest of the sources, compiler/package versions and oci.py is kept
# next to it), so a second run is instant. Default cache: ~/.cache/wgmesh/images.
# Needs gcc, libc6-dev, busybox-static and python3 (hack/lib/deps.sh installs them).

node_images_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=hack/lib/common.sh
source "$node_images_here/common.sh"

readonly NODE_IMAGES_REGISTRY=wgmesh.local
readonly NODE_IMAGES_BUSYBOX=/bin/busybox

node_images_cache_default() {
	printf '%s\n' "${XDG_CACHE_HOME:-${HOME}/.cache}/wgmesh/images"
}

# node_images_fresh TAR KEY: the archive exists and was built from inputs with digest KEY.
node_images_fresh() {
	[[ -s $1 && -r $1.key && $(<"$1.key") == "$2" ]]
}

# node_images_pack TAR KEY REF LAYER OCI-ARGS...: write the archive and remember its key.
node_images_pack() {
	local tar=$1 key=$2 ref=$3 layer=$4
	shift 4
	python3 "$node_images_here/oci.py" --out "$tar" --ref "$ref" --layer "$layer" "$@" ||
		die "oci.py failed for $ref"
	printf '%s\n' "$key" >"$tar.key"
}

# node_images_pause CACHE: builds the pause archive; sets PAUSE_IMAGE and PAUSE_TAR.
node_images_pause() {
	local cache=$1 src tag key work kube
	kube=${WGMESH_KUBE_CURRENT:-${XDG_CACHE_HOME:-${HOME}/.cache}/wgmesh/kube-current}
	src=$kube/pause
	[[ -s $src/pause.c && -s $src/Makefile ]] ||
		die "no pause sources in $src; run: hack/cluster.sh install"
	tag=$(awk '$1 == "TAG" && $2 == "=" { print $3; exit }' "$src/Makefile")
	[[ $tag =~ ^[0-9][0-9A-Za-z.]*$ ]] || die "no TAG in $src/Makefile"
	PAUSE_IMAGE=$NODE_IMAGES_REGISTRY/pause:$tag
	PAUSE_TAR=$cache/pause.tar
	key=$(cat "$src/pause.c" "$node_images_here/oci.py" <(gcc --version) <(printf '%s' "$PAUSE_IMAGE") |
		sha256sum | cut -d' ' -f1)
	node_images_fresh "$PAUSE_TAR" "$key" && return 0
	log "building $PAUSE_IMAGE from $src/pause.c"
	work=$(mktemp -d "$cache/pause.XXXXXX")
	mkdir -p "$work/rootfs"
	# The Makefile's flags; its REV is a git describe, here the source package it came from.
	gcc -Os -Wall -Werror -static "-DVERSION=v$tag-$(basename "$(readlink -f "$kube")")" \
		-o "$work/rootfs/pause" "$src/pause.c" || die "gcc could not build pause"
	strip "$work/rootfs/pause"
	node_images_pack "$PAUSE_TAR" "$key" "$PAUSE_IMAGE" "$work/rootfs" \
		--entrypoint '["/pause"]' --label "org.opencontainers.image.source=kubernetes build/pause"
	rm -rf "$work"
}

# node_images_busybox CACHE: builds the busybox archive; sets BUSYBOX_IMAGE and BUSYBOX_TAR.
node_images_busybox() {
	local cache=$1 version tag key work applet
	[[ -x $NODE_IMAGES_BUSYBOX ]] || die "$NODE_IMAGES_BUSYBOX missing; install busybox-static"
	version=$(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null) ||
		die "busybox-static is not installed"
	tag=${version#*:}
	tag=${tag//[^A-Za-z0-9_.-]/-}
	BUSYBOX_IMAGE=$NODE_IMAGES_REGISTRY/busybox:$tag
	BUSYBOX_TAR=$cache/busybox.tar
	key=$(cat "$NODE_IMAGES_BUSYBOX" "$node_images_here/oci.py" <(printf '%s' "$BUSYBOX_IMAGE") |
		sha256sum | cut -d' ' -f1)
	node_images_fresh "$BUSYBOX_TAR" "$key" && return 0
	log "building $BUSYBOX_IMAGE from $NODE_IMAGES_BUSYBOX"
	work=$(mktemp -d "$cache/busybox.XXXXXX")
	mkdir -p "$work/rootfs"/{bin,sbin,usr/bin,usr/sbin,etc,root,tmp,var}
	chmod 1777 "$work/rootfs/tmp"
	chmod 700 "$work/rootfs/root"
	cp "$NODE_IMAGES_BUSYBOX" "$work/rootfs/bin/busybox"
	# --list-full prints each applet's conventional path (bin/sh, usr/bin/wget, ...).
	while read -r applet; do
		[[ $applet == bin/busybox ]] && continue
		ln -sfn /bin/busybox "$work/rootfs/$applet"
	done < <("$NODE_IMAGES_BUSYBOX" --list-full)
	printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' \
		>"$work/rootfs/etc/passwd"
	printf 'root:x:0:\nnogroup:x:65534:\n' >"$work/rootfs/etc/group"
	node_images_pack "$BUSYBOX_TAR" "$key" "$BUSYBOX_IMAGE" "$work/rootfs" \
		--cmd '["sh"]' --env "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	rm -rf "$work"
}

# node_images_build [CACHE]: both images; sets PAUSE_IMAGE, PAUSE_TAR, BUSYBOX_IMAGE, BUSYBOX_TAR.
node_images_build() {
	local cache=${1:-$(node_images_cache_default)}
	mkdir -p "$cache"
	node_images_pause "$cache"
	node_images_busybox "$cache"
}

node_images_print() {
	printf 'PAUSE_IMAGE=%q\nPAUSE_TAR=%q\nBUSYBOX_IMAGE=%q\nBUSYBOX_TAR=%q\n' \
		"$PAUSE_IMAGE" "$PAUSE_TAR" "$BUSYBOX_IMAGE" "$BUSYBOX_TAR"
}

# Run, not sourced: parse the flags, build, print.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
	set -euo pipefail
	# shellcheck disable=SC2034 # read by log/die in common.sh
	WGMESH_LOG_PREFIX="[images]"
	node_images_cache=$(node_images_cache_default)
	while (($# > 0)); do
		case $1 in
		--cache)
			(($# >= 2)) || die "--cache needs a value"
			node_images_cache=$2
			shift 2
			;;
		-h | --help)
			sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
			exit 0
			;;
		*) die "unknown argument '$1' (try --help)" ;;
		esac
	done
	node_images_build "$node_images_cache"
	node_images_print
fi
