//! One SLIM link over one HTTP/2 stream: a reader that deframes gRPC messages into the router
//! and a writer that sends the router's frames within h2 flow control, then ends the stream with
//! gRPC trailers carrying the status the link ended with.

use std::future::poll_fn;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use slim_core::router::ConnId;
use slim_proto::Deframer;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::node::{ConnWriter, NodeHandle, OpenKind, Outbox, CONNECTION_QUEUE};

/// Small frames queued together are sent in one DATA frame up to this size.
const WRITE_BATCH: usize = 64 * 1024;

/// How long queued frames may take to go out before a closing stream's trailers.
const CLOSE_FLUSH: std::time::Duration = std::time::Duration::from_secs(1);

/// Status an ending link reports in its trailers, if not OK.
type StatusSlot = Arc<Mutex<Option<(u32, String)>>>;

/// Runs one link until either side ends it. `send` must already have sent response headers (a
/// server) or be the request body (a client).
pub(crate) async fn run_link(
    node: NodeHandle,
    kind: OpenKind,
    recv: RecvStream,
    send: SendStream<Bytes>,
    max_message_size: usize,
    trailers: bool,
    opened: Option<oneshot::Sender<ConnId>>,
) {
    let (frames_tx, frames_rx) = mpsc::channel(CONNECTION_QUEUE);
    let (close_tx, close_rx) = oneshot::channel();
    let Some(conn) = node
        .open(
            kind,
            ConnWriter {
                outbox: Outbox::Frames(frames_tx),
                close: close_tx,
            },
        )
        .await
    else {
        return;
    };
    if let Some(opened) = opened {
        let _ = opened.send(conn);
    }
    let done = CancellationToken::new();
    let status: StatusSlot = Arc::default();
    let writer = tokio::spawn(write_loop(
        conn,
        send,
        frames_rx,
        close_rx,
        done.clone(),
        status.clone(),
        trailers,
    ));
    read_loop(conn, &node, recv, max_message_size, &done, &status).await;
    let _ = writer.await;
}

async fn read_loop(
    conn: ConnId,
    node: &NodeHandle,
    mut recv: RecvStream,
    max_message_size: usize,
    done: &CancellationToken,
    status: &StatusSlot,
) {
    let mut deframer = Deframer::new(max_message_size);
    loop {
        let chunk = tokio::select! {
            () = done.cancelled() => return, // the router closed the link: it already forgot it
            chunk = recv.data() => chunk,
        };
        match chunk {
            None => {
                if let Err(error) = deframer.finish() {
                    tracing::info!(conn, %error, "stream ended mid-message");
                    *status.lock().expect("status lock") =
                        Some((error.grpc_status(), error.to_string()));
                }
                break;
            }
            Some(Err(error)) => {
                tracing::debug!(conn, %error, "stream failed");
                break;
            }
            Some(Ok(bytes)) => {
                let _ = recv.flow_control().release_capacity(bytes.len());
                deframer.push_bytes(bytes);
                if let Some(error) = deliver_frames(conn, node, &mut deframer).await {
                    tracing::warn!(conn, %error, "bad gRPC framing: closing stream");
                    *status.lock().expect("status lock") =
                        Some((error.grpc_status(), error.to_string()));
                    break;
                }
            }
        }
    }
    node.closed(conn).await;
}

/// Hands every complete message to the router, all in one input; the framing error that ends
/// the stream, if any (the messages before it are delivered).
async fn deliver_frames(
    conn: ConnId,
    node: &NodeHandle,
    deframer: &mut Deframer,
) -> Option<slim_proto::FrameError> {
    let mut bodies = Vec::new();
    let error = loop {
        match deframer.next_frame() {
            Ok(Some(body)) => bodies.push(body),
            Ok(None) => break None,
            Err(error) => break Some(error),
        }
    };
    if !bodies.is_empty() && !node.frames(conn, bodies).await {
        return None; // the router is gone: nothing left to report to
    }
    error
}

enum WriteOutcome {
    Sent(Result<(), h2::Error>),
    Close(Option<(u32, String)>),
}

async fn write_loop(
    conn: ConnId,
    mut send: SendStream<Bytes>,
    mut frames: mpsc::Receiver<Bytes>,
    mut close: oneshot::Receiver<(u32, String)>,
    done: CancellationToken,
    status: StatusSlot,
    trailers: bool,
) {
    // A frame taken off the queue that did not fit the last write: it leads the next one.
    let mut held: Option<Bytes> = None;
    let final_status = loop {
        let next = async {
            match held.take() {
                Some(frame) => Some(frame),
                None => frames.recv().await,
            }
        };
        let outcome = tokio::select! {
            biased;
            closing = &mut close => WriteOutcome::Close(closing.ok()),
            frame = next => match frame {
                None => WriteOutcome::Close(None),
                Some(first) => {
                    let batch = batch_frames(first, &mut frames, &mut held);
                    tokio::select! {
                        sent = send_all(&mut send, batch) => WriteOutcome::Sent(sent),
                        closing = &mut close => WriteOutcome::Close(closing.ok()),
                    }
                }
            },
        };
        match outcome {
            WriteOutcome::Sent(Ok(())) => {}
            WriteOutcome::Sent(Err(error)) => {
                tracing::debug!(conn, %error, "write failed");
                done.cancel();
                return;
            }
            WriteOutcome::Close(Some(code_reason)) => {
                // Frames the router queued before closing go first (a refused peer gets its
                // negotiation reply, then the status; at shutdown nothing queued is lost). A
                // peer that does not read gets a bounded wait.
                let mut queued: Vec<Bytes> = held.take().into_iter().collect();
                while let Ok(frame) = frames.try_recv() {
                    queued.push(frame);
                }
                let flush = async {
                    for frame in queued {
                        send_all(&mut send, frame).await?;
                    }
                    Ok::<(), h2::Error>(())
                };
                let _ = tokio::time::timeout(CLOSE_FLUSH, flush).await;
                break code_reason;
            }
            WriteOutcome::Close(None) => {
                break status
                    .lock()
                    .expect("status lock")
                    .take()
                    .unwrap_or((0, String::new()))
            }
        }
    };
    done.cancel();
    if trailers {
        let _ = send.send_trailers(grpc_trailers(final_status.0, &final_status.1));
    } else {
        let _ = send.send_data(Bytes::new(), true);
    }
}

/// Joins queued small frames into one buffer of at most [`WRITE_BATCH`] bytes (fewer DATA
/// frames and syscalls under load). A frame that does not fit is put in `held` for the next
/// write: growing the buffer for it would copy all of it.
fn batch_frames(
    first: Bytes,
    frames: &mut mpsc::Receiver<Bytes>,
    held: &mut Option<Bytes>,
) -> Bytes {
    // Made only once a second frame joins the first.
    let mut joined: Option<BytesMut> = None;
    let mut len = first.len();
    while len < WRITE_BATCH {
        let Ok(next) = frames.try_recv() else {
            break;
        };
        if len + next.len() > WRITE_BATCH {
            *held = Some(next);
            break;
        }
        let buf = joined.get_or_insert_with(|| {
            let mut buf = BytesMut::with_capacity(WRITE_BATCH);
            buf.extend_from_slice(&first);
            buf
        });
        buf.extend_from_slice(&next);
        len = buf.len();
    }
    joined.map_or(first, BytesMut::freeze)
}

/// Sends within the peer's flow-control window, waiting for capacity instead of letting h2
/// buffer without bound.
pub(crate) async fn send_all(
    send: &mut SendStream<Bytes>,
    mut data: Bytes,
) -> Result<(), h2::Error> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let capacity = match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(n)) => n,
            Some(Err(error)) => return Err(error),
            None => return Err(h2::Error::from(h2::Reason::STREAM_CLOSED)),
        };
        if capacity == 0 {
            continue;
        }
        let chunk = data.split_to(capacity.min(data.len()));
        send.send_data(chunk, false)?;
    }
    Ok(())
}

/// gRPC trailers; the message is percent-encoded as the gRPC spec asks.
pub(crate) fn grpc_trailers(code: u32, message: &str) -> http::HeaderMap {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from(code));
    if !message.is_empty() {
        if let Ok(value) = http::HeaderValue::from_str(&percent_encode(message)) {
            trailers.insert("grpc-message", value);
        }
    }
    trailers
}

fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if (0x20..0x7f).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_frames_join_up_to_a_batch_and_the_one_that_does_not_fit_waits() {
        let (tx, mut rx) = mpsc::channel(16);
        let frame = |byte: u8, len: usize| Bytes::from(vec![byte; len]);
        for (byte, len) in [(2, 20_000), (3, 20_000), (4, 30_000), (5, 10)] {
            tx.try_send(frame(byte, len)).unwrap();
        }
        let mut held = None;
        let batch = batch_frames(frame(1, 10_000), &mut rx, &mut held);
        let mut expected = vec![1u8; 10_000];
        expected.extend([2u8; 20_000]);
        expected.extend([3u8; 20_000]);
        assert_eq!(batch, expected, "joined in order, within WRITE_BATCH");
        assert!(batch.len() <= WRITE_BATCH);
        assert_eq!(
            held,
            Some(frame(4, 30_000)),
            "the frame that did not fit waits"
        );
        // The held frame leads the next batch, before what was queued after it.
        let next = batch_frames(held.take().unwrap(), &mut rx, &mut held);
        let mut expected = vec![4u8; 30_000];
        expected.extend([5u8; 10]);
        assert_eq!(next, expected);
        assert!(held.is_none());
        // A lone frame goes as it is, and one already as large as a batch is not joined.
        tx.try_send(frame(7, 1)).unwrap();
        let big = frame(6, WRITE_BATCH);
        assert_eq!(batch_frames(big.clone(), &mut rx, &mut held), big);
        assert_eq!(
            batch_frames(frame(8, 3), &mut rx, &mut held),
            [8, 8, 8, 7][..]
        );
    }

    #[test]
    fn trailers_encode_status_and_message() {
        let t = grpc_trailers(8, "too big: 5 MiB ✗");
        assert_eq!(t["grpc-status"], "8");
        assert_eq!(t["grpc-message"], "too big: 5 MiB %E2%9C%97");
        assert!(!grpc_trailers(0, "").contains_key("grpc-message"));
    }
}
