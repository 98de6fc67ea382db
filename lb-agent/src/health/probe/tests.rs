//! The socket checkers against real servers on loopback (no root needed). `ping` and `sctp`
//! need raw sockets: the lab suite (tests/tests/health.rs, as root) covers them.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU16, Ordering},
    },
    time::Duration,
};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
};

use super::*;
use crate::model::check::RawHealthCheck;

fn probe(yaml: &str) -> Probe {
    let raw: RawHealthCheck = serde_saphyr::from_str(yaml).expect("YAML");
    raw.check().expect("valid check").probe
}

async fn run(target: SocketAddr, yaml: &str) -> Result<(), Failure> {
    Prober::new().probe(target, &probe(yaml)).await
}

fn kind(r: Result<(), Failure>) -> FailureKind {
    r.expect_err("the probe should fail").kind
}

/// A port nothing listens on.
async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// A TCP server that answers each connection with `f(request bytes)` (None: say nothing and
/// hold the connection).
async fn tcp_server(f: fn(&[u8]) -> Option<Vec<u8>>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                match f(&buf[..n]) {
                    Some(reply) => {
                        let _ = s.write_all(&reply).await;
                    }
                    None => tokio::time::sleep(Duration::from_hours(1)).await,
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn tcp_connect() {
    // The full handshake; the half-open default needs a raw socket (the lab suite runs it).
    let full = "{type: tcp, handshake: full}";
    let up = tcp_server(|_| Some(vec![])).await;
    assert_eq!(run(up, full).await, Ok(()));
    assert_eq!(
        kind(run(closed_port().await, full).await),
        FailureKind::Refused
    );
}

#[tokio::test]
async fn tcp_request_and_response() {
    let pong = tcp_server(|req| {
        Some(if req == b"ping\n" {
            b"+pong\n".to_vec()
        } else {
            b"?\n".to_vec()
        })
    })
    .await;
    let check = "{type: tcp, request: \"ping\\n\", response: pong}";
    assert_eq!(run(pong, check).await, Ok(()));
    let wrong = "{type: tcp, request: \"ping\\n\", response: PONG}";
    let f = run(pong, wrong).await.unwrap_err();
    assert_eq!(f.kind, FailureKind::BadResponse, "{f}");
    assert!(f.detail.contains("+pong"), "the reply is shown: {f}");
    // A server that never answers: the probe times out.
    let silent = tcp_server(|_| None).await;
    let f = run(
        silent,
        "{type: tcp, request: x, response: y, interval: 200ms}",
    )
    .await
    .unwrap_err();
    assert_eq!(f.kind, FailureKind::Timeout);
    assert_eq!(f.detail, "no answer within 200ms");
}

#[tokio::test]
async fn udp_request_and_reply() {
    let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = server.recv_from(&mut buf).await {
            let reply = match &buf[..n] {
                b"ping" => b"pong".to_vec(),
                b"silence" => continue,
                _ => b"what?".to_vec(),
            };
            let _ = server.send_to(&reply, from).await;
        }
    });
    assert_eq!(
        run(addr, "{type: udp, request: ping, response: pong}").await,
        Ok(())
    );
    // Any reply will do when no response is set.
    assert_eq!(run(addr, "{type: udp, request: hello}").await, Ok(()));
    let f = run(addr, "{type: udp, request: hello, response: pong}")
        .await
        .unwrap_err();
    assert_eq!(f.kind, FailureKind::BadResponse);
    assert!(f.detail.contains("what?"), "{f}");
    // Silence is a failure: a black-holed backend must not look healthy.
    let f = run(addr, "{type: udp, request: silence, interval: 100ms}").await;
    assert_eq!(kind(f), FailureKind::Timeout);
    // A closed port answers with ICMP port unreachable: refused at once, not at the timeout.
    let closed = {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        s.local_addr().unwrap()
    };
    let began = std::time::Instant::now();
    let f = run(
        closed,
        "{type: udp, request: ping, interval: 5s, timeout: 5s}",
    )
    .await;
    assert_eq!(kind(f), FailureKind::Refused);
    assert!(
        began.elapsed() < Duration::from_secs(4),
        "refused before the timeout"
    );
}

/// Many probes at once share the UDP sockets: the ICMP errors of probes to a closed port are
/// theirs alone, never a send error or a failure of a probe to a live server.
#[tokio::test]
async fn udp_probes_in_flight_together_keep_their_own_answers() {
    let mut live = Vec::new();
    for _ in 0..20 {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        live.push(server.local_addr().unwrap());
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = server.recv_from(&mut buf).await {
                let _ = server.send_to(&buf[..n], from).await;
            }
        });
    }
    let mut closed = Vec::new();
    for _ in 0..50 {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        closed.push(s.local_addr().unwrap());
    }
    let prober = Prober::new();
    let check = probe("{type: udp, request: hi, response: hi, interval: 2s}");
    for _ in 0..5 {
        let refused = closed.iter().map(|a| prober.probe(*a, &check));
        let answered = live.iter().map(|a| prober.probe(*a, &check));
        let (refused, answered) = tokio::join!(
            futures_util::future::join_all(refused),
            futures_util::future::join_all(answered)
        );
        for r in refused {
            assert_eq!(kind(r), FailureKind::Refused);
        }
        for r in answered {
            assert_eq!(r, Ok(()));
        }
    }
}

/// What the test HTTP(S) server saw of each request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Seen {
    path: String,
    host: String,
    user_agent: String,
    sni: Option<String>,
}

struct HttpServer {
    addr: SocketAddr,
    status: Arc<AtomicU16>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

fn header(head: &str, name: &str) -> String {
    head.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
        .unwrap_or_default()
}

async fn answer<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    sni: Option<String>,
    status: u16,
    seen: &Mutex<Vec<Seen>>,
) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        // Not a request line (a TLS ClientHello, say): refuse it, as HTTP servers do.
        if !head[0].is_ascii_uppercase() {
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
            return;
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    seen.lock().unwrap().push(Seen {
        path: head
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string(),
        host: header(&head, "host"),
        user_agent: header(&head, "user-agent"),
        sni,
    });
    let reply = if status == 0 {
        "SSH-2.0-not-http\r\n\r\n".to_string()
    } else {
        format!("HTTP/1.1 {status} Whatever\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    };
    let _ = s.write_all(reply.as_bytes()).await;
    let _ = s.shutdown().await;
}

/// An HTTP server (HTTPS with `tls`) answering every request with `status` (0: not HTTP).
async fn http_server(tls: Option<Arc<rustls::ServerConfig>>) -> HttpServer {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = HttpServer {
        addr: l.local_addr().unwrap(),
        status: Arc::new(AtomicU16::new(200)),
        seen: Arc::default(),
    };
    let (status, seen) = (server.status.clone(), server.seen.clone());
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let (status, seen, tls) = (status.clone(), seen.clone(), tls.clone());
            tokio::spawn(async move {
                let code = status.load(Ordering::Relaxed);
                match tls {
                    None => answer(s, None, code, &seen).await,
                    Some(config) => {
                        let Ok(s) = tokio_rustls::TlsAcceptor::from(config).accept(s).await else {
                            return;
                        };
                        let sni = s.get_ref().1.server_name().map(str::to_string);
                        answer(s, sni, code, &seen).await;
                    }
                }
            });
        }
    });
    server
}

#[tokio::test]
async fn http_status_path_and_host() {
    let s = http_server(None).await;
    assert_eq!(run(s.addr, "{type: http, path: /healthz}").await, Ok(()));
    {
        let seen = s.seen.lock().unwrap();
        assert_eq!(seen[0].path, "/healthz");
        // Host defaults to the target.
        assert_eq!(seen[0].host, s.addr.to_string());
        assert!(seen[0].user_agent.starts_with("weir-health-check/"));
    }
    let check = "{type: http, host: example.internal}";
    assert_eq!(run(s.addr, check).await, Ok(()));
    assert_eq!(s.seen.lock().unwrap()[1].host, "example.internal");

    s.status.store(500, Ordering::Relaxed);
    let f = run(s.addr, "type: http").await.unwrap_err();
    assert_eq!(f.kind, FailureKind::BadStatus);
    assert_eq!(f.detail, "status 500, expected 200-399");
    // ...unless 500 is what the check expects.
    assert_eq!(
        run(s.addr, "{type: http, expect_status: \"500\"}").await,
        Ok(())
    );
    s.status.store(404, Ordering::Relaxed);
    assert_eq!(
        kind(run(s.addr, "type: http").await),
        FailureKind::BadStatus
    );

    // Something that does not speak HTTP.
    s.status.store(0, Ordering::Relaxed);
    assert_eq!(
        kind(run(s.addr, "type: http").await),
        FailureKind::BadResponse
    );
    assert_eq!(
        kind(run(closed_port().await, "type: http").await),
        FailureKind::Refused
    );
    // A server that accepts and never answers: the timeout.
    let hang = tcp_server(|_| None).await;
    assert_eq!(
        kind(run(hang, "{type: http, interval: 100ms}").await),
        FailureKind::Timeout
    );
}

/// A CA and a server certificate it signed for `names`.
struct Pki {
    ca_pem: String,
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

fn pki(names: &[&str]) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "weir test CA");
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(ToString::to_string).collect();
    let cert = CertificateParams::new(names)
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    Pki {
        ca_pem: ca.pem(),
        cert: cert.der().clone(),
        key: PrivatePkcs8KeyDer::from(key.serialize_der()),
    }
}

fn tls_server_config(p: &Pki) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![p.cert.clone()],
            PrivateKeyDer::Pkcs8(p.key.clone_key()),
        )
        .unwrap();
    Arc::new(config)
}

#[tokio::test]
async fn https_without_a_ca_accepts_any_certificate() {
    let p = pki(&["backend.weir.test"]);
    let s = http_server(Some(tls_server_config(&p))).await;
    assert_eq!(run(s.addr, "{type: https, path: /ready}").await, Ok(()));
    // host is the Host header and the SNI.
    assert_eq!(
        run(s.addr, "{type: https, host: backend.weir.test}").await,
        Ok(())
    );
    let seen = s.seen.lock().unwrap().clone();
    assert_eq!(seen[0].path, "/ready");
    assert_eq!(seen[0].sni, None, "no SNI for an address");
    assert_eq!(seen[1].host, "backend.weir.test");
    assert_eq!(seen[1].sni.as_deref(), Some("backend.weir.test"));
    s.status.store(503, Ordering::Relaxed);
    assert_eq!(
        kind(run(s.addr, "type: https").await),
        FailureKind::BadStatus
    );
    // https against a plain HTTP server fails the handshake.
    let plain = http_server(None).await;
    assert_eq!(kind(run(plain.addr, "type: https").await), FailureKind::Tls);
}

#[tokio::test]
async fn https_with_a_ca_verifies_chain_and_name() {
    let p = pki(&["backend.weir.test"]);
    let other = pki(&["backend.weir.test"]);
    let dir = std::env::temp_dir().join(format!("weir-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (ca, wrong_ca) = (dir.join("ca.pem"), dir.join("other.pem"));
    std::fs::write(&ca, &p.ca_pem).unwrap();
    std::fs::write(&wrong_ca, &other.ca_pem).unwrap();
    let s = http_server(Some(tls_server_config(&p))).await;
    let check = |ca: &std::path::Path, host: &str| {
        format!("{{type: https, host: {host}, ca_file: {}}}", ca.display())
    };

    assert_eq!(run(s.addr, &check(&ca, "backend.weir.test")).await, Ok(()));
    let f = run(s.addr, &check(&wrong_ca, "backend.weir.test"))
        .await
        .unwrap_err();
    assert_eq!(f.kind, FailureKind::Tls);
    assert!(f.detail.contains("invalid peer certificate"), "{f}");
    let f = run(s.addr, &check(&ca, "elsewhere.weir.test"))
        .await
        .unwrap_err();
    assert_eq!(f.kind, FailureKind::Tls);
    assert!(f.detail.contains("not valid for name"), "{f}");

    // A rotated CA file is read again.
    std::fs::write(&ca, &other.ca_pem).unwrap();
    let f = run(s.addr, &check(&ca, "backend.weir.test")).await;
    assert_eq!(kind(f), FailureKind::Tls);
    std::fs::remove_dir_all(&dir).unwrap();
    let f = run(s.addr, &check(&ca, "backend.weir.test"))
        .await
        .unwrap_err();
    assert!(f.detail.starts_with("CA file"), "{f}");
}

#[tokio::test]
async fn tcp_probes_leave_no_time_wait_behind() {
    let up = tcp_server(|_| Some(b"hi".to_vec())).await;
    for _ in 0..20 {
        assert_eq!(run(up, "{type: tcp, handshake: full}").await, Ok(()));
    }
    // The probe side closed with a reset: no TIME_WAIT towards the server's port.
    let port = format!(":{:04X}", up.port());
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let time_wait = tcp
        .lines()
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[2].ends_with(&port) && f[3] == "06"
        })
        .count();
    assert_eq!(time_wait, 0, "{tcp}");
    let _ = TcpStream::connect(up).await.unwrap();
}

#[test]
fn a_probe_future_stays_small() {
    // Every probe allocates its future: the large checkers are boxed behind it.
    let prober = Prober::new();
    let p = probe("type: ping");
    let target: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let size = size_of_val(&prober.probe(target, &p));
    assert!(size <= 1024, "{size} bytes");
}

/// Found by fuzzing: httparse takes any three digits, and `HTTP/1.1 000` was read as status 0
/// (then reported as a status outside the expected range); a code below 100 is no response.
#[test]
fn a_status_below_100_is_not_an_http_response() {
    let f = http_status(b"HTTP/1.1 000 OK\r\n").unwrap_err();
    assert_eq!(f.kind, FailureKind::BadResponse);
    assert!(f.detail.contains("status 000"), "{f}");
    assert_eq!(
        http_status(b"HTTP/1.1 204 No Content\r\n").ok(),
        Some(Some(204))
    );
    assert_eq!(http_status(b"HTTP/1.1 2").ok(), Some(None), "read more");
}
