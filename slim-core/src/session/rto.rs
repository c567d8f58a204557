//! Adaptive retransmission timing for the reliable sender (data retransmissions) and receiver
//! (RTX requests): a round-trip estimate (RFC 6298) and exponential backoff per message.
//!
//! The configured `interval` stays the floor, so a quiet path behaves as before for the first
//! retransmission. What changes is a congested path: with a fixed interval, once queueing delays
//! approach it every unacknowledged message is sent again, which adds load, which lengthens the
//! queues (the retransmission storm of BENCHMARKS.md, "Soak: 1 000 reliable sessions"). Here the
//! timeout grows with the measured round trip, and each further try of one message waits twice
//! as long as the one before.
//!
//! The rules, for a session with `interval` I and `max_retries` R:
//!
//! * `rto = clamp(srtt + 4·rttvar, I, 8·I)`, where `srtt`/`rttvar` follow RFC 6298 §2 from
//!   samples taken only for messages answered without having been sent twice (Karn's rule: the
//!   answer to a copy cannot be told from the answer to the original). Before any sample
//!   `rto = I`.
//! * Try `k` of a message (0 = the first transmission) waits `min(rto·2^(b + k), 8·I)` for its
//!   answer, where `b` is the sender's backoff level when the message first went out; tries
//!   1..=R are retransmissions, and when try R's wait runs out the message is given up.
//! * The level `b` (0..=3) persists across messages, as RFC 6298 §5.5 keeps a backed-off RTO
//!   for new data: a timeout raises it to the exponent of the timed-out message's next try, and
//!   a round-trip sample resets it to 0. Without it, a sudden delay above `rto` would get every
//!   message sent twice, and the acks of copies are never samples, so the estimate could not
//!   learn the new delay. (The receiver does not keep a level: its RTX requests are rare, and a
//!   level raised by one unanswered gap would outlive the congestion by far, for lack of
//!   samples to reset it.)
//! * With `b = 0` (the normal case: any ack of a message sent once resets it), a message is
//!   given up after `Σ_{k=0..=R} min(rto·2^k, 8·I)`: on a quiet path (`rto = I`) that is
//!   [`quiet_give_up`] = `I·(1 + 2 + 4 + 8·(R − 2))` for R ≥ 3 (71 s for the default 1 s × 10,
//!   was 11 s); never more than [`worst_give_up`] = `8·I·(R + 1)` (88 s by default).

use std::time::Duration;

/// The longest wait, in intervals, for one try (and the most the round-trip estimate may raise
/// the timeout to). Three doublings: a message rides out queueing delays of up to ~15 intervals
/// with at most 4 copies (the fixed timer sent 15), so a congested path gets far less extra
/// load; yet a peer back from a partition gets the next copy within 8 intervals (8 s by
/// default), and the give-up time stays bounded ([`worst_give_up`]) for sessions whose peer is
/// gone for good. TCP caps its backoff at ≥ 60 s; our messages are application requests, and a
/// minute of silence is already past what the callers wait for.
pub const BACKOFF_CAP: u32 = 8;
/// The highest backoff level worth keeping: `rto ≥ interval`, so `rto·2^3` reaches the cap.
pub const MAX_LEVEL: u32 = 3;

/// RFC 6298 round-trip estimate, bounded to `[interval, BACKOFF_CAP·interval]`, and the
/// backoff level new messages start at.
#[derive(Debug, Clone)]
pub struct RtoEstimator {
    interval: Duration,
    /// Smoothed round trip and its variation; `None` until the first sample.
    srtt: Option<Duration>,
    rttvar: Duration,
    level: u32,
}

impl RtoEstimator {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            srtt: None,
            rttvar: Duration::ZERO,
            level: 0,
        }
    }

    /// A round trip measured on an answer to a message sent only once (Karn's rule is the
    /// caller's to apply). The path answers within the estimate again: the backoff level goes.
    pub fn sample(&mut self, rtt: Duration) {
        self.level = 0;
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(srtt) => {
                // RFC 6298 §2.3 with alpha = 1/8, beta = 1/4; rttvar first, from the old srtt.
                let deviation = srtt.abs_diff(rtt);
                self.rttvar = (self.rttvar.saturating_mul(3) + deviation) / 4;
                self.srtt = Some((srtt.saturating_mul(7) + rtt) / 8);
            }
        }
    }

    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    pub fn rttvar(&self) -> Duration {
        self.rttvar
    }

    /// The longest any try waits: `BACKOFF_CAP` intervals.
    pub fn max_wait(&self) -> Duration {
        self.interval.saturating_mul(BACKOFF_CAP)
    }

    /// The base timeout: `clamp(srtt + 4·rttvar, interval, max_wait)`.
    pub fn rto(&self) -> Duration {
        let estimate = self.srtt.map_or(Duration::ZERO, |srtt| {
            srtt.saturating_add(self.rttvar.saturating_mul(4))
        });
        estimate.max(self.interval).min(self.max_wait())
    }

    /// How long a try waits for its answer: the timeout doubled `exponent` times (the level
    /// the message started at plus its retransmissions so far), up to `max_wait`.
    pub fn wait(&self, exponent: u32) -> Duration {
        let factor = 1u32.checked_shl(exponent).unwrap_or(u32::MAX);
        self.rto().saturating_mul(factor).min(self.max_wait())
    }

    /// The backoff level a message sent now starts at.
    pub fn level(&self) -> u32 {
        self.level
    }

    /// A try timed out and the next one waits with `exponent`: new messages start there too,
    /// until a sample shows the path answers in time again.
    pub fn backed_off(&mut self, exponent: u32) {
        self.level = self.level.max(exponent.min(MAX_LEVEL));
    }
}

/// When a message is given up on a quiet path (`srtt + 4·rttvar` at most `interval`):
/// `Σ_{k=0..=max_retries} min(interval·2^k, BACKOFF_CAP·interval)`.
pub fn quiet_give_up(interval: Duration, max_retries: u32) -> Duration {
    let quiet = RtoEstimator::new(interval);
    (0..=max_retries).fold(Duration::ZERO, |total, k| {
        total.saturating_add(quiet.wait(k))
    })
}

/// The latest a message can be given up, whatever the round-trip estimate:
/// `BACKOFF_CAP·interval·(max_retries + 1)`.
pub fn worst_give_up(interval: Duration, max_retries: u32) -> Duration {
    interval
        .saturating_mul(BACKOFF_CAP)
        .saturating_mul(max_retries.saturating_add(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);
    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn quiet_path_keeps_the_interval() {
        let mut e = RtoEstimator::new(SEC);
        assert_eq!(e.rto(), SEC, "no sample yet");
        for _ in 0..20 {
            e.sample(ms(5));
        }
        assert_eq!(e.srtt(), Some(ms(5)));
        assert_eq!(e.rto(), SEC, "5 ms round trips: the interval is the floor");
    }

    #[test]
    fn estimator_follows_rfc6298() {
        let mut e = RtoEstimator::new(ms(100));
        e.sample(ms(400));
        // First sample: srtt = R, rttvar = R/2, rto = R + 4·R/2 = 3R.
        assert_eq!((e.srtt(), e.rttvar()), (Some(ms(400)), ms(200)));
        assert_eq!(e.rto(), ms(800), "3R = 1.2 s, capped at 8 intervals");
        e.sample(ms(200));
        // rttvar = 3/4·200 + 1/4·|400 − 200| = 200; srtt = 7/8·400 + 1/8·200 = 375.
        assert_eq!((e.srtt(), e.rttvar()), (Some(ms(375)), ms(200)));
        let mut e = RtoEstimator::new(ms(100));
        e.sample(ms(20));
        assert_eq!(e.rto(), ms(100), "3R = 60 ms: the floor");
        e.sample(ms(60));
        // rttvar = 3/4·10 + 1/4·40 = 17.5; srtt = 7/8·20 + 1/8·60 = 25; rto = 25 + 70 = 95.
        assert_eq!((e.srtt(), e.rttvar()), (Some(ms(25)), ms(17) + ms(1) / 2));
        assert_eq!(e.rto(), ms(100));
        e.sample(ms(90));
        // rttvar = 3/4·17.5 + 1/4·65 = 29.375; srtt = 7/8·25 + 1/8·90 = 33.125.
        assert_eq!(e.rto(), Duration::from_micros(33_125 + 4 * 29_375));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let e = RtoEstimator::new(SEC);
        let waits: Vec<u64> = (0..6).map(|k| e.wait(k).as_secs()).collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 8, 8]);
        assert_eq!(e.wait(40), SEC * 8, "no overflow on long schedules");
        let mut slow = RtoEstimator::new(SEC);
        slow.sample(SEC);
        assert_eq!(slow.rto(), SEC * 3);
        let waits: Vec<u64> = (0..3).map(|k| slow.wait(k).as_secs()).collect();
        assert_eq!(waits, vec![3, 6, 8]);
    }

    #[test]
    fn backoff_level_persists_until_a_sample() {
        let mut e = RtoEstimator::new(SEC);
        e.backed_off(1);
        assert_eq!((e.level(), e.wait(e.level())), (1, SEC * 2));
        e.backed_off(0);
        assert_eq!(e.level(), 1, "never lowered by a timeout");
        e.backed_off(40);
        assert_eq!((e.level(), e.wait(e.level())), (MAX_LEVEL, SEC * 8));
        e.sample(ms(5));
        assert_eq!((e.level(), e.wait(e.level())), (0, SEC));
    }

    #[test]
    fn give_up_bounds() {
        assert_eq!(quiet_give_up(SEC, 10), SEC * 71);
        assert_eq!(quiet_give_up(SEC, 2), SEC * 7);
        assert_eq!(quiet_give_up(SEC, 0), SEC);
        assert_eq!(worst_give_up(SEC, 10), SEC * 88);
        assert_eq!(
            worst_give_up(SEC, u32::MAX),
            SEC * 8 * u32::MAX,
            "saturates instead of wrapping"
        );
    }
}
