//! The operator's apply step: performs a [`Plan`]'s writes, and nothing else.
//!
//! A subnet is written to a peer only after the ledger holding its claim for that node was
//! stored ([`crate::ledger`]): one swap per pass claims the subnets of every write. A claim
//! naming another node stops the write, and the next pass plans again from the ledger as the
//! other writer left it.
//!
//! Every write is made only while this replica leads; its acting deadline is checked before
//! each one, so a replica that loses the lease mid-pass, or was frozen past its deadline,
//! stops writing at once. Errors are
//! counted and logged here, once, and the pass goes on: the next pass retries whatever
//! did not happen.

use crate::lease::Leadership;
use crate::ledger::{LEDGER_NAME, Ledger, Removal, Verdict};
use crate::metrics::Metrics;
use crate::plan::{EventSpec, EventTarget, Plan, RELEASE_FINALIZER, read_claim};
use futures::{StreamExt, stream};
use ipnet::IpNet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions},
};
use serde_json::json;
use std::sync::Arc;
use std::time::SystemTime;
use tracing::{debug, error, info, warn};
use wgmesh_api::{
    Mesh, MeshPeer, PodCIDRPool,
    consts::{CLAIM_LABEL, CLAIM_SUBNET, OPERATOR_MANAGER},
};
use wgmesh_telemetry::events::{EventPublisher, EventQueue, Notice, Target};

/// How many writes of one kind are in flight at once: enough to reach the API server's
/// create rate (`hack/bench-operator.sh --nodes 5000`), well inside its own in-flight limits.
const CONCURRENT_WRITES: usize = 64;

/// Events waiting for the API server at most (a pass of thousands of joining nodes raises
/// one each); more are dropped, and said so.
const EVENT_QUEUE: usize = 10_000;

/// Events published at once: a few, behind the writes that matter; a pass never waits for
/// them.
const EVENTS_IN_FLIGHT: usize = 4;

/// How long one try of an Event may take.
const EVENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How many times a pass reads the ledger again after another writer swapped it first.
const LEDGER_ATTEMPTS: usize = 5;

/// Performs plans against the API server.
pub struct Writer {
    peers: Api<MeshPeer>,
    pools: Api<PodCIDRPool>,
    meshes: Api<Mesh>,
    ledger: Api<ConfigMap>,
    /// Where claims were kept before the ledger, one `Lease` per subnet.
    legacy_claims: Api<Lease>,
    namespace: String,
    events: EventQueue,
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
        Writer {
            peers: Api::all(client.clone()),
            pools: Api::all(client.clone()),
            meshes: Api::all(client.clone()),
            ledger: Api::namespaced(client.clone(), namespace),
            legacy_claims: Api::namespaced(client.clone(), namespace),
            namespace: namespace.to_owned(),
            events: {
                let metrics = metrics.clone();
                EventQueue::spawn(
                    EventPublisher::new(client, OPERATOR_MANAGER, identity),
                    EVENT_QUEUE,
                    EVENTS_IN_FLIGHT,
                    EVENT_TIMEOUT,
                    move || metrics.error("event"),
                )
            },
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

    /// Reads the ledger (a quorum read). Lines that do not parse are logged and left out;
    /// the next swap writes the ledger without them.
    pub async fn read_ledger(&self) -> Result<Ledger, kube::Error> {
        let Some(cm) = self.ledger.get_opt(LEDGER_NAME).await? else {
            return Ok(Ledger::default());
        };
        let (ledger, malformed) = Ledger::from_object(&cm);
        for m in malformed {
            self.metrics.error("ledger_malformed");
            warn!(
                configmap = LEDGER_NAME, line = m.line, text = %m.text,
                "a line of the subnet ledger does not parse (node, claim time in seconds, subnets); it is left out"
            );
        }
        Ok(ledger)
    }

    /// Claims each write's subnets for its node and takes out `removals`, in one swap of the
    /// ledger; when another writer swapped it first, reads it again and merges anew. `None`:
    /// this replica stopped leading, and nothing was claimed.
    async fn claim(
        &self,
        ledger: &mut Arc<Ledger>,
        writes: &[(&str, &[IpNet])],
        removals: &[Removal],
    ) -> anyhow::Result<Option<Vec<Verdict>>> {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let pp = PostParams {
            field_manager: Some(OPERATOR_MANAGER.into()),
            ..Default::default()
        };
        for _ in 0..LEDGER_ATTEMPTS {
            let mut next = Ledger::clone(ledger);
            let (verdicts, changed) = next.merge(writes, removals, now);
            if !changed {
                return Ok(Some(verdicts));
            }
            if !self.leading() {
                return Ok(None);
            }
            let object = next.to_object(&self.namespace);
            let stored = match &next.resource_version {
                None => self.ledger.create(&pp, &object).await,
                Some(_) => self.ledger.replace(LEDGER_NAME, &pp, &object).await,
            };
            match stored {
                Ok(stored) => {
                    next.resource_version = stored.metadata.resource_version;
                    *ledger = Arc::new(next);
                    return Ok(Some(verdicts));
                }
                Err(kube::Error::Api(s)) if s.is_conflict() || s.is_already_exists() => {
                    debug!("the subnet ledger changed since it was read; reading it again");
                    *ledger = Arc::new(self.read_ledger().await?);
                }
                Err(e) => return Err(e.into()),
            }
        }
        anyhow::bail!("the subnet ledger kept changing under {LEDGER_ATTEMPTS} attempts")
    }

    /// Moves claims kept as one `Lease` per subnet (before the ledger) into the ledger, then
    /// deletes those `Lease`s. Run by a new leader before its first pass.
    pub async fn migrate_lease_claims(&self, ledger: &mut Arc<Ledger>) -> anyhow::Result<()> {
        let leases = self
            .legacy_claims
            .list(&ListParams::default().labels(&format!("{CLAIM_LABEL}={CLAIM_SUBNET}")))
            .await?
            .items;
        if leases.is_empty() {
            return Ok(());
        }
        let claims: Vec<(String, [IpNet; 1])> = leases
            .iter()
            .filter_map(read_claim)
            .map(|(subnet, holder)| (holder, [subnet]))
            .collect();
        let writes: Vec<(&str, &[IpNet])> = claims
            .iter()
            .map(|(holder, subnet)| (holder.as_str(), &subnet[..]))
            .collect();
        if self.claim(ledger, &writes, &[]).await?.is_none() {
            return Ok(());
        }
        for lease in &leases {
            if !self.leading() {
                return Ok(());
            }
            let name = lease.metadata.name.clone().unwrap_or_default();
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: lease.metadata.uid.clone(),
                    resource_version: lease.metadata.resource_version.clone(),
                }),
                ..DeleteParams::background()
            };
            match self.legacy_claims.delete(&name, &params).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.is_not_found() || s.is_conflict() => {}
                Err(e) => return Err(e.into()),
            }
        }
        info!(
            leases = leases.len(),
            claims = claims.len(),
            configmap = LEDGER_NAME,
            "moved the subnet claims kept as Leases into the subnet ledger"
        );
        Ok(())
    }

    /// Performs every write of `plan`, in order: releases, deletions, one swap of the ledger
    /// (the claims of every creation and allocation, missing claims in, stale ones out),
    /// creations and allocations (those whose claims are the node's), statuses. Its Events
    /// are queued, never waited for.
    /// `ledger` is the ledger as this replica last read or stored it, and is kept current.
    pub async fn apply(&self, plan: &Plan, ledger: &mut Arc<Ledger>) -> Written {
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

        // Every write's subnets, claimed in one swap. A malformed value in an existing peer
        // is reported by the plan; it has no claim.
        let subnets = |texts: &[String]| -> Vec<IpNet> {
            texts
                .iter()
                .filter_map(|t| wgmesh_core::parse_network(t).ok())
                .collect()
        };
        let create_nets: Vec<Vec<IpNet>> = plan
            .creates
            .iter()
            .map(|p| subnets(&p.spec.pod_cidrs))
            .collect();
        let alloc_nets: Vec<Vec<IpNet>> = plan
            .allocations
            .iter()
            .map(|a| subnets(&a.pod_cidrs))
            .collect();
        let missing_nets: Vec<Vec<IpNet>> = plan
            .claims
            .iter()
            .map(|c| subnets(std::slice::from_ref(&c.subnet)))
            .collect();
        let writes: Vec<(&str, &[IpNet])> = plan
            .creates
            .iter()
            .map(|p| p.metadata.name.as_deref().unwrap_or_default())
            .zip(&create_nets)
            .chain(
                plan.allocations
                    .iter()
                    .map(|a| a.name.as_str())
                    .zip(&alloc_nets),
            )
            .chain(
                plan.claims
                    .iter()
                    .map(|c| c.holder.as_str())
                    .zip(&missing_nets),
            )
            .map(|(name, nets)| (name, nets.as_slice()))
            .collect();
        let verdicts = if writes.is_empty() && plan.stale_claims.is_empty() {
            Vec::new()
        } else {
            match self.claim(ledger, &writes, &plan.stale_claims).await {
                Ok(Some(v)) => v,
                Ok(None) => return written,
                Err(e) => {
                    written.errors += 1;
                    self.metrics.error("ledger");
                    warn!(error = %format!("{e:#}"), configmap = LEDGER_NAME, "storing the subnet ledger failed; no subnet is written this pass");
                    vec![Verdict::Theirs(String::new()); writes.len()]
                }
            }
        };
        if !plan.stale_claims.is_empty() && !verdicts.is_empty() {
            for r in &plan.stale_claims {
                info!(subnet = %r.subnet, node = %r.holder, "took out a claim no peer holds");
            }
        }
        let (create_verdicts, rest) = verdicts.split_at(plan.creates.len().min(verdicts.len()));
        let (alloc_verdicts, missing_verdicts) =
            rest.split_at(plan.allocations.len().min(rest.len()));
        for (c, v) in plan.claims.iter().zip(missing_verdicts) {
            match v {
                Verdict::Ours => {
                    info!(subnet = %c.subnet, node = %c.holder, "claimed a subnet its peer held without a claim")
                }
                Verdict::Theirs(other) if !other.is_empty() => {
                    warn!(subnet = %c.subnet, node = %c.holder, claimed_for = %other, "a subnet a peer holds is claimed for another node")
                }
                _ => {}
            }
        }

        let pp = PostParams {
            field_manager: Some(OPERATOR_MANAGER.into()),
            ..Default::default()
        };
        let results: Vec<_> = stream::iter(plan.creates.iter().zip(create_verdicts))
            .filter_map(|(peer, v)| async move {
                self.allowed(
                    peer.metadata.name.as_deref().unwrap_or_default(),
                    &peer.spec.pod_cidrs,
                    v,
                )
                .then_some(peer)
            })
            .map(|peer| {
                let pp = &pp;
                async move {
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

        let results: Vec<_> = stream::iter(plan.allocations.iter().zip(alloc_verdicts))
            .filter_map(|(a, v)| async move { self.allowed(&a.name, &a.pod_cidrs, v).then_some(a) })
            .map(|a| async move {
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

        for ev in &plan.events {
            self.publish(ev);
        }
        written
    }

    /// Whether a write may happen after the ledger's verdict on its subnets; says why not.
    fn allowed(&self, node: &str, subnets: &[String], verdict: &Verdict) -> bool {
        match verdict {
            Verdict::Ours => true,
            // The swap failed; already said.
            Verdict::Theirs(other) if other.is_empty() => false,
            Verdict::Theirs(other) => {
                self.metrics.error("claim_taken");
                warn!(
                    %node, ?subnets, claimed_for = %other,
                    "a subnet planned for this node is claimed for another: another writer acted on a newer view; planning again"
                );
                false
            }
            Verdict::Full => {
                self.metrics.error("ledger_full");
                error!(
                    %node, ?subnets, configmap = LEDGER_NAME,
                    "the subnet ledger is full; no more subnets can be claimed"
                );
                false
            }
        }
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

    /// Queues an Event of the plan (see [`EventQueue`]).
    fn publish(&self, ev: &EventSpec) {
        let kind = match ev.kind {
            EventTarget::Mesh => "Mesh",
            EventTarget::Peer => "MeshPeer",
            EventTarget::Pool => "PodCIDRPool",
        };
        let target = Target {
            kind,
            name: ev.name.clone(),
            uid: ev.uid.clone(),
        };
        let notice = Notice {
            warning: ev.warning,
            reason: ev.reason.clone(),
            action: "Reconcile".into(),
            note: ev.note.clone(),
        };
        self.events.send(target, notice);
    }
}
