//! A node's TCP connections acknowledge at once (`TCP_QUICKACK` after every read).
//!
//! The published clients (slim-bindings) leave Nagle's algorithm on. A client that writes a
//! small message and then its reply, with nothing in between from the node, holds the reply until
//! the first write is acknowledged, and Linux delays that ack by up to 40 ms because the node has
//! nothing to send back: every such request/reply round trip took ≈ 44 ms through our node and
//! through the reference node alike (interop case `rust_request`). The kernel leaves quick-ack
//! mode on its own, so it is asked for again after each read that returned data. That costs a
//! system call per read (≈ 1 µs; our own clients, which turn Nagle off, gain nothing from it),
//! against ≈ 43 ms per round trip for the published clients: 44 ms → 1 ms.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A TCP stream that asks the kernel to acknowledge every read at once.
pub(crate) struct QuickAck(pub TcpStream);

impl QuickAck {
    fn rearm(&self) {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let on: libc::c_int = 1;
            // SAFETY: a valid open socket, and a pointer to an int of the stated size that
            // outlives the call.
            let _ = unsafe {
                libc::setsockopt(
                    self.0.as_raw_fd(),
                    libc::IPPROTO_TCP,
                    libc::TCP_QUICKACK,
                    std::ptr::from_ref(&on).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
        }
    }
}

impl AsyncRead for QuickAck {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.0).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.rearm();
        }
        polled
    }
}

impl AsyncWrite for QuickAck {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::os::fd::AsRawFd;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Whether the kernel would acknowledge the next segment at once (false in "ping-pong"
    /// mode, which delays acks to piggyback them on an answer).
    fn acks_at_once(tcp: &TcpStream) -> bool {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a valid open socket; value and len outlive the call and match in size.
        let rc = unsafe {
            libc::getsockopt(
                tcp.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_QUICKACK,
                std::ptr::from_mut(&mut value).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "getsockopt(TCP_QUICKACK)");
        value != 0
    }

    /// Request/answer exchanges put a socket in ping-pong mode (delayed acks); the wrapper's
    /// read takes it out again. A plain socket shows the exchange really does (tried a few
    /// times: the kernel leaves ping-pong mode by itself if the machine stalls for 40 ms).
    #[tokio::test]
    async fn a_read_leaves_the_socket_acknowledging_at_once() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut plain_went_ping_pong = false;
        for _ in 0..5 {
            if !exchange(&listener, address, false).await {
                plain_went_ping_pong = true;
                break;
            }
        }
        assert!(
            plain_went_ping_pong,
            "the exchange should delay a plain socket's acks"
        );
        assert!(exchange(&listener, address, true).await);
    }

    /// 20 request/answer rounds, then one more request read by the server; whether its socket
    /// then acknowledges at once.
    async fn exchange(
        listener: &tokio::net::TcpListener,
        address: std::net::SocketAddr,
        wrapped: bool,
    ) -> bool {
        let mut client = TcpStream::connect(address).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let mut server = QuickAck(server);
        let mut buf = [0u8; 16];
        for round in 0..=20 {
            client.write_all(b"request").await.unwrap();
            let read = if wrapped {
                server.read(&mut buf).await.unwrap()
            } else {
                server.0.read(&mut buf).await.unwrap()
            };
            assert!(read > 0);
            if round == 20 {
                break;
            }
            // Answering at once is what makes the kernel delay its acks.
            server.write_all(b"answer").await.unwrap();
            client.read_exact(&mut buf[..6]).await.unwrap();
        }
        acks_at_once(&server.0)
    }
}
