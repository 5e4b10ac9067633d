//! The agent's Prometheus metrics, served by `wgmesh_telemetry` with `/healthz` and `/readyz`.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        histogram::Histogram,
    },
    registry::Registry,
};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use wgmesh_device::config::{DeviceSnapshot, Key};
use wgmesh_telemetry::Telemetry;

/// Labels of per-peer metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer: String,
}

/// Labels of error counters: the stage of a pass that failed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub stage: String,
}

/// Labels of watch events: the kind of object, and whether the event woke a pass.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WatchLabels {
    pub kind: String,
    pub wakes: String,
}

/// The stages `errors_total` counts, each exported from the start.
pub const ERROR_STAGES: [&str; 10] = [
    "address",
    "cni",
    "device",
    "event",
    "key",
    "masquerade",
    "report",
    "routes",
    "state",
    "status",
];

/// Every metric the agent exports.
#[derive(Debug)]
pub struct Metrics {
    telemetry: Arc<Telemetry>,
    /// Passes run.
    pub applies: Counter,
    /// How long each pass took.
    pub pass_duration: Histogram,
    /// Errors by stage.
    pub errors: Family<StageLabels, Counter>,
    /// Status writes.
    pub status_writes: Counter,
    /// Writes of the node's `MeshPeerReport`.
    pub report_writes: Counter,
    /// Watch events received (objects added, changed or deleted), by kind and whether they
    /// changed what a pass reads.
    pub watch_events: Family<WatchLabels, Counter>,
    /// 1 while the WireGuard device is up.
    pub device_up: Gauge,
    /// Peers routed in the clear because of the fallback.
    pub plaintext_peers: Gauge,
    /// The device the per-peer figures are read from at each scrape ([`PeerFigures`]).
    peers: Arc<PeerFigures>,
    /// The node's current key generation.
    pub key_generation: Gauge,
    /// The node's rotation phase: 0 steady, 1 prepared, 2 switched.
    pub rotation_phase: Gauge,
    /// Rotations ended, by result: `completed`, `laggards` (completed without some peers),
    /// `abandoned` (the next key was never approved).
    pub rotations: Family<ResultLabels, Counter>,
    /// Seconds the last completed rotation took, from generating the next key to retiring
    /// the old one.
    pub rotation_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
}

/// Labels of the rotation counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("wgmesh_agent");
        let m = Metrics {
            telemetry: Arc::default(),
            applies: Counter::default(),
            pass_duration: Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
            errors: Family::default(),
            status_writes: Counter::default(),
            report_writes: Counter::default(),
            watch_events: Family::default(),
            device_up: Gauge::default(),
            plaintext_peers: Gauge::default(),
            peers: Arc::default(),
            key_generation: Gauge::default(),
            rotation_phase: Gauge::default(),
            rotations: Family::default(),
            rotation_seconds: Gauge::default(),
        };
        registry.register(
            "key_generation",
            "The node's current WireGuard key generation",
            m.key_generation.clone(),
        );
        registry.register(
            "key_rotation_phase",
            "The node's key rotation phase: 0 steady, 1 prepared, 2 switched",
            m.rotation_phase.clone(),
        );
        registry.register(
            "key_rotations",
            "Key rotations ended, by result (completed, laggards, abandoned)",
            m.rotations.clone(),
        );
        registry.register(
            "key_rotation_duration_seconds",
            "Seconds the last completed key rotation took",
            m.rotation_seconds.clone(),
        );
        registry.register("applies", "Passes run", m.applies.clone());
        registry.register(
            "pass_duration_seconds",
            "How long each pass took",
            m.pass_duration.clone(),
        );
        registry.register("errors", "Errors by stage", m.errors.clone());
        registry.register(
            "status_writes",
            "MeshPeer status writes",
            m.status_writes.clone(),
        );
        registry.register(
            "report_writes",
            "MeshPeerReport writes",
            m.report_writes.clone(),
        );
        registry.register(
            "watch_events",
            "Watch events received, by kind and whether they changed what a pass reads (wakes)",
            m.watch_events.clone(),
        );
        registry.register(
            "device_up",
            "1 while the WireGuard device is up",
            m.device_up.clone(),
        );
        registry.register(
            "plaintext_peers",
            "Peers routed unencrypted because the device is down and the mesh allows a fallback",
            m.plaintext_peers.clone(),
        );
        registry.register_collector(Box::new(m.peers.clone()));
        // Every stage at 0 from the start: an alert on the rate of errors sees the first.
        for stage in ERROR_STAGES {
            let _ = m.errors.get_or_create(&StageLabels {
                stage: stage.to_owned(),
            });
        }
        Metrics {
            telemetry: Arc::new(Telemetry::new(registry)),
            ..m
        }
    }

    /// Counts a watch event of `kind`, and whether it woke a pass.
    pub fn watch_event(&self, kind: &str, wakes: bool) {
        self.watch_events
            .get_or_create(&WatchLabels {
                kind: kind.to_owned(),
                wakes: wakes.to_string(),
            })
            .inc();
    }

    /// Sets the agent's readiness: ready means the device is up, the routes are installed
    /// and the CNI configuration is written.
    pub fn set_readiness(&self, ready: bool) {
        self.telemetry.set_readiness(ready);
    }

    /// The endpoint serving these metrics.
    pub fn telemetry(&self) -> Arc<Telemetry> {
        self.telemetry.clone()
    }

    /// Counts one error of `stage`.
    pub fn error(&self, stage: &str) {
        self.errors
            .get_or_create(&StageLabels {
                stage: stage.to_owned(),
            })
            .inc();
    }

    /// Counts one ended rotation.
    pub fn rotation_ended(&self, result: &str) {
        self.rotations
            .get_or_create(&ResultLabels {
                result: result.to_owned(),
            })
            .inc();
    }

    /// Where the per-peer figures come from: the device (a snapshot of it) and the names of
    /// its peers' keys, set after every pass; `None` while there is no device.
    pub fn read_peers_from(&self, source: Option<PeerSource>) {
        *self.peers.source.lock().unwrap_or_else(|e| e.into_inner()) = source;
    }
}

/// Reads the device: what a scrape calls.
pub type Snapshotter = Box<dyn Fn() -> DeviceSnapshot + Send + Sync>;

/// The device's peers as a scrape reads them.
pub struct PeerSource {
    /// A snapshot of the device, taken at the scrape.
    pub snapshot: Snapshotter,
    /// The peers' names, by key; a peer whose key is not here is not exported.
    pub names: BTreeMap<Key, String>,
}

impl std::fmt::Debug for PeerSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerSource")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

/// The per-peer metrics, read from the device when they are scraped: a handshake shows at
/// once and an age is the age now. Read at the end of a pass instead, a peer whose
/// handshake came after it would read `never` until the next pass, and every age would
/// stop growing between passes.
#[derive(Debug, Default)]
struct PeerFigures {
    source: Mutex<Option<PeerSource>>,
}

impl PeerFigures {
    /// The figures now, or `None` while there is no device.
    fn read(&self, now: SystemTime) -> Option<PeerReading> {
        let source = self.source.lock().unwrap_or_else(|e| e.into_inner());
        let source = source.as_ref()?;
        let snapshot = (source.snapshot)();
        let rx = Family::<PeerLabels, Gauge>::default();
        let tx = Family::<PeerLabels, Gauge>::default();
        let age = Family::<PeerLabels, Gauge>::default();
        for p in &snapshot.peers {
            let Some(name) = source.names.get(&p.public_key) else {
                continue;
            };
            let labels = PeerLabels { peer: name.clone() };
            rx.get_or_create(&labels)
                .set(i64::try_from(p.rx_bytes).unwrap_or(i64::MAX));
            tx.get_or_create(&labels)
                .set(i64::try_from(p.tx_bytes).unwrap_or(i64::MAX));
            if let Some(a) = p.last_handshake.and_then(|t| now.duration_since(t).ok()) {
                age.get_or_create(&labels)
                    .set(i64::try_from(a.as_secs()).unwrap_or(i64::MAX));
            }
        }
        Some(PeerReading {
            rx,
            tx,
            age,
            rate_limited: snapshot.handshakes_rate_limited,
        })
    }
}

#[derive(Default)]
struct PeerReading {
    rx: Family<PeerLabels, Gauge>,
    tx: Family<PeerLabels, Gauge>,
    age: Family<PeerLabels, Gauge>,
    rate_limited: u64,
}

impl Collector for PeerFigures {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        // Without a device: no peers, and the counter at 0 (exported from the start, as the
        // error counters are, so that a rate over it sees its first increase).
        let r = self.read(SystemTime::now()).unwrap_or_default();
        for (name, help, family) in [
            ("peer_receive_bytes", "Bytes received from each peer", &r.rx),
            ("peer_transmit_bytes", "Bytes sent to each peer", &r.tx),
            (
                "peer_last_handshake_age_seconds",
                "Seconds since each peer's last handshake",
                &r.age,
            ),
        ] {
            family.encode(encoder.encode_descriptor(name, help, None, family.metric_type())?)?;
        }
        // The device's own counter, monotonic while the device lives.
        let limited = ConstCounter::new(r.rate_limited);
        limited.encode(encoder.encode_descriptor(
            "handshakes_rate_limited",
            "Handshake messages dropped because their source address exceeded its rate",
            None,
            limited.metric_type(),
        )?)?;
        Ok(())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;
    use wgmesh_device::config::PeerSnapshot;

    fn peer(key: u8, handshake: Option<SystemTime>, rx_bytes: u64) -> PeerSnapshot {
        PeerSnapshot {
            public_key: [key; 32],
            next_public_key: None,
            preshared_key: None,
            endpoint: None,
            last_handshake: handshake,
            rx_bytes,
            tx_bytes: 7,
            persistent_keepalive: 0,
            allowed_ips: vec![],
            sessions: vec![],
        }
    }

    /// The samples whose lines start with `prefix`, sorted (a family's order is not).
    fn lines(m: &Metrics, prefix: &str) -> Vec<String> {
        let mut lines: Vec<String> = m
            .telemetry()
            .render()
            .expect("the metrics render")
            .lines()
            .filter(|l| l.starts_with(prefix))
            .map(str::to_owned)
            .collect();
        lines.sort();
        lines
    }

    #[test]
    fn per_peer_figures_are_read_from_the_device_at_each_scrape() {
        let m = Metrics::new();
        // No device: no peers, the rate-limit counter at 0.
        assert!(lines(&m, "wgmesh_agent_peer_").is_empty());
        assert_eq!(
            lines(&m, "wgmesh_agent_handshakes_rate_limited_total"),
            ["wgmesh_agent_handshakes_rate_limited_total 0"]
        );

        // The device as it is at the scrape: one handshake 30 s ago, one never, one peer
        // the agent has no name for.
        let received = Arc::new(AtomicU64::new(100));
        let device = received.clone();
        let handshake = SystemTime::now() - Duration::from_secs(30);
        m.read_peers_from(Some(PeerSource {
            snapshot: Box::new(move || DeviceSnapshot {
                handshakes_rate_limited: 3,
                peers: vec![
                    peer(1, Some(handshake), device.load(Ordering::Relaxed)),
                    peer(2, None, 0),
                    peer(9, Some(handshake), 5),
                ],
                ..DeviceSnapshot::default()
            }),
            names: BTreeMap::from([([1; 32], "node-2".into()), ([2; 32], "node-3".into())]),
        }));
        assert_eq!(
            lines(&m, "wgmesh_agent_peer_receive_bytes"),
            [
                r#"wgmesh_agent_peer_receive_bytes{peer="node-2"} 100"#,
                r#"wgmesh_agent_peer_receive_bytes{peer="node-3"} 0"#
            ]
        );
        let age = lines(&m, "wgmesh_agent_peer_last_handshake_age_seconds");
        assert_eq!(age.len(), 1, "{age:?}");
        let secs: u64 = age[0]
            .strip_prefix(r#"wgmesh_agent_peer_last_handshake_age_seconds{peer="node-2"} "#)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{age:?}"));
        assert!((30..60).contains(&secs), "{secs}");
        assert_eq!(
            lines(&m, "wgmesh_agent_handshakes_rate_limited_total"),
            ["wgmesh_agent_handshakes_rate_limited_total 3"]
        );

        // What changed on the device since shows at the next scrape, with no pass between.
        received.store(250, Ordering::Relaxed);
        assert!(
            lines(&m, "wgmesh_agent_peer_receive_bytes")
                .contains(&r#"wgmesh_agent_peer_receive_bytes{peer="node-2"} 250"#.to_owned())
        );

        // The device gone: its peers go with it.
        m.read_peers_from(None);
        assert!(lines(&m, "wgmesh_agent_peer_").is_empty());
    }
}
