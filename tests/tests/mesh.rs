//! End to end: a 3-node mesh in network namespaces (`hack/mesh.sh`) with a real control
//! plane, real agents and devices, pods plumbed by the CNI reference plugins, and real
//! packets, checked the way a person would: ping, iperf3, `wg show`, tcpdump on the underlay.
//!
//! One mesh serves every step, in order; each step says what it checks. Figures (join
//! convergence, the gap on agent restart) are printed and appended to
//! `target/wgmesh-e2e-report.txt`.

use anyhow::{Context, Result, bail};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use wgmesh_tests::netns::*;
use wgmesh_tests::ping::{PING_INTERVAL, Pinger, Summary};

#[test]
fn a_three_node_mesh_end_to_end() -> Result<()> {
    assert!(
        is_root(),
        "the end-to-end test needs root (network namespaces); run hack/test.sh as root"
    );
    // 1. Every pod reaches every other pod, across nodes (awaited by `up_with_pods`), and
    //    data moves.
    let (mesh, ips) = Mesh::up_with_pods(3)?;
    mesh.check(steps(&mesh, &ips))
}

/// The test's steps, in order, on one mesh.
fn steps(mesh: &Mesh, ips: &[String]) -> Result<()> {
    let _server = mesh
        .exec("pod-2", &["iperf3", "-s"])
        .stdout(Stdio::null())
        .spawn()?;
    wait_until("iperf3 server", Duration::from_secs(10), || {
        run(mesh.exec("pod-2", &["sh", "-c", "ss -ltn | grep -q 5201"]))
            .is_ok_and(|o| o.status.success())
    })?;

    // 2. + 3. A transfer while tcpdump watches the underlay: WireGuard only, no pod address.
    let cap = mesh.capture("wireguard")?;
    let gbps = iperf(mesh, "pod-1", &ips[1], 5)?;
    let [pod_packets, wg_packets] = cap.stop(&[
        "net 10.244.0.0/16 or net fd00:10:244::/56",
        "udp port 51820",
    ])?[..] else {
        bail!("capture counts");
    };
    report(&format!(
        "e2e: iperf3 pod-1 -> pod-2 through WireGuard: {gbps:.2} Gbit/s"
    ));
    assert!(gbps > 0.0);
    assert_eq!(
        pod_packets, 0,
        "pod addresses seen on the underlay in WireGuard mode"
    );
    assert!(
        wg_packets > 100,
        "no WireGuard traffic on the underlay ({wg_packets} packets)"
    );

    for node in ["node-1", "node-2", "node-3"] {
        let show = ok(Command::new("wg").args(["show", &mesh.iface(node), "dump"]))?;
        let peers: Vec<&str> = show.lines().skip(1).collect();
        assert_eq!(peers.len(), 2, "{node}: {show}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        for p in peers {
            let handshake: u64 = p
                .split('\t')
                .nth(4)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            assert!(
                handshake > 0 && now.saturating_sub(handshake) < 180,
                "{node}: stale handshake: {p}"
            );
        }
    }

    // 4. host-gw for on-link peers: pods still talk, in the clear, and not through WireGuard.
    mesh.patch_mesh(r#"{"transport":{"hostGateway":"OnLink"}}"#)?;
    let gw = mesh.node_ip("node-2");
    wait_until("host-gw routes", Duration::from_secs(30), || {
        run(mesh.exec("node-1", &["ip", "route", "get", &ips[1]]))
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("via {gw}")))
    })?;
    let cap = mesh.capture("hostgw")?;
    wait_until("ping over host-gw", Duration::from_secs(30), || {
        mesh.ping("pod-1", &ips[1])
    })?;
    for _ in 0..5 {
        assert!(mesh.ping("pod-1", &ips[1]));
    }
    let [plain, wg] = cap.stop(&[
        &format!("icmp and host {} and host {}", ips[0], ips[1]),
        "udp port 51820",
    ])?[..] else {
        bail!("capture counts");
    };
    assert!(
        plain >= 5,
        "host-gw: pod addresses should be on the wire ({plain} packets)"
    );
    assert_eq!(wg, 0, "host-gw: WireGuard packets seen");
    mesh.patch_mesh(r#"{"transport":{"hostGateway":"Never"}}"#)?;
    wait_until(
        "routes back through the device",
        Duration::from_secs(30),
        || {
            run(mesh.exec("node-1", &["ip", "route", "get", &ips[1]]))
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&mesh.iface("node-1")))
        },
    )?;

    // 4b. listenPort and mtu changed on the running mesh: every device follows within a
    //     pass, no agent restarts, and pods keep talking. Then back to the defaults.
    settings_live(mesh, ips)?;

    // 5. A node joins: how long from its Node object to its pod answering; then it leaves.
    let joined = Instant::now();
    mesh.script(&["add-node", "node-4"])?;
    let ip4 = wait_until_pod(mesh, "node-4", "pod-4")?;
    wait_until("pod-4 <-> pod-1", Duration::from_secs(60), || {
        mesh.ping("pod-4", &ips[0]) && mesh.ping("pod-1", &ip4)
    })?;
    report(&format!(
        "e2e: node join, Node created -> first pod-to-pod ping: {:.1} s",
        joined.elapsed().as_secs_f64()
    ));
    let key4 = mesh.kubectl(&[
        "get",
        "meshpeer",
        "node-4",
        "-o",
        "jsonpath={.status.approved.publicKey}",
    ])?;
    mesh.script(&["remove-node", "node-4"])?;
    wait_until("node-4 dropped everywhere", Duration::from_secs(60), || {
        ["node-1", "node-2", "node-3"].iter().all(|n| {
            let show = run(Command::new("wg").args(["show", &mesh.iface(n), "peers"]))
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let routes = run(mesh.exec(n, &["ip", "route", "show", "proto", "87"]))
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            !show.contains(key4.trim()) && !routes.contains("10.244.3.0/24")
        })
    })?;

    // 5b. A route the kernel lost comes back within a resync.
    let lost = ips[1]
        .rsplit_once('.')
        .map(|(net, _)| format!("{net}.0/24"))
        .unwrap_or_default();
    ok(mesh.exec(
        "node-1",
        &["ip", "route", "del", &lost, "dev", &mesh.iface("node-1")],
    ))?;
    let back = wait_until(
        "the lost route to come back",
        Duration::from_secs(30),
        || {
            run(mesh.exec(
                "node-1",
                &["ip", "route", "show", &lost, "dev", &mesh.iface("node-1")],
            ))
            .is_ok_and(|o| !o.stdout.is_empty())
        },
    )?;
    report(&format!(
        "e2e: a deleted route re-added after {:.1} s",
        back.as_secs_f64()
    ));

    // 5c. The nftables table flushed behind the agent's back comes back within a resync.
    ok(mesh.exec("node-1", &["nft", "delete", "table", "inet", "wgmesh"]))?;
    let back = wait_until(
        "the nftables table to come back",
        Duration::from_secs(30),
        || {
            run(mesh.exec("node-1", &["nft", "list", "table", "inet", "wgmesh"]))
                .is_ok_and(|o| o.status.success())
        },
    )?;
    report(&format!(
        "e2e: a deleted nftables table loaded again after {:.1} s",
        back.as_secs_f64()
    ));

    // 6. The agent is restarted under traffic, as an upgrade does (SIGTERM, then a new
    //    process, which takes the datapath over: not one ping lost) and as a crash does
    //    (SIGKILL): what each costs, and nothing in the clear.
    for signal in ["TERM", "KILL"] {
        restart(mesh, ips, signal)?;
    }

    // 6a. A datapath thread of node-2's agent panics: the agent exits rather than run on
    //     half-dead, nothing leaves in the clear, and a new agent brings the node back.
    datapath_death(mesh, ips)?;

    // 6b. node-3 "reboots" with the API server unreachable at first: no pod is plumbed
    //     before the agent has its blackholes and nftables rules back, and nothing leaves in
    //     the clear.
    reboot(mesh, ips)?;

    // 7. An external peer running wireguard-go, configured from what the mesh publishes.
    external_peer(mesh, ips)?;
    Ok(())
}

/// Changes `listenPort` and `mtu` while pod-1 and pod-2 ping each other at 100 per second,
/// waits until every device has both, checks no agent restarted and every pair still
/// talks, reports what the change cost, and restores the defaults the same way.
fn settings_live(mesh: &Mesh, ips: &[String]) -> Result<()> {
    let nodes = ["node-1", "node-2", "node-3"];
    let pids = |m: &Mesh| -> Vec<String> {
        nodes
            .iter()
            .map(|n| {
                std::fs::read_to_string(m.dir.join(format!("pids/agent-{n}"))).unwrap_or_default()
            })
            .collect()
    };
    let before = pids(mesh);
    let link = ok(mesh.exec(
        "node-1",
        &["ip", "-o", "link", "show", &mesh.iface("node-1")],
    ))?;
    let auto: u32 = link
        .split_whitespace()
        .skip_while(|w| *w != "mtu")
        .nth(1)
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("the device's MTU in {link:?}"))?;
    let pods: Vec<(&str, &str)> = vec![("pod-1", &ips[0]), ("pod-2", &ips[1]), ("pod-3", &ips[2])];
    for (port, mtu, spec) in [
        (51999, 1300, r#"{"listenPort":51999,"mtu":1300}"#),
        (51820, auto, r#"{"listenPort":null,"mtu":null}"#),
    ] {
        let pingers = [(0, 1), (1, 0)]
            .iter()
            .map(|&(a, b)| {
                Pinger::spawn(
                    mesh.exec(
                        pods[a].0,
                        &["ping", "-D", "-i", PING_INTERVAL, "-W", "1", pods[b].1],
                    ),
                    format!("{} -> {}", pods[a].0, pods[b].0),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        std::thread::sleep(Duration::from_secs(1));
        mesh.patch_mesh(spec)?;
        let took = wait_until(
            &format!("every device on port {port} with MTU {mtu}"),
            Duration::from_secs(60),
            || {
                nodes.iter().all(|n| {
                    let listening =
                        run(Command::new("wg").args(["show", &mesh.iface(n), "listen-port"]))
                            .is_ok_and(|o| {
                                String::from_utf8_lossy(&o.stdout).trim() == port.to_string()
                            });
                    let link = run(mesh.exec(n, &["ip", "-o", "link", "show", &mesh.iface(n)]))
                        .is_ok_and(|o| {
                            String::from_utf8_lossy(&o.stdout).contains(&format!(" mtu {mtu} "))
                        });
                    listening && link
                })
            },
        )?;
        let reach = wait_until(
            "every pod to reach every other",
            Duration::from_secs(30),
            || all_pairs(mesh, &pods).is_empty(),
        )
        .map_err(|e| anyhow::anyhow!("{e}: failing {:?}", all_pairs(mesh, &pods)))?;
        std::thread::sleep(Duration::from_secs(1));
        let Summary {
            sent, lost, gap, ..
        } = Summary::stop(pingers)?;
        report(&format!(
            "e2e: settings changed live ({spec}): every device on port {port}, MTU {mtu} after {:.1} s, all pairs answering {:.1} s later; pod-1 <-> pod-2 at 100/s: sent {sent}, lost {lost}, longest gap {gap:.3} s",
            took.as_secs_f64(),
            reach.as_secs_f64()
        ));
        assert_eq!(pids(mesh), before, "an agent restarted");
    }
    Ok(())
}

/// Restarts node-1's agent with `signal`, then starts a new one, while pod-1 and pod-2 ping
/// each other at 100 per second and an iperf3 stream flows from pod-1 to pod-2; reports the
/// pings lost and the longest gap, and checks that tcpdump saw no pod address on the
/// underlay.
fn restart(mesh: &Mesh, ips: &[String], signal: &str) -> Result<()> {
    let cap = mesh.capture(&format!("restart-{signal}"))?;
    let pingers = [(0, 1), (1, 0)]
        .iter()
        .map(|&(a, b)| {
            Pinger::spawn(
                mesh.exec(
                    &format!("pod-{}", a + 1),
                    &["ping", "-D", "-i", PING_INTERVAL, "-W", "1", &ips[b]],
                ),
                format!("pod-{} -> pod-{}", a + 1, b + 1),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let transfer = mesh
        .exec(
            "pod-1",
            &["iperf3", "-c", &ips[1], "-t", "10", "-b", "100M", "-J"],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(3));
    let stopped = Instant::now();
    if signal == "TERM" {
        // SIGTERM and a new agent at once: the new one takes the datapath over.
        mesh.script(&["upgrade-agent", "node-1"])?;
    } else {
        mesh.script(&["stop-agent", "node-1", signal])?;
    }
    let stop_took = stopped.elapsed();
    if signal != "TERM" {
        mesh.script(&["start-agent", "node-1"])?;
    }
    std::thread::sleep(Duration::from_secs(4));
    wait_until(
        "pings answered after the restart",
        Duration::from_secs(60),
        || mesh.ping("pod-1", &ips[1]),
    )?;
    let Summary {
        sent, lost, gap, ..
    } = Summary::stop(pingers)?;
    // The TCP stream may or may not survive the gap; either way it must not leak.
    let out = transfer.wait_with_output()?;
    let iperf: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let retransmits = iperf["end"]["sum_sent"]["retransmits"]
        .as_i64()
        .unwrap_or(-1);
    let [plain] = cap.stop(&["net 10.244.0.0/16 or net fd00:10:244::/56"])?[..] else {
        bail!("capture counts");
    };
    let (what, stop) = if signal == "TERM" {
        (
            "upgrade (SIGTERM, then a new agent, which takes the datapath over)",
            "the old agent exited after",
        )
    } else {
        ("crash (SIGKILL, then a new agent)", "stopped in")
    };
    report(&format!(
        "e2e: agent {what} on node-1: {stop} {:.2} s; pod-1 <-> pod-2 at 100/s sent {sent}, lost {lost}, longest gap between replies {gap:.3} s; iperf3 through it: {} retransmits{}; {plain} pod-address packets on the underlay",
        stop_took.as_secs_f64(),
        retransmits,
        iperf["error"]
            .as_str()
            .map(|e| format!(" (iperf3: {e})"))
            .unwrap_or_default()
    ));
    assert_eq!(
        plain, 0,
        "pod packets in the clear around the agent's {what}"
    );
    if signal == "TERM" {
        assert_eq!(lost, 0, "pings lost in the agent's {what}");
    }
    Ok(())
}

/// node-2's `wg-timers` thread panics (the agent's failpoint directory, `hack/mesh.sh`)
/// while pod-1 pings pod-2: the device stops whole, the agent exits saying why (in a
/// cluster its pod restarts it; here the test starts it again), tcpdump sees no pod address
/// on the underlay meanwhile, and pings come back.
fn datapath_death(mesh: &Mesh, ips: &[String]) -> Result<()> {
    let node = "node-2";
    let pid = std::fs::read_to_string(mesh.dir.join(format!("pids/agent-{node}")))?
        .trim()
        .to_owned();
    let log = mesh.dir.join(format!("logs/agent-{node}.log"));
    let log_before = std::fs::metadata(&log)?.len();
    let cap = mesh.capture("datapath-death")?;
    let pinger = Pinger::spawn(
        mesh.exec(
            "pod-1",
            &["ping", "-D", "-i", PING_INTERVAL, "-W", "1", &ips[1]],
        ),
        "pod-1 -> pod-2".into(),
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let failpoints = mesh.dir.join(format!("nodes/{node}/failpoints"));
    std::fs::create_dir_all(&failpoints)?;
    std::fs::write(failpoints.join("wg-timers"), b"")?;
    let injected = Instant::now();
    // Gone, or a zombie nobody has reaped yet.
    let exited = wait_until(
        "the agent to exit after its datapath thread panicked",
        Duration::from_secs(30),
        || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map_or(true, |s| s.split_whitespace().nth(2) == Some("Z"))
        },
    )?;
    std::fs::remove_file(failpoints.join("wg-timers"))?;
    let text = std::fs::read(&log)?;
    let said = String::from_utf8_lossy(&text[usize::try_from(log_before)?..]).into_owned();
    for want in [
        "datapath thread wg-timers panicked",
        "exiting so that the agent restarts",
    ] {
        assert!(
            said.contains(want),
            "{node}'s agent log lacks {want:?}:\n{said}"
        );
    }
    std::thread::sleep(Duration::from_secs(2));
    mesh.script(&["start-agent", node])?;
    wait_until(
        "pings answered after the new agent started",
        Duration::from_secs(60),
        || mesh.ping("pod-1", &ips[1]),
    )?;
    let back = injected.elapsed();
    let Summary { sent, lost, .. } = Summary::stop(vec![pinger])?;
    let [plain] = cap.stop(&["net 10.244.0.0/16 or net fd00:10:244::/56"])?[..] else {
        bail!("capture counts");
    };
    report(&format!(
        "e2e: a datapath thread of {node}'s agent panicked: the agent exited {:.2} s later; a new agent started 2 s after that; pings answered again {:.1} s after the panic (pod-1 -> pod-2 sent {sent}, lost {lost}); {plain} pod-address packets on the underlay",
        exited.as_secs_f64(),
        back.as_secs_f64()
    ));
    assert_eq!(
        plain, 0,
        "pod packets in the clear while {node}'s agent was down"
    );
    Ok(())
}

/// What a reboot of node-3 takes away (its agent and device, every route of ours, the
/// nftables table, the tmpfs `/run`), then a pod plumbed through CNI before the agent runs,
/// the agent started while the node cannot reach the API server, and the API server given
/// back; tcpdump watches the underlay throughout. (node-3's old pod stays, idle: nothing
/// pings it while its node is down.)
fn reboot(mesh: &Mesh, ips: &[String]) -> Result<()> {
    let node = "node-3";
    let nd = mesh.dir.join(format!("nodes/{node}"));
    let conf = nd.join("cni/10-wgmesh.conflist");
    let cap = mesh.capture("reboot")?;
    mesh.script(&["stop-agent", node, "KILL"])?;
    for family in ["-4", "-6"] {
        ok(mesh.exec(node, &["ip", family, "route", "flush", "proto", "87"]))?;
    }
    let _ = run(mesh.exec(node, &["nft", "delete", "table", "inet", "wgmesh"]));
    let _ = run(mesh.exec(node, &["ip", "link", "del", &mesh.iface(node)]));
    std::fs::remove_dir_all(nd.join("run"))?;
    assert!(
        std::fs::symlink_metadata(&conf).is_ok() && std::fs::metadata(&conf).is_err(),
        "after the reboot the runtime's link must dangle: {}",
        conf.display()
    );
    // What a runtime does with it: the ADD fails, nothing is plumbed.
    let early = mesh.ns("pod-early");
    ok(Command::new("ip").args(["netns", "add", &early]))?;
    let add = run(mesh.exec(
        node,
        &[
            env!("CARGO_BIN_EXE_cni-exec"),
            "add",
            &conf.to_string_lossy(),
            &format!("/var/run/netns/{early}"),
            "pod-early",
            "eth0",
        ],
    ))?;
    let _ = run(Command::new("ip").args(["netns", "del", &early]));
    assert!(
        !add.status.success(),
        "a pod was plumbed before the agent ran: {}",
        String::from_utf8_lossy(&add.stdout)
    );

    // The agent starts while the node cannot reach the API server.
    let api = format!("{}.2", mesh.net);
    let table = "wgmesh-e2e-block";
    for rule in [
        &["add", "table", "inet", table][..],
        &[
            "add",
            "chain",
            "inet",
            table,
            "out",
            "{ type filter hook output priority 0 ; }",
        ],
        &[
            "add", "rule", "inet", table, "out", "ip", "daddr", &api, "tcp", "dport", "6443",
            "drop",
        ],
    ] {
        let mut args = vec!["nft"];
        args.extend(rule);
        ok(mesh.exec(node, &args))?;
    }
    let started = Instant::now();
    mesh.script(&["start-agent", node])?;
    std::thread::sleep(Duration::from_secs(8));
    assert!(
        std::fs::metadata(&conf).is_err(),
        "the agent wrote the CNI configuration without the API server"
    );
    ok(mesh.exec(node, &["nft", "delete", "table", "inet", table]))?;
    let unblocked = Instant::now();
    let written = wait_until(
        "node-3's CNI configuration once the API server is reachable",
        Duration::from_secs(60),
        || std::fs::metadata(&conf).is_ok(),
    )?;
    let ip = mesh.pod(node, "pod-boot")?;
    let reach = wait_until("pod-boot <-> pod-1", Duration::from_secs(60), || {
        mesh.ping("pod-boot", &ips[0]) && mesh.ping("pod-1", &ip)
    })?;
    let [plain] = cap.stop(&["net 10.244.0.0/16 or net fd00:10:244::/56"])?[..] else {
        bail!("capture counts");
    };
    report(&format!(
        "e2e: reboot of node-3 (API unreachable for the agent's first {:.1} s): CNI configuration written {:.1} s after the API came back, a new pod reached pod-1 {:.1} s later; {plain} pod-address packets on the underlay",
        unblocked.duration_since(started).as_secs_f64(),
        written.as_secs_f64(),
        reach.as_secs_f64()
    ));
    assert_eq!(plain, 0, "pod packets in the clear around the reboot");
    Ok(())
}

fn external_peer(mesh: &Mesh, ips: &[String]) -> Result<()> {
    let ext = ExternalPeer::start(mesh, "laptop", "10.250.0.7")?;
    ext.configure_nodes()?;
    wait_until("the laptop reaches pod-1", Duration::from_secs(30), || {
        ext.ping(&ips[0])
    })?;
    wait_until("pod-2 reaches the laptop", Duration::from_secs(30), || {
        mesh.ping("pod-2", "10.250.0.7")
    })?;
    Ok(())
}
