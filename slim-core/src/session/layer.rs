//! The session layer of one application (spec §4), wire-compatible with the published SLIM
//! clients:
//!
//! * point-to-point sessions: discovery → join → welcome → ack, then data, heartbeats, close;
//! * group sessions: a moderator creates a data and a control channel, invites members
//!   (discovery, join, welcome, and a group update to the members already there), removes them
//!   (update, then leave), and closes the group; members join, receive updates, leave;
//! * reliable data (acks, retransmission, gap requests, loss reported without ending the session)
//!   or best-effort data.
//!
//! Where the reference leaves a group inconsistent, ours goes further, within its wire format
//! (metadata keys it ignores, messages it already knows): the moderator's welcome says where
//! each member's data stream starts for the newcomer (`STREAM_STARTS`), and a newcomer's
//! stream starts at 1 for everyone already in; member lists carry a version
//! (`GROUP_VERSION`); a member that missed an update gets the list again when next heard
//! from; an invite whose welcome goes unacknowledged is withdrawn from everyone, and a
//! non-member that acts as a member is asked to leave.
//!
//! Sans-IO like every core: the driver hands in the messages the application's local router
//! delivered ([`SessionLayer::handle_message`]) and the application's commands; it carries out
//! every [`Output`] in order — messages to send, channel subscriptions to make or drop (a
//! subscription must be in place before the outputs after it are carried out), events for the
//! application — and wakes the layer at [`SessionLayer::poll_timeout`].
//!
//! Every message carries a fresh identity token; control messages are signed (`e2e_header_sig`
//! and `slim-payload-sig`), as 3.x clients expect. Received messages must carry a valid token of
//! an app sharing our secret, and control messages must be signed by it.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rustc_hash::{FxHashMap, FxHashSet};
use slim_proto::name::ANY_INSTANCE;
use slim_proto::pb::command_payload::CommandPayloadType as Cmd;
use slim_proto::pb::{self, SessionMessageType as Mt, SessionType};
use slim_proto::{Name, NameKey};

use super::mls::{Committed, MlsState, PayloadError, SessionMls, TokenVerifier};
use super::receiver::{Incoming, ReceiverEvent, ReliableReceiver, Verdict};
use super::sender::{Outgoing, Queued, ReliableSender, SenderEvent, SEND_QUEUE};
use crate::group::{CommitError, CommitOut, DecryptError, GroupConfig, MlsIdentity};
use crate::identity::{
    self, claims_field, new_identity_id, sign_control_message, verify_e2e_header, verify_payload,
    IdError, SecretError, SenderMemo, SharedSecret, SigningKey, PAYLOAD_SIG_KEY,
};
use crate::Timestamp;

/// Session id as on the wire.
pub type SessionId = u32;

/// Fanout for messages to every member of a group or for a broadcast close.
pub const MAX_FANOUT: u32 = 256;
/// Control messages are retried this often when the session has no timers (reference 1 s × 10).
pub const DEFAULT_CONTROL_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_CONTROL_RETRIES: u32 = 10;
/// Heartbeat period (spec §4.6).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
/// How long a MSG_ACK waits for the application's answer before it goes out on its own, like a
/// delayed TCP ACK. A request's ack would otherwise travel (and be processed) ahead of the
/// reply, adding a whole message pass to every round trip; held, it follows the reply. Far
/// below any sender's retransmission interval (the reference's is 1 s).
pub const ACK_HOLD: Duration = Duration::from_millis(1);
/// A held ack that goes out later than this after it was due (the driver was stalled, or its
/// clock jumped) gets a fresh identity token: the one it was built with may have expired.
const ACK_RESTAMP_AFTER: Duration = Duration::from_secs(60);
/// Session ids are drawn below this (reference `0..u32::MAX-1000`).
const MAX_SESSION_ID: u32 = u32::MAX - 1000;
/// Publishes queued before a session is ready to send (handshake, MLS rejoin).
const MAX_QUEUED: usize = 1024;
/// Group updates remembered to recognise retransmissions.
const SEEN_UPDATES: usize = 64;
/// Our control messages to a whole channel remembered after they end, to recognise the acks
/// of their retransmitted copies that come in later.
const ENDED_CHANNEL_WIDE: usize = 64;
/// Metadata a member puts on its leave request (spec §1.3).
const LEAVING_SESSION: &str = "LEAVING_SESSION";
/// A peer not heard from for this many heartbeat periods is offline (spec §4.6).
const MISSED_HEARTBEATS: u32 = 3;
/// Metadata of a direct (unsequenced) message to one member (spec §1.3).
const PUBLISH_TO: &str = "PUBLISH_TO";
/// Direct messages remembered per session to drop retransmitted copies.
const SEEN_DIRECT: usize = 256;
/// The version string in the headers we send (the reference puts its own version there).
const HEADER_VERSION: &str = "3.4.6";
/// Metadata of our group welcomes: where the data stream of each member listed starts for the
/// new member (ids separated by commas, in the order of the welcome's participants; 0 = none).
/// Without it a member starts a stream at the first id it sees, as the reference does, and an
/// earlier id meant for it that the network delays behind that one is never delivered. Only
/// the sender knows where its stream starts for a new member, and the reference carries that
/// nowhere: the moderator knows it for its own stream and bounds it from below for the others'
/// (see `stream_starts`). Reference members ignore the key.
const STREAM_STARTS: &str = "slim-rs-stream-starts";
/// Metadata of our welcomes and group updates: the version of the member list they carry (it
/// grows with every list the moderator sends), so that a member never goes back to an older
/// list when two updates cross on the network. Reference members ignore the key.
const GROUP_VERSION: &str = "slim-rs-group-version";
/// Departed group members remembered per session, to drop their late messages.
const DEPARTED: usize = 256;

/// Data reliability: acks and retransmission (on iff both are set, as in the reference).
///
/// `interval` is the first wait for an ack; unlike the reference's fixed timer, later tries of
/// a message wait longer (doubling, up to 8 intervals) and the wait follows the measured round
/// trip, so a congested path is not flooded with copies (see [`rto`](super::rto)). A message is
/// therefore given up later than the reference's `(max_retries + 1) · interval`: 71 s for
/// 1 s × 10 on a quiet path, [`Reliability::give_up_bound`] at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reliability {
    pub interval: Duration,
    pub max_retries: u32,
}

impl Reliability {
    /// The latest a data message is given up (`SendFailed`, or `MessageLost` from when the
    /// receiver saw the gap), whatever the round-trip estimate: `8·interval·(max_retries + 1)`
    /// (see [`rto`](super::rto) for the schedule).
    pub fn give_up_bound(&self) -> Duration {
        super::rto::worst_give_up(self.interval, self.max_retries)
    }
}

/// How to open a session.
#[derive(Debug, Clone, Default)]
pub struct SessionConfig {
    pub reliability: Option<Reliability>,
    /// Copied onto join requests; becomes the peers' session metadata.
    pub metadata: BTreeMap<String, String>,
    /// End-to-end encryption with an MLS group (spec §4.4–§4.7): data payloads are MLS
    /// ciphertext that only the session's members can read.
    pub mls: bool,
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
    #[error(
        "session {0} has {1} messages queued until it is ready to send (handshake or MLS rejoin)"
    )]
    QueueFull(SessionId, usize),
    #[error("session {0} is not a group this application moderates")]
    NotModerator(SessionId),
    #[error("{1} is not a member of session {0}")]
    NotAMember(SessionId, String),
    #[error("session {0} is not established yet")]
    NotEstablished(SessionId),
    /// Reliable sessions: the window of unacknowledged messages is full and this many more
    /// wait for it; publish again once some are acknowledged (`Delivered` or `SendFailed`).
    #[error("session {0} has {1} messages waiting for acknowledgements to go out")]
    SendQueueFull(SessionId, usize),
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// We closed it (or left the group).
    Local,
    /// The peer or the moderator closed it.
    Peer,
    /// The moderator removed us from the group.
    Removed,
    /// The handshake did not get an answer.
    NoAnswer(&'static str),
    /// The peer's MLS material was refused, or our MLS group could not be set up.
    Refused(&'static str),
}

/// What the application is told.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionEvent {
    /// A session we opened is ready (the peer acknowledged our welcome).
    Established { session: SessionId, peer: Name },
    /// We joined a session someone else opened (a p2p peer, or a group moderator).
    Incoming {
        session: SessionId,
        peer: Name,
        group: bool,
        /// Whether the session is end-to-end encrypted with MLS.
        mls: bool,
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
    /// A member joined a group (for the moderator: the invite completed).
    MemberJoined { session: SessionId, member: Name },
    /// A member left or was removed from a group.
    MemberLeft { session: SessionId, member: Name },
    /// A peer went silent for three heartbeat periods (or said it went offline), or came back.
    /// Offline members are not waited for by new messages.
    MemberState {
        session: SessionId,
        member: Name,
        online: bool,
    },
    /// An invite did not complete.
    InviteFailed {
        session: SessionId,
        invitee: Name,
        reason: &'static str,
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
    /// Make this channel reachable through the node (and wait for its ack) before going on.
    Subscribe(Name),
    /// Drop a channel subscription.
    Unsubscribe(Name),
    Event(SessionEvent),
}

/// Why a received message was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum SessionDrop {
    /// Not a publish with header, session header and the payload its type needs.
    Malformed,
    /// Missing, forged or expired identity token.
    BadToken,
    /// A control message whose signatures do not verify.
    BadSignature,
    UnknownSession,
    /// A message the session's state does not expect (stale reply, stranger, …).
    Unexpected,
    Duplicate,
    /// A sequence id far beyond what the session can hold.
    OutOfWindow,
    /// MLS: a data payload that does not decrypt, or whose authenticated data does not match
    /// its header.
    Undecryptable,
    /// MLS: a key package, welcome or commit that was refused (or missing where MLS is on).
    BadMls,
}

impl SessionDrop {
    pub const ALL: [SessionDrop; 9] = [
        SessionDrop::Malformed,
        SessionDrop::BadToken,
        SessionDrop::BadSignature,
        SessionDrop::UnknownSession,
        SessionDrop::Unexpected,
        SessionDrop::Duplicate,
        SessionDrop::OutOfWindow,
        SessionDrop::Undecryptable,
        SessionDrop::BadMls,
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
    /// RTX_REQUESTs sent: as a receiver, asking a source for a data message we are missing.
    pub rtx_requests_sent: u64,
    /// RTX_REQUESTs received for a session we have.
    pub rtx_requests_received: u64,
    /// RTX_REPLYs sent in answer to requests (with the message, or saying it is gone).
    pub rtx_replies_sent: u64,
    /// RTX_REPLYs received that carried the message asked for (not "no longer available").
    pub rtx_replies_received: u64,
    /// Data MSG copies re-sent by the sender's timer because an ack did not come in time.
    pub data_retransmissions: u64,
    /// Control messages re-sent by their retry timer because a reply did not come in time.
    pub control_retransmissions: u64,
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
    /// Opened the p2p session, or moderates the group.
    Initiator,
    Participant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Initiator: the handshake is under way.
    Opening,
    /// Participant: joined, waiting for the welcome.
    AwaitingWelcome,
    Established,
    /// Waiting for the close (or our leave) to be acknowledged.
    Closing,
}

/// What a control message is for: decides what happens once it is answered (or is not).
#[derive(Debug, Clone, PartialEq)]
enum Purpose {
    Discovery,
    Join,
    Welcome,
    Close,
    Leave,
    InviteDiscovery(Name),
    InviteJoin(Name),
    InviteWelcome(Name),
    InviteUpdate(Name),
    RemoveUpdate(Name),
    RemoveLeave(Name),
    /// The update telling the others that a member left on its own (or that an invitee we
    /// gave up on is not one).
    DepartureUpdate(Name),
    /// The current member list, again, for a member that missed an update.
    Resync(Name),
    /// The update announcing an invitee whose invite was withdrawn (MLS sessions: its commit
    /// must still reach the members).
    Withdrawn(Name),
    /// Participant: our UPDATE_PARTICIPANT_STATE (soft close / back online).
    StateUpdate,
    /// Participant: our REJOIN_REQUEST (our MLS epoch was found stale).
    Rejoin,
    /// Moderator: the GROUP_UPDATE op=REJOIN for a member that rejoined the MLS group.
    RejoinUpdate(Name),
}

/// Who must answer a control message.
#[derive(Debug, Clone, PartialEq)]
enum Awaiting {
    /// Any instance of this service (discovery).
    AnyOf(Name),
    /// Each of these.
    Each(Vec<Name>),
}

/// A control message waiting for its replies, re-sent (with a fresh token) until they come.
#[derive(Debug, Clone)]
struct PendingControl {
    purpose: Purpose,
    message_type: Mt,
    message_id: u32,
    destination: Name,
    fanout: u32,
    payload: Cmd,
    metadata: BTreeMap<String, String>,
    awaiting: Awaiting,
    retries_left: u32,
    deadline: Timestamp,
}

impl PendingControl {
    /// Every peer it went to is offline or gone (a membership update while all the other
    /// members are offline): no ack will come, and none is needed.
    fn awaits_nobody(&self) -> bool {
        matches!(&self.awaiting, Awaiting::Each(names) if names.is_empty())
    }

    /// Awaiting nobody, it is due at once: it ends at the next timeout instead of being
    /// retried. Not at once in the call that sends it, so that it ends after the messages
    /// sent with it (an invite's welcome goes out after its update).
    fn end_soon_if_unawaited(&mut self, now: Timestamp) {
        if self.awaits_nobody() {
            self.deadline = self.deadline.min(now);
        }
    }

    /// `m` answers this message, whoever sent it.
    fn answered_by(&self, m: &Received) -> bool {
        self.message_id == m.message_id && answers(self.message_type, m.message_type)
    }

    /// `m` is one of the answers this message still waits for.
    fn awaits(&self, m: &Received) -> bool {
        self.answered_by(m)
            && match &self.awaiting {
                Awaiting::AnyOf(service) => service.key().components == m.source.key().components,
                Awaiting::Each(names) => names.iter().any(|n| n.key() == m.source.key()),
            }
    }

    /// It ends at `now`: its retries ran out, or it awaits nobody.
    fn ends(&self, now: Timestamp) -> bool {
        self.deadline <= now && (self.retries_left == 0 || self.awaits_nobody())
    }
}

#[derive(Debug, Clone)]
enum Task {
    Invite(Name),
    Remove(Name),
    Departed(Name),
    /// A member's REJOIN_REQUEST (the request's id, for the reply, and its key package).
    Rejoin {
        member: Name,
        session_type: SessionType,
        message_id: u32,
        key_package: Bytes,
    },
}

#[derive(Debug)]
struct Group {
    data: Name,
    control: Name,
    /// Every member, the moderator and us included, in the reference's order.
    members: Vec<Name>,
    subscribed: bool,
    /// Moderator: membership changes, one at a time.
    tasks: VecDeque<Task>,
    busy: bool,
    /// Participant: updates already applied (retransmissions are acked again, not re-applied).
    seen_updates: VecDeque<u32>,
    /// Members that left or were removed. Their late messages are dropped: a stream from them
    /// that started again would repeat or skip ids.
    departed: VecDeque<NameKey>,
    /// Moderator: the version of the last member list sent ([`GROUP_VERSION`]). Participant: of
    /// the last one applied.
    version: u64,
    /// Moderator: members that did not acknowledge an update before its retries ran out. They
    /// get the current member list again as soon as they are heard from.
    stale: BTreeSet<NameKey>,
    /// Moderator: when each non-member that still acts as a member was last told to leave.
    evicted: BTreeMap<NameKey, Timestamp>,
    /// Moderator: the last REJOIN_REPLY sent to each member, by request id (a retransmitted
    /// request gets the same reply again, not a second commit).
    rejoin_replies: BTreeMap<NameKey, (u32, pb::RejoinReplyPayload)>,
}

impl Group {
    fn new(data: Name, control: Name, members: Vec<Name>, subscribed: bool) -> Self {
        Group {
            data,
            control,
            members,
            subscribed,
            tasks: VecDeque::new(),
            busy: false,
            seen_updates: VecDeque::new(),
            departed: VecDeque::new(),
            version: 0,
            stale: BTreeSet::new(),
            evicted: BTreeMap::new(),
            rejoin_replies: BTreeMap::new(),
        }
    }

    fn is_member(&self, name: &NameKey) -> bool {
        self.members.iter().any(|n| n.key() == *name)
    }
}

/// Application data waiting until the session may send it (handshake, MLS rejoin), kept in
/// the order it was given.
enum Deferred {
    /// Sequenced: its id is allocated when it goes out.
    Publish {
        payload: Bytes,
        payload_type: String,
        metadata: BTreeMap<String, String>,
    },
    /// A direct message (`publish_to`): its id went to the application already.
    Direct {
        id: u32,
        target: Name,
        payload: Bytes,
    },
}

struct Session {
    role: Role,
    state: State,
    /// Whether the application knows the session: it opened it, or was told by `Incoming`. A
    /// participant's session before the welcome is not one: application commands on its id are
    /// refused as unknown, and its end is not reported (fuzz finding L2).
    announced: bool,
    session_type: SessionType,
    /// p2p: the peer (before discovery, a name without instance id); group participant: the
    /// moderator; group moderator: ourselves.
    peer: Name,
    group: Option<Group>,
    reliability: Option<Reliability>,
    control_interval: Duration,
    control_retries: u32,
    pending: Vec<PendingControl>,
    sender: ReliableSender,
    receiver: ReliableReceiver,
    queued: Vec<Deferred>,
    metadata: BTreeMap<String, String>,
    next_heartbeat: Timestamp,
    sent_since_heartbeat: bool,
    /// When each peer was last heard from (any message counts).
    last_heard: BTreeMap<NameKey, Timestamp>,
    offline: BTreeSet<NameKey>,
    /// We told the others we are offline (soft close, [`SessionLayer::set_online`]): data is
    /// dropped unacknowledged until we are back, as the reference does (captures/flows g3).
    soft_closed: bool,
    /// Moderator: when a member's stale-epoch data last made us send an early heartbeat.
    last_epoch_nudge: Option<Timestamp>,
    /// MLS group participant back online: our state update carries our epoch and the
    /// moderator's answer (its epoch is the group's) says whether a commit passed us by while
    /// we were away, as the reference's moderator goes on without offline members (flows g2).
    /// Until it comes our data waits, rather than go out at an epoch that may be stale.
    epoch_in_doubt: bool,
    /// Participant: the id of our REJOIN_REQUEST while the rejoin lasts. A request re-sent
    /// after its retries ran out keeps it, so the moderator (whose queue of membership tasks
    /// may hold it longer than our retries last) sees one request and answers it once.
    rejoin_request: Option<u32>,
    /// Direct messages already delivered, by source and id.
    seen_direct: VecDeque<(NameKey, u32)>,
    /// Our last control messages to the whole channel that ended, by id and type (see
    /// [`Session::is_channel_re_ack`]).
    ended_channel_wide: VecDeque<(u32, Mt)>,
    /// Our last state update's id and the MLS epoch it told (see
    /// [`Session::nacks_our_current_epoch`]).
    last_state_update: Option<(u32, u64)>,
    /// The session's MLS group when it is end-to-end encrypted.
    mls: Option<SessionMls>,
}

/// The sessions, and when each next needs a timeout. The deadlines are indexed and brought up
/// to date lazily, for the sessions handed out mutably since: so that `poll_timeout`, which a
/// driver calls after every input, costs what changed instead of a walk over every session
/// (11 µs at 1 000 sessions, 380 µs at 10 000).
#[derive(Default)]
struct Sessions {
    map: FxHashMap<SessionId, Session>,
    deadlines: RefCell<Deadlines>,
}

#[derive(Default)]
struct Deadlines {
    /// Sessions that may have changed since the index was last brought up to date.
    stale: FxHashSet<SessionId>,
    of: FxHashMap<SessionId, Timestamp>,
    order: BTreeSet<(Timestamp, SessionId)>,
}

impl Sessions {
    fn get(&self, id: &SessionId) -> Option<&Session> {
        self.map.get(id)
    }

    /// Only sessions that exist are marked: peers name session ids, and the set of ids to
    /// refresh must stay bounded by the sessions held, however many unknown ids arrive.
    fn get_mut(&mut self, id: &SessionId) -> Option<&mut Session> {
        let session = self.map.get_mut(id)?;
        self.deadlines.get_mut().stale.insert(*id);
        Some(session)
    }

    fn insert(&mut self, id: SessionId, session: Session) -> Option<Session> {
        self.deadlines.get_mut().stale.insert(id);
        self.map.insert(id, session)
    }

    fn remove(&mut self, id: &SessionId) -> Option<Session> {
        let session = self.map.remove(id)?;
        self.deadlines.get_mut().stale.insert(*id);
        Some(session)
    }

    fn contains_key(&self, id: &SessionId) -> bool {
        self.map.contains_key(id)
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    /// The earliest deadline of any session.
    fn next_deadline(&self) -> Option<Timestamp> {
        self.refresh();
        let deadlines = self.deadlines.borrow();
        deadlines.order.first().map(|&(at, _)| at)
    }

    /// The sessions with a deadline by `now`, in id order.
    fn due(&self, now: Timestamp) -> Vec<SessionId> {
        self.refresh();
        let deadlines = self.deadlines.borrow();
        let mut ids: Vec<SessionId> = deadlines
            .order
            .range(..=(now, SessionId::MAX))
            .map(|&(_, id)| id)
            .collect();
        ids.sort_unstable();
        ids
    }

    fn refresh(&self) {
        let mut deadlines = self.deadlines.borrow_mut();
        let deadlines = &mut *deadlines;
        for id in deadlines.stale.drain() {
            if let Some(old) = deadlines.of.remove(&id) {
                deadlines.order.remove(&(old, id));
            }
            if let Some(at) = self.map.get(&id).and_then(Session::next_deadline) {
                deadlines.of.insert(id, at);
                deadlines.order.insert((at, id));
            }
        }
    }
}

impl std::ops::Index<&SessionId> for Sessions {
    type Output = Session;

    fn index(&self, id: &SessionId) -> &Session {
        &self.map[id]
    }
}

impl Session {
    /// When this session next needs a timeout (retransmissions, gap requests, heartbeats).
    fn next_deadline(&self) -> Option<Timestamp> {
        self.pending
            .iter()
            .map(|p| p.deadline)
            .chain(self.sender.poll_timeout())
            .chain(self.receiver.poll_timeout())
            .chain((self.state == State::Established).then_some(self.next_heartbeat))
            .min()
    }

    /// The group's members other than `me` that are not offline: who a membership update
    /// waits for. An offline member (soft-closed, or silent) drops what it gets, as reference
    /// members do, and rejoins with a fresh key package when it is back (flows g2, g3).
    fn online_members<'a>(&'a self, me: &'a NameKey) -> impl Iterator<Item = &'a Name> + 'a {
        self.group
            .iter()
            .flat_map(|g| g.members.iter())
            .filter(move |n| n.key() != *me && !self.offline.contains(&n.key()))
    }

    /// The peers that are not offline: who must acknowledge our data messages and our state
    /// updates.
    fn online_peers(&self, me: &Name) -> Vec<Name> {
        match &self.group {
            None if self.offline.contains(&self.peer.key()) => Vec::new(),
            None => vec![self.peer.clone()],
            Some(_) => self.online_members(&me.key()).cloned().collect(),
        }
    }

    /// Everyone we exchange data with: the p2p peer, or the other group members.
    fn peers(&self, me: &Name) -> Vec<Name> {
        match &self.group {
            None => vec![self.peer.clone()],
            Some(g) => g
                .members
                .iter()
                .filter(|m| m.key() != me.key())
                .cloned()
                .collect(),
        }
    }

    fn data_destination(&self) -> (Name, u32) {
        match &self.group {
            None => (self.peer.clone(), 1),
            Some(g) => (g.data.clone(), MAX_FANOUT),
        }
    }

    /// Whether application data may be encrypted and sent: the handshake is done and our MLS
    /// epoch is not known to be stale (a rejoin waits for its welcome). Data sealed at a stale
    /// epoch could be read by a member removed in a commit we missed.
    fn ready_to_send(&self) -> bool {
        matches!(self.state, State::Established | State::Closing) && self.may_seal()
    }

    /// Keeps `deferred` until the session is ready to send; refused beyond [`MAX_QUEUED`].
    fn defer(&mut self, id: SessionId, deferred: Deferred) -> Result<(), SessionError> {
        if self.queued.len() >= MAX_QUEUED {
            return Err(SessionError::QueueFull(id, self.queued.len()));
        }
        self.queued.push(deferred);
        Ok(())
    }

    /// Whether our MLS epoch may be used: not stale, nor in doubt while the moderator judges
    /// it (see [`Session::epoch_in_doubt`]).
    fn may_seal(&self) -> bool {
        !self.mls_stale() && !self.epoch_in_doubt
    }

    fn mls_stale(&self) -> bool {
        self.mls.as_ref().is_some_and(SessionMls::is_rejoining)
    }

    fn is_moderator(&self) -> bool {
        self.group.is_some() && self.role == Role::Initiator
    }

    /// Takes a control message that waits for nothing more out of `pending`. One to the whole
    /// channel is remembered: acks of its retransmitted copies may still come in.
    fn end_pending(&mut self, index: usize) -> PendingControl {
        let p = self.pending.remove(index);
        if p.fanout == MAX_FANOUT {
            if self.ended_channel_wide.len() == ENDED_CHANNEL_WIDE {
                self.ended_channel_wide.pop_front();
            }
            self.ended_channel_wide
                .push_back((p.message_id, p.message_type));
        }
        p
    }

    /// Whether `m`, a NACK nothing waits for, says our epoch is stale: it answers our last
    /// state update, and the epoch that update told is still ours. Members NACK every copy of a
    /// re-sent update; once we have rejoined, the later NACKs are about the old epoch. Its
    /// sender is not checked against our member list: with a stale epoch that list misses the
    /// members added since, whose NACKs say so too (the message is signed, as every control
    /// message, by a holder of the shared secret).
    fn nacks_our_current_epoch(&self, m: &Received) -> bool {
        m.message_type == Mt::GroupNack
            && self.last_state_update.is_some_and(|(id, told)| {
                id == m.message_id && self.mls.as_ref().and_then(SessionMls::epoch) == Some(told)
            })
    }

    /// `m`, which nothing waits for, answers one of our control messages to the whole channel.
    /// Such a message is re-sent to everyone while some member has not acked it, and each
    /// member acks every copy it gets (as reference members do): one that acked already, or
    /// that was not waited for, acks again. A harmless duplicate, not a stranger's reply.
    fn is_channel_re_ack(&self, m: &Received) -> bool {
        self.pending
            .iter()
            .any(|p| p.fanout == MAX_FANOUT && p.answered_by(m))
            || self
                .ended_channel_wide
                .iter()
                .any(|(id, t)| *id == m.message_id && answers(*t, m.message_type))
    }
}

/// All sessions of one application.
pub struct SessionLayer {
    name: Name,
    identity_id: String,
    secret: SharedSecret,
    key: SigningKey,
    /// Our tokens' claims field (our public key), encoded once.
    claims: String,
    /// Peers whose tokens were authentic, with their latest token.
    sender_memo: SenderMemo,
    /// Our token for data messages, and the unix second it was issued in (see `token_for`).
    data_token: Option<(u64, String)>,
    unix_at_zero: u64,
    rng: ChaCha8Rng,
    sessions: Sessions,
    out: VecDeque<Output>,
    /// MSG_ACKs waiting for the app's next data message on their session, or for their due
    /// time ([`ACK_HOLD`]), in the order they were made (so by due time).
    held_acks: VecDeque<HeldAck>,
    stats: SessionStats,
    /// Template of every MLS group's settings (each gets its own seed).
    mls_config: GroupConfig,
}

struct HeldAck {
    session: SessionId,
    due: Timestamp,
    ack: pb::Message,
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
            claims: claims_field(&key.public_key()),
            sender_memo: SenderMemo::default(),
            data_token: None,
            key,
            unix_at_zero: config.unix_at_zero,
            rng,
            sessions: Sessions::default(),
            out: VecDeque::new(),
            held_acks: VecDeque::new(),
            stats: SessionStats::default(),
            mls_config: GroupConfig::default(),
        })
    }

    /// Settings for the MLS groups of sessions opened or joined from now on (ciphersuite,
    /// crypto backend, reordering tolerance); each group's random seed is drawn from ours.
    pub fn set_mls_config(&mut self, config: GroupConfig) {
        self.mls_config = config;
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

    /// The members of a group session (everyone, us included), if it is one the application
    /// knows.
    pub fn members(&self, session: SessionId) -> Option<Vec<Name>> {
        let s = self.sessions.get(&session).filter(|s| s.announced)?;
        Some(s.group.as_ref()?.members.clone())
    }

    /// A session the application knows (see [`Session::announced`]).
    fn app_session(&mut self, session: SessionId) -> Result<&mut Session, SessionError> {
        self.sessions
            .get_mut(&session)
            .filter(|s| s.announced)
            .ok_or(SessionError::UnknownSession(session))
    }

    /// The MLS group of an end-to-end encrypted session (epoch, epoch authenticator, members),
    /// once joined and until removed. Read-only, for checks.
    pub fn mls_state(&self, session: SessionId) -> Option<MlsState> {
        self.sessions.get(&session)?.mls.as_ref()?.state(&self.name)
    }

    /// Whether the session's MLS epoch is known to be stale and a rejoin waits for its welcome:
    /// publishes are queued (`publish` returns 0) until it comes, and so are direct messages
    /// (`publish_to` returns their ids).
    pub fn mls_rejoining(&self, session: SessionId) -> bool {
        self.sessions.get(&session).is_some_and(Session::mls_stale)
    }

    /// Opens a point-to-point session with any instance of `peer` (or the given instance).
    pub fn create_session(
        &mut self,
        peer: &Name,
        config: SessionConfig,
        now: Timestamp,
    ) -> SessionId {
        let id = self.new_session_id();
        let mut session = self.new_session(
            Role::Initiator,
            SessionType::PointToPoint,
            peer.clone(),
            config.reliability,
            now,
        );
        session.state = State::Opening;
        session.metadata = config.metadata;
        let mls_ok = !config.mls || self.attach_mls_group(&mut session, now);
        self.sessions.insert(id, session);
        if !mls_ok {
            self.finish(
                id,
                CloseReason::Refused("the MLS group could not be created"),
            );
            return id;
        }
        // Discovery goes to any instance; the reply tells us which one answered.
        self.send_control(
            id,
            Purpose::Discovery,
            Mt::DiscoveryRequest,
            peer.with_instance(ANY_INSTANCE),
            1,
            Cmd::DiscoveryRequest(pb::DiscoveryRequestPayload {}),
            BTreeMap::new(),
            Awaiting::AnyOf(peer.clone()),
            now,
        );
        id
    }

    /// Creates a group session on `channel` (`org/ns/chan`) that this application moderates.
    /// Members are added with [`invite`](Self::invite).
    pub fn create_group(
        &mut self,
        channel: &Name,
        config: SessionConfig,
        now: Timestamp,
    ) -> SessionId {
        let id = self.new_session_id();
        let (data_id, control_id) = slim_proto::name::channel_ids(&self.identity_id, channel);
        let (data, control) = (
            channel.with_instance(data_id),
            channel.with_instance(control_id),
        );
        let mut session = self.new_session(
            Role::Initiator,
            SessionType::Multicast,
            self.name.clone(),
            config.reliability,
            now,
        );
        session.state = State::Established;
        session.metadata = config.metadata;
        session.group = Some(Group::new(
            data.clone(),
            control.clone(),
            vec![self.name.clone()],
            true,
        ));
        let mls_ok = !config.mls || self.attach_mls_group(&mut session, now);
        self.sessions.insert(id, session);
        self.out.push_back(Output::Subscribe(data));
        self.out.push_back(Output::Subscribe(control));
        if !mls_ok {
            self.finish(
                id,
                CloseReason::Refused("the MLS group could not be created"),
            );
        }
        id
    }

    /// Invites any instance of `invitee` into a group this application moderates. Completion
    /// is reported as `MemberJoined` or `InviteFailed`.
    pub fn invite(
        &mut self,
        session: SessionId,
        invitee: &Name,
        now: Timestamp,
    ) -> Result<(), SessionError> {
        self.moderated(session)?
            .tasks
            .push_back(Task::Invite(invitee.clone()));
        self.start_next_task(session, now);
        Ok(())
    }

    /// Removes a member (matched by its full name, or by service when it has no instance id).
    /// Completion is reported as `MemberLeft`.
    pub fn remove(
        &mut self,
        session: SessionId,
        member: &Name,
        now: Timestamp,
    ) -> Result<(), SessionError> {
        let me = self.name.key();
        let group = self.moderated(session)?;
        let found = group
            .members
            .iter()
            .find(|m| {
                m.key() != me
                    && (m.key() == member.key()
                        || (member.id() == ANY_INSTANCE
                            && m.key().components == member.key().components))
            })
            .cloned()
            .ok_or_else(|| SessionError::NotAMember(session, member.to_string()))?;
        group.tasks.push_back(Task::Remove(found));
        self.start_next_task(session, now);
        Ok(())
    }

    /// Sends application data on a session. Before the handshake finishes, and while a stale
    /// MLS member rejoins, it is queued. Returns the message's sequence id (0 while queued).
    pub fn publish(
        &mut self,
        session: SessionId,
        payload: Bytes,
        now: Timestamp,
    ) -> Result<u32, SessionError> {
        self.publish_with(session, payload, "msg".into(), BTreeMap::new(), now)
    }

    /// A session that application commands other than `publish` may act on: it exists, its
    /// handshake is done and it is not closing.
    fn established(&mut self, session: SessionId) -> Result<&mut Session, SessionError> {
        let s = self.app_session(session)?;
        match s.state {
            State::Established => Ok(s),
            State::Closing => Err(SessionError::Closing(session)),
            State::Opening | State::AwaitingWelcome => Err(SessionError::NotEstablished(session)),
        }
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
        let s = self.app_session(session)?;
        if s.state == State::Closing {
            return Err(SessionError::Closing(session));
        }
        if !s.ready_to_send() {
            s.defer(
                session,
                Deferred::Publish {
                    payload,
                    payload_type,
                    metadata,
                },
            )?;
            return Ok(0);
        }
        send_queue_room(session, s)?;
        Ok(self.send_data(session, payload, payload_type, metadata, now))
    }

    /// Sends `payload` to one member only (a direct message: `PUBLISH_TO`, outside the
    /// sequence, delivered on arrival). While a stale MLS member rejoins it is queued with the
    /// publishes. Returns its id (known at once: direct ids are drawn, not sequenced).
    pub fn publish_to(
        &mut self,
        session: SessionId,
        member: &Name,
        payload: Bytes,
        now: Timestamp,
    ) -> Result<u32, SessionError> {
        let me = self.name.clone();
        let id = self
            .rng
            .random_range(super::sender::MAX_SEQUENCE_ID + 1..=u32::MAX);
        let s = self.established(session)?;
        let target = s
            .peers(&me)
            .into_iter()
            .find(|n| {
                n.key() == member.key()
                    || (member.id() == ANY_INSTANCE
                        && n.key().components == member.key().components)
            })
            .ok_or_else(|| SessionError::NotAMember(session, member.to_string()))?;
        if !s.ready_to_send() {
            s.defer(
                session,
                Deferred::Direct {
                    id,
                    target,
                    payload,
                },
            )?;
            return Ok(id);
        }
        send_queue_room(session, s)?;
        self.send_direct(session, id, target, payload, now);
        Ok(id)
    }

    /// Sends a direct message to `target`, kept for retransmission until it acknowledges in a
    /// reliable session.
    fn send_direct(
        &mut self,
        session: SessionId,
        id: u32,
        target: Name,
        payload: Bytes,
        now: Timestamp,
    ) {
        let metadata: BTreeMap<String, String> = [(PUBLISH_TO.to_string(), "TRUE".to_string())]
            .into_iter()
            .collect();
        let outgoing = Outgoing {
            id,
            payload,
            payload_type: "msg".into(),
            metadata,
        };
        self.transmit_data(session, outgoing, &target, 1, vec![target.clone()], now);
    }

    /// Closes a session. p2p: the peer is told; a moderator closes the whole group; a member
    /// leaves it. `Closed` follows once acknowledged.
    pub fn close(&mut self, session: SessionId, now: Timestamp) -> Result<(), SessionError> {
        let me = self.name.clone();
        let s = self.app_session(session)?;
        if s.state == State::Closing {
            return Err(SessionError::Closing(session));
        }
        if s.state == State::Opening && s.group.is_none() {
            // Not established: the peer may have joined already, so it is told (once).
            self.abandon(session, now);
            self.finish(session, CloseReason::Local);
            return Ok(());
        }
        s.state = State::Closing;
        s.pending.clear();
        let is_moderator = s.is_moderator();
        let peer = s.peer.clone();
        match &mut s.group {
            None => {
                // As the reference: a p2p close goes to the peer's service name, fanout 256.
                self.send_control(
                    session,
                    Purpose::Close,
                    Mt::GroupClose,
                    peer.with_instance(ANY_INSTANCE),
                    MAX_FANOUT,
                    Cmd::GroupClose(pb::GroupClosePayload {
                        participants: vec![peer.to_pb(), me.to_pb()],
                    }),
                    BTreeMap::new(),
                    Awaiting::Each(vec![peer]),
                    now,
                );
            }
            Some(group) if is_moderator => {
                let others: Vec<Name> = group
                    .members
                    .iter()
                    .filter(|m| m.key() != me.key())
                    .cloned()
                    .collect();
                if others.is_empty() {
                    self.finish(session, CloseReason::Local);
                    return Ok(());
                }
                let participants = group.members.iter().map(Name::to_pb).collect();
                let control = group.control.clone();
                self.send_control(
                    session,
                    Purpose::Close,
                    Mt::GroupClose,
                    control,
                    MAX_FANOUT,
                    Cmd::GroupClose(pb::GroupClosePayload { participants }),
                    BTreeMap::new(),
                    Awaiting::Each(others),
                    now,
                );
            }
            Some(group) => {
                // A member leaving: off the channels first, then tell the moderator (captures h1).
                group.subscribed = false;
                let (data, control) = (group.data.clone(), group.control.clone());
                self.out.push_back(Output::Unsubscribe(data));
                self.out.push_back(Output::Unsubscribe(control));
                self.send_control(
                    session,
                    Purpose::Leave,
                    Mt::LeaveRequest,
                    peer.clone(),
                    1,
                    Cmd::LeaveRequest(pb::LeaveRequestPayload {}),
                    [(LEAVING_SESSION.to_string(), "TRUE".to_string())]
                        .into_iter()
                        .collect(),
                    Awaiting::Each(vec![peer]),
                    now,
                );
            }
        }
        Ok(())
    }

    #[must_use]
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    #[must_use]
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.sessions
            .next_deadline()
            .into_iter()
            .chain(self.held_acks.front().map(|held| held.due))
            .min()
    }

    pub fn handle_timeout(&mut self, now: Timestamp) {
        self.release_due_acks(now);
        // Only the sessions with something due: a session's timeout does nothing before its
        // deadline, and an application may have thousands of sessions.
        for id in self.sessions.due(now) {
            self.session_timeout(id, now);
        }
    }

    /// Soft close (`online = false`) or back online (spec §4.6): tells the other members with
    /// an UPDATE_PARTICIPANT_STATE carrying our MLS epoch (u64::MAX without MLS), to the
    /// control channel (p2p: to the peer), acknowledged with GROUP_ACK. Coming back online
    /// with a stale epoch, members answer GROUP_NACK: we then rejoin the MLS group through
    /// the moderator (REJOIN_REQUEST / REJOIN_REPLY) on our own. Back online in an MLS group,
    /// our publishes wait for the moderator's answer (and, after a NACK, for the rejoin).
    pub fn set_online(
        &mut self,
        session: SessionId,
        online: bool,
        now: Timestamp,
    ) -> Result<(), SessionError> {
        let me = self.name.clone();
        let s = self.established(session)?;
        let epoch = s
            .mls
            .as_ref()
            .and_then(SessionMls::epoch)
            .unwrap_or(u64::MAX);
        let (destination, fanout) = match &s.group {
            None => (s.peer.clone(), 1),
            Some(g) => (g.control.clone(), MAX_FANOUT),
        };
        s.soft_closed = !online;
        if s.peers(&me).is_empty() {
            return Ok(()); // nobody to tell
        }
        // Told to all, but offline peers drop it (reference members drop everything while
        // offline): waiting for them would only cost the full retries.
        let awaiting = s.online_peers(&me);
        if online && s.mls.is_some() && s.group.is_some() && !s.is_moderator() {
            s.epoch_in_doubt = true;
        }
        let new_state = if online {
            pb::ParticipantState::Online
        } else {
            pb::ParticipantState::Offline
        };
        let message_id = self.rng.random();
        if let Some(s) = self.sessions.get_mut(&session) {
            s.last_state_update = Some((message_id, epoch));
        }
        self.send_control_as(
            session,
            message_id,
            Purpose::StateUpdate,
            Mt::UpdateParticipantState,
            destination,
            fanout,
            Cmd::UpdateParticipantState(pb::UpdateParticipantStatePayload {
                participant: Some(me.to_pb()),
                new_state: new_state as i32,
                epoch,
            }),
            BTreeMap::new(),
            Awaiting::Each(awaiting),
            now,
        );
        Ok(())
    }

    /// A message the application's router delivered.
    pub fn handle_message(&mut self, message: pb::Message, now: Timestamp) {
        // Before anything this message makes us send: held acks due by now go out first, so
        // that only acks held for less than ACK_HOLD ever ride out behind a reply.
        self.release_due_acks(now);
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
        // UNSPECIFIED is a valid enum value but no session's type: replies copy the type of
        // the message they answer, so it would be echoed back (fuzz finding L1).
        let (
            Ok(message_type),
            Ok(session_type @ (SessionType::PointToPoint | SessionType::Multicast)),
        ) = (
            Mt::try_from(session_header.session_message_type),
            SessionType::try_from(session_header.session_type),
        )
        else {
            self.drop_message(SessionDrop::Malformed, "unknown session or message type");
            return;
        };
        let now_unix = self.unix_now(now);
        let sender =
            match self
                .secret
                .verify_with_memo(&header.identity, now_unix, &mut self.sender_memo)
            {
                Ok(sender) => sender,
                Err(error) => {
                    self.drop_message(SessionDrop::BadToken, &error.to_string());
                    return;
                }
            };
        if sender.app_instance_id != source.id() {
            self.stats.identity_binding_mismatches += 1;
        }
        if identity::is_command_message(session_header.session_message_type) {
            let signed = verify_e2e_header(publish, sender.pubkey)
                .map_err(|error| error.to_string())
                .and_then(|()| {
                    if !message.metadata.contains_key(PAYLOAD_SIG_KEY) {
                        return Ok(false);
                    }
                    verify_payload(&message, sender.pubkey)
                        .map(|()| true)
                        .map_err(|error| error.to_string())
                });
            match signed {
                Ok(true) => {}
                Ok(false) => self.stats.unsigned_payloads += 1,
                Err(error) => {
                    self.drop_message(SessionDrop::BadSignature, &error);
                    return;
                }
            }
        }
        let mut received = Received {
            source,
            session_type,
            message_type,
            session_id: session_header.session_id,
            message_id: session_header.message_id,
            error: header.error == Some(true),
            content: publish.msg.clone(),
            metadata: message.metadata.clone(),
        };
        if matches!(message_type, Mt::Msg | Mt::RtxReply)
            && !received.error
            && !self.open_mls_payload(publish, &mut received, now)
        {
            return;
        }
        self.dispatch(received, now);
    }

    /// Decrypts the payload of a data message of an MLS session in `received`. False when
    /// the message was dealt with here (dropped, or a replayed copy re-acknowledged).
    fn open_mls_payload(
        &mut self,
        publish: &pb::Publish,
        received: &mut Received,
        now: Timestamp,
    ) -> bool {
        let Some(s) = self.sessions.get_mut(&received.session_id) else {
            return true; // dispatch counts the unknown session
        };
        let reliable = s.reliability.is_some();
        let Some(mls) = s.mls.as_mut() else {
            return true;
        };
        match mls.open(publish) {
            Ok(opened) => {
                if let Some(pb::content::ContentType::AppPayload(app)) = received
                    .content
                    .as_mut()
                    .and_then(|c| c.content_type.as_mut())
                {
                    app.blob = opened.plaintext.into();
                }
                self.check_sender_epoch(received, opened.epoch, now);
                true
            }
            // The same ciphertext again (a peer that retransmits the bytes it sent first): if we
            // have that message, the sender only missed our ack. A spent generation for a message
            // we do not have (outside the ratchet window) is not acknowledged: an ack means
            // delivered.
            Err(PayloadError::Decrypt(DecryptError::Generation(_)))
                if s.receiver
                    .is_received(&received.source.key(), received.message_id)
                    || s.seen_direct
                        .contains(&(received.source.key(), received.message_id)) =>
            {
                self.stats.dropped[SessionDrop::Duplicate as usize] += 1;
                if reliable && received.message_type == Mt::Msg {
                    self.send_msg_ack(received, now);
                }
                false
            }
            Err(error) => {
                self.drop_message(SessionDrop::Undecryptable, &error.to_string());
                if let PayloadError::Decrypt(DecryptError::FutureEpoch { .. }) = error {
                    // The group moved on without us (we missed a commit): rejoin now rather
                    // than at the next heartbeat, and send nothing until then.
                    let established = self
                        .sessions
                        .get(&received.session_id)
                        .is_some_and(|s| s.state == State::Established);
                    if established {
                        self.start_rejoin(received.session_id, now);
                    }
                }
                false
            }
        }
    }

    /// Moderator: a member's data sealed at an epoch older than ours. Either it crossed a
    /// commit on the network, or the member missed the commit and its later data is readable
    /// by whoever that commit removed. A heartbeat with our epoch, sent at once (at most once
    /// per control interval), makes a stale member rejoin (as the periodic one would, flows g2)
    /// and a current one ignore it.
    fn check_sender_epoch(&mut self, m: &Received, epoch: u64, now: Timestamp) {
        let Some(s) = self.sessions.get_mut(&m.session_id) else {
            return;
        };
        let from_member = s
            .group
            .as_ref()
            .is_some_and(|g| g.is_member(&m.source.key()));
        let ours = s.mls.as_ref().and_then(SessionMls::epoch);
        if !s.is_moderator()
            || s.state != State::Established
            || !from_member
            || ours.is_none_or(|e| epoch >= e)
            || s.last_epoch_nudge
                .is_some_and(|at| now < at + s.control_interval)
        {
            return;
        }
        s.last_epoch_nudge = Some(now);
        self.send_heartbeat(m.session_id, now);
    }

    // ------------------------------------------------------------------ receive

    fn dispatch(&mut self, m: Received, now: Timestamp) {
        match m.message_type {
            // Stateless: anyone may ask who serves our name.
            Mt::DiscoveryRequest => {
                let reply = self.reply(
                    &m,
                    Mt::DiscoveryReply,
                    command(Cmd::DiscoveryReply(pb::DiscoveryReplyPayload {})),
                    now,
                );
                self.emit_send(reply);
                return;
            }
            Mt::JoinRequest if !self.sessions.contains_key(&m.session_id) => {
                self.on_join_request(m, now);
                return;
            }
            Mt::DiscoveryReply
            | Mt::JoinReply
            | Mt::GroupAck
            | Mt::GroupNack
            | Mt::LeaveReply
            | Mt::RejoinReply => {
                self.on_reply(m, now);
                return;
            }
            _ => {}
        }
        if !self.sessions.contains_key(&m.session_id) {
            self.drop_message(SessionDrop::UnknownSession, "no such session");
            return;
        }
        self.heard_from(m.session_id, &m.source, now);
        let Some(session) = self.sessions.get(&m.session_id) else {
            return;
        };
        let state = session.state;
        let from_peer = session.peer.key() == m.source.key();
        let is_moderator = session.is_moderator();
        let from_member = session
            .group
            .as_ref()
            .is_some_and(|g| g.is_member(&m.source.key()));
        if is_moderator && state == State::Established && acts_as_member(m.message_type) {
            if from_member {
                self.resync_if_stale(m.session_id, &m.source, now);
            } else if m.source.key() != self.name.key() {
                // It acts as a member of our group but is not one: an invitee we gave up on
                // after it joined, or a member whose leave request never reached it.
                self.evict(m.session_id, &m.source, now);
            }
        }
        match (m.message_type, state) {
            (Mt::JoinRequest, State::AwaitingWelcome | State::Established) if from_peer => {
                // Our reply was lost: answer again.
                self.send_join_reply(&m, now)
            }
            (Mt::GroupWelcome, State::AwaitingWelcome) if from_peer => self.on_welcome(m, now),
            (Mt::GroupWelcome, State::Established) if from_peer => {
                self.stats.dropped[SessionDrop::Duplicate as usize] += 1;
                self.ack(&m, now); // our ack was lost
            }
            (Mt::GroupUpdate, State::Established | State::AwaitingWelcome)
                if from_peer && !is_moderator =>
            {
                self.on_group_update(m, now)
            }
            (Mt::GroupClose, _) if from_peer && !is_moderator => {
                self.ack(&m, now);
                self.finish(m.session_id, CloseReason::Peer);
            }
            (Mt::LeaveRequest, _) if is_moderator && from_member => self.on_member_leaving(m, now),
            (Mt::LeaveRequest, _) if is_moderator => {
                // A member that already left asks again: our reply was lost.
                self.send_leave_reply(&m, now);
            }
            (Mt::LeaveRequest, _) if from_peer => {
                self.send_leave_reply(&m, now);
                let reason = match self.sessions.get(&m.session_id) {
                    // We were leaving anyway: the moderator crossed our request with its own.
                    Some(s) if s.state == State::Closing => CloseReason::Local,
                    Some(s) if s.group.is_some() => CloseReason::Removed,
                    _ => CloseReason::Peer,
                };
                self.finish(m.session_id, reason);
            }
            (Mt::Msg, State::Established | State::Closing) => self.on_data(m, now),
            (Mt::MsgAck, State::Established | State::Closing) => {
                if let Some(s) = self.sessions.get_mut(&m.session_id) {
                    if let Some(event) = s.sender.on_ack(m.message_id, &m.source.key(), now) {
                        self.sender_event(m.session_id, event, now);
                    }
                }
            }
            (Mt::RtxRequest, State::Established | State::Closing) => self.on_rtx_request(m, now),
            (Mt::RtxReply, State::Established | State::Closing) => self.on_rtx_reply(m, now),
            // Liveness (any message counts), and the sender's MLS epoch.
            (Mt::Heartbeat, _) => self.on_heartbeat(&m, now),
            (Mt::UpdateParticipantState, _) if from_member || from_peer => {
                self.on_participant_state(m, now)
            }
            (Mt::RejoinRequest, State::Established) if is_moderator && from_member => {
                self.on_rejoin_request(m, now)
            }
            _ => self.drop_message(
                SessionDrop::Unexpected,
                "not expected in this session state",
            ),
        }
    }

    /// A reply to one of our control messages.
    fn on_reply(&mut self, m: Received, now: Timestamp) {
        let Some(s) = self.sessions.get_mut(&m.session_id) else {
            self.drop_message(SessionDrop::UnknownSession, "reply for no session");
            return;
        };
        let Some(index) = s.pending.iter().position(|p| p.awaits(&m)) else {
            // A member acknowledges our REJOIN_REPLY (members do, flows g2/g3), although
            // nothing waits for that: expected, not a drop.
            let rejoin_reply_ack = m.message_type == Mt::GroupAck
                && s.group.as_ref().is_some_and(|g| {
                    g.rejoin_replies
                        .get(&m.source.key())
                        .is_some_and(|(id, _)| *id == m.message_id)
                });
            if s.nacks_our_current_epoch(&m) {
                // From a member the update did not wait for (we had marked it offline) or one
                // answering a re-sent copy: its NACK still says our epoch is stale.
                self.start_rejoin(m.session_id, now);
            } else if s.is_channel_re_ack(&m) {
                self.drop_message(
                    SessionDrop::Duplicate,
                    "ack of a re-sent channel-wide message",
                );
            } else if !rejoin_reply_ack {
                // A late duplicate of a reply already counted, or a stranger's.
                self.drop_message(SessionDrop::Unexpected, "reply to nothing we wait for");
            }
            return;
        };
        if s.pending[index].message_type == Mt::GroupUpdate {
            // It has the member list of this update (every update carries the whole list).
            if let Some(g) = s.group.as_mut() {
                g.stale.remove(&m.source.key());
            }
        }
        let purpose = s.pending[index].purpose.clone();
        if m.message_type == Mt::RejoinReply && !self.on_rejoin_reply(&m, now) {
            return; // not a welcome of ours: the request is re-sent, a good reply may come
        }
        if m.message_type == Mt::GroupNack && purpose == Purpose::StateUpdate {
            // Our epoch is older than this member's: we missed a commit (spec §4.6).
            self.start_rejoin(m.session_id, now);
        }
        if purpose == Purpose::StateUpdate
            && self
                .sessions
                .get(&m.session_id)
                .is_some_and(|s| s.peer.key() == m.source.key())
        {
            // The moderator's epoch is the group's: it settles ours either way.
            self.epoch_settled(m.session_id, now);
        }
        let Some(s) = self.sessions.get_mut(&m.session_id) else {
            return;
        };
        let Some(index) = s
            .pending
            .iter()
            .position(|p| p.message_id == m.message_id && p.purpose == purpose)
        else {
            return;
        };
        let done = match &mut s.pending[index].awaiting {
            Awaiting::AnyOf(_) => true,
            Awaiting::Each(names) => {
                names.retain(|n| n.key() != m.source.key());
                names.is_empty()
            }
        };
        if done {
            let pending = s.end_pending(index);
            self.on_control_done(m.session_id, pending.purpose, Some(m), now);
        }
    }

    /// A control message got all its replies (`reply` is the last one), or ran out of retries
    /// or awaits nobody any more (`reply` is `None`). Without a reply a request (discovery,
    /// join, welcome, rejoin) failed, while a notification to members (an update, a close, a
    /// state update) ends as if every ack had come: it needs nothing more from them.
    fn on_control_done(
        &mut self,
        session: SessionId,
        purpose: Purpose,
        reply: Option<Received>,
        now: Timestamp,
    ) {
        let answered = reply.is_some();
        match purpose {
            Purpose::Discovery => match reply {
                Some(r) => self.p2p_join(session, r.source, now),
                None => self.finish(session, CloseReason::NoAnswer("discovery")),
            },
            Purpose::Join => match reply {
                Some(r) => self.p2p_welcome(session, &r, now),
                None => {
                    self.abandon(session, now);
                    self.finish(session, CloseReason::NoAnswer("join"))
                }
            },
            Purpose::Welcome if answered => self.on_established(session, now),
            Purpose::Welcome => {
                self.abandon(session, now);
                self.finish(session, CloseReason::NoAnswer("welcome"))
            }
            // A close or a leave nobody acknowledges still ends the session.
            Purpose::Close | Purpose::Leave => self.finish(session, CloseReason::Local),
            Purpose::InviteDiscovery(invitee) => match reply {
                Some(r) => self.invite_join(session, r.source, now),
                None => {
                    self.invite_failed(session, invitee, "no instance answered the discovery", now)
                }
            },
            Purpose::InviteJoin(invitee) => match reply {
                Some(r) => self.invite_welcome(session, invitee, &r, now),
                None => self.invite_failed(session, invitee, "no join reply", now),
            },
            Purpose::InviteWelcome(invitee) if !answered => {
                self.invite_withdrawn(session, invitee, now)
            }
            // Members that never acked an update are left as they are: the reference goes on too.
            Purpose::InviteWelcome(invitee) | Purpose::InviteUpdate(invitee) => {
                let still_pending = self.sessions.get(&session).is_some_and(|s| {
                    s.pending.iter().any(|p| {
                        matches!(&p.purpose, Purpose::InviteWelcome(n) | Purpose::InviteUpdate(n) if n.key() == invitee.key())
                    })
                });
                if !still_pending {
                    self.out
                        .push_back(Output::Event(SessionEvent::MemberJoined {
                            session,
                            member: invitee,
                        }));
                    self.task_done(session, now);
                }
            }
            Purpose::RemoveUpdate(member) => self.remove_leave(session, member, now),
            Purpose::RemoveLeave(member) => {
                self.forget_member(session, &member, now);
                self.task_done(session, now);
            }
            Purpose::DepartureUpdate(_) => self.task_done(session, now),
            // Unanswered, the member stays stale and gets the list again when next heard from.
            Purpose::Resync(_) | Purpose::Withdrawn(_) => {}
            // Acked or NACKed (a NACK started the rejoin), or nobody answered: no answer will
            // tell us more about our epoch.
            Purpose::StateUpdate => self.epoch_settled(session, now),
            // Nobody answered yet (the moderator may still have other tasks before it): we are
            // stale until the welcome comes and our data waits for it, so the request goes on.
            Purpose::Rejoin if !answered => self.start_rejoin(session, now),
            Purpose::Rejoin => {}
            Purpose::RejoinUpdate(_) => self.task_done(session, now),
        }
    }

    fn on_join_request(&mut self, m: Received, now: Timestamp) {
        let Some(Cmd::JoinRequest(join)) = command_of(&m.content) else {
            self.drop_message(SessionDrop::Malformed, "join request without payload");
            return;
        };
        let reliability = join.timer_settings.map(|t| Reliability {
            interval: Duration::from_millis(u64::from(t.timeout.max(1))),
            max_retries: t.max_retries,
        });
        let group = match m.session_type {
            SessionType::Multicast => {
                let (Some(data), Some(control)) = (
                    join.channel.as_ref().and_then(Name::from_pb),
                    join.control.as_ref().and_then(Name::from_pb),
                ) else {
                    self.drop_message(
                        SessionDrop::Malformed,
                        "group join request without channels",
                    );
                    return;
                };
                Some(Group::new(data, control, Vec::new(), false))
            }
            _ => None,
        };
        let session_type = if group.is_some() {
            SessionType::Multicast
        } else {
            SessionType::PointToPoint
        };
        let mut session = self.new_session(
            Role::Participant,
            session_type,
            m.source.clone(),
            reliability,
            now,
        );
        session.state = State::AwaitingWelcome;
        session.group = group;
        session.metadata = m
            .metadata
            .iter()
            .filter(|(k, _)| k.as_str() != PAYLOAD_SIG_KEY)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some(settings) = join.mls_settings {
            // The key package goes out with the reply; the welcome will bring the group.
            let identity = self.mls_identity(now);
            let config = self.group_config();
            match SessionMls::join(
                &identity,
                config,
                settings.header_integrity_validation_percent,
            ) {
                Ok(mls) => session.mls = Some(mls),
                Err(error) => {
                    self.drop_message(SessionDrop::BadMls, &format!("no key package: {error}"));
                    return;
                }
            }
        }
        self.sessions.insert(m.session_id, session);
        self.send_join_reply(&m, now);
    }

    fn send_join_reply(&mut self, m: &Received, now: Timestamp) {
        let me = self.name.clone();
        let key_package = self
            .sessions
            .get(&m.session_id)
            .and_then(|s| s.mls.as_ref())
            .and_then(|mls| mls.key_package())
            .map(Bytes::copy_from_slice);
        let reply = self.reply(
            m,
            Mt::JoinReply,
            command(Cmd::JoinReply(pb::JoinReplyPayload {
                key_package,
                participant: Some(participant(&me)),
            })),
            now,
        );
        self.emit_send(reply);
    }

    fn on_welcome(&mut self, m: Received, now: Timestamp) {
        let Some(Cmd::GroupWelcome(welcome)) = command_of(&m.content) else {
            self.drop_message(SessionDrop::Malformed, "welcome without payload");
            return;
        };
        let verifier = TokenVerifier {
            secret: &self.secret,
            now_unix: self.unix_at_zero + now.as_micros() / 1_000_000,
        };
        let Some(s) = self.sessions.get_mut(&m.session_id) else {
            return;
        };
        let joined = match (s.mls.as_mut(), &welcome.mls) {
            (None, None) => Ok(()),
            (Some(mls), Some(payload)) => {
                mls.welcome(payload, &verifier).map_err(|e| e.to_string())
            }
            (Some(_), None) => Err("welcome without MLS content for an MLS session".to_owned()),
            (None, Some(_)) => Err("MLS welcome for a session without MLS".to_owned()),
        };
        if let Err(error) = joined {
            // Not acknowledged: a welcome that is really ours may still come.
            self.drop_message(SessionDrop::BadMls, &error);
            return;
        }
        let Some(s) = self.sessions.get_mut(&m.session_id) else {
            return;
        };
        if let Some(group) = &mut s.group {
            let listed: Vec<Option<Name>> = welcome
                .participants
                .iter()
                .map(|p| p.name.as_ref().and_then(Name::from_pb))
                .collect();
            // Where each member's stream starts for us, when the moderator says (ours does).
            if let Some(starts) = m
                .metadata
                .get(STREAM_STARTS)
                .and_then(|v| parse_stream_starts(v, listed.len()))
            {
                for (name, start) in listed.iter().zip(starts) {
                    if let Some(name) = name.as_ref().filter(|n| n.key() != self.name.key()) {
                        if start > 0 {
                            s.receiver.expect(name, start);
                        }
                    }
                }
            }
            group.members = listed.into_iter().flatten().collect();
            group.version = group_version(&m.metadata).unwrap_or(0).max(group.version);
            group.subscribed = true;
            let (data, control) = (group.data.clone(), group.control.clone());
            // On the channels before acknowledging, so nothing sent after our ack misses us.
            self.out.push_back(Output::Subscribe(data));
            self.out.push_back(Output::Subscribe(control));
        }
        self.ack(&m, now);
        self.on_established(m.session_id, now);
    }

    fn on_group_update(&mut self, m: Received, now: Timestamp) {
        let Some(Cmd::GroupUpdate(update)) = command_of(&m.content) else {
            self.drop_message(SessionDrop::Malformed, "group update without payload");
            return;
        };
        let missed_a_commit = match self.apply_update_commit(&m, &update, now) {
            Ok(waiting) => waiting,
            Err(error) => {
                // Not acknowledged: the moderator retries, and a retransmission may still apply.
                self.drop_message(SessionDrop::BadMls, &error);
                return;
            }
        };
        if missed_a_commit {
            // The moderator runs one update at a time, so the commit we lack was given up on
            // for us: our epoch stays stale until we rejoin.
            self.start_rejoin(m.session_id, now);
        }
        let Some(group) = self
            .sessions
            .get_mut(&m.session_id)
            .and_then(|s| s.group.as_mut())
        else {
            self.drop_message(SessionDrop::Unexpected, "group update for a p2p session");
            return;
        };
        if group.seen_updates.contains(&m.message_id) {
            self.stats.dropped[SessionDrop::Duplicate as usize] += 1;
            self.ack(&m, now);
            return;
        }
        if group.seen_updates.len() == SEEN_UPDATES {
            group.seen_updates.pop_front();
        }
        group.seen_updates.push_back(m.message_id);
        if let Some(version) = group_version(&m.metadata) {
            if version < group.version {
                // An older list than ours: this update crossed a later one on the network.
                self.drop_message(SessionDrop::Unexpected, "group update older than our list");
                self.ack(&m, now);
                return;
            }
            group.version = version;
        }
        let subject = update
            .participant
            .as_ref()
            .and_then(|p| p.name.as_ref())
            .and_then(Name::from_pb);
        let listed: Vec<Name> = update
            .participants
            .iter()
            .filter_map(|p| p.name.as_ref().and_then(Name::from_pb))
            .collect();
        let before: Vec<Name> = group.members.clone();
        let remove = pb::GroupUpdateOp::try_from(update.op) == Ok(pb::GroupUpdateOp::Remove);
        // Every update lists the whole group (a removal: as it was before), so a member that
        // missed an earlier update catches up with the next one.
        if remove {
            if let Some(subject) = &subject {
                if !listed.is_empty() {
                    group.members = listed;
                }
                group.members.retain(|n| n.key() != subject.key());
            }
        } else if !listed.is_empty() {
            group.members = listed;
        }
        let after = group.members.clone();
        self.ack(&m, now);
        let rejoin = pb::GroupUpdateOp::try_from(update.op) == Ok(pb::GroupUpdateOp::Rejoin);
        if let Some(rejoined) = subject
            .as_ref()
            .filter(|n| rejoin && n.key() != self.name.key())
        {
            self.resend_unacked(m.session_id, rejoined, now);
        }
        for joined in after
            .iter()
            .filter(|n| !before.iter().any(|b| b.key() == n.key()))
        {
            self.member_arrived(m.session_id, joined);
            self.out
                .push_back(Output::Event(SessionEvent::MemberJoined {
                    session: m.session_id,
                    member: joined.clone(),
                }));
        }
        for left in before
            .iter()
            .filter(|n| !after.iter().any(|a| a.key() == n.key()))
        {
            if left.key() != self.name.key() {
                self.forget_member_announcing(m.session_id, left, true, now);
            }
        }
        // Removed before we even heard of it: its late messages are dropped all the same.
        if let Some(subject) = subject.filter(|n| {
            remove && n.key() != self.name.key() && !before.iter().any(|b| b.key() == n.key())
        }) {
            self.forget_member(m.session_id, &subject, now);
        }
    }

    /// A participant learned of a member it did not have: it joined after us (or was invited
    /// again after it left), so everything it sends is meant for us from its first message.
    fn member_arrived(&mut self, session: SessionId, member: &Name) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        let Some(group) = s.group.as_mut() else {
            return;
        };
        let key = member.key();
        if let Some(at) = group.departed.iter().position(|k| *k == key) {
            // Its stream starts over.
            group.departed.remove(at);
            s.receiver.remove_source(&key);
        }
        s.receiver.expect(member, 1);
    }

    /// The MLS commit of a group update of an MLS session, applied in `commit_id` order (a
    /// retransmitted update's commit is a duplicate and changes nothing). True when it has to
    /// wait for an earlier commit we never got: our epoch is stale.
    fn apply_update_commit(
        &mut self,
        m: &Received,
        update: &pb::GroupUpdatePayload,
        now: Timestamp,
    ) -> Result<bool, String> {
        let verifier = TokenVerifier {
            secret: &self.secret,
            now_unix: self.unix_at_zero + now.as_micros() / 1_000_000,
        };
        let Some(s) = self.sessions.get_mut(&m.session_id) else {
            return Ok(false);
        };
        let Some(mls) = s.mls.as_mut() else {
            return match update.mls {
                None => Ok(false),
                Some(_) => Err("MLS commit for a session without MLS".to_owned()),
            };
        };
        let Some(payload) = &update.mls else {
            return Err("group update without its MLS commit".to_owned());
        };
        match mls.commit(payload, &verifier) {
            Ok(committed) => Ok(committed == Committed::Waiting),
            // Removed already: the leave request follows; the update is acknowledged all the same.
            Err(CommitError::NotAMember) => Ok(false),
            Err(error) => Err(format!("commit {} refused: {error}", payload.commit_id)),
        }
    }

    /// Answers a LEAVE_REQUEST.
    fn send_leave_reply(&mut self, m: &Received, now: Timestamp) {
        let reply = self.reply(
            m,
            Mt::LeaveReply,
            command(Cmd::LeaveReply(pb::LeaveReplyPayload {})),
            now,
        );
        self.emit_send(reply);
    }

    /// A member asked the moderator to let it go.
    fn on_member_leaving(&mut self, m: Received, now: Timestamp) {
        self.send_leave_reply(&m, now);
        if let Some(group) = self
            .sessions
            .get_mut(&m.session_id)
            .and_then(|s| s.group.as_mut())
        {
            // A retransmitted request (our reply was lost) does not queue a second departure.
            let queued = group
                .tasks
                .iter()
                .any(|t| matches!(t, Task::Departed(n) if n.key() == m.source.key()));
            if !queued {
                group.tasks.push_back(Task::Departed(m.source));
            }
        }
        self.start_next_task(m.session_id, now);
    }

    fn on_established(&mut self, session: SessionId, now: Timestamp) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        s.state = State::Established;
        s.announced = true;
        s.next_heartbeat = now + HEARTBEAT_INTERVAL;
        if s.group.is_none() {
            // A p2p peer's data starts at 1.
            s.receiver.expect(&s.peer, 1);
        }
        let event = match s.role {
            Role::Initiator => SessionEvent::Established {
                session,
                peer: s.peer.clone(),
            },
            Role::Participant => SessionEvent::Incoming {
                session,
                peer: s.peer.clone(),
                group: s.group.is_some(),
                mls: s.mls.is_some(),
                metadata: s.metadata.clone(),
            },
        };
        self.out.push_back(Output::Event(event));
        self.send_queued(session, now);
    }

    /// Our epoch is no longer in doubt after coming back online: what waited goes out, unless
    /// a rejoin now holds it.
    fn epoch_settled(&mut self, session: SessionId, now: Timestamp) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        if !std::mem::take(&mut s.epoch_in_doubt) || !s.ready_to_send() {
            return;
        }
        self.send_queued(session, now);
        self.release_held(session, now);
    }

    /// The publishes queued until the session could send go out, in order.
    fn send_queued(&mut self, session: SessionId, now: Timestamp) {
        let me = self.name.clone();
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        for deferred in std::mem::take(&mut s.queued) {
            match deferred {
                Deferred::Publish {
                    payload,
                    payload_type,
                    metadata,
                } => {
                    self.send_data(session, payload, payload_type, metadata, now);
                }
                Deferred::Direct {
                    id,
                    target,
                    payload,
                } => {
                    let Some(s) = self.sessions.get(&session) else {
                        return;
                    };
                    if s.peers(&me).iter().any(|n| n.key() == target.key()) {
                        self.send_direct(session, id, target, payload, now);
                    } else if s.reliability.is_some() {
                        // It left while we waited: nobody will acknowledge the id we returned.
                        self.out.push_back(Output::Event(SessionEvent::SendFailed {
                            session,
                            id,
                            missing: vec![target],
                        }));
                    } else {
                        tracing::debug!(session, id, "direct message dropped: its target left");
                    }
                }
            }
        }
    }

    /// A heartbeat of a member whose MLS epoch is ahead of ours: we missed a commit and rejoin
    /// through the moderator, as the reference does (spec, captures/flows g2: the heartbeat may
    /// be any member's).
    fn on_heartbeat(&mut self, m: &Received, now: Timestamp) {
        let Some(Cmd::Heartbeat(heartbeat)) = command_of(&m.content) else {
            return;
        };
        let Some(s) = self.sessions.get(&m.session_id) else {
            return;
        };
        let from_member = s.peer.key() == m.source.key()
            || s.group
                .as_ref()
                .is_some_and(|g| g.is_member(&m.source.key()));
        let ours = s.mls.as_ref().and_then(SessionMls::epoch);
        // u64::MAX: the sender has no MLS.
        let ahead = heartbeat.epoch != u64::MAX && ours.is_some_and(|e| heartbeat.epoch > e);
        if s.state == State::Established && from_member && ahead {
            self.start_rejoin(m.session_id, now);
        }
    }

    /// Whether we told the others we are offline: data is then dropped, not acknowledged.
    fn soft_closed(&mut self, session: SessionId) -> bool {
        if !self.sessions.get(&session).is_some_and(|s| s.soft_closed) {
            return false;
        }
        self.drop_message(SessionDrop::Unexpected, "data while offline (soft close)");
        true
    }

    fn on_data(&mut self, m: Received, now: Timestamp) {
        if self.soft_closed(m.session_id) {
            return;
        }
        let Some(pb::content::ContentType::AppPayload(app)) =
            m.content.clone().and_then(|c| c.content_type)
        else {
            self.drop_message(
                SessionDrop::Malformed,
                "data message without application payload",
            );
            return;
        };
        if !self.admit_group_source(m.session_id, &m.source) {
            self.drop_message(SessionDrop::Unexpected, "data from a non-member");
            return;
        }
        let incoming = Incoming {
            payload: app.blob,
            payload_type: app.payload_type,
            metadata: m.metadata.clone(),
        };
        let reliable = self
            .sessions
            .get(&m.session_id)
            .is_some_and(|s| s.reliability.is_some());
        if m.metadata.get(PUBLISH_TO).is_some_and(|v| v == "TRUE") {
            self.on_direct(m, incoming, reliable, now);
            return;
        }
        if !reliable {
            self.deliver(m.session_id, m.source, m.message_id, incoming);
            return;
        }
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
            Verdict::BeforeStart => {
                self.drop_message(
                    SessionDrop::Unexpected,
                    "sequence id sent before we were among its receivers",
                );
                return;
            }
        }
        // A message we already reported lost is not acknowledged when a late copy comes: the
        // sender must not think it delivered.
        if self
            .sessions
            .get(&m.session_id)
            .is_some_and(|s| s.receiver.is_lost(&m.source.key(), m.message_id))
        {
            self.receiver_events(m.session_id, events, now);
            return;
        }
        self.send_msg_ack(&m, now);
        self.receiver_events(m.session_id, events, now);
    }

    /// Whether data from `source` belongs to the session's streams. In a group: from members;
    /// a participant also takes it from a newcomer whose announcement has not reached it yet,
    /// but not from a member that left (its stream is over). p2p: always.
    fn admit_group_source(&mut self, session: SessionId, source: &Name) -> bool {
        let Some(s) = self.sessions.get_mut(&session) else {
            return false;
        };
        let Some(group) = &s.group else {
            return true;
        };
        let key = source.key();
        if group.is_member(&key) {
            return true;
        }
        if s.role == Role::Initiator || group.departed.contains(&key) {
            // The moderator decides who is a member: anyone else is told to leave (dispatch).
            return false;
        }
        // Everyone a newcomer sends is meant for us too (the member list of its welcome has
        // us in it), from its first message on.
        s.receiver.expect(source, 1);
        true
    }

    fn on_rtx_request(&mut self, m: Received, now: Timestamp) {
        let Some(s) = self.sessions.get_mut(&m.session_id) else {
            return;
        };
        self.stats.rtx_requests_received += 1;
        let fanout = if s.group.is_some() { MAX_FANOUT } else { 1 };
        let found = s.sender.on_rtx_request(m.message_id).cloned();
        let me = self.name.clone();
        let (content, metadata) = match &found {
            Some(stored) => (
                pb::Content::app(&stored.payload_type, stored.payload.clone()),
                stored.metadata.clone(),
            ),
            None => (empty_app_payload(), BTreeMap::new()),
        };
        self.stats.rtx_replies_sent += 1;
        let mut reply = self.build(
            m.session_type,
            Mt::RtxReply,
            m.session_id,
            m.message_id,
            &me,
            &m.source,
            fanout,
            content,
            metadata,
            now,
        );
        if found.is_none() {
            // The message was evicted from the buffer: say so, so the receiver stops asking.
            if let Some(h) = header_mut(&mut reply) {
                h.error = Some(true);
            }
            self.emit_send(reply);
        } else {
            self.emit_data(m.session_id, reply);
        }
    }

    fn on_rtx_reply(&mut self, m: Received, now: Timestamp) {
        if self.soft_closed(m.session_id) {
            return;
        }
        if !self.admit_group_source(m.session_id, &m.source) {
            self.drop_message(SessionDrop::Unexpected, "retransmission from a non-member");
            return;
        }
        let mut events = Vec::new();
        if m.error {
            if let Some(s) = self.sessions.get_mut(&m.session_id) {
                s.receiver
                    .on_unavailable(&m.source.key(), m.message_id, &mut events);
            }
        } else {
            let Some(pb::content::ContentType::AppPayload(app)) =
                m.content.clone().and_then(|c| c.content_type)
            else {
                self.drop_message(SessionDrop::Malformed, "retransmission without payload");
                return;
            };
            let incoming = Incoming {
                payload: app.blob,
                payload_type: app.payload_type,
                metadata: m.metadata.clone(),
            };
            let Some(s) = self.sessions.get_mut(&m.session_id) else {
                return;
            };
            self.stats.rtx_replies_received += 1;
            let verdict =
                s.receiver
                    .on_rtx_reply(&m.source, m.message_id, incoming, now, &mut events);
            let lost = s.receiver.is_lost(&m.source.key(), m.message_id);
            match verdict {
                Verdict::Duplicate => self.stats.dropped[SessionDrop::Duplicate as usize] += 1,
                Verdict::BeforeStart | Verdict::OutOfWindow => {
                    self.stats.dropped[SessionDrop::Unexpected as usize] += 1
                }
                Verdict::Accepted => {}
            }
            // Our sender does not take the RTX request as the ack (it may have been answered
            // in vain), so the answer is acknowledged like the message itself.
            if matches!(verdict, Verdict::Accepted | Verdict::Duplicate) && !lost {
                self.send_msg_ack(&m, now);
            }
        }
        self.receiver_events(m.session_id, events, now);
    }

    /// A direct message: delivered on arrival (once), acknowledged with the flag echoed.
    fn on_direct(&mut self, m: Received, incoming: Incoming, reliable: bool, now: Timestamp) {
        let Some(s) = self.sessions.get_mut(&m.session_id) else {
            return;
        };
        let key = (m.source.key(), m.message_id);
        let fresh = !s.seen_direct.contains(&key);
        if fresh {
            if s.seen_direct.len() == SEEN_DIRECT {
                s.seen_direct.pop_front();
            }
            s.seen_direct.push_back(key);
        } else {
            self.stats.dropped[SessionDrop::Duplicate as usize] += 1;
        }
        if reliable {
            self.send_msg_ack(&m, now);
        }
        if fresh {
            self.deliver(m.session_id, m.source, m.message_id, incoming);
        }
    }

    /// Any message is a sign of life; an offline peer that speaks again is back.
    fn heard_from(&mut self, session: SessionId, source: &Name, now: Timestamp) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        s.last_heard.insert(source.key(), now);
        if s.offline.remove(&source.key()) {
            self.out.push_back(Output::Event(SessionEvent::MemberState {
                session,
                member: source.clone(),
                online: true,
            }));
        }
    }

    /// UPDATE_PARTICIPANT_STATE: a member went offline (soft close) or came back.
    fn on_participant_state(&mut self, m: Received, now: Timestamp) {
        let Some(Cmd::UpdateParticipantState(update)) = command_of(&m.content) else {
            self.drop_message(
                SessionDrop::Malformed,
                "participant state update without payload",
            );
            return;
        };
        let online = update.new_state != pb::ParticipantState::Offline as i32;
        // Back online with an older epoch than ours: it missed a commit and must rejoin.
        let stale = online
            && self
                .sessions
                .get(&m.session_id)
                .and_then(|s| s.mls.as_ref())
                .and_then(SessionMls::epoch)
                .is_some_and(|ours| update.epoch < ours);
        if stale {
            let nack = self.reply(
                &m,
                Mt::GroupNack,
                command(Cmd::GroupNack(pb::GroupNackPayload {})),
                now,
            );
            self.emit_send(nack);
        } else {
            self.ack(&m, now);
        }
        let member = update
            .participant
            .as_ref()
            .and_then(Name::from_pb)
            .unwrap_or(m.source);
        let Some(s) = self.sessions.get_mut(&m.session_id) else {
            return;
        };
        let changed = if online {
            s.offline.remove(&member.key())
        } else {
            s.offline.insert(member.key())
        };
        if changed {
            self.out.push_back(Output::Event(SessionEvent::MemberState {
                session: m.session_id,
                member,
                online,
            }));
        }
    }

    /// Participant: a member NACKed our state update, or a heartbeat, a data message or a
    /// commit showed a newer epoch (ours is stale): a fresh key package goes to the moderator
    /// in a REJOIN_REQUEST (once; it is re-sent, with the same id, until answered).
    fn start_rejoin(&mut self, session: SessionId, now: Timestamp) {
        let Some(s) = self.sessions.get(&session) else {
            return;
        };
        if s.is_moderator()
            || s.group.is_none()
            || s.mls.is_none()
            || s.pending.iter().any(|p| p.purpose == Purpose::Rejoin)
        {
            return;
        }
        let moderator = s.peer.clone();
        let identity = self.mls_identity(now);
        let config = self.group_config();
        let Some(mls) = self.sessions.get_mut(&session).and_then(|s| s.mls.as_mut()) else {
            return;
        };
        let key_package = match mls.start_rejoin(&identity, config) {
            Ok(key_package) => key_package,
            Err(error) => {
                tracing::warn!(session, %error, "no key package for the rejoin");
                return;
            }
        };
        let me = self.name.clone();
        let fresh = self.rng.random();
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        let message_id = *s.rejoin_request.get_or_insert(fresh);
        tracing::info!(session, %moderator, "our MLS epoch is stale: asking the moderator to rejoin");
        self.send_control_as(
            session,
            message_id,
            Purpose::Rejoin,
            Mt::RejoinRequest,
            moderator.clone(),
            1,
            Cmd::RejoinRequest(pb::RejoinRequestPayload {
                participant: Some(me.to_pb()),
                key_package: key_package.into(),
            }),
            BTreeMap::new(),
            Awaiting::Each(vec![moderator]),
            now,
        );
    }

    /// Participant: the REJOIN_REPLY to our REJOIN_REQUEST; its welcome puts us in the group
    /// at the moderator's epoch. False (and counted) when it cannot be used.
    fn on_rejoin_reply(&mut self, m: &Received, now: Timestamp) -> bool {
        let Some(Cmd::RejoinReply(reply)) = command_of(&m.content) else {
            self.drop_message(SessionDrop::Malformed, "rejoin reply without payload");
            return false;
        };
        let verifier = TokenVerifier {
            secret: &self.secret,
            now_unix: self.unix_at_zero + now.as_micros() / 1_000_000,
        };
        let Some(mls) = self
            .sessions
            .get_mut(&m.session_id)
            .and_then(|s| s.mls.as_mut())
        else {
            self.drop_message(SessionDrop::Unexpected, "rejoin reply without MLS");
            return false;
        };
        if let Err(error) = mls.rejoin_welcome(reply.commit_id, &reply.mls_content, &verifier) {
            self.drop_message(SessionDrop::BadMls, &format!("rejoin welcome: {error}"));
            return false;
        }
        if let Some(s) = self.sessions.get_mut(&m.session_id) {
            s.rejoin_request = None;
            // The welcome put us at the group's epoch: nothing left to doubt.
            s.epoch_in_doubt = false;
        }
        tracing::info!(session = m.session_id, "rejoined the MLS group");
        // The reference acknowledges the reply too (flows g2/g3).
        self.ack(m, now);
        // At the group's epoch again: what waited for it goes out.
        self.send_queued(m.session_id, now);
        self.release_held(m.session_id, now);
        true
    }

    /// Moderator: a member with a stale epoch asks to rejoin the MLS group. Queued as a
    /// membership task; a retransmitted request gets the reply it already had.
    fn on_rejoin_request(&mut self, m: Received, now: Timestamp) {
        let Some(Cmd::RejoinRequest(request)) = command_of(&m.content) else {
            self.drop_message(SessionDrop::Malformed, "rejoin request without payload");
            return;
        };
        let named = request.participant.as_ref().and_then(Name::from_pb);
        if named.is_some_and(|n| n.key() != m.source.key()) {
            self.drop_message(SessionDrop::Unexpected, "rejoin request for someone else");
            return;
        }
        if request.key_package.is_empty() {
            self.drop_message(SessionDrop::BadMls, "rejoin request without key package");
            return;
        }
        let Some(s) = self.sessions.get_mut(&m.session_id) else {
            return;
        };
        if s.mls.is_none() {
            self.drop_message(SessionDrop::Unexpected, "rejoin request without MLS");
            return;
        }
        let Some(group) = s.group.as_mut() else {
            return;
        };
        let key = m.source.key();
        if let Some((_, reply)) = group
            .rejoin_replies
            .get(&key)
            .filter(|(id, _)| *id == m.message_id)
        {
            // Our reply was lost.
            let reply = reply.clone();
            self.stats.dropped[SessionDrop::Duplicate as usize] += 1;
            let message = self.reply(&m, Mt::RejoinReply, command(Cmd::RejoinReply(reply)), now);
            self.emit_send(message);
            self.resend_unacked(m.session_id, &m.source, now);
            return;
        }
        let queued = group.tasks.iter().any(|t| {
            matches!(t, Task::Rejoin { member, message_id, .. }
                if member.key() == key && *message_id == m.message_id)
        });
        let running = s
            .pending
            .iter()
            .any(|p| matches!(&p.purpose, Purpose::RejoinUpdate(n) if n.key() == key));
        if queued || running {
            self.stats.dropped[SessionDrop::Duplicate as usize] += 1;
            return;
        }
        group.tasks.push_back(Task::Rejoin {
            member: m.source.clone(),
            session_type: m.session_type,
            message_id: m.message_id,
            key_package: request.key_package,
        });
        self.start_next_task(m.session_id, now);
    }

    /// Moderator: the rejoin of `member`: one MLS commit removing its old leaf and adding its
    /// new key package; REJOIN_REPLY with the welcome to it, GROUP_UPDATE op=REJOIN with the
    /// commit to the control channel.
    fn rejoin_task(
        &mut self,
        session: SessionId,
        member: Name,
        session_type: SessionType,
        message_id: u32,
        key_package: &[u8],
        now: Timestamp,
    ) {
        let verifier = TokenVerifier {
            secret: &self.secret,
            now_unix: self.unix_at_zero + now.as_micros() / 1_000_000,
        };
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        let still_member = s.group.as_ref().is_some_and(|g| g.is_member(&member.key()));
        let result = match s.mls.as_mut() {
            Some(mls) if still_member => mls
                .rejoin(member.id(), key_package, &verifier)
                .map_err(|e| e.to_string()),
            _ => Err("not a member of an MLS group".to_owned()),
        };
        let commit = match result {
            Ok(commit) => commit,
            Err(error) => {
                self.drop_message(SessionDrop::BadMls, &format!("rejoin refused: {error}"));
                self.task_done(session, now);
                return;
            }
        };
        let reply = pb::RejoinReplyPayload {
            commit_id: commit.commit_id,
            mls_content: commit.welcome.unwrap_or_default().into(),
        };
        if let Some(g) = self
            .sessions
            .get_mut(&session)
            .and_then(|s| s.group.as_mut())
        {
            g.stale.remove(&member.key());
            g.rejoin_replies
                .insert(member.key(), (message_id, reply.clone()));
        }
        let me = self.name.clone();
        let message = self.build(
            session_type,
            Mt::RejoinReply,
            session,
            message_id,
            &me,
            &member,
            1,
            command(Cmd::RejoinReply(reply)),
            BTreeMap::new(),
            now,
        );
        self.emit_send(message);
        tracing::info!(session, %member, commit_id = commit.commit_id, "a member rejoins the MLS group: welcome sent");
        // Every member applies the commit; the rejoiner acknowledges the update too (it gets
        // it on the control channel, as reference members do).
        let awaiting = self.others(session, &[]);
        if awaiting.is_empty() {
            self.task_done(session, now);
            return;
        }
        let mls = pb::MlsPayload {
            commit_id: commit.commit_id,
            mls_content: commit.commit.into(),
        };
        self.send_update(
            session,
            pb::GroupUpdateOp::Rejoin,
            &member,
            None,
            awaiting,
            Purpose::RejoinUpdate(member.clone()),
            Some(mls),
            now,
        );
        self.resend_unacked(session, &member, now);
    }

    /// Sends `member` at once, at the current epoch, what it has not acknowledged of ours: it
    /// could not read it while it was out of the MLS group (a rejoin), and the retransmission
    /// timers, backed off by then, may be seconds away. Sent after its welcome on the same
    /// path, so it arrives after it.
    fn resend_unacked(&mut self, session: SessionId, member: &Name, now: Timestamp) {
        let Some(s) = self.sessions.get(&session) else {
            return;
        };
        for id in s.sender.unacked_by(&member.key()) {
            let to = member.clone();
            self.sender_event(session, SenderEvent::Retransmit { id, to }, now);
        }
    }

    /// Peers silent for three heartbeat periods are marked offline.
    fn check_liveness(&mut self, session: SessionId, now: Timestamp) {
        let me = self.name.clone();
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        let silent_limit = HEARTBEAT_INTERVAL * MISSED_HEARTBEATS;
        let mut gone = Vec::new();
        for peer in s.peers(&me) {
            let last = *s.last_heard.entry(peer.key()).or_insert(now);
            if now.saturating_since(last) >= silent_limit && s.offline.insert(peer.key()) {
                gone.push(peer);
            }
        }
        for member in gone {
            self.out.push_back(Output::Event(SessionEvent::MemberState {
                session,
                member,
                online: false,
            }));
        }
    }

    fn receiver_events(&mut self, session: SessionId, events: Vec<ReceiverEvent>, now: Timestamp) {
        let session_type = self
            .sessions
            .get(&session)
            .map_or(SessionType::PointToPoint, |s| s.session_type);
        for event in events {
            match event {
                ReceiverEvent::Deliver {
                    source,
                    id,
                    message,
                } => self.deliver(session, source, id, message),
                ReceiverEvent::RequestRtx { source, id } => {
                    self.stats.rtx_requests_sent += 1;
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

    // ------------------------------------------------------------------ handshakes

    fn p2p_join(&mut self, session: SessionId, peer: Name, now: Timestamp) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        s.peer = peer.clone();
        let timer_settings = timer_settings(s.reliability);
        let metadata = s.metadata.clone();
        let mls_settings = s.mls.as_ref().map(SessionMls::settings);
        self.send_control(
            session,
            Purpose::Join,
            Mt::JoinRequest,
            peer.clone(),
            1,
            Cmd::JoinRequest(pb::JoinRequestPayload {
                timer_settings,
                channel: None,
                control: None,
                mls_settings,
            }),
            metadata,
            Awaiting::Each(vec![peer]),
            now,
        );
    }

    fn p2p_welcome(&mut self, session: SessionId, reply: &Received, now: Timestamp) {
        let mls = match self.add_to_mls_group(session, reply, now) {
            Ok(commit) => commit.map(|c| pb::MlsPayload {
                commit_id: c.commit_id,
                mls_content: c.welcome.unwrap_or_default().into(),
            }),
            Err(error) => {
                self.drop_message(SessionDrop::BadMls, &error);
                self.abandon(session, now);
                self.finish(session, CloseReason::Refused("the peer's key package"));
                return;
            }
        };
        let Some(s) = self.sessions.get(&session) else {
            return;
        };
        let peer = s.peer.clone();
        let me = self.name.clone();
        self.send_control(
            session,
            Purpose::Welcome,
            Mt::GroupWelcome,
            peer.clone(),
            1,
            Cmd::GroupWelcome(pb::GroupWelcomePayload {
                participants: vec![participant(&peer), participant(&me)],
                mls,
            }),
            BTreeMap::new(),
            Awaiting::Each(vec![peer]),
            now,
        );
    }

    // ------------------------------------------------------------------ group membership (moderator)

    fn moderated(&mut self, session: SessionId) -> Result<&mut Group, SessionError> {
        let s = self.app_session(session)?;
        if s.state == State::Closing {
            return Err(SessionError::Closing(session));
        }
        if !s.is_moderator() {
            return Err(SessionError::NotModerator(session));
        }
        s.group.as_mut().ok_or(SessionError::NotModerator(session))
    }

    /// Membership changes run one at a time (spec §4.6).
    fn start_next_task(&mut self, session: SessionId, now: Timestamp) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        let Some(group) = s.group.as_mut() else {
            return;
        };
        if group.busy || s.state != State::Established {
            return;
        }
        let Some(task) = group.tasks.pop_front() else {
            return;
        };
        group.busy = true;
        match task {
            Task::Invite(invitee) => self.send_control(
                session,
                Purpose::InviteDiscovery(invitee.clone()),
                Mt::DiscoveryRequest,
                invitee.with_instance(ANY_INSTANCE),
                1,
                Cmd::DiscoveryRequest(pb::DiscoveryRequestPayload {}),
                BTreeMap::new(),
                Awaiting::AnyOf(invitee),
                now,
            ),
            Task::Remove(member) => {
                let mls = self.remove_from_mls_group(session, &member);
                let Some(group) = self.sessions.get(&session).and_then(|s| s.group.as_ref()) else {
                    return;
                };
                // The update goes out when more than the moderator and the member are in the
                // group (the list before removal has > 2 entries). Like the other updates it
                // waits for the online members only (the removed one too, while online).
                if group.members.len() > 2 {
                    let awaiting = self.others(session, &[]);
                    self.send_update(
                        session,
                        pb::GroupUpdateOp::Remove,
                        &member,
                        None,
                        awaiting,
                        Purpose::RemoveUpdate(member.clone()),
                        mls,
                        now,
                    );
                } else {
                    self.remove_leave(session, member, now);
                }
            }
            Task::Rejoin {
                member,
                session_type,
                message_id,
                key_package,
            } => self.rejoin_task(session, member, session_type, message_id, &key_package, now),
            Task::Departed(member) => {
                let mls = self.remove_from_mls_group(session, &member);
                self.forget_member(session, &member, now);
                let others = self.others(session, &[&member]);
                self.announce_departure(session, &member, others, mls, now);
            }
        }
    }

    /// Adds the member whose JOIN_REPLY this is to the session's MLS group: the commit and
    /// welcome to send, or `None` without MLS.
    fn add_to_mls_group(
        &mut self,
        session: SessionId,
        reply: &Received,
        now: Timestamp,
    ) -> Result<Option<CommitOut>, String> {
        let verifier = TokenVerifier {
            secret: &self.secret,
            now_unix: self.unix_at_zero + now.as_micros() / 1_000_000,
        };
        let Some(mls) = self.sessions.get_mut(&session).and_then(|s| s.mls.as_mut()) else {
            return Ok(None);
        };
        let Some(Cmd::JoinReply(join)) = command_of(&reply.content) else {
            return Err("join reply without payload".to_owned());
        };
        let Some(key_package) = join.key_package else {
            return Err("join reply without the key package an MLS session needs".to_owned());
        };
        mls.add(&key_package, &verifier)
            .map(Some)
            .map_err(|error| format!("key package refused: {error}"))
    }

    /// Removes a member from the session's MLS group: the commit for the others, or `None`
    /// without MLS (or when the member never made it into the MLS group).
    fn remove_from_mls_group(
        &mut self,
        session: SessionId,
        member: &Name,
    ) -> Option<pb::MlsPayload> {
        let mls = self.sessions.get_mut(&session)?.mls.as_mut()?;
        match mls.remove(member.id()) {
            Ok(commit) => Some(pb::MlsPayload {
                commit_id: commit.commit_id,
                mls_content: commit.commit.into(),
            }),
            Err(error) => {
                tracing::debug!(%member, %error, "member not removed from the MLS group");
                None
            }
        }
    }

    /// A fresh identity for MLS credentials: the token (with our `pubkey` claim) and our key.
    fn mls_identity(&mut self, now: Timestamp) -> MlsIdentity {
        let token = self.fresh_token(now);
        MlsIdentity::p256(token, self.key.clone())
    }

    /// The layer's MLS settings with a seed of the group's own.
    fn group_config(&mut self) -> GroupConfig {
        let mut config = self.mls_config.clone();
        config.seed = self.rng.random();
        config
    }

    /// Creates the MLS group of a session we open (p2p initiator or moderator); false if
    /// openmls refused (a local fault, logged).
    fn attach_mls_group(&mut self, session: &mut Session, now: Timestamp) -> bool {
        let identity = self.mls_identity(now);
        let config = self.group_config();
        match SessionMls::create(&identity, config) {
            Ok(mls) => {
                session.mls = Some(mls);
                true
            }
            Err(error) => {
                tracing::warn!(%error, "MLS group could not be created");
                false
            }
        }
    }

    fn task_done(&mut self, session: SessionId, now: Timestamp) {
        if let Some(group) = self
            .sessions
            .get_mut(&session)
            .and_then(|s| s.group.as_mut())
        {
            group.busy = false;
        }
        self.start_next_task(session, now);
    }

    fn invite_failed(
        &mut self,
        session: SessionId,
        invitee: Name,
        reason: &'static str,
        now: Timestamp,
    ) {
        self.out
            .push_back(Output::Event(SessionEvent::InviteFailed {
                session,
                invitee,
                reason,
            }));
        self.task_done(session, now);
    }

    /// The welcome went unacknowledged: the invite failed. The invitee may have joined all the
    /// same (only its acks were lost), and the members may have been told it joined. So it is
    /// taken out everywhere: the update announcing it is withdrawn, the others get a removal
    /// update, and the invitee is asked to leave (again whenever it is heard from later). The
    /// invite task ends with that update.
    fn invite_withdrawn(&mut self, session: SessionId, invitee: Name, now: Timestamp) {
        let key = invitee.key();
        // It is in our MLS group since the commit the update carries: out again with another.
        let mls = self.remove_from_mls_group(session, &invitee);
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        if s.mls.is_some() {
            // The members need the commit that added it to follow the group's epochs: that
            // update goes on, but its outcome no longer completes the invite.
            for p in &mut s.pending {
                if matches!(&p.purpose, Purpose::InviteUpdate(n) if n.key() == key) {
                    p.purpose = Purpose::Withdrawn(invitee.clone());
                }
            }
        } else {
            s.pending
                .retain(|p| !matches!(&p.purpose, Purpose::InviteUpdate(n) if n.key() == key));
        }
        if let Some(g) = s.group.as_mut() {
            g.members.retain(|n| n.key() != key);
        }
        // No longer a member: forgotten without a `MemberLeft`.
        self.forget_member(session, &invitee, now);
        self.out
            .push_back(Output::Event(SessionEvent::InviteFailed {
                session,
                invitee: invitee.clone(),
                reason: "the welcome was not acknowledged",
            }));
        self.evict(session, &invitee, now);
        let others = self.others(session, &[]);
        self.announce_departure(session, &invitee, others, mls, now);
    }

    /// Tells `others` that `member` is out of the group (with the MLS commit removing it, if
    /// any); with nobody left to tell, the task is done.
    fn announce_departure(
        &mut self,
        session: SessionId,
        member: &Name,
        others: Vec<Name>,
        mls: Option<pb::MlsPayload>,
        now: Timestamp,
    ) {
        if others.is_empty() {
            self.task_done(session, now);
            return;
        }
        self.send_update(
            session,
            pb::GroupUpdateOp::Remove,
            member,
            None,
            others,
            Purpose::DepartureUpdate(member.clone()),
            mls,
            now,
        );
    }

    /// Tells a non-member that acts as a member of our group to leave it. Not retried: it is
    /// told again the next time it is heard from (it heartbeats while it thinks it is in), at
    /// most once per control interval.
    fn evict(&mut self, session: SessionId, stranger: &Name, now: Timestamp) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        let interval = s.control_interval;
        let Some(group) = s.group.as_mut() else {
            return;
        };
        let key = stranger.key();
        if group
            .evicted
            .get(&key)
            .is_some_and(|at| now.saturating_since(*at) < interval)
        {
            return;
        }
        if group.evicted.len() >= DEPARTED {
            // Forget the longest-evicted stranger: at worst it is told to leave again sooner.
            if let Some(oldest) = group
                .evicted
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(k, _)| *k)
            {
                group.evicted.remove(&oldest);
            }
        }
        group.evicted.insert(key, now);
        let session_type = s.session_type;
        let me = self.name.clone();
        let message_id = self.rng.random();
        let leave = self.build(
            session_type,
            Mt::LeaveRequest,
            session,
            message_id,
            &me,
            stranger,
            1,
            command(Cmd::LeaveRequest(pb::LeaveRequestPayload {})),
            BTreeMap::new(),
            now,
        );
        self.emit_send(leave);
    }

    /// A member that missed an update was heard from: it gets the current member list (an ADD
    /// update listing everyone, to it alone), unless that is already on its way.
    fn resync_if_stale(&mut self, session: SessionId, member: &Name, now: Timestamp) {
        let me = self.name.clone();
        let Some(s) = self.sessions.get(&session) else {
            return;
        };
        let key = member.key();
        // With MLS a member that missed an update missed its commit too: a member list does
        // not bring it back to the group's epoch (that takes the rejoin of spec §4.6).
        let stale = s.mls.is_none() && s.group.as_ref().is_some_and(|g| g.stale.contains(&key));
        let on_its_way = s
            .pending
            .iter()
            .any(|p| matches!(&p.purpose, Purpose::Resync(n) if n.key() == key));
        if !stale || on_its_way {
            return;
        }
        // The subject is the moderator, whom every member has already: a reference member
        // (which applies only the subject of an update) changes nothing.
        self.send_update(
            session,
            pb::GroupUpdateOp::Add,
            &me,
            Some(member.clone()),
            vec![member.clone()],
            Purpose::Resync(member.clone()),
            None,
            now,
        );
    }

    fn invite_join(&mut self, session: SessionId, invitee: Name, now: Timestamp) {
        let Some(s) = self.sessions.get(&session) else {
            return;
        };
        let Some(group) = &s.group else {
            return;
        };
        let payload = pb::JoinRequestPayload {
            timer_settings: timer_settings(s.reliability),
            channel: Some(group.data.to_pb()),
            control: Some(group.control.to_pb()),
            mls_settings: s.mls.as_ref().map(SessionMls::settings),
        };
        let metadata = s.metadata.clone();
        self.send_control(
            session,
            Purpose::InviteJoin(invitee.clone()),
            Mt::JoinRequest,
            invitee.clone(),
            1,
            Cmd::JoinRequest(payload),
            metadata,
            Awaiting::Each(vec![invitee]),
            now,
        );
    }

    fn invite_welcome(
        &mut self,
        session: SessionId,
        invitee: Name,
        reply: &Received,
        now: Timestamp,
    ) {
        let commit = match self.add_to_mls_group(session, reply, now) {
            Ok(commit) => commit,
            Err(error) => {
                self.drop_message(SessionDrop::BadMls, &error);
                self.invite_failed(session, invitee, "its MLS key package was refused", now);
                return;
            }
        };
        let (update_mls, welcome_mls) = match commit {
            Some(c) => (
                Some(pb::MlsPayload {
                    commit_id: c.commit_id,
                    mls_content: c.commit.into(),
                }),
                Some(pb::MlsPayload {
                    commit_id: c.commit_id,
                    mls_content: c.welcome.unwrap_or_default().into(),
                }),
            ),
            None => (None, None),
        };
        let me = self.name.clone();
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        let key = invitee.key();
        let existing: Vec<Name> = s.online_members(&me.key()).cloned().collect();
        let Some(group) = s.group.as_mut() else {
            return;
        };
        if group.members.len() == 1 {
            // As the reference: the first member is listed before the moderator.
            group.members.insert(0, invitee.clone());
        } else if !group.is_member(&key) {
            group.members.push(invitee.clone());
        }
        group.departed.retain(|k| *k != key);
        group.evicted.remove(&key);
        group.stale.remove(&key);
        let participants: Vec<pb::Participant> = group.members.iter().map(participant).collect();
        let starts = s
            .reliability
            .is_some()
            .then(|| stream_starts(s, &me, &invitee));
        // Its stream starts at 1 for us: the member list of its welcome has us.
        s.receiver.remove_source(&key);
        s.receiver.expect(&invitee, 1);
        let member_count = participants.len();
        if member_count > 2 {
            self.send_update(
                session,
                pb::GroupUpdateOp::Add,
                &invitee,
                None,
                existing,
                Purpose::InviteUpdate(invitee.clone()),
                update_mls,
                now,
            );
        } else {
            self.next_group_version(session);
        }
        // The welcome carries the same list as the update, under the same version.
        let Some(version) = self
            .sessions
            .get(&session)
            .and_then(|s| s.group.as_ref())
            .map(|g| g.version)
        else {
            return;
        };
        let mut metadata = BTreeMap::from([(GROUP_VERSION.to_string(), version.to_string())]);
        if let Some(starts) = starts {
            metadata.insert(STREAM_STARTS.to_string(), starts);
        }
        self.send_control(
            session,
            Purpose::InviteWelcome(invitee.clone()),
            Mt::GroupWelcome,
            invitee.clone(),
            1,
            Cmd::GroupWelcome(pb::GroupWelcomePayload {
                participants,
                mls: welcome_mls,
            }),
            metadata,
            Awaiting::Each(vec![invitee]),
            now,
        );
    }

    /// The next version of the member list (see [`GROUP_VERSION`]).
    fn next_group_version(&mut self, session: SessionId) -> u64 {
        self.sessions
            .get_mut(&session)
            .and_then(|s| s.group.as_mut())
            .map_or(0, |g| {
                g.version += 1;
                g.version
            })
    }

    fn remove_leave(&mut self, session: SessionId, member: Name, now: Timestamp) {
        self.send_control(
            session,
            Purpose::RemoveLeave(member.clone()),
            Mt::LeaveRequest,
            member.clone(),
            1,
            Cmd::LeaveRequest(pb::LeaveRequestPayload {}),
            BTreeMap::new(),
            Awaiting::Each(vec![member]),
            now,
        );
    }

    /// A GROUP_UPDATE with the current member list (a removal: the list before it, as the
    /// reference sends it), to the control channel (or to `to` alone), acknowledged by each of
    /// `awaiting`.
    #[allow(clippy::too_many_arguments)]
    fn send_update(
        &mut self,
        session: SessionId,
        op: pb::GroupUpdateOp,
        subject: &Name,
        to: Option<Name>,
        awaiting: Vec<Name>,
        purpose: Purpose,
        mls: Option<pb::MlsPayload>,
        now: Timestamp,
    ) {
        let version = self.next_group_version(session);
        let Some(s) = self.sessions.get(&session) else {
            return;
        };
        let Some(group) = s.group.as_ref() else {
            return;
        };
        // A member being removed stays in our list until it confirms it left, but the others
        // were already told it is out: a list sent meanwhile (a resync) must not bring it back.
        let removing: Vec<NameKey> = s
            .pending
            .iter()
            .filter_map(|p| match &p.purpose {
                Purpose::RemoveUpdate(n) | Purpose::RemoveLeave(n) => Some(n.key()),
                _ => None,
            })
            .collect();
        let mut participants: Vec<pb::Participant> = group
            .members
            .iter()
            .filter(|n| op == pb::GroupUpdateOp::Remove || !removing.contains(&n.key()))
            .map(participant)
            .collect();
        if op == pb::GroupUpdateOp::Remove && !group.is_member(&subject.key()) {
            participants.push(participant(subject));
        }
        // Offline members are not waited for: if they dropped the update they keep an older
        // member list, so they are resynchronised when heard from, as a member whose ack never
        // came is (with MLS the rejoin brings them back instead).
        let skipped: Vec<NameKey> = match (&to, &s.mls) {
            (None, None) => group
                .members
                .iter()
                .map(Name::key)
                .filter(|key| s.offline.contains(key))
                .collect(),
            _ => Vec::new(),
        };
        let (destination, fanout) = match to {
            Some(member) => (member, 1),
            None => (group.control.clone(), MAX_FANOUT),
        };
        if let Some(group) = self
            .sessions
            .get_mut(&session)
            .and_then(|s| s.group.as_mut())
        {
            group.stale.extend(skipped);
        }
        let payload = pb::GroupUpdatePayload {
            op: op as i32,
            participant: Some(participant(subject)),
            participants,
            mls,
        };
        self.send_control(
            session,
            purpose,
            Mt::GroupUpdate,
            destination,
            fanout,
            Cmd::GroupUpdate(payload),
            BTreeMap::from([(GROUP_VERSION.to_string(), version.to_string())]),
            Awaiting::Each(awaiting),
            now,
        );
    }

    /// Online group members other than us and `except`: who a membership update waits for.
    fn others(&self, session: SessionId, except: &[&Name]) -> Vec<Name> {
        let me = self.name.key();
        self.sessions
            .get(&session)
            .map(|s| {
                s.online_members(&me)
                    .filter(|n| !except.iter().any(|e| e.key() == n.key()))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A member is gone: nothing is waited for from it any more.
    fn forget_member(&mut self, session: SessionId, member: &Name, now: Timestamp) {
        self.forget_member_announcing(session, member, false, now);
    }

    /// [`forget_member`](Self::forget_member); `announce` reports `MemberLeft` even when the
    /// member list no longer had it (a participant applies the update's list first).
    fn forget_member_announcing(
        &mut self,
        session: SessionId,
        member: &Name,
        announce: bool,
        now: Timestamp,
    ) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        let mut events = Vec::new();
        let key = member.key();
        s.sender.remove_endpoint(&key, &mut events);
        s.receiver.remove_source(&key);
        let was_member = s.group.as_mut().is_some_and(|g| {
            let before = g.members.len();
            g.members.retain(|n| n.key() != key);
            g.stale.remove(&key);
            g.rejoin_replies.remove(&key);
            if !g.departed.contains(&key) {
                if g.departed.len() == DEPARTED {
                    g.departed.pop_front();
                }
                g.departed.push_back(key);
            }
            g.members.len() != before
        });
        for p in &mut s.pending {
            if let Awaiting::Each(names) = &mut p.awaiting {
                names.retain(|n| n.key() != member.key());
            }
            p.end_soon_if_unawaited(now);
        }
        for event in events {
            self.sender_event(session, event, now);
        }
        if was_member || announce {
            self.out.push_back(Output::Event(SessionEvent::MemberLeft {
                session,
                member: member.clone(),
            }));
        }
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
        let me = self.name.clone();
        let Some(s) = self.sessions.get_mut(&session) else {
            return 0;
        };
        let id = s.sender.allocate_id();
        let (destination, fanout) = s.data_destination();
        s.sent_since_heartbeat = true;
        let receivers = s.online_peers(&me);
        let outgoing = Outgoing {
            id,
            payload,
            payload_type,
            metadata,
        };
        self.transmit_data(session, outgoing, &destination, fanout, receivers, now);
        id
    }

    /// Sends a data message; in a reliable session it is kept for retransmission until each
    /// of `receivers` acknowledged it.
    fn transmit_data(
        &mut self,
        session: SessionId,
        outgoing: Outgoing,
        destination: &Name,
        fanout: u32,
        receivers: Vec<Name>,
        now: Timestamp,
    ) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        if s.reliability.is_some() {
            if !s.sender.can_send() {
                s.sender.hold(Queued {
                    message: outgoing,
                    destination: destination.clone(),
                    fanout,
                    endpoints: receivers,
                });
                return;
            }
            s.sender.sent(outgoing.clone(), receivers, now);
        }
        self.emit_msg(session, outgoing, destination, fanout, now);
    }

    /// Held-back messages the window has room for now go out (after an ack, a failure or a
    /// departure ended a message in it).
    fn release_held(&mut self, session: SessionId, now: Timestamp) {
        if self.sessions.get(&session).is_some_and(|s| !s.may_seal()) {
            return; // after the rejoin, or once the moderator confirmed our epoch
        }
        while let Some(queued) = self
            .sessions
            .get_mut(&session)
            .and_then(|s| s.sender.next_ready(now))
        {
            let Queued {
                message,
                destination,
                fanout,
                ..
            } = queued;
            self.emit_msg(session, message, &destination, fanout, now);
        }
    }

    /// Builds and sends one MSG.
    fn emit_msg(
        &mut self,
        session: SessionId,
        outgoing: Outgoing,
        destination: &Name,
        fanout: u32,
        now: Timestamp,
    ) {
        let me = self.name.clone();
        let Some(s) = self.sessions.get(&session) else {
            return;
        };
        let session_type = s.session_type;
        let message = self.build(
            session_type,
            Mt::Msg,
            session,
            outgoing.id,
            &me,
            destination,
            fanout,
            pb::Content::app(&outgoing.payload_type, outgoing.payload),
            outgoing.metadata,
            now,
        );
        self.emit_data(session, message);
    }

    fn sender_event(&mut self, session: SessionId, event: SenderEvent, now: Timestamp) {
        match event {
            SenderEvent::Retransmit { id, to } => {
                let Some(s) = self.sessions.get(&session) else {
                    return;
                };
                let Some(stored) = s.sender.buffered(id).cloned() else {
                    return;
                };
                // Re-sent to the one endpoint that is missing; a group keeps fanout 256 (flows f7).
                let fanout = if s.group.is_some() { MAX_FANOUT } else { 1 };
                let session_type = s.session_type;
                let me = self.name.clone();
                let message = self.build(
                    session_type,
                    Mt::Msg,
                    session,
                    id,
                    &me,
                    &to,
                    fanout,
                    pb::Content::app(&stored.payload_type, stored.payload),
                    stored.metadata,
                    now,
                );
                self.emit_data(session, message);
            }
            SenderEvent::Delivered { id } => {
                self.out
                    .push_back(Output::Event(SessionEvent::Delivered { session, id }));
                self.release_held(session, now);
            }
            SenderEvent::Failed { id, missing } => {
                self.out.push_back(Output::Event(SessionEvent::SendFailed {
                    session,
                    id,
                    missing,
                }));
                self.release_held(session, now);
            }
        }
    }

    /// Sends a control message and keeps it for retransmission until `awaiting` answered.
    #[allow(clippy::too_many_arguments)]
    fn send_control(
        &mut self,
        session: SessionId,
        purpose: Purpose,
        message_type: Mt,
        destination: Name,
        fanout: u32,
        payload: Cmd,
        metadata: BTreeMap<String, String>,
        awaiting: Awaiting,
        now: Timestamp,
    ) {
        let message_id = self.rng.random();
        self.send_control_as(
            session,
            message_id,
            purpose,
            message_type,
            destination,
            fanout,
            payload,
            metadata,
            awaiting,
            now,
        );
    }

    /// [`send_control`](Self::send_control) with a given message id.
    #[allow(clippy::too_many_arguments)]
    fn send_control_as(
        &mut self,
        session: SessionId,
        message_id: u32,
        purpose: Purpose,
        message_type: Mt,
        destination: Name,
        fanout: u32,
        payload: Cmd,
        metadata: BTreeMap<String, String>,
        awaiting: Awaiting,
        now: Timestamp,
    ) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        // Traffic to the whole group counts as "sent" for the heartbeat (flows g1).
        s.sent_since_heartbeat |= s.group.is_some() && fanout == MAX_FANOUT;
        let mut pending = PendingControl {
            purpose,
            message_type,
            message_id,
            destination,
            fanout,
            payload,
            metadata,
            awaiting,
            retries_left: s.control_retries,
            deadline: now + s.control_interval,
        };
        pending.end_soon_if_unawaited(now);
        s.pending.push(pending.clone());
        self.transmit_control(session, &pending, now);
    }

    fn transmit_control(&mut self, session: SessionId, p: &PendingControl, now: Timestamp) {
        let session_type = self
            .sessions
            .get(&session)
            .map_or(SessionType::PointToPoint, |s| s.session_type);
        let me = self.name.clone();
        let message = self.build(
            session_type,
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

    /// MSG_ACK for a data message (or its retransmission): same id, back to its source, empty
    /// payload, the `PUBLISH_TO` flag echoed.
    fn send_msg_ack(&mut self, m: &Received, now: Timestamp) {
        let me = self.name.clone();
        let ack = self.build(
            m.session_type,
            Mt::MsgAck,
            m.session_id,
            m.message_id,
            &me,
            &m.source,
            1,
            empty_app_payload(),
            publish_to_echo(&m.metadata),
            now,
        );
        self.held_acks.push_back(HeldAck {
            session: m.session_id,
            due: now + ACK_HOLD,
            ack,
        });
    }

    fn ack(&mut self, m: &Received, now: Timestamp) {
        let ack = self.reply(
            m,
            Mt::GroupAck,
            command(Cmd::GroupAck(pb::GroupAckPayload {})),
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

    fn fresh_token(&mut self, now: Timestamp) -> String {
        let now_unix = self.unix_now(now);
        self.secret
            .issue_with_claims(&self.identity_id, &self.claims, now_unix, &mut self.rng)
    }

    /// Our token for a message of `message_type`. Data messages (MSG, MSG_ACK, RTX_*) share
    /// one token per unix second, sparing an HMAC per message: no receiver checks their tokens
    /// against a replay cache (the reference verifies command messages' tokens only, and its
    /// replay cache is off by default). Command messages get a fresh token each, as the
    /// reference sends them, so a receiver that does keep a replay cache accepts them.
    fn token_for(&mut self, message_type: Mt, now: Timestamp) -> String {
        if identity::is_command_message(message_type as i32) {
            return self.fresh_token(now);
        }
        let now_unix = self.unix_now(now);
        match &self.data_token {
            Some((issued, token)) if *issued == now_unix => token.clone(),
            _ => {
                let token = self.fresh_token(now);
                self.data_token = Some((now_unix, token.clone()));
                token
            }
        }
    }

    /// A session message with our identity token (see `token_for`); control messages are signed.
    #[allow(clippy::too_many_arguments)]
    fn build(
        &mut self,
        session_type: SessionType,
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
        let token = self.token_for(message_type, now);
        let mut message = pb::Message {
            message_type: Some(pb::message::MessageType::Publish(pb::Publish {
                header: Some(pb::SlimHeader {
                    source: Some(source.to_pb()),
                    destination: Some(destination.to_pb()),
                    identity: token,
                    fanout,
                    version: HEADER_VERSION.into(),
                    ttl: slim_proto::DEFAULT_TTL,
                    ..Default::default()
                }),
                session: Some(pb::SessionHeader {
                    session_type: session_type as i32,
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

    /// Sends a data message (MSG, RTX_REPLY); in an MLS session its payload is encrypted first,
    /// for every copy anew, as each copy's header (token, destination) is its AAD.
    fn emit_data(&mut self, session: SessionId, mut message: pb::Message) {
        if let Some(s) = self.sessions.get_mut(&session) {
            if s.mls.is_some() && !s.may_seal() {
                // Our epoch is stale (or in doubt): a retransmission or an RTX reply waits for
                // the next attempt (or request), encrypted at the epoch we then know is current.
                tracing::debug!(
                    session,
                    "data message not sent: MLS epoch stale or in doubt"
                );
                return;
            }
        }
        if let Some(mls) = self.sessions.get_mut(&session).and_then(|s| s.mls.as_mut()) {
            if let Err(error) = mls.seal(&mut message) {
                tracing::warn!(session, %error, "data message not sent: MLS encryption failed");
                return;
            }
        }
        self.emit_send(message);
    }

    /// Sends `message`, and with it the acks held for its session: after it when it is data
    /// (the answer they waited for), before it otherwise (as if they had not been held).
    fn emit_send(&mut self, message: pb::Message) {
        let (session, is_data) = session_and_kind(&message);
        if !is_data {
            self.release_acks(session);
        }
        self.push_send(message);
        if is_data {
            self.release_acks(session);
        }
    }

    fn push_send(&mut self, message: pb::Message) {
        self.stats.sent += 1;
        self.out.push_back(Output::Send(Box::new(message)));
    }

    /// Sends the held acks due by `now`; one released long after it was due gets a new token.
    fn release_due_acks(&mut self, now: Timestamp) {
        while self.held_acks.front().is_some_and(|held| held.due <= now) {
            let Some(mut held) = self.held_acks.pop_front() else {
                break;
            };
            if now.saturating_since(held.due) > ACK_RESTAMP_AFTER {
                let token = self.token_for(Mt::MsgAck, now);
                if let Some(pb::message::MessageType::Publish(publish)) = &mut held.ack.message_type
                {
                    if let Some(header) = publish.header.as_mut() {
                        header.identity = token;
                    }
                }
            }
            self.push_send(held.ack);
        }
    }

    fn release_acks(&mut self, session: Option<SessionId>) {
        let Some(session) = session else { return };
        if !self.held_acks.iter().any(|held| held.session == session) {
            return;
        }
        let held = std::mem::take(&mut self.held_acks);
        for held in held {
            if held.session == session {
                self.push_send(held.ack);
            } else {
                self.held_acks.push_back(held);
            }
        }
    }

    fn drop_message(&mut self, reason: SessionDrop, detail: &str) {
        self.stats.dropped[reason as usize] += 1;
        tracing::debug!(?reason, detail, "session message dropped");
    }

    fn new_session_id(&mut self) -> SessionId {
        loop {
            let id = self.rng.random_range(0..MAX_SESSION_ID);
            if !self.sessions.contains_key(&id) {
                return id;
            }
        }
    }

    fn new_session(
        &mut self,
        role: Role,
        session_type: SessionType,
        peer: Name,
        reliability: Option<Reliability>,
        now: Timestamp,
    ) -> Session {
        // Control messages use the session's timers when it has them (captures/flows f7).
        let (control_interval, control_retries) = match reliability {
            Some(r) => (r.interval, r.max_retries),
            None => (DEFAULT_CONTROL_INTERVAL, DEFAULT_CONTROL_RETRIES),
        };
        Session {
            role,
            state: State::Opening,
            announced: role == Role::Initiator,
            session_type,
            peer,
            group: None,
            reliability,
            control_interval,
            control_retries,
            pending: Vec::new(),
            sender: ReliableSender::new(control_interval, control_retries),
            receiver: ReliableReceiver::new(control_interval, control_retries),
            queued: Vec::new(),
            metadata: BTreeMap::new(),
            next_heartbeat: now + HEARTBEAT_INTERVAL,
            sent_since_heartbeat: false,
            last_heard: BTreeMap::new(),
            offline: BTreeSet::new(),
            soft_closed: false,
            last_epoch_nudge: None,
            epoch_in_doubt: false,
            rejoin_request: None,
            seen_direct: VecDeque::new(),
            ended_channel_wide: VecDeque::new(),
            last_state_update: None,
            mls: None,
        }
    }

    /// Tells a p2p peer that may have joined an unfinished handshake that the session is gone
    /// (one GROUP_CLOSE, not retried; its ack is ignored), so its app sees `Closed`.
    fn abandon(&mut self, session: SessionId, now: Timestamp) {
        let Some(s) = self.sessions.get(&session) else {
            return;
        };
        if s.group.is_some() || s.role != Role::Initiator || s.peer.id() == ANY_INSTANCE {
            return;
        }
        let peer = s.peer.clone();
        let me = self.name.clone();
        let message_id = self.rng.random();
        let close = self.build(
            SessionType::PointToPoint,
            Mt::GroupClose,
            session,
            message_id,
            &me,
            &peer,
            1,
            command(Cmd::GroupClose(pb::GroupClosePayload {
                participants: vec![peer.to_pb(), me.to_pb()],
            })),
            BTreeMap::new(),
            now,
        );
        self.emit_send(close);
    }

    fn finish(&mut self, session: SessionId, reason: CloseReason) {
        let Some(s) = self.sessions.remove(&session) else {
            return;
        };
        // A participant's app hears of a session only at the welcome: a close before it is
        // nothing to tell it about.
        let announced = s.announced;
        if let Some(group) = s.group {
            if group.subscribed {
                self.out.push_back(Output::Unsubscribe(group.data));
                self.out.push_back(Output::Unsubscribe(group.control));
            }
        }
        if announced {
            self.out
                .push_back(Output::Event(SessionEvent::Closed { session, reason }));
        }
    }

    fn session_timeout(&mut self, id: SessionId, now: Timestamp) {
        // Control retransmission, or the end (retries ran out, or nobody is awaited).
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        let mut due = Vec::new();
        let mut expired = Vec::new();
        let interval = s.control_interval;
        for p in &mut s.pending {
            if p.ends(now) {
                expired.push(p.message_id);
            } else if p.deadline <= now {
                p.retries_left -= 1;
                p.deadline = now + interval;
                due.push(p.clone());
            }
        }
        self.stats.control_retransmissions += due.len() as u64;
        for pending in &due {
            self.transmit_control(id, pending, now);
        }
        // One at a time, each taken out of `pending` only when its turn comes: what a handler
        // asks about (is the invitee's welcome still awaited?) sees the ones that expired at
        // the same instant as still awaited, and a handler may withdraw one before its turn.
        for message_id in expired {
            let Some(s) = self.sessions.get_mut(&id) else {
                return;
            };
            let Some(index) = s
                .pending
                .iter()
                .position(|p| p.message_id == message_id && p.ends(now))
            else {
                continue;
            };
            let pending = s.end_pending(index);
            if let (Mt::GroupUpdate, Awaiting::Each(missing), Some(g)) =
                (pending.message_type, &pending.awaiting, s.group.as_mut())
            {
                // They may have kept an older member list: resynchronised when heard from.
                g.stale.extend(missing.iter().map(Name::key));
            }
            self.on_control_done(id, pending.purpose, None, now);
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
            // Counted here, not in `sender_event`: a rejoin's catch-up re-sends go through it
            // too, and those are not the timer's.
            if matches!(event, SenderEvent::Retransmit { .. }) {
                self.stats.data_retransmissions += 1;
            }
            self.sender_event(id, event, now);
        }
        self.receiver_events(id, receiver_events, now);
        if heartbeat_due {
            self.heartbeat(id, now);
        }
    }

    /// Every 10 s, unless the session sent data (or group traffic) in the meantime (spec §4.6):
    /// p2p to the peer, fanout 1; groups to the control channel, fanout 256. Epoch u64::MAX
    /// means "no MLS".
    fn heartbeat(&mut self, id: SessionId, now: Timestamp) {
        self.check_liveness(id, now);
        let me = self.name.clone();
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        s.next_heartbeat = now + HEARTBEAT_INTERVAL;
        // Skipped after group traffic or data, unless every peer is offline (flows f5).
        let anyone_online = !s.online_peers(&me).is_empty();
        if std::mem::take(&mut s.sent_since_heartbeat) && anyone_online {
            return;
        }
        self.send_heartbeat(id, now);
    }

    /// One HEARTBEAT with our MLS epoch (u64::MAX without MLS).
    fn send_heartbeat(&mut self, id: SessionId, now: Timestamp) {
        let Some(s) = self.sessions.get(&id) else {
            return;
        };
        let (destination, fanout) = match &s.group {
            None => (s.peer.clone(), 1),
            Some(g) => (g.control.clone(), MAX_FANOUT),
        };
        let session_type = s.session_type;
        let epoch = s
            .mls
            .as_ref()
            .and_then(SessionMls::epoch)
            .unwrap_or(u64::MAX);
        let me = self.name.clone();
        let message_id = self.rng.random();
        let heartbeat = self.build(
            session_type,
            Mt::Heartbeat,
            id,
            message_id,
            &me,
            &destination,
            fanout,
            command(Cmd::Heartbeat(pb::HeartbeatPayload { epoch })),
            BTreeMap::new(),
            now,
        );
        self.emit_send(heartbeat);
    }
}

/// A received session message, unpacked.
struct Received {
    source: Name,
    session_type: SessionType,
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
        Mt::UpdateParticipantState => Some(Mt::GroupAck),
        Mt::RejoinRequest => Some(Mt::RejoinReply),
        _ => None,
    }
}

/// `publish` refuses more once [`SEND_QUEUE`] messages wait for a reliable session's window.
fn send_queue_room(session: SessionId, s: &mut Session) -> Result<(), SessionError> {
    let queued = s.sender.queued();
    if s.reliability.is_some() && queued >= SEND_QUEUE {
        return Err(SessionError::SendQueueFull(session, queued));
    }
    Ok(())
}

/// Whether `reply` answers a control message of type `request`: its reply, or a GROUP_NACK
/// to a participant state update (a member telling us our epoch is stale).
fn answers(request: Mt, reply: Mt) -> bool {
    reply_to(request) == Some(reply)
        || (request == Mt::UpdateParticipantState && reply == Mt::GroupNack)
}

fn timer_settings(reliability: Option<Reliability>) -> Option<pb::TimerSettings> {
    reliability.map(|r| pb::TimerSettings {
        timeout: u32::try_from(r.interval.as_millis()).unwrap_or(u32::MAX),
        max_retries: r.max_retries,
    })
}

fn command(payload: Cmd) -> pb::Content {
    pb::Content {
        content_type: Some(pb::content::ContentType::CommandPayload(
            pb::CommandPayload {
                command_payload_type: Some(payload),
            },
        )),
    }
}

fn command_of(content: &Option<pb::Content>) -> Option<Cmd> {
    match content.as_ref()?.content_type.as_ref()? {
        pb::content::ContentType::CommandPayload(c) => c.command_payload_type.clone(),
        pb::content::ContentType::AppPayload(_) => None,
    }
}

/// Acks and RTX requests carry an empty application payload (wire bytes `1a020a00`).
fn empty_app_payload() -> pb::Content {
    pb::Content::app("", Bytes::new())
}

/// Acks of direct (`PUBLISH_TO`) messages echo the flag.
/// The session a message we send belongs to, and whether it is application data (a MSG, direct
/// or not, first copy or retransmission) rather than an ack or a command.
fn session_and_kind(message: &pb::Message) -> (Option<SessionId>, bool) {
    let Some(pb::message::MessageType::Publish(publish)) = &message.message_type else {
        return (None, false);
    };
    let Some(header) = &publish.session else {
        return (None, false);
    };
    let is_data = matches!(
        Mt::try_from(header.session_message_type),
        Ok(Mt::Msg | Mt::RtxReply)
    );
    (Some(header.session_id), is_data)
}

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

/// Messages only a member of a group sends in it (data, its acks and gap requests, liveness).
fn acts_as_member(message_type: Mt) -> bool {
    matches!(
        message_type,
        Mt::Msg
            | Mt::MsgAck
            | Mt::RtxRequest
            | Mt::RtxReply
            | Mt::Heartbeat
            | Mt::UpdateParticipantState
    )
}

/// [`STREAM_STARTS`] for a welcome to `invitee`, in the order of the group's member list.
/// Our own stream starts for it at our next id: from now on it is among our receivers. Another
/// member adds it when the update announcing it arrives, at an id we cannot know but that is
/// above every id of its that we have seen (sent before that update was): the stream is
/// declared to start there. Ids between that and where the member really starts for it are
/// not owed to the invitee; it gets them all the same (they pass on the channel, or are asked
/// for), so none is skipped.
fn stream_starts(s: &Session, me: &Name, invitee: &Name) -> String {
    let Some(group) = &s.group else {
        return String::new();
    };
    group
        .members
        .iter()
        .map(|n| {
            let start = if n.key() == invitee.key() {
                0
            } else if n.key() == me.key() {
                s.sender.next_id()
            } else {
                s.receiver
                    .highest_seen(&n.key())
                    .map_or(1, |seen| seen.saturating_add(1))
            };
            start.to_string()
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// [`STREAM_STARTS`] as received: one sequence id (or 0) per participant, or nothing if it
/// does not fit.
fn parse_stream_starts(value: &str, participants: usize) -> Option<Vec<u32>> {
    let starts: Vec<u32> = value
        .split(',')
        .map(|v| {
            v.trim()
                .parse()
                .ok()
                .filter(|id| *id <= super::sender::MAX_SEQUENCE_ID)
        })
        .collect::<Option<_>>()?;
    (starts.len() == participants).then_some(starts)
}

/// [`GROUP_VERSION`] of a welcome or an update, if it has a valid one.
fn group_version(metadata: &BTreeMap<String, String>) -> Option<u64> {
    metadata.get(GROUP_VERSION)?.trim().parse().ok()
}

fn header_mut(message: &mut pb::Message) -> Option<&mut pb::SlimHeader> {
    match message.message_type.as_mut()? {
        pb::message::MessageType::Publish(p) => p.header.as_mut(),
        _ => None,
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;

#[cfg(test)]
#[path = "group_tests.rs"]
mod group_tests;
