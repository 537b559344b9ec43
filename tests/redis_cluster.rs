//! `store.topology: cluster` (contract §13) against a real Redis Cluster (3 masters, 3
//! replicas): one master SIGKILLed while two gateway replicas carry live sessions. Its replica
//! takes over; the gateway's commands recover (slot refresh), its subscription recovers, and
//! every guarantee of §4 holds across it. Also: the catch-up queries, whose keys span slots.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::desks;
use common::redis_topology::{RedisCluster, scenario};
use vncgate::routing::SessionStore;
use vncgate::routing::redis::{RedisStore, Replica};
use vncgate::routing::store::{Pin, StoreError};

#[tokio::test]
async fn a_killed_master_is_replaced_by_its_replica() {
    let mut cluster = RedisCluster::start().await.expect("cluster");
    let desks = desks(3).await;
    let (a, b) = scenario::replicas(&desks, &cluster.spec()).await;
    assert_eq!(
        a.metric("vncgate_store_topology{topology=\"cluster\"}")
            .await,
        1.0
    );
    let mut live = scenario::open_live(&a, &b).await;
    assert!(scenario::spread(&live) > 1, "all sessions on one backend");
    scenario::assert_pins_shared(&a, &b, "before", desks.len()).await;

    let killed = Instant::now();
    let (old_master, replica) = cluster.kill_a_master().await.expect("kill a master");
    cluster.await_promotion(replica).await.expect("promotion");
    let promoted_ms = killed.elapsed().as_millis();
    // The census sees the slots served from the promoted replica, and the live pins are
    // written back.
    scenario::assert_master_moved(&a, &b, old_master, replica).await;
    scenario::assert_pins_shared(&a, &b, "after", desks.len()).await;
    eprintln!(
        "cluster failover: SIGKILL -> replica promoted {promoted_ms} ms; \
         SIGKILL -> pins shared again by both replicas {} ms",
        killed.elapsed().as_millis()
    );

    scenario::assert_all_alive(&mut live, &a, &b).await;
    let mut con = cluster.client().await.expect("cluster client");
    scenario::assert_live_pins_stored(&mut con, &live).await;
    scenario::assert_kick_and_revoke_cross(&mut live, &a, &b).await;
    scenario::assert_store_healthy(&a, &b, "master", 3.0).await;
}

/// A replica with no live sessions: the store's background tasks need one.
struct NoReplica;

#[async_trait]
impl Replica for NoReplica {
    async fn live_pins(&self) -> Vec<(String, Pin)> {
        Vec::new()
    }
    async fn adopt_pin(&self, _sid: &str, _pin: Pin) {}
    fn on_event(&self, _payload: &str) {}
    async fn catch_up(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// The catch-up after a resubscription asks for the kicks and revocations of every live
/// session at once. Their keys hash to slots all over the cluster: a pipeline (one slot only in
/// a cluster) would fail; the answers must come back complete and in order.
#[tokio::test]
async fn catch_up_queries_span_every_slot() {
    let cluster = RedisCluster::start().await.expect("cluster");
    let urls = cluster.urls().join(",");
    let yaml = "listeners:\n  - addr: \"127.0.0.1:1\"\npaths: [\"/websockify\"]\n\
        admin:\n  addr: \"127.0.0.1:2\"\n  token_env: T\n\
        auth:\n  algorithms: [HS256]\n  secret_env: S\n\
        pools:\n  default:\n    backends:\n      - { name: d0, addr: \"127.0.0.1:3\" }\n\
        store:\n  kind: redis\n  topology: cluster\n  cluster: { urls_env: URLS }\n";
    let env = move |name: &str| match name {
        "URLS" => Some(urls.clone()),
        "T" => Some("admin-token".to_owned()),
        "S" => Some(common::SECRET.to_owned()),
        _ => None,
    };
    let config = vncgate::config::Config::from_yaml(yaml, &env).expect("config");
    let metrics = Arc::new(vncgate::metrics::Metrics::new(&config).expect("metrics"));
    let vncgate::config::StoreKind::Redis { topology } = &config.store.kind else {
        panic!("not redis")
    };
    let store = RedisStore::new(topology, "vncgate:", metrics).expect("store");
    tokio::spawn(Arc::clone(&store).run(Arc::new(NoReplica)));
    // The supervisor's first connection (milliseconds); the deadline is a guard.
    tokio::time::timeout(Duration::from_secs(30), store.wait_up())
        .await
        .expect("store never connected");

    let sids: Vec<String> = (0..200).map(|i| format!("sid-{i}")).collect();
    let jtis: Vec<String> = (0..200).map(|i| format!("jti-{i}")).collect();
    for (i, sid) in sids.iter().enumerate().filter(|(i, _)| i % 3 == 0) {
        store
            .record_kick(sid, 1000 + i as u64, Duration::from_secs(600))
            .await
            .expect("kick");
    }
    for jti in jtis.iter().step_by(4) {
        store
            .revoke(jti, Duration::from_secs(600))
            .await
            .expect("revoke");
    }
    let kicked = store.kicked_at(&sids).await.expect("kicked_at");
    let expected: Vec<Option<u64>> = (0..200)
        .map(|i| (i % 3 == 0).then_some(1000 + i as u64))
        .collect();
    assert_eq!(kicked, expected);
    let revoked = store.revoked_among(&jtis).await.expect("revoked_among");
    let names: Vec<&str> = revoked.iter().map(|(j, _)| j.as_str()).collect();
    let expected: Vec<String> = jtis.iter().step_by(4).cloned().collect();
    assert_eq!(names, expected);
    assert!(
        revoked
            .iter()
            .all(|(_, left)| *left > Duration::from_secs(500))
    );
}
