//! Writes the benchmark figures as `docs/benchmarks.md`.

use std::fmt::Write as _;

use super::{maglev, packet, throughput};

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
            .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_else(|| "unknown".into());
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
        "≤ 50 ns over the floor"
    } else if name.starts_with("new") {
        "≤ 2× established"
    } else if name.starts_with("non-VIP") {
        "≤ 10 ns over the floor"
    } else {
        ""
    }
}

pub fn markdown(
    m: &Machine,
    command: &str,
    packets: &[packet::Report],
    mag: &[maglev::Row],
    tput: &[throughput::Row],
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Benchmarks\n");
    let _ = writeln!(
        s,
        "Measured on {} by `{command}` (as root). Machine: {} × {}, Linux {}. \
         Every figure is measured side by side with its baseline in the same run. \
         This machine is a shared VM: repeated runs of the per-packet benchmark differ by up to \
         ±40%, so read the figures as orders of magnitude and ratios.\n",
        m.date, m.cores, m.cpu, m.kernel
    );

    let _ = writeln!(
        s,
        "## Per-packet cost of the XDP program (BPF_PROG_TEST_RUN)\n"
    );
    let _ = writeln!(
        s,
        "`repeat=N` would run the program N times on its own rewritten output, so each iteration \
         runs a harness (`lab_bench`) that restores the pristine 128-byte frame, makes it a new \
         flow where the case says so (fresh source port and address), and tail-calls weir's \
         program. The floor is the same harness tail-calling an empty program; every round \
         measures the floor and the case back to back, and the table gives medians over the \
         rounds. Established flows have their connection-table entry and the next hop cached; \
         new flows insert into a full connection table (LRU eviction) and find their Maglev slot \
         and hash bucket cold.\n"
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
            let _ = writeln!(s, " {} |", target(c.name));
        }
        let _ = writeln!(
            s,
            "\n{} rounds of {} iterations per case and run.\n",
            first.rounds, first.repeat
        );
    }

    let _ = writeln!(s, "## Maglev table build\n");
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

    let _ = writeln!(s, "## Throughput through the LB node (netns lab)\n");
    let _ = writeln!(
        s,
        "One generator (`lab_tx`, BPF_PROG_TEST_RUN live frames on one core, 64-byte UDP frames \
         over 256 flows) sends to the measured VIP through the LB node to a counting sink \
         (`lab_sink`, native XDP). The LB node's receive processing runs threaded on the other \
         core. weir: the agent, native XDP on both LB interfaces. iptables: kube-proxy-like \
         `nat` ruleset (a rule per service in one chain, the measured service last, \
         `statistic --mode random` per endpoint, legacy iptables). nftables: kube-proxy-like \
         verdict map on (address, protocol, port) and `numgen` per endpoint. Frames per second \
         received by the sink, median of the runs; the generator offered more than that in \
         every run unless the table says otherwise.\n"
    );
    let _ = writeln!(
        s,
        "| services | weir | iptables | nftables | weir ÷ iptables | weir ÷ nftables |"
    );
    let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|");
    let mut counts: Vec<usize> = tput.iter().map(|r| r.services).collect();
    counts.dedup();
    for n in counts {
        let get = |mode| {
            tput.iter()
                .find(|r| r.services == n && r.mode == mode)
                .map_or(0.0, |r| r.pps)
        };
        let (w, i, f) = (
            get(throughput::Mode::Weir),
            get(throughput::Mode::Iptables),
            get(throughput::Mode::Nftables),
        );
        let _ = writeln!(
            s,
            "| {n} | {:.2} Mpps | {:.2} Mpps | {:.2} Mpps | {:.1}× | {:.1}× |",
            w / 1e6,
            i / 1e6,
            f / 1e6,
            w / i.max(1.0),
            w / f.max(1.0)
        );
    }
    let saturated: Vec<String> = tput
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
    let _ = writeln!(
        s,
        "\nTarget: weir ≥ 4× iptables and ≥ 3× nftables, flat from 1 to 30k services."
    );
    s
}
