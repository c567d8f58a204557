//! Sans-IO SLIM protocol cores.
//!
//! Every core is a plain struct driven the same way (see `shared/design/sansio.md`):
//! feed it input with `handle_*(…, now)`, drain [`router::Output`]s with `poll_output()` until it
//! returns `None`, and wake it at `poll_timeout()` with `handle_timeout(now)`. Cores never read a
//! clock, never do I/O and take their randomness from a seed given at construction, so one seed
//! and one input sequence always give the same outputs.
//!
//! Input from a peer never makes a core fail or panic: bad input is dropped, counted in
//! `stats()` with a reason, and traced.

pub mod client;
pub mod fuzzing;
pub mod group;
pub mod identity;
pub mod router;
pub mod session;
pub mod sim;
pub mod time;

pub use time::{TimerSlot, Timestamp};
