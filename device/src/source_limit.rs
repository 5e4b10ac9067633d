//! Per-source-address limit on handshake messages, the second line of defence after boringtun's
//! per-key `RateLimiter` (which only makes initiators prove their address with a cookie once
//! the device is under load: a flooder that has a cookie gets Diffie-Hellman work for every
//! initiation it sends). Like wireguard-go's `ratelimiter`: a token bucket per source IP,
//! [`HANDSHAKES_PER_SECOND`] with a burst of [`HANDSHAKE_BURST`], entries of idle sources
//! collected.
//!
//! This module owns the buckets and nothing else. It is pure: the caller passes `now`, checks a
//! message after its MAC1 and cookie and before any Diffie-Hellman, and drops it when
//! [`SourceLimiter::allow`] says no. Like wireguard-go, the caller asks only while the device is
//! under load, when a message has to carry a valid cookie: its source has then proved it
//! receives at that address, so a sender spoofing a peer's address cannot spend the peer's
//! tokens. The table never holds more than [`MAX_SOURCES`] entries.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Handshake messages per second one source address gets processed (wireguard-go's figure).
/// A legitimate peer sends one initiation per session slot every few seconds at most.
pub const HANDSHAKES_PER_SECOND: u32 = 20;
/// Messages a source may send at once after being quiet.
pub const HANDSHAKE_BURST: u32 = 5;
/// Sources tracked at most. Sources that reach the table have passed MAC1 and the cookie
/// check (so they own their address); more than this at once is a distributed attack that the
/// per-key limiter and cookies have to carry.
pub const MAX_SOURCES: usize = 4096;
/// A source quiet for this long has a full bucket again: its entry carries nothing and goes.
pub const SOURCE_IDLE: Duration = Duration::from_secs(1);

/// Cost of one message in bucket time: a bucket holds time, refilled by the clock.
const COST: Duration = Duration::from_nanos(1_000_000_000 / HANDSHAKES_PER_SECOND as u64);
/// A full bucket.
const CAPACITY: Duration = Duration::from_nanos(COST.as_nanos() as u64 * HANDSHAKE_BURST as u64);

/// One source's bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Time in the bucket at `last`, at most [`CAPACITY`].
    tokens: Duration,
    /// When the source was last seen.
    last: Instant,
}

/// The buckets of every source seen lately.
#[derive(Debug, Default)]
pub struct SourceLimiter {
    buckets: HashMap<IpAddr, Bucket>,
}

impl SourceLimiter {
    /// No sources.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a handshake message from `source` at `now` may be processed; takes a token
    /// if so. IPv6 sources count per /64, as one host usually holds the whole prefix.
    pub fn allow(&mut self, source: IpAddr, now: Instant) -> bool {
        let source = bucket_key(source);
        if !self.buckets.contains_key(&source) && self.buckets.len() >= MAX_SOURCES {
            self.collect(now);
            if self.buckets.len() >= MAX_SOURCES {
                // Still full of live sources: give up the one that happens to come first. It
                // starts over with a full bucket if it returns, which costs at most a burst.
                if let Some(victim) = self.buckets.keys().next().copied() {
                    self.buckets.remove(&victim);
                }
            }
        }
        let bucket = self.buckets.entry(source).or_insert(Bucket {
            tokens: CAPACITY,
            last: now,
        });
        let elapsed = now.saturating_duration_since(bucket.last);
        bucket.tokens = (bucket.tokens + elapsed).min(CAPACITY);
        bucket.last = now;
        match bucket.tokens.checked_sub(COST) {
            Some(left) => {
                bucket.tokens = left;
                true
            }
            None => false,
        }
    }

    /// Drops the entries of sources quiet for [`SOURCE_IDLE`] (their buckets are full again).
    pub fn collect(&mut self, now: Instant) {
        self.buckets
            .retain(|_, b| now.saturating_duration_since(b.last) < SOURCE_IDLE);
    }

    /// Sources tracked.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no source is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// The address a bucket is kept for: IPv4 as is (v4-mapped IPv6 too), IPv6 by its /64.
fn bucket_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut octets = v6.octets();
                octets[8..].fill(0);
                IpAddr::from(octets)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));

    fn allowed(l: &mut SourceLimiter, ip: IpAddr, at: Instant, n: usize) -> usize {
        (0..n).filter(|_| l.allow(ip, at)).count()
    }

    #[test]
    fn a_source_gets_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut l = SourceLimiter::new();
        assert_eq!(allowed(&mut l, A, t0, 100), HANDSHAKE_BURST as usize);
        // One second of flooding at 1000/s gets exactly the rate through.
        let mut through = 0;
        for ms in 1..=1000 {
            through += usize::from(l.allow(A, t0 + Duration::from_millis(ms)));
        }
        assert_eq!(through, HANDSHAKES_PER_SECOND as usize);
    }

    #[test]
    fn sources_do_not_share_buckets() {
        let t0 = Instant::now();
        let mut l = SourceLimiter::new();
        assert_eq!(allowed(&mut l, A, t0, 50), HANDSHAKE_BURST as usize);
        assert_eq!(allowed(&mut l, B, t0, 50), HANDSHAKE_BURST as usize);
    }

    #[test]
    fn an_ipv6_prefix_is_one_source_and_mapped_ipv4_is_ipv4() {
        let t0 = Instant::now();
        let mut l = SourceLimiter::new();
        let burst = HANDSHAKE_BURST as usize;
        let base = Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, 0);
        for host in 0..burst as u16 {
            let ip = Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 7, host);
            assert!(l.allow(IpAddr::V6(ip), t0));
        }
        assert!(!l.allow(IpAddr::V6(base), t0), "the /64 has used its burst");
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped());
        assert_eq!(allowed(&mut l, A, t0, 1), 1);
        assert_eq!(allowed(&mut l, mapped, t0, 50), burst - 1);
    }

    #[test]
    fn idle_sources_are_collected_and_come_back_with_a_full_bucket() {
        let t0 = Instant::now();
        let mut l = SourceLimiter::new();
        allowed(&mut l, A, t0, 50);
        l.collect(t0 + SOURCE_IDLE / 2);
        assert_eq!(l.len(), 1, "still draining");
        l.collect(t0 + SOURCE_IDLE);
        assert!(l.is_empty());
        assert_eq!(
            allowed(&mut l, A, t0 + SOURCE_IDLE, 50),
            HANDSHAKE_BURST as usize
        );
    }

    #[test]
    fn the_table_never_outgrows_its_cap() {
        let t0 = Instant::now();
        let mut l = SourceLimiter::new();
        for i in 0..(MAX_SOURCES as u32 + 1000) {
            assert!(l.allow(IpAddr::V4(Ipv4Addr::from(i)), t0));
            assert!(l.len() <= MAX_SOURCES);
        }
        // Once they are idle, a new source makes room by collecting them.
        assert!(l.allow(A, t0 + SOURCE_IDLE));
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn a_clock_going_backwards_does_not_refill() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut l = SourceLimiter::new();
        allowed(&mut l, A, t0, 50);
        assert_eq!(allowed(&mut l, A, t0 - Duration::from_secs(5), 50), 0);
    }

    proptest! {
        /// Over any schedule, a source never gets more than its burst plus the rate times the
        /// time elapsed, and the table stays bounded.
        #[test]
        fn never_more_than_burst_plus_rate(
            steps in proptest::collection::vec((0u64..200, 0u8..4), 1..400),
        ) {
            let t0 = Instant::now();
            let mut l = SourceLimiter::new();
            let mut now = t0;
            let mut through = [0u64; 4];
            for (advance_ms, source) in steps {
                now += Duration::from_millis(advance_ms);
                let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, source));
                through[usize::from(source)] += u64::from(l.allow(ip, now));
                if advance_ms % 7 == 0 {
                    l.collect(now);
                }
                prop_assert!(l.len() <= 4);
            }
            let elapsed_ms = now.duration_since(t0).as_millis() as u64;
            let bound = u64::from(HANDSHAKE_BURST)
                + elapsed_ms * u64::from(HANDSHAKES_PER_SECOND) / 1000;
            for n in through {
                prop_assert!(n <= bound, "{n} > {bound}");
            }
        }
    }
}
