//! A lean openmls [`StorageProvider`]: no group state at rest.
//!
//! openmls writes the whole group state to its storage provider as it goes (the message
//! secrets after **every** application message, the tree and epoch secrets after every commit)
//! so that a group can later be reloaded with `MlsGroup::load`. `openmls_memory_storage`
//! serialises each write to JSON, which cost more than all the crypto of a P-256 application
//! message with the ring backend (measured: ~40 % of encrypt+decrypt).
//!
//! A [`super::GroupCore`] keeps its `MlsGroup` in memory and never reloads it, so in
//! [`StorageMode::Lean`] (the default) this provider drops the group-state entities (join
//! config, own leaf nodes and index, tree, context, transcript hash, confirmation tag, group
//! state, message secrets, resumption PSKs, epoch secrets): writes succeed without doing
//! anything and reads find nothing. What openmls reads back while running is always kept, in an
//! inner `MemoryStorage`: key packages (joining), HPKE key pairs (decrypting commit paths),
//! PSKs, and the proposal queue. Consequence: a group cannot be persisted or restored.
//!
//! [`StorageMode::OpenMlsMemory`] keeps everything in the inner `MemoryStorage`, i.e. behaves
//! exactly like `openmls_memory_storage` (the storage of `openmls_rust_crypto`'s stock
//! provider); it exists as a baseline for benchmarks.

use openmls_memory_storage::MemoryStorage;
use openmls_traits::storage::{traits, StorageProvider, CURRENT_VERSION};

/// What the group's openmls storage keeps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StorageMode {
    /// Only what openmls reads back while running (see [`LeanStorage`]).
    #[default]
    Lean,
    /// Everything, JSON-serialised, as `openmls_memory_storage` does (benchmark baseline).
    OpenMlsMemory,
}

/// See the module docs.
#[derive(Default)]
pub struct LeanStorage {
    inner: MemoryStorage,
    keep_group_state: bool,
}

impl std::fmt::Debug for LeanStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The stored values include private keys.
        f.debug_struct("LeanStorage")
            .field("keep_group_state", &self.keep_group_state)
            .finish_non_exhaustive()
    }
}

impl LeanStorage {
    pub fn new(mode: StorageMode) -> Self {
        Self {
            inner: MemoryStorage::default(),
            keep_group_state: mode == StorageMode::OpenMlsMemory,
        }
    }
}

/// Implements each listed method by forwarding it to the inner `MemoryStorage`, except that a
/// `group_state` method does nothing (a write) or finds nothing (a read) unless the storage keeps
/// group state. Each type parameter is named after its bound: `GroupId` stands for
/// `GroupId: traits::GroupId<CURRENT_VERSION>`.
macro_rules! forward_to_memory_storage {
    ($($kind:ident fn $name:ident<$($param:ident),+>($($arg:ident: $ty:ty),*) -> $ret:ty;)*) => {$(
        fn $name<$($param: traits::$param<CURRENT_VERSION>),+>(
            &self,
            $($arg: $ty),*
        ) -> Result<$ret, Self::Error> {
            forward_to_memory_storage!(@skip $kind, self);
            <MemoryStorage as StorageProvider<CURRENT_VERSION>>::$name::<$($param),+>(
                &self.inner,
                $($arg),*
            )
        }
    )*};
    (@skip group_state, $self:ident) => {
        if !$self.keep_group_state {
            return Ok(Default::default());
        }
    };
    (@skip kept, $self:ident) => {};
}

impl StorageProvider<CURRENT_VERSION> for LeanStorage {
    type Error = <MemoryStorage as StorageProvider<CURRENT_VERSION>>::Error;

    forward_to_memory_storage! {
        group_state fn write_mls_join_config<GroupId, MlsGroupJoinConfig>(
            group_id: &GroupId, config: &MlsGroupJoinConfig
        ) -> ();
        group_state fn append_own_leaf_node<GroupId, LeafNode>(
            group_id: &GroupId, leaf_node: &LeafNode
        ) -> ();
        kept fn queue_proposal<GroupId, ProposalRef, QueuedProposal>(
            group_id: &GroupId, proposal_ref: &ProposalRef, proposal: &QueuedProposal
        ) -> ();
        group_state fn write_tree<GroupId, TreeSync>(group_id: &GroupId, tree: &TreeSync) -> ();
        group_state fn write_interim_transcript_hash<GroupId, InterimTranscriptHash>(
            group_id: &GroupId, interim_transcript_hash: &InterimTranscriptHash
        ) -> ();
        group_state fn write_context<GroupId, GroupContext>(
            group_id: &GroupId, group_context: &GroupContext
        ) -> ();
        group_state fn write_confirmation_tag<GroupId, ConfirmationTag>(
            group_id: &GroupId, confirmation_tag: &ConfirmationTag
        ) -> ();
        group_state fn write_group_state<GroupState, GroupId>(
            group_id: &GroupId, group_state: &GroupState
        ) -> ();
        group_state fn write_message_secrets<GroupId, MessageSecrets>(
            group_id: &GroupId, message_secrets: &MessageSecrets
        ) -> ();
        group_state fn write_resumption_psk_store<GroupId, ResumptionPskStore>(
            group_id: &GroupId, resumption_psk_store: &ResumptionPskStore
        ) -> ();
        group_state fn write_own_leaf_index<GroupId, LeafNodeIndex>(
            group_id: &GroupId, own_leaf_index: &LeafNodeIndex
        ) -> ();
        group_state fn write_group_epoch_secrets<GroupId, GroupEpochSecrets>(
            group_id: &GroupId, group_epoch_secrets: &GroupEpochSecrets
        ) -> ();
        kept fn write_signature_key_pair<SignaturePublicKey, SignatureKeyPair>(
            public_key: &SignaturePublicKey, signature_key_pair: &SignatureKeyPair
        ) -> ();
        kept fn write_encryption_key_pair<EncryptionKey, HpkeKeyPair>(
            public_key: &EncryptionKey, key_pair: &HpkeKeyPair
        ) -> ();
        kept fn write_encryption_epoch_key_pairs<GroupId, EpochKey, HpkeKeyPair>(
            group_id: &GroupId, epoch: &EpochKey, leaf_index: u32, key_pairs: &[HpkeKeyPair]
        ) -> ();
        kept fn write_key_package<HashReference, KeyPackage>(
            hash_ref: &HashReference, key_package: &KeyPackage
        ) -> ();
        kept fn write_psk<PskId, PskBundle>(psk_id: &PskId, psk: &PskBundle) -> ();
        group_state fn mls_group_join_config<GroupId, MlsGroupJoinConfig>(
            group_id: &GroupId
        ) -> Option<MlsGroupJoinConfig>;
        group_state fn own_leaf_nodes<GroupId, LeafNode>(group_id: &GroupId) -> Vec<LeafNode>;
        kept fn queued_proposal_refs<GroupId, ProposalRef>(group_id: &GroupId) -> Vec<ProposalRef>;
        kept fn queued_proposals<GroupId, ProposalRef, QueuedProposal>(
            group_id: &GroupId
        ) -> Vec<(ProposalRef, QueuedProposal)>;
        group_state fn tree<GroupId, TreeSync>(group_id: &GroupId) -> Option<TreeSync>;
        group_state fn group_context<GroupId, GroupContext>(
            group_id: &GroupId
        ) -> Option<GroupContext>;
        group_state fn interim_transcript_hash<GroupId, InterimTranscriptHash>(
            group_id: &GroupId
        ) -> Option<InterimTranscriptHash>;
        group_state fn confirmation_tag<GroupId, ConfirmationTag>(
            group_id: &GroupId
        ) -> Option<ConfirmationTag>;
        group_state fn group_state<GroupState, GroupId>(group_id: &GroupId) -> Option<GroupState>;
        group_state fn message_secrets<GroupId, MessageSecrets>(
            group_id: &GroupId
        ) -> Option<MessageSecrets>;
        group_state fn resumption_psk_store<GroupId, ResumptionPskStore>(
            group_id: &GroupId
        ) -> Option<ResumptionPskStore>;
        group_state fn own_leaf_index<GroupId, LeafNodeIndex>(
            group_id: &GroupId
        ) -> Option<LeafNodeIndex>;
        group_state fn group_epoch_secrets<GroupId, GroupEpochSecrets>(
            group_id: &GroupId
        ) -> Option<GroupEpochSecrets>;
        kept fn signature_key_pair<SignaturePublicKey, SignatureKeyPair>(
            public_key: &SignaturePublicKey
        ) -> Option<SignatureKeyPair>;
        kept fn encryption_key_pair<HpkeKeyPair, EncryptionKey>(
            public_key: &EncryptionKey
        ) -> Option<HpkeKeyPair>;
        kept fn encryption_epoch_key_pairs<GroupId, EpochKey, HpkeKeyPair>(
            group_id: &GroupId, epoch: &EpochKey, leaf_index: u32
        ) -> Vec<HpkeKeyPair>;
        kept fn key_package<HashReference, KeyPackage>(
            hash_ref: &HashReference
        ) -> Option<KeyPackage>;
        kept fn psk<PskBundle, PskId>(psk_id: &PskId) -> Option<PskBundle>;
        kept fn remove_proposal<GroupId, ProposalRef>(
            group_id: &GroupId, proposal_ref: &ProposalRef
        ) -> ();
        group_state fn delete_own_leaf_nodes<GroupId>(group_id: &GroupId) -> ();
        group_state fn delete_group_config<GroupId>(group_id: &GroupId) -> ();
        group_state fn delete_tree<GroupId>(group_id: &GroupId) -> ();
        group_state fn delete_confirmation_tag<GroupId>(group_id: &GroupId) -> ();
        group_state fn delete_group_state<GroupId>(group_id: &GroupId) -> ();
        group_state fn delete_context<GroupId>(group_id: &GroupId) -> ();
        group_state fn delete_interim_transcript_hash<GroupId>(group_id: &GroupId) -> ();
        group_state fn delete_message_secrets<GroupId>(group_id: &GroupId) -> ();
        group_state fn delete_all_resumption_psk_secrets<GroupId>(group_id: &GroupId) -> ();
        group_state fn delete_own_leaf_index<GroupId>(group_id: &GroupId) -> ();
        group_state fn delete_group_epoch_secrets<GroupId>(group_id: &GroupId) -> ();
        kept fn clear_proposal_queue<GroupId, ProposalRef>(group_id: &GroupId) -> ();
        kept fn delete_signature_key_pair<SignaturePublicKey>(
            public_key: &SignaturePublicKey
        ) -> ();
        kept fn delete_encryption_key_pair<EncryptionKey>(public_key: &EncryptionKey) -> ();
        kept fn delete_encryption_epoch_key_pairs<GroupId, EpochKey>(
            group_id: &GroupId, epoch: &EpochKey, leaf_index: u32
        ) -> ();
        kept fn delete_key_package<HashReference>(hash_ref: &HashReference) -> ();
        kept fn delete_psk<PskId>(psk_id: &PskId) -> ();
    }
}
