//! The elected agent's address work, as a pure function: from every Service and IPPool to what
//! each Service's `status.loadBalancer.ingress` and its `AddressAssigned` condition should say.
//! Services that already hold addresses (their status says so) are taken first, so a new
//! leader adopts the addresses the old one handed out before any new Service can take them.

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::api::core::v1::Service;

use super::{
    annotations::{AnnotationError, address_request},
    crd::IPPool,
    ipam::{AllocError, Allocator, Family, Pool, Request},
    translate::{key, wanted},
};
use crate::model::Protocol;

/// The condition type weir sets on Services.
pub const CONDITION: &str = "weir.dev/AddressAssigned";

/// What one Service's status should become.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// `namespace/name`.
    pub service: String,
    /// The ingress addresses to write (empty: clear what weir wrote).
    pub ingress: Vec<IpAddr>,
    /// None: weir no longer manages the Service (its addresses were released).
    pub condition: Option<AddressCondition>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressCondition {
    pub ok: bool,
    /// CamelCase reason: `Assigned`, `InvalidAnnotation`, `PoolExhausted`, `NoSuchPool`,
    /// `PoolNotAllowed`, `PoolInvalid`, `AddressNotInPool`, `AddressInUse`, `InvalidRequest`.
    pub reason: &'static str,
    pub message: String,
}

/// The pools, validated; a bad IPPool is reported (by name) and frozen: it keeps the
/// addresses it gave out and gives out no new ones.
pub fn pools(pools: &[IPPool]) -> (Vec<Pool>, BTreeMap<String, String>) {
    let mut ok = Vec::new();
    let mut bad = BTreeMap::new();
    for p in pools {
        let name = p.metadata.name.clone().unwrap_or_default();
        match Pool::from_spec(&name, &p.spec) {
            Ok(pool) => ok.push(pool),
            Err(e) => {
                // Frozen: its Services keep their addresses (no renumbering for a typo).
                ok.push(Pool::frozen(&name, &p.spec));
                bad.insert(name, e.to_string());
            }
        }
    }
    (ok, bad)
}

/// The addresses a Service's status shows.
pub fn status_ips(svc: &Service) -> Vec<IpAddr> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_deref()?.parse().ok())
        .collect()
}

/// The allocator's request for a Service.
pub fn request(svc: &Service) -> Result<Request, AnnotationError> {
    let spec = svc.spec.clone().unwrap_or_default();
    let annotations = svc.metadata.annotations.clone().unwrap_or_default();
    let asked = address_request(&annotations, spec.load_balancer_ip.as_deref())?;
    let mut families: Vec<Family> = spec
        .ip_families
        .iter()
        .flatten()
        .filter_map(|f| match f.as_str() {
            "IPv4" => Some(Family::V4),
            "IPv6" => Some(Family::V6),
            _ => None,
        })
        .collect();
    if families.is_empty() {
        families.push(Family::V4);
    }
    Ok(Request {
        service: key(svc),
        namespace: svc
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        labels: svc.metadata.labels.clone().unwrap_or_default(),
        families,
        addresses: asked.addresses,
        pool: asked.pool,
        sharing: asked.sharing,
        ports: spec
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                let proto = match p.protocol.as_deref().unwrap_or("TCP") {
                    "TCP" => Protocol::Tcp,
                    "UDP" => Protocol::Udp,
                    "SCTP" => Protocol::Sctp,
                    _ => return None,
                };
                Some((proto, u16::try_from(p.port).ok()?))
            })
            .collect(),
    })
}

fn reason(e: &AllocError) -> &'static str {
    match e {
        AllocError::NoSuchPool(_) => "NoSuchPool",
        AllocError::PoolFrozen(_) => "PoolInvalid",
        AllocError::PoolNotAllowed { .. } => "PoolNotAllowed",
        AllocError::NotInPool { .. } => "AddressNotInPool",
        AllocError::InUse { .. } => "AddressInUse",
        AllocError::Exhausted { .. } => "PoolExhausted",
        AllocError::TwoOfAFamily(_) | AllocError::NoFamily => "InvalidRequest",
    }
}

/// Brings `alloc` in line with `services` and says what each Service's status should be.
/// Services weir does not serve (any more) lose what weir had given them.
pub fn reconcile(
    alloc: &mut Allocator,
    services: &[impl std::borrow::Borrow<Service>],
    default_class: bool,
) -> Vec<Outcome> {
    let mut out = Vec::new();
    let wanted_keys: BTreeMap<String, &Service> = services
        .iter()
        .map(std::borrow::Borrow::borrow)
        .filter(|s| wanted(s, default_class))
        .map(|s| (key(s), s))
        .collect();
    // Gone, retyped or reclassed: release, and clear the status when weir had written it.
    let gone: Vec<String> = alloc
        .holders()
        .map(|(s, _)| s.to_string())
        .filter(|s| !wanted_keys.contains_key(s))
        .collect();
    for s in gone {
        alloc.release(&s);
        if services.iter().any(|svc| key(svc.borrow()) == s) {
            out.push(Outcome {
                service: s,
                ingress: Vec::new(),
                condition: None,
            });
        }
    }
    // Holders first (status addresses), then the rest, each by name.
    let mut order: Vec<(&String, &&Service)> = wanted_keys.iter().collect();
    order.sort_by_key(|(k, s)| (status_ips(s).is_empty(), (*k).clone()));
    for (k, svc) in order {
        let previous = status_ips(svc);
        let outcome = match request(svc) {
            Err(e) => Outcome {
                service: k.clone(),
                // Keep whatever it has; nothing new until the annotation is fixed.
                ingress: alloc.held(k).map_or(previous, <[IpAddr]>::to_vec),
                condition: Some(AddressCondition {
                    ok: false,
                    reason: "InvalidAnnotation",
                    message: e.to_string(),
                }),
            },
            Ok(req) => match alloc.assign(&req, &previous) {
                Ok(ips) => Outcome {
                    service: k.clone(),
                    condition: Some(AddressCondition {
                        ok: true,
                        reason: "Assigned",
                        message: ips
                            .iter()
                            .map(IpAddr::to_string)
                            .collect::<Vec<_>>()
                            .join(", "),
                    }),
                    ingress: ips,
                },
                Err(e) => Outcome {
                    service: k.clone(),
                    ingress: alloc.held(k).map(<[IpAddr]>::to_vec).unwrap_or_default(),
                    condition: Some(AddressCondition {
                        ok: false,
                        reason: reason(&e),
                        message: e.to_string(),
                    }),
                },
            },
        };
        out.push(outcome);
    }
    out
}

#[cfg(test)]
mod tests {
    use kube::api::ObjectMeta;

    use super::*;
    use crate::sources::kubernetes::{crd::IPPoolSpec, fixtures::Svc};

    fn pool(name: &str, addresses: &[&str]) -> IPPool {
        IPPool {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            spec: IPPoolSpec {
                addresses: addresses.iter().map(ToString::to_string).collect(),
                auto_assign: true,
                ..IPPoolSpec::default()
            },
            status: None,
        }
    }

    fn allocator(p: &[IPPool]) -> Allocator {
        let (ok, bad) = pools(p);
        assert!(bad.is_empty(), "{bad:?}");
        let mut a = Allocator::default();
        a.set_pools(ok);
        a
    }

    fn by_service(o: &[Outcome]) -> BTreeMap<&str, (Vec<String>, Option<&str>)> {
        o.iter()
            .map(|o| {
                (
                    o.service.as_str(),
                    (
                        o.ingress.iter().map(IpAddr::to_string).collect(),
                        o.condition.as_ref().map(|c| c.reason),
                    ),
                )
            })
            .collect()
    }

    #[test]
    fn a_new_leader_adopts_statuses_before_serving_new_services() {
        let mut a = allocator(&[pool("p", &["198.18.100.10-198.18.100.11"])]);
        // "aaa" is new and would come first by name; "zzz" holds .11 from the last leader.
        let services = vec![
            Svc::lb("ns", "aaa").port("http", 80, "TCP").build(),
            Svc::lb("ns", "zzz")
                .port("http", 80, "TCP")
                .ingress("198.18.100.11")
                .build(),
        ];
        let o = reconcile(&mut a, &services, false);
        let m = by_service(&o);
        assert_eq!(
            m["ns/zzz"],
            (vec!["198.18.100.11".into()], Some("Assigned"))
        );
        assert_eq!(
            m["ns/aaa"],
            (vec!["198.18.100.10".into()], Some("Assigned"))
        );
        // Nothing moves on the next round.
        assert_eq!(reconcile(&mut a, &services, false), o);
    }

    #[test]
    fn failures_become_conditions_and_deletes_release() {
        let mut a = allocator(&[pool("p", &["198.18.100.10/32"])]);
        let services = vec![
            Svc::lb("ns", "one").port("http", 80, "TCP").build(),
            Svc::lb("ns", "two").port("http", 80, "TCP").build(),
            Svc::lb("ns", "bad")
                .port("http", 80, "TCP")
                .annotation("weir.dev/load-balancer-ips", "nope")
                .build(),
            Svc::lb("ns", "elsewhere")
                .port("http", 80, "TCP")
                .annotation("metallb.io/address-pool", "missing")
                .build(),
        ];
        let m = reconcile(&mut a, &services, false);
        let m = by_service(&m);
        assert_eq!(
            m["ns/one"],
            (vec!["198.18.100.10".into()], Some("Assigned"))
        );
        assert_eq!(m["ns/two"], (vec![], Some("PoolExhausted")));
        assert_eq!(m["ns/bad"], (vec![], Some("InvalidAnnotation")));
        assert_eq!(m["ns/elsewhere"], (vec![], Some("NoSuchPool")));
        // "one" turns into a ClusterIP Service: its address is released and its status
        // cleared, and "two" gets the address.
        let mut services = services;
        services[0] = Svc::lb("ns", "one")
            .type_("ClusterIP")
            .port("http", 80, "TCP")
            .ingress("198.18.100.10")
            .build();
        let o = reconcile(&mut a, &services, false);
        let m = by_service(&o);
        assert_eq!(m["ns/one"], (vec![], None));
        assert_eq!(
            m["ns/two"],
            (vec!["198.18.100.10".into()], Some("Assigned"))
        );
    }

    #[test]
    fn bad_pools_are_reported_by_name() {
        let (ok, bad) = pools(&[
            pool("good", &["198.18.100.0/30"]),
            pool("bad", &["198.18.100.1/30"]),
        ]);
        assert_eq!(ok.iter().filter(|p| !p.frozen).count(), 1);
        assert!(bad["bad"].contains("spec.addresses[0]"), "{bad:?}");
    }

    /// A typo in an IPPool must not renumber its Services: they keep their addresses, new
    /// Services get none from it, and once it is fixed it hands out addresses again. The same
    /// holds for a new leader that never saw the pool valid (it starts from the statuses).
    #[test]
    fn an_invalid_pool_keeps_its_addresses_and_gives_out_no_new_ones() {
        let good = pool("p", &["198.18.100.10-198.18.100.12"]);
        let other = pool("q", &["198.18.101.10/32"]);
        let mut a = allocator(&[good.clone(), other.clone()]);
        let one = Svc::lb("ns", "one").port("http", 80, "TCP").build();
        let m = reconcile(&mut a, std::slice::from_ref(&one), false);
        assert_eq!(by_service(&m)["ns/one"].0, ["198.18.100.10"]);

        let mut typo = good.clone();
        typo.spec.addresses.push("198.18.100.300".into());
        let set = |a: &mut Allocator, pools_now: &[IPPool]| {
            let (ok, bad) = pools(pools_now);
            a.set_pools(ok);
            bad
        };
        let bad = set(&mut a, &[typo.clone(), other.clone()]);
        assert!(bad.contains_key("p"));
        // A held address stays; a status address stays; a new Service gets the other pool's.
        let one = Svc::lb("ns", "one")
            .port("http", 80, "TCP")
            .ingress("198.18.100.10")
            .build();
        let two = Svc::lb("ns", "two").port("http", 80, "TCP").build();
        let three = Svc::lb("ns", "three")
            .port("http", 80, "TCP")
            .annotation("metallb.io/address-pool", "p")
            .build();
        let services = vec![one.clone(), two.clone(), three.clone()];
        let m = reconcile(&mut a, &services, false);
        let m = by_service(&m);
        assert_eq!(
            m["ns/one"],
            (vec!["198.18.100.10".into()], Some("Assigned"))
        );
        assert_eq!(
            m["ns/two"],
            (vec!["198.18.101.10".into()], Some("Assigned"))
        );
        assert_eq!(m["ns/three"], (vec![], Some("PoolInvalid")));

        // A new leader that only ever saw the typo keeps one's status address too.
        let mut fresh = Allocator::default();
        set(&mut fresh, &[typo, other]);
        let m = reconcile(&mut fresh, std::slice::from_ref(&one), false);
        assert_eq!(by_service(&m)["ns/one"].0, ["198.18.100.10"]);

        // Fixed: three gets an address from it, one keeps its own.
        set(&mut a, &[good, pool("q", &["198.18.101.10/32"])]);
        let m = reconcile(&mut a, &services, false);
        let m = by_service(&m);
        assert_eq!(m["ns/one"].0, ["198.18.100.10"]);
        assert_eq!(
            m["ns/three"],
            (vec!["198.18.100.11".into()], Some("Assigned"))
        );
    }
}
