//! End-to-end tests of `gantry image`: the real binary against a temporary
//! data directory, images the tests build themselves, and a real
//! `docker-registry` on loopback (anonymous and bearer-token auth).

use gantry_tests::gantry_bin;
use gantry_tests::image_fixtures::{Registry, TinyImage, TokenIssuer, have, skopeo_push, tar_dir};
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// Runs `gantry image --data-dir DATA ARGS...`.
fn gantry(data: &Path, args: &[&str]) -> Output {
    gantry_stdin(data, args, None)
}

fn gantry_stdin(data: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(gantry_bin())
        .arg("image")
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .env_remove("GANTRY_REGISTRY_USERNAME")
        .env_remove("GANTRY_REGISTRY_PASSWORD")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run gantry");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
    }
    drop(child.stdin.take());
    child.wait_with_output().expect("wait gantry")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[track_caller]
fn ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "gantry failed ({:?}): {}{}",
        output.status.code(),
        stdout(&output),
        stderr(&output)
    );
    stdout(&output)
}

fn ls_json(data: &Path) -> Vec<serde_json::Value> {
    serde_json::from_str(&ok(gantry(data, &["ls", "-o", "json"]))).expect("ls json")
}

/// The layer dirs from `inspect`, bottom first.
fn snapshots(data: &Path, name: &str) -> Vec<std::path::PathBuf> {
    let details: serde_json::Value =
        serde_json::from_str(&ok(gantry(data, &["inspect", name, "-o", "json"]))).expect("json");
    details["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["snapshot"].as_str().expect("unpacked").into())
        .collect()
}

fn check_unpacked(data: &Path, name: &str, marker: &str) {
    let dirs = snapshots(data, name);
    assert_eq!(dirs.len(), 2);
    assert_eq!(
        std::fs::read_to_string(dirs[0].join("etc/motd")).unwrap(),
        marker
    );
    assert!(dirs[0].join("bin/busybox").is_file());
    use std::os::unix::fs::FileTypeExt;
    let whiteout = std::fs::symlink_metadata(dirs[1].join("etc/gone")).unwrap();
    assert!(
        whiteout.file_type().is_char_device(),
        "whiteout not a char device"
    );
}

#[test]
fn import_oci_layout_and_inspect() {
    let data = tempfile::tempdir().unwrap();
    let layout = tempfile::tempdir().unwrap();
    let image = TinyImage::new("layout\n");
    let manifest_digest = image.write_oci_layout(layout.path(), Some("busybox:layout"));
    let out = ok(gantry(
        data.path(),
        &["import", layout.path().to_str().unwrap()],
    ));
    assert!(out.contains("Loaded image: busybox:layout"), "{out}");

    let images = ls_json(data.path());
    assert_eq!(images.len(), 1);
    assert_eq!(images[0]["id"], image.id());
    assert_eq!(images[0]["names"][0], "docker.io/library/busybox:layout");
    assert_eq!(images[0]["manifest_digest"], manifest_digest);

    let table = ok(gantry(data.path(), &["ls"]));
    let short = &image.id()[7..19];
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("busybox") && l.contains("layout") && l.contains(short)),
        "{table}"
    );
    let quiet = ok(gantry(data.path(), &["ls", "-q"]));
    assert_eq!(quiet.trim(), short);

    let details: serde_json::Value =
        serde_json::from_str(&ok(gantry(data.path(), &["inspect", short, "-o", "json"]))).unwrap();
    assert_eq!(details["config"]["Cmd"][0], "/bin/sh");
    assert_eq!(details["platform"], "linux/amd64");
    check_unpacked(data.path(), "busybox:layout", "layout\n");
}

#[test]
fn import_oci_archive_with_tag() {
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    let image = TinyImage::new("archive\n");
    // A bare tag names no repository: without --tag the image is unnamed.
    image.write_oci_layout(&layout, Some("v1"));
    let archive = work.path().join("image.tar");
    tar_dir(&layout, &archive);
    let out = ok(gantry(
        data.path(),
        &[
            "import",
            archive.to_str().unwrap(),
            "--tag",
            "example.com/team/app:v1",
        ],
    ));
    assert!(
        out.contains("Loaded image: example.com/team/app:v1"),
        "{out}"
    );
    assert_eq!(
        ls_json(data.path())[0]["names"][0],
        "example.com/team/app:v1"
    );
    check_unpacked(data.path(), "example.com/team/app:v1", "archive\n");
    // Staging left nothing behind.
    let tmp = data.path().join("images/tmp");
    assert_eq!(std::fs::read_dir(tmp).unwrap().count(), 0);
}

#[test]
fn import_docker_save_archive() {
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("save.tar");
    let image = TinyImage::new("docker\n");
    image.write_docker_save(&archive, &["busybox:saved", "user/app:1"]);
    let out = ok(gantry(data.path(), &["import", archive.to_str().unwrap()]));
    assert!(out.contains("Loaded image: busybox:saved"), "{out}");
    assert!(out.contains("Loaded image: user/app:1"), "{out}");
    let images = ls_json(data.path());
    assert_eq!(images[0]["id"], image.id());
    check_unpacked(data.path(), "user/app:1", "docker\n");
}

#[test]
fn malformed_input_exits_2_and_changes_nothing() {
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let junk = work.path().join("junk.tar");
    std::fs::write(&junk, b"this is not a tar archive at all").unwrap();
    let out = gantry(data.path(), &["import", junk.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    // A layout whose layer blob is truncated: refused, naming the blob.
    let layout = work.path().join("layout");
    TinyImage::new("x\n").write_oci_layout(&layout, Some("a/b:c"));
    let blobs = layout.join("blobs/sha256");
    let biggest = std::fs::read_dir(&blobs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let bytes = std::fs::read(&biggest).unwrap();
    std::fs::write(&biggest, &bytes[..bytes.len() / 2]).unwrap();
    let out = gantry(data.path(), &["import", layout.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let name = biggest.file_name().unwrap().to_str().unwrap();
    assert!(stderr(&out).contains(name), "{}", stderr(&out));
    assert!(ls_json(data.path()).is_empty());

    let out = gantry(data.path(), &["inspect", "nosuch"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("nosuch"), "{}", stderr(&out));
    let out = gantry(data.path(), &["rm", "Bad Name"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn rm_refuses_a_leased_image_and_gc_frees_unused_content() {
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    TinyImage::new("a\n").write_oci_layout(&a, Some("app:a"));
    TinyImage::new("b\n").write_oci_layout(&b, Some("app:b"));
    ok(gantry(data.path(), &["import", a.to_str().unwrap()]));
    ok(gantry(data.path(), &["import", b.to_str().unwrap()]));

    // A container (here: the library, as the engine does) holds app:a.
    let store = gantry_agent::image::ImageStore::open(data.path().join("images")).unwrap();
    let image_a = store.resolve("app:a").unwrap();
    store.add_lease("ctr-42", &image_a).unwrap();
    let out = gantry(data.path(), &["rm", "app:a"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("ctr-42"), "{}", stderr(&out));
    assert_eq!(ls_json(data.path()).len(), 2);

    let b_dirs = snapshots(data.path(), "app:b");
    let out = ok(gantry(data.path(), &["rm", "app:b"]));
    assert!(out.contains("Untagged: app:b"), "{out}");
    assert!(out.contains("Deleted: sha256:"), "{out}");
    let report: serde_json::Value =
        serde_json::from_str(&ok(gantry(data.path(), &["gc", "-o", "json"]))).unwrap();
    // b's manifest, config and bottom layer (its etc/motd differs from a's);
    // the top layer blob is identical in both images and stays, but b's
    // snapshot of it has another chain id, so both of b's snapshots go.
    assert_eq!(report["blobs"].as_array().unwrap().len(), 3, "{report}");
    assert_eq!(report["snapshots"].as_array().unwrap().len(), 2, "{report}");
    assert!(
        report["bytes_freed"].as_u64().unwrap() > 1_000_000,
        "{report}"
    );
    assert!(b_dirs.iter().all(|d| !d.exists()));
    check_unpacked(data.path(), "app:a", "a\n");

    // Nothing more to free while app:a is named.
    let out = ok(gantry(data.path(), &["gc"]));
    assert!(out.contains("Freed 0B"), "{out}");
    store.remove_lease("ctr-42").unwrap();
}

/// A fresh layout holding a test image under `tag`, for skopeo to push.
fn layout_for_push(marker: &str, tag: &str) -> (tempfile::TempDir, TinyImage) {
    let layout = tempfile::tempdir().unwrap();
    let image = TinyImage::new(marker);
    image.write_oci_layout(layout.path(), Some(tag));
    (layout, image)
}

fn registry_prerequisites() -> bool {
    if !have("docker-registry") || !have("skopeo") {
        println!("SKIPPED: needs Debian's docker-registry and skopeo");
        return false;
    }
    true
}

#[test]
fn pull_from_a_loopback_registry() {
    if !registry_prerequisites() {
        return;
    }
    let Some(registry) = Registry::start("") else {
        println!("SKIPPED: docker-registry is not installed");
        return;
    };
    let (layout, image) = layout_for_push("pulled\n", "v1");
    let reference = format!("{}/test/busybox:v1", registry.host());
    skopeo_push(layout.path(), "v1", &reference, None)
        .unwrap_or_else(|e| panic!("skopeo push: {e}\n{}", registry.log()));

    let data = tempfile::tempdir().unwrap();
    let out = gantry(data.path(), &["pull", &reference]);
    let progress = stderr(&out);
    let printed = ok(out);
    assert!(printed.contains(&reference), "{printed}");
    assert!(progress.contains("verified"), "{progress}");
    let images = ls_json(data.path());
    assert_eq!(images[0]["id"], image.id());
    check_unpacked(data.path(), &reference, "pulled\n");

    // Pull again: everything is already there.
    let out = gantry(data.path(), &["pull", &reference]);
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
    ok(out);

    // By digest, too.
    let digest = images[0]["manifest_digest"].as_str().unwrap().to_string();
    let by_digest = format!("{}/test/busybox@{digest}", registry.host());
    ok(gantry(data.path(), &["pull", &by_digest]));
    ok(gantry(data.path(), &["inspect", &by_digest]));

    // A tag the registry does not have is the user's mistake.
    let out = gantry(
        data.path(),
        &["pull", &format!("{}/test/busybox:nope", registry.host())],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("not found"), "{}", stderr(&out));
}

#[test]
fn pull_with_bearer_token_auth() {
    if !registry_prerequisites() {
        return;
    }
    let issuer = TokenIssuer::start("gantry", "s3cret");
    let Some(registry) = Registry::start(&issuer.registry_config()) else {
        println!("SKIPPED: docker-registry is not installed");
        return;
    };
    let (layout, image) = layout_for_push("token\n", "v1");
    let reference = format!("{}/secure/app:v1", registry.host());
    skopeo_push(layout.path(), "v1", &reference, Some("gantry:s3cret"))
        .unwrap_or_else(|e| panic!("skopeo push: {e}\n{}", registry.log()));

    let data = tempfile::tempdir().unwrap();
    // Anonymous: the issuer refuses, so the pull fails with an auth error.
    let out = gantry(data.path(), &["pull", &reference]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("authentication"), "{}", stderr(&out));

    // Wrong password: refused too.
    let out = gantry_stdin(
        data.path(),
        &[
            "pull",
            &reference,
            "--username",
            "gantry",
            "--password-stdin",
        ],
        Some("wrong\n"),
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));

    let out = gantry_stdin(
        data.path(),
        &[
            "pull",
            &reference,
            "--username",
            "gantry",
            "--password-stdin",
        ],
        Some("s3cret\n"),
    );
    ok(out);
    assert_eq!(ls_json(data.path())[0]["id"], image.id());
    check_unpacked(data.path(), &reference, "token\n");
}
