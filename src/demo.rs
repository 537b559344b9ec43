//! `vncgate demo`: a zero-setup local run. Embedded store, a fresh random secret, a plain
//! listener, one backend; prints a ready-to-use URL. Without `--backend`, and with TigerVNC's
//! `Xvnc` installed, it starts a throwaway desktop (with an xterm when available) and stops it on
//! exit (the children get SIGTERM when vncgate dies, via `PR_SET_PDEATHSIG`).
//!
//! The desktop runs with TigerVNC's defaults (VNC password, blacklist on), as a user's would:
//! the gateway terminates RFB, answers the password itself (the browser never sees it) and
//! health-checks with authenticated RFB handshakes, so nothing gets it blacklisted.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::RngCore;

use crate::auth::mint::{TokenRequest, mint_hs256};
use crate::cli::{EXIT_RUNTIME, EXIT_USAGE};
use crate::config::Config;
use crate::server::{self, RunOptions};

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// The VNC server (raw RFB) to put behind the gateway. Default: a throwaway Xvnc desktop
    /// when Xvnc is installed, else 127.0.0.1:5901.
    #[arg(long)]
    pub backend: Option<String>,
    #[arg(long, default_value = "127.0.0.1:6080")]
    pub listen: SocketAddr,
    /// Directory served as the web viewer. Default: ./web when it exists.
    #[arg(long)]
    pub web_root: Option<PathBuf>,
}

const SECRET_ENV: &str = "VNCGATE_JWT_SECRET";
const VNC_PASSWORD_ENV: &str = "VNCGATE_DEMO_VNC_PASSWORD";

pub fn run(args: DemoArgs) -> i32 {
    let mut children = Vec::new();
    let mut vnc_password = None;
    let backend = match args.backend.clone() {
        Some(b) => b,
        None => match start_desktop() {
            Ok(desktop) => {
                children = desktop.kids;
                vnc_password = desktop.password;
                desktop.addr
            }
            Err(why) => {
                eprintln!(
                    "note: {why}; using 127.0.0.1:5901 (start a VNC server there, or pass --backend HOST:PORT)"
                );
                "127.0.0.1:5901".to_owned()
            }
        },
    };
    let web_root = args
        .web_root
        .clone()
        .or_else(|| Some(PathBuf::from("web")).filter(|p| p.is_dir()));
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let secret: String = secret.iter().map(|b| format!("{b:02x}")).collect();

    let yaml = demo_yaml(
        &args.listen,
        &backend,
        web_root.as_deref(),
        vnc_password.is_some(),
    );
    let env = |name: &str| match name {
        SECRET_ENV => Some(secret.clone()),
        VNC_PASSWORD_ENV => vnc_password.clone(),
        _ => None,
    };
    let config = match Config::from_yaml(&yaml, &env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return EXIT_USAGE;
        }
    };
    let request = TokenRequest {
        sub: "demo".into(),
        sid: Some("demo".into()),
        ttl: Duration::from_secs(12 * 3600),
        ..Default::default()
    };
    let token = match mint_hs256(secret.as_bytes(), &request) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("signing the demo token failed: {e}");
            return EXIT_RUNTIME;
        }
    };
    let shown = if args.listen.ip().is_unspecified() {
        SocketAddr::new([127, 0, 0, 1].into(), args.listen.port())
    } else {
        args.listen
    };
    println!("vncgate demo: backend {backend}");
    if web_root.is_some() {
        println!("open   http://{shown}/#token={token}");
    } else {
        println!("no ./web directory (run `npm ci` in the repository for the viewer page)");
    }
    println!("noVNC: ws://{shown}/websockify?token={token}");
    println!("token: {token}");
    crate::telemetry::init(config.logging.format, &config.logging.level);
    // `server::run` returns only when the server fails to start; on a signal Pingora exits the
    // process without running destructors, and the desktop dies through PR_SET_PDEATHSIG.
    let result = server::run(config, RunOptions::default());
    drop(children);
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{e}");
            EXIT_RUNTIME
        }
    }
}

fn demo_yaml(
    listen: &SocketAddr,
    backend: &str,
    web_root: Option<&Path>,
    with_password: bool,
) -> String {
    // Terminate mode either way: with the demo desktop's password the gateway logs in itself;
    // against `--backend` without one, a password-protected server's challenge goes to the
    // browser, which prompts for it.
    let rfb = if with_password {
        format!("{{ mode: terminate, password_env: {VNC_PASSWORD_ENV} }}")
    } else {
        "{ mode: terminate }".to_owned()
    };
    let web_root = match web_root {
        Some(p) => serde_json::Value::from(p.display().to_string()).to_string(),
        None => "null".to_owned(),
    };
    let backend = serde_json::Value::from(backend).to_string();
    format!(
        r#"
server: {{ threads: 2, drain_seconds: 5, pid_file: /tmp/vncgate-demo.pid, upgrade_sock: /tmp/vncgate-demo-upgrade.sock }}
listeners: [ {{ addr: "{listen}" }} ]
paths: ["/websockify"]
web_root: {web_root}
auth: {{ algorithms: [HS256], secret_env: {SECRET_ENV} }}
store: {{ kind: memory }}
pools:
  default:
    rfb: {rfb}
    backends: [ {{ name: desktop, addr: {backend} }} ]
logging: {{ format: pretty, level: info }}
"#
    )
}

/// Children that die with us; also killed when dropped.
pub struct Kid(Child);

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_tied(cmd: &mut Command) -> std::io::Result<Kid> {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(Kid)
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
}

struct Desktop {
    addr: String,
    kids: Vec<Kid>,
    /// The VNC password the desktop asks for (`None`: security None, when `vncpasswd` is
    /// missing).
    password: Option<String>,
}

/// A VNC password file as TigerVNC reads it, written by TigerVNC's own `vncpasswd -f`.
fn password_file(password: &str) -> Result<PathBuf, String> {
    use std::io::Write;
    let vncpasswd = which("vncpasswd").ok_or("vncpasswd not installed")?;
    let mut child = Command::new(vncpasswd)
        .arg("-f")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("vncpasswd: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        writeln!(stdin, "{password}").map_err(|e| format!("vncpasswd: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("vncpasswd: {e}"))?;
    if !out.status.success() || out.stdout.is_empty() {
        return Err("vncpasswd -f failed".into());
    }
    let path = std::env::temp_dir().join(format!("vncgate-demo-{}.passwd", std::process::id()));
    std::fs::write(&path, &out.stdout).map_err(|e| format!("{}: {e}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    Ok(path)
}

/// Start `Xvnc` on a free display and port; returns its address and the processes to keep.
fn start_desktop() -> Result<Desktop, String> {
    let xvnc =
        which("Xvnc").ok_or("Xvnc not installed (apt-get install tigervnc-standalone-server)")?;
    let display = (40..100)
        .find(|n| {
            !Path::new(&format!("/tmp/.X11-unix/X{n}")).exists()
                && !Path::new(&format!("/tmp/.X{n}-lock")).exists()
        })
        .ok_or("no free X display number")?;
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let mut password_bytes = [0u8; 6];
    rand::rng().fill_bytes(&mut password_bytes);
    let password: String = password_bytes.iter().map(|b| format!("{b:02x}")).collect();
    let passwd_file = password_file(&password);
    let mut cmd = Command::new(xvnc);
    cmd.args([
        &format!(":{display}"),
        "-geometry",
        "1280x800",
        "-depth",
        "24",
        "-rfbport",
        &port.to_string(),
        "-interface",
        "127.0.0.1",
        "-localhost",
        "-nolisten",
        "tcp",
        "-desktop",
        "vncgate-demo",
    ]);
    // TigerVNC's default security types (TLSVnc, VncAuth) with a password; without vncpasswd,
    // a desktop without one.
    match &passwd_file {
        Ok(file) => cmd.arg("-PasswordFile").arg(file),
        Err(_) => cmd.args(["-SecurityTypes", "None"]),
    };
    let server = spawn_tied(&mut cmd).map_err(|e| format!("starting Xvnc: {e}"))?;
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect(&addr).is_err() {
        if Instant::now() > deadline {
            return Err("Xvnc did not start listening".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut kids = vec![server];
    let disp = format!(":{display}");
    if let Some(xsetroot) = which("xsetroot") {
        let _ = Command::new(xsetroot)
            .args(["-solid", "#2d5f8b"])
            .env("DISPLAY", &disp)
            .status();
    }
    if let Some(xterm) = which("xterm")
        && let Ok(k) = spawn_tied(
            Command::new(xterm)
                .args(["-geometry", "100x30+40+40"])
                .env("DISPLAY", &disp),
        )
    {
        kids.push(k);
    }
    Ok(Desktop {
        addr,
        kids,
        password: passwd_file.ok().map(|_| password),
    })
}
