//! Redis outages the gateway must notice by itself, through a real `redis-server` and, where the
//! outage is a broken network path rather than a dead server, a fault-injecting TCP proxy:
//! - a half-open path (blackhole) or a killed server turns `/readyz` degraded and the store
//!   gauges to 0 with no request traffic at all;
//! - a replica whose event subscription was dead resubscribes and catches up on the kicks and
//!   revocations it missed;
//! - admin calls say what they did when Redis is down (not a plain 200);
//! - owner binding and replica agreement hold while Redis is down or refuses writes, and pins
//!   written back after an outage do not overwrite another replica's.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

use common::fault_proxy::{Fault, FaultProxy};
use common::redis_server::RedisServer;
use common::rfb_client::{self, WsConnect};
use common::rfb_server::RfbServer;
use common::{
    BackendSpec, EVENT_TIMEOUT, Gateway, GatewayConfig, Live, desks, now, open_session as open,
};
use redis::AsyncCommands;
use serde_json::{Value, json};

/// Between two looks at an endpoint that changes on its own; the deadline is [`EVENT_TIMEOUT`].
const POLL_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

fn config(desks: &[RfbServer], redis_url: String) -> GatewayConfig {
    let backends = desks
        .iter()
        .enumerate()
        .map(|(i, d)| BackendSpec::rfb(&format!("d{i}"), d.addr))
        .collect();
    let mut cfg = GatewayConfig::new(backends);
    cfg.redis_url = Some(redis_url);
    cfg.extra = "limits:\n  max_sessions_per_user: 100\n".into();
    cfg
}

fn redis_addr(redis: &RedisServer) -> SocketAddr {
    (Ipv4Addr::LOCALHOST, redis.port).into()
}

fn url_via(proxy: &FaultProxy) -> String {
    format!("redis://{}/0", proxy.addr())
}

fn jwt(sub: &str, sid: &str, extra: Value) -> String {
    let mut claims = json!({ "sub": sub, "sid": sid, "exp": now() + 600 });
    if let (Some(claims), Value::Object(extra)) = (claims.as_object_mut(), extra) {
        claims.extend(extra);
    }
    common::token_with_claims(&claims)
}

async fn refusal(gw: &Gateway, token: &str) -> (u16, String) {
    let c = WsConnect::new(gw.ws_url(&format!("?token={token}")));
    let err = rfb_client::connect(&c).await.err().expect("refused");
    rfb_client::error_code(&err).expect("http refusal")
}

async fn readyz(gw: &Gateway) -> Value {
    let (_, body) = gw.admin_get("/readyz").await;
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("/readyz {body}: {e}"))
}

/// Polls `/readyz` until `pred` holds; the state changes on its own (pings), so there is no
/// event to await, only a deadline.
async fn readyz_until(gw: &Gateway, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        let ready = readyz(gw).await;
        if pred(&ready) {
            return ready;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz did not turn {what} within {EVENT_TIMEOUT:?}; last answer: {ready}"
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
}

fn is_degraded(ready: &Value) -> bool {
    ready["status"] == "degraded" && ready["store"] == "unreachable"
}

fn fully_ready(ready: &Value) -> bool {
    ready["status"] == "ready" && ready["store"] == "ok" && ready["subscriber"] == "ok"
}

async fn close_code(live: &mut Live) -> u16 {
    let close = tokio::time::timeout(EVENT_TIMEOUT, rfb_client::read_close(&mut live.ws))
        .await
        .expect("no close frame in time")
        .expect("close frame");
    u16::from(close.code)
}

/// A gateway whose Redis path runs through a fault proxy, started and fully ready (subscribed,
/// store and subscriber up).
struct ProxiedStore {
    redis: RedisServer,
    proxy: FaultProxy,
    desks: Vec<RfbServer>,
    gw: Gateway,
}

async fn proxied_store(n_desks: usize) -> ProxiedStore {
    let redis = RedisServer::start().await.expect("redis");
    let proxy = FaultProxy::start(redis_addr(&redis)).await.expect("proxy");
    let desks = desks(n_desks).await;
    let gw = Gateway::start(config(&desks, url_via(&proxy))).await;
    gw.wait_log(|v| v["event"] == "store_subscribed").await;
    readyz_until(&gw, "ready", fully_ready).await;
    assert_eq!(gw.metric("vncgate_store_up").await, 1.0);
    assert_eq!(gw.metric("vncgate_store_subscriber_up").await, 1.0);
    ProxiedStore {
        redis,
        proxy,
        desks,
        gw,
    }
}

/// A half-open path to Redis (no FIN, no RST, nothing answers) is noticed by the liveness pings
/// alone: no upgrade, no admin call touches the store. When the path heals, everything is up
/// again.
#[tokio::test]
async fn a_blackholed_redis_path_is_noticed_without_traffic() {
    let ProxiedStore {
        redis: _redis,
        proxy,
        desks: _desks,
        gw,
    } = proxied_store(1).await;

    proxy.set(Fault::Blackhole);
    let ready = readyz_until(&gw, "degraded with the subscriber down", |r| {
        is_degraded(r) && r["subscriber"] == "down"
    })
    .await;
    assert_eq!(ready["backends"]["healthy"], 1, "{ready}");
    assert_eq!(gw.metric("vncgate_store_up").await, 0.0);
    assert_eq!(gw.metric("vncgate_store_subscriber_up").await, 0.0);

    proxy.set(Fault::Pass);
    gw.wait_log(|v| v["event"] == "store_reconnected").await;
    readyz_until(&gw, "ready again", fully_ready).await;
    assert_eq!(gw.metric("vncgate_store_subscriber_up").await, 1.0);
}

/// A Redis that dies (SIGKILL) is noticed the same way, without any upgrade asking the store.
#[tokio::test]
async fn a_killed_redis_is_noticed_without_traffic() {
    let mut redis = RedisServer::start().await.expect("redis");
    let desks = desks(1).await;
    let gw = Gateway::start(config(&desks, redis.url())).await;
    gw.wait_log(|v| v["event"] == "store_subscribed").await;
    readyz_until(&gw, "ready", fully_ready).await;

    redis.kill().await.expect("kill redis");
    readyz_until(&gw, "degraded", is_degraded).await;
    assert_eq!(gw.metric("vncgate_store_up").await, 0.0);
    assert_eq!(gw.metric("vncgate_store_subscriber_up").await, 0.0);
}

/// Replica B's only path to Redis goes half-open. Meanwhile replica A revokes a token used on B
/// and kicks another session living on B: the events are published while B cannot hear them.
/// Once the path heals, B notices its subscription is dead, subscribes again, and catches up
/// from the store: both sessions close with 4003.
#[tokio::test]
async fn a_replica_that_missed_kicks_and_revocations_catches_up() {
    let redis = RedisServer::start().await.expect("redis");
    let proxy = FaultProxy::start(redis_addr(&redis)).await.expect("proxy");
    let desks = desks(2).await;
    let (a, b) = tokio::join!(
        Gateway::start(config(&desks, redis.url())),
        Gateway::start(config(&desks, url_via(&proxy)))
    );
    b.wait_log(|v| v["event"] == "store_subscribed").await;
    let mut bob = open(&b, &jwt("bob", "bobs", json!({ "jti": "jti-bob" }))).await;
    let mut carol = open(&b, &jwt("carol", "carols", json!({}))).await;

    proxy.set(Fault::Blackhole);
    readyz_until(&b, "degraded with the subscriber down", |r| {
        r["status"] == "degraded" && r["subscriber"] == "down"
    })
    .await;

    let (status, body) = a
        .admin("POST", "/admin/revoke", r#"{"jti":"jti-bob"}"#)
        .await;
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(
        (&answer["closed"], &answer["stored"], &answer["broadcast"]),
        (&json!(0), &json!(true), &json!(true)),
        "{body}"
    );
    let (status, body) = a.admin("DELETE", "/admin/sessions/carols", "").await;
    assert_eq!(status, 200, "{body}");
    let mut con = redis.client().await.expect("client");
    let kicked_at: Option<u64> = con.get("vncgate:kicked:carols").await.expect("get");
    assert!(
        kicked_at.is_some(),
        "the kick is stored for replicas that miss it"
    );

    proxy.set(Fault::Pass);
    assert_eq!(close_code(&mut bob).await, 4003, "revoked token on B");
    assert_eq!(close_code(&mut carol).await, 4003, "kicked session on B");
    let caught_up = b
        .wait_log(|v| {
            v["event"] == "store_caught_up"
                && (v["revoked_closed"].as_u64().unwrap_or(0)
                    + v["kicked_closed"].as_u64().unwrap_or(0))
                    > 0
        })
        .await;
    assert_eq!(
        (&caught_up["revoked_closed"], &caught_up["kicked_closed"]),
        (&json!(1), &json!(1)),
        "{caught_up}"
    );
    b.wait_log(|v| v["event"] == "store_subscribed" && v["resubscribed"] == true)
        .await;
    // B refuses the revoked token from now on; the kicked session may come back (a kick is not
    // a ban), on the same desktop.
    assert_eq!(
        refusal(&b, &jwt("bob", "bobs", json!({ "jti": "jti-bob" }))).await,
        (403, "token_revoked".into())
    );
    let again = open(&b, &jwt("carol", "carols", json!({}))).await;
    assert_eq!(again.session.server_name, carol.session.server_name);
}

/// With Redis down, an admin call answers what it did: 202 when it acted on this replica only,
/// 503 `store_unavailable` when it could do nothing at all; never a plain 200.
#[tokio::test]
async fn admin_calls_with_redis_down_say_what_they_did() {
    let mut redis = RedisServer::start().await.expect("redis");
    let desks = desks(1).await;
    let gw = Gateway::start(config(&desks, redis.url())).await;
    let mut alice = open(&gw, &jwt("alice", "live", json!({}))).await;
    redis.kill().await.expect("kill redis");
    readyz_until(&gw, "degraded", is_degraded).await;

    let (status, body) = gw.admin("DELETE", "/admin/sessions/live", "").await;
    assert_eq!(status, 202, "{body}");
    let answer: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(
        (&answer["closed"], &answer["stored"], &answer["broadcast"]),
        (&json!(1), &json!(false), &json!(false)),
        "{body}"
    );
    assert_eq!(close_code(&mut alice).await, 4003);

    let (status, body) = gw.admin("DELETE", "/admin/sessions/elsewhere", "").await;
    assert_eq!(status, 503, "{body}");
    let answer: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(answer["error"], "store_unavailable", "{body}");
    assert_eq!(
        (&answer["closed"], &answer["broadcast"]),
        (&json!(0), &json!(false))
    );

    let (status, body) = gw
        .admin(
            "PUT",
            "/admin/sessions/elsewhere/input",
            r#"{"mode":"view_only"}"#,
        )
        .await;
    assert_eq!(status, 503, "{body}");

    // A revocation always does something: this replica refuses the token from now on.
    let (status, body) = gw
        .admin("POST", "/admin/revoke", r#"{"jti":"jti-x"}"#)
        .await;
    assert_eq!(status, 202, "{body}");
    let answer: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(
        (&answer["stored"], &answer["broadcast"]),
        (&json!(false), &json!(false)),
        "{body}"
    );
    assert_eq!(
        refusal(&gw, &jwt("alice", "other", json!({ "jti": "jti-x" }))).await,
        (403, "token_revoked".into())
    );
}

enum Outage {
    /// The server is gone.
    Killed,
    /// Reads still work, every write fails (`READONLY`), as during a failover: claims error.
    ReadOnly,
}

/// Two replicas; A carries a session on the backend that the rendezvous hash prefers for the
/// `sid` "fresh", so by load alone A would place "fresh" elsewhere than an idle B. During the
/// outage both place "fresh" by rendezvous on the same backend, and A binds it to its first
/// owner: another `sub` gets 403 there.
async fn placement_holds_during(outage: Outage) {
    let mut redis = RedisServer::start().await.expect("redis");
    let desks = desks(2).await;
    let (a, b) = tokio::join!(
        Gateway::start(config(&desks, redis.url())),
        Gateway::start(config(&desks, redis.url()))
    );
    let preferred = vncgate::routing::placement::least_loaded("fresh", &[("d0", 0), ("d1", 0)])
        .expect("a backend")
        .to_owned();
    let load = open(
        &a,
        &jwt("loader", "load", json!({ "backend": preferred.clone() })),
    )
    .await;
    assert_eq!(load.session.server_name, preferred);

    match outage {
        Outage::Killed => redis.kill().await.expect("kill redis"),
        Outage::ReadOnly => {
            let mut con = redis.client().await.expect("client");
            // A master that does not exist: the server stays a read-only replica, serving its
            // (stale) data, refusing every write.
            let closed_port = common::free_port();
            let _: () = redis::cmd("REPLICAOF")
                .arg("127.0.0.1")
                .arg(closed_port)
                .query_async(&mut con)
                .await
                .expect("replicaof");
        }
    }

    let on_a = open(&a, &jwt("alice", "fresh", json!({}))).await;
    let on_b = open(&b, &jwt("alice", "fresh", json!({}))).await;
    assert_eq!(
        (
            on_a.session.server_name.as_str(),
            on_b.session.server_name.as_str()
        ),
        (preferred.as_str(), preferred.as_str()),
        "replicas must agree by rendezvous while the store cannot"
    );
    assert_eq!(
        refusal(&a, &jwt("mallory", "fresh", json!({}))).await,
        (403, "session_owned_by_other_user".into())
    );
    // The owner still gets in.
    let again = open(&a, &jwt("alice", "fresh", json!({}))).await;
    assert_eq!(again.session.server_name, preferred);
}

#[tokio::test]
async fn owner_binding_and_rendezvous_hold_while_redis_is_down() {
    placement_holds_during(Outage::Killed).await;
}

#[tokio::test]
async fn owner_binding_and_rendezvous_hold_while_redis_refuses_writes() {
    placement_holds_during(Outage::ReadOnly).await;
}

/// While Redis is down, each replica binds the same new `sid` to a different user (neither can
/// know of the other). When Redis is back, the first write-back wins; the second is not written
/// over it but logged as a conflict, and from then on both replicas follow the stored pin.
#[tokio::test]
async fn written_back_pins_do_not_overwrite_another_replicas_pin() {
    let mut redis = RedisServer::start().await.expect("redis");
    let desks = desks(2).await;
    let (a, b) = tokio::join!(
        Gateway::start(config(&desks, redis.url())),
        Gateway::start(config(&desks, redis.url()))
    );
    redis.kill().await.expect("kill redis");
    readyz_until(&a, "degraded", is_degraded).await;
    readyz_until(&b, "degraded", is_degraded).await;
    let _alice = open(&a, &jwt("alice", "twice", json!({}))).await;
    let _bob = open(&b, &jwt("bob", "twice", json!({}))).await;

    redis.restart().await.expect("restart redis");
    a.wait_log(|v| v["event"] == "store_reconnected").await;
    b.wait_log(|v| v["event"] == "store_reconnected").await;
    let conflicts: Vec<Value> = [&a, &b]
        .iter()
        .flat_map(|gw| gw.logs())
        .filter(|v| v["event"] == "store_pin_conflict")
        .collect();
    assert_eq!(conflicts.len(), 1, "one write-back lost: {conflicts:?}");
    let owner = redis.pin_field("twice", "owner").await;
    let owner = owner.expect("a pin");
    let other = if owner == "alice" { "bob" } else { "alice" };
    assert_eq!(
        conflicts[0]["store_owner"], owner,
        "the conflict names the pin that holds"
    );
    for gw in [&a, &b] {
        assert_eq!(
            refusal(gw, &jwt(other, "twice", json!({}))).await,
            (403, "session_owned_by_other_user".into())
        );
        open(gw, &jwt(&owner, "twice", json!({}))).await;
    }
}

/// The fault proxy itself, against a real Redis speaking RESP over raw sockets: it forwards,
/// delays without losing bytes, resets with RST, closes with FIN, and holds a paused connection
/// until the pause ends.
#[tokio::test]
async fn the_fault_proxy_does_what_it_says() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let redis = RedisServer::start().await.expect("redis");
    let proxy = FaultProxy::start(redis_addr(&redis)).await.expect("proxy");
    async fn ping(s: &mut tokio::net::TcpStream) -> std::io::Result<String> {
        s.write_all(b"PING\r\n").await?;
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).await?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }
    let connect = || tokio::net::TcpStream::connect(proxy.addr());

    let mut a = connect().await.expect("connect");
    assert_eq!(ping(&mut a).await.expect("pass"), "+PONG\r\n");
    proxy.wait_connections(1).await;

    proxy.set(Fault::Delay(std::time::Duration::from_millis(20)));
    for _ in 0..5 {
        assert_eq!(ping(&mut a).await.expect("delayed"), "+PONG\r\n");
    }

    // Paused: the request is held, and answered once the pause ends.
    proxy.set(Fault::Pause);
    a.write_all(b"PING\r\n").await.expect("write");
    proxy.set(Fault::Pass);
    let mut buf = [0u8; 7];
    a.read_exact(&mut buf).await.expect("after the pause");
    assert_eq!(&buf, b"+PONG\r\n");

    proxy.set(Fault::Reset);
    let mut byte = [0u8; 1];
    let err = a.read(&mut byte).await.expect_err("reset");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);

    proxy.set(Fault::Pass);
    let mut b = connect().await.expect("connect");
    assert_eq!(ping(&mut b).await.expect("pass again"), "+PONG\r\n");
    proxy.set(Fault::Drop);
    assert_eq!(b.read(&mut byte).await.expect("orderly close"), 0, "FIN");
    assert!(proxy.accepted() >= 2);
}

/// `fut` must finish within [`EVENT_TIMEOUT`]: a hang is a failure, not a stuck test.
async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(EVENT_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {EVENT_TIMEOUT:?}"))
}

/// The backend the rendezvous hash picks for `sid` over d0 and d1 (where degraded placement
/// sends a session without a pin), and the other one.
fn rendezvous(sid: &str) -> (String, String) {
    let preferred = vncgate::routing::placement::least_loaded(sid, &[("d0", 0), ("d1", 0)])
        .expect("a backend")
        .to_owned();
    let other = if preferred == "d0" { "d1" } else { "d0" };
    (preferred, other.to_owned())
}

/// A live session relays: a framebuffer update request is answered, with the colour of the
/// desk it was placed on (`desks` paints d{i} in red `i`).
async fn assert_relays(live: &mut Live, what: &str) {
    let update = within(
        what,
        rfb_client::first_framebuffer_update(&mut live.ws, &mut live.session),
    )
    .await
    .unwrap_or_else(|e| panic!("{what}: no framebuffer update: {e}"));
    let desk: u8 = live.session.server_name[1..].parse().expect("d{i}");
    assert_eq!(update.first_pixel_rgb, [desk, 0, 0], "{what}");
}

async fn live_session_ids(gw: &Gateway) -> Vec<String> {
    let (status, body) = gw.admin("GET", "/admin/sessions", "").await;
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).expect("json");
    let mut sids: Vec<String> = answer["sessions"]
        .as_array()
        .expect("sessions")
        .iter()
        .map(|s| s["session_id"].as_str().expect("session_id").to_owned())
        .collect();
    sids.sort();
    sids
}

/// The path to Redis breaks mid-stream with `fault` (RST or FIN on every current connection,
/// and on every new one while it holds). The replica notices by itself and serves degraded;
/// the two live sessions (one on each desk) keep relaying and stay registered; new upgrades
/// still get in, bound as before (the live session's owner back to its desk, which is not the
/// rendezvous choice; another user refused; a new `sid` twice on the same desk). When the path
/// heals, the store is up again, the pins of the sessions opened meanwhile are written back,
/// and the live sessions still relay.
async fn a_broken_redis_path_degrades_then_recovers(fault: Fault) {
    let ProxiedStore {
        redis,
        proxy,
        desks: _desks,
        gw,
    } = proxied_store(2).await;

    // Alice's session sits on the desk the rendezvous hash does NOT pick for her sid, so only
    // her pin can send her back there while the store is away.
    let (_, alices_desk) = rendezvous("alive");
    let bobs_desk = if alices_desk == "d0" { "d1" } else { "d0" };
    let mut alice = open(
        &gw,
        &jwt("alice", "alive", json!({ "backend": alices_desk.clone() })),
    )
    .await;
    let mut bob = open(&gw, &jwt("bob", "bobs", json!({ "backend": bobs_desk }))).await;
    assert_eq!(
        (
            alice.session.server_name.as_str(),
            bob.session.server_name.as_str()
        ),
        (alices_desk.as_str(), bobs_desk)
    );
    assert_relays(&mut alice, "alice before the fault").await;
    assert_relays(&mut bob, "bob before the fault").await;

    proxy.set(fault);
    let ready = readyz_until(&gw, "degraded with the subscriber down", |r| {
        is_degraded(r) && r["subscriber"] == "down"
    })
    .await;
    assert_eq!(ready["backends"]["healthy"], 2, "{ready}");
    assert_eq!(gw.metric("vncgate_store_up").await, 0.0);
    assert_eq!(gw.metric("vncgate_store_subscriber_up").await, 0.0);

    // The live sessions are untouched: registered and relaying.
    assert_eq!(live_session_ids(&gw).await, ["alive", "bobs"]);
    assert_relays(&mut alice, "alice while the store is away").await;
    assert_relays(&mut bob, "bob while the store is away").await;

    // New upgrades get in, degraded, with owner binding intact.
    let again = within(
        "alice's second upgrade",
        open(&gw, &jwt("alice", "alive", json!({}))),
    )
    .await;
    assert_eq!(
        again.session.server_name, alices_desk,
        "the cached pin, not the rendezvous choice"
    );
    assert_eq!(
        within(
            "mallory's upgrade",
            refusal(&gw, &jwt("mallory", "alive", json!({})))
        )
        .await,
        (403, "session_owned_by_other_user".into())
    );
    let (fresh_desk, _) = rendezvous("fresh");
    let carol = within(
        "carol's upgrade",
        open(&gw, &jwt("carol", "fresh", json!({}))),
    )
    .await;
    assert_eq!(carol.session.server_name, fresh_desk);
    let carol_again = within(
        "carol's second upgrade",
        open(&gw, &jwt("carol", "fresh", json!({}))),
    )
    .await;
    assert_eq!(carol_again.session.server_name, fresh_desk);
    assert_eq!(
        within(
            "dave's upgrade",
            refusal(&gw, &jwt("dave", "fresh", json!({})))
        )
        .await,
        (403, "session_owned_by_other_user".into())
    );

    proxy.set(Fault::Pass);
    let reconnected = gw.wait_log(|v| v["event"] == "store_reconnected").await;
    assert!(
        reconnected["pins_written"].as_u64() >= Some(2),
        "the live sessions' pins are written back: {reconnected}"
    );
    readyz_until(&gw, "ready again", fully_ready).await;
    assert_eq!(gw.metric("vncgate_store_up").await, 1.0);
    assert_eq!(gw.metric("vncgate_store_subscriber_up").await, 1.0);
    let owner = redis.pin_field("fresh", "owner").await;
    assert_eq!(
        owner.as_deref(),
        Some("carol"),
        "the pin made while degraded is in the store"
    );
    // Nobody was disturbed: the sessions from before the fault still relay.
    assert_eq!(
        live_session_ids(&gw).await,
        ["alive", "alive", "bobs", "fresh", "fresh"]
    );
    assert_relays(&mut alice, "alice after the fault").await;
    assert_relays(&mut bob, "bob after the fault").await;
}

#[tokio::test]
async fn a_reset_redis_path_degrades_then_recovers_without_dropping_sessions() {
    a_broken_redis_path_degrades_then_recovers(Fault::Reset).await;
}

#[tokio::test]
async fn a_closed_redis_path_degrades_then_recovers_without_dropping_sessions() {
    a_broken_redis_path_degrades_then_recovers(Fault::Drop).await;
}

/// A store operation that failed (timed out) and was counted: the warning of the op accounting
/// (`in_a_row`), or the one that marks the store down (`store: unreachable`).
fn op_failed(v: &Value) -> bool {
    v["event"] == "store_error" && (v.get("in_a_row").is_some() || v["store"] == "unreachable")
}

/// Replies from Redis come later than the operation timeout for one moment: the path pauses
/// (nothing is lost, everything held arrives once it resumes) while three upgrades ask the
/// store, and resumes as soon as the gateway has given up on one operation. That is one slow
/// moment, not an outage, however many operations it catches in flight: the store is not
/// marked down (no `store_error` with `store: unreachable` or `in_a_row` above 1, no
/// reconnect, `vncgate_store_up` 1 and `/readyz` ready throughout), the upgrades made during
/// the spike get in, and those after it are pinned in the store again. Counting the three
/// concurrent timeouts as three failures in a row (the old accounting) fails it.
#[tokio::test]
async fn one_slow_redis_reply_does_not_mark_the_store_down() {
    let ProxiedStore {
        redis,
        proxy,
        desks: _desks,
        gw,
    } = proxied_store(1).await;
    let mut bystander = open(&gw, &jwt("bystander", "calm", json!({}))).await;
    let failed_before = gw.logs().iter().filter(|v| op_failed(v)).count();

    // Watch /readyz and the gauge for as long as the spike and its aftermath last.
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = {
        let watching = std::sync::Arc::clone(&watching);
        let admin_port = gw.admin_port;
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while watching.load(std::sync::atomic::Ordering::SeqCst) {
                let (_, body) = common::http_get(admin_port, "/readyz", &[]).await;
                let ready: Value = serde_json::from_str(&body).expect("json");
                let (_, metrics) = common::http_get(admin_port, "/metrics", &[]).await;
                let up = metrics
                    .lines()
                    .find_map(|l| l.strip_prefix("vncgate_store_up "))
                    .map(str::trim)
                    .map(str::to_owned);
                seen.push((ready, up));
                tokio::time::sleep(POLL_EVERY).await;
            }
            seen
        })
    };

    // Three upgrades are in flight when the path pauses: their store operations all time out
    // at the same moment, which is one hiccup, not three failures in a row.
    let spike_tokens: Vec<String> = (0..3)
        .map(|i| jwt("alice", &format!("spike{i}"), json!({})))
        .collect();
    let logs_before = gw.logs().len();
    proxy.set(Fault::Pause);
    let spike_upgrades = futures_util::future::join_all(
        spike_tokens
            .iter()
            .map(|t| within("an upgrade during the spike", open(&gw, t))),
    );
    let end_of_spike = async {
        let failed = gw.wait_logs(failed_before + 1, op_failed).await;
        proxy.set(Fault::Pass);
        failed[failed_before].clone()
    };
    let (during, first_failure) = tokio::join!(spike_upgrades, end_of_spike);
    assert_eq!(
        (&first_failure["in_a_row"], &first_failure["store"]),
        (&json!(1), &Value::Null),
        "one timed-out operation marked the store down: {first_failure}"
    );
    for live in &during {
        assert_eq!(live.session.server_name, "d0");
    }

    // After the spike, upgrades are placed through the store again.
    let mut after = Vec::new();
    for i in 0..3 {
        let sid = format!("after{i}");
        after.push(
            within(
                "an upgrade after the spike",
                open(&gw, &jwt("alice", &sid, json!({}))),
            )
            .await,
        );
        let owner = redis.pin_field(&sid, "owner").await;
        assert_eq!(owner.as_deref(), Some("alice"), "{sid} pinned in the store");
    }
    // Their session_started lines come after anything the spike made the gateway log.
    gw.wait_logs(7, |v| v["event"] == "session_started").await;
    watching.store(false, std::sync::atomic::Ordering::SeqCst);
    let seen = watcher.await.expect("watcher");

    let downs: Vec<Value> = gw
        .logs()
        .into_iter()
        .skip(logs_before)
        .filter(|v| {
            (v["event"] == "store_error"
                && (v["store"] == "unreachable"
                    || v["op"] == "subscribe"
                    || v["in_a_row"].as_u64().is_some_and(|n| n > 1)))
                || v["event"] == "store_reconnected"
        })
        .collect();
    assert!(downs.is_empty(), "the store went down: {downs:?}");
    assert!(!seen.is_empty());
    for (ready, up) in &seen {
        assert!(fully_ready(ready), "/readyz during the spike: {ready}");
        assert_eq!(
            up.as_deref(),
            Some("1"),
            "vncgate_store_up during the spike"
        );
    }
    assert_eq!(gw.metric("vncgate_store_up").await, 1.0);
    readyz_until(&gw, "ready", fully_ready).await;
    assert_relays(&mut bystander, "the session from before the spike").await;
}
