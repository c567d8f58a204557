//! The MLS group core: membership life cycle, ordering, rejections, both ciphersuites, mixed
//! crypto backends, and the reference's (mls-rs 0.54) captured bytes.

use std::collections::BTreeMap;

use prost::Message as _;
use rand::{RngCore as _, SeedableRng as _};
use rand_chacha::ChaCha20Rng;
use sha2::{Digest as _, Sha256};
use slim_core::group::wire::{inspect, MlsContent, MlsKind};
use slim_core::group::*;
use slim_core::identity::{SharedSecret, SigningKey, VerifiedToken};
use slim_proto::pb;

const SECRET: &str = "test-shared-secret-0123456789abcdef-0123";
/// A fixed "now" for token checks: tests never read the clock themselves.
const NOW: u64 = 1_800_000_000;

struct Member {
    name: &'static str,
    id: String,
    identity: MlsIdentity,
}

fn secret() -> SharedSecret {
    SharedSecret::new(SECRET).unwrap()
}

fn verifier() -> impl Fn(&str) -> Result<VerifiedToken, slim_core::identity::TokenError> {
    let secret = secret();
    move |token: &str| secret.verify(token, NOW)
}

fn member(name: &'static str, suite: MlsSuite, seed: u64) -> Member {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let id = format!("org/ns/{name}_{seed:08}");
    let identity = match suite {
        MlsSuite::X25519Aes128 => {
            let mut seed_bytes = [0u8; 32];
            rng.fill_bytes(&mut seed_bytes);
            let public = ed25519_public_key(&seed_bytes).unwrap();
            let token = secret().issue(&id, &public, NOW, &mut rng);
            MlsIdentity::ed25519(token, seed_bytes).unwrap()
        }
        _ => {
            let key = SigningKey::generate(&mut rng);
            let token = secret().issue(&id, &key.public_key(), NOW, &mut rng);
            MlsIdentity::p256(token, key)
        }
    };
    Member { name, id, identity }
}

fn config(suite: MlsSuite, backend: CryptoBackend, seed: u8) -> GroupConfig {
    GroupConfig {
        suite,
        backend,
        seed: [seed; 32],
        ..GroupConfig::default()
    }
}

/// A moderator and its participants, driving commits and welcomes like the session layer does.
struct Group {
    moderator: GroupCore,
    participants: BTreeMap<&'static str, GroupCore>,
    suite: MlsSuite,
}

impl Group {
    fn new(moderator: &Member, suite: MlsSuite, backend: CryptoBackend) -> Self {
        Self {
            moderator: GroupCore::create(&moderator.identity, config(suite, backend, 1)).unwrap(),
            participants: BTreeMap::new(),
            suite,
        }
    }

    /// Invite: JOIN_REPLY key package → add → GROUP_UPDATE to the others + GROUP_WELCOME.
    fn invite(&mut self, who: &Member, cfg: GroupConfig) -> CommitOut {
        let (mut pending, key_package) = GroupCore::key_package(&who.identity, cfg).unwrap();
        let out = self
            .moderator
            .add_member(&key_package, &verifier())
            .unwrap();
        self.broadcast(&out);
        let group = pending
            .join(out.welcome.as_ref().unwrap(), out.commit_id, &verifier())
            .unwrap();
        assert_eq!(group.last_commit_id(), out.commit_id);
        self.participants.insert(who.name, group);
        out
    }

    fn broadcast(&mut self, out: &CommitOut) {
        for (name, p) in self.participants.iter_mut() {
            match p
                .handle_commit(out.commit_id, &out.commit, &verifier())
                .unwrap()
            {
                CommitOutcome::Applied { applied, rejected } => {
                    assert!(rejected.is_empty(), "{name}");
                    assert_eq!(applied.len(), 1);
                    assert_eq!(applied[0].epoch, out.epoch);
                }
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    /// The sim invariant: every active member is at the moderator's epoch with the same epoch
    /// authenticator, ratchet tree and member list.
    fn check_agreement(&self) {
        let m = &self.moderator;
        for (name, p) in &self.participants {
            if !p.is_active() {
                continue;
            }
            assert_eq!(p.epoch(), m.epoch(), "{name}");
            assert_eq!(p.epoch_authenticator(), m.epoch_authenticator(), "{name}");
            assert_eq!(p.ratchet_tree(), m.ratchet_tree(), "{name}");
            assert_eq!(p.group_id(), m.group_id(), "{name}");
            let leaves = |g: &GroupCore| g.members().iter().map(|x| x.leaf).collect::<Vec<_>>();
            assert_eq!(leaves(p), leaves(m), "{name}");
            assert_eq!(p.suite(), self.suite);
        }
    }

    fn p(&mut self, name: &str) -> &mut GroupCore {
        self.participants.get_mut(name).unwrap()
    }
}

fn round_trip(from: &mut GroupCore, to: &mut GroupCore, text: &[u8], aad: &[u8]) -> Decrypted {
    let ct = from.encrypt(text, aad).unwrap();
    let info = inspect(&ct).unwrap();
    assert_eq!(info.kind, MlsKind::PrivateMessage);
    assert_eq!(info.content, Some(MlsContent::Application));
    assert_eq!(info.authenticated_data.as_deref(), Some(aad));
    let d = to.decrypt(&ct).unwrap();
    assert_eq!(d.plaintext, text);
    assert_eq!(d.aad, aad);
    assert_eq!(d.sender_leaf, from.own_leaf());
    d
}

fn lifecycle(suite: MlsSuite, backends: [CryptoBackend; 4]) {
    let m = member("mod", suite, 1);
    let p1 = member("p1", suite, 2);
    let p2 = member("p2", suite, 3);
    let p3 = member("p3", suite, 4);
    let mut g = Group::new(&m, suite, backends[0]);
    assert_eq!(g.moderator.epoch(), 0);
    assert_eq!(g.moderator.members().len(), 1);

    let out = g.invite(&p1, config(suite, backends[1], 2));
    assert_eq!((out.commit_id, out.epoch), (1, 1));
    assert_eq!(out.added.len(), 1);
    assert_eq!(out.added[0].id.as_deref(), Some(p1.id.as_str()));
    let info = inspect(&out.commit).unwrap();
    assert_eq!(
        info.kind,
        MlsKind::PublicMessage,
        "commits are not encrypted"
    );
    assert_eq!(info.content, Some(MlsContent::Commit));
    assert_eq!(info.epoch, Some(0));
    let welcome = inspect(out.welcome.as_ref().unwrap()).unwrap();
    assert_eq!(welcome.kind, MlsKind::Welcome);
    assert_eq!(welcome.suite, Some(suite.code()));
    g.check_agreement();

    g.invite(&p2, config(suite, backends[2], 3));
    let out = g.invite(&p3, config(suite, backends[3], 4));
    assert_eq!((out.commit_id, out.epoch), (3, 3));
    g.check_agreement();
    assert_eq!(g.moderator.members().len(), 4);

    // The participants know everyone's verified id (they checked each credential).
    let p3_view = g.p("p3").members().to_vec();
    for who in [&m, &p1, &p2] {
        assert!(p3_view
            .iter()
            .any(|x| x.id.as_deref() == Some(who.id.as_str())));
    }

    // Application messages with AAD, every direction.
    let names = ["p1", "p2", "p3"];
    for (i, a) in names.iter().enumerate() {
        let aad = format!("aad-{a}").into_bytes();
        let d = round_trip(
            &mut g.moderator,
            g.participants.get_mut(a).unwrap(),
            b"down",
            &aad,
        );
        assert_eq!(d.sender_id.as_deref(), Some(m.id.as_str()));
        let mut from = g.participants.remove(a).unwrap();
        let d = round_trip(&mut from, &mut g.moderator, b"up", &aad);
        assert_eq!(d.sender_id.as_deref(), Some([&p1, &p2, &p3][i].id.as_str()));
        let other = names[(i + 1) % 3];
        round_trip(
            &mut from,
            g.participants.get_mut(other).unwrap(),
            b"side",
            b"",
        );
        g.participants.insert(a, from);
    }

    // Remove p2: the others follow; p2 learns it was removed and cannot read what follows.
    let out = g.moderator.remove_member(&p2.id).unwrap();
    assert_eq!((out.commit_id, out.epoch), (4, 4));
    assert!(out.welcome.is_none());
    assert_eq!(out.removed.len(), 1);
    assert_eq!(out.removed[0].id.as_deref(), Some(p2.id.as_str()));
    let mut removed = g.participants.remove("p2").unwrap();
    g.broadcast(&out);
    match removed.handle_commit(4, &out.commit, &verifier()).unwrap() {
        CommitOutcome::Applied { applied, .. } => assert!(applied[0].removed_us),
        other => panic!("{other:?}"),
    }
    assert!(!removed.is_active());
    g.check_agreement();
    assert_eq!(g.moderator.members().len(), 3);
    let secret_msg = g.moderator.encrypt(b"after removal", b"").unwrap();
    let refused = removed.decrypt(&secret_msg);
    assert!(
        matches!(refused, Err(DecryptError::NotAMember)),
        "{refused:?}"
    );
    assert!(matches!(
        removed.encrypt(b"x", b""),
        Err(EncryptError::NotAMember)
    ));
    assert_eq!(
        g.p("p1").decrypt(&secret_msg).unwrap().plaintext,
        b"after removal"
    );

    // Rejoin p3 with a fresh key package: remove + add in one commit.
    let (mut pending, kp) =
        GroupCore::key_package(&p3.identity, config(suite, backends[3], 9)).unwrap();
    let old_leaf = g.moderator.member_by_id(&p3.id).unwrap().leaf;
    let out = g.moderator.rejoin_member(&p3.id, &kp, &verifier()).unwrap();
    assert_eq!(out.commit_id, 5);
    assert_eq!(out.removed.len(), 1);
    assert_eq!(out.removed[0].leaf, old_leaf);
    assert_eq!(out.added.len(), 1);
    let mut stale = g.participants.remove("p3").unwrap();
    g.broadcast(&out);
    match stale.handle_commit(5, &out.commit, &verifier()).unwrap() {
        CommitOutcome::Applied { applied, .. } => assert!(applied[0].removed_us),
        other => panic!("{other:?}"),
    }
    let rejoined = pending
        .join(out.welcome.as_ref().unwrap(), out.commit_id, &verifier())
        .unwrap();
    g.participants.insert("p3", rejoined);
    g.check_agreement();
    let mut p3g = g.participants.remove("p3").unwrap();
    round_trip(&mut p3g, &mut g.moderator, b"back", b"a");
    round_trip(&mut g.moderator, &mut p3g, b"welcome back", b"b");
    round_trip(
        &mut p3g,
        g.participants.get_mut("p1").unwrap(),
        b"hi p1",
        b"c",
    );
    g.participants.insert("p3", p3g);

    for (name, p) in &g.participants {
        assert_eq!(p.stats(), &GroupStats::default(), "{name}");
    }
    assert_eq!(g.moderator.stats(), &GroupStats::default());
}

#[test]
fn lifecycle_p256_ring() {
    lifecycle(MlsSuite::P256Aes128, [CryptoBackend::Ring; 4]);
}

#[test]
fn lifecycle_x25519_ring() {
    lifecycle(MlsSuite::X25519Aes128, [CryptoBackend::Ring; 4]);
}

/// Members on different providers interoperate both ways (moderator on each).
#[test]
fn lifecycle_mixed_backends() {
    use CryptoBackend::{Ring, RustCrypto};
    lifecycle(MlsSuite::P256Aes128, [Ring, RustCrypto, Ring, RustCrypto]);
    lifecycle(MlsSuite::P256Aes128, [RustCrypto, Ring, RustCrypto, Ring]);
    lifecycle(MlsSuite::X25519Aes128, [RustCrypto, Ring, Ring, RustCrypto]);
}

#[test]
fn deterministic_signatures_interoperate() {
    let suite = MlsSuite::P256Aes128;
    let m = member("mod", suite, 1);
    let p1 = member("p1", suite, 2);
    let mut g = Group::new(&m, suite, CryptoBackend::Ring);
    let cfg = GroupConfig {
        signatures: SignatureMode::Deterministic,
        ..config(suite, CryptoBackend::RustCrypto, 2)
    };
    g.invite(&p1, cfg);
    g.check_agreement();
    let mut p = g.participants.remove("p1").unwrap();
    round_trip(&mut p, &mut g.moderator, b"x", b"y");
    round_trip(&mut g.moderator, &mut p, b"x", b"y");
}

/// Same seeds, same decisions: group id, leaves, epochs, commit ids.
#[test]
fn seeded_runs_agree() {
    let run = || {
        let suite = MlsSuite::P256Aes128;
        let m = member("mod", suite, 1);
        let mut g = Group::new(&m, suite, CryptoBackend::Ring);
        for (i, name) in ["p1", "p2"].into_iter().enumerate() {
            let who = member(name, suite, 10 + i as u64);
            g.invite(&who, config(suite, CryptoBackend::Ring, 20 + i as u8));
        }
        let leaves: Vec<_> = g
            .moderator
            .members()
            .iter()
            .map(|x| (x.leaf, x.token.clone()))
            .collect();
        (
            g.moderator.group_id().to_vec(),
            leaves,
            g.moderator.epoch(),
            g.moderator.last_commit_id(),
        )
    };
    assert_eq!(run(), run());
}

fn three_members() -> (Group, Member, Member, Member) {
    let suite = MlsSuite::P256Aes128;
    let m = member("mod", suite, 1);
    let p1 = member("p1", suite, 2);
    let p2 = member("p2", suite, 3);
    let mut g = Group::new(&m, suite, CryptoBackend::Ring);
    g.invite(&p1, config(suite, CryptoBackend::Ring, 2));
    g.invite(&p2, config(suite, CryptoBackend::Ring, 3));
    (g, m, p1, p2)
}

#[test]
fn commits_apply_in_commit_id_order() {
    let suite = MlsSuite::P256Aes128;
    let (mut g, _m, _p1, p2) = three_members();
    // p1 misses commits 3 and 4 and gets them backwards.
    let p3 = member("p3", suite, 4);
    let p4 = member("p4", suite, 5);
    let mut p1 = g.participants.remove("p1").unwrap();
    let c3 = g.invite(&p3, config(suite, CryptoBackend::Ring, 4));
    let c4 = g.invite(&p4, config(suite, CryptoBackend::Ring, 5));
    let c5 = g.moderator.remove_member(&p2.id).unwrap();
    assert!(matches!(
        p1.handle_commit(5, &c5.commit, &verifier()).unwrap(),
        CommitOutcome::Buffered { next: 3 }
    ));
    assert!(matches!(
        p1.handle_commit(4, &c4.commit, &verifier()).unwrap(),
        CommitOutcome::Buffered { next: 3 }
    ));
    // A retransmission of a buffered one is a duplicate.
    assert!(matches!(
        p1.handle_commit(4, &c4.commit, &verifier()).unwrap(),
        CommitOutcome::Duplicate
    ));
    assert_eq!(p1.buffered_commits(), 2);
    assert_eq!(p1.epoch(), 2);
    match p1.handle_commit(3, &c3.commit, &verifier()).unwrap() {
        CommitOutcome::Applied { applied, rejected } => {
            assert!(rejected.is_empty());
            let ids: Vec<_> = applied.iter().map(|a| (a.commit_id, a.epoch)).collect();
            assert_eq!(ids, [(3, 3), (4, 4), (5, 5)]);
            assert_eq!(applied[2].removed.len(), 1);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(p1.buffered_commits(), 0);
    assert_eq!(p1.last_commit_id(), 5);
    assert_eq!(p1.epoch_authenticator(), g.moderator.epoch_authenticator());
    // Old and repeated ids are dropped without touching the group.
    for (id, bytes) in [(3, &c3.commit), (5, &c5.commit), (1, &c5.commit)] {
        assert!(matches!(
            p1.handle_commit(id, bytes, &verifier()).unwrap(),
            CommitOutcome::Duplicate
        ));
    }
    assert_eq!(p1.stats().duplicate_commits, 4);
    assert_eq!(p1.stats().buffered_commits, 2);
    assert_eq!(p1.epoch(), 5);
    round_trip(&mut g.moderator, &mut p1, b"in sync", b"");
}

#[test]
fn commit_buffer_is_bounded() {
    let (mut g, _, _, _) = three_members();
    let p1 = g.p("p1");
    let max = GroupConfig::default().max_buffered_commits as u32;
    for id in 0..max {
        assert!(matches!(
            p1.handle_commit(10 + id, b"junk", &verifier()).unwrap(),
            CommitOutcome::Buffered { .. }
        ));
    }
    assert!(matches!(
        p1.handle_commit(10 + max, b"junk", &verifier()),
        Err(CommitError::BufferFull { .. })
    ));
    assert_eq!(p1.stats().commit_buffer_overflows, 1);
}

#[test]
fn application_messages_tolerate_reordering_and_a_commit() {
    let suite = MlsSuite::P256Aes128;
    let (mut g, _, _, _) = three_members();
    let mut p1 = g.participants.remove("p1").unwrap();
    let msgs: Vec<_> = (0..20u8)
        .map(|i| p1.encrypt(&[i; 10], &[i]).unwrap())
        .collect();
    for (i, ct) in msgs.iter().enumerate().rev().step_by(2) {
        assert_eq!(g.moderator.decrypt(ct).unwrap().plaintext, [i as u8; 10]);
    }
    for (i, ct) in msgs.iter().enumerate().step_by(2) {
        assert_eq!(g.moderator.decrypt(ct).unwrap().aad, [i as u8]);
    }
    // Replays are refused.
    assert!(matches!(
        g.moderator.decrypt(&msgs[3]),
        Err(DecryptError::Generation(_))
    ));
    // Sent just before a commit, received just after it: still decrypts (max_past_epochs).
    let late = p1.encrypt(b"late", b"").unwrap();
    let p3 = member("p3", suite, 4);
    let out = g.invite(&p3, config(suite, CryptoBackend::Ring, 4));
    p1.handle_commit(out.commit_id, &out.commit, &verifier())
        .unwrap();
    let d = g.moderator.decrypt(&late).unwrap();
    assert_eq!((d.plaintext.as_slice(), d.epoch), (&b"late"[..], 2));
    assert_eq!(g.moderator.stats().generation_rejected, 1);
    // Four epochs later it is too old.
    let old = p1.encrypt(b"old", b"").unwrap();
    for i in 0..4 {
        let who = member("px", suite, 50 + i);
        let out = g.invite(&who, config(suite, CryptoBackend::Ring, 50 + i as u8));
        p1.handle_commit(out.commit_id, &out.commit, &verifier())
            .unwrap();
    }
    let refused = g.moderator.decrypt(&old);
    assert!(
        matches!(
            refused,
            Err(DecryptError::EpochTooOld { got: 3, current: 7 })
        ),
        "{refused:?}"
    );
    assert_eq!(g.moderator.stats().epoch_too_old, 1);
}

#[test]
fn tampered_ciphertext_is_refused_and_the_group_goes_on() {
    let (mut g, _, _, _) = three_members();
    let mut p1 = g.participants.remove("p1").unwrap();
    let ct = p1.encrypt(b"secret", b"aad").unwrap();
    let mut refused = 0;
    for i in (0..ct.len()).step_by(7) {
        let mut bad = ct.clone();
        bad[i] ^= 0x40;
        match g.moderator.decrypt(&bad) {
            Err(DecryptError::Tampered) => refused += 1,
            Err(_) => {}
            Ok(d) => panic!("byte {i} altered and still accepted: {d:?}"),
        }
    }
    assert!(refused > 10);
    assert_eq!(g.moderator.stats().tampered, refused);
    let d = g.moderator.decrypt(&ct).unwrap();
    assert_eq!(d.plaintext, b"secret");
    assert!(matches!(
        g.moderator.decrypt(b"\x00\x01"),
        Err(DecryptError::Malformed)
    ));
    // A commit is not an application message.
    let p3 = member("p3", MlsSuite::P256Aes128, 4);
    let out = g.invite(&p3, config(MlsSuite::P256Aes128, CryptoBackend::Ring, 4));
    assert!(matches!(
        p1.decrypt(&out.commit),
        Err(DecryptError::NotPrivateMessage)
    ));
    p1.handle_commit(out.commit_id, &out.commit, &verifier())
        .unwrap();
    round_trip(&mut p1, &mut g.moderator, b"still fine", b"");
}

#[test]
fn commit_for_the_wrong_epoch_is_refused() {
    let suite = MlsSuite::P256Aes128;
    let (mut g, _, _, _) = three_members();
    let p3 = member("p3", suite, 4);
    let out = g.invite(&p3, config(suite, CryptoBackend::Ring, 4));
    let p1 = g.p("p1");
    // Replaying the (already applied) epoch-2 commit under a later commit id.
    assert!(matches!(
        p1.handle_commit(out.commit_id + 2, &out.commit, &verifier()),
        Ok(CommitOutcome::Buffered { next: 4 })
    ));
    let p4 = member("p4", suite, 5);
    let (_pending, kp) =
        GroupCore::key_package(&p4.identity, config(suite, CryptoBackend::Ring, 5)).unwrap();
    let next = g.moderator.add_member(&kp, &verifier()).unwrap();
    // The genuine commit 4 applies; the bogus buffered "5" then fails on its epoch.
    let p1 = g.p("p1");
    match p1
        .handle_commit(next.commit_id, &next.commit, &verifier())
        .unwrap()
    {
        CommitOutcome::Applied { applied, rejected } => {
            assert_eq!(applied.len(), 1);
            assert!(matches!(
                rejected[..],
                [(
                    5,
                    CommitError::WrongEpoch {
                        expected: 4,
                        got: 2
                    }
                )]
            ));
        }
        other => panic!("{other:?}"),
    }
    // Directly: a stale commit at the expected id.
    assert!(matches!(
        p1.handle_commit(5, &out.commit, &verifier()),
        Err(CommitError::WrongEpoch {
            expected: 4,
            got: 2
        })
    ));
    assert_eq!(p1.stats().wrong_epoch, 2);
    assert_eq!(p1.last_commit_id(), 4);
    // Garbage at the expected id does not advance the counter either.
    assert!(matches!(
        p1.handle_commit(5, b"garbage", &verifier()),
        Err(CommitError::Malformed)
    ));
    let ct = p1.encrypt(b"ok", b"").unwrap();
    assert_eq!(g.moderator.decrypt(&ct).unwrap().plaintext, b"ok");
}

#[test]
fn welcome_for_another_member_is_refused() {
    let suite = MlsSuite::P256Aes128;
    let m = member("mod", suite, 1);
    let p1 = member("p1", suite, 2);
    let p2 = member("p2", suite, 3);
    let mut moderator =
        GroupCore::create(&m.identity, config(suite, CryptoBackend::Ring, 1)).unwrap();
    let (mut pending1, kp1) =
        GroupCore::key_package(&p1.identity, config(suite, CryptoBackend::Ring, 2)).unwrap();
    let (mut pending2, _kp2) =
        GroupCore::key_package(&p2.identity, config(suite, CryptoBackend::Ring, 3)).unwrap();
    let out = moderator.add_member(&kp1, &verifier()).unwrap();
    let welcome = out.welcome.unwrap();
    assert!(matches!(
        pending2.join(&welcome, 1, &verifier()),
        Err(JoinError::NotForUs)
    ));
    assert_eq!(pending2.stats().welcomes_not_for_us, 1);
    assert!(matches!(
        pending1.join(&out.commit, 1, &verifier()),
        Err(JoinError::NotAWelcome)
    ));
    assert!(matches!(
        pending1.join(b"", 1, &verifier()),
        Err(JoinError::Malformed)
    ));
    // The right member still joins, and carries the counters over.
    let mut g1 = pending1.join(&welcome, 1, &verifier()).unwrap();
    assert_eq!(g1.stats().malformed, 2);
    assert!(matches!(
        pending1.join(&welcome, 1, &verifier()),
        Err(JoinError::AlreadyJoined)
    ));
    round_trip(&mut moderator, &mut g1, b"hello", b"");
}

#[test]
fn welcome_with_an_unverifiable_member_is_refused_then_accepted() {
    let suite = MlsSuite::P256Aes128;
    let m = member("mod", suite, 1);
    let p1 = member("p1", suite, 2);
    let mut moderator =
        GroupCore::create(&m.identity, config(suite, CryptoBackend::Ring, 1)).unwrap();
    let (mut pending, kp) =
        GroupCore::key_package(&p1.identity, config(suite, CryptoBackend::Ring, 2)).unwrap();
    let out = moderator.add_member(&kp, &verifier()).unwrap();
    let welcome = out.welcome.unwrap();
    let late = |t: &str| secret().verify(t, NOW + 7200);
    assert!(matches!(
        pending.join(&welcome, 1, &late),
        Err(JoinError::Credential {
            leaf: 0,
            error: CredentialError::Token(_)
        })
    ));
    assert_eq!(pending.stats().invalid_credentials, 1);
    // openmls consumed the key package on the first attempt; the pending join restored it.
    pending.join(&welcome, 1, &verifier()).unwrap();
}

#[test]
fn key_packages_with_bad_credentials_are_refused() {
    let suite = MlsSuite::P256Aes128;
    let (mut g, _, _, _) = three_members();
    let epoch = g.moderator.epoch();

    // Token from another secret.
    let mut rng = ChaCha20Rng::seed_from_u64(77);
    let key = SigningKey::generate(&mut rng);
    let other = SharedSecret::new("another-secret-another-secret-another").unwrap();
    let token = other.issue("org/ns/evil_1", &key.public_key(), NOW, &mut rng);
    let (_, kp) = GroupCore::key_package(
        &MlsIdentity::p256(token, key.clone()),
        config(suite, CryptoBackend::Ring, 7),
    )
    .unwrap();
    let err = g.moderator.add_member(&kp, &verifier()).unwrap_err();
    assert!(
        matches!(
            err,
            CommitError::KeyPackage(KeyPackageError::Credential(CredentialError::Token(_)))
        ),
        "{err:?}"
    );
    assert!(matches!(
        validate_key_package(suite, &kp, &verifier()),
        Err(KeyPackageError::Credential(CredentialError::Token(_)))
    ));

    // Genuine token naming another key than the one that signs the leaf.
    let other_key = SigningKey::generate(&mut rng);
    let token = secret().issue("org/ns/evil_2", &other_key.public_key(), NOW, &mut rng);
    let (_, kp) = GroupCore::key_package(
        &MlsIdentity::p256(token, key),
        config(suite, CryptoBackend::Ring, 8),
    )
    .unwrap();
    let err = g.moderator.add_member(&kp, &verifier()).unwrap_err();
    assert!(
        matches!(
            err,
            CommitError::KeyPackage(KeyPackageError::Credential(CredentialError::PubkeyMismatch))
        ),
        "{err:?}"
    );

    // Not a key package / wrong suite / altered signature.
    assert!(matches!(
        g.moderator.add_member(b"\x00\x01\x00\x05", &verifier()),
        Err(CommitError::KeyPackage(KeyPackageError::Malformed))
    ));
    let ed = member("ed", MlsSuite::X25519Aes128, 9);
    let (_, kp_ed) = GroupCore::key_package(
        &ed.identity,
        config(MlsSuite::X25519Aes128, CryptoBackend::Ring, 9),
    )
    .unwrap();
    assert!(matches!(
        g.moderator.add_member(&kp_ed, &verifier()),
        Err(CommitError::KeyPackage(KeyPackageError::WrongSuite {
            expected: 2,
            got: 1
        }))
    ));
    let good = member("good", suite, 10);
    let (mut pending, kp_good) =
        GroupCore::key_package(&good.identity, config(suite, CryptoBackend::Ring, 10)).unwrap();
    let mut altered = kp_good.clone();
    let last = altered.len() - 1;
    altered[last] ^= 1;
    assert!(matches!(
        g.moderator.add_member(&altered, &verifier()),
        Err(CommitError::KeyPackage(KeyPackageError::Invalid(_)))
    ));

    let stats = g.moderator.stats().clone();
    assert_eq!(stats.invalid_credentials, 1);
    assert_eq!(stats.pubkey_mismatches, 1);
    assert_eq!(stats.malformed, 1);
    assert_eq!(stats.invalid_key_packages, 2);
    assert_eq!(
        g.moderator.epoch(),
        epoch,
        "no refused key package changed the group"
    );
    assert_eq!(g.moderator.last_commit_id(), 2);

    // The group still works.
    let out = g.moderator.add_member(&kp_good, &verifier()).unwrap();
    assert_eq!(out.commit_id, 3);
    g.broadcast(&out);
    let mut joined = pending
        .join(out.welcome.as_ref().unwrap(), 3, &verifier())
        .unwrap();
    round_trip(&mut joined, g.p("p1"), b"hi", b"");
}

#[test]
fn commit_adding_an_unverifiable_member_is_refused_by_participants() {
    let suite = MlsSuite::P256Aes128;
    let (mut g, _, _, _) = three_members();
    let p3 = member("p3", suite, 4);
    let (_pending, kp) =
        GroupCore::key_package(&p3.identity, config(suite, CryptoBackend::Ring, 4)).unwrap();
    let out = g.moderator.add_member(&kp, &verifier()).unwrap();
    // p1's verifier refuses p3's token (e.g. another trust domain).
    let picky = |t: &str| {
        if t.starts_with("org/ns/p3_") {
            Err("not trusted".into())
        } else {
            secret()
                .verify(t, NOW)
                .map_err(|e| Box::new(e) as VerifyError)
        }
    };
    let p1 = g.p("p1");
    assert!(matches!(
        p1.handle_commit(out.commit_id, &out.commit, &picky),
        Err(CommitError::Credential(CredentialError::Token(_)))
    ));
    assert_eq!(p1.stats().invalid_credentials, 1);
    assert_eq!(p1.epoch(), 2);
    p1.handle_commit(out.commit_id, &out.commit, &verifier())
        .unwrap();
    assert_eq!(p1.epoch(), 3);
}

#[test]
fn unknown_members_and_identity_mismatch() {
    let (mut g, m, _, _) = three_members();
    assert!(matches!(
        g.moderator.remove_member("nobody"),
        Err(CommitError::UnknownMember)
    ));
    assert!(matches!(
        g.moderator.remove_leaf(0),
        Err(CommitError::UnknownMember)
    ));
    assert!(matches!(
        g.moderator.remove_leaf(99),
        Err(CommitError::UnknownMember)
    ));
    assert!(matches!(
        GroupCore::create(
            &m.identity,
            config(MlsSuite::X25519Aes128, CryptoBackend::Ring, 1)
        ),
        Err(SetupError::KeyDoesNotFitSuite(MlsSuite::X25519Aes128))
    ));
}

// ---------------------------------------------------------------------------------------------
// Interop with captured reference (mls-rs 0.54, slim-bindings 3.3.8) bytes.

const VECTORS: &str = include_str!("data/identity_vectors.json");

#[derive(Debug, Default)]
struct Captured {
    /// (capture, key package) from JOIN_REPLY / REJOIN_REQUEST.
    key_packages: Vec<(String, Vec<u8>)>,
    /// (capture, commit_id, welcome) from GROUP_WELCOME / REJOIN_REPLY.
    welcomes: Vec<(String, u32, Vec<u8>)>,
    /// (capture, commit_id, commit) from GROUP_UPDATE.
    commits: Vec<(String, u32, Vec<u8>)>,
    /// (capture, blob, HeaderIntegrityAad bytes) from MSG.
    app_messages: Vec<(String, Vec<u8>, Vec<u8>)>,
    secret: String,
}

fn captured() -> Captured {
    use pb::command_payload::CommandPayloadType as C;
    let doc: serde_json::Value = serde_json::from_str(VECTORS).unwrap();
    let mut out = Captured {
        secret: doc["secret"].as_str().unwrap().to_owned(),
        ..Captured::default()
    };
    for v in doc["vectors"].as_array().unwrap() {
        if v["dir"] != "c2n" {
            continue; // node copies carry the same MLS bytes
        }
        let capture = v["capture"].as_str().unwrap().to_owned();
        let bytes = hex::decode(v["hex"].as_str().unwrap()).unwrap();
        let Some(pb::message::MessageType::Publish(publish)) =
            pb::Message::decode(bytes.as_slice()).unwrap().message_type
        else {
            continue;
        };
        match publish.msg.and_then(|c| c.content_type) {
            Some(pb::content::ContentType::CommandPayload(cmd)) => match cmd.command_payload_type {
                Some(C::JoinReply(r)) => {
                    if let Some(kp) = r.key_package {
                        out.key_packages.push((capture, kp.to_vec()));
                    }
                }
                Some(C::RejoinRequest(r)) => {
                    out.key_packages.push((capture, r.key_package.to_vec()))
                }
                Some(C::GroupWelcome(w)) => {
                    if let Some(mls) = w.mls {
                        out.welcomes
                            .push((capture, mls.commit_id, mls.mls_content.to_vec()));
                    }
                }
                Some(C::RejoinReply(r)) => {
                    out.welcomes
                        .push((capture, r.commit_id, r.mls_content.to_vec()))
                }
                Some(C::GroupUpdate(u)) => {
                    if let Some(mls) = u.mls {
                        out.commits
                            .push((capture, mls.commit_id, mls.mls_content.to_vec()));
                    }
                }
                _ => {}
            },
            Some(pb::content::ContentType::AppPayload(app))
                if capture.contains("mls") && !app.blob.is_empty() =>
            {
                let aad = hex::decode(v["aad_hex"].as_str().unwrap()).unwrap();
                out.app_messages.push((capture, app.blob.to_vec(), aad));
            }
            Some(pb::content::ContentType::AppPayload(_)) => {}
            None => {}
        }
    }
    out
}

/// RFC 9420 §5.2 `MakeKeyPackageRef`, written independently of openmls:
/// `SHA-256(opaque label<V> || opaque value<V>)` with label "MLS 1.0 KeyPackage Reference" and
/// value the encoded KeyPackage (the MLSMessage minus its 4-byte version/wire_format header).
fn key_package_ref(mls_message: &[u8]) -> Vec<u8> {
    fn varint(n: usize, out: &mut Vec<u8>) {
        match n {
            0..=0x3f => out.push(n as u8),
            0x40..=0x3fff => out.extend_from_slice(&(0x4000 | n as u16).to_be_bytes()),
            _ => out.extend_from_slice(&(0x8000_0000 | n as u32).to_be_bytes()),
        }
    }
    let label = b"MLS 1.0 KeyPackage Reference";
    let value = &mls_message[4..];
    let mut input = Vec::new();
    varint(label.len(), &mut input);
    input.extend_from_slice(label);
    varint(value.len(), &mut input);
    input.extend_from_slice(value);
    Sha256::digest(&input).to_vec()
}

fn token_ts(token: &str) -> u64 {
    token.split(':').nth(1).unwrap().parse().unwrap()
}

#[test]
fn captured_reference_objects_parse() {
    let c = captured();
    assert_eq!(
        c.key_packages.len(),
        4,
        "{:?}",
        c.key_packages.iter().map(|k| &k.0).collect::<Vec<_>>()
    );
    assert_eq!(c.welcomes.len(), 4);
    assert_eq!(c.commits.len(), 2);
    assert!(c.app_messages.len() >= 13);

    for (capture, kp) in &c.key_packages {
        let info = inspect(kp).unwrap();
        assert_eq!(
            (info.kind, info.suite),
            (MlsKind::KeyPackage, Some(0x0002)),
            "{capture}"
        );
    }
    // Every welcome is encrypted to exactly one captured key package, by a KeyPackageRef we
    // compute independently: same hashing as mls-rs.
    let refs: Vec<_> = c
        .key_packages
        .iter()
        .map(|(_, kp)| key_package_ref(kp))
        .collect();
    for (capture, commit_id, welcome) in &c.welcomes {
        let info = inspect(welcome).unwrap();
        assert_eq!(
            (info.kind, info.suite),
            (MlsKind::Welcome, Some(0x0002)),
            "{capture}"
        );
        assert_eq!(info.welcome_recipients.len(), 1);
        assert!(
            refs.contains(&info.welcome_recipients[0]),
            "{capture} #{commit_id}"
        );
    }
    // Group capture: commit 2 adds m1 in epoch 1, commit 3 removes m0 in epoch 2; PublicMessage.
    let mut group_ids = Vec::new();
    for (capture, commit_id, commit) in &c.commits {
        let info = inspect(commit).unwrap();
        assert_eq!(info.kind, MlsKind::PublicMessage, "{capture}");
        assert_eq!(info.content, Some(MlsContent::Commit));
        assert_eq!(
            info.epoch,
            Some(u64::from(*commit_id) - 1),
            "{capture} #{commit_id}"
        );
        group_ids.push(info.group_id.unwrap());
    }
    assert_eq!(group_ids[0], group_ids[1]);
    // Application messages: PrivateMessage, application content, and the clear-text
    // authenticated data is exactly the HeaderIntegrityAad the capture tool rebuilt.
    let (mut g, _, _, _) = three_members();
    for (capture, blob, aad) in &c.app_messages {
        let info = inspect(blob).unwrap();
        assert_eq!(info.kind, MlsKind::PrivateMessage, "{capture}");
        assert_eq!(info.content, Some(MlsContent::Application));
        assert_eq!(info.authenticated_data.as_ref(), Some(aad), "{capture}");
        if capture == "c_group_mls" {
            assert_eq!(info.group_id.as_ref(), Some(&group_ids[0]));
        }
        // Our core refuses it cleanly (not our group): no panic, typed error.
        assert!(matches!(
            g.moderator.decrypt(blob),
            Err(DecryptError::WrongGroup)
        ));
    }
    // Truncations and trailing bytes are refused, never panics.
    for (_, kp) in &c.key_packages {
        assert!(inspect(&kp[..kp.len() - 1]).is_err());
        let mut longer = kp.clone();
        longer.push(0);
        assert!(inspect(&longer).is_err());
    }
}

/// The reference's key packages validate with openmls (signatures by mls-rs/aws-lc over
/// P-256, Basic credential with the whole token, token pubkey == leaf signature key), openmls
/// computes the same KeyPackageRef, and one can be added to an openmls group.
///
/// Time: the credential tokens are checked at their own timestamp (the verifier takes the time
/// as a parameter). openmls checks the key package *lifetime* against the wall clock with no way
/// to pass a time; mls-rs key packages are valid from capture time − 60 s for a long period
/// (mls-rs default), so this holds as long as the machine's clock is inside that window. If it
/// is not, the test asserts the typed lifetime error instead.
#[test]
fn captured_reference_key_packages_validate_and_can_be_added() {
    let c = captured();
    let shared = SharedSecret::new(&c.secret).unwrap();
    let suite = MlsSuite::P256Aes128;
    let mut added = 0;
    for (capture, kp) in &c.key_packages {
        let at_token_time = |t: &str| shared.verify(t, token_ts(t));
        match validate_key_package(suite, kp, &at_token_time) {
            Ok(v) => {
                assert_eq!(v.key_package_ref, key_package_ref(kp), "{capture}");
                assert_eq!(v.signature_key.len(), 65);
                assert!(v.id.contains('/'), "{capture}: {}", v.id);
                assert!(v.not_before <= token_ts(&v.token), "back-dated: {capture}");
                assert!(v.not_after > v.not_before);
                // Wrong secret: refused with the typed credential error.
                let other =
                    SharedSecret::new("interop-shared-secret-0123456789abcdef-0123456780").unwrap();
                assert!(matches!(
                    validate_key_package(suite, kp, &|t: &str| other.verify(t, token_ts(t))),
                    Err(KeyPackageError::Credential(CredentialError::Token(_)))
                ));
                // Added to our group: a commit and a welcome addressed to that key package.
                let m = member("mod", suite, 1);
                let mut g =
                    GroupCore::create(&m.identity, config(suite, CryptoBackend::Ring, 1)).unwrap();
                let out = g.add_member(kp, &at_token_time).unwrap();
                let w = inspect(out.welcome.as_ref().unwrap()).unwrap();
                assert_eq!(
                    w.welcome_recipients,
                    std::slice::from_ref(&v.key_package_ref)
                );
                assert_eq!(
                    g.member_by_id(&v.id).unwrap().signature_key,
                    v.signature_key
                );
                added += 1;
            }
            Err(KeyPackageError::Lifetime(e)) => {
                eprintln!(
                    "{capture}: captured key package outside its lifetime by this clock: {e}"
                );
            }
            Err(e) => panic!("{capture}: {e:?}"),
        }
    }
    eprintln!("{added} captured reference key packages added to an openmls group");
}

// ---------------------------------------------------------------------------------------------
// End to end with the reference's MLS library: mls-rs 0.54 (what slim-bindings 3.3.8 runs),
// configured like the reference (`Client::builder()` defaults, `create_group(ExtensionList::
// default(), Default::default(), None)`, `generate_key_package_message(Default::default(),
// Default::default(), None)`, commit builder add/remove, `apply_pending_commit`, `join_group(None,
// welcome, None)`, `encrypt_application_message(data, aad)`), with an identity provider that
// checks credentials as the reference's `SlimIdentityProvider` does. mls-rs-crypto-rustcrypto
// stands in for aws-lc (same algorithms, same wire bytes).

mod reference {
    use mls_rs::client_builder::MlsConfig;
    use mls_rs::identity::basic::BasicCredential;
    use mls_rs::identity::{CredentialType, SigningIdentity};
    use mls_rs::time::MlsTime;
    use mls_rs::{
        CipherSuite, CipherSuiteProvider, Client, CryptoProvider, ExtensionList, IdentityProvider,
    };
    use mls_rs_core::identity::MemberValidationContext;
    use mls_rs_crypto_rustcrypto::RustCryptoProvider;
    use slim_core::identity::SharedSecret;

    #[derive(Debug)]
    pub struct IdError(pub String);

    impl std::fmt::Display for IdError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }

    impl std::error::Error for IdError {}

    impl mls_rs::error::IntoAnyError for IdError {
        fn into_dyn_error(self) -> Result<Box<dyn std::error::Error + Send + Sync>, Self> {
            Ok(Box::new(self))
        }
    }

    /// The reference's rule: the Basic identity is a token that verifies, and its `pubkey`
    /// claim is the signature key; `identity()` is the token's `sub`.
    #[derive(Clone)]
    pub struct SlimLikeIdentityProvider {
        pub secret: SharedSecret,
        pub now: u64,
    }

    impl SlimLikeIdentityProvider {
        fn claims(
            &self,
            id: &SigningIdentity,
        ) -> Result<slim_core::identity::VerifiedToken, IdError> {
            let basic = id
                .credential
                .as_basic()
                .ok_or_else(|| IdError("not basic".into()))?;
            let token =
                std::str::from_utf8(&basic.identifier).map_err(|e| IdError(e.to_string()))?;
            let verified = self
                .secret
                .verify(token, self.now)
                .map_err(|e| IdError(e.to_string()))?;
            if verified.pubkey != id.signature_key.as_bytes() {
                return Err(IdError("public key mismatch".into()));
            }
            Ok(verified)
        }
    }

    impl IdentityProvider for SlimLikeIdentityProvider {
        type Error = IdError;

        fn validate_member(
            &self,
            signing_identity: &SigningIdentity,
            _timestamp: Option<MlsTime>,
            _context: MemberValidationContext<'_>,
        ) -> Result<(), Self::Error> {
            self.claims(signing_identity).map(|_| ())
        }

        fn validate_external_sender(
            &self,
            _signing_identity: &SigningIdentity,
            _timestamp: Option<MlsTime>,
            _extensions: Option<&ExtensionList>,
        ) -> Result<(), Self::Error> {
            Err(IdError("external senders are not supported".into()))
        }

        fn identity(
            &self,
            signing_identity: &SigningIdentity,
            _extensions: &ExtensionList,
        ) -> Result<Vec<u8>, Self::Error> {
            Ok(self.claims(signing_identity)?.id.into_bytes())
        }

        fn valid_successor(
            &self,
            predecessor: &SigningIdentity,
            successor: &SigningIdentity,
            _extensions: &ExtensionList,
        ) -> Result<bool, Self::Error> {
            Ok(self.claims(predecessor)?.id == self.claims(successor)?.id)
        }

        fn supported_types(&self) -> Vec<CredentialType> {
            vec![CredentialType::BASIC]
        }
    }

    pub fn suite(code: u16) -> CipherSuite {
        CipherSuite::from(code)
    }

    /// A reference client; returns it with its verified id.
    pub fn client(
        secret: &SharedSecret,
        now: u64,
        name: &str,
        code: u16,
        seed: u64,
    ) -> (Client<impl MlsConfig>, String) {
        use rand::SeedableRng as _;
        let crypto = RustCryptoProvider::default();
        let cs = crypto.cipher_suite_provider(suite(code)).unwrap();
        let (secret_key, public_key) = cs.signature_key_generate().unwrap();
        let id = format!("org/ns/{name}_{seed:08}");
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
        let token = secret.issue(&id, public_key.as_bytes(), now, &mut rng);
        let identity = SigningIdentity::new(
            BasicCredential::new(token.into_bytes()).into_credential(),
            public_key,
        );
        let client = Client::builder()
            .identity_provider(SlimLikeIdentityProvider {
                secret: secret.clone(),
                now,
            })
            .crypto_provider(crypto)
            .signing_identity(identity, secret_key, suite(code))
            .build();
        (client, id)
    }
}

fn ref_app(received: mls_rs::group::ReceivedMessage) -> (Vec<u8>, Vec<u8>) {
    match received {
        mls_rs::group::ReceivedMessage::ApplicationMessage(m) => {
            (m.data().to_vec(), m.authenticated_data.clone())
        }
        other => panic!("expected an application message, got {other:?}"),
    }
}

fn ref_auth<C: mls_rs::client_builder::MlsConfig>(g: &mls_rs::Group<C>) -> Vec<u8> {
    g.epoch_authenticator().unwrap().to_vec()
}

fn mls_msg(bytes: &[u8]) -> mls_rs::MlsMessage {
    mls_rs::MlsMessage::from_bytes(bytes).unwrap()
}

/// Reference moderator, openmls participants (and one more reference member).
fn reference_moderator(suite: MlsSuite, backend: CryptoBackend) {
    use mls_rs::ExtensionList;
    let shared = secret();
    let code = suite.code();
    let (ref_mod, mod_id) = reference::client(&shared, NOW, "refmod", code, 100);
    let (ref_member, ref_member_id) = reference::client(&shared, NOW, "refmember", code, 101);
    let mut moderator = ref_mod
        .create_group(ExtensionList::default(), Default::default(), None)
        .unwrap();

    // JOIN_REPLY from our participant → add_member → GROUP_WELCOME commit_id 1.
    let ours = member("ours", suite, 5);
    let (mut pending, kp) =
        GroupCore::key_package(&ours.identity, config(suite, backend, 5)).unwrap();
    let commit = moderator
        .commit_builder()
        .add_member(mls_msg(&kp))
        .unwrap()
        .build()
        .unwrap();
    moderator.apply_pending_commit().unwrap();
    let welcome = commit.welcome_messages[0].to_bytes().unwrap();
    let mut p = pending.join(&welcome, 1, &verifier()).unwrap();
    assert_eq!(p.epoch(), moderator.current_epoch());
    assert_eq!(p.epoch_authenticator(), ref_auth(&moderator));
    assert_eq!(p.member_by_id(&mod_id).unwrap().leaf, 0);

    // A reference member joins: commit 2 is an mls-rs PublicMessage commit for us.
    let kp2 = ref_member
        .generate_key_package_message(Default::default(), Default::default(), None)
        .unwrap();
    let commit = moderator
        .commit_builder()
        .add_member(kp2)
        .unwrap()
        .build()
        .unwrap();
    moderator.apply_pending_commit().unwrap();
    let (mut other, _) = ref_member
        .join_group(None, &commit.welcome_messages[0], None)
        .unwrap();
    let bytes = commit.commit_message.to_bytes().unwrap();
    assert_eq!(inspect(&bytes).unwrap().kind, MlsKind::PublicMessage);
    match p.handle_commit(2, &bytes, &verifier()).unwrap() {
        CommitOutcome::Applied { applied, .. } => {
            assert_eq!(
                applied[0].added[0].id.as_deref(),
                Some(ref_member_id.as_str())
            );
        }
        o => panic!("{o:?}"),
    }
    assert_eq!(p.epoch_authenticator(), ref_auth(&moderator));
    assert_eq!(p.epoch_authenticator(), ref_auth(&other));

    // Application messages with AAD, every direction.
    let ct = moderator
        .encrypt_application_message(b"from the reference", b"aad-1".to_vec())
        .unwrap();
    let d = p.decrypt(&ct.to_bytes().unwrap()).unwrap();
    assert_eq!(
        (d.plaintext.as_slice(), d.aad.as_slice()),
        (&b"from the reference"[..], &b"aad-1"[..])
    );
    assert_eq!(d.sender_id.as_deref(), Some(mod_id.as_str()));
    let ct = p.encrypt(b"from openmls", b"aad-2").unwrap();
    assert_eq!(
        ref_app(moderator.process_incoming_message(mls_msg(&ct)).unwrap()),
        (b"from openmls".to_vec(), b"aad-2".to_vec())
    );
    assert_eq!(
        ref_app(other.process_incoming_message(mls_msg(&ct)).unwrap()),
        (b"from openmls".to_vec(), b"aad-2".to_vec())
    );
    // Reordered: three messages from the reference member, delivered backwards.
    let cts: Vec<_> = (0..3u8)
        .map(|i| {
            other
                .encrypt_application_message(&[i], vec![i])
                .unwrap()
                .to_bytes()
                .unwrap()
        })
        .collect();
    for (i, ct) in cts.iter().enumerate().rev() {
        assert_eq!(p.decrypt(ct).unwrap().plaintext, [i as u8]);
    }

    // Remove the reference member (a commit with an update path).
    let commit = moderator
        .commit_builder()
        .remove_member(other.current_member_index())
        .unwrap()
        .build()
        .unwrap();
    moderator.apply_pending_commit().unwrap();
    p.handle_commit(3, &commit.commit_message.to_bytes().unwrap(), &verifier())
        .unwrap();
    assert_eq!(p.epoch_authenticator(), ref_auth(&moderator));
    assert_eq!(p.members().len(), 2);
    let ct = p.encrypt(b"after removal", b"").unwrap();
    assert_eq!(
        ref_app(moderator.process_incoming_message(mls_msg(&ct)).unwrap()).0,
        b"after removal"
    );

    // Finally remove us.
    let commit = moderator
        .commit_builder()
        .remove_member(p.own_leaf())
        .unwrap()
        .build()
        .unwrap();
    moderator.apply_pending_commit().unwrap();
    match p
        .handle_commit(4, &commit.commit_message.to_bytes().unwrap(), &verifier())
        .unwrap()
    {
        CommitOutcome::Applied { applied, .. } => assert!(applied[0].removed_us),
        o => panic!("{o:?}"),
    }
    assert!(!p.is_active());
    assert_eq!(p.stats(), &GroupStats::default());
}

/// Our moderator, reference participants (and one more openmls member).
fn our_moderator(suite: MlsSuite, backend: CryptoBackend) {
    let shared = secret();
    let code = suite.code();
    let m = member("mod", suite, 1);
    let mut moderator = GroupCore::create(&m.identity, config(suite, backend, 1)).unwrap();
    let (ref1, ref1_id) = reference::client(&shared, NOW, "ref1", code, 200);
    let (ref2, ref2_id) = reference::client(&shared, NOW, "ref2", code, 201);

    // Reference JOIN_REPLY key package → our add → the reference joins our welcome.
    let kp = ref1
        .generate_key_package_message(Default::default(), Default::default(), None)
        .unwrap();
    let out = moderator
        .add_member(&kp.to_bytes().unwrap(), &verifier())
        .unwrap();
    assert_eq!(out.added[0].id.as_deref(), Some(ref1_id.as_str()));
    let (mut r1, _) = ref1
        .join_group(None, &mls_msg(out.welcome.as_ref().unwrap()), None)
        .unwrap();
    assert_eq!(r1.current_epoch(), moderator.epoch());
    assert_eq!(ref_auth(&r1), moderator.epoch_authenticator());

    // An openmls participant joins; the reference member applies our commit.
    let p = member("p", suite, 2);
    let (mut pending, kp) = GroupCore::key_package(&p.identity, config(suite, backend, 2)).unwrap();
    let out = moderator.add_member(&kp, &verifier()).unwrap();
    r1.process_incoming_message(mls_msg(&out.commit)).unwrap();
    let mut pg = pending
        .join(out.welcome.as_ref().unwrap(), out.commit_id, &verifier())
        .unwrap();
    // And a second reference member.
    let kp = ref2
        .generate_key_package_message(Default::default(), Default::default(), None)
        .unwrap();
    let out = moderator
        .add_member(&kp.to_bytes().unwrap(), &verifier())
        .unwrap();
    r1.process_incoming_message(mls_msg(&out.commit)).unwrap();
    pg.handle_commit(out.commit_id, &out.commit, &verifier())
        .unwrap();
    let (mut r2, _) = ref2
        .join_group(None, &mls_msg(out.welcome.as_ref().unwrap()), None)
        .unwrap();
    for auth in [
        ref_auth(&r1),
        ref_auth(&r2),
        pg.epoch_authenticator().to_vec(),
    ] {
        assert_eq!(auth, moderator.epoch_authenticator());
    }

    // Messages every way.
    let ct = moderator.encrypt(b"hello refs", b"aad").unwrap();
    for r in [&mut r1, &mut r2] {
        assert_eq!(
            ref_app(r.process_incoming_message(mls_msg(&ct)).unwrap()),
            (b"hello refs".to_vec(), b"aad".to_vec())
        );
    }
    assert_eq!(pg.decrypt(&ct).unwrap().plaintext, b"hello refs");
    let ct = r2
        .encrypt_application_message(b"hello all", b"aad2".to_vec())
        .unwrap()
        .to_bytes()
        .unwrap();
    for g in [&mut moderator, &mut pg] {
        let d = g.decrypt(&ct).unwrap();
        assert_eq!(
            (d.plaintext, d.aad),
            (b"hello all".to_vec(), b"aad2".to_vec())
        );
        assert_eq!(d.sender_id.as_deref(), Some(ref2_id.as_str()));
    }
    let ct = pg.encrypt(b"from p", b"").unwrap();
    assert_eq!(
        ref_app(r1.process_incoming_message(mls_msg(&ct)).unwrap()).0,
        b"from p"
    );

    // Remove ref1 (commit with path), then rejoin it with a fresh key package (remove + add).
    let out = moderator.remove_member(&ref1_id).unwrap();
    r2.process_incoming_message(mls_msg(&out.commit)).unwrap();
    pg.handle_commit(out.commit_id, &out.commit, &verifier())
        .unwrap();
    match r1.process_incoming_message(mls_msg(&out.commit)).unwrap() {
        mls_rs::group::ReceivedMessage::Commit(c) => {
            assert!(matches!(
                c.effect,
                mls_rs::group::CommitEffect::Removed { .. }
            ))
        }
        o => panic!("{o:?}"),
    }
    let kp = ref1
        .generate_key_package_message(Default::default(), Default::default(), None)
        .unwrap();
    let out = moderator
        .add_member(&kp.to_bytes().unwrap(), &verifier())
        .unwrap();
    r2.process_incoming_message(mls_msg(&out.commit)).unwrap();
    pg.handle_commit(out.commit_id, &out.commit, &verifier())
        .unwrap();
    let (mut r1, _) = ref1
        .join_group(None, &mls_msg(out.welcome.as_ref().unwrap()), None)
        .unwrap();
    let kp = ref2
        .generate_key_package_message(Default::default(), Default::default(), None)
        .unwrap();
    let out = moderator
        .rejoin_member(&ref2_id, &kp.to_bytes().unwrap(), &verifier())
        .unwrap();
    assert_eq!((out.removed.len(), out.added.len()), (1, 1));
    r1.process_incoming_message(mls_msg(&out.commit)).unwrap();
    pg.handle_commit(out.commit_id, &out.commit, &verifier())
        .unwrap();
    let (mut r2, _) = ref2
        .join_group(None, &mls_msg(out.welcome.as_ref().unwrap()), None)
        .unwrap();
    for auth in [
        ref_auth(&r1),
        ref_auth(&r2),
        pg.epoch_authenticator().to_vec(),
    ] {
        assert_eq!(auth, moderator.epoch_authenticator());
    }
    let ct = r1
        .encrypt_application_message(b"back", vec![])
        .unwrap()
        .to_bytes()
        .unwrap();
    assert_eq!(pg.decrypt(&ct).unwrap().plaintext, b"back");
    let ct = moderator.encrypt(b"welcome back", b"").unwrap();
    assert_eq!(
        ref_app(r2.process_incoming_message(mls_msg(&ct)).unwrap()).0,
        b"welcome back"
    );
    assert_eq!(moderator.stats(), &GroupStats::default());
    assert_eq!(pg.stats(), &GroupStats::default());
}

#[test]
fn interop_reference_moderator_p256() {
    reference_moderator(MlsSuite::P256Aes128, CryptoBackend::Ring);
    reference_moderator(MlsSuite::P256Aes128, CryptoBackend::RustCrypto);
}

#[test]
fn interop_reference_moderator_x25519() {
    reference_moderator(MlsSuite::X25519Aes128, CryptoBackend::Ring);
}

#[test]
fn interop_our_moderator_p256() {
    our_moderator(MlsSuite::P256Aes128, CryptoBackend::Ring);
    our_moderator(MlsSuite::P256Aes128, CryptoBackend::RustCrypto);
}

#[test]
fn interop_our_moderator_x25519() {
    our_moderator(MlsSuite::X25519Aes128, CryptoBackend::Ring);
}

/// The reference refuses our key package when our token does not verify for it, as it would
/// refuse any: the credential rules are the same on both sides.
#[test]
fn interop_reference_refuses_bad_tokens() {
    use mls_rs::ExtensionList;
    let shared = secret();
    let (ref_mod, _) = reference::client(&shared, NOW, "refmod", 2, 300);
    let mut moderator = ref_mod
        .create_group(ExtensionList::default(), Default::default(), None)
        .unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(301);
    let key = SigningKey::generate(&mut rng);
    let other_key = SigningKey::generate(&mut rng);
    let token = secret().issue("org/ns/liar_1", &other_key.public_key(), NOW, &mut rng);
    let (_, kp) = GroupCore::key_package(
        &MlsIdentity::p256(token, key),
        config(MlsSuite::P256Aes128, CryptoBackend::Ring, 9),
    )
    .unwrap();
    assert!(moderator
        .commit_builder()
        .add_member(mls_msg(&kp))
        .and_then(|b| b.build())
        .is_err());
}
