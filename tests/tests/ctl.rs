//! End to end: `kubectl wgmesh` against a 3-node mesh in network namespaces (`hack/mesh.sh`:
//! a real API server, real agents and devices), found by kubectl as a plugin on `PATH`.
//!
//! In order: `status` healthy; Events in `kubectl describe` for every wgmesh kind; `graph`
//! (SVG parsed, DOT) matching the mesh; `doctor`; `rotate --all --wait`; `peer-config`
//! brought up with `wg-quick` and wireguard-go in a namespace of its own, reaching a pod;
//! then an agent stopped: `status` and `doctor` fail naming its node, and recover when it
//! is back.

use anyhow::{Context, Result, bail, ensure};
use std::collections::BTreeSet;
use std::process::Output;
use std::time::Duration;
use wgmesh_ctl::prom;
use wgmesh_tests::netns::*;
use wgmesh_tests::repo_root;

#[test]
fn kubectl_wgmesh_against_a_real_mesh() -> Result<()> {
    assert!(
        is_root(),
        "the end-to-end test needs root (network namespaces); run hack/test.sh as root"
    );
    let (mesh, ips) = Mesh::up_with_pods(3)?;
    mesh.check(steps(&mesh, &ips))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn status_json(mesh: &Mesh) -> Result<(i32, serde_json::Value)> {
    let o = mesh.plugin(&["status", "-o", "json"])?;
    let v = serde_json::from_slice(&o.stdout)
        .with_context(|| format!("status -o json is not JSON: {}", text(&o)))?;
    Ok((o.status.code().unwrap_or(-1), v))
}

fn steps(mesh: &Mesh, ips: &[String]) -> Result<()> {
    // 1. Healthy: exit 0, every node Ready with its agent up, all six pairs fresh, no
    //    finding (a device configuring a peer of the mesh just up is a passing warning).
    wait_until(
        "kubectl wgmesh status: healthy, no findings",
        Duration::from_secs(60),
        || {
            status_json(mesh)
                .is_ok_and(|(c, v)| c == 0 && v["findings"].as_array().is_some_and(Vec::is_empty))
        },
    )?;
    let o = mesh.plugin(&["status"])?;
    let screen = text(&o);
    println!("$ kubectl wgmesh status\n{screen}");
    ensure!(
        o.status.success(),
        "status failed on a healthy mesh:\n{screen}"
    );
    ensure!(screen.contains("Healthy: no findings."), "{screen}");
    let (code, v) = status_json(mesh)?;
    ensure!(code == 0 && v["healthy"] == true, "{v:#}");
    let nodes = v["nodes"].as_array().context("nodes")?;
    ensure!(nodes.len() == 3, "{v:#}");
    ensure!(
        nodes
            .iter()
            .all(|n| n["ready"] == true && n["agent"] == "up"),
        "{v:#}"
    );
    let pairs = v["pairs"].as_array().context("pairs")?;
    ensure!(pairs.len() == 6, "{v:#}");
    ensure!(
        pairs
            .iter()
            .all(|p| p["state"] == "fresh" && p["handshakeAge"].as_u64().is_some_and(|a| a < 180)),
        "{v:#}"
    );
    ensure!(
        v["pools"].as_array().is_some_and(|p| !p.is_empty()),
        "{v:#}"
    );

    // 2. Events that `kubectl describe` shows, for every kind. Host-gw for the on-link
    //    peers changes every node's paths: PathChanged on each MeshPeerReport.
    mesh.patch_mesh(r#"{"transport":{"hostGateway":"OnLink"}}"#)?;
    let described = wait_until(
        "a PathChanged Event in kubectl describe meshpeerreport node-1",
        Duration::from_secs(60),
        || {
            mesh.kubectl(&["describe", "meshpeerreport", "node-1"])
                .is_ok_and(|d| d.contains("PathChanged"))
        },
    );
    // Status reads paths from the reports: a node's first paths come with its report's
    // next write, within a minute.
    let shown = described.and_then(|_| {
        wait_until(
            "status to show the six host-gw pairs as plaintext",
            Duration::from_secs(90),
            || {
                status_json(mesh)
                    .is_ok_and(|(_, v)| v["plaintext"].as_array().is_some_and(|p| p.len() == 6))
            },
        )
    });
    mesh.patch_mesh(r#"{"transport":{"hostGateway":"Never"}}"#)?;
    shown?;
    let pool = mesh.kubectl(&["get", "podcidrpools", "-o", "name"])?;
    let pool = pool
        .lines()
        .next()
        .and_then(|l| l.split('/').nth(1))
        .context("a pool")?
        .to_owned();
    for (kind, name, expected) in [
        ("mesh", "default", ["Valid", "wgmesh-operator"]),
        ("meshpeer", "node-1", ["PeerReady", "wgmesh-operator"]),
        ("podcidrpool", pool.as_str(), ["Normal", "wgmesh-operator"]),
        ("meshpeerreport", "node-2", ["PathChanged", "wgmesh-agent"]),
    ] {
        let d = mesh.kubectl(&["describe", kind, name])?;
        let events = d.split("\nEvents:").nth(1).unwrap_or_default();
        for what in expected {
            ensure!(
                events.contains(what),
                "kubectl describe {kind} {name}: no Event with {what}:\n{d}"
            );
        }
    }
    wait_until(
        "status healthy after host-gw off",
        Duration::from_secs(60),
        || {
            status_json(mesh)
                .is_ok_and(|(c, v)| c == 0 && v["plaintext"].as_array().is_some_and(Vec::is_empty))
        },
    )?;

    // 3. graph: SVG (parsed) and DOT, with a node per node and an edge per pair.
    let svg_path = mesh.dir.join("mesh.svg");
    let o = mesh.plugin(&["graph", "-o", &svg_path.to_string_lossy()])?;
    ensure!(o.status.success(), "graph: {}", text(&o));
    let svg = std::fs::read_to_string(&svg_path)?;
    let doc = roxmltree::Document::parse(&svg).context("graph wrote malformed SVG")?;
    ensure!(doc.root_element().tag_name().name() == "svg");
    let drawn: BTreeSet<&str> = doc
        .descendants()
        .filter(|n| n.attribute("class") == Some("node"))
        .filter_map(|n| n.attribute("data-node"))
        .collect();
    ensure!(
        drawn == BTreeSet::from(["node-1", "node-2", "node-3"]),
        "nodes drawn: {drawn:?}"
    );
    let edges: BTreeSet<(String, String)> = doc
        .descendants()
        .filter(|n| n.attribute("class") == Some("edge"))
        .filter_map(|n| {
            Some((
                n.attribute("data-from")?.to_owned(),
                n.attribute("data-to")?.to_owned(),
            ))
        })
        .collect();
    // One edge per pair of nodes, and every pair a report names among them.
    let all: BTreeSet<(String, String)> = [
        ("node-1", "node-2"),
        ("node-1", "node-3"),
        ("node-2", "node-3"),
    ]
    .iter()
    .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
    .collect();
    let reports: serde_json::Value =
        serde_json::from_str(&mesh.kubectl(&["get", "meshpeerreports", "-o", "json"])?)?;
    for r in reports["items"].as_array().into_iter().flatten() {
        let from = r["metadata"]["name"].as_str().unwrap_or_default();
        for p in r["spec"]["paths"].as_array().into_iter().flatten() {
            let to = p["peer"].as_str().unwrap_or_default();
            let (a, b) = if from <= to { (from, to) } else { (to, from) };
            ensure!(
                all.contains(&(a.to_owned(), b.to_owned())),
                "{from}'s report names {to}, not a pair of the mesh"
            );
        }
    }
    ensure!(edges == all, "edges drawn {edges:?}");
    let o = mesh.plugin(&["graph", "--format", "dot"])?;
    let dot = String::from_utf8_lossy(&o.stdout).into_owned();
    ensure!(
        o.status.success() && dot.starts_with("graph wgmesh {"),
        "{dot}"
    );
    ensure!(dot.matches(" -- ").count() == 3, "{dot}");
    std::fs::copy(&svg_path, repo_root().join("target/wgmesh-graph.svg"))?;

    // 4. doctor on a healthy mesh: no error (the harness runs no DaemonSet: a warning).
    let o = mesh.plugin(&["doctor"])?;
    println!("$ kubectl wgmesh doctor\n{}", text(&o));
    ensure!(
        o.status.success(),
        "doctor on a healthy mesh:\n{}",
        text(&o)
    );
    ensure!(
        text(&o).contains("[ ok ] CRDs") && text(&o).contains("[ ok ] operator leader"),
        "{}",
        text(&o)
    );

    // 5. rotate --all --wait: returns once every node has rotated.
    let before = generations(mesh)?;
    let o = mesh.plugin(&["rotate", "--all", "--wait", "--timeout", "300"])?;
    println!("$ kubectl wgmesh rotate --all --wait\n{}", text(&o));
    ensure!(o.status.success(), "rotate --all --wait:\n{}", text(&o));
    let after = generations(mesh)?;
    for (node, g) in &before {
        ensure!(
            after.iter().any(|(n, h)| n == node && *h == g + 1),
            "{node} did not rotate once: before {before:?}, after {after:?}"
        );
    }
    ensure!(text(&o).contains("3 of 3 node(s) rotated"), "{}", text(&o));

    // 6. Every metric the chart's dashboard and alert rules query, in what the components
    //    serve (scraped: an agent through the node proxy, the operator on its address).
    monitoring_metrics(mesh)?;

    // 7. peer-config: an external machine brought up with wg-quick (wireguard-go) from the
    //    printed configuration reaches a pod, and the pod reaches it.
    peer_config(mesh, ips)?;

    // 8. An agent stopped: status and doctor fail, naming its node; back when it is.
    mesh.script(&["stop-agent", "node-2"])?;
    let o = mesh.plugin(&["status"])?;
    let screen = text(&o);
    println!("$ kubectl wgmesh status   # node-2's agent stopped\n{screen}");
    ensure!(
        o.status.code() == Some(1),
        "status with node-2's agent stopped:\n{screen}"
    );
    ensure!(
        screen.contains("meshpeer/node-2: the agent does not answer"),
        "{screen}"
    );
    let o = mesh.plugin(&["doctor"])?;
    ensure!(
        o.status.code() == Some(1),
        "doctor with an agent stopped:\n{}",
        text(&o)
    );
    mesh.script(&["start-agent", "node-2"])?;
    wait_until(
        "status healthy with node-2's agent back",
        Duration::from_secs(60),
        || mesh.plugin(&["status"]).is_ok_and(|o| o.status.success()),
    )?;
    Ok(())
}

fn monitoring_metrics(mesh: &Mesh) -> Result<()> {
    let agent = mesh.kubectl(&["get", "--raw", "/api/v1/nodes/node-1:9091/proxy/metrics"])?;
    let operator = ok(mesh.exec(
        "cp",
        &[
            "curl",
            "-sf",
            &format!("http://{}.2:9090/metrics", mesh.net),
        ],
    ))?;
    let mut exported = prom::exported_names(&agent);
    exported.extend(prom::exported_names(&operator));
    ensure!(
        exported.contains("wgmesh_agent_device_up") && exported.contains("wgmesh_operator_leader"),
        "the scrapes hold no wgmesh metrics"
    );
    let files = repo_root().join("charts/wgmesh/files");
    let rules: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(
        files.join("prometheus-rules.yaml"),
    )?)?;
    let mut queried = BTreeSet::new();
    for group in rules["groups"].as_sequence().into_iter().flatten() {
        for rule in group["rules"].as_sequence().into_iter().flatten() {
            let expr = rule["expr"].as_str().context("a rule without expr")?;
            queried.extend(prom::names_in_expr(expr, "wgmesh_"));
        }
    }
    let rule_names = queried.len();
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        files.join("grafana-dashboard.json"),
    )?)?;
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    for e in &exprs {
        queried.extend(prom::names_in_expr(e, "wgmesh_"));
    }
    let missing: Vec<&String> = queried.iter().filter(|n| !exported.contains(*n)).collect();
    ensure!(
        missing.is_empty(),
        "queried by the dashboard or the alert rules but not exported: {missing:?}"
    );
    println!(
        "monitoring: {} metrics queried ({rule_names} by the alert rules, {} dashboard queries), all exported",
        queried.len(),
        exprs.len()
    );
    Ok(())
}

/// Every `expr` and `query` string in a Grafana dashboard.
fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "query", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// Each node's key generation, as its `MeshPeer` says.
fn generations(mesh: &Mesh) -> Result<Vec<(String, i64)>> {
    let peers: serde_json::Value =
        serde_json::from_str(&mesh.kubectl(&["get", "meshpeers", "-o", "json"])?)?;
    Ok(peers["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| !p["spec"]["node"].is_null())
        .map(|p| {
            (
                p["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                p["status"]["keyGeneration"].as_i64().unwrap_or(-1),
            )
        })
        .collect())
}

fn peer_config(mesh: &Mesh, ips: &[String]) -> Result<()> {
    let address = "10.250.0.9";
    let machine = Machine::add(mesh, "wgq", 51)?;
    let iface = format!("wgq{}", mesh.id);
    let conf = mesh.dir.join(format!("{iface}.conf"));
    let o = mesh.plugin(&[
        "peer-config",
        "phone",
        "--allowed-ips",
        &format!("{address}/32"),
        "--internal",
        "-o",
        &conf.to_string_lossy(),
    ])?;
    ensure!(o.status.success(), "peer-config: {}", text(&o));
    let config = std::fs::read_to_string(&conf)?;
    println!(
        "$ kubectl wgmesh peer-config phone --allowed-ips {address}/32 --internal\n{}",
        config
            .lines()
            .map(|l| if l.starts_with("PrivateKey") {
                "PrivateKey = (hidden)"
            } else {
                l
            })
            .collect::<Vec<_>>()
            .join("\n")
    );
    use std::os::unix::fs::PermissionsExt;
    ensure!(
        std::fs::metadata(&conf)?.permissions().mode() & 0o077 == 0,
        "the configuration holds a private key and is readable by others"
    );
    ensure!(config.matches("[Peer]").count() == 3, "{config}");
    // The private key was made here: the cluster has only the public one.
    let private = config
        .lines()
        .find_map(|l| l.strip_prefix("PrivateKey = "))
        .context("a PrivateKey")?;
    let public = wg_pubkey(private)?;
    let peer = mesh.kubectl(&["get", "meshpeer", "phone", "-o", "json"])?;
    ensure!(peer.contains(&public) && !peer.contains(private));

    let up = machine
        .exec(&["wg-quick", "up", &conf.to_string_lossy()])
        .env("WG_QUICK_USERSPACE_IMPLEMENTATION", "wireguard-go")
        .output()?;
    ensure!(up.status.success(), "wg-quick up: {}", text(&up));
    let reached = wait_until("the phone reaches pod-1", Duration::from_secs(30), || {
        run(machine.exec(&["ping", "-c", "1", "-W", "2", &ips[0]]))
            .is_ok_and(|o| o.status.success())
    })
    .and_then(|_| {
        wait_until("pod-3 reaches the phone", Duration::from_secs(30), || {
            mesh.ping("pod-3", address)
        })
    });
    let _ = machine
        .exec(&["wg-quick", "down", &conf.to_string_lossy()])
        .env("WG_QUICK_USERSPACE_IMPLEMENTATION", "wireguard-go")
        .output();
    reached?;
    mesh.kubectl(&["delete", "meshpeer", "phone"])?;
    // A refused request leaves nothing behind.
    let o = mesh.plugin(&["peer-config", "tablet", "--allowed-ips", "192.0.2.1/32"])?;
    ensure!(
        !o.status.success(),
        "a peer outside the Mesh's ranges was approved"
    );
    ensure!(text(&o).contains("refused"), "{}", text(&o));
    if mesh.kubectl(&["get", "meshpeer", "tablet"]).is_ok() {
        bail!("the refused MeshPeer was left behind");
    }
    Ok(())
}
