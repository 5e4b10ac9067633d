//! The agent's Kubernetes API client: kube's, with TCP keepalives on its connections, as
//! client-go's dialer has. A node behind NAT holds its watches open through the NAT; when
//! the NAT forgets the connection (an idle timeout, a flushed table, a new address), the
//! server's events are dropped on the way and the client would wait forever. Keepalive
//! probes from the node open the mapping again (the server's retransmissions then get
//! through) or fail, and the watch starts over. The layers are kube's own (base URI,
//! authentication, extra headers); request deadlines are the agent's (`API_REQUEST_TIMEOUT`).
//! It owns the client's construction only.

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kube::client::ConfigExt;
use std::time::Duration;

/// Idle time before the first keepalive probe.
pub const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// Time between probes.
pub const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes before the connection counts as dead.
pub const TCP_KEEPALIVE_PROBES: u32 = 3;

/// Failure to build the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No kubeconfig or in-cluster configuration could be read.
    #[error("reading the Kubernetes client configuration (in-cluster or KUBECONFIG)")]
    Config(#[source] kube::config::InferConfigError),
    /// The TLS or authentication setup of the configuration failed.
    #[error("setting up TLS and authentication for the Kubernetes API")]
    Setup(#[source] kube::Error),
}

/// A client for the cluster of the in-cluster configuration or `KUBECONFIG`.
pub async fn client() -> Result<kube::Client, ClientError> {
    let config = kube::Config::infer().await.map_err(ClientError::Config)?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(config.connect_timeout);
    http.set_keepalive(Some(TCP_KEEPALIVE_IDLE));
    http.set_keepalive_interval(Some(TCP_KEEPALIVE_INTERVAL));
    http.set_keepalive_retries(Some(TCP_KEEPALIVE_PROBES));
    let https = config
        .rustls_https_connector_with_connector(http)
        .map_err(ClientError::Setup)?;
    let hyper = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build::<_, kube::client::Body>(https);
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer().map_err(ClientError::Setup)?)
        .layer(config.extra_headers_layer().map_err(ClientError::Setup)?)
        .map_err(tower::BoxError::from)
        .service(hyper);
    Ok(kube::Client::new(service, config.default_namespace))
}
