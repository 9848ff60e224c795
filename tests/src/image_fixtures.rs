//! Tiny images for the image-store tests, built from files by the test
//! itself: a busybox layer (Debian's busybox-static) and a second layer that
//! whites a file out, written as an OCI layout, an OCI archive or a classic
//! `docker save` archive. Plus a loopback `docker-registry` and a bearer
//! token issuer for pull tests.

use sha2::{Digest as _, Sha256};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// `sha256:<hex>` of `bytes`.
pub fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// An entry of a layer.
pub enum Entry {
    /// A directory.
    Dir(&'static str),
    /// A regular file with content and mode.
    File(&'static str, Vec<u8>, u32),
    /// A symlink to a target.
    Symlink(&'static str, &'static str),
}

/// Builds an uncompressed layer tar.
pub fn layer_tar(entries: &[Entry]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut header = tar::Header::new_gnu();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_700_000_000);
        match entry {
            Entry::Dir(path) => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(0o755);
                header.set_size(0);
                builder
                    .append_data(&mut header, path, std::io::empty())
                    .expect("append dir");
            }
            Entry::File(path, data, mode) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(*mode);
                header.set_size(data.len() as u64);
                builder
                    .append_data(&mut header, path, &data[..])
                    .expect("append file");
            }
            Entry::Symlink(path, target) => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_mode(0o777);
                header.set_size(0);
                builder
                    .append_link(&mut header, path, target)
                    .expect("append symlink");
            }
        }
    }
    builder.into_inner().expect("finish tar")
}

/// gzip-compresses `bytes`.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).expect("gzip");
    encoder.finish().expect("gzip")
}

/// A two-layer test image: busybox plus files in layer 1; layer 2 whites
/// out `etc/gone` and adds `etc/added`.
pub struct TinyImage {
    /// Uncompressed layer tars, bottom first.
    pub layers: Vec<Vec<u8>>,
    /// The config JSON.
    pub config: Vec<u8>,
}

impl TinyImage {
    /// Builds it. Uses `/bin/busybox` when present (busybox-static), else a
    /// stand-in file, since the store does not care what the bytes are.
    pub fn new(marker: &str) -> TinyImage {
        TinyImage::for_arch(marker, "amd64")
    }

    /// Like [`TinyImage::new`], for another architecture (GOARCH name).
    pub fn for_arch(marker: &str, architecture: &str) -> TinyImage {
        let busybox = std::fs::read("/bin/busybox").unwrap_or_else(|_| b"#!stand-in".to_vec());
        let layers = vec![
            layer_tar(&[
                Entry::Dir("bin/"),
                Entry::File("bin/busybox", busybox, 0o755),
                Entry::Symlink("bin/sh", "busybox"),
                Entry::Dir("etc/"),
                Entry::File("etc/motd", marker.as_bytes().to_vec(), 0o644),
                Entry::File("etc/gone", b"whited out above\n".to_vec(), 0o644),
            ]),
            layer_tar(&[
                Entry::Dir("etc/"),
                Entry::File("etc/.wh.gone", Vec::new(), 0o644),
                Entry::File("etc/added", b"layer two\n".to_vec(), 0o644),
            ]),
        ];
        let diff_ids: Vec<String> = layers.iter().map(|l| digest(l)).collect();
        let config = serde_json::to_vec(&serde_json::json!({
            "created": "2026-01-02T03:04:05Z",
            "architecture": architecture,
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"], "Labels": {"marker": marker}},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created_by": "test"}, {"created_by": "test"}]
        }))
        .expect("config json");
        TinyImage { layers, config }
    }

    /// The image id (config digest).
    pub fn id(&self) -> String {
        digest(&self.config)
    }

    /// Writes this image's layer, config and manifest blobs into the
    /// layout `dir` (gzip layers unless `uncompressed`). Returns the
    /// manifest's digest and size.
    pub fn write_blobs(&self, dir: &Path, uncompressed: bool) -> (String, usize) {
        let layers: Vec<_> = self
            .layers
            .iter()
            .map(|tar| {
                let (bytes, media_type) = if uncompressed {
                    (tar.clone(), "application/vnd.oci.image.layer.v1.tar")
                } else {
                    (gzip(tar), "application/vnd.oci.image.layer.v1.tar+gzip")
                };
                serde_json::json!({
                    "mediaType": media_type, "digest": put_blob(dir, &bytes), "size": bytes.len()
                })
            })
            .collect();
        let config_digest = put_blob(dir, &self.config);
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_digest, "size": self.config.len()},
            "layers": layers
        }))
        .expect("manifest json");
        (put_blob(dir, &manifest), manifest.len())
    }

    /// Writes an OCI image layout into `dir`; `ref_name` becomes the
    /// `org.opencontainers.image.ref.name` annotation. Returns the manifest digest.
    pub fn write_oci_layout(&self, dir: &Path, ref_name: Option<&str>) -> String {
        let (manifest_digest, size) = self.write_blobs(dir, false);
        let descriptor = serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": size,
            "platform": {"architecture": "amd64", "os": "linux"}
        });
        write_index(
            dir,
            descriptor,
            ref_name.map(|n| serde_json::json!({REF_NAME: n})),
        );
        manifest_digest
    }

    /// Writes the newer `docker save` format (Docker 25+): an OCI layout
    /// with uncompressed layers plus a `manifest.json` whose paths point
    /// into `blobs/`. The index names only the tag (`ref_name`), so the
    /// full name comes from `repo_tag` in manifest.json.
    pub fn write_docker_oci_save(&self, path: &Path, ref_name: &str, repo_tag: &str) {
        let dir = tempfile::tempdir().expect("staging dir");
        let (manifest_digest, size) = self.write_blobs(dir.path(), true);
        let descriptor = serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": size
        });
        write_index(
            dir.path(),
            descriptor,
            Some(serde_json::json!({REF_NAME: ref_name})),
        );
        let layers: Vec<String> = self
            .layers
            .iter()
            .map(|l| format!("blobs/sha256/{}", &digest(l)[7..]))
            .collect();
        let manifest = serde_json::json!([{
            "Config": format!("blobs/sha256/{}", &self.id()[7..]),
            "RepoTags": [repo_tag], "Layers": layers
        }]);
        std::fs::write(
            dir.path().join("manifest.json"),
            serde_json::to_vec(&manifest).expect("manifest.json"),
        )
        .expect("write manifest.json");
        tar_dir(dir.path(), path);
    }

    /// Writes a classic `docker save` archive (`manifest.json`,
    /// `<id>.json`, `<n>/layer.tar`) with `repo_tags`.
    pub fn write_docker_save(&self, path: &Path, repo_tags: &[&str]) {
        let mut builder = tar::Builder::new(Vec::new());
        let config_name = format!("{}.json", &self.id()[7..]);
        let mut layer_names = Vec::new();
        for (i, tar) in self.layers.iter().enumerate() {
            let name = format!("{i:064x}/layer.tar");
            append_file(&mut builder, &name, tar);
            layer_names.push(name);
        }
        append_file(&mut builder, &config_name, &self.config);
        let manifest = serde_json::json!([{
            "Config": config_name, "RepoTags": repo_tags, "Layers": layer_names
        }]);
        append_file(
            &mut builder,
            "manifest.json",
            &serde_json::to_vec(&manifest).expect("manifest.json"),
        );
        std::fs::write(path, builder.into_inner().expect("finish tar")).expect("write archive");
    }
}

/// The OCI annotation with an image's tag or name.
const REF_NAME: &str = "org.opencontainers.image.ref.name";

fn put_blob(dir: &Path, bytes: &[u8]) -> String {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("mkdir blobs");
    let d = digest(bytes);
    std::fs::write(blobs.join(&d[7..]), bytes).expect("write blob");
    d
}

fn write_index(
    dir: &Path,
    mut descriptor: serde_json::Value,
    annotations: Option<serde_json::Value>,
) {
    if let Some(annotations) = annotations {
        descriptor["annotations"] = annotations;
    }
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [descriptor]});
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&index).expect("index"),
    )
    .expect("write index.json");
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
        .expect("write oci-layout");
}

/// Writes an OCI image layout into `dir` holding one image per `(reference,
/// config)` pair, all on the same single gzipped `layer` (amd64/linux). The
/// config is the image config's `config` object (`Cmd`, `Env`, `User`, …).
pub fn write_single_layer_layout(dir: &Path, layer: &[u8], images: &[(&str, serde_json::Value)]) {
    use serde_json::json;
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let d = digest(bytes);
        std::fs::write(blobs.join(&d[7..]), bytes).unwrap();
        d
    };
    let diff_id = digest(layer);
    let gz = gzip(layer);
    let layer_digest = put(&gz);
    let mut manifests = Vec::new();
    for (name, config) in images {
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64", "os": "linux", "config": config,
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }))
        .unwrap();
        let config_digest = put(&config);
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_digest, "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": layer_digest, "size": gz.len()}],
        }))
        .unwrap();
        manifests.push(json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": put(&manifest), "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"org.opencontainers.image.ref.name": name},
        }));
    }
    let index = json!({"schemaVersion": 2, "manifests": manifests});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

/// Writes a multi-platform OCI layout: `index.json` points at an image
/// index with `amd64` and `arm64` manifests. Returns the amd64 manifest digest.
pub fn write_multiarch_layout(
    dir: &Path,
    amd64: &TinyImage,
    arm64: &TinyImage,
    ref_name: &str,
) -> String {
    let (amd64_digest, amd64_size) = amd64.write_blobs(dir, false);
    let (arm64_digest, arm64_size) = arm64.write_blobs(dir, false);
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json",
             "digest": arm64_digest, "size": arm64_size,
             "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json",
             "digest": amd64_digest, "size": amd64_size,
             "platform": {"architecture": "amd64", "os": "linux"}}
        ]
    }))
    .expect("index json");
    let index_digest = put_blob(dir, &index);
    let descriptor = serde_json::json!({
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "digest": index_digest, "size": index.len()
    });
    write_index(
        dir,
        descriptor,
        Some(serde_json::json!({REF_NAME: ref_name})),
    );
    amd64_digest
}

fn append_file(builder: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mode(0o644);
    header.set_size(data.len() as u64);
    header.set_mtime(1_700_000_000);
    builder
        .append_data(&mut header, name, data)
        .expect("append to archive");
}

/// Tars the directory `dir` into `path` (an OCI archive from a layout).
pub fn tar_dir(dir: &Path, path: &Path) {
    let mut builder = tar::Builder::new(Vec::new());
    builder.append_dir_all(".", dir).expect("tar layout");
    std::fs::write(path, builder.into_inner().expect("finish tar")).expect("write archive");
}

/// A port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Waits until something accepts connections on `port`.
pub fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A `docker-registry` process on 127.0.0.1, killed by PID on drop.
pub struct Registry {
    child: Child,
    /// Its port.
    pub port: u16,
    /// Its storage and config directory.
    pub dir: tempfile::TempDir,
}

impl Registry {
    /// Starts Debian's `docker-registry` with `extra` YAML appended to its
    /// config (e.g. an `auth:` section). `None` when it is not installed.
    pub fn start(extra: &str) -> Option<Registry> {
        let binary = Path::new("/usr/bin/docker-registry");
        if !binary.exists() {
            return None;
        }
        let dir = tempfile::tempdir().expect("registry dir");
        let port = free_port();
        let config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{extra}",
            dir.path().join("storage").display()
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).expect("registry config");
        let child = Command::new(binary)
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("registry.log")).expect("log"))
            .spawn()
            .expect("start docker-registry");
        let registry = Registry { child, port, dir };
        assert!(
            wait_for_port(port, Duration::from_secs(20)),
            "docker-registry did not listen on {port}: {}",
            registry.log()
        );
        Some(registry)
    }

    /// The registry's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// `127.0.0.1:<port>`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        // Child::kill signals exactly this PID.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pushes the layout `dir:tag` to `dest` (`host/name:tag`) with skopeo.
pub fn skopeo_push(
    layout: &Path,
    tag: &str,
    dest: &str,
    creds: Option<&str>,
) -> Result<(), String> {
    let mut command = Command::new("skopeo");
    command
        .arg("copy")
        .arg("--dest-tls-verify=false")
        .arg("--dest-compress=false");
    if let Some(creds) = creds {
        command.arg("--dest-creds").arg(creds);
    }
    let output = command
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker://{dest}"))
        .output()
        .map_err(|e| format!("skopeo: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// Whether a program is on PATH.
pub fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// A bearer-token issuer on loopback, as `docker-registry`'s `auth: token:`
/// expects: ES256 JWTs with the signing certificate in `x5c`, trusted via
/// the `rootcertbundle` this writes. Accepts one username/password.
pub struct TokenIssuer {
    /// The issuer's port.
    pub port: u16,
    /// The certificate bundle for the registry config.
    pub cert_path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

/// The `iss` and `aud` of issued tokens.
pub const TOKEN_ISSUER: &str = "gantry-test-issuer";
/// The service name the registry announces.
pub const TOKEN_SERVICE: &str = "gantry-test-registry";

impl TokenIssuer {
    /// Starts the issuer; tokens only for `username:password`.
    pub fn start(username: &str, password: &str) -> TokenIssuer {
        use base64::Engine as _;
        let dir = tempfile::tempdir().expect("issuer dir");
        let key = rcgen::KeyPair::generate().expect("p256 key");
        let params =
            rcgen::CertificateParams::new(vec!["token-issuer".to_string()]).expect("cert params");
        let cert = params.self_signed(&key).expect("self-signed cert");
        let cert_path = dir.path().join("issuer.pem");
        std::fs::write(&cert_path, cert.pem()).expect("write cert");
        let cert_der = base64::engine::general_purpose::STANDARD.encode(cert.der());
        let rng = ring::rand::SystemRandom::new();
        let signer = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &key.serialize_der(),
            &rng,
        )
        .expect("ring key");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind issuer");
        let port = listener.local_addr().expect("addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"))
        );
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let thread = std::thread::spawn(move || {
            // Bounded: the issuer lives at most two minutes.
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop_flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let _ = serve_token(stream, &expected, &signer, &rng, &cert_der);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        TokenIssuer {
            port,
            cert_path,
            stop,
            thread: Some(thread),
            _dir: dir,
        }
    }

    /// The `auth:` section for the registry config.
    pub fn registry_config(&self) -> String {
        format!(
            "auth:\n  token:\n    realm: http://127.0.0.1:{}/token\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
            self.port,
            self.cert_path.display()
        )
    }
}

impl Drop for TokenIssuer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve_token(
    stream: TcpStream,
    expected_auth: &str,
    signer: &ring::signature::EcdsaKeyPair,
    rng: &ring::rand::SystemRandom,
    cert_der_b64: &str,
) -> std::io::Result<()> {
    use base64::Engine as _;
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut authorization = None;
    for _ in 0..100 {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("authorization")
        {
            authorization = Some(value.trim().to_string());
        }
    }
    let mut stream = stream;
    if authorization.as_deref() != Some(expected_auth) {
        let body = r#"{"details":"bad credentials"}"#;
        write!(
            stream,
            "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        return Ok(());
    }
    // GET /token?scope=repository:name:pull,push&service=...
    let target = request_line.split_whitespace().nth(1).unwrap_or("");
    let query = target.split_once('?').map_or("", |(_, q)| q);
    let mut access = Vec::new();
    for pair in query.split('&') {
        if let Some(scope) = pair.strip_prefix("scope=") {
            let scope = percent_decode(scope);
            let parts: Vec<&str> = scope.splitn(3, ':').collect();
            if let [kind, name, actions] = parts[..] {
                access.push(serde_json::json!({
                    "type": kind, "name": name,
                    "actions": actions.split(',').collect::<Vec<_>>()
                }));
            }
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [cert_der_b64]});
    let claims = serde_json::json!({
        "iss": TOKEN_ISSUER, "sub": "gantry", "aud": TOKEN_SERVICE,
        "exp": now + 300, "nbf": now - 10, "iat": now, "jti": format!("{now}-{}", access.len()),
        "access": access
    });
    let signing_input = format!(
        "{}.{}",
        b64.encode(header.to_string()),
        b64.encode(claims.to_string())
    );
    let signature = signer
        .sign(rng, signing_input.as_bytes())
        .map_err(|_| std::io::Error::other("signing failed"))?;
    let token = format!("{signing_input}.{}", b64.encode(signature.as_ref()));
    let body =
        serde_json::json!({"token": token, "access_token": token, "expires_in": 300}).to_string();
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let _ = reader.read(&mut [0u8; 0]);
    Ok(())
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&value[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
        } else {
            out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The test images (`deploy/images/build-test-images.sh`: `web.tar`,
/// `busybox.tar`), built once under `root` (an integration test passes
/// `env!("CARGO_TARGET_TMPDIR")`) and reused.
///
/// The build is byte-for-byte reproducible, so its output is kept in a
/// directory named after the script's and busybox's digests: a later run (or
/// a concurrent one) reuses it, and a changed script gets a fresh one. It is
/// built beside that directory and renamed into place, so a half-built
/// directory is never used, and a process never removes one another may be
/// reading.
pub fn test_images_in(root: &Path) -> PathBuf {
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/images/build-test-images.sh");
    let mut inputs = std::fs::read(&script).expect("read build-test-images.sh");
    inputs.extend(std::fs::read(crate::bundle::HOST_BUSYBOX).expect("read busybox"));
    let digest = digest(&inputs);
    let dir = root.join(format!("deploy-test-images-{}", &digest[7..19]));
    if dir.join("web.tar").is_file() {
        return dir;
    }
    let scratch = tempfile::Builder::new()
        .prefix("deploy-test-images.build-")
        .tempdir_in(root)
        .expect("scratch dir for the test images");
    let out = Command::new("bash")
        .arg(script)
        .arg(scratch.path())
        .stdin(Stdio::null())
        .output()
        .expect("run build-test-images.sh");
    assert!(
        out.status.success(),
        "build-test-images.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Losing the race to a concurrent build is fine: its output is the
    // same, and the scratch directory is removed on drop.
    if std::fs::rename(scratch.path(), &dir).is_err() && !dir.join("web.tar").is_file() {
        panic!("could not move the test images to {}", dir.display());
    }
    dir
}
