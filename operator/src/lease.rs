//! Leader election on a coordination.k8s.io/v1 `Lease`: only the holder allocates subnets
//! and writes status, so two replicas never double-allocate.
//!
//! The protocol is client-go's: the holder renews `renewTime` every `retry_period`; a
//! candidate may take the lease once it has seen the very same lease record, unchanged, for
//! `leaseDurationSeconds` on its own clock (the holder's `renewTime` is the holder's clock,
//! never compared with ours); every write carries the `resourceVersion` it read, so two
//! candidates racing for an expired lease cannot both win (one gets a 409).
//!
//! A leader acts until `renew_deadline` after it *sent* its last successful renewal, and no
//! longer: [`Leadership::leading`] reads that deadline before every write, so a leader that
//! was frozen (SIGSTOP, a paused VM) or whose API calls hang stops writing on time even if
//! this loop has not run since. Others may take over only a full lease duration after they
//! saw the renewed record, and the renew deadline is shorter.
//!
//! This module owns the lease and the leadership signal; it does not know what leaders do.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// Whether this replica may act as leader: the instant until which it may, published by
/// [`run`] (`None`: not leading).
#[derive(Clone, Debug)]
pub struct Leadership(watch::Receiver<Option<Instant>>);

impl Leadership {
    /// A sender for [`run`] and the receiving side; nobody leads until `run` says so.
    pub fn channel() -> (watch::Sender<Option<Instant>>, Leadership) {
        let (tx, rx) = watch::channel(None);
        (tx, Leadership(rx))
    }

    /// Whether this replica may write now: it holds the lease and its acting deadline has
    /// not passed, whether or not the lease loop has noticed.
    pub fn leading(&self) -> bool {
        self.0.borrow().is_some_and(|until| Instant::now() < until)
    }

    /// Returns once [`Leadership::leading`] is no longer `was` (a renewal that keeps the
    /// leader leading does not wake it); `Err` if the lease loop is gone.
    pub async fn flipped(&mut self, was: bool) -> Result<(), watch::error::RecvError> {
        loop {
            let until = *self.0.borrow_and_update();
            let now_leading = until.is_some_and(|u| Instant::now() < u);
            if now_leading != was {
                return Ok(());
            }
            match until {
                Some(deadline) if was => {
                    tokio::select! {
                        r = self.0.changed() => r?,
                        () = tokio::time::sleep_until(deadline) => {}
                    }
                }
                _ => self.0.changed().await?,
            }
        }
    }
}
use tracing::{info, warn};

/// How a replica competes for the lease.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Namespace of the `Lease`.
    pub namespace: String,
    /// Name of the `Lease`.
    pub name: String,
    /// This replica's identity (the pod name in a cluster).
    pub identity: String,
    /// How long a lease stays valid without renewal.
    pub lease_duration: Duration,
    /// How long the holder keeps trying to renew before it steps down.
    pub renew_deadline: Duration,
    /// How often the holder renews and candidates retry.
    pub retry_period: Duration,
}

/// Errors talking to the API server about the lease.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("reading lease {name}: {source}")]
    Get {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("the API server did not answer in time")]
    TimedOut,
    #[error("writing lease {name}: {source}")]
    Write {
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// What one attempt to acquire or renew decided.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    /// We hold the lease now.
    Held,
    /// Someone else holds a valid lease.
    HeldBy(String),
}

/// The parts of a lease record a candidate compares between reads: any renewal changes
/// them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    holder: String,
    renew_time: Option<String>,
    duration: Duration,
    resource_version: Option<String>,
}

impl Record {
    fn of(lease: &Lease) -> Record {
        let spec = lease.spec.clone().unwrap_or_default();
        Record {
            holder: spec.holder_identity.unwrap_or_default(),
            renew_time: spec.renew_time.map(|t| t.0.to_string()),
            duration: Duration::from_secs(
                spec.lease_duration_seconds
                    .and_then(|s| u64::try_from(s).ok())
                    .unwrap_or(0),
            ),
            resource_version: lease.metadata.resource_version.clone(),
        }
    }
}

/// Another holder's record as this replica last saw it, and when it first saw it so, on
/// its own monotonic clock.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Observation {
    record: Record,
    since: Instant,
}

/// Whether `record`, read at `now`, has expired: only once this replica has seen the very
/// same record for its whole duration, as client-go decides. The holder's `renewTime` is
/// its own clock's; comparing it with ours would let a replica whose clock runs ahead take
/// a lease that is still held. Returns the observation to keep.
fn expired(seen: Option<&Observation>, record: &Record, now: Instant) -> (bool, Observation) {
    match seen {
        Some(o) if o.record == *record => (now >= o.since + record.duration, o.clone()),
        _ => (
            false,
            Observation {
                record: record.clone(),
                since: now,
            },
        ),
    }
}

/// Until when a leader whose renewal was sent at `sent` and succeeded may act: strictly
/// before any other replica may take the lease, which it may only once it has seen the
/// renewed record (written after `sent`) unchanged for the lease's duration.
fn acting_until(sent: Instant, config: &LeaseConfig) -> Instant {
    sent + config
        .renew_deadline
        .min(config.lease_duration.mul_f64(0.9))
}

/// Competes for the lease forever, publishing on `leader` until when this replica may act
/// as leader: `renew_deadline` after the last renewal that succeeded was sent, however long
/// the API server takes to answer the next (`None` once it may not).
pub async fn run(api: Api<Lease>, config: LeaseConfig, leader: watch::Sender<Option<Instant>>) {
    let mut until: Option<Instant> = None;
    let mut seen: Option<Observation> = None;
    let step_down = |until: &mut Option<Instant>| {
        if until.take().is_some() {
            warn!("could not renew the lease within the renew deadline; stepping down");
        }
        leader.send_replace(None);
    };
    loop {
        let sent = Instant::now();
        let attempt = tokio::time::timeout(
            config.renew_deadline / 2,
            try_acquire_or_renew(&api, &config, &mut seen),
        );
        tokio::pin!(attempt);
        let attempt = loop {
            let deadline = until.unwrap_or_else(|| sent + config.lease_duration * 2);
            tokio::select! {
                a = &mut attempt => break a.unwrap_or(Err(LeaseError::TimedOut)),
                () = tokio::time::sleep_until(deadline), if until.is_some() => step_down(&mut until),
            }
        };
        match attempt {
            Ok(Attempt::Held) => {
                let acting = acting_until(sent, &config);
                if acting <= Instant::now() {
                    // The answer came too late to act on.
                    step_down(&mut until);
                } else {
                    if until.is_none() {
                        info!(identity = %config.identity, lease = %config.name, "became leader");
                    }
                    until = Some(acting);
                    leader.send_replace(until);
                }
            }
            Ok(Attempt::HeldBy(holder)) => {
                if until.take().is_some() {
                    warn!(%holder, "lost the lease to another replica; stepping down");
                }
                leader.send_replace(None);
            }
            Err(e) => warn!(error = %e, "lease renewal failed"),
        }
        let next = Instant::now() + config.retry_period;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(next) => break,
                () = tokio::time::sleep_until(until.unwrap_or(next)), if until.is_some_and(|u| u < next) => step_down(&mut until),
            }
        }
    }
}

async fn try_acquire_or_renew(
    api: &Api<Lease>,
    config: &LeaseConfig,
    seen: &mut Option<Observation>,
) -> Result<Attempt, LeaseError> {
    let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
    let duration_secs = i32::try_from(config.lease_duration.as_secs()).unwrap_or(i32::MAX);
    let existing = api
        .get_opt(&config.name)
        .await
        .map_err(|source| LeaseError::Get {
            name: config.name.clone(),
            source,
        })?;
    let Some(mut lease) = existing else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(config.name.clone()),
                namespace: Some(config.namespace.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(config.identity.clone()),
                lease_duration_seconds: Some(duration_secs),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        // A create fails if the lease exists: two candidates cannot both create it.
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(Attempt::Held),
            // Another candidate created it first; it holds the lease.
            Err(kube::Error::Api(s)) if s.is_already_exists() => {
                Ok(Attempt::HeldBy("another replica".into()))
            }
            Err(source) => Err(LeaseError::Write {
                name: config.name.clone(),
                source,
            }),
        };
    };

    let record = Record::of(&lease);
    let ours = record.holder == config.identity;
    if !ours && !record.holder.is_empty() {
        let (gone, observation) = expired(seen.as_ref(), &record, Instant::now());
        *seen = Some(observation);
        if !gone {
            return Ok(Attempt::HeldBy(record.holder));
        }
    }
    let spec = lease.spec.get_or_insert_with(Default::default);
    if !ours {
        spec.acquire_time = Some(now.clone());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        spec.holder_identity = Some(config.identity.clone());
    }
    spec.renew_time = Some(now);
    spec.lease_duration_seconds = Some(duration_secs);
    // `replace` sends the resourceVersion we read: a concurrent writer makes this a 409.
    match api
        .replace(&config.name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => Ok(Attempt::Held),
        Err(kube::Error::Api(s)) if s.is_conflict() => {
            Ok(Attempt::HeldBy("another replica".into()))
        }
        Err(source) => Err(LeaseError::Write {
            name: config.name.clone(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn config() -> LeaseConfig {
        LeaseConfig {
            namespace: "ns".into(),
            name: "lease".into(),
            identity: "me".into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(3),
        }
    }

    fn record(holder: &str, renewed: &str) -> Record {
        Record {
            holder: holder.into(),
            renew_time: Some(renewed.into()),
            duration: Duration::from_secs(15),
            resource_version: Some(renewed.into()),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_expires_only_after_the_same_record_was_seen_for_its_duration() {
        let t0 = Instant::now();
        let r1 = record("other", "1");
        // First sight: however old its renewTime says it is, it is not expired.
        let (gone, seen) = expired(None, &r1, t0);
        assert!(!gone);
        let (gone, seen) = expired(Some(&seen), &r1, t0 + Duration::from_secs(14));
        assert!(!gone, "14 s of 15");
        assert_eq!(seen.since, t0, "the same record keeps its first sighting");
        // A renewal in between starts the count again.
        let r2 = record("other", "2");
        let (gone, seen) = expired(Some(&seen), &r2, t0 + Duration::from_secs(14));
        assert!(!gone);
        let (gone, _) = expired(Some(&seen), &r2, t0 + Duration::from_secs(28));
        assert!(!gone, "14 s after the renewal was seen");
        let (gone, _) = expired(Some(&seen), &r2, t0 + Duration::from_secs(29));
        assert!(gone, "15 s after the renewal was seen");
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_stops_before_anyone_else_may_take_over() {
        let config = config();
        let sent = Instant::now();
        // The renewal reaches the API server at `sent` at the earliest; a candidate sees it
        // then at the earliest and may take over a lease duration later.
        let takeover = sent + config.lease_duration;
        assert!(acting_until(sent, &config) < takeover);
        // Even with a renew deadline as long as the lease.
        let mut lax = config.clone();
        lax.renew_deadline = lax.lease_duration;
        assert!(acting_until(sent, &lax) < takeover);
    }

    #[tokio::test(start_paused = true)]
    async fn leadership_ends_at_its_deadline_without_any_message() {
        let (tx, mut leadership) = Leadership::channel();
        assert!(!leadership.leading());
        let until = Instant::now() + Duration::from_secs(10);
        tx.send_replace(Some(until));
        leadership.flipped(false).await.unwrap();
        assert!(leadership.leading());
        // A renewal that keeps it leading does not wake a waiter; the deadline does, with
        // nothing sent (the lease loop may be frozen or stuck).
        let waiter = tokio::spawn({
            let mut l = leadership.clone();
            async move {
                l.flipped(true).await.unwrap();
                Instant::now()
            }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        tx.send_replace(Some(until));
        assert!(!waiter.is_finished());
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(leadership.leading(), "9 s of 10");
        let ended = waiter.await.unwrap();
        assert_eq!(ended, until);
        assert!(!leadership.leading());
        drop(tx);
        assert!(leadership.flipped(false).await.is_err(), "the loop is gone");
    }
}
