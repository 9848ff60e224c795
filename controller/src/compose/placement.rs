//! Placement constraints: `node.labels.zone==eu` parsed into key, operator
//! and value, with the keys Swarm accepts.

use super::spec::{Constraint, ConstraintOp};

/// The fixed constraint keys (besides `node.labels.*` and `engine.labels.*`).
const KEYS: &[&str] = &[
    "node.id",
    "node.hostname",
    "node.role",
    "node.platform.os",
    "node.platform.arch",
];

/// Why a constraint was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConstraintError {
    /// No `==` or `!=` in the expression.
    #[error("constraint `{text}` has no `==` or `!=`")]
    NoOperator {
        /// The constraint as written.
        text: String,
    },
    /// A key Swarm does not know.
    #[error(
        "constraint `{text}` has unknown key `{key}` (use node.id, node.hostname, node.role, node.platform.os, node.platform.arch, node.labels.NAME or engine.labels.NAME)"
    )]
    UnknownKey {
        /// The constraint as written.
        text: String,
        /// The key.
        key: String,
    },
    /// An empty value.
    #[error("constraint `{text}` has an empty value")]
    EmptyValue {
        /// The constraint as written.
        text: String,
    },
}

/// Parses `key==value` or `key!=value`; blanks around the parts are allowed,
/// as in Swarm.
pub fn parse_constraint(text: &str) -> Result<Constraint, ConstraintError> {
    let (key, op, value) = if let Some((k, v)) = text.split_once("==") {
        (k, ConstraintOp::Eq, v)
    } else if let Some((k, v)) = text.split_once("!=") {
        (k, ConstraintOp::Ne, v)
    } else {
        return Err(ConstraintError::NoOperator {
            text: text.to_string(),
        });
    };
    let (key, value) = (key.trim(), value.trim());
    let labelled = ["node.labels.", "engine.labels."]
        .iter()
        .any(|p| key.strip_prefix(p).is_some_and(|name| !name.is_empty()));
    // Swarm compares keys case-insensitively; the normalized form is lowercase
    // except for label names, which are case-sensitive.
    let fixed = KEYS.iter().find(|k| k.eq_ignore_ascii_case(key));
    let key = match (fixed, labelled) {
        (Some(k), _) => (*k).to_string(),
        (None, true) => key.to_string(),
        (None, false) => {
            return Err(ConstraintError::UnknownKey {
                text: text.to_string(),
                key: key.to_string(),
            });
        }
    };
    if value.is_empty() {
        return Err(ConstraintError::EmptyValue {
            text: text.to_string(),
        });
    }
    Ok(Constraint {
        key,
        op,
        value: value.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let c = parse_constraint("node.labels.zone == eu").unwrap();
        assert_eq!(
            (c.key.as_str(), c.op, c.value.as_str()),
            ("node.labels.zone", ConstraintOp::Eq, "eu")
        );
        assert_eq!(c.to_string(), "node.labels.zone==eu");
        let c = parse_constraint("node.role!=manager").unwrap();
        assert_eq!(c.op, ConstraintOp::Ne);
        assert_eq!(
            parse_constraint("Node.Hostname==a").unwrap().key,
            "node.hostname"
        );
        assert_eq!(
            parse_constraint("node.zone==eu").unwrap_err().to_string(),
            "constraint `node.zone==eu` has unknown key `node.zone` (use node.id, node.hostname, node.role, node.platform.os, node.platform.arch, node.labels.NAME or engine.labels.NAME)"
        );
        assert!(parse_constraint("node.role=manager").is_err());
        assert!(parse_constraint("node.labels.==x").is_err());
        assert!(parse_constraint("node.role==").is_err());
    }
}
