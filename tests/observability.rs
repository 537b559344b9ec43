//! The observability artefacts against the real binary: the alert rules pass `promtool check
//! rules` and their unit tests, a live `/metrics` scrape passes `promtool check metrics`, and every
//! metric, label and label value the dashboard and the rules use is one the binary exports. Also
//! the shape of the dashboard (variables, titles, descriptions, units) and that every alert's
//! `runbook_url` lands on a heading of docs/RUNBOOK.md.
//!
//! promtool comes from the Debian package `prometheus` (`scripts/install-deps`); without it these
//! tests fail, they never skip.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::rfb_server::{Mode, RfbServer};
use common::{BackendSpec, Gateway, GatewayConfig};
use promql_parser::label::{MatchOp, Matcher};
use promql_parser::parser::{self, Expr, LabelModifier, VectorSelector};
use serde_json::Value;
use serde_yaml::Value as Yaml;

const RULES: &str = "alerts/vncgate.rules.yml";
const RULE_TESTS: &str = "alerts/tests/vncgate.rules.test.yml";
const DASHBOARD: &str = "dashboards/vncgate.json";
const RUNBOOK: &str = "docs/RUNBOOK.md";
const RUNBOOK_URL: &str = "https://github.com/vncgate/vncgate/blob/main/docs/RUNBOOK.md#";
/// The scrape job every rule selects (see the runbook's "Conventions").
const JOB: &str = "vncgate";
/// Labels Prometheus attaches to every scraped series.
const TARGET_LABELS: [&str; 2] = ["job", "instance"];

const REQUIRED_ALERTS: [&str; 10] = [
    "VncgateInstanceDown",
    "VncgateNoHealthyBackend",
    "VncgateBackendDown",
    "VncgateStoreUnreachable",
    "VncgateUpgradeFailureRatioHigh",
    "VncgateAuthFailureSpike",
    "VncgateSlowUpgrades",
    "VncgateAbnormalDisconnects",
    "VncgateNearCapacity",
    "VncgateRecordingDroppingData",
];

/// Metric families the dashboard must chart (the brief's rows).
const DASHBOARD_METRICS: [&str; 19] = [
    "vncgate_sessions_active",
    "vncgate_max_sessions",
    "vncgate_upgrades_total",
    "vncgate_upgrade_duration_seconds",
    "vncgate_session_duration_seconds",
    "vncgate_disconnects_total",
    "vncgate_relay_bytes_total",
    "vncgate_backpressure_wait_seconds_total",
    "vncgate_relay_buffered_bytes",
    "vncgate_backend_up",
    "vncgate_backend_sessions",
    "vncgate_backend_connect_duration_seconds",
    "vncgate_store_up",
    "vncgate_store_errors_total",
    "vncgate_store_op_duration_seconds",
    "vncgate_auth_failures_total",
    "vncgate_recordings_active",
    "vncgate_recording_bytes_total",
    "vncgate_recording_dropped_total",
];

const DASHBOARD_ROWS: [&str; 7] = [
    "Overview",
    "Sessions",
    "Traffic",
    "Backends",
    "Store",
    "Auth",
    "Recording",
];

// ---------------------------------------------------------------------------------------------
// promtool

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

fn promtool() -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("promtool"))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "promtool is not installed (not on PATH): run scripts/install-deps, which installs \
                 the Debian package `prometheus` that ships it"
            )
        })
}

fn run_promtool(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(promtool())
        .args(args)
        .current_dir(root())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("promtool stdin");
        pipe.write_all(input.as_bytes()).expect("write to promtool");
    }
    child.wait_with_output().expect("promtool output")
}

fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn alert_rules_pass_promtool_check() {
    let out = run_promtool(&["check", "rules", RULES], None);
    assert!(
        out.status.success(),
        "promtool check rules {RULES}: {}",
        describe(&out)
    );
}

#[test]
fn alert_rule_unit_tests_pass() {
    let out = run_promtool(&["test", "rules", RULE_TESTS], None);
    assert!(
        out.status.success(),
        "promtool test rules {RULE_TESTS}: {}",
        describe(&out)
    );
}

#[tokio::test]
async fn live_metrics_pass_promtool_lint() {
    let scrape = live_scrape().await;
    let out = run_promtool(&["check", "metrics"], Some(&scrape));
    let lint = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && lint.trim().is_empty(),
        "promtool check metrics complains about the live /metrics: {}\n--- scrape\n{scrape}",
        describe(&out)
    );
}

// ---------------------------------------------------------------------------------------------
// The live scrape: what the binary exports

/// A real gateway with one RFB backend, scraped once right after start (every series exists
/// from the start, at zero).
async fn live_scrape() -> String {
    let backend = RfbServer::start(Mode::Rfb {
        name: "desk".into(),
        width: 8,
        height: 8,
        rgb: [0, 0, 0],
    })
    .await
    .expect("fixture");
    let gw = Gateway::start(GatewayConfig::new(vec![BackendSpec::fixture(
        "desk", &backend,
    )]))
    .await;
    let (status, body) = gw.admin_get("/metrics").await;
    assert_eq!(status, 200, "GET /metrics: {body}");
    body
}

#[derive(Debug, Default)]
struct Family {
    kind: String,
    /// label name -> every value seen in the scrape.
    labels: BTreeMap<String, BTreeSet<String>>,
}

impl Family {
    fn has_label(&self, name: &str) -> bool {
        self.labels.contains_key(name) || TARGET_LABELS.contains(&name)
    }
}

/// Families by name, from `# TYPE` lines, with the labels and values of their samples; plus
/// `up`, which Prometheus adds to every target.
fn exported_families(scrape: &str) -> BTreeMap<String, Family> {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    for line in scrape.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                panic!("malformed TYPE line: {line}");
            };
            families.entry(name.to_owned()).or_default().kind = kind.to_owned();
        }
    }
    for line in scrape.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, labels) = parse_sample(line);
        let family = family_of(&families, &name)
            .unwrap_or_else(|| panic!("sample without a # TYPE line: {line}"));
        let family = families.get_mut(&family).expect("family");
        for (k, v) in labels {
            family.labels.entry(k).or_default().insert(v);
        }
    }
    assert!(
        families.len() > 1,
        "no metric families in the scrape:\n{scrape}"
    );
    families.insert(
        "up".into(),
        Family {
            kind: "gauge".into(),
            labels: BTreeMap::new(),
        },
    );
    families
}

/// The family a sample or selector name belongs to: itself, or a histogram/summary whose
/// `_bucket`/`_sum`/`_count` series it is.
fn family_of(families: &BTreeMap<String, Family>, name: &str) -> Option<String> {
    if families.contains_key(name) {
        return Some(name.to_owned());
    }
    ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
        let base = name.strip_suffix(suffix)?;
        let family = families.get(base)?;
        let ok = match family.kind.as_str() {
            "histogram" => true,
            "summary" => *suffix != "_bucket",
            _ => false,
        };
        ok.then(|| base.to_owned())
    })
}

/// `name{a="x",b="y"} value` -> (name, [(a, x), (b, y)]).
fn parse_sample(line: &str) -> (String, Vec<(String, String)>) {
    let name_end = line.find(['{', ' ']).unwrap_or(line.len());
    let name = line[..name_end].to_owned();
    let mut labels = Vec::new();
    if line[name_end..].starts_with('{') {
        let mut chars = line[name_end + 1..].chars().peekable();
        loop {
            let key: String = chars
                .by_ref()
                .take_while(|c| *c != '=')
                .collect::<String>()
                .trim_start_matches([',', ' '])
                .to_owned();
            if key.starts_with('}') || key.is_empty() {
                break;
            }
            assert_eq!(chars.next(), Some('"'), "label value not quoted: {line}");
            let mut value = String::new();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.push(chars.next().unwrap_or('\\')),
                    '"' => break,
                    c => value.push(c),
                }
            }
            labels.push((key, value));
            if chars.peek() == Some(&'}') {
                break;
            }
        }
    }
    (name, labels)
}

// ---------------------------------------------------------------------------------------------
// PromQL: the selectors an expression uses

#[derive(Debug)]
struct Selector {
    name: String,
    matchers: Vec<Matcher>,
    /// Selected as a range (`x[5m]`), with the function applied to it.
    range_fn: Option<String>,
}

#[derive(Debug, Default)]
struct Usage {
    selectors: Vec<Selector>,
    /// Label names of `by (...)` and `on (...)` clauses, with the metric names below them.
    groupings: Vec<(Vec<String>, Vec<String>)>,
    /// `histogram_quantile` calls whose argument does not keep `le`.
    quantiles_without_le: Vec<String>,
}

fn parse_promql(expr: &str, origin: &str) -> Expr {
    parser::parse(expr).unwrap_or_else(|e| panic!("{origin}: PromQL does not parse: {e}\n{expr}"))
}

fn selector_name(vs: &VectorSelector) -> String {
    vs.name.clone().unwrap_or_else(|| {
        vs.matchers
            .matchers
            .iter()
            .find(|m| m.name == "__name__" && matches!(m.op, MatchOp::Equal))
            .map(|m| m.value.clone())
            .unwrap_or_default()
    })
}

fn metric_names(expr: &Expr) -> Vec<String> {
    let mut usage = Usage::default();
    walk(expr, None, &mut usage);
    usage.selectors.into_iter().map(|s| s.name).collect()
}

fn walk(expr: &Expr, range_fn: Option<&str>, usage: &mut Usage) {
    match expr {
        Expr::VectorSelector(vs) => usage.selectors.push(Selector {
            name: selector_name(vs),
            matchers: vs.matchers.matchers.clone(),
            range_fn: None,
        }),
        Expr::MatrixSelector(ms) => usage.selectors.push(Selector {
            name: selector_name(&ms.vs),
            matchers: ms.vs.matchers.matchers.clone(),
            range_fn: Some(range_fn.unwrap_or("?").to_owned()),
        }),
        Expr::Aggregate(agg) => {
            if let Some(LabelModifier::Include(labels)) = &agg.modifier {
                usage
                    .groupings
                    .push((labels.labels.clone(), metric_names(&agg.expr)));
            }
            walk(&agg.expr, None, usage);
            if let Some(param) = &agg.param {
                walk(param, None, usage);
            }
        }
        Expr::Binary(bin) => {
            if let Some(LabelModifier::Include(labels)) =
                bin.modifier.as_ref().and_then(|m| m.matching.as_ref())
            {
                let mut below = metric_names(&bin.lhs);
                below.extend(metric_names(&bin.rhs));
                usage.groupings.push((labels.labels.clone(), below));
            }
            walk(&bin.lhs, None, usage);
            walk(&bin.rhs, None, usage);
        }
        Expr::Unary(u) => walk(&u.expr, None, usage),
        Expr::Paren(p) => walk(&p.expr, range_fn, usage),
        Expr::Subquery(s) => walk(&s.expr, None, usage),
        Expr::Call(call) => {
            if call.func.name == "histogram_quantile" {
                let arg = call.args.args.last().expect("histogram_quantile argument");
                if !keeps_le(arg) {
                    usage.quantiles_without_le.push(expr.to_string());
                }
            }
            for arg in &call.args.args {
                walk(arg, Some(call.func.name), usage);
            }
        }
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}

/// Whether the vector handed to `histogram_quantile` still has its `le` label: an aggregation
/// must keep it with `by (..., le)`.
fn keeps_le(expr: &Expr) -> bool {
    match expr {
        Expr::Paren(p) => keeps_le(&p.expr),
        Expr::Aggregate(agg) => match &agg.modifier {
            Some(LabelModifier::Include(labels)) => labels.labels.iter().any(|l| l == "le"),
            Some(LabelModifier::Exclude(labels)) => !labels.labels.iter().any(|l| l == "le"),
            None => false,
        },
        _ => true,
    }
}

/// Check every selector, grouping and quantile of one expression against the scrape; returns
/// the problems (empty = fine).
fn check_expr(
    expr: &Expr,
    origin: &str,
    families: &BTreeMap<String, Family>,
    selector_rule: &dyn Fn(&Selector, &Family) -> Vec<String>,
) -> Vec<String> {
    let mut usage = Usage::default();
    walk(expr, None, &mut usage);
    let mut problems = Vec::new();
    if usage.selectors.is_empty() {
        problems.push(format!("{origin}: selects no metric"));
    }
    for sel in &usage.selectors {
        let Some(family_name) = family_of(families, &sel.name) else {
            problems.push(format!(
                "{origin}: metric `{}` is not exported by vncgate (nor is it `up`)",
                sel.name
            ));
            continue;
        };
        let family = &families[&family_name];
        if family_name == sel.name && ["histogram", "summary"].contains(&family.kind.as_str()) {
            problems.push(format!(
                "{origin}: `{}` is a {}: no series has its bare name (use _bucket/_sum/_count)",
                sel.name, family.kind
            ));
        }
        let is_bucket = sel.name.ends_with("_bucket");
        for m in &sel.matchers {
            if m.name == "__name__" {
                continue;
            }
            if !(family.has_label(&m.name) || (is_bucket && m.name == "le")) {
                problems.push(format!(
                    "{origin}: `{}` has no label `{}`",
                    sel.name, m.name
                ));
                continue;
            }
            // Literal values (and alternations of literals) must be values the binary exports:
            // every series exists from the start, so a value not in the scrape is a typo.
            let literal = match &m.op {
                MatchOp::Equal => vec![m.value.clone()],
                MatchOp::Re(_) if is_alternation_of_literals(&m.value) => {
                    m.value.split('|').map(str::to_owned).collect()
                }
                _ => Vec::new(),
            };
            if let Some(values) = family.labels.get(&m.name) {
                for v in literal.iter().filter(|v| !is_variable_sentinel(v)) {
                    if !values.contains(v) {
                        problems.push(format!(
                            "{origin}: `{}` never has {}=\"{v}\" (exported: {values:?})",
                            sel.name, m.name
                        ));
                    }
                }
            }
        }
        match (&sel.range_fn, family.kind.as_str()) {
            (None, "counter") => problems.push(format!(
                "{origin}: counter `{}` used without rate()/increase()",
                sel.name
            )),
            (Some(f), "gauge") if ["rate", "irate", "increase"].contains(&f.as_str()) => {
                problems.push(format!("{origin}: {f}() of gauge `{}`", sel.name))
            }
            _ => {}
        }
        problems.extend(selector_rule(sel, family));
    }
    for (labels, below) in &usage.groupings {
        for label in labels {
            let known = TARGET_LABELS.contains(&label.as_str())
                || (label == "le" && below.iter().any(|n| n.ends_with("_bucket")))
                || below.iter().any(|n| {
                    family_of(families, n).is_some_and(|f| families[&f].labels.contains_key(label))
                });
            if !known {
                problems.push(format!(
                    "{origin}: groups by `{label}`, a label none of {below:?} has"
                ));
            }
        }
    }
    for q in &usage.quantiles_without_le {
        problems.push(format!(
            "{origin}: histogram_quantile over an aggregation without `le`: {q}"
        ));
    }
    problems
}

fn is_alternation_of_literals(re: &str) -> bool {
    !re.is_empty()
        && re.split('|').all(|alt| {
            !alt.is_empty()
                && alt
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_:-".contains(c))
        })
}

// ---------------------------------------------------------------------------------------------
// The dashboard

/// Grafana variables are replaced by distinct regex literals (`__var_job__`), so the checks can
/// tell a `job=~"$job"` filter from any other matcher.
fn sentinel(var: &str) -> String {
    format!("__var_{var}__")
}

fn is_variable_sentinel(v: &str) -> bool {
    v.starts_with("__var_") && v.ends_with("__")
}

fn substitute_variables(expr: &str, vars: &[String]) -> String {
    let mut out = expr
        .replace("${__rate_interval}", "5m")
        .replace("$__rate_interval", "5m")
        .replace("${__interval}", "1m")
        .replace("$__interval", "1m")
        .replace("${__range}", "1h")
        .replace("$__range", "1h");
    let mut vars: Vec<&String> = vars.iter().collect();
    // Longest first, so `$pool` never eats the start of a `$pool_name`.
    vars.sort_by_key(|v| std::cmp::Reverse(v.len()));
    for var in vars {
        out = out
            .replace(&format!("${{{var}}}"), &sentinel(var))
            .replace(&format!("${var}"), &sentinel(var));
    }
    out
}

fn dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD)).expect("dashboard is JSON")
}

/// Every panel, rows' nested panels included.
fn all_panels(dash: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        out.push(p.clone());
        if let Some(nested) = p["panels"].as_array() {
            out.extend(nested.iter().cloned());
        }
    }
    out
}

fn variables(dash: &Value) -> Vec<Value> {
    dash["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .clone()
}

fn variable_query(var: &Value) -> String {
    var["query"]["query"]
        .as_str()
        .or_else(|| var["query"].as_str())
        .unwrap_or_default()
        .to_owned()
}

fn str_field<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_default()
}

#[test]
fn dashboard_is_complete() {
    let dash = dashboard();
    let mut problems = Vec::new();
    let schema = dash["schemaVersion"].as_u64().unwrap_or(0);
    if schema < 38 {
        problems.push(format!("schemaVersion {schema} < 38"));
    }
    let vars = variables(&dash);
    let var = |name: &str| vars.iter().find(|v| v["name"] == name).cloned();
    match var("datasource") {
        Some(v) if v["type"] == "datasource" && v["query"] == "prometheus" => {}
        other => problems.push(format!(
            "no `datasource` variable of type datasource/prometheus: {other:?}"
        )),
    }
    match var("job") {
        Some(v) if v["type"] == "query" => {}
        other => problems.push(format!("no `job` query variable: {other:?}")),
    }
    for (name, query) in [
        (
            "instance",
            r#"label_values(vncgate_build_info{job=~"$job"}, instance)"#,
        ),
        ("pool", "label_values(vncgate_sessions_active"),
    ] {
        match var(name) {
            Some(v) if v["multi"] == true && variable_query(&v).starts_with(query) => {}
            other => problems.push(format!(
                "`{name}` must be a multi-value variable from `{query}...`: {other:?}"
            )),
        }
    }
    for v in &vars {
        if v["type"] == "query" && v["datasource"]["uid"] != "${datasource}" {
            problems.push(format!("variable {} does not use $datasource", v["name"]));
        }
    }

    let panels = all_panels(&dash);
    let rows: BTreeSet<&str> = panels
        .iter()
        .filter(|p| p["type"] == "row")
        .map(|p| str_field(p, "title"))
        .collect();
    for row in DASHBOARD_ROWS {
        if !rows.contains(row) {
            problems.push(format!("no row titled {row:?} (rows: {rows:?})"));
        }
    }
    let mut ids = BTreeSet::new();
    for p in &panels {
        if !ids.insert(p["id"].as_u64().unwrap_or(0)) {
            problems.push(format!("duplicate or missing panel id: {}", p["id"]));
        }
        if p["type"] == "row" {
            continue;
        }
        let title = str_field(p, "title");
        if title.trim().is_empty() {
            problems.push(format!("panel {} has no title", p["id"]));
        }
        if str_field(p, "description").trim().is_empty() {
            problems.push(format!("panel {title:?} has no description"));
        }
        if str_field(&p["fieldConfig"]["defaults"], "unit")
            .trim()
            .is_empty()
        {
            problems.push(format!("panel {title:?} has no fieldConfig.defaults.unit"));
        }
        if p["datasource"]["uid"] != "${datasource}" {
            problems.push(format!(
                "panel {title:?} does not use the $datasource variable"
            ));
        }
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        if targets.is_empty() {
            problems.push(format!("panel {title:?} has no query"));
        }
        for t in &targets {
            let expr = str_field(t, "expr");
            if expr.trim().is_empty() {
                problems.push(format!("panel {title:?} target {} has no expr", t["refId"]));
            }
            // Every range is Grafana's `$__rate_interval` (never a fixed `[5m]`, which breaks at
            // other scrape intervals and zoom levels).
            for range in expr.split('[').skip(1) {
                let range = range.split(']').next().unwrap_or_default();
                if range != "$__rate_interval" {
                    problems.push(format!(
                        "panel {title:?}: range [{range}] instead of [$__rate_interval]: {expr}"
                    ));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "dashboard problems:\n{}",
        problems.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// The alert rules

fn rules() -> Vec<Yaml> {
    let doc: Yaml = serde_yaml::from_str(&read(RULES)).expect("rules are YAML");
    doc["groups"]
        .as_sequence()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("rules").clone())
        .collect()
}

fn yaml_str<'a>(v: &'a Yaml, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_default()
}

/// GitHub's heading anchors: lowercase, spaces to `-`, punctuation other than `-`/`_` dropped.
fn github_anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of every Markdown heading outside fenced code blocks.
fn runbook_anchors(markdown: &str) -> Vec<String> {
    let mut fenced = false;
    let mut anchors = Vec::new();
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let hashes = line.chars().take_while(|c| *c == '#').count();
        if (1..=6).contains(&hashes) && line[hashes..].starts_with(' ') {
            anchors.push(github_anchor(&line[hashes..]));
        }
    }
    anchors
}

#[test]
fn alerts_are_complete_and_link_to_runbook_sections() {
    let runbook = read(RUNBOOK);
    let anchors = runbook_anchors(&runbook);
    let mut problems = Vec::new();
    let mut names = BTreeSet::new();
    for rule in rules() {
        let Some(name) = rule["alert"].as_str() else {
            continue;
        };
        if !names.insert(name.to_owned()) {
            problems.push(format!("alert {name} defined twice"));
        }
        if yaml_str(&rule, "for").is_empty() {
            problems.push(format!("{name}: no `for:`"));
        }
        let severity = yaml_str(&rule["labels"], "severity");
        if !["page", "ticket"].contains(&severity) {
            problems.push(format!(
                "{name}: severity {severity:?} is not page or ticket"
            ));
        }
        let annotations = &rule["annotations"];
        for key in ["summary", "description"] {
            if yaml_str(annotations, key).trim().is_empty() {
                problems.push(format!("{name}: no {key} annotation"));
            }
        }
        if !yaml_str(annotations, "description").contains("{{") {
            problems.push(format!(
                "{name}: the description names no label or value ({{{{ $labels.x }}}})"
            ));
        }
        let url = yaml_str(annotations, "runbook_url");
        match url.strip_prefix(RUNBOOK_URL) {
            Some(anchor) if anchors.iter().any(|a| a == anchor) => {}
            Some(anchor) => problems.push(format!(
                "{name}: runbook_url anchor #{anchor} is not a heading of {RUNBOOK}"
            )),
            None => problems.push(format!(
                "{name}: runbook_url {url:?} does not start with {RUNBOOK_URL}"
            )),
        }
    }
    for required in REQUIRED_ALERTS {
        if !names.contains(required) {
            problems.push(format!("required alert {required} is missing"));
        }
    }
    // The runbook's own links between sections.
    for link in runbook.split("](#").skip(1) {
        let anchor = link.split(')').next().unwrap_or_default();
        if !anchors.iter().any(|a| a == anchor) {
            problems.push(format!("{RUNBOOK} links to #{anchor}, which is no heading"));
        }
    }
    assert!(
        problems.is_empty(),
        "alert problems:\n{}",
        problems.join("\n")
    );
}

#[test]
fn every_alert_has_a_firing_and_a_quiet_unit_test() {
    let doc: Yaml = serde_yaml::from_str(&read(RULE_TESTS)).expect("rule tests are YAML");
    let mut fires = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for test in doc["tests"].as_sequence().expect("tests") {
        for case in test["alert_rule_test"].as_sequence().into_iter().flatten() {
            let name = yaml_str(case, "alertname").to_owned();
            let firing = case["exp_alerts"]
                .as_sequence()
                .is_some_and(|alerts| !alerts.is_empty());
            if firing { &mut fires } else { &mut quiet }.insert(name);
        }
    }
    let mut problems = Vec::new();
    for rule in rules() {
        if let Some(name) = rule["alert"].as_str() {
            if !fires.contains(name) {
                problems.push(format!("{name}: no test case where it fires"));
            }
            if !quiet.contains(name) {
                problems.push(format!("{name}: no test case where it stays quiet"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{RULE_TESTS}:\n{}",
        problems.join("\n")
    );
}

/// Every `.event == "x"` in a runbook `jq` filter, and every event of its events table, is one
/// the source logs.
#[test]
fn runbook_names_only_logged_events() {
    let mut logged = BTreeSet::new();
    collect_logged_events(&root().join("src"), &mut logged);
    assert!(!logged.is_empty(), "no `event = \"...\"` in src/");
    let runbook = read(RUNBOOK);
    let mut named = BTreeSet::new();
    for part in runbook.split(".event == \"").skip(1) {
        named.insert(part.split('"').next().unwrap_or_default().to_owned());
    }
    let mut in_table = false;
    for line in runbook.lines() {
        if line.starts_with("| event |") {
            in_table = true;
            continue;
        }
        if in_table && !line.starts_with('|') {
            in_table = false;
        }
        if in_table {
            let first_cell = line.split('|').nth(1).unwrap_or_default();
            for ev in first_cell.split('`').skip(1).step_by(2) {
                named.insert(ev.to_owned());
            }
        }
    }
    assert!(
        named.len() > 5,
        "the runbook names almost no events: {named:?}"
    );
    let unknown: Vec<_> = named.difference(&logged).collect();
    assert!(
        unknown.is_empty(),
        "{RUNBOOK} names log events the binary never writes: {unknown:?} (logged: {logged:?})"
    );
}

fn collect_logged_events(dir: &Path, out: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            collect_logged_events(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).expect("read source");
            for part in text.split("event = \"").skip(1) {
                out.insert(part.split('"').next().unwrap_or_default().to_owned());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Dashboard and rules against the live scrape

#[tokio::test]
async fn dashboard_and_rules_use_only_exported_metrics() {
    let families = exported_families(&live_scrape().await);
    let mut problems = Vec::new();

    // Dashboard: every panel query, every variable query.
    let dash = dashboard();
    let var_names: Vec<String> = variables(&dash)
        .iter()
        .map(|v| str_field(v, "name").to_owned())
        .collect();
    let mut charted = BTreeSet::new();
    let dashboard_rule = |sel: &Selector, family: &Family| {
        let mut p = Vec::new();
        let mut wants = vec!["job", "instance"];
        if family.labels.contains_key("pool") {
            wants.push("pool");
        }
        for label in wants {
            let filtered = sel.matchers.iter().any(|m| {
                m.name == label && matches!(m.op, MatchOp::Re(_)) && m.value == sentinel(label)
            });
            if !filtered {
                p.push(format!(
                    "`{}` is not filtered by {label}=~\"${label}\"",
                    sel.name
                ));
            }
        }
        p
    };
    for p in all_panels(&dash) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let origin = format!("panel {:?} target {}", str_field(&p, "title"), t["refId"]);
            let expr = substitute_variables(str_field(t, "expr"), &var_names);
            if expr.contains('$') {
                problems.push(format!("{origin}: unknown variable left in {expr}"));
                continue;
            }
            let parsed = parse_promql(&expr, &origin);
            for name in metric_names(&parsed) {
                if let Some(f) = family_of(&families, &name) {
                    charted.insert(f);
                }
            }
            problems.extend(
                check_expr(&parsed, &origin, &families, &dashboard_rule)
                    .into_iter()
                    .map(|m| format!("{origin}: {m}")),
            );
        }
    }
    for v in variables(&dash) {
        let query = variable_query(&v);
        let Some(args) = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
        else {
            continue;
        };
        let origin = format!("variable {}", str_field(&v, "name"));
        let (selector, label) = args.rsplit_once(',').unwrap_or((args, ""));
        let selector = substitute_variables(selector.trim(), &var_names);
        let parsed = parse_promql(&selector, &origin);
        let label = label.trim();
        problems.extend(check_expr(&parsed, &origin, &families, &|sel, family| {
            if family.has_label(label) {
                Vec::new()
            } else {
                vec![format!("`{}` has no label `{label}`", sel.name)]
            }
        }));
    }
    for m in DASHBOARD_METRICS {
        if !charted.contains(m) {
            problems.push(format!("the dashboard charts no `{m}`"));
        }
    }

    // Rules: every expression, and every selector pinned to the scrape job.
    for rule in rules() {
        let name = rule["alert"]
            .as_str()
            .or_else(|| rule["record"].as_str())
            .unwrap_or("?");
        let origin = format!("rule {name}");
        let parsed = parse_promql(yaml_str(&rule, "expr"), &origin);
        problems.extend(check_expr(&parsed, &origin, &families, &|sel, _| {
            let pinned = sel
                .matchers
                .iter()
                .any(|m| m.name == "job" && matches!(m.op, MatchOp::Equal) && m.value == JOB);
            if pinned {
                Vec::new()
            } else {
                vec![format!("`{}` is not selected with job=\"{JOB}\"", sel.name)]
            }
        }));
    }
    assert!(
        problems.is_empty(),
        "PromQL problems against the live /metrics:\n{}",
        problems.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// The checkers themselves must catch what they are for.

#[test]
fn checkers_catch_unknown_metrics_labels_values_and_filters() {
    let scrape = "# HELP a_total x\n# TYPE a_total counter\na_total{result=\"ok\"} 0\n\
                  # TYPE h_seconds histogram\nh_seconds_bucket{pool=\"p\",le=\"+Inf\"} 0\n\
                  h_seconds_sum{pool=\"p\"} 0\nh_seconds_count{pool=\"p\"} 0\n";
    let families = exported_families(scrape);
    let none = |_: &Selector, _: &Family| Vec::new();
    let check = |e: &str| check_expr(&parse_promql(e, "t"), "t", &families, &none);
    assert!(check(r#"sum by (result) (rate(a_total{result="ok"}[5m]))"#).is_empty());
    assert!(
        check("histogram_quantile(0.9, sum by (pool, le) (rate(h_seconds_bucket[5m])))").is_empty()
    );
    assert!(check("up == 0").is_empty());
    for bad in [
        "rate(b_total[5m])",                      // unknown metric
        r#"rate(a_total{reslt="ok"}[5m])"#,       // unknown label
        r#"rate(a_total{result=~"ok|okk"}[5m])"#, // unknown value
        "a_total",                                // raw counter
        "sum by (reason) (rate(a_total[5m]))",    // unknown grouping
        "histogram_quantile(0.9, sum by (pool) (rate(h_seconds_bucket[5m])))", // le dropped
        "rate(h_seconds[5m])",                    // histogram base name
    ] {
        assert!(!check(bad).is_empty(), "not caught: {bad}");
    }
    assert_eq!(
        substitute_variables(
            r#"rate(x{job=~"$job", pool=~"${pool}"}[$__rate_interval])"#,
            &["job".into(), "pool".into()]
        ),
        r#"rate(x{job=~"__var_job__", pool=~"__var_pool__"}[5m])"#
    );
    assert_eq!(github_anchor("VncgateInstanceDown"), "vncgateinstancedown");
    assert_eq!(
        github_anchor("Admin listener and logs"),
        "admin-listener-and-logs"
    );
    assert_eq!(github_anchor("What's up? (v2)"), "whats-up-v2");
    assert_eq!(
        runbook_anchors("# A\n```sh\n# not a heading\n```\n## B c\n"),
        vec!["a", "b-c"]
    );
}
