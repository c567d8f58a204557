//! Router behaviour, driven the way an adapter drives it, with test clients that do their side of
//! the protocol with the real slim-proto primitives (X25519, HKDF, HMAC).

use super::*;
use prost::Message as _;
use slim_proto::link::LocalLinkInfo;
use slim_proto::name::ANY_INSTANCE;
use slim_proto::{Deframer, Name};

const T0: Timestamp = Timestamp::ZERO;

fn decode_frame(frame: &Bytes) -> pb::Message {
    let mut d = Deframer::default();
    d.push(frame);
    pb::Message::decode(d.next_frame().unwrap().unwrap()).unwrap()
}

/// An SDK client's side of one edge link.
struct Client {
    conn: ConnId,
    mac: HeaderMacKey,
    name: Name,
}

struct Harness {
    router: Router,
    /// Everything the router transmitted, per connection, decoded.
    inbox: FxHashMap<ConnId, Vec<pb::Message>>,
    closed: Vec<(ConnId, u32, String)>,
    events: Vec<RouterEvent>,
    next_seed: u8,
}

impl Harness {
    fn new() -> Self {
        Self::with_config(RouterConfig::default())
    }

    fn with_config(config: RouterConfig) -> Self {
        Self {
            router: Router::new(config, [1; 32]),
            inbox: FxHashMap::default(),
            closed: Vec::new(),
            events: Vec::new(),
            next_seed: 10,
        }
    }

    fn drain(&mut self) {
        while let Some(output) = self.router.poll_output() {
            match output {
                Output::Transmit { conn, frame } => self
                    .inbox
                    .entry(conn)
                    .or_default()
                    .push(decode_frame(&frame)),
                Output::Deliver { conn, message } => {
                    assert_eq!(
                        self.router.connection_kind(conn),
                        Some(ConnectionKind::Local)
                    );
                    self.inbox.entry(conn).or_default().push(*message);
                }
                Output::Close { conn, code, reason } => self.closed.push((conn, code, reason)),
                Output::Event(e) => self.events.push(e),
            }
        }
    }

    fn take(&mut self, conn: ConnId) -> Vec<pb::Message> {
        self.inbox.remove(&conn).unwrap_or_default()
    }

    fn send(&mut self, conn: ConnId, message: &pb::Message) {
        self.router
            .handle_frame(conn, Bytes::from(message.encode_to_vec()), T0);
        self.drain();
    }

    /// Accepts a connection and negotiates it as an EDGE client would.
    fn connect(&mut self, name: &Name) -> Client {
        let conn = self.router.accept_connection(T0);
        self.next_seed += 1;
        let keys = LinkKeyPair::from_seed([self.next_seed; 32]);
        let link_id = format!("link-{}", self.next_seed);
        let node_id = format!("node-client-{}", self.next_seed);
        let request = link::edge_client_request(node_id, "3.4.6", &link_id, &keys);
        self.send(conn, &link::negotiation_message(request));
        let replies = self.take(conn);
        assert_eq!(replies.len(), 1, "one negotiation reply");
        let reply = link::as_negotiation(&replies[0])
            .expect("negotiation reply")
            .clone();
        link::check_reply(&reply, &link_id, true).expect("reply acceptable to a strict client");
        assert_eq!(reply.connection_type, LinkConnectionType::Edge as i32);
        let mac = keys.header_mac(&reply.link_ecdh_public_key, &link_id);
        Client {
            conn,
            mac: mac.unwrap().expect("the router sent its key"),
            name: name.clone(),
        }
    }

    fn subscribe(&mut self, client: &Client, sub_id: u64) -> pb::SubscriptionAck {
        self.send(
            client.conn,
            &subscribe_msg(client, &client.name, sub_id, true),
        );
        let mut acks: Vec<_> = self
            .take(client.conn)
            .into_iter()
            .filter_map(as_ack)
            .collect();
        assert_eq!(acks.len(), 1, "exactly one ack");
        acks.remove(0)
    }
}

fn as_ack(m: pb::Message) -> Option<pb::SubscriptionAck> {
    match m.message_type {
        Some(MessageType::SubscriptionAck(a)) => Some(a),
        _ => None,
    }
}

fn header(client: &Client, source: &Name, destination: &Name, fanout: u32) -> pb::SlimHeader {
    let mut header = pb::SlimHeader {
        source: Some(source.to_pb()),
        destination: Some(destination.to_pb()),
        identity: "token".into(),
        fanout,
        version: "3.4.6".into(),
        ttl: 8,
        incoming_conn: Some(1),
        ..Default::default()
    };
    client.mac.sign(&mut header);
    header
}

fn subscribe_msg(client: &Client, name: &Name, sub_id: u64, subscribe: bool) -> pb::Message {
    let header = Some(header(client, &client.name, name, 1));
    let message_type = if subscribe {
        MessageType::Subscribe(pb::Subscribe {
            header,
            subscription_id: sub_id,
        })
    } else {
        MessageType::Unsubscribe(pb::Unsubscribe {
            header,
            subscription_id: sub_id,
        })
    };
    pb::Message {
        message_type: Some(message_type),
        metadata: Default::default(),
    }
}

fn publish_msg(client: &Client, destination: &Name, fanout: u32, payload: &[u8]) -> pb::Message {
    publish_with(header(client, &client.name, destination, fanout), payload)
}

fn publish_with(header: pb::SlimHeader, payload: &[u8]) -> pb::Message {
    pb::Message {
        message_type: Some(MessageType::Publish(pb::Publish {
            header: Some(header),
            session: Some(pb::SessionHeader {
                session_type: pb::SessionType::PointToPoint as i32,
                session_message_type: pb::SessionMessageType::Msg as i32,
                session_id: 42,
                message_id: 1,
            }),
            msg: Some(pb::Content {
                content_type: Some(pb::content::ContentType::AppPayload(
                    pb::ApplicationPayload {
                        payload_type: "msg".into(),
                        blob: Bytes::copy_from_slice(payload),
                    },
                )),
            }),
        })),
        metadata: [("k".to_string(), "v".to_string())].into_iter().collect(),
    }
}

fn publishes(messages: Vec<pb::Message>) -> Vec<pb::Publish> {
    messages
        .into_iter()
        .filter_map(|m| match m.message_type {
            Some(MessageType::Publish(p)) => Some(p),
            _ => None,
        })
        .collect()
}

fn blob(p: &pb::Publish) -> &[u8] {
    match p.msg.as_ref().and_then(|c| c.content_type.as_ref()) {
        Some(pb::content::ContentType::AppPayload(a)) => &a.blob,
        _ => panic!("no app payload"),
    }
}

/// Flips bit `bit` of a signed message's header MAC.
fn flip_tag_bit(message: &mut pb::Message, bit: usize) {
    let header = header_mut(message).unwrap();
    let mut tag = header.header_mac.clone().unwrap().to_vec();
    tag[bit / 8] ^= 1 << (bit % 8);
    header.header_mac = Some(tag.into());
}

fn app(svc: &str, id: u128) -> Name {
    Name::with_id("org", "ns", svc, id)
}

#[test]
fn negotiation_reply_is_what_strict_clients_require() {
    let mut h = Harness::new();
    let alice = h.connect(&app("alice", 1));
    assert!(h.router.is_established(alice.conn));
    assert_eq!(
        h.router.connection_kind(alice.conn),
        Some(ConnectionKind::Edge)
    );
    assert!(matches!(
        h.events.last(),
        Some(RouterEvent::LinkEstablished {
            kind: ConnectionKind::Edge,
            header_mac: true,
            ..
        })
    ));
    assert_eq!(h.router.stats().links_established, 1);
}

#[test]
fn message_before_negotiation_closes_the_connection() {
    let mut h = Harness::new();
    let good = h.connect(&app("alice", 1));
    let conn = h.router.accept_connection(T0);
    h.send(conn, &publish_msg(&good, &app("alice", 1), 1, b"x"));
    assert_eq!(h.closed.len(), 1);
    assert_eq!(h.closed[0].0, conn);
    assert_eq!(h.closed[0].1, 3);
    assert!(h.closed[0].2.contains("first message"), "{}", h.closed[0].2);
    assert!(!h.router.is_established(conn));
    // Garbage as the first message closes too; other links are unaffected.
    let conn = h.router.accept_connection(T0);
    h.router
        .handle_frame(conn, Bytes::from_static(&[0xff, 0xff, 0xff]), T0);
    h.drain();
    assert_eq!(h.closed.len(), 2);
    assert!(h.router.is_established(good.conn));
}

#[test]
fn bad_negotiations_are_refused_with_a_reason() {
    let mut h = Harness::new();
    type Mutation = Box<dyn Fn(&mut pb::LinkNegotiationPayload)>;
    let cases: Vec<(Mutation, &str)> = vec![
        (Box::new(|p| p.link_id.clear()), "empty link_id"),
        (
            Box::new(|p| p.slim_version = "not-semver".into()),
            "semantic version",
        ),
        (
            Box::new(|p| p.link_ecdh_public_key = Bytes::from_static(&[1; 16])),
            "16 bytes",
        ),
        (Box::new(|p| p.is_reply = true), "is_reply"),
        (Box::new(|p| p.connection_type = 9), "connection_type"),
    ];
    for (i, (mutate, expected)) in cases.iter().enumerate() {
        let conn = h.router.accept_connection(T0);
        let info = LocalLinkInfo {
            slim_version: "1.0.0".into(),
            node_id: "n".into(),
            deployment_name: String::new(),
        };
        let mut request = link::request(&info, "l", LinkConnectionType::Edge, [3; 32]);
        mutate(&mut request);
        h.send(conn, &link::negotiation_message(request));
        assert_eq!(h.closed.len(), i + 1);
        assert!(
            h.closed[i].2.contains(expected),
            "{} !~ {expected}",
            h.closed[i].2
        );
        assert!(h.take(conn).is_empty(), "no reply to a refused negotiation");
    }
    assert_eq!(h.router.stats().connections, 0);
}

#[test]
fn negotiation_times_out() {
    let mut h = Harness::new();
    let conn = h.router.accept_connection(T0);
    let (deadline, timer) = h.router.poll_timeout().unwrap();
    assert_eq!(timer, Timer::Negotiation);
    assert_eq!(deadline, T0 + Duration::from_secs(5));
    h.router.handle_timeout(Timestamp::from_micros(1)); // early: no-op
    h.drain();
    assert!(h.closed.is_empty());
    h.router.handle_timeout(deadline);
    h.drain();
    assert_eq!(
        h.closed,
        vec![(conn, 4, "link negotiation timed out".to_string())]
    );
    assert_eq!(h.router.poll_timeout(), None);
}

#[test]
fn established_links_do_not_time_out() {
    let mut h = Harness::new();
    let alice = h.connect(&app("alice", 1));
    h.router.handle_timeout(T0 + Duration::from_secs(60));
    h.drain();
    assert!(h.closed.is_empty());
    assert!(h.router.is_established(alice.conn));
}

#[test]
fn subscribe_is_acked_idempotently_and_routes() {
    let mut h = Harness::new();
    let alice = h.connect(&app("alice", 1));
    let bob = h.connect(&app("bob", 2));
    let ack = h.subscribe(&bob, 77);
    assert_eq!(
        (ack.subscription_id, ack.success, ack.error.as_str()),
        (77, true, "")
    );
    assert!(
        h.subscribe(&bob, 77).success,
        "re-sent subscribe is acked again"
    );
    // id 0 (replay after reconnect) gets no ack but is recorded.
    h.send(bob.conn, &subscribe_msg(&bob, &bob.name, 0, true));
    assert!(h.take(bob.conn).is_empty());
    assert_eq!(h.router.stats().subscriptions, 2);

    h.send(alice.conn, &publish_msg(&alice, &bob.name, 1, b"hello"));
    let got = publishes(h.take(bob.conn));
    assert_eq!(got.len(), 1);
    let header = got[0].header.as_ref().unwrap();
    assert_eq!(header.ttl, 7, "ttl decremented once");
    assert_eq!(header.incoming_conn, Some(alice.conn));
    assert_eq!(header.identity, "token");
    bob.mac.verify(header).expect("re-signed for bob's link");
    assert!(alice.mac.verify(header).is_err(), "not alice's key");
    assert_eq!(blob(&got[0]), b"hello");
    assert!(h.take(alice.conn).is_empty(), "never back to the sender");
}

#[test]
fn forwarded_copy_is_byte_identical_but_for_ttl_mac_and_incoming_conn() {
    let mut h = Harness::new();
    let alice = h.connect(&app("alice", 1));
    let bob = h.connect(&app("bob", 2));
    h.subscribe(&bob, 1);
    let original = publish_msg(&alice, &bob.name, 1, b"payload");
    h.send(alice.conn, &original);
    let mut copy = h.take(bob.conn).remove(0);
    // The frame is copied from the received bytes (slim_proto::forward): its new header fields
    // must still be what bob's link signs.
    let header = header_mut(&mut copy).unwrap();
    assert_eq!(bob.mac.verify(header), Ok(()));
    assert_eq!((header.ttl, header.incoming_conn), (7, Some(alice.conn)));
    let mut expected = original.clone();
    for m in [&mut copy, &mut expected] {
        let h = header_mut(m).unwrap();
        h.ttl = 0;
        h.header_mac = None;
        h.incoming_conn = None;
    }
    assert_eq!(copy, expected);
}

#[test]
fn anycast_picks_one_instance_round_robin_and_fanout_reaches_all() {
    let mut h = Harness::new();
    let client = h.connect(&app("client", 9));
    let s1 = h.connect(&app("svc", 1));
    let s2 = h.connect(&app("svc", 2));
    h.subscribe(&s1, 1);
    h.subscribe(&s2, 2);
    let any = app("svc", ANY_INSTANCE);
    for _ in 0..4 {
        h.send(client.conn, &publish_msg(&client, &any, 1, b"one"));
    }
    assert_eq!(publishes(h.take(s1.conn)).len(), 2);
    assert_eq!(publishes(h.take(s2.conn)).len(), 2);
    // Specific id: only that instance.
    h.send(client.conn, &publish_msg(&client, &app("svc", 2), 1, b"x"));
    assert!(h.take(s1.conn).is_empty());
    assert_eq!(publishes(h.take(s2.conn)).len(), 1);
    // fanout 256 to the NULL id: everyone under the prefix.
    h.send(client.conn, &publish_msg(&client, &any, 256, b"all"));
    assert_eq!(publishes(h.take(s1.conn)).len(), 1);
    assert_eq!(publishes(h.take(s2.conn)).len(), 1);
    assert_eq!(h.router.stats().forwarded, 7);
}

#[test]
fn multicast_channel_excludes_the_sender() {
    let mut h = Harness::new();
    let channel = app("chan", 555);
    let members: Vec<Client> = (0..3).map(|i| h.connect(&app("m", i))).collect();
    for (i, m) in members.iter().enumerate() {
        h.send(m.conn, &subscribe_msg(m, &channel, 100 + i as u64, true));
        h.take(m.conn);
    }
    h.send(
        members[0].conn,
        &publish_msg(&members[0], &channel, 256, b"fan"),
    );
    assert!(h.take(members[0].conn).is_empty());
    assert_eq!(publishes(h.take(members[1].conn)).len(), 1);
    assert_eq!(publishes(h.take(members[2].conn)).len(), 1);
}

#[test]
fn ttl_is_enforced() {
    let mut h = Harness::new();
    let alice = h.connect(&app("alice", 1));
    let bob = h.connect(&app("bob", 2));
    h.subscribe(&bob, 1);
    for (ttl, delivered) in [(0, false), (1, false), (2, true)] {
        let mut hdr = header(&alice, &alice.name, &bob.name, 1);
        hdr.ttl = ttl;
        alice.mac.sign(&mut hdr);
        h.send(alice.conn, &publish_with(hdr, b"t"));
        let got = publishes(h.take(bob.conn));
        assert_eq!(!got.is_empty(), delivered, "ttl {ttl}");
        if delivered {
            assert_eq!(got[0].header.as_ref().unwrap().ttl, 1);
        }
    }
    assert_eq!(h.router.stats().dropped(DropReason::TtlExpired), 2);
}

#[test]
fn wrong_or_missing_mac_is_dropped_and_link_survives() {
    let mut h = Harness::new();
    let alice = h.connect(&app("alice", 1));
    let bob = h.connect(&app("bob", 2));
    h.subscribe(&bob, 1);
    let mut bad = publish_msg(&alice, &bob.name, 1, b"x");
    flip_tag_bit(&mut bad, 0);
    h.send(alice.conn, &bad);
    header_mut(&mut bad).unwrap().header_mac = None;
    h.send(alice.conn, &bad);
    // Signed with another link's key.
    let mut foreign = publish_msg(&alice, &bob.name, 1, b"x");
    bob.mac.sign(header_mut(&mut foreign).unwrap());
    h.send(alice.conn, &foreign);
    assert!(h.take(bob.conn).is_empty());
    let stats = h.router.stats();
    assert_eq!(stats.dropped(DropReason::MacInvalid), 2);
    assert_eq!(stats.dropped(DropReason::MacMissing), 1);
    // A subscribe with a bad MAC gets no reply at all (as the reference).
    let mut sub = subscribe_msg(&alice, &alice.name, 5, true);
    header_mut(&mut sub).unwrap().ttl = 3; // changes the pre-image after signing
    h.send(alice.conn, &sub);
    assert!(h.take(alice.conn).is_empty());
    // The link still works.
    h.send(alice.conn, &publish_msg(&alice, &bob.name, 1, b"ok"));
    assert_eq!(publishes(h.take(bob.conn)).len(), 1);
}

#[test]
fn malformed_and_invalid_messages_are_counted_not_fatal() {
    let mut h = Harness::new();
    let alice = h.connect(&app("alice", 1));
    let bob = h.connect(&app("bob", 2));
    h.subscribe(&bob, 1);
    h.router.handle_frame(
        alice.conn,
        Bytes::from_static(&[0x0a, 0xff, 0xff, 0x01]),
        T0,
    );
    h.send(alice.conn, &pb::Message::default());
    let mut no_session = publish_msg(&alice, &bob.name, 1, b"x");
    if let Some(MessageType::Publish(p)) = no_session.message_type.as_mut() {
        p.session = None;
    }
    h.send(alice.conn, &no_session);
    h.drain();
    let stats = h.router.stats();
    assert_eq!(stats.dropped(DropReason::Malformed), 1);
    assert_eq!(stats.dropped(DropReason::Invalid), 2);
    assert!(h.closed.is_empty());
    h.send(alice.conn, &publish_msg(&alice, &bob.name, 1, b"ok"));
    assert_eq!(publishes(h.take(bob.conn)).len(), 1);
}

#[test]
fn repeated_negotiation_and_unknown_connections_are_dropped() {
    let mut h = Harness::new();
    let alice = h.connect(&app("alice", 1));
    let info = LocalLinkInfo {
        slim_version: "1.0.0".into(),
        node_id: "n".into(),
        deployment_name: String::new(),
    };
    h.send(
        alice.conn,
        &link::negotiation_message(link::request(
            &info,
            "again",
            LinkConnectionType::Edge,
            [5; 32],
        )),
    );
    assert!(h.take(alice.conn).is_empty());
    assert!(h.router.is_established(alice.conn));
    h.router.handle_frame(999, Bytes::new(), T0);
    let stats = h.router.stats();
    assert_eq!(stats.dropped(DropReason::RepeatedNegotiation), 1);
    assert_eq!(stats.dropped(DropReason::UnknownConnection), 1);
}

#[test]
fn publish_to_nobody_is_counted() {
    let mut h = Harness::new();
    let alice = h.connect(&app("alice", 1));
    h.send(alice.conn, &publish_msg(&alice, &app("nobody", 3), 1, b"x"));
    h.send(
        alice.conn,
        &publish_msg(&alice, &app("nobody", ANY_INSTANCE), 256, b"x"),
    );
    assert_eq!(h.router.stats().dropped(DropReason::NoRoute), 2);
}

#[test]
fn unsubscribe_and_connection_loss_remove_routes() {
    let mut h = Harness::new();
    let alice = h.connect(&app("alice", 1));
    let bob = h.connect(&app("bob", 2));
    h.subscribe(&bob, 1);
    h.send(bob.conn, &subscribe_msg(&bob, &bob.name, 1, false));
    let acks: Vec<_> = h.take(bob.conn).into_iter().filter_map(as_ack).collect();
    assert!(acks[0].success);
    h.send(bob.conn, &subscribe_msg(&bob, &bob.name, 1, false));
    let acks: Vec<_> = h.take(bob.conn).into_iter().filter_map(as_ack).collect();
    assert!(!acks[0].success);
    assert!(acks[0].error.contains("not found"), "{}", acks[0].error);
    h.subscribe(&bob, 2);
    h.router.handle_connection_closed(bob.conn, T0);
    h.drain();
    assert!(h.events.contains(&RouterEvent::ConnectionRemoved {
        conn: bob.conn,
        routes_removed: 1
    }));
    assert_eq!(h.router.stats().subscriptions, 0);
    h.send(alice.conn, &publish_msg(&alice, &bob.name, 1, b"x"));
    assert!(h.take(bob.conn).is_empty());
    assert_eq!(h.router.stats().dropped(DropReason::NoRoute), 1);
}

#[test]
fn edge_clients_cannot_steer_other_connections() {
    let mut h = Harness::new();
    let alice = h.connect(&app("alice", 1));
    let bob = h.connect(&app("bob", 2));
    let mut sub = subscribe_msg(&alice, &app("stolen", 1), 9, true);
    let hdr = header_mut(&mut sub).unwrap();
    hdr.recv_from = Some(bob.conn);
    alice.mac.sign(hdr);
    h.send(alice.conn, &sub);
    let acks: Vec<_> = h.take(alice.conn).into_iter().filter_map(as_ack).collect();
    assert!(!acks[0].success);
    assert_eq!(h.router.stats().subscriptions, 0);
    // forward_to on a publish from an edge client is refused, whatever it names.
    for target in [bob.conn, 4242] {
        let mut p = publish_msg(&alice, &app("unsubscribed", 1), 1, b"direct");
        let hdr = header_mut(&mut p).unwrap();
        hdr.forward_to = Some(target);
        alice.mac.sign(hdr);
        h.send(alice.conn, &p);
    }
    assert!(h.take(bob.conn).is_empty());
    assert_eq!(h.router.stats().dropped(DropReason::ForwardToRefused), 2);
}

#[test]
fn local_apps_may_forward_directly() {
    let mut h = Harness::new();
    let bob = h.connect(&app("bob", 2));
    let local = h.router.attach_local();
    let direct = |to: ConnId| {
        publish_with(
            pb::SlimHeader {
                source: Some(app("local", 1).to_pb()),
                destination: Some(app("unsubscribed", 1).to_pb()),
                fanout: 1,
                ttl: 8,
                forward_to: Some(to),
                ..Default::default()
            },
            b"direct",
        )
    };
    h.send(local, &direct(4242));
    assert_eq!(h.router.stats().dropped(DropReason::UnknownForwardTo), 1);
    // To an open connection it bypasses the table (how acks and replies travel).
    h.send(local, &direct(bob.conn));
    let got = publishes(h.take(bob.conn));
    assert_eq!(got.len(), 1);
    let header = got[0].header.as_ref().unwrap();
    assert_eq!(header.forward_to, None, "cleared before sending");
    bob.mac.verify(header).expect("signed for bob's link");
}

#[test]
fn local_apps_exchange_messages_not_frames() {
    let mut h = Harness::new();
    let edge = h.connect(&app("edge", 9));
    let channel = app("chan", 556);
    h.send(edge.conn, &subscribe_msg(&edge, &channel, 7, true));
    h.take(edge.conn);
    let locals = [h.router.attach_local(), h.router.attach_local()];
    for (i, &local) in locals.iter().enumerate() {
        let mut sub = subscribe_msg(&edge, &channel, 20 + i as u64, true);
        header_mut(&mut sub).unwrap().header_mac = None;
        h.router.handle_message(local, Box::new(sub), T0);
        h.drain();
        let acks: Vec<_> = h.take(local).into_iter().filter_map(as_ack).collect();
        assert!(acks.len() == 1 && acks[0].success, "acked as a message");
    }
    // One publish from the first app: the other app gets the message itself (no MAC, nothing
    // encoded), the edge client a frame signed for its link; the sender nothing.
    let mut message = publish_with(
        pb::SlimHeader {
            source: Some(app("local", 1).to_pb()),
            destination: Some(channel.to_pb()),
            fanout: 256,
            ttl: 8,
            ..Default::default()
        },
        b"to all",
    );
    message.metadata.insert("trace".into(), "kept".into());
    h.router.handle_message(locals[0], Box::new(message), T0);
    h.drain();
    assert!(h.take(locals[0]).is_empty());
    let got = h.take(locals[1]);
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].metadata.get("trace").map(String::as_str),
        Some("kept")
    );
    let publish = publishes(got).remove(0);
    assert_eq!(blob(&publish), b"to all");
    let header = publish.header.unwrap();
    assert_eq!(header.header_mac, None, "no MAC toward an app");
    assert_eq!(header.incoming_conn, Some(locals[0]));
    assert_eq!(header.ttl, 8, "local apps do not spend TTL");
    let to_edge = publishes(h.take(edge.conn));
    assert_eq!(to_edge.len(), 1);
    edge.mac
        .verify(to_edge[0].header.as_ref().unwrap())
        .expect("signed for the edge link");
    // Unknown connections are counted, as for frames.
    h.router.handle_message(4242, Box::default(), T0);
    assert_eq!(h.router.stats().dropped(DropReason::UnknownConnection), 1);
}

/// Shuttles frames between two routers, as two nodes linked by one connection.
fn pump(
    a: &mut Router,
    a_conn: ConnId,
    b: &mut Router,
    b_conn: ConnId,
    now: Timestamp,
) -> (Vec<Output>, Vec<Output>) {
    let (mut rest_a, mut rest_b) = (Vec::new(), Vec::new());
    loop {
        let mut moved = false;
        while let Some(o) = a.poll_output() {
            match o {
                Output::Transmit { conn, frame } if conn == a_conn => {
                    let mut d = Deframer::default();
                    d.push(&frame);
                    b.handle_frame(b_conn, d.next_frame().unwrap().unwrap(), now);
                    moved = true;
                }
                other => rest_a.push(other),
            }
        }
        while let Some(o) = b.poll_output() {
            match o {
                Output::Transmit { conn, frame } if conn == b_conn => {
                    let mut d = Deframer::default();
                    d.push(&frame);
                    a.handle_frame(a_conn, d.next_frame().unwrap().unwrap(), now);
                    moved = true;
                }
                other => rest_b.push(other),
            }
        }
        if !moved {
            return (rest_a, rest_b);
        }
    }
}

#[test]
fn two_nodes_negotiate_and_relay_forwarded_subscription_acks() {
    let mut a = Router::new(
        RouterConfig {
            node_id: "a".into(),
            ..Default::default()
        },
        [2; 32],
    );
    let mut b = Router::new(
        RouterConfig {
            node_id: "b".into(),
            ..Default::default()
        },
        [3; 32],
    );
    let a_link = a.dial_connection("a:b".into(), ConnectionKind::Remote, T0);
    let b_link = b.accept_connection(T0);
    pump(&mut a, a_link, &mut b, b_link, T0);
    assert!(a.is_established(a_link) && b.is_established(b_link));
    assert_eq!(b.connection_kind(b_link), Some(ConnectionKind::Remote));

    // An app local to A subscribes and asks A to forward the subscription to B.
    let app_conn = a.attach_local();
    let name = app("local", 7);
    let sub = pb::Message {
        message_type: Some(MessageType::Subscribe(pb::Subscribe {
            header: Some(pb::SlimHeader {
                source: Some(name.to_pb()),
                destination: Some(name.to_pb()),
                fanout: 1,
                ttl: 8,
                forward_to: Some(a_link),
                ..Default::default()
            }),
            subscription_id: 31,
        })),
        metadata: Default::default(),
    };
    a.handle_frame(app_conn, Bytes::from(sub.encode_to_vec()), T0);
    let (rest_a, _) = pump(&mut a, a_link, &mut b, b_link, T0);
    let acks: Vec<_> = rest_a
        .into_iter()
        .filter_map(|o| match o {
            Output::Deliver { conn, message } if conn == app_conn => as_ack(*message),
            _ => None,
        })
        .collect();
    assert_eq!(acks.len(), 1, "the app is acked once B acked");
    assert!(acks[0].success);
    assert_eq!(b.stats().subscriptions, 1, "B routes the name to the link");
    assert_eq!(a.stats().subscriptions, 1);
}

#[test]
fn forwarded_ack_times_out_with_an_error() {
    let mut a = Router::new(RouterConfig::default(), [2; 32]);
    let mut b = Router::new(RouterConfig::default(), [3; 32]);
    let a_link = a.dial_connection("x".into(), ConnectionKind::Remote, T0);
    let b_link = b.accept_connection(T0);
    pump(&mut a, a_link, &mut b, b_link, T0);
    let app_conn = a.attach_local();
    let name = app("local", 7);
    let sub = pb::Message {
        message_type: Some(MessageType::Subscribe(pb::Subscribe {
            header: Some(pb::SlimHeader {
                source: Some(name.to_pb()),
                destination: Some(name.to_pb()),
                ttl: 8,
                forward_to: Some(a_link),
                ..Default::default()
            }),
            subscription_id: 5,
        })),
        metadata: Default::default(),
    };
    a.handle_frame(app_conn, Bytes::from(sub.encode_to_vec()), T0);
    while a.poll_output().is_some() {} // B never hears of it
    let (deadline, timer) = a.poll_timeout().unwrap();
    assert_eq!(timer, Timer::ForwardedAck);
    a.handle_timeout(deadline);
    let acks: Vec<_> = std::iter::from_fn(|| a.poll_output())
        .filter_map(|o| match o {
            Output::Deliver { conn, message } if conn == app_conn => as_ack(*message),
            _ => None,
        })
        .collect();
    assert_eq!(acks.len(), 1);
    assert!(!acks[0].success);
}

#[test]
fn peers_from_another_deployment_or_self_are_refused_after_the_reply() {
    let config = RouterConfig {
        node_id: "me".into(),
        deployment_name: "dom1".into(),
        ..Default::default()
    };
    for (node_id, deployment, reason) in [
        ("me", "dom1", "same node_id"),
        ("other", "dom2", "deployment_name"),
    ] {
        let mut h = Harness::with_config(config.clone());
        let conn = h.router.accept_connection(T0);
        let info = LocalLinkInfo {
            slim_version: "3.4.6".into(),
            node_id: node_id.into(),
            deployment_name: deployment.into(),
        };
        h.send(
            conn,
            &link::negotiation_message(link::request(
                &info,
                "p",
                LinkConnectionType::Peer,
                [4; 32],
            )),
        );
        assert_eq!(h.take(conn).len(), 1, "reply first");
        assert_eq!(h.closed.len(), 1);
        assert_eq!(h.closed[0].1, 7);
        assert!(h.closed[0].2.contains(reason));
    }
}

#[test]
fn same_seed_same_outputs() {
    fn run() -> Vec<Output> {
        let mut r = Router::new(RouterConfig::default(), [9; 32]);
        let mut all = Vec::new();
        for i in 0..5 {
            let c = r.accept_connection(Timestamp::from_micros(i));
            let info = LocalLinkInfo {
                slim_version: "1.0.0".into(),
                node_id: "n".into(),
                deployment_name: String::new(),
            };
            let req = link::request(
                &info,
                &format!("l{i}"),
                LinkConnectionType::Edge,
                [i as u8 + 1; 32],
            );
            r.handle_frame(
                c,
                Bytes::from(link::negotiation_message(req).encode_to_vec()),
                Timestamp::from_micros(i),
            );
            all.extend(std::iter::from_fn(|| r.poll_output()));
        }
        all
    }
    assert_eq!(run(), run());
}

#[test]
fn local_app_publishes_fall_back_to_the_single_edge_uplink() {
    // The client side of an SDK: a local app and one edge link to a node.
    let mut client = Router::new(RouterConfig::default(), [5; 32]);
    let mut node = Router::new(RouterConfig::default(), [6; 32]);
    let uplink = client.dial_connection("up".into(), ConnectionKind::Edge, T0);
    let node_side = node.accept_connection(T0);
    pump(&mut client, uplink, &mut node, node_side, T0);
    let app_conn = client.attach_local();
    let me = app("me", 1);
    let message = pb::Message {
        message_type: Some(MessageType::Publish(pb::Publish {
            header: Some(pb::SlimHeader {
                source: Some(me.to_pb()),
                destination: Some(app("elsewhere", 2).to_pb()),
                fanout: 1,
                ttl: 8,
                ..Default::default()
            }),
            session: Some(pb::SessionHeader::default()),
            msg: None,
        })),
        metadata: Default::default(),
    };
    client.handle_frame(app_conn, Bytes::from(message.encode_to_vec()), T0);
    pump(&mut client, uplink, &mut node, node_side, T0);
    let node_stats = node.stats();
    assert_eq!(
        node_stats.received, 2,
        "negotiation + the publish reached the node"
    );
    assert_eq!(
        node_stats.dropped(DropReason::NoRoute),
        1,
        "and was MAC-verified, then unroutable there"
    );
    assert_eq!(
        node_stats.dropped(DropReason::MacInvalid) + node_stats.dropped(DropReason::MacMissing),
        0
    );
    assert_eq!(client.stats().dropped(DropReason::NoRoute), 0);
    // A second uplink makes the choice ambiguous: no fallback.
    let _second = client.dial_connection("up2".into(), ConnectionKind::Edge, T0);
    let mut other = Router::new(RouterConfig::default(), [8; 32]);
    let other_side = other.accept_connection(T0);
    pump(&mut client, _second, &mut other, other_side, T0);
    client.handle_frame(app_conn, Bytes::from(message.encode_to_vec()), T0);
    assert_eq!(client.stats().dropped(DropReason::NoRoute), 1);
}

#[test]
fn routes_only_to_negotiated_connections() {
    // Fuzzing finding F1: a route on a connection still negotiating used to be filed under its
    // provisional kind and to outlive it.
    let mut h = Harness::new();
    let pending = h.router.accept_connection(T0);
    let local = h.router.attach_local();
    let name = app("routed", 1);
    let sub = pb::Message {
        message_type: Some(MessageType::Subscribe(pb::Subscribe {
            header: Some(pb::SlimHeader {
                source: Some(name.to_pb()),
                destination: Some(name.to_pb()),
                ttl: 8,
                recv_from: Some(pending),
                ..Default::default()
            }),
            subscription_id: 3,
        })),
        metadata: Default::default(),
    };
    h.send(local, &sub);
    let acks: Vec<_> = h.take(local).into_iter().filter_map(as_ack).collect();
    assert!(!acks[0].success);
    assert!(
        acks[0].error.contains("no established connection"),
        "{}",
        acks[0].error
    );
    assert_eq!(h.router.stats().subscriptions, 0);
}

#[test]
fn a_reply_with_an_unknown_connection_type_is_refused() {
    // Fuzzing finding F2: the reply's type was not checked.
    let mut a = Router::new(RouterConfig::default(), [2; 32]);
    let conn = a.dial_connection("l".into(), ConnectionKind::Local, T0);
    let _request = a.poll_output();
    let info = LocalLinkInfo {
        slim_version: "3.4.6".into(),
        node_id: "n".into(),
        deployment_name: String::new(),
    };
    let request = link::request(&info, "l", LinkConnectionType::Edge, [1; 32]);
    let mut reply = link::reply(&info, &request, [4; 32]);
    reply.connection_type = 9;
    a.handle_frame(
        conn,
        Bytes::from(link::negotiation_message(reply).encode_to_vec()),
        T0,
    );
    let closed: Vec<_> = std::iter::from_fn(|| a.poll_output())
        .filter_map(|o| match o {
            Output::Close { reason, .. } => Some(reason),
            _ => None,
        })
        .collect();
    assert_eq!(closed.len(), 1);
    assert!(closed[0].contains("connection_type"), "{}", closed[0]);
}

#[test]
fn a_local_kind_is_never_dialed() {
    let mut a = Router::new(RouterConfig::default(), [2; 32]);
    let conn = a.dial_connection("l".into(), ConnectionKind::Local, T0);
    assert_eq!(a.connection_kind(conn), Some(ConnectionKind::Remote));
}

/// Data publishes from remote links are routed from their bytes (`route_from_bytes`); every
/// other case falls back to decoding. Either way the outputs, byte for byte, and the counters
/// are what decoding every message gives: unicast, anycast, multicast to links and to an
/// in-process app, and each publish the full path drops or must decode.
#[test]
fn routing_from_bytes_gives_what_decoding_gives() {
    let run = |route_from_bytes: bool| {
        let mut h = Harness::with_config(RouterConfig {
            route_from_bytes,
            keep_headers: route_from_bytes,
            ..RouterConfig::default()
        });
        let alice = h.connect(&app("alice", 1));
        let bob = h.connect(&app("bob", 2));
        let carol = h.connect(&app("carol", 3));
        h.subscribe(&bob, 1);
        let bob_again = h.connect(&app("bob", 4));
        h.subscribe(&bob_again, 1);
        let channel = app("chan", 77);
        h.send(carol.conn, &subscribe_msg(&carol, &channel, 2, true));
        let local = h.router.attach_local();
        let mut sub = subscribe_msg(&carol, &channel, 3, true);
        header_mut(&mut sub).unwrap().header_mac = None;
        h.router.handle_message(local, Box::new(sub), T0);
        h.drain();
        h.inbox.clear();

        let mut bodies: Vec<Vec<u8>> = Vec::new();
        let mut add = |message: pb::Message| bodies.push(message.encode_to_vec());
        add(publish_msg(&alice, &bob.name, 1, b"unicast"));
        add(publish_msg(
            &alice,
            &app("bob", ANY_INSTANCE),
            1,
            b"anycast",
        ));
        add(publish_msg(&alice, &channel, 256, b"to a link and an app"));
        add(publish_msg(&alice, &app("nobody", 1), 1, b"no route"));
        let mut tampered = publish_msg(&alice, &bob.name, 1, b"bad mac");
        header_mut(&mut tampered).unwrap().header_mac = Some(Bytes::from(vec![0; 32]));
        add(tampered);
        let mut expiring = header(&alice, &alice.name, &bob.name, 1);
        expiring.ttl = 1;
        alice.mac.sign(&mut expiring);
        add(publish_with(expiring, b"ttl"));
        let mut steered = header(&alice, &alice.name, &bob.name, 1);
        steered.forward_to = Some(carol.conn);
        alice.mac.sign(&mut steered);
        add(publish_with(steered, b"forward_to"));
        let mut control = publish_msg(&alice, &bob.name, 1, b"");
        if let Some(MessageType::Publish(p)) = &mut control.message_type {
            p.msg = Some(pb::Content {
                content_type: Some(pb::content::ContentType::CommandPayload(Default::default())),
            });
        }
        add(control);
        let mut no_session = publish_msg(&alice, &bob.name, 1, b"no session");
        if let Some(MessageType::Publish(p)) = &mut no_session.message_type {
            p.session = None;
        }
        add(no_session);
        // Flows: headers repeated byte for byte, to one link, to each instance in turn, to a
        // link and an app, with other headers between them.
        for round in 0..3u8 {
            add(publish_msg(&alice, &bob.name, 1, &[round]));
            add(publish_msg(&alice, &bob.name, 1, &[round, 1]));
            for _ in 0..3 {
                add(publish_msg(&alice, &app("bob", ANY_INSTANCE), 1, b"any"));
            }
            add(publish_msg(&alice, &channel, 256, &[round, 2]));
            add(publish_msg(&alice, &channel, 256, &[round, 3]));
        }
        let mut unknown = publish_msg(&alice, &bob.name, 1, b"unknown field").encode_to_vec();
        unknown.extend_from_slice(&[15 << 3, 1]);
        bodies.push(unknown);

        let mut outputs = Vec::new();
        for body in bodies {
            h.router.handle_frame(alice.conn, Bytes::from(body), T0);
            while let Some(output) = h.router.poll_output() {
                outputs.push(output);
            }
        }
        (outputs, h.router.stats())
    };
    let (fast, fast_stats) = run(true);
    let (full, full_stats) = run(false);
    assert_eq!(fast, full);
    assert_eq!(fast_stats, full_stats);
    let transmitted = |outputs: &[Output]| {
        outputs
            .iter()
            .filter(|o| matches!(o, Output::Transmit { .. }))
            .count()
    };
    // unicast, anycast, the channel's link, the command (decoded and routed), the unknown
    // field, then 3 rounds of 2 unicasts, 3 anycasts and 2 to the channel's link; the app gets
    // the channel's messages themselves.
    assert_eq!(transmitted(&fast), 5 + 3 * 7);
    assert_eq!(
        fast.iter()
            .filter(|o| matches!(o, Output::Deliver { .. }))
            .count(),
        1 + 3 * 2
    );
    for reason in [
        DropReason::NoRoute,
        DropReason::MacInvalid,
        DropReason::TtlExpired,
        DropReason::ForwardToRefused,
        DropReason::Invalid,
    ] {
        assert_eq!(fast_stats.dropped(reason), 1, "{reason:?}");
    }
}

/// A header that repeats the last one verified on a link skips its check only there, and only
/// byte for byte: another tag, or the same bytes on another link, is checked (and dropped),
/// however often it comes (a header is kept once seen twice in a row).
#[test]
fn a_repeated_header_is_trusted_only_on_its_link_and_only_byte_for_byte() {
    for route_from_bytes in [false, true] {
        let mut h = Harness::with_config(RouterConfig {
            route_from_bytes,
            ..RouterConfig::default()
        });
        let alice = h.connect(&app("alice", 1));
        let bob = h.connect(&app("bob", 2));
        let carol = h.connect(&app("carol", 3));
        h.subscribe(&bob, 1);
        let good = publish_msg(&alice, &bob.name, 1, b"good");
        let mut tampered = good.clone();
        flip_tag_bit(&mut tampered, 255);
        for (conn, message) in [
            (alice.conn, &good),
            (alice.conn, &good),
            (alice.conn, &tampered),
            (alice.conn, &tampered),
            (alice.conn, &tampered),
            (alice.conn, &good),
            // Alice's header, byte for byte, from another link.
            (carol.conn, &good),
            (carol.conn, &good),
        ] {
            h.send(conn, message);
        }
        assert_eq!(publishes(h.take(bob.conn)).len(), 3, "{route_from_bytes}");
        assert_eq!(h.router.stats().dropped(DropReason::MacInvalid), 5);
    }
}

/// An app's flow to several links: each link's frames carry that link's tag, first and again.
#[test]
fn a_repeated_header_sent_to_several_links_is_signed_for_each() {
    let mut h = Harness::new();
    let bob = h.connect(&app("bob", 2));
    let carol = h.connect(&app("carol", 3));
    let channel = app("chan", 77);
    for (client, sub_id) in [(&bob, 1), (&carol, 2)] {
        h.send(client.conn, &subscribe_msg(client, &channel, sub_id, true));
    }
    h.inbox.clear();
    let local = h.router.attach_local();
    for payload in [&b"one"[..], b"two", b"three"] {
        let mut message = publish_msg(&bob, &channel, 256, payload);
        header_mut(&mut message).unwrap().header_mac = None;
        h.router.handle_message(local, Box::new(message), T0);
        h.drain();
    }
    for client in [&bob, &carol] {
        let received = publishes(h.take(client.conn));
        assert_eq!(received.len(), 3);
        for (publish, payload) in received.iter().zip([&b"one"[..], b"two", b"three"]) {
            assert_eq!(blob(publish), payload);
            let header = publish.header.as_ref().unwrap();
            assert_eq!(client.mac.verify(header), Ok(()));
        }
    }
}
