//! L2 announcement frames, sent from user space on an `AF_PACKET` socket (`CAP_NET_RAW`):
//! a gratuitous ARP (an ARP request for the VIP from the VIP, RFC 5227 §3) and an unsolicited
//! Neighbor Advertisement to all nodes with the Override flag (RFC 4861 §7.2.6). Answers to
//! requests are the data plane's (XDP), not this module's.

use std::{
    io,
    net::{IpAddr, Ipv6Addr},
};

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86DD;
const ICMPV6: u8 = 58;

/// The hardware address of interface `name` (in this network namespace).
pub fn interface_mac(name: &str) -> io::Result<[u8; 6]> {
    crate::sys::interface_mac(name)
}

/// Whether interface `name` is up with a carrier (`IFF_RUNNING`).
pub fn link_up(name: &str) -> bool {
    crate::sys::interface_flags(name).is_ok_and(|f| f & libc::IFF_RUNNING != 0)
}

/// The frame that tells the link `ip` is at `mac`: a gratuitous ARP for IPv4, an unsolicited
/// Neighbor Advertisement for IPv6.
pub fn announcement(mac: [u8; 6], ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => {
            let mut f = Vec::with_capacity(60);
            f.extend_from_slice(&[0xff; 6]);
            f.extend_from_slice(&mac);
            f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
            // Ethernet, IPv4, 6, 4, request.
            f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
            f.extend_from_slice(&mac);
            f.extend_from_slice(&a.octets());
            f.extend_from_slice(&[0; 6]);
            f.extend_from_slice(&a.octets());
            f.resize(60, 0);
            f
        }
        IpAddr::V6(a) => {
            let all_nodes: Ipv6Addr = "ff02::1".parse().expect("ff02::1");
            let mut icmp = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
            icmp.extend_from_slice(&a.octets());
            icmp.extend_from_slice(&[2, 1]);
            icmp.extend_from_slice(&mac);
            let sum = icmpv6_checksum(&a, &all_nodes, &icmp);
            icmp[2..4].copy_from_slice(&sum.to_be_bytes());
            let mut f = Vec::with_capacity(86);
            f.extend_from_slice(&[0x33, 0x33, 0, 0, 0, 1]);
            f.extend_from_slice(&mac);
            f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
            f.extend_from_slice(&[ICMPV6, 255]);
            f.extend_from_slice(&a.octets());
            f.extend_from_slice(&all_nodes.octets());
            f.extend_from_slice(&icmp);
            f
        }
    }
}

/// The ICMPv6 checksum (RFC 4443 §2.3) of `msg` from `src` to `dst`.
fn icmpv6_checksum(src: &Ipv6Addr, dst: &Ipv6Addr, msg: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for pair in b.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&(msg.len() as u32).to_be_bytes());
    add(&[0, 0, 0, ICMPV6]);
    add(msg);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends `frame` out of interface `ifindex` as it is.
pub fn send(ifindex: u32, frame: &[u8]) -> io::Result<()> {
    crate::sys::send_frame(ifindex, frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];

    #[test]
    fn gratuitous_arp_is_a_request_for_the_vip_from_the_vip() {
        let f = announcement(MAC, "198.18.100.10".parse().unwrap());
        assert_eq!(f.len(), 60);
        assert_eq!(f[..6], [0xff; 6]);
        assert_eq!(f[6..12], MAC);
        assert_eq!(f[12..14], [0x08, 0x06]);
        assert_eq!(f[20..22], [0, 1], "request");
        assert_eq!(f[22..28], MAC, "sender MAC");
        assert_eq!(f[28..32], [198, 18, 100, 10], "sender address");
        assert_eq!(f[38..42], [198, 18, 100, 10], "target address");
    }

    #[test]
    fn unsolicited_advertisement_overrides_and_checks_out() {
        let vip: Ipv6Addr = "fd00:100::10".parse().unwrap();
        let f = announcement(MAC, IpAddr::V6(vip));
        assert_eq!(f.len(), 86);
        assert_eq!(f[..6], [0x33, 0x33, 0, 0, 0, 1]);
        assert_eq!(f[21], 255, "hop limit");
        let icmp = &f[54..];
        assert_eq!(icmp[0], 136);
        assert_eq!(icmp[4], 0x20, "Override, not Solicited");
        assert_eq!(icmp[8..24], vip.octets());
        assert_eq!(icmp[24..32], [2, 1, 0x02, 0, 0, 0, 0, 0xfe]);
        // The checksum over the message with its checksum field is all ones (RFC 1071).
        let all_nodes: Ipv6Addr = "ff02::1".parse().unwrap();
        assert_eq!(icmpv6_checksum(&vip, &all_nodes, icmp), 0);
    }

    #[test]
    fn the_loopback_interface_has_a_hardware_address_and_is_up() {
        assert_eq!(interface_mac("lo").unwrap(), [0; 6]);
        assert!(interface_mac("no-such-if0").is_err());
        assert!(link_up("lo"));
        assert!(!link_up("no-such-if0"));
    }
}
