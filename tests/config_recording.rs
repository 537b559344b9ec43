//! The `recording:` section (contract §12): defaults, every key, and errors that name the key.

use std::collections::HashMap;
use std::path::PathBuf;

use vncgate::config::{Config, ConfigErrors, RecordInput, RecordWhen};

const SECRET: &str = "0123456789abcdef0123456789abcdef-test";

const MINIMAL: &str = r#"
listeners:
  - addr: "127.0.0.1:6080"
pools:
  default:
    backends:
      - { name: desk-a, addr: "10.0.0.11:5901" }
"#;

fn load(extra: &str) -> Result<Config, ConfigErrors> {
    let env: HashMap<&str, &str> = [("VNCGATE_JWT_SECRET", SECRET)].into();
    Config::from_yaml(&format!("{MINIMAL}{extra}"), &|name| {
        env.get(name).map(|v| v.to_string())
    })
}

fn load_ok(extra: &str) -> Config {
    match load(extra) {
        Ok(c) => c,
        Err(e) => panic!("expected a valid config, got:\n{e}"),
    }
}

fn errors(extra: &str) -> Vec<String> {
    match load(extra) {
        Ok(c) => panic!("expected errors, got {:?}", c.recording),
        Err(e) => e.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn defaults_are_the_contracts_and_recording_is_off() {
    for extra in ["", "recording: {}\n", "recording:\n  dir: null\n"] {
        let r = load_ok(extra).recording;
        assert_eq!(r.dir, None, "{extra:?}");
        assert_eq!(r.when, RecordWhen::Claim);
        assert_eq!(r.input, RecordInput::Pointer);
        assert_eq!(r.max_bytes_per_session, 1_073_741_824);
        assert_eq!(r.retention_days, 30);
    }
}

#[test]
fn every_key_is_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = load_ok(&format!(
        "recording:\n  dir: {:?}\n  when: always\n  input: keys\n  max_bytes_per_session: 65536\n  retention_days: 7\n",
        dir.path().display().to_string()
    ))
    .recording;
    assert_eq!(r.dir, Some(dir.path().to_path_buf()));
    assert_eq!(r.when, RecordWhen::Always);
    assert_eq!(r.input, RecordInput::Keys);
    assert_eq!(r.max_bytes_per_session, 65536);
    assert_eq!(r.retention_days, 7);
    let r = load_ok("recording: { dir: /nonexistent/yet, when: claim, input: none }\n").recording;
    assert_eq!(r.dir, Some(PathBuf::from("/nonexistent/yet")));
    assert_eq!(r.when, RecordWhen::Claim);
    assert_eq!(r.input, RecordInput::None);
}

#[test]
fn errors_name_the_key() {
    assert_eq!(
        errors("recording: { when: sometimes, input: mouse }\n"),
        [
            "recording.when: invalid value \"sometimes\" (expected always or claim)",
            "recording.input: invalid value \"mouse\" (expected none, pointer or keys)",
        ]
    );
    assert_eq!(
        errors("recording: { dir: \"\", max_bytes_per_session: 0, retention_days: 0 }\n"),
        [
            "recording.dir: must not be empty (use null to turn recording off)",
            "recording.max_bytes_per_session: must be at least 4096",
            "recording.retention_days: must be at least 1",
        ]
    );
    assert_eq!(
        errors("recording: { retention_days: 36501 }\n"),
        ["recording.retention_days: must be at most 36500"]
    );
    let e = errors("recording: { dir: /tmp, keep: 3 }\n");
    assert_eq!(e.len(), 1);
    assert!(
        e[0].starts_with("recording.keep: unknown field `keep`, expected one of `dir`"),
        "{e:?}"
    );
    let e = errors("recording: { max_bytes_per_session: lots }\n");
    assert!(
        e[0].starts_with("recording.max_bytes_per_session: "),
        "{e:?}"
    );
}

#[test]
fn a_dir_that_is_a_file_is_refused_for_this_machine_but_not_by_lint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").expect("write");
    let extra = format!("recording:\n  dir: {:?}\n", file.display().to_string());
    assert_eq!(
        errors(&extra),
        [format!(
            "recording.dir: not a directory {:?}",
            file.display().to_string()
        )]
    );
    assert!(Config::lint_yaml(&format!("{MINIMAL}{extra}")).is_ok());
}
