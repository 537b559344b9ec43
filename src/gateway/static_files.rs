//! `web_root` as static files: GET/HEAD only, no directory listing (a directory serves its
//! `index.html` or 404), and no way out of the root: every path segment is percent-decoded and
//! `.`, `..`, empty-after-decoding, backslashes and NULs are refused before touching the disk.
//! Symlinks placed inside the root by the operator are followed (like nginx's default).
//!
//! Caching (issue 16: a new vncgate release must never run yesterday's viewer in a user's tab,
//! and a reload should cost a few 304s): every file carries validators (an `ETag` and
//! `Last-Modified`) and [`CACHE_CONTROL`]; a conditional GET whose validators still match is
//! answered 304 without a body ([`not_modified`], RFC 9110 §13.2.2).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use pingora_core::apps::ReusedHttpStream;
use pingora_core::protocols::http::ServerSession;
use pingora_http::ResponseHeader;

/// `Cache-Control` of every `web_root` file, HTML and modules alike: `no-cache` = the browser
/// may keep the file but must revalidate it (a conditional GET) before each use.
///
/// HTML has to be revalidated on every load, or a new release's page never reaches an open tab.
/// The modules need it too: the viewer imports `./viewer.js` and `./novnc/core/*.js` by plain
/// URLs with no version in them, so a `max-age` (or no `Cache-Control` at all, where browsers
/// apply a heuristic freshness of ~10% of the file's age) would let a reload run the new page
/// with yesterday's modules, or the old modules with a new page: exactly the mix this is meant
/// to prevent (`tests/browser_cache.rs` fails that way without `no-cache`: files a few hours
/// old count as fresh for a good part of an hour). Unchanged modules are not downloaded again:
/// each costs one 304 (a few hundred bytes, no body). Measured there: a reload of the viewer
/// page (`web/index.html`) revalidates every file it loads, 61 at this writing (the HTML, its
/// CSS, viewer.js, the `@vncgate/client` modules and 52 of noVNC's core), i.e. ~60 bodiless
/// 304s over the browser's keep-alive connections, against ~550 KB of bodies on a first load.
/// Immutable caching (`max-age=31536000, immutable`) would need versioned URLs (a hash in each
/// file name), which a plain directory of ES modules does not have.
pub const CACHE_CONTROL: &str = "no-cache";

pub struct StaticFile {
    pub content_type: String,
    pub body: Vec<u8>,
    pub validators: Validators,
}

/// What identifies one version of a file, for conditional requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validators {
    /// A strong entity tag (with its quotes): the xxh3-128 hash of the body. A hash of what is
    /// served rather than (size, mtime, inode): release images built reproducibly stamp every
    /// file with the same mtime (SOURCE_DATE_EPOCH), and `cp -p` / `rsync -t` keep it, so a
    /// changed file of the same size would keep its tag. The body is read anyway, and xxh3 hashes
    /// it at memory speed (the viewer's largest module, noVNC's rfb.js, ~100 KB: microseconds).
    pub etag: String,
    /// The file's mtime, whole seconds (what an HTTP-date can carry).
    pub last_modified: Option<SystemTime>,
}

impl Validators {
    pub fn of(body: &[u8], modified: Option<SystemTime>) -> Validators {
        Validators {
            etag: format!("\"{:032x}\"", xxhash_rust::xxh3::xxh3_128(body)),
            last_modified: modified.map(whole_seconds),
        }
    }
}

fn whole_seconds(t: SystemTime) -> SystemTime {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => UNIX_EPOCH + Duration::from_secs(d.as_secs()),
        Err(_) => UNIX_EPOCH,
    }
}

/// Whether a GET/HEAD with these request headers gets a 304 (RFC 9110 §13.2.2): `If-None-Match`
/// when present decides alone (a weak comparison against the list, `*` matching any current
/// file); otherwise `If-Modified-Since`, when the file is not newer than the date given.
/// Unparseable values never produce a 304 (the full answer is always safe).
pub fn not_modified(request: &HeaderMap, validators: &Validators) -> bool {
    let mut if_none_match = request
        .get_all(http::header::IF_NONE_MATCH)
        .iter()
        .peekable();
    if if_none_match.peek().is_some() {
        let ours = opaque_tag(&validators.etag);
        return if_none_match
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .any(|tag| tag == "*" || (ours.is_some() && opaque_tag(tag) == ours));
    }
    let (Some(since), Some(modified)) = (
        request
            .get(http::header::IF_MODIFIED_SINCE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v.trim()).ok()),
        validators.last_modified,
    ) else {
        return false;
    };
    modified <= since
}

/// The opaque part of an entity tag, `W/` dropped (the weak comparison of RFC 9110 §8.8.3.2);
/// `None` for anything that is not a quoted tag.
fn opaque_tag(tag: &str) -> Option<&str> {
    let tag = tag.strip_prefix("W/").unwrap_or(tag);
    (tag.len() >= 2 && tag.starts_with('"') && tag.ends_with('"')).then_some(tag)
}

/// Map a request path to a file under `root`, or `None` for anything that is not a safe path.
pub fn resolve(root: &Path, request_path: &str) -> Option<PathBuf> {
    let mut path = root.to_path_buf();
    for raw in request_path.split('/').filter(|s| !s.is_empty()) {
        let segment = percent_decode(raw)?;
        if segment == "." || segment == ".." || segment.contains(['/', '\\', '\0']) {
            return None;
        }
        path.push(segment);
    }
    Some(path)
}

fn percent_decode(s: &str) -> Option<String> {
    let decoded: Vec<u8> = form_urlencoded_bytes(s)?;
    String::from_utf8(decoded).ok()
}

/// Percent-decoding of a path segment (unlike a query, `+` stays `+`).
fn form_urlencoded_bytes(s: &str) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Read the file for `request_path`, or `None` (answered 404) when there is none.
pub async fn load(root: &Path, request_path: &str) -> Option<StaticFile> {
    let mut path = resolve(root, request_path)?;
    let mut meta = tokio::fs::metadata(&path).await.ok()?;
    if meta.is_dir() {
        path.push("index.html");
        meta = tokio::fs::metadata(&path).await.ok()?;
    }
    let body = tokio::fs::read(&path).await.ok()?;
    let content_type = mime_guess::from_path(&path)
        .first()
        .map(|m| match m.type_() {
            mime_guess::mime::TEXT => format!("{m}; charset=utf-8"),
            _ => m.to_string(),
        })
        .unwrap_or_else(|| "application/octet-stream".to_owned());
    let validators = Validators::of(&body, meta.modified().ok());
    Some(StaticFile {
        content_type,
        body,
        validators,
    })
}

/// Answer a GET or HEAD for `request_path` from `root`: 200 with the body, or 304 when the
/// request's validators match. `Err(session)` when there is no such file (the caller answers
/// 404 in its own way).
pub async fn serve(
    mut session: ServerSession,
    root: &Path,
    request_path: &str,
) -> Result<Option<ReusedHttpStream>, ServerSession> {
    let Some(file) = load(root, request_path).await else {
        return Err(session);
    };
    let fresh = not_modified(&session.req_header().headers, &file.validators);
    let head_only = session.req_header().method == http::Method::HEAD;
    let Some(header) = response_header(&file, fresh) else {
        return Ok(None);
    };
    if session.write_response_header(header).await.is_err() {
        return Ok(None);
    }
    if !fresh && !head_only && !file.body.is_empty() {
        let body = Bytes::from(file.body);
        if session.write_response_body(body, true).await.is_err() {
            return Ok(None);
        }
    }
    Ok(super::respond::finish(session).await)
}

/// The 200 head, or the 304 one: the same validators and `Cache-Control` (RFC 9110 §15.4.5: a
/// 304 carries what the 200 would have, so the cache updates its stored copy), no body.
fn response_header(file: &StaticFile, not_modified: bool) -> Option<Box<ResponseHeader>> {
    let status = match not_modified {
        true => StatusCode::NOT_MODIFIED,
        false => StatusCode::OK,
    };
    let mut header = ResponseHeader::build(status, Some(6)).ok()?;
    if !not_modified {
        header
            .insert_header(http::header::CONTENT_TYPE, file.content_type.as_str())
            .ok()?;
        header
            .insert_header(http::header::CONTENT_LENGTH, file.body.len().to_string())
            .ok()?;
        header
            .insert_header("x-content-type-options", "nosniff")
            .ok()?;
    }
    header
        .insert_header(http::header::ETAG, file.validators.etag.as_str())
        .ok()?;
    if let Some(modified) = file.validators.last_modified {
        header
            .insert_header(
                http::header::LAST_MODIFIED,
                httpdate::fmt_http_date(modified),
            )
            .ok()?;
    }
    header
        .insert_header(http::header::CACHE_CONTROL, CACHE_CONTROL)
        .ok()?;
    Some(Box::new(header))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case("/index.html", Some("/r/index.html"))]
    #[case("/a/b.js", Some("/r/a/b.js"))]
    #[case("/", Some("/r"))]
    #[case("/../etc/passwd", None)]
    #[case("/a/%2e%2e/%2e%2e/etc/passwd", None)]
    #[case("/a%2f..%2f..%2fetc", None)]
    #[case("/a%5c..", None)]
    #[case("/a%00b", None)]
    #[case("/bad%zz", None)]
    fn traversal_is_refused(#[case] req: &str, #[case] want: Option<&str>) {
        assert_eq!(resolve(Path::new("/r"), req), want.map(PathBuf::from));
    }

    const TAG: &str = "\"0123456789abcdef0123456789abcdef\"";

    fn validators(modified_secs: u64) -> Validators {
        Validators {
            etag: TAG.to_owned(),
            last_modified: Some(UNIX_EPOCH + Duration::from_secs(modified_secs)),
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().expect("header value"));
        }
        h
    }

    /// 784111777 = Sun, 06 Nov 1994 08:49:37 GMT.
    #[rstest]
    #[case::no_condition(&[], false)]
    #[case::same_tag(&[("if-none-match", TAG)], true)]
    #[case::weak_form_matches(&[("if-none-match", "W/\"0123456789abcdef0123456789abcdef\"")], true)]
    #[case::in_a_list(&[("if-none-match", "\"old\", W/\"x\" , \"0123456789abcdef0123456789abcdef\"")], true)]
    #[case::list_over_two_lines(&[("if-none-match", "\"old\""), ("if-none-match", TAG)], true)]
    #[case::star(&[("if-none-match", "*")], true)]
    #[case::other_tag(&[("if-none-match", "\"old\"")], false)]
    #[case::unquoted_is_no_tag(&[("if-none-match", "0123456789abcdef0123456789abcdef")], false)]
    #[case::same_date(&[("if-modified-since", "Sun, 06 Nov 1994 08:49:37 GMT")], true)]
    #[case::later_date(&[("if-modified-since", "Sun, 06 Nov 1994 09:00:00 GMT")], true)]
    #[case::earlier_date(&[("if-modified-since", "Sun, 06 Nov 1994 08:49:36 GMT")], false)]
    #[case::obsolete_date_format(&[("if-modified-since", "Sunday, 06-Nov-94 08:49:37 GMT")], true)]
    #[case::bad_date(&[("if-modified-since", "yesterday")], false)]
    // If-None-Match takes precedence: a changed tag is a 200 whatever the date says.
    #[case::tag_wins_over_date(&[("if-none-match", "\"old\""), ("if-modified-since", "Sun, 06 Nov 1994 09:00:00 GMT")], false)]
    #[case::tag_match_ignores_date(&[("if-none-match", TAG), ("if-modified-since", "Sun, 06 Nov 1994 08:00:00 GMT")], true)]
    fn conditional_requests(#[case] request: &[(&'static str, &str)], #[case] want: bool) {
        assert_eq!(
            not_modified(&headers(request), &validators(784111777)),
            want
        );
    }

    #[test]
    fn without_a_modification_time_only_the_tag_counts() {
        let v = Validators {
            last_modified: None,
            ..validators(0)
        };
        let since = headers(&[("if-modified-since", "Sun, 06 Nov 1994 08:49:37 GMT")]);
        assert!(!not_modified(&since, &v));
        assert!(not_modified(&headers(&[("if-none-match", TAG)]), &v));
    }

    #[test]
    fn the_tag_follows_the_content_not_the_clock() {
        let t = Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        let a = Validators::of(b"export const v = 1;", t);
        let b = Validators::of(b"export const v = 2;", t);
        assert_ne!(a.etag, b.etag, "same size, same mtime, other content");
        assert_eq!(a, Validators::of(b"export const v = 1;", t));
        assert!(
            opaque_tag(&a.etag).is_some(),
            "a quoted strong tag: {}",
            a.etag
        );
    }

    #[test]
    fn last_modified_drops_sub_second_precision() {
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_900);
        let v = Validators::of(b"", Some(t));
        assert_eq!(
            v.last_modified,
            Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        // The date the client echoes back (whole seconds) matches the file's own.
        let echoed = httpdate::fmt_http_date(t);
        assert!(not_modified(
            &headers(&[("if-modified-since", echoed.as_str())]),
            &v
        ));
    }
}
