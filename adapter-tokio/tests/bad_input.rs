//! Hostile and broken input against a real node, over real sockets. Every case checks the
//! specific reaction (a gRPC status in the trailers, or a drop counted under its reason) and then
//! that the node still serves: two good clients A and B still exchange publishes byte-exact, and a
//! new client can still connect and negotiate.

mod common;

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use common::*;
use prost::Message as _;
use slim_core::router::DropReason;
use slim_proto::framing::frame_bytes;
use slim_proto::link;
use slim_proto::pb::{self, LinkConnectionType};
use slim_proto::Name;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Frames a body the way `encode_frame` would, but with any flag byte and declared length.
fn raw_prefix(flag: u8, len: u32) -> BytesMut {
    let mut buf = BytesMut::new();
    buf.put_u8(flag);
    buf.put_u32(len);
    buf
}

#[tokio::test]
async fn random_bytes_instead_of_http2() {
    let mut f = Fixture::new().await;
    let received_before = f.stats().await.received;
    let mut garbage: [u8; 4096] = random_bytes();
    garbage[0] = 0xff; // never the start of the HTTP/2 preface ("PRI * HTTP/2.0")

    // Write and vanish.
    let mut tcp = TcpStream::connect(f.addr()).await.unwrap();
    tcp.write_all(&garbage).await.unwrap();
    drop(tcp);

    // Write, then wait: the node must hang up on us (EOF or reset), not keep the socket.
    let mut tcp = TcpStream::connect(f.addr()).await.unwrap();
    tcp.write_all(&garbage).await.unwrap();
    let _ = tcp.shutdown().await;
    within("the node to close a non-HTTP/2 connection", async {
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue, // the node's SETTINGS / GOAWAY
            }
        }
    })
    .await;

    let stats = f.stats().await;
    assert_eq!(stats.connections, 2, "garbage never became a link");
    assert_eq!(
        stats.received, received_before,
        "nothing reached the router"
    );
    f.assert_still_routes().await;
    f.shutdown().await;
}

#[tokio::test]
async fn garbage_grpc_frames_end_the_stream() {
    let mut f = Fixture::new().await;
    let mut c = Client::connect_negotiated(f.addr(), "C").await;
    f.wait_for_connections(3).await;
    let mut frame = raw_prefix(7, 3);
    frame.put_slice(&[1, 2, 3]);
    c.send_raw(frame.freeze());
    let status = c.status().await;
    assert_eq!(
        status.code, 13,
        "INTERNAL, as tonic answers a bad flag: {status:?}"
    );
    assert!(status.message.contains("0x07"), "{status:?}");
    f.wait_for_connections(2).await;
    f.assert_still_routes().await;

    // Not negotiated yet: same answer, the framing is checked before anything else.
    let mut d = Client::connect(f.addr(), "D").await;
    d.send_raw(Bytes::from_static(&[0x80, 0, 0, 0, 0]));
    let status = d.status().await;
    assert_eq!(status.code, 13, "{status:?}");
    f.wait_for_connections(2).await;
    f.assert_still_routes().await;
    f.shutdown().await;
}

#[tokio::test]
async fn oversize_frame_is_refused_from_its_prefix() {
    let mut f = Fixture::new().await;
    let mut c = Client::connect_negotiated(f.addr(), "C").await;
    f.wait_for_connections(3).await;
    let received_before = f.stats().await.received;
    // Announce 4 MiB + 1 and send only 1 KiB of it: the refusal must not wait for the body.
    let mut frame = raw_prefix(0, slim_proto::DEFAULT_MAX_MESSAGE_SIZE as u32 + 1);
    frame.put_bytes(0x0a, 1024);
    c.send_raw(frame.freeze());
    let status = c.status().await;
    assert_eq!(status.code, 8, "RESOURCE_EXHAUSTED: {status:?}");
    assert!(status.message.contains("exceeds"), "{status:?}");
    f.wait_for_connections(2).await;
    assert_eq!(
        f.stats().await.received,
        received_before,
        "nothing of the oversize message reached the router"
    );
    f.assert_still_routes().await;

    // The limit itself is a valid size: a message of exactly 4 MiB is routed, intact.
    let target = slim_proto::DEFAULT_MAX_MESSAGE_SIZE;
    let signed_len = |blob_len: usize| {
        let mut m = publish_message(&f.a_name, &f.b_name, 1, &vec![0x5a; blob_len]);
        f.a.sign(&mut m);
        m.encoded_len()
    };
    let mut blob_len = target - signed_len(0);
    for _ in 0..5 {
        blob_len = (blob_len + target).saturating_sub(signed_len(blob_len));
    }
    assert_eq!(
        signed_len(blob_len),
        target,
        "a blob size that gives exactly 4 MiB"
    );
    let big = publish_message(&f.a_name, &f.b_name, 1, &vec![0x5a; blob_len]);
    let sent = f.a.send_signed(big);
    assert_eq!(sent.encoded_len(), target);
    let received = f.b.recv().await;
    f.b.assert_forwarded_copy(&sent, &received);
    f.assert_still_routes().await;
    f.shutdown().await;
}

#[tokio::test]
async fn publish_before_negotiation_closes_the_stream() {
    let mut f = Fixture::new().await;
    let mut c = Client::connect(f.addr(), "C").await;
    let c_name = Name::with_id("org", "ns", "mallory", 1);
    c.send(&publish_message(&c_name, &f.b_name, 1, b"sneaky"));
    let status = c.status().await; // also asserts no negotiation reply came
    assert_eq!(status.code, 3, "INVALID_ARGUMENT: {status:?}");
    assert!(status.message.contains("negotiation"), "{status:?}");
    f.wait_for_connections(2).await;
    assert!(f.stats().await.connections_refused >= 1);
    f.assert_still_routes().await; // B's next message is A's publish: the sneaky one was not routed
    f.shutdown().await;
}

#[tokio::test]
async fn wrong_header_mac_is_dropped_and_the_link_survives() {
    let mut f = Fixture::new().await;

    // A flipped tag bit.
    let mut message = publish_message(&f.a_name, &f.b_name, 1, b"forged");
    f.a.sign(&mut message);
    let header = header_of_mut(&mut message).unwrap();
    let mut tag = header.header_mac.clone().unwrap().to_vec();
    tag[0] ^= 1;
    header.header_mac = Some(tag.into());
    f.a.send(&message);
    f.wait_for_drops(DropReason::MacInvalid, 1).await;

    // A valid tag on a header changed after signing (a rerouted destination).
    let mut message = publish_message(&f.a_name, &f.a_name, 1, b"rerouted");
    f.a.sign(&mut message);
    header_of_mut(&mut message).unwrap().destination = Some(f.b_name.to_pb());
    f.a.send(&message);
    f.wait_for_drops(DropReason::MacInvalid, 2).await;

    // A subscribe with a bad tag: dropped without an ack, and no route installed.
    let mut message = subscribe_message(&f.a_name, &Name::with_id("org", "ns", "x", 1), 99);
    f.a.sign(&mut message);
    header_of_mut(&mut message).unwrap().ttl = 9;
    f.a.send(&message);
    let stats = f.wait_for_drops(DropReason::MacInvalid, 3).await;
    assert_eq!(stats.subscriptions, 2);

    // No tag at all.
    f.a.send(&publish_message(&f.a_name, &f.b_name, 1, b"unsigned"));
    let stats = f.wait_for_drops(DropReason::MacMissing, 1).await;
    assert_eq!(
        stats.forwarded, 2,
        "only the fixture's own publishes were routed"
    );
    assert_eq!(stats.connections, 2);
    assert_eq!(stats.dropped_total(), 4, "{stats:#?}");

    f.assert_still_routes().await; // nothing forged reached B, no ack reached A
    f.shutdown().await;
}

#[tokio::test]
async fn expired_ttl_is_dropped() {
    let mut f = Fixture::new().await;
    for (ttl, drops) in [(0, 1), (1, 2)] {
        let mut message = publish_message(&f.a_name, &f.b_name, 1, b"old");
        header_of_mut(&mut message).unwrap().ttl = ttl;
        f.a.send_signed(message);
        f.wait_for_drops(DropReason::TtlExpired, drops).await;
    }
    // ttl 2 still has one hop left.
    let mut message = publish_message(&f.a_name, &f.b_name, 1, b"last hop");
    header_of_mut(&mut message).unwrap().ttl = 2;
    let sent = f.a.send_signed(message);
    f.b.expect_copy_of(&sent).await; // arrives with ttl 1
    let stats = f.stats().await;
    assert_eq!(stats.dropped(DropReason::TtlExpired), 2);
    assert_eq!(stats.dropped_total(), 2);
    f.assert_still_routes().await;
    f.shutdown().await;
}

#[tokio::test]
async fn publish_to_nobody_is_dropped_as_no_route() {
    let mut f = Fixture::new().await;
    let nobody = Name::with_id("org", "ns", "nobody", 5);
    f.a.publish(&f.a_name, &nobody, 1, b"hello?");
    f.wait_for_drops(DropReason::NoRoute, 1).await;
    f.a.publish(
        &f.a_name,
        &Name::new("org", "ns", "nobody"),
        256,
        b"anyone?",
    );
    f.wait_for_drops(DropReason::NoRoute, 2).await;
    // A specific id nobody subscribed, under a prefix somebody did.
    f.a.publish(&f.a_name, &f.b_name.with_instance(0xdead), 1, b"wrong id");
    let stats = f.wait_for_drops(DropReason::NoRoute, 3).await;
    assert_eq!(stats.dropped_total(), 3);
    f.assert_still_routes().await;
    f.shutdown().await;
}

#[tokio::test]
async fn undecodable_protobuf_is_dropped_and_the_link_survives() {
    let mut f = Fixture::new().await;
    // Field 1 (subscribe), length 5, but only one byte follows.
    f.a.send_raw(frame_bytes(&[0x0a, 0x05, 0x01]));
    f.wait_for_drops(DropReason::Malformed, 1).await;
    // Tag 0 is never valid.
    f.a.send_raw(frame_bytes(&[0x00, 0x01]));
    f.wait_for_drops(DropReason::Malformed, 2).await;
    // Decodes (an empty Message) but breaks the rules: no message_type.
    f.a.send_raw(frame_bytes(&[]));
    let stats = f.wait_for_drops(DropReason::Invalid, 1).await;
    assert_eq!(stats.connections, 2);
    assert_eq!(stats.dropped_total(), 3, "{stats:#?}");
    f.assert_still_routes().await;
    f.shutdown().await;
}

#[tokio::test]
async fn second_negotiation_is_dropped() {
    let mut f = Fixture::new().await;
    let mac_before = f.a.mac().clone();
    f.a.send_negotiation();
    let stats = f.wait_for_drops(DropReason::RepeatedNegotiation, 1).await;
    assert_eq!(stats.dropped_total(), 1, "{stats:#?}");
    assert_eq!(stats.connections, 2, "the link stays up");
    // The link keeps its key: A's next message (B's publish) verifies with the old one, and no
    // second negotiation reply came before it.
    assert_eq!(f.a.mac().link_id(), mac_before.link_id());
    f.assert_still_routes().await;
    f.shutdown().await;
}

#[tokio::test]
async fn short_ecdh_key_is_refused() {
    let mut f = Fixture::new().await;
    let mut c = Client::connect(f.addr(), "C").await;
    let info = link::LocalLinkInfo {
        slim_version: CLIENT_VERSION.into(),
        node_id: "node-short-key".into(),
        deployment_name: String::new(),
    };
    let mut request = link::request(&info, "short-key-link", LinkConnectionType::Edge, [0; 32]);
    request.link_ecdh_public_key = Bytes::from_static(&[7; 16]);
    c.send(&link::negotiation_message(request));
    let status = c.status().await; // no negotiation reply before it
    assert_eq!(status.code, 3, "INVALID_ARGUMENT: {status:?}");
    assert!(status.message.contains("16 bytes"), "{status:?}");
    f.wait_for_connections(2).await;
    assert_eq!(
        f.stats().await.links_established,
        3,
        "A, B and the probe only"
    );
    f.assert_still_routes().await;
    f.shutdown().await;
}

#[tokio::test]
async fn silent_client_times_out() {
    let mut f = Fixture::with(|config| config.negotiation_timeout = Duration::from_secs(2)).await;
    let refused_before = f.stats().await.connections_refused;
    let mut c = Client::connect(f.addr(), "C").await;
    let status = c.status().await;
    assert_eq!(status.code, 4, "DEADLINE_EXCEEDED: {status:?}");
    assert!(status.message.contains("timed out"), "{status:?}");
    f.wait_for_connections(2).await;
    assert_eq!(f.stats().await.connections_refused, refused_before + 1);
    f.assert_still_routes().await;
    f.shutdown().await;
}

#[tokio::test]
async fn unknown_grpc_method_is_unimplemented() {
    let mut f = Fixture::new().await;
    let tcp = TcpStream::connect(f.addr()).await.unwrap();
    let path = "/dataplane.proto.v1.DataPlaneService/CloseChannel";
    let mut c = within(
        "a response",
        Client::try_open(tcp, "http", &f.addr().to_string(), path, "C"),
    )
    .await
    .expect("HTTP/2 works");
    let status = c.status().await;
    assert_eq!(status.code, 12, "UNIMPLEMENTED: {status:?}");
    assert!(status.message.contains(path), "{status:?}");
    // More streams on the same HTTP/2 connection get the same answer.
    for path in ["/grpc.health.v1.Health/Check", "/"] {
        let status = c.request_status(path).await;
        assert_eq!(status.code, 12, "{path}: {status:?}");
    }
    let stats = f.stats().await;
    assert_eq!(
        stats.connections, 2,
        "refused methods never reach the router"
    );
    f.assert_still_routes().await;
    f.shutdown().await;
}

#[tokio::test]
async fn client_vanishing_mid_frame_is_cleaned_up() {
    let mut f = Fixture::new().await;
    let mut c = Client::connect_negotiated(f.addr(), "C").await;
    let c_name = Name::with_id("org", "ns", "carol", 3);
    c.subscribe(&c_name, 33).await;
    let stats = f.stats().await;
    assert_eq!((stats.connections, stats.subscriptions), (3, 3));
    // Half of a 100-byte message, then the TCP connection goes away.
    let mut frame = raw_prefix(0, 100);
    frame.put_bytes(0x0a, 50);
    c.send_raw(frame.freeze());
    c.vanish();
    wait_for_stats(&f.node, "C's connection and route to be removed", |s| {
        s.connections == 2 && s.subscriptions == 2
    })
    .await;
    f.a.publish(&f.a_name, &c_name, 1, b"to the departed");
    f.wait_for_drops(DropReason::NoRoute, 1).await;
    f.assert_still_routes().await;
    f.shutdown().await;
}

#[tokio::test]
async fn subscriber_that_does_not_read_stalls_nobody() {
    let mut f = Fixture::new().await;
    let mut sloth = Client::connect_negotiated(f.addr(), "sloth").await;
    let sloth_name = Name::with_id("org", "ns", "sloth", 5);
    sloth.subscribe(&sloth_name, 55).await;
    // Far more than the sloth's HTTP/2 window and the node's queue for it can hold.
    let count: u32 = 1600;
    let filler = vec![0x42u8; 32 * 1024];
    let received_before = f.stats().await.received;
    for i in 0..count {
        let mut message = publish_message(&f.a_name, &sloth_name, 1, &filler);
        if let Some(pb::message::MessageType::Publish(p)) = message.message_type.as_mut() {
            p.session.as_mut().unwrap().message_id = i;
        }
        f.a.send_signed(message);
    }
    let stats = wait_for_node_stats(&f.node, "the backlog to be handled", |s| {
        s.router.received >= received_before + u64::from(count)
    })
    .await;
    let dropped = stats.slow_consumer_drops;
    assert!(
        dropped > 0 && dropped < u64::from(count),
        "the node drops for a subscriber that does not read, instead of stalling: {stats:#?}"
    );
    // Everybody else is served while the sloth sleeps.
    f.assert_still_routes().await;

    // The sloth wakes up: it gets what was queued for it, in order, then live traffic again.
    let mut last = None;
    for _ in 0..u64::from(count) - dropped {
        let received = sloth.recv().await;
        let Some(pb::message::MessageType::Publish(p)) = received.message.message_type else {
            panic!("sloth: expected a publish, got {:?}", received.message);
        };
        let id = p.session.unwrap().message_id;
        assert!(
            last.is_none_or(|last| id > last),
            "in order: {id} after {last:?}"
        );
        last = Some(id);
    }
    assert_delivers(&mut f.a, &f.a_name, &mut sloth, &sloth_name, b"awake").await;
    assert_eq!(
        wait_for_node_stats(&f.node, "stats", |_| true)
            .await
            .slow_consumer_drops,
        dropped,
        "nothing dropped once the sloth reads"
    );
    f.shutdown().await;
}

#[tokio::test]
async fn connection_without_streams_is_closed_when_idle() {
    let mut f = Fixture::with(|c| c.max_connection_idle = Duration::from_secs(1)).await;
    // An HTTP/2 connection that never opens a stream.
    let tcp = TcpStream::connect(node_addr(&f.node)).await.unwrap();
    let (send_request, connection) = h2_handshake(tcp).await.unwrap();
    within("the node closes the idle connection", connection)
        .await
        .unwrap();
    drop(send_request);
    // The good clients have streams open: they were not touched.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    f.assert_still_routes().await;
    f.shutdown().await;
}

#[tokio::test]
async fn forward_to_from_a_client_is_refused() {
    let mut f = Fixture::new().await;
    // A tries to push a message straight onto B's connection, bypassing subscriptions.
    let stolen = Name::with_id("org", "ns", "nobody-subscribed", 1);
    let mut message = publish_message(&f.a_name, &stolen, 1, b"sneaky");
    header_of_mut(&mut message).unwrap().forward_to = Some(1);
    f.a.send_signed(message);
    f.wait_for_drops(DropReason::ForwardToRefused, 1).await;
    f.assert_still_routes().await;
    f.shutdown().await;
}
