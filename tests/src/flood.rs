//! A handshake-initiation flood against one WireGuard device, for tests of its abuse limits.
//!
//! It makes one valid initiation (a random static key, addressed to the target's public key,
//! so MAC1 is right) with boringtun's `Tunn`, picks up the cookie the target answers with once
//! it is under load (so the initiation then carries a valid MAC2 as well, the costliest kind:
//! every copy passes the cookie check and asks for Diffie-Hellman work), and replays it at a
//! fixed rate from one UDP socket. Cookie replies that arrive while flooding are fed back in
//! and the initiation re-made; it is re-made every [`COOKIE_REFRESH`] anyway.
//!
//! It owns its socket and nothing else; it never asserts anything, it reports figures.

use anyhow::{Context, Result};
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

/// How often the initiation is re-made (the target's cookie secret turns every two minutes).
pub const COOKIE_REFRESH: Duration = Duration::from_secs(60);
/// How long the first cookie is waited for before flooding without one.
const COOKIE_WAIT: Duration = Duration::from_secs(2);
/// Initiations sent while waiting for a cookie, to put the target under load.
const PRIME_BURST: usize = 400;
/// Message type of a cookie reply.
const COOKIE_REPLY: u8 = 3;
/// Sleep between sending rounds; packets due meanwhile go out in the next round.
const PACING: Duration = Duration::from_micros(500);

/// What to flood.
#[derive(Debug, Clone)]
pub struct FloodConfig {
    /// The target device's UDP address.
    pub target: SocketAddr,
    /// The target device's public key.
    pub peer_public_key: [u8; 32],
    /// Initiations per second.
    pub rate: u64,
    /// How long.
    pub duration: Duration,
    /// Source address to send from; `None` lets the kernel choose.
    pub source: Option<IpAddr>,
}

/// What a flood did.
#[derive(Debug, Clone, Copy, Default)]
pub struct FloodReport {
    /// Initiations sent.
    pub sent: u64,
    /// Sends the kernel refused (buffer full, ICMP unreachable).
    pub send_errors: u64,
    /// Seconds the flood ran.
    pub seconds: f64,
    /// Cookie replies received.
    pub cookies: u64,
    /// Whether the initiation carried a cookie (MAC2) when the flood started.
    pub had_cookie: bool,
}

impl FloodReport {
    /// Initiations per second achieved.
    pub fn rate(&self) -> f64 {
        if self.seconds > 0.0 {
            self.sent as f64 / self.seconds
        } else {
            0.0
        }
    }
}

impl std::fmt::Display for FloodReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sent {} initiations in {:.2} s: {:.0} packets/s ({} send errors, {} cookie replies, \
             started {} a cookie)",
            self.sent,
            self.seconds,
            self.rate(),
            self.send_errors,
            self.cookies,
            if self.had_cookie { "with" } else { "without" }
        )
    }
}

/// The initiator side: a `Tunn` that makes initiations and takes cookie replies.
struct Initiator {
    tunn: Tunn,
    target: SocketAddr,
    packet: Vec<u8>,
    scratch: Vec<u8>,
}

impl Initiator {
    fn new(config: &FloodConfig) -> Self {
        let secret = StaticSecret::random_from_rng(rand_core::OsRng);
        let index = rand_core::RngCore::next_u32(&mut rand_core::OsRng) >> 8;
        let tunn = Tunn::new(
            secret,
            PublicKey::from(config.peer_public_key),
            None,
            None,
            index,
            None,
        );
        let mut me = Self {
            tunn,
            target: config.target,
            packet: Vec::new(),
            scratch: vec![0u8; 2048],
        };
        me.remake();
        me
    }

    /// Makes a fresh initiation (with MAC2 if a cookie is known).
    fn remake(&mut self) {
        if let TunnResult::WriteToNetwork(p) = self
            .tunn
            .format_handshake_initiation(&mut self.scratch, true)
        {
            self.packet = p.to_vec();
        }
    }

    /// Takes a datagram from the target; returns whether it was a cookie reply (the
    /// initiation is then re-made with it).
    fn receive(&mut self, datagram: &[u8]) -> bool {
        if datagram.first() != Some(&COOKIE_REPLY) {
            return false;
        }
        // A cookie reply answers the initiation in flight; `Tunn` keeps the cookie.
        let _ = self
            .tunn
            .decapsulate(Some(self.target.ip()), datagram, &mut self.scratch);
        self.remake();
        true
    }
}

/// Floods `config.target`; blocks for `config.duration` (plus up to [`COOKIE_WAIT`]).
/// `started` is called once the target is under load (with a cookie, if it sent one) and
/// the timed flood begins.
pub fn run(config: &FloodConfig, started: impl FnOnce(&FloodReport)) -> Result<FloodReport> {
    let any = if config.target.is_ipv4() {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    };
    let bind = SocketAddr::new(config.source.unwrap_or(any), 0);
    let socket = UdpSocket::bind(bind).context("binding the flood socket")?;
    socket
        .connect(config.target)
        .with_context(|| format!("connecting to {}", config.target))?;
    let mut init = Initiator::new(config);
    let mut report = FloodReport::default();
    let mut buf = vec![0u8; 2048];

    // Put the target under load and wait for its cookie.
    socket.set_read_timeout(Some(Duration::from_millis(50)))?;
    let wait_until = Instant::now() + COOKIE_WAIT;
    'prime: while Instant::now() < wait_until {
        for _ in 0..PRIME_BURST {
            let _ = socket.send(&init.packet);
        }
        while let Ok(n) = socket.recv(&mut buf) {
            if init.receive(&buf[..n]) {
                report.cookies += 1;
                report.had_cookie = true;
                break 'prime;
            }
        }
    }
    socket.set_nonblocking(true)?;
    started(&report);

    let start = Instant::now();
    let end = start + config.duration;
    let mut refreshed = start;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        let due = (now - start).as_secs_f64() * config.rate as f64;
        while (report.sent as f64) < due {
            match socket.send(&init.packet) {
                Ok(_) => report.sent += 1,
                Err(_) => {
                    report.send_errors += 1;
                    break;
                }
            }
        }
        while let Ok(n) = socket.recv(&mut buf) {
            if init.receive(&buf[..n]) {
                report.cookies += 1;
            }
        }
        if now - refreshed >= COOKIE_REFRESH {
            init.remake();
            refreshed = now;
        }
        // Pacing, not synchronisation: the packets due meanwhile go out in the next round.
        std::thread::sleep(PACING);
    }
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}
