//! The session layer (spec §4): [`SessionLayer`] runs an application's point-to-point sessions on
//! top of the reliability halves ([`ReliableSender`], [`ReliableReceiver`]), and moderated group
//! sessions. [`App`] is the application's handle on a driver of it, for any runtime.

pub mod commands;
pub mod front;
pub mod layer;
pub mod mls;
pub mod receiver;
pub mod rto;
pub mod sender;
pub mod waiting;

pub use layer::{
    CloseReason, LayerConfig, LayerError, Output, Reliability, SessionConfig, SessionDrop,
    SessionError, SessionEvent, SessionId, SessionLayer, SessionStats, ACK_HOLD,
};

pub use commands::{Command, Membership, Replies, Waiters};
pub use front::{App, AppError, AppRuntime, ReplyFuture, Started, OPEN_WAIT};
pub use mls::{MlsState, PayloadError, DEFAULT_VALIDATION_PERCENT};
pub use receiver::{Incoming, ReceiverEvent, ReliableReceiver, Verdict};
pub use sender::{Outgoing, ReliableSender, SenderEvent};
pub use waiting::{Publish, WaitingPublishes, EVENT_BACKLOG};
