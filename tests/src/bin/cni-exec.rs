//! `cni-exec`: runs a CNI network configuration list the way a container runtime does
//! (libcni's semantics): each plugin of the list in order for ADD (each getting the previous
//! plugin's result as `prevResult`), in reverse order for DEL, with the CNI environment
//! variables set. Prints the final result of ADD.
//!
//! Usage: cni-exec add|del CONFLIST NETNS_PATH CONTAINER_ID [IFNAME]
//! Plugins are looked up in $CNI_PATH (default /usr/lib/cni).

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::io::Write;
use std::process::{Command, Stdio};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [cmd, conflist, netns, container, rest @ ..] = args.as_slice() else {
        bail!("usage: cni-exec add|del CONFLIST NETNS_PATH CONTAINER_ID [IFNAME]");
    };
    let ifname = rest.first().map_or("eth0", String::as_str);
    let command = match cmd.as_str() {
        "add" => "ADD",
        "del" => "DEL",
        other => bail!("unknown command {other}: add or del"),
    };
    let list: Value = serde_json::from_str(
        &std::fs::read_to_string(conflist).with_context(|| format!("reading {conflist}"))?,
    )
    .with_context(|| format!("parsing {conflist}"))?;
    let version = list["cniVersion"].clone();
    let name = list["name"].clone();
    let mut plugins: Vec<Value> = list["plugins"].as_array().cloned().unwrap_or_default();
    if command == "DEL" {
        plugins.reverse();
    }
    let cni_path = std::env::var("CNI_PATH").unwrap_or_else(|_| "/usr/lib/cni".into());
    let mut prev: Option<Value> = None;
    for mut plugin in plugins {
        let kind = plugin["type"]
            .as_str()
            .context("a plugin without type")?
            .to_owned();
        plugin["cniVersion"] = version.clone();
        plugin["name"] = name.clone();
        if let Some(p) = &prev {
            plugin["prevResult"] = p.clone();
        }
        let bin = cni_path
            .split(':')
            .map(|d| std::path::Path::new(d).join(&kind))
            .find(|p| p.exists())
            .with_context(|| format!("CNI plugin {kind} not found in {cni_path} (install containernetworking-plugins)"))?;
        let mut child = Command::new(&bin)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", ifname)
            .env("CNI_PATH", &cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", bin.display()))?;
        child
            .stdin
            .take()
            .context("plugin stdin")?
            .write_all(plugin.to_string().as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "{kind} {command} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if command == "ADD" {
            let result: Value = serde_json::from_slice(&out.stdout).with_context(|| {
                format!(
                    "{kind} printed no result: {}",
                    String::from_utf8_lossy(&out.stdout)
                )
            })?;
            prev = Some(result);
        }
    }
    println!("{}", prev.unwrap_or_else(|| json!({})));
    Ok(())
}
