//! The Helm chart through the real `helm` (`weir_lab::chart`): `helm lint --strict` passes for
//! the default values and every other value set below; the default rendering is committed as
//! `deploy/weir.yaml`; every object `helm template` renders must deserialize into its
//! Kubernetes type (k8s-openapi, or weir's own CRD types) without losing a field — a
//! misspelled field fails; the node config in the ConfigMap must load in the agent with the
//! values given; the chart's dashboards must be the shipped ones. No root. `helm install`,
//! `upgrade` and `uninstall` need a cluster: not here.

use std::path::{Path, PathBuf};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Secret, Service, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `a`'s every field, with the same value, in `b`.
fn subset(a: &Value, b: &Value, at: &str) -> Result<(), String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in x {
                let w = y
                    .get(k)
                    .ok_or_else(|| format!("{at}.{k}: not a field of the type"))?;
                subset(v, w, &format!("{at}.{k}"))?;
            }
            Ok(())
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .try_for_each(|(i, (v, w))| subset(v, w, &format!("{at}[{i}]"))),
        (Value::Number(x), Value::Number(y)) if x.as_f64() == y.as_f64() => Ok(()),
        _ if a == b => Ok(()),
        _ => Err(format!("{at}: {a} became {b}")),
    }
}

fn check<T: DeserializeOwned + Serialize>(doc: &Value) -> Result<(), String> {
    let typed: T = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    subset(doc, &back, "")
}

fn chart() -> PathBuf {
    root().join("charts/weir")
}

/// Lints and renders the chart with `values`, checks every object against its type, and
/// returns them (kind, name, object).
fn render(values: Option<&Value>) -> Vec<(String, String, Value)> {
    weir_lab::chart::lint(&chart(), values).unwrap_or_else(|e| panic!("helm lint: {e}"));
    let rendered = weir_lab::chart::template(&chart(), values).unwrap_or_else(|e| panic!("{e}"));
    objects(&rendered)
}

fn objects(rendered: &str) -> Vec<(String, String, Value)> {
    use lb_agent::sources::kubernetes::crd::{BGPAdvertisement, BGPPeer, IPPool, L2Advertisement};
    let mut out = Vec::new();
    for v in serde_saphyr::from_multiple::<Value>(rendered).expect("YAML") {
        if v.is_null() {
            continue;
        }
        let kind = v["kind"].as_str().unwrap_or_default().to_string();
        let name = v["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let r = match kind.as_str() {
            "CustomResourceDefinition" => check::<CustomResourceDefinition>(&v),
            "ServiceAccount" => check::<ServiceAccount>(&v),
            "ClusterRole" => check::<ClusterRole>(&v),
            "ClusterRoleBinding" => check::<ClusterRoleBinding>(&v),
            "Role" => check::<Role>(&v),
            "RoleBinding" => check::<RoleBinding>(&v),
            "ConfigMap" => check::<ConfigMap>(&v),
            "Secret" => check::<Secret>(&v),
            "DaemonSet" => check::<DaemonSet>(&v),
            "Service" => check::<Service>(&v),
            "IPPool" => check::<IPPool>(&v),
            "BGPPeer" => check::<BGPPeer>(&v),
            "BGPAdvertisement" => check::<BGPAdvertisement>(&v),
            "L2Advertisement" => check::<L2Advertisement>(&v),
            // The Prometheus Operator's type is not in k8s-openapi: its required parts.
            "ServiceMonitor" => {
                if v["apiVersion"] == "monitoring.coreos.com/v1"
                    && v["spec"]["endpoints"][0]["port"] == "metrics"
                {
                    Ok(())
                } else {
                    Err(format!("not a ServiceMonitor of the metrics port: {v}"))
                }
            }
            other => Err(format!("no check for kind {other:?}")),
        };
        if let Err(e) = r {
            panic!("{kind} {name}: {e}");
        }
        out.push((kind, name, v));
    }
    out
}

/// The agent's config as the chart's ConfigMap gives it.
fn node_config(objects: &[(String, String, Value)]) -> lb_agent::config::Config {
    let (_, _, cm) = objects
        .iter()
        .find(|(k, n, _)| k == "ConfigMap" && n == "weir-config")
        .expect("the weir-config ConfigMap");
    let mut text = cm["data"]["weir.yaml"]
        .as_str()
        .expect("weir.yaml")
        .to_string();
    // The gossip key as the pod sees it: the rendered Secret's, in a file of the test's.
    const KEY_FILE: &str = "/run/weir/gossip/key";
    if text.contains(KEY_FILE) {
        let (_, _, secret) = objects
            .iter()
            .find(|(k, n, _)| k == "Secret" && n == "weir-gossip")
            .expect("the weir-gossip Secret");
        let secret: Secret = serde_json::from_value(secret.clone()).expect("a Secret");
        let key = secret.data.expect("data")["key"].0.clone();
        let file = std::env::temp_dir().join(format!("weir-chart-gossip-{}", std::process::id()));
        std::fs::write(&file, key).expect("key file");
        text = text.replace(KEY_FILE, file.to_str().expect("utf-8"));
    }
    lb_agent::config::Config::parse(&text, "weir.yaml")
        .unwrap_or_else(|e| panic!("the chart's node config: {e:?}"))
}

fn find<'a>(objects: &'a [(String, String, Value)], kind: &str) -> Option<&'a Value> {
    objects
        .iter()
        .find(|(k, _, _)| k == kind)
        .map(|(_, _, v)| v)
}

#[test]
fn the_default_rendering_is_committed_and_valid() {
    weir_lab::chart::lint(&chart(), None).unwrap_or_else(|e| panic!("helm lint: {e}"));
    let rendered = weir_lab::chart::template(&chart(), None).expect("helm template");
    let committed_path = root().join("deploy/weir.yaml");
    if std::env::var_os("WEIR_UPDATE_MANIFEST").is_some() {
        std::fs::write(&committed_path, &rendered).unwrap();
    }
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
    assert!(
        committed == rendered,
        "deploy/weir.yaml is not the chart's default rendering; regenerate it with\n  \
         WEIR_UPDATE_MANIFEST=1 cargo test -p weir-lab --test chart"
    );
    let objects = objects(&committed);
    // The image scripts/image builds and names (docker.io/weir/lb-agent:<version>).
    let ds = find(&objects, "DaemonSet").expect("DaemonSet");
    assert_eq!(
        ds["spec"]["template"]["spec"]["containers"][0]["image"],
        format!("weir/lb-agent:{}", env!("CARGO_PKG_VERSION"))
    );
    // The security context the image test runs the agent with.
    let sc = &ds["spec"]["template"]["spec"]["containers"][0]["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{sc}");
    assert_eq!(sc["allowPrivilegeEscalation"], false, "{sc}");
    assert_eq!(sc["privileged"], false, "{sc}");
    assert!(sc.get("seccompProfile").is_none(), "{sc}");
    let c = node_config(&objects);
    assert!(c.desired.services.is_empty());
    assert_eq!(c.node.interfaces, ["eth0"]);
    assert!(c.pinning.keep_on_exit);
    let kinds: Vec<&str> = objects.iter().map(|(k, _, _)| k.as_str()).collect();
    for k in [
        "CustomResourceDefinition",
        "DaemonSet",
        "ClusterRole",
        "Role",
        "ConfigMap",
        "Service",
    ] {
        assert!(kinds.contains(&k), "no {k} in {kinds:?}");
    }
    for k in ["ServiceMonitor", "IPPool", "BGPPeer", "L2Advertisement"] {
        assert!(!kinds.contains(&k), "{k} by default");
    }
}

/// Every value the docs name, away from its default: each shows up where it should.
#[test]
fn every_documented_value_renders_where_it_belongs() {
    let values = serde_json::json!({
        "image": {"repository": "registry.example/weir/lb-agent", "tag": "9.9.9", "pullPolicy": "Always"},
        "node": {"interfaces": ["eth1", "eth2"], "xdpMode": "native", "sourceNatPorts": "62000-62999",
                 "nodePortAddresses": ["198.18.0.0/24"], "healthzPort": 10257},
        "kubeProxyReplacement": true,
        "seccompProfile": {"type": "RuntimeDefault"},
        "hostCgroupRoot": "/sys/fs/cgroup/unified",
        "hostNetnsDir": "/var/run/netns",
        "adminPort": 9400,
        "metricsPort": 9401,
        "maglev": {"tableSize": 65537},
        "dataplane": {"maxServices": 100, "maxBackends": 1000, "conntrackSize": 100_000, "keepOnExit": false},
        "terminationGracePeriodSeconds": 60,
        "defaultClass": false,
        "pools": [{"name": "default", "addresses": ["198.18.100.0/24"], "avoidBuggyIPs": true}],
        "metrics": {"service": false, "serviceMonitor": true},
        "dashboards": {"enabled": false},
        "resources": {"requests": {"cpu": "200m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}},
    });
    let objects = render(Some(&values));
    let ds = find(&objects, "DaemonSet").expect("DaemonSet");
    let agent = &ds["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(agent["image"], "registry.example/weir/lb-agent:9.9.9");
    assert_eq!(agent["imagePullPolicy"], "Always");
    assert!(
        !agent["args"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == "--default-class"),
        "{}",
        agent["args"]
    );
    assert_eq!(agent["ports"][0]["containerPort"], 9401);
    // Beside SYS_ADMIN Kubernetes refuses allowPrivilegeEscalation: false.
    let sc = &agent["securityContext"];
    assert!(sc.get("allowPrivilegeEscalation").is_none(), "{sc}");
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{sc}");
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{sc}");
    assert_eq!(agent["readinessProbe"]["httpGet"]["port"], "metrics");
    assert_eq!(agent["resources"]["limits"]["memory"], "1Gi");
    assert_eq!(
        ds["spec"]["template"]["spec"]["terminationGracePeriodSeconds"],
        60
    );
    assert!(!node_config(&objects).pinning.keep_on_exit);
    let c = node_config(&objects);
    assert_eq!(c.node.interfaces, ["eth1", "eth2"]);
    assert_eq!(c.node.xdp_mode, lb_agent::dataplane::XdpMode::Native);
    assert_eq!(c.node.source_nat.ports, (62000, 62999));
    assert!(c.node.kube_proxy_replacement);
    assert_eq!(c.node.socket_lb, Some("/run/weir/cgroup".into()));
    assert_eq!(
        c.node.nodeport_addresses,
        ["198.18.0.0/24".parse::<ipnet::IpNet>().unwrap()]
    );
    assert_eq!(
        c.node.healthz_listen,
        Some("0.0.0.0:10257".parse().unwrap())
    );
    let pod = &ds["spec"]["template"]["spec"];
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "cgroup")
        .expect("the host's cgroup2 volume");
    assert_eq!(volume["hostPath"]["path"], "/sys/fs/cgroup/unified");
    let netns = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "netns")
        .expect("the pods' namespaces");
    assert_eq!(netns["hostPath"]["path"], "/var/run/netns");
    assert_eq!(c.node.netns_dir, Some("/run/netns".into()));
    assert!(
        agent["securityContext"]["capabilities"]["add"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "SYS_ADMIN"),
        "{}",
        agent["securityContext"]
    );
    assert!(
        agent["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "cgroup" && m["mountPath"] == "/run/weir/cgroup"),
        "{}",
        agent["volumeMounts"]
    );
    assert_eq!(c.admin.listen, "127.0.0.1:9400".parse().unwrap());
    assert_eq!(
        c.admin.metrics_listen,
        Some("0.0.0.0:9401".parse().unwrap())
    );
    assert_eq!(c.maglev.table_size, 65537);
    assert_eq!(
        (
            c.dataplane.max_services,
            c.dataplane.max_backends,
            c.dataplane.conntrack_size
        ),
        (100, 1000, 100_000)
    );
    let pool = find(&objects, "IPPool").expect("IPPool");
    assert_eq!(pool["spec"]["addresses"][0], "198.18.100.0/24");
    assert!(find(&objects, "ServiceMonitor").is_some());
    assert!(
        !objects
            .iter()
            .any(|(k, n, _)| (k == "Service" && n == "weir-metrics")
                || (k == "ConfigMap" && n == "weir-dashboards")),
        "metrics Service or dashboards rendered though disabled"
    );
}

#[test]
fn the_chart_ships_the_dashboards() {
    for entry in std::fs::read_dir(root().join("dashboards")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap();
        let copy = root().join("charts/weir/dashboards").join(name);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            std::fs::read(&copy).unwrap_or_default(),
            "charts/weir/dashboards/{name:?} differs from dashboards/: copy it again"
        );
    }
}

#[test]
fn announce_values_render_as_resources_and_node_config_the_agent_reads() {
    use lb_agent::sources::kubernetes::crd::{BGPAdvertisement, BGPPeer, L2Advertisement};
    let overrides = serde_json::json!({"bgp": {
        "peers": [{"name": "tor", "spec": {
            "address": "198.18.0.254", "remoteAS": 64513, "localAS": 64512, "bfd": true,
            "passwordSecret": {"name": "bgp-tor"},
            "nodeSelector": {"matchLabels": {"rack": "a"}},
        }}],
        "advertisements": [{"name": "default", "spec": {
            "ipPools": ["default"], "communities": ["64512:100"], "localPref": 150,
        }}],
    }, "l2": {
        "interfaces": ["eth0"],
        "advertisements": [{"name": "edge", "spec": {
            "ipPools": ["default"], "nodeSelector": {"matchLabels": {"edge": "true"}},
        }}],
    }});
    let objects = render(Some(&overrides));
    let (mut peers, mut adverts, mut l2) = (Vec::new(), Vec::new(), Vec::new());
    for (_, _, v) in objects.iter().cloned() {
        match v["kind"].as_str() {
            Some("L2Advertisement") => {
                l2.push(serde_json::from_value::<L2Advertisement>(v).expect("L2Advertisement"));
            }
            Some("BGPPeer") => peers.push(serde_json::from_value::<BGPPeer>(v).expect("BGPPeer")),
            Some("BGPAdvertisement") => adverts
                .push(serde_json::from_value::<BGPAdvertisement>(v).expect("BGPAdvertisement")),
            _ => {}
        }
    }
    let [peer] = peers.as_slice() else {
        panic!("{peers:?}")
    };
    assert_eq!(peer.metadata.name.as_deref(), Some("tor"));
    assert_eq!(
        (
            peer.spec.address.as_str(),
            peer.spec.remote_as,
            peer.spec.local_as,
            peer.spec.bfd
        ),
        ("198.18.0.254", 64513, 64512, true)
    );
    assert_eq!(peer.spec.password_secret.as_ref().unwrap().name, "bgp-tor");
    let sel = peer.spec.node_selector.as_ref().unwrap();
    assert_eq!(sel.match_labels.as_ref().unwrap()["rack"], "a");
    let [a] = adverts.as_slice() else {
        panic!("{adverts:?}")
    };
    assert_eq!(a.spec.selection.ip_pools, ["default"]);
    assert_eq!(a.spec.communities, ["64512:100"]);
    assert_eq!(a.spec.local_pref, Some(150));
    let [edge] = l2.as_slice() else {
        panic!("{l2:?}")
    };
    assert_eq!(edge.spec.selection.ip_pools, ["default"]);
    assert!(edge.spec.selection.node_selector.is_some());
    // The node config turns L2 mode on with gossip whose peers come from the Nodes.
    let c = node_config(&objects);
    assert_eq!(c.announce.l2_interfaces, ["eth0"]);
    let g = c.announce.gossip.expect("gossip");
    assert_eq!(g.listen, "0.0.0.0:7946".parse().unwrap());
    assert_eq!(g.peers, None);
    // Authenticated with the key of the Secret the chart makes, mounted where the config
    // says.
    assert!(g.key.as_ref().is_some_and(|k| k.0.len() >= 16), "{g:?}");
    let ds = find(&objects, "DaemonSet").expect("DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    let vol = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "gossip-key")
        .expect("the gossip-key volume");
    assert_eq!(vol["secret"]["secretName"], "weir-gossip");
    assert!(
        pod["containers"][0]["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "gossip-key" && m["mountPath"] == "/run/weir/gossip")
    );
    // A Secret of the operator's own instead.
    let mut own = overrides.clone();
    own["l2"]["gossipKeySecret"] = serde_json::json!("my-gossip-key");
    let objects = render(Some(&own));
    assert!(!objects.iter().any(|(k, _, _)| k == "Secret"));
    let ds = find(&objects, "DaemonSet").expect("DaemonSet");
    assert!(
        ds["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["secret"]["secretName"] == "my-gossip-key")
    );
    // The default values create none, and no announce section.
    let default = weir_lab::chart::template(&chart(), None).unwrap();
    for kind in ["BGPPeer", "BGPAdvertisement", "L2Advertisement"] {
        assert!(!default.contains(&format!("\nkind: {kind}\n")), "{kind}");
    }
    assert!(!default.contains("announce:"));
}
