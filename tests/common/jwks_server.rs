//! A local JWKS endpoint for the auth tests: serves whatever key set the test sets, counts
//! fetches, and can play an identity provider that is down (503).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

#[derive(Default)]
struct State {
    body: Mutex<String>,
    down: AtomicBool,
    fetches: AtomicU64,
    fetched: Notify,
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
            ..State::default()
        });
        let task = tokio::spawn({
            let state = Arc::clone(&state);
            async move {
                while let Ok((mut conn, _)) = listener.accept().await {
                    let state = Arc::clone(&state);
                    tokio::spawn(async move {
                        let mut head = Vec::new();
                        let mut buf = [0u8; 1024];
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                            match conn.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => head.extend_from_slice(&buf[..n]),
                            }
                        }
                        let response = if state.down.load(Ordering::SeqCst) {
                            "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned()
                        } else {
                            let body = state.body.lock().expect("body").clone();
                            format!(
                                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                                body.len()
                            )
                        };
                        let _ = conn.write_all(response.as_bytes()).await;
                        let _ = conn.shutdown().await;
                        state.fetches.fetch_add(1, Ordering::SeqCst);
                        state.fetched.notify_waiters();
                    });
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

    pub fn fetches(&self) -> u64 {
        self.state.fetches.load(Ordering::SeqCst)
    }
}
