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
