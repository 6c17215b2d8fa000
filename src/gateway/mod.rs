//! The gateway (DAP): member-facing server -> collectors/batcher -> spool ->
//! upstream client, and the downlink relay back to members.
//!
//! ```text
//!            +---------- server (HTTPS, h1 + h2) ----------+
//! members -->| attach | uplink --append--> [spool] --submit--> collector --seal--> [spool]
//!            |        |                                                           |
//!            | downlink <--read-- [spool] <--push-- upstream <--GET downlink--    v
//!            +--------------------------------------------+   upstream --POST batches--> UDC
//! ```
//!
//! The gateway holds no keys. Everything it keeps is opaque bytes plus the
//! routing fields needed to batch them and to relay answers, stored in the
//! [`spool`] until the UDC has answered for them. No module here names a
//! key type: the gateway depends on the wire codec, the aggregator and the
//! spool only.
//!
//! [`run`] wires the parts together on already bound listeners and runs until
//! its shutdown future completes (SIGTERM in `dapgw gateway`), then drains:
//! readiness turns 503 at once, the member listener stops accepting, long
//! polls end, what the collector holds is cut into batches and sealed in the
//! spool, and the upstream client sends what it can, all within
//! `DAPGW_DRAIN_GRACE_MS`. SIGHUP reloads both TLS certificates.

pub mod collector;
pub mod downlink;
pub mod misbehave;
pub(crate) mod server;
pub mod spool;
pub(crate) mod upstream;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

use crate::admin::{self, Readiness};
use crate::config::GatewayConfig;
use crate::protocol::aggregator::{AggregatorConfig, UsageError};
use crate::protocol::wire::{GatewayId, MemberId};
use crate::telemetry::{GatewayMetrics, ProcessMetrics};
use crate::tls::{self, TlsError};

use self::collector::{Collector, CollectorConfig};
use self::spool::{Spool, SpoolError};

/// Most members the attach registry remembers; beyond it `/v1/attach`
/// answers 503 (bounds what invented member ids can make the gateway hold).
pub const MAX_ATTACHED_MEMBERS: usize = 1_000_000;

/// Most groups one member may attach to (and name in one downlink poll).
pub const MAX_MEMBER_GROUPS: usize = spool::MAX_READ_GROUPS;

/// How long the spool keeps a downlink item for members that have not read
/// it. Members that stay away longer miss it (docs/gateway.md, "Retention").
pub const DOWNLINK_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// How long a batched uplink is remembered, so a member's byte-identical
/// re-send (its 202 was lost) is absorbed instead of batched again. Later
/// re-sends go to the UDC, which refuses a repeated counter.
pub const UPLINK_DEDUP_WINDOW: Duration = Duration::from_secs(30);

/// Most entries the collector holds (pending plus remembered for
/// [`UPLINK_DEDUP_WINDOW`]); a few hundred bytes each.
pub const UPLINK_HELD_MAX: usize = 1 << 20;

/// How often the spool gauges are refreshed and old downlink items pruned.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(1);

/// Prune old downlink items every this many housekeeping ticks.
const PRUNE_EVERY_TICKS: u32 = 60;

/// The listeners [`run`] serves on, bound by the caller (so tests bind
/// `127.0.0.1:0` and `main` binds only after the config validated).
#[derive(Debug)]
pub struct Listeners {
    /// Member-facing HTTPS (`DAPGW_LISTEN`).
    pub members: TcpListener,
    /// Plain-HTTP admin listener (`DAPGW_ADMIN_LISTEN`).
    pub admin: TcpListener,
}

/// Why the gateway could not start or had to stop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// A TLS file could not be read or does not fit (names the file).
    #[error("tls: {0}")]
    Tls(#[from] TlsError),
    /// The spool could not be opened or failed at startup.
    #[error("{0}")]
    Spool(#[from] SpoolError),
    /// A setting passed validation but the gateway cannot use it.
    #[error("invalid setting {variable}: {reason}")]
    Setting {
        /// The environment variable of the setting.
        variable: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Registering the metric families failed (a programming error).
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Runs the gateway on `listeners` until `shutdown` completes, then drains
/// (see the module doc) and returns. Startup errors (TLS files, the spool)
/// come back before anything is served.
pub async fn run(
    config: GatewayConfig,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), GatewayError> {
    let gateway_id = GatewayId::new(&config.gateway_id).map_err(|_| GatewayError::Setting {
        variable: "DAPGW_GATEWAY_ID",
        reason: "expected 1 to 64 characters from [a-z0-9._-]".into(),
    })?;
    let target = upstream::Target::parse(config.upstream_url.expose()).map_err(|reason| {
        GatewayError::Setting {
            variable: "DAPGW_UPSTREAM_URL",
            reason,
        }
    })?;
    let server_tls = tls::server_config(
        &config.tls_cert,
        &config.tls_key,
        config.member_client_ca.as_deref(),
        config.member_client_ca.is_some(),
    )?;
    let client_tls = tls::client_config(
        &config.upstream_ca,
        &config.upstream_client_cert,
        &config.upstream_client_key,
    )?;
    let mut agg = AggregatorConfig::new(gateway_id);
    agg.chunk_size = config.chunk_size;
    agg.max_batch_entries = usize::try_from(config.batch_max_entries).unwrap_or(usize::MAX);
    // The aggregator remembers every batched uplink for its de-duplication
    // window, so the held cap bounds the sustained rate at cap / window: the
    // protocol core's defaults (65,536 over 60 s) allow only about 1,100
    // uplinks/s. The gateway holds up to UPLINK_HELD_MAX over
    // UPLINK_DEDUP_WINDOW (about 35,000/s; beyond it members get 503 busy).
    agg.uplink_dedup_window = UPLINK_DEDUP_WINDOW;
    agg.max_held_entries = UPLINK_HELD_MAX.max(agg.max_batch_entries);
    agg.uplink_linger = config.batch_linger();
    agg.validate().map_err(|e| match e {
        UsageError::Config(reason) => GatewayError::Setting {
            variable: "DAPGW_BATCH_MAX_ENTRIES",
            reason: reason.into(),
        },
        other => GatewayError::Setting {
            variable: "DAPGW_BATCH_MAX_ENTRIES",
            reason: other.to_string(),
        },
    })?;

    let misbehave = match config.misbehave.as_deref() {
        None => None,
        Some(s) => {
            let spec =
                misbehave::MisbehaveSpec::parse(s).map_err(|reason| GatewayError::Setting {
                    variable: "DAPGW_MISBEHAVE",
                    reason,
                })?;
            tracing::warn!(
                invent = %spec.invent,
                "DAPGW_MISBEHAVE is set: this gateway alters one response per round and invents another (demonstration only)"
            );
            Some(misbehave::Misbehave::new(spec))
        }
    };

    let registry = Registry::new();
    let metrics = GatewayMetrics::try_register(&registry)?;
    let dead_letters = prometheus::IntGauge::new(
        "dapgw_dead_letter_batches",
        "Batches the UDC refused outright (400, 409), kept in the spool's dead_letters table",
    )?;
    registry.register(Box::new(dead_letters.clone()))?;
    ProcessMetrics::register(&registry)?;
    let readiness = Readiness::gateway();

    let dir = config.spool_dir.clone();
    let max = config.spool_max_bytes.get();
    let share = config.spool_share();
    let spool =
        tokio::task::spawn_blocking(move || Spool::open_with_source_share(&dir, max, share))
            .await
            .map_err(|_| SpoolError::Closed)??;
    batch_progress(&metrics);
    readiness.set_spool(true);
    metrics
        .spool_max_bytes
        .set(i64::try_from(max).unwrap_or(i64::MAX));
    update_spool_gauges(&spool, &metrics);

    // The members attached before a restart: their groups stay subscribed
    // and their rounds expect them, unless they expired meanwhile.
    let attach_ttl = config.attach_ttl();
    let attached = Arc::new(Attached::with_share(config.attach_share()));
    let expired = spool
        .expire_attached(
            None,
            attached.now_ms().saturating_sub(duration_ms(attach_ttl)),
        )
        .await?;
    if expired > 0 {
        tracing::info!(
            members = expired,
            "expired attached members silent for longer than DAPGW_ATTACH_TTL_S"
        );
        metrics.attach_expired.inc_by(expired);
    }
    let mut restored = spool.attached_members().await?;
    if !restored.is_empty() {
        tracing::info!(members = restored.len(), "restored the attach registry");
    }
    // Most recently heard first (by the spool's copy of the time, which
    // lags by up to `attach_save_step`), so that where the caps or a source's
    // share are smaller than when the rows were written (stored before
    // the group cap existed, or a share lowered since), the members that
    // are left out are the stalest. They are forgotten in the spool too
    // (a later start would otherwise restore them with their old times)
    // and attach again, refused while there is no room.
    restored.sort_by_key(|r| std::cmp::Reverse(r.seen_ms));
    let mut skipped = Vec::new();
    for row in restored {
        if attached
            .restore(row.member, &row.groups, row.source, row.seen_ms)
            .is_err()
        {
            skipped.push(row.member);
        }
    }
    if !skipped.is_empty() {
        tracing::warn!(
            members = skipped.len(),
            "attach registry: members not restored, they would take the registry or the subscription past its cap or their source past its share"
        );
        if let Err(e) = spool.expire_attached(Some(skipped), u64::MAX).await {
            tracing::warn!(error = %e, "members not restored are still in the spool; tried again at the next start");
        }
    }
    metrics
        .attached_members
        .set(i64::try_from(attached.len()).unwrap_or(i64::MAX));
    let sealed = Arc::new(Notify::new());
    let (drain_tx, drain_rx) = watch::channel(false);
    let (flushed_tx, flushed_rx) = watch::channel(false);
    let collector = Collector::start(
        spool.clone(),
        CollectorConfig {
            aggregator: agg,
            round_deadline: config.round_deadline(),
        },
        attached.clone(),
        metrics.clone(),
        sealed.clone(),
        None,
    )
    .await?;

    let mut tasks = JoinSet::new();
    let (admin_stop_tx, admin_stop_rx) = watch::channel(false);
    tasks.spawn(admin::serve(
        listeners.admin,
        registry,
        readiness.clone(),
        wait_true(admin_stop_rx),
    ));
    let link = Arc::new(upstream::Link::new(
        target,
        client_tls.clone(),
        config.upstream_timeout(),
        metrics.clone(),
        readiness.clone(),
    ));
    let up = upstream::Upstream {
        link,
        spool: spool.clone(),
        collector: collector.handle(),
        attached: attached.clone(),
        metrics: metrics.clone(),
        gateway_id,
        request_timeout: config.upstream_timeout(),
        retry_max: config.retry_max(),
        sealed,
        drain: drain_rx.clone(),
        flushed: flushed_rx,
    };
    let batches = tokio::spawn(up.clone().run_batches());
    tasks.spawn(up.clone().run_downlink());
    tasks.spawn(up.run_subscriptions());
    tasks.spawn(housekeeping(
        spool.clone(),
        metrics.clone(),
        dead_letters,
        readiness.clone(),
    ));
    tasks.spawn(expire_attached(
        attached.clone(),
        spool.clone(),
        metrics.clone(),
        attach_ttl,
    ));
    tasks.spawn(reload_on_sighup(server_tls.clone(), client_tls.clone()));
    tasks.spawn(reload_on_file_change(
        server_tls.clone(),
        [config.tls_cert.clone(), config.tls_key.clone()],
        client_tls,
        [
            config.upstream_client_cert.clone(),
            config.upstream_client_key.clone(),
        ],
    ));

    let (attach_jobs, jobs) = tokio::sync::mpsc::channel(server::ATTACH_QUEUE);
    tasks.spawn(server::run_attach_writer(
        jobs,
        spool.clone(),
        attached.clone(),
        metrics.clone(),
    ));
    let ctx = Arc::new(server::Ctx {
        spool: spool.clone(),
        collector: collector.handle(),
        attached,
        attach_jobs,
        metrics,
        readiness: readiness.clone(),
        limits: server::Limits::from_config(&config),
        member_certs: config.member_client_ca.is_some(),
        drain: drain_rx,
        misbehave,
    });
    let server = tokio::spawn(server::serve(listeners.members, server_tls, ctx));
    tracing::info!("gateway running");

    shutdown.await;
    // Readiness first, so the load balancer stops sending before we stop
    // accepting.
    readiness.set_draining();
    let _ = drain_tx.send(true);
    tracing::info!(grace_ms = config.drain_grace_ms, "draining");
    // Past the grace the batch sender is stopped with everything else (its
    // exchanges in flight too); what it had not finished stays sealed.
    let batches_abort = batches.abort_handle();
    let mut server = server;
    let drained = tokio::time::timeout(config.drain_grace(), async {
        // Connections finish their requests; long polls end on the drain.
        // For half the grace at most: a member sending its body slowly
        // (it has up to DAPGW_HEADER_TIMEOUT_MS) must not use up the whole
        // grace before anything acknowledged is sent.
        if tokio::time::timeout(config.drain_grace() / 2, &mut server)
            .await
            .is_err()
        {
            // Their connections close: nothing of theirs was acknowledged
            // (a 202 follows the spool and the collector), and the members
            // send again to the next gateway process. An entry already
            // handed to the collector is flushed below; a spool write of
            // theirs still running may hand its entry over after the flush
            // (refused for a round the flush closed, or left uncut): no 202
            // went out for it, and what stays in the spool goes out after
            // the next start.
            tracing::warn!(
                "requests still in flight at half the drain grace; closing their connections"
            );
            server.abort();
            let _ = (&mut server).await;
        }
        // Everything collected goes into sealed batches in the spool...
        if let Err(e) = collector.flush().await {
            tracing::warn!(error = %e, "flushing the collector");
        }
        let _ = flushed_tx.send(true);
        // ...and the upstream client sends what it can.
        let _ = batches.await;
    })
    .await;
    match drained {
        Ok(()) => tracing::info!("drained"),
        Err(_) => tracing::warn!(
            pending_batches = spool.pending_batch_count(),
            "drain grace time over; what is left stays in the spool"
        ),
    }
    batches_abort.abort();
    collector.stop().await;
    let _ = admin_stop_tx.send(true);
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    spool.close().await;
    Ok(())
}

/// Completes once the watched flag is true (or its sender is gone).
async fn wait_true(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

/// The time the spool stamps items with: Unix milliseconds.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

pub(crate) fn update_spool_gauges(spool: &Spool, metrics: &GatewayMetrics) {
    metrics
        .spool_bytes
        .set(i64::try_from(spool.bytes()).unwrap_or(i64::MAX));
    metrics
        .spool_entries
        .set(i64::try_from(spool.entries()).unwrap_or(i64::MAX));
    let sealed = i64::try_from(spool.pending_batch_count()).unwrap_or(i64::MAX);
    let was = metrics.spool_sealed_batches.get();
    metrics.spool_sealed_batches.set(sealed);
    // Batches waiting again after none did: the wait starts now, not at
    // the last batch that left (an hour ago on a quiet gateway).
    if was == 0 && sealed > 0 {
        batch_progress(metrics);
    }
}

/// Sets `dapgw_batch_progress_timestamp_seconds` to now.
pub(crate) fn batch_progress(metrics: &GatewayMetrics) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    metrics.batch_progress.set(now);
}

/// Refreshes the spool gauges (and `dapgw_dead_letter_batches`), probes the
/// spool, and prunes downlink items older than [`DOWNLINK_RETENTION`].
async fn housekeeping(
    spool: Spool,
    metrics: GatewayMetrics,
    dead_letters: prometheus::IntGauge,
    readiness: Readiness,
) {
    let mut tick = tokio::time::interval(HOUSEKEEPING_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u32 = 0;
    loop {
        tick.tick().await;
        update_spool_gauges(&spool, &metrics);
        if let Ok(n) = spool.dead_letter_count().await {
            dead_letters.set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        n = n.wrapping_add(1);
        if n.is_multiple_of(PRUNE_EVERY_TICKS) {
            // A successful write is also the spool's health probe.
            match spool
                .prune_downlink_older_than(unix_ms(), DOWNLINK_RETENTION)
                .await
            {
                Ok(p) => {
                    readiness.set_spool(true);
                    if p.rows > 0 {
                        tracing::debug!(rows = p.rows, "pruned old downlink items");
                    }
                }
                Err(e) => {
                    readiness.set_spool(false);
                    tracing::error!(error = %e, "spool housekeeping failed");
                }
            }
        }
    }
}

/// A duration in whole milliseconds, saturating.
fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Longest pause between two sweeps of the attach registry.
const ATTACH_SWEEP_MAX: Duration = Duration::from_secs(60);

/// Longest a member's last-heard time may run ahead of the spool's copy
/// before a sweep writes it.
const ATTACH_SAVE_MAX: Duration = Duration::from_secs(3600);

/// How often the attach registry is swept for `ttl`: a quarter of it, at
/// most [`ATTACH_SWEEP_MAX`], so a member expires between `ttl` and
/// `ttl` plus a quarter of it (at most a minute more) after its last
/// request.
pub(crate) fn attach_sweep_every(ttl: Duration) -> Duration {
    (ttl / 4).clamp(Duration::from_millis(10), ATTACH_SWEEP_MAX)
}

/// How far a member's last-heard time may run ahead of the spool's copy:
/// an eighth of `ttl`, at most [`ATTACH_SAVE_MAX`]. Refreshes are written
/// in bulk by the sweep, not on every request; after a restart a member
/// may therefore expire up to this much (plus one sweep) early.
pub(crate) fn attach_save_step(ttl: Duration) -> Duration {
    (ttl / 8).min(ATTACH_SAVE_MAX)
}

/// One sweep of the attach registry at `now_ms`: writes the refreshed
/// last-heard times the spool lags behind on, then drops the members
/// silent for longer than `ttl` from memory (the subscription follows the
/// registry's group list) and from the spool. Returns the members dropped.
pub(crate) async fn sweep_attached(
    attached: &Attached,
    spool: &Spool,
    metrics: &GatewayMetrics,
    ttl: Duration,
    now_ms: u64,
) -> Vec<u64> {
    let refreshed = attached.unsaved(duration_ms(attach_save_step(ttl)));
    if !refreshed.is_empty() {
        match spool.touch_attached(refreshed.clone()).await {
            Ok(()) => attached.mark_saved(&refreshed),
            Err(e) => tracing::warn!(error = %e, "attached members' last-heard times not stored"),
        }
    }
    let cutoff = now_ms.saturating_sub(duration_ms(ttl));
    let gone = attached.expire(cutoff);
    if !gone.is_empty() {
        tracing::info!(
            members = gone.len(),
            "expired attached members silent for longer than DAPGW_ATTACH_TTL_S"
        );
        metrics
            .attach_expired
            .inc_by(u64::try_from(gone.len()).unwrap_or(u64::MAX));
        // Only rows still older than the cutoff go: a member attached anew
        // since is kept. A failed delete is retried at the next start.
        if let Err(e) = spool.expire_attached(Some(gone.clone()), cutoff).await {
            tracing::warn!(error = %e, "expired attached members not removed from the spool");
        }
    }
    metrics
        .attached_members
        .set(i64::try_from(attached.len()).unwrap_or(i64::MAX));
    gone
}

/// Sweeps the attach registry every [`attach_sweep_every`]`(ttl)`.
async fn expire_attached(
    attached: Arc<Attached>,
    spool: Spool,
    metrics: GatewayMetrics,
    ttl: Duration,
) {
    let mut tick = tokio::time::interval(attach_sweep_every(ttl));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        sweep_attached(&attached, &spool, &metrics, ttl, attached.now_ms()).await;
    }
}

/// Reloads the member-facing certificate and the upstream client
/// certificate on every SIGHUP. Open connections keep their certificate; a
/// failed reload keeps the old one.
async fn reload_on_sighup(server: tls::ReloadableServer, client: tls::ReloadableClient) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; TLS reload disabled");
            return;
        }
    };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading TLS certificates");
        if let Err(e) = server.reload() {
            tracing::error!(error = %e, "member-facing certificate not reloaded");
        }
        if let Err(e) = client.reload() {
            tracing::error!(error = %e, "upstream client certificate not reloaded");
        }
    }
}

/// How often the TLS files are checked for a change.
pub const TLS_WATCH_EVERY: Duration = Duration::from_secs(1);

/// What identifies a file's current content cheaply: modification time,
/// size and inode (a rename-over replaces the inode).
fn file_stamp(path: &std::path::Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// Reloads a certificate when its certificate or key file changes (checked
/// every [`TLS_WATCH_EVERY`]), besides SIGHUP: for tools that replace the
/// files and signal nobody (cert-manager, a mounted secret). A reload that
/// fails (e.g. the certificate is replaced before its key) keeps the old
/// certificate and is tried again on the next change.
async fn reload_on_file_change(
    server: tls::ReloadableServer,
    server_files: [std::path::PathBuf; 2],
    client: tls::ReloadableClient,
    client_files: [std::path::PathBuf; 2],
) {
    let stamps = |files: &[std::path::PathBuf; 2]| files.each_ref().map(|f| file_stamp(f));
    let mut seen_server = stamps(&server_files);
    let mut seen_client = stamps(&client_files);
    let mut tick = tokio::time::interval(TLS_WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = stamps(&server_files);
        if now != seen_server {
            seen_server = now;
            tracing::info!("member-facing TLS files changed: reloading");
            if let Err(e) = server.reload() {
                tracing::error!(error = %e, "member-facing certificate not reloaded");
            }
        }
        let now = stamps(&client_files);
        if now != seen_client {
            seen_client = now;
            tracing::info!("upstream client TLS files changed: reloading");
            if let Err(e) = client.reload() {
                tracing::error!(error = %e, "upstream client certificate not reloaded");
            }
        }
    }
}

/// Which members are attached, and to which groups: a routing hint for the
/// collector (who to expect in a round) and for the upstream subscriptions
/// (whose downlink to pull). Kept in memory and persisted in the spool by
/// the attach endpoint, so a restarted gateway starts with it.
///
/// Each member carries when it was last heard from (any member request
/// naming it, see [`Attached::touch`]); [`Attached::expire`] drops those
/// silent for longer than `DAPGW_ATTACH_TTL_S`. Times are unix
/// milliseconds passed in by the caller, so tests choose them.
#[derive(Debug)]
pub struct Attached {
    inner: Mutex<AttachedInner>,
    /// What one source may hold of the registry.
    share: AttachShare,
    /// The sorted set of groups with at least one member; the upstream
    /// client PUTs it as the subscription whenever it changes.
    groups: watch::Sender<Vec<u32>>,
    /// The registry's clock: the wall clock (unix ms) and tokio's clock
    /// when the registry was made; see [`Attached::now_ms`].
    clock: (u64, tokio::time::Instant),
}

#[derive(Debug, Default)]
struct AttachedInner {
    members: HashMap<u64, AttachedMember>,
    /// Members per group; `BTreeMap` so the group list comes out sorted.
    by_group: BTreeMap<u32, BTreeSet<u64>>,
    /// What each source's members hold, for [`AttachShare`].
    sources: HashMap<SourceKey, SourceUse>,
    /// Members whose latest change is staged but not yet written
    /// ([`Attached::stage`]).
    pending: HashSet<u64>,
}

/// What [`Attached::stage`] made of an attach.
#[derive(Debug)]
pub(crate) enum Staged {
    /// Nothing to write: recorded and durable already (refreshed).
    Unchanged,
    /// Nothing to write: the same change is staged and being written;
    /// answer when it settles.
    Repeat,
    /// Recorded, pending: write it, then [`Attached::settle`].
    Changed(Undo),
}

/// A staged change, and how to undo it.
#[derive(Debug)]
pub(crate) struct Undo {
    member: u64,
    groups: Vec<u32>,
    source: Option<SourceKey>,
    old: Option<AttachedMember>,
}

impl Undo {
    /// The row the spool stores for it: member, groups, source.
    pub(crate) fn row(&self) -> (u64, &[u32], Option<SourceKey>) {
        (self.member, &self.groups, self.source)
    }
}

/// What the members attached from one source hold of the registry.
#[derive(Debug, Default)]
struct SourceUse {
    members: usize,
    /// Of this source's members, how many name each group.
    groups: HashMap<u32, usize>,
}

/// The key a member's attach is counted under: the peer's IPv4 address, or
/// its IPv6 /64 (as `crate::limits::source_key` reduces it, the key of
/// the connection cap and the spool's share).
pub type SourceKey = [u8; 16];

/// What one source may hold of the attach registry, so that one client
/// (without member certificates any client can claim any member id)
/// cannot fill the registry or the subscription for every member. A
/// field of 0 is no share.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttachShare {
    /// Members one source keeps attached.
    pub members: usize,
    /// Distinct groups the members of one source name together.
    pub groups: usize,
}

#[derive(Debug)]
struct AttachedMember {
    groups: Vec<u32>,
    /// Where it last attached from (`None`: restored from a spool that
    /// did not record it; counted in no share).
    source: Option<SourceKey>,
    /// Last heard from (unix ms).
    seen_ms: u64,
    /// The last-heard time the spool holds; refreshed in bulk by the sweep
    /// ([`Attached::unsaved`]) rather than written on every request.
    stored_ms: u64,
}

/// An attach the registry has no room for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AttachFull {
    /// It holds [`MAX_ATTACHED_MEMBERS`] members already.
    #[error("the gateway tracks {0} attached members, its cap")]
    Members(usize),
    /// The groups would take the subscription past
    /// [`crate::protocol::MAX_SUBSCRIBED_GROUPS`] (the UDC would refuse
    /// it, and every group attached after would get no downlink).
    #[error(
        "the gateway subscribes to {0} groups and the UDC takes at most {max}; \
         this attach would add more",
        max = crate::protocol::MAX_SUBSCRIBED_GROUPS
    )]
    Groups(usize),
    /// The attaching source keeps its share of members attached already
    /// ([`AttachShare::members`]).
    #[error("this source keeps {0} members attached, its share of the gateway")]
    SourceMembers(usize),
    /// The groups would take the attaching source past its share of the
    /// subscription ([`AttachShare::groups`]).
    #[error(
        "the members attached from this source name {0} distinct groups, and this attach \
         would take them past the source's share of the gateway's subscription"
    )]
    SourceGroups(usize),
}

impl AttachFull {
    /// The refusal's short code, for the member's answer.
    pub fn code(&self) -> &'static str {
        match self {
            AttachFull::Members(_) => "attach_full",
            AttachFull::Groups(_) => "groups_full",
            AttachFull::SourceMembers(_) => "source_attach_full",
            AttachFull::SourceGroups(_) => "source_groups_full",
        }
    }

    /// The label of `dapgw_attach_rejected_total`.
    pub fn reason(&self) -> crate::telemetry::AttachRefusal {
        use crate::telemetry::AttachRefusal as R;
        match self {
            AttachFull::Members(_) => R::Members,
            AttachFull::Groups(_) => R::Groups,
            AttachFull::SourceMembers(_) => R::SourceMembers,
            AttachFull::SourceGroups(_) => R::SourceGroups,
        }
    }
}

impl Default for Attached {
    fn default() -> Self {
        Self::new()
    }
}

impl Attached {
    /// An empty registry without shares per source.
    pub fn new() -> Self {
        Self::with_share(AttachShare::default())
    }

    /// An empty registry in which one source holds at most `share`.
    pub fn with_share(share: AttachShare) -> Self {
        Attached {
            inner: Mutex::new(AttachedInner::default()),
            share,
            groups: watch::channel(Vec::new()).0,
            clock: (unix_ms(), tokio::time::Instant::now()),
        }
    }

    /// The registry's clock, in Unix milliseconds: the wall clock read when
    /// the registry was made, advanced by tokio's monotonic clock since.
    /// Members' last-heard times and the TTL sweep use it, so a step of the
    /// wall clock neither expires every member at once nor keeps them, and
    /// tests move it with tokio's paused clock.
    pub fn now_ms(&self) -> u64 {
        let (base_ms, base) = self.clock;
        base_ms.saturating_add(duration_ms(
            tokio::time::Instant::now().saturating_duration_since(base),
        ))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AttachedInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records (or replaces) `member`'s groups, attached from `source` and
    /// heard from at `now_ms`, in memory only (the attach endpoint goes
    /// through its writer, `Attached::stage`, which persists first);
    /// true when that changed the groups or the source recorded. The same
    /// as [`Attached::restore`].
    pub fn attach(
        &self,
        member: u64,
        groups: &[u32],
        source: Option<SourceKey>,
        now_ms: u64,
    ) -> Result<bool, AttachFull> {
        self.restore(member, groups, source, now_ms)
    }

    /// Like [`Attached::attach`], with the source and time read back from
    /// the spool at start.
    pub fn restore(
        &self,
        member: u64,
        groups: &[u32],
        source: Option<SourceKey>,
        seen_ms: u64,
    ) -> Result<bool, AttachFull> {
        let groups = normalize_groups(groups);
        let mut inner = self.lock();
        if let Some(m) = inner.members.get_mut(&member)
            && m.groups == groups
            && m.source == source
        {
            m.seen_ms = m.seen_ms.max(seen_ms);
            return Ok(false);
        }
        inner.check_room(member, &groups, source, self.share)?;
        inner.put(
            member,
            AttachedMember {
                groups,
                source,
                seen_ms,
                stored_ms: seen_ms,
            },
        );
        self.publish_groups(inner);
        Ok(true)
    }

    /// Records an attach change before it is written, for the attach
    /// endpoint's single writer (which alone stages, so the caps are
    /// checked in order against everything staged before): the member is
    /// marked pending until [`Attached::settle`], and while it is,
    /// [`Attached::touch_if_durable`] sends its repeats to the writer too,
    /// so none is answered before the change is durable. A member attached
    /// with these groups that comes back from another source with no room
    /// left stays counted where it was (a repeat).
    pub(crate) fn stage(
        &self,
        member: u64,
        groups: &[u32],
        source: Option<SourceKey>,
        now_ms: u64,
    ) -> Result<Staged, AttachFull> {
        let groups = normalize_groups(groups);
        let mut inner = self.lock();
        if inner.is_repeat(member, &groups, source, self.share)? {
            inner.refresh(member, now_ms);
            return Ok(if inner.pending.contains(&member) {
                Staged::Repeat
            } else {
                Staged::Unchanged
            });
        }
        let old = inner.put(
            member,
            AttachedMember {
                groups: groups.clone(),
                source,
                seen_ms: now_ms,
                stored_ms: now_ms,
            },
        );
        inner.pending.insert(member);
        self.publish_groups(inner);
        Ok(Staged::Changed(Undo {
            member,
            groups,
            source,
            old,
        }))
    }

    /// Ends the pending state of the changes staged together: kept when
    /// their write succeeded; undone, last first, when it failed (each
    /// member's record before its change comes back, which held its room
    /// then, since nothing else adds to the registry meanwhile; a record
    /// the sweep removed or replaced since is left as it is).
    pub(crate) fn settle(&self, written: bool, staged: Vec<Undo>) {
        let mut inner = self.lock();
        for u in staged.into_iter().rev() {
            inner.pending.remove(&u.member);
            if written {
                continue;
            }
            let ours = inner
                .members
                .get(&u.member)
                .is_some_and(|m| m.groups == u.groups && m.source == u.source);
            if !ours {
                continue;
            }
            match u.old {
                Some(old) => {
                    inner.put(u.member, old);
                }
                None => {
                    inner.forget(u.member);
                }
            }
        }
        self.publish_groups(inner);
    }

    /// The attach endpoint's fast path, decided under one lock: true when
    /// `member` is recorded and durable (no change of it staged) with
    /// exactly `groups`, from `source` or from another source while this
    /// one has no room (it stays counted where it was), and was refreshed
    /// to `now_ms`; false when the attach is a change for the writer
    /// ([`Attached::stage`]); the refusal of a cap otherwise.
    pub(crate) fn touch_if_durable(
        &self,
        member: u64,
        groups: &[u32],
        source: Option<SourceKey>,
        now_ms: u64,
    ) -> Result<bool, AttachFull> {
        let groups = normalize_groups(groups);
        let mut inner = self.lock();
        if inner.pending.contains(&member)
            || !inner.is_repeat(member, &groups, source, self.share)?
        {
            return Ok(false);
        }
        inner.refresh(member, now_ms);
        Ok(true)
    }

    /// Notes that `member` was heard from at `now_ms`; false when it is
    /// not attached (nothing recorded then).
    pub fn touch(&self, member: u64, now_ms: u64) -> bool {
        self.lock().refresh(member, now_ms)
    }

    /// Whether [`Attached::attach`] would change what is recorded for
    /// `member` (its caps checked too), without changing anything; true
    /// for a member with a change staged and not yet written.
    pub fn would_change(
        &self,
        member: u64,
        groups: &[u32],
        source: Option<SourceKey>,
    ) -> Result<bool, AttachFull> {
        let groups = normalize_groups(groups);
        let inner = self.lock();
        // A change still being written: its repeat waits for it.
        if inner.pending.contains(&member) {
            return Ok(true);
        }
        if inner
            .members
            .get(&member)
            .is_some_and(|m| m.groups == groups && m.source == source)
        {
            return Ok(false);
        }
        inner.check_room(member, &groups, source, self.share)?;
        Ok(true)
    }

    /// Drops every member last heard from before `cutoff_ms` and returns
    /// them, sorted. Groups left without members leave the subscription.
    pub fn expire(&self, cutoff_ms: u64) -> Vec<u64> {
        let mut inner = self.lock();
        let mut gone: Vec<u64> = inner
            .members
            .iter()
            .filter(|(_, m)| m.seen_ms < cutoff_ms)
            .map(|(&id, _)| id)
            .collect();
        if gone.is_empty() {
            return gone;
        }
        gone.sort_unstable();
        for id in &gone {
            inner.forget(*id);
        }
        self.publish_groups(inner);
        gone
    }

    /// The members heard from at least `step_ms` after the time the spool
    /// holds for them, with their latest time: what the sweep writes.
    pub fn unsaved(&self, step_ms: u64) -> Vec<(u64, u64)> {
        let inner = self.lock();
        let mut out: Vec<(u64, u64)> = inner
            .members
            .iter()
            .filter(|(_, m)| m.seen_ms >= m.stored_ms.saturating_add(step_ms))
            .map(|(&id, m)| (id, m.seen_ms))
            .collect();
        out.sort_unstable();
        out
    }

    /// Records that the spool now holds these times (after a successful
    /// [`Spool::touch_attached`]).
    pub fn mark_saved(&self, saved: &[(u64, u64)]) {
        let mut inner = self.lock();
        for (id, t) in saved {
            if let Some(m) = inner.members.get_mut(id) {
                m.stored_ms = m.stored_ms.max(*t);
            }
        }
    }

    /// The members attached to `group`, sorted.
    pub fn members_of(&self, group: u32) -> Vec<MemberId> {
        let inner = self.lock();
        inner
            .by_group
            .get(&group)
            .map(|s| s.iter().map(|&m| MemberId(m)).collect())
            .unwrap_or_default()
    }

    /// Number of attached members.
    pub fn len(&self) -> usize {
        self.lock().members.len()
    }

    /// Whether no member is attached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Watches the sorted list of groups that have members.
    pub fn subscribe_groups(&self) -> watch::Receiver<Vec<u32>> {
        self.groups.subscribe()
    }

    /// Publishes the group list if it changed. Still under the lock, so two
    /// concurrent changes cannot publish their lists out of order.
    fn publish_groups(&self, inner: std::sync::MutexGuard<'_, AttachedInner>) {
        let list: Vec<u32> = inner.by_group.keys().copied().collect();
        self.groups.send_if_modified(|cur| {
            let changed = *cur != list;
            *cur = list;
            changed
        });
        drop(inner);
    }
}

impl AttachedInner {
    /// Whether recording `groups` (normalized) for `member`, attached from
    /// `source`, stays within every cap: the source's share of members and
    /// of distinct groups, then the registry's members and the
    /// subscription's distinct groups, each once the member's old groups
    /// that only it held are gone.
    fn check_room(
        &self,
        member: u64,
        groups: &[u32],
        source: Option<SourceKey>,
        share: AttachShare,
    ) -> Result<(), AttachFull> {
        let old = self.members.get(&member);
        if let Some(s) = source {
            // The member's old record counts against this source only if
            // it came from this source too.
            let kept = old.filter(|m| m.source == Some(s));
            let used = self.sources.get(&s);
            let members = used.map_or(0, |u| u.members);
            if share.members != 0 && kept.is_none() && members >= share.members {
                return Err(AttachFull::SourceMembers(members));
            }
            if share.groups != 0 {
                let count = |g: &u32| used.and_then(|u| u.groups.get(g)).copied();
                let added = groups.iter().filter(|g| count(g).is_none()).count();
                let freed = kept.map_or(0, |m| {
                    m.groups
                        .iter()
                        .filter(|g| groups.binary_search(g).is_err() && count(g) == Some(1))
                        .count()
                });
                let now = used.map_or(0, |u| u.groups.len());
                if added > 0 && now + added - freed > share.groups {
                    return Err(AttachFull::SourceGroups(now));
                }
            }
        }
        if old.is_none() && self.members.len() >= MAX_ATTACHED_MEMBERS {
            return Err(AttachFull::Members(self.members.len()));
        }
        let added = groups
            .iter()
            .filter(|g| !self.by_group.contains_key(g))
            .count();
        if added == 0 {
            return Ok(());
        }
        let freed = old.map_or(0, |m| {
            m.groups
                .iter()
                .filter(|g| {
                    groups.binary_search(g).is_err()
                        && self.by_group.get(g).is_some_and(|s| s.len() == 1)
                })
                .count()
        });
        let after = self.by_group.len() + added - freed;
        if after > crate::protocol::MAX_SUBSCRIBED_GROUPS {
            return Err(AttachFull::Groups(self.by_group.len()));
        }
        Ok(())
    }

    /// Whether attaching `member` to `groups` (normalized) from `source`
    /// is a repeat: recorded with these groups from this source, or from
    /// another while this one has no room left (it stays counted where it
    /// was). Otherwise `Ok(false)` when the change fits every cap, or the
    /// refusal of the first it would pass.
    fn is_repeat(
        &self,
        member: u64,
        groups: &[u32],
        source: Option<SourceKey>,
        share: AttachShare,
    ) -> Result<bool, AttachFull> {
        let (same, from) = match self.members.get(&member) {
            Some(m) => (m.groups == groups, m.source),
            None => (false, None),
        };
        if same && from == source {
            return Ok(true);
        }
        match self.check_room(member, groups, source, share) {
            Ok(()) => Ok(false),
            Err(AttachFull::SourceMembers(_) | AttachFull::SourceGroups(_)) if same => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// Moves `member`'s last-heard time up to `now_ms`; false when it is
    /// not recorded.
    fn refresh(&mut self, member: u64, now_ms: u64) -> bool {
        match self.members.get_mut(&member) {
            Some(m) => {
                m.seen_ms = m.seen_ms.max(now_ms);
                true
            }
            None => false,
        }
    }

    /// Records `entry` for `member` in place of its old record (returned),
    /// keeping the per-group sets and the source counts in step.
    fn put(&mut self, member: u64, entry: AttachedMember) -> Option<AttachedMember> {
        let (groups, source) = (entry.groups.clone(), entry.source);
        let old = self.members.insert(member, entry);
        if let Some(old) = &old {
            self.unlink(member, &old.groups, old.source);
        }
        self.link(member, &groups, source);
        old
    }

    /// Removes `member`'s record (returned), keeping the per-group sets
    /// and the source counts in step.
    fn forget(&mut self, member: u64) -> Option<AttachedMember> {
        let old = self.members.remove(&member)?;
        self.unlink(member, &old.groups, old.source);
        Some(old)
    }

    /// Adds `member` to the per-group sets of `groups` and to its
    /// source's counts.
    fn link(&mut self, member: u64, groups: &[u32], source: Option<SourceKey>) {
        for &g in groups {
            self.by_group.entry(g).or_default().insert(member);
        }
        if let Some(s) = source {
            let used = self.sources.entry(s).or_default();
            used.members += 1;
            for &g in groups {
                *used.groups.entry(g).or_default() += 1;
            }
        }
    }

    /// Removes `member` from the per-group sets of `groups` and from its
    /// source's counts.
    fn unlink(&mut self, member: u64, groups: &[u32], source: Option<SourceKey>) {
        for g in groups {
            if let Some(set) = self.by_group.get_mut(g) {
                set.remove(&member);
                if set.is_empty() {
                    self.by_group.remove(g);
                }
            }
        }
        let Some(s) = source else { return };
        let Some(used) = self.sources.get_mut(&s) else {
            return;
        };
        used.members = used.members.saturating_sub(1);
        for g in groups {
            if let Some(n) = used.groups.get_mut(g) {
                *n -= 1;
                if *n == 0 {
                    used.groups.remove(g);
                }
            }
        }
        if used.members == 0 {
            self.sources.remove(&s);
        }
    }
}

/// A group list as the registry keeps it: sorted, without repeats.
pub(crate) fn normalize_groups(groups: &[u32]) -> Vec<u32> {
    let mut groups = groups.to_vec();
    groups.sort_unstable();
    groups.dedup();
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_keeps_the_subscription_within_the_udcs_group_cap() {
        use crate::protocol::MAX_SUBSCRIBED_GROUPS as MAX;
        let a = Attached::new();
        let rx = a.subscribe_groups();
        // Members 0..16 fill the cap with 256 groups each.
        let per = 256;
        for m in 0..(MAX / per) as u32 {
            let groups: Vec<u32> = (m * per as u32..(m + 1) * per as u32).collect();
            a.attach(u64::from(m), &groups, None, 0).unwrap();
        }
        assert_eq!(rx.borrow().len(), MAX);
        // A new group is refused, checked and applied alike; nothing changed.
        assert_eq!(
            a.would_change(100, &[1_000_000], None),
            Err(AttachFull::Groups(MAX))
        );
        assert_eq!(
            a.attach(100, &[1_000_000], None, 0),
            Err(AttachFull::Groups(MAX))
        );
        assert_eq!(a.len(), MAX / per);
        // Groups already subscribed are fine for anyone.
        assert!(a.attach(100, &[5, 300], None, 0).unwrap());
        // A member trading a group only it holds for a new one fits; one
        // trading a group others hold too does not.
        a.attach(101, &[0], None, 0).unwrap();
        assert_eq!(
            a.attach(101, &[2_000_000], None, 0),
            Err(AttachFull::Groups(MAX))
        );
        let mut groups: Vec<u32> = (per as u32..2 * per as u32).collect();
        groups[0] = 3_000_000;
        assert!(a.attach(1, &groups, None, 0).unwrap());
        assert_eq!(rx.borrow().len(), MAX);
        assert!(rx.borrow().contains(&3_000_000));
        assert!(!rx.borrow().contains(&(per as u32)));
        // Room again once members leave.
        assert_eq!(a.expire(1).len(), MAX / per + 2);
        assert!(a.attach(100, &[1_000_000], None, 1).unwrap());
    }

    #[test]
    fn one_source_holds_only_its_share_of_members_and_groups() {
        let a = Attached::with_share(AttachShare {
            members: 3,
            groups: 4,
        });
        let (x, y, z) = (Some([1; 16]), Some([2; 16]), Some([3; 16]));
        assert!(a.attach(1, &[1, 2], x, 0).unwrap());
        assert!(a.attach(2, &[2, 3], x, 0).unwrap());
        // Two new groups would give x five: refused, checked and applied
        // alike, and nothing changed; one more fits.
        assert_eq!(
            a.would_change(3, &[4, 5], x),
            Err(AttachFull::SourceGroups(3))
        );
        assert_eq!(a.attach(3, &[4, 5], x, 0), Err(AttachFull::SourceGroups(3)));
        assert_eq!(a.len(), 2);
        assert!(a.attach(3, &[4], x, 0).unwrap());
        // x keeps three members: a fourth is refused, another source is
        // served (with groups x holds too: shares are per source).
        assert_eq!(a.attach(4, &[1], x, 0), Err(AttachFull::SourceMembers(3)));
        assert!(a.attach(4, &[1, 2, 3, 4], y, 0).unwrap());
        // Re-attaching from the same source: trading a group only this
        // member holds for a new one fits; adding one does not.
        assert!(a.attach(1, &[2, 9], x, 0).unwrap());
        assert_eq!(
            a.attach(2, &[2, 3, 11], x, 0),
            Err(AttachFull::SourceGroups(4))
        );
        // The same groups from the same source change nothing; from
        // another source they move the member (and its share).
        assert!(!a.attach(3, &[4], x, 5).unwrap());
        assert_eq!(a.would_change(3, &[4], z), Ok(true));
        assert!(a.attach(3, &[4], z, 5).unwrap());
        assert!(a.attach(5, &[2], x, 5).unwrap(), "x holds two members now");
        // A member with no known source (restored from an older spool)
        // counts in no share.
        assert!(a.restore(6, &[20, 21, 22, 23, 24], None, 5).unwrap());
        assert!(a.attach(7, &[2], x, 0).is_err(), "x is at three again");
        // Expiry gives the share back.
        assert_eq!(a.expire(1), vec![1, 2, 4]);
        assert!(a.attach(7, &[30, 31], x, 9).unwrap());
        // Without a share one source may hold anything within the caps.
        let open = Attached::new();
        for m in 0..10 {
            open.attach(m, &[m as u32], x, 0).unwrap();
        }
        assert_eq!(open.len(), 10);
    }

    /// Staged changes take their room at once (checked in order against
    /// everything staged before), make repeats wait, and when their write
    /// fails are undone last first, bringing each member's previous record
    /// back; written ones stay.
    #[test]
    fn staged_changes_take_room_in_order_and_undo_cleanly() {
        use Staged::*;
        let a = Attached::with_share(AttachShare {
            members: 2,
            groups: 2,
        });
        let rx = a.subscribe_groups();
        let x = Some([1; 16]);
        a.attach(1, &[5], x, 0).unwrap();
        assert!(matches!(a.stage(1, &[5], x, 1), Ok(Unchanged)));
        let Ok(Changed(two)) = a.stage(2, &[6], x, 1) else {
            panic!("member 2 fits")
        };
        assert_eq!(a.would_change(2, &[6], x), Ok(true), "pending");
        assert_eq!(a.touch_if_durable(2, &[6], x, 1), Ok(false), "pending");
        assert_eq!(a.touch_if_durable(1, &[5], x, 1), Ok(true), "durable");
        assert!(matches!(a.stage(2, &[6], x, 1), Ok(Repeat)));
        assert_eq!(
            a.stage(3, &[5], x, 1).unwrap_err(),
            AttachFull::SourceMembers(2)
        );
        let Ok(Changed(one)) = a.stage(1, &[7], x, 1) else {
            panic!("member 1 trades group 5, which only it holds")
        };
        assert_eq!(*rx.borrow(), vec![6, 7]);
        a.settle(false, vec![two, one]);
        assert_eq!(*rx.borrow(), vec![5]);
        assert_eq!(a.members_of(5), vec![MemberId(1)]);
        assert_eq!(a.len(), 1);
        assert_eq!(a.would_change(1, &[5], x), Ok(false), "settled");
        // Written: kept, and no longer pending.
        let Ok(Changed(two)) = a.stage(2, &[6], x, 2) else {
            panic!("the room came back")
        };
        a.settle(true, vec![two]);
        assert_eq!(a.would_change(2, &[6], x), Ok(false));
        assert_eq!(*rx.borrow(), vec![5, 6]);
        // From a full source with the same groups: a repeat, counted
        // where it was.
        let y = Some([2; 16]);
        a.attach(3, &[8], y, 0).unwrap();
        let b = Attached::with_share(AttachShare {
            members: 1,
            groups: 0,
        });
        b.attach(1, &[5], x, 0).unwrap();
        b.attach(2, &[5], y, 0).unwrap();
        assert!(matches!(b.stage(1, &[5], y, 3), Ok(Unchanged)));
        assert!(b.stage(1, &[6], y, 3).is_err());
        assert_eq!(b.touch_if_durable(1, &[5], y, 4), Ok(true));
        assert_eq!(
            b.touch_if_durable(1, &[6], y, 4),
            Err(AttachFull::SourceMembers(1))
        );
        assert_eq!(b.touch_if_durable(3, &[5], Some([3; 16]), 4), Ok(false));
    }

    #[test]
    fn attach_replaces_groups_and_tracks_the_group_list() {
        let a = Attached::new();
        let rx = a.subscribe_groups();
        assert!(a.attach(1, &[7, 3, 7], None, 0).unwrap());
        assert!(
            !a.attach(1, &[3, 7], None, 0).unwrap(),
            "the same groups again"
        );
        a.attach(2, &[3], None, 0).unwrap();
        assert_eq!(*rx.borrow(), vec![3, 7]);
        assert_eq!(a.members_of(3), vec![MemberId(1), MemberId(2)]);
        a.attach(1, &[5], None, 0).unwrap();
        assert_eq!(*rx.borrow(), vec![3, 5]);
        assert_eq!(a.members_of(7), Vec::<MemberId>::new());
        assert_eq!(a.len(), 2);
    }

    #[test]
    fn silent_members_expire_and_their_groups_leave_the_subscription() {
        let a = Attached::new();
        let rx = a.subscribe_groups();
        a.attach(1, &[5], None, 1_000).unwrap();
        a.attach(2, &[5, 6], None, 1_000).unwrap();
        a.attach(3, &[7], None, 1_000).unwrap();
        // Member 2 is heard from later; touching an unknown member does
        // nothing.
        assert!(a.touch(2, 5_000));
        assert!(!a.touch(9, 5_000));
        // Re-attaching with the same groups refreshes as well.
        assert!(!a.attach(3, &[7], None, 4_000).unwrap());
        assert_eq!(a.expire(1_000), Vec::<u64>::new(), "not before the cutoff");
        assert_eq!(a.expire(4_500), vec![1, 3]);
        assert_eq!(a.members_of(5), vec![MemberId(2)]);
        assert_eq!(a.members_of(7), Vec::<MemberId>::new());
        assert_eq!(*rx.borrow(), vec![5, 6]);
        assert_eq!(a.len(), 1);
        assert_eq!(a.expire(5_001), vec![2]);
        assert!(rx.borrow().is_empty());
        assert!(a.is_empty());
        // An expired member attaches again as new.
        assert!(a.attach(2, &[5, 6], None, 9_000).unwrap());
        assert_eq!(*rx.borrow(), vec![5, 6]);
    }

    #[test]
    fn only_times_ahead_of_the_spool_by_a_step_are_saved() {
        let a = Attached::new();
        a.attach(1, &[5], None, 1_000).unwrap();
        a.attach(2, &[5], None, 1_000).unwrap();
        a.touch(1, 1_400);
        a.touch(2, 1_600);
        assert_eq!(a.unsaved(500), vec![(2, 1_600)]);
        a.mark_saved(&[(2, 1_600)]);
        assert!(a.unsaved(500).is_empty());
        assert_eq!(a.unsaved(0), vec![(1, 1_400), (2, 1_600)]);
    }

    #[test]
    fn sweep_periods_follow_the_ttl() {
        let day = Duration::from_secs(86_400);
        assert_eq!(attach_sweep_every(7 * day), ATTACH_SWEEP_MAX);
        assert_eq!(attach_save_step(7 * day), ATTACH_SAVE_MAX);
        let s = Duration::from_secs(2);
        assert_eq!(attach_sweep_every(s), Duration::from_millis(500));
        assert_eq!(attach_save_step(s), Duration::from_millis(250));
    }

    /// The sweep writes refreshed times, drops silent members from memory
    /// and from the spool, and keeps a member attached anew meanwhile.
    #[tokio::test]
    async fn sweep_expires_in_memory_and_in_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let metrics = GatewayMetrics::register(&Registry::new());
        let ttl = Duration::from_secs(100);
        let a = Attached::new();
        for (m, g) in [(1u64, 5u32), (2, 6), (3, 7)] {
            spool.set_attached(m, &[g], None, 0).await.unwrap();
            a.attach(m, &[g], None, 0).unwrap();
        }
        // Member 2 keeps talking (memory only); member 3 is silent in
        // memory but attaches anew through another path before the delete.
        a.touch(2, 90_000);
        spool.set_attached(3, &[7], None, 95_000).await.unwrap();
        let gone = sweep_attached(&a, &spool, &metrics, ttl, 120_000).await;
        assert_eq!(gone, vec![1, 3]);
        assert_eq!(metrics.attach_expired.get(), 2);
        assert_eq!(metrics.attached_members.get(), 1);
        assert_eq!(*a.subscribe_groups().borrow(), vec![6]);
        let rows: Vec<(u64, u64)> = spool
            .attached_members()
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.member, r.seen_ms))
            .collect();
        // Member 2's time was written (it ran ahead by more than ttl/8);
        // member 3's fresh row survived the conditional delete.
        assert_eq!(rows, vec![(2, 90_000), (3, 95_000)]);
        // At start, everything older than the cutoff goes at once.
        assert_eq!(spool.expire_attached(None, 92_000).await.unwrap(), 1);
        assert_eq!(spool.attached_members().await.unwrap().len(), 1);
        spool.close().await;
    }
}
