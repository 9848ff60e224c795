//! The Compose files under `examples/` (what the README and `deploy/demo.sh`
//! deploy) load without errors or warnings and convert to service specs the
//! controller accepts: an example that drifts from what Gantry supports
//! fails here, not in front of a user.

use std::collections::BTreeMap;
use std::path::Path;

use gantry_controller::compose::{self, DiskFiles, LoadOptions};
use gantry_controller::server::deploy;

#[test]
fn examples_load_cleanly_and_convert() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let dir = dir.canonicalize().expect("examples/ exists");
    let env = BTreeMap::new();
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("read examples/") {
        let path = entry.expect("dir entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        seen += 1;
        let source = std::fs::read(&path).expect("read example");
        let loaded = compose::load(
            &source,
            &LoadOptions {
                project_dir: &dir,
                stack_name: None,
                env: &env,
                files: &DiskFiles,
            },
        )
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            loaded.warnings.is_empty(),
            "{}: warnings {:?}",
            path.display(),
            loaded.warnings
        );
        let stack =
            deploy::revalidate(&loaded.stack).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let specs =
            deploy::service_specs(&stack).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(!specs.is_empty(), "{}: no services", path.display());
    }
    assert!(seen > 0, "no Compose files in {}", dir.display());
}
