//! One recording per connection: the handle the relay calls, and the task that writes.
//!
//! The handle's calls ([`RecordingHandle::server_data`], [`RecordingHandle::event`],
//! [`RecordingHandle::finish`]) only copy bytes into a queue: the relay never waits on the disk.
//! The queue is bounded by bytes; what does not fit is dropped and counted, and the recording is
//! marked incomplete. A task per recording drains the queue in batches and does the file I/O on
//! tokio's blocking pool, so a slow or hung disk holds a blocking thread, never a relay.
//!
//! Any write error (full disk, read-only or deleted directory, EIO) ends the recording with a
//! `recording_ended` log line carrying `error`; the session it records never notices.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use super::RecordingMetrics;
use super::audit_format::PixelFormatLine;
use super::fbs;
use crate::config::{RecordInput, RecordWhen, RecordingConfig};
use crate::rfb::PixelFormat;

/// Default bound of one recording's queue: about a second of a busy full-HD desktop.
pub const DEFAULT_QUEUE_BYTES: usize = 4 * 1024 * 1024;
/// Audit lines have their own budget, so a stream filling its queue never costs the audit.
const AUDIT_QUEUE_BYTES: usize = 256 * 1024;
/// Messages are written in batches of about this many bytes (one blocking call each).
const BATCH_BYTES: usize = 1024 * 1024;
/// How long a batch waits for more messages after its first, when the queue runs dry. Each
/// batch is a `spawn_blocking` (a hand-off to another thread and back); without the wait a
/// recorded bulk stream made one per 64 KiB chunk, about 21,000 a second over 8 `wss://`
/// sessions. Nothing is less durable for it: the files are fsynced only at the close, which
/// does not wait (a `Finish` ends the batch at once).
const BATCH_WINDOW: std::time::Duration = std::time::Duration::from_millis(5);

/// An open file of a recording. Implemented by [`std::fs::File`]; tests substitute slow or
/// failing ones to produce what a real disk cannot produce on demand.
pub trait SinkFile: Send + 'static {
    fn write_all(&mut self, data: &[u8]) -> io::Result<()>;
    /// Write `parts` one after another, as one vectored write where the file supports it.
    fn write_all_parts(&mut self, parts: &[Bytes]) -> io::Result<()> {
        parts.iter().try_for_each(|p| self.write_all(p))
    }
    /// Make what was written durable (fsync), called once when the recording closes.
    fn sync(&mut self) -> io::Result<()>;
    /// An error when `path` no longer names this file. Writes to a file whose directory was
    /// removed still succeed (into an inode nobody can reach), so a recording would go on
    /// "written" and be lost: this is how the writer notices.
    fn still_named(&self, _path: &Path) -> io::Result<()> {
        Ok(())
    }
}

/// Where recordings are written. Every call runs on tokio's blocking pool, never on a relay.
pub trait Sink: Send + Sync + 'static {
    /// Create a new file at `path` (its missing parent directories too); never truncates one.
    fn create(&self, path: &Path) -> io::Result<Box<dyn SinkFile>>;
    /// Make the names of the files created in `dir` durable (fsync of the directory), called
    /// once when a recording closes, after the files' own fsyncs.
    fn sync_dir(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }
}

/// The real file system.
pub struct FileSink;

impl Sink for FileSink {
    fn create(&self, path: &Path) -> io::Result<Box<dyn SinkFile>> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)?;
        Ok(Box::new(file))
    }

    /// A file's fsync does not make its directory entry durable; this does, so a crash cannot
    /// leave synced data under no name. Once per recording, for both files, at close (it was
    /// once per file at creation: 4 fsyncs per recording, now 3). The session directory's own
    /// entry in the day directory is not synced separately: on a journaling file system (ext4,
    /// XFS) the commit this fsync forces carries the earlier mkdir too.
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        std::fs::File::open(dir)?.sync_all()
    }
}

impl SinkFile for std::fs::File {
    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        io::Write::write_all(self, data)
    }
    fn write_all_parts(&mut self, parts: &[Bytes]) -> io::Result<()> {
        // At most IOV_MAX (1024 on Linux) slices per writev; a batch is ~2 per large chunk.
        for group in parts.chunks(1024) {
            let mut slices: Vec<io::IoSlice<'_>> =
                group.iter().map(|p| io::IoSlice::new(p)).collect();
            let mut rest = &mut slices[..];
            while !rest.is_empty() {
                match io::Write::write_vectored(self, rest) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => io::IoSlice::advance_slices(&mut rest, n),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }
    fn sync(&mut self) -> io::Result<()> {
        self.sync_all()
    }
    fn still_named(&self, path: &Path) -> io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let open = self.metadata()?;
        match std::fs::metadata(path) {
            Ok(named) if named.dev() == open.dev() && named.ino() == open.ino() => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::NotFound,
                "the recording's file was removed (its directory deleted or replaced)",
            )),
        }
    }
}

/// Starts recordings with the configured settings. One per process (rebuilt on reload).
pub struct Recorder {
    settings: RecordingConfig,
    metrics: RecordingMetrics,
    sink: Arc<dyn Sink>,
    queue_bytes: usize,
}

impl Recorder {
    pub fn new(settings: RecordingConfig, metrics: RecordingMetrics) -> Recorder {
        Recorder {
            settings,
            metrics,
            sink: Arc::new(FileSink),
            queue_bytes: DEFAULT_QUEUE_BYTES,
        }
    }

    /// Write through `sink` instead of the file system (tests).
    pub fn with_sink(mut self, sink: Arc<dyn Sink>) -> Recorder {
        self.sink = sink;
        self
    }

    /// Bound each recording's queue at `bytes` instead of [`DEFAULT_QUEUE_BYTES`].
    pub fn with_queue_bytes(mut self, bytes: usize) -> Recorder {
        self.queue_bytes = bytes;
        self
    }

    /// Whether a connection is recorded: recording on, and `when: always` or the token's
    /// `record` claim is true.
    pub fn should_record(&self, record_claim: bool) -> bool {
        self.settings.dir.is_some() && (self.settings.when == RecordWhen::Always || record_claim)
    }

    /// What the audit holds besides session events (`recording.input`).
    pub fn input(&self) -> RecordInput {
        self.settings.input
    }

    /// Start recording one connection whose browser was sent `server_init` (the ServerInit's
    /// bytes as the gateway sent them). `None` when recording is off or no tokio runtime runs.
    /// Touches no disk: the files are created by the writer task.
    pub fn start(&self, sid: &str, conn_id: u64, server_init: &[u8]) -> Option<RecordingHandle> {
        let dir = self.settings.dir.as_ref()?;
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let unix_ms = u64::try_from(now.as_millis()).unwrap_or(u64::MAX);
        let fbs_path = dir
            .join(day_name(now.as_secs()))
            .join(dir_name(sid))
            .join(format!("{unix_ms}-{conn_id}.fbs"));
        let (tx, rx) = mpsc::unbounded_channel();
        let (done_tx, done_rx) = watch::channel(None);
        let shared = Arc::new(Shared {
            start: Instant::now(),
            cap: self.queue_bytes,
            queued: AtomicUsize::new(0),
            audit_queued: AtomicUsize::new(0),
            max_bytes: self.settings.max_bytes_per_session,
            accepted: AtomicU64::new(0),
            stop: AtomicU8::new(RECORDING),
            closed: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            events_dropped: AtomicU64::new(0),
            metrics: self.metrics.clone(),
        });
        let mut start_line = json!({
            "event": "recording_started",
            "t": 0,
            "unix_ms": unix_ms,
            "session_id": sid,
            "conn_id": conn_id,
            "fbs": fbs_path.file_name().map(|n| n.to_string_lossy().into_owned()),
        });
        if let (Some(w), Some(h)) = (server_init.get(0..2), server_init.get(2..4)) {
            start_line["width"] = json!(u16::from_be_bytes([w[0], w[1]]));
            start_line["height"] = json!(u16::from_be_bytes([h[0], h[1]]));
        }
        let writer = Writer {
            shared: shared.clone(),
            sink: self.sink.clone(),
            jsonl_path: fbs_path.with_extension("jsonl"),
            fbs_path: fbs_path.clone(),
            sid: sid.to_string(),
            conn_id,
            done: done_tx,
            active: None,
        };
        runtime.spawn(writer.run(rx, server_init.to_vec(), line(&start_line)));
        Some(RecordingHandle {
            shared,
            tx,
            done: done_rx,
            fbs_path,
            input: self.settings.input,
        })
    }
}

/// Chunks at least this large are queued as the relay's own buffer; smaller ones are copied.
/// A shared chunk keeps its whole allocation alive (the relay reads into buffers of up to
/// 64 KiB and an idle session's reads get a fresh 4 KiB one each), while the queue's budget
/// counts only the chunk's bytes: sharing a 10-byte cursor update would pin 4 KiB for it. From
/// 32 KiB on, what the queue pins is at most twice its budget.
const SHARED_CHUNK_BYTES: usize = 32 * 1024;

fn share_or_copy(data: &Bytes) -> Bytes {
    match data.len() >= SHARED_CHUNK_BYTES {
        true => data.clone(),
        false => Bytes::copy_from_slice(data),
    }
}

/// `YYYY-MM-DD` (UTC) of a unix time.
pub(crate) fn day_name(unix_secs: u64) -> String {
    let secs = i64::try_from(unix_secs).unwrap_or(0);
    let date = time::OffsetDateTime::from_unix_timestamp(secs)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
        .date();
    format!(
        "{:04}-{:02}-{:02}",
        date.year(),
        u8::from(date.month()),
        date.day()
    )
}

/// The session's directory name. Session ids are validated to `[A-Za-z0-9._:-]{1,128}`, which
/// still admits `.` and `..`: any byte outside that set, and every dot of an all-dots id, is
/// percent-encoded (`%` is not in the set, so no two ids share a directory) and the result is
/// always one plain path component inside the day directory.
pub(crate) fn dir_name(sid: &str) -> String {
    let all_dots = sid.bytes().all(|b| b == b'.');
    let mut out = String::with_capacity(sid.len());
    for b in sid.bytes() {
        let plain = (b.is_ascii_alphanumeric() || b"_:-".contains(&b)) || (b == b'.' && !all_dots);
        if plain {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.is_empty() {
        out.push_str("%00");
    }
    out
}

fn line(value: &Value) -> Vec<u8> {
    let mut out = serde_json::to_vec(value).unwrap_or_default();
    out.push(b'\n');
    out
}

// What stops the server data of a recording (`Shared::stop`); the audit goes on regardless.
const RECORDING: u8 = 0;
/// The queue was full: data was dropped, so the stream stops (FBS cannot skip data).
const STOPPED_GAP: u8 = 1;
/// `max_bytes_per_session` reached.
const STOPPED_MAX: u8 = 2;

struct Shared {
    start: Instant,
    cap: usize,
    /// Server bytes handed to the writer and not yet written.
    queued: AtomicUsize,
    /// The same for audit lines (bound: [`AUDIT_QUEUE_BYTES`]).
    audit_queued: AtomicUsize,
    max_bytes: u64,
    /// Server bytes accepted into the recording.
    accepted: AtomicU64,
    stop: AtomicU8,
    /// Finished by the caller, or ended by the writer: later calls do nothing.
    closed: AtomicBool,
    dropped: AtomicU64,
    events_dropped: AtomicU64,
    metrics: RecordingMetrics,
}

impl Shared {
    fn elapsed_ms(&self) -> u32 {
        u32::try_from(self.start.elapsed().as_millis()).unwrap_or(u32::MAX)
    }

    /// Take `len` bytes of a queue's budget, or `false` when they do not fit.
    fn reserve(queued: &AtomicUsize, cap: usize, len: usize) -> bool {
        let before = queued.fetch_add(len, Ordering::AcqRel);
        if before.saturating_add(len) > cap {
            queued.fetch_sub(len, Ordering::AcqRel);
            return false;
        }
        true
    }

    fn drop_data(&self, len: usize) {
        self.dropped.fetch_add(len as u64, Ordering::Relaxed);
        self.metrics.dropped_total.inc_by(len as u64);
    }
}

enum Msg {
    /// Server bytes (a large chunk shared with the relay, a small one copied) and when they
    /// were seen.
    Data(Bytes, u32),
    /// One audit line (with its newline); `budgeted` when it took queue budget.
    Line(Vec<u8>, bool),
    /// The client's SetPixelFormat, on its way to the server.
    PixelFormat(PixelFormat),
    Finish(String),
}

/// How a recording ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub fbs_path: PathBuf,
    /// Server bytes in the `.fbs` (after the handshake).
    pub bytes: u64,
    /// The `.fbs` lacks part of the session: data dropped, `max_bytes_per_session` reached,
    /// audit lines dropped, or a write error.
    pub incomplete: bool,
    /// What made it incomplete: `queue_full`, `max_bytes`, `error`; `None` when complete.
    pub incomplete_reason: Option<&'static str>,
    /// Why it ended: the reason given to [`RecordingHandle::finish`], `closed` when every handle
    /// was dropped, `error` on a write error.
    pub reason: String,
    pub dropped_bytes: u64,
    pub error: Option<String>,
}

/// The relay's side of one recording. Cloneable (the relay's directions and the control path
/// may each hold one); every method returns at once, whatever the disk does.
#[derive(Clone)]
pub struct RecordingHandle {
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Msg>,
    done: watch::Receiver<Option<Outcome>>,
    fbs_path: PathBuf,
    input: RecordInput,
}

impl RecordingHandle {
    /// Server->client bytes exactly as the browser is sent them (after the ServerInit). Large
    /// chunks are shared with the relay, not copied ([`SHARED_CHUNK_BYTES`]).
    pub fn server_data(&self, data: &Bytes) {
        let s = &self.shared;
        if data.is_empty() || s.closed.load(Ordering::Acquire) {
            return;
        }
        match s.stop.load(Ordering::Acquire) {
            RECORDING => {}
            // After a drop every later byte is left out too, and counted as dropped: writing
            // them after a hole would give players a stream they decode into garbage.
            STOPPED_GAP => return s.drop_data(data.len()),
            _ => return,
        }
        let len = data.len();
        let accepted = s.accepted.load(Ordering::Acquire);
        if accepted.saturating_add(len as u64) > s.max_bytes {
            if s.stop
                .compare_exchange(RECORDING, STOPPED_MAX, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                self.control_line(json!({
                    "event": "recording_limit",
                    "t": s.elapsed_ms(),
                    "reason": "max_bytes",
                    "bytes": accepted,
                }));
            }
            return;
        }
        if !Shared::reserve(&s.queued, s.cap, len) {
            if s.stop
                .compare_exchange(RECORDING, STOPPED_GAP, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                self.control_line(json!({
                    "event": "recording_gap",
                    "t": s.elapsed_ms(),
                    "reason": "queue_full",
                    "bytes": accepted,
                }));
            }
            return s.drop_data(len);
        }
        s.accepted.fetch_add(len as u64, Ordering::AcqRel);
        if self
            .tx
            .send(Msg::Data(share_or_copy(data), s.elapsed_ms()))
            .is_err()
        {
            // The writer is gone (it ended on an error): nothing more to do.
            s.closed.store(true, Ordering::Release);
        }
    }

    /// One audit line: an object (`{"event": ...}`); `t` (ms since the start) is added when
    /// absent. Never pass a token or a password. Dropped (and counted in the final line) when
    /// the queue is full.
    pub fn event(&self, mut value: Value) {
        let s = &self.shared;
        if s.closed.load(Ordering::Acquire) {
            return;
        }
        if let Some(object) = value.as_object_mut() {
            object
                .entry("t")
                .or_insert_with(|| json!(self.shared.elapsed_ms()));
        }
        let bytes = line(&value);
        if !Shared::reserve(&s.audit_queued, AUDIT_QUEUE_BYTES, bytes.len()) {
            s.events_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let _ = self.tx.send(Msg::Line(bytes, true));
    }

    /// The client asked the server for pixels in `pf` (its SetPixelFormat, seen before it
    /// reaches the server, so before any update in that format). The recording's ServerInit
    /// is written with the client's format when no update came before it (every real
    /// client's case: they set it right after the handshake), so a player reading the `.fbs`
    /// alone decodes the right colours; a later change is an audit line `pixel_format` with
    /// the stream offset it applies from, which `vncgate recording export` honours.
    pub fn client_pixel_format(&self, pf: PixelFormat) {
        if !self.shared.closed.load(Ordering::Acquire) {
            let _ = self.tx.send(Msg::PixelFormat(pf));
        }
    }

    /// End the recording (`reason`: why the session ended, e.g. `closed`, `kicked`): the writer
    /// writes what is queued, the final audit line, fsyncs both files and logs `recording_ended`.
    /// Later calls on any clone do nothing.
    pub fn finish(&self, reason: &str) {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let _ = self.tx.send(Msg::Finish(reason.to_string()));
    }

    /// The `.fbs` file's path (the `.jsonl` is beside it).
    pub fn fbs_path(&self) -> &Path {
        &self.fbs_path
    }

    /// `recording.input`: which input the relay passes to [`RecordingHandle::event`].
    pub fn input(&self) -> RecordInput {
        self.input
    }

    /// Resolves when the recording has ended (files synced and closed, or an error). For
    /// shutdown (wait for the fsync) and tests; never needed on the relay's path.
    pub async fn ended(&self) -> Outcome {
        let mut done = self.done.clone();
        loop {
            if let Some(outcome) = done.borrow_and_update().clone() {
                return outcome;
            }
            if done.changed().await.is_err() {
                // The writer task vanished without reporting (runtime shut down).
                return Outcome {
                    fbs_path: self.fbs_path.clone(),
                    bytes: self.shared.accepted.load(Ordering::Acquire),
                    incomplete: true,
                    incomplete_reason: Some("error"),
                    reason: "error".into(),
                    dropped_bytes: self.shared.dropped.load(Ordering::Acquire),
                    error: Some("the writer task stopped".into()),
                };
            }
        }
    }

    /// A line the recorder itself writes (gap, limit): outside the budget, at most one each.
    fn control_line(&self, value: Value) {
        let _ = self.tx.send(Msg::Line(line(&value), false));
    }
}

type Files = (Box<dyn SinkFile>, Box<dyn SinkFile>);

struct Writer {
    shared: Arc<Shared>,
    sink: Arc<dyn Sink>,
    fbs_path: PathBuf,
    jsonl_path: PathBuf,
    sid: String,
    conn_id: u64,
    done: watch::Sender<Option<Outcome>>,
    /// `vncgate_recordings_active` held up while the files are open; released before the
    /// outcome is published, so whoever awaits [`RecordingHandle::ended`] sees it down.
    active: Option<crate::metrics::GaugeGuard>,
}

/// Run `f` on the blocking pool; a panic in it is an I/O error like any other.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, io::Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| match e.is_cancelled() {
            // The runtime is going away (the process exits without a drain).
            true => io::Error::other("the process stopped before the recording was closed"),
            false => io::Error::other(format!("writer panicked: {e}")),
        })
}

/// Create both files and write the audit's first line. The directory entries are made durable
/// by [`Sink::sync_dir`] when the recording closes, after the files' own fsyncs.
fn open_files(
    sink: &dyn Sink,
    fbs_path: &Path,
    jsonl_path: &Path,
    start: &[u8],
) -> io::Result<Files> {
    let fbs = sink.create(fbs_path)?;
    let mut audit = sink.create(jsonl_path)?;
    audit.write_all(start)?;
    Ok((fbs, audit))
}

/// One batch for the disk, written by one blocking call.
struct Batch {
    /// The FBS prologue (handshake and ServerInit), with the first server bytes or at the end.
    handshake: Option<Vec<u8>>,
    fbs: fbs::BlockBatch,
    audit: Vec<u8>,
    /// The audit's last line: this batch closes the recording (and fsyncs it).
    last: Option<Vec<u8>>,
}

impl Writer {
    /// The writer task of one recording. Every disk call runs on the blocking pool, one call per
    /// batch: the files are created by the first batch and the last batch closes them, so a
    /// short session (open, look, leave) costs one or two hand-offs to the pool, not three, and
    /// 3 fsyncs, not 4. On this machine's disk (ext4 without a journal, where an fsync is
    /// cheap) that made no measurable difference to recorded upgrades a second (medians of 6
    /// runs: 1,264 before, 1,280 after): a profile puts the cost in the file system's own
    /// metadata work (inode allocation 20 % of the gateway's CPU, mkdir 9 %, fsync 18 %). On a
    /// journaled disk each fsync saved is a journal commit and a cache flush saved.
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Msg>,
        server_init: Vec<u8>,
        start: Vec<u8>,
    ) {
        self.active = Some(crate::metrics::GaugeGuard::inc(
            self.shared.metrics.active.clone(),
        ));
        let mut files: Option<Files> = None;
        let start = Arc::new(start);
        // The handshake is written with the first server bytes (or at the end), so that a
        // SetPixelFormat the client sends first is in the ServerInit players read.
        let mut server_init = Some(server_init);
        let mut written: u64 = 0;
        loop {
            let mut batch = Batch {
                handshake: None,
                fbs: fbs::BlockBatch::default(),
                audit: Vec::new(),
                last: None,
            };
            let (mut released, mut audit_released) = (0usize, 0usize);
            let (mut data_bytes, mut finish) = (0u64, None);
            let mut next = match rx.recv().await {
                Some(first) => Some(first),
                None => {
                    finish = Some("closed".to_string());
                    None
                }
            };
            let window = tokio::time::sleep(BATCH_WINDOW);
            tokio::pin!(window);
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Data(data, ms) => {
                        released += data.len();
                        data_bytes += data.len() as u64;
                        batch.fbs.push(data, ms);
                    }
                    Msg::Line(bytes, budgeted) => {
                        if budgeted {
                            audit_released += bytes.len();
                        }
                        batch.audit.extend_from_slice(&bytes);
                    }
                    Msg::PixelFormat(pf) => {
                        let offset = written + data_bytes;
                        if data_bytes == 0
                            && let Some(init) = server_init.as_mut()
                        {
                            fbs::set_pixel_format(init, &pf);
                        }
                        batch.audit.extend_from_slice(&line(&pixel_format_line(
                            &pf,
                            offset,
                            self.shared.elapsed_ms(),
                        )));
                    }
                    Msg::Finish(reason) => {
                        finish = Some(reason);
                        break;
                    }
                }
                if batch.fbs.len() + batch.audit.len() < BATCH_BYTES {
                    next = match rx.try_recv() {
                        Ok(msg) => Some(msg),
                        Err(mpsc::error::TryRecvError::Empty) => tokio::select! {
                            biased;
                            msg = rx.recv() => msg,
                            () = &mut window => None,
                        },
                        Err(mpsc::error::TryRecvError::Disconnected) => None,
                    };
                }
            }
            // Written on its own, so a disk that fails the batch still has the handshake.
            if data_bytes > 0 || finish.is_some() {
                batch.handshake = server_init.take().map(|init| fbs::prologue(&init));
            }
            let fbs_len = (batch.fbs.len() + batch.handshake.as_ref().map_or(0, Vec::len)) as u64;
            let mut outcome = None;
            if let Some(reason) = finish {
                // Nothing is written after this batch: the relay's later calls do nothing.
                self.shared.closed.store(true, Ordering::Release);
                let o = self.outcome(written + data_bytes, reason, None);
                batch.last = Some(line(&self.ended_line(&o)));
                outcome = Some(o);
            }
            let (sink, start) = (self.sink.clone(), start.clone());
            let (fbs_path, jsonl_path) = (self.fbs_path.clone(), self.jsonl_path.clone());
            let opening = files.is_none();
            let result = blocking(move || {
                let r = write_out(&*sink, &mut files, &fbs_path, &jsonl_path, &start, batch);
                (files, r)
            })
            .await;
            match result {
                Ok((back, Ok(()))) => files = back,
                Ok((back, Err(e))) => return self.ended_with_error(back, written, &e).await,
                Err(e) => return self.ended_with_error(None, written, &e).await,
            }
            if opening {
                tracing::info!(
                    event = "recording_started",
                    session_id = %self.sid,
                    conn_id = self.conn_id,
                    path = %self.fbs_path.display(),
                    "recording started"
                );
            }
            written += data_bytes;
            self.shared.metrics.bytes_total.inc_by(fbs_len);
            // Budget comes back only once the disk took the bytes, so a slow disk fills it.
            self.shared.queued.fetch_sub(released, Ordering::AcqRel);
            self.shared
                .audit_queued
                .fetch_sub(audit_released, Ordering::AcqRel);
            if let Some(outcome) = outcome {
                return self.report(outcome);
            }
        }
    }

    fn outcome(&self, written: u64, reason: String, error: Option<String>) -> Outcome {
        let s = &self.shared;
        let dropped_bytes = s.dropped.load(Ordering::Acquire);
        let incomplete_reason = if error.is_some() {
            Some("error")
        } else {
            match s.stop.load(Ordering::Acquire) {
                STOPPED_GAP => Some("queue_full"),
                STOPPED_MAX => Some("max_bytes"),
                _ if s.events_dropped.load(Ordering::Acquire) > 0 => Some("queue_full"),
                _ => None,
            }
        };
        Outcome {
            fbs_path: self.fbs_path.clone(),
            bytes: written,
            incomplete: incomplete_reason.is_some(),
            incomplete_reason,
            reason,
            dropped_bytes,
            error,
        }
    }

    fn ended_line(&self, o: &Outcome) -> Value {
        let mut v = json!({
            "event": "recording_ended",
            "t": self.shared.elapsed_ms(),
            "reason": o.reason,
            "incomplete": o.incomplete,
            "bytes": o.bytes,
            "dropped_bytes": o.dropped_bytes,
            "events_dropped": self.shared.events_dropped.load(Ordering::Acquire),
        });
        if let Some(r) = o.incomplete_reason {
            v["incomplete_reason"] = json!(r);
        }
        if let Some(e) = &o.error {
            v["error"] = json!(e);
        }
        v
    }

    /// The recording cannot go on: later handle calls return at once, the audit gets a last
    /// line if it still can, and the error is logged. The session is not told.
    async fn ended_with_error(mut self, files: Option<Files>, written: u64, e: &io::Error) {
        self.shared.closed.store(true, Ordering::Release);
        let outcome = self.outcome(written, "error".into(), Some(e.to_string()));
        if let Some(mut files) = files {
            let last = line(&self.ended_line(&outcome));
            // Best effort: the disk that failed the data may still take the audit line.
            let _ = blocking(move || {
                let _ = files.1.write_all(&last);
                let _ = files.0.sync();
                let _ = files.1.sync();
            })
            .await;
        }
        self.report(outcome);
    }

    fn report(&mut self, o: Outcome) {
        self.active = None;
        if let Some(error) = &o.error {
            tracing::warn!(
                event = "recording_ended",
                session_id = %self.sid,
                conn_id = self.conn_id,
                path = %self.fbs_path.display(),
                bytes = o.bytes,
                incomplete = o.incomplete,
                dropped_bytes = o.dropped_bytes,
                reason = %o.reason,
                error = %error,
                "recording ended on a write error; the session goes on"
            );
        } else {
            tracing::info!(
                event = "recording_ended",
                session_id = %self.sid,
                conn_id = self.conn_id,
                path = %self.fbs_path.display(),
                bytes = o.bytes,
                incomplete = o.incomplete,
                dropped_bytes = o.dropped_bytes,
                reason = %o.reason,
                "recording ended"
            );
        }
        let _ = self.done.send(Some(o));
    }
}

/// The audit line of a client's SetPixelFormat.
fn pixel_format_line(pf: &PixelFormat, offset: u64, t: u32) -> Value {
    let line = PixelFormatLine {
        event: "pixel_format".into(),
        t,
        offset,
        format: (*pf).into(),
    };
    serde_json::to_value(line).unwrap_or(Value::Null)
}

/// One batch's blocking call: create the files if this is the first, write, and either check
/// the file is still named (a removed directory ends the recording) or, on the last batch,
/// write the audit's last line and make both files and their names durable.
fn write_out(
    sink: &dyn Sink,
    files: &mut Option<Files>,
    fbs_path: &Path,
    jsonl_path: &Path,
    start: &[u8],
    batch: Batch,
) -> io::Result<()> {
    let files = match files {
        Some(files) => files,
        None => files.insert(open_files(sink, fbs_path, jsonl_path, start)?),
    };
    if let Some(handshake) = &batch.handshake {
        files.0.write_all(handshake)?;
    }
    write_batch(files, batch.fbs, &batch.audit)?;
    match &batch.last {
        None => files.0.still_named(fbs_path),
        Some(last) => {
            files.1.write_all(last)?;
            files.0.sync()?;
            files.1.sync()?;
            match fbs_path.parent() {
                Some(dir) => sink.sync_dir(dir),
                None => Ok(()),
            }
        }
    }
}

fn write_batch(files: &mut Files, fbs: fbs::BlockBatch, audit: &[u8]) -> io::Result<()> {
    if !fbs.is_empty() {
        files.0.write_all_parts(&fbs.into_parts())?;
    }
    if !audit.is_empty() {
        files.1.write_all(audit)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_directories_stay_inside_the_day_directory() {
        assert_eq!(dir_name("alice-desk:1.x_y"), "alice-desk:1.x_y");
        assert_eq!(dir_name("."), "%2E");
        assert_eq!(dir_name(".."), "%2E%2E");
        assert_eq!(dir_name("..a"), "..a");
        assert_eq!(dir_name("a/../b"), "a%2F..%2Fb");
        assert_eq!(dir_name(""), "%00");
        for sid in [".", "..", "a/b", "/etc", "..%2F"] {
            let p = Path::new("/rec").join(dir_name(sid));
            assert_eq!(p.parent(), Some(Path::new("/rec")), "{sid}");
            assert_eq!(p.components().count(), 3, "{sid}");
        }
    }

    #[test]
    fn only_large_chunks_are_shared_with_the_relay() {
        let buffer = Bytes::from(vec![7u8; 64 * 1024]);
        let small = buffer.slice(0..10);
        let large = buffer.slice(0..SHARED_CHUNK_BYTES);
        assert_ne!(
            share_or_copy(&small).as_ptr(),
            buffer.as_ptr(),
            "a small chunk pins it"
        );
        assert_eq!(share_or_copy(&large).as_ptr(), buffer.as_ptr());
        assert_eq!(share_or_copy(&small), small);
    }

    #[test]
    fn day_names_are_utc_dates() {
        assert_eq!(day_name(0), "1970-01-01");
        assert_eq!(day_name(1_780_000_000), "2026-05-28");
    }
}
