//! XDP programs for the lab and the benchmarks (not part of weir).
//!
//! - `lab_pass`: lets everything through. A veth only picks up frames its peer sent with
//!   XDP_TX when it runs an XDP program itself, and a kernel-stack baseline needs the same.
//! - `lab_sink`: counts frames and bytes (per CPU) and drops them: the receiver of the
//!   throughput benchmark.
//! - `lab_syn`: counts TCP SYNs (new connections; from one source prefix, if `SYN_FROM` is
//!   set) and notes the time of the last one
//!   (`bpf_ktime_get_ns`, CLOCK_MONOTONIC), then lets everything through: what a backend
//!   received, measured before its own stack (and its firewall) sees it.
//! - `lab_tx`: the generator, run with BPF_PROG_TEST_RUN in live-frames mode: it writes the
//!   64-byte frame `GEN_FRAME` (every time: the pages are recycled by reference, and the
//!   receiver rewrites them in place), spreads the frames over `GEN[1]` flows by writing a
//!   counter into the 2 bytes at offset `GEN[0]` (a UDP source port; UDP over IPv4 needs no
//!   checksum; or the low half of a source address), its ones' complement into the 2 bytes at
//!   `GEN[2]` and `GEN[3]` when they are set (fields whose sum with the first stays constant
//!   under a checksum: a frame built with 0 and 0xffff there keeps valid checksums), and
//!   sends the frame out (XDP_TX).
//! - `lab_bench`: the timing harness. BPF_PROG_TEST_RUN with repeat=N runs a program N times
//!   on the same buffer, so a program that rewrites the packet would time itself on its own
//!   output. This one restores the pristine frame (`PRISTINE`, `BENCH_LEN` bytes, frames padded
//!   to 128) every time, optionally makes it a new flow (a counter into the 2 bytes at
//!   `BENCH[0]` and `BENCH[1]`: source port and low half of the source address), then
//!   tail-calls `TARGET[0]` (weir's XDP program, or `lab_pass` for the floor). A program that
//!   moved the frame's start (an encapsulating load balancer paired with weir, see
//!   `tests/src/bench/packet.rs`) leaves it moved for the next run: the harness moves it back
//!   first.
//! - `lab_head_pass`: moves the frame's start 20 bytes out (as an IPIP encapsulation does) and
//!   lets the frame through: with the harness, what moving the start and back costs.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{Array, PerCpuArray, ProgramArray},
    helpers::{bpf_redirect, bpf_xdp_adjust_head, bpf_xdp_store_bytes},
    macros::{btf_map, xdp},
    programs::XdpContext,
};

/// Benchmark frames are padded to this length, so that restoring one is a constant-size copy.
const BENCH_LEN: usize = 128;

/// [frames, bytes] received by `lab_sink`.
#[btf_map]
static SINK: PerCpuArray<[u64; 2], 1> = PerCpuArray::new();

/// [offset, flows, complement offset, complement offset] for `lab_tx` (0: unused).
#[btf_map]
static GEN: Array<[u32; 4], 1> = Array::new();

/// Length of the generator's frames.
const GEN_LEN: usize = 64;

#[btf_map]
static GEN_FRAME: Array<[u8; GEN_LEN], 1> = Array::new();

#[btf_map]
static GEN_COUNTER: PerCpuArray<u32, 1> = PerCpuArray::new();

#[btf_map]
static PRISTINE: Array<[u8; BENCH_LEN], 1> = Array::new();

/// [source-port offset, source-address-low-half offset]; 0 = leave the frame as it is.
#[btf_map]
static BENCH: Array<[u32; 2], 1> = Array::new();

#[btf_map]
static BENCH_COUNTER: PerCpuArray<u32, 1> = PerCpuArray::new();

#[btf_map]
static TARGET: ProgramArray<1> = ProgramArray::new();

#[inline(always)]
fn store2(ctx: &XdpContext, off: u32, v: u16) {
    let b = v.to_be_bytes();
    unsafe { bpf_xdp_store_bytes(ctx.ctx, off, b.as_ptr() as *mut _, 2) };
}

#[inline(always)]
fn next(counter: &PerCpuArray<u32, 1>) -> u32 {
    match counter.get_ptr_mut(0) {
        Some(c) => unsafe {
            *c = (*c).wrapping_add(1);
            *c
        },
        None => 0,
    }
}

#[xdp]
pub fn lab_bench(ctx: XdpContext) -> u32 {
    let len = ctx.data_end() - ctx.data();
    if len != BENCH_LEN {
        // The last run's program moved the start: back to where the frame began.
        unsafe { bpf_xdp_adjust_head(ctx.ctx, len as i32 - BENCH_LEN as i32) };
    }
    let Some(p) = PRISTINE.get_ptr(0) else {
        return xdp_action::XDP_ABORTED;
    };
    if unsafe { bpf_xdp_store_bytes(ctx.ctx, 0, p as *mut _, BENCH_LEN as u32) } != 0 {
        return xdp_action::XDP_ABORTED;
    }
    if let Some(cfg) = BENCH.get(0)
        && cfg[0] != 0
    {
        let n = next(&BENCH_COUNTER);
        store2(&ctx, cfg[0], n as u16);
        store2(&ctx, cfg[1], (n >> 16) as u16);
    }
    unsafe { TARGET.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}

#[xdp]
pub fn lab_head_pass(ctx: XdpContext) -> u32 {
    unsafe { bpf_xdp_adjust_head(ctx.ctx, -20) };
    xdp_action::XDP_PASS
}

#[xdp]
pub fn lab_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[xdp]
pub fn lab_sink(ctx: XdpContext) -> u32 {
    if let Some(c) = SINK.get_ptr_mut(0) {
        unsafe {
            (*c)[0] += 1;
            (*c)[1] += (ctx.data_end() - ctx.data()) as u64;
        }
    }
    xdp_action::XDP_DROP
}

/// For `lab_redirect`: the destination and source MACs (bytes 0..12) and the egress ifindex
/// (bytes 12..16, native order; 0: pass).
#[btf_map]
static REDIRECT: Array<[u8; 16], 1> = Array::new();

/// The throughput benchmark's ceiling: the least an XDP forwarder does (new MACs, a redirect
/// to the egress interface), with no lookup and no rewrite of the IP packet.
#[xdp]
pub fn lab_redirect(ctx: XdpContext) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + 14 > end {
        return xdp_action::XDP_DROP;
    }
    let Some(cfg) = REDIRECT.get(0) else {
        return xdp_action::XDP_DROP;
    };
    let ifindex = u32::from_ne_bytes([cfg[12], cfg[13], cfg[14], cfg[15]]);
    if ifindex == 0 {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: 12 bytes inside the frame (checked above) from the map value.
    unsafe { core::ptr::copy_nonoverlapping(cfg.as_ptr(), data as *mut u8, 12) };
    unsafe { bpf_redirect(ifindex, 0) as u32 }
}

/// [TCP SYNs seen, bpf_ktime_get_ns of the last one] for `lab_syn`.
#[btf_map]
static SYNS: PerCpuArray<[u64; 2], 1> = PerCpuArray::new();

/// `lab_syn` counts only SYNs whose IPv4 source, masked with `[1]`, is `[0]` (as header bytes;
/// zeros: any).
#[btf_map]
static SYN_FROM: Array<[u32; 2], 1> = Array::new();

#[xdp]
pub fn lab_syn(ctx: XdpContext) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    // Ethernet, IPv4 (any header length), TCP: the flags byte is at 13 in the TCP header.
    if data + 14 + 20 > end {
        return xdp_action::XDP_PASS;
    }
    let eth = data as *const u8;
    let (ethertype, vihl, protocol) = unsafe {
        (
            u16::from_be_bytes([*eth.add(12), *eth.add(13)]),
            *eth.add(14),
            *eth.add(14 + 9),
        )
    };
    if ethertype != 0x0800 || protocol != 6 {
        return xdp_action::XDP_PASS;
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if !(20..=60).contains(&ihl) {
        return xdp_action::XDP_PASS;
    }
    let flags_at = data + 14 + ihl + 13;
    if flags_at + 1 > end {
        return xdp_action::XDP_PASS;
    }
    let flags = unsafe { *(flags_at as *const u8) };
    let [from, mask] = SYN_FROM.get(0).copied().unwrap_or([0, 0]);
    let saddr =
        unsafe { u32::from_ne_bytes([*eth.add(26), *eth.add(27), *eth.add(28), *eth.add(29)]) };
    // SYN without ACK: a new connection.
    if flags & 0x12 == 0x02
        && saddr & mask == from
        && let Some(c) = SYNS.get_ptr_mut(0)
    {
        unsafe {
            (*c)[0] += 1;
            (*c)[1] = aya_ebpf::helpers::bpf_ktime_get_ns();
        }
    }
    xdp_action::XDP_PASS
}

#[xdp]
pub fn lab_tx(ctx: XdpContext) -> u32 {
    let Some(frame) = GEN_FRAME.get_ptr(0) else {
        return xdp_action::XDP_ABORTED;
    };
    if unsafe { bpf_xdp_store_bytes(ctx.ctx, 0, frame as *mut _, GEN_LEN as u32) } != 0 {
        return xdp_action::XDP_ABORTED;
    }
    if let Some(cfg) = GEN.get(0)
        && cfg[1] != 0
    {
        let v = 1024 + (next(&GEN_COUNTER) % cfg[1]) as u16;
        store2(&ctx, cfg[0], v);
        if cfg[2] != 0 {
            store2(&ctx, cfg[2], !v);
        }
        if cfg[3] != 0 {
            store2(&ctx, cfg[3], !v);
        }
    }
    xdp_action::XDP_TX
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
