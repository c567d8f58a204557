//! `slim-tokio bench`: measures any SLIM node (ours or the reference) from the outside, with two
//! clients on loopback: one-way throughput of raw publishes (1 publisher → node → 1 subscriber)
//! and the round trip of a publish answered by a publish.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use slim_proto::Name;
use tokio::sync::Semaphore;

use crate::app::{Client, ClientError};

/// What to run.
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

/// Results, medians and percentiles in microseconds.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub mode: &'static str,
    pub size: usize,
    pub sent: u64,
    pub received: u64,
    pub out_of_order: u64,
    pub seconds: f64,
    pub msgs_per_s: f64,
    pub mb_per_s: f64,
    pub round_trips: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl BenchReport {
    /// One JSON line (no serde needed for flat numbers).
    pub fn to_json(&self) -> String {
        format!(
            "{{\"mode\":\"{}\",\"size\":{},\"sent\":{},\"received\":{},\"lost\":{},\"out_of_order\":{},\"seconds\":{:.3},\"msgs_per_s\":{:.0},\"mb_per_s\":{:.2},\"round_trips\":{},\"p50_us\":{:.1},\"p90_us\":{:.1},\"p99_us\":{:.1},\"p999_us\":{:.1},\"max_us\":{:.1}}}",
            self.mode,
            self.size,
            self.sent,
            self.received,
            self.sent.saturating_sub(self.received),
            self.out_of_order,
            self.seconds,
            self.msgs_per_s,
            self.mb_per_s,
            self.round_trips,
            self.p50_us,
            self.p90_us,
            self.p99_us,
            self.p999_us,
            self.max_us
        )
    }
}

/// Counts of a throughput phase.
struct Throughput {
    sent: u64,
    received: u64,
    out_of_order: u64,
    seconds: f64,
}

fn round_trip_histogram() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
        .expect("valid histogram bounds")
}

fn report(
    mode: &'static str,
    size: usize,
    t: Throughput,
    histogram: &hdrhistogram::Histogram<u64>,
) -> BenchReport {
    let q = |p: f64| histogram.value_at_quantile(p) as f64;
    BenchReport {
        mode,
        size,
        sent: t.sent,
        received: t.received,
        out_of_order: t.out_of_order,
        seconds: t.seconds,
        msgs_per_s: t.received as f64 / t.seconds,
        mb_per_s: (t.received as f64 * size as f64) / t.seconds / 1e6,
        round_trips: histogram.len(),
        p50_us: q(0.5),
        p90_us: q(0.9),
        p99_us: q(0.99),
        p999_us: q(0.999),
        max_us: histogram.max() as f64,
    }
}

fn payload(seq: u64, size: usize) -> Bytes {
    let mut buf = vec![0u8; size.max(8)];
    buf[..8].copy_from_slice(&seq.to_be_bytes());
    Bytes::from(buf)
}

fn seq_of(payload: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(payload.get(..8)?.try_into().ok()?))
}

/// Raw data-plane publish: throughput, then round trips.
pub async fn run_publish(config: &BenchConfig) -> Result<BenchReport, ClientError> {
    let mut tag = [0u8; 8];
    let _ = getrandom::fill(&mut tag);
    let tag = u64::from_le_bytes(tag);
    let pub_name = Name::with_id(
        "bench",
        "publish",
        &format!("pub-{tag:x}"),
        u128::from(tag) << 1,
    );
    let sub_name = Name::with_id(
        "bench",
        "publish",
        &format!("sub-{tag:x}"),
        (u128::from(tag) << 1) | 1,
    );
    let publisher = Arc::new(Client::connect(&config.endpoint, pub_name.clone()).await?);
    let subscriber = Arc::new(Client::connect(&config.endpoint, sub_name.clone()).await?);
    publisher.subscribe(&pub_name).await?;
    subscriber.subscribe(&sub_name).await?;

    // Throughput: the publisher keeps `window` messages in flight.
    let window = Arc::new(Semaphore::new(config.window.max(1)));
    let received = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let done_sending = Arc::new(tokio::sync::Notify::new());
    let receiver = {
        let (subscriber, window, received, sent, done_sending) = (
            subscriber.clone(),
            window.clone(),
            received.clone(),
            sent.clone(),
            done_sending.clone(),
        );
        tokio::spawn(async move {
            let mut expected = 0u64;
            let mut out_of_order = 0u64;
            let mut last = Instant::now();
            let sender_finished = done_sending.notified();
            tokio::pin!(sender_finished);
            let mut finished = false;
            loop {
                let idle = if finished {
                    Duration::from_millis(500)
                } else {
                    Duration::from_secs(10)
                };
                let message = tokio::select! {
                    () = &mut sender_finished, if !finished => { finished = true; continue; }
                    m = tokio::time::timeout(idle, subscriber.recv()) => m,
                };
                let Ok(Ok(message)) = message else { break };
                if seq_of(&message.payload) != Some(expected) {
                    out_of_order += 1;
                }
                expected = seq_of(&message.payload).map_or(expected + 1, |s| s + 1);
                last = Instant::now();
                window.add_permits(1);
                let count = received.fetch_add(1, Ordering::Relaxed) + 1;
                if finished && count >= sent.load(Ordering::Relaxed) {
                    break;
                }
            }
            (last, out_of_order)
        })
    };
    let start = Instant::now();
    let mut seq = 0u64;
    while start.elapsed() < config.duration {
        match tokio::time::timeout(Duration::from_secs(2), window.acquire()).await {
            Ok(Ok(permit)) => permit.forget(),
            _ => break, // messages were lost: stop instead of waiting forever
        }
        publisher
            .publish(&sub_name, payload(seq, config.size))
            .await?;
        seq += 1;
        sent.store(seq, Ordering::Relaxed);
    }
    done_sending.notify_one();
    let (last, out_of_order) = receiver.await.map_err(|_| ClientError::Closed)?;
    let received = received.load(Ordering::Relaxed);
    let seconds = last
        .saturating_duration_since(start)
        .as_secs_f64()
        .max(1e-9);

    // Round trips: the subscriber echoes, the publisher waits for each answer.
    let echo = {
        let (subscriber, pub_name) = (subscriber.clone(), pub_name.clone());
        tokio::spawn(async move {
            while let Ok(message) = subscriber.recv().await {
                if subscriber
                    .publish(&pub_name, message.payload)
                    .await
                    .is_err()
                {
                    return;
                }
            }
        })
    };
    let mut histogram = round_trip_histogram();
    let warm_up = (config.round_trips / 10).max(10);
    for i in 0..warm_up + config.round_trips {
        let t0 = Instant::now();
        publisher
            .publish(&sub_name, payload(i, config.size))
            .await?;
        match tokio::time::timeout(Duration::from_secs(5), publisher.recv()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => continue, // lost: not a sample
        }
        if i >= warm_up {
            let _ = histogram.record(t0.elapsed().as_micros().max(1) as u64);
        }
    }
    echo.abort();
    Ok(report(
        "publish",
        config.size,
        Throughput {
            sent: seq,
            received,
            out_of_order,
            seconds,
        },
        &histogram,
    ))
}

/// A reliable p2p session between two apps through the node: one-way throughput (every message
/// acknowledged by the session layer), then request/reply round trips.
pub async fn run_p2p(config: &BenchConfig) -> Result<BenchReport, crate::session::AppError> {
    use crate::session::{App, Reliability, SessionConfig};
    use slim_core::session::SessionEvent;

    const SECRET: &str = "slim-tokio-bench-shared-secret-0123456789";
    let mut tag = [0u8; 8];
    let _ = getrandom::fill(&mut tag);
    let tag = u64::from_le_bytes(tag);
    let server_name = Name::new("bench", "p2p", &format!("server-{tag:x}"));
    let client = App::connect(
        &config.endpoint,
        Name::new("bench", "p2p", &format!("client-{tag:x}")),
        SECRET,
    )
    .await?;
    let server = Arc::new(App::connect(&config.endpoint, server_name.clone(), SECRET).await?);
    let reliable = SessionConfig {
        reliability: Some(Reliability {
            interval: Duration::from_secs(1),
            max_retries: 10,
        }),
        ..SessionConfig::default()
    };
    let session = client.open_session(&server_name, reliable).await?;

    // The server counts, then echoes once told to (a payload of 8 bytes: u64::MAX).
    let counted = Arc::new(AtomicU64::new(0));
    let out_of_order = Arc::new(AtomicU64::new(0));
    let last_seen = Arc::new(std::sync::Mutex::new(Instant::now()));
    let server_task = {
        let (server, counted, out_of_order, last_seen) = (
            server.clone(),
            counted.clone(),
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
                counted.fetch_add(1, Ordering::Relaxed);
                *last_seen.lock().expect("lock") = Instant::now();
            }
        })
    };
    // Throughput: at most `window` messages not yet acknowledged.
    let start = Instant::now();
    let mut sent = 0u64;
    let mut acked = 0u64;
    while start.elapsed() < config.duration {
        while sent - acked >= config.window.max(1) as u64 {
            match tokio::time::timeout(Duration::from_secs(5), client.next_event()).await {
                Ok(Ok(SessionEvent::Delivered { .. })) => acked += 1,
                Ok(Ok(_)) => {}
                _ => break,
            }
        }
        client.publish(session, payload(sent, config.size)).await?;
        sent += 1;
    }
    let drain_deadline = Instant::now() + Duration::from_secs(10);
    while acked < sent && Instant::now() < drain_deadline {
        match tokio::time::timeout(Duration::from_secs(2), client.next_event()).await {
            Ok(Ok(SessionEvent::Delivered { .. })) => acked += 1,
            Ok(Ok(_)) => {}
            _ => break,
        }
    }
    let received = counted.load(Ordering::Relaxed);
    let seconds = last_seen
        .lock()
        .expect("lock")
        .saturating_duration_since(start)
        .as_secs_f64()
        .max(1e-9);

    client
        .publish(session, Bytes::from(u64::MAX.to_be_bytes().to_vec()))
        .await?;
    let mut histogram = round_trip_histogram();
    let warm_up = (config.round_trips / 10).max(10);
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
        if matches!(reply, Ok(true)) && i >= warm_up {
            let _ = histogram.record(t0.elapsed().as_micros().max(1) as u64);
        }
    }
    server_task.abort();
    Ok(report(
        "p2p",
        config.size,
        Throughput {
            sent,
            received,
            out_of_order: out_of_order.load(Ordering::Relaxed),
            seconds,
        },
        &histogram,
    ))
}
