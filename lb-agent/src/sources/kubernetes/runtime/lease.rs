//! Leader election: one agent holds the `weir-leader` Lease and does the cluster-wide work
//! (addresses, status); the others stand by.

use kube::Client;
use std::{
    fmt::Debug,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{Api, api::PostParams};
use tokio::sync::watch;
use tracing::{info, warn};

/// The Lease the agents elect their leader with.
pub const LEASE: &str = "weir-leader";
/// A leader that has not renewed for this long has lost the Lease.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the holder renews, and the others look.
pub const LEASE_RENEW: Duration = Duration::from_secs(2);
/// A holder that could not renew for this long stops leading — well before the others may take
/// the Lease ([`LEASE_DURATION`] after its last renewal), so two never lead at once.
pub const RENEW_DEADLINE: Duration = Duration::from_secs(10);

/// What the Lease says this agent should do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseAction {
    /// Nobody holds it: create it.
    Create,
    /// This agent holds it: renew.
    Renew,
    /// The holder stopped renewing: take it over.
    TakeOver,
    /// Another agent holds it.
    Follow(String),
}

/// Another agent's hold of the Lease as this agent last saw it change, by this agent's own
/// clock: a holder has lost the Lease when its `renewTime` has not changed for the Lease's
/// duration as this agent measures it (as client-go decides). No clock of another node is
/// compared with this one's, so clock skew between nodes neither steals a live leader's Lease
/// nor keeps a dead one's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    holder: String,
    renew_time: Option<Timestamp>,
    since: Instant,
}

/// Decides from the Lease as read at `now` (this agent's clock), with what this agent saw of
/// it before (`observed`, updated).
pub fn decide(
    lease: Option<&Lease>,
    me: &str,
    observed: &mut Option<Observed>,
    now: Instant,
) -> LeaseAction {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        *observed = None;
        return if lease.is_some() {
            LeaseAction::TakeOver
        } else {
            LeaseAction::Create
        };
    };
    match spec.holder_identity.as_deref() {
        Some(h) if h == me => {
            *observed = None;
            LeaseAction::Renew
        }
        None | Some("") => {
            *observed = None;
            LeaseAction::TakeOver
        }
        Some(holder) => {
            let duration = spec
                .lease_duration_seconds
                .and_then(|d| u64::try_from(d).ok())
                .map_or(LEASE_DURATION, Duration::from_secs);
            let renew_time = spec.renew_time.as_ref().map(|t| t.0);
            match observed {
                Some(o) if o.holder == holder && o.renew_time == renew_time => {
                    if now.saturating_duration_since(o.since) > duration {
                        LeaseAction::TakeOver
                    } else {
                        LeaseAction::Follow(holder.to_string())
                    }
                }
                _ => {
                    *observed = Some(Observed {
                        holder: holder.to_string(),
                        renew_time,
                        since: now,
                    });
                    LeaseAction::Follow(holder.to_string())
                }
            }
        }
    }
}

/// How long one call to the API server may take: a hung call must not outlast
/// [`RENEW_DEADLINE`] (a round makes at most two).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(4);

/// `call`, or an error once [`CALL_TIMEOUT`] has passed.
/// An API server that is away is reported to [`super::outage`]; the error is returned either
/// way.
pub(super) async fn bounded<T>(
    what: &str,
    call: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(v)) => {
            super::outage::ok();
            Ok(v)
        }
        Ok(Err(e)) => {
            if super::outage::is_outage(&e) {
                super::outage::failed(what, &e);
            }
            Err(e.to_string())
        }
        Err(_) => {
            let e = format!("{what}: no answer within {CALL_TIMEOUT:?}");
            super::outage::failed(what, &e);
            Err(e)
        }
    }
}

pub(super) fn lease_spec(
    me: &str,
    now: Timestamp,
    previous: Option<&LeaseSpec>,
    takeover: bool,
) -> LeaseSpec {
    LeaseSpec {
        holder_identity: Some(me.to_string()),
        lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
        acquire_time: if takeover || previous.is_none() {
            Some(MicroTime(now))
        } else {
            previous.and_then(|p| p.acquire_time.clone())
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(
            previous.and_then(|p| p.lease_transitions).unwrap_or(0) + i32::from(takeover),
        ),
        ..LeaseSpec::default()
    }
}

/// Holds or watches the Lease in `namespace`; `leader` says whether this agent leads.
/// Writes use the Lease's resourceVersion, so two agents can never both win one round.
pub async fn lease_loop(
    client: Client,
    namespace: String,
    me: String,
    leader: watch::Sender<bool>,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let mut tick = tokio::time::interval(LEASE_RENEW);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_renew: Option<tokio::time::Instant> = None;
    let mut observed = None;
    loop {
        tick.tick().await;
        let now = Timestamp::now();
        let current = match bounded("reading the Lease", api.get_opt(LEASE)).await {
            Ok(l) => l,
            Err(e) => {
                // Nothing learnt this round: a leader stays one until its renew deadline.
                // (An API server that is away is logged by `outage`.)
                tracing::debug!(error = %e, "reading Lease {namespace}/{LEASE} failed");
                let leads =
                    *leader.borrow() && last_renew.is_some_and(|t| t.elapsed() < RENEW_DEADLINE);
                if !leads && *leader.borrow() {
                    info!(identity = %me, leader = false, "leadership changed (the Lease could not be renewed in time)");
                }
                leader.send_if_modified(|l| std::mem::replace(l, leads) != leads);
                if leader.is_closed() {
                    return;
                }
                continue;
            }
        };
        let action = decide(current.as_ref(), &me, &mut observed, Instant::now());
        let result = match (&action, &current) {
            (LeaseAction::Create, _) => {
                let lease = Lease {
                    metadata: kube::api::ObjectMeta {
                        name: Some(LEASE.into()),
                        namespace: Some(namespace.clone()),
                        ..Default::default()
                    },
                    spec: Some(lease_spec(&me, now, None, false)),
                };
                bounded(
                    "creating the Lease",
                    api.create(&PostParams::default(), &lease),
                )
                .await
                .map(|_| ())
            }
            (LeaseAction::Renew | LeaseAction::TakeOver, Some(l)) => {
                let mut l = l.clone();
                l.spec = Some(lease_spec(
                    &me,
                    now,
                    l.spec.as_ref(),
                    action == LeaseAction::TakeOver,
                ));
                bounded(
                    "writing the Lease",
                    api.replace(LEASE, &PostParams::default(), &l),
                )
                .await
                .map(|_| ())
            }
            _ => Ok(()),
        };
        let won = matches!(
            action,
            LeaseAction::Create | LeaseAction::Renew | LeaseAction::TakeOver
        ) && result.is_ok();
        if won {
            last_renew = Some(tokio::time::Instant::now());
        }
        if let Err(e) = &result {
            // A conflict means another agent wrote first: it leads this round.
            info!(error = %e, "Lease not won this round");
        }
        // Leader while the last successful write is younger than the renew deadline.
        let leads = last_renew.is_some_and(|t| t.elapsed() < RENEW_DEADLINE)
            && !matches!(action, LeaseAction::Follow(_));
        if *leader.borrow() != leads {
            info!(identity = %me, leader = leads, "leadership changed");
        }
        leader.send_if_modified(|l| std::mem::replace(l, leads) != leads);
        if leader.is_closed() {
            return;
        }
    }
}

/// Gives the Lease up when this agent holds it (on a clean stop), so another agent takes
/// over at its next look instead of waiting for the Lease to expire.
pub async fn release_lease(client: Client, namespace: &str, me: &str) {
    let api: Api<Lease> = Api::namespaced(client, namespace);
    let Ok(Some(mut lease)) = api.get_opt(LEASE).await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(me) {
        return;
    }
    spec.holder_identity = None;
    spec.renew_time = None;
    match api.replace(LEASE, &PostParams::default(), &lease).await {
        Ok(_) => info!("Lease released"),
        Err(e) => warn!(error = %e, "releasing the Lease failed; it expires by itself"),
    }
}

/// Whether the agent's DaemonSet `name` is gone or being deleted (the chart is being
/// uninstalled), as opposed to a pod restart or a rolling update, where it stays. None when
/// the API server does not say.
pub async fn daemonset_gone(client: Client, namespace: &str, name: &str) -> Option<bool> {
    let api: Api<k8s_openapi::api::apps::v1::DaemonSet> = Api::namespaced(client, namespace);
    match api.get_opt(name).await {
        Ok(None) => Some(true),
        Ok(Some(ds)) => Some(ds.metadata.deletion_timestamp.is_some()),
        Err(e) => {
            warn!(error = %e, daemonset = name, "cannot tell whether the DaemonSet is being deleted");
            None
        }
    }
}
