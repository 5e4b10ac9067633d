//! The network-namespace mesh harness of the end-to-end tests: a mesh brought up by
//! `hack/mesh.sh` (real control plane, agents, devices, CNI-plumbed pods), and the tools a
//! person would use on it: ping, iperf3, tcpdump on the underlay, `wg`, kubectl.

use crate::{repo_root, unique_name};
use anyhow::{Context, Result, bail};
use std::borrow::BorrowMut;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A mesh brought up by `hack/mesh.sh`, torn down when dropped.
#[derive(Debug)]
pub struct Mesh {
    pub dir: PathBuf,
    pub id: String,
    pub net: String,
    /// Set by [`Mesh::check`] on an error, like a panic: the logs are printed and
    /// `WGMESH_E2E_KEEP` keeps the mesh.
    failed: std::cell::Cell<bool>,
}

pub fn run(mut cmd: impl BorrowMut<Command>) -> Result<Output> {
    let cmd = cmd.borrow_mut();
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    Ok(out)
}

pub fn ok(mut cmd: impl BorrowMut<Command>) -> Result<String> {
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

pub fn report(line: &str) {
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
    pub fn up(nodes: usize) -> Result<Mesh> {
        Mesh::up_with(&["--nodes", &nodes.to_string()])
    }

    /// The multi-cloud mesh of `hack/mesh.sh up --clouds`: the sites and nodes of the table
    /// in `hack/lib/clouds.sh`, sites behind NAT routers, the underlay as their internet.
    pub fn up_clouds() -> Result<Mesh> {
        Mesh::up_with(&["--clouds"])
    }

    /// `hack/mesh.sh up ARGS --dir <a new directory>`.
    fn up_with(args: &[&str]) -> Result<Mesh> {
        let dir = std::env::temp_dir().join(unique_name("wgmesh-e2e"));
        let script = repo_root().join("hack/mesh.sh");
        let out = run(Command::new("bash")
            .arg(&script)
            .arg("up")
            .args(args)
            .arg("--dir")
            .arg(&dir))?;
        let mut mesh = Mesh {
            dir,
            id: String::new(),
            net: String::new(),
            failed: std::cell::Cell::new(false),
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

    /// A mesh of `nodes` nodes with one pod per node (`pod-i` on `node-i`), returned once
    /// every pod reaches every other; the pods' addresses in node order.
    pub fn up_with_pods(nodes: usize) -> Result<(Mesh, Vec<String>)> {
        let mesh = Mesh::up(nodes)?;
        let ips: Vec<String> = (1..=nodes)
            .map(|i| mesh.pod(&format!("node-{i}"), &format!("pod-{i}")))
            .collect::<Result<_>>()?;
        let names: Vec<String> = (1..=nodes).map(|i| format!("pod-{i}")).collect();
        let pods: Vec<(&str, &str)> = names
            .iter()
            .zip(&ips)
            .map(|(n, ip)| (n.as_str(), ip.as_str()))
            .collect();
        wait_until("all-pairs ping", Duration::from_secs(60), || {
            all_pairs(&mesh, &pods).is_empty()
        })
        .map_err(|e| anyhow::anyhow!("{e}: failing {:?}", all_pairs(&mesh, &pods)))?;
        Ok((mesh, ips))
    }

    pub fn logs(&self) -> String {
        log_tails(&self.dir.join("logs"), 15)
    }

    /// Passes `result` through; an error first prints what a person would look at (the
    /// logs, the peers, the Events) and marks the mesh failed, so that `WGMESH_E2E_KEEP`
    /// keeps it running. A test that returns its error with `?` past this would tear the
    /// mesh down without a word.
    pub fn check<T>(&self, result: Result<T>) -> Result<T> {
        if result.is_err() && !self.failed.replace(true) {
            self.diagnose();
        }
        result
    }

    fn diagnose(&self) {
        eprintln!("{}", self.logs());
        for args in [
            &["get", "meshpeers", "-o", "wide"][..],
            &["get", "events", "-A", "--sort-by", ".lastTimestamp"],
        ] {
            match self.kubectl(args) {
                Ok(out) => eprintln!("$ kubectl {}\n{out}", args.join(" ")),
                Err(e) => eprintln!("$ kubectl {}\n{e:#}", args.join(" ")),
            }
        }
    }

    pub fn script(&self, args: &[&str]) -> Result<String> {
        ok(Command::new("bash")
            .arg(repo_root().join("hack/mesh.sh"))
            .args(args)
            .arg("--dir")
            .arg(&self.dir))
    }

    pub fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.id)
    }

    pub fn exec(&self, ns: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(ns)]).args(args);
        c
    }

    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        ok(Command::new("kubectl")
            .env("KUBECONFIG", self.dir.join("cp/kubeconfig"))
            .args(args))
    }

    /// `kubectl wgmesh ARGS` with the mesh's kubeconfig, kubectl finding the plugin on `PATH`
    /// (`target/debug`, which `hack/mesh.sh up` builds it into, or `WGMESH_BIN_DIR`).
    pub fn plugin(&self, args: &[&str]) -> Result<Output> {
        let bin = std::env::var("WGMESH_BIN_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| repo_root().join("target/debug"));
        if !bin.join("kubectl-wgmesh").exists() {
            bail!(
                "no kubectl-wgmesh in {} (hack/mesh.sh up builds it)",
                bin.display()
            );
        }
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        Command::new("kubectl")
            .arg("wgmesh")
            .args(args)
            .env("PATH", path)
            .env("KUBECONFIG", self.dir.join("cp/kubeconfig"))
            .output()
            .context("running kubectl wgmesh")
    }

    /// Merges `spec` (JSON, the inside of `spec`) into the `default` Mesh.
    pub fn patch_mesh(&self, spec: &str) -> Result<String> {
        self.kubectl(&[
            "patch",
            "mesh",
            "default",
            "--type",
            "merge",
            "-p",
            &format!(r#"{{"spec":{spec}}}"#),
        ])
    }

    /// A node's key file (its keys and rotation phase), as its agent last wrote it.
    pub fn key_file(&self, node: &str) -> Result<serde_json::Value> {
        let path = self
            .dir
            .join(format!("nodes/{node}/state/wireguard-key.json"));
        Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
    }

    pub fn pod(&self, node: &str, pod: &str) -> Result<String> {
        Ok(self.script(&["pod", node, pod])?.trim().to_owned())
    }

    pub fn ping(&self, from_pod: &str, to: &str) -> bool {
        run(self.exec(from_pod, &["ping", "-c", "1", "-W", "2", to]))
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    pub fn node_ip(&self, node: &str) -> String {
        let i: u32 = node.trim_start_matches("node-").parse().unwrap_or(0);
        format!("{}.{}", self.net, 10 + i)
    }

    /// The node's address as its Node has it (`hack/mesh.sh address`): on the underlay, or,
    /// in a `--clouds` mesh, on its site's LAN when the site is behind NAT.
    pub fn address(&self, node: &str) -> Result<String> {
        Ok(self.script(&["address", node])?.trim().to_owned())
    }

    /// The site a node of a `--clouds` mesh is at now (`hack/mesh.sh site`).
    pub fn site(&self, node: &str) -> Result<String> {
        Ok(self.script(&["site", node])?.trim().to_owned())
    }

    /// The address of a site's NAT router on the underlay, the sites' internet
    /// (`hack/mesh.sh wan`).
    pub fn wan(&self, site: &str) -> Result<String> {
        Ok(self.script(&["wan", site])?.trim().to_owned())
    }

    pub fn iface(&self, node: &str) -> String {
        format!("wg-{}-n{}", self.id, node.trim_start_matches("node-"))
    }

    /// Starts tcpdump on the underlay bridge, writing every packet to a file, and returns
    /// once it is capturing.
    pub fn capture(&self, name: &str) -> Result<Capture> {
        capture_in(&self.ns("ul"), "ul0", &self.dir, name)
    }
}

/// The last `lines` lines of every file in `dir`, each under its name.
pub fn log_tails(dir: &Path, lines: usize) -> String {
    let mut s = String::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(lines).collect();
            s.push_str(&format!("--- {} (last lines)\n", e.path().display()));
            for l in tail.into_iter().rev() {
                s.push_str(l);
                s.push('\n');
            }
        }
    }
    s
}

/// Starts tcpdump on `iface` in network namespace `ns`, writing every packet to
/// `dir/NAME.pcap`, and returns once it is capturing.
pub fn capture_in(ns: &str, iface: &str, dir: &Path, name: &str) -> Result<Capture> {
    let file = dir.join(format!("{name}.pcap"));
    let log = dir.join(format!("{name}.tcpdump.log"));
    let child = Command::new("ip")
        .args(["netns", "exec", ns, "tcpdump", "-i", iface, "-n"])
        .args(["--immediate-mode", "-U", "-s", "128", "-w"])
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    wait_until("tcpdump to listen", Duration::from_secs(10), || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("listening on"))
    })?;
    Ok(Capture { child, file })
}

/// Tears down what `hack/SCRIPT up --dir DIR` brought up, unless the test failed and
/// `WGMESH_E2E_KEEP` is set (then says where it is, to look around and `down` by hand).
pub fn down_unless_kept(script: &str, dir: &Path, failed: bool) {
    if failed && std::env::var_os("WGMESH_E2E_KEEP").is_some() {
        eprintln!(
            "WGMESH_E2E_KEEP: leaving it running in {} (hack/{script} down --dir ...)",
            dir.display()
        );
        return;
    }
    let _ = Command::new("bash")
        .arg(repo_root().join("hack").join(script))
        .args(["down", "--dir"])
        .arg(dir)
        .output();
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.failed.replace(true) {
            self.diagnose();
        }
        down_unless_kept("mesh.sh", &self.dir, self.failed.get());
    }
}

#[derive(Debug)]
pub struct Capture {
    child: Child,
    file: PathBuf,
}

impl Capture {
    /// The file the packets go to (a pcap file, readable with `tcpdump -r`).
    pub fn path(&self) -> PathBuf {
        self.file.clone()
    }

    /// Stops capturing and counts the packets matching each filter.
    pub fn stop(mut self, filters: &[&str]) -> Result<Vec<usize>> {
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
pub fn signal(child: &Child, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status();
}

/// The public key of a WireGuard private key, by `wg pubkey`.
pub fn wg_pubkey(private: &str) -> Result<String> {
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

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<Duration> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return Ok(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

/// One ping (`-c 1 -W 2`) from each `(pod, address)` of `pings`, all at once; whether each
/// was answered, in order.
pub fn ping_at_once(mesh: &Mesh, pings: &[(&str, &str)]) -> Vec<bool> {
    let children: Vec<Option<Child>> = pings
        .iter()
        .map(|(from, to)| {
            mesh.exec(from, &["ping", "-c", "1", "-W", "2", to])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .ok()
        })
        .collect();
    children
        .into_iter()
        .map(|c| {
            c.and_then(|mut c| c.wait().ok())
                .is_some_and(|s| s.success())
        })
        .collect()
}

pub fn all_pairs(mesh: &Mesh, pods: &[(&str, &str)]) -> Vec<String> {
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
pub fn iperf(mesh: &Mesh, client: &str, server_ip: &str, secs: u32) -> Result<f64> {
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

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

pub fn wait_until_pod(mesh: &Mesh, node: &str, pod: &str) -> Result<String> {
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
pub fn longest_gap(out: &str) -> f64 {
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

/// A machine on the underlay: a network namespace of its own, wired to the underlay bridge
/// with an address there. It goes with the mesh's namespaces.
#[derive(Debug)]
pub struct Machine<'a> {
    mesh: &'a Mesh,
    /// Its namespace's short name.
    pub ns: String,
    /// Its address on the underlay.
    pub ip: String,
}

impl<'a> Machine<'a> {
    /// The machine `name` (a few letters) at `MESH_NET.host`.
    pub fn add(mesh: &'a Mesh, name: &str, host: u8) -> Result<Machine<'a>> {
        let ip = format!("{}.{host}", mesh.net);
        ok(Command::new("ip").args(["netns", "add", &mesh.ns(name)]))?;
        let veth = format!("m{}{name}", mesh.id);
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
            &mesh.ns(name),
        ]))?;
        ok(Command::new("ip").args(["link", "set", &veth, "netns", &mesh.ns("ul")]))?;
        ok(mesh.exec("ul", &["ip", "link", "set", &veth, "master", "ul0", "up"]))?;
        ok(mesh.exec(
            name,
            &["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
        ))?;
        ok(mesh.exec(name, &["ip", "link", "set", "eth0", "up"]))?;
        ok(mesh.exec(name, &["ip", "link", "set", "lo", "up"]))?;
        Ok(Machine {
            mesh,
            ns: name.to_owned(),
            ip,
        })
    }

    /// A command run on the machine.
    pub fn exec(&self, args: &[&str]) -> Command {
        self.mesh.exec(&self.ns, args)
    }
}

/// An external machine running `wireguard-go` in its own namespace on the underlay, added
/// to the mesh as a `MeshPeer` and configured by hand from what the mesh publishes, as an
/// administrator would. wireguard-go stops when this is dropped.
#[derive(Debug)]
pub struct ExternalPeer<'a> {
    mesh: &'a Mesh,
    /// Its namespace's short name (`ext`).
    pub ns: String,
    /// Its WireGuard interface.
    pub iface: String,
    /// Its address inside the mesh (its `allowedIPs`).
    pub address: String,
    /// Its public key.
    pub public_key: String,
    wggo: Child,
}

impl<'a> ExternalPeer<'a> {
    /// Creates the machine, its `MeshPeer` named `name` (waits for it to be Ready) and its
    /// WireGuard interface with the address `address`; configures no node yet.
    pub fn start(mesh: &'a Mesh, name: &str, address: &str) -> Result<ExternalPeer<'a>> {
        let machine = Machine::add(mesh, "ext", 50)?;
        let (ns, ext_ip) = (machine.ns, machine.ip);
        let iface = format!("wgx{}", mesh.id);

        let private = ok(Command::new("wg").arg("genkey"))?;
        let public_key = wg_pubkey(&private)?;
        let key_file = mesh.dir.join("ext.key");
        std::fs::write(&key_file, private.trim())?;

        let peer = format!(
            "apiVersion: wgmesh.dev/v1alpha1\nkind: MeshPeer\nmetadata: {{name: {name}}}\nspec:\n  publicKey: \"{public_key}\"\n  allowedIPs: [\"{address}/32\"]\n  endpoint: \"{ext_ip}:51820\"\n"
        );
        let file = mesh.dir.join(format!("{name}.yaml"));
        std::fs::write(&file, peer)?;
        mesh.kubectl(&["apply", "-f", &file.to_string_lossy()])?;
        mesh.kubectl(&[
            "wait",
            "--for=condition=Ready",
            "--timeout=60s",
            &format!("meshpeer/{name}"),
        ])?;
        let wggo = mesh
            .exec(&ns, &["wireguard-go", "-f", &iface])
            .env("WG_PROCESS_FOREGROUND", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let ext = ExternalPeer {
            mesh,
            ns,
            iface,
            address: address.to_owned(),
            public_key,
            wggo,
        };
        // Listening, not only bound: `wg` unlinks a socket that refuses its connection (the
        // instant between wireguard-go's bind and listen) and falls back to the kernel.
        let socket = format!("/var/run/wireguard/{}.sock", ext.iface);
        wait_until(
            "wireguard-go's socket to listen",
            Duration::from_secs(10),
            || {
                mesh.exec(&ext.ns, &["cat", "/proc/net/unix"])
                    .output()
                    .is_ok_and(|o| {
                        String::from_utf8_lossy(&o.stdout).lines().any(|l| {
                            // Flags 00010000: __SO_ACCEPTCON, a listening socket.
                            l.split_whitespace().nth(3) == Some("00010000")
                                && l.ends_with(socket.as_str())
                        })
                    })
            },
        )?;
        ok(mesh.exec(
            &ext.ns,
            &[
                "wg",
                "set",
                &ext.iface,
                "private-key",
                &key_file.to_string_lossy(),
                "listen-port",
                "51820",
            ],
        ))?;
        ok(mesh.exec(
            &ext.ns,
            &[
                "ip",
                "addr",
                "add",
                &format!("{address}/32"),
                "dev",
                &ext.iface,
            ],
        ))?;
        ok(mesh.exec(&ext.ns, &["ip", "link", "set", &ext.iface, "up"]))?;
        ok(mesh.exec(
            &ext.ns,
            &["ip", "route", "add", "10.244.0.0/16", "dev", &ext.iface],
        ))?;
        Ok(ext)
    }

    /// Configures every node peer the operator approved (key, endpoint, pod subnets), as
    /// an administrator would from `kubectl get meshpeers`; returns the keys configured
    /// by node name.
    pub fn configure_nodes(&self) -> Result<Vec<(String, String)>> {
        let peers: serde_json::Value =
            serde_json::from_str(&self.mesh.kubectl(&["get", "meshpeers", "-o", "json"])?)?;
        let mut configured = Vec::new();
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
            let key = a["publicKey"].as_str().unwrap_or_default();
            self.set_peer(key, a["endpoint"].as_str().unwrap_or_default(), &allowed)?;
            configured.push((
                p["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                key.to_owned(),
            ));
        }
        Ok(configured)
    }

    /// `wg set IFACE peer KEY endpoint ENDPOINT allowed-ips ALLOWED`.
    pub fn set_peer(&self, key: &str, endpoint: &str, allowed: &[&str]) -> Result<()> {
        ok(self.mesh.exec(
            &self.ns,
            &[
                "wg",
                "set",
                &self.iface,
                "peer",
                key,
                "endpoint",
                endpoint,
                "allowed-ips",
                &allowed.join(","),
            ],
        ))?;
        Ok(())
    }

    /// `wg set IFACE peer KEY remove`.
    pub fn remove_peer(&self, key: &str) -> Result<()> {
        ok(self
            .mesh
            .exec(&self.ns, &["wg", "set", &self.iface, "peer", key, "remove"]))?;
        Ok(())
    }

    /// One ping from the machine's mesh address, with a 2 s wait.
    pub fn ping(&self, ip: &str) -> bool {
        run(self.mesh.exec(
            &self.ns,
            &["ping", "-c", "1", "-W", "2", "-I", &self.address, ip],
        ))
        .is_ok_and(|o| o.status.success())
    }

    /// A command run on the machine.
    pub fn exec(&self, args: &[&str]) -> Command {
        self.mesh.exec(&self.ns, args)
    }
}

impl Drop for ExternalPeer<'_> {
    fn drop(&mut self) {
        let _ = self.wggo.kill();
        let _ = self.wggo.wait();
    }
}
