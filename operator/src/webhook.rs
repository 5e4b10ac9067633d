//! The validating admission webhook for `MeshPeer`s and `MeshPeerReport`s: an HTTPS server
//! the API server calls before it stores a peer, its status or a node's report. It reads the request, looks up the facts the
//! decision needs (the node an agent's pod runs on, whether a Node has a peer's name) and
//! answers what `admission` decides.
//!
//! An agent's pod is read from a watch of the agents' namespace; what it is read for (its
//! uid and the node it was bound to) never changes once set, so a cached copy is as good as
//! a fresh one, and only a pod the cache does not hold yet costs a request to the API
//! server while the API server waits on this answer.
//!
//! It must not decide anything itself, and it fails closed: anything it cannot read or look
//! up is refused. The `ValidatingWebhookConfiguration` (in the Helm chart) says
//! `failurePolicy: Fail`, so while no replica answers, the API server refuses too.

use crate::admission::{self, Caller, Decision, Identities};
use futures::StreamExt;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};
use wgmesh_api::{MeshPeer, MeshPeerReport};

/// The path the API server posts `MeshPeer` reviews to.
pub const PEER_PATH: &str = "/validate/meshpeers";
/// The path the API server posts `MeshPeerReport` reviews to.
pub const REPORT_PATH: &str = "/validate/meshpeerreports";
/// The largest review read: an old and a new object of at most the API server's 3 MiB each.
const MAX_BODY_BYTES: usize = 8 << 20;
/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the webhook server needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub addr: SocketAddr,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub ids: Identities,
}

/// Why the webhook could not start.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("reading the serving certificate {path}: {source}")]
    ReadCertificate {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("reading the serving key {path}: {source}")]
    ReadKey {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the serving certificate and key do not make a TLS configuration: {0}")]
    Tls(#[source] rustls::Error),
    #[error("listening on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Serves reviews until the process ends.
pub async fn serve(config: Config, client: kube::Client) -> Result<(), WebhookError> {
    let certs = CertificateDer::pem_file_iter(&config.cert_file)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|source| WebhookError::ReadCertificate {
            path: config.cert_file.clone(),
            source,
        })?;
    let key =
        PrivateKeyDer::from_pem_file(&config.key_file).map_err(|source| WebhookError::ReadKey {
            path: config.key_file.clone(),
            source,
        })?;
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(WebhookError::Tls)?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(WebhookError::Tls)?;
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind(config.addr)
        .await
        .map_err(|source| WebhookError::Bind {
            addr: config.addr,
            source,
        })?;
    info!(
        addr = %config.addr,
        paths = ?[PEER_PATH, REPORT_PATH],
        "serving the MeshPeer and MeshPeerReport admission webhook"
    );
    let pods = watch_pods(Api::namespaced(client.clone(), &config.ids.agent.namespace));
    let reviewer = Arc::new(Reviewer {
        ids: config.ids,
        client,
        pods,
    });
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                warn!(error = %e, "accepting a webhook connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let reviewer = reviewer.clone();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let service = hyper::service::service_fn(move |req| {
                let reviewer = reviewer.clone();
                async move { Ok::<_, std::convert::Infallible>(reviewer.handle(req).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%peer, error = %e, "webhook connection ended with an error");
            }
        });
    }
}

/// A cache of the pods in the agents' namespace, kept by a watch for the process's life.
fn watch_pods(api: Api<Pod>) -> Store<Pod> {
    let (reader, writer) = reflector::store();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        // Kept: the uid and the node; what a review never reads is not held.
        .modify(|pod| {
            pod.managed_fields_mut().clear();
            pod.status = None;
        })
        .reflect(writer);
    tokio::spawn(stream.for_each(|event| {
        if let Err(e) = event {
            warn!(error = %e, "watching the agents' pods failed; retrying");
        }
        futures::future::ready(())
    }));
    reader
}

/// The response for `decision`; a denial is logged with what the caller sees.
fn answer<K: kube::Resource>(
    req: &AdmissionRequest<K>,
    decision: Decision,
    kind: &str,
) -> AdmissionResponse {
    let response = AdmissionResponse::from(req);
    match decision {
        Decision::Allow => response,
        Decision::Deny(message) => {
            info!(
                name = %req.name,
                subresource = req.sub_resource.as_deref().unwrap_or(""),
                user = req.user_info.username.as_deref().unwrap_or(""),
                %message,
                "refused a {kind} write"
            );
            response.deny(message)
        }
    }
}

struct Reviewer {
    ids: Identities,
    client: kube::Client,
    pods: Store<Pod>,
}

impl std::fmt::Debug for Reviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reviewer").field("ids", &self.ids).finish()
    }
}

fn reply(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

/// Reads an admission review of a `K`.
fn read<K>(body: &[u8]) -> Result<AdmissionRequest<K>, String>
where
    K: kube::Resource + serde::de::DeserializeOwned,
{
    let review: AdmissionReview<K> = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let request: Result<AdmissionRequest<K>, _> = review.try_into();
    request.map_err(|e| e.to_string())
}

/// The answer to a review that could not be read. There is no uid to answer with: the API
/// server counts this as a failed call and, with failurePolicy Fail, refuses the write.
fn unreadable(e: String) -> AdmissionResponse {
    warn!(error = %e, "an admission review could not be read");
    AdmissionResponse::invalid(format!("unreadable admission review: {e}"))
}

impl Reviewer {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_owned();
        if req.method() != Method::POST || (path != PEER_PATH && path != REPORT_PATH) {
            return reply(StatusCode::NOT_FOUND, b"{}".to_vec());
        }
        let body = match Limited::new(req.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                warn!(error = %e, "reading an admission review failed");
                return reply(StatusCode::PAYLOAD_TOO_LARGE, b"{}".to_vec());
            }
        };
        let response = if path == PEER_PATH {
            match read::<MeshPeer>(&body) {
                Ok(request) => self.review(&request).await,
                Err(e) => unreadable(e),
            }
        } else {
            match read::<MeshPeerReport>(&body) {
                Ok(request) => self.review_report(&request).await,
                Err(e) => unreadable(e),
            }
        };
        let review: AdmissionReview<DynamicObject> = response.into_review();
        match serde_json::to_vec(&review) {
            Ok(body) => reply(StatusCode::OK, body),
            Err(_) => reply(StatusCode::INTERNAL_SERVER_ERROR, b"{}".to_vec()),
        }
    }

    async fn review(&self, req: &AdmissionRequest<MeshPeer>) -> AdmissionResponse {
        let caller = admission::caller(&req.user_info, &self.ids);
        let decision = self.decide(req, &caller).await;
        answer(req, decision, "MeshPeer")
    }

    async fn review_report(&self, req: &AdmissionRequest<MeshPeerReport>) -> AdmissionResponse {
        let caller = admission::caller(&req.user_info, &self.ids);
        let decision = match req.object.as_ref() {
            // Deletes are not sent here; without an object there is nothing to check.
            None => Decision::Allow,
            Some(new) => {
                let node = self.node_of(&caller).await;
                admission::review_report(&caller, node.as_deref(), req.old_object.as_ref(), new)
            }
        };
        answer(req, decision, "MeshPeerReport")
    }

    /// The node of an agent caller, as [`Reviewer::agent_node`] finds it.
    async fn node_of(&self, caller: &Caller) -> Option<String> {
        match caller {
            Caller::Agent {
                pod_name,
                pod_uid,
                node_name,
            } => self.agent_node(pod_name, pod_uid, node_name).await,
            _ => None,
        }
    }

    async fn decide(&self, req: &AdmissionRequest<MeshPeer>, caller: &Caller) -> Decision {
        let (Some(new), old) = (req.object.as_ref(), req.old_object.as_ref()) else {
            // Deletes are not sent here; without an object there is nothing to check.
            return Decision::Allow;
        };
        match (req.sub_resource.as_deref(), &req.operation) {
            (Some("status"), _) => {
                let Some(old) = old else {
                    return Decision::Deny("a status write without the stored object".into());
                };
                let node = self.node_of(caller).await;
                admission::review_status(caller, node.as_deref(), old, new)
            }
            (None, Operation::Create | Operation::Update) => {
                let named_like_a_node = match (caller, old) {
                    (Caller::Other(_), None) => match self.node_exists(&req.name).await {
                        Ok(exists) => exists,
                        Err(e) => {
                            return Decision::Deny(format!(
                                "could not check whether a Node is named {}: {e}",
                                req.name
                            ));
                        }
                    },
                    _ => false,
                };
                admission::review_peer(caller, old, new, named_like_a_node)
            }
            _ => Decision::Allow,
        }
    }

    /// The node the agent's token was issued for: from the token itself where the API
    /// server puts it there (1.30+), else from its bound pod, whose uid must match (a pod
    /// of the same name made later is another pod). A cached pod serves: the API server
    /// accepts a pod-bound token only while that very pod exists, and a pod's uid and node
    /// never change.
    async fn agent_node(
        &self,
        pod_name: &Option<String>,
        pod_uid: &Option<String>,
        node_name: &Option<String>,
    ) -> Option<String> {
        if let Some(node) = node_name {
            return Some(node.clone());
        }
        let (Some(name), Some(uid)) = (pod_name, pod_uid) else {
            return None;
        };
        let bound = |pod: &Pod| {
            (pod.metadata.uid.as_deref() == Some(uid.as_str()))
                .then(|| pod.spec.as_ref().and_then(|s| s.node_name.clone()))
                .flatten()
        };
        let cached = self
            .pods
            .get(&ObjectRef::new(name).within(&self.ids.agent.namespace));
        if let Some(node) = cached.as_deref().and_then(bound) {
            return Some(node);
        }
        // Not in the cache yet (a pod made a moment ago), or not yet bound there.
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.ids.agent.namespace);
        match pods.get_opt(name).await {
            Ok(Some(pod)) => bound(&pod),
            Ok(None) => None,
            Err(e) => {
                warn!(pod = %name, error = %e, "looking up an agent's pod failed");
                None
            }
        }
    }

    async fn node_exists(&self, name: &str) -> Result<bool, kube::Error> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        Ok(nodes.get_opt(name).await?.is_some())
    }
}
