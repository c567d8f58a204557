//! Maps the tokio clock onto the cores' [`Timestamp`]s.

use std::time::Instant;

use slim_core::Timestamp;

/// Microseconds since the node started.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock {
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
        }
    }

    pub fn now(&self) -> Timestamp {
        Timestamp::from_micros(self.origin.elapsed().as_micros() as u64)
    }

    pub fn to_instant(&self, at: Timestamp) -> Instant {
        self.origin + std::time::Duration::from_micros(at.as_micros())
    }
}

/// A driver's one runtime timer for its core's deadline, moved only earlier
/// ([`slim_core::TimerSlot`] says why).
pub(crate) struct CoreTimer {
    slot: slim_core::TimerSlot,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl CoreTimer {
    pub(crate) fn new() -> Self {
        Self {
            slot: slim_core::TimerSlot::default(),
            sleep: Box::pin(tokio::time::sleep(std::time::Duration::ZERO)),
        }
    }

    /// Takes the core's next deadline.
    pub(crate) fn arm(&mut self, deadline: Option<Timestamp>, clock: &Clock) {
        if let Some(at) = self.slot.rearm(deadline) {
            let at = tokio::time::Instant::from_std(clock.to_instant(at));
            self.sleep.as_mut().reset(at);
        }
    }

    /// Resolves when the timer fires; never while it is not set.
    pub(crate) async fn fired(&mut self) {
        if !self.slot.is_armed() {
            std::future::pending::<()>().await;
        }
        self.sleep.as_mut().await;
        self.slot.fired();
    }
}
