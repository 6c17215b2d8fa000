//! Encode and decode cost of the messages on the hot path: a Response and an
//! Uplink (one per member per round or reading) and a 1,000-entry response
//! Batch (what the gateway builds and the verifier parses).
//!
//! `cargo bench --bench codec -- --quick` for a fast look.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dapgw::protocol::wire::{
    Batch, BatchBody, GatewayId, GroupId, MemberId, Mode, Response, SessionId, Uplink, UplinkKind,
};

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

fn uplink() -> Uplink {
    Uplink {
        group: GroupId(7),
        id: MemberId(123_456),
        sid: SessionId([9; 8]),
        kind: UplinkKind::Reading,
        ctr: 77,
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

    let r = response(42);
    let rb = r.to_bytes();
    g.throughput(Throughput::Bytes(rb.len() as u64));
    g.bench_function("response/encode", |b| {
        let mut out = BytesMut::with_capacity(rb.len());
        b.iter(|| {
            out.clear();
            black_box(&r).encode(&mut out);
            black_box(&out);
        })
    });
    g.bench_function("response/decode", |b| {
        b.iter(|| Response::decode(black_box(&rb)).unwrap())
    });

    let u = uplink();
    let ub = u.to_bytes();
    g.throughput(Throughput::Bytes(ub.len() as u64));
    g.bench_function("uplink/encode", |b| {
        let mut out = BytesMut::with_capacity(ub.len());
        b.iter(|| {
            out.clear();
            black_box(&u).encode(&mut out);
            black_box(&out);
        })
    });
    g.bench_function("uplink/decode", |b| {
        b.iter(|| Uplink::decode(black_box(&ub)).unwrap())
    });

    let bt = batch(1_000);
    let bb = bt.to_bytes();
    g.throughput(Throughput::Elements(1_000));
    g.bench_function("batch_1000/encode", |b| {
        let mut out = BytesMut::with_capacity(bb.len());
        b.iter(|| {
            out.clear();
            black_box(&bt).encode(&mut out);
            black_box(&out);
        })
    });
    g.bench_function("batch_1000/to_bytes", |b| {
        b.iter(|| black_box(&bt).to_bytes())
    });
    g.bench_function("batch_1000/decode", |b| {
        b.iter(|| Batch::decode(black_box(&bb)).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench_codec);
criterion_main!(benches);
