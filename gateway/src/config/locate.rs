//! Maps a field path inside each YAML document to the line it is written on.
//!
//! serde reports where a *syntax or type* error is; semantic checks (an
//! address that does not parse, a service nobody defines) run on typed values
//! and use this index to point at the same file and line.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// Positions (1-based line and column) of every mapping key and sequence item, per document.
#[derive(Debug, Default)]
pub struct LineIndex {
    docs: Vec<HashMap<String, (usize, usize)>>,
    syntax_ok: bool,
}

enum Frame {
    Map { path: String, key: Option<String> },
    Seq { path: String, next: usize },
}

#[derive(Default)]
struct Builder {
    index: LineIndex,
    stack: Vec<Frame>,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

impl Builder {
    /// Path of the node that starts now, recording its line.
    fn enter(&mut self, line: (usize, usize)) -> String {
        let path = match self.stack.last_mut() {
            Some(Frame::Map { path, key }) => join(path, &key.take().unwrap_or_default()),
            Some(Frame::Seq { path, next }) => {
                let p = format!("{path}[{next}]");
                *next += 1;
                p
            }
            None => String::new(),
        };
        if let Some(doc) = self.index.docs.last_mut() {
            doc.entry(path.clone()).or_insert(line);
        }
        path
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let line = (mark.line(), mark.col() + 1);
        match ev {
            Event::DocumentStart => {
                self.index.docs.push(HashMap::new());
                self.stack.clear();
            }
            Event::MappingStart(..) => {
                let path = self.enter(line);
                self.stack.push(Frame::Map { path, key: None });
            }
            Event::SequenceStart(..) => {
                let path = self.enter(line);
                self.stack.push(Frame::Seq { path, next: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            Event::Scalar(value, ..) => {
                if let Some(Frame::Map { path, key }) = self.stack.last_mut()
                    && key.is_none()
                {
                    let full = join(path, &value);
                    if let Some(doc) = self.index.docs.last_mut() {
                        doc.entry(full).or_insert(line);
                    }
                    *key = Some(value);
                    return;
                }
                self.enter(line);
            }
            Event::Alias(_) => {
                self.enter(line);
            }
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
        }
    }
}

impl LineIndex {
    /// Indexes `text`; a syntax error leaves the index partial (serde reports it).
    pub fn build(text: &str) -> Self {
        let mut builder = Builder::default();
        let mut parser = Parser::new_from_str(text);
        builder.index.syntax_ok = parser.load(&mut builder, true).is_ok();
        builder.index
    }

    /// Documents seen (all of them when the text parses).
    pub fn documents(&self) -> usize {
        self.docs.len()
    }

    /// Whether the whole text is well-formed YAML.
    pub fn syntax_ok(&self) -> bool {
        self.syntax_ok
    }

    /// Line of `path` in document `doc`, or of its nearest indexed parent.
    pub fn line(&self, doc: usize, path: &str) -> usize {
        self.position(doc, path).0
    }

    /// Line and column of `path` in document `doc`, or of its nearest indexed parent.
    pub fn position(&self, doc: usize, path: &str) -> (usize, usize) {
        let Some(map) = self.docs.get(doc) else {
            return (1, 1);
        };
        let mut probe = path.to_string();
        loop {
            if let Some(line) = map.get(&probe) {
                return *line;
            }
            match probe.rfind(['.', '[']) {
                Some(i) => probe.truncate(i),
                None => return map.get("").copied().unwrap_or((1, 1)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_keys_and_items_in_each_document() {
        let text = "a: 1\nb:\n  c: x\n  d:\n    - p\n    - q: 2\n---\nkind: K\nspec:\n  e: 1\n";
        let index = LineIndex::build(text);
        assert_eq!(index.line(0, "a"), 1);
        assert_eq!(index.line(0, "b.c"), 3);
        assert_eq!(index.line(0, "b.d[1].q"), 6);
        assert_eq!(index.line(0, "b.d[0]"), 5);
        assert_eq!(index.line(1, "spec.e"), 10);
        assert_eq!(index.line(1, "spec.missing"), 9);
    }
}
