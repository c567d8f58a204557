//! Group configuration.

use openmls::prelude::{
    Ciphersuite, SenderRatchetConfiguration, WireFormatPolicy, MIXED_PLAINTEXT_WIRE_FORMAT_POLICY,
};

use super::crypto::CryptoBackend;
use super::storage::StorageMode;

/// The MLS ciphersuites SLIM uses (spec §4.7).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum MlsSuite {
    /// 0x0002 `MLS_128_DHKEMP256_AES128GCM_SHA256_P256`: the reference default.
    #[default]
    P256Aes128,
    /// 0x0001 `MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519`: reference `curve25519` builds.
    X25519Aes128,
}

impl MlsSuite {
    /// The RFC 9420 code point.
    pub fn code(self) -> u16 {
        match self {
            Self::P256Aes128 => 0x0002,
            Self::X25519Aes128 => 0x0001,
        }
    }

    /// The suite for an RFC 9420 code point, if SLIM speaks it.
    pub fn from_code(code: u16) -> Option<Self> {
        match code {
            0x0002 => Some(Self::P256Aes128),
            0x0001 => Some(Self::X25519Aes128),
            _ => None,
        }
    }

    pub(crate) fn openmls(self) -> Ciphersuite {
        match self {
            Self::P256Aes128 => Ciphersuite::MLS_128_DHKEMP256_AES128GCM_SHA256_P256,
            Self::X25519Aes128 => Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519,
        }
    }
}

/// How our own signatures are made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SignatureMode {
    /// ring: fast, but ECDSA nonces come from the OS, so signature bytes differ between runs.
    #[default]
    Fast,
    /// RustCrypto with RFC 6979 nonces: reproducible bytes for simulation, ~10× slower for P-256.
    /// (Ed25519 is deterministic either way.)
    Deterministic,
}

/// Settings of one group member. [`GroupConfig::default`] is what interoperates with reference
/// peers; only `seed` should differ between members.
#[derive(Clone, Debug)]
pub struct GroupConfig {
    /// Ciphersuite; the identity's key must match it.
    pub suite: MlsSuite,
    /// Crypto implementation ([`CryptoBackend::Ring`] is the fast one).
    pub backend: CryptoBackend,
    /// How our signatures are made.
    pub signatures: SignatureMode,
    /// What openmls's storage keeps ([`StorageMode::Lean`]: nothing it does not read back).
    pub storage: StorageMode,
    /// Seed of openmls's random generator (group ids, secrets, key-package keys).
    pub seed: [u8; 32],
    /// Epochs whose application secrets are kept after a commit, so messages sent just before
    /// a commit still decrypt after it (count-based, never time-based).
    pub max_past_epochs: usize,
    /// How many generations behind the newest one a sender's application message may arrive
    /// (reordering tolerance of the sender ratchet).
    pub out_of_order_tolerance: u32,
    /// How many generations ahead of the newest one a message may jump (lost messages).
    pub maximum_forward_distance: u32,
    /// Commits received ahead of their turn that are kept (by `commit_id`) until the gap fills.
    pub max_buffered_commits: usize,
    /// Validity of our key packages from now, in seconds; openmls back-dates `not_before` by
    /// one hour (the reference: 60 s), which also covers peers whose clocks run behind.
    pub key_package_lifetime_secs: u64,
}

impl Default for GroupConfig {
    fn default() -> Self {
        Self {
            suite: MlsSuite::default(),
            backend: CryptoBackend::default(),
            signatures: SignatureMode::default(),
            storage: StorageMode::default(),
            seed: [0; 32],
            max_past_epochs: 3,
            out_of_order_tolerance: 512,
            maximum_forward_distance: 4096,
            max_buffered_commits: 64,
            // openmls's default (12 weeks), within what it accepts for leaf nodes.
            key_package_lifetime_secs: 60 * 60 * 24 * 28 * 3,
        }
    }
}

impl GroupConfig {
    /// The default configuration with another seed.
    pub fn with_seed(seed: [u8; 32]) -> Self {
        Self {
            seed,
            ..Self::default()
        }
    }

    pub(crate) fn sender_ratchet(&self) -> SenderRatchetConfiguration {
        SenderRatchetConfiguration::new(self.out_of_order_tolerance, self.maximum_forward_distance)
    }

    /// Handshakes go out as PublicMessage (mls-rs's default, which reference peers expect);
    /// both framings are accepted in.
    pub(crate) fn wire_format_policy() -> WireFormatPolicy {
        MIXED_PLAINTEXT_WIRE_FORMAT_POLICY
    }
}
