//! The commands that write or follow: `peer-config`, `rotate`, `doctor`.

use crate::{ProbeArgs, cluster};
use anyhow::{Context, Result, bail};
use base64::Engine;
use clap::Args;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use wgmesh_api::consts::DEFAULT_MESH;
use wgmesh_api::{Mesh, MeshPeer};
use wgmesh_core::keys::PublicKey;
use wgmesh_ctl::doctor;
use wgmesh_ctl::health::{self, AgentProbe, Finding, Severity};
use wgmesh_ctl::peer_config::{self, EndpointChoice, Request};
use wgmesh_ctl::rotate::{self, Step};

/// How often `--wait` reads the peers again.
const POLL: Duration = Duration::from_secs(1);

#[derive(Debug, Args)]
pub struct PeerConfigArgs {
    /// The external MeshPeer's name (a DNS subdomain, not the name of a Node; the API
    /// server and the admission webhook say why one is refused).
    name: String,
    /// The peer's addresses in the mesh, inside the Mesh's spec.externalPeers.allowedRanges,
    /// e.g. 10.250.0.7/32 (comma-separated or repeated).
    #[arg(long, required = true, value_delimiter = ',', value_name = "CIDR")]
    allowed_ips: Vec<String>,
    /// Use this public key instead of making a key pair; the configuration then leaves
    /// PrivateKey for you to fill in.
    #[arg(long, value_name = "BASE64")]
    public_key: Option<String>,
    /// Where the nodes reach this peer (ip:port), if it listens at a fixed address.
    #[arg(long, value_name = "IP:PORT")]
    endpoint: Option<String>,
    /// Seconds between keepalives the peer sends (keeps NAT mappings open).
    #[arg(long, default_value_t = 25, value_name = "SECONDS")]
    persistent_keepalive: u16,
    /// Send to the nodes' own endpoints even where they have public ones (the peer sits in
    /// the nodes' network).
    #[arg(long)]
    internal: bool,
    /// How long to wait for the operator's approval.
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    timeout: u64,
    /// Write the configuration to FILE (mode 0600) instead of standard output.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Also print the configuration as a QR code, for WireGuard's mobile apps.
    #[arg(long)]
    qr: bool,
}

pub async fn peer_config(client: &kube::Client, args: PeerConfigArgs) -> Result<ExitCode> {
    for ip in &args.allowed_ips {
        ip.parse::<ipnet::IpNet>()
            .with_context(|| format!("--allowed-ips {ip:?} is not a CIDR like 10.250.0.7/32"))?;
    }
    let (private, public) = match &args.public_key {
        // The operator's own check (length, base64, not a low-order point), early.
        Some(k) => {
            let key: PublicKey = k.trim().parse().context("--public-key")?;
            (None, key.to_string())
        }
        None => {
            let secret = x25519_dalek::StaticSecret::random_from_rng(rand_core::OsRng);
            let public = x25519_dalek::PublicKey::from(&secret);
            (
                Some(zeroize::Zeroizing::new(
                    base64::engine::general_purpose::STANDARD.encode(secret.as_bytes()),
                )),
                PublicKey::from_bytes(public.to_bytes())?.to_string(),
            )
        }
    };
    let request = Request {
        name: args.name.clone(),
        public_key: public,
        allowed_ips: args.allowed_ips.clone(),
        endpoint: args.endpoint.clone(),
        persistent_keepalive: Some(args.persistent_keepalive),
    };
    let peers: Api<MeshPeer> = Api::all(client.clone());
    let object: MeshPeer = serde_json::from_value(peer_config::external_peer(&request))?;
    match peers.create(&PostParams::default(), &object).await {
        Ok(_) => eprintln!("created MeshPeer {}; waiting for approval", args.name),
        Err(kube::Error::Api(s)) if s.code == 409 => bail!(
            "a MeshPeer named {} exists already: choose another name, or delete it (kubectl delete meshpeer {})",
            args.name,
            args.name
        ),
        Err(kube::Error::Api(s)) => bail!("the API server refused the MeshPeer: {}", s.message),
        Err(e) => return Err(e).context("creating the MeshPeer"),
    }
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    loop {
        let peer = peers
            .get(&args.name)
            .await
            .context("reading the MeshPeer")?;
        match peer_config::verdict(&peer) {
            Some(Ok(())) => break,
            Some(Err(why)) => {
                // Made by this command a moment ago and refused: nothing else uses it.
                let _ = peers.delete(&args.name, &DeleteParams::default()).await;
                bail!("the operator refused the peer ({why}); it was deleted again");
            }
            None if Instant::now() >= deadline => bail!(
                "not approved within {}s; the MeshPeer stays: kubectl describe meshpeer {}",
                args.timeout,
                args.name
            ),
            None => tokio::time::sleep(POLL).await,
        }
    }
    eprintln!("approved");
    let all: Vec<MeshPeer> = cluster::list(client).await?;
    let meshes: Vec<Mesh> = cluster::list(client).await?;
    let mesh = meshes
        .iter()
        .find(|m| m.metadata.name.as_deref() == Some(DEFAULT_MESH));
    let choice = if args.internal {
        EndpointChoice::Internal
    } else {
        EndpointChoice::Auto
    };
    let config = peer_config::wg_quick(
        &request,
        private.as_deref().map(String::as_str),
        mesh,
        &all,
        choice,
    )
    .map_err(anyhow::Error::msg)?;
    let config = zeroize::Zeroizing::new(config);
    match &args.output {
        Some(path) => {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("writing {}", path.display()))?;
            f.write_all(config.as_bytes())?;
            eprintln!("wrote {}", path.display());
        }
        None => std::io::stdout().write_all(config.as_bytes())?,
    }
    if args.qr {
        let code = qrcode::QrCode::new(config.as_bytes())
            .context("the configuration is too large for a QR code")?;
        let picture = code
            .render::<qrcode::render::unicode::Dense1x2>()
            .quiet_zone(true)
            .build();
        println!("{picture}");
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct RotateArgs {
    /// The nodes whose keys to rotate.
    #[arg(value_name = "NODE", required_unless_present = "all")]
    nodes: Vec<String>,
    /// Rotate every node's key (through the Mesh's spec.keyRotation.requestedAt).
    #[arg(long, conflicts_with = "nodes")]
    all: bool,
    /// Revoke: when a node's rotation completes it stops answering its old key at once,
    /// with no grace for external peers (see docs/rotation.md).
    #[arg(long)]
    revoke: bool,
    /// Follow the rotations to the end, printing each step, and name laggards.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value_t = 600, value_name = "SECONDS")]
    timeout: u64,
}

pub async fn rotate(client: &kube::Client, args: RotateArgs) -> Result<ExitCode> {
    let peers_api: Api<MeshPeer> = Api::all(client.clone());
    let peers: Vec<MeshPeer> = cluster::list(client).await?;
    for n in &args.nodes {
        match peers.iter().find(|p| p.metadata.name.as_deref() == Some(n)) {
            None => bail!("no MeshPeer named {n}"),
            Some(p) if p.spec.node.is_none() => bail!(
                "{n} is an external peer: its key is its owner's; give it a new one by editing spec.publicKey"
            ),
            Some(_) => {}
        }
    }
    // Whole seconds: key creation times are recorded to the second (docs/rotation.md).
    let now = Timestamp::now();
    let at = Timestamp::from_second(now.as_second()).unwrap_or(now);
    let (targets, skipped) = rotate::targets(&peers, &args.nodes, at);
    let mut body = json!({"requestedAt": at.to_string()});
    if args.revoke {
        body["revoke"] = json!(true);
    }
    let patch = Patch::Merge(json!({"spec": {"keyRotation": body}}));
    if args.all {
        let meshes: Api<Mesh> = Api::all(client.clone());
        meshes
            .patch(DEFAULT_MESH, &PatchParams::default(), &patch)
            .await
            .with_context(|| format!("requesting the rotation on Mesh {DEFAULT_MESH}"))?;
    } else {
        for n in targets.keys() {
            peers_api
                .patch(n, &PatchParams::default(), &patch)
                .await
                .with_context(|| format!("requesting the rotation on MeshPeer {n}"))?;
        }
    }
    let what = if args.revoke {
        "revocation"
    } else {
        "rotation"
    };
    println!(
        "requested a key {what} at {at} for {} node(s): {}",
        targets.len(),
        targets.keys().cloned().collect::<Vec<_>>().join(", ")
    );
    for (n, why) in &skipped {
        println!("  {n}: not rotated: {why}");
    }
    if !args.wait || targets.is_empty() {
        if !args.wait {
            println!("follow it with: kubectl get meshpeers -o wide -w");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout);
    let mut last: BTreeMap<String, Step> = BTreeMap::new();
    loop {
        let peers: Vec<MeshPeer> = match cluster::list(client).await {
            Ok(p) => p,
            Err(e) => {
                eprintln!(
                    "[{:>6.1}s] reading the peers failed ({e:#}); trying again",
                    started.elapsed().as_secs_f64()
                );
                tokio::time::sleep(POLL).await;
                continue;
            }
        };
        let now = rotate::progress(&peers, &targets);
        for (node, step) in &now {
            if last.get(node) != Some(step) {
                println!(
                    "[{:>6.1}s] {node}: {}",
                    started.elapsed().as_secs_f64(),
                    step.describe()
                );
            }
        }
        last = now;
        if last.values().all(Step::ended) {
            break;
        }
        if Instant::now() >= deadline {
            let open: Vec<&str> = last
                .iter()
                .filter(|(_, s)| !s.ended())
                .map(|(n, _)| n.as_str())
                .collect();
            println!(
                "gave up waiting after {}s; still rotating: {}",
                args.timeout,
                open.join(", ")
            );
            return Ok(ExitCode::from(1));
        }
        tokio::time::sleep(POLL).await;
    }
    let clean = last.values().filter(|s| s.clean()).count();
    let laggards: Vec<String> = last
        .iter()
        .filter_map(|(n, s)| match s {
            Step::Completed { laggards, .. } if !laggards.is_empty() => {
                Some(format!("{n} ({})", laggards.join(", ")))
            }
            _ => None,
        })
        .collect();
    println!(
        "done in {:.1}s: {clean} of {} node(s) rotated with every peer following",
        started.elapsed().as_secs_f64(),
        last.len()
    );
    if !laggards.is_empty() {
        println!("laggards: {}", laggards.join("; "));
    }
    Ok(if clean == last.len() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// `text` or `json` (the findings).
    #[arg(short, long, value_enum, default_value_t = crate::Output::Text)]
    output: crate::Output,
    #[command(flatten)]
    probe: ProbeArgs,
}

/// One check and what it found.
#[derive(Debug, serde::Serialize)]
struct Check {
    name: &'static str,
    findings: Vec<Finding>,
}

pub async fn doctor(
    client: &kube::Client,
    args: DoctorArgs,
    ns: &str,
    release: &str,
) -> Result<ExitCode> {
    let mut checks = Vec::new();

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let found = match crds.list(&ListParams::default()).await {
        Ok(list) => Ok(list
            .items
            .into_iter()
            .filter(|c| c.spec.group == wgmesh_api::consts::GROUP)
            .map(|c| doctor::CrdState {
                name: c.metadata.name.clone().unwrap_or_default(),
                established: c
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .into_iter()
                    .flatten()
                    .any(|c| c.type_ == "Established" && c.status == "True"),
                served: c
                    .spec
                    .versions
                    .iter()
                    .filter(|v| v.served)
                    .map(|v| v.name.clone())
                    .collect(),
            })
            .collect::<Vec<_>>()),
        Err(e) => Err(e),
    };
    let crds_ok = matches!(&found, Ok(f) if doctor::crds(f).is_empty());
    checks.push(Check {
        name: "CRDs",
        findings: match &found {
            Ok(f) => doctor::crds(f),
            Err(e) => vec![Finding {
                severity: Severity::Warning,
                object: "crd".into(),
                message: format!("cannot read the CRDs: {e}"),
                hint: "run doctor with a user that may list customresourcedefinitions".into(),
            }],
        },
    });

    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    let lease_name = format!("{release}-operator");
    let lease = leases.get_opt(&lease_name).await;
    checks.push(Check {
        name: "operator leader",
        findings: match lease {
            Ok(l) => {
                let state = l.map(|l| {
                    let spec = l.spec.unwrap_or_default();
                    doctor::LeaseState {
                        name: lease_name.clone(),
                        holder: spec.holder_identity,
                        renewed_ago: spec
                            .renew_time
                            .map(|t| Timestamp::now().duration_since(t.0).as_secs()),
                        duration: spec.lease_duration_seconds.map(i64::from),
                    }
                });
                doctor::leader(state.as_ref(), ns)
            }
            Err(e) => vec![Finding {
                severity: Severity::Warning,
                object: format!("lease/{lease_name}"),
                message: format!("cannot read the operator's Lease in {ns}: {e}"),
                hint: "pass wgmesh's namespace with -n".into(),
            }],
        },
    });

    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), ns);
    let ds_name = format!("{release}-agent");
    let ds = daemonsets.get_opt(&ds_name).await.ok().flatten().map(|d| {
        let s = d.status.unwrap_or_default();
        doctor::DaemonSetState {
            name: ds_name.clone(),
            desired: s.desired_number_scheduled,
            ready: s.number_ready,
            updated: s.updated_number_scheduled.unwrap_or(0),
        }
    });
    checks.push(Check {
        name: "agent DaemonSet",
        findings: doctor::agents(ds.as_ref(), ns),
    });

    if crds_ok {
        let snap = cluster::snapshot(client, &args.probe.probe(), ns).await?;
        let h = health::assess(&snap);
        let offsets: Vec<(String, i64)> = snap
            .agents
            .iter()
            .filter_map(|(n, a)| match a {
                AgentProbe::Answered {
                    clock_offset: Some(o),
                    ..
                } => Some((n.clone(), *o)),
                _ => None,
            })
            .collect();
        let unasked: Vec<&str> = snap
            .agents
            .iter()
            .filter(|(_, a)| matches!(a, AgentProbe::Unknown(_)))
            .map(|(n, _)| n.as_str())
            .collect();
        let mut agent_findings = Vec::new();
        if !unasked.is_empty() && !args.probe.no_probe {
            let why = snap.agents.values().find_map(|a| match a {
                AgentProbe::Unknown(w) => Some(w.clone()),
                _ => None,
            });
            agent_findings.push(Finding {
                severity: Severity::Warning,
                object: "agents".into(),
                message: format!(
                    "{} agent(s) not asked: {}",
                    unasked.len(),
                    why.unwrap_or_default()
                ),
                hint: "run doctor as a user allowed to get nodes/proxy, or check the agents' /metrics another way".into(),
            });
        }
        checks.push(Check {
            name: "agents answering",
            findings: agent_findings,
        });
        let mesh = snap.meshes.first();
        checks.push(Check {
            name: "MTU",
            findings: doctor::mtu(mesh, &snap.peers),
        });
        checks.push(Check {
            name: "clocks",
            findings: doctor::clocks(&offsets),
        });
        checks.push(Check {
            name: "mesh health (as kubectl wgmesh status)",
            findings: h.findings,
        });
    }

    let errors = checks
        .iter()
        .flat_map(|c| &c.findings)
        .filter(|f| f.severity == Severity::Error)
        .count();
    match args.output {
        crate::Output::Json => {
            println!("{}", serde_json::to_string_pretty(&checks)?);
        }
        crate::Output::Text => {
            for c in &checks {
                if c.findings.is_empty() {
                    println!("[ ok ] {}", c.name);
                    continue;
                }
                let worst = c.findings.iter().map(|f| f.severity).max();
                let mark = if worst == Some(Severity::Error) {
                    "FAIL"
                } else {
                    "warn"
                };
                println!("[{mark}] {}", c.name);
                for f in &c.findings {
                    println!("       {}: {}", f.object, f.message);
                    println!("         → {}", f.hint);
                }
            }
            if !crds_ok {
                println!("(the mesh itself was not checked: the CRDs are not in order)");
            }
            println!();
            println!(
                "{}",
                if errors == 0 {
                    "No errors.".to_owned()
                } else {
                    format!("{errors} error(s).")
                }
            );
        }
    }
    Ok(if errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
