//! `slim-tokio bench`: measures any SLIM node (ours or the reference) from the outside, with
//! clients on this machine over loopback.
//!
//! * Raw data-plane publishes ([`raw`]): P publishers and S subscribers, each its own client and
//!   connection, in three patterns: unicast (each message to one exact subscriber instance),
//!   anycast (to a service name every subscriber serves: each message reaches exactly one) and
//!   multicast (to a channel every subscriber joined: each message reaches all S). One-way
//!   throughput with a bounded window, then the round trip of a publish answered by a publish.
//! * A p2p session between two of our session layers ([`run_p2p`]), reliable or not: one-way
//!   throughput (acknowledged when reliable), then request/reply round trips.
//!
//! Either phase can stop after a duration or a message count; a progress bar can be drawn on a
//! terminal; given the node's pid, its CPU time and memory are read from `/proc` ([`probe`]).

pub mod probe;
mod progress;
mod raw;
pub mod relay;
mod wire;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use slim_proto::Name;

use crate::app::ClientError;
use crate::session::AppError;
use probe::{NodeProbe, NodeUsage};
use progress::{Counters, Progress};

/// The largest payload the bench sends: SLIM nodes accept gRPC messages of at most 4 MiB (ours by
/// default, the reference's too), and the header (names, version, MAC) needs room besides the
/// payload.
pub const MAX_PAYLOAD: usize = slim_proto::DEFAULT_MAX_MESSAGE_SIZE - 4096;

/// Payload bytes in flight at most, over all publishers, whatever `window` says. It keeps large
/// messages under the node's per-connection queue (16 MiB; beyond it a node drops for a slow
/// consumer instead of queueing) and under the clients' own queues: 1 MiB messages run with
/// 8 in flight.
pub const WINDOW_BYTES: usize = 8 * 1024 * 1024;

/// What to run: one publisher → node → one subscriber (`run_publish`), or a reliable p2p session
/// (`run_p2p`). [`LoadConfig`] has every other knob.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub endpoint: String,
    /// Payload bytes per message (at least 8: a sequence number leads each payload).
    pub size: usize,
    /// How long the throughput phase sends.
    pub duration: Duration,
    /// Sequential round trips measured (after a warm-up of a tenth of them, at least 10).
    pub round_trips: u64,
    /// Messages in flight at most during the throughput phase (the publisher waits beyond it).
    pub window: usize,
}

/// When the throughput phase stops sending.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stop {
    /// After this long.
    Duration(Duration),
    /// After this many messages published in all (split evenly over the publishers).
    Count(u64),
}

/// What the bench measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Raw publishes, each to one exact subscriber instance (round-robin over the subscribers).
    Unicast,
    /// Raw publishes to a service name that every subscriber serves with its own instance
    /// (`fanout` 1): the node picks one instance per message.
    Anycast,
    /// Raw publishes to a channel every subscriber joined (`fanout` ≠ 1): each message reaches
    /// all subscribers.
    Multicast,
    /// A p2p session between two session layers (reliable unless `unreliable`).
    P2p,
    /// Not a SLIM node: a plain TCP relay (`slim-tokio tcp-relay`), the baseline for the rest.
    TcpRelay,
}

impl Mode {
    /// The name in reports (`publish` for unicast, as `--mode publish` has always meant).
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Unicast => "publish",
            Mode::Anycast => "anycast",
            Mode::Multicast => "multicast",
            Mode::P2p => "p2p",
            Mode::TcpRelay => "tcp-relay",
        }
    }
}

/// What the raw modes' publishers and subscribers are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientKind {
    /// The app API's [`crate::app::Client`]: a router of its own per client, as in the
    /// reference SDK. What an application embedding this crate gets.
    #[default]
    App,
    /// A wire-level client ([`wire`]): the negotiated, MAC-signed link and nothing else, so
    /// that the clients cost little beside the node they measure.
    Wire,
}

impl ClientKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientKind::App => "app",
            ClientKind::Wire => "wire",
        }
    }
}

/// Everything `slim-tokio bench` can vary.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub endpoint: String,
    pub mode: Mode,
    /// Payload bytes per message, 8 ..= [`MAX_PAYLOAD`].
    pub size: usize,
    pub stop: Stop,
    /// Sequential round trips measured after the throughput phase (plus a warm-up of a tenth,
    /// at least 10).
    pub round_trips: u64,
    /// Messages in flight at most over all publishers (each gets `window / publishers`), and at
    /// most [`WINDOW_BYTES`] of payload (p2p: and at most the session sender's 512-message
    /// retransmission buffer).
    pub window: usize,
    /// Raw modes: clients that publish (each its own connection).
    pub publishers: usize,
    /// Raw modes: clients that receive (each its own connection).
    pub subscribers: usize,
    /// Draw a progress bar on stderr (the caller checks that stderr is a terminal).
    pub progress: bool,
    /// The node's process id, to report its CPU time and memory (Linux `/proc`).
    pub node_pid: Option<u32>,
    /// p2p: the session is end-to-end encrypted with MLS.
    pub mls: bool,
    /// p2p: no acknowledgements or retransmissions (the session's `reliability` is off).
    pub unreliable: bool,
    /// Raw modes: what the clients are.
    pub client: ClientKind,
}

impl From<&BenchConfig> for LoadConfig {
    fn from(config: &BenchConfig) -> LoadConfig {
        LoadConfig {
            endpoint: config.endpoint.clone(),
            mode: Mode::Unicast,
            size: config.size,
            stop: Stop::Duration(config.duration),
            round_trips: config.round_trips,
            window: config.window,
            publishers: 1,
            subscribers: 1,
            progress: false,
            node_pid: None,
            mls: false,
            unreliable: false,
            client: ClientKind::App,
        }
    }
}

/// Why a bench could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    App(#[from] AppError),
    #[error("invalid bench settings: {0}")]
    Invalid(String),
    #[error("cannot read the node's process {pid}: {reason}")]
    Probe { pid: u32, reason: String },
    #[error("a bench task failed: {0}")]
    Task(String),
    #[error("wire client: {0}")]
    Link(String),
}

/// Results, medians and percentiles in microseconds.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub mode: &'static str,
    /// Raw modes: what the clients were ([`ClientKind::as_str`]).
    pub client: &'static str,
    /// p2p: MLS-encrypted session.
    pub mls: bool,
    /// p2p: acknowledged, retransmitting session (raw modes: always false).
    pub reliable: bool,
    pub size: usize,
    pub publishers: usize,
    pub subscribers: usize,
    /// Messages published (p2p: sent on the session).
    pub sent: u64,
    /// Deliveries expected: `sent` × the subscribers for multicast, `sent` otherwise.
    pub expected: u64,
    /// Deliveries counted by the receivers.
    pub received: u64,
    /// Deliveries whose sequence number was not above the previous one from the same publisher
    /// at the same receiver (reordered or duplicated).
    pub out_of_order: u64,
    /// From the first publish to the last delivery.
    pub seconds: f64,
    /// Deliveries per second.
    pub msgs_per_s: f64,
    /// Publishes per second (equals `msgs_per_s` unless multicast).
    pub published_per_s: f64,
    /// Payload megabytes (10^6) delivered per second.
    pub mb_per_s: f64,
    /// Messages in flight at most per publisher, after the byte cap.
    pub window: usize,
    pub round_trips: u64,
    /// Round trips not answered within 5 s (not samples).
    pub round_trips_lost: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// The node's CPU and memory, with `--node-pid`.
    pub node: Option<NodeUsage>,
}

impl BenchReport {
    /// Deliveries that never arrived.
    pub fn lost(&self) -> u64 {
        self.expected.saturating_sub(self.received)
    }

    /// One JSON line. The keys `msgs_per_s`, `p50_us` and `p99_us` are what scripts read
    /// (`benches/compare.sh`); keep them.
    pub fn to_json(&self) -> String {
        let round = |x: f64, digits: i32| {
            let scale = 10f64.powi(digits);
            (x * scale).round() / scale
        };
        let mut json = serde_json::json!({
            "mode": self.mode,
            "client": self.client,
            "mls": self.mls,
            "reliable": self.reliable,
            "size": self.size,
            "publishers": self.publishers,
            "subscribers": self.subscribers,
            "sent": self.sent,
            "expected": self.expected,
            "received": self.received,
            "lost": self.lost(),
            "out_of_order": self.out_of_order,
            "seconds": round(self.seconds, 3),
            "msgs_per_s": round(self.msgs_per_s, 0),
            "published_per_s": round(self.published_per_s, 0),
            "mb_per_s": round(self.mb_per_s, 2),
            "window": self.window,
            "round_trips": self.round_trips,
            "round_trips_lost": self.round_trips_lost,
            "p50_us": round(self.p50_us, 1),
            "p90_us": round(self.p90_us, 1),
            "p99_us": round(self.p99_us, 1),
            "p999_us": round(self.p999_us, 1),
            "max_us": round(self.max_us, 1),
        });
        if let (Some(node), Some(map)) = (&self.node, json.as_object_mut()) {
            let fields = [
                ("node_pid", serde_json::json!(node.pid)),
                ("node_cpu_s", serde_json::json!(round(node.cpu_s, 3))),
                (
                    "node_throughput_cpu_s",
                    serde_json::json!(round(node.throughput_cpu_s, 3)),
                ),
                ("node_cpu_pct", serde_json::json!(round(node.cpu_pct, 1))),
                (
                    "node_cpu_us_per_msg",
                    serde_json::json!(round(node.cpu_us_per_msg, 2)),
                ),
                ("node_rss_start_kib", serde_json::json!(node.rss_start_kib)),
                ("node_rss_end_kib", serde_json::json!(node.rss_end_kib)),
                ("node_peak_rss_kib", serde_json::json!(node.peak_rss_kib)),
                (
                    "node_peak_rss_scope",
                    serde_json::json!(if node.peak_is_of_run {
                        "run"
                    } else {
                        "process"
                    }),
                ),
            ];
            for (key, value) in fields {
                map.insert(key.to_owned(), value);
            }
        }
        json.to_string()
    }
}

/// Counts of a throughput phase.
struct Throughput {
    sent: u64,
    expected: u64,
    received: u64,
    out_of_order: u64,
    seconds: f64,
    window: usize,
}

/// Round trips of the second phase.
struct RoundTrips {
    histogram: hdrhistogram::Histogram<u64>,
    lost: u64,
}

impl RoundTrips {
    fn new() -> RoundTrips {
        RoundTrips {
            histogram: hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                .expect("valid histogram bounds"),
            lost: 0,
        }
    }

    fn record(&mut self, elapsed: Duration) {
        // Values beyond the bounds are clamped, never an error worth stopping for.
        let _ = self
            .histogram
            .record(elapsed.as_micros().clamp(1, 60_000_000) as u64);
    }
}

/// Warm-up round trips before the measured ones.
fn warm_up(round_trips: u64) -> u64 {
    (round_trips / 10).max(10)
}

fn report(
    config: &LoadConfig,
    t: Throughput,
    round_trips: &RoundTrips,
    node: Option<NodeUsage>,
) -> BenchReport {
    let histogram = &round_trips.histogram;
    let q = |p: f64| histogram.value_at_quantile(p) as f64;
    BenchReport {
        mode: config.mode.as_str(),
        client: config.client.as_str(),
        mls: config.mls,
        reliable: config.mode == Mode::P2p && !config.unreliable,
        size: config.size,
        publishers: config.publishers,
        subscribers: config.subscribers,
        sent: t.sent,
        expected: t.expected,
        received: t.received,
        out_of_order: t.out_of_order,
        seconds: t.seconds,
        msgs_per_s: t.received as f64 / t.seconds,
        published_per_s: t.sent as f64 / t.seconds,
        mb_per_s: (t.received as f64 * config.size as f64) / t.seconds / 1e6,
        window: t.window,
        round_trips: histogram.len(),
        round_trips_lost: round_trips.lost,
        p50_us: q(0.5),
        p90_us: q(0.9),
        p99_us: q(0.99),
        p999_us: q(0.999),
        max_us: histogram.max() as f64,
        node,
    }
}

/// A payload of `size` bytes (at least 8) led by `seq`, big-endian.
fn payload(seq: u64, size: usize) -> Bytes {
    let mut buf = vec![0u8; size.max(8)];
    buf[..8].copy_from_slice(&seq.to_be_bytes());
    Bytes::from(buf)
}

fn seq_of(payload: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(payload.get(..8)?.try_into().ok()?))
}

/// A random tag that keeps the names of concurrent benches on one node apart.
fn random_tag() -> u64 {
    let mut tag = [0u8; 8];
    // Without OS randomness the tag is 0: names may then collide with another bench, which only
    // matters if two run at once.
    let _ = getrandom::fill(&mut tag);
    u64::from_le_bytes(tag)
}

/// Checks the settings every mode shares.
fn validate(config: &LoadConfig) -> Result<(), BenchError> {
    if config.size < 8 || config.size > MAX_PAYLOAD {
        return Err(BenchError::Invalid(format!(
            "--size {}: payloads are 8 to {MAX_PAYLOAD} bytes (a sequence number leads each; a \
             SLIM node accepts messages of at most 4 MiB, header included)",
            config.size
        )));
    }
    if config.stop == Stop::Count(0) {
        return Err(BenchError::Invalid("--count must be at least 1".into()));
    }
    if let Stop::Duration(d) = config.stop {
        if d.is_zero() {
            return Err(BenchError::Invalid("--duration must be positive".into()));
        }
    }
    if config.window == 0 {
        return Err(BenchError::Invalid("--window must be at least 1".into()));
    }
    if config.mls && config.mode != Mode::P2p {
        return Err(BenchError::Invalid(
            "--mls applies to --mode p2p (raw publishes carry no session to encrypt)".into(),
        ));
    }
    if config.unreliable && config.mode != Mode::P2p {
        return Err(BenchError::Invalid(
            "--unreliable applies to --mode p2p (raw publishes are never acknowledged)".into(),
        ));
    }
    let raw = matches!(config.mode, Mode::Unicast | Mode::Anycast | Mode::Multicast);
    if config.client == ClientKind::Wire && !raw {
        return Err(BenchError::Invalid(
            "--client wire applies to the raw modes (publish, anycast, multicast): p2p runs \
             the session layer, which needs the app client"
                .into(),
        ));
    }
    Ok(())
}

/// Runs the bench `config` describes.
pub async fn run(config: &LoadConfig) -> Result<BenchReport, BenchError> {
    validate(config)?;
    let probe = match config.node_pid {
        Some(pid) => Some(NodeProbe::new(pid).map_err(|reason| BenchError::Probe { pid, reason })?),
        None => None,
    };
    match config.mode {
        Mode::P2p => p2p(config, probe.as_ref()).await,
        Mode::TcpRelay => relay::run(config).await,
        Mode::Unicast | Mode::Anycast | Mode::Multicast => raw::run(config, probe.as_ref()).await,
    }
}

/// Raw data-plane publish, one publisher → node → one subscriber: throughput, then round trips.
pub async fn run_publish(config: &BenchConfig) -> Result<BenchReport, BenchError> {
    run(&LoadConfig::from(config)).await
}

/// A p2p session between two apps through the node: one-way throughput (reliable: every message
/// acknowledged by the session layer), then request/reply round trips.
pub async fn run_p2p(config: &BenchConfig) -> Result<BenchReport, BenchError> {
    run(&LoadConfig {
        mode: Mode::P2p,
        ..LoadConfig::from(config)
    })
    .await
}

/// The node's counters before the throughput phase; turned into a [`NodeUsage`] at the end.
struct NodeWatch<'a> {
    probe: &'a NodeProbe,
    at_start: probe::NodeSample,
}

impl<'a> NodeWatch<'a> {
    fn start(probe: Option<&'a NodeProbe>) -> Result<Option<NodeWatch<'a>>, BenchError> {
        let Some(probe) = probe else { return Ok(None) };
        let at_start = probe.sample().map_err(|reason| BenchError::Probe {
            pid: probe.pid(),
            reason,
        })?;
        Ok(Some(NodeWatch { probe, at_start }))
    }

    fn sample(&self) -> Result<probe::NodeSample, BenchError> {
        self.probe.sample().map_err(|reason| BenchError::Probe {
            pid: self.probe.pid(),
            reason,
        })
    }
}

/// Samples the node after the throughput phase and at the end.
fn node_usage(
    watch: Option<&NodeWatch<'_>>,
    after_throughput: Option<probe::NodeSample>,
    messages: u64,
    seconds: f64,
) -> Result<Option<NodeUsage>, BenchError> {
    let (Some(watch), Some(after_throughput)) = (watch, after_throughput) else {
        return Ok(None);
    };
    let end = watch.sample()?;
    Ok(Some(NodeUsage::between(
        watch.probe,
        &watch.at_start,
        &after_throughput,
        &end,
        messages,
        seconds,
    )))
}

/// See [`run_p2p`].
async fn p2p(config: &LoadConfig, probe: Option<&NodeProbe>) -> Result<BenchReport, BenchError> {
    use crate::session::{App, Reliability, SessionConfig};
    use slim_core::session::SessionEvent;

    if config.publishers != 1 || config.subscribers != 1 {
        return Err(BenchError::Invalid(
            "--mode p2p runs one session between two apps: --publishers and --subscribers apply \
             to the raw modes only"
                .into(),
        ));
    }
    const SECRET: &str = "slim-tokio-bench-shared-secret-0123456789";
    let tag = random_tag();
    let server_name = Name::new("bench", "p2p", &format!("server-{tag:x}"));
    let client = App::connect(
        &config.endpoint,
        Name::new("bench", "p2p", &format!("client-{tag:x}")),
        SECRET,
    )
    .await?;
    let server = Arc::new(App::connect(&config.endpoint, server_name.clone(), SECRET).await?);
    let session_config = SessionConfig {
        reliability: (!config.unreliable).then_some(Reliability {
            interval: Duration::from_secs(1),
            max_retries: 10,
        }),
        mls: config.mls,
        ..SessionConfig::default()
    };
    let session = client.open_session(&server_name, session_config).await?;
    // Unacknowledged messages beyond the sender's retransmission buffer could not be resent if
    // one were lost: the window stays within it. (Unreliable sessions have no acknowledgements;
    // the window then counts what the server app has not received yet.)
    let window = config
        .window
        .min(WINDOW_BYTES / (config.size + 512))
        .clamp(1, slim_core::session::sender::PRODUCER_BUFFER);

    // The server counts, then echoes once told to (a payload of 8 bytes: u64::MAX).
    let counters = Arc::new(Counters::default());
    let out_of_order = Arc::new(AtomicU64::new(0));
    let last_seen = Arc::new(std::sync::Mutex::new(Instant::now()));
    let server_task = {
        let (server, counters, out_of_order, last_seen) = (
            server.clone(),
            counters.clone(),
            out_of_order.clone(),
            last_seen.clone(),
        );
        tokio::spawn(async move {
            let mut expected = 0u64;
            let mut echo = false;
            while let Ok(event) = server.next_event().await {
                let SessionEvent::Message {
                    session, payload, ..
                } = event
                else {
                    continue;
                };
                if echo {
                    if server.publish(session, payload).await.is_err() {
                        return;
                    }
                    continue;
                }
                if seq_of(&payload) == Some(u64::MAX) {
                    echo = true;
                    continue;
                }
                if seq_of(&payload) != Some(expected) {
                    out_of_order.fetch_add(1, Ordering::Relaxed);
                }
                expected += 1;
                counters.received.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut last) = last_seen.lock() {
                    *last = Instant::now();
                }
            }
        })
    };
    // Throughput: at most `window` messages not yet acknowledged (unreliable: not yet received).
    let watch = NodeWatch::start(probe)?;
    let bar = Progress::throughput(config.progress, config.stop, 1, counters.clone());
    let start = Instant::now();
    let mut sent = 0u64;
    let mut acked = 0u64;
    loop {
        let more = match config.stop {
            Stop::Duration(d) => start.elapsed() < d,
            Stop::Count(n) => sent < n,
        };
        if !more {
            break;
        }
        let outstanding = Outstanding {
            client: &client,
            received: &counters.received,
            unreliable: config.unreliable,
        };
        outstanding
            .wait_below(window as u64, Duration::from_secs(5), sent, &mut acked)
            .await;
        client.publish(session, payload(sent, config.size)).await?;
        sent += 1;
        counters.sent.store(sent, Ordering::Relaxed);
    }
    // Everything acknowledged (or received) before the round trips.
    let outstanding = Outstanding {
        client: &client,
        received: &counters.received,
        unreliable: config.unreliable,
    };
    outstanding
        .wait_below(1, Duration::from_secs(2), sent, &mut acked)
        .await;
    drop(bar);
    let after_throughput = watch.as_ref().map(NodeWatch::sample).transpose()?;
    let received = counters.received.load(Ordering::Relaxed);
    let seconds = last_seen
        .lock()
        .map(|last| last.saturating_duration_since(start))
        .unwrap_or_default()
        .as_secs_f64()
        .max(1e-9);

    client
        .publish(session, Bytes::from(u64::MAX.to_be_bytes().to_vec()))
        .await?;
    let mut round_trips = RoundTrips::new();
    let warm_up = warm_up(config.round_trips);
    let bar = Progress::round_trips(config.progress, warm_up + config.round_trips);
    for i in 0..warm_up + config.round_trips {
        let t0 = Instant::now();
        client.publish(session, payload(i, config.size)).await?;
        let reply = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match client.next_event().await {
                    Ok(SessionEvent::Message { .. }) => return true,
                    Ok(_) => continue,
                    Err(_) => return false,
                }
            }
        })
        .await;
        bar.inc();
        match reply {
            Ok(true) if i >= warm_up => round_trips.record(t0.elapsed()),
            Ok(true) => {}
            _ => round_trips.lost += 1,
        }
    }
    drop(bar);
    server_task.abort();
    let node = node_usage(watch.as_ref(), after_throughput, received, seconds)?;
    Ok(report(
        config,
        Throughput {
            sent,
            expected: sent,
            received,
            out_of_order: out_of_order.load(Ordering::Relaxed),
            seconds,
            window,
        },
        &round_trips,
        node,
    ))
}

/// The p2p sender's messages not yet acknowledged (reliable) or received (unreliable: the
/// server app's count, in this process).
struct Outstanding<'a> {
    client: &'a crate::session::App,
    received: &'a AtomicU64,
    unreliable: bool,
}

impl Outstanding<'_> {
    fn done(&self, sent: u64, acked: u64) -> u64 {
        let done = if self.unreliable {
            self.received.load(Ordering::Relaxed)
        } else {
            acked
        };
        done.min(sent)
    }

    /// Waits until fewer than `room` of the `sent` messages are outstanding, counting the
    /// acknowledgements into `acked`; false after `patience` without progress (the rest are
    /// lost).
    async fn wait_below(&self, room: u64, patience: Duration, sent: u64, acked: &mut u64) -> bool {
        use slim_core::session::SessionEvent;
        let mut last_done = self.done(sent, *acked);
        let mut last_progress = Instant::now();
        while sent - self.done(sent, *acked) >= room.max(1) {
            if last_progress.elapsed() >= patience {
                return false;
            }
            if self.unreliable {
                tokio::time::sleep(Duration::from_micros(50)).await;
            } else {
                match tokio::time::timeout(patience, self.client.next_event()).await {
                    Ok(Ok(SessionEvent::Delivered { .. })) => *acked += 1,
                    Ok(Ok(_)) => {}
                    _ => return false,
                }
            }
            if self.done(sent, *acked) != last_done {
                last_done = self.done(sent, *acked);
                last_progress = Instant::now();
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> LoadConfig {
        LoadConfig {
            endpoint: "127.0.0.1:1".into(),
            mode: Mode::Unicast,
            size: 64,
            stop: Stop::Count(10),
            round_trips: 10,
            window: 10,
            publishers: 1,
            subscribers: 1,
            progress: false,
            node_pid: None,
            mls: false,
            unreliable: false,
            client: ClientKind::App,
        }
    }

    #[test]
    fn settings_out_of_range_are_refused_before_connecting() {
        let sizes = [7, MAX_PAYLOAD + 1];
        for size in sizes {
            let config = LoadConfig { size, ..base() };
            assert!(matches!(validate(&config), Err(BenchError::Invalid(_))));
        }
        let config = LoadConfig {
            stop: Stop::Count(0),
            ..base()
        };
        assert!(matches!(validate(&config), Err(BenchError::Invalid(_))));
        assert!(validate(&LoadConfig {
            size: 1024 * 1024,
            ..base()
        })
        .is_ok());
        let wire_p2p = LoadConfig {
            mode: Mode::P2p,
            client: ClientKind::Wire,
            ..base()
        };
        assert!(matches!(validate(&wire_p2p), Err(BenchError::Invalid(_))));
    }

    #[test]
    fn json_keeps_the_keys_scripts_read() {
        let t = Throughput {
            sent: 10,
            expected: 30,
            received: 29,
            out_of_order: 0,
            seconds: 0.5,
            window: 8,
        };
        let mut rt = RoundTrips::new();
        rt.record(Duration::from_micros(70));
        let report = report(
            &LoadConfig {
                mode: Mode::Multicast,
                subscribers: 3,
                ..base()
            },
            t,
            &rt,
            None,
        );
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(json["mode"], "multicast");
        assert_eq!(json["msgs_per_s"], 58.0);
        assert_eq!(json["published_per_s"], 20.0);
        assert_eq!(json["lost"], 1);
        assert!(json["p50_us"].as_f64().unwrap() >= 70.0);
        assert!(json["p99_us"].is_number());
        assert!(json.get("node_cpu_s").is_none());
    }
}
