//! The `slim-payload-sig` metadata signature of control messages (spec §12, session ≥ 0.7.20).
//!
//! The e2e header signature leaves the payload and the metadata unprotected; this one covers
//! both, so a node cannot alter a JoinRequest's settings or a GroupUpdate's participant list.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use prost::Message as _;
use slim_proto::pb;

use super::header::{publish_aad, MessageShapeError};
use super::signing::{verify_signature, SignatureError, SigningKey};

/// Metadata key that carries the signature, as base64 (standard, padded) of the DER bytes.
pub const PAYLOAD_SIG_KEY: &str = "slim-payload-sig";
/// Domain-separation prefix of the signing input.
pub const PAYLOAD_SIG_DOMAIN: &[u8] = b"slim-payload-v1";
/// Metadata keys left out of the signing input: tracing context that hops may rewrite, and the
/// signature itself.
///
/// The reference also leaves out a "peer subject" key whose name spec §12 does not give; no
/// captured 3.3.8 message carries it.
pub const PAYLOAD_SIG_EXCLUDED_KEYS: [&str; 4] =
    ["traceparent", "tracestate", "baggage", PAYLOAD_SIG_KEY];

/// Why a `slim-payload-sig` did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PayloadSigError {
    #[error(transparent)]
    Shape(#[from] MessageShapeError),
    #[error("no {PAYLOAD_SIG_KEY} metadata")]
    Missing,
    #[error("{PAYLOAD_SIG_KEY} is not standard base64")]
    NotBase64,
    #[error("{PAYLOAD_SIG_KEY}: {0}")]
    Signature(#[from] SignatureError),
}

/// The bytes the payload signature covers:
/// `"slim-payload-v1" || u64be len || aad || u64be len || prost(content)` followed, for each
/// metadata entry in byte order of its key and not in [`PAYLOAD_SIG_EXCLUDED_KEYS`], by
/// `u64be len || key || u64be len || value`.
///
/// Sorting makes the input independent of map order, which matters because nodes reorder
/// metadata when they forward a message. A missing content encodes as empty bytes.
pub fn payload_signing_input<K, V>(
    aad: &[u8],
    content: Option<&pb::Content>,
    metadata: impl IntoIterator<Item = (K, V)>,
) -> Vec<u8>
where
    K: AsRef<str>,
    V: AsRef<str>,
{
    let content = content.map(|c| c.encode_to_vec()).unwrap_or_default();
    let mut entries: Vec<(K, V)> = metadata
        .into_iter()
        .filter(|(k, _)| !PAYLOAD_SIG_EXCLUDED_KEYS.contains(&k.as_ref()))
        .collect();
    entries.sort_by(|(a, _), (b, _)| a.as_ref().cmp(b.as_ref()));

    let mut out = Vec::with_capacity(PAYLOAD_SIG_DOMAIN.len() + 16 + aad.len() + content.len());
    out.extend_from_slice(PAYLOAD_SIG_DOMAIN);
    push_field(&mut out, aad);
    push_field(&mut out, &content);
    for (key, value) in &entries {
        push_field(&mut out, key.as_ref().as_bytes());
        push_field(&mut out, value.as_ref().as_bytes());
    }
    out
}

fn push_field(out: &mut Vec<u8>, field: &[u8]) {
    // usize -> u64 is lossless on every supported target.
    out.extend_from_slice(&(field.len() as u64).to_be_bytes());
    out.extend_from_slice(field);
}

fn publish_of(msg: &pb::Message) -> Result<&pb::Publish, MessageShapeError> {
    match &msg.message_type {
        Some(pb::message::MessageType::Publish(p)) => Ok(p),
        _ => Err(MessageShapeError::NotAPublish),
    }
}

/// The signing input of a whole message (its AAD, content and metadata).
pub fn message_signing_input(msg: &pb::Message) -> Result<Vec<u8>, MessageShapeError> {
    let publish = publish_of(msg)?;
    let aad = publish_aad(publish)?.encode_to_vec();
    Ok(payload_signing_input(
        &aad,
        publish.msg.as_ref(),
        &msg.metadata,
    ))
}

/// Sets the `slim-payload-sig` metadata entry. Call last: any metadata added afterwards (other
/// than tracing keys) breaks the signature.
pub fn sign_payload(msg: &mut pb::Message, key: &SigningKey) -> Result<(), MessageShapeError> {
    let input = message_signing_input(msg)?;
    let signature = STANDARD.encode(key.sign(&input));
    msg.metadata.insert(PAYLOAD_SIG_KEY.to_owned(), signature);
    Ok(())
}

/// Checks the `slim-payload-sig` entry with the sender's public key.
pub fn verify_payload(msg: &pb::Message, pubkey: &[u8]) -> Result<(), PayloadSigError> {
    let input = message_signing_input(msg)?;
    let encoded = msg
        .metadata
        .get(PAYLOAD_SIG_KEY)
        .ok_or(PayloadSigError::Missing)?;
    let signature = STANDARD
        .decode(encoded)
        .map_err(|_| PayloadSigError::NotBase64)?;
    verify_signature(pubkey, &input, &signature)?;
    Ok(())
}
