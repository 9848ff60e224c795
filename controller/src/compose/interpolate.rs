//! Variable interpolation in Compose values, with the compose-spec's syntax:
//! `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?message}`,
//! `${VAR?message}`, `${VAR:+alt}`, `${VAR+alt}`, and `$$` for a literal `$`.
//!
//! Defaults and alternatives may themselves contain interpolations
//! (`${A:-${B}}`), as Compose allows. A variable that is unset and has no
//! default becomes the empty string, as in Compose, and is reported back so
//! that the caller can warn about it rather than drop it silently.

/// Why a string could not be interpolated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InterpolateError {
    /// `${VAR:?message}` or `${VAR?message}` with the variable missing.
    #[error("required variable {name} is missing a value: {message}")]
    MissingRequired {
        /// The variable's name.
        name: String,
        /// The message written after `?` (or a default one).
        message: String,
    },
    /// A `$` that starts nothing Compose understands (`$1`, `${}`, an
    /// unclosed `${`).
    #[error("invalid interpolation format in `{text}`: {reason} (write `$$` for a literal `$`)")]
    Syntax {
        /// The whole string being interpolated.
        text: String,
        /// What is wrong.
        reason: &'static str,
    },
}

/// The result of interpolating one string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interpolated {
    /// The string with every reference replaced.
    pub value: String,
    /// Variables that were referenced without a default and were unset;
    /// they became empty strings.
    pub unset: Vec<String>,
}

/// Interpolates `text`, looking variables up with `lookup`.
pub fn interpolate(
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Interpolated, InterpolateError> {
    let mut unset = Vec::new();
    let value = expand(text, text, lookup, &mut unset)?;
    Ok(Interpolated { value, unset })
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

fn expand(
    whole: &str,
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    unset: &mut Vec<String>,
) -> Result<String, InterpolateError> {
    let syntax = |reason| InterpolateError::Syntax {
        text: whole.to_string(),
        reason,
    };
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let next = after.chars().next();
        match next {
            Some('$') => {
                out.push('$');
                rest = &after[1..];
            }
            Some('{') => {
                let body_start = &after[1..];
                let end = matching_brace(body_start).ok_or_else(|| syntax("unclosed `${`"))?;
                let body = &body_start[..end];
                out.push_str(&braced(whole, body, lookup, unset)?);
                rest = &body_start[end + 1..];
            }
            Some(c) if is_name_start(c) => {
                let len = after.find(|c| !is_name_char(c)).unwrap_or(after.len());
                let name = &after[..len];
                match lookup(name) {
                    Some(v) => out.push_str(&v),
                    None => unset.push(name.to_string()),
                }
                rest = &after[len..];
            }
            _ => return Err(syntax("`$` is not followed by a name")),
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Index of the `}` closing a `${` whose body starts `body`, counting nested
/// `${ ... }` pairs.
fn matching_brace(body: &str) -> Option<usize> {
    let mut depth = 0usize;
    let bytes = body.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'$' if bytes.get(i + 1) == Some(&b'$') => i += 1,
            b'$' if bytes.get(i + 1) == Some(&b'{') => {
                depth += 1;
                i += 1;
            }
            b'}' if depth == 0 => return Some(i),
            b'}' => depth -= 1,
            _ => {}
        }
        i += 1;
    }
    None
}

fn braced(
    whole: &str,
    body: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    unset: &mut Vec<String>,
) -> Result<String, InterpolateError> {
    let syntax = |reason| InterpolateError::Syntax {
        text: whole.to_string(),
        reason,
    };
    let name_len = body.find(|c| !is_name_char(c)).unwrap_or(body.len());
    let name = &body[..name_len];
    if name.is_empty() || !name.starts_with(is_name_start) {
        return Err(syntax("`${` is not followed by a name"));
    }
    let op = &body[name_len..];
    let value = lookup(name);
    let set = value.is_some();
    let non_empty = value.as_deref().is_some_and(|v| !v.is_empty());
    let (kind, arg) = if op.is_empty() {
        ("", "")
    } else if let Some(arg) = op.strip_prefix(":-") {
        (":-", arg)
    } else if let Some(arg) = op.strip_prefix(":?") {
        (":?", arg)
    } else if let Some(arg) = op.strip_prefix(":+") {
        (":+", arg)
    } else if let Some(arg) = op.strip_prefix('-') {
        ("-", arg)
    } else if let Some(arg) = op.strip_prefix('?') {
        ("?", arg)
    } else if let Some(arg) = op.strip_prefix('+') {
        ("+", arg)
    } else {
        return Err(syntax("unknown modifier after the variable name"));
    };
    let missing = |arg: &str, unset: &mut Vec<String>| -> Result<String, InterpolateError> {
        let message = expand(whole, arg, lookup, unset)?;
        Err(InterpolateError::MissingRequired {
            name: name.to_string(),
            message: if message.is_empty() {
                "required variable is unset".to_string()
            } else {
                message
            },
        })
    };
    match kind {
        "" => match value {
            Some(v) => Ok(v),
            None => {
                unset.push(name.to_string());
                Ok(String::new())
            }
        },
        ":-" if non_empty => Ok(value.unwrap_or_default()),
        ":-" => expand(whole, arg, lookup, unset),
        "-" if set => Ok(value.unwrap_or_default()),
        "-" => expand(whole, arg, lookup, unset),
        ":?" if non_empty => Ok(value.unwrap_or_default()),
        ":?" => missing(arg, unset),
        "?" if set => Ok(value.unwrap_or_default()),
        "?" => missing(arg, unset),
        ":+" if non_empty => expand(whole, arg, lookup, unset),
        "+" if set => expand(whole, arg, lookup, unset),
        _ => Ok(String::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(text: &str) -> Result<Interpolated, InterpolateError> {
        let lookup = |name: &str| match name {
            "SET" => Some("value".to_string()),
            "EMPTY" => Some(String::new()),
            "TAG" => Some("1.25".to_string()),
            _ => None,
        };
        interpolate(text, &lookup)
    }

    #[test]
    fn table() {
        for (text, expected) in [
            ("plain", "plain"),
            ("$SET", "value"),
            ("${SET}", "value"),
            ("a-$SET-b", "a-value-b"),
            ("$SET.x", "value.x"),
            ("$$SET", "$SET"),
            ("$$$SET", "$value"),
            ("${UNSET:-def}", "def"),
            ("${EMPTY:-def}", "def"),
            ("${EMPTY-def}", ""),
            ("${UNSET-def}", "def"),
            ("${SET:-def}", "value"),
            ("${SET:+alt}", "alt"),
            ("${EMPTY:+alt}", ""),
            ("${EMPTY+alt}", "alt"),
            ("${UNSET+alt}", ""),
            ("${UNSET:-${TAG}}", "1.25"),
            ("${UNSET:-${ALSO:-x}y}", "xy"),
            ("${SET:?boom}", "value"),
            ("${EMPTY?boom}", ""),
            ("nginx:${TAG:-latest}", "nginx:1.25"),
            ("${UNSET:-a:b}", "a:b"),
        ] {
            assert_eq!(run(text).unwrap().value, expected, "{text}");
        }
    }

    #[test]
    fn unset_is_reported() {
        let out = run("$UNSET and ${OTHER}").unwrap();
        assert_eq!(out.value, " and ");
        assert_eq!(out.unset, ["UNSET", "OTHER"]);
        assert!(run("${UNSET:-x}").unwrap().unset.is_empty());
    }

    #[test]
    fn required() {
        assert_eq!(
            run("${DB_PASSWORD:?set it in .env}")
                .unwrap_err()
                .to_string(),
            "required variable DB_PASSWORD is missing a value: set it in .env"
        );
        assert!(matches!(
            run("${EMPTY:?x}"),
            Err(InterpolateError::MissingRequired { .. })
        ));
        assert!(matches!(
            run("${UNSET?}"),
            Err(InterpolateError::MissingRequired { .. })
        ));
    }

    #[test]
    fn syntax_errors() {
        for bad in ["$", "cost $5", "${", "${}", "${1A}", "${A!b}", "${A:-x"] {
            assert!(
                matches!(run(bad), Err(InterpolateError::Syntax { .. })),
                "{bad} should fail"
            );
        }
    }
}
