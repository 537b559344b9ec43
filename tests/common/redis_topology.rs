//! Redis topologies as production runs them, from real processes on loopback ports: a
//! [`SentinelSet`] (1 master, 1 replica, 3 sentinels) and a [`RedisCluster`] (3 masters with a
//! replica each). Both can lose a master to SIGKILL and report when the failover is done, which
//! they learn from the servers' own log lines (`+switch-master`, `Failover election won`), never
//! from a sleep. Every process is killed and reaped when its fixture is dropped.

use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::StoreSpec;

const REDIS_SERVER: &str = "/usr/bin/redis-server";
const REDIS_CLI: &str = "/usr/bin/redis-cli";
/// redis-server was ready in ~10 ms here; sentinels know each other after ~2 s (hello messages
/// every 2 s). The margins are for a loaded CI machine: guards against a hang, not timings.
const READY_DEADLINE: Duration = Duration::from_secs(30);
/// A failover took 2-3 s here (down-after 1 s / node timeout 1 s); a guard, not a timing.
const FAILOVER_DEADLINE: Duration = Duration::from_secs(60);
const BIND_CONFLICT: &str = "Address already in use";
const ATTEMPTS: usize = 5;
pub const MASTER_NAME: &str = "vncgate";

/// One redis-server process (a data node or a sentinel) with its output collected line by line.
pub struct Proc {
    pub port: u16,
    child: Option<Child>,
    reader: Option<JoinHandle<()>>,
    lines: Arc<Mutex<Vec<String>>>,
    /// The number of lines so far; waiters wake on every new line.
    count: watch::Sender<usize>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Proc {
    /// Spawn `redis-server` with `args` (`{port}` in them is the port) on a free port, and
    /// return once a line matches `ready`. Retries on another port when the bind failed.
    async fn start(
        label: &str,
        args: impl Fn(u16) -> Vec<String>,
        ready: &'static str,
    ) -> io::Result<Proc> {
        let mut last = io::Error::other("not started");
        for _ in 0..ATTEMPTS {
            let port = super::free_port();
            let proc = Proc::spawn(port, &args(port))?;
            match proc.wait_line(READY_DEADLINE, |l| l.contains(ready)).await {
                Ok(_) => return Ok(proc),
                Err(e) if proc.log().contains(BIND_CONFLICT) => last = e,
                Err(e) => {
                    return Err(io::Error::other(format!(
                        "{label} on port {port}: {e}\n{}",
                        proc.log()
                    )));
                }
            }
        }
        Err(last)
    }

    fn spawn(port: u16, args: &[String]) -> io::Result<Proc> {
        // One pipe for both streams: redis logs to stdout, argument errors go to stderr.
        let (pipe_reader, pipe_writer) = io::pipe()?;
        let stderr = pipe_writer.try_clone()?;
        let child = Command::new(REDIS_SERVER)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(pipe_writer))
            .stderr(Stdio::from(stderr))
            .spawn()?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let count = watch::Sender::new(0usize);
        let reader = {
            let lines = lines.clone();
            let count = count.clone();
            thread::spawn(move || {
                for line in BufReader::new(pipe_reader).split(b'\n') {
                    let Ok(line) = line else { break };
                    lock(&lines).push(String::from_utf8_lossy(&line).into_owned());
                    count.send_modify(|n| *n += 1);
                }
                // EOF: the process is gone. Wake the waiters so they can tell.
                count.send_modify(|n| *n += 0);
            })
        };
        Ok(Proc {
            port,
            child: Some(child),
            reader: Some(reader),
            lines,
            count,
        })
    }

    /// The first line matching `pred`, waiting for it (up to `deadline`, a guard).
    pub async fn wait_line(
        &self,
        deadline: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> io::Result<String> {
        self.wait_lines(deadline, 1, pred)
            .await
            .map(|mut v| v.remove(0))
    }

    /// Wait until `n` lines match `pred`.
    pub async fn wait_lines(
        &self,
        deadline: Duration,
        n: usize,
        pred: impl Fn(&str) -> bool,
    ) -> io::Result<Vec<String>> {
        let mut rx = self.count.subscribe();
        let wait = async {
            loop {
                let found: Vec<String> = lock(&self.lines)
                    .iter()
                    .filter(|l| pred(l))
                    .cloned()
                    .collect();
                if found.len() >= n {
                    return Ok(found);
                }
                if self.reader.as_ref().is_none_or(|r| r.is_finished()) {
                    return Err(io::Error::other("redis-server exited"));
                }
                if rx.changed().await.is_err() {
                    return Err(io::Error::other("log reader gone"));
                }
            }
        };
        tokio::time::timeout(deadline, wait)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no such log line in time"))?
    }

    pub fn log(&self) -> String {
        lock(&self.lines).join("\n")
    }

    /// SIGKILL (a crash, not a shutdown), and reap: its listener and connections are closed when
    /// this returns.
    pub async fn kill(&mut self) -> io::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || {
            child.kill()?;
            child.wait().map(|_| ())
        })
        .await
        .map_err(io::Error::other)?
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn data_node_args(port: u16, dir: &Path, extra: &[String]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--logfile",
        "",
        "--daemonize",
        "no",
        "--dir",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(dir.display().to_string());
    args.extend(extra.iter().cloned());
    args
}

/// 1 master + 1 replica + 3 sentinels (quorum 2, down-after 1 s, failover-timeout 3 s).
pub struct SentinelSet {
    pub master: Proc,
    pub replica: Proc,
    pub sentinels: Vec<Proc>,
    /// Port of the master the sentinels last switched to (the first master until a failover).
    pub master_port: u16,
    dir: tempfile::TempDir,
}

impl SentinelSet {
    pub async fn start() -> io::Result<SentinelSet> {
        let dir = tempfile::Builder::new().prefix("sentinel-").tempdir()?;
        let master_dir = subdir(dir.path(), "master")?;
        let master = Proc::start(
            "master",
            |p| data_node_args(p, &master_dir, &[]),
            "Ready to accept connections",
        )
        .await?;
        let replica_dir = subdir(dir.path(), "replica")?;
        let master_port = master.port;
        let replica = Proc::start(
            "replica",
            |p| {
                data_node_args(
                    p,
                    &replica_dir,
                    &[
                        "--replicaof".into(),
                        "127.0.0.1".into(),
                        master_port.to_string(),
                    ],
                )
            },
            "MASTER <-> REPLICA sync: Finished with success",
        )
        .await?;
        let mut sentinels = Vec::new();
        for i in 0..3 {
            let sdir = subdir(dir.path(), &format!("sentinel{i}"))?;
            let sentinel = Proc::start(
                "sentinel",
                |p| {
                    // A sentinel rewrites its config file: one per sentinel, per attempt.
                    let conf = sdir.join(format!("sentinel-{p}.conf"));
                    let text = format!(
                        "port {p}\nbind 127.0.0.1\ndir \"{}\"\n\
                         sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
                         sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                         sentinel failover-timeout {MASTER_NAME} 3000\n",
                        sdir.display()
                    );
                    if let Err(e) = std::fs::write(&conf, text) {
                        panic!("write {}: {e}", conf.display());
                    }
                    vec![
                        conf.display().to_string(),
                        "--sentinel".into(),
                        "--logfile".into(),
                        "".into(),
                    ]
                },
                "+monitor master",
            )
            .await?;
            sentinels.push(sentinel);
        }
        // Ready for a failover once every sentinel knows the replica and the other two (they
        // find each other through hello messages on the master, every 2 s).
        for s in &sentinels {
            s.wait_line(READY_DEADLINE, |l| l.contains("+slave slave"))
                .await?;
            s.wait_lines(READY_DEADLINE, 2, |l| l.contains("+sentinel sentinel"))
                .await?;
        }
        Ok(SentinelSet {
            master,
            replica,
            sentinels,
            master_port,
            dir,
        })
    }

    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels.iter().map(Proc::url).collect()
    }

    pub fn spec(&self) -> StoreSpec {
        StoreSpec::Sentinel {
            master: MASTER_NAME.into(),
            urls: self.sentinel_urls(),
        }
    }

    /// SIGKILL the master.
    pub async fn kill_master(&mut self) -> io::Result<()> {
        self.master.kill().await
    }

    /// Returns once a majority of the sentinels switched to a new master, with its port.
    pub async fn await_failover(&mut self) -> io::Result<u16> {
        let old = self.master_port;
        let switched =
            |l: &str| l.contains(&format!("+switch-master {MASTER_NAME} 127.0.0.1 {old} "));
        let mut new_port = None;
        for s in self.sentinels.iter().take(2) {
            let line = s
                .wait_line(FAILOVER_DEADLINE, switched)
                .await
                .map_err(|e| io::Error::other(format!("no failover: {e}\n{}", s.log())))?;
            new_port = line
                .split_whitespace()
                .last()
                .and_then(|p| p.parse::<u16>().ok());
        }
        let port = new_port.ok_or_else(|| io::Error::other("unparsable +switch-master line"))?;
        self.master_port = port;
        Ok(port)
    }

    /// A connection to the current master, for assertions.
    pub async fn master_client(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        client(&format!("redis://127.0.0.1:{}", self.master_port)).await
    }

    pub fn logs(&self) -> String {
        let mut out = format!(
            "--- master\n{}\n--- replica\n{}\n",
            self.master.log(),
            self.replica.log()
        );
        for (i, s) in self.sentinels.iter().enumerate() {
            out.push_str(&format!("--- sentinel {i}\n{}\n", s.log()));
        }
        let _ = &self.dir;
        out
    }
}

/// A Redis Cluster of 3 masters with one replica each, `cluster-node-timeout` 1 s.
pub struct RedisCluster {
    pub nodes: Vec<Proc>,
    dir: tempfile::TempDir,
}

/// A node as `CLUSTER NODES` reports it.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub id: String,
    pub port: u16,
    pub master: bool,
    /// The master's id, for a replica.
    pub master_id: Option<String>,
}

impl RedisCluster {
    pub async fn start() -> io::Result<RedisCluster> {
        let dir = tempfile::Builder::new().prefix("cluster-").tempdir()?;
        let mut nodes = Vec::new();
        for i in 0..6 {
            let ndir = subdir(dir.path(), &format!("node{i}"))?;
            let node = Proc::start(
                "cluster node",
                |p| {
                    // The bus port is chosen too (default: port + 10000, which may be taken).
                    let bus = super::free_port();
                    data_node_args(
                        p,
                        &ndir,
                        &[
                            "--cluster-enabled".into(),
                            "yes".into(),
                            "--cluster-port".into(),
                            bus.to_string(),
                            "--cluster-config-file".into(),
                            format!("nodes-{p}.conf"),
                            "--cluster-node-timeout".into(),
                            "1000".into(),
                        ],
                    )
                },
                "Ready to accept connections",
            )
            .await?;
            nodes.push(node);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let output = tokio::process::Command::new(REDIS_CLI)
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .await?;
        if !output.status.success() {
            return Err(io::Error::other(format!(
                "redis-cli --cluster create failed: {}\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        let cluster = RedisCluster { nodes, dir };
        for n in &cluster.nodes {
            n.wait_line(READY_DEADLINE, |l| l.contains("Cluster state changed: ok"))
                .await?;
        }
        // Replicas that have their master's data, so a failover has someone to promote.
        for n in cluster.topology().await? {
            if !n.master {
                cluster
                    .node(n.port)
                    .wait_line(READY_DEADLINE, |l| {
                        l.contains("MASTER <-> REPLICA sync: Finished with success")
                    })
                    .await?;
            }
        }
        Ok(cluster)
    }

    fn node(&self, port: u16) -> &Proc {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node on port {port}"))
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Proc::url).collect()
    }

    pub fn spec(&self) -> StoreSpec {
        // Seeds: every node, as an operator would list them.
        StoreSpec::Cluster { urls: self.urls() }
    }

    /// `CLUSTER NODES` as one live node sees it.
    pub async fn topology(&self) -> io::Result<Vec<NodeInfo>> {
        let mut last = io::Error::other("no node answered");
        for n in self.nodes.iter().filter(|n| n.child.is_some()) {
            let answer = async {
                let mut c = client(&n.url()).await?;
                redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query_async::<String>(&mut c)
                    .await
            }
            .await;
            match answer {
                Ok(text) => return Ok(parse_nodes(&text)),
                Err(e) => last = io::Error::other(e),
            }
        }
        Err(last)
    }

    /// SIGKILL one master that has a replica; returns (its port, its replica's port).
    pub async fn kill_a_master(&mut self) -> io::Result<(u16, u16)> {
        let topo = self.topology().await?;
        let pair = topo.iter().filter(|n| n.master).find_map(|m| {
            let r = topo
                .iter()
                .find(|r| r.master_id.as_deref() == Some(m.id.as_str()))?;
            Some((m.port, r.port))
        });
        let Some((master, replica)) = pair else {
            return Err(io::Error::other(format!(
                "no master with a replica in {topo:?}\n{}",
                self.logs()
            )));
        };
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == master)
            .ok_or_else(|| io::Error::other(format!("master {master} is not ours")))?;
        node.kill()
            .await
            .map_err(|e| io::Error::other(format!("SIGKILL of {master}: {e}")))?;
        Ok((master, replica))
    }

    /// Returns once `replica` won the failover election (it serves the slots from then on; the
    /// other nodes learn it within a cluster-bus round trip).
    pub async fn await_promotion(&self, replica: u16) -> io::Result<()> {
        let node = self.node(replica);
        node.wait_line(FAILOVER_DEADLINE, |l| l.contains("Failover election won"))
            .await
            .map_err(|e| io::Error::other(format!("no promotion: {e}\n{}", node.log())))?;
        Ok(())
    }

    /// A cluster connection, for assertions.
    pub async fn client(&self) -> redis::RedisResult<redis::cluster_async::ClusterConnection> {
        redis::cluster::ClusterClientBuilder::new(self.urls())
            .connection_timeout(Duration::from_secs(10))
            .response_timeout(Duration::from_secs(10))
            .build()?
            .get_async_connection()
            .await
    }

    pub fn logs(&self) -> String {
        let _ = &self.dir;
        self.nodes
            .iter()
            .map(|n| format!("--- node {}\n{}\n", n.port, n.log()))
            .collect()
    }
}

fn parse_nodes(text: &str) -> Vec<NodeInfo> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let port = f[1]
                .split(['@', ','])
                .next()?
                .rsplit_once(':')?
                .1
                .parse()
                .ok()?;
            Some(NodeInfo {
                id: f[0].into(),
                port,
                master: f[2].split(',').any(|x| x == "master"),
                master_id: (f[3] != "-").then(|| f[3].to_owned()),
            })
        })
        .collect()
}

fn subdir(parent: &Path, name: &str) -> io::Result<PathBuf> {
    let d = parent.join(name);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

async fn client(url: &str) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(10)))
        .set_response_timeout(Some(Duration::from_secs(10)));
    redis::Client::open(url)?
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// Milliseconds since `t`, for the printed measurements.
pub fn ms_since(t: Instant) -> u128 {
    t.elapsed().as_millis()
}

/// The topologies the shared-store tests run unchanged against.
#[derive(Debug, Clone, Copy)]
pub enum Topo {
    Standalone,
    Cluster,
}

/// A running store of either topology.
pub enum TestStore {
    Standalone(super::redis_server::RedisServer),
    Cluster(RedisCluster),
}

impl TestStore {
    pub async fn start(topo: Topo) -> io::Result<TestStore> {
        Ok(match topo {
            Topo::Standalone => {
                TestStore::Standalone(super::redis_server::RedisServer::start().await?)
            }
            Topo::Cluster => TestStore::Cluster(RedisCluster::start().await?),
        })
    }

    pub fn spec(&self) -> StoreSpec {
        match self {
            TestStore::Standalone(r) => StoreSpec::Standalone(r.url()),
            TestStore::Cluster(c) => c.spec(),
        }
    }

    /// A connection for assertions (commands are routed by key in a cluster).
    pub async fn client(&self) -> redis::RedisResult<AnyConn> {
        Ok(match self {
            TestStore::Standalone(r) => AnyConn::Single(r.client().await?),
            TestStore::Cluster(c) => AnyConn::Cluster(c.client().await?),
        })
    }
}

/// Either connection, usable with `redis::AsyncCommands`.
#[derive(Clone)]
pub enum AnyConn {
    Single(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for AnyConn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            AnyConn::Single(c) => c.req_packed_command(cmd),
            AnyConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            AnyConn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            AnyConn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            AnyConn::Single(c) => c.get_db(),
            AnyConn::Cluster(c) => c.get_db(),
        }
    }
}

// ---- The failover scenario both topologies run (tests/redis_sentinel.rs, tests/redis_cluster.rs).

pub mod scenario {
    use std::collections::HashSet;

    use serde_json::{Value, json};

    use super::super::rfb_client::{self, WsConnect};
    use super::super::rfb_server::RfbServer;
    use super::super::{
        BackendSpec, Gateway, GatewayConfig, Live, StoreSpec, now, open_session, token_with_claims,
    };

    pub const LIVE_SESSIONS: usize = 20;

    pub fn config(desks: &[RfbServer], store: &StoreSpec) -> GatewayConfig {
        let backends = desks
            .iter()
            .enumerate()
            .map(|(i, d)| BackendSpec::rfb(&format!("d{i}"), d.addr))
            .collect();
        let mut cfg = GatewayConfig::new(backends);
        cfg.store = Some(store.clone());
        cfg.extra = "limits:\n  max_sessions_per_user: 100\n".into();
        cfg
    }

    pub async fn replicas(desks: &[RfbServer], store: &StoreSpec) -> (Gateway, Gateway) {
        tokio::join!(
            Gateway::start(config(desks, store)),
            Gateway::start(config(desks, store))
        )
    }

    pub fn jwt(sub: &str, sid: &str, jti: Option<&str>, backend: Option<&str>) -> String {
        let mut claims = json!({ "sub": sub, "sid": sid, "exp": now() + 600 });
        if let Some(j) = jti {
            claims["jti"] = json!(j);
        }
        if let Some(b) = backend {
            claims["backend"] = json!(b);
        }
        token_with_claims(&claims)
    }

    pub async fn refusal(gw: &Gateway, token: &str) -> (u16, String) {
        let c = WsConnect::new(gw.ws_url(&format!("?token={token}")));
        let err = rfb_client::connect(&c).await.err().expect("refused");
        rfb_client::error_code(&err).expect("http refusal")
    }

    /// `LIVE_SESSIONS` sessions, alternately on A and B: sid `live{i}`, user `u{i}`, jti `j{i}`.
    pub async fn open_live(a: &Gateway, b: &Gateway) -> Vec<Live> {
        let mut live = Vec::new();
        for i in 0..LIVE_SESSIONS {
            let gw = if i % 2 == 0 { a } else { b };
            let token = jwt(
                &format!("u{i}"),
                &format!("live{i}"),
                Some(&format!("j{i}")),
                None,
            );
            live.push(open_session(gw, &token).await);
        }
        live
    }

    /// Returns once `gw` logged `first` and, after it, `then`: woken by every new log line.
    pub async fn wait_after(
        gw: &Gateway,
        first: impl Fn(&Value) -> bool,
        then: impl Fn(&Value) -> bool,
    ) -> Value {
        loop {
            let logs = gw.logs();
            if let Some(i) = logs.iter().position(&first)
                && let Some(v) = logs[i..].iter().find(|v| then(v))
            {
                return v.clone();
            }
            gw.wait_logs(logs.len() + 1, |_| true).await;
        }
    }

    /// The proof that the replicas share pins through the store again: a sid placed on one
    /// replica (on the backend its token names, which rendezvous placement would not choose
    /// for every sid) belongs to its owner on the other (another user is refused, which a
    /// replica without the store cannot know) and reaches the same backend there.
    pub async fn assert_pins_shared(a: &Gateway, b: &Gateway, round: &str, backends: usize) {
        for k in 0..6 {
            let (first, second) = if k % 2 == 0 { (a, b) } else { (b, a) };
            let sid = format!("{round}-{k}");
            let backend = format!("d{}", k % backends);
            let owner = format!("owner{k}");
            let placed = open_session(first, &jwt(&owner, &sid, None, Some(&backend))).await;
            assert_eq!(placed.session.server_name, backend);
            assert_eq!(
                refusal(second, &jwt("mallory", &sid, None, None)).await,
                (403, "session_owned_by_other_user".into()),
                "{sid}: the other replica does not see the pin"
            );
            let again = open_session(second, &jwt(&owner, &sid, None, None)).await;
            assert_eq!(
                again.session.server_name, backend,
                "{sid} moved between replicas"
            );
        }
    }

    /// Every live session still flows: each asks for and gets a full framebuffer update; and
    /// neither replica ended one.
    pub async fn assert_all_alive(live: &mut [Live], a: &Gateway, b: &Gateway) {
        for l in live.iter_mut() {
            rfb_client::first_framebuffer_update(&mut l.ws, &mut l.session)
                .await
                .expect("live session survived the failover");
        }
        for gw in [a, b] {
            let ended = gw
                .logs()
                .into_iter()
                .filter(|v| {
                    v["event"] == "session_ended"
                        && v["session_id"]
                            .as_str()
                            .is_some_and(|s| s.starts_with("live"))
                })
                .count();
            assert_eq!(ended, 0, "a live session was dropped");
        }
    }

    /// A kick asked on B closes `live0` (on A); a revocation asked on A closes `live1` (on B),
    /// whose token B refuses from then on.
    pub async fn assert_kick_and_revoke_cross(live: &mut [Live], a: &Gateway, b: &Gateway) {
        let (status, body) = b.admin("DELETE", "/admin/sessions/live0", "").await;
        assert_eq!(status, 200, "{body}");
        let close = rfb_client::read_close(&mut live[0].ws)
            .await
            .expect("close");
        assert_eq!(u16::from(close.code), 4003, "kick did not reach replica A");

        let (status, body) = a.admin("POST", "/admin/revoke", r#"{"jti":"j1"}"#).await;
        assert_eq!(status, 200, "{body}");
        let close = rfb_client::read_close(&mut live[1].ws)
            .await
            .expect("close");
        assert_eq!(
            u16::from(close.code),
            4003,
            "revocation did not reach replica B"
        );
        assert_eq!(
            refusal(b, &jwt("u1", "live1", Some("j1"), None)).await,
            (403, "token_revoked".into())
        );
    }

    /// Both replicas logged the master's move from `old` to `new` and then wrote their live pins
    /// back; returns each replica's `store_reconnected` line.
    pub async fn assert_master_moved(a: &Gateway, b: &Gateway, old: u16, new: u16) -> Vec<Value> {
        let mut reconnected = Vec::new();
        for gw in [a, b] {
            reconnected.push(
                wait_after(
                    gw,
                    |v| v["event"] == "store_master_changed",
                    |v| v["event"] == "store_reconnected",
                )
                .await,
            );
            let moved = gw.wait_log(|v| v["event"] == "store_master_changed").await;
            assert_eq!(moved["old_addr"], format!("127.0.0.1:{old}"));
            assert_eq!(moved["addr"], format!("127.0.0.1:{new}"));
        }
        reconnected
    }

    /// The store now holds every live session's pin on the backend it runs on (written back
    /// after the failover: replication is asynchronous, the promoted node may lack the latest).
    pub async fn assert_live_pins_stored<C: redis::AsyncCommands>(con: &mut C, live: &[Live]) {
        for (i, l) in live.iter().enumerate() {
            let backend: Option<String> = con
                .hget(format!("vncgate:session:live{i}"), "backend")
                .await
                .expect("hget");
            assert_eq!(backend.as_deref(), Some(l.session.server_name.as_str()));
        }
    }

    /// Both replicas report the store up with a master, and `nodes` nodes of `role` reachable.
    pub async fn assert_store_healthy(a: &Gateway, b: &Gateway, role: &str, nodes: f64) {
        for gw in [a, b] {
            assert_eq!(gw.metric("vncgate_store_master_up").await, 1.0);
            assert_eq!(gw.metric("vncgate_store_up").await, 1.0);
            let series = format!("vncgate_store_nodes_reachable{{role=\"{role}\"}}");
            assert_eq!(gw.metric(&series).await, nodes);
        }
    }

    /// Distinct backends among the live sessions (the placement spread them).
    pub fn spread(live: &[Live]) -> usize {
        live.iter()
            .map(|l| l.session.server_name.clone())
            .collect::<HashSet<_>>()
            .len()
    }
}
