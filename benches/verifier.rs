//! Verifier throughput: time per member to judge a batch of honest
//! responses end to end (decode, registry lookup, tag recomputation, chunk
//! aggregates, X25519 in psk-ecdhe, session derivation, confirm, verdict
//! encoding and logging), with an in-memory registry.
//!
//! Times are the benchmark thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`),
//! not wall time: on a shared machine wall time mostly measures the other
//! processes, and the targets are stated per core.
//!
//! Run with a short measurement time, e.g.
//! `cargo bench --bench verifier -- --measurement-time 3 --warm-up-time 1`.

#[path = "common/cpu.rs"]
mod cpu;

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sha2::{Digest, Sha256};

use dapgw::protocol::keys::{MasterSecret, MemberKeyDeriver, response_keys, transcript_hash};
use dapgw::protocol::suite::{EphemeralKeyPair, Gcm, SigningKey, aggregate};
use dapgw::protocol::verifier::{
    BatchEvent, BatchState, GroupState, InMemoryRegistry, InMemoryVerdictLog, MemberRecord,
    ReceivedBatch, RoundState, SessionTable, Verifier, VerifierConfig,
};
use dapgw::protocol::wire::{
    Batch, BatchBody, Challenge, GatewayId, GroupId, MemberId, Mode, Purpose, ResponseEntry,
};

/// A deterministic generator (benchmark inputs only).
struct BenchRng(u64);

impl rand_core::TryRng for BenchRng {
    type Error = core::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        Ok(self.try_next_u64()? as u32)
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Ok(z ^ (z >> 31))
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        for chunk in dst.chunks_mut(8) {
            let v = self.try_next_u64()?.to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        Ok(())
    }
}
impl rand_core::TryCryptoRng for BenchRng {}

const G: GroupId = GroupId(1);
const MS: [u8; 32] = [7; 32];
const CHUNK: u16 = 64;

/// Everything one benchmark case needs: the verifier, its state before the
/// batch, and the batch bytes an honest gateway would send.
struct Case {
    verifier: Verifier,
    registry: InMemoryRegistry,
    group: GroupState,
    round: RoundState,
    batch: Bytes,
}

fn case(n: u64, mode: Mode) -> Case {
    let mut rng = BenchRng(n);
    let ms = MasterSecret::from_bytes(MS);
    let verifier = Verifier::new(
        &ms,
        SigningKey::from_seed(&[9; 32]),
        1,
        None,
        VerifierConfig::default(),
    );
    let deriver = MemberKeyDeriver::new(&ms);
    let mut registry = InMemoryRegistry::new();
    let mut group = GroupState::new(G, &mut rng);
    let (round, ch) = verifier
        .open_round(&mut group, mode, Purpose::Auth, None, &mut rng)
        .expect("round opens");
    let challenge = Challenge::decode(&ch).expect("challenge decodes");
    let ch_hash: [u8; 32] = Sha256::digest(&ch).into();

    // Each member seals its response as the design's step 2 says.
    let mut entries = Vec::with_capacity(n as usize);
    let mut tags = Vec::with_capacity(n as usize);
    for id in 1..=n {
        registry.insert(MemberRecord::derived(MemberId(id), 1, vec![G]));
        let mut n_i = [0u8; 16];
        rand_core::Rng::fill_bytes(&mut rng, &mut n_i);
        let e_i = challenge
            .e_v
            .map(|_| EphemeralKeyPair::generate(&mut rng).public());
        let th = transcript_hash(&ch_hash, id, 1, &n_i, e_i.as_ref());
        let (resp, _) = response_keys(&deriver.member_key(id, 1), &th);
        let tag = Gcm::new(resp.k_resp.expose()).seal_in_place(resp.iv_resp.expose(), &th, &mut []);
        entries.push(ResponseEntry {
            id: MemberId(id),
            kv: 1,
            n_i,
            e_i,
            c: Bytes::new(),
        });
        tags.push(tag);
    }
    let batch = Batch {
        gateway_id: GatewayId::new("bench-gw").expect("valid id"),
        batch_id: 1,
        group: G,
        chunk_size: CHUNK,
        body: BatchBody::Responses {
            round: round.round,
            mode,
            entries,
        },
        aggregates: tags.chunks(usize::from(CHUNK)).map(aggregate).collect(),
    };
    Case {
        verifier,
        registry,
        group,
        round,
        batch: batch.to_bytes(),
    }
}

/// Judges the batch once against fresh state; panics unless every member
/// was accepted (so the benchmark cannot silently measure a failure path).
///
/// Returns the changed state, as the UDC would keep it to persist, so that
/// criterion drops it outside the timed region.
fn run(
    c: &Case,
    mut round: RoundState,
    mut sessions: SessionTable,
) -> (RoundState, SessionTable, InMemoryVerdictLog, usize) {
    let mut log = InMemoryVerdictLog::new();
    let rb = ReceivedBatch::decode(c.batch.clone()).expect("batch decodes");
    let out = c
        .verifier
        .handle_batch(
            &rb,
            BatchState {
                group: &c.group,
                round: Some(&mut round),
                sessions: &mut sessions,
            },
            &c.registry,
            &mut log,
            0,
        )
        .expect("batch judged");
    let BatchEvent::Responses(v) = out.event else {
        panic!("honest batch needed localization");
    };
    assert_eq!(
        v.counters.count(dapgw::protocol::wire::Outcome::Accepted) as usize,
        rb.batch().len()
    );
    let len = black_box(out.answer.len());
    (round, sessions, log, len)
}

fn responses(crit: &mut Criterion<cpu::ThreadCpuTime>) {
    let mut group = crit.benchmark_group("verifier_responses");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    for mode in [Mode::Psk, Mode::PskEcdhe] {
        for n in [1_000u64, 10_000] {
            group.throughput(Throughput::Elements(n));
            let label = match mode {
                Mode::Psk => "psk",
                Mode::PskEcdhe => "psk-ecdhe",
            };
            // Built on first use, so a filtered run skips the others' setup.
            let mut built: Option<Case> = None;
            group.bench_function(BenchmarkId::new(label, n), |b| {
                let c = built.get_or_insert_with(|| case(n, mode));
                b.iter_batched(
                    || (c.round.clone(), SessionTable::new()),
                    |(round, sessions)| run(c, round, sessions),
                    BatchSize::LargeInput,
                )
            });
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().with_measurement(cpu::ThreadCpuTime);
    targets = responses
}
criterion_main!(benches);
