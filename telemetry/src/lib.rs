//! The HTTP endpoint every wgmesh process serves: `/metrics` (OpenMetrics text from a
//! prometheus-client registry), `/healthz` (the process is alive: its main loop, if it
//! reports one with [`Telemetry::beat`], ran recently) and `/readyz` (the process says it is
//! ready). It owns the endpoint only; each process defines its metrics. [`events`]
//! publishes Events about wgmesh's objects where `kubectl describe` finds them.

pub mod events;

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::{encoding::text::encode, registry::Registry};
use std::net::SocketAddr;
use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};
use std::time::{Duration, Instant};

/// A registry, a readiness flag and the main loop's heartbeat, served by [`serve`].
#[derive(Debug, Default)]
pub struct Telemetry {
    registry: Registry,
    ready: AtomicBool,
    /// The last heartbeat and how old it may get before `/healthz` fails.
    heartbeat: Mutex<Option<(Instant, Duration)>>,
}

impl Telemetry {
    /// Wraps a registry whose metrics are already registered; not ready yet.
    pub fn new(registry: Registry) -> Self {
        Telemetry {
            registry,
            ready: AtomicBool::new(false),
            heartbeat: Mutex::new(None),
        }
    }

    /// The main loop ran now; `/healthz` fails once no beat came for `within`. A process that
    /// never beats is healthy while it serves.
    pub fn beat(&self, within: Duration) {
        *self.heartbeat.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), within));
    }

    /// Whether the main loop beat recently enough (always, if it never beat): what
    /// `/healthz` answers.
    pub fn live(&self) -> Result<(), String> {
        match *self.heartbeat.lock().unwrap_or_else(|e| e.into_inner()) {
            Some((at, within)) if at.elapsed() > within => Err(format!(
                "the main loop has not run for {:.0} s (limit {:.0} s)",
                at.elapsed().as_secs_f64(),
                within.as_secs_f64()
            )),
            _ => Ok(()),
        }
    }

    /// Marks the process ready: `/readyz` answers 200 from now on.
    pub fn set_ready(&self) {
        self.set_readiness(true);
    }

    /// Sets what `/readyz` answers: 200 when `ready`, 503 otherwise. A process whose
    /// readiness depends on what it has achieved (the agent: device up, routes installed)
    /// calls this after every pass.
    pub fn set_readiness(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// The metrics as OpenMetrics text.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Serves the endpoint on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, telemetry: Arc<Telemetry>) -> std::io::Result<()> {
    serve_when_free(addr, telemetry, std::time::Duration::ZERO).await
}

/// [`serve`], but while `addr` is in use (the process being replaced still holds it, for a
/// moment), binding is tried again every 100 ms for up to `wait`.
pub async fn serve_when_free(
    addr: SocketAddr,
    telemetry: Arc<Telemetry>,
    wait: std::time::Duration,
) -> std::io::Result<()> {
    let started = std::time::Instant::now();
    let listener = loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && started.elapsed() < wait => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(ready))
        .with_state(telemetry);
    axum::serve(listener, app).await
}

async fn metrics(State(t): State<Arc<Telemetry>>) -> impl IntoResponse {
    match t.render() {
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

async fn healthz(State(t): State<Arc<Telemetry>>) -> impl IntoResponse {
    match t.live() {
        Ok(()) => (StatusCode::OK, "ok".to_owned()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

async fn ready(State(t): State<Arc<Telemetry>>) -> impl IntoResponse {
    if t.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn renders_registered_metrics_with_the_prefix() {
        let mut registry = Registry::with_prefix("wgmesh_test");
        let c = Counter::<u64>::default();
        registry.register("things", "Things", c.clone());
        c.inc();
        let t = Telemetry::new(registry);
        let text = t.render().expect("render");
        assert!(text.contains("wgmesh_test_things_total 1"), "{text}");
    }

    #[test]
    fn liveness_follows_the_heartbeat() {
        let t = Telemetry::new(Registry::default());
        assert!(t.live().is_ok(), "a process that never beats is live");
        t.beat(Duration::from_secs(60));
        assert!(t.live().is_ok());
        t.beat(Duration::ZERO);
        std::thread::sleep(Duration::from_millis(5));
        assert!(t.live().is_err(), "a beat older than its bound");
    }
}
