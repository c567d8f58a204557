//! A bench client that speaks the wire protocol itself (`bench --client wire`): one HTTP/2
//! stream, the link negotiated as an Edge client does it (X25519, HKDF, every header signed
//! with the link's MAC key, every received header verified), and nothing else. No router, no
//! tasks or channels between the bench and the socket: publishes are encoded straight into
//! one write buffer, deliveries decoded straight off the stream.
//!
//! The app API's [`crate::app::Client`] runs a whole router per client (the reference SDK's
//! design); measured through a node, two of them cost 2–3 times the node's own CPU per
//! message, so on two shared cores they, not the node, set the throughput. This client does
//! per message what any SLIM client must (sign, frame, deframe, decode, verify), from the
//! same `slim_proto` code the router uses, so what it measures is the node.

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use slim_proto::link;
use slim_proto::pb::message::MessageType;
use slim_proto::{
    decode_message, decode_message_on_link_unless_kept, encode_frame, pb, Deframer, HeaderMacKey,
    HeaderSeen, LinkKeyPair, Name, ReceivedHeader, SentHeader,
};

use super::BenchError;
use crate::stream::send_all;

/// How long connecting, negotiating and subscribing may take (as the app client's link wait).
const CONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
/// Publishes gathered before they are handed to h2 in one DATA frame.
const WRITE_BATCH: usize = 64 * 1024;

fn link_error(reason: impl std::fmt::Display) -> BenchError {
    BenchError::Link(reason.to_string())
}

/// The sending half of a wire link.
pub(super) struct WireSender {
    name: Name,
    send: SendStream<Bytes>,
    mac: HeaderMacKey,
    sent: SentHeader,
    batch: BytesMut,
    /// The last publish built, reused while its destination does not change: only its
    /// payload is replaced.
    message: Option<(Name, u32, pb::Message)>,
}

/// The receiving half of a wire link.
pub(super) struct WireReceiver {
    frames: FrameStream,
    checked: Checked,
}

/// What a link delivers, decoded and its header MAC checked.
struct Checked {
    mac: HeaderMacKey,
    received: ReceivedHeader,
}

/// gRPC messages off an HTTP/2 stream.
struct FrameStream {
    recv: RecvStream,
    deframer: Deframer,
}

/// Connects to `endpoint` as `name`, negotiates the link and makes `subscriptions`, within
/// [`CONNECT_WAIT`] (a node that accepts the stream but never answers is an error, not a hang).
pub(super) async fn connect(
    endpoint: &str,
    name: Name,
    subscriptions: &[Name],
) -> Result<(WireSender, WireReceiver), BenchError> {
    tokio::time::timeout(CONNECT_WAIT, link_up(endpoint, name, subscriptions))
        .await
        .map_err(|_| {
            link_error(format!(
                "{endpoint}: no negotiation reply or subscription ack within {CONNECT_WAIT:?}"
            ))
        })?
}

async fn link_up(
    endpoint: &str,
    name: Name,
    subscriptions: &[Name],
) -> Result<(WireSender, WireReceiver), BenchError> {
    let authority = endpoint.trim_start_matches("http://").trim_end_matches('/');
    let (recv, mut send) = crate::client::open_channel(authority)
        .await
        .map_err(link_error)?;
    let mut seed = [0u8; 48];
    getrandom::fill(&mut seed).map_err(link_error)?;
    let keys = LinkKeyPair::from_seed(seed[..32].try_into().unwrap_or_default());
    let link_id = format!(
        "{:032x}",
        u128::from_le_bytes(seed[32..].try_into().unwrap_or_default())
    );
    let request = link::edge_client_request(
        format!("bench-{name}"),
        crate::SLIM_VERSION,
        &link_id,
        &keys,
    );
    send_all(&mut send, encode_frame(&link::negotiation_message(request)))
        .await
        .map_err(link_error)?;
    let mut frames = FrameStream {
        recv,
        deframer: Deframer::new(slim_proto::DEFAULT_MAX_MESSAGE_SIZE),
    };
    let reply = decode_message(frames.next().await?).map_err(link_error)?;
    let reply = link::as_negotiation(&reply)
        .ok_or_else(|| link_error("the node's first message is not a negotiation reply"))?;
    link::check_reply(reply, &link_id, true).map_err(link_error)?;
    let mac = keys
        .header_mac(&reply.link_ecdh_public_key, &link_id)
        .map_err(link_error)?
        .ok_or_else(|| link_error("the node sent no key for header MACs"))?;
    let mut receiver = WireReceiver {
        frames,
        checked: Checked {
            mac: mac.clone(),
            received: ReceivedHeader::default(),
        },
    };
    let mut sender = WireSender {
        name,
        send,
        mac,
        sent: SentHeader::default(),
        batch: BytesMut::with_capacity(2 * WRITE_BATCH),
        message: None,
    };
    for (i, subscription) in subscriptions.iter().enumerate() {
        let sub_id = i as u64 + 1;
        sender.subscribe(subscription, sub_id).await?;
        receiver.subscription_ack(sub_id).await?;
    }
    Ok((sender, receiver))
}

impl WireSender {
    async fn subscribe(&mut self, name: &Name, sub_id: u64) -> Result<(), BenchError> {
        let mut header = pb::SlimHeader::from_app(&self.name, name, 1, None, crate::SLIM_VERSION);
        self.mac.sign(&mut header);
        let subscribe = pb::Message::subscription(true, header, sub_id);
        send_all(&mut self.send, encode_frame(&subscribe))
            .await
            .map_err(link_error)
    }

    /// Queues a publish of `payload` to `to`; it leaves with the next [`WireSender::flush`],
    /// or now if the queue is full.
    pub(super) async fn publish(
        &mut self,
        to: &Name,
        fanout: u32,
        payload: Bytes,
    ) -> Result<(), BenchError> {
        let reusable = matches!(&self.message, Some((last, f, _)) if last == to && *f == fanout);
        if !reusable {
            let header =
                pb::SlimHeader::from_app(&self.name, to, fanout, None, crate::SLIM_VERSION);
            let message =
                pb::Message::app_publish(header, pb::SessionHeader::default(), Bytes::new());
            self.message = Some((to.clone(), fanout, message));
        }
        let Some((_, _, message)) = &mut self.message else {
            return Ok(());
        };
        if let Some(MessageType::Publish(publish)) = &mut message.message_type {
            if let Some(pb::Content {
                content_type: Some(pb::content::ContentType::AppPayload(app)),
            }) = &mut publish.msg
            {
                app.blob = payload;
            }
        }
        let frame = self
            .sent
            .frame(message, Some(&self.mac))
            .ok_or_else(|| link_error("a publish the encoder does not take"))?;
        self.batch.extend_from_slice(&frame);
        if self.batch.len() >= WRITE_BATCH {
            self.flush().await?;
        }
        Ok(())
    }

    /// Hands every queued publish to h2, within the node's flow-control window.
    pub(super) async fn flush(&mut self) -> Result<(), BenchError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = self.batch.split().freeze();
        // The next batch in a buffer of its own, allocated once (not grown frame by frame).
        self.batch.reserve(2 * WRITE_BATCH);
        send_all(&mut self.send, batch).await.map_err(link_error)
    }
}

impl FrameStream {
    /// The next message's body.
    async fn next(&mut self) -> Result<Bytes, BenchError> {
        loop {
            if let Some(body) = self.deframer.next_frame().map_err(link_error)? {
                return Ok(body);
            }
            match self.recv.data().await {
                Some(Ok(chunk)) => {
                    let _ = self.recv.flow_control().release_capacity(chunk.len());
                    self.deframer.push_bytes(chunk);
                }
                Some(Err(error)) => return Err(link_error(error)),
                None => return Err(link_error("the node ended the stream")),
            }
        }
    }
}

impl WireReceiver {
    /// Waits for the node's ack of subscription `sub_id`.
    async fn subscription_ack(&mut self, sub_id: u64) -> Result<(), BenchError> {
        loop {
            let message = decode_message(self.frames.next().await?).map_err(link_error)?;
            if let Some(MessageType::SubscriptionAck(ack)) = &message.message_type {
                if ack.subscription_id != sub_id {
                    continue;
                }
                return match ack.success {
                    true => Ok(()),
                    false => Err(link_error(format!("subscription refused: {}", ack.error))),
                };
            }
        }
    }

    /// The next publish delivered, its header's MAC verified (see [`Checked::publish`]).
    pub(super) async fn next(&mut self) -> Result<Box<pb::Message>, BenchError> {
        loop {
            let body = self.frames.next().await?;
            if let Some(message) = self.checked.publish(body)? {
                return Ok(message);
            }
        }
    }

    /// Who sent `message`, the last one [`WireReceiver::next`] gave.
    pub(super) fn source(&self, message: &pb::Message) -> Option<Name> {
        self.checked.source(message)
    }
}

impl Checked {
    /// `body` decoded, if it is a publish (`None`: another message, nothing the bench waits
    /// for), with its header MAC verified: a header identical to the last one that verified on
    /// this link is not verified again, as a router does it. A repeated header is not copied
    /// into the message: [`Checked::source`] reads it.
    fn publish(&mut self, body: Bytes) -> Result<Option<Box<pb::Message>>, BenchError> {
        let (message, seen) =
            decode_message_on_link_unless_kept(body, &mut self.received).map_err(link_error)?;
        if message.publish().is_none() {
            return Ok(None);
        }
        if !self.received.verified(seen) {
            let header = match seen {
                HeaderSeen::Repeated => self.received.kept_header(),
                _ => message.publish().and_then(|p| p.header.as_ref()),
            };
            let header = header.ok_or_else(|| link_error("a publish without a header"))?;
            self.mac.verify(header).map_err(link_error)?;
            self.received.set_verified(seen);
        }
        Ok(Some(message))
    }

    fn source(&self, message: &pb::Message) -> Option<Name> {
        let header = message
            .publish()?
            .header
            .as_ref()
            .or(self.received.kept_header())?;
        Name::from_pb(header.source.as_ref()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_delivery_is_verified_unless_it_repeats_a_verified_header_byte_for_byte() {
        let key = [5u8; 32];
        let mac = HeaderMacKey::new(&key, "link-w").unwrap();
        let mut checked = Checked {
            mac: mac.clone(),
            received: ReceivedHeader::default(),
        };
        let (from, to) = (
            Name::with_id("org", "ns", "pub", 1),
            Name::with_id("org", "ns", "sub", 2),
        );
        let publish = |seq: u8, signer: &HeaderMacKey| {
            let mut header = pb::SlimHeader::from_app(&from, &to, 1, None, "3.4.6");
            signer.sign(&mut header);
            let message = pb::Message::app_publish(
                header,
                pb::SessionHeader::default(),
                Bytes::from(vec![seq; 8]),
            );
            encode_frame(&message).slice(5..)
        };
        // The same header three times: decoded, then kept, then a repeat of the kept one.
        for seq in 0..3 {
            let message = checked
                .publish(publish(seq, &mac))
                .unwrap()
                .expect("a publish");
            assert_eq!(message.app_payload().unwrap().blob, vec![seq; 8]);
            assert_eq!(checked.source(&message), Some(from.clone()));
        }
        // Signed with another key: a different tag, so different bytes, verified and refused.
        let other = HeaderMacKey::new(&[6u8; 32], "link-w").unwrap();
        for _ in 0..2 {
            let Err(error) = checked.publish(publish(9, &other)) else {
                panic!("a publish signed with another key was accepted");
            };
            assert!(
                matches!(&error, BenchError::Link(reason) if reason.contains("header_mac")),
                "{error}"
            );
        }
        // The link's own tag still passes.
        assert!(checked.publish(publish(3, &mac)).unwrap().is_some());
        // Not a publish: nothing to deliver, no error.
        let ack = pb::Message {
            message_type: Some(MessageType::SubscriptionAck(pb::SubscriptionAck {
                subscription_id: 1,
                success: true,
                error: String::new(),
            })),
            metadata: Default::default(),
        };
        assert!(checked
            .publish(encode_frame(&ack).slice(5..))
            .unwrap()
            .is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_that_never_answers_is_an_error_not_a_hang() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = listener.local_addr().unwrap().to_string();
        // Accepts and holds every connection, and never speaks HTTP/2.
        let _silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let name = Name::with_id("bench", "wire", "silent", 1);
        let Err(error) = connect(&endpoint, name, &[]).await else {
            panic!("a silent peer gave a link");
        };
        assert!(
            matches!(&error, BenchError::Link(reason) if reason.contains("within")),
            "{error}"
        );
    }
}
