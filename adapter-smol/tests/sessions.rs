//! The smol session `App` against a slim-tokio node over loopback HTTP/2: smol ↔ smol,
//! smol ↔ tokio both ways, the same scenario on tokio alone, and the typed errors.
//!
//! The smol side runs on the test thread (`smol::block_on`) and smol's executor threads, where no
//! tokio runtime is entered: any use of a tokio timer or socket there would panic.

mod common;

use std::time::{Duration, Instant};

use common::{check, request, respond, tokio_runtime, watchdog, TestNode, TestRuntime, SECRET};
use slim_core::session::AppRuntime;
use slim_proto::Name;
use slim_smol::session::{
    App, AppError, CloseReason, Reliability, SessionConfig, SessionError, SessionEvent,
};
use slim_smol::session::{Smol, EVENT_BACKLOG};
use slim_smol::ClientError;
use slim_tokio::session::Tokio;

const COUNT: usize = 100;

#[test]
fn smol_apps_run_a_reliable_p2p_session() {
    let _guard = watchdog(
        "smol_apps_run_a_reliable_p2p_session",
        Duration::from_secs(60),
    );
    let node = TestNode::start();
    smol::block_on(async {
        let service = Name::new("org", "ns", "smol-responder");
        let responder = App::connect(&node.endpoint(), service.clone(), SECRET)
            .await
            .unwrap();
        // host:port works as well as http://host:port.
        let initiator = App::connect(
            &node.addr.to_string(),
            Name::new("org", "ns", "smol-initiator"),
            SECRET,
        )
        .await
        .unwrap();
        assert_eq!(
            initiator.name().components(),
            ["org", "ns", "smol-initiator"]
        );
        assert_ne!(
            initiator.name().id(),
            slim_proto::name::ANY_INSTANCE,
            "instance from the identity"
        );
        let (requested, responded) =
            futures_lite::future::zip(request(&initiator, &service, COUNT), respond(&responder))
                .await;
        check(initiator.name(), &requested, &responded, COUNT);
        // The session is gone on both sides.
        assert!(matches!(
            initiator.publish(requested.session, &b"late"[..]).await,
            Err(AppError::Session(SessionError::UnknownSession(_)))
        ));
        assert!(matches!(
            responder.publish(responded.session, &b"late"[..]).await,
            Err(AppError::Session(SessionError::UnknownSession(_)))
        ));
    });
}

#[test]
fn smol_initiator_with_tokio_responder() {
    let _guard = watchdog(
        "smol_initiator_with_tokio_responder",
        Duration::from_secs(60),
    );
    common::smol_initiator_with_tokio_responder("plain", common::reliable(), COUNT);
}

#[test]
fn tokio_initiator_with_smol_responder() {
    let _guard = watchdog(
        "tokio_initiator_with_smol_responder",
        Duration::from_secs(60),
    );
    common::tokio_initiator_with_smol_responder("plain", common::reliable(), COUNT);
}

/// The scenario the smol test runs, unchanged, with two tokio apps on a tokio runtime.
#[test]
fn tokio_apps_run_the_same_scenario() {
    let _guard = watchdog("tokio_apps_run_the_same_scenario", Duration::from_secs(60));
    let node = TestNode::start();
    tokio_runtime().block_on(async {
        let service = Name::new("org", "ns", "tokio-responder");
        let responder =
            slim_tokio::session::App::connect(&node.endpoint(), service.clone(), SECRET)
                .await
                .unwrap();
        let initiator = slim_tokio::session::App::connect(
            &node.endpoint(),
            Name::new("org", "ns", "tokio-initiator"),
            SECRET,
        )
        .await
        .unwrap();
        let (requested, responded) =
            futures_lite::future::zip(request(&initiator, &service, COUNT), respond(&responder))
                .await;
        check(initiator.name(), &requested, &responded, COUNT);
    });
}

#[test]
fn connecting_to_a_closed_port_is_a_connect_error() {
    let _guard = watchdog(
        "connecting_to_a_closed_port_is_a_connect_error",
        Duration::from_secs(30),
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let result = smol::block_on(App::connect(
        &format!("http://{addr}"),
        Name::new("org", "ns", "nobody"),
        SECRET,
    ));
    match result {
        Err(AppError::Client(ClientError::Connect { endpoint, reason })) => {
            assert_eq!(endpoint, format!("http://{addr}"));
            assert!(reason.contains("connect"), "{reason}");
        }
        other => panic!("expected a connect error, got {other:?}"),
    }
}

#[test]
fn a_short_secret_is_refused_before_connecting() {
    // Port 1 would not answer: the secret is checked first.
    let result = smol::block_on(App::connect(
        "127.0.0.1:1",
        Name::new("org", "ns", "alice"),
        "too-short",
    ));
    assert!(matches!(result, Err(AppError::Layer(_))), "{result:?}");
}

#[test]
fn opening_a_session_nobody_serves_ends_with_no_answer() {
    let _guard = watchdog(
        "opening_a_session_nobody_serves_ends_with_no_answer",
        Duration::from_secs(30),
    );
    let node = TestNode::start();
    smol::block_on(async {
        let app = App::connect(&node.endpoint(), Name::new("org", "ns", "lonely"), SECRET)
            .await
            .unwrap();
        let config = SessionConfig {
            reliability: Some(Reliability {
                interval: Duration::from_millis(100),
                max_retries: 3,
            }),
            ..SessionConfig::default()
        };
        let started = Instant::now();
        let result = app
            .open_session(&Name::new("org", "ns", "nobody-serves-this"), config)
            .await;
        let took = started.elapsed();
        assert!(
            matches!(result, Err(AppError::NotOpened(CloseReason::NoAnswer(_)))),
            "{result:?}"
        );
        // 1 discovery + 3 retries, 100 ms apart.
        assert!(
            took >= Duration::from_millis(350) && took < Duration::from_secs(3),
            "{took:?}"
        );
        // The failed open was answered to the caller, not as an event, and the app goes on.
        assert!(matches!(
            app.publish(7, &b"x"[..]).await,
            Err(AppError::Session(SessionError::UnknownSession(7)))
        ));
        assert!(matches!(
            app.close(7).await,
            Err(AppError::Session(SessionError::UnknownSession(7)))
        ));
    });
}

/// A group moderated by a smol app, with a smol member and a tokio member: broadcasts reach
/// both, the tokio member is removed, later broadcasts reach the smol one only, then the group
/// closes.
#[test]
fn smol_moderates_a_group_with_smol_and_tokio_members() {
    let _guard = watchdog(
        "smol_moderates_a_group_with_smol_and_tokio_members",
        Duration::from_secs(60),
    );
    common::smol_moderates_a_group_with_smol_and_tokio_members("plain", common::reliable());
}

/// The node restarts under an open session: both clients redial, make their subscriptions
/// again, and the session carries on (what was sent while the node was away is retransmitted).
#[test]
fn a_session_survives_a_node_restart_smol() {
    session_survives_a_node_restart::<Smol>("a_session_survives_a_node_restart_smol");
}

#[test]
fn a_session_survives_a_node_restart_tokio() {
    session_survives_a_node_restart::<Tokio>("a_session_survives_a_node_restart_tokio");
}

fn session_survives_a_node_restart<R: TestRuntime>(test: &'static str) {
    let _guard = watchdog(test, Duration::from_secs(60));
    let node = TestNode::start();
    let addr = node.addr;
    let patient = SessionConfig {
        reliability: Some(Reliability {
            interval: Duration::from_millis(500),
            max_retries: 30,
        }),
        ..SessionConfig::default()
    };
    R::block_on(async {
        let connect = |role| common::connect_as::<R>(&node, "restart", R::LABEL, role);
        let (responder, initiator) = (connect("survivor").await, connect("asker").await);
        let service = common::scenario_name(&format!("restart-{}", R::LABEL), "survivor");
        let session = initiator.open_session(&service, patient).await.unwrap();
        let ask = async {
            ask_once(&initiator, session, 10).await;
            // The node goes away and comes back on the same port (off this runtime's threads:
            // stopping and starting a node blocks).
            let (restarted_tx, restarted) = futures_channel::oneshot::channel();
            std::thread::spawn(move || {
                let mut node = node;
                node.stop();
                let _ = restarted_tx.send(TestNode::start_on(addr));
            });
            let new_node = restarted.await.unwrap();
            for i in 11..14 {
                ask_once(&initiator, session, i).await;
            }
            initiator.close(session).await.unwrap();
            loop {
                match initiator.next_event().await.unwrap() {
                    SessionEvent::Closed { reason, .. } => break (new_node, reason),
                    SessionEvent::Delivered { .. } => {}
                    other => panic!("initiator, closing: unexpected {other:?}"),
                }
            }
        };
        let ((new_node, initiator_close), (echoed, responder_close)) =
            futures_lite::future::zip(ask, echo_until_closed(&responder)).await;
        assert_eq!(echoed, 4, "each request echoed once");
        assert_eq!(initiator_close, CloseReason::Local);
        assert_eq!(responder_close, CloseReason::Peer);
        drop(new_node);
    });
}

/// Sends request `i` and waits for its echo.
async fn ask_once<R: AppRuntime>(app: &slim_core::session::App<R>, session: u32, i: usize) {
    let request = common::request_payload(i);
    app.publish(session, request.clone()).await.unwrap();
    loop {
        match app.next_event().await.unwrap() {
            SessionEvent::Message { payload, .. } => {
                assert_eq!(payload, request, "echo of request {i}");
                return;
            }
            SessionEvent::Delivered { .. } => {}
            other => panic!("initiator: unexpected {other:?}"),
        }
    }
}

/// Echoes every message of the one session it is offered; returns how many, and why the
/// session ended.
async fn echo_until_closed<R: AppRuntime>(
    app: &slim_core::session::App<R>,
) -> (usize, CloseReason) {
    let mut echoed = 0;
    loop {
        match app.next_event().await.unwrap() {
            SessionEvent::Incoming { .. } | SessionEvent::Delivered { .. } => {}
            SessionEvent::Message {
                session, payload, ..
            } => {
                app.publish(session, payload).await.unwrap();
                echoed += 1;
            }
            SessionEvent::Closed { reason, .. } => return (echoed, reason),
            other => panic!("responder: unexpected {other:?}"),
        }
    }
}

/// An application behind on its events (the driver holds one it cannot queue) still gets its
/// commands answered: it may be waiting for one before it reads events again.
#[test]
fn an_app_behind_on_events_is_still_answered() {
    let _guard = watchdog(
        "an_app_behind_on_events_is_still_answered",
        Duration::from_secs(90),
    );
    const EVENT_QUEUE: usize = 4096; // what an App queues
    const COUNT: usize = EVENT_QUEUE + 100;
    let node = TestNode::start();
    smol::block_on(async {
        let service = Name::new("org", "ns", "filler");
        let filler = App::connect(&node.endpoint(), service.clone(), SECRET)
            .await
            .unwrap();
        let reader = App::connect(&node.endpoint(), Name::new("org", "ns", "reader"), SECRET)
            .await
            .unwrap();
        let (full_tx, full_rx) = smol::channel::bounded(1);
        let (messages, got_message) = futures_lite::future::zip(
            common::stop_reading(&reader, &service, full_rx, COUNT),
            common::fill_up(&filler, full_tx, COUNT, EVENT_QUEUE),
        )
        .await;
        assert_eq!(messages, COUNT);
        assert!(got_message, "the message published while behind arrived");
    });
}

/// A reliable session whose peer never acknowledges: 512 messages go out, 1 024 more wait in
/// the core's send queue, and the next `publish` waits for room (the core says
/// `SendQueueFull`; the app retries it for the caller) instead of failing. Room comes when the
/// first messages run out of retries (`SendFailed`).
#[test]
fn publish_waits_for_room_in_a_full_send_queue() {
    use slim_core::session::sender::{PRODUCER_BUFFER, SEND_QUEUE};
    let _guard = watchdog(
        "publish_waits_for_room_in_a_full_send_queue",
        Duration::from_secs(60),
    );
    let node = TestNode::start();
    smol::block_on(async {
        let service = Name::new("org", "ns", "mute");
        let mute = App::connect(&node.endpoint(), service.clone(), SECRET)
            .await
            .unwrap();
        let sender = App::connect(&node.endpoint(), Name::new("org", "ns", "sender"), SECRET)
            .await
            .unwrap();
        let config = SessionConfig {
            reliability: Some(Reliability {
                interval: Duration::from_secs(1),
                max_retries: 1,
            }),
            ..SessionConfig::default()
        };
        let session = sender.open_session(&service, config).await.unwrap();
        drop(mute); // no acks from now on
        let room = (PRODUCER_BUFFER + SEND_QUEUE) as u32;
        for id in 1..=room {
            assert_eq!(sender.publish(session, &[1u8][..]).await.unwrap(), id);
        }
        let started = Instant::now();
        let id = sender.publish(session, &[2u8][..]).await.unwrap();
        assert_eq!(id, room + 1, "nothing was dropped on the way");
        assert!(
            started.elapsed() >= Duration::from_millis(200),
            "a full send queue makes publish wait (returned after {:?})",
            started.elapsed()
        );
        loop {
            if let SessionEvent::SendFailed { id, .. } = sender.next_event().await.unwrap() {
                assert_eq!(id, 1);
                break;
            }
        }
    });
}

/// Direct messages (`publish_to`) and soft close (`set_online`) through either adapter's App.
#[test]
fn direct_messages_and_soft_close_smol() {
    direct_messages_and_soft_close::<Smol>("direct_messages_and_soft_close_smol");
}

#[test]
fn direct_messages_and_soft_close_tokio() {
    direct_messages_and_soft_close::<Tokio>("direct_messages_and_soft_close_tokio");
}

fn direct_messages_and_soft_close<R: TestRuntime>(test: &'static str) {
    let _guard = watchdog(test, Duration::from_secs(60));
    let node = TestNode::start();
    R::block_on(async {
        let connect = |role| common::connect_as::<R>(&node, "direct", R::LABEL, role);
        let (moderator, a, b) = (connect("mod").await, connect("a").await, connect("b").await);
        let channel = common::scenario_name(&format!("direct-{}", R::LABEL), "chan");
        common::direct_messages_and_soft_close(&moderator, &a, &b, &channel).await;
    });
}

/// A producer that never reads its events is refused with `SendQueueFull` once its driver
/// holds `EVENT_BACKLOG` of them beyond its queue, instead of holding more without bound.
#[test]
fn a_producer_that_never_reads_is_refused_not_grown_smol() {
    producer_that_never_reads::<Smol>("a_producer_that_never_reads_is_refused_not_grown_smol");
}

#[test]
fn a_producer_that_never_reads_is_refused_not_grown_tokio() {
    producer_that_never_reads::<Tokio>("a_producer_that_never_reads_is_refused_not_grown_tokio");
}

fn producer_that_never_reads<R: TestRuntime>(test: &'static str) {
    let _guard = watchdog(test, Duration::from_secs(120));
    let node = TestNode::start();
    R::block_on(async {
        let connect = |role| common::connect_as::<R>(&node, "producer", R::LABEL, role);
        let (producer, sink) = (connect("producer").await, connect("sink").await);
        common::producer_that_never_reads(&producer, &sink, 4096, EVENT_BACKLOG).await;
    });
}
