//! Merging desired conditions into an object's current ones: a condition keeps its
//! `lastTransitionTime` unless its status changes, and a merge that changes nothing but
//! that timestamp reports no change, so the caller skips the write.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use std::time::SystemTime;
use wgmesh_api::{Condition, ConditionStatus};

/// A condition as the plan wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub type_: String,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

impl Desired {
    pub fn new(type_: &str, status: bool, reason: &str, message: impl Into<String>) -> Self {
        Desired {
            type_: type_.to_owned(),
            status,
            reason: reason.to_owned(),
            message: message.into(),
        }
    }
}

/// Returns the desired conditions as `Condition`s (only the types in `desired`: under
/// server-side apply the caller owns exactly those) and the ones whose status, reason or
/// message differ from `current`.
pub fn merge(
    current: &[Condition],
    desired: &[Desired],
    generation: Option<i64>,
    now: SystemTime,
) -> (Vec<Condition>, Vec<Desired>) {
    let now = k8s_openapi::jiff::Timestamp::try_from(now)
        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
    let mut out = Vec::with_capacity(desired.len());
    let mut changes = Vec::new();
    for d in desired {
        let status = if d.status {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        };
        let old = current.iter().find(|c| c.type_ == d.type_);
        let transition = match old {
            Some(c) if c.status == status => c.last_transition_time.clone(),
            _ => Time(now),
        };
        let same = old.is_some_and(|c| {
            c.status == status
                && c.reason == d.reason
                && c.message == d.message
                && c.observed_generation == generation
        });
        if !same {
            changes.push(d.clone());
        }
        out.push(Condition {
            type_: d.type_.clone(),
            status,
            observed_generation: generation,
            last_transition_time: transition,
            reason: d.reason.clone(),
            message: d.message.clone(),
        });
    }
    (out, changes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn an_unchanged_condition_keeps_its_transition_time_and_reports_no_change() {
        let d = [Desired::new("Ready", true, "Valid", "ok")];
        let (first, changes) = merge(&[], &d, Some(1), at(100));
        assert_eq!(changes.len(), 1);
        let (second, changes) = merge(&first, &d, Some(1), at(200));
        assert!(changes.is_empty());
        assert_eq!(second, first);
    }

    #[test]
    fn a_status_flip_moves_the_transition_time_but_a_message_change_does_not() {
        let (first, _) = merge(
            &[],
            &[Desired::new("Ready", true, "Valid", "ok")],
            Some(1),
            at(100),
        );
        let (msg, changes) = merge(
            &first,
            &[Desired::new("Ready", true, "Valid", "still ok")],
            Some(1),
            at(200),
        );
        assert_eq!(changes.len(), 1);
        assert_eq!(msg[0].last_transition_time, first[0].last_transition_time);
        let (flip, changes) = merge(
            &msg,
            &[Desired::new("Ready", false, "Bad", "no")],
            Some(1),
            at(300),
        );
        assert_eq!(changes.len(), 1);
        assert_ne!(flip[0].last_transition_time, first[0].last_transition_time);
        assert_eq!(flip[0].status, ConditionStatus::False);
    }

    #[test]
    fn a_new_generation_is_a_change() {
        let d = [Desired::new("Ready", true, "Valid", "ok")];
        let (first, _) = merge(&[], &d, Some(1), at(100));
        let (_, changes) = merge(&first, &d, Some(2), at(100));
        assert_eq!(changes.len(), 1);
    }
}
