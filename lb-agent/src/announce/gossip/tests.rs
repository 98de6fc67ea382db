use super::*;

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

fn settings(node: &str, peers: &[SocketAddr]) -> Settings {
    Settings {
        node: node.into(),
        peers: watch::channel(peers.to_vec()).1,
        interval: Duration::from_millis(50),
        dead_after: Duration::from_millis(300),
        key: Key::new(Some(KEY)),
        rejections: Arc::default(),
    }
}

fn heartbeat(node: &str, seq: u64, echo: &[(&str, u64)]) -> Heartbeat {
    Heartbeat {
        node: node.into(),
        eligible: true,
        claims: BTreeSet::new(),
        serving: None,
        restarting_ms: None,
        boot: 7,
        seq,
        echo: echo.iter().map(|(n, b)| ((*n).to_string(), *b)).collect(),
    }
}

fn sealed(key: &Key, b: &Heartbeat) -> Vec<u8> {
    key.seal(&serde_json::to_vec(b).unwrap())
}

#[test]
fn only_the_keys_tag_opens_a_datagram() {
    let key = Key::new(Some(KEY));
    let d = key.seal(b"{}");
    assert_eq!(key.open(&d), Ok(&b"{}"[..]));
    // One bit changed anywhere (magic, tag, body).
    for i in [0, 5, d.len() - 1] {
        let mut t = d.clone();
        t[i] ^= 1;
        assert!(key.open(&t).is_err(), "byte {i}");
    }
    assert_eq!(
        Key::new(Some(b"another key of sixteen")).open(&d),
        Err(Reject::BadTag)
    );
    // The old plain-JSON heartbeat, a truncated datagram.
    assert_eq!(key.open(br#"{"node":"lb2"}"#), Err(Reject::Malformed));
    assert_eq!(key.open(&d[..20]), Err(Reject::Malformed));
    // Without a key nothing is checked but the framing.
    assert_eq!(
        Key::new(None).open(&Key::new(None).seal(b"x")),
        Ok(&b"x"[..])
    );
}

#[test]
fn forged_replayed_and_unknown_datagrams_are_rejected_by_reason() {
    let lb2: SocketAddr = "198.18.0.2:7946".parse().unwrap();
    let lb3: SocketAddr = "198.18.0.3:7946".parse().unwrap();
    let s = settings("lb1", &[lb2, lb3]);
    let peers: BTreeSet<SocketAddr> = [lb2, lb3].into();
    let key = Key::new(Some(KEY));
    let my_boot = 42;
    let mut senders = BTreeMap::new();
    let mut alive: BTreeMap<String, Heard> = BTreeMap::new();
    let check = |d: &[u8],
                 from: SocketAddr,
                 senders: &mut BTreeMap<String, Sender>,
                 alive: &BTreeMap<String, Heard>| {
        accept(d, from, &s, &peers, my_boot, senders, alive).map(|(b, fresh)| (b.node, fresh))
    };
    let good = sealed(&key, &heartbeat("lb2", 100, &[("lb1", my_boot)]));
    // From an address that is no peer's.
    let stranger: SocketAddr = "198.18.0.9:7946".parse().unwrap();
    assert_eq!(
        check(&good, stranger, &mut senders, &alive),
        Err(Reject::UnknownSender)
    );
    // Forged: the right framing, another key.
    let forged = sealed(
        &Key::new(Some(b"not the cluster's key")),
        &heartbeat("lb2", 101, &[("lb1", my_boot)]),
    );
    assert_eq!(
        check(&forged, lb2, &mut senders, &alive),
        Err(Reject::BadTag)
    );
    assert!(senders.is_empty(), "nothing learnt from rejected datagrams");
    // The real one, then the same again (a replay) and an older one.
    assert_eq!(
        check(&good, lb2, &mut senders, &alive),
        Ok(("lb2".into(), true))
    );
    alive.insert(
        "lb2".into(),
        (
            Instant::now() + Duration::from_secs(1),
            true,
            BTreeSet::new(),
            None,
        ),
    );
    assert_eq!(
        check(&good, lb2, &mut senders, &alive),
        Err(Reject::Replayed)
    );
    let older = sealed(&key, &heartbeat("lb2", 99, &[("lb1", my_boot)]));
    assert_eq!(
        check(&older, lb2, &mut senders, &alive),
        Err(Reject::Replayed)
    );
    // lb2's name from lb3's address while lb2 lives; lb3 speaking as itself is fine.
    let moved = sealed(&key, &heartbeat("lb2", 200, &[("lb1", my_boot)]));
    assert_eq!(
        check(&moved, lb3, &mut senders, &alive),
        Err(Reject::NameConflict)
    );
    let lb3_says = sealed(&key, &heartbeat("lb3", 5, &[]));
    // Authentic and in order but not echoing this agent's nonce: recorded, not applied.
    assert_eq!(
        check(&lb3_says, lb3, &mut senders, &alive),
        Ok(("lb3".into(), false))
    );
    // A datagram recorded before this agent started echoes an older nonce: not applied.
    let recorded = sealed(&key, &heartbeat("lb2", 300, &[("lb1", my_boot - 1)]));
    assert_eq!(
        check(&recorded, lb2, &mut senders, &alive),
        Ok(("lb2".into(), false))
    );
    // lb2 restarts: its new run (new nonce) starts over with lower numbers, even with its
    // clock stepped back; its earlier run's datagrams stay replays.
    let mut restarted = heartbeat("lb2", 1, &[("lb1", my_boot)]);
    restarted.boot = 8;
    assert_eq!(
        check(&sealed(&key, &restarted), lb2, &mut senders, &alive),
        Ok(("lb2".into(), true))
    );
    let from_before = sealed(&key, &heartbeat("lb2", 400, &[("lb1", my_boot)]));
    assert_eq!(
        check(&from_before, lb2, &mut senders, &alive),
        Err(Reject::Replayed)
    );
    restarted.seq = 2;
    assert_eq!(
        check(&sealed(&key, &restarted), lb2, &mut senders, &alive),
        Ok(("lb2".into(), true))
    );
    // Its own name.
    let me = sealed(&key, &heartbeat("lb1", 1, &[]));
    assert_eq!(check(&me, lb3, &mut senders, &alive), Err(Reject::OwnName));
}

fn vips(n: u8) -> BTreeSet<IpAddr> {
    (1..=n).map(|i| IpAddr::from([198, 18, 100, i])).collect()
}

fn view(nodes: &[(&str, bool, &[IpAddr])]) -> View {
    View {
        alive: nodes
            .iter()
            .map(|(n, e, c)| (n.to_string(), (*e, c.iter().copied().collect())))
            .collect(),
        settled: true,
        serving: BTreeMap::new(),
    }
}

#[test]
fn every_vip_has_exactly_one_owner_and_a_leaving_node_moves_only_its_own() {
    let all = vips(60);
    let names = ["lb1", "lb2", "lb3"];
    let owners = |alive: &[&str]| -> Vec<BTreeSet<IpAddr>> {
        alive
            .iter()
            .map(|me| {
                let others: Vec<(&str, bool, &[IpAddr])> = alive
                    .iter()
                    .filter(|n| *n != me)
                    .map(|n| (*n, true, &[][..]))
                    .collect();
                owned(me, true, &all, &view(&others), &all)
            })
            .collect()
    };
    let three = owners(&names);
    for vip in &all {
        assert_eq!(three.iter().filter(|o| o.contains(vip)).count(), 1, "{vip}");
    }
    assert!(three.iter().all(|o| o.len() >= 10), "spread: {three:?}");
    // lb3 leaves: lb1 and lb2 keep theirs and share lb3's.
    let two = owners(&names[..2]);
    for i in 0..2 {
        assert!(two[i].is_superset(&three[i]), "lb{} kept its VIPs", i + 1);
    }
    assert_eq!(&two[0] | &two[1], all);
}

#[test]
fn a_vip_still_claimed_by_a_live_node_is_not_taken_and_ineligible_nodes_own_nothing() {
    let all = vips(20);
    let mine = owned("lb1", true, &all, &view(&[("lb2", true, &[])]), &all);
    let vip = *mine.iter().next().expect("lb1 owns some");
    // lb2 still answers for it (it owned it before lb1 came back): lb1 waits.
    let claims = [vip];
    let waiting = owned("lb1", true, &all, &view(&[("lb2", true, &claims)]), &all);
    assert!(!waiting.contains(&vip));
    assert_eq!(waiting.len(), mine.len() - 1);
    // An ineligible peer is passed over; an ineligible node owns nothing.
    let alone = owned("lb1", true, &all, &view(&[("lb2", false, &[])]), &all);
    assert_eq!(alone, all);
    assert!(owned("lb1", false, &all, &view(&[]), &all).is_empty());
    // Before the view settles (just started: peers not heard yet are not dead yet), nothing.
    assert!(owned("lb1", true, &all, &View::default(), &all).is_empty());
    assert_eq!(owned("lb1", true, &all, &view(&[]), &all), all);
}

/// Three gossip instances on real UDP sockets on loopback: each hears the other two, and a
/// stopped one is declared dead by the others once `dead_after` passes.
#[tokio::test]
async fn peers_are_heard_and_a_stopped_one_is_dead_after_its_timeout() {
    let sockets = [
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
    ];
    let addrs: Vec<SocketAddr> = sockets.iter().map(|s| s.local_addr().unwrap()).collect();
    let mut locals = Vec::new();
    let mut views = Vec::new();
    let mut peer_lists = Vec::new();
    for (i, socket) in sockets.into_iter().enumerate() {
        let (local_tx, local_rx) = watch::channel(Local {
            eligible: true,
            claims: BTreeSet::new(),
            serving: vips(3),
            restarting: None,
        });
        let (view_tx, view_rx) = watch::channel(View::default());
        let others: Vec<SocketAddr> = addrs
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, a)| *a)
            .collect();
        // lb3 learns its peers later (as from the Kubernetes Nodes).
        let (peers_tx, peers) = watch::channel(if i == 2 { Vec::new() } else { others.clone() });
        peer_lists.push((peers_tx, others));
        let settings = Settings {
            node: format!("lb{}", i + 1),
            peers,
            interval: Duration::from_millis(50),
            dead_after: Duration::from_millis(300),
            key: Key::new(Some(KEY)),
            rejections: Arc::default(),
        };
        tokio::spawn(run(socket, settings, local_rx, view_tx));
        // The agent says what this node is (until then gossip is silent).
        local_tx.send_modify(|_| ());
        locals.push(local_tx);
        views.push(view_rx);
    }
    let wait = |rx: &mut watch::Receiver<View>, n: usize| {
        let mut rx = rx.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|v| v.alive.len() == n))
                .await
                .expect("in time")
                .expect("running")
                .clone()
        }
    };
    // lb1 and lb2 hear each other; lb3, without peers, hears nobody (their datagrams come
    // from no peer of its) and nobody hears it.
    wait(&mut views[0], 1).await;
    wait(&mut views[1], 1).await;
    assert!(views[2].borrow().alive.is_empty());
    assert!(!views[0].borrow().alive.contains_key("lb3"));
    let (tx, others) = &peer_lists[2];
    tx.send_replace(others.clone());
    for v in &mut views {
        wait(v, 2).await;
    }
    // lb1 claims a VIP: the others see it, and what it can serve.
    let vip = IpAddr::from([198, 18, 100, 1]);
    locals[0].send_modify(|l| {
        l.claims.insert(vip);
    });
    let mut rx = views[1].clone();
    tokio::time::timeout(
        Duration::from_secs(5),
        rx.wait_for(|v| {
            v.alive.get("lb1").is_some_and(|(_, c)| c.contains(&vip))
                && v.serving.get("lb1") == Some(&vips(3))
        }),
    )
    .await
    .expect("the claim arrives")
    .unwrap();
    // lb3 stops: lb1 and lb2 drop it.
    drop(locals.pop());
    let started = std::time::Instant::now();
    let v = wait(&mut views[0], 1).await;
    assert!(v.alive.contains_key("lb2"), "{v:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "declared dead only after dead_after: {:?}",
        started.elapsed()
    );
    wait(&mut views[1], 1).await;

    // lb2's agent restarts with its data plane staying: lb1 holds it alive, with its claims,
    // for the grace it asked (well past dead_after), then drops it.
    locals[1].send_modify(|l| {
        l.claims.insert(vip);
        l.restarting = Some(Duration::from_millis(1500));
    });
    let said = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(900)).await;
    let v = views[0].borrow().clone();
    assert!(
        v.alive.get("lb2").is_some_and(|(_, c)| c.contains(&vip)),
        "held alive past dead_after: {v:?}"
    );
    wait(&mut views[0], 0).await;
    assert!(
        said.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        said.elapsed()
    );
}

#[test]
fn a_vip_goes_only_to_nodes_that_can_serve_it() {
    let all = vips(30);
    let some: BTreeSet<IpAddr> = all.iter().copied().take(10).collect();
    // lb2 serves only the first ten: lb1 owns every other VIP, and the ten by rank.
    let mut v = view(&[("lb2", true, &[])]);
    v.serving.insert("lb2".into(), some.clone());
    let mine = owned("lb1", true, &all, &v, &all);
    let theirs: BTreeSet<IpAddr> = all.difference(&mine).copied().collect();
    assert!(theirs.is_subset(&some), "{theirs:?}");
    let mut v1 = view(&[("lb1", true, &[])]);
    v1.serving.insert("lb1".into(), all.clone());
    assert_eq!(
        owned("lb2", true, &some, &v1, &all),
        theirs,
        "both sides agree"
    );
    // A node that can serve nothing owns nothing, and the other takes everything.
    assert!(
        owned(
            "lb1",
            true,
            &BTreeSet::new(),
            &view(&[("lb2", true, &[])]),
            &all
        )
        .is_empty()
    );
    let mut v2 = view(&[("lb1", true, &[])]);
    v2.serving.insert("lb1".into(), BTreeSet::new());
    assert_eq!(owned("lb2", true, &all, &v2, &all), all);
}
