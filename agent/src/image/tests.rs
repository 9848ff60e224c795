//! Store-level tests: layer unpacking on the real file system (whiteouts,
//! opaque dirs, hostile entries, an overlay mount of two layers) and the
//! import → list → lease → remove → gc cycle.

use super::blobs::sha256_digest;
use super::manifest::{self, Compression};
use super::unpack::{UnpackError, get_xattr, unpack_layer};
use super::*;
use std::os::unix::fs::FileTypeExt;

/// An entry of a test layer.
enum E<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8]),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
}

/// Builds an uncompressed layer tar. Paths are written raw into the header
/// (the tar crate's own setters refuse `..`, which hostile tars contain).
fn layer(entries: &[E<'_>]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut header = tar::Header::new_gnu();
        let (path, kind, data, link): (&str, tar::EntryType, &[u8], Option<&str>) = match entry {
            E::Dir(p) => (p, tar::EntryType::Directory, b"", None),
            E::File(p, d) => (p, tar::EntryType::Regular, d, None),
            E::Symlink(p, t) => (p, tar::EntryType::Symlink, b"", Some(t)),
            E::Hardlink(p, t) => (p, tar::EntryType::Link, b"", Some(t)),
        };
        let name = &mut header.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        if let Some(link) = link {
            let linkname = &mut header.as_old_mut().linkname;
            linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        header.set_entry_type(kind);
        header.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        header.set_size(data.len() as u64);
        header.set_mtime(1_700_000_000);
        header.set_uid(0);
        header.set_gid(0);
        header.set_cksum();
        builder.append(&header, data).unwrap();
    }
    builder.into_inner().unwrap()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn unpack(entries: &[E<'_>]) -> (tempfile::TempDir, Result<String, UnpackError>) {
    let dir = tempfile::tempdir().unwrap();
    let result = unpack_layer(&layer(entries)[..], Compression::None, dir.path());
    (dir, result)
}

fn assert_refused(entries: &[E<'_>], entry: &str) {
    let (dir, result) = unpack(entries);
    match result {
        Err(err @ UnpackError::Unsafe { .. }) => {
            assert!(err.to_string().contains(entry), "{err} should name {entry}");
        }
        other => panic!("expected {entry} to be refused, got {other:?}"),
    }
    // Nothing escaped next to the layer root.
    let parent = dir.path().parent().unwrap();
    assert!(!parent.join("x").exists());
}

#[test]
fn diff_id_is_the_digest_of_the_uncompressed_tar() {
    let tar = layer(&[E::Dir("etc/"), E::File("etc/hostname", b"box\n")]);
    let dir = tempfile::tempdir().unwrap();
    let diff_id = unpack_layer(&gzip(&tar)[..], Compression::Sniff, dir.path()).unwrap();
    assert_eq!(diff_id, sha256_digest(&tar));
    assert_eq!(fs::read(dir.path().join("etc/hostname")).unwrap(), b"box\n");
}

#[test]
fn parent_dot_dot_is_refused() {
    assert_refused(&[E::File("../x", b"evil")], "../x");
    assert_refused(&[E::File("a/../../x", b"evil")], "a/../../x");
}

#[test]
fn absolute_paths_are_refused() {
    assert_refused(&[E::File("/etc/x", b"evil")], "/etc/x");
}

#[test]
fn writing_through_a_symlinked_parent_is_refused() {
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().to_str().unwrap().to_string();
    let (_dir, result) = unpack(&[E::Symlink("lib", &target), E::File("lib/x", b"evil")]);
    let err = result.unwrap_err();
    assert!(err.to_string().contains("lib/x"), "{err}");
    assert!(err.to_string().contains("symlink"), "{err}");
    assert!(!outside.path().join("x").exists());
}

#[test]
fn a_file_over_a_planted_symlink_replaces_the_link() {
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim");
    fs::write(&victim, b"safe").unwrap();
    let (dir, result) = unpack(&[
        E::Symlink("x", victim.to_str().unwrap()),
        E::File("x", b"evil"),
    ]);
    result.unwrap();
    assert_eq!(fs::read(&victim).unwrap(), b"safe");
    assert_eq!(fs::read(dir.path().join("x")).unwrap(), b"evil");
}

#[test]
fn hardlinks_outside_the_layer_are_refused() {
    assert_refused(&[E::Hardlink("x", "../../etc/passwd")], "x");
    assert_refused(&[E::Hardlink("x", "/etc/passwd")], "x");
    let outside = tempfile::tempdir().unwrap();
    let (_dir, result) = unpack(&[
        E::Symlink("lib", outside.path().to_str().unwrap()),
        E::Hardlink("x", "lib/file"),
    ]);
    assert!(
        matches!(result, Err(UnpackError::Unsafe { .. })),
        "{result:?}"
    );
    // A target that is not (yet) in this layer is refused too.
    assert_refused(&[E::Hardlink("x", "etc/passwd")], "x");
}

#[test]
fn hardlinks_inside_the_layer_work() {
    let (dir, result) = unpack(&[E::File("a", b"same"), E::Hardlink("b", "a")]);
    result.unwrap();
    use std::os::unix::fs::MetadataExt;
    let a = fs::metadata(dir.path().join("a")).unwrap();
    let b = fs::metadata(dir.path().join("b")).unwrap();
    assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()));
}

#[test]
fn whiteouts_and_opaque_dirs_become_overlayfs_markers() {
    let (dir, result) = unpack(&[
        E::Dir("etc/"),
        E::File("etc/.wh.motd", b""),
        E::Dir("var/"),
        E::File("var/.wh..wh..opq", b""),
    ]);
    result.unwrap();
    let whiteout = fs::symlink_metadata(dir.path().join("etc/motd")).unwrap();
    assert!(whiteout.file_type().is_char_device());
    use std::os::unix::fs::MetadataExt;
    assert_eq!(whiteout.rdev(), 0);
    assert!(!dir.path().join("etc/.wh.motd").exists());
    assert_eq!(
        get_xattr(&dir.path().join("var"), "trusted.overlay.opaque").unwrap(),
        b"y"
    );
    assert!(!dir.path().join("var/.wh..wh..opq").exists());
}

/// Unmounts on drop, so a failing assertion does not leave a mount behind.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn stacked_layers_hide_whited_out_files_in_a_real_overlay() {
    if !nix::unistd::Uid::effective().is_root() {
        println!("SKIPPED: mounting overlayfs needs root");
        return;
    }
    let lower = layer(&[
        E::Dir("etc/"),
        E::File("etc/motd", b"hello"),
        E::File("etc/keep", b"kept"),
        E::Dir("var/"),
        E::File("var/old", b"old"),
    ]);
    let upper = layer(&[
        E::Dir("etc/"),
        E::File("etc/.wh.motd", b""),
        E::Dir("var/"),
        E::File("var/.wh..wh..opq", b""),
        E::File("var/new", b"new"),
    ]);
    let root = tempfile::tempdir().unwrap();
    let (l0, l1, merged) = (
        root.path().join("l0"),
        root.path().join("l1"),
        root.path().join("merged"),
    );
    for dir in [&l0, &l1, &merged] {
        fs::create_dir(dir).unwrap();
    }
    unpack_layer(&lower[..], Compression::None, &l0).unwrap();
    unpack_layer(&upper[..], Compression::None, &l1).unwrap();
    // Lower dirs only (no upper): read-only overlay, as the stack an engine
    // puts under a container's own upper dir.
    let options = format!("lowerdir={}:{}", l1.display(), l0.display());
    nix::mount::mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        nix::mount::MsFlags::MS_RDONLY,
        Some(options.as_str()),
    )
    .unwrap();
    let _guard = Mount(merged.clone());
    assert!(
        !merged.join("etc/motd").exists(),
        "whited-out file is visible"
    );
    assert_eq!(fs::read(merged.join("etc/keep")).unwrap(), b"kept");
    assert!(
        !merged.join("var/old").exists(),
        "opaque dir shows lower content"
    );
    assert_eq!(fs::read(merged.join("var/new")).unwrap(), b"new");
}

// ----- the store -----

/// Writes an OCI layout with one image of the given layer tars.
fn write_layout(dir: &Path, layers: &[Vec<u8>], ref_name: Option<&str>) -> String {
    let blobs_dir = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs_dir).unwrap();
    let put = |bytes: &[u8]| {
        let digest = sha256_digest(bytes);
        fs::write(blobs_dir.join(&digest[7..]), bytes).unwrap();
        digest
    };
    let mut layer_descs = Vec::new();
    let mut diff_ids = Vec::new();
    for tar in layers {
        diff_ids.push(sha256_digest(tar));
        let gz = gzip(tar);
        layer_descs.push(serde_json::json!({
            "mediaType": manifest::OCI_LAYER_GZIP, "digest": put(&gz), "size": gz.len()
        }));
    }
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids}
    }))
    .unwrap();
    let config_digest = put(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": manifest::OCI_MANIFEST,
        "config": {"mediaType": manifest::OCI_CONFIG, "digest": config_digest, "size": config.len()},
        "layers": layer_descs
    }))
    .unwrap();
    let manifest_digest = put(&manifest);
    let mut desc = serde_json::json!({
        "mediaType": manifest::OCI_MANIFEST, "digest": manifest_digest, "size": manifest.len()
    });
    if let Some(name) = ref_name {
        desc["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": name});
    }
    fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [desc]})).unwrap(),
    )
    .unwrap();
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    config_digest
}

fn two_layer_image(dir: &Path, name: Option<&str>) -> String {
    write_layout(
        dir,
        &[
            layer(&[E::Dir("etc/"), E::File("etc/motd", b"hi")]),
            layer(&[E::Dir("etc/"), E::File("etc/.wh.motd", b"")]),
        ],
        name,
    )
}

#[test]
fn import_list_resolve_and_layer_dirs() {
    let data = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    let id = two_layer_image(src.path(), Some("busybox:test"));
    let store = ImageStore::open(data.path().join("images")).unwrap();
    let records = store.import(src.path(), &ImportOptions::default()).unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].id, id);
    assert_eq!(records[0].names, vec!["docker.io/library/busybox:test"]);
    assert_eq!(store.resolve("busybox:test").unwrap().id, id);
    assert_eq!(store.resolve(&id[7..19]).unwrap().id, id);
    assert_eq!(store.resolve(&id).unwrap().id, id);
    assert!(matches!(
        store.resolve("busybox"),
        Err(ImageError::NotFound(_))
    ));
    let dirs = store.layer_dirs(&records[0]).unwrap();
    assert_eq!(dirs.len(), 2);
    assert_eq!(fs::read(dirs[0].join("etc/motd")).unwrap(), b"hi");
    let config = store.config(&records[0]).unwrap();
    assert_eq!(
        config.config().as_ref().unwrap().cmd().as_deref(),
        Some(&["/bin/sh".to_string()][..])
    );
    // Nothing left in staging after a successful import.
    assert_eq!(fs::read_dir(store.tmp_dir()).unwrap().count(), 0);
}

#[test]
fn a_corrupt_layer_blob_is_refused_naming_its_digest() {
    let data = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    two_layer_image(src.path(), Some("app:v1"));
    // Flip a byte of the biggest blob (a layer).
    let blobs_dir = src.path().join("blobs/sha256");
    let mut files: Vec<_> = fs::read_dir(&blobs_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort_by_key(|p| fs::metadata(p).unwrap().len());
    let victim = files.last().unwrap().clone();
    let mut bytes = fs::read(&victim).unwrap();
    let n = bytes.len() - 1;
    bytes[n] ^= 0xff;
    fs::write(&victim, bytes).unwrap();
    let store = ImageStore::open(data.path().join("images")).unwrap();
    let err = store
        .import(src.path(), &ImportOptions::default())
        .unwrap_err();
    let name = victim.file_name().unwrap().to_string_lossy().into_owned();
    assert!(err.to_string().contains(&name), "{err}");
    assert!(err.is_user_error());
    assert!(store.list().unwrap().is_empty());
    assert!(!store.blobs().contains(&format!("sha256:{name}")));
}

#[test]
fn leases_block_removal_and_gc_frees_only_unused_content() {
    let data = tempfile::tempdir().unwrap();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    two_layer_image(a.path(), Some("app:a"));
    write_layout(
        b.path(),
        &[layer(&[E::File("only-b", b"b")])],
        Some("app:b"),
    );
    let store = ImageStore::open(data.path().join("images")).unwrap();
    let image_a = store
        .import(a.path(), &ImportOptions::default())
        .unwrap()
        .remove(0);
    let image_b = store
        .import(b.path(), &ImportOptions::default())
        .unwrap()
        .remove(0);
    store.add_lease("ctr-1", &image_a).unwrap();
    let err = store.remove("app:a", false).unwrap_err();
    assert!(err.to_string().contains("ctr-1"), "{err}");
    assert_eq!(store.list().unwrap().len(), 2);

    // Removing b then gc frees b's blobs and snapshot, and keeps a's.
    let removed = store.remove("app:b", false).unwrap();
    assert_eq!(
        removed,
        vec![
            Removed::Untagged("docker.io/library/app:b".into()),
            Removed::Deleted(image_b.id.clone())
        ]
    );
    let report = store.gc().unwrap();
    assert_eq!(report.blobs.len(), 3, "{report:?}");
    assert_eq!(report.snapshots.len(), 1, "{report:?}");
    assert!(report.bytes_freed > 0);
    assert!(
        store
            .layer_dirs(&image_a)
            .unwrap()
            .iter()
            .all(|d| d.is_dir())
    );

    // Forced removal of a leased image untags it but keeps it for the lease.
    store.remove("app:a", true).unwrap();
    assert!(store.gc().unwrap().blobs.is_empty());
    store.remove_lease("ctr-1").unwrap();
    let report = store.gc().unwrap();
    assert_eq!(report.images, vec![image_a.id.clone()]);
    assert!(store.list().unwrap().is_empty());
    assert!(store.blobs().list().unwrap().is_empty());
}

#[test]
fn retagging_moves_a_name_and_extra_names_are_untagged_first() {
    let data = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    two_layer_image(src.path(), Some("app:v1"));
    let store = ImageStore::open(data.path().join("images")).unwrap();
    store.import(src.path(), &ImportOptions::default()).unwrap();
    let options = ImportOptions {
        tag: Some("other:v2".into()),
    };
    let record = store.import(src.path(), &options).unwrap().remove(0);
    assert_eq!(
        record.names,
        vec!["docker.io/library/app:v1", "docker.io/library/other:v2"]
    );
    let removed = store.remove("other:v2", false).unwrap();
    assert_eq!(
        removed,
        vec![Removed::Untagged("docker.io/library/other:v2".into())]
    );
    assert_eq!(store.list().unwrap().len(), 1);
}

#[test]
fn chain_ids_follow_the_oci_definition() {
    let a = format!("sha256:{}", "a".repeat(64));
    let b = format!("sha256:{}", "b".repeat(64));
    let chains = chain_ids(&[a.clone(), b.clone()]);
    assert_eq!(chains[0], a);
    assert_eq!(chains[1], sha256_digest(format!("{a} {b}").as_bytes()));
}
