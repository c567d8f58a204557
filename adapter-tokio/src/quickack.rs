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
//!
//! Where the runtime flushes them ([`flush_owed`] as its `on_thread_park` hook, as the node's
//! does), the ack is owed instead: asked for after this thread's next write, or before it
//! sleeps, whichever comes first. The bare ACK segment then leaves after the message was
//! routed on, not on its way (it cost the node's step of each round trip leg ≈ 3 µs). A thread
//! that neither writes nor parks for a while (it only reads, under constant load: tokio then
//! polls the sockets without parking) leaves its acks to the kernel's delayed-ack timer, so
//! they are no later than without quick acks at all.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Owed acks beyond which a read asks for them all at once rather than wait.
const MAX_OWED: usize = 64;

/// A socket that owes an ack: its fd, and its flag (gone once the socket is dropped).
type Owed = (i32, Weak<AtomicBool>);

thread_local! {
    /// `None` until this thread's runtime first calls [`flush_owed`]: acks are asked for at
    /// once on a thread nobody flushes.
    static OWED: RefCell<Option<Vec<Owed>>> = const { RefCell::new(None) };
}

/// Asks for every ack this thread owes, and from now on lets its reads owe them: a runtime's
/// `on_thread_park` hook.
pub fn flush_owed() {
    flush();
}

/// [`flush_owed`]; how many acks it asked for.
fn flush() -> usize {
    OWED.with(|owed| {
        let mut owed = owed.borrow_mut();
        let mut asked = 0;
        for (fd, flag) in owed.get_or_insert_with(Vec::new).drain(..) {
            // A socket dropped since its read owes nothing (and its fd may be another's now).
            if let Some(flag) = flag.upgrade() {
                flag.store(false, Ordering::Relaxed);
                quick_ack(fd);
                asked += 1;
            }
        }
        asked
    })
}

/// Turns quick-ack mode on for `fd`, which also sends an ack now if one is pending.
fn quick_ack(fd: i32) {
    #[cfg(target_os = "linux")]
    {
        let on: libc::c_int = 1;
        // SAFETY: a socket fd (a closed or reused one only makes the call fail or apply to a
        // socket that loses nothing by it), and a pointer to an int of the stated size that
        // outlives the call.
        let _ = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_QUICKACK,
                std::ptr::from_ref(&on).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = fd;
}

/// A TCP stream that asks the kernel to acknowledge every read at once, or owes the ack until
/// its thread's next write or park (see the module docs).
pub(crate) struct QuickAck {
    /// Whether this socket is in a thread's owed list. Declared before `tcp`, so dropped first:
    /// a flush on the thread that drops the socket never reaches its closed fd. (On a
    /// multi-thread runtime another worker's flush may race the drop; the call then fails, or
    /// quick-acks whichever socket got the fd, which loses nothing by it.)
    owed: Arc<AtomicBool>,
    tcp: TcpStream,
}

impl QuickAck {
    pub(crate) fn new(tcp: TcpStream) -> Self {
        Self {
            owed: Arc::default(),
            tcp,
        }
    }

    fn fd(&self) -> i32 {
        #[cfg(unix)]
        {
            use std::os::fd::AsRawFd;
            self.tcp.as_raw_fd()
        }
        #[cfg(not(unix))]
        -1
    }

    /// After a read that returned data: the ack is asked for now, or owed.
    fn ack_read(&self) {
        let owed_on_thread = OWED.with(|owed| {
            let mut owed = owed.borrow_mut();
            let list = owed.as_mut()?;
            if !self.owed.swap(true, Ordering::Relaxed) {
                list.push((self.fd(), Arc::downgrade(&self.owed)));
            }
            Some(list.len())
        });
        match owed_on_thread {
            None => quick_ack(self.fd()),
            Some(owed) if owed >= MAX_OWED => {
                flush();
            }
            Some(_) => {}
        }
    }

    /// After a write: what this thread owes goes now, behind the data just written.
    fn after_write(&self) {
        if OWED.with(|owed| owed.borrow().as_ref().is_some_and(|list| !list.is_empty())) {
            flush();
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
        let polled = Pin::new(&mut self.tcp).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.ack_read();
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
        let polled = Pin::new(&mut self.tcp).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(_))) {
            self.after_write();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(_))) {
            self.after_write();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
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
        let mut plain_went_ping_pong = false;
        for _ in 0..5 {
            let (_client, server) = exchange(&listener, false).await;
            if !acks_at_once(&server.tcp) {
                plain_went_ping_pong = true;
                break;
            }
        }
        assert!(
            plain_went_ping_pong,
            "the exchange should delay a plain socket's acks"
        );
        let (_client, server) = exchange(&listener, true).await;
        assert!(acks_at_once(&server.tcp));
    }

    /// On a thread whose runtime flushes (here: the test calls the hook itself), a read owes
    /// the ack: asked for by the next write on any socket of the thread, or by the flush, and
    /// never for a socket dropped meanwhile.
    #[tokio::test]
    async fn where_the_runtime_flushes_a_read_owes_the_ack_until_a_write_or_the_flush() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        // From now on this thread defers, as under the node's runtime.
        flush_owed();

        /// A socket left delaying its acks by the exchange, with its ack owed.
        async fn owing(listener: &tokio::net::TcpListener) -> (TcpStream, QuickAck) {
            for _ in 0..5 {
                let (client, server) = exchange(listener, true).await;
                if !acks_at_once(&server.tcp) {
                    return (client, server);
                }
                flush();
            }
            panic!("the exchange should leave the socket delaying its acks until the flush");
        }

        let (_client, server) = owing(&listener).await;
        assert_eq!(flush(), 1, "the read's ack was owed");
        assert!(acks_at_once(&server.tcp));
        assert_eq!(flush(), 0, "and asked for once");

        // A write to another connection (the message routed on) asks for it.
        let (_client, server) = owing(&listener).await;
        let (mut other_client, mut other_server) = connected(&listener).await;
        other_server.write_all(b"routed on").await.unwrap();
        assert!(acks_at_once(&server.tcp));
        assert_eq!(flush(), 0, "the write asked for what was owed");
        let mut routed = [0u8; 9];
        other_client.read_exact(&mut routed).await.unwrap();

        // A socket dropped with its ack owed is skipped: its fd may be another socket's by then.
        let (_client, server) = owing(&listener).await;
        drop(server);
        assert_eq!(flush(), 0);
    }

    async fn connected(listener: &tokio::net::TcpListener) -> (TcpStream, QuickAck) {
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, QuickAck::new(server))
    }

    /// 20 request/answer rounds, then one more request read by the server, through the
    /// wrapper or around it.
    async fn exchange(listener: &tokio::net::TcpListener, wrapped: bool) -> (TcpStream, QuickAck) {
        let (mut client, mut server) = connected(listener).await;
        let mut buf = [0u8; 16];
        for round in 0..=20 {
            client.write_all(b"request").await.unwrap();
            let read = if wrapped {
                server.read(&mut buf).await.unwrap()
            } else {
                server.tcp.read(&mut buf).await.unwrap()
            };
            assert!(read > 0);
            if round == 20 {
                break;
            }
            // Answering at once is what makes the kernel delay its acks (the plain socket's
            // write, so that the wrapper's write does not ask for the ack owed).
            server.tcp.write_all(b"answer").await.unwrap();
            client.read_exact(&mut buf[..6]).await.unwrap();
        }
        (client, server)
    }
}
