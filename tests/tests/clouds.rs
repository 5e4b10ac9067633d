//! End to end across clouds: `hack/mesh.sh up --clouds`, eight nodes at five sites (the
//! table in `hack/lib/clouds.sh`): sites a and f on the underlay itself, public and
//! dual-stack; sites b and d each behind an endpoint-independent NAT router, site c behind a
//! symmetric one with a smaller MTU; the underlay is their internet. Real control plane, agents, devices, CNI-plumbed pods, real packets.
//!
//! Checked the way a person would: every pod pings every other; the path each node reports
//! for each peer (its `MeshPeerReport`'s `spec.paths`) and the NAT the operator saw
//! (`status.approved.nat`) are those the topology implies; tcpdump on the internet sees
//! WireGuard's UDP and nothing in the clear; the public sites reach each other over IPv6 and
//! the others over IPv4; the MTU follows the smallest underlay, and full-size packets with DF
//! set get through; data moves between two sites behind NAT; pings
//! come back after a NAT router forgets its mappings and after a node moves to another site.
//!
//! One mesh serves every step, in order. Figures go to `target/wgmesh-e2e-report.txt`.
//! The reports and status fields are read from JSON by name, not through wgmesh-api's types, so the
//! test states the API it expects.

use anyhow::{Context, Result, anyhow, bail, ensure};
use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use wgmesh_tests::netns::*;
use wgmesh_tests::ping::{PING_INTERVAL, Pinger, Summary};
use wgmesh_tests::repo_root;

/// The nodes of `hack/lib/clouds.sh`'s table: `node-1` … `node-8`, each with one pod.
const NODES: usize = 8;

/// The MTU of site c's links (`hack/lib/clouds.sh`), the smallest of the mesh.
const SMALLEST_UNDERLAY_MTU: u32 = 1400;

/// How long the paths may take to become the topology's once every pod answers.
const PATHS_SETTLE: Duration = Duration::from_secs(120);

/// One node of the mesh and its pod.
#[derive(Debug, Clone)]
struct Node {
    name: String,
    site: String,
    pod: String,
    pod_ip: String,
}

/// A ping to be answered: from a pod to another pod's address.
#[derive(Debug, Clone)]
struct Pair {
    from: String,
    to: String,
    to_ip: String,
}

/// The NAT in front of each site as `hack/lib/clouds.sh` builds it, named as the operator
/// names what it learns (`status.approved.nat`).
fn nat_of(site: &str) -> Result<&'static str> {
    Ok(match site {
        "a" | "f" => "Public",
        "b" | "d" | "e" => "EndpointIndependent",
        "c" => "Symmetric",
        _ => bail!("site {site} is not in hack/lib/clouds.sh's table"),
    })
}

/// The path the topology implies from a node at site `from` to one at site `to`: within a
/// site, and to or from a public node, `Direct`; between two endpoint-independent NATs, each
/// sends to the other's mapping (`NATTraversal`); with a symmetric NAT on either side, no
/// mapping can be known in advance: through a public node (`Relay`).
fn implied_path(from: &str, to: &str) -> Result<&'static str> {
    let (a, b) = (nat_of(from)?, nat_of(to)?);
    Ok(if from == to || a == "Public" || b == "Public" {
        "Direct"
    } else if a == "EndpointIndependent" && b == "EndpointIndependent" {
        "NATTraversal"
    } else {
        "Relay"
    })
}

#[test]
fn eight_nodes_at_five_sites_behind_nat() -> Result<()> {
    assert!(
        is_root(),
        "the end-to-end test needs root (network namespaces); run hack/test.sh as root"
    );
    let mesh = Mesh::up_clouds()?;
    let up = Instant::now();
    mesh.check(steps(&mesh, up))
}

/// The test's steps, in order, on one mesh; `up` is when `hack/mesh.sh up` returned.
fn steps(mesh: &Mesh, up: Instant) -> Result<()> {
    // 1. One pod per node; every pod reaches every other, across every pair of sites.
    let nodes = pods(mesh)?;
    let every_pair = pairs(&nodes, |_, _| true);
    reach_each(mesh, &every_pair, Duration::from_secs(180))?;
    report(&format!(
        "clouds: every pair reached every other in {:.1} s ({} ordered pairs, from `hack/mesh.sh up --clouds` returning, pod creation included)",
        up.elapsed().as_secs_f64(),
        every_pair.len()
    ));

    // 2. Each node's paths and the NAT the operator saw are those the topology implies.
    let settled = paths_settle(mesh, &nodes)?;
    report(&format!(
        "clouds: paths and NAT kinds as the topology implies {:.1} s after every pair answered",
        settled.as_secs_f64()
    ));
    for line in mesh.kubectl(&["get", "meshpeers", "-o", "wide"])?.lines() {
        report(&format!("clouds:   {line}"));
    }

    // 2a. `kubectl wgmesh graph` of it: a group per site, and the relays and NAT traversals
    //     the reports say.
    graph(mesh, &nodes)?;

    // 2b. Keepalives where a NAT needs them only; IPv6 between the public sites, IPv4 from
    //     the others; the MTU; the Events.
    keepalives(mesh, &nodes)?;
    dual_stack(mesh, &nodes)?;
    full_size_packets(mesh, &nodes)?;
    let events = mesh.kubectl(&[
        "get",
        "events",
        "--field-selector",
        "reason=PathChanged",
        "-o",
        "jsonpath={range .items[*]}{.involvedObject.name}: {.message}{\"\\n\"}{end}",
    ])?;
    for line in events.lines().take(5) {
        report(&format!("clouds: PathChanged Event: {line}"));
    }
    assert!(
        !events.trim().is_empty(),
        "no PathChanged Event, though the pairs of sites b and d went from a relay to NAT traversal"
    );

    // 3. tcpdump on the internet through steps 4 and 5.
    let cap = mesh.capture("clouds-internet")?;
    let pcap = cap.path();

    // 4. Data between two sites behind NAT (b and c: through a relay).
    let (b, c) = (node(&nodes, "node-3")?, node(&nodes, "node-5")?);
    let mbps = transfer(mesh, b, c)?;
    report(&format!(
        "clouds: iperf3 {} (site {}) -> {} (site {}), 10 s: {mbps:.0} Mbit/s",
        b.pod, b.site, c.pod, c.site
    ));
    assert!(mbps > 0.0, "no data moved from site b to site c");

    // 5. A NAT router forgets every mapping (as when it reboots) under pings; symmetric c
    //    first (its nodes' new mappings get new ports), then endpoint-independent b.
    for site in ["c", "b"] {
        recovery(mesh, &nodes, site)?;
    }

    let cp = format!("{}.2", mesh.net);
    // The control plane's TCP: agents to the API server, and the API server to the agents'
    // metrics (step 2a's `kubectl wgmesh graph` went through its node proxy; those idle
    // connections send keep-alives later).
    let control = format!("host {cp} and (tcp port 6443 or tcp port 9091)");
    // A WireGuard message starts with its type (1-4) and three zero bytes, whatever the ports
    // (the NATs change them).
    let not_wireguard = format!(
        "ip and udp and not host {cp} and not (udp[8:4] = 0x01000000 or udp[8:4] = 0x02000000 \
         or udp[8:4] = 0x03000000 or udp[8:4] = 0x04000000)"
    );
    let [ipv4, udp, wg, other, plain, odd] = cap.stop(&[
        "ip",
        &format!("ip and udp and not host {cp}"),
        "ip and udp port 51820",
        &format!("ip and not udp and not ({control})"),
        "net 10.244.0.0/16 or net fd00:10:244::/56",
        &not_wireguard,
    ])?[..] else {
        bail!("capture counts");
    };
    report(&format!(
        "clouds: on the internet during steps 4-5: {ipv4} IPv4 packets, {udp} UDP between nodes and routers ({wg} with port 51820 on a side, {odd} not WireGuard messages), {other} other (not UDP, not the API server), {plain} with a pod address"
    ));
    assert_eq!(
        odd,
        0,
        "UDP between nodes and routers that is no WireGuard message: {}",
        first_packets(&pcap, &not_wireguard)
    );
    assert_eq!(
        plain,
        0,
        "pod addresses on the internet: {}",
        first_packets(&pcap, "net 10.244.0.0/16 or net fd00:10:244::/56")
    );
    assert_eq!(
        other,
        0,
        "packets between nodes and routers that are not UDP: {}",
        first_packets(&pcap, &format!("ip and not udp and not ({control})"))
    );
    assert!(
        udp > 100,
        "hardly any WireGuard traffic on the internet ({udp} UDP packets) while data moved"
    );

    // 6. node-7 moves from site d to site e (another NAT, another public address): how long
    //    until its pod and every other pod reach each other again.
    move_node(mesh, &nodes, "node-7", "e")
}

/// Keepalives only where a NAT needs them, as `wg show` reports them on every node's device:
/// a node behind NAT sends them to each peer of another site it reaches directly or by NAT
/// traversal (not to a peer reached through a relay: the relay gets them); a public node
/// sends none, and no node sends any within its site.
fn graph(mesh: &Mesh, nodes: &[Node]) -> Result<()> {
    let file = mesh.dir.join("clouds.svg");
    let out = mesh.plugin(&["graph", "-o", &file.to_string_lossy()])?;
    ensure!(
        out.status.success(),
        "kubectl wgmesh graph: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let svg = std::fs::read_to_string(&file)?;
    let doc = roxmltree::Document::parse(&svg).context("graph wrote malformed SVG")?;
    let with = |class: &'static str| {
        doc.descendants()
            .filter(move |n| n.attribute("class") == Some(class))
    };
    // Nodes under their site's group.
    for n in nodes {
        let group = with("location")
            .find(|g| {
                g.descendants()
                    .any(|d| d.attribute("data-node") == Some(n.name.as_str()))
            })
            .and_then(|g| g.attribute("data-location"));
        ensure!(
            group == Some(n.site.as_str()),
            "{} drawn in {group:?}, at site {}",
            n.name,
            n.site
        );
    }
    let paths: BTreeSet<&str> = with("edge")
        .filter_map(|e| e.attribute("data-path"))
        .collect();
    let edges = with("edge").count();
    ensure!(
        edges == nodes.len() * (nodes.len() - 1) / 2,
        "{edges} edges for {} nodes",
        nodes.len()
    );
    for kind in ["Direct", "NATTraversal", "Relay"] {
        ensure!(paths.contains(kind), "no {kind} edge drawn: {paths:?}");
    }
    std::fs::copy(&file, repo_root().join("target/wgmesh-graph-clouds.svg"))?;
    report(&format!(
        "clouds: kubectl wgmesh graph: {} nodes in {} locations, {edges} edges ({paths:?})",
        nodes.len(),
        with("location").count()
    ));
    Ok(())
}

fn keepalives(mesh: &Mesh, nodes: &[Node]) -> Result<()> {
    let peers: serde_json::Value =
        serde_json::from_str(&mesh.kubectl(&["get", "meshpeers", "-o", "json"])?)?;
    let mut name_of: BTreeMap<String, String> = BTreeMap::new();
    for p in peers["items"].as_array().into_iter().flatten() {
        let name = p["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if let Some(key) = p["status"]["publicKey"].as_str() {
            name_of.insert(key.to_owned(), name);
        }
    }
    let reports = mesh.kubectl(&["get", "meshpeerreports", "-o", "json"])?;
    let path: BTreeMap<(String, String), String> = reported_paths(&reports)?
        .into_iter()
        .map(|(pair, seen)| (pair, seen.path))
        .collect();
    let site: BTreeMap<&str, &str> = nodes
        .iter()
        .map(|n| (n.name.as_str(), n.site.as_str()))
        .collect();
    let mut wrong = Vec::new();
    let mut on = 0;
    for n in nodes {
        let out = ok(mesh.exec(
            &n.name,
            &["wg", "show", &mesh.iface(&n.name), "persistent-keepalive"],
        ))?;
        for line in out.lines() {
            let Some((key, value)) = line.split_once('\t') else {
                continue;
            };
            let peer = name_of.get(key).cloned().unwrap_or_else(|| key.to_owned());
            let behind_nat = nat_of(&n.site)? != "Public";
            let same_site = site.get(peer.as_str()) == Some(&n.site.as_str());
            let relayed = path
                .get(&(n.name.clone(), peer.clone()))
                .map(String::as_str)
                == Some("Relay");
            let want = if behind_nat && !same_site && !relayed {
                "25"
            } else {
                "off"
            };
            if value != want {
                wrong.push(format!(
                    "{} -> {peer}: keepalive {value}, want {want}",
                    n.name
                ));
            }
            on += usize::from(value != "off");
        }
    }
    assert!(wrong.is_empty(), "keepalives:\n  {}", wrong.join("\n  "));
    report(&format!(
        "clouds: keepalives on {on} of {} device peers, exactly those from a node behind NAT to another site",
        nodes.len() * (nodes.len() - 1)
    ));
    Ok(())
}

/// What a node's report says of the endpoint it sends `peer`'s traffic to.
fn endpoint_of(mesh: &Mesh, node: &str, peer: &str) -> Result<String> {
    let json = mesh.kubectl(&["get", "meshpeerreport", node, "-o", "json"])?;
    let r: serde_json::Value = serde_json::from_str(&json)?;
    r["spec"]["paths"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["peer"] == peer)
        .and_then(|e| e["endpoint"].as_str())
        .map(str::to_owned)
        .with_context(|| format!("{node} reports no endpoint for {peer}"))
}

/// The two public sites (a, f) reach each other over IPv6, which both have; the nodes behind
/// the IPv4-only NATs reach the same nodes over IPv4: on the wire (tcpdump on the internet
/// while pods ping) and in what the nodes report.
fn dual_stack(mesh: &Mesh, nodes: &[Node]) -> Result<()> {
    let (n1, n3, n8) = (
        node(nodes, "node-1")?,
        node(nodes, "node-3")?,
        node(nodes, "node-8")?,
    );
    let v6 = endpoint_of(mesh, "node-1", "node-8")?;
    let back = endpoint_of(mesh, "node-8", "node-1")?;
    let v4 = endpoint_of(mesh, "node-3", "node-8")?;
    assert!(
        v6.starts_with('[') && back.starts_with('['),
        "sites a and f both have IPv6, yet node-1 sends to node-8 at {v6} and node-8 to node-1 at {back}"
    );
    assert!(
        !v4.starts_with('['),
        "node-3 has no IPv6, yet sends to node-8 at {v4}"
    );
    let cap = mesh.capture("clouds-dual-stack")?;
    let answered = ping_at_once(mesh, &[(&n1.pod, &n8.pod_ip), (&n3.pod, &n8.pod_ip)]);
    assert!(
        answered.iter().all(|a| *a),
        "pings to node-8's pod: {answered:?}"
    );
    let v6_addr = v6
        .trim_start_matches('[')
        .split(']')
        .next()
        .unwrap_or_default();
    let [udp6, udp4_a_f] = cap.stop(&[
        &format!("ip6 and udp port 51820 and host {v6_addr}"),
        &format!(
            "ip and udp and host {} and host {}",
            mesh.address("node-1")?,
            mesh.address("node-8")?
        ),
    ])?[..] else {
        bail!("capture counts");
    };
    report(&format!(
        "clouds: dual-stack: node-1 <-> node-8 (sites a, f) at {v6} / {back}, node-3 (site b) -> node-8 at {v4}; on the internet while pinging: {udp6} WireGuard packets over IPv6 to node-8, {udp4_a_f} over IPv4 between node-1 and node-8"
    ));
    assert!(udp6 > 0, "no WireGuard over IPv6 between sites a and f");
    assert_eq!(
        udp4_a_f, 0,
        "node-1 and node-8 spoke IPv4 though both have IPv6"
    );
    Ok(())
}

/// The MTU of a link in a namespace.
fn link_mtu(mesh: &Mesh, ns: &str, link: &str) -> Result<u32> {
    let out = ok(mesh.exec(ns, &["cat", &format!("/sys/class/net/{link}/mtu")]))?;
    out.trim()
        .parse()
        .with_context(|| format!("the MTU of {link} in {ns}: {out:?}"))
}

/// `mtu: auto` follows the smallest underlay of the mesh (site c's) less WireGuard's overhead
/// over IPv6 (the public sites publish IPv6 endpoints); a pod's full-size packet with DF set
/// gets through: to a pod at site c, and through a relay.
fn full_size_packets(mesh: &Mesh, nodes: &[Node]) -> Result<()> {
    let mut seen = Vec::new();
    for n in nodes {
        // IPv6 endpoints in the mesh (sites a and f publish some): the IPv6 overhead,
        // everywhere, so that a relay never gets a packet larger than its device.
        let want = SMALLEST_UNDERLAY_MTU - 80;
        let mut mtu = 0;
        wait_until(
            &format!("{}'s device MTU {want}", n.name),
            Duration::from_secs(30),
            || {
                mtu = link_mtu(mesh, &n.name, &mesh.iface(&n.name)).unwrap_or(0);
                mtu == want
            },
        )
        .with_context(|| format!("{}'s device MTU is {mtu}", n.name))?;
        seen.push(format!("{} {mtu}", n.name));
    }
    report(&format!(
        "clouds: device MTUs (site c's links are {SMALLEST_UNDERLAY_MTU}): {}",
        seen.join(", ")
    ));
    for (from, to) in [
        ("node-1", "node-5"),
        ("node-5", "node-8"),
        ("node-3", "node-6"),
    ] {
        let (a, b) = (node(nodes, from)?, node(nodes, to)?);
        let mtu = link_mtu(mesh, &a.pod, "eth0")?;
        let size = (mtu - 28).to_string();
        let out = run(mesh.exec(
            &a.pod,
            &[
                "ping", "-M", "do", "-c", "3", "-W", "2", "-s", &size, &b.pod_ip,
            ],
        ))?;
        assert!(
            out.status.success(),
            "{} -> {}: {mtu}-byte packets with DF set did not get through:\n{}{}",
            a.pod,
            b.pod,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        report(&format!(
            "clouds: {} (site {}) -> {} (site {}): {mtu}-byte pings with DF set answered",
            a.pod, a.site, b.pod, b.site
        ));
    }
    Ok(())
}

/// One pod on each node (`pod-i` on `node-i`) and each node's site.
fn pods(mesh: &Mesh) -> Result<Vec<Node>> {
    (1..=NODES)
        .map(|i| {
            let name = format!("node-{i}");
            let pod = format!("pod-{i}");
            Ok(Node {
                site: mesh.site(&name)?,
                pod_ip: mesh.pod(&name, &pod)?,
                name,
                pod,
            })
        })
        .collect()
}

fn node<'a>(nodes: &'a [Node], name: &str) -> Result<&'a Node> {
    nodes
        .iter()
        .find(|n| n.name == name)
        .with_context(|| format!("no {name} in the mesh"))
}

/// Every ordered pair of distinct nodes' pods that `keep` keeps.
fn pairs(nodes: &[Node], keep: impl Fn(&Node, &Node) -> bool) -> Vec<Pair> {
    let mut out = Vec::new();
    for a in nodes {
        for b in nodes {
            if a.name != b.name && keep(a, b) {
                out.push(Pair {
                    from: a.pod.clone(),
                    to: b.pod.clone(),
                    to_ip: b.pod_ip.clone(),
                });
            }
        }
    }
    out
}

/// Pings, once each and all at once, every pair that has not answered yet, until each has
/// answered once or `timeout` passes; how long it took, or the pairs that never answered.
fn reach_each(mesh: &Mesh, pairs: &[Pair], timeout: Duration) -> Result<Duration> {
    let start = Instant::now();
    let mut waiting: Vec<&Pair> = pairs.iter().collect();
    while !waiting.is_empty() {
        if start.elapsed() > timeout {
            let names: Vec<String> = waiting
                .iter()
                .map(|p| format!("{} -> {}", p.from, p.to))
                .collect();
            bail!(
                "after {timeout:?}, {} of {} pairs never answered: {}",
                names.len(),
                pairs.len(),
                names.join(", ")
            );
        }
        let round = Instant::now();
        let pings: Vec<(&str, &str)> = waiting
            .iter()
            .map(|p| (p.from.as_str(), p.to_ip.as_str()))
            .collect();
        let answered = ping_at_once(mesh, &pings);
        let mut answered = answered.into_iter();
        waiting.retain(|_| !answered.next().unwrap_or(false));
        if !waiting.is_empty() {
            // A round of answered pings is quick; one of timeouts takes the ping's 2 s.
            std::thread::sleep(Duration::from_millis(500).saturating_sub(round.elapsed()));
        }
    }
    Ok(start.elapsed())
}

/// Waits until [`path_mismatches`] finds none; how long it took, or the last mismatches.
fn paths_settle(mesh: &Mesh, nodes: &[Node]) -> Result<Duration> {
    let start = Instant::now();
    let wans: BTreeMap<String, String> = nodes
        .iter()
        .filter(|n| nat_of(&n.site).is_ok_and(|k| k != "Public"))
        .map(|n| Ok((n.site.clone(), mesh.wan(&n.site)?)))
        .collect::<Result<_>>()?;
    loop {
        let read = mesh
            .kubectl(&["get", "meshpeers", "-o", "json"])
            .and_then(|peers| {
                Ok((
                    peers,
                    mesh.kubectl(&["get", "meshpeerreports", "-o", "json"])?,
                ))
            });
        let mismatches = match read {
            Ok((peers, reports)) => path_mismatches(&peers, &reports, nodes, &wans)?,
            Err(e) => vec![format!("{e:#}")],
        };
        if mismatches.is_empty() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > PATHS_SETTLE {
            bail!(
                "after {PATHS_SETTLE:?} the peers' paths or NAT kinds are still not the topology's:\n  {}",
                mismatches.join("\n  ")
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Every node's reported path to each peer, by (node, peer).
type Reported = BTreeMap<(String, String), PathSeen>;

/// One entry of a node's report (`spec.paths`).
#[derive(Debug)]
struct PathSeen {
    path: String,
    via: Option<String>,
    endpoint: Option<String>,
    latest_handshake: Option<String>,
}

/// Every node's reported path to each peer, by (node, peer), from `kubectl get
/// meshpeerreports -o json`. A report is named after its node.
fn reported_paths(json: &str) -> Result<Reported> {
    let reports: serde_json::Value = serde_json::from_str(json).context("meshpeerreports JSON")?;
    let mut paths = BTreeMap::new();
    for r in reports["items"].as_array().into_iter().flatten() {
        let Some(name) = r["metadata"]["name"].as_str() else {
            continue;
        };
        for entry in r["spec"]["paths"].as_array().into_iter().flatten() {
            let field = |f: &str| entry[f].as_str().map(str::to_owned);
            let Some(peer) = field("peer") else {
                continue;
            };
            paths.insert(
                (name.to_owned(), peer),
                PathSeen {
                    path: field("path").unwrap_or_default(),
                    via: field("via"),
                    endpoint: field("endpoint"),
                    latest_handshake: field("latestHandshake"),
                },
            );
        }
    }
    Ok(paths)
}

/// Every way in which the `MeshPeer`s and the nodes' reports (`kubectl get meshpeers -o
/// json`, `kubectl get meshpeerreports -o json`) differ from what the topology implies: each
/// node's path to each other node (its report's `spec.paths`: `peer`, `path`, `via`,
/// `endpoint`), the relays (a public node, the same one both ways), the mappings public
/// nodes see for the nodes behind one endpoint-independent NAT (its WAN address, one port per
/// node), and each node's NAT kind (`status.approved.nat`). `wans`: each NAT'd site's
/// router's WAN address.
fn path_mismatches(
    peers_json: &str,
    reports_json: &str,
    nodes: &[Node],
    wans: &BTreeMap<String, String>,
) -> Result<Vec<String>> {
    let peers: serde_json::Value = serde_json::from_str(peers_json).context("meshpeers JSON")?;
    let paths = reported_paths(reports_json)?;
    let mut nat: BTreeMap<String, String> = BTreeMap::new();
    for p in peers["items"].as_array().into_iter().flatten() {
        let Some(name) = p["spec"]["node"].as_str() else {
            continue;
        };
        if let Some(kind) = p["status"]["approved"]["nat"].as_str() {
            nat.insert(name.to_owned(), kind.to_owned());
        }
    }

    let mut wrong = Vec::new();
    let public: BTreeSet<&str> = nodes
        .iter()
        .filter(|n| nat_of(&n.site).is_ok_and(|k| k == "Public"))
        .map(|n| n.name.as_str())
        .collect();
    for n in nodes {
        let want = nat_of(&n.site)?;
        match nat.get(&n.name) {
            Some(kind) if kind == want => {}
            seen => wrong.push(format!(
                "{} (site {}): status.approved.nat {seen:?}, want {want}",
                n.name, n.site
            )),
        }
    }
    for a in nodes {
        for b in nodes.iter().filter(|b| b.name != a.name) {
            let want = implied_path(&a.site, &b.site)?;
            let pair = format!(
                "{} (site {}) -> {} (site {})",
                a.name, a.site, b.name, b.site
            );
            let Some(seen) = paths.get(&(a.name.clone(), b.name.clone())) else {
                wrong.push(format!("{pair}: no entry in its report, want {want}"));
                continue;
            };
            if seen.path != want {
                wrong.push(format!("{pair}: path {}, want {want}", seen.path));
                continue;
            }
            if want != "Relay" {
                continue;
            }
            match seen.via.as_deref() {
                Some(via) if public.contains(via) => {}
                via => wrong.push(format!(
                    "{pair}: Relay via {via:?}, want a public node ({public:?})"
                )),
            }
            let back = paths
                .get(&(b.name.clone(), a.name.clone()))
                .and_then(|p| p.via.as_deref());
            if back != seen.via.as_deref() {
                wrong.push(format!(
                    "{pair}: Relay via {:?}, but the other way via {back:?}: not the same relay",
                    seen.via
                ));
            }
        }
    }
    // Several nodes behind one public address: a public node reaches each behind the NAT's
    // WAN address, on a port of its own.
    for a in nodes.iter().filter(|n| public.contains(n.name.as_str())) {
        for (site, wan) in wans {
            if nat_of(site)? != "EndpointIndependent" {
                continue;
            }
            let mut ports: BTreeMap<String, &str> = BTreeMap::new();
            for b in nodes.iter().filter(|n| &n.site == site) {
                let endpoint = paths
                    .get(&(a.name.clone(), b.name.clone()))
                    .and_then(|p| p.endpoint.as_deref());
                match endpoint.and_then(|e| e.rsplit_once(':')) {
                    Some((ip, port)) if ip == wan => {
                        if let Some(other) = ports.insert(port.to_owned(), &b.name) {
                            wrong.push(format!(
                                "{}: {} and {other} (both at site {site}) at the same endpoint {wan}:{port}",
                                a.name, b.name
                            ));
                        }
                    }
                    _ => wrong.push(format!(
                        "{} -> {} (site {site}): endpoint {endpoint:?}, want router {site}'s WAN address {wan} with a port",
                        a.name, b.name
                    )),
                }
            }
        }
    }
    Ok(wrong)
}

/// iperf3 from `from`'s pod to `to`'s pod for 10 s; Mbit/s.
fn transfer(mesh: &Mesh, from: &Node, to: &Node) -> Result<f64> {
    let server = KillOnDrop(
        mesh.exec(&to.pod, &["iperf3", "-s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    wait_until("iperf3 server", Duration::from_secs(10), || {
        run(mesh.exec(&to.pod, &["sh", "-c", "ss -ltn | grep -q 5201"]))
            .is_ok_and(|o| o.status.success())
    })?;
    let gbps = iperf(mesh, &from.pod, &to.pod_ip, 10)
        .with_context(|| format!("iperf3 {} -> {}", from.pod, to.pod))?;
    drop(server);
    Ok(gbps * 1000.0)
}

/// A process killed when dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Flushes `site`'s NAT router's conntrack table while node-3's pod (site b) pings node-5's
/// (site c, through a relay) and node-5's pod pings node-1's (public), 100 a second; both
/// must answer again within 60 s. Reports the longest gap each saw.
fn recovery(mesh: &Mesh, nodes: &[Node], site: &str) -> Result<()> {
    let watched = [("node-3", "node-5"), ("node-5", "node-1")]
        .iter()
        .map(|(a, b)| Ok((node(nodes, a)?, node(nodes, b)?)))
        .collect::<Result<Vec<_>>>()?;
    let pingers = watched
        .iter()
        .map(|(a, b)| {
            Pinger::spawn(
                mesh.exec(
                    &a.pod,
                    &["ping", "-D", "-i", PING_INTERVAL, "-W", "1", &b.pod_ip],
                ),
                format!("{} -> {}", a.pod, b.pod),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    std::thread::sleep(Duration::from_secs(3));
    mesh.script(&["flush-nat", site])?;
    let back = reach_each(
        mesh,
        &watched
            .iter()
            .map(|(a, b)| Pair {
                from: a.pod.clone(),
                to: b.pod.clone(),
                to_ip: b.pod_ip.clone(),
            })
            .collect::<Vec<_>>(),
        Duration::from_secs(60),
    )
    .map_err(|e| anyhow!("pings did not come back after router {site}'s NAT was flushed: {e}"))?;
    std::thread::sleep(Duration::from_secs(2));
    let summary = Summary::stop(pingers)?;
    let gaps: Vec<String> = summary
        .results
        .iter()
        .map(|r| {
            format!(
                "{} longest gap {:.3} s (lost {} of {})",
                r.label,
                r.longest_gap,
                r.lost.len(),
                r.sent
            )
        })
        .collect();
    report(&format!(
        "clouds: router {site} ({}) forgot its NAT mappings under pings: {}; both answering {:.1} s after the flush",
        nat_of(site)?,
        gaps.join(", "),
        back.as_secs_f64()
    ));
    Ok(())
}

/// Moves `name` to `site` (`hack/mesh.sh move-node`); reports how long until every pair
/// involving its pod answers again, which must be within 120 s.
fn move_node(mesh: &Mesh, nodes: &[Node], name: &str, site: &str) -> Result<()> {
    let before = mesh.site(name)?;
    let moved = Instant::now();
    mesh.script(&["move-node", name, site])?;
    let after = mesh.site(name)?;
    if after != site {
        bail!("{name} is at site {after} after move-node to {site}");
    }
    let pod = node(nodes, name)?.pod.clone();
    let involved = pairs(nodes, |a, b| a.pod == pod || b.pod == pod);
    reach_each(mesh, &involved, Duration::from_secs(120)).map_err(|e| {
        anyhow!(
            "{name} moved from site {before} to site {site}: {e}\nwhat the MeshPeers say:\n  {}",
            paths_involving(mesh, name).join("\n  ")
        )
    })?;
    report(&format!(
        "clouds: {name} moved from site {before} to site {site} ({}, now at {}): all {} pairs with its pod answering again {:.1} s later",
        nat_of(site)?,
        mesh.address(name)?,
        involved.len(),
        moved.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// What the `MeshPeer`s and reports say of `name` and of the paths to and from it, for a
/// failure message.
fn paths_involving(mesh: &Mesh, name: &str) -> Vec<String> {
    let read = || -> Result<(serde_json::Value, Reported)> {
        let peers = serde_json::from_str(&mesh.kubectl(&["get", "meshpeers", "-o", "json"])?)?;
        let reports = mesh.kubectl(&["get", "meshpeerreports", "-o", "json"])?;
        Ok((peers, reported_paths(&reports)?))
    };
    let (peers, paths) = match read() {
        Ok(v) => v,
        Err(e) => return vec![format!("{e:#}")],
    };
    let mut lines = Vec::new();
    for p in peers["items"].as_array().into_iter().flatten() {
        if p["spec"]["node"].as_str() == Some(name) {
            let a = &p["status"]["approved"];
            lines.push(format!(
                "{name}: approved location {}, nat {}, mappedEndpoint {}, endpoint {}",
                a["location"], a["nat"], a["mappedEndpoint"], a["endpoint"]
            ));
        }
    }
    for ((node, peer), seen) in &paths {
        if node == name || peer == name {
            lines.push(format!(
                "{node} -> {peer}: {} via {:?} endpoint {:?} latest handshake {:?}",
                seen.path, seen.via, seen.endpoint, seen.latest_handshake
            ));
        }
    }
    lines
}

/// The first packets of a capture matching `filter`, for a failure message.
fn first_packets(pcap: &std::path::Path, filter: &str) -> String {
    let mut cmd = std::process::Command::new("tcpdump");
    cmd.arg("-r").arg(pcap).args(["-n", "-c", "10", filter]);
    ok(cmd).unwrap_or_else(|e| format!("{e:#}"))
}
