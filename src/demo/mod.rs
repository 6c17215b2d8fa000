//! `dapgw demo`: the seed use case end to end on this host, in one command.
//!
//! ```text
//!  members 1..N/2 ──TLS──> gateway gw-a ─┐
//!                                        ├─mTLS, HTTP/2──> UDC (SQLite)  <── demo (operator API)
//!  members N/2..N ──TLS──> gateway gw-b ─┘
//! ```
//!
//! The demo provisions a throwaway deployment ([`deployment`]): keys and
//! certificates made by the same code as `dapgw keys`, one `dapgw udc` and
//! two `dapgw gateway` child processes configured only through `DAPGW_*`
//! variables, and N simulated members ([`crate::sim::Fleet`], real
//! [`crate::protocol::member::Member`]s over real TLS). One more member is
//! registered but never started: an offline meter. It then drives six steps
//! through the UDC's operator API and checks each outcome against what the
//! members themselves saw:
//!
//! 1. an authentication round: every member mutually authenticated;
//! 2. a read round: every member's reading collected;
//! 3. unsolicited readings on the new sessions;
//! 4. a signed, group-encrypted update, acknowledged by every member;
//! 5. a member revoked, the group rekeyed, and a second update that the
//!    revoked member receives and cannot open;
//! 6. gateway gw-b killed and restarted as a compromised gateway
//!    (`DAPGW_MISBEHAVE`): in the next round it alters one member's response
//!    and invents one for the offline member; the UDC localizes and rejects
//!    exactly those two, everyone else passes.
//!
//! It ends with a summary (a table, or one JSON object with `--json`) and
//! exits 0 only if every check held. The UDC's CPU time is read from
//! `/proc/<pid>/stat`; for comparison the demo then makes real TLS 1.3
//! mutual-authentication handshakes to the same UDC, the cost every member
//! would bring without the gateway.

pub mod deployment;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use crate::sim::agent::{AgentConfig, Stats};
use crate::sim::client::{ClientOptions, client_tls};
use crate::sim::{Fleet, FleetConfig};
use deployment::{Gateway, Provisioned, Udc};

/// The group every demo member belongs to.
pub const GROUP: u32 = 1;

/// How often progress is sampled.
const TICK: Duration = Duration::from_millis(100);

/// Full TLS handshakes made for the comparison, at most.
const TLS_SAMPLES: u64 = 64;

/// Options of `dapgw demo`.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Simulated members, split over the two gateways.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(4..=100_000))]
    pub members: u64,
    /// Key agreement of the rounds.
    #[arg(long, value_enum, default_value = "psk")]
    pub mode: DemoMode,
    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Keep the deployment (keys, logs, store, spools) in DIR instead of a
    /// temporary directory removed at the end. DIR must not exist.
    #[arg(long, value_name = "DIR")]
    pub keep: Option<PathBuf>,
    /// Give up on a step after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub step_timeout_s: u64,
    /// Log filter of the UDC and gateway processes (their JSON logs go to
    /// files in the deployment directory).
    #[arg(long, value_name = "FILTER", default_value = "info")]
    pub log: String,
    /// The executable run as UDC and gateways (default: this one).
    #[arg(skip)]
    pub exe: Option<PathBuf>,
}

/// Key agreement of the demo's rounds.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DemoMode {
    /// Pre-shared keys only (the cheapest for the UDC).
    Psk,
    /// Pre-shared keys plus an ephemeral X25519 exchange (forward secrecy).
    PskEcdhe,
}

impl DemoMode {
    fn as_str(self) -> &'static str {
        match self {
            DemoMode::Psk => "psk",
            DemoMode::PskEcdhe => "psk-ecdhe",
        }
    }
}

/// One check of the demo and whether it held.
#[derive(Debug, Clone)]
pub struct Check {
    /// The step it belongs to.
    pub step: u8,
    /// What was checked.
    pub what: String,
    /// Whether it held.
    pub ok: bool,
}

/// What the demo found.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Simulated members.
    pub members: u64,
    /// The rounds' key agreement.
    pub mode: &'static str,
    /// Members the UDC accepted in the authentication round (step 1) whose
    /// confirm the member opened.
    pub authenticated: u64,
    /// Readings the UDC stored (read round plus unsolicited).
    pub readings_delivered: u64,
    /// Acknowledgements of the two updates the UDC recorded.
    pub acks: u64,
    /// Whether the revoked member could open the update after its
    /// revocation (must be false).
    pub revoked_could_read: bool,
    /// What the revoked member said about that update.
    pub revoked_reason: String,
    /// Entries the misbehaving gateway altered or invented that the UDC
    /// rejected.
    pub misbehaviour_rejected: u64,
    /// Rejections of honest members' entries in any round (must be 0).
    pub honest_rejected: u64,
    /// Rejections by reason over all rounds (`member: reason`).
    pub rejected: Vec<(u64, String)>,
    /// Chunks the UDC localized in the misbehaviour round.
    pub localizations: u64,
    /// UDC CPU time per member in the authentication round.
    pub udc_cpu_us_per_member: f64,
    /// Bytes the UDC received per member in the authentication round: TCP
    /// payload from the gateways (TLS records, HTTP/2 framing, batches and
    /// downlink polls), counted like [`Self::tls_bytes_per_handshake`].
    pub udc_bytes_per_member: f64,
    /// UDC CPU per full TLS 1.3 mutual handshake (plus one request), measured
    /// on the same UDC after the steps.
    pub tls_udc_cpu_us_per_handshake: f64,
    /// Bytes the UDC received per such handshake and request.
    pub tls_bytes_per_handshake: f64,
    /// Seconds from start to the end of step 6.
    pub elapsed_s: f64,
    /// Every check.
    pub checks: Vec<Check>,
    /// Wall time of each step, in seconds.
    pub step_seconds: Vec<(String, f64)>,
    /// Where the deployment was kept, if it was.
    pub kept: Option<PathBuf>,
    /// Errors the simulated members counted, by kind (transport failures,
    /// refused requests, messages they refused).
    pub member_errors: BTreeMap<String, u64>,
}

impl Summary {
    /// Whether every check held.
    pub fn ok(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.ok)
    }

    /// The summary as one JSON object.
    pub fn to_json(&self) -> Value {
        json!({
            "ok": self.ok(),
            "members": self.members,
            "mode": self.mode,
            "authenticated": self.authenticated,
            "readings_delivered": self.readings_delivered,
            "acks": self.acks,
            "revoked_could_read": self.revoked_could_read,
            "revoked_reason": self.revoked_reason,
            "misbehaviour_rejected": self.misbehaviour_rejected,
            "honest_rejected": self.honest_rejected,
            "rejected": self.rejected.iter().map(|(m, r)| json!({"member": m, "reason": r})).collect::<Vec<_>>(),
            "localizations": self.localizations,
            "udc_cpu_us_per_member": round2(self.udc_cpu_us_per_member),
            "udc_bytes_per_member": round2(self.udc_bytes_per_member),
            "tls_udc_cpu_us_per_handshake": round2(self.tls_udc_cpu_us_per_handshake),
            "tls_bytes_per_handshake": round2(self.tls_bytes_per_handshake),
            "elapsed_s": round2(self.elapsed_s),
            "step_seconds": self.step_seconds.iter().map(|(k, v)| json!({"step": k, "s": round2(*v)})).collect::<Vec<_>>(),
            "checks": self.checks.iter().map(|c| json!({"step": c.step, "check": c.what, "ok": c.ok})).collect::<Vec<_>>(),
            "kept": self.kept.as_ref().map(|p| p.display().to_string()),
            "member_errors": self.member_errors,
        })
    }

    /// The summary as a table.
    pub fn table(&self) -> String {
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        let mut out = String::new();
        let mut row = |k: &str, v: String| out.push_str(&format!("  {k:<44} {v}\n"));
        row("members", self.members.to_string());
        row("mode", self.mode.to_string());
        row(
            "mutually authenticated (step 1)",
            self.authenticated.to_string(),
        );
        row(
            "readings delivered (steps 2-3)",
            self.readings_delivered.to_string(),
        );
        row("update acks, aggregated (steps 4-5)", self.acks.to_string());
        row(
            "revoked member could read (step 5)",
            format!("{} ({})", self.revoked_could_read, self.revoked_reason),
        );
        row(
            "misbehaviour rejected (step 6)",
            format!(
                "{} ({} chunk localizations)",
                self.misbehaviour_rejected, self.localizations
            ),
        );
        row("honest members rejected", self.honest_rejected.to_string());
        for (m, r) in &self.rejected {
            row(&format!("  rejected member {m}"), r.clone());
        }
        row(
            "UDC CPU per member, dapgw",
            format!("{:.1} us", self.udc_cpu_us_per_member),
        );
        row(
            "UDC CPU per member, one mTLS handshake each",
            format!(
                "{:.1} us ({:.0}x)",
                self.tls_udc_cpu_us_per_handshake,
                ratio(
                    self.tls_udc_cpu_us_per_handshake,
                    self.udc_cpu_us_per_member
                )
            ),
        );
        row(
            "UDC bytes in per member, dapgw",
            format!("{:.0} B", self.udc_bytes_per_member),
        );
        row(
            "UDC bytes in per member, one mTLS handshake each",
            format!(
                "{:.0} B ({:.0}x)",
                self.tls_bytes_per_handshake,
                ratio(self.tls_bytes_per_handshake, self.udc_bytes_per_member)
            ),
        );
        let steps: Vec<String> = self
            .step_seconds
            .iter()
            .map(|(k, v)| format!("{}: {v:.1}", k.split(' ').next().unwrap_or(k)))
            .collect();
        row(
            "elapsed",
            format!("{:.1} s (by step, s: {})", self.elapsed_s, steps.join(", ")),
        );
        let failed: Vec<&Check> = self.checks.iter().filter(|c| !c.ok).collect();
        if failed.is_empty() {
            out.push_str(&format!("\n  all {} checks held\n", self.checks.len()));
        } else {
            out.push_str("\n  FAILED checks:\n");
            for c in failed {
                out.push_str(&format!("    step {}: {}\n", c.step, c.what));
            }
        }
        if let Some(dir) = &self.kept {
            out.push_str(&format!("  deployment kept in {}\n", dir.display()));
        }
        out
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// `dapgw demo`: runs the demo on a fresh runtime, prints the summary and
/// fails unless every check held.
pub fn main(args: DemoArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let summary = rt.block_on(run(args.clone()))?;
    if args.json {
        println!("{}", summary.to_json());
    } else {
        print!("\ndapgw demo: summary\n\n{}", summary.table());
    }
    if !summary.ok() {
        bail!("some checks did not hold (see above)");
    }
    Ok(())
}

/// Everything the steps act on.
struct Demo {
    args: DemoArgs,
    exe: PathBuf,
    p: Provisioned,
    udc: Udc,
    gateways: Vec<Gateway>,
    /// One counting TCP relay per gateway in front of the UDC: what the
    /// UDC receives from the gateways, TLS records and HTTP/2 framing
    /// included, counted the way the TLS comparison counts it.
    relays: Vec<crate::sim::bench::relay::Relay>,
    /// One fleet per gateway, in the same order.
    fleets: Vec<Arc<Fleet>>,
    /// Member ids per fleet.
    split: Vec<Vec<u64>>,
    /// Registered, never started: the member gw-b invents a response for.
    offline: u64,
    /// The member revoked in step 5.
    revoked: u64,
    summary: Summary,
    step_timeout: Duration,
}

/// Runs the demo and returns its summary (checks that failed are in it;
/// errors are for a demo that could not run at all).
pub async fn run(args: DemoArgs) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let exe = match &args.exe {
        Some(e) => e.clone(),
        None => std::env::current_exe().context("locating this executable")?,
    };
    let (tmp, dir) = match &args.keep {
        Some(d) => {
            if d.exists() {
                bail!("{} exists; --keep wants a new directory", d.display());
            }
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            (None, d.clone())
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("dapgw-demo-")
                .tempdir()
                .context("creating a temporary directory")?;
            let d = t.path().to_path_buf();
            (Some(t), d)
        }
    };
    let n = args.members;
    let setup = stage("setup", "provisioning keys, certificates, UDC, 2 gateways");
    let p = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || deployment::provision(&dir, n + 1, GROUP, &["gw-a", "gw-b"])
    })
    .await
    .context("provisioning task")??;
    let udc = Udc::start(&exe, &p, &args.log)?;
    let registry: Value = serde_json::from_slice(&std::fs::read(&p.import)?)?;
    let mut imported = 0;
    for chunk in crate::udc::admin_api::import_chunks(&registry).unwrap_or_default() {
        let v = udc
            .admin("POST", "/v1/admin/members/import", Some(chunk))
            .await
            .context("importing the member registry")?;
        imported += v["imported"].as_u64().unwrap_or(0);
    }
    let mut gateways = Vec::new();
    let mut relays = Vec::new();
    for id in ["gw-a", "gw-b"] {
        let relay =
            crate::sim::bench::relay::Relay::spawn(([127, 0, 0, 1], 0).into(), udc.listen).await?;
        gateways.push(Gateway::start(&exe, &p, relay.addr, id, &args.log)?);
        relays.push(relay);
    }
    for g in &gateways {
        g.wait_ready(Duration::from_secs(30)).await?;
    }
    let half = n.div_ceil(2);
    let split: Vec<Vec<u64>> = vec![(1..=half).collect(), (half + 1..=n).collect()];
    let ca = p.pki.ca_cert.clone();
    let tls = client_tls(&ca, None)?;
    let mut fleets = Vec::new();
    for (g, ids) in gateways.iter().zip(&split) {
        let credentials = p
            .credentials
            .iter()
            .filter(|c| ids.binary_search(&c.id).is_ok())
            .cloned()
            .collect();
        let fleet = Fleet::spawn(FleetConfig {
            client: ClientOptions {
                gateway: format!("https://127.0.0.1:{}", g.members.port()),
                tls: tls.clone(),
                connections: 0,
                connect_timeout: Duration::from_secs(10),
            },
            credentials,
            agent: AgentConfig {
                state_dir: p.dir.join(format!("members-{}", g.id)),
                reading_interval: None,
                wait_ms: 20_000,
                reconnect: true,
                backoff_min: Duration::from_millis(50),
                backoff_max: Duration::from_secs(1),
                request_timeout: Duration::from_secs(20),
                // Thousands of meters on one disk: their state files are
                // replaced before each message leaves, without fsync.
                fsync: false,
            },
            member_tls: BTreeMap::new(),
        })?;
        fleets.push(Arc::new(fleet));
    }
    setup.set_length(n);
    let timeout = Duration::from_secs(args.step_timeout_s);
    let attached = || {
        fleets
            .iter()
            .map(|f| load(&f.stats().attached))
            .sum::<u64>()
    };
    progress(&setup, timeout, || async { Ok(attached()) }, n).await?;
    setup.finish_with_message(format!(
        "UDC + 2 gateways up, {imported} members registered, {n} attached (1 offline)"
    ));
    let mut demo = Demo {
        exe,
        udc,
        gateways,
        relays,
        fleets,
        split,
        offline: n + 1,
        revoked: 1,
        summary: Summary {
            members: n,
            mode: args.mode.as_str(),
            ..Summary::default()
        },
        step_timeout: timeout,
        args,
        p,
    };
    let res = demo.steps(started).await;
    let errors = demo.member_errors();
    let mut summary = demo.shutdown().await;
    summary.member_errors = errors;
    if let Err(e) = res {
        return Err(e.context(format!(
            "member-side errors so far: {:?}",
            summary.member_errors
        )));
    }
    if tmp.is_none() {
        summary.kept = Some(dir);
    }
    drop(tmp);
    Ok(summary)
}

impl Demo {
    async fn steps(&mut self, started: Instant) -> anyhow::Result<()> {
        self.step_seconds("setup", started);
        let t = Instant::now();
        self.authenticate().await?;
        self.step_seconds("1 authentication round", t);
        let t = Instant::now();
        self.read_round().await?;
        self.step_seconds("2 group read", t);
        let t = Instant::now();
        self.readings().await?;
        self.step_seconds("3 unsolicited readings", t);
        let t = Instant::now();
        self.update().await?;
        self.step_seconds("4 configuration update", t);
        let t = Instant::now();
        self.revoke().await?;
        self.step_seconds("5 revocation and rekey", t);
        let t = Instant::now();
        self.misbehave().await?;
        self.step_seconds("6 misbehaving gateway", t);
        self.summary.elapsed_s = started.elapsed().as_secs_f64();
        self.compare_tls().await?;
        Ok(())
    }

    fn step_seconds(&mut self, step: &str, since: Instant) {
        self.summary
            .step_seconds
            .push((step.to_string(), since.elapsed().as_secs_f64()));
    }

    fn check(&mut self, step: u8, what: impl Into<String>, ok: bool) {
        self.summary.checks.push(Check {
            step,
            what: what.into(),
            ok,
        });
    }

    /// What went wrong at the members, by kind, over both fleets.
    fn member_errors(&self) -> BTreeMap<String, u64> {
        let mut all = BTreeMap::new();
        for f in &self.fleets {
            for (k, v) in f.stats().errors() {
                *all.entry(k).or_default() += v;
            }
        }
        all
    }

    fn n(&self) -> u64 {
        self.summary.members
    }

    fn total(&self, counter: impl Fn(&Stats) -> u64) -> u64 {
        self.fleets.iter().map(|f| counter(f.stats())).sum()
    }

    /// TCP bytes the UDC has received from the gateways so far.
    fn upstream_bytes(&self) -> f64 {
        self.relays
            .iter()
            .map(|r| r.traffic.bytes_in.load(Ordering::Relaxed) as f64)
            .sum()
    }

    async fn open_round(&self, purpose: &str, read_request: Option<&str>) -> anyhow::Result<u64> {
        let mut body = json!({
            "group": GROUP,
            "mode": self.args.mode.as_str(),
            "purpose": purpose,
            "duration_s": 120,
        });
        if let Some(r) = read_request {
            body["read_request"] = json!(hex::encode(r));
        }
        let v = self
            .udc
            .admin("POST", "/v1/admin/rounds", Some(body))
            .await?;
        v["round"]
            .as_u64()
            .ok_or_else(|| anyhow!("the UDC did not name the round: {v}"))
    }

    async fn round_report(&self, round: u64) -> anyhow::Result<Value> {
        self.udc
            .admin("GET", &format!("/v1/admin/rounds/{GROUP}/{round}"), None)
            .await
    }

    /// Waits for the round's confirms to reach `want` new ones at the
    /// members, then returns the UDC's report of it.
    async fn run_round(
        &self,
        bar: &ProgressBar,
        round: u64,
        confirms_before: u64,
        want: u64,
    ) -> anyhow::Result<Value> {
        bar.set_length(want);
        progress(
            bar,
            self.step_timeout,
            || async {
                Ok(self
                    .total(|s| load(&s.confirms_opened))
                    .saturating_sub(confirms_before))
            },
            want,
        )
        .await?;
        self.round_report(round).await
    }

    /// Rejections in a round report, as `(member, reason)`.
    fn rejected(report: &Value) -> Vec<(u64, String)> {
        report["rejected"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|r| {
                        (
                            r["member"].as_u64().unwrap_or(0),
                            r["reason"].as_str().unwrap_or("?").to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn authenticate(&mut self) -> anyhow::Result<()> {
        let n = self.n();
        let bar = stage("1 authentication round", "members mutually authenticated");
        let confirms = self.total(|s| load(&s.confirms_opened));
        let cpu0 = self.udc.cpu().await?;
        let bytes0 = self.upstream_bytes();
        let round = self.open_round("auth", None).await?;
        let report = self.run_round(&bar, round, confirms, n).await?;
        let cpu = self.udc.cpu().await? - cpu0;
        let bytes = self.upstream_bytes() - bytes0;
        let accepted = report["accepted"].as_u64().unwrap_or(0);
        let rejected = Self::rejected(&report);
        self.summary.authenticated =
            accepted.min(self.total(|s| load(&s.confirms_opened)) - confirms);
        self.summary.udc_cpu_us_per_member = cpu * 1e6 / n as f64;
        self.summary.udc_bytes_per_member = bytes / n as f64;
        self.summary.honest_rejected += rejected.len() as u64;
        self.summary.rejected.extend(rejected.iter().cloned());
        self.check(
            1,
            format!("the UDC accepted all {n} members (it accepted {accepted})"),
            accepted == n,
        );
        self.check(1, "no member rejected", rejected.is_empty());
        self.check(
            1,
            format!(
                "every member opened its confirm ({} did)",
                self.summary.authenticated
            ),
            self.summary.authenticated == n,
        );
        bar.finish_with_message(format!(
            "{accepted}/{n} authenticated, UDC {:.1} us CPU and {:.0} B per member",
            self.summary.udc_cpu_us_per_member, self.summary.udc_bytes_per_member
        ));
        Ok(())
    }

    async fn readings_total(&self) -> anyhow::Result<u64> {
        Ok(self
            .udc
            .metrics()
            .await?
            .sum("dapgw_udc_readings_total", &[]) as u64)
    }

    async fn read_round(&mut self) -> anyhow::Result<()> {
        let n = self.n();
        let bar = stage("2 group read", "readings collected in one round");
        let confirms = self.total(|s| load(&s.confirms_opened));
        let readings0 = self.readings_total().await?;
        let round = self.open_round("read", Some("read register 1.8.0")).await?;
        let report = self.run_round(&bar, round, confirms, n).await?;
        let readings = self.wait_readings(&bar, readings0, n).await?;
        let rejected = Self::rejected(&report);
        self.summary.honest_rejected += rejected.len() as u64;
        self.summary.rejected.extend(rejected.iter().cloned());
        self.summary.readings_delivered += readings;
        let sample = self.sample_reading(self.split[1][0]).await?;
        self.check(
            2,
            format!("the UDC stored a reading from each of the {n} members ({readings})"),
            readings == n,
        );
        self.check(
            2,
            "no member rejected in the read round",
            rejected.is_empty(),
        );
        self.check(
            2,
            format!("a stored reading decrypts to the member's text ({sample:?})"),
            sample.starts_with("meter "),
        );
        bar.finish_with_message(format!("{readings}/{n} readings, e.g. {sample:?}"));
        Ok(())
    }

    async fn wait_readings(
        &self,
        bar: &ProgressBar,
        before: u64,
        want: u64,
    ) -> anyhow::Result<u64> {
        bar.set_length(want);
        progress(
            bar,
            self.step_timeout,
            || async { Ok(self.readings_total().await?.saturating_sub(before)) },
            want,
        )
        .await?;
        Ok(self.readings_total().await?.saturating_sub(before))
    }

    /// The newest stored reading of `member`, as text.
    async fn sample_reading(&self, member: u64) -> anyhow::Result<String> {
        let v = self
            .udc
            .admin("GET", &format!("/v1/admin/readings?member={member}"), None)
            .await?;
        let last = v["readings"]
            .as_array()
            .and_then(|a| a.last())
            .and_then(|r| r["payload_hex"].as_str())
            .and_then(|h| hex::decode(h).ok())
            .unwrap_or_default();
        Ok(String::from_utf8_lossy(&last).into_owned())
    }

    async fn readings(&mut self) -> anyhow::Result<()> {
        let n = self.n();
        let bar = stage("3 unsolicited readings", "readings on the sessions");
        let before = self.readings_total().await?;
        let mut tasks = tokio::task::JoinSet::new();
        for (fleet, ids) in self.fleets.iter().zip(&self.split) {
            for &id in ids {
                let fleet = fleet.clone();
                tasks.spawn(async move { fleet.send_reading(id).await });
            }
        }
        let mut refused = 0u64;
        while let Some(r) = tasks.join_next().await {
            if !matches!(r, Ok(Ok(()))) {
                refused += 1;
            }
        }
        let readings = self.wait_readings(&bar, before, n).await?;
        self.summary.readings_delivered += readings;
        self.check(
            3,
            format!("the gateways accepted every reading ({refused} refused)"),
            refused == 0,
        );
        self.check(
            3,
            format!("the UDC stored all {n} readings ({readings})"),
            readings == n,
        );
        bar.finish_with_message(format!(
            "{readings}/{n} readings stored, in aggregated batches"
        ));
        Ok(())
    }

    async fn publish(&self, payload: &str) -> anyhow::Result<u64> {
        let v = self
            .udc
            .admin(
                "POST",
                &format!("/v1/admin/groups/{GROUP}/updates"),
                Some(json!({"payload_hex": hex::encode(payload)})),
            )
            .await?;
        v["seq"]
            .as_u64()
            .ok_or_else(|| anyhow!("the UDC did not name the update: {v}"))
    }

    /// How many members acked update `seq` (one small answer: the count
    /// and a page of one).
    async fn acked_count(&self, seq: u64) -> anyhow::Result<u64> {
        let v = self
            .udc
            .admin(
                "GET",
                &format!("/v1/admin/groups/{GROUP}/updates/{seq}?limit=1"),
                None,
            )
            .await?;
        v["acked_count"]
            .as_u64()
            .ok_or_else(|| anyhow::anyhow!("the UDC's update answer has no acked_count: {v}"))
    }

    /// Every member that acked update `seq`, page by page.
    async fn acked(&self, seq: u64) -> anyhow::Result<BTreeSet<u64>> {
        let mut acked = BTreeSet::new();
        let mut path = format!("/v1/admin/groups/{GROUP}/updates/{seq}?limit=10000");
        loop {
            let v = self.udc.admin("GET", &path, None).await?;
            acked.extend(
                v["acked"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|x| x["member"].as_u64()),
            );
            match v["next"].as_u64() {
                Some(next) => {
                    path =
                        format!("/v1/admin/groups/{GROUP}/updates/{seq}?limit=10000&after={next}");
                }
                None => return Ok(acked),
            }
        }
    }

    async fn wait_acks(
        &self,
        bar: &ProgressBar,
        seq: u64,
        want: u64,
    ) -> anyhow::Result<BTreeSet<u64>> {
        bar.set_length(want);
        progress(
            bar,
            self.step_timeout,
            || async { self.acked_count(seq).await },
            want,
        )
        .await?;
        self.acked(seq).await
    }

    async fn update(&mut self) -> anyhow::Result<()> {
        let n = self.n();
        let bar = stage(
            "4 configuration update",
            "signed, group-encrypted; acks aggregated",
        );
        let seq = self.publish("tariff=T2; report_every_s=900").await?;
        let acked = self.wait_acks(&bar, seq, n).await?;
        let applied = self.total(|s| s.updates_applied_for(GROUP, seq));
        self.summary.acks += acked.len() as u64;
        self.check(
            4,
            format!("every member applied update {seq} ({applied})"),
            applied == n,
        );
        self.check(
            4,
            format!(
                "the UDC recorded an ack from every member ({})",
                acked.len()
            ),
            acked.len() as u64 == n,
        );
        bar.finish_with_message(format!(
            "update {seq}: applied by {applied}, {} acks at the UDC",
            acked.len()
        ));
        Ok(())
    }

    async fn revoke(&mut self) -> anyhow::Result<()> {
        let n = self.n();
        let r = self.revoked;
        let bar = stage("5 revocation and rekey", "revoked member locked out");
        let rekeys0 = self.total(|s| load(&s.rekeys_applied));
        self.udc
            .admin("POST", &format!("/v1/admin/members/{r}/revoke"), None)
            .await?;
        bar.set_length(n - 1);
        progress(
            &bar,
            self.step_timeout,
            || async {
                Ok(self
                    .total(|s| load(&s.rekeys_applied))
                    .saturating_sub(rekeys0))
            },
            n - 1,
        )
        .await?;
        let seq = self.publish("after revocation: tariff=T3").await?;
        let acked = self.wait_acks(&bar, seq, n - 1).await?;
        // The revoked member gets the group message like everyone attached
        // to the group; wait until it has tried it.
        let fleet = self.fleets[0].clone();
        let deadline = Instant::now() + self.step_timeout;
        let outcome = loop {
            if let Some(o) = fleet.could_read(r, GROUP, seq) {
                break Some(o);
            }
            if Instant::now() >= deadline {
                break None;
            }
            tokio::time::sleep(TICK).await;
        };
        self.summary.revoked_could_read = matches!(outcome, Some(Ok(())));
        self.summary.revoked_reason = match &outcome {
            Some(Ok(())) => "it decrypted the update".into(),
            Some(Err(reason)) => reason.clone(),
            None => "it never received the update".into(),
        };
        self.summary.acks += acked.len() as u64;
        self.check(
            5,
            format!("the other {} members applied the rekey", n - 1),
            self.total(|s| load(&s.rekeys_applied)) - rekeys0 >= n - 1,
        );
        self.check(
            5,
            format!(
                "the UDC recorded {} acks of update {seq} ({})",
                n - 1,
                acked.len()
            ),
            acked.len() as u64 == n - 1 && !acked.contains(&r),
        );
        self.check(
            5,
            format!("revoked member {r} received update {seq} and could not read it"),
            matches!(outcome, Some(Err(_))),
        );
        bar.finish_with_message(format!(
            "member {r} revoked; update {seq} acked by {}; member {r}: {}",
            acked.len(),
            self.summary.revoked_reason
        ));
        Ok(())
    }

    async fn misbehave(&mut self) -> anyhow::Result<()> {
        let n = self.n();
        let bar = stage(
            "6 misbehaving gateway",
            "gw-b killed, restarted compromised",
        );
        let b = &self.split[1];
        let reattaches0 = self.fleets[1].stats().reattaches();
        self.gateways[1].restart(
            &self.exe,
            &self.p.dir,
            &[("DAPGW_MISBEHAVE", format!("tamper:{}", self.offline))],
        )?;
        self.gateways[1].wait_ready(self.step_timeout).await?;
        // Every member of gw-b lost its long poll: wait until each one
        // attached again (counted by member, not by attach, so a member
        // that re-attached twice cannot stand in for one that has not yet),
        // so the round expects them.
        let want = b.len() as u64;
        bar.set_length(want);
        let fleet_b = self.fleets[1].clone();
        progress(
            &bar,
            self.step_timeout,
            || async {
                let now = fleet_b.stats().reattaches();
                let back = b.iter().filter(|m| now.get(m) > reattaches0.get(m)).count();
                Ok(back as u64)
            },
            want,
        )
        .await?;
        let confirms = self.total(|s| load(&s.confirms_opened));
        let round = self.open_round("auth", None).await?;
        // Honest members: all but the revoked one and the one gw-b alters.
        let report = self.run_round(&bar, round, confirms, n - 2).await?;
        let confession = self.gateways[1]
            .proc
            .wait_line("misbehave: tampered", self.step_timeout)?;
        let altered = confession["altered"].as_u64().unwrap_or(0);
        // The UDC decides on gw-b's batch after localizing; wait for it.
        let report = self.wait_decided(round, report, n + 1).await?;
        let rejected = Self::rejected(&report);
        let bad: BTreeSet<u64> = [altered, self.offline].into();
        let caught = rejected.iter().filter(|(m, _)| bad.contains(m)).count() as u64;
        let honest = rejected
            .iter()
            .filter(|(m, _)| !bad.contains(m) && *m != self.revoked)
            .count() as u64;
        let accepted = report["accepted"].as_u64().unwrap_or(0);
        self.summary.misbehaviour_rejected = caught;
        self.summary.honest_rejected += honest;
        self.summary.localizations = report["localizations"].as_u64().unwrap_or(0);
        self.summary.rejected.extend(rejected.iter().cloned());
        let revoked_refused = rejected.iter().any(|(m, _)| *m == self.revoked);
        self.check(
            6,
            format!("gw-b altered member {altered}'s response (its log says so)"),
            b.contains(&altered),
        );
        self.check(
            6,
            format!("the UDC rejected the altered and the invented entry ({caught}/2)"),
            caught == 2,
        );
        self.check(
            6,
            format!(
                "the UDC localized the bad chunks ({} localizations)",
                self.summary.localizations
            ),
            self.summary.localizations > 0,
        );
        self.check(
            6,
            format!(
                "every honest member passed ({accepted} of {} accepted)",
                n - 2
            ),
            accepted == n - 2 && honest == 0,
        );
        self.check(
            6,
            format!("the revoked member {} was refused", self.revoked),
            revoked_refused,
        );
        bar.finish_with_message(format!(
            "rejected member {altered} (altered) and {} (invented); {accepted} honest members passed",
            self.offline
        ));
        Ok(())
    }

    /// Waits until the UDC's report of `round` accounts for `entries`
    /// entries (accepted or rejected).
    async fn wait_decided(
        &self,
        round: u64,
        mut report: Value,
        entries: u64,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + self.step_timeout;
        loop {
            let decided =
                report["accepted"].as_u64().unwrap_or(0) + Self::rejected(&report).len() as u64;
            if decided >= entries || Instant::now() >= deadline {
                return Ok(report);
            }
            tokio::time::sleep(TICK).await;
            report = self.round_report(round).await?;
        }
    }

    /// Full TLS 1.3 mutual-authentication handshakes (no resumption) to the
    /// UDC, each with one small request: what each member would cost the
    /// UDC without the gateway.
    async fn compare_tls(&mut self) -> anyhow::Result<()> {
        let k = TLS_SAMPLES.min(self.n());
        let bar = stage("comparison", "per-member mTLS handshakes to the same UDC");
        bar.set_length(k);
        let (_, cert, key) = self.p.pki.clients[0].clone();
        let client = crate::tls::client_config(&self.p.pki.ca_cert, &cert, &key)?;
        let mut config = (*client.config()).clone();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config.resumption = rustls::client::Resumption::disabled();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let traffic = Arc::new(crate::sim::bench::Traffic::default());
        let body = vec![0u8; 120];
        let cpu0 = self.udc.cpu().await?;
        for i in 0..k {
            handshake(&connector, self.udc.listen, traffic.clone(), &body).await?;
            bar.set_position(i + 1);
        }
        let cpu = self.udc.cpu().await? - cpu0;
        self.summary.tls_udc_cpu_us_per_handshake = cpu * 1e6 / k as f64;
        self.summary.tls_bytes_per_handshake =
            traffic.bytes_out.load(Ordering::Relaxed) as f64 / k as f64;
        bar.finish_with_message(format!(
            "{:.0} us CPU and {:.0} B at the UDC per handshake",
            self.summary.tls_udc_cpu_us_per_handshake, self.summary.tls_bytes_per_handshake
        ));
        Ok(())
    }

    /// Stops members, gateways (SIGTERM drain) and the UDC.
    async fn shutdown(mut self) -> Summary {
        for f in self.fleets.drain(..) {
            if let Some(f) = Arc::into_inner(f) {
                let _ = f.shutdown().await;
            }
        }
        for g in &mut self.gateways {
            g.proc.terminate(Duration::from_secs(5));
        }
        self.udc.proc.terminate(Duration::from_secs(5));
        self.summary
    }
}

/// One full handshake and request; bytes the client wrote are counted.
async fn handshake(
    connector: &tokio_rustls::TlsConnector,
    udc: std::net::SocketAddr,
    traffic: Arc<crate::sim::bench::Traffic>,
    body: &[u8],
) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let tcp = tokio::net::TcpStream::connect(udc).await?;
    let stream = crate::sim::bench::Counting::new(tcp, traffic);
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    let mut tls = connector.connect(name, stream).await?;
    let head = format!(
        "POST /v1/direct HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/vnd.dapgw\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await?;
    tls.write_all(body).await?;
    tls.flush().await?;
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer).await;
    Ok(())
}

fn load(a: &std::sync::atomic::AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// A progress bar for one step (hidden when stderr is not a terminal).
fn stage(prefix: &str, msg: &str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    let style =
        ProgressStyle::with_template("{prefix:<24} [{bar:30.cyan/blue}] {pos:>6}/{len:<6} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(prefix.to_string());
    bar.set_message(msg.to_string());
    bar
}

/// Samples `current` until it reaches `want` (updating `bar`), or fails
/// after `timeout` naming how far it got.
async fn progress<F, Fut>(
    bar: &ProgressBar,
    timeout: Duration,
    current: F,
    want: u64,
) -> anyhow::Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<u64>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let now = current().await?;
        bar.set_position(now.min(want));
        if now >= want {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{}: reached {now} of {want} within {timeout:?}",
                bar.prefix().trim()
            );
        }
        tokio::time::sleep(TICK).await;
    }
}
