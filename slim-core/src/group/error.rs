//! Typed errors of the group core, one enum per operation.
//!
//! Errors caused by peer bytes are also counted in [`super::GroupStats`] and never leave the
//! group in a different state than before the call.

use super::config::MlsSuite;
use super::verify::CredentialError;

/// Creating a group or a key package failed (local misconfiguration or a library fault).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// The identity's key cannot sign for the configured ciphersuite.
    #[error("the identity's key does not fit ciphersuite {0:?}")]
    KeyDoesNotFitSuite(MlsSuite),
    #[error("signature key rejected: {0}")]
    Key(#[from] super::signer::IdentityKeyError),
    #[error("openmls: {0}")]
    Library(String),
}

/// A key package received from a peer (JOIN_REPLY, REJOIN_REQUEST) was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyPackageError {
    #[error("not a TLS-encoded MLSMessage")]
    Malformed,
    #[error("the MLSMessage is not a KeyPackage")]
    NotAKeyPackage,
    #[error("key package ciphersuite 0x{got:04x}, group uses 0x{expected:04x}")]
    WrongSuite { expected: u16, got: u16 },
    /// A signature, the protocol version, or the key-package shape is invalid.
    #[error("invalid key package: {0}")]
    Invalid(String),
    /// Outside its lifetime by our clock. openmls applies no skew here; a peer whose clock is
    /// ahead may be retried after `not_before`.
    #[error("key package lifetime not valid now: {0}")]
    Lifetime(String),
    #[error("key package credential: {0}")]
    Credential(#[from] CredentialError),
}

/// Building a commit, or applying one received from the moderator, failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommitError {
    #[error(transparent)]
    KeyPackage(#[from] KeyPackageError),
    #[error("no member with that identity or leaf")]
    UnknownMember,
    /// We were removed from the group: no more commits apply.
    #[error("we are not a member of the group any more")]
    NotAMember,
    #[error("not a TLS-encoded MLSMessage")]
    Malformed,
    #[error("the MLSMessage is not a commit")]
    NotACommit,
    #[error("the commit is for another group")]
    WrongGroup,
    /// The commit was made in another epoch than ours (a replay, or a desynchronised sender).
    #[error("commit for epoch {got}, group is at epoch {expected}")]
    WrongEpoch { expected: u64, got: u64 },
    /// A credential added or updated by the commit was refused.
    #[error("commit carries a refused credential: {0}")]
    Credential(#[from] CredentialError),
    /// openmls refused the commit (signature, membership tag, confirmation tag, tree).
    #[error("commit rejected: {0}")]
    Rejected(String),
    /// The commit came early and the reorder buffer is full.
    #[error("commit {commit_id} is ahead of {next} and the reorder buffer is full")]
    BufferFull { commit_id: u32, next: u32 },
    /// The commit-id counter would wrap.
    #[error("commit ids exhausted")]
    CommitIdsExhausted,
    #[error("openmls: {0}")]
    Library(String),
}

/// A welcome was refused; the [`super::PendingJoin`] stays usable (unless `AlreadyJoined`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JoinError {
    #[error("not a TLS-encoded MLSMessage")]
    Malformed,
    #[error("the MLSMessage is not a Welcome")]
    NotAWelcome,
    /// None of the welcome's secrets is encrypted to our key package.
    #[error("the welcome is for another member")]
    NotForUs,
    #[error("welcome ciphersuite 0x{got:04x}, we use 0x{expected:04x}")]
    WrongSuite { expected: u16, got: u16 },
    #[error("member at leaf {leaf} has a refused credential: {error}")]
    Credential { leaf: u32, error: CredentialError },
    /// openmls refused the welcome (group info signature, tree, secrets).
    #[error("welcome rejected: {0}")]
    Rejected(String),
    #[error("this pending join already produced a group")]
    AlreadyJoined,
}

/// An application message could not be encrypted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EncryptError {
    #[error("we are not a member of the group any more")]
    NotAMember,
    #[error("openmls: {0}")]
    Library(String),
}

/// A received application message was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecryptError {
    #[error("not a TLS-encoded MLSMessage")]
    Malformed,
    #[error("the MLSMessage is not a PrivateMessage")]
    NotPrivateMessage,
    #[error("the PrivateMessage is not an application message")]
    NotApplication,
    #[error("the message is for another group")]
    WrongGroup,
    /// From an epoch we have not reached (or from after our removal).
    #[error("message for future epoch {got}, group is at epoch {current}")]
    FutureEpoch { current: u64, got: u64 },
    /// From an epoch whose secrets were already deleted (older than `max_past_epochs`).
    #[error("message for epoch {got}, too old for epoch {current}")]
    EpochTooOld { current: u64, got: u64 },
    /// Decryption, or the sender's signature, failed: altered bytes or a forged sender.
    #[error("ciphertext does not authenticate")]
    Tampered,
    /// The generation was already used (a replay) or is outside the reorder window.
    #[error("generation already used or outside the ratchet window: {0}")]
    Generation(String),
    #[error("we are not a member of the group any more")]
    NotAMember,
    #[error("message rejected: {0}")]
    Rejected(String),
}
