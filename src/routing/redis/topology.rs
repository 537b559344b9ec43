//! How the store reaches Redis for each `store.topology` (contract §13): one server
//! (`standalone`), the master the sentinels name (`sentinel`), or a Redis Cluster (`cluster`).
//!
//! Everything else of the store (the operations, the liveness design of [`super::supervise`]) is
//! the same for the three: it sees a [`Conn`] for commands, asks [`Topology::connect`] for a
//! fresh one on every reconnect (which is what re-asks the sentinels or re-seeds the cluster),
//! [`Topology::probe`] for the liveness pings, [`Topology::census`] for the node metrics and
//! [`Topology::pubsub_clients`] for where to subscribe to `{prefix}events`.
//!
//! Addresses in logs are `host:port` only: the URLs carry passwords.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::future::join_all;
use prometheus::{IntGauge, IntGaugeVec, Opts, Registry};
use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::io::tcp::socket2::TcpKeepalive;
use redis::sentinel::{Sentinel, SentinelNodeConnectionInfo};
use redis::{
    Cmd, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, Pipeline, RedisFuture, RedisResult,
    Role, Value,
};

use crate::config::{Config, RedisTopology, StoreKind};
use crate::routing::store::StoreError;

/// The kernel's share of liveness. Keepalive probes on an idle connection keep NAT and conntrack
/// entries from expiring (the commonest cause of a half-open connection) and let the kernel give
/// up on a dead path; `TCP_USER_TIMEOUT` bounds how long written data may go unacknowledged.
/// The application-level probes (see [`super::supervise`]) are what notice a dead path within
/// seconds: they also catch a peer that still acknowledges TCP but no longer answers.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE_RETRIES: u32 = 3;
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);
/// One connect attempt to one node; a LAN connect takes a millisecond.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// One answer from one node (the probes and the census); a healthy Redis answers in well under
/// a millisecond, a busy one within tens of milliseconds.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);

/// A URL of the config could not be used. Never carries the URL itself (it may hold a
/// password), only which one it was.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("{what}: {error}")]
    Url { what: String, error: String },
    #[error("{0}")]
    Client(String),
}

/// A connection for commands, whatever the topology: what every store operation gets (by
/// value; clones share the underlying connection, so concurrent commands are multiplexed).
#[derive(Clone)]
pub enum Conn {
    /// Standalone and sentinel: one master.
    Single(ConnectionManager),
    /// Routes each command by its key's slot and follows slot moves and failovers by itself.
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// A fresh command connection and where it goes.
pub struct Connected {
    pub conn: Conn,
    /// `host:port` of the master (standalone, sentinel), or of the seed that answered first
    /// (cluster), for the logs.
    pub addr: String,
    /// Sentinel: the master before this reconnect, when the sentinels now name another one.
    pub master_changed_from: Option<String>,
}

/// What a liveness probe learnt.
pub enum Probe {
    /// The store answers writes; `conn_id` is the server's id of the command connection
    /// (standalone and sentinel), which changes when the connection manager silently
    /// reconnected.
    Alive { conn_id: Option<i64> },
    /// A definite answer that this is no master any more (sentinel: a failover demoted it, and
    /// writes would get READONLY): reconnect now, through the sentinels.
    NotMaster(String),
    /// It answered, but cannot serve (cluster: `cluster_state:fail`): a miss like no answer.
    Unhealthy(String),
}

/// How many nodes of each role answered at the last census.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Census {
    pub masters: i64,
    pub replicas: i64,
    pub sentinels: i64,
}

/// A master that moved (cluster: the same slots served from another address).
pub struct MasterMove {
    pub old_addr: String,
    pub new_addr: String,
}

enum Kind {
    Standalone {
        info: ConnectionInfo,
    },
    Sentinel {
        master_name: String,
        sentinels: Vec<ConnectionInfo>,
        /// The crate's sentinel client: asks the sentinels (in order, a few at once) and
        /// checks with `ROLE` that the node they name really is a master.
        lookup: tokio::sync::Mutex<Sentinel>,
        /// Credentials, database and TCP settings for the data nodes (the sentinels' URLs
        /// carry them: one set of credentials for the sentinels and the nodes).
        node: SentinelNodeConnectionInfo,
        /// The census's connections to the sentinels, kept between censuses.
        census_conns: tokio::sync::Mutex<Vec<Option<MultiplexedConnection>>>,
    },
    Cluster {
        client: ClusterClient,
        seeds: Vec<ConnectionInfo>,
    },
}

pub struct Topology {
    kind: Kind,
    /// The node the commands go to now (standalone, sentinel).
    master: Mutex<Option<ConnectionInfo>>,
    /// Cluster: nodes the last census saw alive, candidates for the `{prefix}events`
    /// subscription (the seeds until the first census).
    nodes: Mutex<Vec<ConnectionInfo>>,
    /// Cluster: where the next subscription attempt starts, moved on after every loss so a
    /// dead node is not retried first.
    sub_cursor: AtomicUsize,
    /// Cluster: the master address serving each slot range (by its first slot), to notice
    /// failovers.
    masters_by_slot: Mutex<BTreeMap<u16, String>>,
    /// Standalone: `CLIENT ID` answered last time (a proxy without `CLIENT` gets `PING`).
    client_id: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain data behind these locks: a panic elsewhere cannot leave it inconsistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `host:port` of a node, never its URL (which may hold a password).
pub fn addr_of(info: &ConnectionInfo) -> String {
    match info.addr() {
        ConnectionAddr::Tcp(host, port) => format!("{host}:{port}"),
        ConnectionAddr::TcpTls { host, port, .. } => format!("{host}:{port}"),
        ConnectionAddr::Unix(path) => path.display().to_string(),
        other => format!("{other}"),
    }
}

fn with_tcp_settings(info: ConnectionInfo) -> ConnectionInfo {
    let tcp = tcp_settings(&info);
    info.set_tcp_settings(tcp)
}

fn tcp_settings(info: &ConnectionInfo) -> redis::io::tcp::TcpSettings {
    let keepalive = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    info.tcp_settings()
        .clone()
        .set_nodelay(true)
        .set_keepalive(keepalive)
        .set_user_timeout(TCP_USER_TIMEOUT)
}

fn parse_urls(
    urls: &[crate::config::Secret],
    what: &str,
) -> Result<Vec<ConnectionInfo>, TopologyError> {
    urls.iter()
        .enumerate()
        .map(|(i, url)| {
            url.expose()
                .into_connection_info()
                .map(with_tcp_settings)
                .map_err(|e| TopologyError::Url {
                    what: format!("{what}[{i}]"),
                    error: e.to_string(),
                })
        })
        .collect()
}

fn unreachable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unreachable(e.to_string())
}

async fn timed<T>(
    limit: Duration,
    f: impl std::future::Future<Output = RedisResult<T>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(limit, f)
        .await
        .map_err(|_| StoreError::Timeout)?
        .map_err(unreachable)
}

/// A connection manager that never retries on its own for long: the supervisor owns
/// reconnection (with jitter, re-asking the sentinels, and the write-back after it).
async fn manager(info: ConnectionInfo) -> Result<ConnectionManager, StoreError> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        // Every call has a shorter deadline of its own; this only bounds the manager's
        // internal handshakes.
        .set_response_timeout(Some(ANSWER_TIMEOUT))
        .set_number_of_retries(1);
    let client = redis::Client::open(info).map_err(unreachable)?;
    timed(
        CONNECT_TIMEOUT * 2,
        client.get_connection_manager_with_config(config),
    )
    .await
}

/// A plain connection for one question to one node (the census, role checks).
async fn single(info: &ConnectionInfo) -> Result<MultiplexedConnection, StoreError> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(ANSWER_TIMEOUT));
    let client = redis::Client::open(info.clone()).map_err(unreachable)?;
    timed(
        CONNECT_TIMEOUT * 2,
        client.get_multiplexed_async_connection_with_config(&config),
    )
    .await
}

impl Topology {
    pub fn new(topology: &RedisTopology) -> Result<Topology, TopologyError> {
        let kind = match topology {
            RedisTopology::Standalone { url } => {
                let info = url
                    .expose()
                    .into_connection_info()
                    .map(with_tcp_settings)
                    .map_err(|e| TopologyError::Url {
                        what: "store.redis_url_env".into(),
                        error: e.to_string(),
                    })?;
                Kind::Standalone { info }
            }
            RedisTopology::Sentinel { master_name, urls } => {
                let sentinels = parse_urls(urls, "store.sentinel.urls_env")?;
                let first = sentinels
                    .first()
                    .ok_or_else(|| TopologyError::Client("no sentinel URLs".into()))?;
                let mut node = SentinelNodeConnectionInfo::default()
                    .set_redis_connection_info(first.redis_settings().clone())
                    .set_tcp_settings(tcp_settings(first));
                if let ConnectionAddr::TcpTls { insecure, .. } = first.addr() {
                    node = node.set_tls_mode(match insecure {
                        true => redis::TlsMode::Insecure,
                        false => redis::TlsMode::Secure,
                    });
                }
                let lookup = Sentinel::build(sentinels.clone())
                    .map_err(|e| TopologyError::Client(e.to_string()))?;
                Kind::Sentinel {
                    master_name: master_name.clone(),
                    census_conns: tokio::sync::Mutex::new(vec![None; sentinels.len()]),
                    sentinels,
                    lookup: tokio::sync::Mutex::new(lookup),
                    node,
                }
            }
            RedisTopology::Cluster { urls } => {
                let seeds = parse_urls(urls, "store.cluster.urls_env")?;
                let first = seeds
                    .first()
                    .ok_or_else(|| TopologyError::Client("no cluster seed URLs".into()))?;
                let client = ClusterClientBuilder::new(seeds.clone())
                    .tcp_settings(tcp_settings(first))
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(ANSWER_TIMEOUT)
                    // Slot refreshes and redirects are retried inside one call; every store
                    // operation is bounded by its own (shorter) deadline anyway.
                    .retries(3)
                    .min_retry_wait(20)
                    .max_retry_wait(200)
                    .build()
                    .map_err(|e| TopologyError::Client(e.to_string()))?;
                Kind::Cluster { client, seeds }
            }
        };
        let nodes = match &kind {
            Kind::Cluster { seeds, .. } => seeds.clone(),
            _ => Vec::new(),
        };
        Ok(Topology {
            kind,
            master: Mutex::new(None),
            nodes: Mutex::new(nodes),
            sub_cursor: AtomicUsize::new(0),
            masters_by_slot: Mutex::new(BTreeMap::new()),
            client_id: AtomicBool::new(true),
        })
    }

    pub fn is_sentinel(&self) -> bool {
        matches!(self.kind, Kind::Sentinel { .. })
    }

    /// A fresh command connection: the configured server, the master the sentinels name now
    /// (checked with `ROLE` by the crate, and again here on this very connection, since right
    /// after a failover a lagging sentinel may still name the old one), or the cluster from its
    /// seeds (and only once it serves all slots).
    pub async fn connect(&self) -> Result<Connected, StoreError> {
        match &self.kind {
            Kind::Standalone { info } => {
                let mut conn = manager(info.clone()).await?;
                timed(
                    ANSWER_TIMEOUT,
                    redis::cmd("PING").query_async::<String>(&mut conn),
                )
                .await?;
                *lock(&self.master) = Some(info.clone());
                Ok(Connected {
                    conn: Conn::Single(conn),
                    addr: addr_of(info),
                    master_changed_from: None,
                })
            }
            Kind::Sentinel {
                master_name,
                lookup,
                node,
                sentinels,
                ..
            } => {
                // The crate asks up to 3 sentinels at once and checks each named master; its
                // connections have the crate's default timeouts (1 s connect, 500 ms answer),
                // this bounds the whole lookup.
                let limit = CONNECT_TIMEOUT * 2 * (sentinels.len() as u32).max(1);
                let client = {
                    let mut lookup = lookup.lock().await;
                    timed(limit, lookup.async_master_for(master_name, Some(node))).await?
                };
                let info = with_tcp_settings(client.get_connection_info().clone());
                let mut conn = manager(info.clone()).await?;
                let role: Role =
                    timed(ANSWER_TIMEOUT, redis::cmd("ROLE").query_async(&mut conn)).await?;
                if !matches!(role, Role::Primary { .. }) {
                    return Err(StoreError::Unreachable(format!(
                        "{} is not a master (yet)",
                        addr_of(&info)
                    )));
                }
                let addr = addr_of(&info);
                let previous = lock(&self.master).replace(info).map(|i| addr_of(&i));
                Ok(Connected {
                    conn: Conn::Single(conn),
                    master_changed_from: previous.filter(|p| *p != addr),
                    addr,
                })
            }
            Kind::Cluster { client, seeds } => {
                let mut conn = timed(CONNECT_TIMEOUT * 3, client.get_async_connection()).await?;
                match cluster_state(&mut conn).await? {
                    true => Ok(Connected {
                        conn: Conn::Cluster(conn),
                        addr: seeds.first().map(addr_of).unwrap_or_default(),
                        master_changed_from: None,
                    }),
                    false => Err(StoreError::Unreachable("cluster_state:fail".into())),
                }
            }
        }
    }

    /// One liveness probe on the command connection.
    pub async fn probe(&self, conn: &mut Conn) -> Result<Probe, StoreError> {
        match (&self.kind, conn) {
            (Kind::Standalone { .. }, Conn::Single(c)) => {
                if self.client_id.load(Ordering::SeqCst) {
                    let answer = tokio::time::timeout(
                        ANSWER_TIMEOUT,
                        redis::cmd("CLIENT").arg("ID").query_async::<i64>(c),
                    )
                    .await
                    .map_err(|_| StoreError::Timeout)?;
                    match answer {
                        Ok(id) => return Ok(Probe::Alive { conn_id: Some(id) }),
                        // The server answered, only not to CLIENT (some proxies): alive;
                        // PING from now on.
                        Err(e)
                            if matches!(
                                e.kind(),
                                redis::ErrorKind::Server(_) | redis::ErrorKind::Extension
                            ) =>
                        {
                            self.client_id.store(false, Ordering::SeqCst);
                            return Ok(Probe::Alive { conn_id: None });
                        }
                        Err(e) => return Err(unreachable(e)),
                    }
                }
                timed(ANSWER_TIMEOUT, redis::cmd("PING").query_async::<Value>(c)).await?;
                Ok(Probe::Alive { conn_id: None })
            }
            (Kind::Sentinel { .. }, Conn::Single(c)) => {
                // ROLE as well: a manual failover leaves the old master alive as a replica,
                // answering everything but writes.
                let (id, role): (i64, Role) = timed(
                    ANSWER_TIMEOUT,
                    redis::pipe()
                        .cmd("CLIENT")
                        .arg("ID")
                        .cmd("ROLE")
                        .query_async(c),
                )
                .await?;
                Ok(match role {
                    Role::Primary { .. } => Probe::Alive { conn_id: Some(id) },
                    _ => Probe::NotMaster(format!(
                        "{} is no longer a master",
                        lock(&self.master).as_ref().map(addr_of).unwrap_or_default()
                    )),
                })
            }
            (Kind::Cluster { .. }, Conn::Cluster(c)) => Ok(match cluster_state(c).await? {
                true => Probe::Alive { conn_id: None },
                // With full coverage required (the default) a cluster in `fail` state refuses
                // every key: the store cannot answer.
                false => Probe::Unhealthy("cluster_state:fail".into()),
            }),
            _ => Err(StoreError::Unreachable(
                "connection of another topology".into(),
            )),
        }
    }

    /// Where to subscribe to `{prefix}events`, in order of preference.
    ///
    /// Cluster: a plain (RESP2) subscription on one reachable node, not the crate's RESP3
    /// cluster pub/sub. A classic PUBLISH reaches every node of the cluster over the cluster
    /// bus, so any node hears every event; and the subscriber keeps the liveness design every
    /// topology shares: its own PINGs, and a catch-up after *every* (re)subscription. The
    /// crate's cluster pub/sub resubscribes by itself after a disconnect, silently, so the
    /// events published in the gap would be lost without the catch-up ever running. When the
    /// pings fail the next attempt starts at the next node.
    pub fn pubsub_clients(&self) -> Vec<redis::Client> {
        let infos: Vec<ConnectionInfo> = match &self.kind {
            Kind::Standalone { info } => vec![info.clone()],
            Kind::Sentinel { .. } => lock(&self.master).iter().cloned().collect(),
            Kind::Cluster { .. } => {
                let nodes = lock(&self.nodes).clone();
                let start = self.sub_cursor.load(Ordering::SeqCst) % nodes.len().max(1);
                nodes[start..]
                    .iter()
                    .chain(&nodes[..start])
                    .cloned()
                    .collect()
            }
        };
        infos
            .into_iter()
            .filter_map(|i| redis::Client::open(i).ok())
            .collect()
    }

    /// The subscription on `addr` was lost: start the next attempt elsewhere (cluster).
    pub fn subscription_lost(&self, addr: &str) {
        if let Kind::Cluster { .. } = self.kind {
            let nodes = lock(&self.nodes);
            if let Some(i) = nodes.iter().position(|n| addr_of(n) == addr) {
                self.sub_cursor.store(i + 1, Ordering::SeqCst);
            }
        }
    }

    /// Count the nodes that answer, by role. `master_ok`: the last probe found a working
    /// master (standalone and sentinel count it; a cluster reports its own masters).
    /// Returns the census, whether the master serves writes, the moves of masters seen since
    /// the last census (cluster), and whether most answering sentinels name another master
    /// than the one in use (sentinel: reconnect).
    pub async fn census(&self, conn: Option<Conn>, master_ok: bool) -> CensusReport {
        match &self.kind {
            Kind::Standalone { .. } => CensusReport {
                census: Census {
                    masters: i64::from(master_ok),
                    ..Census::default()
                },
                master_up: master_ok,
                ..CensusReport::default()
            },
            Kind::Sentinel {
                master_name,
                sentinels,
                census_conns,
                ..
            } => {
                let mut conns = census_conns.lock().await;
                let asks = sentinels
                    .iter()
                    .zip(conns.iter_mut())
                    .map(|(info, slot)| ask_sentinel(info, slot, master_name));
                let answers: Vec<_> = join_all(asks).await.into_iter().flatten().collect();
                let ours = lock(&self.master).as_ref().map(addr_of);
                let elsewhere = answers
                    .iter()
                    .filter(|a| !a.master.is_empty())
                    .filter(|a| ours.as_ref().is_some_and(|o| *o != a.master))
                    .count();
                CensusReport {
                    census: Census {
                        masters: i64::from(master_ok),
                        replicas: answers.iter().map(|a| a.replicas).max().unwrap_or(0),
                        sentinels: answers.len() as i64,
                    },
                    master_up: master_ok,
                    moves: Vec::new(),
                    // A strict majority of the sentinels that answered: one lagging sentinel
                    // right after a failover must not bounce the store.
                    master_moved: !answers.is_empty() && elsewhere * 2 > answers.len(),
                }
            }
            Kind::Cluster { .. } => {
                let Some(Conn::Cluster(mut c)) = conn else {
                    return CensusReport::default();
                };
                let Ok(text) = ask_any_node(&mut c, "NODES").await else {
                    return CensusReport::default();
                };
                let view = parse_cluster_nodes(&text);
                self.update_cluster_view(&view, master_ok)
            }
        }
    }

    fn update_cluster_view(&self, view: &[ClusterNode], state_ok: bool) -> CensusReport {
        let alive: Vec<&ClusterNode> = view.iter().filter(|n| n.alive).collect();
        let census = Census {
            masters: alive.iter().filter(|n| n.master).count() as i64,
            replicas: alive.iter().filter(|n| !n.master).count() as i64,
            sentinels: 0,
        };
        // Pub/sub candidates: the live nodes, with the credentials of the seeds.
        let template = match &self.kind {
            Kind::Cluster { seeds, .. } => seeds.first().cloned(),
            _ => None,
        };
        if let Some(template) = template {
            let fresh: Vec<ConnectionInfo> = alive
                .iter()
                .filter_map(|n| {
                    let (host, port) = n.addr.rsplit_once(':')?;
                    let port = port.parse().ok()?;
                    Some(
                        template
                            .clone()
                            .set_addr(ConnectionAddr::Tcp(host.to_owned(), port)),
                    )
                })
                .collect();
            if !fresh.is_empty() {
                *lock(&self.nodes) = fresh;
            }
        }
        let now: BTreeMap<u16, String> = alive
            .iter()
            .filter(|n| n.master)
            .flat_map(|n| n.first_slots.iter().map(|s| (*s, n.addr.clone())))
            .collect();
        let mut known = lock(&self.masters_by_slot);
        // A failing master still lists its slots until its replica takes them over: remember it
        // as their owner if this census is the first to see them, so the takeover is a move.
        for n in view.iter().filter(|n| n.master && !n.alive) {
            for slot in &n.first_slots {
                known.entry(*slot).or_insert_with(|| n.addr.clone());
            }
        }
        let moves = now
            .iter()
            .filter_map(|(slot, addr)| {
                let old = known.get(slot)?;
                (old != addr).then(|| MasterMove {
                    old_addr: old.clone(),
                    new_addr: addr.clone(),
                })
            })
            .collect();
        known.extend(now);
        CensusReport {
            census,
            master_up: state_ok,
            moves,
            master_moved: false,
        }
    }
}

#[derive(Default)]
pub struct CensusReport {
    pub census: Census,
    /// A master answers writes (standalone: reachable; sentinel: the named master is a master;
    /// cluster: `cluster_state:ok`).
    pub master_up: bool,
    /// Cluster: masters replaced since the last census.
    pub moves: Vec<MasterMove>,
    /// Sentinel: most sentinels name another master than the one in use.
    pub master_moved: bool,
}

struct SentinelAnswer {
    master: String,
    replicas: i64,
}

/// Ask one sentinel where the master is and which replicas it sees working. `None` when it does
/// not answer (its connection is dropped, and made again next time).
async fn ask_sentinel(
    info: &ConnectionInfo,
    slot: &mut Option<MultiplexedConnection>,
    master_name: &str,
) -> Option<SentinelAnswer> {
    if slot.is_none() {
        *slot = single(info).await.ok();
    }
    let conn = slot.as_mut()?;
    let answer = tokio::time::timeout(
        ANSWER_TIMEOUT,
        redis::pipe()
            .cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(master_name)
            .cmd("SENTINEL")
            .arg("replicas")
            .arg(master_name)
            .query_async::<(Option<(String, u16)>, Vec<HashMap<String, String>>)>(conn),
    )
    .await;
    match answer {
        Ok(Ok((Some((host, port)), replicas))) => Some(SentinelAnswer {
            master: format!("{host}:{port}"),
            replicas: replicas
                .iter()
                .filter(|r| {
                    r.get("flags").is_some_and(|f| {
                        !f.contains("s_down")
                            && !f.contains("o_down")
                            && !f.contains("disconnected")
                    })
                })
                .count() as i64,
        }),
        // Answered, but does not know the master: it answered all the same.
        Ok(Ok((None, _))) => Some(SentinelAnswer {
            master: String::new(),
            replicas: 0,
        }),
        _ => {
            *slot = None;
            None
        }
    }
}

/// `CLUSTER INFO` of any one node: whether it says the cluster serves all slots.
async fn cluster_state(conn: &mut ClusterConnection) -> Result<bool, StoreError> {
    let text = ask_any_node(conn, "INFO").await?;
    Ok(text.lines().any(|l| l.trim() == "cluster_state:ok"))
}

/// `CLUSTER <what>` of a random node, another one when the first does not answer (a dead node
/// stays in the client's map until a slot refresh drops it, and one dead node out of six is no
/// reason to call the cluster unreachable), all within [`ANSWER_TIMEOUT`].
async fn ask_any_node(conn: &mut ClusterConnection, what: &str) -> Result<String, StoreError> {
    const TRIES: usize = 3;
    let deadline = tokio::time::Instant::now() + ANSWER_TIMEOUT;
    let mut last = StoreError::Timeout;
    for _ in 0..TRIES {
        let answer = tokio::time::timeout_at(
            deadline,
            conn.route_command(
                redis::cmd("CLUSTER").arg(what).to_owned(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            ),
        )
        .await;
        match answer {
            Ok(Ok(Value::BulkString(b))) => return Ok(String::from_utf8_lossy(&b).into_owned()),
            Ok(Ok(Value::VerbatimString { text, .. })) => return Ok(text),
            Ok(Ok(Value::SimpleString(s))) => return Ok(s),
            Ok(Ok(other)) => {
                return Err(unreachable(format!("unexpected CLUSTER {what} {other:?}")));
            }
            Ok(Err(e)) => last = unreachable(e),
            Err(_) => return Err(StoreError::Timeout),
        }
    }
    Err(last)
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, PartialEq)]
struct ClusterNode {
    /// `host:port` (the client port).
    addr: String,
    master: bool,
    /// Connected and not flagged failing.
    alive: bool,
    /// The first slot of each range it serves (masters).
    first_slots: Vec<u16>,
}

/// `<id> <ip:port@cport[,hostname]> <flags> <master> <ping> <pong> <epoch> <link> <slot>...`
fn parse_cluster_nodes(text: &str) -> Vec<ClusterNode> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 {
                return None;
            }
            let addr = fields[1].split(['@', ',']).next()?.to_owned();
            let flags: Vec<&str> = fields[2].split(',').collect();
            let failing = flags
                .iter()
                .any(|f| matches!(*f, "fail" | "fail?" | "noaddr" | "handshake"));
            let first_slots = fields[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| s.split('-').next()?.parse().ok())
                .collect();
            Some(ClusterNode {
                addr,
                master: flags.contains(&"master"),
                alive: !failing && fields[7] == "connected",
                first_slots,
            })
        })
        .collect()
}

/// `vncgate_store_topology`, `vncgate_store_master_up`, `vncgate_store_nodes_reachable`.
pub struct TopologyMetrics {
    pub topology: IntGaugeVec,
    pub master_up: IntGauge,
    pub nodes_reachable: IntGaugeVec,
}

pub const ROLES: [&str; 3] = ["master", "replica", "sentinel"];

impl TopologyMetrics {
    /// Registered from the start: the configured topology at 1 (`memory` for the embedded
    /// store, which always answers, as one master), the rest at 0 until the store reports.
    pub fn register(registry: &Registry, config: &Config) -> Result<Self, prometheus::Error> {
        let m = TopologyMetrics {
            topology: IntGaugeVec::new(
                Opts::new(
                    "vncgate_store_topology",
                    "1 for the configured session store topology (memory|standalone|sentinel|cluster).",
                ),
                &["topology"],
            )?,
            master_up: IntGauge::new(
                "vncgate_store_master_up",
                "1 when a master of the session store answers writes (cluster: cluster_state ok).",
            )?,
            nodes_reachable: IntGaugeVec::new(
                Opts::new(
                    "vncgate_store_nodes_reachable",
                    "Session store nodes that answered at the last check, by role.",
                ),
                &["role"],
            )?,
        };
        registry.register(Box::new(m.topology.clone()))?;
        registry.register(Box::new(m.master_up.clone()))?;
        registry.register(Box::new(m.nodes_reachable.clone()))?;
        let name = match &config.store.kind {
            StoreKind::Memory => "memory",
            StoreKind::Redis { topology } => topology.name(),
        };
        m.topology.with_label_values(&[name]).set(1);
        for role in ROLES {
            m.nodes_reachable.with_label_values(&[role]);
        }
        if matches!(config.store.kind, StoreKind::Memory) {
            m.master_up.set(1);
            m.nodes_reachable.with_label_values(&["master"]).set(1);
        }
        Ok(m)
    }

    pub fn set_census(&self, census: Census) {
        let values = [census.masters, census.replicas, census.sentinels];
        for (role, value) in ROLES.iter().zip(values) {
            self.nodes_reachable.with_label_values(&[role]).set(value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_nodes_lines_are_parsed() {
        let text = "\
c20d 127.0.0.1:27201@27301 master - 0 1796211992323 2 connected 5461-10922
1b7e 127.0.0.1:27203@27303 slave fc06 0 1796211992122 1 connected
bd41 127.0.0.1:27202@27302,host-b master - 0 1796211992122 3 connected 10923-16383 [5->-c20d]
fc06 127.0.0.1:27200@27300 myself,master,fail - 0 1796211992000 1 disconnected 0-5460 7
";
        let nodes = parse_cluster_nodes(text);
        assert_eq!(nodes.len(), 4);
        assert_eq!(nodes[0].addr, "127.0.0.1:27201");
        assert!(nodes[0].master && nodes[0].alive);
        assert_eq!(nodes[0].first_slots, vec![5461]);
        assert!(!nodes[1].master && nodes[1].alive);
        assert_eq!(nodes[2].addr, "127.0.0.1:27202");
        assert_eq!(nodes[2].first_slots, vec![10923]);
        assert!(!nodes[3].alive);
        assert_eq!(nodes[3].first_slots, vec![0, 7]);
    }
}
