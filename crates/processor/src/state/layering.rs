//! The folder tree is the layer diagram (see each folder's `mod.rs` and `../shared/DESIGN.md`):
//! checked here by reading the sources, so that a change that imports upward fails the tests.

use std::path::{Path, PathBuf};

/// Each top-level module of `state` and its layer's height: a module may use only modules of
/// its own height or lower.
const LAYERS: [(&str, u8); 19] = [
    ("error", 0),
    ("limits", 0),
    ("ident", 0),
    ("retry", 0),
    ("backend", 0),
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
    ("assembly", 11),
    ("enhanced", 12),
    ("memory", 13),
    ("basic", 13),
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

#[test]
fn the_check_sees_paths_and_ignores_comments() {
    assert_eq!(
        named("use crate::state::ops::store::Store; // crate::state::enhanced"),
        ["ops"]
    );
    assert_eq!(
        named("let x = crate::state::ident::Ident::new(crate::state::Foo);"),
        ["ident", "Foo"]
    );
}
