# shellcheck shell=bash
# hack/lib/clouds.sh: the multi-cloud topology of `hack/mesh.sh up --clouds`: which sites
# there are and what NAT stands in front of each, which node starts at which site, and the
# plumbing that puts a node on a site (or moves it to another). Sourced by hack/mesh.sh; it
# defines tables and functions and does nothing else. It touches network namespaces only;
# the Kubernetes side (Node objects, agents) stays in hack/mesh.sh.
#
# Callers set MESH_ID and MESH_NET (hack/mesh.sh's mesh.env) and CLOUDS_DIR (where the
# node-to-site state lives), and source hack/lib/common.sh.
#
# The "internet" is the mesh's underlay bridge: ul0 in netns ${MESH_ID}-ul, ${MESH_NET}.0/24,
# gateway .1, the control plane .2, the host's leg .254.
#   - A site whose NAT is `none` is on the internet itself: its nodes are public, at
#     ${MESH_NET}.(10 + node number), as in the flat mesh (node-1 .11, node-2 .12).
#   - Every other site is a LAN behind a NAT router, netns ${MESH_ID}-r<site>:
#       WAN  wan0, on the internet at ${MESH_NET}.(200 + index) (b .201, c .202, d .203, e .204);
#            its default route via the internet's gateway (.1)
#       LAN  bridge lan0, 198.19.L.0/24 with L = 4 × (MESH_NET's third octet mod 64) + index - 1,
#            the router at .1; nodes at .11, .12, … (the lowest free one when a node arrives),
#            their default route via the router.
#     The LANs of one mesh never overlap each other or the internet (198.18.x); two meshes'
#     LANs overlap only when their third octets are equal mod 64, and then harmlessly: each
#     LAN exists inside its router's namespace alone, and the host routes to none.
#
# The NAT kinds, each in nftables table `ip wgmesh_nat` of the router:
#   eim        endpoint-independent mapping: a LAN node's UDP source port maps to one WAN port
#              whatever the destination. Plain `masquerade` is not quite that when two LAN
#              nodes use the same port (as agents do): the second one's port then depends on
#              which destinations the first reached before it. So UDP from LAN host .N leaves from WAN port
#              (source port XOR (N - 11)): .11 keeps its port, .12 gets port ^ 1 (51820 ->
#              51821), .13 port ^ 2, … for .11–.30; everything else is masqueraded.
#   symmetric  address-and-port-dependent mapping: `masquerade fully-random`, a random WAN port
#              for every new destination (and again after a flush).
# Both filter like any real NAT router: from the WAN, only replies (ct state established,
# related) pass, in `input` and in `forward` alike, so an unsolicited packet never creates a
# confirmed conntrack entry (which would make the router map the node's later outgoing packet
# to another port). The drops are counted (`nft list table ip wgmesh_nat` in the router).

# The sites: name, index (numbers the router's WAN address and LAN, above), NAT kind, and the
# MTU of the site's links (a smaller one at c: the mesh's MTU must follow it). Sites on the
# internet itself (NAT none) are dual-stack: their nodes have an IPv6 address on the internet
# besides the IPv4 one, and publish it first.
readonly CLOUDS_SITES="\
a 0 none 1500
b 1 eim 1500
c 2 symmetric 1400
d 3 eim 1500
e 4 eim 1500
f 5 none 1500"

# The nodes `hack/mesh.sh up --clouds` registers, in order, and the site each starts at. Site
# e has no node: `hack/mesh.sh move-node` moves one there. Sites a and f are two public
# locations, which reach each other over IPv6.
readonly CLOUDS_NODES="\
node-1 a
node-2 a
node-3 b
node-4 b
node-5 c
node-6 c
node-7 d
node-8 f"

# The LAN hosts the eim NAT maps port-preserving-by-XOR (.11 to .(10 + this)).
readonly CLOUDS_LAN_HOSTS=20

# clouds_sites prints every site's name, one a line.
clouds_sites() {
	awk 'NF {print $1}' <<<"$CLOUDS_SITES"
}

# clouds_nodes prints the table's nodes, one a line.
clouds_nodes() {
	awk 'NF {print $1}' <<<"$CLOUDS_NODES"
}

# clouds_site_field SITE N prints column N of SITE's row; fails for an unknown site.
clouds_site_field() {
	local v
	v=$(awk -v s="$1" -v n="$2" '$1 == s {print $n}' <<<"$CLOUDS_SITES")
	[[ -n $v ]] || die "no site $1 (sites: $(clouds_sites | tr '\n' ' '))"
	echo "$v"
}

# clouds_nat SITE prints the site's NAT kind: none, eim or symmetric.
clouds_nat() {
	clouds_site_field "$1" 3
}

# clouds_mtu SITE prints the MTU of the site's links.
clouds_mtu() {
	clouds_site_field "$1" 4
}

# clouds_v6 prints the internet's IPv6 prefix (a /64 of fd00::/8, inside the mesh's
# namespaces only), without the trailing "::".
clouds_v6() {
	echo "fd00:198:18:${MESH_NET##*.}"
}

# clouds_table_site NODE prints the site the table puts NODE at (nothing if it has none).
clouds_table_site() {
	awk -v n="$1" '$1 == n {print $2}' <<<"$CLOUDS_NODES"
}

# clouds_ns_router SITE prints the name of the site's router namespace.
clouds_ns_router() {
	echo "${MESH_ID}-r$1"
}

# clouds_wan SITE prints the site's router's address on the internet.
clouds_wan() {
	local nat index
	nat=$(clouds_nat "$1") || exit 1
	[[ $nat != none ]] || die "site $1 is on the internet itself: it has no router"
	index=$(clouds_site_field "$1" 2) || exit 1
	echo "${MESH_NET}.$((200 + index))"
}

# clouds_lan SITE prints the first three octets of the site's LAN.
clouds_lan() {
	local third=${MESH_NET##*.} index
	index=$(clouds_site_field "$1" 2) || exit 1
	echo "198.19.$((4 * (third % 64) + index - 1))"
}

# clouds_node_site NODE prints the site NODE is at now (nothing for a node of no site).
clouds_node_site() {
	[[ -f $CLOUDS_DIR/$1 ]] || return 0
	awk '{print $1}' "$CLOUDS_DIR/$1"
}

# clouds_node_address6 NODE prints NODE's IPv6 address on the internet (nothing behind NAT).
clouds_node_address6() {
	local site
	site=$(clouds_node_site "$1")
	[[ -n $site && $(clouds_nat "$site") == none ]] || return 0
	echo "$(clouds_v6)::$((10 + ${1#node-}))"
}

# clouds_node_address NODE prints NODE's address now: on the internet, or on its site's LAN.
clouds_node_address() {
	[[ -f $CLOUDS_DIR/$1 ]] || die "$1 is at no site (no $CLOUDS_DIR/$1)"
	awk '{print $2}' "$CLOUDS_DIR/$1"
}

# clouds_free_address SITE prints the lowest LAN address of SITE no node holds.
clouds_free_address() {
	local site=$1 lan k f taken
	lan=$(clouds_lan "$site") || exit 1
	for k in $(seq 11 $((10 + CLOUDS_LAN_HOSTS))); do
		taken=""
		for f in "$CLOUDS_DIR"/*; do
			[[ -f $f ]] || continue
			if [[ $(cat "$f") == "$site $lan.$k" ]]; then
				taken=1
				break
			fi
		done
		[[ -n $taken ]] || {
			echo "$lan.$k"
			return 0
		}
	done
	die "site $site has no free LAN address (.11-.$((10 + CLOUDS_LAN_HOSTS)))"
}

# clouds_nft SITE prints the nftables ruleset of the site's router (`nft -f` input).
clouds_nft() {
	local site=$1 wan lan nat k
	wan=$(clouds_wan "$site") || exit 1
	lan=$(clouds_lan "$site") || exit 1
	nat=$(clouds_nat "$site") || exit 1
	echo "table ip wgmesh_nat {"
	echo "	chain postrouting {"
	echo "		type nat hook postrouting priority srcnat; policy accept;"
	case $nat in
	eim)
		for k in $(seq 11 $((10 + CLOUDS_LAN_HOSTS))); do
			echo "		oifname \"wan0\" ip saddr $lan.$k meta l4proto udp snat ip to $wan : udp sport ^ $((k - 11))"
		done
		echo "		oifname \"wan0\" masquerade"
		;;
	symmetric)
		echo "		oifname \"wan0\" masquerade fully-random"
		;;
	*) die "site $site has no NAT" ;;
	esac
	echo "	}"
	local chain
	for chain in input forward; do
		echo "	chain $chain {"
		echo "		type filter hook $chain priority filter; policy accept;"
		echo "		iifname \"wan0\" ct state established,related accept"
		echo "		iifname \"wan0\" counter drop"
		echo "	}"
	done
	echo "}"
}

# clouds_router_up SITE makes the site's NAT router: its namespace, its WAN leg on the internet
# bridge (ul0 in namespace UL), its LAN bridge, forwarding and NAT. Usage: clouds_router_up SITE UL
clouds_router_up() {
	local site=$1 ul=$2 ns wan lan
	ns=$(clouds_ns_router "$site") || exit 1
	wan=$(clouds_wan "$site") || exit 1
	lan=$(clouds_lan "$site") || exit 1
	bridged_ns "$ns" wan0 "$wan/24" "m${MESH_ID}r$site" "$ul"
	ip -n "$ns" route add default via "${MESH_NET}.1"
	ip -n "$ns" link add lan0 type bridge
	ip -n "$ns" link set lan0 mtu "$(clouds_mtu "$site")"
	ip -n "$ns" addr add "$lan.1/24" dev lan0
	ip -n "$ns" link set lan0 up
	ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=1
	clouds_nft "$site" | ip netns exec "$ns" nft -f -
}

# clouds_attach NODE SITE VETH FROM UL: puts NODE (its namespace ${MESH_ID}-NODE, whose eth0 is
# the other end of VETH) at SITE: VETH moves from namespace FROM ("" for the host's) to the
# internet bridge (a site without NAT; namespace UL) or to the site's LAN bridge, eth0 gets
# the node's address there and a default route, and the state records both
# (clouds_node_site, clouds_node_address). Run it in the caller's shell, not in $(…), so
# that `set -e` stops at a failing step.
clouds_attach() {
	local node=$1 site=$2 veth=$3 from=$4 ul=$5 ns nat to addr gw
	ns="${MESH_ID}-$node"
	nat=$(clouds_nat "$site") || exit 1
	if [[ $nat == none ]]; then
		to=$ul
		addr="${MESH_NET}.$((10 + ${node#node-}))"
		gw="${MESH_NET}.1"
	else
		to=$(clouds_ns_router "$site") || exit 1
		addr=$(clouds_free_address "$site") || exit 1
		gw=$(clouds_lan "$site") || exit 1
		gw=$gw.1
	fi
	if [[ -n $from ]]; then
		ip -n "$from" link set "$veth" netns "$to"
	else
		ip link set "$veth" netns "$to"
	fi
	if [[ $to == "$ul" ]]; then
		ip -n "$to" link set "$veth" master ul0 up
	else
		ip -n "$to" link set "$veth" master lan0 up
	fi
	ip -n "$to" link set "$veth" mtu "$(clouds_mtu "$site")"
	ip -n "$ns" link set eth0 mtu "$(clouds_mtu "$site")"
	ip -n "$ns" -4 addr flush dev eth0
	ip -n "$ns" -6 addr flush dev eth0 scope global
	ip -n "$ns" addr add "$addr/24" dev eth0
	if [[ $nat == none ]]; then
		ip -n "$ns" addr add "$(clouds_v6)::$((10 + ${node#node-}))/64" dev eth0 nodad
	fi
	ip -n "$ns" link set eth0 up
	ip -n "$ns" route replace default via "$gw"
	mkdir -p "$CLOUDS_DIR"
	echo "$site $addr" >"$CLOUDS_DIR/$node"
}

# clouds_flush SITE empties the site's router's conntrack table: every mapping is gone.
clouds_flush() {
	local nat
	nat=$(clouds_nat "$1") || exit 1
	[[ $nat != none ]] || die "site $1 has no NAT router"
	ip netns exec "$(clouds_ns_router "$1")" conntrack -F 2>&1 | sed 's/^/  /' >&2
}
