//! Hitless key rotation through the library API the node agent uses: two in-process devices in
//! two network namespaces (each started on a thread that entered its namespace, so the device's
//! threads, TUN interface and socket live there), real pings at 100 packets/s in both
//! directions through the tunnel during the whole rotation, and zero of them lost. Also: a TCP
//! stream never stalls for more than a second, both sides rotating at once, and a third party
//! that only knows the old key (wireguard-go) keeps its tunnel exactly as long as the old key is
//! held. Last, the agent's own key code drives a device through an ordinary rotation and a
//! revocation: a peer that only knows the old key still reaches the node in the grace period
//! after the first, and neither keeps its session nor completes a handshake after the second.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../device/tests/common/mod.rs"]
mod common;

use base64::Engine as _;
use common::*;
use std::io::Read as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use wgmesh_device::config::{ConfigUpdate, Key, PeerSnapshot, PeerUpdate};
use wgmesh_device::uapi::server::UapiServer;
use wgmesh_device::{Device, DeviceConfig, DeviceHandle};

/// Ping interval of the floods: at least 100 packets/s. iputils ping sleeps in whole timer
/// ticks, so `-i 0.01` sends only about 61 packets/s on a kernel with 250 Hz ticks; `-i 0.008`
/// sends 100 to 125.
const FLOOD_INTERVAL: &str = "0.008";
/// Packets per second of a flood.
const FLOOD_RATE: u32 = 100;
/// How long a peer must send nothing under the old key before the key is retired (the agent's
/// rule, `wgmesh_core::rotation::MOVE_QUIET`).
const MOVE_QUIET: Duration = Duration::from_secs(2);
/// Traffic under the old keys before a rotation starts and after it ends.
const SETTLE: Duration = Duration::from_secs(2);
/// Longest a condition of the rotation may take to hold.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// A key pair.
#[derive(Debug, Clone, Copy)]
struct KeyPair {
    private: Key,
    public: Key,
}

impl KeyPair {
    fn generate() -> Self {
        use rand_core::RngCore;
        let mut private = [0u8; 32];
        rand_core::OsRng.fill_bytes(&mut private);
        let secret = x25519_dalek::StaticSecret::from(private);
        let public = x25519_dalek::PublicKey::from(&secret).to_bytes();
        Self { private, public }
    }

    fn b64(&self) -> String {
        b64(&self.public)
    }
}

fn b64(key: &Key) -> String {
    base64::engine::general_purpose::STANDARD.encode(key)
}

fn from_b64(s: &str) -> Key {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .unwrap()
        .try_into()
        .unwrap()
}

/// One in-process device with its UAPI socket, in a namespace.
struct Side<'a> {
    ns: &'a Netns,
    dev: DeviceHandle,
    _uapi: UapiServer,
    underlay: SocketAddr,
    inner: String,
}

impl<'a> Side<'a> {
    /// Starts a device in `ns` with `key`, UDP `port` on `underlay_ip`, and `inner`/24.
    fn start(
        ns: &'a Netns,
        tag: &str,
        key: &KeyPair,
        underlay_ip: &str,
        port: u16,
        inner: &str,
    ) -> Self {
        let name = unique(tag);
        let private = key.private;
        let config = DeviceConfig {
            listen_port: port,
            private_key: Some(private.into()),
            up: true,
            ..DeviceConfig::new(name.clone())
        };
        // Threads inherit the namespace of the thread that spawns them.
        let dev = ns.enter(move || Device::start(config).unwrap());
        ns.ip(&["addr", "add", &format!("{inner}/24"), "dev", &name]);
        let uapi = UapiServer::start(dev.clone(), Path::new(SOCKET_DIR)).unwrap();
        Self {
            ns,
            dev,
            _uapi: uapi,
            underlay: format!("{underlay_ip}:{port}").parse().unwrap(),
            inner: inner.to_owned(),
        }
    }

    fn iface(&self) -> &str {
        self.dev.name()
    }

    /// Adds `other` as a peer known under `key`.
    fn add_peer(&self, key: &Key, endpoint: SocketAddr, inner: &str) {
        let mut u = PeerUpdate::new(*key);
        u.endpoint = Some(endpoint);
        u.allowed_ips = vec![format!("{inner}/32").parse().unwrap()];
        assert!(self.dev.upsert_peer(&u).is_some());
    }

    /// The peer known under `key` (primary or next).
    fn peer(&self, key: &Key) -> PeerSnapshot {
        let id = self.dev.peer_id(key).expect("peer is configured");
        self.dev.peer(id).unwrap()
    }
}

/// Configures `a` and `b` as each other's peers.
fn pair(a: &Side<'_>, a_key: &KeyPair, b: &Side<'_>, b_key: &KeyPair) {
    a.add_peer(&b_key.public, b.underlay, &b.inner);
    b.add_peer(&a_key.public, a.underlay, &a.inner);
}

/// A ping flood at 100 packets/s (as far as ping keeps up) for a fixed number of packets;
/// ping's summary is read when it ends by itself, after waiting for the last replies (stopping
/// it early would count packets in flight as lost).
struct Flood {
    what: String,
    child: Child,
}

impl Flood {
    fn start(ns: &Netns, to: &str, duration: Duration) -> Self {
        let count = (duration.as_secs() as u32) * FLOOD_RATE;
        let child = ns
            .cmd("ping")
            .args(["-q", "-i", FLOOD_INTERVAL, "-c", &count.to_string(), to])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Self {
            what: format!("ping {to} from {}", ns.name),
            child,
        }
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the end; returns (transmitted, received).
    fn finish(&mut self) -> (u64, u64) {
        let mut text = String::new();
        if let Some(mut stdout) = self.child.stdout.take() {
            stdout.read_to_string(&mut text).unwrap();
        }
        let _ = self.child.wait();
        let what = &self.what;
        let line = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or_else(|| panic!("{what}: no summary in {text:?}"));
        let numbers: Vec<u64> = line
            .split(',')
            .take(2)
            .map(|part| part.split_whitespace().next().unwrap().parse().unwrap())
            .collect();
        let millis: f64 = line
            .rsplit("time ")
            .next()
            .and_then(|t| t.trim_end_matches("ms").trim().parse().ok())
            .unwrap_or(f64::NAN);
        eprintln!(
            "{what}: {line} ({:.0} packets/s)",
            numbers[0] as f64 * 1000.0 / millis
        );
        (numbers[0], numbers[1])
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Floods in both directions between `a` and `b` for `duration`.
fn floods(a: &Side<'_>, b: &Side<'_>, duration: Duration) -> [Flood; 2] {
    [
        Flood::start(a.ns, &b.inner, duration),
        Flood::start(b.ns, &a.inner, duration),
    ]
}

/// Asserts that the floods are still running (so they covered everything before this call),
/// waits for them to end and asserts that not one packet was lost.
fn assert_no_loss<const N: usize>(mut floods: [Flood; N]) {
    for f in &mut floods {
        assert!(
            f.running(),
            "{}: the flood ended before the rotation did; it did not cover it",
            f.what
        );
    }
    for mut f in floods {
        let (sent, received) = f.finish();
        assert!(sent > 0, "{}: nothing sent", f.what);
        assert_eq!(
            sent,
            received,
            "{}: {} of {sent} packets lost",
            f.what,
            sent - received
        );
    }
}

/// Both sides reach each other (and have a session) before a flood starts.
fn warm_up(a: &Side<'_>, b: &Side<'_>) {
    assert!(a.ns.ping(&b.inner, 3), "no tunnel from a to b");
    assert!(b.ns.ping(&a.inner, 3), "no tunnel from b to a");
}

/// The device learns `peer_key`'s rotation: it accepts `next` as the same peer and moves to it.
fn announce_next(dev: &Side<'_>, peer_key: &Key, next: &Key) {
    let mut u = PeerUpdate::new(*peer_key);
    u.next_public_key = Some(Some(*next));
    assert!(dev.dev.upsert_peer(&u).is_some());
}

/// The device's peer `next` (its next key) becomes its primary key.
fn promote(dev: &Side<'_>, next: &Key) {
    let mut u = PeerUpdate::new(*next);
    u.new_public_key = Some(*next);
    assert!(dev.dev.upsert_peer(&u).is_some());
}

/// The switch: `new` (an extra key) becomes primary; the old primary becomes an extra.
fn switch(side: &Side<'_>, new: &KeyPair, old: &KeyPair) {
    side.dev
        .apply(&ConfigUpdate {
            private_key: Some(new.private.into()),
            ..ConfigUpdate::default()
        })
        .unwrap();
    let snap = side.dev.snapshot();
    assert_eq!(snap.public_key, Some(new.public));
    assert_eq!(side.dev.private_key(), Some(new.private.into()));
    assert_eq!(
        snap.extra_public_keys,
        vec![old.public],
        "old key kept as an extra"
    );
}

/// Waits until `side`'s peer (known under `peer_key`) has an established session under the
/// local key `new`, and has sent no data under the local key `old` for [`MOVE_QUIET`]: the
/// agent's condition for retiring `old`.
fn wait_moved(side: &Side<'_>, peer_key: &Key, new: &Key, old: &Key) {
    let old_rx = |p: &PeerSnapshot| -> u64 {
        p.sessions
            .iter()
            .filter(|s| s.local_public_key == *old)
            .map(|s| s.rx_data_packets)
            .sum()
    };
    let mut last = (old_rx(&side.peer(peer_key)), Instant::now());
    wait_until(
        "the peer to move to the new key and go quiet on the old one",
        STEP_TIMEOUT,
        || {
            let p = side.peer(peer_key);
            let rx = old_rx(&p);
            if rx != last.0 {
                last = (rx, Instant::now());
            }
            let moved = p
                .sessions
                .iter()
                .any(|s| s.local_public_key == *new && s.established.is_some());
            moved && last.1.elapsed() >= MOVE_QUIET
        },
    );
}

/// Waits until `side` sends data to its peer under the peer's key `remote`.
fn wait_active_towards(side: &Side<'_>, peer_key: &Key, remote: &Key) {
    wait_until(
        "the active session to use the new key",
        STEP_TIMEOUT,
        || {
            side.peer(peer_key)
                .sessions
                .iter()
                .any(|s| s.active && s.remote_public_key == *remote && s.established.is_some())
        },
    );
}

/// After a rotation: one slot per peer, under the expected keys, and `wg show` (through the
/// UAPI socket) shows exactly one key for the peer.
fn assert_settled(side: &Side<'_>, local: &KeyPair, remote: &KeyPair) {
    let snap = side.dev.snapshot();
    assert!(snap.extra_public_keys.is_empty());
    assert_eq!(snap.peers.len(), 1);
    let p = &snap.peers[0];
    assert_eq!((p.public_key, p.next_public_key), (remote.public, None));
    assert_eq!(p.sessions.len(), 1, "one slot per peer: {:?}", p.sessions);
    let s = &p.sessions[0];
    assert_eq!(
        (s.local_public_key, s.remote_public_key),
        (local.public, remote.public)
    );
    assert!(s.active && s.established.is_some());
    let shown = dump(side.ns, side.iface());
    assert_eq!(shown.len(), 1);
    assert_eq!(shown[0].public_key, remote.b64());
    let keys = side.ns.wg(&["show", side.iface(), "public-key"]);
    assert_eq!(keys.trim(), local.b64());
}

/// Scenario 1, `a` rotating from `a0` to `a1` while `b` keeps its key; returns when done.
fn rotate_one_side(a: &Side<'_>, b: &Side<'_>, a0: &KeyPair, a1: &KeyPair) {
    // (a) A answers under its next key too.
    a.dev.set_extra_private_keys(vec![a1.private.into()]);
    assert_eq!(a.dev.snapshot().extra_public_keys, vec![a1.public]);
    // (b) B learns A's next key and moves to it by itself.
    announce_next(b, &a0.public, &a1.public);
    wait_active_towards(b, &a1.public, &a1.public);
    // (c) A initiates with the new key; the old one is still answered.
    switch(a, a1, a0);
    // Mid-rotation, `wg show` still shows one key per peer, and A's new key as its own.
    assert_eq!(dump(a.ns, a.iface()).len(), 1);
    assert_eq!(dump(b.ns, b.iface()).len(), 1);
    assert_eq!(a.ns.wg(&["show", a.iface(), "public-key"]).trim(), a1.b64());
    // (d) B is on the new key and quiet on the old one.
    let b_key = b.dev.public_key().unwrap();
    wait_moved(a, &b_key, &a1.public, &a0.public);
    // (e) A retires the old key; B makes the new key A's primary.
    a.dev.set_extra_private_keys(Vec::new());
    promote(b, &a1.public);
}

/// Two namespaces with one in-process device each, configured as peers, tunnel up.
fn mk_pair<'a>(link: &'a Link, a_key: &KeyPair, b_key: &KeyPair) -> (Side<'a>, Side<'a>) {
    let a = Side::start(&link.a, "ra", a_key, &link.a_addr, 51900, "10.79.0.1");
    let b = Side::start(&link.b, "rb", b_key, &link.b_addr, 51901, "10.79.0.2");
    pair(&a, a_key, &b, b_key);
    warm_up(&a, &b);
    (a, b)
}

#[test]
fn one_side_rotates_without_losing_a_packet() {
    if !privileged() {
        return;
    }
    let link = Link::new();
    let (a0, a1, b0) = (
        KeyPair::generate(),
        KeyPair::generate(),
        KeyPair::generate(),
    );
    let (a, b) = mk_pair(&link, &a0, &b0);

    let floods = floods(&a, &b, Duration::from_secs(20));
    std::thread::sleep(SETTLE);
    let started = Instant::now();
    rotate_one_side(&a, &b, &a0, &a1);
    eprintln!("rotation took {:?}", started.elapsed());
    std::thread::sleep(SETTLE);
    assert_no_loss(floods);

    assert_settled(&a, &a1, &b0);
    assert_settled(&b, &b0, &a1);
}

#[test]
fn both_sides_rotate_at_once_without_losing_a_packet() {
    if !privileged() {
        return;
    }
    let link = Link::new();
    let (a0, a1) = (KeyPair::generate(), KeyPair::generate());
    let (b0, b1) = (KeyPair::generate(), KeyPair::generate());
    let (a, b) = mk_pair(&link, &a0, &b0);

    let floods = floods(&a, &b, Duration::from_secs(25));
    std::thread::sleep(SETTLE);
    let started = Instant::now();
    // Each step on both sides before the next step on either.
    a.dev.set_extra_private_keys(vec![a1.private.into()]);
    b.dev.set_extra_private_keys(vec![b1.private.into()]);
    announce_next(&b, &a0.public, &a1.public);
    announce_next(&a, &b0.public, &b1.public);
    // Each side starts a handshake from its primary to the other's next key.
    wait_until(
        "both sides to reach the other's next key",
        STEP_TIMEOUT,
        || {
            let ab = a.peer(&b1.public).sessions.iter().any(|s| {
                s.local_public_key == a0.public
                    && s.remote_public_key == b1.public
                    && s.established.is_some()
            });
            let ba = b.peer(&a1.public).sessions.iter().any(|s| {
                s.local_public_key == b0.public
                    && s.remote_public_key == a1.public
                    && s.established.is_some()
            });
            ab && ba
        },
    );
    switch(&a, &a1, &a0);
    switch(&b, &b1, &b0);
    wait_moved(&a, &b1.public, &a1.public, &a0.public);
    wait_moved(&b, &a1.public, &b1.public, &b0.public);
    a.dev.set_extra_private_keys(Vec::new());
    b.dev.set_extra_private_keys(Vec::new());
    promote(&b, &a1.public);
    promote(&a, &b1.public);
    eprintln!("rotation took {:?}", started.elapsed());
    std::thread::sleep(SETTLE);
    assert_no_loss(floods);

    assert_settled(&a, &a1, &b1);
    assert_settled(&b, &b1, &a1);
}

/// An iperf3 client run in the background, with 0.2 s intervals.
fn iperf_background(ns: &Netns, server: &str, port: u16, seconds: u32) -> Child {
    iperf_client(ns, server, port, seconds)
        .args(["-i", "0.2", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn a_tcp_stream_never_stalls_during_a_rotation() {
    if !privileged() {
        return;
    }
    let link = Link::new();
    let (a0, a1, b0) = (
        KeyPair::generate(),
        KeyPair::generate(),
        KeyPair::generate(),
    );
    let (a, b) = mk_pair(&link, &a0, &b0);
    let port = 5301;
    let _server = IperfServer::start(&link.b, port);
    wait_until("iperf3 server to listen", Duration::from_secs(10), || {
        let out = link
            .b
            .cmd("ss")
            .args(["-Hltn", &format!("sport = :{port}")])
            .output()
            .unwrap();
        !out.stdout.is_empty()
    });

    let seconds = 20;
    let client = iperf_background(&link.a, &b.inner, port, seconds);
    let ends = Instant::now() + Duration::from_secs(seconds.into());
    std::thread::sleep(SETTLE);
    let started = Instant::now();
    rotate_one_side(&a, &b, &a0, &a1);
    eprintln!("rotation took {:?}", started.elapsed());
    assert!(
        Instant::now() + SETTLE < ends,
        "iperf3 ended before the rotation did; it did not cover it"
    );
    let out = client.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "iperf3 failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let intervals = v["intervals"].as_array().unwrap();
    let mut longest = 0.0f64;
    let mut run = 0.0f64;
    let mut slowest = f64::INFINITY;
    for i in intervals {
        let bytes = i["sum"]["bytes"].as_u64().unwrap();
        let secs = i["sum"]["seconds"].as_f64().unwrap();
        run = if bytes == 0 { run + secs } else { 0.0 };
        longest = longest.max(run);
        slowest = slowest.min(i["sum"]["bits_per_second"].as_f64().unwrap());
    }
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap();
    eprintln!(
        "iperf3 through the rotation: {} intervals, {:.0} Mbit/s, slowest interval {:.0} \
         Mbit/s, longest stall {longest:.1} s",
        intervals.len(),
        bps / 1e6,
        slowest / 1e6
    );
    assert!(longest <= 1.0, "the TCP stream stalled for {longest:.1} s");
    assert_settled(&a, &a1, &b0);
    assert_settled(&b, &b0, &a1);
}

#[test]
fn the_old_key_is_answered_only_while_it_is_held() {
    if !privileged() {
        return;
    }
    require_tools(&["wireguard-go"]);
    let link = Link::new();
    let (a0, a1) = (KeyPair::generate(), KeyPair::generate());
    let a = Side::start(&link.a, "oa", &a0, &link.a_addr, 51910, "10.80.0.1");
    // C only ever knows A's old key.
    let c = start_end(
        &link.b,
        Impl::WireguardGo,
        "oc",
        51911,
        "10.80.0.3",
        "fd80::3",
    );
    let c_public = from_b64(&c.keys.public);
    let c_endpoint: SocketAddr = format!("{}:{}", link.b_addr, c.port).parse().unwrap();
    a.add_peer(&c_public, c_endpoint, &c.inner4);
    let add_a_to_c = || {
        link.b.wg(&[
            "set",
            &c.dev.iface,
            "peer",
            &a0.b64(),
            "allowed-ips",
            "10.80.0.1/32",
            "endpoint",
            &a.underlay.to_string(),
        ]);
    };
    add_a_to_c();
    assert!(link.b.ping(&a.inner, 3), "no tunnel from C to A");
    assert!(link.a.ping(&c.inner4, 3), "no tunnel from A to C");

    let c_side_floods = [
        Flood::start(&link.a, &c.inner4, Duration::from_secs(15)),
        Flood::start(&link.b, &a.inner, Duration::from_secs(15)),
    ];
    std::thread::sleep(SETTLE);
    a.dev.set_extra_private_keys(vec![a1.private.into()]);
    switch(&a, &a1, &a0);
    // A tries its new key on C (which ignores it) while the old session carries the traffic,
    // through several of A's handshake attempts.
    std::thread::sleep(Duration::from_secs(8));
    assert_no_loss(c_side_floods);
    let p = a.peer(&c_public);
    assert!(
        p.sessions
            .iter()
            .any(|s| s.local_public_key == a0.public && s.active && s.established.is_some()),
        "C's session stays under A's old key: {:?}",
        p.sessions
    );

    // A new handshake from C under the old key is still answered after the switch...
    let c_handshake = || dump(&link.b, &c.dev.iface)[0].latest_handshake;
    link.b
        .wg(&["set", &c.dev.iface, "peer", &a0.b64(), "remove"]);
    add_a_to_c();
    assert_eq!(c_handshake(), 0);
    assert!(link.b.ping(&a.inner, 3), "old key not answered while held");
    assert_ne!(c_handshake(), 0);

    // ...and no longer once A dropped it.
    a.dev.set_extra_private_keys(Vec::new());
    link.b
        .wg(&["set", &c.dev.iface, "peer", &a0.b64(), "remove"]);
    add_a_to_c();
    assert!(
        !link.b.ping(&a.inner, 3),
        "old key answered after it was dropped"
    );
    assert_eq!(
        c_handshake(),
        0,
        "C completed a handshake under the dropped key"
    );
    let p = a.peer(&c_public);
    assert!(
        p.sessions.iter().all(|s| s.local_public_key == a1.public),
        "no slot under the dropped key: {:?}",
        p.sessions
    );
}

/// A mesh node `a` whose keys are decided by the agent's own code (`KeyState` and
/// `Rotator::tick`, which run `wgmesh_core::rotation`), its device given
/// `KeyState::device_keys()` after every tick as the agent's `apply_device_keys` does, and an
/// external peer `c` (an in-process device) that only ever knows `a`'s first key. `a` rotates
/// with no other node, so each step goes through at the next tick; the mesh's external grace
/// period is 24 h. Returns `a`, `c`, `a`'s first key pair and `c`'s public key once the
/// rotation completed, with `c`'s session under the old key still up if `a` kept it.
fn rotate_with_an_external_peer_on_the_old_key<'a>(
    link: &'a Link,
    state_dir: &Path,
    revoke: bool,
) -> (Side<'a>, Side<'a>, KeyPair, Key) {
    use std::collections::BTreeMap;
    use std::time::SystemTime;
    use wgmesh_agent::agent::rotation::{Inputs, Notice, Rotator};
    use wgmesh_agent::key::KeyState;
    use wgmesh_core::rotation::{Phase, Timeouts};

    let _ = std::fs::remove_dir_all(state_dir);
    let (mut keys, _) = KeyState::load_or_generate(state_dir, SystemTime::now()).unwrap();
    let a0 = KeyPair {
        private: *keys.current.private_key().as_bytes(),
        public: keys.current.public_bytes(),
    };
    let c_key = KeyPair::generate();
    let tag = if revoke { "v" } else { "g" };
    let a = Side::start(
        &link.a,
        &format!("{tag}a"),
        &a0,
        &link.a_addr,
        51920,
        "10.81.0.1",
    );
    let c = Side::start(
        &link.b,
        &format!("{tag}c"),
        &c_key,
        &link.b_addr,
        51921,
        "10.81.0.3",
    );
    pair(&a, &a0, &c, &c_key);
    warm_up(&a, &c);

    let apply = |keys: &KeyState| {
        let (initiating, answered) = keys.device_keys();
        a.dev
            .apply(&ConfigUpdate {
                private_key: Some(initiating),
                extra_private_keys: Some(answered),
                ..ConfigUpdate::default()
            })
            .unwrap();
    };
    let timeouts = Timeouts {
        acknowledge: Duration::from_secs(60),
        move_over: Duration::from_secs(60),
    };
    let granted = Inputs {
        granted: true,
        revoke,
        has_external_peers: true,
        external_grace: Duration::from_secs(86_400),
        ..Inputs::default()
    };
    let approved = Inputs {
        next_approved: true,
        ..granted.clone()
    };
    let mut rotator = Rotator::default();
    let mut notices = Vec::new();
    for inputs in [&granted, &approved, &approved] {
        notices.extend(
            rotator
                .tick(
                    &mut keys,
                    inputs,
                    &timeouts,
                    &BTreeMap::new(),
                    state_dir,
                    SystemTime::now(),
                )
                .unwrap(),
        );
        apply(&keys);
    }
    assert_eq!(keys.phase, Phase::Steady { generation: 1 }, "{notices:?}");
    assert!(
        matches!(notices.last(), Some(Notice::Completed { revoked, .. }) if *revoked == revoke),
        "{notices:?}"
    );
    let a1 = keys.current.public_bytes();
    assert_eq!(a.dev.public_key(), Some(a1));
    (a, c, a0, c_key.public)
}

/// `c` forgets its sessions with `a` and tries a fresh handshake under `a`'s old key.
fn fresh_handshake_to_old_key(a: &Side<'_>, c: &Side<'_>, a0: &KeyPair) -> bool {
    assert!(c.dev.remove_peer(&a0.public));
    c.add_peer(&a0.public, a.underlay, &a.inner);
    assert!(c.peer(&a0.public).last_handshake.is_none());
    let reached = c.ns.ping(&a.inner, 3);
    assert_eq!(
        reached,
        c.peer(&a0.public).last_handshake.is_some(),
        "a ping gets through exactly when a handshake completed"
    );
    reached
}

#[test]
fn after_an_ordinary_rotation_a_peer_on_the_old_key_still_reaches_the_node_within_the_grace() {
    if !privileged() {
        return;
    }
    let link = Link::new();
    let dir = std::env::temp_dir().join(format!("wgmesh-grace-{}", std::process::id()));
    let (a, c, a0, _) = rotate_with_an_external_peer_on_the_old_key(&link, &dir, false);
    assert_eq!(a.dev.snapshot().extra_public_keys, vec![a0.public]);
    assert!(
        c.ns.ping(&a.inner, 3),
        "the session under the old key broke"
    );
    assert!(
        fresh_handshake_to_old_key(&a, &c, &a0),
        "a new handshake under the old key failed within the grace period"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn after_a_revocation_a_peer_on_the_old_key_can_no_longer_reach_the_node() {
    if !privileged() {
        return;
    }
    let link = Link::new();
    let dir = std::env::temp_dir().join(format!("wgmesh-revoke-{}", std::process::id()));
    let (a, c, a0, c_public) = rotate_with_an_external_peer_on_the_old_key(&link, &dir, true);
    assert!(
        a.dev.snapshot().extra_public_keys.is_empty(),
        "the device still answers an old key"
    );
    // The session under the old key is gone with it, not just new handshakes refused.
    assert!(
        a.peer(&c_public)
            .sessions
            .iter()
            .all(|s| s.local_public_key != a0.public),
        "a session under the revoked key survives: {:?}",
        a.peer(&c_public).sessions
    );
    assert!(
        !c.ns.ping(&a.inner, 3),
        "the session under the revoked key still carries traffic"
    );
    assert!(
        !fresh_handshake_to_old_key(&a, &c, &a0),
        "a handshake under the revoked key completed"
    );
    // The peer is reachable again once it is given the new key.
    let a1 = a.dev.public_key().unwrap();
    assert!(c.dev.remove_peer(&a0.public));
    c.add_peer(&a1, a.underlay, &a.inner);
    assert!(
        c.ns.ping(&a.inner, 5),
        "not reachable under the new key either"
    );
    std::fs::remove_dir_all(&dir).ok();
}
