//! Routing through a real node over real sockets: anycast, broadcast, channels, what a forwarded
//! copy may differ in, unsubscribe, disconnects, replays of real client traffic, and two of our
//! nodes linked to each other.

mod common;

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use common::*;
use prost::Message as _;
use slim_core::router::{ConnectionKind, DropReason};
use slim_proto::pb::{self, message::MessageType, LinkConnectionType};
use slim_proto::{encode_frame, Name};
use slim_tokio::config::ClientConfig;

/// Index `i` from a blob `"<prefix> <i>"`.
fn index_of(received: &Received) -> usize {
    let blob = blob_of(&received.message).expect("a data publish");
    let text = std::str::from_utf8(blob).expect("utf-8 blob");
    text.rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .expect("indexed blob")
}

#[tokio::test]
async fn negotiation_reply_is_what_clients_require() {
    let node = start_node().await;
    let mut a = Client::connect(node_addr(&node), "A").await;
    let link = a.negotiate().await.clone(); // link id echoed, 32-byte key, semver: checked there
    assert!(link.reply.is_reply);
    assert_eq!(link.reply.connection_type, LinkConnectionType::Edge as i32);
    assert_eq!(link.reply.link_ecdh_public_key.len(), 32);
    assert_eq!(link.reply.node_id, node.node_id());
    assert_eq!(link.reply.link_kem_payload, None);
    let stats = stats(&node).await;
    assert_eq!((stats.links_established, stats.connections), (1, 1));
    node.shutdown().await;
    assert_eq!(a.status().await.code, 0, "shutdown ends streams with OK");
}

#[tokio::test]
async fn anycast_alternates_between_instances() {
    let node = start_node().await;
    let addr = node_addr(&node);
    let mut a = Client::connect_negotiated(addr, "A").await;
    let mut b1 = Client::connect_negotiated(addr, "B1").await;
    let mut b2 = Client::connect_negotiated(addr, "B2").await;
    let a_name = Name::with_id("org", "ns", "client", 1);
    let svc = Name::parse("org/ns/svc").unwrap();
    assert_eq!(svc.id(), u128::MAX, "no instance = NULL_COMPONENT");
    let (i1, i2) = (svc.with_instance(0x1111), svc.with_instance(0x2222));
    b1.subscribe(&i1, 1).await;
    b2.subscribe(&i2, 2).await;

    let sent: Vec<pb::Message> = (0..6)
        .map(|i| a.publish(&a_name, &svc, 1, format!("anycast {i}").as_bytes()))
        .collect();
    wait_for_stats(&node, "6 anycast copies", |s| s.forwarded == 6).await;
    let mut got = [Vec::new(), Vec::new()];
    for (k, b) in [&mut b1, &mut b2].into_iter().enumerate() {
        for _ in 0..3 {
            let received = b.recv().await;
            let i = index_of(&received);
            b.assert_forwarded_copy(&sent[i], &received);
            got[k].push(i);
        }
    }
    assert!(
        got == [vec![0, 2, 4], vec![1, 3, 5]] || got == [vec![1, 3, 5], vec![0, 2, 4]],
        "fanout 1 to any instance alternates between the two: {got:?}"
    );

    // Any instance with fanout 256: every instance (and nothing was left over from above).
    let m = a.publish(&a_name, &svc, 256, b"to every instance 0");
    b1.expect_copy_of(&m).await;
    b2.expect_copy_of(&m).await;
    // A specific instance, with either fanout: only that one.
    let m = a.publish(&a_name, &i2, 1, b"only B2 0");
    b2.expect_copy_of(&m).await;
    let m = a.publish(&a_name, &i1, 256, b"only B1 0");
    b1.expect_copy_of(&m).await;
    let m = a.publish(&a_name, &svc, 256, b"to every instance 1");
    b1.expect_copy_of(&m).await;
    b2.expect_copy_of(&m).await;

    let stats = stats(&node).await;
    assert_eq!(stats.forwarded, 6 + 2 + 1 + 1 + 2);
    assert_eq!(stats.dropped_total(), 0, "{stats:#?}");
    node.shutdown().await;
}

#[tokio::test]
async fn channel_fanout_reaches_every_member_but_the_sender() {
    let node = start_node().await;
    let addr = node_addr(&node);
    let channel = Name::with_id(
        "org",
        "ns",
        "chan",
        0xc4a7_0000_0000_0000_0000_0000_0000_0001,
    );
    let mut members = Vec::new();
    for (i, label) in ["A", "B", "C"].into_iter().enumerate() {
        let mut client = Client::connect_negotiated(addr, label).await;
        let own = Name::with_id("org", "ns", &label.to_lowercase(), i as u128 + 1);
        client.subscribe(&own, 10 + i as u64).await;
        client.subscribe_as(&own, &channel, 20 + i as u64).await;
        members.push((client, own));
    }
    assert_eq!(stats(&node).await.subscriptions, 6);

    let mut ingress = Vec::new();
    for sender in 0..3 {
        let (client, own) = &mut members[sender];
        let m = client.publish(
            own,
            &channel,
            256,
            format!("from member {sender}").as_bytes(),
        );
        let mut seen = HashSet::new();
        for receiver in (0..3).filter(|r| *r != sender) {
            // The receiver's *next* message: so no member ever got its own publish back (it would
            // have been queued before the next member's).
            seen.insert(members[receiver].0.expect_copy_of(&m).await);
        }
        assert_eq!(
            seen.len(),
            1,
            "every copy names the same ingress connection"
        );
        ingress.extend(seen);
    }
    assert_eq!(
        ingress.iter().collect::<HashSet<_>>().len(),
        3,
        "each member has its own incoming_conn: {ingress:?}"
    );
    let stats = stats(&node).await;
    assert_eq!(stats.forwarded, 6);
    assert_eq!(stats.dropped_total(), 0, "{stats:#?}");
    node.shutdown().await;
}

/// A command message as the session layer sends it: every header field set, a session header,
/// a nested command payload, a signature and metadata.
fn rich_message(source: &Name, destination: &Name) -> pb::Message {
    let participant = |name: &Name| pb::Participant {
        name: Some(name.to_pb()),
        settings: Some(pb::ParticipantSettings {
            sends_data: true,
            receives_data: true,
        }),
        status: pb::ParticipantState::Offline as i32,
    };
    let mut header = header(source, destination, 1);
    header.identity = "org/ns/alice_abcdefgh:1795623137:id-x:eyJwdWJrZXkiOiJCSGV2In0:sig".into();
    header.error = Some(false);
    header.e2e_header_sig = Some(Bytes::from(vec![0x30; 71]));
    header.incoming_conn = None;
    pb::Message {
        message_type: Some(MessageType::Publish(pb::Publish {
            header: Some(header),
            session: Some(pb::SessionHeader {
                session_type: pb::SessionType::Multicast as i32,
                session_message_type: pb::SessionMessageType::GroupWelcome as i32,
                session_id: 3_627_353_662,
                message_id: u32::MAX,
            }),
            msg: Some(pb::Content {
                content_type: Some(pb::content::ContentType::CommandPayload(
                    pb::CommandPayload {
                        command_payload_type: Some(
                            pb::command_payload::CommandPayloadType::GroupWelcome(
                                pb::GroupWelcomePayload {
                                    participants: vec![
                                        participant(source),
                                        participant(destination),
                                    ],
                                    mls: Some(pb::MlsPayload {
                                        commit_id: 1,
                                        mls_content: Bytes::from(
                                            (0..=255u8).cycle().take(1408).collect::<Vec<_>>(),
                                        ),
                                    }),
                                },
                            ),
                        ),
                    },
                )),
            }),
        })),
        metadata: std::collections::BTreeMap::from([(
            "slim-payload-sig".to_owned(),
            "MEYCIQDkc1MA3h3o".to_owned(),
        )]),
    }
}

#[tokio::test]
async fn forwarded_copies_differ_only_in_ttl_mac_and_incoming_conn() {
    let node = start_node().await;
    let addr = node_addr(&node);
    let mut a = Client::connect_negotiated(addr, "A").await;
    let mut b = Client::connect_negotiated(addr, "B").await;
    let a_name = Name::with_id("agntcy", "ns", "alice", 0x48bb949a3dd26afac9a1342ad0e35dd2);
    let b_name = Name::with_id("agntcy", "ns", "bob", u128::MAX - 51);
    b.subscribe(&b_name, 7).await;

    let sent = a.send_signed(rich_message(&a_name, &b_name));
    let received = b.recv().await;
    b.assert_forwarded_copy(&sent, &received); // byte-exact, apart from those three fields
    let header = header_of(&received.message).unwrap();
    assert_eq!(header.ttl, 7);
    assert!(header.incoming_conn.is_some());
    assert!(
        a.mac().verify(header).is_err(),
        "re-signed for B's link, not A's"
    );
    assert_ne!(header.header_mac, header_of(&sent).unwrap().header_mac);

    // The same with the wire's incoming_conn set (it is overwritten, never trusted) and a data
    // payload.
    let mut m = publish_message(&a_name, &b_name, 1, &[0u8, 255, 1, 254]);
    header_of_mut(&mut m).unwrap().incoming_conn = Some(12345);
    let sent = a.send_signed(m);
    let received = b.recv().await;
    let ingress = b.assert_forwarded_copy(&sent, &received);
    assert_ne!(ingress, 12345);

    // Several metadata entries: the map may be re-ordered, its content may not change.
    let mut m = publish_message(&a_name, &b_name, 1, b"metadata");
    m.metadata = (0..5)
        .map(|i| (format!("key-{i}"), format!("value-{i}")))
        .collect();
    let sent = a.send_signed(m);
    let received = b.recv().await;
    let mut expected = sent.clone();
    let h = header_of_mut(&mut expected).unwrap();
    h.ttl -= 1;
    h.incoming_conn = Some(ingress);
    b.mac().sign(h);
    assert_eq!(received.message, expected);
    node.shutdown().await;
}

#[tokio::test]
async fn unsubscribe_stops_delivery() {
    let node = start_node().await;
    let addr = node_addr(&node);
    let mut a = Client::connect_negotiated(addr, "A").await;
    let mut b = Client::connect_negotiated(addr, "B").await;
    let a_name = Name::with_id("org", "ns", "alice", 1);
    let b_name = Name::with_id("org", "ns", "bob", 2);
    let topic = Name::with_id("org", "ns", "topic", 7);
    b.subscribe(&b_name, 1).await;
    b.subscribe_as(&b_name, &topic, 2).await;
    // A repeated Subscribe (the client datapath re-sends after 5 s without an ack) is idempotent.
    b.subscribe_as(&b_name, &topic, 2).await;
    assert_eq!(stats(&node).await.subscriptions, 2);

    let m = a.publish(&a_name, &topic, 1, b"while subscribed");
    b.expect_copy_of(&m).await;

    let ack = b.unsubscribe_as(&b_name, &topic, 2).await;
    assert_eq!(
        (ack.subscription_id, ack.success, ack.error.as_str()),
        (2, true, "")
    );
    assert_eq!(stats(&node).await.subscriptions, 1);
    a.publish(&a_name, &topic, 1, b"after unsubscribe");
    wait_for_stats(&node, "the publish to be dropped", |s| {
        s.dropped(DropReason::NoRoute) == 1
    })
    .await;
    // B's next message is this one: exactly one copy of the first, none of the second.
    assert_delivers(&mut a, &a_name, &mut b, &b_name, b"still routed").await;

    // Unsubscribing what is not subscribed is answered, with an error.
    let ack = b.unsubscribe_as(&b_name, &topic, 2).await;
    assert_eq!(ack.subscription_id, 2);
    assert!(!ack.success);
    assert!(!ack.error.is_empty());
    let stats = stats(&node).await;
    assert_eq!(stats.subscription_failures, 1);
    assert_eq!(stats.subscriptions, 1);
    node.shutdown().await;
}

#[tokio::test]
async fn disconnect_removes_the_subscribers_routes() {
    let node = start_node().await;
    let addr = node_addr(&node);
    let mut a = Client::connect_negotiated(addr, "A").await;
    let mut b = Client::connect_negotiated(addr, "B").await;
    let mut c = Client::connect_negotiated(addr, "C").await;
    let a_name = Name::with_id("org", "ns", "alice", 1);
    let b_name = Name::with_id("org", "ns", "bob", 2);
    let c_name = Name::with_id("org", "ns", "carol", 3);
    let shared = Name::with_id("org", "ns", "room", 9);
    b.subscribe(&b_name, 1).await;
    b.subscribe_as(&b_name, &shared, 2).await;
    c.subscribe(&c_name, 3).await;
    c.subscribe_as(&c_name, &shared, 4).await;
    let s = stats(&node).await;
    assert_eq!((s.connections, s.subscriptions), (3, 4));

    // C leaves cleanly: end of its request stream; the node answers with OK trailers.
    c.finish();
    assert_eq!(c.status().await.code, 0);
    wait_for_stats(&node, "C's routes to go", |s| {
        s.connections == 2 && s.subscriptions == 2
    })
    .await;
    a.publish(&a_name, &c_name, 1, b"to C");
    wait_for_stats(&node, "the publish to C to be dropped", |s| {
        s.dropped(DropReason::NoRoute) == 1
    })
    .await;
    let m = a.publish(&a_name, &shared, 256, b"to the room");
    b.expect_copy_of(&m).await;
    assert_eq!(
        stats(&node).await.forwarded,
        1,
        "only B is left in the room"
    );

    // D leaves as slim-bindings' `disconnect` does: RST_STREAM(CANCEL), the TCP connection open.
    let mut d = Client::connect_negotiated(addr, "D").await;
    let d_name = Name::with_id("org", "ns", "dave", 4);
    d.subscribe_as(&d_name, &shared, 5).await;
    let s = stats(&node).await;
    assert_eq!((s.connections, s.subscriptions), (3, 3));
    d.cancel();
    wait_for_stats(&node, "D's routes to go", |s| {
        s.connections == 2 && s.subscriptions == 2
    })
    .await;
    let m = a.publish(&a_name, &shared, 256, b"to the room again");
    b.expect_copy_of(&m).await;
    assert_eq!(
        stats(&node).await.forwarded,
        2,
        "only B is left in the room"
    );
    drop(d);

    // B goes away without a goodbye.
    b.vanish();
    wait_for_stats(&node, "B's routes to go", |s| {
        s.connections == 1 && s.subscriptions == 0
    })
    .await;
    a.publish(&a_name, &shared, 256, b"anyone?");
    wait_for_stats(&node, "the publish to the empty room to be dropped", |s| {
        s.dropped(DropReason::NoRoute) == 2
    })
    .await;
    assert_eq!(stats(&node).await.forwarded, 2);
    node.shutdown().await;
}

// ------------------------------------------------------------------------------ capture replays

struct Captured {
    index: usize,
    conn: u32,
    from_client: bool,
    bytes: Bytes,
}

fn hex_decode(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
        .collect()
}

fn load_capture(file: &str) -> Vec<Captured> {
    let path = format!("{}/tests/data/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            Captured {
                index: fields[0].parse().unwrap(),
                conn: fields[1].parse().unwrap(),
                from_client: match fields[2] {
                    "c2n" => true,
                    "n2c" => false,
                    other => panic!("direction {other}"),
                },
                bytes: Bytes::from(hex_decode(fields[3])),
            }
        })
        .collect()
}

/// A message without its link-local parts (`header_mac`, `incoming_conn`), and the
/// `incoming_conn` it had: what is left must be identical in the reference's and our output.
fn link_independent(message: &pb::Message) -> (Vec<u8>, Option<u64>) {
    let mut message = message.clone();
    let origin = header_of_mut(&mut message).and_then(|h| {
        h.header_mac = None;
        h.incoming_conn.take()
    });
    (message.encode_to_vec(), origin)
}

/// Plays the clients' side of a capture of real slim-bindings clients through our node: their
/// messages re-signed for our links, sent one at a time in capture order. Every message the
/// reference node sent must come out of ours on the same connection, with the same bytes except
/// `header_mac` (our link keys) and `incoming_conn` (our connection index), and nothing else may.
/// Messages from one origin keep their order; across origins the capture's order is the proxy's,
/// not the node's, so it is not compared.
async fn replay(file: &str) {
    let capture = load_capture(file);
    let node = start_node().await;
    let addr = node_addr(&node);
    let mut clients: HashMap<u32, (Client, Vec<Received>)> = HashMap::new();
    let mut compared = 0;
    for entry in &capture {
        let message = pb::Message::decode(entry.bytes.clone()).expect("captured message decodes");
        assert_eq!(
            message.encode_to_vec(),
            entry.bytes,
            "#{} re-encodes",
            entry.index
        );
        let is_link = matches!(message.message_type, Some(MessageType::Link(_)));
        match (entry.from_client, is_link) {
            (true, true) => {
                // A new client: our own negotiation replaces the captured one (fresh keys).
                let client = Client::connect_negotiated(addr, &format!("conn{}", entry.conn)).await;
                assert!(clients.insert(entry.conn, (client, Vec::new())).is_none());
            }
            (false, true) => {} // the reply was consumed by negotiate()
            (true, false) => {
                let (client, _) = clients.get_mut(&entry.conn).expect("negotiated first");
                let mut message = message;
                if header_of(&message).is_some() {
                    client.sign(&mut message);
                }
                let before = stats(&node).await.received;
                client.send(&message);
                // One at a time across connections, so the node sees the capture's order.
                wait_for_stats(
                    &node,
                    &format!("message #{} to be handled", entry.index),
                    |s| s.received > before,
                )
                .await;
            }
            (false, false) => {
                let (client, pending) = clients.get_mut(&entry.conn).expect("negotiated first");
                let (wanted, _) = link_independent(&message);
                let received = loop {
                    if let Some(pos) = pending
                        .iter()
                        .position(|r| link_independent(&r.message).0 == wanted)
                    {
                        let received = pending.remove(pos);
                        let origin = link_independent(&received.message).1;
                        assert!(
                            pending[..pos]
                                .iter()
                                .all(|r| link_independent(&r.message).1 != origin),
                            "#{}: overtook an earlier message from the same origin",
                            entry.index
                        );
                        break received;
                    }
                    match client.next_within(TIMEOUT).await {
                        Some(Next::Message(received)) => pending.push(*received),
                        other => panic!(
                            "#{} on conn{}: not received ({other:?}); the reference sent {:?}; \
                             received instead: {:?}",
                            entry.index,
                            entry.conn,
                            message,
                            pending.iter().map(|r| &r.message).collect::<Vec<_>>()
                        ),
                    }
                };
                // Byte-exact: the reference's bytes with our incoming_conn and our link's MAC.
                let mut expected = message;
                if let Some(header) = header_of_mut(&mut expected) {
                    header.incoming_conn = header_of(&received.message).unwrap().incoming_conn;
                    assert!(header.incoming_conn.is_some(), "#{}", entry.index);
                    client.mac().sign(header);
                }
                assert!(
                    expected.encode_to_vec() == received.raw,
                    "#{}: our node sent\n  {:?}\nthe reference sent (normalised)\n  {:?}",
                    entry.index,
                    received.message,
                    expected
                );
                compared += 1;
            }
        }
    }
    let stats = stats(&node).await;
    assert_eq!(stats.dropped_total(), 0, "{stats:#?}");
    assert!(compared > 0);
    node.shutdown().await;
    for (conn, (mut client, pending)) in clients {
        // Nothing more than the reference sent.
        assert!(pending.is_empty(), "conn{conn}: extra messages {pending:?}");
        assert_eq!(client.status().await.code, 0);
    }
}

#[tokio::test]
async fn replay_of_real_p2p_clients_matches_the_reference() {
    replay("a_p2p_plain.replay.txt").await;
}

#[tokio::test]
async fn replay_of_real_mls_group_matches_the_reference() {
    replay("c_group_mls.replay.txt").await;
}

// ------------------------------------------------------------------------------ linked nodes

#[tokio::test]
async fn two_nodes_link_as_peers() {
    let a = start_node().await;
    let b = start_node_with(|config| {
        config.clients = vec![ClientConfig {
            authority: node_addr(&a).to_string(),
            link_id: Some("node-b:node-a".into()),
            connection_type: ConnectionKind::Peer,
        }];
    })
    .await;
    assert_ne!(a.node_id(), b.node_id());
    for (node, which) in [(&a, "A"), (&b, "B")] {
        wait_for_stats(node, &format!("node {which} to establish the link"), |s| {
            s.links_established >= 1 && s.connections == 1
        })
        .await;
    }
    // Both still serve clients.
    for node in [&a, &b] {
        let mut client = Client::connect_negotiated(node_addr(node), "client").await;
        client.finish();
        assert_eq!(client.status().await.code, 0);
    }
    let sa = stats(&a).await;
    let sb = stats(&b).await;
    assert_eq!(sa.connections_refused + sb.connections_refused, 0);
    assert_eq!(sa.dropped_total() + sb.dropped_total(), 0);

    // When B stops, A notices the link is gone.
    b.shutdown().await;
    wait_for_stats(&a, "A to drop the link to B", |s| s.connections == 0).await;
    a.shutdown().await;
}

#[tokio::test]
async fn message_boundaries_do_not_follow_data_frames() {
    let node = start_node().await;
    let addr = node_addr(&node);
    let mut a = Client::connect_negotiated(addr, "A").await;
    let mut b = Client::connect_negotiated(addr, "B").await;
    let a_name = Name::with_id("org", "ns", "alice", 1);
    let b_name = Name::with_id("org", "ns", "bob", 2);
    b.subscribe(&b_name, 2).await;
    let signed = |a: &Client, text: &str| {
        let mut m = publish_message(&a_name, &b_name, 1, text.as_bytes());
        a.sign(&mut m);
        m
    };

    // Three messages in one DATA frame.
    let batch: Vec<pb::Message> = (0..3)
        .map(|i| signed(&a, &format!("batched {i}")))
        .collect();
    let mut bytes = Vec::new();
    for m in &batch {
        bytes.extend_from_slice(&encode_frame(m));
    }
    a.send_raw(bytes.into());
    for m in &batch {
        b.expect_copy_of(m).await;
    }

    // One message a byte per DATA frame, with a few empty DATA frames in between (h2 allows
    // 100 per connection before it suspects a flood).
    let m = signed(&a, "dribbled");
    for (i, byte) in encode_frame(&m).chunks(1).enumerate() {
        a.send_raw(Bytes::copy_from_slice(byte));
        if i % 40 == 3 {
            a.send_raw(Bytes::new());
        }
    }
    b.expect_copy_of(&m).await;

    // A split prefix, and a frame holding the end of one message and the start of the next.
    let (m1, m2) = (signed(&a, "first half"), signed(&a, "second half"));
    let mut bytes = encode_frame(&m1).to_vec();
    let cut = bytes.len() + 2;
    bytes.extend_from_slice(&encode_frame(&m2));
    let bytes = Bytes::from(bytes);
    a.send_raw(bytes.slice(..3));
    a.send_raw(bytes.slice(3..cut));
    a.send_raw(bytes.slice(cut..));
    b.expect_copy_of(&m1).await;
    b.expect_copy_of(&m2).await;

    let stats = stats(&node).await;
    assert_eq!(stats.forwarded, 6);
    assert_eq!(stats.dropped_total(), 0);
    node.shutdown().await;
}
