//! One session layer with many sessions: what a driver pays per input for the layer's next
//! deadline. A driver asks for it (`poll_timeout`) after every message, command or timer, so it
//! must not grow with the number of sessions an application holds.
//!
//! Each iteration touches one session (a publish, refused because the session is still
//! handshaking, but the session is looked up for change all the same) and then asks for the
//! deadline.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use slim_core::session::{LayerConfig, SessionConfig, SessionId, SessionLayer};
use slim_core::Timestamp;
use slim_proto::Name;

fn layer_with(sessions: usize) -> (SessionLayer, Vec<SessionId>) {
    let mut layer = SessionLayer::new(
        LayerConfig {
            name: Name::new("org", "ns", "server"),
            secret: "0123456789abcdef0123456789abcdef".into(),
            unix_at_zero: 1_795_600_000,
        },
        [1; 32],
    )
    .expect("a valid layer config");
    let ids = (0..sessions)
        .map(|i| {
            layer.create_session(
                &Name::new("org", "ns", &format!("peer{i}")),
                SessionConfig::default(),
                Timestamp::ZERO,
            )
        })
        .collect();
    while layer.poll_output().is_some() {}
    (layer, ids)
}

fn touch_then_poll_timeout(c: &mut Criterion) {
    let mut group = c.benchmark_group("session_layer/touch_then_poll_timeout");
    for sessions in [1usize, 100, 10_000] {
        let (mut layer, ids) = layer_with(sessions);
        let mut next = 0;
        group.bench_function(BenchmarkId::from_parameter(sessions), |b| {
            b.iter(|| {
                let id = ids[next % ids.len()];
                next += 1;
                let refused = layer.publish(id, Bytes::new(), Timestamp::ZERO).is_err();
                (refused, layer.poll_timeout())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, touch_then_poll_timeout);
criterion_main!(benches);
