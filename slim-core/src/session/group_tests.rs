//! Group sessions: a moderator and members on a toy network that routes like a node (exact
//! names, any-instance names, channel subscriptions), with optional drops.

use super::*;
use slim_proto::NameKey;

const SECRET: &str = "interop-shared-secret-0123456789abcdef-0123456789";

type Drop = Box<dyn FnMut(usize, usize, &pb::Message) -> bool>;

struct Net {
    apps: Vec<SessionLayer>,
    subs: Vec<Vec<NameKey>>,
    events: Vec<Vec<SessionEvent>>,
    now: Timestamp,
    /// (from, to, message) → false drops it.
    keep: Drop,
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

impl Net {
    fn new(services: &[&str]) -> Net {
        let apps: Vec<SessionLayer> = services
            .iter()
            .enumerate()
            .map(|(i, s)| {
                SessionLayer::new(
                    LayerConfig {
                        name: Name::new("org", "ns", s),
                        secret: SECRET.into(),
                        unix_at_zero: 1_795_600_000,
                    },
                    [i as u8 + 1; 32],
                )
                .unwrap()
            })
            .collect();
        let subs = apps.iter().map(|a| vec![a.name().key()]).collect();
        Net {
            events: vec![Vec::new(); apps.len()],
            apps,
            subs,
            now: Timestamp::ZERO,
            keep: Box::new(|_, _, _| true),
        }
    }

    fn targets(&self, from: usize, m: &pb::Message) -> Vec<usize> {
        let Some(pb::message::MessageType::Publish(p)) = &m.message_type else {
            return vec![];
        };
        let h = p.header.as_ref().unwrap();
        let dest = NameKey::from_pb(h.destination.as_ref().unwrap()).unwrap();
        let matching: Vec<usize> = (0..self.apps.len())
            .filter(|j| *j != from)
            .filter(|j| {
                self.subs[*j].iter().any(|k| {
                    k.components == dest.components
                        && (dest.id == slim_proto::name::ANY_INSTANCE || k.id == dest.id)
                })
            })
            .collect();
        if h.fanout == 1 {
            matching.into_iter().take(1).collect()
        } else {
            matching
        }
    }

    fn run(&mut self) {
        loop {
            let mut moved = false;
            for i in 0..self.apps.len() {
                while let Some(o) = self.apps[i].poll_output() {
                    moved = true;
                    match o {
                        Output::Send(m) => {
                            for j in self.targets(i, &m) {
                                if (self.keep)(i, j, &m) {
                                    self.apps[j].handle_message((*m).clone(), self.now);
                                }
                            }
                        }
                        Output::Subscribe(name) => self.subs[i].push(name.key()),
                        Output::Unsubscribe(name) => self.subs[i].retain(|k| *k != name.key()),
                        Output::Event(e) => self.events[i].push(e),
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn settle(&mut self, limit: Duration) {
        self.run();
        let end = self.now + limit;
        while let Some(at) = self.apps.iter().filter_map(|a| a.poll_timeout()).min() {
            if at > end {
                break;
            }
            self.now = self.now.max(at);
            for a in &mut self.apps {
                a.handle_timeout(self.now);
            }
            self.run();
        }
    }

    fn messages(&self, i: usize, session: SessionId) -> Vec<(Name, Vec<u8>)> {
        self.events[i]
            .iter()
            .filter_map(|e| match e {
                SessionEvent::Message {
                    session: s,
                    source,
                    payload,
                    ..
                } if *s == session => Some((source.clone(), payload.to_vec())),
                _ => None,
            })
            .collect()
    }

    fn has(&self, i: usize, pred: impl Fn(&SessionEvent) -> bool) -> bool {
        self.events[i].iter().any(pred)
    }
}

fn reliable() -> SessionConfig {
    SessionConfig {
        reliability: Some(Reliability {
            interval: Duration::from_millis(500),
            max_retries: 5,
        }),
        metadata: BTreeMap::new(),
        mls: false,
    }
}

const M: usize = 0;
const A: usize = 1;
const B: usize = 2;
const C: usize = 3;

/// Moderator and three members, all invited.
fn group() -> (Net, SessionId) {
    group_of(&["a", "b", "c"])
}

/// Moderator and three apps (a, b, c), of which `invited` are in the group.
fn group_of(invited: &[&str]) -> (Net, SessionId) {
    let mut net = Net::new(&["moderator", "a", "b", "c"]);
    let chan = Name::new("org", "ns", "chan");
    let sid = net.apps[M].create_group(&chan, reliable(), net.now);
    for service in invited {
        net.apps[M]
            .invite(sid, &Name::new("org", "ns", service), net.now)
            .unwrap();
    }
    net.run();
    (net, sid)
}

#[test]
fn invites_build_the_group_one_at_a_time() {
    let (net, sid) = group();
    let joined: Vec<Name> = net.events[M]
        .iter()
        .filter_map(|e| match e {
            SessionEvent::MemberJoined { member, .. } => Some(member.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        joined,
        vec![
            net.apps[A].name().clone(),
            net.apps[B].name().clone(),
            net.apps[C].name().clone()
        ]
    );
    for member in [A, B, C] {
        assert!(net.has(
            member,
            |e| matches!(e, SessionEvent::Incoming { group: true, session, .. } if *session == sid)
        ));
        assert_eq!(
            net.apps[member].members(sid).unwrap().len(),
            4,
            "member {member} knows everyone"
        );
    }
    // The reference's order: first member, moderator, then the others as they joined.
    let members = net.apps[M].members(sid).unwrap();
    assert_eq!(members[0], *net.apps[A].name());
    assert_eq!(members[1], *net.apps[M].name());
    // Earlier members heard of the later ones through updates.
    assert!(net.has(
        A,
        |e| matches!(e, SessionEvent::MemberJoined { member, .. } if member == net.apps[C].name())
    ));
    // Everyone is on both channels.
    for i in [M, A, B, C] {
        assert_eq!(net.subs[i].len(), 3, "app {i}: own name, data, control");
    }
}

#[test]
fn broadcast_and_fan_in_reach_everyone_but_the_sender() {
    let (mut net, sid) = group();
    for i in 0..5u8 {
        net.apps[M]
            .publish(sid, Bytes::from(vec![i]), net.now)
            .unwrap();
    }
    net.apps[A]
        .publish(sid, Bytes::from_static(b"from a"), net.now)
        .unwrap();
    net.run();
    for member in [A, B, C] {
        let got: Vec<Vec<u8>> = net
            .messages(member, sid)
            .into_iter()
            .filter(|(s, _)| s == net.apps[M].name())
            .map(|(_, p)| p)
            .collect();
        assert_eq!(
            got,
            (0..5u8).map(|i| vec![i]).collect::<Vec<_>>(),
            "member {member} in order"
        );
    }
    for i in [M, B, C] {
        assert!(net
            .messages(i, sid)
            .contains(&(net.apps[A].name().clone(), b"from a".to_vec())));
    }
    assert!(!net
        .messages(A, sid)
        .iter()
        .any(|(s, _)| s == net.apps[A].name()));
    net.settle(ACK_HOLD);
    let delivered = net.events[M]
        .iter()
        .filter(|e| matches!(e, SessionEvent::Delivered { .. }))
        .count();
    assert_eq!(delivered, 5, "every member acked every broadcast");
}

#[test]
fn removed_member_leaves_and_receives_nothing_more() {
    let (mut net, sid) = group();
    net.apps[M]
        .remove(sid, &Name::new("org", "ns", "b"), net.now)
        .unwrap();
    net.run();
    assert!(net.has(B, |e| *e
        == SessionEvent::Closed {
            session: sid,
            reason: CloseReason::Removed
        }));
    for i in [M, A, C] {
        assert!(net.has(i, |e| matches!(e, SessionEvent::MemberLeft { member, .. } if member == net.apps[B].name())), "app {i}");
    }
    assert_eq!(net.subs[B].len(), 1, "B dropped both channels");
    let before = net.messages(B, sid).len();
    net.apps[M]
        .publish(sid, Bytes::from_static(b"after"), net.now)
        .unwrap();
    net.run();
    assert_eq!(net.messages(B, sid).len(), before);
    for i in [A, C] {
        assert_eq!(net.messages(i, sid).last().unwrap().1, b"after".to_vec());
    }
    assert!(
        !net.has(M, |e| matches!(e, SessionEvent::SendFailed { .. })),
        "B is not waited for"
    );
    assert!(matches!(
        net.apps[M].remove(sid, &Name::new("org", "ns", "b"), net.now),
        Err(SessionError::NotAMember(..))
    ));
    assert!(matches!(
        net.apps[A].invite(sid, &Name::new("org", "ns", "x"), net.now),
        Err(SessionError::NotModerator(_))
    ));
}

#[test]
fn a_member_can_leave_and_the_moderator_can_close() {
    let (mut net, sid) = group();
    net.apps[C].close(sid, net.now).unwrap();
    net.run();
    assert!(net.has(C, |e| *e
        == SessionEvent::Closed {
            session: sid,
            reason: CloseReason::Local
        }));
    for i in [M, A, B] {
        assert!(net.has(i, |e| matches!(e, SessionEvent::MemberLeft { member, .. } if member == net.apps[C].name())), "app {i}");
    }
    net.apps[M].close(sid, net.now).unwrap();
    net.run();
    assert!(net.has(M, |e| *e
        == SessionEvent::Closed {
            session: sid,
            reason: CloseReason::Local
        }));
    for i in [A, B] {
        assert!(net.has(i, |e| *e
            == SessionEvent::Closed {
                session: sid,
                reason: CloseReason::Peer
            }));
        assert_eq!(net.subs[i].len(), 1);
    }
    assert_eq!(net.subs[M].len(), 1);
    assert!(net.apps.iter().all(|a| a.session_count() == 0));
}

#[test]
fn lost_updates_and_data_are_recovered() {
    let mut net = Net::new(&["moderator", "a", "b"]);
    let sid = net.apps[M].create_group(&Name::new("org", "ns", "chan"), reliable(), net.now);
    net.apps[M]
        .invite(sid, &Name::new("org", "ns", "a"), net.now)
        .unwrap();
    net.run();
    // The update announcing b is lost once on its way to a, and so is the second broadcast.
    let mut dropped_update = false;
    let mut dropped_msg = false;
    net.keep = Box::new(move |_, to, m| {
        if to == A && kind(m) == Mt::GroupUpdate && !dropped_update {
            dropped_update = true;
            return false;
        }
        if to == A && kind(m) == Mt::Msg && mid(m) == 2 && !dropped_msg {
            dropped_msg = true;
            return false;
        }
        true
    });
    net.apps[M]
        .invite(sid, &Name::new("org", "ns", "b"), net.now)
        .unwrap();
    net.run();
    net.apps[M]
        .publish(sid, Bytes::from_static(b"one"), net.now)
        .unwrap();
    net.apps[M]
        .publish(sid, Bytes::from_static(b"two"), net.now)
        .unwrap();
    net.apps[M]
        .publish(sid, Bytes::from_static(b"three"), net.now)
        .unwrap();
    net.settle(Duration::from_secs(5));
    assert!(net.has(
        M,
        |e| matches!(e, SessionEvent::MemberJoined { member, .. } if member == net.apps[B].name())
    ));
    assert_eq!(net.apps[A].members(sid).unwrap().len(), 3);
    let got: Vec<Vec<u8>> = net.messages(A, sid).into_iter().map(|(_, p)| p).collect();
    assert_eq!(
        got,
        vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]
    );
    assert_eq!(net.apps[A].stats().dropped(SessionDrop::Duplicate), 0);
}

#[test]
fn inviting_nobody_fails_and_the_next_invite_still_runs() {
    let mut net = Net::new(&["moderator", "a"]);
    let sid = net.apps[M].create_group(&Name::new("org", "ns", "chan"), reliable(), net.now);
    net.apps[M]
        .invite(sid, &Name::new("org", "ns", "ghost"), net.now)
        .unwrap();
    net.apps[M]
        .invite(sid, &Name::new("org", "ns", "a"), net.now)
        .unwrap();
    net.settle(Duration::from_secs(10));
    assert!(net.has(
        M,
        |e| matches!(e, SessionEvent::InviteFailed { reason, .. } if reason.contains("discovery"))
    ));
    assert!(net.has(
        M,
        |e| matches!(e, SessionEvent::MemberJoined { member, .. } if member == net.apps[A].name())
    ));
}

#[test]
fn direct_messages_reach_one_member_once() {
    let (mut net, sid) = group();
    let target = net.apps[B].name().clone();
    let id = net.apps[M]
        .publish_to(sid, &target, Bytes::from_static(b"just for b"), net.now)
        .unwrap();
    assert!(id > super::super::sender::MAX_SEQUENCE_ID);
    let Some(Output::Send(direct)) = net.apps[M].poll_output() else {
        panic!("the direct message")
    };
    assert_eq!(net.targets(M, &direct), vec![B], "addressed to B alone");
    // Delivered twice (a retransmission): B hands it to its app once, and acks both.
    net.apps[B].handle_message((*direct).clone(), net.now);
    net.apps[B].handle_message(*direct, net.now);
    net.settle(ACK_HOLD);
    let got: Vec<Vec<u8>> = net.messages(B, sid).into_iter().map(|(_, p)| p).collect();
    assert_eq!(got, vec![b"just for b".to_vec()]);
    assert_eq!(net.apps[B].stats().dropped(SessionDrop::Duplicate), 1);
    assert!(net.messages(A, sid).is_empty() && net.messages(C, sid).is_empty());
    assert!(
        net.has(M, |e| *e == SessionEvent::Delivered { session: sid, id }),
        "acked with PUBLISH_TO"
    );
    assert!(matches!(
        net.apps[M].publish_to(
            sid,
            &Name::new("org", "ns", "nobody"),
            Bytes::new(),
            net.now
        ),
        Err(SessionError::NotAMember(..))
    ));
}

/// `who` tells the moderator it goes offline (what a soft close sends); returns its name.
fn announce_offline(net: &mut Net, sid: SessionId, who: usize) -> Name {
    let me = net.apps[who].name().clone();
    let control = net.apps[who].sessions[&sid]
        .group
        .as_ref()
        .unwrap()
        .control
        .clone();
    let ups = net.apps[who].build(
        SessionType::Multicast,
        Mt::UpdateParticipantState,
        sid,
        77,
        &me,
        &control,
        MAX_FANOUT,
        command(Cmd::UpdateParticipantState(
            pb::UpdateParticipantStatePayload {
                participant: Some(me.to_pb()),
                new_state: pb::ParticipantState::Offline as i32,
                epoch: 0,
            },
        )),
        BTreeMap::new(),
        net.now,
    );
    net.apps[M].handle_message(ups, net.now);
    net.run();
    me
}

#[test]
fn a_member_that_goes_offline_is_not_waited_for() {
    let (mut net, sid) = group();
    let me = announce_offline(&mut net, sid, A);
    assert!(net.has(
        M,
        |e| matches!(e, SessionEvent::MemberState { online: false, member, .. } if *member == me)
    ));
    // A no longer receives anything; the broadcast is still complete for the others.
    net.keep = Box::new(|_, to, _| to != A);
    let id = net.apps[M]
        .publish(sid, Bytes::from_static(b"x"), net.now)
        .unwrap();
    net.settle(ACK_HOLD);
    assert!(net.has(M, |e| *e == SessionEvent::Delivered { session: sid, id }));
    // A speaks again: it is back.
    net.keep = Box::new(|_, _, _| true);
    net.apps[A]
        .publish(sid, Bytes::from_static(b"back"), net.now)
        .unwrap();
    net.run();
    assert!(net.has(
        M,
        |e| matches!(e, SessionEvent::MemberState { online: true, member, .. } if *member == me)
    ));
}

#[test]
fn an_invite_does_not_wait_for_an_offline_members_ack_of_the_update() {
    let (mut net, sid) = group_of(&["a", "b"]);
    announce_offline(&mut net, sid, A);
    // Offline, A drops what it gets (as a reference member does after a soft close).
    net.keep = Box::new(|_, to, _| to != A);
    net.apps[M]
        .invite(sid, &Name::new("org", "ns", "c"), net.now)
        .unwrap();
    // No time passes: only B's ack of the update is waited for, not a retransmission to A.
    net.run();
    let c = net.apps[C].name().clone();
    assert!(net.has(
        M,
        |e| matches!(e, SessionEvent::MemberJoined { member, .. } if *member == c)
    ));
    assert_eq!(
        net.apps[M].members(sid).unwrap().len(),
        4,
        "A stays a member"
    );
}

#[test]
fn an_invite_completes_at_once_when_every_other_member_is_offline() {
    let (mut net, sid) = group_of(&["a", "b"]);
    announce_offline(&mut net, sid, A);
    announce_offline(&mut net, sid, B);
    let updates = std::rc::Rc::new(std::cell::Cell::new(0));
    let counted = updates.clone();
    net.keep = Box::new(move |from, to, m| {
        if from == M && kind(m) == Mt::GroupUpdate {
            counted.set(counted.get() + 1);
        }
        to != A && to != B
    });
    net.apps[M]
        .invite(sid, &Name::new("org", "ns", "c"), net.now)
        .unwrap();
    // The update waits for nobody: it ends at the next timeout, due at once (no time passes).
    let start = net.now;
    net.settle(Duration::ZERO);
    assert_eq!(net.now, start);
    let c = net.apps[C].name().clone();
    assert!(net.has(
        M,
        |e| matches!(e, SessionEvent::MemberJoined { member, .. } if *member == c)
    ));
    assert!(net.apps[M].sessions[&sid].pending.is_empty());
    // Sent once (to the channel, so to A and B, both dropping it), never retransmitted.
    net.settle(Duration::from_secs(5));
    assert_eq!(updates.get(), 2);
    assert_eq!(net.apps[M].members(sid).unwrap().len(), 4);
}

#[test]
fn a_removal_does_not_wait_for_an_offline_members_ack_of_the_update() {
    let (mut net, sid) = group();
    announce_offline(&mut net, sid, A);
    // Offline, A drops what it gets. B's first ack of the update is lost: the removed member
    // is still waited for, as before.
    let mut lost = false;
    net.keep = Box::new(move |from, to, m| {
        let drop = !lost && from == B && to == M && kind(m) == Mt::GroupAck;
        lost |= drop;
        to != A && !drop
    });
    let b = net.apps[B].name().clone();
    net.apps[M].remove(sid, &b, net.now).unwrap();
    net.run();
    let left = |net: &Net| {
        net.has(
            M,
            |e| matches!(e, SessionEvent::MemberLeft { member, .. } if *member == b),
        )
    };
    assert!(!left(&net), "B's ack of the update is waited for");
    // Its one retransmission brings B's ack, then B leaves: A's retries are not waited out.
    net.settle(Duration::from_millis(500));
    assert!(left(&net));
    assert!(net.has(B, |e| *e
        == SessionEvent::Closed {
            session: sid,
            reason: CloseReason::Removed
        }));
    assert_eq!(
        net.apps[M].members(sid).unwrap().len(),
        3,
        "A stays a member"
    );
}

#[test]
fn an_offline_member_that_missed_a_removal_gets_the_member_list_when_heard_from() {
    let (mut net, sid) = group();
    announce_offline(&mut net, sid, A);
    // Offline, A drops what it gets: the removal's update too, which is not waited for.
    net.keep = Box::new(|_, to, _| to != A);
    let b = net.apps[B].name().clone();
    net.apps[M].remove(sid, &b, net.now).unwrap();
    net.run();
    let lists_b = |net: &Net| {
        net.apps[A]
            .members(sid)
            .unwrap()
            .iter()
            .any(|n| n.key() == b.key())
    };
    assert!(lists_b(&net), "A missed the removal");
    // A is back and speaks: the moderator sends it the current list.
    net.keep = Box::new(|_, _, _| true);
    net.apps[A]
        .publish(sid, Bytes::from_static(b"back"), net.now)
        .unwrap();
    net.run();
    assert!(!lists_b(&net), "A was resynchronised");
    assert_eq!(net.apps[A].members(sid).unwrap().len(), 3);
}

#[test]
fn a_state_update_does_not_wait_for_an_offline_members_ack() {
    let (mut net, sid) = group();
    // A soft-closes, and every member hears of it.
    net.apps[A].set_online(sid, false, net.now).unwrap();
    net.run();
    let a = net.apps[A].name().clone();
    assert!(net.has(
        B,
        |e| matches!(e, SessionEvent::MemberState { online: false, member, .. } if *member == a)
    ));
    // Offline, A drops what it gets (as a reference member does).
    net.keep = Box::new(|_, to, _| to != A);
    net.apps[B].set_online(sid, false, net.now).unwrap();
    // No time passes: only the moderator's and C's acks are waited for, not a retry to A.
    net.run();
    assert!(net.apps[B].sessions[&sid].pending.is_empty());
}

#[test]
fn a_state_update_ends_at_once_when_the_member_it_still_waits_for_is_removed() {
    let (mut net, sid) = group();
    // B's acks of A's state update are lost: it is all A still waits for.
    net.keep = Box::new(|from, to, m| !(from == B && to == A && kind(m) == Mt::GroupAck));
    net.apps[A].set_online(sid, true, net.now).unwrap();
    net.run();
    assert_eq!(net.apps[A].sessions[&sid].pending.len(), 1);
    let b = net.apps[B].name().clone();
    net.apps[M].remove(sid, &b, net.now).unwrap();
    // A applies the removal: nobody is left to ack, the update ends without a retransmission.
    let start = net.now;
    net.settle(Duration::ZERO);
    assert_eq!(net.now, start);
    assert!(net.apps[A].sessions[&sid].pending.is_empty());
    assert_eq!(net.apps[A].members(sid).unwrap().len(), 3);
}

#[test]
fn acks_of_a_re_sent_update_from_members_that_acked_it_are_duplicates() {
    let (mut net, sid) = group_of(&["a", "b"]);
    // A's first two acks of the update announcing C are lost: the update goes to the whole
    // channel twice more, and B, which acked it, acks each copy again (C too, on the channel
    // by then): the first time while the update waits for A, the second after A's ack ended it.
    let mut lost = 0;
    net.keep = Box::new(move |from, to, m| {
        let drop = lost < 2 && from == A && to == M && kind(m) == Mt::GroupAck;
        lost += u32::from(drop);
        !drop
    });
    let stats = net.apps[M].stats().clone();
    net.apps[M]
        .invite(sid, &Name::new("org", "ns", "c"), net.now)
        .unwrap();
    net.settle(Duration::from_secs(5));
    let c = net.apps[C].name().clone();
    assert!(net.has(
        M,
        |e| matches!(e, SessionEvent::MemberJoined { member, .. } if *member == c)
    ));
    let after = net.apps[M].stats();
    assert_eq!(
        after.dropped(SessionDrop::Unexpected),
        stats.dropped(SessionDrop::Unexpected)
    );
    assert_eq!(
        after.dropped(SessionDrop::Duplicate),
        stats.dropped(SessionDrop::Duplicate) + 4,
        "B's and C's acks of the two copies re-sent"
    );
    assert!(net.apps[M].sessions[&sid].pending.is_empty());
    for member in [A, B, C] {
        assert_eq!(net.apps[member].members(sid).unwrap().len(), 4);
    }
}

#[test]
fn silent_peers_are_marked_offline_after_three_heartbeats() {
    let (mut net, _sid) = group();
    // C stops hearing anything and says nothing.
    net.keep = Box::new(|from, to, _| from != C && to != C);
    net.settle(HEARTBEAT_INTERVAL * 4);
    let c = net.apps[C].name().clone();
    assert!(net.has(
        M,
        |e| matches!(e, SessionEvent::MemberState { online: false, member, .. } if *member == c)
    ));
    assert!(!net.has(
        M,
        |e| matches!(e, SessionEvent::MemberState { online: false, member, .. } if *member != c)
    ));
}

fn source(m: &pb::Message) -> NameKey {
    match &m.message_type {
        Some(pb::message::MessageType::Publish(p)) => {
            NameKey::from_pb(p.header.as_ref().unwrap().source.as_ref().unwrap()).unwrap()
        }
        _ => panic!("not a publish"),
    }
}

fn ids_from(net: &Net, i: usize, session: SessionId, from: usize) -> Vec<u32> {
    let sender = net.apps[from].name().clone();
    net.events[i]
        .iter()
        .filter_map(|e| match e {
            SessionEvent::Message {
                session: s,
                source,
                id,
                ..
            } if *s == session && *source == sender => Some(*id),
            _ => None,
        })
        .collect()
}

fn invite(net: &mut Net, sid: SessionId, service: &str) {
    let now = net.now;
    net.apps[M]
        .invite(sid, &Name::new("org", "ns", service), now)
        .unwrap();
}

#[test]
fn a_newcomer_gets_what_was_meant_for_it_even_when_overtaken() {
    // The reference starts a member's stream from a sender at the first id it sees: an earlier
    // id that the network delays behind it is never delivered (and was acknowledged all the
    // same). Our welcome says where each stream starts for the newcomer.
    let mut net = Net::new(&["moderator", "a", "b", "c"]);
    let sid = net.apps[M].create_group(&Name::new("org", "ns", "chan"), reliable(), net.now);
    invite(&mut net, sid, "a");
    net.run();
    // Before B joins: the moderator's 1–2 and A's 1–2, which B is not owed.
    for app in [M, A, M, A] {
        net.apps[app]
            .publish(sid, Bytes::from_static(b"early"), net.now)
            .unwrap();
    }
    net.run();
    invite(&mut net, sid, "b");
    net.run();
    // After: the moderator's 3–5 and A's 3–5. B's first copies of the moderator's 3–4 and of
    // A's 3 are lost: B sees 5 (or 4) first, and gets the rest again only later.
    let (m_name, a_name) = (net.apps[M].name().key(), net.apps[A].name().key());
    let mut dropped = BTreeSet::new();
    net.keep = Box::new(move |_, to, m| {
        let mut first_copy = |id: u32| dropped.insert((source(m), id));
        match kind(m) {
            Mt::Msg if to == B && source(m) == m_name && mid(m) < 5 => !first_copy(mid(m)),
            Mt::Msg if to == B && source(m) == a_name && mid(m) == 3 => !first_copy(mid(m)),
            _ => true,
        }
    });
    for app in [M, M, M, A, A, A] {
        net.apps[app]
            .publish(sid, Bytes::from_static(b"late"), net.now)
            .unwrap();
    }
    net.settle(Duration::from_secs(5));
    assert_eq!(
        ids_from(&net, B, sid, M),
        vec![3, 4, 5],
        "from the moderator"
    );
    assert_eq!(ids_from(&net, B, sid, A), vec![3, 4, 5], "from A");
    // An id from before B joined is neither delivered nor acknowledged.
    let acks_before = net.apps[B].stats().sent;
    let early = net.apps[M].sessions[&sid]
        .sender
        .buffered(1)
        .cloned()
        .unwrap();
    let me = net.apps[M].name().clone();
    let data = net.apps[M].sessions[&sid]
        .group
        .as_ref()
        .unwrap()
        .data
        .clone();
    let replay = net.apps[M].build(
        SessionType::Multicast,
        Mt::Msg,
        sid,
        1,
        &me,
        &data,
        MAX_FANOUT,
        pb::Content::app(&early.payload_type, early.payload),
        BTreeMap::new(),
        net.now,
    );
    net.apps[B].handle_message(replay, net.now);
    assert_eq!(net.apps[B].stats().sent, acks_before, "no ack");
    assert_eq!(ids_from(&net, B, sid, M), vec![3, 4, 5]);
    // C joins after B: its stream starts at 1 for B, even when B hears of C through C's data
    // (its 2, C's 1 being lost once) before the update announcing C.
    let c_name = net.apps[C].name().key();
    let mut dropped = BTreeSet::new();
    net.keep = Box::new(move |_, to, m| match kind(m) {
        Mt::GroupUpdate if to == B => false,
        Mt::Msg if to == B && source(m) == c_name && mid(m) == 1 => !dropped.insert(1),
        _ => true,
    });
    invite(&mut net, sid, "c");
    net.run();
    for _ in 0..2 {
        net.apps[C]
            .publish(sid, Bytes::from_static(b"from c"), net.now)
            .unwrap();
    }
    net.run();
    net.keep = Box::new(|_, _, _| true);
    net.settle(Duration::from_secs(5));
    assert_eq!(ids_from(&net, B, sid, C), vec![1, 2]);
    for i in [M, A, B, C] {
        assert!(
            !net.has(i, |e| matches!(e, SessionEvent::MessageLost { .. })),
            "app {i}"
        );
    }
    assert_eq!(net.apps[B].members(sid).unwrap().len(), 4);
}

#[test]
fn a_failed_invite_is_withdrawn_everywhere() {
    // Every ack B sends is lost, and so is every ack of the update announcing B (from A): the
    // welcome and the update run out of retries at the same instant. B joined all the same.
    let mut net = Net::new(&["moderator", "a", "b"]);
    let sid = net.apps[M].create_group(&Name::new("org", "ns", "chan"), reliable(), net.now);
    invite(&mut net, sid, "a");
    net.run();
    let mut leave_dropped = false;
    net.keep = Box::new(move |from, to, m| match kind(m) {
        Mt::GroupAck => from != B && from != A,
        // The first request to leave is lost too: B is told again when it is next heard from.
        Mt::LeaveRequest if to == B && !leave_dropped => {
            leave_dropped = true;
            false
        }
        _ => true,
    });
    invite(&mut net, sid, "b");
    net.settle(Duration::from_secs(4));
    assert!(net.has(B, |e| matches!(e, SessionEvent::Incoming { .. })));
    let b = net.apps[B].name().clone();
    let outcomes: Vec<&SessionEvent> = net.events[M]
        .iter()
        .filter(|e| match e {
            SessionEvent::MemberJoined { member, .. } => *member == b,
            SessionEvent::InviteFailed { .. } => true,
            _ => false,
        })
        .collect();
    assert!(
        matches!(outcomes[..], [SessionEvent::InviteFailed { .. }]),
        "one outcome: {outcomes:?}"
    );
    assert_eq!(
        net.apps[M].members(sid).unwrap().len(),
        2,
        "B is not a member"
    );
    assert_eq!(
        net.apps[A].members(sid).unwrap().len(),
        2,
        "A was told B is out"
    );
    // B still thinks it is in (the request to leave was lost) until it speaks: its heartbeat
    // gets it told again.
    assert!(net.apps[B].members(sid).is_some());
    net.settle(HEARTBEAT_INTERVAL * 2);
    assert!(net.has(B, |e| *e
        == SessionEvent::Closed {
            session: sid,
            reason: CloseReason::Removed
        }));
    assert_eq!(net.apps[B].session_count(), 0);
    assert_eq!(net.subs[B].len(), 1, "B left both channels");
    // The next invite runs (the task ended once).
    invite(&mut net, sid, "b");
    net.keep = Box::new(|_, _, _| true);
    net.settle(Duration::from_secs(4));
    assert!(net.has(
        M,
        |e| matches!(e, SessionEvent::MemberJoined { member, .. } if *member == b)
    ));
    assert_eq!(net.apps[A].members(sid).unwrap().len(), 3);
}

#[test]
fn a_member_that_missed_an_update_is_brought_up_to_date() {
    // A is cut off from the control channel while C is invited: the update announcing C runs
    // out of retries and C joins without A knowing.
    let (mut net, sid) = {
        let mut net = Net::new(&["moderator", "a", "b", "c"]);
        let sid = net.apps[M].create_group(&Name::new("org", "ns", "chan"), reliable(), net.now);
        invite(&mut net, sid, "a");
        invite(&mut net, sid, "b");
        net.run();
        (net, sid)
    };
    let missed = std::rc::Rc::new(std::cell::RefCell::new(None));
    let keep = missed.clone();
    net.keep = Box::new(move |_, to, m| {
        if to == A && kind(m) == Mt::GroupUpdate {
            keep.borrow_mut().get_or_insert_with(|| m.clone());
            return false;
        }
        true
    });
    invite(&mut net, sid, "c");
    net.settle(Duration::from_secs(4));
    let c = net.apps[C].name().clone();
    assert!(net.has(
        M,
        |e| matches!(e, SessionEvent::MemberJoined { member, .. } if *member == c)
    ));
    assert_eq!(net.apps[A].members(sid).unwrap().len(), 3, "A missed C");
    // The network heals; A's next heartbeat gets it the current list.
    net.keep = Box::new(|_, _, _| true);
    net.settle(HEARTBEAT_INTERVAL * 2);
    assert_eq!(net.apps[A].members(sid).unwrap().len(), 4);
    assert!(net.has(
        A,
        |e| matches!(e, SessionEvent::MemberJoined { member, .. } if *member == c)
    ));
    // A late copy of the update it missed, overtaken by a later list (B's removal), does not
    // take A back to the older list.
    net.apps[M]
        .remove(sid, &Name::new("org", "ns", "b"), net.now)
        .unwrap();
    net.run();
    assert_eq!(net.apps[A].members(sid).unwrap().len(), 3);
    let late = missed.borrow_mut().take().expect("the update A missed");
    net.apps[A].handle_message(late, net.now);
    net.run();
    let members = net.apps[A].members(sid).unwrap();
    assert_eq!(members.len(), 3, "{members:?}");
    assert!(!members.contains(net.apps[B].name()));
}

/// Fuzz finding L2: a participant holds a group session from the join request on, but its
/// application hears of it only with the welcome. Before that, every command on the id is
/// refused as unknown and has no effect: no leave request, no `Closed` later.
#[test]
fn commands_on_a_session_not_announced_yet_are_refused_as_unknown() {
    let mut net = Net::new(&["moderator", "a"]);
    // A answers the join request, but no welcome reaches it.
    net.keep = Box::new(|_, to, m| !(to == A && kind(m) == Mt::GroupWelcome));
    let chan = Name::new("org", "ns", "chan");
    let sid = net.apps[M].create_group(&chan, reliable(), net.now);
    net.apps[M]
        .invite(sid, &Name::new("org", "ns", "a"), net.now)
        .unwrap();
    net.run();
    assert_eq!(
        net.apps[A].session_count(),
        1,
        "A joined and awaits the welcome"
    );
    assert!(net.events[A].is_empty(), "A's application was told nothing");
    let now = net.now;
    let unknown = Err(SessionError::UnknownSession(sid));
    let a = &mut net.apps[A];
    assert_eq!(a.close(sid, now), unknown);
    assert_eq!(
        a.publish(sid, Bytes::from_static(b"x"), now),
        unknown.clone().map(|()| 0)
    );
    assert_eq!(
        a.publish_to(sid, &Name::new("org", "ns", "moderator"), Bytes::new(), now),
        unknown.clone().map(|()| 0)
    );
    assert_eq!(a.invite(sid, &Name::new("org", "ns", "b"), now), unknown);
    assert_eq!(
        a.remove(sid, &Name::new("org", "ns", "moderator"), now),
        unknown
    );
    assert_eq!(a.set_online(sid, false, now), unknown);
    assert_eq!(a.members(sid), None);
    assert!(a.poll_output().is_none(), "refused commands send nothing");
    // The moderator gives up on the welcome and asks A to leave: still nothing for A's app.
    net.settle(Duration::from_secs(30));
    assert_eq!(net.apps[A].session_count(), 0);
    assert!(
        !net.has(A, |e| matches!(e, SessionEvent::Closed { .. })),
        "{:?}",
        net.events[A]
    );
}
