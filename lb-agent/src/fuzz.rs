//! Entry points for fuzzing: each takes arbitrary bytes and feeds them to one of the agent's
//! decoders of outside input, as the agent does, and panics only when an invariant breaks.
//! `fuzz/` runs them under `cargo fuzz` (`scripts/fuzz`); the unit tests replay the corpus
//! kept in `fuzz/corpus/<target>/` through them, so every input that once found a bug stays a
//! test.

use std::collections::BTreeSet;

use crate::{
    announce::{bfd, gossip},
    model::DesiredState,
    sources::kubernetes::fuzz as k8s,
};

/// A target: an input in, a panic only on a broken invariant.
pub type Target = fn(&[u8]);

/// The targets, by the name of their corpus folder.
pub const TARGETS: [(&str, Target); 7] = [
    ("config", config),
    ("annotations", annotations),
    ("crd", crd),
    ("gossip", gossip),
    ("bfd", bfd),
    ("bgp", bgp),
    ("http_probe", http_probe),
];

/// A standalone config file.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(c) = crate::config::Config::parse(&text, "fuzz") {
        // What loads is what the data plane is given: its invariants hold.
        check_desired(&c.desired);
    }
}

/// A LoadBalancer Service's annotations (`key=value` lines), translated with one ready
/// endpoint on this node.
pub fn annotations(data: &[u8]) {
    check_desired(&k8s::annotations(data));
}

/// A custom resource's spec (JSON), as each of weir's kinds: decoded as the agent reads them,
/// then planned (pools, BGP, L2) for a node.
pub fn crd(data: &[u8]) {
    k8s::crd(data);
}

/// A gossip datagram, authenticated with a key.
pub fn gossip(data: &[u8]) {
    let key = gossip::wire::Key::new(Some(b"fuzz-key"));
    if let Ok(hb) = gossip::decode(&key, data) {
        // Only what the key sealed opens.
        let sealed = key.seal(&serde_json::to_vec(&hb).expect("a heartbeat encodes"));
        assert_eq!(gossip::decode(&key, &sealed).ok(), Some(hb));
    }
}

/// A BFD control packet.
pub fn bfd(data: &[u8]) {
    if let Ok(p) = bfd::Packet::decode(data) {
        assert_eq!(
            bfd::Packet::decode(&p.encode()).ok(),
            Some(p),
            "a decoded packet encodes to itself"
        );
    }
}

/// Bytes from a BGP peer: split into messages as the session reads them, and an OPEN
/// negotiated.
pub fn bgp(data: &[u8]) {
    use rustbgpd_wire::{MAX_MESSAGE_LEN, Message};
    let mut buf = bytes::BytesMut::from(data);
    let ctx = crate::announce::bgp::session::Context::example(64512, 64513);
    while let Ok(Some(len)) = rustbgpd_wire::peek_message_length(&buf, MAX_MESSAGE_LEN) {
        if buf.len() < usize::from(len) || len == 0 {
            return;
        }
        let mut frame = buf.split_to(usize::from(len)).freeze();
        match rustbgpd_wire::decode_message(&mut frame, MAX_MESSAGE_LEN) {
            Ok(Message::Open(open)) => {
                let _ = crate::announce::bgp::session::negotiate(&ctx, &open);
            }
            Ok(_) => {}
            Err(e) => {
                let _ = e.to_notification();
                return;
            }
        }
    }
}

/// The first bytes of an HTTP health check's response.
pub fn http_probe(data: &[u8]) {
    if let Ok(Some(code)) = crate::health::probe::http_status(data) {
        assert!((100..=999).contains(&code), "status {code}");
    }
}

/// The data plane's invariants of a desired state: every frontend once, every backend of
/// its frontend's address family and listed once, source ranges of that family.
/// (`Frontend::overlaps`: no two frontends a client could reach both of.)
pub fn check_desired(d: &DesiredState) {
    for (i, s) in d.services.iter().enumerate() {
        let f = &s.frontend;
        if let Some(o) = d.services[i + 1..].iter().find(|o| o.frontend.overlaps(f)) {
            panic!("{} and {}: overlapping frontends {f}", s.name, o.name);
        }
        let mut addrs = BTreeSet::new();
        for b in &s.backends {
            assert_eq!(
                b.addr.is_ipv4(),
                f.vip.is_ipv4(),
                "{}: backend {} of another family than {}",
                s.name,
                b.addr,
                f.vip
            );
            assert!(addrs.insert(b.addr), "{}: backend {} twice", s.name, b.addr);
        }
        for r in &s.source_ranges {
            assert_eq!(r.addr().is_ipv4(), f.vip.is_ipv4(), "{}: range {r}", s.name);
        }
    }
}

#[cfg(test)]
mod tests;
