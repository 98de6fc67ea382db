//! A namespace for BPF_PROG_TEST_RUN: a "client side" veth `c0` (the ingress of the test
//! runs) and a "backend side" veth `b0` whose static neighbours make FIB lookups succeed for
//! the backends 198.18.1.11-13 and fd00:1::11-13 (198.18.1.14 has none).

use std::net::IpAddr;

use crate::netns::Netns;

/// The MAC the testbed gives a backend address: 02:00:00:00:01:<last byte>.
pub fn backend_mac(ip: IpAddr) -> [u8; 6] {
    let last = match ip {
        IpAddr::V4(a) => a.octets()[3],
        IpAddr::V6(a) => a.octets()[15],
    };
    [0x02, 0, 0, 0, 0x01, last]
}

pub struct Testbed {
    pub ns: Netns,
    /// Ingress interface of the test runs.
    pub c_ifindex: u32,
    /// The backend-side interface: the redirect target.
    pub b_ifindex: u32,
    /// Its MAC: the source of redirected frames.
    pub b_mac: [u8; 6],
}

impl Testbed {
    pub fn new() -> Self {
        let ns = Netns::new("dp");
        ns.ip("link add c0 type veth peer name c1");
        ns.ip("link add b0 type veth peer name b1");
        for i in ["c0", "c1", "b0", "b1"] {
            ns.ip(&format!("link set {i} up"));
        }
        ns.ip("addr add 198.18.0.254/24 dev c0");
        ns.ip("addr add fd00:18::fe/64 dev c0 nodad");
        ns.ip("addr add 198.18.1.1/24 dev b0");
        ns.ip("addr add fd00:1::1/64 dev b0 nodad");
        for n in 11..=13 {
            for ip in [format!("198.18.1.{n}"), format!("fd00:1::{n}")] {
                let mac = backend_mac(ip.parse().expect("ip"))
                    .map(|b| format!("{b:02x}"))
                    .join(":");
                ns.ip(&format!("neigh add {ip} lladdr {mac} dev b0 nud permanent"));
            }
        }
        ns.sysctl("net.ipv4.ip_forward", "1");
        ns.sysctl("net.ipv6.conf.all.forwarding", "1");
        Self {
            c_ifindex: ns.ifindex("c0"),
            b_ifindex: ns.ifindex("b0"),
            b_mac: ns.mac("b0"),
            ns,
        }
    }

    /// The `struct xdp_md` context for a test run of a `len`-byte frame arriving on `c0`.
    pub fn xdp_ctx(&self, len: usize) -> Vec<u8> {
        let mut ctx = Vec::with_capacity(24);
        for v in [0u32, len as u32, 0, self.c_ifindex, 0, 0] {
            ctx.extend_from_slice(&v.to_ne_bytes());
        }
        ctx
    }
}

impl Default for Testbed {
    fn default() -> Self {
        Self::new()
    }
}
