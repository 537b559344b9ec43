//! Writing plain HTTP answers (JSON errors, static files, health) on a Pingora session.

use bytes::Bytes;
use http::StatusCode;
use pingora_core::apps::{HttpPersistentSettings, ReusedHttpStream};
use pingora_core::protocols::http::ServerSession;
use pingora_core::server::ShutdownWatch;
use pingora_http::ResponseHeader;

use super::KEEPALIVE_SECONDS;
use super::refusal::{ErrorCode, Refusal};

/// Read the request head and set the keep-alive timeout; `false` when there is nothing more
/// to do (the client closed an idle keep-alive connection, or sent a head that does not parse,
/// which is answered 400 here). The error is not logged: Pingora's errors quote the raw request
/// bytes, credentials included.
pub async fn read_request(session: &mut ServerSession, shutdown: &ShutdownWatch) -> bool {
    match session.read_request().await {
        Ok(true) => {}
        Ok(false) => return false,
        // A head that does not parse (a URI above the 64 KiB `http::Uri` limit, e.g. a huge
        // token in the query): a clear status rather than a silently closed connection.
        Err(e) if matches!(e.etype(), pingora_core::ErrorType::InvalidHTTPHeader) => {
            let refusal = Refusal::new(
                ErrorCode::BadUpgrade,
                "the request head could not be parsed (too large or malformed)",
            );
            let body = Bytes::from(refusal.body());
            if let Ok(mut header) = ResponseHeader::build(refusal.code.status(), Some(2)) {
                let _ = header.insert_header(http::header::CONTENT_TYPE, "application/json");
                let _ = header.insert_header(http::header::CONTENT_LENGTH, body.len().to_string());
                let _ = session.write_error_response(header, body).await;
            }
            return false;
        }
        Err(_) => return false,
    }
    // Pingora leaves a reused keep-alive connection without any read timeout; without this a
    // client could hold a connection open forever after one cheap request.
    session.set_keepalive(if *shutdown.borrow() {
        None
    } else {
        Some(KEEPALIVE_SECONDS)
    });
    true
}

/// Write a full response; returns the connection for keep-alive reuse when it is reusable.
pub async fn send(
    mut session: ServerSession,
    status: StatusCode,
    content_type: &str,
    body: Vec<u8>,
    extra: &[(&'static str, String)],
) -> Option<ReusedHttpStream> {
    let head_only = session.req_header().method == http::Method::HEAD;
    let mut header = ResponseHeader::build(status, Some(4 + extra.len())).ok()?;
    header
        .insert_header(http::header::CONTENT_TYPE, content_type)
        .ok()?;
    header
        .insert_header(http::header::CONTENT_LENGTH, body.len().to_string())
        .ok()?;
    header
        .insert_header(http::header::CACHE_CONTROL, "no-store")
        .ok()?;
    header
        .insert_header("x-content-type-options", "nosniff")
        .ok()?;
    for (name, value) in extra {
        header.insert_header(*name, value.as_str()).ok()?;
    }
    session.write_response_header(Box::new(header)).await.ok()?;
    if !head_only && !body.is_empty() {
        session
            .write_response_body(Bytes::from(body), true)
            .await
            .ok()?;
    }
    finish(session).await
}

/// End a response whose body was written; the connection back for the next request when it
/// can be reused.
pub async fn finish(session: ServerSession) -> Option<ReusedHttpStream> {
    let settings = HttpPersistentSettings::for_session(&session);
    match session.finish().await {
        Ok(reusable) => reusable.map(|s| ReusedHttpStream::from_reusable_stream(s, settings)),
        Err(_) => None,
    }
}

pub async fn json(
    session: ServerSession,
    status: StatusCode,
    value: serde_json::Value,
    extra: &[(&'static str, String)],
) -> Option<ReusedHttpStream> {
    send(
        session,
        status,
        "application/json",
        value.to_string().into_bytes(),
        extra,
    )
    .await
}
