//! The UDC's persistent state: one [`Store`] trait, two backends.
//!
//! ```text
//! gateway --batch--> udc server --> verifier (sans-IO) --state values--> seal --> Store
//!                                                                               |-- SqliteStore (embedded default)
//!                                                                               '-- PostgresStore (shared by several UDCs)
//! ```
//!
//! The store speaks plain columns plus opaque [`Sealed`] blobs: every piece
//! of secret-bearing state (session keys, group state, imported member keys,
//! round secrets, pending localizations) is sealed by the service layer with
//! `keys::StorageKey::seal_row` before it gets here, with the row's identity
//! in the AAD. The store never sees a secret in clear and never interprets a
//! sealed blob.
//!
//! Everything a batch changes goes through [`Store::apply_batch`] as one
//! [`BatchWrite`] in one transaction: the verdict under (gateway, batch id)
//! is written first and a second write under the same key fails with
//! [`StoreError::VerdictExists`] before anything else is touched, so a crash
//! never leaves a batch half applied and a retried batch changes nothing.
//! The same write set carries the other multi-row changes (opening a round,
//! publishing a group message, a rekey) so they are atomic too.
//!
//! Several UDC processes may share a PostgreSQL store. Rows that two of them
//! could write concurrently use compare-and-set: group rows carry a
//! `version` ([`StoreError::Conflict`] when stale), replay windows are
//! advanced only from the window the writer read, and schedules are claimed
//! by their expected next time.
//!
//! Integer mapping: `u64` values (member ids, rounds, cursors, counters) are
//! stored bit-cast into signed 64-bit columns. Ordered listings use that
//! signed order, so ids at or above 2^63 list before small ids; paging with
//! `after` stays complete and consistent.

mod pg_cluster;
mod postgres;
mod sqlite;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;

pub use crate::protocol::wire::Mode;
pub use pg_cluster::{PgCluster, PgClusterError};
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

/// An opaque blob already sealed under the storage key by the service layer.
///
/// The store only moves these bytes; `Debug` shows the length, never the
/// content.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Sealed(Vec<u8>);

impl Sealed {
    /// Wraps bytes produced by `StorageKey::seal_row`.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// The sealed bytes, to be opened by the service layer.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Unwraps the sealed bytes.
    pub fn into_vec(self) -> Vec<u8> {
        self.0
    }
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sealed(<{} bytes>)", self.0.len())
    }
}

/// Where a member's root key K_i comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// Derived from the master secret, id and kv; nothing is stored.
    Derived,
    /// A vendor key imported at enrolment, sealed.
    Imported(Sealed),
}

/// Whether a member may authenticate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberStatus {
    /// In good standing.
    Active,
    /// Revoked: excluded from its groups' later epochs.
    Revoked,
}

/// One member of the registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberRow {
    /// The member id.
    pub id: u64,
    /// The groups it belongs to, sorted, without duplicates.
    pub groups: Vec<u32>,
    /// Where its root key comes from.
    pub key_source: KeySource,
    /// The newest root key version issued to the member.
    pub kv: u32,
    /// The oldest root key version still accepted: `kv` itself, except
    /// between a key update and the member's first response under the new
    /// version (docs/protocol.md, "Key rotation"). Stored rows written
    /// before schema version 9 read as `kv`.
    pub min_kv: u32,
    /// Active or revoked.
    pub status: MemberStatus,
    /// When it was enrolled (unix ms).
    pub added_at_ms: u64,
}

/// One group's current state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupRow {
    /// The group id.
    pub group: u32,
    /// The current epoch e.
    pub epoch: u64,
    /// The next round number to hand out (rounds strictly increase).
    pub next_round: u64,
    /// The last group-message seq used.
    pub seq: u64,
    /// Hash of the group's configuration, announced in challenges.
    pub config_hash: [u8; 32],
    /// Sealed group state (GK_e and whatever the verifier keeps per group).
    pub state: Sealed,
    /// Optimistic-concurrency version: the version this row was read at.
    /// [`Store::insert_group`] stores version 1; an update stores
    /// `version + 1` only if the stored version still equals `version`.
    pub version: u64,
}

/// What a round asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoundPurpose {
    /// Authentication only.
    Auth,
    /// Authentication plus a group read (the request is in the challenge).
    Read,
}

/// Whether a round still accepts responses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoundStatus {
    /// Accepting responses.
    Open,
    /// Closed; its sealed state has been erased.
    Closed,
}

/// One round of one group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoundRow {
    /// The group.
    pub group: u32,
    /// The round number.
    pub round: u64,
    /// When it opened (unix ms).
    pub opened_at_ms: u64,
    /// When it closes, if it has a deadline (unix ms).
    pub closes_at_ms: Option<u64>,
    /// psk or psk-ecdhe.
    pub mode: Mode,
    /// auth or read.
    pub purpose: RoundPurpose,
    /// The signed challenge as sent (wire bytes).
    pub challenge: Vec<u8>,
    /// Sealed round secrets (the ephemeral X25519 secret in psk-ecdhe);
    /// emptied when the round closes.
    pub state: Sealed,
    /// Open or closed.
    pub status: RoundStatus,
}

/// What happened to one member in one round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutcomeKind {
    /// Its response verified.
    Accepted,
    /// Its response was rejected for a reason attributable to it.
    Rejected,
    /// A bad or missing tag seen through a gateway: not held against the
    /// member, counted against the gateway.
    Unverified,
}

/// One member's outcome in one round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutcomeRow {
    /// The group.
    pub group: u32,
    /// The round.
    pub round: u64,
    /// The member.
    pub member: u64,
    /// Accepted, rejected or unverified.
    pub kind: OutcomeKind,
    /// A short reason code (empty when accepted).
    pub reason: Cow<'static, str>,
    /// The gateway it came through (`None` on the direct path). Filled from
    /// [`BatchWrite::via`] on write.
    pub gateway: Option<String>,
}

/// A round's result summary for the admin API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoundReport {
    /// The round itself.
    pub round: RoundRow,
    /// Members accepted.
    pub accepted: u64,
    /// Members rejected, by reason, sorted by reason.
    pub rejected: Vec<(String, u64)>,
    /// Entries unverified via a gateway.
    pub unverified: u64,
    /// Active members of the group with no outcome in this round.
    pub missing: u64,
    /// Chunks localized in this round.
    pub localizations: u64,
}

/// The verdict stored under (gateway, batch id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredVerdict {
    /// Hash of the batch the verdict answers.
    pub batch_hash: [u8; 32],
    /// The verdict message as sent (wire bytes), re-sent byte for byte.
    pub verdict: Vec<u8>,
    /// False while the verdict is "tags requested" and a localization is
    /// pending.
    pub is_final: bool,
}

/// The verdict part of a [`BatchWrite`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerdictWrite {
    /// The gateway that sent the batch.
    pub gateway: String,
    /// The gateway's batch id.
    pub batch_id: u64,
    /// Hash of the batch.
    pub batch_hash: [u8; 32],
    /// The verdict message (wire bytes).
    pub verdict: Vec<u8>,
    /// `Some` when this verdict requests tags: the localization to keep
    /// until the tag reply (or expiry). `None` for a final verdict, which
    /// may replace a stored non-final verdict of the same batch hash.
    pub pending: Option<PendingWrite>,
}

/// The pending half of a tags-requested verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingWrite {
    /// Sealed verifier state needed to finish the batch.
    pub pending: Sealed,
    /// When the gateway's chance to send tags ends (unix ms).
    pub expires_at_ms: u64,
}

/// A pending localization, as read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingLocalization {
    /// The gateway.
    pub gateway: String,
    /// The batch id.
    pub batch_id: u64,
    /// Hash of the batch (a tag reply must name it).
    pub batch_hash: [u8; 32],
    /// The tags-requested verdict as sent.
    pub verdict: Vec<u8>,
    /// Sealed verifier state.
    pub pending: Sealed,
    /// Expiry (unix ms).
    pub expires_at_ms: u64,
}

/// The session slot of one (member, group) to write, compare-and-set.
///
/// The slot is the verifier's `SessionSlot` sealed whole: every session V
/// keeps for the pair (the one last seen in use, the newest not yet seen in
/// use, up to two older unused ones), each with its keys, replay window and
/// downlink counter. One row per pair, so a restart (or another UDC
/// process) sees exactly what the verifier left, and the version makes a
/// concurrent change of the same slot (two processes accepting uplinks of
/// one member) a [`StoreError::Conflict`] instead of a lost replay-window
/// update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRow {
    /// The member.
    pub member: u64,
    /// The group.
    pub group: u32,
    /// The newest session's id (shown by listings); `None` writes an empty
    /// slot (revoked member).
    pub sid: Option<[u8; 8]>,
    /// The sealed slot (ignored when `sid` is `None`).
    pub state: Sealed,
    /// The round that created the newest session.
    pub round: u64,
    /// When the member authenticated (a round's response accepted), to
    /// record as its last authentication in this group; `None` keeps the
    /// stored time (an uplink or a rekey changed the slot).
    pub authenticated_at_ms: Option<u64>,
    /// The version the slot was read at ([`StoredSlot::version`], 0 when
    /// no row was stored). The write stores `version + 1` only if the
    /// stored version still equals it; otherwise the whole write fails
    /// with [`StoreError::Conflict`].
    pub version: u64,
    /// The member's accepted rounds as read ([`StoredSlot::rounds`],
    /// empty when no row was stored); the stored window must still be
    /// this one.
    pub rounds: AcceptedRounds,
    /// The round of `group` in which this write accepts the member (its
    /// response verified), if any. The store adds it to `rounds`; a round
    /// already in `rounds` fails the whole write with
    /// [`StoreError::Conflict`]`("round outcome")`. With the version's
    /// compare-and-set this is what makes a member accepted once per
    /// round, also across UDC processes sharing a store.
    pub accepted_in: Option<u64>,
    /// The slot's [`SlotUse`] as read ([`StoredSlot::used`]), folded into
    /// `state`: the stored use of the version read must still be this one
    /// (`None`: none), or the whole write fails with
    /// [`StoreError::Conflict`]`("session slot")`. The write moves the
    /// version, which leaves the stored use behind (stale).
    pub use_read: Option<SlotUse>,
}

/// What uplinks changed in a session slot since it was sealed, kept in a
/// narrow row of its own (table `session_uses`, schema version 12) so that
/// an accepted uplink does not reseal and rewrite the whole slot: the
/// session `sid` was seen in use (the slot's `mark_used`), and its replay
/// window is now `top` / `seen`.
///
/// A use applies to one version of its slot (`base`): a write of the slot
/// folds the use into the sealed state and moves the version, after which
/// the stored use is stale and ignored. Not secret: session ids travel in
/// the clear, and a window says only which counters were accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotUse {
    /// The session seen in use.
    pub sid: [u8; 8],
    /// Its replay window's highest accepted counter.
    pub top: u64,
    /// Its replay window's bitmap (bit `i`: counter `top - i` accepted).
    pub seen: u64,
}

/// A [`SlotUse`] to store: see [`BatchWrite::slot_uses`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UseWrite {
    /// The member.
    pub member: u64,
    /// The group.
    pub group: u32,
    /// The slot version the use applies to: the version read (at least 1).
    pub base: u64,
    /// The use read with that version (`None`: none applied).
    pub read: Option<SlotUse>,
    /// The use to store in its place.
    pub new: SlotUse,
}

/// The rounds of one group in which a member was accepted, stored on its
/// session slot row: a window over round numbers, like the uplink replay
/// window. `top` is the newest accepted round; bit `i` of `seen` says
/// round `top - i` was accepted (`seen == 0`: none yet).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AcceptedRounds {
    /// The newest accepted round.
    pub top: u64,
    /// Bitmap of the accepted rounds at and below `top`.
    pub seen: u64,
}

impl AcceptedRounds {
    /// How many rounds back from the newest accepted one the window
    /// remembers. A response to an older round cannot be told apart from a
    /// second acceptance and is set aside as already accepted (a member
    /// that answered 64 newer rounds of its group does not answer this
    /// one legitimately).
    pub const SPAN: u64 = 64;

    /// Whether a response to `round` must not be accepted again: the
    /// member was accepted in it, or it is [`Self::SPAN`] or more rounds
    /// older than the newest accepted one.
    pub fn contains(&self, round: u64) -> bool {
        if self.seen == 0 || round > self.top {
            return false;
        }
        let back = self.top - round;
        back >= Self::SPAN || (self.seen >> back) & 1 == 1
    }

    /// The window with `round` added; `None` if [`Self::contains`] it.
    pub fn with(self, round: u64) -> Option<Self> {
        if self.contains(round) {
            return None;
        }
        if self.seen == 0 {
            return Some(Self {
                top: round,
                seen: 1,
            });
        }
        Some(if round > self.top {
            let shift = round - self.top;
            let seen = if shift >= Self::SPAN {
                0
            } else {
                self.seen << shift
            };
            Self {
                top: round,
                seen: seen | 1,
            }
        } else {
            Self {
                top: self.top,
                seen: self.seen | (1 << (self.top - round)),
            }
        })
    }

    /// The window a [`SessionRow`] stores: `rounds` plus `accepted_in`, or
    /// [`StoreError::Conflict`]`("round outcome")` if the member was
    /// already accepted in that round.
    fn after_write(row: &SessionRow) -> Result<Self, StoreError> {
        match row.accepted_in {
            None => Ok(row.rounds),
            Some(r) => row
                .rounds
                .with(r)
                .ok_or(StoreError::Conflict("round outcome")),
        }
    }
}

/// What judging a batch needs of a stored session slot
/// ([`BatchReads::sessions`]): [`StoredSlot`] without the columns only
/// listings show, so the batch read carries five columns per member instead
/// of nine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchSlot {
    /// The sealed slot; `None` when empty.
    pub state: Option<Sealed>,
    /// Compare-and-set version (see [`SessionRow::version`]).
    pub version: u64,
    /// The rounds of the group in which the member was accepted.
    pub rounds: AcceptedRounds,
    /// The use that applies to this version of the slot, if any.
    pub used: Option<SlotUse>,
}

impl From<StoredSlot> for BatchSlot {
    fn from(s: StoredSlot) -> Self {
        Self {
            state: s.state,
            version: s.version,
            rounds: s.rounds,
            used: s.used,
        }
    }
}

impl BatchSlot {
    /// The batch's view of whole slots read with [`Store::sessions`], in
    /// the same order.
    pub fn from_stored(slots: Vec<Option<StoredSlot>>) -> Vec<Option<BatchSlot>> {
        slots.into_iter().map(|s| s.map(BatchSlot::from)).collect()
    }
}

/// The stored session slot of one (member, group).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredSlot {
    /// The member.
    pub member: u64,
    /// The group.
    pub group: u32,
    /// The newest session's id; `None` when the slot is empty.
    pub sid: Option<[u8; 8]>,
    /// The sealed slot; `None` when empty.
    pub state: Option<Sealed>,
    /// The round that created the newest session.
    pub round: u64,
    /// The member's last successful authentication in this group (unix ms);
    /// kept by [`Store::drop_all_sessions`].
    pub last_auth_ms: u64,
    /// Compare-and-set version (see [`SessionRow::version`]).
    pub version: u64,
    /// The rounds of the group in which the member was accepted (kept by
    /// [`Store::drop_all_sessions`] and by empty slots).
    pub rounds: AcceptedRounds,
    /// The [`SlotUse`] that applies to this version of the slot: the
    /// sealed state is the truth only with it applied.
    pub used: Option<SlotUse>,
}

/// One accepted uplink reading (or alarm), payload already decrypted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadingRow {
    /// The member.
    pub member: u64,
    /// The group.
    pub group: u32,
    /// The session it came in.
    pub sid: [u8; 8],
    /// Its uplink counter; (member, group, sid, ctr) is unique.
    pub ctr: u64,
    /// When the UDC accepted it (unix ms).
    pub ts_ms: u64,
    /// The uplink kind code.
    pub kind: u8,
    /// The payload.
    pub payload: Vec<u8>,
}

impl ReadingRow {
    /// Where this reading sits in its member's readings (see [`ReadingKey`]).
    pub fn key(&self) -> ReadingKey {
        ReadingKey {
            ts_ms: self.ts_ms,
            group: self.group,
            sid: self.sid,
            ctr: self.ctr,
        }
    }
}

/// A position in one member's readings: [`Store::readings_after`] lists
/// them in (ts_ms, group, sid, ctr) order, a total order ((member, group,
/// sid, ctr) is unique), so a page that starts after the previous page's
/// last key neither repeats nor skips readings of the same millisecond.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadingKey {
    /// When the UDC accepted the reading (unix ms).
    pub ts_ms: u64,
    /// Its group.
    pub group: u32,
    /// Its session.
    pub sid: [u8; 8],
    /// Its uplink counter.
    pub ctr: u64,
}

impl ReadingKey {
    /// Length of [`ReadingKey::to_token`]'s output.
    const TOKEN_LEN: usize = 2 * (8 + 4 + 8 + 8);

    /// The key as an opaque page token (56 hex digits) for the operator
    /// API's `next`/`after`.
    pub fn to_token(&self) -> String {
        let mut b = Vec::with_capacity(Self::TOKEN_LEN / 2);
        b.extend_from_slice(&self.ts_ms.to_be_bytes());
        b.extend_from_slice(&self.group.to_be_bytes());
        b.extend_from_slice(&self.sid);
        b.extend_from_slice(&self.ctr.to_be_bytes());
        hex::encode(b)
    }

    /// Parses a token made by [`ReadingKey::to_token`]; `None` for anything
    /// else.
    pub fn from_token(token: &str) -> Option<Self> {
        if token.len() != Self::TOKEN_LEN {
            return None;
        }
        let b = hex::decode(token).ok()?;
        let (ts_ms, rest) = b.split_first_chunk::<8>()?;
        let (group, rest) = rest.split_first_chunk::<4>()?;
        let (sid, rest) = rest.split_first_chunk::<8>()?;
        let ctr = <[u8; 8]>::try_from(rest).ok()?;
        Some(Self {
            ts_ms: u64::from_be_bytes(*ts_ms),
            group: u32::from_be_bytes(*group),
            sid: *sid,
            ctr: u64::from_be_bytes(ctr),
        })
    }
}

/// A member's acknowledgement of a group message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AckRow {
    /// The group.
    pub group: u32,
    /// The group message seq.
    pub seq: u64,
    /// The member.
    pub member: u64,
    /// When it was accepted (unix ms).
    pub at_ms: u64,
}

/// One page of a group message's acks, with how many there are in all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AckPage {
    /// Members that acknowledged the message, all pages together.
    pub total: u64,
    /// This page's acks, by member (in the store's order of member ids,
    /// as every member page: signed order of the bit-cast ids).
    pub acks: Vec<AckRow>,
}

/// Who a downlink record is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Audience {
    /// Every member of the record's group.
    Group,
    /// One member.
    Member(u64),
}

/// One downlink record (docs: records framing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DownlinkRecord {
    /// Group or member.
    pub audience: Audience,
    /// The group it concerns (routing key for fan-out).
    pub group: u32,
    /// A complete wire message.
    pub message: Vec<u8>,
}

impl DownlinkRecord {
    /// A record for member `member` alone (a confirm, rekey or key update).
    pub fn to_member(member: u64, group: u32, message: &[u8]) -> Self {
        Self {
            audience: Audience::Member(member),
            group,
            message: message.to_vec(),
        }
    }
}

/// Which queues a [`DownlinkPush`] goes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DownlinkTarget {
    /// One gateway's queue.
    Gateway(String),
    /// Every gateway subscribed to each record's group.
    Subscribers,
}

/// Records to append to downlink queues.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DownlinkPush {
    /// Where they go.
    pub target: DownlinkTarget,
    /// The records, in order.
    pub records: Vec<DownlinkRecord>,
}

/// Message bytes at which a downlink read stops adding records: the first
/// record always goes, and no record is added once the ones before it hold
/// this many bytes, so one read holds at most this plus one record (a group
/// message is at most about 64 KiB). Without it, 1,024 group messages at
/// their size cap made a 64 MiB answer, over what a gateway takes in one
/// body (32 MiB), and its downlink pull failed on that answer forever.
pub const DOWNLINK_PAGE_BYTES: usize = 4 << 20;

/// A record as read from a gateway's queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRecord {
    /// Strictly increasing within the gateway's queue.
    pub cursor: u64,
    /// The record.
    pub record: DownlinkRecord,
}

/// A published group message (bulk configuration update).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupMessageRow {
    /// The group.
    pub group: u32,
    /// Its seq (strictly increasing per group).
    pub seq: u64,
    /// The epoch whose key encrypts it.
    pub epoch: u64,
    /// The signed message (wire bytes).
    pub bytes: Vec<u8>,
    /// SHA-256 of the message, as members' acks bind it.
    pub payload_hash: [u8; 32],
    /// When it was published (unix ms).
    pub created_at_ms: u64,
}

/// A periodic round schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduleRow {
    /// Assigned by the store (ignored on insert).
    pub id: u64,
    /// The group.
    pub group: u32,
    /// Period (ms).
    pub every_ms: u64,
    /// Mode of the rounds it opens.
    pub mode: Mode,
    /// Purpose of the rounds it opens.
    pub purpose: RoundPurpose,
    /// The read request its read rounds carry (empty: the meter's default
    /// reading; always empty for auth schedules). The operator API keeps it
    /// within the wire's 256 bytes.
    pub read_request: Vec<u8>,
    /// When it fires next (unix ms).
    pub next_at_ms: u64,
}

/// The gateway a batch came through and what to add to its counters.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Via {
    /// The gateway id.
    pub gateway: String,
    /// Batches to add (1 for a final verdict).
    pub batches: u64,
    /// Entries to add.
    pub entries: u64,
    /// Accepted entries to add.
    pub accepted: u64,
    /// Localized chunks to add.
    pub localizations: u64,
    /// Entries unverified via this gateway to add (misbehaviour count).
    pub unverified: u64,
}

/// Per-gateway summary for the admin API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayRow {
    /// The gateway id.
    pub gateway: String,
    /// Batches with a final verdict.
    pub batches: u64,
    /// Entries in them.
    pub entries: u64,
    /// Entries accepted.
    pub accepted: u64,
    /// Chunks localized.
    pub localizations: u64,
    /// Entries unverified via this gateway.
    pub unverified: u64,
    /// Last batch (unix ms).
    pub last_batch_ms: u64,
}

/// Localized chunks to add to a round's counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoundLocalizations {
    /// The group.
    pub group: u32,
    /// The round.
    pub round: u64,
    /// Chunks to add.
    pub chunks: u64,
}

/// [`BatchWrite::schedule_claim`]: schedule `id`'s `next_at_ms` moves from
/// `expected_next_ms` to `next_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduleClaim {
    /// The schedule.
    pub id: u64,
    /// Its due time as read.
    pub expected_next_ms: u64,
    /// Its next due time.
    pub next_ms: u64,
}

/// A session slot's version as a write read it: see
/// [`BatchWrite::slot_checks`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotCheck {
    /// The member.
    pub member: u64,
    /// The group.
    pub group: u32,
    /// The version read (at least 1: only stored slots are checked).
    pub version: u64,
}

/// A change of one member's root key versions, made without rewriting the
/// member's row: see [`BatchWrite::key_versions`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyVersionChange {
    /// A key update to `to_kv` was issued: the stored `kv` moves from
    /// `from_kv` to `to_kv`, compare-and-set on `from_kv` and on the member
    /// being active, or the write fails with
    /// [`StoreError::Conflict`]`("member key version")`. `min_kv` stays.
    Issued {
        /// The member.
        member: u64,
        /// The `kv` read.
        from_kv: u32,
        /// The `kv` issued.
        to_kv: u32,
    },
    /// A write that replaces the member's row whole (`members`) read these
    /// versions: they must still be the stored ones, or the write fails
    /// with [`StoreError::Conflict`]`("member key version")` (another
    /// process issued or confirmed a key update meanwhile). A member with
    /// no row passes.
    Expected {
        /// The member.
        member: u64,
        /// The `kv` read.
        kv: u32,
        /// The `min_kv` read.
        min_kv: u32,
    },
    /// The member answered under `kv` (a verdict's `kv_confirmed`): `min_kv`
    /// rises to `kv` if it is lower and `kv` is not above the stored `kv`;
    /// otherwise nothing changes (a later key update, or a member re-added
    /// meanwhile, decided).
    Confirmed {
        /// The member.
        member: u64,
        /// The version it answered under.
        kv: u32,
    },
}

/// Everything one batch (or one other atomic change) writes, applied by
/// [`Store::apply_batch`] in one transaction in this order: schedule
/// claim, group epoch checks, slot checks, verdict, key versions, members, groups, rounds,
/// sessions, readings, acks,
/// outcomes, counters, downlink. Any failure rolls all of it back.
#[derive(Clone, Debug, Default)]
pub struct BatchWrite {
    /// The time of the write (unix ms), used for last-seen and ack times.
    pub now_ms: u64,
    /// The verdict, if this write answers a batch. Written first.
    pub verdict: Option<VerdictWrite>,
    /// The gateway the batch came through and its counter deltas.
    pub via: Option<Via>,
    /// A schedule's due slot that this write (the scheduled round's
    /// opening) claims: compare-and-set on the schedule's `next_at_ms`,
    /// first; if another process claimed it since, nothing is written and
    /// the write fails with [`StoreError::Conflict`]`("schedule")`. The
    /// slot is spent only if the round opens.
    pub schedule_claim: Option<ScheduleClaim>,
    /// (group, epoch) pairs the write was judged against: checked first,
    /// and if a group's stored epoch is no longer the one given (another
    /// process revoked or added a member meanwhile) nothing is written and
    /// the write fails with [`StoreError::Conflict`]. On PostgreSQL the
    /// group row stays share-locked until the commit, so a rekey cannot
    /// commit between this check and the write.
    pub group_epochs: Vec<(u32, u64)>,
    /// (group, round) pairs the write was judged as open: checked like
    /// `group_epochs`, and if one was closed since (another process closed
    /// it) nothing is written and the write fails with
    /// [`StoreError::Conflict`]; judged again, its entries are refused as
    /// for a closed round. On PostgreSQL the round row stays share-locked
    /// until the commit, so a close waits for this write.
    pub open_rounds: Vec<(u32, u64)>,
    /// Members to insert or replace.
    pub members: Vec<MemberRow>,
    /// Root key version changes and checks ([`KeyVersionChange`]), applied
    /// before `members`. On PostgreSQL a write with `members` or
    /// `key_versions` first locks the registry version row, so writes that
    /// change the registry run one at a time and take it before any group
    /// or round row (no lock-order cycle with a rekey's group row).
    pub key_versions: Vec<KeyVersionChange>,
    /// `members` are new (an import): one registered meanwhile (by another
    /// process) is not replaced, the write fails with
    /// [`StoreError::Conflict`] instead, and nothing is written.
    pub members_new_only: bool,
    /// Group rows to update, compare-and-set on `version`.
    pub groups: Vec<GroupRow>,
    /// Rounds to open (insert; an existing (group, round) is a conflict).
    pub new_rounds: Vec<RoundRow>,
    /// Rounds to close: status closed, sealed state erased.
    pub closed_rounds: Vec<(u32, u64)>,
    /// Session slots to write, compare-and-set on their version; at most
    /// one per (member, group) per write.
    pub sessions: Vec<SessionRow>,
    /// Session slots the write was judged against but does not change
    /// (members whose uplinks were all rejected): each must still hold the
    /// version read, or the write fails with [`StoreError::Conflict`]. On
    /// PostgreSQL the row stays share-locked until the commit. Unlike a
    /// rewrite, a check moves no version, so a refused entry cannot make
    /// honest batches judged elsewhere conflict. The slot's [`SlotUse`] is
    /// not checked: a use stored since the read only marks a session used
    /// and moves its window forward, so nothing refused on the slot as read
    /// would be accepted on the slot as it is.
    pub slot_checks: Vec<SlotCheck>,
    /// Session uses to store, one per slot, for slots the write does not
    /// rewrite (`sessions` holds none of them; a write that breaks either
    /// rule is refused whole with [`StoreError::InvalidWrite`] by both
    /// stores' [`Store::apply_batch`], before anything is read): each slot
    /// must still hold
    /// the version `base` (checked like `slot_checks`, share-locked on
    /// PostgreSQL) and its stored use must still be `read`, or the write
    /// fails with [`StoreError::Conflict`]`("session slot")`.
    pub slot_uses: Vec<UseWrite>,
    /// (group, members) that held no session when the write was judged (a
    /// rekey gave them none): checked after the group rows are written, and
    /// if any of them holds a session now the write fails with
    /// [`StoreError::Conflict`]`("session slot")`. On PostgreSQL the check
    /// runs after the group row's update, which waits for any batch that
    /// share-locked the group row (judged against the old epoch) to commit,
    /// so such a batch's first sessions are seen.
    pub sessionless: Vec<(u32, Vec<u64>)>,
    /// Readings to insert. On PostgreSQL a duplicate (member, group, sid,
    /// ctr) fails the write; SQLite stores readings in arrival order without
    /// that key (migration 8): the slot's windows, written in the same
    /// write, are what refuse a repeat.
    pub readings: Vec<ReadingRow>,
    /// Group-message acks (duplicates ignored).
    pub acks: Vec<AckRow>,
    /// Group messages to publish (an existing (group, seq) is a conflict).
    pub group_messages: Vec<GroupMessageRow>,
    /// Per-member round outcomes, for the round reports: stored as one
    /// row per (group, round) of this write, the entries encoded in one
    /// blob. In a report an accepted outcome is final (a later rejected or
    /// unverified one for the same member and round does not replace it);
    /// otherwise the latest wins. That a member is accepted only once per
    /// round is decided by its session slot write
    /// ([`SessionRow::accepted_in`]), not here.
    pub outcomes: Vec<OutcomeRow>,
    /// Round localization counters to add to.
    pub round_localizations: Vec<RoundLocalizations>,
    /// Downlink records to append (stored as one row per gateway queue:
    /// the records of one write share a row).
    pub downlink: Vec<DownlinkPush>,
}

impl BatchWrite {
    /// The rules of [`Self::slot_uses`] that no store statement checks:
    /// at most one use per slot, and none for a slot `sessions` rewrites
    /// (the stores order their checks differently, so such a write would
    /// not fail the same way on both).
    pub(crate) fn check_uses(&self) -> Result<(), StoreError> {
        if self.slot_uses.is_empty() {
            return Ok(());
        }
        let rewritten: std::collections::HashSet<(u64, u32)> =
            self.sessions.iter().map(|s| (s.member, s.group)).collect();
        let mut used = std::collections::HashSet::with_capacity(self.slot_uses.len());
        for u in &self.slot_uses {
            let key = (u.member, u.group);
            if rewritten.contains(&key) || !used.insert(key) {
                return Err(StoreError::InvalidWrite(
                    "a session use for a slot the write also rewrites or gives another use",
                ));
            }
        }
        Ok(())
    }
}

/// [`RecoveryReads::newest_record_ms`], in SQL both backends run.
pub(crate) const NEWEST_RECORD_SQL: &str = "SELECT max(t) FROM (\
    SELECT max(added_at_ms) AS t FROM members \
    UNION ALL SELECT max(opened_at_ms) FROM rounds \
    UNION ALL SELECT max(created_at_ms) FROM verdicts \
    UNION ALL SELECT max(created_at_ms) FROM group_messages \
    UNION ALL SELECT max(created_at_ms) FROM downlink) AS times";

/// The recovery floor's row (one per store).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecoveryState {
    /// Groups created from now on start their round, epoch and message seq
    /// above it; gateway queues started from now on hand out cursors above
    /// it. 0 until the first recovery.
    pub floor: u64,
    /// Recoveries run so far on this store's line of history.
    pub recoveries: u64,
    /// When the last recovery ran (`None`: never).
    pub recovered_at_ms: Option<u64>,
    /// The newest time the store recorded anything at when the last
    /// recovery ran (about when its backup was taken; `None`: never, or
    /// an empty store).
    pub newest_record_ms: Option<u64>,
}

/// What [`Store::recovery_reads`] read, of one instant.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReads {
    /// The floor row.
    pub state: RecoveryState,
    /// Every group's row, by group.
    pub groups: Vec<GroupRow>,
    /// The groups named by a member, a gateway subscription or a schedule
    /// that have no row, by group.
    pub named_without_row: Vec<u32>,
    /// Every open round.
    pub open_rounds: Vec<RoundRow>,
    /// The newest time the store records anything at (a member added, a
    /// round opened, a verdict, a group message, a downlink record):
    /// about when the backup was taken. `None` on an empty store.
    pub newest_record_ms: Option<u64>,
}

/// What [`Store::recover`] writes.
#[derive(Clone, Debug, Default)]
pub struct RecoveryWrite {
    /// The floor [`Store::recovery_reads`] read (compare-and-set).
    pub floor_before: u64,
    /// The new floor.
    pub floor: u64,
    /// Added to every gateway's downlink head and to the registry version.
    pub raise_by: u64,
    /// Groups to create (named but without a row), at version 1.
    pub new_groups: Vec<GroupRow>,
    /// Members to mark revoked (revoked after the backup; the restore
    /// undid it), before the batch's rounds are queued.
    pub revoke: Vec<u64>,
    /// Stored as [`RecoveryState::newest_record_ms`].
    pub newest_record_ms: Option<u64>,
    /// Applied last, in the same transaction (its `now_ms` is the
    /// recovery's time).
    pub batch: BatchWrite,
}

/// What [`Store::recover`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryApplied {
    /// (member, group) session slots emptied.
    pub sessions_dropped: u64,
    /// Gateway queues whose head rose.
    pub gateways_raised: u64,
    /// Members of [`RecoveryWrite::revoke`] marked revoked (active until
    /// then).
    pub members_revoked: u64,
    /// Members of [`RecoveryWrite::revoke`] the store does not hold.
    pub revoke_not_found: Vec<u64>,
}

/// What [`Store::batch_reads`] read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchReads {
    /// The group (`None`: not created yet).
    pub group: Option<GroupRow>,
    /// The registry version the member rows were read at (or after: a row
    /// is never older than this version).
    pub registry_version: u64,
    /// Which ids `members` answers.
    pub members_of: MembersOf,
    /// The members, in the order asked (`None` if unknown): the batch's
    /// ids, or only [`MemberFetch::missing`] (see `members_of`).
    pub members: Vec<Option<MemberRow>>,
    /// Their session slots in the group, in the same order as the batch's
    /// ids.
    pub sessions: Vec<Option<BatchSlot>>,
    /// The round, if one was asked for and is stored.
    pub round: Option<RoundRow>,
}

/// Member rows a caller already holds, read at registry version `version`:
/// [`Store::batch_reads`] then reads only the `missing` ones, unless the
/// registry changed since (another version), when it reads them all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberFetch {
    /// The registry version the caller's rows were read at.
    pub version: u64,
    /// The batch's ids the caller does not hold, ascending.
    pub missing: Vec<u64>,
}

impl MemberFetch {
    /// Which of a batch's `ids` [`Store::batch_reads`] reads member rows
    /// for, given the caller's `fetch` and the registry version read:
    /// only the missing ones if the caller's rows are of that version,
    /// else all of them.
    pub fn ids_to_read<'a>(
        fetch: Option<&'a Self>,
        registry_version: u64,
        ids: &'a [u64],
    ) -> (&'a [u64], MembersOf) {
        match fetch {
            Some(f) if f.version == registry_version => (&f.missing, MembersOf::Missing),
            _ => (ids, MembersOf::All),
        }
    }
}

/// Which ids [`BatchReads::members`] answers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MembersOf {
    /// Every id of the batch: the caller's copy is stale (or it had none).
    #[default]
    All,
    /// Only [`MemberFetch::missing`]: the caller's copy is current.
    Missing,
}

/// What [`Store::apply_batch`] reports back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// For each gateway queue that received records, its last cursor now
    /// (to wake long polls), sorted by gateway.
    pub downlink_heads: Vec<(String, u64)>,
}

/// A store failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store URL is malformed or names an unknown scheme. The message
    /// never repeats the URL (it may hold a password).
    #[error("store url: {0}")]
    Url(&'static str),
    /// A verdict is already stored under this (gateway, batch id). The
    /// caller answers with the stored verdict (same hash) or 409.
    #[error("a verdict is already stored for this gateway and batch id")]
    VerdictExists {
        /// Hash of the batch the stored verdict answers.
        batch_hash: [u8; 32],
        /// Whether the stored verdict is final.
        is_final: bool,
    },
    /// Another writer changed the row first (or the row to create exists):
    /// reload and retry.
    #[error("concurrent update of {0}; reload and retry")]
    Conflict(&'static str),
    /// A counter the recovery after a restore raises (named) would pass
    /// `u64::MAX`; nothing was written.
    #[error("the {0} cannot rise any further without passing 2^64")]
    CounterExhausted(&'static str),
    /// A row an update names does not exist.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// A stored value cannot be mapped back (an enum code out of range, a
    /// hash of the wrong length): the database was edited by hand or is
    /// from an incompatible version.
    #[error("stored data is corrupt: {0}")]
    Corrupt(&'static str),
    /// A [`BatchWrite`] the store refuses before touching anything: it
    /// breaks a rule of its own fields (a programming error of the caller).
    #[error("invalid write: {0}")]
    InvalidWrite(&'static str),
    /// The database schema is newer than this binary.
    #[error(
        "store schema version {found} is newer than this binary supports ({supported}); upgrade dapgw"
    )]
    SchemaTooNew {
        /// Version found in the database.
        found: i64,
        /// Latest version this binary knows.
        supported: i64,
    },
    /// Creating the data directory failed.
    #[error("store data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The SQLite database stayed locked past the busy timeout (another
    /// process holding it, or a filesystem whose locks fail): nothing was
    /// written; retry.
    #[error("the database stayed locked past the busy timeout ({0}); retry")]
    Locked(#[source] rusqlite::Error),
    /// SQLite reported an error.
    #[error("sqlite: {0}")]
    Sqlite(rusqlite::Error),
    /// PostgreSQL reported an error (or the connection failed).
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// The blocking worker running SQLite went away (panicked).
    #[error("sqlite worker failed")]
    Worker,
}

impl From<rusqlite::Error> for StoreError {
    /// `SQLITE_BUSY` (a lock held past the busy timeout, by another
    /// process on the same file) is [`Self::Locked`], which callers retry;
    /// anything else is [`Self::Sqlite`]. (`SQLITE_LOCKED`, a conflict
    /// within one connection, cannot come from another process and is not
    /// retried.)
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy) => Self::Locked(e),
            _ => Self::Sqlite(e),
        }
    }
}

/// What the UDC's background pass has to do ([`Store::due_work`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DueWork {
    /// Some pending localization expired.
    pub localizations: bool,
    /// The schedules whose next slot has come, by id.
    pub schedules: Vec<ScheduleRow>,
    /// Every open round, by (group, round); the pass closes those past
    /// their deadline and drops its cached state of the rounds missing.
    pub open_rounds: Vec<RoundRow>,
}

/// The UDC's storage. Implemented by [`SqliteStore`] and [`PostgresStore`];
/// the service holds an [`AnyStore`].
///
/// Reads that take a list (`members`, `sessions`) do one query for the whole
/// list and answer in the list's order.
pub trait Store: Send + Sync {
    /// Inserts or replaces a member (its group list is replaced too; last
    /// authentication times of groups it keeps are kept).
    fn upsert_member(&self, row: MemberRow) -> impl Future<Output = Result<(), StoreError>> + Send {
        async move {
            self.apply_batch(BatchWrite {
                members: vec![row],
                ..BatchWrite::default()
            })
            .await
            .map(|_| ())
        }
    }
    /// The members with these ids, in the same order (`None` if unknown).
    fn members(
        &self,
        ids: Vec<u64>,
    ) -> impl Future<Output = Result<Vec<Option<MemberRow>>, StoreError>> + Send;
    /// Up to `limit` members with ids after `after`, in id order.
    fn list_members(
        &self,
        after: Option<u64>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<MemberRow>, StoreError>> + Send;
    /// Up to `limit` active members of `group` after `after`, in id order.
    fn group_members(
        &self,
        group: u32,
        after: Option<u64>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<u64>, StoreError>> + Send;
    /// Sets a member's status; false if the member is unknown.
    fn set_member_status(
        &self,
        id: u64,
        status: MemberStatus,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Moves a member to root key version `kv` (with its key source), a new
    /// credential: older versions are no longer accepted (`min_kv = kv`);
    /// false if the member is unknown.
    fn set_kv(
        &self,
        id: u64,
        kv: u32,
        key_source: KeySource,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Creates a group at version 1; [`StoreError::Conflict`] if it exists.
    fn insert_group(&self, row: GroupRow) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// One group.
    fn group(
        &self,
        group: u32,
    ) -> impl Future<Output = Result<Option<GroupRow>, StoreError>> + Send;
    /// Every group, by id.
    fn list_groups(&self) -> impl Future<Output = Result<Vec<GroupRow>, StoreError>> + Send;
    /// Updates a group if its stored version is still `row.version`;
    /// returns the new version, or [`StoreError::Conflict`].
    fn update_group(&self, row: GroupRow) -> impl Future<Output = Result<u64, StoreError>> + Send {
        let expected = row.version;
        async move {
            self.apply_batch(BatchWrite {
                groups: vec![row],
                ..BatchWrite::default()
            })
            .await?;
            Ok(expected + 1)
        }
    }

    /// One round.
    fn round(
        &self,
        group: u32,
        round: u64,
    ) -> impl Future<Output = Result<Option<RoundRow>, StoreError>> + Send;
    /// Every open round, by (group, round).
    fn open_rounds(&self) -> impl Future<Output = Result<Vec<RoundRow>, StoreError>> + Send;
    /// The round's result summary.
    fn round_report(
        &self,
        group: u32,
        round: u64,
    ) -> impl Future<Output = Result<Option<RoundReport>, StoreError>> + Send;
    /// Up to `limit` per-member outcomes of a round after member `after`.
    fn round_outcomes(
        &self,
        group: u32,
        round: u64,
        after: Option<u64>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<OutcomeRow>, StoreError>> + Send;
    /// Up to `limit` active members of the group with no outcome in the
    /// round, after member `after`.
    fn round_missing(
        &self,
        group: u32,
        round: u64,
        after: Option<u64>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<u64>, StoreError>> + Send;

    /// The verdict stored under (gateway, batch id).
    fn verdict(
        &self,
        gateway: &str,
        batch_id: u64,
    ) -> impl Future<Output = Result<Option<StoredVerdict>, StoreError>> + Send;
    /// The pending localization of (gateway, batch id).
    fn pending_localization(
        &self,
        gateway: &str,
        batch_id: u64,
    ) -> impl Future<Output = Result<Option<PendingLocalization>, StoreError>> + Send;
    /// Up to `limit` pending localizations that expired at or before
    /// `now_ms`, oldest first; the service finalizes each with a
    /// [`BatchWrite`] (which removes it).
    fn expired_localizations(
        &self,
        now_ms: u64,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<PendingLocalization>, StoreError>> + Send;
    /// What the UDC's background pass has to look at, at `now_ms`: whether
    /// any localization expired, the schedules that are due and every open
    /// round. The pass runs every second on every UDC process, so a store
    /// reads all three in as few round trips as it can (SQLite: one read
    /// transaction); the default asks the three questions apart.
    fn due_work(&self, now_ms: u64) -> impl Future<Output = Result<DueWork, StoreError>> + Send {
        async move {
            let mut schedules = self.schedules().await?;
            schedules.retain(|s| s.next_at_ms <= now_ms);
            Ok(DueWork {
                localizations: !self.expired_localizations(now_ms, 1).await?.is_empty(),
                schedules,
                open_rounds: self.open_rounds().await?,
            })
        }
    }

    /// Applies a write set in one transaction (see [`BatchWrite`]).
    fn apply_batch(
        &self,
        write: BatchWrite,
    ) -> impl Future<Output = Result<Applied, StoreError>> + Send;

    /// What a batch of `group` naming members `ids` (and answering
    /// `round`, if given) is judged against, read together: SQLite reads it
    /// in one transaction on one trip to its worker thread, PostgreSQL in one
    /// read-only snapshot. The default makes the reads one after the other:
    /// the group first (a registry change committed after it comes with a
    /// new epoch, so the batch's write fails its epoch check), then the
    /// registry version, then the member rows (never older than the version
    /// they are kept under; see [`MemberFetch`]).
    fn batch_reads(
        &self,
        group: u32,
        ids: Vec<u64>,
        round: Option<u64>,
        fetch: Option<MemberFetch>,
    ) -> impl Future<Output = Result<BatchReads, StoreError>> + Send {
        async move {
            let keys = ids.iter().map(|m| (*m, group)).collect();
            let group_row = self.group(group).await?;
            let registry_version = self.registry_version().await?;
            let (asked, members_of) =
                MemberFetch::ids_to_read(fetch.as_ref(), registry_version, &ids);
            let members = self.members(asked.to_vec()).await?;
            let sessions = BatchSlot::from_stored(self.sessions(keys).await?);
            let round = match round {
                Some(r) => self.round(group, r).await?,
                None => None,
            };
            Ok(BatchReads {
                group: group_row,
                registry_version,
                members_of,
                members,
                sessions,
                round,
            })
        }
    }

    /// The member registry's version: a counter that every change to a
    /// member or its groups raises in the same transaction (migration 6).
    fn registry_version(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// The sessions of each (member, group), one query, in the same order.
    fn sessions(
        &self,
        keys: Vec<(u64, u32)>,
    ) -> impl Future<Output = Result<Vec<Option<StoredSlot>>, StoreError>> + Send;
    /// Every session of the members from `first` through `last` in the
    /// order [`Store::list_members`] lists them (that of their stored,
    /// bit-cast ids), by member then group, in one query: the sessions of
    /// one page of members.
    fn member_sessions(
        &self,
        first: u64,
        last: u64,
    ) -> impl Future<Output = Result<Vec<StoredSlot>, StoreError>> + Send;
    /// Drops every session; last-auth times stay (the step
    /// [`Store::recover`] takes inside its transaction).
    /// Returns the number of (member, group) rows cleared.
    fn drop_all_sessions(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// The recovery floor (migration 7 on SQLite, 8 on PostgreSQL): a group
    /// created now starts above [`RecoveryState::floor`].
    fn recovery_state(&self) -> impl Future<Output = Result<RecoveryState, StoreError>> + Send;
    /// What the recovery after a restore reads, in one snapshot.
    fn recovery_reads(&self) -> impl Future<Output = Result<RecoveryReads, StoreError>> + Send;
    /// The recovery after a restore, in one transaction (docs/udc.md,
    /// "Restoring a backup"): checks that the floor is still
    /// `write.floor_before` ([`StoreError::Conflict`] otherwise), sets the
    /// floor to `write.floor`, marks the members of `write.revoke`
    /// revoked, creates `write.new_groups`, empties every
    /// session slot, raises every gateway's downlink head and the registry
    /// version by `write.raise_by`, then applies `write.batch` (group
    /// updates, rounds closed and opened, downlink records; those go to
    /// gateway queues above the raised heads and the new floor). A counter
    /// that would pass `u64::MAX` fails it with
    /// [`StoreError::CounterExhausted`]; any failure writes nothing.
    fn recover(
        &self,
        write: RecoveryWrite,
    ) -> impl Future<Output = Result<RecoveryApplied, StoreError>> + Send;
    /// The number of (member, group) pairs holding at least one session
    /// (`dapgw_udc_sessions_active` at start).
    fn count_sessions(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Appends downlink records (a [`BatchWrite`] with only `downlink`).
    fn push_downlink(
        &self,
        now_ms: u64,
        pushes: Vec<DownlinkPush>,
    ) -> impl Future<Output = Result<Applied, StoreError>> + Send {
        self.apply_batch(BatchWrite {
            now_ms,
            downlink: pushes,
            ..BatchWrite::default()
        })
    }
    /// Up to `limit` records of the gateway's queue with cursor > `after`,
    /// in cursor order, cut after [`DOWNLINK_PAGE_BYTES`] of messages.
    fn read_downlink(
        &self,
        gateway: &str,
        after: u64,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<StoredRecord>, StoreError>> + Send;
    /// The last cursor handed out in the gateway's queue (0 if none).
    fn latest_cursor(&self, gateway: &str) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// Deletes records created before `before_ms`; returns how many.
    fn trim_downlink(&self, before_ms: u64)
    -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// Deletes readings accepted before `before_ms` (retention); returns
    /// how many.
    fn trim_readings(&self, before_ms: u64)
    -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// Deletes final verdicts filed before `before_ms` (retention; pending
    /// ones expire through their localization); returns how many. A batch
    /// retried after that is judged again, against the state of then.
    fn trim_verdicts(&self, before_ms: u64)
    -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// Replaces the gateway's group subscriptions and, in the same
    /// transaction, queues to that gateway the challenge of every open
    /// round (not past its close time) of each group newly added, in round
    /// order: a round opened before the subscription fanned its challenge
    /// out to the subscribers of then. Returns how many challenges it
    /// queued.
    fn set_subscriptions(
        &self,
        gateway: &str,
        groups: Vec<u32>,
        now_ms: u64,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// The gateway's subscriptions, sorted.
    fn subscriptions(
        &self,
        gateway: &str,
    ) -> impl Future<Output = Result<Vec<u32>, StoreError>> + Send;

    /// One group message.
    fn group_message(
        &self,
        group: u32,
        seq: u64,
    ) -> impl Future<Output = Result<Option<GroupMessageRow>, StoreError>> + Send;
    /// Acks of one group message, by member: up to `limit` after member
    /// `after` (from the first without), and the count of all of them.
    fn acks(
        &self,
        group: u32,
        seq: u64,
        after: Option<u64>,
        limit: u32,
    ) -> impl Future<Output = Result<AckPage, StoreError>> + Send;

    /// Adds a schedule; returns its id.
    fn insert_schedule(
        &self,
        row: ScheduleRow,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// Every schedule, by id.
    fn schedules(&self) -> impl Future<Output = Result<Vec<ScheduleRow>, StoreError>> + Send;
    /// Moves a schedule from `expected_next_ms` to `next_ms`; false if
    /// another process claimed it first (or it is gone).
    fn claim_schedule(
        &self,
        id: u64,
        expected_next_ms: u64,
        next_ms: u64,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Deletes a schedule; false if unknown.
    fn delete_schedule(&self, id: u64) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Up to `limit` readings of a member with `from_ms <= ts_ms < to_ms`,
    /// by time: [`Store::readings_after`] with no start key.
    fn readings(
        &self,
        member: u64,
        from_ms: u64,
        to_ms: u64,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<ReadingRow>, StoreError>> + Send {
        self.readings_after(member, from_ms, to_ms, None, limit)
    }
    /// Up to `limit` readings of a member with `from_ms <= ts_ms < to_ms`
    /// whose [`ReadingKey`] comes after `after` (all of them when `None`),
    /// in key order: (ts_ms, group, sid, ctr), each compared in its stored
    /// (bit-cast signed) form. Paging with the last key of each page
    /// returns every reading of the range exactly once.
    fn readings_after(
        &self,
        member: u64,
        from_ms: u64,
        to_ms: u64,
        after: Option<ReadingKey>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<ReadingRow>, StoreError>> + Send;
    /// Per-gateway counters, by gateway.
    fn gateways(&self) -> impl Future<Output = Result<Vec<GatewayRow>, StoreError>> + Send;
}

/// The configured backend.
#[derive(Debug)]
pub enum AnyStore {
    /// Embedded SQLite.
    Sqlite(SqliteStore),
    /// Shared PostgreSQL (boxed: it is much larger than the SQLite handle).
    Postgres(Box<PostgresStore>),
}

/// What a store URL names.
#[derive(Clone, PartialEq, Eq)]
enum StoreUrl {
    /// A SQLite file path.
    Sqlite(std::path::PathBuf),
    /// A PostgreSQL connection string (passed to tokio-postgres).
    Postgres(String),
}

impl fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite(p) => write!(f, "Sqlite({})", p.display()),
            Self::Postgres(_) => f.write_str("Postgres(<redacted>)"),
        }
    }
}

/// Parses `sqlite:///abs/path.db`, `sqlite://relative.db` or
/// `postgres[ql]://...`.
fn parse_url(url: &str) -> Result<StoreUrl, StoreError> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(StoreError::Url(
            "expected sqlite:///path/to/udc.db or postgres://user@host:port/db",
        ));
    };
    match scheme {
        "sqlite" => {
            // `sqlite:///abs` keeps its leading slash; `sqlite://rel.db` is relative.
            if rest.is_empty() || rest.ends_with('/') {
                return Err(StoreError::Url("sqlite url names no database file"));
            }
            Ok(StoreUrl::Sqlite(std::path::PathBuf::from(rest)))
        }
        "postgres" | "postgresql" => {
            if url.parse::<tokio_postgres::Config>().is_err() {
                return Err(StoreError::Url(
                    "malformed postgres url; expected postgres://user[:password]@host[:port]/db",
                ));
            }
            Ok(StoreUrl::Postgres(url.to_owned()))
        }
        _ => Err(StoreError::Url(
            "unsupported scheme; use sqlite:// or postgres://",
        )),
    }
}

/// Opens (creating and migrating as needed) the store a URL names.
pub async fn open(url: &str) -> Result<AnyStore, StoreError> {
    match parse_url(url)? {
        StoreUrl::Sqlite(path) => Ok(AnyStore::Sqlite(SqliteStore::open(&path).await?)),
        StoreUrl::Postgres(conn) => Ok(AnyStore::Postgres(Box::new(
            PostgresStore::connect(&conn).await?,
        ))),
    }
}

/// Implements [`Store`] for [`AnyStore`] by forwarding to the backend.
macro_rules! forward {
    ($( fn $name:ident(&self $(, $arg:ident : $ty:ty)*) -> $ret:ty; )*) => {
        $(
            fn $name(&self $(, $arg: $ty)*) -> impl Future<Output = Result<$ret, StoreError>> + Send {
                async move {
                    match self {
                        AnyStore::Sqlite(s) => s.$name($($arg),*).await,
                        AnyStore::Postgres(s) => s.$name($($arg),*).await,
                    }
                }
            }
        )*
    };
}

impl Store for AnyStore {
    forward! {
        fn members(&self, ids: Vec<u64>) -> Vec<Option<MemberRow>>;
        fn list_members(&self, after: Option<u64>, limit: u32) -> Vec<MemberRow>;
        fn group_members(&self, group: u32, after: Option<u64>, limit: u32) -> Vec<u64>;
        fn set_member_status(&self, id: u64, status: MemberStatus) -> bool;
        fn set_kv(&self, id: u64, kv: u32, key_source: KeySource) -> bool;
        fn insert_group(&self, row: GroupRow) -> ();
        fn group(&self, group: u32) -> Option<GroupRow>;
        fn list_groups(&self) -> Vec<GroupRow>;
        fn round(&self, group: u32, round: u64) -> Option<RoundRow>;
        fn open_rounds(&self) -> Vec<RoundRow>;
        fn round_report(&self, group: u32, round: u64) -> Option<RoundReport>;
        fn round_outcomes(&self, group: u32, round: u64, after: Option<u64>, limit: u32) -> Vec<OutcomeRow>;
        fn round_missing(&self, group: u32, round: u64, after: Option<u64>, limit: u32) -> Vec<u64>;
        fn verdict(&self, gateway: &str, batch_id: u64) -> Option<StoredVerdict>;
        fn pending_localization(&self, gateway: &str, batch_id: u64) -> Option<PendingLocalization>;
        fn expired_localizations(&self, now_ms: u64, limit: u32) -> Vec<PendingLocalization>;
        fn due_work(&self, now_ms: u64) -> DueWork;
        fn apply_batch(&self, write: BatchWrite) -> Applied;
        fn sessions(&self, keys: Vec<(u64, u32)>) -> Vec<Option<StoredSlot>>;
        fn batch_reads(&self, group: u32, ids: Vec<u64>, round: Option<u64>, fetch: Option<MemberFetch>) -> BatchReads;
        fn registry_version(&self) -> u64;
        fn member_sessions(&self, first: u64, last: u64) -> Vec<StoredSlot>;
        fn drop_all_sessions(&self) -> u64;
        fn recovery_state(&self) -> RecoveryState;
        fn recovery_reads(&self) -> RecoveryReads;
        fn recover(&self, write: RecoveryWrite) -> RecoveryApplied;
        fn count_sessions(&self) -> u64;
        fn read_downlink(&self, gateway: &str, after: u64, limit: u32) -> Vec<StoredRecord>;
        fn latest_cursor(&self, gateway: &str) -> u64;
        fn trim_downlink(&self, before_ms: u64) -> u64;
        fn trim_readings(&self, before_ms: u64) -> u64;
        fn trim_verdicts(&self, before_ms: u64) -> u64;
        fn set_subscriptions(&self, gateway: &str, groups: Vec<u32>, now_ms: u64) -> u64;
        fn subscriptions(&self, gateway: &str) -> Vec<u32>;
        fn group_message(&self, group: u32, seq: u64) -> Option<GroupMessageRow>;
        fn acks(&self, group: u32, seq: u64, after: Option<u64>, limit: u32) -> AckPage;
        fn insert_schedule(&self, row: ScheduleRow) -> u64;
        fn schedules(&self) -> Vec<ScheduleRow>;
        fn claim_schedule(&self, id: u64, expected_next_ms: u64, next_ms: u64) -> bool;
        fn delete_schedule(&self, id: u64) -> bool;
        fn readings_after(&self, member: u64, from_ms: u64, to_ms: u64, after: Option<ReadingKey>, limit: u32) -> Vec<ReadingRow>;
        fn gateways(&self) -> Vec<GatewayRow>;
    }
}

// ---------------------------------------------------------------------------
// Column codecs shared by both backends
// ---------------------------------------------------------------------------

/// `u64` to its stored (bit-cast) form.
#[inline]
fn i(v: u64) -> i64 {
    v as i64
}

/// A time bound (unix ms) to its stored form, saturating at `i64::MAX`:
/// bit-casting `u64::MAX` ("no upper bound") would make it -1.
#[inline]
fn ts(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Stored form back to `u64`.
#[inline]
fn u(v: i64) -> u64 {
    v as u64
}

/// A stored u32 column back to `u32`.
fn u32_col(v: i64, what: &'static str) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt(what))
}

/// A stored 32-byte hash.
fn hash_col(v: Vec<u8>, what: &'static str) -> Result<[u8; 32], StoreError> {
    <[u8; 32]>::try_from(v).map_err(|_| StoreError::Corrupt(what))
}

/// A stored 8-byte session id.
fn sid_col(v: Vec<u8>) -> Result<[u8; 8], StoreError> {
    <[u8; 8]>::try_from(v).map_err(|_| StoreError::Corrupt("session id length"))
}

fn mode_code(m: Mode) -> i64 {
    i64::from(m.code())
}

fn mode_col(v: i64) -> Result<Mode, StoreError> {
    u8::try_from(v)
        .ok()
        .and_then(Mode::from_code)
        .ok_or(StoreError::Corrupt("round mode"))
}

fn purpose_code(p: RoundPurpose) -> i64 {
    match p {
        RoundPurpose::Auth => 0,
        RoundPurpose::Read => 1,
    }
}

fn purpose_col(v: i64) -> Result<RoundPurpose, StoreError> {
    match v {
        0 => Ok(RoundPurpose::Auth),
        1 => Ok(RoundPurpose::Read),
        _ => Err(StoreError::Corrupt("round purpose")),
    }
}

fn round_status_code(s: RoundStatus) -> i64 {
    match s {
        RoundStatus::Open => 0,
        RoundStatus::Closed => 1,
    }
}

fn round_status_col(v: i64) -> Result<RoundStatus, StoreError> {
    match v {
        0 => Ok(RoundStatus::Open),
        1 => Ok(RoundStatus::Closed),
        _ => Err(StoreError::Corrupt("round status")),
    }
}

fn member_status_code(s: MemberStatus) -> i64 {
    match s {
        MemberStatus::Active => 0,
        MemberStatus::Revoked => 1,
    }
}

fn member_status_col(v: i64) -> Result<MemberStatus, StoreError> {
    match v {
        0 => Ok(MemberStatus::Active),
        1 => Ok(MemberStatus::Revoked),
        _ => Err(StoreError::Corrupt("member status")),
    }
}

/// (key_source code, sealed imported key) for a [`KeySource`].
fn key_source_cols(k: &KeySource) -> (i64, Option<&[u8]>) {
    match k {
        KeySource::Derived => (0, None),
        KeySource::Imported(s) => (1, Some(s.as_bytes())),
    }
}

fn key_source_col(code: i64, key: Option<Vec<u8>>) -> Result<KeySource, StoreError> {
    match (code, key) {
        (0, _) => Ok(KeySource::Derived),
        (1, Some(k)) => Ok(KeySource::Imported(Sealed::new(k))),
        _ => Err(StoreError::Corrupt("member key source")),
    }
}

fn outcome_code(k: OutcomeKind) -> i64 {
    match k {
        OutcomeKind::Accepted => 0,
        OutcomeKind::Rejected => 1,
        OutcomeKind::Unverified => 2,
    }
}

fn outcome_col(v: i64) -> Result<OutcomeKind, StoreError> {
    match v {
        0 => Ok(OutcomeKind::Accepted),
        1 => Ok(OutcomeKind::Rejected),
        2 => Ok(OutcomeKind::Unverified),
        _ => Err(StoreError::Corrupt("outcome kind")),
    }
}

/// (audience code as on the wire, member or 0).
fn audience_cols(a: Audience) -> (i64, i64) {
    match a {
        Audience::Group => (1, 0),
        Audience::Member(m) => (2, i(m)),
    }
}

fn audience_col(code: i64, member: i64) -> Result<Audience, StoreError> {
    match code {
        1 => Ok(Audience::Group),
        2 => Ok(Audience::Member(u(member))),
        _ => Err(StoreError::Corrupt("downlink audience")),
    }
}

/// The `message` column of a downlink row holding `recs.len() > 1` records
/// (migration 3): each framed as `audience u8 | group u32 | member u64 |
/// length u32 | message`, big-endian, one after the other.
fn bundle(recs: &[&DownlinkRecord]) -> Vec<u8> {
    let len: usize = recs.iter().map(|r| 17 + r.message.len()).sum();
    let mut out = Vec::with_capacity(len);
    for r in recs {
        let (aud, member) = audience_cols(r.audience);
        out.push(aud as u8);
        out.extend_from_slice(&r.group.to_be_bytes());
        out.extend_from_slice(&u(member).to_be_bytes());
        out.extend_from_slice(&(r.message.len() as u32).to_be_bytes());
        out.extend_from_slice(&r.message);
    }
    out
}

/// One stored downlink row: `n` records whose last cursor is `last`.
struct DownlinkRow {
    last: u64,
    n: i64,
    audience: i64,
    group: i64,
    member: i64,
    message: Vec<u8>,
}

/// One downlink read being filled: at most `limit` records, and none added
/// once [`DOWNLINK_PAGE_BYTES`] of messages are in.
struct DownlinkPage {
    limit: usize,
    bytes: usize,
    records: Vec<StoredRecord>,
}

impl DownlinkPage {
    fn new(limit: u32) -> Self {
        Self {
            limit: limit as usize,
            bytes: 0,
            records: Vec::new(),
        }
    }

    /// Whether no further record may be added.
    fn full(&self) -> bool {
        self.records.len() >= self.limit || self.bytes >= DOWNLINK_PAGE_BYTES
    }

    fn push(&mut self, record: StoredRecord) {
        self.bytes = self.bytes.saturating_add(record.record.message.len());
        self.records.push(record);
    }
}

impl DownlinkRow {
    /// Appends the row's records with a cursor above `after` to `page`
    /// until it is full. A bundle that does not parse (or whose record
    /// count is not `n`) is [`StoreError::Corrupt`].
    fn unbundle(self, after: u64, page: &mut DownlinkPage) -> Result<(), StoreError> {
        let n = u64::try_from(self.n)
            .ok()
            .filter(|n| *n >= 1 && *n <= self.last.saturating_add(1))
            .ok_or(StoreError::Corrupt("downlink record count"))?;
        if n == 1 {
            if self.last > after && !page.full() {
                page.push(StoredRecord {
                    cursor: self.last,
                    record: DownlinkRecord {
                        audience: audience_col(self.audience, self.member)?,
                        group: u32_col(self.group, "downlink group")?,
                        message: self.message,
                    },
                });
            }
            return Ok(());
        }
        let corrupt = || StoreError::Corrupt("downlink bundle");
        // The first record's cursor (n <= last + 1 was checked).
        let first = self.last - (n - 1);
        let mut b = &self.message[..];
        let mut k = 0u64;
        while !b.is_empty() {
            let (head, rest) = b.split_at_checked(17).ok_or_else(corrupt)?;
            let len = u32::from_be_bytes([head[13], head[14], head[15], head[16]]) as usize;
            let (msg, rest) = rest.split_at_checked(len).ok_or_else(corrupt)?;
            if k >= n {
                return Err(corrupt());
            }
            let cursor = first + k;
            if cursor > after && !page.full() {
                let mut member = [0u8; 8];
                member.copy_from_slice(&head[5..13]);
                page.push(StoredRecord {
                    cursor,
                    record: DownlinkRecord {
                        audience: audience_col(i64::from(head[0]), i(u64::from_be_bytes(member)))?,
                        group: u32::from_be_bytes([head[1], head[2], head[3], head[4]]),
                        message: msg.to_vec(),
                    },
                });
            }
            k += 1;
            b = rest;
        }
        if k != n {
            return Err(corrupt());
        }
        Ok(())
    }
}

/// Sorts and dedups a member's group list before it is stored.
fn normalized_groups(groups: &[u32]) -> Vec<u32> {
    let mut g = groups.to_vec();
    g.sort_unstable();
    g.dedup();
    g
}

/// The `outcomes` blob of a `round_results` row (migration 4): per entry
/// `member u64 | kind u8 | reason length u8 | reason`, big-endian, in
/// order. A reason longer than 255 bytes is cut (reasons are short codes).
fn encode_outcomes(rows: &[&OutcomeRow]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows.len() * 10);
    for o in rows {
        let mut n = o.reason.len().min(255);
        while !o.reason.is_char_boundary(n) {
            n -= 1;
        }
        out.extend_from_slice(&o.member.to_be_bytes());
        out.push(outcome_code(o.kind) as u8);
        out.push(n as u8);
        out.extend_from_slice(&o.reason.as_bytes()[..n]);
    }
    out
}

/// The outcome rows of one write, one entry per (group, round) with its
/// rows in write order.
fn outcomes_by_round(rows: &[OutcomeRow]) -> BTreeMap<(u32, u64), Vec<&OutcomeRow>> {
    let mut by: BTreeMap<(u32, u64), Vec<&OutcomeRow>> = BTreeMap::new();
    for o in rows {
        by.entry((o.group, o.round)).or_default().push(o);
    }
    by
}

/// Decodes an [`encode_outcomes`] blob of `n` entries stored for (group,
/// round) through `gateway`, appending to `out`.
fn decode_outcomes(
    group: u32,
    round: u64,
    gateway: Option<&str>,
    n: i64,
    blob: &[u8],
    out: &mut Vec<OutcomeRow>,
) -> Result<(), StoreError> {
    let corrupt = || StoreError::Corrupt("round results");
    let mut b = blob;
    let mut k = 0i64;
    while !b.is_empty() {
        let (head, rest) = b.split_at_checked(10).ok_or_else(corrupt)?;
        let (reason, rest) = rest
            .split_at_checked(usize::from(head[9]))
            .ok_or_else(corrupt)?;
        let mut member = [0u8; 8];
        member.copy_from_slice(&head[..8]);
        let reason = std::str::from_utf8(reason).map_err(|_| corrupt())?;
        out.push(OutcomeRow {
            group,
            round,
            member: u64::from_be_bytes(member),
            kind: outcome_col(i64::from(head[8]))?,
            reason: if reason.is_empty() {
                Cow::Borrowed("")
            } else {
                Cow::Owned(reason.to_owned())
            },
            gateway: gateway.map(str::to_owned),
        });
        k += 1;
        b = rest;
    }
    if k != n {
        return Err(corrupt());
    }
    Ok(())
}

/// A round's outcomes folded per member, keyed by the stored (signed)
/// member order the listings use: an accepted outcome sticks, otherwise
/// the later one (in `rows` order) replaces the earlier.
fn fold_outcomes(rows: Vec<OutcomeRow>) -> BTreeMap<i64, OutcomeRow> {
    let mut folded: BTreeMap<i64, OutcomeRow> = BTreeMap::new();
    for o in rows {
        match folded.entry(i(o.member)) {
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(o);
            }
            std::collections::btree_map::Entry::Occupied(mut e) => {
                if e.get().kind != OutcomeKind::Accepted {
                    e.insert(o);
                }
            }
        }
    }
    folded
}

/// Assembles a [`RoundReport`] from a round's folded outcomes and the
/// group's active members.
fn report(
    round: RoundRow,
    folded: &BTreeMap<i64, OutcomeRow>,
    active: &[u64],
    localizations: u64,
) -> RoundReport {
    let mut r = RoundReport {
        round,
        accepted: 0,
        rejected: Vec::new(),
        unverified: 0,
        missing: active
            .iter()
            .filter(|m| !folded.contains_key(&i(**m)))
            .count() as u64,
        localizations,
    };
    let mut rejected: BTreeMap<&str, u64> = BTreeMap::new();
    for o in folded.values() {
        match o.kind {
            OutcomeKind::Accepted => r.accepted += 1,
            OutcomeKind::Unverified => r.unverified += 1,
            OutcomeKind::Rejected => *rejected.entry(o.reason.as_ref()).or_default() += 1,
        }
    }
    r.rejected = rejected
        .into_iter()
        .map(|(k, n)| (k.to_owned(), n))
        .collect();
    r
}

/// Up to `limit` folded outcomes after member `after` (signed order).
fn outcomes_page(
    mut folded: BTreeMap<i64, OutcomeRow>,
    after: Option<u64>,
    limit: u32,
) -> Vec<OutcomeRow> {
    if let Some(a) = after {
        folded = folded.split_off(&i(a));
        folded.remove(&i(a));
    }
    folded.into_values().take(limit as usize).collect()
}

/// Up to `limit` of `active` (ascending, after `after` already) without an
/// outcome.
fn missing_page(folded: &BTreeMap<i64, OutcomeRow>, active: Vec<u64>, limit: u32) -> Vec<u64> {
    active
        .into_iter()
        .filter(|m| !folded.contains_key(&i(*m)))
        .take(limit as usize)
        .collect()
}

/// The sid column of a stored slot (NULL = empty slot).
fn opt_sid_col(v: Option<Vec<u8>>) -> Result<Option<[u8; 8]>, StoreError> {
    v.map(sid_col).transpose()
}

/// A slot's [`SlotUse`] from its three nullable columns (`sid`, `top`,
/// `seen`; all null: none applies).
fn slot_use_cols(
    sid: Option<Vec<u8>>,
    top: Option<i64>,
    seen: Option<i64>,
) -> Result<Option<SlotUse>, StoreError> {
    match (sid, top, seen) {
        (None, None, None) => Ok(None),
        (Some(sid), Some(top), Some(seen)) => Ok(Some(SlotUse {
            sid: sid_col(sid)?,
            top: u(top),
            seen: u(seen),
        })),
        _ => Err(StoreError::Corrupt("session use")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lock another connection holds past the busy timeout is
    /// [`StoreError::Locked`] (503 `busy`, retried), not an internal error.
    #[test]
    fn sqlite_lock_held_elsewhere_is_locked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("locked.db");
        let holder = rusqlite::Connection::open(&path).unwrap();
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        let other = rusqlite::Connection::open(&path).unwrap();
        other.busy_timeout(std::time::Duration::ZERO).unwrap();
        let e = StoreError::from(other.execute_batch("BEGIN IMMEDIATE").unwrap_err());
        assert!(matches!(e, StoreError::Locked(_)), "{e:?}");
        let e = StoreError::from(other.execute_batch("NOT SQL").unwrap_err());
        assert!(matches!(e, StoreError::Sqlite(_)), "{e:?}");
    }

    #[test]
    fn url_schemes() {
        assert_eq!(
            parse_url("sqlite:///var/lib/dapgw/udc.db").unwrap(),
            StoreUrl::Sqlite("/var/lib/dapgw/udc.db".into())
        );
        assert_eq!(
            parse_url("sqlite://udc.db").unwrap(),
            StoreUrl::Sqlite("udc.db".into())
        );
        assert!(matches!(
            parse_url("postgres://dapgw:pw@127.0.0.1:5432/udc").unwrap(),
            StoreUrl::Postgres(_)
        ));
        for bad in ["sqlite://", "sqlite:///var/", "mysql://x", "udc.db", ""] {
            assert!(matches!(parse_url(bad), Err(StoreError::Url(_))), "{bad}");
        }
    }

    #[test]
    fn url_errors_and_debug_never_echo_a_password() {
        let err = parse_url("postgres://u:hunter2@host:notaport/db").unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let err = parse_url("mysql://u:hunter2@host/db").unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let ok = parse_url("postgres://u:hunter2@host:5432/db").unwrap();
        assert!(!format!("{ok:?}").contains("hunter2"));
    }

    #[test]
    fn sealed_debug_shows_length_only() {
        let s = Sealed::new(vec![0xAB; 5]);
        assert_eq!(format!("{s:?}"), "Sealed(<5 bytes>)");
    }

    #[test]
    fn accepted_rounds_window() {
        let none = AcceptedRounds::default();
        assert!(!none.contains(0) && !none.contains(1));
        let w = none.with(5).unwrap().with(7).unwrap().with(6).unwrap();
        assert_eq!(
            w,
            AcceptedRounds {
                top: 7,
                seen: 0b111
            }
        );
        assert!(w.contains(5) && w.contains(6) && w.contains(7) && !w.contains(8));
        assert_eq!(w.with(6), None, "accepted twice in one round");
        assert!(!w.contains(4), "not accepted in round 4");
        // 64 or more rounds behind the newest: refused, never accepted.
        let far = w.with(7 + 70).unwrap();
        assert_eq!(far, AcceptedRounds { top: 77, seen: 1 });
        assert!(far.contains(13) && far.contains(7) && !far.contains(14));
        assert_eq!(far.with(13), None);
        assert!(far.with(14).unwrap().contains(14));
        // Near the top of the range.
        let top = none.with(u64::MAX).unwrap();
        assert!(top.contains(u64::MAX) && !top.contains(u64::MAX - 1));
        let row = SessionRow {
            member: 1,
            group: 7,
            sid: None,
            state: Sealed::default(),
            round: 0,
            authenticated_at_ms: None,
            version: 1,
            rounds: w,
            accepted_in: Some(7),
            use_read: None,
        };
        assert!(matches!(
            AcceptedRounds::after_write(&row),
            Err(StoreError::Conflict("round outcome"))
        ));
        let ok = SessionRow {
            accepted_in: Some(8),
            ..row.clone()
        };
        assert_eq!(
            AcceptedRounds::after_write(&ok).unwrap(),
            AcceptedRounds {
                top: 8,
                seen: 0b1111
            }
        );
        let keep = SessionRow {
            accepted_in: None,
            ..row
        };
        assert_eq!(AcceptedRounds::after_write(&keep).unwrap(), w);
    }

    #[test]
    fn u64_mapping_round_trips() {
        for v in [0, 1, u64::MAX, 1 << 63, (1 << 63) - 1] {
            assert_eq!(u(i(v)), v);
        }
    }
}
