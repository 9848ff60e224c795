//! Manifests and indexes in both dialects: OCI (image manifest, image index)
//! and Docker (schema 2 manifest, manifest list). They share one JSON shape,
//! so one lenient set of types reads all four; media types tell them apart.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI uncompressed layer.
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// OCI gzip layer.
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// OCI zstd layer.
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// Every manifest media type we can read, for the registry's Accept header.
pub const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// Errors of manifest handling.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The document is not valid manifest or index JSON.
    #[error("manifest {digest}: {source}")]
    Json {
        /// The digest (or name) of the document.
        digest: String,
        /// What the parser said.
        #[source]
        source: serde_json::Error,
    },
    /// The document is neither a manifest nor an index we understand.
    #[error("manifest {digest}: unsupported media type {media_type:?}")]
    UnsupportedMediaType {
        /// The digest of the document.
        digest: String,
        /// Its media type.
        media_type: String,
    },
    /// An index has no manifest for this host's platform.
    #[error("index {digest} has no manifest for {platform}")]
    NoMatchingPlatform {
        /// The digest of the index.
        digest: String,
        /// The platform looked for, e.g. `linux/amd64`.
        platform: String,
    },
    /// A layer has a media type that is not a tar layer.
    #[error("layer {digest}: unsupported media type {media_type:?}")]
    UnsupportedLayer {
        /// The layer's digest.
        digest: String,
        /// Its media type.
        media_type: String,
    },
}

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// The media type of the referenced content.
    #[serde(default)]
    pub media_type: String,
    /// Its digest.
    pub digest: String,
    /// Its size in bytes.
    pub size: u64,
    /// The platform (in indexes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Annotations, e.g. `org.opencontainers.image.ref.name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// The platform of a manifest in an index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// CPU architecture, GOARCH style (`amd64`).
    pub architecture: String,
    /// Operating system (`linux`).
    pub os: String,
    /// Architecture variant (`v8`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// A manifest or an index: whichever fields the document has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Document {
    /// Always 2.
    pub schema_version: u32,
    /// The media type, when the document states it (OCI makes it optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// Manifests only: the config blob.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<Descriptor>,
    /// Manifests only: the layers, bottom first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<Vec<Descriptor>>,
    /// Indexes only: the manifests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifests: Option<Vec<Descriptor>>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// A manifest reduced to what the store needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The config blob.
    pub config: Descriptor,
    /// The layer blobs, bottom first.
    pub layers: Vec<Descriptor>,
}

/// What a fetched document turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// An image manifest.
    Manifest(Manifest),
    /// An index or manifest list.
    Index(Vec<Descriptor>),
}

/// Parses a manifest or index. `header_type` is the Content-Type a registry
/// sent, used when the document does not name its own media type.
pub fn parse(
    bytes: &[u8],
    digest: &str,
    header_type: Option<&str>,
) -> Result<Parsed, ManifestError> {
    let doc: Document = serde_json::from_slice(bytes).map_err(|source| ManifestError::Json {
        digest: digest.to_string(),
        source,
    })?;
    let media_type = doc
        .media_type
        .clone()
        .or_else(|| header_type.map(str::to_string))
        .unwrap_or_default();
    let unsupported = || ManifestError::UnsupportedMediaType {
        digest: digest.to_string(),
        media_type: media_type.clone(),
    };
    match (media_type.as_str(), doc.config, doc.layers, doc.manifests) {
        (OCI_INDEX | DOCKER_LIST | "", None, None, Some(manifests)) => Ok(Parsed::Index(manifests)),
        (OCI_MANIFEST | DOCKER_MANIFEST | "", Some(config), layers, None) => {
            let layers = layers.unwrap_or_default();
            for layer in &layers {
                layer_compression(layer)?;
            }
            Ok(Parsed::Manifest(Manifest { config, layers }))
        }
        _ => Err(unsupported()),
    }
}

/// The platform this host runs, GOARCH style.
pub fn host_platform() -> Platform {
    let architecture = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    Platform {
        architecture: architecture.to_string(),
        os: "linux".to_string(),
        variant: None,
    }
}

/// Picks the entry of an index for `platform` (OS and architecture must
/// match; a variant is not required to).
pub fn select_platform<'a>(
    manifests: &'a [Descriptor],
    index_digest: &str,
    platform: &Platform,
) -> Result<&'a Descriptor, ManifestError> {
    manifests
        .iter()
        .find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == platform.os && p.architecture == platform.architecture)
        })
        .ok_or_else(|| ManifestError::NoMatchingPlatform {
            digest: index_digest.to_string(),
            platform: format!("{}/{}", platform.os, platform.architecture),
        })
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
    /// Not stated by the media type: tell by the magic bytes.
    Sniff,
}

/// The compression of a layer, from its media type (OCI or Docker).
pub fn layer_compression(layer: &Descriptor) -> Result<Compression, ManifestError> {
    Ok(match layer.media_type.as_str() {
        OCI_LAYER_TAR | "application/vnd.oci.image.layer.nondistributable.v1.tar" => {
            Compression::None
        }
        OCI_LAYER_GZIP
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Compression::Gzip,
        OCI_LAYER_ZSTD | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Compression::Zstd,
        "" | "application/vnd.docker.image.rootfs.diff.tar" => Compression::Sniff,
        other => {
            return Err(ManifestError::UnsupportedLayer {
                digest: layer.digest.clone(),
                media_type: other.to_string(),
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_dialects() {
        let m = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",
            "config":{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"sha256:aa","size":1},
            "layers":[{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","digest":"sha256:bb","size":2}]}"#;
        let Parsed::Manifest(m) = parse(m, "m", None).unwrap() else {
            panic!("not a manifest")
        };
        assert_eq!(m.layers.len(), 1);
        assert_eq!(layer_compression(&m.layers[0]).unwrap(), Compression::Gzip);
        let i = br#"{"schemaVersion":2,"manifests":[
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:cc","size":3,"platform":{"architecture":"arm64","os":"linux"}},
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:dd","size":3,"platform":{"architecture":"amd64","os":"linux"}}]}"#;
        let Parsed::Index(list) = parse(i, "i", Some(OCI_INDEX)).unwrap() else {
            panic!("not an index")
        };
        let amd64 = Platform {
            architecture: "amd64".into(),
            os: "linux".into(),
            variant: None,
        };
        assert_eq!(
            select_platform(&list, "i", &amd64).unwrap().digest,
            "sha256:dd"
        );
        let s390 = Platform {
            architecture: "s390x".into(),
            ..amd64
        };
        let err = select_platform(&list, "sha256:ii", &s390).unwrap_err();
        assert!(err.to_string().contains("linux/s390x"), "{err}");
    }

    #[test]
    fn foreign_layer_types_are_refused() {
        let m = br#"{"schemaVersion":2,"config":{"digest":"sha256:aa","size":1},
            "layers":[{"mediaType":"application/vnd.in-toto+json","digest":"sha256:bb","size":2}]}"#;
        let err = parse(m, "m", None).unwrap_err();
        assert!(err.to_string().contains("sha256:bb"), "{err}");
    }
}
