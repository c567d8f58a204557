//! Fuzz target `session_payloads`: the protobuf wrappers the session layer reads out of a
//! publish, decoded from raw bytes.

use std::fmt::Debug;
use std::time::Duration;

use prost::Message;
use slim_proto::pb;
use slim_proto::{Name, NameKey};

use crate::identity::{header_integrity_aad, payload_signing_input, payload_type};

/// Decodes the bytes as every session-layer payload type (`Content`, `ApplicationPayload`,
/// `CommandPayload` and each command, `MlsPayload`, `MlsSettings`, `HeaderIntegrityAad`,
/// `SessionHeader`, `Participant`, …), whole and length-delimited. Whatever decodes must
/// re-encode to bytes that decode to the same value, with `encoded_len` telling the truth, and
/// go through what the session layer and the signatures do with it without panicking.
pub fn session_payloads(data: &[u8]) {
    if let Some(content) = round_trip::<pb::Content>(data) {
        check_content(&content);
    }
    if let Some(command) = round_trip::<pb::CommandPayload>(data) {
        check_command(command.command_payload_type.as_ref());
    }
    round_trip::<pb::ApplicationPayload>(data);
    round_trip::<pb::MlsPayload>(data);
    round_trip::<pb::MlsSettings>(data);
    round_trip::<pb::RejoinRequestPayload>(data);
    round_trip::<pb::RejoinReplyPayload>(data);
    round_trip::<pb::GroupProposalPayload>(data);
    round_trip::<pb::HeartbeatPayload>(data);
    round_trip::<pb::TimerSettings>(data);
    if let Some(aad) = round_trip::<pb::HeaderIntegrityAad>(data) {
        check_aad(&aad);
    }
    if let Some(session) = round_trip::<pb::SessionHeader>(data) {
        let _ = pb::SessionType::try_from(session.session_type);
        let _ = pb::SessionMessageType::try_from(session.session_message_type);
        let _ = crate::identity::is_command_message(session.session_message_type);
    }
    if let Some(p) = round_trip::<pb::Participant>(data) {
        check_participant(&p);
    }
    for payload in [
        round_trip::<pb::JoinRequestPayload>(data).map(Cmd::JoinRequest),
        round_trip::<pb::JoinReplyPayload>(data).map(Cmd::JoinReply),
        round_trip::<pb::GroupUpdatePayload>(data).map(Cmd::GroupUpdate),
        round_trip::<pb::GroupWelcomePayload>(data).map(Cmd::GroupWelcome),
        round_trip::<pb::GroupClosePayload>(data).map(Cmd::GroupClose),
        round_trip::<pb::UpdateParticipantStatePayload>(data).map(Cmd::UpdateParticipantState),
    ]
    .into_iter()
    .flatten()
    {
        check_command(Some(&payload));
    }
    // Length-delimited, as payloads are nested in a message.
    if let Ok(content) = pb::Content::decode_length_delimited(data) {
        let again = content.encode_length_delimited_to_vec();
        assert_eq!(
            pb::Content::decode_length_delimited(again.as_slice()).as_ref(),
            Ok(&content)
        );
    }
}

use pb::command_payload::CommandPayloadType as Cmd;

/// `decode(encode(decode(data))) == decode(data)`, and `encoded_len` is the encoding's length.
fn round_trip<M: Message + Default + PartialEq + Debug>(data: &[u8]) -> Option<M> {
    let decoded = M::decode(data).ok()?;
    let encoded = decoded.encode_to_vec();
    assert_eq!(
        decoded.encoded_len(),
        encoded.len(),
        "encoded_len of {decoded:?}"
    );
    let again = M::decode(encoded.as_slice()).expect("a re-encoded payload decodes");
    assert_eq!(again, decoded, "decode(encode(m)) == m");
    Some(decoded)
}

fn check_name(wire: &pb::Name) {
    let key = NameKey::from_pb(wire);
    let name = Name::from_pb(wire);
    assert_eq!(key, name.as_ref().map(Name::key));
    if let Some(name) = name {
        assert_eq!(Name::from_pb(&name.to_pb()).as_ref(), Some(&name));
    }
}

fn check_participant(p: &pb::Participant) {
    if let Some(name) = &p.name {
        check_name(name);
    }
    let _ = pb::ParticipantState::try_from(p.status);
}

fn check_content(content: &pb::Content) {
    let kind = payload_type(Some(content));
    match &content.content_type {
        Some(pb::content::ContentType::AppPayload(app)) => assert_eq!(kind, app.payload_type),
        Some(pb::content::ContentType::CommandPayload(c)) => {
            assert_eq!(kind, "");
            check_command(c.command_payload_type.as_ref());
        }
        None => assert_eq!(kind, ""),
    }
    // The payload signature's input is injective in the content: length-prefixed encoding.
    let with = payload_signing_input(b"aad", Some(content), [("k", "v")]);
    let without = payload_signing_input(b"aad", None, [("k", "v")]);
    assert_eq!(with == without, content.encoded_len() == 0);
}

fn check_aad(aad: &pb::HeaderIntegrityAad) {
    for name in [&aad.source, &aad.destination].into_iter().flatten() {
        check_name(name);
    }
    // Rebuilding it from a header and session header with the same fields gives it back
    // (version aside).
    let header = pb::SlimHeader {
        source: aad.source.clone(),
        destination: aad.destination.clone(),
        identity: aad.identity.clone(),
        ..Default::default()
    };
    let session = pb::SessionHeader {
        session_type: aad.session_type,
        session_message_type: aad.session_message_type,
        session_id: aad.session_id,
        message_id: aad.message_id,
    };
    let rebuilt = header_integrity_aad(&header, &session, &aad.payload_type);
    assert_eq!(
        pb::HeaderIntegrityAad {
            version: aad.version,
            ..rebuilt
        },
        *aad
    );
}

/// What the session layer reads out of a command payload.
fn check_command(payload: Option<&Cmd>) {
    match payload {
        Some(Cmd::JoinRequest(join)) => {
            if let Some(t) = &join.timer_settings {
                let interval = Duration::from_millis(u64::from(t.timeout.max(1)));
                assert!(interval >= Duration::from_millis(1));
            }
            for name in [&join.channel, &join.control].into_iter().flatten() {
                check_name(name);
            }
        }
        Some(Cmd::JoinReply(reply)) => {
            if let Some(p) = &reply.participant {
                check_participant(p);
            }
        }
        Some(Cmd::GroupUpdate(update)) => {
            let _ = pb::GroupUpdateOp::try_from(update.op);
            update
                .participant
                .iter()
                .chain(&update.participants)
                .for_each(check_participant);
        }
        Some(Cmd::GroupWelcome(welcome)) => welcome.participants.iter().for_each(check_participant),
        Some(Cmd::GroupClose(close)) => close.participants.iter().for_each(check_name),
        Some(Cmd::UpdateParticipantState(update)) => {
            if let Some(name) = &update.participant {
                check_name(name);
            }
            let _ = pb::ParticipantState::try_from(update.new_state);
        }
        Some(Cmd::GroupProposal(proposal)) => {
            if let Some(name) = &proposal.source {
                check_name(name);
            }
        }
        Some(Cmd::RejoinRequest(rejoin)) => {
            if let Some(name) = &rejoin.participant {
                check_name(name);
            }
        }
        _ => {}
    }
}
