//! Address annotations of a Service: `weir.dev/load-balancer-ips`, `weir.dev/ip-pool`,
//! `weir.dev/allow-shared-ip`, with MetalLB's names (`metallb.io/…` and the legacy
//! `metallb.universe.tf/…`) accepted as aliases so that Services move over unchanged;
//! `weir.dev/*` wins when both are present. (Health-check annotations: `crate::model::check`.)

use std::{collections::BTreeMap, net::IpAddr};

pub const LOAD_BALANCER_IPS: [&str; 3] = [
    "weir.dev/load-balancer-ips",
    "metallb.io/loadBalancerIPs",
    "metallb.universe.tf/loadBalancerIPs",
];
pub const IP_POOL: [&str; 3] = [
    "weir.dev/ip-pool",
    "metallb.io/address-pool",
    "metallb.universe.tf/address-pool",
];
pub const ALLOW_SHARED_IP: [&str; 3] = [
    "weir.dev/allow-shared-ip",
    "metallb.io/allow-shared-ip",
    "metallb.universe.tf/allow-shared-ip",
];

/// What the address annotations ask for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddressRequest {
    pub addresses: Vec<IpAddr>,
    pub pool: Option<String>,
    pub sharing: Option<String>,
}

/// A bad annotation: the key the value came from, and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("annotation {key}: {message}")]
pub struct AnnotationError {
    pub key: String,
    pub message: String,
}

/// The first of `keys` present: (key, trimmed value).
fn first<'a>(
    annotations: &'a BTreeMap<String, String>,
    keys: &[&'static str],
) -> Option<(&'static str, &'a str)> {
    keys.iter()
        .find_map(|k| annotations.get(*k).map(|v| (*k, v.trim())))
}

/// Parses the address annotations (and the deprecated `spec.loadBalancerIP`, used when no
/// annotation asks for addresses).
pub fn address_request(
    annotations: &BTreeMap<String, String>,
    load_balancer_ip: Option<&str>,
) -> Result<AddressRequest, AnnotationError> {
    let mut req = AddressRequest::default();
    let ips = first(annotations, &LOAD_BALANCER_IPS)
        .or_else(|| load_balancer_ip.map(|v| ("spec.loadBalancerIP", v.trim())))
        .filter(|(_, v)| !v.is_empty());
    if let Some((key, value)) = ips {
        for part in value.split(',') {
            let ip: IpAddr = part.trim().parse().map_err(|_| AnnotationError {
                key: key.to_string(),
                message: format!(
                    "{:?} is not an IP address (expected a comma-separated list)",
                    part.trim()
                ),
            })?;
            if req.addresses.contains(&ip) {
                return Err(AnnotationError {
                    key: key.to_string(),
                    message: format!("{ip} is listed twice"),
                });
            }
            req.addresses.push(ip);
        }
        if req.addresses.len() > 2
            || (req.addresses.len() == 2
                && req.addresses[0].is_ipv4() == req.addresses[1].is_ipv4())
        {
            return Err(AnnotationError {
                key: key.to_string(),
                message: "at most one IPv4 and one IPv6 address".into(),
            });
        }
    }
    if let Some((key, value)) = first(annotations, &IP_POOL) {
        if !valid_name(value) {
            return Err(AnnotationError {
                key: key.to_string(),
                message: format!("{value:?} is not an IPPool name (a DNS subdomain)"),
            });
        }
        req.pool = Some(value.to_string());
    }
    if let Some((key, value)) = first(annotations, &ALLOW_SHARED_IP) {
        if value.is_empty() {
            return Err(AnnotationError {
                key: key.to_string(),
                message: "empty sharing key".into(),
            });
        }
        req.sharing = Some(value.to_string());
    }
    Ok(req)
}

/// A Kubernetes object name (RFC 1123 subdomain).
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn weir_names_win_over_metallb_aliases() {
        let a = ann(&[
            ("metallb.io/loadBalancerIPs", "198.18.100.20"),
            ("weir.dev/load-balancer-ips", "198.18.100.21, fd00:100::21"),
            ("metallb.universe.tf/address-pool", "legacy"),
            ("metallb.io/allow-shared-ip", "team-a"),
        ]);
        assert_eq!(
            address_request(&a, Some("198.18.100.99")).unwrap(),
            AddressRequest {
                addresses: vec![
                    "198.18.100.21".parse().unwrap(),
                    "fd00:100::21".parse().unwrap()
                ],
                pool: Some("legacy".into()),
                sharing: Some("team-a".into()),
            }
        );
        // spec.loadBalancerIP only when no annotation asks.
        assert_eq!(
            address_request(&BTreeMap::new(), Some("198.18.100.99"))
                .unwrap()
                .addresses,
            vec!["198.18.100.99".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            address_request(&BTreeMap::new(), Some("")).unwrap(),
            AddressRequest::default()
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        for (pairs, key, message) in [
            (
                vec![("weir.dev/load-balancer-ips", "198.18.100.300")],
                "weir.dev/load-balancer-ips",
                "\"198.18.100.300\" is not an IP address",
            ),
            (
                vec![("metallb.io/loadBalancerIPs", "198.18.100.1,198.18.100.2")],
                "metallb.io/loadBalancerIPs",
                "at most one IPv4 and one IPv6",
            ),
            (
                vec![("weir.dev/load-balancer-ips", "198.18.100.1,198.18.100.1")],
                "weir.dev/load-balancer-ips",
                "listed twice",
            ),
            (
                vec![("weir.dev/ip-pool", "Bad_Pool")],
                "weir.dev/ip-pool",
                "not an IPPool name",
            ),
            (
                vec![("metallb.universe.tf/allow-shared-ip", " ")],
                "metallb.universe.tf/allow-shared-ip",
                "empty sharing key",
            ),
        ] {
            let e = address_request(&ann(&pairs), None).unwrap_err();
            assert_eq!(e.key, key);
            assert!(e.to_string().contains(message), "{e}");
        }
    }
}
