//! Operations without users noticing: SIGHUP reloads (a new backend, a rotated key, a renewed
//! certificate, a bad config refused) under live sessions, backend drain, and a binary upgrade
//! (`--upgrade` + SIGQUIT) under load with Redis pins.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::redis_server::RedisServer;
use common::rfb_client::{self, WsConnect};
use common::rfb_server::{Mode, RfbServer};
use common::{
    BackendSpec, Gateway, GatewayConfig, now, open_session as open, open_with, token,
    token_with_claims,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

async fn desk(name: &str) -> RfbServer {
    let mode = Mode::Rfb {
        name: name.into(),
        width: 8,
        height: 8,
        rgb: [1, 2, 3],
    };
    RfbServer::start(mode).await.expect("fixture")
}

fn key(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/keys")
        .join(name)
}

fn rs256(private: &str, sub: &str) -> String {
    let pem = std::fs::read(key(private)).expect("key");
    let claims = json!({"sub": sub, "exp": now() + 600});
    jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &claims,
        &EncodingKey::from_rsa_pem(&pem).expect("rsa"),
    )
    .expect("sign")
}

async fn sighup_and_wait(gw: &Gateway, reloads_before: usize) {
    gw.signal(libc::SIGHUP);
    gw.wait_logs(reloads_before + 1, |v| {
        v["event"] == "config_reloaded" || v["event"] == "config_reload_failed"
    })
    .await;
}

#[tokio::test]
async fn reload_adds_a_backend_rotates_keys_and_refuses_a_bad_config_without_dropping_sessions() {
    let (a, b) = (desk("a").await, desk("b").await);
    let mut cfg = GatewayConfig::new(vec![BackendSpec::rfb("a", a.addr)]);
    cfg.auth = format!(
        "  algorithms: [RS256]\n  public_key_files: [\"{}\"]\n",
        key("rsa.pub").display()
    );
    let gw = Gateway::start(cfg).await;
    let mut live = open(&gw, &rs256("rsa.key", "alice")).await;

    // New backend b, and the identity provider's key rotated to rsa-other.
    gw.rewrite_config(|c| {
        c.replace(
            &format!("      - {{ name: a, addr: \"{}\" }}\n", a.addr),
            &format!(
                "      - {{ name: a, addr: \"{}\" }}\n      - {{ name: b, addr: \"{}\" }}\n",
                a.addr, b.addr
            ),
        )
        .replace(
            &key("rsa.pub").display().to_string(),
            &key("rsa-other.pub").display().to_string(),
        )
    });
    sighup_and_wait(&gw, 0).await;
    gw.wait_log(|v| v["event"] == "config_reloaded").await;

    // The live session was not touched: it still gets updates.
    rfb_client::first_framebuffer_update(&mut live.ws, &mut live.session)
        .await
        .expect("live session survived");
    // Old key refused, new key accepted, and the new backend takes the next session (a has one).
    let c = WsConnect::new(gw.ws_url(&format!("?token={}", rs256("rsa.key", "bob"))));
    let err = rfb_client::connect(&c)
        .await
        .err()
        .expect("old key refused");
    assert_eq!(
        rfb_client::error_code(&err),
        Some((401, "token_signature".into()))
    );
    let second = open(&gw, &rs256("rsa-other.key", "carol")).await;
    assert_eq!(second.session.server_name, "b");
    assert_eq!(
        gw.metric("vncgate_config_reloads_total{result=\"ok\"}")
            .await,
        1.0
    );
    let (_, metrics) = gw.admin_get("/metrics").await;
    assert_eq!(
        metrics
            .lines()
            .filter(|l| l.starts_with("vncgate_config_info{"))
            .count(),
        1,
        "one live config hash"
    );

    // A broken config is refused with its key named; the running config stays.
    gw.rewrite_config(|c| c + "limits:\n  max_message_bytes: 12\n");
    sighup_and_wait(&gw, 1).await;
    let refused = gw.wait_log(|v| v["event"] == "config_reload_failed").await;
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("limits.max_message_bytes")),
        "{refused}"
    );
    assert_eq!(
        gw.metric("vncgate_config_reloads_total{result=\"error\"}")
            .await,
        1.0
    );
    let third = open(&gw, &rs256("rsa-other.key", "dave")).await;
    assert!(
        !third.session.server_name.is_empty(),
        "still serving on the previous config"
    );
    rfb_client::first_framebuffer_update(&mut live.ws, &mut live.session)
        .await
        .expect("live session survived");
}

fn write_cert(dir: &std::path::Path, name: &str) -> (PathBuf, PathBuf, Vec<u8>) {
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).expect("cert");
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert, certified.cert.pem()).expect("cert");
    std::fs::write(&key, certified.signing_key.serialize_pem()).expect("key");
    (cert, key, certified.cert.der().to_vec())
}

#[tokio::test]
async fn reload_serves_a_renewed_certificate_to_new_connections() {
    let backend = desk("tls").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key_file, old_der) = write_cert(dir.path(), "live");
    let mut cfg = GatewayConfig::new(vec![BackendSpec::fixture("desk", &backend)]);
    cfg.tls = Some((cert.clone(), key_file.clone()));
    let gw = Gateway::start(cfg).await;
    let url = |t: &str| format!("wss://127.0.0.1:{}/websockify?token={t}", gw.port);
    let connect = |der: &[u8], t: String| {
        let mut c = WsConnect::new(url(&t));
        c.tls = Some(rfb_client::tls_client_config(der));
        c
    };
    let mut live = open_with(connect(&old_der, token("alice", None))).await;

    // Renew: new files in place, SIGHUP.
    let (new_cert, new_key, new_der) = write_cert(dir.path(), "renewed");
    std::fs::rename(&new_cert, &cert).expect("replace cert");
    std::fs::rename(&new_key, &key_file).expect("replace key");
    sighup_and_wait(&gw, 0).await;
    gw.wait_log(|v| v["event"] == "config_reloaded").await;

    open_with(connect(&new_der, token("bob", None))).await;
    assert!(
        rfb_client::connect(&connect(&old_der, token("carol", None)))
            .await
            .is_err(),
        "old certificate still served"
    );
    rfb_client::first_framebuffer_update(&mut live.ws, &mut live.session)
        .await
        .expect("live wss session survived");
}

#[tokio::test]
async fn a_drained_backend_takes_no_new_pins_but_keeps_its_sessions() {
    let (a, b) = (desk("a").await, desk("b").await);
    let gw = Gateway::start(GatewayConfig::new(vec![
        BackendSpec::rfb("a", a.addr),
        BackendSpec::rfb("b", b.addr),
    ]))
    .await;
    let mut on_a = None;
    for i in 0..4 {
        let live = open(&gw, &token(&format!("u{i}"), Some(&format!("s{i}")))).await;
        if live.session.server_name == "a" && on_a.is_none() {
            on_a = Some((i, live));
        }
    }
    let (pinned, mut live) = on_a.expect("some session on a");
    let (status, body) = gw.admin("POST", "/admin/backends/a/drain", "").await;
    assert_eq!(status, 200, "{body}");
    for i in 10..16 {
        let fresh = open(&gw, &token(&format!("u{i}"), Some(&format!("s{i}")))).await;
        assert_eq!(
            fresh.session.server_name, "b",
            "a new session went to the drained backend"
        );
    }
    rfb_client::first_framebuffer_update(&mut live.ws, &mut live.session)
        .await
        .expect("session on a continues");
    // Its pin still holds: a second connection of that session (a second tab) goes to a.
    let again = open(
        &gw,
        &token(&format!("u{pinned}"), Some(&format!("s{pinned}"))),
    )
    .await;
    assert_eq!(again.session.server_name, "a");
    let (_, backends) = gw.admin("GET", "/admin/backends", "").await;
    let listed: serde_json::Value = serde_json::from_str(&backends).expect("json");
    let a_entry = listed["backends"]
        .as_array()
        .and_then(|l| l.iter().find(|b| b["name"] == "a"))
        .cloned();
    assert_eq!(
        a_entry.as_ref().map(|e| e["draining"].clone()),
        Some(json!(true)),
        "{backends}"
    );
}

#[tokio::test]
async fn upgrade_under_load_refuses_nothing_and_sessions_return_to_their_desktops() {
    let redis = RedisServer::start().await.expect("redis");
    let desks = [desk("d0").await, desk("d1").await, desk("d2").await];
    let backends = desks
        .iter()
        .enumerate()
        .map(|(i, d)| BackendSpec::rfb(&format!("d{i}"), d.addr))
        .collect();
    let mut cfg = GatewayConfig::new(backends);
    cfg.redis_url = Some(redis.url());
    cfg.drain_seconds = 1;
    cfg.extra = "limits:\n  max_sessions_per_user: 1000\n".into();
    let mut old = Gateway::start(cfg).await;

    let mut live = Vec::new();
    for i in 0..50 {
        live.push(open(&old, &token(&format!("u{i}"), Some(&format!("s{i}")))).await);
    }
    // A steady stream of new connections through the whole hand-over.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stream = tokio::spawn({
        let (stop, ok, failed) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failed));
        let url = old.ws_url("");
        async move {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let jwt =
                    token_with_claims(&json!({"sub": format!("stream{n}"), "exp": now() + 600}));
                let c = WsConnect::new(format!("{url}?token={jwt}"));
                let handshake = async {
                    let (mut ws, _) = rfb_client::connect(&c).await.map_err(|e| e.to_string())?;
                    rfb_client::rfb_handshake(&mut ws)
                        .await
                        .map_err(|e| e.to_string())
                };
                match handshake.await {
                    Ok(_) => ok.fetch_add(1, Ordering::SeqCst),
                    Err(e) => {
                        eprintln!("connection {n} failed during the upgrade: {e}");
                        failed.fetch_add(1, Ordering::SeqCst)
                    }
                };
            }
        }
    });

    let new = old.spawn_upgrade();
    old.signal(libc::SIGQUIT);
    // Every live session is closed with 1001 by the draining old process and reconnects (to
    // the same port, now served by the new process) to the same desktop.
    for (i, l) in live.iter_mut().enumerate() {
        let frame = rfb_client::read_close(&mut l.ws)
            .await
            .expect("close frame");
        assert_eq!(u16::from(frame.code), 1001, "session s{i}");
        let again = open(&new, &token(&format!("u{i}"), Some(&format!("s{i}")))).await;
        assert_eq!(
            again.session.server_name, l.session.server_name,
            "s{i} landed on another desktop"
        );
    }
    assert_eq!(old.wait_exit().await.code(), Some(0));
    // The new process alone serves now.
    for i in 0..5 {
        open(&new, &token(&format!("after{i}"), None)).await;
    }
    stop.store(true, Ordering::SeqCst);
    stream.await.expect("stream task");
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "connections refused during the upgrade"
    );
    assert!(ok.load(Ordering::SeqCst) > 0);
    let served_by_new = new
        .logs()
        .iter()
        .filter(|v| v["event"] == "session_started")
        .count();
    assert!(
        served_by_new > 50,
        "the new process took over ({served_by_new} sessions)"
    );
}
