//! slim-proto hot paths: name hashing, gRPC framing + protobuf decode, header MAC.

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use prost::Message as _;
use slim_benches::{alice, bob, header, publish};
use slim_proto::name::component_hash;
use slim_proto::{encode_frame, pb, Deframer, HeaderMacKey, Name};

fn name_hashing(c: &mut Criterion) {
    let mut group = c.benchmark_group("name");
    let short = "agntcy";
    let long = "service-discovery-gateway-euwest1"; // 33 bytes
    group.bench_function("component_hash/6B", |b| {
        b.iter(|| component_hash(black_box(short)))
    });
    group.bench_function("component_hash/33B", |b| {
        b.iter(|| component_hash(black_box(long)))
    });
    group.bench_function("Name::new", |b| {
        b.iter(|| Name::new(black_box("agntcy"), black_box("default"), black_box(long)))
    });
    group.finish();
}

fn framing(c: &mut Criterion) {
    let mut group = c.benchmark_group("framing");
    group.throughput(Throughput::Elements(1));
    for payload in [64usize, 1024] {
        let message = publish(header(&alice(), &bob(), 1), payload);
        let frame = encode_frame(&message);
        let label = if payload == 64 { "64B" } else { "1KiB" };
        group.bench_function(format!("encode_frame/{label}"), |b| {
            b.iter(|| encode_frame(black_box(&message)))
        });
        group.bench_function(format!("deframe/{label}"), |b| {
            let mut deframer = Deframer::default();
            b.iter(|| {
                deframer.push(black_box(&frame));
                deframer.next_frame().unwrap().unwrap()
            })
        });
        group.bench_function(format!("deframe+decode/{label}"), |b| {
            let mut deframer = Deframer::default();
            b.iter(|| {
                deframer.push(black_box(&frame));
                let body = deframer.next_frame().unwrap().unwrap();
                pb::Message::decode(body).unwrap()
            })
        });
        let body: Bytes = frame.slice(5..);
        group.bench_function(format!("prost_decode/{label}"), |b| {
            b.iter(|| pb::Message::decode(black_box(body.clone())).unwrap())
        });
        eprintln!("framing/{label}: frame is {} bytes", frame.len());
    }
    group.finish();
}

fn header_mac(c: &mut Criterion) {
    let mut group = c.benchmark_group("header_mac");
    let key = HeaderMacKey::new(
        &[0x42; 32],
        "bench-link-8c1f0e4e-6d2a-4f7b-9a51-3e0c2b7d9f10",
    )
    .unwrap();
    let mut signed = header(&alice(), &bob(), 1);
    key.sign(&mut signed);
    group.bench_function("sign", |b| {
        b.iter_batched_ref(
            || header(&alice(), &bob(), 1),
            |h| key.sign(black_box(h)),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("verify", |b| {
        b.iter(|| key.verify(black_box(&signed)).unwrap())
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = name_hashing, framing, header_mac
}
criterion_main!(benches);
