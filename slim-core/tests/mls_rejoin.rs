//! Soft close / rejoin of MLS group sessions (spec §4.6): UPDATE_PARTICIPANT_STATE acked or
//! NACKed, REJOIN_REQUEST / REJOIN_REPLY, GROUP_UPDATE op=REJOIN, on the toy network of
//! `common/mls_net.rs`.

use std::time::Duration;

use bytes::Bytes;
use slim_core::group::wire::{inspect, MlsContent, MlsKind};
use slim_core::session::sender::MAX_SEQUENCE_ID;
use slim_core::session::{SessionConfig, SessionDrop, SessionEvent, SessionId};
use slim_proto::pb::command_payload::CommandPayloadType as Cmd;
use slim_proto::pb::{self, SessionMessageType as Mt};
use slim_proto::Name;

mod common;

use common::mls_net::*;

/// A moderator and members m1, m2 in one MLS group (m3 waits outside).
fn group() -> (Net, SessionId) {
    common::mls_net::group(&["moderator", "m1", "m2", "m3"], 2)
}

fn state_updates(net: &Net, from: usize) -> Vec<pb::UpdateParticipantStatePayload> {
    net.sent(from, Mt::UpdateParticipantState)
        .iter()
        .filter_map(|m| match command(m) {
            Some(Cmd::UpdateParticipantState(u)) => Some(u),
            _ => None,
        })
        .collect()
}

/// Replies of `what` type sent to `to` in answer to message `id`.
fn replies(net: &Net, what: Mt, to: &Name, id: u32) -> Vec<usize> {
    net.wire
        .iter()
        .filter(|(_, m)| {
            let p = publish(m);
            kind(m) == what
                && p.session.as_ref().unwrap().message_id == id
                && p.header.as_ref().unwrap().destination.as_ref() == Some(&to.to_pb())
        })
        .map(|(i, _)| *i)
        .collect()
}

/// Member 1's one rejoin request (answered at once): it names `m1` and carries a fresh key
/// package.
fn the_rejoin_request<'a>(net: &'a Net, m1: &Name) -> &'a pb::Message {
    let requests = net.sent(1, Mt::RejoinRequest);
    assert_eq!(requests.len(), 1, "one rejoin request, answered at once");
    let Some(Cmd::RejoinRequest(request)) = command(requests[0]) else {
        panic!("rejoin request payload")
    };
    assert_eq!(request.participant, Some(m1.to_pb()));
    assert_eq!(
        inspect(&request.key_package).unwrap().kind,
        MlsKind::KeyPackage
    );
    requests[0]
}

/// m1 misses every copy of the update that adds m3 (its commit): its epoch goes stale.
fn make_m1_stale(net: &mut Net, session: SessionId) {
    // 200 ms × (5 retries + 1): the moderator gives up on m1's ack.
    make_m1_stale_within(net, session, Duration::from_secs(3));
}

/// [`make_m1_stale`] when the moderator gives up on m1 within `span` (heartbeats to m1 are
/// lost meanwhile too, as they would tell it the newer epoch).
fn make_m1_stale_within(net: &mut Net, session: SessionId, span: Duration) {
    net.hook = Box::new(|from, to, m| {
        if to == 1 && (kind(m) == Mt::Heartbeat || (from == 0 && kind(m) == Mt::GroupUpdate)) {
            Fate::Drop
        } else {
            Fate::Deliver
        }
    });
    net.apps[0]
        .invite(session, &Name::new("org", "ns", "m3"), net.now)
        .unwrap();
    net.advance(span);
    net.hook = Box::new(|_, _, _| Fate::Deliver);
    assert_eq!(net.incoming(3), Some((session, true)), "m3 joined");
    assert!(
        net.sent(0, Mt::GroupUpdate).len() > 1,
        "the update was retransmitted for m1"
    );

    // Nobody sent data since (data at the newer epoch would start the rejoin at once).
    let epoch = |i: usize| net.apps[i].mls_state(session).unwrap().epoch;
    assert!(epoch(1) < epoch(0), "stale epoch");
    assert!(!net.apps[1].mls_rejoining(session));
}

#[test]
fn offline_then_online_with_a_current_epoch_is_just_acknowledged() {
    let (mut net, session) = group();
    let m1 = net.name(1);
    net.apps[1].set_online(session, false, net.now).unwrap();
    net.advance(Duration::from_millis(50));
    // The others see it go offline.
    for i in [0, 2] {
        assert!(
            net.events[i].iter().any(|e| matches!(e,
                SessionEvent::MemberState { member, online: false, .. } if member.key() == m1.key())),
            "app {i} saw m1 go offline: {:?}",
            net.events[i]
        );
    }
    net.apps[1].set_online(session, true, net.now).unwrap();
    // Until the moderator confirms our epoch, our data waits; its ack lets it go.
    let id = net.apps[1]
        .publish(session, Bytes::from_static(b"back"), net.now)
        .unwrap();
    assert_eq!(id, 0, "queued until the moderator answers");
    net.advance(Duration::from_millis(50));
    let epoch = net.apps[0].mls_state(session).unwrap().epoch;
    assert_eq!(data_epochs(&net, 1), vec![epoch]);
    for i in [0, 2] {
        assert_eq!(
            net.messages(i, session),
            vec![Bytes::from_static(b"back")],
            "app {i}"
        );
    }
    let updates = state_updates(&net, 1);
    assert_eq!(updates.len(), 2, "each sent once: both were acknowledged");
    assert_eq!(updates[0].new_state, pb::ParticipantState::Offline as i32);
    assert_eq!(updates[1].new_state, pb::ParticipantState::Online as i32);
    assert_eq!(updates[0].participant, Some(m1.to_pb()));
    assert_ne!(updates[0].epoch, u64::MAX, "an MLS epoch");
    assert_eq!(updates[0].epoch, updates[1].epoch);
    let ups = net.sent(1, Mt::UpdateParticipantState);
    let header = publish(ups[0]).header.as_ref().unwrap();
    assert_eq!(header.fanout, 256, "to the control channel");
    for m in &ups {
        let mut ackers = replies(&net, Mt::GroupAck, &m1, message_id(m));
        ackers.sort_unstable();
        assert_eq!(ackers, vec![0, 2], "the moderator and m2 ack");
        assert!(replies(&net, Mt::GroupNack, &m1, message_id(m)).is_empty());
    }
    assert!(
        net.sent(1, Mt::RejoinRequest).is_empty(),
        "no rejoin needed"
    );
    for i in [0, 2] {
        assert!(net.events[i].iter().any(|e| matches!(e,
            SessionEvent::MemberState { member, online: true, .. } if member.key() == m1.key())));
    }
    // Data still flows.
    net.apps[0]
        .publish(session, Bytes::from_static(b"still here"), net.now)
        .unwrap();
    net.advance(Duration::from_millis(100));
    assert_eq!(
        net.messages(1, session),
        vec![Bytes::from_static(b"still here")]
    );
    assert_eq!(
        net.messages(2, session),
        vec![
            Bytes::from_static(b"back"),
            Bytes::from_static(b"still here")
        ]
    );
}

#[test]
fn a_member_that_missed_a_commit_is_nacked_rejoins_and_reads_again() {
    let (mut net, session) = group();
    let m1 = net.name(1);
    make_m1_stale(&mut net, session);
    // m2 (which acked the update) and m3 (on the channel since its welcome) ack each of the 5
    // copies re-sent for m1: harmless duplicates, not replies to nothing.
    assert_eq!(net.dropped(0, SessionDrop::Duplicate), 10);
    assert_eq!(net.dropped(0, SessionDrop::Unexpected), 0);

    net.apps[1].set_online(session, true, net.now).unwrap();
    net.advance(Duration::from_millis(200));

    let ups = net.sent(1, Mt::UpdateParticipantState);
    let mut nackers = replies(&net, Mt::GroupNack, &m1, message_id(ups[0]));
    nackers.sort_unstable();
    assert_eq!(
        nackers,
        vec![0, 2, 3],
        "every member with the newer epoch NACKs"
    );
    // One rejoin request, to the moderator, with a fresh key package.
    let request = the_rejoin_request(&net, &m1);
    let header = publish(request).header.as_ref().unwrap();
    assert_eq!(header.destination, Some(net.name(0).to_pb()));
    assert_eq!(header.fanout, 1);
    // The moderator answers with a welcome and tells everyone with a REJOIN update.
    let rejoin_replies = net.sent(0, Mt::RejoinReply);
    assert_eq!(rejoin_replies.len(), 1);
    assert_eq!(message_id(rejoin_replies[0]), message_id(request));
    let Some(Cmd::RejoinReply(reply)) = command(rejoin_replies[0]) else {
        panic!("rejoin reply payload")
    };
    assert_eq!(inspect(&reply.mls_content).unwrap().kind, MlsKind::Welcome);
    let rejoin_update = net
        .sent(0, Mt::GroupUpdate)
        .into_iter()
        .filter_map(command)
        .find_map(|c| match c {
            Cmd::GroupUpdate(u) if u.op == pb::GroupUpdateOp::Rejoin as i32 => Some(u),
            _ => None,
        })
        .expect("a GROUP_UPDATE op=REJOIN");
    assert_eq!(
        rejoin_update.participant.and_then(|p| p.name),
        Some(m1.to_pb())
    );
    assert_eq!(rejoin_update.participants.len(), 4);
    let commit = rejoin_update.mls.expect("the rejoin commit");
    assert_eq!(commit.commit_id, reply.commit_id);
    assert_eq!(
        inspect(&commit.mls_content).unwrap().content,
        Some(MlsContent::Commit)
    );

    // Everyone reads the next broadcasts, m1's included.
    net.apps[0]
        .publish(session, Bytes::from_static(b"after"), net.now)
        .unwrap();
    net.apps[1]
        .publish(session, Bytes::from_static(b"from m1"), net.now)
        .unwrap();
    net.advance(Duration::from_millis(500));
    let after = Bytes::from_static(b"after");
    let from_m1 = Bytes::from_static(b"from m1");
    assert!(
        net.messages(1, session).contains(&after),
        "m1 reads again: {:?}",
        net.messages(1, session)
    );
    for i in [0, 2, 3] {
        let got = net.messages(i, session);
        assert!(got.contains(&from_m1), "app {i} reads m1: {got:?}");
        if i != 0 {
            assert!(got.contains(&after), "app {i} still reads: {got:?}");
        }
    }
    assert!(
        net.events[1]
            .iter()
            .any(|e| matches!(e, SessionEvent::MemberJoined { member, .. } if member.key() == net.name(3).key())),
        "m1 learned of m3 from the REJOIN update"
    );
    // Nothing is left waiting: no retransmitted request or update afterwards.
    let updates_before = net.sent(0, Mt::GroupUpdate).len();
    net.advance(Duration::from_secs(2));
    assert_eq!(net.sent(0, Mt::GroupUpdate).len(), updates_before);
    assert_eq!(net.sent(1, Mt::RejoinRequest).len(), 1);
    // m1's ack of the REJOIN_REPLY is expected traffic, not an unexpected reply.
    assert_eq!(net.dropped(0, SessionDrop::Unexpected), 0);
}

#[test]
fn a_garbled_rejoin_request_is_dropped_counted_and_the_retransmission_rejoins() {
    let (mut net, session) = group();
    make_m1_stale(&mut net, session);
    // The first REJOIN_REQUEST arrives with garbage for a key package.
    let mut garbled = false;
    net.hook = Box::new(move |from, _, m| {
        if from == 1 && kind(m) == Mt::RejoinRequest && !garbled {
            garbled = true;
            if let Some(pb::content::ContentType::CommandPayload(c)) = publish_mut(m)
                .msg
                .as_mut()
                .and_then(|c| c.content_type.as_mut())
            {
                if let Some(Cmd::RejoinRequest(r)) = c.command_payload_type.as_mut() {
                    r.key_package = Bytes::from_static(b"not a key package");
                }
            }
        }
        Fate::Deliver
    });
    let bad_before =
        net.dropped(0, SessionDrop::BadSignature) + net.dropped(0, SessionDrop::BadMls);
    net.apps[1].set_online(session, true, net.now).unwrap();
    net.advance(Duration::from_secs(1));
    let bad_after = net.dropped(0, SessionDrop::BadSignature) + net.dropped(0, SessionDrop::BadMls);
    assert_eq!(
        bad_after,
        bad_before + 1,
        "the garbled request was dropped and counted"
    );
    assert!(net.sent(1, Mt::RejoinRequest).len() >= 2, "re-sent");
    assert_eq!(net.sent(0, Mt::RejoinReply).len(), 1);
    net.apps[0]
        .publish(session, Bytes::from_static(b"after"), net.now)
        .unwrap();
    net.advance(Duration::from_millis(500));
    all_read(&net, session, &[1], b"after");
}

/// Spec (captures/flows g2): a member that missed a commit learns it from a heartbeat carrying
/// a newer epoch than its own, and rejoins on its own (no state update, no NACK involved).
#[test]
fn a_heartbeat_with_a_newer_epoch_starts_the_rejoin() {
    let (mut net, session) = group();
    let m1 = net.name(1);
    make_m1_stale(&mut net, session);
    assert!(net.sent(1, Mt::RejoinRequest).is_empty());
    // Quiet group: heartbeats go out after 10 s.
    net.advance(Duration::from_secs(12));
    let epochs: Vec<u64> = [0, 2, 3]
        .into_iter()
        .flat_map(|i| net.sent(i, Mt::Heartbeat))
        .filter_map(|m| match command(m) {
            Some(Cmd::Heartbeat(h)) => Some(h.epoch),
            _ => None,
        })
        .collect();
    assert!(
        !epochs.is_empty() && epochs.iter().all(|e| *e != u64::MAX),
        "the others heartbeat with their MLS epoch: {epochs:?}"
    );
    assert!(
        net.sent(1, Mt::UpdateParticipantState).is_empty(),
        "no state update: the heartbeat alone"
    );
    the_rejoin_request(&net, &m1);
    assert_eq!(net.sent(0, Mt::RejoinReply).len(), 1);
    net.apps[0]
        .publish(session, Bytes::from_static(b"after"), net.now)
        .unwrap();
    net.advance(Duration::from_millis(500));
    assert!(
        net.messages(1, session)
            .contains(&Bytes::from_static(b"after")),
        "m1 reads again: {:?}",
        net.messages(1, session)
    );
    // Later heartbeats carry the epoch m1 has now: no second rejoin.
    net.advance(Duration::from_secs(25));
    assert_eq!(net.sent(1, Mt::RejoinRequest).len(), 1);
}

/// Spec (captures/flows g3): while a member is offline (soft close) the group's messages still
/// reach it, but it drops them without acknowledging; back online it reads again (and asks for
/// what it missed, which the sender still has).
#[test]
fn an_offline_member_drops_data_unacknowledged_until_it_is_back() {
    let (mut net, session) = group();
    net.apps[1].set_online(session, false, net.now).unwrap();
    net.advance(Duration::from_millis(50));
    let acks_before = net.sent(1, Mt::MsgAck).len();
    net.apps[0]
        .publish(session, Bytes::from_static(b"while away"), net.now)
        .unwrap();
    net.advance(Duration::from_secs(2));
    assert!(
        net.messages(1, session).is_empty(),
        "nothing delivered while offline"
    );
    assert_eq!(
        net.sent(1, Mt::MsgAck).len(),
        acks_before,
        "nor acknowledged"
    );
    assert!(
        net.dropped(1, SessionDrop::Unexpected) > 0,
        "dropped and counted"
    );
    assert_eq!(
        net.messages(2, session),
        vec![Bytes::from_static(b"while away")]
    );
    assert!(
        !net.events[0]
            .iter()
            .any(|e| matches!(e, SessionEvent::SendFailed { .. })),
        "the moderator did not wait for the offline member"
    );
    net.apps[1].set_online(session, true, net.now).unwrap();
    net.advance(Duration::from_millis(50));
    net.apps[0]
        .publish(session, Bytes::from_static(b"back"), net.now)
        .unwrap();
    net.advance(Duration::from_millis(500));
    assert_eq!(
        net.messages(1, session),
        vec![
            Bytes::from_static(b"while away"),
            Bytes::from_static(b"back")
        ]
    );
}

/// The MLS epochs of the data messages `from` sent, in order.
/// Each of `apps` got `payload` on the session.
fn all_read(net: &Net, session: SessionId, apps: &[usize], payload: &'static [u8]) {
    for &i in apps {
        let got = net.messages(i, session);
        assert!(
            got.contains(&Bytes::from_static(payload)),
            "app {i} reads {:?}: {got:?}",
            String::from_utf8_lossy(payload)
        );
    }
}

/// Every REJOIN_REPLY from the moderator to m1 is lost while the returned flag is set.
fn lose_rejoin_replies_to_m1(net: &mut Net) -> std::rc::Rc<std::cell::Cell<bool>> {
    let hold = std::rc::Rc::new(std::cell::Cell::new(true));
    let held = hold.clone();
    net.hook = Box::new(move |from, to, m| {
        if from == 0 && to == 1 && kind(m) == Mt::RejoinReply && held.get() {
            Fate::Drop
        } else {
            Fate::Deliver
        }
    });
    hold
}

/// m1 is at the moderator's epoch, sent data, and encrypted all of it there, past `stale`.
fn m1_sent_only_at_the_current_epoch(net: &Net, session: SessionId, stale: u64) {
    let current = net.apps[0].mls_state(session).unwrap().epoch;
    assert_eq!(net.apps[1].mls_state(session).unwrap().epoch, current);
    let epochs = data_epochs(net, 1);
    assert!(
        !epochs.is_empty() && epochs.iter().all(|e| *e == current && *e > stale),
        "m1 encrypted only at the current epoch {current}: {epochs:?}"
    );
}

fn data_epochs(net: &Net, from: usize) -> Vec<u64> {
    net.sent(from, Mt::Msg)
        .into_iter()
        .map(|m| inspect(&blob(m)).unwrap().epoch.expect("a PrivateMessage"))
        .collect()
}

/// A member that gets group data at an epoch it has not reached (it missed a commit) rejoins at
/// once, not at the next heartbeat. Until the welcome comes its publishes wait (`publish`
/// returns 0) and nothing it sends is encrypted at the stale epoch; a request whose retries ran
/// out goes out again with the same id, so the moderator rejoins it once.
#[test]
fn data_at_a_newer_epoch_starts_the_rejoin_and_nothing_is_sent_stale() {
    let (mut net, session) = group();
    make_m1_stale(&mut net, session);
    let stale = net.apps[1].mls_state(session).unwrap().epoch;
    // Every REJOIN_REPLY to m1 is lost for the first 2 s (beyond the request's 5 retries).
    let until = net.now + Duration::from_secs(2);
    let clock = std::rc::Rc::new(std::cell::Cell::new(net.now));
    let seen = clock.clone();
    net.hook = Box::new(move |from, to, m| {
        if from == 0 && to == 1 && kind(m) == Mt::RejoinReply && seen.get() < until {
            Fate::Drop
        } else {
            Fate::Deliver
        }
    });
    net.apps[0]
        .publish(session, Bytes::from_static(b"newer"), net.now)
        .unwrap();
    net.advance(Duration::from_millis(20));
    assert!(
        net.dropped(1, SessionDrop::Undecryptable) > 0,
        "m1 cannot read it"
    );
    assert_eq!(net.sent(1, Mt::RejoinRequest).len(), 1, "rejoin at once");
    assert!(net.sent(1, Mt::Heartbeat).is_empty() && net.sent(0, Mt::Heartbeat).is_empty());
    assert!(net.apps[1].mls_rejoining(session));

    // Stale: m1's publishes wait.
    let id = net.apps[1]
        .publish(session, Bytes::from_static(b"from m1"), net.now)
        .unwrap();
    assert_eq!(id, 0, "queued");
    while net.now < until {
        net.advance(Duration::from_millis(100));
        clock.set(net.now);
    }
    assert!(net.sent(1, Mt::Msg).is_empty(), "nothing sent while stale");
    let requests = net.sent(1, Mt::RejoinRequest);
    assert!(
        requests.len() > 6,
        "re-sent past its retries: {}",
        requests.len()
    );
    assert!(
        requests
            .iter()
            .all(|m| message_id(m) == message_id(requests[0])),
        "one request, one id"
    );

    // The reply gets through: m1 is back at the group's epoch and its message goes out.
    net.advance(Duration::from_millis(500));
    clock.set(net.now);
    net.advance(Duration::from_millis(500));
    assert!(!net.apps[1].mls_rejoining(session));
    let current = net.apps[0].mls_state(session).unwrap().epoch;
    assert_eq!(net.apps[1].mls_state(session).unwrap().epoch, current);
    let rejoins = net
        .sent(0, Mt::GroupUpdate)
        .into_iter()
        .filter(|m| matches!(command(m), Some(Cmd::GroupUpdate(u)) if u.op == pb::GroupUpdateOp::Rejoin as i32))
        .map(message_id)
        .collect::<std::collections::BTreeSet<_>>();
    assert_eq!(rejoins.len(), 1, "the moderator rejoined m1 once");
    let epochs = data_epochs(&net, 1);
    assert!(!epochs.is_empty());
    assert!(
        epochs.iter().all(|e| *e == current && *e > stale),
        "m1 encrypted only at the current epoch {current}: {epochs:?}"
    );
    let from_m1 = Bytes::from_static(b"from m1");
    for i in [0, 2, 3] {
        assert!(
            net.messages(i, session).contains(&from_m1),
            "app {i} reads m1: {:?}",
            net.messages(i, session)
        );
    }
}

/// A stale member that is the only one sending cannot know it is stale: its first message goes
/// out at its old epoch. The moderator, reading data sealed at an epoch older than its own,
/// heartbeats its epoch at once (not 10 s later); the member rejoins, and what it publishes
/// next waits for the rejoin and is encrypted at the current epoch.
#[test]
fn the_moderator_answers_stale_data_with_a_heartbeat_and_the_sender_rejoins() {
    let (mut net, session) = group();
    make_m1_stale(&mut net, session);
    let stale = net.apps[1].mls_state(session).unwrap().epoch;
    let current = net.apps[0].mls_state(session).unwrap().epoch;
    let heartbeats_before = net.sent(0, Mt::Heartbeat).len();
    net.apps[1]
        .publish(session, Bytes::from_static(b"one"), net.now)
        .unwrap();
    net.advance(Duration::from_millis(1));
    // The moderator still reads it (within its past epochs) but tells m1 its epoch at once.
    all_read(&net, session, &[0], b"one");
    let heartbeats = net.sent(0, Mt::Heartbeat);
    assert_eq!(
        heartbeats.len(),
        heartbeats_before + 1,
        "one early heartbeat"
    );
    assert!(matches!(
        command(heartbeats[heartbeats_before]),
        Some(Cmd::Heartbeat(h)) if h.epoch == current
    ));
    assert_eq!(net.sent(1, Mt::RejoinRequest).len(), 1, "m1 rejoins");
    let rejoined = net.apps[0].mls_state(session).unwrap().epoch;
    assert_eq!(rejoined, current + 1, "the rejoin commit");
    assert_eq!(net.apps[1].mls_state(session).unwrap().epoch, rejoined);
    // What m1 sends next (and its answers to retransmission requests) is at the group's epoch.
    net.apps[1]
        .publish(session, Bytes::from_static(b"two"), net.now)
        .unwrap();
    net.advance(Duration::from_millis(500));
    let epochs = data_epochs(&net, 1);
    assert_eq!(epochs[0], stale, "the first could not know");
    assert!(
        epochs[1..].iter().all(|e| *e == rejoined),
        "only the first was stale: {epochs:?}"
    );
    let rtx_epochs: Vec<u64> = net
        .sent(1, Mt::RtxReply)
        .into_iter()
        .map(|m| inspect(&blob(m)).unwrap().epoch.unwrap())
        .collect();
    assert!(rtx_epochs.iter().all(|e| *e == rejoined), "{rtx_epochs:?}");
    all_read(&net, session, &[0, 2, 3], b"two");
    // At the current epoch: no more early heartbeats, no second rejoin.
    assert_eq!(net.sent(0, Mt::Heartbeat).len(), heartbeats_before + 1);
    assert_eq!(net.sent(1, Mt::RejoinRequest).len(), 1);
}

/// A member that gets a commit ahead of the next one it expects (it missed one the moderator
/// gave up on) rejoins at once: no heartbeat, no data, no state update is needed to tell it.
/// Until the welcome comes its publishes wait and nothing is encrypted at the stale epoch.
#[test]
fn a_commit_ahead_of_the_expected_one_starts_the_rejoin() {
    let (mut net, session) = common::mls_net::group(&["moderator", "m1", "m2", "m3", "m4"], 2);
    let m1 = net.name(1);
    make_m1_stale(&mut net, session);
    let stale = net.apps[1].mls_state(session).unwrap().epoch;
    // Every REJOIN_REPLY to m1 is lost while `hold` is set.
    let hold = lose_rejoin_replies_to_m1(&mut net);
    let updates_before = net.sent(0, Mt::GroupUpdate).len();

    // The next commit (m4 joins) reaches m1, one commit_id past the one it lacks.
    net.apps[0]
        .invite(session, &Name::new("org", "ns", "m4"), net.now)
        .unwrap();
    net.run();
    let update = net.sent(0, Mt::GroupUpdate)[updates_before];
    let Some(Cmd::GroupUpdate(add_m4)) = command(update) else {
        panic!("group update payload")
    };
    assert_eq!(add_m4.op, pb::GroupUpdateOp::Add as i32);
    assert!(
        replies(&net, Mt::GroupAck, &net.name(0), message_id(update)).contains(&1),
        "m1 acknowledged the update it could not apply yet"
    );
    let request = the_rejoin_request(&net, &m1);
    let position = |target: &pb::Message| net.wire.iter().position(|(_, m)| m == target);
    assert!(
        position(request) > position(update),
        "the request answers the update"
    );
    // Nothing else could have told m1 its epoch is stale.
    for i in 0..5 {
        assert!(net.sent(i, Mt::Heartbeat).is_empty(), "app {i} heartbeat");
        assert!(net.sent(i, Mt::Msg).is_empty(), "app {i} sent data");
    }
    assert!(net.sent(1, Mt::UpdateParticipantState).is_empty());
    assert!(net.apps[1].mls_rejoining(session));

    // While the welcome is lost, m1's publishes wait at the stale epoch.
    let id = net.apps[1]
        .publish(session, Bytes::from_static(b"from m1"), net.now)
        .unwrap();
    assert_eq!(id, 0, "queued");
    net.advance(Duration::from_secs(1));
    assert_eq!(net.apps[1].mls_state(session).unwrap().epoch, stale);
    assert!(net.sent(1, Mt::Msg).is_empty(), "nothing sent while stale");

    // The retransmitted request gets its welcome: m1 is at the group's epoch and its message
    // goes out, encrypted there, to everyone (m4 included, which m1 knows from the update).
    hold.set(false);
    net.advance(Duration::from_millis(500));
    assert!(!net.apps[1].mls_rejoining(session));
    m1_sent_only_at_the_current_epoch(&net, session, stale);
    all_read(&net, session, &[0, 2, 3, 4], b"from m1");
}

/// m1 (stale) rejoins on the moderator's data at the newer epoch and, while its welcome is
/// lost, sends a direct message to m2 and a publish. Both wait and go out in that order once
/// m1 is back at the group's epoch, encrypted there; the direct message reaches m2 only.
fn publish_to_waits_for_the_rejoin(config: SessionConfig) {
    let reliable = config.reliability.is_some();
    let (mut net, session) =
        common::mls_net::group_with(&["moderator", "m1", "m2", "m3"], 2, config);
    // Control messages are retried 1 s × (10 + 1) when the session has no timers of its own.
    make_m1_stale_within(
        &mut net,
        session,
        Duration::from_secs(if reliable { 3 } else { 12 }),
    );
    let stale = net.apps[1].mls_state(session).unwrap().epoch;
    let hold = lose_rejoin_replies_to_m1(&mut net);
    net.apps[0]
        .publish(session, Bytes::from_static(b"newer"), net.now)
        .unwrap();
    net.advance(Duration::from_millis(20));
    assert!(net.apps[1].mls_rejoining(session));

    let direct = Bytes::from_static(b"direct");
    let m2 = net.name(2);
    let id = net.apps[1]
        .publish_to(session, &m2, direct.clone(), net.now)
        .unwrap();
    assert!(id > MAX_SEQUENCE_ID, "a direct id at once: {id}");
    let queued = net.apps[1]
        .publish(session, Bytes::from_static(b"sequenced"), net.now)
        .unwrap();
    assert_eq!(queued, 0);
    net.advance(Duration::from_secs(1));
    assert_eq!(net.apps[1].mls_state(session).unwrap().epoch, stale);
    assert!(net.sent(1, Mt::Msg).is_empty(), "nothing sent while stale");

    hold.set(false);
    net.advance(Duration::from_millis(1500));
    assert!(!net.apps[1].mls_rejoining(session));
    m1_sent_only_at_the_current_epoch(&net, session, stale);
    let sent = net.sent(1, Mt::Msg);
    let ids: Vec<u32> = sent.iter().map(|m| message_id(m)).collect();
    assert_eq!(ids[0], id, "in the order given: {ids:?}");
    assert_eq!(
        sent[0].metadata.get("PUBLISH_TO").map(String::as_str),
        Some("TRUE")
    );
    let header = publish(sent[0]).header.as_ref().unwrap();
    assert_eq!(header.destination, Some(m2.to_pb()));
    assert_eq!(header.fanout, 1);
    assert!(message_id(sent[1]) <= MAX_SEQUENCE_ID, "then the publish");
    if !reliable {
        assert_eq!(sent.len(), 2, "each sent once");
    }
    assert_eq!(
        net.messages(2, session)
            .iter()
            .filter(|p| **p == direct)
            .count(),
        1
    );
    for i in [0, 3] {
        assert!(!net.messages(i, session).contains(&direct), "app {i}");
    }
    for i in [0, 2, 3] {
        assert!(
            net.messages(i, session)
                .contains(&Bytes::from_static(b"sequenced")),
            "app {i}: {:?}",
            net.messages(i, session)
        );
    }
    let delivered = net.events[1]
        .iter()
        .any(|e| matches!(e, SessionEvent::Delivered { id: d, .. } if *d == id));
    assert_eq!(delivered, reliable, "m2 acknowledged it iff reliable");
}

#[test]
fn publish_to_waits_for_the_rejoin_reliable() {
    publish_to_waits_for_the_rejoin(encrypted());
}

#[test]
fn publish_to_waits_for_the_rejoin_unreliable() {
    publish_to_waits_for_the_rejoin(SessionConfig {
        reliability: None,
        ..encrypted()
    });
}

/// A direct message waiting for the rejoin whose target leaves the group meanwhile is reported
/// as failed (nobody will acknowledge it) instead of being sent to a departed member.
#[test]
fn a_waiting_publish_to_a_member_that_left_fails() {
    let (mut net, session) = group();
    make_m1_stale(&mut net, session);
    let hold = lose_rejoin_replies_to_m1(&mut net);
    net.apps[0]
        .publish(session, Bytes::from_static(b"newer"), net.now)
        .unwrap();
    net.advance(Duration::from_millis(20));
    assert!(net.apps[1].mls_rejoining(session));
    let m3 = net.name(3);
    let id = net.apps[1]
        .publish_to(session, &m3, Bytes::from_static(b"to m3"), net.now)
        .unwrap();
    net.apps[3].close(session, net.now).unwrap();
    net.advance(Duration::from_millis(500));
    assert!(
        !net.apps[1]
            .members(session)
            .unwrap()
            .iter()
            .any(|n| n.key() == m3.key()),
        "m1 saw m3 leave"
    );
    hold.set(false);
    net.advance(Duration::from_millis(500));
    assert!(!net.apps[1].mls_rejoining(session));
    assert!(
        net.sent(1, Mt::Msg).iter().all(|m| message_id(m) != id),
        "not sent to a departed member"
    );
    let failed: Vec<&Vec<Name>> = net.events[1]
        .iter()
        .filter_map(|e| match e {
            SessionEvent::SendFailed { id: f, missing, .. } if *f == id => Some(missing),
            _ => None,
        })
        .collect();
    assert_eq!(failed, vec![&vec![m3]], "reported once, m3 missing");
}

/// The moderator moves on (removes m3) while m1's welcome is lost: m1 gets that commit before
/// the welcome, when it still cannot apply it. After the welcome it applies it, so it is at
/// the group's epoch at once: what it queued is not readable at the epoch m3 still has, and
/// no second rejoin is needed.
#[test]
fn a_commit_made_while_the_welcome_was_lost_is_applied_after_it() {
    let (mut net, session) = group();
    let m3 = net.name(3);
    make_m1_stale(&mut net, session);
    let hold = lose_rejoin_replies_to_m1(&mut net);
    net.apps[0]
        .publish(session, Bytes::from_static(b"newer"), net.now)
        .unwrap();
    net.advance(Duration::from_millis(20));
    assert!(net.apps[1].mls_rejoining(session));
    assert_eq!(
        net.apps[1]
            .publish(session, Bytes::from_static(b"after"), net.now)
            .unwrap(),
        0
    );
    let rejoined = net.apps[0].mls_state(session).unwrap().epoch;
    net.apps[0].remove(session, &m3, net.now).unwrap();
    net.advance(Duration::from_millis(500));
    let current = net.apps[0].mls_state(session).unwrap().epoch;
    assert_eq!(current, rejoined + 1, "the removal's commit");
    assert!(
        !net.apps[1]
            .members(session)
            .unwrap()
            .iter()
            .any(|n| n.key() == m3.key()),
        "m1 saw the removal"
    );
    assert!(net.apps[1].mls_rejoining(session));

    hold.set(false);
    net.advance(Duration::from_millis(300));
    assert!(!net.apps[1].mls_rejoining(session));
    let (ours, theirs) = (
        net.apps[1].mls_state(session).unwrap(),
        net.apps[0].mls_state(session).unwrap(),
    );
    assert_eq!(
        ours.epoch, current,
        "at the group's epoch after the welcome"
    );
    assert_eq!(ours.epoch_authenticator, theirs.epoch_authenticator);
    let requests = net.sent(1, Mt::RejoinRequest);
    assert!(
        requests
            .iter()
            .all(|m| message_id(m) == message_id(requests[0])),
        "one rejoin"
    );
    let epochs = data_epochs(&net, 1);
    assert!(
        !epochs.is_empty() && epochs.iter().all(|e| *e == current),
        "m1 encrypted only at the epoch without m3 ({current}): {epochs:?}"
    );
    all_read(&net, session, &[0, 2], b"after");
    // m1 could not read "newer" before the welcome: the moderator sent it again right after
    // the welcome, not when its backed-off timer (0.58 s from here) would have.
    all_read(&net, session, &[1], b"newer");
}

/// Back online after missing a commit while away, m1 publishes at once: its data waits for
/// the verdict on the epoch its state update carries (the moderator's NACK), then for the
/// rejoin, and goes out only at the group's epoch.
#[test]
fn back_online_data_waits_for_the_moderators_verdict_on_the_epoch() {
    let (mut net, session) = group();
    net.apps[1].set_online(session, false, net.now).unwrap();
    net.advance(Duration::from_millis(50));
    make_m1_stale(&mut net, session);
    let stale = net.apps[1].mls_state(session).unwrap().epoch;
    net.apps[1].set_online(session, true, net.now).unwrap();
    let id = net.apps[1]
        .publish(session, Bytes::from_static(b"back"), net.now)
        .unwrap();
    assert_eq!(id, 0, "queued until the moderator answers");
    net.advance(Duration::from_millis(200));
    assert_eq!(net.sent(1, Mt::RejoinRequest).len(), 1, "NACKed: rejoined");
    m1_sent_only_at_the_current_epoch(&net, session, stale);
    for i in [0, 2, 3] {
        assert!(
            net.messages(i, session)
                .contains(&Bytes::from_static(b"back")),
            "app {i}: {:?}",
            net.messages(i, session)
        );
    }
}

/// A moderator that never answers the state update cannot settle the epoch: once the update
/// has run out of retries the data waits no longer (at the epoch we have, as before).
#[test]
fn back_online_data_goes_once_the_unanswered_update_gives_up() {
    let (mut net, session) = group();
    net.apps[1].set_online(session, false, net.now).unwrap();
    net.advance(Duration::from_millis(50));
    net.hook = Box::new(|from, to, m| {
        if from == 1 && to == 0 && kind(m) == Mt::UpdateParticipantState {
            Fate::Drop
        } else {
            Fate::Deliver
        }
    });
    net.apps[1].set_online(session, true, net.now).unwrap();
    let id = net.apps[1]
        .publish(session, Bytes::from_static(b"back"), net.now)
        .unwrap();
    assert_eq!(id, 0, "queued until the moderator answers");
    // m2 acks at once, but only the moderator knows the group's epoch.
    net.advance(Duration::from_millis(1000));
    assert!(net.sent(1, Mt::Msg).is_empty(), "still waiting");
    // 200 ms × (5 retries + 1).
    net.advance(Duration::from_millis(500));
    let epoch = net.apps[0].mls_state(session).unwrap().epoch;
    assert_eq!(data_epochs(&net, 1), vec![epoch]);
    all_read(&net, session, &[0, 2], b"back");
}

/// A member that heard nothing from the others for three heartbeat periods marks them
/// offline, so its state update waits for nobody. Back from a soft close after missing a
/// commit, it is NACKed by members it was not waiting for: the NACK still says its epoch is
/// stale, and it rejoins at once instead of at the next heartbeat.
#[test]
fn a_nack_from_members_marked_offline_still_starts_the_rejoin() {
    let (mut net, session) = common::mls_net::group(&["moderator", "m1", "m2"], 1);
    let moderator = net.name(0);
    // m1 hears nothing (the commit adding m2 included) for longer than three heartbeats.
    net.hook = Box::new(|_, to, _| if to == 1 { Fate::Drop } else { Fate::Deliver });
    net.apps[0]
        .invite(session, &Name::new("org", "ns", "m2"), net.now)
        .unwrap();
    net.advance(Duration::from_secs(31));
    assert_eq!(net.incoming(2), Some((session, true)), "m2 joined");
    assert!(
        net.events[1].iter().any(|e| matches!(e,
            SessionEvent::MemberState { member, online: false, .. } if member.key() == moderator.key())),
        "m1 marked the moderator offline"
    );
    let epoch = |net: &Net, i: usize| net.apps[i].mls_state(session).unwrap().epoch;
    assert!(epoch(&net, 1) < epoch(&net, 0), "m1 missed the commit");

    // Heartbeats (which would tell m1 the newer epoch) stay lost: only the NACK can.
    net.hook = Box::new(|_, to, m| {
        if to == 1 && kind(m) == Mt::Heartbeat {
            Fate::Drop
        } else {
            Fate::Deliver
        }
    });
    net.apps[1].set_online(session, false, net.now).unwrap();
    net.advance(Duration::from_millis(50));
    // (The acks of that update, from members it did not wait for, count as duplicates.)
    let duplicates = net.dropped(1, SessionDrop::Duplicate);
    net.apps[1].set_online(session, true, net.now).unwrap();
    net.advance(Duration::from_millis(50));
    let m1 = net.name(1);
    let ups = net.sent(1, Mt::UpdateParticipantState);
    let back = ups.last().expect("the update saying m1 is back");
    assert!(
        replies(&net, Mt::GroupNack, &m1, message_id(back)).contains(&0),
        "the moderator NACKs m1's stale epoch"
    );
    the_rejoin_request(&net, &m1);
    assert_eq!(
        net.dropped(1, SessionDrop::Duplicate),
        duplicates,
        "the NACKs were used, not dropped"
    );
    net.advance(Duration::from_millis(200));
    assert!(!net.apps[1].mls_rejoining(session), "rejoined");
    assert_eq!(epoch(&net, 1), epoch(&net, 0));
}

/// A state update is re-sent while a member it waits for has not acked, and the members
/// NACK every copy. Once the first NACK's rejoin is done, the NACKs of later copies are about
/// the epoch we had: no second rejoin.
#[test]
fn nacks_of_copies_re_sent_after_the_rejoin_do_not_start_another() {
    let (mut net, session) = group();
    let m1 = net.name(1);
    make_m1_stale(&mut net, session);
    // m2's answers to m1 are lost: m1 re-sends its update until its retries run out.
    net.hook = Box::new(|from, to, m| {
        if from == 2 && to == 1 && matches!(kind(m), Mt::GroupAck | Mt::GroupNack) {
            Fate::Drop
        } else {
            Fate::Deliver
        }
    });
    net.apps[1].set_online(session, true, net.now).unwrap();
    net.advance(Duration::from_secs(3));
    let ups = net.sent(1, Mt::UpdateParticipantState);
    assert!(ups.len() > 2, "the update was re-sent: {}", ups.len());
    let nacks = replies(&net, Mt::GroupNack, &m1, message_id(ups[0]));
    assert!(
        nacks.iter().filter(|i| **i == 0).count() > 1,
        "the moderator NACKed more than one copy"
    );
    the_rejoin_request(&net, &m1);
    assert!(!net.apps[1].mls_rejoining(session));
    assert_eq!(
        net.apps[1].mls_state(session).unwrap().epoch,
        net.apps[0].mls_state(session).unwrap().epoch
    );
}
