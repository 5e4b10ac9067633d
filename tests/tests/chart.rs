//! The Helm chart (`charts/wgmesh`), rendered by the real `helm` under several value sets
//! and checked as parsed YAML: the agent DaemonSet, the operator Deployment, the PDB, RBAC
//! (least privilege, evaluated as the API server would), the default Mesh and PodCIDRPool,
//! the required value and the values schema. Then `helm lint --strict`, kubernetes-validate
//! against Kubernetes 1.20 and 1.33 (the custom resources against their CRDs' schemas), and
//! the chart's `crds/` byte-identical to the generated `crds/`.
//!
//! Needs `helm`, `kubernetes-validate` and `kubernetes-validate-1.28` from
//! `bash hack/lib/deps.sh` (in `$WGMESH_TOOLS_DIR/bin`, default `~/.cache/wgmesh/tools/bin`,
//! or on `PATH`); fails, never skips, when they are missing. No cluster.

use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;
use serde_json::{Value, json};
use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};
use wgmesh_tests::{repo_root, tool};

const NS: &str = "wgmesh-system";
const CIDRS: &str = "podCIDRPool.cidrs={10.244.0.0/16}";
const AGENT: &str = "wgmesh-agent";
const OPERATOR: &str = "wgmesh-operator";
const IMAGE: &str = "ghcr.io/wgmesh/wgmesh:0.1.0";
/// kube-rs's in-cluster configuration reads these.
const API_ENV: [&str; 2] = ["KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"];

// ---------------------------------------------------------------------------------------
// Tools and rendering

fn chart_dir() -> PathBuf {
    repo_root().join("charts/wgmesh")
}

fn run(cmd: &mut Command) -> Result<Output> {
    cmd.output()
        .with_context(|| format!("running {:?}", cmd.get_program()))
}

/// `helm template wgmesh charts/wgmesh -n wgmesh-system ARGS`: the parsed documents, or
/// helm's stderr when it refuses.
fn helm_template(args: &[&str]) -> Result<std::result::Result<Vec<Value>, String>> {
    let out = run(Command::new(tool("helm")?)
        .args(["template", "wgmesh"])
        .arg(chart_dir())
        .args(["--namespace", NS])
        .args(args))?;
    if !out.status.success() {
        return Ok(Err(String::from_utf8_lossy(&out.stderr).into_owned()));
    }
    Ok(Ok(parse_docs(&String::from_utf8(out.stdout)?)?))
}

fn parse_docs(yaml: &str) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    for de in serde_yaml::Deserializer::from_str(yaml) {
        let v = Value::deserialize(de).context("parsing helm's output")?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

/// Renders `--set` pairs (plus the required pool CIDRs unless told otherwise).
fn render(sets: &[&str]) -> Result<Vec<Value>> {
    let mut args = vec!["--set", CIDRS];
    for s in sets {
        args.extend(["--set", s]);
    }
    helm_template(&args)?.map_err(|e| anyhow::anyhow!("helm template failed:\n{e}"))
}

/// Renders what must be refused; returns helm's message.
fn render_err(args: &[&str]) -> Result<String> {
    match helm_template(args)? {
        Ok(docs) => bail!(
            "helm rendered {} documents for {args:?}; expected a refusal",
            docs.len()
        ),
        Err(e) => Ok(e),
    }
}

// ---------------------------------------------------------------------------------------
// Looking into the documents

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Result<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .with_context(|| format!("no {kind} {name} rendered"))
}

fn count(docs: &[Value], kind: &str) -> usize {
    docs.iter().filter(|d| d["kind"] == kind).count()
}

fn ptr<'a>(v: &'a Value, p: &str) -> &'a Value {
    v.pointer(p).unwrap_or(&Value::Null)
}

fn pod_spec(workload: &Value) -> &Value {
    ptr(workload, "/spec/template/spec")
}

fn container<'a>(workload: &'a Value, list: &str, name: &str) -> Result<&'a Value> {
    pod_spec(workload)[list]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == name)
        .with_context(|| format!("no {list} entry {name}"))
}

fn env<'a>(c: &'a Value, name: &str) -> Option<&'a Value> {
    c["env"].as_array()?.iter().find(|e| e["name"] == name)
}

fn env_value(c: &Value, name: &str) -> Option<String> {
    env(c, name)?["value"].as_str().map(str::to_owned)
}

fn env_field(c: &Value, name: &str) -> Option<String> {
    env(c, name)?
        .pointer("/valueFrom/fieldRef/fieldPath")?
        .as_str()
        .map(str::to_owned)
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_owned))
        .collect()
}

/// Every container and init container of every workload.
fn all_containers(docs: &[Value]) -> Vec<&Value> {
    docs.iter()
        .filter(|d| d["kind"] == "DaemonSet" || d["kind"] == "Deployment")
        .flat_map(|d| {
            let spec = pod_spec(d);
            ["containers", "initContainers"]
                .into_iter()
                .flat_map(move |l| spec[l].as_array().into_iter().flatten())
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// RBAC, evaluated: may `sa` (in the release namespace) do `verb` on `group/resource` in
// `namespace` (None: cluster-scoped), for the object `name` if given?

fn rule_allows(rule: &Value, verb: &str, group: &str, resource: &str, name: Option<&str>) -> bool {
    let has = |field: &str, want: &str| strings(&rule[field]).iter().any(|s| s == want);
    let names = strings(&rule["resourceNames"]);
    has("verbs", verb)
        && has("apiGroups", group)
        && has("resources", resource)
        && (names.is_empty() || name.is_some_and(|n| names.iter().any(|x| x == n)))
}

fn binds(binding: &Value, sa: &str) -> bool {
    binding["subjects"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|s| s["kind"] == "ServiceAccount" && s["name"] == sa && s["namespace"] == NS)
}

fn can(
    docs: &[Value],
    sa: &str,
    verb: &str,
    (group, resource): (&str, &str),
    namespace: Option<&str>,
    name: Option<&str>,
) -> bool {
    let role_rules = |kind: &str, role: &str, ns: Option<&str>| -> Vec<Value> {
        docs.iter()
            .filter(|d| {
                d["kind"] == kind
                    && d["metadata"]["name"] == role
                    && ns.is_none_or(|ns| d["metadata"]["namespace"] == ns)
            })
            .flat_map(|d| d["rules"].as_array().cloned().unwrap_or_default())
            .collect()
    };
    let mut rules = Vec::new();
    for b in docs.iter().filter(|d| binds(d, sa)) {
        let role = b["roleRef"]["name"].as_str().unwrap_or_default();
        let role_kind = b["roleRef"]["kind"].as_str().unwrap_or_default();
        match b["kind"].as_str() {
            Some("ClusterRoleBinding") => rules.extend(role_rules(role_kind, role, None)),
            Some("RoleBinding") => {
                let bns = b["metadata"]["namespace"].as_str();
                if namespace.is_some() && bns == namespace {
                    rules.extend(role_rules(role_kind, role, bns));
                }
            }
            _ => {}
        }
    }
    rules
        .iter()
        .any(|r| rule_allows(r, verb, group, resource, name))
}

// ---------------------------------------------------------------------------------------
// Defaults

#[test]
fn defaults_agent_daemonset() -> Result<()> {
    let docs = render(&[])?;
    let ds = find(&docs, "DaemonSet", AGENT)?;
    assert_eq!(ds["metadata"]["namespace"], NS);
    let spec = pod_spec(ds);
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(spec["priorityClassName"], "system-node-critical");
    assert_eq!(spec["serviceAccountName"], AGENT);
    assert_eq!(spec["terminationGracePeriodSeconds"], 30);
    assert_eq!(spec["nodeSelector"], json!({"kubernetes.io/os": "linux"}));
    assert!(
        spec["tolerations"]
            .as_array()
            .context("tolerations")?
            .contains(&json!({"operator": "Exists"})),
        "the agent must tolerate every taint: {}",
        spec["tolerations"]
    );
    assert_eq!(
        ds["spec"]["updateStrategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}})
    );

    // The API token: projected and bound to the pod (the webhook maps it to the node), never
    // the automounted legacy one.
    assert_eq!(spec["automountServiceAccountToken"], false);
    let token = spec["volumes"]
        .as_array()
        .context("volumes")?
        .iter()
        .find(|v| v["name"] == "api-token")
        .context("an api-token volume")?;
    assert!(
        token["projected"]["sources"][0]["serviceAccountToken"]["path"] == "token",
        "{token}"
    );

    // Exactly the narrow list of host paths.
    let host_paths: BTreeSet<(String, String)> = spec["volumes"]
        .as_array()
        .context("volumes")?
        .iter()
        .filter(|v| v["name"] != "api-token")
        .map(|v| {
            let hp = v
                .get("hostPath")
                .with_context(|| format!("a volume that is not a hostPath: {v}"))?;
            Ok((
                hp["path"].as_str().context("path")?.to_owned(),
                hp["type"].as_str().context("type")?.to_owned(),
            ))
        })
        .collect::<Result<_>>()?;
    let want: BTreeSet<(String, String)> = [
        ("/dev/net/tun", "CharDevice"),
        ("/var/lib/wgmesh", "DirectoryOrCreate"),
        ("/etc/cni/net.d", "DirectoryOrCreate"),
        ("/run/wgmesh", "DirectoryOrCreate"),
        ("/opt/cni/bin", "DirectoryOrCreate"),
        ("/var/run/wireguard", "DirectoryOrCreate"),
        ("/var/lib/cni/wgmesh", "DirectoryOrCreate"),
    ]
    .into_iter()
    .map(|(p, t)| (p.to_owned(), t.to_owned()))
    .collect();
    assert_eq!(host_paths, want);

    // install-cni: the agent binary's subcommand, no shell, no capabilities.
    let init = container(ds, "initContainers", "install-cni")?;
    assert_eq!(
        strings(&init["command"]),
        [
            "/usr/bin/wgmesh-agent",
            "install-cni",
            "--source-dir",
            "/usr/lib/cni",
            "--dest-dir",
            "/host/opt/cni/bin"
        ]
    );
    assert!(init["args"].is_null());
    assert_eq!(init["image"], IMAGE);
    assert_eq!(init["securityContext"]["privileged"], false);
    assert_eq!(
        strings(&init["securityContext"]["capabilities"]["drop"]),
        ["ALL"]
    );
    assert!(init["securityContext"]["capabilities"]["add"].is_null());
    let init_mounts: Vec<_> = init["volumeMounts"]
        .as_array()
        .context("mounts")?
        .iter()
        .collect();
    assert_eq!(init_mounts.len(), 1);
    assert_eq!(init_mounts[0]["mountPath"], "/host/opt/cni/bin");
    assert_eq!(init_mounts[0]["name"], "cni-bin");

    // The agent.
    let agent = container(ds, "containers", "agent")?;
    assert_eq!(
        strings(&agent["command"]),
        [
            "/usr/bin/wgmesh-agent",
            "run",
            "--cni-ipam-data-dir",
            "/var/lib/cni/wgmesh"
        ]
    );
    assert_eq!(agent["image"], IMAGE);
    assert_eq!(agent["imagePullPolicy"], "IfNotPresent");
    let sc = &agent["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(strings(&sc["capabilities"]["add"]), ["NET_ADMIN"]);
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(
        env_field(agent, "NODE_NAME").as_deref(),
        Some("spec.nodeName")
    );
    assert_eq!(
        env_field(agent, "POD_NAMESPACE").as_deref(),
        Some("metadata.namespace")
    );
    assert_eq!(env_value(agent, "WGMESH_DAEMONSET").as_deref(), Some(AGENT));
    assert_eq!(
        env_value(agent, "WGMESH_INTERFACE").as_deref(),
        Some("wgmesh0")
    );
    assert_eq!(
        env_value(agent, "WGMESH_METRICS_ADDR").as_deref(),
        Some("0.0.0.0:9091")
    );
    assert_eq!(
        env_value(agent, "WGMESH_LOG_JSON").as_deref(),
        Some("false")
    );
    assert_eq!(env_value(agent, "RUST_LOG").as_deref(), Some("info"));
    for name in API_ENV {
        assert!(
            env(agent, name).is_none(),
            "{name} set without k8sServiceHost"
        );
    }
    assert_eq!(
        agent["readinessProbe"]["httpGet"],
        json!({"path": "/readyz", "port": 9091})
    );
    assert_eq!(
        agent["livenessProbe"]["httpGet"],
        json!({"path": "/healthz", "port": 9091})
    );
    let mounts: BTreeSet<(String, String)> = agent["volumeMounts"]
        .as_array()
        .context("mounts")?
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap_or_default().to_owned(),
                m["mountPath"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let want_mounts: BTreeSet<(String, String)> = [
        ("dev-net-tun", "/dev/net/tun"),
        ("state", "/var/lib/wgmesh"),
        ("cni-conf", "/etc/cni/net.d"),
        // The same path as on the host: the runtime follows the conflist's link on the host.
        ("run", "/run/wgmesh"),
        ("wireguard-sockets", "/var/run/wireguard"),
        // The same path as on the host: the plugins, run by the runtime on the host, read
        // the conflist that names it.
        ("cni-ipam-data", "/var/lib/cni/wgmesh"),
        // Where clients look for the in-cluster token.
        ("api-token", "/var/run/secrets/kubernetes.io/serviceaccount"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_owned(), b.to_owned()))
    .collect();
    assert_eq!(mounts, want_mounts);
    Ok(())
}

#[test]
fn defaults_operator_deployment_and_pdb() -> Result<()> {
    let docs = render(&[])?;
    let dep = find(&docs, "Deployment", OPERATOR)?;
    assert_eq!(dep["metadata"]["namespace"], NS);
    assert_eq!(dep["spec"]["replicas"], 2);
    let spec = pod_spec(dep);
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(spec["priorityClassName"], "system-cluster-critical");
    assert_eq!(spec["serviceAccountName"], OPERATOR);
    // hostNetwork: two replicas on one node would collide on the metrics port.
    let required = ptr(
        spec,
        "/affinity/podAntiAffinity/requiredDuringSchedulingIgnoredDuringExecution",
    );
    let term = required.get(0).context("required anti-affinity")?;
    assert_eq!(term["topologyKey"], "kubernetes.io/hostname");
    assert_eq!(
        term["labelSelector"]["matchLabels"],
        dep["spec"]["selector"]["matchLabels"]
    );
    assert!(
        ptr(
            spec,
            "/affinity/podAntiAffinity/preferredDuringSchedulingIgnoredDuringExecution"
        )
        .is_null()
    );
    let tolerations = spec["tolerations"].as_array().context("tolerations")?;
    for (key, effect) in [
        ("node.kubernetes.io/not-ready", "NoSchedule"),
        ("node.kubernetes.io/not-ready", "NoExecute"),
        ("node-role.kubernetes.io/control-plane", "NoSchedule"),
        ("node-role.kubernetes.io/master", "NoSchedule"),
    ] {
        assert!(
            tolerations.contains(&json!({"key": key, "operator": "Exists", "effect": effect})),
            "operator does not tolerate {key}:{effect}"
        );
    }
    assert!(!tolerations.contains(&json!({"operator": "Exists"})));

    let op = container(dep, "containers", "operator")?;
    let cmd = strings(&op["command"]);
    assert_eq!(cmd[0], "/usr/bin/wgmesh-operator");
    let lease_ns = cmd
        .iter()
        .position(|a| a == "--lease-namespace")
        .context("--lease-namespace")?;
    assert_eq!(cmd[lease_ns + 1], NS);
    assert_eq!(env_field(op, "POD_NAME").as_deref(), Some("metadata.name"));
    assert_eq!(
        env_value(op, "WGMESH_METRICS_ADDR").as_deref(),
        Some("0.0.0.0:9090")
    );
    assert_eq!(env_value(op, "WGMESH_LOG_JSON").as_deref(), Some("false"));
    assert_eq!(env_value(op, "RUST_LOG").as_deref(), Some("info"));
    assert_eq!(
        op["readinessProbe"]["httpGet"],
        json!({"path": "/readyz", "port": 9090})
    );
    assert_eq!(
        op["livenessProbe"]["httpGet"],
        json!({"path": "/healthz", "port": 9090})
    );
    let sc = &op["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["runAsUser"], 65532);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert!(sc["capabilities"]["add"].is_null());

    // The PDB: policy/v1beta1 on 1.20 (helm's default without a cluster), policy/v1 later.
    let pdb = find(&docs, "PodDisruptionBudget", OPERATOR)?;
    assert_eq!(pdb["apiVersion"], "policy/v1beta1");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        dep["spec"]["selector"]["matchLabels"]
    );
    let current = helm_template(&["--set", CIDRS, "--kube-version", "1.33.0"])?
        .map_err(anyhow::Error::msg)?;
    assert_eq!(
        find(&current, "PodDisruptionBudget", OPERATOR)?["apiVersion"],
        "policy/v1"
    );
    let live = helm_template(&[
        "--set",
        CIDRS,
        "--api-versions",
        "policy/v1/PodDisruptionBudget",
    ])?
    .map_err(anyhow::Error::msg)?;
    assert_eq!(
        find(&live, "PodDisruptionBudget", OPERATOR)?["apiVersion"],
        "policy/v1"
    );
    Ok(())
}

#[test]
fn defaults_common_shape() -> Result<()> {
    let docs = render(&[])?;
    for d in &docs {
        let labels = &d["metadata"]["labels"];
        for l in [
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/managed-by",
            "helm.sh/chart",
        ] {
            assert!(
                labels[l].is_string(),
                "{} {} lacks label {l}",
                d["kind"],
                d["metadata"]["name"]
            );
        }
    }
    // No shell anywhere: every container runs a wgmesh binary directly.
    for c in all_containers(&docs) {
        let cmd = strings(&c["command"]);
        assert!(
            cmd.first()
                .is_some_and(|p| p.starts_with("/usr/bin/wgmesh-")),
            "container {} runs {cmd:?}",
            c["name"]
        );
        assert!(
            !cmd.iter()
                .any(|a| a == "sh" || a == "-c" || a.ends_with("/sh"))
        );
    }
    // Pod labels carry the selector, so every workload selects its own pods.
    for d in docs
        .iter()
        .filter(|d| d["kind"] == "DaemonSet" || d["kind"] == "Deployment")
    {
        let selector = d["spec"]["selector"]["matchLabels"]
            .as_object()
            .context("selector")?;
        let labels = &d["spec"]["template"]["metadata"]["labels"];
        for (k, v) in selector {
            assert_eq!(&labels[k], v);
        }
    }
    // The default Mesh and PodCIDRPool.
    let mesh = find(&docs, "Mesh", "default")?;
    assert_eq!(mesh["apiVersion"], "wgmesh.dev/v1alpha1");
    assert!(mesh["metadata"]["namespace"].is_null(), "cluster-scoped");
    assert_eq!(
        mesh["spec"],
        json!({"listenPort": 51820, "mtu": "auto", "transport": {"hostGateway": "Never"},
               "persistentKeepalive": 0, "masquerade": true, "endpointAddressType": "InternalIP",
               "topology": {"locationLabel": "topology.kubernetes.io/region", "natKeepalive": 25,
                            "relay": "Auto"}})
    );
    let pool = find(&docs, "PodCIDRPool", "default")?;
    assert_eq!(
        pool["spec"],
        json!({"cidrs": ["10.244.0.0/16"], "nodePrefixLength": {"ipv4": 24}})
    );
    assert_eq!(
        count(&docs, "Namespace"),
        0,
        "no Namespace unless namespace.create"
    );
    Ok(())
}

#[test]
fn rbac_least_privilege() -> Result<()> {
    let docs = render(&[])?;
    // No wildcards anywhere.
    for d in docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
    {
        for rule in d["rules"].as_array().context("rules")? {
            for field in ["apiGroups", "resources", "verbs", "resourceNames"] {
                assert!(
                    !strings(&rule[field]).iter().any(|s| s.contains('*')),
                    "{} {} has a wildcard in {field}: {rule}",
                    d["kind"],
                    d["metadata"]["name"]
                );
            }
            assert!(rule["nonResourceURLs"].is_null());
        }
    }
    for sa in [AGENT, OPERATOR] {
        let account = find(&docs, "ServiceAccount", sa)?;
        assert_eq!(account["metadata"]["namespace"], NS);
        assert_eq!(account["automountServiceAccountToken"], true);
    }
    let cluster = None;
    let here = Some(NS);
    let default_ns = Some("default");
    let wg = |r| ("wgmesh.dev", r);

    // The agent: reads the mesh, writes its peer's status, events, and reads its DaemonSet.
    for r in ["meshpeers", "meshes", "podcidrpools"] {
        for v in ["list", "watch"] {
            assert!(can(&docs, AGENT, v, wg(r), cluster, None), "agent {v} {r}");
        }
    }
    assert!(can(&docs, AGENT, "list", ("", "nodes"), cluster, None));
    assert!(can(&docs, AGENT, "watch", ("", "nodes"), cluster, None));
    assert!(can(
        &docs,
        AGENT,
        "patch",
        wg("meshpeers/status"),
        cluster,
        None
    ));
    // Its own report (the webhook holds it to its own node's).
    for v in ["create", "patch"] {
        assert!(can(&docs, AGENT, v, wg("meshpeerreports"), cluster, None));
    }
    for v in ["list", "watch", "delete"] {
        assert!(
            !can(&docs, AGENT, v, wg("meshpeerreports"), cluster, None),
            "agent may {v} reports: no agent reads another's"
        );
    }
    for v in ["create", "patch", "update", "delete"] {
        assert!(
            !can(&docs, AGENT, v, wg("meshpeers"), cluster, None),
            "agent may {v} peers"
        );
        assert!(!can(&docs, AGENT, v, wg("podcidrpools"), cluster, None));
        assert!(!can(&docs, AGENT, v, wg("meshes"), cluster, None));
        assert!(!can(&docs, AGENT, v, ("", "nodes"), cluster, None));
    }
    assert!(!can(
        &docs,
        AGENT,
        "patch",
        wg("meshes/status"),
        cluster,
        None
    ));
    assert!(!can(
        &docs,
        AGENT,
        "patch",
        wg("podcidrpools/status"),
        cluster,
        None
    ));
    for v in ["create", "patch"] {
        assert!(can(&docs, AGENT, v, ("", "events"), default_ns, None));
    }
    for v in ["get", "list", "watch"] {
        assert!(
            can(&docs, AGENT, v, ("apps", "daemonsets"), here, Some(AGENT)),
            "agent {v} its DaemonSet"
        );
        assert!(!can(
            &docs,
            AGENT,
            v,
            ("apps", "daemonsets"),
            here,
            Some("kube-proxy")
        ));
        assert!(!can(
            &docs,
            AGENT,
            v,
            ("apps", "daemonsets"),
            Some("kube-system"),
            Some(AGENT)
        ));
    }
    // Nothing about secrets, anywhere, for either component.
    for sa in [AGENT, OPERATOR] {
        for v in [
            "get", "list", "watch", "create", "update", "patch", "delete",
        ] {
            for ns in [cluster, here, default_ns, Some("kube-system")] {
                assert!(
                    !can(&docs, sa, v, ("", "secrets"), ns, None),
                    "{sa} may {v} secrets in {ns:?}"
                );
            }
        }
        for d in docs
            .iter()
            .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
        {
            assert!(!d.to_string().contains("secrets"));
        }
    }
    // The agent has no lease, and no write outside its peer's status and events.
    assert!(!can(
        &docs,
        AGENT,
        "update",
        ("coordination.k8s.io", "leases"),
        here,
        Some(OPERATOR)
    ));

    // The operator.
    for v in ["get", "list", "watch", "create", "patch", "delete"] {
        assert!(
            can(&docs, OPERATOR, v, wg("meshpeers"), cluster, None),
            "operator {v} peers"
        );
    }
    for r in ["meshpeers/status", "podcidrpools/status", "meshes/status"] {
        assert!(
            can(&docs, OPERATOR, "patch", wg(r), cluster, None),
            "operator patch {r}"
        );
    }
    for r in ["podcidrpools", "meshes", "meshpeerreports"] {
        assert!(can(&docs, OPERATOR, "watch", wg(r), cluster, None));
        assert!(!can(&docs, OPERATOR, "delete", wg(r), cluster, None));
        assert!(!can(&docs, OPERATOR, "patch", wg(r), cluster, None));
    }
    assert!(can(&docs, OPERATOR, "watch", ("", "nodes"), cluster, None));
    assert!(!can(&docs, OPERATOR, "patch", ("", "nodes"), cluster, None));
    let lease = ("coordination.k8s.io", "leases");
    assert!(can(&docs, OPERATOR, "create", lease, here, None));
    assert!(can(&docs, OPERATOR, "get", lease, here, Some(OPERATOR)));
    assert!(can(&docs, OPERATOR, "update", lease, here, Some(OPERATOR)));
    assert!(!can(
        &docs,
        OPERATOR,
        "update",
        lease,
        here,
        Some("kube-scheduler")
    ));
    assert!(!can(
        &docs,
        OPERATOR,
        "update",
        lease,
        Some("kube-system"),
        Some(OPERATOR)
    ));
    // Subnet claims kept as Leases by earlier versions are listed and deleted here (moved
    // into the ledger), and nowhere else; never updated, no longer watched.
    for v in ["list", "delete"] {
        assert!(can(&docs, OPERATOR, v, lease, here, None));
        assert!(!can(&docs, OPERATOR, v, lease, Some("kube-system"), None));
    }
    assert!(!can(&docs, OPERATOR, "watch", lease, here, None));
    assert!(!can(
        &docs,
        OPERATOR,
        "update",
        lease,
        here,
        Some("wgmesh-subnet-10.244.0.0-24")
    ));
    // The subnet ledger: one ConfigMap here, read and replaced by name; no other ConfigMap
    // is read or changed, and none elsewhere.
    let cm = ("", "configmaps");
    const LEDGER: &str = "wgmesh-subnet-claims";
    assert!(can(&docs, OPERATOR, "create", cm, here, None));
    for v in ["get", "update"] {
        assert!(
            can(&docs, OPERATOR, v, cm, here, Some(LEDGER)),
            "operator {v} the ledger"
        );
        assert!(!can(&docs, OPERATOR, v, cm, here, Some("kube-root-ca.crt")));
        assert!(!can(
            &docs,
            OPERATOR,
            v,
            cm,
            Some("kube-system"),
            Some(LEDGER)
        ));
    }
    for v in ["list", "watch", "delete", "patch"] {
        assert!(!can(&docs, OPERATOR, v, cm, here, None));
    }
    for v in ["create", "patch"] {
        assert!(can(&docs, OPERATOR, v, ("", "events"), default_ns, None));
    }
    // The lease the Role allows is the one the operator is told to use.
    let op = container(
        find(&docs, "Deployment", OPERATOR)?,
        "containers",
        "operator",
    )?;
    let cmd = strings(&op["command"]);
    let i = cmd
        .iter()
        .position(|a| a == "--lease-name")
        .context("--lease-name")?;
    assert_eq!(cmd[i + 1], OPERATOR);
    Ok(())
}

#[test]
fn chart_crds_are_the_generated_crds() -> Result<()> {
    let names = |dir: &Path| -> Result<BTreeSet<String>> {
        fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
            .collect()
    };
    let generated = repo_root().join("crds");
    let chart = chart_dir().join("crds");
    let want = names(&generated)?;
    assert!(!want.is_empty());
    assert_eq!(
        names(&chart)?,
        want,
        "charts/wgmesh/crds/ must hold exactly the files of crds/: cp crds/*.yaml charts/wgmesh/crds/"
    );
    for name in &want {
        let a = fs::read(generated.join(name))?;
        let b = fs::read(chart.join(name))?;
        assert!(
            a == b,
            "charts/wgmesh/crds/{name} differs from crds/{name}; the chart's copies are never \
             edited: cp crds/*.yaml charts/wgmesh/crds/"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Value sets

#[test]
fn agent_privileged() -> Result<()> {
    let docs = render(&["agent.privileged=true"])?;
    let ds = find(&docs, "DaemonSet", AGENT)?;
    for (list, name) in [("containers", "agent"), ("initContainers", "install-cni")] {
        let sc = &container(ds, list, name)?["securityContext"];
        assert_eq!(sc["privileged"], true, "{name}");
        // The API server refuses privileged with allowPrivilegeEscalation: false.
        assert!(sc["allowPrivilegeEscalation"].is_null(), "{name}");
    }
    // Still no broader host access: seven host paths and the API token.
    assert_eq!(pod_spec(ds)["volumes"].as_array().map(Vec::len), Some(8));
    Ok(())
}

#[test]
fn image_tag_and_digest() -> Result<()> {
    let digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let docs = render(&[&format!("image.digest={digest}"), "image.tag=9.9.9"])?;
    let containers = all_containers(&docs);
    assert_eq!(containers.len(), 3);
    for c in &containers {
        assert_eq!(c["image"], format!("ghcr.io/wgmesh/wgmesh@{digest}"));
    }
    let docs = render(&[
        "image.tag=0.2.0-rc.1",
        "image.repository=registry.example/wgmesh",
        "image.pullPolicy=Always",
        "imagePullSecrets[0].name=regcred",
    ])?;
    for c in all_containers(&docs) {
        assert_eq!(c["image"], "registry.example/wgmesh:0.2.0-rc.1");
        assert_eq!(c["imagePullPolicy"], "Always");
    }
    for kind in ["DaemonSet", "Deployment"] {
        let w = docs.iter().find(|d| d["kind"] == kind).context(kind)?;
        assert_eq!(
            pod_spec(w)["imagePullSecrets"],
            json!([{"name": "regcred"}])
        );
    }
    Ok(())
}

#[test]
fn api_server_address_reaches_both_components() -> Result<()> {
    let docs = render(&[
        "k8sServiceHost=10.0.0.10",
        "k8sServicePort=6443",
        "logFormat=json",
        "logLevel=debug",
    ])?;
    let agent = container(find(&docs, "DaemonSet", AGENT)?, "containers", "agent")?;
    let op = container(
        find(&docs, "Deployment", OPERATOR)?,
        "containers",
        "operator",
    )?;
    for c in [agent, op] {
        assert_eq!(
            env_value(c, "KUBERNETES_SERVICE_HOST").as_deref(),
            Some("10.0.0.10")
        );
        assert_eq!(
            env_value(c, "KUBERNETES_SERVICE_PORT").as_deref(),
            Some("6443")
        );
        assert_eq!(env_value(c, "WGMESH_LOG_JSON").as_deref(), Some("true"));
        assert_eq!(env_value(c, "RUST_LOG").as_deref(), Some("debug"));
    }
    // A string port works as well; a host without a port is refused.
    let docs = render(&["k8sServiceHost=api.example", "k8sServicePort=443"])?;
    let op = container(
        find(&docs, "Deployment", OPERATOR)?,
        "containers",
        "operator",
    )?;
    assert_eq!(
        env_value(op, "KUBERNETES_SERVICE_PORT").as_deref(),
        Some("443")
    );
    let err = render_err(&["--set", CIDRS, "--set", "k8sServiceHost=10.0.0.10"])?;
    assert!(
        err.contains("k8sServiceHost and k8sServicePort go together"),
        "{err}"
    );
    Ok(())
}

#[test]
fn operator_without_host_network_prefers_spreading() -> Result<()> {
    let docs = render(&["operator.hostNetwork=false", "operator.replicas=3"])?;
    let dep = find(&docs, "Deployment", OPERATOR)?;
    assert_eq!(dep["spec"]["replicas"], 3);
    let spec = pod_spec(dep);
    assert!(spec["hostNetwork"].is_null() || spec["hostNetwork"] == false);
    let anti = &spec["affinity"]["podAntiAffinity"];
    assert!(anti["requiredDuringSchedulingIgnoredDuringExecution"].is_null());
    let preferred = anti["preferredDuringSchedulingIgnoredDuringExecution"]
        .get(0)
        .context("preferred anti-affinity")?;
    assert_eq!(
        preferred["podAffinityTerm"]["topologyKey"],
        "kubernetes.io/hostname"
    );
    // A user's affinity replaces the default.
    let docs = render(&[
        "operator.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].key=role",
        "operator.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].operator=Exists",
    ])?;
    let spec = pod_spec(find(&docs, "Deployment", OPERATOR)?);
    assert!(spec["affinity"]["podAntiAffinity"].is_null());
    assert!(spec["affinity"]["nodeAffinity"].is_object());
    // No PDB when disabled.
    let docs = render(&["operator.podDisruptionBudget.enabled=false"])?;
    assert_eq!(count(&docs, "PodDisruptionBudget"), 0);
    Ok(())
}

#[test]
fn custom_resources_optional() -> Result<()> {
    let docs = render(&["mesh.create=false", "podCIDRPool.create=false"])?;
    assert_eq!(count(&docs, "Mesh"), 0);
    assert_eq!(count(&docs, "PodCIDRPool"), 0);
    // Without a pool to render, no CIDRs are needed.
    let docs =
        helm_template(&["--set", "podCIDRPool.create=false"])?.map_err(anyhow::Error::msg)?;
    assert_eq!(count(&docs, "PodCIDRPool"), 0);
    assert_eq!(count(&docs, "Mesh"), 1);
    assert_eq!(count(&docs, "DaemonSet"), 1);
    Ok(())
}

#[test]
fn mesh_and_pool_values() -> Result<()> {
    let docs = render(&[
        "mesh.mtu=1420",
        "mesh.listenPort=51821",
        "mesh.transport.hostGateway=OnLink",
        "mesh.transport.hostGatewaySubnets={192.168.0.0/16}",
        "mesh.persistentKeepalive=25",
        "mesh.masquerade=false",
        "mesh.endpointAddressType=ExternalIP",
        "mesh.topology.locationLabel=example.com/site",
        "mesh.topology.natKeepalive=15",
        "mesh.topology.relay=Never",
        "mesh.keyRotation.interval=720h",
        "mesh.keyRotation.maxConcurrent=2",
        "mesh.ipam.releaseGracePeriod=10m",
        "podCIDRPool.cidrs={10.244.0.0/17,fd00:10:244::/56}",
        "podCIDRPool.name=cloud-a",
        "podCIDRPool.nodeSelector.matchLabels.topology\\.kubernetes\\.io/region=eu-west",
    ])?;
    let mesh = find(&docs, "Mesh", "default")?;
    assert_eq!(
        mesh["spec"],
        json!({
            "listenPort": 51821, "mtu": 1420,
            "transport": {"hostGateway": "OnLink", "hostGatewaySubnets": ["192.168.0.0/16"]},
            "persistentKeepalive": 25, "masquerade": false, "endpointAddressType": "ExternalIP",
            "ipam": {"releaseGracePeriod": "10m"},
            "topology": {"locationLabel": "example.com/site", "natKeepalive": 15, "relay": "Never"},
            "keyRotation": {"interval": "720h", "maxConcurrent": 2},
        })
    );
    let pool = find(&docs, "PodCIDRPool", "cloud-a")?;
    assert_eq!(
        pool["spec"],
        json!({
            "cidrs": ["10.244.0.0/17", "fd00:10:244::/56"],
            "nodePrefixLength": {"ipv4": 24, "ipv6": 64},
            "nodeSelector": {"matchLabels": {"topology.kubernetes.io/region": "eu-west"}},
        })
    );
    // IPv6 only: only the IPv6 prefix length.
    let docs = render(&[
        "podCIDRPool.cidrs={fd00:10:244::/56}",
        "podCIDRPool.nodePrefixLength.ipv6=80",
    ])?;
    assert_eq!(
        find(&docs, "PodCIDRPool", "default")?["spec"]["nodePrefixLength"],
        json!({"ipv6": 80})
    );
    Ok(())
}

#[test]
fn namespace_for_gitops() -> Result<()> {
    let docs = render(&["namespace.create=true"])?;
    let ns = find(&docs, "Namespace", NS)?;
    for mode in ["enforce", "audit", "warn"] {
        assert_eq!(
            ns["metadata"]["labels"][format!("pod-security.kubernetes.io/{mode}")],
            "privileged"
        );
    }
    Ok(())
}

#[test]
fn pool_cidrs_are_required() -> Result<()> {
    let err = render_err(&[])?;
    assert!(
        err.contains("podCIDRPool.cidrs is required: the pod address ranges, e.g. --set podCIDRPool.cidrs={10.244.0.0/16}"),
        "unclear message: {err}"
    );
    Ok(())
}

#[test]
fn schema_refuses_bad_values() -> Result<()> {
    for bad in [
        "mesh.mtu=12",
        "mesh.mtu=70000",
        "mesh.mtu=large",
        "unknownKey=1",
        "agent.unknown=1",
        "mesh.transport.hostGateway=Sometimes",
        "logFormat=yaml",
        "podCIDRPool.cidrs={not-a-cidr}",
        "podCIDRPool.nodePrefixLength.ipv4=33",
        "image.pullPolicy=Sometimes",
        "mesh.keyRotation.interval=monthly",
        "operator.hostNetwork=yes",
        "mesh.listenPort=0",
        "mesh.topology.relay=Sometimes",
        "mesh.topology.natKeepalive=-1",
    ] {
        let err = render_err(&["--set", CIDRS, "--set", bad])?;
        assert!(
            err.contains("values don't meet the specifications of the schema"),
            "{bad}: not a schema error: {err}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Lint and validation against Kubernetes' schemas

#[test]
fn monitoring() -> Result<()> {
    // By default: a headless metrics Service per component, selecting its pods on the port
    // the pods name `metrics`; nothing that needs the Prometheus Operator's CRDs.
    let docs = render(&[])?;
    for (component, workload, kind, port) in [
        ("agent", AGENT, "DaemonSet", 9091),
        ("operator", OPERATOR, "Deployment", 9090),
    ] {
        let svc = find(&docs, "Service", &format!("wgmesh-{component}-metrics"))?;
        assert_eq!(svc["spec"]["clusterIP"], "None");
        assert_eq!(ptr(svc, "/spec/ports/0/port"), port);
        assert_eq!(ptr(svc, "/spec/ports/0/targetPort"), "metrics");
        let labels = ptr(
            find(&docs, kind, workload)?,
            "/spec/template/metadata/labels",
        );
        for (k, v) in svc["spec"]["selector"].as_object().context("a selector")? {
            assert_eq!(
                &labels[k], v,
                "{component}: the Service selects no pod by {k}"
            );
        }
        let c = container(find(&docs, kind, workload)?, "containers", component)?;
        assert!(
            c["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["name"] == "metrics" && p["containerPort"] == port),
            "{component}: no container port named metrics"
        );
    }
    assert_eq!(count(&docs, "ServiceMonitor"), 0);
    assert_eq!(count(&docs, "PrometheusRule"), 0);
    let without = render(&["metrics.service.enabled=false"])?;
    assert!(
        !without.iter().any(|d| d["kind"] == "Service"
            && d["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.ends_with("-metrics"))),
        "metrics.service.enabled=false still renders a metrics Service"
    );

    let docs = render(&[
        "metrics.serviceMonitor.enabled=true",
        "metrics.serviceMonitor.labels.release=prom",
        "metrics.prometheusRule.enabled=true",
        "metrics.grafanaDashboard.enabled=true",
        "metrics.grafanaDashboard.namespace=monitoring",
    ])?;
    // The ServiceMonitor selects both Services, on their metrics port.
    let sm = find(&docs, "ServiceMonitor", "wgmesh")?;
    assert_eq!(ptr(sm, "/metadata/labels/release"), "prom");
    let selector = sm["spec"]["selector"]["matchLabels"]
        .as_object()
        .context("matchLabels")?;
    for component in ["agent", "operator"] {
        let svc = find(&docs, "Service", &format!("wgmesh-{component}-metrics"))?;
        for (k, v) in selector {
            assert_eq!(
                &svc["metadata"]["labels"][k], v,
                "{component}: not selected by {k}"
            );
        }
    }
    assert_eq!(ptr(sm, "/spec/endpoints/0/port"), "metrics");
    assert_eq!(ptr(sm, "/spec/namespaceSelector/matchNames/0"), NS);
    // The PrometheusRule carries the rules file as it is.
    let file: Value = serde_yaml::from_str(&fs::read_to_string(
        chart_dir().join("files/prometheus-rules.yaml"),
    )?)?;
    let rule = find(&docs, "PrometheusRule", "wgmesh")?;
    assert_eq!(rule["spec"]["groups"], file["groups"]);
    let alerts: Vec<&str> = file["groups"][0]["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["alert"].as_str())
        .collect();
    for want in [
        "WgmeshHandshakeStale",
        "WgmeshKeyRotationStuck",
        "WgmeshPlaintextFallback",
        "WgmeshPoolNearlyExhausted",
    ] {
        assert!(alerts.contains(&want), "no {want} alert: {alerts:?}");
    }
    // The dashboard: the JSON file as it is, where Grafana's sidecar looks.
    let cm = find(&docs, "ConfigMap", "wgmesh-dashboard")?;
    assert_eq!(ptr(cm, "/metadata/namespace"), "monitoring");
    assert_eq!(ptr(cm, "/metadata/labels/grafana_dashboard"), "1");
    let shipped: Value =
        serde_json::from_str(cm["data"]["wgmesh.json"].as_str().context("wgmesh.json")?)?;
    let file: Value = serde_json::from_str(&fs::read_to_string(
        chart_dir().join("files/grafana-dashboard.json"),
    )?)?;
    assert_eq!(shipped, file);
    let titles: Vec<&str> = file["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["title"].as_str())
        .collect();
    for want in [
        "Handshake age per peer",
        "Bytes received per second",
        "Key generation per node",
        "Subnets allocated per second",
        "Agent errors by stage",
    ] {
        assert!(titles.contains(&want), "no panel {want}: {titles:?}");
    }
    Ok(())
}

#[test]
fn alert_rules_pass_promtool() -> Result<()> {
    let promtool = tool("promtool")?;
    let file = chart_dir().join("files/prometheus-rules.yaml");
    let out = run(Command::new(&promtool).args(["check", "rules"]).arg(&file))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool check rules:\n{text}");
    assert!(text.contains("SUCCESS"), "{text}");
    // Not vacuous: a broken expression is refused.
    let dir = scratch_dir("promtool")?;
    let bad = dir.join("bad.yaml");
    fs::write(
        &bad,
        "groups:\n  - name: x\n    rules:\n      - alert: X\n        expr: rate(wgmesh_agent_errors_total[5m]\n",
    )?;
    let out = run(Command::new(&promtool).args(["check", "rules"]).arg(&bad))?;
    assert!(
        !out.status.success(),
        "promtool accepted a broken expression"
    );
    let _ = fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn helm_lint_strict() -> Result<()> {
    let helm = tool("helm")?;
    let chart = chart_dir();
    for args in [
        vec![
            "-f".to_owned(),
            chart.join("ci/default-values.yaml").display().to_string(),
        ],
        vec![
            "--set".to_owned(),
            CIDRS.to_owned(),
            "--set".to_owned(),
            "agent.privileged=true,operator.hostNetwork=false,namespace.create=true".to_owned(),
        ],
    ] {
        let out = run(Command::new(&helm)
            .args(["lint", "--strict", "--namespace", NS])
            .arg(&chart)
            .args(&args))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "helm lint --strict {args:?} failed:\n{text}"
        );
        assert!(
            !text.contains("[WARNING]") && !text.contains("[ERROR]"),
            "{text}"
        );
    }
    Ok(())
}

/// Validates each CR against the openAPIV3Schema of its CRD, with the jsonschema package of
/// kubernetes-validate's Python environment. Unknown fields are refused (the API server
/// would prune them, silently; here they are a chart bug).
const CR_VALIDATOR: &str = r#"
import json, sys, jsonschema
crds, crs = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
def strict(s):
    if isinstance(s, dict):
        if s.get("type") == "object" and "properties" in s and "additionalProperties" not in s \
                and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
        for v in s.values(): strict(v)
    elif isinstance(s, list):
        for v in s: strict(v)
schemas = {}
for crd in crds:
    for v in crd["spec"]["versions"]:
        schema = v["schema"]["openAPIV3Schema"]
        strict(schema)
        # The API server supplies these three, whatever the CRD's schema says.
        schema["properties"]["apiVersion"] = {"type": "string"}
        schema["properties"]["kind"] = {"type": "string"}
        schema["properties"]["metadata"] = {"type": "object"}
        schemas[(crd["spec"]["group"] + "/" + v["name"], crd["spec"]["names"]["kind"])] = schema
bad = 0
for cr in crs:
    key = (cr["apiVersion"], cr["kind"])
    if key not in schemas:
        print("ERROR no CRD for %s %s" % key); bad = 1; continue
    errors = list(jsonschema.Draft4Validator(schemas[key]).iter_errors(cr))
    for e in errors:
        print("ERROR %s/%s: %s: %s" % (cr["kind"], cr["metadata"]["name"], "/".join(map(str, e.path)), e.message))
    if not errors:
        print("PASS %s/%s" % (cr["kind"], cr["metadata"]["name"]))
    bad |= bool(errors)
sys.exit(bad)
"#;

fn scratch_dir(name: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("wgmesh-chart-{}-{name}", std::process::id()));
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Renders with CRDs for `kube_version`, validates the built-in kinds with `validator`
/// (strict) and the custom resources against the CRDs. Every document must be checked by
/// one or the other: nothing is skipped.
fn validate(validator: &str, kube_version: &str, sets: &[&str]) -> Result<()> {
    let mut args = vec![
        "--include-crds",
        "--kube-version",
        kube_version,
        "--set",
        CIDRS,
    ];
    for s in sets {
        args.extend(["--set", s]);
    }
    let docs = helm_template(&args)?.map_err(|e| anyhow::anyhow!("helm template: {e}"))?;
    let is_cr = |d: &Value| {
        d["apiVersion"]
            .as_str()
            .is_some_and(|a| a.starts_with("wgmesh.dev/"))
    };
    let (crs, builtin): (Vec<Value>, Vec<Value>) = docs.into_iter().partition(is_cr);
    let crds: Vec<&Value> = builtin
        .iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
        .collect();
    let want = fs::read_dir(repo_root().join("crds"))?.count();
    ensure!(
        crds.len() == want,
        "expected the {want} CRDs of crds/ with --include-crds, got {}",
        crds.len()
    );

    let dir = scratch_dir(&format!("validate-{kube_version}"))?;
    let manifest = dir.join("builtin.yaml");
    let mut yaml = String::new();
    for d in &builtin {
        yaml.push_str("---\n");
        yaml.push_str(&serde_yaml::to_string(d)?);
    }
    fs::write(&manifest, yaml)?;
    let exe = tool(validator)?;
    let out = run(Command::new(&exe)
        .args(["--kubernetes-version", kube_version, "--strict"])
        .arg(&manifest))?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "{validator} -k {kube_version} --strict refused the chart ({sets:?}):\n{text}"
    );
    ensure!(
        !text.contains("WARN") && !text.contains("ERROR") && !text.contains("FATAL"),
        "{validator} -k {kube_version} skipped or refused something ({sets:?}):\n{text}"
    );
    let passed = text
        .lines()
        .filter(|l| l.starts_with("INFO") && l.contains(" passed "))
        .count();
    ensure!(
        passed == builtin.len(),
        "{validator} -k {kube_version}: {passed} of {} documents passed:\n{text}",
        builtin.len()
    );

    // The custom resources against their CRDs.
    if !crs.is_empty() {
        let (ok, text) = validate_crs(&exe, &crds, &crs, &dir)?;
        ensure!(
            ok,
            "custom resources refused by their CRDs ({sets:?}):\n{text}"
        );
        ensure!(
            text.lines().filter(|l| l.starts_with("PASS")).count() == crs.len(),
            "{text}"
        );
    }
    let _ = fs::remove_dir_all(&dir);
    Ok(())
}

/// Runs [`CR_VALIDATOR`] with the Python of `validator`'s virtual environment: whether
/// every CR passed, and what it printed.
fn validate_crs(
    validator: &Path,
    crds: &[&Value],
    crs: &[Value],
    dir: &Path,
) -> Result<(bool, String)> {
    let python = fs::canonicalize(validator)?.with_file_name("python");
    ensure!(
        python.is_file(),
        "no python next to {} (a virtual environment from hack/lib/deps.sh)",
        validator.display()
    );
    fs::write(dir.join("crds.json"), serde_json::to_vec(crds)?)?;
    fs::write(dir.join("crs.json"), serde_json::to_vec(crs)?)?;
    let out = run(Command::new(&python)
        .args(["-c", CR_VALIDATOR])
        .arg(dir.join("crds.json"))
        .arg(dir.join("crs.json")))?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    Ok((out.status.success(), text))
}

/// Value sets that between them render every template branch.
const VALIDATED: [&[&str]; 3] = [
    &[],
    &[
        "agent.privileged=true",
        "operator.hostNetwork=false",
        "namespace.create=true",
        "k8sServiceHost=10.0.0.10",
        "k8sServicePort=6443",
        "image.digest=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "imagePullSecrets[0].name=regcred",
        "mesh.mtu=1420",
        "mesh.transport.hostGateway=Fallback",
        "mesh.transport.hostGatewaySubnets={192.168.0.0/16}",
        "mesh.keyRotation.interval=720h",
        "mesh.keyRotation.requestedAt=2024-05-01T00:00:00Z",
        "mesh.ipam.source=NodeSpec",
        "podCIDRPool.cidrs={10.244.0.0/17,fd00:10:244::/56}",
        "podCIDRPool.nodeSelector.matchLabels.region=eu",
        "agent.podAnnotations.a=b",
        "operator.podLabels.c=d",
        "metrics.grafanaDashboard.enabled=true",
    ],
    &[
        "mesh.create=false",
        "podCIDRPool.create=false",
        "operator.podDisruptionBudget.enabled=false",
        "metrics.service.enabled=false",
    ],
];

#[test]
fn validates_against_kubernetes_1_20() -> Result<()> {
    // kubernetes-validate 1.37 knows 1.25 and later; 1.28.x is the last to carry 1.20.
    for sets in VALIDATED {
        validate("kubernetes-validate-1.28", "1.20.0", sets)?;
    }
    Ok(())
}

#[test]
fn validates_against_current_kubernetes() -> Result<()> {
    for sets in VALIDATED {
        validate("kubernetes-validate", "1.33.0", sets)?;
    }
    Ok(())
}

#[test]
fn validator_is_not_vacuous() -> Result<()> {
    // A field Kubernetes does not have must be refused, or the checks above prove nothing.
    let docs = render(&[])?;
    let mut ds = find(&docs, "DaemonSet", AGENT)?.clone();
    ds["spec"]["template"]["spec"]["hostNetwrok"] = json!(true);
    let dir = scratch_dir("vacuous")?;
    let file = dir.join("bad.yaml");
    fs::write(&file, serde_yaml::to_string(&ds)?)?;
    for (validator, version) in [
        ("kubernetes-validate-1.28", "1.20.0"),
        ("kubernetes-validate", "1.33.0"),
    ] {
        let out = run(Command::new(tool(validator)?)
            .args(["--kubernetes-version", version, "--strict"])
            .arg(&file))?;
        assert!(
            !out.status.success(),
            "{validator} accepted a misspelt field"
        );
    }
    // The same for the custom resources: a bad MTU and a misspelt field.
    let docs = helm_template(&["--include-crds", "--set", CIDRS])?.map_err(anyhow::Error::msg)?;
    let crds: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
        .collect();
    let mut mesh = find(&docs, "Mesh", "default")?.clone();
    mesh["spec"]["mtu"] = json!(12);
    let mut pool = find(&docs, "PodCIDRPool", "default")?.clone();
    pool["spec"]["nodePrefixLenght"] = json!({"ipv4": 24});
    for cr in [mesh, pool] {
        let (ok, text) = validate_crs(&tool("kubernetes-validate")?, &crds, &[cr], &dir)?;
        assert!(
            !ok,
            "the CRD schema check accepted a bad custom resource: {text}"
        );
    }
    let _ = fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn notes_say_what_to_check() -> Result<()> {
    // `helm template` does not render NOTES.txt; render a copy of the chart in which it is
    // an ordinary template.
    let dir = scratch_dir("notes")?;
    let copy = dir.join("wgmesh");
    let status = Command::new("cp")
        .arg("-r")
        .arg(chart_dir())
        .arg(&copy)
        .status()?;
    ensure!(status.success(), "copying the chart");
    fs::rename(
        copy.join("templates/NOTES.txt"),
        copy.join("templates/notes.txt"),
    )?;
    let notes = |sets: &[&str]| -> Result<String> {
        let mut cmd = Command::new(tool("helm")?);
        cmd.args(["template", "wgmesh"]).arg(&copy).args([
            "--namespace",
            NS,
            "--show-only",
            "templates/notes.txt",
        ]);
        for s in sets {
            cmd.args(["--set", s]);
        }
        // The notes are no YAML; helm prints them and then complains, with --debug.
        let out = run(cmd.arg("--debug"))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let text = notes(&[CIDRS])?;
    for want in [
        "kubectl get pods -n wgmesh-system",
        "kubectl get meshpeers -o wide",
        "kubectl get nodes",
        "wg show wgmesh0",
        "pod-security.kubernetes.io/enforce=privileged",
        "kubectl apply -f crds/",
    ] {
        assert!(text.contains(want), "NOTES lack {want:?}:\n{text}");
    }
    assert!(!text.contains("no PodCIDRPool exists"));
    let text = notes(&["podCIDRPool.create=false"])?;
    assert!(
        text.contains("WARNING: podCIDRPool.create is false and no PodCIDRPool exists"),
        "{text}"
    );
    let text = notes(&[CIDRS, "namespace.create=true"])?;
    assert!(!text.contains("kubectl label namespace"), "{text}");
    let _ = fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn the_webhook_fails_closed_and_trusts_its_own_certificate() -> Result<()> {
    let docs = render(&[])?;
    let vwc = find(&docs, "ValidatingWebhookConfiguration", "wgmesh-webhook")?;
    let hooks = vwc["webhooks"].as_array().context("webhooks")?;
    assert_eq!(hooks.len(), 2, "{hooks:?}");
    let secret = find(&docs, "Secret", "wgmesh-webhook-tls")?;
    for (hook, resources, path) in [
        (
            &hooks[0],
            &["meshpeers", "meshpeers/status"][..],
            "/validate/meshpeers",
        ),
        (
            &hooks[1],
            &["meshpeerreports"][..],
            "/validate/meshpeerreports",
        ),
    ] {
        assert_eq!(hook["failurePolicy"], "Fail");
        assert_eq!(hook["sideEffects"], "None");
        let rule = &hook["rules"][0];
        assert_eq!(strings(&rule["apiGroups"]), ["wgmesh.dev"]);
        assert_eq!(strings(&rule["resources"]), resources);
        assert_eq!(strings(&rule["operations"]), ["CREATE", "UPDATE"]);
        let service = &hook["clientConfig"]["service"];
        assert_eq!(service["name"], OPERATOR);
        assert_eq!(service["namespace"], NS);
        assert_eq!(service["path"], path);
        // The caBundle is the CA that signed the serving certificate the operator mounts.
        assert_eq!(hook["clientConfig"]["caBundle"], secret["data"]["ca.crt"]);
    }
    assert!(
        secret["data"]["tls.key"]
            .as_str()
            .is_some_and(|k| !k.is_empty())
    );
    let op = find(&docs, "Deployment", OPERATOR)?;
    let args = strings(&container(op, "containers", "operator")?["command"]);
    for flag in ["--webhook-addr", "--webhook-cert", "--webhook-key"] {
        assert!(args.iter().any(|a| a == flag), "{flag} in {args:?}");
    }
    let pair = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    assert_eq!(
        pair("--agent-service-account").as_deref(),
        Some(format!("{NS}/{AGENT}").as_str())
    );
    assert_eq!(
        pair("--operator-service-account").as_deref(),
        Some(format!("{NS}/{OPERATOR}").as_str())
    );
    // The webhook's lookups: pods in its own namespace (read, never written), one node by
    // name; nothing more.
    for v in ["get", "list", "watch"] {
        assert!(
            can(&docs, OPERATOR, v, ("", "pods"), Some(NS), None),
            "operator {v} pods"
        );
    }
    for v in ["create", "update", "patch", "delete"] {
        assert!(
            !can(&docs, OPERATOR, v, ("", "pods"), Some(NS), None),
            "operator {v} pods"
        );
    }
    assert!(!can(
        &docs,
        OPERATOR,
        "get",
        ("", "pods"),
        Some("kube-system"),
        None
    ));
    assert!(can(&docs, OPERATOR, "get", ("", "nodes"), None, None));
    assert!(!can(
        &docs,
        OPERATOR,
        "get",
        ("", "secrets"),
        Some(NS),
        None
    ));
    Ok(())
}
