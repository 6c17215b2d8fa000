//! Member uplinks relayed through the gateway per second, the latency the
//! gateway adds, and the CPU each relayed message costs, with real TLS on
//! loopback and a fast fake UDC (tests/support). The load generator runs in
//! the same process, on the same two cores, on a runtime of its own (as do
//! the gateway and the fake UDC), so the CPU each part spends can be told
//! apart by thread.
//!
//! ```text
//! cargo bench --bench gateway_relay
//! DAPGW_BENCH_SECS=10 DAPGW_BENCH_CONNS=16 DAPGW_BENCH_INFLIGHT=32 cargo bench --bench gateway_relay
//! ```
//!
//! Reported:
//! - acked/s: uplinks answered 202 (durable in the spool) per second;
//! - relayed/s: uplinks that reached the UDC per second over the same window;
//! - CPU per relayed message: the process CPU clock over the run (send
//!   window plus the tail until the UDC has everything) divided by the
//!   uplinks relayed, and split by thread: gateway runtime (its workers and
//!   blocking pool), the spool's writer thread, the load generator, the
//!   fake UDC;
//! - ack latency p50/p99: POST sent -> 202 received (what the gateway adds
//!   for the member: decode, spool group commit with fsync, collector);
//! - relay latency p50/p99: POST sent -> batch received by the UDC, minus the
//!   configured linger (sending and reading the request, the spool commit
//!   beyond the part of it the linger absorbs, tokio's 1 ms timer tick,
//!   batch cutting, sealing with fsync, upload). Since session 20
//!   the gateway's linger runs from the uplink's arrival (its commit
//!   credited up to half the linger), where it ran from the commit before:
//!   figures from earlier sessions include the whole commit time.
//!
//! The load generator speaks HTTP/2 through the `h2` crate directly (one
//! TLS connection per simulated concentrator, `INFLIGHT` streams on each):
//! each uplink is a fresh message (its own member id and counter), sent as
//! a HEADERS and a DATA frame from the task that awaits its 202, without the
//! extra task and channel hops of hyper's client. A meter or a concentrator
//! on a small CPU would use a client at least this lean; the gateway side
//! (hyper's server) is what the gateway ships.
//!
//! The load is closed-loop: `CONNS x INFLIGHT` requests are always
//! outstanding, so by Little's law the latency is at least
//! `in flight / throughput` (512 in flight at 20,000/s is 25.6 ms of
//! queueing). The added latency is measured with few in flight
//! (`DAPGW_BENCH_CONNS=4 DAPGW_BENCH_INFLIGHT=4`), the throughput with many.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::{Method, Request, StatusCode, Uri, header};
use support::*;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The process CPU clock (every thread, living or gone), in nanoseconds.
fn process_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// CPU nanoseconds of every live thread of this process, by thread name
/// (`/proc/self/task/*/schedstat`, first field), summed per name.
fn thread_cpu_ns() -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for t in dir.flatten() {
        let p = t.path();
        let name = std::fs::read_to_string(p.join("comm"))
            .unwrap_or_default()
            .trim()
            .to_string();
        let ns: u64 = std::fs::read_to_string(p.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        *out.entry(name).or_default() += ns;
    }
    out
}

/// One HTTP/2 connection over TLS to the gateway's member listener, driven
/// by a task of its own; its handle is cloned for each stream.
async fn connect_h2(addr: std::net::SocketAddr, pki: &Pki) -> h2::client::SendRequest<Bytes> {
    let roots = dapgw::tls::load_roots(&pki.ca).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(dapgw::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// POSTs one uplink on a stream of `send`'s connection; returns the status
/// and the body.
async fn post_uplink(
    send: h2::client::SendRequest<Bytes>,
    body: Bytes,
) -> (h2::client::SendRequest<Bytes>, StatusCode, Bytes) {
    let mut send = send.ready().await.unwrap();
    let req = Request::builder()
        .method(Method::POST)
        .uri(Uri::from_static("https://localhost/v1/uplink"))
        .header(header::CONTENT_TYPE, "application/vnd.dapgw")
        .body(())
        .unwrap();
    let (resp, mut stream) = send.send_request(req, false).unwrap();
    stream.send_data(body, true).unwrap();
    let resp = resp.await.unwrap();
    let status = resp.status();
    let mut recv = resp.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.unwrap();
        let _ = recv.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    (send, status, Bytes::from(got))
}

/// The cumulative buckets `(le, count)` of the gateway's
/// `dapgw_upstream_request_duration_seconds` histogram, `+Inf` last (as
/// `f64::INFINITY`).
fn upstream_buckets(metrics: &str) -> Vec<(f64, u64)> {
    let prefix = "dapgw_upstream_request_duration_seconds_bucket{le=\"";
    metrics
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(prefix)?;
            let (le, rest) = rest.split_once('"')?;
            let n = rest.rsplit(' ').next()?.parse().ok()?;
            Some((le.parse().ok()?, n))
        })
        .collect()
}

fn runtime(name: &str, workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name(name)
        .enable_all()
        .build()
        .unwrap()
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing
    // useful: run a short smoke version then.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let secs = env("DAPGW_BENCH_SECS", if smoke { 1 } else { 10 });
    let conns = env("DAPGW_BENCH_CONNS", 16) as usize;
    let inflight = env("DAPGW_BENCH_INFLIGHT", 32) as usize;
    let linger_ms = env("DAPGW_BENCH_LINGER_MS", 2);
    let payload = vec![0x5a; env("DAPGW_BENCH_PAYLOAD", 64) as usize];
    let gw_workers = env("DAPGW_BENCH_GW_WORKERS", 2) as usize;
    let gen_workers = env("DAPGW_BENCH_GEN_WORKERS", 2) as usize;

    let gw_rt = runtime("gw-rt", gw_workers);
    let udc_rt = runtime("udc-rt", 1);
    let gen_rt = runtime("gen-rt", gen_workers);

    let pki = pki(&["gw-1"]);
    let udc = udc_rt.block_on(FakeUdc::start(&pki));
    let base = std::env::var("DAPGW_BENCH_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/target").to_string());
    let dir = tempfile::tempdir_in(&base).unwrap();
    let mut cfg = gateway_config(&pki, udc.addr, dir.path());
    cfg.batch_linger_ms = linger_ms;
    cfg.batch_max_entries = 1024;
    cfg.spool_max_bytes = dapgw::config::ByteSize::mib(1024);
    cfg.max_connections = 65536;
    cfg.max_connections_per_ip = 65536;
    let gw = gw_rt.block_on(Gateway::start(cfg));
    let members = gw.members;

    let (sent, window, start, cpu0, threads0) = gen_rt.block_on(async {
        let mut clients = Vec::new();
        for _ in 0..conns {
            clients.push(connect_h2(members, &pki).await);
        }
        udc.state.record_arrivals.store(true, Ordering::Relaxed);
        let cpu0 = process_cpu_ns();
        let threads0 = thread_cpu_ns();
        let start = Instant::now();
        let deadline = start + Duration::from_secs(secs);
        let mut handles = Vec::new();
        for (c, client) in clients.iter().enumerate() {
            for i in 0..inflight {
                let mut client = client.clone();
                let member = (c * inflight + i) as u64 + 1;
                let payload = payload.clone();
                handles.push(tokio::spawn(async move {
                    let mut sent = Vec::new();
                    let mut ctr = 0u64;
                    while Instant::now() < deadline {
                        ctr += 1;
                        let msg = uplink(member, 1, ctr, &payload).to_bytes();
                        let t = Instant::now();
                        let (back, status, body) = post_uplink(client, msg).await;
                        client = back;
                        let ack = t.elapsed();
                        assert_eq!(status, StatusCode::ACCEPTED, "{body:?}");
                        sent.push((member, ctr, t, ack));
                    }
                    sent
                }));
            }
        }
        let mut sent = Vec::new();
        for h in handles {
            sent.extend(h.await.unwrap());
        }
        (sent, start.elapsed(), start, cpu0, threads0)
    });
    let n = sent.len();
    gen_rt.block_on(udc.wait_until("every uplink at the udc", |s| {
        s.applied.lock().unwrap().len() >= n
    }));
    let cpu = process_cpu_ns() - cpu0;
    let threads1 = thread_cpu_ns();
    let total = start.elapsed();

    let arrivals: std::collections::HashMap<(u64, u64), Instant> = udc
        .state
        .arrivals
        .lock()
        .unwrap()
        .iter()
        .map(|&(m, c, t)| ((m, c), t))
        .collect();
    let linger = Duration::from_millis(linger_ms);
    let mut acks: Vec<Duration> = sent.iter().map(|s| s.3).collect();
    let mut relays: Vec<Duration> = sent
        .iter()
        .filter_map(|&(m, c, t, _)| arrivals.get(&(m, c)).map(|a| a.duration_since(t)))
        .map(|d| d.saturating_sub(linger))
        .collect();
    let relayed_in_window = sent
        .iter()
        .filter(|&&(m, c, _, _)| arrivals.get(&(m, c)).is_some_and(|a| *a <= start + window))
        .count();
    // After the 202: how long an acknowledged uplink waited for the UDC
    // (linger, cut, seal, upload), not counting what was left of the
    // linger at the 202 (the linger runs from the uplink's arrival, its
    // commit credited up to half the linger; the ack time stands in for
    // the commit).
    let mut after_ack: Vec<Duration> = sent
        .iter()
        .filter_map(|&(m, c, t, ack)| {
            arrivals.get(&(m, c)).map(|a| {
                let left = linger.saturating_sub(ack.min(linger / 2));
                a.saturating_duration_since(t + ack).saturating_sub(left)
            })
        })
        .collect();
    acks.sort_unstable();
    relays.sort_unstable();
    after_ack.sort_unstable();
    let (_, metrics) = gen_rt.block_on(gw.admin_get("/metrics"));
    let upstream = upstream_buckets(&metrics);
    let batches = udc.state.batches.lock().unwrap().len();
    println!(
        "gateway_relay: {conns} h2 connections x {inflight} in flight, {}-byte payloads, linger {linger_ms} ms, {secs} s; runtimes: gateway {gw_workers}, load {gen_workers}, udc 1 workers",
        payload.len()
    );
    println!(
        "  acked      {n} uplinks, {:.0}/s",
        n as f64 / window.as_secs_f64()
    );
    println!(
        "  relayed    {:.0}/s in the window ({} batches, {:.0} entries/batch)",
        relayed_in_window as f64 / window.as_secs_f64(),
        batches,
        n as f64 / batches.max(1) as f64
    );
    let per = |ns: u64| ns as f64 / 1e3 / n.max(1) as f64;
    println!(
        "  cpu        {:.1} us/message (process, {:.2} s cpu over {:.2} s wall = {:.2} cores)",
        per(cpu),
        cpu as f64 / 1e9,
        total.as_secs_f64(),
        cpu as f64 / 1e9 / total.as_secs_f64()
    );
    let mut groups: BTreeMap<&str, u64> = BTreeMap::new();
    for (name, ns) in &threads1 {
        let d = ns.saturating_sub(threads0.get(name).copied().unwrap_or(0));
        let group = match name.as_str() {
            "gw-rt" => "gateway runtime",
            "dapgw-spool" => "spool writer",
            "gen-rt" => "load generator",
            "udc-rt" => "fake udc",
            _ => "other",
        };
        *groups.entry(group).or_default() += d;
    }
    let split: Vec<String> = groups
        .iter()
        .map(|(g, ns)| format!("{g} {:.1}", per(*ns)))
        .collect();
    println!(
        "  cpu split  {} (us/message, live threads)",
        split.join(", ")
    );
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l.trim_start_matches("VmHWM:").trim().to_string())
        })
        .unwrap_or_default();
    println!("  peak rss   {rss} (whole process)");
    println!(
        "  ack latency    p50 {:?}  p99 {:?}",
        pct(&acks, 0.50),
        pct(&acks, 0.99)
    );
    println!(
        "  relay latency  p50 {:?}  p99 {:?}  (send -> udc, minus linger)",
        pct(&relays, 0.50),
        pct(&relays, 0.99)
    );
    println!(
        "  after 202      p50 {:?}  p99 {:?}  (202 -> udc, minus the linger left at the 202)",
        pct(&after_ack, 0.50),
        pct(&after_ack, 0.99)
    );
    let total_upstream = upstream.last().map_or(0, |b| b.1);
    let over: Vec<String> = upstream
        .iter()
        .filter(|(le, _)| *le <= 0.05)
        .map(|(le, n)| format!("> {} ms {}", le * 1e3, total_upstream - n))
        .collect();
    println!(
        "  upstream       {total_upstream} requests (batches, tag replies, subscriptions); {}",
        over.join(", ")
    );
    assert_eq!(*udc.state.duplicates.lock().unwrap(), 0);
    gw_rt.block_on(gw.stop());
    drop(udc);
}
