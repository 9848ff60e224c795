//! Splitting a `command:` or `entrypoint:` string into words the way Compose
//! does (go-shellwords): blanks separate words, single quotes are literal,
//! double quotes and backslashes escape. No expansion happens here:
//! interpolation is done before, and nothing else is expanded, as in Compose.

/// Why a string could not be split into words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShellError {
    /// A quote that is never closed.
    #[error("unterminated {quote} quote in `{text}`")]
    UnterminatedQuote {
        /// `single` or `double`.
        quote: &'static str,
        /// The string being split.
        text: String,
    },
    /// A backslash as the very last character.
    #[error("trailing backslash in `{text}`")]
    TrailingBackslash {
        /// The string being split.
        text: String,
    },
}

/// Splits `text` into words.
pub fn split(text: &str) -> Result<Vec<String>, ShellError> {
    let mut words = Vec::new();
    let mut word = String::new();
    // A word exists once something (even an empty quote pair) was seen.
    let mut in_word = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' | '\n' | '\r' => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\\' => {
                let next = chars.next().ok_or_else(|| ShellError::TrailingBackslash {
                    text: text.to_string(),
                })?;
                word.push(next);
                in_word = true;
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => {
                            return Err(ShellError::UnterminatedQuote {
                                quote: "single",
                                text: text.to_string(),
                            });
                        }
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        // Inside double quotes a backslash only escapes the
                        // characters the shell gives meaning to there.
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => word.push(c),
                            Some(c) => {
                                word.push('\\');
                                word.push(c);
                            }
                            None => {
                                return Err(ShellError::UnterminatedQuote {
                                    quote: "double",
                                    text: text.to_string(),
                                });
                            }
                        },
                        Some(c) => word.push(c),
                        None => {
                            return Err(ShellError::UnterminatedQuote {
                                quote: "double",
                                text: text.to_string(),
                            });
                        }
                    }
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        for (text, words) in [
            ("echo hello", vec!["echo", "hello"]),
            ("  a   b  ", vec!["a", "b"]),
            (
                "sh -c 'echo $HOME && ls'",
                vec!["sh", "-c", "echo $HOME && ls"],
            ),
            (r#"echo "a \"b\" c""#, vec!["echo", r#"a "b" c"#]),
            (r"a\ b c", vec!["a b", "c"]),
            ("x '' y", vec!["x", "", "y"]),
            (r#"say "it's""#, vec!["say", "it's"]),
            ("", vec![]),
        ] {
            assert_eq!(split(text).unwrap(), words, "{text}");
        }
    }

    #[test]
    fn errors() {
        assert_eq!(
            split("echo 'oops").unwrap_err().to_string(),
            "unterminated single quote in `echo 'oops`"
        );
        assert!(split("echo \"oops").is_err());
        assert!(split("echo \\").is_err());
    }
}
