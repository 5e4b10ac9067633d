//! Masquerading pod traffic that leaves the mesh, with nftables: packets from the node's pod
//! subnets to anything outside the mesh's address space (every pool and every approved
//! peer's allowed IPs) leave with the node's address. Pod-to-pod traffic keeps pod
//! addresses. The agent owns the `inet wgmesh` table and nothing else.

use ipnet::IpNet;
use std::io::Write;
use std::process::{Command, Stdio};

/// The nftables table the agent owns.
pub const TABLE: &str = "wgmesh";

/// The ruleset for `pod_subnets` masquerading to everything outside `mesh`, or an empty
/// table when `enabled` is false.
pub fn ruleset(enabled: bool, pod_subnets: &[IpNet], mesh: &[IpNet]) -> String {
    let set = |nets: &[IpNet], v6: bool| -> String {
        let items: Vec<String> = nets
            .iter()
            .filter(|n| matches!(n, IpNet::V6(_)) == v6)
            .map(|n| n.trunc().to_string())
            .collect();
        items.join(", ")
    };
    let mut rules = String::new();
    if enabled {
        for (v6, fam) in [(false, "ip"), (true, "ip6")] {
            let pods = set(pod_subnets, v6);
            if pods.is_empty() {
                continue;
            }
            let mesh = set(mesh, v6);
            if mesh.is_empty() {
                rules.push_str(&format!("\t\t{fam} saddr {{ {pods} }} masquerade\n"));
            } else {
                rules.push_str(&format!(
                    "\t\t{fam} saddr {{ {pods} }} {fam} daddr != {{ {mesh} }} masquerade\n"
                ));
            }
        }
    }
    // `add table` then `delete table` makes the load idempotent whether or not it exists.
    format!(
        "add table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n\
         \tchain postrouting {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n{rules}\t}}\n}}\n"
    )
}

/// Errors loading the ruleset.
#[derive(Debug, thiserror::Error)]
pub enum MasqueradeError {
    #[error("running nft (install nftables): {0}")]
    Spawn(#[source] std::io::Error),
    #[error("nft refused the ruleset: {0}")]
    Refused(String),
}

/// Removes the agent's table (an uninstall); a table that is not there is no error.
pub fn remove() -> Result<(), MasqueradeError> {
    load(&format!(
        "add table inet {TABLE}\ndelete table inet {TABLE}\n"
    ))
}

/// Loads `ruleset` with `nft -f -`.
pub fn load(ruleset: &str) -> Result<(), MasqueradeError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(MasqueradeError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(ruleset.as_bytes())
            .map_err(MasqueradeError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(MasqueradeError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(MasqueradeError::Refused(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masquerades_pods_to_the_outside_only() {
        let pods = ["10.244.1.0/24".parse().expect("net")];
        let mesh = [
            "10.244.0.0/16".parse().expect("net"),
            "10.250.0.7/32".parse().expect("net"),
        ];
        let r = ruleset(true, &pods, &mesh);
        assert!(
            r.contains(
                "ip saddr { 10.244.1.0/24 } ip daddr != { 10.244.0.0/16, 10.250.0.7/32 } masquerade"
            ),
            "{r}"
        );
        assert!(!r.contains("ip6 saddr"));
        assert!(!ruleset(false, &pods, &mesh).contains("masquerade"));
    }
}
