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
