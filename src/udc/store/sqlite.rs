//! The embedded SQLite backend of the UDC store (the default).
//!
//! One connection, one writer: every call runs on tokio's blocking pool
//! while holding the connection's mutex, so the async runtime never waits
//! on disk. Settings: WAL (readers do not block the writer's commit),
//! `synchronous=FULL` (a verdict returned to a gateway is on disk even after
//! a power loss, which NORMAL does not promise in WAL mode), foreign keys
//! on, a 5 s busy timeout for a second process opening the same file.
//!
//! Reads that take a list (`members`, `sessions`) run one cached prepared
//! lookup per key inside one read transaction: SQLite is in-process, so the
//! "one query per batch" rule (which exists to save network round trips)
//! buys nothing here, and point lookups beat a 10,000-term `IN` list.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Row, Transaction, TransactionBehavior, params};

use super::*;

/// Versioned migrations, applied in order; `PRAGMA user_version` records
/// the last one applied.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../../migrations/sqlite/0001_init.sql")),
    (
        2,
        include_str!("../../../migrations/sqlite/0002_session_slots.sql"),
    ),
    (
        3,
        include_str!("../../../migrations/sqlite/0003_downlink_bundles.sql"),
    ),
    (
        4,
        include_str!("../../../migrations/sqlite/0004_batch_outcomes.sql"),
    ),
    (
        5,
        include_str!("../../../migrations/sqlite/0005_schedule_read_request.sql"),
    ),
    (
        6,
        include_str!("../../../migrations/sqlite/0006_registry_version.sql"),
    ),
    (
        7,
        include_str!("../../../migrations/sqlite/0007_recovery.sql"),
    ),
    (
        8,
        include_str!("../../../migrations/sqlite/0008_readings_in_arrival_order.sql"),
    ),
    (
        9,
        include_str!("../../../migrations/sqlite/0009_member_min_kv.sql"),
    ),
    (
        10,
        include_str!("../../../migrations/sqlite/0010_drop_member_gateway.sql"),
    ),
    (
        11,
        include_str!("../../../migrations/sqlite/0011_session_slot_format_2.sql"),
    ),
    (
        12,
        include_str!("../../../migrations/sqlite/0012_session_uses.sql"),
    ),
];

/// The SQLite store.
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

impl SqliteStore {
    /// Opens the database file, creating it and its directory if needed,
    /// and applies pending migrations.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let path = path.to_path_buf();
        let p = path.clone();
        let conn = tokio::task::spawn_blocking(move || Self::open_blocking(&p))
            .await
            .map_err(|_| StoreError::Worker)??;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            path,
        })
    }

    fn open_blocking(path: &Path) -> Result<Connection, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir {
                path: dir.display().to_string(),
                source,
            })?;
        }
        let mut conn = Connection::open(path)?;
        // Measurement knob (docs/udc.md, Performance): the page size of a
        // database created now; an existing file keeps its own.
        if let Some(bytes) = tuning(BENCH_PAGE_SIZE_VAR) {
            conn.pragma_update(None, "page_size", bytes)?;
        }
        conn.busy_timeout(Duration::from_secs(5))?;
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Corrupt("sqlite refused WAL journal mode"));
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // 32 MiB of page cache (the default is 2 MiB): a round's session
        // slots, outcomes and member rows stay in memory between batches.
        conn.pragma_update(None, "cache_size", -32768)?;
        // About 80 distinct statements (multi-row inserts among them, whose
        // preparation is the dearest): room for all of them, so admin and
        // listing traffic cannot evict the batch path's.
        conn.set_prepared_statement_cache_capacity(128);
        // Checkpoint after 10,000 WAL pages (about 40 MiB) instead of
        // SQLite's 1,000: batches of scattered member ids rewrite the same
        // session, outcome and reading pages, and a longer interval copies
        // each of them back to the database file once instead of many
        // times. Every commit is still fsynced (`synchronous=FULL`).
        let pages = tuning(BENCH_WAL_AUTOCHECKPOINT_VAR).unwrap_or(WAL_AUTOCHECKPOINT_PAGES);
        conn.pragma_update(None, "wal_autocheckpoint", pages)?;
        migrate(&mut conn)?;
        Ok(conn)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the blocking pool with the connection.
    async fn call<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock rolled its transaction back
            // (Transaction's drop), so the connection is still sound.
            let mut c = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut c)
        })
        .await
        .map_err(|_| StoreError::Worker)?
    }

    /// Runs `f` in a read transaction (one consistent snapshot).
    async fn read<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<R, StoreError> + Send + 'static,
    {
        self.call(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Deferred)?;
            let r = f(&tx)?;
            tx.commit()?;
            Ok(r)
        })
        .await
    }
}

/// WAL pages between automatic checkpoints.
const WAL_AUTOCHECKPOINT_PAGES: i64 = 10_000;

/// Measurement knob: the page size of a SQLite database created by this
/// process. Outside the `DAPGW_` namespace on purpose: it is not a UDC
/// setting (`dapgw udc` refuses unknown `DAPGW_*` variables), only a lever
/// for A/B runs of the benchmarks (docs/udc.md, Performance).
const BENCH_PAGE_SIZE_VAR: &str = "BENCH_SQLITE_PAGE_SIZE";

/// Measurement knob: WAL pages between automatic checkpoints (default
/// [`WAL_AUTOCHECKPOINT_PAGES`]); like [`BENCH_PAGE_SIZE_VAR`], not a setting.
const BENCH_WAL_AUTOCHECKPOINT_VAR: &str = "BENCH_SQLITE_WAL_AUTOCHECKPOINT";

/// A positive integer from environment variable `name`, if set (the
/// storage measurement knobs above).
fn tuning(name: &str) -> Option<i64> {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse::<i64>().ok())
        .filter(|v| *v > 0)
}

/// Applies the migrations newer than `user_version` in one immediate
/// transaction, so a second process opening the file waits, then sees them.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let current: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let latest = MIGRATIONS.last().map_or(0, |m| m.0);
    if current > latest {
        return Err(StoreError::SchemaTooNew {
            found: current,
            supported: latest,
        });
    }
    for (version, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", version)?;
    }
    tx.commit()?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Row mapping
// ---------------------------------------------------------------------------

/// A member's columns and its groups as one comma-separated list, so one
/// statement step reads a whole member (a second statement per member
/// cost as much as the row).
const MEMBER_COLS: &str = "id, kv, key_source, imported_key, status, added_at_ms, \
    (SELECT group_concat(grp) FROM member_groups WHERE member = members.id), \
    coalesce(min_kv, kv)";

fn member_row(r: &Row<'_>) -> Result<MemberRow, StoreError> {
    let list: Option<String> = r.get(6)?;
    let mut groups = list
        .as_deref()
        .unwrap_or("")
        .split(',')
        .filter(|g| !g.is_empty())
        .map(|g| {
            g.parse::<u32>()
                .map_err(|_| StoreError::Corrupt("member group"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    groups.sort_unstable();
    Ok(MemberRow {
        id: u(r.get(0)?),
        groups,
        kv: u32_col(r.get(1)?, "member kv")?,
        min_kv: u32_col(r.get(7)?, "member min_kv")?,
        key_source: key_source_col(r.get(2)?, r.get(3)?)?,
        status: member_status_col(r.get(4)?)?,
        added_at_ms: u(r.get(5)?),
    })
}

const GROUP_COLS: &str = "grp, epoch, next_round, seq, config_hash, state, version";

fn group_row(r: &Row<'_>) -> Result<GroupRow, StoreError> {
    Ok(GroupRow {
        group: u32_col(r.get(0)?, "group id")?,
        epoch: u(r.get(1)?),
        next_round: u(r.get(2)?),
        seq: u(r.get(3)?),
        config_hash: hash_col(r.get(4)?, "group config hash")?,
        state: Sealed::new(r.get(5)?),
        version: u(r.get(6)?),
    })
}

const ROUND_COLS: &str =
    "grp, round, opened_at_ms, closes_at_ms, mode, purpose, challenge, state, status";

fn round_row(r: &Row<'_>) -> Result<RoundRow, StoreError> {
    Ok(RoundRow {
        group: u32_col(r.get(0)?, "round group")?,
        round: u(r.get(1)?),
        opened_at_ms: u(r.get(2)?),
        closes_at_ms: r.get::<_, Option<i64>>(3)?.map(u),
        mode: mode_col(r.get(4)?)?,
        purpose: purpose_col(r.get(5)?)?,
        challenge: r.get(6)?,
        state: Sealed::new(r.get(7)?),
        status: round_status_col(r.get(8)?)?,
    })
}

const SESSION_COLS: &str = "s.member, s.grp, s.last_auth_ms, s.sid, s.state, s.round, \
    s.version, s.acc_top, s.acc_seen, u.sid, u.top, u.seen";

/// The slots with the use that applies to each (columns `s.*`, `u.*`).
const SLOTS_FROM: &str = "sessions s LEFT JOIN session_uses u \
    ON u.member = s.member AND u.grp = s.grp AND u.base = s.version";

fn stored_slot(r: &Row<'_>) -> Result<StoredSlot, StoreError> {
    let sid = opt_sid_col(r.get(3)?)?;
    let state: Option<Vec<u8>> = r.get(4)?;
    Ok(StoredSlot {
        member: u(r.get(0)?),
        group: u32_col(r.get(1)?, "session group")?,
        last_auth_ms: u(r.get(2)?),
        state: sid.and(state).map(Sealed::new),
        sid,
        round: u(r.get(5)?),
        version: u(r.get(6)?),
        rounds: AcceptedRounds {
            top: u(r.get(7)?),
            seen: u(r.get(8)?),
        },
        used: slot_use_cols(r.get(9)?, r.get(10)?, r.get(11)?)?,
    })
}

const LOCALIZATION_COLS: &str = "gateway, batch_id, batch_hash, verdict, pending, expires_at_ms";

fn localization_row(r: &Row<'_>) -> Result<PendingLocalization, StoreError> {
    Ok(PendingLocalization {
        gateway: r.get(0)?,
        batch_id: u(r.get(1)?),
        batch_hash: hash_col(r.get(2)?, "batch hash")?,
        verdict: r.get(3)?,
        pending: Sealed::new(r.get(4)?),
        expires_at_ms: u(r.get(5)?),
    })
}

const SCHEDULE_COLS: &str = "id, grp, every_ms, mode, purpose, next_at_ms, read_request";

fn schedule_row(r: &Row<'_>) -> Result<ScheduleRow, StoreError> {
    Ok(ScheduleRow {
        id: u(r.get(0)?),
        group: u32_col(r.get(1)?, "schedule group")?,
        every_ms: u(r.get(2)?),
        mode: mode_col(r.get(3)?)?,
        purpose: purpose_col(r.get(4)?)?,
        next_at_ms: u(r.get(5)?),
        read_request: r.get(6)?,
    })
}

/// Collects the rows of a prepared query through a fallible mapper.
fn collect<T>(
    stmt: &mut rusqlite::Statement<'_>,
    params: impl rusqlite::Params,
    mut f: impl FnMut(&Row<'_>) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let mut rows = stmt.query(params)?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push(f(r)?);
    }
    Ok(out)
}

/// SQLite's signed 64-bit comparison bound for an optional `after` key.
fn after_key(after: Option<u64>) -> i64 {
    after.map_or(i64::MIN, i)
}

/// The comparison for an optional `after`: without one the bound
/// (`i64::MIN`) is inclusive.
fn after_op(after: Option<u64>) -> &'static str {
    if after.is_some() { ">" } else { ">=" }
}

// ---------------------------------------------------------------------------
// The write transaction
// ---------------------------------------------------------------------------

fn apply(conn: &mut Connection, w: BatchWrite) -> Result<Applied, StoreError> {
    w.check_uses()?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let applied = apply_tx(&tx, w)?;
    tx.commit()?;
    Ok(applied)
}

/// Rows one multi-row `INSERT` of [`insert_rows`] carries: a statement's
/// fixed cost (binding, reset, halt) is paid once per this many rows. At 8
/// values a row that is 512 parameters, far below SQLite's limit of 32,766.
const ROWS_PER_INSERT: usize = 64;

/// Inserts `rows` with multi-row statements of [`ROWS_PER_INSERT`] rows
/// (the remainder one by one): `sql(n)` is the statement for `n` rows, and
/// `bind` binds one row's `width` values from the given parameter index.
/// Returns whether every row was inserted (a statement changed as many rows
/// as it carried; it changes fewer under `ON CONFLICT DO NOTHING`).
fn insert_rows<T>(
    tx: &Transaction<'_>,
    rows: &[T],
    width: usize,
    sql: impl Fn(usize) -> String,
    bind: impl Fn(&mut rusqlite::CachedStatement<'_>, usize, &T) -> Result<(), StoreError>,
) -> Result<bool, StoreError> {
    let run = |st: &mut rusqlite::CachedStatement<'_>, chunk: &[T]| -> Result<bool, StoreError> {
        for (k, row) in chunk.iter().enumerate() {
            bind(st, 1 + width * k, row)?;
        }
        Ok(st.raw_execute()? == chunk.len())
    };
    let chunks = rows.chunks_exact(ROWS_PER_INSERT);
    let rest = chunks.remainder();
    if chunks.len() > 0 {
        let mut st = tx.prepare_cached(&sql(ROWS_PER_INSERT))?;
        for chunk in chunks {
            if !run(&mut st, chunk)? {
                return Ok(false);
            }
        }
    }
    if !rest.is_empty() {
        let mut st = tx.prepare_cached(&sql(1))?;
        for row in rest {
            if !run(&mut st, std::slice::from_ref(row))? {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// `n` copies of the row of values `row`, for a multi-row `VALUES`.
fn values(row: &str, n: usize) -> String {
    vec![row; n].join(", ")
}

/// Writes session slots: a row read at version 0 is inserted (with
/// [`insert_rows`]), any other is updated, compare-and-set on its version
/// and accepted rounds. A slot whose row changed since it was read fails the
/// whole write with [`StoreError::Conflict`]`("session slot")` (the keys of
/// one write are distinct: one slot per member and group).
fn write_slots(tx: &Transaction<'_>, rows: &[SessionRow]) -> Result<(), StoreError> {
    /// Binds `(member, grp, auth, sid, state, round, acc_top, acc_seen)`
    /// from `at`, and for an update `(version, read_top, read_seen)` after
    /// them.
    fn bind(
        st: &mut rusqlite::CachedStatement<'_>,
        at: usize,
        s: &SessionRow,
    ) -> Result<(), StoreError> {
        let acc = AcceptedRounds::after_write(s)?;
        st.raw_bind_parameter(at, i(s.member))?;
        st.raw_bind_parameter(at + 1, i64::from(s.group))?;
        st.raw_bind_parameter(at + 2, s.authenticated_at_ms.map(i))?;
        st.raw_bind_parameter(at + 3, s.sid.as_ref().map(|x| &x[..]))?;
        st.raw_bind_parameter(at + 4, s.sid.map(|_| s.state.as_bytes()))?;
        st.raw_bind_parameter(at + 5, i(s.round))?;
        st.raw_bind_parameter(at + 6, i(acc.top))?;
        st.raw_bind_parameter(at + 7, i(acc.seen))?;
        if s.version != 0 {
            st.raw_bind_parameter(at + 8, i(s.version))?;
            st.raw_bind_parameter(at + 9, i(s.rounds.top))?;
            st.raw_bind_parameter(at + 10, i(s.rounds.seen))?;
        }
        Ok(())
    }
    let (new, old): (Vec<&SessionRow>, Vec<&SessionRow>) =
        rows.iter().partition(|s| s.version == 0);
    // Another process inserted one of these slots since it was read: that
    // row is skipped, and the write fails.
    let all = insert_rows(
        tx,
        &new,
        8,
        |n| {
            format!(
                "INSERT INTO sessions (member, grp, last_auth_ms, sid, state, round, version, \
                 acc_top, acc_seen) VALUES {} ON CONFLICT DO NOTHING",
                values("(?, ?, coalesce(?, 0), ?, ?, ?, 1, ?, ?)", n)
            )
        },
        |st, at, s| bind(st, at, s),
    )?;
    if !all {
        return Err(StoreError::Conflict("session slot"));
    }
    // Updates go one by one: an UPDATE ... FROM (VALUES ...) of many rows
    // costs more than as many single-row updates (SQLite materializes the
    // values and updates in two passes; measured in docs/udc.md).
    let mut st = tx.prepare_cached(
        "UPDATE sessions SET last_auth_ms = coalesce(?3, last_auth_ms), sid = ?4, state = ?5, \
         round = ?6, acc_top = ?7, acc_seen = ?8, version = version + 1 \
         WHERE member = ?1 AND grp = ?2 AND version = ?9 AND acc_top = ?10 AND acc_seen = ?11",
    )?;
    for s in &old {
        bind(&mut st, 1, s)?;
        if st.raw_execute()? != 1 {
            return Err(StoreError::Conflict("session slot"));
        }
    }
    // The use each rewritten slot folded in must still be the stored one:
    // a use written since the read (it checked the same version) would
    // otherwise be lost with its window. A new slot (version 0) has none.
    let mut st = tx.prepare_cached(
        "SELECT sid, top, seen FROM session_uses WHERE member = ?1 AND grp = ?2 AND base = ?3",
    )?;
    for s in old {
        let stored = st
            .query_row(
                params![i(s.member), i64::from(s.group), i(s.version)],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let stored = match stored {
            Some((sid, top, seen)) => slot_use_cols(Some(sid), Some(top), Some(seen))?,
            None => None,
        };
        if stored != s.use_read {
            return Err(StoreError::Conflict("session slot"));
        }
    }
    Ok(())
}

/// Stores session uses ([`BatchWrite::slot_uses`]), each compare-and-set
/// on its slot's version (`base`) and on the use read: a slot read without
/// one must hold none for its version now (a stale row, of an older
/// version, is replaced), a slot read with one must still hold exactly that
/// one. Each statement checks the slot's version itself (a join, or an
/// `EXISTS`), so a row it did not change is a conflict either way. First
/// uses go 64 to a statement with [`insert_rows`] (every reading of a
/// session after a round is a first use).
fn write_uses(tx: &Transaction<'_>, uses: &[UseWrite]) -> Result<(), StoreError> {
    let (first, next): (Vec<&UseWrite>, Vec<&UseWrite>) =
        uses.iter().partition(|u| u.read.is_none());
    let all = insert_rows(
        tx,
        &first,
        6,
        |n| {
            format!(
                "INSERT INTO session_uses (member, grp, base, sid, top, seen) \
                 SELECT v.column1, v.column2, v.column3, v.column4, v.column5, v.column6 \
                 FROM (VALUES {}) AS v JOIN sessions s \
                 ON s.member = v.column1 AND s.grp = v.column2 AND s.version = v.column3 \
                 WHERE true ON CONFLICT (member, grp) DO UPDATE SET base = excluded.base, \
                 sid = excluded.sid, top = excluded.top, seen = excluded.seen \
                 WHERE session_uses.base <> excluded.base",
                values("(?, ?, ?, ?, ?, ?)", n)
            )
        },
        |st, at, w| {
            st.raw_bind_parameter(at, i(w.member))?;
            st.raw_bind_parameter(at + 1, i64::from(w.group))?;
            st.raw_bind_parameter(at + 2, i(w.base))?;
            st.raw_bind_parameter(at + 3, &w.new.sid[..])?;
            st.raw_bind_parameter(at + 4, i(w.new.top))?;
            st.raw_bind_parameter(at + 5, i(w.new.seen))?;
            Ok(())
        },
    )?;
    if !all {
        return Err(StoreError::Conflict("session slot"));
    }
    let mut st = tx.prepare_cached(
        "UPDATE session_uses SET sid = ?4, top = ?5, seen = ?6 \
         WHERE member = ?1 AND grp = ?2 AND base = ?3 AND sid = ?7 AND top = ?8 AND seen = ?9 \
         AND EXISTS (SELECT 1 FROM sessions \
         WHERE member = ?1 AND grp = ?2 AND version = ?3)",
    )?;
    for w in next {
        let Some(r) = &w.read else { continue };
        let n = st.execute(params![
            i(w.member),
            i64::from(w.group),
            i(w.base),
            &w.new.sid[..],
            i(w.new.top),
            i(w.new.seen),
            &r.sid[..],
            i(r.top),
            i(r.seen)
        ])?;
        if n != 1 {
            return Err(StoreError::Conflict("session slot"));
        }
    }
    Ok(())
}

/// Inserts `rows` into `readings` with [`insert_rows`], in arrival order
/// (migration 8: the replay window, not a key, refuses a repeated counter).
fn insert_readings(tx: &Transaction<'_>, rows: &[ReadingRow]) -> Result<(), StoreError> {
    let all = insert_rows(
        tx,
        rows,
        7,
        |n| {
            format!(
                "INSERT INTO readings (member, grp, sid, ctr, ts_ms, kind, payload) VALUES {}",
                values("(?, ?, ?, ?, ?, ?, ?)", n)
            )
        },
        |st, at, r| {
            st.raw_bind_parameter(at, i(r.member))?;
            st.raw_bind_parameter(at + 1, i64::from(r.group))?;
            st.raw_bind_parameter(at + 2, &r.sid[..])?;
            st.raw_bind_parameter(at + 3, i(r.ctr))?;
            st.raw_bind_parameter(at + 4, i(r.ts_ms))?;
            st.raw_bind_parameter(at + 5, i64::from(r.kind))?;
            st.raw_bind_parameter(at + 6, &r.payload[..])?;
            Ok(())
        },
    )?;
    // A statement inserts every row or fails; anything else is not the
    // SQLite this store was written for.
    if !all {
        return Err(StoreError::Corrupt("a readings insert skipped a row"));
    }
    Ok(())
}

/// Moves a schedule's next time compare-and-set; whether it was still
/// `expected_next_ms` (alone, or as the first step of a write).
fn claim_schedule(c: &Connection, claim: &ScheduleClaim) -> Result<bool, StoreError> {
    let n = c
        .prepare_cached("UPDATE schedules SET next_at_ms = ?3 WHERE id = ?1 AND next_at_ms = ?2")?
        .execute(params![
            i(claim.id),
            i(claim.expected_next_ms),
            i(claim.next_ms)
        ])?;
    Ok(n == 1)
}

/// The writes of [`apply`] inside `tx` (also the last step of [`recover`]).
fn apply_tx(tx: &Transaction<'_>, w: BatchWrite) -> Result<Applied, StoreError> {
    let now = i(w.now_ms);
    if let Some(c) = &w.schedule_claim
        && !claim_schedule(tx, c)?
    {
        return Err(StoreError::Conflict("schedule"));
    }
    if !w.group_epochs.is_empty() {
        // The write lock is held (IMMEDIATE): no other writer can change
        // the group between this check and the commit.
        let mut st = tx.prepare_cached("SELECT epoch FROM group_state WHERE grp = ?1")?;
        for (g, epoch) in &w.group_epochs {
            let stored: Option<i64> = st.query_row([i64::from(*g)], |r| r.get(0)).optional()?;
            if stored != Some(i(*epoch)) {
                return Err(StoreError::Conflict("group epoch"));
            }
        }
    }
    if !w.open_rounds.is_empty() {
        let mut st =
            tx.prepare_cached("SELECT status FROM rounds WHERE grp = ?1 AND round = ?2")?;
        for (g, r) in &w.open_rounds {
            let status: Option<i64> = st
                .query_row(params![i64::from(*g), i(*r)], |row| row.get(0))
                .optional()?;
            if status != Some(0) {
                return Err(StoreError::Conflict("round (closed)"));
            }
        }
    }
    // (The slot versions of `slot_uses` are checked by their writes.)
    if !w.slot_checks.is_empty() {
        let mut st =
            tx.prepare_cached("SELECT version FROM sessions WHERE member = ?1 AND grp = ?2")?;
        for c in &w.slot_checks {
            let stored: Option<i64> = st
                .query_row(params![i(c.member), i64::from(c.group)], |r| r.get(0))
                .optional()?;
            if stored != Some(i(c.version)) {
                return Err(StoreError::Conflict("session slot"));
            }
        }
    }
    if let Some(v) = &w.verdict {
        write_verdict(tx, v, now)?;
    }
    for c in &w.key_versions {
        write_key_version(tx, c)?;
    }
    for m in &w.members {
        write_member(tx, m, w.members_new_only)?;
    }
    if !w.groups.is_empty() {
        let mut st = tx.prepare_cached(
            "UPDATE group_state SET epoch = ?3, next_round = ?4, seq = ?5, config_hash = ?6, \
             state = ?7, version = version + 1 WHERE grp = ?1 AND version = ?2",
        )?;
        for g in &w.groups {
            let n = st.execute(params![
                i64::from(g.group),
                i(g.version),
                i(g.epoch),
                i(g.next_round),
                i(g.seq),
                &g.config_hash[..],
                g.state.as_bytes()
            ])?;
            if n != 1 {
                return Err(StoreError::Conflict("group"));
            }
        }
    }
    if !w.sessionless.is_empty() {
        let mut st = tx.prepare_cached(
            "SELECT 1 FROM sessions WHERE member = ?1 AND grp = ?2 AND sid IS NOT NULL",
        )?;
        for (g, members) in &w.sessionless {
            for m in members {
                if st.exists(params![i(*m), i64::from(*g)])? {
                    return Err(StoreError::Conflict("session slot"));
                }
            }
        }
    }
    if !w.new_rounds.is_empty() {
        let mut st = tx.prepare_cached(
            "INSERT INTO rounds (grp, round, opened_at_ms, closes_at_ms, mode, purpose, challenge, \
             state, status) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) ON CONFLICT DO NOTHING",
        )?;
        for r in &w.new_rounds {
            let n = st.execute(params![
                i64::from(r.group),
                i(r.round),
                i(r.opened_at_ms),
                r.closes_at_ms.map(i),
                mode_code(r.mode),
                purpose_code(r.purpose),
                &r.challenge,
                r.state.as_bytes(),
                round_status_code(r.status)
            ])?;
            if n != 1 {
                return Err(StoreError::Conflict("round"));
            }
        }
    }
    if !w.closed_rounds.is_empty() {
        let mut st = tx.prepare_cached(
            "UPDATE rounds SET status = 1, state = x'' WHERE grp = ?1 AND round = ?2",
        )?;
        for (g, r) in &w.closed_rounds {
            if st.execute(params![i64::from(*g), i(*r)])? != 1 {
                return Err(StoreError::NotFound("round"));
            }
        }
    }
    if !w.sessions.is_empty() {
        write_slots(tx, &w.sessions)?;
    }
    if !w.slot_uses.is_empty() {
        write_uses(tx, &w.slot_uses)?;
    }
    if !w.readings.is_empty() {
        insert_readings(tx, &w.readings)?;
    }
    if !w.acks.is_empty() {
        let mut st = tx.prepare_cached(
            "INSERT INTO acks (grp, seq, member, at_ms) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT DO NOTHING",
        )?;
        for a in &w.acks {
            st.execute(params![
                i64::from(a.group),
                i(a.seq),
                i(a.member),
                i(a.at_ms)
            ])?;
        }
    }
    if !w.group_messages.is_empty() {
        let mut st = tx.prepare_cached(
            "INSERT INTO group_messages (grp, seq, epoch, bytes, payload_hash, created_at_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
        )?;
        for m in &w.group_messages {
            let n = st.execute(params![
                i64::from(m.group),
                i(m.seq),
                i(m.epoch),
                &m.bytes,
                &m.payload_hash[..],
                i(m.created_at_ms)
            ])?;
            if n != 1 {
                return Err(StoreError::Conflict("group message"));
            }
        }
    }
    let gateway = w.via.as_ref().map(|v| v.gateway.as_str());
    if !w.outcomes.is_empty() {
        // One row per (group, round) of the write (migration 4).
        let mut st = tx.prepare_cached(
            "INSERT INTO round_results (grp, round, gateway, at_ms, n, outcomes) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for ((g, r), rows) in outcomes_by_round(&w.outcomes) {
            st.execute(params![
                i64::from(g),
                i(r),
                gateway,
                now,
                rows.len() as i64,
                encode_outcomes(&rows)
            ])?;
        }
    }
    if !w.round_localizations.is_empty() {
        let mut st = tx.prepare_cached(
            "UPDATE rounds SET localizations = localizations + ?3 WHERE grp = ?1 AND round = ?2",
        )?;
        for l in &w.round_localizations {
            if st.execute(params![i64::from(l.group), i(l.round), i(l.chunks)])? != 1 {
                return Err(StoreError::NotFound("round"));
            }
        }
    }
    if let Some(v) = &w.via {
        tx.prepare_cached(
            "INSERT INTO gateways (gateway, batches, entries, accepted, localizations, unverified, \
             last_batch_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (gateway) DO UPDATE \
             SET batches = batches + excluded.batches, entries = entries + excluded.entries, \
             accepted = accepted + excluded.accepted, \
             localizations = localizations + excluded.localizations, \
             unverified = unverified + excluded.unverified, \
             last_batch_ms = max(last_batch_ms, excluded.last_batch_ms)",
        )?
        .execute(params![
            &v.gateway,
            i(v.batches),
            i(v.entries),
            i(v.accepted),
            i(v.localizations),
            i(v.unverified),
            now
        ])?;
    }
    let heads = write_downlink(tx, &w.downlink, now)?;
    Ok(Applied {
        downlink_heads: heads,
    })
}

/// [`Store::recover`]: one immediate transaction.
fn recover(conn: &mut Connection, w: RecoveryWrite) -> Result<RecoveryApplied, StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let applied = recover_tx(&tx, w)?;
    tx.commit()?;
    Ok(applied)
}

/// The writes of [`recover`] inside `tx`.
fn recover_tx(tx: &Transaction<'_>, w: RecoveryWrite) -> Result<RecoveryApplied, StoreError> {
    let floor: i64 = tx
        .prepare_cached("SELECT floor FROM recovery WHERE id = 1")?
        .query_row([], |r| r.get(0))?;
    if u(floor) != w.floor_before {
        return Err(StoreError::Conflict("recovery floor"));
    }
    tx.prepare_cached(
        "UPDATE recovery SET floor = ?1, recoveries = recoveries + 1, recovered_at_ms = ?2, \
         newest_record_ms = ?3 WHERE id = 1",
    )?
    .execute(params![
        i(w.floor),
        i(w.batch.now_ms),
        w.newest_record_ms.map(i)
    ])?;
    let (mut members_revoked, mut revoke_not_found) = (0, Vec::new());
    {
        let mut set = tx.prepare_cached("UPDATE members SET status = ?1 WHERE id = ?2")?;
        let mut get = tx.prepare_cached("SELECT status FROM members WHERE id = ?1")?;
        for &id in &w.revoke {
            let status: Option<i64> = get.query_row([i(id)], |r| r.get(0)).optional()?;
            match status {
                None => revoke_not_found.push(id),
                Some(s) if s == member_status_code(MemberStatus::Revoked) => {}
                Some(_) => {
                    set.execute(params![member_status_code(MemberStatus::Revoked), i(id)])?;
                    members_revoked += 1;
                }
            }
        }
    }
    for g in &w.new_groups {
        insert_group(tx, g)?;
    }
    let sessions_dropped = tx.execute(
        "UPDATE sessions SET sid = NULL, state = NULL, version = version + 1 \
         WHERE sid IS NOT NULL",
        [],
    )? as u64;
    tx.execute("DELETE FROM session_uses", [])?;
    // Raised in Rust, not in SQL: the columns hold bit-cast u64s, and
    // SQLite's integer overflow would turn a sum into a float.
    let mut st = tx.prepare_cached("SELECT gateway, last_cursor FROM downlink_heads")?;
    let heads: Vec<(String, i64)> = collect(&mut st, [], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let mut set =
        tx.prepare_cached("UPDATE downlink_heads SET last_cursor = ?2 WHERE gateway = ?1")?;
    for (gateway, head) in &heads {
        let raised = u(*head)
            .checked_add(w.raise_by)
            .ok_or(StoreError::CounterExhausted("downlink cursor"))?;
        set.execute(params![gateway, i(raised)])?;
    }
    let version = registry_version_tx(tx)?.checked_add(w.raise_by);
    let version = version.ok_or(StoreError::CounterExhausted("registry version"))?;
    tx.execute(
        "UPDATE registry_version SET v = ?1 WHERE id = 1",
        [i(version)],
    )?;
    apply_tx(tx, w.batch)?;
    Ok(RecoveryApplied {
        sessions_dropped,
        gateways_raised: heads.len() as u64,
        members_revoked,
        revoke_not_found,
    })
}

/// Inserts the verdict, or finalizes a pending one of the same batch, or
/// fails with [`StoreError::VerdictExists`] before anything else is written.
fn write_verdict(tx: &Transaction<'_>, v: &VerdictWrite, now: i64) -> Result<(), StoreError> {
    let inserted = tx
        .prepare_cached(
            "INSERT INTO verdicts (gateway, batch_id, batch_hash, verdict, final, created_at_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
        )?
        .execute(params![
            &v.gateway,
            i(v.batch_id),
            &v.batch_hash[..],
            &v.verdict,
            v.pending.is_none(),
            now
        ])?;
    if inserted == 1 {
        if let Some(p) = &v.pending {
            tx.prepare_cached(
                "INSERT INTO localizations (gateway, batch_id, batch_hash, verdict, pending, \
                 expires_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                &v.gateway,
                i(v.batch_id),
                &v.batch_hash[..],
                &v.verdict,
                p.pending.as_bytes(),
                i(p.expires_at_ms)
            ])?;
        }
        return Ok(());
    }
    // Only a final verdict may replace a pending verdict of the same batch.
    if v.pending.is_none() {
        let finalized = tx
            .prepare_cached(
                "UPDATE verdicts SET verdict = ?3, final = 1 WHERE gateway = ?1 AND batch_id = ?2 \
                 AND final = 0 AND batch_hash = ?4",
            )?
            .execute(params![
                &v.gateway,
                i(v.batch_id),
                &v.verdict,
                &v.batch_hash[..]
            ])?;
        if finalized == 1 {
            tx.prepare_cached("DELETE FROM localizations WHERE gateway = ?1 AND batch_id = ?2")?
                .execute(params![&v.gateway, i(v.batch_id)])?;
            return Ok(());
        }
    }
    let (hash, is_final): (Vec<u8>, bool) = tx
        .prepare_cached(
            "SELECT batch_hash, final FROM verdicts WHERE gateway = ?1 AND batch_id = ?2",
        )?
        .query_row(params![&v.gateway, i(v.batch_id)], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    Err(StoreError::VerdictExists {
        batch_hash: hash_col(hash, "batch hash")?,
        is_final,
    })
}

/// Inserts a new group's row (version 1); a group that already has one is
/// a [`StoreError::Conflict`].
fn insert_group(c: &Connection, row: &GroupRow) -> Result<(), StoreError> {
    let n = c
        .prepare_cached(
            "INSERT INTO group_state (grp, epoch, next_round, seq, config_hash, state, version) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1) ON CONFLICT DO NOTHING",
        )?
        .execute(params![
            i64::from(row.group),
            i(row.epoch),
            i(row.next_round),
            i(row.seq),
            &row.config_hash[..],
            row.state.as_bytes()
        ])?;
    if n == 1 {
        Ok(())
    } else {
        Err(StoreError::Conflict("group"))
    }
}

fn write_member(tx: &Transaction<'_>, m: &MemberRow, new_only: bool) -> Result<(), StoreError> {
    let (ks, key) = key_source_cols(&m.key_source);
    let sql = if new_only {
        "INSERT INTO members (id, kv, key_source, imported_key, status, added_at_ms, min_kv) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (id) DO NOTHING"
    } else {
        "INSERT INTO members (id, kv, key_source, imported_key, status, added_at_ms, min_kv) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (id) DO UPDATE SET kv = excluded.kv, \
         key_source = excluded.key_source, imported_key = excluded.imported_key, \
         status = excluded.status, added_at_ms = excluded.added_at_ms, min_kv = excluded.min_kv"
    };
    let written = tx.prepare_cached(sql)?.execute(params![
        i(m.id),
        i64::from(m.kv),
        ks,
        key,
        member_status_code(m.status),
        i(m.added_at_ms),
        i64::from(m.min_kv.min(m.kv))
    ])?;
    if new_only && written == 0 {
        return Err(StoreError::Conflict("member (registered meanwhile)"));
    }
    tx.prepare_cached("DELETE FROM member_groups WHERE member = ?1")?
        .execute([i(m.id)])?;
    let mut st = tx.prepare_cached("INSERT INTO member_groups (member, grp) VALUES (?1, ?2)")?;
    for g in normalized_groups(&m.groups) {
        st.execute(params![i(m.id), i64::from(g)])?;
    }
    Ok(())
}

/// Applies one [`KeyVersionChange`] (see there).
fn write_key_version(tx: &Transaction<'_>, c: &KeyVersionChange) -> Result<(), StoreError> {
    match *c {
        KeyVersionChange::Issued {
            member,
            from_kv,
            to_kv,
        } => {
            let n = tx
                .prepare_cached(
                    "UPDATE members SET kv = ?3, min_kv = coalesce(min_kv, kv) \
                     WHERE id = ?1 AND kv = ?2 AND status = 0",
                )?
                .execute(params![i(member), i64::from(from_kv), i64::from(to_kv)])?;
            if n != 1 {
                return Err(StoreError::Conflict("member key version"));
            }
        }
        KeyVersionChange::Expected { member, kv, min_kv } => {
            let stored: Option<(i64, i64)> = tx
                .prepare_cached("SELECT kv, coalesce(min_kv, kv) FROM members WHERE id = ?1")?
                .query_row([i(member)], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            if stored.is_some_and(|s| s != (i64::from(kv), i64::from(min_kv))) {
                return Err(StoreError::Conflict("member key version"));
            }
        }
        KeyVersionChange::Confirmed { member, kv } => {
            tx.prepare_cached(
                "UPDATE members SET min_kv = ?2 \
                 WHERE id = ?1 AND coalesce(min_kv, kv) < ?2 AND kv >= ?2",
            )?
            .execute(params![i(member), i64::from(kv)])?;
        }
    }
    Ok(())
}

/// Appends records to gateway queues, fanning group records out to
/// subscribers; returns each touched queue's new head.
fn write_downlink(
    tx: &Transaction<'_>,
    pushes: &[DownlinkPush],
    now: i64,
) -> Result<Vec<(String, u64)>, StoreError> {
    if pushes.is_empty() {
        return Ok(Vec::new());
    }
    let mut per_gateway: BTreeMap<String, Vec<&DownlinkRecord>> = BTreeMap::new();
    let mut subscribers: HashMap<u32, Vec<String>> = HashMap::new();
    let mut subs =
        tx.prepare_cached("SELECT gateway FROM subscriptions WHERE grp = ?1 ORDER BY gateway")?;
    for p in pushes {
        for rec in &p.records {
            match &p.target {
                DownlinkTarget::Gateway(g) => per_gateway.entry(g.clone()).or_default().push(rec),
                DownlinkTarget::Subscribers => {
                    if let std::collections::hash_map::Entry::Vacant(e) =
                        subscribers.entry(rec.group)
                    {
                        e.insert(collect(&mut subs, [i64::from(rec.group)], |r| {
                            Ok(r.get(0)?)
                        })?);
                    }
                    for g in subscribers.get(&rec.group).into_iter().flatten() {
                        per_gateway.entry(g.clone()).or_default().push(rec);
                    }
                }
            }
        }
    }
    let mut head = tx.prepare_cached(
        "INSERT INTO downlink_heads (gateway, last_cursor) \
         VALUES (?1, ?2 + (SELECT floor FROM recovery WHERE id = 1)) \
         ON CONFLICT (gateway) DO UPDATE SET last_cursor = last_cursor + ?2 \
         RETURNING last_cursor",
    )?;
    let mut ins = tx.prepare_cached(
        "INSERT INTO downlink (gateway, cursor, n, audience, grp, member, message, \
         created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?;
    let mut heads = Vec::with_capacity(per_gateway.len());
    for (gateway, recs) in per_gateway {
        let n = recs.len() as i64;
        let last: i64 = head.query_row(params![&gateway, n], |r| r.get(0))?;
        // One row per queue: a single record as is, several as a bundle
        // keyed by the last cursor (migration 3).
        match recs[..] {
            [rec] => {
                let (aud, member) = audience_cols(rec.audience);
                ins.execute(params![
                    &gateway,
                    last,
                    1,
                    aud,
                    i64::from(rec.group),
                    member,
                    &rec.message,
                    now
                ])?;
            }
            _ => {
                ins.execute(params![&gateway, last, n, 0, 0, 0, bundle(&recs), now])?;
            }
        }
        heads.push((gateway, u(last)));
    }
    Ok(heads)
}

// ---------------------------------------------------------------------------
// Batch reads
// ---------------------------------------------------------------------------

/// The signed key range of a batch's member ids when one range scan reads
/// them cheaper than a point lookup each: at least 16 strictly increasing
/// ids (as a batch's are) spanning at most 4 keys per id, on one side of
/// the signed order's wrap. `None`: look them up one by one.
fn dense_span(ids: &[u64]) -> Option<(i64, i64)> {
    let (&first, &last) = (ids.first()?, ids.last()?);
    let span = last.checked_sub(first)?;
    let dense = ids.len() >= 16
        && first >> 63 == last >> 63
        && span / 4 < ids.len() as u64
        && ids.windows(2).all(|w| w[0] < w[1]);
    dense.then(|| (i(first), i(last)))
}

/// [`Store::members`] for a dense batch: the members and their groups in
/// the range, two range scans merged in order.
fn members_in_span(
    tx: &Transaction<'_>,
    ids: &[u64],
    lo: i64,
    hi: i64,
) -> Result<Vec<Option<MemberRow>>, StoreError> {
    let mut st = tx.prepare_cached(
        "SELECT id, kv, key_source, imported_key, status, added_at_ms, NULL, \
         coalesce(min_kv, kv) FROM members WHERE id BETWEEN ?1 AND ?2 ORDER BY id",
    )?;
    let found = collect(&mut st, params![lo, hi], member_row)?;
    let mut st = tx.prepare_cached(
        "SELECT member, grp FROM member_groups WHERE member BETWEEN ?1 AND ?2 \
         ORDER BY member, grp",
    )?;
    let groups = collect(&mut st, params![lo, hi], |r| {
        Ok((u(r.get(0)?), u32_col(r.get(1)?, "member group")?))
    })?;
    let (mut found, mut groups) = (found.into_iter().peekable(), groups.into_iter().peekable());
    let mut out = Vec::with_capacity(ids.len());
    for &id in ids {
        // Both scans and `ids` ascend in the same (one-signed-half) order.
        while found.next_if(|m| m.id < id).is_some() {}
        while groups.next_if(|g| g.0 < id).is_some() {}
        let Some(mut row) = found.next_if(|m| m.id == id) else {
            out.push(None);
            continue;
        };
        while let Some((_, g)) = groups.next_if(|g| g.0 == id) {
            row.groups.push(g);
        }
        out.push(Some(row));
    }
    Ok(out)
}

/// Every outcome row stored for a round, in the order [`fold_outcomes`]
/// wants: version 1's per-member rows first, then the per-batch rows of
/// version 4 by id.
fn round_outcome_rows(
    tx: &Transaction<'_>,
    group: u32,
    round: u64,
) -> Result<Vec<OutcomeRow>, StoreError> {
    let (g, r) = (i64::from(group), i(round));
    let mut st = tx.prepare_cached(
        "SELECT member, kind, reason, gateway FROM round_outcomes WHERE grp = ?1 AND round = ?2 \
         ORDER BY at_ms, member",
    )?;
    let mut out = collect(&mut st, params![g, r], |x| {
        Ok(OutcomeRow {
            group,
            round,
            member: u(x.get(0)?),
            kind: outcome_col(x.get(1)?)?,
            reason: Cow::Owned(x.get(2)?),
            gateway: x.get(3)?,
        })
    })?;
    let mut st = tx.prepare_cached(
        "SELECT gateway, n, outcomes FROM round_results WHERE grp = ?1 AND round = ?2 ORDER BY id",
    )?;
    let mut rows = st.query(params![g, r])?;
    while let Some(x) = rows.next()? {
        let gateway: Option<String> = x.get(0)?;
        let blob: Vec<u8> = x.get(2)?;
        decode_outcomes(group, round, gateway.as_deref(), x.get(1)?, &blob, &mut out)?;
    }
    Ok(out)
}

/// The active members of `group` after `after`, in (signed) id order.
fn active_members(
    tx: &Transaction<'_>,
    group: u32,
    after: Option<u64>,
) -> Result<Vec<u64>, StoreError> {
    let mut st = tx.prepare_cached(&format!(
        "SELECT mg.member FROM member_groups mg JOIN members m ON m.id = mg.member \
         WHERE mg.grp = ?1 AND m.status = 0 AND mg.member {} ?2 ORDER BY mg.member",
        after_op(after)
    ))?;
    collect(&mut st, params![i64::from(group), after_key(after)], |r| {
        Ok(u(r.get(0)?))
    })
}

/// [`Store::registry_version`] inside a transaction.
fn registry_version_tx(tx: &Transaction<'_>) -> Result<u64, StoreError> {
    let v: i64 = tx
        .prepare_cached("SELECT v FROM registry_version WHERE id = 1")?
        .query_row([], |r| r.get(0))?;
    Ok(u(v))
}

/// The recovery floor's row.
fn recovery_state_tx(tx: &Transaction<'_>) -> Result<RecoveryState, StoreError> {
    let (floor, n, at, newest): (i64, i64, Option<i64>, Option<i64>) = tx
        .prepare_cached(
            "SELECT floor, recoveries, recovered_at_ms, newest_record_ms FROM recovery \
             WHERE id = 1",
        )?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
    Ok(RecoveryState {
        floor: u(floor),
        recoveries: u(n),
        recovered_at_ms: at.map(u),
        newest_record_ms: newest.map(u),
    })
}

/// [`Store::members`] inside a read transaction.
fn members_tx(tx: &Transaction<'_>, ids: &[u64]) -> Result<Vec<Option<MemberRow>>, StoreError> {
    if let Some((lo, hi)) = dense_span(ids) {
        return members_in_span(tx, ids, lo, hi);
    }
    let mut st = tx.prepare_cached(&format!("SELECT {MEMBER_COLS} FROM members WHERE id = ?1"))?;
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let mut rows = st.query([i(*id)])?;
        out.push(match rows.next()? {
            Some(r) => Some(member_row(r)?),
            None => None,
        });
    }
    Ok(out)
}

/// A whole slot row ([`stored_slot`]) with its member, for [`slots_of`].
fn keyed_slot(r: &Row<'_>) -> Result<(u64, StoredSlot), StoreError> {
    stored_slot(r).map(|s| (s.member, s))
}

/// [`Store::sessions`] inside a read transaction.
fn sessions_tx(
    tx: &Transaction<'_>,
    keys: &[(u64, u32)],
) -> Result<Vec<Option<StoredSlot>>, StoreError> {
    if let Some(group) = keys.first().map(|k| k.1)
        && keys.iter().all(|k| k.1 == group)
    {
        let ids: Vec<u64> = keys.iter().map(|k| k.0).collect();
        return slots_of(tx, &ids, group, SESSION_COLS, keyed_slot);
    }
    slot_lookups(tx, keys.iter().copied(), SESSION_COLS, keyed_slot)
}

/// The columns of a [`BatchSlot`], after the member. The state is read only
/// with a session id, as [`stored_slot`] does. Unlike [`stored_slot`] the
/// batch path reads neither the session id nor the group, so it does not
/// check their shape: a slot whose sealed state is damaged still fails to
/// open (its AEAD tag), and listings check the rest.
const BATCH_SLOT_COLS: &str = "s.member, CASE WHEN s.sid IS NULL THEN NULL ELSE s.state END, \
    s.version, s.acc_top, s.acc_seen, u.sid, u.top, u.seen";

fn batch_slot(r: &Row<'_>) -> Result<(u64, BatchSlot), StoreError> {
    let state: Option<Vec<u8>> = r.get(1)?;
    Ok((
        u(r.get(0)?),
        BatchSlot {
            state: state.map(Sealed::new),
            version: u(r.get(2)?),
            rounds: AcceptedRounds {
                top: u(r.get(3)?),
                seen: u(r.get(4)?),
            },
            used: slot_use_cols(r.get(5)?, r.get(6)?, r.get(7)?)?,
        },
    ))
}

/// The session slots of a batch's members `ids` in `group`, in that order.
fn batch_slots_tx(
    tx: &Transaction<'_>,
    ids: &[u64],
    group: u32,
) -> Result<Vec<Option<BatchSlot>>, StoreError> {
    slots_of(tx, ids, group, BATCH_SLOT_COLS, batch_slot)
}

/// The slots of `ids` in `group`, in that order, as `row` reads the columns
/// `cols` (the first of which is the member): with one range scan when the
/// ids are dense ([`dense_span`]), else one point lookup per id.
fn slots_of<T>(
    tx: &Transaction<'_>,
    ids: &[u64],
    group: u32,
    cols: &str,
    row: impl Fn(&Row<'_>) -> Result<(u64, T), StoreError>,
) -> Result<Vec<Option<T>>, StoreError> {
    if let Some((lo, hi)) = dense_span(ids) {
        let mut out = Vec::with_capacity(ids.len());
        let mut st = tx.prepare_cached(&format!(
            "SELECT {cols} FROM {SLOTS_FROM} WHERE s.member BETWEEN ?1 AND ?2 AND s.grp = ?3 \
             ORDER BY s.member"
        ))?;
        let found = collect(&mut st, params![lo, hi, i64::from(group)], row)?;
        let mut found = found.into_iter().peekable();
        for &id in ids {
            while found.next_if(|(m, _)| *m < id).is_some() {}
            out.push(found.next_if(|(m, _)| *m == id).map(|(_, s)| s));
        }
        return Ok(out);
    }
    slot_lookups(tx, ids.iter().map(|&m| (m, group)), cols, row)
}

/// The slots of `keys` (member, group), in that order, one point lookup
/// each (see [`slots_of`]).
fn slot_lookups<T>(
    tx: &Transaction<'_>,
    keys: impl ExactSizeIterator<Item = (u64, u32)>,
    cols: &str,
    row: impl Fn(&Row<'_>) -> Result<(u64, T), StoreError>,
) -> Result<Vec<Option<T>>, StoreError> {
    let mut st = tx.prepare_cached(&format!(
        "SELECT {cols} FROM {SLOTS_FROM} WHERE s.member = ?1 AND s.grp = ?2"
    ))?;
    let mut out = Vec::with_capacity(keys.len());
    for (m, g) in keys {
        let mut rows = st.query(params![i(m), i64::from(g)])?;
        out.push(match rows.next()? {
            Some(r) => Some(row(r)?.1),
            None => None,
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// The trait
// ---------------------------------------------------------------------------

impl Store for SqliteStore {
    async fn members(&self, ids: Vec<u64>) -> Result<Vec<Option<MemberRow>>, StoreError> {
        self.read(move |tx| members_tx(tx, &ids)).await
    }

    async fn list_members(
        &self,
        after: Option<u64>,
        limit: u32,
    ) -> Result<Vec<MemberRow>, StoreError> {
        self.read(move |tx| {
            let mut st = tx.prepare_cached(&format!(
                "SELECT {MEMBER_COLS} FROM members WHERE id {} ?1 ORDER BY id LIMIT ?2",
                after_op(after)
            ))?;
            collect(
                &mut st,
                params![after_key(after), i64::from(limit)],
                member_row,
            )
        })
        .await
    }

    async fn group_members(
        &self,
        group: u32,
        after: Option<u64>,
        limit: u32,
    ) -> Result<Vec<u64>, StoreError> {
        self.read(move |tx| {
            let mut st = tx.prepare_cached(&format!(
                "SELECT mg.member FROM member_groups mg JOIN members m ON m.id = mg.member \
                 WHERE mg.grp = ?1 AND m.status = 0 AND mg.member {} ?2 ORDER BY mg.member LIMIT ?3",
                after_op(after)
            ))?;
            collect(
                &mut st,
                params![i64::from(group), after_key(after), i64::from(limit)],
                |r| Ok(u(r.get(0)?)),
            )
        })
        .await
    }

    async fn set_member_status(&self, id: u64, status: MemberStatus) -> Result<bool, StoreError> {
        self.call(move |c| {
            let n = c
                .prepare_cached("UPDATE members SET status = ?2 WHERE id = ?1")?
                .execute(params![i(id), member_status_code(status)])?;
            Ok(n == 1)
        })
        .await
    }

    async fn set_kv(&self, id: u64, kv: u32, key_source: KeySource) -> Result<bool, StoreError> {
        self.call(move |c| {
            let (ks, key) = key_source_cols(&key_source);
            let n = c
                .prepare_cached(
                    "UPDATE members SET kv = ?2, min_kv = ?2, key_source = ?3, imported_key = ?4 \
                     WHERE id = ?1",
                )?
                .execute(params![i(id), i64::from(kv), ks, key])?;
            Ok(n == 1)
        })
        .await
    }

    async fn insert_group(&self, row: GroupRow) -> Result<(), StoreError> {
        self.call(move |c| insert_group(c, &row)).await
    }

    async fn group(&self, group: u32) -> Result<Option<GroupRow>, StoreError> {
        self.read(move |tx| {
            let mut st = tx.prepare_cached(&format!(
                "SELECT {GROUP_COLS} FROM group_state WHERE grp = ?1"
            ))?;
            Ok(collect(&mut st, [i64::from(group)], group_row)?.pop())
        })
        .await
    }

    async fn list_groups(&self) -> Result<Vec<GroupRow>, StoreError> {
        self.read(move |tx| {
            let mut st = tx.prepare_cached(&format!(
                "SELECT {GROUP_COLS} FROM group_state ORDER BY grp"
            ))?;
            collect(&mut st, [], group_row)
        })
        .await
    }

    async fn round(&self, group: u32, round: u64) -> Result<Option<RoundRow>, StoreError> {
        self.read(move |tx| {
            let mut st = tx.prepare_cached(&format!(
                "SELECT {ROUND_COLS} FROM rounds WHERE grp = ?1 AND round = ?2"
            ))?;
            Ok(collect(&mut st, params![i64::from(group), i(round)], round_row)?.pop())
        })
        .await
    }

    async fn open_rounds(&self) -> Result<Vec<RoundRow>, StoreError> {
        self.read(move |tx| {
            let mut st = tx.prepare_cached(&format!(
                "SELECT {ROUND_COLS} FROM rounds WHERE status = 0 ORDER BY grp, round"
            ))?;
            collect(&mut st, [], round_row)
        })
        .await
    }

    async fn round_report(
        &self,
        group: u32,
        round: u64,
    ) -> Result<Option<RoundReport>, StoreError> {
        self.read(move |tx| {
            let mut st = tx.prepare_cached(&format!(
                "SELECT {ROUND_COLS}, localizations FROM rounds WHERE grp = ?1 AND round = ?2"
            ))?;
            let Some((row, localizations)) =
                collect(&mut st, params![i64::from(group), i(round)], |x| {
                    Ok((round_row(x)?, u(x.get(9)?)))
                })?
                .pop()
            else {
                return Ok(None);
            };
            let folded = fold_outcomes(round_outcome_rows(tx, group, round)?);
            let active = active_members(tx, group, None)?;
            Ok(Some(report(row, &folded, &active, localizations)))
        })
        .await
    }

    async fn round_outcomes(
        &self,
        group: u32,
        round: u64,
        after: Option<u64>,
        limit: u32,
    ) -> Result<Vec<OutcomeRow>, StoreError> {
        self.read(move |tx| {
            let folded = fold_outcomes(round_outcome_rows(tx, group, round)?);
            Ok(outcomes_page(folded, after, limit))
        })
        .await
    }

    async fn round_missing(
        &self,
        group: u32,
        round: u64,
        after: Option<u64>,
        limit: u32,
    ) -> Result<Vec<u64>, StoreError> {
        self.read(move |tx| {
            let folded = fold_outcomes(round_outcome_rows(tx, group, round)?);
            let active = active_members(tx, group, after)?;
            Ok(missing_page(&folded, active, limit))
        })
        .await
    }

    async fn verdict(
        &self,
        gateway: &str,
        batch_id: u64,
    ) -> Result<Option<StoredVerdict>, StoreError> {
        let gateway = gateway.to_owned();
        self.read(move |tx| {
            let mut st = tx.prepare_cached(
                "SELECT batch_hash, verdict, final FROM verdicts WHERE gateway = ?1 AND batch_id = ?2",
            )?;
            Ok(collect(&mut st, params![gateway, i(batch_id)], |r| {
                Ok(StoredVerdict {
                    batch_hash: hash_col(r.get(0)?, "batch hash")?,
                    verdict: r.get(1)?,
                    is_final: r.get(2)?,
                })
            })?
            .pop())
        })
        .await
    }

    async fn pending_localization(
        &self,
        gateway: &str,
        batch_id: u64,
    ) -> Result<Option<PendingLocalization>, StoreError> {
        let gateway = gateway.to_owned();
        self.read(move |tx| {
            let mut st = tx.prepare_cached(&format!(
                "SELECT {LOCALIZATION_COLS} FROM localizations WHERE gateway = ?1 AND batch_id = ?2"
            ))?;
            Ok(collect(&mut st, params![gateway, i(batch_id)], localization_row)?.pop())
        })
        .await
    }

    async fn expired_localizations(
        &self,
        now_ms: u64,
        limit: u32,
    ) -> Result<Vec<PendingLocalization>, StoreError> {
        self.read(move |tx| {
            let mut st = tx.prepare_cached(&format!(
                "SELECT {LOCALIZATION_COLS} FROM localizations WHERE expires_at_ms <= ?1 \
                 ORDER BY expires_at_ms, gateway, batch_id LIMIT ?2"
            ))?;
            collect(
                &mut st,
                params![i(now_ms), i64::from(limit)],
                localization_row,
            )
        })
        .await
    }

    async fn due_work(&self, now_ms: u64) -> Result<DueWork, StoreError> {
        // One read transaction for the three questions: the pass runs every
        // second, and each store call costs a blocking-pool hand-off and a
        // transaction of its own.
        self.read(move |tx| {
            let localizations = tx
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM localizations WHERE expires_at_ms <= ?1)",
                )?
                .query_row([i(now_ms)], |r| r.get::<_, bool>(0))?;
            let mut st = tx.prepare_cached(&format!(
                "SELECT {SCHEDULE_COLS} FROM schedules WHERE next_at_ms <= ?1 ORDER BY id"
            ))?;
            let schedules = collect(&mut st, [i(now_ms)], schedule_row)?;
            let mut st = tx.prepare_cached(&format!(
                "SELECT {ROUND_COLS} FROM rounds WHERE status = 0 ORDER BY grp, round"
            ))?;
            let open_rounds = collect(&mut st, [], round_row)?;
            Ok(DueWork {
                localizations,
                schedules,
                open_rounds,
            })
        })
        .await
    }

    async fn apply_batch(&self, write: BatchWrite) -> Result<Applied, StoreError> {
        self.call(move |c| apply(c, write)).await
    }

    async fn sessions(&self, keys: Vec<(u64, u32)>) -> Result<Vec<Option<StoredSlot>>, StoreError> {
        self.read(move |tx| sessions_tx(tx, &keys)).await
    }

    async fn batch_reads(
        &self,
        group: u32,
        ids: Vec<u64>,
        round: Option<u64>,
        fetch: Option<MemberFetch>,
    ) -> Result<BatchReads, StoreError> {
        self.read(move |tx| {
            let registry_version = registry_version_tx(tx)?;
            let mut st = tx.prepare_cached(&format!(
                "SELECT {GROUP_COLS} FROM group_state WHERE grp = ?1"
            ))?;
            let group_row = collect(&mut st, [i64::from(group)], group_row)?.pop();
            let round = match round {
                Some(r) => {
                    let mut st = tx.prepare_cached(&format!(
                        "SELECT {ROUND_COLS} FROM rounds WHERE grp = ?1 AND round = ?2"
                    ))?;
                    collect(&mut st, params![i64::from(group), i(r)], round_row)?.pop()
                }
                None => None,
            };
            let (asked, members_of) =
                MemberFetch::ids_to_read(fetch.as_ref(), registry_version, &ids);
            let members = members_tx(tx, asked)?;
            let sessions = batch_slots_tx(tx, &ids, group)?;
            Ok(BatchReads {
                group: group_row,
                registry_version,
                members_of,
                members,
                sessions,
                round,
            })
        })
        .await
    }

    async fn registry_version(&self) -> Result<u64, StoreError> {
        self.read(registry_version_tx).await
    }

    async fn member_sessions(&self, first: u64, last: u64) -> Result<Vec<StoredSlot>, StoreError> {
        self.read(move |tx| {
            let mut st = tx.prepare_cached(&format!(
                "SELECT {SESSION_COLS} FROM {SLOTS_FROM} WHERE s.member BETWEEN ?1 AND ?2 \
                 ORDER BY s.member, s.grp"
            ))?;
            collect(&mut st, [i(first), i(last)], stored_slot)
        })
        .await
    }

    async fn drop_all_sessions(&self) -> Result<u64, StoreError> {
        self.call(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let n = tx.execute(
                "UPDATE sessions SET sid = NULL, state = NULL, version = version + 1 \
                 WHERE sid IS NOT NULL",
                [],
            )?;
            // Stale now (the versions moved); deleted so none outlives its
            // slot's sessions.
            tx.execute("DELETE FROM session_uses", [])?;
            tx.commit()?;
            Ok(n as u64)
        })
        .await
    }

    async fn recovery_state(&self) -> Result<RecoveryState, StoreError> {
        self.read(recovery_state_tx).await
    }

    async fn recovery_reads(&self) -> Result<RecoveryReads, StoreError> {
        self.read(|tx| {
            let state = recovery_state_tx(tx)?;
            let mut st = tx.prepare_cached(&format!(
                "SELECT {GROUP_COLS} FROM group_state ORDER BY grp"
            ))?;
            let groups = collect(&mut st, [], group_row)?;
            let mut st = tx.prepare_cached(
                "SELECT grp FROM member_groups UNION SELECT grp FROM subscriptions \
                 UNION SELECT grp FROM schedules EXCEPT SELECT grp FROM group_state ORDER BY 1",
            )?;
            let named = collect(&mut st, [], |r| Ok(r.get::<_, i64>(0)?))?;
            let named_without_row = named
                .into_iter()
                .map(|g| u32::try_from(g).map_err(|_| StoreError::Corrupt("group id")))
                .collect::<Result<_, _>>()?;
            let mut st = tx.prepare_cached(&format!(
                "SELECT {ROUND_COLS} FROM rounds WHERE status = 0 ORDER BY grp, round"
            ))?;
            let open_rounds = collect(&mut st, [], round_row)?;
            let newest: Option<i64> = tx
                .prepare_cached(NEWEST_RECORD_SQL)?
                .query_row([], |r| r.get(0))?;
            Ok(RecoveryReads {
                state,
                groups,
                named_without_row,
                open_rounds,
                newest_record_ms: newest.map(u),
            })
        })
        .await
    }

    async fn recover(&self, write: RecoveryWrite) -> Result<RecoveryApplied, StoreError> {
        self.call(move |c| recover(c, write)).await
    }

    async fn count_sessions(&self) -> Result<u64, StoreError> {
        self.read(|tx| {
            let n: i64 = tx
                .prepare_cached("SELECT count(*) FROM sessions WHERE sid IS NOT NULL")?
                .query_row([], |r| r.get(0))?;
            Ok(u(n))
        })
        .await
    }

    async fn read_downlink(
        &self,
        gateway: &str,
        after: u64,
        limit: u32,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        let gateway = gateway.to_owned();
        self.read(move |tx| {
            // Rows are keyed by their last cursor: a bundle straddling
            // `after` is read whole and cut.
            let mut st = tx.prepare_cached(
                "SELECT cursor, n, audience, grp, member, message FROM downlink \
                 WHERE gateway = ?1 AND cursor > ?2 ORDER BY cursor LIMIT ?3",
            )?;
            let mut rows = st.query(params![gateway, i(after), i64::from(limit)])?;
            let mut page = DownlinkPage::new(limit);
            while let Some(r) = rows.next()? {
                if page.full() {
                    break;
                }
                DownlinkRow {
                    last: u(r.get(0)?),
                    n: r.get(1)?,
                    audience: r.get(2)?,
                    group: r.get(3)?,
                    member: r.get(4)?,
                    message: r.get(5)?,
                }
                .unbundle(after, &mut page)?;
            }
            Ok(page.records)
        })
        .await
    }

    async fn latest_cursor(&self, gateway: &str) -> Result<u64, StoreError> {
        let gateway = gateway.to_owned();
        self.read(move |tx| {
            let v: Option<i64> = tx
                .prepare_cached("SELECT last_cursor FROM downlink_heads WHERE gateway = ?1")?
                .query_row([gateway], |r| r.get(0))
                .optional()?;
            Ok(v.map_or(0, u))
        })
        .await
    }

    async fn trim_downlink(&self, before_ms: u64) -> Result<u64, StoreError> {
        self.call(move |c| {
            // Records, not rows (a row may hold a bundle).
            let mut st =
                c.prepare_cached("DELETE FROM downlink WHERE created_at_ms < ?1 RETURNING n")?;
            let mut rows = st.query([i(before_ms)])?;
            let mut n = 0u64;
            while let Some(r) = rows.next()? {
                n = n.saturating_add(u(r.get(0)?));
            }
            Ok(n)
        })
        .await
    }

    async fn trim_readings(&self, before_ms: u64) -> Result<u64, StoreError> {
        self.call(move |c| {
            let n = c.execute("DELETE FROM readings WHERE ts_ms < ?1", [ts(before_ms)])?;
            Ok(n as u64)
        })
        .await
    }

    async fn trim_verdicts(&self, before_ms: u64) -> Result<u64, StoreError> {
        self.call(move |c| {
            let n = c.execute(
                "DELETE FROM verdicts WHERE final = 1 AND created_at_ms < ?1",
                [ts(before_ms)],
            )?;
            Ok(n as u64)
        })
        .await
    }

    async fn set_subscriptions(
        &self,
        gateway: &str,
        groups: Vec<u32>,
        now_ms: u64,
    ) -> Result<u64, StoreError> {
        let gateway = gateway.to_owned();
        self.call(move |c| {
            // IMMEDIATE: no round opens between reading the open rounds and
            // the commit (a round opened after it fans out to the new rows).
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let old: Vec<u32> = {
                let mut st =
                    tx.prepare_cached("SELECT grp FROM subscriptions WHERE gateway = ?1")?;
                collect(&mut st, [&gateway], |r| {
                    u32_col(r.get(0)?, "subscription group")
                })?
            };
            let groups = normalized_groups(&groups);
            tx.execute("DELETE FROM subscriptions WHERE gateway = ?1", [&gateway])?;
            {
                let mut st =
                    tx.prepare_cached("INSERT INTO subscriptions (gateway, grp) VALUES (?1, ?2)")?;
                for &g in &groups {
                    st.execute(params![&gateway, i64::from(g)])?;
                }
            }
            let mut records = Vec::new();
            {
                let mut st = tx.prepare_cached(
                    "SELECT challenge FROM rounds WHERE status = ?1 AND grp = ?2 \
                     AND (closes_at_ms IS NULL OR closes_at_ms > ?3) ORDER BY round",
                )?;
                for &g in groups.iter().filter(|g| !old.contains(g)) {
                    let open = round_status_code(RoundStatus::Open);
                    for message in collect(&mut st, params![open, i64::from(g), ts(now_ms)], |r| {
                        Ok(r.get::<_, Vec<u8>>(0)?)
                    })? {
                        records.push(DownlinkRecord {
                            audience: Audience::Group,
                            group: g,
                            message,
                        });
                    }
                }
            }
            let queued = records.len() as u64;
            if !records.is_empty() {
                let push = DownlinkPush {
                    target: DownlinkTarget::Gateway(gateway.clone()),
                    records,
                };
                write_downlink(&tx, &[push], ts(now_ms))?;
            }
            tx.commit()?;
            Ok(queued)
        })
        .await
    }

    async fn subscriptions(&self, gateway: &str) -> Result<Vec<u32>, StoreError> {
        let gateway = gateway.to_owned();
        self.read(move |tx| {
            let mut st =
                tx.prepare_cached("SELECT grp FROM subscriptions WHERE gateway = ?1 ORDER BY grp")?;
            collect(&mut st, [gateway], |r| {
                u32_col(r.get(0)?, "subscription group")
            })
        })
        .await
    }

    async fn group_message(
        &self,
        group: u32,
        seq: u64,
    ) -> Result<Option<GroupMessageRow>, StoreError> {
        self.read(move |tx| {
            let mut st = tx.prepare_cached(
                "SELECT epoch, bytes, payload_hash, created_at_ms FROM group_messages \
                 WHERE grp = ?1 AND seq = ?2",
            )?;
            Ok(collect(&mut st, params![i64::from(group), i(seq)], |r| {
                Ok(GroupMessageRow {
                    group,
                    seq,
                    epoch: u(r.get(0)?),
                    bytes: r.get(1)?,
                    payload_hash: hash_col(r.get(2)?, "group message hash")?,
                    created_at_ms: u(r.get(3)?),
                })
            })?
            .pop())
        })
        .await
    }

    async fn acks(
        &self,
        group: u32,
        seq: u64,
        after: Option<u64>,
        limit: u32,
    ) -> Result<AckPage, StoreError> {
        self.read(move |tx| {
            let total: i64 = tx
                .prepare_cached("SELECT count(*) FROM acks WHERE grp = ?1 AND seq = ?2")?
                .query_row(params![i64::from(group), i(seq)], |r| r.get(0))?;
            let mut st = tx.prepare_cached(&format!(
                "SELECT member, at_ms FROM acks WHERE grp = ?1 AND seq = ?2 AND member {} ?3 \
                 ORDER BY member LIMIT ?4",
                after_op(after)
            ))?;
            let acks = collect(
                &mut st,
                params![i64::from(group), i(seq), after_key(after), i64::from(limit)],
                |r| {
                    Ok(AckRow {
                        group,
                        seq,
                        member: u(r.get(0)?),
                        at_ms: u(r.get(1)?),
                    })
                },
            )?;
            Ok(AckPage {
                total: u(total),
                acks,
            })
        })
        .await
    }

    async fn insert_schedule(&self, row: ScheduleRow) -> Result<u64, StoreError> {
        self.call(move |c| {
            let id: i64 = c
                .prepare_cached(
                    "INSERT INTO schedules (grp, every_ms, mode, purpose, next_at_ms, \
                     read_request) VALUES (?1, ?2, ?3, ?4, ?5, ?6) RETURNING id",
                )?
                .query_row(
                    params![
                        i64::from(row.group),
                        i(row.every_ms),
                        mode_code(row.mode),
                        purpose_code(row.purpose),
                        i(row.next_at_ms),
                        &row.read_request
                    ],
                    |r| r.get(0),
                )?;
            Ok(u(id))
        })
        .await
    }

    async fn schedules(&self) -> Result<Vec<ScheduleRow>, StoreError> {
        self.read(move |tx| {
            let mut st = tx.prepare_cached(&format!(
                "SELECT {SCHEDULE_COLS} FROM schedules ORDER BY id"
            ))?;
            collect(&mut st, [], schedule_row)
        })
        .await
    }

    async fn claim_schedule(
        &self,
        id: u64,
        expected_next_ms: u64,
        next_ms: u64,
    ) -> Result<bool, StoreError> {
        let claim = ScheduleClaim {
            id,
            expected_next_ms,
            next_ms,
        };
        self.call(move |c| claim_schedule(c, &claim)).await
    }

    async fn delete_schedule(&self, id: u64) -> Result<bool, StoreError> {
        self.call(move |c| Ok(c.execute("DELETE FROM schedules WHERE id = ?1", [i(id)])? == 1))
            .await
    }

    async fn readings_after(
        &self,
        member: u64,
        from_ms: u64,
        to_ms: u64,
        after: Option<ReadingKey>,
        limit: u32,
    ) -> Result<Vec<ReadingRow>, StoreError> {
        // readings_by_key (member, ts_ms, grp, sid, ctr, migration 8): the
        // order below is the index's, with no sort step, and the key comparison is where
        // the index scan starts. (With `ts_ms >= from` next to it, SQLite
        // starts at `from` and filters its way to the key: every page would
        // scan the key's millisecond from its first reading.)
        self.read(move |tx| {
            // A key before `from` starts nothing: every reading of the range
            // comes after it. A key at or after `from` makes `from` moot.
            let Some(k) = after.filter(|k| i(k.ts_ms) >= ts(from_ms)) else {
                let mut st = tx.prepare_cached(
                    "SELECT grp, sid, ctr, ts_ms, kind, payload FROM readings WHERE member = ?1 \
                     AND ts_ms >= ?2 AND ts_ms < ?3 ORDER BY ts_ms, grp, sid, ctr LIMIT ?4",
                )?;
                return collect(
                    &mut st,
                    params![i(member), ts(from_ms), ts(to_ms), i64::from(limit)],
                    |r| reading_row(member, r),
                );
            };
            let mut st = tx.prepare_cached(
                "SELECT grp, sid, ctr, ts_ms, kind, payload FROM readings WHERE member = ?1 \
                 AND (ts_ms, grp, sid, ctr) > (?4, ?5, ?6, ?7) AND ts_ms < ?2 \
                 ORDER BY ts_ms, grp, sid, ctr LIMIT ?3",
            )?;
            collect(
                &mut st,
                params![
                    i(member),
                    ts(to_ms),
                    i64::from(limit),
                    i(k.ts_ms),
                    i64::from(k.group),
                    &k.sid[..],
                    i(k.ctr)
                ],
                |r| reading_row(member, r),
            )
        })
        .await
    }

    async fn gateways(&self) -> Result<Vec<GatewayRow>, StoreError> {
        self.read(move |tx| {
            let mut st = tx.prepare_cached(
                "SELECT gateway, batches, entries, accepted, localizations, unverified, \
                 last_batch_ms FROM gateways ORDER BY gateway",
            )?;
            collect(&mut st, [], |r| {
                Ok(GatewayRow {
                    gateway: r.get(0)?,
                    batches: u(r.get(1)?),
                    entries: u(r.get(2)?),
                    accepted: u(r.get(3)?),
                    localizations: u(r.get(4)?),
                    unverified: u(r.get(5)?),
                    last_batch_ms: u(r.get(6)?),
                })
            })
        })
        .await
    }
}

fn reading_row(member: u64, r: &Row<'_>) -> Result<ReadingRow, StoreError> {
    Ok(ReadingRow {
        member,
        group: u32_col(r.get(0)?, "reading group")?,
        sid: sid_col(r.get(1)?)?,
        ctr: u(r.get(2)?),
        ts_ms: u(r.get(3)?),
        kind: u8::try_from(r.get::<_, i64>(4)?).map_err(|_| StoreError::Corrupt("reading kind"))?,
        payload: r.get(5)?,
    })
}
