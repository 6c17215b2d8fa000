//! `dapgw`: the command line over the library. Thin on purpose
//! (linkerd2-proxy's `main.rs`): parse arguments, load and validate the
//! configuration before binding any port, then hand over to the service.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 bad command line (clap),
//! 64 bad configuration (sysexits `EX_USAGE`).
//!
//! Each subcommand is one variant of [`Command`] and one `fn` below; a new
//! service adds its arm to the `match` in [`main`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use dapgw::sim::bench;
use dapgw::{admin, config, telemetry, tls};

mod alloc_policy;

/// Exit status for a configuration that does not load or validate.
const EX_CONFIG: u8 = 64;

/// Exit status of `dapgw udc recover` when a counter cannot rise any
/// further (sysexits' EX_DATAERR).
const EX_DATAERR: u8 = 65;

/// Exit status of `dapgw udc recover` when the store changed while it ran
/// (a UDC process is serving it; sysexits' EX_TEMPFAIL).
const EX_TEMPFAIL: u8 = 75;

#[derive(Parser, Debug)]
#[command(
    name = "dapgw",
    version,
    about = "Group authentication for smart-metering networks through a gateway that cannot cheat"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway (DAP): members -> batches -> the UDC.
    Gateway(ServiceArgs),
    /// Run the reference data center (UDC) that verifies batches, or (with a
    /// subcommand) operate a running one through its admin API.
    Udc(UdcArgs),
    /// Create key material.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// The whole use case on this host: a UDC, two gateways and simulated
    /// members in a throwaway deployment, six steps, a summary.
    Demo(dapgw::demo::DemoArgs),
    /// Run simulated members against a gateway.
    Sim(dapgw::sim::run::SimArgs),
    /// Measure the gateway against direct member-to-UDC traffic.
    Bench(BenchArgs),
    /// Probe a running service's admin listener (container health check).
    Health(HealthArgs),
}

#[derive(Args, Debug)]
struct ServiceArgs {
    /// TOML config file; overrides DAPGW_CONFIG. DAPGW_* variables override
    /// its values.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct UdcArgs {
    #[command(flatten)]
    service: ServiceArgs,
    /// Operator action; without one, the UDC service runs.
    #[command(subcommand)]
    op: Option<UdcOp>,
}

/// Where the operator subcommands find the admin API.
#[derive(Args, Debug, Clone)]
struct AdminTarget {
    /// The UDC's admin listener: host:port or http://host:port.
    #[arg(
        long,
        env = "DAPGW_ADMIN_LISTEN",
        default_value = "127.0.0.1:9091",
        global = true
    )]
    admin: String,
    /// File holding the operator bearer token.
    #[arg(long, env = "DAPGW_ADMIN_TOKEN_FILE", global = true)]
    token_file: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum UdcOp {
    /// Rounds: start one now, show one, schedule recurring ones.
    #[command(subcommand)]
    Round(RoundOp),
    /// Alias of `round`: `dapgw udc rounds show G R`.
    #[command(subcommand)]
    Rounds(RoundOp),
    /// Send a configuration update to a group, or show who acked one.
    Update(UpdateArgs),
    /// Revoke a member (new epoch and rekey in its groups).
    Revoke(OneMember),
    /// Move a member's root key to the next version, sent in its psk-ecdhe
    /// sessions (it needs one: run a psk-ecdhe round first). The old
    /// version stays accepted until the member answers under the new one.
    KeyUpdate(KeyUpdateArgs),
    /// After restoring the store from a backup, before starting any UDC
    /// process: opens the store of the UDC's config, raises every counter
    /// (groups, gateway cursors, registry version, the floor for what is
    /// created later), drops every session and queues a psk-ecdhe round
    /// per group, in one transaction. Revocations, key updates and
    /// configuration updates made after the backup are undone by the
    /// restore: name revoked members with --revoke, make the rest again.
    Recover(RecoverArgs),
    /// Members: list them, add one, import a registry file.
    Members(MembersArgs),
    /// Readings of a member in a time range.
    Readings(ReadingsArgs),
    /// Per-gateway counters.
    Gateways(TargetOnly),
}

#[derive(Args, Debug)]
struct TargetOnly {
    #[command(flatten)]
    target: AdminTarget,
}

#[derive(Subcommand, Debug)]
enum RoundOp {
    /// Open a round for a group now.
    Start {
        #[command(flatten)]
        target: AdminTarget,
        /// The group.
        #[arg(long)]
        group: u32,
        /// psk or psk-ecdhe.
        #[arg(long, default_value = "psk-ecdhe")]
        mode: String,
        /// auth or read (default: the operator API's, auth).
        #[arg(long)]
        purpose: Option<String>,
        /// Read request bytes (hex), for read rounds: needs `--purpose
        /// read` (refused on an auth round).
        #[arg(long)]
        read_request: Option<String>,
        /// Seconds the round stays open.
        #[arg(long, default_value_t = 300)]
        duration_s: u64,
    },
    /// Show a round's results.
    Show {
        #[command(flatten)]
        target: AdminTarget,
        /// The group.
        group: u32,
        /// The round.
        round: u64,
        /// List rejected and missing members after this member id (each
        /// list holds at most 1000).
        #[arg(long)]
        after: Option<u64>,
    },
    /// Schedule recurring rounds (e.g. every 14400 s for 6 reads a day).
    Schedule {
        #[command(flatten)]
        target: AdminTarget,
        /// The group.
        #[arg(long)]
        group: u32,
        /// Period in seconds.
        #[arg(long)]
        every_s: u64,
        /// psk or psk-ecdhe.
        #[arg(long, default_value = "psk-ecdhe")]
        mode: String,
        /// auth or read (default: the operator API's, auth).
        #[arg(long)]
        purpose: Option<String>,
        /// Read request bytes (hex) every read round of the schedule
        /// carries (default: empty, the meter's default reading); needs
        /// `--purpose read` (refused on an auth schedule).
        #[arg(long)]
        read_request: Option<String>,
    },
    /// List schedules.
    Schedules(TargetOnly),
    /// Delete a schedule.
    Unschedule {
        #[command(flatten)]
        target: AdminTarget,
        /// The schedule id (from `schedules`).
        id: u64,
    },
    /// Close an open round now (members not heard from count as missing).
    Close {
        #[command(flatten)]
        target: AdminTarget,
        /// The group.
        group: u32,
        /// The round.
        round: u64,
    },
}

#[derive(Args, Debug)]
struct UpdateArgs {
    #[command(flatten)]
    target: AdminTarget,
    /// The group.
    #[arg(long)]
    group: u32,
    /// File whose bytes are the payload.
    #[arg(long, conflicts_with = "show")]
    payload_file: Option<PathBuf>,
    /// Last round the update applies to.
    #[arg(long)]
    valid_through_round: Option<u64>,
    /// Show who acked update SEQ instead of sending one (the count, and
    /// the first 1000 members by id).
    #[arg(long, value_name = "SEQ")]
    show: Option<u64>,
    /// With --show: list the members after this member id (the `next`
    /// of the page before).
    #[arg(long, requires = "show")]
    after: Option<u64>,
}

/// An operator call about one member.
#[derive(Args, Debug)]
struct OneMember {
    #[command(flatten)]
    target: AdminTarget,
    /// The member.
    member: u64,
}

/// `dapgw udc key-update`.
#[derive(Args, Debug)]
struct KeyUpdateArgs {
    #[command(flatten)]
    target: AdminTarget,
    /// The member.
    member: u64,
    /// Issue only if the member's key version is still this one (the `kv`
    /// of `dapgw udc members`); otherwise refused `kv_changed`. Makes a
    /// repeated call safe when the answer to the first was lost.
    #[arg(long)]
    expect_kv: Option<u32>,
}

#[derive(Args, Debug)]
struct RecoverArgs {
    /// Confirms the store was restored from a backup and no UDC process is
    /// running on it (recovery drops every member's session).
    #[arg(long)]
    restored_from_backup: bool,
    /// The UDC's TOML config file (as for `dapgw udc`); overrides
    /// DAPGW_CONFIG. DAPGW_* variables override its values. The recovery
    /// uses its store URL and key files.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// How long the recovery's psk-ecdhe rounds stay open, in seconds
    /// (at most a year). Start the UDC processes well within it.
    #[arg(long, value_name = "S", default_value_t = 3600,
          value_parser = clap::value_parser!(u64).range(1..=366 * 24 * 3600))]
    round_duration_s: u64,
    /// Members revoked after the backup (the restore made them active
    /// again): marked revoked in the recovery's transaction, before its
    /// rounds are queued. Comma-separated ids; may be repeated.
    #[arg(long, value_name = "ID[,ID...]", value_delimiter = ',')]
    revoke: Vec<u64>,
    /// As --revoke, from a file: one member id per line (blank lines and
    /// lines starting with `#` are skipped).
    #[arg(long, value_name = "FILE")]
    revoked_file: Option<PathBuf>,
}

/// The member ids of a `--revoked-file`: one per line, blank lines and
/// `#` comments skipped.
fn revoked_ids(path: &std::path::Path) -> anyhow::Result<Vec<u64>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("--revoked-file {}: {e}", path.display()))?;
    let mut ids = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        ids.push(line.parse::<u64>().map_err(|_| {
            anyhow::anyhow!(
                "--revoked-file {} line {}: not a member id",
                path.display(),
                n + 1
            )
        })?);
    }
    Ok(ids)
}

#[derive(Args, Debug)]
struct MembersArgs {
    #[command(flatten)]
    target: AdminTarget,
    /// Add this member (with --groups) instead of listing.
    #[arg(long, requires = "groups")]
    add: Option<u64>,
    /// Groups of the added member, comma separated.
    #[arg(long, value_delimiter = ',')]
    groups: Vec<u32>,
    /// With --add: the member's root key version (default: the stored one,
    /// 1 for a new member); only this version is accepted afterwards.
    #[arg(long, requires = "add")]
    kv: Option<u32>,
    /// Import a registry file written by `dapgw keys members` or `dapgw
    /// keys import-vendor`.
    #[arg(long, value_name = "FILE", conflicts_with = "add")]
    import: Option<PathBuf>,
    /// List members after this id.
    #[arg(long)]
    after: Option<u64>,
}

#[derive(Args, Debug)]
struct ReadingsArgs {
    #[command(flatten)]
    target: AdminTarget,
    /// The member.
    #[arg(long)]
    member: u64,
    /// From (unix ms, inclusive).
    #[arg(long, default_value_t = 0)]
    from: u64,
    /// To (unix ms, exclusive).
    #[arg(long, default_value_t = u64::MAX)]
    to: u64,
    /// At most this many (1 to 10000); `"truncated": true` says there may
    /// be more: ask again with `--after` the answer's `next`.
    #[arg(long, default_value_t = 10_000)]
    limit: u32,
    /// Start after this position (the `next` of the previous page).
    #[arg(long)]
    after: Option<String>,
}

#[derive(Subcommand, Debug)]
enum KeysCommand {
    /// Write a throwaway CA, a server certificate and client certificates
    /// (development and tests only). Name member certificates
    /// `--client member-<id>`.
    DevPki(DevPkiArgs),
    /// Write a master secret, storage key, offline root key and a
    /// root-certified online signing key into DIR (0600 for secrets).
    Init {
        /// Directory to write into.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Replace the online signing key with a fresh one certified by the root.
    RotateSigningKey {
        /// Directory written by `keys init`.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The root key, if it was moved out of DIR.
        #[arg(long, value_name = "FILE")]
        root: Option<PathBuf>,
    },
    /// Write member credentials (the file a meter factory injects) and the
    /// UDC's registry import file (`<out>.import.json`).
    Members {
        /// Directory written by `keys init` (master.key, root.pub, and
        /// signing.cert for the credentials' minimum online key version).
        #[arg(long, value_name = "DIR")]
        keys: PathBuf,
        /// First member id.
        #[arg(long)]
        from: u64,
        /// How many members.
        #[arg(long)]
        count: u64,
        /// Groups, comma separated.
        #[arg(long, value_delimiter = ',', required = true)]
        groups: Vec<u32>,
        /// Credential file to write.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Turn a meter vendor's key file (`id,key-hex` per line) into the UDC's
    /// registry import file, each key imported as
    /// `K_i = HKDF(vendor key, "dapgw v1 import")` and sealed under the
    /// storage key (never in the clear in the file or on the operator API).
    ImportVendor {
        /// Directory written by `keys init` (storage.key; root.pub and
        /// signing.cert with `--credentials`).
        #[arg(long, value_name = "DIR")]
        keys: PathBuf,
        /// The vendor's key file.
        #[arg(long, value_name = "FILE")]
        vendor_keys: PathBuf,
        /// Groups, comma separated.
        #[arg(long, value_delimiter = ',', required = true)]
        groups: Vec<u32>,
        /// Key version the imported keys get.
        #[arg(long, default_value_t = 1)]
        kv: u32,
        /// Registry import file to write (load it with `dapgw udc members
        /// --import`).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Also write the member credential file that meters holding these
        /// vendor keys compute (for simulated meters and tests only).
        #[arg(long, value_name = "FILE")]
        credentials: Option<PathBuf>,
    },
}

#[derive(Args, Debug)]
struct DevPkiArgs {
    /// Directory to write into (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Extra DNS name or IP for the server certificate (besides localhost
    /// and 127.0.0.1); repeatable.
    #[arg(long = "server-name", value_name = "NAME")]
    server_names: Vec<String>,
    /// Client certificate to issue, named by its DNS SAN; repeatable.
    #[arg(long = "client", value_name = "NAME", default_value = "gw-1")]
    clients: Vec<String>,
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
struct BenchArgs {
    #[command(subcommand)]
    role: Option<BenchRole>,
    #[command(flatten)]
    options: bench::BenchOptions,
}

#[derive(Subcommand, Debug)]
enum BenchRole {
    /// One role process of a bench scenario (started by `dapgw bench`).
    #[command(subcommand, hide = true)]
    Role(bench::RoleCommand),
}

#[derive(Args, Debug)]
struct HealthArgs {
    /// Admin listener to probe: host:port or http://host:port.
    #[arg(long, env = "DAPGW_ADMIN_LISTEN", default_value = "127.0.0.1:9090")]
    url: String,
    /// Check liveness (/healthz) instead of readiness (/readyz).
    #[arg(long)]
    live: bool,
    /// Give up after this many milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    timeout_ms: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if serves_as_udc(&cli.command) {
        let accepted = alloc_policy::keep_freed_memory();
        debug_assert!(accepted, "glibc refused an allocator setting");
    }
    match cli.command {
        Command::Gateway(args) => gateway(args),
        Command::Udc(args) => udc(args),
        Command::Keys(KeysCommand::DevPki(args)) => report(dev_pki(args)),
        Command::Keys(cmd) => report(keys(cmd)),
        Command::Demo(args) => report(dapgw::demo::main(args)),
        Command::Sim(args) => report(sim(args)),
        Command::Bench(BenchArgs {
            role: Some(BenchRole::Role(role)),
            ..
        }) => report(bench::run_role(role)),
        Command::Bench(BenchArgs { options, .. }) => report(bench::main(&options)),
        Command::Health(args) => health(args),
    }
}

/// The processes that act as a UDC: `dapgw udc` serving (not its
/// operator subcommands), and the UDC roles of `dapgw bench`, the
/// baselines' as well as dapgw's, so that the scenarios compare like with
/// like. (`dapgw demo` starts its UDC as a `dapgw udc` child process.)
fn serves_as_udc(command: &Command) -> bool {
    use bench::RoleCommand::{DapgwUdc, Udc};
    matches!(
        command,
        Command::Udc(UdcArgs { op: None, .. })
            | Command::Bench(BenchArgs {
                role: Some(BenchRole::Role(Udc(_) | DapgwUdc(_))),
                ..
            })
    )
}

/// Prints a runtime error with its causes and maps it to exit status 1.
fn report(res: anyhow::Result<()>) -> ExitCode {
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dapgw: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Like [`report`], once logging is set up: the error goes through the
/// subscriber so that a JSON log stays all JSON.
fn report_logged(res: anyhow::Result<()>) -> ExitCode {
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "exiting");
            ExitCode::FAILURE
        }
    }
}

fn sim(args: dapgw::sim::run::SimArgs) -> anyhow::Result<()> {
    runtime()?.block_on(dapgw::sim::run::run(args))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Loads the config or prints every problem; `Err` carries the exit code.
fn load<C>(name: &str, res: Result<C, config::ConfigError>) -> Result<C, ExitCode> {
    res.map_err(|e| {
        eprintln!("dapgw {name}: {e}");
        ExitCode::from(EX_CONFIG)
    })
}

fn start_logging(log: &str, format: telemetry::LogFormat) -> Result<(), ExitCode> {
    telemetry::init_logging(log, format).map_err(|e| {
        eprintln!("dapgw: {e}");
        ExitCode::from(EX_CONFIG)
    })
}

fn gateway(args: ServiceArgs) -> ExitCode {
    // Config first: nothing is bound if it is wrong.
    let config = match load("gateway", config::load_gateway(args.config.as_deref())) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Err(code) = start_logging(&config.log, config.log_format) {
        return code;
    }
    report_logged(runtime().and_then(|rt| {
        rt.block_on(async {
            let admin = bind_admin(config.admin_listen).await?;
            let members = tokio::net::TcpListener::bind(config.listen)
                .await
                .with_context(|| {
                    format!(
                        "binding the member listener on {} (DAPGW_LISTEN)",
                        config.listen
                    )
                })?;
            tracing::info!(
                admin = %admin.local_addr()?,
                members = %members.local_addr()?,
                "listeners bound"
            );
            let listeners = dapgw::gateway::Listeners { members, admin };
            dapgw::gateway::run(config, listeners, shutdown_signal()?)
                .await
                .context("gateway")
        })
    }))
}

/// Completes on SIGTERM or SIGINT (the drain starts then).
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()> + Send> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}

fn udc(args: UdcArgs) -> ExitCode {
    match args.op {
        Some(UdcOp::Recover(r)) => return udc_recover(r, args.service.config),
        Some(op) => return report(udc_op(op)),
        None => {}
    }
    let args = args.service;
    let config = match load("udc", config::load_udc(args.config.as_deref())) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Err(code) = start_logging(&config.log, config.log_format) {
        return code;
    }
    report_logged(runtime().and_then(|rt| {
        rt.block_on(async {
            let admin = bind_admin(config.admin_listen).await?;
            let listen = config.listen;
            let udc_listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen} (DAPGW_LISTEN)"))?;
            tracing::info!(admin = %admin.local_addr()?, listen = %udc_listener.local_addr()?, "udc listening");
            dapgw::udc::run(
                config,
                dapgw::udc::Listeners {
                    udc: udc_listener,
                    admin,
                },
                sigterm(),
            )
            .await
        })
    }))
}

async fn bind_admin(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the admin listener on {addr} (DAPGW_ADMIN_LISTEN)"))
}

/// Completes on SIGTERM or Ctrl-C.
async fn sigterm() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn keys(cmd: KeysCommand) -> anyhow::Result<()> {
    use dapgw::udc::keys_cmd;
    match cmd {
        KeysCommand::DevPki(args) => dev_pki(args),
        KeysCommand::Init { out } => {
            for p in keys_cmd::init(&out)? {
                println!("wrote {}", p.display());
            }
            println!(
                "move {} to offline storage; the UDC needs only master.key, storage.key, signing.key and signing.cert",
                out.join(keys_cmd::files::ROOT).display()
            );
            Ok(())
        }
        KeysCommand::RotateSigningKey { dir, root } => {
            let v = keys_cmd::rotate_signing_key(&dir, root.as_deref())?;
            println!("new online signing key, key_version {v}; restart or reload the UDC");
            Ok(())
        }
        KeysCommand::Members {
            keys,
            from,
            count,
            groups,
            out,
        } => {
            let import = keys_cmd::members(&keys, from, count, &groups, &out)?;
            println!("wrote {} ({count} credentials, mode 0600)", out.display());
            println!(
                "wrote {} (load it with `dapgw udc members --import`)",
                import.display()
            );
            Ok(())
        }
        KeysCommand::ImportVendor {
            keys,
            vendor_keys,
            groups,
            kv,
            out,
            credentials,
        } => {
            let done = keys_cmd::import_vendor(
                &keys,
                &vendor_keys,
                &groups,
                kv,
                &out,
                credentials.as_deref(),
            )?;
            println!(
                "wrote {} ({} members, keys sealed, mode 0600; load it with `dapgw udc members --import`)",
                done.import.display(),
                done.members
            );
            if let Some(c) = done.credentials {
                println!("wrote {} (member credentials, mode 0600)", c.display());
            }
            Ok(())
        }
    }
}

/// `dapgw udc recover`: the recovery after a restore, offline, on the
/// store and keys of the UDC's config (docs/udc.md, "Restoring a backup").
/// Prints the report as JSON; exit 64 on bad config, 65 if a counter is
/// exhausted, 75 if the store changed while it ran, 1 on other failures.
fn udc_recover(args: RecoverArgs, parent_config: Option<PathBuf>) -> ExitCode {
    use dapgw::udc::service::RecoverError;
    if !args.restored_from_backup {
        eprintln!(
            "dapgw udc recover: recovery drops every member's session; run it only after \
             restoring the store from a backup, with no UDC process running, as \
             `dapgw udc recover --restored-from-backup`"
        );
        return ExitCode::from(EX_CONFIG);
    }
    let mut revoke = args.revoke;
    if let Some(file) = &args.revoked_file {
        match revoked_ids(file) {
            Ok(ids) => revoke.extend(ids),
            Err(e) => {
                eprintln!("dapgw udc recover: {e:#}; nothing was written");
                return ExitCode::from(EX_CONFIG);
            }
        }
    }
    let path = args.config.or(parent_config);
    let config = match load("udc", config::load_udc(path.as_deref())) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return report(Err(e)),
    };
    let duration_ms = args.round_duration_s.saturating_mul(1000);
    let res = rt.block_on(async {
        let udc = dapgw::udc::build(&config).await?;
        Ok::<_, anyhow::Error>(udc.recover_after_restore(duration_ms, revoke).await)
    });
    let rec = match res {
        Ok(Ok(rec)) => rec,
        Ok(Err(e)) => {
            eprintln!("dapgw udc recover: {e}");
            return ExitCode::from(match e {
                RecoverError::CounterExhausted(_) => EX_DATAERR,
                RecoverError::StoreChanged(_) => EX_TEMPFAIL,
                _ => 1,
            });
        }
        Err(e) => return report(Err(e)),
    };
    match serde_json::to_string_pretty(&rec) {
        Ok(json) => println!("{json}"),
        Err(e) => return report(Err(e.into())),
    }
    let since = rec.newest_record_ms.map_or_else(
        || "the backup was taken".to_owned(),
        |ms| format!("{ms} (unix ms; the restored store's newest record)"),
    );
    if !rec.revoke_not_found.is_empty() {
        eprintln!(
            "dapgw udc recover: not in the restored store (added after the backup), nothing \
             to revoke: {:?}",
            rec.revoke_not_found
        );
    }
    eprintln!(
        "dapgw udc recover: done. The restore undid everything made after {since}: \
         revocations (a member revoked since and not named by --revoke/--revoked-file is \
         active again: `dapgw udc revoke` it as soon as the UDC runs), key updates and \
         members added (`dapgw udc members --add/--import`), and configuration updates \
         (every group's message seq rose by 2^32: publish the current configuration again \
         in every group, `dapgw udc update`). Start the UDC processes now: the recovery rounds close at {} \
         (unix ms).",
        rec.rounds_opened
            .iter()
            .map(|r| r.closes_at_ms)
            .max()
            .map_or_else(|| "-".to_owned(), |t| t.to_string())
    );
    ExitCode::SUCCESS
}

/// Runs one operator action against the admin API and prints the JSON
/// answer.
fn udc_op(op: UdcOp) -> anyhow::Result<()> {
    use serde_json::json;
    let (target, method, path, body) = match op {
        UdcOp::Round(r) | UdcOp::Rounds(r) => match r {
            RoundOp::Start {
                target,
                group,
                mode,
                purpose,
                read_request,
                duration_s,
            } => (
                target,
                "POST",
                "/v1/admin/rounds".to_string(),
                Some(json!({"group": group, "mode": mode, "purpose": purpose,
                            "read_request": read_request, "duration_s": duration_s})),
            ),
            RoundOp::Show {
                target,
                group,
                round,
                after,
            } => (
                target,
                "GET",
                match after {
                    Some(a) => format!("/v1/admin/rounds/{group}/{round}?after={a}"),
                    None => format!("/v1/admin/rounds/{group}/{round}"),
                },
                None,
            ),
            RoundOp::Schedule {
                target,
                group,
                every_s,
                mode,
                purpose,
                read_request,
            } => (
                target,
                "POST",
                "/v1/admin/schedules".to_string(),
                Some(
                    json!({"group": group, "every_s": every_s, "mode": mode, "purpose": purpose,
                            "read_request": read_request}),
                ),
            ),
            RoundOp::Schedules(t) => (t.target, "GET", "/v1/admin/schedules".to_string(), None),
            RoundOp::Unschedule { target, id } => {
                (target, "DELETE", format!("/v1/admin/schedules/{id}"), None)
            }
            RoundOp::Close {
                target,
                group,
                round,
            } => (
                target,
                "POST",
                format!("/v1/admin/rounds/{group}/{round}/close"),
                None,
            ),
        },
        UdcOp::Update(u) => match (u.show, u.payload_file) {
            (Some(seq), _) => (
                u.target,
                "GET",
                match u.after {
                    Some(a) => format!("/v1/admin/groups/{}/updates/{seq}?after={a}", u.group),
                    None => format!("/v1/admin/groups/{}/updates/{seq}", u.group),
                },
                None,
            ),
            (None, Some(file)) => {
                let payload =
                    std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
                (
                    u.target,
                    "POST",
                    format!("/v1/admin/groups/{}/updates", u.group),
                    Some(json!({"payload_hex": hex::encode(payload),
                                "valid_through_round": u.valid_through_round})),
                )
            }
            (None, None) => anyhow::bail!("give --payload-file FILE or --show SEQ"),
        },
        UdcOp::Revoke(r) => (
            r.target,
            "POST",
            format!("/v1/admin/members/{}/revoke", r.member),
            None,
        ),
        UdcOp::KeyUpdate(r) => (
            r.target,
            "POST",
            format!("/v1/admin/members/{}/key-update", r.member),
            r.expect_kv.map(|kv| json!({ "expect_kv": kv })),
        ),
        // Offline, on the store itself (udc_recover), never through the API.
        UdcOp::Recover(_) => anyhow::bail!("dapgw udc recover runs offline"),
        UdcOp::Members(m) => match (m.add, m.import) {
            (Some(id), _) => (
                m.target,
                "POST",
                "/v1/admin/members".to_string(),
                Some(json!({"id": id, "groups": m.groups, "kv": m.kv})),
            ),
            (None, Some(file)) => {
                let text =
                    std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
                let v: serde_json::Value = serde_json::from_slice(&text)
                    .with_context(|| format!("{} is not JSON", file.display()))?;
                (
                    m.target,
                    "POST",
                    "/v1/admin/members/import".to_string(),
                    Some(v),
                )
            }
            (None, None) => {
                let path = match m.after {
                    Some(a) => format!("/v1/admin/members?after={a}"),
                    None => "/v1/admin/members".to_string(),
                };
                (m.target, "GET", path, None)
            }
        },
        UdcOp::Readings(r) => {
            let mut path = format!(
                "/v1/admin/readings?member={}&from={}&to={}&limit={}",
                r.member, r.from, r.to, r.limit
            );
            if let Some(a) = &r.after {
                // The token is hex; anything else is refused by the UDC, but
                // must not change the query's other parameters.
                anyhow::ensure!(
                    a.bytes().all(|b| b.is_ascii_hexdigit()),
                    "--after takes the `next` token of a readings page"
                );
                path.push_str("&after=");
                path.push_str(a);
            }
            (r.target, "GET", path, None)
        }
        UdcOp::Gateways(t) => (t.target, "GET", "/v1/admin/gateways".to_string(), None),
    };
    let token = match &target.token_file {
        Some(p) => {
            dapgw::config::admin_token(p).map_err(|e| anyhow::anyhow!("--token-file: {e}"))?
        }
        None => anyhow::bail!("the operator API needs --token-file (or DAPGW_ADMIN_TOKEN_FILE)"),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let send = |body: Option<serde_json::Value>| {
        rt.block_on(dapgw::udc::admin_api::request(
            &target.admin,
            method,
            &path,
            Some(&token),
            body.map(|b| b.to_string()),
            Duration::from_secs(30),
        ))
    };
    // A registry file goes in requests the admin listener's body cap takes.
    if path == "/v1/admin/members/import"
        && let Some(chunks) = body.as_ref().and_then(dapgw::udc::admin_api::import_chunks)
    {
        let (mut imported, mut skipped) = (0u64, 0u64);
        for chunk in chunks {
            let (status, answer) = send(Some(chunk))?;
            if !(200..300).contains(&status) {
                println!("{answer}");
                anyhow::bail!("the UDC answered {status} after {imported} members were imported");
            }
            let answer = serde_json::from_str::<serde_json::Value>(&answer).ok();
            let count = |k: &str| answer.as_ref().and_then(|v| v[k].as_u64()).unwrap_or(0);
            imported += count("imported");
            skipped += count("skipped");
        }
        println!("{}", json!({ "imported": imported, "skipped": skipped }));
        return Ok(());
    }
    let (status, answer) = send(body)?;
    println!("{answer}");
    if !(200..300).contains(&status) {
        anyhow::bail!("the UDC answered {status}");
    }
    Ok(())
}

fn dev_pki(args: DevPkiArgs) -> anyhow::Result<()> {
    let pki = tls::dev_pki::generate(&args.out, &args.server_names, &args.clients)?;
    println!("CA certificate      {}", pki.ca_cert.display());
    println!("CA key              {}", pki.ca_key.display());
    println!("server certificate  {}", pki.server_cert.display());
    println!("server key          {}", pki.server_key.display());
    for (name, cert, key) in &pki.clients {
        println!("client {name:<12} {} {}", cert.display(), key.display());
    }
    println!("development only: the CA key is next to the certificates");
    Ok(())
}

fn health(args: HealthArgs) -> ExitCode {
    let check = if args.live {
        admin::ProbeCheck::Live
    } else {
        admin::ProbeCheck::Ready
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dapgw health: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(admin::probe(
        &args.url,
        check,
        Duration::from_millis(args.timeout_ms),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dapgw health: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(args: &[&str]) -> Command {
        Cli::try_parse_from(args)
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
            .command
    }

    /// `keep_freed_memory` goes to the processes that act as a UDC and to
    /// no other (docs/udc.md, "Session 10").
    #[test]
    fn allocator_settings_go_to_udc_processes_only() {
        let udc = [
            &["dapgw", "udc"][..],
            &["dapgw", "udc", "--config", "udc.toml"],
            &[
                "dapgw",
                "bench",
                "role",
                "udc",
                "--pki",
                "p",
                "--members",
                "2",
            ],
            &[
                "dapgw",
                "bench",
                "role",
                "dapgw-udc",
                "--pki",
                "p",
                "--work",
                "w",
                "--members",
                "2",
            ],
        ];
        for args in udc {
            assert!(serves_as_udc(&command(args)), "{args:?}");
        }
        let others = [
            &["dapgw", "gateway"][..],
            &["dapgw", "demo"],
            &["dapgw", "udc", "gateways"],
            &["dapgw", "udc", "members"],
            &["dapgw", "bench", "--members", "2"],
            &[
                "dapgw",
                "bench",
                "role",
                "dapgw-gateway",
                "--pki",
                "p",
                "--work",
                "w",
                "--upstream",
                "127.0.0.1:1",
            ],
            &[
                "dapgw",
                "bench",
                "role",
                "gateway",
                "--pki",
                "p",
                "--upstream",
                "127.0.0.1:1",
            ],
            &["dapgw", "health"],
        ];
        for args in others {
            assert!(!serves_as_udc(&command(args)), "{args:?}");
        }
    }
}
