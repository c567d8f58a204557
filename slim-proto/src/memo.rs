//! The last header received on a link, and the last one sent on it, kept so that their
//! repeats are not read, signed or encoded again.
//!
//! A flow's publishes (one source to one destination, with one token) carry the same header
//! byte for byte: the names, the token and the hop's MAC tag; what changes from one message to
//! the next (session message ids, the payload) lives outside the header. Decoding a header
//! (nine strings checked and allocated, two names) was a third of a client's decode, and
//! checking its MAC gathered a 400-byte pre-image again; both outcomes are functions of the
//! header's bytes (and of the link's key, fixed for the link's life), so a header identical to
//! the last one gets the last one's outcome. Sending is the mirror image: signing and encoding
//! a header were half of a client's cost per publish, and both are functions of its fields.

use bytes::Bytes;

use crate::encode::{encodes_content, publish_frame_with};
use crate::mac::HeaderMacKey;
use crate::pb;

/// Headers longer than this are not kept (it bounds what an idle link holds).
const MEMO_MAX: usize = 2048;

/// The last header decoded from one link: its bytes, the header they decode to, and whether
/// its MAC verified. Boxed, and empty until the link's first publish: an idle link holds a
/// pointer.
#[derive(Debug, Default)]
pub struct ReceivedHeader(Option<Box<Slot>>);

/// The bytes of the last header seen and not kept. Keeping a header costs a copy of it, and
/// some links never repeat one (a session layer that puts a fresh identity token in every
/// message): a header is kept only once seen twice in a row, so that such a link pays a copy
/// of its bytes per message and no more.
#[derive(Debug, Default)]
pub struct Candidate {
    bytes: Vec<u8>,
    /// Whether `bytes` holds a header seen: an empty header encodes to no bytes, and must not
    /// match a candidate that was never set.
    set: bool,
}

impl Candidate {
    /// Whether `encoded` is the candidate; if it is not, it becomes the candidate (unless it
    /// is too long to keep).
    pub fn seen_twice(&mut self, encoded: &[u8]) -> bool {
        if self.set && self.bytes == encoded {
            return true;
        }
        self.bytes.clear();
        self.set = encoded.len() <= MEMO_MAX;
        if self.set {
            self.bytes.extend_from_slice(encoded);
        }
        false
    }
}

/// A link's kept header, and the candidate to replace it.
#[derive(Debug, Default)]
struct Slot {
    kept: Option<Kept>,
    candidate: Candidate,
}

/// A header and its encoding.
#[derive(Debug)]
struct Kept {
    encoded: Vec<u8>,
    /// Byte fields owned, not slices of the message they came in: a slice would keep the
    /// whole received buffer alive for as long as the link.
    header: pb::SlimHeader,
    /// Received: whether its MAC verified.
    verified: bool,
}

impl Slot {
    /// Keeps `header`, encoded as `encoded`, if it is the candidate (not verified); whether
    /// it did.
    fn keep_if_seen_twice(&mut self, encoded: &[u8], header: &pb::SlimHeader) -> bool {
        if !self.candidate.seen_twice(encoded) {
            return false;
        }
        let mut owned = header.clone();
        for field in [&mut owned.header_mac, &mut owned.e2e_header_sig] {
            *field = field.as_deref().map(Bytes::copy_from_slice);
        }
        match &mut self.kept {
            Some(kept) => {
                kept.encoded.clear();
                kept.encoded.extend_from_slice(encoded);
                kept.header = owned;
                kept.verified = false;
            }
            empty => {
                *empty = Some(Kept {
                    encoded: encoded.to_vec(),
                    header: owned,
                    verified: false,
                })
            }
        }
        true
    }
}

/// How a decoded header relates to its link's [`ReceivedHeader`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderSeen {
    /// The same bytes as the kept header: it stands for this one.
    Repeated,
    /// A header now kept in place of the last one (it repeats the one before).
    Kept,
    /// Not kept (not a plain publish, too long, or not seen twice in a row); the kept
    /// header is unchanged.
    NotKept,
}

impl ReceivedHeader {
    /// The header of `raw`: `decode(raw)`, kept if it was also the last one decoded (see
    /// [`Candidate`]), or `None` if `raw` is the kept header's bytes (the header is then
    /// [`ReceivedHeader::kept_header`], not copied).
    pub(crate) fn decode_unless_kept(
        &mut self,
        raw: &[u8],
        decode: impl FnOnce(&[u8]) -> Option<pb::SlimHeader>,
    ) -> Option<(Option<pb::SlimHeader>, HeaderSeen)> {
        let slot = self.0.get_or_insert_with(Box::default);
        if slot.kept.as_ref().is_some_and(|kept| kept.encoded == raw) {
            return Some((None, HeaderSeen::Repeated));
        }
        let header = decode(raw)?;
        let seen = match slot.keep_if_seen_twice(raw, &header) {
            true => HeaderSeen::Kept,
            false => HeaderSeen::NotKept,
        };
        Some((Some(header), seen))
    }

    /// The kept header: the one every header seen as [`HeaderSeen::Repeated`] repeats.
    pub fn kept_header(&self) -> Option<&pb::SlimHeader> {
        Some(&self.0.as_ref()?.kept.as_ref()?.header)
    }

    fn kept(&mut self) -> Option<&mut Kept> {
        self.0.as_mut()?.kept.as_mut()
    }

    /// Whether a header seen as `seen` is known to carry a valid MAC for this link.
    pub fn verified(&self, seen: HeaderSeen) -> bool {
        let kept = self.0.as_ref().and_then(|slot| slot.kept.as_ref());
        seen == HeaderSeen::Repeated && kept.is_some_and(|kept| kept.verified)
    }

    /// Records that a header seen as `seen` verified.
    pub fn set_verified(&mut self, seen: HeaderSeen) {
        if let (Some(kept), HeaderSeen::Repeated | HeaderSeen::Kept) = (self.kept(), seen) {
            kept.verified = true;
        }
    }
}

/// The last header sent on one link, signed for it, and its encoding (kept once sent twice in
/// a row, see [`Candidate`]). Boxed, and empty until the link's first publish, as
/// [`ReceivedHeader`].
#[derive(Debug, Default)]
pub struct SentHeader(Option<Box<Slot>>);

impl SentHeader {
    /// Signs the header of the publish `message` for this link with `mac` (or clears its tag
    /// when the link has no MAC) and encodes the frame, as `HeaderMacKey::sign` then
    /// `encode_frame` would. A header equal to the last one sent, but for its tag, gets the
    /// last one's tag and encoding. `None`, with `message` untouched, when it is not a publish
    /// with a header that this crate encodes itself (prost encodes the rest).
    pub fn frame(
        &mut self,
        message: &mut pb::Message,
        mac: Option<&HeaderMacKey>,
    ) -> Option<Bytes> {
        let Some(pb::message::MessageType::Publish(publish)) = &mut message.message_type else {
            return None;
        };
        if !encodes_content(publish.msg.as_ref()) {
            return None;
        }
        let header = publish.header.as_mut()?;
        let slot = self.0.get_or_insert_with(Box::default);
        if let Some(kept) = &slot.kept {
            // The tag the header gets if it is the kept one but for its tag (it is replaced
            // by signing otherwise).
            header.header_mac.clone_from(&kept.header.header_mac);
            if kept.header == *header {
                return publish_frame_with(message, Some(&kept.encoded)).map(|(frame, _)| frame);
            }
        }
        match mac {
            Some(mac) => mac.sign(header),
            None => header.header_mac = None,
        }
        let (frame, header_at) = publish_frame_with(message, None)?;
        let encoded = frame.get(header_at)?;
        if let Some(header) = message.publish().and_then(|p| p.header.as_ref()) {
            slot.keep_if_seen_twice(encoded, header);
        }
        Some(frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode::tests::for_publishes;
    use crate::{
        decode_message, decode_message_on_link, decode_message_on_link_unless_kept, encode_frame,
    };
    use proptest::prelude::*;
    use prost::Message as _;

    /// Found by the flow property below: an empty header encodes to no bytes, which matched a
    /// candidate never set (or cleared by a header too long to keep).
    #[test]
    fn a_header_counts_as_seen_twice_only_after_two_sightings() {
        let mut candidate = Candidate::default();
        assert!(
            !candidate.seen_twice(&[]),
            "first sighting of the empty header"
        );
        assert!(candidate.seen_twice(&[]));
        assert!(!candidate.seen_twice(&[0; MEMO_MAX + 1]));
        assert!(
            !candidate.seen_twice(&[]),
            "after a header too long to keep"
        );
        assert!(!candidate.seen_twice(&[1, 2]));
        assert!(candidate.seen_twice(&[1, 2]));
        assert!(!candidate.seen_twice(&[1]));
    }

    fn header_mut(message: &mut pb::Message) -> Option<&mut pb::SlimHeader> {
        match message.message_type.as_mut()? {
            pb::message::MessageType::Publish(p) => p.header.as_mut(),
            _ => None,
        }
    }

    /// `message` followed by variants chosen by `script`: itself again, its header with
    /// another payload, its header with one field changed.
    fn flow(message: pb::Message, script: &[usize]) -> Vec<pb::Message> {
        let mut flow = vec![message.clone()];
        for (i, step) in script.iter().enumerate() {
            let mut next = flow.last().cloned().unwrap_or_else(|| message.clone());
            match step % 3 {
                0 => {}
                1 => {
                    if let Some(pb::message::MessageType::Publish(p)) = &mut next.message_type {
                        p.msg = Some(pb::Content::app("msg", Bytes::from(vec![i as u8; i])));
                    }
                }
                _ => {
                    if let Some(header) = header_mut(&mut next) {
                        header.ttl = header.ttl.wrapping_add(1);
                    }
                }
            }
            flow.push(next);
        }
        flow
    }

    #[test]
    fn a_flow_decodes_on_its_link_as_it_decodes_alone() {
        for_publishes(1000, |message, script| {
            let mut memo = ReceivedHeader::default();
            // The same flow on a link whose repeats are not copied.
            let mut uncopied = ReceivedHeader::default();
            let (mut last_kept, mut previous): (Option<Vec<u8>>, Option<Vec<u8>>) = (None, None);
            for message in flow(message, &script) {
                let body = Bytes::from(message.encode_to_vec());
                let (decoded, seen) = decode_message_on_link(body.clone(), &mut memo).unwrap();
                prop_assert_eq!(&decoded, &decode_message(body.clone()).unwrap());
                prop_assert_eq!(&*decoded, &message);
                let (mut bare, bare_seen) =
                    decode_message_on_link_unless_kept(body, &mut uncopied).unwrap();
                prop_assert_eq!(bare_seen, seen);
                if let Some(pb::message::MessageType::Publish(publish)) = &mut bare.message_type {
                    if seen == HeaderSeen::Repeated {
                        prop_assert!(publish.header.is_none(), "a repeat is not copied");
                        publish.header = uncopied.kept_header().cloned();
                    }
                }
                prop_assert_eq!(&*bare, &message);
                let header = message
                    .publish()
                    .and_then(|p| p.header.as_ref())
                    .map(|h| h.encode_to_vec());
                match seen {
                    HeaderSeen::Repeated => prop_assert_eq!(&header, &last_kept),
                    HeaderSeen::Kept => {
                        prop_assert_ne!(&header, &last_kept);
                        prop_assert_eq!(&header, &previous, "kept when seen twice in a row");
                        last_kept = header.clone();
                    }
                    HeaderSeen::NotKept => {}
                }
                if seen != HeaderSeen::Repeated {
                    previous = header;
                }
            }
            Ok(())
        });
    }

    #[test]
    fn a_flow_signed_and_encoded_on_its_link_is_what_signing_and_encoding_give() {
        let key = HeaderMacKey::new(&[7; 32], "link-a").unwrap();
        for_publishes(1000, move |message, script| {
            for mac in [Some(&key), None] {
                let mut memo = SentHeader::default();
                for message in flow(message.clone(), &script) {
                    let mut expected = message.clone();
                    if let Some(header) = header_mut(&mut expected) {
                        match mac {
                            Some(mac) => mac.sign(header),
                            None => header.header_mac = None,
                        }
                    }
                    let mut sent = message.clone();
                    match memo.frame(&mut sent, mac) {
                        Some(frame) => {
                            prop_assert_eq!(&frame, &encode_frame(&expected));
                            prop_assert_eq!(&sent, &expected);
                        }
                        None => {
                            prop_assert!(message.publish().is_none_or(|p| p.header.is_none()));
                            prop_assert_eq!(&sent, &message);
                        }
                    }
                }
            }
            Ok(())
        });
    }

    #[test]
    fn a_kept_header_owns_its_bytes_and_its_verdict_is_its_own() {
        let name = |service: &str| crate::Name::with_id("org", "ns", service, 7).to_pb();
        let header = pb::SlimHeader {
            source: Some(name("alice")),
            destination: Some(name("bob")),
            identity: "token".into(),
            ttl: 8,
            header_mac: Some(Bytes::from(vec![5; 32])),
            ..Default::default()
        };
        let message = pb::Message::app_publish(
            header,
            pb::SessionHeader::default(),
            Bytes::from_static(b"hello"),
        );
        let body = Bytes::from(message.encode_to_vec());
        let mut memo = ReceivedHeader::default();
        let (_, seen) = decode_message_on_link(body.clone(), &mut memo).unwrap();
        assert_eq!(seen, HeaderSeen::NotKept, "kept only once seen twice");
        let (_, seen) = decode_message_on_link(body.clone(), &mut memo).unwrap();
        assert_eq!(seen, HeaderSeen::Kept);
        let kept = memo.0.as_deref().unwrap().kept.as_ref().unwrap();
        let mac = kept.header.header_mac.as_ref().unwrap().as_ptr() as usize;
        let within = body.as_ptr() as usize..body.as_ptr() as usize + body.len();
        assert!(
            !within.contains(&mac),
            "the kept tag is a slice of the message"
        );
        assert!(!memo.verified(HeaderSeen::Repeated));
        memo.set_verified(seen);
        let (_, seen) = decode_message_on_link(body.clone(), &mut memo).unwrap();
        assert_eq!(seen, HeaderSeen::Repeated);
        assert!(memo.verified(seen));
        // Another header is kept unverified, and not-kept ones never count as verified.
        let mut other = message.clone();
        header_mut(&mut other).unwrap().ttl ^= 1;
        let other = Bytes::from(other.encode_to_vec());
        let (_, seen) = decode_message_on_link(other.clone(), &mut memo).unwrap();
        assert_eq!(seen, HeaderSeen::NotKept);
        assert!(memo.verified(HeaderSeen::Repeated), "the kept header stays");
        let (_, seen) = decode_message_on_link(other, &mut memo).unwrap();
        assert_eq!(seen, HeaderSeen::Kept);
        assert!(!memo.verified(HeaderSeen::Repeated));
        memo.set_verified(HeaderSeen::NotKept);
        assert!(!memo.verified(HeaderSeen::Repeated));
    }
}
