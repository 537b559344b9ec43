//! Reading one request head under a deadline and a size cap, before Pingora parses it.
//!
//! Pingora's `read_request` has a per-read timeout only, accepts heads up to 1 MiB and parses the
//! whole buffer again after every read: a client trickling a big head a few bytes at a time
//! holds the connection indefinitely and costs quadratic parsing. Here the head is collected
//! with one deadline for all of it, each byte is scanned once for the blank line, and only a
//! complete head (at most `limits.max_head_bytes`) is handed to Pingora, which parses it once.

use std::time::Duration;

use bytes::BytesMut;
use pingora_core::protocols::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::refusal::{ErrorCode, Refusal};

/// Bytes asked for per read: a typical upgrade head (a JWT included) fits in one.
const READ_CHUNK: usize = 4096;

#[derive(Debug)]
pub enum Head {
    /// A complete head, possibly followed by bytes the client sent right behind it.
    Ready(BytesMut),
    /// The client closed (or an idle keep-alive connection expired) before a request started.
    Closed,
    /// Not complete within the deadline.
    TimedOut,
    /// Larger than the cap; answered 400 by [`refuse_too_large`].
    TooLarge,
}

/// Wait for a request. `idle` bounds the wait for its first byte (a keep-alive connection
/// between requests; `None` on a fresh connection, whose deadline already runs), `deadline`
/// the time from that byte to the end of the head.
pub async fn read(
    stream: &mut Stream,
    idle: Option<Duration>,
    head_timeout: Duration,
    max_bytes: usize,
) -> Head {
    let mut buf = BytesMut::new();
    if let Some(idle) = idle {
        match tokio::time::timeout(idle, read_some(stream, &mut buf)).await {
            Ok(Some(0)) | Ok(None) | Err(_) => return Head::Closed,
            Ok(Some(_)) => {}
        }
    }
    let deadline = Instant::now() + head_timeout;
    let mut scanned = 0;
    loop {
        if find_end(&buf, scanned).is_some() {
            return Head::Ready(buf);
        }
        if buf.len() > max_bytes {
            return Head::TooLarge;
        }
        // The blank line may straddle two reads: look again from just before the new bytes.
        scanned = buf.len().saturating_sub(3);
        match tokio::time::timeout_at(deadline, read_some(stream, &mut buf)).await {
            Err(_) => return Head::TimedOut,
            Ok(None) | Ok(Some(0)) => return Head::Closed,
            Ok(Some(_)) => {}
        }
    }
}

async fn read_some(stream: &mut Stream, buf: &mut BytesMut) -> Option<usize> {
    buf.reserve(READ_CHUNK);
    stream.read_buf(buf).await.ok()
}

/// The end of the head: a blank line, CRLF or bare LF as httparse accepts both.
fn find_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while let Some(pos) = buf.get(i..)?.iter().position(|&b| b == b'\n') {
        let nl = i + pos;
        match buf.get(nl + 1) {
            Some(b'\n') => return Some(nl + 2),
            Some(b'\r') if buf.get(nl + 2) == Some(&b'\n') => return Some(nl + 3),
            _ => i = nl + 1,
        }
    }
    None
}

/// Answer an oversized head with 400 `bad_upgrade` and close; the head itself is never parsed.
pub async fn refuse_too_large(stream: &mut Stream, max_bytes: usize, within: Duration) {
    let refusal = Refusal::new(
        ErrorCode::BadUpgrade,
        format!("the request head is larger than {max_bytes} bytes"),
    );
    let body = refusal.body();
    let mut response = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\ncache-control: no-store\r\nconnection: close\r\n\r\n",
        refusal.code.status().as_u16(),
        refusal.code.status().canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes();
    response.extend_from_slice(&body);
    let _ = tokio::time::timeout(within, async {
        stream.write_all(&response).await?;
        stream.flush().await
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::find_end;

    #[test]
    fn finds_the_blank_line_in_every_form_and_across_reads() {
        assert_eq!(find_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nrest", 0), Some(24));
        assert_eq!(find_end(b"GET / HTTP/1.1\nA: b\n\nrest", 0), Some(21));
        assert_eq!(find_end(b"GET / HTTP/1.1\r\nA: b\r\n", 0), None);
        // Scanning resumes three bytes before the new data, so a split "\r\n|\r\n" is found.
        let head = b"GET / HTTP/1.1\r\n\r\n";
        assert_eq!(find_end(head, head.len() - 3 - 1), Some(head.len()));
    }

    proptest::proptest! {
        #[test]
        fn never_panics_and_agrees_with_a_naive_search(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), from in 0usize..320) {
            let found = find_end(&bytes, from);
            if let Some(end) = found {
                proptest::prop_assert!(end <= bytes.len());
                proptest::prop_assert!(bytes[..end].ends_with(b"\n\n") || bytes[..end].ends_with(b"\n\r\n"));
            }
            if from == 0 {
                let naive = (0..bytes.len()).find_map(|i| {
                    if bytes[i..].starts_with(b"\n\n") { Some(i + 2) }
                    else if bytes[i..].starts_with(b"\n\r\n") { Some(i + 3) }
                    else { None }
                });
                proptest::prop_assert_eq!(found, naive);
            }
        }
    }
}
