//! Where each key of a YAML document is, for error messages.
//!
//! serde_norway's `Value` carries no positions, and Compose files are
//! overwhelmingly block-style YAML, so a light scan of the source by
//! indentation maps each key path (`services.web.deploy.replicas`, with
//! `[i]` for list items) to its line and column. Adding a YAML parser that
//! exposes marks (saphyr, yaml-rust2) would mean parsing twice with two
//! parsers that may disagree; the scan costs nothing and a key it cannot
//! place (flow style `{a: 1}`, multi-line quoted keys) only loses its line
//! number in the message, never the error itself.

use std::collections::HashMap;
use std::fmt;

/// A 1-based line and column in the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    /// Line, 0 when unknown.
    pub line: usize,
    /// Column, 0 when unknown.
    pub column: usize,
}

impl fmt::Display for Pos {
    /// Prints `line L, column C: ` or nothing when unknown, so that messages
    /// can put it first.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            Ok(())
        } else {
            write!(f, "line {}, column {}: ", self.line, self.column)
        }
    }
}

/// Key paths to positions.
#[derive(Debug, Clone, Default)]
pub struct Positions {
    keys: HashMap<String, Pos>,
}

struct Frame {
    indent: usize,
    path: String,
    /// A list item rather than a mapping key.
    item: bool,
}

impl Positions {
    /// Scans `source`.
    pub fn scan(source: &str) -> Self {
        let mut keys = HashMap::new();
        let mut stack: Vec<Frame> = Vec::new();
        let mut items: HashMap<String, usize> = HashMap::new();
        // Lines more indented than this belong to a block scalar (`|`, `>`).
        let mut block_scalar: Option<usize> = None;
        for (index, raw) in source.lines().enumerate() {
            let line = index + 1;
            let indent = raw.len() - raw.trim_start_matches(' ').len();
            let content = raw[indent..].trim_end();
            if let Some(limit) = block_scalar {
                if content.is_empty() || indent > limit {
                    continue;
                }
                block_scalar = None;
            }
            if content.is_empty()
                || content.starts_with('#')
                || content == "---"
                || content == "..."
            {
                continue;
            }
            let mut column = indent;
            let mut rest = content;
            // Each `- ` opens a list item; `- - x` nests.
            while rest == "-" || rest.starts_with("- ") {
                while stack
                    .last()
                    .is_some_and(|f| f.indent > column || (f.indent == column && f.item))
                {
                    stack.pop();
                }
                let parent = stack.last().map(|f| f.path.clone()).unwrap_or_default();
                let counter = items.entry(parent.clone()).or_insert(0);
                let path = format!("{parent}[{counter}]");
                *counter += 1;
                keys.insert(
                    path.clone(),
                    Pos {
                        line,
                        column: column + 1,
                    },
                );
                stack.push(Frame {
                    indent: column,
                    path,
                    item: true,
                });
                let after = rest[1..].trim_start_matches(' ');
                column += rest.len() - after.len();
                rest = after;
            }
            let Some((key, value)) = split_key(rest) else {
                if rest.starts_with(['|', '>']) {
                    block_scalar = Some(indent);
                }
                continue;
            };
            while stack.last().is_some_and(|f| f.indent >= column) {
                stack.pop();
            }
            let path = match stack.last() {
                Some(f) => format!("{}.{key}", f.path),
                None => key.to_string(),
            };
            keys.entry(path.clone()).or_insert(Pos {
                line,
                column: column + 1,
            });
            if value.starts_with('|') || value.starts_with('>') {
                block_scalar = Some(indent);
            }
            stack.push(Frame {
                indent: column,
                path,
                item: false,
            });
        }
        Self { keys }
    }

    /// The position of a key path, or of its nearest known ancestor (a value
    /// in a flow collection is reported at the key holding it).
    pub fn get(&self, path: &str) -> Pos {
        let mut path = path;
        loop {
            if let Some(pos) = self.keys.get(path) {
                return *pos;
            }
            match path.rfind(['.', '[']) {
                Some(at) => path = &path[..at],
                None => return Pos::default(),
            }
        }
    }
}

/// Splits `key: value` (or `key:`) into the unquoted key and the value text.
fn split_key(content: &str) -> Option<(String, &str)> {
    if let Some(quote) = content.chars().next().filter(|c| *c == '"' || *c == '\'') {
        let body = &content[1..];
        let end = body.find(quote)?;
        let after = body[end + 1..].trim_start();
        let value = after.strip_prefix(':')?;
        if !(value.is_empty() || value.starts_with(' ')) {
            return None;
        }
        return Some((body[..end].to_string(), value.trim_start()));
    }
    if content.starts_with(['{', '[', '&', '*', '!', '|', '>']) {
        return None;
    }
    let bytes = content.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b':' && (i + 1 == bytes.len() || bytes[i + 1] == b' ') {
            let key = content[..i].trim_end();
            if key.contains(" #") {
                return None;
            }
            return Some((key.to_string(), content[i + 1..].trim_start()));
        }
        if *b == b'#' && i > 0 && bytes[i - 1] == b' ' {
            return None;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_keys() {
        let src = "\
name: demo
services:
  web:
    image: nginx
    command: |
      not: a key
    deploy:
      replcas: 3   # typo
    ports:
    - \"80:80\"
    - target: 81
      published: 8081
  \"db\":
    volumes:
      - name: x
        target: /y
      - /z
      - |
        not: a key either
    user: me
";
        let p = Positions::scan(src);
        let at = |path: &str| {
            let pos = p.get(path);
            (pos.line, pos.column)
        };
        assert_eq!(at("name"), (1, 1));
        assert_eq!(at("services.web.image"), (4, 5));
        assert_eq!(at("services.web.command.not"), (5, 5));
        assert_eq!(at("services.web.deploy.replcas"), (8, 7));
        assert_eq!(at("services.web.ports[0]"), (10, 5));
        assert_eq!(at("services.web.ports[1].published"), (12, 7));
        assert_eq!(at("services.db"), (13, 3));
        assert_eq!(at("services.db.volumes[0].target"), (16, 9));
        assert_eq!(at("services.db.volumes[1]"), (17, 7));
        assert_eq!(at("services.db.volumes[2]"), (18, 7));
        assert_eq!(at("services.db.user"), (20, 5));
        assert_eq!(at("services.db.volumes[2].not"), (18, 7));
        assert_eq!(at("nowhere"), (0, 0));
        assert_eq!(Pos::default().to_string(), "");
    }
}
