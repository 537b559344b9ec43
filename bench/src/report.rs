//! Turn the JSON lines of several runs into the table of BENCHMARKS.md: per path the median and
//! min–max of each figure, the ratios between paths, and each target's verdict.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;

use clap::Args;
use serde_json::Value;

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Files of JSON lines written by `vncgate-bench client` (other lines are skipped).
    pub files: Vec<PathBuf>,
    /// Exit non-zero when any run had failed or dropped sessions, or measured nothing.
    #[arg(long)]
    pub check: bool,
}

/// Column order: the plain (ws://) paths with their TCP ceiling, then the TLS (wss://) paths
/// with theirs. A path's name says its listener kind: `-wss` and `direct-tls` are TLS.
const PATHS: [&str; 13] = [
    "direct",
    "vncgate",
    "vncgate-terminate",
    "vncgate-recording",
    "vncgate-redis",
    "vncgate-sentinel",
    "vncgate-cluster",
    "websockify",
    "direct-tls",
    "vncgate-wss",
    "vncgate-terminate-wss",
    "vncgate-recording-wss",
    "websockify-wss",
];

/// The RFB mode A/B: `vncgate` runs its pool with `rfb.mode: transparent`, `vncgate-terminate`
/// the same config with `mode: terminate`.
const TRANSPARENT: &str = "vncgate";
const TERMINATE: &str = "vncgate-terminate";
/// The listener A/B: the same gateway config behind a TLS listener.
const WSS: &str = "vncgate-wss";
/// The RFB mode A/B over wss://.
const TERMINATE_WSS: &str = "vncgate-terminate-wss";

struct Figure {
    scenario: &'static str,
    pointer: &'static str,
    name: &'static str,
}

const FIGURES: &[Figure] = &[
    Figure {
        scenario: "bulk-1",
        pointer: "/result/mb_per_s",
        name: "bulk, 1 session: MB/s",
    },
    Figure {
        scenario: "bulk-8",
        pointer: "/result/mb_per_s",
        name: "bulk, 8 sessions: MB/s, all sessions",
    },
    Figure {
        scenario: "bulk-8",
        pointer: "/result/per_session_mb_per_s/median",
        name: "bulk, 8 sessions: MB/s per session (median session)",
    },
    Figure {
        scenario: "latency",
        pointer: "/result/p50_us",
        name: "latency: round trip p50 µs",
    },
    Figure {
        scenario: "latency",
        pointer: "/result/p99_us",
        name: "latency: round trip p99 µs",
    },
    Figure {
        scenario: "latency",
        pointer: "/result/p999_us",
        name: "latency: round trip p99.9 µs",
    },
    Figure {
        scenario: "upgrades",
        pointer: "/result/rate_per_s",
        name: "upgrades: sessions opened per s",
    },
    Figure {
        scenario: "upgrades",
        pointer: "/result/upgrade_p50_us",
        name: "upgrades: connect+upgrade p50 µs",
    },
    Figure {
        scenario: "upgrades",
        pointer: "/result/upgrade_p99_us",
        name: "upgrades: connect+upgrade p99 µs",
    },
    Figure {
        scenario: "upgrades-resume",
        pointer: "/result/rate_per_s",
        name: "upgrades, TLS resumption offered: sessions opened per s",
    },
    Figure {
        scenario: "upgrades-resume",
        pointer: "/result/upgrade_p50_us",
        name: "upgrades, TLS resumption offered: connect+upgrade p50 µs",
    },
    Figure {
        scenario: "upgrades-resume",
        pointer: "/result/tls/resumed_share",
        name: "upgrades, TLS resumption offered: share of handshakes the server resumed",
    },
    Figure {
        scenario: "first-update",
        pointer: "/result/update_p50_us",
        name: "first update: connect to whole update p50 µs",
    },
    Figure {
        scenario: "first-update",
        pointer: "/result/update_p99_us",
        name: "first update: connect to whole update p99 µs",
    },
    Figure {
        scenario: "first-update",
        pointer: "/result/first_rect_p50_us",
        name: "first update: connect to first rectangle header p50 µs",
    },
    Figure {
        scenario: "first-update",
        pointer: "/result/first_rect_p99_us",
        name: "first update: connect to first rectangle header p99 µs",
    },
    Figure {
        scenario: "first-update",
        pointer: "/result/server_init_p50_us",
        name: "first update: connect to ServerInit p50 µs",
    },
    Figure {
        scenario: "first-update",
        pointer: "/result/upgrade_p50_us",
        name: "first update: connect to 101 p50 µs",
    },
    Figure {
        scenario: "idle",
        pointer: "/result/procs/gateway/rss_per_session_kib",
        name: "idle: RSS / sessions, KiB (12 s after the last opened)",
    },
    Figure {
        scenario: "idle",
        pointer: "/result/procs/gateway/rss_1s_per_session_kib",
        name: "idle: RSS / sessions, KiB (1 s after the last opened)",
    },
    Figure {
        scenario: "idle",
        pointer: "/result/procs/gateway/delta_rss_per_session_kib",
        name: "idle: (RSS − RSS before) / sessions, KiB",
    },
    Figure {
        scenario: "idle",
        pointer: "/result/procs/gateway/pss_per_session_kib",
        name: "idle: PSS / sessions, KiB",
    },
    Figure {
        scenario: "fairness",
        pointer: "/result/interactive/p50_us",
        name: "fairness: interactive p50 µs",
    },
    Figure {
        scenario: "fairness",
        pointer: "/result/interactive/p99_us",
        name: "fairness: interactive p99 µs",
    },
    Figure {
        scenario: "fairness",
        pointer: "/result/bulk/mb_per_s",
        name: "fairness: bulk MB/s meanwhile",
    },
];

/// runs[scenario][label] = the JSON lines of that path, in file order.
type Runs = BTreeMap<String, BTreeMap<String, Vec<Value>>>;

fn load(files: &[PathBuf]) -> Result<Runs, String> {
    let mut runs: Runs = BTreeMap::new();
    for f in files {
        let text = fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let (Some(scenario), Some(label)) = (
                v.get("scenario").and_then(Value::as_str),
                v.get("label").and_then(Value::as_str),
            ) else {
                continue;
            };
            runs.entry(scenario.to_owned())
                .or_default()
                .entry(label.to_owned())
                .or_default()
                .push(v);
        }
    }
    Ok(runs)
}

#[derive(Debug, Clone, Copy)]
struct Stats {
    median: f64,
    min: f64,
    max: f64,
    n: usize,
}

fn stats(values: &[f64]) -> Option<Stats> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Stats {
        median,
        min: v[0],
        max: v[n - 1],
        n,
    })
}

fn values(runs: &Runs, scenario: &str, label: &str, pointer: &str) -> Vec<f64> {
    runs.get(scenario)
        .and_then(|m| m.get(label))
        .map(|lines| {
            lines
                .iter()
                .filter_map(|v| v.pointer(pointer).and_then(Value::as_f64))
                .collect()
        })
        .unwrap_or_default()
}

/// Values keyed by run number, to pair runs of two paths.
fn by_run(runs: &Runs, scenario: &str, label: &str, pointer: &str) -> BTreeMap<u64, f64> {
    runs.get(scenario)
        .and_then(|m| m.get(label))
        .map(|lines| {
            lines
                .iter()
                .filter_map(|v| {
                    Some((
                        v.get("run")?.as_u64()?,
                        v.pointer(pointer).and_then(Value::as_f64)?,
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn fmt_num(x: f64) -> String {
    if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn fmt_stats(s: Option<Stats>) -> String {
    match s {
        None => "–".into(),
        Some(s) if s.n == 1 => fmt_num(s.median),
        Some(s) => format!(
            "{} ({}–{})",
            fmt_num(s.median),
            fmt_num(s.min),
            fmt_num(s.max)
        ),
    }
}

enum Kind {
    /// a / b of the medians must be at least the bound.
    Ratio,
    /// a − b of the medians must be at most the bound.
    Added,
    /// a's median must be at most the bound.
    Absolute,
    /// (a − b) / (peer − b) of the medians must be at most the bound: what a adds over the
    /// ceiling b, as a share of what the peer adds over it.
    AddedShare { peer: &'static str },
}

struct Target {
    what: &'static str,
    scenario: &'static str,
    pointer: &'static str,
    a: &'static str,
    b: &'static str,
    kind: Kind,
    bound: f64,
}

const TARGETS: &[Target] = &[
    Target {
        what: "bulk, 1 session, vs websockify",
        scenario: "bulk-1",
        pointer: "/result/mb_per_s",
        a: "vncgate",
        b: "websockify",
        kind: Kind::Ratio,
        bound: 2.0,
    },
    Target {
        what: "bulk, 1 session, vs direct TCP",
        scenario: "bulk-1",
        pointer: "/result/mb_per_s",
        a: "vncgate",
        b: "direct",
        kind: Kind::Ratio,
        bound: 0.55,
    },
    Target {
        what: "bulk, 8 sessions, vs websockify",
        scenario: "bulk-8",
        pointer: "/result/mb_per_s",
        a: "vncgate",
        b: "websockify",
        kind: Kind::Ratio,
        bound: 2.0,
    },
    Target {
        what: "bulk, 8 sessions, vs direct TCP",
        scenario: "bulk-8",
        pointer: "/result/mb_per_s",
        a: "vncgate",
        b: "direct",
        kind: Kind::Ratio,
        bound: 0.55,
    },
    Target {
        what: "latency p50 added over direct (µs)",
        scenario: "latency",
        pointer: "/result/p50_us",
        a: "vncgate",
        b: "direct",
        kind: Kind::Added,
        bound: 40.0,
    },
    Target {
        what: "latency p99 added over direct (µs)",
        scenario: "latency",
        pointer: "/result/p99_us",
        a: "vncgate",
        b: "direct",
        kind: Kind::Added,
        bound: 150.0,
    },
    Target {
        what: "upgrades/s (memory store) vs websockify",
        scenario: "upgrades",
        pointer: "/result/rate_per_s",
        a: "vncgate",
        b: "websockify",
        kind: Kind::Ratio,
        bound: 10.0,
    },
    Target {
        what: "upgrades/s (Redis store) vs websockify",
        scenario: "upgrades",
        pointer: "/result/rate_per_s",
        a: "vncgate-redis",
        b: "websockify",
        kind: Kind::Ratio,
        bound: 5.0,
    },
    Target {
        what: "idle RSS per session (KiB)",
        scenario: "idle",
        pointer: "/result/procs/gateway/rss_per_session_kib",
        a: "vncgate",
        b: "",
        kind: Kind::Absolute,
        bound: 32.0,
    },
    Target {
        what: "wss bulk, 1 session, vs websockify-wss",
        scenario: "bulk-1",
        pointer: "/result/mb_per_s",
        a: "vncgate-wss",
        b: "websockify-wss",
        kind: Kind::Ratio,
        bound: 1.5,
    },
    Target {
        what: "wss bulk, 1 session, vs direct TLS",
        scenario: "bulk-1",
        pointer: "/result/mb_per_s",
        a: "vncgate-wss",
        b: "direct-tls",
        kind: Kind::Ratio,
        bound: 0.6,
    },
    Target {
        what: "wss bulk, 8 sessions, vs websockify-wss",
        scenario: "bulk-8",
        pointer: "/result/mb_per_s",
        a: "vncgate-wss",
        b: "websockify-wss",
        kind: Kind::Ratio,
        bound: 1.5,
    },
    Target {
        what: "wss bulk, 8 sessions, vs direct TLS",
        scenario: "bulk-8",
        pointer: "/result/mb_per_s",
        a: "vncgate-wss",
        b: "direct-tls",
        kind: Kind::Ratio,
        bound: 0.6,
    },
    Target {
        what: "wss latency p50 added over direct TLS, share of websockify-wss's",
        scenario: "latency",
        pointer: "/result/p50_us",
        a: "vncgate-wss",
        b: "direct-tls",
        kind: Kind::AddedShare {
            peer: "websockify-wss",
        },
        bound: 0.5,
    },
    Target {
        what: "wss upgrades/s with TLS resumption vs websockify-wss",
        scenario: "upgrades-resume",
        pointer: "/result/rate_per_s",
        a: "vncgate-wss",
        b: "websockify-wss",
        kind: Kind::Ratio,
        bound: 10.0,
    },
    Target {
        what: "wss idle RSS per session (KiB)",
        scenario: "idle",
        pointer: "/result/procs/gateway/rss_per_session_kib",
        a: "vncgate-wss",
        b: "",
        kind: Kind::Absolute,
        bound: 48.0,
    },
    Target {
        what: "interactive p99 under bulk load (µs)",
        scenario: "fairness",
        pointer: "/result/interactive/p99_us",
        a: "vncgate",
        b: "",
        kind: Kind::Absolute,
        bound: 5000.0,
    },
];

fn median_of(runs: &Runs, scenario: &str, label: &str, pointer: &str) -> Option<f64> {
    stats(&values(runs, scenario, label, pointer)).map(|s| s.median)
}

/// One row of the targets table; `None` when a path it needs was not in the run.
fn target_row(runs: &Runs, t: &Target) -> Option<String> {
    let a = median_of(runs, t.scenario, t.a, t.pointer)?;
    let b = if t.b.is_empty() {
        0.0
    } else {
        median_of(runs, t.scenario, t.b, t.pointer)?
    };
    let peer = match t.kind {
        Kind::AddedShare { peer } => median_of(runs, t.scenario, peer, t.pointer)?,
        _ => 0.0,
    };
    let combine = |x: f64, y: f64, p: f64| match t.kind {
        Kind::Ratio => x / y,
        Kind::Added => x - y,
        Kind::Absolute => x,
        Kind::AddedShare { .. } => (x - y) / (p - y),
    };
    let value = combine(a, b, peer);
    let pass = match t.kind {
        Kind::Ratio => value >= t.bound,
        Kind::Added | Kind::Absolute | Kind::AddedShare { .. } => value <= t.bound,
    };
    // Per-run range: pair run i of one path with run i of the other (and of the peer).
    let range = if t.b.is_empty() {
        stats(&values(runs, t.scenario, t.a, t.pointer))
    } else {
        let ra = by_run(runs, t.scenario, t.a, t.pointer);
        let rb = by_run(runs, t.scenario, t.b, t.pointer);
        let rp = match t.kind {
            Kind::AddedShare { peer } => Some(by_run(runs, t.scenario, peer, t.pointer)),
            _ => None,
        };
        let paired: Vec<f64> = ra
            .iter()
            .filter_map(|(run, x)| {
                let y = rb.get(run)?;
                let p = match &rp {
                    Some(rp) => *rp.get(run)?,
                    None => 0.0,
                };
                Some(combine(*x, *y, p))
            })
            .collect();
        stats(&paired)
    };
    let shown = match range {
        Some(r) if r.n > 1 => {
            format!("{} ({}–{})", fmt_num(value), fmt_num(r.min), fmt_num(r.max))
        }
        _ => fmt_num(value),
    };
    let bound = match t.kind {
        Kind::Ratio => format!("≥ {}×", t.bound),
        Kind::Added | Kind::Absolute => format!("≤ {}", t.bound),
        Kind::AddedShare { .. } => format!("≤ {}×", t.bound),
    };
    Some(format!(
        "| {} | {} | {} | {} |\n",
        t.what,
        shown,
        bound,
        if pass { "pass" } else { "MISS" }
    ))
}

pub fn main(args: ReportArgs) -> Result<(), String> {
    let runs = load(&args.files)?;
    let present: Vec<&str> = PATHS
        .iter()
        .copied()
        .filter(|p| runs.values().any(|m| m.contains_key(*p)))
        .collect();
    let mut out = String::new();
    out.push_str("| figure |");
    for p in &present {
        out.push_str(&format!(" {p} |"));
    }
    out.push_str("\n|---|");
    for _ in &present {
        out.push_str("---|");
    }
    out.push('\n');
    for f in FIGURES {
        if !runs.contains_key(f.scenario) {
            continue;
        }
        out.push_str(&format!("| {} |", f.name));
        for p in &present {
            out.push_str(&format!(
                " {} |",
                fmt_stats(stats(&values(&runs, f.scenario, p, f.pointer)))
            ));
        }
        out.push('\n');
    }
    out.push_str("| load average (1 min) during the runs |");
    for p in &present {
        let loads: Vec<f64> = runs
            .values()
            .filter_map(|m| m.get(*p))
            .flatten()
            .filter_map(|v| v.pointer("/load_avg_after/0").and_then(Value::as_f64))
            .collect();
        out.push_str(&format!(" {} |", fmt_stats(stats(&loads))));
    }
    out.push_str("\n\n");

    out.push_str(
        "| target | measured (median; per-run range) | bound | verdict |\n|---|---|---|---|\n",
    );
    for t in TARGETS {
        if let Some(row) = target_row(&runs, t) {
            out.push_str(&row);
        }
    }
    out.push_str(&mode_ratios(&runs));
    out.push_str(&mode_ratios_wss(&runs));
    out.push_str(&listener_ratios(&runs));
    let problems = check(&runs);
    if !problems.is_empty() {
        out.push_str("\nRuns that did not do all they were asked:\n\n");
        for p in &problems {
            out.push_str(&format!("- {p}\n"));
        }
    }
    print!("{out}");
    if args.check && !problems.is_empty() {
        return Err(format!("check failed: {}", problems.join("; ")));
    }
    Ok(())
}

/// The terminate/transparent table (see [`ab_table`]); empty when the run had no
/// `vncgate-terminate` path.
fn mode_ratios(runs: &Runs) -> String {
    ab_table(
        runs,
        TRANSPARENT,
        TERMINATE,
        &format!(
            "RFB mode A/B (`{TRANSPARENT}` = `rfb.mode: transparent`, `{TERMINATE}` = \
             `rfb.mode: terminate`, same config otherwise)"
        ),
        ("transparent", "terminate"),
    )
}

/// The RFB mode A/B on the TLS listener; empty without `vncgate-terminate-wss`.
fn mode_ratios_wss(runs: &Runs) -> String {
    ab_table(
        runs,
        WSS,
        TERMINATE_WSS,
        &format!(
            "RFB mode A/B over wss:// (`{WSS}` = `rfb.mode: transparent`, `{TERMINATE_WSS}` = \
             `rfb.mode: terminate`, same config otherwise)"
        ),
        ("transparent", "terminate"),
    )
}

/// The listener A/B: what the TLS listener costs the same gateway config (ws:// against
/// wss://); empty when the run did not have both.
fn listener_ratios(runs: &Runs) -> String {
    ab_table(
        runs,
        TRANSPARENT,
        WSS,
        &format!(
            "Listener A/B (`{TRANSPARENT}` = plain listener, ws://; `{WSS}` = the same config \
             with `listeners[].tls`, wss://)"
        ),
        ("ws", "wss"),
    )
}

/// An A/B table of two paths: for every figure both measured, the ratio of the medians and
/// the median and range of run-by-run ratios (run i of one against run i of the other; on a
/// loaded machine the paired median is the steadier of the two). Empty when a path is missing.
fn ab_table(runs: &Runs, base: &str, variant: &str, heading: &str, names: (&str, &str)) -> String {
    let mut rows = String::new();
    for f in FIGURES {
        let (Some(v), Some(b)) = (
            median_of(runs, f.scenario, variant, f.pointer),
            median_of(runs, f.scenario, base, f.pointer),
        ) else {
            continue;
        };
        let ra = by_run(runs, f.scenario, variant, f.pointer);
        let rb = by_run(runs, f.scenario, base, f.pointer);
        let paired: Vec<f64> = ra
            .iter()
            .filter_map(|(run, x)| rb.get(run).map(|y| x / y))
            .collect();
        let range = match stats(&paired) {
            Some(r) if r.n > 1 => format!(
                "{} ({}–{})",
                fmt_num(r.median),
                fmt_num(r.min),
                fmt_num(r.max)
            ),
            Some(r) => fmt_num(r.median),
            None => "–".into(),
        };
        rows.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            f.name,
            fmt_num(b),
            fmt_num(v),
            fmt_num(v / b),
            range
        ));
    }
    if rows.is_empty() {
        return rows;
    }
    let (nb, nv) = names;
    format!(
        "\n{heading}:\n\n| figure | {nb} (median) | {nv} (median) | {nv} / {nb} (medians) | \
         per-run ratios: median (min–max) |\n|---|---|---|---|---|\n{rows}"
    )
}

/// Runs that did not do what they were asked: failures, dropped sessions, nothing measured.
fn check(runs: &Runs) -> Vec<String> {
    let mut problems = Vec::new();
    for (scenario, paths) in runs {
        for (label, lines) in paths {
            for v in lines {
                let run = v.get("run").and_then(Value::as_u64).unwrap_or(0);
                let num = |p: &str| v.pointer(p).and_then(Value::as_f64);
                let mut bad =
                    |what: &str| problems.push(format!("{scenario}/{label} run {run}: {what}"));
                for p in [
                    "/result/failed",
                    "/result/session_errors",
                    "/result/bulk_session_errors",
                    "/result/dropped_before_report",
                ] {
                    if num(p).unwrap_or(0.0) > 0.0 {
                        let first = v
                            .pointer("/result/first_error")
                            .and_then(Value::as_str)
                            .map(|e| format!(" (first error: {e})"))
                            .unwrap_or_default();
                        bad(&format!("{} = {}{first}", &p[8..], num(p).unwrap_or(0.0)));
                    }
                }
                let measured = match scenario.as_str() {
                    s if s.starts_with("bulk-") => num("/result/mb_per_s"),
                    "latency" => num("/result/count"),
                    "upgrades" | "upgrades-resume" => num("/result/ok"),
                    "idle" => num("/result/established"),
                    "first-update" => num("/result/count"),
                    "fairness" => num("/result/interactive/count")
                        .zip(num("/result/bulk/mb_per_s"))
                        .map(|(a, b)| a.min(b)),
                    _ => Some(1.0),
                };
                if measured.unwrap_or(0.0) <= 0.0 {
                    bad("measured nothing");
                }
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(scenario: &str, label: &str, run: u64, mb: f64) -> Value {
        serde_json::json!({"scenario": scenario, "label": label, "run": run,
                           "result": {"mb_per_s": mb}})
    }

    #[test]
    fn mode_ratios_pair_runs() {
        let mut runs: Runs = BTreeMap::new();
        for (label, mbs) in [
            (TRANSPARENT, [100.0, 200.0, 300.0]),
            (TERMINATE, [50.0, 200.0, 330.0]),
        ] {
            for (i, mb) in mbs.into_iter().enumerate() {
                runs.entry("bulk-1".into())
                    .or_default()
                    .entry(label.into())
                    .or_default()
                    .push(line("bulk-1", label, i as u64 + 1, mb));
            }
        }
        let table = mode_ratios(&runs);
        assert!(
            table.contains("| bulk, 1 session: MB/s | 200 | 200 | 1.00 | 1.00 (0.50–1.10) |"),
            "{table}"
        );
        runs.get_mut("bulk-1").unwrap().remove(TERMINATE);
        assert!(mode_ratios(&runs).is_empty());
    }

    #[test]
    fn added_share_target_pairs_three_paths() {
        let mut runs: Runs = BTreeMap::new();
        // vncgate-wss adds 10 µs over direct TLS, websockify-wss 40: a quarter.
        for (label, p50) in [
            ("direct-tls", [100.0, 100.0]),
            ("vncgate-wss", [110.0, 120.0]),
            ("websockify-wss", [140.0, 140.0]),
        ] {
            for (i, us) in p50.into_iter().enumerate() {
                runs.entry("latency".into())
                    .or_default()
                    .entry(label.into())
                    .or_default()
                    .push(serde_json::json!({"scenario": "latency", "label": label,
                        "run": i as u64 + 1, "result": {"p50_us": us}}));
            }
        }
        let t = TARGETS
            .iter()
            .find(|t| matches!(t.kind, Kind::AddedShare { .. }))
            .unwrap();
        let row = target_row(&runs, t).unwrap();
        assert!(
            row.contains("| 0.38 (0.25–0.50) | ≤ 0.5× | pass |"),
            "{row}"
        );
        runs.get_mut("latency").unwrap().remove("websockify-wss");
        assert!(target_row(&runs, t).is_none());
    }

    #[test]
    fn listener_table_needs_both_listeners() {
        let mut runs: Runs = BTreeMap::new();
        for (label, mb) in [(TRANSPARENT, 400.0), (WSS, 100.0)] {
            runs.entry("bulk-1".into())
                .or_default()
                .entry(label.into())
                .or_default()
                .push(line("bulk-1", label, 1, mb));
        }
        let table = listener_ratios(&runs);
        assert!(table.contains("| ws (median) | wss (median) | wss / ws (medians) |"));
        assert!(
            table.contains("| bulk, 1 session: MB/s | 400 | 100 | 0.25 | 0.25 |"),
            "{table}"
        );
        runs.get_mut("bulk-1").unwrap().remove(WSS);
        assert!(listener_ratios(&runs).is_empty());
    }

    #[test]
    fn median_and_range() {
        let s = stats(&[3.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert_eq!(s.min, 1.0);
        assert_eq!(s.max, 10.0);
        assert!(stats(&[]).is_none());
    }
}
