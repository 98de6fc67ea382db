//! Clients for the lab: real sockets, made inside a namespace by the caller (`Netns::run_in`).

use std::{
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use socket2::{Domain, Socket, Type};

/// A finished HTTP exchange.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub backend: String,
    pub body: Vec<u8>,
    /// The client's address and port of the connection.
    pub local: SocketAddr,
}

/// A TCP connection from `local` (port 0: any) to `dst`.
pub fn connect(
    local: Option<SocketAddr>,
    dst: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let s = Socket::new(Domain::for_address(dst), Type::STREAM, None)?;
    if let Some(l) = local {
        s.set_reuse_address(true)?;
        s.bind(&l.into())?;
    }
    s.connect_timeout(&dst.into(), timeout)?;
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(s)
}

/// Waits (up to `timeout`) until no TCP socket of this thread's network namespace holds a
/// local port of `ports` in a state that keeps `bind` from reusing it (anything but
/// TIME_WAIT, which SO_REUSEADDR overrides): a connection still closing — its last ACK or a
/// retransmitted FIN on the way — finishes before its port is used again. Call it inside
/// `Netns::run_in`.
pub fn wait_ports_free(ports: std::ops::Range<u16>, timeout: Duration) -> io::Result<()> {
    const TIME_WAIT: &str = "06";
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let mut busy = Vec::new();
        for table in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
            let text = std::fs::read_to_string(table)?;
            for line in text.lines().skip(1) {
                let f: Vec<&str> = line.split_whitespace().collect();
                let (Some(local), Some(state)) = (f.get(1), f.get(3)) else {
                    continue;
                };
                let port = local
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok());
                if let Some(p) = port
                    && ports.contains(&p)
                    && *state != TIME_WAIT
                {
                    busy.push((p, state.to_string()));
                }
            }
        }
        if busy.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(io::Error::other(format!(
                "ports still held (port, TCP state): {busy:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `GET path` over a new connection.
pub fn http_get(
    local: Option<SocketAddr>,
    dst: SocketAddr,
    path: &str,
    timeout: Duration,
) -> io::Result<Response> {
    http_request(local, dst, "GET", path, None, timeout)
}

/// `method path` with an optional JSON body over a new connection.
pub fn http_request(
    local: Option<SocketAddr>,
    dst: SocketAddr,
    method: &str,
    path: &str,
    json: Option<&str>,
    timeout: Duration,
) -> io::Result<Response> {
    let body = json.map(|b| ("application/json", b.as_bytes()));
    http_send(local, dst, method, path, body, timeout)
}

/// `POST path` with `body` (`application/octet-stream`) over a new connection.
pub fn http_post(
    local: Option<SocketAddr>,
    dst: SocketAddr,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> io::Result<Response> {
    http_send(
        local,
        dst,
        "POST",
        path,
        Some(("application/octet-stream", body)),
        timeout,
    )
}

/// `method path` with an optional (content type, body) over a new connection.
fn http_send(
    local: Option<SocketAddr>,
    dst: SocketAddr,
    method: &str,
    path: &str,
    body: Option<(&str, &[u8])>,
    timeout: Duration,
) -> io::Result<Response> {
    let mut s = connect(local, dst, timeout)?;
    let local = s.local_addr()?;
    match body {
        None => write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: weir-lab\r\nConnection: close\r\n\r\n"
        )?,
        Some((kind, body)) => {
            write!(
                s,
                "{method} {path} HTTP/1.1\r\nHost: weir-lab\r\nConnection: close\r\n\
                 Content-Type: {kind}\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )?;
            s.write_all(body)?;
        }
    }
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| io::Error::other("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let body = raw[split + 4..].to_vec();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line: {head}")))?;
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    let backend = header("x-backend").unwrap_or_default();
    if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        return Ok(Response {
            status,
            backend,
            body: dechunk(&body)?,
            local,
        });
    }
    let len: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::other("no Content-Length"))?;
    if body.len() != len {
        return Err(io::Error::other(format!(
            "body has {} bytes, header says {len}",
            body.len()
        )));
    }
    Ok(Response {
        status,
        backend,
        body,
        local,
    })
}

/// The body of a `Transfer-Encoding: chunked` message.
fn dechunk(mut raw: &[u8]) -> io::Result<Vec<u8>> {
    let bad = |what: &str| io::Error::other(format!("bad chunked body: {what}"));
    let mut body = Vec::new();
    loop {
        let eol = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| bad("no chunk size line"))?;
        let line = std::str::from_utf8(&raw[..eol]).map_err(|_| bad("size line"))?;
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| bad(line))?;
        raw = &raw[eol + 2..];
        if size == 0 {
            return Ok(body);
        }
        if raw.len() < size + 2 {
            return Err(bad("truncated chunk"));
        }
        body.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

/// A long-lived connection in the servers' ECHO mode.
pub struct Echo {
    pub backend: String,
    pub local: SocketAddr,
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Echo {
    pub fn open(dst: SocketAddr, timeout: Duration) -> io::Result<Self> {
        Self::open_from(None, dst, timeout)
    }

    /// The same from local address `local` (bound with SO_REUSEADDR).
    pub fn open_from(
        local: Option<SocketAddr>,
        dst: SocketAddr,
        timeout: Duration,
    ) -> io::Result<Self> {
        let mut stream = connect(local, dst, timeout)?;
        stream.write_all(b"ECHO\n")?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let backend = line
            .trim_end()
            .strip_prefix("backend=")
            .ok_or_else(|| io::Error::other(format!("unexpected greeting {line:?}")))?
            .to_string();
        Ok(Self {
            backend,
            local: stream.local_addr()?,
            stream,
            reader,
        })
    }

    /// Asks the backend to send `text` after `after` without anything more from this end,
    /// and waits for it (up to `after` and `timeout`).
    pub fn backend_first(
        &mut self,
        after: Duration,
        text: &str,
        timeout: Duration,
    ) -> io::Result<()> {
        self.stream.set_read_timeout(Some(after + timeout))?;
        writeln!(self.stream, "LATER {} {text}", after.as_millis())?;
        let r = self.read_back(text);
        self.stream.set_read_timeout(Some(timeout))?;
        r
    }

    /// How long a read waits from now on.
    pub fn set_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        self.stream.set_read_timeout(Some(timeout))
    }

    /// Sends a line and reads it back.
    pub fn round_trip(&mut self, text: &str) -> io::Result<()> {
        writeln!(self.stream, "{text}")?;
        self.read_back(text)
    }

    fn read_back(&mut self, text: &str) -> io::Result<()> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
        }
        if line.trim_end() != text {
            return Err(io::Error::other(format!("echoed {line:?}, sent {text:?}")));
        }
        Ok(())
    }
}

/// One UDP request from `local` to `dst`; the reply's backend name and payload.
pub fn udp_request(
    local: SocketAddr,
    dst: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> io::Result<(String, Vec<u8>, SocketAddr)> {
    let s = UdpSocket::bind(local)?;
    s.set_read_timeout(Some(timeout))?;
    udp_exchange(&s, dst, payload)
}

/// One datagram to `dst` on an open socket (one flow for several exchanges) and its echo:
/// as [`udp_request`].
pub fn udp_exchange(
    s: &UdpSocket,
    dst: SocketAddr,
    payload: &[u8],
) -> io::Result<(String, Vec<u8>, SocketAddr)> {
    s.send_to(payload, dst)?;
    let mut buf = [0u8; 65536];
    let (n, from) = s.recv_from(&mut buf)?;
    let text = &buf[..n];
    let space = text
        .iter()
        .position(|b| *b == b' ')
        .ok_or_else(|| io::Error::other("no backend in the reply"))?;
    let backend = String::from_utf8_lossy(&text[..space])
        .trim_start_matches("backend=")
        .to_string();
    Ok((backend, text[space + 1..].to_vec(), from))
}
