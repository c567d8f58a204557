//! MLS group core (`slim_core::group`): the cost of an application message and of an add-member
//! commit, per ciphersuite and crypto backend.
//!
//! * `mls_app_1k/<suite>/<backend>`: one member encrypts 1 KiB with 100 bytes of authenticated
//!   data (the size of a HeaderIntegrityAad) and another decrypts it; both on the same backend.
//!   * `ring`: the fast backend (ring for everything but HPKE, which app messages never use)
//!     with the lean storage (the default configuration);
//!   * `rustcrypto`: `openmls_rust_crypto`'s crypto with the lean storage;
//!   * `openmls_rust_crypto`: the stock `openmls_rust_crypto` provider, i.e. its crypto and
//!     `openmls_memory_storage` (JSON on every write): the baseline of the speed goal.
//! * `mls_add_member/<n>`: the moderator of an `n`-member group (0x0002, ring) validates a key
//!   package and builds, stages and merges the add commit and its welcome (ratchet tree
//!   included). Each timed add is followed by an untimed removal of the same member, so the
//!   group stays at `n` members.
//!
//! Tokens are checked at a fixed time; nothing here reads the clock except criterion and
//! openmls's key-package lifetimes.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::SeedableRng as _;
use rand_chacha::ChaCha20Rng;
use slim_core::group::{
    ed25519_public_key, CryptoBackend, GroupConfig, GroupCore, MlsIdentity, MlsSuite, StorageMode,
};
use slim_core::identity::{SharedSecret, SigningKey, TokenError, VerifiedToken};

const SECRET: &str = "bench-shared-secret-0123456789abcdef-0123";
const NOW: u64 = 1_800_000_000;

fn secret() -> SharedSecret {
    SharedSecret::new(SECRET).unwrap()
}

fn identity(suite: MlsSuite, n: u64) -> MlsIdentity {
    let mut rng = ChaCha20Rng::seed_from_u64(n);
    let id = format!("org/ns/member_{n:08}");
    match suite {
        MlsSuite::X25519Aes128 => {
            let mut seed = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rng, &mut seed);
            let token = secret().issue(&id, &ed25519_public_key(&seed).unwrap(), NOW, &mut rng);
            MlsIdentity::ed25519(token, seed).unwrap()
        }
        _ => {
            let key = SigningKey::generate(&mut rng);
            let token = secret().issue(&id, &key.public_key(), NOW, &mut rng);
            MlsIdentity::p256(token, key)
        }
    }
}

fn config(suite: MlsSuite, backend: CryptoBackend, seed: u64) -> GroupConfig {
    let mut s = [0u8; 32];
    s[..8].copy_from_slice(&seed.to_le_bytes());
    GroupConfig {
        suite,
        backend,
        seed: s,
        ..GroupConfig::default()
    }
}

fn verifier() -> impl Fn(&str) -> Result<VerifiedToken, TokenError> {
    let secret = secret();
    move |t: &str| secret.verify(t, NOW)
}

/// A moderator and one joined participant.
fn pair(suite: MlsSuite, backend: CryptoBackend, storage: StorageMode) -> (GroupCore, GroupCore) {
    let cfg = |seed| GroupConfig {
        storage,
        ..config(suite, backend, seed)
    };
    let mut moderator = GroupCore::create(&identity(suite, 1), cfg(1)).unwrap();
    let (mut pending, kp) = GroupCore::key_package(&identity(suite, 2), cfg(2)).unwrap();
    let out = moderator.add_member(&kp, &verifier()).unwrap();
    let participant = pending
        .join(out.welcome.as_ref().unwrap(), out.commit_id, &verifier())
        .unwrap();
    (moderator, participant)
}

fn app_message(c: &mut Criterion) {
    let plaintext = vec![0x5a; 1024];
    let aad = vec![0xa5; 100];
    let mut group = c.benchmark_group("mls_app_1k");
    group.throughput(Throughput::Bytes(1024));
    for suite in [MlsSuite::P256Aes128, MlsSuite::X25519Aes128] {
        for (backend, storage, name) in [
            (CryptoBackend::Ring, StorageMode::Lean, "ring"),
            (CryptoBackend::RustCrypto, StorageMode::Lean, "rustcrypto"),
            (
                CryptoBackend::RustCrypto,
                StorageMode::OpenMlsMemory,
                "openmls_rust_crypto",
            ),
        ] {
            let (mut sender, mut receiver) = pair(suite, backend, storage);
            let suite_name = format!("{:04x}", suite.code());
            group.bench_function(format!("{suite_name}/{name}"), |b| {
                b.iter(|| {
                    let ct = sender.encrypt(black_box(&plaintext), &aad).unwrap();
                    let d = receiver.decrypt(black_box(&ct)).unwrap();
                    black_box(d.plaintext.len())
                })
            });
        }
    }
    group.finish();
}

fn add_member(c: &mut Criterion) {
    let suite = MlsSuite::P256Aes128;
    let backend = CryptoBackend::Ring;
    let mut group = c.benchmark_group("mls_add_member");
    for (size, samples) in [(10u64, 20), (100, 10), (1000, 10)] {
        let mut moderator =
            GroupCore::create(&identity(suite, 1), config(suite, backend, 1)).unwrap();
        let mut next = 1_000u64;
        let key_package = |next: &mut u64| {
            *next += 1;
            GroupCore::key_package(&identity(suite, *next), config(suite, backend, *next))
                .unwrap()
                .1
        };
        for _ in 1..size {
            let kp = key_package(&mut next);
            moderator.add_member(&kp, &verifier()).unwrap();
        }
        assert_eq!(moderator.members().len() as u64, size);
        group.sample_size(samples);
        group.bench_function(format!("{size}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let kp = key_package(&mut next);
                    let start = Instant::now();
                    let out = moderator.add_member(black_box(&kp), &verifier()).unwrap();
                    total += start.elapsed();
                    let leaf = out.added[0].leaf;
                    moderator.remove_leaf(leaf).unwrap();
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = app_message, add_member
}
criterion_main!(benches);
