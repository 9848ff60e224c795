//! Pulling an image from a registry into the store: resolve the reference to
//! a manifest (following an index to this host's platform), fetch the config
//! and layer blobs (verified as they stream in), unpack, record.

use super::blobs;
use super::manifest::{self, Parsed};
use super::reference::Reference;
use super::registry::{Credentials, RegistryClient, RegistryError, RegistryOptions};
use super::{ImageError, ImageRecord, ImageStore};
use std::fmt;
use std::io::BufReader;

/// Options of a pull.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Use plain HTTP even for a non-loopback registry.
    pub insecure: bool,
    /// Credentials for token or basic auth.
    pub credentials: Option<Credentials>,
    /// A registry to try first (`http://host:port`), such as the controller
    /// that holds images loaded with `gantry image load`; see
    /// [`RegistryClient::for_mirror`] for how it names repositories.
    pub mirror: Option<String>,
    /// With a mirror: when the mirror does not have the image (404), pull
    /// from the registry the reference names. A mirror that cannot be
    /// reached is an error either way, never a reason to go elsewhere.
    pub fallback_to_origin: bool,
}

/// A step of a pull, for progress output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullProgress {
    /// The reference resolved to this manifest digest.
    Resolved {
        /// The normalised reference.
        reference: String,
        /// The manifest's digest.
        digest: String,
    },
    /// A blob is already in the store.
    Exists {
        /// The blob's digest.
        digest: String,
    },
    /// A blob download started.
    Downloading {
        /// The blob's digest.
        digest: String,
        /// Its size in bytes.
        size: u64,
    },
    /// A blob was downloaded and verified.
    Verified {
        /// The blob's digest.
        digest: String,
    },
    /// Layers are being unpacked.
    Unpacking,
}

impl fmt::Display for PullProgress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let short = |d: &str| {
            d.strip_prefix("sha256:")
                .unwrap_or(d)
                .chars()
                .take(12)
                .collect::<String>()
        };
        match self {
            PullProgress::Resolved { reference, digest } => {
                write!(f, "{reference}: resolved to {digest}")
            }
            PullProgress::Exists { digest } => write!(f, "{}: already exists", short(digest)),
            PullProgress::Downloading { digest, size } => {
                write!(f, "{}: downloading {size} bytes", short(digest))
            }
            PullProgress::Verified { digest } => write!(f, "{}: verified", short(digest)),
            PullProgress::Unpacking => write!(f, "unpacking layers"),
        }
    }
}

pub(super) fn pull(
    store: &ImageStore,
    input: &str,
    options: &PullOptions,
    progress: &mut dyn FnMut(PullProgress),
) -> Result<ImageRecord, ImageError> {
    let reference = Reference::parse(input)?;
    let registry_options = RegistryOptions {
        insecure: options.insecure,
        credentials: options.credentials.clone(),
    };
    if let Some(mirror) = &options.mirror {
        let client = RegistryClient::for_mirror(mirror, &reference, &registry_options);
        match pull_with(store, input, reference.clone(), client, progress) {
            Err(ImageError::Registry(RegistryError::NotFound { .. }))
                if options.fallback_to_origin => {}
            done => return done,
        }
    }
    if reference.is_reserved_registry() {
        return Err(RegistryError::ReservedName {
            host: reference.registry_host().to_string(),
        }
        .into());
    }
    let client = RegistryClient::new(&reference, &registry_options);
    pull_with(store, input, reference, client, progress)
}

fn pull_with(
    store: &ImageStore,
    input: &str,
    reference: Reference,
    mut client: RegistryClient,
    progress: &mut dyn FnMut(PullProgress),
) -> Result<ImageRecord, ImageError> {
    let blobs = store.blobs();
    let host = manifest::host_platform();

    // Resolve the reference; an index is followed to this host's platform.
    let mut wanted = reference.manifest_reference().to_string();
    let mut expected = reference.digest.clone();
    let mut resolved = None;
    for _depth in 0..4 {
        let fetched = client.manifest(&wanted)?;
        let content_type = fetched.content_type.clone();
        let header_digest = fetched.digest.clone();
        let bytes = RegistryClient::read_small(fetched, &wanted)?;
        let digest = blobs::sha256_digest(&bytes);
        // A manifest asked for by digest must hash to it; one asked for by
        // tag must at least match what the registry says it is.
        if let Some(expected) = expected.as_ref().or(header_digest.as_ref())
            && *expected != digest
        {
            return Err(blobs::BlobError::DigestMismatch {
                digest: expected.clone(),
                actual: digest,
            }
            .into());
        }
        blobs.write_bytes(&bytes)?;
        let content_type = content_type
            .as_deref()
            .map(|c| c.split(';').next().unwrap_or(c).trim());
        match manifest::parse(&bytes, &digest, content_type)? {
            Parsed::Manifest(m) => {
                resolved = Some((m, digest));
                break;
            }
            Parsed::Index(list) => {
                let chosen = manifest::select_platform(&list, &digest, &host)?;
                wanted = chosen.digest.clone();
                expected = Some(chosen.digest.clone());
            }
        }
    }
    let Some((manifest, digest)) = resolved else {
        return Err(RegistryError::Status {
            url: input.to_string(),
            status: 0,
            body: "indexes nested too deep".to_string(),
        }
        .into());
    };
    progress(PullProgress::Resolved {
        reference: reference.to_string(),
        digest: digest.clone(),
    });

    for descriptor in std::iter::once(&manifest.config).chain(&manifest.layers) {
        if blobs.contains(&descriptor.digest) {
            progress(PullProgress::Exists {
                digest: descriptor.digest.clone(),
            });
            continue;
        }
        progress(PullProgress::Downloading {
            digest: descriptor.digest.clone(),
            size: descriptor.size,
        });
        let fetched = client.blob(&descriptor.digest)?;
        blobs.write(
            &descriptor.digest,
            Some(descriptor.size),
            BufReader::with_capacity(256 << 10, fetched.body),
        )?;
        progress(PullProgress::Verified {
            digest: descriptor.digest.clone(),
        });
    }
    progress(PullProgress::Unpacking);
    let mut names = vec![reference.clone()];
    // Pulled by digest: also remember it by repository@digest only.
    if reference.tag.is_some() && reference.digest.is_some() {
        names = vec![Reference {
            tag: None,
            ..reference
        }];
    }
    store.add_image(&manifest, &digest, &names)
}
