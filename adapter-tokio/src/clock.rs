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
