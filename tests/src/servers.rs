//! The backends' servers (`weir-lab serve`), real sockets all:
//! - HTTP/1.1 over TCP: `GET /<anything>` answers `backend=<name> path=<path>`;
//!   `GET /bytes/<n>` answers n bytes of a known pattern; `GET /_stats` answers the counters.
//!   A connection that starts with `ECHO\n` instead gets `backend=<name>\n` and then every line
//!   echoed back until it closes (a long-lived connection for reload tests).
//! - UDP echo: answers `backend=<name> ` followed by the datagram.
//! - SCTP over raw sockets: INIT → INIT-ACK whose State Cookie is `backend=<name>`.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
};

use socket2::{Domain, Socket, Type};

#[derive(Default)]
pub struct Counters {
    pub connections: AtomicU64,
    pub requests: AtomicU64,
    pub udp: AtomicU64,
    pub sctp_inits: AtomicU64,
}

impl Counters {
    fn text(&self) -> String {
        format!(
            "connections={} requests={} udp={} sctp_inits={}\n",
            self.connections.load(Ordering::Relaxed),
            self.requests.load(Ordering::Relaxed),
            self.udp.load(Ordering::Relaxed),
            self.sctp_inits.load(Ordering::Relaxed)
        )
    }
}

/// The byte at `i` of a `/bytes/<n>` body.
pub fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

#[derive(Clone, Debug, Default)]
pub struct ServeArgs {
    pub name: String,
    pub http: Vec<SocketAddr>,
    pub udp: Vec<SocketAddr>,
    pub sctp: Vec<SocketAddr>,
}

impl ServeArgs {
    /// `--name N --http ADDR --udp ADDR --sctp ADDR` (each address flag repeatable).
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
                "--name" => a.name = value.clone(),
                "--http" => a.http.push(addr()?),
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

/// Binds everything (failing early), prints `ready`, then serves until killed.
pub fn serve(args: ServeArgs) -> std::io::Result<()> {
    let counters = Arc::new(Counters::default());
    let mut threads = Vec::new();
    for addr in &args.http {
        let l = tcp_listener(*addr)?;
        let (name, c) = (args.name.clone(), counters.clone());
        threads.push(thread::spawn(move || {
            for conn in l.incoming().flatten() {
                let (name, c) = (name.clone(), c.clone());
                thread::spawn(move || {
                    let _ = http_conn(conn, &name, &c);
                });
            }
        }));
    }
    for addr in &args.udp {
        let s = udp_socket(*addr)?;
        let (name, c) = (args.name.clone(), counters.clone());
        threads.push(thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                c.udp.fetch_add(1, Ordering::Relaxed);
                let mut reply = format!("backend={name} ").into_bytes();
                reply.extend_from_slice(&buf[..n]);
                let _ = s.send_to(&reply, from);
            }
        }));
    }
    for addr in &args.sctp {
        // Fail early if the raw socket cannot be made.
        drop(crate::sctp::raw_socket(addr.ip())?);
        let (name, c, addr) = (args.name.clone(), counters.clone(), *addr);
        threads.push(thread::spawn(move || {
            let r = crate::sctp::respond(addr.ip(), addr.port(), &name, || {
                c.sctp_inits.fetch_add(1, Ordering::Relaxed);
            });
            eprintln!("sctp responder on {addr}: {r:?}");
        }));
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn tcp_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

fn udp_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&addr.into())?;
    Ok(s.into())
}

fn http_conn(conn: TcpStream, name: &str, c: &Counters) -> std::io::Result<()> {
    c.connections.fetch_add(1, Ordering::Relaxed);
    let mut out = conn.try_clone()?;
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    r.read_line(&mut line)?;
    if line.trim_end() == "ECHO" {
        out.write_all(format!("backend={name}\n").as_bytes())?;
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 {
                return Ok(());
            }
            out.write_all(line.as_bytes())?;
        }
    }
    // Skip the headers.
    let mut h = String::new();
    while r.read_line(&mut h)? > 2 {
        h.clear();
    }
    c.requests.fetch_add(1, Ordering::Relaxed);
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let body: Vec<u8> = if path == "/_stats" {
        c.text().into_bytes()
    } else if let Some(n) = path.strip_prefix("/bytes/") {
        let n: usize = n.parse().unwrap_or(0).min(1 << 24);
        (0..n).map(pattern).collect()
    } else {
        format!("backend={name} path={path}\n").into_bytes()
    };
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Backend: {name}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    out.write_all(head.as_bytes())?;
    out.write_all(&body)?;
    out.flush()?;
    // The server closes first, so TIME_WAIT stays here and clients can reuse their ports.
    out.shutdown(std::net::Shutdown::Write)?;
    let mut rest = Vec::new();
    let _ = r.read_to_end(&mut rest);
    Ok(())
}
