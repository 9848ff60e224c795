//! Image references (`busybox`, `registry:5000/app:1.2`, `app@sha256:…`),
//! parsed and normalised the way Docker does, so that the names people type
//! and the names stored in the index always compare equal.

use std::fmt;

/// The registry that short names such as `busybox` live on.
pub const DEFAULT_DOMAIN: &str = "docker.io";

/// The host that serves [`DEFAULT_DOMAIN`]'s registry API.
pub const DEFAULT_REGISTRY_HOST: &str = "registry-1.docker.io";

/// The tag used when a reference names neither a tag nor a digest.
pub const DEFAULT_TAG: &str = "latest";

/// Errors of reference parsing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    /// The reference is not a valid image reference.
    #[error("invalid reference {reference:?}: {reason}")]
    Invalid {
        /// The reference as given.
        reference: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// A normalised image reference: `domain/path[:tag][@digest]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// The registry, e.g. `docker.io` or `127.0.0.1:5000`.
    pub domain: String,
    /// The repository path, e.g. `library/busybox`.
    pub path: String,
    /// The tag, if any (`latest` is filled in when there is no digest).
    pub tag: Option<String>,
    /// The manifest digest, if any (`sha256:…`).
    pub digest: Option<String>,
}

impl Reference {
    /// Parses and normalises `input` Docker-style: `busybox` becomes
    /// `docker.io/library/busybox:latest`.
    pub fn parse(input: &str) -> Result<Reference, ReferenceError> {
        let invalid = |reason| ReferenceError::Invalid {
            reference: input.to_string(),
            reason,
        };
        if input.is_empty() {
            return Err(invalid("empty"));
        }
        if input.len() > 4096 {
            return Err(invalid("too long"));
        }
        let (rest, digest) = match input.split_once('@') {
            Some((rest, digest)) => {
                validate_digest(digest).map_err(invalid)?;
                (rest, Some(digest.to_string()))
            }
            None => (input, None),
        };
        // A tag is after the last ':' that follows the last '/', so that a
        // registry port (`host:5000/app`) is not mistaken for one.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let at = last_slash + i;
                (&rest[..at], Some(rest[at + 1..].to_string()))
            }
            None => (rest, None),
        };
        if let Some(tag) = &tag {
            validate_tag(tag).map_err(invalid)?;
        }
        let (domain, path) = split_domain(name);
        validate_domain(&domain).map_err(invalid)?;
        validate_path(&path).map_err(invalid)?;
        let tag = match (tag, &digest) {
            (None, None) => Some(DEFAULT_TAG.to_string()),
            (tag, _) => tag,
        };
        Ok(Reference {
            domain,
            path,
            tag,
            digest,
        })
    }

    /// `domain/path` without tag or digest.
    pub fn repository(&self) -> String {
        format!("{}/{}", self.domain, self.path)
    }

    /// The repository as Docker shows it in tables: `busybox` for
    /// `docker.io/library/busybox`, `user/app` for `docker.io/user/app`.
    pub fn familiar_repository(&self) -> String {
        if self.domain == DEFAULT_DOMAIN {
            match self.path.strip_prefix("library/") {
                Some(short) if !short.contains('/') => short.to_string(),
                _ => self.path.clone(),
            }
        } else {
            self.repository()
        }
    }

    /// The tag if there is one, else the digest: what the registry's
    /// `manifests/<reference>` endpoint is asked for. A digest wins since it
    /// pins the content.
    pub fn manifest_reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or(DEFAULT_TAG)
    }

    /// The host (and port) to talk to for this reference's registry API.
    pub fn registry_host(&self) -> &str {
        if self.domain == DEFAULT_DOMAIN {
            DEFAULT_REGISTRY_HOST
        } else {
            &self.domain
        }
    }

    /// Whether the registry host is a special-use domain name (RFC 6761)
    /// that no resolver answers: `*.test`, `*.example`, `*.invalid`,
    /// `*.localhost`. Images named so (Gantry's own test images are
    /// `gantry.test/...`) only ever come from a store or a mirror; asking
    /// DNS about them would only send a query off the machine and wait.
    pub fn is_reserved_registry(&self) -> bool {
        let host = host_without_port(&self.domain).to_ascii_lowercase();
        let host = host.trim_end_matches('.');
        ["test", "example", "invalid", "localhost"]
            .iter()
            .any(|tld| host.ends_with(&format!(".{tld}")))
    }

    /// Whether Docker's rule allows plain HTTP to this registry without
    /// `--insecure`: loopback only (`localhost`, `127.0.0.0/8`, `::1`).
    pub fn is_loopback_registry(&self) -> bool {
        let host = host_without_port(&self.domain);
        host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.domain, self.path)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// Strips the port from `host:port` and the brackets from `[v6]:port`.
fn host_without_port(domain: &str) -> &str {
    if let Some(rest) = domain.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    domain.split(':').next().unwrap_or(domain)
}

/// Docker's rule: the first component is a registry only when it looks like
/// a host (has a '.' or a ':', or is `localhost`) and something follows it.
fn split_domain(name: &str) -> (String, String) {
    let (domain, path) = match name.split_once('/') {
        Some((first, rest))
            if first.contains('.')
                || first.contains(':')
                || first == "localhost"
                || first.chars().any(|c| c.is_ascii_uppercase()) =>
        {
            (first.to_string(), rest.to_string())
        }
        _ => (DEFAULT_DOMAIN.to_string(), name.to_string()),
    };
    let domain = if domain == "index.docker.io" {
        DEFAULT_DOMAIN.to_string()
    } else {
        domain
    };
    let path = if domain == DEFAULT_DOMAIN && !path.contains('/') {
        format!("library/{path}")
    } else {
        path
    };
    (domain, path)
}

fn validate_digest(digest: &str) -> Result<(), &'static str> {
    match digest.split_once(':') {
        Some(("sha256", hex))
            if hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(())
        }
        _ => Err("digest must be sha256: and 64 lowercase hex digits"),
    }
}

fn validate_tag(tag: &str) -> Result<(), &'static str> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err("tag must be 1-128 of [A-Za-z0-9_.-], not starting with '.' or '-'")
    }
}

fn validate_domain(domain: &str) -> Result<(), &'static str> {
    let ok = !domain.is_empty()
        && domain
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
    if ok {
        Ok(())
    } else {
        Err("registry host has invalid characters")
    }
}

/// Path components are lowercase alphanumerics joined by `.`, `_`, `__` or
/// runs of `-` (the distribution grammar, checked without a regex engine).
fn validate_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("repository name is empty");
    }
    for component in path.split('/') {
        let bytes = component.as_bytes();
        let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
            return Err("repository components must start and end with [a-z0-9]");
        }
        if !bytes
            .iter()
            .all(|&b| alnum(b) || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err("repository name must be lowercase [a-z0-9._-]");
        }
        if component.contains("..")
            || component.contains("___")
            || component.contains("._")
            || component.contains("_.")
        {
            return Err("repository name has an invalid separator");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(input: &str) -> String {
        Reference::parse(input).expect(input).to_string()
    }

    #[test]
    fn short_names_are_normalised_docker_style() {
        assert_eq!(full("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(full("busybox:1.36"), "docker.io/library/busybox:1.36");
        assert_eq!(full("user/app"), "docker.io/user/app:latest");
        assert_eq!(
            full("index.docker.io/library/busybox"),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(
            full("docker.io/busybox"),
            "docker.io/library/busybox:latest"
        );
    }

    #[test]
    fn special_use_registry_names_are_reserved() {
        let reserved = |input: &str| Reference::parse(input).unwrap().is_reserved_registry();
        assert!(reserved("gantry.test/web:latest"));
        assert!(reserved("registry.example:5000/app"));
        assert!(reserved("Thing.INVALID/app"));
        assert!(!reserved("busybox"));
        assert!(!reserved("ghcr.io/acme/app"));
        assert!(!reserved("127.0.0.1:5000/app"));
        assert!(!reserved("test/app"), "docker.io/test/app");
    }

    #[test]
    fn registries_and_ports_are_recognised() {
        let r = Reference::parse("127.0.0.1:5000/team/app:v1").unwrap();
        assert_eq!(r.domain, "127.0.0.1:5000");
        assert_eq!(r.path, "team/app");
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert!(r.is_loopback_registry());
        let r = Reference::parse("localhost:5000/app").unwrap();
        assert_eq!(r.to_string(), "localhost:5000/app:latest");
        assert!(r.is_loopback_registry());
        let r = Reference::parse("ghcr.io/o/app").unwrap();
        assert!(!r.is_loopback_registry());
        assert_eq!(r.registry_host(), "ghcr.io");
        assert_eq!(
            Reference::parse("busybox").unwrap().registry_host(),
            DEFAULT_REGISTRY_HOST
        );
    }

    #[test]
    fn digests_pin_the_manifest() {
        let d = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("busybox@{d}")).unwrap();
        assert_eq!(r.tag, None);
        assert_eq!(r.manifest_reference(), d);
        assert_eq!(r.to_string(), format!("docker.io/library/busybox@{d}"));
        let r = Reference::parse(&format!("busybox:1@{d}")).unwrap();
        assert_eq!(r.manifest_reference(), d);
    }

    #[test]
    fn familiar_names_drop_the_default_registry() {
        let f = |s: &str| Reference::parse(s).unwrap().familiar_repository();
        assert_eq!(f("busybox"), "busybox");
        assert_eq!(f("user/app"), "user/app");
        assert_eq!(f("127.0.0.1:5000/app"), "127.0.0.1:5000/app");
    }

    #[test]
    fn malformed_references_are_refused() {
        for bad in [
            "",
            "Busybox",
            "busybox:",
            "busybox:-x",
            "busybox@sha256:abc",
            "busybox@md5:0123",
            "a//b",
            "app/",
            "-app",
            "app:tag with space",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
