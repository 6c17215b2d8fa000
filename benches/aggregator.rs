//! Gateway-side cost per entry: collecting, sorting, aggregating and encoding
//! one batch of 10,000 entries (responses and uplinks), arriving in random
//! order. The tags are arbitrary bytes: the aggregator never verifies them.
//!
//! Times are this thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`), not wall
//! time, so the figure stays meaningful on a machine shared with other
//! builds; input cloning and dropping the result are outside the timing.
//!
//! `cargo bench --bench aggregator -- --measurement-time 5`

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dapgw::protocol::aggregator::{Aggregator, AggregatorConfig, RoundSpec};
use dapgw::protocol::wire::{
    GatewayId, GroupId, MAX_BATCH_ENTRIES, MemberId, Mode, Response, SessionId, Uplink, UplinkKind,
};

const N: u64 = 10_000;
const G: GroupId = GroupId(1);

/// A fixed pseudo-random permutation of 1..=N (arrival order).
fn arrival_order() -> Vec<u64> {
    let mut ids: Vec<u64> = (1..=N).collect();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in (1..ids.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ids.swap(i, (x % (i as u64 + 1)) as usize);
    }
    ids
}

fn config() -> AggregatorConfig {
    AggregatorConfig {
        chunk_size: 64,
        max_batch_entries: MAX_BATCH_ENTRIES,
        ..AggregatorConfig::new(GatewayId::new("bench-gw").unwrap())
    }
}

fn responses(mode: Mode, payload: usize) -> Vec<Response> {
    arrival_order()
        .into_iter()
        .map(|id| Response {
            id: MemberId(id),
            kv: 1,
            group: G,
            round: 1,
            n_i: [id as u8; 16],
            e_i: (mode == Mode::PskEcdhe).then_some([7; 32]),
            c: Bytes::from(vec![id as u8; payload]),
            tag: [(id >> 3) as u8; 16],
        })
        .collect()
}

fn uplinks() -> Vec<Uplink> {
    arrival_order()
        .into_iter()
        .map(|id| Uplink {
            group: G,
            id: MemberId(id / 2),
            sid: SessionId([id as u8; 8]),
            kind: UplinkKind::Reading,
            ctr: id,
            c: Bytes::from(vec![id as u8; 32]),
            tag: [(id >> 3) as u8; 16],
        })
        .collect()
}

/// CPU time consumed by the calling thread so far.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant
    // every Linux supports.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Runs `routine` on a fresh clone of `input` `iters` times and returns the
/// CPU time spent inside `routine` only.
fn cpu_time<I: Clone, O>(iters: u64, input: &I, mut routine: impl FnMut(I) -> O) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let input = input.clone();
        let start = thread_cpu();
        let out = black_box(routine(input));
        total += thread_cpu() - start;
        drop(out);
    }
    total
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("aggregator_10k");
    group.throughput(Throughput::Elements(N));
    for (name, mode, payload) in [
        ("responses_psk_auth", Mode::Psk, 0),
        ("responses_psk_read32", Mode::Psk, 32),
        ("responses_ecdhe_auth", Mode::PskEcdhe, 0),
    ] {
        let input = responses(mode, payload);
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                cpu_time(iters, &input, |input: Vec<Response>| {
                    let t0 = Instant::now();
                    let mut agg = Aggregator::new(config()).unwrap();
                    let spec = RoundSpec {
                        group: G,
                        round: 1,
                        mode,
                        members: (1..=N).map(MemberId).collect(),
                        deadline: t0 + Duration::from_secs(60),
                    };
                    agg.expect(spec, t0).unwrap();
                    for (i, r) in input.into_iter().enumerate() {
                        agg.handle_response(r, i as u32, t0).unwrap();
                    }
                    let ready = agg.poll_batch(t0, &mut || 1).unwrap().unwrap();
                    assert_eq!(ready.handles.len(), N as usize);
                    ready
                })
            })
        });
    }
    let input = uplinks();
    group.bench_function("uplinks_read32", |b| {
        b.iter_custom(|iters| {
            cpu_time(iters, &input, |input: Vec<Uplink>| {
                let t0 = Instant::now();
                let mut agg = Aggregator::new(config()).unwrap();
                for (i, u) in input.into_iter().enumerate() {
                    agg.handle_uplink(u, i as u32, t0).unwrap();
                }
                let end = t0 + Duration::from_secs(1);
                let ready = agg.poll_batch(end, &mut || 1).unwrap().unwrap();
                assert_eq!(ready.handles.len(), N as usize);
                ready
            })
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
