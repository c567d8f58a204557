//! SharedSecret identity tokens (spec §5, §1.12): `"<id>:<ts>:<nonce>:<claims>:<mac>"`.

use std::fmt::Write as _;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::distr::{Alphanumeric, Distribution};
use rand::{CryptoRng, RngCore};
use sha2::Sha256;

/// Shortest secret the reference accepts (256 bits), so a shorter one could never interoperate.
pub const MIN_SECRET_LEN: usize = 32;
/// How long after its timestamp a token is still accepted, in seconds.
pub const TOKEN_VALIDITY_SECS: u64 = 3600;
/// How far in the future a token's timestamp may be (the issuer's clock may run ahead), in seconds.
pub const TOKEN_CLOCK_SKEW_SECS: u64 = 5;

/// Random bytes in the nonce (16 base64url characters).
const NONCE_LEN: usize = 12;
/// HMAC-SHA256 tag length.
const MAC_LEN: usize = 32;
/// base64url-nopad length of the tag; anything else cannot be a tag.
const MAC_B64_LEN: usize = 43;
/// Random alphanumeric characters appended to the base id.
const ID_SUFFIX_LEN: usize = 8;

/// Why a shared secret was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    #[error("the shared secret is {len} bytes long; at least {MIN_SECRET_LEN} are required")]
    TooShort { len: usize },
}

/// Why a base id cannot name an identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    #[error("the base id is empty")]
    Empty,
    /// `:` separates token fields, so an id containing it would make tokens unparsable.
    #[error("the base id {0:?} contains ':'")]
    ContainsColon(String),
    #[error("the base id {0:?} contains whitespace")]
    ContainsWhitespace(String),
}

/// Why a token was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Not five `:`-separated fields, a timestamp that is not a u64, or a tag that is not 43
    /// base64url characters.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// Well formed, but not issued with our secret (or altered since).
    #[error("token MAC does not match")]
    BadMac,
    #[error("token issued at {issued_at} is older than {TOKEN_VALIDITY_SECS} s at {now}")]
    Expired { issued_at: u64, now: u64 },
    #[error("token issued at {issued_at} is more than {TOKEN_CLOCK_SKEW_SECS} s ahead of {now}")]
    FromTheFuture { issued_at: u64, now: u64 },
    /// Authentic, but the claims do not give a usable public key.
    #[error("token claims: {0}")]
    BadClaims(#[from] ClaimsError),
}

/// What is wrong with an authentic token's claims field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClaimsError {
    #[error("not base64url without padding")]
    NotBase64,
    #[error("not JSON")]
    NotJson,
    #[error("not a JSON object")]
    NotAnObject,
    #[error("no \"pubkey\" string")]
    MissingPubkey,
    #[error("\"pubkey\" is not standard base64")]
    PubkeyNotBase64,
}

/// A token that passed [`SharedSecret::verify`]: who sent it and the key their signatures verify with.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedToken {
    /// The identity id (`sub`), `"<base_id>_<8 alnum>"` for SharedSecret identities.
    pub id: String,
    /// The token's timestamp, unix seconds.
    pub issued_at: u64,
    /// `issued_at + TOKEN_VALIDITY_SECS` (saturating).
    pub expires_at: u64,
    /// The nonce field as sent, for callers that keep a replay cache (the reference's is off by default).
    pub nonce: String,
    /// The decoded `pubkey` claim: the sender's signature key (uncompressed SEC1 P-256 from 3.x clients).
    pub pubkey: Vec<u8>,
    /// The decoded claims object (the reference exposes it as `custom_claims`).
    pub claims: serde_json::Value,
}

impl VerifiedToken {
    /// The instance id the sender's name must carry (spec §1.4): identity binding compares it with
    /// the message source.
    pub fn app_instance_id(&self) -> u128 {
        slim_proto::name::app_instance_id(&self.id)
    }
}

/// A SharedSecret token issuer and verifier.
///
/// Holds only the keyed HMAC state: the identity id is passed per call so one verifier serves all
/// peers, and no clock or RNG is kept (Sans-IO).
#[derive(Clone)]
pub struct SharedSecret {
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for SharedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedSecret(..)")
    }
}

impl SharedSecret {
    /// The HMAC key is the secret's UTF-8 bytes, as in the reference; secrets shorter than
    /// [`MIN_SECRET_LEN`] are refused because reference peers refuse them too.
    pub fn new(secret: &str) -> Result<Self, SecretError> {
        if secret.len() < MIN_SECRET_LEN {
            return Err(SecretError::TooShort { len: secret.len() });
        }
        // HMAC accepts keys of any length, so this cannot fail.
        let mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
            .map_err(|_| SecretError::TooShort { len: secret.len() })?;
        Ok(Self { mac })
    }

    /// Issues a token for `id` carrying `claims_pubkey` in its `pubkey` claim.
    ///
    /// Real clients send a fresh token on every message (our session layer on every command
    /// message), so this is cheap and takes the time and the nonce randomness from the caller.
    /// `id` should come from [`new_identity_id`]: an id containing `:` yields a token no
    /// verifier accepts. An issuer whose key does not change encodes its claims once
    /// ([`claims_field`]) and calls [`SharedSecret::issue_with_claims`].
    pub fn issue<R: CryptoRng + ?Sized>(
        &self,
        id: &str,
        claims_pubkey: &[u8],
        now_unix: u64,
        rng: &mut R,
    ) -> String {
        self.issue_with_claims(id, &claims_field(claims_pubkey), now_unix, rng)
    }

    /// [`SharedSecret::issue`] with the claims field already encoded by [`claims_field`].
    pub fn issue_with_claims<R: CryptoRng + ?Sized>(
        &self,
        id: &str,
        claims: &str,
        now_unix: u64,
        rng: &mut R,
    ) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill_bytes(&mut nonce);
        // id, 20 timestamp digits, 16 nonce characters, the claims, the tag and 4 colons.
        let mut token = String::with_capacity(id.len() + 20 + 16 + claims.len() + MAC_B64_LEN + 4);
        token.push_str(id);
        token.push(':');
        // Writing into a String cannot fail.
        let _ = write!(token, "{now_unix}:");
        URL_SAFE_NO_PAD.encode_string(nonce, &mut token);
        token.push(':');
        token.push_str(claims);
        let tag = self
            .mac
            .clone()
            .chain_update(token.as_bytes())
            .finalize()
            .into_bytes();
        token.push(':');
        URL_SAFE_NO_PAD.encode_string(tag, &mut token);
        token
    }

    /// Checks a peer's token at `now_unix` (unix seconds) and returns its claims.
    ///
    /// Parsing: a genuine token has exactly five `:`-separated fields, because the issuer refuses ids
    /// containing `:` and the other four fields are decimal or base64url. So the split is
    /// unambiguous (ids may contain `/`, which base64url never does, so only `:` matters) and
    /// anything with more or fewer fields is rejected, as the reference does. The signed message is
    /// the token up to its last `:`, taken verbatim.
    ///
    /// Order: the MAC is checked (in constant time) before the timestamp, so `Expired` and
    /// `FromTheFuture` are only reported for authentic tokens — a useful clock-drift signal — and
    /// forged ones always say `BadMac`. The age may be exactly [`TOKEN_VALIDITY_SECS`] and the skew
    /// exactly [`TOKEN_CLOCK_SKEW_SECS`]. A token without a decodable `pubkey` claim is refused: every
    /// use of a verified identity in SLIM (e2e header signature, payload signature, MLS credential)
    /// needs that key.
    pub fn verify(&self, token: &str, now_unix: u64) -> Result<VerifiedToken, TokenError> {
        let authentic = self.authenticate(token, now_unix)?;
        let (claims, pubkey) = decode_claims(authentic.claims)?;
        Ok(authentic.verified(claims, pubkey))
    }

    /// [`SharedSecret::verify`] for a session layer's hot path, answering only what every
    /// message needs: the sender's instance id and public key, borrowed from `memo`.
    ///
    /// A sender keeps its id and claims, so they are decoded once per sender. A token equal
    /// (compared in constant time) to one this memo already found authentic is not MACed
    /// again; its timestamp is still checked against `now_unix`. Senders that issue a fresh
    /// token per message (the reference) only save the decoding.
    pub fn verify_with_memo<'m>(
        &self,
        token: &str,
        now_unix: u64,
        memo: &'m mut SenderMemo,
    ) -> Result<KnownSender<'m>, TokenError> {
        if let Some(index) = memo.find_token(token) {
            let sender = &memo.senders[index];
            check_age(sender.issued_at, now_unix)?;
            return Ok(sender.known());
        }
        let authentic = self.authenticate(token, now_unix)?;
        let index = memo.learn(token, &authentic)?;
        Ok(memo.senders[index].known())
    }

    /// The token's fields once its MAC and time check out (see [`SharedSecret::verify`]).
    fn authenticate<'t>(&self, token: &'t str, now_unix: u64) -> Result<Authentic<'t>, TokenError> {
        let (message, mac_b64) = token
            .rsplit_once(':')
            .ok_or(TokenError::Malformed("no ':' separator"))?;
        let mut fields = message.split(':');
        let (Some(id), Some(ts), Some(nonce), Some(claims), None) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            return Err(TokenError::Malformed("expected 5 ':'-separated fields"));
        };
        let issued_at: u64 = ts
            .parse()
            .map_err(|_| TokenError::Malformed("timestamp is not a u64"))?;

        if mac_b64.len() != MAC_B64_LEN {
            return Err(TokenError::Malformed("MAC is not 43 base64url characters"));
        }
        let mut tag = [0u8; MAC_LEN];
        match URL_SAFE_NO_PAD.decode_slice(mac_b64, &mut tag) {
            Ok(MAC_LEN) => {}
            _ => return Err(TokenError::Malformed("MAC is not base64url")),
        }
        self.mac
            .clone()
            .chain_update(message.as_bytes())
            .verify_slice(&tag)
            .map_err(|_| TokenError::BadMac)?;

        check_age(issued_at, now_unix)?;
        Ok(Authentic {
            id,
            issued_at,
            nonce,
            claims,
        })
    }
}

/// An authentic, current token's fields, its claims not yet decoded.
struct Authentic<'t> {
    id: &'t str,
    issued_at: u64,
    nonce: &'t str,
    claims: &'t str,
}

impl Authentic<'_> {
    fn verified(self, claims: serde_json::Value, pubkey: Vec<u8>) -> VerifiedToken {
        VerifiedToken {
            id: self.id.to_owned(),
            issued_at: self.issued_at,
            expires_at: self.issued_at.saturating_add(TOKEN_VALIDITY_SECS),
            nonce: self.nonce.to_owned(),
            pubkey,
            claims,
        }
    }
}

/// Refuses a timestamp older than [`TOKEN_VALIDITY_SECS`] or more than
/// [`TOKEN_CLOCK_SKEW_SECS`] ahead of `now_unix`; both bounds are inclusive.
fn check_age(issued_at: u64, now_unix: u64) -> Result<(), TokenError> {
    if issued_at > now_unix {
        if issued_at - now_unix > TOKEN_CLOCK_SKEW_SECS {
            return Err(TokenError::FromTheFuture {
                issued_at,
                now: now_unix,
            });
        }
    } else if now_unix - issued_at > TOKEN_VALIDITY_SECS {
        return Err(TokenError::Expired {
            issued_at,
            now: now_unix,
        });
    }
    Ok(())
}

/// Whether `a` and `b` are equal, in time that depends on their lengths only: word-wide
/// differences are OR-ed together with no early exit (`subtle`'s byte-wise compare cost as much
/// as the MAC it spares), and the result passes an optimisation barrier before it is tested.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (a_words, b_words) = (a.chunks_exact(8), b.chunks_exact(8));
    let mut diff = a_words
        .remainder()
        .iter()
        .zip(b_words.remainder())
        .fold(0u64, |diff, (x, y)| diff | u64::from(x ^ y));
    for (x, y) in a_words.zip(b_words) {
        // chunks_exact(8) yields 8-byte slices, so the conversions cannot fail.
        let x = u64::from_ne_bytes(x.try_into().unwrap_or_default());
        let y = u64::from_ne_bytes(y.try_into().unwrap_or_default());
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

/// What [`SharedSecret::verify_with_memo`] tells about an authentic token's sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownSender<'m> {
    /// [`VerifiedToken::app_instance_id`] of the token's id.
    pub app_instance_id: u128,
    /// The decoded `pubkey` claim.
    pub pubkey: &'m [u8],
}

/// The last [`SenderMemo::ENTRIES`] distinct senders (id and claims) whose tokens were
/// authentic, each with its latest such token: a p2p session has one peer; a group's recent
/// senders take turns. A memo vouches for tokens under the secret that verified them: use
/// one per [`SharedSecret`].
#[derive(Debug, Default)]
pub struct SenderMemo {
    senders: Vec<Sender>,
    /// The entry the next new sender replaces once the memo is full.
    next: usize,
}

#[derive(Debug)]
struct Sender {
    id: String,
    claims_field: String,
    app_instance_id: u128,
    pubkey: Vec<u8>,
    /// The latest authentic token of this sender, and its timestamp.
    token: String,
    issued_at: u64,
}

impl Sender {
    fn known(&self) -> KnownSender<'_> {
        KnownSender {
            app_instance_id: self.app_instance_id,
            pubkey: &self.pubkey,
        }
    }
}

impl SenderMemo {
    pub const ENTRIES: usize = 8;

    /// The sender whose latest authentic token is `token`. Constant time in the tokens'
    /// contents, so a probe cannot learn a remembered token byte by byte.
    fn find_token(&self, token: &str) -> Option<usize> {
        self.senders
            .iter()
            .position(|sender| same_bytes(sender.token.as_bytes(), token.as_bytes()))
    }

    /// Remembers `authentic` (whose whole text is `token`) as its sender's latest token and
    /// returns that sender's entry; a new sender's claims must decode to be kept.
    fn learn(&mut self, token: &str, authentic: &Authentic<'_>) -> Result<usize, ClaimsError> {
        let known = self
            .senders
            .iter()
            .position(|s| s.id == authentic.id && s.claims_field == authentic.claims);
        let index = match known {
            Some(index) => index,
            None => {
                let (_, pubkey) = decode_claims(authentic.claims)?;
                let sender = Sender {
                    id: authentic.id.to_owned(),
                    claims_field: authentic.claims.to_owned(),
                    app_instance_id: slim_proto::name::app_instance_id(authentic.id),
                    pubkey,
                    token: String::new(),
                    issued_at: 0,
                };
                if self.senders.len() < Self::ENTRIES {
                    self.senders.push(sender);
                    self.senders.len() - 1
                } else {
                    let index = self.next;
                    self.senders[index] = sender;
                    self.next = (index + 1) % Self::ENTRIES;
                    index
                }
            }
        };
        let sender = &mut self.senders[index];
        // Reuses the entry's buffer: tokens of one sender have one length.
        sender.token.clear();
        sender.token.push_str(token);
        sender.issued_at = authentic.issued_at;
        Ok(index)
    }
}

/// A fresh identity id, `"<base_id>_<8 random [A-Za-z0-9]>"`, as the reference makes one per app
/// start; the app instance id is derived from it, so it must be unique per running app.
pub fn new_identity_id<R: RngCore + ?Sized>(base_id: &str, rng: &mut R) -> Result<String, IdError> {
    if base_id.is_empty() {
        return Err(IdError::Empty);
    }
    if base_id.contains(':') {
        return Err(IdError::ContainsColon(base_id.to_owned()));
    }
    if base_id.chars().any(char::is_whitespace) {
        return Err(IdError::ContainsWhitespace(base_id.to_owned()));
    }
    let mut id = String::with_capacity(base_id.len() + 1 + ID_SUFFIX_LEN);
    id.push_str(base_id);
    id.push('_');
    for _ in 0..ID_SUFFIX_LEN {
        id.push(char::from(Alphanumeric.sample(rng)));
    }
    Ok(id)
}

/// The claims field for a public key: base64url-nopad of `{"pubkey":"<base64std(key)>"}`, byte for
/// byte what the reference writes (serde_json's compact form, no escaping needed for base64).
pub fn claims_field(pubkey: &[u8]) -> String {
    let json = serde_json::json!({ "pubkey": STANDARD.encode(pubkey) }).to_string();
    URL_SAFE_NO_PAD.encode(json)
}

fn decode_claims(field: &str) -> Result<(serde_json::Value, Vec<u8>), ClaimsError> {
    if field.is_empty() {
        // The reference reads an empty claims field as `{}`: authentic, but without a key.
        return Err(ClaimsError::MissingPubkey);
    }
    let json = URL_SAFE_NO_PAD
        .decode(field)
        .map_err(|_| ClaimsError::NotBase64)?;
    let claims: serde_json::Value =
        serde_json::from_slice(&json).map_err(|_| ClaimsError::NotJson)?;
    let object = claims.as_object().ok_or(ClaimsError::NotAnObject)?;
    let pubkey_b64 = object
        .get("pubkey")
        .and_then(serde_json::Value::as_str)
        .ok_or(ClaimsError::MissingPubkey)?;
    let pubkey = STANDARD
        .decode(pubkey_b64)
        .map_err(|_| ClaimsError::PubkeyNotBase64)?;
    Ok((claims, pubkey))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn forge(secret: &SharedSecret, message: &str) -> String {
        let tag = secret
            .mac
            .clone()
            .chain_update(message.as_bytes())
            .finalize()
            .into_bytes();
        format!("{message}:{}", URL_SAFE_NO_PAD.encode(tag))
    }

    #[test]
    fn short_secret_is_refused() {
        assert_eq!(
            SharedSecret::new("too short").unwrap_err(),
            SecretError::TooShort { len: 9 }
        );
        assert!(SharedSecret::new(SECRET).is_ok());
        assert!(SharedSecret::new(&SECRET[..31]).is_err());
    }

    #[test]
    fn identity_id_shape() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let id = new_identity_id("org/ns/svc", &mut rng).unwrap();
        let (base, suffix) = id.rsplit_once('_').unwrap();
        assert_eq!(base, "org/ns/svc");
        assert_eq!(suffix.len(), 8);
        assert!(suffix.bytes().all(|b| b.is_ascii_alphanumeric()));
        // Deterministic for one seed, different for another.
        assert_eq!(
            new_identity_id("org/ns/svc", &mut ChaCha20Rng::seed_from_u64(1)).unwrap(),
            id
        );
        assert_ne!(
            new_identity_id("org/ns/svc", &mut ChaCha20Rng::seed_from_u64(2)).unwrap(),
            id
        );
        assert_eq!(new_identity_id("", &mut rng), Err(IdError::Empty));
        assert!(matches!(
            new_identity_id("a:b", &mut rng),
            Err(IdError::ContainsColon(_))
        ));
        assert!(matches!(
            new_identity_id("a b", &mut rng),
            Err(IdError::ContainsWhitespace(_))
        ));
    }

    #[test]
    fn claims_are_byte_exact() {
        // From a real 3.3.8 token (capture b, message 2).
        let pubkey = STANDARD
            .decode("BO3k9Yd9iZenDJvixc8UwDGS3SGqqqTnO6FCTQet2eELyHtcuEzOMOl479n+NPniue1ovODRwWBwf+ZTdrXrAL8=")
            .unwrap();
        assert_eq!(
            claims_field(&pubkey),
            "eyJwdWJrZXkiOiJCTzNrOVlkOWlaZW5ESnZpeGM4VXdER1MzU0dxcXFUbk82RkNUUWV0MmVFTHlIdGN1RXpPTU9sNDc5bitOUG5pdWUxb3ZPRFJ3V0J3ZitaVGRyWHJBTDg9In0"
        );
    }

    #[test]
    fn round_trip_and_time_window() {
        let secret = SharedSecret::new(SECRET).unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let token = secret.issue("org/ns/svc_abcdEFGH", &[4, 1, 2, 3], 1_000_000, &mut rng);
        assert_eq!(token.split(':').count(), 5);
        let v = secret.verify(&token, 1_000_000).unwrap();
        assert_eq!(v.id, "org/ns/svc_abcdEFGH");
        assert_eq!(v.issued_at, 1_000_000);
        assert_eq!(v.expires_at, 1_003_600);
        assert_eq!(v.pubkey, vec![4, 1, 2, 3]);
        assert_eq!(v.nonce.len(), 16);
        assert_eq!(v.claims, serde_json::json!({"pubkey": "BAECAw=="}));

        // Inclusive bounds, then one second past each.
        assert!(secret.verify(&token, 1_003_600).is_ok());
        assert_eq!(
            secret.verify(&token, 1_003_601).unwrap_err(),
            TokenError::Expired {
                issued_at: 1_000_000,
                now: 1_003_601
            }
        );
        assert!(secret.verify(&token, 999_995).is_ok());
        assert_eq!(
            secret.verify(&token, 999_994).unwrap_err(),
            TokenError::FromTheFuture {
                issued_at: 1_000_000,
                now: 999_994
            }
        );
    }

    #[test]
    fn rejections() {
        let secret = SharedSecret::new(SECRET).unwrap();
        let other = SharedSecret::new("another-secret-another-secret-0123").unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(8);
        let token = secret.issue("a/b/c_x", &[1], 100, &mut rng);
        assert_eq!(other.verify(&token, 100).unwrap_err(), TokenError::BadMac);
        // Any altered character breaks the MAC or the format.
        for i in 0..token.len() {
            let mut bytes = token.clone().into_bytes();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            let altered = String::from_utf8(bytes).unwrap();
            assert!(secret.verify(&altered, 100).is_err(), "byte {i} altered");
        }
        assert!(matches!(
            secret.verify("a:b:c", 0),
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(
            secret.verify(&format!("x:{token}"), 100),
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(
            secret.verify(&forge(&secret, "id:notanumber:n:c"), 100),
            Err(TokenError::Malformed(_))
        ));
        // A six-field token is refused even with a valid MAC over its first five.
        assert!(matches!(
            secret.verify(&forge(&secret, "a:b:100:n:c"), 100),
            Err(TokenError::Malformed(_))
        ));
        // Authentic but keyless claims.
        assert_eq!(
            secret
                .verify(&forge(&secret, "id:100:n:"), 100)
                .unwrap_err(),
            TokenError::BadClaims(ClaimsError::MissingPubkey)
        );
        assert_eq!(
            secret
                .verify(&forge(&secret, "id:100:n:!!"), 100)
                .unwrap_err(),
            TokenError::BadClaims(ClaimsError::NotBase64)
        );
        let not_json = URL_SAFE_NO_PAD.encode("{pubkey");
        assert_eq!(
            secret
                .verify(&forge(&secret, &format!("id:100:n:{not_json}")), 100)
                .unwrap_err(),
            TokenError::BadClaims(ClaimsError::NotJson)
        );
        let array = URL_SAFE_NO_PAD.encode("[1]");
        assert_eq!(
            secret
                .verify(&forge(&secret, &format!("id:100:n:{array}")), 100)
                .unwrap_err(),
            TokenError::BadClaims(ClaimsError::NotAnObject)
        );
        let bad_key = URL_SAFE_NO_PAD.encode(r#"{"pubkey":"%%"}"#);
        assert_eq!(
            secret
                .verify(&forge(&secret, &format!("id:100:n:{bad_key}")), 100)
                .unwrap_err(),
            TokenError::BadClaims(ClaimsError::PubkeyNotBase64)
        );
        // The timestamp can be u64::MAX without overflowing the expiry.
        let far = forge(
            &secret,
            &format!("id:{}:n:{}", u64::MAX, claims_field(&[1])),
        );
        assert_eq!(secret.verify(&far, u64::MAX).unwrap().expires_at, u64::MAX);
    }

    #[test]
    fn same_bytes_finds_a_difference_anywhere() {
        for len in [0usize, 1, 7, 8, 9, 16, 43, 250] {
            let a: Vec<u8> = (0..len).map(|i| i as u8).collect();
            assert!(same_bytes(&a, &a.clone()));
            for at in 0..len {
                let mut b = a.clone();
                b[at] ^= 0x80;
                assert!(!same_bytes(&a, &b), "len {len}, byte {at}");
            }
            let mut longer = a.clone();
            longer.push(0);
            assert!(!same_bytes(&a, &longer));
        }
    }

    #[test]
    fn issued_with_encoded_claims_and_verified_with_a_memo() {
        let secret = SharedSecret::new(SECRET).unwrap();
        let claims = claims_field(&[4, 1, 2, 3]);
        // The same token as `issue` gives, from the same randomness.
        let token =
            secret.issue_with_claims("a/b/c_x", &claims, 100, &mut ChaCha20Rng::seed_from_u64(9));
        assert_eq!(
            token,
            secret.issue(
                "a/b/c_x",
                &[4, 1, 2, 3],
                100,
                &mut ChaCha20Rng::seed_from_u64(9)
            )
        );
        let full = secret.verify(&token, 100).unwrap();
        let mut memo = SenderMemo::default();
        for _ in 0..2 {
            assert_eq!(
                secret.verify_with_memo(&token, 100, &mut memo),
                Ok(KnownSender {
                    app_instance_id: full.app_instance_id(),
                    pubkey: &full.pubkey,
                })
            );
        }
        assert_eq!(memo.senders.len(), 1);
        // A sender's next token replaces its last one in the same entry.
        let mut rng = ChaCha20Rng::seed_from_u64(10);
        let next = secret.issue_with_claims("a/b/c_x", &claims, 101, &mut rng);
        assert!(secret.verify_with_memo(&next, 101, &mut memo).is_ok());
        assert_eq!(memo.senders.len(), 1);
        assert_eq!(memo.senders[0].token, next);
        // A remembered token is still checked against the clock, both ways.
        assert_eq!(
            secret.verify_with_memo(&next, 101 + TOKEN_VALIDITY_SECS + 1, &mut memo),
            Err(TokenError::Expired {
                issued_at: 101,
                now: 101 + TOKEN_VALIDITY_SECS + 1
            })
        );
        assert_eq!(
            secret.verify_with_memo(&next, 101 - TOKEN_CLOCK_SKEW_SECS - 1, &mut memo),
            Err(TokenError::FromTheFuture {
                issued_at: 101,
                now: 101 - TOKEN_CLOCK_SKEW_SECS - 1
            })
        );
        // A remembered sender does not spare the MAC of a token not seen before.
        let other = SharedSecret::new("another-secret-another-secret-0123").unwrap();
        let forged = other.issue_with_claims("a/b/c_x", &claims, 101, &mut rng);
        assert_eq!(
            secret.verify_with_memo(&forged, 101, &mut memo),
            Err(TokenError::BadMac)
        );
        // Nor does a remembered token vouch for a copy with another tag.
        let mut altered = next.clone();
        let last = altered.pop().unwrap();
        altered.push(if last == 'A' { 'B' } else { 'A' });
        assert!(secret.verify_with_memo(&altered, 101, &mut memo).is_err());
        // Claims that do not decode are refused every time and never remembered.
        let keyless = forge(&secret, "a/b/c_x:100:n:");
        for _ in 0..2 {
            assert_eq!(
                secret.verify_with_memo(&keyless, 100, &mut memo),
                Err(TokenError::BadClaims(ClaimsError::MissingPubkey))
            );
        }
        assert_eq!(memo.senders.len(), 1);
        // More distinct senders than entries: the oldest make room, every answer stays right.
        for key in 0..=SenderMemo::ENTRIES as u8 * 2 {
            let id = format!("a/b/c_{key}");
            let token = secret.issue(&id, &[key], 100, &mut rng);
            let sender = secret.verify_with_memo(&token, 100, &mut memo).unwrap();
            assert_eq!(sender.pubkey, [key]);
            assert_eq!(
                sender.app_instance_id,
                slim_proto::name::app_instance_id(&id)
            );
            assert!(memo.senders.len() <= SenderMemo::ENTRIES);
        }
    }
}
