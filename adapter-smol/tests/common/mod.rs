//! Shared by the integration tests: a slim-tokio node on a background thread (its own tokio
//! runtime; the smol side never enters it), a watchdog, and the scenarios, written once over
//! both runtimes' session `App`s (`slim_core::session::App<R>`).
#![allow(dead_code)] // each test binary uses a different part

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use slim_core::session::{App, AppError, AppRuntime, SessionError};
use slim_proto::Name;
use slim_smol::session::{CloseReason, Reliability, SessionConfig, SessionEvent, SessionId};
use slim_tokio::config::{NodeConfig, ServerConfig};

/// At least 32 bytes, as the identity tokens require.
pub const SECRET: &str = "a-test-secret-that-is-at-least-32-bytes-long";
/// What the responder puts before every payload it echoes.
pub const REPLY_PREFIX: &[u8] = b"reply|";

/// A slim-tokio node on loopback, stopped when dropped.
pub struct TestNode {
    pub addr: std::net::SocketAddr,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestNode {
    pub fn start() -> TestNode {
        Self::start_on("127.0.0.1:0".parse().unwrap())
    }

    /// A node on `addr` (retrying while the port of a node just stopped is not free yet).
    pub fn start_on(addr: std::net::SocketAddr) -> TestNode {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            runtime.block_on(async move {
                let mut attempts = 0;
                let node = loop {
                    let started = slim_tokio::Node::start(NodeConfig {
                        servers: vec![ServerConfig { addr, tls: None }],
                        ..NodeConfig::default()
                    })
                    .await;
                    match started {
                        Ok(node) => break node,
                        Err(_) if attempts < 100 => {
                            attempts += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(error) => panic!("cannot start a node on {addr}: {error}"),
                    }
                };
                addr_tx.send(node.local_addrs()[0]).unwrap();
                tokio::task::spawn_blocking(move || stop_rx.recv())
                    .await
                    .unwrap()
                    .ok();
                node.shutdown().await;
            });
        });
        TestNode {
            addr: addr_rx.recv().unwrap(),
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the node and waits until it is gone.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Ends the whole test process if the guard is still alive after `limit` (a hung session
/// should fail the run, not stall it).
pub struct Watchdog(#[allow(dead_code)] std::sync::mpsc::Sender<()>);

pub fn watchdog(test: &'static str, limit: Duration) -> Watchdog {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            eprintln!("{test}: still running after {limit:?}, aborting");
            std::process::exit(101);
        }
    });
    Watchdog(tx)
}

/// Reliable sessions with quick retries.
pub fn reliable() -> SessionConfig {
    SessionConfig {
        reliability: Some(Reliability {
            interval: Duration::from_millis(200),
            max_retries: 10,
        }),
        ..SessionConfig::default()
    }
}

/// Request `i`: 0..=4096 bytes (0, 1, 4095 and 4096 among them) of pseudo-random binary, every
/// byte value, NULs and 0xFF runs included.
pub fn request_payload(i: usize) -> Bytes {
    let size = match i {
        0 => 0,
        1 => 1,
        2 => 4095,
        3 => 4096,
        _ => (i * 997 + 13) % 4097,
    };
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ (i as u64);
    let mut buf = BytesMut::with_capacity(size);
    while buf.len() < size {
        match buf.len() % 512 {
            0..=255 => buf.put_u8(buf.len() as u8), // every byte value
            256..=271 => buf.put_u8(0),
            272..=287 => buf.put_u8(0xFF),
            _ => {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                buf.put_u8(state as u8);
            }
        }
    }
    buf.freeze()
}

/// What the initiator saw.
#[derive(Debug)]
pub struct Requested {
    pub session: SessionId,
    pub replies: usize,
    pub close: CloseReason,
}

/// Opens a session to `service`, sends `count` requests one after the other, checks that each
/// reply is `reply|` + the request byte for byte, then closes and waits for `Closed`.
pub async fn request<R: AppRuntime>(app: &App<R>, service: &Name, count: usize) -> Requested {
    request_with(app, service, count, reliable()).await
}

/// [`request`] on a session opened with `config`.
pub async fn request_with<R: AppRuntime>(
    app: &App<R>,
    service: &Name,
    count: usize,
    config: SessionConfig,
) -> Requested {
    let session = app.open_session(service, config).await.unwrap();
    let mut replies = 0;
    for i in 0..count {
        let request = request_payload(i);
        app.publish(session, request.clone()).await.unwrap();
        let reply = loop {
            match app.next_event().await.unwrap() {
                SessionEvent::Message {
                    session: s,
                    payload,
                    ..
                } if s == session => break payload,
                SessionEvent::Delivered { session: s, .. } if s == session => {}
                other => panic!("initiator, request {i}: unexpected {other:?}"),
            }
        };
        assert_eq!(
            reply.len(),
            REPLY_PREFIX.len() + request.len(),
            "reply {i} length"
        );
        assert_eq!(&reply[..REPLY_PREFIX.len()], REPLY_PREFIX, "reply {i}");
        assert!(
            reply[REPLY_PREFIX.len()..] == request[..],
            "reply {i} is not byte-exact"
        );
        replies += 1;
    }
    app.close(session).await.unwrap();
    let close = loop {
        match app.next_event().await.unwrap() {
            SessionEvent::Closed { session: s, reason } if s == session => break reason,
            SessionEvent::Delivered { .. } => {}
            other => panic!("initiator, closing: unexpected {other:?}"),
        }
    };
    Requested {
        session,
        replies,
        close,
    }
}

/// What the responder saw.
#[derive(Debug)]
pub struct Responded {
    pub session: SessionId,
    pub peer: Name,
    /// Whether the session was end-to-end encrypted.
    pub mls: bool,
    pub messages: usize,
    pub bytes: usize,
    pub close: CloseReason,
}

/// Accepts one session and answers each message with `reply|` + the message until the
/// session is closed.
pub async fn respond<R: AppRuntime>(app: &App<R>) -> Responded {
    let (session, peer, mls) = match app.next_event().await.unwrap() {
        SessionEvent::Incoming {
            session, peer, mls, ..
        } => (session, peer, mls),
        other => panic!("responder: unexpected {other:?} before the session"),
    };
    let (mut messages, mut bytes) = (0, 0);
    let close = loop {
        match app.next_event().await.unwrap() {
            SessionEvent::Message {
                session: s,
                source,
                payload,
                ..
            } if s == session => {
                assert_eq!(source.key(), peer.key(), "message source");
                messages += 1;
                bytes += payload.len();
                let mut reply = BytesMut::with_capacity(REPLY_PREFIX.len() + payload.len());
                reply.put_slice(REPLY_PREFIX);
                reply.put_slice(&payload);
                app.publish(session, reply.freeze()).await.unwrap();
            }
            SessionEvent::Delivered { session: s, .. } if s == session => {}
            SessionEvent::Closed { session: s, reason } if s == session => break reason,
            other => panic!("responder: unexpected {other:?}"),
        }
    };
    Responded {
        session,
        peer,
        mls,
        messages,
        bytes,
        close,
    }
}

/// The checks every pairing must pass.
pub fn check(initiator: &Name, requested: &Requested, responded: &Responded, count: usize) {
    assert_eq!(requested.replies, count);
    assert_eq!(requested.close, CloseReason::Local);
    assert_eq!(responded.session, requested.session);
    assert_eq!(responded.peer.key(), initiator.key(), "responder's peer");
    assert_eq!(responded.messages, count);
    assert_eq!(
        responded.bytes,
        (0..count).map(|i| request_payload(i).len()).sum::<usize>()
    );
    assert_eq!(responded.close, CloseReason::Peer);
}

/// Reliability for the tests that stall on purpose: retransmissions outlast a busy machine.
pub fn patient() -> SessionConfig {
    SessionConfig {
        reliability: Some(Reliability {
            interval: Duration::from_millis(500),
            max_retries: 40,
        }),
        ..SessionConfig::default()
    }
}

/// The side that stops reading events: opens a reliable session to `service`, then reads
/// nothing until `full` says the peer saw more acks than its event queue holds — so its driver
/// holds an event it cannot queue — and only then publishes. That publish must still be
/// answered. Then it reads everything, closes, and returns how many messages it got.
pub async fn stop_reading<R: AppRuntime>(
    app: &App<R>,
    service: &Name,
    full: smol::channel::Receiver<()>,
    count: usize,
) -> usize {
    let session = app.open_session(service, patient()).await.unwrap();
    full.recv().await.unwrap();
    let answered = futures_lite::future::or(
        async {
            Some(
                app.publish(session, Bytes::from_static(b"still here"))
                    .await,
            )
        },
        async {
            smol::Timer::after(Duration::from_secs(10)).await;
            None
        },
    )
    .await;
    let id = answered
        .expect("publish not answered while the app was behind on events")
        .unwrap();
    assert!(id > 0, "the session is established: the message went out");
    let (mut messages, mut lost) = (0, 0);
    while messages + lost < count {
        match app.next_event().await.unwrap() {
            SessionEvent::Message { session: s, .. } if s == session => messages += 1,
            SessionEvent::MessageLost { session: s, .. } if s == session => lost += 1,
            // Liveness may flag the peer on a very busy machine.
            SessionEvent::Delivered { .. } | SessionEvent::MemberState { .. } => {}
            other => panic!("slow reader: unexpected {other:?}"),
        }
    }
    app.close(session).await.unwrap();
    loop {
        if let SessionEvent::Closed { session: s, .. } = app.next_event().await.unwrap() {
            assert_eq!(s, session);
            return messages;
        }
    }
}

/// The other side: accepts the session, publishes `count` messages (at most `WINDOW`
/// unacknowledged, well within what the sender keeps for retransmission), tells `full` once
/// more than `queue` of them are acknowledged, and reads until the session closes. Returns
/// whether the slow reader's own message arrived.
pub async fn fill_up<R: AppRuntime>(
    app: &App<R>,
    full: smol::channel::Sender<()>,
    count: usize,
    queue: usize,
) -> bool {
    const WINDOW: usize = 256;
    let session = match app.next_event().await.unwrap() {
        SessionEvent::Incoming { session, .. } => session,
        other => panic!("filler: unexpected {other:?} before the session"),
    };
    let mut delivered = std::collections::BTreeSet::new();
    let (mut sent, mut got_message) = (0, false);
    loop {
        while sent < count && sent - delivered.len() < WINDOW {
            app.publish(session, Bytes::from((sent as u64).to_be_bytes().to_vec()))
                .await
                .unwrap();
            sent += 1;
        }
        match app.next_event().await.unwrap() {
            SessionEvent::Delivered { session: s, id } if s == session => {
                delivered.insert(id);
                if delivered.len() == queue + 1 {
                    full.send(()).await.unwrap();
                }
            }
            SessionEvent::Message { payload, .. } => {
                assert_eq!(&payload[..], b"still here");
                got_message = true;
            }
            SessionEvent::Closed { session: s, .. } if s == session => return got_message,
            SessionEvent::SendFailed { .. } | SessionEvent::MemberState { .. } => {}
            other => panic!("filler: unexpected {other:?}"),
        }
    }
}

/// A group member: takes the moderator's invitation, collects the broadcasts until its
/// session ends; returns them and why it ended.
pub async fn group_member<R: AppRuntime>(app: &App<R>) -> (Vec<Bytes>, CloseReason) {
    group_member_expecting(app, false).await
}

/// [`group_member`] of a group whose encryption must be `mls`.
pub async fn group_member_expecting<R: AppRuntime>(
    app: &App<R>,
    mls: bool,
) -> (Vec<Bytes>, CloseReason) {
    let session = match app.next_event().await.unwrap() {
        SessionEvent::Incoming {
            session,
            group: true,
            mls: encrypted,
            ..
        } => {
            assert_eq!(encrypted, mls, "member: the group's MLS setting");
            session
        }
        other => panic!("member: unexpected {other:?} before the invitation"),
    };
    let mut messages = Vec::new();
    loop {
        match app.next_event().await.unwrap() {
            SessionEvent::Message {
                session: s,
                payload,
                ..
            } if s == session => messages.push(payload),
            SessionEvent::Closed { session: s, reason } if s == session => {
                return (messages, reason)
            }
            SessionEvent::MemberJoined { .. } | SessionEvent::MemberLeft { .. } => {}
            other => panic!("member: unexpected {other:?}"),
        }
    }
}

/// Publishes requests `range` on a session and waits until every one is delivered.
pub async fn broadcast<R: AppRuntime>(
    app: &App<R>,
    session: SessionId,
    range: std::ops::Range<usize>,
) {
    let mut outstanding = std::collections::BTreeSet::new();
    for i in range {
        outstanding.insert(app.publish(session, request_payload(i)).await.unwrap());
    }
    while !outstanding.is_empty() {
        match app.next_event().await.unwrap() {
            SessionEvent::Delivered { session: s, id } if s == session => {
                outstanding.remove(&id);
            }
            SessionEvent::MemberJoined { .. } | SessionEvent::MemberLeft { .. } => {}
            other => panic!("moderator: unexpected {other:?}"),
        }
    }
}

/// A runtime the session scenarios run on: its `App`, and how a test thread waits for a future.
pub trait TestRuntime: AppRuntime {
    /// Names what the test made (apps of both runtimes share a node).
    const LABEL: &'static str;
    /// The smol side runs on the test thread, where no tokio runtime is entered: any use of a
    /// tokio timer or socket there would panic.
    fn block_on<F: std::future::Future>(future: F) -> F::Output;
}

impl TestRuntime for slim_smol::session::Smol {
    const LABEL: &'static str = "smol";
    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        smol::block_on(future)
    }
}

impl TestRuntime for slim_tokio::session::Tokio {
    const LABEL: &'static str = "tokio";
    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        tokio_runtime().block_on(future)
    }
}

/// Connects apps on `R` to `node`, named `prefix-R/role`, as [`scenario_name`] does.
pub async fn connect_as<R: AppRuntime>(
    node: &TestNode,
    prefix: &str,
    label: &str,
    role: &str,
) -> App<R> {
    App::<R>::connect(
        &node.endpoint(),
        scenario_name(&format!("{prefix}-{label}"), role),
        SECRET,
    )
    .await
    .unwrap()
}

/// A tokio runtime for the tokio side of a cross-runtime test.
pub fn tokio_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Names of a scenario's apps, `org/ns/<prefix>-<role>`.
pub fn scenario_name(prefix: &str, role: &str) -> Name {
    Name::new("org", "ns", &format!("{prefix}-{role}"))
}

/// A smol initiator opens a session with `config` to a tokio responder and exchanges `count`
/// requests; every check of [`check`] passes and the responder saw MLS iff `config.mls`.
pub fn smol_initiator_with_tokio_responder(prefix: &str, config: SessionConfig, count: usize) {
    use slim_smol::session::App;
    let node = TestNode::start();
    let endpoint = node.endpoint();
    let service = scenario_name(prefix, "tokio-responder");
    let mls = config.mls;
    let (ready_tx, ready_rx) = smol::channel::bounded(1);
    let tokio_side = {
        let (endpoint, service) = (endpoint.clone(), service.clone());
        std::thread::spawn(move || {
            tokio_runtime().block_on(async move {
                let app = slim_tokio::session::App::connect(&endpoint, service, SECRET)
                    .await
                    .unwrap();
                ready_tx.send(()).await.unwrap();
                respond(&app).await
            })
        })
    };
    let (initiator, requested) = smol::block_on(async {
        let app = App::connect(&endpoint, scenario_name(prefix, "smol-initiator"), SECRET)
            .await
            .unwrap();
        ready_rx.recv().await.unwrap();
        let requested = request_with(&app, &service, count, config).await;
        (app.name().clone(), requested)
    });
    let responded = tokio_side.join().unwrap();
    check(&initiator, &requested, &responded, count);
    assert_eq!(responded.mls, mls, "the responder's session encryption");
}

/// The mirror of [`smol_initiator_with_tokio_responder`]: a tokio initiator, a smol responder.
pub fn tokio_initiator_with_smol_responder(prefix: &str, config: SessionConfig, count: usize) {
    use slim_smol::session::App;
    let node = TestNode::start();
    let endpoint = node.endpoint();
    let service = scenario_name(prefix, "smol-responder");
    let mls = config.mls;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let tokio_side = {
        let (endpoint, service) = (endpoint.clone(), service.clone());
        let initiator = scenario_name(prefix, "tokio-initiator");
        std::thread::spawn(move || {
            tokio_runtime().block_on(async move {
                let app = slim_tokio::session::App::connect(&endpoint, initiator, SECRET)
                    .await
                    .unwrap();
                ready_rx.recv().unwrap();
                let requested = request_with(&app, &service, count, config).await;
                (app.name().clone(), requested)
            })
        })
    };
    let responded = smol::block_on(async {
        let app = App::connect(&endpoint, service.clone(), SECRET)
            .await
            .unwrap();
        ready_tx.send(()).unwrap();
        respond(&app).await
    });
    let (initiator, requested) = tokio_side.join().unwrap();
    check(&initiator, &requested, &responded, count);
    assert_eq!(responded.mls, mls, "the responder's session encryption");
}

/// A smol moderator creates a group with `config`, invites a smol and a tokio member,
/// broadcasts 10, removes the tokio member (removing it twice is a typed error), broadcasts 5
/// more and closes. Members must see the group's encryption as `config.mls`; the smol member
/// gets all 15 in order, the removed tokio member exactly the first 10.
pub fn smol_moderates_a_group_with_smol_and_tokio_members(prefix: &str, config: SessionConfig) {
    use slim_smol::session::{App, AppError};
    let node = TestNode::start();
    let endpoint = node.endpoint();
    let mls = config.mls;
    let (smol_member_name, tokio_member_name) = (
        scenario_name(prefix, "member-smol"),
        scenario_name(prefix, "member-tokio"),
    );
    let (ready_tx, ready_rx) = smol::channel::bounded(1);
    let tokio_member = {
        let (endpoint, name) = (endpoint.clone(), tokio_member_name.clone());
        std::thread::spawn(move || {
            tokio_runtime().block_on(async move {
                let app = slim_tokio::session::App::connect(&endpoint, name, SECRET)
                    .await
                    .unwrap();
                ready_tx.send(()).await.unwrap();
                group_member_expecting(&app, mls).await
            })
        })
    };
    let (moderator_close, (smol_got, smol_close)) = smol::block_on(async {
        let moderator = App::connect(&endpoint, scenario_name(prefix, "moderator"), SECRET)
            .await
            .unwrap();
        let member = App::connect(&endpoint, smol_member_name.clone(), SECRET)
            .await
            .unwrap();
        ready_rx.recv().await.unwrap();
        let moderate = async {
            let channel = scenario_name(prefix, "chan");
            let session = moderator.create_group(&channel, config).await.unwrap();
            moderator.invite(session, &smol_member_name).await.unwrap();
            moderator.invite(session, &tokio_member_name).await.unwrap();
            assert_eq!(moderator.members(session).await.unwrap().len(), 3);
            broadcast(&moderator, session, 0..10).await;
            // With MLS the removal commits a new epoch: what follows is unreadable to it.
            moderator.remove(session, &tokio_member_name).await.unwrap();
            assert_eq!(moderator.members(session).await.unwrap().len(), 2);
            // Removing someone who is not there is a typed error.
            assert!(matches!(
                moderator.remove(session, &tokio_member_name).await,
                Err(AppError::Membership(_))
            ));
            broadcast(&moderator, session, 10..15).await;
            moderator.close(session).await.unwrap();
            loop {
                match moderator.next_event().await.unwrap() {
                    SessionEvent::Closed { session: s, reason } if s == session => break reason,
                    SessionEvent::MemberLeft { .. } | SessionEvent::Delivered { .. } => {}
                    other => panic!("moderator, closing: unexpected {other:?}"),
                }
            }
        };
        futures_lite::future::zip(moderate, group_member_expecting(&member, mls)).await
    });
    let (tokio_got, tokio_close) = tokio_member.join().unwrap();
    assert_eq!(moderator_close, CloseReason::Local);
    let expected: Vec<_> = (0..15).map(request_payload).collect();
    assert_eq!(
        smol_got, expected,
        "the smol member got every broadcast, in order"
    );
    assert_eq!(smol_close, CloseReason::Peer);
    assert_eq!(
        tokio_got,
        expected[..10],
        "the tokio member got those before its removal"
    );
    assert_eq!(tokio_close, CloseReason::Removed);
}

/// Waits for the next event `wanted` accepts (skipping deliveries and membership news); panics
/// on anything else or after 10 s.
pub async fn next_matching<R: AppRuntime>(
    app: &App<R>,
    what: &str,
    wanted: impl Fn(&SessionEvent) -> bool,
) -> SessionEvent {
    let wait = async {
        loop {
            let event = app.next_event().await.unwrap();
            if wanted(&event) {
                return event;
            }
            match event {
                SessionEvent::Delivered { .. }
                | SessionEvent::MemberJoined { .. }
                | SessionEvent::MemberState { .. } => {}
                other => panic!("{}: waiting for {what}, got {other:?}", app.name()),
            }
        }
    };
    let timeout = async {
        smol::Timer::after(Duration::from_secs(10)).await;
        panic!("{}: no {what} within 10 s", app.name())
    };
    futures_lite::future::or(wait, timeout).await
}

/// A moderator and two members, one app type (so it runs on either adapter): a direct message
/// reaches its member only (the other's first message is the broadcast after it), a member's
/// direct message reaches the moderator, and a member's soft close and return are seen by the
/// moderator as its state.
pub async fn direct_messages_and_soft_close<R: AppRuntime>(
    moderator: &App<R>,
    a: &App<R>,
    b: &App<R>,
    channel: &Name,
) {
    let session = moderator.create_group(channel, reliable()).await.unwrap();
    moderator.invite(session, a.name()).await.unwrap();
    moderator.invite(session, b.name()).await.unwrap();
    for member in [a, b] {
        next_matching(member, "the invitation", |e| {
            matches!(e, SessionEvent::Incoming { session: s, group: true, .. } if *s == session)
        })
        .await;
    }
    let message = |expected: &'static [u8]| {
        move |e: &SessionEvent| match e {
            SessionEvent::Message {
                session: s,
                payload,
                ..
            } if *s == session => {
                assert_eq!(&payload[..], expected);
                true
            }
            _ => false,
        }
    };
    moderator
        .publish_to(session, a.name(), Bytes::from_static(b"for a"))
        .await
        .unwrap();
    moderator
        .publish(session, Bytes::from_static(b"for all"))
        .await
        .unwrap();
    next_matching(a, "the direct message", message(b"for a")).await;
    next_matching(a, "the broadcast", message(b"for all")).await;
    // The links are FIFO and a direct message is delivered on arrival: had b been sent "for a",
    // it would have seen it before the broadcast that followed.
    next_matching(
        b,
        "the broadcast (and not the direct message)",
        message(b"for all"),
    )
    .await;

    a.publish_to(
        session,
        moderator.name(),
        Bytes::from_static(b"for the moderator"),
    )
    .await
    .unwrap();
    next_matching(
        moderator,
        "a's direct message",
        message(b"for the moderator"),
    )
    .await;

    for online in [false, true] {
        b.set_online(session, online).await.unwrap();
        let b_name = b.name().clone();
        let state = next_matching(moderator, "b's state", |e| {
            matches!(e, SessionEvent::MemberState { member, .. } if member.key() == b_name.key())
        })
        .await;
        assert!(
            matches!(state, SessionEvent::MemberState { online: o, .. } if o == online),
            "b online: {online}, moderator saw {state:?}"
        );
    }
}

/// Runs `work` with a limit; `None` when the limit passed first (works under either runtime).
pub async fn within<T>(limit: Duration, work: impl std::future::Future<Output = T>) -> Option<T> {
    futures_lite::future::or(async { Some(work.await) }, async {
        smol::Timer::after(limit).await;
        None
    })
    .await
}

/// A producer that never reads its events: each acknowledged message leaves a `Delivered` it
/// does not take. Its publishes are answered while its driver holds up to `backlog` events
/// beyond the app's event queue (`event_queue`); past that, a publish that would wait for room
/// fails with `SendQueueFull` instead of the driver's memory growing without bound. Once the
/// producer reads its events, it can publish again. `sink` takes the session and reads all.
pub async fn producer_that_never_reads<R: AppRuntime>(
    producer: &App<R>,
    sink: &App<R>,
    event_queue: usize,
    backlog: usize,
) {
    use slim_core::session::sender::{PRODUCER_BUFFER, SEND_QUEUE};
    let sink_reads = async {
        loop {
            if sink.next_event().await.is_err() {
                return;
            }
        }
    };
    let produce = async {
        let session = producer
            .open_session(sink.name(), reliable())
            .await
            .unwrap();
        let mut answered = 0usize;
        let refused = loop {
            let payload = Bytes::from(answered.to_be_bytes().to_vec());
            match within(Duration::from_secs(10), producer.publish(session, payload)).await {
                None => panic!("publish {answered} not answered"),
                Some(Ok(_)) => answered += 1,
                Some(Err(error)) => break error,
            }
        };
        assert!(
            matches!(refused, AppError::Session(SessionError::SendQueueFull(..))),
            "refused with {refused:?}"
        );
        assert!(
            answered >= event_queue + backlog,
            "refused after {answered} publishes: the driver held fewer than its backlog allows"
        );
        assert!(
            answered <= event_queue + backlog + SEND_QUEUE + PRODUCER_BUFFER,
            "{answered} publishes answered: the backlog grew past its bound"
        );
        // Reading its events frees the producer.
        let mut read = 0usize;
        while let Some(event) = within(Duration::from_millis(500), producer.next_event()).await {
            event.unwrap();
            read += 1;
        }
        assert!(
            read >= event_queue + backlog,
            "only {read} events were held"
        );
        within(
            Duration::from_secs(10),
            producer.publish(session, Bytes::from_static(b"after reading")),
        )
        .await
        .expect("publish not answered after reading")
        .expect("publishing works again once the events are read");
    };
    futures_lite::future::or(produce, sink_reads).await;
}
