//! The controller's image registry: an OCI distribution registry (pull and
//! push) under `/v2/`, served on the controller's one port next to gRPC, so
//! that `gantry image load` can put images only a user has into the cluster
//! and agents fetch them with the puller they use for any registry (as a
//! mirror: repositories are named by the full reference, host included).
//!
//! - [`RegistryStore`] keeps the files (`<data_dir>/controller/registry/`):
//!   blobs verified against their digest before they become visible,
//!   manifests as blobs plus per-repository links and tags.
//! - [`router`] is the HTTP API: `GET /v2/`; `GET|HEAD` of manifests (by tag
//!   or digest) and blobs; blob uploads (`POST`, `PATCH`, `PUT`, monolithic
//!   `POST ?digest=`, cross-repository `?mount=`); `PUT` of manifests; tag
//!   lists. Errors carry the spec's `{"errors":[{"code","message"}]}`.
//!
//! Decisions, named where an operator would look for them:
//! - No authentication or TLS in this issue: anyone who reaches the
//!   controller's port can pull and push. DESIGN.md's mTLS comes later and
//!   will cover this listener with the gRPC services.
//! - Blobs are shared by all repositories (content addressing makes that
//!   safe, and a load of several tags stores each layer once); manifests
//!   and tags belong to one repository, as in distribution.
//! - No deletes and no garbage collection yet: `DELETE` answers
//!   `UNSUPPORTED`. Range requests on blobs are not served (the puller
//!   never sends them): a `GET` streams the whole file.
//!
//! Invariant: handlers never hold a whole blob in memory; uploads are
//! appended to a session file as they arrive and served blobs are streamed
//! from their file. Only manifests (at most 4 MiB) are read whole.

mod store;

pub use store::{
    DOCKER_LIST, DOCKER_MANIFEST, Digest, MANIFEST_LIMIT, ManifestRef, OCI_INDEX, OCI_MANIFEST,
    RegistryStore, RepositoryName, StoredManifest,
};

use axum::Router;
use axum::body::{Body, Bytes, HttpBody as _};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use std::path::PathBuf;
use std::pin::Pin;
use tokio::io::AsyncWriteExt as _;

/// The header naming a manifest's or blob's digest (distribution's).
const CONTENT_DIGEST: &str = "docker-content-digest";
/// The header naming an upload session (distribution's).
const UPLOAD_UUID: &str = "docker-upload-uuid";
/// The header `GET /v2/` answers with, which clients check.
const API_VERSION: &str = "docker-distribution-api-version";
/// Read size when streaming blobs out.
const STREAM_CHUNK: usize = 256 << 10;

/// Errors of the registry, each mapped to the distribution spec's error
/// code and HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A file of the store could not be used.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// A blob-handling task panicked or was cancelled.
    #[error("registry worker failed: {0}")]
    Worker(String),
    /// The blob is not in the store.
    #[error("blob {digest} unknown to registry")]
    BlobUnknown {
        /// The digest asked for.
        digest: String,
    },
    /// The upload session does not exist (never started, finished, or
    /// dropped by a restart).
    #[error("blob upload {id} unknown to registry")]
    BlobUploadUnknown {
        /// The session id.
        id: String,
    },
    /// An upload request is malformed or its body broke off.
    #[error("blob upload invalid: {reason}")]
    BlobUploadInvalid {
        /// What is wrong.
        reason: String,
    },
    /// A chunk's `Content-Range` does not start where the session ends.
    #[error("blob upload {id}: chunk starts at {start}, the upload has {size} bytes")]
    RangeInvalid {
        /// The session id.
        id: String,
        /// Where the chunk says it starts.
        start: u64,
        /// Bytes the session holds.
        size: u64,
    },
    /// A digest is malformed or of an unsupported algorithm.
    #[error("invalid digest {digest:?}: {reason}")]
    DigestInvalid {
        /// The digest as given.
        digest: String,
        /// What is wrong.
        reason: String,
    },
    /// Uploaded content does not hash to the digest given for it.
    #[error("content hashes to {actual}, not the given digest {expected}")]
    DigestMismatch {
        /// The digest the client gave.
        expected: String,
        /// The digest of what arrived.
        actual: String,
    },
    /// A repository name is malformed.
    #[error("invalid repository name {name:?}: {reason}")]
    NameInvalid {
        /// The name as given.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The repository has no manifests.
    #[error("repository {name} unknown to registry")]
    NameUnknown {
        /// The repository name.
        name: String,
    },
    /// A tag is malformed.
    #[error("invalid tag {tag:?}")]
    TagInvalid {
        /// The tag as given.
        tag: String,
    },
    /// The repository has no such tag or manifest.
    #[error("manifest {name}:{reference} unknown to registry")]
    ManifestUnknown {
        /// The repository name.
        name: String,
        /// The tag or digest asked for.
        reference: String,
    },
    /// A pushed manifest is malformed.
    #[error("manifest invalid: {reason}")]
    ManifestInvalid {
        /// What is wrong.
        reason: String,
    },
    /// A pushed manifest has a media type the registry does not keep.
    #[error("manifest media type {media_type} is not supported")]
    ManifestUnsupported {
        /// The media type.
        media_type: String,
    },
    /// A pushed manifest references a blob (or child manifest) the registry
    /// does not have.
    #[error("manifest references blob {digest}, which the registry does not have")]
    ManifestBlobUnknown {
        /// The missing blob's digest.
        digest: String,
    },
    /// A pushed manifest is over the size limit.
    #[error("manifest larger than {limit} bytes")]
    ManifestTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The request is not part of the API this registry serves.
    #[error("{method} {path} is not supported by this registry")]
    Unsupported {
        /// The HTTP method.
        method: String,
        /// The request path.
        path: String,
    },
}

impl RegistryError {
    /// The distribution spec's error code.
    pub fn code(&self) -> &'static str {
        match self {
            RegistryError::Io { .. } | RegistryError::Worker(_) => "UNKNOWN",
            RegistryError::BlobUnknown { .. } => "BLOB_UNKNOWN",
            RegistryError::BlobUploadUnknown { .. } => "BLOB_UPLOAD_UNKNOWN",
            RegistryError::BlobUploadInvalid { .. } | RegistryError::RangeInvalid { .. } => {
                "BLOB_UPLOAD_INVALID"
            }
            RegistryError::DigestInvalid { .. } | RegistryError::DigestMismatch { .. } => {
                "DIGEST_INVALID"
            }
            RegistryError::NameInvalid { .. } => "NAME_INVALID",
            RegistryError::NameUnknown { .. } => "NAME_UNKNOWN",
            RegistryError::TagInvalid { .. } => "TAG_INVALID",
            RegistryError::ManifestUnknown { .. } => "MANIFEST_UNKNOWN",
            RegistryError::ManifestInvalid { .. } | RegistryError::ManifestUnsupported { .. } => {
                "MANIFEST_INVALID"
            }
            RegistryError::ManifestBlobUnknown { .. } => "MANIFEST_BLOB_UNKNOWN",
            RegistryError::ManifestTooLarge { .. } => "SIZE_INVALID",
            RegistryError::Unsupported { .. } => "UNSUPPORTED",
        }
    }

    /// The HTTP status the spec gives the error.
    pub fn status(&self) -> StatusCode {
        match self {
            RegistryError::Io { .. } | RegistryError::Worker(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            RegistryError::BlobUnknown { .. }
            | RegistryError::BlobUploadUnknown { .. }
            | RegistryError::NameUnknown { .. }
            | RegistryError::ManifestUnknown { .. } => StatusCode::NOT_FOUND,
            RegistryError::RangeInvalid { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            RegistryError::ManifestTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            RegistryError::Unsupported { .. } => StatusCode::METHOD_NOT_ALLOWED,
            RegistryError::BlobUploadInvalid { .. }
            | RegistryError::DigestInvalid { .. }
            | RegistryError::DigestMismatch { .. }
            | RegistryError::NameInvalid { .. }
            | RegistryError::TagInvalid { .. }
            | RegistryError::ManifestInvalid { .. }
            | RegistryError::ManifestUnsupported { .. }
            | RegistryError::ManifestBlobUnknown { .. } => StatusCode::BAD_REQUEST,
        }
    }
}

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "errors": [{"code": self.code(), "message": self.to_string(), "detail": null}]
        });
        (
            self.status(),
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response()
    }
}

/// The registry's HTTP API under `/v2/`, to merge into the controller's
/// router (the gRPC services share the port; their paths never start with
/// `/v2/`).
pub fn router(store: RegistryStore) -> Router {
    Router::new()
        .route("/v2", any(base))
        .route("/v2/", any(base))
        .route("/v2/{*rest}", any(dispatch))
        .with_state(store)
}

/// `GET /v2/`: the API version check every client starts with.
async fn base(method: Method, uri: Uri) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return unsupported(&method, &uri).into_response();
    }
    (
        StatusCode::OK,
        [
            (API_VERSION, "registry/2.0"),
            (header::CONTENT_TYPE.as_str(), "application/json"),
        ],
        "{}",
    )
        .into_response()
}

fn unsupported(method: &Method, uri: &Uri) -> RegistryError {
    RegistryError::Unsupported {
        method: method.to_string(),
        path: uri.path().to_string(),
    }
}

/// What a `/v2/<rest>` path addresses.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    /// `<name>/manifests/<reference>`.
    Manifest(String, String),
    /// `<name>/blobs/<digest>`.
    Blob(String, String),
    /// `<name>/blobs/uploads/`.
    UploadStart(String),
    /// `<name>/blobs/uploads/<id>`.
    Upload(String, String),
    /// `<name>/tags/list`.
    Tags(String),
}

/// Splits a path after `/v2/`. Repository names contain slashes, so the
/// name is everything before the last `/manifests/`, `/blobs/…` or
/// `/tags/list`, and what follows must be one segment.
fn parse_route(rest: &str) -> Option<Route> {
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Some(Route::Tags(name.to_string()));
    }
    if let Some(name) = rest
        .strip_suffix("/blobs/uploads/")
        .or_else(|| rest.strip_suffix("/blobs/uploads"))
    {
        return Some(Route::UploadStart(name.to_string()));
    }
    let one_segment = |s: &str| !s.is_empty() && !s.contains('/');
    if let Some((name, id)) = rest.rsplit_once("/blobs/uploads/")
        && one_segment(id)
    {
        return Some(Route::Upload(name.to_string(), id.to_string()));
    }
    if let Some((name, reference)) = rest.rsplit_once("/manifests/")
        && one_segment(reference)
    {
        return Some(Route::Manifest(name.to_string(), reference.to_string()));
    }
    if let Some((name, digest)) = rest.rsplit_once("/blobs/")
        && one_segment(digest)
    {
        return Some(Route::Blob(name.to_string(), digest.to_string()));
    }
    None
}

/// Every `/v2/<rest>` request: routed by hand since repository names hold
/// slashes, which path patterns cannot match before a fixed suffix.
async fn dispatch(
    State(store): State<RegistryStore>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match handle(store, &method, &uri, &headers, body).await {
        Ok(response) => response,
        Err(err) => err.into_response(),
    }
}

async fn handle(
    store: RegistryStore,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, RegistryError> {
    let path = percent_decode(uri.path());
    let rest = path.strip_prefix("/v2/").unwrap_or_default();
    let route = parse_route(rest).ok_or_else(|| unsupported(method, uri))?;
    let query = Query::parse(uri.query());
    match (route, method.clone()) {
        (Route::Manifest(name, reference), Method::GET | Method::HEAD) => {
            let name = RepositoryName::parse(&name)?;
            let reference = ManifestRef::parse(&reference)?;
            get_manifest(store, name, reference, *method == Method::HEAD).await
        }
        (Route::Manifest(name, reference), Method::PUT) => {
            let name = RepositoryName::parse(&name)?;
            let reference = ManifestRef::parse(&reference)?;
            put_manifest(store, name, reference, headers, body).await
        }
        (Route::Blob(name, digest), Method::GET | Method::HEAD) => {
            RepositoryName::parse(&name)?;
            let digest = Digest::parse(&digest)?;
            get_blob(store, digest, *method == Method::HEAD).await
        }
        (Route::UploadStart(name), Method::POST) => {
            let name = RepositoryName::parse(&name)?;
            start_upload(store, name, &query, body).await
        }
        (Route::Upload(name, id), Method::PATCH) => {
            let name = RepositoryName::parse(&name)?;
            patch_upload(store, name, id, headers, body).await
        }
        (Route::Upload(name, id), Method::PUT) => {
            let name = RepositoryName::parse(&name)?;
            let digest = query
                .get("digest")
                .ok_or_else(|| RegistryError::DigestInvalid {
                    digest: String::new(),
                    reason: "PUT completing an upload needs ?digest=".to_string(),
                })?;
            let digest = Digest::parse(digest)?;
            append(&store, &id, body).await?;
            finish_upload(store, name, id, digest).await
        }
        (Route::Upload(name, id), Method::GET) => {
            let name = RepositoryName::parse(&name)?;
            let size = blocking({
                let store = store.clone();
                let id = id.clone();
                move || store.upload_size(&id)
            })
            .await?;
            Ok(upload_accepted(StatusCode::NO_CONTENT, &name, &id, size))
        }
        (Route::Upload(_, id), Method::DELETE) => {
            blocking(move || store.cancel_upload(&id)).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        (Route::Tags(name), Method::GET) => {
            let name = RepositoryName::parse(&name)?;
            let tags = blocking({
                let name = name.clone();
                move || store.tags(&name)
            })
            .await?;
            let body = serde_json::json!({"name": name.as_str(), "tags": tags});
            Ok((
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                body.to_string(),
            )
                .into_response())
        }
        _ => Err(unsupported(method, uri)),
    }
}

/// Runs a store call on the blocking pool: file I/O never stalls the
/// runtime's workers, which also carry the controller's gRPC traffic.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RegistryError> + Send + 'static,
) -> Result<T, RegistryError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RegistryError::Worker(e.to_string()))?
}

async fn get_manifest(
    store: RegistryStore,
    name: RepositoryName,
    reference: ManifestRef,
    head: bool,
) -> Result<Response, RegistryError> {
    let (found, bytes) = blocking(move || {
        let found = store.manifest(&name, &reference)?;
        if head {
            return Ok((found, Vec::new()));
        }
        let bytes = std::fs::read(&found.path).map_err(|source| RegistryError::Io {
            path: found.path.clone(),
            source,
        })?;
        Ok((found, bytes))
    })
    .await?;
    let mut response = if head {
        Response::new(Body::empty())
    } else {
        Response::new(Body::from(bytes))
    };
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, header_value(&found.media_type));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(found.size));
    headers.insert(CONTENT_DIGEST, header_value(found.digest.as_str()));
    Ok(response)
}

async fn put_manifest(
    store: RegistryStore,
    name: RepositoryName,
    reference: ManifestRef,
    headers: &HeaderMap,
    mut body: Body,
) -> Result<Response, RegistryError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if let Some(length) = content_length(headers)
        && length > MANIFEST_LIMIT as u64
    {
        return Err(RegistryError::ManifestTooLarge {
            limit: MANIFEST_LIMIT,
        });
    }
    let mut bytes = Vec::new();
    while let Some(chunk) = next_chunk(&mut body).await? {
        if bytes.len() + chunk.len() > MANIFEST_LIMIT {
            return Err(RegistryError::ManifestTooLarge {
                limit: MANIFEST_LIMIT,
            });
        }
        bytes.extend_from_slice(&chunk);
    }
    let location_name = name.clone();
    let digest =
        blocking(move || store.put_manifest(&name, &reference, &bytes, content_type.as_deref()))
            .await?;
    let location = format!("/v2/{location_name}/manifests/{digest}");
    Ok((
        StatusCode::CREATED,
        [
            (header::LOCATION, header_value(&location)),
            (header::CONTENT_LENGTH, HeaderValue::from(0)),
            (
                header::HeaderName::from_static(CONTENT_DIGEST),
                header_value(digest.as_str()),
            ),
        ],
    )
        .into_response())
}

async fn get_blob(
    store: RegistryStore,
    digest: Digest,
    head: bool,
) -> Result<Response, RegistryError> {
    let path = store.blob_path(&digest);
    let file = match tokio::fs::File::open(&path).await {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(RegistryError::BlobUnknown {
                digest: digest.to_string(),
            });
        }
        Err(source) => return Err(RegistryError::Io { path, source }),
    };
    let size = file
        .metadata()
        .await
        .map_err(|source| RegistryError::Io {
            path: path.clone(),
            source,
        })?
        .len();
    // The file is opened before the headers are sent, so a blob is served
    // whole or not at all: blobs are never rewritten in place, only renamed
    // into place once complete.
    let body = if head {
        Body::empty()
    } else {
        Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
            file,
            STREAM_CHUNK,
        ))
    };
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    headers.insert(CONTENT_DIGEST, header_value(digest.as_str()));
    Ok(response)
}

async fn start_upload(
    store: RegistryStore,
    name: RepositoryName,
    query: &Query,
    body: Body,
) -> Result<Response, RegistryError> {
    // Cross-repository mount: blobs are shared, so any blob the store has
    // can be "mounted" at once; otherwise the spec says start an upload.
    if let Some(mount) = query.get("mount") {
        let digest = Digest::parse(mount)?;
        let exists = blocking({
            let store = store.clone();
            let digest = digest.clone();
            move || store.blob_size(&digest)
        })
        .await?
        .is_some();
        if exists {
            return Ok(blob_created(&name, &digest));
        }
    }
    let id = blocking({
        let store = store.clone();
        move || store.start_upload()
    })
    .await?;
    if let Some(digest) = query.get("digest") {
        // Monolithic upload: the whole blob is this request's body.
        let digest = Digest::parse(digest)?;
        if let Err(err) = append(&store, &id, body).await {
            let _ = blocking(move || store.cancel_upload(&id)).await;
            return Err(err);
        }
        return finish_upload(store, name, id, digest).await;
    }
    Ok(upload_accepted(StatusCode::ACCEPTED, &name, &id, 0))
}

async fn patch_upload(
    store: RegistryStore,
    name: RepositoryName,
    id: String,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, RegistryError> {
    let size = blocking({
        let store = store.clone();
        let id = id.clone();
        move || store.upload_size(&id)
    })
    .await?;
    // A chunk must continue where the session ends (`Content-Range:
    // <start>-<end>`); without the header it is appended, as docker does.
    if let Some(range) = headers
        .get(header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
    {
        let start = range
            .trim()
            .trim_start_matches("bytes ")
            .trim_start_matches("bytes=")
            .split('-')
            .next()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| RegistryError::BlobUploadInvalid {
                reason: format!("malformed Content-Range {range:?}"),
            })?;
        if start != size {
            return Err(RegistryError::RangeInvalid { id, start, size });
        }
    }
    let size = append(&store, &id, body).await?;
    Ok(upload_accepted(StatusCode::ACCEPTED, &name, &id, size))
}

async fn finish_upload(
    store: RegistryStore,
    name: RepositoryName,
    id: String,
    digest: Digest,
) -> Result<Response, RegistryError> {
    let committed = digest.clone();
    blocking(move || store.finish_upload(&id, &committed)).await?;
    Ok(blob_created(&name, &digest))
}

/// Appends a request body to upload `id` as it arrives; returns the
/// session's size afterwards.
async fn append(store: &RegistryStore, id: &str, mut body: Body) -> Result<u64, RegistryError> {
    let path = store.upload_path(id)?;
    let io = |source| RegistryError::Io {
        path: path.clone(),
        source,
    };
    let mut file = tokio::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .await
        .map_err(io)?;
    while let Some(chunk) = next_chunk(&mut body).await? {
        file.write_all(&chunk).await.map_err(io)?;
    }
    file.flush().await.map_err(io)?;
    Ok(file.metadata().await.map_err(io)?.len())
}

/// The next data frame of a request body (trailers are skipped).
async fn next_chunk(body: &mut Body) -> Result<Option<Bytes>, RegistryError> {
    loop {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await;
        match frame {
            None => return Ok(None),
            Some(Err(e)) => {
                return Err(RegistryError::BlobUploadInvalid {
                    reason: format!("request body: {e}"),
                });
            }
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    return Ok(Some(data));
                }
            }
        }
    }
}

/// `202 Accepted` (or `204`) for an upload session in progress.
fn upload_accepted(status: StatusCode, name: &RepositoryName, id: &str, size: u64) -> Response {
    let location = format!("/v2/{name}/blobs/uploads/{id}");
    // `Range` is inclusive; an empty session says `0-0`, as distribution.
    let range = format!("0-{}", size.saturating_sub(1));
    (
        status,
        [
            (header::LOCATION, header_value(&location)),
            (header::RANGE, header_value(&range)),
            (header::CONTENT_LENGTH, HeaderValue::from(0)),
            (
                header::HeaderName::from_static(UPLOAD_UUID),
                header_value(id),
            ),
        ],
    )
        .into_response()
}

/// `201 Created` for a blob now in the store.
fn blob_created(name: &RepositoryName, digest: &Digest) -> Response {
    let location = format!("/v2/{name}/blobs/{digest}");
    (
        StatusCode::CREATED,
        [
            (header::LOCATION, header_value(&location)),
            (header::CONTENT_LENGTH, HeaderValue::from(0)),
            (
                header::HeaderName::from_static(CONTENT_DIGEST),
                header_value(digest.as_str()),
            ),
        ],
    )
        .into_response()
}

/// A header value from text the store validated (names, digests, media
/// types); anything unprintable becomes empty rather than a panic.
fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// A request's query parameters, percent-decoded (`digest=sha256%3A…`).
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(query: Option<&str>) -> Query {
        Query(
            query
                .unwrap_or_default()
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Decodes `%XX` escapes (and `+` is kept: it is not a space in paths,
/// and digests and names never hold one). Invalid escapes stay as they are.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_at_the_last_api_segment() {
        assert_eq!(
            parse_route("gantry.test/web/manifests/latest"),
            Some(Route::Manifest("gantry.test/web".into(), "latest".into()))
        );
        assert_eq!(
            parse_route("127.0.0.1:5000/a/manifests/b/manifests/v1"),
            Some(Route::Manifest(
                "127.0.0.1:5000/a/manifests/b".into(),
                "v1".into()
            ))
        );
        assert_eq!(
            parse_route("a/b/blobs/sha256:00"),
            Some(Route::Blob("a/b".into(), "sha256:00".into()))
        );
        assert_eq!(
            parse_route("a/blobs/uploads/"),
            Some(Route::UploadStart("a".into()))
        );
        assert_eq!(
            parse_route("a/blobs/uploads/xyz"),
            Some(Route::Upload("a".into(), "xyz".into()))
        );
        assert_eq!(parse_route("a/tags/list"), Some(Route::Tags("a".into())));
        assert_eq!(parse_route("a/manifests/"), None);
        assert_eq!(parse_route("_catalog"), None);
    }

    #[test]
    fn queries_are_percent_decoded() {
        let q = Query::parse(Some("digest=sha256%3Aab&mount=x&from=a%2Fb&empty"));
        assert_eq!(q.get("digest"), Some("sha256:ab"));
        assert_eq!(q.get("from"), Some("a/b"));
        assert_eq!(q.get("empty"), Some(""));
        assert_eq!(q.get("missing"), None);
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn errors_carry_the_spec_codes() {
        let err = RegistryError::BlobUnknown {
            digest: "sha256:00".into(),
        };
        assert_eq!(err.code(), "BLOB_UNKNOWN");
        assert_eq!(err.status(), StatusCode::NOT_FOUND);
        let err = RegistryError::ManifestBlobUnknown {
            digest: "sha256:00".into(),
        };
        assert_eq!(err.code(), "MANIFEST_BLOB_UNKNOWN");
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
    }
}
