//! The agent's Prometheus metrics, served by `wgmesh_telemetry` with `/healthz` and `/readyz`.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
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
    /// Bytes received from each peer.
    pub peer_rx: Family<PeerLabels, Gauge>,
    /// Bytes sent to each peer.
    pub peer_tx: Family<PeerLabels, Gauge>,
    /// Seconds since each peer's last handshake.
    pub peer_handshake_age: Family<PeerLabels, Gauge>,
    /// Handshake messages the device dropped because their source exceeded its rate (copied
    /// from the device's own counter).
    pub handshakes_rate_limited: Counter,
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
            peer_rx: Family::default(),
            peer_tx: Family::default(),
            peer_handshake_age: Family::default(),
            handshakes_rate_limited: Counter::default(),
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
        registry.register(
            "peer_receive_bytes",
            "Bytes received from each peer",
            m.peer_rx.clone(),
        );
        registry.register(
            "peer_transmit_bytes",
            "Bytes sent to each peer",
            m.peer_tx.clone(),
        );
        registry.register(
            "peer_last_handshake_age_seconds",
            "Seconds since each peer's last handshake",
            m.peer_handshake_age.clone(),
        );
        registry.register(
            "handshakes_rate_limited",
            "Handshake messages dropped because their source address exceeded its rate",
            m.handshakes_rate_limited.clone(),
        );
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

    /// Records per-peer counters from a device snapshot; `names` maps keys to peer names.
    pub fn record_peers(
        &self,
        snapshot: &DeviceSnapshot,
        names: &BTreeMap<Key, &str>,
        now: SystemTime,
    ) {
        // The device counts; this only mirrors its total (monotonic while the device lives).
        self.handshakes_rate_limited
            .inner()
            .store(snapshot.handshakes_rate_limited, Ordering::Relaxed);
        self.peer_rx.clear();
        self.peer_tx.clear();
        self.peer_handshake_age.clear();
        for p in &snapshot.peers {
            let Some(name) = names.get(&p.public_key) else {
                continue;
            };
            let labels = PeerLabels {
                peer: (*name).to_owned(),
            };
            self.peer_rx
                .get_or_create(&labels)
                .set(i64::try_from(p.rx_bytes).unwrap_or(i64::MAX));
            self.peer_tx
                .get_or_create(&labels)
                .set(i64::try_from(p.tx_bytes).unwrap_or(i64::MAX));
            if let Some(age) = p.last_handshake.and_then(|t| now.duration_since(t).ok()) {
                self.peer_handshake_age
                    .get_or_create(&labels)
                    .set(i64::try_from(age.as_secs()).unwrap_or(i64::MAX));
            }
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
