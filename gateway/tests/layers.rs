//! The layer rule of docs/architecture.md, checked: a module of `src/` never
//! names a module of a layer above its own (as ArchUnit's layer rules do).

use std::path::{Path, PathBuf};

/// Top-level modules of the library, lowest layer first. A module may name
/// modules of lower layers only; modules of one layer do not name each other.
const LAYERS: &[&[&str]] = &[
    &["http", "xdp", "telemetry"],
    &["config"],
    &["tls", "store", "control"],
    &["policy"],
    &["gatekeeper"],
    &["runtime"],
    &["proxy"],
    &["supervisor"],
];

/// Files of the binary: it sits above every layer.
const BINARY: &[&str] = &["main.rs", "commands.rs"];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every `crate::NAME` a line of code names (comments left out).
fn named_modules(line: &str) -> Vec<String> {
    let code = line.trim_start();
    if code.starts_with("//") {
        return Vec::new();
    }
    let code = code.split(" //").next().unwrap_or(code);
    code.match_indices("crate::")
        .filter(|(at, _)| {
            // `portcullis::crate::` never occurs; `$crate::` and `super::crate` do not either.
            !code[..*at].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == '$')
        })
        .map(|(at, m)| {
            code[at + m.len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

/// `(file:line, from, to)` for every import against the layer order in `src`.
fn violations(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    sources(src, &mut files);
    let mut out = Vec::new();
    for file in files {
        let rel = file.strip_prefix(src).expect("under src");
        let rel_text = rel.to_string_lossy();
        if rel_text == "lib.rs" || BINARY.contains(&rel_text.as_ref()) {
            continue;
        }
        let module = rel
            .components()
            .next()
            .map(|c| c.as_os_str().to_string_lossy().trim_end_matches(".rs").to_owned())
            .expect("a first component");
        let Some(own) = layer_of(&module) else {
            out.push(format!(
                "{rel_text}: module `{module}` has no layer; add it to LAYERS in tests/layers.rs and docs/architecture.md"
            ));
            continue;
        };
        let text = std::fs::read_to_string(&file).expect("readable source");
        for (n, line) in text.lines().enumerate() {
            for target in named_modules(line) {
                if target == module {
                    continue;
                }
                if target.is_empty() {
                    out.push(format!(
                        "{rel_text}:{}: a grouped `crate::{{…}}` import; write one `use crate::module::…` per module so the layers can be read",
                        n + 1
                    ));
                    continue;
                }
                match layer_of(&target) {
                    Some(layer) if layer < own => {}
                    _ => out.push(format!(
                        "{rel_text}:{}: `{module}` names `crate::{target}`, which is not in a lower layer",
                        n + 1
                    )),
                }
            }
        }
    }
    out
}

#[test]
fn no_module_names_a_layer_above_its_own() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let found = violations(&src);
    assert!(
        found.is_empty(),
        "imports against the layer order:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_rule_catches_an_upward_import() {
    let dir = std::env::temp_dir().join(format!("portcullis-layers-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("policy")).expect("made");
    std::fs::write(
        dir.join("policy/mod.rs"),
        "use crate::proxy::Worker;\n// crate::runtime in a comment\n",
    )
    .expect("written");
    std::fs::write(
        dir.join("http.rs"),
        "use crate::config::Config;\nuse crate::{xdp, telemetry};\n",
    )
    .expect("written");
    std::fs::write(dir.join("mystery.rs"), "\n").expect("written");
    let mut found = violations(&dir);
    found.sort();
    std::fs::remove_dir_all(&dir).expect("removed");
    assert_eq!(
        found,
        [
            "http.rs:1: `http` names `crate::config`, which is not in a lower layer",
            "http.rs:2: a grouped `crate::{…}` import; write one `use crate::module::…` per module so the layers can be read",
            "mystery.rs: module `mystery` has no layer; add it to LAYERS in tests/layers.rs and docs/architecture.md",
            "policy/mod.rs:1: `policy` names `crate::proxy`, which is not in a lower layer",
        ]
    );
}
