//! `HeaderIntegrityAad` and the end-to-end header signature (spec §1.10).
//!
//! The AAD binds what the node must not be able to change without detection (names, identity,
//! session header, payload type) and leaves out what it legitimately rewrites (ttl, header_mac,
//! incoming_conn, recv_from/forward_to). The same bytes are the MLS `authenticated_data` of
//! application messages (spec §4.7) and the first part of the payload signature (§12).

use prost::Message as _;
use slim_proto::pb;

use super::signing::{verify_signature, SignatureError, SigningKey};

/// The only `HeaderIntegrityAad.version` in use.
pub const HEADER_INTEGRITY_AAD_VERSION: u32 = 1;

/// Why a message cannot carry (or be checked for) end-to-end signatures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MessageShapeError {
    #[error("not a Publish message")]
    NotAPublish,
    #[error("the Publish has no SLIM header")]
    MissingSlimHeader,
    #[error("the Publish has no session header")]
    MissingSessionHeader,
}

/// Why an `e2e_header_sig` did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum E2eHeaderError {
    #[error(transparent)]
    Shape(#[from] MessageShapeError),
    #[error("the header has no e2e_header_sig")]
    MissingSignature,
    #[error("e2e_header_sig: {0}")]
    Signature(#[from] SignatureError),
}

/// True for the session control ("command") message types 5..=20, the ones real clients sign.
/// Data (`MSG`, `MSG_ACK`) and retransmission (`RTX_*`) messages carry no signatures.
pub fn is_command_message(session_message_type: i32) -> bool {
    (pb::SessionMessageType::DiscoveryRequest as i32..=pb::SessionMessageType::RejoinReply as i32)
        .contains(&session_message_type)
}

/// The AAD's `payload_type`: the application payload's type, `""` for command payloads and
/// for a missing payload (as the reference builds it).
pub fn payload_type(content: Option<&pb::Content>) -> &str {
    match content.and_then(|c| c.content_type.as_ref()) {
        Some(pb::content::ContentType::AppPayload(app)) => &app.payload_type,
        _ => "",
    }
}

/// Builds the AAD from a header as it is on the wire (the identity token must already be set).
///
/// Enum fields are copied as raw numbers so an unknown value a peer sent still round-trips into
/// the exact bytes it signed.
pub fn header_integrity_aad(
    header: &pb::SlimHeader,
    session: &pb::SessionHeader,
    payload_type: &str,
) -> pb::HeaderIntegrityAad {
    pb::HeaderIntegrityAad {
        version: HEADER_INTEGRITY_AAD_VERSION,
        source: header.source.clone(),
        destination: header.destination.clone(),
        identity: header.identity.clone(),
        session_type: session.session_type,
        session_message_type: session.session_message_type,
        session_id: session.session_id,
        message_id: session.message_id,
        payload_type: payload_type.to_owned(),
    }
}

/// The AAD of a Publish, with the payload type taken from its content.
pub fn publish_aad(publish: &pb::Publish) -> Result<pb::HeaderIntegrityAad, MessageShapeError> {
    let header = publish
        .header
        .as_ref()
        .ok_or(MessageShapeError::MissingSlimHeader)?;
    let session = publish
        .session
        .as_ref()
        .ok_or(MessageShapeError::MissingSessionHeader)?;
    Ok(header_integrity_aad(
        header,
        session,
        payload_type(publish.msg.as_ref()),
    ))
}

/// Sets `e2e_header_sig` over the prost encoding of the Publish's AAD.
///
/// Call after the identity token is in the header and before MLS encryption (which reuses the
/// AAD): the signature covers the identity.
pub fn sign_e2e_header(
    publish: &mut pb::Publish,
    key: &SigningKey,
) -> Result<(), MessageShapeError> {
    let aad = publish_aad(publish)?.encode_to_vec();
    let signature = key.sign(&aad);
    if let Some(header) = publish.header.as_mut() {
        header.e2e_header_sig = Some(signature.into());
    }
    Ok(())
}

/// Checks a Publish's `e2e_header_sig` with the sender's public key (from its verified token).
pub fn verify_e2e_header(publish: &pb::Publish, pubkey: &[u8]) -> Result<(), E2eHeaderError> {
    let aad = publish_aad(publish)?.encode_to_vec();
    let signature = publish
        .header
        .as_ref()
        .and_then(|h| h.e2e_header_sig.as_ref())
        .ok_or(E2eHeaderError::MissingSignature)?;
    verify_signature(pubkey, &aad, signature)?;
    Ok(())
}
