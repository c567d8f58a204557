//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the fuzz entry points on
//! stable, so every `cargo test` re-checks what the fuzzer once found interesting (the Firezone
//! pattern: CI replays, exploration happens with `cargo fuzz run`, see BENCHMARKS.md and the
//! README's fuzzing section).
//!
//! Only the files directly in `fuzz/corpus/<target>/` are replayed. Inputs that still crash a
//! target because of an open bug live in `fuzz/known-crashes/<target>/` (outside the corpus, so
//! neither this test nor `cargo fuzz run` trips over them); `known_crashes_still_crash` (ignored)
//! tells when one of them has been fixed.

use std::path::PathBuf;

/// A fuzz entry point.
type Target = fn(&[u8]);

fn replay(target: &str, run: Target) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus directory {} is missing: {e}", dir.display()))
        .map(|entry| entry.expect("readable corpus entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "corpus directory {} is empty",
        dir.display()
    );
    for path in &files {
        let data = std::fs::read(path).expect("readable corpus file");
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(
            outcome.is_ok(),
            "fuzz target {target} panicked on {}",
            path.display()
        );
    }
    eprintln!("{target}: replayed {} corpus files", files.len());
}

#[test]
fn frames_corpus() {
    replay("frames", slim_core::fuzzing::frames);
}

#[test]
fn names_corpus() {
    replay("names", slim_core::fuzzing::names);
}

#[test]
fn router_corpus() {
    replay("router", slim_core::fuzzing::router);
}

#[test]
fn identity_corpus() {
    replay("identity", slim_core::fuzzing::identity);
}

#[test]
fn session_payloads_corpus() {
    replay("session_payloads", slim_core::fuzzing::session_payloads);
}

#[test]
fn session_layer_corpus() {
    replay("session_layer", slim_core::fuzzing::session_layer);
}

#[test]
fn session_sim_corpus() {
    replay("session_sim", slim_core::fuzzing::session_sim);
}

/// The open bugs' inputs (`fuzz/known-crashes/<target>/*`, described in the `README.md` there)
/// must still fail the target (or a strict variant of it, which judges findings the target
/// tolerates, when there is one); once one does not, its bug is fixed: tighten the target and
/// move the input to the corpus.
#[test]
#[ignore = "reproduces open bugs: run with --ignored to see which are fixed"]
fn known_crashes_still_crash() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/known-crashes");
    let targets: [(&str, Target); 7] = [
        ("frames", slim_core::fuzzing::frames),
        ("names", slim_core::fuzzing::names),
        ("router", slim_core::fuzzing::router),
        ("identity", slim_core::fuzzing::identity),
        ("session_payloads", slim_core::fuzzing::session_payloads),
        ("session_layer", slim_core::fuzzing::session_layer),
        ("session_sim", slim_core::fuzzing::session_sim),
    ];
    let mut fixed = Vec::new();
    for (target, run) in targets {
        let Ok(entries) = std::fs::read_dir(root.join(target)) else {
            continue;
        };
        let mut files: Vec<PathBuf> = entries
            .map(|entry| entry.expect("readable entry").path())
            .filter(|path| path.is_file() && path.extension().is_none())
            .collect();
        files.sort();
        for path in files {
            let data = std::fs::read(&path).expect("readable file");
            if std::panic::catch_unwind(|| run(&data)).is_ok() {
                fixed.push(path.display().to_string());
            }
        }
    }
    assert!(fixed.is_empty(), "no longer crash (fixed?): {fixed:#?}");
}
