//! Two session layers wired back to back (no router in between), with a test wire that can
//! drop chosen messages.

use super::*;
use crate::session::rto;

const SECRET: &str = "interop-shared-secret-0123456789abcdef-0123456789";
const UNIX0: u64 = 1_795_600_000;

fn layer(service: &str, seed: u8) -> SessionLayer {
    SessionLayer::new(
        LayerConfig {
            name: Name::new("org", "ns", service),
            secret: SECRET.into(),
            unix_at_zero: UNIX0,
        },
        [seed; 32],
    )
    .unwrap()
}

fn reliable() -> SessionConfig {
    SessionConfig {
        reliability: Some(Reliability {
            interval: Duration::from_secs(1),
            max_retries: 3,
        }),
        metadata: BTreeMap::new(),
        mls: false,
    }
}

fn kind(m: &pb::Message) -> Mt {
    match &m.message_type {
        Some(pb::message::MessageType::Publish(p)) => {
            Mt::try_from(p.session.as_ref().unwrap().session_message_type).unwrap()
        }
        _ => panic!("not a publish"),
    }
}

fn mid(m: &pb::Message) -> u32 {
    match &m.message_type {
        Some(pb::message::MessageType::Publish(p)) => p.session.as_ref().unwrap().message_id,
        _ => panic!("not a publish"),
    }
}

type Filter = Box<dyn FnMut(bool, &pb::Message) -> bool>;

/// A, B and the wire between them.
struct Pair {
    a: SessionLayer,
    b: SessionLayer,
    now: Timestamp,
    events_a: Vec<SessionEvent>,
    events_b: Vec<SessionEvent>,
    /// Return false to drop a message (sender is A when the bool is true).
    filter: Filter,
    wire_log: Vec<(bool, Mt, u32)>,
}

impl Pair {
    fn new() -> Self {
        Self {
            a: layer("alice", 1),
            b: layer("bob", 2),
            now: Timestamp::ZERO,
            events_a: Vec::new(),
            events_b: Vec::new(),
            filter: Box::new(|_, _| true),
            wire_log: Vec::new(),
        }
    }

    /// Delivers everything in flight until both sides are quiet.
    fn run(&mut self) {
        loop {
            let mut moved = false;
            while let Some(o) = self.a.poll_output() {
                match o {
                    Output::Send(m) => {
                        self.wire_log.push((true, kind(&m), mid(&m)));
                        if (self.filter)(true, &m) {
                            self.b.handle_message(*m, self.now);
                        }
                        moved = true;
                    }
                    Output::Event(e) => self.events_a.push(e),
                    Output::Subscribe(_) | Output::Unsubscribe(_) => {}
                }
            }
            while let Some(o) = self.b.poll_output() {
                match o {
                    Output::Send(m) => {
                        self.wire_log.push((false, kind(&m), mid(&m)));
                        if (self.filter)(false, &m) {
                            self.a.handle_message(*m, self.now);
                        }
                        moved = true;
                    }
                    Output::Event(e) => self.events_b.push(e),
                    Output::Subscribe(_) | Output::Unsubscribe(_) => {}
                }
            }
            if !moved {
                return;
            }
        }
    }

    /// Lets [`ACK_HOLD`] pass: held acks nobody answered go out, and everything in flight is
    /// delivered.
    fn release_held_acks(&mut self) {
        self.now = self.now + ACK_HOLD;
        self.a.handle_timeout(self.now);
        self.b.handle_timeout(self.now);
        self.run();
    }

    /// Advances time to the next deadline of either side (bounded).
    fn step_time(&mut self) -> bool {
        let next = [self.a.poll_timeout(), self.b.poll_timeout()]
            .into_iter()
            .flatten()
            .min();
        let Some(at) = next else { return false };
        assert!(
            at >= self.now,
            "deadline in the past: {at:?} < {:?}",
            self.now
        );
        self.now = at;
        self.a.handle_timeout(self.now);
        self.b.handle_timeout(self.now);
        self.run();
        true
    }

    fn open(&mut self, config: SessionConfig) -> SessionId {
        let sid = self
            .a
            .create_session(&Name::new("org", "ns", "bob"), config, self.now);
        self.run();
        sid
    }

    fn messages_b(&self) -> Vec<(u32, Vec<u8>)> {
        self.events_b
            .iter()
            .filter_map(|e| match e {
                SessionEvent::Message { id, payload, .. } => Some((*id, payload.to_vec())),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn p2p_handshake_matches_the_reference_sequence() {
    let mut p = Pair::new();
    let mut config = reliable();
    config.metadata.insert("purpose".into(), "test".into());
    let sid = p.open(config);
    let sequence: Vec<(bool, Mt)> = p.wire_log.iter().map(|(a, k, _)| (*a, *k)).collect();
    assert_eq!(
        sequence,
        vec![
            (true, Mt::DiscoveryRequest),
            (false, Mt::DiscoveryReply),
            (true, Mt::JoinRequest),
            (false, Mt::JoinReply),
            (true, Mt::GroupWelcome),
            (false, Mt::GroupAck),
        ]
    );
    // Replies reuse the request's message id.
    assert_eq!(p.wire_log[0].2, p.wire_log[1].2);
    assert_eq!(p.wire_log[2].2, p.wire_log[3].2);
    assert_eq!(p.wire_log[4].2, p.wire_log[5].2);
    assert_eq!(
        p.events_a,
        vec![SessionEvent::Established {
            session: sid,
            peer: p.b.name().clone()
        }]
    );
    assert_eq!(
        p.events_b,
        vec![SessionEvent::Incoming {
            session: sid,
            peer: p.a.name().clone(),
            group: false,
            mls: false,
            metadata: [("purpose".to_string(), "test".to_string())]
                .into_iter()
                .collect()
        }]
    );
    assert_eq!(p.a.stats().dropped_total() + p.b.stats().dropped_total(), 0);
    assert_eq!(
        p.b.stats().unsigned_payloads,
        0,
        "control messages carry slim-payload-sig"
    );
}

#[test]
fn reliable_data_is_acked_and_delivered_in_order() {
    let mut p = Pair::new();
    let sid = p.open(reliable());
    for i in 0..5u8 {
        assert_eq!(
            p.a.publish(sid, Bytes::from(vec![i; i as usize + 1]), p.now)
                .unwrap(),
            u32::from(i) + 1
        );
    }
    p.run();
    assert_eq!(
        p.messages_b(),
        (1..=5)
            .map(|i| (i, vec![(i - 1) as u8; i as usize]))
            .collect::<Vec<_>>()
    );
    p.release_held_acks();
    let delivered = p
        .events_a
        .iter()
        .filter(|e| matches!(e, SessionEvent::Delivered { .. }))
        .count();
    assert_eq!(delivered, 5);
    assert_eq!(
        p.a.poll_timeout().map(|t| t > p.now),
        Some(true),
        "only heartbeats left"
    );
}

/// The drivers let their runtime timer fire early rather than move it later (`TimerSlot`):
/// a timeout before anything is due must change nothing.
#[test]
fn a_timeout_before_anything_is_due_does_nothing() {
    let mut p = Pair::new();
    let sid = p.open(reliable());
    p.a.publish(sid, Bytes::from_static(b"held"), p.now)
        .unwrap();
    p.run();
    // B now holds its ack; A waits for it (retransmission timer).
    let sent = p.wire_log.len();
    for layer in [&mut p.a, &mut p.b] {
        let due = layer.poll_timeout().expect("a deadline");
        for early in [p.now, Timestamp::from_micros(due.as_micros() - 1)] {
            layer.handle_timeout(early);
            assert!(
                layer.poll_output().is_none(),
                "output at {early:?} < {due:?}"
            );
            assert_eq!(layer.poll_timeout(), Some(due));
        }
    }
    assert_eq!(p.wire_log.len(), sent);
    assert!(p
        .events_a
        .iter()
        .all(|e| !matches!(e, SessionEvent::Delivered { .. })));
    // At the real deadline the held ack goes out and A hears of the delivery.
    assert!(p.step_time());
    assert!(p
        .events_a
        .iter()
        .any(|e| matches!(e, SessionEvent::Delivered { .. })));
}

/// Messages naming sessions we do not have leave nothing behind in the deadline index: the ids
/// marked for a refresh stay bounded by the sessions held, even if `poll_timeout` is not called.
#[test]
fn unknown_session_ids_are_not_remembered() {
    let mut p = Pair::new();
    let sid = p.open(reliable());
    p.a.publish(sid, Bytes::from_static(b"x"), p.now).unwrap();
    let Some(Output::Send(message)) = p.a.poll_output() else {
        panic!("A sends its message");
    };
    for unknown in 1..=1000u32 {
        let mut copy = (*message).clone();
        if let Some(pb::message::MessageType::Publish(publish)) = &mut copy.message_type {
            publish.session.as_mut().unwrap().session_id = sid.wrapping_add(unknown);
        }
        p.b.handle_message(copy, p.now);
    }
    assert!(p.b.sessions.deadlines.borrow().stale.len() <= p.b.sessions.len());
}

#[test]
fn a_lost_message_is_requested_and_recovered_in_order() {
    let mut p = Pair::new();
    let sid = p.open(reliable());
    let mut dropped = false;
    p.filter = Box::new(move |from_a, m| {
        if from_a && kind(m) == Mt::Msg && mid(m) == 2 && !dropped {
            dropped = true;
            return false;
        }
        true
    });
    for i in 1..=4u8 {
        p.a.publish(sid, Bytes::from(vec![i]), p.now).unwrap();
    }
    p.run();
    assert!(p
        .wire_log
        .iter()
        .any(|(from_a, k, id)| !from_a && *k == Mt::RtxRequest && *id == 2));
    assert!(p
        .wire_log
        .iter()
        .any(|(from_a, k, id)| *from_a && *k == Mt::RtxReply && *id == 2));
    assert_eq!(
        p.messages_b().iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
}

/// Fuzz finding S1: a burst beyond the sender's 512-message window. The messages that do not
/// fit wait in the session (their ids are taken at once) and go out as acks come; more than
/// `SEND_QUEUE` waiting are refused. The first copy of message 1 goes missing as if overtaken:
/// the gap request for it is answered with the message (the old ring buffer had evicted it and
/// said "unavailable", so the receiver reported it lost).
#[test]
fn a_burst_beyond_the_window_waits_for_acks_and_nothing_is_lost() {
    use super::super::sender::{PRODUCER_BUFFER, SEND_QUEUE};
    let mut p = Pair::new();
    let sid = p.open(reliable());
    let mut dropped = false;
    p.filter = Box::new(move |from_a, m| {
        if from_a && kind(m) == Mt::Msg && mid(m) == 1 && !dropped {
            dropped = true;
            return false;
        }
        true
    });
    let total = (PRODUCER_BUFFER + SEND_QUEUE) as u32;
    for id in 1..=total {
        assert_eq!(
            p.a.publish(sid, Bytes::from(id.to_be_bytes().to_vec()), p.now),
            Ok(id)
        );
    }
    assert_eq!(
        p.a.publish(sid, Bytes::from_static(b"one too many"), p.now),
        Err(SessionError::SendQueueFull(sid, SEND_QUEUE))
    );
    let mut out = Vec::new();
    while let Some(o) = p.a.poll_output() {
        out.push(o);
    }
    let sent: Vec<u32> = out
        .iter()
        .filter_map(|o| match o {
            Output::Send(m) if kind(m) == Mt::Msg => Some(mid(m)),
            _ => None,
        })
        .collect();
    assert_eq!(
        sent,
        (1..=PRODUCER_BUFFER as u32).collect::<Vec<_>>(),
        "the window's worth"
    );
    for o in out {
        if let Output::Send(m) = o {
            if (p.filter)(true, &m) {
                p.b.handle_message(*m, p.now);
            }
        }
    }
    p.run();
    // The window opens as B's held acks go out, one hold time after the messages came.
    for _ in 0..total {
        if p.messages_b().len() == total as usize {
            break;
        }
        p.release_held_acks();
    }
    p.release_held_acks();
    assert_eq!(
        p.messages_b().iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>()
    );
    assert!(p
        .wire_log
        .iter()
        .any(|(from_a, k, id)| *from_a && *k == Mt::RtxReply && *id == 1));
    let lost_or_failed = p
        .events_a
        .iter()
        .chain(&p.events_b)
        .filter(|e| {
            matches!(
                e,
                SessionEvent::MessageLost { .. } | SessionEvent::SendFailed { .. }
            )
        })
        .count();
    assert_eq!(lost_or_failed, 0);
    let delivered = p
        .events_a
        .iter()
        .filter(|e| matches!(e, SessionEvent::Delivered { .. }))
        .count();
    assert_eq!(delivered, total as usize);
    assert_eq!(
        p.a.publish(sid, Bytes::from_static(b"after"), p.now),
        Ok(total + 1),
        "room again"
    );
}

#[test]
fn a_lost_last_message_is_retransmitted_after_the_interval() {
    let mut p = Pair::new();
    let sid = p.open(reliable());
    let mut dropped = false;
    p.filter = Box::new(move |from_a, m| {
        if from_a && kind(m) == Mt::Msg && !dropped {
            dropped = true;
            return false;
        }
        true
    });
    p.a.publish(sid, Bytes::from_static(b"last"), p.now)
        .unwrap();
    p.run();
    assert!(p.messages_b().is_empty());
    let sent_at = p.now;
    p.step_time();
    assert_eq!(p.now, sent_at + Duration::from_secs(1));
    assert_eq!(p.messages_b(), vec![(1, b"last".to_vec())]);
}

/// The recovery counters of [`SessionStats`], one loss at a time: each moves exactly where
/// its event happens, and no other does.
#[test]
fn recovery_counters_count_requests_replies_and_retransmissions() {
    fn recovery(stats: &SessionStats) -> [u64; 6] {
        [
            stats.rtx_requests_sent,
            stats.rtx_requests_received,
            stats.rtx_replies_sent,
            stats.rtx_replies_received,
            stats.data_retransmissions,
            stats.control_retransmissions,
        ]
    }

    // A data message lost mid-stream: the gap is asked for once and answered once.
    let mut p = Pair::new();
    let sid = p.open(reliable());
    let mut dropped = false;
    p.filter = Box::new(move |from_a, m| {
        let drop = from_a && kind(m) == Mt::Msg && mid(m) == 2 && !dropped;
        dropped |= drop;
        !drop
    });
    for i in 1..=4u8 {
        p.a.publish(sid, Bytes::from(vec![i]), p.now).unwrap();
    }
    p.run();
    assert_eq!(p.messages_b().len(), 4);
    assert_eq!(recovery(p.b.stats()), [1, 0, 0, 1, 0, 0]);
    assert_eq!(recovery(p.a.stats()), [0, 1, 1, 0, 0, 0]);

    // The last message lost: nothing after it shows the gap, the sender's timer re-sends it.
    let mut p = Pair::new();
    let sid = p.open(reliable());
    let mut dropped = false;
    p.filter = Box::new(move |from_a, m| {
        let drop = from_a && kind(m) == Mt::Msg && !dropped;
        dropped |= drop;
        !drop
    });
    p.a.publish(sid, Bytes::from_static(b"last"), p.now)
        .unwrap();
    p.run();
    p.step_time();
    assert_eq!(p.messages_b(), vec![(1, b"last".to_vec())]);
    assert_eq!(recovery(p.a.stats()), [0, 0, 0, 0, 1, 0]);
    assert_eq!(recovery(p.b.stats()), [0; 6]);

    // The welcome's ack lost: the welcome is re-sent by its retry timer.
    let mut p = Pair::new();
    let mut dropped = false;
    p.filter = Box::new(move |from_a, m| {
        let drop = !from_a && kind(m) == Mt::GroupAck && !dropped;
        dropped |= drop;
        !drop
    });
    p.open(reliable());
    assert_eq!(recovery(p.a.stats()), [0; 6]);
    p.step_time();
    assert!(matches!(p.events_a[..], [SessionEvent::Established { .. }]));
    assert_eq!(recovery(p.a.stats()), [0, 0, 0, 0, 0, 1]);
    assert_eq!(recovery(p.b.stats()), [0; 6]);
}

#[test]
fn unrecoverable_loss_is_reported_on_both_sides_and_the_session_goes_on() {
    let mut p = Pair::new();
    let sid = p.open(reliable());
    // Every copy of message 2 and every answer to a request for it is lost.
    p.filter =
        Box::new(|from_a, m| !(from_a && matches!(kind(m), Mt::Msg | Mt::RtxReply) && mid(m) == 2));
    let sent_at = p.now;
    for i in 1..=3u8 {
        p.a.publish(sid, Bytes::from(vec![i]), p.now).unwrap();
    }
    p.run();
    let (mut lost_at, mut failed_at) = (None, None);
    while (lost_at.is_none() || failed_at.is_none()) && p.step_time() {
        if p.events_b
            .iter()
            .any(|e| matches!(e, SessionEvent::MessageLost { id: 2, .. }))
        {
            lost_at.get_or_insert(p.now);
        }
        if p.events_a
            .iter()
            .any(|e| matches!(e, SessionEvent::SendFailed { id: 2, .. }))
        {
            failed_at.get_or_insert(p.now);
        }
        assert!(p.now < sent_at + Duration::from_secs(60), "never given up");
    }
    // Both ends give up on the documented schedule (1 s x 3 retries: waits of 1, 2, 4 and 8 s),
    // the receiver counting from when it saw the gap (at once: 3 came right after 2).
    let give_up = sent_at + rto::quiet_give_up(Duration::from_secs(1), 3);
    assert_eq!(give_up, sent_at + Duration::from_secs(15));
    assert_eq!((lost_at, failed_at), (Some(give_up), Some(give_up)));
    assert_eq!(
        p.messages_b().iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        vec![1, 3]
    );
    // The sender never got an ack for 2 (the RTX requests are not acks), so it reports it.
    assert!(p
        .events_a
        .iter()
        .any(|e| matches!(e, SessionEvent::SendFailed { id: 2, .. })));
    assert!(!p
        .events_a
        .iter()
        .any(|e| matches!(e, SessionEvent::Delivered { id: 2, .. })));
    p.filter = Box::new(|_, _| true);
    p.a.publish(sid, Bytes::from_static(b"after"), p.now)
        .unwrap();
    p.run();
    assert_eq!(p.messages_b().last().unwrap(), &(4, b"after".to_vec()));
}

#[test]
fn sender_reports_when_the_peer_never_acks() {
    let mut p = Pair::new();
    let sid = p.open(reliable());
    p.filter = Box::new(|from_a, m| !(from_a && kind(m) == Mt::Msg));
    let sent_at = p.now;
    p.a.publish(sid, Bytes::from_static(b"x"), p.now).unwrap();
    p.run();
    let failed = |p: &Pair| {
        p.events_a
            .iter()
            .any(|e| matches!(e, SessionEvent::SendFailed { id: 1, .. }))
    };
    while !failed(&p) && p.step_time() && p.now < sent_at + Duration::from_secs(60) {}
    assert!(failed(&p));
    // Retransmissions after 1, 2 and 4 s, then `SendFailed` 8 s later (was 4 s after sending).
    assert_eq!(p.now, sent_at + Duration::from_secs(15));
    assert_eq!(
        p.now,
        sent_at + rto::quiet_give_up(Duration::from_secs(1), 3)
    );
    assert!(
        p.events_a
            .iter()
            .all(|e| !matches!(e, SessionEvent::Closed { .. })),
        "session survives"
    );
}

#[test]
fn unreliable_sessions_deliver_without_acks() {
    let mut p = Pair::new();
    let sid = p.open(SessionConfig::default());
    p.a.publish(sid, Bytes::from_static(b"fire"), p.now)
        .unwrap();
    p.run();
    assert_eq!(p.messages_b(), vec![(1, b"fire".to_vec())]);
    assert!(!p.wire_log.iter().any(|(_, k, _)| *k == Mt::MsgAck));
}

#[test]
fn publishes_before_the_handshake_are_queued() {
    let mut p = Pair::new();
    let sid =
        p.a.create_session(&Name::new("org", "ns", "bob"), reliable(), p.now);
    assert_eq!(p.a.publish(sid, Bytes::from_static(b"early"), p.now), Ok(0));
    p.run();
    assert_eq!(p.messages_b(), vec![(1, b"early".to_vec())]);
}

/// The queue before the handshake is bounded: the publish past it is refused with
/// `QueueFull`, and everything queued is delivered, in order, once the session is up.
#[test]
fn publishes_before_the_handshake_are_bounded() {
    let mut p = Pair::new();
    let sid =
        p.a.create_session(&Name::new("org", "ns", "bob"), reliable(), p.now);
    for i in 0..MAX_QUEUED as u32 {
        let payload = Bytes::from(i.to_be_bytes().to_vec());
        assert_eq!(p.a.publish(sid, payload, p.now), Ok(0));
    }
    assert_eq!(
        p.a.publish(sid, Bytes::from_static(b"one too many"), p.now),
        Err(SessionError::QueueFull(sid, MAX_QUEUED))
    );
    p.run();
    // Acks free the send window for the rest of the queue.
    while p.messages_b().len() < MAX_QUEUED && p.step_time() {}
    let received = p.messages_b();
    assert_eq!(received.len(), MAX_QUEUED);
    for (i, (id, payload)) in received.iter().enumerate() {
        assert_eq!(*id, i as u32 + 1);
        assert_eq!(payload[..], (i as u32).to_be_bytes());
    }
}

/// Commands that need an established session are refused while the handshake runs, and
/// every command is refused once the session is closing, each with its own error.
#[test]
fn commands_before_the_handshake_and_while_closing_are_refused() {
    let mut p = Pair::new();
    let bob = Name::new("org", "ns", "bob");
    let opening = p.a.create_session(&bob, reliable(), p.now);
    assert_eq!(
        p.a.set_online(opening, false, p.now),
        Err(SessionError::NotEstablished(opening))
    );
    assert_eq!(
        p.a.publish_to(opening, &bob, Bytes::from_static(b"direct"), p.now),
        Err(SessionError::NotEstablished(opening))
    );
    p.run();

    // Closing: the peer has not acknowledged the close yet.
    p.a.close(opening, p.now).unwrap();
    assert_eq!(
        p.a.publish(opening, Bytes::from_static(b"late"), p.now),
        Err(SessionError::Closing(opening))
    );
    assert_eq!(
        p.a.close(opening, p.now),
        Err(SessionError::Closing(opening))
    );
    assert_eq!(
        p.a.set_online(opening, true, p.now),
        Err(SessionError::Closing(opening))
    );
    p.run();
    assert!(p.events_a.contains(&SessionEvent::Closed {
        session: opening,
        reason: CloseReason::Local
    }));
}

#[test]
fn close_is_acknowledged_and_ends_both_sides() {
    let mut p = Pair::new();
    let sid = p.open(reliable());
    p.a.close(sid, p.now).unwrap();
    p.run();
    assert!(p.events_a.contains(&SessionEvent::Closed {
        session: sid,
        reason: CloseReason::Local
    }));
    assert!(p.events_b.contains(&SessionEvent::Closed {
        session: sid,
        reason: CloseReason::Peer
    }));
    assert_eq!(p.a.session_count() + p.b.session_count(), 0);
    assert_eq!(
        p.a.publish(sid, Bytes::new(), p.now),
        Err(SessionError::UnknownSession(sid))
    );
}

#[test]
fn lost_control_messages_are_retried_and_duplicates_answered_once() {
    let mut p = Pair::new();
    let mut dropped_ack = false;
    p.filter = Box::new(move |from_a, m| {
        if !from_a && kind(m) == Mt::GroupAck && !dropped_ack {
            dropped_ack = true;
            return false;
        }
        true
    });
    let sid =
        p.a.create_session(&Name::new("org", "ns", "bob"), reliable(), p.now);
    p.run();
    assert!(p.events_a.is_empty(), "the ack of the welcome was lost");
    p.step_time(); // welcome re-sent, acked again
    assert_eq!(
        p.events_a,
        vec![SessionEvent::Established {
            session: sid,
            peer: p.b.name().clone()
        }]
    );
    let incoming = p
        .events_b
        .iter()
        .filter(|e| matches!(e, SessionEvent::Incoming { .. }))
        .count();
    assert_eq!(
        incoming, 1,
        "duplicate welcome does not open a second session"
    );
    assert_eq!(p.b.stats().dropped(SessionDrop::Duplicate), 1);
}

#[test]
fn handshake_without_a_peer_gives_up() {
    let mut p = Pair::new();
    p.filter = Box::new(|_, _| false);
    let sid = p.a.create_session(
        &Name::new("org", "ns", "bob"),
        SessionConfig::default(),
        p.now,
    );
    p.run();
    while p.step_time() {}
    assert_eq!(
        p.now,
        Timestamp::ZERO + DEFAULT_CONTROL_INTERVAL * (DEFAULT_CONTROL_RETRIES + 1)
    );
    assert_eq!(
        p.events_a,
        vec![SessionEvent::Closed {
            session: sid,
            reason: CloseReason::NoAnswer("discovery")
        }]
    );
}

fn tamper(mut m: pb::Message, f: impl FnOnce(&mut pb::Publish)) -> pb::Message {
    if let Some(pb::message::MessageType::Publish(p)) = &mut m.message_type {
        f(p);
    }
    m
}

#[test]
fn bad_input_is_dropped_and_counted() {
    let mut p = Pair::new();
    let sid = p.open(reliable());
    p.a.publish(sid, Bytes::from_static(b"x"), p.now).unwrap();
    let Some(Output::Send(msg)) = p.a.poll_output() else {
        panic!("a message")
    };
    let msg = *msg;

    // A token from an app with another secret.
    let mut forger = SessionLayer::new(
        LayerConfig {
            name: Name::new("org", "ns", "alice"),
            secret: "another-secret-another-secret-another".into(),
            unix_at_zero: UNIX0,
        },
        [3; 32],
    )
    .unwrap();
    forger.create_session(
        &Name::new("org", "ns", "bob"),
        SessionConfig::default(),
        p.now,
    );
    let Some(Output::Send(forged)) = forger.poll_output() else {
        panic!("a discovery")
    };
    p.b.handle_message(*forged, p.now);
    assert_eq!(p.b.stats().dropped(SessionDrop::BadToken), 1);

    // An expired token: the same message an hour and a minute later.
    p.b.handle_message(msg.clone(), p.now + Duration::from_secs(3661));
    assert_eq!(p.b.stats().dropped(SessionDrop::BadToken), 2);

    // Unknown session id.
    p.b.handle_message(
        tamper(msg.clone(), |pb| {
            pb.session.as_mut().unwrap().session_id ^= 1
        }),
        p.now,
    );
    assert_eq!(p.b.stats().dropped(SessionDrop::UnknownSession), 1);

    // Far out of window.
    p.b.handle_message(
        tamper(msg.clone(), |pb| {
            pb.session.as_mut().unwrap().message_id = 1_000_000
        }),
        p.now,
    );
    assert_eq!(p.b.stats().dropped(SessionDrop::OutOfWindow), 1);

    // A signed control message with a changed field: the signature no longer verifies.
    let sid2 =
        p.a.create_session(&Name::new("org", "ns", "bob"), reliable(), p.now);
    let Some(Output::Send(discovery)) = p.a.poll_output() else {
        panic!("a discovery")
    };
    let discovery = *discovery;
    p.b.handle_message(
        tamper(discovery.clone(), |pb| {
            pb.session.as_mut().unwrap().session_id = sid2 ^ 7
        }),
        p.now,
    );
    assert_eq!(p.b.stats().dropped(SessionDrop::BadSignature), 1);

    // A truncated command payload: a join request without its payload.
    let mut join = discovery;
    if let Some(pb::message::MessageType::Publish(pb)) = &mut join.message_type {
        pb.session.as_mut().unwrap().session_message_type = Mt::JoinRequest as i32;
        pb.msg = None;
    }
    join.metadata.clear();
    let key = SigningKey::from_secret_scalar(&p.a.key.secret_scalar()).unwrap();
    sign_control_message(&mut join, &key).unwrap();
    p.b.handle_message(join, p.now);
    assert_eq!(p.b.stats().dropped(SessionDrop::Malformed), 1);

    // Not even a publish.
    p.b.handle_message(pb::Message::default(), p.now);
    assert_eq!(p.b.stats().dropped(SessionDrop::Malformed), 2);

    // The session still works.
    p.b.handle_message(msg, p.now);
    p.run();
    assert_eq!(p.messages_b(), vec![(1, b"x".to_vec())]);
}

#[test]
fn same_seeds_same_outputs() {
    fn run() -> Vec<pb::Message> {
        let mut a = layer("alice", 1);
        let sid = a.create_session(&Name::new("org", "ns", "bob"), reliable(), Timestamp::ZERO);
        a.publish(sid, Bytes::from_static(b"q"), Timestamp::ZERO)
            .unwrap();
        a.handle_timeout(Timestamp::ZERO + Duration::from_secs(1));
        std::iter::from_fn(|| a.poll_output())
            .filter_map(|o| match o {
                Output::Send(m) => Some(*m),
                _ => None,
            })
            .collect()
    }
    assert_eq!(run(), run());
}

/// The receiver's ack waits for the app's answer and goes out right behind it, so a round trip
/// carries no ack ahead of its reply; unanswered, it goes out once [`ACK_HOLD`] has passed.
#[test]
fn an_ack_follows_the_reply_or_goes_out_after_the_hold() {
    let mut p = Pair::new();
    let sid = p.open(reliable());
    let from_b = |p: &Pair| -> Vec<(Mt, u32)> {
        p.wire_log
            .iter()
            .filter(|(from_a, k, _)| !from_a && matches!(k, Mt::Msg | Mt::MsgAck))
            .map(|(_, k, id)| (*k, *id))
            .collect()
    };
    p.a.publish(sid, Bytes::from_static(b"request"), p.now)
        .unwrap();
    p.run();
    assert_eq!(p.messages_b().len(), 1);
    assert!(from_b(&p).is_empty(), "the ack waits");
    p.b.publish(sid, Bytes::from_static(b"reply"), p.now)
        .unwrap();
    p.run();
    assert_eq!(from_b(&p), vec![(Mt::Msg, 1), (Mt::MsgAck, 1)]);
    assert!(p.events_a.contains(&SessionEvent::Delivered {
        session: sid,
        id: 1
    }));

    // Nobody answers: the ack goes out at the end of the hold, not before.
    p.a.publish(sid, Bytes::from_static(b"one way"), p.now)
        .unwrap();
    p.run();
    let held_since = p.now;
    assert_eq!(p.b.poll_timeout(), Some(held_since + ACK_HOLD));
    p.b.handle_timeout(held_since + (ACK_HOLD - Duration::from_micros(1)));
    p.run();
    assert_eq!(from_b(&p).len(), 2, "still held");
    p.release_held_acks();
    assert_eq!(from_b(&p)[2..], [(Mt::MsgAck, 2)]);
    assert!(p.events_a.contains(&SessionEvent::Delivered {
        session: sid,
        id: 2
    }));
}

/// An ack held while the driver stalls (or its clock jumps) goes out with a fresh identity
/// token, not the one it was built with an hour before, which its receiver would refuse.
#[test]
fn an_ack_released_long_after_its_hold_carries_a_fresh_token() {
    let mut p = Pair::new();
    let sid = p.open(reliable());
    p.a.publish(sid, Bytes::from_static(b"one way"), p.now)
        .unwrap();
    p.run();
    assert_eq!(p.messages_b().len(), 1, "received, its ack held");
    p.now = p.now + Duration::from_secs(2 * 3600);
    p.b.handle_timeout(p.now);
    p.run();
    assert!(
        p.events_a.contains(&SessionEvent::Delivered {
            session: sid,
            id: 1
        }),
        "the late ack verifies: {:?}",
        p.events_a
    );
}

fn identity_of(m: &pb::Message) -> String {
    match &m.message_type {
        Some(pb::message::MessageType::Publish(p)) => p.header.as_ref().unwrap().identity.clone(),
        _ => panic!("not a publish"),
    }
}

/// Data messages reuse one token per unix second (an HMAC per message spared); command
/// messages, whose tokens a reference receiver may check against a replay cache, get a fresh
/// one each.
#[test]
fn data_messages_share_a_token_per_second_and_commands_get_fresh_ones() {
    let mut p = Pair::new();
    let wire = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let log = wire.clone();
    p.filter = Box::new(move |from_a, m| {
        log.borrow_mut().push((from_a, kind(m), identity_of(m)));
        true
    });
    let sid = p.open(reliable());
    for n in 0..3u8 {
        p.a.publish(sid, Bytes::from(vec![n]), p.now).unwrap();
        p.run();
    }
    p.release_held_acks();
    p.now = p.now + Duration::from_secs(1);
    p.a.publish(sid, Bytes::from_static(b"next second"), p.now)
        .unwrap();
    p.run();
    p.release_held_acks();
    assert_eq!(p.messages_b().len(), 4, "every data message verified");

    let wire = wire.borrow();
    let tokens = |from_a: bool, data: bool| -> Vec<&String> {
        wire.iter()
            .filter(|(a, mt, _)| *a == from_a && identity::is_command_message(*mt as i32) != data)
            .map(|(.., token)| token)
            .collect()
    };
    let commands: Vec<&String> = [tokens(true, false), tokens(false, false)].concat();
    assert!(commands.len() >= 2, "the handshake is commands: {wire:?}");
    let distinct: std::collections::BTreeSet<&String> = commands.iter().copied().collect();
    assert_eq!(distinct.len(), commands.len(), "a command token repeated");

    let msgs = tokens(true, true);
    assert_eq!(msgs.len(), 4);
    assert!(
        msgs[..3].iter().all(|t| *t == msgs[0]),
        "one token in the first second"
    );
    assert_ne!(msgs[3], msgs[0], "a new second, a new token");
    let acks = tokens(false, true);
    assert_eq!(acks.len(), 4);
    assert!(acks[..3].iter().all(|t| *t == acks[0]));
    assert_ne!(acks[3], acks[0]);
    assert_ne!(acks[0], msgs[0], "each side its own token");
    assert!(!distinct.contains(msgs[0]) && !distinct.contains(acks[0]));
}
