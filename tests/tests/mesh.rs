//! End to end: a 3-node mesh in network namespaces (`hack/mesh.sh`) with a real control
//! plane, real agents and devices, pods plumbed by the CNI reference plugins, and real
//! packets, checked the way a person would: ping, iperf3, `wg show`, tcpdump on the underlay.
//!
//! One mesh serves every step, in order; each step says what it checks. Figures (join
//! convergence, the gap on agent restart) are printed and appended to
//! `target/wgmesh-e2e-report.txt`.

use anyhow::{Context, Result, bail};
use std::borrow::BorrowMut;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use wgmesh_tests::{repo_root, unique_name};

/// A mesh brought up by `hack/mesh.sh`, torn down when dropped.
struct Mesh {
    dir: PathBuf,
    id: String,
    net: String,
}

fn run(mut cmd: impl BorrowMut<Command>) -> Result<Output> {
    let cmd = cmd.borrow_mut();
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    Ok(out)
}

fn ok(mut cmd: impl BorrowMut<Command>) -> Result<String> {
    let cmd = cmd.borrow_mut();
    let out = run(&mut *cmd)?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn report(line: &str) {
    println!("{line}");
    let path = repo_root().join("target/wgmesh-e2e-report.txt");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{line}");
    }
}

impl Mesh {
    fn up(nodes: usize) -> Result<Mesh> {
        let dir = std::env::temp_dir().join(unique_name("wgmesh-e2e"));
        let script = repo_root().join("hack/mesh.sh");
        let out = run(Command::new("bash")
            .arg(&script)
            .args(["up", "--nodes", &nodes.to_string(), "--dir"])
            .arg(&dir))?;
        let mut mesh = Mesh {
            dir,
            id: String::new(),
            net: String::new(),
        };
        if !out.status.success() {
            bail!(
                "hack/mesh.sh up failed:\n{}{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                mesh.logs()
            );
        }
        let env = std::fs::read_to_string(mesh.dir.join("mesh.env"))?;
        for line in env.lines() {
            if let Some(v) = line.strip_prefix("MESH_ID=") {
                mesh.id = v.to_owned();
            }
            if let Some(v) = line.strip_prefix("MESH_NET=") {
                mesh.net = v.to_owned();
            }
        }
        Ok(mesh)
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.join("logs")) {
            for e in entries.flatten() {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                s.push_str(&format!("--- {} (last lines)\n", e.path().display()));
                for l in tail.into_iter().rev() {
                    s.push_str(l);
                    s.push('\n');
                }
            }
        }
        s
    }

    fn script(&self, args: &[&str]) -> Result<String> {
        ok(Command::new("bash")
            .arg(repo_root().join("hack/mesh.sh"))
            .args(args)
            .arg("--dir")
            .arg(&self.dir))
    }

    fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.id)
    }

    fn exec(&self, ns: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(ns)]).args(args);
        c
    }

    fn kubectl(&self, args: &[&str]) -> Result<String> {
        ok(Command::new("kubectl")
            .env("KUBECONFIG", self.dir.join("cp/kubeconfig"))
            .args(args))
    }

    fn pod(&self, node: &str, pod: &str) -> Result<String> {
        Ok(self.script(&["pod", node, pod])?.trim().to_owned())
    }

    fn ping(&self, from_pod: &str, to: &str) -> bool {
        run(self.exec(from_pod, &["ping", "-c", "1", "-W", "2", to]))
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    fn node_ip(&self, node: &str) -> String {
        let i: u32 = node.trim_start_matches("node-").parse().unwrap_or(0);
        format!("{}.{}", self.net, 10 + i)
    }

    fn iface(&self, node: &str) -> String {
        format!("wg-{}-n{}", self.id, node.trim_start_matches("node-"))
    }

    /// Starts tcpdump on the underlay bridge, writing every packet to a file, and returns
    /// once it is capturing.
    fn capture(&self, name: &str) -> Result<Capture> {
        let file = self.dir.join(format!("{name}.pcap"));
        let log = self.dir.join(format!("{name}.tcpdump.log"));
        let child = self
            .exec(
                "ul",
                &[
                    "tcpdump",
                    "-i",
                    "ul0",
                    "-n",
                    "--immediate-mode",
                    "-U",
                    "-s",
                    "128",
                    "-w",
                ],
            )
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        wait_until("tcpdump to listen", Duration::from_secs(10), || {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains("listening on"))
        })?;
        Ok(Capture { child, file })
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
            if std::env::var_os("WGMESH_E2E_KEEP").is_some() {
                eprintln!(
                    "WGMESH_E2E_KEEP: leaving the mesh in {} (hack/mesh.sh down --dir ...)",
                    self.dir.display()
                );
                return;
            }
        }
        let _ = Command::new("bash")
            .arg(repo_root().join("hack/mesh.sh"))
            .args(["down", "--dir"])
            .arg(&self.dir)
            .output();
    }
}

struct Capture {
    child: Child,
    file: PathBuf,
}

impl Capture {
    /// Stops capturing and counts the packets matching each filter.
    fn stop(mut self, filters: &[&str]) -> Result<Vec<usize>> {
        // Let the last packets reach the capture before it stops.
        std::thread::sleep(Duration::from_millis(500));
        signal(&self.child, "INT");
        let _ = self.child.wait();
        let all = ok(Command::new("tcpdump").arg("-r").arg(&self.file).arg("-n"))?;
        let summary: Vec<&str> = all.lines().take(12).collect();
        eprintln!(
            "capture {}: {} packets; first:\n{}",
            self.file.display(),
            all.lines().count(),
            summary.join("\n")
        );
        filters
            .iter()
            .map(|f| {
                let out = ok(Command::new("tcpdump")
                    .arg("-r")
                    .arg(&self.file)
                    .args(["-n", f]))?;
                Ok(out.lines().count())
            })
            .collect()
    }
}

/// Sends `sig` (e.g. `INT`) to a child, as a person would with kill(1).
fn signal(child: &Child, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status();
}

/// The public key of a WireGuard private key, by `wg pubkey`.
fn wg_pubkey(private: &str) -> Result<String> {
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("wg stdin")?
        .write_all(private.as_bytes())?;
    let out = child.wait_with_output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<Duration> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return Ok(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

fn all_pairs(mesh: &Mesh, pods: &[(&str, &str)]) -> Vec<String> {
    let mut failures = Vec::new();
    for (from, _) in pods {
        for (to, ip) in pods {
            if from != to && !mesh.ping(from, ip) {
                failures.push(format!("{from} -> {to} ({ip})"));
            }
        }
    }
    failures
}

/// Runs iperf3 from `client` to `server_ip` (a server must listen) for `secs`; returns Gbit/s.
fn iperf(mesh: &Mesh, client: &str, server_ip: &str, secs: u32) -> Result<f64> {
    let out = ok(mesh.exec(
        client,
        &["iperf3", "-c", server_ip, "-t", &secs.to_string(), "-J"],
    ))?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 result")?;
    Ok(bps / 1e9)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn a_three_node_mesh_end_to_end() -> Result<()> {
    assert!(
        is_root(),
        "the end-to-end test needs root (network namespaces); run hack/test.sh as root"
    );
    let _ = std::fs::remove_file(repo_root().join("target/wgmesh-e2e-report.txt"));
    let mesh = Mesh::up(3)?;
    let ips: Vec<String> = (1..=3)
        .map(|i| mesh.pod(&format!("node-{i}"), &format!("pod-{i}")))
        .collect::<Result<_>>()?;
    let pods: Vec<(&str, &str)> = vec![("pod-1", &ips[0]), ("pod-2", &ips[1]), ("pod-3", &ips[2])];

    // 1. Every pod reaches every other pod, across nodes, and data moves.
    wait_until("all-pairs ping", Duration::from_secs(60), || {
        all_pairs(&mesh, &pods).is_empty()
    })
    .map_err(|e| anyhow::anyhow!("{e}: failing {:?}", all_pairs(&mesh, &pods)))?;
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
    let gbps = iperf(&mesh, "pod-1", &ips[1], 5)?;
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
    mesh.kubectl(&[
        "patch",
        "mesh",
        "default",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"transport":{"hostGateway":"OnLink"}}}"#,
    ])?;
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
    mesh.kubectl(&[
        "patch",
        "mesh",
        "default",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"transport":{"hostGateway":"Never"}}}"#,
    ])?;
    wait_until(
        "routes back through the device",
        Duration::from_secs(30),
        || {
            run(mesh.exec("node-1", &["ip", "route", "get", &ips[1]]))
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&mesh.iface("node-1")))
        },
    )?;

    // 5. A node joins: how long from its Node object to its pod answering; then it leaves.
    let joined = Instant::now();
    mesh.script(&["add-node", "node-4"])?;
    let ip4 = wait_until_pod(&mesh, "node-4", "pod-4")?;
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

    // 6. The agent is killed mid-transfer: nothing in the clear, and traffic comes back.
    let cap = mesh.capture("restart")?;
    let transfer = mesh
        .exec("pod-1", &["iperf3", "-c", &ips[1], "-t", "8"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let pinger = mesh
        .exec("pod-1", &["ping", "-D", "-i", "0.05", "-W", "1", &ips[1]])
        .stdout(Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(2));
    mesh.script(&["stop-agent", "node-1", "KILL"])?;
    std::thread::sleep(Duration::from_secs(1));
    mesh.script(&["start-agent", "node-1"])?;
    wait_until(
        "pings answered after the restart",
        Duration::from_secs(60),
        || mesh.ping("pod-1", &ips[1]),
    )?;
    std::thread::sleep(Duration::from_secs(1));
    signal(&pinger, "INT");
    let out = pinger.wait_with_output()?;
    let gap = longest_gap(&String::from_utf8_lossy(&out.stdout));
    // The TCP stream may or may not survive the gap; either way it must not leak.
    let _ = transfer.wait_with_output();
    let [plain] = cap.stop(&["net 10.244.0.0/16 or net fd00:10:244::/56"])?[..] else {
        bail!("capture counts");
    };
    report(&format!(
        "e2e: agent SIGKILL + restart: longest gap between ping replies {gap:.2} s"
    ));
    assert_eq!(
        plain, 0,
        "pod packets in the clear while the agent was down"
    );

    // 7. An external peer running wireguard-go, configured from what the mesh publishes.
    external_peer(&mesh, &ips)?;
    Ok(())
}

fn wait_until_pod(mesh: &Mesh, node: &str, pod: &str) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match mesh.pod(node, pod) {
            Ok(ip) => return Ok(ip),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// The longest time between two consecutive replies in `ping -D` output.
fn longest_gap(out: &str) -> f64 {
    let times: Vec<f64> = out
        .lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| {
            l.strip_prefix('[')
                .and_then(|r| r.split(']').next())
                .and_then(|t| t.parse().ok())
        })
        .collect();
    times.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max)
}

fn external_peer(mesh: &Mesh, ips: &[String]) -> Result<()> {
    let ns = "ext";
    let ext_ip = format!("{}.50", mesh.net);
    let iface = format!("wgx{}", mesh.id);
    ok(Command::new("ip").args(["netns", "add", &mesh.ns(ns)]))?;
    let veth = format!("m{}x", mesh.id);
    ok(Command::new("ip").args([
        "link",
        "add",
        &veth,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &mesh.ns(ns),
    ]))?;
    ok(Command::new("ip").args(["link", "set", &veth, "netns", &mesh.ns("ul")]))?;
    ok(mesh.exec("ul", &["ip", "link", "set", &veth, "master", "ul0", "up"]))?;
    ok(mesh.exec(
        ns,
        &["ip", "addr", "add", &format!("{ext_ip}/24"), "dev", "eth0"],
    ))?;
    ok(mesh.exec(ns, &["ip", "link", "set", "eth0", "up"]))?;
    ok(mesh.exec(ns, &["ip", "link", "set", "lo", "up"]))?;

    let private = ok(Command::new("wg").arg("genkey"))?;
    let public = wg_pubkey(&private)?;
    let key_file = mesh.dir.join("ext.key");
    std::fs::write(&key_file, private.trim())?;

    let peer = format!(
        "apiVersion: wgmesh.dev/v1alpha1\nkind: MeshPeer\nmetadata: {{name: laptop}}\nspec:\n  publicKey: \"{public}\"\n  allowedIPs: [\"10.250.0.7/32\"]\n  endpoint: \"{ext_ip}:51820\"\n"
    );
    let file = mesh.dir.join("laptop.yaml");
    std::fs::write(&file, peer)?;
    mesh.kubectl(&["apply", "-f", &file.to_string_lossy()])?;
    mesh.kubectl(&[
        "wait",
        "--for=condition=Ready",
        "--timeout=60s",
        "meshpeer/laptop",
    ])?;

    // The external machine: wireguard-go, configured from the node peers' approved keys,
    // endpoints and pod subnets, as an administrator would from `kubectl get meshpeers`.
    let mut wggo = mesh
        .exec(ns, &["wireguard-go", "-f", &iface])
        .env("WG_PROCESS_FOREGROUND", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let result = (|| -> Result<()> {
        wait_until("wireguard-go's socket", Duration::from_secs(10), || {
            Path::new(&format!("/var/run/wireguard/{iface}.sock")).exists()
        })?;
        ok(mesh.exec(
            ns,
            &[
                "wg",
                "set",
                &iface,
                "private-key",
                &key_file.to_string_lossy(),
                "listen-port",
                "51820",
            ],
        ))?;
        let peers: serde_json::Value =
            serde_json::from_str(&mesh.kubectl(&["get", "meshpeers", "-o", "json"])?)?;
        for p in peers["items"].as_array().into_iter().flatten() {
            let a = &p["status"]["approved"];
            // Node peers the operator approved; a departed node's peer has no approval.
            if p["spec"]["node"].is_null() || a["publicKey"].is_null() {
                continue;
            }
            let allowed: Vec<&str> = a["allowedIPs"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str())
                .collect();
            ok(mesh.exec(
                ns,
                &[
                    "wg",
                    "set",
                    &iface,
                    "peer",
                    a["publicKey"].as_str().unwrap_or_default(),
                    "endpoint",
                    a["endpoint"].as_str().unwrap_or_default(),
                    "allowed-ips",
                    &allowed.join(","),
                ],
            ))?;
        }
        ok(mesh.exec(ns, &["ip", "addr", "add", "10.250.0.7/32", "dev", &iface]))?;
        ok(mesh.exec(ns, &["ip", "link", "set", &iface, "up"]))?;
        ok(mesh.exec(ns, &["ip", "route", "add", "10.244.0.0/16", "dev", &iface]))?;
        wait_until("the laptop reaches pod-1", Duration::from_secs(30), || {
            run(mesh.exec(
                ns,
                &["ping", "-c", "1", "-W", "2", "-I", "10.250.0.7", &ips[0]],
            ))
            .is_ok_and(|o| o.status.success())
        })?;
        wait_until("pod-2 reaches the laptop", Duration::from_secs(30), || {
            mesh.ping("pod-2", "10.250.0.7")
        })?;
        Ok(())
    })();
    let _ = wggo.kill();
    let _ = wggo.wait();
    result
}
