//! Writes the benchmark figures as `docs/benchmarks.md`.

use std::fmt::Write as _;

use super::{bgp, clusterip, health, l2, maglev, packet, restart, scale, throughput};

pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub kernel: String,
    pub date: String,
}

impl Machine {
    pub fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map_or_else(
                || "unknown".into(),
                |v| v.trim_start_matches([' ', '\t', ':']).to_string(),
            );
        let cores = cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count();
        let out = |cmd: &str, args: &[&str]| {
            std::process::Command::new(cmd)
                .args(args)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default()
        };
        Self {
            cpu,
            cores,
            kernel: out("uname", &["-r"]),
            date: out("date", &["-u", "+%Y-%m-%d"]),
        }
    }
}

fn target(name: &str) -> &'static str {
    if name.starts_with("established") {
        "≤ 40 ns over the floor, ≤ 0.5× Katran"
    } else if name.starts_with("new") {
        "≤ 300 ns over the floor, ≤ 0.5× Katran"
    } else if name.starts_with("non-VIP") {
        "≤ 10 ns over the floor"
    } else {
        ""
    }
}

/// The document's head.
pub fn head() -> String {
    "# Benchmarks\n\n\
     Every figure is measured side by side with its baseline in the same run, by the command each \
     section names (as root), on the machine it names. These machines are shared VMs: repeated \
     runs differ by up to ±40%, so read the figures as orders of magnitude and ratios. \
     `scripts/bench --only NAME` reruns one section and leaves the others as they are.\n\n"
        .to_string()
}

/// The line that says where and how a section was measured.
fn provenance(m: &Machine, command: &str) -> String {
    format!(
        "Measured on {} by `{command}` on {} × {}, Linux {}.\n\n",
        m.date, m.cores, m.cpu, m.kernel
    )
}

pub fn packet_section(m: &Machine, command: &str, packets: &[packet::Report]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "## Per-packet cost of the XDP program (BPF_PROG_TEST_RUN)\n"
    );
    s.push_str(&provenance(m, command));
    let _ = writeln!(
        s,
        "`repeat=N` would run the program N times on its own rewritten output, so each iteration \
         runs a harness (`lab_bench`) that restores the pristine 128-byte frame, makes it a new \
         flow where the case says so (fresh source port and address), and tail-calls weir's \
         program. The floor is the same harness tail-calling an empty program; every round \
         measures the floor and the case back to back, and the table gives medians over the \
         rounds. Established flows send ACK segments and have their connection-table entry and \
         the next hop cached; new flows open with a SYN (fresh source port and address), miss \
         both connection tables and insert into the full half-open table (LRU eviction), and \
         find their Maglev slot and hash bucket cold. A new flow to an endpoint of two \
         Services (the same pods behind two VIPs) adds a tail call to `weir_xdp_shared`, the \
         lookup of the client's flow to the other Service (none here: no clash to avoid) and a \
         second pass through `weir_xdp`, which finds the recorded entry. A source-NATed flow (an established one, to a backend on another \
         node) adds a tail call and its source-NAT entry's lookup and refresh; its reply is \
         looked up in the source-NAT table, translated, and forwarded with the next hop its \
         entry caches.\n"
    );
    let _ = writeln!(
        s,
        "Beside another XDP load balancer (not part of `scripts/bench`'s run): \
         `WEIR_PACKET_PAIR=<its XDP program, pinned on a bpf filesystem> \
         WEIR_PACKET_PAIR_NAME=<name> scripts/bench --only packet` adds its established and new \
         IPv4 flow to the table, with the same ACK and SYN frames to 198.18.100.10:80, the same \
         harness and paired floors, in the same rounds. Set it up with its own tools: that VIP, \
         backends, and a connection table as large as weir's here (262 144 flows). The harness \
         moves back a frame start that an encapsulating program moved; the row \"frame start \
         moved and back\" shows that cost, which is in the other program's figure. Paired so \
         with Katran (commit 19f08fe; `MAX_CONN_RATE` raised so that every new flow takes an \
         LRU entry; 100 backends, a 65 537-slot ring, a per-CPU LRU of 262 144) on 2026-12-06, \
         2 × Intel Xeon, Linux 6.18: established flow weir +60…+63 ns, Katran +86…+97 (0.7×); \
         new flow weir +410…+494 ns, Katran +678…+819 (0.6×).\n"
    );
    let _ = write!(s, "| case |");
    for (i, _) in packets.iter().enumerate() {
        let _ = write!(s, " run {} ns | over floor |", i + 1);
    }
    let _ = writeln!(s, " target |");
    let _ = write!(s, "|---|");
    for _ in packets {
        let _ = write!(s, "---:|---:|");
    }
    let _ = writeln!(s, "---|");
    let _ = write!(s, "| floor (harness + empty program) |");
    for p in packets {
        let _ = write!(s, " {:.0} | |", p.floor_ns);
    }
    let _ = writeln!(s, " |");
    if let Some(first) = packets.first() {
        for (i, c) in first.cases.iter().enumerate() {
            let _ = write!(s, "| {} |", c.name);
            for p in packets {
                let c = &p.cases[i];
                let _ = write!(s, " {:.0} | {:+.0} |", c.ns, c.over_floor_ns);
            }
            let _ = writeln!(s, " {} |", target(&c.name));
        }
        let _ = writeln!(
            s,
            "\n{} rounds of {} iterations per case and run.\n",
            first.rounds, first.repeat
        );
    }

    s
}

pub fn maglev_section(m: &Machine, command: &str, mag: &[maglev::Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "## Maglev table build\n");
    s.push_str(&provenance(m, command));
    let _ = writeln!(
        s,
        "weir's two-phase fill (first reach, then exact shares; see `lb-agent/src/maglev`) against \
         the NSDI paper's fill with the same permutations, one core, median of the builds. \
         Disruption: the worst share of the surviving backends' slots that change owner when one \
         backend is removed (over several removals).\n"
    );
    let _ = writeln!(
        s,
        "| M | backends | weir build | paper fill build | weir disruption | paper disruption |"
    );
    let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|");
    for r in mag {
        let _ = writeln!(
            s,
            "| {} | {} | {:.2} ms | {:.2} ms | {:.2}% | {:.2}% |",
            r.table_size, r.backends, r.weir_ms, r.paper_ms, r.weir_disruption, r.paper_disruption
        );
    }
    let _ = writeln!(
        s,
        "\nTarget: M=65537 with 1000 backends in ≤ 1 ms; ≤ 1% disruption.\n"
    );

    s
}

/// The weir / iptables / nftables packet-rate table by service count, and the runs the
/// generator limited.
fn pps_table(s: &mut String, rows: &[throughput::Row]) {
    // The bare-redirect ceiling, when the run measured it (its row has no services).
    let ceiling = rows
        .iter()
        .find(|r| r.mode == throughput::Mode::Redirect)
        .map(|r| r.pps);
    let (head, rule) = if ceiling.is_some() {
        (" bare XDP redirect | weir ÷ redirect |", "---:|---:|")
    } else {
        ("", "")
    };
    let _ = writeln!(
        s,
        "| services | weir | iptables | nftables | weir ÷ iptables | weir ÷ nftables |{head}"
    );
    let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|{rule}");
    let mut counts: Vec<usize> = rows
        .iter()
        .filter(|r| r.mode != throughput::Mode::Redirect)
        .map(|r| r.services)
        .collect();
    counts.dedup();
    for n in counts {
        let get = |mode| {
            rows.iter()
                .find(|r| r.services == n && r.mode == mode)
                .map_or(0.0, |r| r.pps)
        };
        let (w, i, f) = (
            get(throughput::Mode::Weir),
            get(throughput::Mode::Iptables),
            get(throughput::Mode::Nftables),
        );
        let tail = ceiling.map_or_else(String::new, |c| {
            format!(" {:.2} Mpps | {:.2}× |", c / 1e6, w / c.max(1.0))
        });
        let _ = writeln!(
            s,
            "| {n} | {:.2} Mpps | {:.2} Mpps | {:.2} Mpps | {:.1}× | {:.1}× |{tail}",
            w / 1e6,
            i / 1e6,
            f / 1e6,
            w / i.max(1.0),
            w / f.max(1.0)
        );
    }
    let saturated: Vec<String> = rows
        .iter()
        .filter(|r| r.pps > 0.98 * r.offered_pps)
        .map(|r| format!("{} with {} services", r.mode.name(), r.services))
        .collect();
    if !saturated.is_empty() {
        let _ = writeln!(
            s,
            "\nThe generator, not the LB node, was the limit for: {}.",
            saturated.join("; ")
        );
    }
}

pub fn nodeport_section(m: &Machine, command: &str, rows: &[throughput::Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "## NodePort throughput through the LB node (netns lab)\n"
    );
    s.push_str(&provenance(m, command));
    let _ = writeln!(
        s,
        "The throughput benchmark's topology and generator, with the frames to the LB node's own \
         address and the measured Service's node port (64-byte UDP, 256 flows). Every Service is a \
         NodePort with `externalTrafficPolicy: Local` and its endpoints on this node (no source \
         NAT anywhere). weir: the agent in Kubernetes mode with `kube_proxy_replacement` against \
         the fake API server, native XDP on both LB interfaces (the node address joins only the \
         XDP pre-filter). iptables: kube-proxy-like — every Service's ClusterIP rule, then \
         `addrtype --dst-type LOCAL` → `KUBE-NODEPORTS` with a rule per node port (the measured \
         one last) → `statistic` per endpoint, legacy iptables. nftables: kube-proxy-like \
         `service-ips` map, then `fib daddr type local` and a `service-nodeports` verdict map. \
         Frames per second received by the sink, median of the runs.\n"
    );
    pps_table(&mut s, rows);
    s
}

pub fn scale_section(m: &Machine, command: &str, rows: &[scale::Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "## Kubernetes at scale: changes to the maps, agent memory and CPU\n"
    );
    s.push_str(&provenance(m, command));
    let _ = writeln!(
        s,
        "The agent in Kubernetes mode as kube-proxy's replacement against the fake API server (no \
         kube-apiserver runs here), native XDP on a veth, with ClusterIP Services of 10 ready \
         endpoints and an external IP each (one EndpointSlice per Service) and Maglev tables of {} slots. *Change → \
         maps*: an endpoint of a random Service replaced by a new address (EndpointSlice `PUT`), \
         from just before the request to the first answer of the admin API's `lookup` — read from \
         the kernel's maps — that sends the flow Maglev had given the replaced endpoint \
         elsewhere, polled back to back from the other core, each change after a quiet 100 ms (changes within 50 ms of the agent's last translation are taken together). *Service added*: a Service and its \
         slice created, until the lookup of its external IP forwards. *First sync*: agent start to \
         the last Service programmed. The agent's resident memory once all is programmed (its \
         peak by the end), and its CPU time (user + system) idle for 5 s and while one endpoint \
         change arrives every 10 ms (round-robin over the Services).\n",
        scale::TABLE_SIZE
    );
    s.push_str(&scale::table(rows));
    s.push_str(
        "\nTargets: change → maps p99 ≤ 5 ms at 10 000 Services, flat from 100 to 10 000; agent \
         RSS ≤ 200 MB and ≤ 10% of a core at 100 endpoint changes a second.\n",
    );
    s
}

pub fn clusterip_section(m: &Machine, command: &str, rows: &[clusterip::Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "## ClusterIP from the node: connections through the Service\n"
    );
    s.push_str(&provenance(m, command));
    let _ = writeln!(
        s,
        "A client process on the node (CPU 0) opens one connection at a time to the measured \
         ClusterIP: `connect()`, `GET /whoami`, the whole answer, close. The endpoints are three \
         addresses of a pod namespace behind a routed veth, served by four threads on CPU 1. \
         weir: the agent's socket hooks on the client's cgroup (the destination is translated \
         once, in `connect()`; no connection tracking, no packet rewritten). iptables: \
         kube-proxy-like `nat` OUTPUT chains (a rule per Service, the measured one last, \
         `statistic --mode random` per endpoint, `KUBE-MARK-MASQ`), legacy iptables. nftables: \
         kube-proxy-like verdict map on (address, protocol, port) and `numgen` per endpoint. \
         Fillers are Services with one endpoint each. Exchanges per second and their latency, \
         the median of the runs.\n"
    );
    if let Some(d) = rows.iter().find(|r| r.mode == clusterip::Mode::Direct) {
        let _ = writeln!(
            s,
            "Floor, the same client to one endpoint's address (no Service): {:.0}/s, p50 {:.0} µs, \
             p99 {:.0} µs.\n",
            d.rate, d.p50_us, d.p99_us
        );
    }
    let _ = writeln!(
        s,
        "| services | weir | iptables | nftables | weir ÷ iptables | weir ÷ nftables | p99 weir / iptables / nftables |"
    );
    let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|");
    let mut counts: Vec<usize> = rows
        .iter()
        .filter(|r| r.mode != clusterip::Mode::Direct)
        .map(|r| r.services)
        .collect();
    counts.dedup();
    for n in counts {
        let get = |mode| {
            rows.iter()
                .find(|r| r.services == n && r.mode == mode)
                .map_or((0.0, 0.0), |r| (r.rate, r.p99_us))
        };
        let (w, i, f) = (
            get(clusterip::Mode::Weir),
            get(clusterip::Mode::Iptables),
            get(clusterip::Mode::Nftables),
        );
        let _ = writeln!(
            s,
            "| {n} | {:.0}/s | {:.0}/s | {:.0}/s | {:.2}× | {:.2}× | {:.0} / {:.0} / {:.0} µs |",
            w.0,
            i.0,
            f.0,
            w.0 / i.0.max(1.0),
            w.0 / f.0.max(1.0),
            w.1,
            i.1,
            f.1
        );
    }
    let failed: Vec<String> = rows
        .iter()
        .filter(|r| r.errors > 0)
        .map(|r| {
            format!(
                "{} with {} services: {}",
                r.mode.name(),
                r.services,
                r.errors
            )
        })
        .collect();
    if !failed.is_empty() {
        let _ = writeln!(s, "\nFailed exchanges: {}.", failed.join("; "));
    }
    let _ = writeln!(
        s,
        "\nTarget: weir ≥ 1.5× iptables at 10 000 Services, flat in the Service count."
    );
    s
}

pub fn throughput_section(m: &Machine, command: &str, tput: &[throughput::Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "## Throughput through the LB node (netns lab)\n");
    s.push_str(&provenance(m, command));
    let _ = writeln!(
        s,
        "One generator (`lab_tx`, BPF_PROG_TEST_RUN live frames on one core, 64-byte UDP frames \
         over 256 flows) sends to the measured VIP through the LB node to a counting sink \
         (`lab_sink`, native XDP). The LB node's receive processing runs threaded on the other \
         core. weir: the agent, native XDP on both LB interfaces. iptables: kube-proxy-like \
         `nat` ruleset (a rule per service in one chain, the measured service last, \
         `statistic --mode random` per endpoint, legacy iptables). nftables: kube-proxy-like \
         verdict map on (address, protocol, port) and `numgen` per endpoint. Bare XDP \
         redirect: the ceiling of any XDP forwarder through this topology, measured once in the \
         same run (`lab_redirect` on the LB node's client side writes the sink's MACs and \
         redirects every frame to its interface: no lookup, no rewrite of the packet). Frames \
         per second received by the sink, median of the runs; the generator offered more than \
         that in every run unless the table says otherwise.\n"
    );
    pps_table(&mut s, tput);
    let _ = writeln!(
        s,
        "\nTarget: weir ≥ 4× iptables and ≥ 3× nftables, flat from 1 to 30k services, and ≥ 0.8× \
         the bare XDP redirect."
    );
    s
}

pub fn prune_section(m: &Machine, command: &str, prune: &[health::PruneRow]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "## Health checks: time to prune a dead backend\n");
    s.push_str(&provenance(m, command));
    let _ = writeln!(
        s,
        "The lab's service `web` over three backends, checked by `http GET /healthz`. The client \
         opens new TCP connections to the VIP without pause; `lab_syn` on backend b1's interface \
         notes the time of every SYN that reaches b1 (before b1's own stack and firewall). Each \
         trial fails b1 at a random point of the probe cycle — its server SIGKILLed, or an \
         nftables rule in b1's namespace dropping everything — and measures from that moment to \
         the last new flow that reached b1. \"API\" is when `/api/v1/services` first showed b1 \
         down (polled every 5 ms). Then b1 is repaired and the next trial starts once weir has it \
         back.\n"
    );
    let _ = writeln!(
        s,
        "| check profile | failure | trials | p50 | p99 | max | API p50 | new flows/s |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|");
    for r in prune {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} |",
            r.profile,
            r.failure.name(),
            r.prune_ms.len(),
            health::percentile(&r.prune_ms, 50.0),
            health::percentile(&r.prune_ms, 99.0),
            r.prune_ms.iter().copied().fold(0.0, f64::max),
            health::percentile(&r.detect_ms, 50.0),
            r.flows_per_s
        );
    }
    let _ = writeln!(
        s,
        "\nWith fewer than 100 trials, p99 is the largest trial but one or the largest \
         (nearest rank). Target: fast profile p99 ≤ 500 ms.\n"
    );
    let _ = writeln!(
        s,
        "The baseline: what the same failures cost without weir's checks, from the defaults of \
         the components (configuration, not measured here: no Kubernetes runs on these \
         machines).\n"
    );
    let _ = writeln!(
        s,
        "| without weir | a dead backend keeps getting new flows for |"
    );
    let _ = writeln!(s, "|---|---|");
    for (what, time) in [
        (
            "kube-proxy behind MetalLB, pod hung or black-holed: readiness probe defaults \
             (`periodSeconds` 10, `failureThreshold` 3)",
            "20–30 s, plus the EndpointSlice update and the kube-proxy sync",
        ),
        (
            "kube-proxy behind MetalLB, node lost (power, kernel panic): \
             `node-monitor-grace-period` 40 s, then its endpoints turn not ready",
            "~40–50 s",
        ),
        (
            "LoxiLB with its default probe (`probetimeout` 60 s, `proberetries` 2)",
            "60–120 s",
        ),
        ("Cilium (no active backend checks)", "as kube-proxy"),
    ] {
        let _ = writeln!(s, "| {what} | {time} |");
    }
    s.push('\n');
    s
}

pub fn l2_section(m: &Machine, command: &str, r: &l2::Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "## VIP announcement: L2 failover
"
    );
    s.push_str(&provenance(m, command));
    let _ = writeln!(
        s,
        "{} LB nodes, a client and a backend on one link (`weir_lab::l2lab`), the agents \
         gossiping every 100 ms with `dead_after` 400 ms. The client has the VIP on its link and \
         resolves it by ARP, which only the owner answers. Each trial fails the owner — its agent \
         SIGKILLed (its data plane stays attached, pinned, and answers ARP until its lease \
         runs out, `dead_after` after its last renewal), or its link set down — and measures from \
         that moment to the client's first successful request whose VIP neighbour entry is \
         another node's MAC (requests with a 200 ms timeout, back to back), then repairs it \
         and waits for one owner.\n",
        r.nodes
    );
    let _ = writeln!(
        s,
        "| owner failure | trials | p50 | p99 | max | min | target |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---|");
    for (name, v) in &r.rows {
        let _ = writeln!(
            s,
            "| {name} | {} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | p99 ≤ 1 s |",
            v.len(),
            health::percentile(v, 50.0),
            health::percentile(v, 99.0),
            v.iter().copied().fold(0.0, f64::max),
            v.iter().copied().fold(f64::INFINITY, f64::min),
        );
    }
    let _ = writeln!(
        s,
        "\nThe baseline, from the components' documented defaults (not measured here: no \
         Kubernetes runs on these machines): MetalLB's L2 speakers detect a dead node through \
         memberlist or the node's Ready condition, seconds to tens of seconds; Cilium's L2 \
         announcements hold a Lease of 15 s (`l2-announcements-lease-duration`), so a dead owner \
         is replaced after 10–20 s.\n"
    );
    s
}

pub fn bgp_section(m: &Machine, command: &str, r: &bgp::Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "## VIP announcement: BGP failover\n");
    s.push_str(&provenance(m, command));
    let _ = writeln!(
        s,
        "One LB node advertising the VIP to FRR 8 (bgpd, bfdd, zebra) in the router's namespace \
         (`weir_lab::bgplab`), hold time 9 s, BFD 100 ms × 3 on both sides when on. Each trial \
         fails the node — its agent frozen with SIGSTOP (the TCP session stays open: the \
         kernel still acknowledges, only the agent is silent), or its link set down (the \
         router's bridge stays up: no interface event tells FRR) — and measures from that \
         moment to the VIP route leaving the router's kernel table (polled every few ms), then \
         repairs the node and waits for the route to come back. The rows without BFD are the \
         side-by-side baseline: what any BGP announcement without BFD gets at this hold time \
         (MetalLB's native BGP speaker has no BFD).\n"
    );
    let _ = writeln!(
        s,
        "| node failure | BFD | trials | p50 | p99 | max | min | target |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---|");
    for (name, bfd, v) in &r.rows {
        let _ = writeln!(
            s,
            "| {name} | {} | {} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {} |",
            if *bfd {
                "100 ms × 3"
            } else {
                "off (hold 9 s)"
            },
            v.len(),
            health::percentile(v, 50.0),
            health::percentile(v, 99.0),
            v.iter().copied().fold(0.0, f64::max),
            v.iter().copied().fold(f64::INFINITY, f64::min),
            if *bfd { "≤ 1 s" } else { "baseline" },
        );
    }
    let _ = writeln!(
        s,
        "\nWithout BFD the withdrawal waits for the hold time (6–9 s after the last \
         keepalive); with the RFC's suggested 90 s hold time, or MetalLB's default of 90 s, \
         ten times longer.\n"
    );
    s
}

pub fn probe_cost_section(m: &Machine, command: &str, cpu: &[health::CpuRow]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "## Health checks: probe cost\n");
    s.push_str(&provenance(m, command));
    let _ = writeln!(
        s,
        "The agent checking 1000 backends (1000 addresses of one namespace behind the LB node) \
         every 100 ms, that is 10 000 probes a second: the agent's CPU time (user + system from \
         `/proc/PID/stat`, which includes the kernel's work on the packets its sockets send and \
         receive) over the measurement window, beside the same agent and backends with no \
         checks. The veth pair's receive processing runs on NAPI threads, as a NIC's runs in \
         its interrupt's context; without that, a veth would process the backends' side of \
         every probe inside the agent's system calls. TCP probes are half-open by default (a \
         SYN over a raw socket; the LB node's kernel answers the SYN-ACK with a reset in its \
         receive processing); with `handshake: full` they connect and close with a reset, as \
         HAProxy's TCP check connects. UDP probes share four sockets per family. HTTP probes \
         make a new connection each (a thread-per-connection server answers).\n"
    );
    let _ = writeln!(
        s,
        "| check | backends (passing) | interval | probes/s done | agent CPU (user + system) | agent without checks | baseline: same probes by |"
    );
    let _ = writeln!(s, "|---|---:|---|---:|---:|---:|---|");
    for r in cpu {
        let _ = writeln!(
            s,
            "| {} | {} ({}) | {} | {:.0} | {:.1}% of a core ({:.1} + {:.1}) | {:.1}% | {} |",
            r.check,
            r.backends,
            r.passing,
            r.interval,
            r.probes_per_s,
            r.user_percent + r.system_percent,
            r.user_percent,
            r.system_percent,
            r.idle_percent,
            r.baseline.map_or("—".to_string(), |(name, cpu)| format!(
                "{name}: {cpu:.1}% (weir {:.2}×)",
                (r.user_percent + r.system_percent) / cpu
            ))
        );
    }
    let _ = writeln!(
        s,
        "\nTarget: 1000 backends every 100 ms in ≤ 5% of one core for ping, tcp and udp, ≤ 10% \
         for http, and ≤ 0.5× the baseline. The baselines are \
         single-threaded C probers doing the same probes on the same machine in the same run: \
         what the probes themselves cost here (system calls and the kernel's packet work), \
         whoever sends them.\n"
    );
    s
}

/// `doc` with each of `sections` (each starting with its `## ` title) in place of the section
/// of the same title, or appended when it has none.
pub fn restart_section(m: &Machine, command: &str, r: &restart::Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "## Agent restarts under load\n");
    s.push_str(&provenance(m, command));
    let _ = writeln!(
        s,
        "One LB node and three backends behind a bridge (`weir_lab::lab`), the agent on the \
         embedded default config. Load through the VIP: 30 long-lived TCP connections exchanging \
         a line every 20 ms, and new HTTP connections back to back (1 s timeout). Each trial \
         SIGKILLs the agent, waits 3 s, starts it again, waits until it is ready and one more \
         second; counted over that window. The baseline is weir with its data plane unpinned \
         (`keep_on_exit: false` without a bpf filesystem), which goes with the agent — what every \
         agent restart did before the data plane was pinned.\n"
    );
    let _ = writeln!(
        s,
        "| variant | trials | long-lived connections reset | new connections failed | longest time without a new connection | target |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---|");
    for (name, v) in &r.rows {
        let resets: u32 = v.iter().map(|t| t.resets).sum();
        let long: u32 = v.iter().map(|t| t.long_lived).sum();
        let failed: u32 = v.iter().map(|t| t.failed).sum();
        let attempted: u32 = v.iter().map(|t| t.attempted).sum();
        let gap = v.iter().map(|t| t.gap_ms).fold(0.0, f64::max);
        let _ = writeln!(
            s,
            "| {name} | {} | {resets} of {long} | {failed} of {attempted} | {gap:.0} ms | 0 and 0 |",
            v.len()
        );
    }
    s.push('\n');
    s
}

pub fn synflood_section(
    m: &Machine,
    command: &str,
    rows: &[(String, crate::flood::Report)],
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "## SYN flood\n");
    s.push_str(&provenance(m, command));
    let _ = writeln!(
        s,
        "The standalone lab (backends behind a bridge) with small tables (8192 connections, a \
         1000-port source-NAT range per backend endpoint) and three backends behind two VIPs, \
         one of them source-NATed (`weir_lab::flood`). The lab's generator sends spoofed SYNs \
         from 64 000 addresses of 198.19.0.0/16 at both VIPs from CPU 0, on a link of its own whose receive processing \
         runs on CPU 1 (a NIC queue of its own), for as long as 20 idle connections wait for \
         their backend to speak first, while 100 established connections exchange a line \
         every 100 ms and 30 new connections are opened to the source-NATed VIP from CPU 1 (each \
         may take three SYNs, 5 s; *retried*: how many needed more than one). *Forwarded*: packets weir sent to the \
         backends during the flood (the rest of the offered SYNs were dropped by the receiving \
         interface's ring, before any program). *Delivered*: the established connections' \
         segments (both ends) not retransmitted. *Ports back*: seconds after the flood until \
         new flows find free or expired source-NAT ports again (— : not counted by that build). \
         The baseline is weir before the half-open table (every SYN made a connection-table \
         entry; half-open source-NAT entries held their port for an hour; 16 port tries).\n"
    );
    let _ = writeln!(
        s,
        "| variant | offered | forwarded | connections broken | delivered | slowest round trip | new connections during the flood | ports back | target |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for (name, r) in rows {
        let back = r
            .ports_back_secs
            .map_or_else(|| "—".to_string(), |b| format!("{b:.1} s"));
        let _ = writeln!(
            s,
            "| {name} | {:.2} Mpps | {} | {} of {} | {:.2}% | {} ms | {} of {} ({} retried) | {back} | 0 broken, ≥ 99% delivered, ports back within the half-open timeout (10 s) |",
            r.offered_pps / 1e6,
            r.forwarded,
            r.broken.len(),
            r.idle + r.busy,
            r.delivered() * 100.0,
            r.slowest_ms,
            r.new_during,
            crate::flood::NEW_DURING,
            r.new_retried,
        );
    }
    s.push('\n');
    s
}

pub fn fuzz_section(m: &Machine, command: &str, r: &crate::framefuzz::Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "## Frame fuzzing\n");
    s.push_str(&provenance(m, command));
    let _ = writeln!(
        s,
        "Random and mutated frames through weir's XDP program with BPF_PROG_TEST_RUN \
         (`weir_lab::framefuzz`): well-formed frames to every frontend of a small desired \
         state (TCP, UDP, SCTP, ICMP, both families, source ranges, affinity, source NAT), \
         source-NAT replies, ARP, VLAN tags, IPv4 options, IPv6 extension headers, from random \
         clients; a third with bits flipped, a sixth cut or padded, a twelfth random bytes. \
         Checked for every frame: the verdict is pass, drop, tx or redirect; a rewritten frame \
         has valid checksums whenever the frame it came from had, and goes to a programmed \
         backend, the client of a known source-NAT flow, or its sender; every drop, tx and \
         redirect is counted. Replay a run with `WEIR_FUZZ_SEED=<seed> WEIR_FUZZ_FRAMES=1000000 \
         cargo test -p weir-lab --test datapath random_and_mutated` (`scripts/test` runs 10^5 \
         frames of seed 1).\n"
    );
    let [aborted, drop, pass, tx, redirect] = r.verdicts;
    let _ = writeln!(
        s,
        "| frames | seed | drop | pass | tx | redirect | aborted | rewritten | checksums checked | failures | time |"
    );
    let _ = writeln!(
        s,
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let _ = writeln!(
        s,
        "| {} | {} | {drop} | {pass} | {tx} | {redirect} | {aborted} | {} | {} | {} | {:.1} s |\n",
        r.frames, r.seed, r.rewritten, r.checked, r.failed, r.seconds
    );
    for f in &r.failures {
        let _ = writeln!(s, "- {f}");
    }
    if !r.failures.is_empty() {
        s.push('\n');
    }
    s
}

pub fn splice(doc: &str, sections: &[String]) -> String {
    // (title, text) of each section of `doc`, in order.
    let mut parts: Vec<(String, String)> = Vec::new();
    for line in doc.split_inclusive('\n') {
        if line.starts_with("## ") {
            parts.push((line.trim_end().to_string(), String::new()));
        }
        if let Some(last) = parts.last_mut() {
            last.1.push_str(line);
        }
    }
    for new in sections {
        for section in split_sections(new) {
            let title = section.lines().next().unwrap_or_default().to_string();
            match parts.iter_mut().find(|(t, _)| *t == title) {
                Some(p) => p.1 = section,
                None => parts.push((title, section)),
            }
        }
    }
    let mut out = head();
    for (_, text) in parts {
        out.push_str(&text);
    }
    out
}

/// A text of several `## ` sections, one string each.
fn split_sections(text: &str) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for line in text.split_inclusive('\n') {
        if line.starts_with("## ") || v.is_empty() {
            v.push(String::new());
        }
        if let Some(last) = v.last_mut() {
            last.push_str(line);
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_replaces_only_the_named_sections() {
        let doc = format!("{}## A\n\nold a\n\n## B\n\nold b\n", head());
        let out = splice(
            &doc,
            &["## B\n\nnew b\n".into(), "## C\n\nc\n## D\n\nd\n".into()],
        );
        assert_eq!(
            out,
            format!(
                "{}## A\n\nold a\n\n## B\n\nnew b\n## C\n\nc\n## D\n\nd\n",
                head()
            )
        );
    }
}
