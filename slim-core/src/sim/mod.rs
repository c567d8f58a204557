//! Deterministic simulation of SLIM nodes and applications (`shared/design/sansio.md` §6.3, the
//! TigerBeetle VOPR / FoundationDB shape): one thread, one fake clock, one seed.
//!
//! * **Hosts.** Nodes are bare [`Router`]s in a full mesh. A client is composed as the adapters
//!   compose it: its own [`Router`] with the application on a local connection and one Edge
//!   uplink to its node, plus a [`SessionLayer`]. The layer's `Output::Send` messages enter the
//!   client router on the local connection; what the client router delivers on the local
//!   connection goes to [`SessionLayer::handle_message`].
//! * **Wire.** Links carry the gRPC-framed bytes the routers emit, deframed on arrival by
//!   [`Deframer`]. Each direction of each link has its own faults, drawn from the seed (swarm
//!   testing): loss, duplication, delay with jitter (reordering) and partitions that open and
//!   heal ([`scenario::LinkFaults`]); hand-made configs can add congestion episodes (extra
//!   delay, in order). A [`Filter`] can drop chosen frames (planted faults).
//! * **Phases.** Setup (link negotiation, each application's subscription forwarded to its node
//!   and acknowledged, routes between nodes) runs on a clean network; then the faults are on for
//!   the workload ([`scenario::Workload`]); then the network heals and the run settles.
//! * **Time** jumps to the next event: a frame arriving, a workload action, or the earliest
//!   `poll_timeout` of any core.
//! * **Workload** ([`scenario::Workload`], drawn from the seed by [`SimConfig::swarm`]):
//!   applications open p2p sessions (reliable with seeded timers, sometimes best-effort) to other
//!   applications' services, publish on them from either side, send direct messages
//!   (`publish_to`), and close some of them, from either side. In about 30 % of the seeds
//!   ([`Swarm::groups`]) one application also creates a group on a channel, invites the others,
//!   broadcasts, members publish (fan-in), one member may be removed and the group may be closed.
//! * **Channel subscriptions.** A layer's `Output::Subscribe`/`Unsubscribe` is carried out as the
//!   adapters' clients do it: a (un)subscription from the application's local connection with
//!   `forward_to` = the uplink; the node acks it, the client router relays the ack, and the
//!   layer's later outputs wait for that ack (in order). The sim plays the control plane: once
//!   acked, the other nodes get (or lose) a route toward the member's node for the channel.
//!   Subscription frames and their acks are delayed but never lost or duplicated.
//! * **Invariants** are checked as things happen, not only at the end (see [`Sim::step`] and the
//!   model in `model.rs`):
//!   * per reliable session and sender, ids 1, 2, 3, … are each delivered or reported lost
//!     (`MessageLost`) exactly once and in order: a loss replaces a delivery, never reorders or
//!     skips one silently; direct messages are delivered at most once;
//!   * every delivered payload is the one its sender published on that session under that id,
//!     from the peer that joined it;
//!   * a sender learns at most one outcome (`Delivered` or `SendFailed`) per message, only for
//!     messages it published; `publish` returns the next sequence id (0 while queued);
//!   * session events only for sessions the application has, never after `Closed`;
//!   * groups: per (receiver, sender), ids delivered at most once (reliable groups) and, from the
//!     first id the receiver sees, in order, each delivered or reported lost; a stream from a
//!     sender that joined after the receiver starts at 1; payloads are what the sender
//!     published; a removed member receives nothing published after the moderator reported its
//!     removal; the moderator reports one outcome per invite (`MemberJoined` or
//!     `InviteFailed`);
//!   * router gauges (`stats().subscriptions` equals the table's records and the expected count,
//!     `connections` the expected count) and no router or session-layer drops for malformed,
//!     forged, unroutable or looping messages; no connection closed;
//!   * no deadline in the past, every handled deadline moves forward; no livelock (too many
//!     steps at one instant).
//!
//!   After the network heals and the run settles, liveness: every message of a reliable
//!   session that nobody closed (and published while the peer was not reported offline) was
//!   delivered or reported lost or failed, and its sender learned an outcome — nothing vanished
//!   silently; on a network that cannot lose frames, every session opened and everything was
//!   delivered once and acknowledged. Groups: every message published to a member still in the
//!   group (per the sender's own member list then) was delivered or reported lost there, or
//!   failed at the sender, and the sender learned an outcome; **membership agreement**: the
//!   moderator's member list is exactly the clients that have the group open, every member
//!   reports the moderator's list, a removed member was told `Closed(Removed)`.
//! * **MLS** ([`SimConfig::mls`]: ~10 % of the swarm seeds, and the `mls_*` tests): every
//!   session, p2p and group, is end-to-end encrypted, with every invariant above, plus: every
//!   member at an epoch of a group has the epoch authenticator the others had there (after
//!   every step); once settled, the moderator's MLS group is exactly the members and every
//!   member is at its epoch; in half of those seeds a removed member ignores its removal
//!   ([`SimConfig::mls_defiant_removal`]: the group's control messages to it are withheld, so
//!   it keeps its MLS state and its channel subscription) and every data message encrypted at
//!   or after the removal epoch is also handed to it directly: each copy must be refused as
//!   undecryptable, and it may deliver nothing published after its removal completed.
//! * **Replay.** Every [`Failure`] starts with its seed and the command that replays it.
//!   [`Report::trace_hash`] hashes every `(now, host, output)`; two runs of one seed must agree.
//!   With MLS a seed reproduces decisions, not bytes (openmls takes HPKE and signature
//!   randomness from the OS): the trace then hashes what each session message is (type,
//!   session, id, source, destination) instead of its bytes, and events with their plaintext.

mod model;
pub mod scenario;

use std::collections::BTreeMap;
use std::fmt;
use std::hash::Hasher as _;
use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rustc_hash::FxHasher;
use slim_proto::pb::message::MessageType;
use slim_proto::pb::{self, SessionMessageType};
use slim_proto::{Deframer, Name};

use crate::router::{ConnId, ConnectionKind, Output, Router, RouterConfig, RouterEvent};
use crate::session::{self, LayerConfig, SessionConfig, SessionEvent, SessionId, SessionLayer};
use crate::Timestamp;

pub use model::Outcome;
pub use scenario::{
    Action, ClientSpec, Congestion, LinkFaults, Side, SimConfig, Swarm, Window, Workload,
};

use scenario::{STREAM_CORES, STREAM_NETWORK, STREAM_PAYLOADS};

/// The shared secret of the simulated deployment.
pub const SECRET: &str = "slim-simulation-shared-secret-0123456789abcdef";
/// Unix time at `Timestamp::ZERO`, for identity tokens.
pub const UNIX_AT_ZERO: u64 = 1_795_600_000;
/// Steps at one instant before the run is declared livelocked.
pub const LIVELOCK_STEPS: u64 = 200_000;
/// Bound on the setup phase (links, subscriptions, routes) on the clean network.
const SETUP_LIMIT: Duration = Duration::from_secs(10);
/// After the liveness condition holds, the run goes on this long to catch late surprises
/// (duplicate deliveries, outcomes after the fact).
const GRACE: Duration = Duration::from_secs(2);

/// The command that replays a seed.
pub fn replay_command(seed: u64) -> String {
    format!("SIM_SEED={seed} cargo test -p slim-core --test sim")
}

/// A broken invariant (or a core that misbehaved), with everything needed to replay it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub seed: u64,
    /// The command that replays this run.
    pub replay: String,
    pub now: Timestamp,
    pub step: u64,
    pub message: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {} (replay: {}): at t={} ms, step {}: {}",
            self.seed,
            self.replay,
            self.now.as_micros() / 1000,
            self.step,
            self.message
        )
    }
}

impl std::error::Error for Failure {}

/// What a finished run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub seed: u64,
    /// Hash of every `(now, host, output)` of every core, in order.
    pub trace_hash: u64,
    pub steps: u64,
    pub end: Timestamp,
    /// When setup finished and the faults came on.
    pub workload_start: Timestamp,
    pub frames_sent: u64,
    pub frames_dropped: u64,
    pub frames_duplicated: u64,
    pub frames_filtered: u64,
    /// MLS runs: group control frames withheld from removed members that ignore their removal.
    pub frames_withheld: u64,
    /// MLS runs: distinct `(group, epoch)` pairs whose epoch authenticator was compared.
    pub mls_epochs: u64,
    /// MLS runs: copies of data sent after a removal that the removed member's retained MLS
    /// state was given and refused (each must be refused).
    pub removed_refused: u64,
    pub outcome: Outcome,
}

/// A session event as [`Sim::record_events`] keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEvent {
    pub at: Timestamp,
    pub client: usize,
    pub event: SessionEvent,
}

/// A host of the simulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HostId {
    Node(usize),
    Client(usize),
}

/// A frame about to enter the wire, as a [`Filter`] sees it.
pub struct FrameView<'a> {
    pub now: Timestamp,
    pub from: HostId,
    pub to: HostId,
    pub message: &'a pb::Message,
}

impl FrameView<'_> {
    /// Session message type, session id and message id of a session message.
    pub fn session(&self) -> Option<(SessionMessageType, SessionId, u32)> {
        session_info(self.message)
    }
}

/// The session message type, session id and message id of a publish.
pub fn session_info(message: &pb::Message) -> Option<(SessionMessageType, SessionId, u32)> {
    let Some(MessageType::Publish(publish)) = &message.message_type else {
        return None;
    };
    let header = publish.session.as_ref()?;
    let kind = SessionMessageType::try_from(header.session_message_type).ok()?;
    Some((kind, header.session_id, header.message_id))
}

/// Returns `false` to drop a frame (a planted fault). Applied to every frame, in every phase.
pub type Filter = Box<dyn FnMut(&FrameView) -> bool>;

struct NodeHost {
    router: Router,
    /// The node's own local connection, used to install routes toward other nodes.
    local: ConnId,
    pending_acks: u64,
}

struct ClientHost {
    router: Router,
    layer: SessionLayer,
    app: ConnId,
    uplink: ConnId,
    name: Name,
    subscribed: bool,
    /// A channel (un)subscription the layer asked for, forwarded to the node and not yet
    /// acknowledged: `(subscription id, channel, subscribe)`. The layer's later outputs wait.
    awaiting: Option<(u64, Name, bool)>,
    next_sub_id: u64,
    /// Routes the sim installed on the other nodes for this client's channel subscriptions (the
    /// control plane's part: nodes do not propagate subscriptions), per channel.
    channel_routes: BTreeMap<slim_proto::NameKey, Vec<(usize, u64)>>,
}

struct Link {
    /// `ends[d]` sends in direction `d`.
    ends: [(HostId, ConnId); 2],
    faults: [LinkFaults; 2],
    /// Reassembly at the receiving end of direction `d`.
    deframers: [Deframer; 2],
    /// The latest arrival scheduled in direction `d`: a congested direction is a queue.
    last_arrival: [Timestamp; 2],
}

enum Event {
    Deliver {
        link: usize,
        dir: usize,
        frame: Bytes,
    },
    Act(Action),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Setup,
    Workload,
    Settle,
}

/// One simulated deployment.
pub struct Sim {
    seed: u64,
    config: SimConfig,
    now: Timestamp,
    net_rng: ChaCha8Rng,
    payload_rng: ChaCha8Rng,
    nodes: Vec<NodeHost>,
    clients: Vec<ClientHost>,
    links: Vec<Link>,
    endpoints: BTreeMap<(HostId, ConnId), (usize, usize)>,
    queue: BTreeMap<(Timestamp, u64), Event>,
    seq: u64,
    /// Frames on the wire.
    in_flight: u64,
    phase: Phase,
    workload_start: Timestamp,
    filter: Option<Filter>,
    model: model::Model,
    trace: FxHasher,
    steps: u64,
    steps_at_now: u64,
    frames_sent: u64,
    frames_dropped: u64,
    frames_duplicated: u64,
    frames_filtered: u64,
    frames_withheld: u64,
    /// MLS runs: the epoch authenticator of each `(group id, epoch)` and the first client seen
    /// there; every other member at that epoch must have the same.
    mls_epochs: BTreeMap<(Vec<u8>, u64), (Vec<u8>, usize)>,
    /// MLS runs: clients seen in the moderator's MLS group.
    mls_members: std::collections::BTreeSet<usize>,
    /// MLS runs: per member the moderator removed, the first epoch of the group without it.
    removal_epochs: BTreeMap<usize, u64>,
    /// MLS runs: data sent at or after a removal epoch, to give to the removed member that kept
    /// its state: `(removed, sender, epoch, message)`.
    mls_feeds: Vec<(usize, usize, u64, pb::Message)>,
    removed_refused: u64,
    /// Test-only planted bug: ciphertexts one epoch older than a removal count as sent after it.
    plant_stale_removal_epoch: bool,
    /// Expected router subscription records once setup is done, per node and per client.
    expected_records: BTreeMap<HostId, u64>,
    events: Option<Vec<RecordedEvent>>,
    log: bool,
    replay: String,
    /// Channel (un)subscriptions on their way to a node: `(adds, removes)` per node, so its
    /// record count may be off by that much until the ack comes back.
    node_pending: BTreeMap<usize, (u64, u64)>,
    next_route_id: u64,
}

/// Runs one seed with its swarm config: setup, workload, heal, settle, liveness.
pub fn run_seed(seed: u64) -> Result<Report, Failure> {
    Sim::new(seed, SimConfig::swarm(seed)).run()
}

impl Sim {
    pub fn new(seed: u64, config: SimConfig) -> Self {
        let mut core_rng = ChaCha8Rng::seed_from_u64(seed);
        core_rng.set_stream(STREAM_CORES);
        let mut net_rng = ChaCha8Rng::seed_from_u64(seed);
        net_rng.set_stream(STREAM_NETWORK);
        let mut payload_rng = ChaCha8Rng::seed_from_u64(seed);
        payload_rng.set_stream(STREAM_PAYLOADS);
        let now = Timestamp::ZERO;

        let mut nodes: Vec<NodeHost> = (0..config.nodes)
            .map(|i| {
                let mut router = Router::new(
                    RouterConfig {
                        node_id: format!("node-{i}"),
                        ..RouterConfig::default()
                    },
                    core_rng.random(),
                );
                let local = router.attach_local();
                NodeHost {
                    router,
                    local,
                    pending_acks: 0,
                }
            })
            .collect();
        let mut clients: Vec<ClientHost> = config
            .clients
            .iter()
            .enumerate()
            .map(|(j, spec)| {
                let layer = SessionLayer::new(
                    LayerConfig {
                        name: service_name(spec.service),
                        secret: SECRET.into(),
                        unix_at_zero: UNIX_AT_ZERO,
                    },
                    core_rng.random(),
                )
                .expect("the simulation's secret is valid");
                let mut router = Router::new(
                    RouterConfig {
                        node_id: format!("client-{j}"),
                        ..RouterConfig::default()
                    },
                    core_rng.random(),
                );
                let app = router.attach_local();
                ClientHost {
                    name: layer.name().clone(),
                    router,
                    layer,
                    app,
                    uplink: ConnId::MAX,
                    subscribed: false,
                    awaiting: None,
                    next_sub_id: 10_000,
                    channel_routes: BTreeMap::new(),
                }
            })
            .collect();

        let mut links = Vec::new();
        let mut endpoints = BTreeMap::new();
        let mut add_link = |a: (HostId, ConnId), b: (HostId, ConnId), faults: [LinkFaults; 2]| {
            let index = links.len();
            endpoints.insert(a, (index, 0));
            endpoints.insert(b, (index, 1));
            links.push(Link {
                ends: [a, b],
                faults,
                deframers: [Deframer::default(), Deframer::default()],
                last_arrival: [Timestamp::ZERO; 2],
            });
        };
        let mut pair = 0;
        for i in 0..config.nodes {
            for j in i + 1..config.nodes {
                let dialed = nodes[i].router.dial_connection(
                    format!("link-node-{i}-{j}"),
                    config.node_link_kind,
                    now,
                );
                let accepted = nodes[j].router.accept_connection(now);
                add_link(
                    (HostId::Node(i), dialed),
                    (HostId::Node(j), accepted),
                    config.node_links[pair].clone(),
                );
                pair += 1;
            }
        }
        for (j, spec) in config.clients.iter().enumerate() {
            let client = &mut clients[j];
            client.uplink = client.router.dial_connection(
                format!("link-client-{j}"),
                ConnectionKind::Edge,
                now,
            );
            let accepted = nodes[spec.node].router.accept_connection(now);
            add_link(
                (HostId::Client(j), client.uplink),
                (HostId::Node(spec.node), accepted),
                config.client_links[j].clone(),
            );
        }

        let names = clients.iter().map(|c| c.name.clone()).collect();
        let services = config.clients.iter().map(|c| c.service).collect();
        let model = model::Model::new(names, services, config.session_count());
        Sim {
            seed,
            now,
            net_rng,
            payload_rng,
            nodes,
            clients,
            links,
            endpoints,
            queue: BTreeMap::new(),
            seq: 0,
            in_flight: 0,
            phase: Phase::Setup,
            workload_start: now,
            filter: None,
            model,
            trace: FxHasher::default(),
            steps: 0,
            steps_at_now: 0,
            frames_sent: 0,
            frames_dropped: 0,
            frames_duplicated: 0,
            frames_filtered: 0,
            frames_withheld: 0,
            mls_epochs: BTreeMap::new(),
            mls_members: Default::default(),
            removal_epochs: BTreeMap::new(),
            mls_feeds: Vec::new(),
            removed_refused: 0,
            plant_stale_removal_epoch: false,
            expected_records: BTreeMap::new(),
            events: None,
            log: false,
            replay: replay_command(seed),
            node_pending: BTreeMap::new(),
            next_route_id: 1_000_000,
            config,
        }
    }

    /// The replay command failures print: by default [`replay_command`], which replays a
    /// swarm seed; a hand-built scenario names its own test.
    pub fn set_replay(&mut self, command: impl Into<String>) {
        self.replay = command.into();
    }

    /// Installs a planted fault.
    pub fn set_filter(&mut self, filter: Filter) {
        self.filter = Some(filter);
    }

    /// Planted bug, for the test that shows the removal check bites: ciphertexts of the last
    /// epoch a removed member was in, sent after its removal (by a member that has not applied
    /// the removal commit yet), are treated as sent after the removal and given to it.
    #[doc(hidden)]
    pub fn plant_stale_removal_epoch(&mut self) {
        self.plant_stale_removal_epoch = true;
    }

    /// The MLS state of client `client`'s session `session` (MLS runs).
    pub fn mls_state(&self, client: usize, session: SessionId) -> Option<session::MlsState> {
        self.clients[client].layer.mls_state(session)
    }

    /// The run's group session id and moderator, once created.
    pub fn group(&self) -> Option<(SessionId, usize)> {
        self.model.group.as_ref().map(|g| (g.id, g.moderator))
    }

    pub fn now(&self) -> Timestamp {
        self.now
    }

    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    /// The full name (with instance id) of a client.
    pub fn client_name(&self, client: usize) -> &Name {
        &self.clients[client].name
    }

    pub fn outcome(&self) -> Outcome {
        self.model.outcome()
    }

    fn fail(&self, message: impl Into<String>) -> Failure {
        Failure {
            seed: self.seed,
            replay: self.replay.clone(),
            now: self.now,
            step: self.steps,
            message: message.into(),
        }
    }

    /// Prints what happens (actions, frames on the wire, session events) to stderr, stamped
    /// with simulated time: two runs of a seed print the same lines.
    pub fn set_log(&mut self, on: bool) {
        self.log = on;
    }

    fn log(&self, what: impl FnOnce() -> String) {
        if self.log {
            let t = self.now.as_micros();
            eprintln!("{:>6}.{:03} ms  {}", t / 1000, t % 1000, what());
        }
    }

    /// Keeps every session event for [`run_with_events`](Self::run_with_events).
    pub fn record_events(&mut self, on: bool) {
        self.events = on.then(Vec::new);
    }

    /// The session events recorded so far (see [`record_events`](Self::record_events)).
    pub fn take_events(&mut self) -> Vec<RecordedEvent> {
        self.events.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// The whole run: setup on a clean network, the workload with faults, heal, settle,
    /// liveness.
    pub fn run(self) -> Result<Report, Failure> {
        self.run_with_events().map(|(report, _)| report)
    }

    /// [`run`](Self::run), also returning the session events recorded when
    /// [`record_events`](Self::record_events) is on.
    pub fn run_with_events(mut self) -> Result<(Report, Vec<RecordedEvent>), Failure> {
        let report = self.run_phases()?;
        Ok((report, self.events.take().unwrap_or_default()))
    }

    fn run_phases(&mut self) -> Result<Report, Failure> {
        self.setup()?;
        self.start_workload();
        self.run_until(self.heal_time())?;
        self.heal_and_settle()
    }

    /// Phase 2: the faults come on and the workload's actions are scheduled from now on.
    pub fn start_workload(&mut self) {
        self.phase = Phase::Workload;
        self.workload_start = self.now;
        for (offset, action) in std::mem::take(&mut self.config.workload.actions) {
            self.schedule(self.workload_start + offset, Event::Act(action));
        }
    }

    /// When setup finished and the workload started (`Timestamp::ZERO` before).
    pub fn workload_start(&self) -> Timestamp {
        self.workload_start
    }

    /// When the network heals: the end of the workload phase.
    pub fn heal_time(&self) -> Timestamp {
        self.workload_start + self.config.workload.duration
    }

    /// Steps through everything due up to `until`; then the clock reads `until`.
    pub fn run_until(&mut self, until: Timestamp) -> Result<(), Failure> {
        while self.next_time().is_some_and(|t| t <= until) {
            self.step()?;
        }
        self.now = self.now.max(until);
        Ok(())
    }

    /// Phase 3: the faults stop; the run goes on until every message is accounted for (plus a
    /// grace period) or the settle bound; then liveness is judged.
    pub fn heal_and_settle(&mut self) -> Result<Report, Failure> {
        let heal = self.heal_time().max(self.now);
        self.now = heal;
        self.phase = Phase::Settle;
        let bound = heal + self.config.settle;
        let mut quiet_since: Option<Timestamp> = None;
        loop {
            if self.in_flight == 0
                && self.model.all_resolved()
                && self.model.group_unresolved().is_empty()
                && self.check_membership().is_empty()
            {
                quiet_since.get_or_insert(self.now);
            } else {
                quiet_since = None;
            }
            let limit = quiet_since.map_or(bound, |since| bound.min(since + GRACE));
            match self.next_time() {
                Some(t) if t <= limit => {
                    self.step()?;
                }
                _ => break,
            }
        }
        let mut problems = self.model.unresolved();
        problems.extend(self.model.group_unresolved());
        problems.extend(self.check_membership());
        if !problems.is_empty() {
            return Err(self.fail(format!(
                "liveness: {} problem(s) {} after the heal: {}",
                problems.len(),
                humanize(self.now.saturating_since(heal)),
                problems.join("; ")
            )));
        }
        if !self.config.lossy() && self.filter.is_none() {
            let problems = self.model.lossless_problems();
            if !problems.is_empty() {
                return Err(self.fail(format!("lossless network, yet: {}", problems.join("; "))));
            }
        }
        Ok(self.report())
    }

    fn report(&self) -> Report {
        let outcome = self.model.outcome();
        Report {
            seed: self.seed,
            trace_hash: self.trace.finish(),
            steps: self.steps,
            end: self.now,
            workload_start: self.workload_start,
            frames_sent: self.frames_sent,
            frames_dropped: self.frames_dropped,
            frames_duplicated: self.frames_duplicated,
            frames_filtered: self.frames_filtered,
            frames_withheld: self.frames_withheld,
            mls_epochs: self.mls_epochs.len() as u64,
            removed_refused: self.removed_refused,
            outcome,
        }
    }

    /// Phase 1, on the clean network: links, then each application's subscription and the
    /// routes between nodes.
    pub fn setup(&mut self) -> Result<(), Failure> {
        for i in 0..self.nodes.len() {
            self.drain(HostId::Node(i))?;
        }
        for j in 0..self.clients.len() {
            self.drain(HostId::Client(j))?;
        }
        let limit = self.now + SETUP_LIMIT;
        while !self.links.iter().all(|l| {
            l.ends
                .iter()
                .all(|(host, conn)| self.router(*host).is_established(*conn))
        }) {
            if self.next_time().is_none_or(|t| t > limit) || !self.step()? {
                return Err(self.fail("setup: links did not come up on the clean network"));
            }
        }
        // Each application subscribes its name through its uplink (as the adapters' clients do);
        // nodes route the other nodes' clients over the node links (nodes do not propagate
        // subscriptions to each other yet).
        for j in 0..self.clients.len() {
            let client = &self.clients[j];
            let subscribe = subscribe_message(
                &client.name,
                &client.name,
                j as u64 + 1,
                Some(client.uplink),
                None,
            );
            self.expected_records.insert(HostId::Client(j), 1);
            let node = self.config.clients[j].node;
            *self.expected_records.entry(HostId::Node(node)).or_insert(0) += 1;
            let (app, now) = (client.app, self.now);
            self.hash_app_frame(HostId::Client(j), &subscribe);
            self.clients[j]
                .router
                .handle_frame(app, subscribe.encode_to_vec().into(), now);
            self.drain(HostId::Client(j))?;
        }
        for i in 0..self.nodes.len() {
            let me = Name::new("org", "sim", &format!("node-{i}"));
            for j in 0..self.clients.len() {
                let home = self.config.clients[j].node;
                if home == i {
                    continue;
                }
                let toward = self
                    .links
                    .iter()
                    .find_map(|l| match l.ends {
                        [(HostId::Node(a), conn), (HostId::Node(b), _)] if a == i && b == home => {
                            Some(conn)
                        }
                        [(HostId::Node(a), _), (HostId::Node(b), conn)] if b == i && a == home => {
                            Some(conn)
                        }
                        _ => None,
                    })
                    .expect("nodes are fully meshed");
                let name = self.clients[j].name.clone();
                let subscribe = subscribe_message(&me, &name, 1000 + j as u64, None, Some(toward));
                *self.expected_records.entry(HostId::Node(i)).or_insert(0) += 1;
                self.nodes[i].pending_acks += 1;
                let (local, now) = (self.nodes[i].local, self.now);
                self.hash_app_frame(HostId::Node(i), &subscribe);
                self.nodes[i]
                    .router
                    .handle_frame(local, subscribe.encode_to_vec().into(), now);
                self.drain(HostId::Node(i))?;
            }
        }
        while !(self.clients.iter().all(|c| c.subscribed)
            && self.nodes.iter().all(|n| n.pending_acks == 0))
        {
            if self.next_time().is_none_or(|t| t > limit) || !self.step()? {
                return Err(
                    self.fail("setup: subscriptions were not acknowledged on the clean network")
                );
            }
        }
        for host in self.hosts() {
            self.check_router(host)?;
        }
        Ok(())
    }

    fn hosts(&self) -> Vec<HostId> {
        (0..self.nodes.len())
            .map(HostId::Node)
            .chain((0..self.clients.len()).map(HostId::Client))
            .collect()
    }

    fn router(&self, host: HostId) -> &Router {
        match host {
            HostId::Node(i) => &self.nodes[i].router,
            HostId::Client(j) => &self.clients[j].router,
        }
    }

    /// A host's next deadline (router and session layer).
    fn host_timeout(&self, host: HostId) -> Option<Timestamp> {
        match host {
            HostId::Node(i) => self.nodes[i].router.poll_timeout().map(|(t, _)| t),
            HostId::Client(j) => {
                let c = &self.clients[j];
                [
                    c.router.poll_timeout().map(|(t, _)| t),
                    c.layer.poll_timeout(),
                ]
                .into_iter()
                .flatten()
                .min()
            }
        }
    }

    fn next_timer(&self) -> Option<(Timestamp, HostId)> {
        self.hosts()
            .into_iter()
            .filter_map(|h| self.host_timeout(h).map(|t| (t, h)))
            .min()
    }

    fn next_time(&self) -> Option<Timestamp> {
        let event = self.queue.first_key_value().map(|((t, _), _)| *t);
        let timer = self.next_timer().map(|(t, _)| t);
        [event, timer].into_iter().flatten().min()
    }

    fn schedule(&mut self, at: Timestamp, event: Event) {
        self.seq += 1;
        self.queue.insert((at, self.seq), event);
    }

    /// One step: the earliest frame arrival, workload action or deadline (events first on a
    /// tie). Returns `false` when nothing is left to do. Invariants are checked before it returns.
    pub fn step(&mut self) -> Result<bool, Failure> {
        let event_at = self.queue.first_key_value().map(|((t, _), _)| *t);
        let timer = self.next_timer();
        let (at, host) = match (event_at, timer) {
            (None, None) => return Ok(false),
            (Some(e), Some((t, host))) if t < e => (t, Some(host)),
            (None, Some((t, host))) => (t, Some(host)),
            (Some(e), _) => (e, None),
        };
        if at < self.now {
            return Err(self.fail(format!(
                "time would go back: next event at {} µs, now {} µs",
                at.as_micros(),
                self.now.as_micros()
            )));
        }
        self.steps += 1;
        if at == self.now {
            self.steps_at_now += 1;
            if self.steps_at_now > LIVELOCK_STEPS {
                return Err(self.fail(format!(
                    "livelock: {LIVELOCK_STEPS} steps without time moving (next: {})",
                    match host {
                        Some(h) => format!("deadline of {h:?}"),
                        None => "a queued event".into(),
                    }
                )));
            }
        } else {
            self.now = at;
            self.steps_at_now = 0;
        }
        let touched = match host {
            Some(host) => {
                self.timeout(host)?;
                host
            }
            None => {
                let (_, event) = self.queue.pop_first().expect("peeked");
                match event {
                    Event::Deliver { link, dir, frame } => {
                        self.in_flight -= 1;
                        self.deliver(link, dir, frame)?
                    }
                    Event::Act(action) => self.act(action)?,
                }
            }
        };
        self.check_router(touched)?;
        self.check_session_stats(touched)?;
        if self.config.mls {
            self.check_mls(touched)?;
        }
        for h in self.hosts() {
            if let Some(t) = self.host_timeout(h) {
                if t < self.now {
                    return Err(self.fail(format!(
                        "{h:?} asks to be woken at {} µs, in the past (now {} µs)",
                        t.as_micros(),
                        self.now.as_micros()
                    )));
                }
            }
        }
        Ok(true)
    }

    fn timeout(&mut self, host: HostId) -> Result<(), Failure> {
        let now = self.now;
        self.trace_write(host, b"timeout", &[]);
        match host {
            HostId::Node(i) => self.nodes[i].router.handle_timeout(now),
            HostId::Client(j) => {
                self.clients[j].router.handle_timeout(now);
                self.clients[j].layer.handle_timeout(now);
            }
        }
        self.drain(host)?;
        // A handled deadline must move forward (sansio.md §5.1 rule 4), else the driver spins.
        let (router, layer) = match host {
            HostId::Node(i) => (self.nodes[i].router.poll_timeout().map(|(t, _)| t), None),
            HostId::Client(j) => (
                self.clients[j].router.poll_timeout().map(|(t, _)| t),
                self.clients[j].layer.poll_timeout(),
            ),
        };
        for (core, deadline) in [("router", router), ("session layer", layer)] {
            if let Some(t) = deadline.filter(|t| *t <= now) {
                return Err(self.fail(format!(
                    "{host:?}: {core} deadline {} µs not moved past now after handle_timeout",
                    t.as_micros()
                )));
            }
        }
        Ok(())
    }

    fn deliver(&mut self, link: usize, dir: usize, frame: Bytes) -> Result<HostId, Failure> {
        let (host, conn) = self.links[link].ends[1 - dir];
        self.links[link].deframers[dir].push(&frame);
        loop {
            let body = match self.links[link].deframers[dir].next_frame() {
                Ok(Some(body)) => body,
                Ok(None) => break,
                Err(error) => {
                    return Err(self.fail(format!("{host:?}: undecodable frame: {error}")))
                }
            };
            let now = self.now;
            if self.config.mls {
                let digest = pb::Message::decode(body.clone())
                    .map_or_else(|_| body.to_vec(), |m| mls_digest(&m));
                self.trace_write(host, b"frame", &digest);
            } else {
                self.trace_write(host, b"frame", &body);
            }
            match host {
                HostId::Node(i) => self.nodes[i].router.handle_frame(conn, body, now),
                HostId::Client(j) => self.clients[j].router.handle_frame(conn, body, now),
            }
            self.drain(host)?;
        }
        Ok(host)
    }

    fn act(&mut self, action: Action) -> Result<HostId, Failure> {
        let now = self.now;
        self.log(|| match action_session(&action) {
            Some(session) => format!(
                "action {action:?} (endpoints {:?} / {:?})",
                self.model.endpoint(session, Side::Initiator),
                self.model.endpoint(session, Side::Participant)
            ),
            None => format!("action {action:?}"),
        });
        let mut touched = HostId::Node(0);
        match action {
            Action::Open {
                session,
                client,
                service,
                reliability,
            } => {
                let config = SessionConfig {
                    reliability,
                    metadata: BTreeMap::new(),
                    mls: self.config.mls,
                };
                let id =
                    self.clients[client]
                        .layer
                        .create_session(&service_name(service), config, now);
                self.model
                    .opened(session, client, service, reliability.is_some(), id)
                    .map_err(|e| self.fail(e))?;
                touched = HostId::Client(client);
                self.drain(touched)?;
            }
            Action::Publish {
                session,
                side,
                count,
            } => {
                let Some((client, id)) = self.model.endpoint(session, side) else {
                    return Ok(touched);
                };
                touched = HostId::Client(client);
                for n in 0..count {
                    let payload = self.payload(session, side, n);
                    let result = self.clients[client].layer.publish(id, payload.clone(), now);
                    if !self.closed_unseen(client, &result) {
                        self.model
                            .published(session, side, payload, result)
                            .map_err(|e| self.fail(e))?;
                    }
                    self.drain(touched)?;
                }
            }
            Action::PublishTo {
                session,
                side,
                by_service,
            } => {
                let Some((client, id)) = self.model.endpoint(session, side) else {
                    return Ok(touched);
                };
                let Some((peer, _)) = self.model.endpoint(session, side.other()) else {
                    return Ok(touched);
                };
                touched = HostId::Client(client);
                let mut to = self.clients[peer].name.clone();
                if by_service {
                    to = to.with_instance(slim_proto::name::ANY_INSTANCE);
                }
                let payload = self.payload(session, side, u32::MAX);
                let result = self.clients[client]
                    .layer
                    .publish_to(id, &to, payload.clone(), now);
                if !self.closed_unseen(client, &result) {
                    self.model
                        .published_direct(session, side, payload, result)
                        .map_err(|e| self.fail(e))?;
                }
                self.drain(touched)?;
            }
            Action::Close { session, side } => {
                let Some((client, id)) = self.model.endpoint(session, side) else {
                    return Ok(touched);
                };
                touched = HostId::Client(client);
                let result = self.clients[client].layer.close(id, now);
                if !self.closed_unseen(client, &result) {
                    self.model
                        .close_requested(session, side, result)
                        .map_err(|e| self.fail(e))?;
                }
                self.drain(touched)?;
            }
            Action::GroupCreate {
                client,
                reliability,
            } => {
                let config = SessionConfig {
                    reliability,
                    metadata: BTreeMap::new(),
                    mls: self.config.mls,
                };
                let channel = group_channel();
                let id = self.clients[client]
                    .layer
                    .create_group(&channel, config, now);
                self.model
                    .group_created(client, id, reliability.is_some())
                    .map_err(|e| self.fail(e))?;
                touched = HostId::Client(client);
                self.drain(touched)?;
            }
            Action::GroupInvite { member } => {
                let Some((moderator, id)) = self.model.group.as_ref().map(|g| (g.moderator, g.id))
                else {
                    return Ok(touched);
                };
                touched = HostId::Client(moderator);
                let invitee = service_name(self.config.clients[member].service);
                match self.clients[moderator].layer.invite(id, &invitee, now) {
                    Ok(()) => {
                        let g = self.model.group.as_mut().expect("checked");
                        *g.invited.entry(member).or_default() += 1;
                    }
                    Err(
                        session::SessionError::UnknownSession(_)
                        | session::SessionError::Closing(_),
                    ) => {}
                    Err(error) => return Err(self.fail(format!("invite refused: {error}"))),
                }
                self.drain(touched)?;
            }
            Action::GroupPublish { client, count } => {
                let Some(id) = self
                    .model
                    .group
                    .as_ref()
                    .filter(|g| g.open(client) && !g.remove_requested.contains(&client))
                    .map(|g| g.id)
                else {
                    return Ok(touched);
                };
                touched = HostId::Client(client);
                for n in 0..count {
                    let payload = self.group_payload(client, n);
                    let members = self.clients[client].layer.members(id).unwrap_or_default();
                    let rejoining = self.clients[client].layer.mls_rejoining(id);
                    let result = self.clients[client].layer.publish(id, payload.clone(), now);
                    let held = self.clients[client].awaiting.is_some();
                    self.model
                        .group_published(client, payload, &members, held, rejoining, result)
                        .map_err(|e| self.fail(e))?;
                    self.drain(touched)?;
                }
            }
            Action::GroupRemove { member } => {
                let Some((moderator, id)) = self
                    .model
                    .group
                    .as_ref()
                    .filter(|g| g.open(g.moderator) && !g.close_requested)
                    .map(|g| (g.moderator, g.id))
                else {
                    return Ok(touched);
                };
                touched = HostId::Client(moderator);
                let name = self.clients[member].name.clone();
                match self.clients[moderator].layer.remove(id, &name, now) {
                    Ok(()) => {
                        let g = self.model.group.as_mut().expect("checked");
                        g.remove_requested.insert(member);
                    }
                    // Not (yet) a member: the invite has not completed.
                    Err(session::SessionError::NotAMember(..)) => {}
                    Err(error) => return Err(self.fail(format!("remove refused: {error}"))),
                }
                self.drain(touched)?;
            }
            Action::GroupClose => {
                let Some((moderator, id)) = self
                    .model
                    .group
                    .as_ref()
                    .filter(|g| g.open(g.moderator))
                    .map(|g| (g.moderator, g.id))
                else {
                    return Ok(touched);
                };
                touched = HostId::Client(moderator);
                match self.clients[moderator].layer.close(id, now) {
                    Ok(()) | Err(session::SessionError::Closing(_)) => {
                        self.model.group.as_mut().expect("checked").close_requested = true;
                    }
                    Err(error) => return Err(self.fail(format!("group close refused: {error}"))),
                }
                self.drain(touched)?;
            }
        }
        Ok(touched)
    }

    /// The layer no longer has the session, but its `Closed` is still queued behind a channel
    /// (un)subscription the driver carries out first (this client joins or leaves a group):
    /// the model learns of the close when the event comes out.
    fn closed_unseen<T>(&self, client: usize, result: &Result<T, session::SessionError>) -> bool {
        matches!(result, Err(session::SessionError::UnknownSession(_)))
            && self.clients[client].awaiting.is_some()
    }

    /// A group payload that names its sender, with seeded filler.
    fn group_payload(&mut self, client: usize, n: u32) -> Bytes {
        let filler = self.payload_rng.random_range(0..256usize);
        let mut payload = format!("g/{client}/{n}/").into_bytes();
        payload.extend((0..filler).map(|_| self.payload_rng.random::<u8>()));
        Bytes::from(payload)
    }

    /// Membership agreement, once the network healed and the run settled: the moderator and
    /// every member still in the group report the same member set (exactly those clients); a
    /// removed member was told `Closed(Removed)`.
    fn check_membership(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let Some(g) = &self.model.group else {
            return problems;
        };
        if g.close_requested || !g.open(g.moderator) {
            return problems;
        }
        let Some(reference) = self.clients[g.moderator].layer.members(g.id) else {
            problems.push(format!("group {}: the moderator has no member list", g.id));
            return problems;
        };
        let key_set = |names: Vec<Name>| -> std::collections::BTreeSet<slim_proto::NameKey> {
            names.iter().map(Name::key).collect()
        };
        let reference = key_set(reference);
        let open: std::collections::BTreeSet<slim_proto::NameKey> = (0..self.clients.len())
            .filter(|c| g.open(*c))
            .map(|c| self.clients[c].name.key())
            .collect();
        if reference != open {
            problems.push(format!(
                "group {}: the moderator's members {:?} are not the clients that have the group open {:?}",
                g.id,
                self.member_indices(&reference),
                self.member_indices(&open)
            ));
        }
        for c in (0..self.clients.len()).filter(|c| g.open(*c) && *c != g.moderator) {
            let mine = key_set(self.clients[c].layer.members(g.id).unwrap_or_default());
            if mine != reference {
                problems.push(format!(
                    "group {}: client {c} reports members {:?}, the moderator {:?}",
                    g.id,
                    self.member_indices(&mine),
                    self.member_indices(&reference)
                ));
            }
        }
        if self.config.mls {
            self.check_mls_membership(&mut problems);
        }
        for &removed in g.removed.keys() {
            let closed = &g.members[removed].closed;
            if g.members[removed].joined
                && !g.members[removed].defiant
                && *closed != Some(session::CloseReason::Removed)
            {
                problems.push(format!(
                    "group {}: client {removed} was removed but was told {closed:?}",
                    g.id
                ));
            }
        }
        problems
    }

    /// MLS runs, after every step: (a) every member at an epoch of a group has the epoch
    /// authenticator every other member had there (checked for the host the step touched: only
    /// its state can have changed); removals are noted when the moderator's MLS group loses
    /// the member; (b) the data sent after a removal, given to a removed member that kept its
    /// state, is refused, every copy.
    fn check_mls(&mut self, touched: HostId) -> Result<(), Failure> {
        if let HostId::Client(j) = touched {
            let mut sessions: Vec<SessionId> = self.model.sessions_of(j).collect();
            let group = self.model.group.as_ref().map(|g| (g.id, g.moderator));
            sessions.extend(group.map(|(id, _)| id));
            for id in sessions {
                let Some(state) = self.clients[j].layer.mls_state(id) else {
                    continue;
                };
                let key = (state.group_id, state.epoch);
                match self.mls_epochs.get(&key) {
                    None => {
                        self.mls_epochs.insert(key, (state.epoch_authenticator, j));
                    }
                    Some((authenticator, first)) if *authenticator != state.epoch_authenticator => {
                        return Err(self.fail(format!(
                            "MLS: client {j}, session {id}, epoch {}: epoch authenticator {} differs from client {first}'s {} at that epoch",
                            key.1,
                            hex(&state.epoch_authenticator),
                            hex(authenticator)
                        )));
                    }
                    Some(_) => {}
                }
            }
            if let Some((id, moderator)) = group.filter(|(_, m)| *m == j) {
                self.note_removals(id, moderator);
            }
        }
        self.feed_removed()
    }

    /// The moderator's MLS group lost a member it was asked to remove: the removal commit is
    /// made, and its epoch is the first the removed member must not read.
    fn note_removals(&mut self, id: SessionId, moderator: usize) {
        let Some(state) = self.clients[moderator].layer.mls_state(id) else {
            return;
        };
        let Some(g) = self.model.group.as_mut() else {
            return;
        };
        for (c, client) in self.clients.iter().enumerate() {
            if c == moderator {
                continue;
            }
            if state.members.contains(&client.name.id()) {
                self.mls_members.insert(c);
            } else if self.mls_members.contains(&c)
                && g.remove_requested.contains(&c)
                && !self.removal_epochs.contains_key(&c)
            {
                self.removal_epochs.insert(c, state.epoch);
                if self.config.mls_defiant_removal && g.members[c].closed.is_none() {
                    g.members[c].defiant = true;
                }
            }
        }
    }

    /// A data message of the group a client just sent: kept for every removed member that
    /// kept its MLS state if it was encrypted at or after the member's removal epoch.
    fn capture_post_removal(&mut self, sender: usize, message: &pb::Message) {
        let Some(g) = self.model.group.as_ref() else {
            return;
        };
        if !matches!(session_info(message), Some((SessionMessageType::Msg | SessionMessageType::RtxReply, session, _)) if session == g.id)
        {
            return;
        }
        let Some(epoch) = message
            .app_payload()
            .and_then(|app| crate::group::wire::inspect(&app.blob).ok())
            .and_then(|info| info.epoch)
        else {
            return;
        };
        let slack = u64::from(self.plant_stale_removal_epoch);
        for (&removed, &at) in &self.removal_epochs {
            if removed != sender && g.members[removed].defiant && epoch + slack >= at {
                self.mls_feeds
                    .push((removed, sender, epoch, message.clone()));
            }
        }
    }

    /// Gives the removed members their copies of what was sent after their removal, straight
    /// to their session layer (as if the network delivered one more copy): each must be
    /// refused as undecryptable, and nothing may come of it.
    fn feed_removed(&mut self) -> Result<(), Failure> {
        for (removed, sender, epoch, message) in std::mem::take(&mut self.mls_feeds) {
            let refused = |sim: &Self| {
                sim.clients[removed]
                    .layer
                    .stats()
                    .dropped(session::SessionDrop::Undecryptable)
            };
            let before = refused(self);
            let now = self.now;
            self.clients[removed].layer.handle_message(message, now);
            if refused(self) != before + 1 {
                let at = self
                    .removal_epochs
                    .get(&removed)
                    .copied()
                    .unwrap_or_default();
                let id = self.model.group.as_ref().map_or(0, |g| g.id);
                let own = self.clients[removed].layer.mls_state(id).map(|s| s.epoch);
                return Err(self.fail(format!(
                    "MLS: client {removed}, removed from group {id} (removal epoch {at}; its state at epoch {own:?}), \
                     did not refuse a data message client {sender} encrypted at epoch {epoch}: a removed member must not decrypt what is sent after its removal"
                )));
            }
            self.removed_refused += 1;
            self.drain(HostId::Client(removed))?;
        }
        Ok(())
    }

    /// MLS runs: a frame toward a removed member that ignores its removal is withheld if it is
    /// a control message of the group (its removal commit, its leave request, later updates);
    /// the group's data still reaches it.
    fn withheld(&self, link: usize, dir: usize, frame: &Bytes) -> bool {
        if !self.config.mls_defiant_removal || self.removal_epochs.is_empty() {
            return false;
        }
        let (HostId::Client(to), _) = self.links[link].ends[1 - dir] else {
            return false;
        };
        let Some(g) = self.model.group.as_ref().filter(|g| g.members[to].defiant) else {
            return false;
        };
        decode_frame(frame).is_some_and(|m| {
            matches!(session_info(&m), Some((kind, session, _))
                if session == g.id && !matches!(kind, SessionMessageType::Msg | SessionMessageType::RtxReply))
        })
    }

    /// MLS runs, once settled: the moderator's MLS group has exactly the clients that have the
    /// group open, and every one of them is at the moderator's epoch.
    fn check_mls_membership(&self, problems: &mut Vec<String>) {
        let Some(g) = &self.model.group else {
            return;
        };
        let Some(reference) = self.clients[g.moderator].layer.mls_state(g.id) else {
            problems.push(format!("group {}: the moderator has no MLS group", g.id));
            return;
        };
        let open: Vec<usize> = (0..self.clients.len()).filter(|c| g.open(*c)).collect();
        let expected: std::collections::BTreeSet<u128> =
            open.iter().map(|c| self.clients[*c].name.id()).collect();
        let actual: std::collections::BTreeSet<u128> = reference.members.iter().copied().collect();
        if actual != expected {
            let who = |ids: &std::collections::BTreeSet<u128>| -> Vec<String> {
                ids.iter()
                    .map(|id| {
                        self.clients
                            .iter()
                            .position(|c| c.name.id() == *id)
                            .map_or_else(|| format!("{id:x}"), |c| c.to_string())
                    })
                    .collect()
            };
            problems.push(format!(
                "group {}: the moderator's MLS group has {:?}, the clients that have the group open are {:?}",
                g.id,
                who(&actual),
                who(&expected)
            ));
        }
        for &c in open.iter().filter(|c| **c != g.moderator) {
            match self.clients[c].layer.mls_state(g.id) {
                Some(state) if state.epoch == reference.epoch => {}
                other => problems.push(format!(
                    "group {}: client {c} is at MLS epoch {:?}, the moderator at {}",
                    g.id,
                    other.map(|s| s.epoch),
                    reference.epoch
                )),
            }
        }
    }

    fn member_indices(
        &self,
        keys: &std::collections::BTreeSet<slim_proto::NameKey>,
    ) -> Vec<String> {
        keys.iter()
            .map(|k| {
                self.clients
                    .iter()
                    .position(|c| c.name.key() == *k)
                    .map_or_else(|| format!("{k:?}"), |c| c.to_string())
            })
            .collect()
    }

    /// A payload that names its session and side, with seeded filler so sizes vary.
    fn payload(&mut self, session: usize, side: Side, n: u32) -> Bytes {
        let filler = self.payload_rng.random_range(0..256usize);
        let mut payload = format!("s{session}/{side:?}/{n}/").into_bytes();
        payload.extend((0..filler).map(|_| self.payload_rng.random::<u8>()));
        Bytes::from(payload)
    }

    /// Carries out a host's outputs until its cores are quiet.
    fn drain(&mut self, host: HostId) -> Result<(), Failure> {
        match host {
            HostId::Node(i) => {
                while let Some(output) = self.nodes[i].router.poll_output() {
                    self.trace_output(host, &output);
                    match output {
                        Output::Deliver { conn, message } if conn == self.nodes[i].local => {
                            self.node_local(i, *message)?;
                        }
                        Output::Transmit { conn, frame } => self.transmit(host, conn, frame)?,
                        other => self.router_event(host, other)?,
                    }
                }
                Ok(())
            }
            HostId::Client(j) => {
                let mut rounds = 0u64;
                loop {
                    rounds += 1;
                    if rounds > LIVELOCK_STEPS {
                        return Err(self.fail(format!(
                            "livelock: {host:?}'s router and session layer keep feeding each other"
                        )));
                    }
                    let mut moved = false;
                    while let Some(output) = self.clients[j].router.poll_output() {
                        moved = true;
                        self.trace_output(host, &output);
                        match output {
                            Output::Deliver { conn, message } if conn == self.clients[j].app => {
                                self.client_local(j, *message)?;
                            }
                            Output::Transmit { conn, frame } => self.transmit(host, conn, frame)?,
                            other => self.router_event(host, other)?,
                        }
                    }
                    while self.clients[j].awaiting.is_none() {
                        let Some(output) = self.clients[j].layer.poll_output() else {
                            break;
                        };
                        moved = true;
                        match output {
                            session::Output::Send(message) => {
                                if !self.removal_epochs.is_empty() {
                                    self.capture_post_removal(j, &message);
                                }
                                let body = Bytes::from(message.encode_to_vec());
                                if self.config.mls {
                                    let digest = mls_digest(&message);
                                    self.trace_write(host, b"send", &digest);
                                } else {
                                    self.trace_write(host, b"send", &body);
                                }
                                let (app, now) = (self.clients[j].app, self.now);
                                self.clients[j].router.handle_frame(app, body, now);
                            }
                            session::Output::Event(event) => {
                                self.log(|| format!("client {j}: {event:?}"));
                                self.trace_event(host, &event);
                                self.model
                                    .on_event(j, &event, self.now)
                                    .map_err(|e| self.fail(e))?;
                                if let Some(events) = self.events.as_mut() {
                                    events.push(RecordedEvent {
                                        at: self.now,
                                        client: j,
                                        event,
                                    });
                                }
                            }
                            session::Output::Subscribe(channel) => {
                                self.channel_subscription(j, channel, true)?;
                            }
                            session::Output::Unsubscribe(channel) => {
                                self.channel_subscription(j, channel, false)?;
                            }
                        }
                    }
                    if !moved {
                        return Ok(());
                    }
                }
            }
        }
    }

    fn node_local(&mut self, node: usize, message: pb::Message) -> Result<(), Failure> {
        match message.message_type {
            Some(MessageType::SubscriptionAck(ack))
                if ack.success && self.nodes[node].pending_acks > 0 =>
            {
                self.nodes[node].pending_acks -= 1;
                Ok(())
            }
            other => Err(self.fail(format!(
                "node {node}: unexpected message on its local connection: {other:?}"
            ))),
        }
    }

    fn client_local(&mut self, client: usize, message: pb::Message) -> Result<(), Failure> {
        match &message.message_type {
            Some(MessageType::SubscriptionAck(ack)) => {
                let awaited = self.clients[client]
                    .awaiting
                    .as_ref()
                    .is_some_and(|(id, ..)| *id == ack.subscription_id);
                if ack.success && awaited {
                    return self.channel_acked(client);
                }
                if !ack.success
                    || self.clients[client].subscribed
                    || ack.subscription_id != client as u64 + 1
                {
                    return Err(self.fail(format!(
                        "client {client}: unexpected subscription ack {ack:?}"
                    )));
                }
                self.clients[client].subscribed = true;
                Ok(())
            }
            Some(MessageType::Publish(_)) => {
                let now = self.now;
                self.clients[client].layer.handle_message(message, now);
                Ok(())
            }
            other => Err(self.fail(format!(
                "client {client}: unexpected message for the application: {other:?}"
            ))),
        }
    }

    /// Carries out a layer's `Subscribe`/`Unsubscribe` as the adapters' clients do: from the
    /// application's local connection with `forward_to` = the uplink; the node acks it and the
    /// client router relays the ack. The layer's next outputs wait for that ack.
    fn channel_subscription(
        &mut self,
        client: usize,
        channel: Name,
        subscribe: bool,
    ) -> Result<(), Failure> {
        let c = &mut self.clients[client];
        c.next_sub_id += 1;
        let sub_id = c.next_sub_id;
        let mut message = subscribe_message(&c.name, &channel, sub_id, Some(c.uplink), None);
        if !subscribe {
            let Some(MessageType::Subscribe(s)) = message.message_type.take() else {
                unreachable!("built above")
            };
            message.message_type = Some(MessageType::Unsubscribe(pb::Unsubscribe {
                header: s.header,
                subscription_id: s.subscription_id,
            }));
        }
        c.awaiting = Some((sub_id, channel.clone(), subscribe));
        let host = HostId::Client(client);
        let records = self.expected_records.entry(host).or_insert(0);
        let node = self.config.clients[client].node;
        let pending = self.node_pending.entry(node).or_insert((0, 0));
        if subscribe {
            *records += 1;
            pending.0 += 1;
        } else {
            *records = records.saturating_sub(1);
            pending.1 += 1;
        }
        self.log(|| {
            format!(
                "client {client}: {} {channel}",
                if subscribe {
                    "subscribe"
                } else {
                    "unsubscribe"
                }
            )
        });
        self.hash_app_frame(host, &message);
        let (app, now) = (self.clients[client].app, self.now);
        self.clients[client]
            .router
            .handle_frame(app, message.encode_to_vec().into(), now);
        Ok(())
    }

    /// The node acknowledged a channel (un)subscription: its record count is settled, and the
    /// other nodes get (or lose) a route toward the client's node for the channel.
    fn channel_acked(&mut self, client: usize) -> Result<(), Failure> {
        let (_, channel, subscribe) = self.clients[client]
            .awaiting
            .take()
            .expect("checked by the caller");
        let home = self.config.clients[client].node;
        let pending = self.node_pending.entry(home).or_insert((0, 0));
        let records = self.expected_records.entry(HostId::Node(home)).or_insert(0);
        if subscribe {
            pending.0 -= 1;
            *records += 1;
        } else {
            pending.1 -= 1;
            *records = records.saturating_sub(1);
        }
        let key = channel.key();
        if subscribe {
            let mut routes = Vec::new();
            for i in (0..self.nodes.len()).filter(|i| *i != home) {
                self.next_route_id += 1;
                let id = self.next_route_id;
                let toward = self.node_link(i, home);
                let me = Name::new("org", "sim", &format!("node-{i}"));
                let message = subscribe_message(&me, &channel, id, None, Some(toward));
                self.node_control(i, message, 1)?;
                routes.push((i, id));
            }
            self.clients[client]
                .channel_routes
                .entry(key)
                .or_default()
                .extend(routes);
        } else {
            let routes = self.clients[client]
                .channel_routes
                .remove(&key)
                .unwrap_or_default();
            for (i, id) in routes {
                let toward = self.node_link(i, home);
                let me = Name::new("org", "sim", &format!("node-{i}"));
                let mut message = subscribe_message(&me, &channel, id, None, Some(toward));
                let Some(MessageType::Subscribe(s)) = message.message_type.take() else {
                    unreachable!("built above")
                };
                message.message_type = Some(MessageType::Unsubscribe(pb::Unsubscribe {
                    header: s.header,
                    subscription_id: s.subscription_id,
                }));
                self.node_control(i, message, -1)?;
            }
        }
        Ok(())
    }

    /// The connection of node `i` toward node `home`.
    fn node_link(&self, i: usize, home: usize) -> ConnId {
        self.links
            .iter()
            .find_map(|l| match l.ends {
                [(HostId::Node(a), conn), (HostId::Node(b), _)] if a == i && b == home => {
                    Some(conn)
                }
                [(HostId::Node(a), _), (HostId::Node(b), conn)] if b == i && a == home => {
                    Some(conn)
                }
                _ => None,
            })
            .expect("nodes are fully meshed")
    }

    /// A (un)subscription from node `i`'s own local connection (the control plane's part).
    fn node_control(&mut self, i: usize, message: pb::Message, delta: i64) -> Result<(), Failure> {
        let records = self.expected_records.entry(HostId::Node(i)).or_insert(0);
        *records = records.saturating_add_signed(delta);
        self.nodes[i].pending_acks += 1;
        let (local, now) = (self.nodes[i].local, self.now);
        self.hash_app_frame(HostId::Node(i), &message);
        self.nodes[i]
            .router
            .handle_frame(local, message.encode_to_vec().into(), now);
        self.drain(HostId::Node(i))
    }

    fn router_event(&mut self, host: HostId, output: Output) -> Result<(), Failure> {
        match output {
            Output::Event(RouterEvent::LinkEstablished { .. }) => Ok(()),
            Output::Close { conn, code, reason } => Err(self.fail(format!(
                "{host:?} closed connection {conn} (grpc-status {code}): {reason}"
            ))),
            Output::Event(RouterEvent::ConnectionRemoved { conn, .. }) => {
                Err(self.fail(format!("{host:?} removed connection {conn}")))
            }
            Output::Transmit { .. } => unreachable!("handled by drain"),
            Output::Deliver { conn, .. } => Err(self.fail(format!(
                "{host:?} delivered to connection {conn}, which is no local app"
            ))),
        }
    }

    /// A frame enters the wire: filter, then (while faults are on) partitions, loss,
    /// duplication and jitter.
    fn transmit(&mut self, from: HostId, conn: ConnId, frame: Bytes) -> Result<(), Failure> {
        let Some(&(link, dir)) = self.endpoints.get(&(from, conn)) else {
            return Err(self.fail(format!(
                "{from:?} transmits on connection {conn}, which is no link"
            )));
        };
        self.frames_sent += 1;
        if self.withheld(link, dir, &frame) {
            self.frames_withheld += 1;
            return Ok(());
        }
        if let Some(filter) = self.filter.as_mut() {
            let mut deframer = Deframer::default();
            deframer.push(&frame);
            let message = deframer
                .next_frame()
                .ok()
                .flatten()
                .and_then(|body| pb::Message::decode(body).ok());
            if let Some(message) = message {
                let view = FrameView {
                    now: self.now,
                    from,
                    to: self.links[link].ends[1 - dir].0,
                    message: &message,
                };
                if !filter(&view) {
                    self.frames_filtered += 1;
                    return Ok(());
                }
            }
        }
        if self.log {
            let to = self.links[link].ends[1 - dir].0;
            let what = frame_summary(&frame);
            self.log(|| format!("wire {from:?} -> {to:?}: {what}"));
        }
        let faults = &self.links[link].faults[dir];
        let mut copies = 1;
        let mut jitter = Duration::ZERO;
        let offset = self.now.saturating_since(self.workload_start);
        // Channel (un)subscriptions and their acks are not lost or duplicated (a real client
        // replays them after a redial); they are only delayed. Decoded only while one is due.
        let control =
            self.clients.iter().any(|c| c.awaiting.is_some()) && is_subscription_frame(&frame);
        if !control && self.phase == Phase::Workload && offset >= self.config.workload.faults_after
        {
            if faults.partitions.iter().any(|w| w.contains(offset))
                || (faults.loss > 0.0 && self.net_rng.random_bool(faults.loss))
            {
                self.frames_dropped += 1;
                self.log(|| "  dropped".into());
                return Ok(());
            }
            if faults.dup > 0.0 && self.net_rng.random_bool(faults.dup) {
                copies = 2;
                self.frames_duplicated += 1;
                self.log(|| "  duplicated".into());
            }
            jitter = faults.jitter;
        }
        let delay = faults.delay;
        let queued = !faults.congestion.is_empty();
        let congestion =
            if self.phase == Phase::Workload && offset >= self.config.workload.faults_after {
                faults
                    .congestion
                    .iter()
                    .filter(|c| c.window.contains(offset))
                    .map(|c| c.extra)
                    .max()
                    .unwrap_or_default()
            } else {
                Duration::ZERO
            };
        for _ in 0..copies {
            self.in_flight += 1;
            let extra = if jitter.is_zero() {
                Duration::ZERO
            } else {
                Duration::from_micros(self.net_rng.random_range(0..=jitter.as_micros() as u64))
            };
            let mut at = self.now + delay + congestion + extra;
            if queued {
                let last = &mut self.links[link].last_arrival[dir];
                at = at.max(*last);
                *last = at;
            }
            self.schedule(
                at,
                Event::Deliver {
                    link,
                    dir,
                    frame: frame.clone(),
                },
            );
        }
        Ok(())
    }

    fn check_router(&self, host: HostId) -> Result<(), Failure> {
        let router = self.router(host);
        let stats = router.stats();
        let records = router.table().record_count() as u64;
        if stats.subscriptions != records {
            return Err(self.fail(format!(
                "{host:?}: stats().subscriptions = {} but the table holds {records} records",
                stats.subscriptions
            )));
        }
        if self.phase != Phase::Setup {
            let expected = self.expected_records.get(&host).copied().unwrap_or(0);
            let (adds, removes) = match host {
                HostId::Node(i) => self.node_pending.get(&i).copied().unwrap_or((0, 0)),
                HostId::Client(_) => (0, 0),
            };
            if records + removes < expected || records > expected + adds {
                return Err(self.fail(format!(
                    "{host:?}: {records} subscription records, expected {expected}"
                )));
            }
            let conns = match host {
                HostId::Node(i) => {
                    let homed = self.config.clients.iter().filter(|c| c.node == i).count();
                    (self.nodes.len() - 1 + homed + 1) as u64
                }
                HostId::Client(_) => 2,
            };
            if stats.connections != conns {
                return Err(self.fail(format!(
                    "{host:?}: {} connections, expected {conns}",
                    stats.connections
                )));
            }
        }
        // Nothing in this simulation is malformed, forged, looping or unroutable; except that a
        // group's channel messages find no route where nobody else is subscribed to the channel
        // (a group without members yet, or a node whose members left).
        let group = self.model.group.is_some();
        let bad: Vec<String> = stats
            .drops()
            .filter(|(reason, _)| !(group && *reason == crate::router::DropReason::NoRoute))
            .map(|(reason, n)| format!("{reason}: {n}"))
            .collect();
        if !bad.is_empty() {
            return Err(self.fail(format!(
                "{host:?}: router dropped messages ({})",
                bad.join(", ")
            )));
        }
        Ok(())
    }

    fn check_session_stats(&self, host: HostId) -> Result<(), Failure> {
        let HostId::Client(j) = host else {
            return Ok(());
        };
        let stats = self.clients[j].layer.stats();
        for reason in [
            session::SessionDrop::Malformed,
            session::SessionDrop::BadToken,
            session::SessionDrop::BadSignature,
            session::SessionDrop::OutOfWindow,
        ] {
            if stats.dropped(reason) > 0 {
                return Err(self.fail(format!(
                    "{host:?}: session layer dropped {} message(s) as {reason:?}",
                    stats.dropped(reason)
                )));
            }
        }
        if stats.identity_binding_mismatches > 0 || stats.unsigned_payloads > 0 {
            return Err(self.fail(format!("{host:?}: identity problems: {stats:?}")));
        }
        Ok(())
    }

    fn trace_write(&mut self, host: HostId, tag: &[u8], bytes: &[u8]) {
        self.trace.write_u64(self.now.as_micros());
        let (kind, index) = match host {
            HostId::Node(i) => (0u8, i),
            HostId::Client(j) => (1u8, j),
        };
        self.trace.write_u8(kind);
        self.trace.write_usize(index);
        self.trace.write(tag);
        self.trace.write_usize(bytes.len());
        self.trace.write(bytes);
    }

    /// Session events, hashed field by field (the hot ones without formatting).
    fn trace_event(&mut self, host: HostId, event: &SessionEvent) {
        match event {
            SessionEvent::Message {
                session,
                source,
                id,
                payload,
                payload_type,
                metadata,
            } => {
                let mut head = Vec::with_capacity(64);
                head.extend_from_slice(&session.to_le_bytes());
                head.extend_from_slice(&id.to_le_bytes());
                let key = source.key();
                for c in key.components {
                    head.extend_from_slice(&c.to_le_bytes());
                }
                head.extend_from_slice(&key.id.to_le_bytes());
                head.extend_from_slice(payload_type.as_bytes());
                for (k, v) in metadata {
                    head.extend_from_slice(k.as_bytes());
                    head.push(0);
                    head.extend_from_slice(v.as_bytes());
                    head.push(0);
                }
                self.trace_write(host, b"message", &head);
                self.trace.write(payload);
            }
            SessionEvent::Delivered { session, id } => {
                let mut head = session.to_le_bytes().to_vec();
                head.extend_from_slice(&id.to_le_bytes());
                self.trace_write(host, b"delivered", &head);
            }
            other => self.trace_write(host, b"event", format!("{other:?}").as_bytes()),
        }
    }

    fn trace_output(&mut self, host: HostId, output: &Output) {
        match output {
            Output::Transmit { conn, frame } => {
                let mut tag = *b"transmit........";
                tag[8..].copy_from_slice(&conn.to_le_bytes());
                if self.config.mls {
                    let digest =
                        decode_frame(frame).map_or_else(|| frame.to_vec(), |m| mls_digest(&m));
                    self.trace_write(host, &tag, &digest);
                } else {
                    self.trace_write(host, &tag, frame);
                }
            }
            Output::Deliver { conn, message } => {
                let mut tag = *b"deliver.........";
                tag[8..].copy_from_slice(&conn.to_le_bytes());
                let bytes = if self.config.mls {
                    mls_digest(message)
                } else {
                    message.encode_to_vec()
                };
                self.trace_write(host, &tag, &bytes);
            }
            other => self.trace_write(host, b"router", format!("{other:?}").as_bytes()),
        }
    }

    fn hash_app_frame(&mut self, host: HostId, message: &pb::Message) {
        let body = message.encode_to_vec();
        self.trace_write(host, b"local", &body);
    }
}

fn action_session(action: &Action) -> Option<usize> {
    match action {
        Action::Open { session, .. }
        | Action::Publish { session, .. }
        | Action::PublishTo { session, .. }
        | Action::Close { session, .. } => Some(*session),
        _ => None,
    }
}

/// The channel of the group workload.
pub fn group_channel() -> Name {
    let (org, ns, chan) = scenario::GROUP_CHANNEL;
    Name::new(org, ns, chan)
}

/// `org/sim/svc<k>`, any instance.
pub fn service_name(service: usize) -> Name {
    Name::new("org", "sim", &format!("svc{service}"))
}

fn subscribe_message(
    source: &Name,
    name: &Name,
    subscription_id: u64,
    forward_to: Option<ConnId>,
    recv_from: Option<ConnId>,
) -> pb::Message {
    pb::Message {
        message_type: Some(MessageType::Subscribe(pb::Subscribe {
            header: Some(pb::SlimHeader {
                source: Some(source.to_pb()),
                destination: Some(name.to_pb()),
                fanout: 1,
                ttl: slim_proto::DEFAULT_TTL,
                forward_to,
                recv_from,
                ..Default::default()
            }),
            subscription_id,
        })),
        metadata: Default::default(),
    }
}

/// The message in a gRPC-framed frame.
fn decode_frame(frame: &Bytes) -> Option<pb::Message> {
    let mut deframer = Deframer::default();
    deframer.push(frame);
    deframer
        .next_frame()
        .ok()
        .flatten()
        .and_then(|body| pb::Message::decode(body).ok())
}

/// What a message is, without its bytes, for the traces of MLS runs (whose key packages,
/// welcomes, commits and ciphertexts differ from run to run): a session message's type,
/// session, id, source and destination; any other message (links, subscriptions) whole.
fn mls_digest(message: &pb::Message) -> Vec<u8> {
    let Some((kind, session, id)) = session_info(message) else {
        return message.encode_to_vec();
    };
    let mut digest = Vec::with_capacity(64);
    digest.extend_from_slice(&(kind as i32).to_le_bytes());
    digest.extend_from_slice(&session.to_le_bytes());
    digest.extend_from_slice(&id.to_le_bytes());
    if let Some(MessageType::Publish(p)) = &message.message_type {
        let header = p.header.as_ref();
        for name in [
            header.and_then(|h| h.source.as_ref()),
            header.and_then(|h| h.destination.as_ref()),
        ] {
            if let Some(key) = name.and_then(Name::from_pb).map(|n| n.key()) {
                for c in key.components {
                    digest.extend_from_slice(&c.to_le_bytes());
                }
                digest.extend_from_slice(&key.id.to_le_bytes());
            }
        }
    }
    digest
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn frame_summary(frame: &Bytes) -> String {
    let Some(message) = decode_frame(frame) else {
        return "undecodable".into();
    };
    match (&message.message_type, session_info(&message)) {
        (Some(MessageType::Publish(p)), Some((kind, session, id))) => {
            let dest = p
                .header
                .as_ref()
                .and_then(|h| h.destination.as_ref())
                .and_then(Name::from_pb)
                .map(|n| n.to_string())
                .unwrap_or_default();
            format!("{kind:?} session {session} id {id} to {dest}")
        }
        (Some(MessageType::Link(_)), _) => "link negotiation".into(),
        (Some(MessageType::Subscribe(_)), _) => "subscribe".into(),
        (Some(MessageType::SubscriptionAck(_)), _) => "subscription ack".into(),
        (other, _) => format!("{other:?}"),
    }
}

fn is_subscription_frame(frame: &Bytes) -> bool {
    let mut deframer = Deframer::default();
    deframer.push(frame);
    deframer
        .next_frame()
        .ok()
        .flatten()
        .and_then(|body| pb::Message::decode(body).ok())
        .is_some_and(|m| {
            matches!(
                m.message_type,
                Some(
                    MessageType::Subscribe(_)
                        | MessageType::Unsubscribe(_)
                        | MessageType::SubscriptionAck(_)
                )
            )
        })
}

fn humanize(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}
