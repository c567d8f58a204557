//! smol clients (no tokio runtime on their side) talk through a slim-tokio node over real
//! loopback HTTP/2: link negotiation, signed subscriptions acked by the node, routed messages.

use slim_proto::Name;
use slim_smol::Client;
use slim_tokio::config::{NodeConfig, ServerConfig};

fn start_node() -> (std::net::SocketAddr, std::sync::mpsc::Sender<()>) {
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async move {
            let node = slim_tokio::Node::start(NodeConfig {
                servers: vec![ServerConfig {
                    addr: "127.0.0.1:0".parse().unwrap(),
                    tls: None,
                }],
                ..NodeConfig::default()
            })
            .await
            .unwrap();
            addr_tx.send(node.local_addrs()[0]).unwrap();
            tokio::task::spawn_blocking(move || stop_rx.recv())
                .await
                .unwrap()
                .ok();
            node.shutdown().await;
        });
    });
    (addr_rx.recv().unwrap(), stop_tx)
}

#[test]
fn smol_clients_exchange_messages_through_the_node() {
    let (addr, stop) = start_node();
    smol::block_on(async {
        let alice_name = Name::with_id("org", "ns", "alice", 11);
        let bob_name = Name::with_id("org", "ns", "bob", 22);
        let alice = Client::connect(addr, alice_name.clone()).await.unwrap();
        let bob = Client::connect(addr, bob_name.clone()).await.unwrap();
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
    stop.send(()).unwrap();
}
