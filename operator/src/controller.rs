//! The operator's control loop: watches Nodes, MeshPeers, MeshPeerReports, PodCIDRPools and
//! the Mesh into
//! caches, and, while this replica leads, runs passes of observe → plan → apply.
//!
//! The subnet ledger is not watched: only the leader writes it, so it keeps the version it
//! read when it became leader and the ones it stored since; a swap that finds the ledger
//! changed by another writer reads it again.
//!
//! Allocation is global (a subnet's freedom depends on every other peer), so a pass plans
//! the whole mesh at once from one snapshot. Bursts of watch events are coalesced into one
//! pass. A pass never plans from a view older than its own writes: the objects the API
//! server returned for them overlay the caches until the watch catches up.

use crate::apply::Writer;
use crate::lease::Leadership;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::plan::{self, Snapshot};
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client, Resource, ResourceExt,
    api::ListParams,
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::Notify;
use tracing::{error, info, instrument};
use wgmesh_api::{Mesh, MeshPeer, MeshPeerReport, PodCIDRPool, consts::DEFAULT_MESH};

/// How long to let a burst of events accumulate before a pass: part of every join's latency
/// (a new key waits this long for its approval); a burst that outlasts it is taken by the
/// passes that follow, each planning from the whole snapshot.
const COALESCE: Duration = Duration::from_millis(50);
/// A pass runs at least this often, events or not.
const RESYNC: Duration = Duration::from_secs(60);

/// Caches of everything the operator reads.
#[derive(Clone)]
struct Caches {
    nodes: Store<Node>,
    peers: Store<MeshPeer>,
    reports: Store<MeshPeerReport>,
    pools: Store<PodCIDRPool>,
    meshes: Store<Mesh>,
}

fn cache<K, S>(stream: S, notify: Arc<Notify>) -> (Store<K>, impl std::future::Future<Output = ()>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    let (reader, writer) = reflector::store();
    let task = stream
        .default_backoff()
        .reflect(writer)
        .for_each(move |ev| {
            if let Err(e) = ev {
                tracing::warn!(error = %e, "watch failed; retrying");
            }
            notify.notify_one();
            futures::future::ready(())
        });
    (reader, task)
}

/// Peers this replica wrote, newer than what the cache may show yet.
#[derive(Default)]
struct Overlay {
    peers: BTreeMap<String, Option<Arc<MeshPeer>>>,
}

fn rv(p: &MeshPeer) -> u64 {
    p.metadata
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

impl Overlay {
    fn record(&mut self, peer: Arc<MeshPeer>) {
        let name = peer.name_any();
        let newer = match self.peers.get(&name) {
            Some(Some(old)) => rv(&peer) >= rv(old),
            _ => true,
        };
        if newer {
            self.peers.insert(name, Some(peer));
        }
    }

    /// The cached peers with this replica's newer writes laid over them; entries the cache
    /// has caught up with are dropped.
    fn merge(&mut self, cached: Vec<Arc<MeshPeer>>) -> Vec<Arc<MeshPeer>> {
        let mut by_name: BTreeMap<String, Arc<MeshPeer>> =
            cached.into_iter().map(|p| (p.name_any(), p)).collect();
        self.peers
            .retain(|name, ours| match (by_name.get(name), ours) {
                (Some(c), Some(o)) if rv(c) >= rv(o) => false,
                (Some(_), Some(o)) => {
                    by_name.insert(name.clone(), o.clone());
                    true
                }
                (None, Some(o)) => {
                    by_name.insert(name.clone(), o.clone());
                    true
                }
                // Released: gone once the cache no longer has it.
                (Some(_), None) => {
                    by_name.remove(name);
                    true
                }
                (None, None) => false,
            });
        by_name.into_values().collect()
    }
}

/// A watch whose list is read from the API server's watch cache (`resourceVersion=0`, as
/// client-go's informers read it) in one request, not in pages of 500, each a request of
/// its own (the agent's caches say what that cost).
fn from_watch_cache() -> watcher::Config {
    watcher::Config {
        page_size: None,
        ..watcher::Config::default().any_semantic()
    }
}

/// Runs the loop forever. `leader` says whether this replica may write.
#[instrument(skip_all)]
pub async fn run(
    client: Client,
    identity: String,
    namespace: String,
    mut leader: Leadership,
    metrics: Arc<Metrics>,
) {
    let notify = Arc::new(Notify::new());
    // Each cache lists from the API server's watch cache (`from_watch_cache`), not with a
    // quorum read from etcd: its first list and any relist after a broken watch cost the
    // server little. A new leader reads the peers with a quorum read before it plans (below).
    // Nodes are big; keep only what planning reads.
    let nodes = watcher(Api::<Node>::all(client.clone()), from_watch_cache()).modify(|n| {
        n.status = None;
        n.metadata.managed_fields = None;
        n.metadata.annotations = None;
    });
    let (nodes, nodes_task) = cache(nodes, notify.clone());
    let (peers, peers_task) = cache(
        watcher(Api::<MeshPeer>::all(client.clone()), from_watch_cache())
            .modify(|p| p.metadata.managed_fields = None),
        notify.clone(),
    );
    let (reports, reports_task) = cache(
        watcher(
            Api::<MeshPeerReport>::all(client.clone()),
            from_watch_cache(),
        )
        .modify(|r| r.metadata.managed_fields = None),
        notify.clone(),
    );
    let (pools, pools_task) = cache(
        watcher(Api::<PodCIDRPool>::all(client.clone()), from_watch_cache()),
        notify.clone(),
    );
    let (meshes, meshes_task) = cache(
        watcher(
            Api::<Mesh>::all(client.clone()),
            from_watch_cache().fields(&format!("metadata.name={DEFAULT_MESH}")),
        ),
        notify.clone(),
    );
    tokio::spawn(nodes_task);
    tokio::spawn(peers_task);
    tokio::spawn(reports_task);
    tokio::spawn(pools_task);
    tokio::spawn(meshes_task);
    let caches = Caches {
        nodes,
        peers,
        reports,
        pools,
        meshes,
    };
    for ready in [
        caches.nodes.wait_until_ready().await,
        caches.peers.wait_until_ready().await,
        caches.reports.wait_until_ready().await,
        caches.pools.wait_until_ready().await,
        caches.meshes.wait_until_ready().await,
    ] {
        if ready.is_err() {
            error!("a cache's writer stopped before it was ready");
            return;
        }
    }
    metrics.set_ready();
    info!("caches synced");

    let writer = Writer::new(
        client.clone(),
        &identity,
        &namespace,
        leader.clone(),
        metrics.clone(),
    );
    let peers_api = Api::<MeshPeer>::all(client);
    let mut overlay = Overlay::default();
    let mut ledger = Arc::new(Ledger::default());
    let mut carry_over = BTreeMap::new();
    let mut was_leader = false;
    loop {
        let is_leader = leader.leading();
        metrics.leader.set(i64::from(is_leader));
        if !is_leader {
            was_leader = false;
            if leader.flipped(false).await.is_err() {
                return;
            }
            continue;
        }
        if !was_leader {
            // A new leader must not plan from a cache that may lag the previous leader's
            // last writes: read the peers and the ledger afresh (quorum reads), lay the
            // peers over the cache, and move claims still kept as Leases into the ledger.
            let fresh = async {
                let list = peers_api.list(&ListParams::default()).await?;
                let mut read = Arc::new(writer.read_ledger().await?);
                writer.migrate_lease_claims(&mut read).await?;
                anyhow::Ok((list, read))
            };
            match fresh.await {
                Ok((list, read)) => {
                    for p in list.items {
                        overlay.record(Arc::new(p));
                    }
                    ledger = read;
                    was_leader = true;
                }
                Err(e) => {
                    metrics.error("list");
                    error!(error = %format!("{e:#}"), "reading the peers and the subnet ledger after becoming leader failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
        }

        let started = Instant::now();
        let snapshot = Snapshot {
            nodes: caches.nodes.state(),
            peers: overlay.merge(caches.peers.state()),
            reports: caches.reports.state(),
            pools: caches.pools.state(),
            mesh: caches
                .meshes
                .state()
                .into_iter()
                .find(|m| m.name_any() == DEFAULT_MESH),
            carry_over: carry_over.clone(),
            ledger: ledger.clone(),
            now: SystemTime::now(),
        };
        let plan = plan::plan(&snapshot);
        drop(snapshot);
        carry_over = plan.carry_over.clone();
        let requeue_at = plan.requeue_at;
        let deferred = plan.deferred;
        let written = writer.apply(&plan, &mut ledger).await;
        let failed = written.errors > 0;
        for p in written.peers {
            overlay.record(p);
        }
        for name in written.gone {
            overlay.peers.insert(name, None);
        }
        metrics.reconciles.inc();
        metrics
            .reconcile_duration
            .observe(started.elapsed().as_secs_f64());
        metrics.allocations.inc_by(plan.allocated as u64);
        metrics.peers_ready.set(plan.peers_ready as i64);
        metrics.peers_not_ready.set(plan.peers_not_ready as i64);
        metrics.rotating.set(plan.rotating as i64);
        for (_, due) in &plan.rotations_granted {
            let reason = crate::plan::due_reason(*due);
            metrics
                .rotations_granted
                .get_or_create(&crate::metrics::ReasonLabels {
                    reason: reason.as_str().to_owned(),
                })
                .inc();
        }
        for u in &plan.usage {
            let labels = crate::metrics::PoolLabels {
                pool: u.pool.clone(),
                family: u.family.to_string(),
            };
            metrics
                .pool_allocated
                .get_or_create(&labels)
                .set(i64::try_from(u.allocated).unwrap_or(i64::MAX));
            metrics.pool_free.get_or_create(&labels).set(u.free_i64());
        }
        let busy = !plan.creates.is_empty()
            || !plan.allocations.is_empty()
            || !plan.releases.is_empty()
            || !plan.deletes.is_empty()
            || !plan.claims.is_empty()
            || !plan.stale_claims.is_empty()
            || !plan.peer_status.is_empty()
            || !plan.pool_status.is_empty()
            || plan.mesh_status.is_some();

        // Wait for something to happen: an event, a grace period ending, the resync, or a
        // change of leadership. After a pass that wrote, go again soon: its writes may have
        // unblocked more work (a created peer gets its status in the next pass).
        let wait = if busy {
            Duration::ZERO
        } else {
            requeue_at
                .and_then(|t| t.duration_since(SystemTime::now()).ok())
                .map_or(RESYNC, |d| d.min(RESYNC))
        };
        // Nodes left for the next pass: it comes at once (unless this one failed: then
        // after the usual pause, not in a tight loop against an API server in trouble).
        if deferred > 0 && !failed {
            continue;
        }
        tokio::select! {
            _ = notify.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = leader.flipped(true) => {}
        }
        tokio::time::sleep(COALESCE).await;
    }
}
