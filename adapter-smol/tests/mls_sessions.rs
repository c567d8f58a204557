//! End-to-end encrypted (MLS) sessions through a slim-tokio node, on both runtimes: a p2p
//! session smol → tokio and tokio → smol, and a group moderated on smol with a smol and a tokio
//! member, one of them removed.

mod common;

use std::time::Duration;

use common::{check, respond, watchdog, TestNode, SECRET};
use slim_proto::Name;
use slim_smol::session::{App, CloseReason, SessionConfig, SessionEvent};

const COUNT: usize = 20;

fn tokio_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn encrypted() -> SessionConfig {
    SessionConfig {
        mls: true,
        ..common::reliable()
    }
}

#[test]
fn mls_p2p_smol_initiator_with_tokio_responder() {
    let _guard = watchdog(
        "mls_p2p_smol_initiator_with_tokio_responder",
        Duration::from_secs(120),
    );
    let node = TestNode::start();
    let endpoint = node.endpoint();
    let service = Name::new("org", "ns", "mls-tokio-responder");
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
        let app = App::connect(
            &endpoint,
            Name::new("org", "ns", "mls-smol-initiator"),
            SECRET,
        )
        .await
        .unwrap();
        ready_rx.recv().await.unwrap();
        let requested = common::request_with(&app, &service, COUNT, encrypted()).await;
        (app.name().clone(), requested)
    });
    let responded = tokio_side.join().unwrap();
    check(&initiator, &requested, &responded, COUNT);
    assert!(responded.mls, "the responder's session is MLS-encrypted");
}

#[test]
fn mls_p2p_tokio_initiator_with_smol_responder() {
    let _guard = watchdog(
        "mls_p2p_tokio_initiator_with_smol_responder",
        Duration::from_secs(120),
    );
    let node = TestNode::start();
    let endpoint = node.endpoint();
    let service = Name::new("org", "ns", "mls-smol-responder");
    let responder = smol::block_on(App::connect(&endpoint, service.clone(), SECRET)).unwrap();
    let smol_side = std::thread::spawn(move || smol::block_on(respond(&responder)));
    let (initiator, requested) = tokio_runtime().block_on(async {
        let app = slim_tokio::session::App::connect(
            &endpoint,
            Name::new("org", "ns", "mls-tokio-initiator"),
            SECRET,
        )
        .await
        .unwrap();
        let requested = common::request_with(&app, &service, COUNT, encrypted()).await;
        (app.name().clone(), requested)
    });
    let responded = smol_side.join().unwrap();
    check(&initiator, &requested, &responded, COUNT);
    assert!(responded.mls, "the responder's session is MLS-encrypted");
}

#[test]
fn mls_group_with_smol_and_tokio_members_and_a_removal() {
    let _guard = watchdog(
        "mls_group_with_smol_and_tokio_members_and_a_removal",
        Duration::from_secs(120),
    );
    let node = TestNode::start();
    let endpoint = node.endpoint();
    let (smol_member_name, tokio_member_name) = (
        Name::new("org", "ns", "mls-member-smol"),
        Name::new("org", "ns", "mls-member-tokio"),
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
                common::group_member_expecting(&app, true).await
            })
        })
    };
    let (moderator_close, (smol_got, smol_close)) = smol::block_on(async {
        let moderator = App::connect(&endpoint, Name::new("org", "ns", "mls-moderator"), SECRET)
            .await
            .unwrap();
        let member = App::connect(&endpoint, smol_member_name.clone(), SECRET)
            .await
            .unwrap();
        ready_rx.recv().await.unwrap();
        let moderate = async {
            let session = moderator
                .create_group(&Name::new("org", "ns", "mls-chan"), encrypted())
                .await
                .unwrap();
            moderator.invite(session, &smol_member_name).await.unwrap();
            moderator.invite(session, &tokio_member_name).await.unwrap();
            common::broadcast(&moderator, session, 0..10).await;
            // The removal commits a new epoch: what follows is unreadable to the removed member.
            moderator.remove(session, &tokio_member_name).await.unwrap();
            common::broadcast(&moderator, session, 10..15).await;
            moderator.close(session).await.unwrap();
            loop {
                match moderator.next_event().await.unwrap() {
                    SessionEvent::Closed { session: s, reason } if s == session => break reason,
                    SessionEvent::MemberLeft { .. } | SessionEvent::Delivered { .. } => {}
                    other => panic!("moderator, closing: unexpected {other:?}"),
                }
            }
        };
        futures_lite::future::zip(moderate, common::group_member_expecting(&member, true)).await
    });
    let (tokio_got, tokio_close) = tokio_member.join().unwrap();
    assert_eq!(moderator_close, CloseReason::Local);
    let expected: Vec<_> = (0..15).map(common::request_payload).collect();
    assert_eq!(
        smol_got, expected,
        "the smol member decrypted every broadcast, in order"
    );
    assert_eq!(smol_close, CloseReason::Peer);
    assert_eq!(
        tokio_got,
        expected[..10],
        "the removed member got only what came before"
    );
    assert_eq!(tokio_close, CloseReason::Removed);
}
