//! The operator's Prometheus metrics, served by `wgmesh_telemetry` with `/healthz` and
//! `/readyz` (ready once the caches synced; followers are ready too, so a standby replica
//! is not restarted for waiting its turn).

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use std::sync::Arc;
use wgmesh_telemetry::Telemetry;

/// Labels of per-pool, per-family gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub pool: String,
    pub family: String,
}

/// Labels of error counters: which stage of a pass failed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: String,
}

/// The kinds `errors_total` counts, each exported from the start.
pub const ERROR_KINDS: [&str; 13] = [
    "allocate",
    "claim_taken",
    "create",
    "delete",
    "event",
    "ledger",
    "ledger_full",
    "ledger_malformed",
    "list",
    "mesh_status",
    "peer_status",
    "pool_status",
    "release",
];

/// Every metric the operator exports.
#[derive(Debug)]
pub struct Metrics {
    telemetry: Arc<Telemetry>,
    /// Reconcile passes run.
    pub reconciles: Counter,
    /// Errors by kind of write or read that failed.
    pub errors: Family<ErrorLabels, Counter>,
    /// Duration of a reconcile pass, seconds.
    pub reconcile_duration: Histogram,
    /// Subnets allocated to nodes since start.
    pub allocations: Counter,
    /// Node subnets handed out, per pool and family.
    pub pool_allocated: Family<PoolLabels, Gauge>,
    /// Node subnets still free, per pool and family (saturating).
    pub pool_free: Family<PoolLabels, Gauge>,
    /// Peers that are `Ready`.
    pub peers_ready: Gauge,
    /// Peers that are not `Ready`.
    pub peers_not_ready: Gauge,
    /// 1 while this replica holds the lease.
    pub leader: Gauge,
    /// Key rotations granted, by reason (`NodeRequest`, `MeshRequest`, `Interval`).
    pub rotations_granted: Family<ReasonLabels, Counter>,
    /// Nodes rotating their key now.
    pub rotating: Gauge,
}

/// Labels of the rotation counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("wgmesh_operator");
        let m = Metrics {
            reconciles: Counter::default(),
            errors: Family::default(),
            reconcile_duration: Histogram::new([0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0]),
            allocations: Counter::default(),
            pool_allocated: Family::default(),
            pool_free: Family::default(),
            peers_ready: Gauge::default(),
            peers_not_ready: Gauge::default(),
            leader: Gauge::default(),
            rotations_granted: Family::default(),
            rotating: Gauge::default(),
            telemetry: Arc::default(),
        };
        registry.register(
            "key_rotations_granted",
            "Key rotations granted to nodes, by reason",
            m.rotations_granted.clone(),
        );
        registry.register(
            "key_rotations_in_progress",
            "Nodes rotating their key now",
            m.rotating.clone(),
        );
        registry.register("reconciles", "Reconcile passes run", m.reconciles.clone());
        registry.register("errors", "Errors by kind", m.errors.clone());
        registry.register(
            "reconcile_duration_seconds",
            "Duration of a reconcile pass",
            m.reconcile_duration.clone(),
        );
        registry.register(
            "allocations",
            "Pod subnets allocated to nodes",
            m.allocations.clone(),
        );
        registry.register(
            "pool_allocated_subnets",
            "Node subnets handed out per pool and family",
            m.pool_allocated.clone(),
        );
        registry.register(
            "pool_free_subnets",
            "Node subnets still free per pool and family",
            m.pool_free.clone(),
        );
        registry.register("peers_ready", "Peers that are Ready", m.peers_ready.clone());
        registry.register(
            "peers_not_ready",
            "Peers that are not Ready",
            m.peers_not_ready.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the lease",
            m.leader.clone(),
        );
        // Every kind at 0 from the start: an alert on the rate of errors sees the first.
        for kind in ERROR_KINDS {
            let _ = m.errors.get_or_create(&ErrorLabels {
                kind: kind.to_owned(),
            });
        }
        Metrics {
            telemetry: Arc::new(Telemetry::new(registry)),
            ..m
        }
    }

    /// Marks the operator ready (caches synced).
    pub fn set_ready(&self) {
        self.telemetry.set_ready();
    }

    /// The endpoint serving these metrics.
    pub fn telemetry(&self) -> Arc<Telemetry> {
        self.telemetry.clone()
    }

    /// Counts one error of `kind`.
    pub fn error(&self, kind: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                kind: kind.to_string(),
            })
            .inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
