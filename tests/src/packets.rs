//! Test frames, built with etherparse (whose checksum code is independent of the data
//! plane's) and, for SCTP, the crc32c crate.

use std::net::IpAddr;

use etherparse::{
    IpHeaders, IpNumber, Ipv4Extensions, Ipv4Header, Ipv6Extensions, Ipv6Header, Ipv6RawExtHeader,
    Ipv6RoutingExtensions, PacketBuilder,
};

#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        syn: bool,
        payload: Vec<u8>,
    },
    Udp {
        sport: u16,
        dport: u16,
        payload: Vec<u8>,
        /// IPv4 only: send without a checksum (0).
        no_checksum: bool,
    },
    Sctp {
        sport: u16,
        dport: u16,
        vtag: u32,
        chunks: Vec<u8>,
    },
    /// ICMP/ICMPv6 echo request (or reply).
    Echo {
        id: u16,
        seq: u16,
        reply: bool,
        payload: Vec<u8>,
    },
    /// ICMP "fragmentation needed" / ICMPv6 "packet too big" quoting `quoted` (an IP packet).
    TooBig { mtu: u16, quoted: Vec<u8> },
    /// Any other IP payload.
    Raw { proto: u8, payload: Vec<u8> },
}

/// A frame: Ethernet, up to two VLAN tags, IPv4 (with options) or IPv6 (with extension
/// headers), and a layer-4 part.
#[derive(Clone, Debug)]
pub struct Pkt {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// 802.1Q/802.1ad tags, outermost first (the first of two is sent as 802.1ad).
    pub vlans: Vec<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub ttl: u8,
    /// IPv4 options (a multiple of 4 bytes).
    pub ipv4_options: Vec<u8>,
    /// IPv6: put hop-by-hop, routing and destination-options headers before layer 4.
    pub ipv6_ext_headers: bool,
    pub l4: L4,
}

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];

impl Pkt {
    pub fn new(src: IpAddr, dst: IpAddr, l4: L4) -> Self {
        Self {
            src_mac: CLIENT_MAC,
            dst_mac: LB_MAC,
            vlans: vec![],
            src,
            dst,
            ttl: 64,
            ipv4_options: vec![],
            ipv6_ext_headers: false,
            l4,
        }
    }

    pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16) -> Self {
        Self::new(
            src.parse().expect("src"),
            dst.parse().expect("dst"),
            L4::Tcp {
                sport,
                dport,
                syn: true,
                payload: vec![],
            },
        )
    }

    /// A segment of an established connection (ACK, no payload).
    pub fn tcp_ack(src: &str, sport: u16, dst: &str, dport: u16) -> Self {
        let mut p = Self::tcp(src, sport, dst, dport);
        if let L4::Tcp { syn, .. } = &mut p.l4 {
            *syn = false;
        }
        p
    }

    pub fn udp(src: &str, sport: u16, dst: &str, dport: u16, payload: &[u8]) -> Self {
        Self::new(
            src.parse().expect("src"),
            dst.parse().expect("dst"),
            L4::Udp {
                sport,
                dport,
                payload: payload.to_vec(),
                no_checksum: false,
            },
        )
    }

    /// The IP packet (no Ethernet/VLAN).
    pub fn ip_bytes(&self) -> Vec<u8> {
        let ip = match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut h = Ipv4Header::new(0, self.ttl, IpNumber(0), s.octets(), d.octets())
                    .expect("ipv4 header");
                h.options = etherparse::Ipv4Options::try_from(&self.ipv4_options[..])
                    .expect("ipv4 options");
                IpHeaders::Ipv4(h, Ipv4Extensions::default())
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let h = Ipv6Header {
                    traffic_class: 0,
                    flow_label: Default::default(),
                    payload_length: 0,
                    next_header: IpNumber(0),
                    hop_limit: self.ttl,
                    source: s.octets(),
                    destination: d.octets(),
                };
                let mut ext = Ipv6Extensions::default();
                if self.ipv6_ext_headers {
                    // PadN options; a type-0-free routing header with no segments left.
                    let pad = [1u8, 4, 0, 0, 0, 0];
                    ext.hop_by_hop_options =
                        Some(Ipv6RawExtHeader::new_raw(IpNumber(0), &pad).expect("hbh"));
                    ext.routing = Some(Ipv6RoutingExtensions {
                        routing: Ipv6RawExtHeader::new_raw(IpNumber(0), &[4, 0, 0, 0, 0, 0])
                            .expect("routing"),
                        final_destination_options: Some(
                            Ipv6RawExtHeader::new_raw(IpNumber(0), &pad).expect("dst opts"),
                        ),
                    });
                }
                IpHeaders::Ipv6(h, ext)
            }
            _ => panic!("mixed address families"),
        };
        let b = PacketBuilder::ip(ip);
        let v6 = self.src.is_ipv6();
        let mut out = Vec::new();
        match &self.l4 {
            L4::Tcp {
                sport,
                dport,
                syn,
                payload,
            } => {
                let t = b.tcp(*sport, *dport, 1000, 65535);
                let t = if *syn { t.syn() } else { t.ack(1) };
                t.write(&mut out, payload).expect("tcp");
            }
            L4::Udp {
                sport,
                dport,
                payload,
                no_checksum,
            } => {
                b.udp(*sport, *dport).write(&mut out, payload).expect("udp");
                if *no_checksum {
                    let at = out.len() - payload.len() - 2;
                    out[at] = 0;
                    out[at + 1] = 0;
                }
            }
            L4::Sctp {
                sport,
                dport,
                vtag,
                chunks,
            } => {
                let sctp = sctp_packet(*sport, *dport, *vtag, chunks);
                b.write(&mut out, IpNumber(132), &sctp).expect("sctp");
            }
            L4::Echo {
                id,
                seq,
                reply,
                payload,
            } => match (v6, reply) {
                (false, false) => b.icmpv4_echo_request(*id, *seq).write(&mut out, payload),
                (false, true) => b.icmpv4_echo_reply(*id, *seq).write(&mut out, payload),
                (true, false) => b.icmpv6_echo_request(*id, *seq).write(&mut out, payload),
                (true, true) => b.icmpv6_echo_reply(*id, *seq).write(&mut out, payload),
            }
            .expect("echo"),
            L4::TooBig { mtu, quoted } => {
                if v6 {
                    b.icmpv6(etherparse::Icmpv6Type::PacketTooBig {
                        mtu: u32::from(*mtu),
                    })
                    .write(&mut out, quoted)
                } else {
                    b.icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                        etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                            next_hop_mtu: *mtu,
                        },
                    ))
                    .write(&mut out, quoted)
                }
                .expect("icmp error");
            }
            L4::Raw { proto, payload } => {
                b.write(&mut out, IpNumber(*proto), payload).expect("raw");
            }
        }
        out
    }

    /// The whole frame.
    pub fn bytes(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(128);
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        let ethertype: u16 = if self.src.is_ipv6() { 0x86dd } else { 0x0800 };
        for (i, vid) in self.vlans.iter().enumerate() {
            let tpid: u16 = if i == 0 && self.vlans.len() == 2 {
                0x88a8
            } else {
                0x8100
            };
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&vid.to_be_bytes());
        }
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(&self.ip_bytes());
        f
    }
}

/// An SCTP packet (common header and chunks) with its CRC32c.
pub fn sctp_packet(sport: u16, dport: u16, vtag: u32, chunks: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(12 + chunks.len());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&vtag.to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    p.extend_from_slice(chunks);
    let crc = crc32c::crc32c(&p);
    p[8..12].copy_from_slice(&crc.to_le_bytes());
    p
}

/// Whether an SCTP packet's CRC32c is right.
pub fn sctp_crc_ok(sctp: &[u8]) -> bool {
    if sctp.len() < 12 {
        return false;
    }
    let mut p = sctp.to_vec();
    let stored = u32::from_le_bytes([p[8], p[9], p[10], p[11]]);
    p[8..12].copy_from_slice(&[0; 4]);
    crc32c::crc32c(&p) == stored
}

/// An SCTP INIT chunk (RFC 4960 3.3.2) with the given initiate tag.
pub fn sctp_init_chunk(initiate_tag: u32) -> Vec<u8> {
    let mut c = vec![1u8, 0, 0, 20];
    c.extend_from_slice(&initiate_tag.to_be_bytes());
    c.extend_from_slice(&65535u32.to_be_bytes()); // a_rwnd
    c.extend_from_slice(&1u16.to_be_bytes()); // outbound streams
    c.extend_from_slice(&1u16.to_be_bytes()); // inbound streams
    c.extend_from_slice(&initiate_tag.to_be_bytes()); // initial TSN
    c
}

/// An ARP request from the client for `target`, padded to the Ethernet minimum.
pub fn arp_request(sender: &str, target: &str) -> Vec<u8> {
    let ip = |a: &str| {
        a.parse::<std::net::Ipv4Addr>()
            .expect("an IPv4 address")
            .octets()
    };
    let mut f = Vec::new();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&ip(sender));
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&ip(target));
    f.resize(60, 0);
    f
}
