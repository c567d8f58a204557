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

/// The one runtime timer a driver keeps for its core, moved as little as possible.
///
/// Setting a runtime timer to an earlier instant is not free: tokio's timer wheel then wakes
/// its own driver (an `eventfd` write and one more `epoll_wait`), async-io's reactor likewise,
/// and a session core's deadline moves earlier with every message it holds an ack for. So the
/// timer is only ever moved earlier (or set again once it fired); when the core's deadline
/// moves later, the armed timer fires early and the core, whose `handle_timeout` acts only on
/// what is due, does nothing, after which the timer is set to the real deadline.
/// `T` is the instant type the driver compares deadlines in ([`Timestamp`] unless it mixes in
/// deadlines of its own).
#[derive(Debug)]
pub struct TimerSlot<T = Timestamp> {
    armed: Option<T>,
}

impl<T> Default for TimerSlot<T> {
    fn default() -> Self {
        Self { armed: None }
    }
}

impl<T: Ord + Copy> TimerSlot<T> {
    /// Takes the next deadline; `Some(at)` when the runtime timer must be set to `at`.
    pub fn rearm(&mut self, deadline: Option<T>) -> Option<T> {
        let at = deadline?;
        if self.armed.is_some_and(|armed| armed <= at) {
            return None;
        }
        self.armed = Some(at);
        Some(at)
    }

    /// Whether the runtime timer is set (and worth waiting on).
    pub fn is_armed(&self) -> bool {
        self.armed.is_some()
    }

    /// The runtime timer fired: the next deadline sets it again, whatever it is.
    pub fn fired(&mut self) {
        self.armed = None;
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

    #[test]
    fn a_timer_slot_moves_only_earlier_until_it_fires() {
        let at = Timestamp::from_micros;
        let mut slot = TimerSlot::<Timestamp>::default();
        assert_eq!(slot.rearm(None), None);
        assert!(!slot.is_armed());
        assert_eq!(slot.rearm(Some(at(1_000_000))), Some(at(1_000_000)));
        // Earlier: moved. Later or equal: left, to fire early.
        assert_eq!(slot.rearm(Some(at(1_000))), Some(at(1_000)));
        assert_eq!(slot.rearm(Some(at(1_000))), None);
        assert_eq!(slot.rearm(Some(at(1_000_000))), None);
        assert_eq!(slot.rearm(None), None);
        assert!(slot.is_armed());
        // Once fired, the next deadline sets it whatever it is; no deadline leaves it unset.
        slot.fired();
        assert!(!slot.is_armed());
        assert_eq!(slot.rearm(None), None);
        assert!(!slot.is_armed());
        assert_eq!(slot.rearm(Some(at(1_000_000))), Some(at(1_000_000)));
    }
}
