//! A client's link to a SLIM node, on tokio: raw data-plane messaging (subscribe, publish,
//! receive). The session layer builds on it.
//!
//! Like the reference SDK, a client runs its own router core: the application is a local
//! connection of it and the node is reached over one negotiated, header-MAC-signed Edge link, so
//! the node sees exactly what it sees from a `slim-bindings` client.
//!
//! ```no_run
//! # async fn demo() -> Result<(), slim_tokio::app::ClientError> {
//! use slim_proto::Name;
//! let me = Name::with_id("org", "ns", "alice", 1);
//! let client = slim_tokio::app::Client::connect("127.0.0.1:46357", me.clone()).await?;
//! client.subscribe(&me).await?;
//! client.publish(&Name::new("org", "ns", "bob"), b"hello".to_vec()).await?;
//! let message = client.recv().await?;
//! println!("{} sent {} bytes", message.source, message.payload.len());
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use slim_core::router::{ConnId, ConnectionKind, Router, RouterConfig};
use slim_proto::{pb, Name};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::clock::Clock;
use crate::node::{
    self, AckWaiters, AdapterCounters, ConnWriter, Delivery, NodeHandle, OpenKind, Outbox,
};

const LINK_WAIT: Duration = Duration::from_secs(10);
const ACK_WAIT: Duration = Duration::from_secs(10);
/// Messages queued for the application before the router drops (and counts) the next, as for
/// a connection that does not read. As much as the router's queue and the inbox behind it held
/// when a task of the client's sat between them.
const INBOX: usize = node::CONNECTION_QUEUE + 4096;

pub use slim_core::client::ClientError;
pub use slim_proto::Received;

/// No uplink right now (between a lost link and its replacement).
const NO_UPLINK: u64 = u64::MAX;
/// First and largest wait between redials after the link to the node is lost.
const REDIAL_FIRST: Duration = Duration::from_millis(100);
const REDIAL_MAX: Duration = Duration::from_secs(2);

/// What the client's tasks share.
struct Inner {
    name: Name,
    node: NodeHandle,
    app: ConnId,
    /// The connection of the current link to the node ([`NO_UPLINK`] while redialling).
    uplink: AtomicU64,
    pending_acks: AckWaiters,
    next_sub_id: AtomicU64,
    /// Subscription ids by name: to unsubscribe with the id a subscription was made with, and
    /// to make them again on a new link.
    subscriptions: Mutex<HashMap<slim_proto::NameKey, (Name, u64)>>,
    reconnects: AtomicU64,
    counters: Arc<AdapterCounters>,
}

/// A connected client. It redials and re-subscribes when the link to the node is lost.
/// Dropping it closes the link.
pub struct Client {
    inner: Arc<Inner>,
    /// Filled by the client's router; bounded in messages ([`INBOX`]) and, with the other
    /// queues of the router, in bytes: what does not fit is dropped and counted
    /// ([`Client::dropped`]), so an application that stops reading does not stall the link.
    inbox: tokio::sync::Mutex<mpsc::Receiver<Delivery>>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("name", &self.inner.name.to_string())
            .field("uplink", &self.inner.uplink.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Client {
    /// Connects to a node at `endpoint` (`host:port` or `http://host:port`, plaintext HTTP/2)
    /// and negotiates the link. `name` is this client's name, with its instance id.
    pub async fn connect(endpoint: &str, name: Name) -> Result<Client, ClientError> {
        let authority = endpoint
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        let connect_error = |reason: String| ClientError::Connect {
            endpoint: endpoint.to_owned(),
            reason,
        };
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| connect_error(format!("no OS randomness: {e}")))?;
        let router = Router::new(
            RouterConfig {
                node_id: format!("client-{name}"),
                slim_version: crate::SLIM_VERSION.to_owned(),
                // What a client receives is for its apps, which take decoded messages.
                route_from_bytes: false,
                ..RouterConfig::default()
            },
            seed,
        );
        let counters = Arc::new(AdapterCounters::default());
        let (node, router_task) = node::spawn_router(router, Clock::new(), counters.clone());
        let mut tasks = vec![router_task];

        // The first link is made here so that a node that is not there is an error at once.
        let streams = crate::client::open_channel(&authority)
            .await
            .map_err(connect_error)?;
        let link_id = format!(
            "{:032x}",
            u128::from_le_bytes(seed[..16].try_into().unwrap_or_default())
        );
        let (inbox_tx, inbox_rx) = mpsc::channel(INBOX);
        let pending_acks = AckWaiters::default();
        let (close_tx, _close_rx) = oneshot::channel();
        let app = node
            .open(
                OpenKind::Local,
                ConnWriter {
                    outbox: Outbox::App {
                        inbox: inbox_tx,
                        ack_waiters: pending_acks.clone(),
                    },
                    close: close_tx,
                },
            )
            .await
            .ok_or(ClientError::Closed)?;
        let inner = Arc::new(Inner {
            name,
            node,
            app,
            uplink: AtomicU64::new(NO_UPLINK),
            pending_acks,
            next_sub_id: AtomicU64::new(
                u64::from_le_bytes(seed[16..24].try_into().unwrap_or_default()) | 1,
            ),
            subscriptions: Mutex::default(),
            reconnects: AtomicU64::new(0),
            counters,
        });
        let (ready_tx, ready_rx) = oneshot::channel();
        tasks.push(tokio::spawn(supervise_link(
            inner.clone(),
            authority,
            link_id,
            streams,
            ready_tx,
        )));
        match ready_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(error),
            Err(_) => return Err(ClientError::Closed),
        }
        Ok(Client {
            inner,
            inbox: tokio::sync::Mutex::new(inbox_rx),
            tasks,
        })
    }

    pub fn name(&self) -> &Name {
        &self.inner.name
    }

    /// How many times the link to the node was lost and made again.
    pub fn reconnects(&self) -> u64 {
        self.inner.reconnects.load(Ordering::Relaxed)
    }

    /// Messages this client dropped because they did not fit a queue: deliveries the
    /// application did not read in time (its inbox was full), or publishes the link to the node
    /// could not take.
    pub fn dropped(&self) -> u64 {
        self.inner
            .counters
            .slow_consumer_drops
            .load(Ordering::Relaxed)
    }

    /// Makes `name` reachable through the node; returns once the node acknowledged it. The
    /// subscription is made again whenever the link is.
    pub async fn subscribe(&self, name: &Name) -> Result<(), ClientError> {
        let sub_id = self.inner.next_sub_id.fetch_add(2, Ordering::Relaxed);
        // Recorded first: if the link is lost before the ack, the redial makes it again.
        self.inner
            .subscriptions
            .lock()
            .expect("subscriptions lock")
            .insert(name.key(), (name.clone(), sub_id));
        let result = self.inner.subscription_request(name, sub_id, true).await;
        if result.is_err() {
            self.inner
                .subscriptions
                .lock()
                .expect("subscriptions lock")
                .remove(&name.key());
        }
        result
    }

    /// Drops a subscription made with [`Client::subscribe`]; returns once the node acknowledged.
    pub async fn unsubscribe(&self, name: &Name) -> Result<(), ClientError> {
        let (_, sub_id) = self
            .inner
            .subscriptions
            .lock()
            .expect("subscriptions lock")
            .remove(&name.key())
            .ok_or_else(|| ClientError::Subscription(format!("{name} is not subscribed")))?;
        self.inner.subscription_request(name, sub_id, false).await
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
            self.inner.header(to, fanout, None),
            pb::SessionHeader::default(),
            payload.into(),
        );
        self.inner.send(Box::new(message)).await
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
    pub async fn recv_message(&self) -> Result<Box<pb::Message>, ClientError> {
        self.inbox
            .lock()
            .await
            .recv()
            .await
            .map(|delivery| delivery.message)
            .ok_or(ClientError::Closed)
    }

    /// Sends a complete message (e.g. one built by a session layer) through the node.
    pub async fn send_message(
        &self,
        message: impl Into<Box<pb::Message>>,
    ) -> Result<(), ClientError> {
        self.inner.send(message.into()).await
    }
}

impl Inner {
    async fn send(&self, message: Box<pb::Message>) -> Result<(), ClientError> {
        if self.node.message(self.app, message).await {
            Ok(())
        } else {
            Err(ClientError::Closed)
        }
    }

    async fn subscription_request(
        &self,
        name: &Name,
        sub_id: u64,
        subscribe: bool,
    ) -> Result<(), ClientError> {
        // While the link is being redialled, wait for it (bounded like the ack).
        let deadline = tokio::time::Instant::now() + ACK_WAIT;
        let uplink = loop {
            match self.uplink.load(Ordering::Relaxed) {
                NO_UPLINK if tokio::time::Instant::now() >= deadline => {
                    return Err(ClientError::Timeout(ACK_WAIT))
                }
                NO_UPLINK => tokio::time::sleep(Duration::from_millis(20)).await,
                uplink => break uplink,
            }
        };
        // A replay after a redial may find the original request still waiting for this ack:
        // then the ack answers that one.
        let answer = match self
            .pending_acks
            .lock()
            .expect("pending acks lock")
            .entry(sub_id)
        {
            std::collections::hash_map::Entry::Occupied(_) => None,
            std::collections::hash_map::Entry::Vacant(slot) => {
                let (reply, answer) = oneshot::channel();
                slot.insert(reply);
                Some(answer)
            }
        };
        let header = self.header(name, 1, Some(uplink));
        let message = pb::Message::subscription(subscribe, header, sub_id);
        self.send(Box::new(message)).await?;
        let Some(answer) = answer else {
            return Ok(());
        };
        match tokio::time::timeout(ACK_WAIT, answer).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(error))) => Err(ClientError::Subscription(error)),
            Ok(Err(_)) => Err(ClientError::Closed),
            Err(_) => {
                self.pending_acks
                    .lock()
                    .expect("pending acks lock")
                    .remove(&sub_id);
                Err(ClientError::Timeout(ACK_WAIT))
            }
        }
    }

    fn header(
        &self,
        destination: &Name,
        fanout: u32,
        forward_to: Option<ConnId>,
    ) -> pb::SlimHeader {
        pb::SlimHeader::from_app(
            &self.name,
            destination,
            fanout,
            forward_to,
            crate::SLIM_VERSION,
        )
    }

    /// Negotiates one link on `streams`; its connection id once it is up.
    async fn bring_up(
        &self,
        link_id: &str,
        (recv, send): (h2::RecvStream, h2::SendStream<Bytes>),
    ) -> Result<(ConnId, JoinHandle<()>), ClientError> {
        let (opened_tx, opened_rx) = oneshot::channel();
        let link = tokio::spawn(crate::stream::run_link(
            self.node.clone(),
            OpenKind::Dialed {
                link_id: link_id.to_owned(),
                kind: ConnectionKind::Edge,
            },
            recv,
            send,
            slim_proto::DEFAULT_MAX_MESSAGE_SIZE,
            false,
            Some(opened_tx),
        ));
        let conn = opened_rx.await.map_err(|_| ClientError::Closed)?;
        match tokio::time::timeout(LINK_WAIT, self.node.await_link(conn)).await {
            Ok(Ok(())) => Ok((conn, link)),
            Ok(Err(reason)) => Err(ClientError::Refused(reason)),
            Err(_) => Err(ClientError::Timeout(LINK_WAIT)),
        }
    }
}

/// Keeps a link to the node: the first one (reported on `ready`), then, whenever it is lost, a
/// new one after a growing pause, with every subscription made again (same ids, as the
/// reference replays them), reusing the link id.
async fn supervise_link(
    inner: Arc<Inner>,
    authority: String,
    link_id: String,
    first: (h2::RecvStream, h2::SendStream<Bytes>),
    ready: oneshot::Sender<Result<(), ClientError>>,
) {
    let (uplink, link) = match inner.bring_up(&link_id, first).await {
        Ok(up) => up,
        Err(error) => {
            let _ = ready.send(Err(error));
            return;
        }
    };
    inner.uplink.store(uplink, Ordering::Relaxed);
    let _ = ready.send(Ok(()));
    let _ = link.await;
    loop {
        inner.uplink.store(NO_UPLINK, Ordering::Relaxed);
        tracing::warn!(endpoint = %authority, "link to the node lost: redialling");
        let mut pause = REDIAL_FIRST;
        let (uplink, link) = loop {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(REDIAL_MAX);
            let streams = match crate::client::open_channel(&authority).await {
                Ok(streams) => streams,
                Err(error) => {
                    tracing::debug!(%error, "redial failed");
                    continue;
                }
            };
            match inner.bring_up(&link_id, streams).await {
                Ok(up) => break up,
                Err(error) => tracing::debug!(%error, "link negotiation failed"),
            }
        };
        inner.uplink.store(uplink, Ordering::Relaxed);
        inner.reconnects.fetch_add(1, Ordering::Relaxed);
        let subscriptions: Vec<(Name, u64)> = inner
            .subscriptions
            .lock()
            .expect("subscriptions lock")
            .values()
            .cloned()
            .collect();
        for (name, sub_id) in subscriptions {
            if let Err(error) = inner.subscription_request(&name, sub_id, true).await {
                tracing::warn!(%name, %error, "re-subscription after reconnect failed");
            }
        }
        tracing::info!(endpoint = %authority, "link to the node restored");
        let _ = link.await;
    }
}
