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
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_channel::oneshot;
use futures_lite::future;
use slim_core::session::{self, AppRuntime, Output, ReplyFuture, SessionLayer, Started};
use slim_proto::pb;
use smol::channel::{self, Receiver, Sender, TrySendError};

use crate::app::{Client, ClientError};
use crate::clock::Clock;
use crate::{either_first, with_timeout, CoreTimer};

pub use slim_core::session::{
    AppError, CloseReason, Reliability, SessionConfig, SessionError, SessionEvent, SessionId,
    SessionStats,
};

/// An application with sessions, on smol (see [`slim_core::session::App`] for its calls).
/// Dropping it stops it (and closes its link).
pub type App = session::App<Smol>;

const COMMANDS: usize = 1024;
const EVENTS: usize = 4096;

/// The smol half of an [`App`]. The driver answers its application's commands on one-shot
/// channels (runtime-free, never wait).
pub struct Smol;

impl session::Replies for Smol {
    type Reply<T> = oneshot::Sender<T>;

    fn answer<T>(reply: oneshot::Sender<T>, value: T) -> bool {
        reply.send(value).is_ok()
    }
}

impl AppRuntime for Smol {
    type Commands = Sender<Command>;
    type Events = Receiver<SessionEvent>;
    /// Cancelled when dropped.
    type Driver = smol::Task<()>;
    type Answer<T: Send + 'static> = ReplyFuture<oneshot::Receiver<T>>;

    fn reply_pair<T: Send + 'static>() -> (oneshot::Sender<T>, Self::Answer<T>) {
        let (reply, answer) = oneshot::channel();
        (reply, ReplyFuture(answer))
    }

    async fn send_command(commands: &Self::Commands, command: Command) -> bool {
        commands.send(command).await.is_ok()
    }

    async fn next_event(events: &Self::Events) -> Option<SessionEvent> {
        events.recv().await.ok()
    }

    async fn within<F: Future + Send>(limit: Duration, future: F) -> Option<F::Output> {
        with_timeout(limit, future).await
    }

    fn seed() -> Result<[u8; 32], String> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| e.to_string())?;
        Ok(seed)
    }

    fn unix_now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }

    async fn start(endpoint: &str, layer: SessionLayer) -> Result<Started<Self>, AppError> {
        let clock = Clock::new();
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
        Ok(Started {
            commands,
            events,
            driver,
        })
    }
}

type Command = session::Command<Smol>;
type Waiters = session::Waiters<Smol>;

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
