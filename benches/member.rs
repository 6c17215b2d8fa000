//! Cost of the member state machine per operation: what a meter spends.
//!
//! `challenge_respond_*` is a whole round on the member's side (decode,
//! signature check, sealing, state encoding for persisting), the figure a
//! meter vendor budgets for; `seal_uplink` is the steady-state cost of a
//! reading; `restore` is a boot.
//!
//! Run: `cargo bench --no-default-features --bench member -- --quick`.
//! On a shared machine set `DAPGW_BENCH_CPU=1` to count the thread's on-CPU
//! time (Linux `/proc/thread-self/schedstat`) instead of wall time.

#[path = "common/cpu.rs"]
mod cpu;

use std::hint::black_box;

use bytes::Bytes;
use criterion::measurement::Measurement;
use criterion::{BatchSize, Criterion};
use dapgw::protocol::keys::{
    MemberCredential, MemberKey, response_keys, session_keys, sign_key_certificate, transcript_hash,
};
use dapgw::protocol::member::{Challenged, Member};
use dapgw::protocol::suite::{EphemeralKeyPair, Gcm, SigningKey};
use dapgw::protocol::wire::{
    Challenge, Confirm, GroupId, KeyCertificate, Purpose, Response, SessionId, UplinkKind,
};
use sha2::{Digest, Sha256};

const G: GroupId = GroupId(7);

/// Plays V: signs challenges and builds the confirm for a response.
struct V {
    root: SigningKey,
    online: SigningKey,
}

impl V {
    fn challenge(&self, round: u64, e_v: Option<[u8; 32]>, cert: bool) -> Bytes {
        let public_key = self.online.verifying_key().to_bytes();
        let mut ch = Challenge {
            group: G,
            round,
            epoch: 1,
            nonce_v: [1; 16],
            e_v,
            purpose: Purpose::Auth,
            group_seq: 0,
            config_hash: [0; 32],
            not_after: None,
            key_cert: cert.then(|| KeyCertificate {
                key_id: 1,
                key_version: 1,
                public_key,
                root_sig: sign_key_certificate(&self.root, 1, 1, &public_key),
            }),
            key_id: 1,
            signature: [0; 64],
        };
        ch.signature = self.online.sign(&ch.signed_bytes());
        ch.to_bytes()
    }

    fn confirm(&self, ch: &Bytes, resp: &Bytes, key: &MemberKey) -> Bytes {
        let r = Response::decode(resp).unwrap();
        let ch_hash: [u8; 32] = Sha256::digest(ch).into();
        let th = transcript_hash(&ch_hash, r.id.0, r.kv, &r.n_i, None);
        let (_, prk0) = response_keys(key, &th);
        let keys = session_keys(&prk0, None);
        let mut c = Confirm {
            group: G,
            round: r.round,
            epoch: 1,
            id: r.id,
            sid: SessionId(keys.sid),
            w: [0; 32],
        };
        let mut gk = [0x47u8; 16];
        let tag =
            Gcm::new(keys.k_conf.expose()).seal_in_place(keys.iv_conf.expose(), &c.aad(), &mut gk);
        c.w[..16].copy_from_slice(&gk);
        c.w[16..].copy_from_slice(&tag);
        c.to_bytes()
    }
}

fn respond(member: &mut Member, ch: &Bytes, rng: &mut impl rand_core::CryptoRng) -> Bytes {
    match member.handle_challenge(ch, None).unwrap() {
        Challenged::Answer(a) => {
            let out = a.respond(b"", rng).unwrap();
            black_box(out.state());
            out.persisted()
        }
        Challenged::Resend(b) => b,
    }
}

fn bench<M: Measurement + 'static>(c: &mut Criterion<M>) {
    let mut rng = rand_core::UnwrapErr(getrandom::SysRng);
    let v = V {
        root: SigningKey::from_seed(&[1; 32]),
        online: SigningKey::from_seed(&[2; 32]),
    };
    let cred = MemberCredential {
        id: 1001,
        kv: 1,
        key: MemberKey::from_bytes([9; 32]),
        groups: vec![G.0],
        root_public_key: v.root.verifying_key().to_bytes(),
        min_online_key_version: 1,
    };
    // A member in a session after round 1, knowing the online key.
    let mut member = Member::new(&cred).unwrap();
    let ch1 = v.challenge(1, None, true);
    let resp1 = respond(&mut member, &ch1, &mut rng);
    let out = member
        .handle_confirm(&v.confirm(&ch1, &resp1, &cred.key))
        .unwrap();
    let _ = out.persisted();
    let state = member.state_bytes();
    assert_eq!(member.session(G).map(|s| s.1), Some(1));

    let ch2_psk = v.challenge(2, None, false);
    let e_v = EphemeralKeyPair::from_secret_bytes(&[3; 32]).public();
    let ch2_ecdhe = v.challenge(2, Some(e_v), false);
    for (name, ch) in [
        ("challenge_respond_psk", &ch2_psk),
        ("challenge_respond_psk_ecdhe", &ch2_ecdhe),
    ] {
        c.bench_function(name, |b| {
            b.iter_batched(
                || {
                    Member::restore(&cred, &state, &mut rand_core::UnwrapErr(getrandom::SysRng))
                        .unwrap()
                },
                |mut m| respond(&mut m, black_box(ch), &mut rng),
                BatchSize::SmallInput,
            )
        });
    }
    c.bench_function("challenge_replay_resend", |b| {
        b.iter(|| respond(&mut member, black_box(&ch1), &mut rng))
    });

    let mut fresh =
        Member::restore(&cred, &state, &mut rand_core::UnwrapErr(getrandom::SysRng)).unwrap();
    let ch2_resp = respond(&mut fresh, &ch2_psk, &mut rng);
    let pending = fresh.state_bytes();
    let conf = v.confirm(&ch2_psk, &ch2_resp, &cred.key);
    c.bench_function("handle_confirm", |b| {
        b.iter_batched(
            || {
                Member::restore(
                    &cred,
                    &pending,
                    &mut rand_core::UnwrapErr(getrandom::SysRng),
                )
                .unwrap()
            },
            |mut m| {
                let out = m.handle_confirm(black_box(&conf)).unwrap();
                black_box(out.state());
                out.persisted()
            },
            BatchSize::SmallInput,
        )
    });

    let reading = [0x55u8; 64];
    c.bench_function("seal_uplink_64B", |b| {
        b.iter(|| {
            let out = member
                .seal_uplink(G, UplinkKind::Reading, black_box(&reading))
                .unwrap();
            black_box(out.state());
            out.persisted()
        })
    });
    c.bench_function("restore", |b| {
        b.iter(|| {
            Member::restore(
                &cred,
                black_box(&state),
                &mut rand_core::UnwrapErr(getrandom::SysRng),
            )
            .unwrap()
        })
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
