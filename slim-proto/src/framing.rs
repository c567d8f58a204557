//! gRPC message framing: a 1-byte compressed flag and a 4-byte big-endian length before each
//! protobuf message. HTTP/2 DATA frames do not keep message boundaries (several messages may share
//! one frame, one message may span several), hence this incremental decoder.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message as _;

use crate::pb;

/// The largest message accepted by default: 4 MiB, tonic's default and so the reference's.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 4 * 1024 * 1024;

pub(crate) const PREFIX_LEN: usize = 5;

/// Why the byte stream cannot be read as gRPC messages. Every variant ends the stream: after a bad
/// prefix there is no way to find the next message boundary.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    #[error("gRPC message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("compressed gRPC messages are not supported (no grpc-encoding was negotiated)")]
    Compressed,
    #[error("invalid gRPC compressed-flag byte {0:#04x}")]
    BadFlag(u8),
    #[error("stream ended inside a gRPC message ({buffered} bytes buffered)")]
    Truncated { buffered: usize },
}

impl FrameError {
    /// The gRPC status code a server answers this error with.
    pub fn grpc_status(&self) -> u32 {
        match self {
            FrameError::TooLarge { .. } => 8,   // RESOURCE_EXHAUSTED, as tonic
            FrameError::Compressed => 12,       // UNIMPLEMENTED
            FrameError::BadFlag(_) => 13,       // INTERNAL, as tonic
            FrameError::Truncated { .. } => 13, // INTERNAL
        }
    }
}

/// Encodes one message with its gRPC prefix, in a single allocation.
pub fn encode_frame(message: &pb::Message) -> Bytes {
    // Data publishes, the bulk of the traffic, without prost's repeated nested lengths.
    if let Some(frame) = crate::encode::publish_frame(message) {
        return frame;
    }
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(PREFIX_LEN + len);
    buf.put_u8(0);
    buf.put_u32(len as u32);
    message
        .encode(&mut buf)
        .expect("buffer was sized with encoded_len");
    buf.freeze()
}

/// Prefixes already-encoded protobuf bytes.
pub fn frame_bytes(body: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(PREFIX_LEN + body.len());
    buf.put_u8(0);
    buf.put_u32(body.len() as u32);
    buf.put_slice(body);
    buf.freeze()
}

/// Incremental decoder: feed bytes with [`Deframer::push_bytes`] (or [`Deframer::push`]), take
/// messages with [`Deframer::next_frame`].
#[derive(Debug)]
pub struct Deframer {
    /// Bytes copied out of chunks: the start of a message that spans them (or whatever
    /// [`Deframer::push`] copied). They come before `chunk`.
    buf: BytesMut,
    /// A received chunk, kept as it is: the messages wholly inside it are returned as slices
    /// of it, not copied; a message `buf` started takes from it only the bytes it lacks.
    chunk: Bytes,
    max: usize,
}

impl Default for Deframer {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_MESSAGE_SIZE)
    }
}

impl Deframer {
    pub fn new(max_message_size: usize) -> Self {
        Self {
            chunk: Bytes::new(),
            buf: BytesMut::new(),
            max: max_message_size,
        }
    }

    /// Received bytes, copied.
    pub fn push(&mut self, chunk: &[u8]) {
        self.spill();
        self.buf.extend_from_slice(chunk);
    }

    /// Received bytes, owned: the messages wholly inside `chunk` share its memory; only a
    /// message that spans chunks is copied, and only its own bytes (an h2 DATA frame rarely
    /// ends on a message boundary: copying whole chunks from the first split on would copy
    /// everything).
    pub fn push_bytes(&mut self, chunk: Bytes) {
        self.spill();
        self.chunk = chunk;
    }

    /// Moves what is left of the kept chunk (drained, so the start of one message) into
    /// `buf`, before bytes that follow it arrive.
    fn spill(&mut self) {
        if !self.chunk.is_empty() {
            self.buf.extend_from_slice(&self.chunk);
            self.chunk = Bytes::new();
        }
    }

    /// Bytes received but not yet returned as a message.
    pub fn buffered(&self) -> usize {
        self.chunk.len() + self.buf.len()
    }

    /// The next complete message body (without prefix), `Ok(None)` if more bytes are needed.
    /// An oversize length is reported as soon as the prefix is seen, before the body is buffered.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, FrameError> {
        if self.buf.is_empty() {
            let Some(len) = self.message_len(&self.chunk)? else {
                return Ok(None);
            };
            if self.chunk.len() < PREFIX_LEN + len {
                return Ok(None);
            }
            self.chunk.advance(PREFIX_LEN);
            return Ok(Some(self.chunk.split_to(len)));
        }
        // A message started in `buf`: its prefix, then its body, from the kept chunk.
        self.take_from_chunk(PREFIX_LEN);
        let Some(len) = self.message_len(&self.buf)? else {
            return Ok(None);
        };
        // Only what has arrived is copied: a 5-byte prefix must not make us reserve megabytes
        // before the peer has sent them.
        self.take_from_chunk(PREFIX_LEN + len);
        if self.buf.len() < PREFIX_LEN + len {
            return Ok(None);
        }
        self.buf.advance(PREFIX_LEN);
        Ok(Some(self.buf.split_to(len).freeze()))
    }

    /// The body length of the message at the start of `data`, once its prefix is there; an
    /// error as soon as the prefix is bad (an oversize length before its body is buffered).
    fn message_len(&self, data: &[u8]) -> Result<Option<usize>, FrameError> {
        if data.len() < PREFIX_LEN {
            return Ok(None);
        }
        match data[0] {
            0 => {}
            1 => return Err(FrameError::Compressed),
            other => return Err(FrameError::BadFlag(other)),
        }
        let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        Ok(Some(len))
    }

    /// Copies bytes from the front of the kept chunk until `buf` holds `want` (or the chunk is
    /// used up).
    fn take_from_chunk(&mut self, want: usize) {
        let take = want.saturating_sub(self.buf.len()).min(self.chunk.len());
        if take > 0 {
            self.buf.extend_from_slice(&self.chunk[..take]);
            self.chunk.advance(take);
        }
    }

    /// Call at end of stream: an error if a message was cut off.
    pub fn finish(&self) -> Result<(), FrameError> {
        match self.buffered() {
            0 => Ok(()),
            buffered => Err(FrameError::Truncated { buffered }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ack(id: u64) -> pb::Message {
        pb::Message {
            message_type: Some(pb::message::MessageType::SubscriptionAck(
                pb::SubscriptionAck {
                    subscription_id: id,
                    success: true,
                    error: String::new(),
                },
            )),
            metadata: Default::default(),
        }
    }

    #[test]
    fn encode_matches_capture_bytes() {
        // captures/README.md §3: a SubscriptionAck as the reference node sends it.
        let message = ack(0x56ae93d5fffa887f_u64 & 0x7fff_ffff_ffff_ffff);
        let frame = encode_frame(&message);
        assert_eq!(frame[0], 0);
        assert_eq!(
            u32::from_be_bytes([frame[1], frame[2], frame[3], frame[4]]) as usize,
            frame.len() - 5
        );
        let decoded = pb::Message::decode(&frame[5..]).unwrap();
        assert_eq!(decoded, message);
    }

    #[test]
    fn several_messages_in_one_chunk_and_split_prefix() {
        let mut wire = Vec::new();
        for i in 1..=3 {
            wire.extend_from_slice(&encode_frame(&ack(i)));
        }
        let mut d = Deframer::default();
        // Split inside the second prefix.
        let cut = encode_frame(&ack(1)).len() + 2;
        d.push(&wire[..cut]);
        assert!(d.next_frame().unwrap().is_some());
        assert!(d.next_frame().unwrap().is_none());
        d.push(&wire[cut..]);
        let mut ids = Vec::new();
        while let Some(body) = d.next_frame().unwrap() {
            match pb::Message::decode(body).unwrap().message_type {
                Some(pb::message::MessageType::SubscriptionAck(a)) => ids.push(a.subscription_id),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(ids, vec![2, 3]);
        assert!(d.finish().is_ok());
    }

    #[test]
    fn oversize_is_rejected_from_the_prefix() {
        let mut d = Deframer::new(16);
        d.push(&[0, 0, 0, 0, 17]);
        assert_eq!(
            d.next_frame(),
            Err(FrameError::TooLarge { len: 17, max: 16 })
        );
        assert_eq!(d.next_frame().unwrap_err().grpc_status(), 8);
    }

    #[test]
    fn compressed_and_bad_flags_are_errors() {
        let mut d = Deframer::default();
        d.push(&[1, 0, 0, 0, 0]);
        assert_eq!(d.next_frame(), Err(FrameError::Compressed));
        let mut d = Deframer::default();
        d.push(&[7, 0, 0, 0, 0]);
        assert_eq!(d.next_frame(), Err(FrameError::BadFlag(7)));
    }

    #[test]
    fn truncated_stream_is_reported() {
        let mut d = Deframer::default();
        d.push(&[0, 0, 0, 0, 10, 1, 2]);
        assert!(d.next_frame().unwrap().is_none());
        assert_eq!(d.finish(), Err(FrameError::Truncated { buffered: 7 }));
    }

    proptest! {
        #[test]
        fn any_chunking_yields_the_same_messages(ids in proptest::collection::vec(any::<u64>(), 1..20),
                                                  cuts in proptest::collection::vec(1usize..40, 1..50),
                                                  owned in proptest::collection::vec(any::<bool>(), 1..8)) {
            let mut wire = Vec::new();
            for id in &ids { wire.extend_from_slice(&encode_frame(&ack(*id))); }
            let wire = Bytes::from(wire);
            let mut d = Deframer::default();
            let mut got = Vec::new();
            let mut pos = 0;
            let mut cut_iter = cuts.iter().cycle();
            // Copied and owned chunks mixed: the kept chunk is spilled before a copied one.
            let mut owned_iter = owned.iter().cycle();
            while pos < wire.len() {
                let end = (pos + cut_iter.next().unwrap()).min(wire.len());
                if *owned_iter.next().unwrap() {
                    d.push_bytes(wire.slice(pos..end));
                } else {
                    d.push(&wire[pos..end]);
                }
                pos = end;
                while let Some(body) = d.next_frame().unwrap() {
                    got.push(pb::Message::decode(body).unwrap());
                }
                let returned: usize = got.iter().map(|m: &pb::Message| 5 + m.encoded_len()).sum();
                prop_assert_eq!(returned + d.buffered(), pos);
            }
            d.finish().unwrap();
            let expected: Vec<_> = ids.iter().map(|i| ack(*i)).collect();
            prop_assert_eq!(got, expected);
        }

        #[test]
        fn only_a_message_that_spans_chunks_is_copied(a in any::<u64>(), b in any::<u64>(), c in any::<u64>(), cut in 1usize..16) {
            let (fa, fb, fc) = (encode_frame(&ack(a)), encode_frame(&ack(b)), encode_frame(&ack(c)));
            let cut = fa.len() + cut.min(fb.len() - 1);
            let wire = Bytes::from([&fa[..], &fb[..], &fc[..]].concat());
            let (first, second) = (wire.slice(..cut), wire.slice(cut..));
            let mut d = Deframer::default();
            d.push_bytes(first.clone());
            let body_a = d.next_frame().unwrap().unwrap();
            prop_assert!(d.next_frame().unwrap().is_none());
            d.push_bytes(second.clone());
            let body_b = d.next_frame().unwrap().unwrap();
            let body_c = d.next_frame().unwrap().unwrap();
            prop_assert!(d.next_frame().unwrap().is_none());
            prop_assert_eq!(d.buffered(), 0);
            prop_assert!(first.as_ptr_range().contains(&body_a.as_ptr()), "A is a slice of the first chunk");
            prop_assert!(!wire.as_ptr_range().contains(&body_b.as_ptr()), "B, split, is copied");
            prop_assert!(second.as_ptr_range().contains(&body_c.as_ptr()), "C is a slice of the second chunk");
            prop_assert_eq!(pb::Message::decode(body_b).unwrap(), ack(b));
            prop_assert_eq!(pb::Message::decode(body_c).unwrap(), ack(c));
        }

        #[test]
        fn a_chunk_of_whole_messages_is_returned_without_a_copy(ids in proptest::collection::vec(any::<u64>(), 1..10)) {
            let mut wire = Vec::new();
            for id in &ids { wire.extend_from_slice(&encode_frame(&ack(*id))); }
            let wire = Bytes::from(wire);
            let mut d = Deframer::default();
            d.push_bytes(wire.clone());
            let range = wire.as_ptr_range();
            while let Some(body) = d.next_frame().unwrap() {
                prop_assert!(range.contains(&body.as_ptr()), "a slice of the chunk");
            }
            prop_assert_eq!(d.buffered(), 0);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut d = Deframer::new(64);
            d.push(&bytes);
            for _ in 0..50 {
                match d.next_frame() {
                    Ok(Some(body)) => { let _ = pb::Message::decode(body); }
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
}
