//! Scale: the node's memory with many idle connections and with many subscriptions.
//!
//! The node runs as its own process (the `slim-tokio` binary of this build), so the RSS measured
//! (`VmRSS` / `VmHWM` of `/proc/PID/status`) is the node's alone, not the clients'. The clients are
//! the raw test client of `common` (TCP, HTTP/2, OpenChannel, a negotiated EDGE link with header
//! MACs), in this process.
//!
//! * `idle_connections`: N negotiated connections that then stay idle; the node must still route
//!   a probe between two more clients. Reports RSS per connection.
//! * `subscriptions`: M subscriptions (signed Subscribe messages, each acknowledged) spread over
//!   a few connections; 10 instances per service (`org/scale/svc-{i/10}`, ids 1..=10), so the
//!   table holds M/10 service prefixes. The node must still route exact and anycast probes.
//!   Reports RSS per subscription. Then every connection closes, and the same subscriptions are
//!   made again on new connections: RSS must not grow much (the allocator keeps what the first
//!   round freed, so RSS barely falls after the close; the second round shows it is reused).
//!
//! Defaults keep CI short (2 000 connections, 100 000 subscriptions: ≈ 10 s each in a debug
//! build); `SLIM_SCALE_FULL=1` runs the issue's numbers (10 000 connections, 1 000 000
//! subscriptions; use `--release`). Finer: `SLIM_SCALE_CONNECTIONS`, `SLIM_SCALE_SUBSCRIPTIONS`,
//! `SLIM_SCALE_SUB_CONNECTIONS` (default 4), `SLIM_SCALE_IDLE_SECS` (how long the connections
//! stay idle before the second sample, default 2), `SLIM_SCALE_NODE_WRAPPER` (run the node under
//! e.g. `heaptrack -o /tmp/node`, to see what its memory is made of).
//!
//! ```sh
//! SLIM_SCALE_FULL=1 cargo test --release -p adapter-tokio --test scale -- --nocapture --test-threads 1
//! ```
//!
//! File descriptors: this process and the node each need one per connection. The soft
//! RLIMIT_NOFILE is raised up to the hard limit (the node inherits it); if the hard limit is too
//! low the test fails and says so, rather than measure fewer connections than asked.

mod common;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use slim_proto::pb::message::MessageType;
use slim_proto::Name;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Bounds that catch a gross regression (an order of magnitude), not small drifts: the numbers
/// themselves are printed and recorded in BENCHMARKS.md.
const MAX_BYTES_PER_CONNECTION: u64 = 256 * 1024;
const MAX_BYTES_PER_SUBSCRIPTION: u64 = 4 * 1024;
/// Subscriptions sent before their acks are read (the node queues at most 1 024 frames for a
/// connection that does not read, so the batch must stay below that).
const SUBSCRIBE_BATCH: usize = 512;
/// Concurrent connection handshakes.
const CONNECTING: usize = 64;

fn full() -> bool {
    std::env::var("SLIM_SCALE_FULL").is_ok_and(|v| v == "1")
}

/// Raises the soft RLIMIT_NOFILE to at least `wanted`, or fails loudly: measuring fewer
/// connections than asked would record a wrong number.
#[allow(clippy::unnecessary_cast)] // rlim_t is u64 on Linux, not everywhere
fn ensure_fd_limit(wanted: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    assert!(ok, "scale: getrlimit(RLIMIT_NOFILE) failed");
    if (limit.rlim_cur as u64) >= wanted {
        return;
    }
    assert!(
        (limit.rlim_max as u64) >= wanted,
        "scale: this test needs {wanted} file descriptors in this process and as many in the \
         node, but the hard RLIMIT_NOFILE is {}: raise it (`ulimit -Hn`, limits.conf, or the \
         container's nofile) or ask for fewer connections with SLIM_SCALE_CONNECTIONS",
        limit.rlim_max
    );
    let raised = libc::rlimit {
        rlim_cur: wanted as libc::rlim_t,
        rlim_max: limit.rlim_max,
    };
    // SAFETY: as above.
    let ok = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0;
    assert!(
        ok,
        "scale: cannot raise the soft RLIMIT_NOFILE to {wanted}: {}",
        std::io::Error::last_os_error()
    );
}

/// A `slim-tokio` node in its own process; stopped when dropped.
struct NodeProcess {
    child: Child,
    /// The node's own pid: the child's, or with a wrapper the descendant running the binary.
    pid: u32,
    wrapped: bool,
    addr: SocketAddr,
}

/// One reading of the node's memory and descriptors.
#[derive(Debug, Clone, Copy)]
struct Usage {
    rss: u64,
    peak: u64,
    fds: usize,
}

/// The first descendant of `pid` whose executable is `exe`.
fn descendant_running(pid: u32, exe: &std::path::Path) -> Option<u32> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    children
        .split_whitespace()
        .filter_map(|c| c.parse::<u32>().ok())
        .find_map(|child| {
            let running = std::fs::read_link(format!("/proc/{child}/exe")).ok();
            if running.as_deref() == Some(exe) {
                Some(child)
            } else {
                descendant_running(child, exe)
            }
        })
}

impl NodeProcess {
    /// Starts the node; `SLIM_SCALE_NODE_WRAPPER` (e.g. `heaptrack -o /tmp/node`) runs it under
    /// a wrapper, to see what its memory is made of.
    fn start() -> NodeProcess {
        // A free port: bound, then released for the node (a race with another process taking it
        // in between is possible but not worth more machinery in a test).
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port");
        let binary = std::path::Path::new(env!("CARGO_BIN_EXE_slim-tokio"));
        let wrapper = std::env::var("SLIM_SCALE_NODE_WRAPPER").unwrap_or_default();
        let mut words = wrapper.split_whitespace();
        let mut command = match words.next() {
            Some(program) => {
                let mut command = Command::new(program);
                command.args(words).arg(binary);
                command
            }
            None => Command::new(binary),
        };
        let mut child = command
            .arg("--endpoint")
            .arg(addr.to_string())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the slim-tokio binary");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("scale: the node exited at start: {status}");
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "scale: the node did not listen on {addr} within 60 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let pid = if wrapper.is_empty() {
            child.id()
        } else {
            let exe = binary.canonicalize().expect("the node binary's path");
            descendant_running(child.id(), &exe).unwrap_or_else(|| {
                panic!("scale: no process runs {} under the wrapper", exe.display())
            })
        };
        NodeProcess {
            child,
            pid,
            wrapped: !wrapper.is_empty(),
            addr,
        }
    }

    fn usage(&mut self) -> Usage {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("scale: the node died: {status}");
        }
        let pid = self.pid;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_else(|e| panic!("scale: /proc/{pid}/status: {e}"));
        let kib = |key: &str| -> u64 {
            status
                .lines()
                .find_map(|line| line.strip_prefix(key))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or_else(|| panic!("scale: no {key} in /proc/{pid}/status"))
        };
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|dir| dir.count())
            .unwrap_or(0);
        Usage {
            rss: kib("VmRSS:") * 1024,
            peak: kib("VmHWM:") * 1024,
            fds,
        }
    }

    /// Waits (a little past the sockets' close) until the node holds at most `fds` descriptors.
    async fn settle_fds(&mut self, fds: usize, what: &str) -> Usage {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let usage = self.usage();
            if usage.fds <= fds {
                return usage;
            }
            assert!(
                Instant::now() < deadline,
                "scale: {what}: the node still holds {} descriptors (expected at most {fds})",
                usage.fds
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        // Our own child (and its descendant): stopped by pid, never by name. Under a wrapper the
        // node gets SIGTERM and time to exit cleanly, so that the wrapper can write its report.
        if self.wrapped {
            // SAFETY: kill(2) with a pid we started and a valid signal number.
            unsafe {
                libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(120);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Opens `n` negotiated connections, `CONNECTING` handshakes at a time.
async fn connect_many(addr: SocketAddr, n: usize, label: &str) -> Vec<Client> {
    let gate = Arc::new(Semaphore::new(CONNECTING));
    let mut connecting = JoinSet::new();
    for i in 0..n {
        let gate = gate.clone();
        let label = format!("{label}{i}");
        connecting.spawn(async move {
            let _permit = gate.acquire_owned().await;
            (i, Client::connect_negotiated(addr, &label).await)
        });
    }
    let mut clients: Vec<Option<Client>> = (0..n).map(|_| None).collect();
    while let Some(joined) = connecting.join_next().await {
        let (i, client) = joined.expect("a connection task");
        clients[i] = Some(client);
    }
    clients.into_iter().flatten().collect()
}

/// A probe through the node: `rx` subscribes `to`, `tx` publishes to it, `rx` must get it.
async fn probe(tx: &mut Client, rx: &mut Client, from: &Name, to: &Name, fanout: u32) {
    let sent = tx.publish(from, to, fanout, b"scale probe");
    rx.expect_copy_of(&sent).await;
}

fn per_unit(grown: u64, units: u64) -> f64 {
    grown as f64 / units.max(1) as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections() {
    let wanted = env_or(
        "SLIM_SCALE_CONNECTIONS",
        if full() { 10_000 } else { 2_000 },
        1..=50_000,
    ) as usize;
    let idle_secs = env_or("SLIM_SCALE_IDLE_SECS", 2, 0..=3600);
    ensure_fd_limit(wanted as u64 + 512);
    let started = Instant::now();
    let mut node = NodeProcess::start();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = node.usage();

    let clients = connect_many(node.addr, wanted, "idle-").await;
    let connected_in = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let connected = node.usage();
    assert!(
        connected.fds >= wanted,
        "the node holds {} descriptors for {wanted} connections",
        connected.fds
    );

    // The node still routes with all of them open.
    let mut tx = Client::connect_negotiated(node.addr, "probe-tx").await;
    let mut rx = Client::connect_negotiated(node.addr, "probe-rx").await;
    let (tx_name, rx_name) = (
        Name::with_id("org", "scale", "probe-tx", 1),
        Name::with_id("org", "scale", "probe-rx", 1),
    );
    rx.subscribe(&rx_name, 1).await;
    probe(&mut tx, &mut rx, &tx_name, &rx_name, 1).await;

    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let after_idle = node.usage();
    probe(&mut tx, &mut rx, &tx_name, &rx_name, 1).await;

    drop(clients);
    drop(tx);
    drop(rx);
    let closed = node
        .settle_fds(idle.fds + 8, "closing every connection")
        .await;

    let grown = connected.rss.saturating_sub(idle.rss);
    println!(
        "scale: idle connections: {wanted} negotiated in {connected_in:.1?}; node RSS idle \
         {:.1} MiB, with them {:.1} MiB ({:.1} KiB per connection), after {idle_secs} s idle \
         {:.1} MiB, peak {:.1} MiB, after all closed {:.1} MiB; node descriptors {} -> {} -> {}",
        mib(idle.rss),
        mib(connected.rss),
        per_unit(grown, wanted as u64) / 1024.0,
        mib(after_idle.rss),
        mib(after_idle.peak.max(closed.peak)),
        mib(closed.rss),
        idle.fds,
        connected.fds,
        closed.fds,
    );
    assert!(
        grown < MAX_BYTES_PER_CONNECTION * wanted as u64,
        "{:.1} KiB per idle connection",
        per_unit(grown, wanted as u64) / 1024.0
    );
    assert!(
        after_idle.rss < connected.rss + connected.rss / 4 + 8 * 1024 * 1024,
        "RSS grew while the connections were idle: {:.1} -> {:.1} MiB",
        mib(connected.rss),
        mib(after_idle.rss)
    );
}

/// Subscribes `names` on `client` (as `source`), `SUBSCRIBE_BATCH` at a time, checking every ack.
async fn subscribe_all(client: &mut Client, source: &Name, names: &[(Name, u64)]) {
    for batch in names.chunks(SUBSCRIBE_BATCH) {
        let messages: Vec<_> = batch
            .iter()
            .map(|(name, sub_id)| {
                let mut message = subscribe_message(source, name, *sub_id);
                client.sign(&mut message);
                message
            })
            .collect();
        client.send_batch(&messages);
        for (name, sub_id) in batch {
            let received = client.recv().await;
            match received.message.message_type {
                Some(MessageType::SubscriptionAck(ack)) => assert!(
                    ack.success && ack.subscription_id == *sub_id,
                    "{}: subscription {sub_id} ({name}) answered with {ack:?}",
                    client.label
                ),
                other => panic!("{}: expected an ack, got {other:?}", client.label),
            }
        }
    }
}

/// Subscription `i`: service `svc-{i/10}`, instance `i % 10 + 1`.
fn subscription_name(i: u64) -> Name {
    Name::with_id(
        "org",
        "scale",
        &format!("svc-{}", i / 10),
        u128::from(i % 10) + 1,
    )
}

/// Subscribes names `0..total` over `clients`, all connections at once: connection `c` takes
/// the names `i` with `i % clients.len() == c`, so every service has instances on several
/// connections (anycast has a choice to make). Returns the clients in their order.
async fn subscribe_everything(clients: Vec<Client>, total: u64) -> Vec<Client> {
    let connections = clients.len();
    let mut subscribing = JoinSet::new();
    for (c, mut client) in clients.into_iter().enumerate() {
        subscribing.spawn(async move {
            let source = Name::with_id("org", "scale", &format!("app-{c}"), c as u128 + 1);
            let names: Vec<(Name, u64)> = (c as u64..total)
                .step_by(connections)
                .map(|i| (subscription_name(i), i + 1))
                .collect();
            subscribe_all(&mut client, &source, &names).await;
            (c, client)
        });
    }
    let mut ordered: Vec<Option<Client>> = (0..connections).map(|_| None).collect();
    while let Some(joined) = subscribing.join_next().await {
        let (c, client) = joined.expect("a subscribing task");
        ordered[c] = Some(client);
    }
    ordered.into_iter().flatten().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions() {
    let wanted = env_or(
        "SLIM_SCALE_SUBSCRIPTIONS",
        if full() { 1_000_000 } else { 100_000 },
        20..=10_000_000,
    );
    let connections = env_or("SLIM_SCALE_SUB_CONNECTIONS", 4, 2..=1000) as usize;
    ensure_fd_limit(connections as u64 + 512);
    let mut node = NodeProcess::start();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = node.usage();
    let clients = connect_many(node.addr, connections, "subs-").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let connected = node.usage();

    let started = Instant::now();
    let mut clients = subscribe_everything(clients, wanted).await;
    let subscribed_in = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let subscribed = node.usage();

    // Exact: name 1 lives on connection 1 % connections; anycast to service 0 reaches one of
    // the connections holding its instances (0..10 → connections i % connections).
    let (first, rest) = clients.split_at_mut(1);
    let tx = &mut first[0];
    let rx = &mut rest[0];
    let source = Name::with_id("org", "scale", "app-0", 1);
    probe(tx, rx, &source, &subscription_name(1), 1).await;
    let any = Name::new("org", "scale", "svc-0");
    let sent = tx.publish(&source, &any, 1, b"anycast probe");
    let mut reached = 0;
    for client in clients.iter_mut() {
        if let Some(Next::Message(received)) = client.next_within(Duration::from_millis(500)).await
        {
            assert_eq!(blob_of(&received.message), blob_of(&sent));
            reached += 1;
        }
    }
    assert_eq!(
        reached, 1,
        "an anycast publish reaches exactly one subscriber"
    );

    drop(clients);
    node.settle_fds(idle.fds + 8, "closing every connection")
        .await;
    // Routes are removed when the connection's close is handled; give the router a moment.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let closed = node.usage();

    // The allocator keeps freed memory (RSS hardly drops after the close): a second round on
    // fresh connections must reuse it, or the first round leaked.
    let clients = connect_many(node.addr, connections, "again-").await;
    subscribe_everything(clients, wanted).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let again = node.usage();

    let grown = subscribed.rss.saturating_sub(connected.rss);
    println!(
        "scale: subscriptions: {wanted} over {connections} connections in {subscribed_in:.1?} \
         ({:.0} per second); node RSS idle {:.1} MiB, connected {:.1} MiB, subscribed {:.1} MiB \
         ({:.0} bytes per subscription), after all closed {:.1} MiB, subscribed again on new \
         connections {:.1} MiB, peak {:.1} MiB",
        wanted as f64 / subscribed_in.as_secs_f64(),
        mib(idle.rss),
        mib(connected.rss),
        mib(subscribed.rss),
        per_unit(grown, wanted),
        mib(closed.rss),
        mib(again.rss),
        mib(again.peak),
    );
    assert!(
        grown < MAX_BYTES_PER_SUBSCRIPTION * wanted,
        "{:.0} bytes per subscription",
        per_unit(grown, wanted)
    );
    assert!(
        again.rss < subscribed.rss + subscribed.rss / 4 + 8 * 1024 * 1024,
        "the second round grew RSS from {:.1} to {:.1} MiB: the first round's memory was not \
         reused",
        mib(subscribed.rss),
        mib(again.rss)
    );
}
