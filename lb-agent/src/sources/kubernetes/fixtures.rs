//! Builders of Kubernetes objects for tests: `Svc::lb("ns", "web").port("http", 80, "TCP")`.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        core::v1::{
            ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, Node, Service, ServicePort,
            ServiceSpec, ServiceStatus, SessionAffinityConfig,
        },
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use super::translate::{CLASS, EXCLUDE_LABEL, SERVICE_NAME_LABEL};

pub struct Svc(pub Service);

impl Svc {
    /// A LoadBalancer Service of weir's class.
    pub fn lb(ns: &str, name: &str) -> Self {
        Self(Service {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                type_: Some("LoadBalancer".into()),
                load_balancer_class: Some(CLASS.into()),
                ..ServiceSpec::default()
            }),
            status: None,
        })
    }

    /// A Service of `type_` (ClusterIP, NodePort, LoadBalancer without a class) with these
    /// cluster IPs.
    pub fn of_type(ns: &str, name: &str, type_: &str, cluster_ips: &[&str]) -> Self {
        let mut s = Self::lb(ns, name).class(None).type_(type_);
        let spec = s.spec();
        spec.cluster_ips = Some(cluster_ips.iter().map(ToString::to_string).collect());
        spec.cluster_ip = cluster_ips.first().map(ToString::to_string);
        s
    }

    /// The last port's nodePort.
    pub fn node_port(mut self, port: i32) -> Self {
        if let Some(p) = self.spec().ports.as_mut().and_then(|p| p.last_mut()) {
            p.node_port = Some(port);
        }
        self
    }

    pub fn external_ips(mut self, ips: &[&str]) -> Self {
        self.spec().external_ips = Some(ips.iter().map(ToString::to_string).collect());
        self
    }

    pub fn internal_local(mut self) -> Self {
        self.spec().internal_traffic_policy = Some("Local".into());
        self
    }

    pub fn health_check_node_port(mut self, port: i32) -> Self {
        self.spec().health_check_node_port = Some(port);
        self
    }

    /// An ingress address with this `ipMode`.
    pub fn ingress_mode(mut self, ip: &str, mode: &str) -> Self {
        self = self.ingress(ip);
        if let Some(i) = self
            .0
            .status
            .as_mut()
            .and_then(|s| s.load_balancer.as_mut())
            .and_then(|l| l.ingress.as_mut())
            .and_then(|i| i.last_mut())
        {
            i.ip_mode = Some(mode.into());
        }
        self
    }

    fn spec(&mut self) -> &mut ServiceSpec {
        self.0.spec.get_or_insert_with(ServiceSpec::default)
    }

    pub fn class(mut self, class: Option<&str>) -> Self {
        self.spec().load_balancer_class = class.map(str::to_string);
        self
    }

    pub fn type_(mut self, t: &str) -> Self {
        self.spec().type_ = Some(t.into());
        self
    }

    pub fn port(mut self, name: &str, port: i32, protocol: &str) -> Self {
        self.spec()
            .ports
            .get_or_insert_with(Vec::new)
            .push(ServicePort {
                name: (!name.is_empty()).then(|| name.to_string()),
                port,
                protocol: Some(protocol.into()),
                ..ServicePort::default()
            });
        self
    }

    pub fn ingress(mut self, ip: &str) -> Self {
        self.0
            .status
            .get_or_insert_with(ServiceStatus::default)
            .load_balancer
            .get_or_insert_with(LoadBalancerStatus::default)
            .ingress
            .get_or_insert_with(Vec::new)
            .push(LoadBalancerIngress {
                ip: Some(ip.into()),
                ip_mode: Some("VIP".into()),
                ..LoadBalancerIngress::default()
            });
        self
    }

    pub fn local(mut self) -> Self {
        self.spec().external_traffic_policy = Some("Local".into());
        self
    }

    pub fn affinity(mut self, timeout: Option<i32>) -> Self {
        let spec = self.spec();
        spec.session_affinity = Some("ClientIP".into());
        spec.session_affinity_config = timeout.map(|t| SessionAffinityConfig {
            client_ip: Some(ClientIPConfig {
                timeout_seconds: Some(t),
            }),
        });
        self
    }

    pub fn source_ranges(mut self, ranges: &[&str]) -> Self {
        self.spec().load_balancer_source_ranges =
            Some(ranges.iter().map(ToString::to_string).collect());
        self
    }

    pub fn annotation(mut self, k: &str, v: &str) -> Self {
        self.0
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(k.into(), v.into());
        self
    }

    pub fn build(self) -> Service {
        self.0
    }
}

pub struct Slice(pub EndpointSlice);

/// Endpoint conditions: (ready, serving, terminating); None leaves a condition unset.
pub type Cond = (Option<bool>, Option<bool>, Option<bool>);
pub const READY: Cond = (Some(true), Some(true), Some(false));
pub const UNSET: Cond = (None, None, None);
pub const TERMINATING: Cond = (Some(false), Some(true), Some(true));
pub const GONE: Cond = (Some(false), Some(false), Some(true));

impl Slice {
    /// A slice of Service `ns/service` for `family` ("IPv4" or "IPv6").
    pub fn of(ns: &str, service: &str, name: &str, family: &str) -> Self {
        Self(EndpointSlice {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                labels: Some([(SERVICE_NAME_LABEL.to_string(), service.to_string())].into()),
                ..ObjectMeta::default()
            },
            address_type: family.into(),
            endpoints: Vec::new(),
            ports: Some(Vec::new()),
        })
    }

    pub fn port(mut self, name: &str, port: i32, protocol: &str) -> Self {
        self.0
            .ports
            .get_or_insert_with(Vec::new)
            .push(EndpointPort {
                name: Some(name.into()),
                port: Some(port),
                protocol: Some(protocol.into()),
                app_protocol: None,
            });
        self
    }

    pub fn endpoint(mut self, addr: &str, node: &str, c: Cond) -> Self {
        self.0.endpoints.push(Endpoint {
            addresses: vec![addr.into()],
            node_name: Some(node.into()),
            conditions: Some(EndpointConditions {
                ready: c.0,
                serving: c.1,
                terminating: c.2,
            }),
            ..Endpoint::default()
        });
        self
    }

    /// A ready endpoint with topology hints for these zones and nodes.
    pub fn endpoint_hinted(
        mut self,
        addr: &str,
        node: &str,
        zones: &[&str],
        nodes: &[&str],
    ) -> Self {
        use k8s_openapi::api::discovery::v1::{EndpointHints, ForNode, ForZone};
        self = self.endpoint(addr, node, READY);
        if let Some(e) = self.0.endpoints.last_mut() {
            e.hints = Some(EndpointHints {
                for_zones: (!zones.is_empty()).then(|| {
                    zones
                        .iter()
                        .map(|z| ForZone { name: (*z).into() })
                        .collect()
                }),
                for_nodes: (!nodes.is_empty()).then(|| {
                    nodes
                        .iter()
                        .map(|n| ForNode { name: (*n).into() })
                        .collect()
                }),
            });
        }
        self
    }

    /// A ready endpoint without a node name (e.g. outside the cluster).
    pub fn endpoint_nowhere(mut self, addr: &str) -> Self {
        self.0.endpoints.push(Endpoint {
            addresses: vec![addr.into()],
            ..Endpoint::default()
        });
        self
    }

    pub fn build(self) -> EndpointSlice {
        self.0
    }
}

pub fn node(name: &str, excluded: bool) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: excluded.then(|| [(EXCLUDE_LABEL.to_string(), String::new())].into()),
            ..ObjectMeta::default()
        },
        ..Node::default()
    }
}

/// A node with these InternalIP addresses in zone `zone`.
pub fn node_in(name: &str, internal: &[&str], zone: &str) -> Node {
    let mut n = node_at(name, internal);
    n.metadata.labels = Some([(super::translate::ZONE_LABEL.to_string(), zone.to_string())].into());
    n
}

/// A node with these InternalIP addresses.
pub fn node_at(name: &str, internal: &[&str]) -> Node {
    let mut n = node(name, false);
    n.status = Some(k8s_openapi::api::core::v1::NodeStatus {
        addresses: Some(
            internal
                .iter()
                .map(|a| k8s_openapi::api::core::v1::NodeAddress {
                    address: (*a).into(),
                    type_: "InternalIP".into(),
                })
                .collect(),
        ),
        ..Default::default()
    });
    n
}
