//! `.env` and `env_file:` files: `KEY=VALUE` lines as Compose reads them.
//!
//! Blank lines and `#` comments are skipped, an `export ` prefix is allowed,
//! single-quoted values are literal, double-quoted values take `\n`, `\t`,
//! `\"` and `\\` escapes, unquoted values end at ` #`. Unquoted and
//! double-quoted values are interpolated (`${OTHER}`), as Compose does, from
//! the caller's lookup first and then from the keys earlier in the same file.
//! A line with a key and no `=` means "take the value from the environment".

use super::interpolate::{InterpolateError, interpolate};

/// Why an env file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvFileError {
    /// A line that is not `KEY=VALUE`, `KEY`, a comment or blank.
    #[error("{file}:{line}: {reason}")]
    Syntax {
        /// The file, as named in the Compose file or `.env`.
        file: String,
        /// The 1-based line.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// A value whose interpolation failed.
    #[error("{file}:{line}: {source}")]
    Interpolate {
        /// The file, as named in the Compose file or `.env`.
        file: String,
        /// The 1-based line.
        line: usize,
        /// The interpolation error.
        source: InterpolateError,
    },
}

/// One entry of an env file: a key and its value, or `None` for a bare `KEY`.
pub type EnvEntry = (String, Option<String>);

/// Parses an env file's text; `file` names it in errors.
pub fn parse(
    text: &str,
    file: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<EnvEntry>, EnvFileError> {
    let mut entries: Vec<EnvEntry> = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let syntax = |reason: String| EnvFileError::Syntax {
            file: file.to_string(),
            line,
            reason,
        };
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let trimmed = trimmed
            .strip_prefix("export ")
            .unwrap_or(trimmed)
            .trim_start();
        let (key, value) = match trimmed.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim_start())),
            None => (trimmed, None),
        };
        if key.is_empty() || key.chars().any(|c| c.is_whitespace()) {
            return Err(syntax(format!("invalid key `{key}`")));
        }
        let Some(value) = value else {
            entries.push((key.to_string(), None));
            continue;
        };
        let earlier = entries.clone();
        let scoped = |name: &str| {
            lookup(name).or_else(|| {
                earlier
                    .iter()
                    .rev()
                    .find(|(k, _)| k == name)
                    .and_then(|(_, v)| v.clone())
            })
        };
        let interpolated = |v: &str| {
            interpolate(v, &scoped)
                .map(|i| i.value)
                .map_err(|source| EnvFileError::Interpolate {
                    file: file.to_string(),
                    line,
                    source,
                })
        };
        let value = if let Some(body) = value.strip_prefix('\'') {
            let end = body
                .find('\'')
                .ok_or_else(|| syntax(format!("unterminated single quote in value of {key}")))?;
            body[..end].to_string()
        } else if let Some(body) = value.strip_prefix('"') {
            let mut out = String::new();
            let mut chars = body.chars();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '"' => {
                        closed = true;
                        break;
                    }
                    '\\' => match chars.next() {
                        Some('n') => out.push('\n'),
                        Some('t') => out.push('\t'),
                        Some('r') => out.push('\r'),
                        Some(c @ ('"' | '\\')) => out.push(c),
                        Some(c) => {
                            out.push('\\');
                            out.push(c);
                        }
                        None => break,
                    },
                    c => out.push(c),
                }
            }
            if !closed {
                return Err(syntax(format!(
                    "unterminated double quote in value of {key}"
                )));
            }
            interpolated(&out)?
        } else {
            let without_comment = match value.find(" #") {
                Some(at) => &value[..at],
                None => value,
            };
            interpolated(without_comment.trim_end())?
        };
        entries.push((key.to_string(), Some(value)));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let text = "# comment\n\nA=1\nexport B = two \nC='lit $A'\nD=\"x\\ny $A\"\nE=${A}-${HOME_SET}\nF=val # note\nG\nH=\n";
        let lookup = |n: &str| (n == "HOME_SET").then(|| "h".to_string());
        let got = parse(text, ".env", &lookup).unwrap();
        let want: Vec<EnvEntry> = vec![
            ("A".into(), Some("1".into())),
            ("B".into(), Some("two".into())),
            ("C".into(), Some("lit $A".into())),
            ("D".into(), Some("x\ny 1".into())),
            ("E".into(), Some("1-h".into())),
            ("F".into(), Some("val".into())),
            ("G".into(), None),
            ("H".into(), Some(String::new())),
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn errors() {
        let none = |_: &str| None;
        assert_eq!(
            parse("A=1\nB C=2\n", "web.env", &none)
                .unwrap_err()
                .to_string(),
            "web.env:2: invalid key `B C`"
        );
        assert_eq!(
            parse("A=\"open\n", "web.env", &none)
                .unwrap_err()
                .to_string(),
            "web.env:1: unterminated double quote in value of A"
        );
        assert!(matches!(
            parse("A=${X:?need X}\n", ".env", &none),
            Err(EnvFileError::Interpolate { line: 1, .. })
        ));
    }
}
