//! Session layer building blocks (spec §4). The reliability halves are complete; the session
//! controllers (p2p and group flows) build on them.

pub mod receiver;
pub mod sender;

pub use receiver::{Incoming, ReceiverEvent, ReliableReceiver, Verdict};
pub use sender::{Outgoing, ReliableSender, SenderEvent};
