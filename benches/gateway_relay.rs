//! Member uplinks relayed through the gateway per second, and the latency
//! the gateway adds, with real TLS on loopback and a fast fake UDC
//! (tests/support). The load generator runs in the same process, on the same
//! two cores.
//!
//! ```text
//! cargo bench --bench gateway_relay
//! DAPGW_BENCH_SECS=10 DAPGW_BENCH_CONNS=16 DAPGW_BENCH_INFLIGHT=32 cargo bench --bench gateway_relay
//! ```
//!
//! Reported:
//! - acked/s: uplinks answered 202 (durable in the spool) per second;
//! - relayed/s: uplinks that reached the UDC per second over the same window;
//! - ack latency p50/p99: POST sent -> 202 received (what the gateway adds
//!   for the member: decode, spool group commit with fsync, collector);
//! - relay latency p50/p99: POST sent -> batch received by the UDC, minus the
//!   configured linger (batch cutting, sealing with fsync, upload).

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hyper::StatusCode;
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

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing
    // useful: run a short smoke version then.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let secs = env("DAPGW_BENCH_SECS", if smoke { 1 } else { 10 });
    let conns = env("DAPGW_BENCH_CONNS", 16) as usize;
    let inflight = env("DAPGW_BENCH_INFLIGHT", 32) as usize;
    let linger_ms = env("DAPGW_BENCH_LINGER_MS", 2);
    let payload = vec![0x5a; env("DAPGW_BENCH_PAYLOAD", 64) as usize];

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let pki = pki(&["gw-1"]);
        let udc = FakeUdc::start(&pki).await;
        let base = std::env::var("DAPGW_BENCH_DIR").unwrap_or_else(|_| {
            concat!(env!("CARGO_MANIFEST_DIR"), "/target").to_string()
        });
        let dir = tempfile::tempdir_in(&base).unwrap();
        let mut cfg = gateway_config(&pki, udc.addr, dir.path());
        cfg.batch_linger_ms = linger_ms;
        cfg.batch_max_entries = 1024;
        cfg.spool_max_bytes = dapgw::config::ByteSize::mib(1024);
        cfg.max_connections = 65536;
        let gw = Gateway::start(cfg).await;

        let mut handles = Vec::new();
        let start = Instant::now();
        let deadline = start + Duration::from_secs(secs);
        for c in 0..conns {
            let client = Client::connect(gw.members, &pki, true).await;
            for i in 0..inflight {
                let mut client = client.try_clone().unwrap();
                let member = (c * inflight + i) as u64 + 1;
                let payload = payload.clone();
                handles.push(tokio::spawn(async move {
                    let mut sent = Vec::new();
                    let mut ctr = 0u64;
                    while Instant::now() < deadline {
                        ctr += 1;
                        let msg = uplink(member, 1, ctr, &payload).to_bytes();
                        let t = Instant::now();
                        let r = client.post(msg).await;
                        let ack = t.elapsed();
                        assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
                        sent.push((member, ctr, t, ack));
                    }
                    sent
                }));
            }
        }
        udc.state.record_arrivals.store(true, Ordering::Relaxed);
        let mut sent = Vec::new();
        for h in handles {
            sent.extend(h.await.unwrap());
        }
        let window = start.elapsed();
        let n = sent.len();
        udc.wait_until("every uplink at the udc", |s| {
            s.applied.lock().unwrap().len() >= n
        })
        .await;
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
        acks.sort_unstable();
        relays.sort_unstable();
        let batches = udc.state.batches.lock().unwrap().len();
        println!(
            "gateway_relay: {conns} h2 connections x {inflight} in flight, {}-byte payloads, linger {linger_ms} ms, {secs} s",
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
        assert_eq!(*udc.state.duplicates.lock().unwrap(), 0);
        gw.stop().await;
    });
}
