//! `web_root` as static files: GET/HEAD only, no directory listing (a directory serves its
//! `index.html` or 404), and no way out of the root: every path segment is percent-decoded and
//! `.`, `..`, empty-after-decoding, backslashes and NULs are refused before touching the disk.
//! Symlinks placed inside the root by the operator are followed (like nginx's default).

use std::path::{Path, PathBuf};

pub struct StaticFile {
    pub content_type: String,
    pub body: Vec<u8>,
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
    let meta = tokio::fs::metadata(&path).await.ok()?;
    if meta.is_dir() {
        path.push("index.html");
    }
    let body = tokio::fs::read(&path).await.ok()?;
    let content_type = mime_guess::from_path(&path)
        .first()
        .map(|m| match m.type_() {
            mime_guess::mime::TEXT => format!("{m}; charset=utf-8"),
            _ => m.to_string(),
        })
        .unwrap_or_else(|| "application/octet-stream".to_owned());
    Some(StaticFile { content_type, body })
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
}
