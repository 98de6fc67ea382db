//! `weir-lab sockclient`: a client process for the socket hooks' tests. It runs inside a test
//! cgroup (the hooks see a process's sockets by its cgroup, so the test's own threads cannot be
//! the client) and prints one line per exchange:
//! `peer=<getpeername> from=<recvfrom source> reply=<the first line of the answer>`
//! (`peer=-` for an unconnected socket, `from=-` for TCP), or `error=<kind> <message>`.
//!
//! - `tcp ADDR N`: N sockets, each `connect()`, `getpeername()`, `GET /whoami`.
//! - `udp-connected ADDR N`: one connected socket, N datagrams, each answer's source.
//! - `udp ADDR N`: one unconnected socket, N `sendto()`s, each answer's source.
//! - `udp-sockets ADDR N`: N connected sockets, one datagram each.
//! - `udp-hold ADDR N`: one connected socket; a datagram every 100 ms, N times (a long-lived
//!   "connection" whose backend may go away under it, like a log or metrics shipper's): an
//!   unanswered datagram keeps the socket; a socket that fails otherwise (closed under it) is
//!   replaced by a new one.
//! - `rate ADDR SECONDS`: the ClusterIP benchmark's client, pinned to CPU 0: one connection at
//!   a time (`connect()`, `GET /whoami`, the answer to its end, close) for that long; prints
//!   `count=<ok> errors=<failed> p50_ns=<latency> p99_ns=<latency>` of the whole exchange.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

const T: Duration = Duration::from_secs(2);

fn first_line(b: &[u8]) -> String {
    let text = String::from_utf8_lossy(b);
    // An HTTP answer: its body's first line; a datagram: itself.
    let body = text.split("\r\n\r\n").nth(1).unwrap_or(&text);
    body.lines().next().unwrap_or("").trim().to_string()
}

fn tcp(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, T)?;
    s.set_read_timeout(Some(T))?;
    let peer = s.peer_addr()?;
    write!(
        s,
        "GET /whoami HTTP/1.1\r\nHost: sock\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(format!("peer={peer} from=- reply={}", first_line(&out)))
}

fn udp_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let any: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let s = UdpSocket::bind(any)?;
    s.set_read_timeout(Some(T))?;
    Ok(s)
}

fn udp_exchange(s: &UdpSocket, to: Option<SocketAddr>, i: usize) -> std::io::Result<String> {
    let msg = format!("sock-{i}");
    match to {
        Some(a) => s.send_to(msg.as_bytes(), a)?,
        None => s.send(msg.as_bytes())?,
    };
    let mut buf = [0u8; 2048];
    let (n, from) = s.recv_from(&mut buf)?;
    let peer = s
        .peer_addr()
        .map_or_else(|_| "-".to_string(), |p| p.to_string());
    Ok(format!(
        "peer={peer} from={from} reply={}",
        first_line(&buf[..n])
    ))
}

fn line(r: std::io::Result<String>) {
    match r {
        Ok(l) => println!("{l}"),
        Err(e) => println!("error={:?} {e}", e.kind()),
    }
}

/// Runs the client; the exit code.
pub fn run(args: &[String]) -> i32 {
    let (Some(mode), Some(addr), Some(n)) = (
        args.first(),
        args.get(1).and_then(|a| a.parse::<SocketAddr>().ok()),
        args.get(2).and_then(|a| a.parse::<usize>().ok()),
    ) else {
        eprintln!(
            "usage: weir-lab sockclient tcp|udp|udp-connected|udp-sockets|udp-hold ADDR N\n       weir-lab sockclient rate ADDR SECONDS"
        );
        return 2;
    };
    match mode.as_str() {
        "tcp" => (0..n).for_each(|_| line(tcp(addr))),
        "udp" => match udp_socket(addr) {
            Ok(s) => (0..n).for_each(|i| line(udp_exchange(&s, Some(addr), i))),
            Err(e) => line(Err(e)),
        },
        "udp-connected" => match udp_socket(addr).and_then(|s| s.connect(addr).map(|()| s)) {
            Ok(s) => (0..n).for_each(|i| line(udp_exchange(&s, None, i))),
            Err(e) => line(Err(e)),
        },
        "udp-hold" => {
            let connect = || udp_socket(addr).and_then(|s| s.connect(addr).map(|()| s));
            let mut socket = None;
            for i in 0..n {
                match socket.take().map_or_else(connect, Ok) {
                    Ok(s) => {
                        let r = udp_exchange(&s, None, i);
                        let keep = match &r {
                            Ok(_) => true,
                            Err(e) => matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ),
                        };
                        line(r);
                        if keep {
                            socket = Some(s);
                        }
                    }
                    Err(e) => line(Err(e)),
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        "udp-sockets" => (0..n).for_each(|i| {
            line(
                udp_socket(addr)
                    .and_then(|s| s.connect(addr).map(|()| s))
                    .and_then(|s| udp_exchange(&s, None, i)),
            );
        }),
        "rate" => rate(addr, Duration::from_secs(n as u64)),
        other => {
            eprintln!("weir-lab sockclient: unknown mode {other}");
            return 2;
        }
    }
    0
}

/// Connect, request, answer, close, one after the other for `secs`; prints the count and the
/// latency percentiles (see the module's doc).
fn rate(addr: SocketAddr, secs: Duration) {
    crate::bench::packet::pin_to_cpu(0);
    let mut lat: Vec<u64> = Vec::with_capacity(1 << 20);
    let mut errors = 0u64;
    let mut first_error = None;
    let end = std::time::Instant::now() + secs;
    let mut buf = Vec::with_capacity(256);
    while std::time::Instant::now() < end {
        let start = std::time::Instant::now();
        let r = (|| {
            let mut s = TcpStream::connect_timeout(&addr, T)?;
            s.set_read_timeout(Some(T))?;
            s.write_all(b"GET /whoami HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
            buf.clear();
            s.read_to_end(&mut buf)?;
            if buf.starts_with(b"HTTP/1.1 200") {
                Ok(())
            } else {
                Err(std::io::Error::other("not a 200 answer"))
            }
        })();
        match r {
            Ok(()) => lat.push(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)),
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    lat.sort_unstable();
    let pct = |p: usize| lat.get(lat.len() * p / 100).copied().unwrap_or(0);
    println!(
        "count={} errors={errors} p50_ns={} p99_ns={}",
        lat.len(),
        pct(50),
        pct(99)
    );
    if let Some(e) = first_error {
        eprintln!("first error: {e}");
    }
}

/// One exchange as `weir-lab sockclient` prints it.
#[derive(Debug)]
pub struct Exchange {
    /// `getpeername()` (`-` for an unconnected socket).
    pub peer: String,
    /// The answer's source (`-` for TCP).
    pub from: String,
    /// The backend that answered.
    pub backend: String,
    /// The client as the backend saw it (TCP's `/whoami`; `-` for UDP).
    pub seen_as: String,
}

/// Runs `weir-lab sockclient MODE TO N` in cgroup `cg` in namespace `ns` (`bin`: the weir-lab
/// binary): its exchanges, every one of which must succeed.
pub fn exchanges(
    cg: &crate::cgroup::TestCgroup,
    ns: &crate::netns::Netns,
    bin: &std::path::Path,
    mode: &str,
    to: &str,
    n: usize,
) -> Vec<Exchange> {
    let out = cg.output(ns, bin, &["sockclient", mode, to, &n.to_string()]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), n, "{mode} {to}: {out}");
    lines
        .iter()
        .map(|l| {
            let fields: Vec<(&str, &str)> = l
                .split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .collect();
            // peer= from= reply=backend=NAME [peer=SEEN]
            let field = |k: &str, nth: usize| {
                fields
                    .iter()
                    .filter(|(key, _)| *key == k)
                    .nth(nth)
                    .map(|(_, v)| (*v).to_string())
            };
            let must =
                |k: &str| field(k, 0).unwrap_or_else(|| panic!("{mode} {to}: no {k} in {l:?}"));
            Exchange {
                peer: must("peer"),
                from: must("from"),
                backend: must("reply")
                    .strip_prefix("backend=")
                    .unwrap_or_else(|| panic!("{mode} {to}: no backend in {l:?}"))
                    .to_string(),
                seen_as: field("peer", 1).unwrap_or_else(|| "-".into()),
            }
        })
        .collect()
}

/// Exchanges per backend.
pub fn spread(x: &[Exchange]) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for e in x {
        *m.entry(e.backend.clone()).or_default() += 1;
    }
    m
}
