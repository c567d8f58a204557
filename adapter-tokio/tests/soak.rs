//! A bounded soak on loopback: 1 000 client connections (the raw test client: TCP, HTTP/2,
//! OpenChannel, negotiated Edge link, header MACs) exchange steady traffic through one node for a
//! bounded time, while the node's RSS, counters and responsiveness are sampled every second.
//!
//! Traffic: the clients form a ring; client `i` subscribes `org/soak/c<i>` and publishes to client
//! `i + 1`, at `SLIM_SOAK_RATE` messages per second (default 2, so 2 000 messages per second in
//! all: about half a core for node and clients in a debug build), for `SLIM_SOAK_SECS` seconds
//! (default 20, at most 600). Every message carries its sender
//! and a sequence number; every receiver must get *all* of its predecessor's messages, in order
//! (0 lost, 0 duplicated, 0 reordered). Meanwhile a probe pair measures the node's publish round
//! trip, and the router's stats request latency, once a second.
//!
//! The node runs in this process, so the RSS sampled is the node's plus the 1 000 clients'.
//!
//! Environment: `SLIM_SOAK_SECS` (1..=600), `SLIM_SOAK_RATE` (per connection, 1..=100),
//! `SLIM_SOAK_CONNECTIONS` (2..=5000, default 1000), `SLIM_SOAK_VERBOSE` (print each sample as it
//! is taken, for long runs). The whole test takes about 25 s by default.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use slim_proto::pb::message::MessageType;
use slim_proto::Name;
use tokio::sync::{Barrier, Semaphore};
use tokio::task::JoinSet;

/// RSS the whole process (node and clients) must stay under at the end of the soak.
const FINAL_RSS_LIMIT: u64 = 1024 * 1024 * 1024;
/// RSS growth tolerated from the end of the first traffic second to the end of the soak.
const RSS_GROWTH_LIMIT: u64 = 128 * 1024 * 1024;
/// The node must answer a stats request and route a probe publish within this, at every sample.
const RESPONSIVE: Duration = Duration::from_secs(5);
/// Payload bytes per message (sender index, sequence number, padding).
const PAYLOAD: usize = 64;

fn env_or(name: &str, default: u64, range: std::ops::RangeInclusive<u64>) -> u64 {
    match std::env::var(name) {
        Err(_) => default,
        Ok(text) => {
            let value: u64 = text
                .parse()
                .unwrap_or_else(|_| panic!("{name}={text:?} is not a number"));
            assert!(range.contains(&value), "{name}={value} is not in {range:?}");
            value
        }
    }
}

/// Raises the soft RLIMIT_NOFILE towards `wanted` (up to the hard limit); returns the soft limit
/// in force afterwards.
#[allow(clippy::unnecessary_cast)] // rlim_t is u64 on Linux, not everywhere
fn raise_fd_limit(wanted: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if (limit.rlim_cur as u64) < wanted {
            let raised = libc::rlimit {
                rlim_cur: (wanted as libc::rlim_t).min(limit.rlim_max),
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur as u64
}

fn client_name(i: usize) -> Name {
    Name::with_id("org", "soak", &format!("c{i}"), i as u128 + 1)
}

fn payload(sender: usize, seq: u64) -> Vec<u8> {
    let mut blob = Vec::with_capacity(PAYLOAD);
    blob.extend_from_slice(&(sender as u32).to_be_bytes());
    blob.extend_from_slice(&seq.to_be_bytes());
    blob.resize(PAYLOAD, 0xa5);
    blob
}

/// What one client saw.
#[derive(Debug, Default)]
struct Tally {
    sent: u64,
    received: u64,
    errors: Vec<String>,
}

/// Checks one received message: from `from`, with the next sequence number.
fn check(received: &Received, from: usize, expected_seq: u64) -> Result<(), String> {
    let blob = blob_of(&received.message).ok_or_else(|| {
        format!(
            "not a publish: {:?}",
            received.message.message_type.as_ref().map(|t| match t {
                MessageType::SubscriptionAck(_) => "ack",
                MessageType::Link(_) => "link",
                _ => "other",
            })
        )
    })?;
    if blob.len() != PAYLOAD {
        return Err(format!("payload of {} bytes", blob.len()));
    }
    let sender = u32::from_be_bytes(blob[0..4].try_into().unwrap()) as usize;
    let seq = u64::from_be_bytes(blob[4..12].try_into().unwrap());
    if sender != from {
        return Err(format!("message from {sender}, expected {from}"));
    }
    if seq != expected_seq {
        return Err(format!("sequence {seq}, expected {expected_seq}"));
    }
    Ok(())
}

/// One client's life: send to `to` every `period` until `stop`, receiving from `from` meanwhile;
/// then, once every client stopped sending, receive the rest of what `from` sent.
#[allow(clippy::too_many_arguments)]
async fn run_client(
    mut client: Client,
    me: usize,
    from: usize,
    to: usize,
    period: Duration,
    stop: Arc<AtomicBool>,
    sent_counts: Arc<Vec<AtomicU64>>,
    all_stopped: Arc<Barrier>,
) -> (Client, Tally) {
    let my_name = client_name(me);
    let to_name = client_name(to);
    let mut tally = Tally::default();
    // Spread the clients' sends over the period.
    let offset = period.mul_f64((me as f64 * 0.618_034) % 1.0);
    let mut next_send = tokio::time::Instant::now() + offset;
    while !stop.load(Ordering::Relaxed) {
        let now = tokio::time::Instant::now();
        if now >= next_send {
            client.publish(&my_name, &to_name, 1, &payload(me, tally.sent));
            tally.sent += 1;
            next_send += period;
            continue;
        }
        match client.next_within(next_send - now).await {
            None => {}
            Some(Next::Message(received)) => {
                if let Err(error) = check(&received, from, tally.received) {
                    tally.errors.push(error);
                }
                tally.received += 1;
            }
            Some(Next::End) => {
                tally.errors.push("the node ended the stream".into());
                return (client, tally);
            }
        }
    }
    sent_counts[me].store(tally.sent, Ordering::SeqCst);
    all_stopped.wait().await;
    let expected = sent_counts[from].load(Ordering::SeqCst);
    while tally.received < expected {
        match client.next_within(TIMEOUT).await {
            Some(Next::Message(received)) => {
                if let Err(error) = check(&received, from, tally.received) {
                    tally.errors.push(error);
                }
                tally.received += 1;
            }
            Some(Next::End) => {
                tally.errors.push("the node ended the stream".into());
                break;
            }
            None => {
                tally.errors.push(format!(
                    "{} of {expected} messages from c{from} never arrived",
                    expected - tally.received
                ));
                break;
            }
        }
    }
    // Nothing more may come (a duplicate would show here).
    if let Some(Next::Message(extra)) = client.next_within(Duration::from_millis(50)).await {
        tally
            .errors
            .push(format!("unexpected extra message {:?}", extra.message));
    }
    (client, tally)
}

/// One second of the node's life.
struct Sample {
    at: Duration,
    rss: u64,
    received: u64,
    forwarded: u64,
    connections: u64,
    stats_latency: Duration,
    probe_round_trip: Duration,
}

#[tokio::test(flavor = "multi_thread")]
async fn soak_1000_connections() {
    let secs = env_or("SLIM_SOAK_SECS", 20, 1..=600);
    let rate = env_or("SLIM_SOAK_RATE", 2, 1..=100);
    let wanted = env_or("SLIM_SOAK_CONNECTIONS", 1000, 2..=5000) as usize;
    // Two descriptors per connection (client and node side), plus the probes and the runtime.
    let fd_limit = raise_fd_limit(2 * wanted as u64 + 256);
    let connections = wanted.min((fd_limit.saturating_sub(256) / 2) as usize);
    if connections < wanted {
        println!(
            "soak: RLIMIT_NOFILE is {fd_limit} and cannot be raised: {connections} connections \
             instead of {wanted}"
        );
    }
    assert!(connections >= 2, "no file descriptors to soak with");
    let period = Duration::from_secs(1) / rate as u32;
    let test_started = Instant::now();
    let rss_start = rss_bytes();

    let node = start_node().await;
    let addr = node_addr(&node);

    // ---- connect everybody (64 handshakes at a time)
    let gate = Arc::new(Semaphore::new(64));
    let mut connecting = JoinSet::new();
    for i in 0..connections {
        let gate = gate.clone();
        connecting.spawn(async move {
            let _permit = gate.acquire().await.unwrap();
            let mut client = Client::connect_negotiated(addr, &format!("c{i}")).await;
            client.subscribe(&client_name(i), i as u64 + 1).await;
            (i, client)
        });
    }
    let mut clients: Vec<Option<Client>> = (0..connections).map(|_| None).collect();
    while let Some(joined) = connecting.join_next().await {
        let (i, client) = joined.expect("a client connects");
        clients[i] = Some(client);
    }
    let mut probe_tx = Client::connect_negotiated(addr, "probe-tx").await;
    let mut probe_rx = Client::connect_negotiated(addr, "probe-rx").await;
    let (probe_tx_name, probe_rx_name) = (
        Name::with_id("org", "soak", "probe-tx", 1),
        Name::with_id("org", "soak", "probe-rx", 1),
    );
    probe_rx.subscribe(&probe_rx_name, 1).await;
    let setup = stats(&node).await;
    assert_eq!(setup.connections, connections as u64 + 2);
    assert_eq!(setup.subscriptions, connections as u64 + 1);
    let connected_in = test_started.elapsed();
    let rss_connected = rss_bytes();
    println!(
        "soak: {connections} connections negotiated and subscribed in {connected_in:?}; \
         RSS {:.1} MiB (was {:.1} MiB before the node started)",
        mib(rss_connected),
        mib(rss_start)
    );

    // ---- traffic
    let stop = Arc::new(AtomicBool::new(false));
    let sent_counts: Arc<Vec<AtomicU64>> =
        Arc::new((0..connections).map(|_| AtomicU64::new(0)).collect());
    let all_stopped = Arc::new(Barrier::new(connections));
    let mut running = JoinSet::new();
    for (i, client) in clients.iter_mut().enumerate() {
        let client = client.take().unwrap();
        running.spawn(run_client(
            client,
            i,
            (i + connections - 1) % connections,
            (i + 1) % connections,
            period,
            stop.clone(),
            sent_counts.clone(),
            all_stopped.clone(),
        ));
    }
    let traffic_started = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    let mut probe_seq = 0u64;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    for _ in 0..secs {
        ticker.tick().await;
        let t = Instant::now();
        let node_stats = within("node stats", node.stats())
            .await
            .expect("the node is running");
        let stats_latency = t.elapsed();
        let t = Instant::now();
        probe_seq += 1;
        let sent = probe_tx.publish(
            &probe_tx_name,
            &probe_rx_name,
            1,
            format!("probe {probe_seq}").as_bytes(),
        );
        probe_rx.expect_copy_of(&sent).await;
        let probe_round_trip = t.elapsed();
        if std::env::var_os("SLIM_SOAK_VERBOSE").is_some() {
            println!(
                "soak: t={:?} RSS {:.1} MiB received {} forwarded {} stats {stats_latency:?} \
                 probe {probe_round_trip:?}",
                traffic_started.elapsed(),
                mib(rss_bytes()),
                node_stats.router.received,
                node_stats.router.forwarded
            );
        }
        samples.push(Sample {
            at: traffic_started.elapsed(),
            rss: rss_bytes(),
            received: node_stats.router.received,
            forwarded: node_stats.router.forwarded,
            connections: node_stats.router.connections,
            stats_latency,
            probe_round_trip,
        });
    }
    stop.store(true, Ordering::Relaxed);
    let traffic_time = traffic_started.elapsed();

    // ---- collect
    let mut totals = Tally::default();
    let mut finished = Vec::new();
    while let Some(joined) = within("every client to finish", running.join_next()).await {
        let (client, tally) = joined.expect("a client task");
        totals.sent += tally.sent;
        totals.received += tally.received;
        totals.errors.extend(
            tally
                .errors
                .into_iter()
                .map(|e| format!("{}: {e}", client.label)),
        );
        finished.push(client);
    }
    let end_stats = wait_for_node_stats(&node, "stats", |_| true).await;
    let rss_end = rss_bytes();

    // ---- report
    println!(
        "soak: {:>4} {:>9} {:>10} {:>10} {:>7} {:>9} {:>9}",
        "t/s", "RSS/MiB", "received", "forwarded", "conns", "stats/ms", "probe/ms"
    );
    let mut previous = setup.forwarded;
    for s in &samples {
        println!(
            "soak: {:>4.0} {:>9.1} {:>10} {:>10} {:>7} {:>9.1} {:>9.1}   ({} msg/s)",
            s.at.as_secs_f64(),
            mib(s.rss),
            s.received,
            s.forwarded,
            s.connections,
            s.stats_latency.as_secs_f64() * 1e3,
            s.probe_round_trip.as_secs_f64() * 1e3,
            s.forwarded - previous
        );
        previous = s.forwarded;
    }
    let worst_stats = samples.iter().map(|s| s.stats_latency).max().unwrap();
    let worst_probe = samples.iter().map(|s| s.probe_round_trip).max().unwrap();
    let rss_first = samples.first().map_or(rss_connected, |s| s.rss);
    let rss_peak = samples.iter().map(|s| s.rss).max().unwrap_or(rss_end);
    println!(
        "soak: {connections} connections, {rate} msg/s each, {traffic_time:?} of traffic: \
         {} sent, {} received, {} errors; node forwarded {} and dropped {:?} (slow consumer: {}); \
         RSS connected {:.1} MiB, after 1 s {:.1} MiB, peak {:.1} MiB, end {:.1} MiB; \
         worst stats latency {worst_stats:?}, worst probe round trip {worst_probe:?}",
        totals.sent,
        totals.received,
        totals.errors.len(),
        end_stats.router.forwarded - setup.forwarded,
        end_stats.router.drops().collect::<Vec<_>>(),
        end_stats.slow_consumer_drops,
        mib(rss_connected),
        mib(rss_first),
        mib(rss_peak),
        mib(rss_end),
    );

    // ---- verdict
    assert!(
        totals.errors.is_empty(),
        "{} errors, e.g. {:?}",
        totals.errors.len(),
        &totals.errors[..totals.errors.len().min(10)]
    );
    assert_eq!(totals.received, totals.sent, "every message arrived");
    assert!(
        totals.sent >= connections as u64 * rate * secs / 2,
        "the clients kept their pace: {} sent",
        totals.sent
    );
    assert_eq!(end_stats.router.dropped_total(), 0, "{end_stats:#?}");
    assert_eq!(end_stats.slow_consumer_drops, 0);
    assert_eq!(
        end_stats.router.forwarded - setup.forwarded,
        totals.sent + probe_seq
    );
    assert!(
        worst_stats < RESPONSIVE && worst_probe < RESPONSIVE,
        "the node answered slowly: stats {worst_stats:?}, probe {worst_probe:?}"
    );
    assert!(
        rss_end < FINAL_RSS_LIMIT,
        "RSS {:.1} MiB at the end",
        mib(rss_end)
    );
    assert!(
        rss_end < rss_first + RSS_GROWTH_LIMIT,
        "RSS grew by {:.1} MiB during the soak",
        mib(rss_end) - mib(rss_first)
    );

    // ---- everybody leaves: the node forgets them all
    drop(finished);
    drop(probe_tx);
    drop(probe_rx);
    let gone = wait_for_stats(
        &node,
        "every connection and subscription to be removed",
        |s| s.connections == 0 && s.subscriptions == 0,
    )
    .await;
    assert_eq!(gone.dropped_total(), 0);
    within("node shutdown", node.shutdown()).await;
    println!(
        "soak: all gone, RSS {:.1} MiB; the whole test took {:?}",
        mib(rss_bytes()),
        test_started.elapsed()
    );
}
