//! Publishes that wait for room in a session's send queue, for drivers whose `publish` (and
//! `publish_to`) waits instead of failing with [`SessionError::SendQueueFull`].

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;
use slim_proto::Name;

use super::sender::SEND_QUEUE;
use super::{SessionError, SessionId, SessionLayer};
use crate::Timestamp;

/// One publish: to the whole session, or (`to`) to one member only.
#[derive(Debug, Clone)]
pub struct Publish {
    pub to: Option<Name>,
    pub payload: Bytes,
}

impl Publish {
    fn send(
        &self,
        layer: &mut SessionLayer,
        session: SessionId,
        now: Timestamp,
    ) -> Result<u32, SessionError> {
        match &self.to {
            None => layer.publish(session, self.payload.clone(), now),
            Some(member) => layer.publish_to(session, member, self.payload.clone(), now),
        }
    }
}

/// Publishes the core refused with `SendQueueFull`, in order per session, each with the
/// driver's way of answering its caller (`R`). The driver calls [`WaitingPublishes::retry`]
/// after every input it hands the core, so each waits until there is room or its session is
/// gone.
#[derive(Debug)]
pub struct WaitingPublishes<R> {
    by_session: BTreeMap<SessionId, VecDeque<(Publish, R)>>,
}

impl<R> Default for WaitingPublishes<R> {
    fn default() -> Self {
        Self {
            by_session: BTreeMap::new(),
        }
    }
}

/// A caller to answer, and the answer.
pub type Answer<R> = (R, Result<u32, SessionError>);

/// Events a session driver holds beyond the application's event queue (it stops reading the
/// network while it holds any, except for a publish waiting for acknowledgements) before a
/// waiting publish stops waiting and fails with `SendQueueFull`: a producer that never reads
/// its events must not grow its driver without bound. See
/// [`WaitingPublishes::refuse_when_backlogged`].
pub const EVENT_BACKLOG: usize = 8192;

impl<R> WaitingPublishes<R> {
    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.by_session.is_empty()
    }

    /// Publishes now, unless earlier publishes of the session wait (then behind them) or the
    /// queue is full (then it waits). The answer, when the caller can have it now.
    pub fn submit(
        &mut self,
        layer: &mut SessionLayer,
        session: SessionId,
        publish: Publish,
        reply: R,
        now: Timestamp,
    ) -> Option<Answer<R>> {
        if let Some(waiting) = self.by_session.get_mut(&session) {
            waiting.push_back((publish, reply));
            return None;
        }
        match publish.send(layer, session, now) {
            Err(SessionError::SendQueueFull(..)) => {
                self.by_session
                    .entry(session)
                    .or_default()
                    .push_back((publish, reply));
                None
            }
            result => Some((reply, result)),
        }
    }

    /// Answers every waiting publish with the `SendQueueFull` it waited on: for a driver that
    /// stops waiting (its application is too far behind on its events for the network to be
    /// read on the publishes' behalf).
    pub fn refuse_all(&mut self) -> Vec<Answer<R>> {
        std::mem::take(&mut self.by_session)
            .into_iter()
            .flat_map(|(session, waiting)| {
                waiting.into_iter().map(move |(_, reply)| {
                    (reply, Err(SessionError::SendQueueFull(session, SEND_QUEUE)))
                })
            })
            .collect()
    }

    /// The policy for a driver holding `backlog` events its application has not taken yet:
    /// from [`EVENT_BACKLOG`] on, while publishes wait, every one is refused
    /// ([`WaitingPublishes::refuse_all`]); otherwise none is (an empty answer list, which does
    /// not allocate). The driver calls it before it decides whether to read the network, as it
    /// reads on for waiting publishes even when its application is behind.
    pub fn refuse_when_backlogged(&mut self, backlog: usize) -> Vec<Answer<R>> {
        if backlog < EVENT_BACKLOG || self.is_empty() {
            return Vec::new();
        }
        // Reading on for the waiting publishes would grow the backlog without bound (a
        // producer that never reads its events gets one Delivered per message): they fail as
        // they would without waiting, and the application must read its events.
        tracing::warn!(
            unread = backlog,
            "application far behind on its events: waiting publishes refused"
        );
        self.refuse_all()
    }

    /// Retries the waiting publishes, in order per session, until the core refuses one again;
    /// the answers for those it took (or refused for good).
    pub fn retry(&mut self, layer: &mut SessionLayer, now: Timestamp) -> Vec<Answer<R>> {
        let mut answers = Vec::new();
        self.by_session.retain(|session, waiting| {
            while let Some((publish, reply)) = waiting.pop_front() {
                match publish.send(layer, *session, now) {
                    Err(SessionError::SendQueueFull(..)) => {
                        waiting.push_front((publish, reply));
                        return true;
                    }
                    result => answers.push((reply, result)),
                }
            }
            false
        });
        answers
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{LayerConfig, Output, Reliability, SessionConfig};
    use std::time::Duration;

    fn layer(service: &str, seed: u8) -> SessionLayer {
        SessionLayer::new(
            LayerConfig {
                name: Name::new("org", "ns", service),
                secret: "interop-shared-secret-0123456789abcdef-0123456789".into(),
                unix_at_zero: 1_795_600_000,
            },
            [seed; 32],
        )
        .unwrap()
    }

    /// Alice's layer with a reliable session to Bob whose send queue is full (Bob's acks are
    /// never handed back once the handshake is done), and two publishes waiting behind it.
    fn waiting_two() -> (SessionLayer, SessionId, WaitingPublishes<u8>) {
        let (mut alice, mut bob) = (layer("alice", 1), layer("bob", 2));
        let config = SessionConfig {
            reliability: Some(Reliability {
                interval: Duration::from_secs(1),
                max_retries: 3,
            }),
            metadata: Default::default(),
            mls: false,
        };
        let now = Timestamp::ZERO;
        let session = alice.create_session(&Name::new("org", "ns", "bob"), config, now);
        // The handshake: what each side sends goes to the other until both are quiet.
        loop {
            let mut moved = false;
            while let Some(output) = alice.poll_output() {
                if let Output::Send(message) = output {
                    bob.handle_message(*message, now);
                    moved = true;
                }
            }
            while let Some(output) = bob.poll_output() {
                if let Output::Send(message) = output {
                    alice.handle_message(*message, now);
                    moved = true;
                }
            }
            if !moved {
                break;
            }
        }
        let full = (0..4 * SEND_QUEUE).any(|_| {
            matches!(
                alice.publish(session, Bytes::from_static(b"x"), now),
                Err(SessionError::SendQueueFull(..))
            )
        });
        assert!(full, "the send queue never filled");
        let mut waiting = WaitingPublishes::default();
        for reply in [1, 2] {
            let publish = Publish {
                to: None,
                payload: Bytes::from_static(b"waits"),
            };
            assert!(waiting
                .submit(&mut alice, session, publish, reply, now)
                .is_none());
        }
        (alice, session, waiting)
    }

    #[test]
    fn waiting_publishes_are_refused_only_from_the_backlog_limit_on() {
        let (_layer, session, mut waiting) = waiting_two();
        assert!(waiting.refuse_when_backlogged(EVENT_BACKLOG - 1).is_empty());
        assert!(!waiting.is_empty(), "below the limit they go on waiting");
        let refused = waiting.refuse_when_backlogged(EVENT_BACKLOG);
        let full = Err(SessionError::SendQueueFull(session, SEND_QUEUE));
        assert_eq!(refused, vec![(1, full.clone()), (2, full)]);
        assert!(waiting.is_empty());
        assert!(waiting.refuse_when_backlogged(usize::MAX).is_empty());
    }
}
