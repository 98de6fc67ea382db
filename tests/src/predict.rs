//! Where the data plane should send a flow, computed by the agent's own code (config parser,
//! programmer, Maglev) over the in-memory fake maps, so lab tests can check every flow.

use std::net::{IpAddr, SocketAddr};

use lb_agent::{
    config::Config,
    dataplane::{Programmer, fake::FakeMaps, flow_slot},
};

pub struct Predictor {
    prog: Programmer,
    /// The maps it programmed (the Maglev tables are read from them).
    maps: FakeMaps,
}

impl Predictor {
    pub fn new(config: &str) -> Self {
        let c = Config::parse(config, "lab config").expect("valid lab config");
        let mut prog = Programmer::new(&c.dataplane, c.maglev.seed);
        let mut maps = FakeMaps::default();
        prog.apply(&c.desired, &mut maps).expect("program the fake");
        Self { prog, maps }
    }

    /// The backend a new flow from `client` to `service` goes to.
    pub fn backend(&self, service: &str, client: SocketAddr) -> SocketAddr {
        let s = self
            .prog
            .services()
            .find(|s| s.spec.name == service)
            .unwrap_or_else(|| panic!("no service {service}"));
        let f = s.spec.frontend;
        let slot = flow_slot(
            client,
            SocketAddr::new(f.vip, f.port),
            f.protocol,
            s.spec.affinity_timeout.is_some(),
            s.spec.table_size,
        );
        let table = self.maps.table(&s.value()).expect("its Maglev table");
        let id = table[slot as usize];
        *s.backends
            .iter()
            .find(|(_, b)| b.id == id)
            .unwrap_or_else(|| panic!("{service}: slot {slot} is empty"))
            .0
    }

    /// The lab name of the backend a new flow goes to (`b<i>`).
    pub fn backend_name(&self, service: &str, client: SocketAddr) -> String {
        lab_name(self.backend(service, client).ip())
    }
}

/// `b<i>` for the lab's backend addresses 198.18.1.1<i> / fd00:1::1<i>.
pub fn lab_name(ip: IpAddr) -> String {
    let last = match ip {
        IpAddr::V4(a) => u32::from(a.octets()[3]),
        // fd00:1::1<i> is hex text: 0x11 → "11".
        IpAddr::V6(a) => format!("{:x}", a.segments()[7]).parse().unwrap_or(0),
    };
    format!("b{}", last - 10)
}
