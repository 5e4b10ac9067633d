//! Leader election on a coordination.k8s.io/v1 `Lease`: only the holder allocates subnets
//! and writes status, so two replicas never double-allocate.
//!
//! The protocol is client-go's: the holder renews `renewTime` every `renew_interval`; any
//! candidate may take the lease once `renewTime + leaseDurationSeconds` has passed; every
//! write carries the `resourceVersion` it read, so two candidates racing for an expired
//! lease cannot both win (one gets a 409). A holder that cannot renew within
//! `renew_deadline` (shorter than the lease duration) steps down before anyone else may
//! take over.
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

/// Competes for the lease forever, publishing `true` on `leader` while this replica holds
/// it and `false` as soon as it may no longer act as leader.
pub async fn run(api: Api<Lease>, config: LeaseConfig, leader: watch::Sender<bool>) {
    let mut last_renewed: Option<tokio::time::Instant> = None;
    loop {
        // A call that hangs must count as a failure, or a partitioned leader would never
        // notice that its renew deadline passed.
        let attempt = tokio::time::timeout(
            config.renew_deadline / 2,
            try_acquire_or_renew(&api, &config),
        )
        .await
        .unwrap_or(Err(LeaseError::TimedOut));
        match attempt {
            Ok(Attempt::Held) => {
                if !*leader.borrow() {
                    info!(identity = %config.identity, lease = %config.name, "became leader");
                }
                last_renewed = Some(tokio::time::Instant::now());
                leader.send_replace(true);
            }
            Ok(Attempt::HeldBy(holder)) => {
                if *leader.borrow() {
                    warn!(%holder, "lost the lease to another replica; stepping down");
                }
                last_renewed = None;
                leader.send_replace(false);
            }
            Err(e) => {
                warn!(error = %e, "lease renewal failed");
                let expired = last_renewed.is_none_or(|t| t.elapsed() >= config.renew_deadline);
                if expired && *leader.borrow() {
                    warn!("could not renew the lease within the renew deadline; stepping down");
                    leader.send_replace(false);
                }
            }
        }
        tokio::time::sleep(config.retry_period).await;
    }
}

async fn try_acquire_or_renew(
    api: &Api<Lease>,
    config: &LeaseConfig,
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

    let spec = lease.spec.get_or_insert_with(Default::default);
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let ours = holder == config.identity;
    if !ours && !holder.is_empty() && !expired(spec, &now) {
        return Ok(Attempt::HeldBy(holder));
    }
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

fn expired(spec: &LeaseSpec, now: &MicroTime) -> bool {
    let (Some(renew), Some(secs)) = (&spec.renew_time, spec.lease_duration_seconds) else {
        return true;
    };
    let until = renew.0 + k8s_openapi::jiff::SignedDuration::from_secs(i64::from(secs));
    until < now.0
}
