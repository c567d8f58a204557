//! The identity layer against real slim-bindings 3.3.8 traffic.
//!
//! `data/identity_vectors.json` holds every message carrying an identity token from the p2p
//! captures (a: plain, b: MLS, both directions), the client messages of the MLS group capture (c),
//! and one client sample of each control type those lack (heartbeat, rejoin, nack, participant
//! state, RTX) plus the two copies of a LEAVE_REQUEST with extra metadata, from `captures/flows`.
//! It is embedded at compile time, so the tests need nothing outside the crate.

use proptest::prelude::*;
use prost::Message as _;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use slim_core::identity::*;
use slim_proto::{pb, NameKey};

const VECTORS: &str = include_str!("data/identity_vectors.json");

struct Vector {
    name: String,
    message: pb::Message,
    msg_type: Option<String>,
    id_xxh3: u128,
    aad: Option<Vec<u8>>,
    e2e_sig_ok: Option<bool>,
    payload_sig_ok: Option<bool>,
}

fn load() -> (String, Vec<Vector>) {
    let doc: serde_json::Value = serde_json::from_str(VECTORS).unwrap();
    let secret = doc["secret"].as_str().unwrap().to_owned();
    let vectors = doc["vectors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            assert_eq!(
                v["token_mac_ok"], true,
                "the capture tool verified every token"
            );
            let bytes = hex::decode(v["hex"].as_str().unwrap()).unwrap();
            Vector {
                name: format!("{} #{} {}", v["capture"], v["index"], v["dir"]),
                message: pb::Message::decode(bytes.as_slice()).unwrap(),
                msg_type: v["type"].as_str().map(str::to_owned),
                id_xxh3: u128::from_str_radix(v["id_xxh3"].as_str().unwrap(), 16).unwrap(),
                aad: v["aad_hex"].as_str().map(|h| hex::decode(h).unwrap()),
                e2e_sig_ok: v["e2e_sig_ok"].as_bool(),
                payload_sig_ok: v["payload_sig_ok"].as_bool(),
            }
        })
        .collect();
    (secret, vectors)
}

fn header(msg: &pb::Message) -> &pb::SlimHeader {
    use pb::message::MessageType::*;
    match msg.message_type.as_ref().unwrap() {
        Publish(p) => p.header.as_ref().unwrap(),
        Subscribe(s) => s.header.as_ref().unwrap(),
        Unsubscribe(u) => u.header.as_ref().unwrap(),
        other => panic!("no header in {other:?}"),
    }
}

fn publish(msg: &pb::Message) -> Option<&pb::Publish> {
    match msg.message_type.as_ref()? {
        pb::message::MessageType::Publish(p) => Some(p),
        _ => None,
    }
}

fn publish_mut(msg: &mut pb::Message) -> &mut pb::Publish {
    match msg.message_type.as_mut().unwrap() {
        pb::message::MessageType::Publish(p) => p,
        _ => panic!("not a publish"),
    }
}

fn token_ts(token: &str) -> u64 {
    token.split(':').nth(1).unwrap().parse().unwrap()
}

/// Replays fixed bytes, so `issue` can be given a captured token's nonce.
struct Replay(Vec<u8>);

impl rand::RngCore for Replay {
    fn next_u32(&mut self) -> u32 {
        unimplemented!()
    }
    fn next_u64(&mut self) -> u64 {
        unimplemented!()
    }
    fn fill_bytes(&mut self, dst: &mut [u8]) {
        let rest = self.0.split_off(dst.len());
        dst.copy_from_slice(&self.0);
        self.0 = rest;
    }
}
impl rand::CryptoRng for Replay {}

#[test]
fn every_captured_token_verifies_and_binds_the_source() {
    let (secret, vectors) = load();
    let shared = SharedSecret::new(&secret).unwrap();
    let other = SharedSecret::new("interop-shared-secret-0123456789abcdef-0123456780").unwrap();
    assert_eq!(vectors.len(), 136);
    for v in &vectors {
        let token = &header(&v.message).identity;
        let ts = token_ts(token);
        let verified = shared
            .verify(token, ts)
            .unwrap_or_else(|e| panic!("{}: {e}", v.name));
        assert_eq!(verified.issued_at, ts);
        assert_eq!(verified.expires_at, ts + 3600);
        assert_eq!(verified.pubkey.len(), 65, "{}", v.name);
        assert_eq!(verified.pubkey[0], 0x04);
        assert_eq!(verified.claims.as_object().unwrap().len(), 1);
        assert!(verified.id.contains('/') && verified.id.contains('_'));

        // Identity binding: the source instance id is XXH3-128 of the token id.
        assert_eq!(verified.app_instance_id(), v.id_xxh3, "{}", v.name);
        let source = NameKey::from_pb(header(&v.message).source.as_ref().unwrap()).unwrap();
        assert_eq!(source.id, verified.app_instance_id(), "{}", v.name);

        // The time window, both edges, and the wrong secret.
        assert!(shared.verify(token, ts + TOKEN_VALIDITY_SECS).is_ok());
        assert!(shared.verify(token, ts - TOKEN_CLOCK_SKEW_SECS).is_ok());
        assert_eq!(
            shared.verify(token, ts + 3601),
            Err(TokenError::Expired {
                issued_at: ts,
                now: ts + 3601
            })
        );
        assert_eq!(
            shared.verify(token, ts - 6),
            Err(TokenError::FromTheFuture {
                issued_at: ts,
                now: ts - 6
            })
        );
        assert_eq!(other.verify(token, ts), Err(TokenError::BadMac));

        // One changed character anywhere (here: in the id, the nonce, the claims and the MAC).
        let fields: Vec<&str> = token.split(':').collect();
        let nonce_start = fields[0].len() + fields[1].len() + 2;
        let claims_start = nonce_start + fields[2].len() + 1;
        for pos in [1, nonce_start + 3, claims_start + 4, token.len() - 3] {
            let mut bytes = token.clone().into_bytes();
            bytes[pos] = if bytes[pos] == b'Q' { b'R' } else { b'Q' };
            let tampered = String::from_utf8(bytes).unwrap();
            assert!(
                shared.verify(&tampered, ts).is_err(),
                "{} pos {pos}",
                v.name
            );
        }
    }
}

#[test]
fn issue_reproduces_captured_tokens_byte_for_byte() {
    use base64::Engine as _;
    let (secret, vectors) = load();
    let shared = SharedSecret::new(&secret).unwrap();
    for v in &vectors {
        let token = &header(&v.message).identity;
        let verified = shared.verify(token, token_ts(token)).unwrap();
        let nonce = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&verified.nonce)
            .unwrap();
        assert_eq!(nonce.len(), 12);
        let reissued = shared.issue(
            &verified.id,
            &verified.pubkey,
            verified.issued_at,
            &mut Replay(nonce),
        );
        assert_eq!(&reissued, token, "{}", v.name);
    }
}

#[test]
fn header_integrity_aad_matches_the_captures() {
    let (_, vectors) = load();
    let mut compared = 0;
    for v in &vectors {
        let Some(expected) = &v.aad else { continue };
        let p = publish(&v.message).unwrap();
        assert_eq!(
            &publish_aad(p).unwrap().encode_to_vec(),
            expected,
            "{}",
            v.name
        );
        compared += 1;
    }
    // All publishes (control and data) of the vectors; only the 7 Subscribes have none.
    assert_eq!(compared, 129);
}

#[test]
fn every_captured_e2e_header_sig_verifies_and_tampering_fails() {
    let (secret, vectors) = load();
    let shared = SharedSecret::new(&secret).unwrap();
    let mut checked = 0;
    let mut unsigned = 0;
    let some_other_key = SigningKey::generate(&mut ChaCha20Rng::seed_from_u64(9)).public_key();
    for v in vectors.iter().filter(|v| publish(&v.message).is_some()) {
        let p = publish(&v.message).unwrap();
        let session_type = p.session.unwrap().session_message_type;
        let token = &p.header.as_ref().unwrap().identity;
        let pubkey = shared.verify(token, token_ts(token)).unwrap().pubkey;

        if v.e2e_sig_ok != Some(true) {
            // Data and RTX messages are never signed.
            assert!(!is_command_message(session_type), "{}", v.name);
            assert_eq!(
                verify_e2e_header(p, &pubkey),
                Err(E2eHeaderError::MissingSignature)
            );
            unsigned += 1;
            continue;
        }
        assert!(is_command_message(session_type), "{}", v.name);
        verify_e2e_header(p, &pubkey).unwrap_or_else(|e| panic!("{}: {e}", v.name));
        checked += 1;

        // Fields outside the AAD may change (the node rewrites them) ...
        let mut hop = p.clone();
        let h = hop.header.as_mut().unwrap();
        h.ttl = 1;
        h.incoming_conn = Some(42);
        h.header_mac = None;
        h.fanout = 7;
        verify_e2e_header(&hop, &pubkey).unwrap();

        // ... fields inside may not.
        let mut t = p.clone();
        t.session.as_mut().unwrap().message_id ^= 1;
        assert_eq!(
            verify_e2e_header(&t, &pubkey),
            Err(E2eHeaderError::Signature(SignatureError::Mismatch))
        );
        let mut t = p.clone();
        t.session.as_mut().unwrap().session_id ^= 0x100;
        assert!(verify_e2e_header(&t, &pubkey).is_err());
        let mut t = p.clone();
        let dst = t.header.as_mut().unwrap().destination.as_mut().unwrap();
        dst.name.as_mut().unwrap().component_2 ^= 1;
        assert!(verify_e2e_header(&t, &pubkey).is_err());
        let mut t = p.clone();
        t.header.as_mut().unwrap().identity.push(' ');
        assert!(verify_e2e_header(&t, &pubkey).is_err());

        // A changed byte of the signature, and the wrong key.
        let sig = p.header.as_ref().unwrap().e2e_header_sig.clone().unwrap();
        for pos in [4, sig.len() / 2, sig.len() - 1] {
            let mut bytes = sig.to_vec();
            bytes[pos] ^= 0x01;
            let mut t = p.clone();
            t.header.as_mut().unwrap().e2e_header_sig = Some(bytes.into());
            assert!(
                verify_e2e_header(&t, &pubkey).is_err(),
                "{} pos {pos}",
                v.name
            );
        }
        assert_eq!(
            verify_e2e_header(p, &some_other_key),
            Err(E2eHeaderError::Signature(SignatureError::Mismatch))
        );
        // And one changed byte in the AAD bytes themselves.
        let aad = publish_aad(p).unwrap().encode_to_vec();
        verify_signature(&pubkey, &aad, &sig).unwrap();
        for pos in [0, aad.len() / 2, aad.len() - 1] {
            let mut bytes = aad.clone();
            bytes[pos] ^= 0x80;
            assert_eq!(
                verify_signature(&pubkey, &bytes, &sig),
                Err(SignatureError::Mismatch)
            );
        }
    }
    assert_eq!(checked, 60);
    assert_eq!(unsigned, 69);
}

#[test]
fn every_captured_payload_sig_verifies_and_tampering_fails() {
    let (secret, vectors) = load();
    let shared = SharedSecret::new(&secret).unwrap();
    let mut checked = 0;
    let mut with_extra_metadata = 0;
    for v in &vectors {
        if v.payload_sig_ok != Some(true) {
            if publish(&v.message).is_some() {
                assert_eq!(
                    verify_payload(&v.message, &[4; 65]),
                    Err(PayloadSigError::Missing)
                );
            }
            continue;
        }
        let token = &header(&v.message).identity;
        let pubkey = shared.verify(token, token_ts(token)).unwrap().pubkey;
        verify_payload(&v.message, &pubkey).unwrap_or_else(|e| panic!("{}: {e}", v.name));
        checked += 1;

        // Tracing keys are outside the signature; any other new key is inside.
        let mut m = v.message.clone();
        m.metadata
            .insert("traceparent".into(), "00-abc-def-01".into());
        m.metadata.insert("baggage".into(), "k=v".into());
        verify_payload(&m, &pubkey).unwrap();
        let mut m = v.message.clone();
        m.metadata.insert("PUBLISH_TO".into(), "TRUE".into());
        assert_eq!(
            verify_payload(&m, &pubkey),
            Err(PayloadSigError::Signature(SignatureError::Mismatch))
        );

        // The payload is covered: one changed byte anywhere in the signing input (domain, AAD,
        // content, metadata) fails ...
        let sig = base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            &v.message.metadata[PAYLOAD_SIG_KEY],
        )
        .unwrap();
        let input = message_signing_input(&v.message).unwrap();
        verify_signature(&pubkey, &input, &sig).unwrap();
        for pos in [0, 20, input.len() / 2, input.len() - 1] {
            let mut bytes = input.clone();
            bytes[pos] ^= 0x01;
            assert_eq!(
                verify_signature(&pubkey, &bytes, &sig),
                Err(SignatureError::Mismatch)
            );
        }
        // ... and so does a changed payload field in the message.
        let mut m = v.message.clone();
        publish_mut(&mut m).msg = Some(pb::Content::default());
        assert!(verify_payload(&m, &pubkey).is_err(), "{}", v.name);
        // So is the header (through the AAD), but not the hop-by-hop fields.
        let mut m = v.message.clone();
        publish_mut(&mut m).session.as_mut().unwrap().message_id ^= 1;
        assert!(verify_payload(&m, &pubkey).is_err());
        let mut m = v.message.clone();
        publish_mut(&mut m).header.as_mut().unwrap().ttl = 3;
        verify_payload(&m, &pubkey).unwrap();

        // A changed signature.
        let mut m = v.message.clone();
        let sig = m.metadata.get_mut(PAYLOAD_SIG_KEY).unwrap();
        let flipped = if sig.starts_with('M') { "N" } else { "M" };
        sig.replace_range(0..1, flipped);
        assert!(verify_payload(&m, &pubkey).is_err());
        let mut m = v.message.clone();
        m.metadata
            .insert(PAYLOAD_SIG_KEY.into(), "not base64!".into());
        assert_eq!(verify_payload(&m, &pubkey), Err(PayloadSigError::NotBase64));

        if v.message.metadata.len() > 1 {
            with_extra_metadata += 1;
            let mut m = v.message.clone();
            for value in m.metadata.iter_mut().filter(|(k, _)| *k != PAYLOAD_SIG_KEY) {
                value.1.push('X');
            }
            assert!(verify_payload(&m, &pubkey).is_err());
        }
    }
    assert_eq!(checked, 60);
    // The LEAVE_REQUEST with LEAVING_SESSION=TRUE, as sent and as forwarded (reordered) by the node.
    assert_eq!(with_extra_metadata, 2);
}

#[test]
fn captured_control_messages_pass_the_full_check() {
    let (secret, vectors) = load();
    let shared = SharedSecret::new(&secret).unwrap();
    let mut seen_types = std::collections::BTreeSet::new();
    for v in vectors.iter().filter(|v| v.e2e_sig_ok == Some(true)) {
        let token = &header(&v.message).identity;
        let ok = verify_control_message(&v.message, &shared, token_ts(token))
            .unwrap_or_else(|e| panic!("{}: {e}", v.name));
        assert_eq!(ok.payload_sig, PayloadSigStatus::Verified);
        seen_types.insert(v.msg_type.clone().unwrap());

        // A copy claiming another instance id is refused by the binding check.
        let mut m = v.message.clone();
        let src = publish_mut(&mut m)
            .header
            .as_mut()
            .unwrap()
            .source
            .as_mut()
            .unwrap();
        src.name.as_mut().unwrap().name_id.as_mut().unwrap().id_1 ^= 1;
        assert!(matches!(
            verify_control_message(&m, &shared, token_ts(token)),
            Err(ControlVerifyError::SourceMismatch { .. })
        ));
        // Too late.
        assert!(matches!(
            verify_control_message(&v.message, &shared, token_ts(token) + 3601),
            Err(ControlVerifyError::Token(TokenError::Expired { .. }))
        ));
    }
    assert_eq!(
        seen_types.into_iter().collect::<Vec<_>>(),
        [
            "DISCOVERY_REPLY",
            "DISCOVERY_REQUEST",
            "GROUP_ACK",
            "GROUP_CLOSE",
            "GROUP_NACK",
            "GROUP_UPDATE",
            "GROUP_WELCOME",
            "HEARTBEAT",
            "JOIN_REPLY",
            "JOIN_REQUEST",
            "LEAVE_REPLY",
            "LEAVE_REQUEST",
            "REJOIN_REPLY",
            "REJOIN_REQUEST",
            "UPDATE_PARTICIPANT_STATE"
        ]
    );
}

/// A control message built and signed by us, the way a session core will.
fn own_message(rng: &mut ChaCha20Rng, now: u64) -> (SharedSecret, SigningKey, pb::Message) {
    let secret = SharedSecret::new("our-own-secret-for-tests-0123456789").unwrap();
    let key = SigningKey::generate(rng);
    let id = new_identity_id("org/ns/alice", rng).unwrap();
    let token = secret.issue(&id, &key.public_key(), now, rng);
    let source =
        slim_proto::Name::with_id("org", "ns", "alice", slim_proto::name::app_instance_id(&id));
    let destination = slim_proto::Name::new("org", "ns", "bob");
    let mut msg = pb::Message {
        message_type: Some(pb::message::MessageType::Publish(pb::Publish {
            header: Some(pb::SlimHeader {
                source: Some(source.to_pb()),
                destination: Some(destination.to_pb()),
                identity: token,
                fanout: 1,
                version: "3.4.6".into(),
                ttl: 8,
                ..Default::default()
            }),
            session: Some(pb::SessionHeader {
                session_type: pb::SessionType::PointToPoint as i32,
                session_message_type: pb::SessionMessageType::JoinRequest as i32,
                session_id: 7,
                message_id: 99,
            }),
            msg: Some(pb::Content {
                content_type: Some(pb::content::ContentType::CommandPayload(
                    pb::CommandPayload {
                        command_payload_type: Some(
                            pb::command_payload::CommandPayloadType::JoinRequest(
                                pb::JoinRequestPayload {
                                    timer_settings: Some(pb::TimerSettings {
                                        timeout: 1000,
                                        max_retries: 3,
                                    }),
                                    ..Default::default()
                                },
                            ),
                        ),
                    },
                )),
            }),
        })),
        metadata: [("LEAVING_SESSION".to_owned(), "TRUE".to_owned())].into(),
    };
    sign_control_message(&mut msg, &key).unwrap();
    (secret, key, msg)
}

#[test]
fn own_messages_round_trip() {
    let mut rng = ChaCha20Rng::seed_from_u64(42);
    let now = 1_800_000_000;
    let (secret, key, msg) = own_message(&mut rng, now);
    // Through the wire encoding and back.
    let msg = pb::Message::decode(msg.encode_to_vec().as_slice()).unwrap();
    let ok = verify_control_message(&msg, &secret, now + 10).unwrap();
    assert_eq!(ok.payload_sig, PayloadSigStatus::Verified);
    assert_eq!(ok.token.pubkey, key.public_key());
    assert!(ok.token.id.starts_with("org/ns/alice_"));

    // Same seed, same bytes (Sans-IO determinism).
    let (_, _, again) = own_message(&mut ChaCha20Rng::seed_from_u64(42), now);
    assert_eq!(again, msg);

    // Without the payload signature the rest still verifies, and the caller is told.
    let mut m = msg.clone();
    m.metadata.remove(PAYLOAD_SIG_KEY);
    assert_eq!(
        verify_control_message(&m, &secret, now)
            .unwrap()
            .payload_sig,
        PayloadSigStatus::Absent
    );
    // Metadata changed after signing.
    let mut m = msg.clone();
    m.metadata.insert("LEAVING_SESSION".into(), "FALSE".into());
    assert!(matches!(
        verify_control_message(&m, &secret, now),
        Err(ControlVerifyError::PayloadSig(PayloadSigError::Signature(
            SignatureError::Mismatch
        )))
    ));
    // Payload changed after signing.
    let mut m = msg.clone();
    publish_mut(&mut m).msg = Some(pb::Content::default());
    // (The AAD's payload_type is "" either way, so only the payload signature notices.)
    assert!(matches!(
        verify_control_message(&m, &secret, now),
        Err(ControlVerifyError::PayloadSig(PayloadSigError::Signature(
            SignatureError::Mismatch
        )))
    ));
    // No e2e signature at all.
    let mut m = msg.clone();
    publish_mut(&mut m).header.as_mut().unwrap().e2e_header_sig = None;
    assert!(matches!(
        verify_control_message(&m, &secret, now),
        Err(ControlVerifyError::E2eHeader(
            E2eHeaderError::MissingSignature
        ))
    ));
    // Another app's key (a valid token for a different key pair) cannot sign for this one.
    let mut m = msg.clone();
    let impostor = SigningKey::generate(&mut rng);
    sign_control_message(&mut m, &impostor).unwrap();
    assert!(matches!(
        verify_control_message(&m, &secret, now),
        Err(ControlVerifyError::E2eHeader(E2eHeaderError::Signature(
            SignatureError::Mismatch
        )))
    ));
    // Not a publish.
    assert_eq!(
        verify_control_message(&pb::Message::default(), &secret, now),
        Err(ControlVerifyError::Shape(MessageShapeError::NotAPublish))
    );
    let mut empty = pb::Message::default();
    assert_eq!(
        sign_control_message(&mut empty, &key),
        Err(MessageShapeError::NotAPublish)
    );
}

#[test]
fn payload_signing_input_layout() {
    let content = pb::Content::default();
    let input = payload_signing_input(
        b"AAD",
        Some(&content),
        [
            ("b", "2"),
            ("traceparent", "x"),
            ("a", "1"),
            (PAYLOAD_SIG_KEY, "s"),
        ],
    );
    let mut expected = b"slim-payload-v1".to_vec();
    for field in [&b"AAD"[..], b"", b"a", b"1", b"b", b"2"] {
        expected.extend_from_slice(&(field.len() as u64).to_be_bytes());
        expected.extend_from_slice(field);
    }
    assert_eq!(input, expected);
    // Map order does not matter.
    assert_eq!(
        payload_signing_input(b"AAD", None, [("a", "1"), ("b", "2")]),
        input
    );
}

proptest! {
    #[test]
    fn verify_never_panics_on_any_string(token in ".*", now in any::<u64>()) {
        let shared = SharedSecret::new("interop-shared-secret-0123456789abcdef-0123456789").unwrap();
        let _ = shared.verify(&token, now);
    }

    #[test]
    fn verify_never_panics_on_token_shaped_strings(
        id in "[a-z/_:]{0,12}",
        ts in "[0-9+-]{0,21}",
        nonce in "[A-Za-z0-9_-]{0,17}",
        claims in "[A-Za-z0-9_=-]{0,80}",
        mac in "[A-Za-z0-9_=-]{40,45}",
        now in any::<u64>(),
    ) {
        let shared = SharedSecret::new("interop-shared-secret-0123456789abcdef-0123456789").unwrap();
        let token = format!("{id}:{ts}:{nonce}:{claims}:{mac}");
        // No forgery is possible, so every one of these is refused.
        prop_assert!(shared.verify(&token, now).is_err());
    }

    #[test]
    fn verify_signature_never_panics(
        key in proptest::collection::vec(any::<u8>(), 0..80),
        msg in proptest::collection::vec(any::<u8>(), 0..40),
        sig in proptest::collection::vec(any::<u8>(), 0..80),
    ) {
        let _ = verify_signature(&key, &msg, &sig);
    }

    #[test]
    fn verify_control_message_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let shared = SharedSecret::new("interop-shared-secret-0123456789abcdef-0123456789").unwrap();
        if let Ok(msg) = pb::Message::decode(bytes.as_slice()) {
            let _ = verify_control_message(&msg, &shared, 1_795_623_273);
            let _ = verify_payload(&msg, &[4; 65]);
        }
    }

    #[test]
    fn own_tokens_verify_for_any_id_and_time(
        base in "[a-z]{1,8}/[a-z]{1,8}/[a-z]{1,8}",
        now in 0u64..u64::MAX / 2,
        seed in any::<u64>(),
    ) {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let shared = SharedSecret::new("interop-shared-secret-0123456789abcdef-0123456789").unwrap();
        let id = new_identity_id(&base, &mut rng).unwrap();
        let token = shared.issue(&id, &[4, 5, 6], now, &mut rng);
        let v = shared.verify(&token, now).unwrap();
        prop_assert_eq!(v.id, id);
        prop_assert_eq!(v.pubkey, vec![4, 5, 6]);
    }
}
