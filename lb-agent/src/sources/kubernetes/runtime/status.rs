//! On the leader: the addresses given out, written to the Services' and IPPools' status.

use kube::Client;
use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{ObjectReference, Service},
    jiff::Timestamp,
};
use kube::{
    Api, Resource, ResourceExt as _,
    api::{Patch, PatchParams},
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use tokio::sync::watch;
use tracing::{info, warn};

use super::super::{
    addresses::{self, CONDITION, Outcome},
    crd::IPPool,
    ipam::Allocator,
    translate::{self},
};

use super::*;

pub(super) fn current_ingress(svc: &Service) -> Vec<String> {
    addresses::status_ips(svc)
        .iter()
        .map(ToString::to_string)
        .collect()
}

pub(super) fn current_condition(svc: &Service) -> Option<(String, String, String)> {
    svc.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .find(|c| c.type_ == CONDITION)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// The status patch of an outcome (server-side apply: what weir omits, weir stops owning).
pub(super) fn status_patch(svc: &Service, o: &Outcome, now: Timestamp) -> serde_json::Value {
    let ingress: Vec<serde_json::Value> = o
        .ingress
        .iter()
        .map(|ip| serde_json::json!({"ip": ip.to_string(), "ipMode": "VIP"}))
        .collect();
    let mut status = serde_json::json!({ "loadBalancer": { "ingress": ingress } });
    if let Some(c) = &o.condition {
        let state = if c.ok { "True" } else { "False" };
        let same = current_condition(svc).is_some_and(|(s, _, _)| s == state);
        let since = svc
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .find(|x| x.type_ == CONDITION && same)
            .map_or_else(|| now.to_string(), |x| x.last_transition_time.0.to_string());
        status["conditions"] = serde_json::json!([{
            "type": CONDITION,
            "status": state,
            "reason": c.reason,
            "message": c.message,
            "lastTransitionTime": since,
            "observedGeneration": svc.metadata.generation,
        }]);
    }
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": svc.name_any(), "namespace": svc.namespace() },
        "status": status,
    })
}

/// While this agent leads: hands out addresses and writes them (and failures) to the
/// Services' status. A new leader starts from the Services' status (see
/// [`addresses::reconcile`]).
pub async fn address_loop(
    client: Client,
    stores: Stores,
    mut changed: watch::Receiver<u64>,
    mut leader: watch::Receiver<bool>,
    default_class: bool,
    identity: String,
) {
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "weir.dev/lb".into(),
            instance: Some(identity),
        },
    );
    if stores.ready().await.is_err() {
        return;
    }
    loop {
        // Wait to lead.
        while !*leader.borrow_and_update() {
            if leader.changed().await.is_err() {
                return;
            }
        }
        info!("leading: handing out LoadBalancer addresses");
        let mut alloc = Allocator::default();
        while *leader.borrow() {
            let (pools, bad) = addresses::pools(&owned(stores.pools.state()));
            for (name, e) in &bad {
                warn!(pool = %name, error = %e, "IPPool left out");
            }
            alloc.set_pools(pools);
            let services = stores.services.state();
            let outcomes = addresses::reconcile(&mut alloc, &services, default_class);
            // By `namespace/name`, made once (a search per outcome would cost the square of
            // the Services).
            let by_key: std::collections::HashMap<String, &Service> = if outcomes.is_empty() {
                std::collections::HashMap::new()
            } else {
                services.iter().map(|s| (translate::key(s), &**s)).collect()
            };
            for o in outcomes {
                let Some((ns, name)) = o.service.split_once('/') else {
                    continue;
                };
                let Some(svc) = by_key.get(o.service.as_str()).copied() else {
                    continue;
                };
                let want: Vec<String> = o.ingress.iter().map(ToString::to_string).collect();
                let want_cond = o.condition.as_ref().map(|c| {
                    (
                        if c.ok { "True" } else { "False" }.to_string(),
                        c.reason.to_string(),
                        c.message.clone(),
                    )
                });
                if current_ingress(svc) == want && current_condition(svc) == want_cond {
                    continue;
                }
                let api: Api<Service> = Api::namespaced(client.clone(), ns);
                let patch = status_patch(svc, &o, Timestamp::now());
                let params = PatchParams::apply(MANAGER).force();
                match bounded(
                    "writing a Service status",
                    api.patch_status(name, &params, &Patch::Apply(&patch)),
                )
                .await
                {
                    Ok(_) => {
                        info!(service = %o.service, ingress = ?want, condition = ?want_cond, "Service status written");
                    }
                    Err(e) => {
                        if !outage::is_down() {
                            warn!(service = %o.service, error = %e, "writing the Service status failed; retried on the next change");
                        }
                    }
                }
                if let Some(c) = o.condition.as_ref().filter(|c| !c.ok) {
                    // An Event when the failure is new (the condition above changed).
                    let reference: ObjectReference = svc.object_ref(&());
                    let ev = Event {
                        type_: EventType::Warning,
                        reason: c.reason.to_string(),
                        note: Some(c.message.clone()),
                        action: "AllocateAddress".into(),
                        secondary: None,
                    };
                    if let Err(e) =
                        bounded("publishing an Event", recorder.publish(&ev, &reference)).await
                        && !outage::is_down()
                    {
                        warn!(service = %o.service, error = %e, "publishing an Event failed");
                    }
                }
            }
            write_pool_status(&client, &stores, &alloc, &bad).await;
            tokio::select! {
                r = changed.changed() => if r.is_err() { return },
                r = leader.changed() => if r.is_err() { return },
            }
            tokio::time::sleep(DEBOUNCE).await;
        }
        info!("no longer leading");
    }
}

/// The status an IPPool should show: addresses handed out, addresses left, and whether its
/// spec is valid (`bad`: the reason when not).
pub fn pool_status(alloc: &Allocator, name: &str, bad: Option<&String>) -> serde_json::Value {
    let pool = alloc.pools().find(|p| p.name == name);
    let assigned = alloc.assigned_in(name);
    let available = pool.map_or(0, |p| p.size(None).saturating_sub(u128::from(assigned)));
    let available = if available >= 1u128 << 64 {
        "2^64 or more".to_string()
    } else {
        available.to_string()
    };
    let (state, reason, message) = match bad {
        Some(e) => ("False", "InvalidSpec", e.clone()),
        None => (
            "True",
            "Valid",
            format!("{assigned} assigned, {available} available"),
        ),
    };
    serde_json::json!({
        "assigned": assigned,
        "available": available,
        "conditions": [{
            "type": "Valid", "status": state, "reason": reason, "message": message,
            "lastTransitionTime": Timestamp::now().to_string(),
        }],
    })
}

/// Writes each IPPool's status when it changed.
pub(super) async fn write_pool_status(
    client: &Client,
    stores: &Stores,
    alloc: &Allocator,
    bad: &BTreeMap<String, String>,
) {
    let api: Api<IPPool> = Api::all(client.clone());
    for pool in stores.pools.state() {
        let name = pool.name_any();
        let want = pool_status(alloc, &name, bad.get(&name));
        let have = pool.status.as_ref();
        let same = have.is_some_and(|h| {
            serde_json::json!(h.assigned) == want["assigned"]
                && h.available == want["available"].as_str().unwrap_or_default()
                && h.conditions.first().is_some_and(|c| {
                    c.status == want["conditions"][0]["status"]
                        && c.message == want["conditions"][0]["message"]
                })
        });
        if same {
            continue;
        }
        let patch = serde_json::json!({
            "apiVersion": "weir.dev/v1alpha1", "kind": "IPPool",
            "metadata": {"name": name}, "status": want,
        });
        let params = PatchParams::apply(MANAGER).force();
        if let Err(e) = bounded(
            "writing an IPPool status",
            api.patch_status(&name, &params, &Patch::Apply(&patch)),
        )
        .await
            && !outage::is_down()
        {
            warn!(pool = %name, error = %e, "writing the IPPool status failed");
        }
    }
}
