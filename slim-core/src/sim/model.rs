//! The reference model: what each application published and what each one was told. Every
//! session event is checked against it the moment it happens (ordering, provenance, at most
//! once); [`Model::check_liveness`] judges the end state once the network healed and settled.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use slim_proto::{Name, NameKey};

use crate::session::sender::MAX_SEQUENCE_ID;
use crate::session::{CloseReason, SessionEvent, SessionId};
use crate::Timestamp;

use super::scenario::Side;

/// What the receiver or the sender of one stream reported about one message.
#[derive(Debug, Default)]
pub(crate) struct Stream {
    /// Message `id` is `published[id - 1]`.
    pub published: Vec<Bytes>,
    /// Receiver: `Message` events per id.
    pub delivered: BTreeMap<u32, u32>,
    /// Receiver: `MessageLost` ids.
    pub lost: BTreeSet<u32>,
    /// Receiver: the highest id delivered or reported lost.
    pub last: u32,
    /// Sender: `Delivered` ids.
    pub acked: BTreeSet<u32>,
    /// Sender: `SendFailed` ids.
    pub failed: BTreeSet<u32>,
    /// Direct messages (`publish_to`) by id: outside the sequence, delivered on arrival.
    pub direct: BTreeMap<u32, Bytes>,
    /// Ids published while the sender had marked its peer offline: the layer does not wait for
    /// them (no `Delivered`/`SendFailed`), so liveness does not judge them.
    pub unwaited: BTreeSet<u32>,
}

impl Stream {
    /// Every message id sent: the sequence, then the direct messages.
    fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        (1..=self.published.len() as u32).chain(self.direct.keys().copied())
    }
}

#[derive(Debug)]
pub(crate) struct SessionModel {
    pub initiator: usize,
    pub service: usize,
    pub reliable: bool,
    pub id: SessionId,
    pub participant: Option<usize>,
    /// The peer the initiator's `Established` named.
    pub established_with: Option<NameKey>,
    pub close_requested: [bool; 2],
    pub closed: [Option<CloseReason>; 2],
    /// `peer_offline[s]`: side `s` reported its peer offline (`MemberState`).
    pub peer_offline: [bool; 2],
    /// `streams[s]`: the messages side `s` sent.
    pub streams: [Stream; 2],
}

impl SessionModel {
    fn client(&self, side: Side) -> Option<usize> {
        match side {
            Side::Initiator => Some(self.initiator),
            Side::Participant => self.participant,
        }
    }

    fn any_closed(&self) -> bool {
        self.closed.iter().any(Option::is_some)
            || self.close_requested.iter().any(|requested| *requested)
    }
}

/// Totals of a run, for reports and the bench.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    pub sessions_opened: u64,
    pub sessions_established: u64,
    pub published: u64,
    pub delivered: u64,
    pub lost: u64,
    pub acked: u64,
    pub failed: u64,
    pub closed: u64,
    /// Messages the sender reported `Delivered` while the receiver reported them lost (the
    /// sender counts a retransmission request as an acknowledgement).
    pub acked_but_lost: u64,
    /// Messages the liveness check judged (reliable sessions nobody closed, peer not offline).
    pub judged: u64,
    /// Group runs: messages published to the group.
    pub group_published: u64,
    /// Group runs: messages delivered to members.
    pub group_delivered: u64,
}

pub(crate) struct Model {
    names: Vec<Name>,
    services: Vec<usize>,
    pub sessions: Vec<Option<SessionModel>>,
    /// Per client: its sessions by id.
    by_client: Vec<BTreeMap<SessionId, (usize, Side)>>,
    /// The run's group, once created.
    pub group: Option<GroupModel>,
}

type Check = Result<(), String>;

impl Model {
    pub fn new(names: Vec<Name>, services: Vec<usize>, sessions: usize) -> Self {
        let clients = names.len();
        Self {
            names,
            services,
            sessions: (0..sessions).map(|_| None).collect(),
            by_client: (0..clients).map(|_| BTreeMap::new()).collect(),
            group: None,
        }
    }

    /// The p2p sessions client `client` has had (open or closed).
    pub fn sessions_of(&self, client: usize) -> impl Iterator<Item = SessionId> + '_ {
        self.by_client[client].keys().copied()
    }

    /// The client and session id of one side of a logical session, if that side exists.
    pub fn endpoint(&self, session: usize, side: Side) -> Option<(usize, SessionId)> {
        let s = self.sessions.get(session)?.as_ref()?;
        Some((s.client(side)?, s.id))
    }

    pub fn opened(
        &mut self,
        session: usize,
        client: usize,
        service: usize,
        reliable: bool,
        id: SessionId,
    ) -> Check {
        if self.by_client[client].contains_key(&id) {
            return Err(format!(
                "client {client} reused session id {id} for a new session"
            ));
        }
        self.by_client[client].insert(id, (session, Side::Initiator));
        self.sessions[session] = Some(SessionModel {
            initiator: client,
            service,
            reliable,
            id,
            participant: None,
            established_with: None,
            close_requested: [false; 2],
            closed: [None, None],
            peer_offline: [false; 2],
            streams: Default::default(),
        });
        Ok(())
    }

    /// The application published a message: `result` is what `publish` returned.
    pub fn published(
        &mut self,
        session: usize,
        side: Side,
        payload: Bytes,
        result: Result<u32, crate::session::SessionError>,
    ) -> Check {
        let Some(s) = self.sessions[session].as_mut() else {
            return Ok(());
        };
        let stream = &mut s.streams[side.index()];
        let expected = stream.published.len() as u32 + 1;
        if s.peer_offline[side.index()] {
            stream.unwaited.insert(expected);
        }
        match result {
            Ok(0) if side == Side::Initiator && s.established_with.is_none() => {
                stream.published.push(payload);
                Ok(())
            }
            Ok(id) if id == expected => {
                stream.published.push(payload);
                Ok(())
            }
            Ok(id) => Err(format!(
                "session {} ({side:?}): publish returned id {id}, expected {expected}",
                s.id
            )),
            Err(crate::session::SessionError::Closing(_))
                if s.close_requested[side.index()] || s.closed[side.index()].is_some() =>
            {
                Ok(())
            }
            Err(crate::session::SessionError::UnknownSession(_))
                if s.closed[side.index()].is_some() =>
            {
                Ok(())
            }
            Err(error) => Err(format!(
                "session {} ({side:?}): publish refused: {error}",
                s.id
            )),
        }
    }

    /// The application sent a direct message: `result` is what `publish_to` returned.
    pub fn published_direct(
        &mut self,
        session: usize,
        side: Side,
        payload: Bytes,
        result: Result<u32, crate::session::SessionError>,
    ) -> Check {
        let Some(s) = self.sessions[session].as_mut() else {
            return Ok(());
        };
        let established = match side {
            Side::Initiator => s.established_with.is_some(),
            Side::Participant => true,
        };
        let stream = &mut s.streams[side.index()];
        match result {
            Ok(id) if id > MAX_SEQUENCE_ID && !stream.direct.contains_key(&id) => {
                if s.peer_offline[side.index()] {
                    stream.unwaited.insert(id);
                }
                stream.direct.insert(id, payload);
                Ok(())
            }
            Ok(id) => Err(format!(
                "session {} ({side:?}): publish_to returned id {id}, inside the sequence or reused",
                s.id
            )),
            // Before the handshake finished (a participant may still wait for its welcome).
            Err(crate::session::SessionError::NotEstablished(_))
                if !established || side == Side::Participant =>
            {
                Ok(())
            }
            Err(crate::session::SessionError::Closing(_))
                if s.close_requested[side.index()] || s.closed[side.index()].is_some() =>
            {
                Ok(())
            }
            Err(crate::session::SessionError::UnknownSession(_))
                if s.closed[side.index()].is_some() =>
            {
                Ok(())
            }
            Err(error) => Err(format!(
                "session {} ({side:?}): publish_to refused: {error}",
                s.id
            )),
        }
    }

    pub fn close_requested(
        &mut self,
        session: usize,
        side: Side,
        result: Result<(), crate::session::SessionError>,
    ) -> Check {
        let Some(s) = self.sessions[session].as_mut() else {
            return Ok(());
        };
        match result {
            Ok(()) => {
                s.close_requested[side.index()] = true;
                Ok(())
            }
            Err(_) if s.closed[side.index()].is_some() || s.close_requested[side.index()] => Ok(()),
            Err(error) => Err(format!(
                "session {} ({side:?}): close refused: {error}",
                s.id
            )),
        }
    }

    /// A session event at client `client`: checked against everything known so far.
    pub fn on_event(&mut self, client: usize, event: &SessionEvent, _now: Timestamp) -> Check {
        if let Some(check) = self.group_event(client, event) {
            return check;
        }
        match event {
            SessionEvent::Incoming {
                session,
                peer,
                group,
                ..
            } => self.on_incoming(client, *session, peer, *group),
            SessionEvent::Established { session, peer } => {
                let (index, side) = self.lookup(client, *session, "Established")?;
                let s = self.sessions[index].as_mut().expect("looked up");
                if side != Side::Initiator || s.established_with.is_some() {
                    return Err(format!(
                        "client {client}: unexpected Established for session {session}"
                    ));
                }
                if peer.key().components
                    != self.names[first_of(&self.services, s.service)?]
                        .key()
                        .components
                {
                    return Err(format!(
                        "client {client}: session {session} established with {peer}, not an instance of the service it opened"
                    ));
                }
                if let Some(p) = s.participant {
                    if self.names[p].key() != peer.key() {
                        return Err(format!(
                            "client {client}: session {session} established with {peer} but client {p} joined it"
                        ));
                    }
                }
                s.established_with = Some(peer.key());
                Ok(())
            }
            SessionEvent::Message {
                session,
                source,
                id,
                payload,
                ..
            } => {
                let (index, side) = self.lookup(client, *session, "Message")?;
                let sender = side.other();
                let s = self.sessions[index].as_mut().expect("looked up");
                let sender_client = s.client(sender);
                if sender_client.map(|c| self.names[c].key()) != Some(source.key()) {
                    return Err(format!(
                        "client {client}: session {session}: message {id} from {source}, not the peer"
                    ));
                }
                let reliable = s.reliable;
                let stream = &mut s.streams[sender.index()];
                if *id > MAX_SEQUENCE_ID {
                    if stream.direct.get(id) != Some(payload) {
                        return Err(format!(
                            "client {client}: session {session}: direct message {id} from {sender:?} is not one it sent"
                        ));
                    }
                    let count = stream.delivered.entry(*id).or_insert(0);
                    *count += 1;
                    if *count > 1 {
                        return Err(format!(
                            "client {client}: session {session}: direct message {id} from {sender:?} delivered {count} times"
                        ));
                    }
                    return Ok(());
                }
                let published = stream.published.get((*id as usize).wrapping_sub(1));
                if published != Some(payload) {
                    return Err(format!(
                        "client {client}: session {session}: message {id} from {sender:?} is not what it published \
                         ({} bytes delivered, {} messages published)",
                        payload.len(),
                        stream.published.len()
                    ));
                }
                let count = stream.delivered.entry(*id).or_insert(0);
                *count += 1;
                if reliable {
                    // p2p streams start at 1, and every id is delivered or reported lost, in order.
                    if *id != stream.last + 1 {
                        return Err(format!(
                            "client {client}: session {session}: message {id} from {sender:?} delivered after {} \
                             ({}; delivered {} time(s))",
                            stream.last,
                            skipped_or_reordered(*id, stream.last),
                            count
                        ));
                    }
                    stream.last = *id;
                }
                Ok(())
            }
            SessionEvent::MessageLost {
                session,
                source,
                id,
            } => {
                let (index, side) = self.lookup(client, *session, "MessageLost")?;
                let sender = side.other();
                let s = self.sessions[index].as_mut().expect("looked up");
                if s.client(sender).map(|c| self.names[c].key()) != Some(source.key()) {
                    return Err(format!(
                        "client {client}: session {session}: loss of {id} reported for {source}, not the peer"
                    ));
                }
                if !s.reliable {
                    return Err(format!(
                        "client {client}: session {session}: MessageLost on a best-effort session"
                    ));
                }
                let stream = &mut s.streams[sender.index()];
                if *id as usize > stream.published.len() {
                    return Err(format!(
                        "client {client}: session {session}: message {id} reported lost, but only {} were published",
                        stream.published.len()
                    ));
                }
                if *id != stream.last + 1 {
                    return Err(format!(
                        "client {client}: session {session}: message {id} reported lost after {} was delivered or lost ({})",
                        stream.last,
                        skipped_or_reordered(*id, stream.last),
                    ));
                }
                stream.lost.insert(*id);
                stream.last = *id;
                Ok(())
            }
            SessionEvent::Delivered { session, id }
            | SessionEvent::SendFailed { session, id, .. } => {
                let what = if matches!(event, SessionEvent::Delivered { .. }) {
                    "Delivered"
                } else {
                    "SendFailed"
                };
                let (index, side) = self.lookup(client, *session, what)?;
                let s = self.sessions[index].as_mut().expect("looked up");
                let peer = s.client(side.other()).map(|c| self.names[c].key());
                let stream = &mut s.streams[side.index()];
                if *id == 0
                    || (*id as usize > stream.published.len() && !stream.direct.contains_key(id))
                {
                    return Err(format!(
                        "client {client}: session {session}: {what} for message {id}, but {} were published",
                        stream.published.len()
                    ));
                }
                if stream.acked.contains(id) || stream.failed.contains(id) {
                    return Err(format!(
                        "client {client}: session {session}: second outcome ({what}) for message {id}"
                    ));
                }
                if let SessionEvent::SendFailed { missing, .. } = event {
                    if missing.len() != 1 || Some(missing[0].key()) != peer {
                        return Err(format!(
                            "client {client}: session {session}: SendFailed for {id} names {missing:?}, not the peer"
                        ));
                    }
                    stream.failed.insert(*id);
                } else {
                    stream.acked.insert(*id);
                }
                Ok(())
            }
            SessionEvent::Closed { session, reason } => {
                let (index, side) = self.lookup(client, *session, "Closed")?;
                let s = self.sessions[index].as_mut().expect("looked up");
                s.closed[side.index()] = Some(reason.clone());
                Ok(())
            }
            SessionEvent::MemberState {
                session,
                member,
                online,
            } => {
                let (index, side) = self.lookup(client, *session, "MemberState")?;
                let s = self.sessions[index].as_mut().expect("looked up");
                if s.client(side.other()).map(|c| self.names[c].key()) != Some(member.key()) {
                    return Err(format!(
                        "client {client}: session {session}: state of {member}, who is not the peer"
                    ));
                }
                if s.peer_offline[side.index()] != *online {
                    return Err(format!(
                        "client {client}: session {session}: peer reported {} twice",
                        if *online { "online" } else { "offline" }
                    ));
                }
                s.peer_offline[side.index()] = !online;
                Ok(())
            }
            SessionEvent::MemberJoined { session, .. }
            | SessionEvent::MemberLeft { session, .. }
            | SessionEvent::InviteFailed { session, .. } => Err(format!(
                "client {client}: group event in the p2p session {session}: {event:?}"
            )),
        }
    }

    fn on_incoming(
        &mut self,
        client: usize,
        session: SessionId,
        peer: &Name,
        group: bool,
    ) -> Check {
        if group {
            return Err(format!("client {client}: incoming group session {session}"));
        }
        let Some(initiator) = self.names.iter().position(|n| n.key() == peer.key()) else {
            return Err(format!(
                "client {client}: incoming session {session} from unknown {peer}"
            ));
        };
        let Some(&(index, Side::Initiator)) = self.by_client[initiator].get(&session) else {
            return Err(format!(
                "client {client}: incoming session {session} that {peer} never opened"
            ));
        };
        if let Some(existing) = self.by_client[client].get(&session) {
            return Err(format!(
                "client {client}: incoming session {session} collides with its session {existing:?} \
                 (ids are drawn per application; a collision is possible but should be vanishingly rare)"
            ));
        }
        let s = self.sessions[index].as_mut().expect("registered");
        if let Some(p) = s.participant {
            return Err(format!(
                "client {client}: joined session {session} that client {p} already joined"
            ));
        }
        if self.services[client] != s.service {
            return Err(format!(
                "client {client} (service {}) joined session {session} opened for service {}",
                self.services[client], s.service
            ));
        }
        if let Some(with) = s.established_with {
            if with != self.names[client].key() {
                return Err(format!(
                    "client {client}: joined session {session} that was established with another instance"
                ));
            }
        }
        s.participant = Some(client);
        self.by_client[client].insert(session, (index, Side::Participant));
        Ok(())
    }

    fn lookup(
        &self,
        client: usize,
        session: SessionId,
        what: &str,
    ) -> Result<(usize, Side), String> {
        let Some(&(index, side)) = self.by_client[client].get(&session) else {
            return Err(format!(
                "client {client}: {what} for session {session}, which it does not have"
            ));
        };
        let s = self.sessions[index].as_ref().expect("registered");
        if let Some(reason) = &s.closed[side.index()] {
            return Err(format!(
                "client {client}: {what} for session {session} after it was closed ({reason:?})"
            ));
        }
        Ok((index, side))
    }

    /// [`unresolved`](Self::unresolved) is empty (without building the report).
    pub fn all_resolved(&self) -> bool {
        self.sessions.iter().flatten().all(|s| {
            !s.reliable
                || s.any_closed()
                || s.streams.iter().all(|stream| {
                    stream.ids().all(|id| {
                        let received = stream.delivered.contains_key(&id)
                            || stream.lost.contains(&id)
                            || stream.failed.contains(&id);
                        let outcome = stream.acked.contains(&id) || stream.failed.contains(&id);
                        stream.unwaited.contains(&id) || (received && outcome)
                    })
                })
        })
    }

    /// Every message is accounted for: delivered, reported lost or failed, or its session ended.
    /// Also true for the sender: every message it published on a reliable, still open session
    /// has an outcome (`Delivered` or `SendFailed`).
    pub fn unresolved(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for s in self.sessions.iter().flatten() {
            if !s.reliable || s.any_closed() {
                continue;
            }
            for side in [Side::Initiator, Side::Participant] {
                let stream = &s.streams[side.index()];
                for id in stream.ids() {
                    if stream.unwaited.contains(&id) {
                        continue;
                    }
                    let delivered = stream.delivered.get(&id).copied().unwrap_or(0);
                    let reported = stream.lost.contains(&id) || stream.failed.contains(&id);
                    if delivered == 0 && !reported {
                        problems.push(format!(
                            "session {}: message {id} from the {side:?} was neither delivered nor reported lost or failed",
                            s.id
                        ));
                    }
                    if !stream.acked.contains(&id) && !stream.failed.contains(&id) {
                        problems.push(format!(
                            "session {}: the {side:?} never learned the outcome of message {id} (no Delivered, no SendFailed)",
                            s.id
                        ));
                    }
                }
            }
        }
        problems
    }

    /// With no way to lose a frame: every session opened and every message of a session nobody
    /// closed was delivered and acknowledged, with no loss or failure reported anywhere.
    pub fn lossless_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (index, s) in self.sessions.iter().enumerate() {
            let Some(s) = s else { continue };
            if let Some(CloseReason::NoAnswer(what)) = &s.closed[0] {
                problems.push(format!(
                    "session {} (logical {index}) failed to open: no answer to the {what}",
                    s.id
                ));
                continue;
            }
            if s.any_closed() {
                // A close races the traffic (and one during the handshake leaves the peer's
                // half of the session open): nothing to require.
                continue;
            }
            for side in [Side::Initiator, Side::Participant] {
                let stream = &s.streams[side.index()];
                if !stream.lost.is_empty() || !stream.failed.is_empty() {
                    problems.push(format!(
                        "session {}: {side:?} messages reported lost {:?} / failed {:?} on a lossless network",
                        s.id, stream.lost, stream.failed
                    ));
                }
                if !s.reliable {
                    continue;
                }
                for id in stream.ids() {
                    if stream.delivered.get(&id) != Some(&1) || !stream.acked.contains(&id) {
                        problems.push(format!(
                            "session {}: {side:?} message {id}: delivered {} time(s), acked: {}",
                            s.id,
                            stream.delivered.get(&id).copied().unwrap_or(0),
                            stream.acked.contains(&id)
                        ));
                    }
                }
            }
            if s.established_with.is_none() || s.participant.is_none() {
                problems.push(format!(
                    "session {} (logical {index}) never finished its handshake",
                    s.id
                ));
            }
        }
        problems
    }

    pub fn outcome(&self) -> Outcome {
        let mut o = Outcome::default();
        for s in self.sessions.iter().flatten() {
            o.sessions_opened += 1;
            o.sessions_established += u64::from(s.established_with.is_some());
            o.closed += s.closed.iter().filter(|c| c.is_some()).count() as u64;
            for stream in &s.streams {
                o.published += (stream.published.len() + stream.direct.len()) as u64;
                o.delivered += stream
                    .delivered
                    .values()
                    .map(|n| u64::from(*n))
                    .sum::<u64>();
                o.lost += stream.lost.len() as u64;
                o.acked += stream.acked.len() as u64;
                o.failed += stream.failed.len() as u64;
                o.acked_but_lost += stream.acked.intersection(&stream.lost).count() as u64;
                if s.reliable && !s.any_closed() {
                    o.judged += stream
                        .ids()
                        .filter(|id| !stream.unwaited.contains(id))
                        .count() as u64;
                }
            }
        }
        if let Some(g) = &self.group {
            for m in &g.members {
                o.group_published += m.published.len() as u64;
                o.group_delivered += m
                    .from
                    .values()
                    .map(|s| s.delivered.len() as u64)
                    .sum::<u64>();
            }
        }
        o
    }
}

fn skipped_or_reordered(id: u32, last: u32) -> String {
    if id > last + 1 {
        format!(
            "ids {}..={} skipped: neither delivered nor reported lost",
            last + 1,
            id - 1
        )
    } else {
        "out of order or repeated".into()
    }
}

/// The first client offering `service` (for its name's components).
fn first_of(services: &[usize], service: usize) -> Result<usize, String> {
    services
        .iter()
        .position(|s| *s == service)
        .ok_or_else(|| format!("no client offers service {service}"))
}

/// One member's view of the run's group.
#[derive(Debug, Default)]
pub(crate) struct GroupMember {
    /// It has the session (the moderator from the start, a member from its `Incoming`).
    pub joined: bool,
    pub closed: Option<CloseReason>,
    /// Per sender: what this member was told about the sender's messages.
    pub from: BTreeMap<usize, GroupStream>,
    /// Per message it published (index `id - 1`): the members it was owed to, as its own
    /// layer's member list stood when it published (those not reported offline).
    pub owed: Vec<BTreeSet<usize>>,
    pub published: Vec<Bytes>,
    pub acked: BTreeSet<u32>,
    pub failed: BTreeSet<u32>,
    /// Members this client reported offline (`MemberState`).
    pub offline: BTreeSet<usize>,
    /// When it joined, in join order (the moderator first, at 0).
    pub join_order: Option<u32>,
    /// Removed, it ignores its removal and keeps its MLS state ([`super::SimConfig::mls_defiant_removal`]):
    /// no longer in the group for liveness and membership agreement.
    pub defiant: bool,
}

/// A receiver's stream from one sender: it starts where the sender started sending to it (at 1
/// for a sender that joined after it),
/// then every id is delivered or reported lost, once, in order.
#[derive(Debug, Default)]
pub(crate) struct GroupStream {
    pub delivered: BTreeSet<u32>,
    pub lost: BTreeSet<u32>,
    pub last: Option<u32>,
    /// The first id delivered or reported lost: the stream's start.
    pub first: Option<u32>,
}

/// The run's group (at most one).
#[derive(Debug)]
pub(crate) struct GroupModel {
    pub moderator: usize,
    pub id: SessionId,
    pub reliable: bool,
    pub members: Vec<GroupMember>,
    pub close_requested: bool,
    /// Members the moderator asked to remove.
    pub remove_requested: BTreeSet<usize>,
    /// Removals the moderator reported complete (`MemberLeft`), with how many messages each
    /// client had published then: the removed member may receive none after those.
    pub removed: BTreeMap<usize, Vec<usize>>,
    /// Members that joined so far.
    pub joins: u32,
    /// Invites the moderator accepted, per invitee.
    pub invited: BTreeMap<usize, u32>,
    /// Outcomes the moderator reported (`MemberJoined`, `InviteFailed`), per invitee.
    pub invite_outcomes: BTreeMap<usize, u32>,
}

impl GroupModel {
    pub fn new(moderator: usize, id: SessionId, reliable: bool, clients: usize) -> Self {
        let mut members: Vec<GroupMember> = (0..clients).map(|_| GroupMember::default()).collect();
        members[moderator].joined = true;
        members[moderator].join_order = Some(0);
        GroupModel {
            moderator,
            id,
            reliable,
            members,
            close_requested: false,
            remove_requested: BTreeSet::new(),
            removed: BTreeMap::new(),
            joins: 0,
            invited: BTreeMap::new(),
            invite_outcomes: BTreeMap::new(),
        }
    }

    /// A reliable stream from a sender that joined after the receiver starts at 1 (the sender's
    /// member list, from its welcome, has the receiver): the first id it delivers or reports
    /// lost.
    fn check_stream_start(&self, receiver: usize, sender: usize, id: u32) -> Result<(), String> {
        let later = match (
            self.members[receiver].join_order,
            self.members[sender].join_order,
        ) {
            (Some(r), Some(s)) => s > r,
            _ => false,
        };
        let fresh = self.members[receiver]
            .from
            .get(&sender)
            .is_none_or(|s| s.first.is_none());
        if self.reliable && later && fresh && id != 1 {
            return Err(format!(
                "client {receiver}: group {}: its stream from client {sender}, who joined after it, starts at {id}",
                self.id
            ));
        }
        Ok(())
    }

    /// Client `client` has the group open (joined, not closed, not a removed member that
    /// ignores its removal).
    pub fn open(&self, client: usize) -> bool {
        let m = &self.members[client];
        m.joined && m.closed.is_none() && !m.defiant
    }
}

impl Model {
    /// The client whose full name this is.
    pub fn client_of(&self, name: &Name) -> Option<usize> {
        self.names.iter().position(|n| n.key() == name.key())
    }

    pub fn group_created(&mut self, moderator: usize, id: SessionId, reliable: bool) -> Check {
        if self.by_client[moderator].contains_key(&id) {
            return Err(format!(
                "client {moderator}: group id {id} collides with one of its p2p sessions"
            ));
        }
        self.group = Some(GroupModel::new(moderator, id, reliable, self.names.len()));
        Ok(())
    }

    /// Client `client` published on the group; `members` is its layer's member list then;
    /// `rejoining`: its MLS epoch was stale, so the publish is queued (id 0) and gets the next
    /// id once the rejoin is done (queued publishes go out in order).
    pub fn group_published(
        &mut self,
        client: usize,
        payload: Bytes,
        members: &[Name],
        held: bool,
        rejoining: bool,
        result: Result<u32, crate::session::SessionError>,
    ) -> Check {
        let owed: BTreeSet<usize> = members
            .iter()
            .filter_map(|n| self.client_of(n))
            .filter(|c| *c != client)
            .collect();
        let Some(g) = self.group.as_mut() else {
            return Ok(());
        };
        let m = &mut g.members[client];
        let expected = m.published.len() as u32 + 1;
        match result {
            Ok(id) if id == expected || (id == 0 && rejoining) => {
                let owed = owed.difference(&m.offline).copied().collect();
                m.owed.push(owed);
                m.published.push(payload);
                Ok(())
            }
            Ok(id) => Err(format!(
                "client {client}: group publish returned id {id}, expected {expected}"
            )),
            Err(crate::session::SessionError::Closing(_)) => Ok(()),
            // Its `Closed` waits behind a channel unsubscription the driver carries out first.
            Err(crate::session::SessionError::UnknownSession(_)) if held => Ok(()),
            Err(error) => Err(format!("client {client}: group publish refused: {error}")),
        }
    }

    fn group_event(&mut self, client: usize, event: &SessionEvent) -> Option<Check> {
        let g = self.group.as_ref()?;
        let session = match event {
            SessionEvent::Incoming { session, .. }
            | SessionEvent::Established { session, .. }
            | SessionEvent::Message { session, .. }
            | SessionEvent::Delivered { session, .. }
            | SessionEvent::SendFailed { session, .. }
            | SessionEvent::MessageLost { session, .. }
            | SessionEvent::MemberJoined { session, .. }
            | SessionEvent::MemberLeft { session, .. }
            | SessionEvent::MemberState { session, .. }
            | SessionEvent::InviteFailed { session, .. }
            | SessionEvent::Closed { session, .. } => *session,
        };
        if session != g.id || self.by_client[client].contains_key(&session) {
            return None;
        }
        Some(self.on_group_event(client, event))
    }

    fn on_group_event(&mut self, client: usize, event: &SessionEvent) -> Check {
        let names = &self.names;
        let g = self.group.as_mut().expect("checked");
        let sid = g.id;
        let who = |n: &Name| names.iter().position(|x| x.key() == n.key());
        if let SessionEvent::Incoming { peer, group, .. } = event {
            let m = &g.members[client];
            if !group || m.joined || client == g.moderator {
                return Err(format!(
                    "client {client}: unexpected Incoming for group {sid} (group: {group}, joined: {})",
                    m.joined
                ));
            }
            if who(peer) != Some(g.moderator) {
                return Err(format!(
                    "client {client}: group {sid} joined from {peer}, not the moderator"
                ));
            }
            g.joins += 1;
            g.members[client].joined = true;
            g.members[client].join_order = Some(g.joins);
            return Ok(());
        }
        let m = &g.members[client];
        if !m.joined {
            return Err(format!(
                "client {client}: {event:?} for group {sid}, which it never joined"
            ));
        }
        if let Some(reason) = &m.closed {
            return Err(format!(
                "client {client}: {event:?} for group {sid} after it was closed ({reason:?})"
            ));
        }
        match event {
            SessionEvent::Message {
                source,
                id,
                payload,
                ..
            } => {
                let Some(sender) = who(source).filter(|s| *s != client) else {
                    return Err(format!(
                        "client {client}: group {sid}: message {id} from {source}"
                    ));
                };
                if g.members[sender]
                    .published
                    .get((*id as usize).wrapping_sub(1))
                    != Some(payload)
                {
                    return Err(format!(
                        "client {client}: group {sid}: message {id} from client {sender} is not what it published"
                    ));
                }
                if let Some(counts) = g.removed.get(&client) {
                    if *id as usize > counts[sender] {
                        return Err(format!(
                            "client {client}: group {sid}: message {id} from client {sender}, published after its removal completed"
                        ));
                    }
                }
                let reliable = g.reliable;
                g.check_stream_start(client, sender, *id)?;
                let stream = g.members[client].from.entry(sender).or_default();
                // Best-effort groups, as best-effort p2p sessions, may deliver a duplicate.
                if !stream.delivered.insert(*id) && reliable {
                    return Err(format!(
                        "client {client}: group {sid}: message {id} from client {sender} delivered twice"
                    ));
                }
                if reliable {
                    if let Some(last) = stream.last {
                        if *id != last + 1 {
                            return Err(format!(
                                "client {client}: group {sid}: message {id} from client {sender} delivered after {last} ({})",
                                skipped_or_reordered(*id, last)
                            ));
                        }
                    }
                    stream.last = Some(*id);
                }
                stream.first.get_or_insert(*id);
                Ok(())
            }
            SessionEvent::MessageLost { source, id, .. } => {
                let Some(sender) = who(source) else {
                    return Err(format!(
                        "client {client}: group {sid}: loss reported for unknown {source}"
                    ));
                };
                if !g.reliable || *id as usize > g.members[sender].published.len() {
                    return Err(format!(
                        "client {client}: group {sid}: message {id} from client {sender} reported lost \
                         (reliable: {}, published: {})",
                        g.reliable,
                        g.members[sender].published.len()
                    ));
                }
                g.check_stream_start(client, sender, *id)?;
                let stream = g.members[client].from.entry(sender).or_default();
                if let Some(last) = stream.last {
                    if *id != last + 1 {
                        return Err(format!(
                            "client {client}: group {sid}: message {id} from client {sender} reported lost after {last} ({})",
                            skipped_or_reordered(*id, last)
                        ));
                    }
                }
                stream.last = Some(*id);
                stream.first.get_or_insert(*id);
                stream.lost.insert(*id);
                Ok(())
            }
            SessionEvent::Delivered { id, .. } | SessionEvent::SendFailed { id, .. } => {
                let m = &mut g.members[client];
                if *id == 0 || *id as usize > m.published.len() {
                    return Err(format!(
                        "client {client}: group {sid}: outcome for message {id}, but {} were published",
                        m.published.len()
                    ));
                }
                if m.acked.contains(id) || m.failed.contains(id) {
                    return Err(format!(
                        "client {client}: group {sid}: second outcome for message {id}: {event:?}"
                    ));
                }
                if matches!(event, SessionEvent::Delivered { .. }) {
                    m.acked.insert(*id);
                } else {
                    m.failed.insert(*id);
                }
                Ok(())
            }
            SessionEvent::MemberLeft { member, .. } => {
                if client == g.moderator {
                    if let Some(left) = who(member) {
                        let counts = g.members.iter().map(|m| m.published.len()).collect();
                        if g.remove_requested.contains(&left) {
                            g.removed.insert(left, counts);
                        }
                    }
                }
                Ok(())
            }
            SessionEvent::MemberState { member, online, .. } => {
                if let Some(c) = who(member) {
                    let offline = &mut g.members[client].offline;
                    if *online {
                        offline.remove(&c);
                    } else {
                        offline.insert(c);
                    }
                }
                Ok(())
            }
            SessionEvent::InviteFailed {
                invitee: member, ..
            }
            | SessionEvent::MemberJoined { member, .. }
                if client == g.moderator =>
            {
                // One outcome per invite: `MemberJoined` or `InviteFailed` (which names the
                // service invited when no instance answered).
                let by_service = |n: &Name| {
                    names
                        .iter()
                        .position(|x| x.key().components == n.key().components)
                };
                let invitee = if member.id() == slim_proto::name::ANY_INSTANCE {
                    by_service(member)
                } else {
                    who(member)
                };
                let Some(c) = invitee else {
                    return Err(format!(
                        "client {client}: group {sid}: invite outcome for a stranger: {event:?}"
                    ));
                };
                let outcomes = g.invite_outcomes.entry(c).or_default();
                *outcomes += 1;
                if *outcomes > g.invited.get(&c).copied().unwrap_or(0) {
                    return Err(format!(
                        "client {client}: group {sid}: {outcomes} outcome(s) for {} invite(s) of client {c}, the last {event:?}",
                        g.invited.get(&c).copied().unwrap_or(0)
                    ));
                }
                Ok(())
            }
            SessionEvent::InviteFailed { .. } => Err(format!(
                "client {client}: group {sid}: invite outcome at a member: {event:?}"
            )),
            SessionEvent::MemberJoined { .. } => Ok(()),
            SessionEvent::Closed { reason, .. } => {
                g.members[client].closed = Some(reason.clone());
                Ok(())
            }
            SessionEvent::Incoming { .. } | SessionEvent::Established { .. } => Err(format!(
                "client {client}: group {sid}: unexpected {event:?}"
            )),
        }
    }

    /// Group liveness once the network healed and settled: every message a sender that is still
    /// in the group published to a member still in it (per the sender's member list then, not
    /// offline) was delivered or reported lost there, or failed at the sender; the sender
    /// learned an outcome.
    pub fn group_unresolved(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let Some(g) = &self.group else {
            return problems;
        };
        if !g.reliable || g.close_requested || !g.open(g.moderator) {
            return problems;
        }
        for (sender, m) in g.members.iter().enumerate() {
            if !g.open(sender) {
                continue;
            }
            for (index, owed) in m.owed.iter().enumerate() {
                let id = index as u32 + 1;
                let mut waited = false;
                for &receiver in owed {
                    if !g.open(receiver) || g.remove_requested.contains(&receiver) {
                        continue;
                    }
                    waited = true;
                    let stream = g.members[receiver].from.get(&sender);
                    // As for p2p: the sender's `SendFailed` accounts for it too (a receiver
                    // only learns of a gap from a later message).
                    if !m.failed.contains(&id)
                        && !stream
                            .is_some_and(|s| s.delivered.contains(&id) || s.lost.contains(&id))
                    {
                        problems.push(format!(
                            "group {}: message {id} from client {sender} neither delivered to nor reported lost by client {receiver}",
                            g.id
                        ));
                    }
                }
                if waited && !m.acked.contains(&id) && !m.failed.contains(&id) {
                    problems.push(format!(
                        "group {}: client {sender} never learned the outcome of message {id}",
                        g.id
                    ));
                }
            }
        }
        problems
    }
}
