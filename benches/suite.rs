//! Cost of the suite 1 primitives and key schedule steps, per operation.
//!
//! The figure that matters is `per_member_psk`: what the verifier spends on
//! one entry of a psk batch before aggregation (member key, transcript hash,
//! response keys, AES key setup, tag). Its budget is about 3 µs.
//!
//! Run: `cargo bench --no-default-features --bench suite -- --quick`.
//! On a shared machine set `DAPGW_BENCH_CPU=1` to measure the thread's
//! on-CPU time (Linux `/proc/thread-self/schedstat`) instead of wall time,
//! so time spent descheduled by other load is not counted.

#[path = "common/cpu.rs"]
mod cpu;

use std::hint::black_box;

use criterion::Criterion;
use criterion::measurement::Measurement;
use dapgw::protocol::keys::{
    MasterSecret, MemberKeyDeriver, response_keys, session_keys, transcript_hash,
};
use dapgw::protocol::suite::{EphemeralKeyPair, Gcm, SigningKey, VerifyingKey, aggregate};

fn bench<M: Measurement + 'static>(c: &mut Criterion<M>) {
    let gcm = Gcm::new(&[7; 16]);
    let nonce = [9u8; 12];
    let aad = [1u8; 32];
    let ct64 = [2u8; 64];
    c.bench_function("gcm_new", |b| b.iter(|| Gcm::new(black_box(&[7; 16]))));
    c.bench_function("gcm_tag_0B_aad32", |b| {
        b.iter(|| gcm.tag(black_box(&nonce), black_box(&aad), black_box(&[])))
    });
    c.bench_function("gcm_tag_64B_aad32", |b| {
        b.iter(|| gcm.tag(black_box(&nonce), black_box(&aad), black_box(&ct64)))
    });
    c.bench_function("gcm_seal_64B_aad32", |b| {
        b.iter(|| {
            let mut buf = [3u8; 64];
            let tag = gcm.seal_in_place(black_box(&nonce), black_box(&aad), &mut buf);
            (buf, tag)
        })
    });

    let deriver = MemberKeyDeriver::new(&MasterSecret::from_bytes([5; 32]));
    let ch_hash = [6u8; 32];
    let n_i = [8u8; 16];
    c.bench_function("member_key", |b| {
        b.iter(|| deriver.member_key(black_box(1001), black_box(1)))
    });
    c.bench_function("transcript_hash", |b| {
        b.iter(|| transcript_hash(black_box(&ch_hash), 1001, 1, black_box(&n_i), None))
    });
    let k_i = deriver.member_key(1001, 1);
    let th = transcript_hash(&ch_hash, 1001, 1, &n_i, None);
    c.bench_function("response_keys", |b| {
        b.iter(|| response_keys(black_box(&k_i), black_box(&th)))
    });
    let (_, prk0) = response_keys(&k_i, &th);
    c.bench_function("session_keys_psk", |b| {
        b.iter(|| session_keys(black_box(&prk0), None))
    });
    let e_v = EphemeralKeyPair::from_secret_bytes(&[0x11; 32]);
    let e_i = EphemeralKeyPair::from_secret_bytes(&[0x22; 32]).public();
    c.bench_function("session_keys_psk_ecdhe_incl_x25519", |b| {
        b.iter(|| {
            let dh = e_v.diffie_hellman(black_box(&e_i)).unwrap();
            session_keys(black_box(&prk0), Some(&dh))
        })
    });

    // The verifier's whole per-entry cost in a psk batch.
    c.bench_function("per_member_psk", |b| {
        let mut id = 0u64;
        b.iter(|| {
            id += 1;
            let k_i = deriver.member_key(id, 1);
            let th = transcript_hash(&ch_hash, id, 1, &n_i, None);
            let (resp, _prk0) = response_keys(&k_i, &th);
            let gcm = Gcm::new(resp.k_resp.expose());
            gcm.tag(resp.iv_resp.expose(), &th, black_box(&[]))
        })
    });

    let tags: Vec<[u8; 16]> = (0..64u8).map(|i| [i; 16]).collect();
    c.bench_function("aggregate_64_tags", |b| {
        b.iter(|| aggregate(black_box(&tags).iter()))
    });

    let sk = SigningKey::from_seed(&[0x33; 32]);
    let vk = VerifyingKey::from_bytes(&sk.verifying_key().to_bytes()).unwrap();
    let msg = [0x44u8; 200];
    let sig = sk.sign(&msg);
    c.bench_function("ed25519_verify_200B", |b| {
        b.iter(|| vk.verify(black_box(&msg), black_box(&sig)))
    });
}

fn main() {
    if std::env::var_os("DAPGW_BENCH_CPU").is_some() {
        let mut c = Criterion::default()
            .with_measurement(cpu::ThreadCpuTime)
            .configure_from_args();
        bench(&mut c);
        c.final_summary();
    } else {
        let mut c = Criterion::default().configure_from_args();
        bench(&mut c);
        c.final_summary();
    }
}
