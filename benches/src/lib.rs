//! Shared helpers for the criterion benchmarks in `benches/`: realistic messages (names, a
//! ~240-character identity token as real SDK clients send), a 100 000-entry subscription table,
//! and routers with edge links negotiated through the real `slim_proto::link` functions.

use bytes::Bytes;
use prost::Message as _;
use slim_core::router::{ConnId, ConnectionKind, Output, Router, RouterConfig, SubscriptionTable};
use slim_core::Timestamp;
use slim_proto::link;
use slim_proto::name::ANY_INSTANCE;
use slim_proto::pb;
use slim_proto::pb::message::MessageType;
use slim_proto::{HeaderMacKey, LinkKeyPair, Name, NameKey};

/// An identity token of the shape and size the SLIM SDK puts in `SLIMHeader.identity`
/// (taken from `shared/spec/captures/a_p2p_plain.json`, 241 characters).
pub const IDENTITY: &str = "interop/p2p/echo-ed882aa3_rjL75MG0:1795623137:gXUiPFtjz8km_Cw9:eyJwdWJrZXkiOiJCRHJLYXVKOU85enlnNlV3c1FPaDhUZ25IVWpza3QxTVdzOWRST21CaFcyZS94ZVM1YmlHQXdzUjE5andSNVgzRVc0T2Y2VXplRlZwWkMvemUzb0NpWTQ9In0:aaUp3rKNhAsJNQ6WWxOD2FAsEkfRIByYsPFJ-L1O4yk";

/// Number of subscriptions the lookup benchmarks run against.
pub const TABLE_SIZE: usize = 100_000;
/// Distinct services (`org/ns-k/svc-i`) in the big table; each has `TABLE_SIZE / SERVICES`
/// instances, each instance on its own connection.
pub const SERVICES: usize = 2_000;
/// Instances per service in the big table.
pub const INSTANCES: usize = TABLE_SIZE / SERVICES;
/// Subscribers of the multicast channel used by the `match_all` benchmark.
pub const CHANNEL_SUBSCRIBERS: usize = 10;

/// Source and destination of the benchmarked publishes (UUID-sized instance ids, as the SDK
/// derives them).
pub fn alice() -> Name {
    Name::with_id(
        "agntcy",
        "bench",
        "alice",
        0xa61b2fd7_3c25_7731_f79c_1046bd7826f4,
    )
}

pub fn bob() -> Name {
    Name::with_id(
        "agntcy",
        "bench",
        "bob",
        0xfa6a64df_62a3_63c2_4997_0d6a90202fdd,
    )
}

/// The `i`-th service of the big table.
pub fn service(i: usize) -> Name {
    Name::new(
        "agntcy",
        &format!("tenant-{}", i % 10),
        &format!("service-{i:05}"),
    )
}

/// The multicast channel of the `match_all` benchmark.
pub fn channel() -> Name {
    Name::with_id("agntcy", "bench", "channel-general", 7)
}

/// A SLIM header as an SDK client sends it (before signing).
pub fn header(source: &Name, destination: &Name, fanout: u32) -> pb::SlimHeader {
    pb::SlimHeader {
        source: Some(source.to_pb()),
        destination: Some(destination.to_pb()),
        identity: IDENTITY.into(),
        fanout,
        version: "3.4.6".into(),
        ttl: slim_proto::DEFAULT_TTL,
        ..Default::default()
    }
}

/// A point-to-point application message with `payload_len` bytes of payload.
pub fn publish(header: pb::SlimHeader, payload_len: usize) -> pb::Message {
    pb::Message {
        message_type: Some(MessageType::Publish(pb::Publish {
            header: Some(header),
            session: Some(pb::SessionHeader {
                session_type: pb::SessionType::PointToPoint as i32,
                session_message_type: pb::SessionMessageType::Msg as i32,
                session_id: 0x5e55_1011,
                message_id: 17,
            }),
            msg: Some(pb::Content {
                content_type: Some(pb::content::ContentType::AppPayload(
                    pb::ApplicationPayload {
                        payload_type: "msg".into(),
                        blob: Bytes::from(vec![0xab; payload_len]),
                    },
                )),
            }),
        })),
        metadata: Default::default(),
    }
}

/// Fills `table` with [`TABLE_SIZE`] `(connection, name)` entries: [`SERVICES`] services with
/// [`INSTANCES`] instances each, every instance on its own connection (ids `1_000..`), mostly
/// edge clients with some peers and remotes. Returns the connection subscribed to `(service 0,
/// instance 0)`.
pub fn populate_table(table: &mut SubscriptionTable) -> ConnId {
    let mut conn: ConnId = 1_000;
    for s in 0..SERVICES {
        let key = service(s).key();
        for i in 0..INSTANCES {
            let kind = match conn % 50 {
                0 => ConnectionKind::Peer,
                1 => ConnectionKind::Remote,
                _ => ConnectionKind::Edge,
            };
            table.add(conn, kind, instance_key(key, i), conn);
            conn += 1;
        }
    }
    1_000
}

/// The key of instance `i` of a service key (spread-out 128-bit ids).
pub fn instance_key(service: NameKey, i: usize) -> NameKey {
    NameKey {
        id: (i as u128 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835),
        ..service
    }
}

/// Any-instance key of a service.
pub fn any_instance(service: NameKey) -> NameKey {
    NameKey {
        id: ANY_INSTANCE,
        ..service
    }
}

/// The client side of one negotiated link.
pub struct EdgeClient {
    pub conn: ConnId,
    pub mac: HeaderMacKey,
}

impl EdgeClient {
    /// Accepts a connection on `router` and negotiates it as an SDK (EDGE) client does, with
    /// the real X25519/HKDF primitives; panics if the router's reply is not acceptable.
    pub fn connect(router: &mut Router, seed: u32) -> EdgeClient {
        let now = Timestamp::ZERO;
        let conn = router.accept_connection(now);
        let mut key_seed = [0x5a; 32];
        key_seed[..4].copy_from_slice(&seed.to_le_bytes());
        let keys = LinkKeyPair::from_seed(key_seed);
        let link_id = format!("bench-link-{seed}");
        let request =
            link::edge_client_request(format!("bench-client-{seed}"), "3.4.6", &link_id, &keys);
        let body = link::negotiation_message(request).encode_to_vec();
        router.handle_frame(conn, Bytes::from(body), now);
        let mut reply = None;
        while let Some(output) = router.poll_output() {
            if let Output::Transmit { conn: c, frame } = output {
                assert_eq!(c, conn);
                let message = pb::Message::decode(&frame[5..]).expect("reply decodes");
                reply = link::as_negotiation(&message).cloned();
            }
        }
        let reply = reply.expect("the router answers the negotiation");
        link::check_reply(&reply, &link_id, true).expect("strict client accepts the reply");
        let mac = keys.header_mac(&reply.link_ecdh_public_key, &link_id);
        EdgeClient {
            conn,
            mac: mac
                .expect("a 32-byte key")
                .expect("the router sent its key"),
        }
    }

    /// A subscribe for `name`, signed for this link (`sub_id` 0: no ack wanted).
    pub fn subscribe_body(&self, source: &Name, name: &Name, sub_id: u64) -> Bytes {
        let mut header = header(source, name, 1);
        self.mac.sign(&mut header);
        let message = pb::Message::subscription(true, header, sub_id);
        Bytes::from(message.encode_to_vec())
    }

    /// A publish from `source` to `destination`, signed for this link, as protobuf bytes.
    pub fn publish_body(
        &self,
        source: &Name,
        destination: &Name,
        fanout: u32,
        payload_len: usize,
    ) -> Bytes {
        let mut header = header(source, destination, fanout);
        self.mac.sign(&mut header);
        Bytes::from(publish(header, payload_len).encode_to_vec())
    }
}

/// Drains the router's outputs; returns how many were transmits.
pub fn drain(router: &mut Router) -> usize {
    let mut transmits = 0;
    while let Some(output) = router.poll_output() {
        if let Output::Transmit { frame, .. } = output {
            std::hint::black_box(frame);
            transmits += 1;
        }
    }
    transmits
}

/// A router with edge clients `alice` and `bob` (both subscribed to their own names) plus
/// [`TABLE_SIZE`] other subscriptions made by 1 000 further negotiated edge clients
/// (100 each: services × instances as in [`populate_table`]).
pub struct RoutedNode {
    pub router: Router,
    pub alice: EdgeClient,
    pub bob: EdgeClient,
}

impl RoutedNode {
    pub fn new() -> Self {
        let mut router = Router::new(RouterConfig::default(), [42; 32]);
        let alice_client = EdgeClient::connect(&mut router, 1);
        let bob_client = EdgeClient::connect(&mut router, 2);
        let body = alice_client.subscribe_body(&alice(), &alice(), 0);
        router.handle_frame(alice_client.conn, body, Timestamp::ZERO);
        let body = bob_client.subscribe_body(&bob(), &bob(), 0);
        router.handle_frame(bob_client.conn, body, Timestamp::ZERO);
        drain(&mut router);

        const CLIENTS: usize = 1_000;
        let clients: Vec<EdgeClient> = (0..CLIENTS)
            .map(|i| EdgeClient::connect(&mut router, 100 + i as u32))
            .collect();
        let mut n = 0usize;
        for s in 0..SERVICES {
            let name = service(s);
            for i in 0..INSTANCES {
                let client = &clients[n % CLIENTS];
                let instance = name.with_instance(instance_key(name.key(), i).id);
                let body = client.subscribe_body(&instance, &instance, 0);
                router.handle_frame(client.conn, body, Timestamp::ZERO);
                n += 1;
            }
            drain(&mut router);
        }
        assert_eq!(
            router.stats().subscriptions as usize,
            TABLE_SIZE + 2,
            "every subscription was accepted"
        );
        RoutedNode {
            router,
            alice: alice_client,
            bob: bob_client,
        }
    }
}

impl Default for RoutedNode {
    fn default() -> Self {
        Self::new()
    }
}
