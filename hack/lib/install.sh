# shellcheck shell=bash
# `cluster.sh install`: the Debian packages the control plane needs, and
# kube-apiserver, kube-controller-manager, kube-scheduler and kubelet built
# once from Debian's `kubernetes` source package into a cache outside the
# repository.
# Sourced by hack/cluster.sh after lib/common.sh; only defines functions.

# Where the derived deb-src entries go; the name says who wrote them.
readonly WGMESH_DEBSRC_BASE=/etc/apt/sources.list.d/wgmesh-deb-src
# The Go packages whose vendored copies we swap for Debian's (see replace_vendored).
readonly WGMESH_GOCODE=/usr/share/gocode/src
# What one build of the tree produces: the control plane, and the scheduler
# and kubelet for the real-node cluster (hack/nodes.sh).
readonly WGMESH_KUBE_BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubelet)

WGMESH_APT_UPDATED=0
WGMESH_DEBSRC_CHANGED=0

# cache_root is the per-user cache; nothing is ever built inside the repo.
cache_root() {
	printf '%s\n' "${XDG_CACHE_HOME:-${HOME}/.cache}/wgmesh"
}

apt_update() {
	log "apt-get update"
	apt-get update -qq >&2 || die "apt-get update failed"
	WGMESH_APT_UPDATED=1
}

# index_targets FIELD FILTER...: one FIELD per index file apt has configured
# (FIELD as apt-get indextargets spells it: SOURCESENTRY, ORIGIN, ...).
index_targets() {
	local field=$1
	shift
	apt-get indextargets --format "\$(${field})" "$@"
}

# debian_source_entries prints the sources entries ("file:N") whose binary
# indexes come from a Release file with "Origin: Debian". apt numbers deb822
# stanzas and classic lines alike, so both formats come out the same way,
# and third-party repositories are skipped whatever their file is called.
debian_source_entries() {
	index_targets SOURCESENTRY 'Target-Of: deb' 'Created-By: Packages' 'Origin: Debian' | sort -u
}

# derive_debsrc_entry prints the deb-src twin of one entry "file:N": for a
# deb822 file the N-th stanza with its Types replaced, for a one-line-style
# file line N with `deb` replaced. Everything else (URIs, suites, components,
# Signed-By) is kept as configured, so no mirror is ever named here.
derive_debsrc_entry() {
	local file=${1%:*} n=${1##*:}
	case ${file} in
	*.sources)
		# Paragraph mode: stanzas are blank-line separated; comment-only
		# paragraphs are not stanzas for apt, so they are not counted.
		awk -v want="${n}" '
			BEGIN { RS = ""; FS = "\n" }
			{
				real = 0
				for (i = 1; i <= NF; i++) if ($i !~ /^#/) real = 1
				if (!real || ++seen != want) next
				for (i = 1; i <= NF; i++) {
					if ($i ~ /^#/) continue
					if ($i ~ /^[Tt]ypes:/) $i = "Types: deb-src"
					print $i
				}
				print ""
			}' "${file}"
		;;
	*)
		sed -n "${n}{s/^[[:space:]]*deb[[:space:]]/deb-src /p}" "${file}"
		;;
	esac
}

# ensure_debsrc makes sure the Debian entries also provide source indexes,
# writing wgmesh-deb-src.{sources,list} when they do not. Sets
# WGMESH_DEBSRC_CHANGED=1 when it wrote them (apt-get update is then due).
ensure_debsrc() {
	local -a entries
	local entry sources_out="" list_out="" header

	# Origin comes from downloaded Release files; a machine that never ran
	# apt-get update has none, so fetch them before filtering on it.
	if [[ -z $(index_targets ORIGIN 'Target-Of: deb') ]]; then
		apt_update
	fi
	if [[ -n $(index_targets SOURCESENTRY 'Target-Of: deb-src' 'Origin: Debian') ]]; then
		return 0 # deb-src is already configured for Debian
	fi
	mapfile -t entries < <(debian_source_entries)
	((${#entries[@]} > 0)) || die "no Debian entries in the apt sources; cannot derive deb-src"

	header="# Written by wgmesh hack/cluster.sh install: deb-src for the Debian entries
# configured on this machine (derived, not chosen). Safe to delete."
	for entry in "${entries[@]}"; do
		case ${entry%:*} in
		*.sources) sources_out+=$(derive_debsrc_entry "${entry}")$'\n\n' ;;
		*) list_out+=$(derive_debsrc_entry "${entry}")$'\n' ;;
		esac
	done
	if [[ -n ${sources_out} ]]; then
		printf '%s\n\n%s' "${header}" "${sources_out%$'\n'}" >"${WGMESH_DEBSRC_BASE}.sources"
		log "wrote ${WGMESH_DEBSRC_BASE}.sources"
	fi
	if [[ -n ${list_out} ]]; then
		printf '%s\n%s' "${header}" "${list_out}" >"${WGMESH_DEBSRC_BASE}.list"
		log "wrote ${WGMESH_DEBSRC_BASE}.list"
	fi
	WGMESH_DEBSRC_CHANGED=1
}

# kube_src_version prints the version of the `kubernetes` source package apt
# would fetch (e.g. 1.20.5+really1.20.2-1.1+deb12u1); it keys the cache.
kube_src_version() {
	local dsc
	# awk reads to the end: an early exit would SIGPIPE apt-get (pipefail).
	dsc=$(apt-get source --print-uris kubernetes 2>/dev/null |
		awk '!found && $2 ~ /^kubernetes_.*\.dsc$/ { print $2; found = 1 } END { exit !found }') ||
		return 1
	dsc=${dsc#kubernetes_}
	printf '%s\n' "${dsc%.dsc}"
}

# kube_cache_dir prints the cache directory for one source version.
kube_cache_dir() {
	printf '%s/kube-%s\n' "$(cache_root)" "$1"
}

# kube_binaries_in DIR succeeds when every binary of the build is in DIR.
kube_binaries_in() {
	local name
	for name in "${WGMESH_KUBE_BINARIES[@]}"; do
		[[ -x $1/${name} ]] || return 1
	done
}

# kube_cache_ready succeeds when every binary is cached for a version.
kube_cache_ready() {
	kube_binaries_in "$(kube_cache_dir "$1")/bin"
}

# The pause container's source, kept from the tree (which is deleted after the
# build) so hack/lib/node-images.sh can compile the sandbox image from the very
# release the kubelet comes from: DIR/pause/pause.c and DIR/pause/Makefile
# (whose TAG is the pause version).
readonly WGMESH_PAUSE_FILES=(linux/pause.c Makefile)

# pause_source_in DIR succeeds when DIR/pause holds the pause sources.
pause_source_in() {
	local file
	for file in "${WGMESH_PAUSE_FILES[@]}"; do
		[[ -s $1/pause/${file##*/} ]] || return 1
	done
}

# save_pause_source SRC DIR copies the pause sources of tree SRC into DIR/pause.
save_pause_source() {
	local src=$1 dir=$2 file
	mkdir -p "${dir}/pause"
	for file in "${WGMESH_PAUSE_FILES[@]}"; do
		cp "${src}/build/pause/${file}" "${dir}/pause/" || die "the tree has no build/pause/${file}"
	done
}

# fetch_pause_source VERSION CACHE fills CACHE/pause for a cache made before
# the pause sources were kept: unpacks the source package once more (a minute,
# no build) and keeps only those files.
fetch_pause_source() {
	local version=$1 cache=$2 work=$2.pause
	log "the cache has no pause sources; fetching them from the source package"
	rm -rf "${work}"
	mkdir -p "${work}"
	fetch_kube_source "${version}" "${work}/src"
	save_pause_source "${work}/src" "${work}"
	rm -rf "${cache}/pause"
	mv "${work}/pause" "${cache}/pause"
	rm -rf "${work}"
}

# replace_vendored swaps a vendored package for the copy a Debian -dev
# package ships.
#
# Why: reflect2 v1.0.1, as vendored by Kubernetes 1.20, links by name to
# the runtime's map iteration, whose signature changed in Go 1.18; through
# json-iterator v1.1.10 that crashes the apiserver on the first watch of a
# custom resource (an unstructured map). Debian's newer copies (reflect2
# 1.0.2, json-iterator 1.1.12) carry the upstream fixes. The build
# runs in GOPATH mode (see build_kube), which reads vendor/ as plain source,
# so go.mod and vendor/modules.txt need no edits.
replace_vendored() {
	local src=$1 pkg=$2 debpkg=$3 old
	[[ -d ${WGMESH_GOCODE}/${pkg} ]] || die "${debpkg} has no ${WGMESH_GOCODE}/${pkg}"
	old=$(awk -v m="${pkg}" '$1 == "#" && $2 == m { print $3; exit }' "${src}/vendor/modules.txt")
	log "vendor: ${pkg} ${old:-?} -> $(dpkg-query -W -f='${Version}' "${debpkg}") (${debpkg})"
	rm -rf "${src}/vendor/${pkg}"
	mkdir -p "${src}/vendor/${pkg}"
	# Like `go mod vendor`: the package's own files, no tests, no sub-packages.
	find "${WGMESH_GOCODE}/${pkg}/" -maxdepth 1 -type f ! -name '*_test.go' \
		-exec cp -t "${src}/vendor/${pkg}/" {} +
}

# fetch_kube_source downloads and unpacks the source package into DEST.
fetch_kube_source() {
	local version=$1 dest=$2 dl
	dl=$(dirname "${dest}")/download
	rm -rf "${dl}" "${dest}"
	mkdir -p "${dl}"
	log "fetching source package kubernetes ${version}"
	# apt's download sandbox user (_apt) cannot write to root's cache.
	(cd "${dl}" && apt-get -qq -o APT::Sandbox::User=root source --download-only \
		"kubernetes=${version}" >&2) || die "apt-get source kubernetes=${version} failed"
	dpkg-source -q -x "${dl}/kubernetes_${version#*:}.dsc" "${dest}" >&2 ||
		die "dpkg-source -x failed"
	rm -rf "${dl}"
}

# build_kube builds the two control-plane binaries from an unpacked tree and
# copies them to OUT. It uses the tree's own `make WHAT=...`, as Debian's
# rules do, because a plain `go build` is not enough for 1.20:
#   - the OpenAPI definitions (pkg/generated/openapi) are generated at build
#     time, not shipped, and `make` runs the generators first;
#   - 1.20 builds in GOPATH mode (hack/lib/init.sh exports GO111MODULE=off);
#     module mode with Go 1.19 stops at "updates to go.mod needed";
#   - hack/lib/version.sh sets the version variables (gitVersion v1.20.2,
#     gitMajor, gitMinor, gitCommit) from values the release tarball carries.
# Nothing is fetched: the build reads vendor/ only and GOPROXY is off.
build_kube() {
	local src=$1 out=$2 bin
	log "building ${WGMESH_KUBE_BINARIES[*]} (10-20 minutes on 2 cores)"
	(
		cd "${src}"
		# HOME: the build must not write into the user's Go caches.
		export HOME="${src}/_output/home" GOPROXY=off GOFLAGS="" GOTOOLCHAIN=local
		mkdir -p "${HOME}"
		make WHAT="${WGMESH_KUBE_BINARIES[*]/#/cmd/}"
	) >&2 || die "make failed in ${src}"
	mkdir -p "${out}"
	for bin in "${WGMESH_KUBE_BINARIES[@]}"; do
		cp "${src}/_output/bin/${bin}" "${out}/${bin}" || die "the build did not produce ${bin}"
	done
}

# kube_current is the link `install` points at the cache it last checked or
# built, so `up` finds the binaries without asking apt.
kube_current() {
	printf '%s/kube-current\n' "$(cache_root)"
}

# kube_bin_dir prints the directory holding the control-plane binaries
# ($WGMESH_KUBE_BIN_DIR overrides), or fails when they are not built yet.
kube_bin_dir() {
	local bin
	bin=${WGMESH_KUBE_BIN_DIR:-$(kube_current)/bin}
	kube_binaries_in "${bin}" || return 1
	printf '%s\n' "${bin}"
}

# install_kube is `cluster.sh install`: packages, deb-src, and the cached
# build. Cheap when everything is in place already.
install_kube() {
	local version cache work started=${SECONDS} lock_fd

	# Two installs at once (parallel test jobs) would fight over apt's lock
	# and build twice; the second waits here and then finds the cache.
	mkdir -p "$(cache_root)"
	exec {lock_fd}>"$(cache_root)/install.lock"
	flock "${lock_fd}"

	WGMESH_DEBSRC_CHANGED=0
	ensure_debsrc
	# One update serves both: new source indexes and missing packages.
	((WGMESH_DEBSRC_CHANGED == 0)) || apt_update
	# Every package any script needs, from the one list.
	bash "${HACK_DIR}/lib/deps.sh"
	if ! version=$(kube_src_version); then
		# deb-src is configured but its index was never fetched.
		((WGMESH_APT_UPDATED)) || apt_update
		version=$(kube_src_version) || die "apt has no source package 'kubernetes'"
	fi

	cache=$(kube_cache_dir "${version}")
	if kube_cache_ready "${version}"; then
		pause_source_in "${cache}" || fetch_pause_source "${version}" "${cache}"
		ln -sfn "${cache##*/}" "$(kube_current)"
		log "${WGMESH_KUBE_BINARIES[*]} ${version} are cached in ${cache}/bin"
		return 0
	fi

	work="${cache}.build"
	rm -rf "${work}" "${cache}"
	mkdir -p "${work}"
	fetch_kube_source "${version}" "${work}/src"
	replace_vendored "${work}/src" github.com/modern-go/reflect2 golang-github-modern-go-reflect2-dev
	replace_vendored "${work}/src" github.com/json-iterator/go golang-github-json-iterator-go-dev
	build_kube "${work}/src" "${work}/bin"
	save_pause_source "${work}/src" "${work}"

	# Publish only a complete result: the cache dir appears with both binaries.
	mkdir -p "${cache}"
	mv "${work}/pause" "${cache}/pause"
	mv "${work}/bin" "${cache}/bin"
	ln -sfn "${cache##*/}" "$(kube_current)"
	if [[ ${WGMESH_KEEP_BUILD:-0} == 1 ]]; then
		log "build tree kept in ${work}"
	else
		rm -rf "${work}"
	fi
	"${cache}/bin/kube-apiserver" --version >&2
	log "built in $((SECONDS - started))s; cached in ${cache}/bin"
}
