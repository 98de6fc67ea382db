//! Kubernetes mode end to end in the netns lab: the real agent binary runs `lb-agent run
//! --kubernetes` against the fake API server (`weir_lab::fakeapi`: no kube-apiserver can run
//! on these machines — this is the one mock, and it serves real HTTP list, watch and writes to
//! the agent's real kube-rs client). A Service of type LoadBalancer is created → the elected
//! agent allocates an address from an IPPool and writes it into the Service's status → traffic
//! through it reaches the endpoints in the backend namespaces → an endpoint removed from the
//! EndpointSlice stops receiving new flows → a bad annotation becomes a condition and an Event.
//! With two nodes, each running its agent, `externalTrafficPolicy: Cluster` reaches the other
//! node's pod through source NAT. Needs root; the namespaces are the test's own and are removed afterwards.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::Path,
    process::Stdio,
    time::Duration,
};

use serde_json::{Value, json};
use weir_lab::{
    agent::{Agent, wait_for},
    cgroup::TestCgroup,
    clients::{self, Echo},
    fakeapi,
    lab::*,
    netns::Netns,
    sockclient::{self, spread},
};

const API: &str = "127.0.0.1:6443";
const T: Duration = Duration::from_secs(3);

fn server_bin() -> &'static Path {
    env!("CARGO_BIN_EXE_weir-lab").as_ref()
}

/// A request to the fake API from the LB node's namespace: (status, JSON body).
fn api(ns: &Netns, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    api_at(ns, API.parse().unwrap(), method, path, body)
}

/// A request to the fake API at `addr` from `ns`.
fn api_at(
    ns: &Netns,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    fakeapi::request(ns, addr, method, path, body.as_ref())
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

fn create(ns: &Netns, path: &str, body: Value) {
    let (code, v) = api(ns, "POST", path, Some(body));
    assert_eq!(code, 201, "POST {path}: {v}");
}

fn slice(endpoints: &[IpAddr]) -> Value {
    json!({
        "metadata": {"name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": HTTP_PORT, "protocol": "TCP"}],
        "endpoints": endpoints.iter().map(|a| json!({
            "addresses": [a.to_string()], "nodeName": "lb-node", "conditions": {"ready": true}
        })).collect::<Vec<_>>(),
    })
}

fn service(name: &str, annotations: Value) -> Value {
    json!({
        "metadata": {"name": name, "annotations": annotations},
        "spec": {
            "type": "LoadBalancer", "loadBalancerClass": "weir.dev/lb", "ipFamilies": ["IPv4"],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"}],
        },
    })
}

/// The Service's ingress addresses and its weir condition (status, reason).
fn service_status(ns: &Netns, name: &str) -> (Vec<String>, Option<(String, String)>) {
    let (code, v) = api(
        ns,
        "GET",
        &format!("/api/v1/namespaces/shop/services/{name}"),
        None,
    );
    assert_eq!(code, 200, "{v}");
    let ingress = v["status"]["loadBalancer"]["ingress"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["ip"].as_str().map(str::to_string))
        .collect();
    let cond = v["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "weir.dev/AddressAssigned")
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_string(),
                c["reason"].as_str().unwrap_or_default().to_string(),
            )
        });
    (ingress, cond)
}

/// The backends that answered GETs from `ports` to `vip`.
fn backends_of(lab: &Lab, vip: SocketAddr, ports: std::ops::Range<u16>) -> BTreeSet<String> {
    ports
        .map(|p| {
            let r = lab
                .client
                .run_in(|| {
                    clients::http_get(
                        Some(SocketAddr::new(CLIENT_V4.parse().unwrap(), p)),
                        vip,
                        "/",
                        T,
                    )
                })
                .unwrap_or_else(|e| panic!("GET {vip} from port {p}: {e}"));
            assert_eq!(r.status, 200);
            r.backend
        })
        .collect()
}

/// The LB node's agent in Kubernetes mode against the fake API server, with the chart's
/// capabilities only (as the DaemonSet runs it) and `env` besides the pod's, once ready.
fn start_lb_node_agent(lab: &Lab, env: &[(&str, &str)]) -> Agent {
    start_lb_node_agent_with(lab, "", env)
}

/// The same, with `node` (lines of the `node:` block) added to the config.
fn start_lb_node_agent_with(lab: &Lab, node: &str, env: &[(&str, &str)]) -> Agent {
    let kubeconfig = lab.dir.path.join("kubeconfig");
    std::fs::write(&kubeconfig, fakeapi::kubeconfig(API.parse().unwrap())).unwrap();
    let node_config = format!(
        "node:\n  interfaces: [{}]\n{node}admin:\n  listen: 127.0.0.1:9300\n",
        lab.interfaces().join(", ")
    );
    let mut all = vec![
        ("NODE_NAME", "lb-node"),
        ("POD_NAMESPACE", "weir-system"),
        ("POD_NAME", "weir-lb-node"),
    ];
    all.extend_from_slice(env);
    let mut agent = Agent::start_with_chart_caps(
        &lab.lb,
        &lab.dir.path,
        Some(&node_config),
        &["--kubernetes", "--kubeconfig", kubeconfig.to_str().unwrap()],
        &all,
    );
    agent.wait_ready(&lab.lb);
    agent
}

/// The fake API server at `API` in `ns`, once it answers.
fn start_apiserver(ns: &Netns) -> Proc {
    start_apiserver_with_state(ns, None)
}

/// The same, keeping its objects in `state` (read back when started again).
fn start_apiserver_with_state(ns: &Netns, state: Option<&Path>) -> Proc {
    let mut cmd = ns.command(server_bin().to_str().unwrap());
    cmd.args(["fake-apiserver", API]);
    if let Some(s) = state {
        cmd.arg(s);
    }
    let p = Proc {
        child: cmd.stdin(Stdio::null()).spawn().unwrap(),
    };
    wait_for(Duration::from_secs(10), "the fake API server", || {
        ns.run_in(|| clients::http_get(None, API.parse().unwrap(), "/api/v1/nodes", T).ok())
    });
    p
}

#[test]
fn a_load_balancer_service_gets_an_address_and_carries_traffic() {
    weir_lab::netns::require_root();
    let mut lab = Lab::new(3);
    lab.start_servers(server_bin());
    let mut apiserver = start_apiserver(&lab.lb);
    let b = seed_web(
        &lab,
        json!({"weir.dev/health-check": "http", "weir.dev/health-check-path": "/healthz"}),
    );

    let agent = start_lb_node_agent(&lab, &[]);

    // The leader writes the first free address (.0 is skipped: avoidBuggyIPs).
    let (ingress, cond) = wait_for(
        Duration::from_secs(20),
        "an address in the Service status",
        || {
            let s = service_status(&lab.lb, "web");
            (!s.0.is_empty()).then_some(s)
        },
    );
    assert_eq!(ingress, ["198.18.100.1"]);
    assert_eq!(cond, Some(("True".into(), "Assigned".into())));
    // The pool's status counts it.
    let pool = wait_for(Duration::from_secs(10), "the IPPool status", || {
        let (_, v) = api(&lab.lb, "GET", "/apis/weir.dev/v1alpha1/ippools/lab", None);
        (v["status"]["assigned"] == 1).then_some(v)
    });
    // 16 addresses, .0 skipped (avoidBuggyIPs), one assigned.
    assert_eq!(pool["status"]["available"], "14", "{pool}");
    assert_eq!(pool["status"]["conditions"][0]["reason"], "Valid");
    // The Lease names this agent.
    let (_, lease) = api(
        &lab.lb,
        "GET",
        "/apis/coordination.k8s.io/v1/namespaces/weir-system/leases/weir-leader",
        None,
    );
    assert_eq!(lease["spec"]["holderIdentity"], "weir-lb-node", "{lease}");

    // Traffic through the VIP reaches all three endpoints (named target port resolved).
    let vip: SocketAddr = "198.18.100.1:80".parse().unwrap();
    wait_for(Duration::from_secs(10), "the VIP to be served", || {
        let b = lab
            .client
            .run_in(|| clients::http_get(None, vip, "/", Duration::from_millis(500)).ok());
        b.map(|_| ())
    });
    assert_eq!(
        backends_of(&lab, vip, 25_000..25_060),
        BTreeSet::from(["b1".into(), "b2".into(), "b3".into()])
    );
    let services = agent.services(&lab.lb);
    let web = &services["services"][0];
    assert_eq!(web["name"], "shop/web");
    assert_eq!(web["health_check"], "http");

    // b3 leaves the EndpointSlice: no new flow reaches it.
    let (_, current) = api(
        &lab.lb,
        "GET",
        "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices/web-1",
        None,
    );
    let mut updated = slice(&b[..2]);
    updated["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
    let (code, v) = api(
        &lab.lb,
        "PUT",
        "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices/web-1",
        Some(updated),
    );
    assert_eq!(code, 200, "{v}");
    wait_for(Duration::from_secs(10), "b3 to leave the service", || {
        let s = agent.services(&lab.lb);
        (s["services"][0]["backends"].as_array().map(Vec::len) == Some(2)).then_some(())
    });
    assert_eq!(
        backends_of(&lab, vip, 26_000..26_060),
        BTreeSet::from(["b1".into(), "b2".into()])
    );

    // A Service asking for an address outside every pool: a False condition and an Event;
    // web is untouched.
    create(
        &lab.lb,
        "/api/v1/namespaces/shop/services",
        service(
            "stray",
            json!({"weir.dev/load-balancer-ips": "198.18.200.1"}),
        ),
    );
    let cond = wait_for(Duration::from_secs(10), "stray's condition", || {
        service_status(&lab.lb, "stray").1
    });
    assert_eq!(cond, ("False".into(), "AddressNotInPool".into()));
    let events = wait_for(Duration::from_secs(10), "an Event for stray", || {
        let found = events_for(&lab.lb, "stray");
        (!found.is_empty()).then_some(found)
    });
    assert_eq!(events[0]["reason"], "AddressNotInPool", "{:?}", events[0]);
    assert_eq!(events[0]["type"], "Warning");
    assert_eq!(service_status(&lab.lb, "web").0, ["198.18.100.1"]);
    // Dual-stack: one address per family, from an IPv6 pool beside the IPv4 one, and IPv6
    // traffic through the IPv6 address to the IPv6 endpoints.
    create(
        &lab.lb,
        "/apis/weir.dev/v1alpha1/ippools",
        json!({"metadata": {"name": "lab6"}, "spec": {"addresses": ["fd00:100::10-fd00:100::1f"]}}),
    );
    let mut dual = service("dual", json!({}));
    dual["spec"]["ipFamilies"] = json!(["IPv4", "IPv6"]);
    dual["spec"]["ipFamilyPolicy"] = json!("RequireDualStack");
    create(&lab.lb, "/api/v1/namespaces/shop/services", dual);
    let mut v6_slice = slice(&lab.backends.iter().map(|b| b.v6).collect::<Vec<_>>());
    v6_slice["metadata"] =
        json!({"name": "dual-6", "labels": {"kubernetes.io/service-name": "dual"}});
    v6_slice["addressType"] = json!("IPv6");
    create(
        &lab.lb,
        "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices",
        v6_slice,
    );
    let mut v4_slice = slice(&b);
    v4_slice["metadata"] =
        json!({"name": "dual-4", "labels": {"kubernetes.io/service-name": "dual"}});
    create(
        &lab.lb,
        "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices",
        v4_slice,
    );
    let (ingress, _) = wait_for(Duration::from_secs(10), "dual's two addresses", || {
        let s = service_status(&lab.lb, "dual");
        (s.0.len() == 2).then_some(s)
    });
    assert!(ingress[0].starts_with("198.18.100."), "{ingress:?}");
    assert_eq!(ingress[1], "fd00:100::10");
    let vip6: SocketAddr = "[fd00:100::10]:80".parse().unwrap();
    wait_for(
        Duration::from_secs(10),
        "the IPv6 address to be served",
        || {
            lab.client
                .run_in(|| clients::http_get(None, vip6, "/", Duration::from_millis(500)).ok())
        },
    );
    let seen: BTreeSet<String> = (0..30)
        .map(|_| {
            let r = lab
                .client
                .run_in(|| clients::http_get(None, vip6, "/", T))
                .unwrap();
            assert_eq!(r.status, 200);
            r.backend
        })
        .collect();
    assert!(
        seen.len() >= 2,
        "IPv6 flows spread over the endpoints: {seen:?}"
    );

    // A bad health-check annotation: the Service is served without a check, the leader says
    // why in an Event, and the metric counts it.
    create(
        &lab.lb,
        "/api/v1/namespaces/shop/services",
        service(
            "badcheck",
            json!({"weir.dev/health-check": "http", "weir.dev/health-check-interval": "often"}),
        ),
    );
    let ev = wait_for(Duration::from_secs(20), "an InvalidService Event", || {
        events_for(&lab.lb, "badcheck")
            .into_iter()
            .find(|e| e["reason"] == "InvalidService")
    });
    assert!(
        ev["note"]
            .as_str()
            .unwrap()
            .contains("weir.dev/health-check-interval"),
        "{ev}"
    );
    wait_for(Duration::from_secs(10), "the problem metric", || {
        agent
            .metrics(&lab.lb)
            .lines()
            .any(|l| l == "weir_kubernetes_service_problems{service=\"shop/badcheck\"} 1")
            .then_some(())
    });
    // A backend failing its check: an Event on the Service from this node.
    lab.kill_server(1);
    let ev = wait_for(Duration::from_secs(20), "a BackendUnhealthy Event", || {
        events_for(&lab.lb, "web")
            .into_iter()
            .find(|e| e["reason"] == "BackendUnhealthy")
    });
    assert!(
        ev["note"]
            .as_str()
            .unwrap()
            .contains("node lb-node: backend 198.18.1.12:8080 failed its http check"),
        "{ev}"
    );
    assert_eq!(ev["type"], "Warning");

    // Beside kube-proxy (kube_proxy_replacement: false) kube-proxy binds the Local-policy
    // Services' healthCheckNodePorts: weir leaves them to it (served as kube-proxy's
    // replacement: `kube_proxy_replacement_serves_every_service_type`).
    let mut local = service("local", json!({}));
    local["spec"]["externalTrafficPolicy"] = json!("Local");
    local["spec"]["healthCheckNodePort"] = json!(30123);
    create(&lab.lb, "/api/v1/namespaces/shop/services", local);
    wait_for(Duration::from_secs(10), "local to be served", || {
        let s = agent.services(&lab.lb);
        s["services"]
            .as_array()?
            .iter()
            .any(|s| s["name"] == "shop/local")
            .then_some(())
    });
    let hc: SocketAddr = "127.0.0.1:30123".parse().unwrap();
    assert!(
        lab.lb
            .run_in(|| std::net::TcpStream::connect_timeout(&hc, T))
            .is_err(),
        "nothing listens on the health-check node port"
    );

    // The API server goes away: the watchers retry with backoff, and the data plane keeps
    // serving the last state (it is level-triggered, nothing is torn down for a lost watch).
    apiserver.kill();
    wait_for(
        Duration::from_secs(20),
        "the watchers to notice the API is gone",
        || {
            agent
                .log_text()
                .contains("Kubernetes API unreachable")
                .then_some(())
        },
    );
    assert_eq!(agent.get(&lab.lb, "/readyz").map(|r| r.0), Some(200));
    assert_eq!(
        backends_of(&lab, vip, 27_000..27_030),
        BTreeSet::from(["b1".into()]),
        "web still serves (b2 failed its check, b3 left the slice)"
    );

    let status = agent.stop();
    assert!(
        status.success(),
        "{status}\n{}",
        std::fs::read_to_string(agent_log(&lab)).unwrap_or_default()
    );
    lab.kill_server(0);
}

/// The Events about Service `name`.
fn events_for(ns: &Netns, name: &str) -> Vec<Value> {
    let (_, v) = api(ns, "GET", "/apis/events.k8s.io/v1/events", None);
    v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["regarding"]["name"] == name)
        .cloned()
        .collect()
}

fn agent_log(lab: &Lab) -> std::path::PathBuf {
    lab.dir.path.join("agent.log")
}

/// Two agents on two nodes against one API server: the first leads and hands out an address;
/// stopped cleanly it gives the Lease up and the second takes over at once; killed (SIGKILL:
/// no goodbye), the other takes the Lease over once it expires; every address stays where it
/// was and new Services are served. Only the agents' own namespaces, one for
/// the API server, and veths between them.
#[test]
fn the_leader_fails_over_without_moving_addresses() {
    weir_lab::netns::require_root();
    let api_ns = Netns::new("api");
    let nodes = [Netns::new("node-a"), Netns::new("node-b")];
    let mut servers = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let (api_if, base) = (format!("to-{i}"), 4 * i as u8);
        weir_lab::netns::veth(&api_ns, &api_if, n, "eth-api");
        api_ns.ip(&format!("addr add 198.18.9.{}/30 dev {api_if}", base + 1));
        n.ip(&format!("addr add 198.18.9.{}/30 dev eth-api", base + 2));
        servers.push(SocketAddr::from(([198, 18, 9, base + 1], 6443)));
    }
    let _apiserver = Proc {
        child: api_ns
            .command(server_bin().to_str().unwrap())
            .args(["fake-apiserver", "0.0.0.0:6443"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    };
    let a = &nodes[0];
    wait_for(Duration::from_secs(10), "the fake API server", || {
        a.run_in(|| clients::http_get(None, servers[0], "/api/v1/nodes", T).ok())
    });
    let call =
        |method: &str, path: &str, body: Option<Value>| api_at(a, servers[0], method, path, body);
    for node in ["node-a", "node-b"] {
        let (code, v) = call(
            "POST",
            "/api/v1/nodes",
            Some(json!({"metadata": {"name": node}})),
        );
        assert_eq!(code, 201, "{v}");
    }
    let (code, v) = call(
        "POST",
        "/apis/weir.dev/v1alpha1/ippools",
        Some(json!({"metadata": {"name": "pool"}, "spec": {"addresses": ["198.18.100.16/28"]}})),
    );
    assert_eq!(code, 201, "{v}");
    let (code, v) = call(
        "POST",
        "/api/v1/namespaces/shop/services",
        Some(service("web", json!({}))),
    );
    assert_eq!(code, 201, "{v}");
    let status_of = |name: &str| {
        let (_, v) = call(
            "GET",
            &format!("/api/v1/namespaces/shop/services/{name}"),
            None,
        );
        v["status"]["loadBalancer"]["ingress"][0]["ip"]
            .as_str()
            .map(str::to_string)
    };
    let lease = || {
        call(
            "GET",
            "/apis/coordination.k8s.io/v1/namespaces/weir-system/leases/weir-leader",
            None,
        )
        .1
    };
    let holder = || {
        lease()["spec"]["holderIdentity"]
            .as_str()
            .map(str::to_string)
    };
    let time = |v: &Value| -> k8s_openapi::jiff::Timestamp {
        v.as_str().expect("a Lease time").parse().expect("RFC 3339")
    };

    let dirs = [Scratch::new(), Scratch::new()];
    let start = |i: usize| {
        let n = &nodes[i];
        let kubeconfig = dirs[i].path.join("kubeconfig");
        std::fs::write(&kubeconfig, fakeapi::kubeconfig(servers[i])).unwrap();
        let name = format!("node-{}", ["a", "b"][i]);
        let mut agent = Agent::start_with_chart_caps(
            n,
            &dirs[i].path,
            Some("node:\n  interfaces: [eth-api]\nadmin:\n  listen: 127.0.0.1:9300\n"),
            &["--kubernetes", "--kubeconfig", kubeconfig.to_str().unwrap()],
            &[
                ("NODE_NAME", &name),
                ("POD_NAMESPACE", "weir-system"),
                ("POD_NAME", &format!("agent-{name}")),
            ],
        );
        agent.wait_ready(n);
        agent
    };
    let agent_a = start(0);
    let web = wait_for(Duration::from_secs(20), "web's address", || {
        status_of("web")
    });
    assert_eq!(web, "198.18.100.16");
    assert_eq!(holder().as_deref(), Some("agent-node-a"));
    let agent_b = start(1);
    assert_eq!(
        holder().as_deref(),
        Some("agent-node-a"),
        "b follows while a renews"
    );

    // A clean stop gives the Lease up (no holder, no renew time): b takes over at its next
    // look instead of waiting for it to expire.
    let stopped = std::time::Instant::now();
    assert!(agent_a.stop().success());
    let released = lease();
    assert!(
        released["spec"]["holderIdentity"].is_null() || holder().as_deref() == Some("agent-node-b"),
        "a clean stop releases the Lease: {released}"
    );
    wait_for(
        Duration::from_secs(40),
        "node-b to take the released Lease",
        || (holder().as_deref() == Some("agent-node-b")).then_some(()),
    );
    let took = stopped.elapsed();
    eprintln!(
        "leader failover after SIGTERM (Lease released): {} ms",
        took.as_millis()
    );
    let (code, v) = call(
        "POST",
        "/api/v1/namespaces/shop/services",
        Some(service("second", json!({}))),
    );
    assert_eq!(code, 201, "{v}");
    let second = wait_for(Duration::from_secs(20), "second's address", || {
        status_of("second")
    });
    assert_eq!(second, "198.18.100.17");

    // a comes back as a follower; b is killed without a goodbye: a takes the Lease once it
    // expires, and every address stays where it was.
    let agent_a = start(0);
    let last_renew_seen = time(&lease()["spec"]["renewTime"]);
    agent_b.signal(libc::SIGKILL);
    let killed = std::time::Instant::now();
    wait_for(
        Duration::from_secs(40),
        "node-a to take the Lease over",
        || (holder().as_deref() == Some("agent-node-a")).then_some(()),
    );
    let took = killed.elapsed();
    eprintln!(
        "leader failover after SIGKILL (Lease expired): {} ms",
        took.as_millis()
    );
    // The Lease's own times: a took it no sooner than the 15 s Lease after b's last renewal
    // (b may have renewed after we looked, which only makes the gap larger; the rule compares
    // whole seconds).
    let taken = lease();
    let acquired = time(&taken["spec"]["acquireTime"]);
    let gap = acquired.duration_since(last_renew_seen);
    assert!(
        gap >= k8s_openapi::jiff::SignedDuration::from_secs(14),
        "the Lease was taken {gap:?} after the last renewal seen: {taken}"
    );
    // a → b (released), b → a (expired).
    assert_eq!(taken["spec"]["leaseTransitions"], 2, "{taken}");
    let (code, v) = call(
        "POST",
        "/api/v1/namespaces/shop/services",
        Some(service("third", json!({}))),
    );
    assert_eq!(code, 201, "{v}");
    let third = wait_for(Duration::from_secs(20), "third's address", || {
        status_of("third")
    });
    assert_eq!(third, "198.18.100.18");
    assert_eq!(status_of("web").as_deref(), Some("198.18.100.16"));
    assert_eq!(status_of("second").as_deref(), Some("198.18.100.17"));
    assert!(agent_a.stop().success());
}

/// `weir-lab serve` as backend `name` in `ns`, HTTP on each of `ips`.
fn serve(ns: &Netns, name: &str, ips: &[&str]) -> Proc {
    let ips: Vec<IpAddr> = ips.iter().map(|a| a.parse().unwrap()).collect();
    serve_http(ns, server_bin(), name, &ips)
}

/// Two nodes, each with its agent; a client in front of node-a; a pod (backend) behind each
/// node's pod bridge; both address families:
///
/// ```text
/// client 198.18.0.1 ── node-a ─────────────── node-b
///        fd00:18::1     │ 198.18.8.1/30   198.18.8.2/30 │
///                       │ fd00:8::1/64    fd00:8::2/64  │
///                    br-pods                         br-pods
///                       b1 198.18.1.11              b2 198.18.2.12
///                          fd00:1::11                  fd00:2::12
/// ```
/// node-a routes node-b's pod networks through node-b, as a CNI would; node-b has no route to
/// the client at all, so a reply of b2 can only come back through node-a if node-a
/// source-NATed the flow to its own address. weir runs on the nodes' links (`eth-c`, `eth-n`)
/// only: the pods' interfaces are the CNI's, at the kernel's default offloads, so b1's
/// replies reach node-a's TC program as GSO super-packets with their payload in page
/// fragments. `externalTrafficPolicy: Cluster` spreads flows over both pods: b1 sees the
/// client's own address, b2 sees node-a's address of the flow's family and a port of the
/// source-NAT range; 1 MB downloads and uploads through both are byte-checked; `Local`
/// keeps flows on b1.
#[test]
fn cluster_policy_reaches_the_other_nodes_endpoints_through_source_nat() {
    weir_lab::netns::require_root();
    let client = Netns::new("client");
    let (node_a, node_b) = (Netns::new("node-a"), Netns::new("node-b"));
    let (b1, b2) = (Netns::new("b1"), Netns::new("b2"));
    weir_lab::netns::veth(&client, "eth0", &node_a, "eth-c");
    weir_lab::netns::veth(&node_a, "veth-b1", &b1, "eth0");
    weir_lab::netns::veth(&node_a, "eth-n", &node_b, "eth-n");
    weir_lab::netns::veth(&node_b, "veth-b2", &b2, "eth0");
    client.ip("addr add 198.18.0.1/24 dev eth0");
    client.ip("route add 198.18.100.0/24 via 198.18.0.254");
    client.ip("addr add fd00:18::1/64 dev eth0 nodad");
    client.ip("-6 route add fd00:100::/64 via fd00:18::fe");
    // Lab-only veth settings (see `weir_lab::lab`), on the links that stand in for wires
    // between NICs (client ── node-a, node-a ── node-b), whose receiving ends run weir's XDP:
    // complete checksums from their senders (a frame on a wire has one; a veth would hand
    // over a local stack's partial one, which XDP cannot fix up), GRO on their receivers (a
    // NIC driver's NAPI context, which receiving XDP redirects needs). The pods keep the
    // kernel's defaults.
    for (ns, iface) in [(&client, "eth0"), (&node_a, "eth-n"), (&node_b, "eth-n")] {
        ns.exec(&["ethtool", "-K", iface, "tx", "off"]);
        ns.exec(&["ethtool", "-K", iface, "gro", "on"]);
    }
    for (ns, pod, gw, pod6, gw6) in [
        (&b1, "198.18.1.11", "198.18.1.1", "fd00:1::11", "fd00:1::1"),
        (&b2, "198.18.2.12", "198.18.2.1", "fd00:2::12", "fd00:2::1"),
    ] {
        ns.ip(&format!("addr add {pod}/24 dev eth0"));
        ns.ip(&format!("route add default via {gw}"));
        ns.ip(&format!("addr add {pod6}/64 dev eth0 nodad"));
        ns.ip(&format!("-6 route add default via {gw6}"));
    }
    // Each node's pods behind a bridge, as a CNI bridge plugin sets them up.
    for (n, port, gw, gw6) in [
        (&node_a, "veth-b1", "198.18.1.1/24", "fd00:1::1/64"),
        (&node_b, "veth-b2", "198.18.2.1/24", "fd00:2::1/64"),
    ] {
        n.ip("link add br-pods type bridge");
        n.ip("link set br-pods up");
        n.ip(&format!("link set {port} master br-pods"));
        n.ip(&format!("addr add {gw} dev br-pods"));
        n.ip(&format!("addr add {gw6} dev br-pods nodad"));
    }
    node_a.ip("addr add 198.18.0.254/24 dev eth-c");
    node_a.ip("addr add 198.18.8.1/30 dev eth-n");
    node_a.ip("route add 198.18.2.0/24 via 198.18.8.2");
    node_b.ip("addr add 198.18.8.2/30 dev eth-n");
    node_a.ip("addr add fd00:18::fe/64 dev eth-c nodad");
    node_a.ip("addr add fd00:8::1/64 dev eth-n nodad");
    node_a.ip("-6 route add fd00:2::/64 via fd00:8::2");
    node_b.ip("addr add fd00:8::2/64 dev eth-n nodad");
    for n in [&node_a, &node_b] {
        n.sysctl("net.ipv4.ip_forward", "1");
        n.sysctl("net.ipv6.conf.all.forwarding", "1");
        n.sysctl("net.ipv4.conf.all.rp_filter", "0");
    }
    let _servers = [
        serve(&b1, "b1", &["198.18.1.11", "fd00:1::11"]),
        serve(&b2, "b2", &["198.18.2.12", "fd00:2::12"]),
    ];

    // The API server on node-a: node-a's agent over loopback, node-b's over the node link
    // (through node-a's XDP, to node-a's own address: the node's traffic must pass).
    let api_a: SocketAddr = "127.0.0.1:6443".parse().unwrap();
    let api_b: SocketAddr = "198.18.8.1:6443".parse().unwrap();
    let _apiserver = Proc {
        child: node_a
            .command(server_bin().to_str().unwrap())
            .args(["fake-apiserver", "0.0.0.0:6443"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    };
    wait_for(Duration::from_secs(10), "the fake API server", || {
        node_a.run_in(|| clients::http_get(None, api_a, "/api/v1/nodes", T).ok())
    });
    let call = |method: &str, path: &str, body: Option<Value>| {
        let (code, v) = api_at(&node_a, api_a, method, path, body);
        assert!((200..300).contains(&code), "{method} {path}: {code} {v}");
        v
    };
    for (node, ip, ip6) in [
        ("node-a", "198.18.8.1", "fd00:8::1"),
        ("node-b", "198.18.8.2", "fd00:8::2"),
    ] {
        call(
            "POST",
            "/api/v1/nodes",
            Some(json!({"metadata": {"name": node},
                "status": {"addresses": [{"type": "InternalIP", "address": ip},
                                         {"type": "InternalIP", "address": ip6}]}})),
        );
    }
    call(
        "POST",
        "/apis/weir.dev/v1alpha1/ippools",
        Some(
            json!({"metadata": {"name": "pool"}, "spec": {"addresses": ["198.18.100.0/28"], "avoidBuggyIPs": true}}),
        ),
    );
    call(
        "POST",
        "/apis/weir.dev/v1alpha1/ippools",
        Some(
            json!({"metadata": {"name": "pool6"}, "spec": {"addresses": ["fd00:100::10-fd00:100::1f"]}}),
        ),
    );
    let mut web_slice = slice(&[]);
    web_slice["endpoints"] = json!([
        {"addresses": ["198.18.1.11"], "nodeName": "node-a", "conditions": {"ready": true}},
        {"addresses": ["198.18.2.12"], "nodeName": "node-b", "conditions": {"ready": true}},
    ]);
    let mut web_slice6 = web_slice.clone();
    web_slice6["metadata"]["name"] = json!("web-6");
    web_slice6["addressType"] = json!("IPv6");
    web_slice6["endpoints"] = json!([
        {"addresses": ["fd00:1::11"], "nodeName": "node-a", "conditions": {"ready": true}},
        {"addresses": ["fd00:2::12"], "nodeName": "node-b", "conditions": {"ready": true}},
    ]);
    for s in [web_slice, web_slice6] {
        call(
            "POST",
            "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices",
            Some(s),
        );
    }
    let mut web = service("web", json!({}));
    web["spec"]["ipFamilies"] = json!(["IPv4", "IPv6"]);
    web["spec"]["ipFamilyPolicy"] = json!("RequireDualStack");
    call("POST", "/api/v1/namespaces/shop/services", Some(web));

    let dirs = [Scratch::new(), Scratch::new()];
    let start = |i: usize, n: &Netns, api: SocketAddr, interfaces: &str| {
        let kubeconfig = dirs[i].path.join("kubeconfig");
        std::fs::write(&kubeconfig, fakeapi::kubeconfig(api)).unwrap();
        let name = ["node-a", "node-b"][i];
        let mut agent = Agent::start_with_chart_caps(
            n,
            &dirs[i].path,
            Some(&format!(
                "node:\n  interfaces: [{interfaces}]\nadmin:\n  listen: 127.0.0.1:9300\n"
            )),
            &["--kubernetes", "--kubeconfig", kubeconfig.to_str().unwrap()],
            &[
                ("NODE_NAME", name),
                ("POD_NAMESPACE", "weir-system"),
                ("POD_NAME", &format!("agent-{name}")),
            ],
        );
        agent.wait_ready(n);
        agent
    };
    let agent_a = start(0, &node_a, api_a, "eth-c, eth-n");
    let agent_b = start(1, &node_b, api_b, "eth-n");
    let vip: SocketAddr = "198.18.100.1:80".parse().unwrap();
    let vip6: SocketAddr = "[fd00:100::10]:80".parse().unwrap();
    wait_for(Duration::from_secs(20), "web's addresses", || {
        let v = call("GET", "/api/v1/namespaces/shop/services/web", None);
        let ingress = &v["status"]["loadBalancer"]["ingress"];
        (ingress[0]["ip"] == "198.18.100.1" && ingress[1]["ip"] == "fd00:100::10").then_some(())
    });
    // Each agent programs both pods of both families: its own directly, the other node's
    // source-NATed.
    for (agent, n) in [(&agent_a, &node_a), (&agent_b, &node_b)] {
        wait_for(Duration::from_secs(10), "web on both nodes", || {
            let s = agent.services(n);
            let two = |i: usize| s["services"][i]["backends"].as_array().map(Vec::len) == Some(2);
            (two(0) && two(1)).then_some(())
        });
    }

    let backends = &agent_a.services(&node_a)["services"][0]["backends"];
    let nat_of = |ip: &str| {
        backends
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["address"] == ip)
            .map(|b| b["source_nat"].clone())
    };
    assert_eq!(nat_of("198.18.1.11"), Some(json!(false)), "{backends}");
    assert_eq!(nat_of("198.18.2.12"), Some(json!(true)), "{backends}");

    // Clients reach both pods through node-a; b2 sees node-a's address and a source-NAT port.
    let whoami_at = |from: SocketAddr, vip: SocketAddr| {
        let r = client
            .run_in(|| clients::http_get(Some(from), vip, "/whoami", T))
            .unwrap_or_else(|e| panic!("GET {vip} from {from}: {e}"));
        assert_eq!(r.status, 200);
        let body = String::from_utf8_lossy(&r.body).to_string();
        let peer: SocketAddr = body
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("peer="))
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no peer in {body:?}"));
        (r.backend, peer)
    };
    // Fixed client ports sit below the kernel's ephemeral range (32768-60999): the echo
    // connections held open further down take ephemeral ports, and one of them must never be a
    // port a later GET binds.
    let whoami = |port: u16| whoami_at(SocketAddr::new("198.18.0.1".parse().unwrap(), port), vip);
    let mut seen = BTreeSet::new();
    let mut natted = None;
    for port in 27_000..27_040 {
        let (backend, peer) = whoami(port);
        match backend.as_str() {
            "b1" => assert_eq!(peer, SocketAddr::new("198.18.0.1".parse().unwrap(), port)),
            "b2" => {
                assert_eq!(peer.ip().to_string(), "198.18.8.1", "node-a's address");
                assert!((61_000..=65_535).contains(&peer.port()), "{peer}");
                natted = Some((port, peer.port()));
            }
            other => panic!("unexpected backend {other}"),
        }
        seen.insert(backend);
    }
    assert_eq!(seen, BTreeSet::from(["b1".into(), "b2".into()]));
    // IPv6: the same, with node-a's IPv6 address.
    let mut seen6 = BTreeSet::new();
    for port in 27_500..27_540 {
        let from = SocketAddr::new("fd00:18::1".parse().unwrap(), port);
        let (backend, peer) = whoami_at(from, vip6);
        match backend.as_str() {
            "b1" => assert_eq!(peer, from),
            "b2" => {
                assert_eq!(peer.ip().to_string(), "fd00:8::1", "node-a's IPv6 address");
                assert!((61_000..=65_535).contains(&peer.port()), "{peer}");
            }
            other => panic!("unexpected backend {other}"),
        }
        seen6.insert(backend);
    }
    assert_eq!(seen6, BTreeSet::from(["b1".into(), "b2".into()]));
    // The admin API's lookup reads the same port out of the kernel's tables.
    let (client_port, nat_port) = natted.expect("a flow to b2");
    let (code, body) = agent_a
        .get(
            &node_a,
            &format!("/api/v1/lookup?client=198.18.0.1:{client_port}&vip={vip}&protocol=tcp"),
        )
        .expect("lookup");
    assert_eq!(code, 200, "{body}");
    let lookup: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(lookup["backend"], "198.18.2.12:8080", "{lookup}");
    assert_eq!(lookup["via"], "connection", "{lookup}");
    assert_eq!(lookup["source_nat_port"], nat_port, "{lookup}");
    // The counters as the agent samples them (once a second).
    let value = |series: &str| weir_lab::agent::sample(&agent_a.metrics(&node_a), series);
    wait_for(
        Duration::from_secs(5),
        "replies translated back at node-a",
        || value("weir_dataplane_packets_total{path=\"snat_reply\"}").filter(|v| *v > 0.0),
    );
    assert_eq!(
        value(
            "weir_service_drops_total{service=\"shop/web\",vip=\"198.18.100.1\",port=\"80\",protocol=\"tcp\",reason=\"snat_failed\"}"
        ),
        Some(0.0)
    );

    // Real sizes through both pods: the local one's replies reverse-NATed at node-a's TC
    // egress, the other node's source-NATed and translated back in node-a's XDP.
    for v in [vip, vip6] {
        let mut downloads = BTreeSet::new();
        let mut uploads = BTreeSet::new();
        for _ in 0..24 {
            if downloads.len() == 2 && uploads.len() == 2 {
                break;
            }
            downloads.insert(weir_lab::transfers::download(
                &client,
                v,
                weir_lab::transfers::MB,
            ));
            uploads.insert(weir_lab::transfers::upload(
                &client,
                v,
                weir_lab::transfers::MB,
            ));
        }
        let both = BTreeSet::from(["b1".to_string(), "b2".to_string()]);
        assert_eq!(
            downloads, both,
            "1 MB downloads through {v} reached both pods"
        );
        assert_eq!(uploads, both, "1 MB uploads through {v} reached both pods");
    }
    weir_lab::transfers::assert_all_translated(&agent_a, &node_a, 100.0);
    let untranslated = weir_lab::transfers::untranslated(&agent_b.metrics(&node_b));
    assert!(
        untranslated.iter().all(|(_, v)| *v == 0.0),
        "node-b: {untranslated:?}"
    );

    // The other node's pod leaves the EndpointSlice: no new flow reaches it; back, it does.
    let on_node_a = |n: usize| {
        wait_for(Duration::from_secs(10), "node-a's backends", || {
            let s = agent_a.services(&node_a);
            (s["services"][0]["backends"].as_array().map(Vec::len) == Some(n)).then_some(())
        });
    };
    let put_slice = |endpoints: Value| {
        let path = "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices/web-1";
        let mut current = call("GET", path, None);
        current["endpoints"] = endpoints;
        call("PUT", path, Some(current));
    };
    put_slice(json!([
        {"addresses": ["198.18.1.11"], "nodeName": "node-a", "conditions": {"ready": true}},
    ]));
    on_node_a(1);
    let only: BTreeSet<String> = (27_100..27_120).map(|p| whoami(p).0).collect();
    assert_eq!(only, BTreeSet::from(["b1".into()]));
    put_slice(json!([
        {"addresses": ["198.18.1.11"], "nodeName": "node-a", "conditions": {"ready": true}},
        {"addresses": ["198.18.2.12"], "nodeName": "node-b", "conditions": {"ready": true}},
    ]));
    on_node_a(2);
    let both: BTreeSet<String> = (27_200..27_240).map(|p| whoami(p).0).collect();
    assert_eq!(both, BTreeSet::from(["b1".into(), "b2".into()]));

    // Source-NATed connections survive node-a's agent restarting (SIGKILL, back after 3 s):
    // the pinned connection and source-NAT tables carry them on, and the next agent adopts
    // them.
    let mut echoes: Vec<Echo> = client.run_in(|| {
        (0..30)
            .map(|_| Echo::open(vip, T).expect("an echo connection"))
            .collect()
    });
    assert!(
        echoes.iter().any(|e| e.backend == "b2"),
        "a source-NATed connection"
    );
    let round = |echoes: &mut Vec<Echo>, tag: &str| {
        client.run_in(|| {
            for (i, e) in echoes.iter_mut().enumerate() {
                e.round_trip(&format!("{tag}-{i}")).unwrap_or_else(|err| {
                    panic!("{tag}: connection {i} to {} broke: {err}", e.backend)
                });
            }
        });
    };
    round(&mut echoes, "before");
    assert!(!agent_a.kill().success());
    for i in 0..6 {
        round(&mut echoes, &format!("away-{i}"));
        std::thread::sleep(Duration::from_millis(500));
    }
    let agent_a = start(0, &node_a, api_a, "eth-c, eth-n");
    assert!(agent_a.log_text().contains("adopted the pinned data plane"));
    round(&mut echoes, "back");
    let again: BTreeSet<String> = (27_250..27_290).map(|p| whoami(p).0).collect();
    assert_eq!(again, BTreeSet::from(["b1".into(), "b2".into()]));
    drop(echoes);

    // Local policy: node-a keeps its own pod only.
    let mut web = call("GET", "/api/v1/namespaces/shop/services/web", None);
    web["spec"]["externalTrafficPolicy"] = json!("Local");
    call("PUT", "/api/v1/namespaces/shop/services/web", Some(web));
    wait_for(Duration::from_secs(10), "node-a's own backend only", || {
        let s = agent_a.services(&node_a);
        (s["services"][0]["backends"].as_array().map(Vec::len) == Some(1)).then_some(())
    });
    let only: BTreeSet<String> = (27_300..27_320).map(|p| whoami(p).0).collect();
    assert_eq!(only, BTreeSet::from(["b1".into()]));
    assert!(agent_b.stop().success());
    assert!(agent_a.stop().success());
}

/// Against a real cluster, read-only: the agent's client lists Services, EndpointSlices and
/// Nodes and translates them. Run it with `KUBECONFIG=... cargo test -p weir-lab --test
/// kubernetes -- --ignored a_real_cluster`.
#[test]
#[ignore = "needs a real cluster (no API server can run on the CI machines): set KUBECONFIG and pass --ignored"]
fn a_real_cluster_when_kubeconfig_is_set() {
    let path = std::env::var_os("KUBECONFIG")
        .expect("KUBECONFIG names the cluster this test reads (it was run with --ignored)");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use k8s_openapi::api::{
            core::v1::{Node, Service},
            discovery::v1::EndpointSlice,
        };
        use kube::{Api, api::ListParams};
        let client = lb_agent::sources::kubernetes::runtime::client(Some(Path::new(&path)))
            .await
            .expect("client from KUBECONFIG");
        let services = Api::<Service>::all(client.clone()).list(&ListParams::default()).await.expect("list Services");
        let slices = Api::<EndpointSlice>::all(client.clone()).list(&ListParams::default()).await.expect("list EndpointSlices");
        let nodes = Api::<Node>::all(client).list(&ListParams::default()).await.expect("list Nodes");
        let node = nodes.items.first().and_then(|n| n.metadata.name.clone()).unwrap_or_default();
        let t = lb_agent::sources::kubernetes::translate::translate(
            &services.items,
            &slices.items,
            &nodes.items,
            &lb_agent::sources::kubernetes::translate::Options { node: node.clone(), default_class: true, table_size: 16381, max_services: 4096, max_backends: 65536, source_nat: Default::default(), all_types: true, internal: true, nodeport_addresses: Vec::new(), local_addresses: Vec::new() },
        );
        eprintln!(
            "real cluster: {} Services, {} EndpointSlices, {} Nodes; on {node}: {} frontends, problems {:?}",
            services.items.len(), slices.items.len(), nodes.items.len(), t.desired.services.len(), t.problems
        );
        assert!(!nodes.items.is_empty(), "a cluster has nodes");
    });
}

/// A kubeconfig that cannot be read is refused before the data plane is touched.
#[test]
fn a_bad_kubeconfig_is_refused_and_changes_nothing() {
    weir_lab::netns::require_root();
    let (a, b) = (Netns::new("kc-a"), Netns::new("kc-b"));
    weir_lab::netns::veth(&a, "eth-x", &b, "eth-y");
    let dir = Scratch::new();
    let config = dir.path.join("weir.yaml");
    std::fs::write(
        &config,
        "node:\n  interfaces: [eth-x]\nadmin:\n  listen: 127.0.0.1:9300\n",
    )
    .unwrap();
    let missing = dir.path.join("no-such-kubeconfig");
    let out = a
        .agent_command(weir_lab::agent::agent_binary().to_str().unwrap())
        .args([
            "run",
            "--kubernetes",
            "--kubeconfig",
            missing.to_str().unwrap(),
        ])
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("reading kubeconfig") && err.contains("no-such-kubeconfig"),
        "{err}"
    );
    let link = a.ip("link show eth-x");
    assert!(!link.contains("xdp"), "nothing attached: {link}");
    assert!(!err.contains("attached"), "{err}");
}

/// A source-NAT port range inside the node's ephemeral ports is refused before anything is
/// attached: the node's own connections could take its ports. Reserving the range fixes it.
#[test]
fn a_source_nat_range_inside_the_ephemeral_ports_is_refused() {
    weir_lab::netns::require_root();
    let (a, b) = (Netns::new("sn-a"), Netns::new("sn-b"));
    weir_lab::netns::veth(&a, "eth-x", &b, "eth-y");
    a.sysctl("net.ipv4.ip_local_port_range", "1024 65535");
    let dir = Scratch::new();
    let config = dir.path.join("weir.yaml");
    std::fs::write(
        &config,
        "node:\n  interfaces: [eth-x]\n  source_nat: {ports: 62000-62999}\nadmin:\n  listen: 127.0.0.1:9300\n",
    )
    .unwrap();
    let kubeconfig = dir.path.join("kubeconfig");
    std::fs::write(&kubeconfig, fakeapi::kubeconfig(API.parse().unwrap())).unwrap();
    let run = || {
        a.agent_command(weir_lab::agent::agent_binary().to_str().unwrap())
            .args(["run", "--kubernetes", "--kubeconfig"])
            .arg(&kubeconfig)
            .arg("--config")
            .arg(&config)
            .env("NODE_NAME", "sn-a")
            .output()
            .unwrap()
    };
    let out = run();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("node.source_nat.ports 62000-62999 overlaps the node's ephemeral ports")
            && err.contains("net.ipv4.ip_local_port_range 1024-65535"),
        "{err}"
    );
    let link = a.ip("link show eth-x");
    assert!(!link.contains("xdp"), "nothing attached: {link}");
    // Reserved, the range passes: the agent goes on to start (and waits for the API server,
    // which is not what this test is about, so it is stopped once it says it is starting).
    a.sysctl("net.ipv4.ip_local_reserved_ports", "62000-62999");
    let log = dir.path.join("agent.log");
    let mut child = Proc {
        child: a
            .agent_command(weir_lab::agent::agent_binary().to_str().unwrap())
            .args(["run", "--kubernetes", "--kubeconfig"])
            .arg(&kubeconfig)
            .arg("--config")
            .arg(&config)
            .env("NODE_NAME", "sn-a")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    };
    wait_for(Duration::from_secs(20), "the agent to start", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(!text.contains("overlaps"), "{text}");
        text.contains("starting").then_some(())
    });
    child.kill();
}

/// A restart of the pod keeps the node's data plane (the next agent adopts it); an uninstall —
/// the agent's DaemonSet gone when it gets SIGTERM — takes it away: nothing attached, nothing
/// pinned.
#[test]
fn an_uninstall_removes_the_data_plane_and_a_restart_keeps_it() {
    weir_lab::netns::require_root();
    let mut lab = Lab::new(1);
    lab.start_servers(server_bin());
    let _apiserver = start_apiserver(&lab.lb);
    create(
        &lab.lb,
        "/api/v1/nodes",
        json!({"metadata": {"name": "lb-node"}}),
    );
    let daemonsets = "/apis/apps/v1/namespaces/weir-system/daemonsets";
    create(&lab.lb, daemonsets, json!({"metadata": {"name": "weir"}}));
    let start = || start_lb_node_agent(&lab, &[("DAEMONSET_NAME", "weir")]);
    let attached = |lab: &Lab| {
        lab.interfaces()
            .iter()
            .all(|i| lab.lb.ip(&format!("-d link show dev {i}")).contains("xdp"))
    };
    let pinned = lab.lb.bpffs().join("weir");

    // A restart (the DaemonSet is there): the data plane stays, the next agent adopts it.
    let agent = start();
    assert!(agent.stop().success());
    assert!(attached(&lab) && pinned.exists(), "kept through a restart");
    let agent = start();
    assert!(agent.log_text().contains("adopted the pinned data plane"));

    // An uninstall: the DaemonSet goes first, then the pod.
    let (code, v) = api(&lab.lb, "DELETE", &format!("{daemonsets}/weir"), None);
    assert_eq!(code, 200, "{v}");
    let log = agent.log.clone();
    assert!(agent.stop().success());
    let text = std::fs::read_to_string(log).unwrap();
    assert!(text.contains("weir is being uninstalled"), "{text}");
    assert!(!attached(&lab), "detached at the uninstall");
    assert!(!pinned.exists(), "unpinned at the uninstall");
    lab.kill_server(0);
}

/// kube-proxy's replacement (`node.kube_proxy_replacement: true`), one node: the socket hooks
/// on a test cgroup stand in for the node's root cgroup, so the node's processes and its "pods"
/// (processes in the backends' namespaces) in that cgroup are the in-cluster clients.
/// - a ClusterIP from the node and from a pod: every endpoint, the ClusterIP as the peer;
///   internalTrafficPolicy Local: this node's endpoints only;
/// - NodePorts on the Node's InternalIP from an outside client: Cluster policy every endpoint,
///   Local policy this node's only, with the client's address preserved;
/// - a LoadBalancer address from inside: every endpoint (kube-proxy's short-circuit);
/// - the healthCheckNodePort and kube-proxy's `:10256/healthz`, `/livez`;
/// - traffic that is no service's (a node port nobody serves, an address that is no service's)
///   untouched.
#[test]
fn kube_proxy_replacement_serves_every_service_type() {
    weir_lab::netns::require_root();
    let mut lab = Lab::new(3);
    lab.start_servers(server_bin());
    let mut apiserver = start_apiserver(&lab.lb);
    let cg = TestCgroup::new();
    create(
        &lab.lb,
        "/api/v1/nodes",
        json!({"metadata": {"name": "lb-node", "labels": {"topology.kubernetes.io/zone": "zone-a"}},
               "status": {"addresses": [{"type": "InternalIP", "address": LB_V4}]}}),
    );
    create(
        &lab.lb,
        "/apis/weir.dev/v1alpha1/ippools",
        json!({"metadata": {"name": "lab"}, "spec": {"addresses": ["198.18.100.0/28"]}}),
    );
    let b: Vec<IpAddr> = lab.backends.iter().map(|b| b.v4).collect();
    // zoned: a ClusterIP with topology hints; this node is in zone-a, b2 is hinted for zone-b.
    let mut zoned_slice = slice(&b);
    zoned_slice["metadata"] =
        json!({"name": "zoned-1", "labels": {"kubernetes.io/service-name": "zoned"}});
    for (i, zone) in ["zone-a", "zone-b", "zone-a"].iter().enumerate() {
        zoned_slice["endpoints"][i]["hints"] = json!({"forZones": [{"name": zone}]});
        zoned_slice["endpoints"][i]["zone"] = json!(zone);
    }
    create(
        &lab.lb,
        "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices",
        zoned_slice,
    );
    create(
        &lab.lb,
        "/api/v1/namespaces/shop/services",
        json!({"metadata": {"name": "zoned"}, "spec": {
            "type": "ClusterIP", "clusterIP": "198.18.200.3", "clusterIPs": ["198.18.200.3"],
            "ipFamilies": ["IPv4"], "trafficDistribution": "PreferClose",
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"}],
        }}),
    );
    // web: NodePort, Cluster policy, every endpoint on this node.
    create(
        &lab.lb,
        "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices",
        slice(&b),
    );
    create(
        &lab.lb,
        "/api/v1/namespaces/shop/services",
        json!({"metadata": {"name": "web"}, "spec": {
            "type": "NodePort", "clusterIP": "198.18.200.1", "clusterIPs": ["198.18.200.1"],
            "ipFamilies": ["IPv4"],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http", "nodePort": 30080}],
        }}),
    );
    // local: a LoadBalancer with both policies Local; b3 is another node's endpoint.
    let mut local_slice = slice(&b);
    local_slice["metadata"] =
        json!({"name": "local-1", "labels": {"kubernetes.io/service-name": "local"}});
    local_slice["endpoints"][2]["nodeName"] = json!("other-node");
    create(
        &lab.lb,
        "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices",
        local_slice,
    );
    create(
        &lab.lb,
        "/api/v1/namespaces/shop/services",
        json!({"metadata": {"name": "local"}, "spec": {
            "type": "LoadBalancer", "loadBalancerClass": "weir.dev/lb",
            "clusterIP": "198.18.200.2", "clusterIPs": ["198.18.200.2"], "ipFamilies": ["IPv4"],
            "externalTrafficPolicy": "Local", "internalTrafficPolicy": "Local",
            "healthCheckNodePort": 30123,
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http", "nodePort": 30081}],
        }}),
    );
    // The node's own server on its address (sshd, a node exporter): no service's.
    let _node_server = serve_http(&lab.lb, server_bin(), "node", &[LB_V4.parse().unwrap()]);

    let node = format!(
        "  kube_proxy_replacement: true\n  socket_lb: {{cgroup: {}}}\n",
        cg.path().display()
    );
    let agent = start_lb_node_agent_with(&lab, &node, &[]);
    let (ingress, _) = wait_for(Duration::from_secs(20), "an address for local", || {
        let s = service_status(&lab.lb, "local");
        (!s.0.is_empty()).then_some(s)
    });
    let lb_addr = format!("{}:80", ingress[0]);
    wait_for(Duration::from_secs(10), "every frontend programmed", || {
        let s = agent.services(&lab.lb);
        let all = s["services"].as_array()?;
        (all.len() >= 7 && all.iter().any(|f| f["name"] == "shop/zoned")).then_some(())
    });
    let sock = |ns: &Netns, mode: &str, to: &str, n: usize| {
        sockclient::exchanges(&cg, ns, server_bin(), mode, to, n)
    };

    // The ClusterIP from the node and from a pod (b1's namespace): every endpoint, and the
    // socket sees the ClusterIP.
    for ns in [&lab.lb, &lab.backends[0].ns] {
        let x = sock(ns, "tcp", "198.18.200.1:80", 30);
        assert!(x.iter().all(|e| e.peer == "198.18.200.1:80"), "{x:?}");
        assert_eq!(spread(&x).len(), 3, "{x:?}");
    }
    // internalTrafficPolicy Local: this node's endpoints only.
    let x = sock(&lab.lb, "tcp", "198.18.200.2:80", 30);
    assert_eq!(
        spread(&x).keys().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from(["b1".into(), "b2".into()]),
        "{x:?}"
    );
    // Topology hints: the same-zone endpoints only, from the node and from a pod.
    for ns in [&lab.lb, &lab.backends[1].ns] {
        let x = sock(ns, "tcp", "198.18.200.3:80", 30);
        assert_eq!(
            spread(&x).keys().cloned().collect::<BTreeSet<_>>(),
            BTreeSet::from(["b1".into(), "b3".into()]),
            "{x:?}"
        );
    }
    // The LoadBalancer address from inside: every endpoint, b3 on the other node included.
    let x = sock(&lab.backends[1].ns, "tcp", &lb_addr, 30);
    assert_eq!(spread(&x).len(), 3, "{x:?}");

    // NodePorts on the Node's InternalIP from outside.
    let from_outside = |port: u16, range: std::ops::Range<u16>| -> Vec<(String, String)> {
        range
            .map(|p| {
                let r = lab
                    .client
                    .run_in(|| {
                        clients::http_get(
                            Some(SocketAddr::new(CLIENT_V4.parse().unwrap(), p)),
                            SocketAddr::new(LB_V4.parse().unwrap(), port),
                            "/whoami",
                            T,
                        )
                    })
                    .unwrap_or_else(|e| panic!("GET node port {port} from port {p}: {e}"));
                assert_eq!(r.status, 200);
                let body = String::from_utf8_lossy(&r.body).into_owned();
                let seen = body
                    .split_whitespace()
                    .find_map(|kv| kv.strip_prefix("peer="))
                    .unwrap_or_default()
                    .to_string();
                (r.backend, seen)
            })
            .collect()
    };
    let cluster = from_outside(30080, 27_000..27_030);
    assert_eq!(
        cluster
            .iter()
            .map(|(b, _)| b.clone())
            .collect::<BTreeSet<_>>()
            .len(),
        3,
        "{cluster:?}"
    );
    let local = from_outside(30081, 27_100..27_130);
    assert_eq!(
        local
            .iter()
            .map(|(b, _)| b.clone())
            .collect::<BTreeSet<_>>(),
        BTreeSet::from(["b1".into(), "b2".into()]),
        "{local:?}"
    );
    for (i, (_, seen)) in local.iter().enumerate() {
        assert_eq!(
            seen,
            &format!("{CLIENT_V4}:{}", 27_100 + i),
            "Local keeps the client's address"
        );
    }

    // The healthCheckNodePort: kube-proxy's answer, two local endpoints.
    let hc: SocketAddr = "127.0.0.1:30123".parse().unwrap();
    let (code, body) = wait_for(
        Duration::from_secs(10),
        "the health-check node port",
        || {
            lab.lb
                .run_in(|| clients::http_get(None, hc, "/", T).ok())
                .map(|r| (r.status, String::from_utf8_lossy(&r.body).into_owned()))
        },
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(r#""localEndpoints":2"#), "{body}");
    // kube-proxy's health endpoint.
    for path in ["/healthz", "/livez"] {
        let r = lab
            .lb
            .run_in(|| clients::http_get(None, "127.0.0.1:10256".parse().unwrap(), path, T))
            .unwrap_or_else(|e| panic!("GET :10256{path}: {e}"));
        let body = String::from_utf8_lossy(&r.body).into_owned();
        assert_eq!(r.status, 200, "{path}: {body}");
        assert!(body.contains(r#""nodeEligible":true"#), "{path}: {body}");
    }

    // No service's traffic: the node's own server on its address, from outside and from the
    // node; a backend reached by its own address.
    let r = lab
        .client
        .run_in(|| {
            clients::http_get(
                None,
                SocketAddr::new(LB_V4.parse().unwrap(), HTTP_PORT),
                "/",
                T,
            )
        })
        .expect("the node's own port from outside");
    assert_eq!(r.backend, "node");
    let x = sock(&lab.lb, "tcp", &format!("{LB_V4}:{HTTP_PORT}"), 2);
    assert!(x.iter().all(|e| e.backend == "node"), "{x:?}");
    let x = sock(
        &lab.backends[0].ns,
        "tcp",
        &format!("{}:{HTTP_PORT}", b[1]),
        2,
    );
    assert!(x.iter().all(|e| e.backend == "b2"), "{x:?}");

    // The node is about to be removed by the cluster autoscaler: /healthz drains it, /livez
    // stays.
    let (_, current) = api(&lab.lb, "GET", "/api/v1/nodes/lb-node", None);
    let mut tainted = current.clone();
    tainted["spec"]["taints"] =
        json!([{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]);
    let (code, v) = api(&lab.lb, "PUT", "/api/v1/nodes/lb-node", Some(tainted));
    assert_eq!(code, 200, "{v}");
    wait_for(Duration::from_secs(10), "/healthz to turn 503", || {
        let r = lab
            .lb
            .run_in(|| clients::http_get(None, "127.0.0.1:10256".parse().unwrap(), "/healthz", T))
            .ok()?;
        (r.status == 503).then_some(())
    });
    let r = lab
        .lb
        .run_in(|| clients::http_get(None, "127.0.0.1:10256".parse().unwrap(), "/livez", T))
        .unwrap();
    assert_eq!(r.status, 200);

    let status = agent.stop();
    assert!(status.success(), "{status}");
    apiserver.kill();
}

/// The objects most tests start from: the Node `lb-node`, the IPPool `lab`
/// (198.18.100.0/28), and the Service `shop/web` (with `annotations`) over every lab backend;
/// the backends.
fn seed_web(lab: &Lab, annotations: Value) -> Vec<IpAddr> {
    create(
        &lab.lb,
        "/api/v1/nodes",
        json!({"metadata": {"name": "lb-node"}}),
    );
    create(
        &lab.lb,
        "/apis/weir.dev/v1alpha1/ippools",
        json!({"metadata": {"name": "lab"}, "spec": {"addresses": ["198.18.100.0/28"], "avoidBuggyIPs": true}}),
    );
    let b: Vec<IpAddr> = lab.backends.iter().map(|b| b.v4).collect();
    create(
        &lab.lb,
        "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices",
        slice(&b),
    );
    create(
        &lab.lb,
        "/api/v1/namespaces/shop/services",
        service("web", annotations),
    );
    b
}

/// `shop/web`'s address (port 80), once its status has one.
fn web_vip(lab: &Lab) -> SocketAddr {
    let ip = wait_for(Duration::from_secs(10), "web's address", || {
        service_status(&lab.lb, "web").0.first().cloned()
    });
    SocketAddr::new(ip.parse().unwrap(), 80)
}

/// One Service over a data-plane limit must not freeze the others: a Service with 20 000
/// source ranges (the data plane holds 16 384 over all Services) and one whose endpoint sits
/// behind 17 frontends (at most 16) are left out — reported in the API, as a metric and as
/// Events — while another Service keeps changing and a new one is programmed. Before, either
/// made every apply fail and roll back, on every node.
#[test]
fn a_service_over_a_data_plane_limit_is_left_out_while_the_others_keep_changing() {
    weir_lab::netns::require_root();
    let mut lab = Lab::new(3);
    lab.start_servers(server_bin());
    let _apiserver = start_apiserver(&lab.lb);
    let b = seed_web(&lab, json!({}));
    let slices = "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices";
    let services = "/api/v1/namespaces/shop/services";

    // 20 000 /32 source ranges inside 198.18.0.0/15.
    let ranges: Vec<String> = (0..20_000u32)
        .map(|i| format!("{}/32", std::net::Ipv4Addr::from(0xC612_0000 + i)))
        .collect();
    let mut huge = service("huge", json!({}));
    huge["spec"]["loadBalancerSourceRanges"] = json!(ranges);
    create(&lab.lb, services, huge);
    // 17 ports on one endpoint: 17 frontends for b1:8080.
    let mut wide = service("wide", json!({}));
    wide["spec"]["ports"] = json!(
        (81..=97)
            .map(|p| json!({"name": format!("p{p}"), "port": p, "protocol": "TCP", "targetPort": "http"}))
            .collect::<Vec<_>>()
    );
    create(&lab.lb, services, wide);
    // An EndpointSlice names its ports after the Service's.
    let mut wide_slice = slice(&b[..1]);
    wide_slice["metadata"] =
        json!({"name": "wide-1", "labels": {"kubernetes.io/service-name": "wide"}});
    wide_slice["ports"] = json!(
        (81..=97)
            .map(|p| json!({"name": format!("p{p}"), "port": HTTP_PORT, "protocol": "TCP"}))
            .collect::<Vec<_>>()
    );
    create(&lab.lb, slices, wide_slice);
    // A BGPPeer the agent cannot decode (remoteAS beyond 32 bits, as stored before the CRD
    // bounded it): reported and skipped, where it used to fail every BGPPeer list, and with
    // it the agent's start.
    create(
        &lab.lb,
        "/apis/weir.dev/v1alpha1/bgppeers",
        json!({"metadata": {"name": "broken"}, "spec": {"address": "198.18.0.1", "remoteAS": 5_000_000_000u64, "localAS": 64512}}),
    );

    let agent = start_lb_node_agent(&lab, &[]);
    let bgp = agent
        .get(&lab.lb, "/api/v1/bgp")
        .expect("the API answers")
        .1;
    assert!(bgp.contains("BGPPeer broken: cannot be read"), "{bgp}");
    let left_out = |s: &Value| -> BTreeSet<String> {
        s["left_out"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|l| {
                format!(
                    "{} {}",
                    l["name"].as_str().unwrap(),
                    l["limit"].as_str().unwrap()
                )
            })
            .collect()
    };
    let names = |s: &Value| -> BTreeSet<String> {
        s["services"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|x| x["name"].as_str().unwrap().to_string())
            .collect()
    };
    let s = wait_for(
        Duration::from_secs(20),
        "web served, huge and wide left out",
        || {
            let s = agent.services(&lab.lb);
            (names(&s).contains("shop/web") && left_out(&s).len() == 2).then_some(s)
        },
    );
    assert_eq!(
        left_out(&s),
        BTreeSet::from([
            "shop/huge source_ranges".to_string(),
            "shop/wide endpoint_frontends".to_string()
        ]),
        "{s}"
    );
    assert_eq!(names(&s), BTreeSet::from(["shop/web".to_string()]), "{s}");
    // The metric follows the snapshot the API shows within the same change.
    for series in [
        r#"weir_dataplane_left_out{service="shop/huge",limit="source_ranges"} 1"#,
        r#"weir_dataplane_left_out{service="shop/wide",limit="endpoint_frontends"} 1"#,
    ] {
        wait_for(Duration::from_secs(5), series, || {
            agent.metrics(&lab.lb).contains(series).then_some(())
        });
    }
    for name in ["huge", "wide"] {
        let ev = wait_for(Duration::from_secs(10), "a NotProgrammed Event", || {
            events_for(&lab.lb, name)
                .into_iter()
                .find(|e| e["reason"] == "NotProgrammed")
        });
        assert_eq!(ev["type"], "Warning", "{ev}");
    }
    let vip = web_vip(&lab);
    assert_eq!(backends_of(&lab, vip, 28_000..28_060).len(), 3);

    // The others keep changing: b3 leaves web, and a new Service is programmed.
    let path = format!("{slices}/web-1");
    let (_, current) = api(&lab.lb, "GET", &path, None);
    let mut updated = slice(&b[..2]);
    updated["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
    let (code, v) = api(&lab.lb, "PUT", &path, Some(updated));
    assert_eq!(code, 200, "{v}");
    create(&lab.lb, services, service("other", json!({})));
    let mut other_slice = slice(&b[2..]);
    other_slice["metadata"] =
        json!({"name": "other-1", "labels": {"kubernetes.io/service-name": "other"}});
    create(&lab.lb, slices, other_slice);
    wait_for(
        Duration::from_secs(20),
        "web with 2 backends and other served",
        || {
            let s = agent.services(&lab.lb);
            let web_backends = s["services"]
                .as_array()?
                .iter()
                .find(|x| x["name"] == "shop/web")?["backends"]
                .as_array()?
                .len();
            (web_backends == 2 && names(&s).contains("shop/other") && left_out(&s).len() == 2)
                .then_some(())
        },
    );
    assert_eq!(
        backends_of(&lab, vip, 28_100..28_160),
        BTreeSet::from(["b1".into(), "b2".into()])
    );

    // wide down to 15 ports fits (b1 serves web too: 16 frontends), and is programmed.
    let (_, mut w) = api(&lab.lb, "GET", &format!("{services}/wide"), None);
    w["spec"]["ports"].as_array_mut().unwrap().truncate(15);
    let (code, v) = api(&lab.lb, "PUT", &format!("{services}/wide"), Some(w));
    assert_eq!(code, 200, "{v}");
    wait_for(Duration::from_secs(20), "wide programmed", || {
        let s = agent.services(&lab.lb);
        (names(&s).contains("shop/wide")
            && left_out(&s) == BTreeSet::from(["shop/huge source_ranges".to_string()]))
        .then_some(())
    });
    assert!(
        agent
            .log_text()
            .contains("service does not fit the data plane"),
        "the log says why"
    );
    assert!(
        !agent.log_text().contains("applying the change failed"),
        "no apply failed"
    );
}

/// An API server outage (it is killed — every watch breaks, every connection is refused —
/// and restarts 12 s later with its objects): the agent keeps serving what it has, logs
/// about one line per retry step rather than a line per failed call, and notices the API
/// server back within a couple of seconds.
#[test]
fn an_api_server_outage_is_logged_once_per_step_and_noticed_back_quickly() {
    weir_lab::netns::require_root();
    let mut lab = Lab::new(2);
    lab.start_servers(server_bin());
    let state = lab.dir.path.join("apiserver.json");
    let mut apiserver = start_apiserver_with_state(&lab.lb, Some(&state));
    let b = seed_web(&lab, json!({}));
    let slices = "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices";
    let agent = start_lb_node_agent(&lab, &[]);
    let vip = web_vip(&lab);
    wait_for(Duration::from_secs(10), "web served", || {
        lab.client
            .run_in(|| clients::http_get(None, vip, "/", T).ok())
            .map(|_| ())
    });

    // The API server goes for 12 s.
    let before = agent.log_text().lines().count();
    const OUTAGE: Duration = Duration::from_secs(12);
    let _ = apiserver.child.kill();
    let _ = apiserver.child.wait();
    // The outage lasts this long by design (it is the scenario, not a wait for a condition);
    // traffic keeps flowing through it.
    let began = std::time::Instant::now();
    while began.elapsed() < OUTAGE {
        let r = lab.client.run_in(|| clients::http_get(None, vip, "/", T));
        assert!(r.is_ok(), "served through the outage: {r:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let log = agent.log_text();
    let during: Vec<&str> = log
        .lines()
        .skip(before)
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    let _apiserver = start_apiserver_with_state(&lab.lb, Some(&state));
    let back = std::time::Instant::now();
    // One line per retry step (1, 2, 4, 8 s apart at most ... here: a handful), not one per
    // failed call of each watcher, the Lease and the status writers.
    assert!(
        (1..=8).contains(&during.len()),
        "{} lines in a {OUTAGE:?} outage:\n{}",
        during.len(),
        during.join("\n")
    );
    wait_for(
        Duration::from_secs(10),
        "the agent noticing the API server back",
        || {
            agent
                .log_text()
                .contains("Kubernetes API reachable again")
                .then_some(())
        },
    );
    let noticed = back.elapsed();
    // A change made now is programmed: the watches are live again.
    let path = format!("{slices}/web-1");
    let (_, current) = api(&lab.lb, "GET", &path, None);
    let mut updated = slice(&b[..1]);
    updated["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
    let (code, v) = api(&lab.lb, "PUT", &path, Some(updated));
    assert_eq!(code, 200, "{v}");
    wait_for(Duration::from_secs(5), "the change programmed", || {
        let s = agent.services(&lab.lb);
        (s["services"][0]["backends"].as_array().map(Vec::len) == Some(1)).then_some(())
    });
    eprintln!(
        "API server outage of {OUTAGE:?}: {} warning lines, noticed back after {noticed:?}",
        during.len()
    );
    assert!(
        noticed <= Duration::from_millis(3500),
        "noticed after {noticed:?}"
    );
}
