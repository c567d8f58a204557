//! End-to-end encrypted (MLS) sessions through a slim-tokio node, on both runtimes: the
//! cross-runtime scenarios of `sessions.rs` run with `mls: true` — a p2p session smol → tokio
//! and tokio → smol, and a group moderated on smol with a smol and a tokio member, one of them
//! removed (after which it cannot read the group's messages).

mod common;

use std::time::Duration;

use common::watchdog;
use slim_smol::session::SessionConfig;

const COUNT: usize = 20;

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
    common::smol_initiator_with_tokio_responder("mls", encrypted(), COUNT);
}

#[test]
fn mls_p2p_tokio_initiator_with_smol_responder() {
    let _guard = watchdog(
        "mls_p2p_tokio_initiator_with_smol_responder",
        Duration::from_secs(120),
    );
    common::tokio_initiator_with_smol_responder("mls", encrypted(), COUNT);
}

#[test]
fn mls_group_with_smol_and_tokio_members_and_a_removal() {
    let _guard = watchdog(
        "mls_group_with_smol_and_tokio_members_and_a_removal",
        Duration::from_secs(120),
    );
    common::smol_moderates_a_group_with_smol_and_tokio_members("mls", encrypted());
}
