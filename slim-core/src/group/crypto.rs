//! openmls crypto and randomness providers.
//!
//! * [`RingCrypto`]: the fast backend. Hashes, HMAC/HKDF, AEAD (AES-GCM, ChaCha20-Poly1305) and
//!   signature verification (ECDSA P-256/P-384 DER, Ed25519) run on `ring`. `ring` has no
//!   static-key ECDH, so **HPKE (seal/open/export) and HPKE key derivation are delegated to
//!   `openmls_rust_crypto`'s RustCrypto implementation** (hpke-rs), as are the rarely used
//!   `sign`/`signature_key_gen` (our signers live in [`super::signer`]). HPKE only runs when
//!   commits and welcomes are built or processed, never per application message.
//! * [`CryptoBackend::RustCrypto`]: `openmls_rust_crypto` unchanged (pure Rust), kept selectable
//!   as the reference point and for cross-checks.
//! * [`SeededRand`]: the randomness openmls asks for (group ids, secrets, reuse guards, key
//!   package init/encryption key seeds), a ChaCha20 stream from a caller's seed. hpke-rs draws
//!   its ephemeral keys from its own OS-seeded generator, and the ring ECDSA signer from the OS,
//!   so ciphertext and signature bytes are not reproducible; decisions are (see the module docs).

use std::sync::Mutex;

use openmls_rust_crypto::RustCrypto;
use openmls_traits::crypto::OpenMlsCrypto;
use openmls_traits::random::OpenMlsRand;
use openmls_traits::types::{
    AeadType, Ciphersuite, CryptoError, ExporterSecret, HashType, HpkeCiphertext, HpkeConfig,
    HpkeKeyPair, KemOutput, SignatureScheme,
};
use rand::{RngCore as _, SeedableRng as _};
use rand_chacha::ChaCha20Rng;
use ring::{aead, digest, hkdf, hmac, signature};
use tls_codec::SecretVLBytes;

/// Which implementation does the symmetric crypto and signature verification.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CryptoBackend {
    /// [`RingCrypto`]: `ring` for everything but HPKE (the fast path).
    #[default]
    Ring,
    /// `openmls_rust_crypto` unchanged.
    RustCrypto,
}

/// `ring`-backed [`OpenMlsCrypto`]; HPKE is delegated to `openmls_rust_crypto` (see the module docs).
#[derive(Default)]
pub struct RingCrypto {
    fallback: RustCrypto,
}

impl std::fmt::Debug for RingCrypto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // RustCrypto's Debug would print its generator state.
        f.write_str("RingCrypto")
    }
}

fn hmac_alg(hash: HashType) -> hmac::Algorithm {
    match hash {
        HashType::Sha2_256 => hmac::HMAC_SHA256,
        HashType::Sha2_384 => hmac::HMAC_SHA384,
        HashType::Sha2_512 => hmac::HMAC_SHA512,
    }
}

fn hkdf_alg(hash: HashType) -> hkdf::Algorithm {
    match hash {
        HashType::Sha2_256 => hkdf::HKDF_SHA256,
        HashType::Sha2_384 => hkdf::HKDF_SHA384,
        HashType::Sha2_512 => hkdf::HKDF_SHA512,
    }
}

fn digest_alg(hash: HashType) -> &'static digest::Algorithm {
    match hash {
        HashType::Sha2_256 => &digest::SHA256,
        HashType::Sha2_384 => &digest::SHA384,
        HashType::Sha2_512 => &digest::SHA512,
    }
}

fn aead_alg(alg: AeadType) -> &'static aead::Algorithm {
    match alg {
        AeadType::Aes128Gcm => &aead::AES_128_GCM,
        AeadType::Aes256Gcm => &aead::AES_256_GCM,
        AeadType::ChaCha20Poly1305 => &aead::CHACHA20_POLY1305,
    }
}

fn aead_key(alg: AeadType, key: &[u8]) -> Result<aead::LessSafeKey, CryptoError> {
    aead::UnboundKey::new(aead_alg(alg), key)
        .map(aead::LessSafeKey::new)
        .map_err(|_| CryptoError::CryptoLibraryError)
}

/// Output length for ring's HKDF-Expand.
struct OkmLen(usize);

impl hkdf::KeyType for OkmLen {
    fn len(&self) -> usize {
        self.0
    }
}

/// Implements each listed [`OpenMlsCrypto`] method by calling the method of the same name on
/// another implementation: a field of `self`, or the backend a [`Crypto`] holds. `with hpke
/// [on …]` adds the HPKE methods to the list.
macro_rules! openmls_crypto_methods {
    // The listed methods and the HPKE ones, `$on` saying where they go.
    (with hpke [$($on:tt)*] $($listed:tt)*) => {
        openmls_crypto_methods! {
            $($on)*;
            $($listed)*
            fn hpke_seal(
                config: HpkeConfig, pk_r: &[u8], info: &[u8], aad: &[u8], ptxt: &[u8]
            ) -> Result<HpkeCiphertext, CryptoError>;
            fn hpke_open(
                config: HpkeConfig, input: &HpkeCiphertext, sk_r: &[u8], info: &[u8], aad: &[u8]
            ) -> Result<Vec<u8>, CryptoError>;
            fn hpke_setup_sender_and_export(
                config: HpkeConfig, pk_r: &[u8], info: &[u8],
                exporter_context: &[u8], exporter_length: usize
            ) -> Result<(KemOutput, ExporterSecret), CryptoError>;
            fn hpke_setup_receiver_and_export(
                config: HpkeConfig, enc: &[u8], sk_r: &[u8], info: &[u8],
                exporter_context: &[u8], exporter_length: usize
            ) -> Result<ExporterSecret, CryptoError>;
            fn derive_hpke_keypair(
                config: HpkeConfig, ikm: &[u8]
            ) -> Result<HpkeKeyPair, CryptoError>;
        }
    };
    (on self.$field:ident; $(fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty;)*) => {$(
        fn $name(&self, $($arg: $ty),*) -> $ret {
            self.$field.$name($($arg),*)
        }
    )*};
    (on the backend; $(fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty;)*) => {$(
        fn $name(&self, $($arg: $ty),*) -> $ret {
            match self {
                Crypto::Ring(backend) => backend.$name($($arg),*),
                Crypto::Rust(backend) => backend.$name($($arg),*),
            }
        }
    )*};
}

impl OpenMlsCrypto for RingCrypto {
    fn supports(&self, ciphersuite: Ciphersuite) -> Result<(), CryptoError> {
        match ciphersuite {
            Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519
            | Ciphersuite::MLS_128_DHKEMX25519_CHACHA20POLY1305_SHA256_Ed25519
            | Ciphersuite::MLS_128_DHKEMP256_AES128GCM_SHA256_P256 => Ok(()),
            _ => Err(CryptoError::UnsupportedCiphersuite),
        }
    }

    fn supported_ciphersuites(&self) -> Vec<Ciphersuite> {
        vec![
            Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519,
            Ciphersuite::MLS_128_DHKEMX25519_CHACHA20POLY1305_SHA256_Ed25519,
            Ciphersuite::MLS_128_DHKEMP256_AES128GCM_SHA256_P256,
        ]
    }

    fn hkdf_extract(
        &self,
        hash_type: HashType,
        salt: &[u8],
        ikm: &[u8],
    ) -> Result<SecretVLBytes, CryptoError> {
        // HKDF-Extract(salt, ikm) = HMAC(salt, ikm); an empty salt equals HashLen zero bytes
        // because HMAC zero-pads keys. ring's own extract hides the PRK, which openmls needs.
        self.hmac(hash_type, salt, ikm)
    }

    fn hmac(
        &self,
        hash_type: HashType,
        key: &[u8],
        message: &[u8],
    ) -> Result<SecretVLBytes, CryptoError> {
        let tag = hmac::sign(&hmac::Key::new(hmac_alg(hash_type), key), message);
        Ok(tag.as_ref().into())
    }

    fn hkdf_expand(
        &self,
        hash_type: HashType,
        prk: &[u8],
        info: &[u8],
        okm_len: usize,
    ) -> Result<SecretVLBytes, CryptoError> {
        let prk = hkdf::Prk::new_less_safe(hkdf_alg(hash_type), prk);
        let info = [info];
        let okm = prk
            .expand(&info, OkmLen(okm_len))
            .map_err(|_| CryptoError::HkdfOutputLengthInvalid)?;
        let mut out = vec![0u8; okm_len];
        okm.fill(&mut out)
            .map_err(|_| CryptoError::HkdfOutputLengthInvalid)?;
        Ok(out.into())
    }

    fn hash(&self, hash_type: HashType, data: &[u8]) -> Result<Vec<u8>, CryptoError> {
        Ok(digest::digest(digest_alg(hash_type), data)
            .as_ref()
            .to_vec())
    }

    fn aead_encrypt(
        &self,
        alg: AeadType,
        key: &[u8],
        data: &[u8],
        nonce: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let key = aead_key(alg, key)?;
        let nonce = aead::Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| CryptoError::InvalidLength)?;
        let mut buf = Vec::with_capacity(data.len() + key.algorithm().tag_len());
        buf.extend_from_slice(data);
        key.seal_in_place_append_tag(nonce, aead::Aad::from(aad), &mut buf)
            .map_err(|_| CryptoError::CryptoLibraryError)?;
        Ok(buf)
    }

    fn aead_decrypt(
        &self,
        alg: AeadType,
        key: &[u8],
        ct_tag: &[u8],
        nonce: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let key = aead_key(alg, key)?;
        let nonce = aead::Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| CryptoError::InvalidLength)?;
        let mut buf = ct_tag.to_vec();
        let len = key
            .open_in_place(nonce, aead::Aad::from(aad), &mut buf)
            .map_err(|_| CryptoError::AeadDecryptionError)?
            .len();
        buf.truncate(len);
        Ok(buf)
    }

    fn verify_signature(
        &self,
        alg: SignatureScheme,
        data: &[u8],
        pk: &[u8],
        signature: &[u8],
    ) -> Result<(), CryptoError> {
        let algorithm: &dyn signature::VerificationAlgorithm = match alg {
            SignatureScheme::ECDSA_SECP256R1_SHA256 => &signature::ECDSA_P256_SHA256_ASN1,
            SignatureScheme::ECDSA_SECP384R1_SHA384 => &signature::ECDSA_P384_SHA384_ASN1,
            SignatureScheme::ED25519 => &signature::ED25519,
            _ => return Err(CryptoError::UnsupportedSignatureScheme),
        };
        signature::UnparsedPublicKey::new(algorithm, pk)
            .verify(data, signature)
            .map_err(|_| CryptoError::InvalidSignature)
    }

    // HPKE and the rarely used signing and key generation: RustCrypto's (see the module docs).
    openmls_crypto_methods! {
        with hpke [on self.fallback]
        fn signature_key_gen(alg: SignatureScheme) -> Result<(Vec<u8>, Vec<u8>), CryptoError>;
        fn sign(alg: SignatureScheme, data: &[u8], key: &[u8]) -> Result<Vec<u8>, CryptoError>;
    }
}

/// The crypto a group runs on: one of the two backends, dispatched per call (openmls's
/// provider traits are not object safe, and an enum keeps `GroupCore` non-generic).
pub(crate) enum Crypto {
    Ring(RingCrypto),
    Rust(RustCrypto),
}

impl std::fmt::Debug for Crypto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Ring(_) => "Crypto::Ring",
            Self::Rust(_) => "Crypto::RustCrypto",
        })
    }
}

impl Crypto {
    pub(crate) fn new(backend: CryptoBackend) -> Self {
        match backend {
            CryptoBackend::Ring => Self::Ring(RingCrypto::default()),
            CryptoBackend::RustCrypto => Self::Rust(RustCrypto::default()),
        }
    }
}

impl OpenMlsCrypto for Crypto {
    openmls_crypto_methods! {
        with hpke [on the backend]
        fn supports(ciphersuite: Ciphersuite) -> Result<(), CryptoError>;
        fn supported_ciphersuites() -> Vec<Ciphersuite>;
        fn hkdf_extract(
            hash_type: HashType, salt: &[u8], ikm: &[u8]
        ) -> Result<SecretVLBytes, CryptoError>;
        fn hmac(
            hash_type: HashType, key: &[u8], message: &[u8]
        ) -> Result<SecretVLBytes, CryptoError>;
        fn hkdf_expand(
            hash_type: HashType, prk: &[u8], info: &[u8], okm_len: usize
        ) -> Result<SecretVLBytes, CryptoError>;
        fn hash(hash_type: HashType, data: &[u8]) -> Result<Vec<u8>, CryptoError>;
        fn aead_encrypt(
            alg: AeadType, key: &[u8], data: &[u8], nonce: &[u8], aad: &[u8]
        ) -> Result<Vec<u8>, CryptoError>;
        fn aead_decrypt(
            alg: AeadType, key: &[u8], ct_tag: &[u8], nonce: &[u8], aad: &[u8]
        ) -> Result<Vec<u8>, CryptoError>;
        fn signature_key_gen(alg: SignatureScheme) -> Result<(Vec<u8>, Vec<u8>), CryptoError>;
        fn verify_signature(
            alg: SignatureScheme, data: &[u8], pk: &[u8], signature: &[u8]
        ) -> Result<(), CryptoError>;
        fn sign(alg: SignatureScheme, data: &[u8], key: &[u8]) -> Result<Vec<u8>, CryptoError>;
    }
}

/// Why [`SeededRand`] could not produce bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RandError {
    /// A thread panicked while holding the generator.
    #[error("the random generator's lock is poisoned")]
    Poisoned,
}

/// openmls's randomness: ChaCha20 seeded by the caller, so one seed gives the same group ids,
/// secrets and key-package key seeds.
///
/// The mutex exists only because openmls asks for randomness through `&self`; a group is driven
/// from one thread and never contends on it.
pub struct SeededRand(Mutex<ChaCha20Rng>);

impl std::fmt::Debug for SeededRand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The generator state is as secret as the keys it makes.
        f.write_str("SeededRand(..)")
    }
}

impl SeededRand {
    pub fn new(seed: [u8; 32]) -> Self {
        Self(Mutex::new(ChaCha20Rng::from_seed(seed)))
    }
}

impl OpenMlsRand for SeededRand {
    type Error = RandError;

    fn random_array<const N: usize>(&self) -> Result<[u8; N], Self::Error> {
        let mut out = [0u8; N];
        self.0
            .lock()
            .map_err(|_| RandError::Poisoned)?
            .fill_bytes(&mut out);
        Ok(out)
    }

    fn random_vec(&self, len: usize) -> Result<Vec<u8>, Self::Error> {
        let mut out = vec![0u8; len];
        self.0
            .lock()
            .map_err(|_| RandError::Poisoned)?
            .fill_bytes(&mut out);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every primitive ring serves must agree with RustCrypto byte for byte.
    #[test]
    fn ring_matches_rust_crypto() {
        let ring = RingCrypto::default();
        let rust = RustCrypto::default();
        for hash in [HashType::Sha2_256, HashType::Sha2_384, HashType::Sha2_512] {
            for (salt, ikm) in [(&b""[..], &b"ikm"[..]), (b"salt", b""), (b"s", &[7u8; 100])] {
                assert_eq!(
                    ring.hkdf_extract(hash, salt, ikm).unwrap(),
                    rust.hkdf_extract(hash, salt, ikm).unwrap()
                );
                assert_eq!(
                    ring.hmac(hash, salt, ikm).unwrap(),
                    rust.hmac(hash, salt, ikm).unwrap()
                );
            }
            let prk = ring.hkdf_extract(hash, b"salt", b"ikm").unwrap();
            for len in [0, 1, 16, 32, 48, 64, 100, 255] {
                assert_eq!(
                    ring.hkdf_expand(hash, prk.as_slice(), b"info", len)
                        .unwrap(),
                    rust.hkdf_expand(hash, prk.as_slice(), b"info", len)
                        .unwrap(),
                    "{hash:?} {len}"
                );
            }
            assert!(ring
                .hkdf_expand(hash, prk.as_slice(), b"", 255 * hash.size() + 1)
                .is_err());
            assert_eq!(
                ring.hash(hash, b"data").unwrap(),
                rust.hash(hash, b"data").unwrap()
            );
        }
        for (alg, key_len) in [
            (AeadType::Aes128Gcm, 16),
            (AeadType::Aes256Gcm, 32),
            (AeadType::ChaCha20Poly1305, 32),
        ] {
            let key = vec![3u8; key_len];
            let nonce = [9u8; 12];
            let ct = ring
                .aead_encrypt(alg, &key, b"plaintext", &nonce, b"aad")
                .unwrap();
            assert_eq!(
                ct,
                rust.aead_encrypt(alg, &key, b"plaintext", &nonce, b"aad")
                    .unwrap()
            );
            assert_eq!(
                rust.aead_decrypt(alg, &key, &ct, &nonce, b"aad").unwrap(),
                b"plaintext"
            );
            assert_eq!(
                ring.aead_decrypt(alg, &key, &ct, &nonce, b"aad").unwrap(),
                b"plaintext"
            );
            assert_eq!(
                ring.aead_decrypt(alg, &key, &ct, &nonce, b"aaD"),
                Err(CryptoError::AeadDecryptionError)
            );
            assert!(ring
                .aead_encrypt(alg, &key[1..], b"p", &nonce, b"")
                .is_err());
            assert!(ring
                .aead_encrypt(alg, &key, b"p", &nonce[1..], b"")
                .is_err());
        }
    }

    #[test]
    fn ring_verifies_rust_crypto_signatures() {
        let ring = RingCrypto::default();
        let rust = RustCrypto::default();
        for scheme in [
            SignatureScheme::ECDSA_SECP256R1_SHA256,
            SignatureScheme::ED25519,
        ] {
            let (sk, pk) = rust.signature_key_gen(scheme).unwrap();
            let sig = rust.sign(scheme, b"message", &sk).unwrap();
            ring.verify_signature(scheme, b"message", &pk, &sig)
                .unwrap();
            assert_eq!(
                ring.verify_signature(scheme, b"messagE", &pk, &sig),
                Err(CryptoError::InvalidSignature)
            );
        }
    }

    #[test]
    fn seeded_rand_is_repeatable() {
        let a = SeededRand::new([1; 32]);
        let b = SeededRand::new([1; 32]);
        assert_eq!(
            a.random_array::<16>().unwrap(),
            b.random_array::<16>().unwrap()
        );
        assert_eq!(a.random_vec(40).unwrap(), b.random_vec(40).unwrap());
        assert_ne!(
            SeededRand::new([2; 32]).random_vec(16).unwrap(),
            a.random_vec(16).unwrap()
        );
    }
}
