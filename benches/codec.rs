//! Encode and decode cost per message, for every message type of the wire
//! codec (0x01 challenge to 0x0C key certificate, the verdict both final
//! and asking for tags), plus a 1,000-entry response Batch (what the
//! gateway builds and the verifier parses).
//!
//! The messages are the known-answer vectors of
//! tests/vectors/messages_psk_ecdhe.json, so each is a realistic value of
//! its type (a psk-ecdhe response carries its ephemeral key, a batch its
//! chunk aggregates).
//!
//! Times are this thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`, nanosecond
//! resolution), not wall time, so the figures hold on a shared machine;
//! criterion prints them as `time`. (`/proc/thread-self/schedstat`, which
//! common/cpu.rs reads, only advances at scheduler events: too coarse for
//! samples of a few microseconds.)
//!
//! `cargo bench --bench codec -- --measurement-time 2 --warm-up-time 1`

use std::collections::BTreeSet;
use std::hint::black_box;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dapgw::protocol::wire::{
    Batch, BatchBody, GatewayId, GroupId, MemberId, Message, Mode, Response,
};

/// The message vectors, embedded so the bench runs from any directory.
const VECTORS: &str = include_str!("../tests/vectors/messages_psk_ecdhe.json");

/// One vector per message type (the first of each, in file order), and
/// the tags-requested verdict besides the final one: `(name, message)`.
fn one_of_each() -> Vec<(String, Message)> {
    let file: serde_json::Value = serde_json::from_str(VECTORS).expect("vector file is JSON");
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for v in file["vectors"].as_array().expect("a vectors array") {
        let name = v["name"].as_str().expect("a vector name");
        let bytes = Bytes::from(hex::decode(v["hex"].as_str().expect("hex")).expect("hex"));
        let msg = Message::decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        if seen.insert(msg.message_type().code()) || name == "verdict_tags_requested" {
            out.push((name.to_string(), msg));
        }
    }
    assert_eq!(seen.len(), 12, "every message type has a vector");
    out
}

/// CPU time consumed by the calling thread so far.
fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// The CPU time of `iters` runs of `f`.
fn cpu_iters<O>(iters: u64, mut f: impl FnMut() -> O) -> Duration {
    let start = thread_cpu();
    for _ in 0..iters {
        black_box(f());
    }
    thread_cpu() - start
}

fn response(id: u64) -> Response {
    Response {
        id: MemberId(id),
        kv: 1,
        group: GroupId(7),
        round: 1_000,
        n_i: [id as u8; 16],
        e_i: Some([0x42; 32]),
        // A typical reading: a few dozen bytes of ciphertext.
        c: Bytes::from(vec![0x5a; 48]),
        tag: [0x17; 16],
    }
}

fn batch(n: u64) -> Batch {
    let entries: Vec<_> = (1..=n).map(|i| response(i).entry()).collect();
    let mut b = Batch {
        gateway_id: GatewayId::new("substation-17").unwrap(),
        batch_id: 99,
        group: GroupId(7),
        chunk_size: 64,
        body: BatchBody::Responses {
            round: 1_000,
            mode: Mode::PskEcdhe,
            entries,
        },
        aggregates: vec![],
    };
    b.aggregates = vec![[0xaa; 16]; b.chunk_count()];
    b
}

fn bench_codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");

    // Per message: throughput in messages, so the report reads msg/cpu-s.
    g.throughput(Throughput::Elements(1));
    for (name, msg) in one_of_each() {
        let bytes = msg.to_bytes();
        g.bench_function(format!("{name}/encode"), |b| {
            let mut out = BytesMut::with_capacity(bytes.len());
            b.iter_custom(|iters| {
                cpu_iters(iters, || {
                    out.clear();
                    black_box(&msg).encode(&mut out);
                    out.len()
                })
            })
        });
        g.bench_function(format!("{name}/decode"), |b| {
            b.iter_custom(|iters| cpu_iters(iters, || Message::decode(black_box(&bytes)).unwrap()))
        });
    }

    // A full batch, per entry.
    let bt = batch(1_000);
    let bb = bt.to_bytes();
    g.throughput(Throughput::Elements(1_000));
    g.bench_function("batch_1000/encode", |b| {
        let mut out = BytesMut::with_capacity(bb.len());
        b.iter_custom(|iters| {
            cpu_iters(iters, || {
                out.clear();
                black_box(&bt).encode(&mut out);
                out.len()
            })
        })
    });
    g.bench_function("batch_1000/decode", |b| {
        b.iter_custom(|iters| cpu_iters(iters, || Batch::decode(black_box(&bb)).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, bench_codec);
criterion_main!(benches);
