//! End to end: members -> the real gateway -> the real UDC, all over real
//! TLS on loopback.
//!
//! ```text
//! sim::Fleet (this process) --HTTPS--> `dapgw gateway` (child) --mTLS h2--> `dapgw udc` (child, SQLite)
//!                                                                 ^
//! test driver --------------------- operator API (bearer) --------+
//! ```
//!
//! Both servers run as child processes of the built binary, so the tests can
//! SIGKILL them, restart them on the same spool / store and ports, and read
//! the gateway's memory from /proc. Nothing sleeps to synchronise: every
//! wait is on a counter (the fleet's stats), a metric, the operator API or
//! the UDC's database, with a timeout.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dapgw::protocol::keys::{
    MasterSecret, MemberCredential, MemberKeyDeriver, response_keys, session_keys, transcript_hash,
};
use dapgw::protocol::member::{Challenged, Member};
use dapgw::protocol::suite::Gcm;
use dapgw::protocol::wire::{Confirm, GroupId, MemberId, MessageType, Response, UplinkKind};
use dapgw::sim::agent::{AgentConfig, Stats};
use dapgw::sim::client::{ClientOptions, GatewayClient, client_tls, decode_records};
use dapgw::sim::{Fleet, FleetConfig};
use dapgw::udc::keys_cmd;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const G: u32 = 7;
const TOKEN: &str = "e2e-admin-token";
const WAIT: Duration = Duration::from_secs(60);

/// The tests start several processes each; on a 2-core machine they run
/// one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A port from 127.0.0.1:0, held by a listener until a server takes it
/// (so no client connection gets it as its ephemeral port meanwhile).
struct Port {
    port: u16,
    hold: Option<std::net::TcpListener>,
}

impl Port {
    fn new() -> Self {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        Port {
            port: l.local_addr().unwrap().port(),
            hold: Some(l),
        }
    }

    /// Gives the port up for a server to bind.
    fn release(&mut self) -> u16 {
        self.hold = None;
        self.port
    }

    /// Holds the port again after its server died (best effort).
    fn hold(&mut self) {
        self.hold = std::net::TcpListener::bind(("127.0.0.1", self.port)).ok();
    }
}

/// A child process of the `dapgw` binary, killed (SIGKILL) on drop.
struct Proc {
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGKILL, and reap it.
    fn kill9(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and wait for the exit status.
    async fn term(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let ok = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        tokio::task::spawn_blocking(move || child.wait().unwrap())
            .await
            .unwrap()
    }

    fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for World {
    /// On a failure, the servers' logs (the temp dir goes away).
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let Ok(rd) = std::fs::read_dir(self.dir.path()) else {
            return;
        };
        let mut logs: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        logs.sort();
        for p in logs {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!("==== {} ====\n{}", p.display(), tail.join("\n"));
        }
    }
}

/// Waits until `cond` (re-checked every 25 ms) holds, or panics after
/// `WAIT` with `what` and the last state `cond` reported.
async fn until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let start = Instant::now();
    loop {
        let last = match cond().await {
            Ok(()) => return,
            Err(e) => e,
        };
        assert!(
            start.elapsed() < WAIT,
            "timed out waiting for {what}: {last}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The world of one test: a PKI, UDC keys, ports, and the two servers.
struct World {
    dir: tempfile::TempDir,
    pki: dapgw::tls::dev_pki::DevPki,
    keys: PathBuf,
    master: MasterSecret,
    root_public: [u8; 32],
    udc_port: Port,
    udc_admin: Port,
    gw_port: Port,
    gw_admin: Port,
    /// Extra gateway settings (`DAPGW_*`).
    gw_env: Vec<(String, String)>,
    gw_starts: u32,
    udc_starts: u32,
}

impl World {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki =
            dapgw::tls::dev_pki::generate(&dir.path().join("pki"), &[], &["gw-1".to_string()])
                .unwrap();
        let keys = dir.path().join("keys");
        keys_cmd::init(&keys).unwrap();
        std::fs::write(dir.path().join("token"), format!("{TOKEN}\n")).unwrap();
        let master = keys_cmd::load_master(&keys.join(keys_cmd::files::MASTER)).unwrap();
        let root_public = *keys_cmd::read_hex::<32>(&keys.join(keys_cmd::files::ROOT_PUB)).unwrap();
        World {
            pki,
            keys,
            master,
            root_public,
            udc_port: Port::new(),
            udc_admin: Port::new(),
            gw_port: Port::new(),
            gw_admin: Port::new(),
            gw_env: Vec::new(),
            gw_starts: 0,
            udc_starts: 0,
            dir,
        }
    }

    fn hold_udc_ports(&mut self) {
        self.udc_port.hold();
        self.udc_admin.hold();
    }

    fn hold_gw_ports(&mut self) {
        self.gw_port.hold();
        self.gw_admin.hold();
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn command(&self, sub: &str, log: &Path) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dapgw"));
        for (k, _) in std::env::vars() {
            if k.starts_with("DAPGW_") {
                cmd.env_remove(k);
            }
        }
        let log = std::fs::File::create(log).unwrap();
        cmd.arg(sub)
            .env("DAPGW_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        cmd
    }

    /// Starts `dapgw udc` on its fixed ports (SQLite in the temp dir) and
    /// waits until it is ready.
    async fn start_udc(&mut self) -> Proc {
        self.udc_starts += 1;
        let log = self.path(&format!("udc-{}.log", self.udc_starts));
        let mut cmd = self.command("udc", &log);
        self.udc_env(&mut cmd);
        self.udc_port.release();
        self.udc_admin.release();
        let mut p = Proc {
            child: Some(cmd.spawn().unwrap()),
            log,
        };
        self.wait_ready(&mut p, self.udc_admin.port).await;
        p
    }

    /// The UDC's configuration (`DAPGW_*`) on `cmd`.
    fn udc_env(&self, cmd: &mut Command) {
        let k = |f: &str| self.keys.join(f);
        cmd.env("DAPGW_LISTEN", format!("127.0.0.1:{}", self.udc_port.port))
            .env(
                "DAPGW_ADMIN_LISTEN",
                format!("127.0.0.1:{}", self.udc_admin.port),
            )
            .env("DAPGW_TLS_CERT", &self.pki.server_cert)
            .env("DAPGW_TLS_KEY", &self.pki.server_key)
            .env("DAPGW_CLIENT_CA", &self.pki.ca_cert)
            .env("DAPGW_ADMIN_TOKEN_FILE", self.path("token"))
            .env(
                "DAPGW_STORE_URL",
                format!("sqlite://{}", self.path("udc.sqlite3").display()),
            )
            .env("DAPGW_MASTER_SECRET_FILE", k(keys_cmd::files::MASTER))
            .env("DAPGW_STORAGE_KEY_FILE", k(keys_cmd::files::STORAGE))
            .env("DAPGW_SIGNING_KEY_FILE", k(keys_cmd::files::SIGNING))
            .env("DAPGW_KEY_CERT_FILE", k(keys_cmd::files::SIGNING_CERT))
            .env("DAPGW_DRAIN_GRACE_MS", "2000");
    }

    /// Runs `dapgw udc recover` with the UDC's configuration and `args`
    /// (offline: the UDC must be stopped); (exit code, stdout, stderr).
    fn udc_recover(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dapgw"));
        for (k, _) in std::env::vars() {
            if k.starts_with("DAPGW_") {
                cmd.env_remove(k);
            }
        }
        self.udc_env(&mut cmd);
        let out = cmd.args(["udc", "recover"]).args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Starts `dapgw gateway` on its fixed ports and spool and waits until
    /// it is ready (which needs the UDC link) unless `ready` is false.
    async fn start_gateway(&mut self, ready: bool) -> Proc {
        self.gw_starts += 1;
        let log = self.path(&format!("gateway-{}.log", self.gw_starts));
        let (_, cert, key) = self.pki.clients[0].clone();
        let mut cmd = self.command("gateway", &log);
        cmd.env(
            "DAPGW_UPSTREAM_URL",
            format!("https://localhost:{}", self.udc_port.port),
        )
        .env("DAPGW_UPSTREAM_CA", &self.pki.ca_cert)
        .env("DAPGW_UPSTREAM_CLIENT_CERT", cert)
        .env("DAPGW_UPSTREAM_CLIENT_KEY", key)
        .env("DAPGW_GATEWAY_ID", "gw-1")
        .env("DAPGW_LISTEN", format!("127.0.0.1:{}", self.gw_port.port))
        .env(
            "DAPGW_ADMIN_LISTEN",
            format!("127.0.0.1:{}", self.gw_admin.port),
        )
        .env("DAPGW_TLS_CERT", &self.pki.server_cert)
        .env("DAPGW_TLS_KEY", &self.pki.server_key)
        .env("DAPGW_SPOOL_DIR", self.path("spool"))
        .env("DAPGW_BATCH_LINGER_MS", "100")
        .env("DAPGW_ROUND_DEADLINE_MS", "20000")
        .env("DAPGW_RETRY_MAX_MS", "400")
        .env("DAPGW_UPSTREAM_TIMEOUT_MS", "5000")
        .env("DAPGW_DRAIN_GRACE_MS", "3000");
        for (k, v) in &self.gw_env {
            cmd.env(k, v);
        }
        self.gw_port.release();
        self.gw_admin.release();
        let mut p = Proc {
            child: Some(cmd.spawn().unwrap()),
            log,
        };
        if ready {
            self.wait_ready(&mut p, self.gw_admin.port).await;
        } else {
            self.wait_live(&mut p, self.gw_admin.port).await;
        }
        p
    }

    async fn wait_probe(&self, p: &mut Proc, port: u16, check: dapgw::admin::ProbeCheck) {
        let target = format!("127.0.0.1:{port}");
        let start = Instant::now();
        loop {
            if dapgw::admin::probe(&target, check, Duration::from_millis(500))
                .await
                .is_ok()
            {
                return;
            }
            if !p.alive() {
                panic!(
                    "{} exited: {}",
                    p.log.display(),
                    std::fs::read_to_string(&p.log).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < WAIT,
                "{} never became {check:?}: {}",
                p.log.display(),
                std::fs::read_to_string(&p.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn wait_ready(&self, p: &mut Proc, port: u16) {
        self.wait_probe(p, port, dapgw::admin::ProbeCheck::Ready)
            .await;
    }

    async fn wait_live(&self, p: &mut Proc, port: u16) {
        self.wait_probe(p, port, dapgw::admin::ProbeCheck::Live)
            .await;
    }

    /// One operator API call; the status and the JSON body.
    async fn op_raw(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let (s, text) = dapgw::udc::admin_api::request(
            &format!("127.0.0.1:{}", self.udc_admin.port),
            method,
            path,
            Some(TOKEN),
            body.map(|b| b.to_string()),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        (s, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn op(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (s, v) = self.op_raw(method, path, body).await;
        assert!((200..300).contains(&s), "{method} {path}: {s} {v}");
        v
    }

    /// Registers members `ids` in group `G` at the UDC.
    async fn import(&self, ids: &[u64]) {
        let members: Vec<Value> = ids
            .iter()
            .map(|id| json!({"id": id, "kv": 1, "groups": [G]}))
            .collect();
        let v = self
            .op(
                "POST",
                "/v1/admin/members/import",
                Some(json!({ "members": members })),
            )
            .await;
        assert_eq!(v["imported"], ids.len());
    }

    fn credential(&self, id: u64) -> MemberCredential {
        MemberCredential {
            id,
            kv: 1,
            key: MemberKeyDeriver::new(&self.master).member_key(id, 1),
            groups: vec![G],
            root_public_key: self.root_public,
            min_online_key_version: 1,
        }
    }

    fn client_options(&self, connections: usize) -> ClientOptions {
        ClientOptions {
            gateway: format!("https://localhost:{}", self.gw_port.port),
            tls: client_tls(&self.pki.ca_cert, None).unwrap(),
            connections,
            connect_timeout: Duration::from_secs(5),
        }
    }

    /// A fleet of members `ids` keeping its state in `state`.
    fn fleet(&self, ids: &[u64], state: &str) -> Fleet {
        self.fleet_of(ids.iter().map(|id| self.credential(*id)).collect(), state)
    }

    /// A fleet of members holding `credentials`, keeping its state in `state`.
    fn fleet_of(&self, credentials: Vec<MemberCredential>, state: &str) -> Fleet {
        Fleet::spawn(FleetConfig {
            client: self.client_options(1),
            credentials,
            agent: AgentConfig {
                state_dir: self.path(state),
                wait_ms: 5_000,
                backoff_min: Duration::from_millis(20),
                backoff_max: Duration::from_millis(300),
                request_timeout: Duration::from_secs(10),
                ..AgentConfig::default()
            },
            member_tls: BTreeMap::new(),
        })
        .unwrap()
    }

    /// The groups the UDC has on record as gw-1's subscription (read from
    /// its SQLite database, which the UDC shares in WAL mode).
    fn subscriptions(&self) -> Vec<u32> {
        let db = rusqlite::Connection::open_with_flags(
            self.path("udc.sqlite3"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        db.busy_timeout(Duration::from_secs(5)).unwrap();
        let mut st = db
            .prepare("SELECT grp FROM subscriptions WHERE gateway = 'gw-1' ORDER BY grp")
            .unwrap();
        st.query_map([], |r| r.get::<_, u32>(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    async fn wait_subscribed(&self) {
        until("gw-1's subscription to the group", || async {
            let s = self.subscriptions();
            if s.contains(&G) {
                Ok(())
            } else {
                Err(format!("{s:?}"))
            }
        })
        .await;
    }

    /// Opens a round of group `G`; returns its number.
    async fn open_round(&self, mode: &str) -> u64 {
        let v = self
            .op(
                "POST",
                "/v1/admin/rounds",
                Some(json!({"group": G, "mode": mode, "purpose": "auth"})),
            )
            .await;
        v["round"].as_u64().unwrap()
    }

    async fn round_report(&self, round: u64) -> Value {
        self.op("GET", &format!("/v1/admin/rounds/{G}/{round}"), None)
            .await
    }

    /// Waits until the UDC counts `n` accepted responses in `round`;
    /// returns the round report.
    async fn wait_round_accepted(&self, round: u64, n: u64) -> Value {
        until(&format!("{n} accepted in round {round}"), || async {
            let r = self.round_report(round).await;
            if r["accepted"].as_u64() == Some(n) {
                Ok(())
            } else {
                Err(r.to_string())
            }
        })
        .await;
        self.round_report(round).await
    }

    /// Publishes a group message; returns its seq.
    async fn publish(&self, payload: &[u8]) -> u64 {
        let v = self
            .op(
                "POST",
                &format!("/v1/admin/groups/{G}/updates"),
                Some(json!({ "payload_hex": hex::encode(payload) })),
            )
            .await;
        v["seq"].as_u64().unwrap()
    }

    /// The members whose ack of `seq` the UDC recorded.
    async fn acked(&self, seq: u64) -> BTreeSet<u64> {
        let v = self
            .op("GET", &format!("/v1/admin/groups/{G}/updates/{seq}"), None)
            .await;
        v["acked"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["member"].as_u64().unwrap())
            .collect()
    }

    /// The payloads of the readings the UDC stored for `member` (each
    /// reading's payload is unique: the agent numbers them).
    async fn readings(&self, member: u64) -> Vec<String> {
        let v = self
            .op("GET", &format!("/v1/admin/readings?member={member}"), None)
            .await;
        v["readings"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["kind"] == u64::from(UplinkKind::Reading.code()))
            .map(|r| r["payload_hex"].as_str().unwrap().to_owned())
            .collect()
    }

    /// The gateway's whole `/metrics` page.
    async fn gw_page(&self) -> dapgw::admin::MetricsPage {
        self.try_gw_page()
            .await
            .expect("the gateway serves /metrics")
    }

    /// The gateway's `/metrics` page, or `None` when the gateway does not
    /// answer 200.
    async fn try_gw_page(&self) -> Option<dapgw::admin::MetricsPage> {
        let (s, text) = dapgw::udc::admin_api::request(
            &format!("127.0.0.1:{}", self.gw_admin.port),
            "GET",
            "/metrics",
            None,
            None,
            Duration::from_secs(5),
        )
        .await
        .ok()?;
        (s == 200).then(|| dapgw::admin::MetricsPage::parse(&text))
    }

    /// A gateway metric's value (the series `series` exactly), or `None`
    /// when the gateway does not answer.
    async fn gw_metric(&self, series: &str) -> Option<f64> {
        self.try_gw_page().await?.get(series)
    }
}

fn count(a: &std::sync::atomic::AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

async fn wait_fleet(fleet: &Fleet, what: &str, cond: impl Fn(&Stats) -> bool) {
    assert!(
        fleet.wait_for(WAIT, cond).await,
        "timed out waiting for {what}: {}",
        fleet.stats().to_json()
    );
}

/// Every member's readings at the UDC: exactly `n` for every member in
/// `ids`, none stored twice.
async fn wait_readings(w: &World, ids: &[u64], n: usize) {
    until(
        &format!("{n} readings of each member at the UDC"),
        || async {
            for id in ids {
                let mut r = w.readings(*id).await;
                let len = r.len();
                r.sort_unstable();
                r.dedup();
                assert_eq!(r.len(), len, "member {id}: a reading applied twice");
                if len != n {
                    return Err(format!("member {id}: {len} readings"));
                }
            }
            Ok(())
        },
    )
    .await;
}

/// A round (every member mutually authenticated), readings, a group
/// message with aggregated acks, a member away and back missing nothing,
/// and a revocation the revoked member cannot read past.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_readings_group_message_reconnect_and_revocation() {
    let _serial = SERIAL.lock().await;
    let mut w = World::new();
    w.gw_env
        .push(("DAPGW_BATCH_LINGER_MS".into(), "300".into()));
    let _udc = w.start_udc().await;
    let gw = w.start_gateway(true).await;
    let ids: Vec<u64> = (1..=6).collect();
    w.import(&ids).await;
    let main_ids = &ids[..5];
    let mut a = w.fleet(main_ids, "state-a");
    let b = w.fleet(&[6], "state-b");
    wait_fleet(&a, "attach", |s| count(&s.attached) == 5).await;
    wait_fleet(&b, "attach", |s| count(&s.attached) == 1).await;
    w.wait_subscribed().await;

    // A round: every member answers, the UDC accepts all six, and every
    // member opens V's confirm (V authenticated to it).
    let round = w.open_round("psk-ecdhe").await;
    wait_fleet(&a, "confirms", |s| count(&s.confirms_opened) == 5).await;
    wait_fleet(&b, "confirms", |s| count(&s.confirms_opened) == 1).await;
    let rep = w.wait_round_accepted(round, 6).await;
    assert_eq!(rep["missing_count"], 0, "{rep}");
    assert_eq!(
        w.gw_metric("dapgw_rounds_total{outcome=\"complete\"}")
            .await,
        Some(1.0)
    );

    // Readings: each member's first reading lands at the UDC once.
    for id in main_ids {
        a.send_reading(*id).await.unwrap();
    }
    b.send_reading(6).await.unwrap();
    wait_readings(&w, &ids, 1).await;

    // A group message: everyone applies it and acks; the acks reach the
    // UDC aggregated in batches (some batch carries more than one entry).
    let seq1 = w.publish(b"config v2").await;
    wait_fleet(&a, "update 1", |s| s.updates_applied_for(G, seq1) == 5).await;
    wait_fleet(&b, "update 1", |s| s.updates_applied_for(G, seq1) == 1).await;
    until("the acks of update 1", || async {
        let acked = w.acked(seq1).await;
        if acked == ids.iter().copied().collect() {
            Ok(())
        } else {
            Err(format!("{acked:?}"))
        }
    })
    .await;
    let single = w
        .gw_metric("dapgw_batch_entries_bucket{le=\"1\"}")
        .await
        .unwrap();
    let batches = w.gw_metric("dapgw_batch_entries_count").await.unwrap();
    assert!(
        single < batches,
        "no batch aggregated more than one entry ({single} of {batches})"
    );

    // Member 6 goes away; an update is published while it is gone; back
    // from its state directory it gets it, once.
    assert!(b.shutdown().await.is_empty());
    let seq2 = w.publish(b"config v3").await;
    wait_fleet(&a, "update 2", |s| s.updates_applied_for(G, seq2) == 5).await;
    let b = w.fleet(&[6], "state-b");
    wait_fleet(&b, "update 2 at member 6", |s| {
        s.updates_applied_for(G, seq2) == 1
    })
    .await;
    // Applied once each: the agent re-reads from the cursor before its last
    // change (by design, see sim::agent), so update 1 may come again and is
    // refused as already applied, never applied twice.
    let log6 = b.group_log(6);
    let applied = |seq| {
        log6.iter()
            .filter(|o| o.seq == Some(seq) && o.result.is_ok())
            .count()
    };
    assert_eq!((applied(seq1), applied(seq2)), (0, 1), "{log6:?}");

    // Revoke member 5: the others are rekeyed, and the next update is
    // readable by all but member 5.
    w.op("POST", "/v1/admin/members/5/revoke", None).await;
    wait_fleet(&a, "rekeys", |s| count(&s.rekeys_applied) >= 4).await;
    wait_fleet(&b, "rekey", |s| count(&s.rekeys_applied) >= 1).await;
    let seq3 = w.publish(b"config v4").await;
    wait_fleet(&a, "update 3", |s| s.updates_applied_for(G, seq3) == 4).await;
    wait_fleet(&b, "update 3", |s| s.updates_applied_for(G, seq3) == 1).await;
    assert!(
        a.wait_for(WAIT, |_| a.could_read(5, G, seq3).is_some())
            .await,
        "member 5 never received update 3"
    );
    assert!(
        matches!(a.could_read(5, G, seq3), Some(Err(_))),
        "{:?}",
        a.could_read(5, G, seq3)
    );
    until("the acks of update 3", || async {
        let acked = w.acked(seq3).await;
        if acked == [1, 2, 3, 4, 6].into_iter().collect() {
            Ok(())
        } else {
            Err(format!("{acked:?}"))
        }
    })
    .await;

    // The gateway's traffic metrics saw all of it: every kind of downlink
    // message relayed, member and upstream bytes both ways, upstream
    // request durations.
    let page = w.gw_page().await;
    for (kind, min) in [
        ("challenge", 6.0),
        ("confirm", 6.0),
        ("group", 14.0),
        ("rekey", 5.0),
    ] {
        let n = page.sum("dapgw_downlink_messages_total", &[("kind", kind)]);
        assert!(
            n >= min,
            "dapgw_downlink_messages_total{{kind={kind}}} = {n}"
        );
    }
    for name in ["dapgw_member_bytes_total", "dapgw_upstream_bytes_total"] {
        for direction in ["received", "sent"] {
            let n = page.sum(name, &[("direction", direction)]);
            assert!(n > 0.0, "{name}{{direction={direction}}} = {n}");
        }
    }
    // Requests timed: batches, a tag reply per tag request and a
    // subscription update or two, not the downlink long polls (their
    // duration is the UDC's wait; at least six of them relayed this run's
    // challenges, confirms, updates and rekeys).
    let timed = page.sum("dapgw_upstream_request_duration_seconds_count", &[]);
    let batches = page.sum("dapgw_batches_total", &[]);
    let tags = page.sum("dapgw_tag_requests_total", &[]);
    assert!(
        timed > 0.0 && timed <= batches + 2.0 * tags + 3.0,
        "{timed} requests timed for {batches} batches and {tags} tag requests"
    );

    assert!(a.try_failed().is_empty());
    assert!(a.shutdown().await.is_empty());
    assert!(b.shutdown().await.is_empty());
    assert!(gw.term().await.success());
}

/// Runs the built `dapgw` with `args`; its exit status, stdout and stderr.
fn dapgw_cli(args: &[&std::ffi::OsStr]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dapgw"))
        .args(args)
        .env_remove("DAPGW_ADMIN_LISTEN")
        .env_remove("DAPGW_ADMIN_TOKEN_FILE")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Meters provisioned by their vendor: `dapgw keys import-vendor` turns
/// the vendor's key file into a registry import file with the keys sealed
/// under the UDC's storage key, `dapgw udc members --import` loads it, and
/// the imported members authenticate end to end and deliver readings next
/// to a member whose key derives from MS. A meter holding the wrong key is
/// rejected alone; an import file sealed under another deployment's
/// storage key is refused whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vendor_imported_members_authenticate_end_to_end() {
    let _serial = SERIAL.lock().await;
    let mut w = World::new();
    let _udc = w.start_udc().await;
    let gw = w.start_gateway(true).await;

    let vendor_key = |id: u64| -> String { format!("{:02x}", id).repeat(24) };
    let vendor = w.path("vendor.csv");
    std::fs::write(
        &vendor,
        format!(
            "id,key\n21,{}\n22,{}\n23,{}\n",
            vendor_key(21),
            vendor_key(22),
            vendor_key(23)
        ),
    )
    .unwrap();
    let import = w.path("vendor-import.json");
    let creds = w.path("vendor-creds.json");
    let (ok, stdout, stderr) = dapgw_cli(&[
        "keys".as_ref(),
        "import-vendor".as_ref(),
        "--keys".as_ref(),
        w.keys.as_os_str(),
        "--vendor-keys".as_ref(),
        vendor.as_os_str(),
        "--groups".as_ref(),
        G.to_string().as_ref(),
        "--out".as_ref(),
        import.as_os_str(),
        "--credentials".as_ref(),
        creds.as_os_str(),
    ]);
    assert!(ok, "{stdout}{stderr}");
    assert!(!stdout.contains(&vendor_key(21)) && !stderr.contains(&vendor_key(21)));
    assert!(
        !std::fs::read_to_string(&import)
            .unwrap()
            .contains(&vendor_key(21)),
        "the import file holds a vendor key"
    );

    let admin = format!("127.0.0.1:{}", w.udc_admin.port);
    let load = |file: &Path| {
        dapgw_cli(&[
            "udc".as_ref(),
            "members".as_ref(),
            "--admin".as_ref(),
            admin.as_ref(),
            "--token-file".as_ref(),
            w.path("token").as_os_str(),
            "--import".as_ref(),
            file.as_os_str(),
        ])
    };

    // Sealed under another deployment's storage key: refused, nothing
    // imported.
    let other = w.path("other-keys");
    keys_cmd::init(&other).unwrap();
    let foreign = w.path("foreign-import.json");
    keys_cmd::import_vendor(&other, &vendor, &[G], 1, &foreign, None).unwrap();
    let (ok, stdout, stderr) = load(&foreign);
    assert!(!ok, "{stdout}{stderr}");
    assert!(stdout.contains("does not open"), "{stdout}{stderr}");
    let listed = w.op("GET", "/v1/admin/members", None).await;
    assert_eq!(listed["members"], json!([]), "{listed}");

    let (ok, stdout, stderr) = load(&import);
    assert!(ok, "{stdout}{stderr}");
    assert_eq!(
        serde_json::from_str::<Value>(&stdout).unwrap()["imported"],
        3,
        "{stdout}"
    );
    w.import(&[20]).await;
    let listed = w.op("GET", "/v1/admin/members", None).await;
    let sources: BTreeMap<u64, String> = listed["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_u64().unwrap(),
                m["key_source"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        sources,
        BTreeMap::from([
            (20, "derived".to_owned()),
            (21, "imported".to_owned()),
            (22, "imported".to_owned()),
            (23, "imported".to_owned()),
        ])
    );

    // 21 and 22 hold what their vendor key imports as; 23's meter was
    // provisioned from MS instead (a factory mix-up): only 23 fails.
    let file: dapgw::protocol::keys::CredentialFile =
        serde_json::from_slice(&std::fs::read(&creds).unwrap()).unwrap();
    let mut credentials: Vec<MemberCredential> =
        file.members.into_iter().filter(|c| c.id != 23).collect();
    credentials.push(w.credential(20));
    credentials.push(w.credential(23));
    let f = w.fleet_of(credentials, "state-vendor");
    wait_fleet(&f, "attach", |s| count(&s.attached) == 4).await;
    w.wait_subscribed().await;
    let round = w.open_round("psk").await;
    wait_fleet(&f, "confirms", |s| count(&s.confirms_opened) == 3).await;
    until("3 accepted and member 23 rejected", || async {
        let rep = w.round_report(round).await;
        let rejected: Vec<u64> = rep["rejected"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["member"].as_u64())
            .collect();
        if rep["accepted"] == 3 && rejected == [23] {
            Ok(())
        } else {
            Err(rep.to_string())
        }
    })
    .await;

    for id in [20, 21, 22] {
        f.send_reading(id).await.unwrap();
    }
    wait_readings(&w, &[20, 21, 22], 1).await;
    f.shutdown().await;
    assert!(gw.term().await.success());
}

/// `dapgw udc OP... --admin A --token-file T` as an operator runs it; the
/// JSON it prints (it must succeed).
fn udc_cli(w: &World, op: &[&str]) -> Value {
    let (ok, stdout, stderr) = udc_cli_raw(w, op);
    assert!(ok, "dapgw udc {op:?}: {stdout}{stderr}");
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{op:?}: {e}: {stdout}"))
}

fn udc_cli_raw(w: &World, op: &[&str]) -> (bool, String, String) {
    let admin = format!("127.0.0.1:{}", w.udc_admin.port);
    let token = w.path("token");
    let mut args: Vec<&std::ffi::OsStr> = vec!["udc".as_ref()];
    args.extend(op.iter().map(|a| std::ffi::OsStr::new(*a)));
    args.extend([
        "--admin".as_ref(),
        admin.as_ref(),
        "--token-file".as_ref(),
        token.as_os_str(),
    ]);
    dapgw_cli(&args)
}

/// Every operator subcommand of `dapgw udc` against a running UDC with a
/// gateway and members: members (import, add, list), rounds (start, show
/// with per-gateway results, close), schedules (add, list, delete),
/// updates (send, show acks), readings (with a limit), revoke, gateways;
/// then, with the UDC stopped, recover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_cli_runs_every_operation() {
    let _serial = SERIAL.lock().await;
    let mut w = World::new();
    let udc = w.start_udc().await;
    let gw = w.start_gateway(true).await;

    // Members: 1 and 2 from `keys members`' import file, 3 added by hand
    // (it stays offline).
    let creds = w.path("creds.json");
    let keys = w.keys.to_str().unwrap().to_owned();
    let (ok, out, err) = dapgw_cli(
        &[
            "keys",
            "members",
            "--keys",
            &keys,
            "--from",
            "1",
            "--count",
            "2",
            "--groups",
            "7",
            "--out",
            creds.to_str().unwrap(),
        ]
        .map(std::ffi::OsStr::new),
    );
    assert!(ok, "{out}{err}");
    let import = format!("{}.import.json", creds.display());
    assert_eq!(
        udc_cli(&w, &["members", "--import", &import])["imported"],
        2
    );
    assert_eq!(
        udc_cli(&w, &["members", "--add", "3", "--groups", "7", "--kv", "4"])["id"],
        3
    );
    let listed = udc_cli(&w, &["members"]);
    let ids: Vec<u64> = listed["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [1, 2, 3], "{listed}");
    assert_eq!(
        udc_cli(&w, &["members", "--after", "2"])["members"][0]["id"],
        3
    );

    // A round through the gateway: 1 and 2 answer, 3 is missing.
    let f = w.fleet(&[1, 2], "state-cli");
    wait_fleet(&f, "attach", |s| count(&s.attached) == 2).await;
    w.wait_subscribed().await;
    // `dapgw udc round start` in group 7; the round it opened.
    let start = |mode: &str| {
        let v = udc_cli(
            &w,
            &[
                "round",
                "start",
                "--group",
                "7",
                "--mode",
                mode,
                "--duration-s",
                "600",
            ],
        );
        v["round"].as_u64().unwrap_or_else(|| panic!("{v}"))
    };
    let round = start("psk");
    wait_fleet(&f, "confirms", |s| count(&s.confirms_opened) == 2).await;
    w.wait_round_accepted(round, 2).await;
    let r = round.to_string();
    let shown = udc_cli(&w, &["round", "show", "7", &r]);
    assert_eq!(shown["accepted"], 2, "{shown}");
    assert_eq!(shown["missing"], json!([3]), "{shown}");
    let after = udc_cli(&w, &["round", "show", "7", &r, "--after", "3"]);
    assert_eq!(after["missing"], json!([]), "{after}");
    assert_eq!(after["missing_count"], 1, "{after}");
    assert_eq!(
        shown["by_gateway"],
        json!([{"gateway": "gw-1", "accepted": 2, "rejected_by_reason": []}]),
        "{shown}"
    );
    assert_eq!(udc_cli(&w, &["round", "close", "7", &r])["closed"], true);
    assert_eq!(
        udc_cli(&w, &["rounds", "show", "7", &r])["status"],
        "closed"
    );

    // Root-key rotation through the gateway: refused while the members
    // have psk sessions only; after a psk-ecdhe round, issued, carried to
    // member 1, which answers the next round under the new version (and
    // from then on only that version is accepted).
    let (ok, out, err) = udc_cli_raw(&w, &["key-update", "1"]);
    assert!(!ok && out.contains("needs_psk_ecdhe"), "{out} {err}");
    let round = start("psk-ecdhe");
    wait_fleet(&f, "psk-ecdhe confirms", |s| count(&s.confirms_opened) == 4).await;
    w.wait_round_accepted(round, 2).await;
    let issued = udc_cli(&w, &["key-update", "1", "--expect-kv", "1"]);
    assert_eq!(
        (&issued["kv"], &issued["min_kv"]),
        (&json!(2), &json!(1)),
        "{issued}"
    );
    // The same call again (as after a lost answer) issues nothing.
    let (ok, out, err) = udc_cli_raw(&w, &["key-update", "1", "--expect-kv", "1"]);
    assert!(!ok && out.contains("kv_changed"), "{out} {err}");
    wait_fleet(&f, "key update", |s| count(&s.key_updates_applied) == 1).await;
    let round = start("psk");
    w.wait_round_accepted(round, 2).await;
    let listed = udc_cli(&w, &["members"]);
    assert_eq!(
        (&listed["members"][0]["kv"], &listed["members"][0]["min_kv"]),
        (&json!(2), &json!(2)),
        "{listed}"
    );
    assert_eq!(listed["members"][1]["min_kv"], 1, "{listed}");
    // Member 3 was added with --kv 4: that version alone.
    assert_eq!(
        (&listed["members"][2]["kv"], &listed["members"][2]["min_kv"]),
        (&json!(4), &json!(4)),
        "{listed}"
    );

    // Schedules.
    let id = udc_cli(
        &w,
        &[
            "round",
            "schedule",
            "--group",
            "7",
            "--every-s",
            "14400",
            "--purpose",
            "read",
            "--read-request",
            "0b1800",
        ],
    )["id"]
        .as_u64()
        .unwrap();
    let list = udc_cli(&w, &["round", "schedules"]);
    assert_eq!(list["schedules"][0]["every_s"], 14400, "{list}");
    assert_eq!(list["schedules"][0]["purpose"], "read", "{list}");
    assert_eq!(list["schedules"][0]["read_request"], "0b1800", "{list}");
    // The schedule's first round opens at once (the UDC's next tick), and
    // the members answer it.
    let next = (round + 1).to_string();
    until("the scheduled read round, answered", || async {
        let (ok, out, _) = udc_cli_raw(&w, &["round", "show", "7", &next]);
        let v: Value = serde_json::from_str(out.trim()).unwrap_or(Value::Null);
        if ok && v["purpose"] == "read" && v["accepted"] == 2 {
            Ok(())
        } else {
            Err(out)
        }
    })
    .await;
    let id_s = id.to_string();
    assert_eq!(udc_cli(&w, &["round", "unschedule", &id_s])["deleted"], id);
    assert_eq!(udc_cli(&w, &["round", "schedules"])["schedules"], json!([]));
    let (ok, out, _) = udc_cli_raw(&w, &["round", "unschedule", &id_s]);
    assert!(!ok && out.contains("not_found"), "{out}");

    // An update and its acks.
    let payload = w.path("update.bin");
    std::fs::write(&payload, b"tariff v9").unwrap();
    let sent = udc_cli(
        &w,
        &[
            "update",
            "--group",
            "7",
            "--payload-file",
            payload.to_str().unwrap(),
        ],
    );
    let seq = sent["seq"].as_u64().unwrap_or_else(|| panic!("{sent}"));
    wait_fleet(&f, "update", |s| s.updates_applied_for(G, seq) == 2).await;
    let seq_s = seq.to_string();
    until("the acks, through the CLI", || async {
        let v = udc_cli(&w, &["update", "--group", "7", "--show", &seq_s]);
        if v["acked"].as_array().map(Vec::len) == Some(2) {
            Ok(())
        } else {
            Err(v.to_string())
        }
    })
    .await;
    // The page after the first acking member holds the other one.
    let all = udc_cli(&w, &["update", "--group", "7", "--show", &seq_s]);
    assert_eq!(all["acked_count"], 2, "{all}");
    let first = all["acked"][0]["member"].as_u64().unwrap().to_string();
    let rest = udc_cli(
        &w,
        &[
            "update", "--group", "7", "--show", &seq_s, "--after", &first,
        ],
    );
    assert_eq!(rest["acked"].as_array().map(Vec::len), Some(1), "{rest}");
    assert_eq!(rest["acked"][0], all["acked"][1], "{rest}");

    // Readings, a page at a time.
    f.send_reading(1).await.unwrap();
    f.send_reading(1).await.unwrap();
    wait_readings(&w, &[1], 2).await;
    let page = udc_cli(&w, &["readings", "--member", "1", "--limit", "1"]);
    assert_eq!(page["readings"].as_array().unwrap().len(), 1, "{page}");
    assert_eq!(page["truncated"], true, "{page}");
    let all = udc_cli(&w, &["readings", "--member", "1"]);
    assert_eq!(all["truncated"], false, "{all}");
    assert_eq!(all["next"], Value::Null, "{all}");
    // Page by page with --after: the same readings, each once.
    let mut paged = page["readings"].as_array().unwrap().clone();
    let mut next = page["next"].as_str().unwrap().to_owned();
    for _ in 0..20 {
        let p = udc_cli(
            &w,
            &[
                "readings", "--member", "1", "--limit", "1", "--after", &next,
            ],
        );
        paged.extend(p["readings"].as_array().unwrap().iter().cloned());
        match p["next"].as_str() {
            Some(n) => next = n.to_owned(),
            None => break,
        }
    }
    assert_eq!(&paged, all["readings"].as_array().unwrap(), "{all}");

    // Revoke, then the registry and the gateway counters.
    assert_eq!(udc_cli(&w, &["revoke", "2"])["revoked"], 2);
    let listed = udc_cli(&w, &["members"]);
    assert_eq!(listed["members"][1]["status"], "revoked", "{listed}");
    let gws = udc_cli(&w, &["gateways"]);
    assert_eq!(gws["gateways"][0]["gateway"], "gw-1", "{gws}");
    assert!(
        gws["gateways"][0]["accepted"].as_u64().unwrap() >= 2,
        "{gws}"
    );
    assert_eq!(gws["gateways"][0]["rejected"], 0, "{gws}");

    f.shutdown().await;
    assert!(gw.term().await.success());
    assert!(udc.term().await.success());

    // Recovery after a restore, offline on the UDC's store: refused
    // without the confirmation flag (exit 64); then raises the counters
    // and queues a psk-ecdhe round per group, and says what to re-apply.
    let (code, _, stderr) = w.udc_recover(&[]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("--restored-from-backup"), "{stderr}");
    let (code, out, stderr) = w.udc_recover(&["--restored-from-backup"]);
    assert_eq!(code, Some(0), "{stderr}");
    let rec: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rec["groups_raised"], 1, "{rec}");
    assert_eq!(rec["gateways_raised"], 1, "{rec}");
    assert_eq!(rec["floor"], 1u64 << 32, "{rec}");
    assert!(
        rec["rounds_opened"][0]["round"].as_u64().unwrap() > 1 << 32,
        "{rec}"
    );
    assert!(
        stderr.contains("publish the current configuration again"),
        "{stderr}"
    );
    // A counter that cannot rise by 2^32: a clear error, exit 65, nothing
    // written (the floor stays).
    let db = rusqlite::Connection::open(w.path("udc.sqlite3")).unwrap();
    db.execute("UPDATE downlink_heads SET last_cursor = -2", [])
        .unwrap();
    let (code, out, stderr) = w.udc_recover(&["--restored-from-backup"]);
    assert_eq!(code, Some(65), "{out}{stderr}");
    assert!(
        stderr.contains("downlink cursor cannot rise by 2^32"),
        "{stderr}"
    );
    let floor: i64 = db
        .query_row("SELECT floor FROM recovery", [], |r| r.get(0))
        .unwrap();
    assert_eq!(floor, 1 << 32);
}

/// Sets up the UDC, the gateway and a fleet of members `ids` that went
/// through one round; returns the fleet.
async fn with_sessions(w: &World, ids: &[u64]) -> Fleet {
    w.import(ids).await;
    let f = w.fleet(ids, "state");
    let n = ids.len() as u64;
    wait_fleet(&f, "attach", |s| count(&s.attached) == n).await;
    w.wait_subscribed().await;
    let round = w.open_round("psk-ecdhe").await;
    wait_fleet(&f, "confirms", |s| count(&s.confirms_opened) == n).await;
    w.wait_round_accepted(round, n).await;
    f
}

/// Has every member of `ids` send one reading; each is acknowledged (202,
/// durable in the gateway's spool).
async fn readings_round(f: &Fleet, ids: &[u64]) {
    for id in ids {
        f.send_reading(*id).await.unwrap();
    }
}

/// Waits until the gateway's metric `series` is at least `min`.
async fn wait_metric(w: &World, series: &str, min: f64) {
    until(&format!("{series} >= {min}"), || async {
        match w.gw_metric(series).await {
            Some(v) if v >= min => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

/// The UDC is down for a while: the gateway keeps taking readings (202,
/// durable), and once the UDC is back every acknowledged reading arrives,
/// none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udc_down_for_a_while_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let mut w = World::new();
    let udc = w.start_udc().await;
    let gw = w.start_gateway(true).await;
    let ids: Vec<u64> = (1..=4).collect();
    let f = with_sessions(&w, &ids).await;
    readings_round(&f, &ids).await;
    wait_readings(&w, &ids, 1).await;

    // SIGKILL: the link breaks without a goodbye.
    udc.kill9();
    w.hold_udc_ports();
    for _ in 0..3 {
        readings_round(&f, &ids).await;
    }
    // The gateway tried to send them and failed: they wait in its spool.
    wait_metric(
        &w,
        "dapgw_batches_total{kind=\"uplink\",outcome=\"error\"}",
        1.0,
    )
    .await;
    until("readiness to fail while the UDC is down", || async {
        match dapgw::admin::probe(
            &format!("127.0.0.1:{}", w.gw_admin.port),
            dapgw::admin::ProbeCheck::Ready,
            Duration::from_secs(1),
        )
        .await
        {
            Ok(()) => Err("still ready".into()),
            Err(_) => Ok(()),
        }
    })
    .await;

    let _udc = w.start_udc().await;
    wait_readings(&w, &ids, 4).await;
    // The group path works again too, and the spool drains.
    let seq = w.publish(b"after the outage").await;
    wait_fleet(&f, "the update", |s| s.updates_applied_for(G, seq) == 4).await;
    until("the acks", || async {
        let a = w.acked(seq).await;
        if a.len() == 4 {
            Ok(())
        } else {
            Err(format!("{a:?}"))
        }
    })
    .await;
    until("an empty spool", || async {
        match w.gw_metric("dapgw_spool_entries").await {
            Some(0.0) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    wait_readings(&w, &ids, 4).await;
    assert!(f.shutdown().await.is_empty());
    assert!(gw.term().await.success());
}

/// The gateway SIGKILLed and restarted on the same spool, twice: once with
/// acknowledged entries not yet batched (and a round opened at the UDC
/// while it is down), once with sealed batches the UDC never answered.
/// Nothing acknowledged is lost or applied twice; the attached members and
/// their subscription survive the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_sigkill_and_restart_on_the_same_spool() {
    let _serial = SERIAL.lock().await;
    let mut w = World::new();
    // Long enough that readings are still unbatched when the kill comes.
    w.gw_env
        .push(("DAPGW_BATCH_LINGER_MS".into(), "1500".into()));
    let mut udc = w.start_udc().await;
    let gw = w.start_gateway(true).await;
    let ids: Vec<u64> = (1..=4).collect();
    let f = with_sessions(&w, &ids).await;

    // Phase A: acknowledged, unbatched, then SIGKILL.
    readings_round(&f, &ids).await;
    gw.kill9();
    w.hold_gw_ports();
    let mut at_udc = 0;
    for id in &ids {
        at_udc += w.readings(*id).await.len();
    }
    assert!(at_udc < ids.len(), "the readings left before the kill");
    // A round opened while the gateway is down waits at the UDC.
    let round = w.open_round("psk").await;
    let gw = w.start_gateway(true).await;
    wait_readings(&w, &ids, 1).await;
    wait_fleet(&f, "confirms of the second round", |s| {
        count(&s.confirms_opened) == 8
    })
    .await;
    w.wait_round_accepted(round, 4).await;
    // The restarted gateway expected the members attached before the kill.
    wait_metric(&w, "dapgw_rounds_total{outcome=\"complete\"}", 1.0).await;
    assert_eq!(w.subscriptions(), vec![G]);

    // Phase B: the UDC down, readings sealed into batches that fail, then
    // SIGKILL; the gateway comes back first, the UDC after it.
    udc.kill9();
    w.hold_udc_ports();
    readings_round(&f, &ids).await;
    wait_metric(
        &w,
        "dapgw_batches_total{kind=\"uplink\",outcome=\"error\"}",
        1.0,
    )
    .await;
    gw.kill9();
    w.hold_gw_ports();
    let gw = w.start_gateway(false).await;
    udc = w.start_udc().await;
    wait_readings(&w, &ids, 2).await;

    // Group messages still reach everyone, and their acks come back.
    let seq = w.publish(b"after the restarts").await;
    wait_fleet(&f, "the update", |s| s.updates_applied_for(G, seq) == 4).await;
    until("the acks", || async {
        let a = w.acked(seq).await;
        if a.len() == 4 {
            Ok(())
        } else {
            Err(format!("{a:?}"))
        }
    })
    .await;
    wait_readings(&w, &ids, 2).await;
    assert!(f.shutdown().await.is_empty());
    assert!(gw.term().await.success());
    drop(udc);
}

// ---------------------------------------------------------------------------
// The memory scan
// ---------------------------------------------------------------------------

/// Every readable mapping of process `pid`, read through /proc/<pid>/mem
/// (mappings that cannot be read, like [vvar], are skipped).
fn read_memory(pid: u32) -> Vec<Vec<u8>> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut regions = Vec::new();
    for line in maps.lines() {
        let mut parts = line.split_whitespace();
        let range = parts.next().unwrap();
        let perms = parts.next().unwrap();
        let name = line.split_whitespace().nth(5).unwrap_or("");
        if !perms.starts_with('r') || name.starts_with("[v") {
            continue;
        }
        let (a, b) = range.split_once('-').unwrap();
        let a = u64::from_str_radix(a, 16).unwrap();
        let b = u64::from_str_radix(b, 16).unwrap();
        let mut buf = vec![0u8; (b - a) as usize];
        if mem.seek(SeekFrom::Start(a)).is_err() {
            continue;
        }
        // A mapping can shrink while it is read; keep what was read.
        let mut filled = 0;
        while filled < buf.len() {
            match mem.read(&mut buf[filled..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => filled += n,
            }
        }
        buf.truncate(filled);
        regions.push(buf);
    }
    regions
}

/// The needles (name, bytes) found anywhere in `regions`.
fn find_all(regions: &[Vec<u8>], needles: &[(String, Vec<u8>)]) -> BTreeSet<String> {
    // A 64 Ki-bit filter on each needle's first two bytes keeps the scan
    // at about one table lookup per byte.
    let mut first = vec![false; 1 << 16];
    for (_, n) in needles {
        assert!(n.len() >= 8);
        first[usize::from(u16::from_le_bytes([n[0], n[1]]))] = true;
    }
    let mut found = BTreeSet::new();
    for r in regions {
        if r.len() < 2 {
            continue;
        }
        for i in 0..r.len() - 1 {
            if !first[usize::from(u16::from_le_bytes([r[i], r[i + 1]]))] {
                continue;
            }
            for (name, n) in needles {
                if r[i..].starts_with(n) {
                    found.insert(name.clone());
                }
            }
        }
    }
    found
}

/// One member driven by hand, so the test sees every byte it sends.
struct Driver {
    id: u64,
    member: Member,
    cursor: u64,
}

impl Driver {
    /// Long-polls until a record of message type `ty` arrives; returns it.
    async fn next(&mut self, c: &GatewayClient, ty: MessageType) -> Bytes {
        let start = Instant::now();
        loop {
            assert!(start.elapsed() < WAIT, "member {}: no {ty:?}", self.id);
            let r = c
                .downlink(MemberId(self.id), &[GroupId(G)], self.cursor, 5_000)
                .await
                .unwrap();
            if r.status == hyper::StatusCode::NO_CONTENT {
                continue;
            }
            assert_eq!(r.status, hyper::StatusCode::OK);
            for rec in decode_records(&r.body).unwrap() {
                self.cursor = rec.cursor;
                if rec.message.get(1) == Some(&ty.code()) {
                    return rec.message;
                }
            }
        }
    }
}

async fn post(c: &GatewayClient, msg: Bytes) {
    let r = c.uplink(msg, Duration::from_secs(10)).await.unwrap();
    assert_eq!(r.status, hyper::StatusCode::ACCEPTED, "{:?}", r.body);
}

/// After a full round (responses, confirms) and a group message with acks,
/// the gateway process's memory holds none of the member keys, response
/// keys, session keys, group key or the master secret the test derives
/// from MS, nor the group message's plaintext; the scan does find what the
/// gateway does hold in plaintext (an attached member id, the challenge).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_memory_and_udc_store_hold_no_key() {
    let _serial = SERIAL.lock().await;
    let mut w = World::new();
    let _udc = w.start_udc().await;
    let gw = w.start_gateway(true).await;
    let ids = [1u64, 2, 3];
    w.import(&ids).await;
    let c = GatewayClient::new(w.client_options(1)).unwrap();
    let mut drivers = Vec::new();
    for id in ids {
        let member = Member::new(&w.credential(id)).unwrap();
        let cursor = c
            .attach(MemberId(id), &[GroupId(G)], Duration::from_secs(10))
            .await
            .unwrap()
            .unwrap();
        drivers.push(Driver { id, member, cursor });
    }
    // Positive control: a random member id attached (the gateway keeps it).
    let marker = rand_core::Rng::next_u64(&mut rand_core::UnwrapErr(getrandom::SysRng));
    c.attach(
        MemberId(marker),
        &[G + 1].map(GroupId),
        Duration::from_secs(10),
    )
    .await
    .unwrap()
    .unwrap();
    w.wait_subscribed().await;

    // A psk round (its session keys follow from MS and the transcript).
    let round = w.open_round("psk").await;
    let mut rng = rand_core::UnwrapErr(getrandom::SysRng);
    let mut sent = Vec::new();
    for d in &mut drivers {
        let ch = d.next(&c, MessageType::Challenge).await;
        let Challenged::Answer(answer) = d.member.handle_challenge(&ch, None).unwrap() else {
            panic!("a fresh challenge")
        };
        let response = answer.respond(b"", &mut rng).unwrap().persisted();
        post(&c, response.clone()).await;
        sent.push((ch, response));
    }
    let mut confirms = Vec::new();
    for d in &mut drivers {
        let conf = d.next(&c, MessageType::Confirm).await;
        d.member.handle_confirm(&conf).unwrap().persisted();
        confirms.push(conf);
    }
    w.wait_round_accepted(round, 3).await;
    // A group message with a secret payload; every member acks.
    let mut payload = [0u8; 32];
    rand_core::Rng::fill_bytes(&mut rng, &mut payload);
    let seq = w.publish(&payload).await;
    for d in &mut drivers {
        let gm = d.next(&c, MessageType::GroupMessage).await;
        let ack = d.member.handle_group_message(&gm).unwrap().persisted();
        post(&c, ack).await;
    }
    until("the acks", || async {
        let a = w.acked(seq).await;
        if a.len() == 3 {
            Ok(())
        } else {
            Err(format!("{a:?}"))
        }
    })
    .await;

    // Everything the test knows from MS.
    let mut needles: Vec<(String, Vec<u8>)> = vec![("MS".into(), w.master.expose().to_vec())];
    let deriver = MemberKeyDeriver::new(&w.master);
    let mut gk = None;
    for ((d, (ch, resp)), conf) in drivers.iter().zip(&sent).zip(&confirms) {
        let id = d.id;
        let k_i = deriver.member_key(id, 1);
        let r = Response::decode(resp).unwrap();
        let ch_hash: [u8; 32] = Sha256::digest(ch).into();
        let th = transcript_hash(&ch_hash, id, 1, &r.n_i, None);
        let (rk, prk0) = response_keys(&k_i, &th);
        let sk = session_keys(&prk0, None);
        // The derivation is right: k_conf opens V's confirm, giving GK.
        let cf = Confirm::decode(conf).unwrap();
        let mut g = [0u8; 16];
        g.copy_from_slice(&cf.w[..16]);
        let tag: [u8; 16] = cf.w[16..].try_into().unwrap();
        Gcm::new(sk.k_conf.expose())
            .open_in_place(sk.iv_conf.expose(), &cf.aad(), &mut g, &tag)
            .expect("the test derives the member's confirm key");
        assert!(gk.is_none_or(|x| x == g), "one group key for all");
        gk = Some(g);
        for (name, bytes) in [
            ("K_i", k_i.expose().to_vec()),
            ("PRK0", prk0.expose().to_vec()),
            ("k_resp", rk.k_resp.expose().to_vec()),
            ("iv_resp", rk.iv_resp.expose().to_vec()),
            ("k_conf", sk.k_conf.expose().to_vec()),
            ("iv_conf", sk.iv_conf.expose().to_vec()),
            ("k_up", sk.k_up.expose().to_vec()),
            ("iv_up", sk.iv_up.expose().to_vec()),
            ("k_down", sk.k_down.expose().to_vec()),
        ] {
            needles.push((format!("{name} of member {id}"), bytes));
        }
    }
    needles.push(("GK".into(), gk.unwrap().to_vec()));
    needles.push(("group message plaintext".into(), payload.to_vec()));
    let controls = vec![
        (
            "attached member id".to_string(),
            marker.to_le_bytes().to_vec(),
        ),
        ("challenge".to_string(), sent[0].0.to_vec()),
    ];

    let regions = read_memory(gw.pid());
    let total: usize = regions.iter().map(Vec::len).sum();
    assert!(total > 1 << 20, "read only {total} bytes");
    let found = find_all(&regions, &controls);
    assert_eq!(
        found.len(),
        controls.len(),
        "the scan misses plaintext the gateway holds: found only {found:?}"
    );
    let found = find_all(&regions, &needles);
    assert!(
        found.is_empty(),
        "key material in the gateway's memory: {found:?}"
    );
    assert!(gw.term().await.success());

    // At rest: the UDC seals sessions and group keys under the storage
    // key, so none of the same keys is in its database files in the
    // clear (the main file, and the WAL that holds the latest writes).
    let files: Vec<Vec<u8>> = ["udc.sqlite3", "udc.sqlite3-wal"]
        .iter()
        .filter_map(|f| std::fs::read(w.path(f)).ok())
        .collect();
    let store_controls = vec![("schema".to_string(), b"CREATE TABLE".to_vec())];
    assert_eq!(
        find_all(&files, &store_controls).len(),
        1,
        "the scan does not see the UDC's database"
    );
    let found = find_all(&files, &needles);
    assert!(
        found.is_empty(),
        "key material in the clear in the UDC's store: {found:?}"
    );
}

/// A round whose challenge the gateway relayed before a SIGKILL: after the
/// restart the members' responses are still taken (202, not 409
/// `round_not_open`), V confirms them, and the restarted gateway counts the
/// round complete (it expected the members attached before the kill).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_round_survives_a_gateway_restart() {
    let _serial = SERIAL.lock().await;
    let mut w = World::new();
    let _udc = w.start_udc().await;
    let gw = w.start_gateway(true).await;
    let ids = [1u64, 2];
    w.import(&ids).await;
    let c = GatewayClient::new(w.client_options(1)).unwrap();
    let mut drivers = Vec::new();
    for id in ids {
        let member = Member::new(&w.credential(id)).unwrap();
        let cursor = c
            .attach(MemberId(id), &[GroupId(G)], Duration::from_secs(10))
            .await
            .unwrap()
            .unwrap();
        drivers.push(Driver { id, member, cursor });
    }
    w.wait_subscribed().await;
    let round = w.open_round("psk").await;
    let mut rng = rand_core::UnwrapErr(getrandom::SysRng);
    let mut responses = Vec::new();
    for d in &mut drivers {
        let ch = d.next(&c, MessageType::Challenge).await;
        let Challenged::Answer(answer) = d.member.handle_challenge(&ch, None).unwrap() else {
            panic!("a fresh challenge")
        };
        responses.push(answer.respond(b"", &mut rng).unwrap().persisted());
    }
    gw.kill9();
    w.hold_gw_ports();
    let gw = w.start_gateway(true).await;
    for r in responses {
        post(&c, r).await;
    }
    for d in &mut drivers {
        let conf = d.next(&c, MessageType::Confirm).await;
        d.member.handle_confirm(&conf).unwrap().persisted();
    }
    w.wait_round_accepted(round, 2).await;
    wait_metric(&w, "dapgw_rounds_total{outcome=\"complete\"}", 1.0).await;
    assert!(gw.term().await.success());
}
