//! `dapgw sim`: a [`Fleet`] from a credentials file against a running
//! gateway, with a periodic one-line progress summary on stderr and a final
//! JSON summary on stdout.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::agent::AgentConfig;
use super::client::{ClientOptions, client_tls};
use super::{Fleet, FleetConfig};
use crate::protocol::keys::{CredentialFile, MemberCredential};

/// Command-line arguments of `dapgw sim`.
#[derive(clap::Args, Debug, Clone)]
pub struct SimArgs {
    /// The gateway's member-facing URL, `https://host:port`.
    #[arg(long, value_name = "URL")]
    pub gateway: String,
    /// CA certificate (PEM) the gateway's certificate chains to.
    #[arg(long, value_name = "FILE")]
    pub ca: PathBuf,
    /// Member credentials file (from `dapgw keys`).
    #[arg(long, value_name = "FILE")]
    pub credentials: PathBuf,
    /// Which members to run: `N` (the first N of the file) or `A..B`
    /// (file positions A to B-1); all when omitted.
    #[arg(long, value_name = "N|A..B")]
    pub members: Option<String>,
    /// Directory of the members' state files (one per member).
    #[arg(long, value_name = "DIR", default_value = "sim-state")]
    pub state_dir: PathBuf,
    /// Each member sends a reading this often once in a session; 0: never.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub reading_interval_ms: u64,
    /// Reconnect with backoff after failures (`--reconnect false`: an agent
    /// stops at its first transport failure).
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub reconnect: bool,
    /// Stop after this many seconds; 0: run until Ctrl-C or SIGTERM.
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub duration_s: u64,
    /// HTTP/2 connections shared by all members; 0: one per 32 members
    /// (each member keeps one long poll open; a dapgw gateway allows 64
    /// concurrent streams per connection, and its long polls on one
    /// connection watch at most 1,024 groups and members together, so
    /// members in more than 31 groups each need more connections).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub connections: usize,
    /// Long-poll wait asked of the gateway.
    #[arg(long, value_name = "MS", default_value_t = 25_000)]
    pub wait_ms: u64,
    /// Client certificate (PEM) presented to the gateway, with --client-key.
    #[arg(long, value_name = "FILE", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// Key of --client-cert.
    #[arg(long, value_name = "FILE", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// Per-member client certificates: `DIR/member-<id>.pem` and
    /// `DIR/member-<id>.key` for every selected member. Each member then
    /// uses a connection of its own (a connection carries one identity).
    #[arg(long, value_name = "DIR", conflicts_with = "client_cert")]
    pub member_certs: Option<PathBuf>,
    /// Seconds between progress lines on stderr.
    #[arg(long, value_name = "S", default_value_t = 5)]
    pub summary_every_s: u64,
}

/// Picks the members named by `--members` from the file's list.
pub fn select_members(
    all: Vec<MemberCredential>,
    spec: Option<&str>,
) -> anyhow::Result<Vec<MemberCredential>> {
    let Some(spec) = spec else { return Ok(all) };
    let (from, to) = match spec.split_once("..") {
        Some((a, b)) => (
            a.trim().parse::<usize>().context("--members A..B: A")?,
            b.trim().parse::<usize>().context("--members A..B: B")?,
        ),
        None => (0, spec.trim().parse::<usize>().context("--members N")?),
    };
    if from > to || to > all.len() {
        anyhow::bail!(
            "--members {spec}: the file has {} members (positions 0..{})",
            all.len(),
            all.len()
        );
    }
    Ok(all.into_iter().skip(from).take(to - from).collect())
}

/// Runs `dapgw sim` to completion (duration, Ctrl-C or SIGTERM).
pub async fn run(args: SimArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.credentials)
        .with_context(|| format!("reading {}", args.credentials.display()))?;
    let file: CredentialFile = serde_json::from_str(&text)
        .with_context(|| format!("parsing {}", args.credentials.display()))?;
    let credentials = select_members(file.members, args.members.as_deref())?;
    let members = credentials.len();
    let client_cert = args.client_cert.as_deref().zip(args.client_key.as_deref());
    let tls = client_tls(&args.ca, client_cert)?;
    let mut member_tls = std::collections::BTreeMap::new();
    if let Some(dir) = &args.member_certs {
        for c in &credentials {
            let cert = dir.join(format!("member-{}.pem", c.id));
            let key = dir.join(format!("member-{}.key", c.id));
            member_tls.insert(c.id, client_tls(&args.ca, Some((&cert, &key)))?);
        }
    }
    let fleet = Fleet::spawn(FleetConfig {
        client: ClientOptions {
            gateway: args.gateway.clone(),
            tls,
            connections: args.connections,
            connect_timeout: Duration::from_secs(10),
        },
        credentials,
        agent: AgentConfig {
            state_dir: args.state_dir.clone(),
            reading_interval: (args.reading_interval_ms > 0)
                .then(|| Duration::from_millis(args.reading_interval_ms)),
            wait_ms: args.wait_ms,
            reconnect: args.reconnect,
            ..AgentConfig::default()
        },
        member_tls,
    })?;
    let started = Instant::now();
    let deadline = (args.duration_s > 0).then(|| started + Duration::from_secs(args.duration_s));
    let mut every = tokio::time::interval(Duration::from_secs(args.summary_every_s.max(1)));
    every.tick().await;
    // SIGTERM too: it is the image's STOPSIGNAL, and as a container's PID 1
    // the process would otherwise ignore it until the runtime kills it.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("listening for SIGTERM")?;
    loop {
        let until_end = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = until_end => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = every.tick() => eprintln!("{}", progress_line(&fleet, started)),
        }
    }
    let stats = fleet.stats().clone();
    let connections = fleet.connections_opened();
    let failed = fleet.shutdown().await;
    let mut summary = stats.to_json();
    if let Some(obj) = summary.as_object_mut() {
        obj.insert("members".into(), members.into());
        obj.insert("connections_opened".into(), connections.into());
        obj.insert("elapsed_s".into(), started.elapsed().as_secs_f64().into());
        obj.insert(
            "agents_failed".into(),
            failed
                .iter()
                .map(|(id, e)| serde_json::json!({"member": id, "error": e.to_string()}))
                .collect::<Vec<_>>()
                .into(),
        );
    }
    println!("{summary}");
    Ok(())
}

/// The periodic one-line summary.
fn progress_line(fleet: &Fleet, started: Instant) -> String {
    let s = fleet.stats();
    let c = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let errors: u64 = s.errors().values().sum();
    format!(
        "sim {:>6.1}s attached={} answered={} confirms={} readings={} updates={} acks={} rekeys={} errors={} conns={}",
        started.elapsed().as_secs_f64(),
        c(&s.attached),
        c(&s.rounds_answered),
        c(&s.confirms_opened),
        c(&s.readings_sent),
        c(&s.updates_applied),
        c(&s.acks_sent),
        c(&s.rekeys_applied),
        errors,
        fleet.connections_opened(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::keys::MemberKey;

    fn creds(n: u64) -> Vec<MemberCredential> {
        (0..n)
            .map(|id| MemberCredential {
                id: id + 100,
                kv: 1,
                key: MemberKey::from_bytes([1; 32]),
                groups: vec![1],
                root_public_key: [0; 32],
                min_online_key_version: 0,
            })
            .collect()
    }

    #[test]
    fn members_selects_prefix_or_range() {
        let ids = |v: Vec<MemberCredential>| v.iter().map(|c| c.id).collect::<Vec<_>>();
        assert_eq!(ids(select_members(creds(5), None).unwrap()).len(), 5);
        assert_eq!(
            ids(select_members(creds(5), Some("2")).unwrap()),
            vec![100, 101]
        );
        assert_eq!(
            ids(select_members(creds(5), Some("1..4")).unwrap()),
            vec![101, 102, 103]
        );
        for bad in ["6", "3..2", "0..6", "x", "1..", "-1"] {
            assert!(select_members(creds(5), Some(bad)).is_err(), "{bad}");
        }
    }
}
