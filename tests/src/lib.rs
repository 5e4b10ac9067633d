//! Support for wgmesh's integration tests: a handle on the real control plane that
//! `hack/cluster.sh` runs, and small helpers to wait on conditions instead of sleeping.
//!
//! Tests never touch whatever cluster `KUBECONFIG` points at. They use
//! `WGMESH_TEST_KUBECONFIG` when it is set (as `hack/test.sh` does), and otherwise bring up
//! a private control plane under `target/wgmesh-test-cluster` with `hack/cluster.sh up`.

pub mod bench;
pub mod flood;
pub mod netns;
pub mod nodes;
pub mod ping;

use anyhow::{Context, Result, bail};
use kube::config::{KubeConfigOptions, Kubeconfig};
use std::{
    future::Future,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::OnceLock,
    time::{Duration, Instant},
};

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The kubeconfig of the test control plane, starting it on first use.
pub fn kubeconfig() -> Result<PathBuf> {
    static PATH: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    PATH.get_or_init(|| ensure_cluster().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

fn ensure_cluster() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("WGMESH_TEST_KUBECONFIG") {
        return Ok(PathBuf::from(path));
    }
    let dir = repo_root().join("target/wgmesh-test-cluster");
    let script = repo_root().join("hack/cluster.sh");
    let out = Command::new("bash")
        .arg(&script)
        .args(["up", "--dir"])
        .arg(&dir)
        .args(["--port", "16443"])
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "`hack/cluster.sh up` failed (status {}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(dir.join("kubeconfig"))
}

/// Where `hack/lib/deps.sh` installs its tools: `$WGMESH_TOOLS_DIR/bin`, default
/// `~/.cache/wgmesh/tools/bin`.
pub fn tools_bin() -> PathBuf {
    let dir = std::env::var_os("WGMESH_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            Path::new(&home).join(".cache/wgmesh/tools")
        });
    dir.join("bin")
}

/// The tool from the tools directory, else from `PATH`; an error saying how to install it.
pub fn tool(name: &str) -> Result<PathBuf> {
    let own = tools_bin().join(name);
    if own.is_file() {
        return Ok(own);
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    on_path.with_context(|| {
        format!(
            "`{name}` is not installed (looked in {} and PATH): run `bash hack/lib/deps.sh` \
             (or set WGMESH_TOOLS_DIR); no test passes without it",
            tools_bin().display()
        )
    })
}

/// A client for the test control plane.
pub async fn client() -> Result<kube::Client> {
    client_for(&kubeconfig()?).await
}

/// A client from the kubeconfig at `path`.
pub async fn client_for(path: &Path) -> Result<kube::Client> {
    let kc = Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

/// Runs `kubectl` against the test control plane.
pub fn kubectl(args: &[&str]) -> Result<Output> {
    let out = Command::new("kubectl")
        .env("KUBECONFIG", kubeconfig()?)
        .args(args)
        .output()
        .context("running kubectl (is it installed? `hack/cluster.sh install` installs it)")?;
    Ok(out)
}

/// Runs `kubectl` and fails unless it succeeds, returning its stdout.
pub fn kubectl_ok(args: &[&str]) -> Result<String> {
    let out = kubectl(args)?;
    if !out.status.success() {
        bail!(
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Applies `crds/` and waits until every definition is established.
pub fn install_crds() -> Result<()> {
    static DONE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let crds = repo_root().join("crds");
        let crds = crds.to_string_lossy();
        kubectl_ok(&["apply", "-f", &crds])
            .and_then(|_| {
                kubectl_ok(&[
                    "wait",
                    "--for=condition=Established",
                    "--timeout=60s",
                    "-f",
                    &crds,
                ])
            })
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
    })
    .clone()
    .map_err(|e| anyhow::anyhow!(e))
}

/// A name unique to this test process and call, for cluster-scoped objects.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `check` until it returns `Some`, or fails after `timeout` saying what it waited for.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            match last_err {
                Some(e) => {
                    bail!("timed out after {timeout:?} waiting for {what}; last error: {e:#}")
                }
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A `wgmesh-operator` process against the test control plane, killed when dropped.
#[derive(Debug)]
pub struct OperatorProcess {
    child: std::process::Child,
    pub identity: String,
    pub log: PathBuf,
}

impl OperatorProcess {
    /// Starts the operator binary at `bin` competing for the lease `lease`; its log goes to
    /// a file under the system temp directory.
    pub fn start(bin: &str, lease: &str, extra: &[&str]) -> Result<OperatorProcess> {
        let identity = unique_name("operator");
        let log = std::env::temp_dir().join(format!("{identity}.log"));
        let file = std::fs::File::create(&log)?;
        let child = Command::new(bin)
            .env("KUBECONFIG", kubeconfig()?)
            .env("RUST_LOG", "info,kube=warn")
            .args([
                "--metrics-addr",
                "127.0.0.1:0",
                "--lease-namespace",
                "kube-system",
            ])
            .args([
                "--lease-name",
                lease,
                "--identity",
                &identity,
                "--lease-duration-seconds",
                "4",
            ])
            .args(extra)
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {bin}"))?;
        Ok(OperatorProcess {
            child,
            identity,
            log,
        })
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Freezes the process (SIGSTOP), as a paused VM or a stalled node would.
    pub fn freeze(&self) -> Result<()> {
        self.signal(libc::SIGSTOP)
    }

    /// Resumes a frozen process (SIGCONT).
    pub fn thaw(&self) -> Result<()> {
        self.signal(libc::SIGCONT)
    }

    fn signal(&self, sig: libc::c_int) -> Result<()> {
        let pid = libc::pid_t::try_from(self.child.id())?;
        // SAFETY: kill has no memory preconditions; the pid is our own child's.
        if unsafe { libc::kill(pid, sig) } != 0 {
            bail!("signal {sig} to {pid}: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The process's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Deletes every wgmesh object and every Node, so a test starts from an empty mesh.
pub async fn reset_mesh(client: &kube::Client) -> Result<()> {
    use k8s_openapi::api::core::v1::Node;
    use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
    use wgmesh_api::{Mesh, MeshPeer, PodCIDRPool};

    let peers: Api<MeshPeer> = Api::all(client.clone());
    for p in peers.list(&ListParams::default()).await? {
        let name = p.metadata.name.unwrap_or_default();
        if p.metadata.finalizers.is_some_and(|f| !f.is_empty()) {
            let patch = serde_json::json!({"metadata": {"finalizers": null}});
            peers
                .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                .await?;
        }
    }
    peers
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await?;
    Api::<PodCIDRPool>::all(client.clone())
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await?;
    Api::<Mesh>::all(client.clone())
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await?;
    Api::<Node>::all(client.clone())
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await?;
    // The operators the tests start keep their subnet ledger in kube-system (and kept
    // their claims as Leases before it).
    match Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), "kube-system")
        .delete("wgmesh-subnet-claims", &DeleteParams::default())
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.is_not_found() => {}
        Err(e) => return Err(e.into()),
    }
    Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(client.clone(), "kube-system")
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels(&format!(
                "{}={}",
                wgmesh_api::consts::CLAIM_LABEL,
                wgmesh_api::consts::CLAIM_SUBNET
            )),
        )
        .await?;
    wait_for("the mesh to be empty", Duration::from_secs(60), || {
        let peers = peers.clone();
        let nodes: Api<Node> = Api::all(client.clone());
        async move {
            let empty = peers.list(&ListParams::default()).await?.items.is_empty()
                && nodes.list(&ListParams::default()).await?.items.is_empty();
            Ok(empty.then_some(()))
        }
    })
    .await
}

/// A plain Node object, as a kubelet would register it (no kubelet runs).
pub fn mk_node(
    name: &str,
    labels: &[(&str, &str)],
    internal_ip: &str,
) -> k8s_openapi::api::core::v1::Node {
    use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeStatus};
    let mut node = Node::default();
    node.metadata.name = Some(name.to_owned());
    node.metadata.labels = Some(
        labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    );
    node.status = Some(NodeStatus {
        addresses: Some(vec![NodeAddress {
            type_: "InternalIP".into(),
            address: internal_ip.to_owned(),
        }]),
        ..Default::default()
    });
    node
}
