//! `docs/conformance.md` cannot cite a test that does not exist: every row
//! names at least one `file::test` found in that file, or says why the
//! requirement does not apply (`n/a`) or where it is proven (`see`).

use std::path::Path;

/// The `path::name` references in a table cell.
fn references(cell: &str) -> Vec<(&str, &str)> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .filter_map(|code| code.split_once(".rs::"))
        .collect()
}

#[test]
fn every_requirement_names_a_test_that_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let doc = std::fs::read_to_string(root.join("docs/conformance.md")).expect("docs/conformance.md");
    let mut rows = 0;
    let mut problems = Vec::new();
    for (n, line) in doc.lines().enumerate() {
        let cells: Vec<&str> = line.split(" | ").collect();
        if !line.starts_with("| ") || cells.len() < 4 || line.starts_with("| §") || line.starts_with("| ---")
        {
            continue;
        }
        rows += 1;
        let proof = cells[cells.len() - 1].trim_end_matches(" |").trim();
        let refs = references(proof);
        if refs.is_empty() && !proof.starts_with("n/a") && !proof.starts_with("see ") {
            problems.push(format!("line {}: no test and no reason: {proof}", n + 1));
        }
        for (file, name) in refs {
            let path = root.join(format!("{file}.rs"));
            match std::fs::read_to_string(&path) {
                Ok(text) if text.contains(&format!("fn {name}(")) => {}
                Ok(_) => problems.push(format!("line {}: no fn {name} in {file}.rs", n + 1)),
                Err(e) => problems.push(format!("line {}: {}: {e}", n + 1, path.display())),
            }
        }
    }
    assert!(
        rows >= 80,
        "only {rows} requirement rows read: is the table still there?"
    );
    assert!(problems.is_empty(), "{problems:#?}");
}
