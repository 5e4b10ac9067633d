//! End to end: key rotation by editing custom resources, on a 3-node mesh in network
//! namespaces (`hack/mesh.sh`), while pings run at 100 per second in both directions and an
//! iperf3 stream flows, checked with real packets, `wg show`, the key files and tcpdump.
//!
//! Pings run at 100 or more per second each (see [`PING_INTERVAL`]).
//!
//! One mesh serves every step, in order: one node rotated through its `MeshPeer`; every node
//! through the `Mesh`; the rotating agent killed twice mid-rotation; 20 rotations in a row;
//! an external wireguard-go peer through a rotation and its grace period. Figures (pings
//! sent and lost, the longest gap between replies, the stream's weakest interval) are
//! printed and appended to `target/wgmesh-e2e-report.txt`.

use anyhow::{Context, Result, bail};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use wgmesh_tests::netns::*;
use wgmesh_tests::ping::{PING_INTERVAL, Pinger, Summary};

/// How long a rotation may take before the test gives up on it: a bound for a stuck
/// rotation, not a measure (the times are reported). Each step is a status write through
/// the API server and the admission webhook; on this machine's two shared cores, with the
/// mesh's debug builds encrypting a stream, the API server has taken over a minute to carry
/// one rotation.
const PATIENCE: Duration = Duration::from_secs(180);

/// `ping -D -i PING_INTERVAL` from a pod of the mesh, read as it runs.
fn start_pinger(mesh: &Mesh, from: &str, to_label: &str, to: &str) -> Result<Pinger> {
    Pinger::spawn(
        mesh.exec(from, &["ping", "-D", "-i", PING_INTERVAL, "-W", "1", to]),
        format!("{from} -> {to_label}"),
    )
}

/// An iperf3 stream at 100 Mbit/s reporting every half second, running until
/// [`Stream::finish`] interrupts it: traffic spans the whole rotation however long the
/// API server takes to carry it.
struct Stream {
    child: Child,
}

/// What iperf3 -J reports as its error when SIGINT ended the test, as `finish` does.
const IPERF_INTERRUPTED: &str = "interrupt - the client has terminated";

impl Stream {
    fn start(mesh: &Mesh, from: &str, to: &str) -> Result<Stream> {
        let child = mesh
            .exec(
                from,
                &[
                    "iperf3", "-c", to,
                    // Longer than any step may take; `finish` ends it.
                    "-t", "600", "-i", "0.5",
                    // Paced, so the machine's two cores are not what limits it (the
                    // mesh runs debug builds); what is measured is the rotation.
                    "-b", "100M", "-J",
                ],
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Stream { child })
    }

    /// Interrupts the stream and reads its report; returns (longest stall in seconds:
    /// consecutive intervals that moved nothing, weakest interval in Mbit/s, mean Mbit/s,
    /// the weak intervals: wall clock start, Mbit/s and retransmits of each interval under
    /// a tenth of the mean). Fails if the stream had ended by itself before.
    fn finish(self) -> Result<(f64, f64, f64, Vec<String>)> {
        signal(&self.child, "INT");
        let out = self.child.wait_with_output()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("iperf3 output {}", String::from_utf8_lossy(&out.stdout)))?;
        match v["error"].as_str() {
            Some(IPERF_INTERRUPTED) => {}
            Some(e) => bail!("iperf3: {e}"),
            None => bail!("the iperf3 stream ended before it was interrupted"),
        }
        let mut stall: f64 = 0.0;
        let mut run = 0.0;
        let mut weakest = f64::MAX;
        // Interrupted, iperf3 has no receiver summary: the mean is the intervals'.
        let intervals: Vec<&serde_json::Value> =
            v["intervals"].as_array().into_iter().flatten().collect();
        let (bytes, secs) = intervals.iter().fold((0.0, 0.0), |(b, s), i| {
            (
                b + i["sum"]["bytes"].as_f64().unwrap_or(0.0),
                s + i["sum"]["seconds"].as_f64().unwrap_or(0.0),
            )
        });
        let mean = if secs > 0.0 {
            bytes * 8.0 / secs / 1e6
        } else {
            0.0
        };
        let began = v["start"]["timestamp"]["timesecs"].as_f64().unwrap_or(0.0);
        let mut weak = Vec::new();
        for i in intervals {
            let bytes = i["sum"]["bytes"].as_f64().unwrap_or(0.0);
            let secs = i["sum"]["seconds"].as_f64().unwrap_or(0.0);
            if secs < 0.25 {
                continue; // iperf3's last, partial interval
            }
            let mbps = bytes * 8.0 / secs / 1e6;
            weakest = weakest.min(mbps);
            if mbps < mean / 10.0 {
                let at = began + i["sum"]["start"].as_f64().unwrap_or(0.0);
                let at = k8s_openapi::jiff::Timestamp::from_microsecond((at * 1e6) as i64)
                    .map(|t| t.to_string())
                    .unwrap_or_default();
                weak.push(format!(
                    "{at}: {mbps:.0} Mbit/s, {} retransmits",
                    i["sum"]["retransmits"].as_i64().unwrap_or(0)
                ));
            }
            if bytes == 0.0 {
                run += secs;
                stall = stall.max(run);
            } else {
                run = 0.0;
            }
        }
        Ok((stall, weakest, mean, weak))
    }
}

fn json(mesh: &Mesh, args: &[&str]) -> Result<serde_json::Value> {
    let mut full = args.to_vec();
    full.extend(["-o", "json"]);
    Ok(serde_json::from_str(&mesh.kubectl(&full)?)?)
}

fn generation(mesh: &Mesh, node: &str) -> Result<i64> {
    let p = json(mesh, &["get", "meshpeer", node])?;
    Ok(p["status"]["keyGeneration"].as_i64().unwrap_or(0))
}

/// The API server's notion of now, RFC 3339 (same machine: the local clock).
fn now_rfc3339() -> Result<String> {
    Ok(
        ok(std::process::Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]))?
            .trim()
            .to_owned(),
    )
}

fn request_node_rotation(mesh: &Mesh, node: &str) -> Result<()> {
    request_rotation(mesh, node, false)
}

/// Asks for `node`'s key to be rotated now; with `revoke`, as an emergency: its old key is
/// not answered once the rotation completes.
fn request_rotation(mesh: &Mesh, node: &str, revoke: bool) -> Result<()> {
    let patch = format!(
        r#"{{"spec":{{"keyRotation":{{"requestedAt":"{}","revoke":{revoke}}}}}}}"#,
        now_rfc3339()?
    );
    mesh.kubectl(&["patch", "meshpeer", node, "--type", "merge", "-p", &patch])?;
    Ok(())
}

/// Waits until every node listed is at least at its target generation, its rotation is
/// complete and every other node's device has exactly its new key (approved, no next key).
fn wait_rotated(mesh: &Mesh, targets: &[(&str, i64)], timeout: Duration) -> Result<Duration> {
    wait_until("the rotation to complete", timeout, || {
        let Ok(peers) = json(mesh, &["get", "meshpeers"]) else {
            return false;
        };
        targets.iter().all(|(node, want)| {
            peers["items"].as_array().into_iter().flatten().any(|p| {
                let s = &p["status"];
                p["metadata"]["name"] == *node
                    && s["keyGeneration"].as_i64().unwrap_or(0) >= *want
                    && s["nextPublicKey"].is_null()
                    && s["approved"]["publicKey"] == s["publicKey"]
                    && s["approved"]["nextPublicKey"].is_null()
                    && s["rotationGrant"].is_null()
            })
        })
    })
}

/// `wg show IFACE peers` on a node, sorted.
fn wg_peers(mesh: &Mesh, node: &str) -> Result<Vec<String>> {
    let out = ok(mesh.exec(node, &["wg", "show", &mesh.iface(node), "peers"]))?;
    let mut keys: Vec<String> = out.lines().map(str::to_owned).collect();
    keys.sort();
    Ok(keys)
}

/// Every node's device lists exactly one key per other node: that node's current key.
fn assert_one_key_per_peer(mesh: &Mesh, nodes: &[&str]) -> Result<()> {
    let peers = json(mesh, &["get", "meshpeers"])?;
    let key_of = |n: &str| -> String {
        peers["items"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["metadata"]["name"] == n)
            .and_then(|p| p["status"]["publicKey"].as_str())
            .unwrap_or_default()
            .to_owned()
    };
    for node in nodes {
        let mut want: Vec<String> = nodes
            .iter()
            .filter(|n| *n != node)
            .map(|n| key_of(n))
            .collect();
        want.sort();
        // The device may still be promoting the last key it learned: give it a pass.
        wait_until(
            &format!("{node}'s device to list exactly the current keys"),
            Duration::from_secs(15),
            || wg_peers(mesh, node).is_ok_and(|k| k == want),
        )
        .map_err(|e| anyhow::anyhow!("{e}: has {:?}, want {want:?}", wg_peers(mesh, node)))?;
    }
    Ok(())
}

/// Runs `rotate` while pingers run both ways between `center` and the other pods (or
/// between every pair, if `center` is `None`) and an iperf3 stream flows into `center`'s
/// pod; checks nothing is lost and reports the figures under `title`.
fn under_traffic(
    mesh: &Mesh,
    title: &str,
    pods: &[(&str, &str)],
    center: Option<&str>,
    rotate: impl FnOnce() -> Result<Duration>,
) -> Result<()> {
    let mut pingers = Vec::new();
    for (from, _) in pods {
        for (to, ip) in pods {
            let involved = center.is_none_or(|c| *from == c || *to == c);
            if from != to && involved {
                pingers.push(start_pinger(mesh, from, to, ip)?);
            }
        }
    }
    let (sink, sink_ip) = pods
        .iter()
        .find(|(p, _)| Some(*p) == center)
        .copied()
        .unwrap_or(pods[0]);
    let source = pods
        .iter()
        .find(|(p, _)| *p != sink)
        .map(|p| p.0)
        .unwrap_or("pod-2");
    std::thread::sleep(Duration::from_secs(1));
    let stream = Stream::start(mesh, source, sink_ip)?;
    std::thread::sleep(Duration::from_secs(2));
    let window_start = now_rfc3339()?;
    let took = rotate()?;
    let window_end = now_rfc3339()?;
    // Traffic goes on a little after the rotation: the retired key must not be missed.
    std::thread::sleep(Duration::from_secs(3));
    let (stall, weakest, mean, weak) = stream.finish()?;
    let pings = Summary::stop(pingers)?;
    let (sent, lost, gap, slowest) = (pings.sent, pings.lost, pings.gap, pings.slowest);
    report(&format!(
        "rotation: {title}: completed in {:.1} s; {} pingers (each at least {slowest:.0}/s) sent {sent}, lost {lost}, longest gap between replies {gap:.3} s; iperf3 {source} -> {sink}: longest stall {stall:.1} s, weakest 0.5 s interval {weakest:.0} Mbit/s, mean {mean:.0} Mbit/s",
        took.as_secs_f64(),
        pings.results.len()
    ));
    if !weak.is_empty() {
        report(&format!(
            "rotation: {title}: intervals under a tenth of the mean (rotation from {window_start} to {window_end}): {weak:?}"
        ));
    }
    pings.assert_nothing_lost(title);
    assert_eq!(
        stall, 0.0,
        "{title}: the iperf3 stream stalled; weak intervals: {weak:?}"
    );
    Ok(())
}

fn set_rotation_policy(mesh: &Mesh, policy: &str) -> Result<()> {
    mesh.patch_mesh(&format!(r#"{{"keyRotation":{policy}}}"#))?;
    Ok(())
}

#[test]
fn key_rotation_end_to_end() -> Result<()> {
    assert!(
        is_root(),
        "the end-to-end test needs root (network namespaces); run hack/test.sh as root"
    );
    let (mesh, ips) = Mesh::up_with_pods(3)?;
    mesh.check(steps(&mesh, &ips))
}

/// The test's steps, in order, on one mesh.
fn steps(mesh: &Mesh, ips: &[String]) -> Result<()> {
    let nodes = ["node-1", "node-2", "node-3"];
    let pods: Vec<(&str, &str)> = vec![("pod-1", &ips[0]), ("pod-2", &ips[1]), ("pod-3", &ips[2])];
    for (pod, _) in &pods {
        let _ = mesh
            .exec(pod, &["iperf3", "-s", "-D"])
            .stdout(Stdio::null())
            .status();
    }
    set_rotation_policy(
        mesh,
        r#"{"maxConcurrent":3,"acknowledgeTimeout":"30s","moveTimeout":"30s","externalGracePeriod":"30s"}"#,
    )?;
    let plain_filter = "net 10.244.0.0/16 or net fd00:10:244::/56";

    // 1. One node, through its MeshPeer.
    let cap = mesh.capture("rotation-one")?;
    under_traffic(
        mesh,
        "node-1 via its MeshPeer",
        &pods,
        Some("pod-1"),
        || {
            request_node_rotation(mesh, "node-1")?;
            wait_rotated(mesh, &[("node-1", 1)], PATIENCE)
        },
    )?;
    assert_one_key_per_peer(mesh, &nodes)?;
    let events = mesh.kubectl(&[
        "get",
        "events",
        "-n",
        "default",
        "--field-selector",
        "involvedObject.name=node-1",
        "-o",
        "custom-columns=REASON:.reason",
    ])?;
    for reason in [
        "RotationStarted",
        "RotationPrepared",
        "RotationSwitched",
        "RotationCompleted",
    ] {
        assert!(events.contains(reason), "no {reason} event in {events}");
    }
    let status = json(mesh, &["get", "meshpeer", "node-1"])?;
    let rotating = status["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Rotating")
        .cloned()
        .context("Rotating condition")?;
    assert_eq!(rotating["status"], "False", "{rotating}");
    assert_eq!(rotating["reason"], "Completed", "{rotating}");
    assert_eq!(status["status"]["rotation"]["phase"], "Completed");

    // 2. Every node at once, through the Mesh.
    under_traffic(mesh, "every node via the Mesh", &pods, None, || {
        set_rotation_policy(mesh, &format!(r#"{{"requestedAt":"{}"}}"#, now_rfc3339()?))?;
        wait_rotated(
            mesh,
            &[("node-1", 2), ("node-2", 1), ("node-3", 1)],
            PATIENCE,
        )
    })?;
    for node in nodes {
        let g = generation(mesh, node)?;
        assert!(g >= 1, "{node} is at generation {g}");
    }
    assert_one_key_per_peer(mesh, &nodes)?;
    let [plain] = cap.stop(&[plain_filter])?[..] else {
        bail!("capture counts");
    };
    assert_eq!(plain, 0, "pod packets in the clear during the rotations");

    // 3. The rotating agent killed right after it generated the next key, and again right
    //    after it switched, the operator with the first kill: the rotation completes, traffic
    //    resumes, nothing goes in the clear.
    //    node-3 cannot reach node-2 until the second restart (its UDP dropped in node-3's
    //    namespace), so it cannot move to node-2's next key and node-2 stays Switched until
    //    the kill: with every peer free to move, a restarted agent went through Switched in
    //    60 ms, too fast to catch.
    let cap = mesh.capture("rotation-crash")?;
    let before = generation(mesh, "node-2")?;
    let pinger = start_pinger(mesh, "pod-1", "pod-2", &ips[1])?;
    let node2 = mesh.node_ip("node-2");
    for cmd in [
        "add table inet rotation-test".to_owned(),
        "add chain inet rotation-test input { type filter hook input priority 0; }".to_owned(),
        "add chain inet rotation-test output { type filter hook output priority 0; }".to_owned(),
        format!("add rule inet rotation-test input ip saddr {node2} meta l4proto udp drop"),
        format!("add rule inet rotation-test output ip daddr {node2} meta l4proto udp drop"),
    ] {
        ok(mesh.exec("node-3", &["nft", &cmd]))?;
    }
    std::thread::sleep(Duration::from_secs(1));
    request_node_rotation(mesh, "node-2")?;
    for phase in ["prepared", "switched"] {
        wait_until(
            &format!("node-2's key file to say {phase}"),
            Duration::from_secs(60),
            || {
                mesh.key_file("node-2")
                    .is_ok_and(|k| k["phase"]["name"] == phase)
            },
        )?;
        mesh.script(&["stop-agent", "node-2", "KILL"])?;
        if phase == "prepared" {
            // The operator too: its grants and approvals live in status.
            mesh.script(&["stop-operator", "KILL"])?;
            mesh.script(&["start-operator"])?;
        }
        mesh.script(&["start-agent", "node-2"])?;
    }
    ok(mesh.exec("node-3", &["nft", "delete table inet rotation-test"]))?;
    let took = wait_rotated(mesh, &[("node-2", before + 1)], PATIENCE)?;
    wait_until("pod-1 reaches pod-2 again", Duration::from_secs(60), || {
        mesh.ping("pod-1", &ips[1])
    })?;
    std::thread::sleep(Duration::from_secs(2));
    let result = pinger.stop()?;
    assert!(
        all_pairs(mesh, &pods).is_empty(),
        "pods unreachable after the crash"
    );
    assert_one_key_per_peer(mesh, &nodes)?;
    let [plain] = cap.stop(&[plain_filter])?[..] else {
        bail!("capture counts");
    };
    report(&format!(
        "rotation: node-2's agent killed after Prepared (with the operator) and after Switched: completed {:.1} s after the last restart; longest gap between replies {:.2} s ({} of {} pings lost across two agent restarts)",
        took.as_secs_f64(),
        result.longest_gap,
        result.lost.len(),
        result.sent
    ));
    assert_eq!(
        plain, 0,
        "pod packets in the clear while the agent was down"
    );

    // 4. 20 rotations in a row leave no stale peer, key file or route behind.
    let routes_before: Vec<String> = nodes
        .iter()
        .map(|n| ok(mesh.exec(n, &["ip", "route", "show", "proto", "87"])))
        .collect::<Result<_>>()?;
    let start_gen = generation(mesh, "node-3")?;
    let pinger = start_pinger(mesh, "pod-1", "pod-3", &ips[2])?;
    let back = start_pinger(mesh, "pod-3", "pod-1", &ips[0])?;
    let started = Instant::now();
    for i in 1..=20 {
        // requestedAt has one-second resolution: a key created in the same second as the
        // request would not be older than it.
        std::thread::sleep(Duration::from_millis(1100));
        request_node_rotation(mesh, "node-3")?;
        wait_rotated(mesh, &[("node-3", start_gen + i)], PATIENCE)?;
    }
    let elapsed = started.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let results = [pinger.stop()?, back.stop()?];
    report(&format!(
        "rotation: 20 rotations of node-3 in a row in {:.1} s; pings both ways sent {}, lost {}, longest gap {:.3} s",
        elapsed.as_secs_f64(),
        results.iter().map(|r| r.sent).sum::<u64>(),
        results.iter().map(|r| r.lost.len()).sum::<usize>(),
        results.iter().map(|r| r.longest_gap).fold(0.0, f64::max)
    ));
    for r in &results {
        assert!(r.lost.is_empty(), "{}: lost {:?}", r.label, r.lost);
    }
    assert_eq!(generation(mesh, "node-3")?, start_gen + 20);
    assert_one_key_per_peer(mesh, &nodes)?;
    for (node, before) in nodes.iter().zip(&routes_before) {
        let now = ok(mesh.exec(node, &["ip", "route", "show", "proto", "87"]))?;
        assert_eq!(&now, before, "{node}'s routes changed");
        let k = mesh.key_file(node)?;
        for leftover in ["next", "previous", "phase"] {
            assert!(
                k[leftover].is_null(),
                "{node}'s key file keeps {leftover}: {k}"
            );
        }
        let mut files: Vec<String> =
            std::fs::read_dir(mesh.dir.join(format!("nodes/{node}/state")))?
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
        files.sort();
        // The key, and the device saved for a restart: no temporary file, no retired key.
        assert_eq!(
            files,
            vec!["device.json", "wireguard-key.json"],
            "{node}'s state directory"
        );
    }

    // 5. An external wireguard-go peer that only knows node-3's old key keeps working
    //    through the rotation and the grace period, and is not answered after it.
    // 6. Then node-2's key is revoked: the laptop, holding only the old key, loses node-2
    //    the moment the rotation completes; no grace period.
    external_peer_through_rotation(mesh, ips)?;
    Ok(())
}

/// Step 6 with the laptop of step 5, configured with every node's current key.
fn external_peer_through_revoke(mesh: &Mesh, ext: &ExternalPeer<'_>, ips: &[String]) -> Result<()> {
    wait_until("the laptop reaches pod-2", Duration::from_secs(30), || {
        ext.ping(&ips[1])
    })?;
    let before = generation(mesh, "node-2")?;
    let t = Instant::now();
    request_rotation(mesh, "node-2", true)?;
    wait_rotated(mesh, &[("node-2", before + 1)], PATIENCE)?;
    let took = t.elapsed().as_secs_f64();
    let status = json(mesh, &["get", "meshpeer", "node-2"])?;
    let rotation = &status["status"]["rotation"];
    if rotation["revoke"] != true || !rotation["oldKeyAnsweredUntil"].is_null() {
        bail!("node-2's rotation is not a revocation: {rotation}");
    }
    // Nodes moved to the new key with the rotation; the laptop still holds the old one.
    for _ in 0..3 {
        if ext.ping(&ips[1]) {
            bail!("the laptop, holding only node-2's revoked key, still reaches pod-2");
        }
    }
    // Every other node still reaches node-2's pod: the revocation was hitless for them.
    if !mesh.ping("pod-1", &ips[1]) || !mesh.ping("pod-3", &ips[1]) {
        bail!("a node lost pod-2 after node-2's key was revoked");
    }
    ext.configure_nodes()?;
    wait_until(
        "the laptop reaches pod-2 with the new key",
        Duration::from_secs(30),
        || ext.ping(&ips[1]),
    )?;
    report(&format!(
        "rotation: revoke of node-2's key completed in {took:.1} s; an external peer holding only the old key no longer reaches node-2, nodes do"
    ));
    Ok(())
}

fn external_peer_through_rotation(mesh: &Mesh, ips: &[String]) -> Result<()> {
    let ext = ExternalPeer::start(mesh, "laptop", "10.250.0.7")?;
    let configured = ext.configure_nodes()?;
    let old_key = configured
        .iter()
        .find(|(n, _)| n == "node-3")
        .map(|(_, k)| k.clone())
        .context("node-3 configured")?;
    wait_until("the laptop reaches pod-3", Duration::from_secs(30), || {
        ext.ping(&ips[2])
    })?;
    let ping = Pinger::spawn(
        ext.exec(&["ping", "-D", "-i", "0.05", "-I", &ext.address, &ips[2]]),
        "laptop -> pod-3".into(),
    )?;
    let before = generation(mesh, "node-3")?;
    request_node_rotation(mesh, "node-3")?;
    wait_rotated(mesh, &[("node-3", before + 1)], PATIENCE)?;
    let status = json(mesh, &["get", "meshpeer", "node-3"])?;
    let rotation = &status["status"]["rotation"];
    let until = rotation["oldKeyAnsweredUntil"]
        .as_str()
        .with_context(|| format!("no grace deadline in {rotation}"))?
        .to_owned();
    wait_until(
        "node-3's status to name the laptop as still on the old key",
        Duration::from_secs(20),
        || {
            json(mesh, &["get", "meshpeer", "node-3"]).is_ok_and(|s| {
                s["status"]["rotation"]["externalPeersOnOldKey"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|v| v == "laptop"))
            })
        },
    )?;
    // Within the grace period both directions work under the old key.
    assert!(
        ext.ping(&ips[2]),
        "the laptop lost pod-3 within the grace period"
    );
    assert!(
        mesh.ping("pod-3", &ext.address),
        "pod-3 lost the laptop within the grace period"
    );
    let gap = ping.stop()?.longest_gap;
    report(&format!(
        "rotation: external wireguard-go peer on node-3's old key through the rotation: longest gap between replies {gap:.2} s; old key answered until {until}"
    ));
    assert!(gap < 1.0, "the laptop's pings stalled for {gap:.2} s");

    // After the grace period the old key is deleted: the laptop is not answered under it.
    wait_until("the grace period to end", Duration::from_secs(90), || {
        json(mesh, &["get", "meshpeer", "node-3"])
            .is_ok_and(|s| s["status"]["rotation"]["oldKeyAnsweredUntil"].is_null())
    })?;
    // Forget the session, so the next packet needs a handshake under the old key.
    ext.remove_peer(&old_key)?;
    let node3 = json(mesh, &["get", "meshpeer", "node-3"])?;
    let approved = &node3["status"]["approved"];
    let allowed: Vec<&str> = approved["allowedIPs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str())
        .collect();
    ext.set_peer(
        &old_key,
        approved["endpoint"].as_str().unwrap_or_default(),
        &allowed,
    )?;
    for _ in 0..3 {
        assert!(
            !ext.ping(&ips[2]),
            "node-3 still answers handshakes under its retired key"
        );
    }
    // Configured with the new key, as its administrator would, the laptop is back.
    ext.remove_peer(&old_key)?;
    ext.configure_nodes()?;
    wait_until(
        "the laptop reaches pod-3 with the new key",
        Duration::from_secs(30),
        || ext.ping(&ips[2]),
    )?;
    external_peer_through_revoke(mesh, &ext, ips)
}
