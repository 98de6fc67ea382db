//! Checksums. Internet checksums are updated incrementally (RFC 1624, eqn. 3:
//! `HC' = ~(~HC + ~m + m')`). Every value here is taken as it stands in memory (network byte
//! order read as a native integer): the one's complement sum does not depend on byte order as
//! long as the checksum and the data are read the same way (RFC 1071, 2.(B)).

use lb_common::{hash::CRC32C_TABLE, limits};

use crate::parse::ptr_at;

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

/// CRC32c of the SCTP packet of `len` bytes at `off`, with its checksum field (bytes 8..12)
/// taken as zero, ready to store (little-endian, as RFC 4960 appendix B places it).
/// `None` when the packet is shorter than `len` or longer than the data plane handles.
#[inline(never)]
pub fn sctp_crc32c(data: usize, end: usize, off: usize, len: usize) -> Option<u32> {
    if len > limits::MAX_SCTP_LEN as usize {
        return None;
    }
    let mut crc = !0u32;
    let mut i = 0usize;
    while i < limits::MAX_SCTP_LEN as usize {
        if i >= len {
            break;
        }
        let p = ptr_at::<u8>(data, end, off + i)?;
        let mut b = unsafe { *p } as u32;
        if i >= 8 && i < 12 {
            b = 0;
        }
        crc = CRC_TABLE[((crc ^ b) & 0xff) as usize] ^ (crc >> 8);
        i += 1;
    }
    Some(!crc)
}
