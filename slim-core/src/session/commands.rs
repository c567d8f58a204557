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

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;
    use crate::session::{LayerConfig, Output};

    /// Replies over std channels: a dropped receiver is a caller that stopped waiting.
    struct StdReplies;

    impl Replies for StdReplies {
        type Reply<T> = mpsc::Sender<T>;

        fn answer<T>(reply: mpsc::Sender<T>, value: T) -> bool {
            reply.send(value).is_ok()
        }
    }

    fn layer() -> SessionLayer {
        SessionLayer::new(
            LayerConfig {
                name: Name::new("org", "ns", "alice"),
                secret: "interop-shared-secret-0123456789abcdef-0123456789".into(),
                unix_at_zero: 1_795_600_000,
            },
            [7; 32],
        )
        .expect("a valid layer config")
    }

    fn open(
        waiters: &mut Waiters<StdReplies>,
        layer: &mut SessionLayer,
    ) -> (SessionId, mpsc::Receiver<Result<SessionId, CloseReason>>) {
        let (reply, answer) = mpsc::channel();
        let command = Command::Open {
            peer: Name::new("org", "ns", "bob"),
            config: SessionConfig::default(),
            reply,
        };
        waiters.run(layer, command, Timestamp::ZERO);
        let session = std::iter::from_fn(|| layer.poll_output())
            .find_map(|output| match output {
                Output::Send(message) => message
                    .publish()
                    .and_then(|p| p.session.as_ref())
                    .map(|s| s.session_id),
                _ => None,
            })
            .expect("the open sends a discovery or join request");
        (session, answer)
    }

    #[test]
    fn an_open_is_answered_by_its_outcome_and_only_its_caller_sees_it() {
        let mut layer = layer();
        let mut waiters = Waiters::<StdReplies>::default();
        let (session, answer) = open(&mut waiters, &mut layer);
        let peer = Name::new("org", "ns", "bob");
        let established = SessionEvent::Established { session, peer };
        assert!(
            !waiters.resolve(&established),
            "for the caller, not the app"
        );
        assert_eq!(answer.try_recv(), Ok(Ok(session)));
        // Answered once: a second event of the session is the application's.
        assert!(waiters.resolve(&established));
    }

    #[test]
    fn an_outcome_whose_caller_gave_up_goes_to_the_application() {
        let mut layer = layer();
        let mut waiters = Waiters::<StdReplies>::default();
        let (session, answer) = open(&mut waiters, &mut layer);
        drop(answer); // `open_session` timed out
        let closed = SessionEvent::Closed {
            session,
            reason: CloseReason::Local,
        };
        assert!(
            waiters.resolve(&closed),
            "else nobody learns the session closed"
        );
    }

    #[test]
    fn a_membership_change_the_core_refuses_is_answered_at_once() {
        let mut layer = layer();
        let mut waiters = Waiters::<StdReplies>::default();
        let (reply, answer) = mpsc::channel();
        let invitee = Name::new("org", "ns", "carol");
        let command = Command::Invite {
            session: 12345,
            invitee: invitee.clone(),
            reply,
        };
        waiters.run(&mut layer, command, Timestamp::ZERO);
        assert!(matches!(answer.try_recv(), Ok(Err(reason)) if !reason.is_empty()));
        // Nothing was left waiting for it.
        let joined = SessionEvent::MemberJoined {
            session: 12345,
            member: invitee,
        };
        assert!(waiters.resolve(&joined));
        assert!(answer.try_recv().is_err());
    }
}
