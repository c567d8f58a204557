//! The SLIM 2.x wire format (see `../shared/spec/slim-wire.md` §1).
//!
//! * [`pb`] — the prost types of `dataplane.proto.v1`, generated at build time from `proto/`.
//! * [`name`] — hierarchical names, component hashing and instance ids.
//! * [`framing`] — the gRPC 5-byte length-prefixed message codec.
//! * [`forward`] — a routed publish's frame copied from the bytes it arrived in.
//! * [`mac`] — the per-link header MAC (HMAC-SHA256 over the canonical header pre-image).
//! * [`memo`] — a link's last received header, so that its repeats are not decoded again.
//! * [`link`] — link negotiation payloads and the X25519/HKDF key derivation.
//! * [`validate`] — the structural rules a node applies to every received message.
//! * [`view`] — borrowed views of a header's routing fields (decoded or as received).
//! * [`message`] — building and reading the publishes applications exchange.
//!
//! Everything here is pure: no I/O, no clock, no global randomness.

mod encode;
pub mod forward;
pub mod framing;
pub mod link;
pub mod mac;
pub mod memo;
pub mod message;
pub mod name;
pub mod validate;
pub mod view;

/// Generated protobuf types (`package dataplane.proto.v1`).
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/dataplane.proto.v1.rs"));
}

pub use forward::{
    decode_message, decode_message_on_link, decode_message_on_link_unless_kept,
    decode_plain_publish, forwarded_header, forwarded_publish_frame, ForwardTemplate, PublishView,
    Rewrite, RoutingFields,
};
pub use framing::{encode_frame, Deframer, FrameError, DEFAULT_MAX_MESSAGE_SIZE};
pub use link::{LinkKeyPair, NegotiationError};
pub use mac::{HeaderMacKey, MacError};
pub use memo::{HeaderSeen, ReceivedHeader, SentHeader};
pub use message::Received;
pub use name::{Name, NameKey, NameParseError};
pub use validate::{validate, ValidationError};
pub use view::{EncodedRef, HeaderRef, NameRef};

/// gRPC path of the one bidirectional stream a SLIM node serves.
pub const OPEN_CHANNEL_PATH: &str = "/dataplane.proto.v1.DataPlaneService/OpenChannel";

/// TTL every SLIM sender sets on new messages.
pub const DEFAULT_TTL: u32 = 8;
