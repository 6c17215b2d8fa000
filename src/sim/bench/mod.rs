//! `dapgw bench`: the side-by-side. One command runs the same workload (N
//! members authenticate, then each delivers one reading) through several
//! deployments and reads each role's CPU time from the OS.
//!
//! ```text
//! harness ──spawn──> role processes (udc, gateway, ...)   ready / snapshot / final
//!    │                      ^
//!    └──spawn──> members (load driver) ──TLS on loopback──┘
//! ```
//!
//! A [`Scenario`] is a set of server role processes, started in order, plus
//! one load-driver process, and says which role is "the UDC" and which "the
//! gateway". Every role is `dapgw bench role ...` (or any command speaking
//! the control protocol below), so its CPU time is its own, measured between
//! snapshots taken by the harness, excluding start-up (PKI loading,
//! binding): a server role's own `CLOCK_PROCESS_CPUTIME_ID` (nanoseconds),
//! which it reports in its snapshot events, or, from a role that does not,
//! and for the load driver, `utime + stime` of `/proc/<pid>/stat` (10 ms
//! ticks) ([`cpu`]).
//!
//! Control protocol, one line each way, events prefixed [`CONTROL_PREFIX`]
//! on the role's stdout (anything else on stdout is ignored):
//! - server role: `{"event":"ready","addr":"127.0.0.1:port"}` once
//!   listening; on the stdin line `snapshot` it prints
//!   `{"event":"snapshot","counters":{...},"cpu_ns":N}` (`cpu_ns`, its
//!   process CPU clock, is optional; the harness reads it from snapshots
//!   only); on stdin EOF it prints `{"event":"final","counters":{...}}`
//!   (the built-in roles add `cpu_ns` there too) and exits 0. Counters are `u64`s;
//!   the harness reports their difference over the measured phase
//!   (`bytes_in` counted at the TCP layer, `requests`, `readings`, ...).
//!   A ready event may also carry `"addrs":{"name":"host:port"}`: further
//!   listeners, named `{addr:LABEL.name}` in later roles' arguments.
//! - a scenario may list `settle` commands: after the driver is ready and
//!   before the measurement, the harness sends each to its server role,
//!   which answers `{"event":"settled"}` once the deployment is in the
//!   state the workload needs (e.g. the gateway has subscribed).
//! - load driver: `{"event":"ready"}`; on `go` it runs a phase and prints
//!   `{"event":"warm",...}` (a warm-up phase, e.g. obtaining TLS tickets:
//!   measured separately, then it waits for the next `go`) or
//!   `{"event":"done",...}` with its stats; then it exits on stdin EOF.
//!   Within the measured phase it may print `{"event":"part","part":NAME,...}`
//!   where one part of the workload ends (the dapgw drivers: `auth`, once
//!   every member is authenticated): the harness takes a snapshot and
//!   answers `go`; the `done` event then names the last part (`"part"`).
//!   The report keeps the whole phase and each part's figures (`parts`).
//!
//! Scenarios, in report order: `direct-mtls` and `direct-mtls-resumed`
//! (flow A, [`direct`]), `hop-by-hop` (flow B, [`hop`]), and dapgw's own
//! path `dapgw-psk` and `dapgw-psk-ecdhe` ([`dapgw`]: the real UDC and
//! gateway services, each in its own process, with counting TCP relays
//! ([`relay`]) in front of them so their traffic is counted at the TCP
//! layer without touching their code). The ratios are taken against the
//! dapgw scenarios when they ran.

pub mod cpu;
pub mod dapgw;
pub mod direct;
pub mod hop;
pub mod relay;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::telemetry::process_cpu_time;

/// Prefix of every control event a role prints on its stdout.
pub const CONTROL_PREFIX: &str = "DAPGW-BENCH ";

/// How the report's CPU figures are read (the JSON's `cpu_source`, the
/// table's header); each scenario's `udc_cpu_clock` says which applied.
const CPU_SOURCE: &str = "server roles (UDC, gateway, relays): their own \
    CLOCK_PROCESS_CPUTIME_ID in ns, reported at each snapshot, else utime+stime of \
    /proc/<pid>/stat (10 ms ticks); load driver: /proc/<pid>/stat; measured phase only";

/// Scenario names taken as the reference of the ratios, when they ran.
pub const REFERENCE_SCENARIOS: [&str; 2] = ["dapgw-psk", "dapgw-psk-ecdhe"];

/// The TLS identity (DNS SAN) of the hop-by-hop gateway's client certificate.
pub const GATEWAY_IDENTITY: &str = "gw-1";

/// Options of `dapgw bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchOptions {
    /// Number of simulated members.
    #[arg(long, default_value_t = 2000)]
    pub members: usize,
    /// Member connections in flight at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Scenario to run (repeatable); default: all of them.
    #[arg(long = "scenario", value_name = "NAME")]
    pub scenarios: Vec<String>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Directory for the throwaway PKI (default: a fresh one under the
    /// system temp dir, removed afterwards).
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// Give up on a role that is silent for this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
    /// The executable that runs the roles (default: this one).
    #[arg(skip)]
    pub exe: Option<PathBuf>,
}

/// The hidden `dapgw bench role ...` subcommands: one process per role.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum RoleCommand {
    /// A UDC endpoint taking readings over mutual TLS (both baselines).
    Udc(UdcArgs),
    /// The terminating hop-by-hop gateway (flow B).
    Gateway(GatewayArgs),
    /// The load driver: N members, each on its own TLS connection.
    Members(MembersArgs),
    /// The real UDC service (`udc::run`) on a fresh SQLite store.
    DapgwUdc(dapgw::UdcRoleArgs),
    /// The real gateway service (`gateway::run`).
    DapgwGateway(dapgw::GatewayRoleArgs),
    /// The dapgw load driver: a `sim::Fleet` of members and the operator.
    DapgwMembers(dapgw::MembersRoleArgs),
    /// A TCP relay counting the bytes that pass through it.
    Relay(relay::RelayArgs),
}

/// How the baseline UDC learns which member a reading is from.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityMode {
    /// From the member's own client certificate (flow A).
    Cert,
    /// From the `x-member-id` header, only on a connection authenticated
    /// as the gateway (flow B: the UDC trusts the gateway).
    GatewayHeader,
}

/// Arguments of `dapgw bench role udc`.
#[derive(clap::Args, Debug, Clone)]
pub struct UdcArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: std::net::SocketAddr,
    /// Directory written by the harness (`ca.pem`, `server.pem`, ...).
    #[arg(long)]
    pub pki: PathBuf,
    /// Number of members (readings are counted per member `m-0`..).
    #[arg(long)]
    pub members: usize,
    /// Where the member identity comes from.
    #[arg(long, value_enum, default_value = "cert")]
    pub identity: IdentityMode,
    /// Issue one TLS 1.3 session ticket per connection (stateless
    /// tickets), for the resumption variant.
    #[arg(long)]
    pub tickets: bool,
}

/// Arguments of `dapgw bench role gateway`.
#[derive(clap::Args, Debug, Clone)]
pub struct GatewayArgs {
    /// Member-facing address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: std::net::SocketAddr,
    /// The UDC to forward to.
    #[arg(long)]
    pub upstream: std::net::SocketAddr,
    /// Directory written by the harness.
    #[arg(long)]
    pub pki: PathBuf,
}

/// Arguments of `dapgw bench role members`.
#[derive(clap::Args, Debug, Clone)]
pub struct MembersArgs {
    /// Where members connect (the UDC or the gateway).
    #[arg(long)]
    pub target: std::net::SocketAddr,
    /// Directory written by the harness (`members.pem`, `members.key`).
    #[arg(long)]
    pub pki: PathBuf,
    /// Number of members.
    #[arg(long)]
    pub members: usize,
    /// Connections in flight at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Warm-up phase first (a full handshake per member to get a ticket),
    /// then the measured phase on resumed sessions.
    #[arg(long)]
    pub resume: bool,
}

/// Runs one role process until its stdin closes.
pub fn run_role(cmd: RoleCommand) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cmd {
        RoleCommand::Udc(args) => rt.block_on(direct::udc(args)),
        RoleCommand::Gateway(args) => rt.block_on(hop::gateway(args)),
        RoleCommand::Members(args) => rt.block_on(direct::members(args)),
        RoleCommand::DapgwUdc(args) => rt.block_on(dapgw::udc(args)),
        RoleCommand::DapgwGateway(args) => rt.block_on(dapgw::gateway(args)),
        RoleCommand::DapgwMembers(args) => rt.block_on(dapgw::members(args)),
        RoleCommand::Relay(args) => rt.block_on(relay::relay(args)),
    }
}

// ---------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------

/// One process of a scenario: `exe <args>`, where the args may hold the
/// placeholders `{pki}`, `{members}`, `{concurrency}`, `{timeout}` (the
/// harness's `--timeout-s`) and `{addr:LABEL}` (the address announced by
/// an earlier role; `{addr:LABEL.name}` for its further listeners).
#[derive(Clone, Debug)]
pub struct RoleLaunch {
    /// Name of the role in the report (`udc`, `gateway`, `members`).
    pub label: String,
    /// Command-line arguments after the executable.
    pub args: Vec<String>,
}

impl RoleLaunch {
    /// A `dapgw bench role <args>` process.
    pub fn bench_role(label: &str, args: &[&str]) -> Self {
        let mut all = vec!["bench".to_string(), "role".to_string()];
        all.extend(args.iter().map(|a| a.to_string()));
        Self {
            label: label.to_string(),
            args: all,
        }
    }
}

/// A deployment to measure: server roles, the load driver, and which
/// server role is the UDC and which (if any) the gateway.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Key in the report (`direct-mtls`, `dapgw-psk`, ...).
    pub name: String,
    /// One line for the table.
    pub description: String,
    /// Server roles, started in order; each must announce `ready`.
    pub servers: Vec<RoleLaunch>,
    /// The load driver.
    pub driver: RoleLaunch,
    /// Label of the server role that is the UDC.
    pub udc: String,
    /// Label of the server role that is the gateway, if any.
    pub gateway: Option<String>,
    /// Counters of one role taken from another role (e.g. the UDC's
    /// `bytes_in` from the relay in front of it).
    pub counter_sources: Vec<CounterSource>,
    /// `(server label, command)` sent after the driver is ready, before
    /// the measurement; each role answers `settled`.
    pub settle: Vec<(String, String)>,
}

/// Counter `counter` of role `role` is counter `from_counter` of role
/// `from_role` (replacing whatever `role` reported under that name).
#[derive(Clone, Debug)]
pub struct CounterSource {
    /// The role the counter is reported for.
    pub role: String,
    /// Its name there.
    pub counter: String,
    /// The role that counts it.
    pub from_role: String,
    /// Its name in that role's counters.
    pub from_counter: String,
}

impl CounterSource {
    /// `role.counter` comes from `from_role.from_counter`.
    pub fn new(role: &str, counter: &str, from_role: &str, from_counter: &str) -> Self {
        Self {
            role: role.into(),
            counter: counter.into(),
            from_role: from_role.into(),
            from_counter: from_counter.into(),
        }
    }
}

/// The built-in baselines, in report order.
pub fn baseline_scenarios() -> Vec<Scenario> {
    vec![
        direct::scenario(false),
        direct::scenario(true),
        hop::scenario(),
    ]
}

/// Every scenario `dapgw bench` knows, in report order: the baselines,
/// then dapgw in psk and psk-ecdhe mode.
pub fn all_scenarios() -> Vec<Scenario> {
    let mut v = baseline_scenarios();
    v.push(dapgw::scenario(crate::protocol::wire::Mode::Psk));
    v.push(dapgw::scenario(crate::protocol::wire::Mode::PskEcdhe));
    v
}

// ---------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------

/// What one role did over one phase.
#[derive(Clone, Debug, Default)]
pub struct RolePhase {
    /// CPU time (user + system, every thread).
    pub cpu: Duration,
    /// Whether `cpu` comes from the role's own process clock in nanoseconds
    /// at both ends of the phase (else from `/proc/<pid>/stat` ticks).
    pub ns_clock: bool,
    /// Counter differences reported by the role (server roles only).
    pub counters: BTreeMap<String, u64>,
}

/// Figures of one phase of a scenario.
#[derive(Clone, Debug, Default)]
pub struct PhaseResult {
    /// Wall time from `go` to the driver's event.
    pub wall: Duration,
    /// Per role label.
    pub roles: BTreeMap<String, RolePhase>,
    /// The driver's event (its stats).
    pub driver: Map<String, Value>,
}

/// The outcome of one scenario.
#[derive(Clone, Debug)]
pub struct ScenarioResult {
    /// The scenario run.
    pub scenario: Scenario,
    /// Members in the workload.
    pub members: usize,
    /// The warm-up phase, if the driver had one.
    pub warmup: Option<PhaseResult>,
    /// The measured phase.
    pub measured: PhaseResult,
    /// The measured phase cut where the driver said (`part` events), in
    /// order, each with its distinct name; empty if it did not. (The JSON
    /// keys them by name.)
    pub parts: Vec<(String, PhaseResult)>,
    /// Final counters of the UDC (whole run), for the delivery check.
    pub udc_final: BTreeMap<String, u64>,
}

/// The outcome of `dapgw bench`.
#[derive(Clone, Debug)]
pub struct BenchReport {
    /// Members per scenario.
    pub members: usize,
    /// Connections in flight.
    pub concurrency: usize,
    /// Per scenario, in run order.
    pub results: Vec<ScenarioResult>,
}

fn per_member(x: f64, n: usize) -> f64 {
    if n == 0 { 0.0 } else { x / n as f64 }
}

impl PhaseResult {
    fn role(&self, label: &str) -> Option<&RolePhase> {
        self.roles.get(label)
    }

    fn counter(&self, label: &str, name: &str) -> u64 {
        self.role(label)
            .and_then(|r| r.counters.get(name).copied())
            .unwrap_or(0)
    }

    /// How role `label`'s CPU was read, for the JSON.
    fn cpu_clock(&self, label: &str) -> &'static str {
        match self.role(label) {
            Some(r) if r.ns_clock => "process_clock_ns",
            Some(_) => "proc_stat_ticks",
            None => "none",
        }
    }

    fn cpu_us(&self, label: &str) -> Option<f64> {
        self.role(label).map(|r| r.cpu.as_secs_f64() * 1e6)
    }

    /// Role `label`'s CPU per member of `n` for the table, "-" without
    /// that role.
    fn cpu_cell(&self, label: Option<&str>, n: usize) -> String {
        label
            .and_then(|l| self.cpu_us(l))
            .map_or("-".to_string(), |c| format!("{:.1}", per_member(c, n)))
    }
}

impl ScenarioResult {
    /// UDC CPU per member over the measured phase, in microseconds.
    pub fn udc_cpu_us_per_member(&self) -> f64 {
        per_member(
            self.measured.cpu_us(&self.scenario.udc).unwrap_or(0.0),
            self.members,
        )
    }

    /// Bytes the UDC received (TCP payload) per member, measured phase.
    pub fn udc_bytes_per_member(&self) -> f64 {
        per_member(
            self.measured.counter(&self.scenario.udc, "bytes_in") as f64,
            self.members,
        )
    }

    fn phase_json(&self, p: &PhaseResult) -> Value {
        let n = self.members;
        let udc = &self.scenario.udc;
        let gw = self.scenario.gateway.as_deref();
        let opt = |v: Option<f64>| v.map_or(Value::Null, |x| json!(x));
        json!({
            "wall_s": p.wall.as_secs_f64(),
            "udc_cpu_us_per_member": per_member(p.cpu_us(udc).unwrap_or(0.0), n),
            "udc_cpu_clock": p.cpu_clock(udc),
            "udc_bytes_per_member": per_member(p.counter(udc, "bytes_in") as f64, n),
            "udc_bytes_out_per_member": per_member(p.counter(udc, "bytes_out") as f64, n),
            "udc_requests_per_member": per_member(p.counter(udc, "requests") as f64, n),
            "udc_connections": p.counter(udc, "connections"),
            "gateway_cpu_us_per_member": opt(gw.and_then(|g| p.cpu_us(g)).map(|c| per_member(c, n))),
            "gateway_bytes_per_member": opt(gw.map(|g| per_member(p.counter(g, "bytes_in") as f64, n))),
            "members_cpu_us_per_member": opt(p.cpu_us(&self.scenario.driver.label).map(|c| per_member(c, n))),
            "driver": Value::Object(p.driver.clone()),
        })
    }

    /// The scenario's JSON object.
    pub fn to_json(&self) -> Value {
        let mut obj = match self.phase_json(&self.measured) {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        let udc_final = |k: &str| self.udc_final.get(k).copied().unwrap_or(0);
        obj.insert("description".into(), json!(self.scenario.description));
        obj.insert("members".into(), json!(self.members));
        obj.insert("readings_delivered".into(), json!(udc_final("readings")));
        obj.insert(
            "members_delivered".into(),
            json!(udc_final("readings_distinct")),
        );
        obj.insert(
            "readings_duplicate".into(),
            json!(udc_final("readings_duplicate")),
        );
        obj.insert(
            "readings_rejected".into(),
            json!(udc_final("readings_rejected")),
        );
        if let Some(a) = self.udc_final.get("authenticated") {
            obj.insert("members_authenticated".into(), json!(a));
        }
        obj.insert(
            "members_missing".into(),
            json!(self.members as u64 - udc_final("readings_distinct").min(self.members as u64)),
        );
        obj.insert(
            "warmup".into(),
            self.warmup
                .as_ref()
                .map_or(Value::Null, |w| self.phase_json(w)),
        );
        let parts: Map<String, Value> = self
            .parts
            .iter()
            .map(|(name, p)| (name.clone(), self.phase_json(p)))
            .collect();
        obj.insert("parts".into(), Value::Object(parts));
        obj.insert("cpu_source".into(), json!(CPU_SOURCE));
        Value::Object(obj)
    }

    /// Every member's reading arrived exactly once, nothing failed, and
    /// (where the UDC reports it) every member authenticated.
    pub fn delivered_exactly_once(&self) -> bool {
        let f = |k: &str| self.udc_final.get(k).copied().unwrap_or(0);
        let n = self.members as u64;
        f("readings") == n
            && f("readings_distinct") == n
            && f("readings_duplicate") == 0
            && f("readings_rejected") == 0
            && self.udc_final.get("authenticated").is_none_or(|&a| a == n)
    }
}

impl BenchReport {
    /// The ratios of each other scenario's UDC CPU and bytes per member to
    /// each reference scenario's ([`REFERENCE_SCENARIOS`]) that ran, keyed
    /// `"<scenario>/<reference>"`.
    pub fn ratios(&self) -> Map<String, Value> {
        let mut out = Map::new();
        for r in self
            .results
            .iter()
            .filter(|r| REFERENCE_SCENARIOS.contains(&r.scenario.name.as_str()))
        {
            for s in self
                .results
                .iter()
                .filter(|s| !REFERENCE_SCENARIOS.contains(&s.scenario.name.as_str()))
            {
                let ratio = |a: f64, b: f64| if b > 0.0 { json!(a / b) } else { Value::Null };
                out.insert(
                    format!("{}/{}", s.scenario.name, r.scenario.name),
                    json!({
                        "udc_cpu": ratio(s.udc_cpu_us_per_member(), r.udc_cpu_us_per_member()),
                        "udc_bytes": ratio(s.udc_bytes_per_member(), r.udc_bytes_per_member()),
                    }),
                );
            }
        }
        out
    }

    /// `{"members", "concurrency", "build", "scenarios": {...}, "ratios": {...}}`.
    pub fn to_json(&self) -> Value {
        let scenarios: Map<String, Value> = self
            .results
            .iter()
            .map(|r| (r.scenario.name.clone(), r.to_json()))
            .collect();
        json!({
            "members": self.members,
            "concurrency": self.concurrency,
            "build": if cfg!(debug_assertions) { "debug" } else { "release" },
            "scenarios": scenarios,
            "ratios": self.ratios(),
        })
    }

    /// The human-readable table.
    pub fn write_table(&self, out: &mut impl Write) -> std::io::Result<()> {
        writeln!(
            out,
            "{} members, {} in flight, {} build; CPU: {CPU_SOURCE}",
            self.members,
            self.concurrency,
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }
        )?;
        writeln!(
            out,
            "{:<22} {:>12} {:>12} {:>9} {:>12} {:>12} {:>8} {:>10}",
            "scenario",
            "UDC us/mbr",
            "UDC B/mbr",
            "UDC req",
            "GW us/mbr",
            "mbrs us/mbr",
            "wall s",
            "delivered"
        )?;
        for r in &self.results {
            let m = &r.measured;
            let n = r.members;
            let gw = r.scenario.gateway.as_deref();
            let drv = Some(r.scenario.driver.label.as_str());
            writeln!(
                out,
                "{:<22} {:>12.1} {:>12.1} {:>9.2} {:>12} {:>12} {:>8.2} {:>5}/{:<5}",
                r.scenario.name,
                r.udc_cpu_us_per_member(),
                r.udc_bytes_per_member(),
                per_member(m.counter(&r.scenario.udc, "requests") as f64, n),
                m.cpu_cell(gw, n),
                m.cpu_cell(drv, n),
                m.wall.as_secs_f64(),
                r.udc_final.get("readings_distinct").copied().unwrap_or(0),
                n
            )?;
            for (name, p) in &r.parts {
                writeln!(
                    out,
                    "{:<22} {:>12.1} {:>12.1} {:>9.2} {:>12} {:>12} {:>8.2}",
                    format!("  part: {name}"),
                    per_member(p.cpu_us(&r.scenario.udc).unwrap_or(0.0), n),
                    per_member(p.counter(&r.scenario.udc, "bytes_in") as f64, n),
                    per_member(p.counter(&r.scenario.udc, "requests") as f64, n),
                    p.cpu_cell(gw, n),
                    p.cpu_cell(drv, n),
                    p.wall.as_secs_f64()
                )?;
            }
            if let Some(w) = &r.warmup {
                writeln!(
                    out,
                    "{:<22} {:>12.1} {:>12.1} {:>9.2} {:>12} {:>12} {:>8.2}",
                    "  (warm-up, excluded)",
                    per_member(w.cpu_us(&r.scenario.udc).unwrap_or(0.0), n),
                    per_member(w.counter(&r.scenario.udc, "bytes_in") as f64, n),
                    per_member(w.counter(&r.scenario.udc, "requests") as f64, n),
                    "-",
                    "-",
                    w.wall.as_secs_f64()
                )?;
            }
        }
        for (k, v) in self.ratios() {
            writeln!(out, "ratio {k}: {v}")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

/// A running role process and the control events from its stdout.
struct RoleProc {
    label: String,
    child: Child,
    stdin: Option<ChildStdin>,
    events: mpsc::Receiver<Value>,
    timeout: Duration,
}

impl RoleProc {
    fn spawn(exe: &Path, label: &str, args: &[String], timeout: Duration) -> anyhow::Result<Self> {
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting role {label}: {} {args:?}", exe.display()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("role {label}: no stdout"))?;
        let stdin = child.stdin.take();
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(ev) = line.strip_prefix(CONTROL_PREFIX)
                    && let Ok(v) = serde_json::from_str::<Value>(ev)
                    && tx.send(v).is_err()
                {
                    break;
                }
            }
        });
        Ok(Self {
            label: label.to_string(),
            child,
            stdin,
            events,
            timeout,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn cpu(&self) -> anyhow::Result<Duration> {
        Ok(cpu::process_cpu(self.pid())?)
    }

    /// The next event, which must be one of `want`.
    fn expect(&mut self, want: &[&str]) -> anyhow::Result<Value> {
        let ev = self
            .events
            .recv_timeout(self.timeout)
            .map_err(|e| match e {
                mpsc::RecvTimeoutError::Timeout => anyhow!(
                    "role {} silent for {:?} (waiting for {want:?})",
                    self.label,
                    self.timeout
                ),
                mpsc::RecvTimeoutError::Disconnected => {
                    let status = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
                    anyhow!(
                        "role {} ended ({status}) while waiting for {want:?}",
                        self.label
                    )
                }
            })?;
        if !want.contains(&event_name(&ev)) {
            bail!("role {}: expected {want:?}, got {ev}", self.label);
        }
        Ok(ev)
    }

    fn send(&mut self, line: &str) -> anyhow::Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| anyhow!("role {}: stdin closed", self.label))?;
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .with_context(|| format!("role {}: sending {line}", self.label))
    }

    /// The role's counters and its CPU time: as it reported it (`true`),
    /// or else read from `/proc` (`false`).
    fn counters(&mut self) -> anyhow::Result<(BTreeMap<String, u64>, Duration, bool)> {
        self.send("snapshot")?;
        let ev = self.expect(&["snapshot"])?;
        let reported = cpu::reported_cpu(&ev).with_context(|| format!("role {}", self.label))?;
        let (cpu, ns) = match reported {
            Some(cpu) => (cpu, true),
            None => (self.cpu()?, false),
        };
        Ok((counters_of(&ev), cpu, ns))
    }

    /// Closes stdin, takes the final event and waits for a clean exit.
    fn finish(mut self, final_event: Option<&str>) -> anyhow::Result<Value> {
        drop(self.stdin.take());
        let ev = match final_event {
            Some(e) => self.expect(&[e])?,
            None => Value::Null,
        };
        let status = self.child.wait()?;
        if !status.success() {
            bail!("role {} exited with {status}", self.label);
        }
        Ok(ev)
    }
}

impl Drop for RoleProc {
    fn drop(&mut self) {
        // Only on an error path: the child is still running.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn counters_of(ev: &Value) -> BTreeMap<String, u64> {
    ev.get("counters")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// CPU of every role and counters of every server at one instant.
struct Snapshot {
    at: Instant,
    cpu: BTreeMap<String, Duration>,
    /// The roles whose `cpu` is their own nanosecond clock.
    ns_clock: std::collections::BTreeSet<String>,
    counters: BTreeMap<String, BTreeMap<String, u64>>,
}

fn snapshot(servers: &mut [RoleProc], driver: &RoleProc) -> anyhow::Result<Snapshot> {
    let mut cpu = BTreeMap::new();
    let mut ns_clock = std::collections::BTreeSet::new();
    let mut counters = BTreeMap::new();
    for s in servers.iter_mut() {
        let (c, used, ns) = s.counters()?;
        counters.insert(s.label.clone(), c);
        cpu.insert(s.label.clone(), used);
        if ns {
            ns_clock.insert(s.label.clone());
        }
    }
    cpu.insert(driver.label.clone(), driver.cpu()?);
    Ok(Snapshot {
        at: Instant::now(),
        cpu,
        ns_clock,
        counters,
    })
}

fn event_name(ev: &Value) -> &str {
    ev.get("event").and_then(Value::as_str).unwrap_or("")
}

/// The `"part"` a driver's `part` event ended, or the one its `done` event
/// ended after earlier parts: a name not used by an earlier part (`before`),
/// as the report keys parts by name.
fn part_name(ev: &Value, before: &[(String, PhaseResult)]) -> anyhow::Result<String> {
    let name = ev
        .get("part")
        .and_then(Value::as_str)
        .filter(|p| !p.is_empty())
        .ok_or_else(|| anyhow!("driver event without a \"part\" name: {ev}"))?;
    if before.iter().any(|(n, _)| n == name) {
        bail!("driver named two parts {name}");
    }
    Ok(name.to_string())
}

fn phase(from: &Snapshot, to: &Snapshot, driver: &Value, sources: &[CounterSource]) -> PhaseResult {
    let mut roles: BTreeMap<String, RolePhase> = to
        .cpu
        .iter()
        .map(|(label, cpu)| {
            let before = from.cpu.get(label).copied().unwrap_or_default();
            let empty = BTreeMap::new();
            let c0 = from.counters.get(label).unwrap_or(&empty);
            let counters = to
                .counters
                .get(label)
                .unwrap_or(&empty)
                .iter()
                .map(|(k, v)| (k.clone(), v.saturating_sub(c0.get(k).copied().unwrap_or(0))))
                .collect();
            (
                label.clone(),
                RolePhase {
                    cpu: cpu.saturating_sub(before),
                    ns_clock: from.ns_clock.contains(label) && to.ns_clock.contains(label),
                    counters,
                },
            )
        })
        .collect();
    for src in sources {
        let v = roles
            .get(&src.from_role)
            .and_then(|r| r.counters.get(&src.from_counter))
            .copied()
            .unwrap_or(0);
        if let Some(r) = roles.get_mut(&src.role) {
            r.counters.insert(src.counter.clone(), v);
        }
    }
    let mut stats = driver.as_object().cloned().unwrap_or_default();
    stats.remove("event");
    PhaseResult {
        wall: to.at.duration_since(from.at),
        roles,
        driver: stats,
    }
}

fn substitute(arg: &str, vars: &BTreeMap<String, String>) -> anyhow::Result<String> {
    let mut out = arg.to_string();
    while let Some(start) = out.find('{') {
        let end = out[start..]
            .find('}')
            .map(|e| start + e)
            .ok_or_else(|| anyhow!("unclosed placeholder in {arg}"))?;
        let key = &out[start + 1..end];
        let val = vars
            .get(key)
            .ok_or_else(|| anyhow!("unknown placeholder {{{key}}} in {arg}"))?;
        out.replace_range(start..=end, val);
    }
    Ok(out)
}

/// Runs one scenario: starts its roles, drives the load, stops them.
pub fn run_scenario(
    exe: &Path,
    pki: &Path,
    sc: &Scenario,
    opts: &BenchOptions,
) -> anyhow::Result<ScenarioResult> {
    let timeout = Duration::from_secs(opts.timeout_s);
    let mut vars = BTreeMap::from([
        ("pki".to_string(), pki.display().to_string()),
        ("members".to_string(), opts.members.to_string()),
        ("concurrency".to_string(), opts.concurrency.to_string()),
        ("timeout".to_string(), opts.timeout_s.to_string()),
    ]);
    let mut servers: Vec<RoleProc> = Vec::new();
    for role in &sc.servers {
        let args = role
            .args
            .iter()
            .map(|a| substitute(a, &vars))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut p = RoleProc::spawn(exe, &role.label, &args, timeout)?;
        let ready = p.expect(&["ready"])?;
        if let Some(addr) = ready.get("addr").and_then(Value::as_str) {
            vars.insert(format!("addr:{}", role.label), addr.to_string());
        }
        for (name, addr) in ready
            .get("addrs")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            if let Some(addr) = addr.as_str() {
                vars.insert(format!("addr:{}.{name}", role.label), addr.to_string());
            }
        }
        servers.push(p);
    }
    let args = sc
        .driver
        .args
        .iter()
        .map(|a| substitute(a, &vars))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut driver = RoleProc::spawn(exe, &sc.driver.label, &args, timeout)?;
    driver.expect(&["ready"])?;
    for (label, cmd) in &sc.settle {
        let role = servers
            .iter_mut()
            .find(|s| &s.label == label)
            .ok_or_else(|| anyhow!("settle: no server role {label}"))?;
        role.send(cmd)?;
        role.expect(&["settled"])?;
    }

    let mut warmup = None;
    let mut start = snapshot(&mut servers, &driver)?;
    cpu::perf_ctl("enable");
    driver.send("go")?;
    let mut ev = driver.expect(&["warm", "part", "done"])?;
    if event_name(&ev) == "warm" {
        // The warm-up is not profiled either.
        cpu::perf_ctl("disable");
        let warm_end = snapshot(&mut servers, &driver)?;
        warmup = Some(phase(&start, &warm_end, &ev, &sc.counter_sources));
        start = snapshot(&mut servers, &driver)?;
        cpu::perf_ctl("enable");
        driver.send("go")?;
        ev = driver.expect(&["part", "done"])?;
    }
    // Parts of the measured phase: each `part` event ends one (a snapshot
    // there, then `go` for the next); `done` ends the last.
    let mut parts = Vec::new();
    let mut part_start: Option<Snapshot> = None;
    while event_name(&ev) == "part" {
        let at = snapshot(&mut servers, &driver)?;
        let name = part_name(&ev, &parts)?;
        let from = part_start.as_ref().unwrap_or(&start);
        parts.push((name, phase(from, &at, &ev, &sc.counter_sources)));
        part_start = Some(at);
        driver.send("go")?;
        ev = driver.expect(&["part", "done"])?;
    }
    let end = snapshot(&mut servers, &driver)?;
    cpu::perf_ctl("disable");
    if let Some(from) = &part_start {
        let name = part_name(&ev, &parts)?;
        parts.push((name, phase(from, &end, &ev, &sc.counter_sources)));
    }
    let measured = phase(&start, &end, &ev, &sc.counter_sources);

    driver.finish(None)?;
    let mut udc_final = BTreeMap::new();
    // Stop in reverse order: the gateway before the UDC it forwards to.
    while let Some(p) = servers.pop() {
        let label = p.label.clone();
        let fin = p.finish(Some("final"))?;
        if label == sc.udc {
            udc_final = counters_of(&fin);
        }
    }
    Ok(ScenarioResult {
        scenario: sc.clone(),
        members: opts.members,
        warmup,
        measured,
        parts,
        udc_final,
    })
}

/// Runs `scenarios` (all of them, or those named in `opts.scenarios`) one
/// after the other on a fresh throwaway PKI.
pub fn run(opts: &BenchOptions, scenarios: &[Scenario]) -> anyhow::Result<BenchReport> {
    if opts.members == 0 || opts.concurrency == 0 {
        bail!("--members and --concurrency must be at least 1");
    }
    for name in &opts.scenarios {
        if !scenarios.iter().any(|s| &s.name == name) {
            let known: Vec<_> = scenarios.iter().map(|s| s.name.as_str()).collect();
            bail!("unknown scenario {name}; known: {}", known.join(", "));
        }
    }
    let exe = match &opts.exe {
        Some(e) => e.clone(),
        None => std::env::current_exe().context("locating the dapgw executable")?,
    };
    let (dir, temporary) = match &opts.work_dir {
        Some(d) => (d.clone(), false),
        None => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            (
                std::env::temp_dir().join(format!("dapgw-bench-{}-{nanos}", std::process::id())),
                true,
            )
        }
    };
    let res = (|| {
        generate_pki(&dir, opts.members)?;
        let mut results = Vec::new();
        for sc in scenarios
            .iter()
            .filter(|s| opts.scenarios.is_empty() || opts.scenarios.contains(&s.name))
        {
            let r = run_scenario(&exe, &dir, sc, opts)
                .with_context(|| format!("scenario {}", sc.name))?;
            results.push(r);
        }
        Ok(BenchReport {
            members: opts.members,
            concurrency: opts.concurrency,
            results,
        })
    })();
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    }
    res
}

/// `dapgw bench`: runs every scenario (or those chosen) and prints the
/// table or JSON. Fails if any member's reading did not arrive exactly once.
pub fn main(opts: &BenchOptions) -> anyhow::Result<()> {
    let report = run(opts, &all_scenarios())?;
    let mut out = std::io::stdout().lock();
    if opts.json {
        writeln!(out, "{}", report.to_json())?;
    } else {
        report.write_table(&mut out)?;
    }
    out.flush()?;
    let bad: Vec<_> = report
        .results
        .iter()
        .filter(|r| !r.delivered_exactly_once())
        .map(|r| r.scenario.name.clone())
        .collect();
    if !bad.is_empty() {
        bail!("readings not delivered exactly once in {}", bad.join(", "));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Throwaway PKI (generation is not measured)
// ---------------------------------------------------------------------------

/// Member `i`'s identity: the DNS SAN of its client certificate.
pub fn member_name(i: usize) -> String {
    format!("m-{i}")
}

/// Member index from its identity, if it is one of the first `n`.
pub fn member_index(name: &str, n: usize) -> Option<usize> {
    let digits = name.strip_prefix("m-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.len() > 9 {
        return None;
    }
    digits.parse().ok().filter(|&i| i < n)
}

fn write_file(path: &Path, contents: &[u8], secret: bool) -> anyhow::Result<()> {
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))?;
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    #[cfg(not(unix))]
    let _ = secret;
    Ok(())
}

fn leaf(
    name: &[&str],
    usage: ExtendedKeyUsagePurpose,
    issuer: &Issuer<'_, KeyPair>,
) -> anyhow::Result<(String, zeroize::Zeroizing<String>)> {
    let mut params =
        CertificateParams::new(name.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
    params.distinguished_name.push(DnType::CommonName, name[0]);
    params.is_ca = IsCa::NoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), zeroize::Zeroizing::new(key.serialize_pem())))
}

/// Writes into `dir`: `ca.pem`; `server.pem`/`.key` (localhost,
/// 127.0.0.1); `gateway.pem`/`.key` ([`GATEWAY_IDENTITY`]); and
/// `members.pem`/`members.key`, member `i`'s certificate and key being the
/// i-th of each. ECDSA P-256 throughout.
pub fn generate_pki(dir: &Path, members: usize) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "dapgw bench CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let ca_cert = ca.self_signed(&ca_key)?;
    write_file(&dir.join("ca.pem"), ca_cert.pem().as_bytes(), false)?;
    let issuer = Issuer::new(ca, ca_key);

    let (cert, key) = leaf(
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
        &issuer,
    )?;
    write_file(&dir.join("server.pem"), cert.as_bytes(), false)?;
    write_file(&dir.join("server.key"), key.as_bytes(), true)?;
    let (cert, key) = leaf(
        &[GATEWAY_IDENTITY],
        ExtendedKeyUsagePurpose::ClientAuth,
        &issuer,
    )?;
    write_file(&dir.join("gateway.pem"), cert.as_bytes(), false)?;
    write_file(&dir.join("gateway.key"), key.as_bytes(), true)?;

    let mut certs = String::new();
    let mut keys = zeroize::Zeroizing::new(String::new());
    for i in 0..members {
        let (cert, key) = leaf(
            &[&member_name(i)],
            ExtendedKeyUsagePurpose::ClientAuth,
            &issuer,
        )?;
        certs.push_str(&cert);
        keys.push_str(&key);
    }
    write_file(&dir.join("members.pem"), certs.as_bytes(), false)?;
    write_file(&dir.join("members.key"), keys.as_bytes(), true)
}

// ---------------------------------------------------------------------------
// Shared by the roles: TLS, control channel, byte counting
// ---------------------------------------------------------------------------

/// aws-lc-rs restricted to X25519 key exchange: the classic TLS 1.3
/// handshake (rustls would otherwise offer X25519MLKEM768 too).
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
    Arc::new(p)
}

/// A TLS 1.3 server config requiring client certificates from `ca.pem`,
/// with the certificate `server.pem`.
pub(crate) fn server_tls(
    pki: &Path,
    alpn: &[&[u8]],
    tickets: bool,
) -> anyhow::Result<rustls::ServerConfig> {
    let p = provider();
    let roots = Arc::new(crate::tls::load_roots(&pki.join("ca.pem"))?);
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots, p.clone()).build()?;
    let chain = crate::tls::load_certs(&pki.join("server.pem"))?;
    let key = crate::tls::load_key(&pki.join("server.key"))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    if tickets {
        cfg.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
        cfg.send_tls13_tickets = 1;
    } else {
        cfg.send_tls13_tickets = 0;
    }
    Ok(cfg)
}

/// A server role's `snapshot` or `final` event: its counters and its own CPU
/// time so far ([`process_cpu_time`], `"cpu_ns"`), which the harness prefers to
/// the 10 ms ticks of `/proc/<pid>/stat` (it reads it from snapshots only).
pub(crate) fn counters_event(event: &str, counters: Value) -> Value {
    let cpu_ns = u64::try_from(process_cpu_time().as_nanos()).unwrap_or(u64::MAX);
    json!({"event": event, "counters": counters, "cpu_ns": cpu_ns})
}

/// Prints one control event.
pub(crate) fn emit(event: Value) {
    let mut out = std::io::stdout().lock();
    // The harness is gone if this fails; the role then ends on stdin EOF.
    let _ = writeln!(out, "{CONTROL_PREFIX}{event}").and_then(|()| out.flush());
}

/// Lines from the harness on stdin, read by a plain thread (tokio's stdin
/// needs a feature this crate does not enable).
pub(crate) struct ControlIn {
    lines: tokio::sync::mpsc::UnboundedReceiver<std::io::Result<String>>,
}

impl ControlIn {
    pub(crate) fn new() -> Self {
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let stop = line.is_err();
                if tx.send(line).is_err() || stop {
                    break;
                }
            }
        });
        Self { lines }
    }

    /// The next command, or `None` at EOF.
    pub(crate) async fn next(&mut self) -> anyhow::Result<Option<String>> {
        match self.lines.recv().await {
            Some(line) => Ok(Some(line?.trim().to_string())),
            None => Ok(None),
        }
    }

    /// Server roles: answers `snapshot` until EOF, then prints `final`.
    pub(crate) async fn serve(mut self, counters: impl Fn() -> Value) -> anyhow::Result<()> {
        while let Some(cmd) = self.next().await? {
            match cmd.as_str() {
                "snapshot" => emit(counters_event("snapshot", counters())),
                other => bail!("unknown control command {other:?}"),
            }
        }
        emit(counters_event("final", counters()));
        Ok(())
    }
}

/// Bytes and connections seen at a role's TCP layer.
#[derive(Debug, Default)]
pub(crate) struct Traffic {
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    pub(crate) connections: AtomicU64,
}

impl Traffic {
    pub(crate) fn fill(&self, m: &mut Map<String, Value>) {
        for (k, v) in [
            ("bytes_in", &self.bytes_in),
            ("bytes_out", &self.bytes_out),
            ("connections", &self.connections),
        ] {
            m.insert(k.into(), json!(v.load(Ordering::Relaxed)));
        }
    }
}

/// A TCP stream that adds what it reads and writes to a [`Traffic`].
pub(crate) struct Counting<S> {
    inner: S,
    traffic: Arc<Traffic>,
}

impl<S> Counting<S> {
    pub(crate) fn new(inner: S, traffic: Arc<Traffic>) -> Self {
        traffic.connections.fetch_add(1, Ordering::Relaxed);
        Self { inner, traffic }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counting<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        self.traffic.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counting<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &res {
            self.traffic
                .bytes_out
                .fetch_add(*n as u64, Ordering::Relaxed);
        }
        res
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &res {
            self.traffic
                .bytes_out
                .fetch_add(*n as u64, Ordering::Relaxed);
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_substituted_or_refused() {
        let vars = BTreeMap::from([
            ("pki".to_string(), "/tmp/p".to_string()),
            ("addr:udc".to_string(), "127.0.0.1:9".to_string()),
        ]);
        assert_eq!(substitute("{pki}/x", &vars).unwrap(), "/tmp/p/x");
        assert_eq!(substitute("{addr:udc}", &vars).unwrap(), "127.0.0.1:9");
        assert!(substitute("{nope}", &vars).is_err());
        assert!(substitute("{pki", &vars).is_err());
    }

    #[test]
    fn counter_sources_replace_a_role_counter_with_another_role_s() {
        let snap = |udc_bytes: u64, relay_bytes: u64, cpu_ms: u64| Snapshot {
            at: Instant::now(),
            cpu: BTreeMap::from([
                ("udc".to_string(), Duration::from_millis(cpu_ms)),
                ("udc-link".to_string(), Duration::ZERO),
            ]),
            ns_clock: ["udc".to_string()].into(),
            counters: BTreeMap::from([
                (
                    "udc".to_string(),
                    BTreeMap::from([("bytes_in".to_string(), udc_bytes)]),
                ),
                (
                    "udc-link".to_string(),
                    BTreeMap::from([("bytes_in".to_string(), relay_bytes)]),
                ),
            ]),
        };
        let sources = [CounterSource::new(
            "udc", "bytes_in", "udc-link", "bytes_in",
        )];
        let p = phase(&snap(5, 100, 10), &snap(7, 350, 30), &json!({}), &sources);
        // The relay's difference, not the UDC's own; CPU is the UDC's.
        assert_eq!(p.counter("udc", "bytes_in"), 250);
        assert_eq!(p.cpu_us("udc"), Some(20_000.0));
        let p = phase(&snap(5, 100, 10), &snap(7, 350, 30), &json!({}), &[]);
        assert_eq!(p.counter("udc", "bytes_in"), 2);
        // The clock each role's CPU came from, at both ends.
        assert_eq!(p.cpu_clock("udc"), "process_clock_ns");
        assert_eq!(p.cpu_clock("udc-link"), "proc_stat_ticks");
        let mut ticks = snap(5, 100, 10);
        ticks.ns_clock.clear();
        let p = phase(&ticks, &snap(7, 350, 30), &json!({}), &[]);
        assert_eq!(p.cpu_clock("udc"), "proc_stat_ticks");
    }

    #[test]
    fn all_scenarios_have_unique_names_and_the_references_last() {
        let all = all_scenarios();
        let names: Vec<_> = all.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "direct-mtls",
                "direct-mtls-resumed",
                "hop-by-hop",
                "dapgw-psk",
                "dapgw-psk-ecdhe"
            ]
        );
        for s in &all {
            // Every settle command and counter source names a server role.
            let labels: Vec<_> = s.servers.iter().map(|r| r.label.as_str()).collect();
            assert!(labels.contains(&s.udc.as_str()), "{}", s.name);
            for (label, _) in &s.settle {
                assert!(labels.contains(&label.as_str()), "{}", s.name);
            }
            for c in &s.counter_sources {
                assert!(labels.contains(&c.role.as_str()), "{}", s.name);
                assert!(labels.contains(&c.from_role.as_str()), "{}", s.name);
            }
        }
    }

    #[test]
    fn member_names_round_trip_and_junk_is_refused() {
        assert_eq!(member_index(&member_name(17), 20), Some(17));
        assert_eq!(member_index("m-20", 20), None);
        assert_eq!(member_index("m-", 20), None);
        assert_eq!(member_index("m-+1", 20), None);
        assert_eq!(member_index("gw-1", 20), None);
        assert_eq!(member_index("m-99999999999999999999", usize::MAX), None);
    }
}
