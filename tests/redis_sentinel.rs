//! `store.topology: sentinel` (contract §13) against real processes: 1 master, 1 replica and 3
//! sentinels. The gateway finds the master through the sentinels, follows a failover (the
//! master SIGKILLed, or moved by a manual `SENTINEL FAILOVER` that leaves it alive as a
//! replica), and keeps every guarantee of §4 across it: no live session dropped, pins shared by
//! the replicas again, kicks and revocations reaching the other replica.

mod common;

use std::time::Instant;

use common::redis_topology::{MASTER_NAME, SentinelSet, scenario};
use common::{desks, open_session};
use redis::AsyncCommands;

#[tokio::test]
async fn a_killed_master_is_followed_through_the_sentinels() {
    let mut set = SentinelSet::start().await.expect("sentinels");
    let desks = desks(3).await;
    let (a, b) = scenario::replicas(&desks, &set.spec()).await;
    assert_eq!(
        a.metric("vncgate_store_topology{topology=\"sentinel\"}")
            .await,
        1.0
    );
    let mut live = scenario::open_live(&a, &b).await;
    assert!(scenario::spread(&live) > 1, "all sessions on one backend");
    scenario::assert_pins_shared(&a, &b, "before", desks.len()).await;
    let old_master = set.master_port;

    let killed = Instant::now();
    set.kill_master().await.expect("kill master");
    let new_master = set.await_failover().await.expect("failover");
    let failover_ms = killed.elapsed().as_millis();
    for changed in scenario::assert_master_moved(&a, &b, old_master, new_master).await {
        assert!(changed["pins_written"].as_u64().is_some(), "{changed}");
    }
    scenario::assert_pins_shared(&a, &b, "after", desks.len()).await;
    eprintln!(
        "sentinel failover: SIGKILL -> sentinels switched {failover_ms} ms; \
         SIGKILL -> pins shared again by both replicas {} ms",
        killed.elapsed().as_millis()
    );

    scenario::assert_all_alive(&mut live, &a, &b).await;
    let mut con = set.master_client().await.expect("new master");
    scenario::assert_live_pins_stored(&mut con, &live).await;
    scenario::assert_kick_and_revoke_cross(&mut live, &a, &b).await;
    scenario::assert_store_healthy(&a, &b, "sentinel", 3.0).await;
}

/// `SENTINEL FAILOVER`: the old master stays alive and becomes a replica, answering everything
/// but writes. The gateway must notice (a `ROLE` probe, or READONLY on a write) and move.
#[tokio::test]
async fn a_manual_failover_that_keeps_the_old_master_alive_is_noticed() {
    let mut set = SentinelSet::start().await.expect("sentinels");
    let desks = desks(2).await;
    let (a, b) = scenario::replicas(&desks, &set.spec()).await;
    let old_master = set.master_port;
    let live = open_session(&a, &scenario::jwt("alice", "kept", None, None)).await;

    let mut sentinel = redis::Client::open(set.sentinels[0].url())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("sentinel");
    let started = Instant::now();
    let _: () = redis::cmd("SENTINEL")
        .arg("FAILOVER")
        .arg(MASTER_NAME)
        .query_async(&mut sentinel)
        .await
        .expect("SENTINEL FAILOVER");
    let new_master = set.await_failover().await.expect("failover");
    assert_ne!(new_master, old_master);
    for gw in [&a, &b] {
        let moved = gw.wait_log(|v| v["event"] == "store_master_changed").await;
        assert_eq!(moved["addr"], format!("127.0.0.1:{new_master}"));
        scenario::wait_after(
            gw,
            |v| v["event"] == "store_master_changed",
            |v| v["event"] == "store_reconnected",
        )
        .await;
    }
    scenario::assert_pins_shared(&a, &b, "manual", desks.len()).await;
    eprintln!(
        "sentinel manual failover: SENTINEL FAILOVER -> pins shared again {} ms",
        started.elapsed().as_millis()
    );
    // The live session's pin is on the new master; the old one is a replica now.
    let mut con = set.master_client().await.expect("new master");
    let owner: Option<String> = con
        .hget("vncgate:session:kept", "owner")
        .await
        .expect("hget");
    assert_eq!(owner.as_deref(), Some("alice"));
    drop(live);
}
