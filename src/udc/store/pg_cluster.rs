//! A throwaway PostgreSQL cluster for tests and benches of the
//! [`PostgresStore`](super::PostgresStore): `initdb` into a fresh temporary
//! directory, `pg_ctl start` on a free loopback port (socket directory inside
//! the same temporary directory), stopped and deleted on drop.
//!
//! Not used by the service itself. `initdb` refuses to run as root, so when
//! this process is root every server command runs as the `postgres` user
//! through `runuser`. A watchdog shell, fed by a pipe this value holds,
//! stops the cluster when the pipe closes, so even a cluster kept in a
//! `static` (never dropped) or a test process killed mid-run leaves no
//! server behind.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// The default place Debian puts PostgreSQL 15's server binaries.
const DEFAULT_BIN: &str = "/usr/lib/postgresql/15/bin";

/// Why a throwaway cluster could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgClusterError {
    /// The server binaries are not there (set `DAPGW_PG_BIN` to their
    /// directory).
    #[error("PostgreSQL not installed ({0} has no initdb; set DAPGW_PG_BIN)")]
    NotInstalled(String),
    /// A file-system step failed.
    #[error("throwaway cluster: {what}: {source}")]
    Io {
        /// The step.
        what: &'static str,
        /// The cause.
        source: io::Error,
    },
    /// A PostgreSQL command failed; `output` is its stderr (and the server
    /// log for `pg_ctl start`).
    #[error("throwaway cluster: {what} failed: {output}")]
    Command {
        /// The command.
        what: &'static str,
        /// What it printed.
        output: String,
    },
}

/// A running throwaway cluster; superuser `postgres`, trust authentication,
/// listening on `127.0.0.1:port` only.
#[derive(Debug)]
pub struct PgCluster {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
    watchdog: Option<(Child, ChildStdin)>,
}

impl PgCluster {
    /// The server binaries' directory: `DAPGW_PG_BIN` or Debian's default.
    pub fn bin_dir() -> PathBuf {
        std::env::var_os("DAPGW_PG_BIN").map_or_else(|| PathBuf::from(DEFAULT_BIN), PathBuf::from)
    }

    /// Starts a cluster. `durable = false` turns fsync off (tests);
    /// benches that report commit costs pass `true`.
    pub fn start(durable: bool) -> Result<Self, PgClusterError> {
        let bin = Self::bin_dir();
        if !bin.join("initdb").is_file() {
            return Err(PgClusterError::NotInstalled(bin.display().to_string()));
        }
        let as_postgres = is_root();
        let dir = fresh_dir()?;
        let io = |what| move |source| PgClusterError::Io { what, source };
        if as_postgres {
            run(
                Command::new("chown").arg("postgres:").arg(&dir),
                "chown to postgres",
            )?;
        }
        let mut cluster = Self {
            dir,
            bin,
            port: 0,
            as_postgres,
            watchdog: None,
        };
        cluster.watchdog = Some(cluster.spawn_watchdog().map_err(io("spawn watchdog"))?);
        run(
            cluster
                .server_cmd("initdb")
                .arg("-D")
                .arg(cluster.data())
                .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"]),
            "initdb",
        )?;
        // A free port can be taken between probe and bind: retry a few times.
        let mut last = None;
        for _ in 0..3 {
            cluster.port = free_port().map_err(io("find a free port"))?;
            match cluster.pg_ctl_start(durable) {
                Ok(()) => return Ok(cluster),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(PgClusterError::Command {
            what: "pg_ctl start",
            output: String::new(),
        }))
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection URL for database `db` (superuser, no password).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates database `name`.
    pub fn create_database(&self, name: &str) -> Result<(), PgClusterError> {
        run(
            Command::new(self.bin.join("createdb"))
                .args(["-h", "127.0.0.1", "-U", "postgres", "-p"])
                .arg(self.port.to_string())
                .arg(name),
            "createdb",
        )
    }

    /// The server's pid (from `postmaster.pid`), e.g. to account its CPU.
    pub fn server_pid(&self) -> Option<u32> {
        let pidfile = std::fs::read_to_string(self.data().join("postmaster.pid")).ok()?;
        pidfile.lines().next()?.trim().parse().ok()
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// A server binary, run as `postgres` when this process is root.
    fn server_cmd(&self, name: &str) -> Command {
        let exe = self.bin.join(name);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn pg_ctl_start(&self, durable: bool) -> Result<(), PgClusterError> {
        let mut opts = format!(
            "-k {} -p {} -c listen_addresses=127.0.0.1 -c max_connections=64",
            self.dir.display(),
            self.port
        );
        if !durable {
            opts.push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
        }
        let log = self.dir.join("server.log");
        let res = run(
            self.server_cmd("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .arg("-l")
                .arg(&log)
                .args(["-w", "-t", "60", "-o", &opts, "start"]),
            "pg_ctl start",
        );
        res.map_err(|e| match e {
            PgClusterError::Command { what, output } => PgClusterError::Command {
                what,
                output: format!(
                    "{output}\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ),
            },
            other => other,
        })
    }

    /// The stop command, as argv.
    fn stop_argv(&self) -> Vec<String> {
        let mut argv = Vec::new();
        if self.as_postgres {
            argv.extend(["runuser", "-u", "postgres", "--"].map(String::from));
        }
        argv.push(self.bin.join("pg_ctl").display().to_string());
        argv.extend(["-D".to_owned(), self.data().display().to_string()]);
        argv.extend(["-m", "immediate", "-w", "stop"].map(String::from));
        argv
    }

    /// A shell that waits for its stdin to close, then stops the server and
    /// deletes the directory.
    fn spawn_watchdog(&self) -> io::Result<(Child, ChildStdin)> {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(r#"cat >/dev/null; "$@" >/dev/null 2>&1; rm -rf "$PGC_DIR""#)
            .arg("sh")
            .args(self.stop_argv())
            .env("PGC_DIR", &self.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| io::Error::other("watchdog stdin"))?;
        Ok((child, stdin))
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // Closing the pipe makes the watchdog stop the server and clean up;
        // wait for it so the cluster is gone when drop returns.
        if let Some((mut child, stdin)) = self.watchdog.take() {
            drop(stdin);
            let _ = child.wait();
        }
    }
}

/// Runs a command to completion; non-zero exit is an error with its output.
fn run(cmd: &mut Command, what: &'static str) -> Result<(), PgClusterError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| PgClusterError::Io { what, source })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(PgClusterError::Command {
            what,
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        })
    }
}

/// Whether this process runs as root (initdb refuses to).
fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A new, empty, uniquely named directory under the system temp dir.
fn fresh_dir() -> Result<PathBuf, PgClusterError> {
    static N: AtomicU32 = AtomicU32::new(0);
    let base = std::env::temp_dir();
    for _ in 0..100 {
        let name = format!(
            "dapgw-pg-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let dir = Path::new(&base).join(name);
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(source) => {
                return Err(PgClusterError::Io {
                    what: "create temp dir",
                    source,
                });
            }
        }
    }
    Err(PgClusterError::Io {
        what: "create temp dir",
        source: io::Error::other("no free name"),
    })
}

/// A loopback port nobody listens on right now.
fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
