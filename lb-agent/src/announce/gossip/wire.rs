//! The heartbeat datagram: `WGH1`, an HMAC-SHA256 tag over the magic and the body, and the
//! body (the heartbeat as JSON). With a shared key (`announce.gossip.key_file`) only a holder
//! of the key can make a datagram that opens; without one the tag is zero and not checked.
//!
//! HMAC from `ring`, already in the agent for TLS: a well-kept implementation whose `verify`
//! compares in constant time.

use std::sync::atomic::{AtomicU64, Ordering};

use ring::hmac;

pub const MAGIC: &[u8; 4] = b"WGH1";
const TAG: usize = 32;

/// The shared key, or none (unauthenticated gossip).
#[derive(Clone)]
pub struct Key(Option<hmac::Key>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Key(<redacted>)"
        } else {
            "Key(none)"
        })
    }
}

impl Key {
    pub fn new(secret: Option<&[u8]>) -> Self {
        Self(secret.map(|s| hmac::Key::new(hmac::HMAC_SHA256, s)))
    }

    pub fn authenticated(&self) -> bool {
        self.0.is_some()
    }

    fn tag(&self, body: &[u8]) -> [u8; TAG] {
        let mut out = [0u8; TAG];
        if let Some(k) = &self.0 {
            let mut ctx = hmac::Context::with_key(k);
            ctx.update(MAGIC);
            ctx.update(body);
            out.copy_from_slice(ctx.sign().as_ref());
        }
        out
    }

    /// The datagram for `body`.
    pub fn seal(&self, body: &[u8]) -> Vec<u8> {
        let mut d = Vec::with_capacity(MAGIC.len() + TAG + body.len());
        d.extend_from_slice(MAGIC);
        d.extend_from_slice(&self.tag(body));
        d.extend_from_slice(body);
        d
    }

    /// The body of `datagram`, if it is a heartbeat datagram whose tag this key made.
    pub fn open<'a>(&self, datagram: &'a [u8]) -> Result<&'a [u8], Reject> {
        let Some(rest) = datagram.strip_prefix(MAGIC) else {
            return Err(Reject::Malformed);
        };
        if rest.len() < TAG {
            return Err(Reject::Malformed);
        }
        let (tag, body) = rest.split_at(TAG);
        if let Some(k) = &self.0 {
            let mut signed = Vec::with_capacity(MAGIC.len() + body.len());
            signed.extend_from_slice(MAGIC);
            signed.extend_from_slice(body);
            hmac::verify(k, &signed, tag).map_err(|_| Reject::BadTag)?;
        }
        Ok(body)
    }
}

/// Why a datagram changed nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reject {
    /// From an address that is no configured (or selected) peer's.
    UnknownSender,
    /// Not a heartbeat datagram (another protocol, the old unauthenticated format, truncated).
    Malformed,
    /// The tag is not this key's: a forgery, or a node with another key.
    BadTag,
    /// Not newer than the last one accepted from that node: a replay (or reordering).
    Replayed,
    /// Another node's name from an address a live node speaks from, or a live node's name
    /// from another address.
    NameConflict,
    /// This node's own name.
    OwnName,
}

impl Reject {
    pub const ALL: [Self; 6] = [
        Self::UnknownSender,
        Self::Malformed,
        Self::BadTag,
        Self::Replayed,
        Self::NameConflict,
        Self::OwnName,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::UnknownSender => "unknown_sender",
            Self::Malformed => "malformed",
            Self::BadTag => "bad_tag",
            Self::Replayed => "replayed",
            Self::NameConflict => "name_conflict",
            Self::OwnName => "own_name",
        }
    }
}

/// Rejected datagrams by reason, since start (read by the metrics and the API, which see the
/// gossip task's counts as they are, through the `Arc` in `Status`).
#[derive(Debug, Default)]
pub struct Rejections([AtomicU64; Reject::ALL.len()]);

/// Statuses are compared to publish only changes: the counts are not part of that.
impl PartialEq for Rejections {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Rejections {}

impl Rejections {
    pub fn count(&self, r: Reject) {
        self.0[r as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, r: Reject) -> u64 {
        self.0[r as usize].load(Ordering::Relaxed)
    }

    /// Every reason with its count.
    pub fn all(&self) -> std::collections::BTreeMap<&'static str, u64> {
        Reject::ALL
            .iter()
            .map(|r| (r.name(), self.get(*r)))
            .collect()
    }
}
