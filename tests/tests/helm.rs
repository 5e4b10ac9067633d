//! End to end: wgmesh installed with `helm install` onto a cluster of real kubelet nodes
//! (`hack/nodes.sh`: containerd and kubelet per node, each node in its own network and mount
//! namespace), running as pods from the image `hack/image.sh` builds.
//!
//! One cluster serves every step, in order: install (operator and agents Ready on every
//! node); test pods on every node reach each other (ping, HTTP) with only WireGuard between
//! the nodes on the underlay; every component runs under the chart's ServiceAccount and a
//! write outside its role is refused; a pod deleted and recreated on another node keeps
//! working; a node added to the cluster gets an agent and joins; `helm upgrade` to a rebuilt
//! image while pods ping across nodes at 100 per second (loss and the longest gap reported,
//! no plaintext on the underlay); `helm uninstall` leaves every node clean and touches
//! nothing else. Figures go to `target/wgmesh-e2e-report.txt`.

use anyhow::{Context, Result, bail};
use std::process::Command;
use std::time::{Duration, Instant};
use wgmesh_tests::netns::{is_root, ok, report, wait_until};
use wgmesh_tests::nodes::Cluster;
use wgmesh_tests::ping::{PING_INTERVAL, PingResult, Pinger};
use wgmesh_tests::repo_root;

mod security;

const NS: &str = "wgmesh-system";
const RELEASE: &str = "wgmesh";
const POOL: &str = "10.244.0.0/16";
const REPOSITORY: &str = "wgmesh.local/wgmesh";
const TEST_NS: &str = "default";

/// Builds the image with `tag` (`hack/image.sh`) and returns the archive's path.
fn image(tag: &str) -> Result<String> {
    let out = ok(Command::new("bash")
        .arg(repo_root().join("hack/image.sh"))
        .args(["--tag", tag]))?;
    let path = out
        .lines()
        .last()
        .context("hack/image.sh printed no path")?;
    Ok(path.trim().to_owned())
}

fn install_args(c: &Cluster, tag: &str) -> Result<Vec<String>> {
    Ok(vec![
        "--namespace".into(),
        NS.into(),
        "--set".into(),
        format!("image.repository={REPOSITORY}"),
        "--set".into(),
        format!("image.tag={tag}"),
        "--set".into(),
        "image.pullPolicy=Never".into(),
        "--set".into(),
        format!("k8sServiceHost={}", c.var("APISERVER_HOST")?),
        "--set".into(),
        format!("k8sServicePort={}", c.var("APISERVER_PORT")?),
        "--set".into(),
        format!("podCIDRPool.cidrs={{{POOL}}}"),
        "--wait".into(),
        "--timeout".into(),
        "5m".into(),
    ])
}

fn nodes(c: &Cluster) -> Result<Vec<String>> {
    Ok(
        c.kubectl(&["get", "nodes", "-o", "jsonpath={.items[*].metadata.name}"])?
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
    )
}

/// Waits until every agent pod is Running and Ready, one on each node, all on `tag`.
fn agents_ready(c: &Cluster, tag: &str) -> Result<()> {
    let want = nodes(c)?.len();
    let image = format!("{REPOSITORY}:{tag}");
    wait_until(
        "an agent Ready on every node",
        Duration::from_secs(180),
        || {
            let Ok(out) = c.kubectl(&[
                "get", "pods", "-n", NS, "-l", "app.kubernetes.io/component=agent", "-o",
                "jsonpath={range .items[*]}{.spec.nodeName} {.spec.containers[0].image} {.status.conditions[?(@.type==\"Ready\")].status} {.metadata.deletionTimestamp}{\"\\n\"}{end}",
            ]) else {
                return false;
            };
            let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
            lines.len() == want
                && lines.iter().all(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.len() == 3 && f[1] == image && f[2] == "True"
                })
        },
    )?;
    Ok(())
}

/// A test pod pinned to `node`: busybox serving `hello from NODE` over HTTP on 8080.
fn test_pod(c: &Cluster, name: &str, node: &str) -> Result<String> {
    let image = c.var("BUSYBOX_IMAGE")?;
    let manifest = format!(
        r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"{name}","namespace":"{TEST_NS}","labels":{{"app":"wgmesh-e2e"}}}},
"spec":{{"nodeName":"{node}","terminationGracePeriodSeconds":1,"containers":[{{"name":"web","image":"{image}","imagePullPolicy":"Never",
"command":["sh","-c","mkdir -p /www && echo hello from {node} > /www/index.html && exec httpd -f -p 8080 -h /www"]}}]}}}}"#
    );
    let mut child = Command::new("kubectl")
        .env("KUBECONFIG", c.kubeconfig()?)
        .args(["apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()?;
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(manifest.as_bytes())?;
    }
    if !child.wait()?.success() {
        bail!("kubectl apply of pod {name} failed");
    }
    c.kubectl(&[
        "wait",
        "-n",
        TEST_NS,
        "--for=condition=Ready",
        "--timeout=120s",
        &format!("pod/{name}"),
    ])?;
    let ip = c.kubectl(&[
        "get",
        "pod",
        "-n",
        TEST_NS,
        name,
        "-o",
        "jsonpath={.status.podIP}",
    ])?;
    if !ip.starts_with("10.244.") {
        bail!("pod {name} got {ip:?}, not an address of the pool {POOL}");
    }
    Ok(ip)
}

fn pod_ping(c: &Cluster, from: &str, ip: &str) -> bool {
    let once = |count: &str| {
        c.kubectl_output(&[
            "exec", "-n", TEST_NS, from, "--", "ping", "-c", count, "-W", "2", ip,
        ])
        .is_ok_and(|o| o.status.success())
    };
    once("1") || once("3")
}

fn pod_http(c: &Cluster, from: &str, ip: &str) -> Result<String> {
    // busybox's wget crashes in these pods; nc is enough for one request.
    c.kubectl(&[
        "exec",
        "-n",
        TEST_NS,
        from,
        "--",
        "sh",
        "-c",
        &format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {ip} 8080"),
    ])
}

/// Every pod pings every other; returns the failures.
fn all_pairs(c: &Cluster, pods: &[(String, String)]) -> Vec<String> {
    let mut failed = Vec::new();
    for (from, _) in pods {
        for (to, ip) in pods {
            if from != to && !pod_ping(c, from, ip) {
                failed.push(format!("{from} -> {to} ({ip})"));
            }
        }
    }
    failed
}

fn pinger(c: &Cluster, from: &str, to: &str, ip: &str) -> Result<Pinger> {
    let cmd = c.pod_exec(
        TEST_NS,
        from,
        &["ping", "-D", "-i", PING_INTERVAL, "-W", "1", ip],
    )?;
    Pinger::spawn(cmd, format!("{from} -> {to}"))
}

/// What a node holds of wgmesh: the things `helm uninstall` must leave none of.
fn leftovers(c: &Cluster, node: &str) -> Result<Vec<String>> {
    let mut found = Vec::new();
    let links = c.on_node(node, &["ip", "-o", "link", "show"])?;
    for name in ["wgmesh0", "wgmesh-br"] {
        if links.contains(&format!(": {name}:")) || links.contains(&format!(": {name}@")) {
            found.push(format!("interface {name}"));
        }
    }
    for family in ["-4", "-6"] {
        let routes = c.on_node(node, &["ip", family, "route", "show", "proto", "87"])?;
        for r in routes.lines().filter(|l| !l.trim().is_empty()) {
            found.push(format!("route {r}"));
        }
    }
    if c.node_exec(node, &["nft", "list", "table", "inet", "wgmesh"])
        .output()?
        .status
        .success()
    {
        found.push("nftables table inet wgmesh".into());
    }
    let cni = c.on_node(node, &["ls", "-A", "/etc/cni/net.d"])?;
    for f in cni.lines().filter(|f| f.contains("wgmesh")) {
        found.push(format!("/etc/cni/net.d/{f}"));
    }
    Ok(found)
}

fn report_pings(what: &str, results: &[PingResult]) -> (u64, usize, f64) {
    let sent: u64 = results.iter().map(|r| r.sent).sum();
    let lost: usize = results.iter().map(|r| r.lost.len()).sum();
    let gap = results.iter().map(|r| r.longest_gap).fold(0.0, f64::max);
    for r in results {
        report(&format!(
            "  {:<28} sent {:>6}  lost {:>5}  longest gap {:>6.3} s  rate {:>5.0}/s",
            r.label,
            r.sent,
            r.lost.len(),
            r.longest_gap,
            r.rate
        ));
    }
    report(&format!(
        "{what}: {sent} pings, {lost} lost, longest gap {gap:.3} s"
    ));
    (sent, lost, gap)
}

#[test]
fn helm_install_upgrade_and_uninstall_on_real_nodes() -> Result<()> {
    if !is_root() {
        bail!("needs root (network namespaces, containerd, kubelet): run it through hack/test.sh");
    }
    let started = Instant::now();
    let first = image("e2e-1")?;
    let second = image("e2e-2")?;
    let size = std::fs::metadata(&first)?.len();
    report(&format!(
        "helm e2e: image archive {:.1} MiB ({first})",
        size as f64 / (1 << 20) as f64
    ));

    let t = Instant::now();
    let c = Cluster::up(3)?;
    report(&format!(
        "helm e2e: 3 kubelet nodes up in {:.0} s",
        t.elapsed().as_secs_f64()
    ));
    c.check(on_cluster(&c, &first, &second))?;
    report(&format!(
        "helm e2e: total {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// Every step on the cluster, in order.
fn on_cluster(c: &Cluster, first: &str, second: &str) -> Result<()> {
    for archive in [first, second] {
        c.script(&["load", archive])?;
    }

    // A file, a route and a table that are not ours, on every node: uninstall must leave them.
    let first_nodes = nodes(c)?;
    for node in first_nodes.clone() {
        c.on_node(
            &node,
            &[
                "sh",
                "-c",
                "echo '{}' > /etc/cni/net.d/99-other-network.conf.canary",
            ],
        )?;
        c.on_node(&node, &["ip", "route", "add", "blackhole", "192.0.2.0/24"])?;
        c.on_node(&node, &["nft", "add", "table", "inet", "other-network"])?;
    }

    // Install.
    let t = Instant::now();
    let mut args = vec![
        "install".to_owned(),
        RELEASE.into(),
        repo_root().join("charts/wgmesh").display().to_string(),
        "--create-namespace".into(),
    ];
    args.extend(install_args(c, "e2e-1")?);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    c.helm(&args)?;
    agents_ready(c, "e2e-1")?;
    c.kubectl(&[
        "wait",
        "--for=condition=Ready",
        "--timeout=120s",
        "nodes",
        "--all",
    ])?;
    c.kubectl(&[
        "wait",
        "--for=condition=Ready",
        "--timeout=120s",
        "meshpeers",
        "--all",
    ])?;
    c.kubectl(&[
        "wait",
        "-n",
        NS,
        "--for=condition=Available",
        "--timeout=120s",
        "deployment",
        "-l",
        "app.kubernetes.io/component=operator",
    ])?;
    report(&format!(
        "helm e2e: helm install → every agent Ready, nodes Ready, peers Ready in {:.1} s",
        t.elapsed().as_secs_f64()
    ));

    // Pods on every node reach each other; only WireGuard crosses the underlay.
    let node_names = nodes(c)?;
    let mut pods = Vec::new();
    for (i, node) in node_names.iter().enumerate() {
        let name = format!("web-{}", i + 1);
        let ip = test_pod(c, &name, node)?;
        pods.push((name, ip));
    }
    let capture = c.capture("pods")?;
    let failed = all_pairs(c, &pods);
    let body = pod_http(c, &pods[0].0, &pods[1].1)?;
    let [plain, wg] = capture.stop(&[&format!("net {POOL}"), "udp port 51820"])?[..] else {
        bail!("capture counts");
    };
    if !failed.is_empty() {
        bail!("pod pairs that could not reach each other: {failed:?}");
    }
    if !body.contains(&format!("hello from {}", node_names[1])) {
        bail!("HTTP across nodes answered {body:?}");
    }
    if plain != 0 || wg == 0 {
        bail!("underlay: {plain} packets with pod addresses in the clear, {wg} WireGuard packets");
    }
    report(&format!(
        "helm e2e: {} pods ping all pairs and answer HTTP across nodes; underlay: {wg} WireGuard packets, 0 in the clear",
        pods.len()
    ));

    // ServiceAccounts and RBAC.
    let sas = c.kubectl(&[
        "get", "pods", "-n", NS, "-o",
        "jsonpath={range .items[*]}{.metadata.labels.app\\.kubernetes\\.io/component}={.spec.serviceAccountName}{\"\\n\"}{end}",
    ])?;
    for line in sas.lines().filter(|l| !l.is_empty()) {
        let (component, sa) = line.split_once('=').context("component=sa")?;
        if sa != format!("{RELEASE}-{component}") {
            bail!(
                "a {component} pod runs as ServiceAccount {sa:?}, not the chart's {RELEASE}-{component}"
            );
        }
    }
    for (sa, verb_args) in [
        (
            "agent",
            &["delete", "node", "--wait=false", node_names[0].as_str()][..],
        ),
        (
            "agent",
            &[
                "create",
                "secret",
                "generic",
                "-n",
                NS,
                "stolen",
                "--from-literal=a=b",
            ],
        ),
        (
            "agent",
            &[
                "patch",
                "meshpeer",
                node_names[0].as_str(),
                "--type=merge",
                "-p",
                r#"{"spec":{"podCIDRs":["10.9.0.0/24"]}}"#,
            ],
        ),
        (
            "operator",
            &["delete", "node", "--wait=false", node_names[0].as_str()],
        ),
        ("operator", &["get", "secrets", "-n", "kube-system"]),
    ] {
        let as_sa = format!("--as=system:serviceaccount:{NS}:{RELEASE}-{sa}");
        let mut args = vec![as_sa.as_str()];
        args.extend_from_slice(verb_args);
        let out = c.kubectl_output(&args)?;
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || !err.contains("forbidden") {
            bail!(
                "{sa} could {}: {}{err}",
                verb_args.join(" "),
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
    report(
        "helm e2e: components run as the chart's ServiceAccounts; writes outside their roles are refused",
    );
    security::forgery(c, NS, &node_names)?;
    security::route_injection(c, &node_names)?;
    security::handshake_flood(c, TEST_NS, &node_names, &pods)?;

    // A pod deleted and made again on another node keeps working.
    let mover_ip = test_pod(c, "mover", &node_names[0])?;
    if !pod_ping(c, &pods[1].0, &mover_ip) {
        bail!("web-2 cannot reach the mover on {}", node_names[0]);
    }
    c.kubectl(&["delete", "pod", "-n", TEST_NS, "mover", "--wait=true"])?;
    let mover_ip = test_pod(c, "mover", &node_names[2])?;
    for (from, _) in &pods {
        if !pod_ping(c, from, &mover_ip) {
            bail!(
                "{from} cannot reach the mover recreated on {} ({mover_ip})",
                node_names[2]
            );
        }
    }
    report("helm e2e: a pod deleted and recreated on another node is reached from every node");

    // A node joins: it gets an agent pod, joins the mesh, its pods are reachable.
    security::squat(c, "node-4", &node_names[0])?;
    let t = Instant::now();
    c.script(&["add-node", "node-4"])?;
    for archive in [first, second] {
        c.script(&["load", archive, "node-4"])?;
    }
    agents_ready(c, "e2e-1")?;
    security::squat_resolved(c, "node-4")?;
    c.kubectl(&[
        "wait",
        "--for=condition=Ready",
        "--timeout=120s",
        "node/node-4",
        "meshpeer/node-4",
    ])?;
    let ip4 = test_pod(c, "web-4", "node-4")?;
    for (from, _) in &pods {
        if !pod_ping(c, from, &ip4) {
            bail!("{from} cannot reach web-4 on the new node");
        }
    }
    pods.push(("web-4".into(), ip4));
    report(&format!(
        "helm e2e: node-4 added → agent Ready, peer Ready, its pod reachable from every node in {:.1} s",
        t.elapsed().as_secs_f64()
    ));

    // helm upgrade to a rebuilt image while pods ping across nodes.
    let capture = c.capture("upgrade")?;
    let mut pingers = Vec::new();
    for i in 0..pods.len() {
        let (from, _) = &pods[i];
        let (to, ip) = &pods[(i + 1) % pods.len()];
        pingers.push(pinger(c, from, to, ip)?);
    }
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    let mut args = vec![
        "upgrade".to_owned(),
        RELEASE.into(),
        repo_root().join("charts/wgmesh").display().to_string(),
    ];
    args.extend(install_args(c, "e2e-2")?);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    c.helm(&args)?;
    agents_ready(c, "e2e-2")?;
    let rolled = t.elapsed().as_secs_f64();
    // Traffic after the last agent's restart, so the gap it caused is measured to its end.
    std::thread::sleep(Duration::from_secs(5));
    let results: Vec<PingResult> = pingers
        .into_iter()
        .map(Pinger::stop)
        .collect::<Result<_>>()?;
    let [plain, wg] = capture.stop(&[&format!("net {POOL}"), "udp port 51820"])?[..] else {
        bail!("capture counts");
    };
    report(&format!(
        "helm e2e: helm upgrade e2e-1 → e2e-2 rolled {} agents in {rolled:.1} s while pods pinged:",
        pods.len()
    ));
    let (sent, _lost, _gap) = report_pings("helm e2e: upgrade", &results);
    report(&format!(
        "helm e2e: upgrade underlay: {wg} WireGuard packets, {plain} in the clear"
    ));
    if let Some(slow) = results.iter().find(|r| r.rate < 100.0) {
        bail!("{} pinged at {:.0}/s, under 100/s", slow.label, slow.rate);
    }
    if plain != 0 {
        bail!(
            "{plain} packets with pod addresses crossed the underlay in the clear during the upgrade"
        );
    }
    if sent == 0
        || !pods.iter().all(|(from, _)| {
            pods.iter()
                .all(|(to, ip)| from == to || pod_ping(c, from, ip))
        })
    {
        bail!("pods cannot reach each other after the upgrade");
    }

    // helm uninstall: every node clean, nothing else touched.
    for (pod, _) in pods
        .iter()
        .chain(std::iter::once(&("mover".to_owned(), String::new())))
    {
        c.kubectl(&["delete", "pod", "-n", TEST_NS, pod, "--wait=true"])?;
    }
    let t = Instant::now();
    c.helm(&["uninstall", RELEASE, "--namespace", NS])?;
    // The agents clean their nodes on SIGTERM, before they exit; the pod objects linger
    // until the kubelet's container GC removes the exited init container (about a minute).
    wait_until(
        "every agent and operator to exit",
        Duration::from_secs(120),
        || {
            c.kubectl(&[
                "get",
                "pods",
                "-n",
                NS,
                "-o",
                "jsonpath={range .items[*].status.containerStatuses[*]}{.state.running.startedAt}{\"\\n\"}{end}",
            ])
            .is_ok_and(|o| o.trim().is_empty())
        },
    )?;
    let mut dirty = Vec::new();
    for node in nodes(c)? {
        for thing in leftovers(c, &node)? {
            dirty.push(format!("{node}: {thing}"));
        }
        if !first_nodes.contains(&node) {
            continue;
        }
        let canary = c.on_node(&node, &["ls", "/etc/cni/net.d"])?;
        let route = c.on_node(&node, &["ip", "route", "show", "192.0.2.0/24"])?;
        let table = c
            .node_exec(&node, &["nft", "list", "table", "inet", "other-network"])
            .output()?;
        if !canary.contains("99-other-network.conf.canary")
            || route.trim().is_empty()
            || !table.status.success()
        {
            dirty.push(format!("{node}: something not ours was removed"));
        }
    }
    if !dirty.is_empty() {
        bail!("after helm uninstall: {dirty:?}");
    }
    report(&format!(
        "helm e2e: helm uninstall → {} nodes clean (no interface, route, nftables table or CNI configuration of ours; others' kept) in {:.1} s",
        nodes(c)?.len(),
        t.elapsed().as_secs_f64()
    ));
    Ok(())
}
