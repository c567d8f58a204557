//! The floor under every number the bench reports: a plain TCP relay that copies bytes between
//! two connections ([`serve`], `slim-tokio tcp-relay`), measured by the same bench clients on
//! the same runtime as a node ([`run`], `slim-tokio bench --mode tcp-relay`).
//!
//! A publish round trip through a node crosses four sockets and wakes four tasks in three
//! processes (publisher → node → subscriber → node → publisher); the relay's round trip does the
//! same with no protocol at all (A → relay → B → relay → A). On a VM whose idle cores take tens
//! of microseconds to wake, that floor moves with the machine's load, so a node's latency is
//! only meaningful next to the relay's measured in the same run.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{
    report, warm_up, BenchError, BenchReport, LoadConfig, RoundTrips, Stop, Throughput,
    WINDOW_BYTES,
};

/// After A's last message, how long B waits for more before counting the rest lost.
const DRAIN_IDLE: Duration = Duration::from_secs(2);

/// Relays between connections taken in pairs, in the order they arrive (1st with 2nd, 3rd with
/// 4th, …), until dropped. A connection closed while it waits for its partner (a
/// port probe) is not paired.
pub async fn serve(listener: TcpListener) {
    let mut waiting: Option<TcpStream> = None;
    loop {
        let accepted = match &waiting {
            Some(first) => tokio::select! {
                accepted = listener.accept() => accepted,
                () = closed(first) => {
                    waiting = None;
                    continue;
                }
            },
            None => listener.accept().await,
        };
        let accepted = match accepted {
            Ok((stream, _)) => stream,
            // Out of file descriptors and the like: back off, as the node does.
            Err(error) => {
                tracing::warn!(%error, "tcp relay: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = accepted.set_nodelay(true);
        let Some(mut first) = waiting.take() else {
            waiting = Some(accepted);
            continue;
        };
        let mut second = accepted;
        tokio::spawn(async move {
            let _ = tokio::io::copy_bidirectional(&mut first, &mut second).await;
        });
    }
}

/// Completes once the peer has closed `stream` (or it failed); pending while it is open, also
/// when it already sent data, which stays unread for the relay.
async fn closed(stream: &TcpStream) {
    let mut byte = [0u8; 1];
    match stream.peek(&mut byte).await {
        Ok(0) | Err(_) => {}
        Ok(_) => std::future::pending().await,
    }
}

/// Messages of `config.size` bytes from A to B through the relay for the throughput phase,
/// then `config.round_trips` sequential echoes (B sends back what it got).
pub(super) async fn run(config: &LoadConfig) -> Result<BenchReport, BenchError> {
    let address = config
        .endpoint
        .trim_start_matches("http://")
        .trim_end_matches('/');
    let io = |e: std::io::Error| BenchError::Task(format!("tcp relay at {address}: {e}"));
    let mut a = TcpStream::connect(address).await.map_err(io)?;
    let mut b = TcpStream::connect(address).await.map_err(io)?;
    let _ = (a.set_nodelay(true), b.set_nodelay(true));
    let size = config.size;

    // Throughput: A writes as fast as TCP takes it; B counts whole messages.
    let (mut a_read, mut a_write) = a.split();
    let (mut b_read, mut b_write) = b.split();
    let started = Instant::now();
    // How many A sent, once it is done: B stops when all of it arrived (or, on a loss, after
    // a silence of `DRAIN_IDLE`, not at the first pause of a starved relay).
    let sent_total = std::sync::OnceLock::<u64>::new();
    let send = async {
        let message = vec![0u8; size];
        let mut sent = 0u64;
        // A batch of writes per check of the clock, each at most the bench's byte window.
        let batch = (WINDOW_BYTES / size).clamp(1, 64) as u64;
        loop {
            let done = match config.stop {
                Stop::Count(n) => sent >= n,
                Stop::Duration(d) => started.elapsed() >= d,
            };
            if done {
                let _ = sent_total.set(sent);
                return Ok::<u64, std::io::Error>(sent);
            }
            for _ in 0..batch {
                a_write.write_all(&message).await?;
                sent += 1;
            }
        }
    };
    let receive = async {
        let mut buf = vec![0u8; 64 * 1024];
        let mut bytes = 0u64;
        let mut last = started;
        // A keeps the connection open for the echoes: the end is counted, not seen.
        loop {
            if sent_total
                .get()
                .is_some_and(|&total| bytes >= total * size as u64)
            {
                return Ok::<(u64, Instant), std::io::Error>((bytes, last));
            }
            match tokio::time::timeout(Duration::from_millis(100), b_read.read(&mut buf)).await {
                Ok(Ok(0)) => return Ok((bytes, last)),
                Ok(Ok(n)) => {
                    bytes += n as u64;
                    last = Instant::now();
                }
                Ok(Err(e)) => return Err(e),
                Err(_) if sent_total.get().is_some() && last.elapsed() >= DRAIN_IDLE => {
                    return Ok((bytes, last));
                }
                Err(_) => {}
            }
        }
    };
    let (sent, (bytes, last)) = tokio::try_join!(send, receive).map_err(io)?;
    let received = bytes / size as u64;
    let throughput = Throughput {
        sent,
        expected: sent,
        received,
        out_of_order: 0,
        seconds: last.duration_since(started).as_secs_f64().max(1e-9),
        window: 0,
    };

    // Round trips: A sends one message, B echoes it, A waits for all of it.
    let mut round_trips = RoundTrips::new();
    let (mut message, mut echoed) = (vec![0u8; size], vec![0u8; size]);
    for i in 0..warm_up(config.round_trips) + config.round_trips {
        let at = Instant::now();
        let echo = async {
            b_read.read_exact(&mut echoed).await?;
            b_write.write_all(&echoed).await
        };
        let ping = async {
            a_write.write_all(&message).await?;
            a_read.read_exact(&mut message).await.map(|_| ())
        };
        tokio::try_join!(echo, ping).map_err(io)?;
        if i >= warm_up(config.round_trips) {
            round_trips.record(at.elapsed());
        }
    }
    Ok(report(config, throughput, &round_trips, None))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{ClientKind, Mode, Stop};

    #[tokio::test]
    async fn the_relay_baseline_streams_and_echoes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let relay = tokio::spawn(serve(listener));
        // A port probe (connect, close) must not take a place in the next pair.
        drop(TcpStream::connect(address).await.unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
        let report = crate::bench::run(&LoadConfig {
            endpoint: address.to_string(),
            mode: Mode::TcpRelay,
            size: 100,
            stop: Stop::Count(5_000),
            round_trips: 30,
            window: 1000,
            publishers: 1,
            subscribers: 1,
            progress: false,
            node_pid: None,
            mls: false,
            unreliable: false,
            client: ClientKind::App,
        })
        .await
        .unwrap();
        assert_eq!(report.mode, "tcp-relay");
        // Whole messages only: the batch may overshoot the count by less than a batch.
        assert!(
            report.sent >= 5_000 && report.sent < 5_000 + 64,
            "{report:?}"
        );
        assert_eq!(report.received, report.sent, "nothing lost in the relay");
        assert_eq!(report.round_trips, 30);
        assert!(report.p50_us > 0.0);
        relay.abort();
    }
}
