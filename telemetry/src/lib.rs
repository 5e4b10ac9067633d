//! The HTTP endpoint every wgmesh process serves: `/metrics` (OpenMetrics text from a
//! prometheus-client registry), `/healthz` (the process is alive) and `/readyz` (the
//! process says it is ready). It owns the endpoint only; each process defines its metrics.

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::{encoding::text::encode, registry::Registry};
use std::net::SocketAddr;
use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

/// A registry and a readiness flag, served by [`serve`].
#[derive(Debug, Default)]
pub struct Telemetry {
    registry: Registry,
    ready: AtomicBool,
}

impl Telemetry {
    /// Wraps a registry whose metrics are already registered; not ready yet.
    pub fn new(registry: Registry) -> Self {
        Telemetry {
            registry,
            ready: AtomicBool::new(false),
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
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(telemetry);
    let listener = tokio::net::TcpListener::bind(addr).await?;
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
}
