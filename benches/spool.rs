//! Durable appends per second through the spool's group commit, with 1, 64
//! and 512 concurrent appenders, 100-byte entries, in a temporary directory
//! on the machine's real disk (every acknowledged append was fsynced).
//!
//! `cargo bench --bench spool -- --quick`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use dapgw::gateway::spool::{NewEntry, Spool, StreamKey};

/// Far above what a run stores: the bench measures commits, not pushback.
const MAX_BYTES: u64 = 64 << 30;

fn appends(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("spool_durable_append");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    for appenders in [1u64, 64, 512] {
        // One iteration is a burst of `burst` appends from `appenders` tasks,
        // so every sample really runs at the stated concurrency.
        let burst = (appenders * 16).max(256);
        group.throughput(Throughput::Elements(burst));
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), MAX_BYTES).unwrap();
        // Members never repeat across iterations, so every append inserts.
        let next_member = Arc::new(AtomicU64::new(0));
        group.bench_with_input(
            BenchmarkId::from_parameter(appenders),
            &appenders,
            |b, &appenders| {
                b.iter_custom(|iters| {
                    let total = iters * burst;
                    let base = next_member.fetch_add(total, Ordering::Relaxed);
                    let issued = Arc::new(AtomicU64::new(0));
                    rt.block_on(async {
                        let start = Instant::now();
                        let mut tasks = Vec::new();
                        for _ in 0..appenders {
                            let (spool, issued) = (spool.clone(), issued.clone());
                            tasks.push(tokio::spawn(async move {
                                loop {
                                    let i = issued.fetch_add(1, Ordering::Relaxed);
                                    if i >= total {
                                        break;
                                    }
                                    let member = base + i;
                                    let mut body = [0x5Au8; 100];
                                    body[..8].copy_from_slice(&member.to_be_bytes());
                                    spool
                                        .append(NewEntry {
                                            stream: StreamKey::Round { group: 1, round: 1 },
                                            member,
                                            sort_key: member.to_be_bytes().to_vec(),
                                            bytes: Bytes::copy_from_slice(&body),
                                        })
                                        .await
                                        .unwrap();
                                }
                            }));
                        }
                        for t in tasks {
                            t.await.unwrap();
                        }
                        start.elapsed()
                    })
                })
            },
        );
        let db = std::fs::metadata(dir.path().join("spool.db")).map_or(0, |m| m.len())
            + std::fs::metadata(dir.path().join("spool.db-wal")).map_or(0, |m| m.len());
        eprintln!(
            "{appenders} appenders: {} entries, accounted {} bytes, on disk {} bytes (db + wal)",
            spool.entries(),
            spool.bytes(),
            db
        );
        rt.block_on(spool.close());
    }
    group.finish();
}

criterion_group!(benches, appends);
criterion_main!(benches);
