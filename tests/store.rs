//! The UDC store against both backends: every case runs once on SQLite (a
//! file in a temporary directory) and once on PostgreSQL (a throwaway
//! cluster shared by this test binary, one fresh database per case).
//!
//! Where PostgreSQL is not installed the PostgreSQL half prints
//! `skipped: PostgreSQL: ...` (tests/support/skip.rs), and fails under `CI=true`.
#![cfg(feature = "service")]

#[path = "support/skip.rs"]
mod skip;

use std::borrow::Cow;
use std::future::Future;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use dapgw::udc::store::*;

// ---------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Sqlite,
    Postgres,
}

/// A fresh, empty store location; `open` may be called again to reopen it.
struct Fixture {
    kind: Kind,
    url: String,
    _dir: Option<tempfile::TempDir>,
}

impl Fixture {
    async fn open(&self) -> AnyStore {
        open(&self.url).await.expect("open store")
    }

    /// Creates the database as migrations `1..=version` of the repository
    /// left it (the version recorded as the backend records it), then runs
    /// `rows` on it (`x'..'` blob literals are rewritten for PostgreSQL).
    async fn at_version(&self, version: u32, rows: &str) {
        /// (SQLite, PostgreSQL) text of each migration, from version 1.
        const MIGRATIONS: [(&str, &str); 4] = [
            (
                include_str!("../migrations/sqlite/0001_init.sql"),
                include_str!("../migrations/postgres/0001_init.sql"),
            ),
            (
                include_str!("../migrations/sqlite/0002_session_slots.sql"),
                include_str!("../migrations/postgres/0002_session_slots.sql"),
            ),
            (
                include_str!("../migrations/sqlite/0003_downlink_bundles.sql"),
                include_str!("../migrations/postgres/0003_downlink_bundles.sql"),
            ),
            (
                include_str!("../migrations/sqlite/0004_batch_outcomes.sql"),
                include_str!("../migrations/postgres/0004_batch_outcomes.sql"),
            ),
        ];
        let applied = &MIGRATIONS[..version as usize];
        match self.kind {
            Kind::Sqlite => {
                let path = self.url.trim_start_matches("sqlite://");
                std::fs::create_dir_all(std::path::Path::new(path).parent().unwrap()).unwrap();
                let c = rusqlite::Connection::open(path).unwrap();
                for (sql, _) in applied {
                    c.execute_batch(sql).unwrap();
                }
                c.execute_batch(rows).unwrap();
                c.pragma_update(None, "user_version", version).unwrap();
            }
            Kind::Postgres => {
                let client = self.pg_client().await;
                client
                    .batch_execute(
                        "CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY, \
                         applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
                    )
                    .await
                    .unwrap();
                for (v, (_, sql)) in applied.iter().enumerate() {
                    client.batch_execute(sql).await.unwrap();
                    client
                        .execute(
                            "INSERT INTO schema_migrations (version) VALUES ($1)",
                            &[&(v as i64 + 1)],
                        )
                        .await
                        .unwrap();
                }
                client
                    .batch_execute(&rows.replace("x'", "'\\x"))
                    .await
                    .unwrap();
            }
        }
    }

    /// A connection to the PostgreSQL database.
    async fn pg_client(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    }

    /// Migration versions recorded in the database.
    async fn schema_versions(&self) -> Vec<i64> {
        match self.kind {
            Kind::Sqlite => {
                let path = self.url.trim_start_matches("sqlite://");
                let c = rusqlite::Connection::open(path).unwrap();
                vec![
                    c.pragma_query_value(None, "user_version", |r| r.get(0))
                        .unwrap(),
                ]
            }
            Kind::Postgres => {
                let client = self.pg_client().await;
                client
                    .query(
                        "SELECT version FROM schema_migrations ORDER BY version",
                        &[],
                    )
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| r.get(0))
                    .collect()
            }
        }
    }
}

/// The cluster shared by every PostgreSQL case of this binary (the cluster
/// helper's watchdog stops it when the process exits).
fn cluster() -> Option<&'static PgCluster> {
    static CLUSTER: OnceLock<Result<PgCluster, PgClusterError>> = OnceLock::new();
    match CLUSTER.get_or_init(|| PgCluster::start(false)) {
        Ok(c) => Some(c),
        Err(e @ PgClusterError::NotInstalled(_)) => {
            skip::skip("PostgreSQL", &e);
            None
        }
        Err(e) => panic!("{e}"),
    }
}

fn fixture(kind: Kind) -> Option<Fixture> {
    static DB: AtomicU32 = AtomicU32::new(0);
    match kind {
        Kind::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            // A nested directory: the store creates its data directory.
            let path = dir.path().join("data").join("udc.db");
            Some(Fixture {
                kind,
                url: format!("sqlite://{}", path.display()),
                _dir: Some(dir),
            })
        }
        Kind::Postgres => {
            let c = cluster()?;
            let name = format!("t{}", DB.fetch_add(1, Ordering::Relaxed));
            c.create_database(&name).unwrap();
            Some(Fixture {
                kind,
                url: c.url(&name),
                _dir: None,
            })
        }
    }
}

async fn run<F, Fut>(kind: Kind, case: F)
where
    F: FnOnce(Fixture) -> Fut,
    Fut: Future<Output = ()>,
{
    if let Some(f) = fixture(kind) {
        case(f).await;
    }
}

/// Declares one test per backend for each case.
macro_rules! both {
    ($($case:ident),* $(,)?) => {
        $(
            mod $case {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::run(super::Kind::Sqlite, super::$case).await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::run(super::Kind::Postgres, super::$case).await;
                }
            }
        )*
    };
}

both!(
    migrations_idempotent_on_reopen,
    member_registry,
    apply_batch_is_atomic,
    retried_batch_changes_nothing,
    localization_pending_then_final,
    due_work_is_what_the_background_pass_needs,
    group_optimistic_concurrency,
    batch_checks_group_epoch,
    session_slots_are_compare_and_set,
    session_uses_are_compare_and_set,
    many_first_uses_stand_or_fall_together,
    many_rows_in_one_write_stand_or_fall_together,
    retention_trims_readings_and_final_verdicts,
    downlink_cursors_and_fanout,
    downlink_reads_are_cut_by_bytes,
    subscribing_queues_open_rounds_challenges,
    readings_query,
    readings_page_exactly_within_a_millisecond,
    readings_page_exactly_in_a_crowded_millisecond,
    sealed_blobs_round_trip_untouched,
    round_report_and_outcomes,
    second_acceptance_fails_the_write,
    dense_and_sparse_batch_reads_agree,
    registry_version_follows_every_registry_change,
    recovery_is_one_transaction_and_raises_the_floor,
    group_messages_acks_schedules,
    v3_outcomes_fill_accepted_rounds,
    v4_schedules_get_an_empty_read_request,
    schedule_claim_stands_or_falls_with_its_write,
    key_versions_issue_and_confirm,
);

/// A member row from before schema version 9 (no `min_kv`) reads with
/// `min_kv = kv`. A key update's version change is compare-and-set on the
/// version read and on the member being active; a confirmation only raises
/// `min_kv`, never past `kv`; a new credential (`set_kv`) accepts only its
/// own version.
async fn key_versions_issue_and_confirm(f: Fixture) {
    use dapgw::udc::store::KeyVersionChange::{Confirmed, Expected, Issued};
    f.at_version(
        1,
        "INSERT INTO members (id, kv, key_source, imported_key, status, added_at_ms) \
         VALUES (1, 3, 0, NULL, 0, 5), (2, 1, 0, NULL, 1, 5)",
    )
    .await;
    let s = f.open().await;
    async fn kvs(s: &AnyStore, id: u64) -> (u32, u32) {
        let m = s.members(vec![id]).await.unwrap().pop().unwrap().unwrap();
        (m.kv, m.min_kv)
    }
    let change = |c| BatchWrite {
        key_versions: vec![c],
        ..BatchWrite::default()
    };
    assert_eq!(kvs(&s, 1).await, (3, 3));
    let issue = Issued {
        member: 1,
        from_kv: 3,
        to_kv: 4,
    };
    s.apply_batch(change(issue)).await.unwrap();
    assert_eq!(kvs(&s, 1).await, (4, 3));
    // Issued again from the version read before: someone else moved it.
    assert!(matches!(
        s.apply_batch(change(issue)).await,
        Err(StoreError::Conflict("member key version"))
    ));
    // A revoked member gets no new version.
    let revoked = Issued {
        member: 2,
        from_kv: 1,
        to_kv: 2,
    };
    assert!(matches!(
        s.apply_batch(change(revoked)).await,
        Err(StoreError::Conflict("member key version"))
    ));
    // Never above kv, never down.
    for (kv, want) in [(5, (4, 3)), (4, (4, 4)), (3, (4, 4))] {
        s.apply_batch(change(Confirmed { member: 1, kv }))
            .await
            .unwrap();
        assert_eq!(kvs(&s, 1).await, want, "confirmed {kv}");
    }
    // Issued while one is still unconfirmed: the oldest accepted stays.
    s.apply_batch(change(Issued {
        member: 1,
        from_kv: 4,
        to_kv: 5,
    }))
    .await
    .unwrap();
    s.apply_batch(change(Issued {
        member: 1,
        from_kv: 5,
        to_kv: 6,
    }))
    .await
    .unwrap();
    assert_eq!(kvs(&s, 1).await, (6, 4));
    assert!(s.set_kv(1, 9, KeySource::Derived).await.unwrap());
    assert_eq!(kvs(&s, 1).await, (9, 9));
    // A full row write stores what it names.
    let mut row = member(1, &[G]);
    row.kv = 8;
    row.min_kv = 7;
    s.upsert_member(row).await.unwrap();
    assert_eq!(kvs(&s, 1).await, (8, 7));
    // A whole-row write's check of the versions it read.
    let expect = |kv, min_kv| {
        change(Expected {
            member: 1,
            kv,
            min_kv,
        })
    };
    s.apply_batch(expect(8, 7)).await.unwrap();
    for (kv, min_kv) in [(8, 8), (7, 7)] {
        assert!(matches!(
            s.apply_batch(expect(kv, min_kv)).await,
            Err(StoreError::Conflict("member key version"))
        ));
    }
    // No row yet: nothing to compare.
    s.apply_batch(change(Expected {
        member: 99,
        kv: 1,
        min_kv: 1,
    }))
    .await
    .unwrap();
}

/// A write's schedule claim is compare-and-set on the due time, and part of
/// the write: a write that fails after it leaves the schedule due, a stale
/// claim fails the write before anything is written.
async fn schedule_claim_stands_or_falls_with_its_write(f: Fixture) {
    let s = f.open().await;
    setup(&s, 1).await;
    let id = s
        .insert_schedule(ScheduleRow {
            id: 0,
            group: G,
            every_ms: 60_000,
            mode: Mode::Psk,
            purpose: RoundPurpose::Auth,
            read_request: Vec::new(),
            next_at_ms: 100,
        })
        .await
        .unwrap();
    let claim = ScheduleClaim {
        id,
        expected_next_ms: 100,
        next_ms: 60_100,
    };
    // Fails late (localizations for a round that does not exist).
    let failing = BatchWrite {
        schedule_claim: Some(claim),
        round_localizations: vec![RoundLocalizations {
            group: G,
            round: 99,
            chunks: 1,
        }],
        ..BatchWrite::default()
    };
    assert!(s.apply_batch(failing).await.is_err());
    assert_eq!(s.schedules().await.unwrap()[0].next_at_ms, 100);
    // Stands with its write.
    s.apply_batch(BatchWrite {
        schedule_claim: Some(claim),
        ..BatchWrite::default()
    })
    .await
    .unwrap();
    assert_eq!(s.schedules().await.unwrap()[0].next_at_ms, 60_100);
    // Stale: a conflict, and the rest of the write is not applied.
    let got = s
        .apply_batch(BatchWrite {
            schedule_claim: Some(claim),
            closed_rounds: vec![(G, 1)],
            ..BatchWrite::default()
        })
        .await;
    assert!(
        matches!(got, Err(StoreError::Conflict("schedule"))),
        "{got:?}"
    );
    assert_eq!(
        s.round(G, 1).await.unwrap().unwrap().status,
        RoundStatus::Open
    );
}

/// A version 1 SQLite database (current/previous session columns) is
/// migrated to one slot per (member, group): the current slot (which held
/// the whole sealed verifier slot) carries over, an all-zero sid (an empty
/// slot) becomes empty.
#[tokio::test]
async fn sqlite_v1_sessions_migrate_to_slots() {
    let f = fixture(Kind::Sqlite).unwrap();
    f.at_version(
        1,
        "INSERT INTO sessions (member, grp, last_auth_ms, cur_sid, cur_state, cur_round, \
         cur_created_ms, cur_hi, cur_bits, prev_sid, prev_state, prev_round, \
         prev_created_ms, prev_hi, prev_bits) \
         VALUES (1, 7, 500, x'0101010101010101', x'AA', 3, 500, 0, 0, \
         x'0202020202020202', x'BB', 2, 400, 0, 0), \
         (2, 7, 600, x'0000000000000000', x'CC', 0, 600, 0, 0, NULL, NULL, NULL, NULL, NULL, NULL)",
    )
    .await;
    let s = f.open().await;
    let got = s.sessions(vec![(1, 7), (2, 7)]).await.unwrap();
    let one = got[0].clone().unwrap();
    assert_eq!(one.sid, Some([1; 8]));
    assert_eq!(one.state, Some(Sealed::new(vec![0xAA])));
    assert_eq!((one.round, one.last_auth_ms, one.version), (3, 500, 1));
    let two = got[1].clone().unwrap();
    assert!(two.sid.is_none() && two.state.is_none());
    assert_eq!(two.last_auth_ms, 600);
    assert_eq!(s.count_sessions().await.unwrap(), 1);
}

/// A version 7 SQLite database's readings (a table keyed by member, group,
/// sid and counter) move to the arrival-ordered table of version 8: every
/// reading comes back, byte for byte, in the order of a readings page.
#[tokio::test]
async fn sqlite_v7_readings_move_to_arrival_order() {
    const V7: [&str; 7] = [
        include_str!("../migrations/sqlite/0001_init.sql"),
        include_str!("../migrations/sqlite/0002_session_slots.sql"),
        include_str!("../migrations/sqlite/0003_downlink_bundles.sql"),
        include_str!("../migrations/sqlite/0004_batch_outcomes.sql"),
        include_str!("../migrations/sqlite/0005_schedule_read_request.sql"),
        include_str!("../migrations/sqlite/0006_registry_version.sql"),
        include_str!("../migrations/sqlite/0007_recovery.sql"),
    ];
    let f = fixture(Kind::Sqlite).unwrap();
    let path = f.url.trim_start_matches("sqlite://");
    std::fs::create_dir_all(std::path::Path::new(path).parent().unwrap()).unwrap();
    let c = rusqlite::Connection::open(path).unwrap();
    for sql in V7 {
        c.execute_batch(sql).unwrap();
    }
    // Inserted out of time order, two members, two groups.
    c.execute_batch(
        "INSERT INTO readings (member, grp, sid, ctr, ts_ms, kind, payload) VALUES \
         (1, 7, x'0101010101010101', 3, 300, 1, x'03'), \
         (1, 7, x'0101010101010101', 1, 100, 1, x'01'), \
         (2, 7, x'0202020202020202', 1, 100, 2, x'21'), \
         (1, 8, x'0101010101010101', 2, 100, 1, x'02');",
    )
    .unwrap();
    c.pragma_update(None, "user_version", 7).unwrap();
    drop(c);
    let s = f.open().await;
    assert_eq!(f.schema_versions().await, vec![12]);
    let got: Vec<(u32, u64, u64, Vec<u8>)> = s
        .readings_after(1, 0, u64::MAX, None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.group, r.ctr, r.ts_ms, r.payload))
        .collect();
    assert_eq!(
        got,
        vec![
            (7, 1, 100, vec![1]),
            (8, 2, 100, vec![2]),
            (7, 3, 300, vec![3])
        ]
    );
    let two = s.readings_after(2, 0, u64::MAX, None, 10).await.unwrap();
    assert_eq!(
        (two.len(), two[0].kind, &two[0].payload[..]),
        (1, 2, &[0x21][..])
    );
}

/// A deadlock PostgreSQL breaks between a write's slot checks (rows locked
/// FOR SHARE in member order) and another transaction that locks the same
/// rows in the other order is that write's conflict (the UDC answers 503
/// `busy` and the gateway retries), not a store error (a 500).
#[tokio::test]
async fn postgres_deadlock_is_a_conflict() {
    let Some(f) = fixture(Kind::Postgres) else {
        return;
    };
    let s = f.open().await;
    setup(&s, 2).await;
    s.apply_batch(BatchWrite {
        sessions: vec![session(1, 1, 1, 0), session(2, 1, 1, 0)],
        ..BatchWrite::default()
    })
    .await
    .unwrap();
    // Another transaction holds member 2's row; its own deadlock check
    // waits an hour, so the write's backend is the one that breaks it.
    let other = f.pg_client().await;
    other
        .batch_execute(
            "SET deadlock_timeout = '1h'; BEGIN; \
             SELECT 1 FROM sessions WHERE member = 2 FOR UPDATE",
        )
        .await
        .unwrap();
    let check = |member| SlotCheck {
        member,
        group: G,
        version: 1,
    };
    let write = tokio::spawn(async move {
        s.apply_batch(BatchWrite {
            slot_checks: vec![check(1), check(2)],
            ..BatchWrite::default()
        })
        .await
    });
    // The write holds member 1's row and waits for member 2's.
    lock_waiters(&f, 1, "the write").await;
    // Now the other transaction asks for member 1's row: a cycle.
    let other = tokio::spawn(async move {
        other
            .batch_execute("SELECT 1 FROM sessions WHERE member = 1 FOR UPDATE; COMMIT")
            .await
    });
    let got = write.await.unwrap();
    assert!(matches!(got, Err(StoreError::Conflict(_))), "{got:?}");
    other.await.unwrap().unwrap();
}

/// The compare-and-set between session uses and slot writes holds under
/// PostgreSQL's READ COMMITTED with the other writer in flight: another
/// transaction plays a second UDC process, its write begun and not yet
/// committed, and the store's write waits for it, then loses (a conflict,
/// nothing written). First a use written meanwhile against a slot write
/// that folded none in (the slot write's check of the use runs after its
/// update waited); then a first use written meanwhile against another
/// first use of the same slot version; then a use judged on the stored
/// one against another update of it, and against a rewrite of the slot
/// (its version moved while the use write waited for its share lock).
#[tokio::test]
async fn postgres_a_use_in_flight_fails_the_other_write() {
    let Some(f) = fixture(Kind::Postgres) else {
        return;
    };
    let s = std::sync::Arc::new(f.open().await);
    setup(&s, 1).await;
    s.apply_batch(BatchWrite {
        sessions: vec![session(1, 1, 1, 0)],
        ..BatchWrite::default()
    })
    .await
    .unwrap();
    let use_write = |top: u64| BatchWrite {
        slot_uses: vec![UseWrite {
            member: 1,
            group: G,
            base: 1,
            read: None,
            new: SlotUse {
                sid: sid(1, 1),
                top,
                seen: 1,
            },
        }],
        ..BatchWrite::default()
    };
    let slot_write = BatchWrite {
        sessions: vec![session(1, 2, 2, 1)],
        ..BatchWrite::default()
    };
    for (ours, theirs) in [(slot_write, 5), (use_write(6), 7)] {
        let other = f.pg_client().await;
        other
            .batch_execute(&format!(
                "BEGIN; SELECT 1 FROM sessions WHERE member = 1 AND grp = {G} FOR SHARE; \
                 INSERT INTO session_uses (member, grp, base, sid, top, seen) \
                 VALUES (1, {G}, 1, '\\x{}'::bytea, {theirs}, 1)",
                hex::encode(sid(1, 1))
            ))
            .await
            .unwrap();
        let store = std::sync::Arc::clone(&s);
        let write = tokio::spawn(async move { store.apply_batch(ours).await });
        lock_waiters(&f, 1, "the write").await;
        other.batch_execute("COMMIT").await.unwrap();
        let got = write.await.unwrap();
        assert!(matches!(got, Err(StoreError::Conflict(_))), "{got:?}");
        let p = slot1(&s).await.unwrap();
        assert_eq!(p.version, 1, "nothing of the losing write");
        assert_eq!(p.used.map(|u| u.top), Some(theirs));
        other
            .batch_execute("DELETE FROM session_uses")
            .await
            .unwrap();
    }
    // A use judged on the stored one, against another update of it in
    // flight; then against a rewrite of the slot in flight (its version
    // moved under the use write's share lock).
    let next = |top: u64| BatchWrite {
        slot_uses: vec![UseWrite {
            member: 1,
            group: G,
            base: 1,
            read: Some(SlotUse {
                sid: sid(1, 1),
                top: 10,
                seen: 1,
            }),
            new: SlotUse {
                sid: sid(1, 1),
                top,
                seen: 1,
            },
        }],
        ..BatchWrite::default()
    };
    for (after, sql) in [
        (
            Some(11),
            format!(
                "BEGIN; SELECT 1 FROM sessions WHERE member = 1 AND grp = {G} FOR SHARE; \
                 UPDATE session_uses SET top = 11 WHERE member = 1 AND grp = {G}"
            ),
        ),
        // The slot's version moved: the stored use is stale.
        (
            None,
            format!("BEGIN; UPDATE sessions SET version = 2 WHERE member = 1 AND grp = {G}"),
        ),
    ] {
        s.apply_batch(use_write(10)).await.unwrap();
        let other = f.pg_client().await;
        other.batch_execute(&sql).await.unwrap();
        let store = std::sync::Arc::clone(&s);
        let write = tokio::spawn(async move { store.apply_batch(next(12)).await });
        lock_waiters(&f, 1, "the use write").await;
        other.batch_execute("COMMIT").await.unwrap();
        let got = write.await.unwrap();
        assert!(matches!(got, Err(StoreError::Conflict(_))), "{got:?}");
        assert_eq!(slot1(&s).await.unwrap().used.map(|u| u.top), after);
        other
            .batch_execute("DELETE FROM session_uses")
            .await
            .unwrap();
    }
}

/// Waits until `n` backends of the test database wait for a lock.
async fn lock_waiters(f: &Fixture, n: i64, what: &str) {
    let watcher = f.pg_client().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting >= n {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{what} never waited");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Two subscription changes for one gateway at once (two UDC processes
/// answering its retries) both succeed, one after the other. Another
/// connection plays the first: it holds the gateway's subscription lock
/// (as the store takes it) with its rows replaced but not committed. The
/// second waits for it; without the lock its DELETE missed the first's
/// new rows and its INSERT hit the primary key (an error, a 500).
#[tokio::test]
async fn postgres_two_subscription_changes_for_one_gateway_serialize() {
    let Some(f) = fixture(Kind::Postgres) else {
        return;
    };
    let s = std::sync::Arc::new(f.open().await);
    s.set_subscriptions("gw-a", vec![G], 1_000).await.unwrap();
    let first = f.pg_client().await;
    first
        .batch_execute(
            "BEGIN; SELECT pg_advisory_xact_lock(1684501367, hashtext('gw-a')); \
             DELETE FROM subscriptions WHERE gateway = 'gw-a'; \
             INSERT INTO subscriptions (gateway, grp) VALUES ('gw-a', 5)",
        )
        .await
        .unwrap();
    let second = {
        let s = s.clone();
        tokio::spawn(async move { s.set_subscriptions("gw-a", vec![5, 6], 2_000).await })
    };
    lock_waiters(&f, 1, "the second subscription change").await;
    first.batch_execute("COMMIT").await.unwrap();
    second.await.unwrap().unwrap();
    let rows = f
        .pg_client()
        .await
        .query(
            "SELECT grp FROM subscriptions WHERE gateway = 'gw-a' ORDER BY grp",
            &[],
        )
        .await
        .unwrap();
    let groups: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(groups, vec![5, 6]);
}

/// A gateway subscribing to a brand-new group while that group's first
/// round opens gets the round's challenge: either the subscription sees
/// the round, or the round's fan-out sees the subscription. Before the
/// subscription locks, the subscription (locking the group's row, which
/// did not exist yet) read no open round and the fan-out, not seeing the
/// uncommitted subscription, skipped the gateway: it never got the
/// challenge.
///
/// The interleaving is forced: another transaction holds the gateway's
/// downlink head, so the subscription stops, its reads done, where it
/// queues the open round of a group it already had (`G`). The database's
/// default isolation is repeatable read, which the store overrides.
#[tokio::test]
async fn postgres_subscribing_to_a_new_group_races_its_first_round() {
    let Some(f) = fixture(Kind::Postgres) else {
        return;
    };
    // The store writes at read committed whatever the database's default
    // (at repeatable read the round's write would read the subscribers
    // in the snapshot of its first statement, before the subscription).
    f.pg_client()
        .await
        .batch_execute(
            "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET \
             default_transaction_isolation = %L', current_database(), 'repeatable read'); \
             END $$",
        )
        .await
        .unwrap();
    let s = std::sync::Arc::new(f.open().await);
    const NEW: u32 = G + 7;
    s.insert_group(group_row(G)).await.unwrap();
    s.apply_batch(BatchWrite {
        new_rounds: vec![RoundRow {
            challenge: vec![1; 40],
            closes_at_ms: None,
            ..round_row(G, 1)
        }],
        // Gives gw-a a downlink head to hold.
        downlink: vec![push(DownlinkTarget::Gateway("gw-a".into()), 9)],
        ..BatchWrite::default()
    })
    .await
    .unwrap();
    let holder = f.pg_client().await;
    holder
        .batch_execute("BEGIN; SELECT 1 FROM downlink_heads WHERE gateway = 'gw-a' FOR UPDATE")
        .await
        .unwrap();
    let sub = {
        let s = s.clone();
        tokio::spawn(async move { s.set_subscriptions("gw-a", vec![G, NEW], 10_000).await })
    };
    lock_waiters(&f, 1, "the subscription").await;
    // The new group's first round opens meanwhile, its challenge fanned
    // out to the group's subscribers.
    s.insert_group(group_row(NEW)).await.unwrap();
    let round = {
        let s = s.clone();
        tokio::spawn(async move {
            s.apply_batch(BatchWrite {
                new_rounds: vec![RoundRow {
                    challenge: vec![2; 40],
                    closes_at_ms: None,
                    ..round_row(NEW, 1)
                }],
                downlink: vec![DownlinkPush {
                    target: DownlinkTarget::Subscribers,
                    records: vec![DownlinkRecord {
                        audience: Audience::Group,
                        group: NEW,
                        message: vec![2; 40],
                    }],
                }],
                ..BatchWrite::default()
            })
            .await
        })
    };
    // The round's write either ends (without the subscription locks) or
    // waits for the subscription's.
    let mut round = round;
    let ended = tokio::select! {
        () = lock_waiters(&f, 2, "the round's write") => None,
        r = &mut round => Some(r),
    };
    holder.batch_execute("COMMIT").await.unwrap();
    sub.await.unwrap().unwrap();
    match ended {
        Some(r) => r,
        None => round.await,
    }
    .unwrap()
    .unwrap();
    let groups: Vec<u32> = s
        .read_downlink("gw-a", 0, 10)
        .await
        .unwrap()
        .iter()
        .filter(|r| r.record.message.len() == 40)
        .map(|r| r.record.group)
        .collect();
    assert!(
        groups.contains(&NEW),
        "gw-a never got the new group's challenge: {groups:?}"
    );
}

/// A version 3 database (one outcome row per member) is migrated to
/// version 4: each slot's accepted rounds are filled from its accepted
/// outcomes, and the round reports still read the old rows.
async fn v3_outcomes_fill_accepted_rounds(f: Fixture) {
    // Rows of version 3 (x'..' is rewritten for PostgreSQL).
    const ROWS: &str = "INSERT INTO members (id, kv, key_source, status, added_at_ms) VALUES \
         (1, 1, 0, 0, 0), (2, 1, 0, 0, 0), (3, 1, 0, 0, 0);
         INSERT INTO member_groups (member, grp) VALUES (1, 7), (2, 7), (3, 7);
         INSERT INTO rounds (grp, round, opened_at_ms, mode, purpose, challenge, state, status) \
         VALUES (7, 5, 0, 1, 0, x'00', x'00', 0);
         INSERT INTO sessions (member, grp, last_auth_ms, sid, state, round, version) VALUES \
         (1, 7, 1, x'0101010101010101', x'AA', 7, 2), (2, 7, 1, NULL, NULL, 0, 1), \
         (3, 7, 1, x'0303030303030303', x'CC', 80, 2);
         INSERT INTO round_outcomes (grp, round, member, kind, reason, gateway, at_ms) VALUES \
         (7, 5, 1, 0, '', 'gw', 1), (7, 7, 1, 0, '', 'gw', 2), (7, 5, 2, 1, 'Revoked', 'gw', 1), \
         (7, 1, 3, 0, '', NULL, 1), (7, 80, 3, 0, '', NULL, 9);";
    f.at_version(3, ROWS).await;
    let s = f.open().await;
    let got = s.sessions(vec![(1, 7), (2, 7), (3, 7)]).await.unwrap();
    let rounds: Vec<AcceptedRounds> = got.iter().map(|x| x.as_ref().unwrap().rounds).collect();
    assert_eq!(
        rounds[0],
        AcceptedRounds {
            top: 7,
            seen: 0b101
        }
    );
    assert!(rounds[0].contains(5) && rounds[0].contains(7) && !rounds[0].contains(6));
    assert_eq!(rounds[1], AcceptedRounds::default());
    assert_eq!(rounds[2], AcceptedRounds { top: 80, seen: 1 });
    // Round 5's report reads the old rows: 1 accepted, 2 rejected, 3 missing.
    let rep = s.round_report(7, 5).await.unwrap().unwrap();
    assert_eq!(rep.accepted, 1);
    assert_eq!(rep.rejected, vec![("Revoked".to_owned(), 1)]);
    assert_eq!(rep.missing, 1);
    assert_eq!(s.round_missing(7, 5, None, 10).await.unwrap(), vec![3]);
}

/// A version 4 database's schedules (no read request) are migrated to
/// version 5 with an empty one: their read rounds keep sending what they
/// sent before, and they can still be claimed.
async fn v4_schedules_get_an_empty_read_request(f: Fixture) {
    const ROWS: &str = "INSERT INTO schedules (grp, every_ms, mode, purpose, next_at_ms) \
         VALUES (7, 60000, 1, 1, 100), (8, 3600000, 2, 0, 200);";
    f.at_version(4, ROWS).await;
    let s = f.open().await;
    let got = s.schedules().await.unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(
        (got[0].group, got[0].purpose, got[0].next_at_ms),
        (7, RoundPurpose::Read, 100)
    );
    assert!(got.iter().all(|r| r.read_request.is_empty()), "{got:?}");
    assert!(s.claim_schedule(got[0].id, 100, 60_100).await.unwrap());
}

// ---------------------------------------------------------------------------
// Builders
// ---------------------------------------------------------------------------

const G: u32 = 7;
const GW: &str = "gw-1.example";

fn member(id: u64, groups: &[u32]) -> MemberRow {
    MemberRow {
        id,
        groups: groups.to_vec(),
        key_source: KeySource::Derived,
        kv: 1,
        min_kv: 1,
        status: MemberStatus::Active,
        added_at_ms: 1_000,
    }
}

fn group_row(group: u32) -> GroupRow {
    GroupRow {
        group,
        epoch: 1,
        next_round: 1,
        seq: 0,
        config_hash: [0x11; 32],
        state: Sealed::new(vec![1, 2, 3]),
        version: 0,
    }
}

fn round_row(group: u32, round: u64) -> RoundRow {
    RoundRow {
        group,
        round,
        opened_at_ms: 5_000,
        closes_at_ms: Some(65_000),
        mode: Mode::Psk,
        purpose: RoundPurpose::Auth,
        challenge: vec![0xC4; 40],
        state: Sealed::new(vec![0xE5; 44]),
        status: RoundStatus::Open,
    }
}

fn sid(member: u64, n: u8) -> [u8; 8] {
    let mut s = member.to_be_bytes();
    s[0] = n;
    s
}

/// Slot `n` of a member, written over the stored slot of version
/// `version` (0: none stored), authenticated at 10,000 + n.
fn session(member: u64, n: u8, round: u64, version: u64) -> SessionRow {
    SessionRow {
        member,
        group: G,
        sid: Some(sid(member, n)),
        state: Sealed::new(vec![n; 60]),
        round,
        authenticated_at_ms: Some(10_000 + u64::from(n)),
        version,
        rounds: AcceptedRounds::default(),
        accepted_in: None,
        use_read: None,
    }
}

/// [`session`] accepting the member in `round`, written over `read` (its
/// stored slot as read, `None`: none stored).
fn accept(member: u64, n: u8, round: u64, read: Option<&StoredSlot>) -> SessionRow {
    SessionRow {
        rounds: read.map_or_else(AcceptedRounds::default, |r| r.rounds),
        accepted_in: Some(round),
        ..session(member, n, round, read.map_or(0, |r| r.version))
    }
}

fn accepted(member: u64, round: u64) -> OutcomeRow {
    OutcomeRow {
        group: G,
        round,
        member,
        kind: OutcomeKind::Accepted,
        reason: Cow::Borrowed(""),
        gateway: None,
    }
}

fn reading(member: u64, ctr: u64, ts_ms: u64) -> ReadingRow {
    ReadingRow {
        member,
        group: G,
        sid: sid(member, 1),
        ctr,
        ts_ms,
        kind: 1,
        payload: format!("m{member} c{ctr}").into_bytes(),
    }
}

/// Members 1..=n in group G, the group, and round 1 open.
async fn setup(s: &AnyStore, n: u64) {
    s.apply_batch(BatchWrite {
        members: (1..=n).map(|id| member(id, &[G])).collect(),
        ..BatchWrite::default()
    })
    .await
    .unwrap();
    s.insert_group(group_row(G)).await.unwrap();
    s.apply_batch(BatchWrite {
        new_rounds: vec![round_row(G, 1)],
        ..BatchWrite::default()
    })
    .await
    .unwrap();
}

/// A complete batch answering round 1 for members 1..=n through GW.
fn batch(batch_id: u64, hash: u8, n: u64) -> BatchWrite {
    BatchWrite {
        now_ms: 20_000,
        verdict: Some(VerdictWrite {
            gateway: GW.into(),
            batch_id,
            batch_hash: [hash; 32],
            verdict: vec![0x05, hash, 1, 2, 3],
            pending: None,
        }),
        via: Some(Via {
            gateway: GW.into(),
            batches: 1,
            entries: n,
            accepted: n,
            localizations: 0,
            unverified: 0,
        }),
        sessions: (1..=n).map(|m| session(m, 1, 1, 0)).collect(),
        outcomes: (1..=n).map(|m| accepted(m, 1)).collect(),
        readings: (1..=n).map(|m| reading(m, 1, 20_000)).collect(),
        downlink: vec![DownlinkPush {
            target: DownlinkTarget::Gateway(GW.into()),
            records: vec![DownlinkRecord {
                audience: Audience::Group,
                group: G,
                message: vec![0xAA, hash],
            }],
        }],
        ..BatchWrite::default()
    }
}

async fn count_readings(s: &AnyStore, members: u64) -> usize {
    let mut n = 0;
    for m in 1..=members {
        n += s.readings(m, 0, u64::MAX >> 1, 1000).await.unwrap().len();
    }
    n
}

// ---------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------

async fn migrations_idempotent_on_reopen(f: Fixture) {
    let s = f.open().await;
    s.upsert_member(member(42, &[G, 3])).await.unwrap();
    drop(s);
    // Reopen twice at once (two UDC processes starting together), then again.
    let (a, b) = tokio::join!(f.open(), f.open());
    drop((a, b));
    let s = f.open().await;
    let expected = match f.kind {
        Kind::Sqlite => vec![12],
        Kind::Postgres => vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
    };
    assert_eq!(f.schema_versions().await, expected);
    let got = s.members(vec![42]).await.unwrap();
    assert_eq!(got, vec![Some(member(42, &[3, G]))]);
}

async fn member_registry(f: Fixture) {
    let s = f.open().await;
    let big = (1u64 << 63) + 5;
    // The first and the last id in the store's (signed, bit-cast) order.
    let (first, last) = (1u64 << 63, (1u64 << 63) - 1);
    for id in [3, 1, 2, big, first, last] {
        s.upsert_member(member(id, &[G, G, 2])).await.unwrap();
    }
    // One query for a batch's ids, answered in order, unknown = None.
    let got = s.members(vec![2, 99, 1, 2]).await.unwrap();
    assert_eq!(got[0].as_ref().unwrap().id, 2);
    assert_eq!(got[0].as_ref().unwrap().groups, vec![2, G]);
    assert!(got[1].is_none());
    assert_eq!(got[2].as_ref().unwrap().id, 1);
    assert_eq!(got[3].as_ref().unwrap().id, 2);
    // Paging visits every id once (ids >= 2^63 first: signed order).
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = s.list_members(after, 2).await.unwrap();
        if page.is_empty() {
            break;
        }
        after = page.last().map(|m| m.id);
        seen.extend(page.iter().map(|m| m.id));
    }
    assert_eq!(seen, vec![first, big, 1, 2, 3, last]);
    assert!(s.list_members(Some(last), 2).await.unwrap().is_empty());
    // Status, kv, group changes.
    assert!(s.set_member_status(2, MemberStatus::Revoked).await.unwrap());
    assert!(
        !s.set_member_status(77, MemberStatus::Revoked)
            .await
            .unwrap()
    );
    let imported = KeySource::Imported(Sealed::new(vec![9; 44]));
    assert!(s.set_kv(3, 2, imported.clone()).await.unwrap());
    assert_eq!(
        s.group_members(G, None, 10).await.unwrap(),
        vec![first, big, 1, 3, last]
    );
    assert_eq!(
        s.group_members(G, Some(1), 10).await.unwrap(),
        vec![3, last]
    );
    assert!(s.group_members(G, Some(last), 10).await.unwrap().is_empty());
    let m3 = s.members(vec![3]).await.unwrap().pop().unwrap().unwrap();
    assert_eq!((m3.kv, m3.key_source), (2, imported));
    s.upsert_member(member(3, &[2])).await.unwrap();
    assert_eq!(
        s.group_members(G, None, 10).await.unwrap(),
        vec![first, big, 1, last]
    );
}

async fn apply_batch_is_atomic(f: Fixture) {
    let s = f.open().await;
    setup(&s, 3).await;
    let mut bad = batch(1, 0xB1, 3);
    // Localizations counted for a round that does not exist fail late in
    // the transaction, after the verdict, sessions, readings and group
    // update were written.
    bad.round_localizations = vec![RoundLocalizations {
        group: G,
        round: 99,
        chunks: 1,
    }];
    bad.groups = vec![GroupRow {
        version: 1,
        epoch: 2,
        ..group_row(G)
    }];
    bad.acks = vec![AckRow {
        group: G,
        seq: 1,
        member: 1,
        at_ms: 1,
    }];
    assert!(s.apply_batch(bad).await.is_err());
    // Nothing of it is visible.
    assert_eq!(s.verdict(GW, 1).await.unwrap(), None);
    assert_eq!(
        s.sessions(vec![(1, G), (2, G), (3, G)]).await.unwrap(),
        vec![None, None, None]
    );
    assert_eq!(count_readings(&s, 3).await, 0);
    assert!(s.round_outcomes(G, 1, None, 100).await.unwrap().is_empty());
    assert!(s.gateways().await.unwrap().is_empty());
    assert_eq!(s.latest_cursor(GW).await.unwrap(), 0);
    assert!(s.read_downlink(GW, 0, 10).await.unwrap().is_empty());
    assert_eq!(s.acks(G, 1, None, 10).await.unwrap().total, 0);
    let g = s.group(G).await.unwrap().unwrap();
    assert_eq!((g.epoch, g.version), (1, 1));
    // The same batch without the fault applies whole.
    s.apply_batch(batch(1, 0xB1, 3)).await.unwrap();
    assert!(s.verdict(GW, 1).await.unwrap().unwrap().is_final);
    assert_eq!(count_readings(&s, 3).await, 3);
    assert_eq!(s.round_outcomes(G, 1, None, 100).await.unwrap().len(), 3);
    assert_eq!(s.latest_cursor(GW).await.unwrap(), 1);
}

async fn retried_batch_changes_nothing(f: Fixture) {
    let s = f.open().await;
    setup(&s, 4).await;
    let applied = s.apply_batch(batch(9, 0x99, 4)).await.unwrap();
    assert_eq!(applied.downlink_heads, vec![(GW.to_owned(), 1)]);
    let stored = s.verdict(GW, 9).await.unwrap().unwrap();
    assert_eq!(stored.verdict, vec![0x05, 0x99, 1, 2, 3]);
    // The identical retry: typed error carrying the stored hash.
    match s.apply_batch(batch(9, 0x99, 4)).await {
        Err(StoreError::VerdictExists {
            batch_hash,
            is_final,
        }) => assert_eq!((batch_hash, is_final), ([0x99; 32], true)),
        other => panic!("expected VerdictExists, got {other:?}"),
    }
    // A different batch under the used id: the stored hash says "not yours".
    match s.apply_batch(batch(9, 0x42, 4)).await {
        Err(StoreError::VerdictExists { batch_hash, .. }) => assert_eq!(batch_hash, [0x99; 32]),
        other => panic!("expected VerdictExists, got {other:?}"),
    }
    // No double rows or counts.
    assert_eq!(s.verdict(GW, 9).await.unwrap().unwrap(), stored);
    assert_eq!(count_readings(&s, 4).await, 4);
    assert_eq!(s.read_downlink(GW, 0, 10).await.unwrap().len(), 1);
    let gws = s.gateways().await.unwrap();
    assert_eq!((gws.len(), gws[0].batches, gws[0].entries), (1, 1, 4));
    let rep = s.round_report(G, 1).await.unwrap().unwrap();
    assert_eq!((rep.accepted, rep.missing), (4, 0));
    let pair = s
        .sessions(vec![(1, G)])
        .await
        .unwrap()
        .pop()
        .unwrap()
        .unwrap();
    assert_eq!(pair.version, 1, "a retry must not rewrite sessions");
}

/// GW's batch 5 answered with a tag request whose localization expires at
/// `expires_at_ms`.
fn tags_requested(expires_at_ms: u64) -> VerdictWrite {
    VerdictWrite {
        gateway: GW.into(),
        batch_id: 5,
        batch_hash: [0x55; 32],
        verdict: vec![0x05, 2, 0, 0, 0, 1],
        pending: Some(PendingWrite {
            pending: Sealed::new(vec![0xDD; 100]),
            expires_at_ms,
        }),
    }
}

async fn localization_pending_then_final(f: Fixture) {
    let s = f.open().await;
    setup(&s, 2).await;
    let pending = tags_requested(30_000);
    s.apply_batch(BatchWrite {
        now_ms: 20_000,
        verdict: Some(pending.clone()),
        via: Some(Via {
            gateway: GW.into(),
            localizations: 1,
            ..Via::default()
        }),
        round_localizations: vec![RoundLocalizations {
            group: G,
            round: 1,
            chunks: 1,
        }],
        ..BatchWrite::default()
    })
    .await
    .unwrap();
    let v = s.verdict(GW, 5).await.unwrap().unwrap();
    assert!(!v.is_final);
    let p = s.pending_localization(GW, 5).await.unwrap().unwrap();
    assert_eq!(
        (p.batch_hash, p.pending.as_bytes(), p.expires_at_ms),
        ([0x55; 32], &[0xDD; 100][..], 30_000)
    );
    assert!(
        s.expired_localizations(29_999, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(s.expired_localizations(30_000, 10).await.unwrap(), vec![p]);
    // A retried batch while pending gets the tags-requested verdict back.
    match s
        .apply_batch(BatchWrite {
            verdict: Some(pending.clone()),
            ..BatchWrite::default()
        })
        .await
    {
        Err(StoreError::VerdictExists { is_final, .. }) => assert!(!is_final),
        other => panic!("expected VerdictExists, got {other:?}"),
    }
    // A final verdict for another hash cannot replace it...
    let mut wrong = batch(5, 0x56, 2);
    wrong.verdict.as_mut().unwrap().batch_hash = [0x56; 32];
    assert!(matches!(
        s.apply_batch(wrong).await,
        Err(StoreError::VerdictExists { .. })
    ));
    // ...the final verdict of the same batch does, and the pending row goes.
    let mut fin = batch(5, 0x55, 2);
    fin.verdict.as_mut().unwrap().verdict = vec![0x05, 1, 7, 7];
    s.apply_batch(fin).await.unwrap();
    let v = s.verdict(GW, 5).await.unwrap().unwrap();
    assert_eq!((v.is_final, v.verdict), (true, vec![0x05, 1, 7, 7]));
    assert_eq!(s.pending_localization(GW, 5).await.unwrap(), None);
    assert!(
        s.expired_localizations(u64::MAX >> 1, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let rep = s.round_report(G, 1).await.unwrap().unwrap();
    assert_eq!((rep.localizations, rep.accepted), (1, 2));
    let gw = &s.gateways().await.unwrap()[0];
    assert_eq!((gw.localizations, gw.batches), (1, 1));
}

/// `due_work` answers the background pass's three questions in one read
/// (SQLite: one transaction): whether a localization expired, which
/// schedules are due, which rounds are open; and it agrees with the three
/// reads it stands for.
async fn due_work_is_what_the_background_pass_needs(f: Fixture) {
    let s = f.open().await;
    setup(&s, 2).await;
    let empty = s.due_work(40_000).await.unwrap();
    assert!(!empty.localizations);
    assert!(empty.schedules.is_empty());
    assert_eq!(empty.open_rounds, s.open_rounds().await.unwrap());
    assert_eq!(empty.open_rounds.len(), 1);
    s.apply_batch(BatchWrite {
        now_ms: 20_000,
        verdict: Some(tags_requested(30_000)),
        closed_rounds: vec![(G, 1)],
        new_rounds: vec![round_row(G, 2), round_row(G + 1, 1)],
        ..BatchWrite::default()
    })
    .await
    .unwrap();
    let mut ids = Vec::new();
    for (group, next_at_ms) in [(G, 30_000), (G + 1, 30_001), (G + 2, 10)] {
        ids.push(
            s.insert_schedule(ScheduleRow {
                id: 0,
                group,
                every_ms: 60_000,
                mode: Mode::Psk,
                purpose: RoundPurpose::Auth,
                read_request: Vec::new(),
                next_at_ms,
            })
            .await
            .unwrap(),
        );
    }
    let before = s.due_work(29_999).await.unwrap();
    assert!(!before.localizations, "expires at 30,000");
    assert_eq!(
        before.schedules.iter().map(|r| r.id).collect::<Vec<_>>(),
        [ids[2]]
    );
    let due = s.due_work(30_000).await.unwrap();
    assert!(due.localizations);
    assert_eq!(
        due.schedules.iter().map(|r| r.id).collect::<Vec<_>>(),
        [ids[0], ids[2]],
        "due at or before now, by id"
    );
    assert_eq!(due.schedules[0], s.schedules().await.unwrap()[0]);
    let open: Vec<(u32, u64)> = due.open_rounds.iter().map(|r| (r.group, r.round)).collect();
    assert_eq!(open, [(G, 2), (G + 1, 1)], "the closed round is not listed");
    assert_eq!(due.open_rounds, s.open_rounds().await.unwrap());
}

async fn group_optimistic_concurrency(f: Fixture) {
    let s = f.open().await;
    s.insert_group(group_row(G)).await.unwrap();
    assert!(matches!(
        s.insert_group(group_row(G)).await,
        Err(StoreError::Conflict(_))
    ));
    let read_a = s.group(G).await.unwrap().unwrap();
    let read_b = read_a.clone();
    assert_eq!(read_a.version, 1);
    // Process A writes first.
    let v = s
        .update_group(GroupRow {
            epoch: 2,
            state: Sealed::new(vec![0xA]),
            ..read_a
        })
        .await
        .unwrap();
    assert_eq!(v, 2);
    // Process B's write from the same read is refused, and its batch with it.
    let err = s
        .apply_batch(BatchWrite {
            groups: vec![GroupRow {
                epoch: 3,
                ..read_b.clone()
            }],
            new_rounds: vec![round_row(G, 1)],
            ..BatchWrite::default()
        })
        .await;
    assert!(matches!(err, Err(StoreError::Conflict(_))), "{err:?}");
    assert_eq!(s.round(G, 1).await.unwrap(), None);
    let now = s.group(G).await.unwrap().unwrap();
    assert_eq!(
        (now.epoch, now.version, &now.state),
        (2, 2, &Sealed::new(vec![0xA]))
    );
    // Reload and retry works.
    assert_eq!(
        s.update_group(GroupRow { epoch: 3, ..now }).await.unwrap(),
        3
    );
    assert_eq!(s.list_groups().await.unwrap().len(), 1);
}

/// A batch judged at the group's epoch 1 is refused whole once another
/// writer moved the group to epoch 2 (a revocation), also for a group that
/// does not exist; judged at epoch 2 it applies.
async fn batch_checks_group_epoch(f: Fixture) {
    let s = f.open().await;
    setup(&s, 2).await;
    let read = s.group(G).await.unwrap().unwrap();
    assert_eq!(read.epoch, 1);
    // Unchanged epoch: applies (an unrelated group update does not matter).
    s.update_group(GroupRow {
        next_round: 2,
        ..read.clone()
    })
    .await
    .unwrap();
    let mut ok = batch(1, 0xB1, 1);
    ok.group_epochs = vec![(G, 1)];
    s.apply_batch(ok).await.unwrap();
    // Another process revokes: new epoch.
    let now = s.group(G).await.unwrap().unwrap();
    s.update_group(GroupRow { epoch: 2, ..now }).await.unwrap();
    let mut stale = batch(2, 0xB2, 2);
    stale.sessions = vec![session(2, 1, 1, 0)];
    stale.outcomes = vec![accepted(2, 1)];
    stale.readings = vec![reading(2, 1, 20_000)];
    stale.group_epochs = vec![(G, 1)];
    let err = s.apply_batch(stale.clone()).await;
    assert!(matches!(err, Err(StoreError::Conflict(_))), "{err:?}");
    assert_eq!(s.verdict(GW, 2).await.unwrap(), None);
    assert_eq!(s.sessions(vec![(2, G)]).await.unwrap(), vec![None]);
    assert_eq!(count_readings(&s, 2).await, 1);
    let mut missing = stale.clone();
    missing.group_epochs = vec![(G + 1, 1)];
    assert!(matches!(
        s.apply_batch(missing).await,
        Err(StoreError::Conflict(_))
    ));
    stale.group_epochs = vec![(G, 2)];
    s.apply_batch(stale).await.unwrap();
    assert!(s.sessions(vec![(2, G)]).await.unwrap()[0].is_some());
}

/// Member 1's stored slot in G.
async fn slot1(s: &AnyStore) -> Option<StoredSlot> {
    s.sessions(vec![(1, G)]).await.unwrap().pop().unwrap()
}

async fn session_slots_are_compare_and_set(f: Fixture) {
    let s = f.open().await;
    setup(&s, 2).await;
    let write = |rows: Vec<SessionRow>| BatchWrite {
        sessions: rows,
        ..BatchWrite::default()
    };
    assert_eq!(s.count_sessions().await.unwrap(), 0);
    s.apply_batch(write(vec![session(1, 1, 1, 0), session(2, 1, 1, 0)]))
        .await
        .unwrap();
    let p = slot1(&s).await.unwrap();
    assert_eq!(p.sid, Some(sid(1, 1)));
    assert_eq!(p.state, Some(Sealed::new(vec![1; 60])));
    assert_eq!((p.round, p.version, p.last_auth_ms), (1, 1, 10_001));
    assert_eq!(s.count_sessions().await.unwrap(), 2);
    // A second insert of a new slot (another process got there first) and
    // a write over a stale version both fail, with the rest of the write.
    for stale in [session(1, 2, 2, 0), session(1, 2, 2, 7)] {
        let r = s
            .apply_batch(BatchWrite {
                sessions: vec![stale],
                readings: vec![reading(1, 5, 5)],
                ..BatchWrite::default()
            })
            .await;
        assert!(matches!(r, Err(StoreError::Conflict(_))), "{r:?}");
    }
    assert_eq!(count_readings(&s, 1).await, 0);
    // A write at the version read replaces the slot and bumps the version;
    // without an authentication time the last-auth time stays.
    s.apply_batch(write(vec![SessionRow {
        authenticated_at_ms: None,
        ..session(1, 2, 2, 1)
    }]))
    .await
    .unwrap();
    let p = slot1(&s).await.unwrap();
    assert_eq!(p.sid, Some(sid(1, 2)));
    assert_eq!(p.state, Some(Sealed::new(vec![2; 60])));
    assert_eq!((p.round, p.version, p.last_auth_ms), (2, 2, 10_001));
    // The same version cannot be used twice (lost update).
    let r = s.apply_batch(write(vec![session(1, 3, 3, 1)])).await;
    assert!(matches!(r, Err(StoreError::Conflict(_))), "{r:?}");
    // An empty slot (revocation) stores no state.
    s.apply_batch(write(vec![SessionRow {
        sid: None,
        ..session(1, 3, 3, 2)
    }]))
    .await
    .unwrap();
    let p = slot1(&s).await.unwrap();
    assert!(p.sid.is_none() && p.state.is_none());
    assert_eq!(s.count_sessions().await.unwrap(), 1);
    // Batch read: order kept, unknown = None, duplicates answered twice.
    let got = s
        .sessions(vec![(2, G), (9, G), (1, G), (2, G)])
        .await
        .unwrap();
    assert_eq!(got[0].as_ref().unwrap().member, 2);
    assert!(got[1].is_none());
    assert_eq!(got[2].as_ref().unwrap().version, 3);
    assert_eq!(got[3], got[0]);
    // A run of members' sessions, by member, in one read.
    let run = s.member_sessions(1, 2).await.unwrap();
    let run: Vec<(u64, u32, u64)> = run.iter().map(|p| (p.member, p.group, p.version)).collect();
    assert_eq!(run, vec![(1, G, 3), (2, G, 1)]);
    assert_eq!(s.member_sessions(2, 2).await.unwrap().len(), 1);
    assert!(s.member_sessions(3, 9).await.unwrap().is_empty());
    // Recovery drops every session but keeps the last-auth time, and a
    // writer that read before the drop loses.
    assert_eq!(s.drop_all_sessions().await.unwrap(), 1);
    let p = s
        .sessions(vec![(2, G)])
        .await
        .unwrap()
        .pop()
        .unwrap()
        .unwrap();
    assert!(p.sid.is_none() && p.state.is_none());
    assert_eq!((p.last_auth_ms, p.version), (10_001, 2));
    let r = s.apply_batch(write(vec![session(2, 2, 2, 1)])).await;
    assert!(matches!(r, Err(StoreError::Conflict(_))), "{r:?}");
    assert_eq!(s.count_sessions().await.unwrap(), 0);
    // Persisted across a reopen.
    drop(s);
    let s = f.open().await;
    let p = slot1(&s).await.unwrap();
    assert_eq!(p.version, 3);
}

/// Session uses (schema version 12): a use applies to the slot version it
/// was written against and is compare-and-set on the use read; a slot
/// write must have folded in the use stored for the version it read; once
/// the version moves the use is stale (read as none, replaced by the next
/// first use); a use against a version that moved fails with the rest of
/// its write; dropping all sessions drops the uses.
async fn session_uses_are_compare_and_set(f: Fixture) {
    let s = f.open().await;
    setup(&s, 2).await;
    s.apply_batch(BatchWrite {
        sessions: vec![session(1, 1, 1, 0), session(2, 1, 1, 0)],
        ..BatchWrite::default()
    })
    .await
    .unwrap();
    let used = |n: u8, top: u64| SlotUse {
        sid: sid(1, n),
        top,
        seen: 1,
    };
    let put = |base: u64, read: Option<SlotUse>, new: SlotUse| BatchWrite {
        slot_uses: vec![UseWrite {
            member: 1,
            group: G,
            base,
            read,
            new,
        }],
        readings: vec![reading(1, new.top, new.top)],
        ..BatchWrite::default()
    };
    let conflict = |r: Result<Applied, StoreError>| {
        assert!(matches!(r, Err(StoreError::Conflict(_))), "{r:?}");
    };
    assert_eq!(slot1(&s).await.unwrap().used, None);
    // The first use of version 1; the slot itself does not change.
    s.apply_batch(put(1, None, used(1, 5))).await.unwrap();
    let p = slot1(&s).await.unwrap();
    assert_eq!((p.version, p.used), (1, Some(used(1, 5))));
    assert_eq!(p.state, Some(Sealed::new(vec![1; 60])));
    // Read by every slot read, listings included; not by another member's.
    let listed = s.member_sessions(1, 2).await.unwrap();
    assert_eq!(listed[0].used, Some(used(1, 5)));
    assert_eq!(listed[1].used, None);
    let reads = s.batch_reads(G, vec![1, 2], None, None).await.unwrap();
    assert_eq!(reads.sessions[0].as_ref().unwrap().used, Some(used(1, 5)));
    assert_eq!(reads.sessions[1].as_ref().unwrap().used, None);
    // Judged on no use (another process stored one since), or on an older
    // one, or against a version that is not the slot's: nothing written.
    conflict(s.apply_batch(put(1, None, used(1, 6))).await);
    conflict(s.apply_batch(put(1, Some(used(1, 4)), used(1, 6))).await);
    conflict(s.apply_batch(put(2, None, used(1, 6))).await);
    conflict(s.apply_batch(put(0, None, used(1, 6))).await);
    assert_eq!(count_readings(&s, 1).await, 1);
    // Judged on the stored one: replaced.
    s.apply_batch(put(1, Some(used(1, 5)), used(1, 6)))
        .await
        .unwrap();
    assert_eq!(slot1(&s).await.unwrap().used, Some(used(1, 6)));
    // A slot write that did not fold the stored use in (read before it was
    // stored, or read with an older one) loses, with the rest of its write.
    for stale in [None, Some(used(1, 5))] {
        let r = s
            .apply_batch(BatchWrite {
                sessions: vec![SessionRow {
                    use_read: stale,
                    ..session(1, 2, 2, 1)
                }],
                readings: vec![reading(1, 9, 9)],
                ..BatchWrite::default()
            })
            .await;
        conflict(r);
    }
    assert_eq!(count_readings(&s, 1).await, 2);
    assert_eq!(slot1(&s).await.unwrap().version, 1);
    // One that folded it in stands; the use is then stale (version 1 is
    // gone), read as none, and the next first use replaces it.
    s.apply_batch(BatchWrite {
        sessions: vec![SessionRow {
            use_read: Some(used(1, 6)),
            ..session(1, 2, 2, 1)
        }],
        ..BatchWrite::default()
    })
    .await
    .unwrap();
    let p = slot1(&s).await.unwrap();
    assert_eq!((p.version, p.used), (2, None));
    conflict(s.apply_batch(put(1, Some(used(1, 6)), used(1, 7))).await);
    s.apply_batch(put(2, None, used(2, 1))).await.unwrap();
    assert_eq!(slot1(&s).await.unwrap().used, Some(used(2, 1)));
    // Persisted across a reopen; dropped with every session.
    drop(s);
    let s = f.open().await;
    assert_eq!(slot1(&s).await.unwrap().used, Some(used(2, 1)));
    s.drop_all_sessions().await.unwrap();
    let p = slot1(&s).await.unwrap();
    assert_eq!((p.version, p.used), (3, None));
    s.apply_batch(put(3, None, used(2, 2))).await.unwrap();
    assert_eq!(slot1(&s).await.unwrap().used, Some(used(2, 2)));
}

/// More first uses than one statement carries (the SQLite store inserts
/// them 64 to a statement, the rest one by one): each lands with its own
/// values, and one whose slot version moved, wherever it sits, fails the
/// whole write; so does a write breaking the rules of `slot_uses`.
async fn many_first_uses_stand_or_fall_together(f: Fixture) {
    const N: u64 = 150;
    let s = f.open().await;
    setup(&s, N).await;
    s.apply_batch(BatchWrite {
        sessions: (1..=N).map(|m| session(m, 1, 1, 0)).collect(),
        ..BatchWrite::default()
    })
    .await
    .unwrap();
    let uses = |bad: Option<u64>| BatchWrite {
        slot_uses: (1..=N)
            .map(|m| UseWrite {
                member: m,
                group: G,
                base: if Some(m) == bad { 2 } else { 1 },
                read: None,
                new: SlotUse {
                    sid: sid(m, 1),
                    top: m,
                    seen: 1,
                },
            })
            .collect(),
        ..BatchWrite::default()
    };
    for bad in [1, 64, 129, N] {
        let r = s.apply_batch(uses(Some(bad))).await;
        assert!(matches!(r, Err(StoreError::Conflict(_))), "{bad}: {r:?}");
    }
    // A use for a slot the same write rewrites, or a second use of one
    // slot, is refused whole, by both stores alike.
    let mut twice = uses(None);
    twice.slot_uses.push(twice.slot_uses[0]);
    let mut rewritten = uses(None);
    rewritten.sessions = vec![session(N, 2, 2, 1)];
    for w in [twice, rewritten] {
        let r = s.apply_batch(w).await;
        assert!(matches!(r, Err(StoreError::InvalidWrite(_))), "{r:?}");
    }
    let none = s.sessions((1..=N).map(|m| (m, G)).collect()).await.unwrap();
    assert!(none.iter().all(|p| p.as_ref().unwrap().used.is_none()));
    s.apply_batch(uses(None)).await.unwrap();
    let all = s.sessions((1..=N).map(|m| (m, G)).collect()).await.unwrap();
    for (m, p) in (1..=N).zip(all) {
        let used = p.unwrap().used.unwrap();
        assert_eq!((used.sid, used.top), (sid(m, 1), m));
    }
}

/// A write of more slots and readings than one statement carries (the
/// SQLite store inserts them 64 to a statement, the remainder one by one):
/// every row lands with its own values, and one bad row anywhere (a slot
/// inserted meanwhile, a stale version, a duplicate reading) fails the whole
/// write.
async fn many_rows_in_one_write_stand_or_fall_together(f: Fixture) {
    const N: u64 = 64 * 2 + 5;
    let s = f.open().await;
    setup(&s, N).await;
    let n_of = |m: u64| (m % 250) as u8 + 1;
    let slots = |version: u64, round: u64| -> Vec<SessionRow> {
        (1..=N)
            .map(|m| session(m, n_of(m), round + m, version))
            .collect()
    };
    let readings =
        |ctr: u64| -> Vec<ReadingRow> { (1..=N).map(|m| reading(m, ctr, 1000 + m)).collect() };
    let check = |got: Vec<Option<StoredSlot>>, version: u64, round: u64| {
        assert_eq!(got.len() as u64, N);
        for (m, p) in (1..=N).zip(got) {
            let p = p.unwrap_or_else(|| panic!("member {m}: no slot"));
            assert_eq!(p.member, m);
            assert_eq!(p.sid, Some(sid(m, n_of(m))), "member {m}");
            assert_eq!(p.state, Some(Sealed::new(vec![n_of(m); 60])), "member {m}");
            assert_eq!((p.round, p.version), (round + m, version), "member {m}");
            assert_eq!(p.last_auth_ms, 10_000 + u64::from(n_of(m)), "member {m}");
        }
    };
    let keys: Vec<(u64, u32)> = (1..=N).map(|m| (m, G)).collect();

    // One member's slot was inserted meanwhile (in the second full chunk):
    // nothing of the write lands.
    s.apply_batch(BatchWrite {
        sessions: vec![session(100, 9, 9, 0)],
        ..BatchWrite::default()
    })
    .await
    .unwrap();
    let r = s
        .apply_batch(BatchWrite {
            sessions: slots(0, 0),
            readings: readings(1),
            ..BatchWrite::default()
        })
        .await;
    assert!(matches!(r, Err(StoreError::Conflict(_))), "{r:?}");
    assert_eq!(count_readings(&s, N).await, 0);
    assert_eq!(s.count_sessions().await.unwrap(), 1);
    s.drop_all_sessions().await.unwrap();

    // Without the conflict: every slot and reading, each with its values.
    let mut first = slots(0, 0);
    first[99].version = 2; // member 100's row was written twice above
    s.apply_batch(BatchWrite {
        sessions: first,
        readings: readings(1),
        ..BatchWrite::default()
    })
    .await
    .unwrap();
    let mut got = s.sessions(keys.clone()).await.unwrap();
    assert_eq!(got[99].as_ref().map(|p| p.version), Some(3));
    got[99].as_mut().unwrap().version = 1;
    check(got, 1, 0);
    for m in 1..=N {
        let r = s.readings(m, 0, u64::MAX >> 1, 10).await.unwrap();
        assert_eq!(r, vec![reading(m, 1, 1000 + m)], "member {m}");
    }

    // A duplicate reading key in the middle of a full chunk (PostgreSQL
    // keeps the key unique; SQLite's readings are in arrival order since
    // migration 8, the replay window alone refusing a repeated counter), or
    // one stale slot version among the updates, fails the whole write.
    let mut dup = readings(2);
    dup[70] = reading(71, 1, 5);
    let mut stale = slots(1, 10);
    stale[99].version = 1; // stored: 3
    let mut failing = vec![BatchWrite {
        sessions: stale,
        readings: readings(2),
        ..BatchWrite::default()
    }];
    if f.kind == Kind::Postgres {
        failing.push(BatchWrite {
            sessions: {
                let mut v = slots(1, 10);
                v[99].version = 3;
                v
            },
            readings: dup,
            ..BatchWrite::default()
        });
    }
    for w in failing {
        let r = s.apply_batch(w).await;
        assert!(r.is_err(), "{r:?}");
        assert_eq!(count_readings(&s, N).await, N as usize);
        let mut got = s.sessions(keys.clone()).await.unwrap();
        got[99].as_mut().unwrap().version = 1;
        check(got, 1, 0);
    }

    // Updates of every slot at the version read.
    let mut next = slots(1, 10);
    next[99].version = 3;
    s.apply_batch(BatchWrite {
        sessions: next,
        readings: readings(2),
        ..BatchWrite::default()
    })
    .await
    .unwrap();
    let mut got = s.sessions(keys).await.unwrap();
    assert_eq!(got[99].as_ref().map(|p| p.version), Some(4));
    got[99].as_mut().unwrap().version = 2;
    check(got, 2, 10);
    assert_eq!(count_readings(&s, N).await, 2 * N as usize);
}

async fn retention_trims_readings_and_final_verdicts(f: Fixture) {
    let s = f.open().await;
    setup(&s, 2).await;
    // Batch 1 (final, filed at 20,000) with readings at 20,000; a pending
    // verdict filed at 1,000; later readings.
    s.apply_batch(batch(1, 0x11, 2)).await.unwrap();
    s.apply_batch(BatchWrite {
        now_ms: 1_000,
        verdict: Some(VerdictWrite {
            gateway: GW.into(),
            batch_id: 2,
            batch_hash: [0x22; 32],
            verdict: vec![5],
            pending: Some(PendingWrite {
                pending: Sealed::new(vec![1]),
                expires_at_ms: u64::MAX >> 1,
            }),
        }),
        readings: vec![reading(1, 7, 30_000), reading(2, 7, 40_000)],
        ..BatchWrite::default()
    })
    .await
    .unwrap();
    assert_eq!(s.trim_readings(20_000).await.unwrap(), 0, "strictly before");
    assert_eq!(s.trim_readings(35_000).await.unwrap(), 3);
    assert_eq!(count_readings(&s, 2).await, 1);
    assert_eq!(s.trim_verdicts(20_000).await.unwrap(), 0);
    assert_eq!(
        s.trim_verdicts(u64::MAX).await.unwrap(),
        1,
        "only the final one"
    );
    assert!(s.verdict(GW, 1).await.unwrap().is_none());
    assert!(s.verdict(GW, 2).await.unwrap().is_some());
    assert!(s.pending_localization(GW, 2).await.unwrap().is_some());
}

/// A gateway subscribing to a group gets, in the same transaction, the
/// challenge of every open round of that group not past its close time
/// (round order); a group it already subscribed to queues nothing again.
async fn subscribing_queues_open_rounds_challenges(f: Fixture) {
    let s = f.open().await;
    s.insert_group(group_row(G)).await.unwrap();
    let ch = |round: u64, tag: u8, closes: Option<u64>| RoundRow {
        challenge: vec![tag; 40],
        closes_at_ms: closes,
        ..round_row(G, round)
    };
    s.apply_batch(BatchWrite {
        new_rounds: vec![
            ch(1, 1, Some(65_000)),
            ch(2, 2, Some(65_000)),
            ch(3, 3, None),
            ch(4, 4, Some(9_000)),
        ],
        ..BatchWrite::default()
    })
    .await
    .unwrap();
    s.apply_batch(BatchWrite {
        closed_rounds: vec![(G, 1)],
        ..BatchWrite::default()
    })
    .await
    .unwrap();
    // Round 1 closed, round 4 past its close time at 10_000.
    assert_eq!(
        s.set_subscriptions("gw-a", vec![G], 10_000).await.unwrap(),
        2
    );
    let a = s.read_downlink("gw-a", 0, 10).await.unwrap();
    let got: Vec<(u64, u8, Audience, u32)> = a
        .iter()
        .map(|r| {
            (
                r.cursor,
                r.record.message[0],
                r.record.audience,
                r.record.group,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![(1, 2, Audience::Group, G), (2, 3, Audience::Group, G)]
    );
    // Already subscribed: nothing new; another group: nothing open there.
    assert_eq!(
        s.set_subscriptions("gw-a", vec![G, G + 1], 10_000)
            .await
            .unwrap(),
        0
    );
    assert_eq!(s.latest_cursor("gw-a").await.unwrap(), 2);
}

/// A downlink read stops adding records once their messages hold
/// `DOWNLINK_PAGE_BYTES` (the first record always goes): what piled up for
/// a gateway that was away (here 80 group messages at the 64 KiB cap, 40 in
/// rows of their own and 40 in one bundle) comes in answers a gateway takes
/// in one body, and the next read goes on after the last cursor.
async fn downlink_reads_are_cut_by_bytes(f: Fixture) {
    let s = f.open().await;
    s.set_subscriptions("gw-a", vec![1], 0).await.unwrap();
    let big = |tag: u8| DownlinkRecord {
        audience: Audience::Group,
        group: 1,
        message: vec![tag; 64 * 1024],
    };
    for tag in 0..40u8 {
        s.push_downlink(
            1_000,
            vec![DownlinkPush {
                target: DownlinkTarget::Subscribers,
                records: vec![big(tag)],
            }],
        )
        .await
        .unwrap();
    }
    s.push_downlink(
        1_000,
        vec![DownlinkPush {
            target: DownlinkTarget::Subscribers,
            records: (40..80u8).map(big).collect(),
        }],
    )
    .await
    .unwrap();
    let (mut after, mut seen, mut pages) = (0, Vec::new(), 0);
    loop {
        let page = s.read_downlink("gw-a", after, 1024).await.unwrap();
        let Some(last) = page.last() else { break };
        pages += 1;
        let before_last: usize = page[..page.len() - 1]
            .iter()
            .map(|r| r.record.message.len())
            .sum();
        assert!(
            before_last < DOWNLINK_PAGE_BYTES,
            "{} records, {before_last} bytes before the last",
            page.len()
        );
        after = last.cursor;
        seen.extend(page.iter().map(|r| r.record.message[0]));
    }
    assert_eq!(seen, (0..80u8).collect::<Vec<_>>());
    assert_eq!(pages, 2, "5 MiB in pages of 4 MiB");
}

async fn downlink_cursors_and_fanout(f: Fixture) {
    let s = f.open().await;
    s.set_subscriptions("gw-a", vec![2, 1, 2], 0).await.unwrap();
    s.set_subscriptions("gw-b", vec![2], 0).await.unwrap();
    assert_eq!(s.subscriptions("gw-a").await.unwrap(), vec![1, 2]);
    let rec = |group: u32, tag: u8, audience: Audience| DownlinkRecord {
        audience,
        group,
        message: vec![tag; 3],
    };
    let applied = s
        .push_downlink(
            1_000,
            vec![
                DownlinkPush {
                    target: DownlinkTarget::Subscribers,
                    records: vec![
                        rec(1, 1, Audience::Group),
                        rec(2, 2, Audience::Member(77)),
                        rec(1, 3, Audience::Group),
                    ],
                },
                DownlinkPush {
                    target: DownlinkTarget::Gateway("gw-c".into()),
                    records: vec![rec(9, 4, Audience::Member(5))],
                },
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        applied.downlink_heads,
        vec![("gw-a".into(), 3), ("gw-b".into(), 1), ("gw-c".into(), 1)]
    );
    let a = s.read_downlink("gw-a", 0, 10).await.unwrap();
    let cursors: Vec<u64> = a.iter().map(|r| r.cursor).collect();
    let tags: Vec<u8> = a.iter().map(|r| r.record.message[0]).collect();
    assert_eq!((cursors, tags), (vec![1, 2, 3], vec![1, 2, 3]));
    assert_eq!(a[1].record, rec(2, 2, Audience::Member(77)));
    let b = s.read_downlink("gw-b", 0, 10).await.unwrap();
    assert_eq!(b.len(), 1);
    assert_eq!(
        (b[0].cursor, &b[0].record),
        (1, &rec(2, 2, Audience::Member(77)))
    );
    // More records continue the cursors; `after` and `limit` page.
    s.set_subscriptions("gw-a", vec![2], 0).await.unwrap();
    s.push_downlink(
        2_000,
        vec![DownlinkPush {
            target: DownlinkTarget::Subscribers,
            records: vec![rec(1, 5, Audience::Group), rec(2, 6, Audience::Group)],
        }],
    )
    .await
    .unwrap();
    let a = s.read_downlink("gw-a", 3, 10).await.unwrap();
    assert_eq!(a.len(), 1, "gw-a no longer subscribes to group 1");
    assert_eq!((a[0].cursor, a[0].record.message[0]), (4, 6));
    let page = s.read_downlink("gw-a", 1, 2).await.unwrap();
    assert_eq!(
        page.iter().map(|r| r.cursor).collect::<Vec<_>>(),
        vec![2, 3]
    );
    assert_eq!(s.latest_cursor("gw-a").await.unwrap(), 4);
    assert_eq!(s.latest_cursor("gw-b").await.unwrap(), 2);
    assert_eq!(s.latest_cursor("nobody").await.unwrap(), 0);
    // Retention: trimming old records never reuses a cursor.
    assert_eq!(s.trim_downlink(1_500).await.unwrap(), 5);
    assert_eq!(s.read_downlink("gw-a", 0, 10).await.unwrap()[0].cursor, 4);
}

async fn readings_query(f: Fixture) {
    let s = f.open().await;
    setup(&s, 2).await;
    s.apply_batch(BatchWrite {
        readings: vec![
            reading(1, 1, 100),
            reading(1, 2, 200),
            reading(1, 3, 300),
            reading(2, 1, 200),
        ],
        ..BatchWrite::default()
    })
    .await
    .unwrap();
    let got = s.readings(1, 150, 300, 10).await.unwrap();
    assert_eq!(got, vec![reading(1, 2, 200)]);
    let got = s.readings(1, 0, 1_000, 2).await.unwrap();
    assert_eq!(got.iter().map(|r| r.ctr).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(s.readings(2, 0, 1_000, 10).await.unwrap().len(), 1);
    assert!(s.readings(3, 0, 1_000, 10).await.unwrap().is_empty());
    // No upper bound (u64::MAX) means no upper bound, not -1.
    assert_eq!(s.readings(1, 0, u64::MAX, 10).await.unwrap().len(), 3);
    assert_eq!(s.readings(1, 250, u64::MAX, 10).await.unwrap().len(), 1);
}

/// 2,000 readings of one member in one millisecond (a big batch of
/// uplinks), paged 150 at a time: each comes back exactly once, in key
/// order. On PostgreSQL a page's index scan starts at its key and sorts
/// nothing: it reads its readings, not the key's whole millisecond.
async fn readings_page_exactly_in_a_crowded_millisecond(f: Fixture) {
    let s = f.open().await;
    setup(&s, 2).await;
    let mut all: Vec<ReadingRow> = (0..2_000u64)
        .map(|j| {
            let mut r = reading(1, j, 5_000);
            r.group = [G, 3][(j % 2) as usize];
            r.sid = sid(1, (j % 3) as u8);
            r
        })
        .collect();
    // Another member's readings of the same millisecond.
    let others: Vec<ReadingRow> = (0..50).map(|j| reading(2, j, 5_000)).collect();
    s.apply_batch(BatchWrite {
        readings: all.iter().chain(&others).cloned().collect(),
        ..BatchWrite::default()
    })
    .await
    .unwrap();
    // Key order: each column in its stored (signed) form.
    let order = |r: &ReadingRow| (r.ts_ms as i64, r.group, r.sid, r.ctr as i64);
    all.sort_by_key(order);
    let mut got = Vec::new();
    let mut after = None;
    loop {
        let page = s.readings_after(1, 0, u64::MAX, after, 150).await.unwrap();
        let full = page.len() == 150;
        after = page.last().map(ReadingRow::key);
        got.extend(page);
        if !full {
            break;
        }
    }
    assert_eq!(got.len(), all.len());
    assert!(got == all, "pages differ from the readings in key order");
    if f.kind == Kind::Sqlite {
        // The same page's plan on SQLite: a search of readings_by_key
        // (migration 8), no sort step.
        let path = f.url.trim_start_matches("sqlite://");
        let c = rusqlite::Connection::open(path).unwrap();
        let mut st = c
            .prepare(
                "EXPLAIN QUERY PLAN SELECT grp, sid, ctr, ts_ms, kind, payload FROM readings \
                 WHERE member = ?1 AND (ts_ms, grp, sid, ctr) > (?4, ?5, ?6, ?7) AND ts_ms < ?2 \
                 ORDER BY ts_ms, grp, sid, ctr LIMIT ?3",
            )
            .unwrap();
        let plan: Vec<String> = st
            .query_map(rusqlite::params![1, 2, 3, 4, 5, vec![0u8; 8], 7], |r| {
                r.get::<_, String>(3)
            })
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let plan = plan.join("\n");
        assert!(plan.contains("USING INDEX readings_by_key"), "{plan}");
        assert!(!plan.contains("TEMP B-TREE"), "{plan}");
        return;
    }
    // The page after the 1000th reading, as the store asks for it (index
    // scans only, so the plan does not depend on this small table's
    // statistics).
    let k = all[999].key();
    let client = f.pg_client().await;
    client
        .batch_execute("SET enable_seqscan = off; SET enable_bitmapscan = off")
        .await
        .unwrap();
    let plan: Vec<String> = client
        .query(
            &format!(
                "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) \
                 SELECT grp, sid, ctr, ts_ms, kind, payload FROM readings WHERE member = 1 \
                 AND (ts_ms, grp, sid, ctr) > ({}, {}, '\\x{}'::bytea, {}) AND ts_ms < {} \
                 ORDER BY ts_ms, grp, sid, ctr LIMIT 150",
                k.ts_ms,
                k.group,
                hex::encode(k.sid),
                k.ctr,
                i64::MAX
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let plan = plan.join("\n");
    assert!(!plan.contains("Sort"), "{plan}");
    let scan = plan
        .lines()
        .find(|l| l.contains("Index Scan using readings_by_key"))
        .unwrap_or_else(|| panic!("{plan}"));
    assert!(scan.contains("rows=150 "), "reads one page: {plan}");
    assert!(!plan.contains("Rows Removed"), "{plan}");
}

/// Many readings of one member in one millisecond (several groups and
/// sessions, counters on both sides of 2^63), read a page at a time with
/// each page's last key: every reading comes back exactly once, in the
/// same order as one big page, whatever the page size.
async fn readings_page_exactly_within_a_millisecond(f: Fixture) {
    let s = f.open().await;
    setup(&s, 2).await;
    let mut all = Vec::new();
    let mut j = 0u64;
    for (ts_ms, n) in [(999, 3), (1_000, 120), (1_001, 5)] {
        for k in 0..n {
            let mut r = reading(1, j, ts_ms);
            // Keys that differ in every column but the time.
            r.group = [G, 3, G + 1][(k % 3) as usize];
            r.sid = sid(1, (k % 4) as u8);
            r.ctr = if k % 5 == 0 { u64::MAX - j } else { j };
            r.payload = format!("{ts_ms}/{k}").into_bytes();
            all.push(r);
            j += 1;
        }
    }
    // Another member's readings of the same millisecond are never listed.
    let mut other = reading(2, 1, 1_000);
    other.sid = sid(1, 0);
    all.push(other);
    s.apply_batch(BatchWrite {
        readings: all.clone(),
        ..BatchWrite::default()
    })
    .await
    .unwrap();
    let one_page = s.readings_after(1, 0, u64::MAX, None, 1_000).await.unwrap();
    assert_eq!(one_page.len(), 128);
    // Listed in key order, times first.
    let keys: Vec<_> = one_page.iter().map(ReadingRow::key).collect();
    assert!(
        keys.windows(2).all(|w| w[0].ts_ms <= w[1].ts_ms),
        "{keys:?}"
    );
    for limit in [1, 7, 40, 127, 128] {
        let mut got = Vec::new();
        let mut after = None;
        loop {
            let page = s
                .readings_after(1, 0, u64::MAX, after, limit)
                .await
                .unwrap();
            let full = page.len() == limit as usize;
            // Through the operator API's opaque token and back.
            after = page
                .last()
                .map(|r| ReadingKey::from_token(&r.key().to_token()).unwrap());
            got.extend(page);
            if !full {
                break;
            }
        }
        assert_eq!(got, one_page, "limit {limit}");
    }
    // The range still applies after a key: only the millisecond 1000.
    let first = s.readings_after(1, 1_000, 1_001, None, 1).await.unwrap();
    let rest = s
        .readings_after(1, 1_000, 1_001, Some(first[0].key()), 1_000)
        .await
        .unwrap();
    assert_eq!(1 + rest.len(), 120);
    assert!(
        rest.iter()
            .all(|r| r.ts_ms == 1_000 && r.key() != first[0].key())
    );
    // A key before the range (the last reading of 999) starts nothing.
    let early = one_page[2].key();
    assert_eq!(early.ts_ms, 999);
    let got = s
        .readings_after(1, 1_000, 1_001, Some(early), 1_000)
        .await
        .unwrap();
    assert_eq!(got, one_page[3..123]);
    // A key past the range's end gives an empty page.
    let late = one_page[125].key();
    assert!(
        s.readings_after(1, 1_000, 1_001, Some(late), 1_000)
            .await
            .unwrap()
            .is_empty()
    );
    // A key past every reading gives an empty page.
    let last = one_page.last().unwrap().key();
    assert!(
        s.readings_after(1, 0, u64::MAX, Some(last), 10)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn sealed_blobs_round_trip_untouched(f: Fixture) {
    let s = f.open().await;
    let all: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let nul = vec![0u8; 33];
    let mut m = member(1, &[G]);
    m.key_source = KeySource::Imported(Sealed::new(all.clone()));
    s.upsert_member(m.clone()).await.unwrap();
    let mut g = group_row(G);
    g.state = Sealed::new(nul.clone());
    s.insert_group(g).await.unwrap();
    let mut r = round_row(G, 1);
    r.state = Sealed::new(all.clone());
    r.challenge = all[..1000].to_vec();
    let mut sess = session(1, 1, 1, 0);
    sess.state = Sealed::new(Vec::new());
    s.apply_batch(BatchWrite {
        new_rounds: vec![r.clone()],
        sessions: vec![sess],
        verdict: Some(VerdictWrite {
            gateway: GW.into(),
            batch_id: 1,
            batch_hash: [0; 32],
            verdict: nul.clone(),
            pending: Some(PendingWrite {
                pending: Sealed::new(all.clone()),
                expires_at_ms: 1,
            }),
        }),
        ..BatchWrite::default()
    })
    .await
    .unwrap();
    assert_eq!(s.members(vec![1]).await.unwrap(), vec![Some(m)]);
    assert_eq!(
        s.group(G).await.unwrap().unwrap().state.as_bytes(),
        &nul[..]
    );
    assert_eq!(s.round(G, 1).await.unwrap(), Some(r));
    let p = s
        .sessions(vec![(1, G)])
        .await
        .unwrap()
        .pop()
        .unwrap()
        .unwrap();
    assert_eq!(p.state, Some(Sealed::new(Vec::new())));
    let pl = s.pending_localization(GW, 1).await.unwrap().unwrap();
    assert_eq!(
        (pl.pending.as_bytes(), &pl.verdict[..]),
        (&all[..], &nul[..])
    );
}

async fn round_report_and_outcomes(f: Fixture) {
    let s = f.open().await;
    setup(&s, 6).await;
    s.set_member_status(6, MemberStatus::Revoked).await.unwrap();
    let out = |member, kind, reason: &'static str| OutcomeRow {
        group: G,
        round: 1,
        member,
        kind,
        reason: Cow::Borrowed(reason),
        gateway: None,
    };
    s.apply_batch(BatchWrite {
        now_ms: 1,
        via: Some(Via {
            gateway: GW.into(),
            batches: 1,
            entries: 4,
            accepted: 1,
            unverified: 1,
            ..Via::default()
        }),
        outcomes: vec![
            out(1, OutcomeKind::Accepted, ""),
            out(2, OutcomeKind::Rejected, "bad_kv"),
            out(3, OutcomeKind::Rejected, "unknown_member"),
            out(4, OutcomeKind::Unverified, "bad_tag"),
        ],
        ..BatchWrite::default()
    })
    .await
    .unwrap();
    // Later: member 1's accepted outcome sticks; member 4 is accepted
    // through another path (direct, no gateway).
    s.apply_batch(BatchWrite {
        now_ms: 2,
        outcomes: vec![
            out(1, OutcomeKind::Rejected, "late_duplicate"),
            out(4, OutcomeKind::Accepted, ""),
        ],
        ..BatchWrite::default()
    })
    .await
    .unwrap();
    let rep = s.round_report(G, 1).await.unwrap().unwrap();
    assert_eq!(rep.accepted, 2);
    assert_eq!(
        rep.rejected,
        vec![("bad_kv".into(), 1), ("unknown_member".into(), 1)]
    );
    assert_eq!(
        (rep.unverified, rep.missing),
        (0, 1),
        "member 5 missing, 6 revoked"
    );
    assert_eq!(s.round_missing(G, 1, None, 10).await.unwrap(), vec![5]);
    let o = s.round_outcomes(G, 1, Some(1), 2).await.unwrap();
    assert_eq!(o.len(), 2);
    assert_eq!((o[0].member, o[0].gateway.as_deref()), (2, Some(GW)));
    assert_eq!((o[1].member, o[1].reason.as_ref()), (3, "unknown_member"));
    let o1 = &s.round_outcomes(G, 1, None, 1).await.unwrap()[0];
    assert_eq!(
        (o1.kind, o1.gateway.as_deref()),
        (OutcomeKind::Accepted, Some(GW))
    );
    // Opening an existing round conflicts; closing erases its secret state.
    let dup = s
        .apply_batch(BatchWrite {
            new_rounds: vec![round_row(G, 1)],
            ..BatchWrite::default()
        })
        .await;
    assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
    assert_eq!(s.open_rounds().await.unwrap().len(), 1);
    s.apply_batch(BatchWrite {
        closed_rounds: vec![(G, 1)],
        new_rounds: vec![round_row(G, 2)],
        ..BatchWrite::default()
    })
    .await
    .unwrap();
    let r1 = s.round(G, 1).await.unwrap().unwrap();
    assert_eq!(
        (r1.status, r1.state.as_bytes().len()),
        (RoundStatus::Closed, 0)
    );
    let open: Vec<u64> = s
        .open_rounds()
        .await
        .unwrap()
        .iter()
        .map(|r| r.round)
        .collect();
    assert_eq!(open, vec![2]);
    assert_eq!(s.round_report(G, 99).await.unwrap(), None);
}

/// The store, not a process's cache, decides acceptance: a write that
/// accepts a member already accepted in the round fails as a whole
/// (nothing of it is written), whoever wrote the first acceptance.
async fn second_acceptance_fails_the_write(f: Fixture) {
    let s = f.open().await;
    setup(&s, 3).await;
    let slot = |m: u64| {
        let s = &s;
        async move { s.sessions(vec![(m, G)]).await.unwrap().pop().unwrap() }
    };
    let mut first = batch(1, 0x01, 2);
    first.sessions = vec![accept(1, 1, 1, None), accept(2, 1, 1, None)];
    s.apply_batch(first).await.unwrap();
    let read2 = slot(2).await.unwrap();
    assert!(read2.rounds.contains(1) && !read2.rounds.contains(2));
    // Another batch accepting member 3 and (again, over the slot as read)
    // member 2 in the same round: nothing of it is written.
    let mut again = batch(2, 0x02, 3);
    again.sessions = vec![accept(2, 2, 1, Some(&read2)), accept(3, 1, 1, None)];
    again.readings.clear();
    let before = s.latest_cursor(GW).await.unwrap();
    let r = s.apply_batch(again.clone()).await;
    assert!(
        matches!(r, Err(StoreError::Conflict("round outcome"))),
        "{r:?}"
    );
    assert_eq!(s.verdict(GW, 2).await.unwrap(), None, "nothing written");
    assert_eq!(slot(3).await, None);
    assert_eq!(s.latest_cursor(GW).await.unwrap(), before);
    assert_eq!(s.round_report(G, 1).await.unwrap().unwrap().accepted, 2);
    // A writer claiming an older view of the accepted rounds (another
    // process accepted the member since) fails on the stored window.
    let stale = SessionRow {
        rounds: AcceptedRounds::default(),
        ..accept(2, 2, 1, Some(&read2))
    };
    let r = s
        .apply_batch(BatchWrite {
            sessions: vec![stale],
            ..BatchWrite::default()
        })
        .await;
    assert!(
        matches!(r, Err(StoreError::Conflict("session slot"))),
        "{r:?}"
    );
    // Without the duplicate the same write goes through; a rejected
    // outcome for an accepted member does not replace it in the report.
    again.outcomes = vec![
        OutcomeRow {
            kind: OutcomeKind::Rejected,
            reason: Cow::Borrowed("AlreadyAccepted"),
            ..accepted(2, 1)
        },
        accepted(3, 1),
    ];
    again.sessions = vec![accept(3, 1, 1, None)];
    s.apply_batch(again).await.unwrap();
    let rep = s.round_report(G, 1).await.unwrap().unwrap();
    assert_eq!((rep.accepted, rep.rejected.len()), (3, 0));
    // The same member in another round is a new acceptance; the slot
    // remembers both rounds.
    s.apply_batch(BatchWrite {
        new_rounds: vec![round_row(G, 2)],
        outcomes: vec![accepted(2, 2)],
        sessions: vec![accept(2, 3, 2, Some(&read2))],
        ..BatchWrite::default()
    })
    .await
    .unwrap();
    let read2 = slot(2).await.unwrap();
    assert!(read2.rounds.contains(1) && read2.rounds.contains(2));
    assert_eq!(read2.version, 2);
    // Emptying the slot (revocation) and dropping every session keep them.
    s.apply_batch(BatchWrite {
        sessions: vec![SessionRow {
            sid: None,
            authenticated_at_ms: None,
            rounds: read2.rounds,
            ..session(2, 4, 2, read2.version)
        }],
        ..BatchWrite::default()
    })
    .await
    .unwrap();
    s.drop_all_sessions().await.unwrap();
    let read2 = slot(2).await.unwrap();
    assert!(read2.sid.is_none() && read2.rounds.contains(1) && read2.rounds.contains(2));
    // Round 70 is accepted; round 5 is now too far behind to be told
    // apart from a second acceptance.
    s.apply_batch(BatchWrite {
        sessions: vec![accept(2, 5, 70, Some(&read2))],
        ..BatchWrite::default()
    })
    .await
    .unwrap();
    let read2 = slot(2).await.unwrap();
    assert!(read2.rounds.contains(70) && !read2.rounds.contains(69));
    assert!(read2.rounds.contains(5), "64 or more rounds back");
    let r = s
        .apply_batch(BatchWrite {
            sessions: vec![accept(2, 6, 5, Some(&read2))],
            ..BatchWrite::default()
        })
        .await;
    assert!(
        matches!(r, Err(StoreError::Conflict("round outcome"))),
        "{r:?}"
    );
}

/// A batch's members and session slots read the same whether its ids are
/// dense (SQLite reads them with range scans) or sparse (point lookups):
/// gaps, unknown ids, other groups' slots and several groups per member.
async fn dense_and_sparse_batch_reads_agree(f: Fixture) {
    let s = f.open().await;
    // Members 100..=160 without multiples of 7; every third also in group 3.
    let ids: Vec<u64> = (100..=160).filter(|m| m % 7 != 0).collect();
    s.apply_batch(BatchWrite {
        members: ids
            .iter()
            .map(|&m| member(m, if m % 3 == 0 { &[3, G][..] } else { &[G][..] }))
            .collect(),
        ..BatchWrite::default()
    })
    .await
    .unwrap();
    // Slots in group G for even members, in group 3 for members 5 mod 6.
    let mut slots: Vec<SessionRow> = ids
        .iter()
        .filter(|m| *m % 2 == 0)
        .map(|&m| match m % 4 {
            0 => accept(m, 1, 5, None),
            _ => session(m, 1, 1, 0),
        })
        .collect();
    slots.extend(ids.iter().filter(|m| *m % 6 == 5).map(|&m| SessionRow {
        group: 3,
        ..session(m, 2, 1, 0)
    }));
    s.apply_batch(BatchWrite {
        sessions: slots,
        ..BatchWrite::default()
    })
    .await
    .unwrap();
    // Dense: 95..=165 (71 ids, 15 unknown); sparse: the same ids one by one.
    let asked: Vec<u64> = (95..=165).collect();
    let dense_members = s.members(asked.clone()).await.unwrap();
    let dense_slots = s
        .sessions(asked.iter().map(|&m| (m, G)).collect())
        .await
        .unwrap();
    for (k, &m) in asked.iter().enumerate() {
        let one = s.members(vec![m]).await.unwrap().pop().unwrap();
        assert_eq!(dense_members[k], one, "member {m}");
        let expected = ids
            .contains(&m)
            .then(|| member(m, if m % 3 == 0 { &[3, G][..] } else { &[G][..] }));
        assert_eq!(one, expected, "member {m}");
        let slot = s.sessions(vec![(m, G)]).await.unwrap().pop().unwrap();
        assert_eq!(dense_slots[k], slot, "slot of {m}");
        assert_eq!(
            slot.map(|x| x.sid),
            (ids.contains(&m) && m % 2 == 0).then_some(Some(sid(m, 1))),
            "slot of {m}"
        );
    }
    // Mixed groups or an unsorted list take the point-lookup path.
    let mixed = s
        .sessions(vec![(101, 3), (102, G), (103, G)])
        .await
        .unwrap();
    assert_eq!(
        mixed
            .iter()
            .map(|x| x.as_ref().map(|x| x.group))
            .collect::<Vec<_>>(),
        vec![Some(3), Some(G), None]
    );
    // A batch reads what judging needs of the same slots, densely or
    // sparsely, an emptied slot (revocation) included.
    s.apply_batch(BatchWrite {
        sessions: vec![SessionRow {
            sid: None,
            ..session(106, 3, 2, 1)
        }],
        ..BatchWrite::default()
    })
    .await
    .unwrap();
    let sparse: Vec<u64> = vec![95, 106, 112, 130, 1_000, 160];
    for ids in [asked, sparse] {
        let read = s.batch_reads(G, ids.clone(), None, None).await.unwrap();
        let full = s
            .sessions(ids.iter().map(|&m| (m, G)).collect())
            .await
            .unwrap();
        let full: Vec<Option<BatchSlot>> =
            full.into_iter().map(|x| x.map(BatchSlot::from)).collect();
        assert_eq!(read.sessions, full);
        let emptied = ids.iter().position(|&m| m == 106).unwrap();
        let slot = read.sessions[emptied].as_ref().unwrap();
        assert_eq!((slot.state.as_ref(), slot.version), (None, 2));
        assert!(read.sessions.iter().flatten().any(|x| x.state.is_some()));
    }
}

/// Every change to a member or its groups raises the registry version
/// (the UDC's member cache depends on it), other writes leave it; a batch
/// read at the caller's version reads only the members it lacks, at
/// another version every member of the batch.
async fn registry_version_follows_every_registry_change(f: Fixture) {
    let s = f.open().await;
    let mut last = s.registry_version().await.unwrap();
    let mut raised = |v: u64, what: &str| {
        assert!(v > last, "{what}: registry version {v} after {last}");
        last = v;
    };
    s.apply_batch(BatchWrite {
        members: vec![member(1, &[G]), member(2, &[G]), member(3, &[G, 3])],
        ..BatchWrite::default()
    })
    .await
    .unwrap();
    raised(s.registry_version().await.unwrap(), "import");
    assert!(s.set_member_status(2, MemberStatus::Revoked).await.unwrap());
    raised(s.registry_version().await.unwrap(), "status");
    assert!(s.set_kv(3, 2, KeySource::Derived).await.unwrap());
    raised(s.registry_version().await.unwrap(), "key version");
    s.upsert_member(member(3, &[G])).await.unwrap();
    raised(s.registry_version().await.unwrap(), "groups");
    // Not registry changes: a group, a session slot, a reading.
    s.insert_group(group_row(G)).await.unwrap();
    s.apply_batch(BatchWrite {
        sessions: vec![session(1, 1, 1, 0)],
        readings: vec![reading(1, 1, 5)],
        ..BatchWrite::default()
    })
    .await
    .unwrap();
    assert_eq!(s.registry_version().await.unwrap(), last, "other writes");

    let ids = vec![1, 2, 3];
    let read = s
        .batch_reads(
            G,
            ids.clone(),
            None,
            Some(MemberFetch {
                version: last,
                missing: vec![2],
            }),
        )
        .await
        .unwrap();
    assert_eq!(read.registry_version, last);
    assert_eq!(read.members_of, MembersOf::Missing);
    assert_eq!(read.members.len(), 1);
    assert_eq!(read.members[0].as_ref().map(|m| m.id), Some(2));
    assert_eq!(read.sessions.len(), 3, "slots of every member of the batch");
    let stale = s
        .batch_reads(
            G,
            ids.clone(),
            None,
            Some(MemberFetch {
                version: last - 1,
                missing: vec![2],
            }),
        )
        .await
        .unwrap();
    assert_eq!(stale.members_of, MembersOf::All);
    assert_eq!(
        stale
            .members
            .iter()
            .map(|m| m.as_ref().map(|m| m.id))
            .collect::<Vec<_>>(),
        vec![Some(1), Some(2), Some(3)]
    );
    let none = s.batch_reads(G, ids, None, None).await.unwrap();
    assert_eq!(none.members_of, MembersOf::All);
    assert_eq!(none.members, stale.members);
}

async fn group_messages_acks_schedules(f: Fixture) {
    let s = f.open().await;
    setup(&s, 3).await;
    let gm = GroupMessageRow {
        group: G,
        seq: 1,
        epoch: 1,
        bytes: vec![0x07; 90],
        payload_hash: [0x33; 32],
        created_at_ms: 50,
    };
    s.apply_batch(BatchWrite {
        group_messages: vec![gm.clone()],
        ..BatchWrite::default()
    })
    .await
    .unwrap();
    let dup = s
        .apply_batch(BatchWrite {
            group_messages: vec![gm.clone()],
            ..BatchWrite::default()
        })
        .await;
    assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
    assert_eq!(s.group_message(G, 1).await.unwrap(), Some(gm));
    assert_eq!(s.group_message(G, 2).await.unwrap(), None);
    let ack = |member, at_ms| AckRow {
        group: G,
        seq: 1,
        member,
        at_ms,
    };
    s.apply_batch(BatchWrite {
        acks: vec![ack(2, 60), ack(1, 61)],
        ..BatchWrite::default()
    })
    .await
    .unwrap();
    // A repeated ack is ignored (first time kept).
    s.apply_batch(BatchWrite {
        acks: vec![ack(2, 99), ack(3, 62)],
        ..BatchWrite::default()
    })
    .await
    .unwrap();
    assert_eq!(
        s.acks(G, 1, None, 10).await.unwrap(),
        AckPage {
            total: 3,
            acks: vec![ack(1, 61), ack(2, 60), ack(3, 62)]
        }
    );
    // Paged by member; the total is all of them on every page.
    assert_eq!(
        s.acks(G, 1, None, 2).await.unwrap(),
        AckPage {
            total: 3,
            acks: vec![ack(1, 61), ack(2, 60)]
        }
    );
    assert_eq!(
        s.acks(G, 1, Some(2), 2).await.unwrap(),
        AckPage {
            total: 3,
            acks: vec![ack(3, 62)]
        }
    );
    // Schedules: claimed once by whoever sees the expected next time.
    let row = ScheduleRow {
        id: 0,
        group: G,
        every_ms: 60_000,
        mode: Mode::PskEcdhe,
        purpose: RoundPurpose::Read,
        read_request: b"obis 1.8.0\x00\xff".to_vec(),
        next_at_ms: 100,
    };
    let id = s.insert_schedule(row.clone()).await.unwrap();
    let id2 = s
        .insert_schedule(ScheduleRow {
            purpose: RoundPurpose::Auth,
            read_request: Vec::new(),
            ..row.clone()
        })
        .await
        .unwrap();
    assert_ne!(id, id2);
    assert!(s.claim_schedule(id, 100, 60_100).await.unwrap());
    assert!(!s.claim_schedule(id, 100, 60_100).await.unwrap());
    let all = s.schedules().await.unwrap();
    assert_eq!(
        all[0],
        ScheduleRow {
            id,
            next_at_ms: 60_100,
            ..row.clone()
        }
    );
    assert_eq!(all[1].read_request, b"");
    assert!(s.delete_schedule(id2).await.unwrap());
    assert!(!s.delete_schedule(id2).await.unwrap());
    assert_eq!(s.schedules().await.unwrap().len(), 1);
}

/// A downlink bundle row that does not parse (truncated, or holding another
/// number of records than its count) is a typed `Corrupt` error on read,
/// never a panic or a wrong record.
#[tokio::test]
async fn corrupt_downlink_bundles_are_errors() {
    let f = fixture(Kind::Sqlite).unwrap();
    let s = f.open().await;
    s.push_downlink(
        1,
        vec![DownlinkPush {
            target: DownlinkTarget::Gateway("gw".into()),
            records: (1..=3u8)
                .map(|k| DownlinkRecord {
                    audience: Audience::Member(u64::from(k)),
                    group: G,
                    message: vec![k; 5],
                })
                .collect(),
        }],
    )
    .await
    .unwrap();
    let got = s.read_downlink("gw", 1, 10).await.unwrap();
    assert_eq!(
        got.iter()
            .map(|r| (r.cursor, r.record.audience))
            .collect::<Vec<_>>(),
        vec![(2, Audience::Member(2)), (3, Audience::Member(3))]
    );
    let path = f.url.trim_start_matches("sqlite://").to_owned();
    let c = rusqlite::Connection::open(&path).unwrap();
    let original: Vec<u8> = c
        .query_row("SELECT message FROM downlink", [], |r| r.get(0))
        .unwrap();
    for damage in [
        "UPDATE downlink SET message = substr(message, 1, length(message) - 1)",
        "UPDATE downlink SET message = unhex(hex(message) || '00')",
        "UPDATE downlink SET n = 4",
        "UPDATE downlink SET n = 2",
        "UPDATE downlink SET n = 0",
    ] {
        c.execute_batch(damage).unwrap();
        let r = s.read_downlink("gw", 0, 10).await;
        assert!(matches!(r, Err(StoreError::Corrupt(_))), "{damage}: {r:?}");
        c.execute(
            "UPDATE downlink SET n = 3, message = ?1",
            rusqlite::params![&original],
        )
        .unwrap();
        assert_eq!(s.read_downlink("gw", 0, 10).await.unwrap().len(), 3);
    }
}

/// The recovery after a restore, store step (docs/udc.md, "Restoring a
/// backup"): one transaction raises the floor, creates the named groups
/// without a row, empties every session, raises every downlink head and the
/// registry version, then applies the batch (groups, rounds closed and
/// opened, downlink records above the raised heads); a gateway queue that
/// starts afterwards starts above the floor. A write that fails at its last
/// step (a group changed since it was read), one with a stale floor, and one
/// whose raise would pass u64::MAX write nothing at all.
async fn recovery_is_one_transaction_and_raises_the_floor(f: Fixture) {
    const OFF: u64 = 1 << 32;
    let s = f.open().await;
    setup(&s, 2).await;
    // Group 9 named by a member, group 8 by a subscription: neither has a row.
    s.apply_batch(BatchWrite {
        members: vec![member(3, &[9])],
        sessions: vec![session(1, 1, 1, 0)],
        downlink: vec![push(DownlinkTarget::Gateway(GW.into()), 1)],
        ..BatchWrite::default()
    })
    .await
    .unwrap();
    s.set_subscriptions("gw-2", vec![8], 0).await.unwrap();
    let reads = s.recovery_reads().await.unwrap();
    assert_eq!(reads.state, RecoveryState::default());
    assert_eq!(reads.groups.len(), 1);
    assert_eq!(reads.named_without_row, vec![8, 9]);
    let open: Vec<(u32, u64)> = reads
        .open_rounds
        .iter()
        .map(|r| (r.group, r.round))
        .collect();
    assert_eq!(open, vec![(G, 1)]);
    assert_eq!(reads.newest_record_ms, Some(5_000), "round 1's opening");
    let version = s.registry_version().await.unwrap();
    let write = |floor_before: u64, group_version: u64, raise_by: u64| RecoveryWrite {
        floor_before,
        floor: OFF,
        raise_by,
        new_groups: [8, 9]
            .map(|g| GroupRow {
                epoch: OFF + 1,
                next_round: OFF + 2,
                seq: OFF,
                ..group_row(g)
            })
            .to_vec(),
        revoke: vec![1, 42],
        newest_record_ms: Some(5_000),
        batch: BatchWrite {
            now_ms: 70_000,
            groups: vec![GroupRow {
                epoch: OFF + 1,
                next_round: OFF + 3,
                seq: OFF,
                version: group_version,
                ..group_row(G)
            }],
            closed_rounds: vec![(G, 1)],
            new_rounds: vec![round_row(G, OFF + 2)],
            downlink: vec![
                push(DownlinkTarget::Gateway(GW.into()), 2),
                push(DownlinkTarget::Subscribers, 3),
            ],
            ..BatchWrite::default()
        },
    };
    assert!(matches!(
        s.recover(write(0, 9, OFF)).await,
        Err(StoreError::Conflict("group"))
    ));
    recovery_wrote_nothing(&s, version).await;
    assert!(matches!(
        s.recover(write(5, 1, OFF)).await,
        Err(StoreError::Conflict("recovery floor"))
    ));
    recovery_wrote_nothing(&s, version).await;
    assert!(matches!(
        s.recover(write(0, 1, u64::MAX)).await,
        Err(StoreError::CounterExhausted("downlink cursor"))
    ));
    recovery_wrote_nothing(&s, version).await;

    let done = s.recover(write(0, 1, OFF)).await.unwrap();
    assert_eq!(
        done,
        RecoveryApplied {
            sessions_dropped: 1,
            gateways_raised: 1,
            members_revoked: 1,
            revoke_not_found: vec![42],
        }
    );
    let state = s.recovery_state().await.unwrap();
    assert_eq!(
        (
            state.floor,
            state.recoveries,
            state.recovered_at_ms,
            state.newest_record_ms
        ),
        (OFF, 1, Some(70_000), Some(5_000))
    );
    let m = s.members(vec![1, 2]).await.unwrap();
    let status: Vec<MemberStatus> = m.iter().map(|m| m.as_ref().unwrap().status).collect();
    assert_eq!(status, vec![MemberStatus::Revoked, MemberStatus::Active]);
    assert_eq!(s.count_sessions().await.unwrap(), 0);
    // Raised, plus the revocation (a registry change).
    assert_eq!(s.registry_version().await.unwrap(), version + OFF + 1);
    assert_eq!(s.group(9).await.unwrap().unwrap().next_round, OFF + 2);
    assert_eq!(s.group(G).await.unwrap().unwrap().next_round, OFF + 3);
    assert_eq!(
        s.round(G, 1).await.unwrap().unwrap().status,
        RoundStatus::Closed
    );
    let open: Vec<u64> = s
        .open_rounds()
        .await
        .unwrap()
        .iter()
        .map(|r| r.round)
        .collect();
    assert_eq!(open, vec![OFF + 2]);
    // GW's record comes after its raised head; gw-2's queue (no head in
    // the store) starts above the floor; so does a queue started later.
    assert_eq!(s.latest_cursor(GW).await.unwrap(), 1 + OFF + 1);
    let recs = s.read_downlink(GW, 1, 10).await.unwrap();
    assert_eq!(
        recs.len(),
        1,
        "only the recovery's record is after the old cursor"
    );
    assert_eq!(s.latest_cursor("gw-2").await.unwrap(), OFF + 1);
    s.apply_batch(BatchWrite {
        downlink: vec![push(DownlinkTarget::Gateway("gw-3".into()), 4)],
        ..BatchWrite::default()
    })
    .await
    .unwrap();
    assert_eq!(s.latest_cursor("gw-3").await.unwrap(), OFF + 1);
    // Recovered once: the same write again finds the floor moved.
    assert!(matches!(
        s.recover(write(0, 2, OFF)).await,
        Err(StoreError::Conflict("recovery floor"))
    ));
    assert_eq!(s.recovery_reads().await.unwrap().state.floor, OFF);
}

/// The store of [`recovery_is_one_transaction_and_raises_the_floor`] as
/// it was before any recovery (registry version `version`).
async fn recovery_wrote_nothing(s: &AnyStore, version: u64) {
    assert_eq!(s.recovery_state().await.unwrap(), RecoveryState::default());
    let m = s.members(vec![1]).await.unwrap();
    assert_eq!(m[0].as_ref().unwrap().status, MemberStatus::Active);
    assert_eq!(s.count_sessions().await.unwrap(), 1);
    assert_eq!(s.latest_cursor(GW).await.unwrap(), 1);
    assert_eq!(s.latest_cursor("gw-2").await.unwrap(), 0);
    assert_eq!(s.registry_version().await.unwrap(), version);
    assert!(s.group(8).await.unwrap().is_none());
    assert_eq!(
        s.round(G, 1).await.unwrap().unwrap().status,
        RoundStatus::Open
    );
}

/// A downlink push of one one-byte record: of group 8 to its subscribers,
/// of group G to a named gateway.
fn push(target: DownlinkTarget, n: u8) -> DownlinkPush {
    let group = match target {
        DownlinkTarget::Subscribers => 8,
        DownlinkTarget::Gateway(_) => G,
    };
    DownlinkPush {
        target,
        records: vec![DownlinkRecord {
            audience: Audience::Group,
            group,
            message: vec![n],
        }],
    }
}
