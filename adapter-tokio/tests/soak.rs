//! Bounded soaks on loopback, each sampling the process's RSS, the node's counters and its
//! responsiveness (router stats latency, and the round trip of a probe publish between two raw
//! clients) once a second. The two tests run one after the other (they would skew each other's
//! timings).
//!
//! * `soak_reliable_sessions`: applications, each with its own connection to one node (our
//!   session `App`: its own client router, a negotiated Edge link with header MACs, a session
//!   layer), form a ring; app `i` opens a reliable p2p session to `org/soak/a<i+1>` and
//!   publishes on it at `SLIM_SOAK_RATE` messages per second (default 2). What it measures is
//!   **messages lost, which must be 0**: every receiver must get all of its predecessor's
//!   messages, exactly once and in order; every sender must see every message `Delivered`
//!   (acknowledged); no `MessageLost`, `SendFailed`, session close or offline peer may occur; the
//!   node's drop counters must stay at 0. 1 000 apps in an optimised build; 50 in a debug build
//!   (CI), because each session handshake signs and verifies its control messages with ECDSA
//!   P-256, which costs ≈ 0.3 s of CPU per session without optimisations.
//! * `soak_1000_connections`: 1 000 raw clients (the test client of `common`: TCP, HTTP/2,
//!   OpenChannel, negotiated Edge link, header MACs) in a ring, client `i` publishing to client
//!   `i + 1` at `SLIM_SOAK_RATE` per second; every receiver must get *all* of its predecessor's
//!   messages, in order (0 lost, 0 duplicated, 0 reordered), with no retransmission to hide a
//!   node drop.
//!
//! The node runs in this process, so the RSS sampled is the node's plus the clients'.
//!
//! Environment: `SLIM_SOAK_SECS` (1..=600; default 15 for sessions, 10 for raw),
//! `SLIM_SOAK_RATE` (per client, 1..=100), `SLIM_SOAK_SESSIONS` (apps, 2..=5000),
//! `SLIM_SOAK_CONNECTIONS` (raw clients, 2..=5000, default 1000), `SLIM_SOAK_VERBOSE` (print
//! each sample as it is taken, for long runs). A long run:
//!
//! ```sh
//! SLIM_SOAK_SECS=300 SLIM_SOAK_VERBOSE=1 cargo test --release -p adapter-tokio --test soak \
//!     soak_reliable_sessions -- --nocapture
//! ```

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use slim_proto::pb::message::MessageType;
use slim_proto::Name;
use slim_tokio::session::{App, Reliability, SessionConfig, SessionEvent, SessionId};
use slim_tokio::Node;
use tokio::sync::{Barrier, Semaphore};
use tokio::task::JoinSet;

/// RSS the whole process (node and clients) must stay under at the end of a soak.
const FINAL_RSS_LIMIT: u64 = 2 * 1024 * 1024 * 1024;
/// RSS growth tolerated from the end of the first traffic second to the end of a soak.
const RSS_GROWTH_LIMIT: u64 = 192 * 1024 * 1024;
/// The node must answer a stats request and route a probe publish within this, at every sample.
const RESPONSIVE: Duration = Duration::from_secs(5);
/// Payload bytes per message (sender index, sequence number, padding).
const PAYLOAD: usize = 64;
/// The apps' shared secret (at least 32 bytes).
const SECRET: &str = "slim-soak-shared-secret-0123456789abcdef";
/// Retransmission of unacknowledged messages: the session layer's own recovery. On loopback
/// nothing should need it; if something does, 10 retries a second apart recover it.
const RELIABILITY: Reliability = Reliability {
    interval: Duration::from_secs(1),
    max_retries: 10,
};
/// After the senders stop, how long the last messages and acks may take: the whole
/// retransmission schedule (88 s with backoff), so that a recovered message still counts as
/// delivered. Only a soak that is losing messages waits it out.
fn drain_time() -> Duration {
    RELIABILITY.give_up_bound() + Duration::from_secs(2)
}
/// Concurrent connects and session handshakes.
const CONNECTING: usize = 32;
/// How long a probe publish is waited for before the soak stops (and then fails).
const PROBE_WAIT: Duration = Duration::from_secs(15);

/// The soaks run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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

/// How many clients fit in the descriptors (two per connection: client and node side, plus the
/// probes and the runtime); says so when fewer than `wanted`.
fn clients_that_fit(wanted: usize) -> usize {
    let fd_limit = raise_fd_limit(2 * wanted as u64 + 256);
    let fit = wanted.min((fd_limit.saturating_sub(256) / 2) as usize);
    if fit < wanted {
        println!(
            "soak: RLIMIT_NOFILE is {fd_limit} and cannot be raised: {fit} clients instead of \
             {wanted}"
        );
    }
    assert!(fit >= 2, "no file descriptors to soak with");
    fit
}

fn payload(sender: usize, seq: u64) -> Vec<u8> {
    let mut blob = Vec::with_capacity(PAYLOAD);
    blob.extend_from_slice(&(sender as u32).to_be_bytes());
    blob.extend_from_slice(&seq.to_be_bytes());
    blob.resize(PAYLOAD, 0xa5);
    blob
}

/// Sender index and sequence number of a payload.
fn parse(payload: &[u8]) -> Option<(usize, u64)> {
    if payload.len() != PAYLOAD {
        return None;
    }
    let sender = u32::from_be_bytes(payload.get(0..4)?.try_into().ok()?) as usize;
    let seq = u64::from_be_bytes(payload.get(4..12)?.try_into().ok()?);
    Some((sender, seq))
}

// ------------------------------------------------------------------------------ sampling

/// One second of a soak.
struct Sample {
    at: Duration,
    rss: u64,
    received: u64,
    forwarded: u64,
    connections: u64,
    stats_latency: Duration,
    probe_round_trip: Duration,
}

/// Two raw clients: one publishes a probe every sample, the other must receive it.
struct Probe {
    tx: Client,
    rx: Client,
    tx_name: Name,
    rx_name: Name,
    sent: u64,
}

impl Probe {
    async fn connect(node: &Node) -> Probe {
        let tx = Client::connect_negotiated(node_addr(node), "probe-tx").await;
        let mut rx = Client::connect_negotiated(node_addr(node), "probe-rx").await;
        let (tx_name, rx_name) = (
            Name::with_id("org", "soak", "probe-tx", 1),
            Name::with_id("org", "soak", "probe-rx", 1),
        );
        rx.subscribe(&rx_name, 1).await;
        Probe {
            tx,
            rx,
            tx_name,
            rx_name,
            sent: 0,
        }
    }

    /// Samples once a second for `secs` seconds.
    async fn sample_for(&mut self, node: &Node, secs: u64) -> Vec<Sample> {
        let started = Instant::now();
        let verbose = std::env::var_os("SLIM_SOAK_VERBOSE").is_some();
        let mut samples = Vec::new();
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
            self.sent += 1;
            let sent = self.tx.publish(
                &self.tx_name,
                &self.rx_name,
                1,
                format!("probe {}", self.sent).as_bytes(),
            );
            // A probe that does not arrive ends the sampling (and the traffic) but not the test
            // at once: the clients' tallies are still collected and reported, and the
            // responsiveness check fails the test afterwards.
            let arrived = match self.rx.next_within(PROBE_WAIT).await {
                Some(Next::Message(received)) => {
                    self.rx.assert_forwarded_copy(&sent, &received);
                    true
                }
                Some(Next::End) => panic!("the node ended the probe's stream"),
                None => false,
            };
            let sample = Sample {
                at: started.elapsed(),
                rss: rss_bytes(),
                received: node_stats.router.received,
                forwarded: node_stats.router.forwarded,
                connections: node_stats.router.connections,
                stats_latency,
                probe_round_trip: t.elapsed(),
            };
            if verbose {
                println!(
                    "soak: t={:.0?} RSS {:.1} MiB received {} forwarded {} stats {:?} probe {:?}",
                    sample.at,
                    mib(sample.rss),
                    sample.received,
                    sample.forwarded,
                    sample.stats_latency,
                    sample.probe_round_trip
                );
            }
            samples.push(sample);
            if !arrived {
                println!(
                    "soak: the probe publish did not arrive within {PROBE_WAIT:?}: sampling and \
                     traffic stop here"
                );
                break;
            }
        }
        samples
    }
}

/// The samples as a table; `forwarded_before` is the node's count before the traffic.
fn print_samples(samples: &[Sample], forwarded_before: u64) {
    println!(
        "soak: {:>4} {:>9} {:>10} {:>10} {:>7} {:>9} {:>9}",
        "t/s", "RSS/MiB", "received", "forwarded", "conns", "stats/ms", "probe/ms"
    );
    let mut previous = forwarded_before;
    for s in samples {
        println!(
            "soak: {:>4.0} {:>9.1} {:>10} {:>10} {:>7} {:>9.1} {:>9.1}   ({} routed/s)",
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
}

/// Worst stats latency and probe round trip; first, peak RSS.
fn summary(samples: &[Sample], rss_before: u64) -> (Duration, Duration, u64, u64) {
    let worst_stats = samples
        .iter()
        .map(|s| s.stats_latency)
        .max()
        .unwrap_or_default();
    let worst_probe = samples
        .iter()
        .map(|s| s.probe_round_trip)
        .max()
        .unwrap_or_default();
    let rss_first = samples.first().map_or(rss_before, |s| s.rss);
    let rss_peak = samples.iter().map(|s| s.rss).max().unwrap_or(rss_before);
    (worst_stats, worst_probe, rss_first, rss_peak)
}

/// The checks both soaks share: responsive node, bounded RSS.
fn assert_healthy(samples: &[Sample], rss_before: u64, rss_end: u64) {
    let (worst_stats, worst_probe, rss_first, _) = summary(samples, rss_before);
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
}

// ------------------------------------------------------------------- reliable sessions
fn service(i: usize) -> Name {
    Name::new("org", "soak", &format!("a{i}"))
}

/// What one app saw.
#[derive(Debug, Default)]
struct Tally {
    sent: u64,
    /// Messages from the predecessor, in order.
    received: u64,
    /// `Delivered` events for our own messages.
    delivered: u64,
    /// `MessageLost` events (the session layer gave up on an incoming message).
    lost_events: u64,
    /// `SendFailed` events (an outgoing message no receiver acknowledged).
    send_failed: u64,
    errors: Vec<String>,
}

/// One app's ring position and sessions.
struct Member {
    app: App,
    me: usize,
    from: usize,
    /// The session this app publishes on (to its successor).
    outgoing: SessionId,
}

impl Member {
    /// Takes one event into the tally.
    fn take(&self, event: SessionEvent, tally: &mut Tally) {
        match event {
            SessionEvent::Message {
                session, payload, ..
            } => match parse(&payload) {
                Some((sender, seq)) if sender == self.from && seq == tally.received => {
                    tally.received += 1;
                }
                Some((sender, seq)) => tally.errors.push(format!(
                    "session {session}: message {seq} from a{sender}, expected {} from a{}",
                    tally.received, self.from
                )),
                None => tally.errors.push(format!(
                    "session {session}: a payload of {} bytes",
                    payload.len()
                )),
            },
            SessionEvent::Delivered { session, .. } if session == self.outgoing => {
                tally.delivered += 1;
            }
            SessionEvent::MessageLost {
                session,
                id,
                source,
            } => {
                tally.lost_events += 1;
                tally.errors.push(format!(
                    "session {session}: message {id} from {source} lost"
                ));
            }
            SessionEvent::SendFailed { session, id, .. } => {
                tally.send_failed += 1;
                tally.errors.push(format!(
                    "session {session}: message {id} never acknowledged"
                ));
            }
            SessionEvent::Closed { session, reason } => tally
                .errors
                .push(format!("session {session} closed: {reason:?}")),
            SessionEvent::MemberState {
                member,
                online: false,
                ..
            } => tally.errors.push(format!("{member} reported offline")),
            // The incoming session from the predecessor, and its later state changes.
            _ => {}
        }
    }
}

/// One app's life: publish every `period` until `stop`, taking events meanwhile; then, once
/// every app stopped publishing, take events until all of the predecessor's messages arrived and
/// all of ours were acknowledged.
async fn run_member(
    member: Member,
    period: Duration,
    stop: Arc<AtomicBool>,
    sent_counts: Arc<Vec<AtomicU64>>,
    all_stopped: Arc<Barrier>,
) -> (Member, Tally) {
    let mut tally = Tally::default();
    // Spread the apps' sends over the period.
    let offset = period.mul_f64((member.me as f64 * 0.618_034) % 1.0);
    let mut next_send = tokio::time::Instant::now() + offset;
    while !stop.load(Ordering::Relaxed) {
        tokio::select! {
            () = tokio::time::sleep_until(next_send) => {
                let sent = member.app.publish(member.outgoing, payload(member.me, tally.sent)).await;
                if let Err(error) = sent {
                    tally.errors.push(format!("publish {}: {error}", tally.sent));
                    break;
                }
                tally.sent += 1;
                next_send += period;
            }
            event = member.app.next_event() => match event {
                Ok(event) => member.take(event, &mut tally),
                Err(error) => {
                    tally.errors.push(format!("the app stopped: {error}"));
                    break;
                }
            },
        }
    }
    sent_counts[member.me].store(tally.sent, Ordering::SeqCst);
    all_stopped.wait().await;
    let expected = sent_counts[member.from].load(Ordering::SeqCst);
    let drain = drain_time();
    let deadline = tokio::time::Instant::now() + drain;
    while tally.received < expected || tally.delivered < tally.sent {
        match tokio::time::timeout_at(deadline, member.app.next_event()).await {
            Ok(Ok(event)) => member.take(event, &mut tally),
            Ok(Err(error)) => {
                tally.errors.push(format!("the app stopped: {error}"));
                break;
            }
            Err(_) => {
                tally.errors.push(format!(
                    "after {drain:?}: {} of {expected} messages from a{} arrived, {} of {} of ours \
                     acknowledged",
                    tally.received, member.from, tally.delivered, tally.sent
                ));
                break;
            }
        }
    }
    (member, tally)
}

#[tokio::test(flavor = "multi_thread")]
async fn soak_reliable_sessions() {
    let _serial = SERIAL.lock().await;
    let secs = env_or("SLIM_SOAK_SECS", 15, 1..=600);
    let rate = env_or("SLIM_SOAK_RATE", 2, 1..=100);
    let default_apps = if cfg!(debug_assertions) { 50 } else { 1000 };
    let apps = clients_that_fit(env_or("SLIM_SOAK_SESSIONS", default_apps, 2..=5000) as usize);
    if cfg!(debug_assertions) && std::env::var_os("SLIM_SOAK_SESSIONS").is_none() {
        println!(
            "soak: debug build: {apps} apps (ECDSA P-256 session handshakes cost ≈ 0.3 s of CPU \
             each without optimisations); run with --release for 1 000, or set SLIM_SOAK_SESSIONS"
        );
    }
    let period = Duration::from_secs(1) / rate as u32;
    let test_started = Instant::now();
    let rss_start = rss_bytes();

    let node = start_node().await;
    let endpoint = node_addr(&node).to_string();

    // ---- connect every app, then open the ring of sessions
    let gate = Arc::new(Semaphore::new(CONNECTING));
    let mut connecting = JoinSet::new();
    for i in 0..apps {
        let (gate, endpoint) = (gate.clone(), endpoint.clone());
        connecting.spawn(async move {
            let _permit = gate.acquire_owned().await;
            let app = App::connect(&endpoint, service(i), SECRET)
                .await
                .unwrap_or_else(|e| panic!("a{i} connects: {e}"));
            (i, app)
        });
    }
    let mut connected: Vec<Option<App>> = (0..apps).map(|_| None).collect();
    while let Some(joined) = connecting.join_next().await {
        let (i, app) = joined.expect("an app connects");
        connected[i] = Some(app);
    }
    let connected_in = test_started.elapsed();
    let mut opening = JoinSet::new();
    for (i, app) in connected.iter_mut().enumerate() {
        let app = app.take().expect("connected above");
        let gate = gate.clone();
        opening.spawn(async move {
            let _permit = gate.acquire_owned().await;
            let to = service((i + 1) % apps);
            let config = SessionConfig {
                reliability: Some(RELIABILITY),
                ..SessionConfig::default()
            };
            let outgoing = app
                .open_session(&to, config)
                .await
                .unwrap_or_else(|e| panic!("a{i} opens a session to {to}: {e}"));
            Member {
                app,
                me: i,
                from: (i + apps - 1) % apps,
                outgoing,
            }
        });
    }
    let mut members: Vec<Option<Member>> = (0..apps).map(|_| None).collect();
    while let Some(joined) = opening.join_next().await {
        let member = joined.expect("a session opens");
        let i = member.me;
        members[i] = Some(member);
    }
    let mut probe = Probe::connect(&node).await;
    let setup = stats(&node).await;
    assert_eq!(setup.connections, apps as u64 + 2);
    let rss_connected = rss_bytes();
    println!(
        "soak: {apps} apps connected in {connected_in:.1?}, {apps} reliable sessions open after \
         {:.1?}; RSS {:.1} MiB (was {:.1} MiB before the node started)",
        test_started.elapsed(),
        mib(rss_connected),
        mib(rss_start)
    );

    // ---- traffic
    let stop = Arc::new(AtomicBool::new(false));
    let sent_counts: Arc<Vec<AtomicU64>> = Arc::new((0..apps).map(|_| AtomicU64::new(0)).collect());
    let all_stopped = Arc::new(Barrier::new(apps));
    let mut running = JoinSet::new();
    for member in members.iter_mut() {
        let member = member.take().expect("opened above");
        running.spawn(run_member(
            member,
            period,
            stop.clone(),
            sent_counts.clone(),
            all_stopped.clone(),
        ));
    }
    let traffic_started = Instant::now();
    let samples = probe.sample_for(&node, secs).await;
    stop.store(true, Ordering::Relaxed);
    let traffic_time = traffic_started.elapsed();

    // ---- collect
    let mut totals = Tally::default();
    let mut finished = Vec::new();
    while let Some(joined) = running.join_next().await {
        let (member, tally) = joined.expect("an app task");
        totals.sent += tally.sent;
        totals.received += tally.received;
        totals.delivered += tally.delivered;
        totals.lost_events += tally.lost_events;
        totals.send_failed += tally.send_failed;
        totals.errors.extend(
            tally
                .errors
                .into_iter()
                .map(|e| format!("a{}: {e}", member.me)),
        );
        finished.push(member);
    }
    let drained_in = traffic_started.elapsed() - traffic_time;
    let end_stats = wait_for_node_stats(&node, "stats", |_| true).await;
    let rss_end = rss_bytes();

    // ---- report
    print_samples(&samples, setup.forwarded);
    let (worst_stats, worst_probe, rss_first, rss_peak) = summary(&samples, rss_connected);
    let lost = totals.sent.saturating_sub(totals.received);
    println!(
        "soak: {apps} apps, {rate} msg/s each over reliable p2p sessions, {traffic_time:.1?} of \
         traffic, drained in {drained_in:.1?}: {} sent, {} received, {} acknowledged; \
         MESSAGES LOST {lost} (MessageLost events {}, SendFailed {}), {} errors; node routed {} \
         and dropped {:?} (slow consumer: {}); RSS connected {:.1} MiB, after 1 s {:.1} MiB, \
         peak {:.1} MiB, end {:.1} MiB; worst stats latency {worst_stats:?}, worst probe round \
         trip {worst_probe:?}",
        totals.sent,
        totals.received,
        totals.delivered,
        totals.lost_events,
        totals.send_failed,
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
    assert_eq!(lost, 0, "messages lost on reliable sessions");
    assert_eq!(totals.received, totals.sent, "every message arrived once");
    assert_eq!(
        totals.delivered, totals.sent,
        "every message was acknowledged"
    );
    assert_eq!(totals.lost_events + totals.send_failed, 0);
    assert_eq!(end_stats.router.dropped_total(), 0, "{end_stats:#?}");
    assert_eq!(end_stats.slow_consumer_drops, 0);
    assert_healthy(&samples, rss_connected, rss_end);
    assert!(
        totals.sent >= apps as u64 * rate * secs / 2,
        "the apps kept their pace: {} sent",
        totals.sent
    );

    // ---- everybody leaves: the node forgets them all
    drop(finished);
    drop(probe);
    let gone = wait_for_stats(
        &node,
        "every connection and subscription to be removed",
        |s| s.connections == 0 && s.subscriptions == 0,
    )
    .await;
    within("node shutdown", node.shutdown()).await;
    // Not asserted: a heartbeat or ack in flight while the apps are dropped has nowhere to go.
    println!(
        "soak: all gone (node drops while they left: {:?}), RSS {:.1} MiB; the whole test took \
         {:.1?}",
        gone.drops().collect::<Vec<_>>(),
        mib(rss_bytes()),
        test_started.elapsed()
    );
}

// ------------------------------------------------------------------- raw publishes

fn client_name(i: usize) -> Name {
    Name::with_id("org", "soak", &format!("c{i}"), i as u128 + 1)
}

fn raw_payload(sender: usize, seq: u64) -> Vec<u8> {
    let mut blob = Vec::with_capacity(PAYLOAD);
    blob.extend_from_slice(&(sender as u32).to_be_bytes());
    blob.extend_from_slice(&seq.to_be_bytes());
    blob.resize(PAYLOAD, 0xa5);
    blob
}

/// What one raw client saw.
#[derive(Debug, Default)]
struct RawTally {
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
    let (sender, seq) = parse(blob).ok_or("a payload without sender and sequence")?;
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
) -> (Client, RawTally) {
    let my_name = client_name(me);
    let to_name = client_name(to);
    let mut tally = RawTally::default();
    // Spread the clients' sends over the period.
    let offset = period.mul_f64((me as f64 * 0.618_034) % 1.0);
    let mut next_send = tokio::time::Instant::now() + offset;
    while !stop.load(Ordering::Relaxed) {
        let now = tokio::time::Instant::now();
        if now >= next_send {
            client.publish(&my_name, &to_name, 1, &raw_payload(me, tally.sent));
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

#[tokio::test(flavor = "multi_thread")]
async fn soak_1000_connections() {
    let _serial = SERIAL.lock().await;
    let secs = env_or("SLIM_SOAK_SECS", 10, 1..=600);
    let rate = env_or("SLIM_SOAK_RATE", 2, 1..=100);
    let wanted = env_or("SLIM_SOAK_CONNECTIONS", 1000, 2..=5000) as usize;
    let connections = clients_that_fit(wanted);
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
    let mut probe = Probe::connect(&node).await;
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
    let samples = probe.sample_for(&node, secs).await;
    stop.store(true, Ordering::Relaxed);
    let traffic_time = traffic_started.elapsed();

    // ---- collect
    let mut totals = RawTally::default();
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
    print_samples(&samples, setup.forwarded);
    let (worst_stats, worst_probe, rss_first, rss_peak) = summary(&samples, rss_connected);
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
    assert_eq!(end_stats.router.dropped_total(), 0, "{end_stats:#?}");
    assert_eq!(end_stats.slow_consumer_drops, 0);
    assert_eq!(
        end_stats.router.forwarded - setup.forwarded,
        totals.sent + probe.sent
    );
    assert_healthy(&samples, rss_connected, rss_end);
    assert!(
        totals.sent >= connections as u64 * rate * secs / 2,
        "the clients kept their pace: {} sent",
        totals.sent
    );

    // ---- everybody leaves: the node forgets them all
    drop(finished);
    drop(probe);
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
