//! What a simulation run is made of: the topology, the faults of every link direction and the
//! application workload. [`SimConfig::swarm`] draws all of it from the seed (swarm testing: every
//! seed tests a different network); tests build or adjust a config by hand.

use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::router::ConnectionKind;
use crate::session::Reliability;

/// RNG stream of the scenario generator (the network and the cores use other streams of the
/// same seed, so adjusting a config by hand does not shift the fault decisions).
pub(crate) const STREAM_SCENARIO: u64 = 1;
pub(crate) const STREAM_NETWORK: u64 = 2;
pub(crate) const STREAM_CORES: u64 = 3;
pub(crate) const STREAM_PAYLOADS: u64 = 4;
/// The group workload of a seed is drawn from its own stream: adding it left the p2p scenarios
/// of every seed unchanged.
pub(crate) const STREAM_GROUP: u64 = 5;
/// Whether a seed runs its sessions with MLS is drawn from its own stream too.
pub(crate) const STREAM_MLS: u64 = 6;
/// Share of the swarm seeds whose sessions (p2p and group) are end-to-end encrypted with MLS.
/// MLS costs ~0.1–0.5 ms per message and a few ms per commit, so it is kept small enough that a
/// 1000-seed sweep stays within a minute more on two cores.
pub const MLS_SHARE: f64 = 0.1;
/// The channel of the group workload (`org/sim/chan`).
pub const GROUP_CHANNEL: (&str, &str, &str) = ("org", "sim", "chan");

/// A time window, as offsets from the moment the workload starts (faults are switched on then).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: Duration,
    pub end: Duration,
}

impl Window {
    pub fn contains(&self, offset: Duration) -> bool {
        self.start <= offset && offset < self.end
    }
}

/// Faults of one link direction. Loss, duplication, jitter and partitions apply only while the
/// faults are on (the workload phase); setup and the final settling run on a clean network with
/// the base `delay` only.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LinkFaults {
    /// Probability that a frame is dropped.
    pub loss: f64,
    /// Probability that a frame is delivered twice.
    pub dup: f64,
    /// Minimum one-way delay.
    pub delay: Duration,
    /// Extra delay, uniform in `0..=jitter`, drawn per copy: frames overtake each other.
    pub jitter: Duration,
    /// While one of these is open, every frame in this direction is dropped.
    pub partitions: Vec<Window>,
    /// Congestion episodes: while one is open, frames entering this direction wait `extra`
    /// longer. A direction with any episode is a queue: its frames arrive in the order they
    /// were sent (so when an episode ends, later frames wait behind the delayed ones instead of
    /// overtaking them), which also undoes its jitter. Never drawn by the swarm.
    pub congestion: Vec<Congestion>,
}

/// Extra delay on one link direction while `window` is open (see [`LinkFaults::congestion`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Congestion {
    pub window: Window,
    pub extra: Duration,
}

impl LinkFaults {
    /// A direction that only delays.
    pub fn clean(delay: Duration) -> Self {
        Self {
            delay,
            ..Self::default()
        }
    }

    /// Whether this direction can lose a frame (loss or a partition).
    pub fn drops(&self) -> bool {
        self.loss > 0.0 || !self.partitions.is_empty()
    }
}

/// One application: its service (`org/sim/svc<service>`) and the node it connects to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientSpec {
    pub service: usize,
    pub node: usize,
}

/// The two ends of a p2p session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Side {
    /// The application that opened the session.
    Initiator = 0,
    /// The application that joined it.
    Participant = 1,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::Initiator => Side::Participant,
            Side::Participant => Side::Initiator,
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// Something the applications do, at a time of the workload.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Client `client` opens logical session `session` with any instance of `service`.
    Open {
        session: usize,
        client: usize,
        service: usize,
        reliability: Option<Reliability>,
    },
    /// One side of a session publishes `count` messages back to back (skipped when that side
    /// does not exist yet: a participant before it joined).
    Publish {
        session: usize,
        side: Side,
        count: u32,
    },
    /// One side sends a direct message (`publish_to`: outside the sequence, delivered on
    /// arrival) to its peer, named by its full name or (`by_service`) its service name.
    PublishTo {
        session: usize,
        side: Side,
        by_service: bool,
    },
    /// One side closes the session.
    Close { session: usize, side: Side },
    /// Client `client` creates the run's group (at most one) on [`GROUP_CHANNEL`] and
    /// moderates it.
    GroupCreate {
        client: usize,
        reliability: Option<Reliability>,
    },
    /// The moderator invites any instance of client `member`'s service (its service must be
    /// offered by that client alone).
    GroupInvite { member: usize },
    /// Client `client` publishes `count` messages to the group (skipped while it is not in it).
    GroupPublish { client: usize, count: u32 },
    /// The moderator removes client `member` (skipped while it is not a member).
    GroupRemove { member: usize },
    /// The moderator closes the group.
    GroupClose,
}

/// The workload: actions at offsets from the start of the workload phase.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Workload {
    pub actions: Vec<(Duration, Action)>,
    /// Faults are on from the start of the workload for this long; then the network heals.
    pub duration: Duration,
    /// Faults start this long after the start of the workload (e.g. once handshakes are done);
    /// partition windows still count from the start.
    pub faults_after: Duration,
}

/// A whole run.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Nodes `0..nodes`, connected in a full mesh (node `i` dials node `j` for `i < j`).
    pub nodes: usize,
    /// The kind of the node-to-node links (`Peer`, or `Remote` with two nodes: `Remote` has no
    /// one-hop rule, so a mesh of three would loop broadcasts until the TTL).
    pub node_link_kind: ConnectionKind,
    pub clients: Vec<ClientSpec>,
    /// Faults per node-to-node link (in dial order: (0,1), (0,2), …, (1,2), …), `[i→j, j→i]`.
    pub node_links: Vec<[LinkFaults; 2]>,
    /// Faults per client uplink, `[client→node, node→client]`.
    pub client_links: Vec<[LinkFaults; 2]>,
    pub workload: Workload,
    /// How long after the heal the run may take to settle before liveness is judged.
    pub settle: Duration,
    /// No longer read: these switched on the group checks for three core bugs that runs used
    /// to tolerate (a stream started at the first id seen, a failed invite leaving a member
    /// behind, a missed update leaving a stale member list). The bugs are fixed and every run
    /// is judged strictly; the fields stay until the fuzzing scenarios stop setting them.
    pub group_strict_start: bool,
    pub group_strict_invite: bool,
    pub group_strict_updates: bool,
    /// Every session (p2p and group) is opened with MLS on (`SessionConfig::mls`). With MLS a
    /// seed reproduces every decision but not the bytes (openmls draws HPKE and signature
    /// randomness from the OS): the trace then hashes what frames are, not their bytes.
    pub mls: bool,
    /// MLS runs: a member the moderator removes ignores its removal (every group control
    /// message to it is withheld once the moderator's removal commit is made) and keeps its MLS
    /// state; the data sent after the removal still reaches it, and every copy must fail to
    /// decrypt there.
    pub mls_defiant_removal: bool,
}

/// Knobs of the swarm generator that switch whole scenario families on or off. The draws are made
/// either way, so switching a family does not change the rest of a seed's scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Swarm {
    /// In about 5 % of the seeds one session publishes 513–800 messages at once: more than the
    /// sender's retransmission buffer (512) holds, so losses hit evicted messages. Off by
    /// default until the receiver reports such losses in order (see the report in
    /// `tests/sim.rs`, `burst_beyond_the_retransmission_buffer`).
    pub bursts: bool,
    /// In about 30 % of the seeds (drawn from a stream of their own) one client creates a group,
    /// invites the others whose service it can name unambiguously, broadcasts, members publish
    /// (fan-in), one member may be removed, and the group may be closed. On by default.
    pub groups: bool,
    /// In about [`MLS_SHARE`] of the seeds (drawn from a stream of their own) every session is
    /// opened with MLS on; in half of those a removed group member ignores its removal
    /// ([`SimConfig::mls_defiant_removal`]). On by default.
    pub mls: bool,
}

impl Default for Swarm {
    fn default() -> Self {
        Swarm {
            bursts: false,
            groups: true,
            mls: true,
        }
    }
}

impl Swarm {
    /// Everything drawn from the seed.
    pub fn config(self, seed: u64) -> SimConfig {
        SimConfig::generate(seed, self)
    }
}

impl SimConfig {
    /// Everything drawn from the seed, with the default [`Swarm`] families.
    pub fn swarm(seed: u64) -> Self {
        Swarm::default().config(seed)
    }

    fn generate(seed: u64, swarm: Swarm) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(STREAM_SCENARIO);
        let nodes = rng.random_range(1..=3usize);
        let node_link_kind = if nodes == 2 && rng.random_bool(0.5) {
            ConnectionKind::Remote
        } else {
            ConnectionKind::Peer
        };
        let client_count = rng.random_range(2..=5usize);
        let mut clients: Vec<ClientSpec> = (0..client_count)
            .map(|i| ClientSpec {
                service: i,
                node: rng.random_range(0..nodes),
            })
            .collect();
        // Sometimes two instances of one service: discovery picks one of them.
        if client_count >= 3 && rng.random_bool(0.3) {
            clients[client_count - 1].service = rng.random_range(0..client_count - 1);
        }

        // The network profile of this seed: a clean one, or per-direction faults up to maxima
        // drawn for the seed.
        let lossless = rng.random_bool(0.2);
        let max_loss = if lossless {
            0.0
        } else {
            rng.random_range(0.0..=0.3)
        };
        let max_dup = rng.random_range(0.0..=0.1);
        let max_jitter_ms = rng.random_range(0..=30u64);
        let partition_rate = if lossless {
            0.0
        } else {
            rng.random_range(0.0..=0.4)
        };
        let duration = Duration::from_millis(rng.random_range(2_000..=10_000));
        let direction = |rng: &mut ChaCha8Rng| LinkFaults {
            loss: if max_loss > 0.0 {
                rng.random_range(0.0..=max_loss)
            } else {
                0.0
            },
            dup: rng.random_range(0.0..=max_dup),
            delay: Duration::from_millis(rng.random_range(1..=20)),
            jitter: Duration::from_millis(rng.random_range(0..=max_jitter_ms)),
            partitions: Vec::new(),
            congestion: Vec::new(),
        };
        let link = |rng: &mut ChaCha8Rng| {
            let mut faults = [direction(rng), direction(rng)];
            if rng.random_bool(partition_rate) {
                for _ in 0..rng.random_range(1..=2) {
                    let start = rng.random_range(0..duration.as_millis() as u64);
                    let length = rng.random_range(200..=4_000);
                    let window = Window {
                        start: Duration::from_millis(start),
                        end: Duration::from_millis(start + length),
                    };
                    match rng.random_range(0..3) {
                        0 => faults[0].partitions.push(window),
                        1 => faults[1].partitions.push(window),
                        _ => {
                            faults[0].partitions.push(window);
                            faults[1].partitions.push(window);
                        }
                    }
                }
            }
            faults
        };
        let node_links = (0..nodes * (nodes - 1) / 2)
            .map(|_| link(&mut rng))
            .collect();
        let client_links = (0..client_count).map(|_| link(&mut rng)).collect();

        let services: Vec<usize> = {
            let mut s: Vec<usize> = clients.iter().map(|c| c.service).collect();
            s.sort_unstable();
            s.dedup();
            s
        };
        let mut actions = Vec::new();
        let ms = |v: u64| Duration::from_millis(v);
        let total = duration.as_millis() as u64;
        let mut max_retry_span = Duration::from_secs(11); // control defaults: 1 s x (10 + 1)
        let sessions = rng.random_range(1..=6usize);
        for session in 0..sessions {
            let client = rng.random_range(0..client_count);
            let own = clients[client].service;
            let targets: Vec<usize> = services.iter().copied().filter(|s| *s != own).collect();
            let service = targets[rng.random_range(0..targets.len())];
            let reliability = rng.random_bool(0.9).then(|| Reliability {
                interval: ms(rng.random_range(100..=500)),
                max_retries: rng.random_range(5..=20),
            });
            if let Some(r) = reliability {
                max_retry_span = max_retry_span.max(r.give_up_bound() + r.interval);
            }
            let open_at = rng.random_range(0..=total / 3);
            actions.push((
                ms(open_at),
                Action::Open {
                    session,
                    client,
                    service,
                    reliability,
                },
            ));
            for _ in 0..rng.random_range(0..=8) {
                let side = if rng.random_bool(0.7) {
                    Side::Initiator
                } else {
                    Side::Participant
                };
                let count = rng.random_range(1..=5);
                actions.push((
                    ms(rng.random_range(open_at..=total)),
                    Action::Publish {
                        session,
                        side,
                        count,
                    },
                ));
            }
            for _ in 0..rng.random_range(0..=2) {
                let side = if rng.random_bool(0.5) {
                    Side::Initiator
                } else {
                    Side::Participant
                };
                actions.push((
                    ms(rng.random_range(open_at..=total)),
                    Action::PublishTo {
                        session,
                        side,
                        by_service: rng.random_bool(0.5),
                    },
                ));
            }
            if rng.random_bool(0.25) {
                let side = if rng.random_bool(0.5) {
                    Side::Initiator
                } else {
                    Side::Participant
                };
                actions.push((
                    ms(rng.random_range(open_at..=total)),
                    Action::Close { session, side },
                ));
            }
        }
        let burst = rng.random_bool(0.05);
        let burst_session = rng.random_range(0..sessions);
        let burst_count = rng.random_range(513..=800);
        let burst_at = ms(rng.random_range(total / 3..=total));
        if swarm.bursts && burst {
            actions.push((
                burst_at,
                Action::Publish {
                    session: burst_session,
                    side: Side::Initiator,
                    count: burst_count,
                },
            ));
        }
        if swarm.groups {
            let span = group_workload(seed, &clients, total, &mut actions);
            max_retry_span = max_retry_span.max(span);
        }
        let mut mls_rng = ChaCha8Rng::seed_from_u64(seed);
        mls_rng.set_stream(STREAM_MLS);
        let mls = mls_rng.random_bool(MLS_SHARE) && swarm.mls;
        let mls_defiant_removal = mls_rng.random_bool(0.5) && mls;
        // Stable: actions at the same instant keep their generation order.
        actions.sort_by_key(|(at, _)| *at);
        SimConfig {
            nodes,
            node_link_kind,
            clients,
            node_links,
            client_links,
            workload: Workload {
                actions,
                duration,
                faults_after: Duration::ZERO,
            },
            settle: max_retry_span * 3 + Duration::from_secs(10),
            group_strict_start: true,
            group_strict_invite: true,
            group_strict_updates: true,
            mls,
            mls_defiant_removal,
        }
    }

    /// A config with the given topology, clean links (`delay` each way) and no workload.
    pub fn clean(nodes: usize, clients: Vec<ClientSpec>, delay: Duration) -> Self {
        let link = || [LinkFaults::clean(delay), LinkFaults::clean(delay)];
        SimConfig {
            nodes,
            node_link_kind: ConnectionKind::Peer,
            node_links: (0..nodes * nodes.saturating_sub(1) / 2)
                .map(|_| link())
                .collect(),
            client_links: clients.iter().map(|_| link()).collect(),
            clients,
            workload: Workload::default(),
            settle: Duration::from_secs(60),
            group_strict_start: true,
            group_strict_invite: true,
            group_strict_updates: true,
            mls: false,
            mls_defiant_removal: false,
        }
    }

    /// Two clients, services 0 and 1, on nodes 0 and `nodes - 1` (clean links, `delay` each
    /// way), and a workload that opens one p2p session from the first to the second at 0 with
    /// `reliability`: add the publishes and the duration.
    pub fn one_session(nodes: usize, reliability: Option<Reliability>, delay: Duration) -> Self {
        let mut config = Self::clean(
            nodes,
            vec![
                ClientSpec {
                    service: 0,
                    node: 0,
                },
                ClientSpec {
                    service: 1,
                    node: nodes.saturating_sub(1),
                },
            ],
            delay,
        );
        config.workload.actions.push((
            Duration::ZERO,
            Action::Open {
                session: 0,
                client: 0,
                service: 1,
                reliability,
            },
        ));
        config
    }

    /// Every session with MLS on (see [`SimConfig::mls`]).
    pub fn with_mls(mut self) -> Self {
        self.mls = true;
        self
    }

    /// Removes every way of losing a frame (loss and partitions); keeps delay, jitter and
    /// duplication.
    pub fn without_loss(mut self) -> Self {
        for faults in self
            .node_links
            .iter_mut()
            .chain(self.client_links.iter_mut())
            .flatten()
        {
            faults.loss = 0.0;
            faults.partitions.clear();
        }
        self
    }

    /// Sets the loss of every link direction.
    pub fn with_loss(mut self, loss: f64) -> Self {
        for faults in self
            .node_links
            .iter_mut()
            .chain(self.client_links.iter_mut())
            .flatten()
        {
            faults.loss = loss;
        }
        self
    }

    /// Whether any link direction can lose a frame.
    pub fn lossy(&self) -> bool {
        self.node_links
            .iter()
            .chain(self.client_links.iter())
            .flatten()
            .any(LinkFaults::drops)
    }

    /// Number of logical sessions the workload opens.
    pub fn session_count(&self) -> usize {
        self.workload
            .actions
            .iter()
            .filter_map(|(_, a)| match a {
                Action::Open { session, .. } => Some(*session + 1),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }
}

/// The group workload of a seed, if it has one (about 30 % of the seeds): adds its actions and
/// returns the longest retry span of its timers.
fn group_workload(
    seed: u64,
    clients: &[ClientSpec],
    total: u64,
    actions: &mut Vec<(Duration, Action)>,
) -> Duration {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(STREAM_GROUP);
    let ms = |v: u64| Duration::from_millis(v);
    if !rng.random_bool(0.3) {
        return Duration::ZERO;
    }
    let moderator = rng.random_range(0..clients.len());
    // Invitees: clients whose service nobody else offers (an invite names a service).
    let members: Vec<usize> = (0..clients.len())
        .filter(|&c| c != moderator)
        .filter(|&c| {
            clients
                .iter()
                .filter(|o| o.service == clients[c].service)
                .count()
                == 1
        })
        .collect();
    let reliability = rng.random_bool(0.9).then(|| Reliability {
        interval: ms(rng.random_range(100..=500)),
        max_retries: rng.random_range(5..=20),
    });
    let create_at = rng.random_range(0..=total / 4);
    actions.push((
        ms(create_at),
        Action::GroupCreate {
            client: moderator,
            reliability,
        },
    ));
    for &member in &members {
        actions.push((
            ms(rng.random_range(create_at..=create_at + total / 4)),
            Action::GroupInvite { member },
        ));
    }
    for _ in 0..rng.random_range(1..=10) {
        let client = if rng.random_bool(0.6) || members.is_empty() {
            moderator
        } else {
            members[rng.random_range(0..members.len())]
        };
        actions.push((
            ms(rng.random_range(create_at..=total)),
            Action::GroupPublish {
                client,
                count: rng.random_range(1..=5),
            },
        ));
    }
    if !members.is_empty() && rng.random_bool(0.4) {
        actions.push((
            ms(rng.random_range(create_at + total / 4..=total)),
            Action::GroupRemove {
                member: members[rng.random_range(0..members.len())],
            },
        ));
    }
    if rng.random_bool(0.2) {
        actions.push((
            ms(rng.random_range(total * 3 / 4..=total)),
            Action::GroupClose,
        ));
    }
    reliability.map_or(Duration::ZERO, |r| r.give_up_bound() + r.interval)
}
