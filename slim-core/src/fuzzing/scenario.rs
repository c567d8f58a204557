//! Fuzz target `session_sim`: a small simulation scenario drawn from the fuzz input, run through
//! [`Sim`] with all of its invariants.

use std::time::Duration;

use super::Input;
use crate::router::ConnectionKind;
use crate::session::Reliability;
use crate::sim::{Action, ClientSpec, LinkFaults, Side, Sim, SimConfig, Window, Workload};

/// Most workload actions a scenario has (each publish action sends up to 5 messages).
const MAX_ACTIONS: usize = 40;

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// Runs the scenario [`session_sim_config`] derives from `data`; any [`Failure`] (a broken
/// invariant, a liveness problem after the heal, a core that misbehaved) panics with the seed,
/// the failure and the whole scenario. Every check of the simulation is on (groups included:
/// membership agreement, removals, streams from their first id). Bursts beyond the sender's
/// window (512) come on any network, lossless ones included (fuzz finding S1: the sender used
/// to evict messages still unacknowledged, so a merely overtaken one was reported lost).
///
/// [`Failure`]: crate::sim::Failure
pub fn session_sim(data: &[u8]) {
    let (seed, config) = session_sim_config(data);
    let mut sim = Sim::new(seed, config.clone());
    sim.set_replay("cargo fuzz run session_sim -s none <the input file> (see README, Fuzzing)");
    if let Err(failure) = sim.run() {
        panic!("{failure}\nscenario (seed {seed}): {config:#?}");
    }
}

/// The seed and simulation config the bytes describe: 1–3 nodes (Remote links only with two),
/// 2–4 clients (sometimes two instances of one service), per-direction loss (≤ 30 %),
/// duplication (≤ 10 %), delay, jitter and partitions, a workload of p2p sessions (open, publish
/// from either side, direct messages, close, rarely a burst beyond the retransmission buffer)
/// and at most one group (create, invite, publish, remove, close), with the rules the swarm
/// generator follows (sessions target another service; invitees are the only instance of their
/// service), and a settle time long enough for every retry to run out.
pub fn session_sim_config(data: &[u8]) -> (u64, SimConfig) {
    let mut input = Input::new(data);
    let seed = u64::from(input.u32());
    let nodes = usize::from(input.u8() % 3) + 1;
    let node_link_kind = if nodes == 2 && input.chance(64) {
        ConnectionKind::Remote
    } else {
        ConnectionKind::Peer
    };
    let client_count = usize::from(input.u8() % 3) + 2;
    let mut clients: Vec<ClientSpec> = (0..client_count)
        .map(|service| ClientSpec {
            service,
            node: usize::from(input.u8()) % nodes,
        })
        .collect();
    if client_count >= 3 && input.chance(64) {
        clients[client_count - 1].service = usize::from(input.u8()) % (client_count - 1);
    }

    let duration_ms = 1_000 + u64::from(input.u16() % 5_000);
    let profile = input.u8();
    let lossless = profile & 3 == 0;
    let partitions = !lossless && profile & 4 != 0;
    let direction = |input: &mut Input| LinkFaults {
        loss: if lossless {
            0.0
        } else {
            f64::from(input.u8() % 31) / 100.0
        },
        dup: f64::from(input.u8() % 11) / 100.0,
        delay: ms(1 + u64::from(input.u8() % 20)),
        jitter: ms(u64::from(input.u8() % 31)),
        partitions: Vec::new(),
        congestion: Vec::new(),
    };
    let link = |input: &mut Input| {
        let mut faults = [direction(input), direction(input)];
        if partitions && input.chance(96) {
            for _ in 0..input.u8() % 2 + 1 {
                let start = u64::from(input.u16()) % duration_ms;
                let window = Window {
                    start: ms(start),
                    end: ms(start + 200 + u64::from(input.u16() % 3_800)),
                };
                match input.u8() % 3 {
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
    let node_links: Vec<[LinkFaults; 2]> = (0..nodes * (nodes - 1) / 2)
        .map(|_| link(&mut input))
        .collect();
    let client_links: Vec<[LinkFaults; 2]> = (0..client_count).map(|_| link(&mut input)).collect();
    let faults_after = if input.chance(64) {
        ms(u64::from(input.u8()) * 10)
    } else {
        Duration::ZERO
    };

    // What the simulation calls lossless (no loss, no partition anywhere), whatever the profile.
    let can_lose = node_links
        .iter()
        .chain(&client_links)
        .flatten()
        .any(LinkFaults::drops);
    let mut services: Vec<usize> = clients.iter().map(|c| c.service).collect();
    services.sort_unstable();
    services.dedup();
    let mut actions: Vec<(Duration, Action)> = Vec::new();
    let mut max_retry_span = Duration::from_secs(11); // control defaults: 1 s x (10 + 1)
                                                      // On a lossless network the simulation expects every session to open and every message to
                                                      // be acknowledged, so the timers must outlast a round trip (up to ~300 ms here): the swarm's
                                                      // ranges. With loss, anything goes, down to timers shorter than a round trip and no retries.
    let mut reliability = |input: &mut Input| {
        let r = input.chance(230).then(|| {
            let (interval, retries) = (input.u8(), input.u8());
            if !can_lose {
                Reliability {
                    interval: ms(100 + u64::from(interval % 41) * 10),
                    max_retries: 5 + u32::from(retries % 16),
                }
            } else {
                Reliability {
                    interval: ms(20 + u64::from(interval % 49) * 10),
                    max_retries: u32::from(retries % 21),
                }
            }
        });
        if let Some(r) = r {
            max_retry_span = max_retry_span.max(r.give_up_bound() + r.interval);
        }
        r
    };
    let at =
        |input: &mut Input, from: u64| ms(from + u64::from(input.u16()) % (duration_ms - from + 1));

    let sessions = usize::from(input.u8() % 4);
    for session in 0..sessions {
        let client = usize::from(input.u8()) % client_count;
        let own = clients[client].service;
        let targets: Vec<usize> = services.iter().copied().filter(|s| *s != own).collect();
        let service = targets[usize::from(input.u8()) % targets.len()];
        let open_at = u64::from(input.u16()) % (duration_ms / 3 + 1);
        actions.push((
            ms(open_at),
            Action::Open {
                session,
                client,
                service,
                reliability: reliability(&mut input),
            },
        ));
        // At most one burst per session: two could overflow the 1024 messages a session queues
        // before its handshake finishes, and `publish` refusing them is by design.
        let mut burst = false;
        for _ in 0..input.u8() % 7 {
            let side = if input.chance(180) {
                Side::Initiator
            } else {
                Side::Participant
            };
            let count = if input.chance(2) && !std::mem::replace(&mut burst, true) {
                513 + u32::from(input.u8() % 64)
            } else {
                u32::from(input.u8() % 5) + 1
            };
            actions.push((
                at(&mut input, open_at),
                Action::Publish {
                    session,
                    side,
                    count,
                },
            ));
        }
        for _ in 0..input.u8() % 3 {
            let side = if input.bool() {
                Side::Initiator
            } else {
                Side::Participant
            };
            actions.push((
                at(&mut input, open_at),
                Action::PublishTo {
                    session,
                    side,
                    by_service: input.bool(),
                },
            ));
        }
        if input.chance(64) {
            let side = if input.bool() {
                Side::Initiator
            } else {
                Side::Participant
            };
            actions.push((at(&mut input, open_at), Action::Close { session, side }));
        }
    }

    if input.chance(96) {
        let moderator = usize::from(input.u8()) % client_count;
        let members: Vec<usize> = (0..client_count)
            .filter(|&c| c != moderator)
            .filter(|&c| {
                clients
                    .iter()
                    .filter(|o| o.service == clients[c].service)
                    .count()
                    == 1
            })
            .collect();
        let create_at = u64::from(input.u16()) % (duration_ms / 4 + 1);
        actions.push((
            ms(create_at),
            Action::GroupCreate {
                client: moderator,
                reliability: reliability(&mut input),
            },
        ));
        for &member in &members {
            if input.chance(220) {
                let invite_at = create_at + u64::from(input.u16()) % (duration_ms / 4 + 1);
                actions.push((ms(invite_at), Action::GroupInvite { member }));
            }
        }
        for _ in 0..input.u8() % 8 + 1 {
            let client = if members.is_empty() || input.chance(150) {
                moderator
            } else {
                members[usize::from(input.u8()) % members.len()]
            };
            actions.push((
                at(&mut input, create_at),
                Action::GroupPublish {
                    client,
                    count: u32::from(input.u8() % 5) + 1,
                },
            ));
        }
        if !members.is_empty() && input.chance(100) {
            let member = members[usize::from(input.u8()) % members.len()];
            actions.push((at(&mut input, create_at), Action::GroupRemove { member }));
        }
        if input.chance(50) {
            actions.push((at(&mut input, create_at), Action::GroupClose));
        }
    }
    actions.truncate(MAX_ACTIONS);
    // Stable: actions at the same instant keep their order.
    actions.sort_by_key(|(at, _)| *at);

    // From `clean` for the fields not set here (the simulation's defaults).
    let mut config = SimConfig::clean(nodes, clients, ms(1));
    config.node_link_kind = node_link_kind;
    config.node_links = node_links;
    config.client_links = client_links;
    config.workload = Workload {
        actions,
        duration: ms(duration_ms),
        faults_after,
    };
    config.settle = max_retry_span * 3 + Duration::from_secs(10);
    (seed, config)
}
