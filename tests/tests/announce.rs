//! VIP announcement in the netns lab (`weir_lab::l2lab`): L2 mode with three LB nodes on one
//! link, a client and a backend beside them, each LB node running the real agent with gossip
//! between them. Exactly one node answers ARP for the VIP; SIGKILL its agent and the client's
//! traffic moves to another node, which took the VIP over with a gratuitous ARP, and the dead
//! node no longer answers; take the owner's link down and the same happens. Needs root; the namespaces are the test's own and are removed
//! afterwards.

use std::time::Duration;

use weir_lab::{agent::wait_for, l2lab::L2Lab};

fn server_bin() -> &'static std::path::Path {
    env!("CARGO_BIN_EXE_weir-lab").as_ref()
}

#[test]
fn l2_failover_moves_the_vip_to_a_live_node() {
    weir_lab::netns::require_root();
    const N: usize = 3;
    let mut lab = L2Lab::new(N, server_bin());
    let owner = lab.owner();
    // The admin API and the metrics say who answers: the owner, and no other node.
    for i in 0..N {
        let agent = lab.agents[i].as_ref().unwrap();
        let mine = i == owner;
        let s = wait_for(
            Duration::from_secs(5),
            "the announcement in the API",
            || {
                let s = agent.services(&lab.lbs[i]);
                (s["services"][0]["announced"] == mine).then_some(s)
            },
        );
        assert_eq!(s["services"][0]["vip"], weir_lab::l2lab::VIP);
        let metrics = agent.metrics(&lab.lbs[i]);
        let want = format!(
            "weir_l2_announced{{vip=\"{}\"}} {}",
            weir_lab::l2lab::VIP,
            u8::from(mine)
        );
        assert!(metrics.contains(&want), "node {}: no {want:?}", i + 1);
    }

    // Only the owner answers: a fresh resolution moves its counter and no other's, and the
    // client reaches the service through it.
    let before: Vec<f64> = (0..N).map(|i| lab.arp_replies(i)).collect();
    lab.client
        .ip(&format!("neigh flush {}", weir_lab::l2lab::VIP));
    let r = lab
        .get(Duration::from_secs(2))
        .expect("GET through the owner");
    assert_eq!((r.status, r.backend.as_str()), (200, "b1"));
    assert_eq!(
        lab.vip_mac(),
        Some(lab.macs[owner]),
        "resolved to the owner"
    );
    let answered = wait_for(Duration::from_secs(5), "the ARP answer counted", || {
        let d: Vec<f64> = (0..N).map(|i| lab.arp_replies(i) - before[i]).collect();
        (d[owner] >= 1.0).then_some(d)
    });
    for (i, d) in answered.iter().enumerate() {
        if i != owner {
            assert_eq!(*d, 0.0, "node {} answered too: {answered:?}", i + 1);
        }
    }

    // The owner's agent dies without a word: its lease runs out when the others declare it
    // dead, and the new owner's gratuitous ARP moves the client.
    let (old, new, took) = lab.failover();
    assert_eq!(old, owner);
    assert_ne!(new, owner);
    eprintln!(
        "L2 failover after SIGKILL of the owner's agent: {} ms (first success through the new owner)",
        took.as_millis()
    );
    // Only the new owner answers now: fresh resolutions find it, never the dead node.
    for _ in 0..3 {
        lab.client
            .ip(&format!("neigh flush {}", weir_lab::l2lab::VIP));
        assert_eq!(lab.get(Duration::from_secs(2)).expect("GET").status, 200);
        assert_eq!(
            lab.vip_mac(),
            Some(lab.macs[new]),
            "resolved to the new owner only"
        );
    }
    // The dead node's agent comes back: the VIP is owned by one node again, whichever ranks
    // first, and is reachable.
    lab.start_agent(old);
    let back = lab.owner();
    lab.client
        .ip(&format!("neigh flush {}", weir_lab::l2lab::VIP));
    assert_eq!(lab.get(Duration::from_secs(2)).expect("GET").status, 200);
    assert_eq!(lab.vip_mac(), Some(lab.macs[back]));
    // The owner's link goes down (its agent lives on): the others stop hearing it and take
    // the VIP over.
    let (old, new, took) = lab.fail_owner(true);
    assert_ne!(old, new);
    eprintln!(
        "L2 failover after the owner's link went down: {} ms",
        took.as_millis()
    );
    lab.lbs[old].ip("link set eth0 up");
    for a in lab.agents.iter_mut().filter_map(Option::take) {
        assert!(a.stop().success());
    }
}

/// An attacker on the nodes' link (the client's namespace) records real heartbeats and sends
/// datagrams with a node's source address: replays, tampered and forged heartbeats saying the
/// owner can serve nothing, and heartbeats from an address that is no peer's. None of them
/// changes who answers for the VIP; each is counted by reason. The same forgery with the
/// cluster's key does change the other node's view: the key is what stops it.
#[test]
fn forged_replayed_and_unknown_gossip_changes_nothing() {
    use std::net::SocketAddrV4;
    use weir_lab::{l2lab::lb_addr, spoof};
    weir_lab::netns::require_root();
    let lab = L2Lab::new(2, server_bin());
    let owner = lab.owner();
    let other = 1 - owner;
    let at = |i: usize| SocketAddrV4::new(lb_addr(i).parse().unwrap(), 7946);
    let (owner_addr, other_addr) = (at(owner), at(other));
    // A real heartbeat of the owner's, and the other node's nonce from one of its own.
    let recorded = spoof::record_udp(&lab.lbs[other], owner_addr, 7946, Duration::from_secs(3))
        .expect("the owner's heartbeat");
    let theirs = spoof::record_udp(&lab.lbs[owner], other_addr, 7946, Duration::from_secs(3))
        .expect("the other node's heartbeat");
    let body = |d: &[u8]| -> serde_json::Value { serde_json::from_slice(&d[36..]).unwrap() };
    let other_boot = body(&theirs)["boot"].clone();
    let other_name = body(&theirs)["node"].as_str().unwrap().to_string();
    let owner_name = body(&recorded)["node"].as_str().unwrap().to_string();
    // The forgery: the owner, with a sequence far ahead, echoing the other's nonce, says it
    // can serve nothing and claims nothing.
    let mut forged = body(&recorded);
    forged["eligible"] = false.into();
    forged["claims"] = serde_json::json!([]);
    forged["serving"] = serde_json::json!([]);
    forged["seq"] = (forged["seq"].as_u64().unwrap() + 10_000_000_000).into();
    forged["echo"] = serde_json::json!({ other_name.clone(): other_boot });
    let forged_body = serde_json::to_vec(&forged).unwrap();
    let wrong_key =
        lb_agent::announce::gossip::wire::Key::new(Some(b"a key that is not the cluster's"));
    let mut tampered = recorded.clone();
    let last = tampered.len() - 2;
    tampered[last] ^= 0x20;
    let attacker = &lab.client;
    let stranger = SocketAddrV4::new(weir_lab::l2lab::CLIENT.parse().unwrap(), 7946);
    // For 1.5 s (well past dead_after), every 20 ms.
    let start = std::time::Instant::now();
    let mut sent = 0;
    while start.elapsed() < Duration::from_millis(1500) {
        spoof::send_udp(attacker, owner_addr, other_addr, &recorded).unwrap();
        spoof::send_udp(attacker, owner_addr, other_addr, &tampered).unwrap();
        spoof::send_udp(
            attacker,
            owner_addr,
            other_addr,
            &wrong_key.seal(&forged_body),
        )
        .unwrap();
        spoof::send_udp(attacker, stranger, other_addr, &recorded).unwrap();
        sent += 1;
        assert!(
            lab.announcing(owner) && !lab.announcing(other),
            "the VIP moved under forged gossip"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let agent = lab.agents[other].as_ref().unwrap();
    let l2 = |agent: &weir_lab::agent::Agent| -> serde_json::Value {
        serde_json::from_str(&agent.get(&lab.lbs[other], "/api/v1/l2").unwrap().1).unwrap()
    };
    let v = wait_for(Duration::from_secs(5), "every datagram counted", || {
        let v = l2(agent);
        let r = &v["rejected"];
        (r["replayed"].as_u64()? >= sent
            && r["bad_tag"].as_u64()? >= 2 * sent
            && r["unknown_sender"].as_u64()? >= sent)
            .then_some(v)
    });
    assert_eq!(v["authenticated"], true, "{v}");
    assert_eq!(v["alive"][&owner_name]["eligible"], true, "{v}");
    let metrics = agent.metrics(&lab.lbs[other]);
    for reason in ["replayed", "bad_tag", "unknown_sender"] {
        let n = weir_lab::agent::sample(
            &metrics,
            &format!("weir_gossip_rejected_total{{reason=\"{reason}\"}}"),
        )
        .unwrap_or_else(|| panic!("no {reason} series:\n{metrics}"));
        assert!(n >= sent as f64, "{reason}: {n}");
    }
    assert_eq!(lab.owner(), owner);

    // Control: the same forgery sealed with the cluster's key is believed.
    let key = std::fs::read_to_string(lab.gossip_key()).unwrap();
    let real_key = lb_agent::announce::gossip::wire::Key::new(Some(key.trim_end().as_bytes()));
    spoof::send_udp(
        attacker,
        owner_addr,
        other_addr,
        &real_key.seal(&forged_body),
    )
    .unwrap();
    wait_for(Duration::from_secs(5), "the keyed forgery believed", || {
        (l2(agent)["alive"][&owner_name]["eligible"] == false).then_some(())
    });
}

/// A request to the fake Kubernetes API from node 1's namespace (0: no answer).
fn kube(lab: &L2Lab, method: &str, path: &str, body: Option<serde_json::Value>) -> u16 {
    let api = weir_lab::l2lab::API.parse().unwrap();
    weir_lab::fakeapi::request(&lab.lbs[0], api, method, path, body.as_ref()).map_or(0, |r| r.0)
}

fn create(lab: &L2Lab, path: &str, body: serde_json::Value) {
    assert_eq!(
        kube(lab, "POST", path, Some(body.clone())),
        201,
        "POST {path} {body}"
    );
}

/// Kubernetes mode: the real agents read the Service, its EndpointSlice, the Nodes and an
/// L2Advertisement from the fake API server (`weir_lab::fakeapi`, the one mock: no
/// kube-apiserver runs here). Without an L2Advertisement nobody answers; with one selecting
/// two of the three nodes, exactly one of those two answers (the gossip peers come from the
/// Nodes), and when its agent dies the other one takes over — never the unselected node.
#[test]
fn l2_in_kubernetes_mode_follows_the_l2advertisement_and_fails_over_within_its_nodes() {
    weir_lab::netns::require_root();
    use serde_json::json;
    use weir_lab::l2lab::{BACKEND, VIP, lb_addr};
    const N: usize = 3;
    let mut lab = L2Lab::kubernetes(N, server_bin());
    wait_for(Duration::from_secs(10), "the fake API server", || {
        (kube(&lab, "GET", "/api/v1/nodes", None) == 200).then_some(())
    });
    for i in 0..N {
        // lb1 and lb2 are edge nodes; lb3 is not.
        let labels = if i < 2 {
            json!({"edge": "true"})
        } else {
            json!({})
        };
        create(
            &lab,
            "/api/v1/nodes",
            json!({
                "metadata": {"name": format!("lb{}", i + 1), "labels": labels},
                "status": {"addresses": [{"type": "InternalIP", "address": lb_addr(i)}]},
            }),
        );
    }
    create(
        &lab,
        "/apis/weir.dev/v1alpha1/ippools",
        json!({"metadata": {"name": "lan"}, "spec": {"addresses": [format!("{VIP}/32")]}}),
    );
    create(
        &lab,
        "/api/v1/namespaces/shop/services",
        json!({
            "metadata": {"name": "web"},
            "spec": {
                "type": "LoadBalancer", "loadBalancerClass": "weir.dev/lb", "ipFamilies": ["IPv4"],
                "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"}],
            },
        }),
    );
    create(
        &lab,
        "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices",
        json!({
            "metadata": {"name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": weir_lab::lab::HTTP_PORT, "protocol": "TCP"}],
            "endpoints": [{"addresses": [BACKEND], "nodeName": "elsewhere", "conditions": {"ready": true}}],
        }),
    );
    for i in 0..N {
        lab.start_agent(i);
    }
    // Every node serves the VIP (its address written by the leader), none answers for it.
    for i in 0..N {
        let agent = lab.agents[i].as_ref().unwrap();
        wait_for(Duration::from_secs(20), "the VIP programmed", || {
            let s = agent.services(&lab.lbs[i]);
            (s["services"][0]["vip"] == VIP).then_some(())
        });
    }
    // Once every node's gossip has settled (it would take a VIP from then on), still nobody
    // answers: no L2Advertisement gives anyone the VIP.
    let l2 = |lab: &L2Lab, i: usize| -> serde_json::Value {
        let (_, body) = lab.agents[i]
            .as_ref()
            .unwrap()
            .get(&lab.lbs[i], "/api/v1/l2")
            .expect("/api/v1/l2");
        serde_json::from_str(&body).expect("json")
    };
    for i in 0..N {
        let v = wait_for(Duration::from_secs(5), "the gossip settled", || {
            let v = l2(&lab, i);
            (v["settled"] == true).then_some(v)
        });
        assert_eq!(v["enabled"], true);
        assert_eq!(v["allowed"], json!([]), "{v}");
        assert_eq!(
            v["peers"],
            json!([]),
            "no L2Advertisement selects a node: {v}"
        );
    }
    assert!(
        (0..N).all(|i| !lab.announcing(i)),
        "no L2Advertisement, no answer"
    );
    lab.client.ip(&format!("neigh flush {VIP}"));
    assert!(
        lab.get(Duration::from_millis(500)).is_err(),
        "nobody answers ARP"
    );

    create(
        &lab,
        "/apis/weir.dev/v1alpha1/l2advertisements",
        json!({"metadata": {"name": "edge"}, "spec": {"ipPools": ["lan"], "nodeSelector": {"matchLabels": {"edge": "true"}}}}),
    );
    // Both edge nodes have the VIP and hear each other (their gossip peers are the Nodes
    // the L2Advertisement selects).
    for (i, other) in [(0, 1), (1, 0)] {
        wait_for(Duration::from_secs(10), "the edge nodes gossiping", || {
            let v = l2(&lab, i);
            (v["allowed"] == json!([VIP]) && v["alive"][format!("lb{}", other + 1)].is_object())
                .then_some(())
        });
    }
    // The owner once the two have agreed (both may claim it for a gossip round while they
    // first hear each other; the lower claim then yields).
    let owner = wait_for(Duration::from_secs(10), "the edge nodes to agree", || {
        let owner = lab.owner();
        let v = l2(&lab, owner);
        let other = format!("lb{}", 2 - owner.min(1));
        (v["announced"] == json!([VIP]) && v["alive"][other]["claims"] == json!([]))
            .then_some(owner)
    });
    assert!(owner < 2, "an edge node owns the VIP, not lb{}", owner + 1);
    // The edge nodes gossip with each other (their peers are the selected Nodes); lb3 may
    // answer for nothing.
    let other = 1 - owner;
    let v = l2(&lab, owner);
    assert_eq!(
        v["peers"],
        json!([format!("{}:7946", lb_addr(other))]),
        "{v}"
    );
    assert_eq!(v["allowed"], json!([VIP]), "{v}");
    assert_eq!(v["announced"], json!([VIP]), "{v}");
    assert_eq!(
        v["alive"][format!("lb{}", other + 1)]["claims"],
        json!([]),
        "{v}"
    );
    assert_eq!(l2(&lab, 2)["allowed"], json!([]));
    let metrics = lab.agents[owner].as_ref().unwrap().metrics(&lab.lbs[owner]);
    assert!(
        weir_lab::agent::sample(&metrics, "weir_gossip_members_alive").is_some_and(|n| n >= 1.0),
        "{metrics}"
    );
    let r = lab
        .get(Duration::from_secs(2))
        .expect("GET through the owner");
    assert_eq!((r.status, r.backend.as_str()), (200, "b1"));

    // The owner's agent dies: the other edge node takes over, lb3 never does.
    let (old, new, took) = lab.failover();
    assert_eq!(old, owner);
    assert_eq!(new, other, "the other edge node");
    eprintln!("L2 failover in Kubernetes mode: {} ms", took.as_millis());
    assert!(!lab.announcing(2));
}

/// A planned restart (SIGTERM with the data plane staying, then a new agent) does not move the
/// VIP: the stopping agent tells its gossip peers to hold it alive, its data plane goes on
/// answering ARP, the new agent adopts it and keeps answering; the client's requests, with its
/// neighbour entry flushed before each one (a fresh resolution every time), all succeed
/// through the same node, and no other node announces the VIP meanwhile.
#[test]
fn a_planned_restart_keeps_the_vip_where_it_is() {
    weir_lab::netns::require_root();
    const N: usize = 3;
    let mut lab = L2Lab::new(N, server_bin());
    let owner = lab.owner();
    let others: Vec<usize> = (0..N).filter(|i| *i != owner).collect();
    let check = |lab: &L2Lab, what: &str| {
        lab.client
            .ip(&format!("neigh flush {}", weir_lab::l2lab::VIP));
        lab.get(Duration::from_secs(1))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(
            lab.vip_mac(),
            Some(lab.macs[owner]),
            "{what}: the VIP moved"
        );
        for i in &others {
            assert!(
                !lab.announcing(*i),
                "{what}: node {} announces the VIP",
                i + 1
            );
        }
    };
    check(&lab, "before");
    assert!(lab.agents[owner].take().unwrap().stop().success());
    // Away for 2 s (dead_after is 400 ms): still answered, still there.
    let until = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < until {
        check(&lab, "agent stopped");
    }
    lab.start_agent(owner);
    for _ in 0..10 {
        check(&lab, "agent back");
    }
    assert!(lab.announcing(owner));
}
