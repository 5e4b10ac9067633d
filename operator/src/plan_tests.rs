//! Table tests of the plan, and a convergence check: applying a plan's writes to the
//! snapshot and planning again must produce no writes at all.

use super::*;
use k8s_openapi::api::core::v1::NodeSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use wgmesh_api::pool::NodePrefixLength;
use wgmesh_api::{MeshPeerStatus, PodCIDRPoolSpec};

const KEY_1: &str = "mGpQp9SmU3aD4Jq0Ykwj1CzO3P0k9+4w6VvVvHXxrmI=";
const KEY_2: &str = "hX3kLw0pQyYZ3Sx8PZ2iVt8ldl2D5cO6lGJp0m0Qk2A=";

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

fn time(secs: u64) -> Time {
    Time(k8s_openapi::jiff::Timestamp::try_from(at(secs)).expect("time"))
}

fn mk_node(name: &str, uid: &str) -> Arc<Node> {
    Arc::new(Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            uid: Some(uid.into()),
            creation_timestamp: Some(time(0)),
            ..Default::default()
        },
        spec: Some(NodeSpec::default()),
        status: None,
    })
}

fn mk_pool(name: &str, cidrs: &[&str], v4: u8, created: u64) -> Arc<PodCIDRPool> {
    let mut p = PodCIDRPool::new(
        name,
        PodCIDRPoolSpec {
            cidrs: cidrs.iter().map(|c| c.to_string()).collect(),
            node_prefix_length: NodePrefixLength {
                ipv4: Some(v4),
                ipv6: Some(64),
            },
            node_selector: None,
        },
    );
    p.metadata.creation_timestamp = Some(time(created));
    p.metadata.generation = Some(1);
    Arc::new(p)
}

fn mk_external(name: &str, key: &str, allowed: &[&str], created: u64) -> Arc<MeshPeer> {
    let mut p = MeshPeer::new(
        name,
        MeshPeerSpec {
            public_key: Some(key.into()),
            allowed_ips: allowed.iter().map(|c| c.to_string()).collect(),
            ..Default::default()
        },
    );
    p.metadata.creation_timestamp = Some(time(created));
    p.metadata.generation = Some(1);
    p.metadata.resource_version = Some("1".into());
    Arc::new(p)
}

/// The `default` Mesh, opening every address to external peers: most tests are about other
/// rules.
fn open_mesh() -> Mesh {
    let mut mesh = Mesh::new(consts::DEFAULT_MESH, Default::default());
    mesh.spec.external_peers = Some(wgmesh_api::mesh::ExternalPeers {
        allowed_ranges: vec!["0.0.0.0/0".into(), "::/0".into()],
    });
    mesh.metadata.generation = Some(1);
    mesh
}

fn mk_snapshot(
    nodes: Vec<Arc<Node>>,
    peers: Vec<Arc<MeshPeer>>,
    pools: Vec<Arc<PodCIDRPool>>,
) -> Snapshot {
    Snapshot {
        nodes,
        peers,
        reports: Vec::new(),
        pools,
        mesh: Some(Arc::new(open_mesh())),
        carry_over: BTreeMap::new(),
        ledger: Arc::new(Ledger::default()),
        now: at(1000),
    }
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .expect("after the epoch")
        .as_secs()
}

/// Adds a claim of `subnet` for `holder` made at `created`, as another writer would.
fn add_claim(snap: &mut Snapshot, subnet: &str, holder: &str, created: SystemTime) {
    let net: ipnet::IpNet = subnet.parse().expect("subnet");
    let (verdicts, _) =
        Arc::make_mut(&mut snap.ledger).merge(&[(holder, &[net])], &[], secs(created));
    assert_eq!(verdicts, vec![crate::ledger::Verdict::Ours]);
}

/// The ledger's claims as (subnet, holder).
fn claims_of(snap: &Snapshot) -> BTreeSet<(String, String)> {
    snap.ledger
        .entries
        .iter()
        .map(|(s, e)| (s.to_string(), e.holder.clone()))
        .collect()
}

/// Claims each write's subnets in the ledger, as `apply` does, and says which writes may
/// happen.
fn claim_in_memory(snap: &mut Snapshot, plan: &Plan) -> (Vec<bool>, Vec<bool>) {
    let nets = |texts: &[String]| -> Vec<ipnet::IpNet> {
        texts.iter().map(|t| t.parse().expect("subnet")).collect()
    };
    let creates: Vec<(String, Vec<ipnet::IpNet>)> = plan
        .creates
        .iter()
        .map(|p| {
            (
                p.metadata.name.clone().expect("name"),
                nets(&p.spec.pod_cidrs),
            )
        })
        .collect();
    let allocations: Vec<(String, Vec<ipnet::IpNet>)> = plan
        .allocations
        .iter()
        .map(|a| (a.name.clone(), nets(&a.pod_cidrs)))
        .collect();
    let missing: Vec<(String, Vec<ipnet::IpNet>)> = plan
        .claims
        .iter()
        .map(|c| (c.holder.clone(), nets(std::slice::from_ref(&c.subnet))))
        .collect();
    let writes: Vec<(&str, &[ipnet::IpNet])> = creates
        .iter()
        .chain(&allocations)
        .chain(&missing)
        .map(|(h, n)| (h.as_str(), n.as_slice()))
        .collect();
    let now = secs(snap.now);
    let (verdicts, _) = Arc::make_mut(&mut snap.ledger).merge(&writes, &plan.stale_claims, now);
    let ours: Vec<bool> = verdicts
        .iter()
        .map(|v| *v == crate::ledger::Verdict::Ours)
        .collect();
    (
        ours[..creates.len()].to_vec(),
        ours[creates.len()..creates.len() + allocations.len()].to_vec(),
    )
}

/// Lays a plan's writes onto the snapshot, as the API server would.
fn apply_in_memory(snap: &mut Snapshot, plan: &Plan) {
    let (create_ok, alloc_ok) = claim_in_memory(snap, plan);
    let mut rv = 100;
    let mut bump = |p: &mut MeshPeer| {
        rv += 1;
        p.metadata.resource_version = Some(rv.to_string());
    };
    for name in &plan.releases {
        snap.peers
            .retain(|p| p.metadata.name.as_deref() != Some(name.as_str()));
    }
    for delete in &plan.deletes {
        // Without finalizers, a delete removes the object at once.
        snap.peers.retain(|p| {
            p.metadata.name.as_deref() != Some(delete.name.as_str())
                || p.metadata
                    .finalizers
                    .as_ref()
                    .is_some_and(|f| !f.is_empty())
        });
        for p in &mut snap.peers {
            if p.metadata.name.as_deref() == Some(delete.name.as_str()) {
                Arc::make_mut(p).metadata.deletion_timestamp = Some(Time(
                    k8s_openapi::jiff::Timestamp::try_from(snap.now).expect("time"),
                ));
            }
        }
    }
    for (create, _) in plan.creates.iter().zip(create_ok).filter(|(_, ok)| *ok) {
        let mut p = create.clone();
        p.metadata.creation_timestamp = Some(Time(
            k8s_openapi::jiff::Timestamp::try_from(snap.now).expect("time"),
        ));
        p.metadata.generation = Some(1);
        bump(&mut p);
        snap.peers.push(Arc::new(p));
    }
    for (a, _) in plan.allocations.iter().zip(alloc_ok).filter(|(_, ok)| *ok) {
        for p in &mut snap.peers {
            if p.metadata.name.as_deref() == Some(a.name.as_str()) {
                let p = Arc::make_mut(p);
                p.spec.pod_cidrs = a.pod_cidrs.clone();
                p.metadata.generation = p.metadata.generation.map(|g| g + 1);
                bump(p);
            }
        }
    }
    for w in &plan.peer_status {
        for p in &mut snap.peers {
            if p.metadata.name.as_deref() == Some(w.name.as_str()) {
                let p = Arc::make_mut(p);
                let mut status = p.status.clone().unwrap_or_default();
                // The operator's conditions replace its own; the agent's stay.
                status
                    .conditions
                    .retain(|c| !w.status.conditions.iter().any(|n| n.type_ == c.type_));
                status.conditions.extend(w.status.conditions.clone());
                status.approved = w.status.approved.clone();
                status.observed_generation = w.status.observed_generation;
                status.rotation_grant = w.status.rotation_grant.clone();
                p.status = Some(status);
            }
        }
    }
    for w in &plan.pool_status {
        for p in &mut snap.pools {
            if p.metadata.name.as_deref() == Some(w.name.as_str()) {
                Arc::make_mut(p).status = Some(w.status.clone());
            }
        }
    }
    if let (Some(w), Some(mesh)) = (&plan.mesh_status, snap.mesh.as_mut()) {
        Arc::make_mut(mesh).status = Some(w.status.clone());
    }
    snap.carry_over = plan.carry_over.clone();
}

fn writes(plan: &Plan) -> usize {
    plan.claims.len()
        + plan.stale_claims.len()
        + plan.creates.len()
        + plan.allocations.len()
        + plan.deletes.len()
        + plan.releases.len()
        + plan.peer_status.len()
        + plan.pool_status.len()
        + usize::from(plan.mesh_status.is_some())
}

/// Plans and applies until nothing is left to write; fails if that takes too many passes.
fn converge(snap: &mut Snapshot) {
    for _ in 0..5 {
        let plan = plan(snap);
        if writes(&plan) == 0 {
            return;
        }
        apply_in_memory(snap, &plan);
    }
    panic!("no convergence after 5 passes: {:#?}", plan(snap));
}

fn peer<'a>(snap: &'a Snapshot, name: &str) -> &'a MeshPeer {
    snap.peers
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no peer {name}"))
}

fn ready(p: &MeshPeer) -> (bool, String) {
    let c = p
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == condition::READY))
        .unwrap_or_else(|| panic!("no Ready condition on {:?}", p.metadata.name));
    (
        c.status == wgmesh_api::ConditionStatus::True,
        c.reason.clone(),
    )
}

fn publish_key(snap: &mut Snapshot, name: &str, key: &str) {
    for p in &mut snap.peers {
        if p.metadata.name.as_deref() == Some(name) {
            let p = Arc::make_mut(p);
            let mut status = p.status.clone().unwrap_or_else(MeshPeerStatus::default);
            status.public_key = Some(key.into());
            status.endpoints = vec!["192.0.2.1:51820".into()];
            p.status = Some(status);
        }
    }
}

#[test]
fn a_joining_nodes_first_status_waits_briefly_for_its_key() {
    let mut snap = mk_snapshot(
        vec![mk_node("n1", "u1"), mk_node("n2", "u2")],
        vec![],
        vec![mk_pool("p", &["10.244.0.0/16"], 24, 0)],
    );
    let created = plan(&snap);
    assert_eq!(created.creates.len(), 2);
    apply_in_memory(&mut snap, &created);
    let born = snap.now;

    // Within the grace: no status for either new peer, and a pass is due when it ends.
    let waiting = plan(&snap);
    assert!(waiting.peer_status.is_empty(), "{:#?}", waiting.peer_status);
    assert_eq!(waiting.peers_not_ready, 2);
    assert!(
        waiting
            .requeue_at
            .is_some_and(|t| t <= born + FIRST_KEY_GRACE)
    );

    // n1's agent publishes its key in time: one status write says it all.
    publish_key(&mut snap, "n1", KEY_1);
    snap.now = born + Duration::from_secs(3);
    let keyed = plan(&snap);
    assert_eq!(
        keyed
            .peer_status
            .iter()
            .map(|w| w.name.as_str())
            .collect::<Vec<_>>(),
        vec!["n1"]
    );
    apply_in_memory(&mut snap, &keyed);
    assert_eq!(ready(peer(&snap, "n1")), (true, "Valid".into()));
    assert!(
        keyed.events.iter().all(|e| e.name != "n2"),
        "{:#?}",
        keyed.events
    );

    // n2's never does: once the grace is over it says so.
    snap.now = born + FIRST_KEY_GRACE;
    let late = plan(&snap);
    assert_eq!(
        late.peer_status
            .iter()
            .map(|w| w.name.as_str())
            .collect::<Vec<_>>(),
        vec!["n2"]
    );
    apply_in_memory(&mut snap, &late);
    assert_eq!(ready(peer(&snap, "n2")), (false, "NoPublicKey".into()));
    converge(&mut snap);
}

#[test]
fn every_node_gets_a_peer_owned_by_it_with_a_distinct_subnet() {
    let mut snap = mk_snapshot(
        vec![
            mk_node("n1", "u1"),
            mk_node("n2", "u2"),
            mk_node("n3", "u3"),
        ],
        vec![],
        vec![mk_pool("p", &["10.244.0.0/16"], 24, 0)],
    );
    let first = plan(&snap);
    assert_eq!(first.creates.len(), 3);
    let c = &first.creates[0];
    assert_eq!(c.spec.node.as_deref(), Some("n1"));
    assert_eq!(c.spec.pod_cidrs, vec!["10.244.0.0/24".to_string()]);
    let owner = &c.metadata.owner_references.as_ref().expect("owner")[0];
    assert_eq!((owner.kind.as_str(), owner.uid.as_str()), ("Node", "u1"));
    assert_eq!(
        c.metadata.finalizers,
        Some(vec![RELEASE_FINALIZER.to_string()])
    );
    converge(&mut snap);
    let subnets: BTreeSet<_> = snap
        .peers
        .iter()
        .map(|p| p.spec.pod_cidrs.clone())
        .collect();
    assert_eq!(subnets.len(), 3);
    // Without keys the nodes are not ready yet, and say why once their agents had the time
    // to publish one.
    snap.now += FIRST_KEY_GRACE;
    converge(&mut snap);
    assert_eq!(ready(peer(&snap, "n2")), (false, "NoPublicKey".into()));
    // Each subnet has its claim, naming its node.
    let claims = claims_of(&snap);
    let held: BTreeSet<(String, String)> = snap
        .peers
        .iter()
        .flat_map(|p| {
            p.spec
                .pod_cidrs
                .iter()
                .map(|s| (s.clone(), p.metadata.name.clone().unwrap_or_default()))
        })
        .collect();
    assert_eq!(claims, held);
}

#[test]
fn a_subnet_another_writer_claimed_goes_to_its_holder_and_nobody_else() {
    // Another writer claimed the first subnet for n2 and has not written n2's peer yet; n1
    // comes first and would otherwise take it.
    let mut snap = mk_snapshot(
        vec![mk_node("n1", "u1"), mk_node("n2", "u2")],
        vec![],
        vec![mk_pool("p", &["10.244.0.0/16"], 24, 0)],
    );
    add_claim(&mut snap, "10.244.0.0/24", "n2", at(990));
    let first = plan(&snap);
    let subnets: BTreeMap<String, Vec<String>> = first
        .creates
        .iter()
        .map(|p| {
            (
                p.metadata.name.clone().unwrap_or_default(),
                p.spec.pod_cidrs.clone(),
            )
        })
        .collect();
    assert_eq!(subnets["n1"], vec!["10.244.1.0/24".to_string()]);
    assert_eq!(subnets["n2"], vec!["10.244.0.0/24".to_string()]);
    assert!(first.stale_claims.is_empty());
    converge(&mut snap);
    assert_eq!(snap.ledger.entries.len(), 2);
}

#[test]
fn a_claim_no_peer_holds_is_deleted_only_after_the_claim_grace() {
    let mut snap = mk_snapshot(
        vec![mk_node("n1", "u1")],
        vec![],
        vec![mk_pool("p", &["10.244.0.0/16"], 24, 0)],
    );
    converge(&mut snap);
    // n1 has no agent; past the first key's grace nothing of its own is due.
    snap.now += FIRST_KEY_GRACE;
    converge(&mut snap);
    // A writer claimed a subnet for a node that is gone, and never wrote a peer.
    add_claim(&mut snap, "10.244.9.0/24", "gone", at(900));
    let first = plan(&snap);
    assert!(first.stale_claims.is_empty());
    assert_eq!(first.requeue_at, Some(at(900) + CLAIM_GRACE));
    // Nobody gets it meanwhile.
    snap.nodes.push(mk_node("n2", "u2"));
    converge(&mut snap);
    assert_ne!(
        peer(&snap, "n2").spec.pod_cidrs,
        vec!["10.244.9.0/24".to_string()]
    );

    snap.now = at(900) + CLAIM_GRACE;
    let later = plan(&snap);
    assert_eq!(
        later.stale_claims,
        vec![Removal {
            subnet: "10.244.9.0/24".parse().expect("subnet"),
            holder: "gone".into(),
            claimed_at: secs(at(900)),
        }]
    );
    // Claims of subnets peers hold are kept however old.
    assert_eq!(later.stale_claims.len(), 1);
}

#[test]
fn peers_written_before_claims_existed_get_theirs() {
    let mut snap = mk_snapshot(
        vec![mk_node("n1", "u1"), mk_node("n2", "u2")],
        vec![],
        vec![mk_pool("p", &["10.244.0.0/16"], 24, 0)],
    );
    converge(&mut snap);
    snap.ledger = Arc::new(Ledger::default());
    let p = plan(&snap);
    assert_eq!(
        p.claims,
        vec![
            ClaimWrite {
                subnet: "10.244.0.0/24".into(),
                holder: "n1".into()
            },
            ClaimWrite {
                subnet: "10.244.1.0/24".into(),
                holder: "n2".into()
            },
        ]
    );
    assert!(p.creates.is_empty() && p.allocations.is_empty());
}

#[test]
fn a_node_with_a_published_key_becomes_ready_with_exactly_its_subnets_approved() {
    let mut snap = mk_snapshot(
        vec![mk_node("n1", "u1")],
        vec![],
        vec![mk_pool("p", &["10.244.0.0/16"], 24, 0)],
    );
    converge(&mut snap);
    publish_key(&mut snap, "n1", KEY_1);
    converge(&mut snap);
    let p = peer(&snap, "n1");
    assert_eq!(ready(p), (true, "Valid".into()));
    let approved = p
        .status
        .as_ref()
        .and_then(|s| s.approved.clone())
        .expect("approved");
    assert_eq!(approved.public_key.as_deref(), Some(KEY_1));
    assert_eq!(approved.allowed_ips, vec!["10.244.0.0/24".to_string()]);
    assert_eq!(approved.endpoint.as_deref(), Some("192.0.2.1:51820"));
}

#[test]
fn an_external_peer_claiming_a_node_subnet_is_refused_and_changes_nothing_else() {
    let mut snap = mk_snapshot(
        vec![mk_node("n1", "u1")],
        vec![],
        vec![mk_pool("p", &["10.244.0.0/16"], 24, 0)],
    );
    converge(&mut snap);
    publish_key(&mut snap, "n1", KEY_1);
    converge(&mut snap);
    let before = peer(&snap, "n1").clone();
    snap.peers
        .push(mk_external("thief", KEY_2, &["10.244.0.0/24"], 500));
    converge(&mut snap);
    let (ok, reason) = ready(peer(&snap, "thief"));
    assert!(!ok);
    assert_eq!(reason, "AllowedIPsOverlapPodSubnet");
    assert!(
        peer(&snap, "thief")
            .status
            .as_ref()
            .and_then(|s| s.approved.clone())
            .is_none()
    );
    assert_eq!(peer(&snap, "n1").spec, before.spec);
    assert_eq!(peer(&snap, "n1").status, before.status);
}

#[test]
fn a_malformed_or_duplicate_key_is_refused_with_a_reason() {
    let mut snap = mk_snapshot(
        vec![mk_node("n1", "u1")],
        vec![],
        vec![mk_pool("p", &["10.244.0.0/16"], 24, 0)],
    );
    converge(&mut snap);
    publish_key(&mut snap, "n1", KEY_1);
    snap.peers
        .push(mk_external("copycat", KEY_1, &["10.250.0.1/32"], 2000));
    snap.peers.push(mk_external(
        "zero",
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        &["10.250.0.2/32"],
        500,
    ));
    converge(&mut snap);
    assert_eq!(ready(peer(&snap, "n1")), (true, "Valid".into()));
    assert_eq!(
        ready(peer(&snap, "copycat")),
        (false, "DuplicatePublicKey".into())
    );
    assert_eq!(
        ready(peer(&snap, "zero")),
        (false, "InvalidPublicKey".into())
    );
}

#[test]
fn a_deleted_nodes_subnet_is_held_for_the_grace_period_then_reused() {
    let mut snap = mk_snapshot(
        vec![mk_node("n1", "u1"), mk_node("n2", "u2")],
        vec![],
        vec![mk_pool("p", &["10.244.0.0/23"], 24, 0)],
    );
    converge(&mut snap);
    let n1_subnet = peer(&snap, "n1").spec.pod_cidrs.clone();
    snap.nodes
        .retain(|n| n.metadata.name.as_deref() != Some("n1"));
    converge(&mut snap);
    assert!(peer(&snap, "n1").metadata.deletion_timestamp.is_some());
    assert_eq!(ready(peer(&snap, "n1")).1, "NodeGone");

    // A new node within the grace period cannot get the held subnet: the pool is full.
    snap.nodes.push(mk_node("n3", "u3"));
    snap.now = at(1000 + 60);
    converge(&mut snap);
    assert!(peer(&snap, "n3").spec.pod_cidrs.is_empty());
    let exhausted = snap.pools[0].status.as_ref().expect("pool status");
    assert!(
        exhausted
            .conditions
            .iter()
            .any(|c| c.type_ == condition::CAPACITY && c.reason == "Exhausted")
    );

    // After the grace period the old peer is released and n3 gets its subnet.
    snap.now = at(1000 + 301);
    converge(&mut snap);
    assert!(
        snap.peers
            .iter()
            .all(|p| p.metadata.name.as_deref() != Some("n1"))
    );
    assert_eq!(peer(&snap, "n3").spec.pod_cidrs, n1_subnet);
}

#[test]
fn a_released_subnets_claim_goes_with_the_release_however_young() {
    let mut snap = mk_snapshot(
        vec![mk_node("n1", "u1"), mk_node("n2", "u2")],
        vec![],
        vec![mk_pool("p", &["10.244.0.0/23"], 24, 0)],
    );
    if let Some(mesh) = snap.mesh.as_mut() {
        Arc::make_mut(mesh).spec.ipam = Some(wgmesh_api::mesh::Ipam {
            release_grace_period: Some("10s".into()),
            ..Default::default()
        });
    }
    converge(&mut snap);
    let n1_subnet = peer(&snap, "n1").spec.pod_cidrs.clone();
    snap.nodes
        .retain(|n| n.metadata.name.as_deref() != Some("n1"));
    snap.nodes.push(mk_node("n3", "u3"));
    converge(&mut snap);
    assert!(peer(&snap, "n3").spec.pod_cidrs.is_empty());

    // The grace period is over long before the claim is CLAIM_GRACE old.
    snap.now = at(1000 + 11);
    converge(&mut snap);
    assert_eq!(peer(&snap, "n3").spec.pod_cidrs, n1_subnet);
    let holder = claims_of(&snap)
        .into_iter()
        .find(|(s, _)| *s == n1_subnet[0])
        .map(|(_, h)| h);
    assert_eq!(holder.as_deref(), Some("n3"));
}

#[test]
fn a_node_that_comes_back_within_the_grace_period_keeps_its_subnet() {
    let mut snap = mk_snapshot(
        vec![mk_node("n1", "u1"), mk_node("n2", "u2")],
        vec![],
        vec![mk_pool("p", &["10.244.0.0/16"], 24, 0)],
    );
    converge(&mut snap);
    let n2_subnet = peer(&snap, "n2").spec.pod_cidrs.clone();
    snap.nodes
        .retain(|n| n.metadata.name.as_deref() != Some("n2"));
    converge(&mut snap);
    // n0 sorts first and would take the lowest free subnet if n2's were free.
    snap.nodes.push(mk_node("n0", "u0"));
    snap.nodes.push(mk_node("n2", "u2-new"));
    converge(&mut snap);
    let p = peer(&snap, "n2");
    assert_eq!(p.spec.pod_cidrs, n2_subnet);
    assert_eq!(p.owner_references()[0].uid, "u2-new");
    assert_ne!(peer(&snap, "n0").spec.pod_cidrs, n2_subnet);
}

#[test]
fn a_peer_naming_a_node_without_being_made_for_it_is_never_trusted() {
    let mut impostor = (*mk_external("n1", KEY_2, &[], 0)).clone();
    impostor.spec.public_key = None;
    impostor.spec.node = Some("n1".into());
    impostor.spec.pod_cidrs = vec!["10.244.0.0/24".into()];
    impostor.metadata.uid = Some("impostor-uid".into());
    let mut snap = mk_snapshot(
        vec![mk_node("n1", "u1")],
        vec![Arc::new(impostor)],
        vec![mk_pool("p", &["10.244.0.0/16"], 24, 0)],
    );
    let first = plan(&snap);
    assert!(
        first
            .peer_status
            .iter()
            .all(|w| w.name != "n1" || w.status.approved.is_none()),
        "the impostor is never approved: {first:#?}"
    );
    assert_node_name_taken(&first, "n1", "impostor-uid");
    converge(&mut snap);
    assert_owned_by_its_node(&snap, "n1", "u1");
}

#[test]
fn an_external_peer_that_took_a_nodes_name_before_it_joined_gives_way_to_the_node() {
    let mut squatter = (*mk_external("n7", KEY_2, &["10.250.0.7/32"], 0)).clone();
    squatter.metadata.uid = Some("squatter-uid".into());
    let mut snap = mk_snapshot(
        vec![mk_node("n1", "u1")],
        vec![Arc::new(squatter)],
        vec![mk_pool("p", &["10.244.0.0/16"], 24, 0)],
    );
    converge(&mut snap);
    // Before node n7 exists, an external peer of that name is an external peer like any.
    assert_eq!(ready(peer(&snap, "n7")), (true, "Valid".into()));

    snap.nodes.push(mk_node("n7", "u7"));
    let joined = plan(&snap);
    assert_node_name_taken(&joined, "n7", "squatter-uid");
    let event = joined
        .events
        .iter()
        .find(|e| e.reason == "NameOfNodeTaken")
        .expect("an event");
    assert!(event.warning);
    assert!(
        event.note.contains(KEY_2) && event.note.contains("10.250.0.7/32"),
        "the event keeps what the deleted peer held: {}",
        event.note
    );
    converge(&mut snap);
    assert_owned_by_its_node(&snap, "n7", "u7");
}

fn assert_node_name_taken(plan: &Plan, name: &str, uid: &str) {
    assert_eq!(
        plan.deletes,
        vec![PeerDelete {
            name: name.into(),
            uid: Some(uid.into()),
            why: DeleteReason::NameOfNode,
        }]
    );
}

fn assert_owned_by_its_node(snap: &Snapshot, name: &str, node_uid: &str) {
    let p = peer(snap, name);
    assert_eq!(p.spec.node.as_deref(), Some(name));
    assert!(
        p.owner_references()
            .iter()
            .any(|o| o.kind == "Node" && o.name == name && o.uid == node_uid),
        "{p:#?}"
    );
    assert_eq!(p.spec.pod_cidrs.len(), 1);
}

#[test]
fn overlapping_pools_refuse_the_newer_and_allocation_goes_on_from_the_older() {
    let mut snap = mk_snapshot(
        vec![mk_node("n1", "u1")],
        vec![],
        vec![
            mk_pool("old", &["10.244.0.0/16"], 24, 0),
            mk_pool("new", &["10.244.128.0/17"], 24, 10),
        ],
    );
    converge(&mut snap);
    let status = |name: &str| {
        snap.pools
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(name))
            .and_then(|p| p.status.clone())
            .expect("status")
    };
    let new = status("new");
    let r = new
        .conditions
        .iter()
        .find(|c| c.type_ == condition::READY)
        .expect("ready");
    assert_eq!(r.reason, "OverlapsPool");
    assert!(r.message.contains("old"), "{}", r.message);
    assert_eq!(status("old").allocated.expect("counts").ipv4, Some(1));
    assert_eq!(
        peer(&snap, "n1").spec.pod_cidrs,
        vec!["10.244.0.0/24".to_string()]
    );
}

#[test]
fn a_shrunk_pool_keeps_the_allocation_and_says_so() {
    let mut snap = mk_snapshot(
        vec![mk_node("n1", "u1")],
        vec![],
        vec![mk_pool("p", &["10.244.0.0/16"], 24, 0)],
    );
    converge(&mut snap);
    let subnet = peer(&snap, "n1").spec.pod_cidrs.clone();
    Arc::make_mut(&mut snap.pools[0]).spec.cidrs = vec!["10.245.0.0/16".into()];
    converge(&mut snap);
    assert_eq!(peer(&snap, "n1").spec.pod_cidrs, subnet);
    let st = snap.pools[0].status.as_ref().expect("status");
    let c = st
        .conditions
        .iter()
        .find(|c| c.type_ == condition::CONSISTENT)
        .expect("consistent");
    assert_eq!(c.reason, "AllocationsOutsidePool");
    assert!(c.message.contains("n1"), "{}", c.message);
}

#[test]
fn a_converged_mesh_plans_no_writes() {
    let mut snap = mk_snapshot(
        (0..20)
            .map(|i| mk_node(&format!("n{i}"), &format!("u{i}")))
            .collect(),
        vec![mk_external("laptop", KEY_2, &["10.250.0.7/32"], 5)],
        vec![mk_pool("p", &["10.244.0.0/16", "fd00:10:244::/56"], 24, 0)],
    );
    converge(&mut snap);
    let again = plan(&snap);
    assert_eq!(writes(&again), 0, "{again:#?}");
    assert!(again.events.is_empty());
    // Dual-stack: one subnet per family.
    assert_eq!(peer(&snap, "n7").spec.pod_cidrs.len(), 2);
}

const KEY_3: &str = "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=";

fn set_key_state(
    snap: &mut Snapshot,
    name: &str,
    generation: i64,
    created: u64,
    phase: Option<RotationPhase>,
) {
    for p in &mut snap.peers {
        if p.metadata.name.as_deref() == Some(name) {
            let p = Arc::make_mut(p);
            let status = p.status.get_or_insert_with(MeshPeerStatus::default);
            status.key_generation = Some(generation);
            status.key_created_at = Some(time(created));
            status.rotation = phase.map(|ph| wgmesh_api::peer::KeyRotationStatus {
                phase: ph,
                generation,
                ..Default::default()
            });
        }
    }
}

fn rotating(p: &MeshPeer) -> (bool, String) {
    let c = p
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == condition::ROTATING))
        .unwrap_or_else(|| panic!("no Rotating condition on {:?}", p.metadata.name));
    (
        c.status == wgmesh_api::ConditionStatus::True,
        c.reason.clone(),
    )
}

fn grant(p: &MeshPeer) -> Option<i64> {
    p.status
        .as_ref()
        .and_then(|s| s.rotation_grant.as_ref())
        .map(|g| g.generation)
}

/// A converged mesh of `nodes` (name, key, when its key was created), one pool, every key
/// published at generation 0.
fn keyed_mesh(nodes: &[(&str, &str, u64)]) -> Snapshot {
    let mut snap = mk_snapshot(
        nodes
            .iter()
            .map(|(n, _, _)| mk_node(n, &format!("u{n}")))
            .collect(),
        vec![],
        vec![mk_pool("p", &["10.244.0.0/16"], 24, 0)],
    );
    converge(&mut snap);
    for (n, k, created) in nodes {
        publish_key(&mut snap, n, k);
        set_key_state(&mut snap, n, 0, *created, None);
    }
    snap
}

/// `spec.keyRotation` of peer `name`: requested at `at`, a revocation if `revoke`.
fn request_rotation(snap: &mut Snapshot, name: &str, at: u64, revoke: bool) {
    for p in &mut snap.peers {
        if p.metadata.name.as_deref() == Some(name) {
            Arc::make_mut(p).spec.key_rotation = Some(wgmesh_api::peer::PeerKeyRotation {
                requested_at: Some(time(at)),
                revoke: revoke.then_some(true),
            });
        }
    }
}

#[test]
fn a_mesh_request_rotates_nodes_one_slot_at_a_time_and_a_grant_lasts_until_the_generation_moves() {
    let mut snap = keyed_mesh(&[("a", KEY_1, 10), ("b", KEY_2, 10), ("c", KEY_3, 10)]);
    converge(&mut snap);
    assert_eq!(rotating(peer(&snap, "a")), (false, "Idle".into()));

    let mut mesh = open_mesh();
    mesh.spec.key_rotation = Some(wgmesh_api::mesh::MeshKeyRotation {
        requested_at: Some(time(500)),
        ..Default::default()
    });
    snap.mesh = Some(Arc::new(mesh));
    let first = plan(&snap);
    assert_eq!(
        first.rotations_granted.len(),
        1,
        "maxConcurrent defaults to 1"
    );
    assert!(
        first
            .events
            .iter()
            .any(|e| e.reason == "RotationStarted" && e.name == "a")
    );
    converge(&mut snap);
    assert_eq!(grant(peer(&snap, "a")), Some(0));
    assert_eq!(rotating(peer(&snap, "a")), (true, "MeshRequest".into()));
    assert_eq!(rotating(peer(&snap, "b")), (false, "Queued".into()));
    assert_eq!(grant(peer(&snap, "b")), None);

    // The grant survives passes while the node rotates, and no second node starts.
    set_key_state(&mut snap, "a", 0, 10, Some(RotationPhase::Switched));
    converge(&mut snap);
    assert_eq!(grant(peer(&snap, "a")), Some(0));
    assert_eq!(grant(peer(&snap, "b")), None);

    // The node reports the next generation: its grant goes, the next node's comes.
    set_key_state(&mut snap, "a", 1, 1001, Some(RotationPhase::Completed));
    snap.now = at(1002);
    converge(&mut snap);
    assert_eq!(grant(peer(&snap, "a")), None);
    assert_eq!(rotating(peer(&snap, "a")), (false, "Completed".into()));
    assert_eq!(grant(peer(&snap, "b")), Some(0));
    // A key created after the request is not due again.
    assert_eq!(grant(peer(&snap, "a")), None);
}

#[test]
fn a_node_request_rotates_only_that_node_and_a_bad_interval_is_reported() {
    let mut snap = keyed_mesh(&[("a", KEY_1, 10), ("b", KEY_2, 10)]);
    request_rotation(&mut snap, "b", 900, false);
    let mut mesh = open_mesh();
    mesh.spec.key_rotation = Some(wgmesh_api::mesh::MeshKeyRotation {
        interval: Some("soon".into()),
        max_concurrent: Some(5),
        ..Default::default()
    });
    snap.mesh = Some(Arc::new(mesh));
    converge(&mut snap);
    assert_eq!(grant(peer(&snap, "b")), Some(0));
    assert_eq!(rotating(peer(&snap, "b")), (true, "NodeRequest".into()));
    assert_eq!(grant(peer(&snap, "a")), None);
    let mesh_status = snap.mesh.as_ref().and_then(|m| m.status.clone());
    let text = format!("{mesh_status:?} {:?}", plan(&snap).mesh_status);
    assert!(text.contains("keyRotation.interval"), "{text}");
}

fn grant_reason_of(p: &MeshPeer) -> Option<GrantReason> {
    p.status
        .as_ref()
        .and_then(|s| s.rotation_grant.as_ref())
        .map(|g| g.reason)
}

#[test]
fn a_revocation_is_granted_as_one_ahead_of_older_keys_and_reported_as_revoked() {
    // `a` has the oldest key; `c` asks for a revocation of its younger one.
    let mut snap = keyed_mesh(&[("a", KEY_1, 10), ("b", KEY_2, 20), ("c", KEY_3, 30)]);
    request_rotation(&mut snap, "c", 900, true);
    let mut mesh = open_mesh();
    mesh.spec.key_rotation = Some(wgmesh_api::mesh::MeshKeyRotation {
        requested_at: Some(time(500)),
        ..Default::default()
    });
    snap.mesh = Some(Arc::new(mesh));
    let first = plan(&snap);
    // One slot (maxConcurrent 1): the revocation goes first, the older keys wait.
    assert_eq!(
        first.rotations_granted,
        vec![("c".to_string(), core::rotation::Due::Revoke)]
    );
    let started = first
        .events
        .iter()
        .find(|e| e.name == "c")
        .expect("an Event about c");
    assert_eq!(started.reason, "RevocationStarted");
    assert!(started.note.contains("revocation"), "{}", started.note);
    converge(&mut snap);
    assert_eq!(grant_reason_of(peer(&snap, "c")), Some(GrantReason::Revoke));
    assert_eq!(
        rotating(peer(&snap, "c")),
        (true, GrantReason::Revoke.as_str().into())
    );
    assert_eq!(rotating(peer(&snap, "a")), (false, "Queued".into()));
    assert_eq!(grant(peer(&snap, "a")), None);

    // The agent reports the revocation complete.
    for p in &mut snap.peers {
        if p.metadata.name.as_deref() == Some("c") {
            let status = Arc::make_mut(p).status.get_or_insert_with(Default::default);
            status.key_generation = Some(1);
            status.key_created_at = Some(time(1001));
            status.rotation = Some(wgmesh_api::peer::KeyRotationStatus {
                phase: RotationPhase::Completed,
                generation: 1,
                revoke: true,
                ..Default::default()
            });
        }
    }
    snap.now = at(1002);
    converge(&mut snap);
    assert_eq!(rotating(peer(&snap, "c")), (false, "Revoked".into()));
    let message = peer(&snap, "c")
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == condition::ROTATING))
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(message.contains("revoked"), "{message}");
    // Its slot goes to the oldest key, for the Mesh's ordinary request.
    assert_eq!(
        grant_reason_of(peer(&snap, "a")),
        Some(GrantReason::MeshRequest)
    );
}

#[test]
fn a_mesh_revocation_revokes_every_node_one_slot_at_a_time() {
    let mut snap = keyed_mesh(&[("a", KEY_1, 10), ("b", KEY_2, 10)]);
    let mut mesh = open_mesh();
    mesh.spec.key_rotation = Some(wgmesh_api::mesh::MeshKeyRotation {
        requested_at: Some(time(500)),
        revoke: Some(true),
        ..Default::default()
    });
    snap.mesh = Some(Arc::new(mesh));
    converge(&mut snap);
    assert_eq!(grant_reason_of(peer(&snap, "a")), Some(GrantReason::Revoke));
    assert_eq!(grant(peer(&snap, "b")), None, "maxConcurrent 1 holds");
    let (queued, reason) = rotating(peer(&snap, "b"));
    assert_eq!((queued, reason.as_str()), (false, "Queued"));
}

fn mk_located(name: &str, uid: &str, region: &str) -> Arc<Node> {
    let mut node = (*mk_node(name, uid)).clone();
    node.metadata.labels = Some(BTreeMap::from([(
        consts::DEFAULT_LOCATION_LABEL.to_owned(),
        region.to_owned(),
    )]));
    Arc::new(node)
}

/// What the agent of `name` publishes: its key, endpoint, public endpoint, and the endpoint
/// its device sends to for each peer, with the handshake time.
fn publish_place(
    snap: &mut Snapshot,
    name: &str,
    key: &str,
    i: u8,
    public: bool,
    seen: &[(&str, &str, u64)],
) {
    for p in &mut snap.peers {
        if p.metadata.name.as_deref() == Some(name) {
            let p = Arc::make_mut(p);
            let mut status = p.status.clone().unwrap_or_else(MeshPeerStatus::default);
            status.public_key = Some(key.into());
            status.endpoints = vec![format!("10.0.0.{i}:51820")];
            status.public_endpoints = if public {
                vec![format!("198.51.100.{i}:51820")]
            } else {
                vec![]
            };
            status.underlay_mtu = Some(1500 - u32::from(i));
            p.status = Some(status);
        }
    }
    let mut report = wgmesh_api::MeshPeerReport::new(
        name,
        wgmesh_api::MeshPeerReportSpec {
            paths: seen
                .iter()
                .map(|(peer, endpoint, at_secs)| wgmesh_api::peer::PeerPath {
                    peer: (*peer).into(),
                    path: PathKind::Direct,
                    via: None,
                    endpoint: Some((*endpoint).into()),
                    latest_handshake: Some(time(*at_secs)),
                })
                .collect(),
            ..Default::default()
        },
    );
    report.metadata.uid = Some(format!("report-{name}"));
    snap.reports
        .retain(|r| r.metadata.name.as_deref() != Some(name));
    snap.reports.push(Arc::new(report));
}

fn approval(snap: &Snapshot, name: &str) -> ApprovedPeer {
    peer(snap, name)
        .status
        .as_ref()
        .and_then(|s| s.approved.clone())
        .unwrap_or_else(|| panic!("{name} not approved"))
}

#[test]
fn a_nodes_location_and_nat_come_from_its_label_and_what_public_nodes_elsewhere_see() {
    const KEY_3: &str = "AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM=";
    let mut snap = mk_snapshot(
        vec![
            mk_located("n1", "u1", "a"),
            mk_located("n2", "u2", "a"),
            mk_located("n3", "u3", "b"),
        ],
        vec![],
        vec![mk_pool("p", &["10.244.0.0/16"], 24, 0)],
    );
    converge(&mut snap);
    let mapped = "203.0.113.9:40000";
    publish_place(&mut snap, "n1", KEY_1, 1, true, &[("n3", mapped, 990)]);
    publish_place(&mut snap, "n2", KEY_2, 2, true, &[("n3", mapped, 995)]);
    // n3 sees the public nodes at their own addresses; it is behind NAT itself, so what it
    // sees says nothing about them.
    publish_place(
        &mut snap,
        "n3",
        KEY_3,
        3,
        false,
        &[("n1", "198.51.100.1:51820", 990)],
    );
    converge(&mut snap);
    let a1 = approval(&snap, "n1");
    assert_eq!(a1.location.as_deref(), Some("a"));
    assert_eq!(a1.nat, Some(NatKind::Public));
    assert_eq!(a1.public_endpoints, vec!["198.51.100.1:51820".to_string()]);
    assert_eq!(a1.underlay_mtu, Some(1499));
    let a3 = approval(&snap, "n3");
    assert_eq!(a3.location.as_deref(), Some("b"));
    assert_eq!(a3.nat, Some(NatKind::EndpointIndependent));
    assert_eq!(a3.mapped_endpoint.as_deref(), Some(mapped));
    assert_eq!(a3.endpoint.as_deref(), Some("10.0.0.3:51820"));

    // The second public node sees another port: a symmetric NAT, no mapping to share.
    publish_place(
        &mut snap,
        "n2",
        KEY_2,
        2,
        true,
        &[("n3", "203.0.113.9:40001", 995)],
    );
    converge(&mut snap);
    let a3 = approval(&snap, "n3");
    assert_eq!(
        (a3.nat, a3.mapped_endpoint),
        (Some(NatKind::Symmetric), None)
    );

    // Views without a recent handshake do not count.
    publish_place(&mut snap, "n1", KEY_1, 1, true, &[("n3", mapped, 10)]);
    publish_place(&mut snap, "n2", KEY_2, 2, true, &[("n3", mapped, 20)]);
    converge(&mut snap);
    assert_eq!(approval(&snap, "n3").nat, Some(NatKind::Unknown));
}

#[test]
fn the_location_label_is_the_meshs_choice() {
    let mut snap = mk_snapshot(
        vec![],
        vec![],
        vec![mk_pool("p", &["10.244.0.0/16"], 24, 0)],
    );
    let mut node = (*mk_node("n1", "u1")).clone();
    node.metadata.labels = Some(BTreeMap::from([(
        "example.com/site".to_owned(),
        "lab".to_owned(),
    )]));
    snap.nodes = vec![Arc::new(node)];
    let mut mesh = open_mesh();
    mesh.spec.topology = Some(wgmesh_api::mesh::MeshTopology {
        location_label: Some("example.com/site".into()),
        ..Default::default()
    });
    snap.mesh = Some(Arc::new(mesh));
    converge(&mut snap);
    publish_key(&mut snap, "n1", KEY_1);
    converge(&mut snap);
    assert_eq!(approval(&snap, "n1").location.as_deref(), Some("lab"));
}

#[test]
fn thousands_of_new_nodes_are_created_a_slice_per_pass() {
    let n = MAX_CREATES_PER_PASS * 2 + 7;
    let nodes = (0..n)
        .map(|i| mk_node(&format!("n{i:05}"), &format!("u{i}")))
        .collect();
    let mut snap = mk_snapshot(nodes, vec![], vec![mk_pool("p", &["10.0.0.0/8"], 24, 0)]);
    let first = plan(&snap);
    assert_eq!(first.creates.len(), MAX_CREATES_PER_PASS);
    // The first slice in name order, each with its subnet, as the whole plan would give it.
    assert_eq!(first.creates[0].metadata.name.as_deref(), Some("n00000"));
    assert_eq!(first.allocated, MAX_CREATES_PER_PASS);
    assert_eq!(first.deferred, n - MAX_CREATES_PER_PASS);
    apply_in_memory(&mut snap, &first);
    let second = plan(&snap);
    assert_eq!(second.creates.len(), MAX_CREATES_PER_PASS);
    apply_in_memory(&mut snap, &second);
    let third = plan(&snap);
    assert_eq!(third.creates.len(), 7);
    converge(&mut snap);
    let subnets: BTreeSet<_> = snap
        .peers
        .iter()
        .map(|p| p.spec.pod_cidrs.clone())
        .collect();
    assert_eq!(subnets.len(), n, "every node its own subnet");
}

#[test]
fn the_meshs_ready_changes_are_events_on_the_mesh() {
    let mut snap = mk_snapshot(vec![mk_node("a", "ua")], Vec::new(), Vec::new());
    let mut mesh = open_mesh();
    mesh.metadata.uid = Some("mesh-uid".into());
    snap.mesh = Some(Arc::new(mesh.clone()));
    let on_mesh = |p: &Plan| -> Vec<(bool, String)> {
        p.events
            .iter()
            .filter(|e| e.kind == EventTarget::Mesh)
            .map(|e| {
                assert_eq!(e.name, consts::DEFAULT_MESH);
                assert_eq!(e.uid.as_deref(), Some("mesh-uid"));
                (e.warning, e.reason.clone())
            })
            .collect()
    };
    assert_eq!(on_mesh(&plan(&snap)), vec![(false, "Valid".to_owned())]);
    converge(&mut snap);
    assert!(
        on_mesh(&plan(&snap)).is_empty(),
        "no Event without a change"
    );

    let mut bad = snap.mesh.as_deref().cloned().expect("a mesh");
    bad.spec.key_rotation = Some(wgmesh_api::mesh::MeshKeyRotation {
        interval: Some("soon".into()),
        ..Default::default()
    });
    snap.mesh = Some(Arc::new(bad));
    assert_eq!(
        on_mesh(&plan(&snap)),
        vec![(true, "InvalidSettings".to_owned())]
    );
}
