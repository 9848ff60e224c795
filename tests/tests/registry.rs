//! End-to-end tests of the controller's registry (`gantry_controller::
//! registry`), the push client (`ImageStore::push`) and `gantry image load`:
//! the registry's router served with axum on a loopback port inside the
//! test's own runtime, images pushed into it and pulled back out through the
//! agents' mirror path, and the spec's error answers checked on the wire.

use gantry_agent::image::registry::RegistryError;
use gantry_agent::image::{ImageError, ImageStore, PullOptions, PushProgress, PushTarget};
use gantry_controller::registry::{RegistryStore, router};
use gantry_tests::gantry_bin;
use gantry_tests::image_fixtures::{TinyImage, digest, tar_dir};
use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// The registry served on 127.0.0.1; Drop stops the server and joins its
/// thread, so no test leaves a listener behind.
struct Served {
    addr: SocketAddr,
    root: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Served {
    fn start() -> Served {
        let dir = tempfile::Builder::new()
            .prefix("gantry-reg-")
            .tempdir()
            .expect("temp dir");
        let root = dir.path().join("controller/registry");
        let store = RegistryStore::open(&root).expect("open registry store");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                axum::serve(listener, router(store))
                    .with_graceful_shutdown(async move {
                        let _ = stopped.await;
                    })
                    .await
                    .expect("serve");
            });
        });
        Served {
            addr,
            root,
            stop: Some(stop),
            thread: Some(thread),
            _dir: dir,
        }
    }

    /// `http://127.0.0.1:PORT`.
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn v2(&self, tail: &str) -> String {
        format!("{}/v2/{tail}", self.url())
    }

    /// The blob files in the store.
    fn blob_files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.root.join("blobs/sha256"))
            .expect("blobs dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

/// Status, headers we check, and body of a response.
struct Reply {
    status: u16,
    headers: ureq::http::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn of(response: ureq::http::Response<ureq::Body>) -> Reply {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .with_config()
            .limit(64 << 20)
            .read_to_vec()
            .expect("read body");
        Reply {
            status,
            headers,
            body,
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The first error code of a spec error body.
    fn code(&self) -> String {
        let v: serde_json::Value = serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "error body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        });
        v["errors"][0]["code"].as_str().unwrap_or("").to_string()
    }
}

fn get(url: &str) -> Reply {
    Reply::of(http().get(url).call().expect("GET"))
}

fn head(url: &str) -> Reply {
    Reply::of(http().head(url).call().expect("HEAD"))
}

fn post(url: &str, body: &[u8]) -> Reply {
    Reply::of(http().post(url).send(body).expect("POST"))
}

fn put(url: &str, content_type: &str, body: &[u8]) -> Reply {
    Reply::of(
        http()
            .put(url)
            .header("Content-Type", content_type)
            .send(body)
            .expect("PUT"),
    )
}

fn patch(url: &str, range: Option<&str>, body: &[u8]) -> Reply {
    let mut request = http()
        .patch(url)
        .header("Content-Type", "application/octet-stream");
    if let Some(range) = range {
        request = request.header("Content-Range", range);
    }
    Reply::of(request.send(body).expect("PATCH"))
}

fn absolute(served: &Served, location: &str) -> String {
    if location.starts_with('/') {
        format!("{}{location}", served.url())
    } else {
        location.to_string()
    }
}

fn pull_options(served: &Served) -> PullOptions {
    PullOptions {
        mirror: Some(served.url()),
        fallback_to_origin: false,
        ..PullOptions::default()
    }
}

/// Imports an OCI layout of `image` named `name` into a new store under
/// `dir`; returns the store and the manifest digest.
fn store_with(dir: &Path, image: &TinyImage, name: &str) -> (ImageStore, String) {
    let layout = dir.join("layout");
    let manifest = image.write_oci_layout(&layout, Some(name));
    let store = ImageStore::open(dir.join("images")).expect("open store");
    let records = store.import(&layout, &Default::default()).expect("import");
    assert_eq!(records[0].manifest_digest, manifest);
    (store, manifest)
}

#[test]
fn get_v2_answers_with_the_api_version() {
    let served = Served::start();
    let reply = get(&served.v2(""));
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.header("docker-distribution-api-version"),
        Some("registry/2.0")
    );
}

#[test]
fn pushed_images_pull_back_through_the_mirror_with_the_same_digests() {
    let served = Served::start();
    let work = tempfile::tempdir().expect("temp dir");
    // A registry host with a port: the mirror keeps it in the repository.
    let name = "127.0.0.1:5000/tiny:v1";
    let image = TinyImage::new("pushed");
    let (source, manifest) = store_with(&work.path().join("src"), &image, name);
    let target = PushTarget::mirror(&served.addr.to_string());

    let mut events = Vec::new();
    let pushed = source
        .push(name, &target, &mut |e| events.push(e))
        .expect("push");
    assert_eq!(pushed, manifest);
    let uploaded = events
        .iter()
        .filter(|e| matches!(e, PushProgress::Uploaded { .. }))
        .count();
    assert_eq!(uploaded, 3, "config and two layers: {events:?}");

    // Pushing again uploads nothing: every blob is found by HEAD.
    let mut again = Vec::new();
    source
        .push(name, &target, &mut |e| again.push(e))
        .expect("push again");
    assert!(
        again
            .iter()
            .all(|e| matches!(e, PushProgress::Exists { .. })),
        "{again:?}"
    );

    let reply = get(&served.v2("127.0.0.1:5000/tiny/manifests/v1"));
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.header("docker-content-digest"),
        Some(manifest.as_str())
    );
    assert_eq!(
        reply.header("content-type"),
        Some("application/vnd.oci.image.manifest.v1+json")
    );
    let headed = head(&served.v2("127.0.0.1:5000/tiny/manifests/v1"));
    assert_eq!(headed.status, 200);
    assert_eq!(
        headed.header("content-length"),
        Some(reply.body.len().to_string().as_str())
    );
    assert_eq!(
        headed.header("docker-content-digest"),
        Some(manifest.as_str())
    );
    assert!(headed.body.is_empty());
    let by_digest = get(&served.v2(&format!("127.0.0.1:5000/tiny/manifests/{manifest}")));
    assert!(by_digest.status == 200 && by_digest.body == reply.body);
    let tags: serde_json::Value =
        serde_json::from_slice(&get(&served.v2("127.0.0.1:5000/tiny/tags/list")).body)
            .expect("tags json");
    assert_eq!(tags["tags"], serde_json::json!(["v1"]));

    let target_store = ImageStore::open(work.path().join("dst")).expect("open");
    let pulled = target_store
        .pull(name, &pull_options(&served), &mut |_| {})
        .expect("pull through the mirror");
    assert_eq!(pulled.manifest_digest, manifest);
    assert_eq!(pulled.id, image.id());
    let dirs = target_store.layer_dirs(&pulled).expect("layer dirs");
    let motd = std::fs::read_to_string(dirs[0].join("etc/motd")).expect("motd");
    assert_eq!(motd, "pushed");
}

#[test]
fn a_blob_that_does_not_hash_to_its_digest_is_refused_and_leaves_nothing() {
    let served = Served::start();
    let content = b"the real content";
    let wrong = digest(b"something else");

    // Monolithic: POST ?digest= with the body.
    let reply = post(
        &served.v2(&format!("app/blobs/uploads/?digest={wrong}")),
        content,
    );
    assert_eq!(reply.status, 400);
    assert_eq!(reply.code(), "DIGEST_INVALID");

    // Session: POST, then PUT ?digest= with the body.
    let start = post(&served.v2("app/blobs/uploads/"), b"");
    assert_eq!(start.status, 202);
    let location = absolute(&served, start.header("location").expect("location"));
    let reply = put(
        &format!("{location}?digest={wrong}"),
        "application/octet-stream",
        content,
    );
    assert_eq!(reply.status, 400);
    assert_eq!(reply.code(), "DIGEST_INVALID");
    // The failed commit ended the session.
    let reply = put(
        &format!("{location}?digest={}", digest(content)),
        "application/octet-stream",
        content,
    );
    assert_eq!(reply.status, 404);
    assert_eq!(reply.code(), "BLOB_UPLOAD_UNKNOWN");

    for d in [&wrong, &digest(content)] {
        assert_eq!(head(&served.v2(&format!("app/blobs/{d}"))).status, 404);
    }
    assert!(served.blob_files().is_empty(), "{:?}", served.blob_files());
}

#[test]
fn chunked_uploads_complete_and_blobs_stream_back() {
    let served = Served::start();
    let content: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let blob_digest = digest(&content);
    let (first, second) = content.split_at(100_000);

    let start = post(&served.v2("gantry.test/web/blobs/uploads/"), b"");
    assert_eq!(start.status, 202);
    assert_eq!(start.header("range"), Some("0-0"));
    let location = absolute(&served, start.header("location").expect("location"));

    let reply = patch(&location, Some("0-99999"), first);
    assert_eq!(reply.status, 202);
    assert_eq!(reply.header("range"), Some("0-99999"));
    // A chunk that does not continue where the upload ends is refused.
    let reply = patch(&location, Some("5-10"), b"xxxxxx");
    assert_eq!(reply.status, 416);
    let status = Reply::of(http().get(&location).call().expect("GET upload"));
    assert_eq!(status.status, 204);
    assert_eq!(status.header("range"), Some("0-99999"));
    let reply = patch(&location, None, second);
    assert_eq!(reply.status, 202);

    let done = put(
        &format!("{location}?digest={blob_digest}"),
        "application/octet-stream",
        b"",
    );
    assert_eq!(done.status, 201, "{}", String::from_utf8_lossy(&done.body));
    assert_eq!(
        done.header("docker-content-digest"),
        Some(blob_digest.as_str())
    );

    let blob_url = served.v2(&format!("gantry.test/web/blobs/{blob_digest}"));
    let got = get(&blob_url);
    assert_eq!(got.status, 200);
    assert!(got.body == content, "blob content differs");
    let headed = head(&blob_url);
    assert_eq!(headed.status, 200);
    assert_eq!(headed.header("content-length"), Some("300000"));
    assert!(headed.body.is_empty());

    // Mounting a blob the registry has into another repository is instant.
    let mounted = post(
        &served.v2(&format!(
            "other/app/blobs/uploads/?mount={blob_digest}&from=gantry.test/web"
        )),
        b"",
    );
    assert_eq!(mounted.status, 201);
    assert_eq!(served.blob_files().len(), 1);

    // A monolithic upload larger than any request-size default (axum's is
    // 2 MiB): blob bodies are streamed, never limited or buffered.
    let big: Vec<u8> = (0..(5u32 << 20)).map(|i| (i % 253) as u8).collect();
    let big_digest = digest(&big);
    let reply = post(
        &served.v2(&format!(
            "gantry.test/web/blobs/uploads/?digest={big_digest}"
        )),
        &big,
    );
    assert_eq!(
        reply.status,
        201,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let got = get(&served.v2(&format!("gantry.test/web/blobs/{big_digest}")));
    assert!(got.body == big, "big blob content differs");
}

#[test]
fn a_manifest_referencing_a_missing_blob_is_refused() {
    let served = Served::start();
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = digest(config);
    assert_eq!(
        post(
            &served.v2(&format!("app/blobs/uploads/?digest={config_digest}")),
            config
        )
        .status,
        201
    );
    let missing = digest(b"a layer never pushed");
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": missing, "size": 10}],
    });
    let reply = put(
        &served.v2("app/manifests/v1"),
        "application/vnd.oci.image.manifest.v1+json",
        manifest.to_string().as_bytes(),
    );
    assert_eq!(reply.status, 400);
    assert_eq!(reply.code(), "MANIFEST_BLOB_UNKNOWN");
    let reply = get(&served.v2("app/manifests/v1"));
    assert_eq!(reply.status, 404);
    assert_eq!(reply.code(), "MANIFEST_UNKNOWN");
    let reply = get(&served.v2("app/tags/list"));
    assert_eq!(reply.status, 404);
    assert_eq!(reply.code(), "NAME_UNKNOWN");

    // Manifests are bounded: one announced at 4 MiB and one byte is
    // refused before its body is read (so the test sends only headers;
    // an HTTP client sending the body would see the connection closed).
    let mut stream = std::net::TcpStream::connect(served.addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "PUT /v2/app/manifests/big HTTP/1.1\r\nHost: {}\r\n\
         Content-Type: application/vnd.oci.image.manifest.v1+json\r\n\
         Content-Length: {}\r\n\r\n",
        served.addr,
        (4 << 20) + 1
    )
    .expect("send headers");
    let mut answer = vec![0u8; 4096];
    let n = stream.read(&mut answer).expect("read answer");
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("SIZE_INVALID"), "{answer}");
}

#[test]
fn unknown_and_malformed_requests_get_the_spec_errors() {
    let served = Served::start();
    let unknown = digest(b"nobody pushed this");
    let url = served.v2(&format!("gantry.test/web/blobs/{unknown}"));
    let reply = get(&url);
    assert_eq!(reply.status, 404);
    assert_eq!(reply.code(), "BLOB_UNKNOWN");
    assert_eq!(head(&url).status, 404);

    let reply = get(&served.v2(&format!("gantry.test/web/manifests/{unknown}")));
    assert_eq!(reply.status, 404);
    assert_eq!(reply.code(), "MANIFEST_UNKNOWN");
    assert_eq!(
        head(&served.v2("gantry.test/web/manifests/latest")).status,
        404
    );

    // What a node asks for but nobody loaded is "not found", the answer on
    // which the puller falls back to the image's own registry.
    let node = tempfile::tempdir().expect("temp dir");
    let store = ImageStore::open(node.path()).expect("open");
    for name in [
        "busybox",
        "127.0.0.1:5000/a-_b/c:v1",
        "Host.Example:5000/app",
    ] {
        match store.pull(name, &pull_options(&served), &mut |_| {}) {
            Err(ImageError::Registry(RegistryError::NotFound { .. })) => {}
            other => panic!("{name}: want NotFound, got {other:?}"),
        }
    }

    let reply = get(&served.v2("gantry.test/web/blobs/sha256:nothex"));
    assert_eq!(reply.status, 400);
    assert_eq!(reply.code(), "DIGEST_INVALID");
    let reply = get(&served.v2("Upper/Case/manifests/latest"));
    assert_eq!(reply.status, 400);
    assert_eq!(reply.code(), "NAME_INVALID");
    let reply = Reply::of(
        http()
            .delete(&served.v2(&format!("app/manifests/{unknown}")))
            .call()
            .expect("DELETE"),
    );
    assert_eq!(reply.status, 405);
    assert_eq!(reply.code(), "UNSUPPORTED");
}

/// Runs `gantry image load ARGS` with `env` set (and $GANTRY_CONTROLLER
/// unset unless given).
fn gantry_load(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(gantry_bin());
    command
        .arg("image")
        .arg("load")
        .args(args)
        .env_remove("GANTRY_CONTROLLER")
        .stdin(Stdio::null());
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("run gantry image load")
}

#[track_caller]
fn ok(output: Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "gantry image load failed ({:?}): {stdout}{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn gantry_image_load_puts_an_oci_archive_where_agents_pull_it() {
    let served = Served::start();
    let work = tempfile::tempdir().expect("temp dir");
    let image = TinyImage::new("from an archive");
    let layout = work.path().join("layout");
    let manifest = image.write_oci_layout(&layout, Some("gantry.test/tiny:v1"));
    let archive = work.path().join("tiny.tar");
    tar_dir(&layout, &archive);

    let addr = served.addr.to_string();
    let out = ok(gantry_load(
        &[archive.to_str().expect("utf-8 path")],
        &[("GANTRY_CONTROLLER", &addr)],
    ));
    assert_eq!(
        out.trim(),
        format!("Loaded image: gantry.test/tiny:v1 ({manifest})")
    );

    let node = ImageStore::open(work.path().join("node")).expect("open");
    let pulled = node
        .pull("gantry.test/tiny:v1", &pull_options(&served), &mut |_| {})
        .expect("pull");
    assert_eq!(pulled.manifest_digest, manifest);
}

#[test]
fn gantry_image_load_of_a_docker_save_archive_with_tag() {
    let served = Served::start();
    let work = tempfile::tempdir().expect("temp dir");
    let image = TinyImage::new("from docker save");
    let archive = work.path().join("saved.tar");
    image.write_docker_save(&archive, &["old/name:1"]);

    let addr = served.addr.to_string();
    let out = ok(gantry_load(
        &[
            archive.to_str().expect("utf-8 path"),
            "--tag",
            "gantry.test/renamed:v2",
            "--controller",
            &addr,
        ],
        &[],
    ));
    assert!(
        out.starts_with("Loaded image: gantry.test/renamed:v2 (sha256:"),
        "{out}"
    );

    let node = ImageStore::open(work.path().join("node")).expect("open");
    let pulled = node
        .pull(
            "gantry.test/renamed:v2",
            &pull_options(&served),
            &mut |_| {},
        )
        .expect("pull the new name");
    assert_eq!(pulled.id, image.id());
    // Only the new name was loaded.
    assert!(
        node.pull("old/name:1", &pull_options(&served), &mut |_| {})
            .is_err()
    );
}

#[test]
fn gantry_image_load_says_which_controller_it_could_not_reach() {
    let work = tempfile::tempdir().expect("temp dir");
    let layout = work.path().join("layout");
    TinyImage::new("unreachable").write_oci_layout(&layout, Some("gantry.test/tiny:v1"));
    // A port nothing listens on: bound, then closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let controller = format!("127.0.0.1:{port}");
    let out = gantry_load(
        &[
            layout.to_str().expect("utf-8 path"),
            "--controller",
            &controller,
        ],
        &[],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&controller), "{stderr}");
}

/// Why the busybox/web test images cannot be built here, if they cannot.
fn test_image_prerequisites() -> Option<String> {
    for tool in ["jq", "sha256sum", "gzip", "tar"] {
        if gantry_tests::peers::find_binary(tool).is_none() {
            return Some(format!("{tool} is not installed"));
        }
    }
    if !Path::new("/bin/busybox").is_file() {
        return Some("busybox-static (/bin/busybox) is not installed".into());
    }
    None
}

/// Builds `deploy/images/build-test-images.sh`'s busybox and web images
/// into `out`.
fn build_test_images(out: &Path) {
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/images/build-test-images.sh");
    let output = Command::new("bash")
        .arg(script)
        .arg(out)
        .stdin(Stdio::null())
        .output()
        .expect("run build-test-images.sh");
    assert!(
        output.status.success(),
        "build-test-images.sh: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A node data directory whose Drop removes the containers run from it and
/// anything left mounted under it, even when the test fails.
struct NodeDir {
    dir: tempfile::TempDir,
}

impl NodeDir {
    fn container(&self, args: &[&str]) -> Output {
        Command::new(gantry_bin())
            .arg("container")
            .arg("--data-dir")
            .arg(self.dir.path())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run gantry container")
    }
}

impl Drop for NodeDir {
    fn drop(&mut self) {
        let listed = self.container(&["ps", "-a", "-q"]);
        if listed.status.success() {
            for id in String::from_utf8_lossy(&listed.stdout).lines() {
                let _ = self.container(&["rm", "-f", id]);
            }
        }
        let prefix = self.dir.path().display().to_string();
        if let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") {
            let mut points: Vec<&str> = info
                .lines()
                .filter_map(|l| l.split(' ').nth(4))
                .filter(|p| p.starts_with(&prefix))
                .collect();
            points.sort_by_key(|p| std::cmp::Reverse(p.len()));
            for p in points {
                let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

/// The whole path of an image a user has only locally: `gantry image load`
/// of the web and busybox archives into the registry, a node pulling them
/// through the mirror with the same digests, and a container running from
/// the pulled image.
#[test]
fn loaded_test_images_pull_onto_a_node_and_run() {
    if let Some(reason) = test_image_prerequisites() {
        println!("SKIPPED: {reason}");
        return;
    }
    let served = Served::start();
    let images = tempfile::tempdir().expect("temp dir");
    build_test_images(images.path());
    let addr = served.addr.to_string();
    let mut loaded = Vec::new();
    for archive in ["busybox.tar", "web.tar"] {
        let path = images.path().join(archive);
        let out = ok(gantry_load(
            &[path.to_str().expect("utf-8 path"), "--controller", &addr],
            &[],
        ));
        loaded.push(out.trim().to_string());
    }
    let digest_of = |layout: &str| -> String {
        let index: serde_json::Value = serde_json::from_slice(
            &std::fs::read(images.path().join(layout).join("index.json")).expect("index"),
        )
        .expect("index json");
        index["manifests"][0]["digest"]
            .as_str()
            .expect("digest")
            .to_string()
    };
    assert_eq!(
        loaded,
        vec![
            format!(
                "Loaded image: gantry.test/busybox:latest ({})",
                digest_of("busybox")
            ),
            format!(
                "Loaded image: gantry.test/web:latest ({})",
                digest_of("web")
            ),
        ]
    );
    // web is built on busybox's layer, which is stored once: two configs,
    // two distinct layers, two manifests.
    assert_eq!(served.blob_files().len(), 6);

    let node = NodeDir {
        dir: tempfile::Builder::new()
            .prefix("gantry-reg-node-")
            .tempdir()
            .expect("temp dir"),
    };
    let store = ImageStore::open(node.dir.path().join("images")).expect("open");
    for (name, layout) in [
        ("gantry.test/busybox:latest", "busybox"),
        ("gantry.test/web:latest", "web"),
    ] {
        let pulled = store
            .pull(name, &pull_options(&served), &mut |_| {})
            .expect("pull through the mirror");
        assert_eq!(pulled.manifest_digest, digest_of(layout), "{name}");
    }

    if let Some(reason) = gantry_tests::engine_test_prerequisites() {
        println!("SKIPPED (running the pulled image): {reason}");
        return;
    }
    let out = node.container(&[
        "run",
        "--rm",
        // Not the default bridge: this test runs in the machine's own
        // network namespace and must leave no bridge or nft table there.
        "--network",
        "none",
        "gantry.test/web:latest",
        "cat",
        "/www/health",
    ]);
    assert!(
        out.status.success(),
        "run: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}

/// A stock client agrees the registry speaks the distribution API: skopeo
/// copies an OCI layout into it and back out, and the digests hold.
#[test]
fn skopeo_copies_into_and_out_of_the_registry() {
    if gantry_tests::peers::find_binary("skopeo").is_none() {
        println!("SKIPPED: skopeo is not installed");
        return;
    }
    let served = Served::start();
    let work = tempfile::tempdir().expect("temp dir");
    let layout = work.path().join("layout");
    let manifest = TinyImage::new("skopeo").write_oci_layout(&layout, Some("v1"));
    let skopeo = |args: &[String]| {
        let out = Command::new("skopeo")
            .args(["--insecure-policy", "--tmpdir"])
            .arg(work.path())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run skopeo");
        assert!(
            out.status.success(),
            "skopeo {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let remote = format!("docker://{}/gantry.test/skopeo:v1", served.addr);
    skopeo(&[
        "copy".into(),
        "--dest-tls-verify=false".into(),
        "--preserve-digests".into(),
        format!("oci:{}:v1", layout.display()),
        remote.clone(),
    ]);
    let inspected: serde_json::Value = serde_json::from_str(&skopeo(&[
        "inspect".into(),
        "--tls-verify=false".into(),
        remote.clone(),
    ]))
    .expect("inspect json");
    assert_eq!(inspected["Digest"], manifest.as_str());
    let back = work.path().join("back");
    skopeo(&[
        "copy".into(),
        "--src-tls-verify=false".into(),
        remote,
        format!("oci:{}:v1", back.display()),
    ]);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(back.join("index.json")).expect("index"))
            .expect("index json");
    assert_eq!(index["manifests"][0]["digest"], manifest.as_str());
}
