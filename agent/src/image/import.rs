//! Importing images from files: OCI image layouts (a directory), OCI
//! archives (a tar of a layout) and `docker save` archives, both the classic
//! format (`manifest.json` + `<id>/layer.tar`) and the newer one that is also
//! an OCI layout.
//!
//! Archives are first extracted into the store's `tmp/` (regular files and
//! directories only; links are resolved inside the archive) and then read as
//! directories: one code path, and nothing in an archive can point outside it.

use super::blobs::{self, HashingReader};
use super::manifest::{self, Descriptor, Document, Manifest, Parsed};
use super::reference::Reference;
use super::unpack::clean_entry_path;
use super::{ImageError, ImageRecord, ImageStore, io_error};
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// The OCI annotation naming an image (a tag, or a full reference).
const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// containerd's (and Docker 25+'s) annotation with the full image name.
const CONTAINERD_NAME: &str = "io.containerd.image.name";

/// Options of an import.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Name the imported image this, instead of the names in the archive.
    /// Only valid when the archive holds exactly one image.
    pub tag: Option<String>,
}

pub(super) fn import(
    store: &ImageStore,
    path: &Path,
    options: &ImportOptions,
) -> Result<Vec<ImageRecord>, ImageError> {
    let tag = options.tag.as_deref().map(Reference::parse).transpose()?;
    let meta = fs::metadata(path).map_err(io_error(path))?;
    if meta.is_dir() {
        return import_dir(store, path, path, tag.as_ref());
    }
    let tmp = store.tmp_dir();
    let staging = tempfile::Builder::new()
        .prefix("import-")
        .tempdir_in(&tmp)
        .map_err(io_error(&tmp))?;
    extract_archive(path, staging.path())?;
    import_dir(store, staging.path(), path, tag.as_ref())
}

fn invalid(path: &Path, reason: impl Into<String>) -> ImageError {
    ImageError::InvalidArchive {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// An image found in a layout or archive, before it is added.
struct Found {
    manifest: Manifest,
    manifest_digest: String,
    names: Vec<Reference>,
}

fn import_dir(
    store: &ImageStore,
    dir: &Path,
    source: &Path,
    tag: Option<&Reference>,
) -> Result<Vec<ImageRecord>, ImageError> {
    let docker_tags = read_docker_manifest(dir, source)?;
    let found = if dir.join("oci-layout").is_file() && dir.join("index.json").is_file() {
        let mut found = read_oci_layout(store, dir, source)?;
        // Docker 25+ writes both formats; when the index carries no names,
        // its manifest.json's RepoTags still do.
        if let Some(entries) = &docker_tags {
            for image in &mut found {
                if image.names.is_empty()
                    && let Some(entry) = entries
                        .iter()
                        .find(|e| e.config.ends_with(hex_of(&image.manifest.config.digest)))
                {
                    image.names = parse_names(&entry.repo_tags, source)?;
                }
            }
        }
        found
    } else if let Some(entries) = docker_tags {
        read_docker_save(store, dir, source, &entries)?
    } else {
        return Err(invalid(
            source,
            "neither an OCI image layout (oci-layout, index.json) nor a docker save archive (manifest.json)",
        ));
    };
    if found.is_empty() {
        return Err(invalid(source, "holds no image for this platform"));
    }
    if tag.is_some() && found.len() > 1 {
        return Err(invalid(
            source,
            format!("--tag given but the archive holds {} images", found.len()),
        ));
    }
    found
        .into_iter()
        .map(|image| {
            let names = match tag {
                Some(tag) => vec![tag.clone()],
                None => image.names,
            };
            store.add_image(&image.manifest, &image.manifest_digest, &names)
        })
        .collect()
}

fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

fn parse_names(names: &[String], source: &Path) -> Result<Vec<Reference>, ImageError> {
    names
        .iter()
        .map(|n| Reference::parse(n).map_err(|e| invalid(source, e.to_string())))
        .collect()
}

/// Copies a blob of a layout into the store, verified against `descriptor`.
fn import_blob(
    store: &ImageStore,
    dir: &Path,
    source: &Path,
    descriptor: &Descriptor,
) -> Result<(), ImageError> {
    let hex = blobs::digest_hex(&descriptor.digest)?;
    let blobs = store.blobs();
    if blobs.contains(&descriptor.digest) {
        return Ok(());
    }
    let path = dir.join("blobs/sha256").join(hex);
    let file = File::open(&path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            invalid(source, format!("blob {} is missing", descriptor.digest))
        } else {
            io_error(&path)(e)
        }
    })?;
    blobs.write(
        &descriptor.digest,
        Some(descriptor.size),
        BufReader::new(file),
    )?;
    Ok(())
}

fn read_oci_layout(
    store: &ImageStore,
    dir: &Path,
    source: &Path,
) -> Result<Vec<Found>, ImageError> {
    let index_path = dir.join("index.json");
    let bytes = fs::read(&index_path).map_err(io_error(&index_path))?;
    let index: Document =
        serde_json::from_slice(&bytes).map_err(|e| invalid(source, format!("index.json: {e}")))?;
    let manifests = index
        .manifests
        .ok_or_else(|| invalid(source, "index.json has no manifests"))?;
    let host = manifest::host_platform();
    let mut found = Vec::new();
    for descriptor in &manifests {
        if let Some(platform) = &descriptor.platform
            && (platform.os != host.os || platform.architecture != host.architecture)
        {
            continue;
        }
        let names = layout_names(descriptor, source)?;
        // Nested indexes (a multi-platform image) are followed, bounded.
        let mut current = descriptor.clone();
        for _depth in 0..4 {
            import_blob(store, dir, source, &current)?;
            let bytes = store.blobs().read(&current.digest)?;
            let media_type =
                (!current.media_type.is_empty()).then_some(current.media_type.as_str());
            match manifest::parse(&bytes, &current.digest, media_type)? {
                Parsed::Manifest(m) => {
                    import_blob(store, dir, source, &m.config)?;
                    for layer in &m.layers {
                        import_blob(store, dir, source, layer)?;
                    }
                    found.push(Found {
                        manifest: m,
                        manifest_digest: current.digest.clone(),
                        names,
                    });
                    break;
                }
                Parsed::Index(list) => {
                    current = manifest::select_platform(&list, &current.digest, &host)?.clone();
                }
            }
        }
    }
    Ok(found)
}

/// The names an OCI layout gives a manifest: containerd's full name, or the
/// ref.name annotation when it is a full reference (a bare tag such as
/// `latest` names no repository, so the image stays unnamed, as Docker does).
fn layout_names(descriptor: &Descriptor, source: &Path) -> Result<Vec<Reference>, ImageError> {
    let Some(annotations) = &descriptor.annotations else {
        return Ok(Vec::new());
    };
    let name = annotations.get(CONTAINERD_NAME).or_else(|| {
        annotations
            .get(REF_NAME)
            .filter(|n| n.contains('/') || n.contains(':'))
    });
    match name {
        Some(name) => parse_names(std::slice::from_ref(name), source),
        None => Ok(Vec::new()),
    }
}

/// One entry of a docker save `manifest.json`.
#[derive(Debug, serde::Deserialize)]
struct DockerEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Vec<String>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

fn read_docker_manifest(dir: &Path, source: &Path) -> Result<Option<Vec<DockerEntry>>, ImageError> {
    let path = dir.join("manifest.json");
    match fs::read(&path) {
        Ok(bytes) => {
            // `RepoTags: null` appears for untagged images.
            let value: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| invalid(source, format!("manifest.json: {e}")))?;
            let value = null_tags_to_empty(value);
            serde_json::from_value(value)
                .map(Some)
                .map_err(|e| invalid(source, format!("manifest.json: {e}")))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(&path)(e)),
    }
}

fn null_tags_to_empty(mut value: serde_json::Value) -> serde_json::Value {
    if let Some(entries) = value.as_array_mut() {
        for entry in entries {
            if let Some(obj) = entry.as_object_mut()
                && obj.get("RepoTags").is_some_and(|t| t.is_null())
            {
                obj.insert("RepoTags".into(), serde_json::Value::Array(Vec::new()));
            }
        }
    }
    value
}

/// A path named inside an archive, refused if it could leave the archive.
fn archive_path(dir: &Path, source: &Path, name: &str) -> Result<PathBuf, ImageError> {
    let rel = clean_entry_path(Path::new(name), name)
        .map_err(|e| invalid(source, e.to_string()))?
        .ok_or_else(|| invalid(source, format!("empty path {name:?} in manifest.json")))?;
    Ok(dir.join(rel))
}

/// Stores a file of unknown digest: hash it, then copy it in verified (the
/// copy re-hashes, so a file changed in between is still caught).
fn store_file(store: &ImageStore, path: &Path) -> Result<(String, u64), ImageError> {
    let file = File::open(path).map_err(io_error(path))?;
    let (digest, size) = HashingReader::new(BufReader::new(file))
        .finish()
        .map_err(io_error(path))?;
    let blobs = store.blobs();
    if !blobs.contains(&digest) {
        let file = File::open(path).map_err(io_error(path))?;
        blobs.write(&digest, Some(size), BufReader::new(file))?;
    }
    Ok((digest, size))
}

fn read_docker_save(
    store: &ImageStore,
    dir: &Path,
    source: &Path,
    entries: &[DockerEntry],
) -> Result<Vec<Found>, ImageError> {
    let mut found = Vec::new();
    for entry in entries {
        let config_path = archive_path(dir, source, &entry.config)?;
        let (config_digest, config_size) = store_file(store, &config_path)?;
        let mut layers = Vec::new();
        for layer in &entry.layers {
            let layer_path = archive_path(dir, source, layer)?;
            let (digest, size) = store_file(store, &layer_path)?;
            let media_type = match sniff_file(&layer_path)? {
                manifest::Compression::Gzip => manifest::OCI_LAYER_GZIP,
                manifest::Compression::Zstd => manifest::OCI_LAYER_ZSTD,
                _ => manifest::OCI_LAYER_TAR,
            };
            layers.push(Descriptor {
                media_type: media_type.to_string(),
                digest,
                size,
                platform: None,
                annotations: None,
            });
        }
        // The classic format has no manifest: write the OCI manifest the
        // image would have, so that every image in the store has one.
        let manifest_doc = Document {
            schema_version: 2,
            media_type: Some(manifest::OCI_MANIFEST.to_string()),
            config: Some(Descriptor {
                media_type: manifest::OCI_CONFIG.to_string(),
                digest: config_digest,
                size: config_size,
                platform: None,
                annotations: None,
            }),
            layers: Some(layers),
            manifests: None,
            annotations: None,
        };
        let bytes = serde_json::to_vec(&manifest_doc)
            .map_err(|e| invalid(source, format!("manifest: {e}")))?;
        let manifest_digest = store.blobs().write_bytes(&bytes)?;
        let Parsed::Manifest(manifest) = manifest::parse(&bytes, &manifest_digest, None)? else {
            return Err(invalid(source, "synthesised manifest is an index"));
        };
        found.push(Found {
            manifest,
            manifest_digest,
            names: parse_names(&entry.repo_tags, source)?,
        });
    }
    Ok(found)
}

fn sniff_file(path: &Path) -> Result<manifest::Compression, ImageError> {
    let mut head = [0u8; 4];
    let mut file = File::open(path).map_err(io_error(path))?;
    let n = file.read(&mut head).map_err(io_error(path))?;
    Ok(match &head[..n] {
        [0x1f, 0x8b, ..] => manifest::Compression::Gzip,
        [0x28, 0xb5, 0x2f, 0xfd] => manifest::Compression::Zstd,
        _ => manifest::Compression::None,
    })
}

/// Extracts an archive (optionally gzipped) into `dest`: directories and
/// regular files only; symlinks and hard links (classic docker save links
/// repeated layers) become hard links to their resolved target inside the
/// archive, and anything pointing outside is refused.
fn extract_archive(path: &Path, dest: &Path) -> Result<(), ImageError> {
    let file = File::open(path).map_err(io_error(path))?;
    let mut reader = BufReader::new(file);
    let head = reader.fill_buf().map_err(io_error(path))?;
    let stream: Box<dyn Read> = if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(reader))
    } else {
        Box::new(reader)
    };
    let bad = |reason: String| invalid(path, reason);
    let mut archive = tar::Archive::new(stream);
    // (entry, link target relative to the archive root)
    let mut links: Vec<(PathBuf, PathBuf)> = Vec::new();
    let mut entries = 0usize;
    for entry in archive
        .entries()
        .map_err(|e| bad(format!("not a tar archive: {e}")))?
    {
        let mut entry = entry.map_err(|e| {
            if entries == 0 {
                bad("not an OCI layout directory, OCI archive or docker save archive".into())
            } else {
                bad(format!("malformed tar: {}", tar_error_summary(&e)))
            }
        })?;
        entries += 1;
        let raw = entry
            .path()
            .map_err(|e| bad(format!("malformed tar: {}", tar_error_summary(&e))))?
            .into_owned();
        let name = raw.display().to_string();
        let Some(rel) = clean_entry_path(&raw, &name).map_err(|e| bad(e.to_string()))? else {
            continue;
        };
        let target = dest.join(&rel);
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                fs::create_dir_all(&target).map_err(io_error(&target))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if let Some(parent) = target.parent() {
                    fs::create_dir_all(parent).map_err(io_error(parent))?;
                }
                let mut out = File::create(&target).map_err(io_error(&target))?;
                io::copy(&mut entry, &mut out).map_err(|e| bad(format!("entry {name:?}: {e}")))?;
            }
            kind @ (tar::EntryType::Symlink | tar::EntryType::Link) => {
                let link = entry
                    .link_name()
                    .map_err(|e| bad(format!("entry {name:?}: {e}")))?
                    .ok_or_else(|| bad(format!("entry {name:?}: link without target")))?
                    .into_owned();
                let base = if kind == tar::EntryType::Symlink {
                    rel.parent().map(Path::to_path_buf).unwrap_or_default()
                } else {
                    PathBuf::new()
                };
                let resolved = normalize_within(&base, &link).ok_or_else(|| {
                    bad(format!(
                        "entry {name:?}: link to {} leaves the archive",
                        link.display()
                    ))
                })?;
                links.push((rel, resolved));
            }
            _ => {}
        }
    }
    if entries == 0 {
        return Err(bad("empty archive".to_string()));
    }
    // Links may point at other links: resolve in passes, bounded by count.
    let mut pending = links;
    for _pass in 0..=pending.len() {
        if pending.is_empty() {
            break;
        }
        let before = pending.len();
        pending.retain(|(rel, resolved)| {
            let source = dest.join(resolved);
            if !source.is_file() {
                return true;
            }
            let target = dest.join(rel);
            if let Some(parent) = target.parent() {
                let _ = fs::create_dir_all(parent);
            }
            let _ = fs::remove_file(&target);
            fs::hard_link(&source, &target).is_err()
        });
        if pending.len() == before {
            break;
        }
    }
    if let Some((rel, resolved)) = pending.first() {
        return Err(bad(format!(
            "entry {:?}: link target {} is not a file in the archive",
            rel.display().to_string(),
            resolved.display()
        )));
    }
    Ok(())
}

/// `base/link` with `.` and `..` applied lexically; `None` if it would go
/// above the archive root or is absolute.
fn normalize_within(base: &Path, link: &Path) -> Option<PathBuf> {
    use std::path::Component;
    if link.is_absolute() {
        return None;
    }
    let mut parts: Vec<_> = Vec::new();
    for component in base.components().chain(link.components()) {
        match component {
            Component::Normal(part) => parts.push(part.to_os_string()),
            Component::CurDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(parts.iter().collect::<PathBuf>()).filter(|p| !p.as_os_str().is_empty())
}

/// The tar crate's errors may quote raw header bytes (whole lines of a file
/// that is not a tar at all): keep the first line, bounded, for a readable
/// message.
fn tar_error_summary(err: &std::io::Error) -> String {
    let text = err.to_string();
    let line = text.lines().next().unwrap_or_default();
    match line.char_indices().nth(120) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_cannot_leave_the_archive() {
        assert_eq!(
            normalize_within(Path::new("a"), Path::new("../b/layer.tar")),
            Some(PathBuf::from("b/layer.tar"))
        );
        assert_eq!(
            normalize_within(Path::new("a"), Path::new("../../etc/passwd")),
            None
        );
        assert_eq!(
            normalize_within(Path::new(""), Path::new("/etc/passwd")),
            None
        );
    }
}
