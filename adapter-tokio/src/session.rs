//! Sessions for applications, on tokio: an [`App`] drives a [`SessionLayer`] core over a
//! [`Client`] link. The core decides everything (handshakes, acks, retransmissions, signatures);
//! this module only moves messages, commands, events and time.
//!
//! ```no_run
//! # async fn demo() -> Result<(), slim_tokio::session::AppError> {
//! use slim_proto::Name;
//! use slim_tokio::session::{App, SessionConfig};
//! let app = App::connect("http://127.0.0.1:46357", Name::new("org", "ns", "alice"),
//!                        "a-shared-secret-of-at-least-32-bytes!").await?;
//! let session = app.open_session(&Name::new("org", "ns", "bob"), SessionConfig::default()).await?;
//! app.publish(session, b"hello".to_vec()).await?;
//! # Ok(()) }
//! ```

use std::collections::VecDeque;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use slim_core::session::{self, Output, SessionLayer};
use slim_proto::Name;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::app::{Client, ClientError};
use crate::clock::{Clock, CoreTimer};

pub use slim_core::session::{
    CloseReason, Reliability, SessionConfig, SessionError, SessionEvent, SessionId, SessionStats,
};

/// How long `open_session` waits for the handshake at most (the core gives up on its own
/// after its control retries; this only bounds the wait).
const OPEN_WAIT: Duration = Duration::from_secs(60);

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

/// The driver answers its application's commands on tokio's one-shot channels.
struct TokioReplies;

impl session::Replies for TokioReplies {
    type Reply<T> = oneshot::Sender<T>;

    fn answer<T>(reply: oneshot::Sender<T>, value: T) -> bool {
        reply.send(value).is_ok()
    }
}

type Command = session::Command<TokioReplies>;
type Waiters = session::Waiters<TokioReplies>;

/// An application with sessions. Dropping it stops it.
pub struct App {
    name: Name,
    commands: mpsc::Sender<Command>,
    events: tokio::sync::Mutex<mpsc::Receiver<SessionEvent>>,
    driver: JoinHandle<()>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.driver.abort();
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
        let (commands, command_rx) = mpsc::channel(1024);
        let (event_tx, events) = mpsc::channel(4096);
        let driver = tokio::spawn(drive(layer, client, clock, command_rx, event_tx));
        Ok(App {
            name,
            commands,
            events: tokio::sync::Mutex::new(events),
            driver,
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
        let (reply, answer) = oneshot::channel();
        self.command(Command::Open {
            peer: peer.clone(),
            config,
            reply,
        })
        .await?;
        match tokio::time::timeout(OPEN_WAIT, answer).await {
            Ok(Ok(Ok(session))) => Ok(session),
            Ok(Ok(Err(reason))) => Err(AppError::NotOpened(reason)),
            Ok(Err(_)) => Err(AppError::Stopped),
            Err(_) => Err(AppError::Timeout(OPEN_WAIT)),
        }
    }

    /// Creates a group session on `channel` (`org/ns/chan`) moderated by this app.
    pub async fn create_group(
        &self,
        channel: &Name,
        config: SessionConfig,
    ) -> Result<SessionId, AppError> {
        let (reply, answer) = oneshot::channel();
        self.command(Command::CreateGroup {
            channel: channel.clone(),
            config,
            reply,
        })
        .await?;
        answer.await.map_err(|_| AppError::Stopped)
    }

    /// Invites any instance of `invitee` into a group this app moderates; returns once it joined.
    pub async fn invite(&self, session: SessionId, invitee: &Name) -> Result<(), AppError> {
        let (reply, answer) = oneshot::channel();
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
        let (reply, answer) = oneshot::channel();
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
        let (reply, answer) = oneshot::channel();
        self.command(Command::Members { session, reply }).await?;
        answer
            .await
            .map_err(|_| AppError::Stopped)?
            .ok_or(AppError::Session(session::SessionError::UnknownSession(
                session,
            )))
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
        let (reply, answer) = oneshot::channel();
        self.command(Command::Publish {
            session,
            publish: session::Publish { to, payload },
            reply,
        })
        .await?;
        Ok(answer.await.map_err(|_| AppError::Stopped)??)
    }

    /// Soft close (`false`) or back online (`true`): the other members are told and stop (or
    /// resume) waiting for this app; back online in an MLS group with a stale epoch, it
    /// rejoins the group through the moderator on its own.
    pub async fn set_online(&self, session: SessionId, online: bool) -> Result<(), AppError> {
        let (reply, answer) = oneshot::channel();
        self.command(Command::SetOnline {
            session,
            online,
            reply,
        })
        .await?;
        Ok(answer.await.map_err(|_| AppError::Stopped)??)
    }

    /// Closes a session: p2p peers are told, a moderator closes the group, a member leaves it.
    /// A `Closed` event follows.
    pub async fn close(&self, session: SessionId) -> Result<(), AppError> {
        let (reply, answer) = oneshot::channel();
        self.command(Command::Close { session, reply }).await?;
        Ok(answer.await.map_err(|_| AppError::Stopped)??)
    }

    /// The session layer's counters: messages, drops by reason, retransmissions.
    pub async fn stats(&self) -> Result<SessionStats, AppError> {
        let (reply, answer) = oneshot::channel();
        self.command(Command::Stats { reply }).await?;
        answer.await.map_err(|_| AppError::Stopped)
    }

    /// The next session event: incoming sessions, messages, membership, losses, closes.
    pub async fn next_event(&self) -> Result<SessionEvent, AppError> {
        self.events
            .lock()
            .await
            .recv()
            .await
            .ok_or(AppError::Stopped)
    }

    async fn command(&self, command: Command) -> Result<(), AppError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| AppError::Stopped)
    }
}

async fn membership_answer(answer: oneshot::Receiver<Result<(), String>>) -> Result<(), AppError> {
    match tokio::time::timeout(OPEN_WAIT, answer).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(reason))) => Err(AppError::Membership(reason)),
        Ok(Err(_)) => Err(AppError::Stopped),
        Err(_) => Err(AppError::Timeout(OPEN_WAIT)),
    }
}

// The backlog policy is the core's, so that both drivers keep the same one; re-exported here,
// where the docs of `publish` and the tests name it.
pub use slim_core::session::EVENT_BACKLOG;

/// drain → arm the timer (moved only earlier: [`slim_core::TimerSlot`]) → wait for one input (a message, a command or the timer).
async fn drive(
    mut layer: SessionLayer,
    client: Client,
    clock: Clock,
    mut commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<SessionEvent>,
) {
    let mut waiters = Waiters::default();
    // Events the application has not taken yet. While there are some, the network is not read
    // (backpressure towards the peers) but commands still are, so an app that publishes
    // without reading its events is never deadlocked.
    let mut backlog: VecDeque<SessionEvent> = VecDeque::new();
    let mut timer = CoreTimer::new();
    loop {
        while let Some(output) = layer.poll_output() {
            match output {
                Output::Send(message) => {
                    if let Err(error) = client.send_message(message).await {
                        tracing::warn!(%error, "link to the node lost");
                        return;
                    }
                }
                // Carried out in order: the core relies on a subscription being in place
                // before what follows it.
                Output::Subscribe(channel) => {
                    if let Err(error) = client.subscribe(&channel).await {
                        tracing::warn!(%channel, %error, "channel subscription failed");
                    }
                }
                Output::Unsubscribe(channel) => {
                    if let Err(error) = client.unsubscribe(&channel).await {
                        tracing::debug!(%channel, %error, "channel unsubscription failed");
                    }
                }
                Output::Event(event) => {
                    if waiters.resolve(&event) {
                        backlog.push_back(event);
                    }
                }
            }
        }
        timer.arm(layer.poll_timeout(), &clock);
        while let Some(event) = backlog.pop_front() {
            match events.try_send(event) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(event)) => {
                    backlog.push_front(event);
                    break;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
        let app_behind = !backlog.is_empty();
        waiters.refuse_when_backlogged(backlog.len());
        // A waiting publish needs the acks: the network is read while there is one, even if
        // the application is behind (it may be waiting for that publish before it reads).
        let read_net = !app_behind || waiters.publishes_waiting();
        tokio::select! {
            permit = events.reserve(), if app_behind => match permit {
                Ok(permit) => {
                    if let Some(event) = backlog.pop_front() {
                        permit.send(event);
                    }
                }
                Err(_) => return,
            },
            message = client.recv_message(), if read_net => match message {
                Ok(message) => layer.handle_message(*message, clock.now()),
                Err(_) => return,
            },
            command = commands.recv() => match command {
                None => return,
                Some(command) => waiters.run(&mut layer, command, clock.now()),
            },
            () = timer.fired() => layer.handle_timeout(clock.now()),
        }
        waiters.retry_publishes(&mut layer, clock.now());
    }
}
