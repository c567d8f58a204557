//! MLS-encrypted sessions (spec §4.4–§4.7) on the session layer's public API: apps on a toy
//! network that routes like a node (exact names, any-instance names, channel subscriptions),
//! with a hook to drop, alter or inject messages. Checks what the wire carries (key packages,
//! welcomes, commits, ciphertext) and that every bad MLS input is dropped, counted and survived.

use std::time::Duration;

use bytes::Bytes;
use slim_core::group::wire::{inspect, MlsContent, MlsKind};
use slim_core::session::{SessionDrop, SessionEvent, SessionId, ACK_HOLD};
use slim_proto::pb::command_payload::CommandPayloadType as Cmd;
use slim_proto::pb::{self, SessionMessageType as Mt};
use slim_proto::Name;

mod common;

use common::mls_net::*;

/// A p2p MLS session alice → bob, established.
fn p2p() -> (Net, SessionId) {
    let mut net = Net::new(&["alice", "bob"]);
    let bob = Name::new("org", "ns", "bob");
    let session = net.apps[0].create_session(&bob, encrypted(), net.now);
    net.advance(Duration::from_millis(10));
    assert!(
        net.events[0]
            .iter()
            .any(|e| matches!(e, SessionEvent::Established { session: s, .. } if *s == session)),
        "alice's session is established: {:?}",
        net.events[0]
    );
    assert_eq!(
        net.incoming(1),
        Some((session, true)),
        "bob joined with MLS"
    );
    (net, session)
}

#[test]
fn p2p_handshake_carries_key_package_and_welcome_and_data_is_ciphertext() {
    let (mut net, session) = p2p();
    // JOIN_REQUEST asks for MLS; JOIN_REPLY carries a key package; the welcome its commit id.
    let Some(Cmd::JoinRequest(join)) = command(net.sent(0, Mt::JoinRequest)[0]) else {
        panic!("join request payload")
    };
    assert_eq!(
        join.mls_settings
            .map(|s| s.header_integrity_validation_percent),
        Some(100)
    );
    let Some(Cmd::JoinReply(reply)) = command(net.sent(1, Mt::JoinReply)[0]) else {
        panic!("join reply payload")
    };
    let key_package = inspect(&reply.key_package.expect("key package")).unwrap();
    assert_eq!(key_package.kind, MlsKind::KeyPackage);
    assert_eq!(
        key_package.suite,
        Some(0x0002),
        "the reference's ciphersuite"
    );
    let Some(Cmd::GroupWelcome(welcome)) = command(net.sent(0, Mt::GroupWelcome)[0]) else {
        panic!("welcome payload")
    };
    let mls = welcome.mls.expect("welcome carries MLS");
    assert_eq!(mls.commit_id, 1, "first commit of the group");
    assert_eq!(inspect(&mls.mls_content).unwrap().kind, MlsKind::Welcome);

    let secret = Bytes::from_static(b"only bob may read this");
    net.apps[0]
        .publish(session, secret.clone(), net.now)
        .unwrap();
    net.run();
    let msg = net.sent(0, Mt::Msg)[0];
    let on_wire = blob(msg);
    assert!(
        !on_wire.windows(secret.len()).any(|w| w == &secret[..]),
        "the plaintext is not on the wire"
    );
    let info = inspect(&on_wire).unwrap();
    assert_eq!(info.kind, MlsKind::PrivateMessage);
    assert_eq!(info.content, Some(MlsContent::Application));
    // The authenticated data is the header as sent (spec §1.10).
    let aad = slim_core::identity::publish_aad(publish(msg)).unwrap();
    assert_eq!(
        info.authenticated_data,
        Some(prost::Message::encode_to_vec(&aad))
    );
    assert_eq!(net.messages(1, session), vec![secret]);
    net.advance(ACK_HOLD);
    // Acks are not encrypted (spec §4.5) and were delivered: nothing left to retransmit.
    assert!(net.events[0]
        .iter()
        .any(|e| matches!(e, SessionEvent::Delivered { session: s, id: 1 } if *s == session)));
}

#[test]
fn tampered_ciphertext_is_dropped_counted_and_the_retransmission_gets_through() {
    let (mut net, session) = p2p();
    let mut tampered = 0;
    net.hook = Box::new(move |from, _, m| {
        if from == 0 && kind(m) == Mt::Msg && tampered == 0 {
            tampered += 1;
            let bytes = blob_mut(m);
            let mut altered = bytes.to_vec();
            let last = altered.len() - 1;
            altered[last] ^= 0x01;
            *bytes = altered.into();
        }
        Fate::Deliver
    });
    net.apps[0]
        .publish(session, Bytes::from_static(b"first"), net.now)
        .unwrap();
    net.run();
    assert_eq!(net.dropped(1, SessionDrop::Undecryptable), 1);
    assert!(net.messages(1, session).is_empty());
    // Not acknowledged, so re-sent (encrypted anew) and delivered: the session goes on.
    net.advance(Duration::from_secs(1));
    net.apps[0]
        .publish(session, Bytes::from_static(b"second"), net.now)
        .unwrap();
    net.advance(Duration::from_secs(1));
    assert_eq!(
        net.messages(1, session),
        vec![Bytes::from_static(b"first"), Bytes::from_static(b"second")]
    );
}

#[test]
fn a_header_that_does_not_match_the_authenticated_data_is_refused() {
    let (mut net, session) = p2p();
    net.hook = Box::new(|from, _, m| {
        if from == 0 && kind(m) == Mt::Msg {
            // A relay rewrites the payload type: the AAD no longer describes the header.
            if let Some(pb::content::ContentType::AppPayload(app)) = publish_mut(m)
                .msg
                .as_mut()
                .and_then(|c| c.content_type.as_mut())
            {
                app.payload_type = "forged".into();
            }
        }
        Fate::Deliver
    });
    net.apps[0]
        .publish(session, Bytes::from_static(b"x"), net.now)
        .unwrap();
    net.run();
    assert_eq!(net.dropped(1, SessionDrop::Undecryptable), 1);
    assert!(net.messages(1, session).is_empty());
}

/// A welcome for another member can only reach the session layer altered in flight (the
/// session id is signed, and only the session's moderator is listened to): refused without harm.
/// The MLS-level refusal of a welcome not encrypted to us is `group::JoinError::NotForUs`
/// (tests/mls_group.rs).
#[test]
fn a_welcome_meant_for_another_member_is_refused_and_the_real_one_still_joins() {
    let mut net = Net::new(&["alice", "bob", "carol"]);
    let bob_name = Name::new("org", "ns", "bob");
    let carol_name = Name::new("org", "ns", "carol");
    // Hold every welcome back for now.
    net.hook = Box::new(|from, _, m| {
        if from == 0 && kind(m) == Mt::GroupWelcome {
            Fate::Drop
        } else {
            Fate::Deliver
        }
    });
    let to_bob = net.apps[0].create_session(&bob_name, encrypted(), net.now);
    let to_carol = net.apps[0].create_session(&carol_name, encrypted(), net.now);
    net.run();
    // Carol's welcome, readdressed to bob's session.
    let mut wrong = net
        .sent(0, Mt::GroupWelcome)
        .into_iter()
        .find(|m| publish(m).session.as_ref().unwrap().session_id == to_carol)
        .cloned()
        .expect("welcome sent");
    publish_mut(&mut wrong).session.as_mut().unwrap().session_id = to_bob;
    net.apps[1].handle_message(wrong, net.now);
    net.run();
    assert_eq!(net.dropped(1, SessionDrop::BadSignature), 1, "refused");
    assert!(net.incoming(1).is_none(), "bob has not joined");
    // The genuine welcomes (retransmitted) still work.
    net.hook = Box::new(|_, _, _| Fate::Deliver);
    net.advance(Duration::from_secs(1));
    assert_eq!(net.incoming(1), Some((to_bob, true)));
    assert_eq!(net.incoming(2), Some((to_carol, true)));
}

/// A key package for `id` whose credential token is made with `secret`.
fn foreign_key_package(secret: &str, id: &str) -> Vec<u8> {
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::from_seed([9; 32]);
    let key = slim_core::identity::SigningKey::generate(&mut rng);
    let token = slim_core::identity::SharedSecret::new(secret)
        .unwrap()
        .issue(id, &key.public_key(), UNIX0, &mut rng);
    let identity = slim_core::group::MlsIdentity::p256(token, key);
    slim_core::group::GroupCore::key_package(&identity, slim_core::group::GroupConfig::default())
        .unwrap()
        .1
}

#[test]
fn a_key_package_whose_token_does_not_verify_fails_the_invite() {
    let mut net = Net::new(&["moderator", "mallory"]);
    // Mallory's JOIN_REPLY carries a key package whose credential comes from another
    // deployment; she drops the payload signature (as 2.x clients send none), so only the MLS
    // credential check can catch it.
    let forged = foreign_key_package(
        "another-deployment-secret-0123456789abcdef-0123",
        "org/ns/mallory_x",
    );
    net.hook = Box::new(move |from, _, m| {
        if from == 1 && kind(m) == Mt::JoinReply {
            if let Some(Cmd::JoinReply(mut reply)) = command(m) {
                reply.key_package = Some(forged.clone().into());
                publish_mut(m).msg = Some(pb::Content {
                    content_type: Some(pb::content::ContentType::CommandPayload(
                        pb::CommandPayload {
                            command_payload_type: Some(Cmd::JoinReply(reply)),
                        },
                    )),
                });
                m.metadata.remove(slim_core::identity::PAYLOAD_SIG_KEY);
            }
        }
        Fate::Deliver
    });
    let session = net.apps[0].create_group(&Name::new("org", "ns", "chan"), encrypted(), net.now);
    net.run();
    net.apps[0]
        .invite(session, &Name::new("org", "ns", "mallory"), net.now)
        .unwrap();
    net.advance(Duration::from_secs(5));
    assert!(
        net.events[0]
            .iter()
            .any(|e| matches!(e, SessionEvent::InviteFailed { session: s, .. } if *s == session)),
        "{:?}",
        net.events[0]
    );
    assert_eq!(net.dropped(0, SessionDrop::BadMls), 1);
    assert_eq!(net.apps[0].members(session).unwrap().len(), 1);
    assert!(
        net.sent(0, Mt::GroupWelcome).is_empty(),
        "no welcome for her"
    );
    // The group still takes a genuine member.
    net.hook = Box::new(|_, _, _| Fate::Deliver);
    net.apps[0]
        .invite(session, &Name::new("org", "ns", "mallory"), net.now)
        .unwrap();
    net.advance(Duration::from_secs(1));
    assert_eq!(net.apps[0].members(session).unwrap().len(), 2);
}

/// A moderator and three members in one MLS group.
fn group() -> (Net, SessionId) {
    common::mls_net::group(&["moderator", "m1", "m2", "m3"], 3)
}

#[test]
fn group_updates_carry_commits_and_every_member_reads_the_broadcasts() {
    let (mut net, session) = group();
    // Two members were already there for m3's add, one for m2's: their updates carry commits
    // 2 and 3 (commit 1 added m1, who needed only the welcome).
    let ids: Vec<u32> = net
        .sent(0, Mt::GroupUpdate)
        .iter()
        .filter_map(|m| match command(m) {
            Some(Cmd::GroupUpdate(u)) => u.mls.map(|p| {
                assert_eq!(
                    inspect(&p.mls_content).unwrap().content,
                    Some(MlsContent::Commit)
                );
                p.commit_id
            }),
            _ => None,
        })
        .collect();
    assert_eq!(ids, vec![2, 3]);
    for (i, text) in [(0, "from the moderator"), (2, "from m2")] {
        net.apps[i]
            .publish(session, Bytes::from_static(text.as_bytes()), net.now)
            .unwrap();
    }
    net.advance(Duration::from_millis(100));
    for i in 0..4 {
        let got = net.messages(i, session);
        let want = 2 - usize::from(i == 0 || i == 2);
        assert_eq!(got.len(), want, "app {i} got {got:?}");
    }
}

#[test]
fn a_commit_for_a_past_epoch_is_refused_and_the_group_goes_on() {
    let (mut net, session) = group();
    // Replay m2's add commit as if it were the next one (commit id 4; the header, message id
    // included, is signed and stays as it was): its epoch is past.
    let mut old = net
        .sent(0, Mt::GroupUpdate)
        .into_iter()
        .find(|m| matches!(command(m), Some(Cmd::GroupUpdate(u)) if u.mls.as_ref().map(|p| p.commit_id) == Some(2)))
        .cloned()
        .unwrap();
    if let Some(Cmd::GroupUpdate(mut update)) = command(&old) {
        update.mls.as_mut().unwrap().commit_id = 4;
        publish_mut(&mut old).msg = Some(pb::Content {
            content_type: Some(pb::content::ContentType::CommandPayload(
                pb::CommandPayload {
                    command_payload_type: Some(Cmd::GroupUpdate(update)),
                },
            )),
        });
    }
    // Without the payload signature (2.x clients send none) only MLS can tell.
    old.metadata.remove(slim_core::identity::PAYLOAD_SIG_KEY);
    let before = net.dropped(1, SessionDrop::BadMls);
    net.apps[1].handle_message(old, net.now);
    net.run();
    assert_eq!(
        net.dropped(1, SessionDrop::BadMls),
        before + 1,
        "the replayed commit is refused"
    );
    net.apps[0]
        .publish(session, Bytes::from_static(b"still fine"), net.now)
        .unwrap();
    net.advance(Duration::from_millis(100));
    assert_eq!(
        net.messages(1, session),
        vec![Bytes::from_static(b"still fine")]
    );
}

#[test]
fn a_removed_member_cannot_read_what_is_sent_after_its_removal() {
    let (mut net, session) = group();
    let m3 = net.name(3);
    // m3 keeps its session (its leave request is lost) and stays on the channels, as a node
    // that ignored the unsubscription would let it.
    net.hook = Box::new(|from, _, m| {
        if from == 0 && kind(m) == Mt::LeaveRequest {
            Fate::Drop
        } else {
            Fate::Deliver
        }
    });
    net.apps[0].remove(session, &m3, net.now).unwrap();
    net.advance(Duration::from_millis(100));
    let before = net.dropped(3, SessionDrop::Undecryptable);
    net.apps[0]
        .publish(session, Bytes::from_static(b"after the removal"), net.now)
        .unwrap();
    net.advance(Duration::from_millis(100));
    for i in 1..3 {
        assert_eq!(
            net.messages(i, session),
            vec![Bytes::from_static(b"after the removal")]
        );
    }
    assert!(net.messages(3, session).is_empty());
    assert_eq!(
        net.dropped(3, SessionDrop::Undecryptable),
        before + 1,
        "m3 got the ciphertext and could not decrypt it"
    );
}

#[test]
fn a_replayed_ciphertext_is_a_duplicate_only_for_a_message_we_have() {
    let (mut net, session) = p2p();
    net.apps[0]
        .publish(session, Bytes::from_static(b"once"), net.now)
        .unwrap();
    net.advance(ACK_HOLD);
    assert_eq!(net.messages(1, session), vec![Bytes::from_static(b"once")]);
    let original = net.sent(0, Mt::Msg)[0].clone();
    let acks = |net: &Net| net.sent(1, Mt::MsgAck).len();
    let acks_before = acks(&net);
    // The same bytes again (a peer that retransmits what it sent): re-acknowledged, not
    // delivered twice.
    net.apps[1].handle_message(original.clone(), net.now);
    net.advance(ACK_HOLD);
    assert_eq!(net.dropped(1, SessionDrop::Duplicate), 1);
    assert_eq!(acks(&net), acks_before + 1);
    assert_eq!(net.messages(1, session).len(), 1);
    // The same ciphertext under another sequence id: its generation is spent, and id 2 never
    // arrived, so it must not be acknowledged as if delivered.
    let mut moved = original;
    publish_mut(&mut moved).session.as_mut().unwrap().message_id = 2;
    net.apps[1].handle_message(moved, net.now);
    net.advance(ACK_HOLD);
    assert_eq!(net.dropped(1, SessionDrop::Undecryptable), 1);
    assert_eq!(
        acks(&net),
        acks_before + 1,
        "no ack for a message bob does not have"
    );
    assert_eq!(net.messages(1, session).len(), 1);
}
