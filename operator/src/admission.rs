//! Who may write what of a `MeshPeer` and a `MeshPeerReport`: the decisions of the validating admission webhook,
//! as pure functions of the request (caller, old and new object) and of the facts the
//! webhook looked up (the caller's node, whether a Node of that name exists).
//!
//! This module owns the trust boundary between nodes. It must not do I/O: the webhook
//! (`webhook.rs`) reads the request and looks the facts up, then asks here.
//!
//! Rules (see `docs/security.md`):
//!
//! - **The operator** may write anything: it is the authority on who is in the mesh.
//! - **A node's agent** may write only the status of its own node's peer (the peer named
//!   after the node its pod runs on, naming that node in `spec.node`), and there only what
//!   the agent publishes: keys, endpoints, its rotation, acknowledgements and its own
//!   condition types. Approvals, grants and the operator's conditions stay as they
//!   were. Its node comes from its ServiceAccount token's bound pod, which the API server
//!   signs; a token without a bound pod (a legacy Secret token) is refused.
//! - **Anyone else** (users managing external peers, cluster admins) may not write status at
//!   all, may not make or edit a node's peer beyond `spec.keyRotation`, may not give a peer
//!   the marks of a node's peer (`spec.node`, `spec.podCIDRs`, an owner reference to a Node,
//!   the node label), and may not create a peer named like an existing Node.
//! - **A node's report** (`MeshPeerReport`, what the node sees of its tunnels, which the
//!   operator reads to learn how NAT maps other nodes) is written only by that node's agent:
//!   named after its node, owned by nothing but the `MeshPeer` of that name. Nobody else may
//!   create it or change what it reports.

use k8s_openapi::api::authentication::v1::UserInfo;
use kube::ResourceExt;
use std::collections::BTreeMap;
use wgmesh_api::consts::{self, NODE_LABEL, condition};
use wgmesh_api::{Condition, MeshPeer, MeshPeerReport, MeshPeerStatus};

/// `user.extra` key of a bound token: the name of the pod it was issued for.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
/// `user.extra` key of a bound token: the uid of the pod it was issued for.
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
/// `user.extra` key of a bound token on Kubernetes 1.30 and later: the pod's node.
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";

/// Condition types the agent writes; every other type is the operator's.
pub const AGENT_CONDITIONS: &[&str] = &[
    condition::KEY_PUBLISHED,
    condition::DEVICE_UP,
    condition::ROUTES_INSTALLED,
    condition::PLAINTEXT_FALLBACK,
];

/// The ServiceAccounts of the two components, as `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identities {
    pub operator: ServiceAccount,
    pub agent: ServiceAccount,
}

/// A ServiceAccount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

impl ServiceAccount {
    /// Parses `namespace/name`.
    pub fn parse(text: &str) -> Result<ServiceAccount, String> {
        match text.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(ServiceAccount {
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(format!("{text:?} is not namespace/name")),
        }
    }

    /// The user name the API server gives the account's tokens.
    pub fn username(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.name)
    }
}

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Operator,
    /// The agent's ServiceAccount, with what its token says about its pod.
    Agent {
        pod_name: Option<String>,
        pod_uid: Option<String>,
        node_name: Option<String>,
    },
    Other(String),
}

/// Classifies the request's user.
pub fn caller(user: &UserInfo, ids: &Identities) -> Caller {
    let name = user.username.as_deref().unwrap_or_default();
    if name == ids.operator.username() {
        return Caller::Operator;
    }
    if name == ids.agent.username() {
        let extra = |key: &str| {
            user.extra
                .as_ref()
                .and_then(|e| e.get(key))
                .and_then(|v| v.first())
                .cloned()
        };
        return Caller::Agent {
            pod_name: extra(EXTRA_POD_NAME),
            pod_uid: extra(EXTRA_POD_UID),
            node_name: extra(EXTRA_NODE_NAME),
        };
    }
    Caller::Other(name.to_owned())
}

/// The webhook's answer; a denial carries the message the caller sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny(String),
}

impl Decision {
    fn deny(text: impl Into<String>) -> Decision {
        Decision::Deny(text.into())
    }
}

/// A write of a peer's status. `agent_node` is the node the agent's pod runs on, as the
/// webhook found it (`None` when it could not be established).
pub fn review_status(
    caller: &Caller,
    agent_node: Option<&str>,
    old: &MeshPeer,
    new: &MeshPeer,
) -> Decision {
    let name = old.metadata.name.as_deref().unwrap_or_default();
    match caller {
        Caller::Operator => Decision::Allow,
        Caller::Other(user) => Decision::deny(format!(
            "MeshPeer status is written only by the wgmesh operator and each node's agent, \
             not by {user}"
        )),
        Caller::Agent { .. } => {
            let Some(node) = agent_node else {
                return Decision::deny(
                    "the wgmesh agent's token is not bound to a running pod on a node \
                     (mount a projected ServiceAccount token, as the Helm chart does)",
                );
            };
            if name != node || old.spec.node.as_deref() != Some(node) {
                return Decision::deny(format!(
                    "the wgmesh agent on node {node} may write only MeshPeer {node}'s status, \
                     not {name}'s"
                ));
            }
            let empty = MeshPeerStatus::default();
            let before = old.status.as_ref().unwrap_or(&empty);
            let after = new.status.as_ref().unwrap_or(&empty);
            match operator_fields_changed(before, after) {
                Some(field) => Decision::deny(format!(
                    "the wgmesh agent on node {node} may not change status.{field}: only the \
                     operator writes it"
                )),
                None => Decision::Allow,
            }
        }
    }
}

/// A create or update of a node's report. `old` is `None` on create; `agent_node` is the
/// node the agent's pod runs on, as the webhook found it.
pub fn review_report(
    caller: &Caller,
    agent_node: Option<&str>,
    old: Option<&MeshPeerReport>,
    new: &MeshPeerReport,
) -> Decision {
    let name = new.metadata.name.as_deref().unwrap_or_default();
    match caller {
        Caller::Operator => Decision::Allow,
        // Metadata alone (the garbage collector orphaning it, a label) is no report.
        Caller::Other(_) if old.is_some_and(|o| o.spec == new.spec) => Decision::Allow,
        Caller::Other(user) => Decision::deny(format!(
            "MeshPeerReport {name} is what node {name}'s wgmesh agent sees of its tunnels; \
             only that agent writes it, not {user}"
        )),
        Caller::Agent { .. } => {
            let Some(node) = agent_node else {
                return Decision::deny(
                    "the wgmesh agent's token is not bound to a running pod on a node \
                     (mount a projected ServiceAccount token, as the Helm chart does)",
                );
            };
            if name != node {
                return Decision::deny(format!(
                    "the wgmesh agent on node {node} may write only MeshPeerReport {node}, \
                     not {name}"
                ));
            }
            let foreign = new.owner_references().iter().find(|o| {
                o.kind != "MeshPeer"
                    || o.api_version != format!("{}/{}", consts::GROUP, consts::VERSION)
                    || o.name != node
            });
            match foreign {
                Some(o) => Decision::deny(format!(
                    "the wgmesh agent on node {node} may make its report owned only by \
                     MeshPeer {node}, not by {} {}",
                    o.kind, o.name
                )),
                None => Decision::Allow,
            }
        }
    }
}

/// The first operator-owned status field that differs, if any.
fn operator_fields_changed(before: &MeshPeerStatus, after: &MeshPeerStatus) -> Option<String> {
    if before.approved != after.approved {
        return Some("approved".into());
    }
    if before.rotation_grant != after.rotation_grant {
        return Some("rotationGrant".into());
    }
    if before.observed_generation != after.observed_generation {
        return Some("observedGeneration".into());
    }
    let operators = |conditions: &[Condition]| -> BTreeMap<String, Condition> {
        conditions
            .iter()
            .filter(|c| !AGENT_CONDITIONS.contains(&c.type_.as_str()))
            .map(|c| (c.type_.clone(), c.clone()))
            .collect()
    };
    let (b, a) = (operators(&before.conditions), operators(&after.conditions));
    if b != a {
        let changed = b
            .keys()
            .chain(a.keys())
            .find(|t| b.get(*t) != a.get(*t))
            .cloned()
            .unwrap_or_default();
        return Some(format!("conditions[type={changed}]"));
    }
    None
}

/// A create or update of a peer (not its status). `old` is `None` on create;
/// `node_named_like_it` says whether a Node with the new peer's name exists.
pub fn review_peer(
    caller: &Caller,
    old: Option<&MeshPeer>,
    new: &MeshPeer,
    node_named_like_it: bool,
) -> Decision {
    let user = match caller {
        Caller::Operator => return Decision::Allow,
        Caller::Agent { .. } => {
            return Decision::deny("the wgmesh agent never writes a MeshPeer's spec");
        }
        Caller::Other(user) => user,
    };
    let name = new.metadata.name.as_deref().unwrap_or_default();
    match old {
        Some(old) if node_mark(old).is_some() => {
            if without_rotation(old) != without_rotation(new)
                || old.metadata.owner_references != new.metadata.owner_references
                || node_label(old) != node_label(new)
                || old.metadata.finalizers != new.metadata.finalizers
            {
                return Decision::deny(format!(
                    "MeshPeer {name} is node {name}'s peer, managed by the wgmesh operator; {user} \
                     may change only spec.keyRotation (to rotate the node's key)"
                ));
            }
            Decision::Allow
        }
        _ => {
            if let Some(mark) = node_mark(new) {
                return Decision::deny(format!(
                    "{mark} marks a node's peer, which only the wgmesh operator makes; an \
                     external peer sets publicKey, allowedIPs and endpoint"
                ));
            }
            if old.is_none() && node_named_like_it {
                return Decision::deny(format!(
                    "{name} is the name of a Node; a Node's name is reserved for its own \
                     MeshPeer: name the external peer differently"
                ));
            }
            Decision::Allow
        }
    }
}

/// What about `p` makes it look like a node's peer, if anything.
fn node_mark(p: &MeshPeer) -> Option<&'static str> {
    if p.spec.node.is_some() {
        return Some("spec.node");
    }
    if !p.spec.pod_cidrs.is_empty() {
        return Some("spec.podCIDRs");
    }
    if p.owner_references().iter().any(|o| o.kind == "Node") {
        return Some("an owner reference to a Node");
    }
    if node_label(p).is_some() {
        return Some("the wgmesh.dev/node label");
    }
    None
}

fn node_label(p: &MeshPeer) -> Option<&String> {
    p.metadata.labels.as_ref().and_then(|l| l.get(NODE_LABEL))
}

fn without_rotation(p: &MeshPeer) -> wgmesh_api::MeshPeerSpec {
    let mut spec = p.spec.clone();
    spec.key_rotation = None;
    spec
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
    use wgmesh_api::peer::{ApprovedPeer, PeerKeyRotation, RotationGrant};
    use wgmesh_api::{ConditionStatus, MeshPeerSpec};

    const KEY_A: &str = "mGpQp9SmU3aD4Jq0Ykwj1CzO3P0k9+4w6VvVvHXxrmI=";
    const KEY_B: &str = "hX3kLw0pQyYZ3Sx8PZ2iVt8ldl2D5cO6lGJp0m0Qk2A=";

    fn ids() -> Identities {
        Identities {
            operator: ServiceAccount::parse("wgmesh/wgmesh-operator").expect("sa"),
            agent: ServiceAccount::parse("wgmesh/wgmesh-agent").expect("sa"),
        }
    }

    fn agent() -> Caller {
        Caller::Agent {
            pod_name: Some("wgmesh-agent-x".into()),
            pod_uid: Some("pod-uid".into()),
            node_name: None,
        }
    }

    fn cond(type_: &str, status: ConditionStatus) -> Condition {
        Condition {
            type_: type_.into(),
            status,
            observed_generation: None,
            last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
            reason: "Valid".into(),
            message: String::new(),
        }
    }

    /// Node `name`'s peer as the operator made it, approved with `KEY_A`.
    fn mk_node_peer(name: &str) -> MeshPeer {
        let mut p = MeshPeer::new(
            name,
            MeshPeerSpec {
                node: Some(name.into()),
                pod_cidrs: vec!["10.244.1.0/24".into()],
                ..Default::default()
            },
        );
        p.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "v1".into(),
            kind: "Node".into(),
            name: name.into(),
            uid: format!("{name}-uid"),
            ..Default::default()
        }]);
        p.metadata.labels = Some([(NODE_LABEL.to_owned(), name.to_owned())].into());
        p.status = Some(MeshPeerStatus {
            public_key: Some(KEY_A.into()),
            endpoints: vec!["198.18.0.2:51820".into()],
            approved: Some(ApprovedPeer {
                public_key: Some(KEY_A.into()),
                allowed_ips: vec!["10.244.1.0/24".into()],
                endpoint: Some("198.18.0.2:51820".into()),
                ..Default::default()
            }),
            conditions: vec![
                cond(condition::READY, ConditionStatus::True),
                cond(condition::DEVICE_UP, ConditionStatus::True),
            ],
            ..Default::default()
        });
        p
    }

    fn mk_external(name: &str) -> MeshPeer {
        MeshPeer::new(
            name,
            MeshPeerSpec {
                public_key: Some(KEY_B.into()),
                allowed_ips: vec!["192.168.50.7/32".into()],
                ..Default::default()
            },
        )
    }

    fn status_mut(p: &mut MeshPeer) -> &mut MeshPeerStatus {
        p.status.get_or_insert_with(Default::default)
    }

    #[test]
    fn callers_are_told_apart_by_their_service_account_and_bound_pod() {
        let user = |name: &str, extra: Option<BTreeMap<String, Vec<String>>>| UserInfo {
            username: Some(name.into()),
            extra,
            ..Default::default()
        };
        assert_eq!(
            caller(
                &user("system:serviceaccount:wgmesh:wgmesh-operator", None),
                &ids()
            ),
            Caller::Operator
        );
        let bound = BTreeMap::from([
            (EXTRA_POD_NAME.to_owned(), vec!["wgmesh-agent-x".to_owned()]),
            (EXTRA_POD_UID.to_owned(), vec!["pod-uid".to_owned()]),
        ]);
        assert_eq!(
            caller(
                &user("system:serviceaccount:wgmesh:wgmesh-agent", Some(bound)),
                &ids()
            ),
            agent()
        );
        // Same name in another namespace: someone else.
        assert_eq!(
            caller(
                &user("system:serviceaccount:other:wgmesh-agent", None),
                &ids()
            ),
            Caller::Other("system:serviceaccount:other:wgmesh-agent".into())
        );
        assert!(ServiceAccount::parse("no-namespace").is_err());
    }

    #[test]
    fn an_agent_publishes_its_own_nodes_key_endpoint_and_conditions() {
        let old = mk_node_peer("n1");
        let mut new = old.clone();
        let s = status_mut(&mut new);
        s.public_key = Some(KEY_B.into());
        s.next_public_key = Some(KEY_A.into());
        s.endpoints = vec!["198.18.0.9:51820".into()];
        s.conditions[1].status = ConditionStatus::False;
        s.conditions
            .push(cond(condition::ROUTES_INSTALLED, ConditionStatus::True));
        assert_eq!(
            review_status(&agent(), Some("n1"), &old, &new),
            Decision::Allow
        );
    }

    #[test]
    fn an_agent_cannot_touch_another_nodes_peer_in_any_way() {
        let old = mk_node_peer("n2");
        let mut new = old.clone();
        status_mut(&mut new).public_key = Some(KEY_B.into());
        for (caller_node, expect) in [
            (Some("n1"), "may write only MeshPeer n1's"),
            (None, "not bound"),
        ] {
            match review_status(&agent(), caller_node, &old, &new) {
                Decision::Deny(m) => assert!(m.contains(expect), "{m}"),
                Decision::Allow => panic!("an agent of {caller_node:?} wrote n2's key"),
            }
        }
        // Not even a no-op write.
        assert!(matches!(
            review_status(&agent(), Some("n1"), &old, &old),
            Decision::Deny(_)
        ));
    }

    #[test]
    fn an_agent_cannot_approve_grant_or_judge_even_its_own_peer() {
        let old = mk_node_peer("n1");
        type Edit = fn(&mut MeshPeerStatus);
        let edits: [(&str, Edit); 5] = [
            ("approved", |s| {
                s.approved.as_mut().expect("approved").public_key = Some(KEY_B.into())
            }),
            ("approved", |s| {
                s.approved.as_mut().expect("approved").allowed_ips = vec!["0.0.0.0/1".into()]
            }),
            ("rotationGrant", |s| {
                s.rotation_grant = Some(RotationGrant {
                    generation: 0,
                    granted_at: None,
                    reason: wgmesh_api::peer::GrantReason::NodeRequest,
                })
            }),
            ("conditions[type=Ready]", |s| {
                s.conditions[0].status = ConditionStatus::False
            }),
            ("conditions[type=Allocated]", |s| {
                s.conditions
                    .push(cond(condition::ALLOCATED, ConditionStatus::True))
            }),
        ];
        for (field, edit) in edits {
            let mut new = old.clone();
            edit(status_mut(&mut new));
            match review_status(&agent(), Some("n1"), &old, &new) {
                Decision::Deny(m) => assert!(m.contains(&format!("status.{field}")), "{m}"),
                Decision::Allow => panic!("the agent changed {field}"),
            }
        }
    }

    #[test]
    fn only_the_operator_and_agents_write_status() {
        let old = mk_node_peer("n1");
        let mut new = old.clone();
        status_mut(&mut new).endpoints = vec!["203.0.113.9:51820".into()];
        assert_eq!(
            review_status(&Caller::Operator, None, &old, &new),
            Decision::Allow
        );
        assert!(matches!(
            review_status(&Caller::Other("alice".into()), None, &old, &new),
            Decision::Deny(m) if m.contains("alice")
        ));
    }

    #[test]
    fn users_rotate_a_nodes_key_but_change_nothing_else_of_its_peer() {
        let old = mk_node_peer("n1");
        let alice = Caller::Other("alice".into());
        let mut rotate = old.clone();
        rotate.spec.key_rotation = Some(PeerKeyRotation {
            requested_at: Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)),
            revoke: Some(true),
        });
        assert_eq!(
            review_peer(&alice, Some(&old), &rotate, true),
            Decision::Allow
        );

        let mut subnets = old.clone();
        subnets.spec.pod_cidrs = vec!["10.244.0.0/16".into()];
        let mut unowned = old.clone();
        unowned.metadata.owner_references = None;
        let mut finalizers = old.clone();
        finalizers.metadata.finalizers = Some(vec!["x".into()]);
        for new in [subnets, unowned, finalizers] {
            assert!(matches!(
                review_peer(&alice, Some(&old), &new, true),
                Decision::Deny(m) if m.contains("spec.keyRotation")
            ));
        }
        assert!(matches!(
            review_peer(&agent(), Some(&old), &rotate, true),
            Decision::Deny(_)
        ));
        assert_eq!(
            review_peer(&Caller::Operator, Some(&old), &old, true),
            Decision::Allow
        );
    }

    #[test]
    fn an_external_peer_cannot_wear_a_nodes_marks_or_take_a_nodes_name() {
        let alice = Caller::Other("alice".into());
        assert_eq!(
            review_peer(&alice, None, &mk_external("laptop"), false),
            Decision::Allow
        );
        assert!(matches!(
            review_peer(&alice, None, &mk_external("n3"), true),
            Decision::Deny(m) if m.contains("name of a Node")
        ));
        // A node that has not joined yet cannot be known here: the operator replaces such a
        // peer when the node joins.
        assert_eq!(
            review_peer(&alice, None, &mk_external("n9"), false),
            Decision::Allow
        );
        let marks: [fn(&mut MeshPeer); 4] = [
            |p| p.spec.node = Some("n1".into()),
            |p| p.spec.pod_cidrs = vec!["10.244.1.0/24".into()],
            |p| p.metadata.owner_references = mk_node_peer("n1").metadata.owner_references,
            |p| p.metadata.labels = mk_node_peer("n1").metadata.labels,
        ];
        for mark in marks {
            let mut new = mk_external("laptop");
            mark(&mut new);
            assert!(matches!(
                review_peer(&alice, None, &new, false),
                Decision::Deny(m) if m.contains("only the wgmesh operator makes")
            ));
            let old = mk_external("laptop");
            assert!(matches!(
                review_peer(&alice, Some(&old), &new, false),
                Decision::Deny(_)
            ));
        }
    }

    fn mk_report(name: &str, owner: (&str, &str)) -> MeshPeerReport {
        let mut r = MeshPeerReport::new(
            name,
            wgmesh_api::MeshPeerReportSpec {
                path_summary: Some("2 Direct".into()),
                ..Default::default()
            },
        );
        r.metadata.owner_references = Some(vec![OwnerReference {
            api_version: if owner.0 == "MeshPeer" {
                "wgmesh.dev/v1alpha1".into()
            } else {
                "v1".into()
            },
            kind: owner.0.into(),
            name: owner.1.into(),
            uid: "u".into(),
            ..Default::default()
        }]);
        r
    }

    #[test]
    fn only_a_nodes_own_agent_writes_its_report_owned_by_its_own_peer() {
        let own = mk_report("n1", ("MeshPeer", "n1"));
        assert_eq!(
            review_report(&agent(), Some("n1"), None, &own),
            Decision::Allow
        );
        assert_eq!(
            review_report(&agent(), Some("n1"), Some(&own), &own),
            Decision::Allow
        );
        // Another node's report, or one the agent's node cannot be established for.
        let other = mk_report("n2", ("MeshPeer", "n2"));
        assert!(matches!(
            review_report(&agent(), Some("n1"), None, &other),
            Decision::Deny(m) if m.contains("only MeshPeerReport n1")
        ));
        assert!(matches!(
            review_report(&agent(), None, None, &own),
            Decision::Deny(m) if m.contains("not bound to a running pod")
        ));
        // Owned by anything but its own node's peer.
        for owner in [("MeshPeer", "n2"), ("Node", "n1"), ("Pod", "x")] {
            assert!(matches!(
                review_report(&agent(), Some("n1"), None, &mk_report("n1", owner)),
                Decision::Deny(m) if m.contains("owned only by MeshPeer n1")
            ));
        }
        // Nobody else makes or edits a report; metadata alone may change (the garbage
        // collector orphaning it).
        let admin = Caller::Other("alice".into());
        assert!(matches!(
            review_report(&admin, None, None, &own),
            Decision::Deny(m) if m.contains("only that agent writes it")
        ));
        let mut forged = own.clone();
        forged.spec.path_summary = Some("2 Relay".into());
        assert!(matches!(
            review_report(&admin, None, Some(&own), &forged),
            Decision::Deny(_)
        ));
        let mut orphaned = own.clone();
        orphaned.metadata.owner_references = None;
        assert_eq!(
            review_report(&admin, None, Some(&own), &orphaned),
            Decision::Allow
        );
        assert_eq!(
            review_report(&Caller::Operator, None, None, &forged),
            Decision::Allow
        );
    }
}
