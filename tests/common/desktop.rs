//! The X side of a desktop, for tests that drive it through a VNC client (a browser with noVNC,
//! the gateway in between) and need to see what arrived: typed text, the pointer, the
//! clipboard. Works on any X display name (`":123"`): Xvnc, or the Xvfb behind x11vnc.
//!
//! These are test helpers: a broken fixture panics with the reason at the point of use instead
//! of handing the test an error to unwrap.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::xvnc::{output_within, require, run_on_display};

/// A guard against a hung test, not a timing assertion: what is waited for normally arrives in
/// milliseconds.
const WAIT_LIMIT: Duration = Duration::from_secs(60);
/// How often a file or X state written by another process is looked at. 20 ms is finer than
/// the latencies these tests care about (a key press reached a VNC desktop in ~25 ms here).
const POLL_EVERY: Duration = Duration::from_millis(20);
/// `xclip -o` answers at once unless the selection owner hangs.
const CLIPBOARD_READ_LIMIT: Duration = Duration::from_secs(5);

/// The xterm's place on the screen, from the X server (`xdotool getwindowgeometry`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowGeometry {
    pub x: i32,
    pub y: i32,
    pub width: u32,
    pub height: u32,
}

impl WindowGeometry {
    pub fn centre(&self) -> (i32, i32) {
        (
            self.x + self.width as i32 / 2,
            self.y + self.height as i32 / 2,
        )
    }
}

/// An 80x24 xterm at +0+0 holding the X input focus, whose terminal hands every byte it
/// receives to a file at once: what a VNC client typed, as the desktop got it.
///
/// The terminal runs `stty -icanon -isig -iexten -ixon -echo min 1 time 0` then `cat`: no line
/// buffering (each key is in the file without waiting for Enter), control keys arrive as
/// bytes (Ctrl+C is `\x03`, not a signal that would end the probe), nothing is echoed (the
/// window stays blank). ICRNL stays on, so Enter arrives as `\n`. Text is UTF-8 as the locale
/// of the test process makes it.
pub struct TypingProbe {
    display: String,
    xterm: Option<Child>,
    window: String,
    geometry: WindowGeometry,
    typed: PathBuf,
    _dir: tempfile::TempDir,
}

impl TypingProbe {
    /// Starts the xterm on `display` and returns once its terminal is in the mode above, the
    /// window is mapped and it has the input focus: every key the desktop receives from then on
    /// lands in the file.
    ///
    /// Also turns the display's key autorepeat off: on a loaded machine a key's release can
    /// reach the X server later than the repeat delay (660 ms), and the probe would see the key
    /// twice.
    pub async fn start(display: &str) -> TypingProbe {
        let display = display.to_owned();
        tokio::task::spawn_blocking(move || TypingProbe::start_blocking(&display))
            .await
            .expect("TypingProbe::start panicked")
    }

    fn start_blocking(display: &str) -> TypingProbe {
        require("xterm");
        require("xdotool");
        require("xset");
        static PROBES: AtomicU64 = AtomicU64::new(0);
        let title = format!(
            "vncgate-typing-probe-{}-{}",
            std::process::id(),
            PROBES.fetch_add(1, Ordering::Relaxed)
        );
        run_on_display(display, "xset", &["r", "off"]).expect("xset r off");

        let dir = tempfile::Builder::new()
            .prefix("typing-probe-")
            .tempdir()
            .expect("tempdir");
        let typed = dir.path().join("typed");
        std::fs::write(&typed, b"").expect("create the typed file");
        // The shell inside the xterm says it is ready through a FIFO, so there is an event to
        // wait for; a missing line in a file could only be polled.
        let ready = dir.path().join("ready");
        nix::unistd::mkfifo(
            &ready,
            nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
        )
        .expect("mkfifo");
        // Ready right after stty: keys that come before `cat` starts wait in the terminal,
        // already in non-canonical mode, and `cat` reads them first.
        let script = format!(
            "if stty -icanon -isig -iexten -ixon -echo min 1 time 0; then \
               printf ok > {ready}; exec cat >> {typed}; \
             else printf 'stty failed' > {ready}; fi",
            ready = shell_quote(&ready.to_string_lossy()),
            typed = shell_quote(&typed.to_string_lossy()),
        );
        let mut xterm = Command::new("xterm")
            .env("DISPLAY", display)
            .args(["-T", &title, "-geometry", "80x24+0+0"])
            .args(["-e", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn xterm");

        // Whichever comes first: the shell's word on the FIFO, or xterm's stderr closing (it
        // exited, e.g. it could not open the display), with what it said.
        let (tx, rx) = mpsc::channel::<Result<(), String>>();
        let fifo_tx = tx.clone();
        let fifo = ready.clone();
        thread::spawn(move || {
            let said = std::fs::read_to_string(&fifo);
            let _ = fifo_tx.send(match said {
                Ok(s) if s == "ok" => Ok(()),
                Ok(s) => Err(format!("the probe's shell said {s:?}")),
                Err(e) => Err(format!("reading {}: {e}", fifo.display())),
            });
        });
        let mut stderr = xterm.stderr.take().expect("piped stderr");
        thread::spawn(move || {
            let mut said = String::new();
            let _ = stderr.read_to_string(&mut said);
            let _ = tx.send(Err(format!("xterm exited: {said}")));
        });
        let outcome = rx
            .recv_timeout(WAIT_LIMIT)
            .unwrap_or_else(|_| Err(format!("no word from the xterm after {WAIT_LIMIT:?}")));
        if let Err(why) = outcome {
            let _ = xterm.kill();
            let _ = xterm.wait();
            // Releases the FIFO reader if nobody ever opened the FIFO for writing (an open for
            // writing that does not block succeeds because that reader is waiting).
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&ready);
            panic!("TypingProbe on {display}: {why}");
        }

        let mut probe = TypingProbe {
            display: display.to_owned(),
            xterm: Some(xterm),
            window: String::new(),
            geometry: WindowGeometry {
                x: 0,
                y: 0,
                width: 0,
                height: 0,
            },
            typed,
            _dir: dir,
        };
        // xterm may start its child before it maps the window: wait for it to be viewable
        // (`--sync` is xdotool's own wait), then give it the focus explicitly. With no window
        // manager the focus otherwise follows the pointer, which a test moves elsewhere.
        let search = xdotool(
            display,
            &[
                "search",
                "--sync",
                "--onlyvisible",
                "--name",
                &format!("^{title}$"),
            ],
        );
        probe.window = search
            .lines()
            .next()
            .expect("xdotool search printed the window")
            .to_owned();
        xdotool(display, &["windowfocus", "--sync", &probe.window]);
        let g = shell_vars(&xdotool(
            display,
            &["getwindowgeometry", "--shell", &probe.window],
        ));
        probe.geometry = WindowGeometry {
            x: g["X"],
            y: g["Y"],
            width: g["WIDTH"] as u32,
            height: g["HEIGHT"] as u32,
        };
        probe
    }

    pub fn display(&self) -> &str {
        &self.display
    }

    /// The xterm's X window id (decimal, as xdotool prints it).
    pub fn window_id(&self) -> &str {
        &self.window
    }

    pub fn geometry(&self) -> WindowGeometry {
        self.geometry
    }

    /// What the terminal received so far.
    pub fn contents(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.typed).unwrap_or_default()).into_owned()
    }

    /// Waits until what arrived contains `text`; returns everything that arrived. The file is
    /// written by another process and there is no event for that, so this polls it every 20 ms;
    /// it panics after 60 s with what did arrive.
    pub async fn wait_for(&self, text: &str) -> String {
        let deadline = Instant::now() + WAIT_LIMIT;
        loop {
            let got = self.contents();
            if got.contains(text) {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "the xterm on {} received {got:?}, not {text:?}, within {WAIT_LIMIT:?}",
                self.display
            );
            tokio::time::sleep(POLL_EVERY).await;
        }
    }
}

impl Drop for TypingProbe {
    fn drop(&mut self) {
        // The shell and cat get SIGHUP when the xterm's terminal goes away.
        if let Some(mut c) = self.xterm.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The X pointer's position on `display` (`xdotool getmouselocation`). A VNC client such as
/// noVNC draws the cursor itself, so this is where to look for pointer moves.
pub fn pointer_location(display: &str) -> (i32, i32) {
    require("xdotool");
    let v = shell_vars(&xdotool(display, &["getmouselocation", "--shell"]));
    (v["X"], v["Y"])
}

/// Waits until the X pointer on `display` is at `at`; polls every 20 ms (pointer moves raise no
/// event a test can subscribe to without an X connection of its own), panics after 60 s.
pub async fn wait_pointer_at(display: &str, at: (i32, i32)) {
    let deadline = Instant::now() + WAIT_LIMIT;
    loop {
        let now = pointer_location(display);
        if now == at {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the X pointer on {display} is at {now:?}, not {at:?}, after {WAIT_LIMIT:?}"
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Owns the CLIPBOARD and PRIMARY selections of a display while it lives: xclip serves a
/// selection only as long as its process runs. Dropping it stops both xclips (the selections
/// are then unowned, unless someone else took them already, in which case that xclip has
/// exited by itself).
pub struct Clipboard {
    owners: Vec<Child>,
}

impl Drop for Clipboard {
    fn drop(&mut self) {
        for mut c in self.owners.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Puts `text` on the CLIPBOARD and PRIMARY selections of `display`, as an X application
/// copying would; returns once both read back as `text`.
pub async fn clipboard_set(display: &str, text: &str) -> Clipboard {
    let (display, text) = (display.to_owned(), text.to_owned());
    let mut clipboard = Clipboard { owners: Vec::new() };
    for selection in ["clipboard", "primary"] {
        let (d, t) = (display.clone(), text.clone());
        let owner = tokio::task::spawn_blocking(move || own_selection(&d, selection, &t))
            .await
            .expect("own_selection panicked");
        clipboard.owners.push(owner);
        // xclip says it waits for requests before its request to own the selection has left
        // its output buffer (xclip.c flushes only when it blocks for the first event), so the
        // ownership is confirmed by reading it back. No X event reaches this process for
        // another client's flush: poll.
        let deadline = Instant::now() + WAIT_LIMIT;
        loop {
            let got = selection_get(&display, selection).await;
            if got.as_deref() == Some(text.as_str()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{selection} on {display} reads {got:?}, not {text:?}, after {WAIT_LIMIT:?}"
            );
            tokio::time::sleep(POLL_EVERY).await;
        }
    }
    clipboard
}

/// Starts `xclip -i` in the foreground (`-quiet`: otherwise it forks and the parent exits,
/// leaving nothing to stop) and waits for its "Waiting for selection requests" line.
fn own_selection(display: &str, selection: &str, text: &str) -> Child {
    require("xclip");
    let mut child = Command::new("xclip")
        .args(["-quiet", "-selection", selection, "-i"])
        .env("DISPLAY", display)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn xclip");
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin.write_all(text.as_bytes()).expect("write to xclip");
    drop(stdin);
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut said = Vec::new();
        let mut lines = BufReader::new(stderr).lines();
        for line in lines.by_ref() {
            let Ok(line) = line else { break };
            if line.starts_with("Waiting for selection requests") {
                let _ = tx.send(Ok(()));
                // xclip prints a line per request it serves: keep its stderr drained so it
                // never blocks on a full pipe.
                for _ in lines {}
                return;
            }
            said.push(line);
        }
        let _ = tx.send(Err(said.join("\n")));
    });
    match rx.recv_timeout(WAIT_LIMIT) {
        Ok(Ok(())) => child,
        outcome => {
            let _ = child.kill();
            let status = child.wait();
            panic!(
                "xclip -selection {selection} on {display} did not start ({status:?}): {outcome:?}"
            )
        }
    }
}

/// The CLIPBOARD selection of `display` as text; `None` when nobody owns it, it is empty, or
/// its owner does not answer within 5 s.
pub async fn clipboard_get(display: &str) -> Option<String> {
    selection_get(display, "clipboard").await
}

/// `clipboard_get` for the PRIMARY selection.
pub async fn primary_get(display: &str) -> Option<String> {
    selection_get(display, "primary").await
}

/// Off the runtime's worker thread: when the owner is Xvnc holding a VNC client's clipboard,
/// Xvnc asks that client for the data, and the client may be a task of this very runtime.
async fn selection_get(display: &str, selection: &'static str) -> Option<String> {
    require("xclip");
    let display = display.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new("xclip");
        cmd.args(["-o", "-selection", selection])
            .env("DISPLAY", &display);
        let out = output_within(&mut cmd, CLIPBOARD_READ_LIMIT).ok()?;
        (out.status.success() && !out.stdout.is_empty())
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    })
    .await
    .expect("xclip -o task")
}

fn xdotool(display: &str, args: &[&str]) -> String {
    let out = run_on_display(display, "xdotool", args).unwrap_or_else(|e| panic!("{e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `KEY=number` lines, as `xdotool ... --shell` prints them.
fn shell_vars(text: &str) -> std::collections::HashMap<String, i32> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .filter_map(|(k, v)| Some((k.to_owned(), v.trim().parse().ok()?)))
        .collect()
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
