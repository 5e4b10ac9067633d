#!/usr/bin/env bash
# Installs what the multi-node mesh (hack/mesh.sh, the demo and the end-to-end tests) needs
# from Debian's archive: the CNI reference plugins, nftables, iproute2, iperf3, tcpdump and
# the WireGuard tools. Fast when everything is there already.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=hack/lib/common.sh
source "$here/common.sh"

need=()
[[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local && -x /usr/lib/cni/portmap && -x /usr/lib/cni/loopback ]] || need+=(containernetworking-plugins)
have nft || need+=(nftables)
have ip || need+=(iproute2)
have iperf3 || need+=(iperf3)
have tcpdump || need+=(tcpdump)
have wg || need+=(wireguard-tools)
have wireguard-go || need+=(wireguard-go)
if [[ ${#need[@]} -gt 0 ]]; then
	need_root "installing ${need[*]}"
	log "installing ${need[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null 2>&1 || {
		apt-get update -q >/dev/null
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
	}
fi
