//! The backends' servers (`weir-lab serve`), real sockets all:
//! - HTTP/1.1 over TCP, and over TLS (a self-signed certificate made at start, for
//!   `backend.weir.test` and the listening addresses): `GET /<anything>` answers
//!   `backend=<name> path=<path>`; `GET /bytes/<n>` answers n bytes of a known pattern;
//!   `GET /_stats` answers the counters; `GET /healthz` answers the health status (200 unless
//!   told otherwise). A connection that starts with `ECHO\n` instead gets `backend=<name>\n`
//!   and then every line echoed back until it closes (a long-lived connection); a line
//!   `LATER <ms> <text>` is answered with `<text>` only after `ms` milliseconds (the backend
//!   speaks first after the connection sat idle).
//! - TCP: accepts and closes (`--tcp`).
//! - UDP echo: answers `backend=<name> ` followed by the datagram.
//! - SCTP over raw sockets: INIT → INIT-ACK whose State Cookie is `backend=<name>`; an INIT to
//!   another port of the address gets an ABORT, as from an SCTP stack with nothing listening.
//!
//! Health-check requests (User-Agent `weir-health-check/…`) are counted apart from the others.
//! Tests steer the server through `GET /_control/…`:
//! - `/_control/healthz/<codes>`: `/healthz` answers these statuses in turn, e.g. `500` or
//!   `500,200` (a flapping backend: one per request);
//! - `/_control/udp/<echo|garbage|silent>`: how UDP datagrams are answered.

use std::{
    io::{self, BufRead as _, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering},
    },
    thread,
};

use socket2::{Domain, Socket, Type};

#[derive(Default)]
pub struct Counters {
    pub connections: AtomicU64,
    pub requests: AtomicU64,
    pub checks: AtomicU64,
    pub udp: AtomicU64,
    pub sctp_inits: AtomicU64,
}

impl Counters {
    fn text(&self) -> String {
        format!(
            "connections={} requests={} checks={} udp={} sctp_inits={}\n",
            self.connections.load(Ordering::Relaxed),
            self.requests.load(Ordering::Relaxed),
            self.checks.load(Ordering::Relaxed),
            self.udp.load(Ordering::Relaxed),
            self.sctp_inits.load(Ordering::Relaxed)
        )
    }
}

const UDP_ECHO: u8 = 0;
const UDP_GARBAGE: u8 = 1;
const UDP_SILENT: u8 = 2;

/// What the tests steer.
struct Control {
    /// Statuses `/healthz` answers, in turn.
    healthz: Mutex<Vec<u16>>,
    turn: AtomicUsize,
    udp: AtomicU8,
}

impl Default for Control {
    fn default() -> Self {
        Self {
            healthz: Mutex::new(vec![200]),
            turn: AtomicUsize::new(0),
            udp: AtomicU8::new(UDP_ECHO),
        }
    }
}

impl Control {
    fn healthz(&self) -> u16 {
        let codes = self
            .healthz
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let i = self.turn.fetch_add(1, Ordering::Relaxed);
        codes.get(i % codes.len().max(1)).copied().unwrap_or(200)
    }

    /// Handles `/_control/<what>/<value>`; the reply body, or None for an unknown command.
    fn apply(&self, command: &str) -> Option<String> {
        let (what, value) = command.split_once('/')?;
        match what {
            "healthz" => {
                let codes: Vec<u16> = value
                    .split(',')
                    .map(|c| c.parse().ok().filter(|c| (100..600).contains(c)))
                    .collect::<Option<_>>()?;
                if codes.is_empty() {
                    return None;
                }
                *self
                    .healthz
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = codes;
                self.turn.store(0, Ordering::Relaxed);
            }
            "udp" => self.udp.store(
                match value {
                    "echo" => UDP_ECHO,
                    "garbage" => UDP_GARBAGE,
                    "silent" => UDP_SILENT,
                    _ => return None,
                },
                Ordering::Relaxed,
            ),
            _ => return None,
        }
        Some(format!("ok {what}={value}\n"))
    }
}

/// The byte at `i` of a `/bytes/<n>` body.
pub fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

/// The name in the HTTPS servers' certificate.
pub const TLS_NAME: &str = "backend.weir.test";

#[derive(Clone, Debug, Default)]
pub struct ServeArgs {
    pub name: String,
    pub http: Vec<SocketAddr>,
    pub https: Vec<SocketAddr>,
    /// HTTP answered by a few threads in turn, without ECHO connections (many short
    /// connections a second).
    pub http_pool: Vec<SocketAddr>,
    /// Accept-and-close listeners (one thread each: many connections a second, cheaply).
    pub tcp: Vec<SocketAddr>,
    pub udp: Vec<SocketAddr>,
    pub sctp: Vec<SocketAddr>,
}

impl ServeArgs {
    /// `--name N --http ADDR --https ADDR --tcp ADDR --udp ADDR --sctp ADDR` (address flags
    /// repeatable).
    pub fn parse(args: &[String]) -> Result<Self, String> {
        let mut a = Self::default();
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let value = it.next().ok_or(format!("{flag} needs a value"))?;
            let addr = || {
                value
                    .parse::<SocketAddr>()
                    .map_err(|e| format!("{flag} {value}: {e}"))
            };
            match flag.as_str() {
                "--name" => a.name.clone_from(value),
                "--http" => a.http.push(addr()?),
                "--https" => a.https.push(addr()?),
                "--http-pool" => a.http_pool.push(addr()?),
                "--tcp" => a.tcp.push(addr()?),
                "--udp" => a.udp.push(addr()?),
                "--sctp" => a.sctp.push(addr()?),
                _ => return Err(format!("unknown flag {flag}")),
            }
        }
        if a.name.is_empty() {
            return Err("--name is required".into());
        }
        Ok(a)
    }
}

struct Shared {
    name: String,
    counters: Counters,
    control: Control,
}

/// Binds everything (failing early), prints `ready`, then serves until killed.
pub fn serve(args: ServeArgs) -> io::Result<()> {
    let shared = Arc::new(Shared {
        name: args.name.clone(),
        counters: Counters::default(),
        control: Control::default(),
    });
    let mut threads = Vec::new();
    for addr in &args.http {
        let l = tcp_listener(*addr)?;
        let s = shared.clone();
        threads.push(thread::spawn(move || {
            for conn in l.incoming().flatten() {
                let s = s.clone();
                thread::spawn(move || http_close(conn, &s));
            }
        }));
    }
    // Many short requests a second: a few threads that accept and answer in turn.
    for addr in &args.http_pool {
        let l = tcp_listener(*addr)?;
        for _ in 0..4 {
            let (l, s) = (l.try_clone()?, shared.clone());
            threads.push(thread::spawn(move || {
                for conn in l.incoming().flatten() {
                    http_close(conn, &s);
                }
            }));
        }
    }
    for addr in &args.tcp {
        let l = tcp_listener(*addr)?;
        let s = shared.clone();
        threads.push(thread::spawn(move || {
            for conn in l.incoming().flatten() {
                s.counters.connections.fetch_add(1, Ordering::Relaxed);
                drop(conn);
            }
        }));
    }
    if !args.https.is_empty() {
        let config = tls_config(&args.https)?;
        for addr in &args.https {
            let l = tcp_listener(*addr)?;
            let (s, config) = (shared.clone(), config.clone());
            threads.push(thread::spawn(move || {
                for conn in l.incoming().flatten() {
                    let (s, config) = (s.clone(), config.clone());
                    thread::spawn(move || {
                        let Ok(tls) = rustls::ServerConnection::new(config) else {
                            return;
                        };
                        let peer = conn.peer_addr().ok();
                        if let Ok(mut out) =
                            http_conn(rustls::StreamOwned::new(tls, conn), peer, &s)
                        {
                            out.conn.send_close_notify();
                            let _ = out.flush();
                        }
                    });
                }
            }));
        }
    }
    for addr in &args.udp {
        let sock = udp_socket(*addr)?;
        // On a wildcard address, answer from the address that was asked.
        let wildcard = addr.ip().is_unspecified() && addr.is_ipv4();
        if wildcard {
            pktinfo::enable(&sock)?;
        }
        let s = shared.clone();
        threads.push(thread::spawn(move || {
            let mut buf = [0u8; 65536];
            loop {
                let (n, from, to) = if wildcard {
                    match pktinfo::recv(&sock, &mut buf) {
                        Ok((n, from, to)) => (n, from, Some(to)),
                        Err(_) => break,
                    }
                } else {
                    match sock.recv_from(&mut buf) {
                        Ok((n, from)) => (n, from, None),
                        Err(_) => break,
                    }
                };
                s.counters.udp.fetch_add(1, Ordering::Relaxed);
                let reply = match s.control.udp.load(Ordering::Relaxed) {
                    UDP_SILENT => continue,
                    UDP_GARBAGE => b"garbage".to_vec(),
                    _ => {
                        let mut r = format!("backend={} ", s.name).into_bytes();
                        match udp_send_request(&buf[..n]) {
                            // `SEND <n>`: n bytes of `pattern` (larger than the MTU: the
                            // stack fragments the reply).
                            Some(len) => r.extend((0..len).map(pattern)),
                            None => r.extend_from_slice(&buf[..n]),
                        }
                        r
                    }
                };
                let _ = match to {
                    Some(local) => pktinfo::send(&sock, &reply, from, local),
                    None => sock.send_to(&reply, from),
                };
            }
        }));
    }
    for addr in &args.sctp {
        // Fail early if the raw socket cannot be made.
        drop(crate::sctp::raw_socket(addr.ip())?);
        let (s, addr) = (shared.clone(), *addr);
        threads.push(thread::spawn(move || {
            let r = crate::sctp::respond(addr.ip(), addr.port(), &s.name, || {
                s.counters.sctp_inits.fetch_add(1, Ordering::Relaxed);
            });
            eprintln!("sctp responder on {addr}: {r:?}");
        }));
    }
    println!("ready");
    let _ = io::stdout().flush();
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// The length asked for by a UDP `SEND <n>` request (at most 60000).
fn udp_send_request(payload: &[u8]) -> Option<usize> {
    let n: usize = std::str::from_utf8(payload.strip_prefix(b"SEND ")?)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(n.min(60000))
}

/// IPv4 UDP on a wildcard address: receive with the destination address (IP_PKTINFO) and
/// answer from it.
mod pktinfo {
    use std::{
        io,
        mem::{size_of, zeroed},
        net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
        os::fd::AsRawFd as _,
    };

    pub fn enable(s: &UdpSocket) -> io::Result<()> {
        let on: libc::c_int = 1;
        // SAFETY: setsockopt with an int option.
        let r = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_PKTINFO,
                (&raw const on).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// (length, source, destination address).
    pub fn recv(s: &UdpSocket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Ipv4Addr)> {
        // SAFETY: recvmsg into buffers that outlive the call; the control messages are read
        // with the CMSG macros within the length the kernel reports.
        unsafe {
            let mut from: libc::sockaddr_in = zeroed();
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            let mut control = [0u64; 16];
            let mut msg: libc::msghdr = zeroed();
            msg.msg_name = (&raw mut from).cast();
            msg.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            msg.msg_iov = &raw mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = size_of_val(&control);
            let n = libc::recvmsg(s.as_raw_fd(), &raw mut msg, 0);
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut to = Ipv4Addr::UNSPECIFIED;
            let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::IPPROTO_IP && (*c).cmsg_type == libc::IP_PKTINFO {
                    let info = libc::CMSG_DATA(c)
                        .cast::<libc::in_pktinfo>()
                        .read_unaligned();
                    to = Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr));
                }
                c = libc::CMSG_NXTHDR(&raw const msg, c);
            }
            let src = SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(from.sin_addr.s_addr)),
                u16::from_be(from.sin_port),
            );
            Ok((n as usize, src.into(), to))
        }
    }

    pub fn send(s: &UdpSocket, data: &[u8], to: SocketAddr, from: Ipv4Addr) -> io::Result<usize> {
        let SocketAddr::V4(to) = to else {
            return s.send_to(data, to);
        };
        // SAFETY: sendmsg from buffers that outlive the call; one IP_PKTINFO control message
        // written with the CMSG macros into a buffer large enough for it.
        unsafe {
            let mut dst: libc::sockaddr_in = zeroed();
            dst.sin_family = libc::AF_INET as libc::sa_family_t;
            dst.sin_port = to.port().to_be();
            dst.sin_addr.s_addr = u32::from(*to.ip()).to_be();
            let mut iov = libc::iovec {
                iov_base: data.as_ptr() as *mut _,
                iov_len: data.len(),
            };
            let mut control = [0u64; 8];
            let mut msg: libc::msghdr = zeroed();
            msg.msg_name = (&raw mut dst).cast();
            msg.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            msg.msg_iov = &raw mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(size_of::<libc::in_pktinfo>() as u32) as usize;
            let c = libc::CMSG_FIRSTHDR(&raw const msg);
            (*c).cmsg_level = libc::IPPROTO_IP;
            (*c).cmsg_type = libc::IP_PKTINFO;
            (*c).cmsg_len = libc::CMSG_LEN(size_of::<libc::in_pktinfo>() as u32) as usize;
            let mut info: libc::in_pktinfo = zeroed();
            info.ipi_spec_dst.s_addr = u32::from(from).to_be();
            libc::CMSG_DATA(c)
                .cast::<libc::in_pktinfo>()
                .write_unaligned(info);
            let n = libc::sendmsg(s.as_raw_fd(), &raw const msg, 0);
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        }
    }
}

/// A self-signed certificate for [`TLS_NAME`] and the listening addresses.
fn tls_config(addrs: &[SocketAddr]) -> io::Result<Arc<rustls::ServerConfig>> {
    let mut names = vec![TLS_NAME.to_string()];
    names.extend(addrs.iter().map(|a| a.ip().to_string()));
    let key = rcgen::generate_simple_self_signed(names).map_err(io::Error::other)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let der = rustls::pki_types::PrivatePkcs8KeyDer::from(key.signing_key.serialize_der());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(vec![key.cert.der().clone()], der.into())
        .map_err(io::Error::other)?;
    Ok(Arc::new(config))
}

fn tcp_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

fn udp_socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// Serves one plain connection and closes it.
fn http_close(conn: std::net::TcpStream, s: &Shared) {
    let peer = conn.peer_addr().ok();
    if let Ok(c) = conn.try_clone()
        && let Ok(mut out) = http_conn(conn, peer, s)
    {
        // The server closes first, so TIME_WAIT stays here and clients can reuse their ports.
        let _ = out.flush();
        let _ = c.shutdown(std::net::Shutdown::Write);
        let _ = (&c).read_to_end(&mut Vec::new());
    }
}

/// Serves one connection from `peer`; returns the stream for the caller to close.
fn http_conn<S: Read + Write>(conn: S, peer: Option<SocketAddr>, s: &Shared) -> io::Result<S> {
    let c = &s.counters;
    c.connections.fetch_add(1, Ordering::Relaxed);
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    r.read_line(&mut line)?;
    if line.trim_end() == "ECHO" {
        let greeting = format!("backend={}\n", s.name);
        r.get_mut().write_all(greeting.as_bytes())?;
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 {
                return Ok(r.into_inner());
            }
            if let Some((ms, text)) = line
                .strip_prefix("LATER ")
                .and_then(|rest| rest.split_once(' '))
                .and_then(|(ms, text)| Some((ms.parse::<u64>().ok()?, text.to_string())))
            {
                thread::sleep(std::time::Duration::from_millis(ms));
                line = text;
            }
            r.get_mut().write_all(line.as_bytes())?;
            r.get_mut().flush()?;
        }
    }
    let mut check = false;
    let mut content_length = 0usize;
    let mut h = String::new();
    while r.read_line(&mut h)? > 2 {
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("user-agent") {
                check = v.trim().starts_with("weir-health-check");
            } else if k.eq_ignore_ascii_case("content-length") {
                content_length = v.trim().parse().unwrap_or(0);
            }
        }
        h.clear();
    }
    if check { &c.checks } else { &c.requests }.fetch_add(1, Ordering::Relaxed);
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (status, body): (u16, Vec<u8>) = if path == "/_stats" {
        (200, c.text().into_bytes())
    } else if let Some(cmd) = path.strip_prefix("/_control/") {
        match s.control.apply(cmd) {
            Some(ok) => (200, ok.into_bytes()),
            None => (400, format!("unknown control {cmd}\n").into_bytes()),
        }
    } else if path == "/whoami" {
        // The connection's source as this backend sees it (the client, or the node that
        // source-NATed it).
        let peer = peer.map_or_else(|| "unknown".to_string(), |p| p.to_string());
        (
            200,
            format!("backend={} peer={peer}\n", s.name).into_bytes(),
        )
    } else if path == "/healthz" {
        let code = s.control.healthz();
        (
            code,
            format!("backend={} healthz={code}\n", s.name).into_bytes(),
        )
    } else if path == "/upload" {
        // A body of `pattern` bytes: how many arrived, and how many differ from the pattern.
        let mut body = vec![0u8; content_length.min(1 << 24)];
        r.read_exact(&mut body)?;
        let wrong = body
            .iter()
            .enumerate()
            .filter(|(i, b)| **b != pattern(*i))
            .count();
        (
            200,
            format!("backend={} received={} wrong={wrong}\n", s.name, body.len()).into_bytes(),
        )
    } else if let Some(n) = path.strip_prefix("/bytes/") {
        let n: usize = n.parse().unwrap_or(0).min(1 << 24);
        (200, (0..n).map(pattern).collect())
    } else {
        (
            200,
            format!("backend={} path={path}\n", s.name).into_bytes(),
        )
    };
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Length: {}\r\nX-Backend: {}\r\nConnection: close\r\n\r\n",
        if status < 400 { "OK" } else { "Error" },
        body.len(),
        s.name
    );
    let mut out = r.into_inner();
    out.write_all(head.as_bytes())?;
    out.write_all(&body)?;
    Ok(out)
}
