//! The receiving half of a reliable session (spec §4.3, captures/flows f1–f9).
//!
//! Per source, messages are released in sequence order. A stream starts where the session
//! declares it ([`ReliableReceiver::expect`]: a p2p peer at 1, a group member where the moderator
//! said its stream starts for us), else, as in the reference, at the first id seen. Ids below the
//! start were never meant for us and are refused ([`Verdict::BeforeStart`]). Later ids above the
//! next expected one are held back and every missing id is asked for (RTX_REQUEST), then asked
//! for again each time a request goes unanswered, up to `max_retries` times; after that the id
//! is reported lost and the stream moves on — the session is not torn down. The waits adapt as
//! the sender's ([`super::rto`]): at least `interval`, more when answers to requests took longer
//! (request-to-reply round trips of ids asked for once), doubled per request of the same id up
//! to 8 intervals, so that gaps on a congested path are not asked for ever faster than the path
//! answers. Duplicates and ids already released are dropped; ids absurdly far ahead are refused
//! (a window bounds the memory a peer can make us hold).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::time::Duration;

use rustc_hash::FxHashMap;
use slim_proto::{Name, NameKey};

use super::rto::RtoEstimator;
use super::sender::MAX_SEQUENCE_ID;
use crate::Timestamp;

/// How far ahead of the next expected id a message may be and still be held.
pub const REORDER_WINDOW: u32 = 4096;

/// A received data message, as the session will hand it to the application.
#[derive(Debug, Clone, PartialEq)]
pub struct Incoming {
    pub payload: bytes::Bytes,
    pub payload_type: String,
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ReceiverEvent {
    Deliver {
        source: Name,
        id: u32,
        message: Incoming,
    },
    /// Ask `source` for `id` again.
    RequestRtx { source: Name, id: u32 },
    /// `id` from `source` cannot be recovered; later messages go on.
    Lost { source: Name, id: u32 },
}

/// What became of one received message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Delivered now or held for ordering.
    Accepted,
    /// Already delivered or already held.
    Duplicate,
    /// Too far ahead of the stream: dropped.
    OutOfWindow,
    /// Below where the stream starts for us: sent before we were among its receivers. Not
    /// delivered, so not acknowledged either (an ack must mean delivered).
    BeforeStart,
}

#[derive(Debug)]
struct Rtx {
    /// Requests repeated so far; the next timeout after `max_retries` gives the id up.
    attempt: u32,
    deadline: Timestamp,
    /// When it was first asked for: the reply's delay from here is a round-trip sample while
    /// it was asked for only once.
    requested_at: Timestamp,
}

#[derive(Debug)]
struct Stream {
    source: Name,
    /// The first id of the stream (declared, or the first one seen).
    start: u32,
    next: u32,
    held: BTreeMap<u32, Incoming>,
    missing: BTreeMap<u32, Rtx>,
    /// Ids known to be unrecoverable, reported lost when the stream reaches them (so losses and
    /// deliveries come out in sequence order).
    gone: BTreeSet<u32>,
    /// Ids already reported lost (their late copies are neither delivered nor acknowledged).
    lost_before: BTreeSet<u32>,
}

impl Stream {
    fn new(source: &Name, start: u32) -> Self {
        Stream {
            source: source.clone(),
            start,
            next: start,
            held: BTreeMap::new(),
            missing: BTreeMap::new(),
            gone: BTreeSet::new(),
            lost_before: BTreeSet::new(),
        }
    }
}

#[derive(Debug)]
pub struct ReliableReceiver {
    rto: RtoEstimator,
    max_retries: u32,
    streams: FxHashMap<NameKey, Stream>,
    timers: BinaryHeap<Reverse<(Timestamp, NameKey, u32)>>,
}

impl ReliableReceiver {
    pub fn new(interval: Duration, max_retries: u32) -> Self {
        Self {
            rto: RtoEstimator::new(interval),
            max_retries,
            streams: FxHashMap::default(),
            timers: BinaryHeap::new(),
        }
    }

    /// Declares where `source`'s stream starts (a p2p peer always starts at 1), so that a first
    /// message that is lost or overtaken is asked for, and a bogus first id cannot move the
    /// stream. No effect once the stream exists.
    pub fn expect(&mut self, source: &Name, first_id: u32) {
        self.streams
            .entry(source.key())
            .or_insert_with(|| Stream::new(source, first_id.clamp(1, MAX_SEQUENCE_ID)));
    }

    /// The highest id seen from `source` (delivered, held, or known lost), if any: every id up
    /// to it was sent already.
    pub fn highest_seen(&self, source: &NameKey) -> Option<u32> {
        let s = self.streams.get(source)?;
        let released = (s.next > s.start).then(|| s.next - 1);
        [
            released,
            s.held.keys().next_back().copied(),
            s.gone.iter().next_back().copied(),
        ]
        .into_iter()
        .flatten()
        .max()
    }

    /// A data message (MSG, or a successful RTX_REPLY) with sequence id `id`.
    pub fn on_message(
        &mut self,
        source: &Name,
        id: u32,
        message: Incoming,
        now: Timestamp,
        events: &mut Vec<ReceiverEvent>,
    ) -> Verdict {
        if id > MAX_SEQUENCE_ID {
            // Sequence ids stop there (direct messages, above it, never come here): refused
            // before it can start or move a stream to where counting on would overflow.
            return Verdict::OutOfWindow;
        }
        let key = source.key();
        let stream = self
            .streams
            .entry(key)
            .or_insert_with(|| Stream::new(source, id));
        if id < stream.start {
            return Verdict::BeforeStart;
        }
        if id < stream.next || stream.held.contains_key(&id) || stream.gone.contains(&id) {
            return Verdict::Duplicate;
        }
        if id - stream.next > REORDER_WINDOW {
            return Verdict::OutOfWindow;
        }
        stream.missing.remove(&id);
        if id > stream.next {
            // Every id between what we expect and this one that is neither held nor already
            // asked for gets asked for now.
            for gap in stream.next..id {
                if stream.held.contains_key(&gap)
                    || stream.missing.contains_key(&gap)
                    || stream.gone.contains(&gap)
                {
                    continue;
                }
                let deadline = now + self.rto.wait(0);
                stream.missing.insert(
                    gap,
                    Rtx {
                        attempt: 0,
                        deadline,
                        requested_at: now,
                    },
                );
                self.timers.push(Reverse((deadline, key, gap)));
                events.push(ReceiverEvent::RequestRtx {
                    source: stream.source.clone(),
                    id: gap,
                });
            }
        }
        stream.held.insert(id, message);
        Self::release(stream, events);
        Verdict::Accepted
    }

    /// A successful RTX_REPLY: [`on_message`](Self::on_message), and, for an id asked for only
    /// once, a round-trip sample for the request timer. (A gap filled by a MSG is no sample: it
    /// may be the original, overtaken, arriving before any answer.)
    pub fn on_rtx_reply(
        &mut self,
        source: &Name,
        id: u32,
        message: Incoming,
        now: Timestamp,
        events: &mut Vec<ReceiverEvent>,
    ) -> Verdict {
        let asked_once = self
            .streams
            .get(&source.key())
            .and_then(|s| s.missing.get(&id))
            .filter(|rtx| rtx.attempt == 0)
            .map(|rtx| rtx.requested_at);
        if let Some(requested_at) = asked_once {
            self.rto.sample(now.saturating_since(requested_at));
        }
        self.on_message(source, id, message, now, events)
    }

    /// The sender answered an RTX_REQUEST with "no longer available".
    pub fn on_unavailable(&mut self, source: &NameKey, id: u32, events: &mut Vec<ReceiverEvent>) {
        let Some(stream) = self.streams.get_mut(source) else {
            return;
        };
        if stream.missing.remove(&id).is_some() {
            stream.gone.insert(id);
            Self::release(stream, events);
        }
    }

    pub fn handle_timeout(&mut self, now: Timestamp, events: &mut Vec<ReceiverEvent>) {
        while let Some(Reverse((deadline, key, id))) = self.timers.peek().copied() {
            if deadline > now {
                break;
            }
            self.timers.pop();
            let Some(stream) = self.streams.get_mut(&key) else {
                continue;
            };
            let Some(rtx) = stream.missing.get_mut(&id) else {
                continue;
            };
            if rtx.deadline != deadline {
                continue;
            }
            if rtx.attempt >= self.max_retries {
                stream.missing.remove(&id);
                stream.gone.insert(id);
                Self::release(stream, events);
                continue;
            }
            rtx.attempt += 1;
            // Unanswered: the next request for this id waits twice as long (capped).
            rtx.deadline = now + self.rto.wait(rtx.attempt);
            self.timers.push(Reverse((rtx.deadline, key, id)));
            events.push(ReceiverEvent::RequestRtx {
                source: stream.source.clone(),
                id,
            });
        }
        while let Some(Reverse((deadline, key, id))) = self.timers.peek().copied() {
            let live = self
                .streams
                .get(&key)
                .and_then(|s| s.missing.get(&id))
                .is_some_and(|r| r.deadline == deadline);
            if live {
                break;
            }
            self.timers.pop();
        }
    }

    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.timers.peek().map(|Reverse((at, ..))| *at)
    }

    /// The round-trip estimate behind the request timeouts.
    pub fn rto(&self) -> &RtoEstimator {
        &self.rto
    }

    /// Forgets a source (it left the session).
    pub fn remove_source(&mut self, source: &NameKey) {
        self.streams.remove(source);
    }

    /// Messages held back waiting for a gap to fill, over all sources.
    pub fn held(&self) -> usize {
        self.streams.values().map(|s| s.held.len()).sum()
    }

    /// Whether `id` from `source` arrived already (delivered or held for ordering), so that a
    /// later copy is a duplicate.
    pub fn is_received(&self, source: &NameKey, id: u32) -> bool {
        self.streams.get(source).is_some_and(|s| {
            s.held.contains_key(&id)
                || (s.start <= id
                    && id < s.next
                    && !s.gone.contains(&id)
                    && !s.lost_before.contains(&id))
        })
    }

    /// Whether `id` from `source` was declared lost (its copies must not be acknowledged).
    pub fn is_lost(&self, source: &NameKey, id: u32) -> bool {
        self.streams
            .get(source)
            .is_some_and(|s| s.gone.contains(&id) || (id < s.next && s.lost_before.contains(&id)))
    }

    /// Releases, in sequence order, what is held and what is known lost, up to the first id
    /// still awaited.
    fn release(stream: &mut Stream, events: &mut Vec<ReceiverEvent>) {
        loop {
            if let Some(message) = stream.held.remove(&stream.next) {
                events.push(ReceiverEvent::Deliver {
                    source: stream.source.clone(),
                    id: stream.next,
                    message,
                });
            } else if stream.gone.remove(&stream.next) {
                stream.lost_before.insert(stream.next);
                events.push(ReceiverEvent::Lost {
                    source: stream.source.clone(),
                    id: stream.next,
                });
            } else {
                return;
            }
            stream.next += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::rto;
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn src() -> Name {
        Name::with_id("o", "n", "src", 1)
    }

    fn m(i: u8) -> Incoming {
        Incoming {
            payload: bytes::Bytes::from(vec![i]),
            payload_type: "msg".into(),
            metadata: BTreeMap::new(),
        }
    }

    fn delivered(events: &[ReceiverEvent]) -> Vec<u32> {
        events
            .iter()
            .filter_map(|e| match e {
                ReceiverEvent::Deliver { id, .. } => Some(*id),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn in_order_and_duplicates() {
        let mut r = ReliableReceiver::new(SEC, 3);
        let mut ev = Vec::new();
        assert_eq!(
            r.on_message(&src(), 1, m(1), Timestamp::ZERO, &mut ev),
            Verdict::Accepted
        );
        assert_eq!(
            r.on_message(&src(), 2, m(2), Timestamp::ZERO, &mut ev),
            Verdict::Accepted
        );
        assert_eq!(
            r.on_message(&src(), 2, m(2), Timestamp::ZERO, &mut ev),
            Verdict::Duplicate
        );
        assert_eq!(
            r.on_message(&src(), 1, m(1), Timestamp::ZERO, &mut ev),
            Verdict::Duplicate
        );
        assert_eq!(delivered(&ev), vec![1, 2]);
    }

    #[test]
    fn gap_is_requested_and_filled_in_order() {
        let mut r = ReliableReceiver::new(SEC, 3);
        let mut ev = Vec::new();
        r.on_message(&src(), 1, m(1), Timestamp::ZERO, &mut ev);
        r.on_message(&src(), 4, m(4), Timestamp::ZERO, &mut ev);
        r.on_message(&src(), 5, m(5), Timestamp::ZERO, &mut ev);
        assert_eq!(delivered(&ev), vec![1]);
        let requests: Vec<_> = ev
            .iter()
            .filter_map(|e| match e {
                ReceiverEvent::RequestRtx { id, .. } => Some(*id),
                _ => None,
            })
            .collect();
        assert_eq!(requests, vec![2, 3], "each gap asked for once");
        ev.clear();
        r.on_message(&src(), 3, m(3), Timestamp::ZERO, &mut ev);
        assert!(delivered(&ev).is_empty());
        r.on_message(&src(), 2, m(2), Timestamp::ZERO, &mut ev);
        assert_eq!(delivered(&ev), vec![2, 3, 4, 5]);
        assert_eq!(r.held(), 0);
        r.handle_timeout(Timestamp::ZERO + SEC * 10, &mut ev);
        assert_eq!(r.poll_timeout(), None);
    }

    #[test]
    fn unrecoverable_gap_is_lost_and_the_stream_goes_on() {
        let mut r = ReliableReceiver::new(SEC, 2);
        let mut ev = Vec::new();
        r.on_message(&src(), 1, m(1), Timestamp::ZERO, &mut ev);
        r.on_message(&src(), 3, m(3), Timestamp::ZERO, &mut ev);
        ev.clear();
        let mut requests = Vec::new();
        while let Some(at) = r.poll_timeout() {
            r.handle_timeout(at, &mut ev);
            let n = ev
                .iter()
                .filter(|e| matches!(e, ReceiverEvent::RequestRtx { .. }))
                .count();
            requests.extend(std::iter::repeat_n(at, n));
            if ev.iter().any(|e| matches!(e, ReceiverEvent::Lost { .. })) {
                assert_eq!(
                    at,
                    Timestamp::ZERO + SEC * 7,
                    "lost after waits of 1, 2 and 4 intervals (quiet_give_up)"
                );
                assert_eq!(at, Timestamp::ZERO + rto::quiet_give_up(SEC, 2));
                break;
            }
            ev.clear();
        }
        assert_eq!(
            requests,
            vec![Timestamp::ZERO + SEC, Timestamp::ZERO + SEC * 3],
            "asked again after 1 interval, then 2"
        );
        assert!(ev.contains(&ReceiverEvent::Lost {
            source: src(),
            id: 2
        }));
        assert_eq!(delivered(&ev), vec![3]);
        ev.clear();
        r.on_message(&src(), 4, m(4), Timestamp::ZERO, &mut ev);
        assert_eq!(delivered(&ev), vec![4]);
    }

    #[test]
    fn unavailable_reply_loses_the_id_at_once() {
        let mut r = ReliableReceiver::new(SEC, 5);
        let mut ev = Vec::new();
        r.on_message(&src(), 1, m(1), Timestamp::ZERO, &mut ev);
        r.on_message(&src(), 3, m(3), Timestamp::ZERO, &mut ev);
        ev.clear();
        r.on_unavailable(&src().key(), 2, &mut ev);
        assert_eq!(
            ev,
            vec![
                ReceiverEvent::Lost {
                    source: src(),
                    id: 2
                },
                ReceiverEvent::Deliver {
                    source: src(),
                    id: 3,
                    message: m(3)
                }
            ]
        );
    }

    #[test]
    fn far_ahead_ids_are_refused() {
        let mut r = ReliableReceiver::new(SEC, 5);
        let mut ev = Vec::new();
        r.on_message(&src(), 1, m(1), Timestamp::ZERO, &mut ev);
        ev.clear();
        assert_eq!(
            r.on_message(
                &src(),
                2 + REORDER_WINDOW + 1,
                m(9),
                Timestamp::ZERO,
                &mut ev
            ),
            Verdict::OutOfWindow
        );
        assert!(ev.is_empty(), "no RTX storm for a bogus id");
    }

    #[test]
    fn ids_beyond_the_sequence_are_refused() {
        let mut r = ReliableReceiver::new(SEC, 3);
        let mut ev = Vec::new();
        assert_eq!(
            r.on_message(&src(), u32::MAX, m(1), Timestamp::ZERO, &mut ev),
            Verdict::OutOfWindow
        );
        assert!(ev.is_empty());
        assert_eq!(r.highest_seen(&src().key()), None, "no stream started");
        r.on_message(&src(), MAX_SEQUENCE_ID, m(2), Timestamp::ZERO, &mut ev);
        assert_eq!(delivered(&ev), vec![MAX_SEQUENCE_ID]);
    }

    #[test]
    fn an_expected_stream_requests_a_lost_first_message() {
        let mut r = ReliableReceiver::new(SEC, 3);
        r.expect(&src(), 1);
        let mut ev = Vec::new();
        r.on_message(&src(), 2, m(2), Timestamp::ZERO, &mut ev);
        assert_eq!(
            ev,
            vec![ReceiverEvent::RequestRtx {
                source: src(),
                id: 1
            }]
        );
    }

    #[test]
    fn ids_below_a_declared_start_are_refused() {
        let mut r = ReliableReceiver::new(SEC, 3);
        r.expect(&src(), 5);
        let mut ev = Vec::new();
        assert_eq!(
            r.on_message(&src(), 4, m(4), Timestamp::ZERO, &mut ev),
            Verdict::BeforeStart
        );
        assert_eq!(r.highest_seen(&src().key()), None);
        // 7 overtook 5 and 6: both are asked for, then everything comes out in order.
        r.on_message(&src(), 7, m(7), Timestamp::ZERO, &mut ev);
        assert_eq!(r.highest_seen(&src().key()), Some(7));
        r.on_message(&src(), 6, m(6), Timestamp::ZERO, &mut ev);
        r.on_message(&src(), 5, m(5), Timestamp::ZERO, &mut ev);
        assert_eq!(delivered(&ev), vec![5, 6, 7]);
        assert_eq!(
            r.on_message(&src(), 5, m(5), Timestamp::ZERO, &mut ev),
            Verdict::Duplicate,
            "a delivered id is a duplicate (acknowledged again), not before the start"
        );
        // Without a declared start, the first id seen starts the stream (as the reference).
        let other = Name::with_id("o", "n", "src", 2);
        r.on_message(&other, 9, m(9), Timestamp::ZERO, &mut ev);
        assert_eq!(
            r.on_message(&other, 8, m(8), Timestamp::ZERO, &mut ev),
            Verdict::BeforeStart
        );
    }

    #[test]
    fn sources_are_independent() {
        let other = Name::with_id("o", "n", "src", 2);
        let mut r = ReliableReceiver::new(SEC, 3);
        let mut ev = Vec::new();
        r.on_message(&src(), 7, m(7), Timestamp::ZERO, &mut ev);
        r.on_message(&other, 1, m(1), Timestamp::ZERO, &mut ev);
        assert_eq!(delivered(&ev), vec![7, 1]);
    }
    fn at(ms: u64) -> Timestamp {
        Timestamp::ZERO + Duration::from_millis(ms)
    }

    /// When each request for a gap went out (after the first, at detection) and when it was
    /// given up, running the timers from `from` on.
    fn request_times(r: &mut ReliableReceiver, from: Timestamp) -> (Vec<u64>, Option<u64>) {
        let (mut asked, mut lost) = (Vec::new(), None);
        let mut ev = Vec::new();
        r.handle_timeout(from, &mut ev);
        while let Some(now) = r.poll_timeout() {
            ev.clear();
            r.handle_timeout(now, &mut ev);
            let ms = now.saturating_since(Timestamp::ZERO).as_millis() as u64;
            for e in &ev {
                match e {
                    ReceiverEvent::RequestRtx { .. } => asked.push(ms),
                    ReceiverEvent::Lost { .. } => lost = Some(ms),
                    ReceiverEvent::Deliver { .. } => {}
                }
            }
        }
        (asked, lost)
    }

    /// Requests for one gap back off like the sender's retransmissions: 1, 2, 4, 8, 8 s apart,
    /// lost 31 s after the gap was seen (1 s x 5). (With the fixed timer: every second, lost at
    /// 6 s.)
    #[test]
    fn requests_for_a_gap_back_off_to_the_cap() {
        let mut r = ReliableReceiver::new(SEC, 5);
        let mut ev = Vec::new();
        r.on_message(&src(), 1, m(1), Timestamp::ZERO, &mut ev);
        r.on_message(&src(), 3, m(3), Timestamp::ZERO, &mut ev);
        let (asked, lost) = request_times(&mut r, Timestamp::ZERO);
        assert_eq!(asked, vec![1_000, 3_000, 7_000, 15_000, 23_000]);
        assert_eq!(lost, Some(31_000));
        assert_eq!(rto::quiet_give_up(SEC, 5), SEC * 31);
    }

    /// A reply to a gap asked for once is a round-trip sample that raises the request timeout;
    /// a reply after the request was repeated is none (Karn's rule), and neither is a gap filled
    /// by a MSG (maybe the overtaken original).
    #[test]
    fn reply_round_trips_set_the_request_timeout_after_karn() {
        let mut r = ReliableReceiver::new(SEC, 5);
        let mut ev = Vec::new();
        r.on_message(&src(), 1, m(1), Timestamp::ZERO, &mut ev);
        // 2 asked for at 0, asked again at 1 s, answered at 2.9 s: no sample.
        r.on_message(&src(), 3, m(3), Timestamp::ZERO, &mut ev);
        r.handle_timeout(at(1_000), &mut ev);
        r.on_rtx_reply(&src(), 2, m(2), at(2_900), &mut ev);
        assert_eq!(r.rto().srtt(), None);
        // 4 asked for at 3 s, filled by a MSG at 3.5 s: no sample either.
        r.on_message(&src(), 5, m(5), at(3_000), &mut ev);
        r.on_message(&src(), 4, m(4), at(3_500), &mut ev);
        assert_eq!(r.rto().srtt(), None);
        // 6 asked for at 4 s, answered once at 4.6 s: srtt 600 ms, rttvar 300 ms.
        r.on_message(&src(), 7, m(7), at(4_000), &mut ev);
        r.on_rtx_reply(&src(), 6, m(6), at(4_600), &mut ev);
        assert_eq!(r.rto().srtt(), Some(Duration::from_millis(600)));
        assert_eq!(r.rto().rto(), Duration::from_millis(1_800));
        assert_eq!(delivered(&ev), vec![1, 2, 3, 4, 5, 6, 7]);
        // The next gap is asked for again after 1.8 s, then 3.6 s, then 7.2 s.
        r.on_message(&src(), 9, m(9), at(5_000), &mut ev);
        let (asked, _) = request_times(&mut r, at(5_000));
        assert_eq!(asked[..3], [6_800, 10_400, 17_600]);
    }
}
