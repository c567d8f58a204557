//! Session-core throughput through the deterministic simulation (`slim_core::sim`): one reliable
//! p2p session between two applications on one node, 1000 messages per iteration, on a clean
//! network and with 5 % loss on every link direction.
//!
//! Everything a message costs in the cores is measured: the sender's session layer (sequence
//! ids, retransmission buffer, its identity token: one per second for data messages), the
//! client router (local connection → Edge uplink, header MAC), the node router (MAC check, TTL,
//! table lookup, re-sign, re-encode), the receiving client router and session layer (token
//! check, ordering, ack), and the ack's way back; with loss, also retransmissions and gap
//! requests. Setup (link negotiation, subscriptions) and the session handshake run before the
//! measured part, on a clean network; time in the simulation is free, so the numbers are pure
//! CPU.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use slim_core::session::Reliability;
use slim_core::sim::{Action, Side, Sim, SimConfig, Workload};

const MESSAGES: u32 = 1000;
/// The handshake finishes well within this, on the clean network (1 ms per hop).
const HANDSHAKE: Duration = Duration::from_millis(100);

fn scenario(loss: f64) -> SimConfig {
    let reliability = Reliability {
        interval: Duration::from_millis(100),
        max_retries: 10,
    };
    let mut config =
        SimConfig::one_session(1, Some(reliability), Duration::from_millis(1)).with_loss(loss);
    let mut actions = std::mem::take(&mut config.workload.actions);
    // One message per simulated millisecond: the retransmission buffer (512) never overflows.
    actions.extend((0..u64::from(MESSAGES)).map(|n| {
        (
            HANDSHAKE + Duration::from_millis(n),
            Action::Publish {
                session: 0,
                side: Side::Initiator,
                count: 1,
            },
        )
    }));
    config.workload = Workload {
        actions,
        duration: HANDSHAKE + Duration::from_millis(u64::from(MESSAGES)),
        faults_after: HANDSHAKE,
    };
    config
}

/// A simulation with the session established, about to publish.
fn ready(seed: u64, loss: f64) -> Sim {
    let mut sim = Sim::new(seed, scenario(loss));
    sim.setup().expect("setup");
    sim.start_workload();
    let until = sim.workload_start() + (HANDSHAKE - Duration::from_millis(1));
    sim.run_until(until).expect("handshake");
    assert_eq!(sim.outcome().sessions_established, 1);
    sim
}

fn session_throughput(c: &mut Criterion) {
    let mut group = c.benchmark_group("session_sim");
    group.throughput(Throughput::Elements(u64::from(MESSAGES)));
    for (name, loss) in [
        ("p2p_reliable_1000/loss_0", 0.0),
        ("p2p_reliable_1000/loss_5", 0.05),
    ] {
        let mut seed = 0u64;
        group.bench_function(name, |b| {
            b.iter_batched(
                || {
                    seed += 1;
                    ready(seed, loss)
                },
                |mut sim| {
                    let heal = sim.heal_time();
                    sim.run_until(heal).expect("workload");
                    let report = sim.heal_and_settle().expect("settle");
                    let o = &report.outcome;
                    assert_eq!(o.published, u64::from(MESSAGES));
                    assert!(o.delivered + o.lost <= u64::from(MESSAGES), "{o:?}");
                    assert!(o.delivered >= u64::from(MESSAGES) * 9 / 10, "{o:?}");
                    report
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(10));
    targets = session_throughput
}
criterion_main!(benches);
