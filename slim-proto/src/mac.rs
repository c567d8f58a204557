//! Per-link header MAC (spec §1.9): HMAC-SHA256 over a canonical pre-image of the routing fields
//! of the `SLIMHeader`. It protects what a node routes on, hop by hop; the session header, payload
//! and metadata are not covered (they are end-to-end, protected by MLS and `e2e_header_sig`).

use std::cell::RefCell;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::pb;
use crate::view::{HeaderRef, NameRef};

type HmacSha256 = Hmac<Sha256>;

/// Tag length on the wire.
pub const MAC_LEN: usize = 32;
const DOMAIN: &[u8] = b"SLIM-DP-HDR-v1\0";

/// Why a received header did not verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MacError {
    #[error("header_mac is missing")]
    Missing,
    #[error("header_mac has {0} bytes, expected 32")]
    BadLength(usize),
    #[error("header_mac does not verify")]
    Mismatch,
}

/// The HMAC key of one link, with the link id that is part of every pre-image.
#[derive(Clone)]
pub struct HeaderMacKey {
    /// Keyed, with the pre-image's constant prefix (domain, link id) already absorbed: each
    /// tag starts from a copy of this state.
    prefixed: HmacSha256,
    link_id: String,
    /// The last header tagged on this link (its pre-image bytes after the prefix) and its tag.
    /// The pre-image covers routing fields only, so a flow's messages (same source,
    /// destination, token) share it byte for byte: the HMAC runs once per run of such
    /// messages instead of once per message. HMAC is deterministic, so this changes no tag.
    last: RefCell<LastTag>,
}

#[derive(Clone, Default)]
struct LastTag {
    header: Vec<u8>,
    tag: [u8; MAC_LEN],
    /// Where the next pre-image is gathered (kept, so gathering neither allocates nor zeroes).
    next: Vec<u8>,
    /// The pre-image's first part (source and destination names) last hashed, and the HMAC
    /// state after it. Session messages carry a fresh identity token each, so their headers
    /// never repeat whole, but a flow's names do: its tags then start from this state and
    /// hash only the token onwards (about 7 of the 10 SHA-256 blocks of a session header).
    names: Vec<u8>,
    after_names: Option<HmacSha256>,
}

/// Headers whose pre-image is longer than this are hashed as they are gathered, not memoised.
const MEMO_MAX: usize = 1024;

impl std::fmt::Debug for HeaderMacKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeaderMacKey")
            .field("link_id", &self.link_id)
            .finish_non_exhaustive()
    }
}

impl HeaderMacKey {
    /// `key` must be at least 32 bytes, as the reference requires.
    pub fn new(key: &[u8], link_id: &str) -> Option<Self> {
        if key.len() < 32 {
            return None;
        }
        let mut prefixed = HmacSha256::new_from_slice(key).ok()?;
        feed_prefix(&mut MacSink(&mut prefixed), link_id);
        Some(Self {
            prefixed,
            link_id: link_id.to_owned(),
            last: RefCell::default(),
        })
    }

    pub fn link_id(&self) -> &str {
        &self.link_id
    }

    /// The 32-byte tag of `header` (its `header_mac` field is ignored).
    pub fn tag(&self, header: &pb::SlimHeader) -> [u8; MAC_LEN] {
        self.tag_fields(&HeaderRef::from(header))
    }

    /// The 32-byte tag of a header given by its pre-image fields.
    pub fn tag_fields(&self, header: &HeaderRef<'_>) -> [u8; MAC_LEN] {
        let mut last = self.last.borrow_mut();
        let last = &mut *last;
        last.next.clear();
        let mut gathered = GatherSink {
            buf: &mut last.next,
            overflow: false,
        };
        feed_names(&mut gathered, header);
        let names_len = gathered.buf.len();
        feed_rest(&mut gathered, header);
        if gathered.overflow {
            return self.streamed_tag(header);
        }
        if last.header == last.next {
            return last.tag;
        }
        let (names, rest) = last.next.split_at(names_len);
        let after_names = match &last.after_names {
            Some(state) if last.names == names => state,
            _ => {
                let mut state = self.prefixed.clone();
                state.update(names);
                last.names.clear();
                last.names.extend_from_slice(names);
                last.after_names.insert(state)
            }
        };
        let mut mac = after_names.clone();
        mac.update(rest);
        last.tag = mac.finalize().into_bytes().into();
        std::mem::swap(&mut last.header, &mut last.next);
        last.tag
    }

    fn streamed_tag(&self, header: &HeaderRef<'_>) -> [u8; MAC_LEN] {
        let mut mac = self.prefixed.clone();
        // The header is ~40 small fields: gathered first, they reach the MAC in a few large
        // updates instead of one call each.
        let mut sink = BufferedSink {
            mac: &mut mac,
            buf: [0; 512],
            len: 0,
        };
        feed_header(&mut sink, header);
        sink.flush();
        mac.finalize().into_bytes().into()
    }

    /// Sets `header.header_mac` to the tag for this link.
    pub fn sign(&self, header: &mut pb::SlimHeader) {
        let tag = self.tag(header);
        header.header_mac = Some(bytes::Bytes::copy_from_slice(&tag));
    }

    /// Checks `header.header_mac` in constant time.
    pub fn verify(&self, header: &pb::SlimHeader) -> Result<(), MacError> {
        self.verify_fields(&HeaderRef::from(header), header.header_mac.as_deref())
    }

    /// Checks the `received` tag of a header given by its pre-image fields, in constant time.
    pub fn verify_fields(
        &self,
        header: &HeaderRef<'_>,
        received: Option<&[u8]>,
    ) -> Result<(), MacError> {
        let received = received.ok_or(MacError::Missing)?;
        let Ok(received) = <&[u8; MAC_LEN]>::try_from(received) else {
            return Err(MacError::BadLength(received.len()));
        };
        let expected = self.tag_fields(header);
        if tags_equal(&expected, received) {
            Ok(())
        } else {
            Err(MacError::Mismatch)
        }
    }
}

/// Compares two tags in constant time: the XOR of each 8-byte word is OR-ed into one, with no
/// branch, and only that is compared, through `subtle`. (`subtle`'s slice comparison puts every
/// byte through an optimisation barrier: 2 % of the node's cycles per routed message.)
fn tags_equal(expected: &[u8; MAC_LEN], received: &[u8; MAC_LEN]) -> bool {
    let word = |tag: &[u8; MAC_LEN], i: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&tag[8 * i..8 * i + 8]);
        u64::from_ne_bytes(bytes)
    };
    let difference =
        (0..MAC_LEN / 8).fold(0u64, |acc, i| acc | (word(expected, i) ^ word(received, i)));
    bool::from(difference.ct_eq(&0))
}

/// The pre-image as bytes (for tests and tooling; signing streams it into the MAC instead).
pub fn preimage(link_id: &str, header: &pb::SlimHeader) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    feed_prefix(&mut VecSink(&mut out), link_id);
    feed_header(&mut VecSink(&mut out), &HeaderRef::from(header));
    out
}

trait Sink {
    fn put(&mut self, bytes: &[u8]);
}
struct MacSink<'a>(&'a mut HmacSha256);
impl Sink for MacSink<'_> {
    fn put(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}
struct BufferedSink<'a> {
    mac: &'a mut HmacSha256,
    buf: [u8; 512],
    len: usize,
}
impl BufferedSink<'_> {
    fn flush(&mut self) {
        self.mac.update(&self.buf[..self.len]);
        self.len = 0;
    }
}
impl Sink for BufferedSink<'_> {
    fn put(&mut self, bytes: &[u8]) {
        if self.len + bytes.len() > self.buf.len() {
            self.flush();
            if bytes.len() > self.buf.len() {
                self.mac.update(bytes);
                return;
            }
        }
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }
}
/// Gathers a pre-image of up to [`MEMO_MAX`] bytes; `overflow` if it did not fit.
struct GatherSink<'a> {
    buf: &'a mut Vec<u8>,
    overflow: bool,
}
impl Sink for GatherSink<'_> {
    fn put(&mut self, bytes: &[u8]) {
        if self.overflow || self.buf.len() + bytes.len() > MEMO_MAX {
            self.overflow = true;
            return;
        }
        self.buf.extend_from_slice(bytes);
    }
}
struct VecSink<'a>(&'a mut Vec<u8>);
impl Sink for VecSink<'_> {
    fn put(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }
}

fn put_str(sink: &mut impl Sink, s: &str) {
    sink.put(&(s.len() as u32).to_le_bytes());
    sink.put(s.as_bytes());
}

fn put_opt_u64(sink: &mut impl Sink, value: Option<u64>) {
    match value {
        None => sink.put(&[0]),
        Some(v) => {
            sink.put(&[1]);
            sink.put(&v.to_le_bytes());
        }
    }
}

fn put_name(sink: &mut impl Sink, name: Option<&NameRef<'_>>) {
    let Some(name) = name else {
        sink.put(&[0]);
        return;
    };
    sink.put(&[1]);
    match &name.encoded {
        None => sink.put(&[0]),
        Some(encoded) => {
            // Gathered on the stack and put at once: a dozen small puts cost more than hashing.
            let mut fixed = [0u8; 1 + 8 * 3 + 1 + 16];
            fixed[0] = 1;
            for (i, component) in encoded.components.iter().enumerate() {
                fixed[1 + 8 * i..9 + 8 * i].copy_from_slice(&component.to_le_bytes());
            }
            match encoded.name_id {
                None => sink.put(&fixed[..26]),
                Some((id_0, id_1)) => {
                    fixed[25] = 1;
                    fixed[26..34].copy_from_slice(&id_0.to_le_bytes());
                    fixed[34..42].copy_from_slice(&id_1.to_le_bytes());
                    sink.put(&fixed);
                }
            }
        }
    }
    match &name.strings {
        None => sink.put(&[0]),
        Some(strings) => {
            sink.put(&[1]);
            for component in strings {
                put_str(sink, component);
            }
        }
    }
}

/// The part of the pre-image that is the same for every header of a link.
fn feed_prefix(sink: &mut impl Sink, link_id: &str) {
    sink.put(DOMAIN);
    put_str(sink, link_id);
}

fn feed_header(sink: &mut impl Sink, header: &HeaderRef<'_>) {
    feed_names(sink, header);
    feed_rest(sink, header);
}

/// The pre-image's first part: what a flow's messages share even when their tokens differ.
fn feed_names(sink: &mut impl Sink, header: &HeaderRef<'_>) {
    put_name(sink, header.source.as_ref());
    put_name(sink, header.destination.as_ref());
}

fn feed_rest(sink: &mut impl Sink, header: &HeaderRef<'_>) {
    put_str(sink, header.identity);
    sink.put(&header.fanout.to_le_bytes());
    put_opt_u64(sink, header.recv_from);
    put_opt_u64(sink, header.forward_to);
    match header.error {
        None => sink.put(&[0]),
        Some(e) => sink.put(&[1, u8::from(e)]),
    }
    sink.put(&header.ttl.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    fn name(c: [&str; 3], h: [u64; 3], id: (u64, u64)) -> pb::Name {
        pb::Name {
            name: Some(pb::EncodedName {
                component_0: h[0],
                component_1: h[1],
                component_2: h[2],
                name_id: Some(pb::NameId {
                    id_0: id.0,
                    id_1: id.1,
                }),
            }),
            str_name: Some(pb::StringName {
                str_component_0: c[0].into(),
                str_component_1: c[1].into(),
                str_component_2: c[2].into(),
            }),
        }
    }

    /// The spec's check vector (§1.9), confirmed against the reference by captures/e_raw_mac_probe.
    #[test]
    fn spec_check_vector() {
        let header = pb::SlimHeader {
            source: Some(name(["a", "b", "c"], [1, 2, 3], (0, 4))),
            destination: Some(name(["x", "y", "z"], [5, 6, 7], (0, 8))),
            identity: "id1".into(),
            fanout: 2,
            recv_from: Some(9),
            forward_to: Some(10),
            error: Some(false),
            ttl: 8,
            ..Default::default()
        };
        assert_eq!(preimage("link-1", &header).len(), 178);
        let key = HeaderMacKey::new(b"01234567890123456789012345678901", "link-1").unwrap();
        assert_eq!(
            hex::encode(key.tag(&header)),
            "ce936caa06451e447f65ee1636afacc50c1b9ce7bc021483948a47e2fe2895a2"
        );
    }

    /// Messages a hand-written client sent through the reference node in captures/e_raw_mac_probe,
    /// with the link's HMAC key: the ones the node accepted verify, the corrupted one does not.
    #[test]
    fn reference_probe_messages() {
        let key_hex = "5c6df9389cdc1cb658bb1fea5260d9ce0b6567f069c734c71fb92ed3bac98445";
        let link_id = "raw-b-fb8a6827-669c-4fc0-b7c5-72aaf1b21d06";
        let key = HeaderMacKey::new(&hex::decode(key_hex).unwrap(), link_id).unwrap();
        let raw = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/e_raw_mac_probe.result.json"
        ))
        .unwrap();
        let result: serde_json::Value = serde_json::from_str(&raw).unwrap();
        let sent = result["sent_by_b"].as_array().unwrap();
        assert!(sent.len() >= 5);
        for entry in sent {
            let bytes = hex::decode(entry["hex"].as_str().unwrap()).unwrap();
            let message = pb::Message::decode(bytes.as_slice()).unwrap();
            let Some(pb::message::MessageType::Publish(publish)) = message.message_type else {
                panic!("probe messages are publishes");
            };
            let header = publish.header.unwrap();
            let expected_valid = entry["mac_valid"].as_bool().unwrap();
            assert_eq!(
                key.verify(&header).is_ok(),
                expected_valid,
                "mid {}",
                entry["mid"]
            );
        }
    }

    #[test]
    fn verify_rejects_missing_short_and_tampered() {
        let key = HeaderMacKey::new(&[7; 32], "l").unwrap();
        let mut header = pb::SlimHeader {
            ttl: 8,
            fanout: 1,
            ..Default::default()
        };
        assert_eq!(key.verify(&header), Err(MacError::Missing));
        header.header_mac = Some(bytes::Bytes::from_static(&[1, 2, 3]));
        assert_eq!(key.verify(&header), Err(MacError::BadLength(3)));
        key.sign(&mut header);
        assert_eq!(key.verify(&header), Ok(()));
        header.ttl = 7;
        assert_eq!(key.verify(&header), Err(MacError::Mismatch));
        header.ttl = 8;
        // Any one bit of the tag changed.
        let tag = header.header_mac.clone().unwrap();
        for bit in 0..MAC_LEN * 8 {
            let mut changed = tag.to_vec();
            changed[bit / 8] ^= 1 << (bit % 8);
            header.header_mac = Some(changed.into());
            assert_eq!(key.verify(&header), Err(MacError::Mismatch), "bit {bit}");
        }
        header.header_mac = Some(tag);
        // Fields outside the pre-image do not change the tag.
        header.version = "9.9.9".into();
        header.incoming_conn = Some(3);
        assert_eq!(key.verify(&header), Ok(()));
    }

    /// The memoised tag is the tag: a key that has seen other headers gives, for every header,
    /// what a fresh key gives, whether the header repeats, alternates or is too long to memoise.
    #[test]
    fn memoised_tags_equal_fresh_tags() {
        let key = HeaderMacKey::new(&[7; 32], "link").unwrap();
        let header = |identity: &str, ttl: u32| pb::SlimHeader {
            source: Some(name(["a", "b", "c"], [1, 2, 3], (0, 4))),
            destination: Some(name(["x", "y", "z"], [5, 6, 7], (0, 8))),
            identity: identity.into(),
            fanout: 1,
            ttl,
            ..Default::default()
        };
        let long_token = "t".repeat(MEMO_MAX);
        let headers = [
            header("token", 8),
            header("token", 8),
            header("token", 7),
            header("token", 8),
            header(&long_token, 8),
            header(&long_token, 8),
            header("token", 8),
        ];
        for (i, h) in headers.iter().enumerate() {
            let fresh = HeaderMacKey::new(&[7; 32], "link").unwrap();
            assert_eq!(key.tag(h), fresh.tag(h), "header {i}");
        }
        // A repeated header with a forged tag still fails.
        let mut forged = header("token", 8);
        forged.header_mac = Some(bytes::Bytes::from_static(&[0; MAC_LEN]));
        assert_eq!(key.verify(&forged), Err(MacError::Mismatch));
    }

    /// The tag as the spec defines it, straight from the key, with no state kept between calls.
    fn plain_tag(key: &[u8], link_id: &str, header: &pb::SlimHeader) -> [u8; MAC_LEN] {
        let mut mac = HmacSha256::new_from_slice(key).unwrap();
        feed_prefix(&mut MacSink(&mut mac), link_id);
        feed_header(&mut MacSink(&mut mac), &HeaderRef::from(header));
        mac.finalize().into_bytes().into()
    }

    /// Headers whose names repeat but whose tokens do not (session traffic) start from the
    /// kept state after the names; every tag still equals the plain HMAC, through name
    /// changes of the same and of other lengths, back and forth.
    #[test]
    fn tags_after_kept_names_equal_plain_tags() {
        let key = HeaderMacKey::new(&[9; 32], "link-9").unwrap();
        let header = |source: [&str; 3], destination: [&str; 3], identity: &str| pb::SlimHeader {
            source: Some(name(source, [1, 2, 3], (0, 4))),
            destination: Some(name(destination, [5, 6, 7], (0, 8))),
            identity: identity.into(),
            fanout: 1,
            ttl: 8,
            ..Default::default()
        };
        let (a, b, c) = (["o", "n", "alice"], ["o", "n", "bob"], ["o", "n", "carol"]);
        let headers = [
            header(a, b, "token-1"),
            header(a, b, "token-2"),
            header(a, b, "token-3-longer"),
            header(b, a, "token-4"),
            header(a, c, "token-5"),
            header(a, b, "token-6"),
            header(a, b, "token-6"),
            header(a, b, &"t".repeat(MEMO_MAX)),
            header(a, b, "token-7"),
        ];
        for (i, h) in headers.iter().enumerate() {
            assert_eq!(key.tag(h), plain_tag(&[9; 32], "link-9", h), "header {i}");
        }
    }

    #[test]
    fn short_keys_are_refused() {
        assert!(HeaderMacKey::new(&[0; 31], "l").is_none());
    }
}
