//! Counters of what a router did and why it dropped what it dropped.

use std::fmt;

/// Why a received message was not routed. Each drop is counted under exactly one reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum DropReason {
    /// The bytes are not a protobuf `Message`.
    Malformed,
    /// A `Message` that breaks a rule of spec §1.2 (e.g. a publish without destination).
    Invalid,
    /// The connection id is not (or no longer) known.
    UnknownConnection,
    /// A link negotiation after the link was established.
    RepeatedNegotiation,
    /// A routed message without the header MAC its link requires.
    MacMissing,
    /// A routed message whose header MAC does not verify.
    MacInvalid,
    /// TTL reached zero.
    TtlExpired,
    /// Nobody is subscribed to the destination.
    NoRoute,
    /// `forward_to` names a connection that does not exist.
    UnknownForwardTo,
    /// `forward_to` on a publish from a connection that may not steer traffic.
    ForwardToRefused,
    /// A SubscriptionAck nobody was waiting for.
    UnexpectedAck,
}

impl DropReason {
    pub const ALL: [DropReason; 11] = [
        DropReason::Malformed,
        DropReason::Invalid,
        DropReason::UnknownConnection,
        DropReason::RepeatedNegotiation,
        DropReason::MacMissing,
        DropReason::MacInvalid,
        DropReason::TtlExpired,
        DropReason::NoRoute,
        DropReason::UnknownForwardTo,
        DropReason::ForwardToRefused,
        DropReason::UnexpectedAck,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::Invalid => "invalid",
            DropReason::UnknownConnection => "unknown_connection",
            DropReason::RepeatedNegotiation => "repeated_negotiation",
            DropReason::MacMissing => "mac_missing",
            DropReason::MacInvalid => "mac_invalid",
            DropReason::TtlExpired => "ttl_expired",
            DropReason::NoRoute => "no_route",
            DropReason::UnknownForwardTo => "unknown_forward_to",
            DropReason::ForwardToRefused => "forward_to_refused",
            DropReason::UnexpectedAck => "unexpected_ack",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A snapshot-able view of the router's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Messages handed to `handle_frame`.
    pub received: u64,
    /// Copies of publishes sent on (one per output connection).
    pub forwarded: u64,
    pub subscribes: u64,
    pub unsubscribes: u64,
    /// SubscriptionAcks sent (success or failure).
    pub acks_sent: u64,
    /// Subscribe/Unsubscribe requests answered with `success = false`.
    pub subscription_failures: u64,
    pub links_established: u64,
    /// Connections closed by the router (failed negotiation, protocol violation).
    pub connections_refused: u64,
    /// Open connections right now.
    pub connections: u64,
    /// `(connection, name, subscription id)` records right now.
    pub subscriptions: u64,
    dropped: [u64; DropReason::ALL.len()],
}

impl Stats {
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason.index()]
    }

    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().sum()
    }

    /// Counts a drop; returns the new count for that reason.
    pub(crate) fn count_drop(&mut self, reason: DropReason) -> u64 {
        let slot = &mut self.dropped[reason.index()];
        *slot += 1;
        *slot
    }

    /// `(reason, count)` for every reason with a non-zero count.
    pub fn drops(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL
            .iter()
            .map(|r| (*r, self.dropped(*r)))
            .filter(|(_, n)| *n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_index_their_own_slot() {
        for (i, reason) in DropReason::ALL.iter().enumerate() {
            assert_eq!(reason.index(), i);
        }
        let mut s = Stats::default();
        assert_eq!(s.count_drop(DropReason::NoRoute), 1);
        assert_eq!(s.count_drop(DropReason::NoRoute), 2);
        assert_eq!(s.dropped(DropReason::NoRoute), 2);
        assert_eq!(s.dropped_total(), 2);
        assert_eq!(
            s.drops().collect::<Vec<_>>(),
            vec![(DropReason::NoRoute, 2)]
        );
    }
}
