//! The JSON log lines a gateway process writes on stderr, collected as they come so a test can
//! await one (an event, never a sleep).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::ChildStderr;
use tokio::sync::Notify;

use super::EVENT_TIMEOUT;

#[derive(Clone)]
pub struct LogTail {
    label: String,
    logs: Arc<Mutex<Vec<Value>>>,
    raw: Arc<Mutex<Vec<String>>>,
    logged: Arc<Notify>,
    exited: Arc<AtomicBool>,
}

impl LogTail {
    /// Read `stderr` until the process closes it. `VNCGATE_TEST_ECHO` also prints every line,
    /// prefixed with `label`.
    pub fn capture(label: &str, stderr: ChildStderr) -> LogTail {
        let tail = LogTail {
            label: label.to_owned(),
            logs: Arc::default(),
            raw: Arc::default(),
            logged: Arc::default(),
            exited: Arc::default(),
        };
        let writer = tail.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if std::env::var_os("VNCGATE_TEST_ECHO").is_some() {
                    eprintln!("[{}] {line}", writer.label);
                }
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    writer.logs.lock().expect("logs").push(v);
                }
                writer.raw.lock().expect("raw logs").push(line);
                writer.logged.notify_waiters();
            }
            writer.exited.store(true, Ordering::SeqCst);
            writer.logged.notify_waiters();
        });
        tail
    }

    /// Wait until at least `n` log lines match `pred`; returns them all. Panics with every
    /// line written so far when they do not come within [`EVENT_TIMEOUT`] or the process exits.
    pub async fn wait_logs(&self, n: usize, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let wait = async {
            loop {
                let notified = self.logged.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let found: Vec<Value> = self
                    .logs
                    .lock()
                    .expect("logs")
                    .iter()
                    .filter(|v| pred(v))
                    .cloned()
                    .collect();
                if found.len() >= n {
                    return Ok(found);
                }
                if self.exited.load(Ordering::SeqCst) {
                    return Err("the process exited");
                }
                notified.await;
            }
        };
        let why = match tokio::time::timeout(EVENT_TIMEOUT, wait).await {
            Ok(Ok(found)) => return found,
            Ok(Err(why)) => why,
            Err(_) => "timeout",
        };
        panic!(
            "{}: log event did not arrive ({why}); logs:\n{}",
            self.label,
            self.raw().join("\n")
        )
    }

    pub fn logs(&self) -> Vec<Value> {
        self.logs.lock().expect("logs").clone()
    }

    pub fn raw(&self) -> Vec<String> {
        self.raw.lock().expect("raw logs").clone()
    }
}
