//! `deploy/images/build-test-images.sh`: the test images are reproducible,
//! valid OCI layouts, and the web image serves what it promises.

use gantry_tests::bundle::BundleBuilder;
use gantry_tests::peers;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/images/build-test-images.sh")
}

/// Why the script cannot run here, if it cannot.
fn prerequisites() -> Option<String> {
    for tool in ["jq", "sha256sum", "gzip", "tar"] {
        if peers::find_binary(tool).is_none() {
            return Some(format!("{tool} is not installed"));
        }
    }
    if !Path::new("/bin/busybox").is_file() && !nix::unistd::Uid::effective().is_root() {
        return Some("busybox-static missing and not root to install it".into());
    }
    None
}

fn build(out: &Path) {
    let output = Command::new("bash")
        .arg(script())
        .arg(out)
        .stdin(Stdio::null())
        .output()
        .expect("run build-test-images.sh");
    assert!(
        output.status.success(),
        "build-test-images.sh failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn blob(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.strip_prefix("sha256:").expect("sha256 digest"))
}

/// The manifest of the only image in `layout`, and its index entry.
fn manifest(layout: &Path) -> (serde_json::Value, serde_json::Value) {
    let index = read_json(&layout.join("index.json"));
    let entry = index["manifests"][0].clone();
    let digest = entry["digest"].as_str().expect("manifest digest");
    (read_json(&blob(layout, digest)), entry)
}

#[test]
fn images_are_reproducible_and_well_formed() {
    if let Some(reason) = prerequisites() {
        println!("SKIPPED: {reason}");
        return;
    }
    let a = tempfile::tempdir().expect("temp dir");
    let b = tempfile::tempdir().expect("temp dir");
    build(a.path());
    build(b.path());
    for name in ["busybox.tar", "web.tar"] {
        let x = std::fs::read(a.path().join(name)).expect("archive a");
        let y = std::fs::read(b.path().join(name)).expect("archive b");
        assert!(x == y, "{name} differs between two builds");
    }

    let (bb, bb_entry) = manifest(&a.path().join("busybox"));
    let (web, web_entry) = manifest(&a.path().join("web"));
    assert_eq!(
        bb_entry["annotations"]["io.containerd.image.name"],
        "gantry.test/busybox:latest"
    );
    assert_eq!(
        web_entry["annotations"]["io.containerd.image.name"],
        "gantry.test/web:latest"
    );
    assert_eq!(bb["layers"].as_array().map(Vec::len), Some(1));
    assert_eq!(web["layers"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        web["layers"][0], bb["layers"][0],
        "web is built on the busybox layer"
    );

    // Every blob's name is its digest.
    for layout in ["busybox", "web"] {
        let dir = a.path().join(layout).join("blobs/sha256");
        for entry in std::fs::read_dir(&dir).expect("blobs dir") {
            let path = entry.expect("blob").path();
            let out = Command::new("sha256sum")
                .arg(&path)
                .output()
                .expect("sha256sum");
            let sum = String::from_utf8_lossy(&out.stdout);
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            assert!(sum.starts_with(name), "{} has digest {sum}", path.display());
        }
    }

    let config = read_json(&blob(
        &a.path().join("web"),
        web["config"]["digest"].as_str().expect("config digest"),
    ));
    assert_eq!(
        config["config"]["Cmd"],
        serde_json::json!(["httpd", "-f", "-v", "-p", "80", "-h", "/www"])
    );
    assert_eq!(
        config["rootfs"]["diff_ids"].as_array().map(Vec::len),
        Some(2)
    );

    if peers::find_binary("skopeo").is_some() {
        let out = Command::new("skopeo")
            .arg("inspect")
            .arg(format!(
                "oci-archive:{}:latest",
                a.path().join("web.tar").display()
            ))
            .output()
            .expect("skopeo");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Unpacks the web image's layers into a bundle and runs its httpd under
/// runc (the reference runtime), fetching `/` and `/health` from inside.
#[test]
fn web_image_reports_hostname_and_ip() {
    if let Some(reason) = prerequisites() {
        println!("SKIPPED: {reason}");
        return;
    }
    if !nix::unistd::Uid::effective().is_root() {
        println!("SKIPPED: needs root to run a container");
        return;
    }
    let runc = match peers::find_or_install("runc") {
        Ok(path) => path,
        Err(err) => {
            println!("SKIPPED: {err}");
            return;
        }
    };
    let images = tempfile::tempdir().expect("temp dir");
    build(images.path());
    let bundle = tempfile::tempdir().expect("temp dir");
    let rootfs = bundle.path().join("rootfs");
    std::fs::create_dir_all(&rootfs).expect("rootfs");
    let layout = images.path().join("web");
    let (web, _) = manifest(&layout);
    for layer in web["layers"].as_array().expect("layers") {
        let path = blob(&layout, layer["digest"].as_str().expect("layer digest"));
        let status = Command::new("tar")
            .arg("-xzf")
            .arg(&path)
            .arg("-C")
            .arg(&rootfs)
            .status()
            .expect("tar");
        assert!(status.success(), "unpack {}", path.display());
    }
    BundleBuilder::new()
        .args([
            "sh",
            "-c",
            "ip link set lo up; httpd -p 8080 -h /www; \
             for i in 1 2 3 4 5 6 7 8 9 10; do \
               timeout 2 wget -q -O- http://127.0.0.1:8080/ && break; usleep 100000; done; \
             timeout 2 wget -q -O- http://127.0.0.1:8080/health",
        ])
        .hostname("web-test")
        .all_capabilities(&["CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE", "CAP_KILL"])
        .write_config(bundle.path())
        .expect("config.json");
    let state = tempfile::tempdir().expect("temp dir");
    let id = format!("test-images-web-{}", std::process::id());
    let rt = peers::OciRuntime::new(peers::RuntimeKind::Runc, runc, state.path());
    let out = rt
        .run_command(bundle.path(), &id)
        .stdin(Stdio::null())
        .output()
        .expect("runc run");
    rt.force_delete(&id);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}: {stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout, "hostname=web-test ip=none\nok\n");
}
