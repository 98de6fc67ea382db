//! Health checks: how fast a dead backend stops getting new flows, and what probing costs.
//!
//! **Time to prune.** The standalone lab (client, LB node, three backends) with the agent and
//! one service, `web`, checked by `http GET /healthz`. The client opens new TCP connections to
//! the VIP without pause (a non-blocking connect every 500 µs: ~2000 new flows a second, a
//! third of them to b1). `lab_syn` on b1's interface notes the CLOCK_MONOTONIC time of every
//! SYN that reaches b1, before b1's own stack and firewall. Each trial waits a random part of
//! the check interval (so the failure lands anywhere in the probe cycle), then fails b1 — its
//! server SIGKILLed, or an nftables rule dropping everything it receives — and measures from
//! that moment to the last SYN b1 received: the last new flow weir sent it. Then b1 is
//! repaired and the next trial waits until weir has it back.
//!
//! **Probe cost.** The agent checking 1000 backends (1000 addresses of one "farm" namespace)
//! every 100 ms: its CPU time (user + system, from /proc) over a 10 s window, against the same
//! agent and backends with no checks.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use socket2::{Domain, Socket, Type};

use crate::{
    agent::{Agent, backend_entry, wait_for},
    lab::{HTTP_PORT, Lab, Proc, Scratch, VIP_V4},
    netns::{Netns, veth},
    xdp::LabXdp,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    Kill,
    Drop,
}

impl Failure {
    pub fn name(self) -> &'static str {
        match self {
            Self::Kill => "server SIGKILLed",
            Self::Drop => "all packets dropped (nftables)",
        }
    }
}

pub struct Profile {
    pub name: &'static str,
    /// The check block's fields.
    pub check: &'static str,
    pub interval: Duration,
}

pub const PROFILES: [Profile; 2] = [
    Profile {
        name: "defaults (interval 1s, timeout 500ms, fall 2)",
        check: "type: http, path: /healthz",
        interval: Duration::from_secs(1),
    },
    Profile {
        name: "fast (interval 100ms, timeout 80ms, fall 3)",
        check: "type: http, path: /healthz, interval: 100ms, timeout: 80ms, fall: 3",
        interval: Duration::from_millis(100),
    },
];

pub struct PruneRow {
    pub profile: &'static str,
    pub failure: Failure,
    /// Failure → last new flow at the backend, per trial (ms).
    pub prune_ms: Vec<f64>,
    /// Failure → the admin API showing the backend down, per trial (ms; polled every 5 ms).
    pub detect_ms: Vec<f64>,
    /// New flows a second the client offered during the trials.
    pub flows_per_s: f64,
}

pub struct CpuRow {
    pub check: &'static str,
    pub backends: usize,
    pub interval: &'static str,
    /// Backends passing their check at the end (all of them, unless the farm fell behind).
    pub passing: usize,
    /// Agent CPU, percent of one core: user and system time.
    pub user_percent: f64,
    pub system_percent: f64,
    /// Probes a second the agent completed in the window.
    pub probes_per_s: f64,
    /// The same agent and backends without checks.
    pub idle_percent: f64,
    /// A well-known prober doing the same probes: (name, CPU % of one core).
    pub baseline: Option<(&'static str, f64)>,
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// xorshift64*, seeded from the clock: the trials' random phases.
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        Self(monotonic_ns() | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

/// The generator's source addresses: 198.18.0.1 and these.
const CLIENT_ADDRS: std::ops::RangeInclusive<u8> = 2..=200;

/// Opens new TCP connections to `vip` from the client (connect and close at once: one SYN
/// each; from 198.18.0.1 and the [`CLIENT_ADDRS`] in turn) every `every`, until stopped;
/// counts them.
struct Generator {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Generator {
    fn start(client: &Netns, vip: SocketAddr, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let path = format!("/run/netns/{}", client.name());
        let (s, n) = (stop.clone(), sent.clone());
        let thread = std::thread::spawn(move || {
            use std::os::fd::AsRawFd as _;
            let file = std::fs::File::open(&path).expect("client netns");
            // SAFETY: a valid namespace fd; setns affects only this thread.
            let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            let mut next = Instant::now();
            let sources: Vec<SocketAddr> = std::iter::once(1)
                .chain(CLIENT_ADDRS)
                .map(|i| SocketAddr::from(([198, 18, 0, i], 0)))
                .collect();
            let mut turn = 0;
            while !s.load(Ordering::Relaxed) {
                if let Ok(sock) = Socket::new(Domain::IPV4, Type::STREAM, None) {
                    let _ = sock.bind(&sources[turn % sources.len()].into());
                    turn += 1;
                    let _ = sock.set_nonblocking(true);
                    let _ = sock.connect(&vip.into());
                    n.fetch_add(1, Ordering::Relaxed);
                }
                next += every;
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                } else {
                    next = now;
                }
            }
        });
        Self {
            stop,
            sent,
            thread: Some(thread),
        }
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn web_config(lab: &Lab, check: &str) -> String {
    let backends: String = lab
        .backends
        .iter()
        .map(|b| format!("      - {{ address: {}, port: {HTTP_PORT} }}\n", b.v4))
        .collect();
    format!(
        "node:\n  interfaces: [{}]\nservices:\n  - name: web\n    vip: {VIP_V4}\n    port: 80\n    protocol: tcp\n    health_check: {{ {check} }}\n    backends:\n{backends}",
        lab.interfaces().join(", ")
    )
}

fn state(agent: &Agent, lab: &Lab, b: SocketAddr) -> String {
    let v = agent.services(&lab.lb);
    backend_entry(&v, "web", b)["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn prune(profile: &Profile, failure: Failure, trials: usize) -> PruneRow {
    let bin = std::env::current_exe().expect("own path");
    let mut lab = Lab::new(3);
    lab.start_servers(&bin);
    let mut recorder = LabXdp::attach(&lab.backends[0].ns, "eth0", "lab_syn");
    // The client's flows only: the health checks' own connections come from the LB node.
    recorder.syns_from("198.18.0.0/24".parse().expect("client prefix"));
    // The client's flows come from 200 addresses, so that no 5-tuple repeats during the run:
    // a repeated one would follow its connection-table entry (made while b1 was out) instead
    // of Maglev, and b1 would get ever fewer new flows.
    let batch = lab.dir.path.join("client-addrs");
    let text: String = CLIENT_ADDRS
        .map(|i| format!("addr add 198.18.0.{i}/24 dev eth0\n"))
        .collect();
    std::fs::write(&batch, text).expect("batch file");
    lab.client.ip(&format!("-batch {}", batch.display()));
    let mut agent = Agent::start(
        &lab.lb,
        &lab.dir.path,
        Some(&web_config(&lab, profile.check)),
    );
    agent.wait_ready(&lab.lb);
    let b1 = SocketAddr::new(lab.backends[0].v4, HTTP_PORT);
    let vip = SocketAddr::new(VIP_V4.parse().expect("VIP"), 80);
    let generator = Generator::start(&lab.client, vip, Duration::from_micros(500));
    let began = (Instant::now(), generator.sent.load(Ordering::Relaxed));
    let mut rng = Rng::new();
    let mut row = PruneRow {
        profile: profile.name,
        failure,
        prune_ms: Vec::new(),
        detect_ms: Vec::new(),
        flows_per_s: 0.0,
    };
    for trial in 0..trials {
        wait_for(Duration::from_secs(30), "b1 back in rotation", || {
            (state(&agent, &lab, b1) == "up").then_some(())
        });
        // Let b1 take new flows again, then fail it at a random point of the probe cycle.
        std::thread::sleep(Duration::from_millis(200));
        let before = recorder.syns();
        std::thread::sleep(Duration::from_nanos(
            rng.below(profile.interval.as_nanos() as u64),
        ));
        let t0 = match failure {
            Failure::Kill => {
                let t = monotonic_ns();
                lab.kill_server(0);
                t
            }
            Failure::Drop => {
                let ns = &lab.backends[0].ns;
                ns.exec(&["nft", "add table inet weir_bench"]);
                ns.exec(&[
                    "nft",
                    "add chain inet weir_bench input { type filter hook input priority -300 ; policy drop ; }",
                ]);
                monotonic_ns()
            }
        };
        let detected = loop {
            if state(&agent, &lab, b1) == "down" {
                break monotonic_ns();
            }
            assert!(
                monotonic_ns() - t0 < 30_000_000_000,
                "b1 not marked down within 30 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        // New flows keep coming: any straggler to b1 would show now.
        std::thread::sleep(Duration::from_millis(300));
        let (n, last) = recorder.syns();
        assert!(n > before.0, "b1 received no SYN at all in trial {trial}");
        row.prune_ms.push(last.saturating_sub(t0) as f64 / 1e6);
        row.detect_ms.push(detected.saturating_sub(t0) as f64 / 1e6);
        match failure {
            Failure::Kill => lab.start_server(&bin, 0),
            Failure::Drop => {
                lab.backends[0]
                    .ns
                    .exec(&["nft", "delete table inet weir_bench"]);
            }
        }
        eprintln!(
            "bench: health {} / {}: trial {}: pruned after {:.1} ms (API {:.1} ms)",
            profile.name,
            failure.name(),
            trial + 1,
            row.prune_ms.last().unwrap_or(&0.0),
            row.detect_ms.last().unwrap_or(&0.0)
        );
    }
    let sent = generator.sent.load(Ordering::Relaxed) - began.1;
    row.flows_per_s = sent as f64 / began.0.elapsed().as_secs_f64();
    drop(generator);
    drop(agent);
    drop(recorder);
    row
}

/// Time to prune, for each profile and failure.
pub fn run_prune(quick: bool) -> Vec<PruneRow> {
    let trials = if quick { 5 } else { 25 };
    let mut rows = Vec::new();
    for p in &PROFILES {
        for f in [Failure::Kill, Failure::Drop] {
            rows.push(prune(p, f, trials));
        }
    }
    rows
}

/// Agent CPU ticks (user, system) from /proc.
pub(crate) fn cpu_ticks(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime is the 14th field.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (n(11), n(12))
}

pub(crate) fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// The farm: `n` addresses in 198.18.8.0/21 on one namespace behind the LB node, serving HTTP
/// on 8080, accept-and-close TCP on 8081 and UDP echo on 7007 on all of them; the kernel
/// answers ping.
struct Farm {
    _server: Proc,
    addrs: Vec<Ipv4Addr>,
    _farm: Netns,
    lb: Netns,
    dir: Scratch,
}

fn farm_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 8 + (i / 250) as u8, (i % 250 + 1) as u8)
}

impl Farm {
    fn new(n: usize) -> Self {
        let lb = Netns::new("lb");
        let farm = Netns::new("farm");
        veth(&lb, "eth-f", &farm, "eth0");
        lb.ip("addr add 198.18.7.254/24 dev eth-f");
        // Through the farm's own address: one neighbour entry, not a thousand.
        lb.ip("route add 198.18.8.0/21 via 198.18.7.1");
        farm.ip("addr add 198.18.7.1/24 dev eth0");
        farm.ip("route add default via 198.18.7.254");
        farm.sysctl("net.ipv4.icmp_ratelimit", "0");
        // Receive processing on NAPI threads, as a NIC's runs in its interrupt's context: without
        // this, a veth processes the packets the agent sends (and the backends' answers) inside
        // the agent's own system calls, and the agent would be charged for the farm's work.
        // (A veth hands a packet to its peer's NAPI only when the peer has GRO or XDP on and the
        // sender no TSO.)
        farm.exec(&["ethtool", "-K", "eth0", "gro", "on", "tso", "off"]);
        lb.exec(&["ethtool", "-K", "eth-f", "gro", "on", "tso", "off"]);
        farm.exec(&["sh", "-c", "echo 1 > /sys/class/net/eth0/threaded"]);
        lb.exec(&["sh", "-c", "echo 1 > /sys/class/net/eth-f/threaded"]);
        farm.sysctl("net.core.somaxconn", "4096");
        let addrs: Vec<Ipv4Addr> = (0..n).map(farm_addr).collect();
        let dir = Scratch::new();
        let batch = dir.path.join("addrs");
        let text: String = addrs
            .iter()
            .map(|a| format!("addr add {a}/32 dev eth0\n"))
            .collect();
        std::fs::write(&batch, text).expect("batch file");
        farm.ip(&format!("-batch {}", batch.display()));
        let bin = std::env::current_exe().expect("own path");
        let mut cmd = farm.command(bin.to_str().expect("utf-8 path"));
        cmd.args([
            "serve",
            "--name",
            "farm",
            "--http-pool",
            "0.0.0.0:8080",
            "--tcp",
            "0.0.0.0:8081",
            "--udp",
            "0.0.0.0:7007",
        ]);
        Self {
            _server: Proc::spawn_ready(&mut cmd, "farm server"),
            addrs,
            _farm: farm,
            lb,
            dir,
        }
    }

    fn config(&self, port: u16, check: Option<&str>) -> String {
        let backends: String = self
            .addrs
            .iter()
            .map(|a| format!("      - {{ address: {a}, port: {port} }}\n"))
            .collect();
        let check = check.map_or(String::new(), |c| format!("    health_check: {{ {c} }}\n"));
        format!(
            "node:\n  interfaces: [eth-f]\nmaglev:\n  table_size: 100003\nservices:\n  - name: farm\n    vip: 198.18.100.10\n    port: 80\n    protocol: tcp\n{check}    backends:\n{backends}"
        )
    }

    /// CPU (user and system, % of one core) of `program args` run in the LB node's namespace,
    /// over `window` after `warmup`.
    fn measure_tool(
        &self,
        program: &str,
        args: &[String],
        warmup: Duration,
        window: Duration,
    ) -> (f64, f64) {
        let child = self
            .lb
            .command(program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        let mut p = Proc { child };
        std::thread::sleep(warmup);
        if let Ok(Some(status)) = p.child.try_wait() {
            panic!("{program} exited early: {status}");
        }
        let (c0, t0) = (cpu_ticks(p.pid()), Instant::now());
        std::thread::sleep(window);
        let (c1, secs) = (cpu_ticks(p.pid()), t0.elapsed().as_secs_f64());
        p.kill();
        let percent = |t: u64| t as f64 / ticks_per_second() / secs * 100.0;
        (percent(c1.0 - c0.0), percent(c1.1 - c0.1))
    }

    /// HAProxy checking every farm address on `port` every 100 ms (one thread), with
    /// `option` (e.g. `option httpchk GET /healthz`) in the backend.
    fn haproxy_config(&self, port: u16, option: &str) -> std::path::PathBuf {
        let mut c = String::from(
            "global\n  nbthread 1\n  maxconn 4000\ndefaults\n  mode tcp\n  timeout connect 80ms\n  timeout client 1s\n  timeout server 1s\n  timeout check 80ms\nfrontend f\n  bind 127.0.0.1:18080\n  default_backend farm\nbackend farm\n",
        );
        c.push_str(&format!(
            "  {option}\n  default-server check inter 100ms fall 2 rise 2\n"
        ));
        for (i, a) in self.addrs.iter().enumerate() {
            c.push_str(&format!("  server s{i} {a}:{port}\n"));
        }
        let path = self.dir.path.join(format!("haproxy-{port}.cfg"));
        std::fs::write(&path, c).expect("haproxy config");
        path
    }

    /// Agent CPU (user and system, % of one core) over `window` after `warmup`, probes a
    /// second, and how many backends passed their check at the end.
    fn measure(&self, config: &str, warmup: Duration, window: Duration) -> (f64, f64, f64, usize) {
        let mut agent = Agent::start(&self.lb, &self.dir.path, Some(config));
        agent.wait_ready(&self.lb);
        std::thread::sleep(warmup);
        // WEIR_BENCH_PROFILE=S: keep the agent probing S seconds longer, e.g. for `perf record`.
        if let Some(s) = std::env::var("WEIR_BENCH_PROFILE")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
        {
            eprintln!("bench: agent pid {} probing for {s} s", agent.pid());
            std::thread::sleep(Duration::from_secs(s));
        }
        let probes = |agent: &Agent| -> f64 {
            agent
                .metrics(&self.lb)
                .lines()
                .filter(|l| l.starts_with("weir_health_check_duration_seconds_count"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        let (p0, t0, c0) = (probes(&agent), Instant::now(), cpu_ticks(agent.pid()));
        std::thread::sleep(window);
        let (c1, elapsed, p1) = (cpu_ticks(agent.pid()), t0.elapsed(), probes(&agent));
        let up = agent
            .services(&self.lb)
            .to_string()
            .matches("\"state\":\"up\"")
            .count();

        let _ = agent.stop();
        let secs = elapsed.as_secs_f64();
        let percent = |t: u64| t as f64 / ticks_per_second() / secs * 100.0;
        (
            percent(c1.0 - c0.0),
            percent(c1.1 - c0.1),
            (p1 - p0) / secs,
            up,
        )
    }
}

/// Probe cost at 1000 backends every 100 ms, per check type, against no checks.
pub fn run_cpu(quick: bool) -> Vec<CpuRow> {
    let n = 1000;
    let window = if quick {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(10)
    };
    let warmup = Duration::from_secs(2);
    let farm = Farm::new(n);
    let (u, s, _, _) = farm.measure(&farm.config(8080, None), warmup, window);
    let idle = u + s;
    let mut rows = Vec::new();
    let addrs: Vec<String> = farm.addrs.iter().map(ToString::to_string).collect();
    let fping: Vec<String> = ["-l", "-q", "-p", "100", "-t", "80", "-i", "0.05"]
        .iter()
        .map(ToString::to_string)
        .chain(addrs)
        .collect();
    let haproxy = |port: u16, option: &str| -> Vec<String> {
        vec![
            "-db".into(),
            "-f".into(),
            farm.haproxy_config(port, option).display().to_string(),
        ]
    };
    let checks = [
        ("ping", 8080, "type: ping"),
        ("tcp", 8081, "type: tcp"),
        ("tcp (full handshake)", 8081, "type: tcp, handshake: full"),
        (
            "udp",
            7007,
            "type: udp, request: health, response: \"backend=\"",
        ),
        ("http", 8080, "type: http, path: /healthz"),
    ];
    // The fast profile (with a baseline each), then the defaults (interval 1 s).
    let runs = checks
        .iter()
        .map(|c| (c, "100ms", ", interval: 100ms, timeout: 80ms"))
        .chain(checks.iter().map(|c| (c, "1s", "")));
    for (&(check, port, spec), interval, timing) in runs {
        eprintln!("bench: health probe cost: {check}, {n} backends every {interval}");
        let spec = format!("{spec}{timing}");
        let (user, system, probes, passing) =
            farm.measure(&farm.config(port, Some(&spec)), warmup, window);
        let fast = interval == "100ms";
        let baseline = match check {
            _ if !fast => None,
            "ping" => Some(("fping -l -p 100", "fping".to_string(), fping.clone())),
            "tcp" => Some((
                "HAProxy, TCP check",
                "haproxy".into(),
                haproxy(port, "option tcp-check"),
            )),
            "http" => Some((
                "HAProxy, option httpchk",
                "haproxy".into(),
                haproxy(port, "option httpchk GET /healthz"),
            )),
            _ => None,
        }
        .map(|(name, program, args)| {
            eprintln!("bench: health probe cost: {name}, {n} backends every 100 ms");
            let (u, s) = farm.measure_tool(&program, &args, warmup, window);
            (name, u + s)
        });
        rows.push(CpuRow {
            check,
            backends: n,
            interval,
            passing,
            user_percent: user,
            system_percent: system,
            baseline,
            probes_per_s: probes,
            idle_percent: idle,
        });
    }
    drop(farm);
    rows
}

/// `p` in 0..=100: the nearest-rank percentile.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1]
}
