//! A fault-injection relay for tests (`slim-tokio lossy-relay`): clients connect to it as to a
//! node, and it relays every OpenChannel stream to the real node message by message, dropping
//! every Nth session data message (`MSG`) in each direction. Everything else (negotiation,
//! subscriptions, acks, RTX requests and replies, control messages) passes untouched, so the
//! session layers at both ends must recover each drop with their own retransmissions.
//!
//! Messages are relayed as received, byte for byte: link negotiation and header MACs stay
//! between the client and the node. HTTP/2 flow control is each side's own.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use prost::Message as _;
use slim_proto::framing::{frame_bytes, Deframer};
use slim_proto::pb;
use tokio::net::{TcpListener, TcpStream};

use crate::quickack::QuickAck;
use crate::server::{grpc_response, trailers_only};
use crate::stream::send_all;

/// What the relay drops.
#[derive(Debug, Clone)]
pub struct LossyConfig {
    /// The node, host:port (plaintext HTTP/2).
    pub upstream: String,
    /// Drop the Nth, 2Nth, … data message of each stream direction (0: drop nothing).
    pub drop_every: u64,
}

/// Accepts clients until the listener fails; each connection is relayed on its own task.
pub async fn serve(listener: TcpListener, config: LossyConfig) {
    let config = Arc::new(config);
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                let config = config.clone();
                tokio::spawn(async move {
                    if let Err(error) = relay_connection(tcp, &config).await {
                        tracing::info!(%peer, %error, "relayed connection ended");
                    }
                });
            }
            Err(error) => {
                tracing::warn!(%error, "lossy relay: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn relay_connection(tcp: TcpStream, config: &Arc<LossyConfig>) -> Result<(), String> {
    let _ = tcp.set_nodelay(true);
    // As a node does, so published clients (Nagle on) are not held back by delayed acks.
    let mut connection = h2::server::handshake(QuickAck::new(tcp))
        .await
        .map_err(|e| format!("not an HTTP/2 client: {e}"))?;
    while let Some(accepted) = connection.accept().await {
        let (request, mut respond) = accepted.map_err(|e| format!("HTTP/2 error: {e}"))?;
        let config = config.clone();
        tokio::spawn(async move {
            if request.uri().path() != slim_proto::OPEN_CHANNEL_PATH {
                let _ = respond.send_response(trailers_only(12, "unknown method"), true);
                return;
            }
            let (from_node, to_node) = match crate::client::open_channel(&config.upstream).await {
                Ok(channel) => channel,
                Err(error) => {
                    tracing::warn!(upstream = %config.upstream, %error, "node unreachable");
                    let _ = respond.send_response(trailers_only(14, &error), true);
                    return;
                }
            };
            let Ok(to_client) = respond.send_response(grpc_response(), false) else {
                return;
            };
            tokio::join!(
                pump(request.into_body(), to_node, config.drop_every, "to node"),
                pump(from_node, to_client, config.drop_every, "to client"),
            );
        });
    }
    Ok(())
}

/// Relays one direction, message by message, until it ends; then ends the other side too.
async fn pump(mut recv: RecvStream, mut send: SendStream<Bytes>, drop_every: u64, way: &str) {
    let mut deframer = Deframer::new(slim_proto::DEFAULT_MAX_MESSAGE_SIZE);
    let mut data_messages = 0u64;
    while let Some(chunk) = recv.data().await {
        let Ok(chunk) = chunk else { break };
        let _ = recv.flow_control().release_capacity(chunk.len());
        deframer.push_bytes(chunk);
        loop {
            let frame = match deframer.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(error) => {
                    // Not gRPC framing: end both directions rather than buffer what follows.
                    tracing::warn!(way, %error, "bad gRPC framing: closing the stream");
                    send.send_reset(h2::Reason::PROTOCOL_ERROR);
                    return;
                }
            };
            if let Some((session, id)) = data_message(&frame) {
                data_messages += 1;
                if drop_every > 0 && data_messages.is_multiple_of(drop_every) {
                    tracing::info!(way, session, id, "dropped a data message");
                    continue;
                }
            }
            if send_all(&mut send, frame_bytes(&frame)).await.is_err() {
                return;
            }
        }
    }
    match recv.trailers().await {
        Ok(Some(trailers)) => {
            let _ = send.send_trailers(trailers);
        }
        _ => {
            let _ = send.send_data(Bytes::new(), true);
        }
    }
}

/// The session and message id of a session data message (`MSG`), the kind the relay drops.
fn data_message(frame: &[u8]) -> Option<(u32, u32)> {
    let message = pb::Message::decode(frame).ok()?;
    let Some(pb::message::MessageType::Publish(publish)) = message.message_type else {
        return None;
    };
    let session = publish.session?;
    (session.session_message_type == pb::SessionMessageType::Msg as i32)
        .then_some((session.session_id, session.message_id))
}
