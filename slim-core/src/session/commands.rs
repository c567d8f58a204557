//! The runtime-independent half of a session driver: the commands an application gives it, and
//! the callers that wait for an outcome the core reports later, as an event. Each adapter brings
//! its own one-shot reply channel ([`Replies`]); carrying the commands out and answering the
//! waiting callers is the same for all of them.

use std::collections::BTreeMap;

use slim_proto::Name;

use super::waiting::{Answer, Publish, WaitingPublishes};
use super::{
    CloseReason, SessionConfig, SessionError, SessionEvent, SessionId, SessionLayer, SessionStats,
};
use crate::Timestamp;

/// A driver's one-shot reply channel.
pub trait Replies {
    /// The sending half, for one answer of type `T`.
    type Reply<T>;
    /// Answers the caller; false when it stopped waiting.
    fn answer<T>(reply: Self::Reply<T>, value: T) -> bool;
}

/// How a membership change (an invite, a removal) ended; an error says why it failed.
pub type Membership = Result<(), String>;

/// An application's command to its session driver, with where its answer goes.
pub enum Command<R: Replies> {
    Open {
        peer: Name,
        config: SessionConfig,
        reply: R::Reply<Result<SessionId, CloseReason>>,
    },
    CreateGroup {
        channel: Name,
        config: SessionConfig,
        reply: R::Reply<SessionId>,
    },
    Invite {
        session: SessionId,
        invitee: Name,
        reply: R::Reply<Membership>,
    },
    Remove {
        session: SessionId,
        member: Name,
        reply: R::Reply<Membership>,
    },
    Members {
        session: SessionId,
        reply: R::Reply<Option<Vec<Name>>>,
    },
    Publish {
        session: SessionId,
        publish: Publish,
        reply: R::Reply<Result<u32, SessionError>>,
    },
    SetOnline {
        session: SessionId,
        online: bool,
        reply: R::Reply<Result<(), SessionError>>,
    },
    Close {
        session: SessionId,
        reply: R::Reply<Result<(), SessionError>>,
    },
    Stats {
        reply: R::Reply<SessionStats>,
    },
}

/// Commands waiting for an outcome the core reports as an event.
pub struct Waiters<R: Replies> {
    opening: BTreeMap<SessionId, R::Reply<Result<SessionId, CloseReason>>>,
    /// By session and the member's service (the invitee is named without instance).
    joining: BTreeMap<(SessionId, [u64; 3]), R::Reply<Membership>>,
    leaving: BTreeMap<(SessionId, [u64; 3]), R::Reply<Membership>>,
    /// Publishes waiting for room in their session's send queue: `publish` waits instead of
    /// failing.
    publishing: WaitingPublishes<R::Reply<Result<u32, SessionError>>>,
}

impl<R: Replies> Default for Waiters<R> {
    fn default() -> Self {
        Self {
            opening: BTreeMap::new(),
            joining: BTreeMap::new(),
            leaving: BTreeMap::new(),
            publishing: WaitingPublishes::default(),
        }
    }
}

impl<R: Replies> Waiters<R> {
    /// Carries out `command` on `layer`: answered now, or kept until the core reports how it
    /// ended ([`Waiters::resolve`]).
    pub fn run(&mut self, layer: &mut SessionLayer, command: Command<R>, now: Timestamp) {
        match command {
            Command::Open {
                peer,
                config,
                reply,
            } => {
                let session = layer.create_session(&peer, config, now);
                self.opening.insert(session, reply);
            }
            Command::CreateGroup {
                channel,
                config,
                reply,
            } => {
                R::answer(reply, layer.create_group(&channel, config, now));
            }
            Command::Invite {
                session,
                invitee,
                reply,
            } => {
                let started = layer.invite(session, &invitee, now);
                Self::wait(&mut self.joining, (session, &invitee), started, reply);
            }
            Command::Remove {
                session,
                member,
                reply,
            } => {
                let started = layer.remove(session, &member, now);
                Self::wait(&mut self.leaving, (session, &member), started, reply);
            }
            Command::Members { session, reply } => {
                R::answer(reply, layer.members(session));
            }
            Command::Publish {
                session,
                publish,
                reply,
            } => {
                // Straight to the core, unless earlier publishes of the session wait for room.
                if let Some(answer) = self.publishing.submit(layer, session, publish, reply, now) {
                    Self::answer_publishes([answer]);
                }
            }
            Command::SetOnline {
                session,
                online,
                reply,
            } => {
                R::answer(reply, layer.set_online(session, online, now));
            }
            Command::Close { session, reply } => {
                R::answer(reply, layer.close(session, now));
            }
            Command::Stats { reply } => {
                R::answer(reply, layer.stats().clone());
            }
        }
    }

    /// A membership change the core `started` waits, by session and member, for the event
    /// that ends it; one it refused is answered now.
    fn wait<E: std::fmt::Display>(
        waiting: &mut BTreeMap<(SessionId, [u64; 3]), R::Reply<Membership>>,
        (session, member): (SessionId, &Name),
        started: Result<(), E>,
        reply: R::Reply<Membership>,
    ) {
        match started {
            Ok(()) => {
                waiting.insert((session, member.key().components), reply);
            }
            Err(error) => {
                R::answer(reply, Err(error.to_string()));
            }
        }
    }

    /// Answers the callers `event` completes; false when the event only concerned a waiter
    /// (the outcome of opening a session, unless its caller gave up waiting), true when it is
    /// for the application.
    pub fn resolve(&mut self, event: &SessionEvent) -> bool {
        let membership = |waiters: &mut BTreeMap<_, R::Reply<Membership>>, key, outcome| {
            if let Some(reply) = waiters.remove(&key) {
                R::answer(reply, outcome);
            }
        };
        match event {
            SessionEvent::Established { session, .. } => {
                if let Some(reply) = self.opening.remove(session) {
                    return !R::answer(reply, Ok(*session));
                }
            }
            SessionEvent::Closed { session, reason } => {
                if let Some(reply) = self.opening.remove(session) {
                    return !R::answer(reply, Err(reason.clone()));
                }
            }
            SessionEvent::MemberJoined { session, member } => membership(
                &mut self.joining,
                (*session, member.key().components),
                Ok(()),
            ),
            SessionEvent::InviteFailed {
                session,
                invitee,
                reason,
            } => membership(
                &mut self.joining,
                (*session, invitee.key().components),
                Err((*reason).to_owned()),
            ),
            SessionEvent::MemberLeft { session, member } => membership(
                &mut self.leaving,
                (*session, member.key().components),
                Ok(()),
            ),
            _ => {}
        }
        true
    }

    /// Whether publishes wait for room (the network must then be read for their acks).
    pub fn publishes_waiting(&self) -> bool {
        !self.publishing.is_empty()
    }

    /// Retries the waiting publishes, in order per session, until the core refuses one again.
    pub fn retry_publishes(&mut self, layer: &mut SessionLayer, now: Timestamp) {
        if self.publishes_waiting() {
            Self::answer_publishes(self.publishing.retry(layer, now));
        }
    }

    /// The driver holds `backlog` events its application has not taken: see
    /// [`WaitingPublishes::refuse_when_backlogged`].
    pub fn refuse_when_backlogged(&mut self, backlog: usize) {
        Self::answer_publishes(self.publishing.refuse_when_backlogged(backlog));
    }

    fn answer_publishes(
        answers: impl IntoIterator<Item = Answer<R::Reply<Result<u32, SessionError>>>>,
    ) {
        for (reply, result) in answers {
            R::answer(reply, result);
        }
    }
}
