//! XDP programs for the lab and the benchmarks (not part of weir).
//!
//! - `lab_pass`: lets everything through. A veth only picks up frames its peer sent with
//!   XDP_TX when it runs an XDP program itself, and a kernel-stack baseline needs the same.
//! - `lab_sink`: counts frames and bytes (per CPU) and drops them: the receiver of the
//!   throughput benchmark.
//! - `lab_tx`: sends the frame back out (XDP_TX): the generator, run with BPF_PROG_TEST_RUN
//!   in live-frames mode.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::PerCpuArray,
    macros::{btf_map, xdp},
    programs::XdpContext,
};

/// [frames, bytes] received by `lab_sink`.
#[btf_map]
static SINK: PerCpuArray<[u64; 2], 1> = PerCpuArray::new();

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

#[xdp]
pub fn lab_tx(_ctx: XdpContext) -> u32 {
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
