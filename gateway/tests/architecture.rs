//! The crate's layering, checked: `crate::` edges of `gateway/src` must point
//! down the declared layer order, no two source files may depend on each
//! other (directly or through others), and no source file may be longer than
//! [`MAX_LINES`] lines outside its tests.
//!
//! How edges are read (no `syn`; a small tokenizer is enough for this crate):
//! - test code is skipped: from a line `#[cfg(test)]` at column 0 to the end
//!   of the file;
//! - comments, strings and char literals are blanked first, so a path in a
//!   doc comment or a message is not an edge;
//! - every `use` item is expanded (`use crate::{a, b::{c, d as e}}` gives
//!   `a`, `b::c`, `b::d`), and every other path that starts with `crate::`,
//!   `super::`, `self::` or the name of a child declared with `mod x;` is
//!   read where it stands;
//! - a path maps to the longest prefix that names a source file
//!   (`crate::auth::keys::VerifyKey` is `auth::keys`); `src/x.rs` and
//!   `src/x/mod.rs` are module `x`, `lib.rs` and `main.rs` the root.
//!
//! A `pub use` in a module of one of its own submodules is a re-export (the
//! façade pattern), not a dependency of that module's code: it counts for the
//! layer order but not for cycles. Import an item from the file that defines
//! it, not from a façade, when the façade is your parent: the checker sees
//! the façade's file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The layers, lowest first. A module may use only modules listed before it
/// (and itself); the root (`lib.rs`, `main.rs`) may use anything. The
/// reasons come from `design/architecture-review.md` section 4.
const LAYERS: &[&str] = &[
    // The leaf vocabulary (RoomId, ConnId, Offset, Message): everything
    // speaks it, so it can depend on nothing.
    "model",
    // ErrorCode, ReplyError, CloseReason: error words every layer returns,
    // built only on the vocabulary.
    "error",
    // Metric handles and the recorder: counted from every layer (the TLS
    // reloader, JWKS fetches, limits), so they depend only on error labels.
    // The rendering of per-room series lives with the rooms (rooms::stats).
    "metrics",
    // RFC 6455 framing, TCP and TLS: bytes on a socket, nothing about
    // replies, rooms or protobuf.
    "transport",
    // Typed commands and server messages and their codecs (JSON, protobuf);
    // encodes onto transport frames.
    "protocol",
    // How messages get offsets and reach nodes. It reports what arrives to
    // the rooms and asks them only through its own interface
    // (`broker::events`: RoomEvents, RoomCache), which rooms implements; it
    // never names rooms, so it sits below them (centrifuge's Broker and its
    // event handler).
    "broker",
    // Local membership, the recent log and the sequencer: stores messages
    // already encoded by protocol; implements the broker's interface and
    // uses nothing else of the broker (see NARROW).
    "rooms",
    // JWT verification: a service of the node, using metrics only.
    "auth",
    // Rate limits and admission: a service of the node; uses metrics and
    // room ids.
    "limits",
    // Flags, environment and file into one Config; it builds the services'
    // settings (limits, the auth verifier), so it sits above them and they
    // never read it.
    "config",
    // Orders from the server API to connections on every gateway (the
    // control subjects), the connection registry by user and token
    // revocations: uses the broker's NATS connection and the room index.
    "control",
    // Cluster-wide presence: reads the room index and the connection
    // registry, and the summaries the gateways exchange over NATS.
    "presence",
    // Node owns rooms, broker, verifier, limits, metrics, config: it moved
    // out of the server so conn depends on node, not on http.
    "node",
    // The connection task and its commands: runs on a node.
    "conn",
    // Router, listener, upgrade: hands sockets to conn.
    "http",
];

/// File cycles allowed on purpose, each the exact set of files in it, with
/// the reason. Everything else in one cycle fails.
const ALLOWED_CYCLES: &[(&[&str], &str)] = &[(
    &["protocol", "protocol::json", "protocol::proto"],
    "the two codecs encode the typed messages protocol/mod.rs defines, and \
     its SharedMessage caches a message's frame per codec (made by them); \
     both stay inside `protocol`, below every other layer",
)];

/// Layers that may use a lower layer only through some of its files:
/// (user, used, the files allowed), each with the reason.
const NARROW: &[(&str, &str, &[&str], &str)] = &[(
    "rooms",
    "broker",
    &["broker::events"],
    "the rooms implement the broker's interface and share its vocabulary \
     (Gap, Delivered, Published, Catchup); the buses themselves (embedded, \
     NATS) are the node's business, not the rooms'",
)];

/// Longest non-test part of a source file, in lines.
const MAX_LINES: usize = 800;

#[test]
fn gateway_src_follows_the_layer_order_and_has_no_cycles_or_long_files() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    collect(&src, &src, &mut files);
    assert!(files.len() > 5, "no sources found under {}", src.display());
    let problems = check(&files);
    assert!(
        problems.is_empty(),
        "architecture check of gateway/src failed ({} problems):\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<(String, String)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect(root, &path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path
                .strip_prefix(root)
                .expect("under src")
                .to_string_lossy()
                .replace('\\', "/");
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            out.push((rel, text));
        }
    }
}

/// One `crate::` dependency of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Edge {
    /// The file's module, e.g. `auth::keys` ("" for the root).
    from: String,
    /// The module of the file the path lands in.
    to: String,
    line: usize,
    /// The path as written, e.g. `crate::auth::keys::VerifyKey`.
    path: String,
    /// A `pub use` of one of the file's own submodules (a re-export).
    reexport: bool,
}

/// Every problem found in `files` (paths relative to `src/`, texts).
fn check(files: &[(String, String)]) -> Vec<String> {
    let known: BTreeSet<String> = files.iter().map(|(p, _)| module_of(p)).collect();
    let mut problems = Vec::new();
    let mut edges = Vec::new();
    let mut unknown = BTreeSet::new();
    for (path, text) in files {
        let code = non_test(text);
        let lines = code.lines().count();
        if lines > MAX_LINES {
            problems.push(format!("{path}: {lines} non-test lines (at most {MAX_LINES})"));
        }
        let from = module_of(path);
        if !from.is_empty() && layer(&from).is_none() {
            unknown.insert(top(&from).to_string());
        }
        for e in edges_of(path, text, &known) {
            if let Some(p) = layer_violation(path, &e) {
                problems.push(p);
            }
            if let Some(p) = narrow_violation(path, &e) {
                problems.push(p);
            }
            if !e.to.is_empty() && layer(&e.to).is_none() {
                unknown.insert(top(&e.to).to_string());
            }
            edges.push(e);
        }
    }
    for m in unknown {
        problems.push(format!(
            "module `{m}` is not in the declared layer order (LAYERS in tests/architecture.rs): \
             place it deliberately"
        ));
    }
    problems.extend(cycles(&edges));
    problems
}

/// `auth/keys.rs` -> `auth::keys`; `auth/mod.rs` -> `auth`; `lib.rs` -> "".
fn module_of(path: &str) -> String {
    let p = path.trim_end_matches(".rs");
    let p = p.strip_suffix("/mod").unwrap_or(p);
    if p == "lib" || p == "main" {
        String::new()
    } else {
        p.replace('/', "::")
    }
}

fn top(module: &str) -> &str {
    module.split("::").next().unwrap_or("")
}

/// The layer index of a module; the root is above every layer.
fn layer(module: &str) -> Option<usize> {
    if module.is_empty() {
        return Some(LAYERS.len());
    }
    LAYERS.iter().position(|l| *l == top(module))
}

fn layer_violation(path: &str, e: &Edge) -> Option<String> {
    if e.from.is_empty() || top(&e.from) == top(&e.to) {
        return None;
    }
    let (Some(a), Some(b)) = (layer(&e.from), layer(&e.to)) else {
        return None; // reported as an unknown module
    };
    let to = if e.to.is_empty() {
        "the root (lib.rs)"
    } else {
        top(&e.to)
    };
    (b > a).then(|| {
        format!(
            "{path}:{}: `{}` uses `{to}` (`{}`), which is above it in the layer order",
            e.line,
            top(&e.from),
            e.path
        )
    })
}

/// An edge into a layer that its user may reach only through some files
/// ([`NARROW`]) and that lands elsewhere.
fn narrow_violation(path: &str, e: &Edge) -> Option<String> {
    let (_, used, allowed, _) = NARROW
        .iter()
        .find(|(user, used, _, _)| top(&e.from) == *user && top(&e.to) == *used)?;
    (!allowed.contains(&e.to.as_str())).then(|| {
        format!(
            "{path}:{}: `{}` uses `{}` (`{}`), but may use `{used}` only through {}",
            e.line,
            top(&e.from),
            e.to,
            e.path,
            allowed.join(", ")
        )
    })
}

/// The part of a file before its tests.
fn non_test(text: &str) -> &str {
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        if line.trim_end() == "#[cfg(test)]" {
            return &text[..at];
        }
        at += line.len();
    }
    text
}

/// Comments, strings and char literals replaced by spaces (newlines kept).
fn blank(code: &str) -> String {
    let b: Vec<char> = code.chars().collect();
    let mut out = String::with_capacity(code.len());
    let mut i = 0;
    let keep = |c: char, out: &mut String| out.push(if c == '\n' { '\n' } else { ' ' });
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < b.len() && b[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    keep(b[i], &mut out);
                    i += 1;
                }
            }
        } else if c == 'r' && (next == Some('"') || next == Some('#')) && (i == 0 || !ident(b[i - 1])) {
            // A raw string r"..." or r#"..."#; `r#ident` is a raw identifier.
            let mut j = i + 1;
            while b.get(j) == Some(&'#') {
                j += 1;
            }
            if b.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            let hashes = j - i - 1;
            let mut k = j + 1;
            while k < b.len() && !(b[k] == '"' && (0..hashes).all(|h| b.get(k + 1 + h) == Some(&'#'))) {
                k += 1;
            }
            let end = (k + 1 + hashes).min(b.len());
            for &ch in &b[i..end] {
                keep(ch, &mut out);
            }
            i = end;
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < b.len() && b[i] != '"' {
                if b[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < b.len() {
                    keep(b[i], &mut out);
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
        } else if c == '\'' {
            // A char literal ('x', '\n', '\u{1F600}') or a lifetime ('a).
            let end = if next == Some('\\') {
                (i + 3..b.len()).find(|&k| b[k] == '\'').map(|k| k + 1)
            } else if b.get(i + 2) == Some(&'\'') {
                Some(i + 3)
            } else {
                None
            };
            match end {
                Some(end) => {
                    out.extend(std::iter::repeat_n(' ', end - i));
                    i = end;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    Path, // ::
    Punct(char),
}

fn tokens(code: &str) -> Vec<(Tok, usize)> {
    let b: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line) = (0, 1);
    while i < b.len() {
        let c = b[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c.is_alphabetic() || c == '_' {
            let s = i;
            while i < b.len() && (b[i].is_alphanumeric() || b[i] == '_') {
                i += 1;
            }
            let word: String = b[s..i].iter().collect();
            out.push((Tok::Ident(word.trim_start_matches("r#").to_string()), line));
        } else if c == ':' && b.get(i + 1) == Some(&':') {
            out.push((Tok::Path, line));
            i += 2;
        } else {
            out.push((Tok::Punct(c), line));
            i += 1;
        }
    }
    out
}

fn is_ident(t: Option<&(Tok, usize)>, word: &str) -> bool {
    matches!(t, Some((Tok::Ident(w), _)) if w == word)
}

/// Parses the use tree at `toks[*i..]` into full paths (segment lists).
fn use_tree(toks: &[(Tok, usize)], i: &mut usize, prefix: &[String], out: &mut Vec<Vec<String>>) {
    let mut path = prefix.to_vec();
    loop {
        match toks.get(*i) {
            Some((Tok::Ident(w), _)) => {
                if w != "self" || path.is_empty() {
                    path.push(w.clone());
                }
                *i += 1;
                if toks.get(*i).map(|t| &t.0) == Some(&Tok::Path) {
                    *i += 1;
                    continue;
                }
                if is_ident(toks.get(*i), "as") {
                    *i += 2; // `as name`
                }
                out.push(path);
                return;
            }
            Some((Tok::Punct('{'), _)) => {
                *i += 1;
                while !matches!(toks.get(*i), None | Some((Tok::Punct('}'), _))) {
                    use_tree(toks, i, &path, out);
                    if matches!(toks.get(*i), Some((Tok::Punct(','), _))) {
                        *i += 1;
                    }
                }
                *i += 1;
                return;
            }
            Some((Tok::Punct('*'), _)) => {
                *i += 1;
                out.push(path);
                return;
            }
            _ => {
                out.push(path);
                return;
            }
        }
    }
}

/// Every `crate::` dependency of one file (`path` relative to `src/`).
fn edges_of(path: &str, text: &str, known: &BTreeSet<String>) -> Vec<Edge> {
    let from = module_of(path);
    let toks = tokens(&blank(non_test(text)));
    // Children declared with `mod x;`: `x::y` is then a path into the child.
    let children: BTreeSet<String> = toks
        .windows(3)
        .filter_map(|w| match (&w[0].0, &w[1].0, &w[2].0) {
            (Tok::Ident(m), Tok::Ident(name), Tok::Punct(';')) if m == "mod" => Some(name.clone()),
            _ => None,
        })
        .collect();
    let starts = |w: &str| matches!(w, "crate" | "super" | "self") || children.contains(w);
    let mut found: Vec<(Vec<String>, usize, bool)> = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let prev_is_path = i > 0 && toks[i - 1].0 == Tok::Path;
        match &toks[i].0 {
            Tok::Ident(w) if w == "use" && !prev_is_path => {
                // `pub use`, `pub(crate) use`, `pub(super) use`, ...
                let reexport = is_ident(toks.get(i.wrapping_sub(1)), "pub")
                    || (matches!(toks.get(i.wrapping_sub(1)), Some((Tok::Punct(')'), _)))
                        && (2..=4).any(|k| is_ident(toks.get(i.wrapping_sub(k)), "pub")));
                let line = toks[i].1;
                i += 1;
                let mut paths = Vec::new();
                use_tree(&toks, &mut i, &[], &mut paths);
                for p in paths {
                    if p.first().is_some_and(|s| starts(s)) {
                        found.push((p, line, reexport));
                    }
                }
            }
            Tok::Ident(w) if starts(w) && !prev_is_path && toks.get(i + 1).map(|t| &t.0) == Some(&Tok::Path) => {
                let line = toks[i].1;
                let mut p = vec![w.clone()];
                i += 1;
                while toks.get(i).map(|t| &t.0) == Some(&Tok::Path) {
                    match toks.get(i + 1) {
                        Some((Tok::Ident(s), _)) => {
                            p.push(s.clone());
                            i += 2;
                        }
                        _ => break,
                    }
                }
                found.push((p, line, false));
            }
            _ => i += 1,
        }
    }
    let own: Vec<String> = if from.is_empty() {
        Vec::new()
    } else {
        from.split("::").map(String::from).collect()
    };
    let mut edges = Vec::new();
    for (p, line, pub_use) in found {
        let mut base: Vec<String> = match p[0].as_str() {
            "crate" => Vec::new(),
            "self" => own.clone(),
            "super" => own[..own.len().saturating_sub(1)].to_vec(),
            child => {
                let mut b = own.clone();
                b.push(child.to_string());
                b
            }
        };
        let mut rest = &p[1..];
        while rest.first().is_some_and(|s| s == "super") {
            base.pop();
            rest = &rest[1..];
        }
        base.extend(rest.iter().cloned());
        let to = (0..=base.len())
            .rev()
            .map(|n| base[..n].join("::"))
            .find(|m| m.is_empty() || known.contains(m))
            .unwrap_or_default();
        if to == from {
            continue;
        }
        let reexport = pub_use && (from.is_empty() || to.starts_with(&format!("{from}::")));
        edges.push(Edge {
            from: from.clone(),
            to,
            line,
            path: p.join("::"),
            reexport,
        });
    }
    edges
}

/// Cycles between files (Tarjan's strongly connected components), one
/// problem per cycle, naming one edge of it per file.
fn cycles(edges: &[Edge]) -> Vec<String> {
    let mut graph: BTreeMap<&str, BTreeMap<&str, &Edge>> = BTreeMap::new();
    for e in edges.iter().filter(|e| !e.reexport) {
        graph.entry(&e.from).or_default().entry(&e.to).or_insert(e);
        graph.entry(&e.to).or_default();
    }
    let nodes: Vec<&str> = graph.keys().copied().collect();
    let index_of: BTreeMap<&str, usize> = nodes.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let adj: Vec<Vec<usize>> = nodes
        .iter()
        .map(|n| graph[n].keys().map(|m| index_of[m]).collect())
        .collect();
    let sccs = tarjan(&adj);
    let mut problems = Vec::new();
    for scc in sccs.into_iter().filter(|c| c.len() > 1) {
        let members: BTreeSet<usize> = scc.iter().copied().collect();
        let files: BTreeSet<&str> = members.iter().map(|&n| nodes[n]).collect();
        if ALLOWED_CYCLES
            .iter()
            .any(|(allowed, _)| allowed.iter().copied().collect::<BTreeSet<&str>>() == files)
        {
            continue;
        }
        let mut named: Vec<String> = Vec::new();
        for &n in &members {
            for (to, e) in &graph[nodes[n]] {
                if members.contains(&index_of[to]) {
                    let name = |m: &str| {
                        if m.is_empty() {
                            "(root)".to_string()
                        } else {
                            m.to_string()
                        }
                    };
                    named.push(format!(
                        "{} -> {} (line {}: `{}`)",
                        name(&e.from),
                        name(&e.to),
                        e.line,
                        e.path
                    ));
                }
            }
        }
        problems.push(format!("files depend on each other in a cycle: {}", named.join("; ")));
    }
    problems
}

fn tarjan(adj: &[Vec<usize>]) -> Vec<Vec<usize>> {
    struct State<'a> {
        adj: &'a [Vec<usize>],
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on_stack: Vec<bool>,
        stack: Vec<usize>,
        next: usize,
        out: Vec<Vec<usize>>,
    }
    fn visit(s: &mut State<'_>, v: usize) {
        s.index[v] = Some(s.next);
        s.low[v] = s.next;
        s.next += 1;
        s.stack.push(v);
        s.on_stack[v] = true;
        for &w in &s.adj[v] {
            match s.index[w] {
                None => {
                    visit(s, w);
                    s.low[v] = s.low[v].min(s.low[w]);
                }
                Some(iw) if s.on_stack[w] => s.low[v] = s.low[v].min(iw),
                Some(_) => {}
            }
        }
        if Some(s.low[v]) == s.index[v] {
            let mut scc = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack[w] = false;
                scc.push(w);
                if w == v {
                    break;
                }
            }
            s.out.push(scc);
        }
    }
    let n = adj.len();
    let mut s = State {
        adj,
        index: vec![None; n],
        low: vec![0; n],
        on_stack: vec![false; n],
        stack: Vec::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in 0..n {
        if s.index[v].is_none() {
            visit(&mut s, v);
        }
    }
    s.out
}

// ---- The checker's own tests, on made-up sources. ----

fn files(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter().map(|(p, t)| (p.to_string(), t.to_string())).collect()
}

fn edges(list: &[(&str, &str)], file: &str) -> Vec<(String, usize, bool)> {
    let fs = files(list);
    let known = fs.iter().map(|(p, _)| module_of(p)).collect();
    let text = &fs.iter().find(|(p, _)| p == file).expect("file").1;
    edges_of(file, text, &known)
        .into_iter()
        .map(|e| (e.to, e.line, e.reexport))
        .collect()
}

fn targets(list: &[(&str, &str)], file: &str) -> Vec<String> {
    edges(list, file).into_iter().map(|(to, _, _)| to).collect()
}

#[test]
fn checker_maps_files_to_modules() {
    assert_eq!(module_of("lib.rs"), "");
    assert_eq!(module_of("main.rs"), "");
    assert_eq!(module_of("rooms.rs"), "rooms");
    assert_eq!(module_of("auth/mod.rs"), "auth");
    assert_eq!(module_of("auth/keys.rs"), "auth::keys");
    assert_eq!(module_of("broker/nats/mod.rs"), "broker::nats");
}

#[test]
fn checker_expands_grouped_uses_and_finds_inline_paths() {
    let src = [
        ("lib.rs", ""),
        ("model.rs", ""),
        ("error.rs", ""),
        ("auth/mod.rs", ""),
        ("auth/keys.rs", ""),
        ("metrics.rs", ""),
        (
            "conn.rs",
            "use crate::{model::{RoomId, ConnId as C}, error, auth::{self, keys::*}};\n\
             use std::sync::Arc;\n\
             fn f() {\n    crate::metrics::count();\n    let x = Vec::<crate::model::RoomId>::new();\n}\n",
        ),
    ];
    let got = edges(&src, "conn.rs");
    let want = [
        ("model", 1),
        ("model", 1),
        ("error", 1),
        ("auth", 1),
        ("auth::keys", 1),
        ("metrics", 4),
        ("model", 5),
    ];
    let got: Vec<(&str, usize)> = got.iter().map(|(t, l, _)| (t.as_str(), *l)).collect();
    assert_eq!(got, want);
}

#[test]
fn checker_ignores_comments_strings_chars_and_tests() {
    let src = [
        ("lib.rs", ""),
        ("model.rs", ""),
        ("auth.rs", ""),
        (
            "rooms.rs",
            "//! See [`crate::auth`].\n\
             /* crate::auth::x /* nested crate::auth */ */\n\
             fn f<'a>(s: &'a str) -> char {\n\
             \x20   let _ = \"crate::auth::y \\\" crate::auth\";\n\
             \x20   let _ = r#\"crate::auth \"# ;\n\
             \x20   let _ = '\"'; let _ = '\\'';\n\
             \x20   crate::model::f(); 'x'\n}\n\
             #[cfg(test)]\nmod tests { use crate::auth::Z; }\n",
        ),
    ];
    assert_eq!(edges(&src, "rooms.rs"), vec![("model".to_string(), 7, false)]);
}

#[test]
fn checker_resolves_super_self_and_child_paths() {
    let src = [
        ("lib.rs", "pub mod auth;\npub use auth::Verifier;\n"),
        ("metrics.rs", ""),
        (
            "auth/mod.rs",
            "pub mod keys;\nmod jwks;\npub use self::keys::Key;\nfn f() { jwks::fetch(); keys::b64(); }\n",
        ),
        ("auth/keys.rs", "use super::super::metrics;\nuse super::jwks::Source;\n"),
        ("auth/jwks.rs", "use self::inner::X;\n"),
    ];
    assert_eq!(targets(&src, "auth/keys.rs"), ["metrics", "auth::jwks"]);
    assert_eq!(targets(&src, "auth/mod.rs"), ["auth::keys", "auth::jwks", "auth::keys"]);
    assert_eq!(targets(&src, "lib.rs"), ["auth"]);
    // A path inside the file's own module is no edge.
    assert!(targets(&src, "auth/jwks.rs").is_empty());
    let reexports: Vec<bool> = edges(&src, "auth/mod.rs").iter().map(|e| e.2).collect();
    assert_eq!(reexports, [true, false, false]);
}

#[test]
fn checker_refuses_edges_against_the_order_and_unknown_modules() {
    let ok = files(&[
        ("lib.rs", "use crate::http::serve;\n"),
        ("model.rs", ""),
        ("rooms.rs", "use crate::model::RoomId;\n"),
        ("http.rs", "use crate::{rooms, model};\n"),
    ]);
    assert_eq!(check(&ok), Vec::<String>::new());
    let bad = files(&[
        ("lib.rs", ""),
        ("model.rs", "\n\nuse crate::auth::Identity;\n"),
        ("auth.rs", "fn f() { crate::Running::new(); }\n"),
        ("gadgets.rs", "use crate::model::X;\n"),
    ]);
    let p = check(&bad);
    assert!(
        p.iter()
            .any(|p| p.starts_with("model.rs:3: `model` uses `auth` (`crate::auth::Identity`)")),
        "{p:#?}"
    );
    assert!(
        p.iter()
            .any(|p| p.starts_with("auth.rs:1: `auth` uses `the root (lib.rs)`")),
        "{p:#?}"
    );
    assert!(
        p.iter()
            .any(|p| p.starts_with("module `gadgets` is not in the declared layer order")),
        "{p:#?}"
    );
    assert_eq!(p.len(), 3, "{p:#?}");
}

#[test]
fn checker_keeps_the_broker_below_the_rooms_and_the_rooms_to_its_interface() {
    let src = [
        ("lib.rs", ""),
        ("model.rs", ""),
        ("broker/mod.rs", "pub mod events;\npub mod nats;\n"),
        ("broker/events.rs", "use crate::model::RoomId;\n"),
        ("broker/nats.rs", "use super::events::Rooms;\n"),
        ("rooms/mod.rs", "mod events;\npub use crate::broker::events::Gap;\n"),
        (
            "rooms/events.rs",
            "use crate::broker::events::{RoomEvents, RoomCache};\n",
        ),
    ];
    assert_eq!(check(&files(&src)), Vec::<String>::new());
    let mut bad = src.to_vec();
    bad[4] = (
        "broker/nats.rs",
        "use super::events::Rooms;\nuse crate::rooms::RoomIndex;\n",
    );
    bad[6] = ("rooms/events.rs", "use crate::broker::{Bus, events::RoomEvents};\n");
    let p = check(&files(&bad));
    assert!(
        p.iter()
            .any(|p| p.starts_with("broker/nats.rs:2: `broker` uses `rooms` (`crate::rooms::RoomIndex`)")),
        "{p:#?}"
    );
    assert!(
        p.iter().any(|p| p.starts_with(
            "rooms/events.rs:1: `rooms` uses `broker` (`crate::broker::Bus`), but may use `broker` only through broker::events"
        )),
        "{p:#?}"
    );
    assert_eq!(p.len(), 2, "{p:#?}");
}

/// The broker reports to the rooms through its own interface and never
/// names them (issue 11), whatever the layer order says.
#[test]
fn the_broker_never_names_the_rooms() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    collect(&src, &src, &mut all);
    let known = all.iter().map(|(p, _)| module_of(p)).collect();
    let into_rooms: Vec<String> = all
        .iter()
        .filter(|(p, _)| p.starts_with("broker/"))
        .flat_map(|(p, t)| edges_of(p, t, &known).into_iter().map(move |e| (p.clone(), e)))
        .filter(|(_, e)| top(&e.to) == "rooms")
        .map(|(p, e)| format!("{p}:{}: {}", e.line, e.path))
        .collect();
    assert!(into_rooms.is_empty(), "the broker uses the rooms: {into_rooms:#?}");
}

#[test]
fn checker_finds_cycles_between_files_but_not_reexports() {
    // Siblings using each other: a cycle, though both are in `auth`.
    let sibling = files(&[
        ("lib.rs", ""),
        ("auth/mod.rs", "mod keys;\nmod jwks;\n"),
        ("auth/keys.rs", "use crate::auth::jwks::Source;\n"),
        ("auth/jwks.rs", "use super::keys::Key;\n"),
    ]);
    let p = check(&sibling);
    assert_eq!(p.len(), 1, "{p:#?}");
    assert!(
        p[0].contains("auth::jwks -> auth::keys") && p[0].contains("auth::keys -> auth::jwks"),
        "{p:#?}"
    );
    // A façade re-exporting a child the child that uses it: not a cycle.
    let facade = files(&[
        ("lib.rs", ""),
        (
            "config/mod.rs",
            "mod opts;\npub use crate::config::opts::Opts;\npub struct ConfigError;\n",
        ),
        ("config/opts.rs", "use crate::config::ConfigError;\n"),
    ]);
    assert_eq!(check(&facade), Vec::<String>::new());
    // The parent's code using the child that uses the parent: a cycle.
    let mutual = files(&[
        ("lib.rs", ""),
        (
            "config/mod.rs",
            "mod opts;\nuse crate::config::opts::Opts;\npub struct ConfigError;\n",
        ),
        ("config/opts.rs", "use crate::config::ConfigError;\n"),
    ]);
    assert_eq!(check(&mutual).len(), 1);
    // Across three top-level files in one layer-order-respecting chain, no cycle.
    let chain = files(&[
        ("lib.rs", ""),
        ("model.rs", ""),
        ("error.rs", "use crate::model::A;\n"),
        ("rooms.rs", "use crate::{error::B, model::A};\n"),
    ]);
    assert_eq!(check(&chain), Vec::<String>::new());
}

#[test]
fn checker_counts_non_test_lines() {
    let long = "fn f() {}\n".repeat(MAX_LINES + 1);
    let with_tests = format!(
        "{}#[cfg(test)]\n{}",
        "fn f() {}\n".repeat(MAX_LINES),
        "fn t() {}\n".repeat(500)
    );
    let p = check(&files(&[
        ("lib.rs", ""),
        ("model.rs", &long),
        ("error.rs", &with_tests),
    ]));
    assert_eq!(
        p,
        vec![format!(
            "model.rs: {} non-test lines (at most {MAX_LINES})",
            MAX_LINES + 1
        )]
    );
}
