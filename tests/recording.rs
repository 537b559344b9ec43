//! The recorder (contract §12) on real files and on sinks that are slow or fail on demand, and
//! `vncgate recording verify` run as a process on what it wrote.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex};

use serde_json::{Value, json};
use vncgate::config::{RecordInput, RecordWhen, RecordingConfig};
use vncgate::recording::recorder::{DEFAULT_QUEUE_BYTES, Outcome};
use vncgate::recording::{
    FileSink, Recorder, RecordingHandle, RecordingMetrics, Sink, SinkFile, fbs,
};

fn server_init(width: u16, height: u16, name: &str) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&width.to_be_bytes());
    b.extend_from_slice(&height.to_be_bytes());
    b.extend_from_slice(&[32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0]);
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

fn settings(dir: &Path) -> RecordingConfig {
    RecordingConfig {
        dir: Some(dir.to_path_buf()),
        when: RecordWhen::Claim,
        input: RecordInput::Pointer,
        max_bytes_per_session: 1 << 30,
        retention_days: 30,
    }
}

fn metrics() -> RecordingMetrics {
    RecordingMetrics::new().expect("metrics")
}

fn start(recorder: &Recorder, sid: &str) -> RecordingHandle {
    recorder
        .start(sid, 7, &server_init(800, 600, "desk"))
        .expect("recording on")
}

/// Server bytes as the relay hands them over (a chunk of its read buffer).
fn chunk_of(data: &[u8]) -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(data)
}

fn audit(outcome: &Outcome) -> Vec<Value> {
    let text = std::fs::read_to_string(outcome.fbs_path.with_extension("jsonl")).expect("jsonl");
    text.lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

fn events(lines: &[Value]) -> Vec<&str> {
    lines
        .iter()
        .map(|v| v["event"].as_str().expect("event"))
        .collect()
}

fn verify_cmd(path: &Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vncgate"))
        .args(["recording", "verify"])
        .arg(path)
        .output()
        .expect("run vncgate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const HANDSHAKE_BYTES: u64 = 12 + 4 + 24 + 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_recorded_to_fbs_and_audit_and_verifies() {
    let root = tempfile::tempdir().expect("tempdir");
    let m = metrics();
    let recorder = Recorder::new(settings(root.path()), m.clone());
    assert!(recorder.should_record(true));
    assert!(!recorder.should_record(false));
    let rec = start(&recorder, "alice-desk");
    rec.server_data(&chunk_of(b"\x00\x00\x00\x01abc"));
    rec.event(json!({"event": "pointer", "x": 10, "y": 20, "buttons": 1}));
    rec.server_data(&chunk_of(&[9u8; 10_000]));
    rec.event(json!({"event": "input_mode_changed", "mode": "view_only", "t": 5}));
    rec.finish("closed");
    rec.finish("twice");
    let outcome = rec.ended().await;
    assert_eq!(outcome.error, None);
    assert!(!outcome.incomplete);
    assert_eq!(outcome.reason, "closed");
    assert_eq!(outcome.bytes, 10_007);
    assert_eq!(outcome.dropped_bytes, 0);

    // {dir}/{YYYY-MM-DD}/{sid}/{unix-ms}-{conn_id}.fbs
    let rel = outcome
        .fbs_path
        .strip_prefix(root.path())
        .expect("inside dir");
    let parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    assert_eq!(parts.len(), 3, "{parts:?}");
    assert_eq!(parts[0].len(), 10);
    assert_eq!(parts[1], "alice-desk");
    assert!(parts[2].ends_with("-7.fbs"), "{parts:?}");
    assert_eq!(rec.fbs_path(), outcome.fbs_path);

    let file = std::fs::File::open(&outcome.fbs_path).expect("fbs");
    let summary = fbs::verify(file).expect("valid FBS");
    assert_eq!(summary.bytes, HANDSHAKE_BYTES + 10_007);
    assert_eq!(summary.blocks, 5);
    assert!(!summary.truncated);
    assert_eq!(summary.server_init.name, "desk");

    let lines = audit(&outcome);
    assert_eq!(
        events(&lines),
        [
            "recording_started",
            "pointer",
            "input_mode_changed",
            "recording_ended"
        ]
    );
    assert_eq!(lines[0]["session_id"], "alice-desk");
    assert_eq!(lines[0]["conn_id"], 7);
    assert_eq!(
        (lines[0]["width"].clone(), lines[0]["height"].clone()),
        (json!(800), json!(600))
    );
    assert!(lines[1]["t"].is_u64(), "t added: {}", lines[1]);
    assert_eq!(lines[2]["t"], 5, "a caller's t is kept");
    assert_eq!(lines[3]["incomplete"], false);
    assert_eq!(lines[3]["bytes"], 10_007);

    assert_eq!(m.active.get(), 0);
    assert!(m.bytes_total.get() >= HANDSHAKE_BYTES + 10_007);
    assert_eq!(m.dropped_total.get(), 0);

    let (code, stdout, stderr) = verify_cmd(&outcome.fbs_path);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains(&format!("bytes: {}", HANDSHAKE_BYTES + 10_007)),
        "{stdout}"
    );
    assert!(stdout.contains("blocks: 5"), "{stdout}");
    assert!(stdout.contains("size: 800x600"), "{stdout}");
    assert!(stdout.contains("name: \"desk\""), "{stdout}");
    assert!(stdout.contains("duration: "), "{stdout}");
    assert!(stdout.contains("incomplete: no"), "{stdout}");

    // Handle calls after the end do nothing and return.
    rec.server_data(&chunk_of(b"late"));
    rec.event(json!({"event": "late"}));
    assert_eq!(audit(&outcome).len(), 4);
}

#[tokio::test]
async fn verify_rejects_a_corrupt_file_and_reports_a_cut_one() {
    let root = tempfile::tempdir().expect("tempdir");
    let recorder = Recorder::new(settings(root.path()), metrics());
    let rec = start(&recorder, "s");
    rec.server_data(&chunk_of(&[1u8; 1000]));
    rec.finish("closed");
    let path = rec.ended().await.fbs_path;
    let good = std::fs::read(&path).expect("read");

    // Cut in the middle of the last block (a crash): valid, incomplete.
    let cut = root.path().join("cut.fbs");
    std::fs::write(&cut, &good[..good.len() - 10]).expect("write");
    let (code, stdout, stderr) = verify_cmd(&cut);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("incomplete: yes"), "{stdout}");

    // Not FBS at all.
    let corrupt = root.path().join("corrupt.fbs");
    let mut bad = good.clone();
    bad[0] = b'X';
    std::fs::write(&corrupt, &bad).expect("write");
    let (code, stdout, stderr) = verify_cmd(&corrupt);
    assert_eq!(code, 1);
    assert!(stdout.is_empty());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("bad header"), "{stderr}");

    // A handshake that is not RFB 3.3 security None.
    let mut bad = good.clone();
    bad[12 + 4 + 12 + 4 + 4 + 3] = 2; // the security type's low byte
    std::fs::write(&corrupt, &bad).expect("write");
    let (code, _, stderr) = verify_cmd(&corrupt);
    assert_eq!(code, 1);
    assert!(stderr.contains("security type is 2"), "{stderr}");

    let (code, _, stderr) = verify_cmd(&root.path().join("absent.fbs"));
    assert_eq!(code, 1);
    assert!(stderr.contains("cannot open"), "{stderr}");
}

/// Blocks every write until the test opens the gate: a disk that cannot keep up at all.
struct GatedSink {
    open: Arc<(Mutex<bool>, Condvar)>,
}

struct GatedFile {
    inner: Box<dyn SinkFile>,
    open: Arc<(Mutex<bool>, Condvar)>,
}

impl GatedSink {
    fn new() -> (GatedSink, Arc<(Mutex<bool>, Condvar)>) {
        let open = Arc::new((Mutex::new(false), Condvar::new()));
        (GatedSink { open: open.clone() }, open)
    }
}

fn release(gate: &(Mutex<bool>, Condvar)) {
    *gate.0.lock().expect("gate") = true;
    gate.1.notify_all();
}

impl Sink for GatedSink {
    fn create(&self, path: &Path) -> io::Result<Box<dyn SinkFile>> {
        Ok(Box::new(GatedFile {
            inner: FileSink.create(path)?,
            open: self.open.clone(),
        }))
    }
}

impl SinkFile for GatedFile {
    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        let (lock, cvar) = &*self.open;
        let mut open = lock.lock().expect("gate");
        while !*open {
            open = cvar.wait(open).expect("gate");
        }
        drop(open);
        self.inner.write_all(data)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.inner.sync()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_disk_drops_counts_and_marks_incomplete_without_blocking_the_caller() {
    let root = tempfile::tempdir().expect("tempdir");
    let m = metrics();
    let (sink, gate) = GatedSink::new();
    let recorder = Recorder::new(settings(root.path()), m.clone()).with_sink(Arc::new(sink));
    let rec = start(&recorder, "busy");
    // 100 MB while the sink takes nothing: had a call waited on the disk, this loop would never
    // end (the gate opens only after it).
    let chunk = vec![0x5Au8; 64 * 1024];
    let total: u64 = 1600 * chunk.len() as u64;
    for i in 0..1600 {
        rec.server_data(&chunk_of(&chunk));
        if i == 800 {
            rec.event(json!({"event": "pointer", "x": 1, "y": 2, "buttons": 1}));
        }
    }
    release(&gate);
    rec.finish("closed");
    let outcome = rec.ended().await;

    assert_eq!(outcome.error, None);
    assert!(outcome.incomplete);
    assert_eq!(outcome.incomplete_reason, Some("queue_full"));
    assert!(
        outcome.bytes <= DEFAULT_QUEUE_BYTES as u64,
        "{}",
        outcome.bytes
    );
    assert_eq!(outcome.bytes + outcome.dropped_bytes, total);
    assert_eq!(m.dropped_total.get(), outcome.dropped_bytes);
    assert_eq!(m.active.get(), 0);

    // The file holds what was accepted, whole: it stops at the gap rather than skipping it.
    let summary = fbs::verify(std::fs::File::open(&outcome.fbs_path).expect("fbs")).expect("valid");
    assert_eq!(summary.bytes, HANDSHAKE_BYTES + outcome.bytes);
    assert!(!summary.truncated);

    // The audit goes on after the gap, and ends saying the recording is incomplete.
    let lines = audit(&outcome);
    assert_eq!(
        events(&lines),
        [
            "recording_started",
            "recording_gap",
            "pointer",
            "recording_ended"
        ]
    );
    assert_eq!(lines[1]["reason"], "queue_full");
    let end = &lines[3];
    assert_eq!(end["incomplete"], true);
    assert_eq!(end["incomplete_reason"], "queue_full");
    assert_eq!(end["dropped_bytes"], outcome.dropped_bytes);

    let (code, stdout, stderr) = verify_cmd(&outcome.fbs_path);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("incomplete: yes"), "{stdout}");
}

/// Accepts `budget` bytes per file, then fails every write as a full disk does.
struct FullDisk {
    budget: usize,
}

struct FullFile {
    inner: Box<dyn SinkFile>,
    left: usize,
}

impl Sink for FullDisk {
    fn create(&self, path: &Path) -> io::Result<Box<dyn SinkFile>> {
        Ok(Box::new(FullFile {
            inner: FileSink.create(path)?,
            left: self.budget,
        }))
    }
}

impl SinkFile for FullFile {
    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        if data.len() > self.left {
            return Err(io::Error::from_raw_os_error(libc_enospc()));
        }
        self.left -= data.len();
        self.inner.write_all(data)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.inner.sync()
    }
}

/// ENOSPC on Linux (the only platform vncgate targets).
fn libc_enospc() -> i32 {
    28
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_ends_the_recording_and_the_caller_goes_on() {
    let root = tempfile::tempdir().expect("tempdir");
    let m = metrics();
    let recorder = Recorder::new(settings(root.path()), m.clone())
        .with_sink(Arc::new(FullDisk { budget: 4096 }));
    let rec = start(&recorder, "full");
    rec.server_data(&chunk_of(&[1u8; 1000]));
    rec.server_data(&chunk_of(&[2u8; 8000]));
    let outcome = rec.ended().await;
    assert_eq!(outcome.reason, "error");
    assert!(outcome.incomplete);
    assert_eq!(outcome.incomplete_reason, Some("error"));
    let error = outcome.error.clone().expect("error");
    assert!(error.contains("No space left"), "{error}");
    assert_eq!(m.active.get(), 0);
    // The handle keeps answering: nothing is written and nothing fails.
    for _ in 0..1000 {
        rec.server_data(&chunk_of(&[3u8; 10_000]));
        rec.event(json!({"event": "pointer"}));
    }
    rec.finish("closed");
    assert_eq!(rec.ended().await, outcome);
    // The audit (within its own budget still) got the final line with the error.
    let lines = audit(&outcome);
    let end = lines.last().expect("a line");
    assert_eq!(end["event"], "recording_ended");
    assert_eq!(end["incomplete"], true);
    assert!(
        end["error"]
            .as_str()
            .expect("error")
            .contains("No space left")
    );
    // The data up to the failure is still a valid (shorter) recording.
    let summary = fbs::verify(std::fs::File::open(&outcome.fbs_path).expect("fbs")).expect("valid");
    assert!(summary.bytes >= HANDSHAKE_BYTES);
}

#[tokio::test]
async fn an_unwritable_directory_ends_the_recording_with_its_error() {
    let root = tempfile::tempdir().expect("tempdir");
    // A regular file where the recordings directory should be: creating anything under it
    // fails with ENOTDIR, whoever runs the test (root included).
    let not_a_dir = root.path().join("recordings");
    std::fs::write(&not_a_dir, b"file").expect("write");
    let m = metrics();
    let recorder = Recorder::new(settings(&not_a_dir), m.clone());
    let rec = start(&recorder, "s");
    rec.server_data(&chunk_of(&[1u8; 100]));
    rec.event(json!({"event": "pointer"}));
    let outcome = rec.ended().await;
    assert_eq!(outcome.reason, "error");
    assert!(outcome.error.expect("error").contains("Not a directory"));
    rec.server_data(&chunk_of(&[1u8; 100]));
    rec.finish("closed");
    assert_eq!(m.active.get(), 0);
    assert_eq!(m.bytes_total.get(), 0);
}

#[tokio::test]
async fn max_bytes_per_session_ends_the_stream_not_the_audit() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut s = settings(root.path());
    s.max_bytes_per_session = 4096;
    let m = metrics();
    let recorder = Recorder::new(s, m.clone());
    let rec = start(&recorder, "capped");
    for _ in 0..10 {
        rec.server_data(&chunk_of(&[7u8; 1000]));
    }
    rec.event(json!({"event": "pointer", "x": 3, "y": 4, "buttons": 1}));
    rec.finish("kicked");
    let outcome = rec.ended().await;
    assert_eq!(outcome.bytes, 4000);
    assert!(outcome.incomplete);
    assert_eq!(outcome.incomplete_reason, Some("max_bytes"));
    assert_eq!(outcome.reason, "kicked");
    assert_eq!(outcome.dropped_bytes, 0, "a limit is not a drop");
    assert_eq!(m.dropped_total.get(), 0);
    let lines = audit(&outcome);
    assert_eq!(
        events(&lines),
        [
            "recording_started",
            "recording_limit",
            "pointer",
            "recording_ended"
        ]
    );
    assert_eq!(lines[1]["reason"], "max_bytes");
    assert_eq!(lines[3]["incomplete_reason"], "max_bytes");
    let summary = fbs::verify(std::fs::File::open(&outcome.fbs_path).expect("fbs")).expect("valid");
    assert_eq!(summary.bytes, HANDSHAKE_BYTES + 4000);
    let (code, stdout, _) = verify_cmd(&outcome.fbs_path);
    assert_eq!(code, 0);
    assert!(stdout.contains("incomplete: yes"), "{stdout}");
}

#[tokio::test]
async fn dropping_every_handle_closes_the_recording() {
    let root = tempfile::tempdir().expect("tempdir");
    let recorder = Recorder::new(settings(root.path()), metrics());
    let rec = start(&recorder, "..");
    let watcher = rec.clone();
    rec.server_data(&chunk_of(b"abcd"));
    drop(rec);
    // `watcher` still holds a sender: the recording stays open until it finishes or drops.
    watcher.finish("closed");
    let outcome = watcher.ended().await;
    assert!(!outcome.incomplete);
    // An all-dots session id stays one directory inside the day directory.
    let sid_dir: PathBuf = outcome.fbs_path.parent().expect("sid dir").to_path_buf();
    assert_eq!(sid_dir.file_name().expect("name"), "%2E%2E");
    assert!(sid_dir.starts_with(root.path()));
}

#[test]
fn recording_is_off_without_a_dir_or_a_runtime() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut s = settings(root.path());
    s.dir = None;
    let recorder = Recorder::new(s, metrics());
    assert!(!recorder.should_record(true));
    assert!(recorder.start("s", 1, &server_init(1, 1, "")).is_none());
    // Outside a tokio runtime there is no writer task to run: no recording, no panic.
    let recorder = Recorder::new(settings(root.path()), metrics());
    assert!(recorder.start("s", 1, &server_init(1, 1, "")).is_none());
    let mut s = settings(root.path());
    s.when = RecordWhen::Always;
    assert!(Recorder::new(s, metrics()).should_record(false));
}

#[test]
fn the_recording_series_are_exported_at_zero() {
    let yaml = "listeners:\n  - addr: \"127.0.0.1:6080\"\npools:\n  default:\n    backends:\n      - { name: a, addr: \"10.0.0.1:5901\" }\n";
    let config = vncgate::config::Config::from_yaml(yaml, &|name| {
        (name == "VNCGATE_JWT_SECRET").then(|| "0123456789abcdef0123456789abcdef-test".into())
    })
    .expect("config");
    let metrics = vncgate::metrics::Metrics::new(&config).expect("metrics");
    let text = String::from_utf8(metrics.render()).expect("utf-8");
    for series in [
        "vncgate_recordings_active 0",
        "vncgate_recording_bytes_total 0",
        "vncgate_recording_dropped_total 0",
    ] {
        assert!(text.lines().any(|l| l == series), "{series} missing");
    }
    assert!(text.contains("# TYPE vncgate_recordings_active gauge"));
    assert!(text.contains("# TYPE vncgate_recording_dropped_total counter"));
}

/// A FramebufferUpdate of one Raw rectangle covering `w`x`h` with one 4-byte pixel value.
fn raw_update(w: u16, h: u16, pixel: [u8; 4]) -> Vec<u8> {
    let mut b = vec![0, 0, 0, 1, 0, 0, 0, 0];
    b.extend_from_slice(&w.to_be_bytes());
    b.extend_from_slice(&h.to_be_bytes());
    b.extend_from_slice(&0i32.to_be_bytes());
    for _ in 0..usize::from(w) * usize::from(h) {
        b.extend_from_slice(&pixel);
    }
    b
}

fn export_cmd(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vncgate"))
        .args(["recording", "export"])
        .args(args)
        .output()
        .expect("run vncgate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The first pixel of a PNG, RGBA.
fn png_first_pixel(path: &Path) -> [u8; 4] {
    let decoder = png::Decoder::new(io::BufReader::new(std::fs::File::open(path).expect("png")));
    let mut reader = decoder.read_info().expect("png header");
    let mut buf = vec![0; reader.output_buffer_size().expect("size")];
    reader.next_frame(&mut buf).expect("frame");
    [buf[0], buf[1], buf[2], buf[3]]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_paints_the_last_frame_in_the_clients_pixel_format() {
    let root = tempfile::tempdir().expect("tempdir");
    let recorder = Recorder::new(settings(root.path()), metrics());
    let rec = start(&recorder, "export");
    // The client asks for noVNC's format (red in the low byte) before any update: the
    // ServerInit (written with red at shift 16) is rewritten with it.
    rec.client_pixel_format(vncgate::rfb::PixelFormat([
        32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 0, 8, 16, 0, 0, 0,
    ]));
    rec.server_data(&chunk_of(&raw_update(800, 600, [200, 10, 20, 0])));
    let outcome = {
        rec.finish("closed");
        rec.ended().await
    };
    assert_eq!(outcome.error, None);
    let fbs = outcome.fbs_path.display().to_string();
    let png = root.path().join("at.png");
    let png_arg = png.display().to_string();

    // Past the end: the last frame, said so.
    let (code, out, err) = export_cmd(&[&fbs, "--at", "3600.5", "--png", &png_arg]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("(the recording's end)"), "{out}");
    assert!(out.contains("size: 800x600"), "{out}");
    assert_eq!(png_first_pixel(&png), [200, 10, 20, 255]);

    // Refusals: a negative moment (usage, 2), a file that is not a recording (1).
    let (code, _, err) = export_cmd(&[&fbs, "--at", "-1", "--png", &png_arg]);
    assert_eq!(code, 2, "{err}");
    let not_fbs = root.path().join("not.fbs");
    std::fs::write(&not_fbs, b"hello").expect("write");
    let (code, _, err) = export_cmd(&[
        &not_fbs.display().to_string(),
        "--at",
        "0",
        "--png",
        &png_arg,
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("not an FBS 001.000 file"), "{err}");
}

/// A sink that notes every durability call in order.
struct JournalingSink(Arc<Mutex<Vec<String>>>);

struct JournaledFile {
    name: String,
    inner: Box<dyn SinkFile>,
    journal: Arc<Mutex<Vec<String>>>,
}

impl Sink for JournalingSink {
    fn create(&self, path: &Path) -> io::Result<Box<dyn SinkFile>> {
        let name = path
            .extension()
            .map(|e| e.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.0
            .lock()
            .expect("journal")
            .push(format!("create {name}"));
        Ok(Box::new(JournaledFile {
            name,
            inner: FileSink.create(path)?,
            journal: self.0.clone(),
        }))
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
        self.0
            .lock()
            .expect("journal")
            .push(format!("sync dir {}", name.unwrap_or_default()));
        FileSink.sync_dir(dir)
    }
}

impl SinkFile for JournaledFile {
    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.inner.write_all(data)
    }
    fn write_all_parts(&mut self, parts: &[bytes::Bytes]) -> io::Result<()> {
        self.journal
            .lock()
            .expect("journal")
            .push(format!("write {}", self.name));
        self.inner.write_all_parts(parts)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.journal
            .lock()
            .expect("journal")
            .push(format!("sync {}", self.name));
        self.inner.sync()
    }
}

/// A closed recording is durable under its name: both files are fsynced, then their directory
/// once (the names), in that order; nothing is synced before the close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_recording_syncs_its_files_then_their_directory_once() {
    let root = tempfile::tempdir().expect("tempdir");
    let journal = Arc::new(Mutex::new(Vec::new()));
    let recorder = Recorder::new(settings(root.path()), metrics())
        .with_sink(Arc::new(JournalingSink(journal.clone())));
    let rec = start(&recorder, "durable");
    rec.server_data(&chunk_of(&[1u8; 100]));
    rec.event(json!({"event": "pointer", "x": 1, "y": 2, "buttons": 1}));
    rec.finish("closed");
    let outcome = rec.ended().await;
    assert_eq!(outcome.error, None);
    assert_eq!(
        *journal.lock().expect("journal"),
        [
            "create fbs",
            "create jsonl",
            "write fbs",
            "sync fbs",
            "sync jsonl",
            "sync dir durable"
        ]
    );
}

/// Chunks that arrive one after another while the writer waits go to the disk as one batch
/// (one blocking call), not one each: the writer waits a moment for more before it writes.
/// The clock is paused, so "a moment" is never over unless the test lets it pass.
#[tokio::test(start_paused = true)]
async fn chunks_arriving_while_the_writer_waits_share_one_batch() {
    let root = tempfile::tempdir().expect("tempdir");
    let journal = Arc::new(Mutex::new(Vec::new()));
    let recorder = Recorder::new(settings(root.path()), metrics())
        .with_sink(Arc::new(JournalingSink(journal.clone())));
    let rec = start(&recorder, "batched");
    for i in 0..5u8 {
        rec.server_data(&chunk_of(&[i; 1000]));
        // The writer takes the chunk and finds the queue empty before the next one comes.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }
    rec.finish("closed");
    let outcome = rec.ended().await;
    assert_eq!(outcome.error, None);
    let writes = journal
        .lock()
        .expect("journal")
        .iter()
        .filter(|e| *e == "write fbs")
        .count();
    assert_eq!(writes, 1, "{:?}", journal.lock().expect("journal"));
}
