//! Sessions for applications, on smol: an [`App`] drives a [`SessionLayer`] core over a
//! [`Client`] link. The core decides everything (handshakes, acks, retransmissions, signatures);
//! this module only moves messages, commands, events and time. The API is the one of
//! `slim_tokio::session::App` (point-to-point sessions and moderated groups); no tokio runtime
//! is involved.
//!
//! ```no_run
//! # fn main() -> Result<(), slim_smol::session::AppError> {
//! use slim_proto::Name;
//! use slim_smol::session::{App, SessionConfig, SessionEvent};
//! smol::block_on(async {
//!     let app = App::connect("http://127.0.0.1:46357", Name::new("org", "ns", "alice"),
//!                            "a-shared-secret-of-at-least-32-bytes!").await?;
//!     let session = app.open_session(&Name::new("org", "ns", "bob"), SessionConfig::default()).await?;
//!     app.publish(session, b"hello".to_vec()).await?;
//!     loop {
//!         match app.next_event().await? {
//!             SessionEvent::Message { payload, .. } => break println!("{} bytes", payload.len()),
//!             SessionEvent::Closed { reason, .. } => break println!("closed: {reason:?}"),
//!             _ => {}
//!         }
//!     }
//!     app.close(session).await?;
//!     Ok(())
//! })
//! # }
//! ```

use std::collections::VecDeque;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_lite::future;
use slim_core::session::{self, Output, SessionLayer};
use slim_proto::{pb, Name};
use smol::channel::{self, Receiver, Sender, TrySendError};

use crate::app::{Client, ClientError};
use crate::clock::Clock;
use crate::{either_first, with_timeout, CoreTimer};

pub use slim_core::session::{
    CloseReason, Reliability, SessionConfig, SessionError, SessionEvent, SessionId, SessionStats,
};

/// How long `open_session`, `invite` and `remove` wait at most (the core gives up on its own
/// after its control retries; this only bounds the wait).
const OPEN_WAIT: Duration = Duration::from_secs(60);
const COMMANDS: usize = 1024;
const EVENTS: usize = 4096;

/// Errors of the session API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Layer(#[from] session::LayerError),
    #[error(transparent)]
    Session(#[from] session::SessionError),
    #[error("the session could not be opened: {0:?}")]
    NotOpened(CloseReason),
    #[error("the application stopped")]
    Stopped,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the membership change failed: {0}")]
    Membership(String),
}

/// The driver answers its application's commands on channels of one, sent to with `try_send`
/// (never waits).
struct SmolReplies;

impl session::Replies for SmolReplies {
    type Reply<T> = Sender<T>;

    fn answer<T>(reply: Sender<T>, value: T) -> bool {
        reply.try_send(value).is_ok()
    }
}

type Command = session::Command<SmolReplies>;
type Waiters = session::Waiters<SmolReplies>;

/// An application with sessions. Dropping it stops it (and closes its link).
pub struct App {
    name: Name,
    commands: Sender<Command>,
    events: Receiver<SessionEvent>,
    _driver: smol::Task<()>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("name", &self.name.to_string())
            .finish_non_exhaustive()
    }
}

impl App {
    /// Connects to a node as `name` (`org/ns/service`; the instance id comes from the identity
    /// derived from `secret`), and makes the app reachable there.
    pub async fn connect(endpoint: &str, name: Name, secret: &str) -> Result<App, AppError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| ClientError::Connect {
            endpoint: endpoint.to_owned(),
            reason: format!("no OS randomness: {e}"),
        })?;
        let unix_at_zero = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let clock = Clock::new();
        let layer = SessionLayer::new(
            session::LayerConfig {
                name,
                secret: secret.to_owned(),
                unix_at_zero,
            },
            seed,
        )?;
        let name = layer.name().clone();
        let client = Client::connect(endpoint, name.clone()).await?;
        client.subscribe(&name).await?;
        let (commands, command_rx) = channel::bounded(COMMANDS);
        let (event_tx, events) = channel::bounded(EVENTS);
        let driver = smol::spawn(
            Driver {
                layer,
                client,
                clock,
                commands: command_rx,
                events: event_tx,
                waiters: Waiters::default(),
                backlog: VecDeque::new(),
            }
            .run(),
        );
        Ok(App {
            name,
            commands,
            events,
            _driver: driver,
        })
    }

    /// This app's full name (with its instance id).
    pub fn name(&self) -> &Name {
        &self.name
    }

    /// Opens a point-to-point session with any instance of `peer`; returns once the peer
    /// joined.
    pub async fn open_session(
        &self,
        peer: &Name,
        config: SessionConfig,
    ) -> Result<SessionId, AppError> {
        let (reply, answer) = channel::bounded(1);
        self.command(Command::Open {
            peer: peer.clone(),
            config,
            reply,
        })
        .await?;
        match with_timeout(OPEN_WAIT, answer.recv()).await {
            Some(Ok(Ok(session))) => Ok(session),
            Some(Ok(Err(reason))) => Err(AppError::NotOpened(reason)),
            Some(Err(_)) => Err(AppError::Stopped),
            None => Err(AppError::Timeout(OPEN_WAIT)),
        }
    }

    /// Creates a group session on `channel` (`org/ns/chan`) moderated by this app.
    pub async fn create_group(
        &self,
        channel: &Name,
        config: SessionConfig,
    ) -> Result<SessionId, AppError> {
        let (reply, answer) = channel::bounded(1);
        self.command(Command::CreateGroup {
            channel: channel.clone(),
            config,
            reply,
        })
        .await?;
        answer.recv().await.map_err(|_| AppError::Stopped)
    }

    /// Invites any instance of `invitee` into a group this app moderates; returns once it joined.
    pub async fn invite(&self, session: SessionId, invitee: &Name) -> Result<(), AppError> {
        let (reply, answer) = channel::bounded(1);
        self.command(Command::Invite {
            session,
            invitee: invitee.clone(),
            reply,
        })
        .await?;
        membership_answer(answer).await
    }

    /// Removes a member (full name, or service name) from a group this app moderates; returns
    /// once it left.
    pub async fn remove(&self, session: SessionId, member: &Name) -> Result<(), AppError> {
        let (reply, answer) = channel::bounded(1);
        self.command(Command::Remove {
            session,
            member: member.clone(),
            reply,
        })
        .await?;
        membership_answer(answer).await
    }

    /// The members of a group session (everyone, this app included).
    pub async fn members(&self, session: SessionId) -> Result<Vec<Name>, AppError> {
        let (reply, answer) = channel::bounded(1);
        self.command(Command::Members { session, reply }).await?;
        answer
            .recv()
            .await
            .map_err(|_| AppError::Stopped)?
            .ok_or(AppError::Session(SessionError::UnknownSession(session)))
    }

    /// Sends `payload` on a session (to the peer, or to every group member); returns its
    /// sequence id. On a reliable session whose send queue is full (the receivers are behind
    /// on their acknowledgements) it waits until there is room, unless this application is
    /// more than [`EVENT_BACKLOG`] events behind its event queue (every acknowledged message is
    /// a `Delivered` event): then it fails with `SendQueueFull`, and the events must be read.
    pub async fn publish(
        &self,
        session: SessionId,
        payload: impl Into<Bytes>,
    ) -> Result<u32, AppError> {
        self.send(session, None, payload.into()).await
    }

    /// Sends `payload` to one member of a group session only (a direct message, outside the
    /// group's sequence; `member` without an instance means any instance of that service).
    /// Returns its id; waits for room like [`App::publish`].
    pub async fn publish_to(
        &self,
        session: SessionId,
        member: &Name,
        payload: impl Into<Bytes>,
    ) -> Result<u32, AppError> {
        self.send(session, Some(member.clone()), payload.into())
            .await
    }

    async fn send(
        &self,
        session: SessionId,
        to: Option<Name>,
        payload: Bytes,
    ) -> Result<u32, AppError> {
        let (reply, answer) = channel::bounded(1);
        self.command(Command::Publish {
            session,
            publish: session::Publish { to, payload },
            reply,
        })
        .await?;
        Ok(answer.recv().await.map_err(|_| AppError::Stopped)??)
    }

    /// Soft close (`false`) or back online (`true`): the other members are told and stop (or
    /// resume) waiting for this app; back online in an MLS group with a stale epoch, it
    /// rejoins the group through the moderator on its own.
    pub async fn set_online(&self, session: SessionId, online: bool) -> Result<(), AppError> {
        let (reply, answer) = channel::bounded(1);
        self.command(Command::SetOnline {
            session,
            online,
            reply,
        })
        .await?;
        Ok(answer.recv().await.map_err(|_| AppError::Stopped)??)
    }

    /// Closes a session: p2p peers are told, a moderator closes the group, a member leaves it.
    /// A `Closed` event follows.
    pub async fn close(&self, session: SessionId) -> Result<(), AppError> {
        let (reply, answer) = channel::bounded(1);
        self.command(Command::Close { session, reply }).await?;
        Ok(answer.recv().await.map_err(|_| AppError::Stopped)??)
    }

    /// The session layer's counters: messages, drops by reason, retransmissions.
    pub async fn stats(&self) -> Result<SessionStats, AppError> {
        let (reply, answer) = channel::bounded(1);
        self.command(Command::Stats { reply }).await?;
        answer.recv().await.map_err(|_| AppError::Stopped)
    }

    /// The next session event: incoming sessions, messages, deliveries, membership, losses,
    /// closes.
    ///
    /// Cancel-safe: an event is only taken when the future completes.
    pub async fn next_event(&self) -> Result<SessionEvent, AppError> {
        self.events.recv().await.map_err(|_| AppError::Stopped)
    }

    async fn command(&self, command: Command) -> Result<(), AppError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| AppError::Stopped)
    }
}

async fn membership_answer(answer: Receiver<Result<(), String>>) -> Result<(), AppError> {
    match with_timeout(OPEN_WAIT, answer.recv()).await {
        Some(Ok(Ok(()))) => Ok(()),
        Some(Ok(Err(reason))) => Err(AppError::Membership(reason)),
        Some(Err(_)) => Err(AppError::Stopped),
        None => Err(AppError::Timeout(OPEN_WAIT)),
    }
}

#[allow(clippy::large_enum_variant)] // lives for one loop turn; boxing would allocate per message
enum Wake {
    Timer,
    Net(Result<pb::Message, ClientError>),
    App(Option<Command>),
    /// The oldest backlogged event went to the application (false: it is gone).
    Handed(bool),
}

// The backlog policy is the core's, so that both drivers keep the same one; re-exported here,
// where the docs of `publish` and the tests name it.
pub use slim_core::session::EVENT_BACKLOG;

/// Moves messages, commands, events and time between one [`SessionLayer`] and the world.
struct Driver {
    layer: SessionLayer,
    client: Client,
    clock: Clock,
    commands: Receiver<Command>,
    events: Sender<SessionEvent>,
    waiters: Waiters,
    /// Events the application has not taken yet. While there are some, the network is not
    /// read (backpressure towards the peers), but commands and the timer still are: an app
    /// that publishes without reading its events is never deadlocked, and what the core sends
    /// on its own (held acks, retransmissions, heartbeats) still goes out.
    backlog: VecDeque<SessionEvent>,
}

/// Whether the driver goes on.
type Go = bool;

impl Driver {
    /// drain → arm the timer (moved only earlier: [`slim_core::TimerSlot`]) → wait for one input (a message, a command, the timer, or room
    /// for a backlogged event).
    async fn run(mut self) {
        let mut flip = false;
        let mut timer = CoreTimer::new();
        loop {
            if !self.drain().await {
                return;
            }
            timer.arm(
                self.layer
                    .poll_timeout()
                    .map(|at| self.clock.to_instant(at)),
            );
            let fired = async {
                timer.fired().await;
                Wake::Timer
            };
            self.waiters.refuse_when_backlogged(self.backlog.len());
            // A waiting publish needs the acks: the network is read while there is one, even
            // if the application is behind (it may be waiting for that publish before it reads).
            let read_net = self.backlog.is_empty() || self.waiters.publishes_waiting();
            let net = async {
                if !read_net {
                    return future::pending().await;
                }
                Wake::Net(self.client.recv_message().await.map(|message| *message))
            };
            let app = async { Wake::App(self.commands.recv().await.ok()) };
            // A send future dropped unfinished has sent nothing, hence the clone.
            let hand = async {
                match self.backlog.front() {
                    Some(event) => Wake::Handed(self.events.send(event.clone()).await.is_ok()),
                    None => future::pending().await,
                }
            };
            flip = !flip;
            let wake = future::or(future::or(fired, hand), either_first(flip, net, app)).await;
            match wake {
                Wake::Timer => self.layer.handle_timeout(self.clock.now()),
                Wake::Net(Ok(message)) => self.layer.handle_message(message, self.clock.now()),
                // Only when the client is gone: it redials a lost link by itself.
                Wake::Net(Err(error)) => {
                    tracing::warn!(%error, "client stopped");
                    return;
                }
                Wake::App(None) | Wake::Handed(false) => return,
                Wake::App(Some(command)) => {
                    self.waiters.run(&mut self.layer, command, self.clock.now())
                }
                Wake::Handed(true) => {
                    self.backlog.pop_front();
                }
            }
            self.waiters
                .retry_publishes(&mut self.layer, self.clock.now());
        }
    }

    /// Carries out the core's outputs, in order.
    async fn drain(&mut self) -> Go {
        while let Some(output) = self.layer.poll_output() {
            match output {
                Output::Send(message) => {
                    if let Err(error) = self.client.send_message(message).await {
                        tracing::warn!(%error, "client stopped");
                        return false;
                    }
                }
                // The core relies on a subscription being in place before what follows it:
                // wait for the node's ack (one round trip, only when groups change).
                Output::Subscribe(channel) => {
                    if let Err(error) = self.client.subscribe(&channel).await {
                        tracing::warn!(%channel, %error, "channel subscription failed");
                    }
                }
                Output::Unsubscribe(channel) => {
                    if let Err(error) = self.client.unsubscribe(&channel).await {
                        tracing::debug!(%channel, %error, "channel unsubscription failed");
                    }
                }
                Output::Event(event) => {
                    if self.waiters.resolve(&event) {
                        self.backlog.push_back(event);
                    }
                }
            }
        }
        while let Some(event) = self.backlog.pop_front() {
            match self.events.try_send(event) {
                Ok(()) => {}
                Err(TrySendError::Full(event)) => {
                    self.backlog.push_front(event);
                    break;
                }
                Err(TrySendError::Closed(_)) => return false,
            }
        }
        true
    }
}
