//! Signing and checking a whole control message: what a session core does with the pieces above.

use slim_proto::{pb, NameKey};

use super::header::{sign_e2e_header, verify_e2e_header, E2eHeaderError, MessageShapeError};
use super::payload_sig::{sign_payload, verify_payload, PayloadSigError, PAYLOAD_SIG_KEY};
use super::signing::SigningKey;
use super::token::{SharedSecret, TokenError, VerifiedToken};

/// Why a control message's sender could not be authenticated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ControlVerifyError {
    #[error(transparent)]
    Shape(#[from] MessageShapeError),
    #[error("identity token: {0}")]
    Token(#[from] TokenError),
    /// The source name's instance id is not the one derived from the token's id, so the sender
    /// speaks under a name that is not theirs (reference "identity binding").
    #[error("source instance id {found:?} is not {expected:#034x}, the one of the token id")]
    SourceMismatch { expected: u128, found: Option<u128> },
    #[error(transparent)]
    E2eHeader(#[from] E2eHeaderError),
    #[error(transparent)]
    PayloadSig(#[from] PayloadSigError),
}

/// Whether the message carried a payload signature; the caller decides whether its absence is
/// acceptable (clients before session 0.7.20 do not send one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PayloadSigStatus {
    Verified,
    Absent,
}

/// The authenticated sender of a control message.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedControl {
    pub token: VerifiedToken,
    pub payload_sig: PayloadSigStatus,
}

/// Adds both end-to-end signatures to a control (command) message the way 3.x clients do: the
/// `e2e_header_sig` over the AAD, then the `slim-payload-sig` metadata.
///
/// The header's identity token and all other metadata must already be set.
pub fn sign_control_message(
    msg: &mut pb::Message,
    key: &SigningKey,
) -> Result<(), MessageShapeError> {
    match &mut msg.message_type {
        Some(pb::message::MessageType::Publish(publish)) => sign_e2e_header(publish, key)?,
        _ => return Err(MessageShapeError::NotAPublish),
    }
    sign_payload(msg, key)
}

/// Authenticates a received control message at `now_unix`: the header's token against `secret`,
/// the source instance id against the token id, the `e2e_header_sig`, and the `slim-payload-sig`
/// when present (a present but wrong one is an error).
///
/// Never panics on peer input; every failure is a typed error the caller counts and drops.
pub fn verify_control_message(
    msg: &pb::Message,
    secret: &SharedSecret,
    now_unix: u64,
) -> Result<VerifiedControl, ControlVerifyError> {
    let publish = match &msg.message_type {
        Some(pb::message::MessageType::Publish(p)) => p,
        _ => return Err(MessageShapeError::NotAPublish.into()),
    };
    let header = publish
        .header
        .as_ref()
        .ok_or(MessageShapeError::MissingSlimHeader)?;
    let token = secret.verify(&header.identity, now_unix)?;

    let expected = token.app_instance_id();
    let found = header
        .source
        .as_ref()
        .and_then(NameKey::from_pb)
        .map(|key| key.id);
    if found != Some(expected) {
        return Err(ControlVerifyError::SourceMismatch { expected, found });
    }

    verify_e2e_header(publish, &token.pubkey)?;
    let payload_sig = if msg.metadata.contains_key(PAYLOAD_SIG_KEY) {
        verify_payload(msg, &token.pubkey)?;
        PayloadSigStatus::Verified
    } else {
        PayloadSigStatus::Absent
    };
    Ok(VerifiedControl { token, payload_sig })
}
