//! [`GroupCore`] and [`PendingJoin`].

use std::collections::BTreeMap;

use openmls::framing::errors::MessageDecryptionError;
use openmls::prelude::{
    BasicCredential, ContentType, CredentialWithKey, KeyPackage, KeyPackageBundle, KeyPackageIn,
    KeyPackageVerifyError, LeafNode, LeafNodeIndex, Lifetime, MlsGroup, MlsGroupJoinConfig,
    MlsMessageBodyIn, MlsMessageIn, MlsMessageOut, ProcessMessageError, ProcessedMessageContent,
    ProtocolMessage, ProtocolVersion, Sender, StagedCommit, StagedWelcome, ValidationError,
};
use openmls_traits::storage::StorageProvider as _;
use openmls_traits::OpenMlsProvider;
use tls_codec::Deserialize as _;
use tracing::trace;

use super::config::{GroupConfig, MlsSuite};
use super::crypto::{Crypto, SeededRand};
use super::error::{
    CommitError, DecryptError, EncryptError, JoinError, KeyPackageError, SetupError,
};
use super::signer::{MlsIdentity, MlsSigner};
use super::storage::LeanStorage;
use super::verify::{
    credential_token, validate_credential, CredentialContext, CredentialError, CredentialVerifier,
};

/// openmls's provider: our crypto, the seeded RNG, and the lean storage.
pub(crate) struct Provider {
    crypto: Crypto,
    rand: SeededRand,
    storage: LeanStorage,
}

impl Provider {
    fn new(config: &GroupConfig) -> Self {
        Self {
            crypto: Crypto::new(config.backend),
            rand: SeededRand::new(config.seed),
            storage: LeanStorage::new(config.storage),
        }
    }
}

impl OpenMlsProvider for Provider {
    type CryptoProvider = Crypto;
    type RandProvider = SeededRand;
    type StorageProvider = LeanStorage;

    fn storage(&self) -> &Self::StorageProvider {
        &self.storage
    }

    fn crypto(&self) -> &Self::CryptoProvider {
        &self.crypto
    }

    fn rand(&self) -> &Self::RandProvider {
        &self.rand
    }
}

/// Counters of refused inputs, by reason (peer input) and of commit ordering events.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupStats {
    /// Bytes that are not the expected MLSMessage (unparsable, wrong kind, other group).
    pub malformed: u64,
    /// Application messages whose decryption or sender signature failed.
    pub tampered: u64,
    /// Commits made in another epoch, and messages from an epoch we have not reached.
    pub wrong_epoch: u64,
    /// Messages from an epoch whose secrets were already deleted.
    pub epoch_too_old: u64,
    /// Replayed generations or generations outside the ratchet window.
    pub generation_rejected: u64,
    /// Commits openmls refused (signatures, tags, tree).
    pub rejected_commits: u64,
    /// Credentials whose token did not verify (or was not a UTF-8 Basic credential).
    pub invalid_credentials: u64,
    /// Credentials whose verified token names another key than the leaf's.
    pub pubkey_mismatches: u64,
    /// Key packages refused before their credential was looked at (signature, suite, lifetime).
    pub invalid_key_packages: u64,
    /// Welcomes for other members.
    pub welcomes_not_for_us: u64,
    /// Welcomes refused for other reasons.
    pub rejected_welcomes: u64,
    /// Commits dropped because their `commit_id` was already applied.
    pub duplicate_commits: u64,
    /// Commits that arrived ahead of their turn and were buffered.
    pub buffered_commits: u64,
    /// Early commits dropped because the reorder buffer was full.
    pub commit_buffer_overflows: u64,
    /// Inputs refused because we were removed from the group.
    pub after_removal: u64,
}

impl GroupStats {
    fn count_credential(&mut self, error: &CredentialError) {
        match error {
            CredentialError::PubkeyMismatch => self.pubkey_mismatches += 1,
            _ => self.invalid_credentials += 1,
        }
    }

    fn count_key_package(&mut self, error: &KeyPackageError) {
        match error {
            KeyPackageError::Malformed | KeyPackageError::NotAKeyPackage => self.malformed += 1,
            KeyPackageError::Credential(e) => self.count_credential(e),
            _ => self.invalid_key_packages += 1,
        }
    }

    fn count_commit(&mut self, error: &CommitError) {
        match error {
            CommitError::KeyPackage(e) => self.count_key_package(e),
            CommitError::Malformed | CommitError::NotACommit | CommitError::WrongGroup => {
                self.malformed += 1
            }
            CommitError::WrongEpoch { .. } => self.wrong_epoch += 1,
            CommitError::Credential(e) => self.count_credential(e),
            CommitError::Rejected(_) => self.rejected_commits += 1,
            CommitError::BufferFull { .. } => self.commit_buffer_overflows += 1,
            CommitError::NotAMember => self.after_removal += 1,
            _ => {}
        }
    }

    fn count_decrypt(&mut self, error: &DecryptError) {
        match error {
            DecryptError::Malformed
            | DecryptError::NotPrivateMessage
            | DecryptError::NotApplication
            | DecryptError::WrongGroup
            | DecryptError::Rejected(_) => self.malformed += 1,
            DecryptError::FutureEpoch { .. } => self.wrong_epoch += 1,
            DecryptError::EpochTooOld { .. } => self.epoch_too_old += 1,
            DecryptError::Tampered => self.tampered += 1,
            DecryptError::Generation(_) => self.generation_rejected += 1,
            DecryptError::NotAMember => self.after_removal += 1,
        }
    }

    fn count_join(&mut self, error: &JoinError) {
        match error {
            JoinError::Malformed | JoinError::NotAWelcome => self.malformed += 1,
            JoinError::NotForUs => self.welcomes_not_for_us += 1,
            JoinError::Credential { error, .. } => self.count_credential(error),
            JoinError::WrongSuite { .. } | JoinError::Rejected(_) => self.rejected_welcomes += 1,
            _ => {}
        }
    }
}

/// A group member as this core sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberInfo {
    /// Leaf index in the ratchet tree (stable while the member stays).
    pub leaf: u32,
    /// The credential's identity token.
    pub token: String,
    /// The verified identity id (`sub`) when this core verified the token (everyone but
    /// ourselves, normally).
    pub id: Option<String>,
    /// The signature public key.
    pub signature_key: Vec<u8>,
}

/// What a commit we made gives the session layer to send.
#[derive(Clone, Debug)]
pub struct CommitOut {
    /// The SLIM `MlsPayload.commit_id` of this commit.
    pub commit_id: u32,
    /// The epoch the group is in now (the commit is already applied locally).
    pub epoch: u64,
    /// `MLSMessage` PublicMessage commit, for the other members (GROUP_UPDATE).
    pub commit: Vec<u8>,
    /// `MLSMessage` Welcome for the added member (GROUP_WELCOME / REJOIN_REPLY), if one was added.
    pub welcome: Option<Vec<u8>>,
    pub added: Vec<MemberInfo>,
    pub removed: Vec<MemberInfo>,
}

/// One commit applied by [`GroupCore::handle_commit`].
#[derive(Clone, Debug)]
pub struct AppliedCommit {
    pub commit_id: u32,
    /// The epoch after this commit.
    pub epoch: u64,
    pub added: Vec<MemberInfo>,
    pub removed: Vec<MemberInfo>,
    /// This commit removed us: the group is inactive from now on.
    pub removed_us: bool,
}

/// What [`GroupCore::handle_commit`] did with a commit.
#[derive(Debug)]
#[non_exhaustive]
pub enum CommitOutcome {
    /// The commit (and any buffered successors, in order) were applied.
    Applied {
        applied: Vec<AppliedCommit>,
        /// Buffered successors that were refused and dropped (the chain stops at the first);
        /// the ones after it stay buffered.
        rejected: Vec<(u32, CommitError)>,
    },
    /// It is ahead of the next expected id and waits in the reorder buffer.
    Buffered { next: u32 },
    /// Its id was already applied (or is already buffered): dropped.
    Duplicate,
}

/// A decrypted application message.
#[derive(Clone, Debug)]
pub struct Decrypted {
    pub plaintext: Vec<u8>,
    /// The message's authenticated data as sent (SLIM puts the HeaderIntegrityAad bytes here).
    pub aad: Vec<u8>,
    /// The epoch it was sent in.
    pub epoch: u64,
    pub sender_leaf: u32,
    /// The sender's credential token.
    pub sender_token: String,
    /// The sender's verified identity id, when known.
    pub sender_id: Option<String>,
}

fn library<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

fn parse(bytes: &[u8]) -> Option<MlsMessageBodyIn> {
    MlsMessageIn::tls_deserialize_exact(bytes)
        .ok()
        .map(MlsMessageIn::extract)
}

fn to_bytes(message: &MlsMessageOut) -> Result<Vec<u8>, String> {
    message.to_bytes().map_err(library)
}

/// A peer's key package that passed [`validate_key_package`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidatedKeyPackage {
    /// The verified identity id (`sub`) of its token.
    pub id: String,
    /// The credential's token.
    pub token: String,
    pub signature_key: Vec<u8>,
    /// `KeyPackageRef` (RFC 9420 §5.2), what a welcome for this member lists.
    pub key_package_ref: Vec<u8>,
    /// Lifetime, unix seconds.
    pub not_before: u64,
    pub not_after: u64,
}

/// Validates a peer's key package (`MLSMessage` bytes) as [`GroupCore::add_member`] does,
/// without a group: signatures, protocol version, ciphersuite, lifetime (by openmls, against the
/// wall clock), and the credential token via `verifier` with its `pubkey` claim equal to the
/// leaf's signature key.
pub fn validate_key_package(
    suite: MlsSuite,
    bytes: &[u8],
    verifier: &dyn CredentialVerifier,
) -> Result<ValidatedKeyPackage, KeyPackageError> {
    let crypto = Crypto::new(super::crypto::CryptoBackend::Ring);
    let (key_package, id) = validate_key_package_bytes(&crypto, suite, bytes, verifier)?;
    let leaf = key_package.leaf_node();
    let lifetime = *key_package.life_time();
    Ok(ValidatedKeyPackage {
        id,
        token: credential_token(leaf.credential())?,
        signature_key: leaf.signature_key().as_slice().to_vec(),
        key_package_ref: key_package
            .hash_ref(&crypto)
            .map_err(|e| KeyPackageError::Invalid(library(e)))?
            .as_slice()
            .to_vec(),
        not_before: lifetime.not_before(),
        not_after: lifetime.not_after(),
    })
}

/// Parses and validates a peer's key package: signatures, suite, lifetime, credential.
fn validate_key_package_bytes(
    crypto: &Crypto,
    suite: MlsSuite,
    bytes: &[u8],
    verifier: &dyn CredentialVerifier,
) -> Result<(KeyPackage, String), KeyPackageError> {
    let Some(body) = parse(bytes) else {
        return Err(KeyPackageError::Malformed);
    };
    let MlsMessageBodyIn::KeyPackage(kp_in) = body else {
        return Err(KeyPackageError::NotAKeyPackage);
    };
    let key_package = validate_key_package_in(crypto, suite, kp_in)?;
    let leaf = key_package.leaf_node();
    let verified = validate_credential(
        verifier,
        leaf.credential(),
        leaf.signature_key().as_slice(),
        CredentialContext::NewMember,
    )?;
    Ok((key_package, verified.id))
}

fn validate_key_package_in(
    crypto: &Crypto,
    suite: MlsSuite,
    kp_in: KeyPackageIn,
) -> Result<KeyPackage, KeyPackageError> {
    let key_package = kp_in
        .validate(crypto, ProtocolVersion::Mls10)
        .map_err(|e| match e {
            KeyPackageVerifyError::LifetimeError(e) => KeyPackageError::Lifetime(e.to_string()),
            e => KeyPackageError::Invalid(e.to_string()),
        })?;
    let got = u16::from(key_package.ciphersuite());
    if got != suite.code() {
        return Err(KeyPackageError::WrongSuite {
            expected: suite.code(),
            got,
        });
    }
    Ok(key_package)
}

/// A leaf's HPKE encryption key, raw (as `Member::encryption_key`); openmls exposes it only
/// TLS-encoded, i.e. as a variable-length vector.
fn encryption_key_bytes(leaf: &LeafNode) -> Vec<u8> {
    use tls_codec::Serialize as _;
    leaf.encryption_key()
        .tls_serialize_detached()
        .ok()
        .and_then(|b| tls_codec::VLBytes::tls_deserialize_exact(b).ok())
        .map(|v| v.as_slice().to_vec())
        .unwrap_or_default()
}

fn join_config(config: &GroupConfig) -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .wire_format_policy(GroupConfig::wire_format_policy())
        .max_past_epochs(config.max_past_epochs)
        .sender_ratchet_configuration(config.sender_ratchet())
        .use_ratchet_tree_extension(true)
        .build()
}

fn credential_with_key(identity: &MlsIdentity) -> CredentialWithKey {
    CredentialWithKey {
        credential: BasicCredential::new(identity.token().as_bytes().to_vec()).into(),
        signature_key: identity.public_key().into(),
    }
}

fn check_suite(identity: &MlsIdentity, suite: MlsSuite) -> Result<(), SetupError> {
    if identity.supports(suite) {
        Ok(())
    } else {
        Err(SetupError::KeyDoesNotFitSuite(suite))
    }
}

/// A participant's state between sending its key package (JOIN_REPLY) and receiving the
/// welcome (GROUP_WELCOME). Welcomes that are not ours are refused with a typed error and the
/// pending join stays usable.
pub struct PendingJoin {
    provider: Option<Provider>,
    signer_identity: MlsIdentity,
    config: GroupConfig,
    bundle: KeyPackageBundle,
    key_package_ref: Vec<u8>,
    stats: GroupStats,
}

impl std::fmt::Debug for PendingJoin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material (the bundle holds private keys).
        f.debug_struct("PendingJoin")
            .field("suite", &self.config.suite)
            .field("key_package_ref", &self.key_package_ref)
            .field("joined", &self.provider.is_none())
            .finish_non_exhaustive()
    }
}

impl PendingJoin {
    /// The reference of our key package (what a welcome for us lists).
    pub fn key_package_ref(&self) -> &[u8] {
        &self.key_package_ref
    }

    /// Counters of refused welcomes so far (carried into the group on success).
    pub fn stats(&self) -> &GroupStats {
        &self.stats
    }

    /// Joins with a welcome (`MLSMessage` Welcome bytes) whose SLIM `commit_id` is the
    /// participant's starting point for commit ordering.
    ///
    /// Every member already in the tree has its credential checked with `verifier`
    /// ([`CredentialContext::ExistingMember`]), as the reference does. Leaf-node lifetimes in
    /// the welcome's tree are *not* checked: openmls would check them against our clock without
    /// skew, the moderator already validated those key packages, and mls-rs members back-date
    /// by 60 s only.
    pub fn join(
        &mut self,
        welcome: &[u8],
        commit_id: u32,
        verifier: &dyn CredentialVerifier,
    ) -> Result<GroupCore, JoinError> {
        let result = self.try_join(welcome, commit_id, verifier);
        if let Err(error) = &result {
            trace!(?error, "welcome refused");
            self.stats.count_join(error);
        }
        result
    }

    fn try_join(
        &mut self,
        welcome: &[u8],
        commit_id: u32,
        verifier: &dyn CredentialVerifier,
    ) -> Result<GroupCore, JoinError> {
        let provider = self.provider.as_ref().ok_or(JoinError::AlreadyJoined)?;
        let Some(body) = parse(welcome) else {
            return Err(JoinError::Malformed);
        };
        let MlsMessageBodyIn::Welcome(welcome) = body else {
            return Err(JoinError::NotAWelcome);
        };
        let suite = self.config.suite;
        let got = u16::from(welcome.ciphersuite());
        if got != suite.code() {
            return Err(JoinError::WrongSuite {
                expected: suite.code(),
                got,
            });
        }
        if !welcome
            .secrets()
            .iter()
            .any(|s| s.new_member().as_slice() == self.key_package_ref.as_slice())
        {
            return Err(JoinError::NotForUs);
        }
        // openmls deletes the key package once a welcome matched it, even if joining then fails;
        // put it back so a later (genuine) welcome can still be processed.
        provider
            .storage()
            .write_key_package(
                &self
                    .bundle
                    .key_package()
                    .hash_ref(provider.crypto())
                    .map_err(|e| JoinError::Rejected(library(e)))?,
                &self.bundle,
            )
            .map_err(|e| JoinError::Rejected(library(e)))?;
        let staged =
            StagedWelcome::build_from_welcome(provider, &join_config(&self.config), welcome)
                .map_err(|e| match e {
                    openmls::prelude::WelcomeError::NoMatchingKeyPackage
                    | openmls::prelude::WelcomeError::JoinerSecretNotFound => JoinError::NotForUs,
                    e => JoinError::Rejected(library(e)),
                })?
                .skip_lifetime_validation()
                .build()
                .map_err(|e| JoinError::Rejected(library(e)))?;

        // Check every member's credential before taking the group.
        let mut verified = BTreeMap::new();
        let own_leaf = staged.own_leaf_index();
        for member in staged.members() {
            if member.index == own_leaf {
                continue;
            }
            let token = validate_credential(
                verifier,
                &member.credential,
                &member.signature_key,
                CredentialContext::ExistingMember,
            )
            .map_err(|error| JoinError::Credential {
                leaf: member.index.u32(),
                error,
            })?;
            if let Ok(raw) = credential_token(&member.credential) {
                verified.insert(raw, token.id);
            }
        }
        let group = staged
            .into_group(provider)
            .map_err(|e| JoinError::Rejected(library(e)))?;
        let provider = self.provider.take().ok_or(JoinError::AlreadyJoined)?;
        let signer = self
            .signer_identity
            .signer(self.config.signatures)
            .map_err(|e| JoinError::Rejected(e.to_string()))?;
        let mut core = GroupCore {
            provider,
            signer,
            group,
            config: self.config.clone(),
            last_commit_id: commit_id,
            early_commits: BTreeMap::new(),
            members: Vec::new(),
            verified,
            first_epoch: 0,
            stats: self.stats.clone(),
        };
        core.first_epoch = core.epoch();
        core.refresh_members();
        Ok(core)
    }
}

/// One member's MLS group (RFC 9420 over openmls), interoperable with reference (mls-rs) peers.
///
/// # Contract
///
/// * **Sans-IO**: no I/O, no threads of its own, no async. Randomness comes from
///   [`GroupConfig::seed`]. Known exceptions, all inside dependencies: openmls reads the wall
///   clock to stamp and check key-package lifetimes; openmls uses rayon's global pool when it
///   builds and processes commit paths (cap it with `RAYON_NUM_THREADS` or a global pool
///   built by the driver); hpke-rs and the fast ECDSA signer take their nonces from the OS.
///   So one seed reproduces every decision (epochs, members, commit ordering, accept/refuse)
///   but not ciphertext bytes; traces must not hash MLS ciphertext.
/// * **Roles**: the moderator [`create`](Self::create)s the group and makes every commit
///   ([`add_member`](Self::add_member), [`remove_member`](Self::remove_member),
///   [`rejoin_member`](Self::rejoin_member)); commits are applied locally at once and numbered
///   with consecutive `commit_id`s starting at 1. Participants make a
///   [`key_package`](Self::key_package), [`PendingJoin::join`] the welcome, and apply the
///   moderator's commits with [`handle_commit`](Self::handle_commit) strictly in `commit_id`
///   order (early ones are buffered, applied ones dropped as duplicates).
/// * **Framing** (what reference peers send and expect): every MLS object is an RFC 9420
///   `MLSMessage`; commits are PublicMessage (not encrypted); welcomes carry the ratchet tree
///   extension; application messages are PrivateMessage whose authenticated data is the
///   caller's (SLIM: HeaderIntegrityAad bytes).
/// * **Identity**: Basic credentials whose identity is the whole token; every key package we
///   add, every member added by a commit we receive, and every member of a group we join must
///   carry a token that `verifier` accepts and whose `pubkey` claim is the leaf's signature key.
/// * **Peer input never panics**: bad bytes return a typed error, are counted in
///   [`stats`](Self::stats), traced, and leave the group unchanged and usable.
/// * **Reordering**: application messages may arrive out of order within
///   [`GroupConfig::out_of_order_tolerance`] generations, and up to
///   [`GroupConfig::max_past_epochs`] epochs late.
pub struct GroupCore {
    provider: Provider,
    signer: MlsSigner,
    group: MlsGroup,
    config: GroupConfig,
    /// The last commit id applied (0 for a fresh group; the welcome's for a participant).
    last_commit_id: u32,
    early_commits: BTreeMap<u32, Vec<u8>>,
    members: Vec<MemberInfo>,
    /// Token → verified id, for the members we checked.
    verified: BTreeMap<String, String>,
    /// The epoch we created or joined the group at (no secrets exist before it).
    first_epoch: u64,
    stats: GroupStats,
}

impl std::fmt::Debug for GroupCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material (openmls state and storage hold secrets).
        f.debug_struct("GroupCore")
            .field("suite", &self.config.suite)
            .field("epoch", &self.epoch())
            .field("own_leaf", &self.own_leaf())
            .field("members", &self.members.len())
            .field("last_commit_id", &self.last_commit_id)
            .field("buffered_commits", &self.early_commits.len())
            .field("active", &self.is_active())
            .finish_non_exhaustive()
    }
}

impl GroupCore {
    /// Creates a group with us as its only member (the moderator; spec §4.4, §4.6), with
    /// default extensions, as the reference's `create_group`.
    pub fn create(identity: &MlsIdentity, config: GroupConfig) -> Result<Self, SetupError> {
        check_suite(identity, config.suite)?;
        let provider = Provider::new(&config);
        let signer = identity.signer(config.signatures)?;
        let group = MlsGroup::builder()
            .ciphersuite(config.suite.openmls())
            .with_wire_format_policy(GroupConfig::wire_format_policy())
            .max_past_epochs(config.max_past_epochs)
            .sender_ratchet_configuration(config.sender_ratchet())
            .use_ratchet_tree_extension(true)
            .lifetime(Lifetime::new(config.key_package_lifetime_secs))
            .build(&provider, &signer, credential_with_key(identity))
            .map_err(|e| SetupError::Library(library(e)))?;
        let mut core = Self {
            provider,
            signer,
            group,
            config,
            last_commit_id: 0,
            early_commits: BTreeMap::new(),
            members: Vec::new(),
            verified: BTreeMap::new(),
            first_epoch: 0,
            stats: GroupStats::default(),
        };
        core.refresh_members();
        Ok(core)
    }

    /// A key package for joining a group (the participant's JOIN_REPLY / REJOIN_REQUEST
    /// `key_package`), as `MLSMessage` bytes, and the state that will accept the welcome.
    pub fn key_package(
        identity: &MlsIdentity,
        config: GroupConfig,
    ) -> Result<(PendingJoin, Vec<u8>), SetupError> {
        check_suite(identity, config.suite)?;
        let provider = Provider::new(&config);
        let signer = identity.signer(config.signatures)?;
        let bundle = KeyPackage::builder()
            .key_package_lifetime(Lifetime::new(config.key_package_lifetime_secs))
            .build(
                config.suite.openmls(),
                &provider,
                &signer,
                credential_with_key(identity),
            )
            .map_err(|e| SetupError::Library(library(e)))?;
        let key_package_ref = bundle
            .key_package()
            .hash_ref(provider.crypto())
            .map_err(|e| SetupError::Library(library(e)))?
            .as_slice()
            .to_vec();
        let bytes = to_bytes(&MlsMessageOut::from(bundle.key_package().clone()))
            .map_err(SetupError::Library)?;
        Ok((
            PendingJoin {
                provider: Some(provider),
                signer_identity: identity.clone(),
                config,
                bundle,
                key_package_ref,
                stats: GroupStats::default(),
            },
            bytes,
        ))
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.group.epoch().as_u64()
    }

    /// The epoch authenticator: equal for all members in the same epoch (RFC 9420 §8.7).
    pub fn epoch_authenticator(&self) -> &[u8] {
        self.group.epoch_authenticator().as_slice()
    }

    /// The group id.
    pub fn group_id(&self) -> &[u8] {
        self.group.group_id().as_slice()
    }

    /// The ciphersuite.
    pub fn suite(&self) -> MlsSuite {
        self.config.suite
    }

    /// The members, by leaf index.
    pub fn members(&self) -> &[MemberInfo] {
        &self.members
    }

    /// Our own leaf index.
    pub fn own_leaf(&self) -> u32 {
        self.group.own_leaf_index().u32()
    }

    /// False once a commit removed us.
    pub fn is_active(&self) -> bool {
        self.group.is_active()
    }

    /// The id of the last commit applied (made or received).
    pub fn last_commit_id(&self) -> u32 {
        self.last_commit_id
    }

    /// Commits waiting in the reorder buffer.
    pub fn buffered_commits(&self) -> usize {
        self.early_commits.len()
    }

    /// Empties the reorder buffer: `(commit_id, commit)` in id order.
    pub fn take_buffered_commits(&mut self) -> Vec<(u32, Vec<u8>)> {
        std::mem::take(&mut self.early_commits)
            .into_iter()
            .collect()
    }

    /// Counters of refused inputs.
    pub fn stats(&self) -> &GroupStats {
        &self.stats
    }

    /// The ratchet tree, TLS-encoded (for invariant checks: equal across members per epoch).
    pub fn ratchet_tree(&self) -> Vec<u8> {
        use tls_codec::Serialize as _;
        self.group
            .export_ratchet_tree()
            .tls_serialize_detached()
            .unwrap_or_default()
    }

    /// Member lookup by verified identity id.
    pub fn member_by_id(&self, id: &str) -> Option<&MemberInfo> {
        self.members.iter().find(|m| m.id.as_deref() == Some(id))
    }

    fn refresh_members(&mut self) {
        let members: Vec<MemberInfo> = self
            .group
            .members()
            .map(|m| {
                let token = credential_token(&m.credential).unwrap_or_default();
                MemberInfo {
                    leaf: m.index.u32(),
                    id: self.verified.get(&token).cloned(),
                    token,
                    signature_key: m.signature_key,
                }
            })
            .collect();
        self.verified
            .retain(|token, _| members.iter().any(|m| &m.token == token));
        self.members = members;
    }

    /// The members at `leaves` (before a commit removes them).
    fn members_at(&self, leaves: &[u32]) -> Vec<MemberInfo> {
        self.members
            .iter()
            .filter(|m| leaves.contains(&m.leaf))
            .cloned()
            .collect()
    }

    /// The members whose leaf encryption keys are `keys` (after a commit added them). Leaves
    /// and credentials may repeat across a remove + add of the same client, encryption keys
    /// never do.
    fn members_with_encryption_keys(&self, keys: &[Vec<u8>]) -> Vec<MemberInfo> {
        let leaves: Vec<u32> = self
            .group
            .members()
            .filter(|m| keys.contains(&m.encryption_key))
            .map(|m| m.index.u32())
            .collect();
        self.members_at(&leaves)
    }

    fn next_commit_id(&self) -> Result<u32, CommitError> {
        self.last_commit_id
            .checked_add(1)
            .ok_or(CommitError::CommitIdsExhausted)
    }

    /// Adds the member whose key package (`MLSMessage` bytes from JOIN_REPLY) passes
    /// validation: signatures, suite, lifetime (by openmls, against the wall clock), and the
    /// credential token via `verifier` with its `pubkey` equal to the leaf's signature key.
    /// The commit is applied locally at once.
    pub fn add_member(
        &mut self,
        key_package: &[u8],
        verifier: &dyn CredentialVerifier,
    ) -> Result<CommitOut, CommitError> {
        let result = self.try_commit(&[], Some(key_package), verifier);
        self.count_local(result)
    }

    /// Removes the member with this verified identity id (or leaf, see
    /// [`remove_leaf`](Self::remove_leaf)). The commit is applied locally at once.
    pub fn remove_member(&mut self, id: &str) -> Result<CommitOut, CommitError> {
        let leaf = self
            .member_by_id(id)
            .ok_or(CommitError::UnknownMember)?
            .leaf;
        self.remove_leaf(leaf)
    }

    /// Removes the member at `leaf`.
    pub fn remove_leaf(&mut self, leaf: u32) -> Result<CommitOut, CommitError> {
        if leaf == self.own_leaf() || !self.members.iter().any(|m| m.leaf == leaf) {
            return Err(CommitError::UnknownMember);
        }
        let result = self.try_commit(&[leaf], None, &|_: &str| {
            Err::<crate::identity::VerifiedToken, _>("no key package to verify")
        });
        self.count_local(result)
    }

    /// Rejoin (spec §4.6): removes the member with verified id `old_id` (if still present) and
    /// adds the new key package, in one commit, like the reference.
    pub fn rejoin_member(
        &mut self,
        old_id: &str,
        key_package: &[u8],
        verifier: &dyn CredentialVerifier,
    ) -> Result<CommitOut, CommitError> {
        let removed: Vec<u32> = self
            .members
            .iter()
            .filter(|m| m.id.as_deref() == Some(old_id) && m.leaf != self.own_leaf())
            .map(|m| m.leaf)
            .collect();
        let result = self.try_commit(&removed, Some(key_package), verifier);
        self.count_local(result)
    }

    fn count_local(
        &mut self,
        result: Result<CommitOut, CommitError>,
    ) -> Result<CommitOut, CommitError> {
        if let Err(error) = &result {
            trace!(?error, "commit not made");
            if let CommitError::KeyPackage(e) = error {
                self.stats.count_key_package(e);
            }
        }
        result
    }

    fn try_commit(
        &mut self,
        remove: &[u32],
        add: Option<&[u8]>,
        verifier: &dyn CredentialVerifier,
    ) -> Result<CommitOut, CommitError> {
        if !self.group.is_active() {
            return Err(CommitError::NotAMember);
        }
        let commit_id = self.next_commit_id()?;
        let mut adds = Vec::new();
        let mut added_keys = Vec::new();
        if let Some(bytes) = add {
            let (key_package, id) = validate_key_package_bytes(
                &self.provider.crypto,
                self.config.suite,
                bytes,
                verifier,
            )?;
            let token = credential_token(key_package.leaf_node().credential())?;
            self.verified.insert(token, id);
            added_keys.push(encryption_key_bytes(key_package.leaf_node()));
            adds.push(key_package);
        }
        let bundle = self
            .group
            .commit_builder()
            .propose_removals(remove.iter().map(|&l| LeafNodeIndex::new(l)))
            .propose_adds(adds)
            .load_psks(self.provider.storage())
            .map_err(|e| CommitError::Library(library(e)))?
            .build(
                self.provider.rand(),
                self.provider.crypto(),
                &self.signer,
                |_| true,
            )
            .map_err(|e| CommitError::Rejected(library(e)))?
            .stage_commit(&self.provider)
            .map_err(|e| CommitError::Rejected(library(e)))?;
        let (commit, welcome, _group_info) = bundle.into_messages();
        let commit = to_bytes(&commit).map_err(CommitError::Library)?;
        let welcome = welcome
            .map(|w| to_bytes(&w))
            .transpose()
            .map_err(CommitError::Library)?;
        if let Err(e) = self.group.merge_pending_commit(&self.provider) {
            // Leave the group as it was.
            let _ = self.group.clear_pending_commit(self.provider.storage());
            return Err(CommitError::Library(library(e)));
        }
        let removed = self.members_at(remove);
        self.refresh_members();
        let added = self.members_with_encryption_keys(&added_keys);
        self.last_commit_id = commit_id;
        Ok(CommitOut {
            commit_id,
            epoch: self.epoch(),
            commit,
            welcome,
            added,
            removed,
        })
    }

    /// A commit from the moderator (GROUP_UPDATE `mls{commit_id, mls_content}`), applied strictly
    /// in `commit_id` order: an id already applied is a [`CommitOutcome::Duplicate`], a later one
    /// than the next is buffered (up to [`GroupConfig::max_buffered_commits`]), and the next one
    /// is applied together with any buffered successors.
    ///
    /// A refused commit (wrong epoch, bad signature, refused credential) returns its error and
    /// does not advance the commit counter, so a genuine retransmission can still apply.
    pub fn handle_commit(
        &mut self,
        commit_id: u32,
        bytes: &[u8],
        verifier: &dyn CredentialVerifier,
    ) -> Result<CommitOutcome, CommitError> {
        let result = self.try_handle_commit(commit_id, bytes, verifier);
        match &result {
            Err(error) => {
                trace!(commit_id, ?error, "commit refused");
                self.stats.count_commit(error);
            }
            Ok(CommitOutcome::Applied { rejected, .. }) => {
                for (id, error) in rejected {
                    trace!(commit_id = id, ?error, "buffered commit refused");
                    self.stats.count_commit(error);
                }
            }
            Ok(CommitOutcome::Duplicate) => {
                trace!(commit_id, "duplicate commit dropped");
                self.stats.duplicate_commits += 1;
            }
            Ok(CommitOutcome::Buffered { .. }) => self.stats.buffered_commits += 1,
        }
        result
    }

    fn try_handle_commit(
        &mut self,
        commit_id: u32,
        bytes: &[u8],
        verifier: &dyn CredentialVerifier,
    ) -> Result<CommitOutcome, CommitError> {
        if !self.group.is_active() {
            return Err(CommitError::NotAMember);
        }
        if commit_id <= self.last_commit_id {
            return Ok(CommitOutcome::Duplicate);
        }
        let next = self.next_commit_id()?;
        if commit_id > next {
            if self.early_commits.contains_key(&commit_id) {
                return Ok(CommitOutcome::Duplicate);
            }
            if self.early_commits.len() >= self.config.max_buffered_commits {
                return Err(CommitError::BufferFull { commit_id, next });
            }
            self.early_commits.insert(commit_id, bytes.to_vec());
            return Ok(CommitOutcome::Buffered { next });
        }
        let mut applied = vec![self.apply_commit(commit_id, bytes, verifier)?];
        let mut rejected = Vec::new();
        while self.group.is_active() {
            let Ok(next) = self.next_commit_id() else {
                break;
            };
            let Some(bytes) = self.early_commits.remove(&next) else {
                break;
            };
            match self.apply_commit(next, &bytes, verifier) {
                Ok(commit) => applied.push(commit),
                Err(error) => {
                    rejected.push((next, error));
                    break;
                }
            }
        }
        if !self.group.is_active() {
            self.early_commits.clear();
        }
        Ok(CommitOutcome::Applied { applied, rejected })
    }

    fn apply_commit(
        &mut self,
        commit_id: u32,
        bytes: &[u8],
        verifier: &dyn CredentialVerifier,
    ) -> Result<AppliedCommit, CommitError> {
        let message = match parse(bytes) {
            Some(MlsMessageBodyIn::PublicMessage(m)) => ProtocolMessage::from(m),
            Some(MlsMessageBodyIn::PrivateMessage(m)) => ProtocolMessage::from(m),
            Some(_) => return Err(CommitError::NotACommit),
            None => return Err(CommitError::Malformed),
        };
        if message.content_type() != ContentType::Commit {
            return Err(CommitError::NotACommit);
        }
        if message.group_id() != self.group.group_id() {
            return Err(CommitError::WrongGroup);
        }
        let expected = self.epoch();
        let got = message.epoch().as_u64();
        if got != expected {
            return Err(CommitError::WrongEpoch { expected, got });
        }
        let processed = self
            .group
            .process_message(&self.provider, message)
            .map_err(|e| CommitError::Rejected(library(e)))?;
        let ProcessedMessageContent::StagedCommitMessage(staged) = processed.into_content() else {
            return Err(CommitError::NotACommit);
        };
        let new_ids = self.check_commit_credentials(&staged, verifier)?;
        self.verified.extend(new_ids);
        let removed_us = staged.self_removed();
        let removed_leaves: Vec<u32> = staged
            .remove_proposals()
            .map(|r| r.remove_proposal().removed().u32())
            .collect();
        let added_keys: Vec<Vec<u8>> = staged
            .add_proposals()
            .map(|a| encryption_key_bytes(a.add_proposal().key_package().leaf_node()))
            .collect();
        let removed = self.members_at(&removed_leaves);
        self.group
            .merge_staged_commit(&self.provider, *staged)
            .map_err(|e| CommitError::Library(library(e)))?;
        self.refresh_members();
        let added = self.members_with_encryption_keys(&added_keys);
        self.last_commit_id = commit_id;
        Ok(AppliedCommit {
            commit_id,
            epoch: self.epoch(),
            added,
            removed,
            removed_us,
        })
    }

    /// The credentials a commit introduces: added members and the committer's new leaf.
    fn check_commit_credentials(
        &self,
        staged: &StagedCommit,
        verifier: &dyn CredentialVerifier,
    ) -> Result<Vec<(String, String)>, CommitError> {
        let mut ids = Vec::new();
        for add in staged.add_proposals() {
            let leaf = add.add_proposal().key_package().leaf_node();
            let verified = validate_credential(
                verifier,
                leaf.credential(),
                leaf.signature_key().as_slice(),
                CredentialContext::NewMember,
            )?;
            ids.push((credential_token(leaf.credential())?, verified.id));
        }
        if let Some(leaf) = staged.update_path_leaf_node() {
            let verified = validate_credential(
                verifier,
                leaf.credential(),
                leaf.signature_key().as_slice(),
                CredentialContext::CommitterUpdate,
            )?;
            ids.push((credential_token(leaf.credential())?, verified.id));
        }
        Ok(ids)
    }

    /// Encrypts an application message (MSG / RTX_REPLY payload) as an `MLSMessage`
    /// PrivateMessage whose authenticated data is `aad` (SLIM: the HeaderIntegrityAad bytes).
    pub fn encrypt(&mut self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, EncryptError> {
        if !self.group.is_active() {
            return Err(EncryptError::NotAMember);
        }
        self.group.set_aad(aad.to_vec());
        let message = self
            .group
            .create_message(&self.provider, &self.signer, plaintext)
            .map_err(|e| EncryptError::Library(library(e)))?;
        to_bytes(&message).map_err(EncryptError::Library)
    }

    /// Decrypts an application message from another member.
    pub fn decrypt(&mut self, bytes: &[u8]) -> Result<Decrypted, DecryptError> {
        let result = self.try_decrypt(bytes);
        if let Err(error) = &result {
            trace!(?error, "application message refused");
            self.stats.count_decrypt(error);
        }
        result
    }

    fn try_decrypt(&mut self, bytes: &[u8]) -> Result<Decrypted, DecryptError> {
        let message = match parse(bytes) {
            Some(MlsMessageBodyIn::PrivateMessage(m)) => m,
            Some(_) => return Err(DecryptError::NotPrivateMessage),
            None => return Err(DecryptError::Malformed),
        };
        if message.content_type() != ContentType::Application {
            return Err(DecryptError::NotApplication);
        }
        if message.group_id() != self.group.group_id() {
            return Err(DecryptError::WrongGroup);
        }
        let current = self.epoch();
        let got = message.epoch().as_u64();
        if got > current {
            return Err(DecryptError::FutureEpoch { current, got });
        }
        // openmls reports a missing past epoch like a too-old generation; tell them apart.
        let oldest = current
            .saturating_sub(self.config.max_past_epochs as u64)
            .max(self.first_epoch);
        if got < oldest {
            return Err(DecryptError::EpochTooOld { current, got });
        }
        if !self.group.is_active() {
            return Err(DecryptError::NotAMember);
        }
        let processed = self
            .group
            .process_message(&self.provider, ProtocolMessage::from(message))
            .map_err(|e| map_decrypt_error(e, current, got))?;
        let sender_leaf = match processed.sender() {
            Sender::Member(leaf) => leaf.u32(),
            _ => return Err(DecryptError::Rejected("not from a member".into())),
        };
        let sender_token = credential_token(processed.credential()).unwrap_or_default();
        let aad = processed.aad().to_vec();
        let epoch = processed.epoch().as_u64();
        let ProcessedMessageContent::ApplicationMessage(app) = processed.into_content() else {
            return Err(DecryptError::NotApplication);
        };
        Ok(Decrypted {
            plaintext: app.into_bytes(),
            aad,
            epoch,
            sender_leaf,
            sender_id: self.verified.get(&sender_token).cloned(),
            sender_token,
        })
    }
}

fn map_decrypt_error<S: std::fmt::Debug + std::fmt::Display>(
    error: ProcessMessageError<S>,
    current: u64,
    got: u64,
) -> DecryptError {
    match error {
        ProcessMessageError::ValidationError(v) => match v {
            ValidationError::NoPastEpochData => DecryptError::EpochTooOld { current, got },
            ValidationError::WrongEpoch => DecryptError::FutureEpoch { current, got },
            ValidationError::InvalidSignature => DecryptError::Tampered,
            ValidationError::UnableToDecrypt(d) => match d {
                MessageDecryptionError::AeadError | MessageDecryptionError::MalformedContent => {
                    DecryptError::Tampered
                }
                // Too old, too far ahead, already used, or no such sender.
                MessageDecryptionError::SecretTreeError(e) => {
                    DecryptError::Generation(e.to_string())
                }
                MessageDecryptionError::GenerationOutOfBound => {
                    DecryptError::Generation(d.to_string())
                }
                d => DecryptError::Rejected(d.to_string()),
            },
            v => DecryptError::Rejected(v.to_string()),
        },
        ProcessMessageError::GroupStateError(_) => DecryptError::NotAMember,
        e => DecryptError::Rejected(e.to_string()),
    }
}
