//! The wgmesh API against a real kube-apiserver: the CRDs install, every kind round-trips,
//! watches deliver, status is written with server-side apply by two field managers that
//! each own their conditions, stale writes conflict, and invalid objects are refused with a
//! message a person can act on.

use anyhow::Result;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use std::{collections::BTreeMap, time::Duration};
use wgmesh_api::{
    Condition, ConditionStatus, Mesh, MeshPeer, MeshPeerSpec, MeshSpec, PodCIDRPool,
    PodCIDRPoolSpec,
    consts::{AGENT_MANAGER, OPERATOR_MANAGER},
    mesh::{HostGateway, MeshKeyRotation, Mtu, MtuAuto, Transport},
    pool::NodePrefixLength,
};
use wgmesh_tests::{client, install_crds, kubectl, kubectl_ok, unique_name, wait_for};

const KEY_A: &str = "mGpQp9SmU3aD4Jq0Ykwj1CzO3P0k9+4w6VvVvHXxrmI=";

async fn setup() -> Result<kube::Client> {
    install_crds()?;
    client().await
}

fn mk_pool(name: &str) -> PodCIDRPool {
    PodCIDRPool::new(
        name,
        PodCIDRPoolSpec {
            cidrs: vec!["10.244.0.0/17".into(), "fd00:10:244::/56".into()],
            node_prefix_length: NodePrefixLength {
                ipv4: Some(24),
                ipv6: Some(64),
            },
            node_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    "topology.kubernetes.io/region".to_string(),
                    "eu-west".to_string(),
                )])),
                ..Default::default()
            }),
        },
    )
}

fn mk_peer(name: &str) -> MeshPeer {
    MeshPeer::new(
        name,
        MeshPeerSpec {
            public_key: Some(KEY_A.into()),
            allowed_ips: vec!["10.250.0.7/32".into()],
            endpoint: Some("203.0.113.7:51820".into()),
            persistent_keepalive: Some(25),
            ..Default::default()
        },
    )
}

fn condition(type_: &str, status: ConditionStatus, reason: &str) -> Condition {
    Condition {
        type_: type_.into(),
        status,
        observed_generation: Some(1),
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
        reason: reason.into(),
        message: format!("{type_} is {status:?}"),
    }
}

#[tokio::test]
async fn every_kind_round_trips() -> Result<()> {
    let client = setup().await?;

    let meshes: Api<Mesh> = Api::all(client.clone());
    let name = unique_name("mesh");
    let mesh = Mesh::new(
        &name,
        MeshSpec {
            listen_port: Some(51820),
            mtu: Some(Mtu::Auto(MtuAuto::Auto)),
            transport: Some(Transport {
                host_gateway: Some(HostGateway::OnLink),
                host_gateway_subnets: vec!["192.168.10.0/24".into()],
            }),
            persistent_keepalive: Some(25),
            key_rotation: Some(MeshKeyRotation {
                interval: Some("720h".into()),
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    let created = meshes.create(&PostParams::default(), &mesh).await?;
    assert_eq!(created.spec, mesh.spec);
    assert_eq!(meshes.get(&name).await?.spec, mesh.spec);
    // A number is as good an MTU as `auto`.
    let patched = meshes
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"mtu": 1380}})),
        )
        .await?;
    assert_eq!(patched.spec.mtu, Some(Mtu::Bytes(1380)));
    meshes.delete(&name, &DeleteParams::default()).await?;

    let pools: Api<PodCIDRPool> = Api::all(client.clone());
    let name = unique_name("pool");
    let pool = mk_pool(&name);
    assert_eq!(
        pools.create(&PostParams::default(), &pool).await?.spec,
        pool.spec
    );
    pools.delete(&name, &DeleteParams::default()).await?;

    let peers: Api<MeshPeer> = Api::all(client);
    let name = unique_name("laptop");
    let peer = mk_peer(&name);
    assert_eq!(
        peers.create(&PostParams::default(), &peer).await?.spec,
        peer.spec
    );
    peers.delete(&name, &DeleteParams::default()).await?;
    Ok(())
}

#[tokio::test]
async fn a_watch_sees_creation_and_change() -> Result<()> {
    let client = setup().await?;
    let peers: Api<MeshPeer> = Api::all(client);
    let name = unique_name("watched");
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher(peers.clone(), config).applied_objects().boxed();

    // The first item can only arrive once the watch is established, so create after
    // polling the stream in a separate task.
    let creator = {
        let peers = peers.clone();
        let peer = mk_peer(&name);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            peers.create(&PostParams::default(), &peer).await?;
            peers
                .patch(
                    peer.metadata.name.as_deref().unwrap_or_default(),
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({"spec": {"persistentKeepalive": 10}})),
                )
                .await?;
            anyhow::Ok(())
        })
    };
    let first = tokio::time::timeout(Duration::from_secs(30), events.try_next())
        .await??
        .expect("watch stream ended");
    assert_eq!(first.metadata.name.as_deref(), Some(name.as_str()));
    let changed = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(p) = events.try_next().await? {
            if p.spec.persistent_keepalive == Some(10) {
                return anyhow::Ok(p);
            }
        }
        anyhow::bail!("watch stream ended")
    })
    .await??;
    assert_eq!(changed.spec.persistent_keepalive, Some(10));
    creator.await??;
    peers.delete(&name, &DeleteParams::default()).await?;
    Ok(())
}

#[tokio::test]
async fn status_is_shared_by_two_field_managers() -> Result<()> {
    let client = setup().await?;
    let peers: Api<MeshPeer> = Api::all(client);
    let name = unique_name("ssa");
    peers
        .create(&PostParams::default(), &mk_peer(&name))
        .await?;

    let apply = |manager: &'static str, status: serde_json::Value| {
        let peers = peers.clone();
        let name = name.clone();
        async move {
            let patch = serde_json::json!({
                "apiVersion": "wgmesh.dev/v1alpha1",
                "kind": "MeshPeer",
                "status": status,
            });
            peers
                .patch_status(
                    &name,
                    &PatchParams::apply(manager).force(),
                    &Patch::Apply(patch),
                )
                .await
        }
    };
    apply(
        AGENT_MANAGER,
        serde_json::json!({
            "publicKey": KEY_A,
            "keyGeneration": 0,
            "conditions": [condition("KeyPublished", ConditionStatus::True, "Published")],
        }),
    )
    .await?;
    apply(
        OPERATOR_MANAGER,
        serde_json::json!({
            "approved": {"publicKey": KEY_A, "allowedIPs": ["10.250.0.7/32"]},
            "conditions": [condition("Ready", ConditionStatus::True, "Valid")],
        }),
    )
    .await?;
    // The agent re-applies its own condition; the operator's entry must survive.
    apply(
        AGENT_MANAGER,
        serde_json::json!({
            "publicKey": KEY_A,
            "keyGeneration": 0,
            "conditions": [condition("KeyPublished", ConditionStatus::False, "Rotating")],
        }),
    )
    .await?;

    let status = peers
        .get_status(&name)
        .await?
        .status
        .expect("status written");
    let by_type: BTreeMap<&str, &Condition> = status
        .conditions
        .iter()
        .map(|c| (c.type_.as_str(), c))
        .collect();
    assert_eq!(by_type.len(), 2, "{:?}", status.conditions);
    assert_eq!(by_type["Ready"].status, ConditionStatus::True);
    assert_eq!(by_type["KeyPublished"].status, ConditionStatus::False);
    assert_eq!(status.public_key.as_deref(), Some(KEY_A));
    assert_eq!(
        status.approved.expect("approved").allowed_ips,
        vec!["10.250.0.7/32".to_string()]
    );
    // The status subresource keeps spec out of reach of status writers and vice versa.
    let spec = peers.get(&name).await?.spec;
    assert_eq!(spec, mk_peer(&name).spec);
    peers.delete(&name, &DeleteParams::default()).await?;
    Ok(())
}

#[tokio::test]
async fn a_stale_write_gets_a_conflict() -> Result<()> {
    let client = setup().await?;
    let pools: Api<PodCIDRPool> = Api::all(client);
    let name = unique_name("stale");
    let created = pools
        .create(&PostParams::default(), &mk_pool(&name))
        .await?;

    let mut fresh = created.clone();
    fresh.spec.cidrs.push("10.245.0.0/16".into());
    pools.replace(&name, &PostParams::default(), &fresh).await?;

    let mut stale = created;
    stale.spec.cidrs = vec!["10.246.0.0/16".into()];
    let err = pools
        .replace(&name, &PostParams::default(), &stale)
        .await
        .expect_err("a write with an old resourceVersion must be refused");
    match err {
        kube::Error::Api(status) => assert_eq!(status.code, 409, "{status:?}"),
        other => panic!("expected a 409, got {other:?}"),
    }
    assert_eq!(pools.get(&name).await?.spec.cidrs, fresh.spec.cidrs);
    pools.delete(&name, &DeleteParams::default()).await?;
    Ok(())
}

/// Creates `object` (YAML) with kubectl and returns the refusal message.
fn refused(object: &str) -> Result<String> {
    let dir = tempdir()?;
    let path = dir.join("object.yaml");
    std::fs::write(&path, object)?;
    let out = kubectl(&["create", "-f", &path.to_string_lossy()]);
    let _ = std::fs::remove_dir_all(&dir);
    let out = out?;
    assert!(
        !out.status.success(),
        "the API server accepted an invalid object:\n{object}"
    );
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

fn tempdir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(unique_name("wgmesh-api-test"));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[tokio::test]
async fn invalid_objects_are_refused_with_a_readable_message() -> Result<()> {
    setup().await?;
    let cases = [
        (
            format!(
                "apiVersion: wgmesh.dev/v1alpha1\nkind: PodCIDRPool\nmetadata: {{name: {}}}\n\
                 spec: {{cidrs: [\"10.244.0.0/33\"], nodePrefixLength: {{ipv4: 24}}}}\n",
                unique_name("badcidr")
            ),
            "spec.cidrs",
        ),
        (
            format!(
                "apiVersion: wgmesh.dev/v1alpha1\nkind: PodCIDRPool\nmetadata: {{name: {}}}\n\
                 spec: {{cidrs: [\"not-a-network\"], nodePrefixLength: {{ipv4: 24}}}}\n",
                unique_name("badcidr")
            ),
            "spec.cidrs",
        ),
        (
            format!(
                "apiVersion: wgmesh.dev/v1alpha1\nkind: PodCIDRPool\nmetadata: {{name: {}}}\n\
                 spec: {{cidrs: [], nodePrefixLength: {{ipv4: 24}}}}\n",
                unique_name("nocidr")
            ),
            "spec.cidrs",
        ),
        (
            format!(
                "apiVersion: wgmesh.dev/v1alpha1\nkind: MeshPeer\nmetadata: {{name: {}}}\n\
                 spec: {{publicKey: \"not base64 at all\", allowedIPs: [\"10.250.0.7/32\"]}}\n",
                unique_name("badkey")
            ),
            "spec.publicKey",
        ),
        (
            format!(
                "apiVersion: wgmesh.dev/v1alpha1\nkind: MeshPeer\nmetadata: {{name: {}}}\n\
                 spec: {{publicKey: \"{KEY_A}\", endpoint: \"203.0.113.7:70000\"}}\n",
                unique_name("badport")
            ),
            "spec.endpoint",
        ),
        (
            format!(
                "apiVersion: wgmesh.dev/v1alpha1\nkind: Mesh\nmetadata: {{name: {}}}\n\
                 spec: {{listenPort: 70000}}\n",
                unique_name("badport")
            ),
            "spec.listenPort",
        ),
        (
            format!(
                "apiVersion: wgmesh.dev/v1alpha1\nkind: Mesh\nmetadata: {{name: {}}}\n\
                 spec: {{mtu: \"huge\"}}\n",
                unique_name("badmtu")
            ),
            "spec.mtu",
        ),
        (
            format!(
                "apiVersion: wgmesh.dev/v1alpha1\nkind: Mesh\nmetadata: {{name: {}}}\n\
                 spec: {{mtu: 100}}\n",
                unique_name("badmtu")
            ),
            "spec.mtu",
        ),
        (
            format!(
                "apiVersion: wgmesh.dev/v1alpha1\nkind: Mesh\nmetadata: {{name: {}}}\n\
                 spec: {{transport: {{hostGateway: Always}}}}\n",
                unique_name("badenum")
            ),
            "spec.transport.hostGateway",
        ),
    ];
    for (object, field) in cases {
        let message = refused(&object)?;
        assert!(
            message.contains(field),
            "the refusal should name {field}:\n{message}\nfor\n{object}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn kubectl_shows_the_printer_columns() -> Result<()> {
    let client = setup().await?;
    let peers: Api<MeshPeer> = Api::all(client);
    let name = unique_name("columns");
    let mut peer = mk_peer(&name);
    peer.spec.node = Some("node-1".into());
    peer.spec.pod_cidrs = vec!["10.244.3.0/24".into()];
    peers.create(&PostParams::default(), &peer).await?;
    let table = kubectl_ok(&["get", "meshpeers", &name])?;
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        [
            "NAME", "NODE", "POD", "CIDRS", "KEY", "ENDPOINT", "READY", "AGE"
        ],
        "{table}"
    );
    assert!(
        table.contains("10.244.3.0/24") && table.contains("node-1"),
        "{table}"
    );
    // Short names and the category work too.
    kubectl_ok(&["get", "mp", &name])?;
    let all = kubectl_ok(&["get", "wgmesh"])?;
    assert!(all.contains(&name), "{all}");
    peers.delete(&name, &DeleteParams::default()).await?;
    wait_for("the peer to be gone", Duration::from_secs(30), || {
        let peers = peers.clone();
        let name = name.clone();
        async move { Ok(peers.get_opt(&name).await?.is_none().then_some(())) }
    })
    .await
}

#[tokio::test]
async fn the_examples_are_valid() -> Result<()> {
    setup().await?;
    let examples = wgmesh_tests::repo_root().join("examples");
    let out = kubectl_ok(&[
        "apply",
        "--dry-run=server",
        "-f",
        &examples.to_string_lossy(),
    ])?;
    for object in [
        "mesh.wgmesh.dev/default",
        "podcidrpool.wgmesh.dev/cloud-a",
        "podcidrpool.wgmesh.dev/default",
        "meshpeer.wgmesh.dev/laptop-ana",
    ] {
        assert!(out.contains(object), "{object} missing from:\n{out}");
    }
    Ok(())
}
