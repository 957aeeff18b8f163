//! Every task the node starts goes through its trackers (`Node::tracker`,
//! `Node::services`, the broker's `NatsBus::spawn`): this test reads the
//! non-test code of `gateway/src` and fails on a bare `tokio::spawn` (or
//! `spawn_blocking`, `thread::spawn`) that is not in the list below with its
//! reason. `tests/shutdown.rs` shows the other half: after shutdown no task
//! is left.

use std::path::{Path, PathBuf};

/// Spawns outside the trackers, per file, with why they are allowed.
const ALLOWED: &[(&str, usize, &str)] = &[
    // `Running::start`: the serve task itself, which the caller awaits in
    // `Running::shutdown`.
    ("lib.rs", 1, "the serve task, awaited by Running::shutdown"),
];

const SPAWNS: &[&str] = &["tokio::spawn(", "task::spawn(", "spawn_blocking(", "thread::spawn("];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The file without its unit tests (the `#[cfg(test)] mod tests` at the end).
fn non_test(text: &str) -> &str {
    let mut at = text.len();
    let mut search = 0;
    while let Some(i) = text[search..].find("#[cfg(test)]") {
        let i = search + i;
        if text[i..]
            .trim_start_matches("#[cfg(test)]")
            .trim_start()
            .starts_with("mod ")
        {
            at = i;
            break;
        }
        search = i + 1;
    }
    &text[..at]
}

#[test]
fn every_spawn_of_the_gateway_goes_through_a_tracker() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut wrong = Vec::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap().to_string_lossy().replace('\\', "/");
        if rel == "main.rs" {
            // The binary: it runs its own tasks on the node (`spawn_service`).
            let text = std::fs::read_to_string(&file).unwrap();
            assert!(
                !SPAWNS.iter().any(|s| non_test(&text).contains(s)),
                "main.rs spawns outside the node"
            );
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let code = non_test(&text);
        let found: usize = SPAWNS.iter().map(|s| code.matches(s).count()).sum();
        let allowed = ALLOWED.iter().find(|(f, ..)| *f == rel).map_or(0, |(_, n, _)| *n);
        if found != allowed {
            wrong.push(format!("{rel}: {found} untracked spawns, {allowed} allowed"));
        }
    }
    assert!(
        wrong.is_empty(),
        "spawn on the node's trackers (or update ALLOWED with the reason):\n{}",
        wrong.join("\n")
    );
}
