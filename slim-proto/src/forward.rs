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
use smallvec::SmallVec;

use crate::memo::{HeaderSeen, ReceivedHeader};
use crate::pb;
use crate::view::{EncodedRef, HeaderRef, NameRef};

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
    ForwardTemplate::parse(raw)?.frame(&Rewrite::from(header))
}

/// The header fields a node rewrites when it forwards a publish; absent ones are `None`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rewrite<'a> {
    pub ttl: u32,
    pub recv_from: Option<u64>,
    pub forward_to: Option<u64>,
    pub incoming_conn: Option<u64>,
    pub header_mac: Option<&'a [u8]>,
}

impl<'a> From<&'a pb::SlimHeader> for Rewrite<'a> {
    fn from(header: &'a pb::SlimHeader) -> Self {
        Self {
            ttl: header.ttl,
            recv_from: header.recv_from,
            forward_to: header.forward_to,
            incoming_conn: header.incoming_conn,
            header_mac: header.header_mac.as_deref(),
        }
    }
}

impl Rewrite<'_> {
    /// Sets these fields on a decoded header.
    pub fn apply(&self, header: &mut pb::SlimHeader) {
        header.ttl = self.ttl;
        header.recv_from = self.recv_from;
        header.forward_to = self.forward_to;
        header.incoming_conn = self.incoming_conn;
        header.header_mac = self.header_mac.map(Bytes::copy_from_slice);
    }
}

/// Whole encoded fields copied as they are. Inline: a publish has its session header and
/// content and seldom metadata, and four vectors allocated per routed message were 4 % of the
/// node's instructions.
type Parts<'a> = SmallVec<[&'a [u8]; 2]>;

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
    before: Parts<'a>,
    after: Parts<'a>,
    /// In the publish: session header and content before and after its header.
    publish_before: Parts<'a>,
    publish_after: Parts<'a>,
    /// Header fields copied as received, with their field numbers (`None`: the header was
    /// not read, being a repeat: see [`PublishView::repeated_header`]).
    copied: Option<Vec<(u32, &'a [u8])>>,
}

/// A received publish read without decoding it: its template, and its routing fields where
/// they can be read in place.
#[derive(Debug)]
pub struct PublishView<'a> {
    pub template: ForwardTemplate<'a>,
    /// Read only from a data publish that decoding would accept and give exactly these fields:
    /// every field known and present at most once with its wire type, every string UTF-8, the
    /// header's names with their encoded parts, a session header, and an application payload
    /// (or no content). Anything else (a session control message, unknown or repeated fields,
    /// anything malformed) has `None`, and must be decoded, with the same outcome (and the
    /// same errors) as if this view did not exist.
    pub routing: Option<RoutingFields<'a>>,
    /// The header's bytes were the `repeat` given to [`PublishView::parse_on_link`], and the
    /// rest of the publish reads as [`PublishView::routing`] requires: the header read last
    /// time stands for this one (its fields were not read again, and `routing` is `None`).
    pub repeated_header: bool,
    /// The header's bytes (of a plain publish: `routing` read, or `repeated_header`).
    pub header_bytes: Option<&'a [u8]>,
}

/// The header of a publish as [`PublishView`] reads it in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoutingFields<'a> {
    pub header: HeaderRef<'a>,
    pub header_mac: Option<&'a [u8]>,
}

impl<'a> PublishView<'a> {
    /// `None` when `raw` is not a plain publish (see [`ForwardTemplate::parse`]).
    pub fn parse(raw: &'a [u8]) -> Option<Self> {
        ForwardTemplate::walk(raw, true, None)
    }

    /// [`PublishView::parse`], except that a header whose bytes are `repeat` (a header this
    /// link sent before, which the caller read then) is not read again: see
    /// [`PublishView::repeated_header`].
    pub fn parse_on_link(raw: &'a [u8], repeat: Option<&[u8]>) -> Option<Self> {
        ForwardTemplate::walk(raw, true, repeat)
    }
}

impl<'a> ForwardTemplate<'a> {
    /// `None` when `raw` is not a plain publish (another message type, the publish or its
    /// header repeated, bytes that do not parse): the caller then encodes the decoded message.
    pub fn parse(raw: &'a [u8]) -> Option<Self> {
        Self::walk(raw, false, None).map(|view| view.template)
    }

    /// The template, and if `strict`, the read of [`PublishView::routing`] where the publish
    /// allows one.
    fn walk(raw: &'a [u8], mut strict: bool, repeat: Option<&[u8]>) -> Option<PublishView<'a>> {
        let (mut before, mut after) = (Parts::new(), Parts::new());
        let mut publish = None;
        for field in Fields(raw) {
            let field = field?;
            match field.number {
                MESSAGE_PUBLISH if publish.is_none() => publish = Some(field.value()?),
                MESSAGE_METADATA => {
                    strict = strict && field.value().is_some_and(metadata_entry_is_plain);
                    if publish.is_none() {
                        before.push(field.whole);
                    } else {
                        after.push(field.whole);
                    }
                }
                // Another message type (or a second publish) in the oneof: not a plain publish.
                1..=3 | 5 | 6 => return None,
                _ => strict = false,
            }
        }
        let (mut publish_before, mut publish_after) = (Parts::new(), Parts::new());
        let mut header_in = None;
        let (mut session_seen, mut content_seen) = (false, false);
        for field in Fields(publish?) {
            let field = field?;
            match field.number {
                PUBLISH_HEADER if header_in.is_none() => header_in = Some(field.value()?),
                PUBLISH_HEADER => return None,
                PUBLISH_SESSION | PUBLISH_MSG => {
                    let (seen, plain): (&mut bool, fn(&[u8]) -> bool) =
                        if field.number == PUBLISH_SESSION {
                            (&mut session_seen, session_is_plain)
                        } else {
                            (&mut content_seen, content_is_app_payload)
                        };
                    let first = !std::mem::replace(seen, true);
                    strict = strict && first && field.value().is_some_and(plain);
                    if header_in.is_none() {
                        publish_before.push(field.whole);
                    } else {
                        publish_after.push(field.whole);
                    }
                }
                _ => strict = false,
            }
        }
        let header_in = header_in?;
        let repeated_header = strict && session_seen && repeat == Some(header_in);
        let mut copied = None;
        let mut header = HeaderRead::default();
        if repeated_header {
            strict = false;
        } else {
            let copied = copied.insert(Vec::with_capacity(HEADER_COPIED.len()));
            for field in Fields(header_in) {
                let field = field?;
                if HEADER_COPIED.contains(&field.number) {
                    copied.push((field.number, field.whole));
                }
                strict = strict && header.read(&field).is_some();
            }
        }
        let routable = |name: Option<NameRef<'_>>| name.is_some_and(|n| n.encoded.is_some());
        let routing = (strict
            && session_seen
            && routable(header.fields.source)
            && routable(header.fields.destination))
        .then_some(RoutingFields {
            header: header.fields,
            header_mac: header.mac,
        });
        let header_bytes = (routing.is_some() || repeated_header).then_some(header_in);
        let template = Self {
            before,
            after,
            publish_before,
            publish_after,
            copied,
        };
        Some(PublishView {
            template,
            routing,
            repeated_header,
            header_bytes,
        })
    }

    /// The frame with the rewritten header fields (`None` past 4 GiB, or when the header was
    /// not read: see [`PublishView::parse_on_link`]).
    pub fn frame(&self, rewrite: &Rewrite<'_>) -> Option<Bytes> {
        let copied = self.copied.as_deref()?;
        let header = ForwardedHeader { copied, rewrite };
        self.frame_around(header.len(), |out| header.put(out))
    }

    /// The frame with `header` (a header's whole encoding, as [`forwarded_header`] gives it)
    /// in place of the received one (`None` only past 4 GiB).
    pub fn frame_with_header(&self, header: &[u8]) -> Option<Bytes> {
        self.frame_around(header.len(), |out| out.put_slice(header))
    }

    /// The frame, with a header of `header_len` bytes written by `put_header`.
    fn frame_around(
        &self,
        header_len: usize,
        put_header: impl FnOnce(&mut BytesMut),
    ) -> Option<Bytes> {
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
        put_header(&mut out);
        put_all(&self.publish_after, &mut out);
        put_all(&self.after, &mut out);
        debug_assert_eq!(out.len(), 5 + message_len);
        Some(out.freeze())
    }
}

/// The encoding of the header received as `raw` (its value, without key and length) with the
/// rewritten fields taken from `rewrite`, as a forwarded frame carries it; `None` when `raw`
/// does not parse. For [`ForwardTemplate::frame_with_header`].
pub fn forwarded_header(raw: &[u8], rewrite: &Rewrite<'_>) -> Option<Vec<u8>> {
    let mut copied = Vec::with_capacity(HEADER_COPIED.len());
    for field in Fields(raw) {
        let field = field?;
        if HEADER_COPIED.contains(&field.number) {
            copied.push((field.number, field.whole));
        }
    }
    let header = ForwardedHeader {
        copied: &copied,
        rewrite,
    };
    let mut out = BytesMut::with_capacity(header.len());
    header.put(&mut out);
    Some(out.to_vec())
}

/// A forwarded header: the fields copied as received, with the rewritten ones in their places
/// by field number.
struct ForwardedHeader<'a, 'b> {
    copied: &'b [(u32, &'a [u8])],
    rewrite: &'b Rewrite<'a>,
}

impl ForwardedHeader<'_, '_> {
    fn rewritten(&self) -> impl Iterator<Item = (u32, Value<'_>)> {
        rewritten(self.rewrite)
            .into_iter()
            .filter_map(|(n, v)| Some((n, v?)))
    }

    fn len(&self) -> usize {
        self.copied
            .iter()
            .map(|(_, whole)| whole.len())
            .sum::<usize>()
            + self
                .rewritten()
                .map(|(number, value)| value.encoded_len(number))
                .sum::<usize>()
    }

    fn put(&self, out: &mut BytesMut) {
        let mut pending = self.rewritten().peekable();
        for (number, whole) in self.copied {
            while let Some((pending_number, value)) = pending.next_if(|(n, _)| n < number) {
                value.encode(pending_number, out);
            }
            out.put_slice(whole);
        }
        for (number, value) in pending {
            value.encode(number, out);
        }
    }
}

/// Decodes one `Message` as prost does, without prost for a plain data publish: the fields of
/// a publish, its header, names, session header, application payload and metadata, each at
/// most once and with the wire type decoding expects. prost decodes anything else (or errs).
///
/// prost spends most of a client's decode walking nested messages through generic merge
/// loops; the strict walk of [`PublishView`] reads the same bytes directly, and byte fields
/// share `body` instead of being copied.
///
/// Boxed: a message is large, and it is handed on as it is (see `Router::handle_message`).
pub fn decode_message(body: Bytes) -> Result<Box<pb::Message>, prost::DecodeError> {
    match decode_plain_publish(&body) {
        Some(message) => Ok(message),
        None => prost::Message::decode(body).map(Box::new),
    }
}

/// [`decode_message`] for a message received on the link whose last header `memo` keeps: a
/// plain publish with the same header bytes gets a copy of the kept header instead of a
/// decode. The message is the same either way; [`HeaderSeen`] says how it relates to `memo`.
pub fn decode_message_on_link(
    body: Bytes,
    memo: &mut ReceivedHeader,
) -> Result<(Box<pb::Message>, HeaderSeen), prost::DecodeError> {
    let (mut message, seen) = decode_message_on_link_unless_kept(body, memo)?;
    if seen == HeaderSeen::Repeated {
        if let Some(pb::message::MessageType::Publish(publish)) = &mut message.message_type {
            publish.header = memo.kept_header().cloned();
        }
    }
    Ok((message, seen))
}

/// [`decode_message_on_link`] without the copy of a repeated header: a publish seen as
/// [`HeaderSeen::Repeated`] comes without its header, which is `memo`'s
/// [`ReceivedHeader::kept_header`]. For a receiver that reads the header only now and then.
pub fn decode_message_on_link_unless_kept(
    body: Bytes,
    memo: &mut ReceivedHeader,
) -> Result<(Box<pb::Message>, HeaderSeen), prost::DecodeError> {
    let mut seen = HeaderSeen::NotKept;
    let plain = decode_plain_publish_with(&body, |raw, body| {
        let (header, how) = memo.decode_unless_kept(raw, |raw| decode_header(raw, body))?;
        seen = how;
        Some(header)
    });
    match plain {
        Some(message) => Ok((message, seen)),
        None => {
            prost::Message::decode(body).map(|message| (Box::new(message), HeaderSeen::NotKept))
        }
    }
}

/// A plain publish decoded in one strict walk; `None` for anything else, including input
/// prost would reject or read differently (repeated or unknown fields, wrong wire types, bad
/// UTF-8, a command payload).
pub fn decode_plain_publish(body: &Bytes) -> Option<Box<pb::Message>> {
    decode_plain_publish_with(body, |raw, body| decode_header(raw, body).map(Some))
}

/// [`decode_plain_publish`] with the header read by `header` (given its bytes within `body`;
/// `Some(None)`: the message is left without it).
#[inline(always)]
fn decode_plain_publish_with(
    body: &Bytes,
    header: impl FnOnce(&[u8], &Bytes) -> Option<Option<pb::SlimHeader>>,
) -> Option<Box<pb::Message>> {
    let bytes = |value: &[u8]| body.slice_ref(value);
    let mut metadata = std::collections::BTreeMap::new();
    let mut publish = None;
    for field in Fields(body) {
        let field = field?;
        match field.number {
            MESSAGE_PUBLISH if publish.is_none() => publish = Some(field.value()?),
            MESSAGE_METADATA => {
                let (mut key, mut value) = ("", "");
                read_once(field.value()?, |part| {
                    match part.number {
                        1 => key = part.string()?,
                        2 => value = part.string()?,
                        _ => return None,
                    }
                    Some(())
                })?;
                // A repeated key: the later entry wins, as in prost's map merge.
                metadata.insert(key.to_owned(), value.to_owned());
            }
            _ => return None,
        }
    }
    // Filled in place, in its box: built on the stack it was copied at every level.
    let mut message = Box::new(pb::Message {
        metadata,
        message_type: Some(pb::message::MessageType::Publish(pb::Publish::default())),
    });
    let Some(pb::message::MessageType::Publish(out)) = &mut message.message_type else {
        return None;
    };
    // The header (names and token: most of the allocations) is decoded last, once the rest is
    // known to be plain: a session control message then costs the walk, not a wasted decode,
    // before prost.
    let mut header_raw = None;
    read_once(publish?, |field| {
        match field.number {
            PUBLISH_HEADER => header_raw = Some(field.value()?),
            PUBLISH_SESSION => {
                let mut session = pb::SessionHeader::default();
                read_once(field.value()?, |part| {
                    let v = part.varint()?;
                    match part.number {
                        1 => session.session_type = v as i32,
                        2 => session.session_message_type = v as i32,
                        3 => session.session_id = v as u32,
                        4 => session.message_id = v as u32,
                        _ => return None,
                    }
                    Some(())
                })?;
                out.session = Some(session);
            }
            PUBLISH_MSG => {
                let mut content = pb::Content::default();
                read_once(field.value()?, |part| {
                    (part.number == 1).then_some(())?;
                    let mut app = pb::ApplicationPayload::default();
                    read_once(part.value()?, |inner| {
                        match inner.number {
                            1 => app.payload_type = inner.string()?.to_owned(),
                            2 => app.blob = bytes(inner.value()?),
                            _ => return None,
                        }
                        Some(())
                    })?;
                    content.content_type = Some(pb::content::ContentType::AppPayload(app));
                    Some(())
                })?;
                out.msg = Some(content);
            }
            _ => return None,
        }
        Some(())
    })?;
    if let Some(raw) = header_raw {
        out.header = header(raw, body)?;
    }
    Some(message)
}

#[inline(always)]
fn decode_header(raw: &[u8], body: &Bytes) -> Option<pb::SlimHeader> {
    let bytes = |value: &[u8]| body.slice_ref(value);
    match ordered_header(raw, &bytes) {
        Some(header) => Some(header),
        None => decode_header_walk(raw, &bytes),
    }
}

/// [`decode_header`] of a header in any field order.
#[inline(never)]
fn decode_header_walk(raw: &[u8], bytes: &impl Fn(&[u8]) -> Bytes) -> Option<pb::SlimHeader> {
    let mut h = pb::SlimHeader::default();
    read_once(raw, |field| {
        match field.number {
            1 => h.source = Some(name_ref(field.value()?)?.to_pb()),
            2 => h.destination = Some(name_ref(field.value()?)?.to_pb()),
            3 => h.identity = field.string()?.to_owned(),
            4 => h.fanout = field.varint()? as u32,
            5 => h.version = field.string()?.to_owned(),
            6 => h.ttl = field.varint()? as u32,
            HEADER_RECV_FROM => h.recv_from = Some(field.varint()?),
            HEADER_FORWARD_TO => h.forward_to = Some(field.varint()?),
            HEADER_INCOMING_CONN => h.incoming_conn = Some(field.varint()?),
            10 => h.error = Some(field.varint()? != 0),
            HEADER_MAC => h.header_mac = Some(bytes(field.value()?)),
            12 => h.e2e_header_sig = Some(bytes(field.value()?)),
            _ => return None,
        }
        Some(())
    })?;
    Some(h)
}

/// A header's fields as a strict read finds them, each field number at most once.
#[derive(Default)]
struct HeaderRead<'a> {
    fields: HeaderRef<'a>,
    mac: Option<&'a [u8]>,
    seen: u16,
}

impl<'a> HeaderRead<'a> {
    /// `None` if decoding would not give exactly the field read (unknown, repeated, wrong wire
    /// type, bad UTF-8).
    fn read(&mut self, field: &Field<'a>) -> Option<()> {
        let bit = 1u16
            .checked_shl(field.number)
            .filter(|_| field.number <= 12)?;
        if self.seen & bit != 0 {
            return None;
        }
        self.seen |= bit;
        let h = &mut self.fields;
        match field.number {
            1 => h.source = Some(name_ref(field.value()?)?),
            2 => h.destination = Some(name_ref(field.value()?)?),
            3 => h.identity = field.string()?,
            4 => h.fanout = field.varint()? as u32,
            5 => {
                field.string()?; // version: not routed on, but decoding checks it
            }
            6 => h.ttl = field.varint()? as u32,
            HEADER_RECV_FROM => h.recv_from = Some(field.varint()?),
            HEADER_FORWARD_TO => h.forward_to = Some(field.varint()?),
            HEADER_INCOMING_CONN => {
                field.varint()?; // rewritten by every receiver
            }
            10 => h.error = Some(field.varint()? != 0),
            HEADER_MAC => self.mac = Some(field.value()?),
            12 => {
                field.value()?;
            }
            _ => return None,
        }
        Some(())
    }
}

/// Reads the fields of `bytes`, each number at most once; `None` as [`HeaderRead::read`].
fn read_once<'a>(bytes: &'a [u8], mut read: impl FnMut(&Field<'a>) -> Option<()>) -> Option<()> {
    let mut seen = 0u32;
    for field in Fields(bytes) {
        let field = field?;
        let bit = 1u32.checked_shl(field.number)?;
        if seen & bit != 0 {
            return None;
        }
        seen |= bit;
        read(&field)?;
    }
    Some(())
}

/// Inlined, with [`ordered_name`], as the other readers of a header's parts below: a view or
/// header returned through memory was read back whole just after the callee wrote it in
/// parts, a store-forwarding stall (perf: 12–17 % of `decode_header`'s cycles on each such
/// read in the bench clients).
#[inline(always)]
fn name_ref(bytes: &[u8]) -> Option<NameRef<'_>> {
    match ordered_name(bytes) {
        Some(name) => Some(name),
        None => name_ref_walk(bytes),
    }
}

/// [`name_ref`] of a name in any field order.
#[inline(never)]
fn name_ref_walk(bytes: &[u8]) -> Option<NameRef<'_>> {
    let mut name = NameRef::default();
    read_once(bytes, |field| {
        match field.number {
            1 => name.encoded = Some(encoded_ref(field.value()?)?),
            2 => {
                let mut strings = [""; 3];
                read_once(field.value()?, |part| {
                    let slot = strings.get_mut(usize::try_from(part.number).ok()? - 1)?;
                    *slot = part.string()?;
                    Some(())
                })?;
                name.strings = Some(strings);
            }
            _ => return None,
        }
        Some(())
    })?;
    Some(name)
}

/// A header laid out as encoders write it (see [`ordered_name`]); `None` for any other layout,
/// which [`decode_header`]'s walk then reads.
#[inline(always)]
fn ordered_header(raw: &[u8], bytes: &impl Fn(&[u8]) -> Bytes) -> Option<pb::SlimHeader> {
    let mut r = Ordered(raw);
    let name = |r: &mut Ordered<'_>, key| match r.length_delimited(key)? {
        None => Some(None),
        Some(value) => name_ref(value).map(|n| Some(n.to_pb())),
    };
    let source = name(&mut r, 0x0a)?;
    let destination = name(&mut r, 0x12)?;
    let header = pb::SlimHeader {
        source,
        destination,
        identity: r.string(0x1a)?.to_owned(),
        fanout: r.varint(0x20)? as u32,
        version: r.string(0x2a)?.to_owned(),
        ttl: r.varint(0x30)? as u32,
        recv_from: r.optional_varint(0x38)?,
        forward_to: r.optional_varint(0x40)?,
        incoming_conn: r.optional_varint(0x48)?,
        error: r.optional_varint(0x50)?.map(|v| v != 0),
        header_mac: r.length_delimited(0x5a)?.map(bytes),
        e2e_header_sig: r.length_delimited(0x62)?.map(bytes),
    };
    r.end()?;
    Some(header)
}

/// A name laid out as encoders write it: every field at most once, in field-number order,
/// with one-byte keys. Read front to back without the generic walk (names are most of a
/// publish's fields); `None` for any other layout, which [`name_ref`]'s walk then reads.
#[inline(always)]
fn ordered_name(bytes: &[u8]) -> Option<NameRef<'_>> {
    let mut name = Ordered(bytes);
    let encoded = name.length_delimited(0x0a)?;
    let strings = name.length_delimited(0x12)?;
    name.end()?;
    let encoded = match encoded {
        None => None,
        Some(bytes) => {
            let mut e = Ordered(bytes);
            let components = [e.varint(0x08)?, e.varint(0x10)?, e.varint(0x18)?];
            let id = e.length_delimited(0x22)?;
            e.end()?;
            let name_id = match id {
                None => None,
                Some(bytes) => {
                    let mut id = Ordered(bytes);
                    let pair = (id.varint(0x08)?, id.varint(0x10)?);
                    id.end()?;
                    Some(pair)
                }
            };
            Some(EncodedRef {
                components,
                name_id,
            })
        }
    };
    let strings = match strings {
        None => None,
        Some(bytes) => {
            let mut s = Ordered(bytes);
            let parts = [s.string(0x0a)?, s.string(0x12)?, s.string(0x1a)?];
            s.end()?;
            Some(parts)
        }
    };
    Some(NameRef { encoded, strings })
}

/// Fields read in order, each optional: a field whose one-byte key is not next is absent.
/// Whatever is left at [`Ordered::end`] (a field out of order, repeated or unknown) makes the
/// read fail, so what it accepts reads as the generic walk reads it.
struct Ordered<'a>(&'a [u8]);

impl<'a> Ordered<'a> {
    fn take_key(&mut self, key: u8) -> bool {
        match self.0.split_first() {
            Some((&first, rest)) if first == key => {
                self.0 = rest;
                true
            }
            _ => false,
        }
    }

    /// The varint field's value (0 when absent); `None` if it does not decode.
    fn varint(&mut self, key: u8) -> Option<u64> {
        if !self.take_key(key) {
            return Some(0);
        }
        let (value, len) = varint(self.0)?;
        self.0 = &self.0[len..];
        Some(value)
    }

    /// An `optional` varint field: `Some(None)` when absent; `None` if it does not decode.
    fn optional_varint(&mut self, key: u8) -> Option<Option<u64>> {
        if self.0.first() != Some(&key) {
            return Some(None);
        }
        self.varint(key).map(Some)
    }

    /// `Some(None)` when absent; `None` if it does not decode.
    fn length_delimited(&mut self, key: u8) -> Option<Option<&'a [u8]>> {
        if !self.take_key(key) {
            return Some(None);
        }
        let (len, len_len) = varint(self.0)?;
        let end = usize::try_from(len).ok()?.checked_add(len_len)?;
        let value = self.0.get(len_len..end)?;
        self.0 = &self.0[end..];
        Some(Some(value))
    }

    fn string(&mut self, key: u8) -> Option<&'a str> {
        match self.length_delimited(key)? {
            None => Some(""),
            Some(bytes) => std::str::from_utf8(bytes).ok(),
        }
    }

    fn end(&self) -> Option<()> {
        self.0.is_empty().then_some(())
    }
}

fn encoded_ref(bytes: &[u8]) -> Option<EncodedRef> {
    let mut encoded = EncodedRef::default();
    read_once(bytes, |field| {
        match field.number {
            1..=3 => encoded.components[field.number as usize - 1] = field.varint()?,
            4 => {
                let mut id = (0, 0);
                read_once(field.value()?, |part| {
                    match part.number {
                        1 => id.0 = part.varint()?,
                        2 => id.1 = part.varint()?,
                        _ => return None,
                    }
                    Some(())
                })?;
                encoded.name_id = Some(id);
            }
            _ => return None,
        }
        Some(())
    })?;
    Some(encoded)
}

/// A `SessionHeader`: four varints (two enums decoding accepts whatever their value).
fn session_is_plain(bytes: &[u8]) -> bool {
    read_once(bytes, |field| {
        matches!(field.number, 1..=4).then_some(())?;
        field.varint().map(|_| ())
    })
    .is_some()
}

/// A `Content` that is empty or an `ApplicationPayload` (a session's data, not its control).
fn content_is_app_payload(bytes: &[u8]) -> bool {
    read_once(bytes, |field| {
        (field.number == 1).then_some(())?;
        read_once(field.value()?, |part| match part.number {
            1 => part.string().map(|_| ()),
            2 => part.value().map(|_| ()),
            _ => None,
        })
    })
    .is_some()
}

/// A `metadata` map entry: a string key and a string value.
fn metadata_entry_is_plain(bytes: &[u8]) -> bool {
    read_once(bytes, |field| {
        matches!(field.number, 1 | 2).then_some(())?;
        field.string().map(|_| ())
    })
    .is_some()
}

/// A rewritten header field's value.
enum Value<'a> {
    U32(u32),
    U64(u64),
    Bytes(&'a [u8]),
}

impl Value<'_> {
    fn encoded_len(&self, number: u32) -> usize {
        match self {
            Value::U32(v) => encoding::uint32::encoded_len(number, v),
            Value::U64(v) => encoding::uint64::encoded_len(number, v),
            Value::Bytes(v) => field_len(number, v.len()),
        }
    }

    fn encode(&self, number: u32, out: &mut BytesMut) {
        match self {
            Value::U32(v) => encoding::uint32::encode(number, v, out),
            Value::U64(v) => encoding::uint64::encode(number, v, out),
            Value::Bytes(v) => {
                encoding::encode_key(number, WireType::LengthDelimited, out);
                encoding::encode_varint(v.len() as u64, out);
                out.put_slice(v);
            }
        }
    }
}

/// The fields a node rewrites, by field number; absent ones are `None` (proto3: a zero TTL is
/// not encoded). An array: rendered once per target, it must not allocate.
fn rewritten<'a>(rewrite: &Rewrite<'a>) -> [(u32, Option<Value<'a>>); 5] {
    [
        (
            HEADER_TTL,
            (rewrite.ttl != 0).then_some(Value::U32(rewrite.ttl)),
        ),
        (HEADER_RECV_FROM, rewrite.recv_from.map(Value::U64)),
        (HEADER_FORWARD_TO, rewrite.forward_to.map(Value::U64)),
        (HEADER_INCOMING_CONN, rewrite.incoming_conn.map(Value::U64)),
        (HEADER_MAC, rewrite.header_mac.map(Value::Bytes)),
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
    /// The value of a varint field (0 for the other wire types).
    varint: u64,
}

impl<'a> Field<'a> {
    /// The value of a length-delimited field.
    #[inline]
    fn value(&self) -> Option<&'a [u8]> {
        (self.wire_type == WireType::LengthDelimited).then(|| &self.whole[self.value_at..])
    }

    /// The value of a `string` field, as decoding checks it.
    #[inline]
    fn string(&self) -> Option<&'a str> {
        std::str::from_utf8(self.value()?).ok()
    }

    /// The value of a varint field, as decoding reads it (narrower types truncate it).
    #[inline]
    fn varint(&self) -> Option<u64> {
        (self.wire_type == WireType::Varint).then_some(self.varint)
    }
}

/// The fields of one encoded message, in order; an error ends the walk.
struct Fields<'a>(&'a [u8]);

impl<'a> Iterator for Fields<'a> {
    type Item = Option<Field<'a>>;

    #[inline]
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

/// A varint at the start of `bytes` and its length; `None` where prost's decoder fails (cut
/// short, more than ten bytes, or past 64 bits). The router reads every field of a publish
/// this way, most of them one-byte keys and lengths or 64-bit name hashes ten bytes long: the
/// long ones are gathered eight bytes at a time.
#[inline]
fn varint(bytes: &[u8]) -> Option<(u64, usize)> {
    match bytes.first() {
        Some(&byte) if byte < 0x80 => return Some((u64::from(byte), 1)),
        None => return None,
        Some(_) => {}
    }
    let Some(&first8) = bytes.first_chunk::<8>() else {
        return varint_bytewise(bytes);
    };
    let word = u64::from_le_bytes(first8);
    let ends = !word & 0x8080_8080_8080_8080;
    if ends != 0 {
        let len = (ends.trailing_zeros() / 8 + 1) as usize;
        let kept = if len == 8 {
            word
        } else {
            word & ((1u64 << (8 * len)) - 1)
        };
        return Some((gather7(kept), len));
    }
    let low = gather7(word);
    let ninth = *bytes.get(8)?;
    if ninth < 0x80 {
        return Some((low | (u64::from(ninth) << 56), 9));
    }
    let tenth = *bytes.get(9)?;
    (tenth <= 1).then_some((
        low | (u64::from(ninth & 0x7f) << 56) | (u64::from(tenth) << 63),
        10,
    ))
}

/// The low seven bits of each of the eight bytes of `word`, packed into 56 bits.
#[inline]
fn gather7(word: u64) -> u64 {
    let x = word & 0x7f7f_7f7f_7f7f_7f7f;
    let x = (x & 0x007f_007f_007f_007f) | ((x & 0x7f00_7f00_7f00_7f00) >> 1);
    let x = (x & 0x0000_3fff_0000_3fff) | ((x & 0x3fff_0000_3fff_0000) >> 2);
    (x & 0x0000_0000_0fff_ffff) | ((x & 0x0fff_ffff_0000_0000) >> 4)
}

/// [`varint`] near the end of a buffer, one byte at a time.
fn varint_bytewise(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, &byte) in bytes.iter().take(10).enumerate() {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            return (i < 9 || byte <= 1).then_some((value, i + 1));
        }
    }
    None
}

/// Always inlined: returned through memory, the field was written in parts and read back
/// whole by the caller, a store-forwarding stall (perf: a third of `ForwardTemplate::walk`'s
/// cycles on the instruction after the call).
#[inline(always)]
fn split_field(bytes: &[u8]) -> Option<(Field<'_>, &[u8])> {
    let (key, key_len) = varint(bytes)?;
    let number = u32::try_from(key >> 3).ok().filter(|n| *n > 0)?;
    let wire_type = WireType::try_from(key & 7).ok()?;
    let mut value_at = key_len;
    let mut value = 0;
    let value_len = match wire_type {
        WireType::Varint => {
            let (v, len) = varint(&bytes[value_at..])?;
            value = v;
            len
        }
        WireType::SixtyFourBit => 8,
        WireType::ThirtyTwoBit => 4,
        WireType::LengthDelimited => {
            let (len, len_len) = varint(&bytes[value_at..])?;
            value_at += len_len;
            usize::try_from(len).ok()?
        }
        WireType::StartGroup | WireType::EndGroup => return None,
    };
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
            varint: value,
        },
        rest,
    ))
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;
    use crate::encode_frame;

    /// A header as encoders write it takes the in-order read, optional fields kept apart from
    /// absent ones.
    #[test]
    fn headers_in_field_order_are_read_without_the_walk() {
        let header = pb::SlimHeader {
            source: Some(name(1)),
            destination: Some(name(2)),
            identity: "token".into(),
            fanout: 1,
            version: "0.1".into(),
            ttl: 8,
            recv_from: Some(0),
            forward_to: None,
            incoming_conn: Some(u64::MAX),
            error: Some(false),
            header_mac: Some(Bytes::from_static(b"mac")),
            e2e_header_sig: None,
        };
        let raw = header.encode_to_vec();
        let copy = |value: &[u8]| Bytes::copy_from_slice(value);
        assert_eq!(ordered_header(&raw, &copy), Some(header));
    }

    /// Names as encoders write them take the in-order read, and it reads what decoding gives;
    /// any zero, empty or absent part just leaves that field out.
    #[test]
    fn names_in_field_order_are_read_without_the_walk() {
        let full = pb::Name {
            name: Some(pb::EncodedName {
                component_0: u64::MAX,
                component_1: 1,
                component_2: 1 << 40,
                name_id: Some(pb::NameId {
                    id_0: 0, // left out, as small ids' high half
                    id_1: u64::MAX - 1,
                }),
            }),
            str_name: Some(pb::StringName {
                str_component_0: "org".into(),
                str_component_1: String::new(),
                str_component_2: "svc-é".into(),
            }),
        };
        let no_id = pb::Name {
            name: full.name.map(|e| pb::EncodedName { name_id: None, ..e }),
            str_name: None,
        };
        for name in [full, no_id, pb::Name::default()] {
            let bytes = name.encode_to_vec();
            assert_eq!(ordered_name(&bytes), Some(NameRef::from(&name)), "{name:?}");
        }
        // Out of order (strings first): not read in order, but the walk still reads it.
        let mut swapped = Vec::new();
        let name = pb::Name {
            name: Some(pb::EncodedName::default()),
            str_name: Some(pb::StringName::default()),
        };
        prost::encoding::message::encode(2, name.str_name.as_ref().unwrap(), &mut swapped);
        prost::encoding::message::encode(1, name.name.as_ref().unwrap(), &mut swapped);
        assert_eq!(ordered_name(&swapped), None);
        assert_eq!(name_ref(&swapped), Some(NameRef::from(&name)));
    }

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

    /// A header rendered once per link ([`forwarded_header`]) framed around any publish of
    /// its flow is the copy; a view that skipped a repeated header renders no copy itself.
    #[test]
    fn a_forwarded_header_frames_as_the_copy_and_a_repeated_view_does_not_frame() {
        for variant in 0..200 {
            let received = publish(variant);
            let raw = received.encode_to_vec();
            let tag = [variant as u8; 32];
            let rewrite = Rewrite {
                ttl: variant % 9,
                recv_from: None,
                forward_to: None,
                incoming_conn: Some(u64::from(variant)),
                header_mac: variant.is_multiple_of(2).then_some(&tag[..]),
            };
            let template = ForwardTemplate::parse(&raw).expect("a plain publish");
            let header_raw = match &received.message_type {
                Some(pb::message::MessageType::Publish(p)) => p.header.as_ref().unwrap(),
                _ => unreachable!(),
            }
            .encode_to_vec();
            let header = forwarded_header(&header_raw, &rewrite).unwrap();
            assert_eq!(
                template.frame_with_header(&header),
                template.frame(&rewrite),
                "variant {variant}"
            );
            let view = PublishView::parse(&raw).unwrap();
            let Some(bytes) = view.header_bytes else {
                continue; // not routable from its bytes
            };
            assert_eq!(bytes, &header_raw[..]);
            let again = PublishView::parse_on_link(&raw, Some(bytes)).unwrap();
            assert!(again.repeated_header && again.routing.is_none());
            assert_eq!(again.header_bytes, Some(bytes));
            assert_eq!(again.template.frame(&rewrite), None);
            assert_eq!(
                again.template.frame_with_header(&header),
                template.frame(&rewrite)
            );
            let other = PublishView::parse_on_link(&raw, Some(b"another header")).unwrap();
            assert!(!other.repeated_header && other.routing.is_some());
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

    /// The view reads what decoding gives, for every publish the full path would route, and
    /// leaves the others (no destination, no session header) to it.
    #[test]
    fn a_view_reads_what_decoding_gives() {
        let mut viewed = 0;
        for variant in 0..200 {
            let message = publish(variant);
            let raw = message.encode_to_vec();
            let view = PublishView::parse(&raw).expect("a plain publish");
            let routable = crate::validate(&message).is_ok();
            assert_eq!(view.routing.is_some(), routable, "variant {variant}");
            let Some(routing) = view.routing else {
                continue;
            };
            viewed += 1;
            let mut decoded = message.clone();
            let header = header_of(&mut decoded);
            assert_eq!(
                routing.header,
                HeaderRef::from(&*header),
                "variant {variant}"
            );
            assert_eq!(routing.header_mac, header.header_mac.as_deref());
            let routed = Rewrite {
                ttl: 3,
                incoming_conn: Some(9),
                ..Rewrite::default()
            };
            routed.apply(header);
            assert_eq!(view.template.frame(&routed), Some(encode_frame(&decoded)));
        }
        assert!(viewed > 50, "{viewed} variants viewed");
    }

    /// What decoding must handle: it rejects the bytes, or reads them in a way the view does
    /// not (other content, unknown or repeated fields).
    #[test]
    fn what_the_view_leaves_to_decoding() {
        let plain = publish(8); // with content, session header and metadata
        let raw = plain.encode_to_vec();
        let routing = |raw: &[u8]| {
            PublishView::parse(raw)
                .and_then(|view| view.routing)
                .is_some()
        };
        assert!(routing(&raw));
        let edit = |change: &dyn Fn(&mut pb::Publish)| {
            let mut message = plain.clone();
            if let Some(pb::message::MessageType::Publish(p)) = &mut message.message_type {
                change(p);
            }
            message.encode_to_vec()
        };
        let decodes = |raw: &[u8]| pb::Message::decode(raw).is_ok();
        let command = edit(&|p| {
            p.msg = Some(pb::Content {
                content_type: Some(pb::content::ContentType::CommandPayload(Default::default())),
            })
        });
        let no_encoded_source = edit(&|p| {
            if let Some(source) = p.header.as_mut().and_then(|h| h.source.as_mut()) {
                source.name = None;
            }
        });
        let mut unknown = raw.clone();
        unknown.extend_from_slice(&[15 << 3, 1]);
        let mut repeated_metadata_key = raw.clone();
        repeated_metadata_key.extend_from_slice(&[4 << 3 | 2, 4, 1 << 3 | 2, 2, b'k', b'0']);
        // Still decodes (and is routed or dropped by the full path), but gets no view.
        for (what, bytes) in [
            ("a session control message", &command),
            ("a source without its encoded part", &no_encoded_source),
            ("an unknown field", &unknown),
        ] {
            assert!(decodes(bytes), "{what}");
            assert!(!routing(bytes), "{what}");
        }
        assert!(decodes(&repeated_metadata_key));
        assert!(routing(&repeated_metadata_key), "map entries repeat");
        // Rejected by decoding, so by the view too: bad UTF-8 anywhere, a wrong wire type.
        let bad_utf8 = |text: &str| {
            let at = raw
                .windows(text.len())
                .position(|w| w == text.as_bytes())
                .expect("text in the encoding");
            let mut bytes = raw.clone();
            bytes[at] = 0xff;
            bytes
        };
        for text in ["bytes", "2.0.0", "svc1", "v0"] {
            let bytes = bad_utf8(text);
            assert!(!decodes(&bytes), "{text}");
            assert!(!routing(&bytes), "{text}");
        }
    }

    /// The slice decoder agrees with prost's on every length and on the malformed cases,
    /// whether the varint ends its buffer or is followed by more bytes.
    #[test]
    fn varints_read_as_prost_reads_them() {
        let mut cases: Vec<Vec<u8>> = Vec::new();
        let mut values = vec![
            0,
            1,
            127,
            128,
            300,
            u64::from(u32::MAX),
            u64::MAX - 1,
            u64::MAX,
        ];
        for bits in 0..64 {
            values.push(1 << bits);
            values.push((1 << bits) - 1);
            values.push(0x9e37_79b9_7f4a_7c15_u64 >> bits);
        }
        for value in values {
            let mut bytes = Vec::new();
            encoding::encode_varint(value, &mut bytes);
            cases.push(bytes.clone());
            cases.push([bytes.clone(), vec![0x80, 0x7f, 3, 0xff, 0, 1, 2, 3, 4, 5]].concat());
            bytes.pop();
            cases.push(bytes); // cut short
        }
        for tail in [vec![], vec![0u8; 12], vec![0xffu8; 12]] {
            cases.push([vec![0xff; 11], tail.clone()].concat()); // too long
            cases.push([vec![0xff; 9], vec![0x02], tail.clone()].concat()); // past 64 bits
            cases.push([vec![0x80; 9], vec![0x01], tail.clone()].concat()); // 1 << 63
            cases.push([vec![0x80, 0x00], tail.clone()].concat()); // a longer zero than needed
            cases.push([vec![0x80; 8], vec![0x00], tail].concat()); // nine bytes, zero
        }
        for bytes in cases {
            let mut cursor = bytes.as_slice();
            let expected = encoding::decode_varint(&mut cursor)
                .ok()
                .map(|v| (v, bytes.len() - cursor.len()));
            assert_eq!(varint(&bytes), expected, "{bytes:02x?}");
        }
    }
}
