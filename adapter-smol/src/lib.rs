//! smol driver for the SLIM cores: an application's link to a SLIM node, and its sessions.
//!
//! * [`Client`] (module [`app`]): raw data-plane messaging. Like the reference SDK, a client runs
//!   its own router core: the application is a local connection of it, and the node is reached
//!   over one Edge link (negotiated, header-MAC signed), redialled when it is lost.
//! * [`session::App`]: point-to-point sessions and moderated groups (handshakes, reliability,
//!   membership, close) driven by the Sans-IO [`slim_core::session::SessionLayer`] on top of a
//!   [`Client`], with the same API as `slim_tokio::session::App`.
//!
//! Every driver follows the Sans-IO loop: drain the core's outputs, arm one `smol::Timer`, wait
//! for exactly one input. h2 runs on smol's sockets through `tokio_util::compat` (tokio's I/O
//! traits only): no tokio runtime is started or needed.
//!
//! ```no_run
//! # fn main() -> Result<(), slim_smol::session::AppError> {
//! use slim_proto::Name;
//! use slim_smol::session::{App, Reliability, SessionConfig, SessionEvent};
//! smol::block_on(async {
//!     let secret = "a-shared-secret-of-at-least-32-bytes!";
//!     let app = App::connect("http://127.0.0.1:46357", Name::new("org", "ns", "alice"), secret)
//!         .await?;
//!     let config = SessionConfig {
//!         reliability: Some(Reliability {
//!             interval: std::time::Duration::from_millis(500),
//!             max_retries: 5,
//!         }),
//!         ..SessionConfig::default()
//!     };
//!     let session = app.open_session(&Name::new("org", "ns", "bob"), config).await?;
//!     app.publish(session, &b"hello"[..]).await?;
//!     while let Ok(event) = app.next_event().await {
//!         if let SessionEvent::Message { payload, .. } = event {
//!             println!("bob answered {} bytes", payload.len());
//!             break;
//!         }
//!     }
//!     app.close(session).await?;
//!     Ok(())
//! })
//! # }
//! ```

pub mod app;
pub mod session;

mod clock;

use std::future::Future;
use std::time::Duration;

use futures_lite::future;

pub use app::{Client, ClientError, Received};

/// The SLIM version this client announces in link negotiations (semver, as nodes require).
pub const SLIM_VERSION: &str = env!("CARGO_PKG_VERSION");

/// `Some(output)` of `work`, or `None` once `limit` passed.
async fn with_timeout<T>(limit: Duration, work: impl Future<Output = T>) -> Option<T> {
    future::or(async { Some(work.await) }, async {
        smol::Timer::after(limit).await;
        None
    })
    .await
}

/// Waits for whichever of `a` and `b` is ready; `flip` picks which is polled first.
/// `future::or` always prefers its first future, so drivers alternate `flip` to keep a busy
/// network from starving the application's commands (and the other way round).
async fn either_first<T>(flip: bool, a: impl Future<Output = T>, b: impl Future<Output = T>) -> T {
    if flip {
        future::or(a, b).await
    } else {
        future::or(b, a).await
    }
}

/// A driver's one runtime timer for its core's deadline, moved only earlier
/// ([`slim_core::TimerSlot`] says why).
struct CoreTimer {
    slot: slim_core::TimerSlot<std::time::Instant>,
    timer: smol::Timer,
}

impl CoreTimer {
    fn new() -> Self {
        Self {
            slot: slim_core::TimerSlot::default(),
            timer: smol::Timer::never(),
        }
    }

    /// Takes the next deadline.
    fn arm(&mut self, deadline: Option<std::time::Instant>) {
        if let Some(at) = self.slot.rearm(deadline) {
            self.timer.set_at(at);
        }
    }

    /// Resolves when the timer fires; never while it is not set.
    async fn fired(&mut self) {
        if !self.slot.is_armed() {
            future::pending::<()>().await;
        }
        (&mut self.timer).await;
        self.slot.fired();
    }
}
