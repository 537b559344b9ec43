//! Authentication and authorization through the real gateway: every token an identity provider
//! may issue is accepted, and every other one is refused with its contract code (§3, §5). Then
//! JWKS rotation, identity-provider outages and the refresh rate limit; expiry, revocation and
//! kicks of live sessions; the per-address auth-failure throttle.

mod common;

use std::path::PathBuf;

use common::jwks_server::JwksServer;
use common::rfb_client::{self, WsConnect};
use common::rfb_server::{Mode, RfbServer};
use common::{BackendSpec, Gateway, GatewayConfig, SECRET, now};
use futures_util::future::join_all;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rstest::rstest;
use serde_json::{Value, json};

const ORIGIN: &str = "https://app.example";
const ISSUER: &str = "https://idp.example";
const AUDIENCE: &str = "vncgate";

fn key_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/keys")
        .join(name)
}

fn read_key(name: &str) -> Vec<u8> {
    std::fs::read(key_path(name)).expect("test key")
}

fn encoding_key(alg: Algorithm, private: &str) -> EncodingKey {
    let pem = read_key(private);
    match alg {
        Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 | Algorithm::PS256 => {
            EncodingKey::from_rsa_pem(&pem).expect("rsa key")
        }
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&pem).expect("ec key"),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem).expect("ed key"),
        _ => EncodingKey::from_secret(&pem),
    }
}

/// Claims that pass the strict gateway (issuer and audience configured), with overrides; a
/// `null` override removes the claim.
fn claims(overrides: Value) -> Value {
    let mut c = json!({ "sub": "alice", "exp": now() + 600, "iss": ISSUER, "aud": AUDIENCE });
    if let (Some(base), Some(o)) = (c.as_object_mut(), overrides.as_object()) {
        for (k, v) in o {
            if v.is_null() {
                base.remove(k);
            } else {
                base.insert(k.clone(), v.clone());
            }
        }
    }
    c
}

fn hs256(overrides: Value) -> String {
    sign_with_secret(
        Algorithm::HS256,
        SECRET.as_bytes(),
        None,
        &claims(overrides),
    )
}

fn sign_with_secret(alg: Algorithm, secret: &[u8], kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(Into::into);
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(secret)).expect("sign")
}

fn sign(alg: Algorithm, private: &str, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(Into::into);
    jsonwebtoken::encode(&header, claims, &encoding_key(alg, private)).expect("sign")
}

/// A compact JWS with any header and payload JSON and a junk signature.
fn raw_token(header: &str, payload: &str) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.{}",
        b64.encode(header),
        b64.encode(payload),
        b64.encode("signature")
    )
}

/// The strict HMAC gateway: issuer, audience and an Origin allowlist configured.
fn strict_auth() -> String {
    format!(
        "  algorithms: [HS256]\n  secret_env: VNCGATE_JWT_SECRET\n  issuer: \"{ISSUER}\"\n  audience: \"{AUDIENCE}\"\n  \
         leeway_seconds: 30\n  allowed_origins: [\"{ORIGIN}\"]\n"
    )
}

/// The public-key gateway: PEM files for every asymmetric algorithm vncgate supports.
fn asymmetric_auth() -> String {
    let files: Vec<String> = ["rsa.pub", "ec256.pub", "ec384.pub", "ed25519.pub"]
        .iter()
        .map(|f| format!("\"{}\"", key_path(f).display()))
        .collect();
    format!(
        "  algorithms: [RS256, RS384, RS512, PS256, ES256, ES384, EdDSA]\n  public_key_files: [{}]\n",
        files.join(", ")
    )
}

async fn gateway(auth: String) -> (RfbServer, Gateway) {
    let backend = RfbServer::start(Mode::Rfb {
        name: "desk".into(),
        width: 8,
        height: 8,
        rgb: [0, 0, 0],
    })
    .await
    .expect("fixture");
    let mut cfg = GatewayConfig::new(vec![BackendSpec::fixture("desk", &backend)]);
    cfg.auth = auth;
    (backend, Gateway::start(cfg).await)
}

/// Ok(()) when the upgrade succeeded, else the refusal's (status, code).
async fn attempt(
    gw: &Gateway,
    token: Option<&str>,
    origin: Option<&str>,
) -> Result<(), (u16, String)> {
    let mut c = WsConnect::new(gw.ws_url(""));
    if let Some(t) = token {
        c.headers
            .push(("Authorization".into(), format!("Bearer {t}")));
    }
    if let Some(o) = origin {
        c.headers.push(("Origin".into(), o.into()));
    }
    match rfb_client::connect(&c).await {
        Ok(_) => Ok(()),
        Err(e) => {
            Err(rfb_client::error_code(&e).unwrap_or_else(|| panic!("not an HTTP refusal: {e}")))
        }
    }
}

fn refused(status: u16, code: &str) -> Result<(), (u16, String)> {
    Err((status, code.to_owned()))
}

#[rstest]
#[case::valid(Some(hs256(json!({}))), Some(ORIGIN), Ok(()))]
#[case::missing(None, Some(ORIGIN), refused(401, "token_missing"))]
#[case::garbage(Some("garbage".into()), Some(ORIGIN), refused(401, "token_malformed"))]
#[case::three_junk_segments(Some("a.b.c".into()), Some(ORIGIN), refused(401, "token_malformed"))]
#[case::header_not_json(
    Some(raw_token("{nope", "{}")),
    Some(ORIGIN),
    refused(401, "token_malformed")
)]
#[case::alg_none(Some(raw_token(r#"{"alg":"none","typ":"JWT"}"#, &claims(json!({})).to_string())), Some(ORIGIN), refused(401, "token_algorithm"))]
#[case::alg_missing(Some(raw_token(r#"{"typ":"JWT"}"#, &claims(json!({})).to_string())), Some(ORIGIN), refused(401, "token_malformed"))]
#[case::alg_hs384_not_allowed(Some(sign_with_secret(Algorithm::HS384, SECRET.as_bytes(), None, &claims(json!({})))), Some(ORIGIN), refused(401, "token_algorithm"))]
#[case::alg_rs256_not_allowed(Some(sign(Algorithm::RS256, "rsa.key", None, &claims(json!({})))), Some(ORIGIN), refused(401, "token_algorithm"))]
#[case::wrong_secret(Some(sign_with_secret(Algorithm::HS256, b"a-different-secret-of-32-bytes-!!", None, &claims(json!({})))), Some(ORIGIN), refused(401, "token_signature"))]
#[case::tampered_payload(Some(tamper(&hs256(json!({})))), Some(ORIGIN), refused(401, "token_signature"))]
#[case::expired_beyond_leeway(Some(hs256(json!({"exp": now() - 3600}))), Some(ORIGIN), refused(401, "token_expired"))]
#[case::expired_within_leeway(Some(hs256(json!({"exp": now() - 10}))), Some(ORIGIN), Ok(()))]
#[case::not_yet_valid(Some(hs256(json!({"nbf": now() + 3600}))), Some(ORIGIN), refused(401, "token_not_yet_valid"))]
#[case::nbf_within_leeway(Some(hs256(json!({"nbf": now() + 10}))), Some(ORIGIN), Ok(()))]
#[case::issuer_missing(Some(hs256(json!({"iss": null}))), Some(ORIGIN), refused(401, "token_issuer"))]
#[case::issuer_wrong(Some(hs256(json!({"iss": "https://evil.example"}))), Some(ORIGIN), refused(401, "token_issuer"))]
#[case::audience_missing(Some(hs256(json!({"aud": null}))), Some(ORIGIN), refused(401, "token_audience"))]
#[case::audience_wrong(Some(hs256(json!({"aud": "other-app"}))), Some(ORIGIN), refused(401, "token_audience"))]
#[case::audience_in_list(Some(hs256(json!({"aud": ["other-app", AUDIENCE]}))), Some(ORIGIN), Ok(()))]
#[case::sub_missing(Some(hs256(json!({"sub": null}))), Some(ORIGIN), refused(401, "token_malformed"))]
#[case::sub_not_a_string(Some(hs256(json!({"sub": 42}))), Some(ORIGIN), refused(401, "token_malformed"))]
#[case::exp_missing(Some(hs256(json!({"exp": null}))), Some(ORIGIN), refused(401, "token_malformed"))]
#[case::exp_as_string(Some(hs256(json!({"exp": (now() + 600).to_string()}))), Some(ORIGIN), refused(401, "token_malformed"))]
#[case::kid_path_traversal_is_not_a_path(Some(sign_with_secret(Algorithm::HS256, SECRET.as_bytes(), Some("../../etc/passwd"), &claims(json!({})))), Some(ORIGIN), Ok(()))]
#[case::kid_sql_injection_wrong_key(Some(sign_with_secret(Algorithm::HS256, b"/etc/passwd-is-not-the-secret-at-all", Some("' OR 1=1 --"), &claims(json!({})))), Some(ORIGIN), refused(401, "token_signature"))]
#[case::origin_denied(Some(hs256(json!({}))), Some("https://evil.example"), refused(403, "origin_denied"))]
#[case::origin_prefix_denied(Some(hs256(json!({}))), Some("https://app.example.evil.example"), refused(403, "origin_denied"))]
#[case::origin_missing(Some(hs256(json!({}))), None, refused(403, "origin_denied"))]
#[case::sid_bad_chars(Some(hs256(json!({"sid": "a/b"}))), Some(ORIGIN), refused(400, "bad_session_id"))]
#[case::sid_too_long(Some(hs256(json!({"sid": "s".repeat(129)}))), Some(ORIGIN), refused(400, "bad_session_id"))]
#[case::pool_unknown(Some(hs256(json!({"pool": "gpu"}))), Some(ORIGIN), refused(403, "pool_unknown"))]
#[case::backend_as_address(Some(hs256(json!({"backend": "10.0.0.1:5900"}))), Some(ORIGIN), refused(403, "backend_not_allowed"))]
#[case::backend_unknown_name(Some(hs256(json!({"backend": "desk-z"}))), Some(ORIGIN), refused(403, "backend_not_allowed"))]
#[case::backend_named(Some(hs256(json!({"backend": "desk"}))), Some(ORIGIN), Ok(()))]
#[case::token_64_kib(Some(hs256(json!({"pad": "x".repeat(64 * 1024)}))), Some(ORIGIN), refused(400, "bad_upgrade"))]
#[tokio::test]
async fn hmac_token_cases(
    #[case] token: Option<String>,
    #[case] origin: Option<&str>,
    #[case] want: Result<(), (u16, String)>,
) {
    let (_backend, gw) = gateway(strict_auth()).await;
    let got = attempt(&gw, token.as_deref(), origin).await;
    assert_eq!(got, want);
    if let Err((status, code)) = &want {
        gw.wait_log(|v| v["event"] == "upgrade_rejected" && v["code"] == code.as_str())
            .await;
        if *status == 401 || *status == 403 {
            let counted = gw
                .metric(&format!("vncgate_auth_failures_total{{reason=\"{code}\"}}"))
                .await;
            assert_eq!(counted, 1.0);
        }
    }
    if let Some(t) = &token {
        let raw = gw.raw_logs().join("\n");
        assert!(
            !raw.contains(t.as_str()),
            "the token appeared in a log line"
        );
    }
}

/// Flip one character of the payload, keeping the signature.
fn tamper(token: &str) -> String {
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let payload = &mut parts[1];
    let last = payload.pop().expect("payload");
    payload.push(if last == 'A' { 'B' } else { 'A' });
    parts.join(".")
}

#[rstest]
#[case::rs256(Algorithm::RS256, "rsa.key", Ok(()))]
#[case::rs384(Algorithm::RS384, "rsa.key", Ok(()))]
#[case::rs512(Algorithm::RS512, "rsa.key", Ok(()))]
#[case::ps256(Algorithm::PS256, "rsa.key", Ok(()))]
#[case::es256(Algorithm::ES256, "ec256.key", Ok(()))]
#[case::es384(Algorithm::ES384, "ec384.key", Ok(()))]
#[case::eddsa(Algorithm::EdDSA, "ed25519.key", Ok(()))]
#[case::rs256_wrong_key_right_type(
    Algorithm::RS256,
    "rsa-other.key",
    refused(401, "token_signature")
)]
#[tokio::test]
async fn public_key_algorithms(
    #[case] alg: Algorithm,
    #[case] private: &str,
    #[case] want: Result<(), (u16, String)>,
) {
    let (_backend, gw) = gateway(asymmetric_auth()).await;
    let token = sign(
        alg,
        private,
        None,
        &json!({"sub": "alice", "exp": now() + 600}),
    );
    assert_eq!(attempt(&gw, Some(&token), None).await, want);
}

#[tokio::test]
async fn algorithm_confusion_and_kid_tricks_with_public_keys() {
    let (_backend, gw) = gateway(asymmetric_auth()).await;
    let body = json!({"sub": "alice", "exp": now() + 600});
    // HS256 "signed" with the RSA public key's PEM as the HMAC secret: HS256 is not allowed.
    let confused = sign_with_secret(Algorithm::HS256, &read_key("rsa.pub"), None, &body);
    assert_eq!(
        attempt(&gw, Some(&confused), None).await,
        refused(401, "token_algorithm")
    );
    // A kid is never a file name: the right key still verifies, a wrong one still fails.
    let traversal = sign(
        Algorithm::RS256,
        "rsa.key",
        Some("../../../../etc/passwd"),
        &body,
    );
    assert_eq!(attempt(&gw, Some(&traversal), None).await, Ok(()));
    let injected = sign(Algorithm::RS256, "rsa-other.key", Some("' OR 1=1"), &body);
    assert_eq!(
        attempt(&gw, Some(&injected), None).await,
        refused(401, "token_signature")
    );
    // ES256 header over an RSA signature: the EC key rejects it.
    let mismatched = {
        let rs = sign(Algorithm::RS256, "rsa.key", None, &body);
        let es_header = sign(Algorithm::ES256, "ec256.key", None, &body);
        let (h, _) = es_header.split_once('.').expect("jws");
        let (_, rest) = rs.split_once('.').expect("jws");
        format!("{h}.{rest}")
    };
    assert_eq!(
        attempt(&gw, Some(&mismatched), None).await,
        refused(401, "token_signature")
    );
}

#[tokio::test]
async fn tokens_that_are_not_utf8_are_malformed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_backend, gw) = gateway(strict_auth()).await;
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .expect("connect");
    let mut request = b"GET /websockify HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: https://app.example\r\n\
        Authorization: Bearer \xff\xfe\xfd.\xc3\x28.x\r\n\r\n"
        .to_vec();
    tcp.write_all(&request).await.expect("write");
    request.clear();
    tcp.read_to_end(&mut request).await.expect("read");
    let text = String::from_utf8_lossy(&request);
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    assert!(text.contains(r#""error":"token_malformed""#), "{text}");
}

fn jwk(alg: Algorithm, private: &str, kid: &str) -> Jwk {
    let mut jwk = Jwk::from_encoding_key(&encoding_key(alg, private), alg).expect("jwk");
    jwk.common.key_id = Some(kid.into());
    jwk
}

fn key_set(keys: Vec<Jwk>) -> String {
    serde_json::to_string(&JwkSet { keys }).expect("jwks json")
}

fn jwks_auth(url: &str, min_refresh: u64) -> String {
    format!(
        "  algorithms: [RS256, ES256]\n  jwks_url: \"{url}\"\n  jwks_min_refresh_seconds: {min_refresh}\n"
    )
}

#[tokio::test]
async fn jwks_rotation_outage_and_removal() {
    let idp = JwksServer::start(key_set(vec![jwk(Algorithm::RS256, "rsa.key", "k1")])).await;
    let (_backend, gw) = gateway(jwks_auth(&idp.url, 0)).await;
    gw.wait_log(|v| v["event"] == "jwks_refreshed").await;
    let body = json!({"sub": "alice", "exp": now() + 600});
    let k1 = sign(Algorithm::RS256, "rsa.key", Some("k1"), &body);
    let k2 = sign(Algorithm::ES256, "ec256.key", Some("k2"), &body);
    assert_eq!(attempt(&gw, Some(&k1), None).await, Ok(()));

    // The provider rotates in k2: the unknown kid triggers a refetch; no restart.
    idp.set_body(key_set(vec![
        jwk(Algorithm::RS256, "rsa.key", "k1"),
        jwk(Algorithm::ES256, "ec256.key", "k2"),
    ]));
    assert_eq!(attempt(&gw, Some(&k2), None).await, Ok(()));

    // The provider goes down: a refetch fails, the cached keys keep working.
    idp.set_down(true);
    let unknown = sign(Algorithm::RS256, "rsa-other.key", Some("k9"), &body);
    assert_eq!(
        attempt(&gw, Some(&unknown), None).await,
        refused(401, "token_signature")
    );
    gw.wait_log(|v| v["event"] == "jwks_fetch_failed").await;
    assert_eq!(attempt(&gw, Some(&k1), None).await, Ok(()));
    assert_eq!(attempt(&gw, Some(&k2), None).await, Ok(()));
    // Still ready: the cached keys verify. But it says they could not be refreshed.
    let (status, ready) = readyz(&gw).await;
    assert_eq!((status, &ready["jwks"]), (200, &json!("stale")), "{ready}");

    // Back up without k1: after the next refetch, k1 is refused.
    idp.set_down(false);
    idp.set_body(key_set(vec![jwk(Algorithm::ES256, "ec256.key", "k2")]));
    assert_eq!(
        attempt(&gw, Some(&unknown), None).await,
        refused(401, "token_signature")
    );
    assert_eq!(
        attempt(&gw, Some(&k1), None).await,
        refused(401, "token_signature")
    );
    assert_eq!(attempt(&gw, Some(&k2), None).await, Ok(()));
    let (status, ready) = readyz(&gw).await;
    assert_eq!((status, &ready["jwks"]), (200, &json!("ok")), "{ready}");
}

#[tokio::test]
async fn jwks_refetches_for_unknown_kids_are_rate_limited() {
    let idp = JwksServer::start(key_set(vec![jwk(Algorithm::RS256, "rsa.key", "k1")])).await;
    let (_backend, gw) = gateway(jwks_auth(&idp.url, 3600)).await;
    gw.wait_log(|v| v["event"] == "jwks_refreshed").await;
    let fetched_at_start = idp.fetches();
    let body = json!({"sub": "alice", "exp": now() + 600});
    for i in 0..20 {
        let bogus = sign(
            Algorithm::RS256,
            "rsa-other.key",
            Some(&format!("unknown-{i}")),
            &body,
        );
        assert_eq!(
            attempt(&gw, Some(&bogus), None).await,
            refused(401, "token_signature")
        );
    }
    assert_eq!(
        idp.fetches(),
        fetched_at_start,
        "unknown kids made vncgate refetch within the interval"
    );
}

fn jwks_refreshed(v: &Value) -> bool {
    v["event"] == "jwks_refreshed"
}

async fn readyz(gw: &Gateway) -> (u16, Value) {
    let (status, body) = gw.admin_get("/readyz").await;
    (status, serde_json::from_str(&body).expect("readyz json"))
}

/// A key rotation seen by many users at once: twenty upgrades signed with a key the provider
/// published after vncgate's last fetch all succeed, because each waits for the one refetch
/// and is verified against what it brought (before, only the request that ran the refetch did;
/// the others were refused with the keys they had loaded before waiting). The provider is
/// asked once.
#[tokio::test]
async fn jwks_rotation_under_concurrent_upgrades_refuses_none_and_fetches_once() {
    let idp = JwksServer::start(key_set(vec![jwk(Algorithm::RS256, "rsa.key", "k1")])).await;
    // One second between fetches: the burst below most likely arrives within it and waits for
    // the next allowed fetch; arriving later, it triggers that fetch at once. Same outcome.
    let (_backend, gw) = gateway(jwks_auth(&idp.url, 1)).await;
    gw.wait_log(jwks_refreshed).await;
    let before = idp.fetches();

    idp.set_body(key_set(vec![
        jwk(Algorithm::RS256, "rsa.key", "k1"),
        jwk(Algorithm::ES256, "ec256.key", "k2"),
    ]));
    // Twenty users (one user may hold only `max_sessions_per_user` sessions at once).
    let tokens: Vec<String> = (0..20)
        .map(|i| {
            let body = json!({"sub": format!("user-{i}"), "exp": now() + 600});
            sign(Algorithm::ES256, "ec256.key", Some("k2"), &body)
        })
        .collect();
    let results = join_all(tokens.iter().map(|t| attempt(&gw, Some(t), None))).await;
    assert!(
        results.iter().all(|r| r.is_ok()),
        "refused during a rotation: {results:?}"
    );
    assert_eq!(
        idp.fetches() - before,
        1,
        "the waiting upgrades did not share one fetch"
    );
}

/// Before the first fetch lands, vncgate is not ready (`/readyz` 503, `"jwks": "loading"`) and
/// tokens wait for that fetch instead of being refused; once it lands they are accepted and
/// `/readyz` says `ok`.
#[tokio::test]
async fn tokens_wait_for_the_first_jwks_fetch_and_readyz_is_503_until_it_lands() {
    let idp = JwksServer::start(key_set(vec![jwk(Algorithm::RS256, "rsa.key", "k1")])).await;
    idp.hold();
    let (_backend, gw) = gateway(jwks_auth(&idp.url, 1)).await;
    idp.wait_received(1).await;
    let (status, ready) = readyz(&gw).await;
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["jwks"], "loading", "{ready}");

    let body = json!({"sub": "alice", "exp": now() + 600});
    let with_kid = sign(Algorithm::RS256, "rsa.key", Some("k1"), &body);
    let without_kid = sign(Algorithm::RS256, "rsa.key", None, &body);
    let upgrades = join_all([
        attempt(&gw, Some(&with_kid), None),
        attempt(&gw, Some(&without_kid), None),
    ]);
    tokio::pin!(upgrades);
    // Both reach the verifier and wait there while the provider has not answered; were they
    // refused at once, the upgrades would end first.
    tokio::select! {
        _ = gw.wait_logs(2, |v| v["event"] == "jwks_wait") => {}
        ended = &mut upgrades => panic!("upgrades ended before the first JWKS fetch landed: {ended:?}"),
    }
    idp.release();
    let results = upgrades.await;
    assert_eq!(results, vec![Ok(()), Ok(())]);
    let (status, ready) = readyz(&gw).await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["jwks"], "ok", "{ready}");
}

/// A token with a forged `kid` makes vncgate refetch; a key the provider publishes right after
/// is not locked out for the rest of `jwks_min_refresh_seconds`: a token signed with it waits
/// for the next allowed fetch and is accepted. And a flood of forged `kid`s still gets at most
/// one fetch per interval.
#[tokio::test]
async fn key_published_after_a_forged_kid_refetch_is_accepted_and_refetches_stay_rate_limited() {
    const MIN_REFRESH: u64 = 1;
    let idp = JwksServer::start(key_set(vec![jwk(Algorithm::RS256, "rsa.key", "k1")])).await;
    let (_backend, gw) = gateway(jwks_auth(&idp.url, MIN_REFRESH)).await;
    gw.wait_log(jwks_refreshed).await;
    let before = idp.fetches();
    let body = json!({"sub": "alice", "exp": now() + 600});

    let forged = sign(Algorithm::RS256, "rsa-other.key", Some("forged"), &body);
    assert_eq!(
        attempt(&gw, Some(&forged), None).await,
        refused(401, "token_signature")
    );
    assert_eq!(
        idp.fetches() - before,
        1,
        "the forged kid was refused without the refetch it waited for"
    );

    idp.set_body(key_set(vec![
        jwk(Algorithm::RS256, "rsa.key", "k1"),
        jwk(Algorithm::ES256, "ec256.key", "k2"),
    ]));
    let k2 = sign(Algorithm::ES256, "ec256.key", Some("k2"), &body);
    assert_eq!(attempt(&gw, Some(&k2), None).await, Ok(()));
    assert_eq!(idp.fetches() - before, 2);

    // Fetch starts are at least MIN_REFRESH apart, so in a window of `elapsed` there are at most
    // elapsed / MIN_REFRESH + 1 of them, however long the flood takes on this machine.
    let flood: Vec<String> = (0..30)
        .map(|i| {
            let kid = format!("forged-{i}");
            sign(Algorithm::RS256, "rsa-other.key", Some(&kid), &body)
        })
        .collect();
    let started = std::time::Instant::now();
    let before_flood = idp.fetches();
    let results = join_all(flood.iter().map(|t| attempt(&gw, Some(t), None))).await;
    let elapsed = started.elapsed();
    let fetched = idp.fetches() - before_flood;
    assert!(
        results
            .iter()
            .all(|r| *r == refused(401, "token_signature")),
        "{results:?}"
    );
    let bound = elapsed.as_secs() / MIN_REFRESH + 1;
    assert!(
        (1..=bound).contains(&fetched),
        "{fetched} fetches for 30 forged kids in {elapsed:?} (rate limit: one per {MIN_REFRESH}s)"
    );
    assert_eq!(attempt(&gw, Some(&k2), None).await, Ok(()));
}

async fn open_session(gw: &Gateway, token: &str) -> (rfb_client::WsClient, rfb_client::RfbSession) {
    let c = WsConnect::new(gw.ws_url(&format!("?token={token}")));
    let (mut ws, _) = rfb_client::connect(&c).await.expect("upgrade");
    let session = rfb_client::rfb_handshake(&mut ws).await.expect("handshake");
    (ws, session)
}

#[tokio::test]
async fn live_session_closes_with_4001_when_its_token_expires() {
    let auth =
        "  algorithms: [HS256]\n  secret_env: VNCGATE_JWT_SECRET\n  leeway_seconds: 0\n".to_owned();
    let (_backend, gw) = gateway(auth).await;
    let token = sign_with_secret(
        Algorithm::HS256,
        SECRET.as_bytes(),
        None,
        &json!({"sub": "alice", "exp": now() + 2}),
    );
    let (mut ws, _) = open_session(&gw, &token).await;
    let frame = rfb_client::read_close(&mut ws).await.expect("close frame");
    assert_eq!(u16::from(frame.code), 4001);
    let ended = gw.wait_log(|v| v["event"] == "session_ended").await;
    assert_eq!(ended["close_code"], 4001);
}

#[tokio::test]
async fn revocation_closes_live_sessions_and_refuses_the_token() {
    let (_backend, gw) = gateway(common_auth()).await;
    let revoked = sign_with_secret(
        Algorithm::HS256,
        SECRET.as_bytes(),
        None,
        &json!({"sub": "alice", "sid": "a1", "jti": "j-1", "exp": now() + 600}),
    );
    let other = sign_with_secret(
        Algorithm::HS256,
        SECRET.as_bytes(),
        None,
        &json!({"sub": "bob", "jti": "j-2", "exp": now() + 600}),
    );
    let (mut ws, _) = open_session(&gw, &revoked).await;
    let (mut bystander, mut session) = open_session(&gw, &other).await;

    let (status, body) = common::http_request(
        gw.admin_port,
        "POST",
        "/admin/revoke",
        &[],
        r#"{"jti":"j-1"}"#,
    )
    .await;
    assert_eq!(status, 401, "revocation needs the admin token: {body}");
    let (status, body) = gw.admin("POST", "/admin/revoke", r#"{"jti":"j-1"}"#).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("json")["closed"],
        1
    );
    assert_eq!(
        u16::from(rfb_client::read_close(&mut ws).await.expect("close").code),
        4003
    );
    assert_eq!(
        attempt(&gw, Some(&revoked), None).await,
        refused(403, "token_revoked")
    );
    assert_eq!(
        gw.metric("vncgate_auth_failures_total{reason=\"token_revoked\"}")
            .await,
        1.0
    );

    // Bob's session is untouched.
    rfb_client::first_framebuffer_update(&mut bystander, &mut session)
        .await
        .expect("bob still served");

    let (status, _) = gw.admin("POST", "/admin/revoke", r#"{"nope":1}"#).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn admin_kick_closes_the_session_with_4003() {
    let (_backend, gw) = gateway(common_auth()).await;
    let token = sign_with_secret(
        Algorithm::HS256,
        SECRET.as_bytes(),
        None,
        &json!({"sub": "alice", "sid": "kick-me", "exp": now() + 600}),
    );
    let (mut ws, _) = open_session(&gw, &token).await;
    let (status, body) = gw.admin("DELETE", "/admin/sessions/kick-me", "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        u16::from(rfb_client::read_close(&mut ws).await.expect("close").code),
        4003
    );
    let (status, _) = gw
        .admin("DELETE", "/admin/sessions/no-such-session", "")
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn repeated_auth_failures_from_one_address_are_throttled() {
    let backend = RfbServer::start(Mode::Echo).await.expect("fixture");
    let mut cfg = GatewayConfig::new(vec![BackendSpec::fixture("desk", &backend)]);
    cfg.extra = "limits:\n  auth_failures_per_minute: 3\n".into();
    let gw = Gateway::start(cfg).await;
    for _ in 0..3 {
        assert_eq!(
            attempt(&gw, Some("bad.token.here"), None).await,
            refused(401, "token_malformed")
        );
    }
    // Even a valid token is refused from this address until the window passes.
    let good = common::token("alice", None);
    assert_eq!(
        attempt(&gw, Some(&good), None).await,
        refused(429, "too_many_auth_failures")
    );
}

/// Stale tabs (noVNC retries an expired or revoked token every 5 s) are not an attack: behind
/// one NAT address they must not lock everyone else out.
#[tokio::test]
async fn expired_and_revoked_tokens_do_not_count_toward_the_throttle() {
    let backend = RfbServer::start(Mode::Echo).await.expect("fixture");
    let mut cfg = GatewayConfig::new(vec![BackendSpec::fixture("desk", &backend)]);
    cfg.extra = "limits:\n  auth_failures_per_minute: 3\n".into();
    let gw = Gateway::start(cfg).await;
    let expired = sign_with_secret(
        Algorithm::HS256,
        SECRET.as_bytes(),
        None,
        &json!({"sub": "stale", "exp": now() - 3600}),
    );
    for _ in 0..10 {
        assert_eq!(
            attempt(&gw, Some(&expired), None).await,
            refused(401, "token_expired")
        );
    }
    let (status, _) = gw
        .admin("POST", "/admin/revoke", r#"{"jti":"j-stale"}"#)
        .await;
    assert_eq!(status, 200);
    let revoked = sign_with_secret(
        Algorithm::HS256,
        SECRET.as_bytes(),
        None,
        &json!({"sub": "stale2", "jti": "j-stale", "exp": now() + 600}),
    );
    for _ in 0..10 {
        assert_eq!(
            attempt(&gw, Some(&revoked), None).await,
            refused(403, "token_revoked")
        );
    }
    let good = common::token("alice", None);
    assert_eq!(attempt(&gw, Some(&good), None).await, Ok(()));
    // Still counted in the metric: the on-call view of failures is unchanged.
    assert_eq!(
        gw.metric("vncgate_auth_failures_total{reason=\"token_expired\"}")
            .await,
        10.0
    );
}

fn common_auth() -> String {
    "  algorithms: [HS256]\n  secret_env: VNCGATE_JWT_SECRET\n".to_owned()
}

/// A revocation that arrives while the upgrade is still connecting to its backend (after the
/// revocation check, before the 101) must still reach the connection: it starts closed, 4003.
/// The backend here holds its RFB greeting until the test has revoked the token.
#[tokio::test]
async fn a_revocation_during_the_upgrade_is_not_lost() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut cfg = GatewayConfig::new(vec![BackendSpec::rfb("slow", addr)]);
    // Only the upgrade's own connection may reach this one-shot backend.
    cfg.pool_extra = "    health_check_interval_seconds: 0\n".into();
    let gw = Gateway::start(cfg).await;
    let token = sign_with_secret(
        Algorithm::HS256,
        SECRET.as_bytes(),
        None,
        &json!({"sub": "alice", "sid": "slow", "jti": "j-slow", "exp": now() + 600}),
    );
    let url = gw.ws_url(&format!("?token={token}"));
    let upgrade = tokio::spawn(async move { rfb_client::connect(&WsConnect::new(url)).await });
    let (mut backend, _) = listener
        .accept()
        .await
        .expect("the upgrade's backend connect");

    let (status, body) = gw
        .admin("POST", "/admin/revoke", r#"{"jti":"j-slow"}"#)
        .await;
    assert_eq!(status, 200, "{body}");

    // Now the backend answers: RFB 3.8, security None, ServerInit.
    backend.write_all(b"RFB 003.008\n").await.expect("greeting");
    let mut version = [0u8; 12];
    backend.read_exact(&mut version).await.expect("version");
    backend.write_all(&[1, 1]).await.expect("types");
    let mut choice = [0u8; 1];
    backend.read_exact(&mut choice).await.expect("choice");
    backend
        .write_all(&0u32.to_be_bytes())
        .await
        .expect("result");
    backend.read_exact(&mut choice).await.expect("client init");
    let mut init = vec![
        0, 8, 0, 8, 32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0,
    ];
    init.extend_from_slice(&4u32.to_be_bytes());
    init.extend_from_slice(b"slow");
    backend.write_all(&init).await.expect("server init");

    let (mut ws, _) = upgrade.await.expect("join").expect("101");
    let frame = rfb_client::read_close(&mut ws).await.expect("close frame");
    assert_eq!(u16::from(frame.code), 4003);
}
