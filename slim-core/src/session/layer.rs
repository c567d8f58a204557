//! The session layer of one application (spec §4): point-to-point sessions with their
//! discovery → join → welcome → ack handshake, reliable or best-effort data, heartbeats and
//! close, wire-compatible with the published SLIM clients.
//!
//! Sans-IO like every core: the driver hands in the messages the application's local router
//! delivered ([`SessionLayer::handle_message`]) and the application's commands
//! ([`SessionLayer::create_session`], [`SessionLayer::publish`], [`SessionLayer::close`]);
//! it sends every [`Output::Send`] to that router and passes [`Output::Event`]s to the
//! application; it wakes the layer at [`SessionLayer::poll_timeout`].
//!
//! Every message carries a fresh identity token; control messages are signed
//! (`e2e_header_sig` and `slim-payload-sig`), as 3.x clients expect. Received messages must
//! carry a valid token from an app sharing our secret; control messages must be signed by it.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rustc_hash::FxHashMap;
use slim_proto::pb::{self, SessionMessageType as Mt, SessionType};
use slim_proto::Name;

use super::receiver::{Incoming, ReceiverEvent, ReliableReceiver, Verdict};
use super::sender::{Outgoing, ReliableSender, SenderEvent};
use crate::identity::{
    self, new_identity_id, sign_control_message, verify_e2e_header, verify_payload, IdError,
    SecretError, SharedSecret, SigningKey, PAYLOAD_SIG_KEY,
};
use crate::Timestamp;

/// Session id as on the wire.
pub type SessionId = u32;

/// Fanout for messages to every member of a group or for a broadcast close.
pub const MAX_FANOUT: u32 = 256;
/// Control messages are retried this often by default (reference 1 s × 10).
pub const DEFAULT_CONTROL_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_CONTROL_RETRIES: u32 = 10;
/// Heartbeat period (spec §4.6).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
/// Session ids are drawn below this (reference `0..u32::MAX-1000`).
const MAX_SESSION_ID: u32 = u32::MAX - 1000;
/// Queued publishes before a session is established.
const MAX_QUEUED: usize = 1024;

/// Data reliability: acks and retransmission (on iff both are set, as in the reference).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reliability {
    pub interval: Duration,
    pub max_retries: u32,
}

/// How to open a session.
#[derive(Debug, Clone, Default)]
pub struct SessionConfig {
    pub reliability: Option<Reliability>,
    /// Copied onto the join request; becomes the peer's session metadata.
    pub metadata: BTreeMap<String, String>,
}

/// Settings of one application's session layer.
#[derive(Debug, Clone)]
pub struct LayerConfig {
    /// `org/namespace/service`; the instance id is derived from the identity.
    pub name: Name,
    /// Shared secret of the SLIM deployment (at least 32 bytes).
    pub secret: String,
    /// Unix time (seconds) at `Timestamp::ZERO`, for the identity tokens.
    pub unix_at_zero: u64,
}

/// Why a session layer cannot be created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LayerError {
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error(transparent)]
    Id(#[from] IdError),
}

/// Why an application command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    #[error("session {0} does not exist")]
    UnknownSession(SessionId),
    #[error("session {0} is closing")]
    Closing(SessionId),
    #[error("session {0} has {1} messages queued before its handshake finished")]
    QueueFull(SessionId, usize),
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// We closed it.
    Local,
    /// The peer closed or left it.
    Peer,
    /// The handshake or the close did not get an answer.
    NoAnswer(&'static str),
}

/// What the application is told.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionEvent {
    /// A session we opened is ready (the peer acknowledged our welcome).
    Established { session: SessionId, peer: Name },
    /// A peer opened a session with us.
    Incoming {
        session: SessionId,
        peer: Name,
        metadata: BTreeMap<String, String>,
    },
    Message {
        session: SessionId,
        source: Name,
        id: u32,
        payload: Bytes,
        payload_type: String,
        metadata: BTreeMap<String, String>,
    },
    /// Every receiver acknowledged message `id`.
    Delivered { session: SessionId, id: u32 },
    /// Retries ran out before these receivers acknowledged `id`.
    SendFailed {
        session: SessionId,
        id: u32,
        missing: Vec<Name>,
    },
    /// Message `id` from `source` cannot be recovered; the session goes on.
    MessageLost {
        session: SessionId,
        source: Name,
        id: u32,
    },
    Closed {
        session: SessionId,
        reason: CloseReason,
    },
}

#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // outputs are queued briefly; boxing events buys nothing
pub enum Output {
    /// Hand this message to the application's router (boxed: a message is three times an event).
    Send(Box<pb::Message>),
    Event(SessionEvent),
}

/// Why a received message was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum SessionDrop {
    /// Not a publish with header, session header and content.
    Malformed,
    /// Missing, forged or expired identity token.
    BadToken,
    /// A control message whose signatures do not verify.
    BadSignature,
    UnknownSession,
    /// A message the session's state does not expect (stale reply, wrong peer, …).
    Unexpected,
    Duplicate,
    /// A sequence id far beyond what the session can hold.
    OutOfWindow,
}

impl SessionDrop {
    pub const ALL: [SessionDrop; 7] = [
        SessionDrop::Malformed,
        SessionDrop::BadToken,
        SessionDrop::BadSignature,
        SessionDrop::UnknownSession,
        SessionDrop::Unexpected,
        SessionDrop::Duplicate,
        SessionDrop::OutOfWindow,
    ];
}

/// Counters of a session layer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionStats {
    pub received: u64,
    pub sent: u64,
    /// Source ids that do not derive from the sender's token (reference "identity binding";
    /// counted, not dropped, as the reference's default `warn` mode).
    pub identity_binding_mismatches: u64,
    /// Signed messages without `slim-payload-sig` (clients before session 0.7.20).
    pub unsigned_payloads: u64,
    dropped: [u64; SessionDrop::ALL.len()],
}

impl SessionStats {
    pub fn dropped(&self, reason: SessionDrop) -> u64 {
        self.dropped[reason as usize]
    }

    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().sum()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Initiator,
    Participant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Initiator: waiting for a DISCOVERY_REPLY.
    Discovering,
    /// Initiator: waiting for the JOIN_REPLY.
    Joining,
    /// Initiator: waiting for the GROUP_ACK of our welcome.
    Welcoming,
    /// Participant: joined, waiting for the welcome.
    AwaitingWelcome,
    Established,
    /// Waiting for the GROUP_ACK of our close.
    Closing,
}

/// A control message waiting for its reply, re-sent (with a fresh token) until it comes.
#[derive(Debug, Clone)]
struct PendingControl {
    message_type: Mt,
    message_id: u32,
    destination: Name,
    fanout: u32,
    payload: pb::command_payload::CommandPayloadType,
    metadata: BTreeMap<String, String>,
    retries_left: u32,
    deadline: Timestamp,
}

struct Session {
    role: Role,
    state: State,
    /// The peer; for an initiator before discovery, a name without instance id.
    peer: Name,
    reliability: Option<Reliability>,
    control_interval: Duration,
    control_retries: u32,
    pending: Option<PendingControl>,
    sender: ReliableSender,
    receiver: ReliableReceiver,
    queued: Vec<(Bytes, String, BTreeMap<String, String>)>,
    metadata: BTreeMap<String, String>,
    next_heartbeat: Timestamp,
    sent_since_heartbeat: bool,
}

/// All sessions of one application.
pub struct SessionLayer {
    name: Name,
    identity_id: String,
    secret: SharedSecret,
    key: SigningKey,
    public_key: [u8; identity::PUBLIC_KEY_LEN],
    unix_at_zero: u64,
    rng: ChaCha8Rng,
    sessions: FxHashMap<SessionId, Session>,
    out: std::collections::VecDeque<Output>,
    stats: SessionStats,
}

impl SessionLayer {
    /// A layer whose identity, ids and nonces all come from `seed`.
    pub fn new(config: LayerConfig, seed: [u8; 32]) -> Result<Self, LayerError> {
        let mut rng = ChaCha8Rng::from_seed(seed);
        let secret = SharedSecret::new(&config.secret)?;
        let [org, namespace, service] = config.name.components();
        let identity_id = new_identity_id(&format!("{org}/{namespace}/{service}"), &mut rng)?;
        let key = SigningKey::generate(&mut rng);
        let name = config
            .name
            .with_instance(slim_proto::name::app_instance_id(&identity_id));
        Ok(Self {
            name,
            identity_id,
            secret,
            public_key: key.public_key(),
            key,
            unix_at_zero: config.unix_at_zero,
            rng,
            sessions: FxHashMap::default(),
            out: Default::default(),
            stats: SessionStats::default(),
        })
    }

    /// This application's name, with the instance id derived from its identity.
    pub fn name(&self) -> &Name {
        &self.name
    }

    pub fn stats(&self) -> &SessionStats {
        &self.stats
    }

    /// Open sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Opens a point-to-point session with any instance of `peer` (or the given instance).
    pub fn create_session(
        &mut self,
        peer: &Name,
        config: SessionConfig,
        now: Timestamp,
    ) -> SessionId {
        let id = loop {
            let id = self.rng.random_range(0..MAX_SESSION_ID);
            if !self.sessions.contains_key(&id) {
                break id;
            }
        };
        let mut session = self.new_session(Role::Initiator, peer.clone(), config.reliability, now);
        session.state = State::Discovering;
        session.metadata = config.metadata;
        // Discovery goes to any instance; the reply tells us which one answered.
        let anycast = peer.with_instance(slim_proto::name::ANY_INSTANCE);
        self.sessions.insert(id, session);
        self.send_control(
            id,
            Mt::DiscoveryRequest,
            anycast,
            1,
            pb::command_payload::CommandPayloadType::DiscoveryRequest(
                pb::DiscoveryRequestPayload {},
            ),
            BTreeMap::new(),
            now,
        );
        id
    }

    /// Sends application data on a session. Before the handshake finishes it is queued.
    /// Returns the message's sequence id (0 while queued).
    pub fn publish(
        &mut self,
        session: SessionId,
        payload: Bytes,
        now: Timestamp,
    ) -> Result<u32, SessionError> {
        self.publish_with(session, payload, "msg".into(), BTreeMap::new(), now)
    }

    /// [`publish`](Self::publish) with a payload type and message metadata.
    pub fn publish_with(
        &mut self,
        session: SessionId,
        payload: Bytes,
        payload_type: String,
        metadata: BTreeMap<String, String>,
        now: Timestamp,
    ) -> Result<u32, SessionError> {
        let s = self
            .sessions
            .get_mut(&session)
            .ok_or(SessionError::UnknownSession(session))?;
        match s.state {
            State::Established => {}
            State::Closing => return Err(SessionError::Closing(session)),
            _ => {
                if s.queued.len() >= MAX_QUEUED {
                    return Err(SessionError::QueueFull(session, s.queued.len()));
                }
                s.queued.push((payload, payload_type, metadata));
                return Ok(0);
            }
        }
        Ok(self.send_data(session, payload, payload_type, metadata, now))
    }

    /// Closes a session: the peer is told and acknowledges; `Closed` follows.
    pub fn close(&mut self, session: SessionId, now: Timestamp) -> Result<(), SessionError> {
        let s = self
            .sessions
            .get_mut(&session)
            .ok_or(SessionError::UnknownSession(session))?;
        if s.state == State::Closing {
            return Err(SessionError::Closing(session));
        }
        if !matches!(s.state, State::Established | State::AwaitingWelcome) {
            // Nothing agreed with a peer yet: just forget it.
            self.finish(session, CloseReason::Local);
            return Ok(());
        }
        s.state = State::Closing;
        let peer = s.peer.clone();
        let me = self.name.clone();
        // As the reference: a p2p close goes to the peer's service name, fanout 256.
        self.send_control(
            session,
            Mt::GroupClose,
            peer.with_instance(slim_proto::name::ANY_INSTANCE),
            MAX_FANOUT,
            pb::command_payload::CommandPayloadType::GroupClose(pb::GroupClosePayload {
                participants: vec![peer.to_pb(), me.to_pb()],
            }),
            BTreeMap::new(),
            now,
        );
        Ok(())
    }

    #[must_use]
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    #[must_use]
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.sessions
            .values()
            .flat_map(|s| {
                [
                    s.pending.as_ref().map(|p| p.deadline),
                    s.sender.poll_timeout(),
                    s.receiver.poll_timeout(),
                    (s.state == State::Established).then_some(s.next_heartbeat),
                ]
            })
            .flatten()
            .min()
    }

    pub fn handle_timeout(&mut self, now: Timestamp) {
        let mut ids: Vec<SessionId> = self.sessions.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            self.session_timeout(id, now);
        }
    }

    /// A message the application's router delivered.
    pub fn handle_message(&mut self, message: pb::Message, now: Timestamp) {
        self.stats.received += 1;
        let Some(pb::message::MessageType::Publish(publish)) = &message.message_type else {
            self.drop_message(SessionDrop::Malformed, "not a publish");
            return;
        };
        let (Some(header), Some(session_header)) = (&publish.header, &publish.session) else {
            self.drop_message(SessionDrop::Malformed, "publish without headers");
            return;
        };
        let Some(source) = header.source.as_ref().and_then(Name::from_pb) else {
            self.drop_message(SessionDrop::Malformed, "no source name");
            return;
        };
        let Ok(message_type) = Mt::try_from(session_header.session_message_type) else {
            self.drop_message(SessionDrop::Malformed, "unknown session message type");
            return;
        };
        let token = match self.secret.verify(&header.identity, self.unix_now(now)) {
            Ok(token) => token,
            Err(error) => {
                self.drop_message(SessionDrop::BadToken, &error.to_string());
                return;
            }
        };
        if token.app_instance_id() != source.id() {
            self.stats.identity_binding_mismatches += 1;
        }
        if identity::is_command_message(session_header.session_message_type) {
            if let Err(error) = verify_e2e_header(publish, &token.pubkey) {
                self.drop_message(SessionDrop::BadSignature, &error.to_string());
                return;
            }
            if message.metadata.contains_key(PAYLOAD_SIG_KEY) {
                if let Err(error) = verify_payload(&message, &token.pubkey) {
                    self.drop_message(SessionDrop::BadSignature, &error.to_string());
                    return;
                }
            } else {
                self.stats.unsigned_payloads += 1;
            }
        }
        let received = Received {
            source,
            session_type: session_header.session_type,
            message_type,
            session_id: session_header.session_id,
            message_id: session_header.message_id,
            error: header.error == Some(true),
            content: publish.msg.clone(),
            metadata: message.metadata.clone(),
        };
        self.dispatch(received, now);
    }

    // ------------------------------------------------------------------ receive

    fn dispatch(&mut self, m: Received, now: Timestamp) {
        match m.message_type {
            // Stateless: anyone may ask who serves our name.
            Mt::DiscoveryRequest => {
                let me = self.name.clone();
                let reply = self.build(
                    m.session_type,
                    Mt::DiscoveryReply,
                    m.session_id,
                    m.message_id,
                    &me,
                    &m.source,
                    1,
                    command(pb::command_payload::CommandPayloadType::DiscoveryReply(
                        pb::DiscoveryReplyPayload {},
                    )),
                    BTreeMap::new(),
                    now,
                );
                self.emit_send(reply);
                return;
            }
            Mt::JoinRequest if !self.sessions.contains_key(&m.session_id) => {
                self.on_join_request(m, now);
                return;
            }
            _ => {}
        }
        let Some(session) = self.sessions.get(&m.session_id) else {
            self.drop_message(SessionDrop::UnknownSession, "no such session");
            return;
        };
        let (state, role) = (session.state, session.role);
        let from_peer = session.peer.key() == m.source.key();
        let answers_pending = session.pending.as_ref().is_some_and(|p| {
            p.message_id == m.message_id && reply_to(p.message_type) == Some(m.message_type)
        });
        match (m.message_type, state) {
            (Mt::DiscoveryReply, State::Discovering)
                if answers_pending && same_service(&session.peer, &m.source) =>
            {
                self.on_discovery_reply(m, now)
            }
            (Mt::JoinReply, State::Joining) if answers_pending && from_peer => {
                self.on_join_reply(m.session_id, now)
            }
            (Mt::GroupAck, State::Welcoming) if answers_pending && from_peer => {
                self.on_established(m.session_id, now)
            }
            (Mt::GroupAck, State::Closing) if answers_pending => {
                self.finish(m.session_id, CloseReason::Local)
            }
            (Mt::JoinRequest, State::AwaitingWelcome | State::Established) if from_peer => {
                // Our reply was lost: answer again.
                self.send_join_reply(m.session_id, &m.source, m.message_id, now)
            }
            (Mt::GroupWelcome, State::AwaitingWelcome) if from_peer => {
                self.ack(&m, now);
                self.on_established(m.session_id, now);
            }
            (Mt::GroupWelcome, State::Established) if from_peer => {
                self.stats.dropped[SessionDrop::Duplicate as usize] += 1;
                self.ack(&m, now); // our ack was lost
            }
            (Mt::GroupClose, _) if from_peer || role == Role::Participant => {
                self.ack(&m, now);
                self.finish(m.session_id, CloseReason::Peer);
            }
            (Mt::LeaveRequest, _) if from_peer => {
                let reply = self.reply(
                    &m,
                    Mt::LeaveReply,
                    command(pb::command_payload::CommandPayloadType::LeaveReply(
                        pb::LeaveReplyPayload {},
                    )),
                    now,
                );
                self.emit_send(reply);
                self.finish(m.session_id, CloseReason::Peer);
            }
            (Mt::Msg, State::Established | State::Closing) => self.on_data(m, now),
            (Mt::MsgAck, State::Established | State::Closing) => {
                if let Some(s) = self.sessions.get_mut(&m.session_id) {
                    if let Some(event) = s.sender.on_ack(m.message_id, &m.source.key()) {
                        self.sender_event(m.session_id, event, now);
                    }
                }
            }
            (Mt::RtxRequest, State::Established | State::Closing) => self.on_rtx_request(m, now),
            (Mt::RtxReply, State::Established | State::Closing) => self.on_rtx_reply(m, now),
            // Liveness only; any message counts.
            (Mt::Heartbeat, _) => {}
            _ => self.drop_message(
                SessionDrop::Unexpected,
                "not expected in this session state",
            ),
        }
    }

    fn on_join_request(&mut self, m: Received, now: Timestamp) {
        let Some(pb::command_payload::CommandPayloadType::JoinRequest(join)) =
            command_of(&m.content)
        else {
            self.drop_message(SessionDrop::Malformed, "join request without payload");
            return;
        };
        if SessionType::try_from(m.session_type) != Ok(SessionType::PointToPoint) {
            // Group sessions come with the group session controller.
            self.drop_message(
                SessionDrop::Unexpected,
                "group sessions are not supported yet",
            );
            return;
        }
        let reliability = join.timer_settings.map(|t| Reliability {
            interval: Duration::from_millis(u64::from(t.timeout.max(1))),
            max_retries: t.max_retries,
        });
        let mut session = self.new_session(Role::Participant, m.source.clone(), reliability, now);
        session.state = State::AwaitingWelcome;
        session.metadata = m
            .metadata
            .iter()
            .filter(|(k, _)| k.as_str() != PAYLOAD_SIG_KEY)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        self.sessions.insert(m.session_id, session);
        self.send_join_reply(m.session_id, &m.source, m.message_id, now);
    }

    fn send_join_reply(&mut self, session: SessionId, to: &Name, message_id: u32, now: Timestamp) {
        let me = self.name.clone();
        let reply = self.build(
            SessionType::PointToPoint as i32,
            Mt::JoinReply,
            session,
            message_id,
            &me,
            to,
            1,
            command(pb::command_payload::CommandPayloadType::JoinReply(
                pb::JoinReplyPayload {
                    key_package: None,
                    participant: Some(pb::Participant {
                        name: Some(me.to_pb()),
                        settings: Some(pb::ParticipantSettings {
                            sends_data: true,
                            receives_data: true,
                        }),
                        status: pb::ParticipantState::Online as i32,
                    }),
                },
            )),
            BTreeMap::new(),
            now,
        );
        self.emit_send(reply);
    }

    fn on_discovery_reply(&mut self, m: Received, now: Timestamp) {
        let Some(s) = self.sessions.get_mut(&m.session_id) else {
            return;
        };
        s.pending = None;
        s.peer = m.source.clone();
        s.state = State::Joining;
        let timer_settings = s.reliability.map(|r| pb::TimerSettings {
            timeout: u32::try_from(r.interval.as_millis()).unwrap_or(u32::MAX),
            max_retries: r.max_retries,
        });
        let metadata = s.metadata.clone();
        self.send_control(
            m.session_id,
            Mt::JoinRequest,
            m.source,
            1,
            pb::command_payload::CommandPayloadType::JoinRequest(pb::JoinRequestPayload {
                timer_settings,
                channel: None,
                control: None,
                mls_settings: None,
            }),
            metadata,
            now,
        );
    }

    fn on_join_reply(&mut self, session: SessionId, now: Timestamp) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        s.pending = None;
        s.state = State::Welcoming;
        let peer = s.peer.clone();
        let me = self.name.clone();
        self.send_control(
            session,
            Mt::GroupWelcome,
            peer.clone(),
            1,
            pb::command_payload::CommandPayloadType::GroupWelcome(pb::GroupWelcomePayload {
                participants: vec![participant(&peer), participant(&me)],
                mls: None,
            }),
            BTreeMap::new(),
            now,
        );
    }

    fn on_established(&mut self, session: SessionId, now: Timestamp) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        s.pending = None;
        s.state = State::Established;
        s.next_heartbeat = now + HEARTBEAT_INTERVAL;
        // A p2p peer's data starts at 1.
        s.receiver.expect(&s.peer, 1);
        let event = match s.role {
            Role::Initiator => SessionEvent::Established {
                session,
                peer: s.peer.clone(),
            },
            Role::Participant => SessionEvent::Incoming {
                session,
                peer: s.peer.clone(),
                metadata: s.metadata.clone(),
            },
        };
        let queued = std::mem::take(&mut s.queued);
        self.out.push_back(Output::Event(event));
        for (payload, payload_type, metadata) in queued {
            self.send_data(session, payload, payload_type, metadata, now);
        }
    }

    fn on_data(&mut self, m: Received, now: Timestamp) {
        let Some(pb::content::ContentType::AppPayload(app)) =
            m.content.and_then(|c| c.content_type)
        else {
            self.drop_message(
                SessionDrop::Malformed,
                "data message without application payload",
            );
            return;
        };
        let incoming = Incoming {
            payload: app.blob,
            payload_type: app.payload_type,
            metadata: m.metadata.clone(),
        };
        let reliable = self
            .sessions
            .get(&m.session_id)
            .is_some_and(|s| s.reliability.is_some());
        if !reliable {
            self.deliver(m.session_id, m.source, m.message_id, incoming);
            return;
        }
        let mut ack = self.build(
            m.session_type,
            Mt::MsgAck,
            m.session_id,
            m.message_id,
            &self.name.clone(),
            &m.source,
            1,
            empty_app_payload(),
            publish_to_echo(&m.metadata),
            now,
        );
        let mut events = Vec::new();
        let verdict = match self.sessions.get_mut(&m.session_id) {
            Some(s) => s
                .receiver
                .on_message(&m.source, m.message_id, incoming, now, &mut events),
            None => return,
        };
        match verdict {
            Verdict::Accepted => {}
            // Acked again all the same: the sender may have missed our first ack.
            Verdict::Duplicate => self.stats.dropped[SessionDrop::Duplicate as usize] += 1,
            Verdict::OutOfWindow => {
                self.drop_message(
                    SessionDrop::OutOfWindow,
                    "sequence id far beyond the window",
                );
                return;
            }
        }
        if let Some(pb::message::MessageType::Publish(p)) = &mut ack.message_type {
            if let Some(h) = p.header.as_mut() {
                h.fanout = 1;
            }
        }
        self.emit_send(ack);
        self.receiver_events(m.session_id, m.session_type, events, now);
    }

    fn on_rtx_request(&mut self, m: Received, now: Timestamp) {
        let Some(s) = self.sessions.get_mut(&m.session_id) else {
            return;
        };
        let (found, event) = s.sender.on_rtx_request(m.message_id, &m.source.key());
        let found = found.cloned();
        let me = self.name.clone();
        let mut reply = match &found {
            Some(stored) => self.build(
                m.session_type,
                Mt::RtxReply,
                m.session_id,
                m.message_id,
                &me,
                &m.source,
                1,
                app_payload(stored.payload.clone(), &stored.payload_type),
                stored.metadata.clone(),
                now,
            ),
            None => self.build(
                m.session_type,
                Mt::RtxReply,
                m.session_id,
                m.message_id,
                &me,
                &m.source,
                1,
                empty_app_payload(),
                BTreeMap::new(),
                now,
            ),
        };
        if found.is_none() {
            if let Some(pb::message::MessageType::Publish(p)) = &mut reply.message_type {
                if let Some(h) = p.header.as_mut() {
                    h.error = Some(true);
                }
            }
        }
        self.emit_send(reply);
        if let Some(event) = event {
            self.sender_event(m.session_id, event, now);
        }
    }

    fn on_rtx_reply(&mut self, m: Received, now: Timestamp) {
        let mut events = Vec::new();
        if m.error {
            if let Some(s) = self.sessions.get_mut(&m.session_id) {
                s.receiver
                    .on_unavailable(&m.source.key(), m.message_id, &mut events);
            }
        } else {
            let Some(pb::content::ContentType::AppPayload(app)) =
                m.content.and_then(|c| c.content_type)
            else {
                self.drop_message(SessionDrop::Malformed, "retransmission without payload");
                return;
            };
            let incoming = Incoming {
                payload: app.blob,
                payload_type: app.payload_type,
                metadata: m.metadata.clone(),
            };
            if let Some(s) = self.sessions.get_mut(&m.session_id) {
                if s.receiver
                    .on_message(&m.source, m.message_id, incoming, now, &mut events)
                    == Verdict::Duplicate
                {
                    self.stats.dropped[SessionDrop::Duplicate as usize] += 1;
                }
            }
        }
        self.receiver_events(m.session_id, m.session_type, events, now);
    }

    fn receiver_events(
        &mut self,
        session: SessionId,
        session_type: i32,
        events: Vec<ReceiverEvent>,
        now: Timestamp,
    ) {
        for event in events {
            match event {
                ReceiverEvent::Deliver {
                    source,
                    id,
                    message,
                } => self.deliver(session, source, id, message),
                ReceiverEvent::RequestRtx { source, id } => {
                    let me = self.name.clone();
                    let request = self.build(
                        session_type,
                        Mt::RtxRequest,
                        session,
                        id,
                        &me,
                        &source,
                        1,
                        empty_app_payload(),
                        BTreeMap::new(),
                        now,
                    );
                    self.emit_send(request);
                }
                ReceiverEvent::Lost { source, id } => {
                    self.out.push_back(Output::Event(SessionEvent::MessageLost {
                        session,
                        source,
                        id,
                    }))
                }
            }
        }
    }

    fn deliver(&mut self, session: SessionId, source: Name, id: u32, message: Incoming) {
        self.out.push_back(Output::Event(SessionEvent::Message {
            session,
            source,
            id,
            payload: message.payload,
            payload_type: message.payload_type,
            metadata: message.metadata,
        }));
    }

    // ------------------------------------------------------------------ send

    fn send_data(
        &mut self,
        session: SessionId,
        payload: Bytes,
        payload_type: String,
        metadata: BTreeMap<String, String>,
        now: Timestamp,
    ) -> u32 {
        let Some(s) = self.sessions.get_mut(&session) else {
            return 0;
        };
        let id = s.sender.allocate_id();
        let peer = s.peer.clone();
        s.sent_since_heartbeat = true;
        let reliable = s.reliability.is_some();
        if reliable {
            s.sender.sent(
                Outgoing {
                    id,
                    payload: payload.clone(),
                    payload_type: payload_type.clone(),
                    metadata: metadata.clone(),
                },
                vec![peer.clone()],
                now,
            );
        }
        let me = self.name.clone();
        let message = self.build(
            SessionType::PointToPoint as i32,
            Mt::Msg,
            session,
            id,
            &me,
            &peer,
            1,
            app_payload(payload, &payload_type),
            metadata,
            now,
        );
        self.emit_send(message);
        id
    }

    fn sender_event(&mut self, session: SessionId, event: SenderEvent, now: Timestamp) {
        match event {
            SenderEvent::Retransmit { id, to } => {
                let Some(stored) = self
                    .sessions
                    .get(&session)
                    .and_then(|s| s.sender.buffered(id))
                    .cloned()
                else {
                    return;
                };
                let me = self.name.clone();
                let message = self.build(
                    SessionType::PointToPoint as i32,
                    Mt::Msg,
                    session,
                    id,
                    &me,
                    &to,
                    1,
                    app_payload(stored.payload, &stored.payload_type),
                    stored.metadata,
                    now,
                );
                self.emit_send(message);
            }
            SenderEvent::Delivered { id } => self
                .out
                .push_back(Output::Event(SessionEvent::Delivered { session, id })),
            SenderEvent::Failed { id, missing } => {
                self.out.push_back(Output::Event(SessionEvent::SendFailed {
                    session,
                    id,
                    missing,
                }))
            }
        }
    }

    /// Sends a control message and keeps it for retransmission until its reply arrives.
    #[allow(clippy::too_many_arguments)]
    fn send_control(
        &mut self,
        session: SessionId,
        message_type: Mt,
        destination: Name,
        fanout: u32,
        payload: pb::command_payload::CommandPayloadType,
        metadata: BTreeMap<String, String>,
        now: Timestamp,
    ) {
        let message_id = self.rng.random();
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        let pending = PendingControl {
            message_type,
            message_id,
            destination,
            fanout,
            payload,
            metadata,
            retries_left: s.control_retries,
            deadline: now + s.control_interval,
        };
        s.pending = Some(pending.clone());
        self.transmit_control(session, &pending, now);
    }

    fn transmit_control(&mut self, session: SessionId, p: &PendingControl, now: Timestamp) {
        let me = self.name.clone();
        let message = self.build(
            SessionType::PointToPoint as i32,
            p.message_type,
            session,
            p.message_id,
            &me,
            &p.destination,
            p.fanout,
            command(p.payload.clone()),
            p.metadata.clone(),
            now,
        );
        self.emit_send(message);
    }

    fn ack(&mut self, m: &Received, now: Timestamp) {
        let ack = self.reply(
            m,
            Mt::GroupAck,
            command(pb::command_payload::CommandPayloadType::GroupAck(
                pb::GroupAckPayload {},
            )),
            now,
        );
        self.emit_send(ack);
    }

    /// A reply to `m`: same session, same message id, back to its source.
    fn reply(
        &mut self,
        m: &Received,
        message_type: Mt,
        content: pb::Content,
        now: Timestamp,
    ) -> pb::Message {
        let me = self.name.clone();
        self.build(
            m.session_type,
            message_type,
            m.session_id,
            m.message_id,
            &me,
            &m.source,
            1,
            content,
            BTreeMap::new(),
            now,
        )
    }

    fn unix_now(&self, now: Timestamp) -> u64 {
        self.unix_at_zero + now.as_micros() / 1_000_000
    }

    /// A session message with a fresh identity token; control messages are signed.
    #[allow(clippy::too_many_arguments)]
    fn build(
        &mut self,
        session_type: i32,
        message_type: Mt,
        session_id: SessionId,
        message_id: u32,
        source: &Name,
        destination: &Name,
        fanout: u32,
        content: pb::Content,
        metadata: BTreeMap<String, String>,
        now: Timestamp,
    ) -> pb::Message {
        let token = self.secret.issue(
            &self.identity_id,
            &self.public_key,
            self.unix_now(now),
            &mut self.rng,
        );
        let mut message = pb::Message {
            message_type: Some(pb::message::MessageType::Publish(pb::Publish {
                header: Some(pb::SlimHeader {
                    source: Some(source.to_pb()),
                    destination: Some(destination.to_pb()),
                    identity: token,
                    fanout,
                    version: SLIM_SESSION_VERSION.into(),
                    ttl: slim_proto::DEFAULT_TTL,
                    ..Default::default()
                }),
                session: Some(pb::SessionHeader {
                    session_type,
                    session_message_type: message_type as i32,
                    session_id,
                    message_id,
                }),
                msg: Some(content),
            })),
            metadata,
        };
        if identity::is_command_message(message_type as i32) {
            // Cannot fail: the message was just built as a publish with both headers.
            let _ = sign_control_message(&mut message, &self.key);
        }
        message
    }

    fn emit_send(&mut self, message: pb::Message) {
        self.stats.sent += 1;
        self.out.push_back(Output::Send(Box::new(message)));
    }

    fn drop_message(&mut self, reason: SessionDrop, detail: &str) {
        self.stats.dropped[reason as usize] += 1;
        tracing::debug!(?reason, detail, "session message dropped");
    }

    fn new_session(
        &mut self,
        role: Role,
        peer: Name,
        reliability: Option<Reliability>,
        now: Timestamp,
    ) -> Session {
        // Control messages use the session's timers when it has them (captures/flows f7).
        let (control_interval, control_retries) = match reliability {
            Some(r) => (r.interval, r.max_retries),
            None => (DEFAULT_CONTROL_INTERVAL, DEFAULT_CONTROL_RETRIES),
        };
        let (interval, retries) = (control_interval, control_retries);
        Session {
            role,
            state: State::Discovering,
            peer,
            reliability,
            control_interval,
            control_retries,
            pending: None,
            sender: ReliableSender::new(interval, retries),
            receiver: ReliableReceiver::new(interval, retries),
            queued: Vec::new(),
            metadata: BTreeMap::new(),
            next_heartbeat: now + HEARTBEAT_INTERVAL,
            sent_since_heartbeat: false,
        }
    }

    fn finish(&mut self, session: SessionId, reason: CloseReason) {
        if self.sessions.remove(&session).is_some() {
            self.out
                .push_back(Output::Event(SessionEvent::Closed { session, reason }));
        }
    }

    fn session_timeout(&mut self, id: SessionId, now: Timestamp) {
        // Control retransmission.
        let due = self
            .sessions
            .get(&id)
            .and_then(|s| s.pending.as_ref())
            .filter(|p| p.deadline <= now)
            .cloned();
        if let Some(mut pending) = due {
            if pending.retries_left == 0 {
                let what = match pending.message_type {
                    Mt::DiscoveryRequest => "discovery",
                    Mt::JoinRequest => "join",
                    Mt::GroupWelcome => "welcome",
                    Mt::GroupClose => "close",
                    _ => "control message",
                };
                // A close nobody acknowledges still closes.
                let reason = if pending.message_type == Mt::GroupClose {
                    CloseReason::Local
                } else {
                    CloseReason::NoAnswer(what)
                };
                self.finish(id, reason);
                return;
            }
            pending.retries_left -= 1;
            let Some(s) = self.sessions.get_mut(&id) else {
                return;
            };
            pending.deadline = now + s.control_interval;
            s.pending = Some(pending.clone());
            self.transmit_control(id, &pending, now);
        }
        // Data retransmission and gap requests.
        let (mut sender_events, mut receiver_events) = (Vec::new(), Vec::new());
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        s.sender.handle_timeout(now, &mut sender_events);
        s.receiver.handle_timeout(now, &mut receiver_events);
        let heartbeat_due = s.state == State::Established && s.next_heartbeat <= now;
        for event in sender_events {
            self.sender_event(id, event, now);
        }
        self.receiver_events(id, SessionType::PointToPoint as i32, receiver_events, now);
        if heartbeat_due {
            self.heartbeat(id, now);
        }
    }

    /// Every 10 s, unless data went out in the meantime (spec §4.6): p2p heartbeats go to the
    /// peer with epoch u64::MAX (no MLS).
    fn heartbeat(&mut self, id: SessionId, now: Timestamp) {
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        s.next_heartbeat = now + HEARTBEAT_INTERVAL;
        if std::mem::take(&mut s.sent_since_heartbeat) {
            return;
        }
        let peer = s.peer.clone();
        let me = self.name.clone();
        let message_id = self.rng.random();
        let heartbeat = self.build(
            SessionType::PointToPoint as i32,
            Mt::Heartbeat,
            id,
            message_id,
            &me,
            &peer,
            1,
            command(pb::command_payload::CommandPayloadType::Heartbeat(
                pb::HeartbeatPayload { epoch: u64::MAX },
            )),
            BTreeMap::new(),
            now,
        );
        self.emit_send(heartbeat);
    }
}

/// The version string in the headers we send (what the reference puts there: its own version).
const SLIM_SESSION_VERSION: &str = "3.4.6";

/// A received session message, unpacked.
struct Received {
    source: Name,
    session_type: i32,
    message_type: Mt,
    session_id: SessionId,
    message_id: u32,
    error: bool,
    content: Option<pb::Content>,
    metadata: BTreeMap<String, String>,
}

fn reply_to(request: Mt) -> Option<Mt> {
    match request {
        Mt::DiscoveryRequest => Some(Mt::DiscoveryReply),
        Mt::JoinRequest => Some(Mt::JoinReply),
        Mt::GroupWelcome | Mt::GroupClose | Mt::GroupUpdate => Some(Mt::GroupAck),
        Mt::LeaveRequest => Some(Mt::LeaveReply),
        _ => None,
    }
}

fn same_service(a: &Name, b: &Name) -> bool {
    a.key().components == b.key().components
}

fn command(payload: pb::command_payload::CommandPayloadType) -> pb::Content {
    pb::Content {
        content_type: Some(pb::content::ContentType::CommandPayload(
            pb::CommandPayload {
                command_payload_type: Some(payload),
            },
        )),
    }
}

fn command_of(content: &Option<pb::Content>) -> Option<pb::command_payload::CommandPayloadType> {
    match content.as_ref()?.content_type.as_ref()? {
        pb::content::ContentType::CommandPayload(c) => c.command_payload_type.clone(),
        pb::content::ContentType::AppPayload(_) => None,
    }
}

fn app_payload(blob: Bytes, payload_type: &str) -> pb::Content {
    pb::Content {
        content_type: Some(pb::content::ContentType::AppPayload(
            pb::ApplicationPayload {
                payload_type: payload_type.to_owned(),
                blob,
            },
        )),
    }
}

/// Acks and RTX requests carry an empty application payload (wire bytes `1a020a00`).
fn empty_app_payload() -> pb::Content {
    app_payload(Bytes::new(), "")
}

/// Acks of direct (`PUBLISH_TO`) messages echo the flag.
fn publish_to_echo(metadata: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    metadata
        .get_key_value("PUBLISH_TO")
        .map(|(k, v)| (k.clone(), v.clone()))
        .into_iter()
        .collect()
}

fn participant(name: &Name) -> pb::Participant {
    pb::Participant {
        name: Some(name.to_pb()),
        settings: Some(pb::ParticipantSettings {
            sends_data: true,
            receives_data: true,
        }),
        status: pb::ParticipantState::Online as i32,
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
