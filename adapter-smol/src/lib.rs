//! smol driver for the SLIM cores: a client's link to a SLIM node.
//!
//! Like the reference SDK, a client runs its own router core: the application is a local
//! connection of it, and the node is reached over one Edge link (negotiated, header-MAC signed).
//! This crate drives that core with smol — sockets, timers and tasks — and holds no protocol logic.
//! h2 runs on smol through `tokio_util::compat`; no tokio runtime is started.
//!
//! ```no_run
//! # fn main() -> Result<(), slim_smol::ClientError> {
//! use slim_proto::Name;
//! smol::block_on(async {
//!     let me = Name::with_id("org", "ns", "alice", 1);
//!     let client = slim_smol::Client::connect("127.0.0.1:46357".parse().unwrap(), me.clone()).await?;
//!     client.subscribe(&me).await?;
//!     client.publish(&Name::with_id("org", "ns", "bob", 2), b"hello".to_vec()).await?;
//!     let message = client.recv().await?;
//!     println!("{} sent {:?}", message.source, message.payload);
//!     Ok(())
//! })
//! # }
//! ```

use std::future::poll_fn;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_lite::future;
use h2::{RecvStream, SendStream};
use prost::Message as _;
use slim_core::router::{ConnId, ConnectionKind, Output, Router, RouterConfig};
use slim_core::Timestamp;
use slim_proto::pb::message::MessageType;
use slim_proto::{pb, Deframer, Name};
use smol::channel::{self, Receiver, Sender};
use tokio_util::compat::FuturesAsyncReadCompatExt;

/// Errors of the client API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("the node refused the link: {0}")]
    Refused(String),
    #[error("the link to the node is closed")]
    Closed,
    #[error("the node refused the subscription: {0}")]
    Subscription(String),
    #[error("no answer from the node within {0:?}")]
    Timeout(Duration),
}

/// A message delivered to this client.
#[derive(Debug, Clone)]
pub struct Received {
    pub source: Name,
    pub payload: Vec<u8>,
}

enum Command {
    Subscribe {
        name: Name,
        reply: Sender<Result<(), String>>,
    },
    Publish {
        to: Name,
        payload: Vec<u8>,
    },
}

/// A connected client. Dropping it closes the link.
pub struct Client {
    name: Name,
    commands: Sender<Command>,
    inbox: Receiver<Result<Received, ClientError>>,
    _driver: smol::Task<()>,
}

const NEGOTIATION_WAIT: Duration = Duration::from_secs(10);
const ACK_WAIT: Duration = Duration::from_secs(10);

impl Client {
    /// Connects to a node (plaintext HTTP/2) and negotiates the link.
    pub async fn connect(addr: SocketAddr, name: Name) -> Result<Client, ClientError> {
        let connect_error = |reason: String| ClientError::Connect { addr, reason };
        let tcp = smol::net::TcpStream::connect(addr)
            .await
            .map_err(|e| connect_error(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let (h2, connection) = h2::client::handshake(tcp.compat())
            .await
            .map_err(|e| connect_error(format!("HTTP/2 handshake: {e}")))?;
        smol::spawn(async move {
            let _ = connection.await;
        })
        .detach();
        let request =
            http::Request::post(format!("http://{addr}{}", slim_proto::OPEN_CHANNEL_PATH))
                .header(http::header::CONTENT_TYPE, "application/grpc")
                .header("te", "trailers")
                .body(())
                .map_err(|e| connect_error(e.to_string()))?;
        let mut h2 = h2.ready().await.map_err(|e| connect_error(e.to_string()))?;
        let (response, send) = h2
            .send_request(request, false)
            .map_err(|e| connect_error(e.to_string()))?;
        let response = response
            .await
            .map_err(|e| connect_error(format!("OpenChannel: {e}")))?;
        if response.status() != http::StatusCode::OK {
            return Err(connect_error(format!(
                "OpenChannel answered HTTP {}",
                response.status()
            )));
        }

        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| connect_error(format!("no OS randomness: {e}")))?;
        let mut router = Router::new(
            RouterConfig {
                node_id: format!("client-{name}"),
                ..RouterConfig::default()
            },
            seed,
        );
        let clock = Clock::new();
        let link_id = format!(
            "{:032x}",
            u128::from_le_bytes(seed[..16].try_into().unwrap_or_default())
        );
        let uplink = router.dial_connection(link_id, ConnectionKind::Edge, clock.now());
        let app = router.attach_local();
        let (commands, command_rx) = channel::bounded(1024);
        let (inbox_tx, inbox) = channel::bounded(1024);
        let (ready_tx, ready_rx) = channel::bounded(1);
        let driver = Driver {
            router,
            clock,
            uplink,
            app,
            send,
            next_sub_id: u64::from_le_bytes(seed[16..24].try_into().unwrap_or_default()) | 1,
            pending_subs: Vec::new(),
            inbox: inbox_tx,
            ready: Some(ready_tx),
            source: name.clone(),
        };
        let task = smol::spawn(driver.run(response.into_body(), command_rx));
        match with_timeout(NEGOTIATION_WAIT, ready_rx.recv()).await {
            Some(Ok(Ok(()))) => Ok(Client {
                name,
                commands,
                inbox,
                _driver: task,
            }),
            Some(Ok(Err(reason))) => Err(ClientError::Refused(reason)),
            Some(Err(_)) => Err(ClientError::Closed),
            None => Err(ClientError::Timeout(NEGOTIATION_WAIT)),
        }
    }

    pub fn name(&self) -> &Name {
        &self.name
    }

    /// Makes `name` reachable through the node; returns once the node acknowledged it.
    pub async fn subscribe(&self, name: &Name) -> Result<(), ClientError> {
        let (reply, answer) = channel::bounded(1);
        self.commands
            .send(Command::Subscribe {
                name: name.clone(),
                reply,
            })
            .await
            .map_err(|_| ClientError::Closed)?;
        match with_timeout(ACK_WAIT, answer.recv()).await {
            Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(error))) => Err(ClientError::Subscription(error)),
            Some(Err(_)) => Err(ClientError::Closed),
            None => Err(ClientError::Timeout(ACK_WAIT)),
        }
    }

    /// Sends `payload` to `to` (one receiver; any instance when `to` has no instance id).
    pub async fn publish(&self, to: &Name, payload: Vec<u8>) -> Result<(), ClientError> {
        self.commands
            .send(Command::Publish {
                to: to.clone(),
                payload,
            })
            .await
            .map_err(|_| ClientError::Closed)
    }

    /// The next message for this client.
    pub async fn recv(&self) -> Result<Received, ClientError> {
        self.inbox.recv().await.map_err(|_| ClientError::Closed)?
    }
}

async fn with_timeout<T>(limit: Duration, work: impl std::future::Future<Output = T>) -> Option<T> {
    future::or(async { Some(work.await) }, async {
        smol::Timer::after(limit).await;
        None
    })
    .await
}

struct Clock {
    origin: Instant,
}

impl Clock {
    fn new() -> Self {
        Self {
            origin: Instant::now(),
        }
    }
    fn now(&self) -> Timestamp {
        Timestamp::from_micros(self.origin.elapsed().as_micros() as u64)
    }
    fn to_instant(&self, at: Timestamp) -> Instant {
        self.origin + Duration::from_micros(at.as_micros())
    }
}

struct Driver {
    router: Router,
    clock: Clock,
    uplink: ConnId,
    app: ConnId,
    send: SendStream<Bytes>,
    next_sub_id: u64,
    pending_subs: Vec<(u64, Sender<Result<(), String>>)>,
    inbox: Sender<Result<Received, ClientError>>,
    ready: Option<Sender<Result<(), String>>>,
    source: Name,
}

enum Wake {
    Timer,
    Net(Option<Result<Bytes, h2::Error>>),
    App(Option<Command>),
}

impl Driver {
    /// drain → arm the timer → wait for exactly one input, until the link ends.
    async fn run(mut self, mut recv: RecvStream, commands: Receiver<Command>) {
        let mut deframer = Deframer::default();
        loop {
            if let Err(reason) = self.drain().await {
                self.fail(reason).await;
                return;
            }
            let deadline = self
                .router
                .poll_timeout()
                .map(|(at, _)| self.clock.to_instant(at));
            let timer = async {
                match deadline {
                    Some(at) => {
                        smol::Timer::at(at).await;
                    }
                    None => future::pending::<()>().await,
                }
                Wake::Timer
            };
            let net = async { Wake::Net(recv.data().await) };
            let app = async { Wake::App(commands.recv().await.ok()) };
            match future::or(timer, future::or(net, app)).await {
                Wake::Timer => self.router.handle_timeout(self.clock.now()),
                Wake::Net(None) => return self.fail("the node ended the stream".into()).await,
                Wake::Net(Some(Err(error))) => return self.fail(error.to_string()).await,
                Wake::Net(Some(Ok(chunk))) => {
                    let _ = recv.flow_control().release_capacity(chunk.len());
                    deframer.push(&chunk);
                    loop {
                        match deframer.next_frame() {
                            Ok(Some(body)) => {
                                self.router
                                    .handle_frame(self.uplink, body, self.clock.now())
                            }
                            Ok(None) => break,
                            Err(error) => return self.fail(error.to_string()).await,
                        }
                    }
                }
                Wake::App(None) => {
                    let _ = self.send.send_data(Bytes::new(), true);
                    return;
                }
                Wake::App(Some(command)) => self.command(command),
            }
        }
    }

    fn command(&mut self, command: Command) {
        let message = match command {
            Command::Subscribe { name, reply } => {
                let sub_id = self.next_sub_id;
                self.next_sub_id = self.next_sub_id.wrapping_add(2);
                self.pending_subs.push((sub_id, reply));
                let header = self.header(&name, 1, Some(self.uplink));
                MessageType::Subscribe(pb::Subscribe {
                    header: Some(header),
                    subscription_id: sub_id,
                })
            }
            Command::Publish { to, payload } => MessageType::Publish(pb::Publish {
                header: Some(self.header(&to, 1, None)),
                session: Some(pb::SessionHeader::default()),
                msg: Some(pb::Content {
                    content_type: Some(pb::content::ContentType::AppPayload(
                        pb::ApplicationPayload {
                            payload_type: "msg".into(),
                            blob: payload.into(),
                        },
                    )),
                }),
            }),
        };
        let message = pb::Message {
            message_type: Some(message),
            metadata: Default::default(),
        };
        self.router.handle_frame(
            self.app,
            Bytes::from(message.encode_to_vec()),
            self.clock.now(),
        );
    }

    fn header(
        &self,
        destination: &Name,
        fanout: u32,
        forward_to: Option<ConnId>,
    ) -> pb::SlimHeader {
        pb::SlimHeader {
            source: Some(self.source.to_pb()),
            destination: Some(destination.to_pb()),
            fanout,
            version: env!("CARGO_PKG_VERSION").into(),
            ttl: slim_proto::DEFAULT_TTL,
            forward_to,
            ..Default::default()
        }
    }

    async fn drain(&mut self) -> Result<(), String> {
        while let Some(output) = self.router.poll_output() {
            match output {
                Output::Transmit { conn, frame } if conn == self.uplink => {
                    send_all(&mut self.send, frame)
                        .await
                        .map_err(|e| format!("write to node: {e}"))?;
                }
                Output::Transmit { frame, .. } => self.deliver(&frame).await,
                Output::Close { reason, .. } => return Err(reason),
                Output::Event(slim_core::router::RouterEvent::LinkEstablished { .. }) => {
                    if let Some(ready) = self.ready.take() {
                        let _ = ready.send(Ok(())).await;
                    }
                }
                Output::Event(_) => {}
            }
        }
        Ok(())
    }

    /// A frame the router routed to the application.
    async fn deliver(&mut self, frame: &Bytes) {
        let mut deframer = Deframer::default();
        deframer.push(frame);
        let Ok(Some(body)) = deframer.next_frame() else {
            return;
        };
        let Ok(message) = pb::Message::decode(body) else {
            return;
        };
        match message.message_type {
            Some(MessageType::SubscriptionAck(ack)) => {
                if let Some(pos) = self
                    .pending_subs
                    .iter()
                    .position(|(id, _)| *id == ack.subscription_id)
                {
                    let (_, reply) = self.pending_subs.swap_remove(pos);
                    let result = if ack.success { Ok(()) } else { Err(ack.error) };
                    let _ = reply.send(result).await;
                }
            }
            Some(MessageType::Publish(publish)) => {
                let source = publish
                    .header
                    .as_ref()
                    .and_then(|h| h.source.as_ref())
                    .and_then(Name::from_pb);
                let payload = match publish.msg.and_then(|c| c.content_type) {
                    Some(pb::content::ContentType::AppPayload(app)) => app.blob.to_vec(),
                    _ => return,
                };
                if let Some(source) = source {
                    let _ = self.inbox.send(Ok(Received { source, payload })).await;
                }
            }
            _ => {}
        }
    }

    async fn fail(&mut self, reason: String) {
        tracing::info!(%reason, "link to node ended");
        if let Some(ready) = self.ready.take() {
            let _ = ready.send(Err(reason)).await;
        }
        self.inbox.close();
    }
}

/// Sends within the peer's flow-control window.
async fn send_all(send: &mut SendStream<Bytes>, mut data: Bytes) -> Result<(), h2::Error> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let capacity = match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(n)) => n,
            Some(Err(error)) => return Err(error),
            None => return Err(h2::Error::from(h2::Reason::STREAM_CLOSED)),
        };
        if capacity > 0 {
            send.send_data(data.split_to(capacity.min(data.len())), false)?;
        }
    }
    Ok(())
}
