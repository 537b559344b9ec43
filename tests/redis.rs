//! Sticky sessions across replicas through a real `redis-server` (contract §4): two gateway
//! replicas share pins, agree on first placement under concurrency, bind sessions to their
//! owner, carry kicks and revocations to each other, and survive Redis being killed: live
//! sessions untouched, new ones placed by rendezvous, pins written back when Redis returns.
//!
//! The sharing tests (sticky, owner/kick/revoke, concurrent first connections) run unchanged
//! against a standalone Redis and a Redis Cluster (3 masters, 3 replicas): keys of different
//! sessions land in different slots there, on different masters.

mod common;

use std::collections::HashSet;

use common::redis_server::RedisServer;
use common::redis_topology::{TestStore, Topo, scenario};
use common::rfb_client::{self, WsConnect};
use common::rfb_server::RfbServer;
use common::{BackendSpec, Gateway, GatewayConfig, StoreSpec, desks, now, open_session as open};
use futures_util::future::join_all;
use redis::AsyncCommands;
use rstest::rstest;
use serde_json::json;

fn config(desks: &[RfbServer], redis: &RedisServer) -> GatewayConfig {
    scenario::config(desks, &StoreSpec::Standalone(redis.url()))
}

async fn replicas(desks: &[RfbServer], redis: &RedisServer) -> (Gateway, Gateway) {
    scenario::replicas(desks, &StoreSpec::Standalone(redis.url())).await
}

fn jwt(sub: &str, sid: &str, jti: Option<&str>) -> String {
    let mut claims = json!({ "sub": sub, "sid": sid, "exp": now() + 600 });
    if let Some(j) = jti {
        claims["jti"] = json!(j);
    }
    common::token_with_claims(&claims)
}

async fn refusal(gw: &Gateway, token: &str) -> (u16, String) {
    let c = WsConnect::new(gw.ws_url(&format!("?token={token}")));
    let err = rfb_client::connect(&c).await.err().expect("refused");
    rfb_client::error_code(&err).expect("http refusal")
}

#[rstest]
#[case::standalone(Topo::Standalone)]
#[case::cluster(Topo::Cluster)]
#[tokio::test]
async fn sessions_reach_the_same_backend_on_either_replica(#[case] topo: Topo) {
    let redis = TestStore::start(topo).await.expect("redis");
    let desks = desks(3).await;
    let (a, b) = scenario::replicas(&desks, &redis.spec()).await;
    let name = match topo {
        Topo::Standalone => "standalone",
        Topo::Cluster => "cluster",
    };
    for gw in [&a, &b] {
        let series = format!("vncgate_store_topology{{topology=\"{name}\"}}");
        assert_eq!(gw.metric(&series).await, 1.0);
        assert_eq!(gw.metric("vncgate_store_master_up").await, 1.0);
    }
    let mut placed = Vec::new();
    for i in 0..20 {
        let live = open(&a, &jwt(&format!("u{i}"), &format!("s{i}"), None)).await;
        placed.push(live.session.server_name.clone());
    }
    assert!(
        placed.iter().collect::<HashSet<_>>().len() > 1,
        "20 sessions all on one backend: {placed:?}"
    );
    for (i, name) in placed.iter().enumerate() {
        let live = open(&b, &jwt(&format!("u{i}"), &format!("s{i}"), None)).await;
        assert_eq!(
            &live.session.server_name, name,
            "s{i} moved between replicas"
        );
    }
    // The key layout operators rely on.
    let mut con = redis.client().await.expect("client");
    let pin: std::collections::HashMap<String, String> =
        con.hgetall("vncgate:session:s0").await.expect("hgetall");
    assert_eq!(pin.get("backend"), Some(&placed[0]));
    assert_eq!(pin.get("pool").map(String::as_str), Some("default"));
    assert_eq!(pin.get("owner").map(String::as_str), Some("u0"));
    assert!(
        pin.get("created_at")
            .and_then(|v| v.parse::<u64>().ok())
            .is_some()
    );
    assert!(
        pin.get("updated_at")
            .and_then(|v| v.parse::<u64>().ok())
            .is_some()
    );
}

#[rstest]
#[case::standalone(Topo::Standalone)]
#[case::cluster(Topo::Cluster)]
#[tokio::test]
async fn concurrent_first_connections_for_one_sid_agree_on_one_backend(#[case] topo: Topo) {
    let redis = TestStore::start(topo).await.expect("redis");
    let desks = desks(3).await;
    let (a, b) = scenario::replicas(&desks, &redis.spec()).await;
    let token = jwt("alice", "contended", None);
    let attempts = (0..50).map(|i| {
        let gw = if i % 2 == 0 { &a } else { &b };
        let token = token.clone();
        async move { open(gw, &token).await }
    });
    let sessions = join_all(attempts).await;
    let names: HashSet<String> = sessions
        .iter()
        .map(|l| l.session.server_name.clone())
        .collect();
    assert_eq!(names.len(), 1, "one sid, several desktops: {names:?}");
}

#[rstest]
#[case::standalone(Topo::Standalone)]
#[case::cluster(Topo::Cluster)]
#[tokio::test]
async fn owner_binding_kick_and_revoke_work_across_replicas(#[case] topo: Topo) {
    let redis = TestStore::start(topo).await.expect("redis");
    let desks = desks(2).await;
    let (a, b) = scenario::replicas(&desks, &redis.spec()).await;

    let mut alice = open(&a, &jwt("alice", "shared", Some("jti-alice"))).await;
    assert_eq!(
        refusal(&b, &jwt("mallory", "shared", None)).await,
        (403, "session_owned_by_other_user".into())
    );

    // Kick on B closes the session living on A.
    let (status, body) = b.admin("DELETE", "/admin/sessions/shared", "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        u16::from(
            rfb_client::read_close(&mut alice.ws)
                .await
                .expect("close")
                .code
        ),
        4003
    );

    // Revoke on A closes B's session with that jti, and B refuses the token from then on.
    let mut bob = open(&b, &jwt("bob", "bobs", Some("jti-bob"))).await;
    let (status, body) = a
        .admin("POST", "/admin/revoke", r#"{"jti":"jti-bob"}"#)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        u16::from(
            rfb_client::read_close(&mut bob.ws)
                .await
                .expect("close")
                .code
        ),
        4003
    );
    assert_eq!(
        refusal(&b, &jwt("bob", "bobs", Some("jti-bob"))).await,
        (403, "token_revoked".into())
    );
    let mut con = redis.client().await.expect("client");
    let ttl: i64 = con.pttl("vncgate:revoked:jti-bob").await.expect("pttl");
    assert!(
        ttl > 0,
        "the revocation must expire with the token, got PTTL {ttl}"
    );
}

#[tokio::test]
async fn redis_failure_is_not_an_outage() {
    let mut redis = RedisServer::start().await.expect("redis");
    let desks = desks(3).await;
    let (a, b) = replicas(&desks, &redis).await;
    let mut live = Vec::new();
    for i in 0..20 {
        let gw = if i % 2 == 0 { &a } else { &b };
        live.push(open(gw, &jwt(&format!("u{i}"), &format!("live{i}"), None)).await);
    }

    redis.kill().await.expect("kill redis");
    // Every live session keeps flowing: each asks for and gets a full framebuffer update.
    for l in &mut live {
        rfb_client::first_framebuffer_update(&mut l.ws, &mut l.session)
            .await
            .expect("session survived");
    }
    // New sessions are admitted; both replicas place the same new sid on the same backend
    // without Redis (rendezvous), and say so on /readyz.
    let on_a = open(&a, &jwt("newbie", "fresh", None)).await;
    let on_b = open(&b, &jwt("newbie", "fresh", None)).await;
    assert_eq!(on_a.session.server_name, on_b.session.server_name);
    for gw in [&a, &b] {
        // One failed call is not an outage; the liveness pings mark the store down.
        gw.wait_log(|v| v["event"] == "store_error" && v["store"] == "unreachable")
            .await;
        let (status, body) = gw.admin_get("/readyz").await;
        assert_eq!(status, 200, "{body}");
        let ready: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(
            (ready["status"].as_str(), ready["store"].as_str()),
            (Some("degraded"), Some("unreachable"))
        );
        assert_eq!(gw.metric("vncgate_store_up").await, 0.0);
    }
    // A reconnect of a session that started before the outage still reaches its desktop
    // (this replica's pin cache).
    let again = open(&a, &jwt("u0", "live0", None)).await;
    assert_eq!(again.session.server_name, live[0].session.server_name);

    // Redis comes back empty: the replicas reconnect and write the live pins back.
    redis.restart().await.expect("restart redis");
    a.wait_log(|v| v["event"] == "store_reconnected").await;
    b.wait_log(|v| v["event"] == "store_reconnected").await;
    for (i, l) in live.iter().enumerate() {
        let backend = redis.pin_field(&format!("live{i}"), "backend").await;
        assert_eq!(
            backend.as_deref(),
            Some(l.session.server_name.as_str()),
            "pin of live{i} not written back"
        );
    }
    let fresh = redis.pin_field("fresh", "backend").await;
    assert_eq!(fresh.as_deref(), Some(on_a.session.server_name.as_str()));
    assert_eq!(a.metric("vncgate_store_up").await, 1.0);
    assert!(a.metric("vncgate_store_errors_total{op=\"get\"}").await >= 1.0);
}

#[tokio::test]
async fn pins_expire_after_the_idle_ttl() {
    let redis = RedisServer::start().await.expect("redis");
    let desks = desks(2).await;
    let mut cfg = config(&desks, &redis);
    cfg.session_idle_ttl_seconds = 1;
    let gw = Gateway::start(cfg).await;
    let live = open(&gw, &jwt("alice", "brief", None)).await;
    drop(live);
    gw.wait_log(|v| v["event"] == "session_ended").await;
    let mut con = redis.client().await.expect("client");
    let ttl: i64 = con.pttl("vncgate:session:brief").await.expect("pttl");
    assert!(
        (1..=1000).contains(&ttl),
        "after the last connection the pin lives the idle TTL, got PTTL {ttl}"
    );
    redis
        .wait_expired("vncgate:session:brief")
        .await
        .expect("pin expired");
    // The pin is gone, so the session id is free again (for anyone).
    let other = open(&gw, &jwt("bob", "brief", None)).await;
    assert!(!other.session.server_name.is_empty());
}

#[tokio::test]
async fn gateway_starts_and_serves_while_redis_is_down() {
    let mut redis = RedisServer::start().await.expect("redis");
    let desks = desks(1).await;
    redis.kill().await.expect("kill");
    let mut cfg = config(&desks, &redis);
    cfg.await_store = false;
    let gw = Gateway::start(cfg).await;
    gw.wait_log(|v| v["event"] == "store_error" && v["op"] == "connect")
        .await;
    let live = open(&gw, &jwt("alice", "early", None)).await;
    assert_eq!(live.session.server_name, "d0");
    redis.restart().await.expect("restart");
    gw.wait_log(|v| v["event"] == "store_reconnected").await;
    let owner = redis.pin_field("early", "owner").await;
    assert_eq!(
        owner.as_deref(),
        Some("alice"),
        "the live session's pin was written back"
    );
}

/// The input-mode switch travels like a kick: asked on one replica, applied to a connection that
/// lives on the other, without a reconnect.
#[tokio::test]
async fn input_mode_switch_reaches_a_connection_on_the_other_replica() {
    let redis = RedisServer::start().await.expect("redis");
    let desks = desks(1).await;
    let (a, b) = replicas(&desks, &redis).await;
    let _alice = open(&a, &jwt("alice", "watched", None)).await;
    let viewer = common::token_with_claims(
        &json!({ "sub": "bob", "sid": "watched", "exp": now() + 600, "share": "view" }),
    );
    let _bob = open(&b, &viewer).await;

    let (status, body) = a
        .admin(
            "PUT",
            "/admin/sessions/watched/input",
            r#"{"mode":"interactive","user":"bob"}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(answer["broadcast"], true, "{body}");
    assert_eq!(answer["connections"], 0, "bob's connection lives on B");
    let changed = b
        .wait_log(|v| v["event"] == "input_mode_changed" && v["user_id"] == "bob")
        .await;
    assert_eq!(changed["mode"], "interactive");
    let (_, sessions) = b.admin("GET", "/admin/sessions", "").await;
    let sessions: serde_json::Value = serde_json::from_str(&sessions).expect("json");
    let bob = &sessions["sessions"][0];
    assert_eq!(
        (
            bob["user_id"].as_str(),
            bob["role"].as_str(),
            bob["input_mode"].as_str()
        ),
        (Some("bob"), Some("view"), Some("interactive"))
    );
}

/// The embedded store reports itself as one master that always answers, so dashboards need no
/// special case for it.
#[tokio::test]
async fn the_memory_store_reports_its_topology() {
    let desks = desks(1).await;
    let gw = Gateway::start(GatewayConfig::new(vec![BackendSpec::rfb(
        "d0",
        desks[0].addr,
    )]))
    .await;
    assert_eq!(
        gw.metric("vncgate_store_topology{topology=\"memory\"}")
            .await,
        1.0
    );
    assert_eq!(gw.metric("vncgate_store_master_up").await, 1.0);
    for (role, n) in [("master", 1.0), ("replica", 0.0), ("sentinel", 0.0)] {
        let series = format!("vncgate_store_nodes_reachable{{role=\"{role}\"}}");
        assert_eq!(gw.metric(&series).await, n, "{series}");
    }
}
