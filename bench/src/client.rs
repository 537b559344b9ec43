//! The load generator. Every scenario opens its sessions the same way on every path (TCP or
//! WebSocket, then the RFB handshake), measures inside a fixed window after a warm-up, and
//! prints one JSON line.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore, oneshot};

use crate::conn::{Conn, ReadSize, Target};
use crate::procinfo::{self, Watch, round};
use crate::rfb;
use crate::tls::{ClientTls, Negotiated};
use crate::tokens::{Minter, minter_from_env};

/// Any single connect + upgrade + handshake taking longer than this counts as a failure.
const OP_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Name of the path under test, copied into the output (direct, vncgate, websockify, ...).
    #[arg(long, global = true, default_value = "")]
    pub label: String,
    /// Run number, copied into the output.
    #[arg(long, global = true, default_value_t = 0)]
    pub run: u32,
    /// Environment variable holding the HS256 secret: when set, every WebSocket connection
    /// carries a fresh token (`?token=`) with its own `sub` and `sid`.
    #[arg(long, global = true)]
    pub jwt_secret_env: Option<String>,
    /// Processes to report CPU and memory for, as NAME=PID (descendants included); repeatable.
    #[arg(long = "watch", global = true)]
    pub watch: Vec<String>,
    /// Runtime worker threads for the load generator (1 = a current-thread runtime).
    #[arg(long, global = true, default_value_t = 1)]
    pub threads: usize,
    /// PEM certificate the client trusts on tls:// and wss:// targets (the bench's own, see
    /// `vncgate-bench tls-cert`); required for them.
    #[arg(long, global = true)]
    pub ca_file: Option<std::path::PathBuf>,
    /// Seconds of traffic before the measured window starts.
    #[arg(long, global = true, default_value_t = 1.0)]
    pub warmup: f64,
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Debug, Subcommand)]
pub enum Scenario {
    /// Backend -> client throughput over K sessions (server in updates mode).
    Bulk {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 4)]
        sessions: usize,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// `backend` claim of the tokens (a backend name in the vncgate pool).
        #[arg(long)]
        backend: Option<String>,
    },
    /// Round trips of small messages through an echo server, one session.
    Latency {
        #[arg(long)]
        url: String,
        /// Round trips per second; 0 = back to back.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Message size in bytes (8 = one RFB KeyEvent).
        #[arg(long, default_value_t = 8)]
        size: usize,
        #[arg(long)]
        backend: Option<String>,
    },
    /// Connections per second, each: TCP connect, (TLS handshake,) WebSocket upgrade with a
    /// fresh JWT, RFB handshake, close.
    Upgrades {
        #[arg(long)]
        url: String,
        /// TLS targets: each worker keeps a client session cache across its connections, so
        /// all but its first can resume (reported as scenario `upgrades-resume`, with how many
        /// the server did resume). Without it every TLS connection is a full handshake.
        #[arg(long)]
        tls_resume: bool,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Tokens minted before the run (0 = 10,000 per second of run time); a run that needs
        /// more reuses them and says so.
        #[arg(long, default_value_t = 0)]
        tokens: usize,
        #[arg(long)]
        backend: Option<String>,
    },
    /// Time to the first framebuffer update, one session at a time: TCP connect, upgrade with a
    /// fresh JWT, RFB handshake, a non-incremental FramebufferUpdateRequest for the whole
    /// screen, the first FramebufferUpdate read whole, close (server in updates mode).
    FirstUpdate {
        #[arg(long)]
        url: String,
        /// Measured sessions, opened one after the other (after the warm-up's, not counted).
        #[arg(long, default_value_t = 200)]
        iterations: usize,
        #[arg(long)]
        backend: Option<String>,
    },
    /// Open N sessions, hold them, and report the memory of the watched processes.
    Idle {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 10000)]
        sessions: usize,
        /// Sessions being opened at the same time.
        #[arg(long, default_value_t = 200)]
        connect_concurrency: usize,
        /// Keep the sessions this long after reporting (0 = close at once).
        #[arg(long, default_value_t = 0.0)]
        hold_seconds: f64,
        /// Read memory again this long after the first reading (1 s after the last session
        /// opened): vncgate returns freed heap pages every 10 s when sessions came or went.
        #[arg(long, default_value_t = 11.0)]
        settle_seconds: f64,
        #[arg(long)]
        backend: Option<String>,
    },
    /// p99 of one interactive echo session while M bulk sessions saturate the path.
    Fairness {
        #[arg(long)]
        bulk_url: String,
        #[arg(long)]
        echo_url: String,
        #[arg(long, default_value_t = 100)]
        bulk_sessions: usize,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Interactive round trips per second.
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        #[arg(long, default_value_t = 8)]
        size: usize,
        #[arg(long)]
        bulk_backend: Option<String>,
        #[arg(long)]
        echo_backend: Option<String>,
    },
}

pub fn main(args: ClientArgs) -> Result<(), String> {
    let rt = crate::runtime(args.threads).map_err(|e| e.to_string())?;
    let out = rt.block_on(run(&args))?;
    println!("{out}");
    // Sessions still open (idle, bulk readers) are dropped with the runtime.
    rt.shutdown_timeout(Duration::from_millis(100));
    Ok(())
}

async fn run(args: &ClientArgs) -> Result<Value, String> {
    let mut watch = Watch::new(&args.watch)?;
    let load_before = procinfo::load_avg();
    let minter = minter_from_env(args.jwt_secret_env.as_deref(), 3600)?.map(Arc::new);
    let warmup = Duration::from_secs_f64(args.warmup.max(0.0));
    let resume = matches!(
        args.scenario,
        Scenario::Upgrades {
            tls_resume: true,
            ..
        }
    );
    let tls = args
        .ca_file
        .as_deref()
        .map(|f| ClientTls::new(f, resume))
        .transpose()
        .map_err(|e| format!("TLS client: {e}"))?;
    let parse = |url: &str| Target::parse(url, tls.as_ref());
    let mut out = match &args.scenario {
        Scenario::Bulk {
            url,
            sessions,
            seconds,
            backend,
        } => {
            let target = parse(url)?;
            let r = bulk(
                &target,
                minter.as_deref(),
                backend.as_deref(),
                *sessions,
                warmup,
                *seconds,
                &mut watch,
            )
            .await
            .map_err(|e| format!("bulk: {e}"))?;
            json!({"scenario": format!("bulk-{sessions}"), "url": redact(url), "sessions": sessions, "seconds": seconds, "result": r})
        }
        Scenario::Latency {
            url,
            rate,
            seconds,
            size,
            backend,
        } => {
            let target = parse(url)?;
            let token = minter.as_ref().map(|m| m.mint(0, backend.as_deref()));
            watch.start();
            let started = Instant::now();
            let h = latency_probe(&target, token, *rate, *seconds, *size, warmup)
                .await
                .map_err(|e| format!("latency: {e}"))?;
            let procs = watch.finish(started.elapsed().as_secs_f64(), false);
            json!({"scenario": "latency", "url": redact(url), "rate": rate, "seconds": seconds,
                   "size": size, "result": hist_json(&h, *seconds), "procs": procs})
        }
        Scenario::Upgrades {
            url,
            tls_resume,
            concurrency,
            seconds,
            tokens,
            backend,
        } => {
            let target = parse(url)?;
            let r = upgrades(
                &target,
                minter.as_deref(),
                backend.as_deref(),
                *concurrency,
                *tokens,
                warmup,
                *seconds,
                &mut watch,
            )
            .await?;
            let scenario = if *tls_resume {
                "upgrades-resume"
            } else {
                "upgrades"
            };
            json!({"scenario": scenario, "url": redact(url), "concurrency": concurrency,
                   "seconds": seconds, "result": r})
        }
        Scenario::FirstUpdate {
            url,
            iterations,
            backend,
        } => {
            let target = parse(url)?;
            let r = first_update(
                &target,
                minter.as_deref(),
                backend.as_deref(),
                *iterations,
                warmup,
                &mut watch,
            )
            .await?;
            json!({"scenario": "first-update", "url": redact(url), "iterations": iterations,
                   "result": r})
        }
        Scenario::Idle {
            url,
            sessions,
            connect_concurrency,
            hold_seconds,
            settle_seconds,
            backend,
        } => {
            let target = parse(url)?;
            let r = idle(
                &target,
                minter.clone(),
                backend.clone(),
                IdleShape {
                    sessions: *sessions,
                    connect_concurrency: *connect_concurrency,
                    hold_seconds: *hold_seconds,
                    settle_seconds: *settle_seconds,
                },
                &watch,
            )
            .await?;
            json!({"scenario": "idle", "url": redact(url), "sessions": sessions, "result": r})
        }
        Scenario::Fairness {
            bulk_url,
            echo_url,
            bulk_sessions,
            seconds,
            rate,
            size,
            bulk_backend,
            echo_backend,
        } => {
            let bulk_target = parse(bulk_url)?;
            let echo_target = parse(echo_url)?;
            let r = fairness(
                &bulk_target,
                &echo_target,
                minter.as_deref(),
                bulk_backend.as_deref(),
                echo_backend.as_deref(),
                *bulk_sessions,
                *seconds,
                *rate,
                *size,
                warmup,
                &mut watch,
            )
            .await?;
            json!({"scenario": "fairness", "url": redact(bulk_url), "bulk_sessions": bulk_sessions,
                   "seconds": seconds, "rate": rate, "size": size, "result": r})
        }
    };
    out["label"] = json!(args.label);
    out["run"] = json!(args.run);
    out["load_avg_before"] = load_before;
    out["load_avg_after"] = procinfo::load_avg();
    out["unix_time"] = json!(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    );
    Ok(out)
}

/// URLs never carry the token (it is added per connection), but strip any query anyway.
fn redact(url: &str) -> String {
    url.split('?').next().unwrap_or("").to_owned()
}

/// Connect, upgrade (with `token` on WebSocket targets), RFB handshake. Returns the connection
/// and the upgrade time (TCP connect through 101).
async fn open_session(
    target: &Target,
    token: Option<&str>,
    read: ReadSize,
) -> io::Result<(Conn, Duration)> {
    let opening = async {
        let (mut conn, upgrade) = Conn::open(target, token, read).await?;
        rfb::client_handshake(&mut conn).await?;
        Ok::<_, io::Error>((conn, upgrade))
    };
    tokio::time::timeout(OP_TIMEOUT, opening)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "session setup timed out"))?
}

fn new_hist() -> Histogram<u64> {
    // Nanoseconds, 1 ns .. 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

fn us(ns: u64) -> f64 {
    round(ns as f64 / 1000.0, 1)
}

fn hist_json(h: &Histogram<u64>, seconds: f64) -> Value {
    json!({
        "count": h.len(),
        "rate_per_s": round(h.len() as f64 / seconds.max(1e-9), 1),
        "p50_us": us(h.value_at_quantile(0.50)),
        "p90_us": us(h.value_at_quantile(0.90)),
        "p99_us": us(h.value_at_quantile(0.99)),
        "p999_us": us(h.value_at_quantile(0.999)),
        "max_us": us(h.max()),
        "mean_us": round(h.mean() / 1000.0, 1),
    })
}

/// Sessions that read and count everything the backend sends until aborted.
struct BulkReaders {
    counters: Arc<Vec<AtomicU64>>,
    errors: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// What the first session's TLS handshake negotiated (TLS targets): the cipher is most of
    /// what TLS costs a bulk stream.
    tls: Option<Negotiated>,
}

impl BulkReaders {
    async fn open(
        target: &Target,
        minter: Option<&Minter>,
        backend: Option<&str>,
        sessions: usize,
        first_index: usize,
    ) -> io::Result<BulkReaders> {
        let counters: Arc<Vec<AtomicU64>> =
            Arc::new((0..sessions).map(|_| AtomicU64::new(0)).collect());
        let errors = Arc::new(AtomicUsize::new(0));
        let mut opening = tokio::task::JoinSet::new();
        for i in 0..sessions {
            let token = minter.map(|m| m.mint(first_index + i, backend));
            let target = target.clone();
            opening.spawn(async move {
                let (mut conn, _) = open_session(&target, token.as_deref(), ReadSize::Bulk).await?;
                conn.send(&rfb::update_request(false)).await?;
                Ok::<_, io::Error>((i, conn))
            });
        }
        let mut tasks = Vec::with_capacity(sessions);
        let mut tls = None;
        while let Some(joined) = opening.join_next().await {
            let (i, mut conn) = joined.map_err(io::Error::other)??;
            if tls.is_none() {
                tls = conn.tls().cloned();
            }
            let counters = Arc::clone(&counters);
            let errors = Arc::clone(&errors);
            tasks.push(tokio::spawn(async move {
                loop {
                    match conn.discard().await {
                        Ok(0) | Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        Ok(n) => {
                            counters[i].fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        Ok(BulkReaders {
            counters,
            errors,
            tasks,
            tls,
        })
    }

    fn snapshot(&self) -> Vec<u64> {
        self.counters
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    fn stop(self) -> usize {
        for t in &self.tasks {
            t.abort();
        }
        self.errors.load(Ordering::Relaxed)
    }
}

fn throughput_json(start: &[u64], end: &[u64], seconds: f64) -> Value {
    let mut per: Vec<f64> = start
        .iter()
        .zip(end)
        .map(|(a, b)| (b - a) as f64 / seconds / 1e6)
        .collect();
    per.sort_by(f64::total_cmp);
    let total: f64 = per.iter().sum();
    let bytes: u64 = start.iter().zip(end).map(|(a, b)| b - a).sum();
    json!({
        "bytes": bytes,
        "mb_per_s": round(total, 1),
        "per_session_mb_per_s": {
            "min": round(per.first().copied().unwrap_or(0.0), 2),
            "median": round(median(&per), 2),
            "max": round(per.last().copied().unwrap_or(0.0), 2),
        },
    })
}

fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

async fn bulk(
    target: &Target,
    minter: Option<&Minter>,
    backend: Option<&str>,
    sessions: usize,
    warmup: Duration,
    seconds: f64,
    watch: &mut Watch,
) -> io::Result<Value> {
    let readers = BulkReaders::open(target, minter, backend, sessions, 0).await?;
    tokio::time::sleep(warmup).await;
    let start = readers.snapshot();
    watch.start();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    let end = readers.snapshot();
    let window = t0.elapsed().as_secs_f64();
    let procs = watch.finish(window, false);
    let tls = readers.tls.clone();
    let errors = readers.stop();
    let mut r = throughput_json(&start, &end, window);
    r["session_errors"] = json!(errors);
    if let Some(n) = tls {
        r["tls"] = json!({"version": n.version, "cipher_suite": n.suite});
    }
    r["procs"] = procs;
    Ok(r)
}

/// A message of `size` bytes made of RFB KeyEvents (press Return), the typical interactive input.
fn key_events(size: usize) -> Vec<u8> {
    const KEY: [u8; 8] = [4, 1, 0, 0, 0, 0, 0xff, 0x0d];
    (0..size).map(|i| KEY[i % 8]).collect()
}

/// One session of paced round trips: send `size` bytes, wait for all of them to come back.
async fn latency_probe(
    target: &Target,
    token: Option<String>,
    rate: f64,
    seconds: f64,
    size: usize,
    warmup: Duration,
) -> io::Result<Histogram<u64>> {
    let (mut conn, _) = open_session(target, token.as_deref(), ReadSize::Small).await?;
    let msg = key_events(size.max(1));
    let warm_until = Instant::now() + warmup;
    let mut warm = 0;
    while Instant::now() < warm_until || warm < 100 {
        conn.send(&msg).await?;
        conn.consume(msg.len()).await?;
        warm += 1;
    }
    let mut hist = new_hist();
    let mut tick = (rate > 0.0).then(|| {
        let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        t
    });
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    loop {
        if let Some(t) = tick.as_mut() {
            t.tick().await;
        }
        if Instant::now() >= end {
            break;
        }
        let sent = Instant::now();
        conn.send(&msg).await?;
        conn.consume(msg.len()).await?;
        let _ = hist.record((sent.elapsed().as_nanos() as u64).max(1));
    }
    conn.close().await;
    Ok(hist)
}

#[allow(clippy::too_many_arguments)]
async fn upgrades(
    target: &Target,
    minter: Option<&Minter>,
    backend: Option<&str>,
    concurrency: usize,
    tokens: usize,
    warmup: Duration,
    seconds: f64,
    watch: &mut Watch,
) -> Result<Value, String> {
    let total_secs = seconds + warmup.as_secs_f64();
    let tokens: Arc<Vec<String>> = Arc::new(match minter {
        Some(m) if target.is_ws() => {
            let n = if tokens > 0 {
                tokens
            } else {
                ((total_secs * 10_000.0) as usize).max(1000)
            };
            (0..n).map(|i| m.mint(i, backend)).collect()
        }
        _ => Vec::new(),
    });
    let next = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let window_start = t0 + warmup;
    let window_end = window_start + Duration::from_secs_f64(seconds);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        // Each worker is one browser reconnecting: with --tls-resume it resumes from the
        // tickets its own last connection got.
        let target = target.own_tls_cache();
        let tokens = Arc::clone(&tokens);
        let next = Arc::clone(&next);
        workers.spawn(async move {
            let mut t = UpgradeTally::new();
            loop {
                let started = Instant::now();
                if started >= window_end {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                let token = (!tokens.is_empty()).then(|| tokens[i % tokens.len()].as_str());
                let result = open_session(&target, token, ReadSize::Small).await;
                let done = Instant::now();
                let counted = started >= window_start && done <= window_end;
                match result {
                    Ok((conn, upgrade)) => {
                        if let Some(n) = conn.tls() {
                            if counted {
                                t.resumed += u64::from(n.resumed);
                            }
                            t.negotiated.get_or_insert_with(|| n.clone());
                        }
                        conn.close().await;
                        if counted {
                            t.ok += 1;
                            let _ = t.upgrade.record((upgrade.as_nanos() as u64).max(1));
                            let _ = t.setup.record(((done - started).as_nanos() as u64).max(1));
                        }
                    }
                    Err(e) => {
                        if counted {
                            t.failed += 1;
                        }
                        t.first_error.get_or_insert_with(|| e.to_string());
                        // Back off a little so a refusing gateway is not hammered in a loop.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
            t
        });
    }
    // CPU accounting over the measured window only.
    tokio::time::sleep_until(window_start.into()).await;
    watch.start();
    tokio::time::sleep_until(window_end.into()).await;
    let procs = watch.finish(seconds, false);
    let mut all = UpgradeTally::new();
    while let Some(joined) = workers.join_next().await {
        all.merge(joined.map_err(|e| e.to_string())?)?;
    }
    let used = next.load(Ordering::Relaxed);
    let mut r = json!({
        "ok": all.ok,
        "failed": all.failed,
        "first_error": all.first_error,
        "rate_per_s": round(all.ok as f64 / seconds, 1),
        "upgrade_p50_us": us(all.upgrade.value_at_quantile(0.5)),
        "upgrade_p99_us": us(all.upgrade.value_at_quantile(0.99)),
        "upgrade_max_us": us(all.upgrade.max()),
        "session_setup_p50_us": us(all.setup.value_at_quantile(0.5)),
        "session_setup_p99_us": us(all.setup.value_at_quantile(0.99)),
        "tokens_minted": tokens.len(),
        "tokens_reused": !tokens.is_empty() && used > tokens.len(),
        "procs": procs,
    });
    // Whether the server resumed is its choice: the client only offers. Counted, not assumed.
    if let Some(n) = &all.negotiated {
        r["tls"] = json!({
            "version": n.version,
            "cipher_suite": n.suite,
            "resumed": all.resumed,
            "resumed_share": round(all.resumed as f64 / all.ok.max(1) as f64, 3),
        });
    }
    Ok(r)
}

/// One upgrades worker's counts, merged at the end.
struct UpgradeTally {
    upgrade: Histogram<u64>,
    setup: Histogram<u64>,
    ok: u64,
    failed: u64,
    /// Counted sessions whose TLS handshake was a resumption.
    resumed: u64,
    first_error: Option<String>,
    negotiated: Option<Negotiated>,
}

impl UpgradeTally {
    fn new() -> UpgradeTally {
        UpgradeTally {
            upgrade: new_hist(),
            setup: new_hist(),
            ok: 0,
            failed: 0,
            resumed: 0,
            first_error: None,
            negotiated: None,
        }
    }

    fn merge(&mut self, o: UpgradeTally) -> Result<(), String> {
        self.upgrade.add(o.upgrade).map_err(|e| e.to_string())?;
        self.setup.add(o.setup).map_err(|e| e.to_string())?;
        self.ok += o.ok;
        self.failed += o.failed;
        self.resumed += o.resumed;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
        if self.negotiated.is_none() {
            self.negotiated = o.negotiated;
        }
        Ok(())
    }
}

/// When each step of one session's start was done, counted from the start of its TCP connect.
struct FirstUpdateTimes {
    /// 101 received (TCP connected, for direct TCP).
    upgrade: Duration,
    /// ServerInit received: the RFB handshake is done.
    server_init: Duration,
    /// The FramebufferUpdate header and its first rectangle's header received.
    first_rect: Duration,
    /// The whole first FramebufferUpdate received.
    update: Duration,
    update_bytes: usize,
}

/// One session: connect, upgrade, handshake, request the whole screen, read the first update.
async fn first_update_once(target: &Target, token: Option<&str>) -> io::Result<FirstUpdateTimes> {
    use crate::rfb::ByteStream;
    let started = Instant::now();
    let session = async {
        let (mut conn, upgrade) = Conn::open(target, token, ReadSize::Bulk).await?;
        rfb::client_handshake(&mut conn).await?;
        let server_init = started.elapsed();
        conn.send(&rfb::update_request(false)).await?;
        // FramebufferUpdate: type, padding, rectangle count; then x, y, w, h, encoding.
        let header = conn.read_exact(16).await?;
        let first_rect = started.elapsed();
        let rects = u16::from_be_bytes([header[2], header[3]]);
        let encoding = i32::from_be_bytes([header[12], header[13], header[14], header[15]]);
        if header[0] != 0 || rects != 1 || encoding != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "expected a FramebufferUpdate of one raw rectangle, got type {} with {rects} \
                     rectangles, encoding {encoding}",
                    header[0]
                ),
            ));
        }
        let w = u16::from_be_bytes([header[8], header[9]]) as usize;
        let h = u16::from_be_bytes([header[10], header[11]]) as usize;
        // The synthetic server's pixel format: 32 bits per pixel.
        let pixels = w * h * 4;
        conn.consume(pixels).await?;
        let update = started.elapsed();
        conn.close().await;
        Ok::<_, io::Error>(FirstUpdateTimes {
            upgrade,
            server_init,
            first_rect,
            update,
            update_bytes: 16 + pixels,
        })
    };
    tokio::time::timeout(OP_TIMEOUT, session)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "first update timed out"))?
}

async fn first_update(
    target: &Target,
    minter: Option<&Minter>,
    backend: Option<&str>,
    iterations: usize,
    warmup: Duration,
    watch: &mut Watch,
) -> Result<Value, String> {
    let token = |i: usize| {
        minter
            .filter(|_| target.is_ws())
            .map(|m| m.mint(i, backend))
    };
    // Warm-up: sessions for `warmup` (at least 5), not counted.
    let warm_until = Instant::now() + warmup;
    let mut i = 0;
    while Instant::now() < warm_until || i < 5 {
        let t = token(i);
        first_update_once(target, t.as_deref())
            .await
            .map_err(|e| format!("first-update: warm-up session: {e}"))?;
        i += 1;
    }
    let (mut upgrade, mut server_init, mut first_rect, mut update) =
        (new_hist(), new_hist(), new_hist(), new_hist());
    let (mut failed, mut first_error, mut update_bytes) = (0u64, None::<String>, 0usize);
    watch.start();
    let t0 = Instant::now();
    for _ in 0..iterations {
        // The token is minted before the session's clock starts.
        let t = token(i);
        i += 1;
        match first_update_once(target, t.as_deref()).await {
            Ok(times) => {
                let ns = |d: Duration| (d.as_nanos() as u64).max(1);
                let _ = upgrade.record(ns(times.upgrade));
                let _ = server_init.record(ns(times.server_init));
                let _ = first_rect.record(ns(times.first_rect));
                let _ = update.record(ns(times.update));
                update_bytes = times.update_bytes;
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert_with(|| e.to_string());
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
    let window = t0.elapsed().as_secs_f64();
    let procs = watch.finish(window, false);
    let q = |h: &Histogram<u64>, q: f64| us(h.value_at_quantile(q));
    Ok(json!({
        "count": update.len(),
        "failed": failed,
        "first_error": first_error,
        "seconds": round(window, 2),
        "update_bytes": update_bytes,
        "upgrade_p50_us": q(&upgrade, 0.5),
        "upgrade_p99_us": q(&upgrade, 0.99),
        "server_init_p50_us": q(&server_init, 0.5),
        "server_init_p99_us": q(&server_init, 0.99),
        "first_rect_p50_us": q(&first_rect, 0.5),
        "first_rect_p99_us": q(&first_rect, 0.99),
        "update_p50_us": q(&update, 0.5),
        "update_p99_us": q(&update, 0.99),
        "update_max_us": us(update.max()),
        "update_mean_us": round(update.mean() / 1000.0, 1),
        "procs": procs,
    }))
}

struct IdleShape {
    sessions: usize,
    connect_concurrency: usize,
    hold_seconds: f64,
    settle_seconds: f64,
}

async fn idle(
    target: &Target,
    minter: Option<Arc<Minter>>,
    backend: Option<String>,
    shape: IdleShape,
    watch: &Watch,
) -> Result<Value, String> {
    let IdleShape {
        sessions,
        connect_concurrency,
        hold_seconds,
        settle_seconds,
    } = shape;
    let baseline: Vec<(String, procinfo::Sample)> = watch
        .targets()
        .map(|(name, pid)| (name.clone(), procinfo::sample(*pid, true)))
        .collect();
    let established = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let dropped = Arc::new(AtomicUsize::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let progress = Arc::new(Notify::new());
    let stop = Arc::new(AtomicBool::new(false));
    let permits = Arc::new(Semaphore::new(connect_concurrency.max(1)));
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(sessions);
    for i in 0..sessions {
        let target = target.clone();
        let minter = minter.clone();
        let backend = backend.clone();
        let (established, failed, dropped, first_error, progress, stop, permits) = (
            Arc::clone(&established),
            Arc::clone(&failed),
            Arc::clone(&dropped),
            Arc::clone(&first_error),
            Arc::clone(&progress),
            Arc::clone(&stop),
            Arc::clone(&permits),
        );
        tasks.push(tokio::spawn(async move {
            let permit = permits.acquire_owned().await;
            let token = minter.as_ref().map(|m| m.mint(i, backend.as_deref()));
            let opened = open_session(&target, token.as_deref(), ReadSize::Small).await;
            drop(permit);
            let mut conn = match opened {
                Ok((conn, _)) => conn,
                Err(e) => {
                    first_error
                        .lock()
                        .unwrap()
                        .get_or_insert_with(|| e.to_string());
                    failed.fetch_add(1, Ordering::Relaxed);
                    progress.notify_one();
                    return;
                }
            };
            established.fetch_add(1, Ordering::Relaxed);
            progress.notify_one();
            // Keep reading like a viewer does (pings, anything the server sends).
            loop {
                match conn.discard().await {
                    Ok(0) | Err(_) => {
                        if !stop.load(Ordering::Relaxed) {
                            dropped.fetch_add(1, Ordering::Relaxed);
                        }
                        return;
                    }
                    Ok(_) => {}
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while established.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < sessions {
        if Instant::now() > deadline {
            return Err("idle: sessions still opening after 600 s".into());
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), progress.notified()).await;
    }
    let setup_secs = t0.elapsed().as_secs_f64();
    // Let the gateway finish whatever follows a session start before reading its memory; then
    // read it again once it settled, the figure of a gateway holding idle sessions a while.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let n = established.load(Ordering::Relaxed);
    let early: Vec<procinfo::Sample> = watch
        .targets()
        .map(|(_, pid)| procinfo::sample(*pid, true))
        .collect();
    tokio::time::sleep(Duration::from_secs_f64(settle_seconds)).await;
    let mut procs = serde_json::Map::new();
    for (((name, pid), (_, base)), early) in watch.targets().zip(&baseline).zip(&early) {
        let now = procinfo::sample(*pid, true);
        let per = |x: u64| round(x as f64 / n.max(1) as f64, 2);
        procs.insert(
            name.clone(),
            json!({
                "pid": pid,
                "processes": now.processes,
                "rss_kib": now.rss_kib,
                "pss_kib": now.pss_kib,
                "baseline_rss_kib": base.rss_kib,
                "baseline_pss_kib": base.pss_kib,
                "rss_per_session_kib": per(now.rss_kib),
                "pss_per_session_kib": per(now.pss_kib),
                "delta_rss_per_session_kib": per(now.rss_kib.saturating_sub(base.rss_kib)),
                "delta_pss_per_session_kib": per(now.pss_kib.saturating_sub(base.pss_kib)),
                "rss_1s_per_session_kib": per(early.rss_kib),
            }),
        );
    }
    let result = json!({
        "established": n,
        "failed": failed.load(Ordering::Relaxed),
        "dropped_before_report": dropped.load(Ordering::Relaxed),
        "first_error": first_error.lock().unwrap().clone(),
        "setup_seconds": round(setup_secs, 2),
        "procs": Value::Object(procs),
    });
    if hold_seconds > 0.0 {
        eprintln!("{}", json!({"event": "established", "sessions": n}));
        tokio::time::sleep(Duration::from_secs_f64(hold_seconds)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in &tasks {
        t.abort();
    }
    Ok(result)
}

#[allow(clippy::too_many_arguments)]
async fn fairness(
    bulk_target: &Target,
    echo_target: &Target,
    minter: Option<&Minter>,
    bulk_backend: Option<&str>,
    echo_backend: Option<&str>,
    bulk_sessions: usize,
    seconds: f64,
    rate: f64,
    size: usize,
    warmup: Duration,
    watch: &mut Watch,
) -> Result<Value, String> {
    let readers = BulkReaders::open(bulk_target, minter, bulk_backend, bulk_sessions, 1)
        .await
        .map_err(|e| format!("fairness: bulk sessions: {e}"))?;
    tokio::time::sleep(warmup).await;
    // The interactive session gets its own thread and runtime, so its latency is the path's,
    // not the time it waits behind the bulk readers in the load generator.
    let echo_target = echo_target.clone();
    let token = minter.map(|m| m.mint(0, echo_backend));
    let (started_tx, started_rx) = oneshot::channel::<()>();
    let probe_warmup = Duration::from_millis(200);
    let probe = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            // The window starts with the probe's own warm-up; close enough for the bulk figure.
            let _ = started_tx.send(());
            latency_probe(&echo_target, token, rate, seconds, size, probe_warmup).await
        })
    });
    let _ = started_rx.await;
    tokio::time::sleep(probe_warmup).await;
    let start = readers.snapshot();
    watch.start();
    let t0 = Instant::now();
    let (done_tx, done_rx) = oneshot::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(probe.join());
    });
    let joined = done_rx.await.map_err(|e| e.to_string())?;
    let end = readers.snapshot();
    let window = t0.elapsed().as_secs_f64();
    let procs = watch.finish(window, false);
    let errors = readers.stop();
    let hist = joined
        .map_err(|_| "fairness: probe thread panicked".to_owned())?
        .map_err(|e| format!("fairness: interactive session: {e}"))?;
    Ok(json!({
        "interactive": hist_json(&hist, seconds),
        "bulk": throughput_json(&start, &end, window),
        "bulk_session_errors": errors,
        "procs": procs,
    }))
}
