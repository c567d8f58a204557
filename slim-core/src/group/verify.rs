//! Credential validation, as the reference's `SlimIdentityProvider` does it (spec §4.7): the
//! Basic credential's identity is a token that must verify, and its `pubkey` claim must equal
//! the leaf's signature key.

use openmls::prelude::{Credential, CredentialType};

use crate::identity::VerifiedToken;

/// The error a token verifier reports (its own type, boxed).
pub type VerifyError = Box<dyn std::error::Error + Send + Sync>;

/// Where a credential being checked comes from, so a verifier can apply its own policy (e.g.
/// accept an expired token of a member that joined long ago; the reference checks every
/// credential the same way).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CredentialContext {
    /// A key package we are about to add, or an Add in a commit we received.
    NewMember,
    /// The new leaf of a committer's update path.
    CommitterUpdate,
    /// A member already in the tree of a group we join.
    ExistingMember,
}

/// Checks identity tokens found in MLS credentials.
///
/// Any `Fn(&str) -> Result<VerifiedToken, E>` is one, e.g.
/// `|t: &str| secret.verify(t, now_unix)` with a [`crate::identity::SharedSecret`].
pub trait CredentialVerifier {
    fn verify_token(
        &self,
        token: &str,
        context: CredentialContext,
    ) -> Result<VerifiedToken, VerifyError>;
}

impl<F, E> CredentialVerifier for F
where
    F: Fn(&str) -> Result<VerifiedToken, E>,
    E: Into<VerifyError>,
{
    fn verify_token(
        &self,
        token: &str,
        _context: CredentialContext,
    ) -> Result<VerifiedToken, VerifyError> {
        self(token).map_err(Into::into)
    }
}

/// Why a credential was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialError {
    #[error("credential is not Basic")]
    NotBasic,
    #[error("credential identity is not UTF-8")]
    NotUtf8,
    #[error("credential token does not verify: {0}")]
    Token(VerifyError),
    /// The token verified but names another key than the one that signs for the leaf.
    #[error("the token's pubkey claim is not the leaf's signature key")]
    PubkeyMismatch,
}

/// The token in a credential, unverified (for display and sender lookups).
pub(crate) fn credential_token(credential: &Credential) -> Result<String, CredentialError> {
    // A Basic credential's content is the identity itself (RFC 9420 §5.3).
    if credential.credential_type() != CredentialType::Basic {
        return Err(CredentialError::NotBasic);
    }
    String::from_utf8(credential.serialized_content().to_vec())
        .map_err(|_| CredentialError::NotUtf8)
}

/// Validates one credential with its leaf's signature key.
pub(crate) fn validate_credential(
    verifier: &dyn CredentialVerifier,
    credential: &Credential,
    signature_key: &[u8],
    context: CredentialContext,
) -> Result<VerifiedToken, CredentialError> {
    let token = credential_token(credential)?;
    let verified = verifier
        .verify_token(&token, context)
        .map_err(CredentialError::Token)?;
    if verified.pubkey != signature_key {
        return Err(CredentialError::PubkeyMismatch);
    }
    Ok(verified)
}
