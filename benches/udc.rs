//! UDC CPU per member for a 10,000-member psk round through the HTTP API
//! (mutual TLS, HTTP/2) with SQLite, storage included, and the cost per
//! reading. Phases, each measured apart: a first auth round on the fresh
//! UDC (caches cold, no member has a session yet), a second auth round
//! (the steady state of a UDC that has been running: every member's slot
//! is rewritten), a read round with a 16-byte reading per member, then one
//! 16-byte uplink reading per member in the read round's sessions (the
//! `dapgw bench` workload is a first auth round plus one such reading),
//! then a second one (`uplink2`: a later reading in the same session, which
//! only moves the replay window).
//!
//! The UDC runs in this process, on a runtime of its own (two workers and
//! its blocking pool); the client (posting the prepared batches, reading
//! the verdicts with their confirms) runs alone on the main thread.
//! The UDC's CPU is the process CPU clock minus the client thread's CPU
//! clock; the client's is printed apart. The
//! members' responses are computed before the clock starts.
//!
//! Each round is posted as batches of `--batch` entries (default: the
//! gateway's default `DAPGW_BATCH_MAX_ENTRIES`, 16384 since session 23, so
//! 10,000 members are one batch; `--batch 4096` gives the figures of the
//! sessions before, and is what makes `--sparse 1` scatter anything at
//! 10,000 members).
//!
//! `--sparse 1` deals the members out to the batches in turn (batch k holds
//! members k, k + B, k + 2B, ... for B batches), so a batch's ids are about
//! B apart, as when members answer in their own time and a gateway flushes
//! whatever arrived (`dapgw bench`); otherwise a batch holds consecutive ids.
//! The confirms come back in the verdicts, which is where the gateway takes
//! them from (the UDC queues them on the downlink only for a verdict it
//! finalizes on its own, after an unanswered tag request).
//!
//! `--runs N` repeats the whole bench N times, each on a fresh UDC, and
//! ends with each phase's minimum, median and maximum.
//!
//! Run: `cargo bench --bench udc [-- --members N --batch N --sparse 1 --runs N]`

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use dapgw::config::UdcConfig;
use dapgw::protocol::keys::{
    MemberKeyDeriver, response_keys, session_keys, transcript_hash, uplink_nonce,
};
use dapgw::protocol::suite::{Gcm, aggregate};
use dapgw::protocol::wire::{
    Batch, BatchBody, GatewayId, GroupId, MemberId, Mode, Outcome, ResponseEntry, SessionId,
    UplinkEntry, UplinkKind, Verdict, VerdictBody, uplink_aad,
};
use dapgw::sim::bench::cpu;
use dapgw::udc::{self, keys_cmd};

#[path = "../src/alloc_policy.rs"]
mod alloc_policy;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};

const G: u32 = 1;
const TOKEN: &str = "bench-token";

/// CPU time (in seconds) of this process so far, without the calling
/// thread's: the process CPU clock (which keeps the time of threads that
/// have ended, such as idle blocking-pool threads) minus the thread CPU
/// clock of the caller.
///
/// The bench's client (sending the batches, reading the verdicts and
/// confirms) runs alone on the calling thread, so this is the UDC's CPU:
/// its runtime's workers and its blocking pool (SQLite, the verifier).
fn udc_cpu_seconds() -> f64 {
    cpu_clock(rustix::time::ClockId::ProcessCPUTime) - client_cpu_seconds()
}

/// CPU time (in seconds) of the calling thread (the bench's client).
fn client_cpu_seconds() -> f64 {
    cpu_clock(rustix::time::ClockId::ThreadCPUTime)
}

fn cpu_clock(id: rustix::time::ClockId) -> f64 {
    let t = rustix::time::clock_gettime(id);
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

struct Client {
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
}

impl Client {
    async fn connect(&self) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        send
    }
}

/// Gateway gw-1's batch `batch_id` of `body`, whose entries' tags (in
/// `part`, in order) are aggregated in chunks of 64.
fn batch_bytes<E>(batch_id: u64, body: BatchBody, part: &[&(E, [u8; 16])]) -> Bytes {
    Batch {
        gateway_id: GatewayId::new("gw-1").unwrap(),
        batch_id,
        group: GroupId(G),
        chunk_size: 64,
        body,
        aggregates: part
            .chunks(64)
            .map(|c| aggregate(c.iter().map(|(_, t)| t)))
            .collect(),
    }
    .to_bytes()
}

/// Posts `bodies` in order (each must be answered 200); returns the
/// entries their final verdicts accepted and the confirms the verdicts
/// carried (where the gateway takes them from).
async fn post_batches(
    send: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    bodies: Vec<Bytes>,
) -> (usize, usize) {
    let (mut accepted, mut confirmed) = (0, 0);
    for body in bodies {
        let (s, answer) = call(send, Method::POST, "/v1/batches", body).await;
        assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&answer));
        let v = Verdict::decode(&answer).unwrap();
        if let VerdictBody::Final { outcomes, confirms } = &v.body {
            accepted += outcomes.iter().filter(|o| **o == Outcome::Accepted).count();
            confirmed += confirms.len();
        }
    }
    (accepted, confirmed)
}

async fn call(
    send: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    method: Method,
    path: &str,
    body: Bytes,
) -> (StatusCode, Bytes) {
    let req = Request::builder()
        .method(method)
        .uri(format!("https://localhost{path}"))
        .body(Full::new(body))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let s = resp.status();
    (s, resp.into_body().collect().await.unwrap().to_bytes())
}

async fn admin(addr: SocketAddr, method: &str, path: &str, body: String) -> String {
    let (s, b) = udc::admin_api::request(
        &addr.to_string(),
        method,
        path,
        Some(TOKEN),
        Some(body),
        std::time::Duration::from_secs(600),
    )
    .await
    .unwrap();
    assert!((200..300).contains(&s), "{path}: {s} {b}");
    b
}

/// Profiling hook ([`cpu::perf_ctl`]): `BENCH_PERF_PHASES` (comma-separated:
/// auth, reauth, read, uplink, uplink2) limits the recording to those
/// phases.
fn perf_ctl(phase: &str, cmd: &str) {
    if let Ok(only) = std::env::var("BENCH_PERF_PHASES")
        && !only.split(',').any(|p| p.trim() == phase)
    {
        return;
    }
    cpu::perf_ctl(cmd);
    // Under `valgrind --tool=callgrind --collect-atstart=no`, with
    // BENCH_CALLGRIND set: instruction counts of the same phases (counts do
    // not depend on the machine's load, unlike CPU time).
    if std::env::var_os("BENCH_CALLGRIND").is_some() {
        let on = if cmd == "enable" { "on" } else { "off" };
        let pid = std::process::id().to_string();
        let _ = std::process::Command::new("callgrind_control")
            .args(["-i", on, &pid])
            .stdout(std::process::Stdio::null())
            .status();
    }
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What `dapgw udc` does first (src/alloc_policy.rs): glibc keeps freed
/// memory for the next batch. Unless `BENCH_MALLOC_DEFAULTS` is set, to
/// measure glibc's defaults instead.
fn keep_freed_memory() {
    if std::env::var_os("BENCH_MALLOC_DEFAULTS").is_none() {
        assert!(
            alloc_policy::keep_freed_memory(),
            "glibc refused an allocator setting"
        );
    }
}

fn main() {
    keep_freed_memory();
    // The UDC on a runtime of its own (two workers, as on the 2-core
    // machine); the client on this thread, so its CPU is told apart.
    let udc_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let runs = arg("--runs", 1).max(1);
    let mut all: Vec<[f64; PHASES.len()]> = Vec::new();
    for run in 1..=runs {
        if runs > 1 {
            println!("run {run} of {runs}");
        }
        all.push(client_rt.block_on(bench(&udc_rt)));
    }
    if runs > 1 {
        summarize(&all);
    }
}

/// The measured phases, in order, as [`bench`] returns their CPU per
/// member.
const PHASES: [&str; 5] = ["auth", "reauth", "read", "uplink", "uplink2"];

/// With `--runs N`: each phase's UDC CPU per member over the runs, as
/// minimum, median and maximum. On a shared machine the CPU time of the
/// same work moves with the neighbours' load (caches, memory bandwidth),
/// by a factor of 2 to 4 on the 2-core machine; the minimum is the best
/// estimate of the UDC's own cost, the median of what a busy machine
/// gives (docs/benchmarks.md, "Noise").
fn summarize(all: &[[f64; PHASES.len()]]) {
    let stats = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        (v[0], median, v[n - 1])
    };
    println!(
        "over {} runs, UDC CPU us per member (min / median / max):",
        all.len()
    );
    for (i, phase) in PHASES.iter().enumerate() {
        let (min, median, max) = stats(all.iter().map(|r| r[i]).collect());
        println!("  {phase:<28} {min:6.2} / {median:6.2} / {max:6.2}");
    }
    for (label, first) in [("auth + uplink reading", 0), ("reauth + uplink reading", 1)] {
        let (min, median, max) = stats(all.iter().map(|r| r[first] + r[3]).collect());
        println!("  {label:<28} {min:6.2} / {median:6.2} / {max:6.2}");
    }
}

/// One run on a fresh UDC (its own directory, keys and store): the UDC
/// CPU per member of each of [`PHASES`].
async fn bench(udc_rt: &tokio::runtime::Runtime) -> [f64; PHASES.len()] {
    let members = arg("--members", 10_000);
    // By default the batches a gateway cuts with its default size cap.
    let default_batch = u64::from(dapgw::config::GatewayConfig::default().batch_max_entries);
    let per_batch = arg("--batch", default_batch) as usize;
    let sparse = arg("--sparse", 0) == 1;
    // The members of each batch (indexes into 1..=N), ascending.
    let n = members as usize;
    let cut: Vec<Vec<usize>> = if sparse {
        let batches = n.div_ceil(per_batch);
        (0..batches)
            .map(|k| (k..n).step_by(batches).collect())
            .collect()
    } else {
        (0..n)
            .collect::<Vec<_>>()
            .chunks(per_batch)
            .map(<[usize]>::to_vec)
            .collect()
    };
    let dir = tempfile::tempdir().unwrap();
    let pki =
        dapgw::tls::dev_pki::generate(&dir.path().join("pki"), &[], &["gw-1".into()]).unwrap();
    let keys = dir.path().join("keys");
    keys_cmd::init(&keys).unwrap();
    std::fs::write(dir.path().join("token"), TOKEN).unwrap();
    let config = UdcConfig {
        tls_cert: pki.server_cert.clone(),
        tls_key: pki.server_key.clone(),
        client_ca: pki.ca_cert.clone(),
        admin_token_file: Some(dir.path().join("token")),
        store_url: dapgw::config::SecretUrl::new(format!(
            "sqlite://{}",
            dir.path().join("udc.sqlite3").display()
        )),
        master_secret_file: keys.join(keys_cmd::files::MASTER),
        storage_key_file: keys.join(keys_cmd::files::STORAGE),
        signing_key_file: keys.join(keys_cmd::files::SIGNING),
        key_cert_file: keys.join(keys_cmd::files::SIGNING_CERT),
        ..UdcConfig::default()
    };
    // Bound inside the UDC's runtime, whose reactor then serves them.
    let (l, a) = udc_rt
        .spawn(async {
            let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
            (bind().await.unwrap(), bind().await.unwrap())
        })
        .await
        .unwrap();
    let addr = l.local_addr().unwrap();
    let admin_addr = a.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = udc_rt.spawn(udc::run(
        config,
        udc::Listeners { udc: l, admin: a },
        async move {
            let _ = rx.await;
        },
    ));
    let deriver =
        MemberKeyDeriver::new(&keys_cmd::load_master(&keys.join(keys_cmd::files::MASTER)).unwrap());
    // In requests of 1000 (the admin listener takes bodies up to 64 KiB).
    let ids: Vec<u64> = (1..=members).collect();
    for part in ids.chunks(1000) {
        let import: Vec<_> = part
            .iter()
            .map(|id| serde_json::json!({"id": id, "kv": 1, "groups": [G]}))
            .collect();
        admin(
            admin_addr,
            "POST",
            "/v1/admin/members/import",
            serde_json::json!({"members": import}).to_string(),
        )
        .await;
    }
    let (_, cert, key) = &pki.clients[0];
    let client = Client {
        addr,
        tls: dapgw::tls::client_config(&pki.ca_cert, cert, key)
            .unwrap()
            .config(),
    };
    let mut send = client.connect().await;
    let (s, _) = call(
        &mut send,
        Method::PUT,
        "/v1/subscriptions",
        Bytes::from(format!("{{\"groups\":[{G}]}}")),
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);

    let mut cursor = 0u64;
    let mut batch_id = 0u64;
    let mut per_member = Vec::new();
    // Each member's uplink key, nonce base and sid in its newest session.
    let mut sessions = Vec::new();
    // A first auth round on the fresh UDC (its caches cold, no member
    // with a session), a second one (steady state: warm caches, every
    // member's slot rewritten), then a read round.
    for (label, purpose, reading) in [
        ("auth", "auth", &b""[..]),
        ("reauth", "auth", &b""[..]),
        ("read", "read", &[0x5a; 16][..]),
    ] {
        // A read request goes with purpose read only (the UDC refuses one
        // on an auth round).
        let mut open = serde_json::json!({"group": G, "mode": "psk", "purpose": purpose});
        if purpose == "read" {
            open["read_request"] = "01".into();
        }
        let v: serde_json::Value = serde_json::from_str(
            &admin(admin_addr, "POST", "/v1/admin/rounds", open.to_string()).await,
        )
        .unwrap();
        let round = v["round"].as_u64().unwrap();
        // Read the queue up to this round's challenge (the UDC answers up
        // to 1024 records a call).
        let mut challenge = Bytes::new();
        while challenge.is_empty() {
            let (s, body) = call(
                &mut send,
                Method::GET,
                &format!("/v1/downlink?after={cursor}&wait_ms=1000"),
                Bytes::new(),
            )
            .await;
            assert_eq!(s, StatusCode::OK);
            let mut b = &body[..];
            while !b.is_empty() {
                cursor = u64::from_be_bytes(b[..8].try_into().unwrap());
                let len = u32::from_be_bytes(b[21..25].try_into().unwrap()) as usize;
                if b[8] == 1 {
                    challenge = Bytes::copy_from_slice(&b[25..25 + len]);
                }
                b = &b[25 + len..];
            }
        }
        // Members answer (not measured).
        let ch_hash: [u8; 32] = Sha256::digest(&challenge).into();
        sessions.clear();
        let answers: Vec<(ResponseEntry, [u8; 16])> = (1..=members)
            .map(|id| {
                let mut n_i = [0u8; 16];
                n_i[..8].copy_from_slice(&id.to_be_bytes());
                n_i[8] = round as u8;
                let th = transcript_hash(&ch_hash, id, 1, &n_i, None);
                let (rk, prk0) = response_keys(&deriver.member_key(id, 1), &th);
                let sk = session_keys(&prk0, None);
                sessions.push((sk.k_up, sk.iv_up, SessionId(sk.sid)));
                let mut c = reading.to_vec();
                let tag =
                    Gcm::new(rk.k_resp.expose()).seal_in_place(rk.iv_resp.expose(), &th, &mut c);
                (
                    ResponseEntry {
                        id: MemberId(id),
                        kv: 1,
                        n_i,
                        e_i: None,
                        c: Bytes::from(c),
                    },
                    tag,
                )
            })
            .collect();
        let bodies: Vec<Bytes> = cut
            .iter()
            .map(|idx| {
                let part: Vec<&(ResponseEntry, [u8; 16])> =
                    idx.iter().map(|i| &answers[*i]).collect();
                batch_id += 1;
                let body = BatchBody::Responses {
                    round,
                    mode: Mode::Psk,
                    entries: part.iter().map(|(e, _)| e.clone()).collect(),
                };
                batch_bytes(batch_id, body, &part)
            })
            .collect();
        perf_ctl(label, "enable");
        let (cpu0, client0) = (udc_cpu_seconds(), client_cpu_seconds());
        let t0 = Instant::now();
        let (accepted, confirms) = post_batches(&mut send, bodies).await;
        let wall = t0.elapsed().as_secs_f64();
        let cpu = udc_cpu_seconds() - cpu0;
        let client = client_cpu_seconds() - client0;
        perf_ctl(label, "disable");
        assert_eq!(accepted as u64, members, "every member accepted");
        assert_eq!(confirms as u64, members, "one confirm per member");
        let us = cpu * 1e6 / members as f64;
        println!(
            "udc {label} round, psk, {members} members in batches of {per_batch}, sqlite: \
             {us:.2} us CPU/member ({:.2} us wall/member; client {:.2} us CPU/member apart)",
            wall * 1e6 / members as f64,
            client * 1e6 / members as f64
        );
        per_member.push(us);
    }
    // Two uplink readings per member, in the read round's sessions: the
    // first (ctr 1) puts the newest session in use and drops the older
    // ones, so every slot shrinks; the second (ctr 2) only moves the
    // replay window, the steady state of a session's later readings.
    let mut per_reading = Vec::with_capacity(2);
    for (phase, ctr) in [("uplink", 1u64), ("uplink2", 2)] {
        let answers: Vec<(UplinkEntry, [u8; 16])> = (1..=members)
            .zip(&sessions)
            .map(|(id, (k_up, iv_up, sid))| {
                let kind = UplinkKind::Reading;
                let mut c = vec![0x5a; 16];
                let aad = uplink_aad(kind, GroupId(G), MemberId(id), *sid, ctr);
                let tag =
                    Gcm::new(k_up.expose()).seal_in_place(&uplink_nonce(iv_up, ctr), &aad, &mut c);
                let entry = UplinkEntry {
                    id: MemberId(id),
                    sid: *sid,
                    kind,
                    ctr,
                    c: Bytes::from(c),
                };
                (entry, tag)
            })
            .collect();
        let bodies: Vec<Bytes> = cut
            .iter()
            .map(|idx| {
                let part: Vec<&(UplinkEntry, [u8; 16])> =
                    idx.iter().map(|i| &answers[*i]).collect();
                batch_id += 1;
                let body = BatchBody::Uplinks {
                    entries: part.iter().map(|(e, _)| e.clone()).collect(),
                };
                batch_bytes(batch_id, body, &part)
            })
            .collect();
        perf_ctl(phase, "enable");
        let (cpu0, client0) = (udc_cpu_seconds(), client_cpu_seconds());
        let t0 = Instant::now();
        let (accepted, _) = post_batches(&mut send, bodies).await;
        let wall = t0.elapsed().as_secs_f64();
        let cpu = udc_cpu_seconds() - cpu0;
        let client = client_cpu_seconds() - client0;
        perf_ctl(phase, "disable");
        assert_eq!(accepted as u64, members, "every uplink accepted");
        let us = cpu * 1e6 / members as f64;
        println!(
            "udc uplink readings (ctr {ctr}), one per member, {members} members in batches of \
             {per_batch}, sqlite: {us:.2} us CPU/reading ({:.2} us wall/reading; client {:.2} us \
             CPU/reading apart)",
            wall * 1e6 / members as f64,
            client * 1e6 / members as f64
        );
        per_reading.push(us);
    }
    let [uplink, uplink2] = per_reading[..] else {
        unreachable!("two readings measured")
    };
    let [auth, reauth, read] = per_member[..] else {
        unreachable!("three rounds measured")
    };
    println!(
        "udc first auth round plus one uplink reading (the dapgw bench workload): \
         {:.2} us CPU/member; second auth round plus one reading: {:.2}",
        auth + uplink,
        reauth + uplink
    );
    let _ = tx.send(());
    let _ = task.await;
    [auth, reauth, read, uplink, uplink2]
}
