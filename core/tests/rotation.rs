//! Key rotation end to end, in memory: the helpers of `wgmesh_core::rotation` one by one,
//! every step against a crash and a concurrent grant, the schedule and `next_due_at` against
//! random inputs, and a deterministic simulation of meshes of 2–8 nodes in which the operator
//! schedules and approves, agents step through their rotations, crash and resume from what
//! they persisted, stall (laggards), and rotation requests arrive at any time, including
//! during a rotation.
//!
//! The simulation is all these functions see of the world: a seeded xorshift generator (no
//! dependency), a clock that advances a few seconds per tick, an API that each side reads a
//! tick late, and WireGuard devices reduced to the keys they hold and the peer keys they
//! installed. Each tick it checks what a user would notice: a peer that cannot reach a node
//! that never named it a laggard, more nodes rotating than allowed, a generation that skips,
//! a rotation that starts without a reason (or, after an abandonment, without a newer
//! request) or never ends, an abandoned key that is never deleted.
//!
//! The simulated agent and operator follow what `node-agent` and `operator` do around these
//! functions: an abandoned next key stays answered (as a previous key) for the acknowledge
//! timeout, because an approval may have crossed the decision; the operator approves only
//! the next key a node's status publishes now; a peer acknowledges a next key by its public
//! key, never by its generation; and a grant is spent once the node reports it abandoned a
//! rotation after it, so only a newer request starts another.
//!
//! `ROTATION_SEEDS=<n>` runs more seeds; `ROTATION_TRACE=<seed>` prints every tick of one.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use wgmesh_core::rotation::{
    Action, Due, KeyRole, Keyring, LaggardStep, MOVE_QUIET, NodeKeyView, Observation, Phase,
    Policy, Retention, SessionView, StillNeeded, Timeouts, device_keys, due, generation_of,
    grant_in_force, jitter, moved, next_due_at, previous_after_retire, previous_key_until,
    schedule, step,
};

fn at(secs: u64) -> SystemTime {
    at_ms(secs * 1000)
}

fn at_ms(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000) + Duration::from_millis(ms)
}

const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

const MS: Duration = Duration::from_millis(1);

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn is_steady(p: Phase) -> bool {
    matches!(p, Phase::Steady { .. })
}

/// Why `node` should be due, written independently of `due`: the oracle for the schedule.
/// After an abandoned rotation only a request made after the abandonment counts; any
/// pending request that revokes makes it a revocation.
fn expected_due(node: &NodeKeyView, policy: &Policy, now: SystemTime) -> Option<Due> {
    let pending = |r: Option<SystemTime>| {
        let Some(r) = r else { return false };
        let after_abandon = match node.abandoned_at {
            Some(a) => r > a,
            None => true,
        };
        node.key_created_at < r && r <= now && after_abandon
    };
    let revoking = [
        (node.requested_at, node.revoke),
        (policy.mesh_requested_at, policy.mesh_revoke),
    ];
    if revoking.iter().any(|&(r, revoke)| revoke && pending(r)) {
        return Some(Due::Revoke);
    }
    if pending(node.requested_at) {
        return Some(Due::NodeRequest);
    }
    if pending(policy.mesh_requested_at) {
        return Some(Due::MeshRequest);
    }
    if node.abandoned_at.is_some() {
        return None;
    }
    let interval = policy.interval?;
    let age = now.duration_since(node.key_created_at).ok()?;
    (age >= interval + jitter(&node.name, interval)).then_some(Due::Interval)
}

/// xorshift64*, seeded: the same seed replays the same run.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // Spread small seeds over the state; xorshift must never hold zero.
        Rng((seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03) | 1)
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// Uniform in `0..n`.
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    fn chance(&mut self, per_mille: u64) -> bool {
        self.next_u64() % 1000 < per_mille
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }
}

// ---------------------------------------------------------------------------------------
// The helpers, directly.
// ---------------------------------------------------------------------------------------

fn mk_session(peer: &str, next: Option<SystemTime>, old: Option<SystemTime>) -> SessionView {
    SessionView {
        peer: peer.into(),
        next_key_session: next,
        old_key_last_data: old,
    }
}

#[test]
fn a_peer_has_moved_once_the_old_key_is_quiet_for_exactly_move_quiet() {
    let session = at(100);
    let old = at(101);
    let s = [mk_session("p", Some(session), Some(old))];
    // Packets still land under the old key: not yet.
    assert!(moved(&s, old + MOVE_QUIET - MS).is_empty());
    assert_eq!(
        moved(&s, old + MOVE_QUIET),
        set(&["p"]),
        "the boundary counts"
    );
    assert_eq!(moved(&s, old + MOVE_QUIET + secs(3600)), set(&["p"]));

    // Never any data under the old key: moved as soon as the next-key session is up.
    let fresh = [mk_session("p", Some(session), None)];
    assert!(
        moved(&fresh, session - MS).is_empty(),
        "a session from the future"
    );
    assert_eq!(moved(&fresh, session), set(&["p"]));

    // Old data long before the session does not hold the peer back.
    let long_ago = [mk_session("p", Some(session), Some(at(1)))];
    assert_eq!(moved(&long_ago, session), set(&["p"]));

    // No session under the next key: never moved, however quiet the old key is.
    let silent = [
        mk_session("p", None, Some(at(1))),
        mk_session("q", None, None),
    ];
    assert!(moved(&silent, at(10_000)).is_empty());

    // Old-key data stamped after `now` (a clock step) is not quiet.
    let skewed = [mk_session("p", Some(session), Some(at(200)))];
    assert!(moved(&skewed, at(150)).is_empty());

    // Each peer on its own.
    let mixed = [
        mk_session("a", Some(session), Some(at(99))),
        mk_session("b", Some(session), Some(at(100) + MOVE_QUIET - MS)),
        mk_session("c", None, None),
        mk_session("d", Some(at(100) + MOVE_QUIET + MS), None),
    ];
    assert_eq!(moved(&mixed, at(100) + MOVE_QUIET), set(&["a"]));
}

#[test]
fn the_device_answers_every_key_a_peer_may_use_and_initiates_with_the_one_they_know() {
    let steady = Phase::Steady { generation: 2 };
    let prepared = Phase::Prepared {
        generation: 2,
        since: at(0),
        revoke: false,
    };
    let switched = Phase::Switched {
        generation: 2,
        since: at(0),
        revoke: false,
    };
    assert_eq!(device_keys(steady, false), (KeyRole::Current, vec![]));
    // The next key is answered from the moment it exists (before peers can learn it).
    assert_eq!(
        device_keys(prepared, false),
        (KeyRole::Current, vec![KeyRole::Next])
    );
    // Switched: initiate with the next key, answer peers still on the old one.
    assert_eq!(
        device_keys(switched, false),
        (KeyRole::Next, vec![KeyRole::Current])
    );
    // Previous keys (a retired key in the external grace period, an abandoned next key an
    // approval may still be on its way for) stay answered in every phase: a rotation that
    // starts before their deadline must not cut off the peers that still use them.
    assert_eq!(
        device_keys(steady, true),
        (KeyRole::Current, vec![KeyRole::Previous])
    );
    assert_eq!(
        device_keys(prepared, true),
        (KeyRole::Current, vec![KeyRole::Next, KeyRole::Previous]),
        "a rotation that starts within the deadline keeps answering the previous key"
    );
    assert_eq!(
        device_keys(switched, true),
        (KeyRole::Next, vec![KeyRole::Current, KeyRole::Previous])
    );
    // A previous key never becomes the one the node initiates with.
    for phase in [steady, prepared, switched] {
        assert_eq!(device_keys(phase, true).0, device_keys(phase, false).0);
    }
}

#[test]
fn a_retired_key_is_answered_only_for_external_peers_and_only_for_the_grace_period() {
    let retired = at(1000);
    let external = StillNeeded {
        external_peers: true,
        node_laggards: false,
    };
    assert_eq!(
        previous_key_until(retired, secs(86_400), external),
        Some(at(1000 + 86_400))
    );
    assert_eq!(
        previous_key_until(retired, secs(86_400), StillNeeded::default()),
        None
    );
    assert_eq!(previous_key_until(retired, Duration::ZERO, external), None);
    assert_eq!(previous_key_until(retired, Duration::MAX, external), None);
}

#[test]
fn a_revocation_answers_no_earlier_key_once_it_completes_and_an_ordinary_rotation_keeps_the_grace()
{
    let now = at(5000);
    let day = secs(86_400);
    // Keys still answered before the retirement: a retired key in its grace period, an
    // abandoned next key awaiting a crossed approval.
    let earlier = vec![("retired-before", at(50_000)), ("abandoned", at(5030))];
    // (previous, revoke, grace, external peers) -> what stays answered after `retire`.
    type Case = (Vec<(&'static str, SystemTime)>, bool, Duration, bool);
    let cases: Vec<(Case, Vec<(&str, SystemTime)>)> = vec![
        // Ordinary rotations: earlier keys keep their deadlines; the retired one is kept for
        // the grace period only when external peers may need it.
        ((vec![], false, day, true), vec![("old", now + day)]),
        ((vec![], false, day, false), vec![]),
        ((vec![], false, Duration::ZERO, true), vec![]),
        (
            (earlier.clone(), false, day, true),
            vec![earlier[0], earlier[1], ("old", now + day)],
        ),
        ((earlier.clone(), false, day, false), earlier.clone()),
        // Revocations: nothing, whatever the grace and the external peers.
        ((vec![], true, day, true), vec![]),
        ((vec![], true, day, false), vec![]),
        ((earlier.clone(), true, day, true), vec![]),
        ((earlier.clone(), true, Duration::MAX, true), vec![]),
        ((earlier.clone(), true, Duration::ZERO, false), vec![]),
    ];
    for ((previous, revoke, grace, external), expected) in cases {
        let ctx = format!("{previous:?} revoke {revoke} grace {grace:?} external {external}");
        let needed = StillNeeded {
            external_peers: external,
            node_laggards: false,
        };
        let kept = previous_after_retire(previous, "old", revoke, grace, needed, now);
        assert_eq!(kept, expected, "{ctx}");
        if revoke {
            // What a peer holding only an old key notices: no key but the new one answers
            // it a moment after the completion, however long the grace period is.
            assert!(
                kept.iter().all(|(_, until)| *until <= now),
                "{ctx}: a revoked key outlives the completion"
            );
        }
    }
}

fn mk_node(name: &str, created: SystemTime, requested: Option<SystemTime>) -> NodeKeyView {
    NodeKeyView {
        name: name.into(),
        key_created_at: created,
        requested_at: requested,
        revoke: false,
        rotating: false,
        abandoned_at: None,
    }
}

fn mk_abandoned(
    name: &str,
    created: SystemTime,
    requested: Option<SystemTime>,
    abandoned: SystemTime,
) -> NodeKeyView {
    NodeKeyView {
        abandoned_at: Some(abandoned),
        ..mk_node(name, created, requested)
    }
}

fn mk_policy(mesh: Option<SystemTime>, interval: Option<Duration>) -> Policy {
    Policy {
        mesh_requested_at: mesh,
        mesh_revoke: false,
        interval,
        max_concurrent: 1,
    }
}

#[test]
fn next_due_at_names_the_earliest_future_reason_and_nothing_else() {
    let now = at(1000);
    let created = at(500);
    let none = mk_policy(None, None);
    // A future request of the node, of the mesh: the earlier one.
    assert_eq!(
        next_due_at(&mk_node("a", created, Some(at(1200))), &none, now),
        Some(at(1200))
    );
    assert_eq!(
        next_due_at(
            &mk_node("a", created, None),
            &mk_policy(Some(at(1100)), None),
            now
        ),
        Some(at(1100))
    );
    assert_eq!(
        next_due_at(
            &mk_node("a", created, Some(at(1200))),
            &mk_policy(Some(at(1100)), None),
            now
        ),
        Some(at(1100))
    );
    // A request in the past is not pending later: it is due now (or was already served).
    let served = mk_node("a", created, Some(at(400)));
    assert_eq!(next_due_at(&served, &none, now), None);
    assert_eq!(due(&served, &none, now), None);
    let overdue = mk_node("a", created, Some(at(900)));
    assert_eq!(next_due_at(&overdue, &none, now), None);
    assert_eq!(due(&overdue, &none, now), Some(Due::NodeRequest));
    // A future request older than the key (a key made after it, on a clock ahead): none.
    let newer_key = mk_node("a", at(1500), Some(at(1200)));
    assert_eq!(next_due_at(&newer_key, &none, now), None);
    assert_eq!(due(&newer_key, &none, at(2000)), None);

    // The interval, with the node's own jitter, exactly.
    let interval = secs(3600);
    for name in ["a", "node-1", "node-7", "worker-42"] {
        let n = mk_node(name, created, None);
        let p = mk_policy(None, Some(interval));
        let when = created + interval + jitter(name, interval);
        assert!(jitter(name, interval) < interval / 10, "{name}");
        assert_eq!(next_due_at(&n, &p, now), Some(when), "{name}");
        assert_eq!(due(&n, &p, when - MS), None, "{name}");
        assert_eq!(due(&n, &p, when), Some(Due::Interval), "{name}");
        // The interval competes with requests: the earliest wins.
        let early = mk_node(name, created, Some(at(1001)));
        assert_eq!(next_due_at(&early, &p, now), Some(at(1001)));
        // Once the interval has passed, it is due now rather than later.
        assert_eq!(next_due_at(&n, &p, when), None);
        assert_eq!(due(&n, &p, when + secs(1)), Some(Due::Interval));
    }
    // Nothing configured, nothing requested: nothing pending.
    assert_eq!(next_due_at(&mk_node("a", created, None), &none, now), None);
}

#[test]
fn an_abandoned_rotation_is_due_again_only_by_a_request_made_after_it() {
    let created = at(500);
    let abandoned = at(1000);
    let now = at(2000);
    let none = mk_policy(None, None);
    // The request that started the abandoned rotation is spent...
    let stale = Some(at(900));
    assert_eq!(
        due(&mk_node("a", created, stale), &none, now),
        Some(Due::NodeRequest)
    );
    assert_eq!(
        due(&mk_abandoned("a", created, stale, abandoned), &none, now),
        None
    );
    // ...and so is one made at the very instant of the abandonment.
    let same = Some(abandoned);
    assert_eq!(
        due(&mk_abandoned("a", created, same, abandoned), &none, now),
        None
    );
    // A request after it starts another rotation, from the node or from the mesh.
    let newer = Some(abandoned + MS);
    assert_eq!(
        due(&mk_abandoned("a", created, newer, abandoned), &none, now),
        Some(Due::NodeRequest)
    );
    assert_eq!(
        due(
            &mk_abandoned("a", created, None, abandoned),
            &mk_policy(Some(at(1500)), None),
            now
        ),
        Some(Due::MeshRequest)
    );
    assert_eq!(
        due(
            &mk_abandoned("a", created, None, abandoned),
            &mk_policy(Some(at(900)), None),
            now
        ),
        None
    );
    // A spent node request does not hide a newer mesh request.
    assert_eq!(
        due(
            &mk_abandoned("a", created, stale, abandoned),
            &mk_policy(Some(at(1500)), None),
            now
        ),
        Some(Due::MeshRequest)
    );
    // Never the interval: retrying by age would repeat what failed at once, for ever.
    let interval = mk_policy(None, Some(secs(100)));
    assert_eq!(
        due(&mk_node("a", created, None), &interval, now),
        Some(Due::Interval)
    );
    assert_eq!(
        due(&mk_abandoned("a", created, None, abandoned), &interval, now),
        None
    );
    assert_eq!(
        due(
            &mk_abandoned("a", created, None, abandoned),
            &interval,
            at(1_000_000)
        ),
        None
    );
    assert_eq!(
        due(
            &mk_abandoned("a", created, newer, abandoned),
            &interval,
            now
        ),
        Some(Due::NodeRequest),
        "a newer request while the interval is overdue"
    );

    // next_due_at: the interval is no longer pending; a future request after the abandonment
    // is, exactly at its instant.
    let n = mk_abandoned("a", created, None, abandoned);
    assert_eq!(
        next_due_at(&mk_node("a", created, None), &interval, at(501)),
        Some(created + secs(100) + jitter("a", secs(100)))
    );
    assert_eq!(next_due_at(&n, &interval, at(501)), None);
    let future = mk_abandoned("a", created, Some(at(2500)), abandoned);
    assert_eq!(next_due_at(&future, &interval, now), Some(at(2500)));
    assert_eq!(due(&future, &interval, at(2500) - MS), None);
    assert_eq!(due(&future, &interval, at(2500)), Some(Due::NodeRequest));
    let mesh_future = mk_policy(Some(at(2200)), Some(secs(100)));
    assert_eq!(next_due_at(&future, &mesh_future, now), Some(at(2200)));
    // A future request that is not after the abandonment (the abandonment stamped by a clock
    // ahead of ours) is not pending either.
    let ahead = mk_abandoned("a", created, Some(at(2500)), at(3000));
    assert_eq!(next_due_at(&ahead, &none, now), None);
    assert_eq!(due(&ahead, &none, at(2600)), None);
}

#[test]
fn a_node_that_abandoned_gives_its_slot_to_the_next_due_node() {
    let p = Policy {
        mesh_requested_at: Some(at(900)),
        mesh_revoke: false,
        interval: Some(secs(100)),
        max_concurrent: 1,
    };
    // The oldest key, due by the mesh's request and by age, but it abandoned after both.
    let gave_up = mk_abandoned("a", at(0), Some(at(800)), at(1000));
    let waiting = mk_node("b", at(500), None);
    assert_eq!(
        schedule(&[gave_up.clone(), waiting.clone()], &p, at(2000)),
        vec![("b".to_string(), Due::MeshRequest)]
    );
    // Without the abandonment it would have gone first.
    let fresh = NodeKeyView {
        abandoned_at: None,
        ..gave_up.clone()
    };
    assert_eq!(
        schedule(&[fresh, waiting.clone()], &p, at(2000)),
        vec![("a".to_string(), Due::NodeRequest)]
    );
    // A newer request puts it back in line, oldest key first.
    let retried = NodeKeyView {
        requested_at: Some(at(1500)),
        ..gave_up
    };
    assert_eq!(
        schedule(&[retried, waiting], &p, at(2000)),
        vec![("a".to_string(), Due::NodeRequest)]
    );
}

#[test]
fn next_due_at_is_exactly_when_due_turns_true() {
    let mut rng = Rng::new(11);
    let now = at(10_000);
    let (mut became_due, mut never, mut abandoned_then_due) = (0, 0, 0);
    for _ in 0..20_000 {
        let time = |rng: &mut Rng| at_ms(rng.range(0, 20_000_000));
        let requested = rng.chance(600).then(|| time(&mut rng));
        let created = time(&mut rng);
        // An abandonment after the key was created, at times after `now` (a clock ahead).
        let abandoned = rng.chance(300).then(|| created + rng.millis(0, 10_000_000));
        let node = NodeKeyView {
            name: format!("n{}", rng.range(0, 50)),
            key_created_at: created,
            requested_at: requested,
            revoke: rng.chance(300),
            rotating: false,
            abandoned_at: abandoned,
        };
        let mesh = rng.chance(600).then(|| time(&mut rng));
        let interval = rng.chance(500).then(|| rng.millis(1, 5_000_000));
        let policy = Policy {
            mesh_revoke: rng.chance(300),
            ..mk_policy(mesh, interval)
        };
        let due_now = due(&node, &policy, now);
        assert_eq!(
            due_now,
            expected_due(&node, &policy, now),
            "{node:?} {policy:?}"
        );
        match next_due_at(&node, &policy, now) {
            Some(t) => {
                assert!(t > now, "{node:?} {policy:?}");
                assert!(
                    due(&node, &policy, t).is_some(),
                    "{node:?} {policy:?} at {t:?}"
                );
                if due_now.is_none() {
                    assert_eq!(due(&node, &policy, t - MS), None, "{node:?} {policy:?}");
                    became_due += 1;
                    if node.abandoned_at.is_some() {
                        abandoned_then_due += 1;
                        assert_ne!(due(&node, &policy, t), Some(Due::Interval));
                    }
                }
            }
            None if due_now.is_none() => {
                assert_eq!(
                    due(&node, &policy, at(10_000_000_000)),
                    None,
                    "{node:?} {policy:?}"
                );
                never += 1;
            }
            None => {}
        }
    }
    assert!(
        became_due > 1000 && never > 1000 && abandoned_then_due > 100,
        "{became_due} {never} {abandoned_then_due}"
    );
}

#[test]
fn the_schedule_grants_only_due_idle_nodes_oldest_first_within_the_free_slots() {
    let mut rng = Rng::new(7);
    let now = at(10_000);
    let (mut partial, mut held_back, mut revocations_first) = (0, 0, 0);
    for _ in 0..5000 {
        let count = rng.range(1, 8) as usize;
        let mesh = rng.chance(500).then(|| at(rng.range(0, 12_000)));
        let interval = rng.chance(500).then(|| secs(rng.range(100, 9_000)));
        let policy = Policy {
            mesh_requested_at: mesh,
            mesh_revoke: rng.chance(300),
            interval,
            max_concurrent: rng.range(0, 4) as usize,
        };
        // Few distinct creation times, so ties are broken by name.
        let views: Vec<NodeKeyView> = (0..count)
            .map(|i| {
                let created = at(rng.range(0, 10) * 1000);
                let requested = rng.chance(500).then(|| at(rng.range(0, 12_000)));
                let abandoned = rng.chance(250).then(|| created + secs(rng.range(0, 5_000)));
                NodeKeyView {
                    name: format!("n{}", (i * 11) % count),
                    key_created_at: created,
                    requested_at: requested,
                    revoke: rng.chance(300),
                    rotating: rng.chance(300),
                    abandoned_at: abandoned,
                }
            })
            .collect();
        let out = schedule(&views, &policy, now);
        let busy = views.iter().filter(|v| v.rotating).count();
        let free = policy.max_concurrent.max(1).saturating_sub(busy);
        assert!(out.len() <= free, "{out:?} {views:?} {policy:?}");
        let find = |name: &str| {
            views
                .iter()
                .find(|v| v.name == name)
                .expect("granted a node")
        };
        // Revocations first, then oldest key first, then by name.
        let key = |v: &NodeKeyView| {
            (
                expected_due(v, &policy, now) != Some(Due::Revoke),
                v.key_created_at,
                v.name.clone(),
            )
        };
        for (name, why) in &out {
            let v = find(name);
            assert!(!v.rotating, "{name} is rotating already");
            assert_eq!(
                expected_due(v, &policy, now),
                Some(*why),
                "{v:?} {policy:?}"
            );
        }
        assert!(
            out.windows(2)
                .all(|w| key(find(&w[0].0)) < key(find(&w[1].0))),
            "{out:?}"
        );
        for v in &views {
            if v.abandoned_at.is_some() && !v.rotating {
                let fresh = NodeKeyView {
                    abandoned_at: None,
                    ..v.clone()
                };
                if expected_due(&fresh, &policy, now).is_some()
                    && expected_due(v, &policy, now).is_none()
                {
                    // Due but for its abandonment: it must not take a slot.
                    assert!(!out.iter().any(|(n, _)| *n == v.name), "{v:?} {out:?}");
                    held_back += 1;
                }
            }
            let waiting = !v.rotating
                && expected_due(v, &policy, now).is_some()
                && !out.iter().any(|(n, _)| *n == v.name);
            if waiting {
                partial += 1;
                assert_eq!(out.len(), free, "{} left waiting with a free slot", v.name);
                assert!(
                    out.iter().all(|(n, _)| key(find(n)) < key(v)),
                    "{} waits behind a younger key or an ordinary rotation: {out:?}",
                    v.name
                );
                if out.iter().any(|(n, why)| {
                    *why == Due::Revoke && find(n).key_created_at > v.key_created_at
                }) {
                    revocations_first += 1;
                }
            }
        }
    }
    assert!(partial > 1000 && held_back > 500, "{partial} {held_back}");
    assert!(
        revocations_first > 100,
        "no revocation went before an older key: {revocations_first}"
    );
}

// ---------------------------------------------------------------------------------------
// Every step × a crash × a concurrent grant.
// ---------------------------------------------------------------------------------------

fn rank(p: Phase) -> u8 {
    match p {
        Phase::Steady { .. } => 0,
        Phase::Prepared { .. } => 1,
        Phase::Switched { .. } => 2,
    }
}

#[test]
fn every_step_resumes_after_a_crash_and_ignores_a_grant_that_arrives_mid_rotation() {
    let t = Timeouts {
        acknowledge: secs(60),
        move_over: secs(120),
    };
    let peers = ["a", "b", "c"];
    let subsets = [set(&[]), set(&["a"]), set(&["b", "c"]), set(&peers)];
    let mut phases = vec![Phase::Steady { generation: 5 }];
    for revoke in [false, true] {
        phases.push(Phase::Prepared {
            generation: 5,
            since: at(0),
            revoke,
        });
        phases.push(Phase::Switched {
            generation: 5,
            since: at(0),
            revoke,
        });
    }
    let nows = [0, 1, 59, 60, 61, 119, 120, 121, 10_000].map(at);
    let mut cases = 0;
    for phase in phases {
        for (granted, revoking) in [(false, false), (true, false), (true, true)] {
            for approved in [false, true] {
                for acked in &subsets {
                    for moved_peers in &subsets {
                        for now in nows {
                            let obs = Observation {
                                granted,
                                revoke: revoking,
                                next_approved: approved,
                                peers: set(&peers),
                                acknowledged: acked.clone(),
                                moved: moved_peers.clone(),
                                api_current_since: Some(SystemTime::UNIX_EPOCH),
                            };
                            let (p1, a1) = step(phase, &obs, &t, now);
                            cases += 1;
                            assert_eq!(
                                step(phase, &obs, &t, now),
                                (p1, a1.clone()),
                                "deterministic"
                            );
                            // A grant (a new request, a revocation or not) during a rotation
                            // changes nothing: what it started as is in its phase.
                            if !is_steady(phase) {
                                for (g, r) in [(!granted, revoking), (granted, !revoking)] {
                                    let regranted = Observation {
                                        granted: g,
                                        revoke: r,
                                        ..obs.clone()
                                    };
                                    assert_eq!(step(phase, &regranted, &t, now), (p1, a1.clone()));
                                }
                            }
                            // A rotation is a revocation if its grant was one when it started,
                            // and retires as one.
                            let revoking_phase = |p: Phase| match p {
                                Phase::Steady { .. } => None,
                                Phase::Prepared { revoke, .. } | Phase::Switched { revoke, .. } => {
                                    Some(revoke)
                                }
                            };
                            match (revoking_phase(phase), revoking_phase(p1)) {
                                (None, Some(r)) => assert_eq!(r, revoking, "{phase:?} {obs:?}"),
                                (Some(r0), Some(r1)) => assert_eq!(r0, r1, "{phase:?} {obs:?}"),
                                _ => {}
                            }
                            for a in &a1 {
                                if let Action::Retire { revoke, .. } = a {
                                    assert_eq!(
                                        Some(*revoke),
                                        revoking_phase(phase),
                                        "{phase:?} {obs:?}"
                                    );
                                }
                            }
                            // The agent crashes after persisting `p1` and before doing any of
                            // `a1`, restarts, observes the same (its grant is stale once the
                            // generation moved) and steps again, now or later.
                            let after = Observation {
                                granted: granted && generation_of(p1) == generation_of(phase),
                                ..obs.clone()
                            };
                            for later in [now, now + secs(1), now + secs(3600)] {
                                let (p2, a2) = step(p1, &after, &t, later);
                                let ctx = format!(
                                    "{phase:?} {obs:?} {now:?}: {p1:?} {a1:?} -> {p2:?} {a2:?}"
                                );
                                // One rotation retires once.
                                assert!(generation_of(p2) - generation_of(phase) <= 1, "{ctx}");
                                if generation_of(p1) > generation_of(phase) {
                                    assert_eq!((p2, a2.clone()), (p1, vec![]), "{ctx}");
                                }
                                // What was lost is issued again, unless the rotation moved on.
                                // Retire, Abandon and Laggards are not: the phase after them
                                // re-issues nothing, so the agent applies them in the same
                                // atomic write as the phase (as the simulation does).
                                if p2 == p1 && a1.contains(&Action::Switch) {
                                    assert!(a2.contains(&Action::Switch), "{ctx}");
                                }
                                if p2 == p1 && a1.contains(&Action::PrepareNext) && !approved {
                                    assert_eq!(a2, vec![Action::PrepareNext], "{ctx}");
                                }
                                // A re-run never goes back, except by abandoning an unapproved key.
                                if rank(p2) < rank(p1) && generation_of(p2) == generation_of(p1) {
                                    assert_eq!(a2, vec![Action::Abandon], "{ctx}");
                                    assert!(!approved, "{ctx}");
                                }
                                // A new key is generated only from Steady.
                                if a2.contains(&Action::PrepareNext) && is_steady(p1) {
                                    assert!(after.granted, "{ctx}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    assert_eq!(cases, 5 * 3 * 2 * 4 * 4 * 9);
}

#[test]
fn a_clock_that_steps_back_never_fires_a_timeout() {
    let t = Timeouts {
        acknowledge: secs(60),
        move_over: secs(60),
    };
    let obs = Observation {
        granted: true,
        next_approved: false,
        peers: set(&["a"]),
        api_current_since: Some(SystemTime::UNIX_EPOCH),
        ..Default::default()
    };
    let prepared = Phase::Prepared {
        generation: 0,
        since: at(1000),
        revoke: false,
    };
    assert_eq!(
        step(prepared, &obs, &t, at(10)),
        (prepared, vec![Action::PrepareNext])
    );
    let approved = Observation {
        next_approved: true,
        ..obs
    };
    assert_eq!(step(prepared, &approved, &t, at(10)), (prepared, vec![]));
    let switched = Phase::Switched {
        generation: 0,
        since: at(1000),
        revoke: false,
    };
    assert_eq!(
        step(switched, &approved, &t, at(10)),
        (switched, vec![Action::Switch])
    );
}

// ---------------------------------------------------------------------------------------
// The simulation.
// ---------------------------------------------------------------------------------------

/// Extra time a rotation may take beyond its two timeouts: the ticks each hand-over needs
/// (grant, prepare, publish, approve, install, acknowledge, switch, session, quiet, retire),
/// and crashes and restarts on the way. Runs need up to about 15 s.
const ROTATION_SLACK: Duration = secs(60);

/// How often a handshake gets through (UDP loses some; WireGuard retries).
const HANDSHAKE_PER_MILLE: u64 = 700;

/// Ticks the settled mesh is watched for a rotation that should not happen.
const STABLE_TICKS: usize = 40;

macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err(format!($($arg)+));
        }
    };
}

/// A rotation request: of one node (`MeshPeer.spec.keyRotation`) or of the mesh.
#[derive(Debug, Clone, Copy)]
struct Request {
    node: Option<usize>,
    instant: SystemTime,
    issued: SystemTime,
    /// The request asks for a revocation (`spec.keyRotation.revoke`).
    revoke: bool,
}

/// One simulated run: the mesh, its rotation settings, and the faults injected into it.
#[derive(Debug, Clone)]
struct Config {
    seed: u64,
    nodes: usize,
    max_concurrent: usize,
    timeouts: Timeouts,
    interval: Option<Duration>,
    /// A node whose next keys the operator refuses to approve, until `approval_resumes`.
    broken: Option<usize>,
    approval_resumes: Option<SystemTime>,
    /// Agents that hang (laggards): node, from, until.
    stalls: Vec<(usize, SystemTime, SystemTime)>,
    /// When each node's first key was created.
    first_keys: Vec<SystemTime>,
    scripted: Vec<Request>,
    random_requests: bool,
    start: SystemTime,
    /// Requests stop here and the interval is switched off: the rest of the run drains.
    requests_until: SystemTime,
    agent_crash_per_mille: u64,
    operator_crash_per_mille: u64,
    /// A fixed tick, or a random 1–5 s.
    tick: Option<Duration>,
    /// The operator approves a next key only at its second look, forgets what it saw when it
    /// crashes, and stays down longer: approvals come later, sometimes after the acknowledge
    /// timeout.
    slow_operator: bool,
    /// The mesh has external peers (not simulated): an ordinary rotation keeps the retired
    /// key answered this long; a revocation does not.
    external_grace: Option<Duration>,
}

impl Config {
    fn random(seed: u64) -> Config {
        let mut r = Rng::new(seed);
        let nodes = r.range(2, 8) as usize;
        let max_concurrent = r.range(1, 3) as usize;
        let timeouts = Timeouts {
            acknowledge: secs(r.range(30, 90)),
            move_over: secs(r.range(20, 120)),
        };
        let interval = r.chance(500).then(|| secs(r.range(240, 900)));
        let start = at(1000);
        let requests_until = start + secs(r.range(600, 1500));
        let broken = r.chance(250).then(|| r.below(nodes));
        let mut scripted = Vec::new();
        if let Some(b) = broken {
            // It holds a slot until it abandons, then gives it up: with `maxConcurrent: 1`
            // the others wait for it once per request.
            let issued = start + secs(r.range(1, 300));
            scripted.push(Request {
                node: Some(b),
                instant: issued,
                issued,
                revoke: false,
            });
        }
        let mut stalls = Vec::new();
        if r.chance(500) {
            for _ in 0..r.range(1, 2) {
                let node = r.below(nodes);
                let from = start + secs(r.range(0, 900));
                let until = (from + secs(r.range(20, 400))).min(requests_until);
                stalls.push((node, from, until));
            }
        }
        let first_keys = (0..nodes).map(|_| at(r.range(0, 999))).collect();
        let external_grace = r.chance(500).then(|| secs(r.range(30, 300)));
        Config {
            seed,
            nodes,
            max_concurrent,
            timeouts,
            interval,
            broken,
            approval_resumes: None,
            stalls,
            first_keys,
            scripted,
            random_requests: true,
            start,
            requests_until,
            agent_crash_per_mille: 20,
            operator_crash_per_mille: 20,
            tick: None,
            slow_operator: false,
            external_grace,
        }
    }

    /// The node never gets a next key approved.
    fn refused_forever(&self, node: usize) -> bool {
        self.broken == Some(node) && self.approval_resumes.is_none()
    }
}

#[derive(Debug, Clone, Copy)]
struct Key {
    id: u64,
    created: SystemTime,
}

/// What an agent persisted, in one atomic write: the phase and its keys (the agent's own
/// keyring, with ids for keys).
type Disk = Keyring<Key>;

/// A node's WireGuard device: survives agent crashes.
#[derive(Debug, Clone)]
struct Device {
    initiating: u64,
    answered: Vec<u64>,
    /// Per peer (by index): the peer's keys this device accepts and may send under.
    installed: Vec<BTreeSet<u64>>,
}

impl Device {
    fn holds(&self, key: u64) -> bool {
        self.initiating == key || self.answered.contains(&key)
    }
}

/// A node's `MeshPeer` status, agent side.
#[derive(Debug, Clone)]
struct Status {
    public: u64,
    created: SystemTime,
    generation: i64,
    next: Option<u64>,
    /// The peers' keys its device installed, by public key (`installedKeys[].publicKey`):
    /// the acknowledgements of rotating peers, of one key each, never of a generation.
    installed: Vec<BTreeSet<u64>>,
    /// Rotation phase `Abandoned` of the current generation, since this instant.
    abandoned_at: Option<SystemTime>,
}

/// A rotation grant: the generation it is for and when the operator gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Grant {
    generation: i64,
    at: SystemTime,
    /// Given for a revocation.
    revoke: bool,
}

impl Grant {
    /// Whether the node, at `generation` and abandoned at `abandoned_at`, may still use it:
    /// a grant older than an abandonment of the same key is spent.
    fn live(&self, generation: i64, abandoned_at: Option<SystemTime>) -> bool {
        grant_in_force(self.generation, Some(self.at), generation, abandoned_at)
    }
}

/// A node's `MeshPeer` status, operator side.
#[derive(Debug, Clone)]
struct Approved {
    grant: Option<Grant>,
    current: u64,
    next: Option<u64>,
}

/// The cluster state both sides read and write.
#[derive(Debug, Clone)]
struct Api {
    status: Vec<Status>,
    approved: Vec<Approved>,
    requested_at: Vec<Option<SystemTime>>,
    /// Per node: its request is a revocation.
    revoke: Vec<bool>,
    policy: Policy,
}

/// One node: its agent's persisted state and its device, which outlives the agent.
#[derive(Debug, Clone)]
struct Agent {
    disk: Disk,
    device: Device,
    /// Ticks a crashed agent stays down.
    down: u64,
    /// Set by a crash or a stall: reconfigure the device from disk on the way back.
    restarting: bool,
    /// When the rotation under way entered Prepared and Switched, as the simulation saw it.
    prepared_at: Option<SystemTime>,
    switched_at: Option<SystemTime>,
    /// The agent hung during the rotation under way, which may then take as long.
    stalled_in_rotation: bool,
}

/// What the runs went through, summed over seeds, so a test can tell that they exercised
/// what they claim to.
#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    runs: u64,
    ticks: u64,
    simulated_secs: u64,
    rotations: u64,
    rotations_with_laggards: u64,
    abandons: u64,
    slow_approval_abandons: u64,
    /// A peer installed a next key its node had already abandoned: the approval crossed
    /// the abandonment (counted once per peer and key).
    crossed_approvals: u64,
    /// Grants the operator revoked because the node abandoned after them.
    grants_revoked: u64,
    /// Rotations started again, by a newer request, after an abandonment of the same key.
    retries_after_abandon: u64,
    /// Rotations started while an abandoned key was still answered.
    prepared_with_previous: u64,
    /// Abandoned keys deleted at their deadline.
    previous_keys_deleted: u64,
    /// Rotations that completed as revocations; of those, the ones that stopped answering
    /// keys retired or abandoned before; ordinary rotations that kept the retired key for
    /// external peers.
    revocations: u64,
    revocations_dropping_earlier_keys: u64,
    retired_keys_kept: u64,
    grants: u64,
    node_requests: u64,
    mesh_requests: u64,
    requests_during_rotation: u64,
    requests_before_key: u64,
    crashes_before_step: u64,
    crashes_after_persist: u64,
    operator_crashes: u64,
    stalls: u64,
    ack_laggards: u64,
    move_laggards: u64,
    quiet_deferrals: u64,
    ticks_with_concurrent_rotations: u64,
    max_rotating: u64,
    /// The longest rotation without laggards; the most any rotation took beyond its two
    /// timeouts; the longest drain after the last request, in percent of its bound.
    longest_prompt_rotation_secs: u64,
    longest_overrun_secs: u64,
    longest_drain_secs: u64,
    longest_drain_percent_of_bound: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.runs += o.runs;
        self.ticks += o.ticks;
        self.simulated_secs += o.simulated_secs;
        self.rotations += o.rotations;
        self.rotations_with_laggards += o.rotations_with_laggards;
        self.abandons += o.abandons;
        self.slow_approval_abandons += o.slow_approval_abandons;
        self.crossed_approvals += o.crossed_approvals;
        self.grants_revoked += o.grants_revoked;
        self.retries_after_abandon += o.retries_after_abandon;
        self.prepared_with_previous += o.prepared_with_previous;
        self.previous_keys_deleted += o.previous_keys_deleted;
        self.revocations += o.revocations;
        self.revocations_dropping_earlier_keys += o.revocations_dropping_earlier_keys;
        self.retired_keys_kept += o.retired_keys_kept;
        self.grants += o.grants;
        self.node_requests += o.node_requests;
        self.mesh_requests += o.mesh_requests;
        self.requests_during_rotation += o.requests_during_rotation;
        self.requests_before_key += o.requests_before_key;
        self.crashes_before_step += o.crashes_before_step;
        self.crashes_after_persist += o.crashes_after_persist;
        self.operator_crashes += o.operator_crashes;
        self.stalls += o.stalls;
        self.ack_laggards += o.ack_laggards;
        self.move_laggards += o.move_laggards;
        self.quiet_deferrals += o.quiet_deferrals;
        self.ticks_with_concurrent_rotations += o.ticks_with_concurrent_rotations;
        self.max_rotating = self.max_rotating.max(o.max_rotating);
        self.longest_prompt_rotation_secs = self
            .longest_prompt_rotation_secs
            .max(o.longest_prompt_rotation_secs);
        self.longest_overrun_secs = self.longest_overrun_secs.max(o.longest_overrun_secs);
        self.longest_drain_secs = self.longest_drain_secs.max(o.longest_drain_secs);
        self.longest_drain_percent_of_bound = self
            .longest_drain_percent_of_bound
            .max(o.longest_drain_percent_of_bound);
    }
}

/// Which step of which node a failed check is about; formatted only when one fails.
#[derive(Debug)]
struct StepCtx<'a> {
    seed: u64,
    at: Duration,
    node: &'a str,
    before: Phase,
    after: Phase,
    actions: &'a [Action],
}

impl std::fmt::Display for StepCtx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {} at +{:.1}s: {} {:?} -> {:?} {:?}",
            self.seed,
            self.at.as_secs_f64(),
            self.node,
            self.before,
            self.after,
            self.actions
        )
    }
}

#[derive(Debug)]
struct Sim {
    cfg: Config,
    rng: Rng,
    names: Vec<String>,
    index: BTreeMap<String, usize>,
    now: SystemTime,
    api: Api,
    agents: Vec<Agent>,
    operator_down: u64,
    /// A slow operator's memory: the next key it saw on each node at its last look.
    seen_next: Vec<Option<u64>>,
    /// Per node: the peers it named as laggards that have not caught up since.
    excused: Vec<BTreeSet<usize>>,
    /// (peer, node's key) → when the peer's session under that key of the node came up.
    established: BTreeMap<(usize, u64), SystemTime>,
    /// (peer, node's key) → when data from the peer under that key of the node last arrived.
    last_data: BTreeMap<(usize, u64), SystemTime>,
    /// (peer, node) → the node's key the peer sent under at the last tick.
    sending_under: BTreeMap<(usize, usize), u64>,
    /// Status the agents wrote this tick, applied once the operator has read the old.
    published: Vec<(usize, Status)>,
    /// (peer, node, key) for each abandoned key of a node a peer installed.
    crossed: BTreeSet<(usize, usize, u64)>,
    /// Per node: the instants of every request that applied to it, its own or the mesh's.
    request_log: Vec<Vec<SystemTime>>,
    key_ids: u64,
    last_request: SystemTime,
    stats: Stats,
    /// `ROTATION_TRACE=<seed>` prints every tick of that seed's run.
    trace: bool,
}

impl Sim {
    fn new(cfg: Config) -> Sim {
        let n = cfg.nodes;
        let names: Vec<String> = (0..n).map(|i| format!("node-{i}")).collect();
        let index = names.iter().cloned().zip(0..).collect();
        let keys: Vec<Key> = (0..n)
            .map(|i| Key {
                id: i as u64 + 1,
                created: cfg.first_keys[i],
            })
            .collect();
        let installed = |me: usize| -> Vec<BTreeSet<u64>> {
            (0..n)
                .map(|p| {
                    if p == me {
                        BTreeSet::new()
                    } else {
                        BTreeSet::from([keys[p].id])
                    }
                })
                .collect()
        };
        let agents = (0..n)
            .map(|i| Agent {
                disk: Disk {
                    phase: Phase::Steady { generation: 0 },
                    current: keys[i],
                    next: None,
                    previous: Vec::new(),
                    laggards: Vec::new(),
                    revoked: false,
                    abandoned_at: None,
                },
                device: Device {
                    initiating: keys[i].id,
                    answered: vec![],
                    installed: installed(i),
                },
                down: 0,
                restarting: false,
                prepared_at: None,
                switched_at: None,
                stalled_in_rotation: false,
            })
            .collect();
        let api = Api {
            status: (0..n)
                .map(|i| Status {
                    public: keys[i].id,
                    created: keys[i].created,
                    generation: 0,
                    next: None,
                    installed: installed(i),
                    abandoned_at: None,
                })
                .collect(),
            approved: (0..n)
                .map(|i| Approved {
                    grant: None,
                    current: keys[i].id,
                    next: None,
                })
                .collect(),
            requested_at: vec![None; n],
            revoke: vec![false; n],
            policy: Policy {
                mesh_requested_at: None,
                mesh_revoke: false,
                interval: cfg.interval,
                max_concurrent: cfg.max_concurrent,
            },
        };
        Sim {
            rng: Rng::new(cfg.seed ^ 0x5EED),
            now: cfg.start,
            last_request: cfg.start,
            names,
            index,
            api,
            agents,
            operator_down: 0,
            seen_next: vec![None; n],
            excused: vec![BTreeSet::new(); n],
            established: BTreeMap::new(),
            last_data: BTreeMap::new(),
            sending_under: BTreeMap::new(),
            published: Vec::new(),
            crossed: BTreeSet::new(),
            request_log: vec![Vec::new(); n],
            trace: std::env::var("ROTATION_TRACE").is_ok_and(|v| v == cfg.seed.to_string()),
            key_ids: n as u64,
            stats: Stats {
                runs: 1,
                ..Stats::default()
            },
            cfg,
        }
    }

    fn n(&self) -> usize {
        self.cfg.nodes
    }

    /// An instant as seconds since the start of the run, for messages.
    fn since_start(&self, t: SystemTime) -> f64 {
        match t.duration_since(self.cfg.start) {
            Ok(d) => d.as_secs_f64(),
            Err(e) => -e.duration().as_secs_f64(),
        }
    }

    fn when(&self) -> String {
        let t = self.now.duration_since(self.cfg.start).unwrap_or_default();
        format!("seed {} at +{:.1}s", self.cfg.seed, t.as_secs_f64())
    }

    fn describe(&self) -> String {
        let mut out = format!(
            "{} (nodes {}, max {}, {:?}, interval {:?}, broken {:?}, stalls {:?}, operator down {})\n",
            self.when(),
            self.n(),
            self.cfg.max_concurrent,
            self.cfg.timeouts,
            self.cfg.interval,
            self.cfg.broken,
            self.cfg.stalls,
            self.operator_down,
        );
        for (i, a) in self.agents.iter().enumerate() {
            let view = self.view_of(i);
            out += &format!(
                "  {}: {:?} key {} next {:?} previous {:?} abandoned {:?} | status gen {} next {:?} | grant {:?} approved {}/{:?} | due {:?} | excused {:?} | peers send to it under {:?}\n",
                self.names[i],
                a.disk.phase,
                a.disk.current.id,
                a.disk.next.map(|k| k.id),
                a.disk
                    .previous
                    .iter()
                    .map(|(k, until)| (k.id, self.since_start(*until)))
                    .collect::<Vec<_>>(),
                a.disk.abandoned_at.map(|t| self.since_start(t)),
                self.api.status[i].generation,
                self.api.status[i].next,
                self.api.approved[i]
                    .grant
                    .map(|g| (g.generation, self.since_start(g.at))),
                self.api.approved[i].current,
                self.api.approved[i].next,
                expected_due(&view, &self.api.policy, self.now),
                self.excused[i],
                (0..self.n())
                    .filter(|p| *p != i)
                    .map(|p| self.sending_under.get(&(p, i)).copied())
                    .collect::<Vec<_>>(),
            );
        }
        out
    }

    /// The truth about a node's key, for the oracle.
    fn view_of(&self, i: usize) -> NodeKeyView {
        NodeKeyView {
            name: self.names[i].clone(),
            key_created_at: self.agents[i].disk.current.created,
            requested_at: self.api.requested_at[i],
            revoke: self.api.revoke[i],
            rotating: false,
            abandoned_at: self.agents[i].disk.abandoned_at,
        }
    }

    fn stalled(&self, i: usize) -> bool {
        self.cfg
            .stalls
            .iter()
            .any(|&(node, from, until)| node == i && from <= self.now && self.now < until)
    }

    fn tick(&mut self) -> Result<(), String> {
        let dt = match self.cfg.tick {
            Some(dt) => dt,
            None => self.rng.millis(1000, 5000),
        };
        let prev = self.now;
        self.now += dt;
        self.stats.ticks += 1;
        self.requests(prev);
        self.traffic(prev)?;
        // Both sides read the API as it was at the start of the tick: the agents see what the
        // operator writes now at the next tick, and the other way round. The agents go first,
        // their status writes held back until the operator has read the old ones.
        for i in 0..self.n() {
            self.agent(i)?;
        }
        self.operator()?;
        for (i, status) in std::mem::take(&mut self.published).into_iter() {
            self.api.status[i] = status;
        }
        if self.trace {
            eprintln!("{}", self.describe());
        }
        let rotating = self
            .agents
            .iter()
            .filter(|a| !is_steady(a.disk.phase))
            .count();
        ensure!(
            rotating <= self.cfg.max_concurrent.max(1),
            "{}: {rotating} nodes rotate at once, max {}\n{}",
            self.when(),
            self.cfg.max_concurrent,
            self.describe()
        );
        self.stats.max_rotating = self.stats.max_rotating.max(rotating as u64);
        if rotating >= 2 {
            self.stats.ticks_with_concurrent_rotations += 1;
        }
        for m in (0..self.n()).filter(|m| self.cfg.refused_forever(*m)) {
            let a = &self.agents[m];
            ensure!(
                generation_of(a.disk.phase) == 0 && !matches!(a.disk.phase, Phase::Switched { .. }),
                "{}: {} switched or retired without an approved key",
                self.when(),
                self.names[m]
            );
            for p in (0..self.n()).filter(|p| *p != m) {
                ensure!(
                    self.agents[p].device.installed[m] == BTreeSet::from([a.disk.current.id]),
                    "{}: {} installed a key of {} the operator never approved",
                    self.when(),
                    self.names[p],
                    self.names[m]
                );
            }
        }
        Ok(())
    }

    fn requests(&mut self, prev: SystemTime) {
        let now = self.now;
        let mut issued: Vec<Request> = self
            .cfg
            .scripted
            .iter()
            .filter(|r| prev < r.issued && r.issued <= now)
            .copied()
            .collect();
        if self.cfg.random_requests && now < self.cfg.requests_until {
            // Instants from two minutes ago (often before the key) to a minute ahead.
            if self.rng.chance(30) {
                let node = self.rng.below(self.n());
                let instant = now + self.rng.millis(0, 180_000) - secs(120);
                let revoke = self.rng.chance(250);
                issued.push(Request {
                    node: Some(node),
                    instant,
                    issued: now,
                    revoke,
                });
            }
            if self.rng.chance(8) {
                let instant = now + self.rng.millis(0, 120_000) - secs(60);
                let revoke = self.rng.chance(250);
                issued.push(Request {
                    node: None,
                    instant,
                    issued: now,
                    revoke,
                });
            }
        }
        for r in issued {
            self.last_request = self.last_request.max(r.instant);
            let targets: Vec<usize> = match r.node {
                Some(node) => {
                    self.api.requested_at[node] = Some(r.instant);
                    self.api.revoke[node] = r.revoke;
                    self.stats.node_requests += 1;
                    vec![node]
                }
                None => {
                    self.api.policy.mesh_requested_at = Some(r.instant);
                    self.api.policy.mesh_revoke = r.revoke;
                    self.stats.mesh_requests += 1;
                    (0..self.n()).collect()
                }
            };
            for t in targets {
                self.request_log[t].push(r.instant);
                let a = &self.agents[t];
                if !is_steady(a.disk.phase) {
                    self.stats.requests_during_rotation += 1;
                }
                if r.instant <= a.disk.current.created {
                    self.stats.requests_before_key += 1;
                }
            }
        }
    }

    /// Every peer sends to every node. It keeps its session under a key of the node while it
    /// still trusts that key and the node answers it, and initiates towards the newest key of
    /// the node it installed as soon as it knows it; the handshake gets through unless lost
    /// (then it stays on the old session and retries at the next tick). The node must know
    /// the key the peer initiates with. A peer losing a session, or finding no key of the node
    /// it can reach, is a cut-off, allowed only towards a peer the node named a laggard; a
    /// node that does not know the key a peer initiates with, only if the peer named it.
    fn traffic(&mut self, prev: SystemTime) -> Result<(), String> {
        let now = self.now;
        let n = self.n();
        let span = now
            .duration_since(prev)
            .unwrap_or_default()
            .min(secs(1))
            .as_millis() as u64;
        for p in 0..n {
            for m in (0..n).filter(|m| *m != p) {
                let trusted = self.agents[p].device.installed[m].clone();
                let newest = *trusted
                    .last()
                    .ok_or_else(|| format!("{}: {p} knows no key of {m}", self.when()))?;
                let own = self.agents[p].device.initiating;
                let node = &self.agents[m].device;
                let knows = node.installed[p].contains(&own);
                let excused = self.excused[m].contains(&p);
                let peer = &self.names[p];
                let name = &self.names[m];
                ensure!(
                    knows || self.excused[p].contains(&m),
                    "{}: {peer} initiates with its key {own}, which {name} never installed, and {peer} never named {name} a laggard\n{}",
                    self.when(),
                    self.describe()
                );
                // `device_keys`' promise: a peer that learns a next key can reach the node
                // under it, because the node answers it from the moment it exists, and an
                // abandoned one until peers have dropped it (or were named laggards).
                let current = self.agents[m].disk.current.id;
                for &k in trusted.range(current + 1..) {
                    ensure!(
                        node.holds(k) || excused,
                        "{}: {peer} learned key {k} of {name}, newer than its current {current}, which {name} does not hold, and {name} never named {peer} a laggard\n{}",
                        self.when(),
                        self.describe()
                    );
                }
                let mut using = self
                    .sending_under
                    .get(&(p, m))
                    .copied()
                    .filter(|k| trusted.contains(k));
                if let Some(k) = using
                    && !node.holds(k)
                {
                    ensure!(
                        excused,
                        "{}: {name} dropped key {k} while {peer} still sends under it, and never named {peer} a laggard\n{}",
                        self.when(),
                        self.describe()
                    );
                    using = None;
                }
                ensure!(
                    trusted.iter().any(|k| node.holds(*k)) || excused,
                    "{}: {peer} knows no key {name} answers ({trusted:?}), and {name} never named {peer} a laggard\n{}",
                    self.when(),
                    self.describe()
                );
                let handshake = using != Some(newest)
                    && node.holds(newest)
                    && knows
                    && self.rng.chance(HANDSHAKE_PER_MILLE);
                if handshake {
                    let up = now - Duration::from_millis(self.rng.range(0, span));
                    self.established.entry((p, newest)).or_insert(up);
                    // Packets sent under the old session just before the move still land.
                    if let Some(old) = using {
                        let straggler = now - self.rng.millis(0, 1500);
                        let last = self.last_data.entry((p, old)).or_insert(straggler);
                        *last = (*last).max(straggler);
                    }
                    using = Some(newest);
                }
                match using {
                    Some(k) if knows => {
                        let arrived = now - Duration::from_millis(self.rng.range(0, span.min(300)));
                        let last = self.last_data.entry((p, k)).or_insert(arrived);
                        *last = (*last).max(arrived);
                        self.sending_under.insert((p, m), k);
                    }
                    _ => {
                        self.sending_under.remove(&(p, m));
                    }
                }
            }
        }
        // A named peer has caught up once it installed every key the node holds on disk, so
        // that whichever the node initiates with next, the peer knows it.
        for m in 0..n {
            let disk = &self.agents[m].disk;
            let keys: BTreeSet<u64> = std::iter::once(disk.current.id)
                .chain(disk.next.map(|k| k.id))
                .collect();
            let agents = &self.agents;
            self.excused[m].retain(|&p| !agents[p].device.installed[m].is_superset(&keys));
        }
        Ok(())
    }

    fn operator(&mut self) -> Result<(), String> {
        if self.operator_down > 0 {
            self.operator_down -= 1;
            return Ok(());
        }
        if self.rng.chance(self.cfg.operator_crash_per_mille) {
            // It keeps nothing outside status (grants and approvals are there): a crash
            // costs only the ticks it is down. A slow operator also takes a leader election
            // to come back: up to about a minute.
            let longest = if self.cfg.slow_operator { 15 } else { 3 };
            self.operator_down = self.rng.range(1, longest);
            self.seen_next = vec![None; self.n()];
            self.stats.operator_crashes += 1;
            return Ok(());
        }
        let now = self.now;
        for i in 0..self.n() {
            let st = &self.api.status[i];
            let ap = &mut self.api.approved[i];
            ap.current = st.public;
            // A grant is spent once the key it was for is retired, or once the node reports
            // it abandoned a rotation of that key after the grant was given.
            if let Some(g) = ap.grant
                && !g.live(st.generation, st.abandoned_at)
            {
                ap.grant = None;
                if g.generation == st.generation {
                    self.stats.grants_revoked += 1;
                }
            }
            // Only the next key the status publishes now is approved: an approval of a key
            // no longer published is dropped.
            match st.next {
                None => ap.next = None,
                Some(k) => {
                    // The key published a tick ago; a refused one also withdraws any approval
                    // of an earlier key.
                    let refused = self.cfg.broken == Some(i)
                        && self.cfg.approval_resumes.is_none_or(|t| now < t);
                    let seen = self.seen_next[i].replace(k);
                    let looked = !self.cfg.slow_operator || seen == Some(k);
                    let approved = ap.next == Some(k) && !refused;
                    ap.next = (approved || (!refused && looked)).then_some(k);
                }
            }
        }
        let views: Vec<NodeKeyView> = (0..self.n())
            .map(|i| {
                let st = &self.api.status[i];
                NodeKeyView {
                    name: self.names[i].clone(),
                    key_created_at: st.created,
                    requested_at: self.api.requested_at[i],
                    revoke: self.api.revoke[i],
                    rotating: self.api.approved[i]
                        .grant
                        .is_some_and(|g| g.live(st.generation, st.abandoned_at))
                        || st.next.is_some(),
                    abandoned_at: st.abandoned_at,
                }
            })
            .collect();
        let policy = self.api.policy;
        let granted = schedule(&views, &policy, now);
        let busy = views.iter().filter(|v| v.rotating).count();
        ensure!(
            granted.len() <= policy.max_concurrent.max(1).saturating_sub(busy),
            "{}: {} grants with {busy} rotating",
            self.when(),
            granted.len()
        );
        for (name, why) in granted {
            let i = self.node(&name)?;
            ensure!(
                !views[i].rotating,
                "{}: {name} granted while rotating",
                self.when()
            );
            ensure!(
                expected_due(&views[i], &policy, now) == Some(why),
                "{}: {name} granted for {why:?} but the oracle says {:?}: {:?}",
                self.when(),
                expected_due(&views[i], &policy, now),
                views[i]
            );
            self.api.approved[i].grant = Some(Grant {
                generation: self.api.status[i].generation,
                at: now,
                revoke: why.revokes(),
            });
            self.stats.grants += 1;
        }
        Ok(())
    }

    fn node(&self, name: &str) -> Result<usize, String> {
        self.index
            .get(name)
            .copied()
            .ok_or_else(|| format!("{}: unknown peer {name}", self.when()))
    }

    fn crash(&mut self, i: usize) {
        self.agents[i].down = self.rng.range(0, 2);
        self.agents[i].restarting = true;
    }

    fn agent(&mut self, i: usize) -> Result<(), String> {
        let now = self.now;
        if self.stalled(i) {
            let a = &mut self.agents[i];
            if !a.restarting {
                self.stats.stalls += 1;
            }
            a.restarting = true;
            if !is_steady(a.disk.phase) {
                a.stalled_in_rotation = true;
            }
            return Ok(());
        }
        if self.agents[i].down > 0 {
            self.agents[i].down -= 1;
            return Ok(());
        }
        if self.rng.chance(self.cfg.agent_crash_per_mille) {
            self.crash(i);
            self.stats.crashes_before_step += 1;
            return Ok(());
        }
        if self.agents[i].restarting {
            self.configure_device(i)?;
            self.agents[i].restarting = false;
        }
        // Install every peer's keys as the operator approved them.
        for p in (0..self.n()).filter(|p| *p != i) {
            let ap = &self.api.approved[p];
            if let Some(k) = ap.next
                && self.agents[p]
                    .disk
                    .previous
                    .iter()
                    .any(|(key, _)| key.id == k)
            {
                self.crossed.insert((i, p, k));
            }
            self.agents[i].device.installed[p] =
                std::iter::once(ap.current).chain(ap.next).collect();
        }
        // Previous keys whose deadline passed are deleted (a write of their own; the device
        // drops them when it is next configured).
        let disk = &mut self.agents[i].disk;
        let held = disk.previous.len();
        disk.previous.retain(|(_, until)| *until > now);
        self.stats.previous_keys_deleted += (held - disk.previous.len()) as u64;
        let obs = self.observe(i);
        let before = self.agents[i].disk.phase;
        let (after, actions) = step(before, &obs, &self.cfg.timeouts, now);
        for action in &actions {
            if let Action::Laggards { step, peers } = action {
                ensure!(
                    !peers.is_empty() && peers.iter().all(|p| obs.peers.contains(p)),
                    "{}: {} names laggards {peers:?} among {:?}",
                    self.when(),
                    self.names[i],
                    obs.peers
                );
                for p in peers {
                    let p = self.node(p)?;
                    self.excused[i].insert(p);
                }
                match step {
                    LaggardStep::Acknowledge => self.stats.ack_laggards += peers.len() as u64,
                    LaggardStep::MoveOver => self.stats.move_laggards += peers.len() as u64,
                }
            }
        }
        self.check_step(i, before, after, &actions, &obs)?;
        self.persist(i, after, &actions)?;
        if self.rng.chance(self.cfg.agent_crash_per_mille) {
            // After the atomic write, before the device and the status.
            self.crash(i);
            self.stats.crashes_after_persist += 1;
            return Ok(());
        }
        self.configure_device(i)?;
        if actions
            .iter()
            .any(|a| matches!(a, Action::Retire { revoke: true, .. }))
        {
            // What a peer holding only an old key finds: nothing of the node answers it.
            let a = &self.agents[i];
            ensure!(
                a.device.initiating == a.disk.current.id && a.device.answered.is_empty(),
                "{}: {} still answers {:?} after a revocation\n{}",
                self.when(),
                self.names[i],
                a.device.answered,
                self.describe()
            );
        }
        self.publish(i);
        Ok(())
    }

    fn observe(&mut self, i: usize) -> Observation {
        let now = self.now;
        let a = &self.agents[i];
        let next = a.disk.next.map(|k| k.id);
        let others: Vec<usize> = (0..self.n()).filter(|p| *p != i).collect();
        let sessions: Vec<SessionView> = others
            .iter()
            .map(|&p| SessionView {
                peer: self.names[p].clone(),
                next_key_session: next.and_then(|k| self.established.get(&(p, k)).copied()),
                old_key_last_data: self.last_data.get(&(p, a.disk.current.id)).copied(),
            })
            .collect();
        let moved_peers = moved(&sessions, now);
        self.stats.quiet_deferrals += sessions
            .iter()
            .filter(|s| {
                s.next_key_session.is_some_and(|t| t <= now) && !moved_peers.contains(&s.peer)
            })
            .count() as u64;
        Observation {
            // A grant given before this key's rotation was abandoned is spent.
            granted: self.api.approved[i]
                .grant
                .is_some_and(|g| g.live(generation_of(a.disk.phase), a.disk.abandoned_at)),
            revoke: self.api.approved[i].grant.is_some_and(|g| g.revoke),
            next_approved: next.is_some() && self.api.approved[i].next == next,
            peers: others.iter().map(|&p| self.names[p].clone()).collect(),
            // By key: a peer that installed an abandoned key of the same generation has not
            // acknowledged this one.
            acknowledged: others
                .iter()
                .filter(|&&p| next.is_some_and(|k| self.api.status[p].installed[i].contains(&k)))
                .map(|&p| self.names[p].clone())
                .collect(),
            moved: moved_peers,
            // The simulated API never goes away: its delays are the stale reads above.
            api_current_since: Some(SystemTime::UNIX_EPOCH),
        }
    }

    fn check_step(
        &mut self,
        i: usize,
        before: Phase,
        after: Phase,
        actions: &[Action],
        obs: &Observation,
    ) -> Result<(), String> {
        let now = self.now;
        let t = self.cfg.timeouts;
        let ctx = StepCtx {
            seed: self.cfg.seed,
            at: self.now.duration_since(self.cfg.start).unwrap_or_default(),
            node: &self.names[i],
            before,
            after,
            actions,
        };
        let named = |which: LaggardStep| -> BTreeSet<String> {
            actions
                .iter()
                .filter_map(|a| match a {
                    Action::Laggards { step, peers } if *step == which => Some(peers.clone()),
                    _ => None,
                })
                .flatten()
                .collect()
        };
        let others: Vec<usize> = (0..self.n()).filter(|p| *p != i).collect();
        let a = &self.agents[i];
        let elapsed = |since: Option<SystemTime>| {
            since
                .and_then(|s| now.duration_since(s).ok())
                .ok_or_else(|| format!("{ctx}: no record of when the phase began"))
        };
        let (g0, g1) = (generation_of(before), generation_of(after));
        match (before, after) {
            (Phase::Steady { .. }, Phase::Steady { .. }) => {
                ensure!(actions.is_empty() && g0 == g1, "{ctx}");
            }
            (Phase::Steady { .. }, Phase::Prepared { since, .. }) => {
                ensure!(obs.granted, "{ctx}: without a grant");
                ensure!(
                    actions == [Action::PrepareNext] && since == now && g0 == g1,
                    "{ctx}"
                );
                ensure!(
                    a.disk.next.is_none(),
                    "{ctx}: an old next key is still on disk"
                );
                if let Some(abandoned) = a.disk.abandoned_at {
                    // Only a request made after the abandonment starts another rotation (a
                    // later request may have replaced it since the grant).
                    let newer = self.request_log[i]
                        .iter()
                        .any(|&r| abandoned < r && r <= now);
                    ensure!(
                        newer,
                        "{ctx}: starts again without a request made after its abandonment at +{:.1}s",
                        self.since_start(abandoned)
                    );
                    self.stats.retries_after_abandon += 1;
                }
                if !a.disk.previous.is_empty() {
                    self.stats.prepared_with_previous += 1;
                }
                let a = &mut self.agents[i];
                a.prepared_at = Some(now);
                a.switched_at = None;
                a.stalled_in_rotation = false;
            }
            (Phase::Prepared { since: s0, .. }, Phase::Prepared { since: s1, .. }) => {
                ensure!(s0 == s1 && g0 == g1, "{ctx}");
                let expected: &[Action] = if obs.next_approved {
                    &[]
                } else {
                    &[Action::PrepareNext]
                };
                ensure!(actions == expected, "{ctx}");
            }
            (Phase::Prepared { .. }, Phase::Steady { .. }) => {
                ensure!(actions == [Action::Abandon] && g0 == g1, "{ctx}");
                ensure!(!obs.next_approved, "{ctx}: abandons an approved key");
                ensure!(
                    elapsed(a.prepared_at)? >= t.acknowledge,
                    "{ctx}: before the timeout"
                );
                self.stats.abandons += 1;
                if self.cfg.broken != Some(i) {
                    // The operator was down too long: legitimate, and rare but for a slow one.
                    self.stats.slow_approval_abandons += 1;
                }
            }
            (Phase::Prepared { .. }, Phase::Switched { since, .. }) => {
                ensure!(obs.next_approved, "{ctx}: switches to an unapproved key");
                ensure!(
                    actions.last() == Some(&Action::Switch) && since == now && g0 == g1,
                    "{ctx}"
                );
                let late = named(LaggardStep::Acknowledge);
                if !late.is_empty() {
                    ensure!(
                        elapsed(a.prepared_at)? >= t.acknowledge,
                        "{ctx}: laggards before the timeout"
                    );
                }
                let next = a.disk.next.ok_or_else(|| format!("{ctx}: no next key"))?.id;
                for &p in &others {
                    let name = &self.names[p];
                    ensure!(
                        obs.acknowledged.contains(name) || late.contains(name),
                        "{ctx}: {name} neither acknowledged nor named"
                    );
                    ensure!(
                        self.excused[i].contains(&p)
                            || self.agents[p].device.installed[i].contains(&next),
                        "{ctx}: initiates with key {next}, which {name} has not installed, without naming it\n{}",
                        self.describe()
                    );
                }
                self.agents[i].switched_at = Some(now);
            }
            (Phase::Switched { since: s0, .. }, Phase::Switched { since: s1, .. }) => {
                ensure!(s0 == s1 && g0 == g1 && actions == [Action::Switch], "{ctx}");
            }
            (Phase::Switched { .. }, Phase::Steady { .. }) => {
                ensure!(
                    g1 == g0 + 1,
                    "{ctx}: the generation must grow by exactly one"
                );
                let Phase::Switched { revoke, .. } = before else {
                    unreachable!()
                };
                let late = named(LaggardStep::MoveOver);
                ensure!(
                    actions.last()
                        == Some(&Action::Retire {
                            generation: g1,
                            revoke,
                            laggards: !late.is_empty(),
                        }),
                    "{ctx}: the retirement says whether laggards remain"
                );
                if !late.is_empty() {
                    ensure!(
                        elapsed(a.switched_at)? >= t.move_over,
                        "{ctx}: laggards before the timeout"
                    );
                }
                let old = a.disk.current.id;
                for &p in &others {
                    let name = &self.names[p];
                    ensure!(
                        obs.moved.contains(name) || late.contains(name),
                        "{ctx}: {name} neither moved nor named"
                    );
                    if self.excused[i].contains(&p) {
                        continue;
                    }
                    ensure!(
                        self.sending_under.get(&(p, i)) != Some(&old),
                        "{ctx}: retires key {old}, which {name} still sends under, without naming it\n{}",
                        self.describe()
                    );
                    let last = self.last_data.get(&(p, old)).copied();
                    ensure!(
                        last.is_none_or(|l| now.duration_since(l).is_ok_and(|d| d >= MOVE_QUIET)),
                        "{ctx}: data from {name} under key {old} arrived {last:?}, within MOVE_QUIET"
                    );
                }
                let took = elapsed(a.prepared_at)?;
                if !a.stalled_in_rotation {
                    let over = took.saturating_sub(t.acknowledge + t.move_over);
                    ensure!(over <= ROTATION_SLACK, "{ctx}: the rotation took {took:?}");
                    self.stats.longest_overrun_secs =
                        self.stats.longest_overrun_secs.max(over.as_secs());
                }
                let laggards = actions.iter().any(|a| matches!(a, Action::Laggards { .. }));
                if laggards {
                    self.stats.rotations_with_laggards += 1;
                } else if !a.stalled_in_rotation {
                    self.stats.longest_prompt_rotation_secs =
                        self.stats.longest_prompt_rotation_secs.max(took.as_secs());
                }
                self.stats.rotations += 1;
                let a = &mut self.agents[i];
                a.prepared_at = None;
                a.switched_at = None;
            }
            _ => return Err(format!("{ctx}: not a transition of the protocol")),
        }
        Ok(())
    }

    /// The atomic write: the phase with the keys the actions imply, as the agent makes it
    /// (`Keyring::advance`).
    fn persist(&mut self, i: usize, phase: Phase, actions: &[Action]) -> Result<(), String> {
        let now = self.now;
        let when = self.when();
        let retention = Retention {
            acknowledge: self.cfg.timeouts.acknowledge,
            grace: self.cfg.external_grace.unwrap_or_default(),
            external_peers: self.cfg.external_grace.is_some(),
        };
        let id = self.key_ids + 1;
        let (disk, done) = self.agents[i]
            .disk
            .advance(
                phase,
                actions,
                now,
                &retention,
                |_| Key { id, created: now },
                |_, _| {},
            )
            .map_err(|e| format!("{when}: {e}"))?;
        if disk.current.id == id || disk.next.is_some_and(|k| k.id == id) {
            self.key_ids = id;
        }
        if done.retired {
            if disk.revoked {
                self.stats.revocations += 1;
                self.stats.revocations_dropping_earlier_keys += u64::from(done.dropped > 0);
            } else if done.retired_kept {
                self.stats.retired_keys_kept += 1;
            }
        }
        self.agents[i].disk = disk;
        Ok(())
    }

    fn configure_device(&mut self, i: usize) -> Result<(), String> {
        let when = self.when();
        let a = &mut self.agents[i];
        let disk = &a.disk;
        let keys = |role: KeyRole| -> Result<Vec<u64>, String> {
            match role {
                KeyRole::Current => Ok(vec![disk.current.id]),
                KeyRole::Next => disk
                    .next
                    .map(|k| vec![k.id])
                    .ok_or_else(|| format!("{when}: {:?} needs a next key", disk.phase)),
                KeyRole::Previous => Ok(disk.previous.iter().map(|(k, _)| k.id).collect()),
            }
        };
        let (initiating, answered) = device_keys(disk.phase, !disk.previous.is_empty());
        let initiating = match keys(initiating)?[..] {
            [k] => k,
            ref held => return Err(format!("{when}: initiates with {held:?}, not one key")),
        };
        let mut answered_keys = Vec::new();
        for role in answered {
            let held = keys(role)?;
            ensure!(
                !held.is_empty(),
                "{when}: answers {role:?} keys, but holds none"
            );
            answered_keys.extend(held);
        }
        let answered = answered_keys;
        a.device.initiating = initiating;
        a.device.answered = answered;
        Ok(())
    }

    fn publish(&mut self, i: usize) {
        let a = &self.agents[i];
        let status = Status {
            public: a.disk.current.id,
            created: a.disk.current.created,
            generation: generation_of(a.disk.phase),
            next: if is_steady(a.disk.phase) {
                None
            } else {
                a.disk.next.map(|k| k.id)
            },
            installed: a.device.installed.clone(),
            abandoned_at: if is_steady(a.disk.phase) {
                a.disk.abandoned_at
            } else {
                None
            },
        };
        self.published.push((i, status));
    }

    /// Every node, one whose keys are refused too, is Steady, up to date, due for nothing,
    /// holds no grant and no key but its current one, and is known to every peer under
    /// exactly that key. A node that abandoned is due for nothing until a newer request.
    fn settled(&self) -> bool {
        (0..self.n()).all(|m| {
            let a = &self.agents[m];
            let key = a.disk.current.id;
            let own = is_steady(a.disk.phase)
                && a.disk.next.is_none()
                && a.disk.previous.is_empty()
                && a.device.initiating == key
                && a.device.answered.is_empty()
                && expected_due(&self.view_of(m), &self.api.policy, self.now).is_none()
                // A grant given while it was due is honoured even if the reason is gone; it
                // is gone once the rotation retired or abandoned the key.
                && self.api.approved[m].grant.is_none()
                && self.api.status[m].public == key
                && self.api.status[m].next.is_none();
            own && self.api.approved[m].current == key
                && (0..self.n())
                    .filter(|p| *p != m)
                    .all(|p| self.agents[p].device.installed[m] == BTreeSet::from([key]))
        })
    }
}

/// Runs one simulated mesh: requests until `requests_until`, then no more requests and no
/// interval; every requested rotation must then complete within a bound, after which the
/// mesh must stay put.
fn run(cfg: &Config) -> Result<Stats, String> {
    let mut sim = Sim::new(cfg.clone());
    while sim.now < cfg.requests_until {
        sim.tick()?;
    }
    sim.api.policy.interval = None;
    let quiet = sim.now.max(sim.last_request);
    // A node whose keys are refused holds its slot for one acknowledge timeout per request,
    // not for ever: every slot counts.
    let rounds = cfg.nodes.div_ceil(cfg.max_concurrent.max(1)) as u32 + 1;
    // A key retired for external peers is answered for their grace period after the last
    // rotation: the mesh settles once it is gone.
    let bound = (cfg.timeouts.acknowledge + cfg.timeouts.move_over + ROTATION_SLACK) * rounds
        + cfg.external_grace.unwrap_or_default();
    loop {
        sim.tick()?;
        if sim.now >= quiet && sim.settled() {
            break;
        }
        ensure!(
            sim.now <= quiet + bound,
            "{}: requested rotations not done {:?} after the last request (bound {bound:?})\n{}",
            sim.when(),
            sim.now.duration_since(quiet).unwrap_or_default(),
            sim.describe()
        );
    }
    let drain = sim.now.duration_since(quiet).unwrap_or_default();
    sim.stats.longest_drain_secs = drain.as_secs();
    sim.stats.longest_drain_percent_of_bound = (drain.as_millis() * 100 / bound.as_millis()) as u64;
    let generations: Vec<i64> = sim
        .agents
        .iter()
        .map(|a| generation_of(a.disk.phase))
        .collect();
    for _ in 0..STABLE_TICKS {
        sim.tick()?;
        ensure!(
            sim.settled(),
            "{}: unsettled again\n{}",
            sim.when(),
            sim.describe()
        );
        let now: Vec<i64> = sim
            .agents
            .iter()
            .map(|a| generation_of(a.disk.phase))
            .collect();
        ensure!(
            now == generations,
            "{}: rotated again with nothing requested",
            sim.when()
        );
    }
    sim.stats.crossed_approvals = sim.crossed.len() as u64;
    sim.stats.simulated_secs = sim
        .now
        .duration_since(cfg.start)
        .unwrap_or_default()
        .as_secs();
    Ok(sim.stats)
}

/// Runs seeds `0..ROTATION_SEEDS` (500 unless set) of [`Config::random`], each changed by
/// `adapt`, and sums their stats; fails with every seed that failed.
fn run_seeds(adapt: impl Fn(Config) -> Config) -> Stats {
    // `ROTATION_SEEDS=5000` explores further.
    let seeds: u64 = std::env::var("ROTATION_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let mut total = Stats::default();
    let mut failed = Vec::new();
    for seed in 0..seeds {
        let cfg = adapt(Config::random(seed));
        match run(&cfg) {
            Ok(stats) => total.add(&stats),
            Err(e) => failed.push(format!("{e}\nconfig: {cfg:?}")),
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {seeds} seeds failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
    println!("{total:#?}");
    total
}

#[test]
fn simulated_meshes_rotate_safely_through_crashes_laggards_and_concurrent_requests() {
    let total = run_seeds(|cfg| cfg);
    // The runs must have exercised what they claim to, or they prove nothing.
    assert!(total.rotations > 2000, "{total:?}");
    assert!(total.rotations_with_laggards > 20, "{total:?}");
    assert!(total.abandons > 20, "{total:?}");
    // Abandoning releases the slot and spends the grant; only a newer request retries,
    // sometimes while the abandoned key is still answered.
    assert!(
        total.grants_revoked > 20 && total.retries_after_abandon > 20,
        "{total:?}"
    );
    assert!(
        total.prepared_with_previous > 10 && total.previous_keys_deleted > 20,
        "{total:?}"
    );
    assert!(
        total.ack_laggards > 20 && total.move_laggards > 20,
        "{total:?}"
    );
    assert!(
        total.crashes_before_step > 100 && total.crashes_after_persist > 100,
        "{total:?}"
    );
    assert!(
        total.operator_crashes > 100 && total.stalls > 50,
        "{total:?}"
    );
    assert!(total.quiet_deferrals > 100, "{total:?}");
    // Revocations happen, some of them while earlier keys were still answered, and the
    // ordinary rotations of meshes with external peers keep their retired keys.
    assert!(
        total.revocations > 100
            && total.revocations_dropping_earlier_keys > 10
            && total.retired_keys_kept > 100,
        "{total:?}"
    );
    assert!(
        total.requests_during_rotation > 100 && total.requests_before_key > 100,
        "{total:?}"
    );
    assert!(
        total.ticks_with_concurrent_rotations > 100 && total.max_rotating >= 3,
        "{total:?}"
    );
}

/// The same runs with an operator that approves at its second look and forgets what it saw
/// when it crashes. Crashes then sometimes delay an approval until the very tick the agent
/// abandons the key, and peers learn a key the node has just abandoned: the node must still
/// answer it until they drop it again.
#[test]
fn simulated_meshes_with_a_slow_operator_rotate_safely() {
    let total = run_seeds(|cfg| Config {
        slow_operator: true,
        ..cfg
    });
    assert!(total.rotations > 2000, "{total:?}");
    assert!(
        total.slow_approval_abandons > 0 && total.crossed_approvals > 0,
        "no approval crossed an abandonment: {total:?}"
    );
}

/// A small mesh with no crashes and no random requests: one request of `node-0`.
fn scripted(nodes: usize, max_concurrent: usize) -> Config {
    let start = at(1000);
    Config {
        seed: 0,
        nodes,
        max_concurrent,
        timeouts: Timeouts {
            acknowledge: secs(30),
            move_over: secs(30),
        },
        interval: None,
        broken: None,
        approval_resumes: None,
        stalls: vec![],
        first_keys: (0..nodes as u64).map(at).collect(),
        scripted: vec![Request {
            node: Some(0),
            instant: start + secs(1),
            issued: start + secs(1),
            revoke: false,
        }],
        random_requests: false,
        start,
        requests_until: start + secs(300),
        agent_crash_per_mille: 0,
        operator_crash_per_mille: 0,
        tick: Some(secs(3)),
        slow_operator: false,
        external_grace: None,
    }
}

#[test]
fn a_prompt_rotation_names_no_laggards_and_a_stalled_peer_is_named_at_each_timeout() {
    let cfg = scripted(3, 1);
    let stats = run(&cfg).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(stats.rotations, 1, "{stats:?}");
    assert_eq!(
        (stats.ack_laggards, stats.move_laggards),
        (0, 0),
        "{stats:?}"
    );

    let start = cfg.start;
    let stalled = Config {
        stalls: vec![(2, start, start + secs(200))],
        ..cfg
    };
    let stats = run(&stalled).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(stats.rotations, 1, "{stats:?}");
    assert_eq!(
        (stats.ack_laggards, stats.move_laggards),
        (1, 1),
        "{stats:?}"
    );
}

/// The operator approves `node-0`'s next key late, once `approval_resumes` passed, while the
/// agent gives up on it after the acknowledge timeout. Whenever the approval is written in the
/// tick the agent abandons (each reads the other's write a tick later), peers install a key
/// the node has just abandoned and send to it under that key: the node must keep answering
/// it until they drop it, and must not rotate again without a newer request.
#[test]
fn an_approval_that_crosses_an_abandon_leaves_no_peer_on_a_discarded_key() {
    let mut failures = Vec::new();
    let mut crossed = Vec::new();
    let (mut completed, mut abandoned) = (0, 0);
    for resume in 0..120 {
        let base = scripted(3, 1);
        let cfg = Config {
            seed: resume,
            broken: Some(0),
            approval_resumes: Some(base.start + secs(resume)),
            ..base
        };
        let stats = match run(&cfg) {
            Ok(stats) => stats,
            Err(e) => {
                failures.push((resume, e));
                continue;
            }
        };
        // Either the approval came in time and the rotation completed, or the node gave up
        // once, released its slot and stayed on its key: nobody asked again.
        let outcome = (stats.rotations, stats.abandons, stats.grants_revoked);
        if stats.abandons == 0 {
            assert_eq!(outcome, (1, 0, 0), "resume +{resume}s: {stats:?}");
            completed += 1;
        } else {
            assert_eq!(outcome, (0, 1, 1), "resume +{resume}s: {stats:?}");
            assert_eq!(stats.retries_after_abandon, 0, "{stats:?}");
            abandoned += 1;
        }
        if stats.crossed_approvals > 0 {
            crossed.push(resume);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 120 resume times cut peers off; the first (resume +{}s):\n{}",
        failures.len(),
        failures[0].0,
        failures[0].1
    );
    println!("completed {completed}, abandoned {abandoned}, crossed at resume {crossed:?}");
    assert!(completed > 0 && abandoned > 0, "{completed} {abandoned}");
    assert!(!crossed.is_empty(), "no approval crossed the abandonment");
}

/// A node whose next keys are never approved, with the oldest key, is granted the only slot
/// (`maxConcurrent: 1`) by a request of the mesh. It abandons its key after the acknowledge
/// timeout; the operator then revokes its grant, which the agent no longer honours either, and
/// it is not due again until a newer request: the other nodes rotate in turn, and it settles
/// on its old key instead of holding the slot for ever.
#[test]
fn a_node_whose_keys_are_never_approved_does_not_block_the_others_for_ever() {
    let base = scripted(3, 1);
    let start = base.start;
    let cfg = Config {
        broken: Some(0),
        scripted: vec![Request {
            node: None,
            instant: start + secs(1),
            issued: start + secs(1),
            revoke: false,
        }],
        ..base
    };
    let stats = run(&cfg).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (stats.rotations, stats.abandons, stats.grants_revoked),
        (2, 1, 1),
        "{stats:?}"
    );
    assert_eq!(stats.retries_after_abandon, 0, "{stats:?}");
    // A newer request of the node itself makes it try again, once more.
    let retried = Config {
        scripted: vec![
            cfg.scripted[0],
            Request {
                node: Some(0),
                instant: start + secs(200),
                issued: start + secs(200),
                revoke: false,
            },
        ],
        ..cfg
    };
    let stats = run(&retried).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (stats.rotations, stats.abandons, stats.retries_after_abandon),
        (2, 2, 1),
        "{stats:?}"
    );
}

/// An approval crosses `node-0`'s abandonment (at +36 s), so both peers install the abandoned
/// key; `node-2` then hangs (+40 s to +58 s) with that key installed and its status still
/// saying so. A newer request (+40 s) starts another rotation of the same key generation at
/// once, while the abandoned key is still answered. `node-2`'s stale acknowledgement is of the
/// abandoned key, not of the new one: `node-0` must wait for `node-2` to install the new key
/// before it initiates with it, and meanwhile keep answering the abandoned key `node-2` may
/// still use.
#[test]
fn a_retry_counts_only_acknowledgements_of_its_own_key_and_still_answers_the_abandoned_one() {
    let base = scripted(3, 1);
    let start = base.start;
    let request = |s: u64| Request {
        node: Some(0),
        instant: start + secs(s),
        issued: start + secs(s),
        revoke: false,
    };
    let cfg = Config {
        broken: Some(0),
        approval_resumes: Some(start + secs(35)),
        stalls: vec![(2, start + secs(40), start + secs(58))],
        scripted: vec![request(1), request(40)],
        ..base
    };
    let stats = run(&cfg).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (stats.abandons, stats.retries_after_abandon, stats.rotations),
        (1, 1, 1),
        "{stats:?}"
    );
    assert!(
        stats.crossed_approvals == 2 && stats.prepared_with_previous == 1,
        "the scenario did not happen: {stats:?}"
    );
    // It waited for node-2 rather than going on without it.
    assert_eq!(
        (stats.ack_laggards, stats.move_laggards),
        (0, 0),
        "{stats:?}"
    );
}

/// As above, but `node-2` hangs (+40 s to +100 s) past the abandoned key's deadline (+66 s:
/// the abandonment at +36 s plus the acknowledge timeout), with the crossed approval
/// installed and no retry. `node-0` deletes the key at its deadline while `node-2` still
/// trusts it (and may send under it), and nothing names `node-2` a laggard: in every other
/// case a peer is cut off only after the node named it. The deadline assumes every peer drops
/// the key within the acknowledge timeout of the abandonment, which a hung agent does not.
#[test]
#[ignore = "gap in the Abandon protocol (rotation.rs): the abandoned key is deleted at its deadline without naming a peer that still uses it"]
fn a_peer_that_hangs_with_a_crossed_approval_is_named_before_the_abandoned_key_goes() {
    let base = scripted(3, 1);
    let start = base.start;
    let cfg = Config {
        broken: Some(0),
        approval_resumes: Some(start + secs(35)),
        stalls: vec![(2, start + secs(40), start + secs(100))],
        ..base
    };
    let stats = run(&cfg).unwrap_or_else(|e| panic!("{e}"));
    assert!(stats.crossed_approvals == 2, "{stats:?}");
}
