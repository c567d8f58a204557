//! The sending half of a reliable session (spec §4.3, captures/flows f1–f9).
//!
//! Every data message gets the next sequence id (1, 2, …) and stays in a bounded buffer so it
//! can be retransmitted. Each receiving endpoint must acknowledge it; after each `interval`
//! without an ack the message is re-sent to the endpoints still missing, up to `max_retries`
//! times. A receiver's RTX_REQUEST for an id counts as its ack and is answered from the buffer
//! (or with an error once the id was evicted).
//!
//! Where the reference gives up silently (the publish "succeeds"), we report [`SenderEvent::Failed`].

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::time::Duration;

use slim_proto::{Name, NameKey};

use crate::Timestamp;

/// Messages kept for retransmission, as the reference (`producer_buffer.rs`).
pub const PRODUCER_BUFFER: usize = 512;
/// Highest sequence id before wrapping (reference `MAX_PUBLISH_ID`).
pub const MAX_SEQUENCE_ID: u32 = u32::MAX / 2;

/// A data message as the application gave it.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub id: u32,
    pub payload: bytes::Bytes,
    pub payload_type: String,
    pub metadata: BTreeMap<String, String>,
}

/// What the session must do on behalf of the sender.
#[derive(Debug, Clone, PartialEq)]
pub enum SenderEvent {
    /// Re-send message `id` to `to` (its unicast name).
    Retransmit { id: u32, to: Name },
    /// Every endpoint acknowledged message `id`.
    Delivered { id: u32 },
    /// Retries ran out before these endpoints acknowledged `id`.
    Failed { id: u32, missing: Vec<Name> },
}

#[derive(Debug)]
struct Pending {
    missing: Vec<Name>,
    retries_left: u32,
    deadline: Timestamp,
}

/// Sequence numbering, the retransmission buffer and per-message ack tracking.
#[derive(Debug)]
pub struct ReliableSender {
    interval: Duration,
    max_retries: u32,
    next_id: u32,
    buffer: VecDeque<Outgoing>,
    pending: BTreeMap<u32, Pending>,
    timers: BinaryHeap<Reverse<(Timestamp, u32)>>,
}

impl ReliableSender {
    pub fn new(interval: Duration, max_retries: u32) -> Self {
        Self {
            interval,
            max_retries,
            next_id: 1,
            buffer: VecDeque::with_capacity(PRODUCER_BUFFER),
            pending: BTreeMap::new(),
            timers: BinaryHeap::new(),
        }
    }

    /// The id the next message will carry, without taking it.
    pub fn next_id(&self) -> u32 {
        self.next_id
    }

    /// Takes the id the next message will carry.
    pub fn allocate_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id = if id >= MAX_SEQUENCE_ID { 1 } else { id + 1 };
        id
    }

    /// Records a message sent to `endpoints`, each of which must acknowledge it.
    pub fn sent(&mut self, message: Outgoing, endpoints: Vec<Name>, now: Timestamp) {
        let id = message.id;
        if self.buffer.len() == PRODUCER_BUFFER {
            self.buffer.pop_front();
        }
        self.buffer.push_back(message);
        if endpoints.is_empty() {
            return;
        }
        let deadline = now + self.interval;
        self.pending.insert(
            id,
            Pending {
                missing: endpoints,
                retries_left: self.max_retries,
                deadline,
            },
        );
        self.timers.push(Reverse((deadline, id)));
    }

    /// A buffered message, if not evicted yet.
    pub fn buffered(&self, id: u32) -> Option<&Outgoing> {
        self.buffer.iter().rev().find(|m| m.id == id)
    }

    /// `from` acknowledged `id`; `Delivered` once nobody is missing.
    pub fn on_ack(&mut self, id: u32, from: &NameKey) -> Option<SenderEvent> {
        let pending = self.pending.get_mut(&id)?;
        pending.missing.retain(|n| n.key() != *from);
        if pending.missing.is_empty() {
            self.pending.remove(&id);
            return Some(SenderEvent::Delivered { id });
        }
        None
    }

    /// A receiver asks for `id` again. Returns the message to answer with, or `None` when it
    /// was evicted (answer with an error reply).
    ///
    /// Unlike the reference, the request is not taken as the receiver's ack: the answer may be
    /// lost too, and `Delivered` must only ever mean delivered. Our receivers ack the answer;
    /// reference receivers ack the timer's retransmission instead.
    pub fn on_rtx_request(&self, id: u32) -> Option<&Outgoing> {
        self.buffered(id)
    }

    /// An endpoint left: nothing is waited for from it any more.
    pub fn remove_endpoint(&mut self, endpoint: &NameKey, events: &mut Vec<SenderEvent>) {
        let ids: Vec<u32> = self.pending.keys().copied().collect();
        for id in ids {
            events.extend(self.on_ack(id, endpoint));
        }
    }

    pub fn handle_timeout(&mut self, now: Timestamp, events: &mut Vec<SenderEvent>) {
        while let Some(Reverse((deadline, id))) = self.timers.peek().copied() {
            if deadline > now {
                break;
            }
            self.timers.pop();
            let Some(pending) = self.pending.get_mut(&id) else {
                continue;
            };
            if pending.deadline != deadline {
                continue;
            }
            if pending.retries_left == 0 {
                if let Some(pending) = self.pending.remove(&id) {
                    events.push(SenderEvent::Failed {
                        id,
                        missing: pending.missing,
                    });
                }
                continue;
            }
            pending.retries_left -= 1;
            pending.deadline = now + self.interval;
            self.timers.push(Reverse((pending.deadline, id)));
            for to in &pending.missing {
                events.push(SenderEvent::Retransmit { id, to: to.clone() });
            }
        }
        // Keep the heap's top meaningful for poll_timeout.
        while let Some(Reverse((deadline, id))) = self.timers.peek().copied() {
            if self
                .pending
                .get(&id)
                .is_some_and(|p| p.deadline == deadline)
            {
                break;
            }
            self.timers.pop();
        }
    }

    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.timers.peek().map(|Reverse((at, _))| *at)
    }

    /// Messages still waiting for an ack.
    pub fn unacked(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: u32) -> Outgoing {
        Outgoing {
            id,
            payload: bytes::Bytes::from(vec![id as u8]),
            payload_type: "msg".into(),
            metadata: BTreeMap::new(),
        }
    }

    fn peer(i: u128) -> Name {
        Name::with_id("o", "n", "peer", i)
    }

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn ids_count_from_one() {
        let mut s = ReliableSender::new(SEC, 3);
        assert_eq!(
            (s.allocate_id(), s.allocate_id(), s.allocate_id()),
            (1, 2, 3)
        );
    }

    #[test]
    fn ack_from_every_endpoint_delivers() {
        let mut s = ReliableSender::new(SEC, 3);
        s.sent(msg(1), vec![peer(1), peer(2)], Timestamp::ZERO);
        assert_eq!(s.on_ack(1, &peer(1).key()), None);
        assert_eq!(
            s.on_ack(1, &peer(1).key()),
            None,
            "duplicate ack changes nothing"
        );
        assert_eq!(
            s.on_ack(1, &peer(2).key()),
            Some(SenderEvent::Delivered { id: 1 })
        );
        assert_eq!(s.unacked(), 0);
        assert_eq!(
            s.poll_timeout(),
            Some(Timestamp::ZERO + SEC),
            "stale timer may remain"
        );
        let mut events = Vec::new();
        s.handle_timeout(Timestamp::ZERO + SEC, &mut events);
        assert!(events.is_empty());
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn retransmits_to_missing_endpoints_then_fails() {
        let mut s = ReliableSender::new(SEC, 2);
        s.sent(msg(1), vec![peer(1), peer(2)], Timestamp::ZERO);
        s.on_ack(1, &peer(1).key());
        let mut events = Vec::new();
        for _ in 0..2 {
            let now = s.poll_timeout().unwrap();
            s.handle_timeout(now, &mut events);
        }
        assert_eq!(
            events,
            vec![
                SenderEvent::Retransmit { id: 1, to: peer(2) },
                SenderEvent::Retransmit { id: 1, to: peer(2) }
            ]
        );
        events.clear();
        let now = s.poll_timeout().unwrap();
        assert_eq!(
            now,
            Timestamp::ZERO + SEC * 3,
            "fails at (max_retries + 1) x interval"
        );
        s.handle_timeout(now, &mut events);
        assert_eq!(
            events,
            vec![SenderEvent::Failed {
                id: 1,
                missing: vec![peer(2)]
            }]
        );
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn rtx_request_finds_buffered_messages_but_is_not_an_ack() {
        let mut s = ReliableSender::new(SEC, 2);
        s.sent(msg(1), vec![peer(1)], Timestamp::ZERO);
        assert_eq!(s.on_rtx_request(1), Some(&msg(1)));
        assert_eq!(s.unacked(), 1, "still waiting for the real ack");
        assert_eq!(
            s.on_ack(1, &peer(1).key()),
            Some(SenderEvent::Delivered { id: 1 })
        );
    }

    #[test]
    fn old_messages_are_evicted() {
        let mut s = ReliableSender::new(SEC, 2);
        for _ in 0..PRODUCER_BUFFER + 8 {
            let id = s.allocate_id();
            s.sent(msg(id), vec![], Timestamp::ZERO);
        }
        assert!(s.buffered(8).is_none());
        assert!(s.buffered(9).is_some());
        assert!(s.buffered(PRODUCER_BUFFER as u32 + 8).is_some());
        assert_eq!(s.on_rtx_request(3), None);
    }

    #[test]
    fn removing_an_endpoint_completes_what_waited_for_it() {
        let mut s = ReliableSender::new(SEC, 2);
        s.sent(msg(1), vec![peer(1), peer(2)], Timestamp::ZERO);
        s.on_ack(1, &peer(1).key());
        let mut events = Vec::new();
        s.remove_endpoint(&peer(2).key(), &mut events);
        assert_eq!(events, vec![SenderEvent::Delivered { id: 1 }]);
    }
}
