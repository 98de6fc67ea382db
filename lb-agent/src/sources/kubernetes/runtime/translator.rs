//! The desired state translated from the full stores after every change (at once, or, when
//! the last translation was less than [`DEBOUNCE`] ago, together with whatever else arrives
//! until then), and the problems found reported once each.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use tokio::sync::watch;
use tracing::{info, warn};

use super::super::translate::{self, Options, Translation};

use super::*;

/// Changes arriving this close together are translated once; a change after a quiet spell is
/// translated at once.
pub(super) const DEBOUNCE: Duration = Duration::from_millis(50);

/// Publishes a translation of the stores after their first full lists and after every
/// change (debounced); logs each Service's problems when they change.
pub async fn translate_loop(
    stores: Stores,
    mut changed: watch::Receiver<u64>,
    opts: Options,
    out: watch::Sender<Option<Arc<Translation>>>,
    leader: watch::Receiver<bool>,
    events: EventSink,
    metrics: Arc<super::super::metrics::KubernetesMetrics>,
) {
    tracing::debug!("translate loop: waiting for the stores");
    if let Err(e) = stores.ready().await {
        warn!(error = %e, "the Kubernetes stores never became ready");
        return;
    }
    tracing::debug!("translate loop: stores ready");
    let mut reported: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut last: Option<crate::model::DesiredState> = None;
    let mut excluded = false;
    let mut announce_reported: Vec<String> = Vec::new();
    let mut memo = translate::Memo::default();
    loop {
        let started = tokio::time::Instant::now();
        let t = stores.translate(&opts, &mut memo);
        if last.as_ref() != Some(&t.desired) {
            info!(
                services = t.desired.services.len(),
                backends = t.backends,
                took = ?started.elapsed(),
                "Kubernetes state translated"
            );
            last = Some(t.desired.clone());
        }
        for (svc, problems) in &t.problems {
            if reported.get(svc) != Some(problems) {
                warn!(service = %svc, problems = ?problems, "part of the Service is not served");
                // Every agent sees the same problems; the leader says so on the Service.
                if *leader.borrow() {
                    events.send(ServiceEvent {
                        service: svc.clone(),
                        warning: true,
                        reason: "InvalidService",
                        note: problems.join("; "),
                    });
                }
            }
        }
        metrics.set_service_problems(&t.problems);
        reported = t.problems.clone();
        if t.announce_problems != announce_reported {
            for p in &t.announce_problems {
                warn!(problem = %p, "announcement resource left out");
            }
            if t.announce_problems.is_empty() && !announce_reported.is_empty() {
                info!("every announcement resource applies again");
            }
            announce_reported = t.announce_problems.clone();
        }
        if t.excluded != excluded {
            excluded = t.excluded;
            if excluded {
                info!(node = %opts.node, label = translate::EXCLUDE_LABEL, "this node is excluded from external load balancing: it serves nothing");
            } else {
                info!(node = %opts.node, "this node takes part in external load balancing again");
            }
        }
        out.send_replace(Some(Arc::new(t)));
        if changed.changed().await.is_err() || out.is_closed() {
            return;
        }
        // Leading edge: a change after a quiet spell goes through at once (a moved endpoint
        // reaches the data plane in milliseconds); a burst is taken together.
        tokio::time::sleep_until(started + DEBOUNCE).await;
        changed.borrow_and_update();
    }
}
