//! A client's link to a SLIM node, on smol: raw data-plane messaging (subscribe, publish,
//! receive). The session layer ([`crate::session`]) builds on it.
//!
//! Like the reference SDK, a client runs its own router core: the application is a local
//! connection of it, and the node is reached over one Edge link (negotiated, header-MAC signed).
//! One smol task drives that core; it holds no protocol logic. When the link to the node is
//! lost, the client redials (100 ms, doubling up to 2 s) and makes its subscriptions again,
//! as the tokio client does.
//!
//! ```no_run
//! # fn main() -> Result<(), slim_smol::ClientError> {
//! use slim_proto::Name;
//! smol::block_on(async {
//!     let me = Name::with_id("org", "ns", "alice", 1);
//!     let client = slim_smol::Client::connect("127.0.0.1:46357", me.clone()).await?;
//!     client.subscribe(&me).await?;
//!     client.publish(&Name::new("org", "ns", "bob"), b"hello".to_vec()).await?;
//!     let message = client.recv().await?;
//!     println!("{} sent {} bytes", message.source, message.payload.len());
//!     Ok(())
//! })
//! # }
//! ```

use std::collections::HashMap;
use std::future::poll_fn;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_lite::future;
use h2::{RecvStream, SendStream};
use slim_core::router::{ConnId, ConnectionKind, Output, Router, RouterConfig, RouterEvent};
use slim_proto::pb::message::MessageType;
use slim_proto::{pb, Deframer, Name, NameKey};
use smol::channel::{self, Receiver, Sender, TrySendError};
use tokio_util::compat::FuturesAsyncReadCompatExt;

use crate::clock::Clock;
use crate::{with_timeout, CoreTimer};

const LINK_WAIT: Duration = Duration::from_secs(10);
const ACK_WAIT: Duration = Duration::from_secs(10);
/// Messages for the application waiting to be read; beyond it the driver drops (as the tokio
/// node does for a slow local connection) rather than stall the link.
const INBOX: usize = 4096;
const COMMANDS: usize = 1024;
/// HTTP/2 receive windows, as the tokio adapter.
const WINDOW: u32 = 1024 * 1024;
/// First and largest wait between redials after the link to the node is lost.
const REDIAL_FIRST: Duration = Duration::from_millis(100);
const REDIAL_MAX: Duration = Duration::from_secs(2);

pub use slim_core::client::ClientError;
pub use slim_proto::Received;

type Reply = Sender<Result<(), ClientError>>;

enum Command {
    /// Subscribe (`true`) or unsubscribe (`false`) `name`, and report the node's ack.
    Subscription {
        name: Name,
        subscribe: bool,
        reply: Reply,
    },
    /// A message from the application (handed to the router as it is, never encoded).
    Message(Box<pb::Message>),
}

/// A connected client. It redials and re-subscribes when the link to the node is lost.
/// Dropping it closes the link.
pub struct Client {
    name: Name,
    commands: Sender<Command>,
    inbox: Receiver<Box<pb::Message>>,
    reconnects: Arc<AtomicU64>,
    inbox_drops: Arc<AtomicU64>,
    _driver: smol::Task<()>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("name", &self.name.to_string())
            .field("reconnects", &self.reconnects())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to a node at `endpoint` (`host:port` or `http://host:port`, plaintext HTTP/2)
    /// and negotiates the link. `name` is this client's name, with its instance id.
    pub async fn connect(endpoint: &str, name: Name) -> Result<Client, ClientError> {
        let connect_error = |reason: String| ClientError::Connect {
            endpoint: endpoint.to_owned(),
            reason,
        };
        let authority = endpoint
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        if authority.contains("://") {
            return Err(connect_error(
                "only plaintext http:// endpoints are supported".into(),
            ));
        }
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| connect_error(format!("no OS randomness: {e}")))?;
        // The first link is made here so that a node that is not there is an error at once.
        let streams = open_channel(&authority).await.map_err(connect_error)?;

        let mut router = Router::new(
            RouterConfig {
                node_id: format!("client-{name}"),
                slim_version: crate::SLIM_VERSION.to_owned(),
                // What a client receives is for its apps, which take decoded messages.
                route_from_bytes: false,
                ..RouterConfig::default()
            },
            seed,
        );
        let clock = Clock::new();
        let link_id = format!(
            "{:032x}",
            u128::from_le_bytes(seed[..16].try_into().unwrap_or_default())
        );
        let app = router.attach_local();
        let (commands, command_rx) = channel::bounded(COMMANDS);
        let (inbox_tx, inbox) = channel::bounded(INBOX);
        let (ready_tx, ready_rx) = channel::bounded(1);
        let reconnects = Arc::new(AtomicU64::new(0));
        let inbox_drops = Arc::new(AtomicU64::new(0));
        let mut driver = Driver {
            router,
            clock,
            app,
            authority,
            link_id,
            link: None,
            dialing: None,
            redial_at: None,
            pause: REDIAL_FIRST,
            next_sub_id: u64::from_le_bytes(seed[16..24].try_into().unwrap_or_default()) | 1,
            pending_subs: Vec::new(),
            subscriptions: HashMap::new(),
            deferred: Vec::new(),
            inbox: inbox_tx,
            inbox_drops: inbox_drops.clone(),
            ready: Some(ready_tx),
            reconnects: reconnects.clone(),
            source: name.clone(),
        };
        driver.link_up(streams);
        let task = smol::spawn(driver.run(command_rx));
        match with_timeout(LINK_WAIT, ready_rx.recv()).await {
            Some(Ok(Ok(()))) => Ok(Client {
                name,
                commands,
                inbox,
                reconnects,
                inbox_drops,
                _driver: task,
            }),
            Some(Ok(Err(error))) => Err(error),
            Some(Err(_)) => Err(ClientError::Closed),
            None => Err(ClientError::Timeout(LINK_WAIT)),
        }
    }

    pub fn name(&self) -> &Name {
        &self.name
    }

    /// How many times the link to the node was lost and made again.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// Messages this client dropped because the application did not read them in time (its
    /// inbox was full).
    pub fn dropped(&self) -> u64 {
        self.inbox_drops.load(Ordering::Relaxed)
    }

    /// Makes `name` reachable through the node; returns once the node acknowledged it. The
    /// subscription is made again whenever the link is; while the link is down, it waits for
    /// the next one (up to the ack timeout).
    pub async fn subscribe(&self, name: &Name) -> Result<(), ClientError> {
        self.subscription(name, true).await
    }

    /// Drops a subscription made with [`Client::subscribe`]; returns once the node acknowledged
    /// (at once while the link is down: the next link will not have it).
    pub async fn unsubscribe(&self, name: &Name) -> Result<(), ClientError> {
        self.subscription(name, false).await
    }

    async fn subscription(&self, name: &Name, subscribe: bool) -> Result<(), ClientError> {
        let (reply, answer) = channel::bounded(1);
        self.commands
            .send(Command::Subscription {
                name: name.clone(),
                subscribe,
                reply,
            })
            .await
            .map_err(|_| ClientError::Closed)?;
        match with_timeout(ACK_WAIT, answer.recv()).await {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(ClientError::Closed),
            None => Err(ClientError::Timeout(ACK_WAIT)),
        }
    }

    /// Sends `payload` to one receiver of `to` (any instance when `to` has no instance id).
    pub async fn publish(&self, to: &Name, payload: impl Into<Bytes>) -> Result<(), ClientError> {
        self.publish_fanout(to, 1, payload).await
    }

    /// Sends `payload` with an explicit fanout: 1 reaches one receiver, anything else all of them.
    pub async fn publish_fanout(
        &self,
        to: &Name,
        fanout: u32,
        payload: impl Into<Bytes>,
    ) -> Result<(), ClientError> {
        let message = pb::Message::app_publish(
            pb::SlimHeader::from_app(&self.name, to, fanout, None, crate::SLIM_VERSION),
            pb::SessionHeader::default(),
            payload.into(),
        );
        self.send_message(message).await
    }

    /// The next application message for this client (messages without an application payload,
    /// e.g. session control messages, are skipped: use [`Client::recv_message`] for those).
    pub async fn recv(&self) -> Result<Received, ClientError> {
        loop {
            if let Some(received) = self.recv_message().await?.into_app_payload() {
                return Ok(received);
            }
        }
    }

    /// The next publish delivered to this client, as it came off the wire.
    ///
    /// Cancel-safe: a message is only taken when the future completes.
    pub async fn recv_message(&self) -> Result<Box<pb::Message>, ClientError> {
        self.inbox.recv().await.map_err(|_| ClientError::Closed)
    }

    /// Sends a complete message (e.g. one built by a session layer) through the node. While
    /// the link is being made again, the client's router drops it.
    pub async fn send_message(
        &self,
        message: impl Into<Box<pb::Message>>,
    ) -> Result<(), ClientError> {
        self.commands
            .send(Command::Message(message.into()))
            .await
            .map_err(|_| ClientError::Closed)
    }
}

type Streams = (RecvStream, SendStream<Bytes>);

/// Dials `authority` (host:port, plaintext HTTP/2) and opens the OpenChannel stream. h2 runs
/// on the smol socket through `tokio_util::compat`; its connection task is spawned on smol.
async fn open_channel(authority: &str) -> Result<Streams, String> {
    let tcp = smol::net::TcpStream::connect(authority)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (h2, connection) = h2::client::Builder::new()
        .initial_window_size(WINDOW)
        .initial_connection_window_size(WINDOW)
        .handshake::<_, Bytes>(tcp.compat())
        .await
        .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    smol::spawn(async move {
        let _ = connection.await;
    })
    .detach();
    let request = http::Request::post(format!(
        "http://{authority}{}",
        slim_proto::OPEN_CHANNEL_PATH
    ))
    .header(http::header::CONTENT_TYPE, "application/grpc")
    .header("te", "trailers")
    .body(())
    .map_err(|e| e.to_string())?;
    let mut h2 = h2.ready().await.map_err(|e| e.to_string())?;
    let (response, send) = h2.send_request(request, false).map_err(|e| e.to_string())?;
    let response = response.await.map_err(|e| format!("OpenChannel: {e}"))?;
    if response.status() != http::StatusCode::OK {
        return Err(format!("OpenChannel answered HTTP {}", response.status()));
    }
    if let Some(status) = response.headers().get("grpc-status") {
        return Err(format!("OpenChannel refused with grpc-status {status:?}"));
    }
    Ok((response.into_body(), send))
}

/// One link to the node: its connection in the router and its HTTP/2 stream.
struct Link {
    conn: ConnId,
    established: bool,
    recv: RecvStream,
    send: SendStream<Bytes>,
    deframer: Deframer,
}

/// Why a link ended.
enum Loss {
    /// The router closed it (negotiation refused or timed out).
    Refused(String),
    /// The stream ended or failed.
    Lost(String),
}

struct PendingSub {
    sub_id: u64,
    reply: Reply,
    /// A subscription to record (and make again on every new link) once it is acked.
    record: Option<Name>,
}

struct Driver {
    router: Router,
    clock: Clock,
    app: ConnId,
    authority: String,
    link_id: String,
    link: Option<Link>,
    /// A redial under way.
    dialing: Option<smol::Task<Result<Streams, String>>>,
    redial_at: Option<Instant>,
    pause: Duration,
    next_sub_id: u64,
    pending_subs: Vec<PendingSub>,
    /// Acked subscriptions, with their ids: to unsubscribe and to make them again.
    subscriptions: HashMap<NameKey, (Name, u64)>,
    /// Subscriptions asked for while there is no link.
    deferred: Vec<(Name, Reply)>,
    inbox: Sender<Box<pb::Message>>,
    inbox_drops: Arc<AtomicU64>,
    /// `connect` waiting for the first link.
    ready: Option<Sender<Result<(), ClientError>>>,
    reconnects: Arc<AtomicU64>,
    source: Name,
}

enum Wake {
    Timer,
    Net(Option<Result<Bytes, h2::Error>>),
    Dialed(Result<Streams, String>),
    App(Option<Command>),
}

impl Driver {
    /// drain → arm the timer (moved only earlier: [`slim_core::TimerSlot`]) → wait for exactly one input, until the client is dropped (or its
    /// first link fails).
    async fn run(mut self, commands: Receiver<Command>) {
        let mut flip = false;
        let mut timer = CoreTimer::new();
        loop {
            if let Err(loss) = self.drain().await {
                if !self.lose_link(loss) {
                    return;
                }
                continue;
            }
            let router_deadline = self
                .router
                .poll_timeout()
                .map(|(at, _)| self.clock.to_instant(at));
            let deadline = match (router_deadline, self.redial_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            timer.arm(deadline);
            let fired = async {
                timer.fired().await;
                Wake::Timer
            };
            let (link, dialing) = (&mut self.link, &mut self.dialing);
            let net = async {
                match link {
                    Some(link) => Wake::Net(link.recv.data().await),
                    None => future::pending().await,
                }
            };
            let dialed = async {
                match dialing {
                    Some(task) => Wake::Dialed(task.await),
                    None => future::pending().await,
                }
            };
            let app = async { Wake::App(commands.recv().await.ok()) };
            flip = !flip;
            let wake = future::or(
                fired,
                crate::either_first(flip, future::or(net, dialed), app),
            )
            .await;
            let now = self.clock.now();
            match wake {
                Wake::Timer => {
                    if self.redial_at.is_some_and(|at| at <= Instant::now()) {
                        self.redial_at = None;
                        let authority = self.authority.clone();
                        self.dialing =
                            Some(smol::spawn(async move { open_channel(&authority).await }));
                    }
                    self.router.handle_timeout(now);
                }
                Wake::Net(None) => {
                    if !self.lose_link(Loss::Lost("the node ended the stream".into())) {
                        return;
                    }
                }
                Wake::Net(Some(Err(error))) => {
                    if !self.lose_link(Loss::Lost(error.to_string())) {
                        return;
                    }
                }
                Wake::Net(Some(Ok(chunk))) => {
                    if let Err(error) = self.received(&chunk) {
                        if !self.lose_link(Loss::Lost(error)) {
                            return;
                        }
                    }
                }
                Wake::Dialed(result) => {
                    self.dialing = None;
                    match result {
                        Ok(streams) => self.link_up(streams),
                        Err(error) => {
                            tracing::debug!(%error, "redial failed");
                            self.schedule_redial();
                        }
                    }
                }
                Wake::App(None) => {
                    // The client was dropped: end the stream politely.
                    if let Some(link) = &mut self.link {
                        let _ = link.send.send_data(Bytes::new(), true);
                    }
                    return;
                }
                Wake::App(Some(command)) => self.command(command),
            }
        }
    }

    /// A new stream to the node: the router negotiates the link on it.
    fn link_up(&mut self, (recv, send): Streams) {
        let conn = self.router.dial_connection(
            self.link_id.clone(),
            ConnectionKind::Edge,
            self.clock.now(),
        );
        self.link = Some(Link {
            conn,
            established: false,
            recv,
            send,
            deframer: Deframer::new(slim_proto::DEFAULT_MAX_MESSAGE_SIZE),
        });
    }

    /// The link is gone. Before the first link was up that ends the client (`connect` reports
    /// it); afterwards it is redialled. Returns whether the driver goes on.
    fn lose_link(&mut self, loss: Loss) -> bool {
        let (reason, error) = match loss {
            Loss::Refused(reason) => (reason.clone(), ClientError::Refused(reason)),
            Loss::Lost(reason) => (reason, ClientError::Closed),
        };
        if let Some(link) = self.link.take() {
            self.router
                .handle_connection_closed(link.conn, self.clock.now());
        }
        if let Some(ready) = self.ready.take() {
            tracing::info!(%reason, "link to node failed");
            let _ = ready.try_send(Err(error));
            self.inbox.close();
            return false;
        }
        tracing::warn!(endpoint = %self.authority, %reason, "link to the node lost: redialling");
        // In-flight subscriptions go again on the next link; unsubscriptions are done (the
        // next link will not have them).
        for pending in std::mem::take(&mut self.pending_subs) {
            match pending.record {
                Some(name) => self.deferred.push((name, pending.reply)),
                None => {
                    let _ = pending.reply.try_send(Ok(()));
                }
            }
        }
        self.schedule_redial();
        true
    }

    fn schedule_redial(&mut self) {
        self.redial_at = Some(Instant::now() + self.pause);
        self.pause = (self.pause * 2).min(REDIAL_MAX);
    }

    /// Bytes from the node.
    fn received(&mut self, chunk: &Bytes) -> Result<(), String> {
        let Some(link) = &mut self.link else {
            return Ok(());
        };
        // Or h2 stalls the node once the window is used up.
        let _ = link.recv.flow_control().release_capacity(chunk.len());
        link.deframer.push_bytes(chunk.clone());
        loop {
            match link.deframer.next_frame() {
                Ok(Some(body)) => self.router.handle_frame(link.conn, body, self.clock.now()),
                Ok(None) => return Ok(()),
                Err(error) => return Err(error.to_string()),
            }
        }
    }

    /// The established link's connection, if any.
    fn uplink(&self) -> Option<ConnId> {
        self.link
            .as_ref()
            .filter(|link| link.established)
            .map(|link| link.conn)
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Subscription {
                name,
                subscribe: true,
                reply,
            } => {
                if self.uplink().is_some() {
                    let sub_id = self.next_sub_id;
                    self.next_sub_id = self.next_sub_id.wrapping_add(2);
                    self.subscription(&name, sub_id, true, Some(reply), true);
                } else {
                    self.deferred.push((name, reply));
                }
            }
            Command::Subscription {
                name,
                subscribe: false,
                reply,
            } => match self.subscriptions.remove(&name.key()) {
                Some((_, sub_id)) => self.subscription(&name, sub_id, false, Some(reply), false),
                None => {
                    let _ = reply.try_send(Err(ClientError::Subscription(format!(
                        "{name} is not subscribed"
                    ))));
                }
            },
            Command::Message(message) => {
                self.router
                    .handle_message(self.app, message, self.clock.now());
            }
        }
    }

    /// (Un)subscribes through our router: it records the route to the application and, with
    /// a link, forwards the request to the node and its ack back.
    fn subscription(
        &mut self,
        name: &Name,
        sub_id: u64,
        subscribe: bool,
        reply: Option<Reply>,
        record: bool,
    ) {
        if let Some(reply) = reply {
            // Forget waiters that gave up (timed out) before their ack came.
            self.pending_subs.retain(|p| !p.reply.is_closed());
            self.pending_subs.push(PendingSub {
                sub_id,
                reply,
                record: record.then(|| name.clone()),
            });
        }
        let header =
            pb::SlimHeader::from_app(&self.source, name, 1, self.uplink(), crate::SLIM_VERSION);
        let message = pb::Message::subscription(subscribe, header, sub_id);
        self.router
            .handle_message(self.app, Box::new(message), self.clock.now());
    }

    /// The link is negotiated: the first one completes `connect`; later ones make every
    /// subscription again (same ids, as the reference replays them), then the deferred ones.
    fn link_established(&mut self) {
        self.pause = REDIAL_FIRST;
        if let Some(ready) = self.ready.take() {
            let _ = ready.try_send(Ok(()));
        } else {
            self.reconnects.fetch_add(1, Ordering::Relaxed);
            tracing::info!(endpoint = %self.authority, "link to the node restored");
            let replay: Vec<(Name, u64)> = self.subscriptions.values().cloned().collect();
            for (name, sub_id) in replay {
                self.subscription(&name, sub_id, true, None, false);
            }
        }
        for (name, reply) in std::mem::take(&mut self.deferred) {
            if !reply.is_closed() {
                let sub_id = self.next_sub_id;
                self.next_sub_id = self.next_sub_id.wrapping_add(2);
                self.subscription(&name, sub_id, true, Some(reply), true);
            }
        }
    }

    async fn drain(&mut self) -> Result<(), Loss> {
        while let Some(output) = self.router.poll_output() {
            match output {
                Output::Deliver { conn, message } if conn == self.app => self.deliver(message),
                Output::Transmit { conn, frame } => {
                    let Some(link) = self.link.as_mut().filter(|l| l.conn == conn) else {
                        continue;
                    };
                    send_all(&mut link.send, frame)
                        .await
                        .map_err(|e| Loss::Lost(format!("write to node: {e}")))?;
                }
                Output::Close { conn, reason, .. } => {
                    if self.link.as_ref().is_some_and(|l| l.conn == conn) {
                        return Err(Loss::Refused(reason));
                    }
                }
                Output::Event(RouterEvent::LinkEstablished { conn, .. }) => {
                    if let Some(link) = self.link.as_mut().filter(|l| l.conn == conn) {
                        link.established = true;
                        self.link_established();
                    }
                }
                Output::Event(_) | Output::Deliver { .. } => {}
            }
        }
        Ok(())
    }

    /// Messages the router routed to the application: acks to their waiters, publishes to the
    /// inbox. Never waits: a full inbox drops (reliable sessions recover by retransmission).
    fn deliver(&mut self, message: Box<pb::Message>) {
        match &message.message_type {
            Some(MessageType::SubscriptionAck(ack)) => {
                let Some(pos) = self
                    .pending_subs
                    .iter()
                    .position(|p| p.sub_id == ack.subscription_id)
                else {
                    return; // a replayed subscription, or a waiter that gave up
                };
                let pending = self.pending_subs.swap_remove(pos);
                let result = if ack.success {
                    if let Some(name) = pending.record {
                        self.subscriptions
                            .insert(name.key(), (name, pending.sub_id));
                    }
                    Ok(())
                } else {
                    Err(ClientError::Subscription(ack.error.clone()))
                };
                let _ = pending.reply.try_send(result);
            }
            Some(MessageType::Publish(_)) => {
                if let Err(TrySendError::Full(_)) = self.inbox.try_send(message) {
                    let dropped = self.inbox_drops.fetch_add(1, Ordering::Relaxed) + 1;
                    if dropped.is_power_of_two() {
                        tracing::warn!(
                            dropped_total = dropped,
                            "the application does not read fast enough: message dropped"
                        );
                    }
                }
            }
            _ => {}
        }
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
