//! The deterministic simulation (`slim_core::sim`): a seed sweep, determinism, full delivery
//! without loss, planted faults, and the core bugs the simulation found (ignored until fixed).
//!
//! * `SIM_SEED=<n>` runs exactly that seed (every failure message names its seed and this
//!   command); `SIM_LOG=1` prints the run, stamped with simulated time.
//! * `SIM_RUNS=<k>` sets how many seeds the sweep runs (default 100), `SIM_FIRST=<n>` where it
//!   starts (default 0). CI runs `SIM_RUNS=1000 cargo test --release -p slim-core --test sim`.
//! * `SIM_BURSTS=1` adds the scenario family that overflows the sender's retransmission buffer
//!   ([`Swarm::bursts`], off by default until the receiver bug below is fixed).
//! * About 30 % of the seeds also run a group workload ([`Swarm::groups`]); `SIM_NO_GROUPS=1`
//!   turns it off.
//! * About 10 % of the seeds run every session with MLS on ([`Swarm::mls`]); `SIM_NO_MLS=1`
//!   turns it off. `mls_seed_sweep` runs 3/10 of `SIM_RUNS` more seeds with MLS forced on
//!   (replay one with `SIM_SEED=<n> cargo test -p slim-core --test sim mls_seed_sweep`).

use std::cell::RefCell;
use std::panic::{self, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use slim_core::router::ConnectionKind;
use slim_core::session::rto::quiet_give_up;
use slim_core::session::{
    CloseReason, Incoming, ReceiverEvent, Reliability, ReliableReceiver, SessionEvent,
};
use slim_core::sim::{
    self, replay_command, session_info, Action, ClientSpec, FrameView, HostId, LinkFaults, Outcome,
    Report, Side, Sim, SimConfig, Swarm, Workload,
};
use slim_core::Timestamp;
use slim_proto::pb::SessionMessageType as Mt;
use slim_proto::Name;

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
    )
}

fn env_flag(name: &str) -> bool {
    env_u64(name).is_some_and(|v| v != 0)
}

/// One seed of the swarm; a panic inside a core becomes a failure that names the seed.
fn run_swarm_seed(seed: u64, swarm: Swarm, log: bool) -> Result<Report, String> {
    let run = || {
        let mut sim = Sim::new(seed, swarm.config(seed));
        sim.set_log(log);
        if swarm.bursts {
            sim.set_replay(format!("SIM_BURSTS=1 {}", replay_command(seed)));
        }
        sim.run()
    };
    match panic::catch_unwind(AssertUnwindSafe(run)) {
        Ok(Ok(report)) => Ok(report),
        Ok(Err(failure)) => Err(failure.to_string()),
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            Err(format!(
                "seed {seed} (replay: {}): panicked: {what}",
                replay_command(seed)
            ))
        }
    }
}

fn add(total: &mut Outcome, o: &Outcome) {
    total.sessions_opened += o.sessions_opened;
    total.sessions_established += o.sessions_established;
    total.published += o.published;
    total.delivered += o.delivered;
    total.lost += o.lost;
    total.acked += o.acked;
    total.failed += o.failed;
    total.closed += o.closed;
    total.acked_but_lost += o.acked_but_lost;
    total.judged += o.judged;
    total.group_published += o.group_published;
    total.group_delivered += o.group_delivered;
}

/// Runs `run` for every seed on every core; returns the failures (sorted by seed) and the
/// reports of the runs that passed.
fn parallel_runs(
    seeds: &[u64],
    run: impl Fn(u64) -> Result<Report, String> + Sync,
) -> (Vec<(u64, String)>, Vec<Report>) {
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    let reports = Mutex::new(Vec::new());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|scope| {
        for _ in 0..threads.min(seeds.len()) {
            scope.spawn(|| {
                while let Some(&seed) = seeds.get(next.fetch_add(1, Ordering::Relaxed)) {
                    match run(seed) {
                        Ok(report) => reports.lock().unwrap().push(report),
                        Err(failure) => failures.lock().unwrap().push((seed, failure)),
                    }
                }
            });
        }
    });
    let mut failures = failures.into_inner().unwrap();
    failures.sort();
    (failures, reports.into_inner().unwrap())
}

/// The sum of the reports' outcomes.
fn total(reports: &[Report]) -> Outcome {
    let mut totals = Outcome::default();
    for report in reports {
        add(&mut totals, &report.outcome);
    }
    totals
}

/// Runs `seeds` on every core; returns the failures (sorted by seed) and the totals.
fn sweep(seeds: &[u64], swarm: Swarm, log: bool) -> (Vec<(u64, String)>, Outcome) {
    let (failures, reports) = parallel_runs(seeds, |seed| run_swarm_seed(seed, swarm, log));
    (failures, total(&reports))
}

#[test]
fn seed_sweep() {
    let seeds: Vec<u64> = match env_u64("SIM_SEED") {
        Some(seed) => vec![seed],
        None => {
            let first = env_u64("SIM_FIRST").unwrap_or(0);
            (first..first + env_u64("SIM_RUNS").unwrap_or(100)).collect()
        }
    };
    let swarm = Swarm {
        bursts: env_flag("SIM_BURSTS"),
        groups: !env_flag("SIM_NO_GROUPS"),
        mls: !env_flag("SIM_NO_MLS"),
    };
    // Wall time of the sweep, for the log line only (the simulation itself never reads a clock).
    #[allow(clippy::disallowed_methods, clippy::disallowed_types)]
    let started = std::time::Instant::now();
    let (failures, totals) = sweep(&seeds, swarm, env_flag("SIM_LOG"));
    eprintln!(
        "{} seed(s) in {:.1} s: {totals:?}",
        seeds.len(),
        started.elapsed().as_secs_f64()
    );
    fail_on(&failures, seeds.len(), "seeds", 20, 400);
    assert!(totals.published > 0 || seeds.len() < 5, "{totals:?}");
}

/// Two runs of a seed must produce the same trace: every `(now, host, output)` of every core,
/// frames byte for byte. Order-dependent iteration over a randomly seeded map shows up only
/// when two things happen at the same instant, so this runs a fifth of the sweep's seeds (at
/// least 20), twice each.
#[test]
fn same_seed_same_trace() {
    let seeds: Vec<u64> = match env_u64("SIM_SEED") {
        Some(seed) => vec![seed],
        None => (0..(env_u64("SIM_RUNS").unwrap_or(100) / 5).max(20)).collect(),
    };
    let next = AtomicUsize::new(0);
    let differ = Mutex::new(Vec::new());
    let hashes = Mutex::new(Vec::new());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|scope| {
        for _ in 0..threads.min(seeds.len()) {
            scope.spawn(|| {
                while let Some(&seed) = seeds.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let first = sim::run_seed(seed).unwrap_or_else(|f| panic!("{f}"));
                    let second = sim::run_seed(seed).unwrap_or_else(|f| panic!("{f}"));
                    if first != second {
                        differ.lock().unwrap().push(seed);
                    }
                    hashes
                        .lock()
                        .unwrap()
                        .push((first.trace_hash, first.outcome.group_published > 0));
                }
            });
        }
    });
    let mut differ = differ.into_inner().unwrap();
    differ.sort_unstable();
    if let Some(seed) = differ.first() {
        panic!(
            "seed {seed} (replay: {}): two runs of one seed differ (seeds {differ:?})",
            replay_command(*seed)
        );
    }
    // Simultaneity on purpose: one client opens three sessions at the same instant, with the
    // same timers, and publishes on all of them at the same instants, over links without jitter
    // and with loss: its timers for the three sessions fire together, so any order that comes
    // from a map's iteration shows.
    let simultaneous = |seed: u64| {
        let mut config = SimConfig::clean(
            1,
            (0..4)
                .map(|service| ClientSpec { service, node: 0 })
                .collect(),
            ms(2),
        )
        .with_loss(0.2);
        let mut actions = Vec::new();
        for session in 0..3 {
            actions.push((
                ms(0),
                Action::Open {
                    session,
                    client: 0,
                    service: session + 1,
                    reliability: Some(reliability(100, 20)),
                },
            ));
            for n in 0..10 {
                actions.push((
                    ms(500 + 100 * n),
                    Action::Publish {
                        session,
                        side: Side::Initiator,
                        count: 2,
                    },
                ));
            }
        }
        actions.sort_by_key(|(at, _)| *at);
        config.workload = Workload {
            actions,
            duration: ms(2_000),
            faults_after: Duration::ZERO,
        };
        let mut sim = Sim::new(seed, config);
        sim.set_replay("cargo test -p slim-core --test sim same_seed_same_trace");
        sim.run().unwrap_or_else(|f| panic!("{f}"))
    };
    for seed in 0..4 {
        assert_eq!(
            simultaneous(seed),
            simultaneous(seed),
            "simultaneous timers, seed {seed}: two runs differ"
        );
    }
    for seed in 0..2 {
        assert_eq!(
            group_run(seed, group_scenario(0.2)),
            group_run(seed, group_scenario(0.2)),
            "group scenario, seed {seed}: two runs differ"
        );
    }
    let hashes = hashes.into_inner().unwrap();
    assert!(
        seeds.len() < 10 || hashes.iter().any(|(_, group)| *group),
        "the seeds checked include a group workload"
    );
    // Different seeds take different paths.
    let mut hashes: Vec<u64> = hashes.into_iter().map(|(hash, _)| hash).collect();
    hashes.sort_unstable();
    hashes.dedup();
    assert_eq!(hashes.len(), seeds.len());
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// Two clients on two nodes, one reliable session; from 500 ms on, each side publishes
/// `messages` messages, 10 ms apart.
fn one_session(messages: u32, reliability: Reliability) -> SimConfig {
    let mut config = SimConfig::one_session(2, Some(reliability), ms(5));
    let mut actions = std::mem::take(&mut config.workload.actions);
    for n in 0..u64::from(messages) {
        for (offset, side) in [(0, Side::Initiator), (5, Side::Participant)] {
            actions.push((
                ms(500 + 10 * n + offset),
                Action::Publish {
                    session: 0,
                    side,
                    count: 1,
                },
            ));
        }
    }
    config.workload = Workload {
        actions,
        duration: ms(1_000 + 10 * u64::from(messages)),
        faults_after: Duration::ZERO,
    };
    config
}

fn reliability(interval_ms: u64, max_retries: u32) -> Reliability {
    Reliability {
        interval: ms(interval_ms),
        max_retries,
    }
}

#[test]
fn lossless_network_delivers_everything() {
    // The swarm's topologies, workloads, delays, jitter (reordering) and duplication, without
    // loss: every session opens, nothing is reported lost or failed. (The sweep judges its own
    // lossless seeds the same way.)
    let seeds: Vec<u64> = (1000..1000 + env_u64("SIM_RUNS").unwrap_or(100).min(10)).collect();
    for &seed in &seeds {
        let config = SimConfig::swarm(seed).without_loss();
        assert!(!config.lossy());
        let report = Sim::new(seed, config)
            .run()
            .unwrap_or_else(|f| panic!("{f}"));
        let o = &report.outcome;
        assert_eq!(o.lost + o.failed, 0, "seed {seed}: {o:?}");
        assert_eq!(
            o.sessions_established, o.sessions_opened,
            "seed {seed}: {o:?}"
        );
    }
    // A hand-made run: every message delivered once and acknowledged.
    let report = Sim::new(1, one_session(50, reliability(200, 5)))
        .run()
        .unwrap_or_else(|f| panic!("{f}"));
    let o = report.outcome;
    assert_eq!(
        (o.published, o.delivered, o.acked),
        (100, 100, 100),
        "{o:?}"
    );
}

/// Drops every frame, in any phase, about data message `id` of client 0 whose session message
/// type is in `types`: its data and retransmissions (leaving client 0), the peer's acks and
/// retransmission requests (going to client 0).
fn drop_message(id: u32, types: &'static [Mt]) -> sim::Filter {
    Box::new(move |frame: &FrameView| {
        let Some((kind, _, message_id)) = frame.session() else {
            return true;
        };
        let about_client0_data = match kind {
            Mt::Msg | Mt::RtxReply => frame.from == HostId::Client(0),
            Mt::MsgAck | Mt::RtxRequest => frame.to == HostId::Client(0),
            _ => false,
        };
        !(about_client0_data && message_id == id && types.contains(&kind))
    })
}

/// What one client was told, with the simulated time of each event relative to the start of
/// the workload.
type Told = Vec<(Duration, SessionEvent)>;

/// The one-session scenario (6 messages each way, 100 ms x 5 retries) with a planted filter:
/// the report and the events of client 0 (the sender of the planted message) and client 1.
fn planted(filter: sim::Filter) -> (Report, Told, Told) {
    let mut sim = Sim::new(3, one_session(6, reliability(100, 5)));
    sim.set_filter(filter);
    sim.record_events(true);
    let (report, events) = sim.run_with_events().unwrap_or_else(|f| panic!("{f}"));
    let start = report.workload_start;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for recorded in events {
        let told = (recorded.at.saturating_since(start), recorded.event);
        if recorded.client == 0 {
            a.push(told);
        } else {
            b.push(told);
        }
    }
    (report, a, b)
}

fn when(told: &Told, what: impl Fn(&SessionEvent) -> bool) -> Option<Duration> {
    told.iter().find(|(_, e)| what(e)).map(|(at, _)| *at)
}

fn delivered_ids(told: &Told) -> Vec<u32> {
    told.iter()
        .filter_map(|(_, e)| match e {
            SessionEvent::Message { id, .. } => Some(*id),
            _ => None,
        })
        .collect()
}

#[test]
fn planted_loss_is_reported_on_both_sides() {
    // Nothing about message 3 ever crosses: not the data, not a retransmission, not a request
    // for it, not an ack.
    let (report, sender, receiver) = planted(drop_message(
        3,
        &[Mt::Msg, Mt::RtxReply, Mt::RtxRequest, Mt::MsgAck],
    ));
    assert!(report.frames_filtered > 0);
    // Message 3 is published at 520 ms and message 4, which reveals the gap, at 530 ms (+ 15 ms
    // on the wire): after 5 retries backing off from 100 ms (waits of 100, 200, 400, 800, 800
    // and 800 ms: `quiet_give_up`; the 30 ms round trips leave the timeout at the interval),
    // each end gives up exactly on that schedule from where its clock started.
    let lost = when(&receiver, |e| {
        matches!(e, SessionEvent::MessageLost { id: 3, .. })
    });
    let failed = when(&sender, |e| {
        matches!(e, SessionEvent::SendFailed { id: 3, .. })
    });
    let schedule = quiet_give_up(ms(100), 5);
    assert_eq!(schedule, ms(3_100));
    assert_eq!(
        failed,
        Some(ms(520) + schedule),
        "the sender reports message 3 failed: {sender:#?}"
    );
    assert_eq!(
        lost,
        Some(ms(545) + schedule),
        "the receiver reports message 3 lost: {receiver:#?}"
    );
    // The others got through, in order, around the hole; and the other direction is intact.
    assert_eq!(delivered_ids(&receiver), vec![1, 2, 4, 5, 6]);
    assert_eq!(delivered_ids(&sender), vec![1, 2, 3, 4, 5, 6]);
}

/// Core bug (session layer, sender): the data and its retransmissions never arrive, but the
/// receiver's retransmission requests do. The sender counts a request as an acknowledgement (as
/// the reference does) and reports `Delivered` for message 3, while the receiver reports it
/// lost: the two ends disagree, and the sender's application is told a lost message arrived.
/// The swarm sees this too (`Outcome::acked_but_lost`).
#[test]

fn planted_data_loss_is_not_reported_delivered() {
    let (_, sender, receiver) = planted(drop_message(3, &[Mt::Msg, Mt::RtxReply]));
    assert!(when(&receiver, |e| matches!(
        e,
        SessionEvent::MessageLost { id: 3, .. }
    ))
    .is_some());
    assert!(
        when(&sender, |e| matches!(
            e,
            SessionEvent::Delivered { id: 3, .. }
        ))
        .is_none(),
        "the sender says message 3 was delivered, the receiver says it was lost"
    );
}

/// Core bug (session layer, receiver), as the simulation finds it: one session publishes 700
/// messages at once over 10 % loss. The sender's retransmission buffer keeps 512, so lost early
/// messages are answered with "unavailable" (RTX_REPLY with error); the receiver reports those
/// losses out of order, skips ids without reporting them, and reports some twice.
#[test]

fn burst_beyond_the_retransmission_buffer() {
    let mut config = one_session(0, reliability(200, 10)).with_loss(0.1);
    config.workload.actions.push((
        ms(500),
        Action::Publish {
            session: 0,
            side: Side::Initiator,
            count: 700,
        },
    ));
    let mut sim = Sim::new(1, config);
    sim.set_replay(
        "cargo test -p slim-core --test sim burst_beyond_the_retransmission_buffer -- --ignored",
    );
    if let Err(failure) = sim.run() {
        panic!("{failure}");
    }
}

/// Fuzz finding S1 (`fuzz/corpus/session_sim/S1-burst-reordered-reported-lost`): a burst
/// beyond the sender's 512-message window on a network that never loses a frame but reorders
/// (jitter) and duplicates. The old sender evicted messages it had just sent; a receiver that
/// asked for one overtaken by the next was told it was gone and reported it lost (and the
/// sender reported it failed). Now the messages beyond the window wait for acks: nothing is
/// lost, everything is delivered and acknowledged.
#[test]
fn burst_on_a_reordering_lossless_network_loses_nothing() {
    let mut config = one_session(0, reliability(200, 10));
    let jittery = LinkFaults {
        dup: 0.05,
        jitter: ms(22),
        ..LinkFaults::clean(ms(2))
    };
    for link in config
        .node_links
        .iter_mut()
        .chain(config.client_links.iter_mut())
    {
        *link = [jittery.clone(), jittery.clone()];
    }
    config.workload.actions.push((
        ms(500),
        Action::Publish {
            session: 0,
            side: Side::Initiator,
            count: 700,
        },
    ));
    assert!(!config.lossy());
    for seed in 1..=3 {
        let report = Sim::new(seed, config.clone())
            .run()
            .unwrap_or_else(|f| panic!("seed {seed}: {f}"));
        let o = report.outcome;
        assert_eq!(
            (o.published, o.delivered, o.acked, o.lost, o.failed),
            (700, 700, 700, 0, 0),
            "seed {seed}: {o:?}"
        );
    }
}

/// The same receiver bug without the simulation. `ReliableReceiver::on_unavailable` for an id
/// above the next expected one: (1) reports it `Lost` before the earlier gap is resolved;
/// (2) once the earlier gap fills, the messages after the lost id stay held (nothing moves the
/// stream past it); (3) the next message re-requests the lost id and, after the retries, reports
/// it lost a second time.
#[test]

fn receiver_reports_unavailable_gaps_in_order() {
    let src = Name::with_id("o", "n", "src", 1);
    let m = |i: u8| Incoming {
        payload: Bytes::from(vec![i]),
        payload_type: "msg".into(),
        metadata: Default::default(),
    };
    let ids = |events: &[ReceiverEvent]| -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                ReceiverEvent::Deliver { id, .. } => format!("deliver {id}"),
                ReceiverEvent::Lost { id, .. } => format!("lost {id}"),
                ReceiverEvent::RequestRtx { id, .. } => format!("request {id}"),
            })
            .collect()
    };
    let mut r = ReliableReceiver::new(Duration::from_secs(1), 3);
    r.expect(&src, 1);
    let mut events = Vec::new();
    let t = Timestamp::ZERO;
    r.on_message(&src, 1, m(1), t, &mut events);
    r.on_message(&src, 4, m(4), t, &mut events);
    assert_eq!(ids(&events), ["deliver 1", "request 2", "request 3"]);
    events.clear();
    // The sender no longer has 3. Nothing may be reported before 2 is resolved.
    r.on_unavailable(&src.key(), 3, &mut events);
    r.on_message(&src, 2, m(2), t, &mut events);
    assert_eq!(
        ids(&events),
        ["deliver 2", "lost 3", "deliver 4"],
        "in order, and 4 is not left behind"
    );
    events.clear();
    r.on_message(&src, 5, m(5), t, &mut events);
    while let Some(at) = r.poll_timeout() {
        r.handle_timeout(at, &mut events);
    }
    assert_eq!(
        ids(&events),
        ["deliver 5"],
        "3 is not asked for nor lost again"
    );
}

#[test]
fn node_links_can_be_remote() {
    let mut config = one_session(10, reliability(150, 8)).with_loss(0.1);
    config.node_link_kind = ConnectionKind::Remote;
    let report = Sim::new(5, config).run().unwrap_or_else(|f| panic!("{f}"));
    assert!(report.frames_dropped > 0);
    assert_eq!(report.outcome.published, 20);
}

#[test]
fn filters_see_every_session_message_type() {
    let seen = Rc::new(RefCell::new(Vec::new()));
    let log = seen.clone();
    let mut sim = Sim::new(9, one_session(1, reliability(100, 3)));
    sim.set_filter(Box::new(move |frame| {
        if let Some((kind, ..)) = session_info(frame.message) {
            log.borrow_mut().push(kind);
        }
        true
    }));
    sim.run().unwrap_or_else(|f| panic!("{f}"));
    let seen = seen.borrow();
    for kind in [
        Mt::DiscoveryRequest,
        Mt::DiscoveryReply,
        Mt::JoinRequest,
        Mt::JoinReply,
        Mt::GroupWelcome,
        Mt::GroupAck,
        Mt::Msg,
        Mt::MsgAck,
    ] {
        assert!(seen.contains(&kind), "{kind:?} never on the wire");
    }
}

#[test]
fn failures_name_the_seed_and_the_replay_command() {
    // Cut the links during setup: the run cannot even start.
    let mut sim = Sim::new(42, one_session(1, reliability(100, 3)));
    sim.set_filter(Box::new(|_| false));
    let failure = sim.run().expect_err("no link can come up");
    let text = failure.to_string();
    assert!(
        text.starts_with("seed 42 (replay: SIM_SEED=42 cargo test -p slim-core --test sim)"),
        "{text}"
    );
    assert_eq!(failure.seed, 42);
}

/// Core bug (session layer, p2p handshake): the initiator gives up on a session whose welcome
/// the participant received (every welcome ack is lost, so the welcome's retries run out:
/// `Closed(NoAnswer("welcome"))`) without telling the participant. The participant told its
/// application `Incoming`, goes on with a session nobody else has (its messages fail, its
/// heartbeats go nowhere, its peer is eventually reported offline) and is never told `Closed`.
/// Closing the session while the welcome is unanswered does the same (`close` in `Opening`
/// forgets the session locally).
#[test]

fn abandoned_handshake_closes_the_participant() {
    let mut config = one_session(0, reliability(100, 3));
    config.settle = Duration::from_secs(120);
    let mut sim = Sim::new(11, config);
    sim.set_replay("cargo test -p slim-core --test sim abandoned_handshake -- --ignored");
    sim.record_events(true);
    // Every ack of the welcome is lost.
    sim.set_filter(Box::new(|frame| {
        !matches!(frame.session(), Some((Mt::GroupAck, ..)) if frame.from == HostId::Client(1))
    }));
    sim.setup().unwrap_or_else(|f| panic!("{f}"));
    sim.start_workload();
    let end = sim.workload_start() + Duration::from_secs(120);
    sim.run_until(end).unwrap_or_else(|f| panic!("{f}"));
    let events = sim.take_events();
    let told = |client: usize| -> Vec<&SessionEvent> {
        events
            .iter()
            .filter(|e| e.client == client)
            .map(|e| &e.event)
            .collect()
    };
    assert!(
        told(0)
            .iter()
            .any(|e| matches!(e, SessionEvent::Closed { .. })),
        "the initiator gave up: {:#?}",
        told(0)
    );
    assert!(
        told(1)
            .iter()
            .any(|e| matches!(e, SessionEvent::Incoming { .. })),
        "the participant joined: {:#?}",
        told(1)
    );
    assert!(
        told(1)
            .iter()
            .any(|e| matches!(e, SessionEvent::Closed { .. })),
        "the participant is never told: {:#?}",
        told(1)
    );
}

/// A group on one node per member: client 0 moderates, clients 1–3 (on nodes 0, 1, 2) are
/// invited at once; the moderator broadcasts and members publish (fan-in) from 1 s on, client 2
/// is removed at 3 s and everyone goes on publishing. `loss` on every link from 500 ms on.
fn group_scenario(loss: f64) -> SimConfig {
    let mut config = SimConfig::clean(
        3,
        (0..4)
            .map(|service| ClientSpec {
                service,
                node: service % 3,
            })
            .collect(),
        ms(3),
    )
    .with_loss(loss);
    let mut actions = vec![(
        ms(0),
        Action::GroupCreate {
            client: 0,
            reliability: Some(reliability(100, 20)),
        },
    )];
    for member in 1..4 {
        actions.push((ms(10), Action::GroupInvite { member }));
    }
    for n in 0..20 {
        for client in [0, 0, 1, 3] {
            actions.push((
                ms(1_000 + 200 * n),
                Action::GroupPublish { client, count: 2 },
            ));
        }
    }
    actions.push((ms(3_000), Action::GroupRemove { member: 2 }));
    actions.sort_by_key(|(at, _)| *at);
    config.workload = Workload {
        actions,
        duration: ms(6_000),
        faults_after: ms(500),
    };
    config.settle = Duration::from_secs(60);
    config
}

fn group_run(seed: u64, config: SimConfig) -> Report {
    let mut sim = Sim::new(seed, config);
    sim.set_replay("cargo test -p slim-core --test sim group");
    sim.run().unwrap_or_else(|f| panic!("{f}"))
}

#[test]
fn group_on_a_lossless_network() {
    // Jitter-free, lossless: every broadcast and every fan-in message reaches every member
    // that is in the group (the removed member only until its removal), membership agrees
    // (checked by the run), and no member misses the start of a stream.
    let report = group_run(7, group_scenario(0.0));
    let o = &report.outcome;
    assert_eq!(o.group_published, 20 * 4 * 2, "{o:?}");
    // Clients 0, 1, 3 each receive the other two's 80 + 40 + 40 - own messages, client 2 some.
    assert!(o.group_delivered >= 3 * 160 - (80 + 40 + 40), "{o:?}");
}

#[test]
fn group_with_loss_and_a_removal() {
    for seed in 0..3 {
        let mut sim = Sim::new(seed, group_scenario(0.15));
        sim.set_replay("cargo test -p slim-core --test sim group_with_loss_and_a_removal");
        sim.record_events(true);
        let (report, events) = sim.run_with_events().unwrap_or_else(|f| panic!("{f}"));
        assert!(report.frames_dropped > 0);
        assert!(report.outcome.group_delivered > 0, "{:?}", report.outcome);
        // The removal completed: client 2 was told, and so was the moderator.
        assert!(events.iter().any(|e| e.client == 2
            && matches!(
                e.event,
                SessionEvent::Closed {
                    reason: CloseReason::Removed,
                    ..
                }
            )));
        assert!(events
            .iter()
            .any(|e| e.client == 0 && matches!(e.event, SessionEvent::MemberLeft { .. })));
    }
}

/// Found by the sweep (session layer, group receiver; fixed): a member started its stream from a
/// sender at the first id it saw (as the reference does) and dropped earlier ids that arrived
/// after it — yet acknowledged them, so the sender reported `Delivered` for messages the
/// member's application never received. It takes only reordering: in swarm seed 63 the member
/// (client 1) joined at 676 ms, the moderator published ids 1–3 at 1848 ms, jitter delivered 3
/// first. Now the moderator's welcome says where each member's stream starts for the newcomer,
/// streams from later joiners start at 1, and ids below a stream's start are not acknowledged.
#[test]
fn group_stream_starts_at_first_id_seen() {
    let mut sim = Sim::new(63, SimConfig::swarm(63));
    sim.set_replay("cargo test -p slim-core --test sim group_stream_starts_at_first_id_seen");
    if let Err(failure) = sim.run() {
        panic!("{failure}");
    }
}

/// Found by the sweep (session layer, group invite; fixed): when the welcome's acks and the
/// update's retries ran out at the same instant, the moderator reported both `MemberJoined` and
/// `InviteFailed` for the invitee and left it out of its member list, while the invitee
/// (welcomed, `Incoming`) went on as a member. Swarm seed 916: client 2's acks never reach the
/// moderator. Now a failed invite is withdrawn everywhere: one `InviteFailed`, a removal update
/// for the members, and the invitee is asked to leave (again whenever it is heard from).
#[test]
fn failed_invite_leaves_a_member_behind() {
    let mut sim = Sim::new(916, SimConfig::swarm(916));
    sim.set_replay("cargo test -p slim-core --test sim failed_invite_leaves_a_member_behind");
    if let Err(failure) = sim.run() {
        panic!("{failure}");
    }
}

/// Found by the sweep (session layer, group membership; fixed): a `GroupUpdate` that could not
/// reach a member until its retries ran out was given up silently, and nothing resynchronised
/// the member later, so after the network healed its member list lacked the new member for
/// good. Swarm seed 722: client 2 moderates, client 0 joins at 3.4 s, the update announcing it
/// is dropped on a partitioned node→client 1 link for all 15 retries. Now the moderator sends
/// the member list again to a member that missed an update as soon as it hears from it.
#[test]
fn missed_update_leaves_a_stale_member_list() {
    let mut sim = Sim::new(722, SimConfig::swarm(722));
    sim.set_replay("cargo test -p slim-core --test sim missed_update_leaves_a_stale_member_list");
    if let Err(failure) = sim.run() {
        panic!("{failure}");
    }
}

/// Found by a wider sweep while fixing the one above: a resynchronisation sent while a removal
/// was under way (the removed member stays in the moderator's list until it confirms it left)
/// brought the removed member back into the list of a member that had just applied the removal.
/// Swarm seed 6595: client 0's uplink is partitioned until 6.4 s, it misses the update adding
/// client 3, then applies the one removing it, then gets the moderator's resync.
#[test]
fn resync_during_a_removal_does_not_bring_the_member_back() {
    let mut sim = Sim::new(6595, SimConfig::swarm(6595));
    sim.set_replay(
        "cargo test -p slim-core --test sim resync_during_a_removal_does_not_bring_the_member_back",
    );
    if let Err(failure) = sim.run() {
        panic!("{failure}");
    }
}

// ------------------------------------------------------------------ MLS sessions

/// How many swarm seeds (from `SIM_FIRST`) `mls_seed_sweep` runs with MLS forced on: 3/10 of
/// `SIM_RUNS` (at least 10). MLS costs ~0.1–0.5 ms per message and a few ms per commit: the CI
/// sweep's 300 MLS seeds take ~15–25 s in release on two cores (measured), on top of the ~10 %
/// MLS seeds of `seed_sweep`, whose cost is lost in the noise.
fn mls_seeds() -> Vec<u64> {
    match env_u64("SIM_SEED") {
        Some(seed) => vec![seed],
        None => {
            let first = env_u64("SIM_FIRST").unwrap_or(0);
            let runs = (env_u64("SIM_RUNS").unwrap_or(100) * 3 / 10).max(10);
            (first..first + runs).collect()
        }
    }
}

/// A swarm seed with every session (p2p and group) end-to-end encrypted; in odd seeds a
/// removed member ignores its removal and keeps its MLS state.
fn mls_config(seed: u64) -> SimConfig {
    let mut config = SimConfig::swarm(seed).with_mls();
    config.mls_defiant_removal = seed % 2 == 1;
    config
}

fn mls_replay(seed: u64) -> String {
    format!("SIM_SEED={seed} cargo test -p slim-core --test sim mls_seed_sweep")
}

/// The swarm's scenarios with MLS on, every invariant as without it, plus: every member at an
/// epoch has the same epoch authenticator; once settled the moderator's MLS group is exactly
/// the members and everyone is at its epoch; a removed member that kept its MLS state refuses
/// every copy of the data sent after its removal.
#[test]
fn mls_seed_sweep() {
    let seeds = mls_seeds();
    #[allow(clippy::disallowed_methods, clippy::disallowed_types)]
    let started = std::time::Instant::now();
    let (failures, reports) = parallel_runs(&seeds, |seed| {
        let run = || {
            let mut sim = Sim::new(seed, mls_config(seed));
            sim.set_replay(mls_replay(seed));
            sim.set_log(env_flag("SIM_LOG"));
            sim.run()
        };
        match panic::catch_unwind(AssertUnwindSafe(run)) {
            Ok(result) => result.map_err(|failure| failure.to_string()),
            Err(_) => Err(format!("seed {seed} panicked ({})", mls_replay(seed))),
        }
    });
    let totals = total(&reports);
    let epochs: u64 = reports.iter().map(|r| r.mls_epochs).sum();
    let refused: u64 = reports.iter().map(|r| r.removed_refused).sum();
    let withheld: u64 = reports.iter().map(|r| r.frames_withheld).sum();
    eprintln!(
        "{} MLS seed(s) in {:.1} s: {epochs} (group, epoch) pairs compared, {refused} post-removal copies refused, \
         {withheld} frames withheld from defiant removed members; {totals:?}",
        seeds.len(),
        started.elapsed().as_secs_f64()
    );
    fail_on(&failures, seeds.len(), "MLS seeds", 10, 600);
    if seeds.len() >= 10 {
        assert!(totals.published > 0 && epochs > 0, "{totals:?}");
        assert!(
            totals.group_published > 0,
            "the MLS seeds include a group: {totals:?}"
        );
    }
}

/// [`group_scenario`] with MLS: client 2, removed at 3 s, ignores its removal and keeps its MLS
/// state (the sim withholds the group's control messages from it once the removal commit is
/// made); the data sent after the removal still reaches it.
fn mls_group_scenario(loss: f64) -> SimConfig {
    let mut config = group_scenario(loss).with_mls();
    config.mls_defiant_removal = true;
    config
}

/// A p2p session over lossy links with MLS on, every invariant as without MLS, and both ends
/// at one epoch authenticator.
#[test]
fn mls_p2p_on_lossy_links() {
    for seed in 0..4 {
        let mut config = one_session(30, reliability(100, 10))
            .with_mls()
            .with_loss(0.15);
        // The handshake on a clean network, so that both sides publish everything.
        config.workload.faults_after = ms(400);
        let mut sim = Sim::new(seed, config);
        sim.set_replay("cargo test -p slim-core --test sim mls_p2p_on_lossy_links");
        let report = sim.run().unwrap_or_else(|f| panic!("{f}"));
        assert!(report.frames_dropped > 0, "{report:?}");
        assert_eq!(report.outcome.published, 60, "{report:?}");
        assert!(report.outcome.delivered >= 50, "{report:?}");
        // The p2p group: epoch 0 at the initiator alone, epoch 1 once the participant joined.
        assert_eq!(report.mls_epochs, 2, "{report:?}");
    }
}

/// An MLS group over lossy links with a removal: membership and epochs agree once settled,
/// and the removed member, which kept its MLS state, refused every copy of what was sent after
/// its removal (and was given some).
#[test]
fn mls_group_with_loss_and_a_removal() {
    for seed in 0..3 {
        let mut sim = Sim::new(seed, mls_group_scenario(0.1));
        sim.set_replay("cargo test -p slim-core --test sim mls_group_with_loss_and_a_removal");
        sim.record_events(true);
        let (report, events) = sim.run_with_events().unwrap_or_else(|f| panic!("{f}"));
        let o = &report.outcome;
        assert!(
            report.frames_dropped > 0 && o.group_delivered > 0,
            "{report:?}"
        );
        assert!(report.removed_refused > 0, "{report:?}");
        assert!(report.frames_withheld > 0, "{report:?}");
        // Epochs 0 (moderator alone), 3 adds, 1 removal at least.
        assert!(report.mls_epochs >= 5, "{report:?}");
        assert!(events
            .iter()
            .any(|e| e.client == 0 && matches!(e.event, SessionEvent::MemberLeft { .. })));
        assert!(
            !events
                .iter()
                .any(|e| e.client == 2 && matches!(e.event, SessionEvent::Closed { .. })),
            "client 2 ignores its removal"
        );
    }
}

/// Without loss, an MLS group delivers everything a p2p-less group does.
#[test]
fn mls_group_on_a_lossless_network() {
    let report = group_run(7, group_scenario(0.0).with_mls());
    let o = &report.outcome;
    assert_eq!(o.group_published, 20 * 4 * 2, "{o:?}");
    assert!(o.group_delivered >= 3 * 160 - (80 + 40 + 40), "{o:?}");
}

/// With MLS a seed reproduces decisions, not bytes (openmls takes HPKE and signature randomness
/// from the OS): the trace of an MLS run hashes what each frame is (type, session, id, source,
/// destination) and every event with its plaintext, so two runs of a seed agree on it.
#[test]
fn mls_same_seed_same_decisions() {
    for seed in [1, 2, 3] {
        let first = Sim::new(seed, mls_config(seed))
            .run()
            .unwrap_or_else(|f| panic!("{f}"));
        let second = Sim::new(seed, mls_config(seed))
            .run()
            .unwrap_or_else(|f| panic!("{f}"));
        assert_eq!(first, second, "seed {seed}: two MLS runs differ");
    }
    for seed in 0..2 {
        assert_eq!(
            group_run(seed, mls_group_scenario(0.2)),
            group_run(seed, mls_group_scenario(0.2)),
            "MLS group scenario, seed {seed}: two runs differ"
        );
    }
}

/// Client 1 hears nothing from 2.9 s on, so it misses the commit that removes client 2 and,
/// never learning of it (no update, no data or heartbeat at a newer epoch), goes on encrypting
/// at the epoch client 2 still has.
fn cut_client_1_off(sim: &mut Sim) {
    sim.set_filter(Box::new(|frame: &FrameView| {
        !(frame.to == HostId::Client(1) && frame.now >= Timestamp::ZERO + ms(2_900))
    }));
}

/// The removal check bites: with a planted bug (ciphertexts of the last epoch the removed
/// member was in count as sent after its removal) the removed member is given what client 1,
/// which missed the removal commit, encrypts after the removal; it decrypts it, and the run
/// fails naming the check. (Client 1 is cut off entirely: hearing anything at the newer epoch,
/// it would rejoin and stop encrypting at the old one.)
#[test]
fn mls_removal_check_catches_a_readable_message() {
    let mut sim = Sim::new(1, mls_group_scenario(0.0));
    cut_client_1_off(&mut sim);
    sim.plant_stale_removal_epoch();
    let failure = sim
        .run()
        .expect_err("the removed member can read client 1's messages");
    assert!(
        failure
            .message
            .contains("did not refuse a data message client 1"),
        "{failure}"
    );
}

/// Fixed finding (session layer, MLS groups): a member that misses a commit for longer than the
/// update's retries stayed at the old epoch until it heard a heartbeat with a newer one
/// (heartbeats come every 10 s and are skipped while data flows). Here client 1 is cut off from
/// 2.9 s to 5.5 s, while the moderator removes client 2 (at 3 s; the update's 20 retries 100 ms
/// apart run out). Back on the network, client 1 went on encrypting at the epoch client 2 still
/// has, and the removed member, which kept its MLS state, read what client 1 published after
/// the removal completed. Now group data at an epoch it has not reached, a commit it cannot
/// apply yet, or the moderator's early heartbeat (sent when it reads data sealed at an older
/// epoch) start the rejoin at once, and the member's publishes wait for it.
#[test]
fn mls_member_that_missed_the_removal_commit_catches_up() {
    let mut config = mls_group_scenario(0.0);
    for n in 0..30 {
        config.workload.actions.push((
            ms(5_000 + 200 * n),
            Action::GroupPublish {
                client: 1,
                count: 1,
            },
        ));
    }
    config.workload.actions.sort_by_key(|(at, _)| *at);
    config.workload.duration = ms(12_000);
    let mut sim = Sim::new(1, config);
    sim.set_replay(
        "cargo test -p slim-core --test sim mls_member_that_missed_the_removal_commit_catches_up",
    );
    sim.set_filter(Box::new(|frame: &FrameView| {
        let cut = Timestamp::ZERO + ms(2_900)..Timestamp::ZERO + ms(5_500);
        !(frame.to == HostId::Client(1) && cut.contains(&frame.now))
    }));
    if let Err(failure) = sim.run() {
        panic!("{failure}");
    }
}

/// Prints the first `shown` failures of a sweep (each cut to `width` characters) and fails the
/// test with the first one and the list of failed seeds.
fn fail_on(failures: &[(u64, String)], runs: usize, what: &str, shown: usize, width: usize) {
    for (_, failure) in failures.iter().take(shown) {
        let cut: String = failure.chars().take(width).collect();
        eprintln!("{cut}");
    }
    if let Some((_, first)) = failures.first() {
        let failed: Vec<u64> = failures.iter().map(|(seed, _)| *seed).collect();
        panic!(
            "{first}\n({} of {runs} {what} failed: {failed:?})",
            failures.len()
        );
    }
}
