//! A cluster of real kubelet nodes brought up by `hack/nodes.sh` (control plane, scheduler,
//! and per node its own network namespace, mount namespace, containerd and kubelet), with
//! the tools a person uses on one: kubectl, helm, commands inside a node, commands inside a
//! pod's network namespace, tcpdump on the underlay.

use crate::netns::{Capture, capture_in, down_unless_kept, log_tails, ok, run};
use crate::{repo_root, tool, unique_name};
use anyhow::{Context, Result, bail};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};

/// A cluster brought up by `hack/nodes.sh up`, torn down when dropped.
#[derive(Debug)]
pub struct Cluster {
    pub dir: PathBuf,
    /// What `hack/nodes.sh env` prints, as KEY → value.
    pub env: BTreeMap<String, String>,
    /// A step failed (see [`Cluster::check`]).
    failed: Cell<bool>,
}

/// Parses `KEY=value` lines (values optionally quoted), as `hack/nodes.sh env` prints them.
pub fn parse_env(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("export ").or(Some(l.trim())))
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .map(|(k, v)| {
            let v = v.trim();
            let v = v
                .strip_prefix('\'')
                .and_then(|v| v.strip_suffix('\''))
                .or_else(|| v.strip_prefix('"').and_then(|v| v.strip_suffix('"')))
                .unwrap_or(v);
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

impl Cluster {
    /// `hack/nodes.sh up --nodes N` in a fresh directory.
    pub fn up(nodes: usize) -> Result<Cluster> {
        let dir = std::env::temp_dir().join(unique_name("wgmesh-nodes"));
        let mut cluster = Cluster {
            dir,
            env: BTreeMap::new(),
            failed: Cell::new(false),
        };
        let out = run(Command::new("bash")
            .arg(repo_root().join("hack/nodes.sh"))
            .args(["up", "--nodes", &nodes.to_string(), "--dir"])
            .arg(&cluster.dir))?;
        if !out.status.success() {
            bail!(
                "hack/nodes.sh up failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        cluster.env = parse_env(&cluster.script(&["env"])?);
        Ok(cluster)
    }

    /// Runs `hack/nodes.sh ARGS --dir DIR` and returns its stdout.
    pub fn script(&self, args: &[&str]) -> Result<String> {
        ok(Command::new("bash")
            .arg(repo_root().join("hack/nodes.sh"))
            .args(args)
            .arg("--dir")
            .arg(&self.dir))
    }

    /// A value of `hack/nodes.sh env`.
    pub fn var(&self, key: &str) -> Result<&str> {
        self.env
            .get(key)
            .map(String::as_str)
            .with_context(|| format!("hack/nodes.sh env has no {key}: {:?}", self.env))
    }

    pub fn kubeconfig(&self) -> Result<&str> {
        self.var("KUBECONFIG")
    }

    /// kubectl against this cluster; fails unless it succeeds.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        ok(Command::new("kubectl")
            .env("KUBECONFIG", self.kubeconfig()?)
            .args(args))
    }

    /// kubectl against this cluster, whatever its outcome.
    pub fn kubectl_output(&self, args: &[&str]) -> Result<Output> {
        run(Command::new("kubectl")
            .env("KUBECONFIG", self.kubeconfig()?)
            .args(args))
    }

    /// helm against this cluster; fails unless it succeeds.
    pub fn helm(&self, args: &[&str]) -> Result<String> {
        ok(Command::new(tool("helm")?)
            .env("KUBECONFIG", self.kubeconfig()?)
            .args(args))
    }

    /// A command run inside node `node` (its network and mount namespaces).
    pub fn node_exec(&self, node: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("bash");
        cmd.arg(repo_root().join("hack/nodes.sh"))
            .args(["exec", node, "--dir"])
            .arg(&self.dir)
            .arg("--")
            .args(args);
        cmd
    }

    /// Runs `args` inside node `node`; fails unless it succeeds.
    pub fn on_node(&self, node: &str, args: &[&str]) -> Result<String> {
        ok(self.node_exec(node, args))
    }

    /// The network namespace of a running pod, as a path the host can enter: its first
    /// container's process, found through the node's containerd.
    pub fn pod_netns(&self, namespace: &str, pod: &str) -> Result<PathBuf> {
        let found = self.kubectl(&[
            "get",
            "pod",
            "-n",
            namespace,
            pod,
            "-o",
            "jsonpath={.spec.nodeName} {.status.containerStatuses[0].containerID}",
        ])?;
        let (node, id) = found.split_once(' ').unwrap_or((found.as_str(), ""));
        let id = id
            .strip_prefix("containerd://")
            .with_context(|| format!("pod {pod} has no containerd container yet ({id:?})"))?;
        let tasks = self.on_node(node, &["ctr", "-n", "k8s.io", "tasks", "ls"])?;
        let pid = tasks
            .lines()
            .find(|l| l.starts_with(id))
            .and_then(|l| l.split_whitespace().nth(1))
            .with_context(|| format!("no task {id} on {node}: {tasks}"))?;
        Ok(PathBuf::from(format!("/proc/{pid}/ns/net")))
    }

    /// A command run on the host inside a pod's network namespace (e.g. iputils' ping,
    /// which can send 100 packets a second where busybox's cannot).
    pub fn pod_exec(&self, namespace: &str, pod: &str, args: &[&str]) -> Result<Command> {
        let netns = self.pod_netns(namespace, pod)?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", netns.display())).args(args);
        Ok(cmd)
    }

    /// Starts tcpdump on the underlay bridge.
    pub fn capture(&self, name: &str) -> Result<Capture> {
        capture_in(
            self.var("UNDERLAY_NETNS")?,
            self.var("UNDERLAY_BRIDGE")?,
            &self.dir,
            name,
        )
    }

    /// Passes `result` through; an error first prints what a person would look at (the
    /// logs, pods, nodes, peers, Events) and marks the cluster failed, so that
    /// `WGMESH_E2E_KEEP` keeps it running.
    pub fn check<T>(&self, result: Result<T>) -> Result<T> {
        if result.is_err() && !self.failed.replace(true) {
            self.diagnose();
        }
        result
    }

    fn diagnose(&self) {
        eprintln!("{}", self.logs());
        for args in [
            &["get", "pods", "-A", "-o", "wide"][..],
            &["get", "nodes", "-o", "wide"],
            &["get", "meshpeers", "-o", "wide"],
            &["get", "events", "-A"],
        ] {
            if let Ok(out) = self.kubectl_output(args) {
                eprintln!(
                    "$ kubectl {}\n{}{}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }

    /// The logs a person would read when something failed.
    pub fn logs(&self) -> String {
        log_tails(&self.dir.join("logs"), 30)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.failed.replace(true) {
            self.diagnose();
        }
        down_unless_kept("nodes.sh", &self.dir, self.failed.get());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_lines_with_and_without_quotes_or_export() {
        let env = parse_env("KUBECONFIG=/tmp/x/kubeconfig\nexport A='b c'\nB=\"d\"\n# note\n");
        assert_eq!(env["KUBECONFIG"], "/tmp/x/kubeconfig");
        assert_eq!(env["A"], "b c");
        assert_eq!(env["B"], "d");
        assert_eq!(env.len(), 3);
    }
}
