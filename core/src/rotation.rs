//! Key rotation decisions: which nodes are due and may start (the operator's schedule), and
//! what a rotating node does next (the agent's step), as pure functions of persisted state,
//! observations and the time.
//!
//! This module owns the rotation protocol's decisions. It must not generate keys, touch the
//! device or write status: it returns [`Action`]s and the next [`Phase`]. The agent persists
//! the phase together with its keys in one atomic write (generating the next key and entering
//! `Prepared` is one write; retiring the old key and entering `Steady` is another), and a
//! phase re-issues every action a crash could have lost, so a restarted agent resumes.
//!
//! The protocol, for one node `n` rotating from key generation `g` to `g+1`:
//!
//! 1. **Prepare** (`Steady` → `Prepared`): once the operator grants `n` a rotation slot, the
//!    agent generates the next key, persists it beside the current one and publishes only its
//!    public half as `nextPublicKey`.
//! 2. **Distribute**: the operator validates and approves the next key; every other agent
//!    then accepts handshakes from `n` under either key and acknowledges generation `g+1`.
//! 3. **Switch** (`Prepared` → `Switched`): when every peer acknowledged — or the ack timeout
//!    passed, naming the laggards — `n` initiates with the new key, still answering
//!    handshakes addressed to the old one.
//! 4. **Retire** (`Switched` → `Steady(g+1)`): when every peer has completed a handshake with
//!    the new key — or the move timeout passed, naming the laggards — the old key is zeroed
//!    and deleted and the generation bumped.
//!
//! A **revocation** ([`Due::Revoke`]) walks the same four steps, so node peers lose nothing,
//! but retires differently: no key the node held before stays answered after step 4 (see
//! [`previous_after_retire`]). Whether a rotation is one is decided when it is granted and
//! carried in the persisted [`Phase`] to its retirement, so neither a crash nor a grant that
//! disappears mid-rotation turns a revocation into a graceful rotation.
//!
//! A rotation that is due again while one is under way does not restart it: due-ness is
//! judged against the key's creation time, and the next key is created after the request.
//!
//! Crashes: `PrepareNext` and `Switch` are re-issued by the persisted phase; the effects of
//! `Retire`, `Abandon` and `Laggards` (the key swap, the discarded next key, the names) are
//! stored in the same atomic write as the phase they lead to, so they are never lost.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

/// How much of the interval a node's deterministic jitter may add: up to a tenth.
const JITTER_FRACTION: u64 = 10;

/// The rotation settings of the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Rotate every key created before this instant (`Mesh.spec.keyRotation.requestedAt`).
    pub mesh_requested_at: Option<SystemTime>,
    /// The Mesh's request is a revocation (`Mesh.spec.keyRotation.revoke`).
    pub mesh_revoke: bool,
    /// Rotate each key when it gets this old.
    pub interval: Option<Duration>,
    /// How many nodes may rotate at once (at least 1).
    pub max_concurrent: usize,
}

/// What the operator knows about one node's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeKeyView {
    /// The node's peer name.
    pub name: String,
    /// When its current key was created.
    pub key_created_at: SystemTime,
    /// The node's own request (`MeshPeer.spec.keyRotation.requestedAt`).
    pub requested_at: Option<SystemTime>,
    /// The node's own request is a revocation (`MeshPeer.spec.keyRotation.revoke`).
    pub revoke: bool,
    /// Whether it is rotating now (it holds a grant, or announced a next key).
    pub rotating: bool,
    /// When its last rotation of the current key was abandoned (its next key was never
    /// approved): only a request made after that instant starts another.
    pub abandoned_at: Option<SystemTime>,
}

/// A node's deterministic jitter: the same node always gets the same share of the interval,
/// so restarts of the operator do not reshuffle the schedule.
pub fn jitter(name: &str, interval: Duration) -> Duration {
    // FNV-1a: stable across platforms and releases, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let max = interval.as_millis() / u128::from(JITTER_FRACTION);
    let max = u64::try_from(max).unwrap_or(u64::MAX);
    if max == 0 {
        return Duration::ZERO;
    }
    Duration::from_millis(h % max)
}

/// Why a node is due for rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Due {
    /// Its key predates a request (its `MeshPeer`'s or the `Mesh`'s) that asks for a
    /// revocation: once the rotation completes, no earlier key of the node is answered.
    Revoke,
    /// Its key predates a request on its `MeshPeer`.
    NodeRequest,
    /// Its key predates the `Mesh`'s request.
    MeshRequest,
    /// Its key is older than the interval (plus its jitter).
    Interval,
}

impl Due {
    /// Whether a rotation for this reason is a revocation.
    pub fn revokes(self) -> bool {
        self == Due::Revoke
    }
}

/// Whether `node` is due at `now`, and why. A node whose rotation was abandoned is due
/// again only by a request made after the abandonment: retrying at once would repeat what
/// failed and hold a rotation slot for ever. A pending request that asks for a revocation
/// makes the rotation one, whichever other reasons also apply: a key that may be stolen
/// must not stay answered because someone also asked for an ordinary rotation.
pub fn due(node: &NodeKeyView, policy: &Policy, now: SystemTime) -> Option<Due> {
    let after = |r: SystemTime| {
        node.key_created_at < r && r <= now && node.abandoned_at.is_none_or(|a| a < r)
    };
    let node_request = node.requested_at.is_some_and(after);
    let mesh_request = policy.mesh_requested_at.is_some_and(after);
    if (node_request && node.revoke) || (mesh_request && policy.mesh_revoke) {
        return Some(Due::Revoke);
    }
    if node_request {
        return Some(Due::NodeRequest);
    }
    if mesh_request {
        return Some(Due::MeshRequest);
    }
    if node.abandoned_at.is_some() {
        return None;
    }
    let interval = policy.interval?;
    let at = node
        .key_created_at
        .checked_add(interval)?
        .checked_add(jitter(&node.name, interval))?;
    (at <= now).then_some(Due::Interval)
}

/// The operator's schedule: the nodes that may start rotating now, so that at most
/// `max_concurrent` rotate at once. Revocations go first, then the other due nodes; within
/// each, oldest key first, then by name.
///
/// A revocation waits for a free slot like any rotation: `max_concurrent` bounds how many
/// nodes' keys are in flight at once, which a mesh-wide revocation must respect as much as a
/// mesh-wide rotation, and a slot frees within the acknowledge and move timeouts. It does
/// jump the queue, so it never waits behind a backlog of ordinary rotations.
pub fn schedule(nodes: &[NodeKeyView], policy: &Policy, now: SystemTime) -> Vec<(String, Due)> {
    let busy = nodes.iter().filter(|n| n.rotating).count();
    let free = policy.max_concurrent.max(1).saturating_sub(busy);
    let mut candidates: Vec<(&NodeKeyView, Due)> = nodes
        .iter()
        .filter(|n| !n.rotating)
        .filter_map(|n| due(n, policy, now).map(|d| (n, d)))
        .collect();
    candidates.sort_by(|(a, da), (b, db)| {
        (!da.revokes(), a.key_created_at, &a.name).cmp(&(!db.revokes(), b.key_created_at, &b.name))
    });
    candidates
        .into_iter()
        .take(free)
        .map(|(n, d)| (n.name.clone(), d))
        .collect()
}

/// Whether a rotation grant is in force for a node: a grant is for one key (the generation it
/// names), and a grant given before that key's last rotation was abandoned is spent, so only
/// a new request (a new grant) starts another. The agent reads its grant with this, and the
/// operator keeps a grant only while it holds.
pub fn grant_in_force(
    grant_generation: i64,
    granted_at: Option<SystemTime>,
    generation: i64,
    abandoned_at: Option<SystemTime>,
) -> bool {
    grant_generation == generation && abandoned_at.is_none_or(|a| granted_at.is_some_and(|t| t > a))
}

/// Where a node is in its own rotation; persisted with its keys. `revoke`: the rotation is
/// a revocation (its grant said so when it started), and retires accordingly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// One key, generation `generation`.
    Steady { generation: i64 },
    /// The next key exists and is published; waiting for approval and acknowledgements
    /// since `since`.
    Prepared {
        generation: i64,
        since: SystemTime,
        revoke: bool,
    },
    /// Initiating with the next key since `since`; still answering under the old one.
    Switched {
        generation: i64,
        since: SystemTime,
        revoke: bool,
    },
}

/// What the agent observes about its own rotation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observation {
    /// The operator granted this node a rotation slot.
    pub granted: bool,
    /// The grant is for a revocation ([`Due::Revoke`]). Read only when the rotation starts:
    /// what it started as is persisted in its phase.
    pub revoke: bool,
    /// The operator approved this node's published next key.
    pub next_approved: bool,
    /// The peers that must move (every ready node peer but this one).
    pub peers: BTreeSet<String>,
    /// Peers that installed this node's next key (acknowledged generation + 1).
    pub acknowledged: BTreeSet<String>,
    /// Peers that completed a handshake with this node's next key.
    pub moved: BTreeSet<String>,
    /// Since when the agent's view of the API has been current without a break (its last
    /// request answered moments ago); `None` while it is not. Grants, approvals and
    /// acknowledgements come through the API, so their absence means something only while
    /// the view is current: the timeouts run only then, counted from the later of the phase's
    /// start and this instant. An API outage of any length therefore never makes laggards,
    /// abandons a key or retires one; the rotation goes on from where it was once the API is
    /// back.
    pub api_current_since: Option<SystemTime>,
}

/// Whether a wait that began at `since` has lasted `timeout`, counting only the time the
/// API view has been current (see [`Observation::api_current_since`]).
fn waited(since: SystemTime, obs: &Observation, timeout: Duration, now: SystemTime) -> bool {
    obs.api_current_since.is_some_and(|api| {
        now.duration_since(since.max(api))
            .is_ok_and(|d| d >= timeout)
    })
}

/// How long each wait may last before the rotation goes on without the laggards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// From publishing the next key to switching.
    pub acknowledge: Duration,
    /// From switching to retiring the old key.
    pub move_over: Duration,
}

/// What the agent does, in order, after persisting the returned phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Generate the next key (unless one is persisted already) and publish its public half.
    PrepareNext,
    /// Initiate handshakes with the next key; keep answering handshakes to the old one.
    Switch,
    /// Make the next key current with `generation`, and keep answering only the previous
    /// keys [`previous_after_retire`] returns for `revoke`; zero and delete the others.
    /// `laggards`: some node peers never moved to the next key, so the retired key is still
    /// needed to reach them (unless this is a revocation).
    Retire {
        generation: i64,
        revoke: bool,
        laggards: bool,
    },
    /// The next key was never approved: stop publishing it and stay on the current key. An
    /// approval may have crossed this decision, so the key stays answered (as a previous
    /// key) for the acknowledge timeout before it is deleted.
    Abandon,
    /// Report peers that did not keep up; the rotation went on without them.
    Laggards {
        step: LaggardStep,
        peers: Vec<String>,
    },
}

/// Which wait a laggard missed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaggardStep {
    /// It never acknowledged the next key.
    Acknowledge,
    /// It never completed a handshake with the next key.
    MoveOver,
}

fn missing(peers: &BTreeSet<String>, done: &BTreeSet<String>) -> Vec<String> {
    peers.difference(done).cloned().collect()
}

/// One step of a node's rotation: the next phase and the actions to take.
pub fn step(
    phase: Phase,
    obs: &Observation,
    timeouts: &Timeouts,
    now: SystemTime,
) -> (Phase, Vec<Action>) {
    match phase {
        Phase::Steady { generation } if obs.granted => (
            Phase::Prepared {
                generation,
                since: now,
                revoke: obs.revoke,
            },
            vec![Action::PrepareNext],
        ),
        Phase::Steady { .. } => (phase, vec![]),
        Phase::Prepared {
            generation,
            since,
            revoke,
        } => {
            let waiting = missing(&obs.peers, &obs.acknowledged);
            let timed_out = waited(since, obs, timeouts.acknowledge, now);
            if !obs.next_approved {
                if timed_out {
                    // No peer can know an unapproved key: switching would cut them all off.
                    return (Phase::Steady { generation }, vec![Action::Abandon]);
                }
                // Re-publishing is idempotent: after a crash the persisted next key is
                // published again rather than a new one generated.
                return (phase, vec![Action::PrepareNext]);
            }
            if waiting.is_empty() {
                (
                    Phase::Switched {
                        generation,
                        since: now,
                        revoke,
                    },
                    vec![Action::Switch],
                )
            } else if timed_out {
                (
                    Phase::Switched {
                        generation,
                        since: now,
                        revoke,
                    },
                    vec![
                        Action::Laggards {
                            step: LaggardStep::Acknowledge,
                            peers: waiting,
                        },
                        Action::Switch,
                    ],
                )
            } else {
                (phase, vec![])
            }
        }
        Phase::Switched {
            generation,
            since,
            revoke,
        } => {
            let waiting = missing(&obs.peers, &obs.moved);
            let timed_out = waited(since, obs, timeouts.move_over, now);
            let next = Phase::Steady {
                generation: generation + 1,
            };
            if waiting.is_empty() {
                (
                    next,
                    vec![Action::Retire {
                        generation: generation + 1,
                        revoke,
                        laggards: false,
                    }],
                )
            } else if timed_out {
                (
                    next,
                    vec![
                        Action::Laggards {
                            step: LaggardStep::MoveOver,
                            peers: waiting,
                        },
                        Action::Retire {
                            generation: generation + 1,
                            revoke,
                            laggards: true,
                        },
                    ],
                )
            } else {
                (phase, vec![Action::Switch])
            }
        }
    }
}

/// A node's keys as its rotation keeps them, persisted together with the phase in one atomic
/// write: the agent's key file (`K` holds the secret) and the simulation's disk (`K` an id)
/// are both this. [`Keyring::advance`] is the one place a step's actions change it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyring<K> {
    /// The key of the current generation.
    pub current: K,
    /// The next key, from `Prepared` until it is retired into `current`.
    pub next: Option<K>,
    /// Keys no longer the node's but still answered, each until its deadline.
    pub previous: Vec<(K, SystemTime)>,
    /// The rotation's phase.
    pub phase: Phase,
    /// Peers the last rotation went on without.
    pub laggards: Vec<String>,
    /// The last completed rotation was a revocation.
    pub revoked: bool,
    /// When the last rotation of the current key was abandoned.
    pub abandoned_at: Option<SystemTime>,
}

/// How long keys the rotation no longer initiates with stay answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// An abandoned next key: for the acknowledge timeout (an approval may have crossed).
    pub acknowledge: Duration,
    /// A retired key, while external peers or laggards may need it ([`previous_key_until`]).
    pub grace: Duration,
    /// The mesh has external peers.
    pub external_peers: bool,
}

/// What [`Keyring::advance`] did, besides the keyring it returned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Advanced {
    /// The old key was retired and the next one made current.
    pub retired: bool,
    /// The retired key is still answered, for its grace period.
    pub retired_kept: bool,
    /// Keys retired or abandoned before that a revocation stopped answering.
    pub dropped: usize,
    /// The next key was abandoned.
    pub abandoned: bool,
}

/// A step's actions that the keyring cannot carry out: the phase they came from implies a
/// next key, and there is none (a keyring that was not persisted with its phase).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyringError {
    #[error("the rotation retires its old key, but there is no next key to take its place")]
    RetireWithoutNext,
    #[error("the rotation abandons its next key, but there is none")]
    AbandonWithoutNext,
}

impl<K: Clone> Keyring<K> {
    /// The keyring after [`step`] returned `phase` and `actions` at `now`, to persist in one
    /// write before the caller acts on the device. `new_key(generation)` makes the next key
    /// (only if there is none yet: after a crash the persisted one is published again);
    /// `promote(key, generation)` gives a retiring rotation's next key its generation.
    pub fn advance(
        &self,
        phase: Phase,
        actions: &[Action],
        now: SystemTime,
        retention: &Retention,
        new_key: impl FnOnce(i64) -> K,
        promote: impl FnOnce(&mut K, i64),
    ) -> Result<(Keyring<K>, Advanced), KeyringError> {
        let mut ring = self.clone();
        let mut done = Advanced::default();
        if matches!(self.phase, Phase::Steady { .. }) && !matches!(phase, Phase::Steady { .. }) {
            // A new rotation of the key: the last one's outcome is history.
            ring.abandoned_at = None;
            ring.laggards.clear();
            ring.revoked = false;
        }
        let mut new_key = Some(new_key);
        let mut promote = Some(promote);
        for action in actions {
            match action {
                Action::PrepareNext => {
                    if ring.next.is_none()
                        && let Some(make) = new_key.take()
                    {
                        ring.next = Some(make(generation_of(phase) + 1));
                    }
                }
                Action::Switch => {}
                Action::Laggards { peers, .. } => {
                    for p in peers {
                        if !ring.laggards.contains(p) {
                            ring.laggards.push(p.clone());
                        }
                    }
                }
                Action::Abandon => {
                    let key = ring.next.take().ok_or(KeyringError::AbandonWithoutNext)?;
                    ring.previous.push((key, now + retention.acknowledge));
                    ring.abandoned_at = Some(now);
                    done.abandoned = true;
                }
                Action::Retire {
                    generation,
                    revoke,
                    laggards,
                } => {
                    let mut next = ring.next.take().ok_or(KeyringError::RetireWithoutNext)?;
                    if let Some(promote) = promote.take() {
                        promote(&mut next, *generation);
                    }
                    let old = std::mem::replace(&mut ring.current, next);
                    let earlier = std::mem::take(&mut ring.previous);
                    let held = earlier.len();
                    ring.previous = previous_after_retire(
                        earlier,
                        old,
                        *revoke,
                        retention.grace,
                        StillNeeded {
                            external_peers: retention.external_peers,
                            node_laggards: *laggards,
                        },
                        now,
                    );
                    done.retired = true;
                    done.retired_kept = !revoke && ring.previous.len() > held;
                    done.dropped = if *revoke { held } else { 0 };
                    ring.revoked = *revoke;
                }
            }
        }
        ring.phase = phase;
        Ok((ring, done))
    }
}

/// The key generation a phase is at.
pub fn generation_of(phase: Phase) -> i64 {
    match phase {
        Phase::Steady { generation }
        | Phase::Prepared { generation, .. }
        | Phase::Switched { generation, .. } => generation,
    }
}

/// How long a peer must send nothing under the old key, once a session under the next key
/// is up, before it counts as moved: packets already in flight under the old key land.
pub const MOVE_QUIET: Duration = Duration::from_secs(2);

/// What a rotating node's device shows of one peer's sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionView {
    /// The peer's name.
    pub peer: String,
    /// When the newest session under this node's next key was established, if any.
    pub next_key_session: Option<SystemTime>,
    /// When data last arrived under this node's old key, if ever (as far as observed).
    pub old_key_last_data: Option<SystemTime>,
}

/// The peers that have moved to this node's next key: a session under it is up and nothing
/// arrived under the old key for [`MOVE_QUIET`].
pub fn moved(sessions: &[SessionView], now: SystemTime) -> BTreeSet<String> {
    sessions
        .iter()
        .filter(|s| s.next_key_session.is_some_and(|t| t <= now))
        .filter(|s| {
            s.old_key_last_data
                .is_none_or(|t| now.duration_since(t).is_ok_and(|d| d >= MOVE_QUIET))
        })
        .map(|s| s.peer.clone())
        .collect()
}

/// Which of a node's keys the device holds in each phase: the one it initiates with, and
/// the others it answers handshakes under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRole {
    /// The key of the current generation.
    Current,
    /// The next key, while rotating.
    Next,
    /// Keys no longer the node's that are still answered until a deadline: a retired key
    /// during external peers' grace period, an abandoned next key while an approval of it
    /// may still be in flight.
    Previous,
}

/// The device's keys in `phase`: (initiating key, answered-only keys). The next key is
/// answered from the moment it exists, before it is published, so a peer that learns it can
/// never reach a node that does not hold it; the old key is answered until it is retired;
/// previous keys (retired keys in their grace period, abandoned next keys an approval may
/// still be on its way for) are answered in every phase until their deadline.
pub fn device_keys(phase: Phase, has_previous: bool) -> (KeyRole, Vec<KeyRole>) {
    let (initiating, mut answered) = match phase {
        Phase::Steady { .. } => (KeyRole::Current, vec![]),
        Phase::Prepared { .. } => (KeyRole::Current, vec![KeyRole::Next]),
        Phase::Switched { .. } => (KeyRole::Next, vec![KeyRole::Current]),
    };
    if has_previous {
        answered.push(KeyRole::Previous);
    }
    (initiating, answered)
}

/// Who may still need a key an ordinary rotation retires.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StillNeeded {
    /// The mesh has external peers, which cannot learn the new key by themselves.
    pub external_peers: bool,
    /// Node peers never moved to the new key before the move timeout (the laggards): they
    /// may not hold it yet (their agent stopped, or cut off from the API), and would lose
    /// this node if the old key stopped being answered.
    pub node_laggards: bool,
}

impl StillNeeded {
    fn any(self) -> bool {
        self.external_peers || self.node_laggards
    }
}

/// Until when a key retired by an ordinary rotation is still answered: for the grace period
/// if anyone may still need it (see [`StillNeeded`]), else not at all. A revocation keeps no
/// retired key: see [`previous_after_retire`].
pub fn previous_key_until(
    retired_at: SystemTime,
    grace: Duration,
    needed: StillNeeded,
) -> Option<SystemTime> {
    if !needed.any() || grace.is_zero() {
        return None;
    }
    retired_at.checked_add(grace)
}

/// The previous keys a node answers once it retires `retired` at `now` ([`Action::Retire`]),
/// each with its deadline; the keys left out are deleted.
///
/// An ordinary rotation keeps the earlier previous keys with their deadlines and adds
/// `retired` until [`previous_key_until`]. A revocation keeps none: the retired key's
/// deadline is the moment of completion, and every key retired or abandoned before it (in
/// its grace period, or awaiting a crossed approval) stops being answered at that moment
/// too, since whoever could read the retired key could read them. Node peers that moved
/// lose nothing; laggards and external peers that still use an old key lose the node until
/// they are given the new one.
pub fn previous_after_retire<K>(
    previous: Vec<(K, SystemTime)>,
    retired: K,
    revoke: bool,
    grace: Duration,
    needed: StillNeeded,
    now: SystemTime,
) -> Vec<(K, SystemTime)> {
    if revoke {
        return Vec::new();
    }
    let mut kept = previous;
    if let Some(until) = previous_key_until(now, grace, needed) {
        kept.push((retired, until));
    }
    kept
}

/// When `node` becomes due on its own (a request in the future, or its interval with
/// jitter), for the operator's requeue; `None` if nothing is pending.
pub fn next_due_at(node: &NodeKeyView, policy: &Policy, now: SystemTime) -> Option<SystemTime> {
    let future = |r: Option<SystemTime>| {
        r.filter(|r| {
            *r > now && node.key_created_at < *r && node.abandoned_at.is_none_or(|a| a < *r)
        })
    };
    let interval = policy
        .interval
        .filter(|_| node.abandoned_at.is_none())
        .and_then(|i| {
            node.key_created_at
                .checked_add(i)?
                .checked_add(jitter(&node.name, i))
        });
    [
        future(node.requested_at),
        future(policy.mesh_requested_at),
        interval.filter(|t| *t > now),
    ]
    .into_iter()
    .flatten()
    .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn mk_node(name: &str, created: u64, requested: Option<u64>, rotating: bool) -> NodeKeyView {
        NodeKeyView {
            name: name.into(),
            key_created_at: at(created),
            requested_at: requested.map(at),
            revoke: false,
            rotating,
            abandoned_at: None,
        }
    }

    fn policy(mesh: Option<u64>, interval: Option<u64>, max: usize) -> Policy {
        Policy {
            mesh_requested_at: mesh.map(at),
            mesh_revoke: false,
            interval: interval.map(Duration::from_secs),
            max_concurrent: max,
        }
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    const T: Timeouts = Timeouts {
        acknowledge: Duration::from_secs(60),
        move_over: Duration::from_secs(120),
    };

    #[test]
    fn a_request_rotates_only_keys_created_before_it() {
        let p = policy(None, None, 1);
        assert_eq!(
            due(&mk_node("a", 10, Some(20), false), &p, at(30)),
            Some(Due::NodeRequest)
        );
        assert_eq!(due(&mk_node("a", 25, Some(20), false), &p, at(30)), None);
        // A request in the future is not yet in force.
        assert_eq!(due(&mk_node("a", 10, Some(40), false), &p, at(30)), None);
        let mesh = policy(Some(20), None, 1);
        assert_eq!(
            due(&mk_node("a", 10, None, false), &mesh, at(30)),
            Some(Due::MeshRequest)
        );
    }

    #[test]
    fn the_interval_rotates_old_keys_with_a_stable_jitter() {
        let p = policy(None, Some(1000), 1);
        let j = jitter("a", Duration::from_secs(1000));
        assert!(j < Duration::from_secs(100));
        assert_eq!(
            j,
            jitter("a", Duration::from_secs(1000)),
            "jitter is deterministic"
        );
        let just_before = 1000 + j.as_secs();
        assert_eq!(
            due(
                &mk_node("a", 0, None, false),
                &p,
                at(just_before.saturating_sub(1))
            ),
            None
        );
        assert_eq!(
            due(&mk_node("a", 0, None, false), &p, at(just_before + 1)),
            Some(Due::Interval)
        );
    }

    #[test]
    fn the_schedule_never_exceeds_max_concurrent_and_takes_the_oldest_keys_first() {
        let nodes = [
            mk_node("c", 5, None, false),
            mk_node("a", 10, None, false),
            mk_node("b", 1, None, true),
            mk_node("d", 3, None, false),
        ];
        let p = policy(Some(100), None, 2);
        let granted = schedule(&nodes, &p, at(200));
        assert_eq!(
            granted,
            vec![("d".to_string(), Due::MeshRequest)],
            "b already holds one of the 2 slots"
        );
        let p3 = policy(Some(100), None, 3);
        let names: Vec<String> = schedule(&nodes, &p3, at(200))
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["d", "c"]);
        let all_busy = [mk_node("a", 1, None, true), mk_node("b", 1, None, true)];
        assert!(schedule(&all_busy, &p, at(200)).is_empty());
    }

    #[test]
    fn a_rotation_with_prompt_peers_walks_every_step() {
        let peers = set(&["p1", "p2"]);
        let mut obs = Observation {
            granted: true,
            peers: peers.clone(),
            api_current_since: Some(at(0)),
            ..Default::default()
        };
        let (phase, acts) = step(Phase::Steady { generation: 3 }, &obs, &T, at(0));
        assert_eq!(acts, vec![Action::PrepareNext]);
        // Not approved yet: keep publishing, do not switch.
        let (phase, acts) = step(phase, &obs, &T, at(1));
        assert_eq!(acts, vec![Action::PrepareNext]);
        obs.next_approved = true;
        obs.acknowledged = set(&["p1"]);
        let (phase, acts) = step(phase, &obs, &T, at(2));
        assert!(acts.is_empty() && matches!(phase, Phase::Prepared { .. }));
        obs.acknowledged = peers.clone();
        let (phase, acts) = step(phase, &obs, &T, at(3));
        assert_eq!(acts, vec![Action::Switch]);
        obs.moved = peers;
        let (phase, acts) = step(phase, &obs, &T, at(4));
        assert_eq!(
            acts,
            vec![Action::Retire {
                generation: 4,
                revoke: false,
                laggards: false
            }]
        );
        assert_eq!(phase, Phase::Steady { generation: 4 });
    }

    #[test]
    fn laggards_do_not_block_forever_and_are_named() {
        let obs = Observation {
            granted: true,
            revoke: false,
            next_approved: true,
            peers: set(&["fast", "slow"]),
            acknowledged: set(&["fast"]),
            moved: set(&["fast"]),
            api_current_since: Some(at(0)),
        };
        let prepared = Phase::Prepared {
            generation: 0,
            since: at(0),
            revoke: false,
        };
        assert_eq!(step(prepared, &obs, &T, at(59)).1, vec![]);
        let (phase, acts) = step(prepared, &obs, &T, at(60));
        assert_eq!(
            acts,
            vec![
                Action::Laggards {
                    step: LaggardStep::Acknowledge,
                    peers: vec!["slow".into()]
                },
                Action::Switch
            ]
        );
        let Phase::Switched { since, .. } = phase else {
            panic!("{phase:?}")
        };
        let (_, acts) = step(phase, &obs, &T, since + Duration::from_secs(119));
        assert_eq!(
            acts,
            vec![Action::Switch],
            "keeps answering both keys while waiting"
        );
        let (phase, acts) = step(phase, &obs, &T, since + Duration::from_secs(120));
        assert_eq!(
            acts,
            vec![
                Action::Laggards {
                    step: LaggardStep::MoveOver,
                    peers: vec!["slow".into()]
                },
                Action::Retire {
                    generation: 1,
                    revoke: false,
                    laggards: true
                }
            ]
        );
        assert_eq!(phase, Phase::Steady { generation: 1 });
    }

    #[test]
    fn no_timeout_runs_while_the_api_view_is_not_current() {
        // Nothing was acknowledged, approved or moved: the API went away mid-rotation.
        let mut obs = Observation {
            granted: true,
            next_approved: false,
            peers: set(&["p1", "p2"]),
            api_current_since: None,
            ..Default::default()
        };
        let prepared = Phase::Prepared {
            generation: 0,
            since: at(0),
            revoke: false,
        };
        // An unapproved key is not abandoned, however long the outage.
        assert_eq!(
            step(prepared, &obs, &T, at(100_000)),
            (prepared, vec![Action::PrepareNext])
        );
        // Approved before the outage, never acknowledged: no switch on a stale view.
        obs.next_approved = true;
        assert_eq!(step(prepared, &obs, &T, at(100_000)), (prepared, vec![]));
        let switched = Phase::Switched {
            generation: 0,
            since: at(0),
            revoke: false,
        };
        // Switched, nobody moved: the old key is not retired.
        assert_eq!(
            step(switched, &obs, &T, at(100_000)),
            (switched, vec![Action::Switch])
        );
        // The API is back at 100 000: the timeouts count from then, not from the phase.
        obs.api_current_since = Some(at(100_000));
        assert_eq!(step(prepared, &obs, &T, at(100_059)), (prepared, vec![]));
        assert!(matches!(
            step(prepared, &obs, &T, at(100_060)).0,
            Phase::Switched { .. }
        ));
        assert_eq!(
            step(switched, &obs, &T, at(100_119)),
            (switched, vec![Action::Switch])
        );
        assert!(matches!(
            step(switched, &obs, &T, at(100_120)).1.last(),
            Some(Action::Retire { laggards: true, .. })
        ));
        // Peers that move complete it, view or no view: moving is seen on the device.
        obs.api_current_since = None;
        obs.moved = obs.peers.clone();
        assert_eq!(
            step(switched, &obs, &T, at(100_200)).1,
            vec![Action::Retire {
                generation: 1,
                revoke: false,
                laggards: false
            }]
        );
    }

    #[test]
    fn a_retired_key_stays_answered_while_laggards_or_external_peers_may_need_it() {
        let grace = Duration::from_secs(3600);
        let none = StillNeeded::default();
        assert_eq!(previous_key_until(at(10), grace, none), None);
        for needed in [
            StillNeeded {
                external_peers: true,
                ..none
            },
            StillNeeded {
                node_laggards: true,
                ..none
            },
        ] {
            assert_eq!(previous_key_until(at(10), grace, needed), Some(at(3610)));
            assert_eq!(
                previous_after_retire(vec![], "old", false, grace, needed, at(10)),
                vec![("old", at(3610))]
            );
            // A revocation keeps nothing, whoever lags.
            assert!(previous_after_retire(vec![], "old", true, grace, needed, at(10)).is_empty());
        }
    }

    #[test]
    fn after_a_crash_the_persisted_phase_reissues_what_was_lost() {
        // Crashed after persisting Prepared, before publishing: publish again (the persisted
        // next key, not a new one).
        let waiting = Observation {
            granted: true,
            peers: set(&["p"]),
            api_current_since: Some(at(0)),
            ..Default::default()
        };
        let prepared = Phase::Prepared {
            generation: 0,
            since: at(0),
            revoke: false,
        };
        assert_eq!(
            step(prepared, &waiting, &T, at(1)),
            (prepared, vec![Action::PrepareNext])
        );
        // Crashed after persisting Switched, before reconfiguring the device: switch again.
        let switched = Phase::Switched {
            generation: 0,
            since: at(0),
            revoke: false,
        };
        let approved = Observation {
            next_approved: true,
            acknowledged: set(&["p"]),
            ..waiting
        };
        assert_eq!(
            step(switched, &approved, &T, at(1)),
            (switched, vec![Action::Switch])
        );
        // A restarted agent that finds itself Steady with no grant does nothing.
        let idle = Observation::default();
        assert_eq!(
            step(Phase::Steady { generation: 1 }, &idle, &T, at(1)),
            (Phase::Steady { generation: 1 }, vec![])
        );
    }

    #[test]
    fn a_rotation_never_skips_a_step_or_goes_backwards() {
        // Whatever is observed, one step moves at most one phase forward, and the
        // generation only grows by one, at retirement.
        let all = ["a", "b"];
        let subsets: Vec<BTreeSet<String>> = vec![set(&[]), set(&["a"]), set(&all)];
        let rank = |p: &Phase| match p {
            Phase::Steady { .. } => 0,
            Phase::Prepared { .. } => 1,
            Phase::Switched { .. } => 2,
        };
        for phase in [
            Phase::Steady { generation: 5 },
            Phase::Prepared {
                generation: 5,
                since: at(0),
                revoke: false,
            },
            Phase::Switched {
                generation: 5,
                since: at(0),
                revoke: false,
            },
        ] {
            for granted in [false, true] {
                for approved in [false, true] {
                    for acked in &subsets {
                        for moved in &subsets {
                            for now in [at(0), at(59), at(60), at(119), at(120), at(10_000)] {
                                let obs = Observation {
                                    granted,
                                    revoke: false,
                                    next_approved: approved,
                                    peers: set(&all),
                                    acknowledged: acked.clone(),
                                    moved: moved.clone(),
                                    api_current_since: Some(at(0)),
                                };
                                let (next, acts) = step(phase, &obs, &T, now);
                                let (r0, r1) = (rank(&phase), rank(&next));
                                let wrapped = r0 == 2 && r1 == 0;
                                let abandoned = r0 == 1 && r1 == 0;
                                assert!(
                                    r1 == r0 || r1 == r0 + 1 || wrapped || abandoned,
                                    "{phase:?} -> {next:?}"
                                );
                                if abandoned {
                                    // Only an unapproved key, only after the timeout.
                                    assert!(!approved && now >= at(60), "{obs:?} at {now:?}");
                                    assert_eq!(acts, vec![Action::Abandon]);
                                    assert_eq!(generation_of(next), generation_of(phase));
                                } else if wrapped {
                                    assert_eq!(generation_of(next), generation_of(phase) + 1);
                                    assert!(acts.contains(&Action::Retire {
                                        generation: 6,
                                        revoke: false,
                                        laggards: moved != &set(&all),
                                    }));
                                } else {
                                    assert_eq!(generation_of(next), generation_of(phase));
                                }
                                // The old key is retired only after switching.
                                if acts.iter().any(|a| matches!(a, Action::Retire { .. })) {
                                    assert_eq!(r0, 2);
                                }
                                // Switching needs an approved next key.
                                if acts.contains(&Action::Switch) && r0 == 1 {
                                    assert!(approved);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_revoking_request_makes_the_rotation_a_revocation_whichever_else_applies() {
        let revoking = |requested: Option<u64>| NodeKeyView {
            revoke: true,
            ..mk_node("a", 10, requested, false)
        };
        let p = policy(None, Some(5), 1);
        // A node's revoking request, even with the interval also due.
        assert_eq!(due(&revoking(Some(20)), &p, at(30)), Some(Due::Revoke));
        // The flag alone, with no pending request, revokes nothing.
        assert_eq!(
            due(&revoking(Some(5)), &policy(None, None, 1), at(30)),
            None,
            "the key is newer than the request"
        );
        assert_eq!(due(&revoking(None), &p, at(30)), Some(Due::Interval));
        // The Mesh's revoking request beats the node's own ordinary one.
        let mesh = Policy {
            mesh_revoke: true,
            ..policy(Some(25), None, 1)
        };
        assert_eq!(
            due(&mk_node("a", 10, Some(20), false), &mesh, at(30)),
            Some(Due::Revoke)
        );
        // An ordinary Mesh request does not turn the node's revoking one into an ordinary one.
        assert_eq!(
            due(&revoking(Some(20)), &policy(Some(25), None, 1), at(30)),
            Some(Due::Revoke)
        );
        assert!(Due::Revoke.revokes() && !Due::NodeRequest.revokes());
    }

    #[test]
    fn a_revocation_waits_for_a_slot_but_goes_before_older_keys() {
        let nodes = [
            mk_node("old", 1, None, false),
            NodeKeyView {
                revoke: true,
                ..mk_node("young", 50, Some(90), false)
            },
            mk_node("busy", 1, None, true),
        ];
        let p = policy(Some(100), None, 2);
        assert_eq!(
            schedule(&nodes, &p, at(200)),
            vec![("young".to_string(), Due::Revoke)],
            "one slot free: the revocation takes it"
        );
        assert_eq!(
            schedule(&nodes, &policy(Some(100), None, 3), at(200)),
            vec![
                ("young".to_string(), Due::Revoke),
                ("old".to_string(), Due::MeshRequest)
            ]
        );
        // No free slot: it waits like any rotation.
        assert!(schedule(&nodes, &policy(Some(100), None, 1), at(200)).is_empty());
    }

    #[test]
    fn a_revocation_walks_the_same_steps_and_retires_as_one_even_without_its_grant() {
        let peers = set(&["p"]);
        let mut obs = Observation {
            granted: true,
            revoke: true,
            peers: peers.clone(),
            api_current_since: Some(at(0)),
            ..Default::default()
        };
        let (phase, acts) = step(Phase::Steady { generation: 0 }, &obs, &T, at(0));
        assert_eq!(acts, vec![Action::PrepareNext]);
        assert!(matches!(phase, Phase::Prepared { revoke: true, .. }));
        // Peers still install the next key before the switch.
        obs.next_approved = true;
        let (phase, acts) = step(phase, &obs, &T, at(1));
        assert!(acts.is_empty(), "{acts:?}");
        obs.acknowledged = peers.clone();
        let (phase, acts) = step(phase, &obs, &T, at(2));
        assert_eq!(acts, vec![Action::Switch]);
        assert!(matches!(phase, Phase::Switched { revoke: true, .. }));
        // The grant is gone by retirement (the node went not ready, the operator restarted):
        // the persisted phase still says revocation.
        obs.granted = false;
        obs.revoke = false;
        obs.moved = peers;
        let (phase, acts) = step(phase, &obs, &T, at(3));
        assert_eq!(
            acts,
            vec![Action::Retire {
                generation: 1,
                revoke: true,
                laggards: false
            }]
        );
        assert_eq!(phase, Phase::Steady { generation: 1 });
    }

    #[test]
    fn the_keyring_follows_the_steps_actions() {
        let ring = Keyring {
            current: (0, "k0"),
            next: None,
            previous: vec![],
            phase: Phase::Steady { generation: 0 },
            laggards: vec!["stale".into()],
            revoked: true,
            abandoned_at: Some(at(1)),
        };
        let keep = Retention {
            acknowledge: Duration::from_secs(60),
            grace: Duration::from_secs(3600),
            external_peers: false,
        };
        let promote = |k: &mut (i64, &str), g: i64| k.0 = g;
        let prepared = Phase::Prepared {
            generation: 0,
            since: at(10),
            revoke: false,
        };
        let (r, done) = ring
            .advance(
                prepared,
                &[Action::PrepareNext],
                at(10),
                &keep,
                |g| (g, "k1"),
                promote,
            )
            .expect("prepare");
        assert_eq!(r.next, Some((1, "k1")));
        assert!(
            r.laggards.is_empty() && !r.revoked && r.abandoned_at.is_none(),
            "{r:?}"
        );
        assert_eq!(done, Advanced::default());
        // Re-issued after a crash: the persisted next key stays.
        let (again, _) = r
            .advance(
                prepared,
                &[Action::PrepareNext],
                at(11),
                &keep,
                |g| (g, "other"),
                promote,
            )
            .expect("again");
        assert_eq!(again.next, Some((1, "k1")));
        // Retired with a laggard: the old key stays answered for the grace period.
        let (done_ring, done) = r
            .advance(
                Phase::Steady { generation: 1 },
                &[
                    Action::Laggards {
                        step: LaggardStep::MoveOver,
                        peers: vec!["slow".into()],
                    },
                    Action::Retire {
                        generation: 1,
                        revoke: false,
                        laggards: true,
                    },
                ],
                at(20),
                &keep,
                |g| (g, "unused"),
                promote,
            )
            .expect("retire");
        assert_eq!(done_ring.current, (1, "k1"));
        assert_eq!(done_ring.previous, vec![((0, "k0"), at(3620))]);
        assert_eq!(done_ring.laggards, vec!["slow".to_string()]);
        assert!(done.retired && done.retired_kept);
        // Abandoned: the next key is answered for the acknowledge timeout.
        let (ab, done) = r
            .advance(
                Phase::Steady { generation: 0 },
                &[Action::Abandon],
                at(70),
                &keep,
                |g| (g, "unused"),
                promote,
            )
            .expect("abandon");
        assert_eq!(ab.previous, vec![((1, "k1"), at(130))]);
        assert_eq!(ab.abandoned_at, Some(at(70)));
        assert!(done.abandoned && ab.next.is_none());
        // A phase that implies a next key without one is refused, not guessed at.
        assert_eq!(
            ring.advance(
                Phase::Steady { generation: 1 },
                &[Action::Retire {
                    generation: 1,
                    revoke: false,
                    laggards: false
                }],
                at(5),
                &keep,
                |g| (g, "x"),
                promote
            ),
            Err(KeyringError::RetireWithoutNext)
        );
    }

    #[test]
    fn a_grant_is_for_one_key_and_spent_by_an_abandonment_after_it() {
        assert!(grant_in_force(3, Some(at(10)), 3, None));
        assert!(!grant_in_force(2, Some(at(10)), 3, None), "another key's");
        assert!(!grant_in_force(3, Some(at(10)), 3, Some(at(20))), "spent");
        assert!(
            grant_in_force(3, Some(at(30)), 3, Some(at(20))),
            "a new one"
        );
        assert!(
            !grant_in_force(3, None, 3, Some(at(20))),
            "undated, after an abandonment"
        );
    }

    #[test]
    fn a_new_request_during_a_rotation_does_not_restart_it() {
        // The node is rotating, so the schedule does not grant it again...
        let rotating = mk_node("a", 0, Some(50), true);
        assert!(schedule(&[rotating], &policy(None, None, 1), at(60)).is_empty());
        // ...and once its next key (created after the request) is current, it is not due.
        let done = mk_node("a", 55, Some(50), false);
        assert_eq!(due(&done, &policy(None, None, 1), at(60)), None);
    }
}
