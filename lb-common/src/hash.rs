//! Hashes that the data plane and the agent must compute identically.
//!
//! The flow hash picks a Maglev slot: `slot = flow_hash(..) % table_size`. It is MurmurHash3's
//! x86_32 block function over the flow's words, with seed 0 and MurmurHash3's finaliser. Every
//! LB node must use the same function, so changing it is a breaking change.

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

#[inline(always)]
const fn round(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// MurmurHash3's 32-bit finaliser: full avalanche of one word.
#[inline(always)]
pub const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Hash of a flow: client address and port, VIP and port, protocol. The addresses are the
/// 16-byte forms of `lb_common` (IPv4 mapped), the ports as they stand in the packet.
#[inline(always)]
pub const fn flow_hash(
    src: &[u32; 4],
    dst: &[u32; 4],
    sport_be: u16,
    dport_be: u16,
    proto: u8,
) -> u32 {
    let mut h = 0u32;
    h = round(h, src[0]);
    h = round(h, src[1]);
    h = round(h, src[2]);
    h = round(h, src[3]);
    h = round(h, dst[0]);
    h = round(h, dst[1]);
    h = round(h, dst[2]);
    h = round(h, dst[3]);
    h = round(h, (sport_be as u32) | ((dport_be as u32) << 16));
    h = round(h, proto as u32);
    fmix32(h ^ 40)
}

/// Hash of a client address alone, for services with ClientIP affinity: every flow of a
/// client lands on the same slot.
#[inline(always)]
pub const fn client_hash(src: &[u32; 4]) -> u32 {
    let mut h = 0u32;
    h = round(h, src[0]);
    h = round(h, src[1]);
    h = round(h, src[2]);
    h = round(h, src[3]);
    fmix32(h ^ 16)
}

/// CRC32c (Castagnoli, reflected polynomial 0x82F63B78) lookup table for the data plane,
/// which recomputes an SCTP packet's checksum after changing its port.
pub const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_table_matches_known_check_value() {
        // The standard check value: CRC32c("123456789") = 0xE3069283.
        let mut crc = !0u32;
        for b in b"123456789" {
            crc = CRC32C_TABLE[((crc ^ u32::from(*b)) & 0xff) as usize] ^ (crc >> 8);
        }
        assert_eq!(!crc, 0xE306_9283);
    }

    #[test]
    fn murmur_rounds_match_reference() {
        // MurmurHash3_x86_32 of the 4 bytes 0x00000000 with seed 0 is 0x2362F9DE.
        assert_eq!(fmix32(round(0, 0) ^ 4), 0x2362_F9DE);
    }

    #[test]
    fn flow_hash_depends_on_every_field() {
        let a = [1, 2, 3, 4];
        let b = [5, 6, 7, 8];
        let base = flow_hash(&a, &b, 10, 20, 6);
        assert_ne!(base, flow_hash(&b, &a, 10, 20, 6));
        assert_ne!(base, flow_hash(&a, &b, 11, 20, 6));
        assert_ne!(base, flow_hash(&a, &b, 10, 21, 6));
        assert_ne!(base, flow_hash(&a, &b, 10, 20, 17));
        assert_eq!(base, flow_hash(&a, &b, 10, 20, 6));
    }
}
