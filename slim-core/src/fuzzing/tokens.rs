//! Fuzz target `identity`: SharedSecret tokens, ECDSA signatures and the end-to-end signatures
//! of control messages (`crate::identity`).

use std::sync::OnceLock;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use prost::Message as _;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use sha2::Sha256;
use slim_proto::name::app_instance_id;
use slim_proto::pb::{self, SessionMessageType as Mt};
use slim_proto::{Name, NameKey};

use super::{wire, Input};
use crate::identity::{
    header_integrity_aad, is_command_message, message_signing_input, new_identity_id, payload_type,
    publish_aad, sign_control_message, verify_control_message, verify_e2e_header, verify_payload,
    verify_signature, ControlVerifyError, IdError, KeyError, PayloadSigStatus, SecretError,
    SenderMemo, SharedSecret, SigningKey, TokenError, VerifiedToken, PAYLOAD_SIG_EXCLUDED_KEYS,
    PAYLOAD_SIG_KEY, TOKEN_CLOCK_SKEW_SECS, TOKEN_VALIDITY_SECS,
};

/// The deployment secret of the target, and one nobody else has.
const SECRET: &str = "fuzz-identity-shared-secret-0123456789abcdef";
const OTHER_SECRET: &str = "another-fuzz-identity-secret-0123456789abcdef";
/// A plausible "now", unix seconds.
const NOW: u64 = 1_795_600_000;
/// Operations per input (each may sign and verify a few times).
const MAX_OPS: usize = 12;
const PEER_ID: &str = "org/ns/alice_fuzzAAAA";

fn key(which: usize) -> &'static SigningKey {
    static KEYS: OnceLock<[SigningKey; 2]> = OnceLock::new();
    &KEYS.get_or_init(|| {
        [
            SigningKey::from_secret_scalar(&[0x5a; 32]).expect("valid scalar"),
            SigningKey::from_secret_scalar(&[0x17; 32]).expect("valid scalar"),
        ]
    })[which & 1]
}

/// Token strings, signatures and signed messages from the fuzz input; see the module docs of
/// [`crate::fuzzing`]. Checked: nothing panics; every verdict agrees with a model of the token
/// format; issued tokens verify (inside the time window only) and no one-byte mutation,
/// truncation or extension of one does; own signatures verify and mutated ones do not; a signed
/// control message verifies, also after a wire round trip, after any change to what the
/// signatures cover it does not, and after a change to what they leave out it still does.
pub fn identity(data: &[u8]) {
    let mut input = Input::new(data);
    let secret = SharedSecret::new(SECRET).expect("long enough");
    // Spans the input's operations, so later tokens meet senders and tokens remembered earlier.
    let mut memo = SenderMemo::default();
    let mut ops = 0;
    while !input.is_empty() && ops < MAX_OPS {
        ops += 1;
        match input.u8() % 8 {
            0 => verify_text(&secret, &mut memo, &mut input),
            1 | 2 => forged(&secret, &mut memo, &mut input),
            3 => round_trip(&mut input),
            4 => signatures(&mut input),
            5 => control_round_trip(&secret, &mut input),
            6 => raw_message(&secret, &mut input),
            _ => identity_ids(&mut input),
        }
    }
}

fn fuzz_now(input: &mut Input) -> u64 {
    match input.u8() % 4 {
        0 => NOW,
        1 => (NOW + u64::from(input.u16())).saturating_sub(0x8000),
        2 => input.u64(),
        _ => u64::from(input.u32()),
    }
}

/// What a verdict must agree with whatever the token is.
fn check_outcome(token: &str, now: u64, outcome: &Result<VerifiedToken, TokenError>) {
    match outcome {
        Ok(v) => {
            let fields: Vec<&str> = token.split(':').collect();
            assert_eq!(
                fields.len(),
                5,
                "a verified token has five fields: {token:?}"
            );
            assert_eq!(v.id, fields[0]);
            assert_eq!(fields[1].parse::<u64>().ok(), Some(v.issued_at));
            assert_eq!(v.nonce, fields[2]);
            assert_eq!(
                v.expires_at,
                v.issued_at.saturating_add(TOKEN_VALIDITY_SECS)
            );
            assert!(in_window(v.issued_at, now), "verified outside its window");
            let claimed = v
                .claims
                .get("pubkey")
                .and_then(serde_json::Value::as_str)
                .and_then(|p| STANDARD.decode(p).ok());
            assert_eq!(claimed.as_ref(), Some(&v.pubkey), "pubkey is the claim");
            let _ = v.app_instance_id();
        }
        Err(TokenError::Expired { issued_at, now: n }) => {
            assert_eq!(*n, now);
            assert!(now > *issued_at && now - issued_at > TOKEN_VALIDITY_SECS);
        }
        Err(TokenError::FromTheFuture { issued_at, now: n }) => {
            assert_eq!(*n, now);
            assert!(*issued_at > now && issued_at - now > TOKEN_CLOCK_SKEW_SECS);
        }
        Err(error) => {
            let _ = error.to_string();
        }
    }
}

fn in_window(issued_at: u64, now: u64) -> bool {
    if issued_at > now {
        issued_at - now <= TOKEN_CLOCK_SKEW_SECS
    } else {
        now - issued_at <= TOKEN_VALIDITY_SECS
    }
}

/// `secret.verify`, with the memo's verdict beside it, twice (the second may take the memo's
/// fast path): a memo may spare work but never change an answer.
fn verify_remembering(
    secret: &SharedSecret,
    memo: &mut SenderMemo,
    token: &str,
    now: u64,
) -> Result<VerifiedToken, TokenError> {
    let outcome = secret.verify(token, now);
    for _ in 0..2 {
        match (&outcome, secret.verify_with_memo(token, now, memo)) {
            (Ok(v), Ok(sender)) => {
                assert_eq!(sender.pubkey, v.pubkey.as_slice());
                assert_eq!(sender.app_instance_id, v.app_instance_id());
            }
            (Err(error), Err(remembered)) => assert_eq!(*error, remembered),
            (outcome, remembered) => {
                panic!("the memo disagrees: {remembered:?} against {outcome:?}: {token:?}")
            }
        }
    }
    outcome
}

/// Any text as a token.
fn verify_text(secret: &SharedSecret, memo: &mut SenderMemo, input: &mut Input) {
    let len = usize::from(input.u16() % 1024);
    let token = String::from_utf8_lossy(input.take(len)).into_owned();
    let now = fuzz_now(input);
    let outcome = verify_remembering(secret, memo, &token, now);
    check_outcome(&token, now, &outcome);
}

fn mac(secret: &str, message: &str) -> String {
    let tag = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .expect("any key length")
        .chain_update(message.as_bytes())
        .finalize()
        .into_bytes();
    URL_SAFE_NO_PAD.encode(tag)
}

/// A token with arbitrary fields and a correct MAC: reaches the timestamp and claims checks.
fn forged(secret: &SharedSecret, memo: &mut SenderMemo, input: &mut Input) {
    let id = match input.u8() % 4 {
        0 => PEER_ID.to_owned(),
        1 => String::new(),
        _ => input.string(24),
    };
    let ts = match input.u8() % 6 {
        0 | 1 => NOW.to_string(),
        2 => (NOW + u64::from(input.u16()))
            .saturating_sub(0x8000)
            .to_string(),
        3 => input.u64().to_string(),
        4 => format!("+{}", NOW),
        _ => input.string(24),
    };
    let nonce = if input.bool() {
        "AAAAAAAAAAAAAAAA".to_owned()
    } else {
        input.string(24)
    };
    let pubkey = input.bytes(70).to_vec();
    let (claims, proper) = match input.u8() % 6 {
        0 | 1 => (claims_for(&pubkey), true),
        // Arbitrary bytes behind the base64url layer: JSON parsing of anything.
        2 => (URL_SAFE_NO_PAD.encode(input.bytes(96)), false),
        // A JSON object whose pubkey is an arbitrary string (base64 parsing of anything).
        3 => {
            let json = serde_json::json!({ "pubkey": input.string(96) }).to_string();
            (URL_SAFE_NO_PAD.encode(json), false)
        }
        // Other shapes: extra fields, a non-string key, nesting.
        4 => {
            let json = match input.u8() % 5 {
                0 => {
                    serde_json::json!({ "pubkey": STANDARD.encode(&pubkey), "sub": input.string(8) })
                }
                1 => serde_json::json!({ "pubkey": input.u64() }),
                2 => serde_json::json!({ "pubkey": null }),
                3 => serde_json::json!([STANDARD.encode(&pubkey)]),
                _ => serde_json::json!({ "x": { "pubkey": STANDARD.encode(&pubkey) } }),
            };
            (URL_SAFE_NO_PAD.encode(json.to_string()), false)
        }
        _ => (input.string(64), false),
    };
    let message = format!("{id}:{ts}:{nonce}:{claims}");
    let token = format!("{message}:{}", mac(SECRET, &message));
    let now = fuzz_now(input);
    let outcome = verify_remembering(secret, memo, &token, now);
    check_outcome(&token, now, &outcome);

    // The model: the split, the timestamp, the MAC (correct here), the window, the claims.
    let colon_free = [&id, &ts, &nonce, &claims]
        .iter()
        .all(|field| !field.contains(':'));
    let issued_at = ts.parse::<u64>().ok();
    match (colon_free, issued_at) {
        (true, Some(issued_at)) if in_window(issued_at, now) => match &outcome {
            Ok(v) => {
                assert_eq!(
                    (v.id.as_str(), v.nonce.as_str()),
                    (id.as_str(), nonce.as_str())
                );
                if proper {
                    assert_eq!(v.pubkey, pubkey);
                }
            }
            Err(TokenError::BadClaims(_)) if !proper => {}
            Err(error) => panic!("authentic token in its window refused: {error:?}: {token:?}"),
        },
        (true, Some(_)) => assert!(
            matches!(
                outcome,
                Err(TokenError::Expired { .. } | TokenError::FromTheFuture { .. })
            ),
            "authentic token outside its window: {outcome:?}: {token:?}"
        ),
        _ => assert!(
            matches!(outcome, Err(TokenError::Malformed(_))),
            "token with a bad field: {outcome:?}: {token:?}"
        ),
    }
    // Someone else's secret never verifies it (the MAC is checked before the time).
    let other = SharedSecret::new(OTHER_SECRET).expect("long enough");
    let outcome = other.verify(&token, now);
    if colon_free && issued_at.is_some() {
        assert_eq!(outcome, Err(TokenError::BadMac));
    } else {
        assert!(matches!(outcome, Err(TokenError::Malformed(_))));
    }
}

/// The claims field of the reference: base64url-nopad of `{"pubkey":"<base64(key)>"}`.
fn claims_for(pubkey: &[u8]) -> String {
    let json = serde_json::json!({ "pubkey": STANDARD.encode(pubkey) }).to_string();
    URL_SAFE_NO_PAD.encode(json)
}

/// Issue, verify in and out of the window, with another secret, and altered.
fn round_trip(input: &mut Input) {
    let secret_text = if input.chance(200) {
        SECRET.to_owned()
    } else {
        input.string(64)
    };
    let issuer = match SharedSecret::new(&secret_text) {
        Ok(issuer) => issuer,
        Err(SecretError::TooShort { len }) => {
            assert_eq!(len, secret_text.len());
            assert!(len < crate::identity::MIN_SECRET_LEN);
            return;
        }
    };
    assert!(secret_text.len() >= crate::identity::MIN_SECRET_LEN);
    let mut rng = ChaCha20Rng::seed_from_u64(input.u64());
    let id = if input.chance(160) {
        new_identity_id("org/ns/svc", &mut rng).expect("a valid base id")
    } else {
        input.string(32)
    };
    let pubkey = input.bytes(80).to_vec();
    let issued_at = fuzz_now(input);
    let token = issuer.issue(&id, &pubkey, issued_at, &mut rng);
    let now = match input.u8() % 5 {
        0 => issued_at,
        1 => issued_at.saturating_add(u64::from(input.u16() % 4000)),
        2 => issued_at.saturating_sub(u64::from(input.u8() % 16)),
        3 => issued_at.saturating_add(TOKEN_VALIDITY_SECS + u64::from(input.u8() % 2)),
        _ => input.u64(),
    };
    let outcome = issuer.verify(&token, now);
    check_outcome(&token, now, &outcome);
    if id.contains(':') {
        assert!(
            matches!(outcome, Err(TokenError::Malformed(_))),
            "an id with ':' gives an unparsable token: {outcome:?}"
        );
        return;
    }
    if in_window(issued_at, now) {
        let v = outcome.unwrap_or_else(|e| panic!("own token refused: {e:?}: {token:?}"));
        assert_eq!(v.id, id);
        assert_eq!(v.issued_at, issued_at);
        assert_eq!(v.pubkey, pubkey);
        assert_eq!(v.nonce.len(), 16);
        assert_eq!(
            v.claims,
            serde_json::json!({ "pubkey": STANDARD.encode(&pubkey) })
        );
        assert_eq!(v.app_instance_id(), app_instance_id(&id));
    } else {
        assert!(matches!(
            outcome,
            Err(TokenError::Expired { .. } | TokenError::FromTheFuture { .. })
        ));
    }
    // A different key (HMAC pads short keys with zeros, so append something else).
    let other = SharedSecret::new(&format!("{secret_text}x")).expect("longer still");
    assert_eq!(other.verify(&token, now), Err(TokenError::BadMac));

    // No single-byte change, truncation or extension verifies, in the window or not.
    let now = issued_at;
    let mut bytes = token.clone().into_bytes();
    let at = usize::from(input.u16()) % bytes.len();
    let value = input.u8();
    if bytes[at] != value {
        bytes[at] = value;
        // (Lossy decoding can map an invalid byte back onto the same text.)
        let mutated = String::from_utf8_lossy(&bytes);
        assert!(
            mutated == token || issuer.verify(&mutated, now).is_err(),
            "byte {at} of {token:?} set to {value:#04x} still verifies"
        );
    }
    let cut = usize::from(input.u16()) % token.len();
    if token.is_char_boundary(cut) {
        assert!(
            issuer.verify(&token[..cut], now).is_err(),
            "prefix verifies"
        );
    }
    let extended = format!("{token}{}", input.string(8));
    if extended != token {
        assert!(issuer.verify(&extended, now).is_err(), "extension verifies");
    }
}

/// Keys from arbitrary scalars, own signatures and mutations of them, arbitrary verifications.
fn signatures(input: &mut Input) {
    let scalar = input.bytes(36);
    match SigningKey::from_secret_scalar(scalar) {
        Err(KeyError::TooLong(len)) => assert!(len > 32 && len == scalar.len()),
        Err(error) => {
            let _ = error.to_string();
        }
        Ok(key) => {
            let again = SigningKey::from_secret_scalar(&key.secret_scalar()).expect("exported");
            assert_eq!(again.public_key(), key.public_key());
            let message = input.bytes(128);
            let signature = key.sign(message);
            let public = key.public_key();
            verify_signature(&public, message, &signature).expect("own signature verifies");
            let mut bad = signature.clone();
            let at = usize::from(input.u8()) % bad.len();
            let value = input.u8();
            if bad[at] != value {
                bad[at] = value;
                assert!(
                    verify_signature(&public, message, &bad).is_err(),
                    "signature with byte {at} set to {value:#04x} verifies"
                );
            }
            let mut other = message.to_vec();
            if other.is_empty() {
                other.push(input.u8());
            } else {
                let at = usize::from(input.u8()) % other.len();
                other[at] ^= input.u8() | 1;
            }
            assert!(verify_signature(&public, &other, &signature).is_err());
            let mut other_key = public;
            other_key[1 + usize::from(input.u8()) % 64] ^= input.u8() | 1;
            assert!(verify_signature(&other_key, message, &signature).is_err());
        }
    }
    let pubkey = input.bytes(70);
    let message = input.bytes(32);
    let signature = input.bytes(80);
    let _ = verify_signature(pubkey, message, signature).map_err(|e| e.to_string());
    let _ = verify_signature(&key(0).public_key(), message, signature);
}

fn identity_ids(input: &mut Input) {
    let base = input.string(24);
    let mut rng = ChaCha20Rng::seed_from_u64(u64::from(input.u8()));
    match new_identity_id(&base, &mut rng) {
        Ok(id) => {
            assert!(!base.is_empty() && !base.contains(':'));
            assert!(!base.chars().any(char::is_whitespace));
            let suffix = id
                .strip_prefix(&base)
                .and_then(|rest| rest.strip_prefix('_'))
                .expect("<base>_<suffix>");
            assert_eq!(suffix.len(), 8);
            assert!(suffix.bytes().all(|b| b.is_ascii_alphanumeric()));
        }
        Err(IdError::Empty) => assert!(base.is_empty()),
        Err(IdError::ContainsColon(_)) => assert!(base.contains(':')),
        Err(IdError::ContainsWhitespace(_)) => {
            assert!(base.chars().any(char::is_whitespace))
        }
    }
}

/// A structured control (or data) message from the peer [`PEER_ID`], signed.
fn signed_message(secret: &SharedSecret, input: &mut Input, now: u64) -> pb::Message {
    let mut rng = ChaCha20Rng::seed_from_u64(u64::from(input.u16()));
    let token = secret.issue(PEER_ID, &key(0).public_key(), now, &mut rng);
    let source = Name::with_id("org", "ns", "alice", app_instance_id(PEER_ID));
    let known = [
        source.clone(),
        Name::with_id("org", "ns", "bob", 7),
        Name::with_id("org", "ns", "chan", 9),
    ];
    let destination = wire::pick_name(input, &known);
    let message_type = if input.chance(200) {
        i32::from(input.u8() % 16) + 5
    } else {
        wire::message_type(input)
    };
    let session = pb::SessionHeader {
        session_type: i32::from(input.u8() % 4),
        session_message_type: message_type,
        session_id: input.u32(),
        message_id: input.u32(),
    };
    let header = pb::SlimHeader {
        source: Some(source.to_pb()),
        destination: Some(wire::wire_name(input, &destination)),
        identity: token,
        fanout: input.pick(&[1, 256, 0, 2]),
        version: "3.4.6".into(),
        ttl: input.pick(&[8, 1, 0]),
        ..Default::default()
    };
    let content = wire::content(input, message_type, &known);
    let metadata = wire::metadata(input);
    let mut message = wire::publish(header, session, content, metadata);
    sign_control_message(&mut message, key(0)).expect("a publish with both headers");
    message
}

/// Sign, verify (also after a wire round trip), then change one thing and verify again.
fn control_round_trip(secret: &SharedSecret, input: &mut Input) {
    let now = NOW + u64::from(input.u8());
    let message = signed_message(secret, input, now);
    let verified = verify_control_message(&message, secret, now)
        .unwrap_or_else(|e| panic!("own signed message refused: {e:?}: {message:?}"));
    assert_eq!(verified.payload_sig, PayloadSigStatus::Verified);
    assert_eq!(verified.token.id, PEER_ID);
    assert_eq!(verified.token.pubkey, key(0).public_key());
    let decoded = pb::Message::decode(message.encode_to_vec().as_slice()).expect("decodes");
    assert!(verify_control_message(&decoded, secret, now).is_ok());

    let mut mutated = message.clone();
    let expect = mutate(&mut mutated, input);
    let outcome = verify_control_message(&mutated, secret, now);
    match expect {
        Expect::Refused if mutated != message => assert!(
            outcome.is_err(),
            "a change the signatures cover went unnoticed: {message:?} -> {mutated:?}"
        ),
        Expect::Refused => {}
        Expect::Accepted => assert!(
            matches!(&outcome, Ok(v) if v.payload_sig == PayloadSigStatus::Verified),
            "a change the signatures leave out was refused: {outcome:?}: {mutated:?}"
        ),
        Expect::Unsigned => assert!(
            matches!(&outcome, Ok(v) if v.payload_sig == PayloadSigStatus::Absent),
            "without its payload signature: {outcome:?}"
        ),
    }
    if let Err(error) = outcome {
        let _ = error.to_string();
        if let ControlVerifyError::SourceMismatch { expected, .. } = error {
            assert_eq!(expected, app_instance_id(PEER_ID));
        }
    }
}

enum Expect {
    Refused,
    Accepted,
    Unsigned,
}

fn publish_mut(message: &mut pb::Message) -> &mut pb::Publish {
    match message.message_type.as_mut() {
        Some(pb::message::MessageType::Publish(p)) => p,
        _ => unreachable!("built as a publish"),
    }
}

/// Changes one part of a signed message; says whether the signatures must notice.
fn mutate(message: &mut pb::Message, input: &mut Input) -> Expect {
    let op = input.u8();
    let flip = input.u32() | 1;
    let publish = publish_mut(message);
    let header = publish.header.as_mut().expect("built with one");
    let session = publish.session.as_mut().expect("built with one");
    match op % 24 {
        // Covered by the AAD (e2e header signature) or the token.
        0 => header.source = None,
        1 => {
            if let Some(e) = header.source.as_mut().and_then(|n| n.name.as_mut()) {
                e.component_2 ^= u64::from(flip);
            }
        }
        2 => {
            if let Some(id) = header
                .source
                .as_mut()
                .and_then(|n| n.name.as_mut())
                .and_then(|e| e.name_id.as_mut())
            {
                id.id_1 ^= u64::from(flip);
            }
        }
        3 => {
            if let Some(s) = header.source.as_mut().and_then(|n| n.str_name.as_mut()) {
                s.str_component_2.push('x');
            }
        }
        4 => header.destination = None,
        5 => {
            if let Some(e) = header.destination.as_mut().and_then(|n| n.name.as_mut()) {
                e.component_0 ^= u64::from(flip);
            } else {
                header.destination = Some(Name::new("a", "b", "c").to_pb());
            }
        }
        6 => {
            if let Some(s) = header
                .destination
                .as_mut()
                .and_then(|n| n.str_name.as_mut())
            {
                s.str_component_1.insert(0, 'y');
            } else {
                header.destination = Some(Name::new("a", "b", "c").to_pb());
            }
        }
        7 => {
            // Another valid token of the same peer: the AAD covers the identity field.
            let secret = SharedSecret::new(SECRET).expect("long enough");
            let mut rng = ChaCha20Rng::seed_from_u64(u64::from(flip));
            let token = secret.issue(PEER_ID, &key(0).public_key(), NOW + 300, &mut rng);
            if token == header.identity {
                return Expect::Accepted;
            }
            header.identity = token;
        }
        8 => header.identity.push('x'),
        9 => session.session_type ^= flip as i32,
        10 => session.session_message_type ^= flip as i32,
        11 => session.session_id ^= flip,
        12 => session.message_id ^= flip,
        13 => {
            if let Some(sig) = header.e2e_header_sig.as_mut() {
                let mut bytes = sig.to_vec();
                let at = flip as usize % bytes.len();
                bytes[at] ^= (flip >> 8) as u8 | 1;
                *sig = bytes.into();
            }
        }
        14 => header.e2e_header_sig = None,
        // Covered by the payload signature.
        15 => {
            // Any change to the content (none and an empty content encode alike).
            let before = publish.msg.clone().unwrap_or_default();
            let after = wire::app_content("msg", &flip.to_le_bytes());
            if before == after {
                return Expect::Accepted;
            }
            publish.msg = Some(after);
        }
        16 => {
            let key = format!("k{}", flip % 7);
            message.metadata.insert(key, "v".into());
        }
        17 => {
            let key = message
                .metadata
                .keys()
                .find(|k| !PAYLOAD_SIG_EXCLUDED_KEYS.contains(&k.as_str()))
                .cloned();
            match key {
                Some(key) if flip & 2 == 0 => {
                    message.metadata.remove(&key);
                }
                Some(key) => {
                    message.metadata.entry(key).or_default().push('!');
                }
                None => {
                    message.metadata.insert("new".into(), String::new());
                }
            }
        }
        18 => {
            let sig = message.metadata.entry(PAYLOAD_SIG_KEY.into()).or_default();
            let mut bytes = std::mem::take(sig).into_bytes();
            if bytes.is_empty() {
                bytes.push(b'A');
            } else {
                let at = flip as usize % bytes.len();
                bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
            }
            *sig = String::from_utf8(bytes).expect("ASCII");
        }
        19 => {
            message.metadata.remove(PAYLOAD_SIG_KEY);
            return Expect::Unsigned;
        }
        // Left out on purpose: what nodes rewrite, and tracing context.
        20 => {
            header.ttl ^= flip;
            header.fanout ^= flip >> 4;
            header.version.push('.');
            return Expect::Accepted;
        }
        21 => {
            header.recv_from = Some(u64::from(flip));
            header.forward_to = Some(u64::from(flip) + 1);
            header.incoming_conn = Some(7);
            header.header_mac = Some(vec![1; 32].into());
            return Expect::Accepted;
        }
        22 => {
            let key = PAYLOAD_SIG_EXCLUDED_KEYS[flip as usize % 3];
            message.metadata.insert(key.into(), format!("{flip:x}"));
            return Expect::Accepted;
        }
        _ => {
            header.error = Some(flip & 2 == 0);
            return Expect::Accepted;
        }
    }
    Expect::Refused
}

/// A decoded message: every check runs without panicking, and signing it makes it verify.
fn raw_message(secret: &SharedSecret, input: &mut Input) {
    let len = usize::from(input.u16() % 2048);
    let Ok(mut message) = pb::Message::decode(input.take(len)) else {
        return;
    };
    let now = fuzz_now(input);
    let pubkey = key(0).public_key();
    if let Ok(v) = verify_control_message(&message, secret, now) {
        // Only possible with a token of ours: the fuzzer cannot forge one.
        let source = match &message.message_type {
            Some(pb::message::MessageType::Publish(p)) => p.header.as_ref(),
            _ => None,
        }
        .and_then(|h| h.source.as_ref())
        .and_then(NameKey::from_pb);
        assert_eq!(source.map(|k| k.id), Some(v.token.app_instance_id()));
    }
    let _ = verify_payload(&message, &pubkey);
    let _ = message_signing_input(&message);
    let Some(pb::message::MessageType::Publish(publish)) = &message.message_type else {
        assert!(sign_control_message(&mut message, key(0)).is_err());
        return;
    };
    let _ = verify_e2e_header(publish, &pubkey).map_err(|e| e.to_string());
    let _ = payload_type(publish.msg.as_ref());
    let shaped = publish.header.is_some() && publish.session.is_some();
    if let (Some(header), Some(session)) = (&publish.header, &publish.session) {
        let aad = header_integrity_aad(header, session, payload_type(publish.msg.as_ref()));
        assert_eq!(publish_aad(publish).as_ref(), Ok(&aad));
        let _ = is_command_message(session.session_message_type);
        let _ = Mt::try_from(session.session_message_type);
    }
    match sign_control_message(&mut message, key(0)) {
        Ok(()) => {
            assert!(shaped);
            let Some(pb::message::MessageType::Publish(publish)) = &message.message_type else {
                unreachable!("still a publish");
            };
            verify_e2e_header(publish, &pubkey).expect("signed header verifies");
            verify_payload(&message, &pubkey).expect("signed payload verifies");
            let decoded = pb::Message::decode(message.encode_to_vec().as_slice()).expect("decodes");
            verify_payload(&decoded, &pubkey).expect("verifies after a round trip");
            assert!(verify_payload(&decoded, &key(1).public_key()).is_err());
        }
        Err(error) => {
            assert!(!shaped, "{error:?}");
        }
    }
}
