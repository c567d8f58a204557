//! Reading the clear parts of RFC 9420 `MLSMessage`s without a group: what a session layer (or
//! a test against captured reference traffic) can learn before handing bytes to a
//! [`super::GroupCore`].

use openmls::prelude::{ContentType, MlsMessageBodyIn, MlsMessageIn, ProtocolMessage};
use tls_codec::Deserialize as _;

/// The kind of an `MLSMessage` (its `wire_format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MlsKind {
    PublicMessage,
    PrivateMessage,
    Welcome,
    GroupInfo,
    KeyPackage,
    Other,
}

/// The content type of a Public/PrivateMessage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MlsContent {
    Application,
    Proposal,
    Commit,
}

/// The clear-text facts of an `MLSMessage`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MlsInfo {
    pub kind: MlsKind,
    /// Ciphersuite code point (KeyPackage, Welcome, GroupInfo).
    pub suite: Option<u16>,
    /// Group id and epoch (Public/PrivateMessage, GroupInfo).
    pub group_id: Option<Vec<u8>>,
    pub epoch: Option<u64>,
    pub content: Option<MlsContent>,
    /// PrivateMessage `authenticated_data` (sent in the clear).
    pub authenticated_data: Option<Vec<u8>>,
    /// Welcome: the key-package references its secrets are encrypted to.
    pub welcome_recipients: Vec<Vec<u8>>,
}

/// Why bytes are not an `MLSMessage`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InspectError {
    #[error("not a TLS-encoded MLSMessage (or trailing bytes)")]
    Malformed,
}

fn content(ct: ContentType) -> MlsContent {
    match ct {
        ContentType::Application => MlsContent::Application,
        ContentType::Proposal => MlsContent::Proposal,
        ContentType::Commit => MlsContent::Commit,
    }
}

/// Parses `bytes` as one `MLSMessage` (no trailing bytes) and returns its clear-text facts.
pub fn inspect(bytes: &[u8]) -> Result<MlsInfo, InspectError> {
    let message =
        MlsMessageIn::tls_deserialize_exact(bytes).map_err(|_| InspectError::Malformed)?;
    let mut info = MlsInfo {
        kind: MlsKind::Other,
        suite: None,
        group_id: None,
        epoch: None,
        content: None,
        authenticated_data: None,
        welcome_recipients: Vec::new(),
    };
    match message.extract() {
        MlsMessageBodyIn::PublicMessage(m) => {
            let m = ProtocolMessage::from(m);
            info.kind = MlsKind::PublicMessage;
            info.group_id = Some(m.group_id().as_slice().to_vec());
            info.epoch = Some(m.epoch().as_u64());
            info.content = Some(content(m.content_type()));
        }
        MlsMessageBodyIn::PrivateMessage(m) => {
            info.kind = MlsKind::PrivateMessage;
            info.authenticated_data = Some(m.aad().to_vec());
            info.group_id = Some(m.group_id().as_slice().to_vec());
            info.epoch = Some(m.epoch().as_u64());
            info.content = Some(content(m.content_type()));
        }
        MlsMessageBodyIn::Welcome(w) => {
            info.kind = MlsKind::Welcome;
            info.suite = Some(u16::from(w.ciphersuite()));
            info.welcome_recipients = w
                .secrets()
                .iter()
                .map(|s| s.new_member().as_slice().to_vec())
                .collect();
        }
        MlsMessageBodyIn::GroupInfo(g) => {
            info.kind = MlsKind::GroupInfo;
            info.suite = Some(u16::from(g.ciphersuite()));
            info.group_id = Some(g.group_id().as_slice().to_vec());
            info.epoch = Some(g.epoch().as_u64());
        }
        MlsMessageBodyIn::KeyPackage(_) => {
            info.kind = MlsKind::KeyPackage;
            // MLSMessage{version u16, wire_format u16, KeyPackage{version u16, cipher_suite u16, ..}}
            info.suite = bytes.get(6..8).map(|b| u16::from_be_bytes([b[0], b[1]]));
        }
        #[allow(unreachable_patterns)]
        _ => {}
    }
    Ok(info)
}
