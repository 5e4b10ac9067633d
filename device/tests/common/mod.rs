//! Harness for the datapath tests: network namespaces joined by veth pairs, device processes
//! (wgmesh, wireguard-go, boringtun-cli) run inside them with `ip netns exec`, and `wg`, `ping`
//! and `iperf3` driven from outside. Everything created is removed by Drop guards, also when a
//! test panics. The agent's tests share it (`#[path]` from `node-agent/tests/`); there the
//! wgmesh device process is `wgmesh-agent device` (see [`WGMESH`]).
//!
//! Not root, a test fails, naming what it needs, unless `WGMESH_SKIP_PRIVILEGED=1` asks for
//! the privileged tests to be skipped (each then says so); a missing tool fails the test and
//! names the script that installs it.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

/// The standalone wgmesh device: the program, and its arguments before the interface name.
/// `wgmesh-device` in the device crate's tests; in the agent's, which have no such binary,
/// the agent's `device` subcommand, so both are exercised by the same harness.
pub const WGMESH: (&str, &[&str]) = match option_env!("CARGO_BIN_EXE_wgmesh-device") {
    Some(bin) => (bin, &[]),
    None => match option_env!("CARGO_BIN_EXE_wgmesh-agent") {
        Some(bin) => (bin, &["device"]),
        None => panic!("the datapath harness needs the wgmesh-device or wgmesh-agent binary"),
    },
};
pub const INSTALL_SCRIPT: &str = "hack/lib/deps.sh";
pub const SOCKET_DIR: &str = "/var/run/wireguard";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A short name unique to this process and call: `<prefix><pid><n>`, at most 15 bytes.
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = format!("{prefix}{}x{n}", std::process::id() % 1_000_000);
    assert!(name.len() <= 15, "{name} too long for an interface name");
    name
}

/// The environment variable that skips the tests needing root, explicitly.
pub const SKIP_PRIVILEGED: &str = "WGMESH_SKIP_PRIVILEGED";

/// True when the test may run. Not root, it fails, unless [`SKIP_PRIVILEGED`] is `1`: then
/// it returns false after saying that the test is skipped and why.
pub fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            std::env::var(SKIP_PRIVILEGED).is_ok_and(|v| v == "1"),
            "the datapath tests need root (network namespaces, TUN): run them as root, or set \
             {SKIP_PRIVILEGED}=1 to skip them"
        );
        eprintln!(
            "SKIPPED ({SKIP_PRIVILEGED}=1): this datapath test needs root (network namespaces, TUN)"
        );
        return false;
    }
    require_tools(&["ip", "wg", "ping", "iperf3"]);
    true
}

/// Fails the test if a tool is missing.
pub fn require_tools(tools: &[&str]) {
    for tool in tools {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            found,
            "`{tool}` is not installed; run {INSTALL_SCRIPT} (as root) to install the datapath test tools"
        );
    }
}

/// Path of boringtun-cli as installed by the deps script.
pub fn boringtun_cli() -> PathBuf {
    let dir = std::env::var("WGMESH_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                .join(".cache/wgmesh/tools")
        });
    let path = dir.join("bin/boringtun-cli");
    assert!(
        path.exists(),
        "boringtun-cli not found at {}; run {INSTALL_SCRIPT} to install it",
        path.display()
    );
    path
}

/// Runs a command, panicking with its output on failure.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    check(cmd, &out);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn check(cmd: &Command, out: &Output) {
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `ip <args>`.
pub fn ip(args: &[&str]) -> String {
    run(Command::new("ip").args(args))
}

/// Polls `cond` until it holds or `timeout` passes; panics with `what` on timeout.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A network namespace, deleted (with everything running in it) on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let name = format!("wgmt-{}-{}", std::process::id(), unique(tag));
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// A command run inside the namespace.
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// The standalone wgmesh device for `iface`, run inside the namespace (see [`WGMESH`]);
    /// further arguments go after the interface name.
    pub fn wgmesh_device(&self, iface: &str) -> Command {
        let mut c = self.cmd(WGMESH.0);
        c.args(WGMESH.1).arg(iface);
        c
    }

    /// Runs `f` on a thread that has entered this namespace (for sockets opened by the test).
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap();
            // SAFETY: setns on a namespace file we opened; affects only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    }

    /// Whether `ping` from here reaches `addr` (within `count` tries).
    pub fn ping(&self, addr: &str, count: u32) -> bool {
        self.cmd("ping")
            .args(["-c", &count.to_string(), "-i", "0.2", "-W", "1", "-q", addr])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// `wg <args>` inside the namespace.
    pub fn wg(&self, args: &[&str]) -> String {
        run(self.cmd("wg").args(args))
    }

    /// `wg` with its exit status and output, for commands expected to fail.
    pub fn wg_status(&self, args: &[&str]) -> Output {
        self.cmd("wg").args(args).output().unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    // SAFETY: signalling a process that lives in our own test namespace.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Two namespaces joined by a veth pair: `a` at 192.168.<n>.1, `b` at 192.168.<n>.2 (and
/// fd0c::1 / fd0c::2 on the same link).
#[derive(Debug)]
pub struct Link {
    pub a: Netns,
    pub b: Netns,
    pub a_dev: String,
    pub b_dev: String,
    pub a_addr: String,
    pub b_addr: String,
    pub a_addr6: String,
    pub b_addr6: String,
}

impl Link {
    pub fn new() -> Self {
        let a = Netns::new("a");
        let b = Netns::new("b");
        let a_dev = unique("va");
        let b_dev = unique("vb");
        ip(&[
            "link", "add", &a_dev, "netns", &a.name, "type", "veth", "peer", "name", &b_dev,
            "netns", &b.name,
        ]);
        let (a_addr, b_addr) = ("192.168.50.1".to_owned(), "192.168.50.2".to_owned());
        let (a_addr6, b_addr6) = ("fd0c::1".to_owned(), "fd0c::2".to_owned());
        a.ip(&["addr", "add", &format!("{a_addr}/24"), "dev", &a_dev]);
        b.ip(&["addr", "add", &format!("{b_addr}/24"), "dev", &b_dev]);
        a.ip(&[
            "addr",
            "add",
            &format!("{a_addr6}/64"),
            "dev",
            &a_dev,
            "nodad",
        ]);
        b.ip(&[
            "addr",
            "add",
            &format!("{b_addr6}/64"),
            "dev",
            &b_dev,
            "nodad",
        ]);
        a.ip(&["link", "set", &a_dev, "up"]);
        b.ip(&["link", "set", &b_dev, "up"]);
        Self {
            a,
            b,
            a_dev,
            b_dev,
            a_addr,
            b_addr,
            a_addr6,
            b_addr6,
        }
    }
}

/// Which implementation runs a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Impl {
    Wgmesh,
    WireguardGo,
    Boringtun,
}

/// A device process, killed on drop.
#[derive(Debug)]
pub struct DeviceProc {
    pub iface: String,
    pub kind: Impl,
    child: Child,
    log: PathBuf,
}

impl DeviceProc {
    /// Starts a device of `kind` named `iface` in `ns` and waits for its UAPI socket.
    pub fn start(ns: &Netns, kind: Impl, iface: &str) -> Self {
        let log = std::env::temp_dir().join(format!("{iface}.log"));
        let logf = std::fs::File::create(&log).unwrap();
        let mut cmd = match kind {
            Impl::Wgmesh => {
                let mut c = ns.wgmesh_device(iface);
                c.arg("--foreground").env("RUST_LOG", "info");
                c
            }
            Impl::WireguardGo => {
                require_tools(&["wireguard-go"]);
                let mut c = ns.cmd("wireguard-go");
                c.arg(iface)
                    .env("WG_PROCESS_FOREGROUND", "1")
                    .env("LOG_LEVEL", "error");
                c
            }
            Impl::Boringtun => {
                let mut c = ns.cmd(boringtun_cli());
                c.args([
                    iface,
                    "--foreground",
                    "--disable-drop-privileges",
                    "-v",
                    "error",
                ])
                .env("WG_SUDO", "1");
                c
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .unwrap();
        let mut dev = Self {
            iface: iface.to_owned(),
            kind,
            child,
            log,
        };
        let sock = dev.socket();
        wait_until(
            &format!("{kind:?} socket {}", sock.display()),
            Duration::from_secs(10),
            || {
                if let Ok(Some(status)) = dev.child.try_wait() {
                    panic!("{kind:?} exited with {status}; log:\n{}", dev.log_text());
                }
                std::os::unix::net::UnixStream::connect(&sock).is_ok()
            },
        );
        dev
    }

    pub fn socket(&self) -> PathBuf {
        Path::new(SOCKET_DIR).join(format!("{}.sock", self.iface))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(Instant::now() < deadline, "device did not exit on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for DeviceProc {
    fn drop(&mut self) {
        // `ip netns exec` execs the device, so the child pid is the device itself.
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.kind != Impl::Wgmesh {
            // The others may leave their socket behind when killed.
            let _ = std::fs::remove_file(self.socket());
        }
    }
}

/// A WireGuard key pair from `wg genkey | wg pubkey`.
#[derive(Debug, Clone)]
pub struct Keys {
    pub private: String,
    pub public: String,
}

impl Keys {
    pub fn generate() -> Self {
        let private = run(Command::new("wg").arg("genkey")).trim().to_owned();
        let mut child = Command::new("wg")
            .arg("pubkey")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(private.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let public = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        Self { private, public }
    }

    /// Writes the private key to a temporary file for `wg set ... private-key <file>`.
    pub fn private_file(&self) -> TempFile {
        TempFile::new(&self.private)
    }
}

/// A file removed on drop.
#[derive(Debug)]
pub struct TempFile(pub PathBuf);

impl TempFile {
    pub fn new(content: &str) -> Self {
        let path = std::env::temp_dir().join(unique("wgmtf"));
        std::fs::write(&path, content).unwrap();
        Self(path)
    }
    pub fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// One end of a tunnel: namespace, device, keys, port, inner addresses.
#[derive(Debug)]
pub struct End<'a> {
    pub ns: &'a Netns,
    pub dev: DeviceProc,
    pub keys: Keys,
    pub port: u16,
    pub inner4: String,
    pub inner6: String,
}

/// Two devices configured as peers with `wg set`, inner addresses 10.77.0.1/2 and fd77::1/2,
/// interfaces up. `a` knows `b`'s endpoint and vice versa (unless `endpoints` is false for b).
pub fn tunnel<'a>(link: &'a Link, a_kind: Impl, b_kind: Impl) -> (End<'a>, End<'a>) {
    let a = start_end(&link.a, a_kind, "ta", 51820, "10.77.0.1", "fd77::1");
    let b = start_end(&link.b, b_kind, "tb", 51821, "10.77.0.2", "fd77::2");
    add_peer(&a, &b, &format!("{}:{}", link.b_addr, b.port), None);
    add_peer(&b, &a, &format!("{}:{}", link.a_addr, a.port), None);
    (a, b)
}

/// Starts one configured device with its inner addresses, without peers.
pub fn start_end<'a>(
    ns: &'a Netns,
    kind: Impl,
    tag: &str,
    port: u16,
    inner4: &str,
    inner6: &str,
) -> End<'a> {
    let iface = unique(tag);
    let dev = DeviceProc::start(ns, kind, &iface);
    let keys = Keys::generate();
    let key_file = keys.private_file();
    ns.wg(&[
        "set",
        &iface,
        "private-key",
        key_file.path(),
        "listen-port",
        &port.to_string(),
    ]);
    ns.ip(&["addr", "add", &format!("{inner4}/24"), "dev", &iface]);
    ns.ip(&[
        "addr",
        "add",
        &format!("{inner6}/64"),
        "dev",
        &iface,
        "nodad",
    ]);
    ns.ip(&["link", "set", &iface, "mtu", "1420", "up"]);
    End {
        ns,
        dev,
        keys,
        port,
        inner4: inner4.into(),
        inner6: inner6.into(),
    }
}

/// Adds `peer` to `end` with `peer`'s inner /32 and /128 as allowed IPs.
pub fn add_peer(end: &End<'_>, peer: &End<'_>, endpoint: &str, keepalive: Option<u16>) {
    let allowed = format!("{}/32,{}/128", peer.inner4, peer.inner6);
    let mut args = vec![
        "set".to_owned(),
        end.dev.iface.clone(),
        "peer".into(),
        peer.keys.public.clone(),
        "allowed-ips".into(),
        allowed,
    ];
    // An empty endpoint: none; the peer is learned from its first handshake.
    if !endpoint.is_empty() {
        args.push("endpoint".into());
        args.push(endpoint.into());
    }
    if let Some(k) = keepalive {
        args.push("persistent-keepalive".into());
        args.push(k.to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    end.ns.wg(&args);
}

/// One peer line of `wg show <iface> dump`.
#[derive(Debug, Clone)]
pub struct DumpPeer {
    pub public_key: String,
    pub endpoint: String,
    pub allowed_ips: String,
    pub latest_handshake: u64,
    pub rx: u64,
    pub tx: u64,
    pub keepalive: String,
}

/// Peers from `wg show <iface> dump`.
pub fn dump(ns: &Netns, iface: &str) -> Vec<DumpPeer> {
    ns.wg(&["show", iface, "dump"])
        .lines()
        .skip(1)
        .map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            assert_eq!(f.len(), 8, "unexpected dump line {line:?}");
            DumpPeer {
                public_key: f[0].into(),
                endpoint: f[2].into(),
                allowed_ips: f[3].into(),
                latest_handshake: f[4].parse().unwrap(),
                rx: f[5].parse().unwrap(),
                tx: f[6].parse().unwrap(),
                keepalive: f[7].into(),
            }
        })
        .collect()
}

/// Seconds since the epoch.
pub fn now_epoch() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An iperf3 server in `ns`, killed on drop.
#[derive(Debug)]
pub struct IperfServer {
    child: Child,
}

impl IperfServer {
    /// Starts the server and returns once it listens: a client started before that is
    /// refused and exits at once.
    pub fn start(ns: &Netns, port: u16) -> Self {
        let child = ns
            .cmd("iperf3")
            .args(["-s", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let server = Self { child };
        let filter = format!("sport = :{port}");
        wait_until("iperf3 to listen", Duration::from_secs(10), || {
            ns.cmd("ss")
                .args(["-Hltn", &filter])
                .output()
                .is_ok_and(|o| !o.stdout.is_empty())
        });
        server
    }
}

impl Drop for IperfServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the standalone device daemonized (see [`WGMESH`]): the parent returns once the
/// device answers on its socket; deleting the link stops the background device and removes
/// the socket.
pub fn daemonized_device_comes_up_and_stops_with_its_link() {
    let ns = Netns::new("t");
    let iface = unique("wd");
    let status = ns.wgmesh_device(&iface).status().unwrap();
    assert!(status.success());
    assert!(
        ns.wg(&["show", &iface])
            .contains(&format!("interface: {iface}"))
    );
    ns.ip(&["link", "del", &iface]);
    let sock = std::path::Path::new(SOCKET_DIR).join(format!("{iface}.sock"));
    wait_until("background device to exit", Duration::from_secs(5), || {
        !sock.exists()
    });
}

/// The iperf3 client command from `ns` to `server`, for `seconds`.
pub fn iperf_client(ns: &Netns, server: &str, port: u16, seconds: u32) -> Command {
    let mut c = ns.cmd("iperf3");
    c.args([
        "-c",
        server,
        "-p",
        &port.to_string(),
        "-t",
        &seconds.to_string(),
    ]);
    c
}

/// Runs an iperf3 client from `ns` to `server` and returns received bits per second.
/// Retries while the server is still coming up.
pub fn iperf(ns: &Netns, server: &str, port: u16, seconds: u32, extra: &[&str]) -> f64 {
    let mut last = String::new();
    for _ in 0..20 {
        let out = iperf_client(ns, server, port, seconds)
            .arg("-J")
            .args(extra)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            if let Some(bps) = v["end"]["sum_received"]["bits_per_second"].as_f64() {
                return bps;
            }
        }
        last = text;
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("iperf3 to {server} failed:\n{last}");
}

/// Sends datagrams from a socket opened inside `ns`.
pub fn send_udp(ns: &Netns, to: SocketAddr, datagrams: Vec<Vec<u8>>) {
    ns.enter(move || {
        let bind: SocketAddr = match to.ip() {
            IpAddr::V4(_) => "0.0.0.0:0".parse().unwrap(),
            IpAddr::V6(_) => "[::]:0".parse().unwrap(),
        };
        let s = UdpSocket::bind(bind).unwrap();
        for d in &datagrams {
            let _ = s.send_to(d, to);
        }
    });
}

/// Deterministic pseudo-random bytes.
pub fn noise(seed: &mut u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            (*seed >> 24) as u8
        })
        .collect()
}
