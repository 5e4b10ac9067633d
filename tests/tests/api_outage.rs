//! End to end: the API server stops answering for 3 minutes in the middle of a key rotation
//! (`hack/mesh.sh`, three nodes, one pod each), while every pod pings every other at 100 or
//! more per second. Nothing is lost; when the server answers again the rotation completes,
//! with no laggard.
//!
//! The server is frozen with SIGSTOP: its clients' connections stay open and their requests
//! go unanswered, as when the server is cut off by the network. The rotation's timeouts are
//! set to 20 s, far shorter than the outage, so an agent that counted them through the
//! outage would abandon its next key or, once the operator had approved it, switch and
//! retire its old key with every peer a laggard. Figures are printed and appended to
//! `target/wgmesh-e2e-report.txt`.

use anyhow::{Context, Result, bail};
use std::time::{Duration, Instant};
use wgmesh_tests::netns::*;
use wgmesh_tests::ping::{PING_INTERVAL, Pinger, Summary};

/// How long the API server stays frozen.
const OUTAGE: Duration = Duration::from_secs(180);

/// How long the rotation may take once the server is back: a bound, not a measure.
const PATIENCE: Duration = Duration::from_secs(180);

/// The API server of the mesh's control plane, frozen until thawed or dropped.
struct Frozen {
    pid: String,
}

impl Frozen {
    fn freeze(mesh: &Mesh) -> Result<Frozen> {
        let pid = std::fs::read_to_string(mesh.dir.join("cp/pids/kube-apiserver.pid"))
            .context("the mesh's kube-apiserver pid file")?
            .trim()
            .to_owned();
        ok(std::process::Command::new("kill").args(["-STOP", &pid]))?;
        Ok(Frozen { pid })
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.pid])
            .status();
    }
}

/// The phase a key file records: `steady` when it records none.
fn phase(key: &serde_json::Value) -> String {
    key["phase"]["name"].as_str().unwrap_or("steady").to_owned()
}

#[test]
fn a_three_minute_api_outage_mid_rotation_loses_nothing_and_the_rotation_completes() -> Result<()> {
    assert!(
        is_root(),
        "the end-to-end test needs root (network namespaces); run hack/test.sh as root"
    );
    let (mesh, ips) = Mesh::up_with_pods(3)?;
    mesh.check(outage(&mesh, &ips))
}

fn outage(mesh: &Mesh, ips: &[String]) -> Result<()> {
    mesh.patch_mesh(r#"{"keyRotation":{"acknowledgeTimeout":"20s","moveTimeout":"20s"}}"#)?;
    let generation0 = mesh.key_file("node-1")?["generation"].as_i64().unwrap_or(0);
    let mut pingers = Vec::new();
    for i in 1..=3 {
        for (j, ip) in ips.iter().enumerate() {
            if j + 1 != i {
                pingers.push(Pinger::spawn(
                    mesh.exec(
                        &format!("pod-{i}"),
                        &["ping", "-D", "-i", PING_INTERVAL, "-W", "1", ip],
                    ),
                    format!("pod-{i} -> pod-{}", j + 1),
                )?);
            }
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    let requested = ok(std::process::Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]))?;
    mesh.kubectl(&[
        "patch",
        "meshpeer",
        "node-1",
        "--type",
        "merge",
        "-p",
        &format!(
            r#"{{"spec":{{"keyRotation":{{"requestedAt":"{}"}}}}}}"#,
            requested.trim()
        ),
    ])?;
    // The moment the rotation has begun on the node: it has generated its next key.
    let mut key = serde_json::Value::Null;
    wait_until(
        "node-1 to begin its rotation",
        Duration::from_secs(60),
        || {
            key = mesh.key_file("node-1").unwrap_or_default();
            phase(&key) != "steady"
        },
    )?;
    let stopped_in = phase(&key);
    let frozen = Frozen::freeze(mesh)?;
    let frozen_at = Instant::now();
    // Through the outage, the node's own record of its rotation (the API cannot be asked).
    let mut phases = vec![stopped_in.clone()];
    while frozen_at.elapsed() < OUTAGE {
        std::thread::sleep(Duration::from_secs(1));
        let p = phase(&mesh.key_file("node-1")?);
        if phases.last() != Some(&p) {
            phases.push(p);
        }
    }
    let during = mesh.key_file("node-1")?;
    drop(frozen);
    if !during["abandonedAt"].is_null() {
        bail!("node-1 abandoned its next key during the outage: {during}");
    }
    let done = wait_until(
        "node-1's rotation to complete once the API server is back",
        PATIENCE,
        || {
            let Ok(out) = mesh.kubectl(&["get", "meshpeer", "node-1", "-o", "json"]) else {
                return false;
            };
            let Ok(p) = serde_json::from_str::<serde_json::Value>(&out) else {
                return false;
            };
            let s = &p["status"];
            s["keyGeneration"].as_i64().unwrap_or(0) > generation0
                && s["rotation"]["phase"] == "Completed"
                && s["approved"]["publicKey"] == s["publicKey"]
        },
    )?;
    // Traffic goes on a little after the completion: the retired key must not be missed.
    std::thread::sleep(Duration::from_secs(3));
    let pings = Summary::stop(pingers)?;
    let p: serde_json::Value =
        serde_json::from_str(&mesh.kubectl(&["get", "meshpeer", "node-1", "-o", "json"])?)?;
    let laggards = p["status"]["rotation"]["laggards"].clone();
    let (sent, lost, gap, slowest) = (pings.sent, pings.lost, pings.gap, pings.slowest);
    report(&format!(
        "api outage: API server frozen {} s with node-1 {stopped_in} (phases seen during the outage: {}); rotation completed {:.1} s after it was back; {} pingers (each at least {slowest:.0}/s) sent {sent}, lost {lost}, longest gap between replies {gap:.3} s; laggards {laggards}",
        OUTAGE.as_secs(),
        phases.join(" -> "),
        done.as_secs_f64(),
        pings.results.len()
    ));
    pings.assert_nothing_lost("api outage");
    assert!(
        laggards.as_array().is_none_or(Vec::is_empty),
        "the outage made laggards: {laggards}"
    );
    Ok(())
}
