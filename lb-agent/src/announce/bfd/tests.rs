use super::*;

fn timers() -> BfdTimers {
    BfdTimers {
        interval: Duration::from_millis(100),
        multiplier: 3,
    }
}

#[test]
fn packets_encode_as_rfc5880_section_4_1_and_decode_back() {
    let p = Packet {
        diag: diag::DETECT_EXPIRED,
        state: State::Init,
        poll: true,
        fin: false,
        detect_mult: 3,
        my_disc: 0x0102_0304,
        your_disc: 0x0a0b_0c0d,
        desired_min_tx: 100_000,
        required_min_rx: 200_000,
    };
    let b = p.encode();
    assert_eq!(
        b,
        [
            0x21, 0xa0, 3, 24, 1, 2, 3, 4, 0x0a, 0x0b, 0x0c, 0x0d, 0, 1, 0x86, 0xa0, 0, 3, 0x0d,
            0x40, 0, 0, 0, 0
        ]
    );
    assert_eq!(Packet::decode(&b), Ok(p));
}

#[test]
fn bad_packets_are_refused() {
    let good = Machine::new(7, timers()).packet().encode();
    assert!(Packet::decode(&good).is_ok());
    let with = |i: usize, v: u8| {
        let mut b = good;
        b[i] = v;
        Packet::decode(&b)
    };
    assert_eq!(Packet::decode(&good[..23]), Err("shorter than 24 octets"));
    assert_eq!(with(0, 0x40), Err("not version 1"));
    assert_eq!(with(3, 23), Err("bad length"));
    assert_eq!(with(3, 40), Err("bad length"));
    assert_eq!(
        with(1, good[1] | 0x04),
        Err("authentication is not supported")
    );
    assert_eq!(with(1, good[1] | 0x01), Err("multipoint bit set"));
    assert_eq!(with(2, 0), Err("detect multiplier 0"));
    assert_eq!(with(7, 0), Err("my discriminator 0"));
    // Up with no Your Discriminator.
    assert_eq!(with(1, 3 << 6), Err("your discriminator 0 outside Down"));
}

fn from_peer(state: State) -> Packet {
    Packet {
        diag: 0,
        state,
        poll: false,
        fin: false,
        detect_mult: 3,
        my_disc: 99,
        your_disc: 7,
        desired_min_tx: 50_000,
        required_min_rx: 50_000,
    }
}

#[test]
fn three_way_handshake_then_detection_and_neighbor_down() {
    let mut m = Machine::new(7, timers());
    assert_eq!(m.detection_time(), None, "no detection while down");
    // Slow until up (RFC 5880 §6.8.3).
    assert_eq!(m.packet().desired_min_tx, 1_000_000);
    assert!(m.receive(&from_peer(State::Down)));
    assert_eq!(m.state, State::Init);
    assert_eq!(m.packet().your_disc, 99);
    assert!(m.receive(&from_peer(State::Up)));
    assert_eq!(m.state, State::Up);
    // Up: the configured interval, announced with a Poll until the peer's Final.
    let p = m.packet();
    assert_eq!((p.desired_min_tx, p.poll), (100_000, true));
    assert_eq!(m.tx_interval(), Duration::from_millis(100));
    // Detection: the peer's multiplier × max(our Required Min RX, its Desired Min TX).
    assert_eq!(m.detection_time(), Some(Duration::from_millis(300)));
    let mut fin = from_peer(State::Up);
    fin.fin = true;
    assert!(!m.receive(&fin));
    assert!(!m.packet().poll, "the Poll ended");
    // A Poll from the peer is answered with a Final.
    let mut poll = from_peer(State::Up);
    poll.poll = true;
    m.receive(&poll);
    let p = m.packet();
    assert!(p.fin && !p.poll);
    // Silence: down with "control detection time expired".
    m.expire();
    assert_eq!((m.state, m.diag), (State::Down, diag::DETECT_EXPIRED));
    assert_eq!(m.packet().your_disc, 0);
    // Back up, then the peer says it is down: down with "neighbor signaled session down".
    m.receive(&from_peer(State::Down));
    m.receive(&from_peer(State::Up));
    assert_eq!(m.state, State::Up);
    m.receive(&from_peer(State::Down));
    assert_eq!((m.state, m.diag), (State::Down, diag::NEIGHBOR_DOWN));
    // AdminDown from the peer takes an Up session down too.
    m.receive(&from_peer(State::Down));
    m.receive(&from_peer(State::Up));
    m.receive(&from_peer(State::AdminDown));
    assert_eq!(m.state, State::Down);
}

/// Two sessions on real UDP sockets over the loopback (TTL 255, IP_MINTTL 255 on the
/// receiving side) come up.
#[tokio::test]
async fn two_machines_come_up_over_real_sockets() {
    let a = bind("127.0.0.1:0".parse().unwrap(), false).unwrap();
    let b = bind("127.0.0.1:0".parse().unwrap(), false).unwrap();
    let (mut ma, mut mb) = (Machine::new(1, timers()), Machine::new(2, timers()));
    let (aa, ba) = (a.local_addr().unwrap(), b.local_addr().unwrap());
    let mut buf = [0u8; 64];
    for _ in 0..3 {
        a.send_to(&ma.packet().encode(), ba).await.unwrap();
        let (n, _) = b.recv_from(&mut buf).await.unwrap();
        mb.receive(&Packet::decode(&buf[..n]).unwrap());
        b.send_to(&mb.packet().encode(), aa).await.unwrap();
        let (n, _) = a.recv_from(&mut buf).await.unwrap();
        ma.receive(&Packet::decode(&buf[..n]).unwrap());
    }
    assert_eq!((ma.state, mb.state), (State::Up, State::Up));
}
