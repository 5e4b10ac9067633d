//! End to end: a mesh-wide key rotation on an idle mesh (`hack/mesh.sh`, five nodes, no
//! pods, no traffic) completes on every node with no laggard, twice: right after the mesh
//! comes up, while the sessions its devices opened on their own are current, and again once
//! every session is past 180 s after its handshake, when WireGuard has dropped it.
//!
//! A node counts a peer as moved to its next key once a session under that key is up; on
//! an idle mesh nothing but the devices themselves starts one. Times (total, and when each
//! node completed) are printed and appended to `target/wgmesh-e2e-report.txt`.

use anyhow::{Context, Result, bail};
use std::time::{Duration, Instant, SystemTime};
use wgmesh_tests::netns::*;

const NODES: usize = 5;

/// How long a mesh-wide rotation may take before the test gives up: a bound, not a
/// measure. A node that waited for a laggard would take the 2-minute move timeout; the
/// test fails as soon as one names a laggard.
const PATIENCE: Duration = Duration::from_secs(300);

/// How long a WireGuard session carries data after its handshake (`REJECT_AFTER_TIME`).
const SESSION_LIFETIME: Duration = Duration::from_secs(180);

fn peers(mesh: &Mesh) -> Result<Vec<serde_json::Value>> {
    let v: serde_json::Value =
        serde_json::from_str(&mesh.kubectl(&["get", "meshpeers", "-o", "json"])?)?;
    Ok(v["items"].as_array().cloned().unwrap_or_default())
}

/// Requests a rotation of every node through the `Mesh` and waits until every node
/// completed one more; fails at once if a node names a laggard. Returns the report line.
fn rotate_all(mesh: &Mesh, nodes: &[String], title: &str) -> Result<String> {
    // Read again if the API server is slow to answer on a loaded machine.
    let mut items = Vec::new();
    wait_until("the peers", Duration::from_secs(30), || {
        peers(mesh).map(|p| items = p).is_ok()
    })?;
    let before: Vec<i64> = nodes
        .iter()
        .map(|n| {
            items
                .iter()
                .find(|p| p["metadata"]["name"] == n.as_str())
                .and_then(|p| p["status"]["keyGeneration"].as_i64())
                .with_context(|| format!("{n}'s key generation"))
        })
        .collect::<Result<_>>()?;
    // In whole seconds, as key creation times are recorded (see docs/rotation.md). A key
    // made in the second of the request is not older than it, and rightly does not rotate
    // (a node that joined a moment before the request has a fresh key): the request waits
    // until the clock is past the newest key's second. (A CI run failed on this: node-5's
    // first key was made in the second of the request, and the test waited for it.)
    let newest_key = items
        .iter()
        .filter_map(|p| p["status"]["keyCreatedAt"].as_str())
        .filter_map(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
        .map(|t| t.as_second())
        .max()
        .unwrap_or(0);
    while i64::try_from(unix_now()?)? <= newest_key {
        std::thread::sleep(Duration::from_millis(100));
    }
    let requested = k8s_openapi::jiff::Timestamp::from_second(i64::try_from(unix_now()?)?)?;
    let started = Instant::now();
    mesh.patch_mesh(&format!(
        r#"{{"keyRotation":{{"requestedAt":"{requested}"}}}}"#
    ))?;
    let mut laggards = None;
    // When each node was first seen completed, from the request (polled: a fraction of a
    // second late at most).
    let mut completed: Vec<(String, f64)> = Vec::new();
    wait_until("every node to complete its rotation", PATIENCE, || {
        let Ok(items) = peers(mesh) else {
            return false;
        };
        for (node, gen0) in nodes.iter().zip(&before) {
            let Some(p) = items
                .iter()
                .find(|p| p["metadata"]["name"] == node.as_str())
            else {
                continue;
            };
            let rotation = &p["status"]["rotation"];
            if rotation["laggards"]
                .as_array()
                .is_some_and(|l| !l.is_empty())
            {
                laggards = Some(format!("{node}: {}", rotation["laggards"]));
                return true;
            }
            // The agent's phase, then the operator's condition, which follows it.
            let reason = p["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == "Rotating")
                .map(|c| c["reason"].clone());
            let done = p["status"]["keyGeneration"].as_i64().unwrap_or(0) > *gen0
                && rotation["phase"] == "Completed"
                && reason.is_some_and(|r| r == "Completed");
            if done && !completed.iter().any(|(n, _)| n == node) {
                completed.push((node.clone(), started.elapsed().as_secs_f64()));
            }
        }
        completed.len() == nodes.len()
    })?;
    if let Some(l) = laggards {
        bail!("{title}: the rotation went on without a peer ({l})");
    }
    let total = started.elapsed();
    let items = peers(mesh)?;
    for node in nodes {
        let p = items
            .iter()
            .find(|p| p["metadata"]["name"] == node.as_str())
            .with_context(|| format!("{node}'s peer"))?;
        let rotating = p["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "Rotating")
            .cloned()
            .unwrap_or_default();
        assert_eq!(
            rotating["reason"], "Completed",
            "{title}: {node}: {rotating}"
        );
    }
    // Nodes rotate one after another (maxConcurrent 1): a node's time is from the previous
    // completion (or the request) to its own.
    let mut per_node = Vec::new();
    let mut previous = 0.0;
    for (_, at) in &completed {
        per_node.push(at - previous);
        previous = *at;
    }
    let mean = per_node.iter().sum::<f64>() / per_node.len() as f64;
    let slowest = per_node.iter().copied().fold(0.0, f64::max);
    let order: Vec<String> = completed
        .iter()
        .map(|(n, at)| format!("{n} at {at:.1} s"))
        .collect();
    Ok(format!(
        "idle rotation: {title}: {} nodes rotated one at a time in {:.1} s, no laggard; {mean:.1} s per node on average, {slowest:.1} s at most ({})",
        nodes.len(),
        total.as_secs_f64(),
        order.join(", ")
    ))
}

/// The newest handshake of any session on any node, by `wg show`, and where it is.
fn newest_handshake(mesh: &Mesh, nodes: &[String]) -> Result<(u64, String)> {
    let mut newest = (0, String::new());
    for node in nodes {
        let out = ok(mesh.exec(
            node,
            &["wg", "show", &mesh.iface(node), "latest-handshakes"],
        ))?;
        for line in out.lines() {
            let mut fields = line.split_whitespace();
            let peer = fields.next().unwrap_or_default();
            let at: u64 = fields
                .next()
                .and_then(|t| t.parse().ok())
                .with_context(|| format!("wg show latest-handshakes line {line:?}"))?;
            if at > newest.0 {
                newest = (at, format!("{node} with {peer}"));
            }
        }
    }
    Ok(newest)
}

fn unix_now() -> Result<u64> {
    Ok(SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)?
        .as_secs())
}

/// Waits until every session on every node is past its lifetime, reading `wg show` again
/// whenever the wait ends: a handshake made after a reading moves the end on. Fails if
/// handshakes go on for twice a session's lifetime: the mesh is not idle.
fn wait_until_idle(mesh: &Mesh, nodes: &[String]) -> Result<()> {
    let give_up = Instant::now() + 2 * SESSION_LIFETIME;
    let mut last = None;
    loop {
        let (newest, where_) = newest_handshake(mesh, nodes)?;
        if last.is_some_and(|l| l != newest) {
            eprintln!("a later handshake: {where_} at {newest}");
        }
        last = Some(newest);
        let idle_at = newest + SESSION_LIFETIME.as_secs() + 5;
        let now = unix_now()?;
        if now >= idle_at {
            return Ok(());
        }
        if Instant::now() > give_up {
            bail!(
                "the mesh is not idle: handshakes went on for {} s (the newest: {where_}, {} s ago)",
                2 * SESSION_LIFETIME.as_secs(),
                now.saturating_sub(newest)
            );
        }
        std::thread::sleep(Duration::from_secs(idle_at - now));
    }
}

#[test]
fn a_mesh_wide_rotation_on_an_idle_mesh_has_no_laggard() -> Result<()> {
    assert!(
        is_root(),
        "the end-to-end test needs root (network namespaces); run hack/test.sh as root"
    );
    let mesh = Mesh::up(NODES)?;
    let nodes: Vec<String> = (1..=NODES).map(|i| format!("node-{i}")).collect();
    mesh.check(steps(&mesh, &nodes))
}

fn steps(mesh: &Mesh, nodes: &[String]) -> Result<()> {
    wait_until("every node's peer", Duration::from_secs(60), || {
        peers(mesh).is_ok_and(|p| {
            p.iter()
                .filter(|p| p["status"]["keyGeneration"].is_i64())
                .count()
                == nodes.len()
        })
    })?;
    let line = rotate_all(mesh, nodes, "fresh sessions")?;
    report(&line);

    // Idle until every session is too old to carry data.
    wait_until_idle(mesh, nodes)?;
    let line = rotate_all(mesh, nodes, "sessions past 180 s")?;
    report(&line);
    Ok(())
}
