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
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use slim_core::session::{self, AppRuntime, Output, ReplyFuture, SessionLayer, Started};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::app::Client;
use crate::clock::{Clock, CoreTimer};

pub use slim_core::session::{
    AppError, CloseReason, Reliability, SessionConfig, SessionError, SessionEvent, SessionId,
    SessionStats,
};

/// An application with sessions, on tokio (see [`slim_core::session::App`] for its calls).
/// Dropping it stops it.
pub type App = session::App<Tokio>;

/// Commands waiting for the driver; a full queue makes callers wait.
const COMMANDS: usize = 1024;
/// Events waiting for the application; beyond them the driver stops reading the network.
const EVENTS: usize = 4096;

/// The tokio half of an [`App`]: one-shot channels for answers, a task for the driver.
pub struct Tokio;

impl session::Replies for Tokio {
    type Reply<T> = oneshot::Sender<T>;

    fn answer<T>(reply: oneshot::Sender<T>, value: T) -> bool {
        reply.send(value).is_ok()
    }
}

/// Aborts the driver task when the app is dropped.
pub struct DriverTask(JoinHandle<()>);

impl Drop for DriverTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl AppRuntime for Tokio {
    type Commands = mpsc::Sender<Command>;
    // `recv` needs the receiver mutably; the app's calls take it shared.
    type Events = tokio::sync::Mutex<mpsc::Receiver<SessionEvent>>;
    type Driver = DriverTask;
    type Answer<T: Send + 'static> = ReplyFuture<oneshot::Receiver<T>>;

    fn reply_pair<T: Send + 'static>() -> (oneshot::Sender<T>, Self::Answer<T>) {
        let (reply, answer) = oneshot::channel();
        (reply, ReplyFuture(answer))
    }

    async fn send_command(commands: &Self::Commands, command: Command) -> bool {
        commands.send(command).await.is_ok()
    }

    async fn next_event(events: &Self::Events) -> Option<SessionEvent> {
        events.lock().await.recv().await
    }

    async fn within<F: Future + Send>(limit: Duration, future: F) -> Option<F::Output> {
        tokio::time::timeout(limit, future).await.ok()
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
        let (commands, command_rx) = mpsc::channel(COMMANDS);
        let (event_tx, events) = mpsc::channel(EVENTS);
        let driver = tokio::spawn(drive(layer, client, clock, command_rx, event_tx));
        Ok(Started {
            commands,
            events: tokio::sync::Mutex::new(events),
            driver: DriverTask(driver),
        })
    }
}

type Command = session::Command<Tokio>;
type Waiters = session::Waiters<Tokio>;

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
