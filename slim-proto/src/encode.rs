//! Encoding of data publishes, byte for byte as prost encodes them, but with every nested
//! length computed once.
//!
//! prost writes a nested message's length by asking it for `encoded_len()`, which asks its own
//! nested messages, and so on: a name's id (five levels down in a publish) has its length
//! computed five times per encode, and its 64-bit hashes make every varint ten bytes. In a
//! client that was a quarter of its instructions per message. Here each part's length is
//! computed once, bottom-up, and the bytes are written into one buffer of the exact size.
//!
//! Only `Message { Publish { .. } }` with application content (or none) is encoded here; any
//! other message goes to prost. Structs are destructured field by field, so a field added to
//! the `.proto` breaks this module's build instead of being left out of the encoding. Tests
//! compare the output with prost's on every shape the generator makes.

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};
use prost::encoding::encoded_len_varint;

use crate::framing::PREFIX_LEN;
use crate::pb;

const VARINT: u32 = 0;
const LENGTH_DELIMITED: u32 = 2;

/// The message with its gRPC prefix, as [`crate::framing::encode_frame`]; `None` for the
/// messages left to prost.
pub(crate) fn publish_frame(message: &pb::Message) -> Option<Bytes> {
    publish_frame_with(message, None).map(|(frame, _)| frame)
}

/// [`publish_frame`], with the header's encoding taken from `encoded_header` when given (it
/// must be the encoding of the message's header: see [`crate::memo::SentHeader`]); with
/// where the header's encoding lies in the frame.
pub(crate) fn publish_frame_with(
    message: &pb::Message,
    encoded_header: Option<&[u8]>,
) -> Option<(Bytes, Range<usize>)> {
    let pb::Message {
        metadata,
        message_type,
    } = message;
    let Some(pb::message::MessageType::Publish(publish)) = message_type else {
        return None;
    };
    let pb::Publish {
        header,
        session,
        msg,
    } = publish;
    if !encodes_content(msg.as_ref()) {
        return None;
    }
    let app = match msg.as_ref().map(|c| &c.content_type) {
        Some(Some(pb::content::ContentType::AppPayload(app))) => Some(Some(app)),
        Some(_) => Some(None),
        None => None,
    };

    let header_len = match (header, encoded_header) {
        (Some(_), Some(encoded)) => Some(HeaderLen::Encoded(encoded)),
        (Some(header), None) => Some(HeaderLen::Measured(HeaderLens::of(header))),
        (None, _) => None,
    };
    let session_len = session.as_ref().map(session_len);
    let content_len = app.map(|app| app.map_or(0, |a| field_len(1, app_payload_len(a))));
    let publish_len = header_len.as_ref().map_or(0, |h| field_len(1, h.total()))
        + session_len.map_or(0, |len| field_len(2, len))
        + content_len.map_or(0, |len| field_len(3, len));
    let metadata_len: usize = metadata
        .iter()
        .map(|(k, v)| field_len(4, string_len(1, k) + string_len(2, v)))
        .sum();
    let total = field_len(3, publish_len) + metadata_len;

    let mut out = Writer(BytesMut::with_capacity(
        PREFIX_LEN + total + Writer::VARINT_SLACK,
    ));
    out.0.put_u8(0);
    out.0.put_u32(u32::try_from(total).ok()?);
    out.len_key(3, publish_len);
    let mut header_at = 0..0;
    if let (Some(header), Some(len)) = (header, &header_len) {
        out.len_key(1, len.total());
        let start = out.0.len();
        match len {
            HeaderLen::Encoded(encoded) => out.0.put_slice(encoded),
            HeaderLen::Measured(lens) => out.header(header, lens),
        }
        header_at = start..out.0.len();
    }
    if let (Some(session), Some(len)) = (session, session_len) {
        out.len_key(2, len);
        out.session(session);
    }
    if let Some(app) = app {
        out.len_key(3, content_len.unwrap_or(0));
        if let Some(app) = app {
            out.len_key(1, app_payload_len(app));
            out.string(1, &app.payload_type);
            out.bytes(2, &app.blob);
        }
    }
    for (key, value) in metadata {
        out.len_key(4, string_len(1, key) + string_len(2, value));
        out.string(1, key);
        out.string(2, value);
    }
    debug_assert_eq!(out.0.len(), PREFIX_LEN + total);
    Some((out.0.freeze(), header_at))
}

/// Whether [`publish_frame`] encodes a publish with this content (else prost does).
pub(crate) fn encodes_content(content: Option<&pb::Content>) -> bool {
    !matches!(
        content.and_then(|c| c.content_type.as_ref()),
        Some(pb::content::ContentType::CommandPayload(_))
    )
}

/// A header's length: measured for encoding, or of its encoding at hand.
enum HeaderLen<'a> {
    Measured(HeaderLens),
    Encoded(&'a [u8]),
}

impl HeaderLen<'_> {
    fn total(&self) -> usize {
        match self {
            HeaderLen::Measured(lens) => lens.total,
            HeaderLen::Encoded(encoded) => encoded.len(),
        }
    }
}

/// Lengths of a header and of its two names, each computed once.
struct HeaderLens {
    source: Option<NameLens>,
    destination: Option<NameLens>,
    total: usize,
}

impl HeaderLens {
    fn of(header: &pb::SlimHeader) -> Self {
        let pb::SlimHeader {
            source,
            destination,
            identity,
            fanout,
            version,
            ttl,
            recv_from,
            forward_to,
            incoming_conn,
            error,
            header_mac,
            e2e_header_sig,
        } = header;
        let source = source.as_ref().map(NameLens::of);
        let destination = destination.as_ref().map(NameLens::of);
        let total = source.as_ref().map_or(0, |n| field_len(1, n.total))
            + destination.as_ref().map_or(0, |n| field_len(2, n.total))
            + string_len(3, identity)
            + uint_len(4, u64::from(*fanout))
            + string_len(5, version)
            + uint_len(6, u64::from(*ttl))
            + recv_from.map_or(0, |v| 1 + encoded_len_varint(v))
            + forward_to.map_or(0, |v| 1 + encoded_len_varint(v))
            + incoming_conn.map_or(0, |v| 1 + encoded_len_varint(v))
            + error.map_or(0, |_| 2)
            + header_mac.as_ref().map_or(0, |b| field_len(11, b.len()))
            + e2e_header_sig
                .as_ref()
                .map_or(0, |b| field_len(12, b.len()));
        Self {
            source,
            destination,
            total,
        }
    }
}

struct NameLens {
    encoded: Option<usize>,
    id: Option<usize>,
    strings: Option<usize>,
    total: usize,
}

impl NameLens {
    fn of(name: &pb::Name) -> Self {
        let pb::Name {
            name: encoded,
            str_name,
        } = name;
        let (encoded, id) = match encoded {
            Some(pb::EncodedName {
                component_0,
                component_1,
                component_2,
                name_id,
            }) => {
                let id = name_id
                    .as_ref()
                    .map(|pb::NameId { id_0, id_1 }| uint_len(1, *id_0) + uint_len(2, *id_1));
                let len = uint_len(1, *component_0)
                    + uint_len(2, *component_1)
                    + uint_len(3, *component_2)
                    + id.map_or(0, |len| field_len(4, len));
                (Some(len), id)
            }
            None => (None, None),
        };
        let strings = str_name.as_ref().map(
            |pb::StringName {
                 str_component_0,
                 str_component_1,
                 str_component_2,
             }| {
                string_len(1, str_component_0)
                    + string_len(2, str_component_1)
                    + string_len(3, str_component_2)
            },
        );
        let total =
            encoded.map_or(0, |len| field_len(1, len)) + strings.map_or(0, |len| field_len(2, len));
        Self {
            encoded,
            id,
            strings,
            total,
        }
    }
}

fn session_len(session: &pb::SessionHeader) -> usize {
    let pb::SessionHeader {
        session_type,
        session_message_type,
        session_id,
        message_id,
    } = session;
    int32_len(1, *session_type)
        + int32_len(2, *session_message_type)
        + uint_len(3, u64::from(*session_id))
        + uint_len(4, u64::from(*message_id))
}

fn app_payload_len(app: &pb::ApplicationPayload) -> usize {
    let pb::ApplicationPayload { payload_type, blob } = app;
    string_len(1, payload_type) + bytes_len(2, blob)
}

/// A length-delimited field (key, length, body). Every tag here is below 16: one key byte.
fn field_len(_tag: u32, len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

/// A proto3 scalar: left out when zero.
fn uint_len(_tag: u32, value: u64) -> usize {
    if value == 0 {
        0
    } else {
        1 + encoded_len_varint(value)
    }
}

/// An enum or int32: negative values take ten bytes (sign-extended), as prost writes them.
fn int32_len(tag: u32, value: i32) -> usize {
    uint_len(tag, i64::from(value) as u64)
}

fn string_len(tag: u32, text: &str) -> usize {
    bytes_len(tag, text.as_bytes())
}

fn bytes_len(tag: u32, bytes: &[u8]) -> usize {
    if bytes.is_empty() {
        0
    } else {
        field_len(tag, bytes.len())
    }
}

/// The low 56 bits of `value` as eight 7-bit groups, group `i` in byte `i` (little-endian).
fn spread_groups(value: u64) -> u64 {
    let x = value & 0x00ff_ffff_ffff_ffff;
    // 28-bit halves into 32-bit lanes, 14-bit quarters into 16-bit lanes, 7-bit groups into bytes.
    let x = (x & 0x0000_0000_0fff_ffff) | (x & 0x00ff_ffff_f000_0000) << 4;
    let x = (x & 0x0000_3fff_0000_3fff) | (x & 0x0fff_c000_0fff_c000) << 2;
    (x & 0x007f_007f_007f_007f) | (x & 0x3f80_3f80_3f80_3f80) << 1
}

/// The continuation bits of a varint of `len` bytes (index), for its first eight bytes and its
/// last two: set on every byte but the last.
const CONTINUATION: [(u64, u16); 11] = {
    let mut table = [(0, 0); 11];
    let mut len = 2;
    while len <= 10 {
        let mut byte = 0;
        while byte < len - 1 {
            if byte < 8 {
                table[len].0 |= 0x80 << (8 * byte);
            } else {
                table[len].1 |= 0x80 << (8 * (byte - 8));
            }
            byte += 1;
        }
        len += 1;
    }
    table
};

struct Writer(BytesMut);

impl Writer {
    /// Spare capacity past the message's end, so that `varint` can always write ten bytes.
    const VARINT_SLACK: usize = 10;

    #[inline(always)]
    fn varint(&mut self, value: u64) {
        // Most are keys and lengths of one byte: inline those, call for the rest.
        if value < 0x80 {
            self.0.put_u8(value as u8);
        } else {
            self.long_varint(value);
        }
    }

    /// A varint of two bytes or more in two fixed-size writes (eight bytes, then two), cut back
    /// to its length: ten-byte hashes are common in names, and a copy of a variable length is a
    /// call to `memcpy`. The bytes are built in registers, without a branch on the value:
    /// setting one byte of an array in memory and then copying the array as a word stalled
    /// the store-to-load forwarding (perf: most of this function's cycles, 4.5 % of a bench
    /// client's).
    #[inline(never)]
    fn long_varint(&mut self, value: u64) {
        let len = (64 - value.leading_zeros() as usize).div_ceil(7);
        let (low_continuation, high_continuation) = CONTINUATION[len];
        let high = ((value >> 56) & 0x7f) as u16 | ((value >> 63) as u16) << 8;
        let end = self.0.len() + len;
        self.0.put_u64_le(spread_groups(value) | low_continuation);
        self.0.put_u16_le(high | high_continuation);
        self.0.truncate(end);
    }

    fn key(&mut self, tag: u32, wire_type: u32) {
        self.0.put_u8((tag << 3 | wire_type) as u8);
    }

    fn len_key(&mut self, tag: u32, len: usize) {
        self.key(tag, LENGTH_DELIMITED);
        self.varint(len as u64);
    }

    fn uint(&mut self, tag: u32, value: u64) {
        if value != 0 {
            self.key(tag, VARINT);
            self.varint(value);
        }
    }

    fn optional_uint(&mut self, tag: u32, value: Option<u64>) {
        if let Some(value) = value {
            self.key(tag, VARINT);
            self.varint(value);
        }
    }

    fn bytes(&mut self, tag: u32, bytes: &[u8]) {
        if !bytes.is_empty() {
            self.len_key(tag, bytes.len());
            self.0.put_slice(bytes);
        }
    }

    fn string(&mut self, tag: u32, text: &str) {
        self.bytes(tag, text.as_bytes());
    }

    fn optional_bytes(&mut self, tag: u32, bytes: Option<&Bytes>) {
        if let Some(bytes) = bytes {
            self.len_key(tag, bytes.len());
            self.0.put_slice(bytes);
        }
    }

    /// Writes the fields [`HeaderLens::of`] measured (its destructuring is what makes a new
    /// field break the build; the tests' generator sets every field, so one left out here fails
    /// them).
    fn header(&mut self, h: &pb::SlimHeader, lens: &HeaderLens) {
        if let (Some(name), Some(lens)) = (&h.source, &lens.source) {
            self.len_key(1, lens.total);
            self.name(name, lens);
        }
        if let (Some(name), Some(lens)) = (&h.destination, &lens.destination) {
            self.len_key(2, lens.total);
            self.name(name, lens);
        }
        self.string(3, &h.identity);
        self.uint(4, u64::from(h.fanout));
        self.string(5, &h.version);
        self.uint(6, u64::from(h.ttl));
        self.optional_uint(7, h.recv_from);
        self.optional_uint(8, h.forward_to);
        self.optional_uint(9, h.incoming_conn);
        self.optional_uint(10, h.error.map(u64::from));
        self.optional_bytes(11, h.header_mac.as_ref());
        self.optional_bytes(12, h.e2e_header_sig.as_ref());
    }

    fn name(&mut self, name: &pb::Name, lens: &NameLens) {
        if let (Some(encoded), Some(len)) = (&name.name, lens.encoded) {
            self.len_key(1, len);
            self.uint(1, encoded.component_0);
            self.uint(2, encoded.component_1);
            self.uint(3, encoded.component_2);
            if let (Some(id), Some(len)) = (&encoded.name_id, lens.id) {
                self.len_key(4, len);
                self.uint(1, id.id_0);
                self.uint(2, id.id_1);
            }
        }
        if let (Some(strings), Some(len)) = (&name.str_name, lens.strings) {
            self.len_key(2, len);
            self.string(1, &strings.str_component_0);
            self.string(2, &strings.str_component_1);
            self.string(3, &strings.str_component_2);
        }
    }

    fn session(&mut self, session: &pb::SessionHeader) {
        self.uint(1, i64::from(session.session_type) as u64);
        self.uint(2, i64::from(session.session_message_type) as u64);
        self.uint(3, u64::from(session.session_id));
        self.uint(4, u64::from(session.message_id));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use prost::Message as _;

    fn prost_frame(message: &pb::Message) -> Vec<u8> {
        let body = message.encode_to_vec();
        let mut frame = vec![0];
        frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
        frame.extend_from_slice(&body);
        frame
    }

    /// Zero, small, and full ten-byte values, so both "left out" and every varint length occur.
    fn number() -> impl Strategy<Value = u64> {
        prop_oneof![Just(0u64), 1u64..200, any::<u64>()]
    }

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            "[a-z/-]{1,12}",
            "\\PC{0,40}",
            "x{130,300}"
        ]
    }

    fn blob() -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(Bytes::from)
    }

    fn name() -> impl Strategy<Value = pb::Name> {
        let id = proptest::option::of(
            (number(), number()).prop_map(|(id_0, id_1)| pb::NameId { id_0, id_1 }),
        );
        let encoded = proptest::option::of((number(), number(), number(), id).prop_map(
            |(component_0, component_1, component_2, name_id)| pb::EncodedName {
                component_0,
                component_1,
                component_2,
                name_id,
            },
        ));
        let strings =
            proptest::option::of(
                (text(), text(), text()).prop_map(|(a, b, c)| pb::StringName {
                    str_component_0: a,
                    str_component_1: b,
                    str_component_2: c,
                }),
            );
        (encoded, strings).prop_map(|(name, str_name)| pb::Name { name, str_name })
    }

    fn header() -> impl Strategy<Value = pb::SlimHeader> {
        (
            (
                proptest::option::of(name()),
                proptest::option::of(name()),
                text(),
                number(),
                text(),
                number(),
            ),
            (
                proptest::option::of(number()),
                proptest::option::of(number()),
                proptest::option::of(number()),
                proptest::option::of(any::<bool>()),
                proptest::option::of(blob()),
                proptest::option::of(blob()),
            ),
        )
            .prop_map(
                |(
                    (source, destination, identity, fanout, version, ttl),
                    (recv_from, forward_to, incoming_conn, error, header_mac, e2e_header_sig),
                )| {
                    pb::SlimHeader {
                        source,
                        destination,
                        identity,
                        fanout: fanout as u32,
                        version,
                        ttl: ttl as u32,
                        recv_from,
                        forward_to,
                        incoming_conn,
                        error,
                        header_mac,
                        e2e_header_sig,
                    }
                },
            )
    }

    fn session() -> impl Strategy<Value = pb::SessionHeader> {
        // Enums out of range and negative too: prost writes whatever i32 it holds.
        let enumeration = prop_oneof![Just(0i32), 0i32..25, any::<i32>()];
        (enumeration.clone(), enumeration, number(), number()).prop_map(|(t, m, s, id)| {
            pb::SessionHeader {
                session_type: t,
                session_message_type: m,
                session_id: s as u32,
                message_id: id as u32,
            }
        })
    }

    fn content() -> impl Strategy<Value = Option<pb::Content>> {
        let app = (text(), blob())
            .prop_map(|(payload_type, blob)| pb::ApplicationPayload { payload_type, blob });
        proptest::option::of(proptest::option::of(app).prop_map(|app| pb::Content {
            content_type: app.map(pb::content::ContentType::AppPayload),
        }))
    }

    fn publish_message() -> impl Strategy<Value = pb::Message> {
        (
            proptest::option::of(header()),
            proptest::option::of(session()),
            content(),
            proptest::collection::btree_map(text(), text(), 0..4),
        )
            .prop_map(|(header, session, msg, metadata)| pb::Message {
                message_type: Some(pb::message::MessageType::Publish(pb::Publish {
                    header,
                    session,
                    msg,
                })),
                metadata,
            })
    }

    /// Every length (each bit position set, with and without all the bits below it) and the
    /// values around each length's limits write what prost writes.
    #[test]
    fn varints_encode_as_prost_encodes_them() {
        let mut values = vec![0, u64::MAX];
        for bit in 0..64 {
            let power = 1u64 << bit;
            values.extend([power, power - 1, power | (power - 1), power + 1]);
        }
        values.extend((0..1000u64).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
        for value in values {
            let mut out = Writer(BytesMut::with_capacity(Writer::VARINT_SLACK + 1));
            out.0.put_u8(0xaa);
            out.varint(value);
            let mut expected = vec![0xaa];
            prost::encoding::encode_varint(value, &mut expected);
            assert_eq!(&out.0[..], &expected[..], "{value:#x}");
        }
    }

    #[test]
    fn publishes_encode_as_prost_encodes_them() {
        // The strategy is deep: run it on a thread with room for it (debug builds).
        std::thread::Builder::new()
            .stack_size(64 << 20)
            .spawn(|| {
                let mut runner =
                    proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(2000));
                runner
                    .run(&publish_message(), |message| {
                        let fast =
                            publish_frame(&message).expect("a publish with application content");
                        prop_assert_eq!(&fast[..], &prost_frame(&message)[..]);
                        Ok(())
                    })
                    .unwrap();
            })
            .unwrap()
            .join()
            .unwrap();
    }

    /// Runs `check` on generated publishes, on a thread with room for the deep strategy.
    pub(crate) fn for_publishes(
        cases: u32,
        check: impl Fn(pb::Message, Vec<usize>) -> Result<(), TestCaseError> + Send + 'static,
    ) {
        std::thread::Builder::new()
            .stack_size(64 << 20)
            .spawn(move || {
                let mut runner =
                    proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(cases));
                let cuts = proptest::collection::vec(any::<usize>(), 0..4);
                runner
                    .run(&(publish_message(), cuts), |(message, cuts)| {
                        check(message, cuts)
                    })
                    .unwrap();
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn plain_publishes_decode_as_prost_decodes_them() {
        for_publishes(2000, |message, _| {
            let body = Bytes::from(message.encode_to_vec());
            let fast = crate::decode_plain_publish(&body).expect("a plain publish");
            prop_assert_eq!(&*fast, &message);
            prop_assert_eq!(*crate::decode_message(body).unwrap(), message);
            Ok(())
        });
    }

    #[test]
    fn damaged_publishes_decode_as_prost_or_are_left_to_it() {
        // Bytes flipped, cut short or repeated: whatever the fast decoder accepts, prost
        // decodes to the same message.
        for_publishes(3000, |message, cuts| {
            let mut raw = message.encode_to_vec();
            for cut in cuts {
                if raw.is_empty() {
                    break;
                }
                let at = cut % raw.len();
                match cut % 4 {
                    0 => raw[at] ^= 1 << (cut % 8),
                    1 => raw.truncate(at),
                    2 => raw.extend_from_within(at..),
                    _ => raw[at] = (cut >> 8) as u8,
                }
            }
            let body = Bytes::from(raw);
            if let Some(fast) = crate::decode_plain_publish(&body) {
                prop_assert_eq!(Some(*fast), pb::Message::decode(body).ok());
            }
            Ok(())
        });
    }

    fn varint_field(out: &mut Vec<u8>, tag: u32, value: u64) {
        use prost::encoding::{encode_key, encode_varint, WireType};
        encode_key(tag, WireType::Varint, out);
        encode_varint(value, out);
    }

    fn len_field(out: &mut Vec<u8>, tag: u32, body: &[u8]) {
        use prost::encoding::{encode_key, encode_varint, WireType};
        encode_key(tag, WireType::LengthDelimited, out);
        encode_varint(body.len() as u64, out);
        out.extend_from_slice(body);
    }

    /// Bytes prost accepts but would never write: the fast decoder must read them as prost does.
    #[test]
    fn unusual_but_valid_encodings_decode_as_prost_decodes_them() {
        // In field order (the in-order read) and out of it (the generic walk).
        for in_order in [true, false] {
            let mut header = Vec::new();
            varint_field(&mut header, 4, (1 << 33) + 5); // uint32 fanout: truncated
            varint_field(&mut header, 6, u64::MAX); // uint32 ttl
            if in_order {
                varint_field(&mut header, 7, 0); // optional, present although zero
            }
            varint_field(&mut header, 10, 2); // bool error: any non-zero is true
            if !in_order {
                varint_field(&mut header, 7, 0);
            }
            len_field(&mut header, 11, b""); // optional bytes, present although empty
            check_unusual(&header);
        }
    }

    /// A publish around `header` with an unusual session header, content and metadata.
    fn check_unusual(header: &[u8]) {
        let mut session = Vec::new();
        varint_field(&mut session, 1, (1 << 40) + 3); // enum: truncated to i32
        varint_field(&mut session, 2, u64::MAX); // -1
        varint_field(&mut session, 3, 0); // a zero written anyway
        let mut publish = Vec::new();
        len_field(&mut publish, 2, &session); // session before header
        len_field(&mut publish, 1, header);
        len_field(&mut publish, 3, b""); // empty content
        let entry = |key: &[u8], value: &[u8]| {
            let mut entry = Vec::new();
            len_field(&mut entry, 2, value); // value before key
            len_field(&mut entry, 1, key);
            entry
        };
        let mut raw = Vec::new();
        len_field(&mut raw, 4, &entry(b"k", b"first"));
        len_field(&mut raw, 3, &publish);
        len_field(&mut raw, 4, &entry(b"k", b"second")); // a repeated key: the later wins
        len_field(&mut raw, 4, &entry(b"", b"")); // empty key and value
        let body = Bytes::from(raw);
        let fast = crate::decode_plain_publish(&body).expect("a plain publish");
        assert_eq!(*fast, pb::Message::decode(body).unwrap());
        assert_eq!(fast.metadata["k"], "second");
    }

    #[test]
    fn other_messages_are_left_to_prost() {
        let command = pb::Message {
            message_type: Some(pb::message::MessageType::Publish(pb::Publish {
                header: None,
                session: None,
                msg: Some(pb::Content {
                    content_type: Some(pb::content::ContentType::CommandPayload(
                        pb::CommandPayload::default(),
                    )),
                }),
            })),
            metadata: Default::default(),
        };
        assert!(publish_frame(&command).is_none());
        let subscribe = pb::Message {
            message_type: Some(pb::message::MessageType::Subscribe(pb::Subscribe::default())),
            metadata: Default::default(),
        };
        assert!(publish_frame(&subscribe).is_none());
        assert!(publish_frame(&pb::Message::default()).is_none());
    }
}
