//! The `request` and `reply` subcommands of `slim-tokio`: a point-to-point requester and an
//! answering service, on the session API, interoperable with `slim-bindings` peers.

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use slim_core::session::SessionEvent;
use slim_proto::Name;

use crate::session::{App, AppError, Reliability, SessionConfig, SessionStats};

/// What the reply service puts before every payload it echoes.
pub const REPLY_PREFIX: &[u8] = b"reply|";

/// A p2p requester's run.
#[derive(Debug, Clone)]
pub struct RequestConfig {
    pub endpoint: String,
    pub name: Name,
    pub to: Name,
    pub secret: String,
    pub count: u64,
    pub size: usize,
    /// How long to wait for each reply.
    pub timeout: Duration,
    pub reliability: Option<Reliability>,
    /// End-to-end encryption with MLS.
    pub mls: bool,
}

#[derive(Debug, Clone, Default)]
pub struct RequestReport {
    pub sent: u64,
    pub received: u64,
    /// Replies that were not `reply|` + the request.
    pub mismatched: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// The session layer's counters at the end of the run.
    pub session: SessionStats,
}

impl RequestReport {
    pub fn to_json(&self) -> String {
        format!(
            "{{\"sent\":{},\"received\":{},\"mismatched\":{},\"p50_us\":{:.1},\"p99_us\":{:.1},\"recovery\":{}}}",
            self.sent,
            self.received,
            self.mismatched,
            self.p50_us,
            self.p99_us,
            recovery_json(&self.session)
        )
    }
}

/// How a session layer recovered lost messages, as a JSON object: what test drivers check to
/// see which recovery path a run took.
pub fn recovery_json(stats: &SessionStats) -> String {
    format!(
        "{{\"rtx_requests_sent\":{},\"rtx_requests_received\":{},\"rtx_replies_sent\":{},\"rtx_replies_received\":{},\"data_retransmissions\":{},\"control_retransmissions\":{}}}",
        stats.rtx_requests_sent,
        stats.rtx_requests_received,
        stats.rtx_replies_sent,
        stats.rtx_replies_received,
        stats.data_retransmissions,
        stats.control_retransmissions
    )
}

/// Request `i`: its index, then bytes that vary with it (every byte value appears).
fn request_payload(i: u64, size: usize) -> Bytes {
    let mut buf = BytesMut::with_capacity(size.max(8));
    buf.put_u64(i);
    while buf.len() < size {
        buf.put_u8((buf.len() as u64 * 31 + i) as u8);
    }
    buf.freeze()
}

/// Opens a session to `to`, sends `count` requests one after the other and checks each reply.
pub async fn run_request(config: &RequestConfig) -> Result<RequestReport, AppError> {
    let app = App::connect(&config.endpoint, config.name.clone(), &config.secret).await?;
    let session_config = SessionConfig {
        reliability: config.reliability,
        mls: config.mls,
        ..SessionConfig::default()
    };
    let session = app.open_session(&config.to, session_config).await?;
    let mut report = RequestReport::default();
    let mut latencies = Vec::with_capacity(config.count as usize);
    for i in 0..config.count {
        let request = request_payload(i, config.size);
        let started = Instant::now();
        app.publish(session, request.clone()).await?;
        report.sent += 1;
        let deadline = tokio::time::Instant::now() + config.timeout;
        let reply = loop {
            match tokio::time::timeout_at(deadline, app.next_event()).await {
                Err(_) => break None,
                Ok(Err(error)) => return Err(error),
                Ok(Ok(SessionEvent::Message {
                    session: s,
                    payload,
                    ..
                })) if s == session => break Some(payload),
                Ok(Ok(SessionEvent::Closed { session: s, reason })) if s == session => {
                    tracing::warn!(?reason, "session closed by the peer");
                    report.session = app.stats().await?;
                    return Ok(finish(report, latencies));
                }
                Ok(Ok(_)) => continue,
            }
        };
        let Some(reply) = reply else {
            tracing::warn!(request = i, "no reply in time");
            continue;
        };
        latencies.push(started.elapsed());
        report.received += 1;
        let matches = reply.len() == REPLY_PREFIX.len() + request.len()
            && reply.starts_with(REPLY_PREFIX)
            && reply[REPLY_PREFIX.len()..] == request[..];
        if !matches {
            report.mismatched += 1;
        }
    }
    report.session = app.stats().await?;
    let _ = app.close(session).await;
    // Give the close a moment to reach the peer before the link goes.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(event) = app.next_event().await {
            if matches!(event, SessionEvent::Closed { session: s, .. } if s == session) {
                return;
            }
        }
    })
    .await;
    Ok(finish(report, latencies))
}

fn finish(mut report: RequestReport, mut latencies: Vec<Duration>) -> RequestReport {
    latencies.sort_unstable();
    let at = |q: f64| {
        if latencies.is_empty() {
            return 0.0;
        }
        let index = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[index].as_secs_f64() * 1e6
    };
    report.p50_us = at(0.5);
    report.p99_us = at(0.99);
    report
}

/// A moderated group run.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    pub endpoint: String,
    pub name: Name,
    pub channel: Name,
    pub secret: String,
    pub invite: Vec<Name>,
    pub count: u64,
    pub size: usize,
    pub remove: Option<Name>,
    /// Members invited after the first round; another round follows their invites.
    pub then_invite: Vec<Name>,
    pub reliability: Reliability,
    /// How long to wait for all acknowledgements of one round of broadcasts.
    pub timeout: Duration,
    /// End-to-end encryption with MLS.
    pub mls: bool,
}

#[derive(Debug, Clone, Default)]
pub struct GroupReport {
    pub members: usize,
    pub sent: u64,
    /// Broadcasts every member then in the group acknowledged.
    pub delivered: u64,
    /// Broadcasts some member never acknowledged.
    pub failed: u64,
    pub removed: bool,
    /// The session layer's counters at the end of the run.
    pub session: SessionStats,
}

impl GroupReport {
    pub fn to_json(&self) -> String {
        format!(
            "{{\"members\":{},\"sent\":{},\"delivered\":{},\"failed\":{},\"removed\":{},\"recovery\":{}}}",
            self.members,
            self.sent,
            self.delivered,
            self.failed,
            self.removed,
            recovery_json(&self.session)
        )
    }

    /// Every broadcast acknowledged by every member present.
    pub fn complete(&self) -> bool {
        self.delivered == self.sent && self.failed == 0
    }
}

/// Lets a driver (a test changing the network) act between the steps of [`run_group`]: each
/// finished step is announced, and the next one starts when the driver says so.
pub struct StepGate {
    pub announce: Box<dyn FnMut(&str) + Send>,
    /// One `()` per step allowed to start; a closed channel lets every later step start.
    pub proceed: tokio::sync::mpsc::Receiver<()>,
}

impl StepGate {
    async fn pass(gate: &mut Option<Self>, done: &str) {
        if let Some(gate) = gate {
            (gate.announce)(done);
            let _ = gate.proceed.recv().await;
        }
    }
}

/// Creates a group, invites every `invite`, broadcasts `count` messages and waits until every
/// member acknowledged each. With `then_invite`, invites those members and broadcasts `count`
/// more; with `remove`, removes that member and broadcasts `count` more.
pub async fn run_group(
    config: &GroupConfig,
    mut gate: Option<StepGate>,
) -> Result<GroupReport, AppError> {
    let app = App::connect(&config.endpoint, config.name.clone(), &config.secret).await?;
    let session = app
        .create_group(
            &config.channel,
            SessionConfig {
                reliability: Some(config.reliability),
                mls: config.mls,
                ..SessionConfig::default()
            },
        )
        .await?;
    for invitee in &config.invite {
        app.invite(session, invitee).await?;
        tracing::info!(%invitee, "joined");
    }
    let mut report = GroupReport {
        members: app.members(session).await?.len(),
        ..GroupReport::default()
    };
    broadcast_round(&app, session, config, &mut report).await?;
    if !config.then_invite.is_empty() {
        StepGate::pass(&mut gate, "round").await;
        for invitee in &config.then_invite {
            app.invite(session, invitee).await?;
            tracing::info!(%invitee, "joined");
        }
        report.members = app.members(session).await?.len();
        StepGate::pass(&mut gate, "then_invite").await;
        broadcast_round(&app, session, config, &mut report).await?;
    }
    if let Some(member) = &config.remove {
        StepGate::pass(&mut gate, "round").await;
        app.remove(session, member).await?;
        report.removed = true;
        report.members = app.members(session).await?.len();
        StepGate::pass(&mut gate, "remove").await;
        broadcast_round(&app, session, config, &mut report).await?;
    }
    report.session = app.stats().await?;
    let _ = app.close(session).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(event) = app.next_event().await {
            if matches!(event, SessionEvent::Closed { session: s, .. } if s == session) {
                return;
            }
        }
    })
    .await;
    Ok(report)
}

async fn broadcast_round(
    app: &App,
    session: u32,
    config: &GroupConfig,
    report: &mut GroupReport,
) -> Result<(), AppError> {
    let mut outstanding = std::collections::BTreeSet::new();
    // Payloads are numbered across rounds, so members can check the order of everything.
    let first = report.sent;
    for i in first..first + config.count {
        let id = app
            .publish(session, request_payload(i, config.size))
            .await?;
        outstanding.insert(id);
        report.sent += 1;
    }
    let deadline = tokio::time::Instant::now() + config.timeout;
    while !outstanding.is_empty() {
        match tokio::time::timeout_at(deadline, app.next_event()).await {
            Err(_) => break,
            Ok(Err(error)) => return Err(error),
            Ok(Ok(SessionEvent::Delivered { session: s, id })) if s == session => {
                if outstanding.remove(&id) {
                    report.delivered += 1;
                }
            }
            Ok(Ok(SessionEvent::SendFailed {
                session: s,
                id,
                missing,
            })) if s == session => {
                if outstanding.remove(&id) {
                    tracing::warn!(id, ?missing, "broadcast not acknowledged by every member");
                    report.failed += 1;
                }
            }
            Ok(Ok(_)) => {}
        }
    }
    report.failed += outstanding.len() as u64;
    Ok(())
}

/// Counters of a reply service.
#[derive(Debug, Clone, Default)]
pub struct ReplyStats {
    pub sessions: u64,
    pub replies: u64,
    /// The session layer's counters when the service stopped.
    pub session: SessionStats,
}

/// Soft close and back online on request (for test drivers): each `false` received takes
/// the app offline in every group it is in, each `true` brings it back; `done` is told how
/// each request ended.
pub struct Presence {
    pub requests: tokio::sync::mpsc::Receiver<bool>,
    pub done: Box<dyn FnMut(bool, Result<(), AppError>) + Send>,
}

impl Presence {
    /// The next request; never resolves without a `Presence` or once its sender is gone.
    async fn next(presence: &mut Option<Self>) -> bool {
        match presence {
            Some(p) => match p.requests.recv().await {
                Some(online) => online,
                None => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    }
}

/// Accepts every session (with `require_mls`, only end-to-end encrypted ones: others are
/// closed at once) and answers each message with `reply|` + the message, until `stop` resolves.
#[allow(clippy::too_many_arguments)] // the tool's knobs and hooks, each used once by the CLI
pub async fn run_reply(
    endpoint: &str,
    name: Name,
    secret: &str,
    require_mls: bool,
    ready: impl FnOnce(&Name),
    mut observe: impl FnMut(&SessionEvent),
    mut presence: Option<Presence>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<ReplyStats, AppError> {
    let app = App::connect(endpoint, name, secret).await?;
    ready(app.name());
    let mut stats = ReplyStats::default();
    let mut groups: std::collections::HashSet<u32> = std::collections::HashSet::new();
    tokio::pin!(stop);
    loop {
        let event = tokio::select! {
            () = &mut stop => {
                stats.session = app.stats().await?;
                return Ok(stats);
            }
            online = Presence::next(&mut presence) => {
                let mut result = Ok(());
                for &session in &groups {
                    if let Err(error) = app.set_online(session, online).await {
                        result = Err(error);
                    }
                }
                if let Some(p) = presence.as_mut() {
                    (p.done)(online, result);
                }
                continue;
            }
            event = app.next_event() => event?,
        };
        observe(&event);
        match event {
            SessionEvent::Incoming {
                session,
                peer,
                mls: false,
                ..
            } if require_mls => {
                tracing::warn!(session, %peer, "closing a session without MLS (--mls requires it)");
                if let Err(error) = app.close(session).await {
                    tracing::warn!(session, %error, "cannot close");
                }
            }
            SessionEvent::Incoming {
                session,
                peer,
                group,
                ..
            } => {
                stats.sessions += 1;
                if group {
                    groups.insert(session);
                }
                tracing::info!(session, %peer, group, "session opened");
            }
            SessionEvent::Message {
                session, source, ..
            } if groups.contains(&session) => {
                // Group messages are received (and acknowledged by the session layer), not answered.
                tracing::debug!(session, %source, "group message");
            }
            SessionEvent::Message {
                session, payload, ..
            } => {
                let mut reply = BytesMut::with_capacity(REPLY_PREFIX.len() + payload.len());
                reply.put_slice(REPLY_PREFIX);
                reply.put_slice(&payload);
                match app.publish(session, reply.freeze()).await {
                    Ok(_) => stats.replies += 1,
                    Err(error) => tracing::warn!(session, %error, "cannot reply"),
                }
            }
            SessionEvent::Closed { session, reason } => {
                groups.remove(&session);
                tracing::info!(session, ?reason, "session closed")
            }
            SessionEvent::MessageLost {
                session,
                source,
                id,
            } => {
                tracing::warn!(session, %source, id, "message lost")
            }
            _ => {}
        }
    }
}
