#!/usr/bin/env bash
# Installs what the datapath tests (node-agent/tests) and hack/bench-datapath.sh need:
# wg, wireguard-go, iperf3, tcpdump, ip, ping, and boringtun-cli 0.7.1 in a cache directory.
# Idempotent and quick when everything is already there. Source it or run it.
#
# After it runs, boringtun-cli is at "$WGMESH_TOOLS_DIR/bin/boringtun-cli"
# (default ~/.cache/wgmesh/tools).
set -euo pipefail

WGMESH_TOOLS_DIR="${WGMESH_TOOLS_DIR:-${HOME}/.cache/wgmesh/tools}"
BORINGTUN_CLI_VERSION="0.7.1"

datapath_deps_install() {
    local missing=()
    command -v wg >/dev/null 2>&1 || missing+=(wireguard-tools)
    command -v wireguard-go >/dev/null 2>&1 || missing+=(wireguard-go)
    command -v iperf3 >/dev/null 2>&1 || missing+=(iperf3)
    command -v tcpdump >/dev/null 2>&1 || missing+=(tcpdump)
    command -v ip >/dev/null 2>&1 || missing+=(iproute2)
    command -v ping >/dev/null 2>&1 || missing+=(iputils-ping)
    if ((${#missing[@]})); then
        echo "datapath-deps: installing ${missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi

    local bt="${WGMESH_TOOLS_DIR}/bin/boringtun-cli"
    if ! [[ -x "$bt" ]] || ! "$bt" --version 2>/dev/null | grep -q "${BORINGTUN_CLI_VERSION}"; then
        echo "datapath-deps: installing boringtun-cli ${BORINGTUN_CLI_VERSION} into ${WGMESH_TOOLS_DIR}" >&2
        # Its own target dir: the workspace target may be locked by another build.
        CARGO_TARGET_DIR="${WGMESH_TOOLS_DIR}/target" \
            cargo install boringtun-cli --version "${BORINGTUN_CLI_VERSION}" --locked \
            --root "${WGMESH_TOOLS_DIR}" --quiet
    fi
    export WGMESH_BORINGTUN_CLI="$bt"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    datapath_deps_install
    echo "datapath-deps: ok (boringtun-cli at ${WGMESH_BORINGTUN_CLI})"
else
    datapath_deps_install
fi
