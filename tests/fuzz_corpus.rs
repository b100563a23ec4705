//! Replays the fuzz corpus on the stable toolchain: every file under `fuzz/corpus/<target>/`
//! goes through the same harness (`pgcorral::fuzzing::<target>`) the fuzz target calls, so the
//! committed seeds (`seed-*`, saved crash inputs among them) keep being checked without nightly
//! or cargo-fuzz. Inputs a local fuzzing run added are replayed too: they are not committed,
//! and a change that makes one of them fail is a bug all the same. Also checks
//! that `fuzz/` and `pgcorral::fuzzing::TARGETS` agree, so a new target cannot be left out of
//! either. Needs no PostgreSQL.

use std::fs;
use std::path::{Path, PathBuf};

use pgcorral::fuzzing::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_corpus_file_goes_through_its_harness() {
    for (name, harness) in TARGETS {
        let dir = fuzz_dir().join("corpus").join(name);
        let files = files_in(&dir);
        let seeds =
            files.iter().filter(|f| f.file_name().unwrap().to_string_lossy().starts_with("seed-")).count();
        assert!(seeds >= 3, "{name}: only {seeds} seed-* inputs in {}", dir.display());
        for file in files {
            // Named in the panic message of whichever input fails.
            eprintln!("replaying {}", file.display());
            harness(&fs::read(&file).unwrap());
        }
    }
}

#[test]
fn fuzz_crate_and_harnesses_agree() {
    let cargo_toml = fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
    for (name, _) in TARGETS {
        let source = fs::read_to_string(fuzz_dir().join("fuzz_targets").join(format!("{name}.rs")))
            .unwrap_or_else(|e| panic!("fuzz target {name}: {e}"));
        assert!(
            source.contains(&format!("pgcorral::fuzzing::{name}(data)")),
            "{name}.rs calls another harness"
        );
        assert!(
            cargo_toml.contains(&format!("name = \"{name}\"")),
            "{name} is not a [[bin]] of fuzz/Cargo.toml"
        );
    }
    for dir in [fuzz_dir().join("corpus"), fuzz_dir().join("fuzz_targets")] {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
            assert!(TARGETS.iter().any(|(name, _)| *name == stem), "{} is no target", path.display());
        }
    }
}
