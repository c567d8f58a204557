//! The frame of a forwarded publish, copied from the bytes it arrived in.
//!
//! A node changes only a few header fields of a publish it routes (TTL, the header MAC,
//! `recv_from`/`forward_to`/`incoming_conn`); the names, the token, the session header, the
//! payload and the metadata go out as they came in. Encoding the whole decoded message again
//! walks every name and string twice (length, then bytes) and was a fifth of the node's CPU per
//! routed message; copying the received fields and encoding only the changed ones gives the
//! same bytes.

use bytes::{BufMut, Bytes, BytesMut};
use prost::encoding::{self, WireType};

use crate::pb;

// Field numbers of dataplane.proto.v1 that the copy has to know.
const MESSAGE_PUBLISH: u32 = 3;
const MESSAGE_METADATA: u32 = 4;
const PUBLISH_HEADER: u32 = 1;
const PUBLISH_SESSION: u32 = 2;
const PUBLISH_MSG: u32 = 3;
/// Header fields copied as received; the others are the ones a node rewrites.
const HEADER_COPIED: [u32; 7] = [1, 2, 3, 4, 5, 10, 12];
const HEADER_TTL: u32 = 6;
const HEADER_RECV_FROM: u32 = 7;
const HEADER_FORWARD_TO: u32 = 8;
const HEADER_INCOMING_CONN: u32 = 9;
const HEADER_MAC: u32 = 11;

/// The gRPC frame of the publish received as `raw` (one encoded `Message`, without its frame
/// prefix), with the rewritable header fields taken from `header`: [`ForwardTemplate::parse`]
/// then [`ForwardTemplate::frame`].
pub fn forwarded_publish_frame(raw: &[u8], header: &pb::SlimHeader) -> Option<Bytes> {
    ForwardTemplate::parse(raw)?.frame(header)
}

/// A received publish split at the fields a node rewrites: parsed once per message, rendered
/// once per target (each link has its own MAC).
///
/// The fields keep their received order, and the rewritten ones take their place by field
/// number, so a message encoded by prost (every SLIM client, the reference node) comes out byte
/// for byte as encoding it again would. Unknown fields are dropped, as decoding and encoding
/// again would; the rest is kept as received, which reads the same even where a re-encode would
/// differ (a field repeated, a varint longer than needed).
#[derive(Debug)]
pub struct ForwardTemplate<'a> {
    /// Top level: metadata entries before and after the publish.
    before: Vec<&'a [u8]>,
    after: Vec<&'a [u8]>,
    /// In the publish: session header and content before and after its header.
    publish_before: Vec<&'a [u8]>,
    publish_after: Vec<&'a [u8]>,
    /// Header fields copied as received, with their field numbers.
    copied: Vec<(u32, &'a [u8])>,
}

impl<'a> ForwardTemplate<'a> {
    /// `None` when `raw` is not a plain publish (another message type, the publish or its
    /// header repeated, bytes that do not parse): the caller then encodes the decoded message.
    pub fn parse(raw: &'a [u8]) -> Option<Self> {
        let (mut before, mut after) = (Vec::new(), Vec::new());
        let mut publish = None;
        for field in Fields(raw) {
            let field = field?;
            match field.number {
                MESSAGE_PUBLISH if publish.is_none() => publish = Some(field.value()?),
                MESSAGE_METADATA if publish.is_none() => before.push(field.whole),
                MESSAGE_METADATA => after.push(field.whole),
                // Another message type (or a second publish) in the oneof: not a plain publish.
                1..=3 | 5 | 6 => return None,
                _ => {}
            }
        }
        let (mut publish_before, mut publish_after) = (Vec::new(), Vec::new());
        let mut header_in = None;
        for field in Fields(publish?) {
            let field = field?;
            match field.number {
                PUBLISH_HEADER if header_in.is_none() => header_in = Some(field.value()?),
                PUBLISH_HEADER => return None,
                PUBLISH_SESSION | PUBLISH_MSG if header_in.is_none() => {
                    publish_before.push(field.whole)
                }
                PUBLISH_SESSION | PUBLISH_MSG => publish_after.push(field.whole),
                _ => {}
            }
        }
        let mut copied = Vec::new();
        for field in Fields(header_in?) {
            let field = field?;
            if HEADER_COPIED.contains(&field.number) {
                copied.push((field.number, field.whole));
            }
        }
        Some(Self {
            before,
            after,
            publish_before,
            publish_after,
            copied,
        })
    }

    /// The frame with the rewritable header fields taken from `header` (`None` only past
    /// 4 GiB).
    pub fn frame(&self, header: &pb::SlimHeader) -> Option<Bytes> {
        let rewritten = rewritten(header);
        let rewritten = || {
            rewritten
                .iter()
                .filter_map(|(n, v)| Some((*n, v.as_ref()?)))
        };
        let header_len = self
            .copied
            .iter()
            .map(|(_, whole)| whole.len())
            .sum::<usize>()
            + rewritten()
                .map(|(number, value)| value.encoded_len(number))
                .sum::<usize>();
        let publish_len = total(&self.publish_before)
            + field_len(PUBLISH_HEADER, header_len)
            + total(&self.publish_after);
        let message_len =
            total(&self.before) + field_len(MESSAGE_PUBLISH, publish_len) + total(&self.after);

        let mut out = BytesMut::with_capacity(5 + message_len);
        out.put_u8(0);
        out.put_u32(u32::try_from(message_len).ok()?);
        put_all(&self.before, &mut out);
        encoding::encode_key(MESSAGE_PUBLISH, WireType::LengthDelimited, &mut out);
        encoding::encode_varint(publish_len as u64, &mut out);
        put_all(&self.publish_before, &mut out);
        encoding::encode_key(PUBLISH_HEADER, WireType::LengthDelimited, &mut out);
        encoding::encode_varint(header_len as u64, &mut out);
        let mut pending = rewritten().peekable();
        for (number, whole) in &self.copied {
            while let Some((pending_number, value)) = pending.next_if(|(n, _)| n < number) {
                value.encode(pending_number, &mut out);
            }
            out.put_slice(whole);
        }
        for (number, value) in pending {
            value.encode(number, &mut out);
        }
        put_all(&self.publish_after, &mut out);
        put_all(&self.after, &mut out);
        debug_assert_eq!(out.len(), 5 + message_len);
        Some(out.freeze())
    }
}

/// A rewritten header field's value.
enum Value<'a> {
    U32(u32),
    U64(u64),
    Bytes(&'a Bytes),
}

impl Value<'_> {
    fn encoded_len(&self, number: u32) -> usize {
        match self {
            Value::U32(v) => encoding::uint32::encoded_len(number, v),
            Value::U64(v) => encoding::uint64::encoded_len(number, v),
            Value::Bytes(v) => encoding::bytes::encoded_len(number, *v),
        }
    }

    fn encode(&self, number: u32, out: &mut BytesMut) {
        match self {
            Value::U32(v) => encoding::uint32::encode(number, v, out),
            Value::U64(v) => encoding::uint64::encode(number, v, out),
            Value::Bytes(v) => encoding::bytes::encode(number, *v, out),
        }
    }
}

/// The fields a node rewrites, by field number; absent ones are `None` (proto3: a zero TTL is
/// not encoded). An array: rendered once per target, it must not allocate.
fn rewritten(header: &pb::SlimHeader) -> [(u32, Option<Value<'_>>); 5] {
    [
        (
            HEADER_TTL,
            (header.ttl != 0).then_some(Value::U32(header.ttl)),
        ),
        (HEADER_RECV_FROM, header.recv_from.map(Value::U64)),
        (HEADER_FORWARD_TO, header.forward_to.map(Value::U64)),
        (HEADER_INCOMING_CONN, header.incoming_conn.map(Value::U64)),
        (HEADER_MAC, header.header_mac.as_ref().map(Value::Bytes)),
    ]
}

fn put_all(parts: &[&[u8]], out: &mut BytesMut) {
    for part in parts {
        out.put_slice(part);
    }
}

fn field_len(number: u32, len: usize) -> usize {
    encoding::key_len(number) + encoding::encoded_len_varint(len as u64) + len
}

fn total(parts: &[&[u8]]) -> usize {
    parts.iter().map(|part| part.len()).sum()
}

/// One field as received: its number, and its whole encoding (key, length, value).
struct Field<'a> {
    number: u32,
    wire_type: WireType,
    whole: &'a [u8],
    value_at: usize,
}

impl<'a> Field<'a> {
    /// The value of a length-delimited field.
    fn value(&self) -> Option<&'a [u8]> {
        (self.wire_type == WireType::LengthDelimited).then(|| &self.whole[self.value_at..])
    }
}

/// The fields of one encoded message, in order; an error ends the walk.
struct Fields<'a>(&'a [u8]);

impl<'a> Iterator for Fields<'a> {
    type Item = Option<Field<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let Some((field, rest)) = split_field(self.0) else {
            self.0 = &[];
            return Some(None);
        };
        self.0 = rest;
        Some(Some(field))
    }
}

fn split_field(bytes: &[u8]) -> Option<(Field<'_>, &[u8])> {
    let mut cursor = bytes;
    let key = encoding::decode_varint(&mut cursor).ok()?;
    let number = u32::try_from(key >> 3).ok().filter(|n| *n > 0)?;
    let wire_type = WireType::try_from(key & 7).ok()?;
    let value_len = match wire_type {
        WireType::Varint => {
            let before = cursor.len();
            let mut probe = cursor;
            encoding::decode_varint(&mut probe).ok()?;
            before - probe.len()
        }
        WireType::SixtyFourBit => 8,
        WireType::ThirtyTwoBit => 4,
        WireType::LengthDelimited => {
            usize::try_from(encoding::decode_varint(&mut cursor).ok()?).ok()?
        }
        WireType::StartGroup | WireType::EndGroup => return None,
    };
    let value_at = bytes.len() - cursor.len();
    let end = value_at
        .checked_add(value_len)
        .filter(|end| *end <= bytes.len())?;
    let (whole, rest) = bytes.split_at(end);
    Some((
        Field {
            number,
            wire_type,
            whole,
            value_at,
        },
        rest,
    ))
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;
    use crate::encode_frame;

    fn name(tag: u64) -> pb::Name {
        pb::Name {
            name: Some(pb::EncodedName {
                component_0: u64::MAX - tag,
                component_1: tag,
                component_2: 1 << 40,
                name_id: Some(pb::NameId { id_0: 0, id_1: tag }),
            }),
            str_name: Some(pb::StringName {
                str_component_0: "org".into(),
                str_component_1: "ns".into(),
                str_component_2: format!("svc{tag}"),
            }),
        }
    }

    fn publish(variant: u32) -> pb::Message {
        let header = pb::SlimHeader {
            source: Some(name(1)),
            destination: variant.is_multiple_of(2).then(|| name(2)),
            identity: "token".repeat(variant as usize % 4),
            fanout: variant % 3,
            version: "2.0.0".into(),
            ttl: variant % 9,
            recv_from: (variant % 5 == 1).then_some(7),
            forward_to: (variant % 7 == 2).then_some(u64::MAX),
            incoming_conn: (variant % 2 == 1).then_some(3),
            error: (variant % 4 == 3).then_some(variant % 8 == 7),
            header_mac: variant.is_multiple_of(3).then(|| Bytes::from(vec![9; 32])),
            e2e_header_sig: variant.is_multiple_of(5).then(|| Bytes::from(vec![4; 70])),
        };
        let mut metadata = std::collections::BTreeMap::new();
        for i in 0..variant % 3 {
            metadata.insert(format!("k{i}"), format!("v{i}"));
        }
        pb::Message {
            message_type: Some(pb::message::MessageType::Publish(pb::Publish {
                header: Some(header),
                session: (variant % 3 != 1).then(|| pb::SessionHeader {
                    session_id: variant,
                    message_id: variant * 3,
                    ..Default::default()
                }),
                msg: (variant % 4 != 2).then(|| pb::Content {
                    content_type: Some(pb::content::ContentType::AppPayload(
                        pb::ApplicationPayload {
                            payload_type: "bytes".into(),
                            blob: Bytes::from(vec![variant as u8; variant as usize * 10]),
                        },
                    )),
                }),
            })),
            metadata,
        }
    }

    fn header_of(message: &mut pb::Message) -> &mut pb::SlimHeader {
        match &mut message.message_type {
            Some(pb::message::MessageType::Publish(p)) => {
                p.header.get_or_insert_with(Default::default)
            }
            _ => unreachable!("publish() builds publishes"),
        }
    }

    /// From bytes prost encoded (as every SLIM client and the reference node do), the copy is
    /// byte for byte the full encode, whichever fields are present.
    #[test]
    fn the_copy_is_the_full_encode_byte_for_byte() {
        for variant in 0..200 {
            let received = publish(variant);
            let raw = received.encode_to_vec();
            let mut routed = received.clone();
            let header = header_of(&mut routed);
            header.ttl = header.ttl.saturating_sub(1);
            header.incoming_conn = Some(u64::from(variant) * 1000);
            header.recv_from = None;
            header.forward_to = None;
            header.header_mac = variant
                .is_multiple_of(2)
                .then(|| Bytes::from(vec![variant as u8; 32]));
            let copied = forwarded_publish_frame(&raw, header).expect("a plain publish");
            assert_eq!(copied, encode_frame(&routed), "variant {variant}");
        }
    }

    #[test]
    fn other_messages_and_repeated_fields_are_left_to_the_full_encode() {
        let header = pb::SlimHeader::default();
        let subscribe = pb::Message {
            message_type: Some(pb::message::MessageType::Subscribe(Default::default())),
            metadata: Default::default(),
        };
        assert!(forwarded_publish_frame(&subscribe.encode_to_vec(), &header).is_none());
        let raw = publish(4).encode_to_vec();
        let twice = [raw.clone(), raw.clone()].concat();
        assert!(forwarded_publish_frame(&twice, &header).is_none());
        assert!(forwarded_publish_frame(&raw[..raw.len() - 1], &header).is_none());
        assert!(forwarded_publish_frame(&[0xff; 12], &header).is_none());
    }

    #[test]
    fn unknown_fields_are_dropped_as_a_full_encode_would() {
        let received = publish(6);
        let mut raw = received.encode_to_vec();
        // Field 15, varint 1, at the top level: a decoder skips it, and so does the copy.
        raw.extend_from_slice(&[15 << 3, 1]);
        let header = match &received.message_type {
            Some(pb::message::MessageType::Publish(p)) => p.header.clone().unwrap(),
            _ => unreachable!(),
        };
        let copied = forwarded_publish_frame(&raw, &header).unwrap();
        assert_eq!(copied, encode_frame(&received));
    }
}
