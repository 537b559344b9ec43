//! What /proc says about the machine and the processes under test: load averages, and for a
//! process with all its descendants (websockify forks one per connection) CPU time, RSS and PSS.

use std::collections::HashMap;
use std::fs;

use serde_json::{Value, json};

/// Linux reports CPU times in USER_HZ, which is 100 on every architecture Rust targets.
const TICKS_PER_SEC: f64 = 100.0;

pub fn load_avg() -> Value {
    let text = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let v: Vec<f64> = text
        .split_whitespace()
        .take(3)
        .filter_map(|x| x.parse().ok())
        .collect();
    json!(v)
}

/// `pid` and every process descending from it.
fn tree(pid: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(p) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(stat) = read_stat(p) {
                children.entry(stat.ppid).or_default().push(p);
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        if let Some(c) = children.get(&out[i]) {
            out.extend(c);
        }
        i += 1;
    }
    out
}

struct Stat {
    ppid: u32,
    /// utime + stime of the process itself.
    own_ticks: u64,
    /// cutime + cstime: children it has already reaped.
    reaped_ticks: u64,
}

fn read_stat(pid: u32) -> Option<Stat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces; fields follow the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); ppid is field 4, utime..cstime are fields 14..17.
    let num = |i: usize| f.get(i - 3).and_then(|x| x.parse::<u64>().ok());
    Some(Stat {
        ppid: num(4)? as u32,
        own_ticks: num(14)? + num(15)?,
        reaped_ticks: num(16)? + num(17)?,
    })
}

fn status_kib(pid: u32, file: &str, key: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/{file}"))
        .ok()
        .and_then(|t| {
            t.lines().find(|l| l.starts_with(key)).and_then(|l| {
                l[key.len()..]
                    .split_whitespace()
                    .next()
                    .and_then(|x| x.parse().ok())
            })
        })
        .unwrap_or(0)
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub processes: usize,
    pub cpu_secs: f64,
    pub rss_kib: u64,
    pub pss_kib: u64,
}

/// CPU time used so far (including reaped children), and current memory, of a process tree.
pub fn sample(pid: u32, with_pss: bool) -> Sample {
    let pids = tree(pid);
    let mut s = Sample {
        processes: 0,
        ..Sample::default()
    };
    for &p in &pids {
        let Some(stat) = read_stat(p) else { continue };
        s.processes += 1;
        s.cpu_secs += stat.own_ticks as f64 / TICKS_PER_SEC;
        if p == pid {
            s.cpu_secs += stat.reaped_ticks as f64 / TICKS_PER_SEC;
        }
        s.rss_kib += status_kib(p, "status", "VmRSS:");
        if with_pss {
            s.pss_kib += status_kib(p, "smaps_rollup", "Pss:");
        }
    }
    s
}

/// Named processes to watch during a run (`name=pid`, repeated), plus the client itself.
#[derive(Debug, Clone)]
pub struct Watch {
    procs: Vec<(String, u32)>,
    start: Vec<Sample>,
}

impl Watch {
    pub fn new(specs: &[String]) -> Result<Watch, String> {
        let mut procs = vec![("client".to_owned(), std::process::id())];
        for spec in specs {
            let (name, pid) = spec
                .split_once('=')
                .ok_or_else(|| format!("--watch {spec}: expected NAME=PID"))?;
            let pid = pid
                .parse()
                .map_err(|_| format!("--watch {spec}: bad pid"))?;
            procs.push((name.to_owned(), pid));
        }
        Ok(Watch {
            procs,
            start: Vec::new(),
        })
    }

    pub fn start(&mut self) {
        self.start = self.procs.iter().map(|(_, p)| sample(*p, false)).collect();
    }

    /// CPU seconds since `start` (as a share of the window: 1.0 = one core busy) and memory now.
    pub fn finish(&self, window_secs: f64, with_pss: bool) -> Value {
        let mut out = serde_json::Map::new();
        for (i, (name, pid)) in self.procs.iter().enumerate() {
            let now = sample(*pid, with_pss);
            let start_cpu = self.start.get(i).map_or(0.0, |s| s.cpu_secs);
            let cpu = (now.cpu_secs - start_cpu).max(0.0);
            let mut v = json!({
                "pid": pid,
                "processes": now.processes,
                "cpu_secs": round(cpu, 2),
                "cpu_cores": round(cpu / window_secs.max(1e-9), 2),
                "rss_kib": now.rss_kib,
            });
            if with_pss {
                v["pss_kib"] = json!(now.pss_kib);
            }
            out.insert(name.clone(), v);
        }
        Value::Object(out)
    }

    /// The watched processes other than the client itself.
    pub fn targets(&self) -> impl Iterator<Item = &(String, u32)> {
        self.procs.iter().skip(1)
    }
}

pub fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}
