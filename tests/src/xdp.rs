//! The lab's own XDP programs (`tests/ebpf`): attached to lab interfaces, detached on drop.

use aya::{
    Ebpf,
    maps::PerCpuArray,
    programs::{Xdp, XdpMode},
};

use crate::netns::Netns;

pub static LAB_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weir-lab-ebpf"));

/// One of the lab programs, attached in native mode to an interface of a namespace.
pub struct LabXdp {
    ebpf: Ebpf,
}

impl LabXdp {
    /// Attaches `program` (`lab_pass`, `lab_sink`) to `iface` in `ns`.
    pub fn attach(ns: &Netns, iface: &str, program: &str) -> Self {
        ns.run_in(|| {
            let mut ebpf = Ebpf::load(LAB_OBJECT).expect("load the lab object");
            let p: &mut Xdp = ebpf
                .program_mut(program)
                .unwrap_or_else(|| panic!("no program {program}"))
                .try_into()
                .expect("an XDP program");
            p.load().expect("load");
            p.attach(iface, XdpMode::Driver)
                .unwrap_or_else(|e| panic!("attach {program} to {iface}: {e}"));
            Self { ebpf }
        })
    }

    /// Makes `lab_redirect` send every frame out of `ifindex` with these MACs.
    pub fn redirect_to(&mut self, ifindex: u32, dst_mac: [u8; 6], src_mac: [u8; 6]) {
        let mut m: aya::maps::Array<_, [u8; 16]> =
            aya::maps::Array::try_from(self.ebpf.map_mut("REDIRECT").expect("REDIRECT map"))
                .expect("array");
        let mut v = [0u8; 16];
        v[..6].copy_from_slice(&dst_mac);
        v[6..12].copy_from_slice(&src_mac);
        v[12..].copy_from_slice(&ifindex.to_ne_bytes());
        m.set(0, v, 0).expect("REDIRECT[0]");
    }

    /// Makes `lab_syn` count only SYNs from `prefix`.
    pub fn syns_from(&mut self, prefix: ipnet::Ipv4Net) {
        let mut m: aya::maps::Array<_, [u32; 2]> =
            aya::maps::Array::try_from(self.ebpf.map_mut("SYN_FROM").expect("SYN_FROM map"))
                .expect("array");
        let word = |a: std::net::Ipv4Addr| u32::from_ne_bytes(a.octets());
        m.set(0, [word(prefix.network()), word(prefix.netmask())], 0)
            .expect("SYN_FROM[0]");
    }

    /// SYNs `lab_syn` has seen, and the CLOCK_MONOTONIC time of the last one (ns; 0: none).
    pub fn syns(&self) -> (u64, u64) {
        let m: PerCpuArray<_, [u64; 2]> =
            PerCpuArray::try_from(self.ebpf.map("SYNS").expect("SYNS map")).expect("per-CPU array");
        let v = m.get(&0, 0).expect("SYNS[0]");
        v.iter()
            .fold((0, 0), |(n, last), c| (n + c[0], last.max(c[1])))
    }

    /// Frames and bytes `lab_sink` has received.
    pub fn sink_counts(&self) -> (u64, u64) {
        let m: PerCpuArray<_, [u64; 2]> =
            PerCpuArray::try_from(self.ebpf.map("SINK").expect("SINK map")).expect("per-CPU array");
        let v = m.get(&0, 0).expect("SINK[0]");
        v.iter().fold((0, 0), |(f, b), c| (f + c[0], b + c[1]))
    }
}

/// Transmits `frame` `count` times with the generator `lab_tx` of `ebpf` (BPF_PROG_TEST_RUN in
/// live-frames mode) out of interface `ifindex`, whose peer must run a native XDP program.
/// Call it inside the interface's namespace.
pub fn transmit(ebpf: &Ebpf, frame: &[u8], ifindex: u32, count: u32) {
    use aya::programs::{TestRun as _, TestRunAttrs, TestRunOptions};
    let prog: &Xdp = ebpf
        .program("lab_tx")
        .expect("lab_tx")
        .try_into()
        .expect("xdp");
    let mut ctx = Vec::with_capacity(24);
    for v in [0u32, frame.len() as u32, 0, ifindex, 0, 0] {
        ctx.extend_from_slice(&v.to_ne_bytes());
    }
    prog.test_run(TestRunOptions {
        data_in: Some(frame),
        ctx_in: Some(&ctx),
        repeat: count,
        attrs: TestRunAttrs::new().xdp_live_frames(64),
        ..TestRunOptions::new()
    })
    .expect("generator run");
}
