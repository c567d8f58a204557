//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the fuzz entry points on
//! stable, so every `cargo test` re-checks what the fuzzer once found interesting (the Firezone
//! pattern: CI replays, exploration happens with `cargo fuzz run`, see BENCHMARKS.md).

use std::path::PathBuf;

fn replay(target: &str, run: fn(&[u8])) {
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
