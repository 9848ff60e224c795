//! A client for OCI distribution registries (the v2 HTTP API), enough to
//! pull: manifests and blobs, anonymous, bearer-token and basic auth.
//!
//! Synchronous (ureq) on purpose: the agent crate starts no async runtime,
//! and a pull is a handful of sequential requests plus large streaming reads.

use super::manifest::ACCEPT;
use super::reference::Reference;
use base64::Engine as _;
use std::io::Read;
use std::time::Duration;

/// The most bytes a manifest or token response may have.
const SMALL_BODY_LIMIT: u64 = 8 << 20;

/// Errors of the registry client.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry could not be reached or the transfer broke.
    #[error("{url}: {message}")]
    Transport {
        /// The URL requested.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// The registry answered with an unexpected status.
    #[error("{url}: HTTP {status}: {body}")]
    Status {
        /// The URL requested.
        url: String,
        /// The HTTP status code.
        status: u16,
        /// The start of the response body (registries explain errors there).
        body: String,
    },
    /// The manifest or blob does not exist in the registry.
    #[error("{what} not found in registry ({url})")]
    NotFound {
        /// What was looked for, e.g. `manifest 127.0.0.1:5000/app:v1`.
        what: String,
        /// The URL requested.
        url: String,
    },
    /// The registry's host is a special-use name that never resolves
    /// (RFC 6761: `.test`, `.example`, `.invalid`, `.localhost`), so it is
    /// not looked up at all.
    #[error(
        "registry {host} is a reserved name that never resolves: \
         load the image with `gantry image load` or push it to a real registry"
    )]
    ReservedName {
        /// The registry host.
        host: String,
    },
    /// The registry wants credentials that were refused or not given.
    #[error("{url}: authentication failed: {reason}")]
    Auth {
        /// The URL requested (or the token realm).
        url: String,
        /// Why.
        reason: String,
    },
}

/// Username and password for a registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The username.
    pub username: String,
    /// The password or access token.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    // Never print the password, not even in debug logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// How to talk to a registry.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Use plain HTTP even for a non-loopback registry.
    pub insecure: bool,
    /// Credentials for token or basic auth.
    pub credentials: Option<Credentials>,
}

/// A session with one repository of one registry.
pub struct RegistryClient {
    agent: ureq::Agent,
    base: String,
    repository: String,
    credentials: Option<Credentials>,
    authorization: Option<String>,
}

/// A fetched response: body reader plus the headers we use.
pub struct Fetched {
    /// The Content-Type, if sent.
    pub content_type: Option<String>,
    /// The Docker-Content-Digest header, if sent.
    pub digest: Option<String>,
    /// The Content-Length, if sent.
    pub length: Option<u64>,
    /// The body.
    pub body: Box<dyn Read + Send>,
}

impl RegistryClient {
    /// A client for `reference`'s repository. Plain HTTP for loopback
    /// registries (Docker's rule) or when `insecure` is set, else HTTPS.
    pub fn new(reference: &Reference, options: &RegistryOptions) -> RegistryClient {
        let scheme = if options.insecure || reference.is_loopback_registry() {
            "http"
        } else {
            "https"
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .build()
            .into();
        RegistryClient {
            agent,
            base: format!("{scheme}://{}", reference.registry_host()),
            repository: reference.path.clone(),
            credentials: options.credentials.clone(),
            authorization: None,
        }
    }

    /// A client for `reference` at a mirror (`http://host:port`, as
    /// `gantry agent` is given its controller): the repository there is the
    /// reference's full name, registry host included (`gantry.test/web`), so
    /// one mirror holds images of any origin, like containerd's `ns=` mirrors.
    pub fn for_mirror(
        mirror: &str,
        reference: &Reference,
        options: &RegistryOptions,
    ) -> RegistryClient {
        let mut client = RegistryClient::new(reference, options);
        client.base = mirror.trim_end_matches('/').to_string();
        client.repository = reference.repository();
        client
    }

    /// Fetches `manifests/<reference>` (a tag or digest).
    pub fn manifest(&mut self, reference: &str) -> Result<Fetched, RegistryError> {
        let url = format!("{}/v2/{}/manifests/{reference}", self.base, self.repository);
        self.get(
            &url,
            Some(ACCEPT),
            &format!("manifest {}:{reference}", self.repository),
        )
    }

    /// Fetches `blobs/<digest>`.
    pub fn blob(&mut self, digest: &str) -> Result<Fetched, RegistryError> {
        let url = format!("{}/v2/{}/blobs/{digest}", self.base, self.repository);
        self.get(&url, None, &format!("blob {digest}"))
    }

    /// Reads a small body (manifest) whole, bounded.
    pub fn read_small(fetched: Fetched, url: &str) -> Result<Vec<u8>, RegistryError> {
        let mut bytes = Vec::new();
        fetched
            .body
            .take(SMALL_BODY_LIMIT)
            .read_to_end(&mut bytes)
            .map_err(|e| RegistryError::Transport {
                url: url.to_string(),
                message: e.to_string(),
            })?;
        Ok(bytes)
    }

    fn get(
        &mut self,
        url: &str,
        accept: Option<&str>,
        what: &str,
    ) -> Result<Fetched, RegistryError> {
        // One retry: the first 401 tells us how to authenticate.
        for attempt in 0..2 {
            let mut request = self.agent.get(url);
            if let Some(accept) = accept {
                request = request.header("Accept", accept);
            }
            if let Some(authorization) = &self.authorization {
                request = request.header("Authorization", authorization);
            }
            let response = request.call().map_err(|e| transport(url, e))?;
            let status = response.status().as_u16();
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            if status == 401 && attempt == 0 {
                let challenge = header("www-authenticate").unwrap_or_default();
                self.authorization = Some(self.authenticate(url, &challenge)?);
                continue;
            }
            match status {
                200..=299 => {
                    return Ok(Fetched {
                        content_type: header("content-type"),
                        digest: header("docker-content-digest"),
                        length: header("content-length").and_then(|v| v.parse().ok()),
                        body: Box::new(response.into_body().into_reader()),
                    });
                }
                401 | 403 => {
                    return Err(RegistryError::Auth {
                        url: url.to_string(),
                        reason: format!("HTTP {status}: {}", snippet(response)),
                    });
                }
                404 => {
                    return Err(RegistryError::NotFound {
                        what: what.to_string(),
                        url: url.to_string(),
                    });
                }
                _ => {
                    return Err(RegistryError::Status {
                        url: url.to_string(),
                        status,
                        body: snippet(response),
                    });
                }
            }
        }
        Err(RegistryError::Auth {
            url: url.to_string(),
            reason: "still unauthorized after authenticating".to_string(),
        })
    }

    /// Answers a `WWW-Authenticate` challenge with an `Authorization` value.
    fn authenticate(&self, url: &str, challenge: &str) -> Result<String, RegistryError> {
        let (scheme, params) = parse_challenge(challenge);
        let auth_err = |reason: String| RegistryError::Auth {
            url: url.to_string(),
            reason,
        };
        match scheme.to_ascii_lowercase().as_str() {
            "basic" => {
                let creds = self.credentials.as_ref().ok_or_else(|| {
                    auth_err(
                        "registry wants basic auth: give --username and --password-stdin".into(),
                    )
                })?;
                Ok(basic(creds))
            }
            "bearer" => {
                let param = |key: &str| {
                    params
                        .iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case(key))
                        .map(|(_, v)| v.as_str())
                };
                let realm = param("realm")
                    .ok_or_else(|| auth_err("bearer challenge without realm".into()))?;
                let default_scope = format!("repository:{}:pull", self.repository);
                let scope = param("scope").unwrap_or(&default_scope);
                let mut token_url = format!("{realm}?scope={}", percent_encode(scope));
                if let Some(service) = param("service") {
                    token_url.push_str(&format!("&service={}", percent_encode(service)));
                }
                self.fetch_token(&token_url)
                    .map(|token| format!("Bearer {token}"))
            }
            _ => Err(auth_err(format!("unsupported challenge {challenge:?}"))),
        }
    }

    fn fetch_token(&self, token_url: &str) -> Result<String, RegistryError> {
        let mut request = self.agent.get(token_url);
        if let Some(creds) = &self.credentials {
            request = request.header("Authorization", basic(creds));
        }
        let response = request.call().map_err(|e| transport(token_url, e))?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(RegistryError::Auth {
                url: token_url.to_string(),
                reason: format!(
                    "token endpoint answered HTTP {status}: {}",
                    snippet(response)
                ),
            });
        }
        let mut body = response.into_body();
        let bytes = body
            .with_config()
            .limit(SMALL_BODY_LIMIT)
            .read_to_vec()
            .map_err(|e| transport(token_url, e))?;
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
        }
        let parsed: TokenResponse =
            serde_json::from_slice(&bytes).map_err(|e| RegistryError::Auth {
                url: token_url.to_string(),
                reason: format!("malformed token response: {e}"),
            })?;
        parsed
            .token
            .or(parsed.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| RegistryError::Auth {
                url: token_url.to_string(),
                reason: "token response has no token".to_string(),
            })
    }
}

fn transport(url: &str, err: ureq::Error) -> RegistryError {
    RegistryError::Transport {
        url: url.to_string(),
        message: err.to_string(),
    }
}

fn snippet(response: ureq::http::Response<ureq::Body>) -> String {
    let mut body = response.into_body();
    let text = body
        .with_config()
        .limit(4096)
        .read_to_string()
        .unwrap_or_default();
    text.trim().chars().take(300).collect()
}

fn basic(creds: &Credentials) -> String {
    let raw = format!("{}:{}", creds.username, creds.password);
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

/// Splits `Bearer realm="…",service="…",scope="a:b:pull,push"` into the
/// scheme and its parameters; quoted values may contain commas.
pub fn parse_challenge(challenge: &str) -> (String, Vec<(String, String)>) {
    let challenge = challenge.trim();
    let (scheme, rest) = challenge
        .split_once(char::is_whitespace)
        .unwrap_or((challenge, ""));
    let mut params = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek().copied() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        params.push((key.trim().to_string(), value.trim().to_string()));
    }
    (scheme.to_string(), params)
}

/// Percent-encodes a query value (RFC 3986 unreserved characters kept).
fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenges_are_parsed_with_quoted_commas() {
        let (scheme, params) = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(scheme, "Bearer");
        assert_eq!(
            params,
            vec![
                (
                    "realm".to_string(),
                    "https://auth.example/token".to_string()
                ),
                ("service".to_string(), "registry.example".to_string()),
                ("scope".to_string(), "repository:a/b:pull,push".to_string()),
            ]
        );
        let (scheme, params) = parse_challenge(r#"Basic realm="Registry Realm""#);
        assert_eq!(scheme, "Basic");
        assert_eq!(params[0].1, "Registry Realm");
    }

    #[test]
    fn scopes_are_percent_encoded() {
        assert_eq!(
            percent_encode("repository:a/b:pull"),
            "repository%3Aa%2Fb%3Apull"
        );
    }

    #[test]
    fn credentials_never_print_the_password() {
        let creds = Credentials {
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{creds:?}").contains("hunter2"));
    }
}
