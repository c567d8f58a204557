//! The Sans-IO routing core of a SLIM node (spec §0.1, §1.5–§1.9, §2).
//!
//! A [`Router`] owns the connections of one node, their link negotiation and header-MAC keys, and
//! the subscription table. The driver (an adapter) reports connections opening and closing and
//! hands in each received protobuf message; the router answers with [`Output`]s: messages to
//! transmit on a connection (already gRPC-framed), connections to close with a gRPC status, and
//! events. Usage, as for every core:
//!
//! ```
//! use slim_core::router::{Router, RouterConfig, Output};
//! use slim_core::Timestamp;
//!
//! let mut router = Router::new(RouterConfig::default(), [7; 32]);
//! let conn = router.accept_connection(Timestamp::ZERO);
//! // ... router.handle_frame(conn, body, now) for every received message ...
//! while let Some(output) = router.poll_output() {
//!     match output {
//!         Output::Transmit { conn, frame } => { /* write `frame` on `conn` */ }
//!         Output::Deliver { conn, message } => { /* hand `message` to the local app `conn` */ }
//!         Output::Close { conn, code, reason } => { /* end `conn` with grpc-status `code` */ }
//!         Output::Event(event) => { /* log it */ }
//!     }
//! }
//! // ... and call router.handle_timeout(now) once router.poll_timeout() is due.
//! assert!(router.poll_timeout().is_some()); // the negotiation deadline of `conn`
//! ```

mod stats;
mod table;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rustc_hash::FxHashMap;
use slim_proto::link::{self, LocalLinkInfo, NegotiationError};
use slim_proto::mac::MAC_LEN;
use slim_proto::memo::Candidate;
use slim_proto::pb::message::MessageType;
use slim_proto::pb::{self, LinkConnectionType};
use slim_proto::{
    encode_frame, forwarded_header, ForwardTemplate, HeaderMacKey, HeaderRef, HeaderSeen,
    LinkKeyPair, MacError, NameKey, PublishView, ReceivedHeader, Rewrite, SentHeader,
};

use crate::Timestamp;

pub use stats::{DropReason, Stats};
pub use table::{Change, MatchFilter, SubscriptionTable};

/// A connection, numbered by the router. Local to this process, like the reference's indexes
/// (it is what goes out in `incoming_conn`).
pub type ConnId = u64;

/// What a connection is to this node (spec §2.1). The order is the order `fanout == 1`
/// matching prefers: in-process apps first, SDK clients last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConnectionKind {
    /// An application in this process.
    Local = 0,
    /// An inter-domain link managed by the control plane.
    Remote = 1,
    /// Another node of the same deployment.
    Peer = 2,
    /// An SDK client (the default for `slim-bindings`).
    Edge = 3,
}

impl ConnectionKind {
    pub const MATCH_ORDER: [ConnectionKind; 4] = [
        ConnectionKind::Local,
        ConnectionKind::Remote,
        ConnectionKind::Peer,
        ConnectionKind::Edge,
    ];

    fn from_link_type(value: i32) -> Option<Self> {
        match LinkConnectionType::try_from(value).ok()? {
            LinkConnectionType::Remote => Some(ConnectionKind::Remote),
            LinkConnectionType::Peer => Some(ConnectionKind::Peer),
            LinkConnectionType::Edge => Some(ConnectionKind::Edge),
        }
    }

    fn to_link_type(self) -> LinkConnectionType {
        match self {
            ConnectionKind::Remote | ConnectionKind::Local => LinkConnectionType::Remote,
            ConnectionKind::Peer => LinkConnectionType::Peer,
            ConnectionKind::Edge => LinkConnectionType::Edge,
        }
    }

    /// Links whose routed messages carry a header MAC (spec §1.7: Remote and Edge only).
    fn uses_header_mac(self) -> bool {
        matches!(self, ConnectionKind::Remote | ConnectionKind::Edge)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionKind::Local => "local",
            ConnectionKind::Remote => "remote",
            ConnectionKind::Peer => "peer",
            ConnectionKind::Edge => "edge",
        }
    }
}

/// Router settings.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Sent in link negotiations; peers use it to detect self-connections.
    pub node_id: String,
    /// Semantic version sent in link negotiations.
    pub slim_version: String,
    /// The deployment (`domain_name`); peers of another deployment are refused.
    pub deployment_name: String,
    /// Refuse links without an X25519 key, and subscriptions without a header MAC (the
    /// reference's default, and what clients expect).
    pub require_header_mac: bool,
    /// How long a connection may take to negotiate its link.
    pub negotiation_timeout: Duration,
    /// How long to wait for the ack of a subscription forwarded to another connection.
    pub forwarded_ack_timeout: Duration,
    /// Route data publishes from remote links straight from their bytes (the fast path of
    /// [`Router::handle_frame`]); off, every message is decoded. The outcome is the same
    /// either way (the fuzzer runs both side by side). On for nodes; off for a client's
    /// router, where nearly every publish goes to an in-process app, which takes the decoded
    /// message: reading it from its bytes first would only add work.
    pub route_from_bytes: bool,
    /// Keep each link's last received, routed and sent header, so that a flow's repeats are
    /// not read, verified, signed or encoded again ([`slim_proto::memo`], [`RoutedHeader`]).
    /// The outcome is the same either way (the fuzzer runs a router without them beside one
    /// with them); off only to check that.
    pub keep_headers: bool,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            node_id: "node-slim-rs".into(),
            slim_version: "3.4.6".into(),
            deployment_name: String::new(),
            require_header_mac: true,
            negotiation_timeout: Duration::from_secs(5),
            forwarded_ack_timeout: Duration::from_secs(5),
            route_from_bytes: true,
            keep_headers: true,
        }
    }
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Write this gRPC-framed message on the connection.
    Transmit {
        conn: ConnId,
        frame: Bytes,
    },
    /// Hand this message to the in-process application on `conn` (one attached with
    /// [`Router::attach_local`]): apps get messages, not frames, so a message from or to an app
    /// is never encoded only to be decoded again in the same process.
    Deliver {
        conn: ConnId,
        message: Box<pb::Message>,
    },
    /// End the connection's stream with this gRPC status (the router has already forgotten it).
    Close {
        conn: ConnId,
        code: u32,
        reason: String,
    },
    Event(RouterEvent),
}

/// Things worth telling the operator about.
#[derive(Debug, Clone, PartialEq)]
pub enum RouterEvent {
    LinkEstablished {
        conn: ConnId,
        kind: ConnectionKind,
        link_id: String,
        remote_node_id: String,
        remote_version: String,
        header_mac: bool,
    },
    ConnectionRemoved {
        conn: ConnId,
        routes_removed: usize,
    },
}

/// Why the router wants to be woken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Timer {
    /// A connection's link negotiation deadline.
    Negotiation,
    /// The deadline for the ack of a forwarded subscription.
    ForwardedAck,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKey {
    Negotiation(ConnId),
    ForwardedAck(ConnId, u64),
}

enum LinkState {
    /// Accepted; the first message must be the peer's negotiation request.
    AwaitingRequest { deadline: Timestamp },
    /// Dialed; we sent our request and wait for the reply.
    AwaitingReply {
        deadline: Timestamp,
        link_id: String,
        keys: LinkKeyPair,
    },
    Established {
        /// Boxed: the HMAC state and its memo are large next to the other states.
        mac: Option<Box<HeaderMacKey>>,
    },
}

struct Connection {
    kind: ConnectionKind,
    link: LinkState,
    /// The last headers decoded from and sent on this link (see [`slim_proto::memo`]).
    received_header: ReceivedHeader,
    sent_header: SentHeader,
    /// The last header routed from this link's bytes (see [`RoutedHeader`]).
    routed: Option<Box<RoutedMemo>>,
}

/// The header of the last publish routed from a link's bytes (verified, and seen twice in a
/// row: see [`Candidate`]): a flow's publishes repeat it byte for byte, and a repeat is routed
/// on what was read from it then, without reading or verifying its fields again (a third of a
/// node's instructions per message).
struct RoutedHeader {
    /// As received.
    bytes: Vec<u8>,
    /// Its routing fields, owned (viewed, they give what was read).
    fields: pb::SlimHeader,
    /// The header as forwarded to each link it went to, tag included: a function of the
    /// received header and of the link (its key is fixed for its life, and connection ids are
    /// not reused).
    forwarded: ForwardedHeaders,
}

/// A kept header as forwarded to each link, by link.
type ForwardedHeaders = Vec<(ConnId, Vec<u8>)>;

/// A link's [`RoutedHeader`], and the candidate to replace it.
#[derive(Default)]
struct RoutedMemo {
    kept: Option<RoutedHeader>,
    candidate: Candidate,
}

/// Links whose forwarded header a [`RoutedHeader`] keeps (a wider fan-out renders the rest).
const ROUTED_LINKS: usize = 16;

impl Connection {
    fn new(kind: ConnectionKind, link: LinkState) -> Self {
        Self {
            kind,
            link,
            received_header: ReceivedHeader::default(),
            sent_header: SentHeader::default(),
            routed: None,
        }
    }

    fn routed_header(&self) -> Option<&[u8]> {
        let kept = self.routed.as_deref()?.kept.as_ref()?;
        Some(&kept.bytes)
    }

    fn mac(&self) -> Option<&HeaderMacKey> {
        link_mac(self.kind, &self.link)
    }
}

/// The key that signs and verifies a link's headers, if it has one.
fn link_mac(kind: ConnectionKind, link: &LinkState) -> Option<&HeaderMacKey> {
    match link {
        LinkState::Established { mac } if kind.uses_header_mac() => mac.as_deref(),
        _ => None,
    }
}

/// How a publish routed from a link's bytes is rewritten for a target: `tag` is the routed
/// header's for that target's link.
fn forward_rewrite(ttl: u32, incoming: ConnId, tag: Option<&[u8; MAC_LEN]>) -> Rewrite<'_> {
    Rewrite {
        ttl,
        recv_from: None,
        forward_to: None,
        incoming_conn: Some(incoming),
        header_mac: tag.map(|tag| tag.as_slice()),
    }
}

/// The bytes a message was received in: read as a publish at once (a node), or kept to be
/// parsed into a forward template only when a target needs one (a client).
// One per received message, on the stack: boxing the view would allocate per message.
#[allow(clippy::large_enum_variant)]
enum Received<'a> {
    Viewed(PublishView<'a>),
    Raw(&'a [u8]),
    Parsed(Option<ForwardTemplate<'a>>),
}

impl<'a> Received<'a> {
    /// The template of a received publish, parsed on first use (`None`: not a plain publish).
    fn template(&mut self) -> Option<&ForwardTemplate<'a>> {
        if let Received::Raw(raw) = *self {
            *self = Received::Parsed(ForwardTemplate::parse(raw));
        }
        match self {
            Received::Viewed(view) => Some(&view.template),
            Received::Parsed(template) => template.as_ref(),
            Received::Raw(_) => None,
        }
    }
}

/// A subscription forwarded to another connection, whose ack we relay to the requester.
struct PendingAck {
    requester: ConnId,
    deadline: Timestamp,
}

/// The routing state machine of one node.
pub struct Router {
    config: RouterConfig,
    link_info: LocalLinkInfo,
    rng: ChaCha8Rng,
    next_conn: ConnId,
    conns: FxHashMap<ConnId, Connection>,
    table: SubscriptionTable,
    pending_acks: FxHashMap<(ConnId, u64), PendingAck>,
    timers: BinaryHeap<Reverse<(Timestamp, TimerKey)>>,
    out: VecDeque<Output>,
    stats: Stats,
    scratch: Vec<ConnId>,
}

impl Router {
    /// A router whose every random choice (link keys) comes from `seed`.
    pub fn new(config: RouterConfig, seed: [u8; 32]) -> Self {
        let link_info = LocalLinkInfo {
            slim_version: config.slim_version.clone(),
            node_id: config.node_id.clone(),
            deployment_name: config.deployment_name.clone(),
        };
        Self {
            config,
            link_info,
            rng: ChaCha8Rng::from_seed(seed),
            next_conn: 0,
            conns: FxHashMap::default(),
            table: SubscriptionTable::default(),
            pending_acks: FxHashMap::default(),
            timers: BinaryHeap::new(),
            out: VecDeque::new(),
            stats: Stats::default(),
            scratch: Vec::new(),
        }
    }

    pub fn config(&self) -> &RouterConfig {
        &self.config
    }

    /// Counters, with the gauges (connections, subscriptions) filled in.
    pub fn stats(&self) -> Stats {
        let mut stats = self.stats.clone();
        stats.connections = self.conns.len() as u64;
        stats.subscriptions = self.table.record_count() as u64;
        stats
    }

    /// The subscription table (read-only), for inspection and tests.
    pub fn table(&self) -> &SubscriptionTable {
        &self.table
    }

    /// The kind of an open connection.
    pub fn connection_kind(&self, conn: ConnId) -> Option<ConnectionKind> {
        self.conns.get(&conn).map(|c| c.kind)
    }

    /// True once the connection's link is negotiated.
    pub fn is_established(&self, conn: ConnId) -> bool {
        matches!(
            self.conns.get(&conn).map(|c| &c.link),
            Some(LinkState::Established { .. })
        )
    }

    /// An in-process app's connection: it takes messages, not frames.
    fn is_local(&self, conn: ConnId) -> bool {
        self.conns
            .get(&conn)
            .is_some_and(|c| c.kind == ConnectionKind::Local)
    }

    fn allocate(&mut self, connection: Connection) -> ConnId {
        let conn = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(conn, connection);
        conn
    }

    /// A peer connected to us; it must negotiate within the timeout. Until it does, it counts as
    /// Remote, as in the reference.
    pub fn accept_connection(&mut self, now: Timestamp) -> ConnId {
        let deadline = now + self.config.negotiation_timeout;
        let conn = self.allocate(Connection::new(
            ConnectionKind::Remote,
            LinkState::AwaitingRequest { deadline },
        ));
        self.timers
            .push(Reverse((deadline, TimerKey::Negotiation(conn))));
        conn
    }

    /// We connected to a peer: sends our negotiation request. `link_id` must not be empty.
    /// A `Local` kind makes no sense for a dialed link (no negotiation, no MAC, no TTL) and is
    /// dialed as `Remote`.
    pub fn dial_connection(
        &mut self,
        link_id: String,
        kind: ConnectionKind,
        now: Timestamp,
    ) -> ConnId {
        let kind = match kind {
            ConnectionKind::Local => ConnectionKind::Remote,
            other => other,
        };
        let keys = LinkKeyPair::from_seed(self.rng.random());
        let request = link::request(
            &self.link_info,
            &link_id,
            kind.to_link_type(),
            keys.public_bytes(),
        );
        let deadline = now + self.config.negotiation_timeout;
        let conn = self.allocate(Connection::new(
            kind,
            LinkState::AwaitingReply {
                deadline,
                link_id,
                keys,
            },
        ));
        self.timers
            .push(Reverse((deadline, TimerKey::Negotiation(conn))));
        self.out.push_back(Output::Transmit {
            conn,
            frame: encode_frame(&link::negotiation_message(request)),
        });
        conn
    }

    /// An application in this process: no negotiation, no MAC, no TTL decrement. It sends with
    /// [`Router::handle_message`] and receives [`Output::Deliver`].
    pub fn attach_local(&mut self) -> ConnId {
        self.allocate(Connection::new(
            ConnectionKind::Local,
            LinkState::Established { mac: None },
        ))
    }

    /// The driver lost the connection (peer closed, I/O error). Unknown ids are ignored.
    pub fn handle_connection_closed(&mut self, conn: ConnId, _now: Timestamp) {
        self.remove_connection(conn);
        self.prune_timers();
    }

    /// One received protobuf `Message` (the gRPC prefix already removed).
    pub fn handle_frame(&mut self, conn: ConnId, body: Bytes, now: Timestamp) {
        if let Some(negotiated) = self.received(conn) {
            // A node reads a publish once: routed from its bytes if it can be, else decoded
            // with its template parsed. A client (route_from_bytes off) parses the template only
            // if a target needs it: what it receives is nearly always for its apps.
            let mut received = match negotiated {
                false => None,
                true if self.config.route_from_bytes => {
                    let repeat = self
                        .conns
                        .get(&conn)
                        .and_then(Connection::routed_header)
                        .filter(|_| self.config.keep_headers);
                    PublishView::parse_on_link(&body, repeat).map(Received::Viewed)
                }
                true => Some(Received::Raw(&body)),
            };
            if let Some(Received::Viewed(view)) = &received {
                if self.route_received_publish(conn, &body, view) {
                    return self.prune_timers();
                }
            }
            let Some(connection) = self.conns.get_mut(&conn) else {
                return; // received() found it open
            };
            let decoded = if self.config.keep_headers {
                slim_proto::decode_message_on_link(body.clone(), &mut connection.received_header)
            } else {
                slim_proto::decode_message(body.clone()).map(|m| (m, HeaderSeen::NotKept))
            };
            match decoded {
                Ok((message, seen)) => self.dispatch(conn, message, received.as_mut(), seen, now),
                Err(error) if negotiated => {
                    self.drop_message(conn, DropReason::Malformed, &error.to_string());
                }
                // Nothing but a negotiation may come first; garbage there ends the link.
                Err(error) => self.close(conn, 3, format!("malformed link negotiation: {error}")),
            }
        }
        self.prune_timers();
    }

    /// A message already decoded: what an in-process application ([`Router::attach_local`])
    /// sends. Checked and routed exactly like a received frame.
    /// Boxed because it is handed on as it is to a local receiver: a message is large, and
    /// moving it by value at every step was a tenth of a client's time in `memcpy`.
    pub fn handle_message(&mut self, conn: ConnId, message: Box<pb::Message>, now: Timestamp) {
        if self.received(conn).is_some() {
            self.dispatch(conn, message, None, HeaderSeen::NotKept, now);
        }
        self.prune_timers();
    }

    /// Counts a received message; whether its connection is negotiated, `None` (and dropped)
    /// when it is not open.
    fn received(&mut self, conn: ConnId) -> Option<bool> {
        self.stats.received += 1;
        let Some(connection) = self.conns.get(&conn) else {
            self.drop_message(
                conn,
                DropReason::UnknownConnection,
                "connection is not open",
            );
            return None;
        };
        Some(matches!(connection.link, LinkState::Established { .. }))
    }

    /// `received`: the bytes of a message that came as a frame.
    fn dispatch(
        &mut self,
        conn: ConnId,
        message: Box<pb::Message>,
        received: Option<&mut Received<'_>>,
        seen: HeaderSeen,
        now: Timestamp,
    ) {
        match &self.conns[&conn].link {
            LinkState::AwaitingRequest { .. } => self.on_negotiation_request(conn, &message),
            LinkState::AwaitingReply { .. } => self.on_negotiation_reply(conn, &message),
            LinkState::Established { .. } => self.on_message(conn, message, received, seen, now),
        }
    }

    /// Wake-up at or after a `poll_timeout` deadline. Early or repeated calls are harmless.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        while let Some(Reverse((deadline, key))) = self.timers.peek().copied() {
            if deadline > now {
                break;
            }
            self.timers.pop();
            if !self.timer_is_live(deadline, key) {
                continue;
            }
            match key {
                TimerKey::Negotiation(conn) => {
                    let error = NegotiationError::Timeout;
                    self.close(conn, error.grpc_status(), error.to_string());
                }
                TimerKey::ForwardedAck(target, sub_id) => {
                    if let Some(pending) = self.pending_acks.remove(&(target, sub_id)) {
                        self.send_ack(
                            pending.requester,
                            sub_id,
                            Err(format!("no acknowledgement from connection {target}")),
                        );
                    }
                }
            }
        }
        self.prune_timers();
    }

    /// Whether a timer entry still guards something (entries are not removed when what they
    /// guard ends early; they are skipped here instead).
    fn timer_is_live(&self, deadline: Timestamp, key: TimerKey) -> bool {
        match key {
            TimerKey::Negotiation(conn) => match self.conns.get(&conn).map(|c| &c.link) {
                Some(LinkState::AwaitingRequest { deadline: d })
                | Some(LinkState::AwaitingReply { deadline: d, .. }) => *d == deadline,
                _ => false,
            },
            TimerKey::ForwardedAck(target, sub_id) => self
                .pending_acks
                .get(&(target, sub_id))
                .is_some_and(|p| p.deadline == deadline),
        }
    }

    /// Drops dead entries from the top of the timer heap so `poll_timeout` never reports a
    /// deadline nothing waits for.
    fn prune_timers(&mut self) {
        while let Some(Reverse((deadline, key))) = self.timers.peek().copied() {
            if self.timer_is_live(deadline, key) {
                break;
            }
            self.timers.pop();
        }
    }

    /// The next thing to do, `None` when drained.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When to call `handle_timeout` next.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<(Timestamp, Timer)> {
        self.timers.peek().map(|Reverse((at, key))| {
            let timer = match key {
                TimerKey::Negotiation(_) => Timer::Negotiation,
                TimerKey::ForwardedAck(..) => Timer::ForwardedAck,
            };
            (*at, timer)
        })
    }

    // ---------------------------------------------------------------- negotiation

    fn on_negotiation_request(&mut self, conn: ConnId, message: &pb::Message) {
        let Some(request) = link::as_negotiation(message) else {
            let error = NegotiationError::NotNegotiation;
            self.close(conn, error.grpc_status(), error.to_string());
            return;
        };
        if let Err(error) = link::check_request(request, self.config.require_header_mac) {
            self.close(conn, error.grpc_status(), error.to_string());
            return;
        }
        let Some(kind) = ConnectionKind::from_link_type(request.connection_type) else {
            let error = NegotiationError::UnknownConnectionType(request.connection_type);
            self.close(conn, error.grpc_status(), error.to_string());
            return;
        };
        let keys = LinkKeyPair::from_seed(self.rng.random());
        let mac = match keys.header_mac(&request.link_ecdh_public_key, &request.link_id) {
            Ok(mac) => mac,
            Err(error) => {
                self.close(conn, error.grpc_status(), error.to_string());
                return;
            }
        };
        let reply = link::reply(&self.link_info, request, keys.public_bytes());
        self.out.push_back(Output::Transmit {
            conn,
            frame: encode_frame(&link::negotiation_message(reply)),
        });
        // The reference answers a refused peer's negotiation first, then ends the stream with
        // PERMISSION_DENIED, so the peer learns why and does not retry blindly.
        if kind == ConnectionKind::Peer {
            if request.node_id == self.config.node_id {
                self.close(conn, 7, "self-connection rejected: same node_id".into());
                return;
            }
            if !self.config.deployment_name.is_empty()
                && request.deployment_name != self.config.deployment_name
            {
                self.close(conn, 7, "deployment_name mismatch".into());
                return;
            }
        }
        self.establish(conn, kind, mac, request);
    }

    fn on_negotiation_reply(&mut self, conn: ConnId, message: &pb::Message) {
        let Some(reply) = link::as_negotiation(message) else {
            let error = NegotiationError::NotNegotiation;
            self.close(conn, error.grpc_status(), error.to_string());
            return;
        };
        let Some(Connection {
            link: LinkState::AwaitingReply { link_id, keys, .. },
            ..
        }) = self.conns.get(&conn)
        else {
            return;
        };
        let checked = link::check_reply(reply, link_id, self.config.require_header_mac)
            .and_then(|()| {
                ConnectionKind::from_link_type(reply.connection_type).ok_or(
                    NegotiationError::UnknownConnectionType(reply.connection_type),
                )
            })
            .and_then(|kind| Ok((kind, keys.header_mac(&reply.link_ecdh_public_key, link_id)?)));
        match checked {
            // The link takes the type the responder settled on (it echoes ours).
            Ok((kind, mac)) => self.establish(conn, kind, mac, reply),
            Err(error) => self.close(conn, error.grpc_status(), error.to_string()),
        }
    }

    fn establish(
        &mut self,
        conn: ConnId,
        kind: ConnectionKind,
        mac: Option<HeaderMacKey>,
        remote: &pb::LinkNegotiationPayload,
    ) {
        let Some(connection) = self.conns.get_mut(&conn) else {
            return;
        };
        connection.kind = kind;
        let header_mac = mac.is_some();
        connection.link = LinkState::Established {
            mac: mac.map(Box::new),
        };
        self.stats.links_established += 1;
        tracing::debug!(conn, kind = kind.as_str(), link_id = %remote.link_id, remote_node = %remote.node_id, "link established");
        self.out
            .push_back(Output::Event(RouterEvent::LinkEstablished {
                conn,
                kind,
                link_id: remote.link_id.clone(),
                remote_node_id: remote.node_id.clone(),
                remote_version: remote.slim_version.clone(),
                header_mac,
            }));
    }

    // ---------------------------------------------------------------- routed messages

    fn on_message(
        &mut self,
        conn: ConnId,
        mut message: Box<pb::Message>,
        received: Option<&mut Received<'_>>,
        seen: HeaderSeen,
        now: Timestamp,
    ) {
        if let Err(error) = slim_proto::validate(&message) {
            self.drop_message(conn, DropReason::Invalid, &error.to_string());
            return;
        }
        let kind = self.conns[&conn].kind;
        match &message.message_type {
            Some(MessageType::Link(_)) => {
                self.drop_message(
                    conn,
                    DropReason::RepeatedNegotiation,
                    "link already negotiated",
                );
                return;
            }
            Some(MessageType::SubscriptionAck(ack)) => {
                let (sub_id, result) = (ack.subscription_id, ack_result(ack));
                self.on_subscription_ack(conn, sub_id, result);
                return;
            }
            _ => {}
        }
        let is_publish = matches!(message.message_type, Some(MessageType::Publish(_)));
        let Some(header) = header_mut(&mut message) else {
            return; // validate() guarantees a header for the remaining types
        };
        let connection = &self.conns[&conn];
        // A header identical to the last one that verified on this link verifies again.
        let mac = connection
            .mac()
            .filter(|_| !connection.received_header.verified(seen));
        if let Some(mac) = mac {
            let verdict = match (mac.verify(header), is_publish) {
                (Ok(()), _) => {
                    if let Some(connection) = self.conns.get_mut(&conn) {
                        connection.received_header.set_verified(seen);
                    }
                    None
                }
                // Subscriptions without a tag pass on lenient links (spec §1.9).
                (Err(MacError::Missing), false) if !self.config.require_header_mac => None,
                (Err(MacError::Missing), _) => Some((DropReason::MacMissing, MacError::Missing)),
                (Err(error), _) => Some((DropReason::MacInvalid, error)),
            };
            if let Some((reason, error)) = verdict {
                self.drop_message(conn, reason, &error.to_string());
                return;
            }
        }
        if kind != ConnectionKind::Local {
            header.ttl = header.ttl.saturating_sub(1);
            if header.ttl == 0 {
                self.drop_message(conn, DropReason::TtlExpired, "ttl reached 0");
                return;
            }
        }
        // Never trusted from the wire: receivers overwrite it with the ingress connection.
        header.incoming_conn = Some(conn);
        if is_publish {
            self.on_publish(conn, kind, message, received);
        } else {
            self.on_subscription(conn, kind, message, now);
        }
    }

    fn on_publish(
        &mut self,
        conn: ConnId,
        kind: ConnectionKind,
        mut message: Box<pb::Message>,
        mut received: Option<&mut Received<'_>>,
    ) {
        let Some(header) = header_mut(&mut message) else {
            return;
        };
        let destination = header.destination.as_ref().and_then(NameKey::from_pb);
        let route = (header.forward_to, destination, header.fanout);
        let Some(targets) = self.publish_targets(conn, kind, route) else {
            return;
        };
        let mut message = Some(message);
        // Each link's frame is copied from the received bytes with that link's MAC.
        for (i, target) in targets.iter().enumerate() {
            let Some(outgoing) = Outgoing::nth(&mut message, i + 1 < targets.len()) else {
                break;
            };
            let template = match &mut received {
                Some(received) if !self.is_local(*target) => received.template(),
                _ => None,
            };
            self.transmit_routed(*target, outgoing, template);
            self.stats.forwarded += 1;
        }
        self.scratch = targets;
    }

    /// Routes a data publish from a remote link straight from its bytes, without decoding it
    /// (decoding was over half of the router's time per message): the header's routing fields
    /// are read in place ([`PublishView`]) and each target gets a copy of the frame with its
    /// own rewritten fields. `false`, having done nothing, for whatever the full path must
    /// handle: other messages, anything [`PublishView`] does not read, and every publish the
    /// full path drops before routing (bad MAC, TTL run out, `forward_to`), which it then
    /// drops with its reason.
    fn route_received_publish(
        &mut self,
        conn: ConnId,
        raw: &Bytes,
        view: &PublishView<'_>,
    ) -> bool {
        let keep_headers = self.config.keep_headers;
        let Some(connection) = self.conns.get_mut(&conn) else {
            return false;
        };
        let kind = connection.kind;
        if kind == ConnectionKind::Local {
            return false;
        }
        let mut memo = match (&view.routing, view.header_bytes) {
            (Some(routing), Some(bytes)) => {
                let header = routing.header;
                if header.forward_to.is_some() || header.ttl <= 1 {
                    return false;
                }
                if let Some(mac) = connection.mac() {
                    if mac.verify_fields(&header, routing.header_mac).is_err() {
                        return false;
                    }
                }
                let seen_twice = keep_headers
                    && (connection.routed.get_or_insert_with(Box::default))
                        .candidate
                        .seen_twice(bytes);
                if !seen_twice {
                    self.route_from_bytes(conn, kind, raw, &view.template, &header, None);
                    return true;
                }
                let mut memo = connection.routed.take();
                if let Some(memo) = memo.as_deref_mut() {
                    let kept = memo.kept.get_or_insert_with(|| RoutedHeader {
                        bytes: Vec::new(),
                        fields: pb::SlimHeader::default(),
                        forwarded: Vec::new(),
                    });
                    kept.bytes.clear();
                    kept.bytes.extend_from_slice(bytes);
                    kept.fields = header.to_pb();
                    kept.forwarded.clear();
                }
                memo
            }
            (None, Some(_)) if view.repeated_header => connection.routed.take(),
            _ => return false,
        };
        let Some(kept) = memo.as_deref_mut().and_then(|memo| memo.kept.as_mut()) else {
            if let Some(connection) = self.conns.get_mut(&conn) {
                connection.routed = memo;
            }
            return false;
        };
        let RoutedHeader {
            bytes,
            fields,
            forwarded,
        } = kept;
        let header = HeaderRef::from(&*fields);
        self.route_from_bytes(
            conn,
            kind,
            raw,
            &view.template,
            &header,
            Some((bytes, forwarded)),
        );
        if let Some(connection) = self.conns.get_mut(&conn) {
            connection.routed = memo;
        }
        true
    }

    /// [`Router::route_received_publish`] of a publish whose header is `header` (read from
    /// it, or `kept`: its bytes and the header as forwarded to each link so far).
    fn route_from_bytes(
        &mut self,
        conn: ConnId,
        kind: ConnectionKind,
        raw: &Bytes,
        template: &ForwardTemplate<'_>,
        header: &HeaderRef<'_>,
        mut kept: Option<(&[u8], &mut ForwardedHeaders)>,
    ) {
        let destination = header
            .destination
            .and_then(|name| name.encoded)
            .map(|encoded| NameKey::from_encoded_ref(&encoded));
        let Some(targets) = self.publish_targets(conn, kind, (None, destination, header.fanout))
        else {
            return;
        };
        let routed = HeaderRef {
            ttl: header.ttl - 1,
            recv_from: None,
            forward_to: None,
            ..*header
        };
        let mut decoded = None;
        for (i, &target) in targets.iter().enumerate() {
            self.stats.forwarded += 1;
            let Some(connection) = self.conns.get(&target) else {
                continue;
            };
            let tag = || connection.mac().map(|mac| mac.tag_fields(&routed));
            if connection.kind != ConnectionKind::Local {
                let frame = match &mut kept {
                    None => template.frame(&forward_rewrite(routed.ttl, conn, tag().as_ref())),
                    Some((bytes, forwarded)) => {
                        match forwarded.iter().find(|(link, _)| *link == target) {
                            Some((_, header)) => template.frame_with_header(header),
                            None => {
                                let tag = tag();
                                let rewrite = forward_rewrite(routed.ttl, conn, tag.as_ref());
                                forwarded_header(bytes, &rewrite).and_then(|header| {
                                    let frame = template.frame_with_header(&header);
                                    if forwarded.len() < ROUTED_LINKS {
                                        forwarded.push((target, header));
                                    }
                                    frame
                                })
                            }
                        }
                    }
                };
                if let Some(frame) = frame {
                    self.out.push_back(Output::Transmit {
                        conn: target,
                        frame,
                    });
                    continue;
                }
            }
            let tag = tag();
            let rewrite = forward_rewrite(routed.ttl, conn, tag.as_ref());
            // An in-process app gets the message itself: decoded here, once.
            if decoded.is_none() {
                match slim_proto::decode_message(raw.clone()) {
                    Ok(message) => decoded = Some(message),
                    Err(error) => {
                        self.drop_message(conn, DropReason::Malformed, &error.to_string());
                        break;
                    }
                }
            }
            let Some(mut outgoing) = Outgoing::nth(&mut decoded, i + 1 < targets.len()) else {
                break;
            };
            if let Some(header) = header_mut(outgoing.message()) {
                rewrite.apply(header);
            }
            self.emit(target, outgoing, None);
        }
        self.scratch = targets;
    }

    /// Where a publish goes, `(forward_to, destination, fanout)`: the `forward_to` connection
    /// (from in-process apps only) or the subscriptions matching its destination. `None` when
    /// there is nowhere to send it (dropped and counted, except a publish without a
    /// destination). The targets come in `self.scratch`'s buffer: give it back.
    fn publish_targets(
        &mut self,
        conn: ConnId,
        kind: ConnectionKind,
        (forward_to, destination, fanout): (Option<ConnId>, Option<NameKey>, u32),
    ) -> Option<Vec<ConnId>> {
        let mut targets = std::mem::take(&mut self.scratch);
        targets.clear();
        let dropped = if let Some(forward_to) = forward_to {
            // forward_to bypasses the subscription table: only in-process apps and the control
            // plane may use it (SDK clients clear it before sending, spec §1.5). From anyone else
            // it would let a client reach connections that never subscribed to it.
            if kind != ConnectionKind::Local {
                Some((
                    DropReason::ForwardToRefused,
                    "forward_to is only accepted from local connections",
                ))
            } else if self.is_established(forward_to) {
                targets.push(forward_to);
                None
            } else {
                Some((
                    DropReason::UnknownForwardTo,
                    "forward_to names no open connection",
                ))
            }
        } else {
            let Some(destination) = destination else {
                self.scratch = targets;
                return None;
            };
            let filter = MatchFilter {
                exclude_peers: kind == ConnectionKind::Peer,
            };
            if fanout == 1 {
                targets.extend(self.table.match_one(&destination, conn, filter));
            } else {
                self.table
                    .match_all(&destination, conn, filter, &mut targets);
            }
            if targets.is_empty() && kind == ConnectionKind::Local {
                targets.extend(self.default_gateway());
            }
            targets
                .is_empty()
                .then_some((DropReason::NoRoute, "no subscriber for the destination"))
        };
        if let Some((reason, detail)) = dropped {
            self.scratch = targets;
            self.drop_message(conn, reason, detail);
            return None;
        }
        Some(targets)
    }

    /// Where an in-process app's unmatched publish goes (spec §2.7, datapath ≥ 0.19): the one
    /// established Edge link, when there is exactly one. A node with several uplinks routes by
    /// subscriptions only.
    fn default_gateway(&self) -> Option<ConnId> {
        let mut edges = self.conns.iter().filter(|(_, c)| {
            c.kind == ConnectionKind::Edge && matches!(c.link, LinkState::Established { .. })
        });
        let (first, _) = edges.next()?;
        edges.next().is_none().then_some(*first)
    }

    /// Sends a header-carrying message on `target`, signed for that link. `template`: the
    /// publish as received, parsed into a [`ForwardTemplate`], which a link's frame is copied
    /// from (`None`: the message is encoded); see [`Router::emit`].
    fn transmit_routed(
        &mut self,
        target: ConnId,
        mut message: Outgoing<'_>,
        template: Option<&ForwardTemplate<'_>>,
    ) {
        let Some(connection) = self.conns.get_mut(&target) else {
            return;
        };
        let mac = link_mac(connection.kind, &connection.link);
        if let Some(header) = header_mut(message.message()) {
            header.recv_from = None;
            header.forward_to = None;
        }
        if template.is_none()
            && connection.kind != ConnectionKind::Local
            && self.config.keep_headers
        {
            // A flow's publishes share their header: signed and encoded once per link.
            if let Some(frame) = connection.sent_header.frame(message.message(), mac) {
                self.out.push_back(Output::Transmit {
                    conn: target,
                    frame,
                });
                return;
            }
        }
        if let Some(header) = header_mut(message.message()) {
            match mac {
                Some(mac) => mac.sign(header),
                None => header.header_mac = None,
            }
        }
        self.emit(target, message, template);
    }

    /// Queues `message` for `conn`: as it is for an in-process app (handed over if it is the
    /// last copy, and `template` unused), or as a frame for a link. That frame is rendered from `template` where there is one (see
    /// [`slim_proto::forward`]): the bytes the publish was received in, with only the
    /// rewritable header fields (TTL, `recv_from`, `forward_to`, `incoming_conn`, the header
    /// MAC) taken from `message`'s header. Without a template or a header (or past 4 GiB, where
    /// [`ForwardTemplate::frame`] gives up), `message` itself is encoded.
    fn emit(
        &mut self,
        conn: ConnId,
        mut message: Outgoing<'_>,
        template: Option<&ForwardTemplate<'_>>,
    ) {
        self.out.push_back(if self.is_local(conn) {
            Output::Deliver {
                conn,
                message: message.into_boxed(),
            }
        } else {
            let message = message.message();
            let copied = template
                .zip(header_mut(message))
                .and_then(|(template, header)| template.frame(&Rewrite::from(&*header)));
            Output::Transmit {
                conn,
                frame: copied.unwrap_or_else(|| encode_frame(message)),
            }
        });
    }

    fn on_subscription(
        &mut self,
        conn: ConnId,
        kind: ConnectionKind,
        mut message: Box<pb::Message>,
        now: Timestamp,
    ) {
        let (subscribe, sub_id) = match &message.message_type {
            Some(MessageType::Subscribe(s)) => (true, s.subscription_id),
            Some(MessageType::Unsubscribe(u)) => (false, u.subscription_id),
            _ => return,
        };
        if subscribe {
            self.stats.subscribes += 1;
        } else {
            self.stats.unsubscribes += 1;
        }
        let Some(header) = header_mut(&mut message) else {
            return;
        };
        let Some(name) = header.destination.as_ref().and_then(NameKey::from_pb) else {
            return;
        };
        let (recv_from, forward_to) = (header.recv_from, header.forward_to);
        // recv_from (install a route on another connection) and forward_to (propagate the
        // subscription) steer other connections' traffic: only in-process apps and the control
        // plane may use them. SDK clients clear both before sending (spec §1.5).
        if kind != ConnectionKind::Local && (recv_from.is_some() || forward_to.is_some()) {
            self.send_ack(
                conn,
                sub_id,
                Err("recv_from/forward_to are only accepted from local connections".into()),
            );
            return;
        }
        let route_conn = recv_from.unwrap_or(conn);
        // Only negotiated connections: until then a connection's kind is provisional, and a
        // route filed under it would outlive the connection (found by the router fuzz target).
        let established = self.is_established(route_conn);
        let Some(route_kind) = self.connection_kind(route_conn).filter(|_| established) else {
            self.send_ack(
                conn,
                sub_id,
                Err(format!(
                    "recv_from names no established connection ({route_conn})"
                )),
            );
            return;
        };
        if subscribe {
            self.table.add(route_conn, route_kind, name, sub_id);
        } else if self
            .table
            .remove(route_conn, route_kind, name, sub_id)
            .is_none()
        {
            self.send_ack(
                conn,
                sub_id,
                Err(format!("subscription not found for {name}")),
            );
            return;
        }
        if let Some(target) = forward_to.filter(|t| *t != conn) {
            if !self.is_established(target) {
                self.send_ack(
                    conn,
                    sub_id,
                    Err(format!("forward_to names unknown connection {target}")),
                );
                return;
            }
            self.transmit_routed(target, Outgoing::Last(message), None);
            if sub_id != 0 {
                let deadline = now + self.config.forwarded_ack_timeout;
                self.pending_acks.insert(
                    (target, sub_id),
                    PendingAck {
                        requester: conn,
                        deadline,
                    },
                );
                self.timers
                    .push(Reverse((deadline, TimerKey::ForwardedAck(target, sub_id))));
            }
            return;
        }
        self.send_ack(conn, sub_id, Ok(()));
    }

    fn on_subscription_ack(&mut self, conn: ConnId, sub_id: u64, result: Result<(), String>) {
        match self.pending_acks.remove(&(conn, sub_id)) {
            Some(pending) => self.send_ack(pending.requester, sub_id, result),
            None => self.drop_message(
                conn,
                DropReason::UnexpectedAck,
                "no forwarded subscription waits for it",
            ),
        }
    }

    /// Acks a (un)subscription with a non-zero id; id 0 means the sender wants no ack.
    fn send_ack(&mut self, conn: ConnId, sub_id: u64, result: Result<(), String>) {
        if let Err(error) = &result {
            self.stats.subscription_failures += 1;
            tracing::debug!(conn, sub_id, %error, "subscription refused");
        }
        if sub_id == 0 || !self.conns.contains_key(&conn) {
            return;
        }
        let (success, error) = match result {
            Ok(()) => (true, String::new()),
            Err(error) => (false, error),
        };
        let ack = pb::Message {
            message_type: Some(MessageType::SubscriptionAck(pb::SubscriptionAck {
                subscription_id: sub_id,
                success,
                error,
            })),
            metadata: Default::default(),
        };
        self.stats.acks_sent += 1;
        self.emit(conn, Outgoing::Last(Box::new(ack)), None);
    }

    // ---------------------------------------------------------------- bookkeeping

    fn drop_message(&mut self, conn: ConnId, reason: DropReason, detail: &str) {
        let count = self.stats.count_drop(reason);
        match reason {
            // Routine in a live network: only at debug.
            DropReason::NoRoute | DropReason::TtlExpired | DropReason::UnexpectedAck => {
                tracing::debug!(conn, %reason, detail, count, "message dropped");
            }
            // Signs of a broken or hostile peer. Logged at the 1st, 2nd, 4th, 8th… occurrence so a
            // flood cannot flood the log.
            _ if count.is_power_of_two() => {
                tracing::warn!(conn, %reason, detail, count, "message dropped");
            }
            _ => tracing::debug!(conn, %reason, detail, count, "message dropped"),
        }
    }

    /// Ends a connection for a protocol violation.
    fn close(&mut self, conn: ConnId, code: u32, reason: String) {
        self.stats.connections_refused += 1;
        tracing::warn!(conn, code, %reason, "closing connection");
        // Close before ConnectionRemoved, so a driver that tears a stream down on the event has
        // already been told which status to end it with.
        self.out.push_back(Output::Close { conn, code, reason });
        self.remove_connection(conn);
    }

    fn remove_connection(&mut self, conn: ConnId) {
        let Some(connection) = self.conns.remove(&conn) else {
            return;
        };
        let routes_removed = self.table.remove_connection(conn, connection.kind).len();
        // Forwarded subscriptions waiting on this connection will never be acked by it; those
        // this connection asked for have nobody left to tell.
        let mut orphaned: Vec<(u64, ConnId)> = self
            .pending_acks
            .iter()
            .filter(|((target, _), p)| *target == conn && p.requester != conn)
            .map(|((_, sub_id), p)| (*sub_id, p.requester))
            .collect();
        orphaned.sort_unstable();
        self.pending_acks
            .retain(|(target, _), p| *target != conn && p.requester != conn);
        for (sub_id, requester) in orphaned {
            self.send_ack(
                requester,
                sub_id,
                Err(format!("connection {conn} closed before acknowledging")),
            );
        }
        self.out
            .push_back(Output::Event(RouterEvent::ConnectionRemoved {
                conn,
                routes_removed,
            }));
    }
}

/// A message on its way to one of its targets: lent while later targets still need it, handed
/// over with the last.
enum Outgoing<'a> {
    Lent(&'a mut pb::Message),
    Last(Box<pb::Message>),
}

impl<'a> Outgoing<'a> {
    /// The message for one target: lent when `more` targets follow, else taken from `slot`.
    fn nth(slot: &'a mut Option<Box<pb::Message>>, more: bool) -> Option<Self> {
        if more {
            slot.as_deref_mut().map(Outgoing::Lent)
        } else {
            slot.take().map(Outgoing::Last)
        }
    }

    fn message(&mut self) -> &mut pb::Message {
        match self {
            Outgoing::Lent(message) => message,
            Outgoing::Last(message) => message,
        }
    }

    fn into_boxed(self) -> Box<pb::Message> {
        match self {
            Outgoing::Lent(message) => Box::new(message.clone()),
            Outgoing::Last(message) => message,
        }
    }
}

fn header_mut(message: &mut pb::Message) -> Option<&mut pb::SlimHeader> {
    match message.message_type.as_mut()? {
        MessageType::Publish(p) => p.header.as_mut(),
        MessageType::Subscribe(s) => s.header.as_mut(),
        MessageType::Unsubscribe(u) => u.header.as_mut(),
        MessageType::Link(_) | MessageType::SubscriptionAck(_) => None,
    }
}

fn ack_result(ack: &pb::SubscriptionAck) -> Result<(), String> {
    if ack.success {
        Ok(())
    } else {
        Err(ack.error.clone())
    }
}

#[cfg(test)]
mod tests;
