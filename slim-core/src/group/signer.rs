//! The app's MLS identity: its token (the Basic credential) and its signature key.

use openmls_traits::signatures::{Signer, SignerError};
use openmls_traits::types::SignatureScheme;
use ring::signature::{self as ring_sig, KeyPair as _};

use crate::identity::SigningKey;

use super::config::{MlsSuite, SignatureMode};

/// Length of an Ed25519 seed (the secret key) and public key.
pub const ED25519_KEY_LEN: usize = 32;

/// Why key material cannot make an MLS identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityKeyError {
    #[error("ring rejected the key: {0}")]
    Rejected(String),
}

#[derive(Clone)]
enum KeyMaterial {
    P256(SigningKey),
    Ed25519([u8; ED25519_KEY_LEN]),
}

/// Who we are in MLS groups: the identity token carried whole as the Basic credential's
/// identity (spec §4.7), and the signature key whose public half is the token's `pubkey` claim.
///
/// * Suite 0x0002 (the default) needs a P-256 key: [`MlsIdentity::p256`] with the app's
///   [`SigningKey`] (the same key that signs e2e headers and payloads).
/// * Suite 0x0001 needs an Ed25519 key (reference `curve25519` builds): [`MlsIdentity::ed25519`].
#[derive(Clone)]
pub struct MlsIdentity {
    token: String,
    key: KeyMaterial,
}

impl std::fmt::Debug for MlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MlsIdentity")
            .field("token", &self.token)
            .field("scheme", &self.scheme())
            .finish_non_exhaustive()
    }
}

impl MlsIdentity {
    /// A P-256 identity (ciphersuite 0x0002). `token`'s `pubkey` claim must be
    /// `key.public_key()`, or peers reject our key packages.
    pub fn p256(token: impl Into<String>, key: SigningKey) -> Self {
        Self {
            token: token.into(),
            key: KeyMaterial::P256(key),
        }
    }

    /// An Ed25519 identity (ciphersuite 0x0001) from its 32-byte seed. `token`'s `pubkey` claim
    /// must be [`ed25519_public_key`]`(&seed)`.
    pub fn ed25519(
        token: impl Into<String>,
        seed: [u8; ED25519_KEY_LEN],
    ) -> Result<Self, IdentityKeyError> {
        ed25519_public_key(&seed)?;
        Ok(Self {
            token: token.into(),
            key: KeyMaterial::Ed25519(seed),
        })
    }

    /// The identity token (the credential's identity bytes).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The signature public key: uncompressed SEC1 (65 bytes) or Ed25519 (32 bytes).
    pub fn public_key(&self) -> Vec<u8> {
        match &self.key {
            KeyMaterial::P256(key) => key.public_key().to_vec(),
            // The seed was checked in the constructor.
            KeyMaterial::Ed25519(seed) => ed25519_public_key(seed)
                .map(|k| k.to_vec())
                .unwrap_or_default(),
        }
    }

    pub(crate) fn scheme(&self) -> SignatureScheme {
        match self.key {
            KeyMaterial::P256(_) => SignatureScheme::ECDSA_SECP256R1_SHA256,
            KeyMaterial::Ed25519(_) => SignatureScheme::ED25519,
        }
    }

    /// Whether this key can sign for `suite`.
    pub fn supports(&self, suite: MlsSuite) -> bool {
        self.scheme() == suite.openmls().signature_algorithm()
    }

    pub(crate) fn signer(&self, mode: SignatureMode) -> Result<MlsSigner, IdentityKeyError> {
        let inner = match (&self.key, mode) {
            (KeyMaterial::P256(key), SignatureMode::Fast) => {
                let rng = ring::rand::SystemRandom::new();
                let pair = ring_sig::EcdsaKeyPair::from_private_key_and_public_key(
                    &ring_sig::ECDSA_P256_SHA256_ASN1_SIGNING,
                    &key.secret_scalar(),
                    &key.public_key(),
                    &rng,
                )
                .map_err(|e| IdentityKeyError::Rejected(e.to_string()))?;
                SignerInner::P256Ring { pair, rng }
            }
            (KeyMaterial::P256(key), SignatureMode::Deterministic) => {
                SignerInner::P256Deterministic(key.clone())
            }
            (KeyMaterial::Ed25519(seed), _) => SignerInner::Ed25519(
                ring_sig::Ed25519KeyPair::from_seed_unchecked(seed)
                    .map_err(|e| IdentityKeyError::Rejected(e.to_string()))?,
            ),
        };
        Ok(MlsSigner(inner))
    }
}

/// The Ed25519 public key for a seed (what a 0x0001 token's `pubkey` claim carries).
pub fn ed25519_public_key(
    seed: &[u8; ED25519_KEY_LEN],
) -> Result<[u8; ED25519_KEY_LEN], IdentityKeyError> {
    let pair = ring_sig::Ed25519KeyPair::from_seed_unchecked(seed)
        .map_err(|e| IdentityKeyError::Rejected(e.to_string()))?;
    let mut out = [0u8; ED25519_KEY_LEN];
    out.copy_from_slice(pair.public_key().as_ref());
    Ok(out)
}

enum SignerInner {
    /// ring ECDSA: fast, nonces from the OS (not reproducible).
    P256Ring {
        pair: ring_sig::EcdsaKeyPair,
        rng: ring::rand::SystemRandom,
    },
    /// RustCrypto ECDSA with RFC 6979 nonces: same key and message, same signature.
    P256Deterministic(SigningKey),
    /// Ed25519 is deterministic by construction.
    Ed25519(ring_sig::Ed25519KeyPair),
}

/// openmls [`Signer`] over our key. Signatures are what the reference produces: DER
/// ECDSA-P256-SHA256 or raw 64-byte Ed25519 over openmls's labelled `SignContent`.
pub(crate) struct MlsSigner(SignerInner);

impl Signer for MlsSigner {
    fn sign(&self, payload: &[u8]) -> Result<Vec<u8>, SignerError> {
        match &self.0 {
            SignerInner::P256Ring { pair, rng } => pair
                .sign(rng, payload)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| SignerError::SigningError),
            SignerInner::P256Deterministic(key) => Ok(key.sign(payload)),
            SignerInner::Ed25519(pair) => Ok(pair.sign(payload).as_ref().to_vec()),
        }
    }

    fn signature_scheme(&self) -> SignatureScheme {
        match self.0 {
            SignerInner::P256Ring { .. } | SignerInner::P256Deterministic(_) => {
                SignatureScheme::ECDSA_SECP256R1_SHA256
            }
            SignerInner::Ed25519(_) => SignatureScheme::ED25519,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::verify_signature;
    use openmls_traits::crypto::OpenMlsCrypto as _;
    use rand::SeedableRng;

    #[test]
    fn signers_produce_verifiable_signatures() {
        let key = SigningKey::generate(&mut rand_chacha::ChaCha20Rng::seed_from_u64(5));
        let id = MlsIdentity::p256("tok", key.clone());
        assert_eq!(id.public_key(), key.public_key().to_vec());
        let ring = super::super::crypto::RingCrypto::default();
        for mode in [SignatureMode::Fast, SignatureMode::Deterministic] {
            let signer = id.signer(mode).unwrap();
            let sig = signer.sign(b"payload").unwrap();
            verify_signature(&key.public_key(), b"payload", &sig).unwrap();
            ring.verify_signature(
                SignatureScheme::ECDSA_SECP256R1_SHA256,
                b"payload",
                &key.public_key(),
                &sig,
            )
            .unwrap();
        }
        let det = id.signer(SignatureMode::Deterministic).unwrap();
        assert_eq!(det.sign(b"x").unwrap(), det.sign(b"x").unwrap());

        let ed = MlsIdentity::ed25519("tok", [7; 32]).unwrap();
        assert_eq!(ed.public_key().len(), 32);
        assert!(ed.supports(MlsSuite::X25519Aes128));
        assert!(!ed.supports(MlsSuite::P256Aes128));
        assert!(id.supports(MlsSuite::P256Aes128));
        let signer = ed.signer(SignatureMode::Fast).unwrap();
        let sig = signer.sign(b"m").unwrap();
        ring.verify_signature(SignatureScheme::ED25519, b"m", &ed.public_key(), &sig)
            .unwrap();
    }
}
