//! Raw data-plane publishes through a node: P publishers and S subscribers, each a [`Client`]
//! with its own connection, in the unicast, anycast or multicast pattern ([`Mode`]).
//!
//! Every payload leads with a sequence number: bit 63 marks a round trip; otherwise bits 48..63
//! are the publisher's index and bits 0..48 its message number, so each subscriber checks that
//! every publisher's messages reach it in order and the flow control knows whose message arrived.
//!
//! Throughput: each publisher keeps at most its share of the window in flight (published, not
//! yet delivered; for multicast, not yet delivered to every subscriber), so the bench measures
//! what the node sustains without ever overflowing a queue. Then publisher 0 measures round
//! trips: a publish, answered by a publish of the same payload from the subscriber(s) that got
//! it (multicast: the time until the last of the S answers).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use slim_proto::pb;
use slim_proto::Name;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::probe::NodeProbe;
use super::progress::{Counters, Progress};
use super::wire::{self, WireReceiver, WireSender};
use super::{
    node_usage, payload, random_tag, report, seq_of, warm_up, BenchError, BenchReport, ClientKind,
    LoadConfig, Mode, NodeWatch, RoundTrips, Stop, Throughput, WINDOW_BYTES,
};
use crate::app::Client;

const ROUND_TRIP: u64 = 1 << 63;
const PUBLISHER_SHIFT: u32 = 48;
const NUMBER_MASK: u64 = (1 << PUBLISHER_SHIFT) - 1;
/// Publishers or subscribers at most (each is a connection; the index must fit in 15 bits).
pub const MAX_CLIENTS: usize = 1024;
/// A publisher whose window stays full this long without a single delivery stops sending:
/// messages were lost, and waiting longer would only hide it.
const STALL: Duration = Duration::from_secs(5);
/// After the last publish, missing deliveries are waited for until none came for this long.
const DRAIN_IDLE: Duration = Duration::from_secs(2);
/// A round trip not answered within this is lost (and not a sample).
const ROUND_TRIP_WAIT: Duration = Duration::from_secs(5);
/// `fanout` of multicast publishes: any value other than 1 asks the node for every subscriber.
const MULTICAST_FANOUT: u32 = 256;

/// One publisher's deliveries, per subscriber, and a wake-up for its flow control.
struct Flow {
    delivered: Vec<AtomicU64>,
    wake: Notify,
}

/// What the subscribers report to the publishers and to the final count.
struct Shared {
    flows: Vec<Flow>,
    counters: Arc<Counters>,
    out_of_order: AtomicU64,
    /// Time base of `last_delivery_ns`.
    epoch: Instant,
    last_delivery_ns: AtomicU64,
    /// Deliveries per publish: 1, or S for multicast.
    copies: u64,
}

impl Shared {
    /// How many of publisher `j`'s messages are done: delivered to one subscriber (unicast,
    /// anycast) or to all of them (multicast, the mode with more than one copy; with a single
    /// subscriber the two counts are the same).
    fn completed(&self, j: usize) -> u64 {
        let delivered = self.flows[j]
            .delivered
            .iter()
            .map(|d| d.load(Ordering::Relaxed));
        if self.copies > 1 {
            delivered.min().unwrap_or(0)
        } else {
            delivered.sum()
        }
    }
}

/// Where a publisher's messages go.
#[derive(Clone)]
enum Target {
    /// Message `n` of publisher `j` goes to the exact subscriber `(j + n) % S`.
    RoundRobin(Arc<Vec<Name>>),
    /// Every message goes to this name with this fanout.
    Name(Name, u32),
}

impl Target {
    fn for_message(&self, n: u64) -> (&Name, u32) {
        match self {
            Target::RoundRobin(names) => (&names[(n % names.len() as u64) as usize], 1),
            Target::Name(name, fanout) => (name, *fanout),
        }
    }

    /// The same targets seen from publisher `j` (unicast publishers start at different
    /// subscribers so that P publishers spread over S subscribers from the first message).
    fn for_publisher(&self, j: usize) -> Target {
        match self {
            Target::RoundRobin(names) => {
                let mut rotated = names.as_ref().clone();
                rotated.rotate_left(j % names.len());
                Target::RoundRobin(Arc::new(rotated))
            }
            other => other.clone(),
        }
    }
}

/// The application payload of a publish.
fn blob(message: &pb::Message) -> Option<&Bytes> {
    message.app_payload().map(|app| &app.blob)
}

/// The sending side of a bench client: the app API's, or a wire link's.
enum Sender {
    App(Arc<Client>),
    Wire(Box<WireSender>),
}

impl Sender {
    /// Publishes, or queues the publish until [`Sender::flush`] (wire links batch them).
    async fn publish(&mut self, to: &Name, fanout: u32, payload: Bytes) -> Result<(), BenchError> {
        match self {
            Sender::App(client) => Ok(client.publish_fanout(to, fanout, payload).await?),
            Sender::Wire(link) => link.publish(to, fanout, payload).await,
        }
    }

    async fn flush(&mut self) -> Result<(), BenchError> {
        match self {
            Sender::App(_) => Ok(()),
            Sender::Wire(link) => link.flush().await,
        }
    }
}

/// The receiving side of a bench client.
enum Receiver {
    App(Arc<Client>),
    Wire(Box<WireReceiver>),
}

impl Receiver {
    async fn next(&mut self) -> Result<Box<pb::Message>, BenchError> {
        match self {
            Receiver::App(client) => Ok(client.recv_message().await?),
            Receiver::Wire(link) => link.next().await,
        }
    }

    /// Who sent `message`, the last one [`Receiver::next`] gave.
    fn source(&self, message: &pb::Message) -> Option<Name> {
        match self {
            Receiver::App(_) => message.publish_source(),
            Receiver::Wire(link) => link.source(message),
        }
    }
}

/// Subscriber `k`: counts and checks throughput messages, answers round trips.
async fn subscriber(mut rx: Receiver, mut tx: Sender, k: usize, shared: Arc<Shared>) {
    let mut last: Vec<Option<u64>> = vec![None; shared.flows.len()];
    loop {
        let message = match rx.next().await {
            Ok(message) => message,
            Err(error) => {
                // Its missing deliveries are counted as lost; this says why.
                tracing::warn!(subscriber = k, %error, "subscriber stopped");
                return;
            }
        };
        let Some(seq) = blob(&message).and_then(|b| seq_of(b)) else {
            continue; // not one of ours
        };
        if seq & ROUND_TRIP != 0 {
            let (Some(to), Some(payload)) = (rx.source(&message), blob(&message)) else {
                continue;
            };
            let answered = match tx.publish(&to, 1, payload.clone()).await {
                Ok(()) => tx.flush().await,
                Err(error) => Err(error),
            };
            if let Err(error) = answered {
                tracing::warn!(subscriber = k, %error, "cannot answer a round trip");
                return;
            }
            continue;
        }
        let (j, n) = ((seq >> PUBLISHER_SHIFT) as usize, seq & NUMBER_MASK);
        let (Some(flow), Some(last)) = (shared.flows.get(j), last.get_mut(j)) else {
            continue; // a publisher index we never gave out
        };
        match *last {
            Some(previous) if n <= previous => {
                shared.out_of_order.fetch_add(1, Ordering::Relaxed);
            }
            _ => *last = Some(n),
        }
        if let Some(delivered) = flow.delivered.get(k) {
            delivered.fetch_add(1, Ordering::Relaxed);
        }
        flow.wake.notify_one();
        let received = shared.counters.received.fetch_add(1, Ordering::Relaxed) + 1;
        // Reading the clock was a twentieth of the clients' time: stamp every 64th delivery,
        // and every one that catches up with what was published so far, as the last always does.
        let published = shared.counters.sent.load(Ordering::Relaxed) * shared.copies;
        if received.is_multiple_of(64) || received >= published {
            shared
                .last_delivery_ns
                .fetch_max(shared.epoch.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
    }
}

/// What one publisher does in the throughput phase.
struct Plan {
    target: Target,
    quota: Option<u64>,
    deadline: Option<Instant>,
    window: u64,
    size: usize,
}

/// Publisher `j`: publishes until its quota or the deadline, within its window. Returns how
/// many it published, and `tx` for the round trips.
async fn publisher(
    mut tx: Sender,
    j: usize,
    plan: Plan,
    shared: Arc<Shared>,
) -> Result<(u64, Sender), BenchError> {
    let flow = &shared.flows[j];
    let mut sent = 0u64;
    let mut credit = 0u64;
    loop {
        // The clock is read every 256 messages, not per message (a few hundred µs late at most).
        if plan.quota.is_some_and(|q| sent >= q)
            || (sent.is_multiple_of(256) && plan.deadline.is_some_and(|d| Instant::now() >= d))
        {
            tx.flush().await?;
            return Ok((sent, tx));
        }
        // The delivered counters are only read when the credit runs out, not per message.
        if credit == 0 {
            tx.flush().await?;
        }
        while credit == 0 {
            let in_flight = sent.saturating_sub(shared.completed(j));
            if in_flight < plan.window {
                credit = plan.window - in_flight;
                break;
            }
            if tokio::time::timeout(STALL, flow.wake.notified())
                .await
                .is_err()
            {
                tracing::warn!(
                    publisher = j,
                    in_flight,
                    "no delivery for {STALL:?} with the window full: stopping this publisher"
                );
                return Ok((sent, tx));
            }
        }
        let (to, fanout) = plan.target.for_message(sent);
        let seq = ((j as u64) << PUBLISHER_SHIFT) | sent;
        tx.publish(to, fanout, payload(seq, plan.size)).await?;
        sent += 1;
        credit -= 1;
        shared.counters.sent.fetch_add(1, Ordering::Relaxed);
    }
}

/// Connects `name` as a client of `kind` and subscribes it to `subscriptions`.
async fn connect(
    kind: ClientKind,
    endpoint: &str,
    name: Name,
    subscriptions: &[Name],
) -> Result<(Sender, Receiver), BenchError> {
    match kind {
        ClientKind::App => {
            let client = Client::connect(endpoint, name).await?;
            for subscription in subscriptions {
                client.subscribe(subscription).await?;
            }
            let client = Arc::new(client);
            Ok((Sender::App(client.clone()), Receiver::App(client)))
        }
        ClientKind::Wire => {
            let (tx, rx) = wire::connect(endpoint, name, subscriptions).await?;
            Ok((Sender::Wire(Box::new(tx)), Receiver::Wire(Box::new(rx))))
        }
    }
}

fn join_error(error: tokio::task::JoinError) -> BenchError {
    BenchError::Task(error.to_string())
}

/// Aborts the subscriber tasks however the run ends.
struct AbortOnDrop(Vec<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

pub(super) async fn run(
    config: &LoadConfig,
    probe: Option<&NodeProbe>,
) -> Result<BenchReport, BenchError> {
    let (p, s) = (config.publishers, config.subscribers);
    if !(1..=MAX_CLIENTS).contains(&p) || !(1..=MAX_CLIENTS).contains(&s) {
        return Err(BenchError::Invalid(format!(
            "--publishers {p} --subscribers {s}: each must be 1 to {MAX_CLIENTS}"
        )));
    }
    let multicast = config.mode == Mode::Multicast;
    let copies = if multicast { s as u64 } else { 1 };

    // Names: ids from the random tag keep concurrent benches apart and stay clear of the
    // reserved ids at the top of the range.
    let tag = random_tag();
    let base = u128::from(tag) << 16;
    let publisher_names: Vec<Name> = (0..p)
        .map(|j| Name::with_id("bench", "raw", &format!("pub-{tag:x}"), base + j as u128))
        .collect();
    let service = format!("sub-{tag:x}");
    let subscriber_names: Vec<Name> = (0..s)
        .map(|k| Name::with_id("bench", "raw", &service, base + k as u128))
        .collect();
    let channel = Name::with_id("bench", "raw", &format!("chan-{tag:x}"), base);
    let target = match config.mode {
        Mode::Anycast => Target::Name(Name::new("bench", "raw", &service), 1),
        Mode::Multicast => Target::Name(channel.clone(), MULTICAST_FANOUT),
        _ => Target::RoundRobin(Arc::new(subscriber_names.clone())),
    };

    let mut subscribers = Vec::with_capacity(s);
    for name in &subscriber_names {
        let subscription = if multicast { &channel } else { name };
        subscribers.push(
            connect(
                config.client,
                &config.endpoint,
                name.clone(),
                std::slice::from_ref(subscription),
            )
            .await?,
        );
    }
    let mut publishers = Vec::with_capacity(p);
    for name in &publisher_names {
        // Every publisher is reachable: round-trip answers go to the publisher's own name.
        publishers.push(
            connect(
                config.client,
                &config.endpoint,
                name.clone(),
                std::slice::from_ref(name),
            )
            .await?,
        );
    }

    let counters = Arc::new(Counters::default());
    let shared = Arc::new(Shared {
        flows: (0..p)
            .map(|_| Flow {
                delivered: (0..s).map(|_| AtomicU64::new(0)).collect(),
                wake: Notify::new(),
            })
            .collect(),
        counters: counters.clone(),
        out_of_order: AtomicU64::new(0),
        epoch: Instant::now(),
        last_delivery_ns: AtomicU64::new(0),
        copies,
    });
    let _subscriber_tasks = AbortOnDrop(
        subscribers
            .into_iter()
            .enumerate()
            .map(|(k, (tx, rx))| tokio::spawn(subscriber(rx, tx, k, shared.clone())))
            .collect(),
    );

    // ---- throughput
    let frame = config.size + 512;
    let window = (config.window / p).min(WINDOW_BYTES / p / frame).max(1);
    let watch = NodeWatch::start(probe)?;
    let bar = Progress::throughput(config.progress, config.stop, copies, counters.clone());
    let start = Instant::now();
    let start_ns = shared.epoch.elapsed().as_nanos() as u64;
    let mut running = Vec::with_capacity(p);
    let mut publisher_receivers = Vec::with_capacity(p);
    for (j, (tx, rx)) in publishers.into_iter().enumerate() {
        publisher_receivers.push(rx);
        let plan = Plan {
            target: target.for_publisher(j),
            quota: match config.stop {
                Stop::Count(n) => Some(n / p as u64 + u64::from((j as u64) < n % p as u64)),
                Stop::Duration(_) => None,
            },
            deadline: match config.stop {
                Stop::Duration(d) => Some(start + d),
                Stop::Count(_) => None,
            },
            window: window as u64,
            size: config.size,
        };
        running.push(tokio::spawn(publisher(tx, j, plan, shared.clone())));
    }
    let mut sent = 0;
    let mut publisher_senders = Vec::with_capacity(p);
    for task in running {
        let (published, tx) = task.await.map_err(join_error)??;
        sent += published;
        publisher_senders.push(tx);
    }
    let expected = sent * copies;
    let mut progress = (0, Instant::now());
    loop {
        let received = counters.received.load(Ordering::Relaxed);
        if received >= expected {
            break;
        }
        if received != progress.0 {
            progress = (received, Instant::now());
        } else if progress.1.elapsed() >= DRAIN_IDLE {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(bar);
    let after_throughput = watch.as_ref().map(NodeWatch::sample).transpose()?;
    let received = counters.received.load(Ordering::Relaxed);
    let seconds = (shared
        .last_delivery_ns
        .load(Ordering::Relaxed)
        .saturating_sub(start_ns) as f64
        / 1e9)
        .max(1e-9);

    // ---- round trips, from publisher 0
    let mut round_trips = RoundTrips::new();
    let warm_up = warm_up(config.round_trips);
    let bar = Progress::round_trips(config.progress, warm_up + config.round_trips);
    let (ping, pong) = (&mut publisher_senders[0], &mut publisher_receivers[0]);
    for i in 0..warm_up + config.round_trips {
        let seq = ROUND_TRIP | i;
        let (to, fanout) = target.for_message(i);
        let t0 = Instant::now();
        ping.publish(to, fanout, payload(seq, config.size)).await?;
        ping.flush().await?;
        let deadline = tokio::time::Instant::from_std(t0 + ROUND_TRIP_WAIT);
        let mut answers = 0;
        while answers < copies {
            match tokio::time::timeout_at(deadline, pong.next()).await {
                Ok(Ok(message)) => {
                    if blob(&message).and_then(|b| seq_of(b)) == Some(seq) {
                        answers += 1;
                    }
                }
                Ok(Err(error)) => return Err(error),
                Err(_) => break,
            }
        }
        bar.inc();
        if answers < copies {
            round_trips.lost += 1;
        } else if i >= warm_up {
            round_trips.record(t0.elapsed());
        }
    }
    drop(bar);
    let node = node_usage(watch.as_ref(), after_throughput, received, seconds)?;
    Ok(report(
        config,
        Throughput {
            sent,
            expected,
            received,
            out_of_order: shared.out_of_order.load(Ordering::Relaxed),
            seconds,
            window,
        },
        &round_trips,
        node,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{NodeConfig, ServerConfig};

    async fn node() -> crate::Node {
        crate::Node::start(NodeConfig {
            servers: vec![ServerConfig {
                addr: "127.0.0.1:0".parse().expect("an address"),
                tls: None,
            }],
            ..NodeConfig::default()
        })
        .await
        .expect("the node starts")
    }

    fn config(node: &crate::Node, mode: Mode) -> LoadConfig {
        LoadConfig {
            endpoint: node.local_addrs()[0].to_string(),
            mode,
            size: 100,
            stop: Stop::Count(300),
            round_trips: 20,
            window: 64,
            publishers: 2,
            subscribers: 3,
            progress: false,
            node_pid: Some(std::process::id()),
            mls: false,
            unreliable: false,
            client: ClientKind::App,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_pattern_delivers_what_it_promises() {
        let node = node().await;
        let patterns = [(Mode::Unicast, 1), (Mode::Anycast, 1), (Mode::Multicast, 3)];
        let kinds = [ClientKind::App, ClientKind::Wire];
        for ((mode, copies), client) in kinds.iter().flat_map(|k| patterns.map(|p| (p, *k))) {
            let config = LoadConfig {
                client,
                ..config(&node, mode)
            };
            let report = crate::bench::run(&config).await.unwrap();
            assert_eq!(report.client, client.as_str());
            assert_eq!(
                report.sent, 300,
                "{mode:?} {client:?}: --count is the total"
            );
            assert_eq!(report.expected, 300 * copies, "{mode:?}");
            assert_eq!(report.received, report.expected, "{mode:?}: {report:?}");
            assert_eq!(report.out_of_order, 0, "{mode:?}");
            assert_eq!(report.round_trips, 20, "{mode:?}");
            assert_eq!(report.round_trips_lost, 0, "{mode:?}");
            // This process is the node: its usage is reported.
            let usage = report.node.as_ref().expect("--node-pid was given");
            assert!(usage.rss_end_kib > 0 && usage.peak_rss_kib > 0);
            let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
            assert!(json["node_cpu_s"].is_number() && json["node_peak_rss_kib"].is_number());
        }
        let stats = node.stats().await.expect("the node runs");
        assert_eq!(stats.router.dropped_total(), 0, "{:?}", stats.router);
        assert_eq!(stats.slow_consumer_drops, 0);
        node.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_mebibyte_messages_pass_within_the_byte_window() {
        let node = node().await;
        for client in [ClientKind::App, ClientKind::Wire] {
            let report = crate::bench::run(&LoadConfig {
                size: 1024 * 1024,
                stop: Stop::Count(24),
                round_trips: 2,
                window: 1000,
                publishers: 1,
                subscribers: 2,
                node_pid: None,
                client,
                ..config(&node, Mode::Multicast)
            })
            .await
            .unwrap();
            assert_eq!(report.received, 48, "{client:?}: {report:?}");
            assert_eq!(report.window, WINDOW_BYTES / (1024 * 1024 + 512));
        }
        let stats = node.stats().await.expect("the node runs");
        assert_eq!(
            stats.slow_consumer_drops, 0,
            "the byte window kept the queues short"
        );
        node.shutdown().await;
    }
}
