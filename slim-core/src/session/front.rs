//! The application's handle on a session driver, for any async runtime: [`App`] turns each call
//! into a [`Command`] for the driver task and maps the answer to a result. The runtime's part
//! (channels, the driver task, a bounded wait, the OS's randomness and clock) comes in through
//! [`AppRuntime`]; the driver loop itself is the adapter's. Nothing here does I/O itself.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use slim_proto::Name;

use super::commands::{Command, Membership, Replies};
use super::waiting::Publish;
use super::{
    CloseReason, LayerConfig, LayerError, SessionConfig, SessionError, SessionEvent, SessionId,
    SessionLayer, SessionStats,
};
use crate::client::ClientError;

/// How long `open_session`, `invite` and `remove` wait for their outcome at most (the core gives
/// up on its own after its control retries; this only bounds the wait).
pub const OPEN_WAIT: Duration = Duration::from_secs(60);

/// Errors of the session API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("the session could not be opened: {0:?}")]
    NotOpened(CloseReason),
    #[error("the application stopped")]
    Stopped,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the membership change failed: {0}")]
    Membership(String),
}

/// A reply's receiving half whose only error is "the driver dropped the reply": `None` then.
pub struct ReplyFuture<F>(pub F);

impl<F, T, E> Future for ReplyFuture<F>
where
    F: Future<Output = Result<T, E>> + Unpin,
{
    type Output = Option<T>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<T>> {
        std::pin::Pin::new(&mut self.0).poll(cx).map(Result::ok)
    }
}

/// What an [`App`] needs of its runtime.
pub trait AppRuntime: Replies + Sized + Send + Sync + 'static {
    /// Where commands go to the driver.
    type Commands: Send + Sync;
    /// Where the driver's events come from.
    type Events: Send + Sync;
    /// Stops the driver when dropped.
    type Driver: Send + Sync;
    /// The receiving half of a reply: `None` once the driver dropped it unanswered.
    type Answer<T: Send + 'static>: Future<Output = Option<T>> + Send;

    /// A one-shot reply channel.
    fn reply_pair<T: Send + 'static>() -> (Self::Reply<T>, Self::Answer<T>);
    /// Hands `command` to the driver, waiting while its queue is full; false once it is gone.
    fn send_command(
        commands: &Self::Commands,
        command: Command<Self>,
    ) -> impl Future<Output = bool> + Send;
    /// The next event; `None` once the driver is gone. Cancel-safe: an event is taken only
    /// when the future completes (applications `select!` on it).
    fn next_event(events: &Self::Events) -> impl Future<Output = Option<SessionEvent>> + Send;
    /// `future`'s output, or `None` if it takes longer than `limit`.
    fn within<F: Future + Send>(
        limit: Duration,
        future: F,
    ) -> impl Future<Output = Option<F::Output>> + Send;
    /// 32 bytes from the OS, to seed the session layer.
    fn seed() -> Result<[u8; 32], String>;
    /// Seconds since the Unix epoch now (identity tokens carry it).
    fn unix_now() -> u64;
    /// Connects to the node at `endpoint` as `layer`'s name, makes that name reachable there, and
    /// starts a driver for `layer`.
    fn start(
        endpoint: &str,
        layer: SessionLayer,
    ) -> impl Future<Output = Result<Started<Self>, AppError>> + Send;
}

/// A driver just started for an [`App`]: the ends the app keeps.
pub struct Started<R: AppRuntime> {
    pub commands: R::Commands,
    pub events: R::Events,
    pub driver: R::Driver,
}

/// An application with sessions. Dropping it stops it (and closes its link).
pub struct App<R: AppRuntime> {
    name: Name,
    commands: R::Commands,
    events: R::Events,
    _driver: R::Driver,
}

impl<R: AppRuntime> std::fmt::Debug for App<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("name", &self.name.to_string())
            .finish_non_exhaustive()
    }
}

impl<R: AppRuntime> App<R> {
    /// Connects to a node as `name` (`org/ns/service`; the instance id comes from the identity
    /// derived from `secret`), and makes the app reachable there.
    pub async fn connect(endpoint: &str, name: Name, secret: &str) -> Result<Self, AppError> {
        let seed = R::seed().map_err(|reason| ClientError::Connect {
            endpoint: endpoint.to_owned(),
            reason: format!("no OS randomness: {reason}"),
        })?;
        let layer = SessionLayer::new(
            LayerConfig {
                name,
                secret: secret.to_owned(),
                unix_at_zero: R::unix_now(),
            },
            seed,
        )?;
        let name = layer.name().clone();
        let Started {
            commands,
            events,
            driver,
        } = R::start(endpoint, layer).await?;
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
        let answer = self
            .ask(|reply| Command::Open {
                peer: peer.clone(),
                config,
                reply,
            })
            .await?;
        match R::within(OPEN_WAIT, answer).await {
            Some(Some(Ok(session))) => Ok(session),
            Some(Some(Err(reason))) => Err(AppError::NotOpened(reason)),
            Some(None) => Err(AppError::Stopped),
            None => Err(AppError::Timeout(OPEN_WAIT)),
        }
    }

    /// Creates a group session on `channel` (`org/ns/chan`) moderated by this app.
    pub async fn create_group(
        &self,
        channel: &Name,
        config: SessionConfig,
    ) -> Result<SessionId, AppError> {
        let answer = self
            .ask(|reply| Command::CreateGroup {
                channel: channel.clone(),
                config,
                reply,
            })
            .await?;
        answer.await.ok_or(AppError::Stopped)
    }

    /// Invites any instance of `invitee` into a group this app moderates; returns once it joined.
    pub async fn invite(&self, session: SessionId, invitee: &Name) -> Result<(), AppError> {
        let answer = self
            .ask(|reply| Command::Invite {
                session,
                invitee: invitee.clone(),
                reply,
            })
            .await?;
        membership_answer::<R>(answer).await
    }

    /// Removes a member (full name, or service name) from a group this app moderates; returns
    /// once it left.
    pub async fn remove(&self, session: SessionId, member: &Name) -> Result<(), AppError> {
        let answer = self
            .ask(|reply| Command::Remove {
                session,
                member: member.clone(),
                reply,
            })
            .await?;
        membership_answer::<R>(answer).await
    }

    /// The members of a group session (everyone, this app included).
    pub async fn members(&self, session: SessionId) -> Result<Vec<Name>, AppError> {
        let answer = self
            .ask(|reply| Command::Members { session, reply })
            .await?;
        answer
            .await
            .ok_or(AppError::Stopped)?
            .ok_or(AppError::Session(SessionError::UnknownSession(session)))
    }

    /// Sends `payload` on a session (to the peer, or to every group member); returns its
    /// sequence id. On a reliable session whose send queue is full (the receivers are behind
    /// on their acknowledgements) it waits until there is room, unless this application is
    /// more than [`EVENT_BACKLOG`](super::EVENT_BACKLOG) events behind its event queue (every
    /// acknowledged message is a `Delivered` event): then it fails with `SendQueueFull`, and
    /// the events must be read.
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
        let answer = self
            .ask(|reply| Command::Publish {
                session,
                publish: Publish { to, payload },
                reply,
            })
            .await?;
        Ok(answer.await.ok_or(AppError::Stopped)??)
    }

    /// Soft close (`false`) or back online (`true`): the other members are told and stop (or
    /// resume) waiting for this app; back online in an MLS group with a stale epoch, it
    /// rejoins the group through the moderator on its own.
    pub async fn set_online(&self, session: SessionId, online: bool) -> Result<(), AppError> {
        let answer = self
            .ask(|reply| Command::SetOnline {
                session,
                online,
                reply,
            })
            .await?;
        Ok(answer.await.ok_or(AppError::Stopped)??)
    }

    /// Closes a session: p2p peers are told, a moderator closes the group, a member leaves it.
    /// A `Closed` event follows.
    pub async fn close(&self, session: SessionId) -> Result<(), AppError> {
        let answer = self.ask(|reply| Command::Close { session, reply }).await?;
        Ok(answer.await.ok_or(AppError::Stopped)??)
    }

    /// The session layer's counters: messages, drops by reason, retransmissions.
    pub async fn stats(&self) -> Result<SessionStats, AppError> {
        let answer = self.ask(|reply| Command::Stats { reply }).await?;
        answer.await.ok_or(AppError::Stopped)
    }

    /// The next session event: incoming sessions, messages, deliveries, membership, losses,
    /// closes.
    ///
    /// Cancel-safe: an event is only taken when the future completes.
    pub async fn next_event(&self) -> Result<SessionEvent, AppError> {
        R::next_event(&self.events).await.ok_or(AppError::Stopped)
    }

    /// Hands the driver the command `build` makes around a fresh reply channel; its answer.
    async fn ask<T: Send + 'static>(
        &self,
        build: impl FnOnce(R::Reply<T>) -> Command<R>,
    ) -> Result<R::Answer<T>, AppError> {
        let (reply, answer) = R::reply_pair();
        if R::send_command(&self.commands, build(reply)).await {
            Ok(answer)
        } else {
            Err(AppError::Stopped)
        }
    }
}

async fn membership_answer<R: AppRuntime>(answer: R::Answer<Membership>) -> Result<(), AppError> {
    match R::within(OPEN_WAIT, answer).await {
        Some(Some(Ok(()))) => Ok(()),
        Some(Some(Err(reason))) => Err(AppError::Membership(reason)),
        Some(None) => Err(AppError::Stopped),
        None => Err(AppError::Timeout(OPEN_WAIT)),
    }
}
