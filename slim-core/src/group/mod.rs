//! MLS (RFC 9420) group core over openmls, wire-compatible with reference SLIM peers (mls-rs 0.54).
//!
//! One [`GroupCore`] per MLS-enabled session (spec §4.4–§4.7):
//!
//! ```text
//! participant                                moderator
//! GroupCore::key_package(id, cfg)  ── JOIN_REPLY{key_package} ──▶  GroupCore::create(id, cfg)
//!                                                                   add_member(kp, verifier)
//!                                   ◀── GROUP_WELCOME{commit_id, welcome}   (+ GROUP_UPDATE{commit_id, commit} to the others)
//! PendingJoin::join(welcome, commit_id, verifier)                   other members: handle_commit(commit_id, commit, verifier)
//! encrypt(plaintext, aad) / decrypt(bytes)  ◀──── MSG blobs ────▶  encrypt / decrypt
//! ```
//!
//! See [`GroupCore`] for the contract (Sans-IO limits, framing, ordering, identity checks).
//!
//! Crypto: [`CryptoBackend::Ring`] (default) runs hashing, HKDF, AEAD and signature
//! verification on `ring` and delegates HPKE to `openmls_rust_crypto`, because `ring` cannot do
//! static-key ECDH; [`CryptoBackend::RustCrypto`] is `openmls_rust_crypto` unchanged. Members
//! using different backends interoperate (the wire bytes are standard). Signatures: the P-256
//! signer runs on `ring` ([`SignatureMode::Fast`]) or on our RFC 6979 [`crate::identity::SigningKey`]
//! ([`SignatureMode::Deterministic`]). openmls's storage is [`LeanStorage`]: it keeps only what
//! openmls reads back while running, so no group state is serialised per message (groups cannot
//! be persisted).
//!
//! Interop (`tests/mls_group.rs`): end to end with mls-rs 0.54 (the reference's MLS library,
//! configured like the reference and with its credential rules) in both roles and both
//! ciphersuites: joins from each other's welcomes, commits (add, remove with path, re-add),
//! application messages with authenticated data both ways, equal epoch authenticators. Against
//! captured slim-bindings 3.3.8 traffic: the captured key packages validate and can be added,
//! KeyPackageRefs match the captured welcomes, and the commit / PrivateMessage framing and
//! authenticated data are read as the reference wrote them.
//!
//! Threads: openmls parallelises commit-path work on rayon's global pool (not optional in
//! openmls 0.9); drivers that must bound threads set `RAYON_NUM_THREADS` or build the global pool
//! themselves before the first commit.

mod config;
mod core;
mod crypto;
mod error;
mod signer;
mod storage;
mod verify;
pub mod wire;

pub use self::config::{GroupConfig, MlsSuite, SignatureMode};
pub use self::core::{
    validate_key_package, AppliedCommit, CommitOut, CommitOutcome, Decrypted, GroupCore,
    GroupStats, MemberInfo, PendingJoin, ValidatedKeyPackage,
};
pub use self::crypto::{CryptoBackend, RandError, RingCrypto, SeededRand};
pub use self::error::{
    CommitError, DecryptError, EncryptError, JoinError, KeyPackageError, SetupError,
};
pub use self::signer::{ed25519_public_key, IdentityKeyError, MlsIdentity, ED25519_KEY_LEN};
pub use self::storage::{LeanStorage, StorageMode};
pub use self::verify::{CredentialContext, CredentialError, CredentialVerifier, VerifyError};
