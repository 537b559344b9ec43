//! A real TigerVNC `Xvnc` per test: the backend the gateway exists for, with its own RFB
//! implementation quirks that the in-process fixture cannot imitate.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

const XVNC: &str = "/usr/bin/Xvnc";
/// Xvnc was ready in well under a second here; the margin is for a loaded CI machine.
const READY_DEADLINE: Duration = Duration::from_secs(20);
const EXIT_DEADLINE: Duration = Duration::from_secs(5);
/// Each attempt picks a fresh display and port; retries absorb races with other servers.
const ATTEMPTS: usize = 8;
const DISPLAYS: std::ops::Range<u32> = 100..900;

pub struct Xvnc {
    pub display: u32,
    pub rfb_port: u16,
    pub desktop_name: String,
    pub geometry: (u16, u16),
    /// From spawn to Xvnc reporting readiness on its displayfd.
    pub startup_time: Duration,
    child: Option<Child>,
    log: tempfile::NamedTempFile,
}

enum Failure {
    /// Xvnc exited before it was ready: most likely the display or port was taken meanwhile.
    Retry(io::Error),
    Fatal(io::Error),
}

impl Xvnc {
    pub fn available() -> bool {
        Path::new(XVNC).is_file()
    }

    /// Starts Xvnc on a free display and 127.0.0.1 port and returns once it is accepting both
    /// X11 and RFB connections. Readiness is Xvnc's own signal: with `-displayfd 1` it writes
    /// the display number to its stdout (a pipe here) after every listener is open.
    pub fn start(desktop_name: &str, geometry: (u16, u16)) -> io::Result<Xvnc> {
        let mut last = io::Error::other("Xvnc was not started");
        for _ in 0..ATTEMPTS {
            let display = pick_display()?;
            let port = free_port()?;
            match Xvnc::try_start(desktop_name, geometry, display, port) {
                Ok(x) => return Ok(x),
                Err(Failure::Retry(e)) => last = e,
                Err(Failure::Fatal(e)) => return Err(e),
            }
        }
        Err(last)
    }

    /// `start` off the async runtime's worker thread.
    pub async fn start_async(desktop_name: &str, geometry: (u16, u16)) -> io::Result<Xvnc> {
        let name = desktop_name.to_owned();
        tokio::task::spawn_blocking(move || Xvnc::start(&name, geometry))
            .await
            .map_err(io::Error::other)?
    }

    fn try_start(
        name: &str,
        geometry: (u16, u16),
        display: u32,
        port: u16,
    ) -> Result<Xvnc, Failure> {
        let log = tempfile::Builder::new()
            .prefix("xvnc-")
            .suffix(".log")
            .tempfile()
            .map_err(Failure::Fatal)?;
        let stderr = log.reopen().map_err(Failure::Fatal)?;
        let started = Instant::now();
        let mut child = Command::new(XVNC)
            .arg(format!(":{display}"))
            .args(["-displayfd", "1"])
            .args(["-desktop", name])
            .args(["-geometry", &format!("{}x{}", geometry.0, geometry.1)])
            .args(["-depth", "24"])
            .args(["-rfbport", &port.to_string()])
            .args(["-interface", "127.0.0.1"])
            .args(["-nolisten", "tcp"])
            .args(["-SecurityTypes", "None"])
            .arg("-AlwaysShared")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .map_err(Failure::Fatal)?;

        let Some(stdout) = child.stdout.take() else {
            stop(child, display);
            return Err(Failure::Fatal(io::Error::other(
                "Xvnc stdout was not piped",
            )));
        };
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let first = reader.read_line(&mut line).map(|_| line);
            let _ = tx.send(first);
            // Keep the pipe open and empty for Xvnc's whole life: a closed pipe would turn any
            // later write to its stdout into SIGPIPE.
            let _ = io::copy(&mut reader, &mut io::sink());
        });

        let outcome = rx.recv_timeout(READY_DEADLINE);
        let startup_time = started.elapsed();
        let mut xvnc = Xvnc {
            display,
            rfb_port: port,
            desktop_name: name.to_owned(),
            geometry,
            startup_time,
            child: Some(child),
            log,
        };
        match outcome {
            Ok(Ok(line)) if line.trim() == display.to_string() => Ok(xvnc),
            Ok(Ok(line)) if line.is_empty() => {
                // Reaped here and taken out, so Drop never signals a pid that may be reused.
                let status = xvnc.child.take().map(|mut c| c.wait());
                Err(Failure::Retry(io::Error::other(format!(
                    "Xvnc :{display} (rfbport {port}) exited before it was ready ({status:?}):\n{}",
                    xvnc.log_tail(2000)
                ))))
            }
            Ok(Ok(line)) => Err(Failure::Fatal(io::Error::other(format!(
                "Xvnc reported display {:?}, expected {display}",
                line.trim()
            )))),
            Ok(Err(e)) => Err(Failure::Fatal(e)),
            Err(_) => Err(Failure::Fatal(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "Xvnc :{display} not ready after {READY_DEADLINE:?}:\n{}",
                    xvnc.log_tail(2000)
                ),
            ))),
        }
    }

    pub fn rfb_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.rfb_port))
    }

    /// The `DISPLAY` value, e.g. `:123`.
    pub fn display_name(&self) -> String {
        format!(":{}", self.display)
    }

    /// Paints the root window; the change is in Xvnc's framebuffer when this returns because
    /// xsetroot waits for the server to process its requests before it exits.
    pub fn set_root_color(&self, hex: &str) -> io::Result<()> {
        let out = Command::new("xsetroot")
            .args(["-display", &self.display_name(), "-solid", hex])
            .stdin(Stdio::null())
            .output()?;
        if out.status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "xsetroot -solid {hex} on {} failed ({}): {}",
                self.display_name(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }

    /// The last `max_bytes` of Xvnc's stderr, for failure messages.
    pub fn log_tail(&self, max_bytes: usize) -> String {
        let mut text = Vec::new();
        if let Ok(mut f) = self.log.reopen() {
            let _ = f.read_to_end(&mut text);
        }
        let start = text.len().saturating_sub(max_bytes);
        String::from_utf8_lossy(&text[start..]).into_owned()
    }
}

impl Drop for Xvnc {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            stop(child, self.display);
        }
    }
}

/// SIGTERM first: Xvnc then removes its X socket itself, whereas SIGKILL would leave it behind
/// and use up display numbers. SIGKILL only if it does not exit in time.
fn stop(mut child: Child, display: u32) {
    let pid = child.id().to_string();
    let termed = Command::new("kill")
        .args(["-TERM", &pid])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !termed {
        let _ = child.kill();
        let _ = child.wait();
        remove_display_files(display);
        return;
    }
    let (tx, rx) = mpsc::channel();
    let waiter = thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    if rx.recv_timeout(EXIT_DEADLINE).is_err() {
        // The waiter has not reaped it, so the pid still names our Xvnc.
        let _ = Command::new("kill").args(["-KILL", &pid]).status();
        let _ = waiter.join();
        remove_display_files(display);
    } else {
        let _ = waiter.join();
    }
}

fn remove_display_files(display: u32) {
    let _ = std::fs::remove_file(format!("/tmp/.X11-unix/X{display}"));
    let _ = std::fs::remove_file(format!("/tmp/.X{display}-lock"));
}

fn display_in_use(n: u32) -> bool {
    Path::new(&format!("/tmp/.X11-unix/X{n}")).exists()
        || Path::new(&format!("/tmp/.X{n}-lock")).exists()
}

/// A random start keeps parallel test processes apart; the counter keeps tests of one process
/// apart even when their random draws land close together.
fn pick_display() -> io::Result<u32> {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let random = RandomState::new().build_hasher().finish();
    let calls = CALLS.fetch_add(1, Ordering::Relaxed);
    let span = DISPLAYS.end - DISPLAYS.start;
    let start = (random.wrapping_add(calls.wrapping_mul(97)) % span as u64) as u32;
    (0..span)
        .map(|i| DISPLAYS.start + (start + i) % span)
        .find(|&n| !display_in_use(n))
        .ok_or_else(|| io::Error::other("no free X display number in 100..900"))
}

/// The port is free when this returns; Xvnc exits if someone takes it first, and `start`
/// retries.
fn free_port() -> io::Result<u16> {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}
