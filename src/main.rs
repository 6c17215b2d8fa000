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

/// Exit status for a configuration that does not load or validate.
const EX_CONFIG: u8 = 64;

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
    /// Run the reference data center (UDC) that verifies batches.
    Udc(ServiceArgs),
    /// Create key material.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Run a gateway, a UDC and simulated members on this host.
    Demo(DemoArgs),
    /// Run simulated members against a gateway.
    Sim(SimArgs),
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

#[derive(Subcommand, Debug)]
enum KeysCommand {
    /// Write a throwaway CA, a server certificate and client certificates
    /// (development and tests only).
    DevPki(DevPkiArgs),
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
struct DemoArgs {}

#[derive(Args, Debug)]
struct SimArgs {}

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
    match cli.command {
        Command::Gateway(args) => gateway(args),
        Command::Udc(args) => udc(args),
        Command::Keys(KeysCommand::DevPki(args)) => report(dev_pki(args)),
        Command::Demo(DemoArgs {}) => report(not_built("demo")),
        Command::Sim(SimArgs {}) => report(not_built("sim")),
        Command::Bench(BenchArgs {
            role: Some(BenchRole::Role(role)),
            ..
        }) => report(bench::run_role(role)),
        Command::Bench(BenchArgs { options, .. }) => report(bench::main(&options)),
        Command::Health(args) => health(args),
    }
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

fn not_built(what: &str) -> anyhow::Result<()> {
    anyhow::bail!("`dapgw {what}` is not built yet")
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
            tracing::info!(admin = %admin.local_addr()?, "admin listener bound");
            // The gateway helper replaces this with the service's run
            // function, given `config`, `admin` and a SIGTERM future.
            drop(admin);
            anyhow::bail!("the gateway service is not built yet")
        })
    }))
}

fn udc(args: ServiceArgs) -> ExitCode {
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
            tracing::info!(admin = %admin.local_addr()?, "admin listener bound");
            // The UDC helper replaces this with the service's run function.
            drop(admin);
            anyhow::bail!("the udc service is not built yet")
        })
    }))
}

async fn bind_admin(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the admin listener on {addr} (DAPGW_ADMIN_LISTEN)"))
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
