use std::path::PathBuf;

use super::*;

/// `fuzz/corpus/<target>/`.
fn corpus(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

/// Every input of every target's corpus goes through the target again (they panic on a
/// broken invariant). Each corpus has inputs: an empty or missing one fails.
#[test]
fn the_fuzz_corpus_replays() {
    for (name, target) in TARGETS {
        let dir = corpus(name);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let mut n = 0;
        for entry in entries {
            let path = entry.expect("a corpus entry").path();
            let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let outcome = std::panic::catch_unwind(|| target(&data));
            assert!(
                outcome.is_ok(),
                "{name}: {} broke an invariant",
                path.display()
            );
            n += 1;
        }
        assert!(n > 0, "{name}: no corpus in {}", dir.display());
    }
}

/// The seeds exercise what they are for: each decodes (the targets do not say whether an
/// input parsed, so this checks the seeds' validity directly).
#[test]
fn the_seeds_are_valid_inputs() {
    let seed = |target: &str, name: &str| {
        std::fs::read(corpus(target).join(name)).unwrap_or_else(|e| panic!("{target}/{name}: {e}"))
    };
    let text = String::from_utf8(seed("config", "seed-standalone.yaml")).unwrap();
    crate::config::Config::parse(&text, "seed").expect("the config seed loads");
    let key = gossip::wire::Key::new(Some(b"fuzz-key"));
    gossip::decode(&key, &seed("gossip", "seed-heartbeat")).expect("the gossip seed opens");
    bfd::Packet::decode(&seed("bfd", "seed-up")).expect("the BFD seed decodes");
    assert_eq!(
        crate::health::probe::http_status(&seed("http_probe", "seed-200")).ok(),
        Some(Some(200))
    );
    let d = k8s::example();
    assert!(!d.services.is_empty(), "{d:?}");
}
