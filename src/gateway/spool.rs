//! The gateway's on-disk spool: store-and-forward between members and the UDC.
//!
//! ```text
//! member --HTTPS--> server --append--> [spool] --seal_batch--> upstream --> UDC
//!                                        |  ^                                |
//! member <--long-poll-- read_downlink ---+  +---- complete_batch(verdict) ---+
//! ```
//!
//! The server answers a member 202 only after [`Spool::append`] returned, that
//! is after the entry is durable. The batcher seals entries into a batch
//! ([`Spool::seal_batch`]) with the exact bytes it sends upstream, and
//! [`Spool::complete_batch`] drops them, in the same transaction that queues
//! the downlink items (confirms) taken from the UDC's verdict. Members read the
//! downlink with a cursor, so a reconnecting member misses nothing and gets
//! nothing twice.
//!
//! # Durability
//!
//! The spool is one SQLite database (`spool.db`) in WAL mode with
//! `synchronous=FULL`. Every write goes through one writer thread which drains
//! all queued requests, applies them in one transaction (taking in, before
//! the commit, those queued while it applied them) and commits; only then
//! does it answer the callers (group commit). With `synchronous=FULL` the
//! commit returns after the WAL was `fsync`ed, and a checkpoint `fsync`s the
//! database before the WAL is reused. Therefore:
//!
//! - **kill -9 / a crash of the process**: everything acknowledged survives.
//!   On the next [`Spool::open`] SQLite replays the WAL; entries without a
//!   verdict are pending again, sealed batches are re-listed by
//!   [`Spool::pending_batches`] with their identical bytes, and counters
//!   (batch ids, entry ids, cursors) continue above every value ever handed
//!   out.
//! - **power loss or a kernel crash**: everything acknowledged survives,
//!   provided the storage honours `fsync` (flushes its volatile write cache).
//!   A disk or hypervisor that acknowledges a flush it did not perform (write
//!   cache without power-loss protection, `cache=unsafe`) voids this, and no
//!   software above it can tell.
//! - An unacknowledged request may or may not have been stored; the member
//!   re-sends and the duplicate rules below make the re-send harmless.
//! - A failed commit (disk full, I/O error) fails every request of that group
//!   with [`SpoolError::Storage`]; none of them was acknowledged.
//!
//! The directory entry of a new database is made durable by `fsync`ing the
//! directory after creation, and an exclusive lock on `spool.lock` keeps a
//! second process from opening the same spool.
//!
//! # Why SQLite (rusqlite, bundled) rather than redb
//!
//! The spool needs three uniqueness rules (a member's response per round, a
//! member's uplink per `(sid, ctr)`, a downlink item per audience) and lookups
//! by batch, by stream and by audience-and-cursor. In SQLite these are
//! declared indexes checked inside the same transaction; in redb (a key-value
//! store) each would be a second table we keep in step by hand. SQLite's WAL
//! crash recovery has a long record and is tested against simulated power
//! loss; its durability contract (`synchronous=FULL`) is documented exactly.
//! An operator can inspect a spool with the `sqlite3` shell. rusqlite was
//! already in the dependency set and builds SQLite from source, so no system
//! library is needed. The honest costs: SQLite is C behind FFI, SQL is checked
//! at run time rather than compile time (every statement is exercised by the
//! tests), and each row pays some SQL overhead (statements are cached). redb
//! would be pure Rust; its commit speed would not change our numbers much,
//! because group commit makes the bound one `fsync` per group, not per entry.
//!
//! # Accounting
//!
//! [`Spool::bytes`] is the sum of the stored blob lengths plus
//! [`ROW_OVERHEAD`] per row, over entries, sealed batches (their bytes and
//! 16 bytes per tag), downlink items (their bytes and a 32-byte digest) and
//! completion records (a 32-byte verdict hash). It is an accounting figure,
//! not the file size: SQLite pages carry slack and the WAL grows up to a
//! checkpoint. Only [`Spool::append`] and [`Spool::push_downlink`] are refused
//! when the spool is full; sealing a batch and completing one are always
//! accepted, because refusing them would wedge the pipeline that frees space.
//! A batch repeats its entries' bytes, so the database may hold up to about
//! twice `max_bytes` while every entry is sealed and unanswered.
//!
//! # Share per source
//!
//! Opened with [`Spool::open_with_source_share`], the spool also bounds what
//! one source may hold: the entries appended by [`Spool::append_from`] count
//! against their source (an IPv4 address, an IPv6 /64: the same key as the
//! per-source connection cap in `crate::limits`) until the UDC has
//! answered for them, and an append that would take a source beyond its
//! share is [`SpoolError::SourceFull`], so one client posting messages for
//! made-up member ids cannot fill the spool for every member. A source's
//! count rises with each append that commits and falls when its entry
//! leaves: discarded, completed by a verdict, or dead-lettered. The counts
//! live in the writer only (a source whose count reaches 0 is forgotten) and
//! are rebuilt from the `source` column of `entries` on [`Spool::open`].

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::Duration;

use bytes::Bytes;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, oneshot, watch};

/// Bytes charged per stored row on top of its blobs (row header, integer
/// columns, index entries). An estimate that errs high for small rows.
pub const ROW_OVERHEAD: u64 = 64;

/// The `Retry-After` hint carried by [`SpoolError::Full`]: a batch round trip
/// to the UDC usually frees space well within this.
pub const FULL_RETRY_AFTER: Duration = Duration::from_secs(2);

/// Most groups one [`Spool::read_downlink`] call may name.
pub const MAX_READ_GROUPS: usize = 256;

/// Most items one [`Spool::read_downlink`] call returns.
pub const MAX_READ_LIMIT: usize = 4096;

/// Longest key accepted by [`Spool::set_meta`].
pub const MAX_META_KEY: usize = 128;

/// Longest value accepted by [`Spool::set_meta`].
pub const MAX_META_VALUE: usize = 4096;

/// The database file inside the spool directory.
const DB_FILE: &str = "spool.db";
/// The lock file that keeps a second process out.
const LOCK_FILE: &str = "spool.lock";
/// Most requests applied in one transaction; bounds the latency of a group.
const MAX_GROUP: usize = 4096;
/// Idle reader connections kept for the async read methods.
const READ_POOL: usize = 4;
/// Audience kinds in the `downlink` table.
const AUD_GROUP: i64 = 1;
const AUD_MEMBER: i64 = 2;
/// Stream kinds in the `entries` table.
const STREAM_ROUND: i64 = 1;
const STREAM_UPLINK: i64 = 2;
/// Different messages kept per slot ((group, round, member) for responses,
/// (member, sid, ctr) for uplinks): the aggregator's cap, so the spool never
/// acknowledges what the aggregator would refuse.
const MAX_VARIANTS: usize = crate::protocol::aggregator::MAX_VARIANTS;
/// Name of the batch id counter in the `counters` table.
const BATCH_COUNTER: &str = "batch_id";

/// Schema migrations; entry `i` moves `user_version` from `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // v1
    "CREATE TABLE entries (
        id       INTEGER PRIMARY KEY AUTOINCREMENT,
        kind     INTEGER NOT NULL,          -- 1 = round response, 2 = uplink
        grp      INTEGER NOT NULL,
        round    INTEGER NOT NULL,          -- 0 for uplinks
        member   INTEGER NOT NULL,          -- u64 stored as its i64 bit pattern
        sort_key BLOB    NOT NULL,
        bytes    BLOB    NOT NULL,
        batch_id INTEGER                    -- NULL until sealed
     );
     CREATE UNIQUE INDEX entries_round_slot ON entries(grp, round, member) WHERE kind = 1;
     CREATE UNIQUE INDEX entries_uplink_slot ON entries(member, sort_key) WHERE kind = 2;
     CREATE INDEX entries_batch ON entries(batch_id) WHERE batch_id IS NOT NULL;
     CREATE TABLE batches (
        id          INTEGER PRIMARY KEY,
        bytes       BLOB    NOT NULL,
        tags        BLOB    NOT NULL,       -- 16 bytes per entry, batch order
        entry_count INTEGER NOT NULL
     );
     CREATE TABLE completed (
        id           INTEGER PRIMARY KEY,
        verdict_hash BLOB    NOT NULL,
        completed_ms INTEGER NOT NULL
     );
     CREATE INDEX completed_age ON completed(completed_ms);
     CREATE TABLE downlink (
        cursor     INTEGER PRIMARY KEY AUTOINCREMENT,
        aud_kind   INTEGER NOT NULL,        -- 1 = group, 2 = member
        aud_id     INTEGER NOT NULL,
        kind       INTEGER NOT NULL,
        digest     BLOB    NOT NULL,        -- SHA-256(kind || bytes)
        bytes      BLOB    NOT NULL,
        created_ms INTEGER NOT NULL
     );
     CREATE UNIQUE INDEX downlink_dedup ON downlink(aud_kind, aud_id, digest);
     CREATE INDEX downlink_audience ON downlink(aud_kind, aud_id, cursor);
     CREATE INDEX downlink_age ON downlink(created_ms);
     CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
     INSERT INTO counters (name, value) VALUES ('batch_id', 0);
     CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;",
    // v2: a different message under a taken slot is kept as an alternative
    // (up to MAX_VARIANTS per slot) instead of refused: the gateway holds no
    // key, so "first one wins" would let any device pre-empt a member.
    "DROP INDEX entries_round_slot;
     DROP INDEX entries_uplink_slot;
     CREATE INDEX entries_round_slot ON entries(grp, round, member) WHERE kind = 1;
     CREATE INDEX entries_uplink_slot ON entries(member, sort_key) WHERE kind = 2;",
    // v3: the routing state that must survive a restart: which members are
    // attached to which groups (the subscription and who a round expects),
    // and the rounds whose challenge was relayed (so their responses are
    // still taken after a restart).
    "CREATE TABLE attached (
        member INTEGER PRIMARY KEY,         -- u64 as its i64 bit pattern
        groups BLOB    NOT NULL             -- u32 big-endian each, sorted
     ) WITHOUT ROWID;
     CREATE TABLE open_rounds (
        grp         INTEGER NOT NULL,
        round       INTEGER NOT NULL,
        mode        INTEGER NOT NULL,
        deadline_ms INTEGER NOT NULL,       -- unix ms
        PRIMARY KEY (grp, round)
     ) WITHOUT ROWID;",
    // v4: batches the UDC refused outright (400, 409, 413), kept for the
    // operator instead of dropped.
    "CREATE TABLE dead_letters (
        batch_id   INTEGER PRIMARY KEY,
        status     INTEGER NOT NULL,        -- the UDC's HTTP status
        reason     TEXT    NOT NULL,        -- the UDC's error body (capped)
        entries    INTEGER NOT NULL,
        bytes      BLOB    NOT NULL,        -- the batch exactly as sent
        tags       BLOB    NOT NULL,        -- its individual tags
        created_ms INTEGER NOT NULL
     );",
    // v5: where each entry came from (the member's IP), so one source
    // cannot fill every alternative of a slot.
    "ALTER TABLE entries ADD COLUMN source BLOB;",
    // v6: when each attached member was last heard from, so a member that
    // never returns expires (DAPGW_ATTACH_TTL_S). Members attached before
    // this version count as heard from at the upgrade.
    "ALTER TABLE attached ADD COLUMN seen_ms INTEGER NOT NULL DEFAULT 0;
     UPDATE attached SET seen_ms = CAST(strftime('%s', 'now') AS INTEGER) * 1000;",
    // v7: where each attached member attached from (its source key: an
    // IPv4 address, an IPv6 /64), so a restarted gateway keeps counting
    // it in its source's share. NULL for members attached before: counted
    // in no share until they attach again.
    "ALTER TABLE attached ADD COLUMN source BLOB;",
];

/// The messages held in a round response's slot (run for every append).
const SLOT_ROUND_SQL: &str = "SELECT id, sort_key, bytes, source, batch_id IS NOT NULL FROM entries
     WHERE kind = 1 AND grp = ?1 AND round = ?2 AND member = ?3 ORDER BY id";
/// The messages held in an uplink's slot (run for every append).
const SLOT_UPLINK_SQL: &str =
    "SELECT id, sort_key, bytes, source, batch_id IS NOT NULL FROM entries
     WHERE kind = 2 AND member = ?1 AND sort_key = ?2 ORDER BY id";
/// Most bytes of the UDC's refusal kept with a dead letter.
pub const MAX_DEAD_LETTER_REASON: usize = 512;

/// Drops a completed batch's entries with the bytes each freed and its
/// source, for the per-source share.
const COMPLETE_ENTRIES_SQL: &str =
    "DELETE FROM entries WHERE batch_id = ?1 RETURNING length(bytes) + length(sort_key), source";

/// Errors of the spool boundary.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SpoolError {
    /// The spool holds `max_bytes` already; nothing was stored and nothing
    /// stored before was dropped. Answer the member 503 with `Retry-After`.
    #[error("spool full; retry after {retry_after:?}")]
    Full {
        /// How long the caller should wait before retrying.
        retry_after: Duration,
    },
    /// The entry's source already holds its share of the spool
    /// ([`Spool::open_with_source_share`]); nothing was stored. Other
    /// sources are still served. Answer the member 503 with `Retry-After`.
    #[error("this source holds its share of the spool; retry after {retry_after:?}")]
    SourceFull {
        /// How long the caller should wait before retrying.
        retry_after: Duration,
    },
    /// A single entry or downlink item larger than the whole spool; it can
    /// never be stored.
    #[error(
        "item of {size} bytes exceeds the spool capacity of {max_bytes} bytes; raise max_bytes"
    )]
    TooLarge {
        /// Accounted size of the refused item.
        size: u64,
        /// The spool's capacity.
        max_bytes: u64,
    },
    /// The slot (a member's response to one round, or its uplink with one
    /// `(sid, ctr)`) already holds the maximum number of different messages.
    /// The gateway cannot tell which one the member sealed (only V can), so
    /// it keeps several and lets V judge each; past the cap it is a flood
    /// under that member's id. Answer 409.
    #[error("too many different entries for this round or uplink counter")]
    Conflict,
    /// A batch id was sealed or completed before with different content.
    #[error("batch {0} was already sealed or completed with different content")]
    BatchConflict(u64),
    /// A batch id that was never handed out by [`Spool::next_batch_id`], or
    /// that has no sealed batch.
    #[error("unknown batch {0}")]
    UnknownBatch(u64),
    /// An entry id that is not (or no longer) in the spool.
    #[error("unknown entry {0}")]
    UnknownEntry(EntryId),
    /// The seal of the batch cut before this one failed in this process
    /// and has not succeeded since: sealing this one first would let it
    /// reach the UDC ahead of its predecessor (see [`Spool::queue_seal_batch`]).
    #[error("batch {batch} waits for the seal of batch {after}")]
    SealOrder {
        /// The batch refused.
        batch: u64,
        /// Its predecessor, not sealed.
        after: u64,
    },
    /// The entry is already part of another batch.
    #[error("entry {entry} is already in batch {batch}")]
    EntryInBatch {
        /// The entry named twice.
        entry: EntryId,
        /// The batch that holds it.
        batch: u64,
    },
    /// The caller broke an argument rule (empty batch, tag count, caps).
    #[error("invalid spool request: {0}")]
    Invalid(&'static str),
    /// Another process holds the spool directory.
    #[error("spool directory {0} is in use by another process; stop it or use another directory")]
    Locked(PathBuf),
    /// The database was written by a newer dapgw.
    #[error(
        "spool schema version {found} is newer than this binary supports ({supported}); run a newer dapgw or move the spool aside"
    )]
    Schema {
        /// `user_version` found in the file.
        found: i64,
        /// Highest version this binary knows.
        supported: i64,
    },
    /// A filesystem error outside SQLite (directory, lock file).
    #[error("spool directory {path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// SQLite failed (I/O error, disk full, corruption). Nothing in the
    /// failed request was acknowledged; check the disk under the spool.
    #[error("spool database error: {0}; check the disk under the spool directory")]
    Storage(#[source] Arc<rusqlite::Error>),
    /// The spool was closed (or its writer thread died).
    #[error("spool is closed")]
    Closed,
}

impl From<rusqlite::Error> for SpoolError {
    fn from(e: rusqlite::Error) -> Self {
        SpoolError::Storage(Arc::new(e))
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source: Arc::new(source),
    }
}

/// Identifier of a stored member entry; never reused, even across restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryId(u64);

impl EntryId {
    /// The raw id.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Which upstream queue an entry belongs to; a batch carries one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKey {
    /// Responses to one round's challenge. One entry per member.
    Round {
        /// Group of the round.
        group: u32,
        /// The round.
        round: u64,
    },
    /// Uplinks (readings, alarms, acks) of a group. One entry per
    /// `(member, sort_key)`.
    Uplink {
        /// Group the uplinks were sent in.
        group: u32,
    },
}

impl StreamKey {
    /// `(kind, grp, round)` columns of the `entries` table.
    fn columns(self) -> (i64, i64, i64) {
        match self {
            StreamKey::Round { group, round } => (STREAM_ROUND, i64::from(group), u2i(round)),
            StreamKey::Uplink { group } => (STREAM_UPLINK, i64::from(group), 0),
        }
    }

    fn from_columns(kind: i64, grp: i64, round: i64) -> Option<Self> {
        let group = u32::try_from(grp).ok()?;
        match kind {
            STREAM_ROUND => Some(StreamKey::Round {
                group,
                round: i2u(round),
            }),
            STREAM_UPLINK => Some(StreamKey::Uplink { group }),
            _ => None,
        }
    }
}

/// An entry to append to the upstream queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEntry {
    /// The queue it joins.
    pub stream: StreamKey,
    /// Sending member.
    pub member: u64,
    /// Order within the batch. For uplinks it is also the duplicate key
    /// (the caller passes `sid || ctr`); for responses the duplicate key is
    /// `(group, round, member)`.
    pub sort_key: Vec<u8>,
    /// The member's message, opaque.
    pub bytes: Bytes,
}

/// An entry as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEntry {
    /// Its id.
    pub id: EntryId,
    /// Its stream.
    pub stream: StreamKey,
    /// Sending member.
    pub member: u64,
    /// As given to [`Spool::append`].
    pub sort_key: Vec<u8>,
    /// As given to [`Spool::append`].
    pub bytes: Bytes,
    /// The batch holding it, once sealed.
    pub batch_id: Option<u64>,
}

/// A sealed batch without a verdict, to re-send after a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingBatch {
    /// The batch id (as on the wire).
    pub batch_id: u64,
    /// The exact bytes sent upstream.
    pub bytes: Bytes,
    /// Number of entries (and tags) in it.
    pub entry_count: u32,
}

/// Who may read a downlink item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Audience {
    /// Every member of the group (challenges, group messages).
    Group(u32),
    /// One member (confirm, rekey, key update).
    Member(u64),
}

impl Audience {
    fn columns(self) -> (i64, i64) {
        match self {
            Audience::Group(g) => (AUD_GROUP, i64::from(g)),
            Audience::Member(m) => (AUD_MEMBER, u2i(m)),
        }
    }
}

/// A downlink message to relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownlinkItem {
    /// Who may read it.
    pub audience: Audience,
    /// Message type (the wire type code), so members can filter.
    pub kind: u8,
    /// The UDC's message, opaque.
    pub bytes: Bytes,
}

/// A downlink message as read by a member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownlinkRecord {
    /// Position in the downlink; the member passes the last one it saw.
    pub cursor: u64,
    /// Message type.
    pub kind: u8,
    /// The message.
    pub bytes: Bytes,
}

/// What a prune removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Rows removed.
    pub rows: u64,
    /// Accounted bytes freed.
    pub bytes: u64,
}

/// A batch the UDC refused outright, kept in the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Its batch id.
    pub batch_id: u64,
    /// The UDC's HTTP status.
    pub status: u16,
    /// The UDC's error body (at most [`MAX_DEAD_LETTER_REASON`] bytes).
    pub reason: String,
    /// Member entries it carried.
    pub entries: u64,
    /// The batch exactly as sent.
    pub bytes: Bytes,
    /// When it was refused (unix ms).
    pub created_ms: u64,
}

/// A round whose challenge the gateway relayed, as the spool records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenRoundRow {
    /// The group.
    pub group: u32,
    /// The round number.
    pub round: u64,
    /// The round's mode code (`wire::Mode`).
    pub mode: u8,
    /// When the gateway closes it (unix ms).
    pub deadline_ms: u64,
}

/// A write queued with the spool's writer: resolves (as a future) to its
/// result once the group it went into has committed.
#[derive(Debug)]
#[must_use = "the write may fail; await it for its result"]
pub struct Queued<T>(Option<oneshot::Receiver<Result<T, SpoolError>>>);

impl<T> std::future::Future for Queued<T> {
    type Output = Result<T, SpoolError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let Some(rx) = self.0.as_mut() else {
            return std::task::Poll::Ready(Err(SpoolError::Closed));
        };
        std::pin::Pin::new(rx)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(SpoolError::Closed)))
    }
}

impl<T> Queued<T> {
    /// The result if the write has been answered already, without waiting.
    pub fn try_take(&mut self) -> Option<Result<T, SpoolError>> {
        let Some(rx) = self.0.as_mut() else {
            return Some(Err(SpoolError::Closed));
        };
        match rx.try_recv() {
            Ok(res) => Some(res),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => Some(Err(SpoolError::Closed)),
        }
    }
}

/// One member of the persisted attach registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedRow {
    /// The member id.
    pub member: u64,
    /// Its groups, sorted.
    pub groups: Vec<u32>,
    /// When it was last heard from as recorded (unix ms); the in-memory
    /// registry may know a later time not yet written.
    pub seen_ms: u64,
    /// The source key it attached from (`None` when recorded before the
    /// spool kept it).
    pub source: Option<[u8; 16]>,
}

/// What [`Spool::append_entry`] stored or found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The new entry, or the stored original of a byte-for-byte re-send.
    pub id: EntryId,
    /// The entry is in a sealed batch (only ever for a re-send).
    pub batched: bool,
}

type Reply<T> = oneshot::Sender<Result<T, SpoolError>>;

/// A write for the writer thread.
enum Request {
    Append(NewEntry, Option<[u8; 16]>, Reply<Appended>),
    /// Reads the share counts: `(bytes held by the source's key, sources
    /// tracked)`.
    SourceStats([u8; 16], Reply<(u64, usize)>),
    Discard(EntryId, Reply<bool>),
    NextBatchId(Reply<u64>),
    ReserveBatchIds(u64, Reply<u64>),
    Seal {
        batch_id: u64,
        /// The batch cut just before, if its seal was not yet confirmed.
        after: Option<u64>,
        entries: Vec<EntryId>,
        bytes: Bytes,
        tags: Vec<[u8; 16]>,
        reply: Reply<()>,
    },
    Complete {
        batch_id: u64,
        verdict_hash: [u8; 32],
        downlink: Vec<DownlinkItem>,
        now_ms: u64,
        reply: Reply<Vec<u64>>,
    },
    PushDownlink {
        items: Vec<DownlinkItem>,
        now_ms: u64,
        reply: Reply<Vec<u64>>,
    },
    Prune {
        rule: PruneRule,
        reply: Reply<Pruned>,
    },
    SetMeta {
        key: String,
        value: Vec<u8>,
        reply: Reply<()>,
    },
    DeadLetter {
        batch_id: u64,
        status: u16,
        reason: String,
        now_ms: u64,
        reply: Reply<()>,
    },
    SetAttached {
        rows: Vec<(u64, Vec<u32>, Option<[u8; 16]>)>,
        seen_ms: u64,
        reply: Reply<()>,
    },
    TouchAttached {
        seen: Vec<(u64, u64)>,
        reply: Reply<()>,
    },
    ExpireAttached {
        /// Only these members (still subject to the cutoff); all when None.
        members: Option<Vec<u64>>,
        cutoff_ms: u64,
        reply: Reply<u64>,
    },
    SetRound {
        round: OpenRoundRow,
        now_ms: u64,
        reply: Reply<()>,
    },
    Shutdown(oneshot::Sender<()>),
}

enum PruneRule {
    /// Every downlink item at or below the cursor.
    ThroughCursor(u64),
    /// Downlink items and completion records created before the instant.
    CreatedBefore(u64),
    /// One member's own items at or below the cursor.
    MemberThrough(u64, u64),
}

/// Counters the writer keeps and publishes after each commit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counters {
    bytes: u64,
    entries: u64,
    batches: u64,
    downlink: u64,
    last_cursor: u64,
}

/// The key a source's share is counted under: the stored address (IPv4 as
/// IPv4-mapped IPv6) reduced as the connection cap reduces it (IPv4 on its
/// own, IPv6 to its /64).
fn share_key(source: &[u8; 16]) -> [u8; 16] {
    crate::limits::source_key(std::net::IpAddr::V6(std::net::Ipv6Addr::from(*source)))
}

/// One change to a source's count, as the undo log keeps it.
#[derive(Debug, Clone, Copy)]
enum ShareChange {
    Added([u8; 16], u64),
    Removed([u8; 16], u64),
}

/// Accounted bytes of unanswered entries per source key. Kept by the writer
/// in step with its transactions: every change is logged until the commit,
/// so a request that rolls back to its savepoint, or a group whose
/// transaction fails, leaves the counts as they were.
#[derive(Debug, Default)]
struct Shares {
    /// What one source may hold; 0 = no share (counted, never refused).
    max: u64,
    /// Only sources holding something: an entry is removed at 0, so the
    /// map never has more entries than the spool has rows.
    held: HashMap<[u8; 16], u64>,
    /// Changes since the last commit, oldest first.
    log: Vec<ShareChange>,
}

impl Shares {
    fn held(&self, key: &[u8; 16]) -> u64 {
        self.held.get(key).copied().unwrap_or(0)
    }

    /// Whether `key` may take `size` more bytes.
    fn fits(&self, key: &[u8; 16], size: u64) -> bool {
        self.max == 0 || self.held(key).saturating_add(size) <= self.max
    }

    fn add(&mut self, key: [u8; 16], size: u64) {
        *self.held.entry(key).or_insert(0) += size;
        self.log.push(ShareChange::Added(key, size));
    }

    fn remove(&mut self, key: [u8; 16], size: u64) {
        let Some(held) = self.held.get_mut(&key) else {
            return;
        };
        let taken = size.min(*held);
        *held -= taken;
        if *held == 0 {
            self.held.remove(&key);
        }
        self.log.push(ShareChange::Removed(key, taken));
    }

    /// Undoes the changes logged after `mark` (newest first).
    fn undo_to(&mut self, mark: usize) {
        while self.log.len() > mark {
            let Some(change) = self.log.pop() else {
                break;
            };
            match change {
                ShareChange::Added(key, size) => {
                    if let Some(held) = self.held.get_mut(&key) {
                        *held = held.saturating_sub(size);
                        if *held == 0 {
                            self.held.remove(&key);
                        }
                    }
                }
                ShareChange::Removed(key, size) => {
                    if size > 0 {
                        *self.held.entry(key).or_insert(0) += size;
                    }
                }
            }
        }
    }

    /// Frees the bytes of a departing entry stored with `source`.
    fn release(&mut self, source: Option<&[u8]>, size: u64) {
        if let Some(src) = source.and_then(|s| <[u8; 16]>::try_from(s).ok()) {
            self.remove(share_key(&src), size);
        }
    }
}

/// State shared between handles and the writer thread.
struct Shared {
    max_bytes: u64,
    bytes: AtomicU64,
    entries: AtomicU64,
    batches: AtomicU64,
    downlink: AtomicU64,
    /// Latest downlink cursor.
    cursor: watch::Sender<u64>,
    /// Long polls waiting for downlink items, by audience: a commit wakes
    /// only the polls whose member or group it stored an item for.
    waiters: Mutex<Waiters>,
}

/// An audience as stored: `(aud_kind, aud_id)`.
type AudienceKey = (i64, i64);

/// The registry behind [`Spool::watch_downlink`].
#[derive(Default)]
struct Waiters {
    next_id: u64,
    by_audience: HashMap<AudienceKey, HashMap<u64, Arc<Notify>>>,
}

impl Waiters {
    fn wake(&self, touched: &[AudienceKey]) {
        for key in touched {
            if let Some(polls) = self.by_audience.get(key) {
                for n in polls.values() {
                    // A permit is kept if the poll is not waiting yet.
                    n.notify_one();
                }
            }
        }
    }
}

/// A long poll's registration for wake-ups: [`DownlinkWatch::notified`]
/// completes after a commit stored an item for its member or one of its
/// groups (or stored one since the watch was made). Unregisters on drop.
pub struct DownlinkWatch {
    shared: Arc<Shared>,
    id: u64,
    keys: Vec<AudienceKey>,
    notify: Arc<Notify>,
}

impl fmt::Debug for DownlinkWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DownlinkWatch")
            .field("audiences", &self.keys.len())
            .finish()
    }
}

impl DownlinkWatch {
    /// Waits for the next wake-up (one already due completes at once).
    pub async fn notified(&self) {
        self.notify.notified().await;
    }
}

impl Drop for DownlinkWatch {
    fn drop(&mut self) {
        let mut w = self
            .shared
            .waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for key in &self.keys {
            if let Some(polls) = w.by_audience.get_mut(key) {
                polls.remove(&self.id);
                if polls.is_empty() {
                    w.by_audience.remove(key);
                }
            }
        }
    }
}

impl Shared {
    /// Wakes the long polls of the audiences a commit stored items for.
    fn wake(&self, touched: &mut Vec<AudienceKey>) {
        if touched.is_empty() {
            return;
        }
        touched.sort_unstable();
        touched.dedup();
        self.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .wake(touched);
        touched.clear();
    }

    fn publish(&self, c: &Counters) {
        self.bytes.store(c.bytes, Ordering::Relaxed);
        self.entries.store(c.entries, Ordering::Relaxed);
        self.batches.store(c.batches, Ordering::Relaxed);
        self.downlink.store(c.downlink, Ordering::Relaxed);
        self.cursor.send_if_modified(|cur| {
            let changed = *cur != c.last_cursor;
            *cur = c.last_cursor;
            changed
        });
    }
}

/// Read connections for the async read methods (WAL readers never block the
/// writer).
struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl Readers {
    fn with<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, SpoolError>,
    ) -> Result<T, SpoolError> {
        let pooled = self.idle.lock().ok().and_then(|mut v| v.pop());
        let conn = match pooled {
            Some(c) => c,
            None => open_reader(&self.path)?,
        };
        let out = f(&conn);
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < READ_POOL
        {
            idle.push(conn);
        }
        out
    }
}

struct Inner {
    dir: PathBuf,
    tx: mpsc::Sender<Request>,
    shared: Arc<Shared>,
    readers: Arc<Readers>,
}

/// Handle to the spool; cheap to clone. All methods must run inside a tokio
/// runtime. Writes are group-committed by one writer thread; reads use a
/// small pool of WAL reader connections on the blocking pool.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

impl fmt::Debug for Spool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.inner.dir)
            .field("bytes", &self.bytes())
            .field("max_bytes", &self.max_bytes())
            .field("entries", &self.entries())
            .finish()
    }
}

impl Spool {
    /// Opens (creating if needed) the spool in `dir`, migrates its schema and
    /// recovers its state after a crash. Blocking: call it at startup or in
    /// `spawn_blocking`. `max_bytes` bounds what [`Spool::append`] and
    /// [`Spool::push_downlink`] accept (see the module doc on accounting).
    /// No source has a share of its own: see
    /// [`Spool::open_with_source_share`].
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Spool, SpoolError> {
        Spool::open_with_source_share(dir, max_bytes, 0)
    }

    /// [`Spool::open`], and [`Spool::append_from`] refuses an entry that
    /// would take its source beyond `max_bytes_per_source` accounted bytes
    /// of entries the UDC has not answered yet ([`SpoolError::SourceFull`];
    /// 0 = no share). The counts are rebuilt from the stored entries.
    pub fn open_with_source_share(
        dir: &Path,
        max_bytes: u64,
        max_bytes_per_source: u64,
    ) -> Result<Spool, SpoolError> {
        let created = !dir.exists();
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(SpoolError::Locked(dir.to_owned())),
            Err(TryLockError::Error(e)) => return Err(io_err(&lock_path)(e)),
        }

        let path = dir.join(DB_FILE);
        let mut conn = open_writer(&path)?;
        migrate(&mut conn)?;
        let counters = recount(&conn)?;
        let shares = Shares {
            max: max_bytes_per_source,
            held: recount_shares(&conn)?,
            log: Vec::new(),
        };
        // Make the new files' directory entries durable before anything is
        // acknowledged from them.
        sync_dir(dir)?;
        if created && let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }

        let (cursor, _) = watch::channel(counters.last_cursor);
        let shared = Arc::new(Shared {
            max_bytes,
            bytes: AtomicU64::new(0),
            entries: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            downlink: AtomicU64::new(0),
            cursor,
            waiters: Mutex::new(Waiters::default()),
        });
        shared.publish(&counters);

        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            conn,
            max_bytes,
            committed: counters,
            tent: counters,
            shared: shared.clone(),
            touched: Vec::new(),
            poisoned: false,
            shares,
            failed_seals: HashSet::new(),
            group_seals: Vec::new(),
            _lock: lock,
        };
        thread::Builder::new()
            .name("dapgw-spool".into())
            .spawn(move || writer.run(rx))
            .map_err(io_err(dir))?;
        let readers = Arc::new(Readers {
            path,
            idle: Mutex::new(Vec::new()),
        });
        Ok(Spool {
            inner: Arc::new(Inner {
                dir: dir.to_owned(),
                tx,
                shared,
                readers,
            }),
        })
    }

    /// Finishes queued writes, closes the database and releases the
    /// directory lock. Other handles get [`SpoolError::Closed`] afterwards.
    pub async fn close(self) {
        let (tx, rx) = oneshot::channel();
        if self.inner.tx.send(Request::Shutdown(tx)).is_ok() {
            // An error means the writer is already gone, which is the goal.
            let _ = rx.await;
        }
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, SpoolError> {
        self.submit(make).await
    }

    /// Queues a write now (so writes submitted one after the other are
    /// applied in that order, in the same group commit when they arrive
    /// together) and returns a handle that resolves after its commit.
    fn submit<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Queued<T> {
        let (tx, rx) = oneshot::channel();
        match self.inner.tx.send(make(tx)) {
            Ok(()) => Queued(Some(rx)),
            Err(_) => Queued(None),
        }
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, SpoolError> + Send + 'static,
    ) -> Result<T, SpoolError> {
        let readers = self.inner.readers.clone();
        tokio::task::spawn_blocking(move || readers.with(f))
            .await
            .map_err(|_| SpoolError::Closed)?
    }

    /// Appends a member entry and returns once it is durable.
    ///
    /// A byte-for-byte re-send (same slot, same sort key and bytes) returns
    /// the existing id; different content in an occupied slot is kept as an
    /// alternative, up to `MAX_VARIANTS` messages per slot, and past that is
    /// [`SpoolError::Conflict`]. When the entry does not fit, returns
    /// [`SpoolError::Full`] and stores nothing.
    pub async fn append(&self, entry: NewEntry) -> Result<EntryId, SpoolError> {
        Ok(self.append_entry(entry, None).await?.id)
    }

    /// [`Spool::append`] (`source` None) or [`Spool::append_from`], saying
    /// also whether the entry returned is already in a sealed batch: a
    /// byte-for-byte re-send of a message that is on its way to the UDC.
    /// Such an entry must not be collected again (it cannot go into a
    /// second batch).
    pub async fn append_entry(
        &self,
        entry: NewEntry,
        source: Option<[u8; 16]>,
    ) -> Result<Appended, SpoolError> {
        self.call(|r| Request::Append(entry, source, r)).await
    }

    /// [`Spool::append`] for an entry from `source` (the sender's address,
    /// IPv4 as IPv4-mapped IPv6): on top of the slot's cap, one source may
    /// hold only one message per slot, so a single source can never fill a
    /// slot's alternatives and pre-empt the member (a member sends one
    /// message per slot and re-sends it byte for byte). A second, different
    /// message from the same source is [`SpoolError::Conflict`]. The entry
    /// counts against its source's share until it leaves the spool; beyond
    /// the share it is [`SpoolError::SourceFull`] (see
    /// [`Spool::open_with_source_share`]).
    pub async fn append_from(
        &self,
        entry: NewEntry,
        source: [u8; 16],
    ) -> Result<EntryId, SpoolError> {
        Ok(self.append_entry(entry, Some(source)).await?.id)
    }

    /// Accounted bytes that `source`'s key (its IPv4 address, or its IPv6
    /// /64) holds in entries the UDC has not answered, and how many sources
    /// hold any; read by the writer in turn with the writes queued before
    /// it, answered after their commit.
    pub async fn source_usage(&self, source: std::net::IpAddr) -> Result<(u64, usize), SpoolError> {
        let v6 = match source {
            std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            std::net::IpAddr::V6(v6) => v6,
        };
        self.call(|r| Request::SourceStats(v6.octets(), r)).await
    }

    /// Deletes an entry that is in no batch (the collector refused it after
    /// it was stored, e.g. a response for a round that is not open). Returns
    /// whether it deleted one; an entry already sealed in a batch, or gone,
    /// is left alone (`false`).
    pub async fn discard_unbatched(&self, id: EntryId) -> Result<bool, SpoolError> {
        self.call(|r| Request::Discard(id, r)).await
    }

    /// [`Spool::discard_unbatched`], queued with the writer before this
    /// returns (so any request queued after it, such as the member's next
    /// append, is applied after it); the returned future reports the
    /// commit.
    pub fn queue_discard_unbatched(&self, id: EntryId) -> Queued<bool> {
        self.submit(|r| Request::Discard(id, r))
    }

    /// Hands out the next batch id, persisted before it is returned:
    /// strictly increasing across restarts, never reused even if the batch
    /// is never sealed.
    pub async fn next_batch_id(&self) -> Result<u64, SpoolError> {
        self.call(Request::NextBatchId).await
    }

    /// Reserves `n` batch ids at once (one durable write for all of them)
    /// and returns them: strictly increasing across restarts, never reused.
    /// Ids reserved but never sealed are skipped, which the UDC allows
    /// (ids are unique and increasing, not contiguous).
    pub async fn reserve_batch_ids(&self, n: u64) -> Result<std::ops::Range<u64>, SpoolError> {
        let n = n.max(1);
        let last = self.call(|r| Request::ReserveBatchIds(n, r)).await?;
        Ok(last + 1 - n..last + 1)
    }

    /// Like [`Spool::seal_batch`], but queued with the writer at once: seals
    /// queued one after the other are applied in that order. The returned
    /// [`Queued`] resolves after the commit.
    ///
    /// `after` names the batch cut just before this one when its seal is
    /// still unconfirmed (queued too). If that seal failed (and has not
    /// succeeded since), this one fails with [`SpoolError::SealOrder`] and
    /// stores nothing, and so does every seal chained after it: batches are
    /// sealed, and so sent upstream, in the order they were cut, even when
    /// a group commit fails between two queued seals. (The UDC judges a
    /// member's uplinks in batch order; a later batch first could have its
    /// new session or higher counters refuse the earlier entries.)
    pub fn queue_seal_batch(
        &self,
        batch_id: u64,
        after: Option<u64>,
        entry_ids: &[EntryId],
        batch_bytes: Bytes,
        tags: Vec<[u8; 16]>,
    ) -> Queued<()> {
        let entries = entry_ids.to_vec();
        self.submit(|reply| Request::Seal {
            batch_id,
            after,
            entries,
            bytes: batch_bytes,
            tags,
            reply,
        })
    }

    /// Stores a batch (the exact bytes sent upstream and one tag per entry,
    /// in batch order) and marks its entries as in it. Re-sealing the same
    /// batch with the same content is a no-op; different content is
    /// [`SpoolError::BatchConflict`]. Never refused for space.
    pub async fn seal_batch(
        &self,
        batch_id: u64,
        entry_ids: &[EntryId],
        batch_bytes: Bytes,
        tags: Vec<[u8; 16]>,
    ) -> Result<(), SpoolError> {
        let entries = entry_ids.to_vec();
        self.call(|reply| Request::Seal {
            batch_id,
            after: None,
            entries,
            bytes: batch_bytes,
            tags,
            reply,
        })
        .await
    }

    /// The first `limit` sealed batches without a verdict, in batch-id
    /// order. The sender lists only as many as it may put on the wire: a
    /// backlog of thousands of batches (a long UDC outage) is not read
    /// whole, bytes and all, every time one exchange ends.
    pub async fn pending_batches(&self, limit: usize) -> Result<Vec<PendingBatch>, SpoolError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT id, bytes, entry_count FROM batches ORDER BY id LIMIT ?1",
            )?;
            let rows = st.query_map([limit], |r| {
                Ok(PendingBatch {
                    batch_id: i2u(r.get(0)?),
                    bytes: Bytes::from(r.get::<_, Vec<u8>>(1)?),
                    entry_count: r.get(2)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// The ids of the first `limit` sealed batches without a verdict, in
    /// batch-id order, without their bytes: the sender lists these and
    /// reads a batch's bytes ([`Self::pending_batch`]) only when it needs
    /// them, so a pass holds at most one batch it does not send (each may
    /// be megabytes; [`Self::pending_batches`] held every one listed).
    pub async fn pending_batch_ids(&self, limit: usize) -> Result<Vec<u64>, SpoolError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |c| {
            let mut st = c.prepare_cached("SELECT id FROM batches ORDER BY id LIMIT ?1")?;
            let rows = st.query_map([limit], |r| Ok(i2u(r.get(0)?)))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// One sealed batch without a verdict, bytes and all; `None` when there
    /// is none with that id (its verdict was stored since it was listed).
    pub async fn pending_batch(&self, batch_id: u64) -> Result<Option<PendingBatch>, SpoolError> {
        self.read(move |c| {
            let mut st =
                c.prepare_cached("SELECT id, bytes, entry_count FROM batches WHERE id = ?1")?;
            let batch = st
                .query_row([u2i(batch_id)], |r| {
                    Ok(PendingBatch {
                        batch_id: i2u(r.get(0)?),
                        bytes: Bytes::from(r.get::<_, Vec<u8>>(1)?),
                        entry_count: r.get(2)?,
                    })
                })
                .optional()?;
            Ok(batch)
        })
        .await
    }

    /// The individual tags of a sealed batch, in batch order (for a tag
    /// request from the UDC).
    pub async fn batch_tags(&self, batch_id: u64) -> Result<Vec<[u8; 16]>, SpoolError> {
        self.read(move |c| {
            let blob: Option<Vec<u8>> = c
                .prepare_cached("SELECT tags FROM batches WHERE id = ?1")?
                .query_row([clamp(batch_id)], |r| r.get(0))
                .optional()?;
            let blob = blob.ok_or(SpoolError::UnknownBatch(batch_id))?;
            Ok(blob
                .chunks_exact(16)
                .map(|t| {
                    let mut tag = [0u8; 16];
                    tag.copy_from_slice(t);
                    tag
                })
                .collect())
        })
        .await
    }

    /// Closes a batch after the UDC's final verdict: in one transaction,
    /// deletes the batch and its entries, records the verdict hash, and
    /// queues `downlink` (e.g. the confirms) for members. Returns the new
    /// items' cursors. Repeating it with the same verdict is a no-op that
    /// queues nothing; a different verdict is [`SpoolError::BatchConflict`].
    /// Never refused for space. `now_unix_ms` stamps the items for
    /// [`Spool::prune_downlink_older_than`]. Queued with the writer at
    /// once (in call order); await the result.
    pub fn complete_batch(
        &self,
        batch_id: u64,
        verdict_bytes: &[u8],
        downlink: Vec<DownlinkItem>,
        now_unix_ms: u64,
    ) -> Queued<Vec<u64>> {
        let verdict_hash: [u8; 32] = Sha256::digest(verdict_bytes).into();
        self.submit(|reply| Request::Complete {
            batch_id,
            verdict_hash,
            downlink,
            now_ms: now_unix_ms,
            reply,
        })
    }

    /// Entries of `stream` not yet in a batch, in insertion order; the
    /// collector rebuilds its state from them after a restart.
    pub async fn unbatched(&self, stream: StreamKey) -> Result<Vec<StoredEntry>, SpoolError> {
        let (kind, grp, round) = stream.columns();
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT id, kind, grp, round, member, sort_key, bytes, batch_id FROM entries
                 WHERE kind = ?1 AND grp = ?2 AND round = ?3 AND batch_id IS NULL ORDER BY id",
            )?;
            let rows = st.query_map(params![kind, grp, round], stored_entry)?;
            collect_entries(rows)
        })
        .await
    }

    /// Streams that have entries not yet in a batch (sorted), so a restarted
    /// gateway knows which collectors to rebuild.
    pub async fn unbatched_streams(&self) -> Result<Vec<StreamKey>, SpoolError> {
        self.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT DISTINCT kind, grp, round FROM entries WHERE batch_id IS NULL
                 ORDER BY kind, grp, round",
            )?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            let mut out = Vec::new();
            for row in rows {
                let (k, g, r) = row?;
                if let Some(s) = StreamKey::from_columns(k, g, r) {
                    out.push(s);
                }
            }
            Ok(out)
        })
        .await
    }

    /// One stored entry, if it is still in the spool.
    pub async fn entry(&self, id: EntryId) -> Result<Option<StoredEntry>, SpoolError> {
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT id, kind, grp, round, member, sort_key, bytes, batch_id FROM entries
                 WHERE id = ?1",
            )?;
            let rows = st.query_map([clamp(id.0)], stored_entry)?;
            Ok(collect_entries(rows)?.pop())
        })
        .await
    }

    /// Queues downlink items from the UDC and returns their cursors (in
    /// order). An item identical (audience, kind, bytes) to one still stored
    /// returns the existing cursor. All or nothing: [`SpoolError::Full`]
    /// stores none of them.
    pub async fn push_downlink(
        &self,
        items: Vec<DownlinkItem>,
        now_unix_ms: u64,
    ) -> Result<Vec<u64>, SpoolError> {
        self.call(|reply| Request::PushDownlink {
            items,
            now_ms: now_unix_ms,
            reply,
        })
        .await
    }

    /// What `member` (in `groups`) should see after `after_cursor`: its own
    /// items and its groups' items, in cursor order, at most `limit` (capped
    /// at [`MAX_READ_LIMIT`]). A member passes the last cursor it received,
    /// so it sees nothing twice. At most [`MAX_READ_GROUPS`] groups.
    pub async fn read_downlink(
        &self,
        member: u64,
        groups: &[u32],
        after_cursor: u64,
        limit: usize,
    ) -> Result<Vec<DownlinkRecord>, SpoolError> {
        if groups.len() > MAX_READ_GROUPS {
            return Err(SpoolError::Invalid("too many groups in one downlink read"));
        }
        let limit = limit.min(MAX_READ_LIMIT);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut groups = groups.to_vec();
        groups.sort_unstable();
        groups.dedup();
        self.read(move |c| {
            // One cached statement per group count keeps the plan simple:
            // the audience index serves both arms of the OR.
            let marks: Vec<String> = (0..groups.len()).map(|i| format!("?{}", i + 4)).collect();
            let marks = marks.join(",");
            let sql = format!(
                "SELECT cursor, kind, bytes FROM downlink WHERE cursor > ?1 AND
                 ((aud_kind = {AUD_MEMBER} AND aud_id = ?2) OR
                  (aud_kind = {AUD_GROUP} AND aud_id IN ({marks})))
                 ORDER BY cursor LIMIT ?3"
            );
            let mut st = c.prepare_cached(&sql)?;
            let mut args: Vec<i64> = vec![clamp(after_cursor), u2i(member), limit as i64];
            args.extend(groups.iter().map(|g| i64::from(*g)));
            let rows = st.query_map(rusqlite::params_from_iter(args), |r| {
                Ok(DownlinkRecord {
                    cursor: i2u(r.get(0)?),
                    kind: r.get(1)?,
                    bytes: Bytes::from(r.get::<_, Vec<u8>>(2)?),
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Deletes every downlink item (group-wide and per-member) at or below
    /// `through_cursor`; later items are kept.
    pub async fn prune_downlink(&self, through_cursor: u64) -> Result<Pruned, SpoolError> {
        self.call(|reply| Request::Prune {
            rule: PruneRule::ThroughCursor(through_cursor),
            reply,
        })
        .await
    }

    /// Deletes downlink items and completion records older than `max_age`
    /// at `now_unix_ms` (the caller's clock).
    pub async fn prune_downlink_older_than(
        &self,
        now_unix_ms: u64,
        max_age: Duration,
    ) -> Result<Pruned, SpoolError> {
        let age = u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX);
        let cutoff = now_unix_ms.saturating_sub(age);
        self.call(|reply| Request::Prune {
            rule: PruneRule::CreatedBefore(cutoff),
            reply,
        })
        .await
    }

    /// Deletes `member`'s own items at or below `through_cursor`, once the
    /// member has shown (by reading past it) that it has them.
    pub async fn ack_downlink(
        &self,
        member: u64,
        through_cursor: u64,
    ) -> Result<Pruned, SpoolError> {
        self.call(|reply| Request::Prune {
            rule: PruneRule::MemberThrough(member, through_cursor),
            reply,
        })
        .await
    }

    /// Registers a long poll of `member` in `groups` for wake-ups: see
    /// [`DownlinkWatch`]. Register before reading, so nothing committed
    /// between the read and the wait is missed.
    pub fn watch_downlink(&self, member: u64, groups: &[u32]) -> DownlinkWatch {
        let mut keys: Vec<AudienceKey> = groups
            .iter()
            .map(|&g| (AUD_GROUP, i64::from(g)))
            .chain([(AUD_MEMBER, u2i(member))])
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let notify = Arc::new(Notify::new());
        let shared = self.inner.shared.clone();
        let mut w = shared.waiters.lock().unwrap_or_else(|p| p.into_inner());
        let id = w.next_id;
        w.next_id += 1;
        for key in &keys {
            w.by_audience
                .entry(*key)
                .or_default()
                .insert(id, notify.clone());
        }
        drop(w);
        DownlinkWatch {
            shared,
            id,
            keys,
            notify,
        }
    }

    /// Watches the latest downlink cursor (every commit that stores an item
    /// changes it).
    pub fn subscribe_downlink(&self) -> watch::Receiver<u64> {
        self.inner.shared.cursor.subscribe()
    }

    /// The latest downlink cursor handed out (0 before the first item).
    pub fn last_cursor(&self) -> u64 {
        *self.inner.shared.cursor.borrow()
    }

    /// The latest downlink cursor committed, read from the database: at
    /// least [`Spool::last_cursor`], which the writer publishes a moment
    /// after each commit (a reader may already have handed out a cursor
    /// that it has not published yet).
    pub async fn committed_cursor(&self) -> Result<u64, SpoolError> {
        self.read(downlink_high_water).await
    }

    /// Durably stores a small value under `key` (e.g. the UDC downlink
    /// cursor the gateway consumed).
    pub async fn set_meta(&self, key: &str, value: &[u8]) -> Result<(), SpoolError> {
        if key.len() > MAX_META_KEY {
            return Err(SpoolError::Invalid("meta key too long"));
        }
        if value.len() > MAX_META_VALUE {
            return Err(SpoolError::Invalid("meta value too long"));
        }
        let (key, value) = (key.to_owned(), value.to_vec());
        self.call(|reply| Request::SetMeta { key, value, reply })
            .await
    }

    /// The value stored under `key`, if any.
    pub async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, SpoolError> {
        let key = key.to_owned();
        self.read(move |c| {
            Ok(c.prepare_cached("SELECT value FROM meta WHERE key = ?1")?
                .query_row([key], |r| r.get(0))
                .optional()?)
        })
        .await
    }

    /// Completes a batch the UDC refused outright (`status`, with its error
    /// body `reason`): in one transaction the batch (its exact bytes and
    /// tags) is kept as a dead letter for the operator, and the batch and
    /// its entries leave the pipeline, so later batches are not blocked
    /// behind it. Never refused for space.
    pub async fn dead_letter_batch(
        &self,
        batch_id: u64,
        status: u16,
        reason: &str,
        now_unix_ms: u64,
    ) -> Result<(), SpoolError> {
        let reason = reason.to_owned();
        self.call(|reply| Request::DeadLetter {
            batch_id,
            status,
            reason,
            now_ms: now_unix_ms,
            reply,
        })
        .await
    }

    /// How many dead letters are kept.
    pub async fn dead_letter_count(&self) -> Result<u64, SpoolError> {
        self.read(|c| {
            Ok(i2u(c
                .prepare_cached("SELECT COUNT(*) FROM dead_letters")?
                .query_row([], |r| r.get(0))?))
        })
        .await
    }

    /// The dead letters kept, oldest first.
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>, SpoolError> {
        self.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT batch_id, status, reason, entries, bytes, created_ms
                 FROM dead_letters ORDER BY created_ms, batch_id",
            )?;
            let rows = st.query_map([], |r| {
                Ok(DeadLetter {
                    batch_id: i2u(r.get(0)?),
                    status: u16::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                    reason: r.get(2)?,
                    entries: i2u(r.get(3)?),
                    bytes: Bytes::from(r.get::<_, Vec<u8>>(4)?),
                    created_ms: i2u(r.get(5)?),
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Durably records that `member` is attached to `groups` (replacing
    /// what was recorded) from `source` (its source key), last heard from
    /// at `seen_ms` (unix ms), so a restarted gateway still subscribes to
    /// its groups, expects it in their rounds until it expires, and counts
    /// it in its source's share. Not counted in [`Spool::bytes`]: the
    /// registry is bounded by the attach caps, not by the spool bound, so
    /// attaching never fails for a full spool.
    pub async fn set_attached(
        &self,
        member: u64,
        groups: &[u32],
        source: Option<[u8; 16]>,
        seen_ms: u64,
    ) -> Result<(), SpoolError> {
        self.set_attached_many(vec![(member, groups.to_vec(), source)], seen_ms)
            .await
    }

    /// [`Spool::set_attached`] for several members (`(member, groups,
    /// source)`) heard from at `seen_ms`, in one request: all are stored,
    /// or none.
    pub async fn set_attached_many(
        &self,
        rows: Vec<(u64, Vec<u32>, Option<[u8; 16]>)>,
        seen_ms: u64,
    ) -> Result<(), SpoolError> {
        if rows.iter().any(|r| r.1.len() > MAX_READ_GROUPS) {
            return Err(SpoolError::Invalid("too many groups"));
        }
        self.call(|reply| Request::SetAttached {
            rows,
            seen_ms,
            reply,
        })
        .await
    }

    /// Moves the recorded last-heard time of attached members forward
    /// (`(member, seen_ms)` pairs; a time older than the recorded one and a
    /// member not attached are ignored), in one transaction.
    pub async fn touch_attached(&self, seen: Vec<(u64, u64)>) -> Result<(), SpoolError> {
        if seen.is_empty() {
            return Ok(());
        }
        self.call(|reply| Request::TouchAttached { seen, reply })
            .await
    }

    /// Forgets attached members last heard from before `cutoff_ms`: only
    /// `members` if given (each still only if its recorded time is before
    /// the cutoff, so one attached again meanwhile stays), else every such
    /// member. Returns how many were forgotten.
    pub async fn expire_attached(
        &self,
        members: Option<Vec<u64>>,
        cutoff_ms: u64,
    ) -> Result<u64, SpoolError> {
        self.call(|reply| Request::ExpireAttached {
            members,
            cutoff_ms,
            reply,
        })
        .await
    }

    /// Every recorded attachment, by member.
    pub async fn attached_members(&self) -> Result<Vec<AttachedRow>, SpoolError> {
        self.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT member, groups, seen_ms, source FROM attached ORDER BY member",
            )?;
            let rows = st.query_map([], |r| {
                Ok((
                    i2u(r.get(0)?),
                    r.get::<_, Vec<u8>>(1)?,
                    i2u(r.get(2)?),
                    r.get::<_, Option<Vec<u8>>>(3)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (member, blob, seen_ms, source) = row?;
                if blob.len() % 4 != 0 || blob.len() / 4 > MAX_READ_GROUPS {
                    return Err(SpoolError::Invalid("stored groups of an attached member"));
                }
                let source = source
                    .map(|s| <[u8; 16]>::try_from(s.as_slice()))
                    .transpose()
                    .map_err(|_| SpoolError::Invalid("stored source of an attached member"))?;
                let groups = blob
                    .chunks_exact(4)
                    .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                out.push(AttachedRow {
                    member,
                    groups,
                    seen_ms,
                    source,
                });
            }
            // Stored as i64: ids above i64::MAX come first in SQL order.
            out.sort_unstable_by_key(|r| r.member);
            Ok(out)
        })
        .await
    }

    /// Durably records a round whose challenge is being relayed (replacing
    /// its previous record), and forgets rounds whose deadline is before
    /// `now_ms`.
    pub async fn set_open_round(&self, round: OpenRoundRow, now_ms: u64) -> Result<(), SpoolError> {
        self.call(|reply| Request::SetRound {
            round,
            now_ms,
            reply,
        })
        .await
    }

    /// The recorded rounds whose deadline is at or after `now_ms`.
    pub async fn open_rounds(&self, now_ms: u64) -> Result<Vec<OpenRoundRow>, SpoolError> {
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT grp, round, mode, deadline_ms FROM open_rounds \
                 WHERE deadline_ms >= ?1 ORDER BY grp, round",
            )?;
            let rows = st.query_map([clamp(now_ms)], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (g, round, mode, deadline) = row?;
                let bad = || SpoolError::Invalid("stored open round");
                out.push(OpenRoundRow {
                    group: u32::try_from(g).map_err(|_| bad())?,
                    round: i2u(round),
                    mode: u8::try_from(mode).map_err(|_| bad())?,
                    deadline_ms: i2u(deadline),
                });
            }
            // Stored as their i64 bit pattern (the UDC's u64 round numbers
            // kept apart above 2^63), which SQL orders those first.
            out.sort_unstable_by_key(|r| (r.group, r.round));
            Ok(out)
        })
        .await
    }

    /// Accounted bytes stored (entries, batches, downlink, records).
    pub fn bytes(&self) -> u64 {
        self.inner.shared.bytes.load(Ordering::Relaxed)
    }

    /// The capacity given to [`Spool::open`].
    pub fn max_bytes(&self) -> u64 {
        self.inner.shared.max_bytes
    }

    /// Member entries stored (batched or not).
    pub fn entries(&self) -> u64 {
        self.inner.shared.entries.load(Ordering::Relaxed)
    }

    /// Sealed batches awaiting a verdict.
    pub fn pending_batch_count(&self) -> u64 {
        self.inner.shared.batches.load(Ordering::Relaxed)
    }

    /// Downlink items stored.
    pub fn downlink_items(&self) -> u64 {
        self.inner.shared.downlink.load(Ordering::Relaxed)
    }
}

/// u64 ids and member numbers are stored as the i64 with the same bits.
fn u2i(v: u64) -> i64 {
    v as i64
}

/// Cursors and ids from callers (possibly hostile) saturate instead of
/// wrapping negative: no stored cursor or id exceeds `i64::MAX`.
fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn i2u(v: i64) -> u64 {
    v as u64
}

fn stored_entry(r: &rusqlite::Row<'_>) -> rusqlite::Result<(StoredEntry, i64, i64, i64)> {
    Ok((
        StoredEntry {
            id: EntryId(i2u(r.get(0)?)),
            stream: StreamKey::Uplink { group: 0 },
            member: i2u(r.get(4)?),
            sort_key: r.get(5)?,
            bytes: Bytes::from(r.get::<_, Vec<u8>>(6)?),
            batch_id: r.get::<_, Option<i64>>(7)?.map(i2u),
        },
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
    ))
}

fn collect_entries(
    rows: impl Iterator<Item = rusqlite::Result<(StoredEntry, i64, i64, i64)>>,
) -> Result<Vec<StoredEntry>, SpoolError> {
    let mut out = Vec::new();
    for row in rows {
        let (mut e, kind, grp, round) = row?;
        e.stream = StreamKey::from_columns(kind, grp, round).ok_or(SpoolError::Invalid(
            "stored entry has an unknown stream kind",
        ))?;
        out.push(e);
    }
    Ok(out)
}

fn open_writer(path: &Path) -> Result<Connection, SpoolError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(10))?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(SpoolError::Invalid(
            "the spool filesystem does not support SQLite WAL mode",
        ));
    }
    // FULL: a WAL commit fsyncs before it returns; this is the ack contract.
    conn.execute_batch(
        "PRAGMA synchronous = FULL;
         PRAGMA journal_size_limit = 67108864;
         PRAGMA foreign_keys = OFF;",
    )?;
    let sync: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0))?;
    if sync != 2 {
        return Err(SpoolError::Invalid("sqlite refused synchronous=FULL"));
    }
    plan_once(&conn)?;
    Ok(conn)
}

/// Caches prepared statements, and makes their plans independent of the
/// values bound (SQLite's query planner stability guarantee). Without it a
/// partial index (`entries_batch ... WHERE batch_id IS NOT NULL`) made SQLite
/// compare its condition with the bound values of every `column = ?` term,
/// and re-parse and re-plan the statement whenever they changed: every
/// entry's slot lookup, about half the writer's CPU.
fn plan_once(conn: &Connection) -> Result<(), SpoolError> {
    conn.set_prepared_statement_cache_capacity(64);
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    Ok(())
}

fn open_reader(path: &Path) -> Result<Connection, SpoolError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.execute_batch("PRAGMA query_only = ON;")?;
    plan_once(&conn)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<(), SpoolError> {
    let supported = MIGRATIONS.len() as i64;
    let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > supported {
        return Err(SpoolError::Schema { found, supported });
    }
    for (i, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(found).unwrap_or(0))
    {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        if i == 0 {
            // A new spool's batch ids start at its creation time.
            tx.execute(
                "UPDATE counters SET value = ?2 WHERE name = ?1",
                params![BATCH_COUNTER, clamp(first_batch_id_floor())],
            )?;
        }
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))?;
        tx.commit()?;
    }
    Ok(())
}

/// Where a new spool's batch id counter starts: the creation time in unix
/// milliseconds times 1,024. A gateway whose spool was replaced (a new disk,
/// a recreated volume) keeps its gateway id, and the UDC keeps its verdicts
/// by (gateway, batch id) for 30 days: ids counted from 0 again would name
/// batches the UDC has answered, with other bytes (409, dead-lettered with
/// every entry in them). Above any id the old spool handed out as long as
/// it reserved fewer than 1,024 ids per millisecond of its life (at 64 per
/// reservation, far more batches than the upstream can send) and the clock
/// did not go back. 2^63 / 1,024 ms is about 285,000 years.
fn first_batch_id_floor() -> u64 {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    ms.saturating_mul(1024)
}

/// Recomputes the counters from the tables (after a crash nothing in memory
/// survived, so the tables are the truth).
/// The last downlink cursor committed (0 before the first item):
/// AUTOINCREMENT's high-water mark, which survives pruning of every item.
fn downlink_high_water(conn: &Connection) -> Result<u64, SpoolError> {
    let seq: Option<i64> = conn
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'downlink'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    Ok(seq.map(i2u).unwrap_or(0))
}

fn recount(conn: &Connection) -> Result<Counters, SpoolError> {
    let (entries, entry_blobs): (i64, i64) = conn.query_row(
        "SELECT COUNT(*), COALESCE(SUM(length(bytes) + length(sort_key)), 0) FROM entries",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let (batches, batch_blobs): (i64, i64) = conn.query_row(
        "SELECT COUNT(*), COALESCE(SUM(length(bytes) + length(tags)), 0) FROM batches",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let completed: i64 = conn.query_row("SELECT COUNT(*) FROM completed", [], |r| r.get(0))?;
    let (downlink, downlink_blobs): (i64, i64) = conn.query_row(
        "SELECT COUNT(*), COALESCE(SUM(length(bytes)), 0) FROM downlink",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let last_cursor = downlink_high_water(conn)?;
    let rows = i2u(entries) + i2u(batches) + i2u(completed) + i2u(downlink);
    let bytes = i2u(entry_blobs)
        + i2u(batch_blobs)
        + i2u(downlink_blobs)
        + 32 * (i2u(downlink) + i2u(completed))
        + ROW_OVERHEAD * rows;
    Ok(Counters {
        bytes,
        entries: i2u(entries),
        batches: i2u(batches),
        downlink: i2u(downlink),
        last_cursor,
    })
}

/// Rebuilds the per-source counts from the `source` column (after a restart
/// nothing in memory survived). Rows without a source (appended by
/// [`Spool::append`]) count against no source.
fn recount_shares(conn: &Connection) -> Result<HashMap<[u8; 16], u64>, SpoolError> {
    let mut st = conn.prepare(
        "SELECT source, COUNT(*), SUM(length(bytes) + length(sort_key)) FROM entries
         WHERE source IS NOT NULL GROUP BY source",
    )?;
    let rows = st.query_map([], |r| {
        Ok((
            r.get::<_, Vec<u8>>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })?;
    let mut held = HashMap::new();
    for row in rows {
        let (source, n, blobs) = row?;
        let Ok(source) = <[u8; 16]>::try_from(source.as_slice()) else {
            continue;
        };
        *held.entry(share_key(&source)).or_insert(0) += i2u(blobs) + i2u(n) * ROW_OVERHEAD;
    }
    Ok(held)
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

fn entry_size(e: &NewEntry) -> u64 {
    (e.bytes.len() + e.sort_key.len()) as u64 + ROW_OVERHEAD
}

fn downlink_size(bytes_len: usize) -> u64 {
    bytes_len as u64 + 32 + ROW_OVERHEAD
}

fn downlink_digest(kind: u8, bytes: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([kind]);
    h.update(bytes);
    h.finalize().into()
}

/// A finished request whose answer waits for the group's commit.
type Pending = Box<dyn FnOnce(Option<&SpoolError>) + Send>;

fn pending<T: Send + 'static>(reply: Reply<T>, res: Result<T, SpoolError>) -> Pending {
    Box::new(move |commit_err| {
        let out = match commit_err {
            Some(e) => Err(e.clone()),
            None => res,
        };
        // The caller may have given up waiting; the write stands regardless.
        let _ = reply.send(out);
    })
}

/// The error for every request of a group whose transaction was lost.
fn group_aborted() -> SpoolError {
    SpoolError::Storage(Arc::new(rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ABORT),
        Some("transaction rolled back after a failed request".into()),
    )))
}

/// Fails a request without touching the database.
fn fail(req: Request, err: SpoolError) -> Pending {
    match req {
        Request::Append(_, _, r) => pending(r, Err(err)),
        Request::SourceStats(_, r) => pending(r, Err(err)),
        Request::Discard(_, r) => pending(r, Err(err)),
        Request::NextBatchId(r) => pending(r, Err(err)),
        Request::ReserveBatchIds(_, r) => pending(r, Err(err)),
        Request::Seal { reply, .. }
        | Request::SetMeta { reply, .. }
        | Request::SetAttached { reply, .. }
        | Request::TouchAttached { reply, .. }
        | Request::DeadLetter { reply, .. }
        | Request::SetRound { reply, .. } => pending(reply, Err(err)),
        Request::Complete { reply, .. } | Request::PushDownlink { reply, .. } => {
            pending(reply, Err(err))
        }
        Request::Prune { reply, .. } => pending(reply, Err(err)),
        Request::ExpireAttached { reply, .. } => pending(reply, Err(err)),
        Request::Shutdown(tx) => Box::new(move |_| {
            let _ = tx.send(());
        }),
    }
}

/// The single writer: owns the write connection and the directory lock.
struct Writer {
    conn: Connection,
    max_bytes: u64,
    /// Counters as of the last commit (what callers see).
    committed: Counters,
    /// Counters including the open transaction's work.
    tent: Counters,
    shared: Arc<Shared>,
    /// Audiences the open transaction stored downlink items for; their long
    /// polls are woken after the commit.
    touched: Vec<AudienceKey>,
    /// Set when a failed request could not be undone by its savepoint; the
    /// open transaction must then be rolled back, not committed.
    poisoned: bool,
    /// Bytes each source holds, for the per-source share.
    shares: Shares,
    /// Batches whose last seal failed in this process (a seal chained
    /// after one of them is refused, [`SpoolError::SealOrder`]).
    failed_seals: HashSet<u64>,
    /// Batches sealed in the open transaction (failed if it is lost).
    group_seals: Vec<u64>,
    /// Held for the writer's lifetime; released when the thread ends.
    _lock: File,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Request>) {
        while let Ok(first) = rx.recv() {
            let mut group = vec![first];
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(r) => group.push(r),
                    Err(_) => break,
                }
            }
            // What arrives while the group is applied joins it: a seal cut
            // meanwhile commits with these appends rather than after this
            // commit and then its own.
            if let Some(done) = self.apply_group(group, || rx.try_recv().ok()) {
                // Close the database and release the lock before answering.
                drop(self);
                let _ = done.send(());
                return;
            }
        }
    }

    /// Applies a group in one transaction and answers it after the commit.
    /// Once `group` is applied, requests from `late` (those queued since)
    /// join the same transaction while it is live, until `late` has none or
    /// the group holds [`MAX_GROUP`]; every request of the group, late or
    /// not, is answered only after the one commit. Returns the shutdown
    /// acknowledgement if the group asked to stop (no late request is taken
    /// after it).
    fn apply_group(
        &mut self,
        group: Vec<Request>,
        mut late: impl FnMut() -> Option<Request>,
    ) -> Option<oneshot::Sender<()>> {
        let mut shutdown = None;
        let mut answers: Vec<Pending> = Vec::with_capacity(group.len());
        let begun = self.conn.execute_batch("BEGIN IMMEDIATE");
        let mut queued = group.into_iter();
        let mut taken = 0;
        while let Some(req) = queued.next().or_else(|| {
            // Only into a live transaction: after a loss, what is still
            // queued goes into the next group rather than failing here.
            let live = begun.is_ok() && !self.poisoned && !self.conn.is_autocommit();
            if live && shutdown.is_none() && taken < MAX_GROUP {
                late()
            } else {
                None
            }
        }) {
            taken += 1;
            if let Request::Shutdown(tx) = req {
                shutdown = Some(tx);
                continue;
            }
            // After the transaction was lost, later requests must not run:
            // outside a transaction each savepoint would commit on its own.
            let broken = match &begun {
                Err(e) => Some(SpoolError::from_ref(e)),
                Ok(()) if self.poisoned || self.conn.is_autocommit() => Some(group_aborted()),
                Ok(()) => None,
            };
            answers.push(match broken {
                Some(e) => {
                    if let Request::Seal { batch_id, .. } = &req {
                        self.failed_seals.insert(*batch_id);
                    }
                    fail(req, e)
                }
                None => self.apply_one(req),
            });
        }
        // SQLite rolls a transaction back by itself on some I/O errors; then
        // the connection is in autocommit mode and nothing may be acked.
        let lost = self.poisoned || (begun.is_ok() && self.conn.is_autocommit());
        self.poisoned = false;
        let commit_err = match begun {
            Err(e) => Some(SpoolError::from_ref(&e)),
            Ok(()) if lost => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Some(group_aborted())
            }
            Ok(()) => match self.conn.execute_batch("COMMIT") {
                Ok(()) => None,
                Err(e) => {
                    // The transaction may still be open after a failed COMMIT.
                    let _ = self.conn.execute_batch("ROLLBACK");
                    Some(SpoolError::from(e))
                }
            },
        };
        match commit_err {
            None => {
                self.committed = self.tent;
                self.shares.log.clear();
                self.group_seals.clear();
            }
            Some(_) => {
                self.tent = self.committed;
                self.shares.undo_to(0);
                self.touched.clear();
                // Applied, then lost with the transaction: failed seals.
                self.failed_seals.extend(self.group_seals.drain(..));
            }
        }
        self.shared.publish(&self.committed);
        // After the cursor is published: a poll registered before this
        // wake-up reads everything committed.
        self.shared.wake(&mut self.touched);
        for a in answers {
            a(commit_err.as_ref());
        }
        shutdown
    }

    /// Runs one request inside its own savepoint, so a failing request
    /// leaves no trace and does not fail the rest of the group.
    fn apply_one(&mut self, req: Request) -> Pending {
        match req {
            // An append validates before its single INSERT, which SQLite
            // undoes alone if it fails: no savepoint needed on the hot path.
            Request::Append(e, source, r) => pending(r, self.append(&e, source)),
            Request::SourceStats(key, r) => {
                let held = self.shares.held(&share_key(&key));
                pending(r, Ok((held, self.shares.held.len())))
            }
            Request::Discard(id, r) => pending(r, self.savepoint(|w| w.discard(id))),
            Request::NextBatchId(r) => pending(r, self.savepoint(|w| w.reserve_batch_ids(1))),
            Request::ReserveBatchIds(n, r) => {
                pending(r, self.savepoint(|w| w.reserve_batch_ids(n)))
            }
            Request::Seal {
                batch_id,
                after,
                entries,
                bytes,
                tags,
                reply,
            } => {
                let res = match after {
                    Some(after) if self.failed_seals.contains(&after) => {
                        Err(SpoolError::SealOrder {
                            batch: batch_id,
                            after,
                        })
                    }
                    _ => self.savepoint(|w| w.seal(batch_id, &entries, &bytes, &tags)),
                };
                if res.is_ok() {
                    self.failed_seals.remove(&batch_id);
                    self.group_seals.push(batch_id);
                } else {
                    self.failed_seals.insert(batch_id);
                }
                pending(reply, res)
            }
            Request::Complete {
                batch_id,
                verdict_hash,
                downlink,
                now_ms,
                reply,
            } => pending(
                reply,
                self.savepoint(|w| w.complete(batch_id, &verdict_hash, &downlink, now_ms)),
            ),
            Request::PushDownlink {
                items,
                now_ms,
                reply,
            } => pending(
                reply,
                self.savepoint(|w| w.push_downlink(&items, now_ms, true)),
            ),
            Request::Prune { rule, reply } => pending(reply, self.savepoint(|w| w.prune(&rule))),
            Request::SetMeta { key, value, reply } => pending(
                reply,
                self.savepoint(|w| {
                    w.conn
                        .prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)")?
                        .execute(params![key, value])?;
                    Ok(())
                }),
            ),
            Request::DeadLetter {
                batch_id,
                status,
                reason,
                now_ms,
                reply,
            } => pending(
                reply,
                self.savepoint(|w| w.dead_letter(batch_id, status, &reason, now_ms)),
            ),
            Request::SetAttached {
                rows,
                seen_ms,
                reply,
            } => pending(
                reply,
                self.savepoint(|w| {
                    let mut st = w.conn.prepare_cached(
                        "INSERT OR REPLACE INTO attached (member, groups, seen_ms, source) \
                         VALUES (?1, ?2, ?3, ?4)",
                    )?;
                    for (member, groups, source) in rows {
                        let blob: Vec<u8> = groups.iter().flat_map(|g| g.to_be_bytes()).collect();
                        st.execute(params![
                            u2i(member),
                            blob,
                            clamp(seen_ms),
                            source.as_ref().map(|s| &s[..])
                        ])?;
                    }
                    Ok(())
                }),
            ),
            Request::TouchAttached { seen, reply } => pending(
                reply,
                self.savepoint(|w| {
                    let mut st = w.conn.prepare_cached(
                        "UPDATE attached SET seen_ms = max(seen_ms, ?2) WHERE member = ?1",
                    )?;
                    for (member, seen_ms) in seen {
                        st.execute(params![u2i(member), clamp(seen_ms)])?;
                    }
                    Ok(())
                }),
            ),
            Request::ExpireAttached {
                members,
                cutoff_ms,
                reply,
            } => pending(
                reply,
                self.savepoint(|w| {
                    let cutoff = clamp(cutoff_ms);
                    let Some(members) = members else {
                        let n = w
                            .conn
                            .prepare_cached("DELETE FROM attached WHERE seen_ms < ?1")?
                            .execute([cutoff])?;
                        return Ok(n as u64);
                    };
                    // The cutoff again: a member attached anew since the
                    // caller chose it carries a fresh time and stays.
                    let mut st = w.conn.prepare_cached(
                        "DELETE FROM attached WHERE member = ?1 AND seen_ms < ?2",
                    )?;
                    let mut n = 0u64;
                    for m in members {
                        n += st.execute([u2i(m), cutoff])? as u64;
                    }
                    Ok(n)
                }),
            ),
            Request::SetRound {
                round,
                now_ms,
                reply,
            } => pending(
                reply,
                self.savepoint(|w| {
                    // Rounds past their deadline are of no use after a
                    // restart; they go as new ones come.
                    w.conn
                        .prepare_cached("DELETE FROM open_rounds WHERE deadline_ms < ?1")?
                        .execute([clamp(now_ms)])?;
                    w.conn
                        .prepare_cached(
                            "INSERT OR REPLACE INTO open_rounds (grp, round, mode, deadline_ms) \
                             VALUES (?1, ?2, ?3, ?4)",
                        )?
                        .execute(params![
                            i64::from(round.group),
                            u2i(round.round),
                            i64::from(round.mode),
                            clamp(round.deadline_ms)
                        ])?;
                    Ok(())
                }),
            ),
            Request::Shutdown(tx) => Box::new(move |_| {
                let _ = tx.send(());
            }),
        }
    }

    fn savepoint<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, SpoolError>,
    ) -> Result<T, SpoolError> {
        self.conn.prepare_cached("SAVEPOINT req")?.execute([])?;
        let before = self.tent;
        let mark = self.shares.log.len();
        let out = f(self).and_then(|v| {
            self.conn.prepare_cached("RELEASE req")?.execute([])?;
            Ok(v)
        });
        if out.is_err() {
            self.tent = before;
            self.shares.undo_to(mark);
            let undone = self
                .conn
                .prepare_cached("ROLLBACK TO req")
                .and_then(|mut s| s.execute([]))
                .and_then(|_| self.conn.prepare_cached("RELEASE req"))
                .and_then(|mut s| s.execute([]));
            // Half a request must never be committed: if it cannot be undone
            // alone, the whole group is rolled back.
            if undone.is_err() {
                self.poisoned = true;
            }
        }
        out
    }

    fn check_room(&self, size: u64) -> Result<(), SpoolError> {
        if size > self.max_bytes {
            return Err(SpoolError::TooLarge {
                size,
                max_bytes: self.max_bytes,
            });
        }
        if self.tent.bytes.saturating_add(size) > self.max_bytes {
            return Err(SpoolError::Full {
                retry_after: FULL_RETRY_AFTER,
            });
        }
        Ok(())
    }

    fn append(&mut self, e: &NewEntry, source: Option<[u8; 16]>) -> Result<Appended, SpoolError> {
        let (kind, grp, round) = e.stream.columns();
        let member = u2i(e.member);
        // Every message already held in this slot (the first one and its
        // alternatives) with its source and whether it is in a batch,
        // oldest first.
        type Held = (i64, Vec<u8>, Vec<u8>, Option<Vec<u8>>, bool);
        let row = |r: &rusqlite::Row<'_>| -> rusqlite::Result<Held> {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        };
        let existing: Vec<Held> = match e.stream {
            StreamKey::Round { .. } => self
                .conn
                .prepare_cached(SLOT_ROUND_SQL)?
                .query_map(params![grp, round, member], row)?
                .collect::<Result<_, _>>()?,
            StreamKey::Uplink { .. } => self
                .conn
                .prepare_cached(SLOT_UPLINK_SQL)?
                .query_map(params![member, e.sort_key], row)?
                .collect::<Result<_, _>>()?,
        };
        if let Some((id, .., batched)) = existing
            .iter()
            .find(|(_, sort_key, bytes, ..)| *sort_key == e.sort_key && *bytes == e.bytes[..])
        {
            return Ok(Appended {
                id: EntryId(i2u(*id)),
                batched: *batched,
            });
        }
        if existing.len() >= MAX_VARIANTS {
            return Err(SpoolError::Conflict);
        }
        // One message per source and slot, a source as everywhere else (an
        // IPv4 address, an IPv6 /64): a host picks any address of its /64.
        if let Some(src) = source {
            let mine = share_key(&src);
            if existing.iter().any(|(_, _, _, s, _)| {
                s.as_deref()
                    .and_then(|s| <[u8; 16]>::try_from(s).ok())
                    .is_some_and(|s| share_key(&s) == mine)
            }) {
                return Err(SpoolError::Conflict);
            }
        }
        let size = entry_size(e);
        let key = source.as_ref().map(share_key);
        if let Some(key) = &key
            && !self.shares.fits(key, size)
        {
            return Err(SpoolError::SourceFull {
                retry_after: FULL_RETRY_AFTER,
            });
        }
        self.check_room(size)?;
        // The kind is a literal, not a parameter: a bound value that decides
        // whether a partial index (`WHERE kind = ...`) applies makes SQLite
        // re-prepare the cached statement on every execution.
        let sql = if kind == STREAM_ROUND {
            "INSERT INTO entries (kind, grp, round, member, sort_key, bytes, source)
             VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6)"
        } else {
            "INSERT INTO entries (kind, grp, round, member, sort_key, bytes, source)
             VALUES (2, ?1, ?2, ?3, ?4, ?5, ?6)"
        };
        self.conn.prepare_cached(sql)?.execute(params![
            grp,
            round,
            member,
            e.sort_key,
            &e.bytes[..],
            source.as_ref().map(|s| &s[..])
        ])?;
        self.tent.bytes += size;
        self.tent.entries += 1;
        if let Some(key) = key {
            self.shares.add(key, size);
        }
        Ok(Appended {
            id: EntryId(i2u(self.conn.last_insert_rowid())),
            batched: false,
        })
    }

    fn discard(&mut self, id: EntryId) -> Result<bool, SpoolError> {
        let gone: Option<(i64, Option<Vec<u8>>)> = self
            .conn
            .prepare_cached(
                "DELETE FROM entries WHERE id = ?1 AND batch_id IS NULL
                 RETURNING length(bytes) + length(sort_key), source",
            )?
            .query_row([clamp(id.0)], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let Some((size, source)) = gone else {
            return Ok(false);
        };
        self.shares
            .release(source.as_deref(), i2u(size) + ROW_OVERHEAD);
        self.tent.bytes = self.tent.bytes.saturating_sub(i2u(size) + ROW_OVERHEAD);
        self.tent.entries = self.tent.entries.saturating_sub(1);
        Ok(true)
    }

    /// Moves the batch id counter up by `n`; returns the last id reserved.
    fn reserve_batch_ids(&mut self, n: u64) -> Result<u64, SpoolError> {
        let id: i64 = self
            .conn
            .prepare_cached(
                "UPDATE counters SET value = value + ?2 WHERE name = ?1 RETURNING value",
            )?
            .query_row(params![BATCH_COUNTER, clamp(n)], |r| r.get(0))?;
        Ok(i2u(id))
    }

    fn issued_batch_ids(&self) -> Result<u64, SpoolError> {
        let v: i64 = self
            .conn
            .prepare_cached("SELECT value FROM counters WHERE name = ?1")?
            .query_row([BATCH_COUNTER], |r| r.get(0))?;
        Ok(i2u(v))
    }

    fn completed_hash(&self, batch_id: u64) -> Result<Option<Vec<u8>>, SpoolError> {
        Ok(self
            .conn
            .prepare_cached("SELECT verdict_hash FROM completed WHERE id = ?1")?
            .query_row([clamp(batch_id)], |r| r.get(0))
            .optional()?)
    }

    fn seal(
        &mut self,
        batch_id: u64,
        entries: &[EntryId],
        bytes: &Bytes,
        tags: &[[u8; 16]],
    ) -> Result<(), SpoolError> {
        if entries.is_empty() {
            return Err(SpoolError::Invalid("a batch needs at least one entry"));
        }
        if entries.len() != tags.len() {
            return Err(SpoolError::Invalid(
                "a batch needs exactly one tag per entry",
            ));
        }
        let count = u32::try_from(entries.len())
            .map_err(|_| SpoolError::Invalid("too many entries in a batch"))?;
        if batch_id == 0 || batch_id > self.issued_batch_ids()? {
            return Err(SpoolError::UnknownBatch(batch_id));
        }
        if self.completed_hash(batch_id)?.is_some() {
            return Err(SpoolError::BatchConflict(batch_id));
        }
        let tag_blob: Vec<u8> = tags.iter().flatten().copied().collect();
        let sealed: Option<(Vec<u8>, Vec<u8>)> = self
            .conn
            .prepare_cached("SELECT bytes, tags FROM batches WHERE id = ?1")?
            .query_row([clamp(batch_id)], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        if let Some((old_bytes, old_tags)) = sealed {
            // A repeated seal is fine if it is the same batch.
            let mut ids: Vec<i64> = Vec::new();
            {
                let mut st = self
                    .conn
                    .prepare_cached("SELECT id FROM entries WHERE batch_id = ?1 ORDER BY id")?;
                for id in st.query_map([clamp(batch_id)], |r| r.get(0))? {
                    ids.push(id?);
                }
            }
            let mut want: Vec<i64> = entries.iter().map(|e| clamp(e.0)).collect();
            want.sort_unstable();
            return if old_bytes == bytes[..] && old_tags == tag_blob && ids == want {
                Ok(())
            } else {
                Err(SpoolError::BatchConflict(batch_id))
            };
        }
        // One statement for the whole batch (the ids as a JSON array). Only
        // a refusal looks up which entry and why.
        let ids: Vec<i64> = entries.iter().map(|e| clamp(e.0)).collect();
        let mut distinct = ids.clone();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() != ids.len() {
            return Err(SpoolError::Invalid("an entry appears twice in one batch"));
        }
        let ids_json = serde_json::to_string(&ids)
            .map_err(|_| SpoolError::Invalid("batch entry ids do not serialize"))?;
        let marked = self
            .conn
            .prepare_cached(
                "UPDATE entries SET batch_id = ?1
                 WHERE batch_id IS NULL AND id IN (SELECT value FROM json_each(?2))",
            )?
            .execute(params![clamp(batch_id), ids_json])?;
        if marked != ids.len() {
            for &entry in entries {
                let current: Option<Option<i64>> = self
                    .conn
                    .prepare_cached("SELECT batch_id FROM entries WHERE id = ?1")?
                    .query_row([clamp(entry.0)], |r| r.get(0))
                    .optional()?;
                match current {
                    Some(Some(b)) if b == clamp(batch_id) => {}
                    Some(Some(b)) => {
                        return Err(SpoolError::EntryInBatch {
                            entry,
                            batch: i2u(b),
                        });
                    }
                    _ => return Err(SpoolError::UnknownEntry(entry)),
                }
            }
            return Err(SpoolError::Invalid("batch entries changed while sealing"));
        }
        self.conn
            .prepare_cached(
                "INSERT INTO batches (id, bytes, tags, entry_count) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![clamp(batch_id), &bytes[..], tag_blob, count])?;
        self.tent.bytes += (bytes.len() + tag_blob.len()) as u64 + ROW_OVERHEAD;
        self.tent.batches += 1;
        Ok(())
    }

    fn complete(
        &mut self,
        batch_id: u64,
        verdict_hash: &[u8; 32],
        downlink: &[DownlinkItem],
        now_ms: u64,
    ) -> Result<Vec<u64>, SpoolError> {
        if let Some(old) = self.completed_hash(batch_id)? {
            return if old == verdict_hash[..] {
                Ok(Vec::new())
            } else {
                Err(SpoolError::BatchConflict(batch_id))
            };
        }
        let batch_blobs: Option<i64> = self
            .conn
            .prepare_cached("SELECT length(bytes) + length(tags) FROM batches WHERE id = ?1")?
            .query_row([clamp(batch_id)], |r| r.get(0))
            .optional()?;
        let batch_blobs = batch_blobs.ok_or(SpoolError::UnknownBatch(batch_id))?;
        // One pass: the entries go and say how many bytes they freed, and
        // whose share they were.
        let gone: Vec<(i64, Option<Vec<u8>>)> = self
            .conn
            .prepare_cached(COMPLETE_ENTRIES_SQL)?
            .query_map([clamp(batch_id)], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let n = gone.len() as i64;
        let mut blobs: i64 = 0;
        for (len, source) in &gone {
            blobs += len;
            self.shares
                .release(source.as_deref(), i2u(*len) + ROW_OVERHEAD);
        }
        self.conn
            .prepare_cached("DELETE FROM batches WHERE id = ?1")?
            .execute([clamp(batch_id)])?;
        self.conn
            .prepare_cached(
                "INSERT INTO completed (id, verdict_hash, completed_ms) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![clamp(batch_id), &verdict_hash[..], clamp(now_ms)])?;
        let freed = i2u(blobs) + i2u(n) * ROW_OVERHEAD + i2u(batch_blobs) + ROW_OVERHEAD;
        self.tent.bytes = self.tent.bytes.saturating_sub(freed) + 32 + ROW_OVERHEAD;
        self.tent.entries = self.tent.entries.saturating_sub(i2u(n));
        self.tent.batches = self.tent.batches.saturating_sub(1);
        // The verdict's confirms are queued even if the spool is full: they
        // are what frees the member, and the entries just freed exceed them.
        self.push_downlink(downlink, now_ms, false)
    }

    /// Moves a refused batch into `dead_letters` and completes it (its
    /// entries go, no confirm is queued). Dead letters are outside the
    /// accounted bytes but kept to a quarter of `max_bytes`: the oldest go
    /// first.
    fn dead_letter(
        &mut self,
        batch_id: u64,
        status: u16,
        reason: &str,
        now_ms: u64,
    ) -> Result<(), SpoolError> {
        let marker: [u8; 32] = Sha256::digest(format!("refused {status}")).into();
        if self.completed_hash(batch_id)?.is_some() {
            // Done before (a repeated call): the same answer as complete.
            return self.complete(batch_id, &marker, &[], now_ms).map(|_| ());
        }
        let row: Option<(Vec<u8>, Vec<u8>)> = self
            .conn
            .prepare_cached("SELECT bytes, tags FROM batches WHERE id = ?1")?
            .query_row([clamp(batch_id)], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let (bytes, tags) = row.ok_or(SpoolError::UnknownBatch(batch_id))?;
        let entries: i64 = self
            .conn
            .prepare_cached("SELECT COUNT(*) FROM entries WHERE batch_id = ?1")?
            .query_row([clamp(batch_id)], |r| r.get(0))?;
        let mut end = reason.len().min(MAX_DEAD_LETTER_REASON);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO dead_letters
                 (batch_id, status, reason, entries, bytes, tags, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                clamp(batch_id),
                i64::from(status),
                &reason[..end],
                entries,
                bytes,
                tags,
                clamp(now_ms)
            ])?;
        // Oldest first out, never the one just kept.
        let cap = self.max_bytes / 4;
        loop {
            let total: i64 = self
                .conn
                .prepare_cached(
                    "SELECT COALESCE(SUM(length(bytes) + length(tags) + length(reason)), 0)
                     FROM dead_letters",
                )?
                .query_row([], |r| r.get(0))?;
            if i2u(total) <= cap {
                break;
            }
            let gone = self
                .conn
                .prepare_cached(
                    "DELETE FROM dead_letters WHERE batch_id =
                     (SELECT batch_id FROM dead_letters WHERE batch_id != ?1
                      ORDER BY created_ms, batch_id LIMIT 1)",
                )?
                .execute([clamp(batch_id)])?;
            if gone == 0 {
                break;
            }
        }
        self.complete(batch_id, &marker, &[], now_ms).map(|_| ())
    }

    fn push_downlink(
        &mut self,
        items: &[DownlinkItem],
        now_ms: u64,
        bounded: bool,
    ) -> Result<Vec<u64>, SpoolError> {
        let mut cursors = Vec::with_capacity(items.len());
        for item in items {
            let (aud_kind, aud_id) = item.audience.columns();
            let digest = downlink_digest(item.kind, &item.bytes);
            let existing: Option<i64> = self
                .conn
                .prepare_cached("SELECT cursor FROM downlink WHERE aud_kind = ?1 AND aud_id = ?2 AND digest = ?3")?
                .query_row(params![aud_kind, aud_id, &digest[..]], |r| r.get(0))
                .optional()?;
            if let Some(c) = existing {
                cursors.push(i2u(c));
                continue;
            }
            let size = downlink_size(item.bytes.len());
            if bounded {
                self.check_room(size)?;
            }
            self.conn
                .prepare_cached(
                    "INSERT INTO downlink (aud_kind, aud_id, kind, digest, bytes, created_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?
                .execute(params![
                    aud_kind,
                    aud_id,
                    item.kind,
                    &digest[..],
                    &item.bytes[..],
                    clamp(now_ms)
                ])?;
            let cursor = i2u(self.conn.last_insert_rowid());
            // A request rolled back later only costs a spurious wake-up.
            self.touched.push((aud_kind, aud_id));
            self.tent.bytes += size;
            self.tent.downlink += 1;
            self.tent.last_cursor = self.tent.last_cursor.max(cursor);
            cursors.push(cursor);
        }
        Ok(cursors)
    }

    fn prune(&mut self, rule: &PruneRule) -> Result<Pruned, SpoolError> {
        let mut out = Pruned::default();
        let deleted: Vec<i64> = match *rule {
            PruneRule::ThroughCursor(c) => self.delete_lengths(
                "DELETE FROM downlink WHERE cursor <= ?1 RETURNING length(bytes)",
                &[clamp(c)],
            )?,
            PruneRule::CreatedBefore(t) => {
                let done = self.delete_lengths(
                    "DELETE FROM completed WHERE completed_ms < ?1 RETURNING 0",
                    &[clamp(t)],
                )?;
                out.rows += done.len() as u64;
                out.bytes += done.len() as u64 * (32 + ROW_OVERHEAD);
                self.delete_lengths(
                    "DELETE FROM downlink WHERE created_ms < ?1 RETURNING length(bytes)",
                    &[clamp(t)],
                )?
            }
            PruneRule::MemberThrough(m, c) => self.delete_lengths(
                "DELETE FROM downlink WHERE aud_kind = 2 AND aud_id = ?1 AND cursor <= ?2
                 RETURNING length(bytes)",
                &[u2i(m), clamp(c)],
            )?,
        };
        let items = deleted.len() as u64;
        let item_bytes: u64 = deleted
            .iter()
            .map(|&l| downlink_size(i2u(l) as usize))
            .sum();
        self.tent.downlink = self.tent.downlink.saturating_sub(items);
        out.rows += items;
        out.bytes += item_bytes;
        self.tent.bytes = self.tent.bytes.saturating_sub(out.bytes);
        Ok(out)
    }

    fn delete_lengths(&mut self, sql: &str, args: &[i64]) -> Result<Vec<i64>, SpoolError> {
        let mut st = self.conn.prepare_cached(sql)?;
        let rows = st.query_map(rusqlite::params_from_iter(args.iter()), |r| r.get(0))?;
        Ok(rows.collect::<Result<Vec<i64>, _>>()?)
    }
}

impl SpoolError {
    /// A copy of a SQLite error for every request of a failed group.
    fn from_ref(e: &rusqlite::Error) -> SpoolError {
        match e {
            rusqlite::Error::SqliteFailure(code, msg) => {
                SpoolError::from(rusqlite::Error::SqliteFailure(*code, msg.clone()))
            }
            other => SpoolError::from(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
                Some(other.to_string()),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A commit wakes only the long polls of the audiences it stored an
    /// item for; a wake-up before the poll waits is kept; dropped watches
    /// leave the registry.
    #[tokio::test]
    async fn downlink_wakes_only_the_polls_it_concerns() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        async fn ready(w: &DownlinkWatch) -> bool {
            tokio::time::timeout(Duration::ZERO, w.notified())
                .await
                .is_ok()
        }
        let a = spool.watch_downlink(1, &[5]);
        let b = spool.watch_downlink(2, &[6, 6]);
        let c = spool.watch_downlink(3, &[]);
        let item = |audience, byte| DownlinkItem {
            audience,
            kind: 1,
            bytes: Bytes::from(vec![byte; 8]),
        };
        spool
            .push_downlink(vec![item(Audience::Group(6), 1)], 0)
            .await
            .unwrap();
        assert!(!ready(&a).await);
        assert!(ready(&b).await);
        assert!(!ready(&c).await);
        assert!(!ready(&b).await, "one wake-up per commit");
        spool
            .push_downlink(
                vec![item(Audience::Member(3), 2), item(Audience::Member(3), 3)],
                0,
            )
            .await
            .unwrap();
        assert!(!ready(&a).await);
        assert!(!ready(&b).await);
        assert!(ready(&c).await);
        // An identical item stores nothing new and wakes nobody.
        spool
            .push_downlink(vec![item(Audience::Group(6), 1)], 0)
            .await
            .unwrap();
        assert!(!ready(&b).await);
        drop((a, b, c));
        let empty = spool
            .inner
            .shared
            .waiters
            .lock()
            .unwrap()
            .by_audience
            .is_empty();
        assert!(empty);
        spool.close().await;
    }

    fn entry(member: u64, body: &'static [u8]) -> NewEntry {
        NewEntry {
            stream: StreamKey::Round { group: 1, round: 1 },
            member,
            sort_key: member.to_be_bytes().to_vec(),
            bytes: Bytes::from_static(body),
        }
    }

    fn raw(dir: &Path) -> Connection {
        let c = Connection::open(dir.join(DB_FILE)).unwrap();
        c.busy_timeout(Duration::from_secs(10)).unwrap();
        c
    }

    /// A new spool's batch ids start at its creation time (unix ms x 1,024),
    /// so a replaced spool does not hand out ids the old one used; a
    /// reopened spool continues its own counter.
    #[tokio::test]
    async fn a_new_spool_counts_batch_ids_from_its_creation_time() {
        let dir = tempfile::tempdir().unwrap();
        let before = first_batch_id_floor();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let after = first_batch_id_floor();
        let first = spool.next_batch_id().await.unwrap();
        assert!(
            first > before && first <= after + 1,
            "{before} < {first} <= {after} + 1"
        );
        let second = spool.next_batch_id().await.unwrap();
        assert!(second > first);
        spool.close().await;
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert!(spool.next_batch_id().await.unwrap() > second);
    }

    /// A failure in the middle of `complete_batch` (injected by a trigger on
    /// the second downlink insert) leaves the batch, its entries and the
    /// counters exactly as before; requests in the same group still commit.
    #[tokio::test]
    async fn complete_batch_is_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let a = spool.append(entry(1, b"one")).await.unwrap();
        let b = spool.append(entry(2, b"two")).await.unwrap();
        let id = spool.next_batch_id().await.unwrap();
        spool
            .seal_batch(id, &[a, b], Bytes::from_static(b"B"), vec![[0; 16]; 2])
            .await
            .unwrap();
        raw(dir.path())
            .execute_batch(
                "CREATE TRIGGER fail_dl BEFORE INSERT ON downlink WHEN NEW.kind = 255
                 BEGIN SELECT RAISE(ABORT, 'injected'); END;",
            )
            .unwrap();
        let before = (spool.bytes(), spool.entries(), spool.downlink_items());
        let items = vec![
            DownlinkItem {
                audience: Audience::Member(1),
                kind: 7,
                bytes: Bytes::from_static(b"confirm"),
            },
            DownlinkItem {
                audience: Audience::Member(2),
                kind: 255,
                bytes: Bytes::from_static(b"poison"),
            },
        ];
        let (failed, other) = tokio::join!(
            spool.complete_batch(id, b"verdict", items.clone(), 5),
            spool.append(entry(3, b"three")),
        );
        assert!(matches!(failed, Err(SpoolError::Storage(_))), "{failed:?}");
        let c = other.unwrap();
        assert_eq!(before.0 + entry_size(&entry(3, b"three")), spool.bytes());
        assert_eq!(before.1 + 1, spool.entries());
        assert_eq!(before.2, spool.downlink_items());
        assert_eq!(spool.pending_batches(usize::MAX).await.unwrap().len(), 1);
        assert_eq!(spool.entry(a).await.unwrap().unwrap().batch_id, Some(id));
        assert!(spool.read_downlink(1, &[], 0, 10).await.unwrap().is_empty());

        raw(dir.path())
            .execute_batch("DROP TRIGGER fail_dl")
            .unwrap();
        let cursors = spool
            .complete_batch(id, b"verdict", items, 5)
            .await
            .unwrap();
        assert_eq!(cursors.len(), 2);
        assert!(spool.entry(a).await.unwrap().is_none());
        assert!(spool.entry(c).await.unwrap().is_some());
        // The in-memory counters agree with the tables.
        let counted = recount(&raw(dir.path())).unwrap();
        assert_eq!(counted.bytes, spool.bytes());
        assert_eq!(counted.entries, spool.entries());
        assert_eq!(counted.downlink, spool.downlink_items());
        assert_eq!(counted.last_cursor, spool.last_cursor());
        spool.close().await;
    }

    /// A writer driven by hand, so a test decides exactly what one group
    /// holds.
    fn manual_writer(dir: &Path) -> Writer {
        let mut conn = open_writer(&dir.join(DB_FILE)).unwrap();
        migrate(&mut conn).unwrap();
        let counters = recount(&conn).unwrap();
        let (cursor, _) = watch::channel(counters.last_cursor);
        let shared = Arc::new(Shared {
            max_bytes: 1 << 20,
            bytes: AtomicU64::new(0),
            entries: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            downlink: AtomicU64::new(0),
            cursor,
            waiters: Mutex::new(Waiters::default()),
        });
        Writer {
            conn,
            max_bytes: 1 << 20,
            committed: counters,
            tent: counters,
            shared,
            touched: Vec::new(),
            poisoned: false,
            shares: Shares::default(),
            failed_seals: HashSet::new(),
            group_seals: Vec::new(),
            _lock: File::create(dir.join(LOCK_FILE)).unwrap(),
        }
    }

    type Rx<T> = oneshot::Receiver<Result<T, SpoolError>>;

    fn append_req(member: u64) -> (Request, Rx<Appended>) {
        let (tx, rx) = oneshot::channel();
        (Request::Append(entry(member, b"body"), None, tx), rx)
    }

    fn push_req(kind: u8) -> (Request, Rx<Vec<u64>>) {
        let (reply, rx) = oneshot::channel();
        let items = vec![DownlinkItem {
            audience: Audience::Group(1),
            kind,
            bytes: Bytes::from_static(b"item"),
        }];
        let req = Request::PushDownlink {
            items,
            now_ms: 0,
            reply,
        };
        (req, rx)
    }

    /// `RAISE(ROLLBACK)` makes SQLite drop the whole transaction, as some
    /// I/O errors do: no request of that group may be acknowledged, and none
    /// after it may run outside a transaction. `RAISE(ABORT)` fails only its
    /// own request.
    #[test]
    fn a_lost_transaction_fails_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = manual_writer(dir.path());
        w.conn
            .execute_batch(
                "CREATE TRIGGER lose BEFORE INSERT ON downlink WHEN NEW.kind = 254
                 BEGIN SELECT RAISE(ROLLBACK, 'injected'); END;
                 CREATE TRIGGER abort BEFORE INSERT ON downlink WHEN NEW.kind = 255
                 BEGIN SELECT RAISE(ABORT, 'injected'); END;",
            )
            .unwrap();
        let (a1, mut r1) = append_req(1);
        let (p, mut rp) = push_req(254);
        let (a2, mut r2) = append_req(2);
        assert!(w.apply_group(vec![a1, p, a2], || None).is_none());
        assert!(matches!(
            r1.try_recv().unwrap(),
            Err(SpoolError::Storage(_))
        ));
        assert!(matches!(
            rp.try_recv().unwrap(),
            Err(SpoolError::Storage(_))
        ));
        assert!(matches!(
            r2.try_recv().unwrap(),
            Err(SpoolError::Storage(_))
        ));
        assert!(w.conn.is_autocommit());
        assert_eq!(recount(&w.conn).unwrap(), w.committed);
        assert_eq!(w.committed.entries, 0);

        let (a1, mut r1) = append_req(1);
        let (p, mut rp) = push_req(255);
        let (a2, mut r2) = append_req(2);
        assert!(w.apply_group(vec![a1, p, a2], || None).is_none());
        assert!(r1.try_recv().unwrap().is_ok());
        assert!(matches!(
            rp.try_recv().unwrap(),
            Err(SpoolError::Storage(_))
        ));
        assert!(r2.try_recv().unwrap().is_ok());
        assert_eq!(recount(&w.conn).unwrap(), w.committed);
        assert_eq!(w.committed.entries, 2);
        assert_eq!(w.committed.downlink, 0);
    }

    fn seal_req(batch_id: u64, entries: Vec<EntryId>) -> (Request, Rx<()>) {
        seal_after(batch_id, None, entries)
    }

    fn seal_after(batch_id: u64, after: Option<u64>, entries: Vec<EntryId>) -> (Request, Rx<()>) {
        let (reply, rx) = oneshot::channel();
        let tags = vec![[7; 16]; entries.len()];
        let req = Request::Seal {
            batch_id,
            after,
            entries,
            bytes: Bytes::from_static(b"batch"),
            tags,
            reply,
        };
        (req, rx)
    }

    /// Seals chained with `after` keep the order batches were cut in: once
    /// a seal fails, every seal chained after it fails too and stores
    /// nothing, until the failed one is sealed again; then its successors
    /// seal. (A seal lost with its group's transaction counts as failed:
    /// see the next test.)
    #[test]
    fn a_failed_seal_holds_back_the_seals_chained_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = manual_writer(dir.path());
        let (a1, mut r1) = append_req(1);
        let (a2, mut r2) = append_req(2);
        let (a3, mut r3) = append_req(3);
        assert!(w.apply_group(vec![a1, a2, a3], || None).is_none());
        let [e1, e2, e3] = [&mut r1, &mut r2, &mut r3].map(|r| r.try_recv().unwrap().unwrap().id);
        let first = w.reserve_batch_ids(3).unwrap() - 2;
        let (b1, b2, b3) = (first, first + 1, first + 2);
        let sealed = |w: &Writer| -> i64 {
            w.conn
                .query_row("SELECT count(*) FROM batches", [], |r| r.get(0))
                .unwrap()
        };

        let (s1, mut q1) = seal_after(b1, None, vec![e1]);
        assert!(w.apply_group(vec![s1], || None).is_none());
        assert!(q1.try_recv().unwrap().is_ok(), "sealed on its own");
        // b2's seal fails (an unknown entry); b3, chained to it, is refused.
        let (s2, mut q2) = seal_after(b2, Some(b1), vec![EntryId(9_999)]);
        let (s3, mut q3) = seal_after(b3, Some(b2), vec![e3]);
        assert!(w.apply_group(vec![s2, s3], || None).is_none());
        assert!(matches!(
            q2.try_recv().unwrap(),
            Err(SpoolError::UnknownEntry(_))
        ));
        assert!(
            matches!(
                q3.try_recv().unwrap(),
                Err(SpoolError::SealOrder { batch, after }) if batch == b3 && after == b2
            ),
            "b3 waits for b2"
        );
        assert_eq!(sealed(&w), 1, "only b1");

        // b2 sealed again (now with its real entry), then b3 after it.
        let (s2, mut q2) = seal_after(b2, Some(b1), vec![e2]);
        let (s3, mut q3) = seal_after(b3, Some(b2), vec![e3]);
        assert!(w.apply_group(vec![s2, s3], || None).is_none());
        assert!(q2.try_recv().unwrap().is_ok());
        assert!(q3.try_recv().unwrap().is_ok());
        assert_eq!(sealed(&w), 3);
    }

    /// A seal queued while a group is applied joins that group's
    /// transaction and is answered by its commit only: when the group is
    /// lost the seal fails with it (its batch is not stored, so it is never
    /// listed or uploaded), and when the group commits the batch is in the
    /// database, as another connection sees it, before the seal is answered.
    /// No request of the group is answered before the late ones are
    /// applied; nothing is taken once the transaction is lost, after a
    /// shutdown, nor beyond `MAX_GROUP`.
    #[test]
    fn late_requests_join_the_group_and_share_its_commit() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = manual_writer(dir.path());
        w.conn
            .execute_batch(
                "CREATE TRIGGER lose BEFORE INSERT ON downlink WHEN NEW.kind = 254
                 BEGIN SELECT RAISE(ROLLBACK, 'injected'); END;",
            )
            .unwrap();
        let (a1, mut r1) = append_req(1);
        let (a2, mut r2) = append_req(2);
        assert!(w.apply_group(vec![a1, a2], || None).is_none());
        let ids = vec![
            r1.try_recv().unwrap().unwrap().id,
            r2.try_recv().unwrap().unwrap().id,
        ];
        let batch = w.reserve_batch_ids(1).unwrap();
        let stored = |dir: &Path| -> (i64, i64) {
            raw(dir)
                .query_row(
                    "SELECT (SELECT count(*) FROM batches WHERE bytes = x'6261746368'),
                            (SELECT count(*) FROM entries WHERE batch_id = ?1)",
                    [clamp(batch)],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .unwrap()
        };

        // The seal and then a request that loses the transaction arrive
        // while an append's group is applied.
        let (a3, mut r3) = append_req(3);
        let (s, mut rs) = seal_req(batch, ids.clone());
        let (p, mut rp) = push_req(254);
        let mut late = vec![s, p].into_iter();
        let mut calls = 0;
        assert!(
            w.apply_group(vec![a3], || {
                calls += 1;
                assert!(r3.try_recv().is_err(), "answered before the commit");
                late.next()
            })
            .is_none()
        );
        assert_eq!(calls, 2, "nothing is taken once the transaction is lost");
        for res in [rs.try_recv().unwrap(), rp.try_recv().unwrap().map(|_| ())] {
            assert!(matches!(res, Err(SpoolError::Storage(_))), "{res:?}");
        }
        assert!(matches!(
            r3.try_recv().unwrap(),
            Err(SpoolError::Storage(_))
        ));
        assert_eq!(stored(dir.path()), (0, 0));
        assert_eq!(w.committed.batches, 0);
        // Lost with its transaction, the seal counts as failed: a seal
        // chained after it is refused.
        assert!(w.failed_seals.contains(&batch));

        // The same seal, late again, in a group that commits.
        let (a3, mut r3) = append_req(3);
        let (s, mut rs) = seal_req(batch, ids);
        let mut late = Some(s);
        assert!(w.apply_group(vec![a3], || late.take()).is_none());
        assert!(r3.try_recv().unwrap().is_ok());
        assert!(rs.try_recv().unwrap().is_ok());
        assert_eq!(stored(dir.path()), (1, 2));
        assert_eq!(w.committed.batches, 1);
        assert_eq!(recount(&w.conn).unwrap(), w.committed);
        assert!(!w.failed_seals.contains(&batch), "sealed since");

        // Nothing joins after a shutdown; a group stops at MAX_GROUP.
        let (tx, _stopped) = oneshot::channel();
        let mut asked = 0;
        let stop = w.apply_group(vec![Request::Shutdown(tx)], || {
            asked += 1;
            None
        });
        assert!(stop.is_some());
        assert_eq!(asked, 0);
        let mut asked = 0;
        assert!(
            w.apply_group(Vec::new(), || {
                asked += 1;
                Some(append_req(1_000 + asked as u64).0)
            })
            .is_none()
        );
        assert_eq!(asked, MAX_GROUP);
    }

    fn sourced_append_req(member: u64, source: [u8; 16]) -> (Request, Rx<Appended>) {
        let (tx, rx) = oneshot::channel();
        (
            Request::Append(entry(member, b"body"), Some(source), tx),
            rx,
        )
    }

    /// The per-source counts follow the transactions exactly: a lost group
    /// leaves them as before, a request rolled back to its savepoint takes
    /// its changes with it, and the counts always equal a recount from the
    /// tables.
    #[test]
    fn source_shares_follow_commits_and_rollbacks() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = manual_writer(dir.path());
        w.conn
            .execute_batch(
                "CREATE TRIGGER lose BEFORE INSERT ON downlink WHEN NEW.kind = 254
                 BEGIN SELECT RAISE(ROLLBACK, 'injected'); END;
                 CREATE TRIGGER no_verdict BEFORE INSERT ON completed
                 BEGIN SELECT RAISE(ABORT, 'injected'); END;",
            )
            .unwrap();
        let (a, b) = ([1u8; 16], [2u8; 16]);
        let size = entry_size(&entry(1, b"body"));
        let (r1, _rx1) = sourced_append_req(1, a);
        let (p, _rp) = push_req(254);
        assert!(w.apply_group(vec![r1, p], || None).is_none());
        assert!(w.shares.held.is_empty(), "a lost group counts nothing");
        assert!(w.shares.log.is_empty());

        let (r1, mut rx1) = sourced_append_req(1, a);
        let (r2, mut rx2) = sourced_append_req(2, b);
        let (r3, mut rx3) = sourced_append_req(3, a);
        assert!(w.apply_group(vec![r1, r2, r3], || None).is_none());
        let ids: Vec<EntryId> = [&mut rx1, &mut rx2, &mut rx3]
            .into_iter()
            .map(|rx| rx.try_recv().unwrap().unwrap().id)
            .collect();
        assert_eq!(w.shares.held(&share_key(&a)), 2 * size);
        assert_eq!(w.shares.held(&share_key(&b)), size);
        assert_eq!(recount_shares(&w.conn).unwrap(), w.shares.held);

        // A completion that fails after its entries were deleted is rolled
        // back to its savepoint, counts included.
        let batch = w.reserve_batch_ids(1).unwrap();
        w.seal(batch, &ids, &Bytes::from_static(b"B"), &[[0; 16]; 3])
            .unwrap();
        let before = w.shares.held.clone();
        assert!(
            w.savepoint(|w| w.complete(batch, &[1; 32], &[], 0))
                .is_err()
        );
        assert_eq!(w.shares.held, before);
        w.conn.execute_batch("DROP TRIGGER no_verdict").unwrap();
        w.savepoint(|w| w.complete(batch, &[1; 32], &[], 0))
            .unwrap();
        assert!(w.shares.held.is_empty(), "answered sources are forgotten");
        assert_eq!(recount_shares(&w.conn).unwrap(), w.shares.held);
    }

    /// A spool of version 6 (attachments without a source) opens with
    /// its members read back with no source, and records sources after.
    #[tokio::test]
    async fn attachments_from_before_v7_read_without_a_source() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = raw(dir.path());
            for m in &MIGRATIONS[..6] {
                c.execute_batch(m).unwrap();
            }
            c.execute_batch(
                "PRAGMA user_version = 6;
                 INSERT INTO attached (member, groups, seen_ms) VALUES (5, x'00000007', 42);",
            )
            .unwrap();
        }
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let rows = spool.attached_members().await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (
                rows[0].member,
                &rows[0].groups[..],
                rows[0].seen_ms,
                rows[0].source
            ),
            (5, &[7][..], 42, None)
        );
        spool
            .set_attached(5, &[7], Some([9; 16]), 43)
            .await
            .unwrap();
        assert_eq!(
            spool.attached_members().await.unwrap()[0].source,
            Some([9; 16])
        );
        spool.close().await;
    }

    #[tokio::test]
    async fn newer_schema_is_refused_and_current_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        Spool::open(dir.path(), 1 << 20).unwrap().close().await;
        let v: i64 = raw(dir.path())
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, MIGRATIONS.len() as i64);
        raw(dir.path())
            .execute_batch("PRAGMA user_version = 99")
            .unwrap();
        match Spool::open(dir.path(), 1 << 20) {
            Err(SpoolError::Schema { found: 99, .. }) => {}
            other => panic!("expected a schema error, got {other:?}"),
        }
    }

    /// The statements run for every entry and every batch are prepared
    /// once: none may depend on a bound value (a partial index `WHERE x IS
    /// NOT NULL` made SQLite re-parse and re-plan every slot lookup).
    #[test]
    fn hot_statements_are_not_reprepared() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = manual_writer(dir.path());
        let last = w.reserve_batch_ids(3).unwrap();
        for b in 0..3u64 {
            let mut ids = Vec::new();
            for m in 0..20u64 {
                let member = b * 100 + m;
                let up = NewEntry {
                    stream: StreamKey::Uplink { group: 1 },
                    member,
                    sort_key: member.to_be_bytes().to_vec(),
                    bytes: Bytes::from(vec![m as u8; 8]),
                };
                ids.push(w.append(&up, None).unwrap().id);
                ids.push(w.append(&entry(member, b"body"), None).unwrap().id);
            }
            let batch_id = last - 2 + b;
            let tags = vec![[0u8; 16]; ids.len()];
            w.seal(batch_id, &ids, &Bytes::from_static(b"batch"), &tags)
                .unwrap();
            w.complete(batch_id, &[7; 32], &[], 0).unwrap();
        }
        assert_eq!(recount(&w.conn).unwrap().entries, 0);
        for sql in [SLOT_ROUND_SQL, SLOT_UPLINK_SQL, COMPLETE_ENTRIES_SQL] {
            let reprepared = w
                .conn
                .prepare_cached(sql)
                .unwrap()
                .get_status(rusqlite::StatementStatus::RePrepare);
            assert_eq!(reprepared, 0, "{sql}");
        }
    }

    #[test]
    fn writer_connection_is_wal_and_full_sync() {
        let dir = tempfile::tempdir().unwrap();
        let c = open_writer(&dir.path().join(DB_FILE)).unwrap();
        let mode: String = c
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = c.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap();
        assert_eq!(sync, 2);
    }
}
