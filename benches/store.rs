//! What storing one verified batch costs: `apply_batch` of a 10,000-member
//! psk batch (verdict with the confirms, 10,000 session slot writes, the
//! batch's round outcomes in one row, gateway counters) on SQLite
//! (WAL, synchronous=FULL) and, where installed, on a throwaway PostgreSQL
//! cluster with fsync on.
//!
//! Criterion reports time per batch and members per second; after each
//! backend a line reports wall time and CPU time per member, the CPU split
//! into this process and (PostgreSQL) the database server.
//!
//! Run: `cargo bench --bench store`

use std::borrow::Cow;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dapgw::udc::store::*;

const MEMBERS: u64 = 10_000;
const G: u32 = 1;
const GW: &str = "gw-bench";

/// Opens `url` and enrols the members and the group.
fn prepare(rt: &tokio::runtime::Runtime, url: &str) -> AnyStore {
    rt.block_on(async {
        let s = open(url).await.expect("open store");
        s.apply_batch(BatchWrite {
            members: (1..=MEMBERS)
                .map(|id| MemberRow {
                    id,
                    groups: vec![G],
                    key_source: KeySource::Derived,
                    kv: 1,
                    min_kv: 1,
                    status: MemberStatus::Active,
                    added_at_ms: 0,
                })
                .collect(),
            ..BatchWrite::default()
        })
        .await
        .expect("enrol");
        s.insert_group(GroupRow {
            group: G,
            epoch: 1,
            next_round: 1,
            seq: 0,
            config_hash: [0; 32],
            state: Sealed::new(vec![0; 60]),
            version: 0,
        })
        .await
        .expect("group");
        s
    })
}

/// Opens round `round` (not timed).
async fn open_round(s: &AnyStore, round: u64) {
    s.apply_batch(BatchWrite {
        new_rounds: vec![RoundRow {
            group: G,
            round,
            opened_at_ms: round,
            closes_at_ms: None,
            mode: Mode::Psk,
            purpose: RoundPurpose::Auth,
            challenge: vec![0; 160],
            state: Sealed::new(Vec::new()),
            status: RoundStatus::Open,
        }],
        ..BatchWrite::default()
    })
    .await
    .expect("open round");
}

/// The write set of one fully accepted psk batch answering `round`.
fn batch(round: u64) -> BatchWrite {
    // A sealed session slot holding the used session and the new pending
    // one (`SessionSlot::encode`: 11 + 2 x 97 bytes) plus the storage
    // seal's nonce and tag (28 bytes).
    let state = vec![0x5A; 233];
    BatchWrite {
        now_ms: round,
        verdict: Some(VerdictWrite {
            gateway: GW.into(),
            batch_id: round,
            batch_hash: [round as u8; 32],
            // One outcome byte and one ~70-byte confirm per member; mostly
            // ciphertext, so incompressible (PostgreSQL's TOAST gives up).
            verdict: noise((MEMBERS * 71) as usize, round),
            pending: None,
        }),
        via: Some(Via {
            gateway: GW.into(),
            batches: 1,
            entries: MEMBERS,
            accepted: MEMBERS,
            ..Via::default()
        }),
        sessions: (1..=MEMBERS)
            .map(|member| {
                let mut sid = member.to_be_bytes();
                sid[0] = round as u8;
                SessionRow {
                    member,
                    group: G,
                    sid: Some(sid),
                    state: Sealed::new(state.clone()),
                    round,
                    authenticated_at_ms: Some(round),
                    // Rounds count from 1, each member's slot is written
                    // once per round: the version read is round - 1, and
                    // the member was accepted in every earlier round.
                    version: round - 1,
                    rounds: (1..round)
                        .fold(AcceptedRounds::default(), |w, r| w.with(r).unwrap_or(w)),
                    accepted_in: Some(round),
                    use_read: None,
                }
            })
            .collect(),
        outcomes: (1..=MEMBERS)
            .map(|member| OutcomeRow {
                group: G,
                round,
                member,
                kind: OutcomeKind::Accepted,
                reason: Cow::Borrowed(""),
                gateway: None,
            })
            .collect(),
        ..BatchWrite::default()
    }
}

/// Incompressible filler (xorshift64).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// CPU time (user + system) of a process so far, from `/proc/<pid>/stat`.
fn cpu_of(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10)) // CLK_TCK = 100 on Linux
}

/// CPU time of the database server: the postmaster and its children.
fn server_cpu(postmaster: u32) -> Duration {
    let mut total = Duration::ZERO;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return total;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{name}/stat")) else {
            continue;
        };
        let ppid = stat
            .rfind(')')
            .and_then(|p| stat[p + 2..].split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if name == postmaster.to_string() || ppid == Some(postmaster) {
            total += cpu_of(&name).unwrap_or_default();
        }
    }
    total
}

/// Runs `n` timed batches outside criterion and prints per-member costs.
fn summary(
    rt: &tokio::runtime::Runtime,
    s: &AnyStore,
    label: &str,
    next_round: &mut u64,
    server: Option<u32>,
) {
    const N: u64 = 10;
    let (mut wall, mut ours, mut theirs) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    for _ in 0..N {
        *next_round += 1;
        let round = *next_round;
        rt.block_on(open_round(s, round));
        let w = batch(round);
        let (c0, s0, t0) = (cpu_of("self"), server.map(server_cpu), Instant::now());
        rt.block_on(s.apply_batch(w)).expect("apply");
        wall += t0.elapsed();
        ours += cpu_of("self").unwrap_or_default() - c0.unwrap_or_default();
        if let (Some(pid), Some(s0)) = (server, s0) {
            theirs += server_cpu(pid).saturating_sub(s0);
        }
    }
    let per = |d: Duration| d.as_secs_f64() * 1e6 / (N * MEMBERS) as f64;
    println!(
        "{label}: {N} batches x {MEMBERS} members: wall {:.2} us/member ({:.0} members/s), \
         cpu {:.2} us/member in the UDC process, {:.2} us/member in the database server",
        per(wall),
        (N * MEMBERS) as f64 / wall.as_secs_f64(),
        per(ours),
        per(theirs),
    );
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("store/apply_batch_10k_psk");
    group
        .throughput(Throughput::Elements(MEMBERS))
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(15));

    let dir = tempfile::tempdir().expect("tempdir");
    let sqlite = prepare(
        &rt,
        &format!("sqlite://{}", dir.path().join("udc.db").display()),
    );
    let mut round = 0;
    group.bench_function("sqlite", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                round += 1;
                rt.block_on(open_round(&sqlite, round));
                let w = batch(round);
                let t0 = Instant::now();
                rt.block_on(sqlite.apply_batch(w)).expect("apply");
                total += t0.elapsed();
            }
            total
        })
    });
    summary(&rt, &sqlite, "sqlite", &mut round, None);

    match PgCluster::start(true) {
        Ok(cluster) => {
            cluster.create_database("bench").expect("createdb");
            let pg = prepare(&rt, &cluster.url("bench"));
            let mut round = 0;
            group.bench_function("postgres", |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        round += 1;
                        rt.block_on(open_round(&pg, round));
                        let w = batch(round);
                        let t0 = Instant::now();
                        rt.block_on(pg.apply_batch(w)).expect("apply");
                        total += t0.elapsed();
                    }
                    total
                })
            });
            summary(&rt, &pg, "postgres", &mut round, cluster.server_pid());
        }
        Err(e) => println!("postgres: skipped: {e}"),
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
