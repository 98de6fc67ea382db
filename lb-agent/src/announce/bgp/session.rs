//! One BGP session over one TCP connection: OPEN exchange and negotiation, keepalive and
//! hold timers, UPDATEs that follow the wanted routes, NOTIFICATION on every error.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use rustbgpd_wire::{
    Afi, AsPath, AsPathSegment, Capability, GracefulRestartFamily, LargeCommunity, MAX_MESSAGE_LEN,
    Message, MpReachNlri, MpUnreachNlri, NotificationCode, NotificationMessage, OpenMessage,
    Origin, PathAttribute, Safi, UpdateMessage,
    nlri::{Ipv4NlriEntry, Ipv4Prefix, Ipv6Prefix, NlriEntry, Prefix},
    notification,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::watch,
    time::Instant,
};
use tracing::info;

use super::{Routes, Slot, State};
use crate::{
    announce::bfd,
    announce::{BgpPeerConfig, RouteAttrs},
};

/// AS_TRANS (RFC 6793): the 2-octet stand-in for a 4-octet AS number in OPEN.
const AS_TRANS: u16 = 23456;
/// How long the peer's OPEN (and then its KEEPALIVE) may take.
const OPEN_WAIT: Duration = Duration::from_secs(30);
/// Longest wait for one message to be written before the session is given up.
const WRITE_WAIT: Duration = Duration::from_secs(10);
/// Prefixes per UPDATE: keeps every message under 4096 octets.
const IPV4_PER_UPDATE: usize = 500;
const IPV6_PER_UPDATE: usize = 150;
/// Cease subcodes (RFC 4486).
const CEASE_ADMIN_SHUTDOWN: u8 = 2;
const CEASE_OUT_OF_RESOURCES: u8 = 8;

/// What a session needs to know; one per peer.
#[derive(Clone, Debug)]
pub struct Context {
    /// This node's AS towards the peer.
    pub local_as: u32,
    pub router_id: Ipv4Addr,
    pub peer: BgpPeerConfig,
    /// Graceful restart (RFC 4724), when on.
    pub graceful: Option<Graceful>,
    /// Set before the speaker stops when the data plane stays: sessions that negotiated
    /// graceful restart close without withdrawing or a NOTIFICATION, so that the peers keep
    /// the routes (as stale) until the next agent is back.
    pub keep_routes: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// This speaker's graceful-restart capability: the data plane forwards across an agent
/// restart (it is pinned), so the forwarding state is always preserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Graceful {
    /// Seconds the peers keep the routes while the session is down (at most 4095).
    pub restart_time: u16,
    /// The R bit: this agent has just restarted (it adopted a running data plane).
    pub restarted: bool,
}

impl Context {
    /// A session of this node (198.18.2.11, AS `local_as`) with a peer at 198.18.2.254 (AS
    /// `remote_as`): the tests' and the fuzz target's.
    #[doc(hidden)]
    pub fn example(local_as: u32, remote_as: u32) -> Self {
        Self {
            local_as,
            router_id: Ipv4Addr::new(198, 18, 2, 11),
            peer: BgpPeerConfig {
                address: IpAddr::V4(Ipv4Addr::new(198, 18, 2, 254)),
                remote_as,
                local_as: None,
                port: 179,
                password: Some(crate::announce::Secret("x".into())),
                hold_time: Duration::from_secs(9),
                connect_retry: Duration::from_secs(2),
                bfd: false,
                multihop: None,
                passive: false,
            },
            graceful: None,
            keep_routes: std::sync::Arc::default(),
        }
    }

    pub fn internal(&self) -> bool {
        self.local_as == self.peer.remote_as
    }

    /// Our OPEN: 4-octet AS, IPv4 and IPv6 unicast, route refresh.
    pub fn open(&self) -> OpenMessage {
        OpenMessage {
            version: 4,
            my_as: u16::try_from(self.local_as).unwrap_or(AS_TRANS),
            hold_time: self.peer.hold_time.as_secs() as u16,
            bgp_identifier: self.router_id,
            capabilities: vec![
                Capability::MultiProtocol {
                    afi: Afi::Ipv4,
                    safi: Safi::Unicast,
                },
                Capability::MultiProtocol {
                    afi: Afi::Ipv6,
                    safi: Safi::Unicast,
                },
                Capability::RouteRefresh,
                Capability::FourOctetAs { asn: self.local_as },
            ]
            .into_iter()
            .chain(self.graceful.map(|g| {
                Capability::GracefulRestart {
                    restart_state: g.restarted,
                    notification: false,
                    restart_time: g.restart_time,
                    families: [Afi::Ipv4, Afi::Ipv6]
                        .into_iter()
                        .map(|afi| GracefulRestartFamily {
                            afi,
                            safi: Safi::Unicast,
                            forwarding_preserved: true,
                        })
                        .collect(),
                }
            }))
            .collect(),
        }
    }
}

/// Why a session ended without an error.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The speaker stopped: routes withdrawn, Cease sent.
    Stopped,
    /// The speaker stopped with the data plane staying: the connection closed without a
    /// NOTIFICATION, the routes left to the peer's graceful restart.
    Kept,
}

/// A session error, with the NOTIFICATION to send (if any) already sent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the peer closed the connection")]
    Closed,
    #[error("NOTIFICATION from the peer: {0}")]
    Notified(String),
    #[error("NOTIFICATION sent: {0}")]
    Sent(String),
    #[error("BFD: the peer is down")]
    BfdDown,
}

/// What both sides agreed in their OPENs.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(
    clippy::struct_excessive_bools,
    reason = "independent capabilities, each negotiated on or off"
)]
pub struct Families {
    pub ipv4: bool,
    pub ipv6: bool,
    pub four_octet_as: bool,
    /// Seconds; 0: no keepalives and no hold timer.
    pub hold_time: u16,
    /// Both sides support graceful restart.
    pub graceful: bool,
}

/// Checks the peer's OPEN against the config; `Err` carries the NOTIFICATION to send.
pub fn negotiate(ctx: &Context, open: &OpenMessage) -> Result<Families, NotificationMessage> {
    let refuse = |subcode: u8| {
        NotificationMessage::new(NotificationCode::OpenMessage, subcode, Bytes::new())
    };
    if open.version != 4 {
        return Err(NotificationMessage::new(
            NotificationCode::OpenMessage,
            1,
            Bytes::from_static(&[0, 4]),
        ));
    }
    if open.four_byte_as() != ctx.peer.remote_as {
        return Err(refuse(2));
    }
    if open.bgp_identifier.is_unspecified() {
        return Err(refuse(3));
    }
    if open.hold_time == 1 || open.hold_time == 2 {
        return Err(refuse(6));
    }
    let four_octet_as = open
        .capabilities
        .iter()
        .any(|c| matches!(c, Capability::FourOctetAs { .. }));
    if !four_octet_as && ctx.local_as > u32::from(u16::MAX) {
        // An old speaker would need AS4_PATH; this speaker does not send it.
        return Err(NotificationMessage::new(
            NotificationCode::Cease,
            CEASE_OUT_OF_RESOURCES,
            Bytes::new(),
        ));
    }
    let mp: Vec<(Afi, Safi)> = open
        .capabilities
        .iter()
        .filter_map(|c| match c {
            Capability::MultiProtocol { afi, safi } => Some((*afi, *safi)),
            _ => None,
        })
        .collect();
    // No multiprotocol capability at all means IPv4 unicast only (RFC 4760 §8).
    let ipv4 = mp.is_empty() || mp.contains(&(Afi::Ipv4, Safi::Unicast));
    let ipv6 = mp.contains(&(Afi::Ipv6, Safi::Unicast));
    let graceful = ctx.graceful.is_some()
        && open
            .capabilities
            .iter()
            .any(|c| matches!(c, Capability::GracefulRestart { .. }));
    Ok(Families {
        ipv4,
        ipv6,
        four_octet_as,
        hold_time: open.hold_time.min(ctx.peer.hold_time.as_secs() as u16),
        graceful,
    })
}

/// The path attributes of routes to `vips` carrying `extra`.
pub fn attributes(
    ctx: &Context,
    extra: &RouteAttrs,
    next_hop: IpAddr,
    vips: &[IpAddr],
) -> Vec<PathAttribute> {
    let mut attrs = vec![
        PathAttribute::Origin(Origin::Igp),
        PathAttribute::AsPath(AsPath {
            segments: if ctx.internal() {
                Vec::new()
            } else {
                vec![AsPathSegment::AsSequence(vec![ctx.local_as])]
            },
        }),
    ];
    match next_hop {
        IpAddr::V4(nh) => attrs.push(PathAttribute::NextHop(nh)),
        IpAddr::V6(nh) => attrs.push(PathAttribute::MpReachNlri(Box::new(MpReachNlri {
            afi: Afi::Ipv6,
            safi: Safi::Unicast,
            next_hop: IpAddr::V6(nh),
            link_local_next_hop: None,
            announced: vips.iter().map(|v| nlri(*v)).collect(),
            flowspec_announced: Vec::new(),
            evpn_announced: Vec::new(),
            bgpls_announced: Vec::new(),
            vpn_announced: Vec::new(),
            labeled_announced: Vec::new(),
            rtc_announced: Vec::new(),
        }))),
    }
    if ctx.internal() {
        // LOCAL_PREF is for internal peers only (RFC 4271 §5.1.5).
        attrs.push(PathAttribute::LocalPref(extra.local_pref.unwrap_or(100)));
    }
    if !extra.communities.is_empty() {
        attrs.push(PathAttribute::Communities(extra.communities.clone()));
    }
    if !extra.large_communities.is_empty() {
        attrs.push(PathAttribute::LargeCommunities(
            extra
                .large_communities
                .iter()
                .map(|(a, b, c)| LargeCommunity::new(*a, *b, *c))
                .collect(),
        ));
    }
    attrs
}

fn nlri(vip: IpAddr) -> NlriEntry {
    NlriEntry {
        path_id: 0,
        prefix: match vip {
            IpAddr::V4(a) => Prefix::V4(Ipv4Prefix::new(a, 32)),
            IpAddr::V6(a) => Prefix::V6(Ipv6Prefix::new(a, 128)),
        },
    }
}

fn nlri_v4(vips: &[IpAddr]) -> Vec<Ipv4NlriEntry> {
    vips.iter()
        .filter_map(|v| match v {
            IpAddr::V4(a) => Some(Ipv4NlriEntry {
                path_id: 0,
                prefix: Ipv4Prefix::new(*a, 32),
            }),
            IpAddr::V6(_) => None,
        })
        .collect()
}

/// The UPDATEs that announce `vips` (all of the next hop's family) with `extra`.
pub fn announcements(
    ctx: &Context,
    f: &Families,
    extra: &RouteAttrs,
    next_hop: IpAddr,
    vips: &[IpAddr],
) -> Vec<Message> {
    let per = if next_hop.is_ipv4() {
        IPV4_PER_UPDATE
    } else {
        IPV6_PER_UPDATE
    };
    vips.chunks(per)
        .map(|chunk| {
            let attrs = attributes(ctx, extra, next_hop, chunk);
            let announced = if next_hop.is_ipv4() {
                nlri_v4(chunk)
            } else {
                Vec::new()
            };
            Message::Update(UpdateMessage::build(
                &announced,
                &[],
                &attrs,
                f.four_octet_as,
                false,
                rustbgpd_wire::Ipv4UnicastMode::Body,
            ))
        })
        .collect()
}

/// The UPDATEs that withdraw `vips` (all of one family).
pub fn withdrawals(f: &Families, vips: &[IpAddr]) -> Vec<Message> {
    let v4 = vips.first().is_some_and(IpAddr::is_ipv4);
    let per = if v4 { IPV4_PER_UPDATE } else { IPV6_PER_UPDATE };
    vips.chunks(per)
        .map(|chunk| unreach(f, v4, chunk))
        .collect()
}

/// End-of-RIB markers (RFC 4724 §2) for the families of the session: an UPDATE withdrawing
/// nothing (IPv4), an empty MP_UNREACH_NLRI (IPv6). A restarting peer's router drops the routes
/// it kept as stale and this session did not announce again.
pub fn end_of_rib(f: &Families) -> Vec<Message> {
    [(f.ipv4, true), (f.ipv6, false)]
        .into_iter()
        .filter(|(on, _)| *on)
        .map(|(_, v4)| unreach(f, v4, &[]))
        .collect()
}

/// One UPDATE withdrawing `vips` of one family (IPv4 in the body, IPv6 in MP_UNREACH_NLRI).
fn unreach(f: &Families, v4: bool, vips: &[IpAddr]) -> Message {
    let (withdrawn, attrs) = if v4 {
        (nlri_v4(vips), Vec::new())
    } else {
        (
            Vec::new(),
            vec![PathAttribute::MpUnreachNlri(Box::new(MpUnreachNlri {
                afi: Afi::Ipv6,
                safi: Safi::Unicast,
                withdrawn: vips.iter().map(|v| nlri(*v)).collect(),
                flowspec_withdrawn: Vec::new(),
                evpn_withdrawn: Vec::new(),
                bgpls_withdrawn: Vec::new(),
                vpn_withdrawn: Vec::new(),
                labeled_withdrawn: Vec::new(),
                rtc_withdrawn: Vec::new(),
            }))],
        )
    };
    Message::Update(UpdateMessage::build(
        &[],
        &withdrawn,
        &attrs,
        f.four_octet_as,
        false,
        rustbgpd_wire::Ipv4UnicastMode::Body,
    ))
}

/// Reads whole messages off the connection.
struct Reader {
    half: OwnedReadHalf,
    buf: BytesMut,
}

impl Reader {
    /// The next message, or an error (the NOTIFICATION for a malformed one already chosen).
    /// Cancel-safe: a partial read stays in the buffer.
    async fn next(&mut self) -> Result<Result<Message, NotificationMessage>, Error> {
        loop {
            match rustbgpd_wire::peek_message_length(&self.buf, MAX_MESSAGE_LEN) {
                Ok(Some(len)) if self.buf.len() >= usize::from(len) => {
                    let mut frame = self.buf.split_to(usize::from(len)).freeze();
                    return Ok(
                        rustbgpd_wire::decode_message(&mut frame, MAX_MESSAGE_LEN).map_err(|e| {
                            let (code, subcode, data) = e.to_notification();
                            NotificationMessage::new(code, subcode, data)
                        }),
                    );
                }
                Ok(_) => {}
                Err(e) => {
                    let (code, subcode, data) = e.to_notification();
                    return Ok(Err(NotificationMessage::new(code, subcode, data)));
                }
            }
            if self.half.read_buf(&mut self.buf).await? == 0 {
                return Err(Error::Closed);
            }
        }
    }
}

async fn send(w: &mut OwnedWriteHalf, msg: &Message) -> Result<(), Error> {
    let bytes = rustbgpd_wire::encode_message(msg)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    match tokio::time::timeout(WRITE_WAIT, w.write_all(&bytes)).await {
        Ok(r) => Ok(r?),
        Err(_) => {
            Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the peer does not read").into())
        }
    }
}

/// Sends `n` and returns the error that ends the session.
async fn notify(w: &mut OwnedWriteHalf, n: NotificationMessage) -> Error {
    let text = describe(&n);
    let _ = send(w, &Message::Notification(n)).await;
    let _ = w.shutdown().await;
    Error::Sent(text)
}

fn describe(n: &NotificationMessage) -> String {
    let mut text = notification::description(n.code, n.subcode).to_string();
    if let Some(msg) = notification::decode_shutdown_communication(&n.data)
        && !msg.is_empty()
    {
        text.push_str(&format!(" ({msg:?})"));
    }
    text
}

/// FSM error (RFC 6608): an unexpected message in OpenSent (1), OpenConfirm (2) or
/// Established (3).
fn fsm_error(subcode: u8) -> NotificationMessage {
    NotificationMessage::new(NotificationCode::FsmError, subcode, Bytes::new())
}

/// The peer's next message during the OPEN exchange: a NOTIFICATION, a malformed message
/// or silence past `OPEN_WAIT` ends the session.
async fn handshake(r: &mut Reader, w: &mut OwnedWriteHalf) -> Result<Message, Error> {
    match tokio::time::timeout(OPEN_WAIT, r.next()).await {
        Err(_) => Err(notify(
            w,
            NotificationMessage::new(NotificationCode::HoldTimerExpired, 0, Bytes::new()),
        )
        .await),
        Ok(m) => match m? {
            Ok(Message::Notification(n)) => Err(Error::Notified(describe(&n))),
            Ok(m) => Ok(m),
            Err(n) => Err(notify(w, n).await),
        },
    }
}

/// Runs the session until an error or the speaker's stop.
pub(super) async fn run(
    ctx: &Context,
    slot: &Slot,
    stream: TcpStream,
    routes: &mut watch::Receiver<Routes>,
    stop: &mut watch::Receiver<bool>,
    mut bfd: Option<&mut watch::Receiver<bfd::State>>,
) -> Result<End, Error> {
    let local = stream.local_addr()?.ip().to_canonical();
    super::socket::set_ttl(&stream, &ctx.peer, ctx.internal())?;
    let (rd, mut w) = stream.into_split();
    let mut r = Reader {
        half: rd,
        buf: BytesMut::with_capacity(4096),
    };
    send(&mut w, &Message::Open(ctx.open())).await?;
    slot.set_state(State::OpenSent);
    // The speaker may stop (or drop this peer) during the OPEN exchange too.
    let first = tokio::select! {
        m = handshake(&mut r, &mut w) => Some(m),
        _ = stop.changed() => None,
    };
    let Some(first) = first else {
        return Ok(cease(&mut w).await);
    };
    let Message::Open(open) = first? else {
        return Err(notify(&mut w, fsm_error(1)).await);
    };
    let families = match negotiate(ctx, &open) {
        Ok(f) => f,
        Err(n) => return Err(notify(&mut w, n).await),
    };
    send(&mut w, &Message::Keepalive).await?;
    slot.set_state(State::OpenConfirm);
    let second = tokio::select! {
        m = handshake(&mut r, &mut w) => Some(m),
        _ = stop.changed() => None,
    };
    let Some(second) = second else {
        return Ok(cease(&mut w).await);
    };
    if !matches!(second?, Message::Keepalive) {
        return Err(notify(&mut w, fsm_error(2)).await);
    }
    slot.set_state(State::Established);
    slot.update(|p| {
        p.hold_time = Some(families.hold_time);
        p.last_error = None;
    });
    info!(
        peer = %ctx.peer.address,
        remote_as = ctx.peer.remote_as,
        router_id = %open.bgp_identifier,
        hold_time = families.hold_time,
        next_hop = %local,
        "BGP: session established"
    );

    // This session carries the VIPs of its own family (the next hop is its local address).
    let carries = |v: &IpAddr| {
        v.is_ipv4() == local.is_ipv4()
            && if v.is_ipv4() {
                families.ipv4
            } else {
                families.ipv6
            }
    };
    let hold = Duration::from_secs(u64::from(families.hold_time));
    let mut hold_deadline = Instant::now() + hold;
    let mut keepalive = tokio::time::interval(if hold.is_zero() {
        Duration::from_hours(1)
    } else {
        hold / 3
    });
    keepalive.reset();
    let mut advertised = Routes::new();
    let mut resend = true;
    let mut end_of_rib_sent = false;
    loop {
        // Bring the peer up to date: withdrawals first, then announcements (a route whose
        // attributes changed is announced again: the new path replaces the old).
        let wanted: Routes = routes
            .borrow_and_update()
            .iter()
            .filter(|(v, _)| carries(v))
            .map(|(v, a)| (*v, a.clone()))
            .collect();
        if resend || wanted != advertised {
            let gone: Vec<IpAddr> = advertised
                .keys()
                .filter(|v| !wanted.contains_key(v))
                .copied()
                .collect();
            let mut by_attrs: BTreeMap<&RouteAttrs, Vec<IpAddr>> = BTreeMap::new();
            for (vip, attrs) in &wanted {
                if resend || advertised.get(vip) != Some(attrs) {
                    by_attrs.entry(attrs).or_default().push(*vip);
                }
            }
            let new: Vec<IpAddr> = by_attrs.values().flatten().copied().collect();
            for m in withdrawals(&families, &gone) {
                send(&mut w, &m).await?;
            }
            for (attrs, vips) in &by_attrs {
                for m in announcements(ctx, &families, attrs, local, vips) {
                    send(&mut w, &m).await?;
                }
            }
            if !gone.is_empty() || !new.is_empty() {
                info!(peer = %ctx.peer.address, advertised = ?new, withdrawn = ?gone, "BGP: routes updated");
            }
            if !end_of_rib_sent && families.graceful {
                for m in end_of_rib(&families) {
                    send(&mut w, &m).await?;
                }
                end_of_rib_sent = true;
            }
            advertised = wanted;
            resend = false;
            let list: Vec<IpAddr> = advertised.keys().copied().collect();
            slot.update(|p| p.advertised = list);
            keepalive.reset();
        }
        tokio::select! {
            m = r.next() => match m? {
                Ok(Message::Keepalive) => hold_deadline = Instant::now() + hold,
                Ok(Message::Update(_)) => {
                    hold_deadline = Instant::now() + hold;
                    slot.update(|p| p.updates_received += 1);
                }
                Ok(Message::RouteRefresh(_)) => resend = true,
                Ok(Message::Notification(n)) => return Err(Error::Notified(describe(&n))),
                Ok(_) => return Err(notify(&mut w, fsm_error(3)).await),
                Err(n) => return Err(notify(&mut w, n).await),
            },
            _ = keepalive.tick(), if !hold.is_zero() => send(&mut w, &Message::Keepalive).await?,
            () = tokio::time::sleep_until(hold_deadline), if !hold.is_zero() => {
                return Err(notify(&mut w, NotificationMessage::new(NotificationCode::HoldTimerExpired, 0, Bytes::new())).await);
            }
            Ok(()) = routes.changed() => {}
            Ok(()) = async { bfd.as_mut().expect("guarded").wait_for(|s| *s == bfd::State::Down).await.map(|_| ()) }, if bfd_was_up(&bfd) => {
                // The peer is gone: nothing can be sent to it. Close; the peer closes too.
                return Err(Error::BfdDown);
            }
            _ = stop.changed() => {
                if families.graceful && ctx.keep_routes.load(std::sync::atomic::Ordering::Acquire) {
                    let _ = w.shutdown().await;
                    return Ok(End::Kept);
                }
                let gone: Vec<IpAddr> = advertised.keys().copied().collect();
                for m in withdrawals(&families, &gone) {
                    send(&mut w, &m).await?;
                }
                slot.update(|p| p.advertised.clear());
                return Ok(cease(&mut w).await);
            }
        }
    }
}

/// Closes the session because the agent stops or the peer left the configuration: Cease,
/// administrative shutdown, with an RFC 9003 message for the peer's operator.
async fn cease(w: &mut OwnedWriteHalf) -> End {
    let n = NotificationMessage::new(
        NotificationCode::Cease,
        CEASE_ADMIN_SHUTDOWN,
        notification::encode_shutdown_communication(
            "weir: agent stopping or peer removed from its configuration",
        ),
    );
    let _ = send(w, &Message::Notification(n)).await;
    let _ = w.shutdown().await;
    End::Stopped
}

/// BFD only ends a session it has seen up: a session comes up before BFD does.
fn bfd_was_up(bfd: &Option<&mut watch::Receiver<bfd::State>>) -> bool {
    bfd.as_ref().is_some_and(|b| *b.borrow() == bfd::State::Up)
}
