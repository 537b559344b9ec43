//! Cluster-wide backend state and dynamic backends (contract §13), through real gateway
//! processes sharing a real `redis-server`: least-loaded placement over every replica's
//! sessions, drain marks that reach every replica and survive a restart, backends registered
//! through one replica and used through another, and `discovery: dns` pools whose backend is
//! named by the token.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::redis_server::RedisServer;
use common::redis_topology::{TestStore, Topo, scenario};
use common::rfb_client::{self, WsConnect};
use common::rfb_server::{Mode, RfbServer};
use common::{
    BackendSpec, DiscoverySpec, Gateway, GatewayConfig, Live, desks, now, open_session as open,
};
use futures_util::future::join_all;
use rstest::rstest;
use serde_json::{Value, json};

fn jwt(sub: &str, sid: &str) -> String {
    common::token_with_claims(&json!({ "sub": sub, "sid": sid, "exp": now() + 600 }))
}

fn jwt_for_backend(sub: &str, sid: &str, backend: &str) -> String {
    common::token_with_claims(
        &json!({ "sub": sub, "sid": sid, "exp": now() + 600, "backend": backend }),
    )
}

fn config(backends: Vec<BackendSpec>, redis: Option<&RedisServer>) -> GatewayConfig {
    let mut cfg = GatewayConfig::new(backends);
    cfg.redis_url = redis.map(|r| r.url());
    cfg.extra = "limits:\n  max_sessions_per_user: 1000\n".into();
    cfg
}

async fn refusal(gw: &Gateway, token: &str) -> (u16, String) {
    let c = WsConnect::new(gw.ws_url(&format!("?token={token}")));
    let err = rfb_client::connect(&c).await.err().expect("refused");
    rfb_client::error_code(&err).expect("http refusal")
}

/// Sessions per backend (the fixture's desktop name is the backend's name).
fn spread(live: &[Live]) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for l in live {
        *out.entry(l.session.server_name.clone()).or_insert(0) += 1;
    }
    out
}

async fn backends_view(gw: &Gateway) -> Value {
    let (status, body) = gw.admin("GET", "/admin/backends", "").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("json")
}

/// Poll `GET /admin/backends` until `pred` holds: the view changes at the replica's next sync
/// with the store (every second), which no event of the test's can announce.
async fn await_view(gw: &Gateway, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let view = backends_view(gw).await;
        if pred(&view) {
            return view;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: never seen; last view {view}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn backend<'v>(view: &'v Value, name: &str) -> &'v Value {
    view["backends"]
        .as_array()
        .and_then(|list| list.iter().find(|b| b["name"] == name))
        .unwrap_or(&Value::Null)
}

fn cluster_sessions(view: &Value, name: &str) -> u64 {
    backend(view, name)["cluster_sessions"]
        .as_u64()
        .unwrap_or(0)
}

/// Replica B places by the sessions replica A holds: with per-replica loads it would put as
/// many on A's busy backends as on its idle ones.
#[rstest]
#[case::standalone(Topo::Standalone)]
#[case::cluster(Topo::Cluster)]
#[tokio::test]
async fn least_loaded_counts_the_sessions_of_every_replica(#[case] topo: Topo) {
    let redis = TestStore::start(topo).await.expect("store");
    let desks = desks(4).await;
    let (a, b) = scenario::replicas(&desks, &redis.spec()).await;
    let mut on_a = Vec::new();
    for i in 0..20 {
        on_a.push(open(&a, &jwt(&format!("a{i}"), &format!("a{i}"))).await);
    }
    let first = spread(&on_a);
    assert!(first.values().all(|n| *n == 5), "{first:?}");
    // A keeps its sessions on d2 and d3 only.
    on_a.retain(|l| matches!(l.session.server_name.as_str(), "d2" | "d3"));
    await_view(&b, "A's 10 sessions on d2/d3 only", |v| {
        (cluster_sessions(v, "d0"), cluster_sessions(v, "d1")) == (0, 0)
            && (cluster_sessions(v, "d2"), cluster_sessions(v, "d3")) == (5, 5)
    })
    .await;
    let mut all = on_a;
    for i in 0..20 {
        all.push(open(&b, &jwt(&format!("b{i}"), &format!("b{i}"))).await);
    }
    // 30 sessions over 4 backends: 7 or 8 each (B alone would have put 5 on each: 5,5,10,10).
    let total = spread(&all);
    assert_eq!(total.values().sum::<usize>(), 30);
    assert!(total.values().all(|n| (7..=8).contains(n)), "{total:?}");
    let view = await_view(&a, "30 sessions counted on A", |v| {
        ["d0", "d1", "d2", "d3"]
            .iter()
            .map(|d| cluster_sessions(v, d))
            .sum::<u64>()
            == 30
    })
    .await;
    assert_eq!(view["replicas"], 2, "{view}");
    assert_eq!(a.metric("vncgate_cluster_replicas").await, 2.0);
    assert_eq!(
        a.metric("vncgate_cluster_sessions{pool=\"default\"}").await,
        30.0
    );
}

#[rstest]
#[case::standalone(Topo::Standalone)]
#[case::cluster(Topo::Cluster)]
#[tokio::test]
async fn forty_new_sessions_on_two_replicas_spread_within_one_of_even(#[case] topo: Topo) {
    let redis = TestStore::start(topo).await.expect("store");
    let desks = desks(4).await;
    let (a, b) = scenario::replicas(&desks, &redis.spec()).await;
    let opens = (0..40usize).map(|i| {
        let gw = if i.is_multiple_of(2) { &a } else { &b };
        async move { open(gw, &jwt(&format!("u{i}"), &format!("s{i}"))).await }
    });
    let live = join_all(opens).await;
    let total = spread(&live);
    assert_eq!(total.len(), 4, "{total:?}");
    assert!(total.values().all(|n| (9..=11).contains(n)), "{total:?}");
}

#[rstest]
#[case::standalone(Topo::Standalone)]
#[case::cluster(Topo::Cluster)]
#[tokio::test]
async fn a_drain_on_one_replica_applies_on_every_replica_and_survives_a_restart(
    #[case] topo: Topo,
) {
    let redis = TestStore::start(topo).await.expect("store");
    let desks = desks(2).await;
    let (a, b) = scenario::replicas(&desks, &redis.spec()).await;
    let before = open(&b, &jwt("early", "early")).await;
    let (status, body) = a.admin("POST", "/admin/backends/d0/drain", "").await;
    assert_eq!(status, 200, "{body}");
    // B hears of it by event (or at its next sync), and logs it.
    b.wait_log(|v| v["event"] == "backend_drain" && v["backend"] == "d0" && v["draining"] == true)
        .await;
    let mut new = Vec::new();
    for i in 0..6 {
        new.push(open(&b, &jwt(&format!("n{i}"), &format!("n{i}"))).await);
    }
    assert_eq!(spread(&new).get("d1"), Some(&6), "{:?}", spread(&new));
    // The session already on the drained backend (if it was) carries on: it still gets updates.
    let mut before = before;
    rfb_client::first_framebuffer_update(&mut before.ws, &mut before.session)
        .await
        .expect("a live session on a drained backend continues");

    // A replica started afterwards reads the mark from the store.
    drop(b);
    let c = Gateway::start(scenario::config(&desks, &redis.spec())).await;
    c.wait_log(|v| v["event"] == "backend_drain" && v["backend"] == "d0" && v["draining"] == true)
        .await;
    let view = backends_view(&c).await;
    assert_eq!(backend(&view, "d0")["draining"], true, "{view}");
    let late = open(&c, &jwt("late", "late")).await;
    assert_eq!(late.session.server_name, "d1");

    // Undrained on C: A follows.
    let (status, body) = c.admin("DELETE", "/admin/backends/d0/drain", "").await;
    assert_eq!(status, 200, "{body}");
    a.wait_log(|v| v["event"] == "backend_drain" && v["backend"] == "d0" && v["draining"] == false)
        .await;
}

/// 200 sandboxes come and go while sessions run, across two replicas: each session goes
/// through the replica that did not register its backend.
#[tokio::test]
async fn registered_backends_are_shared_by_every_replica() {
    const N: usize = 200;
    let redis = RedisServer::start().await.expect("redis");
    let mut sandboxes = Vec::new();
    for i in 0..N {
        let mode = Mode::Rfb {
            name: format!("sbx-{i}"),
            width: 8,
            height: 8,
            rgb: [0, 0, 0],
        };
        sandboxes.push(RfbServer::start(mode).await.expect("fixture"));
    }
    let registry = || {
        let mut cfg = config(Vec::new(), Some(&redis));
        cfg.discovery = Some(DiscoverySpec::Registry);
        cfg
    };
    let (a, b) = tokio::join!(Gateway::start(registry()), Gateway::start(registry()));
    let replica = |i: usize| {
        if i.is_multiple_of(2) {
            (&a, &b)
        } else {
            (&b, &a)
        }
    };
    for (i, sbx) in sandboxes.iter().enumerate() {
        let (registrar, _) = replica(i);
        let body = json!({ "addr": sbx.addr.to_string() }).to_string();
        let path = format!("/admin/pools/default/backends/sbx-{i}");
        let (status, answer) = registrar.admin("PUT", &path, &body).await;
        assert_eq!(status, 200, "{answer}");
    }
    let mut live = Vec::new();
    for chunk in (0..N).collect::<Vec<_>>().chunks(20) {
        let opens = chunk.iter().map(|&i| {
            let (_, other) = replica(i);
            let token = jwt_for_backend(&format!("u{i}"), &format!("s{i}"), &format!("sbx-{i}"));
            async move { (i, open(other, &token).await) }
        });
        live.extend(join_all(opens).await);
    }
    for (i, l) in &live {
        assert_eq!(l.session.server_name, format!("sbx-{i}"));
    }
    for gw in [&a, &b] {
        await_view(gw, "200 registered backends", |v| {
            v["backends"]
                .as_array()
                .is_some_and(|l| l.iter().filter(|b| b["discovery"] == "registry").count() == N)
        })
        .await;
        assert_eq!(
            gw.metric("vncgate_backends_registered{pool=\"default\"}")
                .await,
            N as f64
        );
    }
    // Removed while their sessions run: the sessions continue, new connections are refused.
    for i in 0..N {
        let (registrar, _) = replica(i);
        let path = format!("/admin/pools/default/backends/sbx-{i}");
        let (status, answer) = registrar.admin("DELETE", &path, "").await;
        assert_eq!(status, 200, "{answer}");
    }
    for (_, l) in live.iter_mut().take(10) {
        rfb_client::first_framebuffer_update(&mut l.ws, &mut l.session)
            .await
            .expect("a session on a removed backend continues");
    }
    let (status, body) = refusal(&a, &jwt_for_backend("u1", "s1", "sbx-1")).await;
    assert_eq!((status, body.as_str()), (503, "backend_unavailable"));
    let (status, body) = refusal(&b, &jwt_for_backend("new", "new", "sbx-2")).await;
    assert_eq!((status, body.as_str()), (503, "backend_unavailable"));
    let (status, _) = a
        .admin("DELETE", "/admin/pools/default/backends/sbx-0", "")
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn the_registry_api_refuses_what_it_cannot_apply() {
    let desk = RfbServer::start(Mode::Rfb {
        name: "only".into(),
        width: 8,
        height: 8,
        rgb: [0, 0, 0],
    })
    .await
    .expect("fixture");
    let mut cfg = config(Vec::new(), None);
    cfg.discovery = Some(DiscoverySpec::Registry);
    let gw = Gateway::start(cfg).await;
    // Ready with no backend yet: sandboxes register once the replica takes traffic.
    let (status, body) = gw.admin_get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    let addr = json!({ "addr": desk.addr.to_string() }).to_string();
    for (path, body, status, code) in [
        (
            "/admin/pools/nope/backends/x",
            addr.as_str(),
            404,
            "not_found",
        ),
        (
            "/admin/pools/default/backends/Bad_Name",
            addr.as_str(),
            400,
            "bad_request",
        ),
        (
            "/admin/pools/default/backends/x",
            "{\"addr\": \"no-port\"}",
            400,
            "bad_request",
        ),
        (
            "/admin/pools/default/backends/x",
            "{\"address\": \"h:1\"}",
            400,
            "bad_request",
        ),
    ] {
        let (got, answer) = gw.admin("PUT", path, body).await;
        assert_eq!(got, status, "{path} {body}: {answer}");
        assert!(answer.contains(code), "{answer}");
    }
    // The embedded store keeps registrations in the process.
    let (status, answer) = gw
        .admin("PUT", "/admin/pools/default/backends/x", &addr)
        .await;
    assert_eq!(status, 200, "{answer}");
    let live = open(&gw, &jwt_for_backend("u", "s", "x")).await;
    assert_eq!(live.session.server_name, "only");
    // A token without a backend claim goes to a registered one (least loaded).
    let any = open(&gw, &jwt("v", "v")).await;
    assert_eq!(any.session.server_name, "only");
    // A name outside the pattern is refused before anything is looked up.
    let (status, body) = refusal(&gw, &jwt_for_backend("w", "w", "Not_A_Label")).await;
    assert_eq!((status, body.as_str()), (403, "backend_not_allowed"));
}

/// A `dns` pool: the token's backend claim fills the template, resolved at upgrade time (here
/// through /etc/hosts: `localhost`). A name outside the pattern never reaches the resolver.
#[tokio::test]
async fn dns_pools_resolve_the_named_backend_and_refuse_other_names_unresolved() {
    let desk = RfbServer::start(Mode::Rfb {
        name: "sandbox".into(),
        width: 8,
        height: 8,
        rgb: [0, 0, 0],
    })
    .await
    .expect("fixture");
    let mut cfg = config(Vec::new(), None);
    cfg.discovery = Some(DiscoverySpec::Dns {
        addr_template: format!("{{backend}}:{}", desk.addr.port()),
    });
    let gw = Gateway::start(cfg).await;
    let lookups = |result: &'static str| {
        let gw = &gw;
        async move {
            gw.metric(&format!(
                "vncgate_discovery_lookups_total{{pool=\"default\",result=\"{result}\"}}"
            ))
            .await
        }
    };
    for (token, code) in [
        (
            jwt_for_backend("u", "s1", "evil.example.com"),
            "backend_not_allowed",
        ),
        (jwt_for_backend("u", "s2", "UPPER"), "backend_not_allowed"),
        (jwt("u", "s3"), "backend_not_allowed"),
    ] {
        let (status, body) = refusal(&gw, &token).await;
        assert_eq!((status, body.as_str()), (403, code));
    }
    assert_eq!(lookups("ok").await + lookups("failed").await, 0.0);

    let mut live = open(&gw, &jwt_for_backend("u", "s4", "localhost")).await;
    assert_eq!(live.session.server_name, "sandbox");
    rfb_client::first_framebuffer_update(&mut live.ws, &mut live.session)
        .await
        .expect("update");
    // A second connection within the cache's lifetime is not looked up again.
    let _second = open(&gw, &jwt_for_backend("u2", "s5", "localhost")).await;
    assert_eq!(lookups("ok").await, 1.0);

    // The sandbox goes away: 502, and the session's pin is released, so the sid may be placed
    // on another sandbox (a pin kept for the idle TTL would answer 403 backend_not_allowed).
    let port = desk.addr.port();
    drop((live, _second, desk));
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
    {
        tokio::task::yield_now().await;
    }
    let (status, body) = refusal(&gw, &jwt_for_backend("u", "s4", "localhost")).await;
    assert_eq!((status, body.as_str()), (502, "backend_connect_failed"));
    let (status, body) = refusal(&gw, &jwt_for_backend("u", "s4", "no-such-sandbox")).await;
    assert_eq!((status, body.as_str()), (502, "backend_connect_failed"));
    assert_eq!(lookups("failed").await, 1.0);
}

/// A registry pool with `failover: true`: a session whose backend was removed is re-pinned to
/// another registered backend on its next connection (without it: 503, tested above).
#[tokio::test]
async fn a_removed_backend_fails_over_where_the_pool_allows_it() {
    let desks = desks(2).await;
    let mut cfg = config(Vec::new(), None);
    cfg.discovery = Some(DiscoverySpec::Registry);
    cfg.pool_extra = "    failover: true\n".into();
    let gw = Gateway::start(cfg).await;
    for (i, d) in desks.iter().enumerate() {
        let body = json!({ "addr": d.addr.to_string() }).to_string();
        let (status, answer) = gw
            .admin("PUT", &format!("/admin/pools/default/backends/d{i}"), &body)
            .await;
        assert_eq!(status, 200, "{answer}");
    }
    let first = open(&gw, &jwt("u", "s")).await;
    let placed = first.session.server_name.clone();
    drop(first);
    let (status, answer) = gw
        .admin(
            "DELETE",
            &format!("/admin/pools/default/backends/{placed}"),
            "",
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let again = open(&gw, &jwt("u", "s")).await;
    assert_ne!(again.session.server_name, placed);
}

/// A session that was not placed by load (the token names its backend) counts on the board at
/// once: the next placement, on the other replica, already avoids that backend.
#[tokio::test]
async fn a_session_placed_by_name_counts_at_once_on_every_replica() {
    let redis = TestStore::start(Topo::Standalone).await.expect("store");
    let desks = desks(2).await;
    let (a, b) = scenario::replicas(&desks, &redis.spec()).await;
    // A sid that an idle pool would place on d0.
    let sid = (0..)
        .map(|i| format!("probe-{i}"))
        .find(|sid| {
            vncgate::routing::placement::least_loaded(sid, &[("d0", 0), ("d1", 0)]) == Some("d0")
        })
        .expect("a sid");
    let named = common::token_with_claims(
        &json!({ "sub": "occupant", "sid": "occupant", "exp": now() + 600, "backend": "d0" }),
    );
    let _occupant = open(&a, &named).await;
    let next = open(&b, &jwt("next", &sid)).await;
    assert_eq!(next.session.server_name, "d1");
}
