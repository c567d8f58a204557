//! The task that owns the [`Router`] core. Connection tasks send it what they read; it drives the
//! core (drain → arm timer → wait for one input) and hands each output to the connection it is
//! for. No protocol decision is taken here.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use rustc_hash::FxHashMap;
use slim_core::router::{ConnId, ConnectionKind, Output, Router, RouterEvent, Stats};
use slim_proto::pb;
use tokio::sync::{mpsc, oneshot};

use crate::clock::{Clock, CoreTimer};

/// Frames queued per connection before the router drops instead of waiting (a connection that
/// does not read must not stall the node). Same order as the reference's per-stream buffers.
pub(crate) const CONNECTION_QUEUE: usize = 1024;
/// Bytes queued per connection (handed to its writer, not yet written to the socket) beyond which
/// the router drops instead of queueing more. Without it the bound was 1024 frames of up to the
/// maximum message size each (4 GiB per connection, multiplied by the fan-out of a publish). A
/// frame is always admitted into an empty queue, so one message of the maximum size still passes.
pub(crate) const CONNECTION_QUEUE_BYTES: usize = 16 * 1024 * 1024;
/// Inputs queued towards the router; readers wait when it is full (backpressure to the peers).
const ROUTER_QUEUE: usize = 4096;
/// Messages handled between two drains, to amortise the wake-ups under load.
const INPUT_BATCH: usize = 256;

/// How the router reaches one connection's writer task.
pub(crate) struct ConnWriter {
    pub outbox: Outbox,
    pub close: oneshot::Sender<(u32, String)>,
}

/// Where a connection's outputs go: gRPC frames for a link, messages for an in-process app.
pub(crate) enum Outbox {
    Frames(mpsc::Sender<Bytes>),
    /// An in-process app: publishes to its inbox, acks of its subscriptions to their waiters.
    /// Split here rather than by a task of the app's: that was one more queue and wake-up
    /// between the router and the app for every message.
    App {
        inbox: mpsc::Sender<Delivery>,
        ack_waiters: AckWaiters,
    },
}

/// Who waits for the ack of which subscription id (an in-process app's subscribe calls).
pub(crate) type AckWaiters = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<(), String>>>>>;

/// A message for an in-process app, counted in its queued bytes until dropped.
pub(crate) struct Delivery {
    pub message: Box<pb::Message>,
    _queued: QueuedBytes,
}

pub(crate) enum OpenKind {
    Accepted,
    Dialed {
        link_id: String,
        kind: ConnectionKind,
    },
    /// An application in this process (the client side of an SDK).
    Local,
}

pub(crate) enum NodeInput {
    Open {
        kind: OpenKind,
        writer: ConnWriter,
        reply: oneshot::Sender<ConnId>,
    },
    /// The messages of one read from a connection, in order (one input, not one per message:
    /// small messages arrive by the hundred per read).
    Frames {
        conn: ConnId,
        bodies: Vec<Bytes>,
    },
    /// A message from an in-process app (never encoded).
    Message {
        conn: ConnId,
        message: Box<pb::Message>,
    },
    Closed {
        conn: ConnId,
    },
    Stats(oneshot::Sender<Stats>),
    /// Answer once the connection's link is negotiated (or failed / is gone).
    AwaitLink {
        conn: ConnId,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// End every stream with grpc-status 0 and stop.
    Shutdown,
}

/// Counters kept by the adapter itself (the router's are in [`Stats`]).
#[derive(Debug, Default)]
pub struct AdapterCounters {
    /// Frames dropped because the connection's queue was full, in frames or in bytes (it does
    /// not read).
    pub slow_consumer_drops: AtomicU64,
}

/// A connection's writer and the bytes queued for it.
struct Writer {
    conn: ConnWriter,
    queued: Arc<AtomicUsize>,
    /// The largest recent batch handed over, decaying by a quarter with each batch: a new
    /// batch starts with room for twice as much (see [`Driver::queue_frame`]). With room for
    /// twice the last batch alone, batches that outgrew it and were copied as they grew cost
    /// the node 10 % more instructions per message under the bench's app clients.
    recent_batch: usize,
}

impl Writer {
    /// `len` bytes counted in this connection's queue until the result is dropped.
    fn counted(&self, len: usize) -> QueuedBytes {
        self.queued.fetch_add(len, Ordering::Relaxed);
        QueuedBytes {
            len,
            queued: self.queued.clone(),
        }
    }
}

/// Frames for one connection gathered while the router's outputs are drained.
struct Batch {
    buf: BytesMut,
    frames: u64,
}

/// Frames up to this size are copied into their connection's batch; larger ones go alone.
const BATCH_COPY_MAX: usize = 64 * 1024;

/// Bytes counted in a connection's queue until this is dropped.
struct QueuedBytes {
    len: usize,
    queued: Arc<AtomicUsize>,
}

impl Drop for QueuedBytes {
    fn drop(&mut self) {
        self.queued.fetch_sub(self.len, Ordering::Relaxed);
    }
}

/// A queued frame: counted until its last copy is dropped (written to the socket, or copied
/// into a write batch).
struct Queued {
    frame: Bytes,
    _queued: QueuedBytes,
}

impl AsRef<[u8]> for Queued {
    fn as_ref(&self) -> &[u8] {
        &self.frame
    }
}

/// A cheap handle for connection tasks.
#[derive(Clone)]
pub(crate) struct NodeHandle {
    tx: mpsc::Sender<NodeInput>,
}

impl NodeHandle {
    pub async fn open(&self, kind: OpenKind, writer: ConnWriter) -> Option<ConnId> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(NodeInput::Open {
                kind,
                writer,
                reply,
            })
            .await
            .ok()?;
        rx.await.ok()
    }

    /// Waits while the router is busy; false once it is gone.
    pub async fn frames(&self, conn: ConnId, bodies: Vec<Bytes>) -> bool {
        self.tx
            .send(NodeInput::Frames { conn, bodies })
            .await
            .is_ok()
    }

    /// A message from the in-process app `conn`; waits while the router is busy, false once it
    /// is gone.
    pub async fn message(&self, conn: ConnId, message: Box<pb::Message>) -> bool {
        self.tx
            .send(NodeInput::Message { conn, message })
            .await
            .is_ok()
    }

    pub async fn closed(&self, conn: ConnId) {
        let _ = self.tx.send(NodeInput::Closed { conn }).await;
    }

    /// Waits until the link of `conn` is negotiated.
    pub async fn await_link(&self, conn: ConnId) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(NodeInput::AwaitLink { conn, reply })
            .await
            .map_err(|_| "node stopped".to_string())?;
        rx.await.map_err(|_| "node stopped".to_string())?
    }

    pub async fn stats(&self) -> Option<Stats> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(NodeInput::Stats(reply)).await.ok()?;
        rx.await.ok()
    }

    pub async fn shutdown(&self) {
        let _ = self.tx.send(NodeInput::Shutdown).await;
    }
}

impl NodeInput {
    /// How many messages this input carries, for [`INPUT_BATCH`].
    fn messages(&self) -> usize {
        match self {
            NodeInput::Frames { bodies, .. } => bodies.len(),
            _ => 1,
        }
    }
}

pub(crate) fn spawn_router(
    router: Router,
    clock: Clock,
    counters: Arc<AdapterCounters>,
) -> (NodeHandle, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(ROUTER_QUEUE);
    let task = tokio::spawn(run(router, rx, clock, counters));
    (NodeHandle { tx }, task)
}

struct Driver {
    router: Router,
    // Keyed by connection ids this process hands out, so a fast non-keyed hash is safe (SipHash
    // was 5 % of a client's instructions per message).
    writers: FxHashMap<ConnId, Writer>,
    /// Frames for each connection gathered during one drain, handed over as one buffer.
    batches: FxHashMap<ConnId, Batch>,
    link_waiters: FxHashMap<ConnId, Vec<oneshot::Sender<Result<(), String>>>>,
    clock: Clock,
    counters: Arc<AdapterCounters>,
}

async fn run(
    router: Router,
    mut rx: mpsc::Receiver<NodeInput>,
    clock: Clock,
    counters: Arc<AdapterCounters>,
) {
    let mut driver = Driver {
        router,
        writers: FxHashMap::default(),
        batches: FxHashMap::default(),
        link_waiters: FxHashMap::default(),
        clock,
        counters,
    };
    let mut timer = CoreTimer::new();
    loop {
        driver.drain();
        timer.arm(
            driver.router.poll_timeout().map(|(at, _)| at),
            &driver.clock,
        );
        tokio::select! {
            input = rx.recv() => {
                let Some(input) = input else { break };
                let mut handled = input.messages();
                if !driver.handle(input) {
                    break;
                }
                while handled < INPUT_BATCH {
                    match rx.try_recv() {
                        Ok(input) => {
                            handled += input.messages();
                            if !driver.handle(input) { return }
                        }
                        Err(_) => break,
                    }
                }
            }
            () = timer.fired() => driver.router.handle_timeout(driver.clock.now()),
        }
    }
}

impl Driver {
    /// False when the node must stop.
    fn handle(&mut self, input: NodeInput) -> bool {
        let now = self.clock.now();
        match input {
            NodeInput::Open {
                kind,
                writer,
                reply,
            } => {
                // Outputs are drained only after this returns, so the writer is registered
                // before the negotiation request of a dialed link goes out.
                let conn = match kind {
                    OpenKind::Accepted => self.router.accept_connection(now),
                    OpenKind::Dialed { link_id, kind } => {
                        self.router.dial_connection(link_id, kind, now)
                    }
                    OpenKind::Local => self.router.attach_local(),
                };
                self.writers.insert(
                    conn,
                    Writer {
                        conn: writer,
                        queued: Arc::default(),
                        recent_batch: 0,
                    },
                );
                if reply.send(conn).is_err() {
                    self.writers.remove(&conn);
                    self.router.handle_connection_closed(conn, now);
                }
            }
            NodeInput::Frames { conn, bodies } => {
                for body in bodies {
                    self.router.handle_frame(conn, body, now);
                }
            }
            NodeInput::Message { conn, message } => {
                self.router.handle_message(conn, message, now);
            }
            NodeInput::Closed { conn } => self.router.handle_connection_closed(conn, now),
            NodeInput::Stats(reply) => {
                let _ = reply.send(self.router.stats());
            }
            NodeInput::AwaitLink { conn, reply } => {
                if self.router.is_established(conn) {
                    let _ = reply.send(Ok(()));
                } else if self.router.connection_kind(conn).is_none() {
                    let _ = reply.send(Err(format!("connection {conn} is closed")));
                } else {
                    self.link_waiters.entry(conn).or_default().push(reply);
                }
            }
            NodeInput::Shutdown => {
                self.drain();
                for (_, writer) in self.writers.drain() {
                    let _ = writer.conn.close.send((0, "node shutting down".into()));
                }
                return false;
            }
        }
        true
    }

    fn drain(&mut self) {
        while let Some(output) = self.router.poll_output() {
            match output {
                Output::Transmit { conn, frame } => self.queue_frame(conn, frame),
                Output::Deliver { conn, message } => self.deliver(conn, message),
                Output::Close { conn, code, reason } => {
                    self.notify_link(conn, Err(reason.clone()));
                    // What the router sent before closing goes out before the status.
                    self.flush(conn);
                    if let Some(writer) = self.writers.remove(&conn) {
                        let _ = writer.conn.close.send((code, reason));
                    }
                }
                Output::Event(RouterEvent::LinkEstablished {
                    conn,
                    kind,
                    link_id,
                    remote_node_id,
                    remote_version,
                    header_mac,
                }) => {
                    tracing::info!(conn, kind = kind.as_str(), %link_id, %remote_node_id, %remote_version, header_mac, "link established");
                    self.notify_link(conn, Ok(()));
                }
                Output::Event(RouterEvent::ConnectionRemoved {
                    conn,
                    routes_removed,
                }) => {
                    // Dropping the writer ends its stream (with the status the reader left, if
                    // any), after what was queued for it.
                    self.flush(conn);
                    self.writers.remove(&conn);
                    self.notify_link(conn, Err(format!("connection {conn} closed")));
                    tracing::info!(conn, routes_removed, "connection removed");
                }
            }
        }
        // The map is taken out only so that `send_batch` may borrow `self` while it is drained;
        // put back empty, it keeps its capacity, so a drain allocates nothing here.
        let mut batches = std::mem::take(&mut self.batches);
        for (conn, batch) in batches.drain() {
            self.send_batch(conn, batch);
        }
        self.batches = batches;
    }

    /// Adds a frame to its connection's batch, or drops it (counted) when the connection has
    /// more than its share queued: a connection that does not read must not stall the node.
    fn queue_frame(&mut self, conn: ConnId, frame: Bytes) {
        let Some(writer) = self.writers.get(&conn) else {
            return;
        };
        let (batched, capacity) = self
            .batches
            .get(&conn)
            .map_or((0, 0), |batch| (batch.buf.len(), batch.buf.capacity()));
        let queued = writer.queued.load(Ordering::Relaxed) + batched;
        if queued > 0 && queued + frame.len() > CONNECTION_QUEUE_BYTES {
            self.count_slow_consumer_drops(conn, 1);
            return;
        }
        if frame.len() >= BATCH_COPY_MAX {
            // Large frames go as they are, not copied: after what was batched before them.
            self.flush(conn);
            self.send_frames(conn, frame, 1);
            return;
        }
        // A batch that would pass the largest size only by growing is handed over first: the
        // growth would copy all of it, for one more frame (8 % of the node's instructions
        // under the bench's wire clients).
        if batched > 0 && batched + frame.len() > capacity.max(BATCH_COPY_MAX) {
            self.flush(conn);
        }
        // A new batch starts with room for twice the recent ones: a steady flow's batches are
        // then not grown (each doubling copied the batch whole), and a batch that outgrows it
        // still grows, in one piece.
        let recent = self.writers.get(&conn).map_or(0, |w| w.recent_batch);
        let room = (2 * recent).clamp(frame.len(), BATCH_COPY_MAX);
        let batch = self.batches.entry(conn).or_insert_with(|| Batch {
            buf: BytesMut::with_capacity(room),
            frames: 0,
        });
        batch.buf.extend_from_slice(&frame);
        batch.frames += 1;
        if batch.buf.len() >= BATCH_COPY_MAX {
            self.flush(conn);
        }
    }

    /// Hands `conn`'s batch to its writer.
    fn flush(&mut self, conn: ConnId) {
        if let Some(batch) = self.batches.remove(&conn) {
            self.send_batch(conn, batch);
        }
    }

    /// Hands `batch`, already taken out of [`Driver::batches`], to `conn`'s writer.
    fn send_batch(&mut self, conn: ConnId, batch: Batch) {
        if let Some(writer) = self.writers.get_mut(&conn) {
            let decayed = writer.recent_batch - writer.recent_batch / 4;
            writer.recent_batch = batch.buf.len().max(decayed);
        }
        if batch.frames > 0 {
            self.send_frames(conn, batch.buf.freeze(), batch.frames);
        }
    }

    /// Queues `buf` (`frames` whole frames) for `conn`'s writer, counted in its queued bytes
    /// until written; dropped (and counted) when its queue is full.
    fn send_frames(&self, conn: ConnId, buf: Bytes, frames: u64) {
        let Some(writer) = self.writers.get(&conn) else {
            return;
        };
        let Outbox::Frames(outbox) = &writer.conn.outbox else {
            // The router sends frames to links only, and messages to local apps only.
            tracing::error!(conn, "frames for an in-process app: dropped");
            return;
        };
        let counted = writer.counted(buf.len());
        let buf = Bytes::from_owner(Queued {
            frame: buf,
            _queued: counted,
        });
        // On failure the frames, and so their count, are dropped right here.
        if let Err(mpsc::error::TrySendError::Full(_)) = outbox.try_send(buf) {
            self.count_slow_consumer_drops(conn, frames);
        }
    }

    /// Hands a message to an in-process app, as [`Driver::queue_frame`] does a frame.
    fn deliver(&self, conn: ConnId, message: Box<pb::Message>) {
        let Some(writer) = self.writers.get(&conn) else {
            return;
        };
        let Outbox::App { inbox, ack_waiters } = &writer.conn.outbox else {
            tracing::error!(conn, "a message for a link: dropped");
            return;
        };
        // Acks go to their waiters, never queued: a full inbox must not fail a subscribe.
        match &message.message_type {
            Some(pb::message::MessageType::Publish(_)) => {}
            Some(pb::message::MessageType::SubscriptionAck(ack)) => {
                let waiter = ack_waiters
                    .lock()
                    .expect("ack waiters lock")
                    .remove(&ack.subscription_id);
                if let Some(waiter) = waiter {
                    let _ = waiter.send(if ack.success {
                        Ok(())
                    } else {
                        Err(ack.error.clone())
                    });
                }
                return;
            }
            // Nothing else is for an application.
            _ => return,
        }
        // What matters for the bound, computed cheaply.
        let len = 512 + message.app_payload().map_or(0, |app| app.blob.len());
        let queued = writer.queued.load(Ordering::Relaxed);
        if queued > 0 && queued + len > CONNECTION_QUEUE_BYTES {
            self.count_slow_consumer_drops(conn, 1);
            return;
        }
        let delivery = Delivery {
            message,
            _queued: writer.counted(len),
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = inbox.try_send(delivery) {
            self.count_slow_consumer_drops(conn, 1);
        }
    }

    fn count_slow_consumer_drops(&self, conn: ConnId, frames: u64) {
        let before = self
            .counters
            .slow_consumer_drops
            .fetch_add(frames, Ordering::Relaxed);
        // Logged when the total passes a power of two.
        let n = before + frames;
        if (before + 1..=n).any(u64::is_power_of_two) {
            tracing::warn!(
                conn,
                dropped_total = n,
                "connection does not read fast enough: message dropped"
            );
        }
    }

    fn notify_link(&mut self, conn: ConnId, result: Result<(), String>) {
        for waiter in self.link_waiters.remove(&conn).unwrap_or_default() {
            let _ = waiter.send(result.clone());
        }
    }
}
