//! Application identity: who sent a session message, checked end to end (spec §5, §1.10, §12).
//!
//! Nodes never look at any of this; receiving apps do, and reference peers drop control
//! messages that fail these checks (discovery requests are always checked). Everything must
//! therefore match the reference byte for byte:
//!
//! * [`SharedSecret`] issues and verifies the identity token every message carries in
//!   `SlimHeader.identity`: `"<id>:<ts>:<nonce>:<claims>:<mac>"`, HMAC-SHA256 with a secret
//!   shared by all apps. Its `pubkey` claim is the sender's [`SigningKey`].
//! * [`header_integrity_aad`] builds the `HeaderIntegrityAad` that the `e2e_header_sig`
//!   ([`sign_e2e_header`], [`verify_e2e_header`]) and the MLS authenticated data cover.
//! * [`payload_signing_input`] / [`sign_payload`] / [`verify_payload`]: the `slim-payload-sig`
//!   metadata signature over AAD, payload and metadata.
//! * [`sign_control_message`] / [`verify_control_message`] do all of it for one message.
//!
//! Sans-IO: time comes in as unix seconds (`now_unix`) and randomness as a caller's RNG.
//! Signing is deterministic (RFC 6979), so one seed gives the same tokens and signatures.

mod control;
mod header;
mod payload_sig;
mod signing;
mod token;

pub use control::{
    sign_control_message, verify_control_message, ControlVerifyError, PayloadSigStatus,
    VerifiedControl,
};
pub use header::{
    header_integrity_aad, is_command_message, payload_type, publish_aad, sign_e2e_header,
    verify_e2e_header, E2eHeaderError, MessageShapeError, HEADER_INTEGRITY_AAD_VERSION,
};
pub use payload_sig::{
    message_signing_input, payload_signing_input, sign_payload, verify_payload, PayloadSigError,
    PAYLOAD_SIG_DOMAIN, PAYLOAD_SIG_EXCLUDED_KEYS, PAYLOAD_SIG_KEY,
};
pub use signing::{
    verify_signature, KeyError, SignatureError, SigningKey, PUBLIC_KEY_LEN, SECRET_KEY_LEN,
};
pub use token::{
    claims_field, new_identity_id, ClaimsError, IdError, KnownSender, SecretError, SenderMemo,
    SharedSecret, TokenError, VerifiedToken, MIN_SECRET_LEN, TOKEN_CLOCK_SKEW_SECS,
    TOKEN_VALIDITY_SECS,
};
