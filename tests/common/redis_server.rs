//! A real `redis-server` per test, with no persistence, that tests can crash (SIGKILL) and bring
//! back empty on the same port: the shared session store as the gateway meets it in production,
//! including its outages.

use std::io::{self, BufRead, BufReader};
use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::oneshot;

const REDIS_SERVER: &str = "/usr/bin/redis-server";
/// Logged by redis-server once its listener is open and it is about to enter its event loop.
const READY_LINE: &str = "Ready to accept connections";
/// Logged when the bind fails; the port was taken between `free_port` and the server's bind.
const BIND_CONFLICT: &str = "Address already in use";
/// redis-server was ready in ~10 ms here; the margin is for a loaded CI machine.
const READY_DEADLINE: Duration = Duration::from_secs(20);
/// A SIGKILLed process is gone in milliseconds; this only turns a stuck process into an error.
const EXIT_DEADLINE: Duration = Duration::from_secs(10);
/// A guard against a hung test, not a timing assertion.
const EXPIRY_DEADLINE: Duration = Duration::from_secs(60);
/// The redis crate's defaults (1 s connect, 500 ms response) would fail assertions on a loaded
/// machine; these only turn a hang into an error.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Each attempt of `start` takes a fresh port; retries absorb races with other tests' listeners.
const ATTEMPTS: usize = 5;
/// `url()` selects database 0.
const EXPIRED_CHANNEL: &str = "__keyevent@0__:expired";

pub struct RedisServer {
    pub port: u16,
    /// From spawn to the ready line, of the latest `start` or `restart`.
    pub startup_time: Duration,
    running: Option<Running>,
    /// redis-server's stdout and stderr lines across all its runs, for failure messages.
    log: Arc<Mutex<Vec<String>>>,
    dir: tempfile::TempDir,
}

/// A spawned redis-server, killed and reaped when dropped: also when a caller abandons `start`
/// or `restart` mid-way (e.g. by its own timeout), which would otherwise leak the process.
struct Running {
    child: Child,
    reader: Option<JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        // No-ops once `kill_and_reap` has reaped it: std remembers the status and does not
        // signal a pid that may have been reused.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

enum Failure {
    /// The server could not bind its port: someone else holds it.
    PortTaken(io::Error),
    Fatal(io::Error),
}

impl Failure {
    fn into_inner(self) -> io::Error {
        match self {
            Failure::PortTaken(e) | Failure::Fatal(e) => e,
        }
    }
}

impl RedisServer {
    /// Starts redis-server on a free 127.0.0.1 port, without RDB or AOF persistence, in its own
    /// temporary directory, and returns once it accepts commands.
    pub async fn start() -> io::Result<RedisServer> {
        let dir = tempfile::Builder::new().prefix("redis-").tempdir()?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut last = io::Error::other("redis-server was not started");
        for _ in 0..ATTEMPTS {
            let port = free_port()?;
            match launch(port, dir.path(), &log).await {
                Ok((running, startup_time)) => {
                    return Ok(RedisServer {
                        port,
                        startup_time,
                        running: Some(running),
                        log,
                        dir,
                    });
                }
                Err(Failure::PortTaken(e)) => last = e,
                Err(Failure::Fatal(e)) => return Err(e),
            }
        }
        Err(last)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// SIGKILLs the server, a crash rather than a clean shutdown, and returns once the process is
    /// reaped, so its listener and connections are closed. Does nothing if it is not running.
    pub async fn kill(&mut self) -> io::Result<()> {
        let Some(running) = self.running.take() else {
            return Ok(());
        };
        let pid = running.child.id();
        let reap = tokio::task::spawn_blocking(move || kill_and_reap(running));
        match tokio::time::timeout(EXIT_DEADLINE, reap).await {
            Ok(joined) => joined.map_err(io::Error::other)?.map(|_| ()),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("redis-server (pid {pid}) still alive {EXIT_DEADLINE:?} after SIGKILL"),
            )),
        }
    }

    /// Starts the server again on the same port (the gateway under test has it in its config),
    /// empty since nothing was persisted, and returns once it accepts commands. Kills it first if
    /// it is still running. Fails if the port has been taken meanwhile.
    pub async fn restart(&mut self) -> io::Result<()> {
        self.kill().await?;
        let (running, startup_time) = launch(self.port, self.dir.path(), &self.log)
            .await
            .map_err(Failure::into_inner)?;
        self.running = Some(running);
        self.startup_time = startup_time;
        Ok(())
    }

    /// A fresh multiplexed connection to database 0, for assertions.
    /// One field (`owner`, `backend`, ...) of the pin the gateway stored for `sid` under the
    /// default key prefix; `None` when there is no such pin.
    pub async fn pin_field(&self, sid: &str, field: &str) -> Option<String> {
        use redis::AsyncCommands;
        let mut con = self.client().await.expect("redis client");
        con.hget(format!("vncgate:session:{sid}"), field)
            .await
            .expect("hget")
    }

    pub async fn client(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CLIENT_TIMEOUT))
            .set_response_timeout(Some(CLIENT_TIMEOUT));
        redis::Client::open(self.url())?
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }

    /// Returns once `key` (in database 0) has expired, awaiting redis's own `expired` keyspace
    /// event rather than polling. Returns at once if the key does not exist. A key removed by
    /// DEL or stripped of its TTL never sends that event; the wait then ends in a timeout error.
    pub async fn wait_expired(&self, key: &str) -> io::Result<()> {
        let wait = async {
            let mut con = self.client().await.map_err(redis_err("connect"))?;
            // Set on every call: the setting is not persisted, so a restarted server has lost it.
            redis::cmd("CONFIG")
                .arg("SET")
                .arg("notify-keyspace-events")
                .arg("Ex")
                .exec_async(&mut con)
                .await
                .map_err(redis_err("CONFIG SET notify-keyspace-events"))?;
            let mut pubsub = redis::Client::open(self.url())
                .map_err(redis_err("client"))?
                .get_async_pubsub()
                .await
                .map_err(redis_err("connect for SUBSCRIBE"))?;
            // `subscribe` returns after the server has confirmed the subscription, so an expiry
            // from now on is published to us; one before it shows as the key missing below.
            pubsub
                .subscribe(EXPIRED_CHANNEL)
                .await
                .map_err(redis_err("SUBSCRIBE"))?;
            let exists: bool = redis::cmd("EXISTS")
                .arg(key)
                .query_async(&mut con)
                .await
                .map_err(redis_err("EXISTS"))?;
            if !exists {
                return Ok(());
            }
            let mut messages = pubsub.on_message();
            while let Some(msg) = messages.next().await {
                if msg.get_payload_bytes() == key.as_bytes() {
                    return Ok(());
                }
            }
            Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("subscription to {EXPIRED_CHANNEL} closed before {key:?} expired"),
            ))
        };
        match tokio::time::timeout(EXPIRY_DEADLINE, wait).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "key {key:?} did not expire within {EXPIRY_DEADLINE:?} \
                     (no {EXPIRED_CHANNEL} message for it)"
                ),
            )),
        }
    }

    /// Everything redis-server has written so far, across restarts.
    pub fn log(&self) -> String {
        lock(&self.log).join("\n")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // SIGKILL and reap (`Running::drop`), without joining the log reader: it ends on its own
        // at EOF, and a Drop should not wait for it.
        drop(self.running.take());
    }
}

/// Spawns redis-server on `port` and waits for its ready line. On failure the process is reaped.
async fn launch(
    port: u16,
    dir: &Path,
    log: &Arc<Mutex<Vec<String>>>,
) -> Result<(Running, Duration), Failure> {
    // One pipe for both streams: redis logs to stdout, but argument errors go to stderr.
    let (pipe_reader, pipe_writer) = io::pipe().map_err(Failure::Fatal)?;
    let stderr = pipe_writer.try_clone().map_err(Failure::Fatal)?;
    let started = Instant::now();
    // The Command, which holds our copies of the write end, is dropped at the end of this
    // statement; the reader then sees EOF exactly when redis-server has exited.
    let child = Command::new(REDIS_SERVER)
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(["--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .args(["--logfile", ""])
        .args(["--daemonize", "no"])
        .stdin(Stdio::null())
        .stdout(Stdio::from(pipe_writer))
        .stderr(Stdio::from(stderr))
        .spawn()
        .map_err(Failure::Fatal)?;
    let pid = child.id();
    let first_line = {
        let mut lines = lock(log);
        lines.push(format!(
            "[fixture] spawned redis-server pid {pid} on 127.0.0.1:{port}"
        ));
        lines.len()
    };

    let (ready_tx, ready_rx) = oneshot::channel();
    let reader = {
        let log = log.clone();
        thread::spawn(move || read_log(pipe_reader, &log, ready_tx))
    };
    let running = Running {
        child,
        reader: Some(reader),
    };

    let exited = match tokio::time::timeout(READY_DEADLINE, ready_rx).await {
        Ok(Ok(())) => return Ok((running, started.elapsed())),
        Ok(Err(_)) => true,
        Err(_) => false,
    };
    let status = tokio::task::spawn_blocking(move || kill_and_reap(running))
        .await
        .map_err(|e| Failure::Fatal(io::Error::other(e)))?
        .map_err(Failure::Fatal)?;
    let lines = lock(log)[first_line..].join("\n");
    if !exited {
        return Err(Failure::Fatal(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "redis-server on 127.0.0.1:{port} not ready after {READY_DEADLINE:?}:\n{lines}"
            ),
        )));
    }
    if lines.contains(BIND_CONFLICT) {
        return Err(Failure::PortTaken(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("redis-server could not bind 127.0.0.1:{port} ({status}):\n{lines}"),
        )));
    }
    Err(Failure::Fatal(io::Error::other(format!(
        "redis-server on 127.0.0.1:{port} exited before it was ready ({status}):\n{lines}"
    ))))
}

/// Collects redis-server's output until EOF, which also keeps the pipe drained so the server
/// never blocks on a full pipe. Dropping `ready` unsent tells the waiter the server exited first.
fn read_log(pipe: io::PipeReader, log: &Mutex<Vec<String>>, ready: oneshot::Sender<()>) {
    let mut ready = Some(ready);
    for line in BufReader::new(pipe).split(b'\n') {
        let Ok(line) = line else { break };
        let line = String::from_utf8_lossy(&line).into_owned();
        let is_ready = line.contains(READY_LINE);
        lock(log).push(line);
        if is_ready && let Some(tx) = ready.take() {
            let _ = tx.send(());
        }
    }
}

/// Blocking. Until `wait` reaps the child its pid cannot be reused, so the signal reaches our
/// redis-server even if it has already exited.
fn kill_and_reap(mut running: Running) -> io::Result<ExitStatus> {
    running.child.kill()?;
    let status = running.child.wait()?;
    // With the process gone the pipe is at EOF; joining makes the log complete before a
    // restart appends to it.
    if let Some(reader) = running.reader.take() {
        let _ = reader.join();
    }
    Ok(status)
}

fn lock(log: &Mutex<Vec<String>>) -> std::sync::MutexGuard<'_, Vec<String>> {
    // A panic while holding the lock cannot leave a Vec of lines inconsistent.
    log.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn redis_err(what: &'static str) -> impl Fn(redis::RedisError) -> io::Error {
    move |e| io::Error::other(format!("redis {what}: {e}"))
}

/// The port is free when this returns; redis-server exits if someone takes it first, and
/// `start` retries.
fn free_port() -> io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}
