//! Events about wgmesh's cluster-scoped objects, in the form `kubectl describe` finds.
//!
//! `kubectl describe meshpeer node-1` lists the Events whose `involvedObject` has the
//! object's kind, name and uid and an empty namespace, in any namespace. An
//! `events.k8s.io/v1` Event (the kind kube-runtime's `Recorder` writes) with an empty
//! `regarding.namespace` is refused by API servers before 1.22 unless it lives in
//! `kube-system`, so the Recorder gives the object a namespace (`default`) and describe never
//! finds it. A core `v1` Event without `eventTime` (the form the kubelet writes for Nodes) is
//! accepted in `default` with an empty `involvedObject.namespace` by every version: that is
//! what [`EventPublisher`] writes. A repeat of the same Event within [`REPEAT_WINDOW`] bumps
//! its `count` and `lastTimestamp` instead of making another object.

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// The namespace the Events live in (cluster-scoped objects have none of their own).
pub const EVENT_NAMESPACE: &str = "default";
/// A repeat within this window updates the earlier Event.
pub const REPEAT_WINDOW: Duration = Duration::from_secs(600);
/// The API group and version of every wgmesh kind.
const API_VERSION: &str = "wgmesh.dev/v1alpha1";

/// The wgmesh object an Event is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// `Mesh`, `PodCIDRPool`, `MeshPeer` or `MeshPeerReport`.
    pub kind: &'static str,
    pub name: String,
    /// The object's uid; without it `kubectl describe` does not show the Event.
    pub uid: Option<String>,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Notice {
    pub warning: bool,
    /// CamelCase, at most 128 bytes (longer is cut).
    pub reason: String,
    /// What the component did, e.g. `Reconcile`, `RotateKey`, `Route`.
    pub action: String,
    /// For people; at most 1024 bytes (longer is cut).
    pub note: String,
}

/// The Event object for a first occurrence: pure, so its shape is tested.
pub fn event_object(
    target: &Target,
    notice: &Notice,
    component: &str,
    instance: &str,
    now: Timestamp,
) -> Event {
    let time = Time(now);
    // Unique per occurrence, as the kubelet names them: the object, then the time.
    let prefix: String = target.name.chars().take(200).collect();
    let name = format!("{prefix}.{:x}", now.as_nanosecond().unsigned_abs());
    Event {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(EVENT_NAMESPACE.into()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some(API_VERSION.into()),
            kind: Some(target.kind.into()),
            name: Some(target.name.clone()),
            uid: target.uid.clone(),
            namespace: None,
            ..Default::default()
        },
        reason: Some(truncate(&notice.reason, 128)),
        message: Some(truncate(&notice.note, 1024)),
        type_: Some(if notice.warning { "Warning" } else { "Normal" }.into()),
        action: Some(truncate(&notice.action, 128)),
        source: Some(EventSource {
            component: Some(component.into()),
            host: Some(instance.into()),
        }),
        reporting_component: Some(component.into()),
        reporting_instance: Some(truncate(instance, 128)),
        first_timestamp: Some(time.clone()),
        last_timestamp: Some(time),
        count: Some(1),
        ..Default::default()
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary, ending in `...` when cut.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max.saturating_sub(3);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// A published Event: its object's name, its count, when it was last published.
#[derive(Debug, Clone)]
struct Published {
    name: String,
    count: i32,
    at: Instant,
}

/// Publishes Events, folding repeats into one object.
#[derive(Debug)]
pub struct EventPublisher {
    api: Api<Event>,
    component: String,
    instance: String,
    /// The recent Events, by target and notice.
    recent: Mutex<HashMap<(Target, Notice), Published>>,
}

impl EventPublisher {
    /// `component` is the reporting controller (`wgmesh-operator`, `wgmesh-agent`),
    /// `instance` which one (the pod, the node).
    pub fn new(client: kube::Client, component: &str, instance: &str) -> Self {
        EventPublisher {
            api: Api::namespaced(client, EVENT_NAMESPACE),
            component: component.to_owned(),
            instance: instance.to_owned(),
            recent: Mutex::new(HashMap::new()),
        }
    }

    /// Publishes one Event: a new object, or the count of a recent equal one raised.
    pub async fn publish(&self, target: &Target, notice: &Notice) -> Result<(), kube::Error> {
        let key = (target.clone(), notice.clone());
        let repeat = {
            let mut recent = self.recent.lock().await;
            recent.retain(|_, p| p.at.elapsed() < REPEAT_WINDOW);
            recent.get(&key).cloned()
        };
        let now = Timestamp::now();
        if let Some(Published { name, count, .. }) = repeat {
            let patch = serde_json::json!({
                "count": count + 1,
                "lastTimestamp": Time(now),
            });
            match self
                .api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    let again = Published {
                        name,
                        count: count + 1,
                        at: Instant::now(),
                    };
                    self.recent.lock().await.insert(key, again);
                    return Ok(());
                }
                // Gone (Events expire): write it anew.
                Err(kube::Error::Api(s)) if s.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        let event = event_object(target, notice, &self.component, &self.instance, now);
        let created = self.api.create(&PostParams::default(), &event).await?;
        let first = Published {
            name: created.metadata.name.unwrap_or_default(),
            count: 1,
            at: Instant::now(),
        };
        self.recent.lock().await.insert(key, first);
        Ok(())
    }
}

/// Tries per Event, with a doubling wait between them from 0.5 s: about a minute in all.
const TRIES: u32 = 7;

/// Publishes Events in the background, so the work that raised them never waits for the
/// API server (as client-go's recorder does): a bounded queue, whose overflow is dropped and
/// said; `in_flight` Events at once; each one retried with a doubling wait for about a minute
/// while the API server is slow or away.
#[derive(Clone)]
pub struct EventQueue {
    tx: tokio::sync::mpsc::Sender<(Target, Notice)>,
    on_error: std::sync::Arc<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for EventQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventQueue").finish_non_exhaustive()
    }
}

impl EventQueue {
    /// Starts the task that publishes through `publisher`. Holds at most `capacity` Events
    /// waiting; each try of one gives up after `timeout`. `on_error` is called for every
    /// failed try and every Event dropped (the components count them as errors).
    pub fn spawn(
        publisher: EventPublisher,
        capacity: usize,
        in_flight: usize,
        timeout: Duration,
        on_error: impl Fn() + Send + Sync + 'static,
    ) -> Self {
        let on_error: std::sync::Arc<dyn Fn() + Send + Sync> = std::sync::Arc::new(on_error);
        let (tx, rx) = tokio::sync::mpsc::channel::<(Target, Notice)>(capacity);
        let queued = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let publisher = std::sync::Arc::new(publisher);
        let failed = on_error.clone();
        tokio::spawn(futures::StreamExt::for_each_concurrent(
            queued,
            in_flight.max(1),
            move |(target, notice)| {
                let (publisher, failed) = (publisher.clone(), failed.clone());
                async move {
                    let mut wait = Duration::from_millis(500);
                    for attempt in 1..=TRIES {
                        let error = match tokio::time::timeout(
                            timeout,
                            publisher.publish(&target, &notice),
                        )
                        .await
                        {
                            Ok(Ok(())) => return,
                            Ok(Err(e)) => e.to_string(),
                            Err(_) => "timed out".to_owned(),
                        };
                        failed();
                        let reason = &notice.reason;
                        let object = &target.name;
                        if attempt == TRIES {
                            tracing::warn!(%reason, %object, %error, "publishing an Event failed; giving up on it");
                        } else {
                            tracing::debug!(%reason, %object, %error, attempt, "publishing an Event failed; trying again");
                            tokio::time::sleep(wait).await;
                            wait *= 2;
                        }
                    }
                }
            },
        ));
        EventQueue { tx, on_error }
    }

    /// Queues an Event; when the queue is full or its task stopped, drops it and says so.
    pub fn send(&self, target: Target, notice: Notice) {
        use tokio::sync::mpsc::error::TrySendError;
        let (reason, object) = (notice.reason.clone(), target.name.clone());
        match self.tx.try_send((target, notice)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                (self.on_error)();
                tracing::warn!(%reason, %object, "too many Events waiting for the API server; this one is dropped");
            }
            Err(TrySendError::Closed(_)) => {
                (self.on_error)();
                tracing::warn!(%reason, %object, "the Event publisher stopped; this Event is dropped");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_names_its_cluster_scoped_object_as_describe_looks_for_it() {
        let target = Target {
            kind: "MeshPeer",
            name: "node-1".into(),
            uid: Some("u-1".into()),
        };
        let notice = Notice {
            warning: true,
            reason: "PlaintextFallback".into(),
            action: "Route".into(),
            note: "x".repeat(2000),
        };
        let now = Timestamp::from_second(1_800_000_000).expect("a valid time");
        let ev = event_object(&target, &notice, "wgmesh-agent", "node-1", now);
        let obj = &ev.involved_object;
        assert_eq!(
            obj.namespace, None,
            "describe selects involvedObject.namespace=\"\""
        );
        assert_eq!(obj.uid.as_deref(), Some("u-1"));
        assert_eq!(obj.kind.as_deref(), Some("MeshPeer"));
        assert_eq!(obj.api_version.as_deref(), Some("wgmesh.dev/v1alpha1"));
        assert_eq!(ev.metadata.namespace.as_deref(), Some("default"));
        // A legacy Event: no eventTime (with one, a 1.20 server wants kube-system).
        assert_eq!(ev.event_time, None);
        assert_eq!(ev.type_.as_deref(), Some("Warning"));
        assert_eq!(ev.count, Some(1));
        assert!(ev.first_timestamp.is_some() && ev.last_timestamp.is_some());
        assert_eq!(ev.message.as_ref().map(String::len), Some(1024));
        assert!(
            ev.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with("node-1."))
        );
    }

    #[test]
    fn truncate_cuts_on_a_character_boundary() {
        assert_eq!(truncate("short", 10), "short");
        let cut = truncate(&"é".repeat(100), 11);
        assert!(cut.len() <= 11 && cut.ends_with("..."));
    }
}
