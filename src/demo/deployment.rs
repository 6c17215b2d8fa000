//! A throwaway deployment on this host: keys, certificates, one UDC and
//! gateways, each a child process of this executable, as an operator would
//! run them (configured only through `DAPGW_*` variables).
//!
//! ```text
//! Deployment::provision ──> <dir>/keys, <dir>/pki, <dir>/members.json
//! Deployment::start_udc ──> `dapgw udc`      (admin API, SQLite store)
//! Deployment::start_gateway ──> `dapgw gateway` (spool in <dir>/spool-<id>)
//! ```
//!
//! Each child binds port 0 and logs its addresses as JSON on stderr; a
//! reader thread copies every line to `<dir>/<name>.log` and hands the
//! lines the demo waits for (`udc listening`, `listeners bound`, the
//! misbehaving gateway's confession) to [`Proc::wait_line`].

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use serde_json::Value;

use crate::admin::MetricsPage;
use crate::protocol::keys::{CredentialFile, MemberCredential};
use crate::tls::dev_pki;
use crate::udc::keys_cmd;

/// How long a child may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Timeout of one admin API request.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The files a deployment runs on.
#[derive(Debug)]
pub struct Provisioned {
    /// The deployment's directory.
    pub dir: PathBuf,
    /// `keys init` output.
    pub keys: PathBuf,
    /// The development PKI (CA, server certificate, gateway client certs).
    pub pki: dev_pki::DevPki,
    /// Member credentials (what a meter factory injects).
    pub credentials: Vec<MemberCredential>,
    /// The UDC's registry import file.
    pub import: PathBuf,
    /// The operator API bearer token file.
    pub token_file: PathBuf,
    /// The token itself.
    pub token: String,
}

/// Writes keys, certificates and `count` member credentials (ids
/// `1..=count`, all in `group`) under `dir`, with the same library calls
/// `dapgw keys` makes.
pub fn provision(
    dir: &Path,
    count: u64,
    group: u32,
    gateways: &[&str],
) -> anyhow::Result<Provisioned> {
    let keys = dir.join("keys");
    keys_cmd::init(&keys).context("keys init")?;
    let clients: Vec<String> = gateways.iter().map(|g| (*g).to_string()).collect();
    let pki = dev_pki::generate(&dir.join("pki"), &[], &clients).context("keys dev-pki")?;
    let creds_path = dir.join("members.json");
    let import =
        keys_cmd::members(&keys, 1, count, &[group], &creds_path).context("keys members")?;
    let file: CredentialFile = serde_json::from_slice(
        &std::fs::read(&creds_path).with_context(|| format!("reading {}", creds_path.display()))?,
    )
    .context("parsing the credential file")?;
    let mut raw = [0u8; 24];
    getrandom::fill(&mut raw).map_err(|e| anyhow!("no randomness for the admin token: {e}"))?;
    let token = hex::encode(raw);
    let token_file = dir.join("admin.token");
    keys_cmd::write_file(&token_file, token.as_bytes(), 0o600)?;
    Ok(Provisioned {
        dir: dir.to_path_buf(),
        keys,
        pki,
        credentials: file.members,
        import,
        token_file,
        token,
    })
}

/// A child process of this executable (`dapgw udc` or `dapgw gateway`).
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    lines: mpsc::Receiver<Value>,
    log: PathBuf,
}

impl Proc {
    /// Starts `exe args` with exactly `env` as its `DAPGW_*` settings (the
    /// caller's own `DAPGW_*` variables are not inherited), JSON logs on
    /// stderr copied to `<dir>/<name>.log`.
    fn spawn(
        exe: &Path,
        dir: &Path,
        name: &str,
        args: &[&str],
        env: &BTreeMap<&str, String>,
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("DAPGW_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        cmd.env("DAPGW_LOG_FORMAT", "json");
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({})", exe.display()))?;
        let stderr = child.stderr.take().context("child stderr")?;
        let log = dir.join(format!("{name}.log"));
        // Appended to: a restarted process continues its log.
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        let (tx, lines) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("log-{name}"))
            .spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let _ = writeln!(file, "{line}");
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        // The receiver may be gone; the log file still fills.
                        let _ = tx.send(v);
                    }
                }
            })
            .context("starting a log reader thread")?;
        Ok(Self {
            name: name.to_string(),
            child,
            lines,
            log,
        })
    }

    /// Waits for a log line whose message is `message` and returns its
    /// fields; fails if the process exits or `timeout` passes first.
    pub fn wait_line(&mut self, message: &str, timeout: Duration) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok(v) => {
                    // The JSON log format flattens the event's fields.
                    if v.get("message").and_then(Value::as_str) == Some(message) {
                        return Ok(v);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().ok();
                    bail!(
                        "{} exited ({}) before logging `{message}`; see {}",
                        self.name,
                        status.map_or_else(|| "unknown status".into(), |s| s.to_string()),
                        self.log.display()
                    );
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not log `{message}` within {timeout:?}; see {}",
                    self.name,
                    self.log.display()
                );
            }
        }
    }

    /// Kills the process at once (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Asks the process to drain (SIGTERM) and waits up to `grace` for it,
    /// then kills it. True when it exited 0 on its own.
    pub fn terminate(&mut self, grace: Duration) -> bool {
        // kill(1) rather than kill(2): the library forbids unsafe code.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.success(),
                Ok(None) => {}
                Err(_) => break,
            }
            let _ = self
                .lines
                .recv_timeout(Duration::from_millis(50).min(grace));
        }
        self.kill();
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

fn addr_field(fields: &Value, key: &str) -> anyhow::Result<SocketAddr> {
    fields
        .get(key)
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("the startup log line has no address `{key}`"))
}

/// The running UDC.
#[derive(Debug)]
pub struct Udc {
    /// Its process.
    pub proc: Proc,
    /// The gateway-facing HTTPS address.
    pub listen: SocketAddr,
    /// The admin (operator API, metrics) address.
    pub admin: SocketAddr,
    token: String,
}

impl Udc {
    /// Starts `dapgw udc` on the provisioned files with a SQLite store in
    /// the deployment directory.
    /// `log` is its tracing filter.
    pub fn start(exe: &Path, p: &Provisioned, log: &str) -> anyhow::Result<Self> {
        let k = |f: &str| p.keys.join(f).display().to_string();
        let env = BTreeMap::from([
            ("DAPGW_LISTEN", "127.0.0.1:0".to_string()),
            ("DAPGW_ADMIN_LISTEN", "127.0.0.1:0".to_string()),
            ("DAPGW_TLS_CERT", p.pki.server_cert.display().to_string()),
            ("DAPGW_TLS_KEY", p.pki.server_key.display().to_string()),
            ("DAPGW_CLIENT_CA", p.pki.ca_cert.display().to_string()),
            ("DAPGW_ADMIN_TOKEN_FILE", p.token_file.display().to_string()),
            (
                "DAPGW_STORE_URL",
                format!("sqlite://{}", p.dir.join("udc.sqlite3").display()),
            ),
            ("DAPGW_MASTER_SECRET_FILE", k(keys_cmd::files::MASTER)),
            ("DAPGW_STORAGE_KEY_FILE", k(keys_cmd::files::STORAGE)),
            ("DAPGW_SIGNING_KEY_FILE", k(keys_cmd::files::SIGNING)),
            ("DAPGW_KEY_CERT_FILE", k(keys_cmd::files::SIGNING_CERT)),
            ("DAPGW_LOCALIZE_TIMEOUT_MS", "10000".to_string()),
            ("DAPGW_DRAIN_GRACE_MS", "3000".to_string()),
            ("DAPGW_LOG", log.to_string()),
        ]);
        let mut proc = Proc::spawn(exe, &p.dir, "udc", &["udc"], &env)?;
        let fields = proc.wait_line("udc listening", START_TIMEOUT)?;
        Ok(Self {
            listen: addr_field(&fields, "listen")?,
            admin: addr_field(&fields, "admin")?,
            proc,
            token: p.token.clone(),
        })
    }

    /// One operator API call; the JSON answer of a 2xx, else an error with
    /// the status and body.
    pub async fn admin(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let (status, text) = crate::udc::admin_api::request(
            &self.admin.to_string(),
            method,
            path,
            Some(&self.token),
            body.map(|b| b.to_string()),
            ADMIN_TIMEOUT,
        )
        .await?;
        if !(200..300).contains(&status) {
            bail!("{method} {path}: {status} {text}");
        }
        serde_json::from_str(&text).with_context(|| format!("{method} {path}: not JSON: {text}"))
    }

    /// The UDC's `/metrics` page, parsed.
    pub async fn metrics(&self) -> anyhow::Result<MetricsPage> {
        scrape(self.admin).await
    }

    /// The UDC process's CPU seconds so far, as it reports them
    /// (`dapgw_process_cpu_seconds_total`: `CLOCK_PROCESS_CPUTIME_ID`,
    /// nanosecond resolution; `/proc/<pid>/stat` has only 10 ms ticks).
    pub async fn cpu(&self) -> anyhow::Result<f64> {
        Ok(self
            .metrics()
            .await?
            .sum("dapgw_process_cpu_seconds_total", &[]))
    }
}

/// One running gateway.
#[derive(Debug)]
pub struct Gateway {
    /// Its id (and the DNS name of its client certificate).
    pub id: String,
    /// Its process.
    pub proc: Proc,
    /// The member-facing HTTPS address.
    pub members: SocketAddr,
    /// The admin address.
    pub admin: SocketAddr,
    env: BTreeMap<&'static str, String>,
}

impl Gateway {
    /// Starts `dapgw gateway` `id` dialling `udc`, its spool in
    /// `<dir>/spool-<id>`.
    /// `log` is its tracing filter.
    pub fn start(
        exe: &Path,
        p: &Provisioned,
        udc: SocketAddr,
        id: &str,
        log: &str,
    ) -> anyhow::Result<Self> {
        let (_, cert, key) = p
            .pki
            .clients
            .iter()
            .find(|(n, _, _)| n == id)
            .ok_or_else(|| anyhow!("no client certificate for gateway {id}"))?;
        let env = BTreeMap::from([
            (
                "DAPGW_UPSTREAM_URL",
                format!("https://127.0.0.1:{}", udc.port()),
            ),
            ("DAPGW_UPSTREAM_CA", p.pki.ca_cert.display().to_string()),
            ("DAPGW_UPSTREAM_CLIENT_CERT", cert.display().to_string()),
            ("DAPGW_UPSTREAM_CLIENT_KEY", key.display().to_string()),
            ("DAPGW_GATEWAY_ID", id.to_string()),
            ("DAPGW_LISTEN", "127.0.0.1:0".to_string()),
            ("DAPGW_ADMIN_LISTEN", "127.0.0.1:0".to_string()),
            ("DAPGW_TLS_CERT", p.pki.server_cert.display().to_string()),
            ("DAPGW_TLS_KEY", p.pki.server_key.display().to_string()),
            (
                "DAPGW_SPOOL_DIR",
                p.dir.join(format!("spool-{id}")).display().to_string(),
            ),
            ("DAPGW_BATCH_LINGER_MS", "50".to_string()),
            // Every simulated member connects from 127.0.0.1.
            ("DAPGW_MAX_CONNECTIONS_PER_IP", "65536".to_string()),
            ("DAPGW_ROUND_DEADLINE_MS", "20000".to_string()),
            ("DAPGW_RETRY_MAX_MS", "1000".to_string()),
            ("DAPGW_DRAIN_GRACE_MS", "3000".to_string()),
            ("DAPGW_LOG", log.to_string()),
        ]);
        Self::spawn(exe, &p.dir, id, env)
    }

    fn spawn(
        exe: &Path,
        dir: &Path,
        id: &str,
        env: BTreeMap<&'static str, String>,
    ) -> anyhow::Result<Self> {
        let name = format!("gateway-{id}");
        let mut proc = Proc::spawn(exe, dir, &name, &["gateway"], &env)?;
        let fields = proc.wait_line("listeners bound", START_TIMEOUT)?;
        Ok(Self {
            id: id.to_string(),
            members: addr_field(&fields, "members")?,
            admin: addr_field(&fields, "admin")?,
            proc,
            env,
        })
    }

    /// Kills the gateway (SIGKILL) and starts it again on the same spool and
    /// the same addresses, with `extra` settings added.
    pub fn restart(
        &mut self,
        exe: &Path,
        dir: &Path,
        extra: &[(&'static str, String)],
    ) -> anyhow::Result<()> {
        self.proc.kill();
        let mut env = self.env.clone();
        env.insert("DAPGW_LISTEN", self.members.to_string());
        env.insert("DAPGW_ADMIN_LISTEN", self.admin.to_string());
        env.extend(extra.iter().cloned());
        *self = Self::spawn(exe, dir, &self.id.clone(), env)?;
        Ok(())
    }

    /// The gateway's `/metrics` page, parsed.
    pub async fn metrics(&self) -> anyhow::Result<MetricsPage> {
        scrape(self.admin).await
    }

    /// Waits until `/readyz` answers 200 (upstream link and spool usable).
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(20);
        loop {
            let target = self.admin.to_string();
            let probe = crate::admin::probe(
                &target,
                crate::admin::ProbeCheck::Ready,
                Duration::from_secs(2),
            );
            if probe.await.is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("gateway {} not ready within {timeout:?}", self.id);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }
}

/// `GET /metrics` of an admin listener, parsed.
async fn scrape(admin: SocketAddr) -> anyhow::Result<MetricsPage> {
    let (status, text) = crate::udc::admin_api::request(
        &admin.to_string(),
        "GET",
        "/metrics",
        None,
        None,
        ADMIN_TIMEOUT,
    )
    .await?;
    if status != 200 {
        bail!("GET /metrics on {admin}: {status}");
    }
    Ok(MetricsPage::parse(&text))
}
