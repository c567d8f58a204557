//! Routing decisions against 100 000 subscriptions: the table alone, then the whole
//! `Router::handle_frame` path (decode, MAC verify, TTL, lookup, re-sign, encode).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use slim_benches::{
    alice, any_instance, bob, channel, drain, instance_key, populate_table, service, RoutedNode,
    CHANNEL_SUBSCRIBERS, INSTANCES, SERVICES,
};
use slim_core::router::{ConnectionKind, MatchFilter, SubscriptionTable};
use slim_core::Timestamp;

const FILTER: MatchFilter = MatchFilter {
    exclude_peers: false,
};
/// The connection a benchmarked message arrives on (not subscribed to anything).
const INCOMING: u64 = 7;

fn table_lookup(c: &mut Criterion) {
    let mut table = SubscriptionTable::default();
    populate_table(&mut table);
    let channel = channel().key();
    for i in 0..CHANNEL_SUBSCRIBERS as u64 {
        table.add(500 + i, ConnectionKind::Edge, channel, 1);
    }
    assert_eq!(
        table.record_count(),
        SERVICES * INSTANCES + CHANNEL_SUBSCRIBERS
    );
    // A service in the middle of the table, one of its instances.
    let svc = service(SERVICES / 2).key();
    let unicast = instance_key(svc, INSTANCES / 3);
    let anycast = any_instance(svc);
    assert!(table.match_one(&unicast, INCOMING, FILTER).is_some());

    let mut group = c.benchmark_group("table_100k");
    group.throughput(Throughput::Elements(1));
    group.bench_function("match_one/unicast", |b| {
        b.iter(|| table.match_one(black_box(&unicast), INCOMING, FILTER))
    });
    group.bench_function("match_one/anycast_50_instances", |b| {
        b.iter(|| table.match_one(black_box(&anycast), INCOMING, FILTER))
    });
    let mut out = Vec::with_capacity(16);
    group.bench_function("match_all/channel_10_subscribers", |b| {
        b.iter(|| {
            out.clear();
            table.match_all(black_box(&channel), INCOMING, FILTER, &mut out);
            black_box(out.len())
        })
    });
    // Varied destinations: unicast to a different service each time (cache-unfriendly).
    let keys: Vec<_> = (0..4096)
        .map(|i| instance_key(service((i * 7919) % SERVICES).key(), i % INSTANCES))
        .collect();
    let mut next = 0usize;
    group.bench_function("match_one/unicast_varied", |b| {
        b.iter(|| {
            next = (next + 1) & 4095;
            table.match_one(black_box(&keys[next]), INCOMING, FILTER)
        })
    });
    group.finish();
}

fn router_path(c: &mut Criterion) {
    let started = std::time::Instant::now();
    let mut node = RoutedNode::new();
    eprintln!(
        "router: built a node with {} subscriptions on {} connections in {:.1?}",
        node.router.stats().subscriptions,
        node.router.stats().connections,
        started.elapsed()
    );
    let mut group = c.benchmark_group("router_100k");
    group.throughput(Throughput::Elements(1));
    for (label, payload) in [("64B", 64usize), ("1KiB", 1024)] {
        let body = node.alice.publish_body(&alice(), &bob(), 1, payload);
        let router = &mut node.router;
        let from = node.alice.conn;
        router.handle_frame(from, body.clone(), Timestamp::ZERO);
        assert_eq!(drain(router), 1, "the publish reaches bob");
        let forwarded = router.stats().forwarded;
        group.bench_function(format!("handle_frame+drain/unicast/{label}"), |b| {
            b.iter(|| {
                router.handle_frame(from, black_box(body.clone()), Timestamp::ZERO);
                drain(router)
            })
        });
        assert!(router.stats().forwarded > forwarded);
        assert_eq!(router.stats().dropped_total(), 0, "nothing was dropped");
    }
    group.finish();
    let _ = node.bob.conn;
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = table_lookup, router_path
}
criterion_main!(benches);
