//! dapgw's own path, `dapgw-psk` and `dapgw-psk-ecdhe`: the real services,
//! each in a process of its own, under the same workload as the baselines
//! (N members authenticate in one group round, then each delivers one
//! reading).
//!
//! ```text
//! members (sim::Fleet) ──TLS──> member-link ──> gateway (gateway::run)
//!        │                      (relay)            │ HTTP/2, mTLS
//!        │                                         v
//!        │                                      udc-link (relay) ──> udc (udc::run, SQLite)
//!        └── operator: admin API (import, open round, /metrics) ──────────^
//! ```
//!
//! - `udc` role: writes fresh key material (`keys_cmd::init`,
//!   `keys_cmd::members`) and an admin token into its work directory, then
//!   runs `udc::run` unchanged on a fresh SQLite store. Its final counters
//!   come from a second read-only use of that store (readings per member,
//!   the round's accepted count) and its own `/metrics`.
//! - `udc-link` and `member-link` ([`super::relay`]): count the bytes the
//!   UDC and the gateway receive, at the TCP layer.
//! - `gateway` role: `gateway::run` unchanged; its counters
//!   are read from its own `/metrics` (upstream requests = requests the
//!   UDC received).
//! - `members` driver: imports the members through the admin
//!   API and attaches a [`Fleet`] (setup, not measured); then, measured:
//!   opens one round, waits until every member opened its confirm
//!   (mutually authenticated), ends the `auth` part there (the harness
//!   takes a snapshot, so the round's cost is reported apart), has every
//!   member send one reading, and waits until the UDC has stored them all
//!   (the `reading` part).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;

use super::{ControlIn, CounterSource, RoleLaunch, Scenario, counters_event, emit};
use crate::admin::MetricsPage;
use crate::config::{GatewayConfig, SecretUrl, UdcConfig};
use crate::protocol::keys::CredentialFile;
use crate::protocol::wire::Mode;
use crate::sim::agent::AgentConfig;
use crate::sim::client::{ClientOptions, client_tls};
use crate::sim::{Fleet, FleetConfig};
use crate::telemetry::LogFormat;
use crate::udc::keys_cmd;
use crate::udc::store::{self, Store as _};

/// The group every member is in.
pub const GROUP: u32 = 1;

/// The first member id (members are `FIRST_MEMBER..FIRST_MEMBER + N`).
pub const FIRST_MEMBER: u64 = 1;

/// The gateway id (the DNS SAN of the bench PKI's `gateway.pem`).
const GATEWAY_ID: &str = super::GATEWAY_IDENTITY;

/// How often the driver reads the UDC's `/metrics` while it waits for the
/// last readings to be stored (the UDC offers no notification for that).
/// Each scrape costs the UDC CPU that counts in the measured figure (0.1 to
/// 0.3 ms for the whole registry), and the last uplink batch comes a linger
/// (1 s by default) after the first reading: every 100 ms is about ten
/// scrapes, where every 20 ms was about forty (about 5 % of the UDC's CPU
/// in a session 12 profile).
const METRICS_POLL: Duration = Duration::from_millis(100);

/// While it waits, the driver prints the fleet's counters on stderr this
/// often.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Members per admin import request (the admin listener's body cap is
/// 64 KiB; a member's row is about 35 bytes of JSON).
const IMPORT_CHUNK: usize = 1000;

/// Files in a scenario's work directory.
mod files {
    /// Key material from `keys_cmd::init`.
    pub(super) const KEYS: &str = "keys";
    /// The member credential file (its import file is next to it).
    pub(super) const CREDENTIALS: &str = "members.json";
    /// The operator bearer token.
    pub(super) const TOKEN: &str = "admin.token";
    /// The UDC's SQLite store.
    pub(super) const STORE: &str = "udc.sqlite3";
    /// The gateway's spool directory.
    pub(super) const SPOOL: &str = "spool";
    /// The members' state files.
    pub(super) const MEMBER_STATE: &str = "member-state";
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Psk => "psk",
        Mode::PskEcdhe => "psk-ecdhe",
    }
}

/// The `dapgw-psk` or `dapgw-psk-ecdhe` scenario.
pub(crate) fn scenario(mode: Mode) -> Scenario {
    let name = format!("dapgw-{}", mode_name(mode));
    let work = format!("{{pki}}/{name}");
    Scenario {
        description: format!(
            "dapgw {}: members -> gateway (aggregated tags) -> UDC, one group round",
            mode_name(mode)
        ),
        servers: vec![
            RoleLaunch::bench_role(
                "udc",
                &[
                    "dapgw-udc",
                    "--pki",
                    "{pki}",
                    "--work",
                    &work,
                    "--members",
                    "{members}",
                    "--timeout-s",
                    "{timeout}",
                ],
            ),
            RoleLaunch::bench_role("udc-link", &["relay", "--upstream", "{addr:udc}"]),
            RoleLaunch::bench_role(
                "gateway",
                &[
                    "dapgw-gateway",
                    "--pki",
                    "{pki}",
                    "--work",
                    &work,
                    "--upstream",
                    "{addr:udc-link}",
                ],
            ),
            RoleLaunch::bench_role("member-link", &["relay", "--upstream", "{addr:gateway}"]),
        ],
        driver: RoleLaunch::bench_role(
            "members",
            &[
                "dapgw-members",
                "--pki",
                "{pki}",
                "--work",
                &work,
                "--gateway",
                "{addr:member-link}",
                "--admin",
                "{addr:udc.admin}",
                "--members",
                "{members}",
                "--mode",
                mode_name(mode),
                "--timeout-s",
                "{timeout}",
            ],
        ),
        udc: "udc".into(),
        gateway: Some("gateway".into()),
        counter_sources: vec![
            CounterSource::new("udc", "bytes_in", "udc-link", "bytes_in"),
            CounterSource::new("udc", "bytes_out", "udc-link", "bytes_out"),
            CounterSource::new("udc", "connections", "udc-link", "connections"),
            CounterSource::new("udc", "requests", "gateway", "upstream_requests"),
            CounterSource::new("gateway", "bytes_in", "member-link", "bytes_in"),
            CounterSource::new("gateway", "bytes_out", "member-link", "bytes_out"),
            CounterSource::new("gateway", "connections", "member-link", "connections"),
        ],
        settle: vec![("udc".into(), "settle".into())],
        name,
    }
}

/// Arguments of `dapgw bench role dapgw-udc`.
#[derive(clap::Args, Debug, Clone)]
pub struct UdcRoleArgs {
    /// Directory written by the harness (`ca.pem`, `server.pem`, ...).
    #[arg(long)]
    pub pki: PathBuf,
    /// The scenario's work directory (emptied and filled with keys, the
    /// member credentials, the admin token and the store).
    #[arg(long)]
    pub work: PathBuf,
    /// Number of members to provision.
    #[arg(long)]
    pub members: u64,
    /// Give up on `settle` after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
}

/// Arguments of `dapgw bench role dapgw-gateway`.
#[derive(clap::Args, Debug, Clone)]
pub struct GatewayRoleArgs {
    /// Directory written by the harness.
    #[arg(long)]
    pub pki: PathBuf,
    /// The scenario's work directory (the spool goes there).
    #[arg(long)]
    pub work: PathBuf,
    /// The UDC (or the relay in front of it).
    #[arg(long)]
    pub upstream: std::net::SocketAddr,
}

/// Arguments of `dapgw bench role dapgw-members`.
#[derive(clap::Args, Debug, Clone)]
pub struct MembersRoleArgs {
    /// Directory written by the harness (`ca.pem`).
    #[arg(long)]
    pub pki: PathBuf,
    /// The scenario's work directory (credentials and token from the UDC
    /// role; the members' state files go there).
    #[arg(long)]
    pub work: PathBuf,
    /// The gateway's member-facing address (or the relay in front of it).
    #[arg(long)]
    pub gateway: std::net::SocketAddr,
    /// The UDC's admin listener.
    #[arg(long)]
    pub admin: String,
    /// Number of members.
    #[arg(long)]
    pub members: usize,
    /// Session mode of the round: psk or psk-ecdhe.
    #[arg(long, default_value = "psk")]
    pub mode: String,
    /// Give up on a step after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
}

/// The tracing filter of the dapgw roles: `DAPGW_BENCH_LOG` if set (for
/// example `warn,h2=debug` to see every HTTP/2 frame), else `warn`. Logs go
/// to the role's stderr, which the harness passes through.
fn role_log() -> String {
    std::env::var("DAPGW_BENCH_LOG").unwrap_or_else(|_| "warn".into())
}

/// Reads one command line from the harness; `None` at EOF.
async fn next_command(control: &mut ControlIn) -> anyhow::Result<Option<String>> {
    control.next().await
}

/// A random bearer token (hex).
fn token() -> String {
    let mut b = zeroize::Zeroizing::new([0u8; 24]);
    rand_core::Rng::fill_bytes(&mut rand_core::UnwrapErr(getrandom::SysRng), &mut b[..]);
    hex::encode(&b[..])
}

/// `GET /metrics` of an admin listener, parsed.
async fn scrape(admin: &str) -> anyhow::Result<MetricsPage> {
    let (status, body) = crate::udc::admin_api::request(
        admin,
        "GET",
        "/metrics",
        None,
        None,
        Duration::from_secs(30),
    )
    .await?;
    if status != 200 {
        bail!("GET /metrics at {admin}: HTTP {status}");
    }
    Ok(MetricsPage::parse(&body))
}

// ---------------------------------------------------------------------------
// The UDC role
// ---------------------------------------------------------------------------

/// The work directory, emptied, with fresh keys, credentials and token.
fn provision(args: &UdcRoleArgs) -> anyhow::Result<()> {
    if args.work.exists() {
        std::fs::remove_dir_all(&args.work)
            .with_context(|| format!("emptying {}", args.work.display()))?;
    }
    std::fs::create_dir_all(&args.work)
        .with_context(|| format!("creating {}", args.work.display()))?;
    let keys = args.work.join(files::KEYS);
    keys_cmd::init(&keys)?;
    keys_cmd::members(
        &keys,
        FIRST_MEMBER,
        args.members,
        &[GROUP],
        &args.work.join(files::CREDENTIALS),
    )?;
    super::write_file(&args.work.join(files::TOKEN), token().as_bytes(), true)
}

fn udc_config(args: &UdcRoleArgs) -> UdcConfig {
    let keys = args.work.join(files::KEYS);
    UdcConfig {
        tls_cert: args.pki.join("server.pem"),
        tls_key: args.pki.join("server.key"),
        client_ca: args.pki.join("ca.pem"),
        admin_token_file: Some(args.work.join(files::TOKEN)),
        store_url: SecretUrl::new(format!(
            "sqlite://{}",
            args.work.join(files::STORE).display()
        )),
        master_secret_file: keys.join(keys_cmd::files::MASTER),
        storage_key_file: keys.join(keys_cmd::files::STORAGE),
        signing_key_file: keys.join(keys_cmd::files::SIGNING),
        key_cert_file: keys.join(keys_cmd::files::SIGNING_CERT),
        log: role_log(),
        log_format: LogFormat::Text,
        drain_grace_ms: 2000,
        // Direct members all connect from 127.0.0.1.
        max_connections: 65_536,
        max_connections_per_ip: 65_536,
        ..UdcConfig::default()
    }
}

/// Waits until the gateway has subscribed to [`GROUP`] at the UDC (a
/// challenge queued before that would never reach it). The store has no
/// notification for subscriptions, so it is read every 10 ms.
async fn wait_subscribed(store: &store::AnyStore, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if store.subscriptions(GATEWAY_ID).await?.contains(&GROUP) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the gateway did not subscribe to group {GROUP} within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The UDC's whole-run counters, read after the workload: readings per
/// member (from the store), members accepted in the round, entries the UDC
/// rejected (its `/metrics`).
async fn udc_final(
    store: &store::AnyStore,
    members: u64,
    admin: &str,
) -> anyhow::Result<Map<String, Value>> {
    let (mut total, mut distinct) = (0u64, 0u64);
    for id in FIRST_MEMBER..FIRST_MEMBER + members {
        // The store keeps times as SQL integers (i64): u64::MAX would wrap.
        let rows = store.readings(id, 0, i64::MAX as u64, 16).await?;
        let n = rows.len() as u64;
        total += n;
        distinct += u64::from(n > 0);
    }
    let mut authenticated = 0;
    for round in store.open_rounds().await? {
        if round.group == GROUP
            && let Some(report) = store.round_report(GROUP, round.round).await?
        {
            authenticated = authenticated.max(report.accepted);
        }
    }
    let metrics = scrape(admin).await?;
    let rejected = metrics.sum("dapgw_udc_entries_rejected_total", &[]) as u64;
    let mut m = Map::new();
    for (k, v) in [
        ("readings", total),
        ("readings_distinct", distinct),
        ("readings_duplicate", total - distinct),
        ("readings_rejected", rejected),
        ("authenticated", authenticated),
        (
            "udc_readings_metric",
            metrics.sum("dapgw_udc_readings_total", &[]) as u64,
        ),
    ] {
        m.insert(k.into(), json!(v));
    }
    Ok(m)
}

/// `dapgw bench role dapgw-udc`.
pub(crate) async fn udc(args: UdcRoleArgs) -> anyhow::Result<()> {
    provision(&args)?;
    let config = udc_config(&args);
    let _ = crate::telemetry::init_logging(&config.log, config.log_format);
    let gateways = TcpListener::bind("127.0.0.1:0").await?;
    let admin = TcpListener::bind("127.0.0.1:0").await?;
    let addr = gateways.local_addr()?.to_string();
    let admin_addr = admin.local_addr()?.to_string();
    let store_url = config.store_url.clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let listeners = crate::udc::Listeners {
        udc: gateways,
        admin,
    };
    let mut service = tokio::spawn(crate::udc::run(config, listeners, async {
        let _ = stop_rx.await;
    }));
    emit(json!({"event": "ready", "addr": addr, "addrs": {"admin": admin_addr}}));

    let mut control = ControlIn::new();
    // A second handle on the same SQLite file, used outside the measured
    // phase only (settle, final counters); opened once the service has
    // created and migrated the store.
    let mut reader: Option<store::AnyStore> = None;
    let timeout = Duration::from_secs(args.timeout_s);
    loop {
        let cmd = tokio::select! {
            res = &mut service => {
                res.map_err(|e| anyhow!("udc task: {e}"))??;
                bail!("the UDC service stopped on its own");
            }
            cmd = next_command(&mut control) => cmd?,
        };
        let Some(cmd) = cmd else { break };
        match cmd.as_str() {
            "snapshot" => emit(counters_event("snapshot", json!({}))),
            "settle" => {
                if reader.is_none() {
                    reader = Some(store::open(store_url.expose()).await?);
                }
                if let Some(r) = &reader {
                    wait_subscribed(r, timeout).await?;
                }
                emit(json!({"event": "settled"}));
            }
            other => bail!("unknown control command {other:?}"),
        }
    }
    let reader = match reader {
        Some(r) => r,
        None => store::open(store_url.expose()).await?,
    };
    let counters = udc_final(&reader, args.members, &admin_addr).await?;
    emit(counters_event("final", Value::Object(counters)));
    let _ = stop_tx.send(());
    service.await.map_err(|e| anyhow!("udc task: {e}"))??;
    Ok(())
}

// ---------------------------------------------------------------------------
// The gateway role
// ---------------------------------------------------------------------------

/// The gateway's counters from its `/metrics`: requests it sent the UDC
/// (every upstream request is timed once it completes), batches, entries.
async fn gateway_counters(admin: &str) -> anyhow::Result<Value> {
    let text = scrape(admin).await?;
    let mut m = Map::new();
    for (k, metric) in [
        (
            "upstream_requests",
            "dapgw_upstream_request_duration_seconds_count",
        ),
        ("batches", "dapgw_batches_total"),
        ("uplink_entries", "dapgw_uplink_entries_total"),
        ("downlink_messages", "dapgw_downlink_messages_total"),
        ("tag_requests", "dapgw_tag_requests_total"),
    ] {
        m.insert(k.into(), json!(text.sum(metric, &[]) as u64));
    }
    Ok(Value::Object(m))
}

/// `dapgw bench role dapgw-gateway`.
pub(crate) async fn gateway(args: GatewayRoleArgs) -> anyhow::Result<()> {
    let config = GatewayConfig {
        upstream_url: SecretUrl::new(format!("https://localhost:{}", args.upstream.port())),
        upstream_ca: args.pki.join("ca.pem"),
        upstream_client_cert: args.pki.join("gateway.pem"),
        upstream_client_key: args.pki.join("gateway.key"),
        gateway_id: GATEWAY_ID.into(),
        tls_cert: args.pki.join("server.pem"),
        tls_key: args.pki.join("server.key"),
        spool_dir: args.work.join(files::SPOOL),
        // A round is cut as soon as every attached member answered; the
        // deadline only bounds a failed run. 30 s (the default) can pass on
        // a loaded 2-core machine while 10,000 members answer.
        round_deadline_ms: 600_000,
        // Every simulated member connects from 127.0.0.1.
        max_connections_per_ip: 65_536,
        log: role_log(),
        log_format: LogFormat::Text,
        drain_grace_ms: 2000,
        ..GatewayConfig::default()
    };
    if !args.upstream.ip().is_loopback() {
        bail!("--upstream must be a loopback address (the URL names localhost)");
    }
    let _ = crate::telemetry::init_logging(&config.log, config.log_format);
    let members = TcpListener::bind("127.0.0.1:0").await?;
    let admin = TcpListener::bind("127.0.0.1:0").await?;
    let addr = members.local_addr()?.to_string();
    let admin_addr = admin.local_addr()?.to_string();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let listeners = crate::gateway::Listeners { members, admin };
    let mut service = tokio::spawn(crate::gateway::run(config, listeners, async {
        let _ = stop_rx.await;
    }));
    emit(json!({"event": "ready", "addr": addr, "addrs": {"admin": admin_addr}}));
    let mut control = ControlIn::new();
    loop {
        let cmd = tokio::select! {
            res = &mut service => {
                res.map_err(|e| anyhow!("gateway task: {e}"))??;
                bail!("the gateway stopped on its own");
            }
            cmd = next_command(&mut control) => cmd?,
        };
        let Some(cmd) = cmd else { break };
        match cmd.as_str() {
            "snapshot" => {
                let counters = gateway_counters(&admin_addr).await?;
                emit(counters_event("snapshot", counters));
            }
            other => bail!("unknown control command {other:?}"),
        }
    }
    let counters = gateway_counters(&admin_addr).await?;
    emit(counters_event("final", counters));
    let _ = stop_tx.send(());
    service.await.map_err(|e| anyhow!("gateway task: {e}"))??;
    Ok(())
}

// ---------------------------------------------------------------------------
// The load driver
// ---------------------------------------------------------------------------

/// The operator: admin API requests with the bearer token.
struct Operator {
    admin: String,
    token: String,
    requests: u64,
}

impl Operator {
    async fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> anyhow::Result<Value> {
        self.requests += 1;
        let (status, text) = crate::udc::admin_api::request(
            &self.admin,
            method,
            path,
            Some(&self.token),
            body,
            Duration::from_secs(120),
        )
        .await?;
        if !(200..300).contains(&status) {
            bail!("{method} {path}: HTTP {status}: {text}");
        }
        serde_json::from_str(&text).with_context(|| format!("{method} {path}: not JSON"))
    }
}

/// Waits until the fleet's counters satisfy `cond`, or fails after
/// `timeout` naming `what` and the fleet's counters.
async fn wait_fleet(
    fleet: &Fleet,
    timeout: Duration,
    what: &str,
    cond: impl Fn(&crate::sim::agent::Stats) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if fleet.wait_for(left.min(PROGRESS_EVERY), &cond).await {
            return Ok(());
        }
        if left <= PROGRESS_EVERY {
            bail!(
                "{what}: not reached within {timeout:?}; members: {}",
                fleet.stats().to_json()
            );
        }
        eprintln!(
            "dapgw bench members: waiting for {what}: {}",
            fleet.stats().to_json()
        );
    }
}

/// The measured workload; the `done` event's fields.
async fn workload(
    fleet: &Arc<Fleet>,
    op: &mut Operator,
    args: &MembersRoleArgs,
    control: &mut ControlIn,
) -> anyhow::Result<Map<String, Value>> {
    let n = args.members as u64;
    let timeout = Duration::from_secs(args.timeout_s);
    let stats = fleet.stats().clone();
    let started = Instant::now();
    let opened = op
        .call(
            "POST",
            "/v1/admin/rounds",
            Some(
                json!({"group": GROUP, "mode": args.mode, "purpose": "auth", "duration_s": 3600})
                    .to_string(),
            ),
        )
        .await?;
    let round = opened.get("round").and_then(Value::as_u64);
    wait_fleet(fleet, timeout, "every member confirmed", |s| {
        s.confirms_opened.load(Ordering::Relaxed) >= n
    })
    .await?;
    let auth_wall = started.elapsed();
    // The harness cuts the measured phase here: the round's cost apart
    // from the readings'.
    emit(json!({
        "event": "part",
        "part": "auth",
        "authenticated": stats.confirms_opened.load(Ordering::Relaxed),
        "auth_wall_s": auth_wall.as_secs_f64(),
    }));
    match control.next().await?.as_deref() {
        Some("go") => {}
        other => bail!("expected go after the auth part, got {other:?}"),
    }

    // One reading per member, all members at once (each is its own meter).
    let mut set = tokio::task::JoinSet::new();
    for id in fleet.members() {
        let fleet = fleet.clone();
        set.spawn(async move { fleet.send_reading(id).await });
    }
    let (mut ok, mut failed, mut first_error) = (0u64, 0u64, None);
    while let Some(res) = set.join_next().await {
        match res.map_err(|e| e.to_string()).and_then(|r| r) {
            Ok(()) => ok += 1,
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    let sent_wall = started.elapsed();
    // The gateway took them all (202); wait until the UDC stored them.
    let deadline = Instant::now() + timeout;
    let mut polls = 0u64;
    let stored = loop {
        polls += 1;
        let stored = scrape(&op.admin)
            .await?
            .sum("dapgw_udc_readings_total", &[]) as u64;
        if stored >= ok || Instant::now() > deadline {
            break stored;
        }
        tokio::time::sleep(METRICS_POLL).await;
    };
    let mut m = Map::new();
    m.insert("part".into(), json!("reading"));
    m.insert("ok".into(), json!(ok));
    m.insert("failed".into(), json!(failed));
    m.insert("first_error".into(), json!(first_error.unwrap_or_default()));
    m.insert("round".into(), json!(round));
    m.insert(
        "authenticated".into(),
        json!(stats.confirms_opened.load(Ordering::Relaxed)),
    );
    m.insert("readings_stored_at_udc".into(), json!(stored));
    m.insert("auth_wall_s".into(), json!(auth_wall.as_secs_f64()));
    m.insert(
        "readings_sent_wall_s".into(),
        json!(sent_wall.as_secs_f64()),
    );
    m.insert(
        "driver_wall_s".into(),
        json!(started.elapsed().as_secs_f64()),
    );
    m.insert("admin_requests".into(), json!(op.requests));
    m.insert("udc_metrics_polls".into(), json!(polls));
    m.insert("member_errors".into(), json!(stats.errors()));
    Ok(m)
}

/// `dapgw bench role dapgw-members`.
pub(crate) async fn members(args: MembersRoleArgs) -> anyhow::Result<()> {
    if crate::udc::rounds::parse_mode(&args.mode).is_none() {
        bail!("--mode must be psk or psk-ecdhe");
    }
    let _ = crate::telemetry::init_logging(&role_log(), LogFormat::Text);
    let timeout = Duration::from_secs(args.timeout_s);
    let token = crate::config::admin_token(&args.work.join(files::TOKEN))
        .map_err(|e| anyhow::anyhow!("the admin token the UDC role wrote: {e}"))?;
    let mut op = Operator {
        admin: args.admin.clone(),
        token,
        requests: 0,
    };
    // Setup, not measured: register the members, attach the fleet.
    let creds_path = args.work.join(files::CREDENTIALS);
    let mut import_path = creds_path.clone().into_os_string();
    import_path.push(".import.json");
    let import: keys_cmd::ImportFile = serde_json::from_slice(
        &std::fs::read(Path::new(&import_path)).context("reading the members' import file")?,
    )
    .context("parsing the members' import file")?;
    // The admin listener takes bodies up to 64 KiB: import in chunks.
    for chunk in import.members.chunks(IMPORT_CHUNK) {
        let rows: Vec<Value> = chunk
            .iter()
            .map(|m| json!({"id": m.id, "kv": m.kv, "groups": m.groups}))
            .collect();
        let body = json!({ "members": rows }).to_string();
        op.call("POST", "/v1/admin/members/import", Some(body))
            .await?;
    }
    let file: CredentialFile = serde_json::from_slice(
        &std::fs::read(&creds_path).context("reading the member credentials")?,
    )
    .context("parsing the member credentials")?;
    if file.members.len() != args.members {
        bail!(
            "{} holds {} members, {} asked",
            creds_path.display(),
            file.members.len(),
            args.members
        );
    }
    let fleet = Fleet::spawn(FleetConfig {
        client: ClientOptions {
            gateway: format!("https://localhost:{}", args.gateway.port()),
            tls: client_tls(&args.pki.join("ca.pem"), None)?,
            connections: 0, // sized by the fleet: crate::sim::STREAMS_PER_CONNECTION
            connect_timeout: Duration::from_secs(30),
        },
        credentials: file.members,
        agent: AgentConfig {
            state_dir: args.work.join(files::MEMBER_STATE),
            reading_interval: None,
            reconnect: true,
            // Thousands of simulated meters on one disk: replace the state
            // files without fsync (the load driver's CPU is not measured,
            // but 500 threads in fsync disturb every role's figures).
            fsync: false,
            ..AgentConfig::default()
        },
        member_tls: Default::default(),
    })?;
    let fleet = Arc::new(fleet);
    let n = args.members as u64;
    wait_fleet(&fleet, timeout, "every member attached", |s| {
        s.attached.load(Ordering::Relaxed) >= n
    })
    .await?;
    let mut control = ControlIn::new();
    emit(json!({"event": "ready"}));
    match control.next().await?.as_deref() {
        Some("go") => {}
        other => bail!("expected go, got {other:?}"),
    }
    let mut done = workload(&fleet, &mut op, &args, &mut control).await?;
    done.insert("event".into(), json!("done"));
    emit(Value::Object(done));
    // Stay until the harness has read this process's CPU time.
    while control.next().await?.is_some() {}
    let fleet = Arc::try_unwrap(fleet).map_err(|_| anyhow!("fleet still shared"))?;
    let failed = fleet.shutdown().await;
    if let Some((id, e)) = failed.first() {
        bail!(
            "{} member agents failed, e.g. member {id}: {e}",
            failed.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenarios_name_their_mode_and_count_udc_traffic_at_a_relay() {
        for (mode, name) in [
            (Mode::Psk, "dapgw-psk"),
            (Mode::PskEcdhe, "dapgw-psk-ecdhe"),
        ] {
            let sc = scenario(mode);
            assert_eq!(sc.name, name);
            assert!(super::super::REFERENCE_SCENARIOS.contains(&name));
            assert!(sc.driver.args.iter().any(|a| a == mode_name(mode)));
            assert!(
                sc.counter_sources.iter().any(|c| c.role == "udc"
                    && c.counter == "bytes_in"
                    && c.from_role == "udc-link")
            );
        }
    }
}
