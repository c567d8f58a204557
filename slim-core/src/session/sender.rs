//! The sending half of a reliable session (spec §4.3, captures/flows f1–f9).
//!
//! Every data message gets the next sequence id (1, 2, …) and stays in a bounded buffer so it
//! can be retransmitted. Each receiving endpoint must acknowledge it; when a try's wait runs out
//! without an ack the message is re-sent to the endpoints still missing, up to `max_retries`
//! times. The wait adapts ([`super::rto`]): at least `interval`, more when the measured ack
//! delay says so, doubled per try up to 8 intervals, so that a congested path is not fed more
//! copies; `Failed` comes [`quiet_give_up`](super::rto::quiet_give_up) after the first
//! transmission on a quiet path (71 s for 1 s × 10), at most
//! [`worst_give_up`](super::rto::worst_give_up) (88 s). A receiver's RTX_REQUEST for an id is
//! answered from the buffer (or with an error once the id was evicted).
//!
//! Unlike the reference's ring buffer, a message still waiting for an ack is never evicted: a
//! receiver that asks for one that was only overtaken would be told it is gone and report it
//! lost (fuzz finding S1). The buffer is a window instead: at most [`PRODUCER_BUFFER`] messages
//! from the oldest unacknowledged one on are out; messages published while it is full wait
//! here, untransmitted, and go out in order as acks free the window (the session bounds that
//! queue, [`SEND_QUEUE`]). Acknowledged messages stay for late RTX requests (a group newcomer's)
//! until the window needs their room.
//!
//! Where the reference gives up silently (the publish "succeeds"), we report [`SenderEvent::Failed`].

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::time::Duration;

use slim_proto::{Name, NameKey};

use super::rto::RtoEstimator;
use crate::Timestamp;

/// Messages kept for retransmission, as the reference (`producer_buffer.rs`): the window of
/// messages out, from the oldest one still unacknowledged.
pub const PRODUCER_BUFFER: usize = 512;
/// Messages a session holds back while its window is full; `publish` refuses more
/// (`SessionError::SendQueueFull`). With the window, a session holds at most 1 536 messages.
pub const SEND_QUEUE: usize = 1024;
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

/// A message published while the window was full, not transmitted yet.
#[derive(Debug, Clone, PartialEq)]
pub struct Queued {
    pub message: Outgoing,
    /// Where it goes and with which fanout (the data channel, or one member).
    pub destination: Name,
    pub fanout: u32,
    /// Who must acknowledge it: decided at publish time, like its id (a group newcomer's
    /// stream starts at the id after the last one published before it joined).
    pub endpoints: Vec<Name>,
}

#[derive(Debug)]
struct Pending {
    missing: Vec<Name>,
    /// Retransmissions so far (timer-driven); the next timeout after `max_retries` fails it.
    attempt: u32,
    /// The sender's backoff level when it first went out: try `k` waits `rto·2^(level + k)`.
    level: u32,
    deadline: Timestamp,
    /// When it first went out: an ack's delay from here is a round-trip sample...
    sent_at: Timestamp,
    /// ...unless a copy went out too (a retransmission or an RTX reply): the ack may answer the
    /// copy (Karn's rule).
    copied: bool,
}

/// Sequence numbering, the retransmission buffer and per-message ack tracking.
#[derive(Debug)]
pub struct ReliableSender {
    rto: RtoEstimator,
    max_retries: u32,
    next_id: u32,
    /// Transmitted messages, oldest first: everything from the oldest unacknowledged one on,
    /// and older acknowledged ones while there is room.
    buffer: VecDeque<Outgoing>,
    /// Published, not transmitted yet (the window was full), in order.
    waiting: VecDeque<Queued>,
    pending: BTreeMap<u32, Pending>,
    timers: BinaryHeap<Reverse<(Timestamp, u32)>>,
}

impl ReliableSender {
    pub fn new(interval: Duration, max_retries: u32) -> Self {
        Self {
            rto: RtoEstimator::new(interval),
            max_retries,
            next_id: 1,
            // Grown on demand: most sessions never have many messages out.
            buffer: VecDeque::new(),
            waiting: VecDeque::new(),
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

    /// Whether a message published now may be transmitted at once: nothing waits before it
    /// and the window has room (acknowledged messages at its start make way).
    pub fn can_send(&mut self) -> bool {
        self.waiting.is_empty() && self.make_room()
    }

    fn make_room(&mut self) -> bool {
        while self.buffer.len() >= PRODUCER_BUFFER {
            match self.buffer.front() {
                Some(oldest) if !self.pending.contains_key(&oldest.id) => {
                    self.buffer.pop_front();
                }
                _ => return false,
            }
        }
        true
    }

    /// Holds back a message published while [`can_send`](Self::can_send) was false; it comes
    /// out of [`next_ready`](Self::next_ready) once the window has room.
    pub fn hold(&mut self, queued: Queued) {
        self.waiting.push_back(queued);
    }

    /// The next held-back message, if the window has room for it now: recorded as sent at
    /// `now`, to be transmitted by the caller.
    pub fn next_ready(&mut self, now: Timestamp) -> Option<Queued> {
        if self.waiting.is_empty() || !self.make_room() {
            return None;
        }
        let queued = self.waiting.pop_front()?;
        self.sent(queued.message.clone(), queued.endpoints.clone(), now);
        Some(queued)
    }

    /// Messages held back, not transmitted yet.
    pub fn queued(&self) -> usize {
        self.waiting.len()
    }

    /// Records a message sent to `endpoints`, each of which must acknowledge it. Only after
    /// [`can_send`](Self::can_send) said yes (or from [`next_ready`](Self::next_ready)): the
    /// window may hold more only if nothing in it waits for an ack.
    pub fn sent(&mut self, message: Outgoing, endpoints: Vec<Name>, now: Timestamp) {
        let id = message.id;
        if !self.make_room() {
            // Cannot happen through the session; should it, the oldest message goes as in the
            // reference rather than the buffer growing without bound.
            self.buffer.pop_front();
        }
        self.buffer.push_back(message);
        if endpoints.is_empty() {
            return;
        }
        let level = self.rto.level();
        let deadline = now + self.rto.wait(level);
        self.pending.insert(
            id,
            Pending {
                missing: endpoints,
                attempt: 0,
                level,
                deadline,
                sent_at: now,
                copied: false,
            },
        );
        self.timers.push(Reverse((deadline, id)));
    }

    /// A buffered message, if not evicted yet.
    pub fn buffered(&self, id: u32) -> Option<&Outgoing> {
        self.buffer.iter().rev().find(|m| m.id == id)
    }

    /// `from` acknowledged `id` at `now`; `Delivered` once nobody is missing. The first ack of
    /// an endpoint for a message sent only once is a round-trip sample.
    pub fn on_ack(&mut self, id: u32, from: &NameKey, now: Timestamp) -> Option<SenderEvent> {
        let pending = self.pending.get(&id)?;
        if !pending.copied && pending.missing.iter().any(|n| n.key() == *from) {
            self.rto.sample(now.saturating_since(pending.sent_at));
        }
        self.forget_endpoint(id, from)
    }

    /// `from` need not acknowledge `id` any more; `Delivered` once nobody is missing.
    fn forget_endpoint(&mut self, id: u32, from: &NameKey) -> Option<SenderEvent> {
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
    /// reference receivers ack the timer's retransmission instead. Either way the ack may now
    /// answer a copy, so it is no round-trip sample.
    pub fn on_rtx_request(&mut self, id: u32) -> Option<&Outgoing> {
        if let Some(pending) = self.pending.get_mut(&id) {
            pending.copied = true;
        }
        self.buffered(id)
    }

    /// An endpoint left: nothing is waited for from it any more.
    pub fn remove_endpoint(&mut self, endpoint: &NameKey, events: &mut Vec<SenderEvent>) {
        let ids: Vec<u32> = self.pending.keys().copied().collect();
        for id in ids {
            events.extend(self.forget_endpoint(id, endpoint));
        }
        // Held-back messages end the same way as those out: delivered once nobody is missing.
        for queued in &mut self.waiting {
            let before = queued.endpoints.len();
            queued.endpoints.retain(|n| n.key() != *endpoint);
            if before > 0 && queued.endpoints.is_empty() {
                events.push(SenderEvent::Delivered {
                    id: queued.message.id,
                });
            }
        }
    }

    /// Messages `endpoint` has not acknowledged yet, oldest first; their timers and tries stay
    /// as they are.
    pub fn unacked_by(&self, endpoint: &NameKey) -> Vec<u32> {
        self.pending
            .iter()
            .filter(|(_, pending)| pending.missing.iter().any(|n| n.key() == *endpoint))
            .map(|(id, _)| *id)
            .collect()
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
            if pending.attempt >= self.max_retries {
                if let Some(pending) = self.pending.remove(&id) {
                    events.push(SenderEvent::Failed {
                        id,
                        missing: pending.missing,
                    });
                }
                continue;
            }
            pending.attempt += 1;
            pending.copied = true;
            // Each try of the same message waits twice as long (capped): while the path is
            // congested, fewer copies join the queue. Messages sent from now on start there
            // too, until an ack shows the path answers in time.
            let exponent = pending.level.saturating_add(pending.attempt);
            self.rto.backed_off(exponent);
            pending.deadline = now + self.rto.wait(exponent);
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

    /// The round-trip estimate behind the retransmission timeouts.
    pub fn rto(&self) -> &RtoEstimator {
        &self.rto
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
        assert_eq!(s.on_ack(1, &peer(1).key(), Timestamp::ZERO), None);
        assert_eq!(
            s.on_ack(1, &peer(1).key(), Timestamp::ZERO),
            None,
            "duplicate ack changes nothing"
        );
        assert_eq!(
            s.on_ack(1, &peer(2).key(), Timestamp::ZERO),
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

    /// Runs the timers until nothing is pending; returns when each event came.
    fn run_timers(s: &mut ReliableSender) -> Vec<(Duration, SenderEvent)> {
        let mut told = Vec::new();
        while let Some(now) = s.poll_timeout() {
            let mut events = Vec::new();
            s.handle_timeout(now, &mut events);
            let at = now.saturating_since(Timestamp::ZERO);
            told.extend(events.into_iter().map(|e| (at, e)));
        }
        told
    }

    fn at(ms: u64) -> Timestamp {
        Timestamp::ZERO + Duration::from_millis(ms)
    }

    /// The next deadline after `now`, once the stale timers of acknowledged messages went.
    fn next_due(s: &mut ReliableSender, now: Timestamp) -> Option<Timestamp> {
        let mut events = Vec::new();
        s.handle_timeout(now, &mut events);
        assert!(events.is_empty(), "{events:?}");
        s.poll_timeout()
    }

    #[test]
    fn retransmits_to_missing_endpoints_then_fails() {
        let mut s = ReliableSender::new(SEC, 2);
        s.sent(msg(1), vec![peer(1), peer(2)], Timestamp::ZERO);
        s.on_ack(1, &peer(1).key(), Timestamp::ZERO);
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
            Timestamp::ZERO + SEC * 7,
            "fails after waits of 1, 2 and 4 intervals (quiet_give_up)"
        );
        assert_eq!(
            now,
            Timestamp::ZERO + super::super::rto::quiet_give_up(SEC, 2)
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
            s.on_ack(1, &peer(1).key(), Timestamp::ZERO),
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

    /// Fuzz finding S1: with 512 messages out, the 513th used to evict message 1 although
    /// nobody had acknowledged it, and a gap request for 1 (overtaken, not lost) was answered
    /// "unavailable". Now the window is full: the 513th waits until 1 is acknowledged.
    #[test]
    fn unacknowledged_messages_are_never_evicted() {
        let mut s = ReliableSender::new(SEC, 2);
        for _ in 0..PRODUCER_BUFFER {
            assert!(s.can_send());
            let id = s.allocate_id();
            s.sent(msg(id), vec![peer(1)], Timestamp::ZERO);
        }
        assert!(!s.can_send(), "the window is full");
        let id = s.allocate_id();
        s.hold(Queued {
            message: msg(id),
            destination: peer(1),
            fanout: 1,
            endpoints: vec![peer(1)],
        });
        assert_eq!(s.queued(), 1);
        assert_eq!(
            s.on_rtx_request(1),
            Some(&msg(1)),
            "still there for a gap request"
        );
        // Acks for later messages do not open the window: 1 still bounds it.
        s.on_ack(2, &peer(1).key(), Timestamp::ZERO);
        assert_eq!(s.next_ready(Timestamp::ZERO), None);
        assert!(!s.can_send(), "held messages go first");
        s.on_ack(1, &peer(1).key(), Timestamp::ZERO);
        let at = Timestamp::ZERO + SEC / 2;
        let ready = s.next_ready(at).expect("room for the held message");
        assert_eq!(ready.message.id, PRODUCER_BUFFER as u32 + 1);
        assert_eq!(s.queued(), 0);
        assert_eq!(s.unacked(), PRODUCER_BUFFER - 1);
        assert_eq!(s.on_rtx_request(1), None, "acknowledged, it made way");
        assert_eq!(
            s.on_rtx_request(2),
            Some(&msg(2)),
            "acknowledged, kept: there is room"
        );
        // Its timer runs from when it went out.
        let mut events = Vec::new();
        s.handle_timeout(at + SEC, &mut events);
        assert!(events.contains(&SenderEvent::Retransmit {
            id: PRODUCER_BUFFER as u32 + 1,
            to: peer(1)
        }));
    }

    #[test]
    fn acknowledged_messages_stay_for_gap_requests_while_there_is_room() {
        let mut s = ReliableSender::new(SEC, 2);
        s.sent(msg(1), vec![peer(1)], Timestamp::ZERO);
        s.on_ack(1, &peer(1).key(), Timestamp::ZERO);
        assert_eq!(s.on_rtx_request(1), Some(&msg(1)));
        assert!(s.can_send());
    }

    #[test]
    fn removing_an_endpoint_completes_held_messages_too() {
        let mut s = ReliableSender::new(SEC, 2);
        for _ in 0..PRODUCER_BUFFER {
            let id = s.allocate_id();
            s.sent(msg(id), vec![peer(1), peer(2)], Timestamp::ZERO);
        }
        s.hold(Queued {
            message: msg(600),
            destination: peer(1),
            fanout: 256,
            endpoints: vec![peer(2)],
        });
        let mut events = Vec::new();
        s.remove_endpoint(&peer(2).key(), &mut events);
        assert!(events.contains(&SenderEvent::Delivered { id: 600 }));
        assert!(
            !events.contains(&SenderEvent::Delivered { id: 1 }),
            "1 waits for peer 1"
        );
    }

    #[test]
    fn removing_an_endpoint_completes_what_waited_for_it() {
        let mut s = ReliableSender::new(SEC, 2);
        s.sent(msg(1), vec![peer(1), peer(2)], Timestamp::ZERO);
        s.on_ack(1, &peer(1).key(), Timestamp::ZERO);
        let mut events = Vec::new();
        s.remove_endpoint(&peer(2).key(), &mut events);
        assert_eq!(events, vec![SenderEvent::Delivered { id: 1 }]);
    }
    /// The documented schedule with the defaults (1 s x 10) on a quiet path: retransmissions
    /// after waits of 1, 2, 4 and then 8 s (capped), `Failed` 71 s after the first transmission.
    /// (With the fixed timer: every second, `Failed` at 11 s.)
    #[test]
    fn backoff_schedule_doubles_to_the_cap() {
        let mut s = ReliableSender::new(SEC, 10);
        s.sent(msg(1), vec![peer(1)], Timestamp::ZERO);
        let told = run_timers(&mut s);
        let retransmitted: Vec<u64> = told
            .iter()
            .filter(|(_, e)| matches!(e, SenderEvent::Retransmit { .. }))
            .map(|(at, _)| at.as_secs())
            .collect();
        assert_eq!(retransmitted, vec![1, 3, 7, 15, 23, 31, 39, 47, 55, 63]);
        assert_eq!(
            told.last(),
            Some(&(
                SEC * 71,
                SenderEvent::Failed {
                    id: 1,
                    missing: vec![peer(1)]
                }
            ))
        );
        assert_eq!(super::super::rto::quiet_give_up(SEC, 10), SEC * 71);
    }

    /// Acks within a few ms: the estimate is far below the interval, which stays the timeout;
    /// a message lost now is first retransmitted after exactly the interval, as before, and
    /// only its later copies back off.
    #[test]
    fn quiet_path_keeps_the_configured_interval() {
        let mut s = ReliableSender::new(SEC, 3);
        for id in 1..=50u32 {
            let sent = at(u64::from(id) * 100);
            s.sent(msg(id), vec![peer(1)], sent);
            s.on_ack(id, &peer(1).key(), sent + Duration::from_millis(5));
        }
        assert_eq!(s.rto().srtt(), Some(Duration::from_millis(5)));
        assert_eq!(s.rto().rto(), SEC);
        s.sent(msg(51), vec![peer(1)], at(5_100));
        let told = run_timers(&mut s);
        let times: Vec<u64> = told.iter().map(|(at, _)| at.as_millis() as u64).collect();
        // Retransmissions at +1, +3, +7 s; Failed at +15 s.
        assert_eq!(times, vec![6_100, 8_100, 12_100, 20_100]);
    }

    /// Ack delays above a third of the interval raise the timeout to srtt + 4 rttvar.
    #[test]
    fn ack_delays_raise_the_timeout() {
        let mut s = ReliableSender::new(SEC, 3);
        s.sent(msg(1), vec![peer(1)], Timestamp::ZERO);
        s.on_ack(1, &peer(1).key(), at(600));
        // First sample: srtt 600 ms, rttvar 300 ms: 600 + 1 200 ms.
        assert_eq!(s.rto().rto(), Duration::from_millis(1_800));
        s.sent(msg(2), vec![peer(1)], at(1_000));
        assert_eq!(
            next_due(&mut s, at(1_000)),
            Some(at(2_800)),
            "not at 2 000 ms"
        );
        // The next sample (1 s) moves srtt by an eighth of the difference.
        s.on_ack(2, &peer(1).key(), at(2_000));
        assert_eq!(s.rto().srtt(), Some(Duration::from_millis(650)));
    }

    /// Karn's rule: an ack for a message that went out more than once (timer retransmission, or
    /// answered to an RTX request) may answer the copy, so it is no sample.
    #[test]
    fn karn_no_samples_from_copied_messages() {
        let mut s = ReliableSender::new(SEC, 5);
        s.sent(msg(1), vec![peer(1)], Timestamp::ZERO);
        let mut events = Vec::new();
        s.handle_timeout(at(1_000), &mut events);
        assert_eq!(events, vec![SenderEvent::Retransmit { id: 1, to: peer(1) }]);
        // Taken as a sample, 2.9 s would raise the timeout to 8 s.
        s.on_ack(1, &peer(1).key(), at(2_900));
        assert_eq!(s.rto().srtt(), None);
        // Still backed off by the timeout (level 1): the next message waits 2 intervals.
        s.sent(msg(2), vec![peer(1)], at(3_000));
        assert_eq!(next_due(&mut s, at(3_000)), Some(at(5_000)));
        s.on_ack(2, &peer(1).key(), at(3_050));
        assert_eq!(s.rto().srtt(), Some(Duration::from_millis(50)));
        // Asked for by the receiver, answered with a copy: no sample either.
        s.sent(msg(3), vec![peer(1)], at(4_000));
        assert!(s.on_rtx_request(3).is_some());
        s.on_ack(3, &peer(1).key(), at(4_900));
        assert_eq!(s.rto().srtt(), Some(Duration::from_millis(50)));
        assert_eq!(s.rto().rto(), SEC);
    }

    /// A timeout backs off new messages too (RFC 6298 §5.5), until an ack of a message sent
    /// once shows the path answers in time again.
    #[test]
    fn a_timeout_backs_off_new_messages_until_a_sample() {
        let mut s = ReliableSender::new(SEC, 5);
        s.sent(msg(1), vec![peer(1)], Timestamp::ZERO);
        let mut events = Vec::new();
        s.handle_timeout(at(1_000), &mut events);
        s.sent(msg(2), vec![peer(1)], at(1_500));
        s.sent(msg(3), vec![peer(1)], at(1_600));
        s.on_ack(3, &peer(1).key(), at(1_700));
        s.sent(msg(4), vec![peer(1)], at(2_000));
        events.clear();
        let mut due = Vec::new();
        while let Some(now) = s.poll_timeout().filter(|t| *t <= at(3_500)) {
            s.handle_timeout(now, &mut events);
            due.extend(events.drain(..).map(|e| (now, e)));
        }
        assert_eq!(
            due,
            vec![
                (at(3_000), SenderEvent::Retransmit { id: 1, to: peer(1) }),
                (at(3_000), SenderEvent::Retransmit { id: 4, to: peer(1) }),
                (at(3_500), SenderEvent::Retransmit { id: 2, to: peer(1) }),
            ],
            "2 went out backed off (2 s), 4 after the sample reset it (1 s)"
        );
    }
}
