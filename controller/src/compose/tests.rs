//! Scenario tests over the fixtures in `controller/testdata/compose/`, and
//! the idempotence property.
//!
//! `ok/<case>/` holds a `compose.yaml`, the files next to it (`.env`,
//! `env_file`s), an optional `process.env` (the process environment) and the
//! expected `expected.json` (the normalized stack) and `warnings.txt`.
//! `errors/<case>.yaml` holds a refused file and `<case>.err` its message.
//! Run with `UPDATE_EXPECT=1` to rewrite the expectations, then review the
//! diff.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use proptest::prelude::*;

use super::*;

/// Where the fixtures pretend to live: bind sources resolve under it and
/// its name is the default stack name.
const PROJECT: &str = "/srv/demo";

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/compose")
}

fn updating() -> bool {
    std::env::var_os("UPDATE_EXPECT").is_some()
}

/// Loads a compose file with the other files of `dir` served from memory
/// under [`PROJECT`].
fn load_case(dir: &Path, compose: &Path) -> Result<Loaded, ComposeError> {
    let mut files = MemoryFiles::default();
    let mut env = BTreeMap::new();
    if dir.is_dir() {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let text = fs::read_to_string(&path).unwrap();
            if name == "process.env" {
                for (k, v) in env::parse(&text, "process.env", &|_| None).unwrap() {
                    env.insert(k, v.unwrap_or_default());
                }
            } else {
                files.0.insert(Path::new(PROJECT).join(name), text);
            }
        }
    }
    let options = LoadOptions {
        project_dir: Path::new(PROJECT),
        stack_name: None,
        env: &env,
        files: &files,
    };
    load(&fs::read(compose).unwrap(), &options)
}

fn check_text(path: &Path, actual: &str) {
    if updating() {
        fs::write(path, actual).unwrap();
        return;
    }
    let expected = fs::read_to_string(path)
        .unwrap_or_else(|_| panic!("{} is missing; run with UPDATE_EXPECT=1", path.display()));
    assert_eq!(actual, expected, "{} differs", path.display());
}

#[test]
fn ok_fixtures() {
    let root = testdata().join("ok");
    let mut cases: Vec<PathBuf> = fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    cases.sort();
    assert!(cases.len() >= 3, "fixtures are missing");
    for dir in cases {
        let loaded = load_case(&dir, &dir.join("compose.yaml"))
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let actual = serde_json::to_value(&loaded.stack).unwrap();
        let expected_path = dir.join("expected.json");
        if updating() {
            let text = serde_json::to_string_pretty(&actual).unwrap() + "\n";
            fs::write(&expected_path, text).unwrap();
        } else {
            let expected: serde_json::Value =
                serde_json::from_str(&fs::read_to_string(&expected_path).unwrap()).unwrap();
            assert_eq!(actual, expected, "{} differs", expected_path.display());
        }
        let warnings: String = loaded.warnings.iter().map(|w| format!("{w}\n")).collect();
        check_text(&dir.join("warnings.txt"), &warnings);

        // What the stack prints is a compose file that loads back the same.
        let yaml = to_compose_yaml(&loaded.stack).unwrap();
        let again = reload(&yaml, &loaded.stack.name).unwrap();
        assert_eq!(
            again.stack,
            loaded.stack,
            "{} does not reload",
            dir.display()
        );
        assert!(again.warnings.is_empty(), "{:?}", again.warnings);
        // A stack deserializes from its own JSON.
        let back: Stack = serde_json::from_value(actual).unwrap();
        assert_eq!(back, loaded.stack);
    }
}

#[test]
fn error_fixtures() {
    let root = testdata().join("errors");
    let mut cases: Vec<PathBuf> = fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 5, "fixtures are missing");
    for case in cases {
        let err = match load_case(Path::new("/nonexistent"), &case) {
            Ok(loaded) => panic!("{} loaded: {:?}", case.display(), loaded.stack),
            Err(e) => e,
        };
        check_text(&case.with_extension("err"), &format!("{err}\n"));
    }
}

fn reload(yaml: &str, name: &str) -> Result<Loaded, ComposeError> {
    let env = BTreeMap::new();
    let files = MemoryFiles::default();
    let options = LoadOptions {
        project_dir: Path::new(PROJECT),
        stack_name: Some(name),
        env: &env,
        files: &files,
    };
    load(yaml.as_bytes(), &options)
}

fn load_str(yaml: &str) -> Result<Loaded, ComposeError> {
    let env = BTreeMap::from([("HOME".to_string(), "/home/op".to_string())]);
    let files = MemoryFiles::default();
    let options = LoadOptions {
        project_dir: Path::new(PROJECT),
        stack_name: None,
        env: &env,
        files: &files,
    };
    load(yaml.as_bytes(), &options)
}

#[test]
fn typo_names_line_column_and_hint() {
    let err = load_str("services:\n  web:\n    image: nginx\n    deploy:\n      replcas: 3\n")
        .unwrap_err();
    match err {
        ComposeError::UnknownKey {
            pos,
            key,
            path,
            hint,
        } => {
            assert_eq!((pos.line, pos.column), (5, 7));
            assert_eq!(key, "replcas");
            assert_eq!(path, "services.web.deploy.replcas");
            assert_eq!(hint, " (did you mean `replicas`?)");
        }
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn stack_name_rules() {
    let env = BTreeMap::new();
    let files = MemoryFiles::default();
    let yaml = b"name: from-file\nservices:\n  a:\n    image: x\n";
    let name = |dir: &str, flag: Option<&str>, yaml: &[u8]| {
        let options = LoadOptions {
            project_dir: Path::new(dir),
            stack_name: flag,
            env: &env,
            files: &files,
        };
        load(yaml, &options).map(|l| l.stack.name)
    };
    assert_eq!(name("/x/My App.v2", Some("cli"), yaml).unwrap(), "cli");
    assert_eq!(name("/x/My App.v2", None, yaml).unwrap(), "from-file");
    let bare = b"services:\n  a:\n    image: x\n";
    assert_eq!(name("/x/My App.v2", None, bare).unwrap(), "myappv2");
    assert_eq!(name("/x/_Demo", None, bare).unwrap(), "demo");
    assert!(matches!(
        name("/x/y", Some("Bad Name"), bare),
        Err(ComposeError::InvalidStackName { .. })
    ));
    assert!(matches!(
        name("/", None, bare),
        Err(ComposeError::InvalidStackName { .. })
    ));
}

#[test]
fn process_env_wins_over_dotenv() {
    let env = BTreeMap::from([("TAG".to_string(), "from-process".to_string())]);
    let files = MemoryFiles(BTreeMap::from([(
        PathBuf::from("/p/.env"),
        "TAG=from-dotenv\nOTHER=x\n".to_string(),
    )]));
    let options = LoadOptions {
        project_dir: Path::new("/p"),
        stack_name: None,
        env: &env,
        files: &files,
    };
    let yaml = b"services:\n  a:\n    image: app:${TAG}-${OTHER}\n";
    let stack = load(yaml, &options).unwrap().stack;
    assert_eq!(stack.services["a"].image, "app:from-process-x");
}

#[test]
fn missing_env_file_is_an_error_unless_optional() {
    let yaml = "services:\n  a:\n    image: x\n    env_file: missing.env\n";
    assert!(matches!(load_str(yaml), Err(ComposeError::Read { .. })));
    let yaml = "services:\n  a:\n    image: x\n    env_file:\n      - path: missing.env\n        required: false\n";
    assert!(
        load_str(yaml).unwrap().stack.services["a"]
            .environment
            .is_empty()
    );
}

#[test]
fn restart_maps_onto_the_policy() {
    let policy = |restart: &str| {
        let yaml = format!("services:\n  a:\n    image: x\n    restart: {restart}\n");
        load_str(&yaml).unwrap().stack.services["a"]
            .deploy
            .restart_policy
            .clone()
    };
    assert_eq!(policy("\"no\"").condition, RestartCondition::None);
    assert_eq!(policy("always").condition, RestartCondition::Any);
    assert_eq!(policy("unless-stopped").condition, RestartCondition::Any);
    let p = policy("on-failure:4");
    assert_eq!(
        (p.condition, p.max_attempts),
        (RestartCondition::OnFailure, Some(4))
    );
    assert_eq!(p.delay, units::Duration::default());
    let swarm = load_str("services:\n  a:\n    image: x\n")
        .unwrap()
        .stack
        .services["a"]
        .deploy
        .restart_policy
        .clone();
    assert_eq!(
        (
            swarm.condition,
            swarm.delay,
            swarm.max_attempts,
            swarm.window
        ),
        (
            RestartCondition::Any,
            units::Duration::default(),
            None,
            units::Duration::default()
        )
    );
}

#[test]
fn diff_reports_create_update_remove() {
    let old = load_str(
        "services:\n  web:\n    image: web:1\n    deploy:\n      replicas: 2\n  db:\n    image: db:1\n  gone:\n    image: x\n",
    )
    .unwrap()
    .stack;
    let new = load_str(
        "services:\n  web:\n    image: web:1\n    deploy:\n      replicas: 5\n  db:\n    image: db:2\n    environment: [A=1]\n  fresh:\n    image: y\nvolumes:\n  v: {}\n",
    )
    .unwrap()
    .stack;
    let changes = diff(&old, &new);
    assert_eq!(changes.create, ["fresh"]);
    assert_eq!(changes.remove, ["gone"]);
    assert_eq!(
        changes.update,
        [
            ServiceUpdate {
                service: "db".into(),
                fields: vec!["image".into(), "environment".into()],
            },
            ServiceUpdate {
                service: "web".into(),
                fields: vec!["deploy.replicas".into()],
            },
        ]
    );
    assert!(changes.update[1].is_scale_only());
    assert_eq!(changes.volumes.create, ["v"]);
    assert!(diff(&new, &new).is_empty());
}

/// A random but valid service definition, as a user might write it.
fn service_yaml() -> impl Strategy<Value = String> {
    let image = prop::sample::select(vec![
        "nginx",
        "busybox:1.36",
        "registry.local/a/b:${TAG:-1}",
    ]);
    let replicas = prop::option::of(0u32..6);
    let port = (1u16..60000, 1u16..60000, prop::bool::ANY)
        .prop_map(|(p, t, udp)| format!("\"{p}:{t}{}\"", if udp { "/udp" } else { "" }));
    let ports = prop::collection::vec(port, 0..3);
    let memory = prop::option::of((
        1u32..4096,
        prop::sample::select(vec!["", "b", "k", "M", "m", "g", "GB"]),
    ));
    let cpus = prop::option::of((0u32..8, 1u32..1000).prop_map(|(w, f)| format!("{w}.{f}")));
    let duration = (1u32..500, prop::sample::select(vec!["ms", "s", "m", "h"]))
        .prop_map(|(n, u)| format!("{n}{u}"));
    let env = prop::collection::btree_map("[A-Z][A-Z0-9_]{0,5}", "[a-z0-9 $]{0,8}", 0..4);
    let command = prop::option::of(prop::collection::vec("[a-z0-9$'\" -]{1,6}", 1..4));
    let restart = prop::option::of(prop::sample::select(vec![
        "\"no\"",
        "always",
        "on-failure",
        "on-failure:2",
        "unless-stopped",
    ]));
    let mounts = prop::collection::vec(
        prop::sample::select(vec![
            "data:/data",
            "data:/ro:ro",
            "./site:/site",
            "/cache",
            "~/x:/x:rw",
        ]),
        0..3,
    );
    let constraint = prop::option::of(prop::sample::select(vec![
        "node.labels.zone==eu",
        "node.role != manager",
    ]));
    (
        (image, replicas, ports, memory, cpus),
        (duration, env, command, restart, mounts, constraint),
    )
        .prop_map(
            |(
                (image, replicas, ports, memory, cpus),
                (duration, env, command, restart, mounts, constraint),
            )| {
                let mut s = format!("    image: {image}\n");
                if let Some(words) = command {
                    let shell: Vec<String> = words
                        .iter()
                        .map(|w| format!("'{}'", w.replace('\'', "").replace('$', "$$")))
                        .collect();
                    s += &format!(
                        "    command: \"{}\"\n",
                        shell.join(" ").replace('"', "\\\"")
                    );
                }
                if !env.is_empty() {
                    s += "    environment:\n";
                    for (k, v) in &env {
                        s += &format!("      {k}: \"{}\"\n", v.replace('$', "$$"));
                    }
                }
                if !ports.is_empty() {
                    s += &format!("    ports: [{}]\n", ports.join(", "));
                }
                if !mounts.is_empty() {
                    s += "    volumes:\n";
                    for m in &mounts {
                        s += &format!("      - \"{m}\"\n");
                    }
                }
                s +=
                    &format!("    healthcheck:\n      test: echo ok\n      interval: {duration}\n");
                if let Some(r) = restart {
                    s += &format!("    restart: {r}\n");
                }
                s += "    deploy:\n";
                if let Some(n) = replicas {
                    s += &format!("      replicas: {n}\n");
                }
                if memory.is_some() || cpus.is_some() {
                    s += "      resources:\n        limits:\n";
                    if let Some((n, unit)) = memory {
                        s += &format!("          memory: {n}{unit}\n");
                    }
                    if let Some(c) = cpus {
                        s += &format!("          cpus: \"{c}\"\n");
                    }
                }
                if let Some(c) = constraint {
                    s += &format!("      placement:\n        constraints: [\"{c}\"]\n");
                }
                s
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// normalize → serialize → parse → normalize gives the same stack, and
    /// the second pass has nothing left to warn about.
    #[test]
    fn normalizing_is_idempotent(services in prop::collection::btree_map("[a-z][a-z0-9-]{0,6}", service_yaml(), 1..4)) {
        let mut yaml = String::from("services:\n");
        for (name, body) in &services {
            yaml += &format!("  {name}:\n{body}");
        }
        yaml += "volumes:\n  data: {}\n";
        let first = load_str(&yaml).map_err(|e| TestCaseError::fail(format!("{e}\n{yaml}")))?;
        let printed = to_compose_yaml(&first.stack).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let second = reload(&printed, &first.stack.name).map_err(|e| TestCaseError::fail(format!("{e}\n{printed}")))?;
        prop_assert_eq!(&second.stack, &first.stack);
        prop_assert!(second.warnings.is_empty(), "{:?}", second.warnings);
    }
}
