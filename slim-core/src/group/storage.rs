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

impl StorageProvider<CURRENT_VERSION> for LeanStorage {
    type Error = <MemoryStorage as StorageProvider<CURRENT_VERSION>>::Error;

    fn write_mls_join_config<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MlsGroupJoinConfig: traits::MlsGroupJoinConfig<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        config: &MlsGroupJoinConfig,
    ) -> Result<(), Self::Error> {
        if !self.keep_group_state {
            return Ok(());
        }
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::write_mls_join_config::<
            GroupId,
            MlsGroupJoinConfig,
        >(&self.inner, group_id, config)
    }

    fn append_own_leaf_node<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNode: traits::LeafNode<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        leaf_node: &LeafNode,
    ) -> Result<(), Self::Error> {
        if !self.keep_group_state {
            return Ok(());
        }
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::append_own_leaf_node::<GroupId, LeafNode>(
            &self.inner,
            group_id,
            leaf_node,
        )
    }

    fn queue_proposal<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
        QueuedProposal: traits::QueuedProposal<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        proposal_ref: &ProposalRef,
        proposal: &QueuedProposal,
    ) -> Result<(), Self::Error> {
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::queue_proposal::<
            GroupId,
            ProposalRef,
            QueuedProposal,
        >(&self.inner, group_id, proposal_ref, proposal)
    }

    fn write_tree<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        TreeSync: traits::TreeSync<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        tree: &TreeSync,
    ) -> Result<(), Self::Error> {
        if !self.keep_group_state {
            return Ok(());
        }
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::write_tree::<GroupId, TreeSync>(
            &self.inner,
            group_id,
            tree,
        )
    }

    fn write_interim_transcript_hash<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        InterimTranscriptHash: traits::InterimTranscriptHash<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        interim_transcript_hash: &InterimTranscriptHash,
    ) -> Result<(), Self::Error> {
        if !self.keep_group_state {
            return Ok(());
        }
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::write_interim_transcript_hash::<
            GroupId,
            InterimTranscriptHash,
        >(&self.inner, group_id, interim_transcript_hash)
    }

    fn write_context<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupContext: traits::GroupContext<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        group_context: &GroupContext,
    ) -> Result<(), Self::Error> {
        if !self.keep_group_state {
            return Ok(());
        }
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::write_context::<GroupId, GroupContext>(
            &self.inner,
            group_id,
            group_context,
        )
    }

    fn write_confirmation_tag<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ConfirmationTag: traits::ConfirmationTag<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        confirmation_tag: &ConfirmationTag,
    ) -> Result<(), Self::Error> {
        if !self.keep_group_state {
            return Ok(());
        }
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::write_confirmation_tag::<
            GroupId,
            ConfirmationTag,
        >(&self.inner, group_id, confirmation_tag)
    }

    fn write_group_state<
        GroupState: traits::GroupState<CURRENT_VERSION>,
        GroupId: traits::GroupId<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        group_state: &GroupState,
    ) -> Result<(), Self::Error> {
        if !self.keep_group_state {
            return Ok(());
        }
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::write_group_state::<GroupState, GroupId>(
            &self.inner,
            group_id,
            group_state,
        )
    }

    fn write_message_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MessageSecrets: traits::MessageSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        message_secrets: &MessageSecrets,
    ) -> Result<(), Self::Error> {
        if !self.keep_group_state {
            return Ok(());
        }
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::write_message_secrets::<
            GroupId,
            MessageSecrets,
        >(&self.inner, group_id, message_secrets)
    }

    fn write_resumption_psk_store<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ResumptionPskStore: traits::ResumptionPskStore<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        resumption_psk_store: &ResumptionPskStore,
    ) -> Result<(), Self::Error> {
        if !self.keep_group_state {
            return Ok(());
        }
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::write_resumption_psk_store::<
            GroupId,
            ResumptionPskStore,
        >(&self.inner, group_id, resumption_psk_store)
    }

    fn write_own_leaf_index<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNodeIndex: traits::LeafNodeIndex<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        own_leaf_index: &LeafNodeIndex,
    ) -> Result<(), Self::Error> {
        if !self.keep_group_state {
            return Ok(());
        }
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::write_own_leaf_index::<
            GroupId,
            LeafNodeIndex,
        >(&self.inner, group_id, own_leaf_index)
    }

    fn write_group_epoch_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupEpochSecrets: traits::GroupEpochSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        group_epoch_secrets: &GroupEpochSecrets,
    ) -> Result<(), Self::Error> {
        if !self.keep_group_state {
            return Ok(());
        }
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::write_group_epoch_secrets::<
            GroupId,
            GroupEpochSecrets,
        >(&self.inner, group_id, group_epoch_secrets)
    }

    fn write_signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<CURRENT_VERSION>,
        SignatureKeyPair: traits::SignatureKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &SignaturePublicKey,
        signature_key_pair: &SignatureKeyPair,
    ) -> Result<(), Self::Error> {
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::write_signature_key_pair::<
            SignaturePublicKey,
            SignatureKeyPair,
        >(&self.inner, public_key, signature_key_pair)
    }

    fn write_encryption_key_pair<
        EncryptionKey: traits::EncryptionKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &EncryptionKey,
        key_pair: &HpkeKeyPair,
    ) -> Result<(), Self::Error> {
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::write_encryption_key_pair::<
            EncryptionKey,
            HpkeKeyPair,
        >(&self.inner, public_key, key_pair)
    }

    fn write_encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
        key_pairs: &[HpkeKeyPair],
    ) -> Result<(), Self::Error> {
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::write_encryption_epoch_key_pairs::<
            GroupId,
            EpochKey,
            HpkeKeyPair,
        >(&self.inner, group_id, epoch, leaf_index, key_pairs)
    }

    fn write_key_package<
        HashReference: traits::HashReference<CURRENT_VERSION>,
        KeyPackage: traits::KeyPackage<CURRENT_VERSION>,
    >(
        &self,
        hash_ref: &HashReference,
        key_package: &KeyPackage,
    ) -> Result<(), Self::Error> {
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::write_key_package::<
            HashReference,
            KeyPackage,
        >(&self.inner, hash_ref, key_package)
    }

    fn write_psk<
        PskId: traits::PskId<CURRENT_VERSION>,
        PskBundle: traits::PskBundle<CURRENT_VERSION>,
    >(
        &self,
        psk_id: &PskId,
        psk: &PskBundle,
    ) -> Result<(), Self::Error> {
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::write_psk::<PskId, PskBundle>(
            &self.inner,
            psk_id,
            psk,
        )
    }

    fn mls_group_join_config<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MlsGroupJoinConfig: traits::MlsGroupJoinConfig<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<MlsGroupJoinConfig>, Self::Error> {
        if !self.keep_group_state {
            return Ok(None);
        }
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::mls_group_join_config::<
            GroupId,
            MlsGroupJoinConfig,
        >(&self.inner, group_id)
    }

    fn own_leaf_nodes<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNode: traits::LeafNode<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<LeafNode>, Self::Error> {
        if !self.keep_group_state {
            return Ok(Vec::new());
        }
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::own_leaf_nodes::<GroupId, LeafNode>(
            &self.inner,
            group_id,
        )
    }

    fn queued_proposal_refs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<ProposalRef>, Self::Error> {
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::queued_proposal_refs::<
            GroupId,
            ProposalRef,
        >(&self.inner, group_id)
    }

    fn queued_proposals<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
        QueuedProposal: traits::QueuedProposal<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<(ProposalRef, QueuedProposal)>, Self::Error> {
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::queued_proposals::<
            GroupId,
            ProposalRef,
            QueuedProposal,
        >(&self.inner, group_id)
    }

    fn tree<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        TreeSync: traits::TreeSync<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<TreeSync>, Self::Error> {
        if !self.keep_group_state {
            return Ok(None);
        }
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::tree::<GroupId, TreeSync>(
            &self.inner,
            group_id,
        )
    }

    fn group_context<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupContext: traits::GroupContext<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupContext>, Self::Error> {
        if !self.keep_group_state {
            return Ok(None);
        }
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::group_context::<GroupId, GroupContext>(
            &self.inner,
            group_id,
        )
    }

    fn interim_transcript_hash<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        InterimTranscriptHash: traits::InterimTranscriptHash<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<InterimTranscriptHash>, Self::Error> {
        if !self.keep_group_state {
            return Ok(None);
        }
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::interim_transcript_hash::<
            GroupId,
            InterimTranscriptHash,
        >(&self.inner, group_id)
    }

    fn confirmation_tag<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ConfirmationTag: traits::ConfirmationTag<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<ConfirmationTag>, Self::Error> {
        if !self.keep_group_state {
            return Ok(None);
        }
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::confirmation_tag::<
            GroupId,
            ConfirmationTag,
        >(&self.inner, group_id)
    }

    fn group_state<
        GroupState: traits::GroupState<CURRENT_VERSION>,
        GroupId: traits::GroupId<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupState>, Self::Error> {
        if !self.keep_group_state {
            return Ok(None);
        }
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::group_state::<GroupState, GroupId>(
            &self.inner,
            group_id,
        )
    }

    fn message_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MessageSecrets: traits::MessageSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<MessageSecrets>, Self::Error> {
        if !self.keep_group_state {
            return Ok(None);
        }
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::message_secrets::<
            GroupId,
            MessageSecrets,
        >(&self.inner, group_id)
    }

    fn resumption_psk_store<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ResumptionPskStore: traits::ResumptionPskStore<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<ResumptionPskStore>, Self::Error> {
        if !self.keep_group_state {
            return Ok(None);
        }
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::resumption_psk_store::<
            GroupId,
            ResumptionPskStore,
        >(&self.inner, group_id)
    }

    fn own_leaf_index<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNodeIndex: traits::LeafNodeIndex<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<LeafNodeIndex>, Self::Error> {
        if !self.keep_group_state {
            return Ok(None);
        }
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::own_leaf_index::<GroupId, LeafNodeIndex>(
            &self.inner,
            group_id,
        )
    }

    fn group_epoch_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupEpochSecrets: traits::GroupEpochSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupEpochSecrets>, Self::Error> {
        if !self.keep_group_state {
            return Ok(None);
        }
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::group_epoch_secrets::<
            GroupId,
            GroupEpochSecrets,
        >(&self.inner, group_id)
    }

    fn signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<CURRENT_VERSION>,
        SignatureKeyPair: traits::SignatureKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &SignaturePublicKey,
    ) -> Result<Option<SignatureKeyPair>, Self::Error> {
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::signature_key_pair::<
            SignaturePublicKey,
            SignatureKeyPair,
        >(&self.inner, public_key)
    }

    fn encryption_key_pair<
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
        EncryptionKey: traits::EncryptionKey<CURRENT_VERSION>,
    >(
        &self,
        public_key: &EncryptionKey,
    ) -> Result<Option<HpkeKeyPair>, Self::Error> {
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::encryption_key_pair::<
            HpkeKeyPair,
            EncryptionKey,
        >(&self.inner, public_key)
    }

    fn encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
    ) -> Result<Vec<HpkeKeyPair>, Self::Error> {
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::encryption_epoch_key_pairs::<
            GroupId,
            EpochKey,
            HpkeKeyPair,
        >(&self.inner, group_id, epoch, leaf_index)
    }

    fn key_package<
        KeyPackageRef: traits::HashReference<CURRENT_VERSION>,
        KeyPackage: traits::KeyPackage<CURRENT_VERSION>,
    >(
        &self,
        hash_ref: &KeyPackageRef,
    ) -> Result<Option<KeyPackage>, Self::Error> {
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::key_package::<KeyPackageRef, KeyPackage>(
            &self.inner,
            hash_ref,
        )
    }

    fn psk<PskBundle: traits::PskBundle<CURRENT_VERSION>, PskId: traits::PskId<CURRENT_VERSION>>(
        &self,
        psk_id: &PskId,
    ) -> Result<Option<PskBundle>, Self::Error> {
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::psk::<PskBundle, PskId>(
            &self.inner,
            psk_id,
        )
    }

    fn remove_proposal<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        proposal_ref: &ProposalRef,
    ) -> Result<(), Self::Error> {
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::remove_proposal::<GroupId, ProposalRef>(
            &self.inner,
            group_id,
            proposal_ref,
        )
    }

    fn delete_own_leaf_nodes<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        if !self.keep_group_state {
            return Ok(());
        }
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::delete_own_leaf_nodes::<GroupId>(
            &self.inner,
            group_id,
        )
    }

    fn delete_group_config<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        if !self.keep_group_state {
            return Ok(());
        }
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::delete_group_config::<GroupId>(
            &self.inner,
            group_id,
        )
    }

    fn delete_tree<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        if !self.keep_group_state {
            return Ok(());
        }
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::delete_tree::<GroupId>(
            &self.inner,
            group_id,
        )
    }

    fn delete_confirmation_tag<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        if !self.keep_group_state {
            return Ok(());
        }
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::delete_confirmation_tag::<GroupId>(
            &self.inner,
            group_id,
        )
    }

    fn delete_group_state<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        if !self.keep_group_state {
            return Ok(());
        }
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::delete_group_state::<GroupId>(
            &self.inner,
            group_id,
        )
    }

    fn delete_context<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        if !self.keep_group_state {
            return Ok(());
        }
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::delete_context::<GroupId>(
            &self.inner,
            group_id,
        )
    }

    fn delete_interim_transcript_hash<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        if !self.keep_group_state {
            return Ok(());
        }
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::delete_interim_transcript_hash::<GroupId>(
            &self.inner,
            group_id,
        )
    }

    fn delete_message_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        if !self.keep_group_state {
            return Ok(());
        }
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::delete_message_secrets::<GroupId>(
            &self.inner,
            group_id,
        )
    }

    fn delete_all_resumption_psk_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        if !self.keep_group_state {
            return Ok(());
        }
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::delete_all_resumption_psk_secrets::<
            GroupId,
        >(&self.inner, group_id)
    }

    fn delete_own_leaf_index<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        if !self.keep_group_state {
            return Ok(());
        }
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::delete_own_leaf_index::<GroupId>(
            &self.inner,
            group_id,
        )
    }

    fn delete_group_epoch_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        if !self.keep_group_state {
            return Ok(());
        }
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::delete_group_epoch_secrets::<GroupId>(
            &self.inner,
            group_id,
        )
    }

    fn clear_proposal_queue<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::clear_proposal_queue::<
            GroupId,
            ProposalRef,
        >(&self.inner, group_id)
    }

    fn delete_signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<CURRENT_VERSION>,
    >(
        &self,
        public_key: &SignaturePublicKey,
    ) -> Result<(), Self::Error> {
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::delete_signature_key_pair::<
            SignaturePublicKey,
        >(&self.inner, public_key)
    }

    fn delete_encryption_key_pair<EncryptionKey: traits::EncryptionKey<CURRENT_VERSION>>(
        &self,
        public_key: &EncryptionKey,
    ) -> Result<(), Self::Error> {
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::delete_encryption_key_pair::<
            EncryptionKey,
        >(&self.inner, public_key)
    }

    fn delete_encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
    ) -> Result<(), Self::Error> {
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::delete_encryption_epoch_key_pairs::<
            GroupId,
            EpochKey,
        >(&self.inner, group_id, epoch, leaf_index)
    }

    fn delete_key_package<KeyPackageRef: traits::HashReference<CURRENT_VERSION>>(
        &self,
        hash_ref: &KeyPackageRef,
    ) -> Result<(), Self::Error> {
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::delete_key_package::<KeyPackageRef>(
            &self.inner,
            hash_ref,
        )
    }

    fn delete_psk<PskKey: traits::PskId<CURRENT_VERSION>>(
        &self,
        psk_id: &PskKey,
    ) -> Result<(), Self::Error> {
        <MemoryStorage as StorageProvider<CURRENT_VERSION>>::delete_psk::<PskKey>(
            &self.inner,
            psk_id,
        )
    }
}
