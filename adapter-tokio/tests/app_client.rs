//! The tokio client API and the bench tool against an in-process node over real loopback h2.

use slim_proto::Name;
use slim_tokio::app::{Client, ClientError};
use slim_tokio::config::{NodeConfig, ServerConfig};
use slim_tokio::Node;

async fn node() -> Node {
    Node::start(NodeConfig {
        servers: vec![ServerConfig {
            addr: "127.0.0.1:0".parse().unwrap(),
            tls: None,
        }],
        ..NodeConfig::default()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn clients_exchange_byte_exact_messages() {
    let node = node().await;
    let endpoint = format!("http://{}", node.local_addrs()[0]);
    let alice_name = Name::with_id("org", "ns", "alice", 1);
    let bob_name = Name::with_id("org", "ns", "bob", 2);
    let alice = Client::connect(&endpoint, alice_name.clone())
        .await
        .unwrap();
    let bob = Client::connect(&endpoint, bob_name.clone()).await.unwrap();
    alice.subscribe(&alice_name).await.unwrap();
    bob.subscribe(&bob_name).await.unwrap();
    for i in 0..100u32 {
        let payload: Vec<u8> = (0..(i * 53) % 5000).map(|b| (b ^ i) as u8).collect();
        alice.publish(&bob_name, payload.clone()).await.unwrap();
        let got = bob.recv().await.unwrap();
        assert_eq!(got.payload.as_ref(), payload.as_slice());
        assert_eq!(got.source, alice_name);
    }
    let stats = node.stats().await.unwrap();
    assert_eq!(stats.router.forwarded, 100);
    assert_eq!(stats.router.dropped_total(), 0, "{:?}", stats.router);
    node.shutdown().await;
}

#[tokio::test]
async fn connect_to_nothing_is_a_clear_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let result = Client::connect(&addr.to_string(), Name::with_id("a", "b", "c", 1)).await;
    assert!(
        matches!(result, Err(ClientError::Connect { .. })),
        "{result:?}"
    );
}

#[tokio::test]
async fn bench_publish_loses_nothing() {
    let node = node().await;
    let config = slim_tokio::bench::BenchConfig {
        endpoint: node.local_addrs()[0].to_string(),
        size: 100,
        duration: std::time::Duration::from_millis(300),
        round_trips: 50,
        window: 64,
    };
    let report = slim_tokio::bench::run_publish(&config).await.unwrap();
    assert!(report.sent > 0);
    assert_eq!(report.received, report.sent);
    assert_eq!(report.out_of_order, 0);
    assert_eq!(report.round_trips, 50);
    assert!(report.p50_us > 0.0 && report.p50_us <= report.p99_us);
    assert!(report.to_json().contains("\"msgs_per_s\":"));
    node.shutdown().await;
}

async fn node_at(addr: std::net::SocketAddr) -> Node {
    // The old listener's port may take a moment to be free again.
    for _ in 0..100 {
        let started = Node::start(NodeConfig {
            servers: vec![ServerConfig { addr, tls: None }],
            ..NodeConfig::default()
        })
        .await;
        if let Ok(node) = started {
            return node;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("cannot listen on {addr} again");
}

#[tokio::test]
async fn client_reconnects_and_resubscribes_after_the_node_restarts() {
    let first = node().await;
    let addr = first.local_addrs()[0];
    let alice_name = Name::with_id("org", "ns", "alice", 1);
    let alice = Client::connect(&addr.to_string(), alice_name.clone())
        .await
        .unwrap();
    alice.subscribe(&alice_name).await.unwrap();
    first.shutdown().await;

    let second = node_at(addr).await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while alice.reconnects() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no reconnect within 20 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // The new node learns alice's name from the replayed subscription.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while second.stats().await.unwrap().router.subscriptions < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "subscription not replayed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let bob = Client::connect(&addr.to_string(), Name::with_id("org", "ns", "bob", 2))
        .await
        .unwrap();
    bob.publish(&alice_name, b"after the restart".to_vec())
        .await
        .unwrap();
    let got = tokio::time::timeout(std::time::Duration::from_secs(10), alice.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.payload.as_ref(), b"after the restart");
    assert_eq!(alice.reconnects(), 1);
    second.shutdown().await;
}

#[tokio::test]
async fn bench_p2p_loses_nothing() {
    let node = node().await;
    let config = slim_tokio::bench::BenchConfig {
        endpoint: node.local_addrs()[0].to_string(),
        size: 64,
        duration: std::time::Duration::from_millis(300),
        round_trips: 20,
        window: 16,
    };
    let report = slim_tokio::bench::run_p2p(&config).await.unwrap();
    assert!(report.sent > 0);
    assert_eq!(report.received, report.sent, "{report:?}");
    assert_eq!(report.out_of_order, 0);
    assert_eq!(report.round_trips, 20);
    node.shutdown().await;
}

/// Runs a p2p bench of `count` messages through a node and checks nothing was lost or
/// reordered; the same settings in a raw mode must be refused before connecting.
async fn p2p_bench_loses_nothing(
    count: u64,
    size: usize,
    mls: bool,
    unreliable: bool,
) -> slim_tokio::bench::BenchReport {
    use slim_tokio::bench::{LoadConfig, Mode, Stop};
    let node = node().await;
    let config = LoadConfig {
        endpoint: node.local_addrs()[0].to_string(),
        mode: Mode::P2p,
        size,
        stop: Stop::Count(count),
        round_trips: 20,
        window: 16,
        publishers: 1,
        subscribers: 1,
        progress: false,
        node_pid: None,
        mls,
        unreliable,
        client: slim_tokio::bench::ClientKind::App,
    };
    let report = slim_tokio::bench::run(&config).await.unwrap();
    assert_eq!(report.sent, count);
    assert_eq!(report.received, report.sent, "{report:?}");
    assert_eq!(report.out_of_order, 0);
    assert_eq!(report.round_trips, 20);
    let raw = LoadConfig {
        mode: Mode::Unicast,
        ..config
    };
    assert!(slim_tokio::bench::run(&raw).await.is_err());
    node.shutdown().await;
    report
}

#[tokio::test]
async fn bench_p2p_with_mls_loses_nothing() {
    // Raw modes have no session to encrypt: --mls is refused there.
    let report = p2p_bench_loses_nothing(100, 256, true, false).await;
    assert!(report.mls && report.reliable);
}

/// Without reliability there are no acknowledgements to pace the sender: the bench's window
/// counts what the server app received instead, and on loopback nothing is lost.
#[tokio::test]
async fn bench_p2p_unreliable_counts_what_arrives() {
    // Raw publishes are never acknowledged: --unreliable is refused there.
    let report = p2p_bench_loses_nothing(2000, 64, false, true).await;
    assert!(!report.reliable);
    assert!(report.to_json().contains("\"reliable\":false"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_behind_on_its_events_still_gets_its_commands_answered() {
    use slim_tokio::session::{App, Reliability, SessionConfig};
    const SECRET: &str = "app-client-test-secret-0123456789abcdef";
    let node = node().await;
    let endpoint = node.local_addrs()[0].to_string();
    let sink = std::sync::Arc::new(
        App::connect(&endpoint, Name::new("org", "ns", "sink"), SECRET)
            .await
            .unwrap(),
    );
    let reader = {
        let sink = sink.clone();
        tokio::spawn(async move { while sink.next_event().await.is_ok() {} })
    };
    let filler = App::connect(&endpoint, Name::new("org", "ns", "filler"), SECRET)
        .await
        .unwrap();
    let config = SessionConfig {
        reliability: Some(Reliability {
            interval: std::time::Duration::from_secs(1),
            max_retries: 3,
        }),
        ..SessionConfig::default()
    };
    let session = filler
        .open_session(&Name::new("org", "ns", "sink"), config)
        .await
        .unwrap();
    // Every publish yields a Delivered event the filler never reads: more than its event queue.
    for i in 0..4300u32 {
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            filler.publish(session, i.to_be_bytes().to_vec()),
        )
        .await
        .unwrap_or_else(|_| panic!("publish {i} not answered while the app is behind on events"))
        .unwrap();
    }
    reader.abort();
    node.shutdown().await;
}

/// A reliable session whose peer never acknowledges: 512 messages go out, 1 024 more wait in
/// the core's send queue, and the next `publish` waits for room (the core says
/// `SendQueueFull`; the app retries it for the caller) instead of failing. Room comes when the
/// first messages run out of retries (`SendFailed`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_waits_for_room_in_a_full_send_queue() {
    use slim_core::session::sender::{PRODUCER_BUFFER, SEND_QUEUE};
    use slim_tokio::session::{App, Reliability, SessionConfig, SessionEvent};
    const SECRET: &str = "app-client-test-secret-0123456789abcdef";
    let node = node().await;
    let endpoint = node.local_addrs()[0].to_string();
    let mute = App::connect(&endpoint, Name::new("org", "ns", "mute"), SECRET)
        .await
        .unwrap();
    let sender = std::sync::Arc::new(
        App::connect(&endpoint, Name::new("org", "ns", "sender"), SECRET)
            .await
            .unwrap(),
    );
    let config = SessionConfig {
        reliability: Some(Reliability {
            interval: std::time::Duration::from_secs(1),
            max_retries: 1,
        }),
        ..SessionConfig::default()
    };
    let session = sender
        .open_session(&Name::new("org", "ns", "mute"), config)
        .await
        .unwrap();
    drop(mute); // no acks from now on
    let room = (PRODUCER_BUFFER + SEND_QUEUE) as u32;
    for id in 1..=room {
        assert_eq!(sender.publish(session, vec![1]).await.unwrap(), id);
    }
    let waiting = {
        let sender = sender.clone();
        tokio::spawn(async move { sender.publish(session, vec![2]).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(
        !waiting.is_finished(),
        "a full send queue makes publish wait"
    );
    let id = tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
        .await
        .expect("room once the first messages failed")
        .unwrap()
        .unwrap();
    assert_eq!(id, room + 1, "nothing was dropped on the way");
    let failed = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            if let SessionEvent::SendFailed { id, .. } = sender.next_event().await.unwrap() {
                return id;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(failed, 1);
    // Message 1 failed only after its one retry: the sender's timer re-sent it.
    let stats = sender.stats().await.unwrap();
    assert!(stats.data_retransmissions >= 1, "{stats:?}");
    assert_eq!(stats.rtx_replies_sent, 0, "{stats:?}");
    node.shutdown().await;
}

/// Alice, and Bob subscribed to his own name, connected to `node`.
async fn alice_and_subscribed_bob(node: &Node) -> (Client, Client, Name) {
    let endpoint = format!("http://{}", node.local_addrs()[0]);
    let alice = Client::connect(&endpoint, Name::with_id("org", "ns", "alice", 1))
        .await
        .unwrap();
    let bob_name = Name::with_id("org", "ns", "bob", 2);
    let bob = Client::connect(&endpoint, bob_name.clone()).await.unwrap();
    bob.subscribe(&bob_name).await.unwrap();
    (alice, bob, bob_name)
}

/// `client`, whose inbox is full, subscribes within 5 s: acks do not queue behind the inbox.
async fn subscribes_with_a_full_inbox(client: &Client) {
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        client.subscribe(&Name::with_id("org", "ns", "bob-too", 3)),
    )
    .await
    .expect("subscribe answered with the inbox full")
    .unwrap();
}

/// `client`'s drop count once it has stopped moving for `still` (at most 60 such waits).
async fn drops_once_still(client: &Client, still: std::time::Duration) -> u64 {
    let mut last = u64::MAX;
    for _ in 0..60 {
        tokio::time::sleep(still).await;
        let now = client.dropped();
        if now == last && now > 0 {
            break;
        }
        last = now;
    }
    client.dropped()
}

/// An application that stops reading: its client keeps the earliest messages up to its inbox's
/// bound (here the bytes bound: 16 MiB at 512 + 3 937 bytes a message) and drops and counts the
/// rest; nothing is lost uncounted, and the link still works once the app reads again.
#[tokio::test]
async fn an_app_that_does_not_read_loses_only_what_its_inbox_cannot_hold_and_counts_it() {
    use std::time::Duration;
    const SENT: u32 = 6000;
    // 16 MiB fills to within 37 bytes: too little room left for even an ack to queue.
    const SIZE: usize = 3937;
    const HELD: u64 = (16 << 20) / (512 + SIZE as u64);
    let node = node().await;
    let (alice, bob, bob_name) = alice_and_subscribed_bob(&node).await;
    for i in 0..SENT {
        let mut payload = vec![0u8; SIZE];
        payload[..4].copy_from_slice(&i.to_le_bytes());
        alice.publish(&bob_name, payload).await.unwrap();
    }
    // Everything is in bob's client once its drop count has been still for a second.
    let dropped = drops_once_still(&bob, Duration::from_secs(1)).await;
    assert!(dropped > 0, "a full inbox drops and counts");
    // A subscription's ack does not queue behind the full inbox.
    subscribes_with_a_full_inbox(&bob).await;
    let mut kept = Vec::new();
    while let Ok(got) = tokio::time::timeout(Duration::from_millis(300), bob.recv()).await {
        let got = got.unwrap();
        assert_eq!(got.payload.len(), SIZE);
        kept.push(u32::from_le_bytes(got.payload[..4].try_into().unwrap()));
    }
    let node_drops = node.stats().await.unwrap().slow_consumer_drops;
    assert_eq!(
        kept.len() as u64 + dropped + node_drops,
        u64::from(SENT),
        "each message was delivered or counted as dropped (kept {}, dropped by bob's client \
         {dropped}, by the node {node_drops})",
        kept.len()
    );
    assert!(kept.len() as u64 <= HELD, "kept {} > {HELD}", kept.len());
    assert!(kept.windows(2).all(|w| w[0] < w[1]), "kept in order");
    assert_eq!(kept.first(), Some(&0), "the earliest are kept");

    alice.publish(&bob_name, vec![7; 10]).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), bob.recv())
        .await
        .expect("the link still works")
        .unwrap();
    assert_eq!(got.payload.as_ref(), &[7; 10]);
    assert_eq!(bob.dropped(), dropped);
    node.shutdown().await;
}

/// The inbox full by its count of messages (small ones): not one more fits, yet a
/// subscription is still acknowledged, as acks go to their waiters without queueing.
#[tokio::test]
async fn acks_reach_their_waiters_past_an_inbox_full_by_count() {
    use std::time::Duration;
    let node = node().await;
    let (alice, bob, bob_name) = alice_and_subscribed_bob(&node).await;
    // More than the inbox holds (its count bound is a few thousand), small enough that the
    // 16 MiB bytes bound is far away.
    for i in 0u32..12_000 {
        alice
            .publish(&bob_name, i.to_le_bytes().to_vec())
            .await
            .unwrap();
    }
    let dropped = drops_once_still(&bob, Duration::from_millis(500)).await;
    assert!(dropped > 0, "the inbox filled by count");
    subscribes_with_a_full_inbox(&bob).await;
    node.shutdown().await;
}
