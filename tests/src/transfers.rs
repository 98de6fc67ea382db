//! Traffic of real sizes through a VIP, every byte checked: 1 MB HTTP downloads and uploads,
//! UDP streams in both directions (with replies larger than the MTU, which the backend's stack
//! fragments) and SCTP handshakes; and the check that weir left no reply
//! untranslated while they ran.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use crate::{agent::Agent, clients, netns::Netns, servers::pattern};

/// One megabyte.
pub const MB: usize = 1 << 20;

const T: Duration = Duration::from_secs(10);

fn check_pattern(what: &str, body: &[u8], len: usize) {
    assert_eq!(body.len(), len, "{what}: length");
    if let Some(i) = body.iter().enumerate().position(|(i, b)| *b != pattern(i)) {
        panic!("{what}: byte {i} is {} instead of {}", body[i], pattern(i));
    }
}

/// `GET /bytes/<len>` from `client` through `vip` (HTTP), the body checked byte by byte.
/// Returns the backend that answered.
pub fn download(client: &Netns, vip: SocketAddr, len: usize) -> String {
    let r = client
        .run_in(|| clients::http_get(None, vip, &format!("/bytes/{len}"), T))
        .unwrap_or_else(|e| panic!("download of {len} bytes from {vip}: {e}"));
    assert_eq!(r.status, 200, "download from {vip}");
    check_pattern(&format!("download from {vip}"), &r.body, len);
    r.backend
}

/// `POST /upload` of `len` pattern bytes from `client` through `vip`; the backend counts
/// them and checks each. Returns the backend.
pub fn upload(client: &Netns, vip: SocketAddr, len: usize) -> String {
    let body: Vec<u8> = (0..len).map(pattern).collect();
    let r = client
        .run_in(|| clients::http_post(None, vip, "/upload", &body, T))
        .unwrap_or_else(|e| panic!("upload of {len} bytes to {vip}: {e}"));
    let text = String::from_utf8_lossy(&r.body).into_owned();
    assert_eq!(r.status, 200, "upload to {vip}: {text}");
    assert!(
        text.contains(&format!("received={len} wrong=0")),
        "upload to {vip}: the backend says {text}"
    );
    r.backend
}

/// UDP from `local` to `vip`: `total` bytes up in datagrams of `size` (each echoed back and
/// compared), then `total` bytes down in replies of `down` bytes (`SEND <down>`: over the
/// MTU, the backend's stack fragments them). One flow, one exchange at a time, so nothing
/// queues anywhere: a lost datagram (a fragment dropped or left untranslated) fails the test,
/// it is not sent again.
pub fn udp_both_ways(
    client: &Netns,
    local: SocketAddr,
    vip: SocketAddr,
    total: usize,
    size: usize,
    down: usize,
) {
    client.run_in(|| {
        let s = std::net::UdpSocket::bind(local).unwrap_or_else(|e| panic!("bind {local}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let exchange = |payload: &[u8], what: &str| {
            clients::udp_exchange(&s, vip, payload)
                .unwrap_or_else(|e| panic!("{what} from {local} to {vip}: {e}"))
        };
        for n in 0..total.div_ceil(size) {
            let payload: Vec<u8> = (0..size).map(|i| pattern(i + n)).collect();
            let (_, echoed, from) = exchange(&payload, &format!("UDP echo {n}"));
            assert_eq!(from, vip, "UDP echo from the VIP");
            assert_eq!(echoed, payload, "UDP echo {n} from {vip}");
        }
        for n in 0..total.div_ceil(down) {
            let (_, body, from) =
                exchange(format!("SEND {down}").as_bytes(), &format!("UDP reply {n}"));
            assert_eq!(from, vip, "UDP reply from the VIP");
            check_pattern(
                &format!("UDP reply {n} of {down} bytes from {vip}"),
                &body,
                down,
            );
        }
    });
}

/// SCTP INIT → INIT-ACK from `client` (address `src`, ports from `first_port`), `n` times:
/// each answer comes from the VIP with a valid CRC32c.
pub fn sctp_inits(client: &Netns, src: IpAddr, first_port: u16, vip: SocketAddr, n: u16) {
    client.run_in(|| {
        for port in first_port..first_port + n {
            let ack = crate::sctp::init(src, port, vip, Duration::from_secs(3))
                .unwrap_or_else(|e| panic!("SCTP INIT from port {port} to {vip}: {e}"));
            assert_eq!(ack.from, vip.ip(), "INIT-ACK from the VIP");
            assert_eq!(ack.sport, vip.port(), "INIT-ACK from the VIP's port");
        }
    });
}

/// The agent's `weir_dataplane_untranslated_total`, by reason.
pub fn untranslated(metrics: &str) -> Vec<(String, f64)> {
    metrics
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("weir_dataplane_untranslated_total{reason=\"")?;
            let (reason, value) = rest.split_once("\"} ")?;
            Some((reason.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// Asserts that the agent counts no untranslated reply (and exports the counter at all), and
/// that it did translate replies (`min_revnat` at least).
/// The counters are sampled once a second: waits for a sample that has them.
pub fn assert_all_translated(agent: &Agent, ns: &Netns, min_revnat: f64) {
    let m = crate::agent::wait_for(
        Duration::from_secs(5),
        &format!("at least {min_revnat} replies counted as reverse-NATed"),
        || {
            let m = agent.metrics(ns);
            let revnat =
                crate::agent::sample(&m, "weir_dataplane_packets_total{path=\"reverse_nat\"}")?;
            (revnat >= min_revnat).then_some(m)
        },
    );
    let u = untranslated(&m);
    assert!(
        !u.is_empty(),
        "no weir_dataplane_untranslated_total in the metrics"
    );
    assert!(
        u.iter().all(|(_, v)| *v == 0.0),
        "replies left untranslated: {u:?}"
    );
}
