//! A progress bar on stderr for `slim-tokio bench`. Only drawn when asked (the CLI asks when
//! stderr is a terminal and the output is not `--json`), and never on the hot path: a ticker
//! task reads the counters ten times a second.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinHandle;

use super::Stop;

/// What the throughput phase has done so far; bumped by the bench's tasks.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Messages published.
    pub sent: AtomicU64,
    /// Deliveries counted by the receivers.
    pub received: AtomicU64,
}

/// A bar, or nothing when disabled. Dropping it stops the ticker and clears the bar.
pub(crate) struct Progress {
    bar: Option<ProgressBar>,
    ticker: Option<JoinHandle<()>>,
}

const TICK: Duration = Duration::from_millis(100);

fn bar(len: u64, template: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr_with_hz(10));
    // The templates are constants; a typo would show as the default style, not as a failure.
    bar.set_style(
        ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

impl Progress {
    fn off() -> Progress {
        Progress {
            bar: None,
            ticker: None,
        }
    }

    /// The throughput phase: elapsed time against the duration, or deliveries against
    /// `count × copies` (`copies`: deliveries per publish).
    pub fn throughput(enabled: bool, stop: Stop, copies: u64, counters: Arc<Counters>) -> Progress {
        if !enabled {
            return Progress::off();
        }
        let (len, template) = match stop {
            Stop::Duration(d) => (
                d.as_millis() as u64,
                "throughput [{bar:30}] {elapsed:>4} {msg}",
            ),
            Stop::Count(n) => (
                n.saturating_mul(copies),
                "throughput [{bar:30}] {pos}/{len} delivered, {elapsed} {msg}",
            ),
        };
        let bar = bar(len, template);
        let ticker = {
            let bar = bar.clone();
            tokio::spawn(async move {
                let start = Instant::now();
                loop {
                    tokio::time::sleep(TICK).await;
                    let elapsed = start.elapsed();
                    let sent = counters.sent.load(Ordering::Relaxed);
                    let received = counters.received.load(Ordering::Relaxed);
                    bar.set_position(match stop {
                        Stop::Duration(_) => (elapsed.as_millis() as u64).min(len),
                        Stop::Count(_) => received,
                    });
                    bar.set_message(format!(
                        "{sent} sent, {received} received, {:.0} msgs/s",
                        received as f64 / elapsed.as_secs_f64().max(1e-3)
                    ));
                }
            })
        };
        Progress {
            bar: Some(bar),
            ticker: Some(ticker),
        }
    }

    /// The round-trip phase: one [`Progress::inc`] per round trip.
    pub fn round_trips(enabled: bool, total: u64) -> Progress {
        if !enabled {
            return Progress::off();
        }
        Progress {
            bar: Some(bar(total, "round trips [{bar:30}] {pos}/{len} {elapsed}")),
            ticker: None,
        }
    }

    pub fn inc(&self) {
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(ticker) = &self.ticker {
            ticker.abort();
        }
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
