//! Checks the fixtures of the RFB edge tests against the real programs, without the gateway: a
//! test that fails because a fixture is wrong would otherwise be blamed on the gateway.
//!
//! Every test needs the Debian packages named in `common::xvnc::package_hint` and panics naming
//! the one that is missing: these fixtures are the point of the RFB edge tests, so a machine
//! without them must not pass by skipping.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

use common::desktop::{self, TypingProbe};
use common::x11vnc::X11vnc;
use common::xvnc::{Security, Xvnc, require, run_on_display};

/// Bounds every network wait here so a broken fixture fails instead of hanging.
const LIMIT: Duration = Duration::from_secs(30);
const PASSWORD: &str = "s3cret-pw";

const SECURITY_NONE: u8 = 1;
const SECURITY_VNC_AUTH: u8 = 2;
const SECURITY_VENCRYPT: u8 = 19;
const VENCRYPT_TLS_VNC: u32 = 258;
const VENCRYPT_X509_VNC: u32 = 261;

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {LIMIT:?}"))
}

async fn read_n<S: AsyncRead + Unpin>(s: &mut S, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    within("read", s.read_exact(&mut buf))
        .await
        .expect("read from the VNC server");
    buf
}

async fn read_u32<S: AsyncRead + Unpin>(s: &mut S) -> u32 {
    u32::from_be_bytes(read_n(s, 4).await.try_into().expect("4 bytes"))
}

/// Connects, checks the server speaks RFB 3.8, answers 3.8 and returns the security types it
/// offers (a refusal's reason fails the test).
async fn security_types(addr: SocketAddr) -> (TcpStream, Vec<u8>) {
    let mut s = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    assert_eq!(read_n(&mut s, 12).await, b"RFB 003.008\n");
    s.write_all(b"RFB 003.008\n").await.expect("write version");
    let n = read_n(&mut s, 1).await[0] as usize;
    if n == 0 {
        let len = read_u32(&mut s).await as usize;
        let reason = read_n(&mut s, len).await;
        panic!("refused: {}", String::from_utf8_lossy(&reason));
    }
    let types = read_n(&mut s, n).await;
    (s, types)
}

/// After security None was offered: pick it, ask for a shared session and return the
/// ServerInit's (width, height, desktop name).
async fn finish_none_handshake(mut s: TcpStream) -> (u16, u16, String) {
    s.write_all(&[SECURITY_NONE]).await.expect("select None");
    assert_eq!(read_u32(&mut s).await, 0, "SecurityResult");
    s.write_all(&[1]).await.expect("ClientInit shared=1");
    let init = read_n(&mut s, 24).await;
    let width = u16::from_be_bytes([init[0], init[1]]);
    let height = u16::from_be_bytes([init[2], init[3]]);
    let len = u32::from_be_bytes(init[20..24].try_into().expect("4 bytes")) as usize;
    let name = String::from_utf8_lossy(&read_n(&mut s, len).await).into_owned();
    (width, height, name)
}

/// After VeNCrypt was offered: pick it, agree on version 0.2 and return the subtypes.
async fn vencrypt_subtypes(s: &mut TcpStream) -> Vec<u32> {
    s.write_all(&[SECURITY_VENCRYPT])
        .await
        .expect("select VeNCrypt");
    assert_eq!(read_n(s, 2).await, [0, 2], "VeNCrypt version");
    s.write_all(&[0, 2]).await.expect("VeNCrypt version");
    assert_eq!(read_n(s, 1).await, [0], "VeNCrypt version accepted");
    let n = read_n(s, 1).await[0];
    let mut subtypes = Vec::new();
    for _ in 0..n {
        subtypes.push(read_u32(s).await);
    }
    subtypes
}

fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .expect("cmdline")
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

fn require_xvnc() {
    require("Xvnc");
    require("vncpasswd");
    require("xsetroot");
}

#[tokio::test]
async fn builder_security_none_serves_the_asked_desktop_and_its_clients() {
    require_xvnc();
    require("xterm");
    let xvnc = Xvnc::builder()
        .name("fixtures none")
        .geometry((320, 200))
        .start_async()
        .await
        .expect("Xvnc");
    let args = cmdline(xvnc.pid());
    assert!(
        !args.iter().any(|a| a == "-AlwaysShared"),
        "the builder's default is not always-shared: {args:?}"
    );
    assert!(xvnc.password().is_none() && xvnc.password_file().is_none());
    let (s, types) = security_types(xvnc.rfb_addr()).await;
    assert_eq!(types, [SECURITY_NONE]);
    assert_eq!(
        finish_none_handshake(s).await,
        (320, 200, "fixtures none".into())
    );

    // A program started on the display is its X client until the fixture goes.
    let pid = xvnc
        .spawn_on_display("xterm", &["-T", "spawned-on-display"])
        .expect("spawn xterm");
    run_on_display(
        &xvnc.display_name(),
        "xdotool",
        &["search", "--sync", "--name", "^spawned-on-display$"],
    )
    .expect("the xterm's window appears");
    let display = xvnc.display;
    drop(xvnc);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the spawned xterm outlived the fixture"
    );
    assert!(!Path::new(&format!("/tmp/.X11-unix/X{display}")).exists());
}

#[tokio::test]
async fn legacy_start_still_runs_security_none_always_shared() {
    require_xvnc();
    let xvnc = Xvnc::start_async("fixtures legacy", (320, 200))
        .await
        .expect("Xvnc");
    let args = cmdline(xvnc.pid());
    assert!(args.iter().any(|a| a == "-AlwaysShared"), "{args:?}");
    assert!(
        args.windows(2).any(|w| w == ["-SecurityTypes", "None"]),
        "{args:?}"
    );
    assert_eq!(*xvnc.security(), Security::None);
    let (_s, types) = security_types(xvnc.rfb_addr()).await;
    assert_eq!(types, [SECURITY_NONE]);
}

#[tokio::test]
async fn vnc_auth_offers_only_type_2_from_a_private_password_file() {
    require_xvnc();
    let xvnc = Xvnc::builder()
        .security(Security::VncAuth {
            password: PASSWORD.into(),
        })
        .start_async()
        .await
        .expect("Xvnc");
    let file = xvnc.password_file().expect("password file").to_owned();
    let dir = xvnc.secrets_dir().expect("secrets dir").to_owned();
    assert_eq!(mode(&file), 0o600);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(std::fs::read(&file).expect("read").len(), 8);
    assert_eq!(xvnc.password(), Some(PASSWORD));

    let (mut s, types) = security_types(xvnc.rfb_addr()).await;
    assert_eq!(types, [SECURITY_VNC_AUTH]);
    s.write_all(&[SECURITY_VNC_AUTH])
        .await
        .expect("select VncAuth");
    assert_eq!(read_n(&mut s, 16).await.len(), 16, "the DES challenge");
    drop(s);
    drop(xvnc);
    assert!(!dir.exists(), "the password directory outlived the fixture");
}

#[tokio::test]
async fn default_security_is_tigervncs_own_tls_vnc_and_vnc_auth() {
    require_xvnc();
    let xvnc = Xvnc::builder()
        .security(Security::Default {
            password: PASSWORD.into(),
        })
        .start_async()
        .await
        .expect("Xvnc");
    let args = cmdline(xvnc.pid());
    assert!(
        !args
            .iter()
            .any(|a| a == "-SecurityTypes" || a.contains("Blacklist")),
        "Default must leave Xvnc's security settings alone: {args:?}"
    );
    let (mut s, types) = security_types(xvnc.rfb_addr()).await;
    assert!(
        types.contains(&SECURITY_VENCRYPT) && types.contains(&SECURITY_VNC_AUTH),
        "{types:?}"
    );
    // Inside VeNCrypt, TigerVNC lists TLSVnc (anonymous-DH TLS, which rustls cannot speak;
    // see FIELD-NOTES) and plain VncAuth again.
    assert_eq!(
        vencrypt_subtypes(&mut s).await,
        [VENCRYPT_TLS_VNC, SECURITY_VNC_AUTH as u32]
    );
}

/// A rustls client that trusts exactly the CA in `ca_pem`, as the gateway would be configured.
fn client_trusting(ca_pem: &Path) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(ca_pem).expect("ca.pem holds a certificate"))
        .expect("a usable CA");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

#[tokio::test]
async fn x509_vnc_proves_itself_with_the_fixtures_ca_for_both_names() {
    require_xvnc();
    let xvnc = Xvnc::builder()
        .security(Security::X509Vnc {
            password: PASSWORD.into(),
        })
        .start_async()
        .await
        .expect("Xvnc");
    let ca_file = xvnc.ca_file().expect("ca.pem").to_owned();
    let dir = xvnc.secrets_dir().expect("secrets dir").to_owned();
    for f in ["ca.pem", "cert.pem", "key.pem"] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    assert_eq!(mode(&dir.join("key.pem")), 0o600);
    assert_eq!(
        CertificateDer::from_pem_file(&ca_file)
            .expect("ca.pem")
            .as_ref(),
        xvnc.ca_der().expect("CA DER"),
    );
    let connector = client_trusting(&ca_file);
    // Two connections: fewer than the blacklist's 5 unauthenticated closes.
    for name in [
        ServerName::try_from("localhost").expect("name"),
        ServerName::from(IpAddr::V4(Ipv4Addr::LOCALHOST)),
    ] {
        let (mut s, types) = security_types(xvnc.rfb_addr()).await;
        assert_eq!(types, [SECURITY_VENCRYPT]);
        assert_eq!(vencrypt_subtypes(&mut s).await, [VENCRYPT_X509_VNC]);
        s.write_all(&VENCRYPT_X509_VNC.to_be_bytes())
            .await
            .expect("select X509Vnc");
        assert_eq!(read_n(&mut s, 1).await, [1], "subtype accepted");
        let mut tls = within("TLS handshake", connector.connect(name.clone(), s))
            .await
            .unwrap_or_else(|e| panic!("TLS to {name:?}: {e}\n{}", xvnc.log_tail(2000)));
        // Inside the tunnel: VNC Authentication's challenge.
        assert_eq!(read_n(&mut tls, 16).await.len(), 16);
        let _ = tls.shutdown().await;
    }
    drop(xvnc);
    assert!(!dir.exists(), "the certificates outlived the fixture");
}

#[tokio::test]
async fn blacklist_engages_after_unauthenticated_closes() {
    require_xvnc();
    let xvnc = Xvnc::builder()
        .security(Security::Default {
            password: PASSWORD.into(),
        })
        .start_async()
        .await
        .expect("Xvnc");
    assert!(!xvnc.blacklisted());
    // What a bare TCP health check or an upgrade that fails before authentication does to a
    // real desktop: each one is a black mark against the peer address, 127.0.0.1 here.
    for _ in 0..10 {
        let mut s = within("connect", TcpStream::connect(xvnc.rfb_addr()))
            .await
            .expect("connect");
        // The greeting, or the start of the refusal once blacklisted: either way the server
        // has handled this connection when it arrives.
        read_n(&mut s, 12).await;
    }
    let mut s = within("connect", TcpStream::connect(xvnc.rfb_addr()))
        .await
        .expect("connect");
    let mut refusal = Vec::new();
    within("refusal", s.read_to_end(&mut refusal))
        .await
        .expect("read");
    assert_eq!(
        refusal,
        b"RFB 003.003\n\0\0\0\0\0\0\0\x1aToo many security failures",
        "{}",
        String::from_utf8_lossy(&refusal)
    );
    // Xvnc logs before it writes the refusal, so the line is there now.
    assert!(xvnc.blacklisted(), "log:\n{}", xvnc.log_tail(3000));
    assert!(xvnc.log_contains("127.0.0.1"));
}

#[tokio::test]
async fn x11vnc_serves_its_xvfb_with_security_none() {
    require("Xvfb");
    require("x11vnc");
    require("xsetroot");
    let started = Instant::now();
    let desk = X11vnc::start_async((320, 200)).await.expect("x11vnc");
    eprintln!(
        "x11vnc on {} port {} ready after {:?} (start returned after {:?})",
        desk.display_name(),
        desk.rfb_port,
        desk.startup_time,
        started.elapsed()
    );
    desk.set_root_color("#336699").expect("xsetroot");
    let (s, types) = security_types(desk.rfb_addr()).await;
    assert_eq!(types, [SECURITY_NONE]);
    let (w, h, name) = finish_none_handshake(s).await;
    assert_eq!((w, h), (320, 200));
    assert_eq!(name, desk.desktop_name);
    let (display, port) = (desk.display, desk.rfb_port);
    drop(desk);
    assert!(!Path::new(&format!("/tmp/.X11-unix/X{display}")).exists());
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "x11vnc still listening after drop"
    );
}

/// Types with xdotool (XTEST, as a VNC server injects keys) and checks each key reaches the
/// file before any Enter: the probe is not line-buffered.
async fn typing_probe_on(display: &str) {
    require("xdotool");
    let probe = TypingProbe::start(display).await;
    let g = probe.geometry();
    assert_eq!((g.x, g.y), (0, 0), "{g:?}");
    assert!(g.width > 0 && g.height > 0, "{g:?}");
    let focus = run_on_display(display, "xdotool", &["getwindowfocus"]).expect("focus");
    assert_eq!(
        String::from_utf8_lossy(&focus.stdout).trim(),
        probe.window_id()
    );
    assert_eq!(probe.contents(), "");
    run_on_display(display, "xdotool", &["type", "--delay", "20", "hi"]).expect("type");
    assert_eq!(probe.wait_for("hi").await, "hi");
    run_on_display(display, "xdotool", &["key", "ctrl+c", "Return"]).expect("keys");
    assert_eq!(probe.wait_for("\n").await, "hi\x03\n");
}

#[tokio::test]
async fn typing_probe_gets_every_key_on_xvnc() {
    require_xvnc();
    let xvnc = Xvnc::builder()
        .geometry((800, 600))
        .start_async()
        .await
        .expect("Xvnc");
    typing_probe_on(&xvnc.display_name()).await;
}

#[tokio::test]
async fn typing_probe_gets_every_key_on_the_xvfb_behind_x11vnc() {
    require("Xvfb");
    require("x11vnc");
    let desk = X11vnc::start_async((800, 600)).await.expect("x11vnc");
    typing_probe_on(&desk.display_name()).await;
}

#[tokio::test]
async fn pointer_location_reads_the_x_pointer() {
    require_xvnc();
    require("xdotool");
    let xvnc = Xvnc::builder()
        .geometry((320, 200))
        .start_async()
        .await
        .expect("Xvnc");
    let display = xvnc.display_name();
    run_on_display(&display, "xdotool", &["mousemove", "--sync", "17", "23"]).expect("move");
    assert_eq!(desktop::pointer_location(&display), (17, 23));
    run_on_display(&display, "xdotool", &["mousemove", "100", "150"]).expect("move");
    desktop::wait_pointer_at(&display, (100, 150)).await;
}

#[tokio::test]
async fn clipboard_round_trips_and_is_released_on_drop() {
    require_xvnc();
    require("xclip");
    let xvnc = Xvnc::builder()
        .geometry((320, 200))
        .start_async()
        .await
        .expect("Xvnc");
    let display = xvnc.display_name();
    assert_eq!(desktop::clipboard_get(&display).await, None);
    let text = "vncgate clipboard: é € ✓\nsecond line";
    let clipboard = desktop::clipboard_set(&display, text).await;
    assert_eq!(
        desktop::clipboard_get(&display).await.as_deref(),
        Some(text)
    );
    assert_eq!(desktop::primary_get(&display).await.as_deref(), Some(text));
    drop(clipboard);
    // The X server drops the owner's selections when it handles the xclip's disconnect, which
    // this process cannot observe: look again until it has (bounded).
    let deadline = Instant::now() + LIMIT;
    while desktop::clipboard_get(&display).await.is_some() {
        assert!(
            Instant::now() < deadline,
            "CLIPBOARD still owned after the helper was dropped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
