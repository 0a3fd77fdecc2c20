//! The folder tree is the layer diagram (see each folder's `mod.rs` and `../shared/DESIGN.md`):
//! checked here by reading the sources, so that a change that imports upward fails the tests.

use std::path::{Path, PathBuf};

/// Each top-level module of `state` and its layer's height: a module may use only modules of
/// its own height or lower.
const LAYERS: [(&str, u8); 22] = [
    ("error", 0),
    ("limits", 0),
    ("ident", 0),
    ("retry", 0),
    ("backend", 0),
    ("distributed_lock", 0),
    ("stats", 1),
    ("config", 2),
    ("schema", 3),
    ("wire", 4),
    ("pool", 5),
    ("routing", 6),
    ("ops", 7),
    ("transaction", 8),
    ("coordination", 9),
    ("maintenance", 10),
    ("exactly_once", 10),
    ("assembly", 11),
    ("enhanced", 12),
    ("memory", 13),
    ("basic", 13),
    ("postgres_lock", 13),
];

fn height(module: &str) -> Option<u8> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, h)| *h)
}

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

/// The `crate::state::` paths `line` names outside comments: the module (or re-exported
/// item) right after the prefix.
fn named(line: &str) -> Vec<&str> {
    let code = line.split("//").next().unwrap_or("");
    let mut names = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::state::") {
        rest = &rest[at + "crate::state::".len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        names.push(&rest[..end]);
    }
    names
}

#[test]
fn nothing_imports_upward() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/state");
    let mut files = Vec::new();
    sources(&root, &mut files);
    let mut upward = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&root).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_str()
            .unwrap();
        let module = first.trim_end_matches(".rs");
        // (This file names the prefix in its own code.)
        if module == "mod" || module == "layering" {
            continue;
        }
        let own = height(module)
            .unwrap_or_else(|| panic!("{} is in no layer: add it to LAYERS", rel.display()));
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in text.lines().enumerate() {
            // Unit tests below this may use anything.
            if line.trim_start().starts_with("#[cfg(test)]") {
                break;
            }
            for name in named(line) {
                let target = if name.starts_with(|c: char| c.is_ascii_uppercase()) {
                    // A re-export of the crate root hides where it comes from: only the
                    // facade may use those.
                    (module != "enhanced").then(|| format!("the root's {name}"))
                } else {
                    match height(name) {
                        Some(h) if h > own => Some(name.to_string()),
                        Some(_) => None,
                        None => panic!("{}:{}: unknown module {name}", rel.display(), n + 1),
                    }
                };
                if let Some(target) = target {
                    upward.push(format!(
                        "{}:{}: {module} uses {target}",
                        rel.display(),
                        n + 1
                    ));
                }
            }
        }
    }
    assert!(files.len() > 50, "the sources were found");
    assert!(
        upward.is_empty(),
        "imports that run upward:\n{}",
        upward.join("\n")
    );
}

/// The module a source file is, as a path below `state` (`pool::conn_pool`; a folder's
/// `mod.rs` is the folder).
fn module_path(root: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(root).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_str().unwrap().to_string())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts.join("::")
}

/// The modules `line` imports: the longest known module of each `crate::state::` path, and
/// siblings named through `super::`. (A folder's `mod.rs` declaring and re-exporting its
/// children is structure, not an import.)
fn imports(line: &str, own: &str, known: &[String]) -> Vec<String> {
    let code = line.split("//").next().unwrap_or("");
    let mut found = Vec::new();
    let mut paths: Vec<String> = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::state::") {
        rest = &rest[at + "crate::state::".len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        paths.push(rest[..end].trim_end_matches(':').to_string());
    }
    let parent = own.rsplit_once("::").map_or("", |(p, _)| p);
    let mut rest = code;
    while let Some(at) = rest.find("super::") {
        rest = &rest[at + "super::".len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        let tail = rest[..end].trim_end_matches(':');
        paths.push(if parent.is_empty() {
            tail.to_string()
        } else {
            format!("{parent}::{tail}")
        });
    }
    for path in paths {
        let parts: Vec<&str> = path.split("::").collect();
        let module = (1..=parts.len())
            .rev()
            .map(|k| parts[..k].join("::"))
            .find(|m| known.contains(m));
        if let Some(m) = module.filter(|m| m != own) {
            found.push(m);
        }
    }
    found
}

#[test]
fn no_modules_import_each_other_in_a_circle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/state");
    let mut files = Vec::new();
    sources(&root, &mut files);
    let known: Vec<String> = files.iter().map(|f| module_path(&root, f)).collect();
    let mut edges: Vec<Vec<usize>> = vec![Vec::new(); files.len()];
    for (i, file) in files.iter().enumerate() {
        let text = std::fs::read_to_string(file).unwrap();
        for line in text.lines() {
            if line.trim_start().starts_with("#[cfg(test)]") {
                break;
            }
            for m in imports(line, &known[i], &known) {
                let j = known.iter().position(|k| *k == m).unwrap();
                if !edges[i].contains(&j) {
                    edges[i].push(j);
                }
            }
        }
    }
    // Depth-first search; a module met again while still on the path closes a circle.
    fn visit(
        v: usize,
        edges: &[Vec<usize>],
        state: &mut [u8],
        path: &mut Vec<usize>,
    ) -> Option<Vec<usize>> {
        state[v] = 1;
        path.push(v);
        for &w in &edges[v] {
            if state[w] == 1 {
                let from = path.iter().position(|&p| p == w).unwrap();
                return Some(path[from..].to_vec());
            }
            if state[w] == 0 {
                if let Some(circle) = visit(w, edges, state, path) {
                    return Some(circle);
                }
            }
        }
        path.pop();
        state[v] = 2;
        None
    }
    let mut state = vec![0u8; files.len()];
    for v in 0..files.len() {
        if state[v] == 0 {
            if let Some(circle) = visit(v, &edges, &mut state, &mut Vec::new()) {
                let names: Vec<&str> = circle.iter().map(|&i| known[i].as_str()).collect();
                panic!(
                    "modules importing each other in a circle: {}",
                    names.join(" -> ")
                );
            }
        }
    }
    assert!(
        edges.iter().map(Vec::len).sum::<usize>() > 100,
        "the imports were found"
    );
}

#[test]
fn the_check_sees_paths_and_ignores_comments() {
    let known = [
        "pool".to_string(),
        "pool::conn_pool".to_string(),
        "pool::turns".to_string(),
    ];
    assert_eq!(
        imports(
            "use crate::state::pool::conn_pool::{Use, X}; // crate::state::pool::turns",
            "ops::store",
            &known
        ),
        ["pool::conn_pool"]
    );
    assert_eq!(
        imports("use super::turns::Turn;", "pool::conn_pool", &known),
        ["pool::turns"]
    );
    assert_eq!(
        named("use crate::state::ops::store::Store; // crate::state::enhanced"),
        ["ops"]
    );
    assert_eq!(
        named("let x = crate::state::ident::Ident::new(crate::state::Foo);"),
        ["ident", "Foo"]
    );
}
