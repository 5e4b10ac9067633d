//! Masquerading pod traffic that leaves the mesh, with nftables: packets from the node's pod
//! subnets to anything outside the mesh's address space (every pool and every approved
//! peer's allowed IPs) leave with the node's address. Pod-to-pod traffic keeps pod
//! addresses. The agent owns the `inet wgmesh` table and nothing else.
//!
//! The table is read back every pass ([`apply`]): one that was deleted or changed behind
//! the agent's back (`nft flush ruleset`, a firewall manager) is loaded again. nftables sits
//! behind [`Firewall`] ([`Nft`] runs `nft`; the tests use an in-memory one).

use ipnet::IpNet;
use std::io::Write;
use std::process::{Command, Stdio};

/// The nftables table the agent owns.
pub const TABLE: &str = "wgmesh";

/// The ruleset for `pod_subnets` masquerading to everything outside `mesh`, or an empty
/// table when `enabled` is false.
pub fn ruleset(enabled: bool, pod_subnets: &[IpNet], mesh: &[IpNet]) -> String {
    // Aggregated: a node subnet inside a pool adds nothing, so the table holds the pools and
    // what lies outside them (external peers, `ipam.source: NodeSpec`), not an entry per
    // node, and a node joining inside a pool leaves it as it is.
    let mesh = IpNet::aggregate(&mesh.to_vec());
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
            let mesh = set(&mesh, v6);
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

/// What the agent reads from and writes to nftables.
pub(crate) trait Firewall {
    /// Loads a ruleset (`nft -f -`): all of it, or nothing.
    fn load(&self, ruleset: &str) -> Result<(), MasqueradeError>;
    /// The agent's table as the kernel has it (`nft list table inet wgmesh`), `None` if it
    /// is not there.
    fn listing(&self) -> Result<Option<String>, MasqueradeError>;
}

/// The real nftables, through the `nft` command.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Nft;

impl Firewall for Nft {
    fn load(&self, ruleset: &str) -> Result<(), MasqueradeError> {
        load(ruleset)
    }

    fn listing(&self) -> Result<Option<String>, MasqueradeError> {
        let out = Command::new("nft")
            .args(["list", "table", "inet", TABLE])
            .output()
            .map_err(MasqueradeError::Spawn)?;
        if out.status.success() {
            return Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()));
        }
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("No such file or directory") {
            Ok(None)
        } else {
            Err(MasqueradeError::Refused(err.trim().to_owned()))
        }
    }
}

/// A ruleset the agent loaded, and the table as the kernel listed it right after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Loaded {
    pub ruleset: String,
    pub listing: String,
}

/// What [`apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Applied {
    /// The table is as loaded: nothing written.
    Unchanged,
    /// The ruleset is new (the first pass, or the mesh changed).
    Loaded,
    /// The ruleset is the same, but the table was gone or changed: loaded again.
    Repaired,
}

/// Brings the agent's table to `wanted`, reading it back first. Returns the new record
/// (unchanged on error: the next pass tries again).
pub(crate) fn apply<F: Firewall>(
    fw: &F,
    wanted: &str,
    loaded: Option<&Loaded>,
) -> Result<(Applied, Loaded), MasqueradeError> {
    let now = fw.listing()?;
    let what = match loaded {
        Some(l) if l.ruleset == wanted && now.as_deref() == Some(l.listing.as_str()) => {
            return Ok((Applied::Unchanged, l.clone()));
        }
        Some(l) if l.ruleset == wanted => Applied::Repaired,
        _ => Applied::Loaded,
    };
    fw.load(wanted)?;
    let listing = fw.listing()?.unwrap_or_default();
    Ok((
        what,
        Loaded {
            ruleset: wanted.to_owned(),
            listing,
        },
    ))
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
    use std::sync::Mutex;

    /// nftables in memory: the table is the loaded ruleset, whitespace-normalized as a
    /// listing would be; loads are counted; the table can be changed behind its back.
    #[derive(Default)]
    struct FakeFirewall {
        table: Mutex<Option<String>>,
        loads: Mutex<usize>,
        refuse: bool,
    }

    impl Firewall for FakeFirewall {
        fn load(&self, ruleset: &str) -> Result<(), MasqueradeError> {
            if self.refuse {
                return Err(MasqueradeError::Refused("injected".into()));
            }
            *self.loads.lock().expect("lock") += 1;
            let listing: Vec<&str> = ruleset
                .lines()
                .map(str::trim)
                .filter(|l| !l.starts_with("add table") && !l.starts_with("delete table"))
                .collect();
            *self.table.lock().expect("lock") = Some(listing.join("\n"));
            Ok(())
        }

        fn listing(&self) -> Result<Option<String>, MasqueradeError> {
            Ok(self.table.lock().expect("lock").clone())
        }
    }

    #[test]
    fn the_table_is_loaded_once_and_again_only_when_it_changed_or_went() {
        let fw = FakeFirewall::default();
        let pods = ["10.244.1.0/24".parse().expect("net")];
        let mesh = ["10.244.0.0/16".parse().expect("net")];
        let want = ruleset(true, &pods, &mesh);
        let (what, loaded) = apply(&fw, &want, None).expect("load");
        assert_eq!(what, Applied::Loaded);
        let (what, loaded) = apply(&fw, &want, Some(&loaded)).expect("apply");
        assert_eq!(what, Applied::Unchanged);
        assert_eq!(*fw.loads.lock().expect("lock"), 1);

        // `nft flush ruleset`: the table is gone, and comes back.
        *fw.table.lock().expect("lock") = None;
        let (what, loaded) = apply(&fw, &want, Some(&loaded)).expect("repair");
        assert_eq!(what, Applied::Repaired);
        // A rule changed behind the agent's back.
        *fw.table.lock().expect("lock") = Some("table inet wgmesh {}".into());
        let (what, loaded) = apply(&fw, &want, Some(&loaded)).expect("repair");
        assert_eq!(what, Applied::Repaired);
        // The mesh grew: a new ruleset.
        let wider = ruleset(true, &pods, &["10.0.0.0/8".parse().expect("net")]);
        let (what, _) = apply(&fw, &wider, Some(&loaded)).expect("load");
        assert_eq!(what, Applied::Loaded);
        assert_eq!(*fw.loads.lock().expect("lock"), 4);
    }

    #[test]
    fn a_refused_load_keeps_nothing() {
        let fw = FakeFirewall {
            refuse: true,
            ..FakeFirewall::default()
        };
        assert!(apply(&fw, &ruleset(false, &[], &[]), None).is_err());
        assert_eq!(*fw.table.lock().expect("lock"), None);
    }

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

    #[test]
    fn node_subnets_inside_a_pool_add_nothing_to_the_table() {
        let pods = [
            "10.244.1.0/24".parse().expect("net"),
            "fd00:10:244:1::/64".parse().expect("net"),
        ];
        let pools = [
            "10.244.0.0/16".parse().expect("net"),
            "fd00:10:244::/56".parse().expect("net"),
        ];
        let mut mesh: Vec<IpNet> = pools.to_vec();
        let alone = ruleset(true, &pods, &mesh);
        // A thousand nodes inside the pools, and one peer outside them.
        for i in 0..1000u32 {
            mesh.push(format!("10.244.{}.0/24", i % 256).parse().expect("net"));
            mesh.push(
                format!("fd00:10:244:{:x}::/64", i % 256)
                    .parse()
                    .expect("net"),
            );
        }
        assert_eq!(ruleset(true, &pods, &mesh), alone);
        mesh.push("10.250.0.7/32".parse().expect("net"));
        let r = ruleset(true, &pods, &mesh);
        assert!(
            r.contains("ip daddr != { 10.244.0.0/16, 10.250.0.7/32 } masquerade"),
            "{r}"
        );
        assert!(
            r.contains("ip6 daddr != { fd00:10:244::/56 } masquerade"),
            "{r}"
        );
    }
}
