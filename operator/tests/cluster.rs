//! The operator against a real API server: allocation for many nodes, restarts and two
//! replicas without duplicates, the grace period, bad input refused with conditions, and
//! dual-stack. The tests share one control plane and run one at a time.

use anyhow::Result;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use wgmesh_api::{
    ConditionStatus, Mesh, MeshPeer, MeshPeerSpec, MeshSpec, PodCIDRPool, PodCIDRPoolSpec,
    mesh::Ipam, pool::NodePrefixLength,
};
use wgmesh_tests::{
    OperatorProcess, client, install_crds, kubectl_ok, mk_node, reset_mesh, unique_name, wait_for,
};

const OPERATOR: &str = env!("CARGO_BIN_EXE_wgmesh-operator");
const KEY_A: &str = "mGpQp9SmU3aD4Jq0Ykwj1CzO3P0k9+4w6VvVvHXxrmI=";

/// One test at a time: the operator owns the whole (cluster-scoped) mesh.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Env {
    nodes: Api<Node>,
    peers: Api<MeshPeer>,
    pools: Api<PodCIDRPool>,
    meshes: Api<Mesh>,
    lease: String,
}

async fn setup() -> Result<Env> {
    install_crds()?;
    let client = client().await?;
    reset_mesh(&client).await?;
    Ok(Env {
        nodes: Api::all(client.clone()),
        peers: Api::all(client.clone()),
        pools: Api::all(client.clone()),
        meshes: Api::all(client),
        lease: unique_name("wgmesh-test"),
    })
}

fn mk_pool(name: &str, cidrs: &[&str], v4: Option<u8>, v6: Option<u8>) -> PodCIDRPool {
    PodCIDRPool::new(
        name,
        PodCIDRPoolSpec {
            cidrs: cidrs.iter().map(|c| c.to_string()).collect(),
            node_prefix_length: NodePrefixLength { ipv4: v4, ipv6: v6 },
            node_selector: None,
        },
    )
}

impl Env {
    async fn add_nodes(&self, names: impl IntoIterator<Item = String>) -> Result<()> {
        use futures::StreamExt;
        let results: Vec<_> = futures::stream::iter(names)
            .map(|n| {
                let nodes = self.nodes.clone();
                async move {
                    nodes
                        .create(&PostParams::default(), &mk_node(&n, &[], "192.0.2.1"))
                        .await
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        for r in results {
            r?;
        }
        Ok(())
    }

    /// Waits until `want` node peers exist and each has `families` subnets; returns
    /// name → subnets.
    async fn allocated(
        &self,
        want: usize,
        families: usize,
        timeout: Duration,
    ) -> Result<BTreeMap<String, Vec<String>>> {
        wait_for(
            &format!("{want} node peers with {families} subnet(s) each"),
            timeout,
            || async {
                let peers = self.peers.list(&ListParams::default()).await?;
                let map: BTreeMap<String, Vec<String>> = peers
                    .items
                    .iter()
                    .filter(|p| p.spec.node.is_some() && p.metadata.deletion_timestamp.is_none())
                    .map(|p| (p.name_any(), p.spec.pod_cidrs.clone()))
                    .collect();
                let done = map.len() == want && map.values().all(|s| s.len() == families);
                Ok(done.then_some(map))
            },
        )
        .await
    }

    async fn condition(
        &self,
        peer: &str,
        type_: &str,
    ) -> Result<Option<(ConditionStatus, String, String)>> {
        let p = self.peers.get(peer).await?;
        Ok(p.status.and_then(|s| {
            s.conditions
                .into_iter()
                .find(|c| c.type_ == type_)
                .map(|c| (c.status, c.reason, c.message))
        }))
    }

    async fn wait_condition(&self, peer: &str, type_: &str, reason: &str) -> Result<String> {
        wait_for(
            &format!("{peer} {type_} reason {reason}"),
            Duration::from_secs(60),
            || async {
                Ok(self
                    .condition(peer, type_)
                    .await?
                    .filter(|(_, r, _)| r == reason)
                    .map(|(_, _, m)| m))
            },
        )
        .await
    }

    async fn pool_condition(&self, pool: &str, type_: &str, reason: &str) -> Result<String> {
        wait_for(
            &format!("pool {pool} {type_} reason {reason}"),
            Duration::from_secs(60),
            || async {
                let p = self.pools.get(pool).await?;
                Ok(p.status.and_then(|s| {
                    s.conditions
                        .into_iter()
                        .find(|c| c.type_ == type_ && c.reason == reason)
                        .map(|c| c.message)
                }))
            },
        )
        .await
    }
}

fn assert_disjoint(allocs: &BTreeMap<String, Vec<String>>) {
    let nets: Vec<(String, ipnet::IpNet)> = allocs
        .iter()
        .flat_map(|(n, s)| {
            s.iter()
                .map(move |c| (n.clone(), c.parse().expect("a CIDR")))
        })
        .collect();
    for (i, (na, a)) in nets.iter().enumerate() {
        for (nb, b) in &nets[i + 1..] {
            assert!(
                !(a.contains(&b.network()) || b.contains(&a.network())),
                "{na} {a} overlaps {nb} {b}"
            );
        }
    }
}

/// The subnet ledger the tests' operators keep in kube-system: subnet → node.
async fn ledger() -> Result<BTreeMap<String, String>> {
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(client().await?, "kube-system");
    let cm = cms.get("wgmesh-subnet-claims").await?;
    let text = cm
        .data
        .unwrap_or_default()
        .remove("claims")
        .unwrap_or_default();
    let mut claims = BTreeMap::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        for subnet in words.iter().skip(2) {
            claims.insert((*subnet).to_owned(), words[0].to_owned());
        }
    }
    Ok(claims)
}

#[tokio::test]
async fn every_node_gets_a_distinct_subnet_visible_in_kubectl() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let env = setup().await?;
    env.pools
        .create(
            &PostParams::default(),
            &mk_pool("main", &["10.244.0.0/16"], Some(24), None),
        )
        .await?;
    let _op = OperatorProcess::start(OPERATOR, &env.lease, &[])?;
    env.add_nodes((1..=5).map(|i| format!("node-{i}"))).await?;
    let allocs = env.allocated(5, 1, Duration::from_secs(60)).await?;
    assert_disjoint(&allocs);
    assert_eq!(allocs["node-1"], vec!["10.244.0.0/24".to_string()]);

    let table = kubectl_ok(&["get", "meshpeers"])?;
    for (node, subnets) in &allocs {
        let line = table
            .lines()
            .find(|l| l.starts_with(node.as_str()))
            .unwrap_or_default();
        assert!(
            line.contains(&subnets[0]),
            "{node} {subnets:?} not shown:\n{table}"
        );
    }
    // Without an agent there is no key yet, and the peer says so.
    env.wait_condition("node-1", "Ready", "NoPublicKey").await?;
    // The pool counts what it handed out.
    wait_for("pool counts", Duration::from_secs(30), || async {
        let st = env.pools.get("main").await?.status;
        Ok(st
            .and_then(|s| s.allocated)
            .filter(|a| a.ipv4 == Some(5))
            .map(|_| ()))
    })
    .await?;
    // Peers are owned by their Node, so they go with it.
    let peer = env.peers.get("node-3").await?;
    let owner = &peer.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("Node", "node-3")
    );
    Ok(())
}

#[tokio::test]
async fn a_restart_in_the_middle_of_200_nodes_neither_duplicates_nor_moves() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let env = setup().await?;
    env.pools
        .create(
            &PostParams::default(),
            &mk_pool("big", &["10.200.0.0/16"], Some(26), None),
        )
        .await?;
    let mut op = OperatorProcess::start(OPERATOR, &env.lease, &[])?;
    // Nodes register one after another while the operator allocates, so the kill below
    // lands in the middle however fast the machine is.
    let registering = {
        let nodes = env.nodes.clone();
        tokio::spawn(async move {
            for i in 0..200 {
                let node = mk_node(&format!("n{i:03}"), &[], "192.0.2.1");
                nodes.create(&PostParams::default(), &node).await?;
            }
            anyhow::Ok(())
        })
    };

    // Kill it once some, but not all, nodes have subnets.
    let partial = wait_for("some allocations", Duration::from_secs(120), || async {
        let peers = env.peers.list(&ListParams::default()).await?;
        let with: BTreeMap<String, Vec<String>> = peers
            .items
            .iter()
            .filter(|p| !p.spec.pod_cidrs.is_empty())
            .map(|p| (p.name_any(), p.spec.pod_cidrs.clone()))
            .collect();
        Ok((with.len() >= 20).then_some(with))
    })
    .await?;
    op.kill();
    let killed_at = env.peers.list(&ListParams::default()).await?;
    let before: BTreeMap<String, Vec<String>> = killed_at
        .items
        .iter()
        .filter(|p| !p.spec.pod_cidrs.is_empty())
        .map(|p| (p.name_any(), p.spec.pod_cidrs.clone()))
        .collect();
    assert!(
        before.len() < 200,
        "the operator finished before it could be killed; nothing was tested"
    );

    let _op2 = OperatorProcess::start(OPERATOR, &env.lease, &[])?;
    registering.await??;
    let after = env.allocated(200, 1, Duration::from_secs(180)).await?;
    assert_disjoint(&after);
    for (node, subnets) in before.iter().chain(partial.iter()) {
        assert_eq!(
            &after[node], subnets,
            "{node}'s subnet moved across the restart"
        );
    }
    Ok(())
}

#[tokio::test]
async fn two_replicas_at_once_never_double_allocate() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let env = setup().await?;
    env.pools
        .create(
            &PostParams::default(),
            &mk_pool("twin", &["10.201.0.0/16"], Some(26), None),
        )
        .await?;
    let a = OperatorProcess::start(OPERATOR, &env.lease, &[])?;
    let b = OperatorProcess::start(OPERATOR, &env.lease, &[])?;
    env.add_nodes((0..100).map(|i| format!("t{i:03}"))).await?;
    let allocs = env.allocated(100, 1, Duration::from_secs(180)).await?;
    assert_disjoint(&allocs);
    // One of them led. (Both may have, one after the other, if a renewal was slow on a
    // loaded machine: a handover is allowed, a duplicate is not.)
    let led = [&a, &b]
        .iter()
        .filter(|o| o.log_text().contains("became leader"))
        .count();
    assert!(led >= 1, "logs:\n{}\n---\n{}", a.log_text(), b.log_text());
    Ok(())
}

/// Two operators that both lead, each holding its own lease (what a split brain looks like to
/// the API server), while 150 nodes join one at a time: they plan from different views, and
/// the subnet ledger still keeps every subnet to one node, each claim naming the node whose
/// peer holds the subnet. (Without claims, this gave subnets twice.)
#[tokio::test]
async fn two_leaders_at_once_never_give_one_subnet_to_two_nodes() -> Result<()> {
    const NODES: usize = 150;
    let _serial = SERIAL.lock().await;
    let env = setup().await?;
    env.pools
        .create(
            &PostParams::default(),
            &mk_pool("split", &["10.204.0.0/16"], Some(26), None),
        )
        .await?;
    let a = OperatorProcess::start(OPERATOR, &env.lease, &[])?;
    let b = OperatorProcess::start(OPERATOR, &format!("{}-b", env.lease), &[])?;
    wait_for("both replicas to lead", Duration::from_secs(60), || async {
        let both = [&a, &b]
            .iter()
            .all(|o| o.log_text().contains("became leader"));
        Ok(both.then_some(()))
    })
    .await?;
    // Each node sorts before those already there, so a replica that has seen it gives it the
    // subnet the other, not yet seeing it, gives to the next node in name order. Each replica
    // is paused now and then (wherever it is: mid-pass, its plan goes stale meanwhile), so
    // their views drift apart as they would on a loaded machine.
    for i in (0..NODES).rev() {
        env.add_nodes([format!("split{i:03}")]).await?;
        let paused = if i % 2 == 0 { &a } else { &b };
        paused.freeze()?;
        tokio::time::sleep(Duration::from_millis(30)).await;
        paused.thaw()?;
    }
    let allocs = env.allocated(NODES, 1, Duration::from_secs(180)).await?;
    assert_disjoint(&allocs);

    let claims = ledger().await?;
    for (node, subnets) in &allocs {
        for subnet in subnets {
            assert_eq!(
                claims.get(subnet),
                Some(node),
                "{subnet} (held by {node}) is claimed for someone else"
            );
        }
    }
    let lost = [&a, &b]
        .iter()
        .map(|o| o.log_text().matches("is claimed for another").count())
        .sum::<usize>();
    eprintln!("two leaders: {NODES} nodes, {lost} write(s) stopped by another's claim");
    Ok(())
}

/// The leader frozen (SIGSTOP) for 30 s while 50 nodes join; the other replica takes over
/// and allocates; the frozen one, resumed, finds its deadline long past and writes nothing:
/// no subnet is given twice and none moves.
#[tokio::test]
async fn a_leader_frozen_past_its_deadline_writes_nothing_when_it_resumes() -> Result<()> {
    const FROZEN: Duration = Duration::from_secs(30);
    let _serial = SERIAL.lock().await;
    let env = setup().await?;
    env.pools
        .create(
            &PostParams::default(),
            &mk_pool("frozen", &["10.203.0.0/16"], Some(26), None),
        )
        .await?;
    let a = OperatorProcess::start(OPERATOR, &env.lease, &[])?;
    wait_for(
        "the first replica to lead",
        Duration::from_secs(60),
        || async { Ok(a.log_text().contains("became leader").then_some(())) },
    )
    .await?;
    env.add_nodes((0..5).map(|i| format!("early{i}"))).await?;
    let early = env.allocated(5, 1, Duration::from_secs(60)).await?;
    let b = OperatorProcess::start(OPERATOR, &env.lease, &[])?;
    a.freeze()?;
    let frozen_at = Instant::now();
    env.add_nodes((0..50).map(|i| format!("late{i:02}")))
        .await?;
    let during = env.allocated(55, 1, FROZEN * 4).await?;
    assert!(
        b.log_text().contains("became leader"),
        "the second replica never led:\n{}",
        b.log_text()
    );
    assert_disjoint(&during);
    for (node, subnets) in &early {
        assert_eq!(&during[node], subnets, "{node}'s subnet moved");
    }
    tokio::time::sleep(FROZEN.saturating_sub(frozen_at.elapsed())).await;
    let stepped_down = || a.log_text().matches("stepping down").count();
    let before_thaw = stepped_down();
    a.thaw()?;
    // The resumed replica has run once it says it stepped down (its deadline passed, or it
    // saw the other holder); anything it would have written wrongly comes before that.
    wait_for(
        "the resumed replica to step down",
        Duration::from_secs(30),
        || async { Ok((stepped_down() > before_thaw).then_some(())) },
    )
    .await?;
    let after = env.allocated(55, 1, Duration::from_secs(30)).await?;
    assert_eq!(
        after, during,
        "subnets changed after the frozen leader resumed"
    );
    let resumed = a.log_text();
    assert!(
        resumed.matches("created node peer").count() <= early.len(),
        "the resumed replica created peers:\n{resumed}"
    );
    Ok(())
}

#[tokio::test]
async fn a_deleted_nodes_subnet_is_reused_only_after_the_grace_period() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let env = setup().await?;
    // Room for exactly two nodes.
    env.pools
        .create(
            &PostParams::default(),
            &mk_pool("small", &["10.202.0.0/23"], Some(24), None),
        )
        .await?;
    let mesh = Mesh::new(
        "default",
        MeshSpec {
            ipam: Some(Ipam {
                release_grace_period: Some("8s".into()),
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    env.meshes.create(&PostParams::default(), &mesh).await?;
    let _op = OperatorProcess::start(OPERATOR, &env.lease, &[])?;
    env.add_nodes(["g1".to_string(), "g2".to_string()]).await?;
    let allocs = env.allocated(2, 1, Duration::from_secs(60)).await?;
    let freed = allocs["g1"].clone();

    env.nodes.delete("g1", &DeleteParams::default()).await?;
    let deleted_at = Instant::now();
    env.add_nodes(["g3".to_string()]).await?;
    // While g1's subnet is held, the pool is full: g3 waits, and says why.
    env.wait_condition("g3", "Allocated", "PoolExhausted")
        .await?;
    env.pool_condition("small", "Capacity", "Exhausted").await?;
    let g3 = wait_for(
        "g3 to get g1's old subnet",
        Duration::from_secs(60),
        || async {
            let p = env.peers.get("g3").await?;
            Ok((!p.spec.pod_cidrs.is_empty()).then_some(p.spec.pod_cidrs))
        },
    )
    .await?;
    let waited = deleted_at.elapsed();
    assert_eq!(g3, freed);
    assert!(
        waited >= Duration::from_secs(7),
        "reused after {waited:?}, before the 8s grace period"
    );
    wait_for("g1's peer to be gone", Duration::from_secs(30), || async {
        Ok(env.peers.get_opt("g1").await?.is_none().then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn bad_input_is_refused_with_conditions_and_changes_nothing_else() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let env = setup().await?;
    env.pools
        .create(
            &PostParams::default(),
            &mk_pool("first", &["10.203.0.0/24"], Some(25), None),
        )
        .await?;
    let _op = OperatorProcess::start(OPERATOR, &env.lease, &[])?;
    env.add_nodes(["b1".to_string(), "b2".to_string()]).await?;
    let allocs = env.allocated(2, 1, Duration::from_secs(60)).await?;

    // An overlapping pool is refused and names the pool it overlaps.
    env.pools
        .create(
            &PostParams::default(),
            &mk_pool("second", &["10.203.0.0/16"], Some(24), None),
        )
        .await?;
    let msg = env
        .pool_condition("second", "Ready", "OverlapsPool")
        .await?;
    assert!(msg.contains("first"), "{msg}");
    // A prefix length that does not fit.
    env.pools
        .create(
            &PostParams::default(),
            &mk_pool("misfit", &["10.210.0.0/24"], Some(16), None),
        )
        .await?;
    env.pool_condition("misfit", "Ready", "InvalidPrefixLength")
        .await?;

    // The first pool holds two /25s: a third node exhausts it.
    env.add_nodes(["b3".to_string()]).await?;
    let msg = env
        .wait_condition("b3", "Allocated", "PoolExhausted")
        .await?;
    assert!(msg.contains("first"), "{msg}");
    env.pool_condition("first", "Capacity", "Exhausted").await?;

    // An external peer claiming a node's subnet, and one with a low-order key.
    let mk_ext = |name: &str, key: &str, allowed: &str| {
        MeshPeer::new(
            name,
            MeshPeerSpec {
                public_key: Some(key.into()),
                allowed_ips: vec![allowed.into()],
                ..Default::default()
            },
        )
    };
    env.peers
        .create(
            &PostParams::default(),
            &mk_ext("thief", KEY_A, &allocs["b1"][0]),
        )
        .await?;
    let msg = env
        .wait_condition("thief", "Ready", "AllowedIPsOverlapPodSubnet")
        .await?;
    assert!(msg.contains(&allocs["b1"][0]), "{msg}");
    env.peers
        .create(
            &PostParams::default(),
            &mk_ext(
                "weak",
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
                "10.250.0.9/32",
            ),
        )
        .await?;
    env.wait_condition("weak", "Ready", "InvalidPublicKey")
        .await?;
    // Each refusal is also an Event a person sees in `kubectl get events`.
    wait_for(
        "a warning event about the thief",
        Duration::from_secs(30),
        || async {
            let out = kubectl_ok(&[
                "get",
                "events",
                "-n",
                "default",
                "--field-selector",
                "involvedObject.name=thief",
                "-o",
                "jsonpath={range .items[*]}{.type} {.reason}{\"\\n\"}{end}",
            ])?;
            Ok(out
                .contains("Warning AllowedIPsOverlapPodSubnet")
                .then_some(()))
        },
    )
    .await?;
    for bad in ["thief", "weak"] {
        let st = env.peers.get(bad).await?.status.unwrap_or_default();
        assert!(st.approved.is_none(), "{bad} must not be approved: {st:?}");
    }
    // Nothing else moved.
    let now = env.allocated(3, 1, Duration::from_secs(5)).await;
    assert!(now.is_err(), "b3 got a subnet from an exhausted pool");
    for (node, subnets) in &allocs {
        assert_eq!(&env.peers.get(node).await?.spec.pod_cidrs, subnets);
    }
    Ok(())
}

#[tokio::test]
async fn a_v4_and_a_v6_pool_give_each_node_one_of_each() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let env = setup().await?;
    env.pools
        .create(
            &PostParams::default(),
            &mk_pool("v4", &["10.204.0.0/16"], Some(24), None),
        )
        .await?;
    env.pools
        .create(
            &PostParams::default(),
            &mk_pool("v6", &["fd00:10:204::/56"], None, Some(64)),
        )
        .await?;
    let _op = OperatorProcess::start(OPERATOR, &env.lease, &[])?;
    env.add_nodes((1..=4).map(|i| format!("d{i}"))).await?;
    let allocs = env.allocated(4, 2, Duration::from_secs(60)).await?;
    assert_disjoint(&allocs);
    for subnets in allocs.values() {
        let fams: BTreeSet<bool> = subnets.iter().map(|s| s.contains(':')).collect();
        assert_eq!(fams.len(), 2, "{subnets:?}");
    }
    // A node with a published key is Ready with exactly its subnets approved.
    let patch = serde_json::json!({
        "apiVersion": "wgmesh.dev/v1alpha1", "kind": "MeshPeer",
        "status": {"publicKey": KEY_A, "endpoints": ["192.0.2.1:51820"]}
    });
    env.peers
        .patch_status(
            "d1",
            &PatchParams::apply("wgmesh-agent").force(),
            &Patch::Apply(patch),
        )
        .await?;
    env.wait_condition("d1", "Ready", "Valid").await?;
    let approved = env
        .peers
        .get("d1")
        .await?
        .status
        .and_then(|s| s.approved)
        .expect("approved");
    let mut want = allocs["d1"].clone();
    want.sort();
    let mut got = approved.allowed_ips.clone();
    got.sort();
    assert_eq!(got, want);
    Ok(())
}

/// An operator upgraded from one that kept its claims as one `Lease` per subnet moves them
/// into the ledger before its first pass and deletes the `Lease`s: a subnet claimed for a
/// node whose peer was never written stays that node's, and nobody else gets it.
#[tokio::test]
async fn claims_kept_as_leases_move_into_the_ledger() -> Result<()> {
    use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
    let _serial = SERIAL.lock().await;
    let env = setup().await?;
    env.pools
        .create(
            &PostParams::default(),
            &mk_pool("legacy", &["10.205.0.0/16"], Some(24), None),
        )
        .await?;
    let leases: Api<Lease> = Api::namespaced(client().await?, "kube-system");
    let mut lease = Lease {
        spec: Some(LeaseSpec {
            holder_identity: Some("ghost".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    lease.metadata.name = Some("wgmesh-subnet-10.205.0.0-24".into());
    lease.metadata.labels = Some([("wgmesh.dev/claim".to_owned(), "subnet".to_owned())].into());
    lease.metadata.annotations =
        Some([("wgmesh.dev/subnet".to_owned(), "10.205.0.0/24".to_owned())].into());
    leases.create(&PostParams::default(), &lease).await?;

    let _op = OperatorProcess::start(OPERATOR, &env.lease, &[])?;
    env.add_nodes(["m1".to_owned()]).await?;
    let allocs = env.allocated(1, 1, Duration::from_secs(60)).await?;
    // The first subnet would be m1's but for the claim.
    assert_eq!(allocs["m1"], vec!["10.205.1.0/24".to_owned()]);
    let claims = ledger().await?;
    assert_eq!(
        claims.get("10.205.0.0/24").map(String::as_str),
        Some("ghost")
    );
    assert_eq!(claims.get("10.205.1.0/24").map(String::as_str), Some("m1"));
    wait_for(
        "the legacy claim to be deleted",
        Duration::from_secs(30),
        || {
            let leases = leases.clone();
            async move {
                let gone = leases
                    .get_opt("wgmesh-subnet-10.205.0.0-24")
                    .await?
                    .is_none();
                Ok(gone.then_some(()))
            }
        },
    )
    .await?;
    Ok(())
}
