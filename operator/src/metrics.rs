//! The operator's Prometheus metrics and its HTTP endpoint: `/metrics`, `/healthz`
//! (the process is alive) and `/readyz` (caches synced; followers are ready too, so a
//! standby replica is not restarted for waiting its turn).

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

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

/// Every metric the operator exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
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
    ready: AtomicBool,
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
            ready: AtomicBool::new(false),
            registry: Registry::default(),
        };
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
        Metrics { registry, ..m }
    }

    /// Marks the operator ready (caches synced).
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// Counts one error of `kind`.
    pub fn error(&self, kind: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                kind: kind.to_string(),
            })
            .inc();
    }

    fn render(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(metrics);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await
}

async fn render(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    match m.render() {
        Ok(body) => (
            StatusCode::OK,
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn ready(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    if m.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced")
    }
}
