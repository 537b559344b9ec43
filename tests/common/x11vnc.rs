//! A second real VNC server: x11vnc (LibVNCServer) serving an Xvfb display. Its RFB
//! implementation is not TigerVNC's (other encodings, other quirks, no blacklist), so a
//! gateway feature checked against both is not tuned to one server.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::xvnc::{
    await_stdout_line, free_port, package_hint, pick_display, set_root_color_on, stop_x_server,
    with_package,
};

/// Both servers were ready in well under a second here; the margin is for a loaded CI machine.
const READY_DEADLINE: Duration = Duration::from_secs(20);
/// Each attempt picks a fresh display (Xvfb) or port (x11vnc); retries absorb races with
/// other servers taking them between the pick and the bind.
const ATTEMPTS: usize = 8;

pub struct X11vnc {
    pub display: u32,
    pub rfb_port: u16,
    pub geometry: (u16, u16),
    /// The RFB desktop name x11vnc announces (`-desktop`).
    pub desktop_name: String,
    /// From spawning Xvfb to x11vnc reporting its listening port.
    pub startup_time: Duration,
    x11vnc: Option<Child>,
    xvfb: Option<Child>,
    xvfb_log: tempfile::NamedTempFile,
    x11vnc_log: tempfile::NamedTempFile,
}

impl X11vnc {
    pub fn available() -> bool {
        super::xvnc::find_program("Xvfb").is_some() && super::xvnc::find_program("x11vnc").is_some()
    }

    /// An Xvfb of `geometry` (24-bit) on a free display, and x11vnc serving it on a free
    /// 127.0.0.1 port with security None. Returns once x11vnc accepts RFB connections.
    ///
    /// Readiness is each server's own signal, no polling: Xvfb writes its display number to
    /// `-displayfd` once it accepts X clients, and x11vnc prints `PORT=NNNN` on stdout once its
    /// listening socket is open.
    pub fn start(geometry: (u16, u16)) -> io::Result<X11vnc> {
        let started = Instant::now();
        let xvfb_log = log_file("xvfb-")?;
        let x11vnc_log = log_file("x11vnc-")?;
        let (display, xvfb) = start_xvfb(geometry, &xvfb_log)?;
        let mut fixture = X11vnc {
            display,
            rfb_port: 0,
            geometry,
            desktop_name: format!("x11vnc :{display}"),
            startup_time: Duration::ZERO,
            x11vnc: None,
            xvfb: Some(xvfb),
            xvfb_log,
            x11vnc_log,
        };
        // On an error below, dropping `fixture` stops Xvfb.
        let mut last = io::Error::other("x11vnc was not started");
        for _ in 0..ATTEMPTS {
            let port = free_port()?;
            match fixture.try_start_x11vnc(port) {
                Ok(child) => {
                    fixture.x11vnc = Some(child);
                    fixture.rfb_port = port;
                    fixture.startup_time = started.elapsed();
                    return Ok(fixture);
                }
                Err(Failure::Retry(e)) => last = e,
                Err(Failure::Fatal(e)) => return Err(e),
            }
        }
        Err(last)
    }

    /// `start` off the async runtime's worker thread.
    pub async fn start_async(geometry: (u16, u16)) -> io::Result<X11vnc> {
        tokio::task::spawn_blocking(move || X11vnc::start(geometry))
            .await
            .map_err(io::Error::other)?
    }

    fn try_start_x11vnc(&self, port: u16) -> Result<Child, Failure> {
        let stderr = self.x11vnc_log.reopen().map_err(Failure::Fatal)?;
        let mut child = Command::new("x11vnc")
            .args(["-display", &self.display_name()])
            .args(["-rfbport", &port.to_string()])
            // `-localhost` alone still listened on [::] here; with `-noipv6` it is 127.0.0.1
            // only (and implies `-listen localhost`).
            .args(["-localhost", "-noipv6"])
            // Serve many clients, one after the other and at once, like a desktop in a farm.
            .args(["-forever", "-shared"])
            // No password on purpose (security None) and no warning banner about it; no
            // ~/.x11vncrc from whoever runs the tests; less chatter in the log.
            .args(["-nopw", "-norc", "-quiet"])
            .args(["-desktop", &self.desktop_name])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .map_err(|e| Failure::Fatal(with_package(e, "x11vnc", package_hint("x11vnc"))))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let want = format!("PORT={port}");
        let port_line = await_stdout_line(stdout, |l| l.starts_with("PORT="));
        match port_line.recv_timeout(READY_DEADLINE) {
            Ok(Ok(Some(line))) if line == want => Ok(child),
            Ok(Ok(Some(line))) => {
                kill_now(child);
                Err(Failure::Fatal(io::Error::other(format!(
                    "x11vnc reported {line:?}, expected {want}"
                ))))
            }
            Ok(Ok(None)) => {
                // Exited before listening: with an explicit -rfbport that is "could not obtain
                // listening port", i.e. someone took the port meanwhile.
                let status = child.wait();
                Err(Failure::Retry(io::Error::other(format!(
                    "x11vnc on {} (rfbport {port}) exited before listening ({status:?}):\n{}",
                    self.display_name(),
                    self.log_tail(2000)
                ))))
            }
            Ok(Err(e)) => {
                kill_now(child);
                Err(Failure::Fatal(e))
            }
            Err(_) => {
                kill_now(child);
                Err(Failure::Fatal(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "x11vnc not listening after {READY_DEADLINE:?}:\n{}",
                        self.log_tail(2000)
                    ),
                )))
            }
        }
    }

    pub fn rfb_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.rfb_port))
    }

    /// The `DISPLAY` value of the Xvfb, e.g. `:123`.
    pub fn display_name(&self) -> String {
        format!(":{}", self.display)
    }

    /// Paints Xvfb's root window. Unlike Xvnc, x11vnc is an ordinary X client that finds changes
    /// by polling the screen (about every 20-30 ms), so an RFB client sees the colour shortly
    /// after this returns, not necessarily in an update already under way.
    pub fn set_root_color(&self, hex: &str) -> io::Result<()> {
        set_root_color_on(&self.display_name(), hex)
    }

    /// The last `max_bytes` of x11vnc's and Xvfb's stderr, for failure messages.
    pub fn log_tail(&self, max_bytes: usize) -> String {
        format!(
            "--- x11vnc ---\n{}\n--- Xvfb ---\n{}",
            tail(&self.x11vnc_log, max_bytes),
            tail(&self.xvfb_log, max_bytes)
        )
    }
}

impl Drop for X11vnc {
    fn drop(&mut self) {
        // x11vnc first: it is a client of the Xvfb. SIGKILL: it leaves no files behind, and on
        // SIGTERM it took 1.1-1.7 s to exit here (sometimes over 5 s), for a clean-up that only
        // matters to a display that outlives it.
        if let Some(child) = self.x11vnc.take() {
            kill_now(child);
        }
        if let Some(child) = self.xvfb.take() {
            stop_x_server(child, self.display);
        }
    }
}

enum Failure {
    /// Exited before it was ready: most likely the display or port was taken meanwhile.
    Retry(io::Error),
    Fatal(io::Error),
}

fn kill_now(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn log_file(prefix: &str) -> io::Result<tempfile::NamedTempFile> {
    tempfile::Builder::new()
        .prefix(prefix)
        .suffix(".log")
        .tempfile()
}

fn tail(log: &tempfile::NamedTempFile, max_bytes: usize) -> String {
    let text = std::fs::read(log.path()).unwrap_or_default();
    let start = text.len().saturating_sub(max_bytes);
    String::from_utf8_lossy(&text[start..]).into_owned()
}

/// Xvfb on a free display, ready for X clients (its `-displayfd` line has arrived).
fn start_xvfb(geometry: (u16, u16), log: &tempfile::NamedTempFile) -> io::Result<(u32, Child)> {
    let mut last = io::Error::other("Xvfb was not started");
    for _ in 0..ATTEMPTS {
        let display = pick_display()?;
        let mut child = Command::new("Xvfb")
            .arg(format!(":{display}"))
            .args(["-displayfd", "1"])
            .args(["-screen", "0", &format!("{}x{}x24", geometry.0, geometry.1)])
            .args(["-nolisten", "tcp"])
            // No server reset when the last client disconnects: the root colour and keymap
            // must outlive the short X clients (xsetroot, xdotool) a test runs.
            .arg("-noreset")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log.reopen()?))
            .spawn()
            .map_err(|e| with_package(e, "Xvfb", package_hint("Xvfb")))?;
        let stdout = child.stdout.take().expect("piped stdout");
        match await_stdout_line(stdout, |_| true).recv_timeout(READY_DEADLINE) {
            Ok(Ok(Some(line))) if line.trim() == display.to_string() => {
                return Ok((display, child));
            }
            Ok(Ok(None)) => {
                // Exited before it was ready: the display was most likely taken meanwhile.
                let status = child.wait();
                last = io::Error::other(format!(
                    "Xvfb :{display} exited before it was ready ({status:?}):\n{}",
                    tail(log, 2000)
                ));
            }
            Ok(Ok(Some(line))) => {
                stop_x_server(child, display);
                return Err(io::Error::other(format!(
                    "Xvfb reported display {line:?}, expected {display}"
                )));
            }
            Ok(Err(e)) => {
                stop_x_server(child, display);
                return Err(e);
            }
            Err(_) => {
                stop_x_server(child, display);
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "Xvfb :{display} not ready after {READY_DEADLINE:?}:\n{}",
                        tail(log, 2000)
                    ),
                ));
            }
        }
    }
    Err(last)
}
