//! The operator's apply step: performs a [`Plan`]'s writes, and nothing else.
//!
//! A subnet is written to a peer only after its claim was created for that node (or found
//! to be the node's already); a claim naming another node stops the write, and the next
//! pass plans again from a view that includes the other writer's work.
//!
//! Every write is made only while this replica leads; its acting deadline is checked before
//! each one, so a replica that loses the lease mid-pass, or was frozen past its deadline,
//! stops writing at once. Errors are
//! counted and logged here, once, and the pass goes on: the next pass retries whatever
//! did not happen.

use crate::lease::Leadership;
use crate::metrics::Metrics;
use crate::plan::{EventSpec, EventTarget, Plan, RELEASE_FINALIZER, claim_object, read_claim};
use futures::{StreamExt, stream};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions},
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use serde_json::json;
use std::sync::Arc;
use tracing::{debug, info, warn};
use wgmesh_api::{Mesh, MeshPeer, PodCIDRPool, consts::OPERATOR_MANAGER};

/// How many writes of one kind are in flight at once. Each allocation is three writes in a
/// row (claims, then the peer), so the API server's create rate is reached only with many
/// nodes under way: 5000 nodes had their subnets after 41 s with 64, 48.5 s with 16
/// (`hack/bench-operator.sh --nodes 5000`), well inside the server's own in-flight limits.
const CONCURRENT_WRITES: usize = 64;

/// The outcome of claiming a write's subnets.
enum Claimed {
    /// Every claim is the node's.
    Ours,
    /// A claim names another node (or is malformed): the write must not happen.
    Theirs(String),
    /// This replica stopped leading: nothing more is written.
    NotLeading,
}

/// Performs plans against the API server.
pub struct Writer {
    peers: Api<MeshPeer>,
    pools: Api<PodCIDRPool>,
    meshes: Api<Mesh>,
    claims: Api<Lease>,
    recorder: Recorder,
    leader: Leadership,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").finish_non_exhaustive()
    }
}

/// What a pass wrote: the peers as the API server returned them, so the next pass sees
/// its own writes even before the watch delivers them.
#[derive(Debug, Default)]
pub struct Written {
    pub peers: Vec<Arc<MeshPeer>>,
    /// Peers whose deletion completed (finalizer removed).
    pub gone: Vec<String>,
    pub errors: usize,
}

impl Writer {
    pub fn new(
        client: Client,
        identity: &str,
        namespace: &str,
        leader: Leadership,
        metrics: Arc<Metrics>,
    ) -> Self {
        let reporter = Reporter {
            controller: OPERATOR_MANAGER.into(),
            instance: Some(identity.to_owned()),
        };
        Writer {
            peers: Api::all(client.clone()),
            pools: Api::all(client.clone()),
            meshes: Api::all(client.clone()),
            claims: Api::namespaced(client.clone(), namespace),
            recorder: Recorder::new(client, reporter),
            leader,
            metrics,
        }
    }

    fn leading(&self) -> bool {
        self.leader.leading()
    }

    fn failed(&self, kind: &str, name: &str, err: &kube::Error) {
        self.metrics.error(kind);
        warn!(%name, error = %err, "{kind} failed");
    }

    /// Claims every subnet of `subnets` for `node`. Only [`Claimed::Ours`] lets the subnets
    /// be written to the node's peer.
    async fn claim(&self, node: &str, subnets: &[String]) -> Result<Claimed, kube::Error> {
        let pp = PostParams {
            field_manager: Some(OPERATOR_MANAGER.into()),
            ..Default::default()
        };
        for text in subnets {
            // A malformed value in an existing peer is reported by the plan; it has no claim.
            let Ok(subnet) = wgmesh_core::parse_network(text) else {
                continue;
            };
            let claim = claim_object(&subnet, node);
            let name = claim.metadata.name.clone().unwrap_or_default();
            if !self.leading() {
                return Ok(Claimed::NotLeading);
            }
            match self.claims.create(&pp, &claim).await {
                Ok(_) => debug!(%subnet, %node, claim = %name, "claimed subnet"),
                Err(kube::Error::Api(s)) if s.is_already_exists() => {
                    let found = self.claims.get(&name).await?;
                    match read_claim(&found) {
                        Some((_, holder)) if holder == node => {}
                        Some((_, holder)) => return Ok(Claimed::Theirs(holder)),
                        None => return Ok(Claimed::Theirs(format!("(malformed claim {name})"))),
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Claimed::Ours)
    }

    /// Performs every write of `plan`, in order: releases, deletions, stale claims,
    /// creations and allocations (each after its claims), missing claims, statuses, events.
    pub async fn apply(&self, plan: &Plan) -> Written {
        let mut written = Written::default();

        let results: Vec<_> = stream::iter(&plan.releases)
            .map(|name| async move { (name, self.release(name).await) })
            .buffer_unordered(CONCURRENT_WRITES)
            .collect()
            .await;
        for (name, r) in results {
            match r {
                Ok(()) => written.gone.push(name.clone()),
                Err(e) => {
                    written.errors += 1;
                    self.failed("release", name, &e);
                }
            }
        }

        for delete in &plan.deletes {
            if !self.leading() {
                return written;
            }
            let name = &delete.name;
            let params = DeleteParams {
                preconditions: delete.uid.clone().map(|uid| Preconditions {
                    uid: Some(uid),
                    resource_version: None,
                }),
                ..DeleteParams::background()
            };
            match self.peers.delete(name, &params).await {
                Ok(_) => info!(peer = %name, why = delete.why.as_str(), "deleted peer"),
                Err(kube::Error::Api(s)) if s.is_not_found() => {}
                Err(e) => {
                    written.errors += 1;
                    self.failed("delete", name, &e);
                }
            }
        }

        for stale in &plan.stale_claims {
            if !self.leading() {
                return written;
            }
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: stale.uid.clone(),
                    resource_version: stale.resource_version.clone(),
                }),
                ..DeleteParams::background()
            };
            match self.claims.delete(&stale.name, &params).await {
                Ok(_) => info!(claim = %stale.name, "deleted a claim no peer holds"),
                Err(kube::Error::Api(s)) if s.is_not_found() || s.is_conflict() => {}
                Err(e) => {
                    written.errors += 1;
                    self.failed("delete_claim", &stale.name, &e);
                }
            }
        }

        let pp = PostParams {
            field_manager: Some(OPERATOR_MANAGER.into()),
            ..Default::default()
        };
        let results: Vec<_> = stream::iter(&plan.creates)
            .map(|peer| {
                let pp = &pp;
                async move {
                    let name = peer.metadata.name.as_deref().unwrap_or_default();
                    match self.claim(name, &peer.spec.pod_cidrs).await {
                        Ok(Claimed::Ours) => {}
                        Ok(Claimed::NotLeading) => return None,
                        Ok(Claimed::Theirs(other)) => {
                            self.claimed_by_another(name, &peer.spec.pod_cidrs, &other);
                            return None;
                        }
                        Err(e) => return Some((peer, Err(e))),
                    }
                    if !self.leading() {
                        return None;
                    }
                    Some((peer, self.peers.create(pp, peer).await))
                }
            })
            .buffer_unordered(CONCURRENT_WRITES)
            .filter_map(|r| async move { r })
            .collect()
            .await;
        for (peer, r) in results {
            let name = peer.metadata.name.as_deref().unwrap_or_default();
            match r {
                Ok(created) => {
                    info!(peer = %name, pod_cidrs = ?created.spec.pod_cidrs, "created node peer");
                    written.peers.push(Arc::new(created));
                }
                // The watch has not shown us the peer yet; the next pass will.
                Err(kube::Error::Api(s)) if s.is_already_exists() => {}
                Err(e) => {
                    written.errors += 1;
                    self.failed("create", name, &e);
                }
            }
        }

        let results: Vec<_> = stream::iter(&plan.allocations)
            .map(|a| async move {
                match self.claim(&a.name, &a.pod_cidrs).await {
                    Ok(Claimed::Ours) => {}
                    Ok(Claimed::NotLeading) => return None,
                    Ok(Claimed::Theirs(other)) => {
                        self.claimed_by_another(&a.name, &a.pod_cidrs, &other);
                        return None;
                    }
                    Err(e) => return Some((a, Err(e))),
                }
                if !self.leading() {
                    return None;
                }
                let mut patch = json!({
                    "apiVersion": "wgmesh.dev/v1alpha1",
                    "kind": "MeshPeer",
                    "metadata": {"name": a.name},
                    "spec": {"node": a.name, "podCIDRs": a.pod_cidrs},
                });
                if let Some(rv) = &a.resource_version {
                    patch["metadata"]["resourceVersion"] = json!(rv);
                }
                let params = PatchParams::apply(OPERATOR_MANAGER).force();
                Some((
                    a,
                    self.peers
                        .patch(&a.name, &params, &Patch::Apply(patch))
                        .await,
                ))
            })
            .buffer_unordered(CONCURRENT_WRITES)
            .filter_map(|r| async move { r })
            .collect()
            .await;
        for (a, r) in results {
            match r {
                Ok(peer) => {
                    info!(peer = %a.name, pod_cidrs = ?a.pod_cidrs, "allocated pod subnets");
                    written.peers.push(Arc::new(peer));
                }
                Err(kube::Error::Api(s)) if s.is_conflict() => {
                    debug!(peer = %a.name, "peer changed since the plan; replanning");
                }
                Err(e) => {
                    written.errors += 1;
                    self.failed("allocate", &a.name, &e);
                }
            }
        }

        let results: Vec<_> = stream::iter(&plan.claims)
            .map(|c| {
                let pp = &pp;
                async move {
                    if !self.leading() {
                        return None;
                    }
                    let subnet = wgmesh_core::parse_network(&c.subnet).ok()?;
                    Some((
                        c,
                        self.claims
                            .create(pp, &claim_object(&subnet, &c.holder))
                            .await,
                    ))
                }
            })
            .buffer_unordered(CONCURRENT_WRITES)
            .filter_map(|r| async move { r })
            .collect()
            .await;
        for (c, r) in results {
            match r {
                Ok(_) => {
                    info!(subnet = %c.subnet, node = %c.holder, "claimed a subnet its peer held without a claim")
                }
                Err(kube::Error::Api(s)) if s.is_already_exists() => {}
                Err(e) => {
                    written.errors += 1;
                    self.failed("claim", &c.subnet, &e);
                }
            }
        }

        let results: Vec<_> = stream::iter(&plan.peer_status)
            .map(|w| async move {
                if !self.leading() {
                    return None;
                }
                let patch = json!({
                    "apiVersion": "wgmesh.dev/v1alpha1",
                    "kind": "MeshPeer",
                    "status": w.status,
                });
                let params = PatchParams::apply(OPERATOR_MANAGER).force();
                Some((
                    w,
                    self.peers
                        .patch_status(&w.name, &params, &Patch::Apply(patch))
                        .await,
                ))
            })
            .buffer_unordered(CONCURRENT_WRITES)
            .filter_map(|r| async move { r })
            .collect()
            .await;
        for (w, r) in results {
            match r {
                Ok(peer) => written.peers.push(Arc::new(peer)),
                Err(kube::Error::Api(s)) if s.is_not_found() => {}
                Err(e) => {
                    written.errors += 1;
                    self.failed("peer_status", &w.name, &e);
                }
            }
        }

        for w in &plan.pool_status {
            if !self.leading() {
                return written;
            }
            let patch = json!({
                "apiVersion": "wgmesh.dev/v1alpha1",
                "kind": "PodCIDRPool",
                "status": w.status,
            });
            let params = PatchParams::apply(OPERATOR_MANAGER).force();
            if let Err(e) = self
                .pools
                .patch_status(&w.name, &params, &Patch::Apply(patch))
                .await
            {
                written.errors += 1;
                self.failed("pool_status", &w.name, &e);
            }
        }

        if let Some(w) = &plan.mesh_status {
            if !self.leading() {
                return written;
            }
            let patch = json!({
                "apiVersion": "wgmesh.dev/v1alpha1",
                "kind": "Mesh",
                "status": w.status,
            });
            let params = PatchParams::apply(OPERATOR_MANAGER).force();
            if let Err(e) = self
                .meshes
                .patch_status(&w.name, &params, &Patch::Apply(patch))
                .await
            {
                written.errors += 1;
                self.failed("mesh_status", &w.name, &e);
            }
        }

        stream::iter(&plan.events)
            .for_each_concurrent(CONCURRENT_WRITES, |ev| async move {
                if let Err(e) = self.publish(ev).await {
                    self.failed("event", &ev.name, &e);
                }
            })
            .await;
        written
    }

    fn claimed_by_another(&self, node: &str, subnets: &[String], other: &str) {
        self.metrics.error("claim_taken");
        warn!(
            %node, ?subnets, claimed_for = %other,
            "a subnet planned for this node is claimed for another: another writer acted on a newer view; planning again"
        );
    }

    /// Removes the release finalizer from a terminating peer, if it is still there.
    async fn release(&self, name: &str) -> Result<(), kube::Error> {
        if !self.leading() {
            return Ok(());
        }
        let Some(peer) = self.peers.get_opt(name).await? else {
            return Ok(());
        };
        let finalizers: Vec<String> = peer
            .metadata
            .finalizers
            .unwrap_or_default()
            .into_iter()
            .filter(|f| f != RELEASE_FINALIZER)
            .collect();
        let patch = json!({
            "metadata": {
                "finalizers": finalizers,
                "resourceVersion": peer.metadata.resource_version,
            }
        });
        match self
            .peers
            .patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(_) => {
                info!(peer = %name, subnets = ?peer.spec.pod_cidrs, "released the subnets of a deleted node");
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn publish(&self, ev: &EventSpec) -> Result<(), kube::Error> {
        let (api_version, kind) = match ev.kind {
            EventTarget::Peer => ("wgmesh.dev/v1alpha1", "MeshPeer"),
            EventTarget::Pool => ("wgmesh.dev/v1alpha1", "PodCIDRPool"),
        };
        // The objects are cluster-scoped, so their Events live in `default`. API servers
        // before 1.22 insist that the reference's namespace match the Event's, so say so.
        let reference = ObjectReference {
            api_version: Some(api_version.into()),
            kind: Some(kind.into()),
            name: Some(ev.name.clone()),
            namespace: Some("default".into()),
            uid: ev.uid.clone(),
            ..Default::default()
        };
        let event = Event {
            type_: if ev.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: truncate(&ev.reason, 128),
            note: Some(truncate(&ev.note, 1024)),
            action: "Reconcile".into(),
            secondary: None,
        };
        self.recorder.publish(&event, &reference).await
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max.saturating_sub(3);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}
