//! Keeping the Redis store usable: the supervisor (reconnect with backoff and jitter, then the
//! pin write-back), liveness PINGs on the command connection, and the `{prefix}events`
//! subscriber with PINGs of its own and a catch-up after every (re)subscription.
//!
//! Why both connections are pinged: a half-open TCP connection (a NAT or conntrack entry that
//! expired, a failover that sent no RST) looks alive to the reader forever. Commands notice it as
//! timeouts only when there is traffic, and a pub/sub subscriber never sends anything at all, so
//! without its own PINGs it would wait forever while kicks and revocations went to the void.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::StreamExt;
use rand::Rng;
use redis::aio::{PubSubSink, PubSubStream};

use super::RedisStore;
use super::topology::{CONNECT_TIMEOUT, Probe};
use crate::routing::store::{Pin, SessionStore, StoreError};

/// Liveness: each connection gets a PING every [`PING_INTERVAL`] with a deadline of
/// [`PING_DEADLINE`], and [`PING_MISSES_DOWN`] misses in a row mark it dead. A Redis on the LAN
/// answers PING in well under a millisecond, a busy one (a snapshot fork, a slow script) within
/// tens of milliseconds, so a second is far past any healthy answer and two misses in a row (2
/// to 4 s after the path died) are a dead path, not a hiccup. That bounds how long `/readyz`
/// can claim a dead store and how long kicks and revocations go unheard, for one tiny command
/// per second per connection. The pings also keep NAT entries of idle connections fresh.
pub const PING_INTERVAL: Duration = Duration::from_secs(1);
pub const PING_DEADLINE: Duration = Duration::from_secs(1);
pub const PING_MISSES_DOWN: u32 = 2;
/// How often the node metrics are refreshed (asking every sentinel, or `CLUSTER NODES`); also
/// how soon a cluster failover or a master the sentinels moved under a live connection is
/// noticed when nothing else notices it first.
pub const CENSUS_INTERVAL: Duration = Duration::from_secs(2);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// What the store's background tasks need from the rest of the replica.
#[async_trait]
pub trait Replica: Send + Sync {
    /// The pins of this replica's live sessions, for the write-back after a reconnect.
    async fn live_pins(&self) -> Vec<(String, Pin)>;

    /// The store holds a different pin for `sid` than the one written back (another replica
    /// pinned it while this one could not reach the store): new connections follow the store's.
    async fn adopt_pin(&self, sid: &str, pin: Pin);

    /// A message from `{prefix}events`.
    fn on_event(&self, payload: &str);

    /// After every (re)subscription: apply the kicks and revocations that may have been published
    /// while this replica was not listening. An error is retried once the store answers.
    async fn catch_up(&self) -> Result<(), StoreError>;
}

/// Why a subscription was given up.
#[derive(Debug, thiserror::Error)]
enum Lost {
    #[error("connection closed")]
    Closed,
    #[error("pings unanswered: {0}")]
    Pings(StoreError),
}

impl RedisStore {
    /// Everything that keeps the store usable; runs for the life of the process.
    pub async fn run(self: Arc<Self>, replica: Arc<dyn Replica>) {
        tokio::join!(
            self.supervise(replica.as_ref()),
            self.ping_commands(),
            self.subscribe_events(replica.as_ref()),
            self.census(),
        );
    }

    /// Reconnect whenever the store is marked down (it starts down), then write back the pins of
    /// live sessions, so a Redis that restarted empty learns them again. Also write them back
    /// when the pings see that the connection was replaced underneath (a restart quicker than
    /// the liveness deadline, which nothing else would notice).
    async fn supervise(&self, replica: &dyn Replica) {
        let mut up = self.up.subscribe();
        let mut first = true;
        loop {
            let down = tokio::select! {
                // Down wins over a stale "replaced": a connection is only trusted after a
                // reconnect of the supervisor's own.
                biased;
                changed = up.wait_for(|up| !*up) => match changed {
                    Ok(_) => true,
                    Err(_) => return,
                },
                _ = self.replaced.notified() => false,
            };
            let attempts = match down {
                true => {
                    let attempts = self.reconnect_with_backoff(first).await;
                    self.mark_up();
                    attempts
                }
                false => 0,
            };
            if std::mem::take(&mut first) && attempts == 1 {
                tracing::info!(event = "store_connected", "session store connected");
                continue;
            }
            let (written, conflicts) = self.write_back_all(replica).await;
            tracing::info!(
                event = "store_reconnected",
                attempts,
                pins_written = written,
                pin_conflicts = conflicts,
                "session store reachable again; {written} live pins written back"
            );
        }
    }

    /// Returns how many attempts it took.
    async fn reconnect_with_backoff(&self, first: bool) -> u32 {
        let mut backoff = BACKOFF_MIN;
        let mut attempts = 0u32;
        loop {
            if !first || attempts > 0 {
                // Half jitter: replicas that lost Redis together do not retry in lockstep.
                let wait = rand::rng().random_range(backoff / 2..=backoff);
                tokio::time::sleep(wait).await;
            }
            attempts += 1;
            match self.reconnect().await {
                Ok(()) => return attempts,
                Err(e) => {
                    self.count_error("connect");
                    if first && attempts == 1 {
                        tracing::warn!(event = "store_error", op = "connect", error = %e,
                            "Redis unreachable at start; serving degraded");
                    } else {
                        tracing::debug!(event = "store_error", op = "connect", attempts, error = %e,
                            "Redis still unreachable");
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// A fresh connection replaces the old one, which may be half-open: a connection the pings
    /// gave up on is never trusted again. This is also where the sentinels are asked again for
    /// the master, and a cluster is seeded again.
    async fn reconnect(&self) -> Result<(), StoreError> {
        let connected = self.topology.connect().await?;
        if let Some(old) = &connected.master_changed_from {
            tracing::warn!(event = "store_master_changed", old_addr = %old,
                addr = %connected.addr, "the session store's master moved");
        }
        tracing::debug!(event = "store_connect", addr = %connected.addr, "session store connection made");
        self.set_connection(connected.conn);
        self.set_master_ok(true);
        Ok(())
    }

    /// Write back every live pin; a pin another replica wrote meanwhile wins (first writer, as
    /// for any claim) and is adopted for new connections here. Returns (written, conflicts).
    async fn write_back_all(&self, replica: &dyn Replica) -> (usize, usize) {
        let (mut written, mut conflicts) = (0, 0);
        for (sid, pin) in replica.live_pins().await {
            let Ok(held) = self.write_back(&sid, &pin).await else {
                continue;
            };
            written += 1;
            if !held.binds_like(&pin) {
                conflicts += 1;
                tracing::warn!(
                    event = "store_pin_conflict",
                    session_id = %sid,
                    backend = %pin.backend,
                    store_backend = %held.backend,
                    user_id = %pin.owner,
                    store_owner = %held.owner,
                    "another replica pinned this session while the store was unreachable; \
                     live connections stay, new ones follow the store's pin"
                );
                replica.adopt_pin(&sid, held).await;
            }
        }
        (written, conflicts)
    }

    /// Probe the command connection while it counts as up; mark the store down after
    /// [`PING_MISSES_DOWN`] misses in a row, without waiting for traffic to notice. The probe
    /// depends on the topology ([`super::topology::Topology::probe`]): `CLIENT ID` answers like
    /// PING and also tells when the connection manager silently reconnected (the id changes),
    /// e.g. to a Redis that restarted empty; with sentinels `ROLE` too, since a demoted master
    /// still answers everything but writes (that is no miss but a definite answer: reconnect at
    /// once); a cluster is asked whether it serves all its slots.
    async fn ping_commands(&self) {
        let mut tick = tokio::time::interval(PING_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut misses = 0u32;
        let mut last_id: Option<i64> = None;
        loop {
            tick.tick().await;
            let Some(mut conn) = self.connection().filter(|_| self.is_up()) else {
                // The supervisor connects anew; that connection gets a new id.
                (misses, last_id) = (0, None);
                continue;
            };
            let started = Instant::now();
            let answer = self.topology.probe(&mut conn).await;
            self.metrics
                .store_op_duration
                .with_label_values(&["ping"])
                .observe(started.elapsed().as_secs_f64());
            let error = match answer {
                Ok(Probe::Alive { conn_id }) => {
                    misses = 0;
                    self.set_master_ok(true);
                    match conn_id {
                        Some(id) if last_id.replace(id).is_some_and(|last| last != id) => {
                            self.replaced.notify_one();
                        }
                        Some(_) => {}
                        None => last_id = None,
                    }
                    continue;
                }
                Ok(Probe::NotMaster(why)) => {
                    self.count_error("ping");
                    (misses, last_id) = (0, None);
                    self.mark_down("ping", &StoreError::Unreachable(why));
                    continue;
                }
                Ok(Probe::Unhealthy(why)) => {
                    self.set_master_ok(false);
                    StoreError::Unreachable(why)
                }
                Err(e) => e,
            };
            self.count_error("ping");
            misses += 1;
            if misses >= PING_MISSES_DOWN {
                misses = 0;
                self.mark_down("ping", &error);
            } else {
                tracing::debug!(event = "store_error", op = "ping", error = %error, "store ping missed");
            }
        }
    }

    /// Refresh `vncgate_store_master_up` and `vncgate_store_nodes_reachable` every
    /// [`CENSUS_INTERVAL`], and act on what the census alone sees: a cluster master that
    /// failed over (logged, and the live pins written back, since replication is asynchronous
    /// and the promoted replica may lack the latest ones), or sentinels that moved the master
    /// under a connection that still works (reconnect through them).
    async fn census(&self) {
        let mut tick = tokio::time::interval(CENSUS_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut up_changes = self.up.subscribe();
        loop {
            // Also right after every (re)connection: the masters in place then are the ones a
            // later failover is told from.
            tokio::select! {
                _ = tick.tick() => {}
                changed = up_changes.changed() => if changed.is_err() { return },
            }
            let up = self.is_up();
            let master_ok = up && self.master_ok.load(std::sync::atomic::Ordering::SeqCst);
            let report = self
                .topology
                .census(self.connection().filter(|_| up), master_ok)
                .await;
            self.metrics.store_topology.set_census(report.census);
            self.metrics
                .store_topology
                .master_up
                .set(i64::from(up && report.master_up));
            for moved in &report.moves {
                tracing::warn!(event = "store_master_changed", old_addr = %moved.old_addr,
                    addr = %moved.new_addr, "a session store master failed over");
            }
            if !report.moves.is_empty() && up {
                self.replaced.notify_one();
            }
            if report.master_moved && self.is_up() {
                self.mark_down(
                    "census",
                    &StoreError::Unreachable("the sentinels name another master".into()),
                );
            }
        }
    }

    /// Deliver `{prefix}events` to the replica for the life of the process: subscribe, catch up,
    /// listen while the pings are answered; when they are not, tear the connection down and
    /// subscribe again (backoff with jitter, at once when the store comes back).
    async fn subscribe_events(&self, replica: &dyn Replica) {
        let channel = self.events_channel();
        let mut backoff = BACKOFF_MIN;
        let mut subscriptions = 0u64;
        loop {
            match self.subscribe(&channel).await {
                Ok((addr, sink, stream)) => {
                    backoff = BACKOFF_MIN;
                    subscriptions += 1;
                    self.set_subscribed(true);
                    tracing::info!(
                        event = "store_subscribed",
                        resubscribed = subscriptions > 1,
                        "listening to kick and revocation events"
                    );
                    let lost = self.listen(sink, stream, replica).await;
                    self.set_subscribed(false);
                    self.topology.subscription_lost(&addr);
                    self.count_error("subscribe");
                    tracing::warn!(event = "store_error", op = "subscribe", error = %lost,
                        "event subscription lost; resubscribing, then catching up on kicks and revocations");
                }
                Err(e) => {
                    self.count_error("subscribe");
                    tracing::debug!(event = "store_error", op = "subscribe", error = %e,
                        "event subscription failed");
                }
            }
            let wait = rand::rng().random_range(backoff / 2..=backoff);
            backoff = (backoff * 2).min(BACKOFF_MAX);
            let mut up = self.up.subscribe();
            if self.is_up() {
                tokio::time::sleep(wait).await;
            } else {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = up.wait_for(|up| *up) => {}
                }
            }
        }
    }

    /// Subscribe on the first node that takes it (see
    /// [`super::topology::Topology::pubsub_clients`]); returns its `host:port` too.
    async fn subscribe(
        &self,
        channel: &str,
    ) -> Result<(String, PubSubSink, PubSubStream), StoreError> {
        let mut last = StoreError::Unreachable("no node to subscribe on yet".into());
        for client in self.topology.pubsub_clients() {
            let addr = super::topology::addr_of(client.get_connection_info());
            match subscribe_on(&client, channel).await {
                Ok((sink, stream)) => return Ok((addr, sink, stream)),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Until the subscription is lost: hand messages over, PING (allowed in RESP2 subscribed
    /// mode), and catch up once (retried until the command connection can answer it).
    async fn listen(
        &self,
        mut sink: PubSubSink,
        mut stream: PubSubStream,
        replica: &dyn Replica,
    ) -> Lost {
        let messages = async {
            while let Some(msg) = stream.next().await {
                if let Ok(payload) = msg.get_payload::<String>() {
                    replica.on_event(&payload);
                }
            }
            Lost::Closed
        };
        let pings = async {
            let mut tick = tokio::time::interval(PING_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            let mut misses = 0u32;
            loop {
                tick.tick().await;
                let error =
                    match tokio::time::timeout(PING_DEADLINE, sink.ping::<redis::Value>()).await {
                        Ok(Ok(_)) => {
                            misses = 0;
                            continue;
                        }
                        Ok(Err(e)) => StoreError::Unreachable(e.to_string()),
                        Err(_) => StoreError::Timeout,
                    };
                misses += 1;
                if misses >= PING_MISSES_DOWN {
                    return Lost::Pings(error);
                }
            }
        };
        // Subscribed first, then caught up: whatever was published before the subscription is in
        // the store (kicks and revocations are written before they are published), and whatever
        // comes after it arrives as a message.
        let catch_up = async {
            let mut up = self.up.subscribe();
            while let Err(e) = replica.catch_up().await {
                tracing::debug!(event = "store_error", op = "catch_up", error = %e,
                    "catch-up deferred until the store answers");
                if up.wait_for(|up| *up).await.is_err() {
                    break;
                }
                tokio::time::sleep(PING_INTERVAL).await;
            }
            std::future::pending::<Infallible>().await
        };
        tokio::select! {
            lost = messages => lost,
            lost = pings => lost,
            never = catch_up => match never {},
        }
    }
}

async fn subscribe_on(
    client: &redis::Client,
    channel: &str,
) -> Result<(PubSubSink, PubSubStream), StoreError> {
    let pubsub = tokio::time::timeout(CONNECT_TIMEOUT * 2, client.get_async_pubsub())
        .await
        .map_err(|_| StoreError::Timeout)?
        .map_err(|e| StoreError::Unreachable(e.to_string()))?;
    let (mut sink, stream) = pubsub.split();
    tokio::time::timeout(PING_DEADLINE, sink.subscribe(channel))
        .await
        .map_err(|_| StoreError::Timeout)?
        .map_err(|e| StoreError::Unreachable(e.to_string()))?;
    Ok((sink, stream))
}
