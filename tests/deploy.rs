//! The deployment surface (deploy/, dashboards/) checked with the real
//! tools an operator uses: promtool, docker-compose, kubernetes-validate,
//! systemd-analyze, tsc against `@grafana/schema`, buildah and podman.
//!
//! A check whose tool is missing prints `skipped: ...` with the install
//! command and passes, except under `CI=true`, where a missing tool fails.
//! The container tests build the static release binary the image packages
//! when it is missing or stale (.ci/run builds it before `cargo test`).
//! The live test runs deploy/compose.yaml's own commands as host processes
//! (gateways, UDC, members) under a real Prometheus.

#[path = "support/skip.rs"]
mod skip;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dapgw::config::{self, GatewayConfig};
use dapgw::telemetry::{self, GatewayMetrics, ProcessMetrics, UdcMetrics};
use prometheus::Registry;
use serde_json::Value;

/// TypeScript version of the dashboards' type check.
const TYPESCRIPT: &str = "5.9.3";

/// The Grafana that compose.yaml runs (its image tag): the dashboards are
/// type-checked against `@grafana/schema` of this same version, so the
/// check and the deployment cannot drift apart.
fn grafana_version() -> String {
    const IMAGE: &str = "image: docker.io/grafana/grafana:";
    let compose = read("deploy/compose.yaml");
    let at = compose
        .find(IMAGE)
        .expect("compose.yaml runs grafana/grafana");
    let tag: String = compose[at + IMAGE.len()..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    assert_eq!(
        tag.split('.').count(),
        3,
        "pin grafana/grafana to an exact version in compose.yaml, not {tag:?}"
    );
    tag
}

/// Image tag the tests build.
const TEST_IMAGE: &str = "localhost/dapgw:test";

/// Where the host-built static binary is (deploy/Dockerfile copies it).
const STATIC_BIN: &str = "target/x86_64-unknown-linux-gnu/release/dapgw";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `tool` on PATH, or `None` after a visible skip message; in CI a missing
/// tool fails the test.
fn require(tool: &str, install: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(tool))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        skip::skip(tool, &format_args!("not installed ({install})"));
    }
    found
}

/// Runs `cmd` to completion; panics if it cannot be started.
fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn assert_ok(what: &str, out: &Output) {
    assert!(out.status.success(), "{what} failed:\n{}", text(out));
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

// ---------------------------------------------------------------------------
// Expressions: extraction, metric names, Grafana variable substitution
// ---------------------------------------------------------------------------

/// One PromQL expression and where it comes from.
#[derive(Clone, Debug)]
struct Expr {
    origin: String,
    promql: String,
}

/// The dashboards under dashboards/, parsed.
fn dashboards() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root().join("dashboards")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            let json: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            out.push((name, json));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        out.iter().map(|d| d.0.as_str()).collect::<Vec<_>>(),
        ["dapgw-gateway", "dapgw-udc"]
    );
    out
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().expect("panels") {
        out.push(p);
        if let Some(nested) = p["panels"].as_array() {
            out.extend(nested);
        }
    }
    out
}

/// Every panel target's expression of a dashboard.
fn panel_exprs(name: &str, dashboard: &Value) -> Vec<Expr> {
    let mut out = Vec::new();
    for p in panels(dashboard) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let promql = t["expr"].as_str().expect("every target has an expr");
            out.push(Expr {
                origin: format!("{name}: panel {:?} target {}", p["title"], t["refId"]),
                promql: promql.to_string(),
            });
        }
    }
    out
}

/// The selector inside each query variable's `label_values(SELECTOR, label)`.
fn variable_exprs(name: &str, dashboard: &Value) -> Vec<Expr> {
    let mut out = Vec::new();
    for v in dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
    {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]["query"]
            .as_str()
            .or(v["query"].as_str())
            .expect("query variable text");
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .and_then(|r| r.rsplit_once(','))
            .map(|(sel, _label)| sel.trim())
            .unwrap_or_else(|| panic!("{name}: variable {}: not label_values(...)", v["name"]));
        out.push(Expr {
            origin: format!("{name}: variable {}", v["name"]),
            promql: inner.to_string(),
        });
    }
    out
}

/// `(alert name, expr)` of every rule in a rules file written as in
/// deploy/prometheus/alerts.yml (inline `expr:` or a `|` block).
fn alert_exprs(rules: &str) -> Vec<(String, Expr)> {
    let lines: Vec<&str> = rules.lines().collect();
    let mut out = Vec::new();
    let mut alert = None;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        if let Some(name) = trimmed.strip_prefix("- alert:") {
            alert = Some(name.trim().to_string());
        } else if let Some(rest) = trimmed.strip_prefix("expr:") {
            let indent = line.len() - trimmed.len();
            let rest = rest.trim();
            let promql = if matches!(rest, "|" | "|-" | ">" | ">-") {
                let mut block = Vec::new();
                while i + 1 < lines.len() {
                    let next = lines[i + 1];
                    let next_indent = next.len() - next.trim_start().len();
                    if !next.trim().is_empty() && next_indent <= indent {
                        break;
                    }
                    block.push(next.trim());
                    i += 1;
                }
                block.join("\n").trim().to_string()
            } else {
                rest.to_string()
            };
            let name = alert.take().expect("expr after `- alert:`");
            out.push((
                name.clone(),
                Expr {
                    origin: format!("alert {name}"),
                    promql,
                },
            ));
        }
        i += 1;
    }
    out
}

/// Replaces Grafana's variables by values Prometheus accepts: the regex
/// `.+` for job and instance (their "All" value), fixed ranges for the
/// interval variables.
fn substitute(promql: &str, range: &str) -> String {
    substitute_instance(promql, range, ".+")
}

/// Like [`substitute`], with `instance` as the instance variable's value
/// (one target, as when an operator picks one gateway).
fn substitute_instance(promql: &str, range: &str, instance: &str) -> String {
    let s = promql
        .replace("$__rate_interval", range)
        .replace("$__interval", range)
        .replace("$__range", "1h")
        .replace("${job}", ".+")
        .replace("$job", ".+")
        .replace("${instance}", instance)
        .replace("$instance", instance);
    assert!(!s.contains('$'), "unknown variable left in {s}");
    s
}

/// Every `dapgw_*` identifier in `s`.
fn metric_tokens(s: &str) -> BTreeSet<String> {
    let b = s.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let mut out = BTreeSet::new();
    let mut i = 0;
    while i < b.len() {
        if ident(b[i]) && (i == 0 || !ident(b[i - 1])) {
            let start = i;
            while i < b.len() && ident(b[i]) {
                i += 1;
            }
            let tok = &s[start..i];
            if tok.starts_with("dapgw_") {
                out.insert(tok.to_string());
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Metric families (name -> type) a registry exposes, read from the text
/// format the services serve.
fn families(r: &Registry) -> BTreeMap<String, String> {
    telemetry::encode(r)
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (name, kind) = l.split_once(' ').unwrap();
            (name.to_string(), kind.to_string())
        })
        .collect()
}

fn gateway_families() -> BTreeMap<String, String> {
    let r = Registry::new();
    GatewayMetrics::register(&r);
    ProcessMetrics::register(&r).unwrap();
    families(&r)
}

fn udc_families() -> BTreeMap<String, String> {
    let r = Registry::new();
    UdcMetrics::register(&r);
    ProcessMetrics::register(&r).unwrap();
    families(&r)
}

/// Checks that `token` names a series of `fams`: a counter or gauge by its
/// name, a histogram by `_bucket`, `_sum` or `_count` (or by its bare name
/// when `prose` allows it, as in an alert's description).
fn resolves(token: &str, fams: &BTreeMap<String, String>, prose: bool) -> bool {
    match fams.get(token) {
        Some(kind) if kind == "histogram" => prose,
        Some(_) => true,
        None => ["_bucket", "_sum", "_count"].iter().any(|suffix| {
            token
                .strip_suffix(suffix)
                .is_some_and(|base| fams.get(base).is_some_and(|k| k == "histogram"))
        }),
    }
}

// ---------------------------------------------------------------------------
// Prometheus: config, rules, unit tests, metric names, expression syntax
// ---------------------------------------------------------------------------

#[test]
fn promtool_checks_config_and_rules() {
    let Some(promtool) = require("promtool", "apt-get install prometheus") else {
        return;
    };
    let dir = root().join("deploy/prometheus");
    let out = run(Command::new(&promtool)
        .args(["check", "config"])
        .arg(dir.join("prometheus.yml")));
    assert_ok("promtool check config", &out);
    let out = run(Command::new(&promtool)
        .args(["check", "rules"])
        .arg(dir.join("alerts.yml")));
    assert_ok("promtool check rules", &out);
}

#[test]
fn promtool_unit_tests_cover_every_alert() {
    let rules = read("deploy/prometheus/alerts.yml");
    let tests = read("deploy/prometheus/alerts_test.yml");
    let alerts = alert_exprs(&rules);
    assert!(alerts.len() >= 10, "only {} alerts parsed", alerts.len());
    // Each alert is tested, and shown firing (a non-empty exp_alerts).
    for (name, _) in &alerts {
        let needle = format!("alertname: {name}\n");
        let firing = tests.match_indices(&needle).any(|(at, _)| {
            let after = &tests[at + needle.len()..];
            after.trim_start().starts_with("exp_alerts:\n")
        });
        assert!(firing, "alert {name} has no firing case in alerts_test.yml");
    }
    let Some(promtool) = require("promtool", "apt-get install prometheus") else {
        return;
    };
    let out = run(Command::new(promtool)
        .args(["test", "rules", "alerts_test.yml"])
        .current_dir(root().join("deploy/prometheus")));
    assert_ok("promtool test rules", &out);
}

#[test]
fn dashboards_and_alerts_use_only_exported_metrics() {
    let gw = gateway_families();
    let udc = udc_families();
    let mut both = gw.clone();
    both.extend(udc.clone());
    for (name, d) in dashboards() {
        let fams = if name == "dapgw-gateway" { &gw } else { &udc };
        let exprs = panel_exprs(&name, &d)
            .into_iter()
            .chain(variable_exprs(&name, &d));
        let mut used = 0;
        for e in exprs {
            let tokens = metric_tokens(&e.promql);
            assert!(
                !tokens.is_empty(),
                "{}: no dapgw metric in {}",
                e.origin,
                e.promql
            );
            for t in tokens {
                assert!(
                    resolves(&t, fams, false),
                    "{}: `{t}` is not a series exported by the {name} service",
                    e.origin
                );
                used += 1;
            }
        }
        assert!(used > 10, "{name}: only {used} metric references");
    }
    // The whole rules file, descriptions included, names only real metrics.
    let rules = read("deploy/prometheus/alerts.yml");
    for t in metric_tokens(&rules) {
        assert!(
            resolves(&t, &both, true),
            "alerts.yml: `{t}` is not exported"
        );
    }
    for (name, e) in alert_exprs(&rules) {
        for t in metric_tokens(&e.promql) {
            assert!(
                resolves(&t, &both, false),
                "alert {name}: `{t}` is not a series"
            );
        }
    }
    // Every gateway family has a panel (the udc's too), so nothing exported
    // goes unseen.
    for (name, fams) in [("dapgw-gateway", &gw), ("dapgw-udc", &udc)] {
        let d = &dashboards().into_iter().find(|d| d.0 == name).unwrap().1;
        let all: String = panel_exprs(name, d)
            .iter()
            .map(|e| e.promql.clone())
            .collect();
        for (family, kind) in fams {
            let shown = all.contains(family.as_str())
                || (kind == "histogram" && all.contains(&format!("{family}_bucket")));
            assert!(shown, "{name}: no panel shows {family}");
        }
    }
}

/// Writes one recording rule per expression and runs `promtool check rules`.
fn promtool_parse(promtool: &Path, exprs: &[Expr]) -> Output {
    let mut y = String::from("groups:\n  - name: expressions\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        y.push_str(&format!(
            "      # {}\n      - record: check:expr_{i}\n        expr: {}\n",
            e.origin.replace('\n', " "),
            serde_json::to_string(&e.promql).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("exprs.yml");
    std::fs::write(&file, y).unwrap();
    run(Command::new(promtool).args(["check", "rules"]).arg(&file))
}

#[test]
fn every_promql_expression_parses() {
    let Some(promtool) = require("promtool", "apt-get install prometheus") else {
        return;
    };
    let mut exprs = Vec::new();
    for (name, d) in dashboards() {
        for e in panel_exprs(&name, &d)
            .into_iter()
            .chain(variable_exprs(&name, &d))
        {
            exprs.push(Expr {
                origin: e.origin,
                promql: substitute(&e.promql, "5m"),
            });
        }
    }
    let n = exprs.len();
    assert!(n > 40, "only {n} dashboard expressions");
    let out = promtool_parse(&promtool, &exprs);
    assert_ok("promtool check rules on the dashboards' expressions", &out);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("SUCCESS: {n} rules found")),
        "{}",
        text(&out)
    );
    // The check bites: one unbalanced expression fails it.
    exprs.push(Expr {
        origin: "broken on purpose".into(),
        promql: "sum(rate(dapgw_spool_rejected_total[5m])".into(),
    });
    let out = promtool_parse(&promtool, &exprs);
    assert!(
        !out.status.success(),
        "a broken expression passed:\n{}",
        text(&out)
    );
}

// ---------------------------------------------------------------------------
// Grafana dashboards
// ---------------------------------------------------------------------------

#[test]
fn dashboards_are_provisioning_ready() {
    for (name, d) in dashboards() {
        assert_eq!(d["uid"], name, "{name}: stable uid = file name");
        assert!(
            d.get("id").is_none_or(Value::is_null),
            "{name}: no instance id"
        );
        let vars = d["templating"]["list"].as_array().unwrap();
        let var = |n: &str| {
            vars.iter()
                .find(|v| v["name"] == n)
                .unwrap_or_else(|| panic!("{name}: variable {n}"))
        };
        assert_eq!(var("datasource")["type"], "datasource");
        assert_eq!(var("datasource")["query"], "prometheus");
        for n in ["job", "instance"] {
            assert_eq!(var(n)["type"], "query", "{name}: {n}");
            assert_eq!(var(n)["datasource"]["uid"], "${datasource}", "{name}: {n}");
        }
        let mut ids = BTreeSet::new();
        let mut titles = BTreeSet::new();
        for p in panels(&d) {
            let id = p["id"].as_u64().expect("panel id");
            assert!(ids.insert(id), "{name}: duplicate panel id {id}");
            if p["type"] == "row" {
                titles.insert(p["title"].as_str().unwrap().to_string());
                continue;
            }
            assert_eq!(
                p["datasource"]["uid"], "${datasource}",
                "{name}: {}",
                p["title"]
            );
            let targets = p["targets"].as_array().expect("targets");
            assert!(!targets.is_empty(), "{name}: {} has no query", p["title"]);
            for t in targets {
                assert_eq!(t["datasource"]["uid"], "${datasource}");
                let expr = t["expr"].as_str().unwrap();
                assert!(
                    expr.contains("job=~\"$job\", instance=~\"$instance\""),
                    "{name}: {} does not filter by job and instance: {expr}",
                    p["title"]
                );
            }
        }
        if name == "dapgw-gateway" {
            for row in [
                "RED: member traffic",
                "RED: upstream (UDC)",
                "USE: spool, connections, process",
                "Aggregation",
                "Rounds and localization",
            ] {
                assert!(titles.contains(row), "{name}: row {row}");
            }
        }
    }
    // The provisioning provider loads the directory compose mounts them at.
    let provider = read("deploy/grafana/provisioning/dashboards/dapgw.yaml");
    let compose = read("deploy/compose.yaml");
    assert!(provider.contains("path: /var/lib/grafana/dashboards/dapgw"));
    assert!(compose.contains("../dashboards:/var/lib/grafana/dashboards/dapgw:ro"));
}

/// `npm install`s `@grafana/schema` of compose's Grafana and the pinned
/// `typescript` into target/deploy-npm unless they are there already.
fn npm_tools(npm: &Path) -> PathBuf {
    let dir = root().join("target/deploy-npm");
    let grafana = grafana_version();
    let installed = |pkg: &str, version: &str| {
        std::fs::read_to_string(dir.join("node_modules").join(pkg).join("package.json"))
            .is_ok_and(|p| p.contains(&format!("\"version\": \"{version}\"")))
    };
    if !(installed("@grafana/schema", &grafana) && installed("typescript", TYPESCRIPT)) {
        std::fs::create_dir_all(&dir).unwrap();
        let out = run(Command::new(npm)
            .arg("install")
            .arg("--prefix")
            .arg(&dir)
            .args(["--no-audit", "--no-fund", "--loglevel=error"])
            .arg(format!("@grafana/schema@{grafana}"))
            .arg(format!("typescript@{TYPESCRIPT}")));
        assert_ok("npm install @grafana/schema typescript", &out);
    }
    dir
}

#[test]
fn dashboards_typecheck_against_grafana_schema() {
    let (Some(npm), Some(node)) = (
        require("npm", "apt-get install npm"),
        require("node", "apt-get install nodejs"),
    ) else {
        return;
    };
    let dir = npm_tools(&npm);
    let check = dir.join("check");
    let _ = std::fs::remove_dir_all(&check);
    std::fs::create_dir_all(&check).unwrap();
    let mut files = Vec::new();
    for (name, _) in dashboards() {
        let json = read(&format!("dashboards/{name}.json"));
        let ts = format!(
            "import type {{ Dashboard }} from '@grafana/schema';\n\
             export const dashboard: Dashboard = {json};\n"
        );
        std::fs::write(check.join(format!("{name}.ts")), ts).unwrap();
        files.push(format!("\"{name}.ts\""));
    }
    // Control: the type must reject a panel with a misspelt field, or the
    // directive below is unused and tsc fails.
    std::fs::write(
        check.join("control.ts"),
        "import type { Dashboard } from '@grafana/schema';\n\
         // @ts-expect-error: `tyep` is not a panel field\n\
         export const bad: Dashboard = { schemaVersion: 39, panels: [{ tyep: 'timeseries' }] };\n",
    )
    .unwrap();
    files.push("\"control.ts\"".into());
    std::fs::write(
        check.join("tsconfig.json"),
        format!(
            "{{\"compilerOptions\": {{\"strict\": true, \"noEmit\": true, \"module\": \"esnext\", \
             \"moduleResolution\": \"bundler\", \"target\": \"es2022\", \"skipLibCheck\": true, \
             \"types\": [], \"typeRoots\": [\"../node_modules/@types\"]}}, \"files\": [{}]}}",
            files.join(", ")
        ),
    )
    .unwrap();
    let out = run(Command::new(node)
        .arg(dir.join("node_modules/typescript/bin/tsc"))
        .args(["-p", "tsconfig.json"])
        .current_dir(&check));
    assert_ok("tsc --noEmit on the dashboards", &out);
}

// ---------------------------------------------------------------------------
// Compose, Kubernetes, systemd
// ---------------------------------------------------------------------------

/// Every `DAPGW_*` variable named in `s`.
fn dapgw_variables(s: &str) -> BTreeSet<String> {
    let b = s.as_bytes();
    let mut out = BTreeSet::new();
    for (at, _) in s.match_indices("DAPGW_") {
        if at > 0 && (b[at - 1].is_ascii_alphanumeric() || b[at - 1] == b'_') {
            continue;
        }
        let end = s[at..]
            .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
            .map_or(s.len(), |e| at + e);
        // `DAPGW_*` in prose is the prefix, not a variable.
        if end > at + "DAPGW_".len() {
            out.insert(s[at..end].to_string());
        }
    }
    out
}

#[test]
fn deploy_files_name_only_real_variables() {
    let gateway: BTreeSet<String> = config::gateway_variables().map(|v| v.0).collect();
    let udc: BTreeSet<String> = config::udc_variables().map(|v| v.0).collect();
    let any: BTreeSet<String> = gateway
        .union(&udc)
        .cloned()
        .chain([config::CONFIG_VAR.to_string()])
        .collect();
    // Files for the gateway alone: a udc-only variable would stop it.
    for f in [
        "deploy/kubernetes/gateway-configmap.yaml",
        "deploy/systemd/gateway.env.example",
        "deploy/systemd/dapgw-gateway.service",
    ] {
        let vars = dapgw_variables(&read(f));
        assert!(!vars.is_empty(), "{f}");
        for v in vars {
            assert!(gateway.contains(&v), "{f}: {v} is not a gateway variable");
        }
    }
    // The env example lists every gateway variable.
    let example = dapgw_variables(&read("deploy/systemd/gateway.env.example"));
    for v in &gateway {
        assert!(example.contains(v), "gateway.env.example misses {v}");
    }
    for f in [
        "deploy/compose.yaml",
        "deploy/Dockerfile",
        "deploy/README.md",
        "deploy/prometheus/alerts.yml",
    ] {
        for v in dapgw_variables(&read(f)) {
            assert!(any.contains(&v), "{f}: {v} is not a dapgw variable");
        }
    }
    // The README documents every variable.
    let readme = dapgw_variables(&read("deploy/README.md"));
    for v in &any {
        assert!(readme.contains(v), "deploy/README.md does not document {v}");
    }
}

/// The rows `(variable, default cell)` of the table after `heading`.
fn readme_table(readme: &str, heading: &str) -> Vec<(String, String)> {
    let at = readme
        .find(heading)
        .unwrap_or_else(|| panic!("README: {heading}"));
    readme[at..]
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let var = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            Some((var.to_string(), cells.get(2)?.to_string()))
        })
        .collect()
}

/// What the README's default column must say for a serialized default.
fn default_cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "unset".into(),
        Some(Value::String(s)) if s.is_empty() => "required".into(),
        Some(Value::String(s)) => format!("`{s}`"),
        Some(other) => format!("`{other}`"),
    }
}

#[test]
fn readme_documents_the_defaults() {
    let readme = read("deploy/README.md");
    let tables = [
        (
            "### Gateway (`dapgw gateway`)",
            config::gateway_variables().map(|v| v.0).collect::<Vec<_>>(),
            serde_json::to_value(GatewayConfig::default()).unwrap(),
        ),
        (
            "### UDC (`dapgw udc`)",
            config::udc_variables().map(|v| v.0).collect(),
            serde_json::to_value(config::UdcConfig::default()).unwrap(),
        ),
    ];
    for (heading, vars, defaults) in tables {
        let rows = readme_table(&readme, heading);
        let documented: Vec<&String> = rows.iter().map(|r| &r.0).collect();
        assert_eq!(
            documented,
            vars.iter().collect::<Vec<_>>(),
            "{heading}: variables and order"
        );
        for (var, cell) in &rows {
            let key = var
                .strip_prefix(config::ENV_PREFIX)
                .unwrap()
                .to_ascii_lowercase();
            assert_eq!(cell, &default_cell(defaults.get(&key)), "{heading}: {var}");
        }
    }
}

/// The README's short gateway and UDC tables: real variables, in the
/// reference table's order, with the true defaults, every required one.
#[test]
fn readme_deployment_section_states_true_defaults() {
    let readme = read("README.md");
    readme_short_table(
        &readme,
        "### Gateway settings",
        config::gateway_variables().map(|v| v.0).collect(),
        serde_json::to_value(GatewayConfig::default()).unwrap(),
    );
    readme_short_table(
        &readme,
        "### UDC settings",
        config::udc_variables().map(|v| v.0).collect(),
        serde_json::to_value(config::UdcConfig::default()).unwrap(),
    );
    let any: BTreeSet<String> = config::gateway_variables()
        .chain(config::udc_variables())
        .map(|v| v.0)
        .chain([config::CONFIG_VAR.to_string()])
        .collect();
    for v in dapgw_variables(&readme) {
        assert!(any.contains(&v), "README: {v} is not a dapgw variable");
    }
}

/// Checks the README table under `heading` against the service's
/// variables `all` (in order) and `defaults`.
fn readme_short_table(readme: &str, heading: &str, all: Vec<String>, defaults: Value) {
    let rows = readme_table(readme, heading);
    assert!(rows.len() >= 8, "{heading}: {rows:?}");
    let mut last = 0;
    for (var, cell) in &rows {
        let at = all
            .iter()
            .position(|v| v == var)
            .unwrap_or_else(|| panic!("README {heading}: {var} is not one of its variables"));
        assert!(at >= last, "README {heading}: {var} out of order");
        last = at;
        let key = var
            .strip_prefix(config::ENV_PREFIX)
            .unwrap()
            .to_ascii_lowercase();
        assert_eq!(cell, &default_cell(defaults.get(&key)), "README: {var}");
    }
    // Every required variable is in it.
    for var in &all {
        let key = var
            .strip_prefix(config::ENV_PREFIX)
            .unwrap()
            .to_ascii_lowercase();
        if default_cell(defaults.get(&key)) == "required" {
            assert!(
                rows.iter().any(|r| &r.0 == var),
                "README {heading} misses {var}"
            );
        }
    }
}

#[test]
fn stop_grace_covers_the_drain() {
    let drain_s = GatewayConfig::default().drain_grace_ms.div_ceil(1000);
    let number_after = |s: &str, key: &str| -> u64 {
        let at = s.find(key).unwrap_or_else(|| panic!("{key} not found"));
        s[at + key.len()..]
            .trim_start_matches([' ', ':', '=', '"'])
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap()
    };
    let k8s = read("deploy/kubernetes/gateway-statefulset.yaml");
    let cm = read("deploy/kubernetes/gateway-configmap.yaml");
    let drain_k8s = number_after(&cm, "DAPGW_DRAIN_GRACE_MS").div_ceil(1000);
    assert!(number_after(&k8s, "terminationGracePeriodSeconds") >= drain_k8s + 3);
    let unit = read("deploy/systemd/dapgw-gateway.service");
    assert!(number_after(&unit, "TimeoutStopSec=") >= drain_s + 3);
    let compose = read("deploy/compose.yaml");
    assert!(number_after(&compose, "stop_grace_period:") >= drain_s + 3);
}

#[test]
fn compose_config_is_valid() {
    let Some(dc) = require("docker-compose", "apt-get install docker-compose") else {
        return;
    };
    let out = run(Command::new(dc)
        .args(["-f", "deploy/compose.yaml", "config", "-q"])
        .current_dir(root()));
    assert_ok("docker-compose config -q", &out);
    let compose = read("deploy/compose.yaml");
    for needed in [
        "read_only: true",
        "cap_drop: [ALL]",
        "gateway-1:",
        "gateway-2:",
        "sim-1:",
    ] {
        assert!(compose.contains(needed), "compose.yaml lacks {needed}");
    }
}

#[test]
fn kubernetes_manifests_validate() {
    let Some(kv) = require("kubernetes-validate", "pip install kubernetes-validate") else {
        return;
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("deploy/kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 4);
    let out = run(Command::new(kv).arg("--strict").args(&files));
    assert_ok("kubernetes-validate --strict", &out);
    let ss = read("deploy/kubernetes/gateway-statefulset.yaml");
    for needed in [
        "readOnlyRootFilesystem: true",
        "drop: [\"ALL\"]",
        "runAsNonRoot: true",
        "runAsUser: 65532",
        "path: /healthz",
        "path: /readyz?exclude=upstream",
        "volumeClaimTemplates:",
        "prometheus.io/scrape: \"true\"",
        // Service links would inject DAPGW_GATEWAY_* variables, which the
        // gateway refuses as unknown settings.
        "enableServiceLinks: false",
    ] {
        assert!(ss.contains(needed), "statefulset lacks {needed}");
    }
}

/// The StatefulSet's probes and replica count, without a tool: readiness
/// routes the members' Service, so it must ignore the upstream (a gateway
/// spools through a WAN outage); liveness is /healthz; one replica, since
/// every replica would mount the one client-certificate Secret.
#[test]
fn kubernetes_probes_and_replicas() {
    let ss = read("deploy/kubernetes/gateway-statefulset.yaml");
    let probe_path = |probe: &str| -> String {
        let at = ss
            .find(&format!("{probe}:"))
            .unwrap_or_else(|| panic!("statefulset has no {probe}"));
        ss[at..]
            .lines()
            .find_map(|l| l.trim().strip_prefix("path: "))
            .unwrap_or_else(|| panic!("{probe} has no httpGet path"))
            .to_string()
    };
    assert_eq!(probe_path("readinessProbe"), "/readyz?exclude=upstream");
    assert_eq!(probe_path("livenessProbe"), "/healthz");
    let replicas: Vec<&str> = ss
        .lines()
        .filter_map(|l| l.trim().strip_prefix("replicas:"))
        .map(str::trim)
        .collect();
    assert_eq!(
        replicas,
        ["1"],
        "one gateway per StatefulSet (see its header)"
    );
    // One Secret for the whole template: a second replica could not have
    // its own client certificate.
    assert_eq!(ss.matches("secretName:").count(), 1);
}

#[test]
fn systemd_unit_verifies() {
    let unit = read("deploy/systemd/dapgw-gateway.service");
    for needed in [
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "StateDirectory=dapgw",
        "EnvironmentFile=/etc/dapgw/gateway.env",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=\n",
        "KillSignal=SIGTERM",
    ] {
        assert!(unit.contains(needed), "unit lacks {needed:?}");
    }
    let Some(sa) = require("systemd-analyze", "apt-get install systemd") else {
        return;
    };
    // verify wants ExecStart to exist: point it at the binary under test.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("dapgw-gateway.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/dapgw", env!("CARGO_BIN_EXE_dapgw")),
    )
    .unwrap();
    let out = run(Command::new(sa).arg("verify").arg(&copy));
    // verify exits 0 on directives it ignores; any line about the unit
    // file is a finding.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let findings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("dapgw-gateway.service"))
        .collect();
    assert!(
        out.status.success() && findings.is_empty(),
        "systemd-analyze verify:\n{}",
        text(&out)
    );
}

// ---------------------------------------------------------------------------
// Container image
// ---------------------------------------------------------------------------

/// True when `path` is an ELF file without a PT_INTERP segment: the kernel
/// loads it without a dynamic loader, so it needs no shared library.
fn elf_is_static(path: &Path) -> bool {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..4], b"\x7fELF", "{} is not ELF", path.display());
    assert_eq!(b[4], 2, "64-bit ELF expected");
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).all(|i| {
        let off = phoff + i * phentsize;
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap()) != 3 // PT_INTERP
    })
}

#[test]
fn elf_check_tells_static_from_dynamic() {
    // The test binary itself is dynamically linked.
    let me = std::env::current_exe().unwrap();
    assert!(!elf_is_static(&me));
}

/// The podman command line of operations.md (vfs storage, runc).
fn podman(podman: &Path) -> Command {
    let mut c = Command::new(podman);
    c.args(["--storage-driver", "vfs"]);
    c
}

/// Brings the static binary up to date with the sources: `cargo build`
/// with .ci/run's flags, a no-op (seconds) after .ci/run built it, a full
/// release build (about 6 minutes on 2 busy cores) from nothing.
fn build_static_binary() {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let start = Instant::now();
    eprintln!("building {STATIC_BIN} (release, crt-static; minutes if it is stale)");
    let out = run(Command::new(cargo)
        .args(["build", "--release", "--locked"])
        .args(["--target", "x86_64-unknown-linux-gnu", "--bin", "dapgw"])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .current_dir(root()));
    assert_ok("cargo build (static release binary)", &out);
    eprintln!("{STATIC_BIN} up to date after {:?}", start.elapsed());
}

/// Builds TEST_IMAGE once per test process (and the static binary it
/// packages); `None` (after a skip message) where buildah, podman or runc
/// are missing.
fn test_image() -> Option<PathBuf> {
    static BUILT: Mutex<bool> = Mutex::new(false);
    let buildah = require("buildah", "apt-get install buildah")?;
    let podman = require("podman", "apt-get install podman")?;
    require("runc", "apt-get install runc")?;
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !*built {
        build_static_binary();
        let bin = root().join(STATIC_BIN);
        assert!(elf_is_static(&bin), "{STATIC_BIN} has a dynamic loader");
        // The previous build's image goes first: retagged, it would stay
        // behind as a dangling copy (vfs storage keeps whole layers, so
        // each one costs the image's full size on disk). A missing image
        // is the usual case and not an error; any other failure is shown
        // (the build may then fail for want of space).
        let out = run(self::podman(&podman).args(["rmi", "--force", TEST_IMAGE]));
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() && !stderr.contains("image not known") {
            eprintln!("podman rmi {TEST_IMAGE} failed:\n{}", text(&out));
        }
        let out = run(Command::new(buildah)
            .args(["--storage-driver", "vfs", "bud", "--isolation", "chroot"])
            .args([
                "--format",
                "docker",
                "-t",
                TEST_IMAGE,
                "-f",
                "deploy/Dockerfile",
                "--ignorefile",
                "deploy/Dockerfile.dockerignore",
                ".",
            ])
            .current_dir(root()));
        assert_ok("buildah bud", &out);
        *built = true;
    }
    Some(podman)
}

#[test]
fn container_image_builds_and_starts() {
    let Some(podman_bin) = test_image() else {
        return;
    };
    // The image's configuration.
    let out = run(podman(&podman_bin).args([
        "image",
        "inspect",
        "--format",
        "{{json .Config}}|{{json .HealthCheck}}",
        TEST_IMAGE,
    ]));
    assert_ok("podman image inspect", &out);
    let s = String::from_utf8_lossy(&out.stdout);
    let (config, health) = s.trim().split_once('|').unwrap();
    let config: Value = serde_json::from_str(config).unwrap();
    assert_eq!(config["User"], "65532:65532");
    assert_eq!(config["Entrypoint"], serde_json::json!(["/dapgw"]));
    assert_eq!(config["Cmd"], serde_json::json!(["gateway"]));
    assert_eq!(config["StopSignal"], "SIGTERM");
    assert!(
        config["Volumes"].get("/var/lib/dapgw").is_some(),
        "{config}"
    );
    let health: Value = serde_json::from_str(health).unwrap();
    assert_eq!(
        health["Test"],
        serde_json::json!(["CMD", "/dapgw", "health", "--live"])
    );

    // It starts read-only with no capabilities, and the binary runs: the
    // version, then a probe of a closed port that must fail to connect.
    let base = |cmd: &mut Command| {
        cmd.args(["run", "--rm", "--runtime", "runc"])
            .args([
                "--ulimit",
                "nofile=20000:20000",
                "--ulimit",
                "nproc=1024:1024",
            ])
            .args(["--network", "host", "--read-only", "--cap-drop=ALL"])
            .args(["--security-opt", "no-new-privileges"]);
    };
    let mut cmd = podman(&podman_bin);
    base(&mut cmd);
    let out = run(cmd.args([TEST_IMAGE, "--version"]));
    assert_ok("podman run --version", &out);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")),
        "{}",
        text(&out)
    );
    let closed = free_port();
    let mut cmd = podman(&podman_bin);
    base(&mut cmd);
    let out = run(cmd
        .args([
            TEST_IMAGE,
            "health",
            "--live",
            "--timeout-ms",
            "2000",
            "--url",
        ])
        .arg(format!("127.0.0.1:{closed}")));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot connect"),
        "{}",
        text(&out)
    );
}

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Minimal HTTP/1.0 GET: `(status, body)`, or `None` if nothing answers.
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let resp = String::from_utf8_lossy(&buf);
    let (head, body) = resp.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// Polls `f` until it returns `Some`, or `None` once `deadline` passed.
fn poll_until<T>(deadline: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Opens rounds with `start` until `answered` sees members answer: the
/// gateway subscribes to a group only after its members attached, and a
/// challenge queued before that never reaches them (nothing outside the
/// gateway shows the subscription, so a round that found nobody is
/// followed by another).
fn start_rounds_until_answered(mut start: impl FnMut(), mut answered: impl FnMut() -> bool) {
    for _ in 0..8 {
        start();
        if poll_until(Duration::from_secs(15), || answered().then_some(())).is_some() {
            return;
        }
    }
    panic!("8 rounds and no member answered");
}

/// Polls `f` until it returns `Some` or `deadline` passes.
fn wait_for<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Writes the development PKI with `dapgw keys dev-pki`, readable by the
/// container user.
fn dev_pki(dir: &Path) {
    let out = run(Command::new(env!("CARGO_BIN_EXE_dapgw"))
        .args(["keys", "dev-pki", "--out"])
        .arg(dir)
        .args(["--client", "gw-test"]));
    assert_ok("dapgw keys dev-pki", &out);
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        // Test keys only: the container runs as 65532.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
}

#[test]
fn container_image_runs_gateway() {
    let Some(podman_bin) = test_image() else {
        return;
    };
    let pki = tempfile::tempdir().unwrap();
    dev_pki(pki.path());
    let admin = free_port();
    let listen = free_port();
    let unreachable = free_port();
    let name = format!("dapgw-test-{}", std::process::id());
    let volume = format!("{name}-spool");
    let drain_ms = 3000;
    let out = run(podman(&podman_bin)
        .args(["run", "-d", "--name", &name, "--runtime", "runc"])
        .args([
            "--ulimit",
            "nofile=20000:20000",
            "--ulimit",
            "nproc=1024:1024",
        ])
        .args(["--network", "host", "--read-only", "--cap-drop=ALL"])
        .args(["--security-opt", "no-new-privileges", "--tmpfs", "/tmp"])
        .arg("-v")
        .arg(format!("{}:/etc/dapgw/tls:ro", pki.path().display()))
        .arg("-v")
        .arg(format!("{volume}:/var/lib/dapgw"))
        .arg("-e")
        .arg(format!(
            "DAPGW_UPSTREAM_URL=https://127.0.0.1:{unreachable}"
        ))
        .args(["-e", "DAPGW_UPSTREAM_CA=/etc/dapgw/tls/ca.pem"])
        .args([
            "-e",
            "DAPGW_UPSTREAM_CLIENT_CERT=/etc/dapgw/tls/client-gw-test.pem",
        ])
        .args([
            "-e",
            "DAPGW_UPSTREAM_CLIENT_KEY=/etc/dapgw/tls/client-gw-test.key",
        ])
        .args(["-e", "DAPGW_GATEWAY_ID=gw-test"])
        .args(["-e", "DAPGW_TLS_CERT=/etc/dapgw/tls/server.pem"])
        .args(["-e", "DAPGW_TLS_KEY=/etc/dapgw/tls/server.key"])
        .arg("-e")
        .arg(format!("DAPGW_LISTEN=127.0.0.1:{listen}"))
        .arg("-e")
        .arg(format!("DAPGW_ADMIN_LISTEN=127.0.0.1:{admin}"))
        .arg("-e")
        .arg(format!("DAPGW_DRAIN_GRACE_MS={drain_ms}"))
        .args(["-e", "DAPGW_LOG_FORMAT=json"])
        .arg(TEST_IMAGE));
    assert_ok("podman run -d (gateway)", &out);
    // Remove the container and its volume whatever happens below.
    struct Cleanup(PathBuf, String, String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = podman(&self.0).args(["rm", "-f", &self.1]).output();
            let _ = podman(&self.0)
                .args(["volume", "rm", "-f", &self.2])
                .output();
        }
    }
    let _cleanup = Cleanup(podman_bin.clone(), name.clone(), volume.clone());

    let admin_addr: SocketAddr = ([127, 0, 0, 1], admin).into();
    wait_for("/healthz 200", Duration::from_secs(30), || {
        let up = http_get(admin_addr, "/healthz").filter(|(s, _)| *s == 200);
        if up.is_none() {
            // Fail at once, with the log, if the gateway has exited.
            let state =
                run(podman(&podman_bin).args(["inspect", "--format", "{{.State.Running}}", &name]));
            if String::from_utf8_lossy(&state.stdout).trim() == "false" {
                let logs = run(podman(&podman_bin).args(["logs", &name]));
                panic!("the gateway container exited:\n{}", text(&logs));
            }
        }
        up
    });
    // The image's HEALTHCHECK passes.
    let out = run(podman(&podman_bin).args(["healthcheck", "run", &name]));
    assert_ok("podman healthcheck run", &out);
    // Not ready: the upstream cannot be reached.
    let (status, body) = http_get(admin_addr, "/readyz").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("upstream"), "{body}");
    // /metrics is served and says the upstream is down.
    let (status, page) = http_get(admin_addr, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(page.contains("dapgw_upstream_up 0"), "{page}");
    if let Some(promtool) = require("promtool", "apt-get install prometheus") {
        let mut child = Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(page.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert_ok("promtool check metrics (container)", &out);
    }
    // SIGTERM (the image's STOPSIGNAL) drains and exits 0 within the grace.
    let start = Instant::now();
    let out = run(podman(&podman_bin).args(["stop", "--time", "30", &name]));
    assert_ok("podman stop", &out);
    let elapsed = start.elapsed();
    let out = run(podman(&podman_bin).args(["inspect", "--format", "{{.State.ExitCode}}", &name]));
    assert_ok("podman inspect", &out);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0",
        "exit code after SIGTERM; logs:\n{}",
        text(&run(podman(&podman_bin).args(["logs", &name])))
    );
    assert!(
        elapsed < Duration::from_millis(drain_ms + 5000),
        "stop took {elapsed:?}, drain grace {drain_ms} ms"
    );
    let logs = run(podman(&podman_bin).args(["logs", &name]));
    for line in String::from_utf8_lossy(&logs.stderr).lines() {
        assert!(
            serde_json::from_str::<Value>(line).is_ok(),
            "DAPGW_LOG_FORMAT=json but a log line is not JSON: {line}"
        );
    }
}

/// Containers and volumes a test started, removed whatever happens.
struct Containers {
    podman: PathBuf,
    names: Vec<String>,
    volumes: Vec<String>,
}

impl Drop for Containers {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = podman(&self.podman).args(["rm", "-f", n]).output();
        }
        for v in &self.volumes {
            let _ = podman(&self.podman)
                .args(["volume", "rm", "-f", v])
                .output();
        }
    }
}

impl Containers {
    /// `podman run -d` of TEST_IMAGE as `name`, with the image's runtime
    /// restrictions (read-only root, no capability), host networking, the
    /// given `-v` mounts and `-e` variables, and `args` as the command.
    fn start(&mut self, name: &str, mounts: &[String], env: &[String], args: &[&str]) {
        let mut cmd = podman(&self.podman);
        cmd.args(["run", "-d", "--name", name, "--runtime", "runc"])
            .args([
                "--ulimit",
                "nofile=20000:20000",
                "--ulimit",
                "nproc=1024:1024",
            ])
            .args(["--network", "host", "--read-only", "--cap-drop=ALL"])
            .args(["--security-opt", "no-new-privileges", "--tmpfs", "/tmp"]);
        for m in mounts {
            cmd.arg("-v").arg(m);
        }
        for e in env {
            cmd.arg("-e").arg(e);
        }
        self.names.push(name.to_string());
        let out = run(cmd.arg(TEST_IMAGE).args(args));
        assert_ok(&format!("podman run -d ({name})"), &out);
    }

    /// A named volume, removed at the end.
    fn volume(&mut self, name: &str) -> String {
        self.volumes.push(name.to_string());
        name.to_string()
    }

    fn logs(&self, name: &str) -> String {
        text(&run(podman(&self.podman).args(["logs", name])))
    }

    /// Panics with the container's log if it is not running.
    fn alive(&self, name: &str) {
        let out =
            run(podman(&self.podman).args(["inspect", "--format", "{{.State.Running}}", name]));
        if String::from_utf8_lossy(&out.stdout).trim() != "true" {
            panic!("container {name} is not running:\n{}", self.logs(name));
        }
    }

    /// `podman stop` (the image's STOPSIGNAL, SIGTERM); asserts exit code 0
    /// well before the 30 s stop timeout would have killed it.
    fn stop_exits_0(&self, name: &str) {
        let start = Instant::now();
        let out = run(podman(&self.podman).args(["stop", "--time", "30", name]));
        assert_ok(&format!("podman stop {name}"), &out);
        let elapsed = start.elapsed();
        let out =
            run(podman(&self.podman).args(["inspect", "--format", "{{.State.ExitCode}}", name]));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "0",
            "{name}: exit code after SIGTERM; logs:\n{}",
            self.logs(name)
        );
        assert!(
            elapsed < Duration::from_secs(20),
            "{name}: stop took {elapsed:?}"
        );
    }
}

/// Makes `dir` and everything in it readable by the container user (test
/// key material only: the containers run as 65532).
fn readable_by_all(dir: &Path) {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            readable_by_all(&p);
        } else {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
}

/// The same image runs `dapgw udc` and `dapgw sim`: a UDC container (keys
/// and the development PKI mounted read-only, a volume for its store)
/// turns healthy; a gateway container and a `sim` container carry a round
/// to it, and the UDC's /metrics counts the members authenticated; each
/// exits 0 on SIGTERM.
#[test]
fn container_image_runs_udc_and_sim() {
    let Some(podman_bin) = test_image() else {
        return;
    };
    let bin = env!("CARGO_BIN_EXE_dapgw");
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (pki, keys, secrets) = (t.join("pki"), t.join("keys"), t.join("secrets"));
    std::fs::create_dir(&secrets).unwrap();
    let creds = secrets.join("members.json");
    for args in [
        vec![
            "keys",
            "dev-pki",
            "--out",
            pki.to_str().unwrap(),
            "--client",
            "gw-c",
        ],
        vec!["keys", "init", "--out", keys.to_str().unwrap()],
        vec![
            "keys",
            "members",
            "--keys",
            keys.to_str().unwrap(),
            "--from",
            "1",
            "--count",
            "20",
            "--groups",
            "3",
            "--out",
            creds.to_str().unwrap(),
        ],
    ] {
        assert_ok(
            &format!("dapgw {args:?}"),
            &run(Command::new(bin).args(&args)),
        );
    }
    let token = secrets.join("admin-token");
    std::fs::write(&token, format!("token-{}", std::process::id())).unwrap();
    readable_by_all(t);

    let id = std::process::id();
    let (udc_name, gw_name, sim_name) = (
        format!("dapgw-udc-{id}"),
        format!("dapgw-gw-{id}"),
        format!("dapgw-sim-{id}"),
    );
    let mut c = Containers {
        podman: podman_bin.clone(),
        names: Vec::new(),
        volumes: Vec::new(),
    };
    let (udc_port, udc_admin, listen, admin) = (free_port(), free_port(), free_port(), free_port());
    let udc_admin_addr = SocketAddr::from(([127, 0, 0, 1], udc_admin));
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], admin));
    let ro = |host: &Path, at: &str| format!("{}:{at}:ro", host.display());
    let pki_ro = ro(&pki, "/etc/dapgw/pki");

    // The UDC, configured as compose.yaml configures it.
    let udc_data = c.volume(&format!("{udc_name}-data"));
    c.start(
        &udc_name,
        &[
            pki_ro.clone(),
            ro(&keys, "/etc/dapgw/keys"),
            ro(&secrets, "/etc/dapgw/secrets"),
            format!("{udc_data}:/var/lib/dapgw"),
        ],
        &[
            format!("DAPGW_LISTEN=127.0.0.1:{udc_port}"),
            format!("DAPGW_ADMIN_LISTEN=127.0.0.1:{udc_admin}"),
            "DAPGW_ADMIN_TOKEN_FILE=/etc/dapgw/secrets/admin-token".into(),
            "DAPGW_TLS_CERT=/etc/dapgw/pki/server.pem".into(),
            "DAPGW_TLS_KEY=/etc/dapgw/pki/server.key".into(),
            "DAPGW_CLIENT_CA=/etc/dapgw/pki/ca.pem".into(),
            "DAPGW_STORE_URL=sqlite:///var/lib/dapgw/udc.sqlite3".into(),
            "DAPGW_MASTER_SECRET_FILE=/etc/dapgw/keys/master.key".into(),
            "DAPGW_STORAGE_KEY_FILE=/etc/dapgw/keys/storage.key".into(),
            "DAPGW_SIGNING_KEY_FILE=/etc/dapgw/keys/signing.key".into(),
            "DAPGW_KEY_CERT_FILE=/etc/dapgw/keys/signing.cert".into(),
            "DAPGW_LOG_FORMAT=json".into(),
        ],
        &["udc"],
    );
    wait_for("the UDC's /readyz 200", Duration::from_secs(60), || {
        c.alive(&udc_name);
        http_get(udc_admin_addr, "/readyz").filter(|(s, _)| *s == 200)
    });
    // The image's HEALTHCHECK passes for the UDC too.
    let out = run(podman(&podman_bin).args(["healthcheck", "run", &udc_name]));
    assert_ok("podman healthcheck run (udc)", &out);

    // The operator registers the members (host binary, as an operator's
    // machine would).
    let operator = |args: &[&str]| {
        let out = run(Command::new(bin)
            .arg("udc")
            .args(args)
            .arg("--admin")
            .arg(udc_admin_addr.to_string())
            .arg("--token-file")
            .arg(&token));
        assert_ok(&format!("dapgw udc {args:?}"), &out);
    };
    operator(&[
        "members",
        "--import",
        &format!("{}.import.json", creds.display()),
    ]);

    // A gateway to it, then simulated members behind the gateway.
    let spool = c.volume(&format!("{gw_name}-spool"));
    c.start(
        &gw_name,
        &[pki_ro.clone(), format!("{spool}:/var/lib/dapgw")],
        &[
            format!("DAPGW_UPSTREAM_URL=https://127.0.0.1:{udc_port}"),
            "DAPGW_UPSTREAM_CA=/etc/dapgw/pki/ca.pem".into(),
            "DAPGW_UPSTREAM_CLIENT_CERT=/etc/dapgw/pki/client-gw-c.pem".into(),
            "DAPGW_UPSTREAM_CLIENT_KEY=/etc/dapgw/pki/client-gw-c.key".into(),
            "DAPGW_GATEWAY_ID=gw-c".into(),
            "DAPGW_TLS_CERT=/etc/dapgw/pki/server.pem".into(),
            "DAPGW_TLS_KEY=/etc/dapgw/pki/server.key".into(),
            format!("DAPGW_LISTEN=127.0.0.1:{listen}"),
            format!("DAPGW_ADMIN_LISTEN=127.0.0.1:{admin}"),
            "DAPGW_DRAIN_GRACE_MS=3000".into(),
        ],
        &["gateway"],
    );
    wait_for("the gateway's /readyz 200", Duration::from_secs(60), || {
        c.alive(&gw_name);
        http_get(admin_addr, "/readyz").filter(|(s, _)| *s == 200)
    });
    let sim_state = c.volume(&format!("{sim_name}-state"));
    let gateway_url = format!("https://127.0.0.1:{listen}");
    c.start(
        &sim_name,
        &[
            pki_ro,
            ro(&secrets, "/etc/dapgw/secrets"),
            format!("{sim_state}:/var/lib/dapgw"),
        ],
        &[],
        &[
            "sim",
            "--gateway",
            &gateway_url,
            "--ca",
            "/etc/dapgw/pki/ca.pem",
            "--credentials",
            "/etc/dapgw/secrets/members.json",
            "--state-dir",
            "/var/lib/dapgw/sim",
        ],
    );
    wait_for("members attached", Duration::from_secs(60), || {
        c.alive(&sim_name);
        (sample(&metrics(admin_addr), "dapgw_members_connected", "") > 0.0).then_some(())
    });
    start_rounds_until_answered(
        || {
            operator(&[
                "round",
                "start",
                "--group",
                "3",
                "--mode",
                "psk",
                "--purpose",
                "read",
                "--read-request",
                "01",
            ])
        },
        || {
            sample(
                &metrics(udc_admin_addr),
                "dapgw_udc_members_authenticated_total",
                "",
            ) > 0.0
        },
    );

    // SIGTERM: every role exits 0.
    for name in [&sim_name, &gw_name, &udc_name] {
        c.stop_exits_0(name);
    }
}

// ---------------------------------------------------------------------------
// Live: a real Prometheus scraping a real gateway and UDC under sim traffic
// ---------------------------------------------------------------------------

/// A child process killed when the guard drops.
struct Proc(String, Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.1.kill();
        let _ = self.1.wait();
    }
}

impl Proc {
    fn spawn(what: &str, cmd: &mut Command, log: &Path) -> Proc {
        let f = std::fs::File::create(log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what}: {e}"));
        Proc(what.to_string(), child)
    }

    /// Panics with the log if the process has exited.
    fn alive(&mut self, log: &Path) {
        if let Some(status) = self.1.try_wait().unwrap() {
            panic!(
                "{} exited with {status}:\n{}",
                self.0,
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Runs an instant query; `Err` on an HTTP or PromQL error, else the
/// number of series in the result.
fn prom_query(prom: SocketAddr, promql: &str) -> Result<usize, String> {
    let (status, body) = http_get(prom, &format!("/api/v1/query?query={}", urlencode(promql)))
        .ok_or("prometheus did not answer")?;
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("{status}: {e}: {body}"))?;
    if v["status"] != "success" {
        return Err(format!("{status}: {body}"));
    }
    Ok(v["data"]["result"].as_array().map_or(1, Vec::len))
}

/// Every vector selector `dapgw_x{...}` or `dapgw_x` in `promql`.
fn selectors(promql: &str) -> Vec<String> {
    let mut out = Vec::new();
    for t in metric_tokens(promql) {
        let mut from = 0;
        while let Some(at) = promql[from..].find(&t) {
            let start = from + at;
            let end = start + t.len();
            from = end;
            let next = promql.as_bytes().get(end).copied();
            if next.is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_') {
                continue;
            }
            let sel = if next == Some(b'{') {
                let close = promql[end..].find('}').unwrap() + end;
                &promql[start..=close]
            } else {
                &promql[start..end]
            };
            out.push(sel.to_string());
        }
    }
    out.sort();
    out.dedup();
    out
}

#[test]
fn selectors_are_found() {
    assert_eq!(
        selectors("sum(rate(dapgw_a_total{x=\"1\"}[5m])) / sum(dapgw_b) + dapgw_a_total_x"),
        ["dapgw_a_total_x", "dapgw_a_total{x=\"1\"}", "dapgw_b"]
    );
}

// ---------------------------------------------------------------------------
// The compose stack, run as host processes
// ---------------------------------------------------------------------------

/// deploy/compose.yaml as `docker-compose config` resolves it (anchors,
/// merges, defaults), converted to JSON by the YAML module docker-compose
/// itself runs on; `None` after a skip message where either is missing.
fn compose_json() -> Option<Value> {
    let dc = require("docker-compose", "apt-get install docker-compose")?;
    let python = require("python3", "apt-get install python3-yaml")?;
    let out = run(Command::new(dc)
        .args(["-f", "deploy/compose.yaml", "config"])
        .current_dir(root()));
    assert_ok("docker-compose config", &out);
    let mut child = Command::new(python)
        .args([
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&out.stdout).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_ok("python3 yaml -> json", &out);
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

/// `(volume, container path, writable)` of each named-volume mount.
fn mounts(svc: &Value) -> Vec<(String, String, bool)> {
    svc["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| {
            let mut parts = v.as_str()?.split(':');
            let (vol, path) = (parts.next()?, parts.next()?);
            // Bind mounts (prometheus, grafana) start with a path.
            (!vol.starts_with(['.', '/'])).then(|| {
                (
                    vol.to_string(),
                    path.to_string(),
                    parts.next() != Some("ro"),
                )
            })
        })
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|s| s.as_str().expect("a string").to_string())
        .collect()
}

fn is_dapgw(svc: &Value) -> bool {
    svc["image"] == "localhost/dapgw:dev"
}

/// The image's `ENV` settings and its `HEALTHCHECK` command, read from
/// deploy/Dockerfile, so the host run sees what a container sees.
fn image_env_and_healthcheck() -> (Vec<(String, String)>, Vec<String>) {
    let dockerfile = read("deploy/Dockerfile");
    let env = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("ENV "))
        .map(|kv| {
            let (k, v) = kv.split_once('=').expect("ENV K=V");
            (k.to_string(), v.to_string())
        })
        .collect();
    let joined = dockerfile.replace("\\\n", " ");
    let hc = joined
        .lines()
        .find(|l| l.starts_with("HEALTHCHECK"))
        .expect("HEALTHCHECK");
    let cmd = &hc[hc.find("CMD [").expect("exec-form CMD") + 4..];
    (env, serde_json::from_str(cmd.trim()).unwrap())
}

/// Every path a dapgw service writes lies in a writable volume (the
/// image's root filesystem is read-only), and every port it exposes is
/// bound by a variable of its own (not by a default nobody sees).
#[test]
fn compose_services_name_their_ports_and_paths() {
    let Some(compose) = compose_json() else {
        return;
    };
    let mut checked = 0;
    for (name, svc) in compose["services"].as_object().unwrap() {
        if !is_dapgw(svc) {
            continue;
        }
        let cmd = strings(&svc["command"]);
        let env = &svc["environment"];
        for port in strings(&svc["expose"]) {
            let bound = format!("0.0.0.0:{port}");
            assert!(
                env.as_object()
                    .is_some_and(|e| e.values().any(|v| v == bound.as_str())),
                "{name}: exposes {port} but no variable binds {bound}"
            );
        }
        let mut written = Vec::new();
        match cmd.first().map(String::as_str) {
            Some("gateway") => written.push(
                env["DAPGW_SPOOL_DIR"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{name}: set DAPGW_SPOOL_DIR explicitly"))
                    .to_string(),
            ),
            Some("udc") if cmd.len() == 1 => written.push(
                env["DAPGW_STORE_URL"]
                    .as_str()
                    .and_then(|u| u.strip_prefix("sqlite://"))
                    .unwrap_or_else(|| panic!("{name}: a sqlite:// DAPGW_STORE_URL"))
                    .to_string(),
            ),
            Some("sim") => {
                let at = cmd
                    .iter()
                    .position(|a| a == "--state-dir")
                    .unwrap_or_else(|| panic!("{name}: sim needs --state-dir (cwd is /)"));
                written.push(cmd[at + 1].clone());
            }
            Some("keys") => {
                let at = cmd.iter().position(|a| a == "--out").unwrap();
                written.push(cmd[at + 1].clone());
            }
            _ => continue,
        }
        let mounts = mounts(svc);
        for path in written {
            assert!(
                mounts
                    .iter()
                    .any(|(_, m, rw)| *rw && Path::new(&path).starts_with(m)),
                "{name}: {path} is not in a writable volume ({mounts:?})"
            );
            checked += 1;
        }
    }
    assert!(checked >= 8, "only {checked} paths checked");

    // A named volume takes the ownership of the first image mounting it: a
    // service of another image (busybox) that shares a volume with dapgw
    // services starts only after a dapgw service that mounts it.
    let services = compose["services"].as_object().unwrap();
    let deps = |name: &str| -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![name.to_string()];
        while let Some(n) = todo.pop() {
            for (d, _) in services[&n]["depends_on"].as_object().into_iter().flatten() {
                if seen.insert(d.clone()) {
                    todo.push(d.clone());
                }
            }
        }
        seen
    };
    for (name, svc) in services {
        if is_dapgw(svc) {
            continue;
        }
        for (vol, _, _) in mounts(svc) {
            let shared = services
                .values()
                .any(|o| is_dapgw(o) && mounts(o).iter().any(|m| m.0 == vol));
            if shared {
                assert!(
                    deps(name).iter().any(|d| is_dapgw(&services[d])
                        && mounts(&services[d]).iter().any(|m| m.0 == vol)),
                    "{name} may create volume {vol} before a dapgw service does"
                );
            }
        }
    }
}

/// One compose service started on this host: its admin address (if it
/// exposes 9090), its environment and the image's health check.
struct HostService {
    env: Vec<(String, String)>,
    admin: Option<SocketAddr>,
}

/// Runs the dapgw services of deploy/compose.yaml as host processes, with
/// their exact commands and environment; only host names, listen ports and
/// volume paths are mapped onto this host (each `service:port` and each
/// service's `0.0.0.0:port` to a free loopback port, each named volume to a
/// directory).
struct HostStack {
    dir: PathBuf,
    /// `service:port` -> loopback port.
    ports: BTreeMap<String, u16>,
    services: BTreeMap<String, HostService>,
    procs: Vec<Proc>,
    logs: BTreeMap<String, PathBuf>,
    healthcheck: Vec<String>,
}

impl HostStack {
    /// Maps container names and paths of `service` onto this host.
    fn rewrite(&self, service: &str, svc: &Value, s: &str) -> String {
        let mut out = s.to_string();
        for (key, port) in &self.ports {
            out = out.replace(key.as_str(), &format!("127.0.0.1:{port}"));
            let (owner, p) = key.split_once(':').unwrap();
            if owner == service {
                out = out.replace(&format!("0.0.0.0:{p}"), &format!("127.0.0.1:{port}"));
            }
        }
        let mut mounts = mounts(svc);
        mounts.sort_by_key(|m| std::cmp::Reverse(m.1.len()));
        for (vol, path, _) in mounts {
            if out.contains(&path) {
                let host = self.dir.join("volumes").join(&vol);
                out = out.replace(&path, &host.display().to_string());
            }
        }
        out
    }

    /// The `argv` of `svc` on this host: the dapgw binary under test for
    /// the dapgw image, the command itself (a `sh -c` one-shot) otherwise.
    fn command(&self, name: &str, svc: &Value) -> Command {
        self.command_with(name, svc, &strings(&svc["command"]))
    }

    /// [`command`](Self::command) with other arguments, in the same
    /// environment.
    fn command_with(&self, name: &str, svc: &Value, args: &[String]) -> Command {
        let args: Vec<String> = args.iter().map(|a| self.rewrite(name, svc, a)).collect();
        let mut cmd = if is_dapgw(svc) {
            let mut c = Command::new(env!("CARGO_BIN_EXE_dapgw"));
            c.args(&args);
            c
        } else {
            assert_eq!(args[0], "sh", "{name}: only sh one-shots run on the host");
            let mut c = Command::new("sh");
            c.args(&args[1..]);
            c
        };
        for (k, _) in std::env::vars() {
            if k.starts_with("DAPGW_") {
                cmd.env_remove(k);
            }
        }
        for (k, v) in &self.services[name].env {
            cmd.env(k, v);
        }
        // cwd is / in the image: a relative path would land nowhere useful.
        let cwd = self.dir.join("cwd").join(name);
        std::fs::create_dir_all(&cwd).unwrap();
        cmd.current_dir(cwd);
        cmd
    }

    /// Starts every dapgw service (and `sh` one-shot) in dependency order:
    /// one-shots run to completion, the others are waited for until the
    /// image's health check passes when a later service depends on it.
    fn up(dir: &Path, compose: &Value) -> HostStack {
        let services = compose["services"].as_object().unwrap();
        let (image_env, healthcheck) = image_env_and_healthcheck();
        let runs_here = |svc: &Value| {
            is_dapgw(svc) || strings(&svc["command"]).first().is_some_and(|c| c == "sh")
        };
        let mut ports = BTreeMap::new();
        for (name, svc) in services {
            if runs_here(svc) {
                for p in strings(&svc["expose"]) {
                    ports.insert(format!("{name}:{p}"), free_port());
                }
            }
        }
        let mut stack = HostStack {
            dir: dir.to_path_buf(),
            ports,
            services: BTreeMap::new(),
            procs: Vec::new(),
            logs: BTreeMap::new(),
            healthcheck,
        };
        for (name, svc) in services {
            if !runs_here(svc) {
                continue;
            }
            for (vol, _, _) in mounts(svc) {
                std::fs::create_dir_all(dir.join("volumes").join(vol)).unwrap();
            }
            let mut env = if is_dapgw(svc) {
                image_env.clone()
            } else {
                Vec::new()
            };
            for (k, v) in svc["environment"].as_object().into_iter().flatten() {
                env.retain(|e| &e.0 != k);
                env.push((k.clone(), v.as_str().unwrap().to_string()));
            }
            let env = env
                .into_iter()
                .map(|(k, v)| (k, stack.rewrite(name, svc, &v)))
                .collect::<Vec<_>>();
            let admin = stack
                .ports
                .get(&format!("{name}:9090"))
                .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)));
            stack
                .services
                .insert(name.clone(), HostService { env, admin });
        }
        // Dependency order; ties by name.
        let mut done = BTreeSet::new();
        while done.len() < stack.services.len() {
            let next = stack
                .services
                .keys()
                .find(|n| {
                    !done.contains(*n)
                        && services[n.as_str()]["depends_on"]
                            .as_object()
                            .into_iter()
                            .flatten()
                            .all(|(d, _)| done.contains(d) || !stack.services.contains_key(d))
                })
                .unwrap_or_else(|| panic!("a dependency cycle or an unknown service"))
                .clone();
            let svc = &services[&next];
            for (dep, cond) in svc["depends_on"].as_object().into_iter().flatten() {
                if cond["condition"] == "service_healthy" {
                    stack.wait_healthy(dep);
                }
            }
            let log = dir.join(format!("{next}.log"));
            let mut cmd = stack.command(&next, svc);
            if svc["restart"] == "no" {
                let out = run(&mut cmd);
                std::fs::write(&log, text(&out)).unwrap();
                assert_ok(&format!("compose one-shot `{next}` ({cmd:?})"), &out);
            } else {
                stack.procs.push(Proc::spawn(&next, &mut cmd, &log));
            }
            stack.logs.insert(next.clone(), log);
            done.insert(next);
        }
        stack
    }

    /// Runs the image's HEALTHCHECK command in `name`'s environment until
    /// it passes, as `depends_on: condition: service_healthy` does.
    fn wait_healthy(&mut self, name: &str) {
        let args = self.healthcheck[1..].to_vec();
        let env = self.services[name].env.clone();
        wait_for(&format!("{name} healthy"), Duration::from_secs(90), || {
            self.alive();
            let mut c = Command::new(env!("CARGO_BIN_EXE_dapgw"));
            c.args(&args).env_clear().envs(env.iter().cloned());
            run(&mut c).status.success().then_some(())
        });
    }

    /// Panics with its log if a long-running service has exited.
    fn alive(&mut self) {
        for p in &mut self.procs {
            let log = self.logs.get(&p.0).cloned().unwrap_or_default();
            p.alive(&log);
        }
    }

    fn admin(&self, name: &str) -> SocketAddr {
        self.services[name].admin.expect("an admin listener")
    }
}

#[test]
fn live_prometheus_scrapes_gateway_and_udc_under_sim_traffic() {
    let Some(prometheus) = require("prometheus", "apt-get install prometheus") else {
        return;
    };
    let Some(promtool) = require("promtool", "apt-get install prometheus") else {
        return;
    };
    let Some(compose) = compose_json() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let started = Instant::now();
    let mut stack = HostStack::up(t, &compose);
    eprintln!("compose stack up on this host in {:?}", started.elapsed());
    let gateways: Vec<String> = stack
        .services
        .keys()
        .filter(|n| n.starts_with("gateway-"))
        .cloned()
        .collect();
    assert_eq!(gateways.len(), 2, "{gateways:?}");

    // Prometheus with the stack's own scrape config and rules: only the
    // addresses are mapped, and it scrapes every second.
    let prom_port = free_port();
    let prom_dir = t.join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    std::fs::copy(
        root().join("deploy/prometheus/alerts.yml"),
        prom_dir.join("alerts.yml"),
    )
    .unwrap();
    let mut cfg = read("deploy/prometheus/prometheus.yml")
        .replace("scrape_interval: 15s", "scrape_interval: 1s")
        .replace("evaluation_interval: 15s", "evaluation_interval: 1s")
        .replace("localhost:9090", &format!("127.0.0.1:{prom_port}"));
    for (key, port) in &stack.ports {
        cfg = cfg.replace(&format!("\"{key}\""), &format!("\"127.0.0.1:{port}\""));
    }
    for name in stack.services.keys() {
        assert!(
            !cfg.contains(&format!("\"{name}:")),
            "a target of {name} is not mapped:\n{cfg}"
        );
    }
    let cfg_file = prom_dir.join("prometheus.yml");
    std::fs::write(&cfg_file, &cfg).unwrap();
    let out = run(Command::new(&promtool)
        .args(["check", "config"])
        .arg(&cfg_file));
    assert_ok("promtool check config (live)", &out);
    let prom_log = t.join("prometheus.log");
    let mut prom = Proc::spawn(
        "prometheus",
        Command::new(prometheus)
            .arg(format!("--config.file={}", cfg_file.display()))
            .arg(format!("--storage.tsdb.path={}", t.join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}")),
        &prom_log,
    );
    let prom_addr: SocketAddr = ([127, 0, 0, 1], prom_port).into();

    // An operator's ad-hoc round next to the compose file's schedule, as
    // deploy/README.md shows it (`udc round start` in the `rounds` service).
    let rounds = &compose["services"]["rounds"];
    let mut argv = strings(&rounds["command"]);
    let at = argv.iter().position(|a| a == "schedule").unwrap();
    argv.truncate(at);
    argv.extend(
        [
            "start",
            "--group",
            "1",
            "--mode",
            "psk",
            "--purpose",
            "auth",
        ]
        .map(String::from),
    );
    let admin_args: Vec<String> = strings(&rounds["command"])
        .windows(2)
        .filter(|w| w[0] == "--admin" || w[0] == "--token-file")
        .flat_map(|w| w.to_vec())
        .collect();
    argv.extend(admin_args);
    let udc_admin = stack.admin("udc");
    start_rounds_until_answered(
        || {
            let out = run(&mut stack.command_with("rounds", rounds, &argv));
            assert_ok("dapgw udc round start", &out);
            assert!(
                String::from_utf8_lossy(&out.stdout).contains("\"round\""),
                "{}",
                text(&out)
            );
        },
        || {
            let page = metrics(udc_admin);
            sample(
                &page,
                "dapgw_udc_members_authenticated_total",
                "mode=\"psk\"",
            ) > 0.0
        },
    );

    // Wait until every target has been scraped for a while and members
    // have produced traffic through both gateways to the UDC.
    let traffic = Instant::now();
    wait_for(
        "traffic seen by prometheus",
        Duration::from_secs(240),
        || {
            stack.alive();
            prom.alive(&prom_log);
            let ok = |q: &str| prom_query(prom_addr, q).is_ok_and(|n| n > 0);
            let per_gateway = |q: &str| prom_query(prom_addr, q).is_ok_and(|n| n == 2);
            (ok("count_over_time(up{job=\"dapgw-udc\"}[1m]) > 20")
                && per_gateway("count_over_time(up{job=\"dapgw-gateway\"}[1m]) > 20")
                && ok("increase(dapgw_udc_members_authenticated_total[1m]) > 0")
                && ok("increase(dapgw_udc_readings_total[1m]) > 0")
                && per_gateway(
                    "sum by (instance) (increase(dapgw_batches_total{outcome=\"ok\"}[1m])) > 0",
                ))
            .then_some(())
        },
    );
    eprintln!(
        "traffic through both gateways after {:?}",
        traffic.elapsed()
    );

    // promtool check metrics on every real page.
    let mut pages = vec!["udc".to_string()];
    pages.extend(gateways.iter().cloned());
    for name in &pages {
        let (status, page) = http_get(stack.admin(name), "/metrics").unwrap();
        assert_eq!(status, 200, "{name} /metrics");
        let mut child = Command::new(&promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(page.as_bytes())
            .unwrap();
        assert_ok(
            &format!("promtool check metrics ({name})"),
            &child.wait_with_output().unwrap(),
        );
        if name.starts_with("gateway-") {
            // The limit the spool alerts compare against: the default.
            let max = GatewayConfig::default().spool_max_bytes.get();
            assert!(
                page.contains(&format!("\ndapgw_spool_max_bytes {max}\n")),
                "{name}: dapgw_spool_max_bytes"
            );
        }
    }

    // Every dashboard expression returns data, for all instances and, on
    // the gateway dashboard, for each gateway alone too (its instance
    // variable set to that gateway's scrape target).
    let mut failures = Vec::new();
    let mut checked = 0;
    for (name, d) in dashboards() {
        let mut instances = vec![".+".to_string()];
        if name.contains("gateway") {
            for gw in ["gateway-1", "gateway-2"] {
                instances.push(stack.admin(gw).to_string());
            }
        }
        for e in panel_exprs(&name, &d)
            .into_iter()
            .chain(variable_exprs(&name, &d))
        {
            for instance in &instances {
                let q = substitute_instance(&e.promql, "30s", instance);
                checked += 1;
                match prom_query(prom_addr, &q) {
                    Ok(0) => failures.push(format!("{}: empty result for {q}", e.origin)),
                    Ok(_) => {}
                    Err(err) => failures.push(format!("{}: {err}", e.origin)),
                }
            }
        }
    }
    // Every alert expression evaluates, and each series it selects exists
    // (the alert itself is quiet on a healthy site).
    for (name, e) in alert_exprs(&read("deploy/prometheus/alerts.yml")) {
        checked += 1;
        if let Err(err) = prom_query(prom_addr, &e.promql) {
            failures.push(format!("alert {name}: {err}"));
        }
        for sel in selectors(&e.promql) {
            match prom_query(prom_addr, &sel) {
                Ok(0) => failures.push(format!("alert {name}: no series for {sel}")),
                Ok(_) => {}
                Err(err) => failures.push(format!("alert {name}: {sel}: {err}")),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!("{checked} dashboard and alert expressions returned data");
    // No alert fires on the healthy stack.
    let firing = prom_query(prom_addr, "ALERTS{alertstate=\"firing\"}").unwrap();
    assert_eq!(firing, 0, "alerts fire on a healthy stack");
    drop(stack);
}

// ---------------------------------------------------------------------------
// README troubleshooting: what the operator sees, observed
// ---------------------------------------------------------------------------

/// The README troubleshooting row whose first cell starts with `problem`.
fn troubleshooting_row(problem: &str) -> String {
    let readme = read("README.md");
    let at = readme
        .find("### Troubleshooting")
        .expect("README troubleshooting");
    readme[at..]
        .lines()
        .find(|l| l.starts_with(&format!("| {problem}")))
        .unwrap_or_else(|| panic!("README troubleshooting has no row `{problem}`"))
        .to_string()
}

/// `phrase` is in the README row and in what was observed.
fn seen(row: &str, observed: &str, phrase: &str) {
    assert!(row.contains(phrase), "README row lacks `{phrase}`: {row}");
    assert!(
        observed.contains(phrase),
        "README says `{phrase}`, but it was not observed:\n{observed}"
    );
}

/// The value of an unlabelled sample, or the sum of a family's samples
/// whose labels contain `labels`.
fn sample(page: &str, name: &str, labels: &str) -> f64 {
    page.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([' ', '{']) && rest.contains(labels))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A gateway's environment with everything but the upstream fixed.
fn gateway_env(cmd: &mut Command, pki: &Path, listen: u16, admin: u16, spool: &Path) {
    for (k, _) in std::env::vars() {
        if k.starts_with("DAPGW_") {
            cmd.env_remove(k);
        }
    }
    cmd.arg("gateway")
        .env("DAPGW_UPSTREAM_CLIENT_CERT", pki.join("client-gw-1.pem"))
        .env("DAPGW_UPSTREAM_CLIENT_KEY", pki.join("client-gw-1.key"))
        .env("DAPGW_GATEWAY_ID", "gw-1")
        .env("DAPGW_LISTEN", format!("127.0.0.1:{listen}"))
        .env("DAPGW_TLS_CERT", pki.join("server.pem"))
        .env("DAPGW_TLS_KEY", pki.join("server.key"))
        .env("DAPGW_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("DAPGW_SPOOL_DIR", spool)
        .env("DAPGW_DRAIN_GRACE_MS", "1000");
}

fn metrics(admin: SocketAddr) -> String {
    http_get(admin, "/metrics").map(|r| r.1).unwrap_or_default()
}

/// The README's rows for an unreachable upstream and for certificate
/// errors, checked against a real gateway.
#[test]
fn readme_troubleshooting_upstream_and_certificates() {
    let bin = env!("CARGO_BIN_EXE_dapgw");
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (pki, other) = (t.join("pki"), t.join("other-pki"));
    for dir in [&pki, &other] {
        let out = run(Command::new(bin)
            .args(["keys", "dev-pki", "--out"])
            .arg(dir)
            .args(["--client", "gw-1"]));
        assert_ok("dapgw keys dev-pki", &out);
    }

    // Upstream unreachable: nothing listens on the UDC's port.
    let row = troubleshooting_row("upstream unreachable");
    let (listen, admin) = (free_port(), free_port());
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], admin));
    let log = t.join("unreachable.log");
    let mut cmd = Command::new(bin);
    gateway_env(&mut cmd, &pki, listen, admin, &t.join("spool-1"));
    cmd.env(
        "DAPGW_UPSTREAM_URL",
        format!("https://127.0.0.1:{}", free_port()),
    )
    .env("DAPGW_UPSTREAM_CA", pki.join("ca.pem"));
    let mut gw = Proc::spawn("gateway (unreachable upstream)", &mut cmd, &log);
    let observed = wait_for("the upstream warnings", Duration::from_secs(60), || {
        gw.alive(&log);
        let l = std::fs::read_to_string(&log).unwrap();
        (l.contains("downlink pull failed") && l.contains("subscription not sent")).then_some(l)
    });
    let (status, ready) = http_get(admin_addr, "/readyz").unwrap();
    assert_eq!(status, 503);
    let page = metrics(admin_addr);
    let observed = format!("{observed}\n/readyz 503 {ready}\n{page}");
    for phrase in [
        "downlink pull failed; retrying error=connecting to the udc: Connection refused (os error 111)",
        "subscription not sent; retrying",
        "dapgw_upstream_up 0",
        "{\"not_ready\":[\"upstream\"],\"ready\":false}",
    ] {
        seen(&row, &observed, phrase);
    }
    drop(gw);

    // Certificate errors: the "UDC" (here the gateway's own member
    // listener) shows a certificate of another CA.
    let row = troubleshooting_row("certificate errors");
    let (listen, admin) = (free_port(), free_port());
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], admin));
    let log = t.join("bad-ca.log");
    let mut cmd = Command::new(bin);
    gateway_env(&mut cmd, &pki, listen, admin, &t.join("spool-2"));
    cmd.env("DAPGW_UPSTREAM_URL", format!("https://127.0.0.1:{listen}"))
        .env("DAPGW_UPSTREAM_CA", other.join("ca.pem"));
    let mut gw = Proc::spawn("gateway (wrong upstream CA)", &mut cmd, &log);
    let observed = wait_for("the certificate warning", Duration::from_secs(60), || {
        gw.alive(&log);
        let l = std::fs::read_to_string(&log).unwrap();
        l.contains("invalid peer certificate").then_some(l)
    });
    let observed = format!("{observed}\n{}", metrics(admin_addr));
    for phrase in [
        "retrying error=tls handshake with the udc: invalid peer certificate: ",
        "invalid peer certificate: BadSignature",
        "dapgw_upstream_up 0",
    ] {
        seen(&row, &observed, phrase);
    }
}

/// The README's certificate row, second half: the UDC refuses the
/// gateway's client certificate (its `DAPGW_CLIENT_CA` is another CA), as
/// a real UDC and gateway show it.
#[test]
fn readme_troubleshooting_client_certificate_refused() {
    let bin = env!("CARGO_BIN_EXE_dapgw");
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (pki, other, keys) = (t.join("pki"), t.join("other-pki"), t.join("keys"));
    for dir in [&pki, &other] {
        let out = run(Command::new(bin)
            .args(["keys", "dev-pki", "--out"])
            .arg(dir)
            .args(["--client", "gw-1"]));
        assert_ok("dapgw keys dev-pki", &out);
    }
    assert_ok(
        "dapgw keys init",
        &run(Command::new(bin).args(["keys", "init", "--out"]).arg(&keys)),
    );
    let token = t.join("admin-token");
    std::fs::write(&token, "token").unwrap();
    let (udc_port, udc_admin, listen, admin) = (free_port(), free_port(), free_port(), free_port());
    let mut udc_cmd = Command::new(bin);
    for (k, _) in std::env::vars() {
        if k.starts_with("DAPGW_") {
            udc_cmd.env_remove(k);
        }
    }
    udc_cmd
        .arg("udc")
        .env("DAPGW_LISTEN", format!("127.0.0.1:{udc_port}"))
        .env("DAPGW_ADMIN_LISTEN", format!("127.0.0.1:{udc_admin}"))
        .env("DAPGW_ADMIN_TOKEN_FILE", &token)
        .env("DAPGW_TLS_CERT", pki.join("server.pem"))
        .env("DAPGW_TLS_KEY", pki.join("server.key"))
        // Not the CA of the gateway's client certificate.
        .env("DAPGW_CLIENT_CA", other.join("ca.pem"))
        .env(
            "DAPGW_STORE_URL",
            format!("sqlite://{}", t.join("udc.sqlite3").display()),
        )
        .env("DAPGW_MASTER_SECRET_FILE", keys.join("master.key"))
        .env("DAPGW_STORAGE_KEY_FILE", keys.join("storage.key"))
        .env("DAPGW_SIGNING_KEY_FILE", keys.join("signing.key"))
        .env("DAPGW_KEY_CERT_FILE", keys.join("signing.cert"));
    let udc_log = t.join("udc.log");
    let mut udc = Proc::spawn("udc", &mut udc_cmd, &udc_log);
    let udc_admin_addr = SocketAddr::from(([127, 0, 0, 1], udc_admin));
    wait_for("the UDC ready", Duration::from_secs(60), || {
        udc.alive(&udc_log);
        http_get(udc_admin_addr, "/readyz").filter(|(s, _)| *s == 200)
    });

    let row = troubleshooting_row("certificate errors");
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], admin));
    let log = t.join("gateway.log");
    let mut cmd = Command::new(bin);
    gateway_env(&mut cmd, &pki, listen, admin, &t.join("spool"));
    cmd.env(
        "DAPGW_UPSTREAM_URL",
        format!("https://127.0.0.1:{udc_port}"),
    )
    .env("DAPGW_UPSTREAM_CA", pki.join("ca.pem"));
    let mut gw = Proc::spawn("gateway (client certificate refused)", &mut cmd, &log);
    let phrases = [
        "upstream link up",
        "upstream link failed error=connection error",
        "error=http/2 with the udc: operation was canceled",
    ];
    let observed = wait_for("the refusal in the log", Duration::from_secs(90), || {
        gw.alive(&log);
        let l = std::fs::read_to_string(&log).unwrap();
        phrases.iter().all(|p| l.contains(p)).then_some(l)
    });
    for phrase in phrases {
        seen(&row, &observed, phrase);
    }
    // Between attempts the link is down, and the gateway is not ready.
    let page = wait_for("dapgw_upstream_up 0", Duration::from_secs(30), || {
        let page = metrics(admin_addr);
        page.contains("dapgw_upstream_up 0").then_some(page)
    });
    seen(&row, &page, "dapgw_upstream_up 0");
    wait_for("/readyz 503 upstream", Duration::from_secs(30), || {
        http_get(admin_addr, "/readyz").filter(|(s, body)| *s == 503 && body.contains("upstream"))
    });
    // The refusal is the UDC's TLS check, not a crash.
    udc.alive(&udc_log);
}

/// The README's spool-full row (and the recovery its upstream row
/// promises), checked with a real UDC, gateway and members: readings flow,
/// the UDC goes away, a 1 MiB spool fills and pushes members back, the UDC
/// returns and the spool drains.
#[test]
fn readme_troubleshooting_spool_full_and_recovery() {
    let bin = env!("CARGO_BIN_EXE_dapgw");
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (pki, keys, creds) = (t.join("pki"), t.join("keys"), t.join("members.json"));
    for args in [
        vec![
            "keys",
            "dev-pki",
            "--out",
            pki.to_str().unwrap(),
            "--client",
            "gw-1",
        ],
        vec!["keys", "init", "--out", keys.to_str().unwrap()],
        vec![
            "keys",
            "members",
            "--keys",
            keys.to_str().unwrap(),
            "--from",
            "1",
            "--count",
            "50",
            "--groups",
            "7",
            "--out",
            creds.to_str().unwrap(),
        ],
    ] {
        assert_ok(
            &format!("dapgw {args:?}"),
            &run(Command::new(bin).args(&args)),
        );
    }
    let token = t.join("admin-token");
    std::fs::write(&token, format!("token-{}", std::process::id())).unwrap();

    let (udc_port, udc_admin, listen, admin) = (free_port(), free_port(), free_port(), free_port());
    let udc_admin_addr = SocketAddr::from(([127, 0, 0, 1], udc_admin));
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], admin));
    let udc_cmd = || {
        let mut c = Command::new(bin);
        for (k, _) in std::env::vars() {
            if k.starts_with("DAPGW_") {
                c.env_remove(k);
            }
        }
        c.arg("udc")
            .env("DAPGW_LISTEN", format!("127.0.0.1:{udc_port}"))
            .env("DAPGW_ADMIN_LISTEN", format!("127.0.0.1:{udc_admin}"))
            .env("DAPGW_ADMIN_TOKEN_FILE", &token)
            .env("DAPGW_TLS_CERT", pki.join("server.pem"))
            .env("DAPGW_TLS_KEY", pki.join("server.key"))
            .env("DAPGW_CLIENT_CA", pki.join("ca.pem"))
            .env(
                "DAPGW_STORE_URL",
                format!("sqlite://{}", t.join("udc.sqlite3").display()),
            )
            .env("DAPGW_MASTER_SECRET_FILE", keys.join("master.key"))
            .env("DAPGW_STORAGE_KEY_FILE", keys.join("storage.key"))
            .env("DAPGW_SIGNING_KEY_FILE", keys.join("signing.key"))
            .env("DAPGW_KEY_CERT_FILE", keys.join("signing.cert"));
        c
    };
    let udc_log = t.join("udc.log");
    let mut udc = Some(Proc::spawn("udc", &mut udc_cmd(), &udc_log));
    let gw_log = t.join("gateway.log");
    let mut cmd = Command::new(bin);
    gateway_env(&mut cmd, &pki, listen, admin, &t.join("spool"));
    cmd.env(
        "DAPGW_UPSTREAM_URL",
        format!("https://127.0.0.1:{udc_port}"),
    )
    .env("DAPGW_UPSTREAM_CA", pki.join("ca.pem"))
    .env("DAPGW_SPOOL_MAX_BYTES", "1MiB")
    // Every simulated member posts from 127.0.0.1: without this the one
    // source would be held to its share long before the spool is full.
    .env("DAPGW_SPOOL_MAX_BYTES_PER_SOURCE", "0");
    let mut gw = Proc::spawn("gateway", &mut cmd, &gw_log);
    wait_for("gateway ready", Duration::from_secs(60), || {
        gw.alive(&gw_log);
        http_get(admin_addr, "/readyz").filter(|(s, _)| *s == 200)
    });
    let operator = |args: &[&str]| {
        let out = run(Command::new(bin)
            .arg("udc")
            .args(args)
            .arg("--admin")
            .arg(udc_admin_addr.to_string())
            .arg("--token-file")
            .arg(&token));
        assert_ok(&format!("dapgw udc {args:?}"), &out);
    };
    operator(&[
        "members",
        "--import",
        &format!("{}.import.json", creds.display()),
    ]);
    let sim_log = t.join("sim.log");
    let _sim = Proc::spawn(
        "sim",
        Command::new(bin)
            .args(["sim", "--gateway", &format!("https://127.0.0.1:{listen}")])
            .arg("--ca")
            .arg(pki.join("ca.pem"))
            .arg("--credentials")
            .arg(&creds)
            .arg("--state-dir")
            .arg(t.join("sim"))
            .args(["--reading-interval-ms", "20"]),
        &sim_log,
    );
    // Members attach, then a read round gives them sessions to send
    // readings in.
    wait_for("members attached", Duration::from_secs(60), || {
        (sample(&metrics(admin_addr), "dapgw_members_connected", "") > 0.0).then_some(())
    });
    start_rounds_until_answered(
        || {
            operator(&[
                "round",
                "start",
                "--group",
                "7",
                "--mode",
                "psk-ecdhe",
                "--purpose",
                "read",
                "--read-request",
                "01",
            ])
        },
        || {
            sample(
                &metrics(udc_admin_addr),
                "dapgw_udc_members_authenticated_total",
                "",
            ) > 0.0
        },
    );
    wait_for("readings at the UDC", Duration::from_secs(90), || {
        gw.alive(&gw_log);
        let page = metrics(udc_admin_addr);
        (sample(&page, "dapgw_udc_readings_total", "") > 100.0).then_some(())
    });

    // The UDC goes away; the spool fills and members are pushed back.
    drop(udc.take());
    // Both counters: the spool counts its refusal before the request that
    // met it has finished and counted its outcome.
    let page = wait_for("spool full", Duration::from_secs(180), || {
        gw.alive(&gw_log);
        let page = metrics(admin_addr);
        let overloaded = sample(
            &page,
            "dapgw_member_requests_total",
            "outcome=\"overloaded\"",
        );
        (sample(&page, "dapgw_spool_rejected_total", "") > 0.0 && overloaded > 0.0).then_some(page)
    });
    let row = troubleshooting_row("spool full");
    let max = sample(&page, "dapgw_spool_max_bytes", "");
    assert_eq!(max, 1048576.0);
    assert!(
        sample(&page, "dapgw_spool_bytes", "") >= 0.9 * max,
        "{page}"
    );
    assert!(
        sample(
            &page,
            "dapgw_member_requests_total",
            "outcome=\"overloaded\""
        ) > 0.0,
        "{page}"
    );
    for phrase in [
        "`dapgw_spool_bytes` at `dapgw_spool_max_bytes`",
        "`dapgw_spool_rejected_total`",
        "`dapgw_member_requests_total{outcome=\"overloaded\"}`",
    ] {
        assert!(row.contains(phrase), "README row lacks {phrase}: {row}");
    }
    let up_row = troubleshooting_row("upstream unreachable");
    let log = std::fs::read_to_string(&gw_log).unwrap();
    seen(&up_row, &log, "batch not delivered; retrying batch=");
    assert!(sample(&page, "dapgw_batches_total", "outcome=\"error\"") > 0.0);

    // The UDC returns: the link comes up and the spool drains.
    let peak = sample(&page, "dapgw_spool_bytes", "");
    let _udc = Proc::spawn("udc (again)", &mut udc_cmd(), &t.join("udc-2.log"));
    wait_for("spool draining", Duration::from_secs(180), || {
        gw.alive(&gw_log);
        let page = metrics(admin_addr);
        (sample(&page, "dapgw_upstream_up", "") == 1.0
            && sample(&page, "dapgw_spool_bytes", "") < peak / 2.0)
            .then_some(())
    });
    let log = std::fs::read_to_string(&gw_log).unwrap();
    let after = &log[log.rfind("batch not delivered").unwrap()..];
    seen(&up_row, after, "upstream link up udc=");
}

/// `DAPGW_*` settings of an env file (`K=V`) or a ConfigMap's data
/// (`K: V`, quotes stripped); comments skipped.
fn settings_of(file: &str) -> Vec<(String, String)> {
    read(file)
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("DAPGW_"))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .or_else(|| l.split_once(": "))
                .unwrap_or_else(|| panic!("{file}: {l}"));
            (k.to_string(), v.trim().trim_matches('"').to_string())
        })
        .collect()
}

/// The systemd env example and the Kubernetes ConfigMap start a gateway
/// as written: only file paths (onto a dev PKI), listen addresses and the
/// upstream (a closed port) are replaced; every other value is parsed by
/// the real binary, and the spool limit it reports is the one written.
#[test]
fn env_example_and_configmap_start_a_gateway() {
    let bin = env!("CARGO_BIN_EXE_dapgw");
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let pki = t.join("pki");
    let out = run(Command::new(bin)
        .args(["keys", "dev-pki", "--out"])
        .arg(&pki)
        // A client certificate for each gateway id the files set: the
        // gateway refuses to start with an id that is not its certificate's.
        .args(["--client", "substation-0017", "--client", "dapgw-gateway-0"]));
    assert_ok("dapgw keys dev-pki", &out);
    // The file names deploy/ uses for the gateway's TLS material (the
    // client certificate is the one of the file's gateway id).
    let files = [
        ("upstream-ca.pem", "ca.pem"),
        ("client.pem", "client-{id}.pem"),
        ("client.key", "client-{id}.key"),
        ("server.pem", "server.pem"),
        ("server.key", "server.key"),
    ];
    for (file, extra) in [
        ("deploy/systemd/gateway.env.example", None),
        // The StatefulSet sets the id from the pod name.
        (
            "deploy/kubernetes/gateway-configmap.yaml",
            Some(("DAPGW_GATEWAY_ID", "dapgw-gateway-0")),
        ),
    ] {
        let mut settings = settings_of(file);
        settings.extend(extra.map(|(k, v)| (k.to_string(), v.to_string())));
        let id = settings
            .iter()
            .rev()
            .find(|s| s.0 == "DAPGW_GATEWAY_ID")
            .map(|s| s.1.clone())
            .unwrap_or_else(|| panic!("{file}: no DAPGW_GATEWAY_ID"));
        let admin = free_port();
        let mut cmd = Command::new(bin);
        for (k, _) in std::env::vars() {
            if k.starts_with("DAPGW_") {
                cmd.env_remove(k);
            }
        }
        cmd.arg("gateway");
        let mut max = GatewayConfig::default().spool_max_bytes.get().to_string();
        for (k, v) in &settings {
            let v = match k.as_str() {
                "DAPGW_UPSTREAM_URL" => format!("https://127.0.0.1:{}", free_port()),
                "DAPGW_LISTEN" => format!("127.0.0.1:{}", free_port()),
                "DAPGW_ADMIN_LISTEN" => continue,
                "DAPGW_SPOOL_DIR" => t.join(format!("spool-{admin}")).display().to_string(),
                _ => match v.strip_prefix("/etc/dapgw/tls/") {
                    Some(name) => {
                        let dev = files
                            .iter()
                            .find(|f| f.0 == name)
                            .unwrap_or_else(|| panic!("{file}: unknown file {name}"))
                            .1;
                        pki.join(dev.replace("{id}", &id)).display().to_string()
                    }
                    None => v.clone(),
                },
            };
            if k == "DAPGW_SPOOL_MAX_BYTES" {
                max = v.replace("MiB", "");
                max = (max.parse::<u64>().unwrap() << 20).to_string();
            }
            cmd.env(k, v);
        }
        cmd.env("DAPGW_ADMIN_LISTEN", format!("127.0.0.1:{admin}"));
        if !settings.iter().any(|s| s.0 == "DAPGW_SPOOL_DIR") {
            // The unit's StateDirectory holds the default spool.
            cmd.env("DAPGW_SPOOL_DIR", t.join(format!("spool-{admin}")));
        }
        let log = t.join(format!("gateway-{admin}.log"));
        let mut gw = Proc::spawn(file, &mut cmd, &log);
        let admin_addr = SocketAddr::from(([127, 0, 0, 1], admin));
        let page = wait_for(file, Duration::from_secs(60), || {
            gw.alive(&log);
            http_get(admin_addr, "/healthz")
                .filter(|(s, _)| *s == 200)
                .and_then(|_| http_get(admin_addr, "/metrics"))
                .map(|r| r.1)
        });
        assert!(
            page.contains(&format!("\ndapgw_spool_max_bytes {max}\n")),
            "{file}: spool limit {max}"
        );
    }
}

/// The Dockerfile's from-source stage copies every file `cargo build`
/// reads: the manifest's declared targets and every `include_str!` /
/// `include_bytes!` of the sources (the UDC embeds its SQL migrations).
#[test]
fn builder_stage_copies_every_file_the_build_reads() {
    let dockerfile = read("deploy/Dockerfile");
    let stage = dockerfile
        .split("\nFROM ")
        .find(|s| s.contains("AS builder"))
        .expect("a builder stage");
    let copied: Vec<&str> = stage
        .lines()
        .filter_map(|l| l.strip_prefix("COPY "))
        .filter(|l| !l.starts_with("--from"))
        .flat_map(|l| {
            let parts: Vec<&str> = l.split_whitespace().collect();
            parts[..parts.len() - 1].to_vec()
        })
        .collect();
    let is_copied = |rel: &str| {
        copied
            .iter()
            .any(|c| rel == *c || rel.starts_with(&format!("{}/", c.trim_end_matches('/'))))
    };
    let mut needed = vec!["Cargo.toml".to_string(), "Cargo.lock".to_string()];
    // Declared benches without a path live in benches/NAME.rs.
    let manifest = read("Cargo.toml");
    for block in manifest.split("[[bench]]").skip(1) {
        let name = block
            .lines()
            .find_map(|l| l.strip_prefix("name = "))
            .unwrap()
            .trim_matches('"');
        needed.push(format!("benches/{name}.rs"));
    }
    // Files the sources embed, resolved against the including file.
    let mut stack = vec![root().join("src")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let src = std::fs::read_to_string(&p).unwrap_or_default();
            for mac in ["include_str!(\"", "include_bytes!(\""] {
                for (at, _) in src.match_indices(mac) {
                    let rest = &src[at + mac.len()..];
                    let rel = &rest[..rest.find('"').unwrap()];
                    let mut path = p.parent().unwrap().to_path_buf();
                    for c in Path::new(rel).components() {
                        match c {
                            std::path::Component::ParentDir => {
                                path.pop();
                            }
                            other => path.push(other),
                        }
                    }
                    let rel = path.strip_prefix(root()).unwrap();
                    needed.push(rel.display().to_string());
                }
            }
        }
    }
    assert!(
        needed.iter().any(|n| n.starts_with("migrations/")),
        "{needed:?}"
    );
    for n in &needed {
        assert!(root().join(n).is_file(), "{n} does not exist");
        assert!(
            is_copied(n),
            "the builder stage does not copy {n} ({copied:?})"
        );
    }
}

/// The stages of a Dockerfile in file order: name (`AS name`, or the
/// position for an unnamed one), base image, and instruction lines
/// (comments and blank lines dropped, continuations not joined).
fn dockerfile_stages(dockerfile: &str) -> Vec<(String, String, Vec<String>)> {
    let mut stages: Vec<(String, String, Vec<String>)> = Vec::new();
    for line in dockerfile.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix("FROM ") {
            let words: Vec<&str> = rest.split_whitespace().collect();
            let base = words[0].to_string();
            let name = match words.iter().position(|w| w.eq_ignore_ascii_case("AS")) {
                Some(i) => words[i + 1].to_string(),
                None => stages.len().to_string(),
            };
            stages.push((name, base, Vec::new()));
        } else if let Some(stage) = stages.last_mut() {
            stage.2.push(line.to_string());
        }
    }
    stages
}

/// The first `COPY`/`ADD` of the build context's `target/` that building
/// stage `target` runs, in that stage, the stages it is built from or
/// copies from, or (legacy builders build every earlier stage) any stage
/// before it; `None` when building it needs nothing from `target/`.
fn stage_reads_build_output(dockerfile: &str, target: &str) -> Option<String> {
    let stages = dockerfile_stages(dockerfile);
    let at = stages
        .iter()
        .position(|s| s.0 == target)
        .unwrap_or_else(|| panic!("deploy/Dockerfile has no stage {target}"));
    let mut needed: BTreeSet<usize> = (0..=at).collect();
    let mut todo = vec![at];
    while let Some(i) = todo.pop() {
        let (_, base, lines) = &stages[i];
        let froms = lines
            .iter()
            .flat_map(|l| l.split_whitespace())
            .filter_map(|w| w.strip_prefix("--from="))
            .chain([base.as_str()]);
        for dep in froms {
            if let Some(j) = stages.iter().position(|s| s.0 == dep)
                && needed.insert(j)
            {
                todo.push(j);
            }
        }
    }
    needed.into_iter().find_map(|i| {
        let (name, _, lines) = &stages[i];
        lines
            .iter()
            .filter(|l| l.starts_with("COPY ") || l.starts_with("ADD "))
            .filter(|l| !l.contains("--from="))
            .find(|l| {
                l.split_whitespace()
                    .any(|w| w == "target" || w.starts_with("target/"))
            })
            .map(|l| format!("stage {name}: {l}"))
    })
}

/// `docker compose up --build` works from a fresh clone: compose builds a
/// Dockerfile stage that exists and needs nothing from `target/` (the
/// default last stage copies a host-built binary, which a fresh clone does
/// not have).
#[test]
fn compose_builds_a_stage_that_needs_nothing_from_target() {
    let compose = read("deploy/compose.yaml");
    let code = |l: &str| l.split('#').next().unwrap_or("").trim().to_string();
    let builds = compose
        .lines()
        .filter(|l| code(l).starts_with("build:"))
        .count();
    let targets: Vec<String> = compose
        .lines()
        .filter_map(|l| {
            code(l)
                .strip_prefix("target:")
                .map(|t| t.trim().to_string())
        })
        .collect();
    assert!(builds >= 1, "compose.yaml builds no image");
    assert_eq!(
        targets.len(),
        builds,
        "every build in compose.yaml names its Dockerfile target: {targets:?}"
    );
    let dockerfile = read("deploy/Dockerfile");
    for target in &targets {
        assert_eq!(
            stage_reads_build_output(&dockerfile, target),
            None,
            "compose builds stage {target}, which needs target/ from the host"
        );
    }
    // The check can fail: the default (host binary) stage is caught.
    let last = dockerfile_stages(&dockerfile).pop().unwrap().0;
    assert!(
        stage_reads_build_output(&dockerfile, &last).is_some_and(|s| s.contains("target/")),
        "the last stage {last} was expected to copy the host-built binary"
    );
}
