//! Maps the wall clock onto the cores' [`Timestamp`]s (microseconds since the driver started).

use std::time::{Duration, Instant};

use slim_core::Timestamp;

#[derive(Debug)]
pub(crate) struct Clock {
    origin: Instant,
}

impl Clock {
    pub(crate) fn new() -> Self {
        Self {
            origin: Instant::now(),
        }
    }

    pub(crate) fn now(&self) -> Timestamp {
        Timestamp::from_micros(self.origin.elapsed().as_micros() as u64)
    }

    pub(crate) fn to_instant(&self, at: Timestamp) -> Instant {
        self.origin + Duration::from_micros(at.as_micros())
    }
}
