//! Time as the cores see it: a number the caller passes in, never a clock the core reads.

use std::time::Duration;

/// Microseconds since an origin chosen by the driver (the adapter maps it to `Instant`, the
/// simulation to its fake clock). Unlike `Instant` it can be built from a number, so fuzz inputs
/// and replays can carry time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(u64);

impl Timestamp {
    pub const ZERO: Timestamp = Timestamp(0);

    pub const fn from_micros(micros: u64) -> Self {
        Self(micros)
    }

    pub const fn as_micros(self) -> u64 {
        self.0
    }

    /// Time from `earlier` to `self`, zero if `earlier` is later.
    pub fn saturating_since(self, earlier: Timestamp) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0))
    }
}

impl std::ops::Add<Duration> for Timestamp {
    type Output = Timestamp;
    fn add(self, rhs: Duration) -> Timestamp {
        Timestamp(
            self.0
                .saturating_add(u64::try_from(rhs.as_micros()).unwrap_or(u64::MAX)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates() {
        let t = Timestamp::from_micros(10);
        assert_eq!((t + Duration::from_micros(5)).as_micros(), 15);
        assert_eq!(
            Timestamp::from_micros(u64::MAX) + Duration::from_secs(1),
            Timestamp::from_micros(u64::MAX)
        );
        assert_eq!(
            t.saturating_since(Timestamp::from_micros(20)),
            Duration::ZERO
        );
        assert_eq!(
            Timestamp::from_micros(20).saturating_since(t),
            Duration::from_micros(10)
        );
    }
}
