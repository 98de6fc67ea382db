//! The Helm chart's default rendering (`weir_lab::chart`: the subset of Helm's template
//! language the chart keeps to; no `helm` binary can be installed here) is committed as
//! `deploy/weir.yaml`, and every object in it must deserialize into its Kubernetes type
//! (k8s-openapi) without losing a field — a misspelled field fails. The node config in the
//! ConfigMap must load in the agent; the chart's dashboards must be the shipped ones. No root.

use std::path::{Path, PathBuf};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Service, ServiceAccount},
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

#[test]
fn the_default_rendering_is_committed_and_valid() {
    let chart = root().join("charts/weir");
    let rendered = weir_lab::chart::render(&chart, "weir-system").expect("render");
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
    let mut kinds = Vec::new();
    for v in serde_saphyr::from_multiple::<Value>(&committed).expect("YAML") {
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
            "DaemonSet" => check::<DaemonSet>(&v),
            "Service" => check::<Service>(&v),
            other => Err(format!("no check for kind {other:?}")),
        };
        if let Err(e) = r {
            panic!("{kind} {name}: {e}");
        }
        if kind == "ConfigMap" && name == "weir-config" {
            let dir = std::env::temp_dir().join(format!("weir-chart-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let file = dir.join("weir.yaml");
            std::fs::write(&file, v["data"]["weir.yaml"].as_str().unwrap()).unwrap();
            let loaded = lb_agent::config::Source::File(file.clone()).load();
            std::fs::remove_dir_all(&dir).unwrap();
            let c = loaded.unwrap_or_else(|e| panic!("the chart's node config: {e}"));
            assert!(c.desired.services.is_empty());
            assert_eq!(c.node.interfaces, ["eth0"]);
        }
        kinds.push(kind);
    }
    for k in [
        "CustomResourceDefinition",
        "DaemonSet",
        "ClusterRole",
        "Role",
        "ConfigMap",
        "Service",
    ] {
        assert!(kinds.iter().any(|x| x == k), "no {k} in {kinds:?}");
    }
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
    let rendered =
        weir_lab::chart::render_with(&root().join("charts/weir"), "weir-system", &overrides)
            .expect("render");
    let (mut peers, mut adverts, mut l2) = (Vec::new(), Vec::new(), Vec::new());
    let mut node_config = None;
    for v in serde_saphyr::from_multiple::<Value>(&rendered).expect("YAML") {
        if v["kind"] == "ConfigMap" && v["metadata"]["name"] == "weir-config" {
            node_config = v["data"]["weir.yaml"].as_str().map(str::to_string);
        }
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
    let c = lb_agent::config::Config::parse(&node_config.expect("weir-config"), "weir.yaml")
        .unwrap_or_else(|e| panic!("the chart's node config: {e:?}"));
    assert_eq!(c.announce.l2_interfaces, ["eth0"]);
    let g = c.announce.gossip.expect("gossip");
    assert_eq!(g.listen, "0.0.0.0:7946".parse().unwrap());
    assert_eq!(g.peers, None);
    // The default values create none, and no announce section.
    let default = weir_lab::chart::render(&root().join("charts/weir"), "weir-system").unwrap();
    for kind in ["BGPPeer", "BGPAdvertisement", "L2Advertisement"] {
        assert!(!default.contains(&format!("\nkind: {kind}\n")), "{kind}");
    }
    assert!(!default.contains("announce:"));
}
