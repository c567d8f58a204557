//! A congestion episode in the deterministic simulation: the path's delay rises far above the
//! retransmission interval for a while, then drops back. What the adaptive timers (round-trip
//! estimate, backoff: `slim_core::session::rto`) must show: few retransmissions and RTX
//! requests compared with a fixed interval, and still every message delivered once, in order,
//! and acknowledged.
//!
//! The fixed-interval numbers in the comments were measured with the same scenarios on the
//! code before the adaptive timers (every unacknowledged message re-sent every interval).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use slim_core::session::Reliability;
use slim_core::sim::{
    Action, Congestion, FrameView, HostId, Report, Side, Sim, SimConfig, Window, Workload,
};
use slim_proto::pb::SessionMessageType as Mt;

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// Publishing runs from 0.5 s to 20.5 s, 10 messages a second.
const MESSAGES: u32 = 200;
const PERIOD_MS: u64 = 100;
const FIRST_MS: u64 = 500;
/// The episode on the node-to-node link, both directions: the one-way delay ramps up from
/// ~15 ms to ~165 ms at 3 s, to ~615 ms at 5 s (a round trip of ~1.2 s, 6 intervals), back to
/// ~315 ms at 11 s and ~15 ms at 13 s.
const EPISODE: [(u64, u64, u64); 3] = [
    (3_000, 5_000, 150),
    (5_000, 11_000, 600),
    (11_000, 13_000, 300),
];

/// Two clients on two nodes, one reliable session (200 ms x 10 retries), client 0 publishing
/// [`MESSAGES`]; `loss` on the node link from the episode's start to the end of publishing.
fn scenario(loss: f64) -> SimConfig {
    let reliability = Reliability {
        interval: ms(200),
        max_retries: 10,
    };
    let mut config = SimConfig::one_session(2, Some(reliability), ms(5));
    let mut actions = std::mem::take(&mut config.workload.actions);
    for n in 0..u64::from(MESSAGES) {
        actions.push((
            ms(FIRST_MS + PERIOD_MS * n),
            Action::Publish {
                session: 0,
                side: Side::Initiator,
                count: 1,
            },
        ));
    }
    config.workload = Workload {
        actions,
        duration: ms(FIRST_MS + PERIOD_MS * u64::from(MESSAGES) + 500),
        faults_after: Duration::ZERO,
    };
    for faults in &mut config.node_links[0] {
        faults.congestion = EPISODE
            .iter()
            .map(|&(start, end, extra)| Congestion {
                window: Window {
                    start: ms(start),
                    end: ms(end),
                },
                extra: ms(extra),
            })
            .collect();
        faults.loss = loss;
    }
    // Faults (the loss) from the episode's start on; congestion windows count from the
    // workload's start either way.
    config.workload.faults_after = ms(EPISODE[0].0);
    config
}

/// What went over client 0's and client 1's uplinks, by phase of the episode.
#[derive(Debug, Default)]
struct Counts {
    /// MSG frames client 0 sent per message id (1 = never retransmitted).
    copies: BTreeMap<u32, u32>,
    /// Retransmissions (MSG copies beyond the first) sent before, during and after the episode.
    retransmitted: [u32; 3],
    /// RTX_REQUESTs client 1 sent, before, during and after the episode.
    requests: [u32; 3],
}

fn phase(offset: Duration) -> usize {
    if offset < ms(EPISODE[0].0) {
        0
    } else if offset < ms(EPISODE[2].1) {
        1
    } else {
        2
    }
}

fn run(config: SimConfig) -> (Report, Counts) {
    let counts = Rc::new(RefCell::new(Counts::default()));
    let seen = counts.clone();
    let mut sim = Sim::new(7, config);
    sim.setup().unwrap_or_else(|f| panic!("{f}"));
    let start = sim.now();
    sim.set_filter(Box::new(move |frame: &FrameView| {
        let Some((kind, _, id)) = frame.session() else {
            return true;
        };
        let offset = frame.now.saturating_since(start);
        let mut c = seen.borrow_mut();
        match (kind, frame.from) {
            (Mt::Msg, HostId::Client(0)) => {
                let copies = c.copies.entry(id).or_default();
                *copies += 1;
                if *copies > 1 {
                    c.retransmitted[phase(offset)] += 1;
                }
            }
            (Mt::RtxRequest, HostId::Client(1)) => c.requests[phase(offset)] += 1,
            _ => {}
        }
        true
    }));
    sim.start_workload();
    sim.run_until(sim.heal_time())
        .unwrap_or_else(|f| panic!("{f}"));
    let report = sim.heal_and_settle().unwrap_or_else(|f| panic!("{f}"));
    let counts = counts.take();
    (report, counts)
}

/// Everything published was delivered once, in order (the simulation's model checks order and
/// duplicates as it goes), and acknowledged; nothing lost or failed.
fn all_delivered(report: &Report) {
    let o = &report.outcome;
    assert_eq!(
        (o.published, o.delivered, o.acked, o.lost, o.failed),
        (
            u64::from(MESSAGES),
            u64::from(MESSAGES),
            u64::from(MESSAGES),
            0,
            0
        ),
        "{o:?}"
    );
}

/// The path's round trip goes from ~30 ms to ~1.2 s (6 intervals) for 6 s, then back. With the
/// fixed 200 ms timer every message sent in the episode was re-sent every 200 ms until its ack
/// came back: 430 retransmissions (0 before, 421 during, 9 after), 4.3 copies per message sent
/// in the episode. With the estimate and the backoff: 22, all at the steps up (3 at 3 s, 19 at
/// 5 s: each message sent until an ack of a message sent once shows the new delay, ~1.9 s,
/// goes out twice), none once the estimate has learnt it, none after.
#[test]
fn a_congestion_episode_does_not_multiply_the_traffic() {
    let (report, counts) = run(scenario(0.0));
    all_delivered(&report);
    assert_eq!(counts.copies.len(), MESSAGES as usize, "every id went out");
    assert_eq!(
        counts.retransmitted[0], 0,
        "nothing re-sent before the episode"
    );
    assert_eq!(counts.retransmitted[2], 0, "nor after it");
    assert!(
        counts.retransmitted[1] <= 40,
        "at most 40 retransmissions in the episode (421 with the fixed timer): {counts:?}"
    );
    assert_eq!(
        counts.requests,
        [0, 0, 0],
        "no gaps: the queue keeps the order"
    );
}

/// The same episode with 5 % loss each way on the congested link from its start on: the losses
/// are recovered by retransmissions and RTX requests, which now back off too. With the fixed
/// 200 ms timers: 439 retransmissions (0 / 427 / 12) and 4 RTX requests (the flood of copies
/// filled most gaps before they were asked for); now 32 and 11.
#[test]
fn losses_in_a_congestion_episode_are_recovered_without_a_storm() {
    let (report, counts) = run(scenario(0.05));
    all_delivered(&report);
    let retransmitted: u32 = counts.retransmitted.iter().sum();
    let requests: u32 = counts.requests.iter().sum();
    assert!(
        retransmitted <= 60 && retransmitted + requests <= 80,
        "at most 60 retransmissions and 80 recovery frames in all (439 and 443 with the fixed \
         timers): {counts:?}"
    );
}
