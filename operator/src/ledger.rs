//! The subnet ledger: which node each allocated subnet is claimed for, kept in one
//! `ConfigMap` in the operator's namespace ([`LEDGER_NAME`]) and changed only by
//! compare-and-swap on its `resourceVersion`.
//!
//! A subnet is written to a peer only after the ledger holding its claim was stored, so two
//! writers that plan from different views (two replicas that both believe they lead) cannot
//! give one subnet to two nodes: the second one's swap fails, it reads the ledger again,
//! finds the subnet claimed for another node, and writes nothing. This is how the API
//! server allocates Service cluster IPs (one `RangeAllocation` object, swapped): one write
//! claims every subnet a pass allocates, instead of one object per subnet.
//!
//! Pure: parsing, printing and merging. `apply` reads and swaps the object.
//!
//! The text, `data.claims`: one line per node and claim time, sorted, e.g.
//! `node-a 1764570000 10.244.4.0/24 fd00:10:244:4::/64`. About 55 bytes per dual-stack
//! node: a `ConfigMap` (1 MiB) holds the claims of some 18,000 nodes.

use ipnet::IpNet;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use wgmesh_api::consts;
use wgmesh_core as core;

/// The ledger's `ConfigMap`, in the operator's namespace.
pub const LEDGER_NAME: &str = "wgmesh-subnet-claims";
/// The key of the claims in its `data`.
pub const LEDGER_KEY: &str = "claims";
/// What a ledger may grow to before a claim is refused: a `ConfigMap` holds 1 MiB, and the
/// rest of the object needs room.
pub const LEDGER_MAX_BYTES: usize = 960 * 1024;

/// One claim: the node a subnet was claimed for, and when (seconds since the epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub holder: String,
    pub claimed_at: u64,
}

/// The ledger as read: its claims by subnet, and the version a swap must name (`None`: the
/// object does not exist yet, and the first swap creates it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    pub entries: BTreeMap<IpNet, Entry>,
    pub resource_version: Option<String>,
}

/// A claim to take out of the ledger, only if it is still the one the plan saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removal {
    pub subnet: IpNet,
    pub holder: String,
    pub claimed_at: u64,
}

/// The verdict on one write's subnets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every subnet is claimed for the write's node.
    Ours,
    /// A subnet is claimed for another node (named): the write must not happen.
    Theirs(String),
    /// The ledger is full: nothing more can be claimed.
    Full,
}

/// A line of the text that could not be read, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    pub line: usize,
    pub text: String,
}

impl Ledger {
    /// Reads the ledger's object. Lines that do not parse (a hand edit) are left out and
    /// returned; a subnet claimed twice keeps its first claim. The next swap writes the
    /// ledger without them.
    pub fn from_object(cm: &ConfigMap) -> (Ledger, Vec<Malformed>) {
        let text = cm
            .data
            .as_ref()
            .and_then(|d| d.get(LEDGER_KEY))
            .map_or("", String::as_str);
        let (entries, malformed) = parse(text);
        (
            Ledger {
                entries,
                resource_version: cm.metadata.resource_version.clone(),
            },
            malformed,
        )
    }

    /// The object to store: this ledger's text, naming the version it replaces.
    pub fn to_object(&self, namespace: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(LEDGER_NAME.into()),
                namespace: Some(namespace.into()),
                resource_version: self.resource_version.clone(),
                labels: Some(
                    [(
                        consts::MANAGED_BY_LABEL.to_owned(),
                        consts::MANAGED_BY.to_owned(),
                    )]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            data: Some([(LEDGER_KEY.to_owned(), print(&self.entries))].into()),
            ..ConfigMap::default()
        }
    }

    /// The claims, as allocation reads them.
    pub fn claims(&self) -> Vec<core::Claim> {
        self.entries
            .iter()
            .map(|(subnet, e)| core::Claim {
                subnet: *subnet,
                holder: e.holder.clone(),
            })
            .collect()
    }

    /// Takes out the `removals` that still match, then claims each write's subnets for its
    /// node, in order: a write whose subnets are all free or already its node's gets them
    /// all ([`Verdict::Ours`]); one that meets another node's claim gets none. Returns a
    /// verdict per write and whether the ledger changed (and needs storing).
    pub fn merge(
        &mut self,
        writes: &[(&str, &[IpNet])],
        removals: &[Removal],
        now: u64,
    ) -> (Vec<Verdict>, bool) {
        let mut changed = false;
        for r in removals {
            let matches = self
                .entries
                .get(&r.subnet)
                .is_some_and(|e| e.holder == r.holder && e.claimed_at == r.claimed_at);
            if matches {
                self.entries.remove(&r.subnet);
                changed = true;
            }
        }
        let mut size = print(&self.entries).len();
        let verdicts = writes
            .iter()
            .map(|(holder, subnets)| {
                let subnets: Vec<IpNet> = subnets.iter().map(IpNet::trunc).collect();
                if let Some(other) = subnets.iter().find_map(|s| {
                    self.entries
                        .get(s)
                        .filter(|e| e.holder != *holder)
                        .map(|e| e.holder.clone())
                }) {
                    return Verdict::Theirs(other);
                }
                let new: Vec<IpNet> = subnets
                    .into_iter()
                    .filter(|s| !self.entries.contains_key(s))
                    .collect();
                if new.is_empty() {
                    return Verdict::Ours;
                }
                // An upper bound: a line of its own per write.
                let grows =
                    holder.len() + 22 + new.iter().map(|s| s.to_string().len() + 1).sum::<usize>();
                if size + grows > LEDGER_MAX_BYTES {
                    return Verdict::Full;
                }
                size += grows;
                for s in new {
                    self.entries.insert(
                        s,
                        Entry {
                            holder: (*holder).to_owned(),
                            claimed_at: now,
                        },
                    );
                }
                changed = true;
                Verdict::Ours
            })
            .collect();
        (verdicts, changed)
    }
}

/// Parses the text: the claims, and the lines that do not parse.
pub fn parse(text: &str) -> (BTreeMap<IpNet, Entry>, Vec<Malformed>) {
    let mut entries = BTreeMap::new();
    let mut malformed = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        let holder = words.next().unwrap_or_default();
        let at = words.next().and_then(|w| w.parse::<u64>().ok());
        let subnets: Result<Vec<IpNet>, _> = words.map(core::parse_network).collect();
        match (at, subnets) {
            (Some(at), Ok(subnets)) if !subnets.is_empty() && valid_holder(holder) => {
                for s in subnets {
                    entries.entry(s.trunc()).or_insert_with(|| Entry {
                        holder: holder.to_owned(),
                        claimed_at: at,
                    });
                }
            }
            _ => malformed.push(Malformed {
                line: i + 1,
                text: line.chars().take(200).collect(),
            }),
        }
    }
    (entries, malformed)
}

/// A node name as Kubernetes allows it (a DNS subdomain), which never holds whitespace.
fn valid_holder(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// Prints the claims: one line per node and claim time, in order, subnets in order.
pub fn print(entries: &BTreeMap<IpNet, Entry>) -> String {
    let mut lines: BTreeMap<(&str, u64), Vec<&IpNet>> = BTreeMap::new();
    for (subnet, e) in entries {
        lines
            .entry((e.holder.as_str(), e.claimed_at))
            .or_default()
            .push(subnet);
    }
    let mut out = String::new();
    for ((holder, at), subnets) in lines {
        let _ = write!(out, "{holder} {at}");
        for s in subnets {
            let _ = write!(out, " {s}");
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("subnet")
    }

    fn ledger(lines: &str) -> Ledger {
        let (entries, malformed) = parse(lines);
        assert!(malformed.is_empty(), "{malformed:?}");
        Ledger {
            entries,
            resource_version: Some("7".into()),
        }
    }

    #[test]
    fn the_text_reads_back_as_written() {
        let l = ledger("b 20 10.0.1.0/24 fd00:0:0:1::/64\na 10 10.0.0.0/24\n");
        assert_eq!(l.entries[&net("10.0.1.0/24")].holder, "b");
        assert_eq!(l.entries[&net("fd00:0:0:1::/64")].claimed_at, 20);
        assert_eq!(
            print(&l.entries),
            "a 10 10.0.0.0/24\nb 20 10.0.1.0/24 fd00:0:0:1::/64\n"
        );
        let object = l.to_object("ns");
        assert_eq!(object.metadata.resource_version.as_deref(), Some("7"));
        assert_eq!(Ledger::from_object(&object).0, l);
    }

    #[test]
    fn lines_that_do_not_parse_are_reported_and_left_out() {
        let (entries, malformed) = parse(
            "a 10 10.0.0.0/24\nB 10 10.0.1.0/24\nc x 10.0.2.0/24\nd 10 banana\ne 10\n\nf 10 10.0.0.0/24\n",
        );
        assert_eq!(entries.len(), 1, "{entries:?}");
        // The first claim of a subnet counts.
        assert_eq!(entries[&net("10.0.0.0/24")].holder, "a");
        let lines: Vec<usize> = malformed.iter().map(|m| m.line).collect();
        assert_eq!(lines, vec![2, 3, 4, 5]);
    }

    #[test]
    fn a_write_gets_all_its_subnets_or_none() {
        let mut l = ledger("a 10 10.0.0.0/24\n");
        let (v, changed) = l.merge(
            &[
                ("b", &[net("10.0.1.0/24"), net("fd00::/64")]),
                ("c", &[net("10.0.2.0/24"), net("10.0.0.0/24")]),
                ("a", &[net("10.0.0.0/24")]),
                ("d", &[]),
            ],
            &[],
            30,
        );
        assert_eq!(
            v,
            vec![
                Verdict::Ours,
                Verdict::Theirs("a".into()),
                Verdict::Ours,
                Verdict::Ours
            ]
        );
        assert!(changed);
        // c got nothing, not even its free subnet.
        assert!(!l.entries.contains_key(&net("10.0.2.0/24")));
        assert_eq!(l.entries[&net("fd00::/64")].claimed_at, 30);
        // Claiming what is already one's own changes nothing.
        let (v, changed) = l.clone().merge(&[("a", &[net("10.0.0.0/24")])], &[], 40);
        assert_eq!((v, changed), (vec![Verdict::Ours], false));
    }

    #[test]
    fn a_removal_takes_out_only_the_claim_the_plan_saw() {
        let mut l = ledger("a 10 10.0.0.0/24\nb 10 10.0.1.0/24\n");
        let (_, changed) = l.merge(
            &[],
            &[
                // Claimed again since (another time): kept.
                Removal {
                    subnet: net("10.0.0.0/24"),
                    holder: "a".into(),
                    claimed_at: 9,
                },
                Removal {
                    subnet: net("10.0.1.0/24"),
                    holder: "b".into(),
                    claimed_at: 10,
                },
            ],
            50,
        );
        assert!(changed);
        assert_eq!(
            l.entries.keys().copied().collect::<Vec<_>>(),
            vec![net("10.0.0.0/24")]
        );
    }

    #[test]
    fn a_full_ledger_refuses_new_claims_and_keeps_its_own() {
        let mut l = Ledger::default();
        let names: Vec<(String, IpNet)> = (0..30_000u32)
            .map(|i| {
                (
                    format!("node-with-a-long-name-{i:06}"),
                    IpNet::new(std::net::Ipv4Addr::from((10 << 24) | (i << 8)).into(), 24)
                        .expect("net"),
                )
            })
            .collect();
        let nets: Vec<[IpNet; 1]> = names.iter().map(|(_, n)| [*n]).collect();
        let writes: Vec<(&str, &[IpNet])> = names
            .iter()
            .zip(&nets)
            .map(|((h, _), n)| (h.as_str(), &n[..]))
            .collect();
        let (v, _) = l.merge(&writes, &[], 1_764_570_000);
        let full = v
            .iter()
            .position(|v| *v == Verdict::Full)
            .expect("fills up");
        assert!(v[full..].iter().all(|v| *v == Verdict::Full));
        assert!(print(&l.entries).len() <= LEDGER_MAX_BYTES);
        // What it holds is still its holders'.
        let (v, changed) = l.merge(&writes[..1], &[], 1);
        assert_eq!((v, changed), (vec![Verdict::Ours], false));
    }

    proptest! {
        /// Whatever the writes, no subnet ends up with two holders, and every `Ours` write's
        /// subnets are its node's.
        #[test]
        fn merging_never_gives_a_subnet_to_two_nodes(
            writes in proptest::collection::vec((0u8..6, proptest::collection::vec(0u8..12, 0..3)), 0..20),
        ) {
            let writes: Vec<(String, Vec<IpNet>)> = writes
                .into_iter()
                .map(|(h, s)| (
                    format!("n{h}"),
                    s.into_iter().map(|i| net(&format!("10.0.{i}.0/24"))).collect(),
                ))
                .collect();
            let refs: Vec<(&str, &[IpNet])> =
                writes.iter().map(|(h, s)| (h.as_str(), s.as_slice())).collect();
            let mut l = Ledger::default();
            let (v, _) = l.merge(&refs, &[], 1);
            for ((holder, subnets), verdict) in writes.iter().zip(&v) {
                if *verdict == Verdict::Ours {
                    for s in subnets {
                        prop_assert_eq!(&l.entries[s].holder, holder);
                    }
                }
            }
            let (back, malformed) = parse(&print(&l.entries));
            prop_assert!(malformed.is_empty());
            prop_assert_eq!(back, l.entries);
        }
    }
}
