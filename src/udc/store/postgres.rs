//! The PostgreSQL backend of the UDC store, for several UDC processes behind
//! a load balancer sharing one database.
//!
//! A small pool of connections ([`POOL_SIZE`]), each with its own prepared
//! statement cache; a closed connection is replaced on its next checkout.
//! Bulk writes use one multi-row statement per table over `UNNEST` of typed
//! arrays (binary parameters, one round trip per table per batch). COPY
//! would be a little faster for plain inserts, but it cannot express the
//! `ON CONFLICT` rules the write set needs (sticky accepted outcomes,
//! idempotent acks) without a staging table and a second
//! statement per table; `UNNEST` keeps one statement and one code path.
//!
//! Concurrency between processes (READ COMMITTED): compare-and-set rows
//! (group version, session slot version, schedules) re-check their `WHERE` after
//! waiting for a concurrent writer; downlink cursors come from a per-gateway
//! head row that stays locked until commit, so cursors become visible in
//! order; the verdict insert is `ON CONFLICT DO NOTHING`, which waits for a
//! concurrent insert of the same key to finish before deciding.
//!
//! Connections use no TLS (`NoTls`): run PostgreSQL on loopback, a Unix
//! socket or a trusted network, or add a TLS connector here.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Mutex, MutexGuard};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config, GenericClient, NoTls, Row, Statement};

use super::*;

/// Connections per UDC process.
pub(crate) const POOL_SIZE: usize = 4;

/// Versioned migrations, applied in order and recorded in
/// `schema_migrations`.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        include_str!("../../../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        include_str!("../../../migrations/postgres/0002_session_slots.sql"),
    ),
    (
        3,
        include_str!("../../../migrations/postgres/0003_downlink_bundles.sql"),
    ),
    (
        4,
        include_str!("../../../migrations/postgres/0004_batch_outcomes.sql"),
    ),
    (
        5,
        include_str!("../../../migrations/postgres/0005_schedule_read_request.sql"),
    ),
    (
        6,
        include_str!("../../../migrations/postgres/0006_registry_version.sql"),
    ),
    (
        7,
        include_str!("../../../migrations/postgres/0007_readings_by_key.sql"),
    ),
    (
        8,
        include_str!("../../../migrations/postgres/0008_recovery.sql"),
    ),
    (
        9,
        include_str!("../../../migrations/postgres/0009_member_min_kv.sql"),
    ),
    (
        10,
        include_str!("../../../migrations/postgres/0010_drop_member_gateway.sql"),
    ),
    (
        11,
        include_str!("../../../migrations/postgres/0011_session_slot_format_2.sql"),
    ),
    (
        12,
        include_str!("../../../migrations/postgres/0012_session_uses.sql"),
    ),
];

/// Advisory lock key serializing migrations across processes ("dapgw").
const MIGRATION_LOCK: i64 = 0x0064_6170_6777;

/// One pooled connection and its prepared statements.
struct Conn {
    client: Client,
    stmts: HashMap<&'static str, Statement>,
}

impl Conn {
    async fn connect(config: &Config) -> Result<Self, StoreError> {
        let (client, connection) = config.connect(NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "postgres connection closed");
            }
        });
        // Writes rely on each statement seeing what committed before it
        // started (the subscription locks, the slot checks): read
        // committed, whatever the database's or role's default is. The
        // reports ask for their snapshot explicitly (`snapshot`).
        client
            .batch_execute("SET default_transaction_isolation = 'read committed'")
            .await?;
        Ok(Self {
            client,
            stmts: HashMap::new(),
        })
    }
}

/// The PostgreSQL store.
pub struct PostgresStore {
    pool: Vec<Mutex<Conn>>,
    next: AtomicUsize,
    config: Config,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The config holds the password: print only where it points.
        f.debug_struct("PostgresStore")
            .field("dbname", &self.config.get_dbname())
            .field("pool", &self.pool.len())
            .finish()
    }
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user[:password]@host[:port]/db`) and
    /// applies pending migrations.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let config: Config = url.parse().map_err(|_| {
            StoreError::Url(
                "malformed postgres url; expected postgres://user[:password]@host[:port]/db",
            )
        })?;
        let mut first = Conn::connect(&config).await?;
        migrate(&mut first.client).await?;
        let mut pool = vec![Mutex::new(first)];
        for _ in 1..POOL_SIZE {
            pool.push(Mutex::new(Conn::connect(&config).await?));
        }
        Ok(Self {
            pool,
            next: AtomicUsize::new(0),
            config,
        })
    }

    /// Checks out a connection: a free one if any, else waits round-robin.
    async fn conn(&self) -> Result<MutexGuard<'_, Conn>, StoreError> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.pool.len();
        let mut guard = None;
        for k in 0..n {
            if let Ok(g) = self.pool[(start + k) % n].try_lock() {
                guard = Some(g);
                break;
            }
        }
        let mut g = match guard {
            Some(g) => g,
            None => self.pool[start % n].lock().await,
        };
        if g.client.is_closed() {
            *g = Conn::connect(&self.config).await?;
        }
        Ok(g)
    }

    /// Runs one query outside a transaction.
    async fn query(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let mut g = self.conn().await?;
        let Conn { client, stmts } = &mut *g;
        let st = prep(&*client, stmts, sql).await?;
        Ok(client.query(&st, params).await?)
    }

    /// Runs one statement outside a transaction; returns rows affected.
    async fn exec(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, StoreError> {
        let mut g = self.conn().await?;
        let Conn { client, stmts } = &mut *g;
        let st = prep(&*client, stmts, sql).await?;
        Ok(client.execute(&st, params).await?)
    }
}

/// A read-only transaction over one snapshot (repeatable read), for the
/// reports that read several tables.
async fn snapshot(client: &mut Client) -> Result<tokio_postgres::Transaction<'_>, StoreError> {
    Ok(client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?)
}

/// Member rows by id, with their groups (`ANY($1)`).
const MEMBERS_SQL: &str = "SELECT m.id, m.kv, m.key_source, m.imported_key, m.status, \
     m.added_at_ms, COALESCE((SELECT array_agg(mg.grp ORDER BY mg.grp) FROM member_groups mg \
     WHERE mg.member = m.id), '{}'::int8[]), COALESCE(m.min_kv, m.kv) FROM members m \
     WHERE m.id = ANY($1)";

/// Session slots by (member, group) pairs (`UNNEST($1, $2)`).
const SESSIONS_SQL: &str = "SELECT s.member, s.grp, s.last_auth_ms, s.sid, s.state, s.round, \
     s.version, s.acc_top, s.acc_seen, u.sid, u.top, u.seen FROM sessions s \
     JOIN (SELECT DISTINCT * FROM UNNEST($1::int8[], $2::int8[])) AS k(m, g) \
     ON s.member = k.m AND s.grp = k.g \
     LEFT JOIN session_uses u ON u.member = s.member AND u.grp = s.grp AND u.base = s.version";

/// One group's row.
const GROUP_SQL: &str = "SELECT grp, epoch, next_round, seq, config_hash, state, version \
     FROM group_state WHERE grp = $1";

/// One round's row.
const ROUND_SQL: &str = "SELECT grp, round, opened_at_ms, closes_at_ms, mode, purpose, challenge, \
     state, status FROM rounds WHERE grp = $1 AND round = $2";

/// The registry version (migration 6).
const REGISTRY_VERSION_SQL: &str = "SELECT v FROM registry_version WHERE id = 1";

/// The recovery floor's row (migration 8).
const RECOVERY_SQL: &str =
    "SELECT floor, recoveries, recovered_at_ms, newest_record_ms FROM recovery WHERE id = 1";

/// A [`RECOVERY_SQL`] row.
fn recovery_state(row: Option<&Row>) -> Result<RecoveryState, StoreError> {
    let row = row.ok_or(StoreError::Corrupt("recovery row missing"))?;
    let (floor, n, at): (i64, i64, Option<i64>) =
        (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
    let newest: Option<i64> = row.try_get(3)?;
    Ok(RecoveryState {
        floor: u(floor),
        recoveries: u(n),
        recovered_at_ms: at.map(u),
        newest_record_ms: newest.map(u),
    })
}

/// [`MEMBERS_SQL`]'s rows in the order of `ids` (an id asked twice gets its
/// answer twice; unknown ids `None`).
fn members_in_order(ids: &[u64], found: Vec<Row>) -> Result<Vec<Option<MemberRow>>, StoreError> {
    let by_id: HashMap<u64, MemberRow> = rows(found, member_row)?
        .into_iter()
        .map(|m| (m.id, m))
        .collect();
    Ok(ids.iter().map(|id| by_id.get(id).cloned()).collect())
}

/// [`SESSIONS_SQL`]'s rows in the order of `keys` (a key asked twice gets
/// its answer twice).
fn slots_in_order(
    keys: &[(u64, u32)],
    found: Vec<Row>,
) -> Result<Vec<Option<StoredSlot>>, StoreError> {
    let found: HashMap<(u64, u32), StoredSlot> = rows(found, stored_slot)?
        .into_iter()
        .map(|p| ((p.member, p.group), p))
        .collect();
    Ok(keys.iter().map(|k| found.get(k).cloned()).collect())
}

/// A cached prepared statement.
async fn prep<C: GenericClient + Sync>(
    c: &C,
    cache: &mut HashMap<&'static str, Statement>,
    sql: &'static str,
) -> Result<Statement, StoreError> {
    if let Some(s) = cache.get(sql) {
        return Ok(s.clone());
    }
    let s = c.prepare(sql).await?;
    cache.insert(sql, s.clone());
    Ok(s)
}

/// Inserts a new group's row (version 1); a group that already has one is
/// a [`StoreError::Conflict`].
async fn insert_group<C: GenericClient + Sync>(
    c: &C,
    stmts: &mut HashMap<&'static str, Statement>,
    row: &GroupRow,
) -> Result<(), StoreError> {
    let st = prep(
        c,
        stmts,
        "INSERT INTO group_state (grp, epoch, next_round, seq, config_hash, state, version) \
         VALUES ($1, $2, $3, $4, $5, $6, 1) ON CONFLICT DO NOTHING",
    )
    .await?;
    let n = c
        .execute(
            &st,
            &[
                &i64::from(row.group),
                &i(row.epoch),
                &i(row.next_round),
                &i(row.seq),
                &&row.config_hash[..],
                &row.state.as_bytes(),
            ],
        )
        .await?;
    if n == 1 {
        Ok(())
    } else {
        Err(StoreError::Conflict("group"))
    }
}

/// Applies missing migrations under a transaction-scoped advisory lock, so
/// two processes starting together apply each migration once.
async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, \
         applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    )
    .await?;
    let current: Option<i64> = tx
        .query_one("SELECT max(version) FROM schema_migrations", &[])
        .await?
        .try_get(0)?;
    let current = current.unwrap_or(0);
    let latest = MIGRATIONS.last().map_or(0, |m| m.0);
    if current > latest {
        return Err(StoreError::SchemaTooNew {
            found: current,
            supported: latest,
        });
    }
    for (version, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO schema_migrations (version) VALUES ($1)",
            &[version],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Row mapping
// ---------------------------------------------------------------------------

fn member_row(r: &Row) -> Result<MemberRow, StoreError> {
    let groups: Vec<i64> = r.try_get(6)?;
    Ok(MemberRow {
        id: u(r.try_get(0)?),
        groups: groups
            .into_iter()
            .map(|g| u32_col(g, "member group"))
            .collect::<Result<_, _>>()?,
        kv: u32_col(r.try_get(1)?, "member kv")?,
        min_kv: u32_col(r.try_get(7)?, "member min_kv")?,
        key_source: key_source_col(r.try_get(2)?, r.try_get(3)?)?,
        status: member_status_col(r.try_get(4)?)?,
        added_at_ms: u(r.try_get(5)?),
    })
}

fn group_row(r: &Row) -> Result<GroupRow, StoreError> {
    Ok(GroupRow {
        group: u32_col(r.try_get(0)?, "group id")?,
        epoch: u(r.try_get(1)?),
        next_round: u(r.try_get(2)?),
        seq: u(r.try_get(3)?),
        config_hash: hash_col(r.try_get(4)?, "group config hash")?,
        state: Sealed::new(r.try_get(5)?),
        version: u(r.try_get(6)?),
    })
}

fn round_row(r: &Row) -> Result<RoundRow, StoreError> {
    Ok(RoundRow {
        group: u32_col(r.try_get(0)?, "round group")?,
        round: u(r.try_get(1)?),
        opened_at_ms: u(r.try_get(2)?),
        closes_at_ms: r.try_get::<_, Option<i64>>(3)?.map(u),
        mode: mode_col(r.try_get(4)?)?,
        purpose: purpose_col(r.try_get(5)?)?,
        challenge: r.try_get(6)?,
        state: Sealed::new(r.try_get(7)?),
        status: round_status_col(r.try_get(8)?)?,
    })
}

fn stored_slot(r: &Row) -> Result<StoredSlot, StoreError> {
    let sid = opt_sid_col(r.try_get(3)?)?;
    let state: Option<Vec<u8>> = r.try_get(4)?;
    Ok(StoredSlot {
        member: u(r.try_get(0)?),
        group: u32_col(r.try_get(1)?, "session group")?,
        last_auth_ms: u(r.try_get(2)?),
        state: sid.and(state).map(Sealed::new),
        sid,
        round: u(r.try_get(5)?),
        version: u(r.try_get(6)?),
        rounds: AcceptedRounds {
            top: u(r.try_get(7)?),
            seen: u(r.try_get(8)?),
        },
        used: slot_use_cols(r.try_get(9)?, r.try_get(10)?, r.try_get(11)?)?,
    })
}

fn localization_row(r: &Row) -> Result<PendingLocalization, StoreError> {
    Ok(PendingLocalization {
        gateway: r.try_get(0)?,
        batch_id: u(r.try_get(1)?),
        batch_hash: hash_col(r.try_get(2)?, "batch hash")?,
        verdict: r.try_get(3)?,
        pending: Sealed::new(r.try_get(4)?),
        expires_at_ms: u(r.try_get(5)?),
    })
}

fn schedule_row(r: &Row) -> Result<ScheduleRow, StoreError> {
    Ok(ScheduleRow {
        id: u(r.try_get(0)?),
        group: u32_col(r.try_get(1)?, "schedule group")?,
        every_ms: u(r.try_get(2)?),
        mode: mode_col(r.try_get(3)?)?,
        purpose: purpose_col(r.try_get(4)?)?,
        next_at_ms: u(r.try_get(5)?),
        read_request: r.try_get(6)?,
    })
}

fn rows<T>(
    rows: Vec<Row>,
    f: impl Fn(&Row) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    rows.iter().map(f).collect()
}

/// A page's inclusive lower bound on the stored (bit-cast) ids for an
/// optional `after`: from the first without one; `None` if nothing comes
/// after it (it is the last id in the store's order).
///
/// The page queries compare `>=` this plain bound, not `($1 IS NULL OR
/// id > $1)`: a cached statement's generic plan cannot turn that OR into
/// an index condition, so each page would scan from the first row.
fn page_from(after: Option<u64>) -> Option<i64> {
    match after {
        None => Some(i64::MIN),
        Some(a) => i(a).checked_add(1),
    }
}

// ---------------------------------------------------------------------------
// The write transaction
// ---------------------------------------------------------------------------

/// A schedule's next time moved compare-and-set (alone, or as the first
/// step of a write): `$1` id, `$2` the next time expected, `$3` the new one.
const CLAIM_SCHEDULE_SQL: &str =
    "UPDATE schedules SET next_at_ms = $3 WHERE id = $1 AND next_at_ms = $2";

type Tx<'a> = tokio_postgres::Transaction<'a>;
type Cache = HashMap<&'static str, Statement>;

async fn apply(conn: &mut Conn, w: BatchWrite) -> Result<Applied, StoreError> {
    w.check_uses()?;
    let Conn { client, stmts } = conn;
    let tx = client.transaction().await?;
    let applied = apply_tx(&tx, stmts, w)
        .await
        .map_err(conflict_if_deadlock)?;
    tx.commit()
        .await
        .map_err(|e| conflict_if_deadlock(e.into()))?;
    Ok(applied)
}

/// A deadlock PostgreSQL broke (or a serialization failure) as the
/// conflict it is: two writes of the same rows in different orders (a
/// slot one write checks and another changes, and the other way round).
/// The caller retries, like any compare-and-set conflict (503 `busy`).
fn conflict_if_deadlock(e: StoreError) -> StoreError {
    use tokio_postgres::error::SqlState;
    if let StoreError::Postgres(pg) = &e
        && pg.code().is_some_and(|c| {
            *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
        })
    {
        return StoreError::Conflict("concurrent write (deadlock)");
    }
    e
}

/// The writes of [`apply`] inside `tx` (also the last step of [`recover`]).
async fn apply_tx(tx: &Tx<'_>, stmts: &mut Cache, w: BatchWrite) -> Result<Applied, StoreError> {
    let now = i(w.now_ms);
    if let Some(c) = &w.schedule_claim {
        // A claim by another process waits for this row's lock, then finds
        // `next_at_ms` moved (READ COMMITTED re-checks the condition).
        let st = prep(tx, stmts, CLAIM_SCHEDULE_SQL).await?;
        let n = tx
            .execute(&st, &[&i(c.id), &i(c.expected_next_ms), &i(c.next_ms)])
            .await?;
        if n != 1 {
            return Err(StoreError::Conflict("schedule"));
        }
    }
    if !w.members.is_empty() || !w.key_versions.is_empty() {
        // Registry writers run one at a time, each taking this row before
        // any group or round row: a verdict that confirms a key version
        // (group row shared, then the registry counter its trigger raises)
        // and a rekey (the registry, then its group row) would otherwise
        // lock in opposite orders. It also makes the `Expected` checks
        // below hold until the commit.
        let st = prep(
            tx,
            stmts,
            "SELECT v FROM registry_version WHERE id = 1 FOR UPDATE",
        )
        .await?;
        tx.query_opt(&st, &[]).await?;
    }
    for (g, epoch) in &w.group_epochs {
        // FOR SHARE: a rekey's UPDATE of the group row waits for this
        // commit (and then fails its own compare-and-set on the slots this
        // write changed); a rekey committed before is seen here.
        let st = prep(
            tx,
            stmts,
            "SELECT epoch FROM group_state WHERE grp = $1 FOR SHARE",
        )
        .await?;
        let row = tx.query_opt(&st, &[&i64::from(*g)]).await?;
        let stored: Option<i64> = row.map(|r| r.try_get(0)).transpose()?;
        if stored != Some(i(*epoch)) {
            return Err(StoreError::Conflict("group epoch"));
        }
    }
    for (g, r) in &w.open_rounds {
        // FOR SHARE: a close of this round (an UPDATE) waits for this
        // commit; one committed before is seen here.
        let st = prep(
            tx,
            stmts,
            "SELECT status FROM rounds WHERE grp = $1 AND round = $2 FOR SHARE",
        )
        .await?;
        let row = tx.query_opt(&st, &[&i64::from(*g), &i(*r)]).await?;
        let status: Option<i64> = row.map(|row| row.try_get(0)).transpose()?;
        if status != Some(0) {
            return Err(StoreError::Conflict("round (closed)"));
        }
    }
    if !w.slot_checks.is_empty() || !w.slot_uses.is_empty() {
        // One query per group, rows locked in member order. FOR SHARE: a
        // write of these slots by another process waits for this commit,
        // so the judgement made on them stays the one applied first (and
        // its check of the use it folded in, after its update, sees the
        // uses this write stores).
        let mut checks = w.slot_checks.clone();
        checks.extend(w.slot_uses.iter().map(|u| SlotCheck {
            member: u.member,
            group: u.group,
            version: u.base,
        }));
        checks.sort_unstable_by_key(|c| (c.group, c.member));
        let st = prep(
            tx,
            stmts,
            "SELECT member, version FROM sessions WHERE grp = $1 AND member = ANY($2) \
             ORDER BY member FOR SHARE",
        )
        .await?;
        for group in checks.chunk_by(|a, b| a.group == b.group) {
            let members: Vec<i64> = group.iter().map(|c| i(c.member)).collect();
            let rows = tx
                .query(&st, &[&i64::from(group[0].group), &members])
                .await?;
            let mut stored = std::collections::HashMap::with_capacity(rows.len());
            for r in rows {
                stored.insert(r.try_get::<_, i64>(0)?, r.try_get::<_, i64>(1)?);
            }
            if group
                .iter()
                .any(|c| stored.get(&i(c.member)) != Some(&i(c.version)))
            {
                return Err(StoreError::Conflict("session slot"));
            }
        }
    }
    if let Some(v) = &w.verdict {
        write_verdict(tx, stmts, v, now).await?;
    }
    for c in &w.key_versions {
        write_key_version(tx, stmts, c).await?;
    }
    if !w.members.is_empty() {
        write_members(tx, stmts, &w.members, w.members_new_only).await?;
    }
    for g in &w.groups {
        let st = prep(
            tx,
            stmts,
            "UPDATE group_state SET epoch = $3, next_round = $4, seq = $5, \
             config_hash = $6, state = $7, version = version + 1 WHERE grp = $1 AND version = $2",
        )
        .await?;
        let n = tx
            .execute(
                &st,
                &[
                    &i64::from(g.group),
                    &i(g.version),
                    &i(g.epoch),
                    &i(g.next_round),
                    &i(g.seq),
                    &&g.config_hash[..],
                    &g.state.as_bytes(),
                ],
            )
            .await?;
        if n != 1 {
            return Err(StoreError::Conflict("group"));
        }
    }
    // After the group rows' updates: a batch that share-locked a group row
    // (judged against the old epoch) has committed by now, and this
    // statement's snapshot sees the first sessions it gave.
    for (g, members) in &w.sessionless {
        let st = prep(
            tx,
            stmts,
            "SELECT 1 FROM sessions WHERE grp = $1 AND member = ANY($2) \
             AND sid IS NOT NULL LIMIT 1",
        )
        .await?;
        let members: Vec<i64> = members.iter().map(|m| i(*m)).collect();
        if tx
            .query_opt(&st, &[&i64::from(*g), &members])
            .await?
            .is_some()
        {
            return Err(StoreError::Conflict("session slot"));
        }
    }
    for r in &w.new_rounds {
        let st = prep(
            tx,
            stmts,
            "INSERT INTO rounds (grp, round, opened_at_ms, closes_at_ms, mode, \
             purpose, challenge, state, status) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT DO NOTHING",
        )
        .await?;
        let n = tx
            .execute(
                &st,
                &[
                    &i64::from(r.group),
                    &i(r.round),
                    &i(r.opened_at_ms),
                    &r.closes_at_ms.map(i),
                    &mode_code(r.mode),
                    &purpose_code(r.purpose),
                    &r.challenge,
                    &r.state.as_bytes(),
                    &round_status_code(r.status),
                ],
            )
            .await?;
        if n != 1 {
            return Err(StoreError::Conflict("round"));
        }
    }
    for (g, r) in &w.closed_rounds {
        let st = prep(
            tx,
            stmts,
            "UPDATE rounds SET status = 1, state = ''::bytea WHERE grp = $1 AND round = $2",
        )
        .await?;
        if tx.execute(&st, &[&i64::from(*g), &i(*r)]).await? != 1 {
            return Err(StoreError::NotFound("round"));
        }
    }
    if !w.sessions.is_empty() {
        write_sessions(tx, stmts, &w.sessions).await?;
    }
    if !w.slot_uses.is_empty() {
        write_uses(tx, stmts, &w.slot_uses).await?;
    }
    if !w.readings.is_empty() {
        let (mut m, mut g, mut sid, mut ctr, mut ts, mut kind, mut payload) =
            (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
        for r in &w.readings {
            m.push(i(r.member));
            g.push(i64::from(r.group));
            sid.push(&r.sid[..]);
            ctr.push(i(r.ctr));
            ts.push(i(r.ts_ms));
            kind.push(i64::from(r.kind));
            payload.push(&r.payload[..]);
        }
        let st = prep(
            tx,
            stmts,
            "INSERT INTO readings (member, grp, sid, ctr, ts_ms, kind, payload) \
             SELECT * FROM UNNEST($1::int8[], $2::int8[], $3::bytea[], $4::int8[], $5::int8[], \
             $6::int8[], $7::bytea[])",
        )
        .await?;
        tx.execute(&st, &[&m, &g, &sid, &ctr, &ts, &kind, &payload])
            .await?;
    }
    if !w.acks.is_empty() {
        let (mut g, mut seq, mut m, mut t) = (vec![], vec![], vec![], vec![]);
        for a in &w.acks {
            g.push(i64::from(a.group));
            seq.push(i(a.seq));
            m.push(i(a.member));
            t.push(i(a.at_ms));
        }
        let st = prep(
            tx,
            stmts,
            "INSERT INTO acks (grp, seq, member, at_ms) SELECT * FROM UNNEST($1::int8[], \
             $2::int8[], $3::int8[], $4::int8[]) ON CONFLICT DO NOTHING",
        )
        .await?;
        tx.execute(&st, &[&g, &seq, &m, &t]).await?;
    }
    for gm in &w.group_messages {
        let st = prep(
            tx,
            stmts,
            "INSERT INTO group_messages (grp, seq, epoch, bytes, payload_hash, \
             created_at_ms) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .await?;
        let n = tx
            .execute(
                &st,
                &[
                    &i64::from(gm.group),
                    &i(gm.seq),
                    &i(gm.epoch),
                    &gm.bytes,
                    &&gm.payload_hash[..],
                    &i(gm.created_at_ms),
                ],
            )
            .await?;
        if n != 1 {
            return Err(StoreError::Conflict("group message"));
        }
    }
    let gateway = w.via.as_ref().map(|v| v.gateway.as_str());
    if !w.outcomes.is_empty() {
        // One row per (group, round) of the write (migration 4).
        let st = prep(
            tx,
            stmts,
            "INSERT INTO round_results (grp, round, gateway, at_ms, n, outcomes) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .await?;
        for ((g, r), rows) in outcomes_by_round(&w.outcomes) {
            let blob = encode_outcomes(&rows);
            tx.execute(
                &st,
                &[
                    &i64::from(g),
                    &i(r),
                    &gateway,
                    &now,
                    &(rows.len() as i64),
                    &blob,
                ],
            )
            .await?;
        }
    }
    for l in &w.round_localizations {
        let st = prep(
            tx,
            stmts,
            "UPDATE rounds SET localizations = localizations + $3 WHERE grp = $1 AND round = $2",
        )
        .await?;
        if tx
            .execute(&st, &[&i64::from(l.group), &i(l.round), &i(l.chunks)])
            .await?
            != 1
        {
            return Err(StoreError::NotFound("round"));
        }
    }
    if let Some(v) = &w.via {
        let st = prep(
            tx,
            stmts,
            "INSERT INTO gateways (gateway, batches, entries, accepted, localizations, \
             unverified, last_batch_ms) VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (gateway) DO UPDATE SET batches = gateways.batches + EXCLUDED.batches, \
             entries = gateways.entries + EXCLUDED.entries, \
             accepted = gateways.accepted + EXCLUDED.accepted, \
             localizations = gateways.localizations + EXCLUDED.localizations, \
             unverified = gateways.unverified + EXCLUDED.unverified, \
             last_batch_ms = GREATEST(gateways.last_batch_ms, EXCLUDED.last_batch_ms)",
        )
        .await?;
        tx.execute(
            &st,
            &[
                &v.gateway,
                &i(v.batches),
                &i(v.entries),
                &i(v.accepted),
                &i(v.localizations),
                &i(v.unverified),
                &now,
            ],
        )
        .await?;
    }
    let heads = write_downlink(tx, stmts, &w.downlink, now).await?;
    Ok(Applied {
        downlink_heads: heads,
    })
}

/// [`Store::recover`]: one transaction; the floor row is locked first, so
/// two recoveries run one after the other (and the second fails its
/// compare-and-set).
async fn recover(conn: &mut Conn, w: RecoveryWrite) -> Result<RecoveryApplied, StoreError> {
    let Conn { client, stmts } = conn;
    let tx = client.transaction().await?;
    let st = prep(
        &tx,
        stmts,
        "SELECT floor FROM recovery WHERE id = 1 FOR UPDATE",
    )
    .await?;
    let floor: i64 = tx.query_one(&st, &[]).await?.try_get(0)?;
    if u(floor) != w.floor_before {
        return Err(StoreError::Conflict("recovery floor"));
    }
    let st = prep(
        &tx,
        stmts,
        "UPDATE recovery SET floor = $1, recoveries = recoveries + 1, recovered_at_ms = $2, \
         newest_record_ms = $3 WHERE id = 1",
    )
    .await?;
    let newest = w.newest_record_ms.map(i);
    tx.execute(&st, &[&i(w.floor), &i(w.batch.now_ms), &newest])
        .await?;
    let (mut members_revoked, mut revoke_not_found) = (0, Vec::new());
    let get = prep(
        &tx,
        stmts,
        "SELECT status FROM members WHERE id = $1 FOR UPDATE",
    )
    .await?;
    let set = prep(&tx, stmts, "UPDATE members SET status = $1 WHERE id = $2").await?;
    let revoked = member_status_code(MemberStatus::Revoked);
    for &id in &w.revoke {
        match tx.query_opt(&get, &[&i(id)]).await? {
            None => revoke_not_found.push(id),
            Some(r) if r.try_get::<_, i64>(0)? == revoked => {}
            Some(_) => {
                tx.execute(&set, &[&revoked, &i(id)]).await?;
                members_revoked += 1;
            }
        }
    }
    for g in &w.new_groups {
        insert_group(&tx, stmts, g).await?;
    }
    let st = prep(
        &tx,
        stmts,
        "UPDATE sessions SET sid = NULL, state = NULL, version = version + 1 \
         WHERE sid IS NOT NULL",
    )
    .await?;
    let sessions_dropped = tx.execute(&st, &[]).await?;
    let st = prep(&tx, stmts, "DELETE FROM session_uses").await?;
    tx.execute(&st, &[]).await?;
    // Raised in Rust: the columns hold bit-cast u64s (a sum in SQL would
    // fail on BIGINT overflow, or wrap a bit-cast value's sign).
    let st = prep(
        &tx,
        stmts,
        "SELECT gateway, last_cursor FROM downlink_heads FOR UPDATE",
    )
    .await?;
    let heads = tx.query(&st, &[]).await?;
    let set = prep(
        &tx,
        stmts,
        "UPDATE downlink_heads SET last_cursor = $2 WHERE gateway = $1",
    )
    .await?;
    for row in &heads {
        let gateway: &str = row.try_get(0)?;
        let head: i64 = row.try_get(1)?;
        let raised = u(head)
            .checked_add(w.raise_by)
            .ok_or(StoreError::CounterExhausted("downlink cursor"))?;
        tx.execute(&set, &[&gateway, &i(raised)]).await?;
    }
    let st = prep(&tx, stmts, REGISTRY_VERSION_SQL).await?;
    let v: i64 = tx
        .query_opt(&st, &[])
        .await?
        .ok_or(StoreError::Corrupt("registry version row missing"))?
        .try_get(0)?;
    let v = u(v)
        .checked_add(w.raise_by)
        .ok_or(StoreError::CounterExhausted("registry version"))?;
    let st = prep(
        &tx,
        stmts,
        "UPDATE registry_version SET v = $1 WHERE id = 1",
    )
    .await?;
    tx.execute(&st, &[&i(v)]).await?;
    apply_tx(&tx, stmts, w.batch).await?;
    tx.commit().await?;
    Ok(RecoveryApplied {
        sessions_dropped,
        gateways_raised: heads.len() as u64,
        members_revoked,
        revoke_not_found,
    })
}

/// Inserts the verdict, or finalizes a pending one of the same batch, or
/// fails with [`StoreError::VerdictExists`] before anything else is written.
async fn write_verdict(
    tx: &Tx<'_>,
    stmts: &mut Cache,
    v: &VerdictWrite,
    now: i64,
) -> Result<(), StoreError> {
    let st = prep(
        tx,
        stmts,
        "INSERT INTO verdicts (gateway, batch_id, batch_hash, verdict, final, created_at_ms) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
    )
    .await?;
    let is_final = i64::from(v.pending.is_none());
    let inserted = tx
        .execute(
            &st,
            &[
                &v.gateway,
                &i(v.batch_id),
                &&v.batch_hash[..],
                &v.verdict,
                &is_final,
                &now,
            ],
        )
        .await?;
    if inserted == 1 {
        if let Some(p) = &v.pending {
            let st = prep(
                tx,
                stmts,
                "INSERT INTO localizations (gateway, batch_id, batch_hash, verdict, pending, \
                 expires_at_ms) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .await?;
            tx.execute(
                &st,
                &[
                    &v.gateway,
                    &i(v.batch_id),
                    &&v.batch_hash[..],
                    &v.verdict,
                    &p.pending.as_bytes(),
                    &i(p.expires_at_ms),
                ],
            )
            .await?;
        }
        return Ok(());
    }
    // Only a final verdict may replace a pending verdict of the same batch.
    if v.pending.is_none() {
        let st = prep(
            tx,
            stmts,
            "UPDATE verdicts SET verdict = $3, final = 1 WHERE gateway = $1 AND batch_id = $2 \
             AND final = 0 AND batch_hash = $4",
        )
        .await?;
        let n = tx
            .execute(
                &st,
                &[&v.gateway, &i(v.batch_id), &v.verdict, &&v.batch_hash[..]],
            )
            .await?;
        if n == 1 {
            let st = prep(
                tx,
                stmts,
                "DELETE FROM localizations WHERE gateway = $1 AND batch_id = $2",
            )
            .await?;
            tx.execute(&st, &[&v.gateway, &i(v.batch_id)]).await?;
            return Ok(());
        }
    }
    let st = prep(
        tx,
        stmts,
        "SELECT batch_hash, final FROM verdicts WHERE gateway = $1 AND batch_id = $2",
    )
    .await?;
    let row = tx.query_one(&st, &[&v.gateway, &i(v.batch_id)]).await?;
    Err(StoreError::VerdictExists {
        batch_hash: hash_col(row.try_get(0)?, "batch hash")?,
        is_final: row.try_get::<_, i64>(1)? != 0,
    })
}

/// Applies one [`KeyVersionChange`] (see there).
async fn write_key_version(
    tx: &Tx<'_>,
    stmts: &mut Cache,
    c: &KeyVersionChange,
) -> Result<(), StoreError> {
    match *c {
        KeyVersionChange::Issued {
            member,
            from_kv,
            to_kv,
        } => {
            let st = prep(
                tx,
                stmts,
                "UPDATE members SET kv = $3, min_kv = COALESCE(min_kv, kv) \
                 WHERE id = $1 AND kv = $2 AND status = 0",
            )
            .await?;
            let n = tx
                .execute(&st, &[&i(member), &i64::from(from_kv), &i64::from(to_kv)])
                .await?;
            if n != 1 {
                return Err(StoreError::Conflict("member key version"));
            }
        }
        KeyVersionChange::Expected { member, kv, min_kv } => {
            let st = prep(
                tx,
                stmts,
                "SELECT kv, COALESCE(min_kv, kv) FROM members WHERE id = $1",
            )
            .await?;
            let stored = tx
                .query_opt(&st, &[&i(member)])
                .await?
                .map(|r| Ok::<_, StoreError>((r.try_get::<_, i64>(0)?, r.try_get::<_, i64>(1)?)))
                .transpose()?;
            if stored.is_some_and(|s| s != (i64::from(kv), i64::from(min_kv))) {
                return Err(StoreError::Conflict("member key version"));
            }
        }
        KeyVersionChange::Confirmed { member, kv } => {
            let st = prep(
                tx,
                stmts,
                "UPDATE members SET min_kv = $2 \
                 WHERE id = $1 AND COALESCE(min_kv, kv) < $2 AND kv >= $2",
            )
            .await?;
            tx.execute(&st, &[&i(member), &i64::from(kv)]).await?;
        }
    }
    Ok(())
}

async fn write_members(
    tx: &Tx<'_>,
    stmts: &mut Cache,
    members: &[MemberRow],
    new_only: bool,
) -> Result<(), StoreError> {
    let (mut id, mut kv, mut ks, mut key, mut status, mut added, mut min_kv) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut gm, mut gg) = (vec![], vec![]);
    for m in members {
        let (code, k) = key_source_cols(&m.key_source);
        id.push(i(m.id));
        kv.push(i64::from(m.kv));
        ks.push(code);
        key.push(k);
        status.push(member_status_code(m.status));
        added.push(i(m.added_at_ms));
        min_kv.push(i64::from(m.min_kv.min(m.kv)));
        for g in normalized_groups(&m.groups) {
            gm.push(i(m.id));
            gg.push(i64::from(g));
        }
    }
    let sql = if new_only {
        "INSERT INTO members (id, kv, key_source, imported_key, status, added_at_ms, min_kv) \
         SELECT * FROM UNNEST($1::int8[], $2::int8[], $3::int8[], $4::bytea[], $5::int8[], $6::int8[], \
         $7::int8[]) ON CONFLICT (id) DO NOTHING"
    } else {
        "INSERT INTO members (id, kv, key_source, imported_key, status, added_at_ms, min_kv) \
         SELECT * FROM UNNEST($1::int8[], $2::int8[], $3::int8[], $4::bytea[], $5::int8[], $6::int8[], \
         $7::int8[]) ON CONFLICT (id) DO UPDATE SET kv = EXCLUDED.kv, \
         key_source = EXCLUDED.key_source, imported_key = EXCLUDED.imported_key, \
         status = EXCLUDED.status, added_at_ms = EXCLUDED.added_at_ms, min_kv = EXCLUDED.min_kv"
    };
    let st = prep(tx, stmts, sql).await?;
    let written = tx
        .execute(&st, &[&id, &kv, &ks, &key, &status, &added, &min_kv])
        .await?;
    if new_only && written != members.len() as u64 {
        return Err(StoreError::Conflict("member (registered meanwhile)"));
    }
    let st = prep(
        tx,
        stmts,
        "DELETE FROM member_groups WHERE member = ANY($1)",
    )
    .await?;
    tx.execute(&st, &[&id]).await?;
    let st = prep(
        tx,
        stmts,
        "INSERT INTO member_groups (member, grp) SELECT * FROM UNNEST($1::int8[], $2::int8[]) \
         ON CONFLICT DO NOTHING",
    )
    .await?;
    tx.execute(&st, &[&gm, &gg]).await?;
    Ok(())
}

/// Every outcome row stored for a round, in the order [`fold_outcomes`]
/// wants: version 1's per-member rows first, then the per-batch rows of
/// version 4 by id.
async fn round_outcome_rows(
    tx: &Tx<'_>,
    stmts: &mut Cache,
    group: u32,
    round: u64,
) -> Result<Vec<OutcomeRow>, StoreError> {
    let (g, r) = (i64::from(group), i(round));
    let st = prep(
        tx,
        stmts,
        "SELECT member, kind, reason, gateway FROM round_outcomes WHERE grp = $1 AND round = $2 \
         ORDER BY member",
    )
    .await?;
    let mut out = rows(tx.query(&st, &[&g, &r]).await?, |x| {
        Ok(OutcomeRow {
            group,
            round,
            member: u(x.try_get(0)?),
            kind: outcome_col(x.try_get(1)?)?,
            reason: Cow::Owned(x.try_get(2)?),
            gateway: x.try_get(3)?,
        })
    })?;
    let st = prep(
        tx,
        stmts,
        "SELECT gateway, n, outcomes FROM round_results WHERE grp = $1 AND round = $2 ORDER BY id",
    )
    .await?;
    for x in tx.query(&st, &[&g, &r]).await? {
        let gateway: Option<&str> = x.try_get(0)?;
        let blob: &[u8] = x.try_get(2)?;
        decode_outcomes(group, round, gateway, x.try_get(1)?, blob, &mut out)?;
    }
    Ok(out)
}

/// The active members of `group` after `after`, in (signed) id order.
async fn active_members(
    tx: &Tx<'_>,
    stmts: &mut Cache,
    group: u32,
    after: Option<u64>,
) -> Result<Vec<u64>, StoreError> {
    let Some(from) = page_from(after) else {
        return Ok(Vec::new());
    };
    let st = prep(
        tx,
        stmts,
        "SELECT mg.member FROM member_groups mg JOIN members m ON m.id = mg.member \
         WHERE mg.grp = $1 AND m.status = 0 AND mg.member >= $2 ORDER BY mg.member",
    )
    .await?;
    rows(tx.query(&st, &[&i64::from(group), &from]).await?, |x| {
        Ok(u(x.try_get(0)?))
    })
}

/// Writes session slots compare-and-set on their version: new rows (version
/// 0) in one insert, existing ones in one update; every row must have
/// matched exactly once (READ COMMITTED re-checks the version after waiting
/// for a concurrent writer of the same row).
async fn write_sessions(
    tx: &Tx<'_>,
    stmts: &mut Cache,
    sessions: &[SessionRow],
) -> Result<(), StoreError> {
    #[derive(Default)]
    struct Cols<'a> {
        m: Vec<i64>,
        g: Vec<i64>,
        sid: Vec<Option<&'a [u8]>>,
        state: Vec<Option<&'a [u8]>>,
        round: Vec<i64>,
        auth: Vec<Option<i64>>,
        version: Vec<i64>,
        acc_top: Vec<i64>,
        acc_seen: Vec<i64>,
        read_top: Vec<i64>,
        read_seen: Vec<i64>,
    }
    let (mut new, mut old) = (Cols::default(), Cols::default());
    for s in sessions {
        let acc = AcceptedRounds::after_write(s)?;
        let c = if s.version == 0 { &mut new } else { &mut old };
        c.m.push(i(s.member));
        c.g.push(i64::from(s.group));
        c.sid.push(s.sid.as_ref().map(|x| &x[..]));
        c.state.push(s.sid.map(|_| s.state.as_bytes()));
        c.round.push(i(s.round));
        c.auth.push(s.authenticated_at_ms.map(i));
        c.version.push(i(s.version));
        c.acc_top.push(i(acc.top));
        c.acc_seen.push(i(acc.seen));
        c.read_top.push(i(s.rounds.top));
        c.read_seen.push(i(s.rounds.seen));
    }
    let mut n = 0;
    if !new.m.is_empty() {
        let st = prep(
            tx,
            stmts,
            "INSERT INTO sessions (member, grp, last_auth_ms, sid, state, round, version, \
             acc_top, acc_seen) \
             SELECT m, g, coalesce(t, 0), s, st, r, 1, at, sn FROM UNNEST($1::int8[], $2::int8[], \
             $3::bytea[], $4::bytea[], $5::int8[], $6::int8[], $7::int8[], $8::int8[]) \
             AS x(m, g, s, st, r, t, at, sn) \
             ON CONFLICT DO NOTHING",
        )
        .await?;
        n += tx
            .execute(
                &st,
                &[
                    &new.m,
                    &new.g,
                    &new.sid,
                    &new.state,
                    &new.round,
                    &new.auth,
                    &new.acc_top,
                    &new.acc_seen,
                ],
            )
            .await?;
    }
    if !old.m.is_empty() {
        let st = prep(
            tx,
            stmts,
            "UPDATE sessions s SET sid = x.s, state = x.st, round = x.r, \
             last_auth_ms = coalesce(x.t, s.last_auth_ms), version = s.version + 1, \
             acc_top = x.at, acc_seen = x.sn \
             FROM UNNEST($1::int8[], $2::int8[], $3::bytea[], $4::bytea[], $5::int8[], \
             $6::int8[], $7::int8[], $8::int8[], $9::int8[], $10::int8[], $11::int8[]) \
             AS x(m, g, s, st, r, t, v, at, sn, rt, rs) \
             WHERE s.member = x.m AND s.grp = x.g AND s.version = x.v \
             AND s.acc_top = x.rt AND s.acc_seen = x.rs",
        )
        .await?;
        n += tx
            .execute(
                &st,
                &[
                    &old.m,
                    &old.g,
                    &old.sid,
                    &old.state,
                    &old.round,
                    &old.auth,
                    &old.version,
                    &old.acc_top,
                    &old.acc_seen,
                    &old.read_top,
                    &old.read_seen,
                ],
            )
            .await?;
    }
    if n != sessions.len() as u64 {
        return Err(StoreError::Conflict("session slot"));
    }
    // The use each rewritten slot folded in must still be the stored one:
    // a use written since the read (it checked, and share-locked, the same
    // version; the update above waited for its commit) would otherwise be
    // lost with its window. A separate statement, so that under READ
    // COMMITTED it sees that commit. A new slot (version 0) has none.
    if !old.m.is_empty() {
        let st = prep(
            tx,
            stmts,
            "SELECT u.member, u.grp, u.sid, u.top, u.seen FROM session_uses u \
             JOIN UNNEST($1::int8[], $2::int8[], $3::int8[]) AS x(m, g, v) \
             ON u.member = x.m AND u.grp = x.g AND u.base = x.v",
        )
        .await?;
        let found = tx.query(&st, &[&old.m, &old.g, &old.version]).await?;
        let mut stored = HashMap::with_capacity(found.len());
        for r in found {
            let key = (
                u(r.try_get(0)?),
                u32_col(r.try_get(1)?, "session use group")?,
            );
            let used = slot_use_cols(r.try_get(2)?, r.try_get(3)?, r.try_get(4)?)?;
            stored.insert(key, used);
        }
        for s in sessions.iter().filter(|s| s.version != 0) {
            if stored.get(&(s.member, s.group)).copied().flatten() != s.use_read {
                return Err(StoreError::Conflict("session slot"));
            }
        }
    }
    Ok(())
}

/// Stores session uses ([`BatchWrite::slot_uses`]), compare-and-set on the
/// use read: a slot read without one must hold none for its version now (a
/// stale row, of an older version, is replaced), a slot read with one must
/// still hold exactly that one. The slots' versions are checked (and
/// share-locked) with [`BatchWrite::slot_checks`] before. READ COMMITTED
/// re-checks each condition after waiting for a concurrent writer of the
/// same row, so of two writes judged on one use only the first stores.
async fn write_uses(tx: &Tx<'_>, stmts: &mut Cache, uses: &[UseWrite]) -> Result<(), StoreError> {
    #[derive(Default)]
    struct Cols<'a> {
        m: Vec<i64>,
        g: Vec<i64>,
        base: Vec<i64>,
        sid: Vec<&'a [u8]>,
        top: Vec<i64>,
        seen: Vec<i64>,
        read_sid: Vec<&'a [u8]>,
        read_top: Vec<i64>,
        read_seen: Vec<i64>,
    }
    let (mut first, mut next) = (Cols::default(), Cols::default());
    for w in uses {
        let c = if w.read.is_none() {
            &mut first
        } else {
            &mut next
        };
        c.m.push(i(w.member));
        c.g.push(i64::from(w.group));
        c.base.push(i(w.base));
        c.sid.push(&w.new.sid[..]);
        c.top.push(i(w.new.top));
        c.seen.push(i(w.new.seen));
        if let Some(r) = &w.read {
            c.read_sid.push(&r.sid[..]);
            c.read_top.push(i(r.top));
            c.read_seen.push(i(r.seen));
        }
    }
    let mut n = 0;
    if !first.m.is_empty() {
        let st = prep(
            tx,
            stmts,
            "INSERT INTO session_uses (member, grp, base, sid, top, seen) \
             SELECT * FROM UNNEST($1::int8[], $2::int8[], $3::int8[], $4::bytea[], $5::int8[], \
             $6::int8[]) ON CONFLICT (member, grp) DO UPDATE SET base = EXCLUDED.base, \
             sid = EXCLUDED.sid, top = EXCLUDED.top, seen = EXCLUDED.seen \
             WHERE session_uses.base <> EXCLUDED.base",
        )
        .await?;
        n += tx
            .execute(
                &st,
                &[
                    &first.m,
                    &first.g,
                    &first.base,
                    &first.sid,
                    &first.top,
                    &first.seen,
                ],
            )
            .await?;
    }
    if !next.m.is_empty() {
        let st = prep(
            tx,
            stmts,
            "UPDATE session_uses u SET sid = x.s, top = x.t, seen = x.n \
             FROM UNNEST($1::int8[], $2::int8[], $3::int8[], $4::bytea[], $5::int8[], \
             $6::int8[], $7::bytea[], $8::int8[], $9::int8[]) AS x(m, g, b, s, t, n, rs, rt, rn) \
             WHERE u.member = x.m AND u.grp = x.g AND u.base = x.b \
             AND u.sid = x.rs AND u.top = x.rt AND u.seen = x.rn",
        )
        .await?;
        n += tx
            .execute(
                &st,
                &[
                    &next.m,
                    &next.g,
                    &next.base,
                    &next.sid,
                    &next.top,
                    &next.seen,
                    &next.read_sid,
                    &next.read_top,
                    &next.read_seen,
                ],
            )
            .await?;
    }
    if n != uses.len() as u64 {
        return Err(StoreError::Conflict("session slot"));
    }
    Ok(())
}

/// `set_subscriptions` in `tx`, committed.
/// The transaction-scoped advisory lock of one gateway's subscription
/// set: key space `0x64677377` ("dgsw"), the gateway id hashed.
const GATEWAY_SUBSCRIPTION_LOCK_SQL: &str =
    "SELECT pg_advisory_xact_lock(1684501367, hashtext($1))";

async fn subscribe_tx(
    tx: Tx<'_>,
    stmts: &mut Cache,
    gateway: &str,
    groups: Vec<i64>,
    now_ms: u64,
) -> Result<u64, StoreError> {
    // One subscription change per gateway at a time (two UDC processes
    // answering the same gateway's retries): without it the second's
    // DELETE, its snapshot taken before the first committed, misses the
    // rows the first inserted, and its INSERT hits the primary key (500).
    // Taken first, before any row lock.
    let st = prep(&tx, stmts, GATEWAY_SUBSCRIPTION_LOCK_SQL).await?;
    tx.execute(&st, &[&gateway]).await?;
    let st = prep(
        &tx,
        stmts,
        "DELETE FROM subscriptions WHERE gateway = $1 RETURNING grp",
    )
    .await?;
    let old: Vec<i64> = tx
        .query(&st, &[&gateway])
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    let st = prep(
        &tx,
        stmts,
        "INSERT INTO subscriptions (gateway, grp) SELECT $1, g FROM UNNEST($2::int8[]) AS x(g)",
    )
    .await?;
    tx.execute(&st, &[&gateway, &groups]).await?;
    let added: Vec<i64> = groups.into_iter().filter(|g| !old.contains(g)).collect();
    let mut records = Vec::new();
    if !added.is_empty() {
        // The added groups' subscription locks, exclusive: a write
        // fanning a record out to one of them (a round's challenge)
        // takes it shared before it reads the subscribers
        // (`write_downlink`). Either that write committed before this
        // lock, so the next statement sees its round, or it waits for
        // this commit and then sees the new subscription rows. Either
        // way this gateway gets the challenge. (A lock on the group's
        // row would not do: a brand-new group's row may not exist yet.)
        lock_subscriptions(&tx, stmts, &added, true).await?;
        let st = prep(
            &tx,
            stmts,
            "SELECT grp, challenge FROM rounds WHERE status = $1 AND grp = ANY($2) \
             AND (closes_at_ms IS NULL OR closes_at_ms > $3) ORDER BY grp, round",
        )
        .await?;
        let open = round_status_code(RoundStatus::Open);
        for r in tx.query(&st, &[&open, &added, &ts(now_ms)]).await? {
            records.push(DownlinkRecord {
                audience: Audience::Group,
                group: u32_col(r.try_get(0)?, "round group")?,
                message: r.try_get(1)?,
            });
        }
    }
    let queued = records.len() as u64;
    if !records.is_empty() {
        let push = DownlinkPush {
            target: DownlinkTarget::Gateway(gateway.to_owned()),
            records,
        };
        write_downlink(&tx, stmts, &[push], ts(now_ms)).await?;
    }
    tx.commit().await?;
    Ok(queued)
}

/// Class (first key) of the transaction-scoped advisory locks that order
/// a group's fan-outs against subscriptions to it: "dgsu".
const SUBSCRIPTION_LOCK_CLASS: i32 = 0x6467_7375;

/// Subscription locks: a group takes lock `group % SUBSCRIPTION_LOCKS`.
/// Advisory locks take entries in PostgreSQL's shared lock table (about
/// 64 per connection by default), so a transaction naming thousands of
/// groups (a recovery's fan-out to every group, a first subscription to
/// 4,096) must not take one per group; groups sharing a lock only wait
/// for each other's subscriptions.
const SUBSCRIPTION_LOCKS: i64 = 256;

/// Takes the subscription locks of `groups`, exclusive or shared, in
/// ascending order, held until the transaction ends.
async fn lock_subscriptions(
    tx: &Tx<'_>,
    stmts: &mut Cache,
    groups: &[i64],
    exclusive: bool,
) -> Result<(), StoreError> {
    let mut keys: Vec<i32> = groups
        .iter()
        .map(|&g| (g.rem_euclid(SUBSCRIPTION_LOCKS)) as i32)
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let sql = if exclusive {
        "SELECT pg_advisory_xact_lock($1, g) FROM UNNEST($2::int4[]) AS x(g)"
    } else {
        "SELECT pg_advisory_xact_lock_shared($1, g) FROM UNNEST($2::int4[]) AS x(g)"
    };
    let st = prep(tx, stmts, sql).await?;
    tx.execute(&st, &[&SUBSCRIPTION_LOCK_CLASS, &keys]).await?;
    Ok(())
}

/// Appends records to gateway queues, fanning group records out to
/// subscribers; returns each touched queue's new head.
async fn write_downlink(
    tx: &Tx<'_>,
    stmts: &mut Cache,
    pushes: &[DownlinkPush],
    now: i64,
) -> Result<Vec<(String, u64)>, StoreError> {
    if pushes.is_empty() {
        return Ok(Vec::new());
    }
    // Subscribers of every group a fan-out push names, in one query.
    let mut fan_groups: Vec<i64> = pushes
        .iter()
        .filter(|p| p.target == DownlinkTarget::Subscribers)
        .flat_map(|p| p.records.iter().map(|r| i64::from(r.group)))
        .collect();
    fan_groups.sort_unstable();
    fan_groups.dedup();
    let mut subscribers: HashMap<u32, Vec<String>> = HashMap::new();
    if !fan_groups.is_empty() {
        // Shared: fan-outs to a group do not wait for each other, only for
        // a subscription to it being added (`set_subscriptions`).
        lock_subscriptions(tx, stmts, &fan_groups, false).await?;
        let st = prep(
            tx,
            stmts,
            "SELECT grp, gateway FROM subscriptions WHERE grp = ANY($1) ORDER BY grp, gateway COLLATE \"C\"",
        )
        .await?;
        for r in tx.query(&st, &[&fan_groups]).await? {
            let g = u32_col(r.try_get(0)?, "subscription group")?;
            subscribers.entry(g).or_default().push(r.try_get(1)?);
        }
    }
    let mut per_gateway: BTreeMap<&str, Vec<&DownlinkRecord>> = BTreeMap::new();
    for p in pushes {
        for rec in &p.records {
            match &p.target {
                DownlinkTarget::Gateway(g) => per_gateway.entry(g.as_str()).or_default().push(rec),
                DownlinkTarget::Subscribers => {
                    for g in subscribers.get(&rec.group).into_iter().flatten() {
                        per_gateway.entry(g.as_str()).or_default().push(rec);
                    }
                }
            }
        }
    }
    let head = prep(
        tx,
        stmts,
        "INSERT INTO downlink_heads (gateway, last_cursor) \
         VALUES ($1, $2 + (SELECT floor FROM recovery WHERE id = 1)) \
         ON CONFLICT (gateway) DO UPDATE SET last_cursor = downlink_heads.last_cursor + $2 \
         RETURNING last_cursor",
    )
    .await?;
    let ins = prep(
        tx,
        stmts,
        "INSERT INTO downlink (gateway, cursor, n, audience, grp, member, message, \
         created_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .await?;
    let mut heads = Vec::with_capacity(per_gateway.len());
    for (gateway, recs) in per_gateway {
        let n = recs.len() as i64;
        let last: i64 = tx.query_one(&head, &[&gateway, &n]).await?.try_get(0)?;
        // One row per queue: a single record as is, several as a bundle
        // keyed by the last cursor (migration 3).
        let (aud, grp, member, message) = match recs[..] {
            [rec] => {
                let (aud, member) = audience_cols(rec.audience);
                (aud, i64::from(rec.group), member, rec.message.clone())
            }
            _ => (0, 0, 0, bundle(&recs)),
        };
        tx.execute(
            &ins,
            &[&gateway, &last, &n, &aud, &grp, &member, &message, &now],
        )
        .await?;
        heads.push((gateway.to_owned(), u(last)));
    }
    Ok(heads)
}

// ---------------------------------------------------------------------------
// The trait
// ---------------------------------------------------------------------------

impl Store for PostgresStore {
    async fn members(&self, ids: Vec<u64>) -> Result<Vec<Option<MemberRow>>, StoreError> {
        let keys: Vec<i64> = ids.iter().map(|v| i(*v)).collect();
        members_in_order(&ids, self.query(MEMBERS_SQL, &[&keys]).await?)
    }

    async fn list_members(
        &self,
        after: Option<u64>,
        limit: u32,
    ) -> Result<Vec<MemberRow>, StoreError> {
        const SQL: &str = "SELECT m.id, m.kv, m.key_source, m.imported_key, m.status, m.added_at_ms, \
                 COALESCE((SELECT array_agg(mg.grp ORDER BY mg.grp) FROM member_groups mg \
                 WHERE mg.member = m.id), '{}'::int8[]), COALESCE(m.min_kv, m.kv) FROM members m \
                 WHERE m.id >= $1 ORDER BY m.id LIMIT $2";
        let Some(from) = page_from(after) else {
            return Ok(Vec::new());
        };
        rows(
            self.query(SQL, &[&from, &i64::from(limit)]).await?,
            member_row,
        )
    }

    async fn group_members(
        &self,
        group: u32,
        after: Option<u64>,
        limit: u32,
    ) -> Result<Vec<u64>, StoreError> {
        let Some(from) = page_from(after) else {
            return Ok(Vec::new());
        };
        let r = self
            .query(
                "SELECT mg.member FROM member_groups mg JOIN members m ON m.id = mg.member \
                 WHERE mg.grp = $1 AND m.status = 0 AND mg.member >= $2 \
                 ORDER BY mg.member LIMIT $3",
                &[&i64::from(group), &from, &i64::from(limit)],
            )
            .await?;
        rows(r, |x| Ok(u(x.try_get(0)?)))
    }

    async fn set_member_status(&self, id: u64, status: MemberStatus) -> Result<bool, StoreError> {
        let n = self
            .exec(
                "UPDATE members SET status = $2 WHERE id = $1",
                &[&i(id), &member_status_code(status)],
            )
            .await?;
        Ok(n == 1)
    }

    async fn set_kv(&self, id: u64, kv: u32, key_source: KeySource) -> Result<bool, StoreError> {
        let (ks, key) = key_source_cols(&key_source);
        let n = self
            .exec(
                "UPDATE members SET kv = $2, min_kv = $2, key_source = $3, imported_key = $4 \
                 WHERE id = $1",
                &[&i(id), &i64::from(kv), &ks, &key],
            )
            .await?;
        Ok(n == 1)
    }

    async fn insert_group(&self, row: GroupRow) -> Result<(), StoreError> {
        let mut g = self.conn().await?;
        let Conn { client, stmts } = &mut *g;
        insert_group(&*client, stmts, &row).await
    }

    async fn group(&self, group: u32) -> Result<Option<GroupRow>, StoreError> {
        let r = self.query(GROUP_SQL, &[&i64::from(group)]).await?;
        Ok(rows(r, group_row)?.pop())
    }

    async fn list_groups(&self) -> Result<Vec<GroupRow>, StoreError> {
        let r = self
            .query(
                "SELECT grp, epoch, next_round, seq, config_hash, state, version FROM group_state \
                 ORDER BY grp",
                &[],
            )
            .await?;
        rows(r, group_row)
    }

    async fn round(&self, group: u32, round: u64) -> Result<Option<RoundRow>, StoreError> {
        let r = self
            .query(ROUND_SQL, &[&i64::from(group), &i(round)])
            .await?;
        Ok(rows(r, round_row)?.pop())
    }

    async fn open_rounds(&self) -> Result<Vec<RoundRow>, StoreError> {
        let r = self
            .query(
                "SELECT grp, round, opened_at_ms, closes_at_ms, mode, purpose, challenge, state, status \
                 FROM rounds WHERE status = 0 ORDER BY grp, round",
                &[],
            )
            .await?;
        rows(r, round_row)
    }

    async fn round_report(
        &self,
        group: u32,
        round: u64,
    ) -> Result<Option<RoundReport>, StoreError> {
        let mut g = self.conn().await?;
        let Conn { client, stmts } = &mut *g;
        // One snapshot for the three queries.
        let tx = snapshot(client).await?;
        let (gk, rk) = (i64::from(group), i(round));
        let st = prep(
            &tx,
            stmts,
            "SELECT grp, round, opened_at_ms, closes_at_ms, mode, purpose, challenge, state, \
             status, localizations FROM rounds WHERE grp = $1 AND round = $2",
        )
        .await?;
        let Some(row) = tx.query_opt(&st, &[&gk, &rk]).await? else {
            return Ok(None);
        };
        let (rr, localizations) = (round_row(&row)?, u(row.try_get(9)?));
        let folded = fold_outcomes(round_outcome_rows(&tx, stmts, group, round).await?);
        let active = active_members(&tx, stmts, group, None).await?;
        tx.commit().await?;
        Ok(Some(report(rr, &folded, &active, localizations)))
    }

    async fn round_outcomes(
        &self,
        group: u32,
        round: u64,
        after: Option<u64>,
        limit: u32,
    ) -> Result<Vec<OutcomeRow>, StoreError> {
        let mut g = self.conn().await?;
        let Conn { client, stmts } = &mut *g;
        let tx = snapshot(client).await?;
        let folded = fold_outcomes(round_outcome_rows(&tx, stmts, group, round).await?);
        tx.commit().await?;
        Ok(outcomes_page(folded, after, limit))
    }

    async fn round_missing(
        &self,
        group: u32,
        round: u64,
        after: Option<u64>,
        limit: u32,
    ) -> Result<Vec<u64>, StoreError> {
        let mut g = self.conn().await?;
        let Conn { client, stmts } = &mut *g;
        let tx = snapshot(client).await?;
        let folded = fold_outcomes(round_outcome_rows(&tx, stmts, group, round).await?);
        let active = active_members(&tx, stmts, group, after).await?;
        tx.commit().await?;
        Ok(missing_page(&folded, active, limit))
    }

    async fn verdict(
        &self,
        gateway: &str,
        batch_id: u64,
    ) -> Result<Option<StoredVerdict>, StoreError> {
        let r = self
            .query(
                "SELECT batch_hash, verdict, final FROM verdicts WHERE gateway = $1 AND batch_id = $2",
                &[&gateway, &i(batch_id)],
            )
            .await?;
        Ok(rows(r, |x| {
            Ok(StoredVerdict {
                batch_hash: hash_col(x.try_get(0)?, "batch hash")?,
                verdict: x.try_get(1)?,
                is_final: x.try_get::<_, i64>(2)? != 0,
            })
        })?
        .pop())
    }

    async fn pending_localization(
        &self,
        gateway: &str,
        batch_id: u64,
    ) -> Result<Option<PendingLocalization>, StoreError> {
        let r = self
            .query(
                "SELECT gateway, batch_id, batch_hash, verdict, pending, expires_at_ms FROM localizations \
                 WHERE gateway = $1 AND batch_id = $2",
                &[&gateway, &i(batch_id)],
            )
            .await?;
        Ok(rows(r, localization_row)?.pop())
    }

    async fn expired_localizations(
        &self,
        now_ms: u64,
        limit: u32,
    ) -> Result<Vec<PendingLocalization>, StoreError> {
        let r = self
            .query(
                "SELECT gateway, batch_id, batch_hash, verdict, pending, expires_at_ms FROM localizations \
                 WHERE expires_at_ms <= $1 ORDER BY expires_at_ms, gateway COLLATE \"C\", batch_id LIMIT $2",
                &[&i(now_ms), &i64::from(limit)],
            )
            .await?;
        rows(r, localization_row)
    }

    async fn apply_batch(&self, write: BatchWrite) -> Result<Applied, StoreError> {
        let mut g = self.conn().await?;
        apply(&mut g, write).await
    }

    async fn sessions(&self, keys: Vec<(u64, u32)>) -> Result<Vec<Option<StoredSlot>>, StoreError> {
        let m: Vec<i64> = keys.iter().map(|k| i(k.0)).collect();
        let g: Vec<i64> = keys.iter().map(|k| i64::from(k.1)).collect();
        slots_in_order(&keys, self.query(SESSIONS_SQL, &[&m, &g]).await?)
    }

    async fn batch_reads(
        &self,
        group: u32,
        ids: Vec<u64>,
        round: Option<u64>,
        fetch: Option<MemberFetch>,
    ) -> Result<BatchReads, StoreError> {
        let mut c = self.conn().await?;
        let Conn { client, stmts } = &mut *c;
        // One snapshot: the registry version, the group's epoch and the
        // member rows are of one instant, so a revocation committed after
        // it fails the batch's write on the epoch check, and one committed
        // before it is seen both in the version and in the rows.
        let tx = snapshot(client).await?;
        let st = prep(&tx, stmts, REGISTRY_VERSION_SQL).await?;
        let v: i64 = tx
            .query_opt(&st, &[])
            .await?
            .ok_or(StoreError::Corrupt("registry version row missing"))?
            .try_get(0)?;
        let registry_version = u(v);
        let st = prep(&tx, stmts, GROUP_SQL).await?;
        let group_row = rows(tx.query(&st, &[&i64::from(group)]).await?, group_row)?.pop();
        let round = match round {
            Some(r) => {
                let st = prep(&tx, stmts, ROUND_SQL).await?;
                rows(tx.query(&st, &[&i64::from(group), &i(r)]).await?, round_row)?.pop()
            }
            None => None,
        };
        let (asked, members_of) = MemberFetch::ids_to_read(fetch.as_ref(), registry_version, &ids);
        let keys: Vec<i64> = asked.iter().map(|v| i(*v)).collect();
        let st = prep(&tx, stmts, MEMBERS_SQL).await?;
        let members = members_in_order(asked, tx.query(&st, &[&keys]).await?)?;
        let slot_keys: Vec<(u64, u32)> = ids.iter().map(|m| (*m, group)).collect();
        let m: Vec<i64> = ids.iter().map(|v| i(*v)).collect();
        let g: Vec<i64> = vec![i64::from(group); ids.len()];
        let st = prep(&tx, stmts, SESSIONS_SQL).await?;
        let sessions =
            BatchSlot::from_stored(slots_in_order(&slot_keys, tx.query(&st, &[&m, &g]).await?)?);
        tx.commit().await?;
        Ok(BatchReads {
            group: group_row,
            registry_version,
            members_of,
            members,
            sessions,
            round,
        })
    }

    async fn member_sessions(&self, first: u64, last: u64) -> Result<Vec<StoredSlot>, StoreError> {
        let r = self
            .query(
                "SELECT s.member, s.grp, s.last_auth_ms, s.sid, s.state, s.round, s.version, \
                 s.acc_top, s.acc_seen, u.sid, u.top, u.seen FROM sessions s \
                 LEFT JOIN session_uses u \
                 ON u.member = s.member AND u.grp = s.grp AND u.base = s.version \
                 WHERE s.member BETWEEN $1 AND $2 ORDER BY s.member, s.grp",
                &[&i(first), &i(last)],
            )
            .await?;
        rows(r, stored_slot)
    }

    async fn drop_all_sessions(&self) -> Result<u64, StoreError> {
        let mut c = self.conn().await?;
        let Conn { client, stmts } = &mut *c;
        let tx = client.transaction().await?;
        let st = prep(
            &tx,
            stmts,
            "UPDATE sessions SET sid = NULL, state = NULL, version = version + 1 \
             WHERE sid IS NOT NULL",
        )
        .await?;
        let n = tx.execute(&st, &[]).await?;
        // Stale now (the versions moved); deleted so none outlives its
        // slot's sessions.
        let st = prep(&tx, stmts, "DELETE FROM session_uses").await?;
        tx.execute(&st, &[]).await?;
        tx.commit().await?;
        Ok(n)
    }

    async fn recovery_state(&self) -> Result<RecoveryState, StoreError> {
        let r = self.query(RECOVERY_SQL, &[]).await?;
        recovery_state(r.first())
    }

    async fn recovery_reads(&self) -> Result<RecoveryReads, StoreError> {
        let mut c = self.conn().await?;
        let Conn { client, stmts } = &mut *c;
        let tx = snapshot(client).await?;
        let st = prep(&tx, stmts, RECOVERY_SQL).await?;
        let state = recovery_state(tx.query(&st, &[]).await?.first())?;
        let st = prep(
            &tx,
            stmts,
            "SELECT grp, epoch, next_round, seq, config_hash, state, version FROM group_state \
             ORDER BY grp",
        )
        .await?;
        let groups = rows(tx.query(&st, &[]).await?, group_row)?;
        let st = prep(
            &tx,
            stmts,
            "SELECT grp FROM member_groups UNION SELECT grp FROM subscriptions \
             UNION SELECT grp FROM schedules EXCEPT SELECT grp FROM group_state ORDER BY 1",
        )
        .await?;
        let named_without_row = rows(tx.query(&st, &[]).await?, |r| {
            let g: i64 = r.try_get(0)?;
            u32::try_from(g).map_err(|_| StoreError::Corrupt("group id"))
        })?;
        let st = prep(
            &tx,
            stmts,
            "SELECT grp, round, opened_at_ms, closes_at_ms, mode, purpose, challenge, state, status \
             FROM rounds WHERE status = 0 ORDER BY grp, round",
        )
        .await?;
        let open_rounds = rows(tx.query(&st, &[]).await?, round_row)?;
        let st = prep(&tx, stmts, NEWEST_RECORD_SQL).await?;
        let newest: Option<i64> = tx.query_one(&st, &[]).await?.try_get(0)?;
        tx.commit().await?;
        Ok(RecoveryReads {
            state,
            groups,
            named_without_row,
            open_rounds,
            newest_record_ms: newest.map(u),
        })
    }

    async fn recover(&self, write: RecoveryWrite) -> Result<RecoveryApplied, StoreError> {
        let mut g = self.conn().await?;
        // A deadlock PostgreSQL breaks (a UDC process still writing, which
        // the operator should have stopped) is a conflict: exit 75, retry.
        recover(&mut g, write).await.map_err(conflict_if_deadlock)
    }

    async fn registry_version(&self) -> Result<u64, StoreError> {
        let r = self.query(REGISTRY_VERSION_SQL, &[]).await?;
        let v: i64 = r
            .first()
            .ok_or(StoreError::Corrupt("registry version row missing"))?
            .try_get(0)?;
        Ok(u(v))
    }

    async fn count_sessions(&self) -> Result<u64, StoreError> {
        let r = self
            .query("SELECT count(*) FROM sessions WHERE sid IS NOT NULL", &[])
            .await?;
        let n: i64 = r
            .first()
            .ok_or(StoreError::Corrupt("count returned no row"))?
            .try_get(0)?;
        Ok(u(n))
    }

    async fn read_downlink(
        &self,
        gateway: &str,
        after: u64,
        limit: u32,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        // Rows are keyed by their last cursor: a bundle straddling `after`
        // is read whole and cut. The query returns all its rows at once, so
        // it leaves out (by the message bytes of the rows before each, read
        // from their size headers) the rows that the page would not take.
        let r = self
            .query(
                "SELECT cursor, n, audience, grp, member, message FROM ( \
                   SELECT cursor, n, audience, grp, member, message, \
                     coalesce(sum(octet_length(message)) OVER (ORDER BY cursor \
                       ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS before \
                   FROM downlink WHERE gateway = $1 AND cursor > $2 \
                   ORDER BY cursor LIMIT $3) AS page \
                 WHERE before < $4 ORDER BY cursor",
                &[
                    &gateway,
                    &i(after),
                    &i64::from(limit),
                    &i64::try_from(DOWNLINK_PAGE_BYTES).unwrap_or(i64::MAX),
                ],
            )
            .await?;
        let mut page = DownlinkPage::new(limit);
        for x in r {
            if page.full() {
                break;
            }
            DownlinkRow {
                last: u(x.try_get(0)?),
                n: x.try_get(1)?,
                audience: x.try_get(2)?,
                group: x.try_get(3)?,
                member: x.try_get(4)?,
                message: x.try_get(5)?,
            }
            .unbundle(after, &mut page)?;
        }
        Ok(page.records)
    }

    async fn latest_cursor(&self, gateway: &str) -> Result<u64, StoreError> {
        let r = self
            .query(
                "SELECT last_cursor FROM downlink_heads WHERE gateway = $1",
                &[&gateway],
            )
            .await?;
        match r.first() {
            Some(x) => Ok(u(x.try_get(0)?)),
            None => Ok(0),
        }
    }

    async fn trim_downlink(&self, before_ms: u64) -> Result<u64, StoreError> {
        // Records, not rows (a row may hold a bundle).
        let r = self
            .query(
                "WITH d AS (DELETE FROM downlink WHERE created_at_ms < $1 RETURNING n) \
                 SELECT coalesce(sum(n), 0)::int8 FROM d",
                &[&i(before_ms)],
            )
            .await?;
        let n: i64 = r.first().map_or(Ok(0), |x| x.try_get(0))?;
        Ok(u(n))
    }

    async fn trim_readings(&self, before_ms: u64) -> Result<u64, StoreError> {
        self.exec("DELETE FROM readings WHERE ts_ms < $1", &[&ts(before_ms)])
            .await
    }

    async fn trim_verdicts(&self, before_ms: u64) -> Result<u64, StoreError> {
        self.exec(
            "DELETE FROM verdicts WHERE final = 1 AND created_at_ms < $1",
            &[&ts(before_ms)],
        )
        .await
    }

    async fn set_subscriptions(
        &self,
        gateway: &str,
        groups: Vec<u32>,
        now_ms: u64,
    ) -> Result<u64, StoreError> {
        let groups: Vec<i64> = normalized_groups(&groups)
            .into_iter()
            .map(i64::from)
            .collect();
        let mut g = self.conn().await?;
        let Conn { client, stmts } = &mut *g;
        let tx = client.transaction().await?;
        // A deadlock PostgreSQL breaks (the subscription locks, the
        // gateway's downlink head) is a conflict the gateway retries.
        subscribe_tx(tx, stmts, gateway, groups, now_ms)
            .await
            .map_err(conflict_if_deadlock)
    }

    async fn subscriptions(&self, gateway: &str) -> Result<Vec<u32>, StoreError> {
        let r = self
            .query(
                "SELECT grp FROM subscriptions WHERE gateway = $1 ORDER BY grp",
                &[&gateway],
            )
            .await?;
        rows(r, |x| u32_col(x.try_get(0)?, "subscription group"))
    }

    async fn group_message(
        &self,
        group: u32,
        seq: u64,
    ) -> Result<Option<GroupMessageRow>, StoreError> {
        let r = self
            .query(
                "SELECT epoch, bytes, payload_hash, created_at_ms FROM group_messages \
                 WHERE grp = $1 AND seq = $2",
                &[&i64::from(group), &i(seq)],
            )
            .await?;
        Ok(rows(r, |x| {
            Ok(GroupMessageRow {
                group,
                seq,
                epoch: u(x.try_get(0)?),
                bytes: x.try_get(1)?,
                payload_hash: hash_col(x.try_get(2)?, "group message hash")?,
                created_at_ms: u(x.try_get(3)?),
            })
        })?
        .pop())
    }

    async fn acks(
        &self,
        group: u32,
        seq: u64,
        after: Option<u64>,
        limit: u32,
    ) -> Result<AckPage, StoreError> {
        let mut g = self.conn().await?;
        let Conn { client, stmts } = &mut *g;
        let tx = snapshot(client).await?;
        let st = prep(
            &tx,
            stmts,
            "SELECT count(*) FROM acks WHERE grp = $1 AND seq = $2",
        )
        .await?;
        let total: i64 = tx
            .query_one(&st, &[&i64::from(group), &i(seq)])
            .await?
            .try_get(0)?;
        let r = match page_from(after) {
            None => Vec::new(),
            Some(from) => {
                let st = prep(
                    &tx,
                    stmts,
                    "SELECT member, at_ms FROM acks WHERE grp = $1 AND seq = $2 \
                     AND member >= $3 ORDER BY member LIMIT $4",
                )
                .await?;
                tx.query(&st, &[&i64::from(group), &i(seq), &from, &i64::from(limit)])
                    .await?
            }
        };
        tx.commit().await?;
        let acks = rows(r, |x| {
            Ok(AckRow {
                group,
                seq,
                member: u(x.try_get(0)?),
                at_ms: u(x.try_get(1)?),
            })
        })?;
        Ok(AckPage {
            total: u(total),
            acks,
        })
    }

    async fn insert_schedule(&self, row: ScheduleRow) -> Result<u64, StoreError> {
        let r = self
            .query(
                "INSERT INTO schedules (grp, every_ms, mode, purpose, next_at_ms, read_request) \
                 VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
                &[
                    &i64::from(row.group),
                    &i(row.every_ms),
                    &mode_code(row.mode),
                    &purpose_code(row.purpose),
                    &i(row.next_at_ms),
                    &row.read_request,
                ],
            )
            .await?;
        let first = r
            .first()
            .ok_or(StoreError::Corrupt("insert returned no id"))?;
        Ok(u(first.try_get(0)?))
    }

    async fn schedules(&self) -> Result<Vec<ScheduleRow>, StoreError> {
        let r = self
            .query(
                "SELECT id, grp, every_ms, mode, purpose, next_at_ms, read_request FROM schedules \
                 ORDER BY id",
                &[],
            )
            .await?;
        rows(r, schedule_row)
    }

    async fn claim_schedule(
        &self,
        id: u64,
        expected_next_ms: u64,
        next_ms: u64,
    ) -> Result<bool, StoreError> {
        let n = self
            .exec(
                CLAIM_SCHEDULE_SQL,
                &[&i(id), &i(expected_next_ms), &i(next_ms)],
            )
            .await?;
        Ok(n == 1)
    }

    async fn delete_schedule(&self, id: u64) -> Result<bool, StoreError> {
        Ok(self
            .exec("DELETE FROM schedules WHERE id = $1", &[&i(id)])
            .await?
            == 1)
    }

    async fn readings_after(
        &self,
        member: u64,
        from_ms: u64,
        to_ms: u64,
        after: Option<ReadingKey>,
        limit: u32,
    ) -> Result<Vec<ReadingRow>, StoreError> {
        // readings_by_key (member, ts_ms, grp, sid, ctr) is the order below,
        // with no sort step, and the row comparison (an index condition
        // after `member =`) is where the index scan starts: a page reads
        // its `limit` readings and no more. A key before `from` starts
        // nothing (every reading of the range comes after it); one at or
        // after `from` makes `from` moot.
        let r = match after.filter(|k| i(k.ts_ms) >= ts(from_ms)) {
            None => {
                self.query(
                    "SELECT grp, sid, ctr, ts_ms, kind, payload FROM readings WHERE member = $1 \
                     AND ts_ms >= $2 AND ts_ms < $3 ORDER BY ts_ms, grp, sid, ctr LIMIT $4",
                    &[&i(member), &ts(from_ms), &ts(to_ms), &i64::from(limit)],
                )
                .await?
            }
            Some(k) => {
                self.query(
                    "SELECT grp, sid, ctr, ts_ms, kind, payload FROM readings WHERE member = $1 \
                     AND (ts_ms, grp, sid, ctr) > ($4, $5, $6, $7) AND ts_ms < $2 \
                     ORDER BY ts_ms, grp, sid, ctr LIMIT $3",
                    &[
                        &i(member),
                        &ts(to_ms),
                        &i64::from(limit),
                        &i(k.ts_ms),
                        &i64::from(k.group),
                        &&k.sid[..],
                        &i(k.ctr),
                    ],
                )
                .await?
            }
        };
        rows(r, |x| {
            Ok(ReadingRow {
                member,
                group: u32_col(x.try_get(0)?, "reading group")?,
                sid: sid_col(x.try_get(1)?)?,
                ctr: u(x.try_get(2)?),
                ts_ms: u(x.try_get(3)?),
                kind: u8::try_from(x.try_get::<_, i64>(4)?)
                    .map_err(|_| StoreError::Corrupt("reading kind"))?,
                payload: x.try_get(5)?,
            })
        })
    }

    async fn gateways(&self) -> Result<Vec<GatewayRow>, StoreError> {
        let r = self
            .query(
                "SELECT gateway, batches, entries, accepted, localizations, unverified, last_batch_ms \
                 FROM gateways ORDER BY gateway COLLATE \"C\"",
                &[],
            )
            .await?;
        rows(r, |x| {
            Ok(GatewayRow {
                gateway: x.try_get(0)?,
                batches: u(x.try_get(1)?),
                entries: u(x.try_get(2)?),
                accepted: u(x.try_get(3)?),
                localizations: u(x.try_get(4)?),
                unverified: u(x.try_get(5)?),
                last_batch_ms: u(x.try_get(6)?),
            })
        })
    }
}
