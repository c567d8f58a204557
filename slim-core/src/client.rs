//! What the runtime adapters' clients (a router of their own, the application as its local
//! connection, one link to a node) have in common: how their calls fail.

use std::time::Duration;

/// Errors of a client's API, the same on every runtime.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect { endpoint: String, reason: String },
    #[error("the node refused the link: {0}")]
    Refused(String),
    #[error("the link to the node is closed")]
    Closed,
    #[error("the node refused the subscription: {0}")]
    Subscription(String),
    #[error("no answer from the node within {0:?}")]
    Timeout(Duration),
}
