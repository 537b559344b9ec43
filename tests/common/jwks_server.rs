//! A local JWKS endpoint for the auth tests: serves whatever key set the test sets, counts
//! fetches, can play an identity provider that is down (503), and can hold its answers until
//! the test releases them (a slow provider, without a sleep).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::EVENT_TIMEOUT;

struct State {
    body: Mutex<String>,
    down: AtomicBool,
    /// Requests read (answered or held).
    received: watch::Sender<u64>,
    /// Answers sent (or about to be).
    fetches: watch::Sender<u64>,
    /// Whether answers go out; while false they wait here.
    open: watch::Sender<bool>,
}

pub struct JwksServer {
    pub url: String,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl JwksServer {
    pub async fn start(body: String) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!(
            "http://{}/.well-known/jwks.json",
            listener.local_addr().expect("addr")
        );
        let state = Arc::new(State {
            body: Mutex::new(body),
            down: AtomicBool::new(false),
            received: watch::channel(0).0,
            fetches: watch::channel(0).0,
            open: watch::channel(true).0,
        });
        let task = tokio::spawn({
            let state = Arc::clone(&state);
            async move {
                while let Ok((conn, _)) = listener.accept().await {
                    tokio::spawn(serve(Arc::clone(&state), conn));
                }
            }
        });
        JwksServer { url, state, task }
    }

    pub fn set_body(&self, body: String) {
        *self.state.body.lock().expect("body") = body;
    }

    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }

    /// Answers written so far.
    pub fn fetches(&self) -> u64 {
        *self.state.fetches.borrow()
    }

    /// From now on, requests are read (and the document they get fixed, as of their arrival)
    /// but not answered until [`JwksServer::release`].
    pub fn hold(&self) {
        self.state.open.send_replace(false);
    }

    /// Answer the held requests, and later ones at once.
    pub fn release(&self) {
        self.state.open.send_replace(true);
    }

    /// Wait until `n` requests have arrived in total (held or not).
    pub async fn wait_received(&self, n: u64) {
        let mut rx = self.state.received.subscribe();
        tokio::time::timeout(EVENT_TIMEOUT, rx.wait_for(|got| *got >= n))
            .await
            .unwrap_or_else(|_| panic!("the JWKS endpoint did not get {n} requests"))
            .expect("jwks server state");
    }
}

async fn serve(state: Arc<State>, mut conn: tokio::net::TcpStream) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    // The document as of the request's arrival: a key published while the answer is held is
    // not in it, as with a provider that read its key store before the key was added.
    let response = if state.down.load(Ordering::SeqCst) {
        "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            .to_owned()
    } else {
        let body = state.body.lock().expect("body").clone();
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    state.received.send_modify(|n| *n += 1);
    let mut open = state.open.subscribe();
    if open.wait_for(|open| *open).await.is_err() {
        return;
    }
    // Counted before the answer leaves, so a test that saw the gateway act on it sees the count.
    state.fetches.send_modify(|n| *n += 1);
    let _ = conn.write_all(response.as_bytes()).await;
    let _ = conn.shutdown().await;
}
