//! Session-message builders shared by the `identity` and `session_layer` fuzz targets: plausible
//! names, contents, payloads and metadata drawn from the fuzz input.

use std::collections::BTreeMap;

use bytes::Bytes;
use slim_proto::name::ANY_INSTANCE;
use slim_proto::pb::command_payload::CommandPayloadType as Cmd;
use slim_proto::pb::{self, SessionMessageType as Mt};
use slim_proto::Name;

use super::Input;

/// Metadata keys the session layer and the signatures treat specially, and a plain one.
const METADATA_KEYS: [&str; 8] = [
    "PUBLISH_TO",
    "LEAVING_SESSION",
    "traceparent",
    "tracestate",
    "baggage",
    crate::identity::PAYLOAD_SIG_KEY,
    "app-key",
    "",
];

/// A name from `known` (most of the time), a service name of one of them, or a made-up one.
pub(super) fn pick_name(input: &mut Input, known: &[Name]) -> Name {
    let b = input.u8();
    match b % 8 {
        0 => Name::with_id("org", "ns", "nobody", u128::from(input.u64())),
        1 if !known.is_empty() => {
            let name = &known[usize::from(b >> 3) % known.len()];
            name.with_instance(ANY_INSTANCE)
        }
        2 => Name::with_id(
            "org",
            "ns",
            &input.string(8),
            u128::from(input.u8()) | (u128::from(input.bool()) << 127),
        ),
        _ if !known.is_empty() => known[usize::from(b >> 3) % known.len()].clone(),
        _ => Name::new("org", "ns", "nobody"),
    }
}

/// A wire name: usually `name.to_pb()`, sometimes with a part missing or altered.
pub(super) fn wire_name(input: &mut Input, name: &Name) -> pb::Name {
    let mut wire = name.to_pb();
    match input.u8() {
        0..=239 => {}
        240..=243 => wire.str_name = None,
        244..=247 => wire.name = None,
        248..=251 => {
            if let Some(encoded) = wire.name.as_mut() {
                encoded.name_id = None;
            }
        }
        _ => {
            if let Some(encoded) = wire.name.as_mut() {
                encoded.component_1 ^= 1;
            }
        }
    }
    wire
}

pub(super) fn participant(input: &mut Input, known: &[Name]) -> pb::Participant {
    let name = pick_name(input, known);
    let b = input.u8();
    pb::Participant {
        name: (b & 0xf0 != 0xf0).then(|| name.to_pb()),
        settings: (b & 1 == 0).then_some(pb::ParticipantSettings {
            sends_data: b & 2 == 0,
            receives_data: b & 4 == 0,
        }),
        status: i32::from((b >> 3) % 3),
    }
}

fn participants(input: &mut Input, known: &[Name]) -> Vec<pb::Participant> {
    (0..input.u8() % 6)
        .map(|_| participant(input, known))
        .collect()
}

fn mls(input: &mut Input) -> Option<pb::MlsPayload> {
    input.chance(32).then(|| pb::MlsPayload {
        commit_id: input.u32(),
        mls_content: Bytes::copy_from_slice(input.bytes(32)),
    })
}

pub(super) fn timer_settings(input: &mut Input) -> Option<pb::TimerSettings> {
    input.chance(200).then(|| pb::TimerSettings {
        timeout: input.pick(&[0, 1, 10, 100, 250, 1000, 60_000, u32::MAX]),
        max_retries: input.pick(&[0, 1, 2, 3, 5, 10, 1000, u32::MAX]),
    })
}

/// The command payload a message of type `message_type` carries (or, now and then, another one).
pub(super) fn command(input: &mut Input, message_type: i32, known: &[Name]) -> Cmd {
    let kind = if input.chance(16) {
        i32::from(input.u8() % 16) + 5
    } else {
        message_type
    };
    match Mt::try_from(kind).unwrap_or(Mt::Unspecified) {
        Mt::DiscoveryRequest => Cmd::DiscoveryRequest(pb::DiscoveryRequestPayload {}),
        Mt::DiscoveryReply => Cmd::DiscoveryReply(pb::DiscoveryReplyPayload {}),
        Mt::JoinRequest => Cmd::JoinRequest(pb::JoinRequestPayload {
            timer_settings: timer_settings(input),
            channel: input.chance(160).then(|| pick_name(input, known).to_pb()),
            control: input.chance(160).then(|| pick_name(input, known).to_pb()),
            mls_settings: input.chance(16).then(|| pb::MlsSettings {
                header_integrity_validation_percent: u32::from(input.u8()),
            }),
        }),
        Mt::JoinReply => Cmd::JoinReply(pb::JoinReplyPayload {
            key_package: input
                .chance(16)
                .then(|| Bytes::copy_from_slice(input.bytes(16))),
            participant: input.chance(220).then(|| participant(input, known)),
        }),
        Mt::LeaveRequest => Cmd::LeaveRequest(pb::LeaveRequestPayload {}),
        Mt::LeaveReply => Cmd::LeaveReply(pb::LeaveReplyPayload {}),
        Mt::GroupUpdate => Cmd::GroupUpdate(pb::GroupUpdatePayload {
            op: i32::from(input.u8() % 4),
            participant: input.chance(220).then(|| participant(input, known)),
            participants: participants(input, known),
            mls: mls(input),
        }),
        Mt::GroupWelcome => Cmd::GroupWelcome(pb::GroupWelcomePayload {
            participants: participants(input, known),
            mls: mls(input),
        }),
        Mt::GroupClose => Cmd::GroupClose(pb::GroupClosePayload {
            participants: (0..input.u8() % 4)
                .map(|_| pick_name(input, known).to_pb())
                .collect(),
        }),
        Mt::GroupProposal => Cmd::GroupProposal(pb::GroupProposalPayload {
            source: input.chance(128).then(|| pick_name(input, known).to_pb()),
            mls_proposal: Bytes::copy_from_slice(input.bytes(16)),
        }),
        Mt::GroupAck => Cmd::GroupAck(pb::GroupAckPayload {}),
        Mt::GroupNack => Cmd::GroupNack(pb::GroupNackPayload {}),
        Mt::Heartbeat => Cmd::Heartbeat(pb::HeartbeatPayload {
            epoch: if input.bool() { u64::MAX } else { input.u64() },
        }),
        Mt::UpdateParticipantState => {
            Cmd::UpdateParticipantState(pb::UpdateParticipantStatePayload {
                participant: input.chance(160).then(|| pick_name(input, known).to_pb()),
                new_state: i32::from(input.u8() % 3),
                epoch: input.u64(),
            })
        }
        Mt::RejoinRequest => Cmd::RejoinRequest(pb::RejoinRequestPayload {
            participant: input.chance(128).then(|| pick_name(input, known).to_pb()),
            key_package: Bytes::copy_from_slice(input.bytes(16)),
        }),
        Mt::RejoinReply => Cmd::RejoinReply(pb::RejoinReplyPayload {
            commit_id: input.u32(),
            mls_content: Bytes::copy_from_slice(input.bytes(16)),
        }),
        // Data types (and unknown ones) never get here with `kind` in 5..=20; an ack is as
        // good as anything.
        _ => Cmd::GroupAck(pb::GroupAckPayload {}),
    }
}

pub(super) fn command_content(payload: Cmd) -> pb::Content {
    pb::Content {
        content_type: Some(pb::content::ContentType::CommandPayload(
            pb::CommandPayload {
                command_payload_type: Some(payload),
            },
        )),
    }
}

pub(super) fn app_content(payload_type: &str, blob: &[u8]) -> pb::Content {
    pb::Content {
        content_type: Some(pb::content::ContentType::AppPayload(
            pb::ApplicationPayload {
                payload_type: payload_type.to_owned(),
                blob: Bytes::copy_from_slice(blob),
            },
        )),
    }
}

/// The content of a message of type `message_type`: what it should carry most of the time; now
/// and then none, an empty one, or the other kind.
pub(super) fn content(input: &mut Input, message_type: i32, known: &[Name]) -> Option<pb::Content> {
    let data = (1..=4).contains(&message_type);
    match input.u8() {
        0..=7 => None,
        8..=11 => Some(pb::Content::default()),
        12..=15 => Some(pb::Content {
            content_type: Some(pb::content::ContentType::CommandPayload(
                pb::CommandPayload::default(),
            )),
        }),
        16..=31 if data => Some(command_content(command(input, message_type, known))),
        16..=31 => Some(app_content("msg", input.bytes(32))),
        _ if data => {
            let payload_type = input.pick(&["msg", "", "application/json", "x"]);
            Some(app_content(payload_type, input.bytes(64)))
        }
        _ => Some(command_content(command(input, message_type, known))),
    }
}

/// A few metadata entries, keys mostly from the ones with a meaning.
pub(super) fn metadata(input: &mut Input) -> BTreeMap<String, String> {
    let mut metadata = BTreeMap::new();
    for _ in 0..input.u8() % 4 {
        let key = if input.chance(220) {
            input.pick(&METADATA_KEYS).to_owned()
        } else {
            input.string(8)
        };
        let value = if input.bool() {
            "TRUE".to_owned()
        } else {
            input.string(12)
        };
        metadata.insert(key, value);
    }
    metadata
}

/// A session message type: mostly a known one, sometimes 0 or an unknown number.
pub(super) fn message_type(input: &mut Input) -> i32 {
    match input.u8() {
        0..=3 => 0,
        4..=7 => 21 + i32::from(input.u8()),
        b => i32::from(b % 20) + 1,
    }
}

pub(super) fn publish(
    header: pb::SlimHeader,
    session: pb::SessionHeader,
    content: Option<pb::Content>,
    metadata: BTreeMap<String, String>,
) -> pb::Message {
    pb::Message {
        message_type: Some(pb::message::MessageType::Publish(pb::Publish {
            header: Some(header),
            session: Some(session),
            msg: content,
        })),
        metadata,
    }
}
