//! Time as the device loop sees it: a swappable clock, the tick schedule of the timer thread and
//! the wall-clock time of a handshake (a peer's last one, a session slot's current one).
//!
//! `Tunn` keeps its own protocol timers (rekey, retransmit, keepalive, expiry); the loop only has
//! to call `Tunn::update_timers` often enough. What the loop decides itself lives here, as pure
//! functions of a `now` that tests inject. Nothing here does I/O or sleeps.

use std::time::{Duration, Instant, SystemTime};

/// How often `Tunn::update_timers` runs for every session slot of every peer. boringtun rounds
/// its timers to this cadence, so it bounds the precision of retransmits and of the reported
/// handshake time.
pub const TIMER_TICK: Duration = Duration::from_millis(100);

/// How often the handshake rate limiters' counters are reset (their window is one second).
pub const RATE_LIMITER_RESET: Duration = Duration::from_secs(1);

/// A reported last-handshake time that moves by less than this is kept as it was, so `wg show`
/// does not jitter by the timer tick between calls.
const HANDSHAKE_TIME_SLACK: Duration = Duration::from_secs(1);

/// Source of monotonic and wall-clock time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Monotonic now.
    fn now(&self) -> Instant;
    /// Wall-clock now.
    fn wall(&self) -> SystemTime;
}

/// The operating system's clocks.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// What the timer thread must do on one wake-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TickWork {
    /// Run `update_timers` on every peer's session slots.
    pub update_peers: bool,
    /// Reset the rate limiters' counters (one per local key).
    pub reset_rate_limiter: bool,
}

/// Schedule of the timer thread: peer timers every [`TIMER_TICK`], rate limiter every
/// [`RATE_LIMITER_RESET`]. Late wake-ups do not cause bursts of catch-up work.
#[derive(Debug, Clone)]
pub struct TickSchedule {
    next_peers: Instant,
    next_rate_limiter: Instant,
}

impl TickSchedule {
    /// A schedule whose first work is due at `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            next_peers: now,
            next_rate_limiter: now + RATE_LIMITER_RESET,
        }
    }

    /// The work due at `now`; advances the schedule past `now`.
    pub fn poll(&mut self, now: Instant) -> TickWork {
        let work = TickWork {
            update_peers: now >= self.next_peers,
            reset_rate_limiter: now >= self.next_rate_limiter,
        };
        if work.update_peers {
            self.next_peers = advance(self.next_peers, TIMER_TICK, now);
        }
        if work.reset_rate_limiter {
            self.next_rate_limiter = advance(self.next_rate_limiter, RATE_LIMITER_RESET, now);
        }
        work
    }

    /// How long to sleep from `now` until the next work is due.
    pub fn sleep_for(&self, now: Instant) -> Duration {
        self.next_peers
            .min(self.next_rate_limiter)
            .saturating_duration_since(now)
    }
}

/// The next deadline after `now` on the grid `from + k * period`.
fn advance(from: Instant, period: Duration, now: Instant) -> Instant {
    let next = from + period;
    if next > now {
        return next;
    }
    // We slept through several periods: skip them instead of running them back to back.
    let behind = now.duration_since(from).as_nanos() / period.as_nanos();
    let steps = u32::try_from(behind + 1).unwrap_or(u32::MAX);
    from + period * steps
}

/// The wall-clock time of a handshake: a peer's last one, or a session slot's current one.
///
/// `Tunn` only says how long ago its current session was established, and forgets once the
/// session expires. WireGuard reports the handshake as wall time (seconds and nanoseconds since
/// the epoch) and keeps reporting it after expiry; this tracker converts and remembers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HandshakeTime {
    wall: Option<SystemTime>,
}

impl HandshakeTime {
    /// Folds in what `Tunn::time_since_last_handshake` says at wall time `wall_now`, and returns
    /// the time to report.
    pub fn observe(&mut self, since: Option<Duration>, wall_now: SystemTime) -> Option<SystemTime> {
        if let Some(since) = since {
            let at = wall_now
                .checked_sub(since)
                .unwrap_or(SystemTime::UNIX_EPOCH);
            let moved = match self.wall {
                None => true,
                Some(prev) => match at.duration_since(prev) {
                    Ok(d) => d >= HANDSHAKE_TIME_SLACK,
                    Err(e) => e.duration() >= HANDSHAKE_TIME_SLACK,
                },
            };
            if moved {
                self.wall = Some(at);
            }
        }
        self.wall
    }

    /// The last reported handshake time, if any.
    pub fn get(&self) -> Option<SystemTime> {
        self.wall
    }

    /// `(seconds, nanoseconds)` since the epoch, `(0, 0)` when there was no handshake, as the
    /// UAPI `last_handshake_time_sec`/`_nsec` fields want.
    pub fn as_epoch(&self) -> (u64, u32) {
        match self
            .wall
            .and_then(|w| w.duration_since(SystemTime::UNIX_EPOCH).ok())
        {
            Some(d) => (d.as_secs(), d.subsec_nanos()),
            None => (0, 0),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::Mutex;

    /// A clock tests move by hand.
    #[derive(Debug)]
    pub(crate) struct FakeClock {
        inner: Mutex<(Instant, SystemTime)>,
    }

    impl FakeClock {
        pub(crate) fn new() -> Self {
            Self {
                inner: Mutex::new((
                    Instant::now(),
                    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
                )),
            }
        }
        pub(crate) fn advance(&self, d: Duration) {
            let mut g = self.inner.lock().unwrap();
            g.0 += d;
            g.1 += d;
        }
    }

    impl Clock for FakeClock {
        fn now(&self) -> Instant {
            self.inner.lock().unwrap().0
        }
        fn wall(&self) -> SystemTime {
            self.inner.lock().unwrap().1
        }
    }

    #[test]
    fn schedule_runs_peers_every_tick_and_rate_limiter_every_second() {
        let clock = FakeClock::new();
        let mut s = TickSchedule::new(clock.now());
        let mut peer_runs = 0;
        let mut rl_runs = 0;
        for _ in 0..30 {
            let w = s.poll(clock.now());
            peer_runs += u32::from(w.update_peers);
            rl_runs += u32::from(w.reset_rate_limiter);
            assert!(s.sleep_for(clock.now()) <= TIMER_TICK);
            clock.advance(TIMER_TICK);
        }
        assert_eq!(peer_runs, 30);
        assert_eq!(rl_runs, 2, "at 1.0 s and 2.0 s");
    }

    #[test]
    fn schedule_does_not_burst_after_a_long_stall() {
        let clock = FakeClock::new();
        let mut s = TickSchedule::new(clock.now());
        assert!(s.poll(clock.now()).update_peers);
        clock.advance(Duration::from_secs(10) + Duration::from_millis(30));
        let w = s.poll(clock.now());
        assert!(w.update_peers && w.reset_rate_limiter);
        // Everything was caught up in one go; nothing is due right after.
        let w = s.poll(clock.now());
        assert!(!w.update_peers && !w.reset_rate_limiter);
        assert_eq!(s.sleep_for(clock.now()), Duration::from_millis(70));
    }

    #[test]
    fn schedule_sleeps_until_the_next_deadline() {
        let clock = FakeClock::new();
        let mut s = TickSchedule::new(clock.now());
        s.poll(clock.now());
        clock.advance(Duration::from_millis(40));
        assert_eq!(
            s.poll(clock.now()),
            TickWork {
                update_peers: false,
                reset_rate_limiter: false
            }
        );
        assert_eq!(s.sleep_for(clock.now()), Duration::from_millis(60));
    }

    #[test]
    fn handshake_time_is_wall_clock_and_stable() {
        let clock = FakeClock::new();
        let mut h = HandshakeTime::default();
        assert_eq!(h.observe(None, clock.wall()), None);
        assert_eq!(h.as_epoch(), (0, 0));

        // Session established 3 s ago.
        let first = h
            .observe(Some(Duration::from_secs(3)), clock.wall())
            .unwrap();
        assert_eq!(first, clock.wall() - Duration::from_secs(3));
        assert_eq!(h.as_epoch(), (1_700_000_000 - 3, 0));

        // Time passes; Tunn's rounding moves its answer by one tick: the report stays put.
        clock.advance(Duration::from_secs(5));
        let again = h
            .observe(Some(Duration::from_millis(8_100)), clock.wall())
            .unwrap();
        assert_eq!(again, first);

        // A new handshake moves it.
        let newer = h
            .observe(Some(Duration::from_millis(500)), clock.wall())
            .unwrap();
        assert_eq!(newer, clock.wall() - Duration::from_millis(500));
        assert_eq!(h.as_epoch(), (1_700_000_004, 500_000_000));

        // The session expires: Tunn forgets, we keep reporting the last handshake.
        clock.advance(Duration::from_secs(600));
        assert_eq!(h.observe(None, clock.wall()), Some(newer));
    }
}
