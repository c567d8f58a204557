//! smol clients (no tokio runtime on their side) talk through a slim-tokio node over real
//! loopback HTTP/2: link negotiation, signed subscriptions acked by the node, routed messages,
//! redial and re-subscription across a node restart.

use std::time::Duration;

use slim_proto::Name;
use slim_smol::Client;

mod common;

use common::TestNode;

/// A node on loopback, as an address and the handle that stops it.
fn start_node() -> (std::net::SocketAddr, TestNode) {
    let node = TestNode::start();
    (node.addr, node)
}

fn start_node_on(addr: std::net::SocketAddr) -> (std::net::SocketAddr, TestNode) {
    let node = TestNode::start_on(addr);
    (node.addr, node)
}

#[test]
fn smol_clients_exchange_messages_through_the_node() {
    let (addr, stop) = start_node();
    smol::block_on(async {
        let alice_name = Name::with_id("org", "ns", "alice", 11);
        let bob_name = Name::with_id("org", "ns", "bob", 22);
        let alice = Client::connect(&addr.to_string(), alice_name.clone())
            .await
            .unwrap();
        let bob = Client::connect(&addr.to_string(), bob_name.clone())
            .await
            .unwrap();
        alice.subscribe(&alice_name).await.unwrap();
        bob.subscribe(&bob_name).await.unwrap();
        for i in 0..50u32 {
            let payload: Vec<u8> = (0..(i * 37) % 3000).map(|b| (b * 7 + i) as u8).collect();
            alice.publish(&bob_name, payload.clone()).await.unwrap();
            let got = bob.recv().await.unwrap();
            assert_eq!(got.payload, payload, "message {i} byte-exact");
            assert_eq!(got.source, alice_name);
            // And back, to the service name: anycast reaches the one instance.
            bob.publish(&Name::new("org", "ns", "alice"), got.payload)
                .await
                .unwrap();
            assert_eq!(alice.recv().await.unwrap().payload, payload);
        }
    });
    drop(stop);
}

/// The node restarts on the same port: the client redials, makes its subscription again, and
/// is reachable once more (as the tokio client).
#[test]
fn client_reconnects_and_resubscribes_after_the_node_restarts() {
    let (addr, stop) = start_node();
    let alice_name = Name::with_id("org", "ns", "alice", 1);
    let alice = smol::block_on(async {
        let alice = Client::connect(&addr.to_string(), alice_name.clone())
            .await
            .unwrap();
        alice.subscribe(&alice_name).await.unwrap();
        alice
    });
    assert_eq!(alice.reconnects(), 0);
    drop(stop);
    // While the node is away, a new subscription waits for the next link.
    std::thread::sleep(Duration::from_millis(300));
    let alias = Name::with_id("org", "ns", "alice-alias", 1);
    let (subscribed, (_, stop)) = smol::block_on(futures_lite::future::zip(
        alice.subscribe(&alias),
        smol::unblock(move || start_node_on(addr)),
    ));
    subscribed.unwrap();
    smol::block_on(async {
        let started = std::time::Instant::now();
        while alice.reconnects() == 0 {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "no reconnect within 20 s"
            );
            smol::Timer::after(Duration::from_millis(50)).await;
        }
        let bob = Client::connect(&addr.to_string(), Name::with_id("org", "ns", "bob", 2))
            .await
            .unwrap();
        // Until the replayed subscription is in place the node has nowhere to send it.
        let started = std::time::Instant::now();
        let got = loop {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "subscription not replayed"
            );
            bob.publish(&alice_name, &b"after the restart"[..])
                .await
                .unwrap();
            let got = futures_lite::future::or(async { Some(alice.recv().await) }, async {
                smol::Timer::after(Duration::from_millis(200)).await;
                None
            })
            .await;
            if let Some(got) = got {
                break got.unwrap();
            }
        };
        assert_eq!(&got.payload[..], b"after the restart");
        assert_eq!(got.source, Name::with_id("org", "ns", "bob", 2));
        // The subscription made while the link was down is in place too.
        bob.publish(&alias, &b"to the alias"[..]).await.unwrap();
        assert_eq!(&alice.recv().await.unwrap().payload[..], b"to the alias");
        assert_eq!(alice.reconnects(), 1);
    });
    drop(stop);
}

/// An application that stops reading: its client keeps the earliest messages up to its inbox
/// (4 096 messages), drops and counts the rest, and still receives once the app reads again.
#[test]
fn an_app_that_does_not_read_keeps_the_earliest_and_counts_the_rest() {
    const SENT: u32 = 6000;
    let _guard = common::watchdog(
        "an_app_that_does_not_read_keeps_the_earliest_and_counts_the_rest",
        Duration::from_secs(120),
    );
    let (addr, stop) = start_node();
    smol::block_on(async {
        let alice = Client::connect(&addr.to_string(), Name::with_id("org", "ns", "alice", 11))
            .await
            .unwrap();
        let bob_name = Name::with_id("org", "ns", "bob", 22);
        let bob = Client::connect(&addr.to_string(), bob_name.clone())
            .await
            .unwrap();
        bob.subscribe(&bob_name).await.unwrap();
        for i in 0..SENT {
            alice
                .publish(&bob_name, i.to_le_bytes().to_vec())
                .await
                .unwrap();
        }
        // Everything is in bob's client once its drop count has been still for a second.
        let mut last = u64::MAX;
        for _ in 0..60 {
            smol::Timer::after(Duration::from_secs(1)).await;
            let now = bob.dropped();
            if now == last && now > 0 {
                break;
            }
            last = now;
        }
        let dropped = bob.dropped();
        assert!(dropped > 0, "a full inbox drops and counts");
        let mut kept = Vec::new();
        loop {
            let next = smol::future::or(async { Some(bob.recv().await) }, async {
                smol::Timer::after(Duration::from_millis(300)).await;
                None
            });
            let Some(got) = next.await else { break };
            kept.push(u32::from_le_bytes(
                got.unwrap().payload[..4].try_into().unwrap(),
            ));
        }
        assert!(kept.len() <= 4096, "kept {}", kept.len());
        assert!(
            kept.len() as u64 + dropped <= u64::from(SENT),
            "kept {} + dropped {dropped}",
            kept.len()
        );
        assert!(kept.windows(2).all(|w| w[0] < w[1]), "kept in order");
        assert_eq!(kept.first(), Some(&0), "the earliest are kept");

        alice.publish(&bob_name, vec![7; 10]).await.unwrap();
        let got = bob.recv().await.unwrap();
        assert_eq!(got.payload.as_ref(), &[7; 10]);
        assert_eq!(bob.dropped(), dropped);
    });
    drop(stop);
}
