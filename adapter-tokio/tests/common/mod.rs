//! A hand-written SLIM test client for the integration tests: real sockets, a real `h2` client,
//! real gRPC framing and a real link negotiation as an EDGE client (X25519 → HKDF → header MAC).
//!
//! It is deliberately low-level: every helper that sends something has a raw variant, so the
//! hostile-input tests can send exactly the bytes they want.

// Each test binary compiles this module on its own and uses a different part of it.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use prost::Message as _;
use slim_core::router::{DropReason, Stats};
use slim_proto::link;
use slim_proto::pb::{self, message::MessageType, LinkConnectionType};
use slim_proto::{encode_frame, Deframer, HeaderMacKey, LinkKeyPair, Name};
use slim_tokio::config::{NodeConfig, ServerConfig};
use slim_tokio::{Node, NodeStats};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// Upper bound for anything a test waits for. Generous: the tests must pass on a loaded machine,
/// and nothing asserts on how long something took.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// The version our clients announce (what slim-bindings 3.3.8 sends).
pub const CLIENT_VERSION: &str = "3.4.6";

/// Logs to the test output when `RUST_LOG` is set (e.g. `RUST_LOG=debug cargo test`).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// `fut`, or a panic naming `what` after [`TIMEOUT`].
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(TIMEOUT, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {TIMEOUT:?} waiting for {what}"),
    }
}

/// The test setting `name` from the environment, or `default`; a value that is not a number
/// in `range` fails the test.
pub fn env_or(name: &str, default: u64, range: std::ops::RangeInclusive<u64>) -> u64 {
    match std::env::var(name) {
        Err(_) => default,
        Ok(text) => {
            let value: u64 = text
                .parse()
                .unwrap_or_else(|_| panic!("{name}={text:?} is not a number"));
            assert!(range.contains(&value), "{name}={value} is not in {range:?}");
            value
        }
    }
}

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).expect("OS randomness");
    bytes
}

pub fn random_id() -> String {
    random_bytes::<8>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

// ------------------------------------------------------------------------------------ the node

/// A node serving plaintext HTTP/2 on an ephemeral port of 127.0.0.1.
pub async fn start_node() -> Node {
    start_node_with(|_| {}).await
}

/// Same, after `tweak` adjusted the configuration.
pub async fn start_node_with(tweak: impl FnOnce(&mut NodeConfig)) -> Node {
    init_tracing();
    let mut config = NodeConfig {
        servers: vec![ServerConfig {
            addr: "127.0.0.1:0".parse().unwrap(),
            tls: None,
        }],
        ..NodeConfig::default()
    };
    tweak(&mut config);
    Node::start(config).await.expect("node starts")
}

pub fn node_addr(node: &Node) -> SocketAddr {
    node.local_addrs()[0]
}

/// The router counters; panics if the node has stopped.
pub async fn stats(node: &Node) -> Stats {
    within("node stats", node.stats())
        .await
        .expect("the node is running")
        .router
}

/// Polls the node's router counters until `pred` holds (bounded by [`TIMEOUT`]); returns them.
pub async fn wait_for_stats(node: &Node, what: &str, pred: impl Fn(&Stats) -> bool) -> Stats {
    wait_for_node_stats(node, what, |s| pred(&s.router))
        .await
        .router
}

/// Polls all the node's counters (router and adapter) until `pred` holds.
pub async fn wait_for_node_stats(
    node: &Node,
    what: &str,
    pred: impl Fn(&NodeStats) -> bool,
) -> NodeStats {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let stats = within("node stats", node.stats())
            .await
            .expect("the node is running");
        if pred(&stats) {
            return stats;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {TIMEOUT:?} waiting for {what}; stats: {stats:#?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------- messages

/// A name with the component strings and hashes, as real clients send it.
pub fn name(text: &str) -> Name {
    Name::parse(text).expect("valid SLIM name")
}

/// A header as slim-bindings builds it (spec §1.5, captures §4): ttl 8, version, identity,
/// `incoming_conn = 1` (the client's own index; the node overwrites it).
pub fn header(source: &Name, destination: &Name, fanout: u32) -> pb::SlimHeader {
    pb::SlimHeader {
        source: Some(source.to_pb()),
        destination: Some(destination.to_pb()),
        identity: format!("identity-of-{}", source.components()[2]),
        fanout,
        version: CLIENT_VERSION.into(),
        ttl: slim_proto::DEFAULT_TTL,
        incoming_conn: Some(1),
        ..Default::default()
    }
}

/// An unsigned data publish (`MSG`, application payload `blob`).
pub fn publish_message(source: &Name, destination: &Name, fanout: u32, blob: &[u8]) -> pb::Message {
    pb::Message {
        message_type: Some(MessageType::Publish(pb::Publish {
            header: Some(header(source, destination, fanout)),
            session: Some(pb::SessionHeader {
                session_type: if fanout == 1 {
                    pb::SessionType::PointToPoint as i32
                } else {
                    pb::SessionType::Multicast as i32
                },
                session_message_type: pb::SessionMessageType::Msg as i32,
                session_id: 0x1234_5678,
                message_id: 1,
            }),
            msg: Some(pb::Content {
                content_type: Some(pb::content::ContentType::AppPayload(
                    pb::ApplicationPayload {
                        payload_type: "msg".into(),
                        blob: Bytes::copy_from_slice(blob),
                    },
                )),
            }),
        })),
        metadata: Default::default(),
    }
}

pub fn subscribe_message(source: &Name, destination: &Name, sub_id: u64) -> pb::Message {
    pb::Message {
        message_type: Some(MessageType::Subscribe(pb::Subscribe {
            header: Some(header(source, destination, 1)),
            subscription_id: sub_id,
        })),
        metadata: Default::default(),
    }
}

pub fn unsubscribe_message(source: &Name, destination: &Name, sub_id: u64) -> pb::Message {
    pb::Message {
        message_type: Some(MessageType::Unsubscribe(pb::Unsubscribe {
            header: Some(header(source, destination, 1)),
            subscription_id: sub_id,
        })),
        metadata: Default::default(),
    }
}

pub fn header_of(message: &pb::Message) -> Option<&pb::SlimHeader> {
    match message.message_type.as_ref()? {
        MessageType::Publish(p) => p.header.as_ref(),
        MessageType::Subscribe(s) => s.header.as_ref(),
        MessageType::Unsubscribe(u) => u.header.as_ref(),
        MessageType::Link(_) | MessageType::SubscriptionAck(_) => None,
    }
}

pub fn header_of_mut(message: &mut pb::Message) -> Option<&mut pb::SlimHeader> {
    match message.message_type.as_mut()? {
        MessageType::Publish(p) => p.header.as_mut(),
        MessageType::Subscribe(s) => s.header.as_mut(),
        MessageType::Unsubscribe(u) => u.header.as_mut(),
        MessageType::Link(_) | MessageType::SubscriptionAck(_) => None,
    }
}

/// The application payload of a publish.
pub fn blob_of(message: &pb::Message) -> Option<&[u8]> {
    match message.message_type.as_ref()? {
        MessageType::Publish(pb::Publish {
            msg:
                Some(pb::Content {
                    content_type: Some(pb::content::ContentType::AppPayload(payload)),
                }),
            ..
        }) => Some(&payload.blob),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------- the client

/// How a gRPC stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcStatus {
    pub code: u32,
    pub message: String,
}

/// One received message: the exact protobuf bytes and their decoding.
#[derive(Debug, Clone)]
pub struct Received {
    pub raw: Bytes,
    pub message: pb::Message,
}

/// What [`Client::next_within`] saw.
#[derive(Debug)]
pub enum Next {
    Message(Box<Received>),
    /// The node ended the response stream (its status is read with [`Client::status`]).
    End,
}

/// The negotiated link: its id and the header-MAC key both ends derived.
#[derive(Debug, Clone)]
pub struct Link {
    pub link_id: String,
    pub mac: HeaderMacKey,
    /// The raw 32-byte header-MAC key (to sign with it for another link id, in hostile tests).
    pub key: [u8; 32],
    /// What the node said about itself.
    pub reply: pb::LinkNegotiationPayload,
}

/// One OpenChannel stream on its own HTTP/2 connection.
pub struct Client {
    pub label: String,
    h2: SendRequest<Bytes>,
    connection: JoinHandle<()>,
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Set for a "Trailers-Only" response (status in the response headers).
    header_status: Option<GrpcStatus>,
    deframer: Deframer,
    queue: VecDeque<Bytes>,
    ended: bool,
    pub link: Option<Link>,
}

impl Drop for Client {
    fn drop(&mut self) {
        // Dropping the client closes its TCP connection, like a process that goes away.
        self.connection.abort();
    }
}

/// HTTP/2 handshake on `io` (TCP, TLS…). The connection task is returned so callers can drop
/// the transport at will.
pub async fn h2_handshake<T>(io: T) -> Result<(SendRequest<Bytes>, JoinHandle<()>), h2::Error>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // The window sizes slim-bindings uses (captures/README.md §1).
    let (h2, connection) = h2::client::Builder::new()
        .initial_window_size(2 * 1024 * 1024)
        .initial_connection_window_size(5 * 1024 * 1024)
        .handshake::<_, Bytes>(io)
        .await?;
    let connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok((h2, connection))
}

/// Opens a gRPC stream on `path`, with the request headers of a tonic client.
async fn open_stream(
    h2: &SendRequest<Bytes>,
    scheme: &str,
    authority: &str,
    path: &str,
) -> Result<(SendStream<Bytes>, http::Response<RecvStream>), String> {
    open_stream_with(h2, http::Method::POST, scheme, authority, path).await
}

/// Same with any HTTP method.
async fn open_stream_with(
    h2: &SendRequest<Bytes>,
    method: http::Method,
    scheme: &str,
    authority: &str,
    path: &str,
) -> Result<(SendStream<Bytes>, http::Response<RecvStream>), String> {
    let request = http::Request::builder()
        .method(method)
        .uri(format!("{scheme}://{authority}{path}"))
        .header("te", "trailers")
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::USER_AGENT, "tonic/0.14.6")
        .body(())
        .map_err(|e| e.to_string())?;
    let mut h2 = h2.clone().ready().await.map_err(|e| e.to_string())?;
    let (response, send) = h2
        .send_request(request, false)
        .map_err(|e| format!("send_request: {e}"))?;
    let response = response.await.map_err(|e| format!("response: {e}"))?;
    Ok((send, response))
}

fn status_from_headers(headers: &http::HeaderMap) -> Option<GrpcStatus> {
    let code = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    let message = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .map(percent_decode)
        .unwrap_or_default();
    Some(GrpcStatus { code, message })
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            if let Some(byte) = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Client {
    /// TCP to `addr`, HTTP/2, OpenChannel.
    pub async fn connect(addr: SocketAddr, label: &str) -> Client {
        let tcp = within("TCP connect", TcpStream::connect(addr))
            .await
            .expect("TCP connect to the node");
        tcp.set_nodelay(true).unwrap();
        Client::open(tcp, "http", &addr.to_string(), label).await
    }

    /// TCP to `addr` and a link negotiated as EDGE.
    pub async fn connect_negotiated(addr: SocketAddr, label: &str) -> Client {
        let mut client = Client::connect(addr, label).await;
        client.negotiate().await;
        client
    }

    /// HTTP/2 and OpenChannel over an already connected transport.
    pub async fn open<T>(io: T, scheme: &str, authority: &str, label: &str) -> Client
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let opened = within(
            "HTTP/2 handshake and OpenChannel",
            Client::try_open(io, scheme, authority, slim_proto::OPEN_CHANNEL_PATH, label),
        )
        .await;
        match opened {
            Ok(client) => {
                assert_eq!(
                    client.header_status, None,
                    "{label}: OpenChannel was refused in the response headers"
                );
                client
            }
            Err(error) => panic!("{label}: cannot open the channel: {error}"),
        }
    }

    /// HTTP/2 and a POST to `path`; fails if the transport or HTTP/2 does.
    pub async fn try_open<T>(
        io: T,
        scheme: &str,
        authority: &str,
        path: &str,
        label: &str,
    ) -> Result<Client, String>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (h2, connection) = h2_handshake(io)
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
        let opened = open_stream(&h2, scheme, authority, path).await;
        let (send, response) = match opened {
            Ok(opened) => opened,
            Err(error) => {
                connection.abort();
                return Err(error);
            }
        };
        let (parts, recv) = response.into_parts();
        if parts.status != http::StatusCode::OK {
            connection.abort();
            return Err(format!("HTTP status {}", parts.status));
        }
        assert_eq!(
            parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .map(|v| v.as_bytes()),
            Some(&b"application/grpc"[..]),
            "{label}: response content-type"
        );
        let header_status = status_from_headers(&parts.headers);
        Ok(Client {
            label: label.to_owned(),
            h2,
            connection,
            send,
            ended: header_status.is_some() && recv.is_end_stream(),
            recv,
            header_status,
            deframer: Deframer::new(64 * 1024 * 1024),
            queue: VecDeque::new(),
            link: None,
        })
    }

    /// Another gRPC request on this client's HTTP/2 connection; the response's status, which must
    /// come as a Trailers-Only response (for refused methods).
    pub async fn request_status(&self, path: &str) -> GrpcStatus {
        self.request_status_with(http::Method::POST, path).await
    }

    /// Same with any HTTP method.
    pub async fn request_status_with(&self, method: http::Method, path: &str) -> GrpcStatus {
        let (_send, response) = within(
            "a response",
            open_stream_with(&self.h2, method, "http", "127.0.0.1", path),
        )
        .await
        .unwrap_or_else(|e| panic!("{}: request to {path}: {e}", self.label));
        assert_eq!(response.status(), http::StatusCode::OK);
        let status = status_from_headers(response.headers())
            .unwrap_or_else(|| panic!("{}: no grpc-status in the response to {path}", self.label));
        assert!(
            response.body().is_end_stream(),
            "a Trailers-Only response ends the stream"
        );
        status
    }

    // ------------------------------------------------------------------------------ sending

    /// Sends raw bytes on the request stream (no gRPC framing added).
    pub fn send_raw(&mut self, bytes: Bytes) {
        self.send
            .send_data(bytes, false)
            .unwrap_or_else(|e| panic!("{}: send failed: {e}", self.label));
    }

    /// Sends one message, gRPC-framed, exactly as given (no signing).
    pub fn send(&mut self, message: &pb::Message) {
        self.send_raw(encode_frame(message));
    }

    /// Ends the request stream (a clean client-side close).
    pub fn finish(&mut self) {
        self.send
            .send_data(Bytes::new(), true)
            .unwrap_or_else(|e| panic!("{}: cannot end the stream: {e}", self.label));
    }

    /// Resets the stream with CANCEL, keeping the HTTP/2 connection open: what slim-bindings'
    /// `disconnect` does (captures/README.md §1).
    pub fn cancel(&mut self) {
        self.send.send_reset(h2::Reason::CANCEL);
    }

    /// Drops the TCP connection without any HTTP/2 goodbye.
    pub fn vanish(self) {
        drop(self);
    }

    pub fn mac(&self) -> &HeaderMacKey {
        &self
            .link
            .as_ref()
            .unwrap_or_else(|| panic!("{}: link not negotiated", self.label))
            .mac
    }

    /// Signs the message's header for this client's link.
    pub fn sign(&self, message: &mut pb::Message) {
        let mac = self.mac().clone();
        mac.sign(header_of_mut(message).expect("a message with a SLIM header"));
    }

    /// Signs and sends.
    pub fn send_signed(&mut self, mut message: pb::Message) -> pb::Message {
        self.sign(&mut message);
        self.send(&message);
        message
    }

    /// A signed publish from `source` to `destination`; returns exactly what was sent.
    pub fn publish(
        &mut self,
        source: &Name,
        destination: &Name,
        fanout: u32,
        blob: &[u8],
    ) -> pb::Message {
        self.send_signed(publish_message(source, destination, fanout, blob))
    }

    // ------------------------------------------------------------------------------ negotiation

    /// An EDGE negotiation request as slim-bindings builds it (not sent) and its key pair.
    pub fn negotiation_request(&self) -> (pb::LinkNegotiationPayload, LinkKeyPair) {
        let link_id = format!("test-{}-{}", self.label, random_id());
        let keys = LinkKeyPair::from_seed(random_bytes());
        let node_id = format!("node-test-{}", random_id());
        let request = link::edge_client_request(node_id, CLIENT_VERSION, &link_id, &keys);
        (request, keys)
    }

    /// Sends an EDGE negotiation request as slim-bindings does; returns the link id and key pair.
    pub fn send_negotiation(&mut self) -> (String, LinkKeyPair) {
        self.send_negotiation_with(|_| {})
    }

    /// Sends a negotiation request after `tweak` changed it; returns the link id and key pair.
    pub fn send_negotiation_with(
        &mut self,
        tweak: impl FnOnce(&mut pb::LinkNegotiationPayload),
    ) -> (String, LinkKeyPair) {
        let (mut request, keys) = self.negotiation_request();
        tweak(&mut request);
        let link_id = request.link_id.clone();
        self.send(&link::negotiation_message(request));
        (link_id, keys)
    }

    /// Negotiates the link (strict, as default clients are) and installs the header-MAC key.
    pub async fn negotiate(&mut self) -> &Link {
        let (link_id, keys) = self.send_negotiation();
        self.complete_negotiation(&link_id, &keys).await
    }

    /// Reads the node's negotiation reply to a request sent for `link_id` (strict checks) and
    /// installs the header-MAC key.
    pub async fn complete_negotiation(&mut self, link_id: &str, keys: &LinkKeyPair) -> &Link {
        let link_id = link_id.to_owned();
        let reply = self.recv().await;
        let payload = link::as_negotiation(&reply.message)
            .unwrap_or_else(|| {
                panic!(
                    "{}: expected a negotiation reply, got {:?}",
                    self.label, reply.message
                )
            })
            .clone();
        link::check_reply(&payload, &link_id, true)
            .unwrap_or_else(|e| panic!("{}: bad negotiation reply: {e}", self.label));
        assert_eq!(
            payload.connection_type,
            LinkConnectionType::Edge as i32,
            "the node echoes the connection type"
        );
        let key = keys
            .derive_mac_key(&payload.link_ecdh_public_key, &link_id)
            .expect("32-byte node key");
        self.link = Some(Link {
            mac: HeaderMacKey::new(&key, &link_id).expect("32-byte MAC key"),
            key,
            link_id,
            reply: payload,
        });
        self.link.as_ref().unwrap()
    }

    // ------------------------------------------------------------------------------ receiving

    /// The next message or the end of the response stream, `None` after `wait`.
    pub async fn next_within(&mut self, wait: Duration) -> Option<Next> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(raw) = self.queue.pop_front() {
                let message = pb::Message::decode(raw.clone()).unwrap_or_else(|e| {
                    panic!("{}: the node sent an undecodable message: {e}", self.label)
                });
                return Some(Next::Message(Box::new(Received { raw, message })));
            }
            if self.ended {
                return Some(Next::End);
            }
            let chunk = match tokio::time::timeout_at(deadline, self.recv.data()).await {
                Err(_) => return None,
                Ok(chunk) => chunk,
            };
            match chunk {
                None => {
                    self.ended = true;
                    assert!(
                        self.deframer.finish().is_ok(),
                        "{}: the node ended the stream inside a message",
                        self.label
                    );
                }
                Some(Err(error)) => panic!("{}: response stream failed: {error}", self.label),
                Some(Ok(bytes)) => {
                    let _ = self.recv.flow_control().release_capacity(bytes.len());
                    self.deframer.push(&bytes);
                    while let Some(body) = self.deframer.next_frame().unwrap_or_else(|e| {
                        panic!("{}: bad framing from the node: {e}", self.label)
                    }) {
                        self.queue.push_back(body);
                    }
                }
            }
        }
    }

    /// The next message; panics on end of stream or after [`TIMEOUT`].
    pub async fn recv(&mut self) -> Received {
        match self.next_within(TIMEOUT).await {
            Some(Next::Message(received)) => *received,
            Some(Next::End) => {
                let status = self.status().await;
                panic!(
                    "{}: stream ended while a message was expected: {status:?}",
                    self.label
                )
            }
            None => panic!(
                "{}: no message within {TIMEOUT:?} while one was expected",
                self.label
            ),
        }
    }

    /// The next message, which must be a SubscriptionAck.
    pub async fn recv_ack(&mut self) -> pb::SubscriptionAck {
        let received = self.recv().await;
        match received.message.message_type {
            Some(MessageType::SubscriptionAck(ack)) => ack,
            other => panic!("{}: expected a SubscriptionAck, got {other:?}", self.label),
        }
    }

    /// Reads to the end of the response stream; the final gRPC status (from the trailers, or from
    /// the headers of a Trailers-Only response) and the messages received before it.
    pub async fn status_and_messages(&mut self) -> (GrpcStatus, Vec<Received>) {
        let mut messages = Vec::new();
        loop {
            match self.next_within(TIMEOUT).await {
                Some(Next::Message(received)) => messages.push(*received),
                Some(Next::End) => break,
                None => panic!("{}: the stream did not end within {TIMEOUT:?}", self.label),
            }
        }
        if let Some(status) = &self.header_status {
            return (status.clone(), messages);
        }
        let trailers = within("trailers", self.recv.trailers())
            .await
            .unwrap_or_else(|e| panic!("{}: reading trailers failed: {e}", self.label))
            .unwrap_or_else(|| panic!("{}: the stream ended without trailers", self.label));
        let status = status_from_headers(&trailers)
            .unwrap_or_else(|| panic!("{}: no grpc-status in trailers {trailers:?}", self.label));
        (status, messages)
    }

    /// The final gRPC status; panics if a message arrives first.
    pub async fn status(&mut self) -> GrpcStatus {
        let (status, messages) = self.status_and_messages().await;
        assert!(
            messages.is_empty(),
            "{}: unexpected messages before the end of the stream: {:?}",
            self.label,
            messages.iter().map(|m| &m.message).collect::<Vec<_>>()
        );
        status
    }

    // ------------------------------------------------------------------------------ subscriptions

    /// Subscribes `name` (source = destination, as an app subscribing its own name) and waits for
    /// the successful ack.
    pub async fn subscribe(&mut self, name: &Name, sub_id: u64) {
        self.subscribe_as(name, name, sub_id).await;
    }

    /// Subscribes `destination` on behalf of `source` (e.g. a member joining a channel).
    pub async fn subscribe_as(&mut self, source: &Name, destination: &Name, sub_id: u64) {
        self.send_signed(subscribe_message(source, destination, sub_id));
        let ack = self.recv_ack().await;
        assert_eq!(
            ack,
            pb::SubscriptionAck {
                subscription_id: sub_id,
                success: true,
                error: String::new(),
            },
            "{}: subscribe of {destination}",
            self.label
        );
    }

    /// Unsubscribes and returns the ack.
    pub async fn unsubscribe_as(
        &mut self,
        source: &Name,
        destination: &Name,
        sub_id: u64,
    ) -> pb::SubscriptionAck {
        self.send_signed(unsubscribe_message(source, destination, sub_id));
        self.recv_ack().await
    }

    // ------------------------------------------------------------------------------ checks

    /// Asserts that `received` is the copy of `sent` the node must forward on this client's link:
    /// the same bytes, except `ttl` (one less), `header_mac` (valid for this link) and
    /// `incoming_conn` (the node's index of the ingress connection). Returns that index.
    pub fn assert_forwarded_copy(&self, sent: &pb::Message, received: &Received) -> u64 {
        let got_header = header_of(&received.message)
            .unwrap_or_else(|| panic!("{}: received {:?}", self.label, received.message));
        let incoming_conn = got_header
            .incoming_conn
            .unwrap_or_else(|| panic!("{}: the node did not set incoming_conn", self.label));
        self.mac()
            .verify(got_header)
            .unwrap_or_else(|e| panic!("{}: forwarded header MAC: {e}", self.label));
        let mut expected = sent.clone();
        let header = header_of_mut(&mut expected).expect("sent a message with a header");
        header.ttl -= 1;
        header.incoming_conn = Some(incoming_conn);
        header.recv_from = None;
        header.forward_to = None;
        self.mac().sign(header);
        let expected_bytes = expected.encode_to_vec();
        if expected_bytes != received.raw {
            panic!(
                "{}: forwarded copy differs from what was sent\n  expected {:?}\n  received {:?}",
                self.label, expected, received.message
            );
        }
        incoming_conn
    }

    /// Waits for the next message and checks it is the forwarded copy of `sent`.
    pub async fn expect_copy_of(&mut self, sent: &pb::Message) -> u64 {
        let received = self.recv().await;
        self.assert_forwarded_copy(sent, &received)
    }
}

/// Publishes from `from` (as `source`) to `to` (subscribed to `destination`) and checks that `to`'s
/// next message is the byte-exact forwarded copy.
pub async fn assert_delivers(
    from: &mut Client,
    source: &Name,
    to: &mut Client,
    destination: &Name,
    blob: &[u8],
) {
    let sent = from.publish(source, destination, 1, blob);
    let received = to.recv().await;
    to.assert_forwarded_copy(&sent, &received);
}

impl Client {
    /// Sends several messages, gRPC-framed and unsigned, in as few DATA frames as possible
    /// (chunks of about 64 KiB).
    pub fn send_batch<'a>(&mut self, messages: impl IntoIterator<Item = &'a pb::Message>) {
        let mut buf = bytes::BytesMut::new();
        for message in messages {
            buf.extend_from_slice(&encode_frame(message));
            if buf.len() >= 64 * 1024 {
                self.send_raw(buf.split().freeze());
            }
        }
        if !buf.is_empty() {
            self.send_raw(buf.freeze());
        }
    }

    /// True once the node ended the response stream (as far as this client has read).
    pub fn has_ended(&self) -> bool {
        self.ended
    }
}

// ---------------------------------------------------------------------------------- memory

/// A node with two good, negotiated clients: A subscribed to its name, B to its own. The
/// hostile-input tests break something, then check the node's reaction and that it still
/// serves A and B ([`Fixture::assert_still_routes`]).
pub struct Fixture {
    pub node: Node,
    pub a: Client,
    pub b: Client,
    pub a_name: Name,
    pub b_name: Name,
    round: u32,
}

impl Fixture {
    pub async fn new() -> Fixture {
        Fixture::with(|_| {}).await
    }

    pub async fn with(tweak: impl FnOnce(&mut NodeConfig)) -> Fixture {
        let node = start_node_with(tweak).await;
        let addr = node_addr(&node);
        let mut a = Client::connect_negotiated(addr, "A").await;
        let mut b = Client::connect_negotiated(addr, "B").await;
        let a_name = Name::with_id("org", "ns", "alice", 0xa11ce);
        let b_name = Name::with_id("org", "ns", "bob", 0xb0b);
        a.subscribe(&a_name, 11).await;
        b.subscribe(&b_name, 22).await;
        let mut fixture = Fixture {
            node,
            a,
            b,
            a_name,
            b_name,
            round: 0,
        };
        fixture.settle("the fixture").await;
        let stats = fixture.stats().await;
        assert_eq!(stats.dropped_total(), 0, "{stats:#?}");
        fixture.assert_still_routes().await;
        fixture
    }

    pub fn addr(&self) -> SocketAddr {
        node_addr(&self.node)
    }

    pub async fn stats(&self) -> Stats {
        stats(&self.node).await
    }

    pub async fn wait_for_drops(&self, reason: DropReason, count: u64) -> Stats {
        wait_for_stats(&self.node, &format!("{count} drop(s) of {reason}"), |s| {
            s.dropped(reason) >= count
        })
        .await
    }

    pub async fn wait_for_connections(&self, count: u64) -> Stats {
        wait_for_stats(&self.node, &format!("{count} open connection(s)"), |s| {
            s.connections == count
        })
        .await
    }

    /// Waits until exactly `drops` more messages were dropped than in `before`, per reason, and
    /// checks no other drop happened.
    pub async fn expect_drops(&self, before: &Stats, drops: &[(DropReason, u64)]) -> Stats {
        let what = format!("drops {drops:?}");
        let stats = wait_for_stats(&self.node, &what, |s| {
            drops
                .iter()
                .all(|(reason, n)| s.dropped(*reason) >= before.dropped(*reason) + n)
        })
        .await;
        let expected: u64 = drops.iter().map(|(_, n)| n).sum();
        assert_eq!(
            stats.dropped_total(),
            before.dropped_total() + expected,
            "exactly {drops:?} and nothing else was dropped: {stats:#?}"
        );
        stats
    }

    /// Back to the baseline: only A and B connected, only their two subscriptions.
    pub async fn settle(&self, after: &str) {
        wait_for_stats(
            &self.node,
            &format!("the baseline (2 connections, 2 subscriptions) after {after}"),
            |s| s.connections == 2 && s.subscriptions == 2,
        )
        .await;
    }

    /// The node is up, A and B are still linked and subscribed: a publish each way arrives
    /// byte-exact as the *next* message of the receiver (so nothing hostile was delivered before
    /// it), and a new client can connect and negotiate.
    pub async fn assert_still_routes(&mut self) {
        self.round += 1;
        let blob = format!("A to B, round {}", self.round);
        assert_delivers(
            &mut self.a,
            &self.a_name,
            &mut self.b,
            &self.b_name,
            blob.as_bytes(),
        )
        .await;
        let blob = format!("B to A, round {}", self.round);
        assert_delivers(
            &mut self.b,
            &self.b_name,
            &mut self.a,
            &self.a_name,
            blob.as_bytes(),
        )
        .await;
        let mut probe = Client::connect_negotiated(self.addr(), "probe").await;
        probe.finish();
        assert_eq!(probe.status().await.code, 0, "a clean close ends with OK");
    }

    /// Stops the node and checks A and B get the shutdown trailers (grpc-status 0).
    pub async fn shutdown(mut self) {
        within("node shutdown", self.node.shutdown()).await;
        assert_eq!(self.a.status().await.code, 0);
        assert_eq!(self.b.status().await.code, 0);
    }
}

/// The resident set size of this process (`VmRSS` of /proc/self/status), in bytes. The node runs
/// in-process, so this is the node plus the test's clients. 0 where /proc is not available.
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        })
        .map_or(0, |kib| kib * 1024)
}

/// Bytes as MiB, for messages.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

// ---------------------------------------------------------------------------------- raw TCP

/// Reads until the peer closes (EOF or reset), bounded by [`TIMEOUT`]; what it sent before.
pub async fn read_until_closed(tcp: &mut TcpStream, what: &str) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut received = Vec::new();
    within(what, async {
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    received
}

// ---------------------------------------------------------------------------------- raw HTTP/2

/// The client connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// HTTP/2 frame types and flags used by the raw client (RFC 9113 §6).
pub mod h2frame {
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const WINDOW_UPDATE: u8 = 0x8;
    pub const CONTINUATION: u8 = 0x9;

    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;

    /// Error codes (RFC 9113 §7).
    pub const PROTOCOL_ERROR: u32 = 0x1;
    pub const REFUSED_STREAM: u32 = 0x7;
    pub const CANCEL: u32 = 0x8;
    pub const ENHANCE_YOUR_CALM: u32 = 0xb;
}

/// One HTTP/2 frame as read off the wire.
#[derive(Debug, Clone)]
pub struct RawFrame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Bytes,
}

impl RawFrame {
    /// The error code of a RST_STREAM or GOAWAY frame.
    pub fn error_code(&self) -> Option<u32> {
        let at = match self.kind {
            h2frame::RST_STREAM => 0,
            h2frame::GOAWAY => 4,
            _ => return None,
        };
        let bytes = self.payload.get(at..at + 4)?;
        Some(u32::from_be_bytes(bytes.try_into().ok()?))
    }
}

/// Encodes one HTTP/2 frame.
pub fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    assert!(len < 1 << 24, "frame payload too long");
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// HPACK integer with an `n`-bit prefix (RFC 7541 §5.1); `first` holds the bits above the prefix.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u8, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// Appends a "literal header field without indexing, new name" without Huffman coding
/// (RFC 7541 §6.2.2): the simplest valid HPACK, no decoder state involved.
pub fn hpack_literal(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.push(0x00);
    hpack_int(out, 0, 7, name.len());
    out.extend_from_slice(name.as_bytes());
    hpack_int(out, 0, 7, value.len());
    out.extend_from_slice(value);
}

/// The header block of a tonic-like gRPC request.
pub fn grpc_request_block(method: &str, authority: &str, path: &str) -> Vec<u8> {
    let mut block = Vec::new();
    hpack_literal(&mut block, ":method", method.as_bytes());
    hpack_literal(&mut block, ":scheme", b"http");
    hpack_literal(&mut block, ":authority", authority.as_bytes());
    hpack_literal(&mut block, ":path", path.as_bytes());
    hpack_literal(&mut block, "content-type", b"application/grpc");
    hpack_literal(&mut block, "te", b"trailers");
    block
}

/// A hand-driven HTTP/2 client: writes exactly the frames a test wants (including ones the `h2`
/// crate would never send) and reads the node's frames one by one.
pub struct RawH2 {
    pub tcp: TcpStream,
    buf: bytes::BytesMut,
    pub authority: String,
}

impl RawH2 {
    /// TCP, the client preface and an empty SETTINGS frame.
    pub async fn connect(addr: SocketAddr) -> RawH2 {
        let tcp = within("TCP connect", TcpStream::connect(addr))
            .await
            .expect("TCP connect to the node");
        tcp.set_nodelay(true).unwrap();
        let mut raw = RawH2 {
            tcp,
            buf: bytes::BytesMut::new(),
            authority: addr.to_string(),
        };
        let mut hello = H2_PREFACE.to_vec();
        hello.extend(h2_frame(h2frame::SETTINGS, 0, 0, &[]));
        raw.write(&hello).await.expect("write the preface");
        raw
    }

    pub async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.tcp.write_all(bytes).await
    }

    pub async fn send_frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        payload: &[u8],
    ) -> std::io::Result<()> {
        self.write(&h2_frame(kind, flags, stream, payload)).await
    }

    /// Opens a gRPC request on `stream` (HEADERS with END_HEADERS, not END_STREAM).
    pub fn open_frame(&self, stream: u32, method: &str, path: &str) -> Vec<u8> {
        let block = grpc_request_block(method, &self.authority, path);
        h2_frame(h2frame::HEADERS, h2frame::END_HEADERS, stream, &block)
    }

    /// The next frame; `Ok(None)` when the node closed the connection, `Err(())` after `wait`.
    /// SETTINGS (not ACK) from the node are acknowledged, as any client must.
    pub async fn next_frame(&mut self, wait: Duration) -> Result<Option<RawFrame>, ()> {
        use tokio::io::AsyncReadExt;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if self.buf.len() >= 9 {
                let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
                if self.buf.len() >= 9 + len {
                    let head = self.buf.split_to(9);
                    let payload = self.buf.split_to(len).freeze();
                    let frame = RawFrame {
                        kind: head[3],
                        flags: head[4],
                        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]])
                            & 0x7fff_ffff,
                        payload,
                    };
                    if frame.kind == h2frame::SETTINGS && frame.flags & h2frame::ACK == 0 {
                        let _ = self
                            .send_frame(h2frame::SETTINGS, h2frame::ACK, 0, &[])
                            .await;
                    }
                    return Ok(Some(frame));
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            match tokio::time::timeout_at(deadline, self.tcp.read(&mut chunk)).await {
                Err(_) => return Err(()),
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(None),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Every frame until the node closes the connection or is silent for `quiet`.
    pub async fn frames_until_quiet(&mut self, quiet: Duration) -> (Vec<RawFrame>, bool) {
        let mut frames = Vec::new();
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            if tokio::time::Instant::now() >= deadline {
                return (frames, false);
            }
            match self.next_frame(quiet).await {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => return (frames, true),
                Err(()) => return (frames, false),
            }
        }
    }
}
