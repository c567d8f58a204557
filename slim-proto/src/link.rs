//! Link negotiation (spec §1.7–§1.8): the first message in each direction of every connection.
//! Both ends exchange X25519 public keys and derive the per-link header-MAC key with
//! HKDF-SHA256(salt = link id, IKM = shared secret, info = "SLIM-DP-inter-node-hmac-v1").

use bytes::Bytes;
use hkdf::Hkdf;
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::mac::HeaderMacKey;
use crate::pb;
use crate::pb::LinkConnectionType;

const HKDF_INFO: &[u8] = b"SLIM-DP-inter-node-hmac-v1";
/// Length of an X25519 public key on the wire.
pub const ECDH_KEY_LEN: usize = 32;

/// Why a negotiation message is refused. The text is what the peer sees in the gRPC status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NegotiationError {
    #[error("expected a link negotiation as the first message")]
    NotNegotiation,
    #[error("link negotiation request has is_reply=true")]
    UnexpectedReply,
    #[error("link negotiation reply has is_reply=false")]
    NotAReply,
    #[error("link negotiation has an empty link_id")]
    EmptyLinkId,
    #[error("link negotiation reply echoes link_id {got:?}, expected {expected:?}")]
    LinkIdMismatch { expected: String, got: String },
    #[error("slim_version {0:?} is not a semantic version")]
    BadVersion(String),
    #[error("link_ecdh_public_key has {0} bytes, expected 32 (header MAC is required)")]
    BadEcdhKey(usize),
    #[error("link negotiation received twice on one link")]
    Repeated,
    #[error("post-quantum link key exchange (link_kem_payload) is not supported")]
    KemUnsupported,
    #[error("link negotiation timed out")]
    Timeout,
    #[error("unknown link connection_type {0}")]
    UnknownConnectionType(i32),
}

impl NegotiationError {
    /// gRPC status code for closing the stream.
    pub fn grpc_status(&self) -> u32 {
        match self {
            NegotiationError::Timeout => 4,         // DEADLINE_EXCEEDED
            NegotiationError::KemUnsupported => 12, // UNIMPLEMENTED
            _ => 3,                                 // INVALID_ARGUMENT
        }
    }
}

/// One side's ephemeral X25519 key pair for one link.
pub struct LinkKeyPair {
    secret: StaticSecret,
    public: PublicKey,
}

impl LinkKeyPair {
    /// From 32 random bytes (the caller's seeded RNG).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let secret = StaticSecret::from(seed);
        let public = PublicKey::from(&secret);
        Self { secret, public }
    }

    pub fn public_bytes(&self) -> [u8; ECDH_KEY_LEN] {
        self.public.to_bytes()
    }

    /// The 32-byte header-MAC key shared with the peer whose public key is `peer_public`.
    pub fn derive_mac_key(
        &self,
        peer_public: &[u8],
        link_id: &str,
    ) -> Result<[u8; 32], NegotiationError> {
        let peer: [u8; ECDH_KEY_LEN] = peer_public
            .try_into()
            .map_err(|_| NegotiationError::BadEcdhKey(peer_public.len()))?;
        let shared = self.secret.diffie_hellman(&PublicKey::from(peer));
        Ok(derive_mac_key(shared.as_bytes(), link_id))
    }

    /// The link's header-MAC key, agreed with the peer whose public key is `peer_public`;
    /// `None` when the peer sent no key (a link without header MACs, which only a lenient
    /// side accepts: `check_request` / `check_reply` refuse it otherwise).
    pub fn header_mac(
        &self,
        peer_public: &[u8],
        link_id: &str,
    ) -> Result<Option<HeaderMacKey>, NegotiationError> {
        if peer_public.is_empty() {
            return Ok(None);
        }
        let key = self.derive_mac_key(peer_public, link_id)?;
        Ok(HeaderMacKey::new(&key, link_id))
    }
}

/// HKDF-SHA256(salt = link id, IKM = shared secret, info = the SLIM label), 32 bytes.
pub fn derive_mac_key(shared_secret: &[u8], link_id: &str) -> [u8; 32] {
    let hk = Hkdf::<Sha256>::new(Some(link_id.as_bytes()), shared_secret);
    let mut okm = [0u8; 32];
    hk.expand(HKDF_INFO, &mut okm)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    okm
}

/// What our side says about itself in a negotiation.
#[derive(Debug, Clone)]
pub struct LocalLinkInfo {
    pub slim_version: String,
    pub node_id: String,
    pub deployment_name: String,
}

/// Wraps a payload as a `Message`.
pub fn negotiation_message(payload: pb::LinkNegotiationPayload) -> pb::Message {
    pb::Message {
        message_type: Some(pb::message::MessageType::Link(pb::Link {
            link_type: Some(pb::link::LinkType::LinkNegotiation(payload)),
        })),
        metadata: Default::default(),
    }
}

/// The initiator's request.
pub fn request(
    info: &LocalLinkInfo,
    link_id: &str,
    connection_type: LinkConnectionType,
    public_key: [u8; ECDH_KEY_LEN],
) -> pb::LinkNegotiationPayload {
    pb::LinkNegotiationPayload {
        link_id: link_id.to_owned(),
        slim_version: info.slim_version.clone(),
        is_reply: false,
        link_ecdh_public_key: Bytes::copy_from_slice(&public_key),
        connection_type: connection_type as i32,
        node_id: info.node_id.clone(),
        deployment_name: info.deployment_name.clone(),
        link_kem_payload: None,
    }
}

/// The request an SDK client opens its link with (an Edge link, no deployment name).
pub fn edge_client_request(
    node_id: String,
    slim_version: &str,
    link_id: &str,
    keys: &LinkKeyPair,
) -> pb::LinkNegotiationPayload {
    let info = LocalLinkInfo {
        slim_version: slim_version.to_owned(),
        node_id,
        deployment_name: String::new(),
    };
    request(
        &info,
        link_id,
        LinkConnectionType::Edge,
        keys.public_bytes(),
    )
}

/// The responder's reply: echoes the link id and connection type, as every client requires.
pub fn reply(
    info: &LocalLinkInfo,
    request: &pb::LinkNegotiationPayload,
    public_key: [u8; ECDH_KEY_LEN],
) -> pb::LinkNegotiationPayload {
    pb::LinkNegotiationPayload {
        link_id: request.link_id.clone(),
        slim_version: info.slim_version.clone(),
        is_reply: true,
        link_ecdh_public_key: Bytes::copy_from_slice(&public_key),
        connection_type: request.connection_type,
        node_id: info.node_id.clone(),
        deployment_name: info.deployment_name.clone(),
        link_kem_payload: None,
    }
}

/// Extracts the negotiation payload of a message, if it is one.
pub fn as_negotiation(message: &pb::Message) -> Option<&pb::LinkNegotiationPayload> {
    match &message.message_type {
        Some(pb::message::MessageType::Link(pb::Link {
            link_type: Some(pb::link::LinkType::LinkNegotiation(payload)),
        })) => Some(payload),
        _ => None,
    }
}

fn check_version(version: &str) -> Result<(), NegotiationError> {
    semver::Version::parse(version)
        .map(|_| ())
        .map_err(|_| NegotiationError::BadVersion(version.to_owned()))
}

fn check_key(key: &[u8], require_mac: bool) -> Result<(), NegotiationError> {
    match key.len() {
        ECDH_KEY_LEN => Ok(()),
        0 if !require_mac => Ok(()),
        n => Err(NegotiationError::BadEcdhKey(n)),
    }
}

/// Responder-side checks of a request (spec §1.7).
pub fn check_request(
    request: &pb::LinkNegotiationPayload,
    require_mac: bool,
) -> Result<(), NegotiationError> {
    if request.is_reply {
        return Err(NegotiationError::UnexpectedReply);
    }
    if request.link_id.is_empty() {
        return Err(NegotiationError::EmptyLinkId);
    }
    if LinkConnectionType::try_from(request.connection_type).is_err() {
        return Err(NegotiationError::UnknownConnectionType(
            request.connection_type,
        ));
    }
    check_version(&request.slim_version)?;
    if request
        .link_kem_payload
        .as_ref()
        .is_some_and(|k| !k.is_empty())
    {
        return Err(NegotiationError::KemUnsupported);
    }
    check_key(&request.link_ecdh_public_key, require_mac)
}

/// Initiator-side checks of a reply.
pub fn check_reply(
    reply: &pb::LinkNegotiationPayload,
    sent_link_id: &str,
    require_mac: bool,
) -> Result<(), NegotiationError> {
    if !reply.is_reply {
        return Err(NegotiationError::NotAReply);
    }
    if reply.link_id != sent_link_id {
        return Err(NegotiationError::LinkIdMismatch {
            expected: sent_link_id.to_owned(),
            got: reply.link_id.clone(),
        });
    }
    check_version(&reply.slim_version)?;
    check_key(&reply.link_ecdh_public_key, require_mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys from captures/e_raw_mac_probe: a client with a known X25519 key against the reference node.
    #[test]
    fn derivation_matches_reference_probe() {
        let seed: [u8; 32] =
            hex::decode("0819db709850ff655c3e208f89a9a5c3f34bee1e4685dfe56cc345e9f097cd40")
                .unwrap()
                .try_into()
                .unwrap();
        let client = LinkKeyPair::from_seed(seed);
        assert_eq!(
            hex::encode(client.public_bytes()),
            "1b43279c961cb0d09cbeecea2f9635f7923b922c4940253454752573629c5449"
        );
        let node_public =
            hex::decode("788412bdb291e21ba37c31b9796894e6685e887b648d73b52475c865999b8d40")
                .unwrap();
        let key = client
            .derive_mac_key(&node_public, "raw-a-5570c669-8769-4a33-8bec-6bed21e550e7")
            .unwrap();
        assert_eq!(
            hex::encode(key),
            "22ca45bf636a8f7eb05244204c5bfc57ef42405f92243aeacfe490e2d939bf1c"
        );
    }

    #[test]
    fn both_sides_derive_the_same_key() {
        let a = LinkKeyPair::from_seed([1; 32]);
        let b = LinkKeyPair::from_seed([2; 32]);
        assert_eq!(
            a.derive_mac_key(&b.public_bytes(), "l").unwrap(),
            b.derive_mac_key(&a.public_bytes(), "l").unwrap()
        );
        assert_ne!(
            a.derive_mac_key(&b.public_bytes(), "l").unwrap(),
            a.derive_mac_key(&b.public_bytes(), "m").unwrap()
        );
    }

    fn info() -> LocalLinkInfo {
        LocalLinkInfo {
            slim_version: "3.4.6".into(),
            node_id: "node-x".into(),
            deployment_name: String::new(),
        }
    }

    #[test]
    fn an_edge_client_request_is_the_request_with_no_deployment() {
        let keys = LinkKeyPair::from_seed([4; 32]);
        let edge = edge_client_request("node-x".into(), "3.4.6", "abc", &keys);
        assert_eq!(
            edge,
            request(
                &info(),
                "abc",
                LinkConnectionType::Edge,
                keys.public_bytes()
            )
        );
        check_request(&edge, true).unwrap();
    }

    #[test]
    fn reply_echoes_link_id_and_type() {
        let req = request(&info(), "abc", LinkConnectionType::Edge, [9; 32]);
        check_request(&req, true).unwrap();
        let rep = reply(&info(), &req, [8; 32]);
        assert!(rep.is_reply);
        assert_eq!(rep.link_id, "abc");
        assert_eq!(rep.connection_type, LinkConnectionType::Edge as i32);
        check_reply(&rep, "abc", true).unwrap();
        assert!(matches!(
            check_reply(&rep, "other", true),
            Err(NegotiationError::LinkIdMismatch { .. })
        ));
    }

    #[test]
    fn request_checks() {
        let good = request(&info(), "abc", LinkConnectionType::Edge, [9; 32]);
        let mut r = good.clone();
        r.link_id.clear();
        assert_eq!(check_request(&r, true), Err(NegotiationError::EmptyLinkId));
        let mut r = good.clone();
        r.slim_version = "v1".into();
        assert!(matches!(
            check_request(&r, true),
            Err(NegotiationError::BadVersion(_))
        ));
        let mut r = good.clone();
        r.link_ecdh_public_key = Bytes::from_static(&[1; 31]);
        assert_eq!(
            check_request(&r, true),
            Err(NegotiationError::BadEcdhKey(31))
        );
        let mut r = good.clone();
        r.link_ecdh_public_key = Bytes::new();
        assert_eq!(
            check_request(&r, true),
            Err(NegotiationError::BadEcdhKey(0))
        );
        assert_eq!(check_request(&r, false), Ok(()));
        let mut r = good;
        r.is_reply = true;
        assert_eq!(
            check_request(&r, true),
            Err(NegotiationError::UnexpectedReply)
        );
    }
}
