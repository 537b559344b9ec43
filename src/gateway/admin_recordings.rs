//! The admin API's recording endpoints (contract §7, §12): list the recordings under
//! `recording.dir`, and stream one's `.fbs` or `.jsonl` audit.
//!
//! A recording is named by an opaque id, `{YYYY-MM-DD}.{session dir}.{unix-ms}-{conn_id}`,
//! where the session dir is the recorder's directory name for the sid ([`dir_name`]) with its
//! `%` escapes written `~` (`%` in a URL path would need escaping itself; `~` is in neither the
//! sid alphabet nor the escapes). An id is accepted only when every part is exactly what the
//! recorder writes: a date, a session directory that decodes to a valid sid and re-encodes to
//! itself, and two canonical decimal numbers. So an id is one of a finite set of plain path
//! components under `recording.dir`, never `.`, `..` or anything with a `/`; everything else is
//! 404 `not_found` without touching the disk.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::{Response, StatusCode};
use pingora_core::apps::ReusedHttpStream;
use pingora_core::protocols::http::ServerSession;
use pingora_http::ResponseHeader;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

use super::admin::{AdminApp, error, json_response};
use super::refusal::ErrorCode;
use crate::auth::authorize::valid_session_id;
use crate::recording::recorder::dir_name;

/// The listing without `sid` stops at the newest this many: a year of recordings must not
/// become one multi-megabyte answer.
pub const MAX_LISTED: usize = 1000;
/// Files are sent in chunks of this size: a recording can be gigabytes
/// (`max_bytes_per_session`), which must never be read whole into memory.
const CHUNK: usize = 64 * 1024;
/// The `recording_ended` line is well under 1 KiB; the tail read to find it is bounded so a
/// long audit (`input: keys`) is never read whole just to list it.
const AUDIT_TAIL: u64 = 8 * 1024;
/// No id the recorder can produce is longer (10 + 1 + 3 × 128 + 1 + 20 + 1 + 20).
const MAX_ID_LEN: usize = 448;

/// One recording, as named by its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordingId {
    day: String,
    /// The session directory's name on disk (percent escapes as the recorder wrote them).
    dir: String,
    session_id: String,
    unix_ms: u64,
    conn_id: u64,
}

impl RecordingId {
    /// The id, or `None` for anything the recorder would not have written.
    pub fn parse(id: &str) -> Option<RecordingId> {
        if id.len() > MAX_ID_LEN {
            return None;
        }
        let day = id.get(..10)?;
        let rest = id.get(10..)?.strip_prefix('.')?;
        let (encoded, stem) = rest.rsplit_once('.')?;
        if !valid_day(day) || encoded.is_empty() {
            return None;
        }
        let (unix_ms, conn_id) = stem.split_once('-')?;
        let (unix_ms, conn_id) = (canonical_u64(unix_ms)?, canonical_u64(conn_id)?);
        if !encoded
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-~".contains(&b))
        {
            return None;
        }
        let dir = encoded.replace('~', "%");
        let session_id = String::from_utf8(percent_decode(&dir)?).ok()?;
        // Canonical only: one id per file, and the directory is exactly the recorder's.
        if !valid_session_id(&session_id) || dir_name(&session_id) != dir {
            return None;
        }
        Some(RecordingId {
            day: day.to_owned(),
            dir,
            session_id,
            unix_ms,
            conn_id,
        })
    }

    /// The id of a file the recorder wrote, from its place on disk; `None` for anything else
    /// found there (which is then not listed).
    fn from_disk(day: &str, dir: &str, file_name: &str) -> Option<RecordingId> {
        let stem = file_name.strip_suffix(".fbs")?;
        RecordingId::parse(&format!("{day}.{}.{stem}", dir.replace('%', "~")))
    }

    pub fn as_id(&self) -> String {
        format!(
            "{}.{}.{}-{}",
            self.day,
            self.dir.replace('%', "~"),
            self.unix_ms,
            self.conn_id
        )
    }

    fn path(&self, root: &Path, ext: &str) -> PathBuf {
        root.join(&self.day)
            .join(&self.dir)
            .join(format!("{}-{}.{ext}", self.unix_ms, self.conn_id))
    }
}

fn valid_day(day: &str) -> bool {
    let b = day.as_bytes();
    b.len() == 10
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            _ => c.is_ascii_digit(),
        })
}

/// Decimal digits with no sign and no leading zero (as `{}` formats a `u64`).
fn canonical_u64(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = s.parse().ok()?;
    (n.to_string() == s).then_some(n)
}

/// `%XX` escapes (as [`dir_name`] writes them); `None` on a malformed one.
fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    Some(out)
}

/// Which file of a recording a download is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Fbs,
    Audit,
}

/// A download resolved and opened, ready to stream.
pub(super) struct Download {
    file: tokio::fs::File,
    len: u64,
    content_type: &'static str,
    file_name: String,
}

/// A listed recording.
#[derive(Debug)]
struct Listed {
    id: RecordingId,
    fbs: PathBuf,
}

/// Every recording under `root` (of `sid` only when given), newest first, at most `limit`.
/// Day directories are read newest first and the walk stops once a whole day has taken the
/// count to `limit`: older days cannot hold a newer recording.
fn list(root: &Path, sid: Option<&str>, limit: usize) -> Vec<Listed> {
    let mut days: Vec<String> = read_names(root)
        .into_iter()
        .filter(|d| valid_day(d))
        .collect();
    days.sort_unstable_by(|a, b| b.cmp(a));
    let mut found = Vec::new();
    for day in days {
        let day_dir = root.join(&day);
        let dirs = match sid {
            Some(sid) => vec![dir_name(sid)],
            None => read_names(&day_dir),
        };
        for dir in dirs {
            let session_dir = day_dir.join(&dir);
            for name in read_names(&session_dir) {
                if let Some(id) = RecordingId::from_disk(&day, &dir, &name) {
                    found.push(Listed {
                        fbs: session_dir.join(&name),
                        id,
                    });
                }
            }
        }
        if found.len() >= limit {
            break;
        }
    }
    found.sort_unstable_by(|a, b| {
        (b.id.unix_ms, b.id.conn_id, &b.id.dir).cmp(&(a.id.unix_ms, a.id.conn_id, &a.id.dir))
    });
    found.truncate(limit);
    found
}

/// The UTF-8 names in a directory; none when it is missing or unreadable (a listing shows what
/// it can read rather than failing on one bad directory).
fn read_names(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect()
}

/// `incomplete` of the audit's `recording_ended` line; `None` while the recording is still
/// being written (or ended without that line: the process died).
fn ended_incomplete(jsonl: &Path) -> Option<bool> {
    let mut file = std::fs::File::open(jsonl).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(AUDIT_TAIL)))
        .ok()?;
    let mut tail = Vec::new();
    file.take(AUDIT_TAIL).read_to_end(&mut tail).ok()?;
    let last = tail.split(|b| *b == b'\n').rev().find(|l| !l.is_empty())?;
    let line: Value = serde_json::from_slice(last).ok()?;
    if line["event"] != "recording_ended" {
        return None;
    }
    line["incomplete"].as_bool()
}

fn describe(root: &Path, listed: &Listed) -> Value {
    let id = listed.id.as_id();
    let bytes = std::fs::metadata(&listed.fbs).map(|m| m.len()).ok();
    json!({
        "id": id,
        "session_id": listed.id.session_id,
        "conn_id": listed.id.conn_id,
        "started_at_ms": listed.id.unix_ms,
        "bytes": bytes,
        "incomplete": ended_incomplete(&listed.id.path(root, "jsonl")),
        "fbs": format!("/admin/recordings/{id}"),
        "audit": format!("/admin/recordings/{id}/audit"),
    })
}

impl AdminApp {
    /// `GET /admin/recordings[?sid=...]`: the recordings newest first (of one session, or the
    /// newest [`MAX_LISTED`] of all). 404 when recording is off.
    pub(super) async fn recordings(&self, query: Option<&str>) -> Response<Vec<u8>> {
        let Some(root) = self.0.config().recording.dir.clone() else {
            return error(
                ErrorCode::NotFound,
                "recording is off (recording.dir is not set)",
            );
        };
        let sid = query.and_then(|q| {
            form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "sid")
                .map(|(_, v)| v.into_owned())
        });
        if let Some(sid) = &sid
            && !valid_session_id(sid)
        {
            return error(ErrorCode::BadSessionId, "invalid session id");
        }
        // Directory walks and file reads: on the blocking pool, never on the admin listener's
        // async workers.
        let walked = tokio::task::spawn_blocking(move || {
            list(&root, sid.as_deref(), MAX_LISTED)
                .iter()
                .map(|l| describe(&root, l))
                .collect::<Vec<_>>()
        })
        .await;
        match walked {
            Ok(recordings) => json_response(StatusCode::OK, json!({ "recordings": recordings })),
            // Only a panic in the walk (a bug) gets here; the table has no 500, and nothing
            // was found to list.
            Err(_) => error(ErrorCode::NotFound, "the recordings could not be listed"),
        }
    }

    /// `GET /admin/recordings/{id}` (the `.fbs`) and `GET /admin/recordings/{id}/audit` (the
    /// `.jsonl`): `None` when the request is not one of those (or lacks the admin token) and
    /// [`AdminApp::route`](super::admin) answers it; otherwise the opened file or the refusal.
    pub(super) async fn recording_download(
        &self,
        session: &ServerSession,
    ) -> Option<Result<Download, Response<Vec<u8>>>> {
        let head = session.req_header();
        if head.method != http::Method::GET && head.method != http::Method::HEAD {
            return None;
        }
        let rest = head.uri.path().strip_prefix("/admin/recordings/")?;
        if !self.authorized(session) {
            return None;
        }
        let (id, part) = match rest.strip_suffix("/audit") {
            Some(id) => (id, Part::Audit),
            None => (rest, Part::Fbs),
        };
        let not_found = || error(ErrorCode::NotFound, "no recording with that id");
        let Some(root) = self.0.config().recording.dir.clone() else {
            return Some(Err(error(
                ErrorCode::NotFound,
                "recording is off (recording.dir is not set)",
            )));
        };
        let Some(id) = RecordingId::parse(id) else {
            return Some(Err(not_found()));
        };
        let (ext, content_type) = match part {
            Part::Fbs => ("fbs", "application/octet-stream"),
            Part::Audit => ("jsonl", "application/x-ndjson"),
        };
        let path = id.path(&root, ext);
        // A regular file only: never a symlink planted in the directory, a FIFO or a device.
        match tokio::fs::symlink_metadata(&path).await {
            Ok(meta) if meta.is_file() => {}
            _ => return Some(Err(not_found())),
        }
        let Ok(file) = tokio::fs::File::open(&path).await else {
            return Some(Err(not_found()));
        };
        // The length now: a recording still being written grows, and the answer is the file as
        // it was when asked (Content-Length says how much).
        let Ok(meta) = file.metadata().await else {
            return Some(Err(not_found()));
        };
        Some(Ok(Download {
            file,
            len: meta.len(),
            content_type,
            file_name: format!("{}.{ext}", id.as_id()),
        }))
    }
}

/// The playback page (`web/playback.html`) and what it loads, served from `web_root` by the
/// admin listener: the page calls `/admin/recordings` with the admin token, and being on the
/// same origin it needs no CORS, so the token is never sent to, or readable by, another origin.
pub(super) fn is_playback_asset(path: &str) -> bool {
    matches!(path, "/playback.html" | "/playback.js" | "/playback.css")
        || path.starts_with("/novnc/")
}

impl AdminApp {
    /// A playback asset (see [`is_playback_asset`]), with the same validators and caching as
    /// on the public listeners; `Err(session)` when it is not one or there is no such file
    /// (the router answers 404). Paths are resolved by [`static_files`](super::static_files),
    /// which refuses any way out of the root.
    pub(super) async fn playback_asset(
        &self,
        session: ServerSession,
    ) -> Result<Option<ReusedHttpStream>, ServerSession> {
        let req = session.req_header();
        let readable = req.method == http::Method::GET || req.method == http::Method::HEAD;
        let path = req.uri.path().to_owned();
        match self.0.config().web_root.clone() {
            Some(root) if readable && is_playback_asset(&path) => {
                Box::pin(super::static_files::serve(session, &root, &path)).await
            }
            _ => Err(session),
        }
    }
}

/// Stream a download in [`CHUNK`]s; returns the connection for keep-alive reuse when the whole
/// body went out.
pub(super) async fn send_file(
    mut session: ServerSession,
    download: Download,
) -> Option<ReusedHttpStream> {
    let head_only = session.req_header().method == http::Method::HEAD;
    let mut header = ResponseHeader::build(StatusCode::OK, Some(5)).ok()?;
    header
        .insert_header(http::header::CONTENT_TYPE, download.content_type)
        .ok()?;
    header
        .insert_header(http::header::CONTENT_LENGTH, download.len.to_string())
        .ok()?;
    header
        .insert_header(http::header::CACHE_CONTROL, "no-store")
        .ok()?;
    header
        .insert_header("x-content-type-options", "nosniff")
        .ok()?;
    header
        .insert_header(
            http::header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{}\"", download.file_name),
        )
        .ok()?;
    session.write_response_header(Box::new(header)).await.ok()?;
    if !head_only {
        let mut reader = download.file.take(download.len);
        let mut left = download.len;
        let mut buf = vec![0u8; CHUNK];
        while left > 0 {
            let n = reader.read(&mut buf).await.ok()?;
            if n == 0 {
                // Shorter than when it was opened (truncated under us): the body cannot match
                // its Content-Length, so the connection is closed rather than reused.
                return None;
            }
            left -= n as u64;
            session
                .write_response_body(Bytes::copy_from_slice(&buf[..n]), left == 0)
                .await
                .ok()?;
        }
    }
    super::respond::finish(session).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_name_one_file_inside_the_directory() {
        for (sid, dir) in [
            ("rec-1", "rec-1"),
            ("a.b:c_d", "a.b:c_d"),
            ("..", "%2E%2E"),
            (".", "%2E"),
        ] {
            let id = format!("2026-12-02.{}.1764680000000-7", dir.replace('%', "~"));
            let parsed = RecordingId::parse(&id).unwrap_or_else(|| panic!("{id}"));
            assert_eq!(parsed.session_id, sid);
            assert_eq!(parsed.dir, dir);
            assert_eq!(parsed.as_id(), id);
            let path = parsed.path(Path::new("/rec"), "fbs");
            assert_eq!(
                path,
                Path::new("/rec/2026-12-02")
                    .join(dir)
                    .join("1764680000000-7.fbs")
            );
            assert_eq!(path.components().count(), 5, "{path:?}");
        }
    }

    #[test]
    fn anything_the_recorder_would_not_write_is_refused() {
        for id in [
            "",
            "..",
            "2026-12-02..1-1",
            "2026-12-02.x.1-1/../../etc",
            "2026-12-02.x%2F..1-1",
            "2026-12-02.~2F.1-1",
            "2026-12-02...1-1",
            "2026-12-02....1-1",
            "2026-12-02.~2E~2E~2F.1-1",
            "2026-12-02.~2e~2e.1-1", // not the recorder's (upper-case) escape
            "2026-12-02.~41.1-1",    // `A` needs no escape: not canonical
            "2026-12-02.x.01-1",
            "2026-12-02.x.1-+1",
            "2026-12-02.x.1",
            "2026-12-02.x.1-1.fbs",
            "2026-1a-02.x.1-1",
            "../2026-12-02.x.1-1",
            "2026-12-02.x/y.1-1",
            "2026-12-02.x\\y.1-1",
            "2026-12-02.x.99999999999999999999-1",
        ] {
            assert_eq!(RecordingId::parse(id), None, "{id}");
        }
        let long = format!("2026-12-02.{}.1-1", "a".repeat(129));
        assert_eq!(RecordingId::parse(&long), None);
    }

    #[test]
    fn the_listing_is_newest_first_and_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        for (day, sid, stem) in [
            ("2026-12-01", "a", "100-1"),
            ("2026-12-02", "a", "300-2"),
            ("2026-12-02", "b", "200-3"),
            ("2026-12-02", "%2E%2E", "250-4"),
        ] {
            let d = root.join(day).join(sid);
            std::fs::create_dir_all(&d).expect("dir");
            std::fs::write(d.join(format!("{stem}.fbs")), b"FBS 001.000\n").expect("fbs");
        }
        // Not the recorder's: ignored.
        std::fs::write(root.join("2026-12-02/a/notes.fbs"), b"x").expect("other");
        std::fs::create_dir_all(root.join("lost+found")).expect("other dir");
        let ids = |sid, limit| -> Vec<u64> {
            list(root, sid, limit)
                .iter()
                .map(|l| l.id.unix_ms)
                .collect()
        };
        assert_eq!(ids(None, 10), [300, 250, 200, 100]);
        assert_eq!(ids(Some("a"), 10), [300, 100]);
        assert_eq!(ids(Some(".."), 10), [250]);
        assert_eq!(ids(None, 2), [300, 250]);
        assert_eq!(ids(Some("zzz"), 10), Vec::<u64>::new());
    }
}
