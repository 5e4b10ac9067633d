//! `ping -D` at 100 or more echo requests a second, read while it runs, and what it saw:
//! packets sent and lost, the longest gap between replies, the rate achieved. Shared by the
//! end-to-end tests that measure loss through a rotation or an upgrade.

use crate::netns::{longest_gap, signal};
use anyhow::{Context, Result};
use std::collections::BTreeSet;
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::Instant;

/// Replies older than this when a pinger stops must have arrived; younger ones may still be
/// in flight.
pub const IN_FLIGHT: u64 = 100;

/// The interval asked of ping. iputils sleeps in kernel ticks: on a 250 Hz kernel `-i 0.01`
/// comes out at about 60 packets a second, `-i 0.008` at 110-125. The rate achieved is
/// measured and reported, and must be at least 100 per second.
pub const PING_INTERVAL: &str = "0.008";

/// A running `ping -D`, read as it runs.
#[derive(Debug)]
pub struct Pinger {
    label: String,
    child: Child,
    reader: JoinHandle<String>,
    started: Instant,
}

/// What a pinger saw.
#[derive(Debug)]
pub struct PingResult {
    pub label: String,
    pub sent: u64,
    /// Sequence numbers never answered (except the last [`IN_FLIGHT`]).
    pub lost: Vec<u64>,
    /// Seconds between the two replies furthest apart.
    pub longest_gap: f64,
    /// Echo requests per second achieved.
    pub rate: f64,
}

impl Pinger {
    /// Runs `ping -D …` as `cmd` says, reading its output as it runs.
    pub fn spawn(mut cmd: Command, label: String) -> Result<Pinger> {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
        let mut stdout = child.stdout.take().context("ping stdout")?;
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        Ok(Pinger {
            label,
            child,
            reader,
            started: Instant::now(),
        })
    }

    /// Stops the pinger; every echo sent more than [`IN_FLIGHT`] packets before the end
    /// must have been answered.
    pub fn stop(mut self) -> Result<PingResult> {
        let elapsed = self.started.elapsed().as_secs_f64();
        signal(&self.child, "INT");
        let _ = self.child.wait();
        let out = self.reader.join().map_err(|_| anyhow::anyhow!("reader"))?;
        let sent: u64 = out
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("no ping summary in {out:?}"))?;
        let replied: BTreeSet<u64> = out
            .lines()
            .filter(|l| l.contains("bytes from"))
            .filter_map(|l| l.split("icmp_seq=").nth(1))
            .filter_map(|r| r.split_whitespace().next())
            .filter_map(|n| n.parse().ok())
            .collect();
        let lost = (1..=sent.saturating_sub(IN_FLIGHT))
            .filter(|s| !replied.contains(s))
            .collect();
        Ok(PingResult {
            label: self.label,
            sent,
            lost,
            longest_gap: longest_gap(&out),
            rate: sent as f64 / elapsed.max(0.001),
        })
    }
}

/// Several pingers' results together.
#[derive(Debug)]
pub struct Summary {
    pub results: Vec<PingResult>,
    /// Echo requests sent, by all.
    pub sent: u64,
    /// Echo requests never answered, by all.
    pub lost: usize,
    /// The longest gap between replies of any one pinger, seconds.
    pub gap: f64,
    /// The rate of the slowest pinger, per second.
    pub slowest: f64,
}

impl Summary {
    /// Stops every pinger and sums up what they saw.
    pub fn stop(pingers: Vec<Pinger>) -> Result<Summary> {
        let results: Vec<PingResult> = pingers
            .into_iter()
            .map(Pinger::stop)
            .collect::<Result<_>>()?;
        Ok(Summary {
            sent: results.iter().map(|r| r.sent).sum(),
            lost: results.iter().map(|r| r.lost.len()).sum(),
            gap: results.iter().map(|r| r.longest_gap).fold(0.0, f64::max),
            slowest: results.iter().map(|r| r.rate).fold(f64::MAX, f64::min),
            results,
        })
    }

    /// Panics, naming `title`, unless every pinger ran at 100 or more per second and lost
    /// nothing.
    pub fn assert_nothing_lost(&self, title: &str) {
        assert!(
            self.slowest >= 100.0,
            "{title}: a pinger managed only {:.0} echo requests per second",
            self.slowest
        );
        for r in &self.results {
            assert!(
                r.lost.is_empty(),
                "{title}: {} lost {} of {} pings: {:?}",
                r.label,
                r.lost.len(),
                r.sent,
                &r.lost[..r.lost.len().min(20)]
            );
        }
    }
}
