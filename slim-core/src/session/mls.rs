//! The MLS side of one session (spec §4.4–§4.7): which group state it is in, and how data
//! payloads are sealed and opened with the HeaderIntegrityAad as authenticated data.
//!
//! The session layer owns the flows (key package in JOIN_REPLY, welcome and commits in
//! `MlsPayload`s); this module keeps the [`GroupCore`] and the rules around it, so the layer
//! only asks "seal this", "open this", "apply this commit".

use prost::Message as _;
use slim_proto::pb;

use crate::group::{
    CommitError, CommitOut, CommitOutcome, DecryptError, GroupConfig, GroupCore, JoinError,
    MlsIdentity, PendingJoin, SetupError,
};
use crate::identity::{publish_aad, SharedSecret, TokenError, VerifiedToken};

/// Share of received data messages whose authenticated data is compared with the header (the
/// reference's `header_integrity_validation_percent`; its clients default to 100).
pub const DEFAULT_VALIDATION_PERCENT: u32 = 100;

/// Where a session's MLS group stands.
#[derive(Debug)]
enum State {
    /// Participant: our key package went out in the JOIN_REPLY; the welcome has not come.
    Joining {
        pending: Box<PendingJoin>,
        key_package: Vec<u8>,
    },
    Active(Box<GroupCore>),
    /// Removed from the group (or the group could not be joined): nothing decrypts any more.
    Gone,
}

/// Why a data payload could not be sealed or opened.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("no MLS group yet (the welcome has not been processed)")]
    NotReady,
    #[error("not a member of the MLS group any more")]
    Gone,
    #[error("data message without an application payload")]
    NoPayload,
    #[error("message without headers")]
    NoHeaders,
    #[error("cannot encrypt: {0}")]
    Encrypt(String),
    #[error(transparent)]
    Decrypt(#[from] DecryptError),
    /// The sender's authenticated data does not describe the header this copy arrived with.
    #[error("authenticated data does not match the message header")]
    AadMismatch,
}

/// Credential checks for MLS: the token in a credential must be one of our deployment's
/// (same shared secret), valid at `now_unix`.
pub struct TokenVerifier<'a> {
    pub secret: &'a SharedSecret,
    pub now_unix: u64,
}

impl TokenVerifier<'_> {
    pub fn verify(&self, token: &str) -> Result<VerifiedToken, TokenError> {
        self.secret.verify(token, self.now_unix)
    }
}

/// A read-only view of a session's MLS group (for checks: the simulation's invariants).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MlsState {
    pub group_id: Vec<u8>,
    pub epoch: u64,
    /// Equal for every member at the same epoch (RFC 9420 §8.7).
    pub epoch_authenticator: Vec<u8>,
    /// The members' app instance ids (their names' instance ids), by leaf index.
    pub members: Vec<u128>,
}

/// What a GROUP_UPDATE's commit did to our group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// Applied (with any buffered successors), or applied already.
    Applied,
    /// It removed us: nothing decrypts any more.
    RemovedUs,
    /// Ahead of the next commit we expect: it waits for one we have not had.
    Waiting,
}

/// A data payload, opened.
#[derive(Debug)]
pub struct Opened {
    pub plaintext: Vec<u8>,
    /// The epoch the sender encrypted it in.
    pub epoch: u64,
}

/// The MLS state of one session.
#[derive(Debug)]
pub struct SessionMls {
    state: State,
    /// Participant rejoining (spec §4.6 soft close / rejoin): the fresh key package sent in the
    /// REJOIN_REQUEST, waiting for the REJOIN_REPLY's welcome. The old group stays in use.
    rejoining: Option<(Box<PendingJoin>, Vec<u8>)>,
    validation_percent: u32,
    /// Sampling accumulator: a message is checked each time it passes 100.
    sampled: u32,
}

impl SessionMls {
    /// The moderator's (or p2p initiator's) group, with us as the only member.
    pub fn create(identity: &MlsIdentity, config: GroupConfig) -> Result<Self, SetupError> {
        Ok(Self {
            state: State::Active(Box::new(GroupCore::create(identity, config)?)),
            rejoining: None,
            validation_percent: DEFAULT_VALIDATION_PERCENT,
            sampled: 0,
        })
    }

    /// A participant's state after a join request with MLS settings: a key package to send.
    pub fn join(
        identity: &MlsIdentity,
        config: GroupConfig,
        validation_percent: u32,
    ) -> Result<Self, SetupError> {
        let (pending, key_package) = GroupCore::key_package(identity, config)?;
        Ok(Self {
            state: State::Joining {
                pending: Box::new(pending),
                key_package,
            },
            rejoining: None,
            validation_percent: validation_percent.min(100),
            sampled: 0,
        })
    }

    /// Our key package while we wait for the welcome (the JOIN_REPLY is re-sent with the same).
    pub fn key_package(&self) -> Option<&[u8]> {
        match &self.state {
            State::Joining { key_package, .. } => Some(key_package),
            _ => None,
        }
    }

    /// The join-request setting we send to invitees.
    pub fn settings(&self) -> pb::MlsSettings {
        pb::MlsSettings {
            header_integrity_validation_percent: self.validation_percent,
        }
    }

    pub fn group(&mut self) -> Option<&mut GroupCore> {
        match &mut self.state {
            State::Active(group) => Some(group),
            _ => None,
        }
    }

    /// The epoch for heartbeats.
    pub fn epoch(&self) -> Option<u64> {
        match &self.state {
            State::Active(group) => Some(group.epoch()),
            _ => None,
        }
    }

    /// Our group as it stands, once joined and until removed; `me` is our own name (our leaf
    /// carries no verified id).
    pub fn state(&self, me: &slim_proto::Name) -> Option<MlsState> {
        let State::Active(group) = &self.state else {
            return None;
        };
        let own = group.own_leaf();
        Some(MlsState {
            group_id: group.group_id().to_vec(),
            epoch: group.epoch(),
            epoch_authenticator: group.epoch_authenticator().to_vec(),
            members: group
                .members()
                .iter()
                .map(|m| match &m.id {
                    _ if m.leaf == own => me.id(),
                    Some(id) => slim_proto::name::app_instance_id(id),
                    // Unverified (cannot happen for others): matches nobody.
                    None => 0,
                })
                .collect(),
        })
    }

    /// Joins with the welcome of a GROUP_WELCOME. A welcome that is not ours leaves the join
    /// pending (a genuine one may still come).
    pub fn welcome(
        &mut self,
        payload: &pb::MlsPayload,
        verifier: &TokenVerifier<'_>,
    ) -> Result<(), JoinError> {
        let State::Joining { pending, .. } = &mut self.state else {
            return Err(JoinError::AlreadyJoined);
        };
        let verify = |token: &str| verifier.verify(token);
        let group = pending.join(&payload.mls_content, payload.commit_id, &verify)?;
        self.state = State::Active(Box::new(group));
        Ok(())
    }

    /// Applies a commit of a GROUP_UPDATE (in `commit_id` order; early ones wait).
    pub fn commit(
        &mut self,
        payload: &pb::MlsPayload,
        verifier: &TokenVerifier<'_>,
    ) -> Result<Committed, CommitError> {
        let State::Active(group) = &mut self.state else {
            return Err(CommitError::NotAMember);
        };
        let verify = |token: &str| verifier.verify(token);
        let committed =
            match group.handle_commit(payload.commit_id, &payload.mls_content, &verify)? {
                CommitOutcome::Applied { applied, .. } if applied.iter().any(|c| c.removed_us) => {
                    Committed::RemovedUs
                }
                CommitOutcome::Applied { .. } | CommitOutcome::Duplicate => Committed::Applied,
                CommitOutcome::Buffered { .. } => Committed::Waiting,
            };
        if committed == Committed::RemovedUs {
            self.state = State::Gone;
        }
        Ok(committed)
    }

    /// Participant: a fresh key package for a REJOIN_REQUEST (the same one while a rejoin is
    /// already under way). The current group state is kept until the welcome comes.
    pub fn start_rejoin(
        &mut self,
        identity: &MlsIdentity,
        config: GroupConfig,
    ) -> Result<Vec<u8>, SetupError> {
        if let Some((_, key_package)) = &self.rejoining {
            return Ok(key_package.clone());
        }
        let (pending, key_package) = GroupCore::key_package(identity, config)?;
        self.rejoining = Some((Box::new(pending), key_package.clone()));
        Ok(key_package)
    }

    /// Whether a rejoin waits for its welcome.
    pub fn is_rejoining(&self) -> bool {
        self.rejoining.is_some()
    }

    /// Participant: joins again with the welcome of a REJOIN_REPLY; the group replaces the
    /// old state. A welcome that is not ours leaves the rejoin pending.
    ///
    /// Commits after the rejoin's that came before its welcome (a lost REJOIN_REPLY answered
    /// again once the moderator had moved on) waited in the old group, whose next commit
    /// never came; they continue the new one. Dropped, they would leave us at the rejoin's
    /// epoch, stale again without knowing it, having acknowledged their updates already.
    pub fn rejoin_welcome(
        &mut self,
        commit_id: u32,
        welcome: &[u8],
        verifier: &TokenVerifier<'_>,
    ) -> Result<(), JoinError> {
        let Some((pending, _)) = self.rejoining.as_mut() else {
            return Err(JoinError::AlreadyJoined);
        };
        let verify = |token: &str| verifier.verify(token);
        let group = pending.join(welcome, commit_id, &verify)?;
        let later = match &mut self.state {
            State::Active(old) => old.take_buffered_commits(),
            State::Joining { .. } | State::Gone => Vec::new(),
        };
        self.rejoining = None;
        self.state = State::Active(Box::new(group));
        for (id, commit) in later.into_iter().filter(|(id, _)| *id > commit_id) {
            let payload = pb::MlsPayload {
                commit_id: id,
                mls_content: commit.into(),
            };
            // A refused one is counted by the group; it leaves us stale, as it would have.
            if self.commit(&payload, verifier).is_err() {
                break;
            }
        }
        Ok(())
    }

    /// Moderator: replaces the leaf of the member whose name's instance id derives from its
    /// identity with the new key package of its REJOIN_REQUEST (remove + add, one commit).
    pub fn rejoin(
        &mut self,
        instance_id: u128,
        key_package: &[u8],
        verifier: &TokenVerifier<'_>,
    ) -> Result<CommitOut, CommitError> {
        let State::Active(group) = &mut self.state else {
            return Err(CommitError::NotAMember);
        };
        let old_id = group
            .members()
            .iter()
            .filter_map(|m| m.id.clone())
            .find(|id| slim_proto::name::app_instance_id(id) == instance_id)
            .ok_or(CommitError::UnknownMember)?;
        let verify = |token: &str| verifier.verify(token);
        group.rejoin_member(&old_id, key_package, &verify)
    }

    /// Moderator: adds the member whose key package came in its JOIN_REPLY.
    pub fn add(
        &mut self,
        key_package: &[u8],
        verifier: &TokenVerifier<'_>,
    ) -> Result<CommitOut, CommitError> {
        let State::Active(group) = &mut self.state else {
            return Err(CommitError::NotAMember);
        };
        let verify = |token: &str| verifier.verify(token);
        group.add_member(key_package, &verify)
    }

    /// Moderator: removes the member whose name's instance id derives from its identity.
    pub fn remove(&mut self, instance_id: u128) -> Result<CommitOut, CommitError> {
        let State::Active(group) = &mut self.state else {
            return Err(CommitError::NotAMember);
        };
        let leaf = group
            .members()
            .iter()
            .find(|m| {
                m.id.as_deref()
                    .is_some_and(|id| slim_proto::name::app_instance_id(id) == instance_id)
            })
            .map(|m| m.leaf)
            .ok_or(CommitError::UnknownMember)?;
        group.remove_leaf(leaf)
    }

    /// Encrypts the application payload of an outgoing MSG / RTX_REPLY in place, with the
    /// header's HeaderIntegrityAad (its identity token already set) as authenticated data.
    pub fn seal(&mut self, message: &mut pb::Message) -> Result<(), PayloadError> {
        let group = match &mut self.state {
            State::Active(group) => group,
            State::Joining { .. } => return Err(PayloadError::NotReady),
            State::Gone => return Err(PayloadError::Gone),
        };
        let Some(pb::message::MessageType::Publish(publish)) = &mut message.message_type else {
            return Err(PayloadError::NoHeaders);
        };
        let aad = publish_aad(publish)
            .map_err(|_| PayloadError::NoHeaders)?
            .encode_to_vec();
        let app = app_payload_mut(publish).ok_or(PayloadError::NoPayload)?;
        let sealed = group
            .encrypt(&app.blob, &aad)
            .map_err(|e| PayloadError::Encrypt(e.to_string()))?;
        app.blob = sealed.into();
        Ok(())
    }

    /// Decrypts the application payload of a received MSG / RTX_REPLY and returns the
    /// plaintext; on the sampled share of messages the sender's authenticated data must equal
    /// this copy's header.
    pub fn open(&mut self, publish: &pb::Publish) -> Result<Opened, PayloadError> {
        let group = match &mut self.state {
            State::Active(group) => group,
            State::Joining { .. } => return Err(PayloadError::NotReady),
            State::Gone => return Err(PayloadError::Gone),
        };
        let Some(pb::content::ContentType::AppPayload(app)) =
            publish.msg.as_ref().and_then(|c| c.content_type.as_ref())
        else {
            return Err(PayloadError::NoPayload);
        };
        let opened = group.decrypt(&app.blob)?;
        self.sampled += self.validation_percent;
        if self.sampled >= 100 {
            self.sampled -= 100;
            let expected = publish_aad(publish).map_err(|_| PayloadError::NoHeaders)?;
            if opened.aad != expected.encode_to_vec() {
                return Err(PayloadError::AadMismatch);
            }
        }
        Ok(Opened {
            plaintext: opened.plaintext,
            epoch: opened.epoch,
        })
    }
}

fn app_payload_mut(publish: &mut pb::Publish) -> Option<&mut pb::ApplicationPayload> {
    match publish.msg.as_mut()?.content_type.as_mut()? {
        pb::content::ContentType::AppPayload(app) => Some(app),
        _ => None,
    }
}
