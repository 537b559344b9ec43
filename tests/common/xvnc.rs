//! A real TigerVNC `Xvnc` per test: the backend the gateway exists for, with its own RFB
//! implementation quirks that the in-process fixture cannot imitate.
//!
//! `Xvnc::start` is the historical entry point (security None, always shared); the builder
//! (`Xvnc::builder()`) adds the security setups real desktops run with: VNC Authentication,
//! TigerVNC's own default (`TLSVnc,VncAuth`, nothing weakened) and VeNCrypt X509Vnc with a
//! certificate from a per-fixture CA.
//!
//! This file is also mounted on its own (`#[path]`) by `fixtures_selftest.rs`, so it uses nothing
//! from its sibling modules; the other X fixtures (`x11vnc.rs`, `desktop.rs`) build on the process
//! helpers at the end of this file instead.

use std::collections::hash_map::RandomState;
use std::ffi::OsStr;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::Mutex;
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
    security: Security,
    /// Programs started with `spawn_on_display`; stopped before Xvnc (see `Drop`).
    on_display: Mutex<Vec<Child>>,
    /// Password file and certificates; removed when the fields drop, i.e. after `Drop::drop`
    /// has stopped Xvnc.
    secrets: Option<Secrets>,
}

/// How Xvnc authenticates RFB clients. Passwords longer than 8 bytes work but only their first
/// 8 bytes count: VNC Authentication's DES key is 8 bytes (`vncpasswd` truncates).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Security {
    /// `-SecurityTypes None`: what `Xvnc::start` has always run.
    None,
    /// `-SecurityTypes VncAuth -PasswordFile F`: security types list `[2]`.
    VncAuth { password: String },
    /// No `-SecurityTypes` flag at all, only `-PasswordFile F`: TigerVNC's own default
    /// `TLSVnc,VncAuth` (types `[19, 2]`), i.e. what a user who changed nothing runs,
    /// blacklist included.
    Default { password: String },
    /// `-SecurityTypes X509Vnc` (types `[19]`, VeNCrypt subtype 261) with a server certificate
    /// for `localhost` and `127.0.0.1` signed by a CA made for this fixture (`Xvnc::ca_file`).
    X509Vnc { password: String },
}

impl Security {
    pub fn password(&self) -> Option<&str> {
        match self {
            Security::None => None,
            Security::VncAuth { password }
            | Security::Default { password }
            | Security::X509Vnc { password } => Some(password),
        }
    }
}

/// `Xvnc::builder().name(..).geometry(..).security(..).always_shared(..).start_async().await`.
#[derive(Clone, Debug)]
pub struct XvncBuilder {
    name: String,
    geometry: (u16, u16),
    security: Security,
    always_shared: bool,
}

impl Default for XvncBuilder {
    fn default() -> Self {
        XvncBuilder {
            name: "vncgate test desktop".into(),
            geometry: (1024, 768),
            security: Security::None,
            // Off: the gateway asks for a shared session itself (ClientInit shared=1), and a
            // test of that needs a server that does not force it.
            always_shared: false,
        }
    }
}

impl XvncBuilder {
    /// The RFB desktop name (`-desktop`).
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.to_owned();
        self
    }

    pub fn geometry(mut self, geometry: (u16, u16)) -> Self {
        self.geometry = geometry;
        self
    }

    pub fn security(mut self, security: Security) -> Self {
        self.security = security;
        self
    }

    /// `-AlwaysShared`: treat every client as shared whatever its ClientInit says.
    pub fn always_shared(mut self, always_shared: bool) -> Self {
        self.always_shared = always_shared;
        self
    }

    /// Starts Xvnc on a free display and 127.0.0.1 port and returns once it is accepting both
    /// X11 and RFB connections (see `Xvnc::start`).
    pub fn start(self) -> io::Result<Xvnc> {
        // Made once: they do not depend on the display or port a retry changes.
        let secrets = Secrets::prepare(&self.security)?;
        let mut last = io::Error::other("Xvnc was not started");
        for _ in 0..ATTEMPTS {
            let display = pick_display()?;
            let port = free_port()?;
            match Xvnc::try_start(&self, secrets.as_ref(), display, port) {
                Ok(mut x) => {
                    x.secrets = secrets;
                    return Ok(x);
                }
                Err(Failure::Retry(e)) => last = e,
                Err(Failure::Fatal(e)) => return Err(e),
            }
        }
        Err(last)
    }

    /// `start` off the async runtime's worker thread.
    pub async fn start_async(self) -> io::Result<Xvnc> {
        tokio::task::spawn_blocking(move || self.start())
            .await
            .map_err(io::Error::other)?
    }
}

/// Files Xvnc reads at startup, in a private directory the fixture owns (mode 0700; the
/// password file and key 0600, as `vncpasswd` itself would write them).
struct Secrets {
    dir: tempfile::TempDir,
    password_file: PathBuf,
    x509: Option<X509Files>,
}

struct X509Files {
    ca_file: PathBuf,
    cert_file: PathBuf,
    key_file: PathBuf,
    ca_der: Vec<u8>,
}

impl Secrets {
    fn prepare(security: &Security) -> io::Result<Option<Secrets>> {
        let Some(password) = security.password() else {
            return Ok(None);
        };
        let dir = tempfile::Builder::new()
            .prefix("xvnc-secrets-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir()?;
        let password_file = dir.path().join("passwd");
        write_private(&password_file, &obfuscated_password(password)?)?;
        let x509 = match security {
            Security::X509Vnc { .. } => Some(write_x509(dir.path())?),
            _ => None,
        };
        Ok(Some(Secrets {
            dir,
            password_file,
            x509,
        }))
    }
}

/// The password file format Xvnc reads: what `vncpasswd -f` prints for the password on stdin
/// (8 bytes, DES-obfuscated). Made by the real tool rather than reimplemented here.
fn obfuscated_password(password: &str) -> io::Result<Vec<u8>> {
    let mut child = Command::new("vncpasswd")
        .arg("-f")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| with_package(e, "vncpasswd", "tigervnc-tools"))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    // A few bytes: they fit in the pipe, so writing before reading cannot deadlock.
    stdin.write_all(format!("{password}\n").as_bytes())?;
    drop(stdin);
    let out = child.wait_with_output()?;
    if out.status.success() && out.stdout.len() == 8 {
        Ok(out.stdout)
    } else {
        Err(io::Error::other(format!(
            "vncpasswd -f ({}) wrote {} bytes, expected 8 (is the password empty?): {}",
            out.status,
            out.stdout.len(),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?
        .write_all(bytes)
}

/// A CA made for this one fixture and a server certificate it signed for `localhost` and
/// `127.0.0.1` (both SANs, so a client may verify either name). A real CA rather than a
/// self-signed leaf: that is how an X509Vnc farm is deployed, and it is what the gateway's
/// trust configuration has to handle.
fn write_x509(dir: &Path) -> io::Result<X509Files> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().map_err(io::Error::other)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(io::Error::other)?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "vncgate test VNC CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(io::Error::other)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().map_err(io::Error::other)?;
    let mut params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .map_err(io::Error::other)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params
        .signed_by(&server_key, &issuer)
        .map_err(io::Error::other)?;

    let files = X509Files {
        ca_file: dir.join("ca.pem"),
        cert_file: dir.join("cert.pem"),
        key_file: dir.join("key.pem"),
        ca_der: ca_cert.der().to_vec(),
    };
    std::fs::write(&files.ca_file, ca_cert.pem())?;
    std::fs::write(&files.cert_file, cert.pem())?;
    write_private(&files.key_file, server_key.serialize_pem().as_bytes())?;
    Ok(files)
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

    /// A builder for the other setups: security type, desktop name, geometry, `-AlwaysShared`.
    pub fn builder() -> XvncBuilder {
        XvncBuilder::default()
    }

    /// Starts Xvnc on a free display and 127.0.0.1 port and returns once it is accepting both
    /// X11 and RFB connections. Readiness is Xvnc's own signal: with `-displayfd 1` it writes
    /// the display number to its stdout (a pipe here) after every listener is open.
    ///
    /// Security None and `-AlwaysShared`, as every test written before the builder expects.
    pub fn start(desktop_name: &str, geometry: (u16, u16)) -> io::Result<Xvnc> {
        Xvnc::builder()
            .name(desktop_name)
            .geometry(geometry)
            .security(Security::None)
            .always_shared(true)
            .start()
    }

    /// `start` off the async runtime's worker thread.
    pub async fn start_async(desktop_name: &str, geometry: (u16, u16)) -> io::Result<Xvnc> {
        let name = desktop_name.to_owned();
        tokio::task::spawn_blocking(move || Xvnc::start(&name, geometry))
            .await
            .map_err(io::Error::other)?
    }

    fn try_start(
        opts: &XvncBuilder,
        secrets: Option<&Secrets>,
        display: u32,
        port: u16,
    ) -> Result<Xvnc, Failure> {
        let log = tempfile::Builder::new()
            .prefix("xvnc-")
            .suffix(".log")
            .tempfile()
            .map_err(Failure::Fatal)?;
        let stderr = log.reopen().map_err(Failure::Fatal)?;
        let (width, height) = opts.geometry;
        let mut cmd = Command::new(XVNC);
        cmd.arg(format!(":{display}"))
            .args(["-displayfd", "1"])
            .args(["-desktop", &opts.name])
            .args(["-geometry", &format!("{width}x{height}")])
            .args(["-depth", "24"])
            .args(["-rfbport", &port.to_string()])
            .args(["-interface", "127.0.0.1"])
            .args(["-nolisten", "tcp"]);
        // Only the flags each setup needs: nothing here turns off a protection Xvnc has by
        // default (no blacklist flag of any kind), so tests meet the real server.
        match (&opts.security, secrets) {
            (Security::None, _) => {
                cmd.args(["-SecurityTypes", "None"]);
            }
            (Security::VncAuth { .. }, Some(s)) => {
                cmd.args(["-SecurityTypes", "VncAuth"])
                    .arg("-PasswordFile")
                    .arg(&s.password_file);
            }
            (Security::Default { .. }, Some(s)) => {
                cmd.arg("-PasswordFile").arg(&s.password_file);
            }
            (Security::X509Vnc { .. }, Some(s @ Secrets { x509: Some(x), .. })) => {
                cmd.args(["-SecurityTypes", "X509Vnc"])
                    .arg("-X509Cert")
                    .arg(&x.cert_file)
                    .arg("-X509Key")
                    .arg(&x.key_file)
                    .arg("-PasswordFile")
                    .arg(&s.password_file);
            }
            (security, _) => {
                return Err(Failure::Fatal(io::Error::other(format!(
                    "no password file or certificate prepared for {security:?}"
                ))));
            }
        }
        if opts.always_shared {
            cmd.arg("-AlwaysShared");
        }
        let started = Instant::now();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .map_err(|e| Failure::Fatal(with_package(e, XVNC, "tigervnc-standalone-server")))?;

        let Some(stdout) = child.stdout.take() else {
            stop(child, display);
            return Err(Failure::Fatal(io::Error::other(
                "Xvnc stdout was not piped",
            )));
        };
        let first_line = await_stdout_line(stdout, |_| true);

        let outcome = first_line.recv_timeout(READY_DEADLINE);
        let startup_time = started.elapsed();
        let mut xvnc = Xvnc {
            display,
            rfb_port: port,
            desktop_name: opts.name.clone(),
            geometry: opts.geometry,
            startup_time,
            child: Some(child),
            log,
            security: opts.security.clone(),
            on_display: Mutex::new(Vec::new()),
            secrets: None,
        };
        match outcome {
            Ok(Ok(Some(line))) if line.trim() == display.to_string() => Ok(xvnc),
            Ok(Ok(None)) => {
                // Reaped here and taken out, so Drop never signals a pid that may be reused.
                let status = xvnc.child.take().map(|mut c| c.wait());
                Err(Failure::Retry(io::Error::other(format!(
                    "Xvnc :{display} (rfbport {port}) exited before it was ready ({status:?}):\n{}",
                    xvnc.log_tail(2000)
                ))))
            }
            Ok(Ok(Some(line))) => Err(Failure::Fatal(io::Error::other(format!(
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

    /// Xvnc's process id (e.g. to SIGKILL it as a crash would).
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .expect("a started Xvnc has its child until it is dropped")
    }

    pub fn security(&self) -> &Security {
        &self.security
    }

    /// The password of every setup but `Security::None`.
    pub fn password(&self) -> Option<&str> {
        self.security.password()
    }

    /// The `-PasswordFile` Xvnc reads (`vncpasswd -f` format).
    pub fn password_file(&self) -> Option<&Path> {
        self.secrets.as_ref().map(|s| s.password_file.as_path())
    }

    /// `Security::X509Vnc`: the PEM file of the CA that signed Xvnc's certificate, for a client
    /// (or the gateway's backend TLS config) to trust.
    pub fn ca_file(&self) -> Option<&Path> {
        self.x509().map(|x| x.ca_file.as_path())
    }

    /// `Security::X509Vnc`: the same CA certificate in DER.
    pub fn ca_der(&self) -> Option<&[u8]> {
        self.x509().map(|x| x.ca_der.as_slice())
    }

    fn x509(&self) -> Option<&X509Files> {
        self.secrets.as_ref().and_then(|s| s.x509.as_ref())
    }

    /// The directory holding the password file and certificates (removed on drop).
    pub fn secrets_dir(&self) -> Option<&Path> {
        self.secrets.as_ref().map(|s| s.dir.path())
    }

    /// Paints the root window; the change is in Xvnc's framebuffer when this returns because
    /// xsetroot waits for the server to process its requests before it exits.
    pub fn set_root_color(&self, hex: &str) -> io::Result<()> {
        set_root_color_on(&self.display_name(), hex)
    }

    /// Whether Xvnc's log (its stderr, so far) contains `needle`. Xvnc wraps long messages onto
    /// an indented continuation line: match a short fragment.
    pub fn log_contains(&self, needle: &str) -> bool {
        self.log_text().contains(needle)
    }

    /// Whether Xvnc's blacklist has refused a peer. It logs `Connections: blacklisted: ADDR`
    /// (TigerVNC 1.12; later releases capitalise "Blacklisted") before it writes the refusal
    /// (`RFB 003.003`, "Too many security failures") to the peer, so once a client has read
    /// that refusal this is true.
    pub fn blacklisted(&self) -> bool {
        self.log_text()
            .to_ascii_lowercase()
            .contains("connections: blacklisted")
    }

    /// Starts `program` as an X client of this desktop (`DISPLAY` set, stdio to /dev/null) and
    /// returns its pid; it is killed before Xvnc stops, when the fixture is dropped.
    pub fn spawn_on_display<S: AsRef<OsStr>>(&self, program: &str, args: &[S]) -> io::Result<u32> {
        let child = Command::new(program)
            .args(args)
            .env("DISPLAY", self.display_name())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| with_package(e, program, package_hint(program)))?;
        let pid = child.id();
        self.on_display
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child);
        Ok(pid)
    }

    /// Runs `program` against this desktop to completion (at most `RUN_DEADLINE`), e.g.
    /// `xdotool`; a non-zero exit is an error carrying its stderr.
    pub fn run_on_display<S: AsRef<OsStr>>(&self, program: &str, args: &[S]) -> io::Result<Output> {
        run_on_display(&self.display_name(), program, args)
    }

    fn log_text(&self) -> String {
        let mut text = Vec::new();
        if let Ok(mut f) = self.log.reopen() {
            let _ = f.read_to_end(&mut text);
        }
        String::from_utf8_lossy(&text).into_owned()
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
        // Clients first: they would die with their X server anyway, but only a wait reaps them.
        let clients = std::mem::take(self.on_display.get_mut().unwrap_or_else(|e| e.into_inner()));
        for mut c in clients {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(child) = self.child.take() {
            stop(child, self.display);
        }
    }
}

/// SIGTERM first: Xvnc then removes its X socket itself, whereas SIGKILL would leave it behind
/// and use up display numbers. SIGKILL only if it does not exit in time.
fn stop(child: Child, display: u32) {
    stop_x_server(child, display)
}

/// `stop` for any X server child of a fixture (Xvnc, Xvfb).
pub fn stop_x_server(child: Child, display: u32) {
    if terminate(child, EXIT_DEADLINE) {
        remove_display_files(display);
    }
}

/// SIGTERM, then SIGKILL if `child` has not exited within `grace`; reaps it. Returns whether
/// SIGKILL was needed (the process had no chance to clean up after itself).
pub fn terminate(mut child: Child, grace: Duration) -> bool {
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
        return true;
    }
    let (tx, rx) = mpsc::channel();
    let waiter = thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    if rx.recv_timeout(grace).is_err() {
        // The waiter has not reaped it, so the pid still names our child.
        let _ = Command::new("kill").args(["-KILL", &pid]).status();
        let _ = waiter.join();
        true
    } else {
        let _ = waiter.join();
        false
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
pub fn pick_display() -> io::Result<u32> {
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
pub fn free_port() -> io::Result<u16> {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

// ------------------------------------------------------------------------------------------
// Process helpers shared by the X fixtures (`x11vnc.rs`, `desktop.rs`).

/// Bounds one short X client run (xdotool, xsetroot, xclip -o): they take milliseconds; this
/// only turns a hang into a failure.
pub const RUN_DEADLINE: Duration = Duration::from_secs(20);

/// The Debian package that ships `program`, for "install X" messages.
pub fn package_hint(program: &str) -> &'static str {
    match Path::new(program).file_name().and_then(OsStr::to_str) {
        Some("Xvnc" | "Xtigervnc") => "tigervnc-standalone-server",
        Some("vncpasswd") => "tigervnc-tools",
        Some("Xvfb") => "xvfb",
        Some("x11vnc") => "x11vnc",
        Some("xterm") => "xterm",
        Some("xdotool") => "xdotool",
        Some("xclip") => "xclip",
        Some("xsetroot" | "xset") => "x11-xserver-utils",
        _ => "the one that ships it",
    }
}

/// The path of `program` on `PATH` (or itself, if it is a path to a file).
pub fn find_program(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Path::new(program).is_file().then(|| PathBuf::from(program));
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// Panics, naming the package to install, when `program` is missing: a test that needs it
/// must fail rather than skip.
pub fn require(program: &str) -> PathBuf {
    find_program(program).unwrap_or_else(|| {
        panic!(
            "{program} not found: install the Debian package {}",
            package_hint(program)
        )
    })
}

/// A spawn error that says which package to install when the program is missing.
pub fn with_package(e: io::Error, program: &str, package: &str) -> io::Error {
    if e.kind() == io::ErrorKind::NotFound {
        io::Error::new(
            e.kind(),
            format!("{program} not found ({e}): install the Debian package {package}"),
        )
    } else {
        e
    }
}

/// Runs `cmd` to completion with its output collected; kills it if it is still running after
/// `limit`. The pipes reach EOF when it exits, which is the event waited for, so the child is
/// never reaped behind our back and the kill cannot hit a reused pid.
pub fn output_within(cmd: &mut Command, limit: Duration) -> io::Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let (tx, rx) = mpsc::channel();
    let stdout: Box<dyn Read + Send> = Box::new(child.stdout.take().expect("piped stdout"));
    let stderr: Box<dyn Read + Send> = Box::new(child.stderr.take().expect("piped stderr"));
    let readers: Vec<_> = [stdout, stderr]
        .into_iter()
        .enumerate()
        .map(|(i, mut pipe)| {
            let tx = tx.clone();
            thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = pipe.read_to_end(&mut buf);
                let _ = tx.send((i, buf));
            })
        })
        .collect();
    drop(tx);
    let deadline = Instant::now() + limit;
    let mut out = [Vec::new(), Vec::new()];
    for _ in 0..2 {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok((i, buf)) => out[i] = buf,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                for r in readers {
                    let _ = r.join();
                }
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{cmd:?} still running after {limit:?}"),
                ));
            }
        }
    }
    let status = child.wait()?;
    for r in readers {
        let _ = r.join();
    }
    let [stdout, stderr] = out;
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Runs an X client against `display` to completion (`RUN_DEADLINE`); a non-zero exit is an
/// error carrying its stderr.
pub fn run_on_display<S: AsRef<OsStr>>(
    display: &str,
    program: &str,
    args: &[S],
) -> io::Result<Output> {
    let mut cmd = Command::new(program);
    cmd.args(args).env("DISPLAY", display);
    let out = output_within(&mut cmd, RUN_DEADLINE)
        .map_err(|e| with_package(e, program, package_hint(program)))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(io::Error::other(format!(
            "{program} {:?} on {display} failed ({}): {}",
            args.iter().map(|a| a.as_ref()).collect::<Vec<_>>(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Paints the root window of `display`; the change is in the X server's framebuffer when this
/// returns because xsetroot waits for the server to process its requests before it exits.
pub fn set_root_color_on(display: &str, hex: &str) -> io::Result<()> {
    let out = Command::new("xsetroot")
        .args(["-display", display, "-solid", hex])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| with_package(e, "xsetroot", "x11-xserver-utils"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "xsetroot -solid {hex} on {display} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Reads a child's stdout line by line on a thread and reports the first line that satisfies
/// `pred` (`Ok(None)`: EOF first, i.e. the child exited or closed stdout). The thread then keeps
/// the pipe open and empty for the child's whole life: a closed pipe would turn any later write
/// to its stdout into SIGPIPE, a full one would block it.
pub fn await_stdout_line(
    stdout: ChildStdout,
    pred: impl Fn(&str) -> bool + Send + 'static,
) -> mpsc::Receiver<io::Result<Option<String>>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) => {
                    let _ = tx.send(Ok(None));
                    return;
                }
                Ok(_) if pred(line.trim_end()) => {
                    let _ = tx.send(Ok(Some(line.trim_end().to_owned())));
                    break;
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        }
        let _ = io::copy(&mut reader, &mut io::sink());
    });
    rx
}
