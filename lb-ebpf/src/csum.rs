//! Checksums. Internet checksums are updated incrementally (RFC 1624, eqn. 3:
//! `HC' = ~(~HC + ~m + m')`). Every value here is taken as it stands in memory (network byte
//! order read as a native integer): the one's complement sum does not depend on byte order as
//! long as the checksum and the data are read the same way (RFC 1071, 2.(B)).

use lb_common::{hash::CRC32C_TABLE, limits};

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_skb_load_bytes, bpf_xdp_load_bytes},
    programs::{TcContext, XdpContext},
};

/// The CRC32c table as read-only data of the program.
static CRC_TABLE: [u32; 256] = CRC32C_TABLE;

#[inline(always)]
fn fold(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// Checksum after a 16-bit field changed from `old` to `new`.
#[inline(always)]
pub fn replace2(check: u16, old: u16, new: u16) -> u16 {
    !fold((!check) as u32 + (!old) as u32 + new as u32)
}

/// Checksum after a 32-bit field changed from `old` to `new`.
#[inline(always)]
pub fn replace4(check: u16, old: u32, new: u32) -> u16 {
    let s = (!check) as u32 + ((!old) >> 16) + ((!old) & 0xffff) + (new >> 16) + (new & 0xffff);
    !fold(s)
}

/// Checksum after an address changed: its last word for IPv4 (mapped form), all four for IPv6.
#[inline(always)]
pub fn replace_addr(check: u16, old: &[u32; 4], new: &[u32; 4], v6: bool) -> u16 {
    if v6 {
        let mut c = check;
        for i in 0..4 {
            c = replace4(c, old[i], new[i]);
        }
        c
    } else {
        replace4(check, old[3], new[3])
    }
}

/// UDP over IPv4 uses 0 for "no checksum"; a computed 0 is sent as 0xffff (RFC 768).
#[inline(always)]
pub fn udp_mangle0(check: u16) -> u16 {
    if check == 0 { 0xffff } else { check }
}

/// Reads packet bytes through the kernel's bounds-checked copy helpers. Byte loops over
/// packet pointers do not survive LLVM: it turns `p + 1 > end` into `p >= end`, which the
/// verifier cannot use to prove the access.
pub trait LoadBytes {
    /// Copies `N` bytes at `off` into `buf`.
    fn load<const N: usize>(&self, off: usize, buf: &mut [u8; N]) -> bool;
}

impl LoadBytes for XdpContext {
    #[inline(always)]
    fn load<const N: usize>(&self, off: usize, buf: &mut [u8; N]) -> bool {
        unsafe { bpf_xdp_load_bytes(self.ctx, off as u32, buf.as_mut_ptr().cast(), N as u32) == 0 }
    }
}

impl LoadBytes for TcContext {
    #[inline(always)]
    fn load<const N: usize>(&self, off: usize, buf: &mut [u8; N]) -> bool {
        let skb = self.as_ptr().cast();
        unsafe { bpf_skb_load_bytes(skb, off as u32, buf.as_mut_ptr().cast(), N as u32) == 0 }
    }
}

#[inline(always)]
fn crc_bytes<const N: usize>(mut crc: u32, buf: &[u8; N]) -> u32 {
    for b in buf {
        crc = CRC_TABLE[((crc ^ *b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

/// CRC32c of the SCTP packet of `len` bytes at `off`, ready to store (little-endian, as
/// RFC 4960 appendix B places it). The caller zeroes the checksum field first. `None` when
/// the packet is not a whole number of 4-byte words (SCTP pads every chunk to 4 bytes), is
/// shorter than `len` or than an SCTP header, or is longer than the data plane handles.
///
/// Shaped for the verifier: copies have a constant size (a variable one must be proven
/// non-zero, which LLVM's rewrites hide), and no branch inside a loop depends on the data (each
/// would multiply the states the verifier walks). Whole 32-byte chunks first, then 4-byte ones.
#[inline(never)]
pub fn sctp_crc32c<C: LoadBytes>(ctx: &C, off: usize, len: usize) -> Option<u32> {
    const BIG: usize = 32;
    const MAX: usize = limits::MAX_SCTP_LEN as usize;
    if !(12..=MAX).contains(&len) || !len.is_multiple_of(4) {
        return None;
    }
    let mut crc = !0u32;
    let mut pos = 0usize;
    let mut big = [0u8; BIG];
    for _ in 0..MAX / BIG {
        if pos + BIG > len {
            break;
        }
        if !ctx.load(off + pos, &mut big) {
            return None;
        }
        crc = crc_bytes(crc, &big);
        pos += BIG;
    }
    let mut word = [0u8; 4];
    for _ in 0..BIG / 4 {
        if pos >= len {
            break;
        }
        if !ctx.load(off + pos, &mut word) {
            return None;
        }
        crc = crc_bytes(crc, &word);
        pos += 4;
    }
    Some(!crc)
}
