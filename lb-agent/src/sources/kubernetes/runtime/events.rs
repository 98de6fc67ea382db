//! Events on Services, sent by one task so that a burst never blocks the caller.

use kube::Client;
use std::{collections::BTreeMap, fmt::Debug, time::Duration};

use k8s_openapi::api::core::v1::Service;
use kube::{
    Resource,
    runtime::{
        events::{Event, EventType, Recorder, Reporter},
        reflector::Store,
    },
};
use tokio::task::JoinHandle;
use tracing::warn;

use super::super::translate::{self};

/// An Event about a Service (`namespace/name`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEvent {
    pub service: String,
    pub warning: bool,
    /// CamelCase.
    pub reason: &'static str,
    pub note: String,
}

/// Events waiting to be published at most; more are dropped (and counted) rather than held
/// while the API server is slow or away.
pub const EVENT_QUEUE: usize = 1024;

/// Where Events go; sending never blocks, and a full queue drops the Event.
#[derive(Clone, Debug)]
pub struct EventSink {
    tx: tokio::sync::mpsc::Sender<ServiceEvent>,
    dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl EventSink {
    pub fn send(&self, e: ServiceEvent) {
        if self.tx.try_send(e).is_err() {
            let n = self
                .dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if n.is_power_of_two() || n == 0 {
                warn!(
                    dropped = n + 1,
                    queue = EVENT_QUEUE,
                    "Kubernetes Events dropped: the queue to the API server is full"
                );
            }
        }
    }

    /// Events dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The same (Service, reason, note) at most this often.
pub(super) const EVENT_INTERVAL: Duration = Duration::from_secs(10);

/// Publishes Events on the Services they are about (found in `services` for their uid),
/// at most one per [`EVENT_INTERVAL`] for the same Service, reason and note; the rest are
/// counted in the next one's note.
pub fn event_sink(
    client: Client,
    services: Store<Service>,
    identity: String,
) -> (EventSink, JoinHandle<()>) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<ServiceEvent>(EVENT_QUEUE);
    let task = tokio::spawn(async move {
        let recorder = Recorder::new(
            client,
            Reporter {
                controller: "weir.dev/lb".into(),
                instance: Some(identity),
            },
        );
        let mut last: BTreeMap<(String, &'static str, String), (tokio::time::Instant, u32)> =
            BTreeMap::new();
        while let Some(e) = rx.recv().await {
            let key = (e.service.clone(), e.reason, e.note.clone());
            let now = tokio::time::Instant::now();
            let suppressed = match last.get_mut(&key) {
                Some((at, n)) if now.duration_since(*at) < EVENT_INTERVAL => {
                    *n += 1;
                    continue;
                }
                Some((_, n)) => std::mem::take(n),
                None => 0,
            };
            last.insert(key, (now, 0));
            last.retain(|_, (at, _)| now.duration_since(*at) < EVENT_INTERVAL * 6);
            let Some(svc) = services
                .state()
                .into_iter()
                .find(|s| translate::key(s) == e.service)
            else {
                continue;
            };
            let mut note = e.note;
            if suppressed > 0 {
                note.push_str(&format!(" ({suppressed} more like it suppressed)"));
            }
            let ev = Event {
                type_: if e.warning {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                reason: e.reason.into(),
                note: Some(note.chars().take(1000).collect()),
                action: e.reason.into(),
                secondary: None,
            };
            let reference = svc.object_ref(&());
            if let Err(err) =
                super::bounded("publishing an Event", recorder.publish(&ev, &reference)).await
                && !super::outage::is_down()
            {
                warn!(service = %e.service, error = %err, "publishing an Event failed");
            }
        }
    });
    let sink = EventSink {
        tx,
        dropped: std::sync::Arc::default(),
    };
    (sink, task)
}
