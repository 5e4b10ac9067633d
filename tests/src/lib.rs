//! Support for wgmesh's integration tests: a handle on the real control plane that
//! `hack/cluster.sh` runs, and small helpers to wait on conditions instead of sleeping.
//!
//! Tests never touch whatever cluster `KUBECONFIG` points at. They use
//! `WGMESH_TEST_KUBECONFIG` when it is set (as `hack/test.sh` does), and otherwise bring up
//! a private control plane under `target/wgmesh-test-cluster` with `hack/cluster.sh up`.

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

/// A client for the test control plane.
pub async fn client() -> Result<kube::Client> {
    let path = kubeconfig()?;
    let kc = Kubeconfig::read_from(&path).with_context(|| format!("reading {}", path.display()))?;
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
