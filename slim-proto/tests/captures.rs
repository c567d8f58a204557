//! Every message real slim-bindings 3.3.8 clients and the reference node exchanged in
//! `shared/spec/captures` (a: p2p plain, b: p2p MLS, c: group MLS) decodes with our schema,
//! passes validation, and re-encodes to the identical bytes.

use prost::Message as _;
use slim_proto::pb;

#[test]
fn captured_messages_round_trip_byte_exact() {
    let raw = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/capture_messages.json"
    ))
    .unwrap();
    let messages: Vec<serde_json::Value> = serde_json::from_str(&raw).unwrap();
    assert!(messages.len() > 200, "expected the full capture set");
    let mut kinds = std::collections::BTreeMap::new();
    for entry in &messages {
        let bytes = hex::decode(entry["hex"].as_str().unwrap()).unwrap();
        let message = pb::Message::decode(bytes.as_slice())
            .unwrap_or_else(|e| panic!("{}: {e}", entry["index"]));
        slim_proto::validate(&message).unwrap_or_else(|e| panic!("{}: {e}", entry["index"]));
        assert_eq!(message.encode_to_vec(), bytes, "message {}", entry["index"]);
        let kind = match &message.message_type {
            Some(pb::message::MessageType::Publish(_)) => "publish",
            Some(pb::message::MessageType::Subscribe(_)) => "subscribe",
            Some(pb::message::MessageType::Unsubscribe(_)) => "unsubscribe",
            Some(pb::message::MessageType::Link(_)) => "link",
            Some(pb::message::MessageType::SubscriptionAck(_)) => "ack",
            None => "none",
        };
        *kinds.entry(kind).or_insert(0) += 1;
    }
    for kind in ["publish", "subscribe", "unsubscribe", "link", "ack"] {
        assert!(
            kinds.get(kind).copied().unwrap_or(0) > 0,
            "no {kind} in captures: {kinds:?}"
        );
    }
}
