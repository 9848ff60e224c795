//! Pushing an image from the store to a registry over the OCI distribution
//! API: each blob the registry lacks is uploaded whole (`POST` then `PUT
//! ?digest=`, streamed from the blob file), then the manifest is `PUT` under
//! the tag. What `gantry image load` uses to put images into the
//! controller's registry, which agents then pull from as a mirror.
//!
//! Synchronous (ureq) like the puller: the agent crate starts no runtime.
//! Anonymous only, like the controller's registry in this issue.

use super::blobs;
use super::manifest::{self, Document};
use super::reference::Reference;
use super::registry::RegistryError;
use super::{ImageError, ImageStore};
use std::fmt;
use std::time::Duration;

/// Where to push.
///
/// Decision: only mirror-style targets exist for now, named like
/// [`super::registry::RegistryClient::for_mirror`] reads them: the
/// repository is the image's full name, registry host included, so one
/// registry (the controller's) holds images of any origin and the agents'
/// puller finds them under the name a task uses. Pushing to an image's own
/// registry (`gantry image push`) is a later issue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushTarget {
    /// The registry's base URL, `http://host:port` (a controller).
    pub mirror: String,
}

impl PushTarget {
    /// A target for the registry at `url`; a bare `host:port` gets
    /// `http://`, since controllers serve plain HTTP until mTLS comes.
    pub fn mirror(url: &str) -> PushTarget {
        let url = url.trim_end_matches('/');
        let mirror = if url.contains("://") {
            url.to_string()
        } else {
            format!("http://{url}")
        };
        PushTarget { mirror }
    }
}

/// A step of a push, for progress output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushProgress {
    /// The registry already has this blob.
    Exists {
        /// The blob's digest.
        digest: String,
    },
    /// A blob upload started.
    Uploading {
        /// The blob's digest.
        digest: String,
        /// Its size in bytes.
        size: u64,
    },
    /// The registry accepted (and verified) the blob.
    Uploaded {
        /// The blob's digest.
        digest: String,
    },
}

impl fmt::Display for PushProgress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let short = |d: &str| {
            d.strip_prefix("sha256:")
                .unwrap_or(d)
                .chars()
                .take(12)
                .collect::<String>()
        };
        match self {
            PushProgress::Exists { digest } => write!(f, "{}: already exists", short(digest)),
            PushProgress::Uploading { digest, size } => {
                write!(f, "{}: uploading {size} bytes", short(digest))
            }
            PushProgress::Uploaded { digest } => write!(f, "{}: pushed", short(digest)),
        }
    }
}

impl ImageStore {
    /// Pushes the image `name` (a reference that names a stored image, e.g.
    /// `gantry.test/web:latest`) to `target`, under that reference. Returns
    /// the manifest digest the registry stored.
    pub fn push(
        &self,
        name: &str,
        target: &PushTarget,
        progress: &mut dyn FnMut(PushProgress),
    ) -> Result<String, ImageError> {
        let reference = Reference::parse(name)?;
        // Shared: gc must not delete the blobs while they are read.
        let _gc = self.gc_lock(false)?;
        let record = self.resolve(name)?;
        let manifest = self.manifest(&record)?;
        let bytes = self.blobs().read(&record.manifest_digest)?;
        let media_type = serde_json::from_slice::<Document>(&bytes)
            .ok()
            .and_then(|doc| doc.media_type)
            .unwrap_or_else(|| manifest::OCI_MANIFEST.to_string());
        let client = PushClient::new(target, &reference);
        for descriptor in std::iter::once(&manifest.config).chain(&manifest.layers) {
            if client.has_blob(&descriptor.digest)? {
                progress(PushProgress::Exists {
                    digest: descriptor.digest.clone(),
                });
                continue;
            }
            progress(PushProgress::Uploading {
                digest: descriptor.digest.clone(),
                size: descriptor.size,
            });
            client.upload_blob(self, &descriptor.digest)?;
            progress(PushProgress::Uploaded {
                digest: descriptor.digest.clone(),
            });
        }
        let tag_or_digest = reference.tag.as_deref().unwrap_or(&record.manifest_digest);
        let stored = client.put_manifest(tag_or_digest, &media_type, &bytes)?;
        if stored != record.manifest_digest {
            return Err(blobs::BlobError::DigestMismatch {
                digest: record.manifest_digest.clone(),
                actual: stored,
            }
            .into());
        }
        Ok(stored)
    }
}

/// A push session with one repository of one registry.
struct PushClient {
    agent: ureq::Agent,
    base: String,
    repository: String,
}

impl PushClient {
    fn new(target: &PushTarget, reference: &Reference) -> PushClient {
        // No overall timeout: a large layer over a slow link may take long;
        // connecting and each response's headers may not.
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(120)))
            .build()
            .into();
        PushClient {
            agent,
            base: target.mirror.trim_end_matches('/').to_string(),
            repository: reference.repository(),
        }
    }

    fn url(&self, tail: &str) -> String {
        format!("{}/v2/{}/{tail}", self.base, self.repository)
    }

    /// A `Location` header made absolute: registries may answer with a path
    /// or with a full URL.
    fn absolute(&self, location: &str) -> String {
        if location.contains("://") {
            location.to_string()
        } else if location.starts_with('/') {
            format!("{}{location}", self.base)
        } else {
            format!("{}/{location}", self.base)
        }
    }

    fn has_blob(&self, digest: &str) -> Result<bool, RegistryError> {
        let url = self.url(&format!("blobs/{digest}"));
        let response = self
            .agent
            .head(&url)
            .call()
            .map_err(|e| transport(&url, e))?;
        match response.status().as_u16() {
            200..=299 => Ok(true),
            404 => Ok(false),
            status => Err(status_error(&url, status, response)),
        }
    }

    /// `POST` an upload session, then `PUT` the whole blob into it with the
    /// digest, streamed from the store's file.
    fn upload_blob(&self, store: &ImageStore, digest: &str) -> Result<(), RegistryError> {
        let url = self.url("blobs/uploads/");
        let response = self
            .agent
            .post(&url)
            .send_empty()
            .map_err(|e| transport(&url, e))?;
        let status = response.status().as_u16();
        if status != 202 {
            return Err(status_error(&url, status, response));
        }
        let location = response
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| RegistryError::Status {
                url: url.clone(),
                status,
                body: "upload session without Location".to_string(),
            })?;
        let location = self.absolute(location);
        let separator = if location.contains('?') { '&' } else { '?' };
        let put_url = format!("{location}{separator}digest={digest}");
        let file = store
            .blobs()
            .open(digest)
            .map_err(|e| RegistryError::Status {
                url: put_url.clone(),
                status: 0,
                body: format!("local blob: {e}"),
            })?;
        // A `File` body sends its length, so this is one request with a
        // Content-Length, not a chunked stream some registries refuse.
        let response = self
            .agent
            .put(&put_url)
            .header("Content-Type", "application/octet-stream")
            .send(file)
            .map_err(|e| transport(&put_url, e))?;
        match response.status().as_u16() {
            201 => Ok(()),
            status => Err(status_error(&put_url, status, response)),
        }
    }

    /// `PUT`s the manifest; returns the digest the registry says it stored.
    fn put_manifest(
        &self,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<String, RegistryError> {
        let url = self.url(&format!("manifests/{reference}"));
        let response = self
            .agent
            .put(&url)
            .header("Content-Type", media_type)
            .send(bytes)
            .map_err(|e| transport(&url, e))?;
        match response.status().as_u16() {
            201 => Ok(response
                .headers()
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
                // A registry that does not say stored what it was sent.
                .unwrap_or_else(|| blobs::sha256_digest(bytes))),
            status => Err(status_error(&url, status, response)),
        }
    }
}

fn transport(url: &str, err: ureq::Error) -> RegistryError {
    RegistryError::Transport {
        url: url.to_string(),
        message: err.to_string(),
    }
}

/// An unexpected status, with the registry's explanation from the body.
fn status_error(
    url: &str,
    status: u16,
    response: ureq::http::Response<ureq::Body>,
) -> RegistryError {
    let mut body = response.into_body();
    let text = body
        .with_config()
        .limit(4096)
        .read_to_string()
        .unwrap_or_default();
    let body: String = text.trim().chars().take(300).collect();
    match status {
        401 | 403 => RegistryError::Auth {
            url: url.to_string(),
            reason: format!("HTTP {status}: {body}"),
        },
        _ => RegistryError::Status {
            url: url.to_string(),
            status,
            body,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_default_to_plain_http() {
        assert_eq!(
            PushTarget::mirror("127.0.0.1:7070").mirror,
            "http://127.0.0.1:7070"
        );
        assert_eq!(
            PushTarget::mirror("http://10.0.0.1:7070/").mirror,
            "http://10.0.0.1:7070"
        );
    }
}
