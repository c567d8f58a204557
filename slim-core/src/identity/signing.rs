//! ECDSA P-256 / SHA-256 signatures with DER encoding: the e2e header and payload signatures of
//! 3.x clients (spec §1.10, §12), whose MLS ciphersuite 0x0002 uses the same key.

use p256::ecdsa::signature::{Signer as _, Verifier as _};
use p256::ecdsa::{Signature, VerifyingKey};
use rand::CryptoRng;

/// Length of a raw P-256 secret scalar.
pub const SECRET_KEY_LEN: usize = 32;
/// Length of an uncompressed SEC1 P-256 public key (`0x04 || x || y`), the form tokens carry.
pub const PUBLIC_KEY_LEN: usize = 65;

/// Attempts before [`SigningKey::generate`] concludes the RNG is broken. A uniformly random
/// 32-byte string is an invalid scalar with probability about 2^-32, so this never trips with a
/// working RNG.
const GENERATE_ATTEMPTS: usize = 64;

/// Why bytes are not a P-256 secret key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    #[error("a P-256 secret scalar is at most 32 bytes, got {0}")]
    TooLong(usize),
    #[error("zero or not below the P-256 group order")]
    OutOfRange,
}

/// Why a signature did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
    /// 32-byte keys are Ed25519 (reference `curve25519` builds), which this implementation does not
    /// speak; other lengths are nothing at all.
    #[error("public key of {0} bytes is not a SEC1 P-256 key (33 or 65 bytes)")]
    UnsupportedKey(usize),
    #[error("public key is not a point on P-256")]
    BadPublicKey,
    #[error("signature is not a DER-encoded ECDSA P-256 signature")]
    BadEncoding,
    #[error("signature does not match")]
    Mismatch,
}

/// An app's signature key: signs e2e headers and payloads, and its public half goes in the
/// identity token's `pubkey` claim.
#[derive(Clone)]
pub struct SigningKey {
    key: p256::ecdsa::SigningKey,
    public: [u8; PUBLIC_KEY_LEN],
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("SigningKey")
            .field("public", &HexBytes(&self.public))
            .finish_non_exhaustive()
    }
}

struct HexBytes<'a>(&'a [u8]);

impl std::fmt::Debug for HexBytes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl SigningKey {
    /// A new key from the caller's RNG (Sans-IO: one seed, one key).
    ///
    /// # Panics
    ///
    /// Only if the RNG returns 64 invalid scalars in a row (e.g. a constant all-0x00 or all-0xFF
    /// stream), which no working RNG does; looping forever would be worse.
    pub fn generate<R: CryptoRng + ?Sized>(rng: &mut R) -> Self {
        let mut scalar = [0u8; SECRET_KEY_LEN];
        for _ in 0..GENERATE_ATTEMPTS {
            rng.fill_bytes(&mut scalar);
            if let Ok(key) = Self::from_secret_scalar(&scalar) {
                return key;
            }
        }
        panic!("the RNG produced {GENERATE_ATTEMPTS} invalid P-256 scalars in a row: it is broken");
    }

    /// Imports a big-endian secret scalar (what [`Self::secret_scalar`] exports, or the reference
    /// MLS layer's raw key). Shorter inputs are left-padded with zeros, because the reference's
    /// crypto backend strips leading zero bytes from about one key in 256.
    pub fn from_secret_scalar(bytes: &[u8]) -> Result<Self, KeyError> {
        let pad = SECRET_KEY_LEN
            .checked_sub(bytes.len())
            .ok_or(KeyError::TooLong(bytes.len()))?;
        let mut scalar = [0u8; SECRET_KEY_LEN];
        scalar
            .get_mut(pad..)
            .ok_or(KeyError::TooLong(bytes.len()))?
            .copy_from_slice(bytes);
        let key = p256::ecdsa::SigningKey::from_bytes(&scalar.into())
            .map_err(|_| KeyError::OutOfRange)?;
        let mut public = [0u8; PUBLIC_KEY_LEN];
        public.copy_from_slice(key.verifying_key().to_encoded_point(false).as_bytes());
        Ok(Self { key, public })
    }

    /// The raw 32-byte big-endian secret scalar, for persisting the key.
    pub fn secret_scalar(&self) -> [u8; SECRET_KEY_LEN] {
        self.key.to_bytes().into()
    }

    /// The uncompressed SEC1 public key, the value of the token's `pubkey` claim.
    pub fn public_key(&self) -> [u8; PUBLIC_KEY_LEN] {
        self.public
    }

    /// ECDSA-P256-SHA256 over `msg`, DER-encoded. Nonces are RFC 6979 deterministic, so signing
    /// needs no RNG and the same key and message always give the same bytes.
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        let signature: Signature = self.key.sign(msg);
        signature.to_der().as_bytes().to_vec()
    }
}

/// Verifies a DER ECDSA-P256-SHA256 signature with a SEC1 public key (65 bytes uncompressed, as
/// 3.x clients send, or 33 compressed, which the reference also accepts).
///
/// Like the reference, high-S signatures are accepted: reference signers do not normalise S.
pub fn verify_signature(
    pubkey_sec1: &[u8],
    msg: &[u8],
    der_sig: &[u8],
) -> Result<(), SignatureError> {
    if pubkey_sec1.len() != PUBLIC_KEY_LEN && pubkey_sec1.len() != 33 {
        return Err(SignatureError::UnsupportedKey(pubkey_sec1.len()));
    }
    let key =
        VerifyingKey::from_sec1_bytes(pubkey_sec1).map_err(|_| SignatureError::BadPublicKey)?;
    let signature = Signature::from_der(der_sig).map_err(|_| SignatureError::BadEncoding)?;
    key.verify(msg, &signature)
        .map_err(|_| SignatureError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    #[test]
    fn generate_is_seeded_and_round_trips() {
        let a = SigningKey::generate(&mut ChaCha20Rng::seed_from_u64(1));
        let b = SigningKey::generate(&mut ChaCha20Rng::seed_from_u64(1));
        let c = SigningKey::generate(&mut ChaCha20Rng::seed_from_u64(2));
        assert_eq!(a.public_key(), b.public_key());
        assert_ne!(a.public_key(), c.public_key());
        assert_eq!(a.public_key()[0], 0x04);

        let imported = SigningKey::from_secret_scalar(&a.secret_scalar()).unwrap();
        assert_eq!(imported.public_key(), a.public_key());

        let sig = a.sign(b"hello");
        assert_eq!(
            sig,
            b.sign(b"hello"),
            "RFC 6979 signatures are deterministic"
        );
        assert!((8..=72).contains(&sig.len()));
        assert_eq!(sig[0], 0x30);
        verify_signature(&a.public_key(), b"hello", &sig).unwrap();
        assert_eq!(
            verify_signature(&a.public_key(), b"hellO", &sig),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_signature(&c.public_key(), b"hello", &sig),
            Err(SignatureError::Mismatch)
        );
        // Compressed form of the same key.
        let compressed = a.key.verifying_key().to_encoded_point(true);
        verify_signature(compressed.as_bytes(), b"hello", &sig).unwrap();
    }

    #[test]
    fn short_scalars_are_left_padded() {
        let mut scalar = [0u8; 32];
        scalar[31] = 7;
        let full = SigningKey::from_secret_scalar(&scalar).unwrap();
        let short = SigningKey::from_secret_scalar(&[7]).unwrap();
        assert_eq!(full.public_key(), short.public_key());
        assert_eq!(short.secret_scalar(), scalar);
        assert_eq!(
            SigningKey::from_secret_scalar(&[0u8; 32]).unwrap_err(),
            KeyError::OutOfRange
        );
        assert_eq!(
            SigningKey::from_secret_scalar(&[0xffu8; 32]).unwrap_err(),
            KeyError::OutOfRange
        );
        assert_eq!(
            SigningKey::from_secret_scalar(&[1u8; 33]).unwrap_err(),
            KeyError::TooLong(33)
        );
    }

    #[test]
    fn bad_inputs_are_typed_errors() {
        let key = SigningKey::generate(&mut ChaCha20Rng::seed_from_u64(3));
        let sig = key.sign(b"m");
        assert_eq!(
            verify_signature(&[0u8; 32], b"m", &sig),
            Err(SignatureError::UnsupportedKey(32))
        );
        let mut not_on_curve = key.public_key();
        not_on_curve[64] ^= 1;
        assert_eq!(
            verify_signature(&not_on_curve, b"m", &sig),
            Err(SignatureError::BadPublicKey)
        );
        assert_eq!(
            verify_signature(&key.public_key(), b"m", &sig[..sig.len() - 1]),
            Err(SignatureError::BadEncoding)
        );
        assert_eq!(
            verify_signature(&key.public_key(), b"m", &[]),
            Err(SignatureError::BadEncoding)
        );
    }

    #[test]
    fn debug_hides_the_secret() {
        let key = SigningKey::from_secret_scalar(&[9]).unwrap();
        let shown = format!("{key:?}");
        assert!(shown.contains("04"));
        assert!(!shown.contains(&"0".repeat(62)));
    }
}
