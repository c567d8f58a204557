//! Fuzz target `session_layer`: one application's [`SessionLayer`] fed arbitrary and plausible
//! messages from peers that share (or do not share) its secret, answers to its own outputs,
//! application commands and time steps.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use slim_proto::name::{app_instance_id, ANY_INSTANCE};
use slim_proto::pb::command_payload::CommandPayloadType as Cmd;
use slim_proto::pb::{self, SessionMessageType as Mt, SessionType};
use slim_proto::{validate, Name, NameKey};

use super::{wire, Input};
use crate::identity::{
    is_command_message, sign_control_message, verify_control_message, PayloadSigStatus,
    SharedSecret, SigningKey,
};
use crate::session::{
    LayerConfig, Output, Reliability, SessionConfig, SessionError, SessionEvent, SessionId,
    SessionLayer,
};
use crate::Timestamp;

const SECRET: &str = "fuzz-session-layer-secret-0123456789abcdef";
const FORGER_SECRET: &str = "not-the-deployment-secret-0123456789abcdef";
const UNIX_AT_ZERO: u64 = 1_795_600_000;
/// Steps per input; every step can cost a few ECDSA signatures and verifications.
const MAX_STEPS: usize = 64;
/// Deadlines run through once the input is used up.
const FINAL_TIMEOUTS: usize = 12;
/// Recent messages kept to answer, replay or mutate.
const KEEP: usize = 24;
/// Session ids remembered to aim messages and commands at.
const KEEP_SESSIONS: usize = 16;

/// A remote application the fuzzer speaks for.
struct Peer {
    id: String,
    name: Name,
    key: SigningKey,
    secret: SharedSecret,
}

/// Two instances of `alice`, `bob`, a second instance of our own service, and `eve`, whose
/// tokens are made with another secret.
fn peers() -> &'static [Peer] {
    static PEERS: OnceLock<Vec<Peer>> = OnceLock::new();
    PEERS.get_or_init(|| {
        [
            ("alice", "alice_fuzzAAAA", SECRET),
            ("alice", "alice_fuzzBBBB", SECRET),
            ("bob", "bob_fuzzCCCC", SECRET),
            ("me", "me_fuzzDDDD", SECRET),
            ("eve", "eve_fuzzEEEE", FORGER_SECRET),
        ]
        .iter()
        .enumerate()
        .map(|(i, (service, suffix, secret))| {
            let id = format!("org/ns/{suffix}");
            Peer {
                name: Name::with_id("org", "ns", service, app_instance_id(&id)),
                id,
                key: SigningKey::from_secret_scalar(&[i as u8 + 1]).expect("valid scalar"),
                secret: SharedSecret::new(secret).expect("long enough"),
            }
        })
        .collect()
    })
}

/// The application's session layer (`org/ns/me`) driven by a scenario from the fuzz input.
///
/// Steps: raw protobuf messages (fresh bytes, or a recent message with bytes changed);
/// structured messages from a peer with plausible session ids, message ids, types and payloads,
/// and a valid, expired, future, forged or missing token and signatures (proper, header-only,
/// missing, tampered, by the wrong key); answers to the layer's own outputs (discovery and join
/// replies, acks, RTX replies, …) from the peer they were meant for; replays of earlier inputs
/// and of the layer's own outputs; application commands (create p2p and group sessions,
/// invite, remove, publish, publish_to, close); time steps to, just before or past the next
/// deadline.
///
/// Checked after every step: every `Send` is a valid message (slim-proto's `validate`) from our
/// name, with a fresh token of our identity, a known session and message type, and — for control
/// messages — both end-to-end signatures; it survives a wire round trip. Events only concern
/// sessions the application has (created, or announced by `Incoming`) and not yet `Closed`;
/// `Established` once per created session, at most one outcome per published message;
/// commands on sessions the application has are never refused as unknown, commands on any other
/// id always are (never seen, closed, or held by the layer but never announced: a participant
/// before the welcome, fuzz finding L2).
/// Counters add up (`sent`, `received`, drops). `poll_timeout` is never in the past and moves
/// past `now` after `handle_timeout(now)`.
pub fn session_layer(data: &[u8]) {
    let mut input = Input::new(data);
    let seed = [input.u8(); 32];
    let mut driver = Driver::new(seed);
    let mut steps = 0;
    while !input.is_empty() && steps < MAX_STEPS {
        steps += 1;
        driver.step(&mut input);
    }
    for _ in 0..FINAL_TIMEOUTS {
        let Some(at) = driver.layer.poll_timeout() else {
            break;
        };
        driver.now = driver.now.max(at);
        driver.layer.handle_timeout(driver.now);
        driver.after_timeout();
    }
}

struct Driver {
    layer: SessionLayer,
    me: Name,
    secret: SharedSecret,
    now: Timestamp,
    rng: ChaCha8Rng,
    /// The layer's recent `Send`s.
    sent: VecDeque<pb::Message>,
    /// Our recent inputs.
    inbound: VecDeque<pb::Message>,
    /// Session ids seen anywhere, most recent last.
    session_pool: VecDeque<SessionId>,
    /// Every session id the layer could know: created by it or named in a message to it.
    seen: BTreeSet<SessionId>,
    /// Channels the layer subscribed to.
    channels: Vec<Name>,
    /// Sessions the application has: created (and not closed) ...
    created: BTreeSet<SessionId>,
    /// ... or announced by `Incoming` (and not closed).
    incoming: BTreeSet<SessionId>,
    established: BTreeSet<SessionId>,
    outcomes: BTreeSet<(SessionId, u32)>,
    sends: u64,
    received: u64,
}

impl Driver {
    fn new(seed: [u8; 32]) -> Self {
        let config = LayerConfig {
            name: Name::new("org", "ns", "me"),
            secret: SECRET.into(),
            unix_at_zero: UNIX_AT_ZERO,
        };
        let layer = SessionLayer::new(config, seed).expect("valid config");
        let me = layer.name().clone();
        assert_eq!(me.components(), ["org", "ns", "me"]);
        Self {
            layer,
            me,
            secret: SharedSecret::new(SECRET).expect("long enough"),
            now: Timestamp::ZERO,
            rng: ChaCha8Rng::from_seed(seed),
            sent: VecDeque::new(),
            inbound: VecDeque::new(),
            session_pool: VecDeque::new(),
            seen: BTreeSet::new(),
            channels: vec![Name::new("org", "ns", "chan")],
            created: BTreeSet::new(),
            incoming: BTreeSet::new(),
            established: BTreeSet::new(),
            outcomes: BTreeSet::new(),
            sends: 0,
            received: 0,
        }
    }

    fn unix_now(&self) -> u64 {
        UNIX_AT_ZERO + self.now.as_micros() / 1_000_000
    }

    /// Names a peer would know: the peers, us, and the channels.
    fn known_names(&self) -> Vec<Name> {
        let mut names: Vec<Name> = peers().iter().map(|p| p.name.clone()).collect();
        names.push(self.me.clone());
        names.extend(self.channels.iter().cloned());
        names
    }

    fn remember_session(&mut self, id: SessionId) {
        self.seen.insert(id);
        if let Some(at) = self.session_pool.iter().position(|s| *s == id) {
            self.session_pool.remove(at);
        }
        if self.session_pool.len() == KEEP_SESSIONS {
            self.session_pool.pop_front();
        }
        self.session_pool.push_back(id);
    }

    fn pick_session(&mut self, input: &mut Input) -> SessionId {
        let b = input.u8();
        match b % 8 {
            0 => input.u32(),
            1 => u32::from(b >> 3),
            _ if !self.session_pool.is_empty() => {
                let at = usize::from(b >> 3) % self.session_pool.len();
                self.session_pool[self.session_pool.len() - 1 - at]
            }
            _ => input.u32(),
        }
    }

    fn step(&mut self, input: &mut Input) {
        match input.u8() % 16 {
            0 => self.raw(input),
            1..=4 => self.structured(input),
            5..=7 => self.answer(input),
            8 => self.replay(input),
            9..=11 => self.command(input),
            _ => self.advance(input),
        }
        self.check_between();
    }

    // ------------------------------------------------------------------------ inputs

    fn deliver(&mut self, message: pb::Message) {
        if let Some(pb::message::MessageType::Publish(p)) = &message.message_type {
            if let Some(s) = &p.session {
                self.remember_session(s.session_id);
            }
        }
        if self.inbound.len() == KEEP {
            self.inbound.pop_front();
        }
        self.inbound.push_back(message.clone());
        self.received += 1;
        self.layer.handle_message(message, self.now);
        self.drain();
    }

    /// Fresh bytes, or the encoding of a recent message with a few bytes changed.
    fn raw(&mut self, input: &mut Input) {
        let mode = input.u8();
        let recent = if mode & 1 == 0 {
            &self.inbound
        } else {
            &self.sent
        };
        let body = if mode & 2 == 0 || recent.is_empty() {
            let len = usize::from(input.u16() % 1024);
            input.take(len).to_vec()
        } else {
            let at = usize::from(mode >> 2) % recent.len();
            let mut body = recent[recent.len() - 1 - at].encode_to_vec();
            for _ in 0..input.u8() % 4 + 1 {
                if body.is_empty() {
                    break;
                }
                let at = usize::from(input.u16()) % body.len();
                body[at] = input.u8();
            }
            if input.chance(32) {
                body.truncate(usize::from(input.u16()) % (body.len() + 1));
            }
            body
        };
        if let Ok(message) = pb::Message::decode(body.as_slice()) {
            self.deliver(message);
        }
    }

    /// A token for `peer`: valid, expired, from the future, garbage, another peer's, or none.
    fn token(&mut self, input: &mut Input, peer: &Peer) -> String {
        let now = self.unix_now();
        let issued_at = match input.u8() {
            0..=7 => now.saturating_sub(3_601 + u64::from(input.u16())),
            8..=11 => now + 6 + u64::from(input.u8()),
            12..=15 => return input.string(64),
            16..=17 => return String::new(),
            18..=21 => {
                let other = &peers()[usize::from(input.u8()) % peers().len()];
                return other
                    .secret
                    .issue(&other.id, &other.key.public_key(), now, &mut self.rng);
            }
            _ => now,
        };
        peer.secret
            .issue(&peer.id, &peer.key.public_key(), issued_at, &mut self.rng)
    }

    /// Builds a message from `peer` and signs it the way the input says.
    #[allow(clippy::too_many_arguments)]
    fn peer_message(
        &mut self,
        input: &mut Input,
        peer: &Peer,
        destination: &Name,
        fanout: u32,
        session: pb::SessionHeader,
        content: Option<pb::Content>,
        metadata: BTreeMap<String, String>,
        error: Option<bool>,
    ) -> pb::Message {
        let identity = self.token(input, peer);
        let source = match input.u8() {
            0..=3 => None,
            4..=7 => Some(peer.name.with_instance(ANY_INSTANCE).to_pb()),
            8..=11 => {
                let other = &peers()[usize::from(input.u8()) % peers().len()];
                Some(other.name.to_pb())
            }
            12..=13 => Some(wire::wire_name(input, &peer.name)),
            _ => Some(peer.name.to_pb()),
        };
        let header = pb::SlimHeader {
            source,
            destination: Some(destination.to_pb()),
            identity,
            fanout,
            version: "3.4.6".into(),
            ttl: slim_proto::DEFAULT_TTL,
            error,
            incoming_conn: Some(1),
            ..Default::default()
        };
        let message_type = session.session_message_type;
        let mut message = wire::publish(header, session, content, metadata);
        let mode = input.u8();
        let signs = is_command_message(message_type) || mode >= 0xf0;
        if !signs {
            return message;
        }
        match mode % 16 {
            // Not signed at all.
            0 => {}
            // Header signature only (clients before session 0.7.20).
            1 => {
                if let Some(pb::message::MessageType::Publish(p)) = message.message_type.as_mut() {
                    let _ = crate::identity::sign_e2e_header(p, &peer.key);
                }
            }
            // Signed, then changed.
            2 => {
                let _ = sign_control_message(&mut message, &peer.key);
                message.metadata.insert("late".into(), "x".into());
            }
            // Signed by someone else's key.
            3 => {
                let other = &peers()[usize::from(input.u8()) % peers().len()];
                let _ = sign_control_message(&mut message, &other.key);
            }
            _ => {
                let _ = sign_control_message(&mut message, &peer.key);
            }
        }
        message
    }

    /// A structured message from a peer: plausible ids, types and payloads.
    fn structured(&mut self, input: &mut Input) {
        let peer = &peers()[usize::from(input.u8()) % peers().len()];
        let session_id = self.pick_session(input);
        // The message id: of something the layer sent on that session (a reply), small (data
        // sequence ids), or anything.
        let b = input.u8();
        let from_output = self
            .sent
            .iter()
            .rev()
            .filter_map(session_of)
            .filter(|s| s.session_id == session_id)
            .nth(usize::from(b >> 4))
            .map(|s| (s.message_id, s.session_type));
        let message_id = match (b % 4, from_output) {
            (0 | 1, Some((id, _))) => id,
            (0..=2, _) => u32::from(b >> 2) % 12,
            _ => input.u32(),
        };
        let session_type = match input.u8() {
            0..=7 => i32::from(input.u8() % 4),
            _ => from_output.map_or_else(
                || {
                    if input.bool() {
                        SessionType::PointToPoint as i32
                    } else {
                        SessionType::Multicast as i32
                    }
                },
                |(_, session_type)| session_type,
            ),
        };
        let message_type = wire::message_type(input);
        let known = self.known_names();
        let destination = match input.u8() % 8 {
            0 => wire::pick_name(input, &known),
            1 => self.me.with_instance(ANY_INSTANCE),
            2 if !self.channels.is_empty() => {
                self.channels[usize::from(input.u8()) % self.channels.len()].clone()
            }
            _ => self.me.clone(),
        };
        let content = wire::content(input, message_type, &known);
        let mut metadata = wire::metadata(input);
        if message_type == Mt::Msg as i32 && input.chance(24) {
            metadata.insert("PUBLISH_TO".into(), "TRUE".into());
        }
        let error = input.chance(24).then(|| input.bool());
        let fanout = input.pick(&[1, 256, 1, 0]);
        let session = pb::SessionHeader {
            session_type,
            session_message_type: message_type,
            session_id,
            message_id,
        };
        let message = self.peer_message(
            input,
            peer,
            &destination,
            fanout,
            session,
            content,
            metadata,
            error,
        );
        self.deliver(message);
    }

    /// The answer the addressee of one of the layer's recent outputs would give.
    fn answer(&mut self, input: &mut Input) {
        if self.sent.is_empty() {
            return;
        }
        let at = usize::from(input.u8()) % self.sent.len();
        let request = self.sent[self.sent.len() - 1 - at].clone();
        let (Some(header), Some(session)) = (header_of(&request), session_of(&request)) else {
            return;
        };
        let destination = header.destination.as_ref().and_then(NameKey::from_pb);
        // Who answers: the instance it was sent to, one of the service it was sent to, or
        // (channels, strangers) any peer.
        let candidates: Vec<&Peer> = peers()
            .iter()
            .filter(|p| {
                destination.is_some_and(|d| {
                    p.name.key() == d
                        || (d.is_any_instance() && p.name.key().components == d.components)
                })
            })
            .collect();
        let peer = if candidates.is_empty() || input.chance(16) {
            &peers()[usize::from(input.u8()) % peers().len()]
        } else {
            candidates[usize::from(input.u8()) % candidates.len()]
        };
        let request_type = Mt::try_from(session.session_message_type).unwrap_or(Mt::Unspecified);
        let me = self.me.clone();
        let mut metadata = BTreeMap::new();
        let mut error = None;
        let (reply_type, content) = match request_type {
            Mt::DiscoveryRequest => (
                Mt::DiscoveryReply,
                wire::command_content(Cmd::DiscoveryReply(pb::DiscoveryReplyPayload {})),
            ),
            Mt::JoinRequest => (
                Mt::JoinReply,
                wire::command_content(Cmd::JoinReply(pb::JoinReplyPayload {
                    key_package: None,
                    participant: Some(pb::Participant {
                        name: Some(peer.name.to_pb()),
                        settings: Some(pb::ParticipantSettings {
                            sends_data: true,
                            receives_data: true,
                        }),
                        status: 0,
                    }),
                })),
            ),
            Mt::GroupWelcome
            | Mt::GroupClose
            | Mt::GroupUpdate
            | Mt::UpdateParticipantState
            | Mt::GroupProposal => (
                Mt::GroupAck,
                wire::command_content(Cmd::GroupAck(pb::GroupAckPayload {})),
            ),
            Mt::LeaveRequest => (
                Mt::LeaveReply,
                wire::command_content(Cmd::LeaveReply(pb::LeaveReplyPayload {})),
            ),
            Mt::Msg => {
                if let Some(flag) = request.metadata.get("PUBLISH_TO") {
                    metadata.insert("PUBLISH_TO".to_owned(), flag.clone());
                }
                (Mt::MsgAck, wire::app_content("", b""))
            }
            Mt::RtxRequest => {
                // The data again, or "no longer available".
                if input.chance(48) {
                    error = Some(true);
                    (Mt::RtxReply, wire::app_content("", b""))
                } else {
                    (Mt::RtxReply, wire::app_content("msg", input.bytes(32)))
                }
            }
            Mt::Heartbeat => (
                Mt::Heartbeat,
                wire::command_content(Cmd::Heartbeat(pb::HeartbeatPayload { epoch: u64::MAX })),
            ),
            // Acks, replies and unknown types: the peer sends data instead.
            _ => (Mt::Msg, wire::app_content("msg", input.bytes(16))),
        };
        let twist = input.u8();
        let reply_session = pb::SessionHeader {
            session_type: session.session_type,
            session_message_type: reply_type as i32,
            session_id: session.session_id,
            message_id: match twist {
                0..=7 => session.message_id.wrapping_add(1),
                _ => session.message_id,
            },
        };
        let message = self.peer_message(
            input,
            peer,
            &me,
            1,
            reply_session,
            Some(content),
            metadata,
            error,
        );
        self.deliver(message);
    }

    /// An earlier input again (a duplicate), or one of the layer's own outputs (an application
    /// talking to its own service, or an echo).
    fn replay(&mut self, input: &mut Input) {
        let mode = input.u8();
        let recent = if mode & 1 == 0 {
            &self.inbound
        } else {
            &self.sent
        };
        if recent.is_empty() {
            return;
        }
        let at = usize::from(mode >> 1) % recent.len();
        let message = recent[recent.len() - 1 - at].clone();
        self.deliver(message);
    }

    // ------------------------------------------------------------------------ commands

    fn reliability(input: &mut Input) -> Option<Reliability> {
        input.chance(200).then(|| Reliability {
            interval: Duration::from_millis(input.pick(&[1, 10, 50, 100, 1000])),
            max_retries: input.pick(&[0, 1, 3, 10]),
        })
    }

    fn session_config(input: &mut Input) -> SessionConfig {
        SessionConfig {
            reliability: Self::reliability(input),
            metadata: wire::metadata(input),
            // MLS: the peers' key packages and welcomes are whatever the input says.
            mls: input.chance(40),
        }
    }

    fn command(&mut self, input: &mut Input) {
        let op = input.u8();
        let session = self.pick_session(input);
        let now = self.now;
        let known = self.known_names();
        let result: Result<(), SessionError> = match op % 8 {
            0 => {
                let peer = match input.u8() % 6 {
                    0 => Name::new("org", "ns", "alice"),
                    1 => Name::new("org", "ns", "bob"),
                    2 => Name::new("org", "ns", "me"),
                    3 => Name::new("org", "ns", "nobody"),
                    _ => wire::pick_name(input, &known),
                };
                let config = Self::session_config(input);
                let id = self.layer.create_session(&peer, config, now);
                self.created_session(id);
                Ok(())
            }
            1 => {
                let channel = input.pick(&[
                    Name::new("org", "ns", "chan"),
                    Name::new("org", "ns", "chan2"),
                    Name::new("org", "other", "chan"),
                ]);
                let config = Self::session_config(input);
                let id = self.layer.create_group(&channel, config, now);
                self.created_session(id);
                Ok(())
            }
            2 => {
                let invitee = match input.u8() % 4 {
                    0 => Name::new("org", "ns", "alice"),
                    1 => Name::new("org", "ns", "bob"),
                    _ => wire::pick_name(input, &known),
                };
                self.layer.invite(session, &invitee, now)
            }
            3 => {
                let member = wire::pick_name(input, &known);
                self.layer.remove(session, &member, now)
            }
            4 | 5 => {
                let payload = Bytes::copy_from_slice(input.bytes(64));
                let metadata = if input.chance(32) {
                    wire::metadata(input)
                } else {
                    BTreeMap::new()
                };
                self.layer
                    .publish_with(session, payload, "msg".into(), metadata, now)
                    .map(|id| {
                        if id != 0 {
                            // A fresh sequence id has no outcome yet.
                            assert!(
                                !self.outcomes.contains(&(session, id)),
                                "publish returned id {id} of session {session} twice"
                            );
                        }
                    })
            }
            6 => {
                let member = wire::pick_name(input, &known);
                let payload = Bytes::copy_from_slice(input.bytes(32));
                self.layer
                    .publish_to(session, &member, payload, now)
                    .map(|_| ())
            }
            _ => self.layer.close(session, now),
        };
        if op % 8 >= 2 {
            match &result {
                Err(SessionError::UnknownSession(id)) => {
                    assert_eq!(*id, session);
                    assert!(
                        !self.created.contains(&session) && !self.incoming.contains(&session),
                        "session {session} the application has is unknown to the layer"
                    );
                }
                // Never seen, closed, or held by the layer but never announced (L2).
                Ok(()) | Err(_) => assert!(
                    self.live(session),
                    "session {session}, which the application does not have, was not refused \
                     as unknown: {result:?}"
                ),
            }
        }
        self.drain();
    }

    fn created_session(&mut self, id: SessionId) {
        assert!(
            !self.created.contains(&id) && !self.incoming.contains(&id),
            "new session id {id} is already in use"
        );
        self.created.insert(id);
        self.remember_session(id);
    }

    fn advance(&mut self, input: &mut Input) {
        let step = input.u8();
        let delta = match step & 3 {
            0 => Duration::from_millis(u64::from(step >> 2) * 10),
            1 => Duration::from_millis(u64::from(input.u16())),
            2 => Duration::from_secs(u64::from(input.u8()) * 30),
            _ => {
                let next = self.layer.poll_timeout().unwrap_or(self.now);
                let before = Duration::from_micros(u64::from((step >> 2) & 1));
                next.saturating_since(self.now).saturating_sub(before)
            }
        };
        self.now = self.now + delta;
        self.layer.handle_timeout(self.now);
        self.after_timeout();
    }

    fn after_timeout(&mut self) {
        self.drain();
        if let Some(at) = self.layer.poll_timeout() {
            assert!(
                at > self.now,
                "poll_timeout {at:?} not after handle_timeout({:?})",
                self.now
            );
        }
        self.check_between();
    }

    // ------------------------------------------------------------------------ checks

    fn drain(&mut self) {
        while let Some(output) = self.layer.poll_output() {
            match output {
                Output::Send(message) => {
                    self.sends += 1;
                    self.check_send(&message);
                    if let Some(s) = session_of(&message) {
                        self.remember_session(s.session_id);
                    }
                    if self.sent.len() == KEEP {
                        self.sent.pop_front();
                    }
                    self.sent.push_back(*message);
                }
                Output::Subscribe(channel) | Output::Unsubscribe(channel) => {
                    if !self.channels.iter().any(|c| c.key() == channel.key()) {
                        if self.channels.len() == 8 {
                            self.channels.remove(1);
                        }
                        self.channels.push(channel);
                    }
                }
                Output::Event(event) => self.check_event(&event),
            }
        }
        let stats = self.layer.stats();
        assert_eq!(stats.sent, self.sends, "stats.sent counts the Send outputs");
        assert_eq!(stats.received, self.received, "stats.received");
        assert!(
            stats.dropped_total() <= stats.received,
            "more drops than messages"
        );
    }

    fn check_send(&self, message: &pb::Message) {
        validate(message).unwrap_or_else(|e| panic!("invalid output {e}: {message:?}"));
        let (Some(header), Some(session)) = (header_of(message), session_of(message)) else {
            panic!("output is not a session message: {message:?}");
        };
        let source = header.source.as_ref().and_then(Name::from_pb);
        assert_eq!(
            source.as_ref(),
            Some(&self.me),
            "outputs come from our name"
        );
        assert!(
            header
                .destination
                .as_ref()
                .and_then(Name::from_pb)
                .is_some(),
            "output to an incomplete name: {message:?}"
        );
        assert!(matches!(header.fanout, 1 | 256), "fanout {}", header.fanout);
        assert_eq!(header.ttl, slim_proto::DEFAULT_TTL);
        let message_type = Mt::try_from(session.session_message_type);
        assert!(
            matches!(message_type, Ok(t) if t != Mt::Unspecified),
            "output of type {}",
            session.session_message_type
        );
        assert!(
            match SessionType::try_from(session.session_type) {
                Ok(SessionType::PointToPoint | SessionType::Multicast) => true,
                Ok(SessionType::Unspecified) | Err(_) => false,
            },
            "output of session type {}: {message:?}",
            session.session_type
        );
        let token = self
            .secret
            .verify(&header.identity, self.unix_now())
            .unwrap_or_else(|e| panic!("our token does not verify: {e}"));
        assert_eq!(token.app_instance_id(), self.me.id());
        if is_command_message(session.session_message_type) {
            let verified = verify_control_message(message, &self.secret, self.unix_now())
                .unwrap_or_else(|e| panic!("our control message does not verify: {e}"));
            assert_eq!(verified.payload_sig, PayloadSigStatus::Verified);
        } else {
            assert!(header.e2e_header_sig.is_none(), "signed data message");
        }
        let again = pb::Message::decode(message.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(&again, message, "wire round trip");
    }

    fn live(&self, session: SessionId) -> bool {
        self.created.contains(&session) || self.incoming.contains(&session)
    }

    fn check_event(&mut self, event: &SessionEvent) {
        match event {
            SessionEvent::Established { session, .. } => {
                assert!(
                    self.created.contains(session),
                    "Established for session {session} we did not create"
                );
                assert!(
                    self.established.insert(*session),
                    "session {session} established twice"
                );
            }
            SessionEvent::Incoming { session, .. } => {
                assert!(
                    !self.live(*session),
                    "Incoming for session {session}, which the application has"
                );
                self.incoming.insert(*session);
            }
            SessionEvent::Closed { session, .. } => {
                assert!(
                    self.created.remove(session) || self.incoming.remove(session),
                    "Closed for session {session}, which the application does not have"
                );
                self.established.remove(session);
                self.outcomes.retain(|(s, _)| s != session);
            }
            SessionEvent::Delivered { session, id }
            | SessionEvent::SendFailed { session, id, .. } => {
                assert!(
                    self.live(*session),
                    "{event:?} for a session the application does not have"
                );
                assert!(
                    self.outcomes.insert((*session, *id)),
                    "second outcome for message {id} of session {session}: {event:?}"
                );
            }
            SessionEvent::Message { session, .. }
            | SessionEvent::MessageLost { session, .. }
            | SessionEvent::MemberJoined { session, .. }
            | SessionEvent::MemberLeft { session, .. }
            | SessionEvent::MemberState { session, .. }
            | SessionEvent::InviteFailed { session, .. } => {
                assert!(
                    self.live(*session),
                    "{event:?} for a session the application does not have"
                );
            }
        }
    }

    fn check_between(&self) {
        if let Some(at) = self.layer.poll_timeout() {
            assert!(
                at >= self.now,
                "poll_timeout {at:?} is in the past ({:?})",
                self.now
            );
        }
        assert!(
            self.layer.session_count() >= self.created.len() + self.incoming.len(),
            "the layer holds fewer sessions than the application has"
        );
    }
}

fn header_of(message: &pb::Message) -> Option<&pb::SlimHeader> {
    match &message.message_type {
        Some(pb::message::MessageType::Publish(p)) => p.header.as_ref(),
        _ => None,
    }
}

fn session_of(message: &pb::Message) -> Option<&pb::SessionHeader> {
    match &message.message_type {
        Some(pb::message::MessageType::Publish(p)) => p.session.as_ref(),
        _ => None,
    }
}
