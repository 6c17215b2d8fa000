//! The UDC's glue between the HTTP server, the sans-IO verifier and the
//! store.
//!
//! ```text
//! server --bytes--> Udc::handle_batch --load--> Store --state values--> Verifier
//!                         |<-------------------- output -------------------|
//!                         '--seal + ONE apply_batch transaction--> Store --> answer
//! ```
//!
//! The store is the truth: every call loads the state it needs, the
//! verifier decides, and everything the decision changed (verdict, group,
//! round, sessions, readings, acks, outcomes, counters, downlink) goes into
//! one [`BatchWrite`] applied before the answer leaves. Secret-bearing state
//! is sealed with the [`StorageKey`] under the row's identity as AAD.
//! Mutations are serialized by one lock per process; several processes on
//! one PostgreSQL store rely on the store's verdict key, compare-and-set,
//! and the store's check that a member is accepted once per round (a
//! process's cache of a round's accepted set may be stale; a write it
//! misjudged fails as a whole and the retry reloads the set).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{Mutex, Notify};

use crate::protocol::keys::{STORAGE_OVERHEAD, StorageKey};
use crate::protocol::verifier::{
    BatchEvent, BatchState, GroupState, LogKey, LoggedVerdict, MemberRecord, PendingAssessment,
    ReceivedBatch, Registry, ReplayWindow, RoundState, SessionSlot, SessionTable, VerdictLog,
    Verifier, VerifierError,
};
use crate::protocol::wire::{
    BatchBody, Confirm, Direct, DirectInner, GroupId, MemberId, Mode, Outcome, Purpose, SessionId,
    TagReply, Verdict, VerdictBody,
};
use crate::telemetry::{EntryKind, ModeLabel, StoreOp, UdcBatchOutcome, UdcCache, UdcMetrics};
use crate::udc::store::{
    self, AnyStore, Audience, BatchSlot, BatchWrite, DownlinkPush, DownlinkRecord, DownlinkTarget,
    GroupRow, OutcomeKind, OutcomeRow, PendingWrite, ReadingRow, RoundRow, RoundStatus, Sealed,
    SessionRow, SlotUse, Store, StoreError, UseWrite, VerdictWrite, Via,
};

mod recovery;

pub use recovery::{OpenedRound, RecoverError, Recovery};

/// Why a request was refused; the server maps each kind to a status code.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The body is not a well-formed message of the expected type (400).
    #[error("{0}")]
    BadRequest(String),
    /// The batch's gateway id is not the client certificate's (403).
    #[error("batch gateway id {batch:?} is not the client certificate's {cert:?}")]
    WrongGateway {
        /// From the batch.
        batch: String,
        /// From the certificate.
        cert: String,
    },
    /// The batch id was used for different content, or a tag reply names
    /// another batch hash (409).
    #[error("{0}")]
    Conflict(String),
    /// Nothing pending for this (gateway, batch id) (404).
    #[error("{0}")]
    NotFound(String),
    /// Another UDC process sharing the store changed a row this request
    /// read (a session slot, a group, a round) between the read and the
    /// write; nothing was written. Retry the request (503 with
    /// `Retry-After`).
    #[error("{0}")]
    Busy(String),
    /// A store or sealing failure (500; details are logged, not sent).
    #[error("internal error")]
    Internal(String),
}

/// What [`Udc::update_member_key`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyUpdateOutcome {
    /// The key update was stored and queued to the member's gateways.
    Issued {
        /// The key version the member moves to.
        kv: u32,
        /// The oldest version still accepted until the member answers under
        /// `kv`.
        min_kv: u32,
        /// The groups in whose psk-ecdhe sessions it was sent.
        groups: Vec<u32>,
    },
    /// No member has this id.
    UnknownMember,
    /// The member is revoked.
    Revoked,
    /// The caller expected another key version than the stored `kv`
    /// (nothing issued): a key update it repeats went through already.
    KvChanged {
        /// The stored key version.
        kv: u32,
    },
    /// No group's newest session of the member is psk-ecdhe with downlink
    /// counters left; a key update in a psk session could be read by
    /// whoever holds the old key. A psk-ecdhe round opens a fresh one.
    NeedsEcdhe,
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(what) => Self::Busy(format!(
                "another UDC process changed the {what} concurrently; retry"
            )),
            StoreError::Locked(e) => {
                // Answered 503 and retried, but an operator needs to know
                // what holds the lock (a shell, a backup tool).
                tracing::warn!(error = %e, "store locked past the busy timeout");
                Self::Busy("the store stayed locked past the busy timeout; retry".into())
            }
            e => Self::Internal(format!("store: {e}")),
        }
    }
}

/// The row identities used as sealing AAD: a table name, then fixed-width
/// fields (and length-prefixed strings), so no two identities coincide.
mod aad {
    pub(super) fn group(g: u32) -> Vec<u8> {
        let mut v = b"groups\0".to_vec();
        v.extend_from_slice(&g.to_be_bytes());
        v
    }
    pub(super) fn round(g: u32, r: u64) -> Vec<u8> {
        let mut v = b"rounds\0".to_vec();
        v.extend_from_slice(&g.to_be_bytes());
        v.extend_from_slice(&r.to_be_bytes());
        v
    }
    /// On the stack: built twice per member of a batch.
    pub(super) fn session(m: u64, g: u32) -> [u8; 21] {
        let mut v = [0u8; 21];
        v[..9].copy_from_slice(b"sessions\0");
        v[9..17].copy_from_slice(&m.to_be_bytes());
        v[17..].copy_from_slice(&g.to_be_bytes());
        v
    }
    pub(super) fn pending(gw: &str, batch_id: u64) -> Vec<u8> {
        let mut v = b"pending\0".to_vec();
        v.push(gw.len() as u8);
        v.extend_from_slice(gw.as_bytes());
        v.extend_from_slice(&batch_id.to_be_bytes());
        v
    }
}

/// The in-memory view of the members a batch names, for the verifier.
struct LoadedRegistry(BTreeMap<MemberId, MemberRecord>);

impl Registry for LoadedRegistry {
    fn member(&self, id: MemberId) -> Option<MemberRecord> {
        self.0.get(&id).cloned()
    }
}

/// Member records this process has read, all valid at registry version
/// `version` (docs/udc.md, "Registry cache"). Every change to the registry
/// raises the store's version in the same transaction, whichever process
/// makes it, so a batch read that finds another version drops the copy and
/// reads every member of the batch again. Unknown ids are not kept.
#[derive(Default)]
struct RegistryCache {
    version: Option<u64>,
    records: FastMap<MemberId, MemberRecord>,
}

/// Most member records a [`RegistryCache`] keeps; beyond, it starts over.
const REGISTRY_CACHE_MAX: usize = 1 << 20;

impl RegistryCache {
    /// What a batch naming `ids` must still read, if the copy has a version.
    fn fetch(&self, ids: &[MemberId]) -> Option<store::MemberFetch> {
        let version = self.version?;
        let missing = ids
            .iter()
            .filter(|id| !self.records.contains_key(id))
            .map(|id| id.0)
            .collect();
        Some(store::MemberFetch { version, missing })
    }
}

/// What was read of each loaded session slot of one group: its version
/// and accepted rounds (the compare-and-set of the write) and whether it
/// held a session (for `dapgw_udc_sessions_active`). A member without a
/// stored row is absent (version 0, no accepted round, no session).
#[derive(Default)]
struct SlotVersions(FastMap<MemberId, SlotRead>);

impl SlotVersions {
    /// Room for `n` slots (a batch's members), so a batch's reads do not
    /// grow the map by doubling.
    fn with_capacity(n: usize) -> Self {
        Self(FastMap::with_capacity_and_hasher(n, Default::default()))
    }
}

/// What [`SlotVersions`] keeps of one slot.
#[derive(Clone, Copy, Default)]
struct SlotRead {
    version: u64,
    rounds: store::AcceptedRounds,
    active: bool,
    /// The use applied on top of the sealed state ([`SlotUse`]).
    used: Option<SlotUse>,
    /// The mark of the sealed state read, to cache the slot under when the
    /// write stores only a use (the sealed state stays as read).
    mark: Option<SealMark>,
}

/// Most slots [`SlotCache`] holds (about half a kilobyte each); past it,
/// the cache starts again empty.
const SLOT_CACHE_MAX: usize = 1 << 17;

/// Session slots this process sealed and wrote, opened, by (member,
/// group), each with the [`SealMark`] of the bytes it wrote (docs/udc.md,
/// "Slot cache").
///
/// A batch read whose stored bytes carry the same mark takes the slot from
/// here instead of opening it: the stored row is then this process's own
/// last write (any other write, by any process, seals with a fresh random
/// nonce). A lookup removes the entry, hit or miss, and only a committed
/// write puts slots back, so a batch that fails leaves nothing stale. A slot
/// whose write stored only a use ([`SlotUse`]) is kept under the mark of
/// its unchanged sealed state and that use, with the use applied: a hit
/// needs both to match what the store holds.
#[derive(Default)]
struct SlotCache(FastMap<(u64, u32), CachedSlot>);

/// One [`SlotCache`] entry: the sealing, the use applied over it, the slot.
type CachedSlot = (SealMark, Option<SlotUse>, Box<SessionSlot>);

/// What identifies one sealing of a slot: its length, its nonce and its
/// tag.
#[derive(Clone, Copy, PartialEq, Eq)]
struct SealMark {
    len: usize,
    ends: [u8; STORAGE_OVERHEAD],
}

impl SealMark {
    /// The mark of a sealed row (`nonce [12] | ciphertext | tag [16]`).
    fn of(sealed: &[u8]) -> Option<Self> {
        const NONCE: usize = 12;
        let len = sealed.len();
        if len < STORAGE_OVERHEAD {
            return None;
        }
        let mut ends = [0u8; STORAGE_OVERHEAD];
        ends[..NONCE].copy_from_slice(&sealed[..NONCE]);
        ends[NONCE..].copy_from_slice(&sealed[len - (STORAGE_OVERHEAD - NONCE)..]);
        Some(Self { len, ends })
    }
}

/// Session slots to write for one group, with the change of
/// `dapgw_udc_sessions_active` they make once applied.
struct SlotWrites<'a> {
    group: u32,
    versions: &'a SlotVersions,
    rng: BufferedRng,
    rows: Vec<SessionRow>,
    /// Uses to store for slots not rewritten.
    uses: Vec<UseWrite>,
    /// What each slot written (sealed into `rows`, or its use into `uses`)
    /// is cached under, for [`SlotCache`].
    marks: Vec<(MemberId, SealMark, Option<SlotUse>)>,
    active_delta: i64,
}

impl<'a> SlotWrites<'a> {
    fn new(group: u32, versions: &'a SlotVersions) -> Self {
        Self {
            group,
            versions,
            rng: BufferedRng::new(),
            // At most one row per slot read (a batch's members).
            rows: Vec::with_capacity(versions.0.len()),
            uses: Vec::new(),
            marks: Vec::with_capacity(versions.0.len()),
            active_delta: 0,
        }
    }
}

/// The metric increments of one judged batch, made once its write has
/// committed.
#[derive(Default)]
struct BatchCounts {
    readings: u64,
    acks: u64,
    /// Each entry's outcome, with the mode of its round (psk for uplinks).
    outcomes: Vec<(Outcome, Mode)>,
    /// Members accepted in a psk round after missing psk-ecdhe rounds in a
    /// row, with how many they missed.
    ecdhe_missed: Vec<(MemberId, u64)>,
    /// Members accepted under a key version newer than their oldest
    /// accepted one (a key update confirmed).
    kv_confirmed: u64,
}

/// A one-record verdict log: what the store held for the key before the
/// call, and what the verifier filed during it.
#[derive(Default)]
struct OneLog {
    stored: Option<(LogKey, LoggedVerdict)>,
    filed: Option<(LogKey, LoggedVerdict)>,
}

impl VerdictLog for OneLog {
    fn get(&self, key: &LogKey) -> Option<LoggedVerdict> {
        self.stored
            .as_ref()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }
    fn put(&mut self, key: LogKey, record: LoggedVerdict) {
        self.filed = Some((key, record));
    }
}

/// What [`Udc::judge`] needs to know about the request besides the state.
struct Ctx {
    /// The gateway the request came through (`None`: direct).
    via: Option<String>,
    /// Whether the verdict is the answer to the gateway's own request: its
    /// confirms then reach the gateway in it (and in the stored copy a retry
    /// gets), so they are not queued on the gateway's downlink as well.
    answered: bool,
    /// The store key of the verdict record.
    log_gateway: String,
    log_batch_id: u64,
    /// The batch id named in the answer.
    batch_id: u64,
    group: u32,
    ids: Vec<MemberId>,
    round: Option<u64>,
    mode: Mode,
    hash: [u8; 32],
    key: LogKey,
}

/// The UDC service state shared by every connection.
pub struct Udc {
    verifier: Verifier,
    storage: StorageKey,
    store: AnyStore,
    metrics: UdcMetrics,
    registry: prometheus::Registry,
    localize_timeout_ms: u64,
    /// How long readings and final verdicts are kept.
    retention: Retention,
    /// When [`Udc::trim_history`] last ran (unix ms), so it runs hourly.
    last_trim_ms: std::sync::atomic::AtomicU64,
    /// When the gauges were last recounted from the store (unix ms).
    last_count_ms: std::sync::atomic::AtomicU64,
    /// Serializes state changes within this process.
    lock: Mutex<()>,
    /// Hot round states (their accepted sets), by (group, round).
    rounds: Mutex<BTreeMap<(u32, u64), RoundState>>,
    /// Member records read from the store, valid at one registry version.
    registry_cache: std::sync::Mutex<RegistryCache>,
    /// Opened session slots this process wrote.
    slot_cache: std::sync::Mutex<SlotCache>,
    /// Woken whenever downlink records are appended.
    /// Per gateway, what wakes its downlink long polls: a write that
    /// appended to that gateway's queue (and nothing else).
    downlink_wakers: std::sync::Mutex<std::collections::HashMap<String, Arc<Notify>>>,
    /// Test seam: awaited once just before the next judged write
    /// ([`Udc::before_next_batch_write`]).
    pre_write: Seam,
    /// Test seam: see [`Udc::before_next_rekey_write`].
    pre_rekey_write: Seam,
    /// Test seam: see [`Udc::before_next_import_write`].
    pre_import_write: Seam,
    /// Test seam: see [`Udc::before_next_round_write`].
    pre_round_write: Seam,
}

/// The hash map of the per-member caches: foldhash, for keys a gateway can
/// pick among but not mint (see [`SessionTable`]); bounded by
/// `SLOT_CACHE_MAX`, `REGISTRY_CACHE_MAX` or a batch.
type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// What [`Udc::before_next_batch_write`] runs.
type PreWrite = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// A test seam: a future set by a test, awaited once at one point of a
/// write path (between its read and its write), then gone.
#[derive(Default)]
struct Seam(std::sync::Mutex<Option<PreWrite>>);

impl Seam {
    fn set(&self, f: impl Future<Output = ()> + Send + 'static) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(Box::pin(f));
        }
    }

    /// Awaits the future set, if any (once).
    async fn run(&self) {
        let hook = self.0.lock().ok().and_then(|mut h| h.take());
        if let Some(hook) = hook {
            hook.await;
        }
    }
}

impl std::fmt::Debug for Udc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Udc")
            .field("verifier", &self.verifier)
            .field("storage", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// How long the UDC keeps history (`None`: forever).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    /// Readings and alarms (`DAPGW_READINGS_RETENTION_DAYS`).
    pub readings_ms: Option<u64>,
    /// Final batch verdicts (`DAPGW_VERDICTS_RETENTION_DAYS`).
    pub verdicts_ms: Option<u64>,
}

impl Retention {
    /// From day counts, 0 meaning forever.
    pub fn from_days(readings: u64, verdicts: u64) -> Self {
        let ms = |d: u64| (d > 0).then(|| d.saturating_mul(24 * 3600 * 1000));
        Self {
            readings_ms: ms(readings),
            verdicts_ms: ms(verdicts),
        }
    }
}

/// How often history is trimmed.
const TRIM_EVERY_MS: u64 = 3600 * 1000;

/// What one [`Udc::trim_history`] deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Trimmed {
    /// Downlink records past [`crate::udc::rounds::DOWNLINK_RETENTION_MS`].
    pub downlink: u64,
    /// Readings past their retention.
    pub readings: u64,
    /// Final verdicts past their retention.
    pub verdicts: u64,
}

/// How often `dapgw_udc_sessions_active` is recounted from the store.
pub const RECOUNT_EVERY_MS: u64 = 5 * 60 * 1000;

/// Unix milliseconds now.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn rng() -> rand_core::UnwrapErr<getrandom::SysRng> {
    rand_core::UnwrapErr(getrandom::SysRng)
}

/// The operating system's randomness drawn 512 bytes per system call, for
/// the many row nonces of one batch (one `getrandom` call per sealed row
/// cost more than sealing the row). Bytes are handed out once; the buffer
/// is zeroized on drop. Lives for one request only.
pub(crate) struct BufferedRng {
    buf: zeroize::Zeroizing<[u8; 512]>,
    used: usize,
}

impl BufferedRng {
    pub(crate) fn new() -> Self {
        Self {
            buf: zeroize::Zeroizing::new([0; 512]),
            used: 512,
        }
    }
}

impl rand_core::TryRng for BufferedRng {
    type Error = core::convert::Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut b = [0; 4];
        self.try_fill_bytes(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut b = [0; 8];
        self.try_fill_bytes(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        let mut dst = dst;
        while !dst.is_empty() {
            if self.used == self.buf.len() {
                rand_core::Rng::fill_bytes(&mut rng(), &mut self.buf[..]);
                self.used = 0;
            }
            let n = dst.len().min(self.buf.len() - self.used);
            let (head, rest) = dst.split_at_mut(n);
            head.copy_from_slice(&self.buf[self.used..self.used + n]);
            // Handed out once: wipe what was taken.
            self.buf[self.used..self.used + n].fill(0);
            self.used += n;
            dst = rest;
        }
        Ok(())
    }
}

impl rand_core::TryCryptoRng for BufferedRng {}

impl Udc {
    /// A service over an opened store.
    pub fn new(
        verifier: Verifier,
        storage: StorageKey,
        store: AnyStore,
        metrics: UdcMetrics,
        registry: prometheus::Registry,
        localize_timeout_ms: u64,
        retention: Retention,
    ) -> Arc<Self> {
        Arc::new(Self {
            verifier,
            storage,
            store,
            metrics,
            registry,
            localize_timeout_ms,
            retention,
            last_trim_ms: std::sync::atomic::AtomicU64::new(0),
            last_count_ms: std::sync::atomic::AtomicU64::new(0),
            lock: Mutex::new(()),
            rounds: Mutex::new(BTreeMap::new()),
            registry_cache: std::sync::Mutex::new(RegistryCache::default()),
            slot_cache: std::sync::Mutex::new(SlotCache::default()),
            downlink_wakers: std::sync::Mutex::new(std::collections::HashMap::new()),
            pre_write: Seam::default(),
            pre_rekey_write: Seam::default(),
            pre_import_write: Seam::default(),
            pre_round_write: Seam::default(),
        })
    }

    /// The rounds whose state this process holds in memory (tests).
    #[doc(hidden)]
    pub async fn cached_rounds(&self) -> Vec<(u32, u64)> {
        self.rounds.lock().await.keys().copied().collect()
    }

    /// Runs `f` once, after the next judged batch (or tag reply, or direct
    /// submission) has read its state and been decided but before its
    /// write: lets a test commit a concurrent change (another process's
    /// revocation) exactly in that window.
    #[doc(hidden)]
    pub fn before_next_batch_write(&self, f: impl Future<Output = ()> + Send + 'static) {
        self.pre_write.set(f);
    }

    /// Runs `f` once, after the next revocation or member addition has
    /// read the member, its groups and their slots but before its write
    /// (see [`Udc::before_next_batch_write`]).
    #[doc(hidden)]
    pub fn before_next_rekey_write(&self, f: impl Future<Output = ()> + Send + 'static) {
        self.pre_rekey_write.set(f);
    }

    /// Runs `f` once, after the next import chunk has read its groups but
    /// before its write (see [`Udc::before_next_batch_write`]).
    #[doc(hidden)]
    pub fn before_next_import_write(&self, f: impl Future<Output = ()> + Send + 'static) {
        self.pre_import_write.set(f);
    }

    /// Runs `f` once, after the next round opening has read its group but
    /// before its write (see [`Udc::before_next_batch_write`]).
    #[doc(hidden)]
    pub fn before_next_round_write(&self, f: impl Future<Output = ()> + Send + 'static) {
        self.pre_round_write.set(f);
    }

    /// The registry holding [`UdcMetrics`] (served on `/metrics`).
    pub fn registry(&self) -> &prometheus::Registry {
        &self.registry
    }

    /// The metrics.
    pub fn metrics(&self) -> &UdcMetrics {
        &self.metrics
    }

    /// Sets the gauges kept from the store (`dapgw_udc_sessions_active`):
    /// called at start; the service moves them with its own changes, and
    /// [`Self::recount_gauges`] brings in other processes' changes.
    pub async fn load_gauges(&self) -> Result<(), ServiceError> {
        let n = self.store.count_sessions().await?;
        self.metrics
            .sessions_active
            .set(i64::try_from(n).unwrap_or(i64::MAX));
        self.last_count_ms
            .store(now_ms(), std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// [`Self::load_gauges`] again if the last count is older than
    /// [`RECOUNT_EVERY_MS`] (several processes may share the store).
    pub async fn recount_gauges(&self, now_ms: u64) -> Result<bool, ServiceError> {
        let last = self
            .last_count_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        if now_ms < last.saturating_add(RECOUNT_EVERY_MS) {
            return Ok(false);
        }
        // Under the lock: no change of this process lands between the
        // count and the set.
        let _guard = self.lock.lock().await;
        self.load_gauges().await?;
        Ok(true)
    }

    /// Finalizes up to `limit` localizations whose tag reply did not come in
    /// time (their unresolved entries become unverified via gateway).
    /// Returns how many were finalized.
    pub async fn expire_localizations(&self, limit: u32) -> Result<usize, ServiceError> {
        let _guard = self.lock.lock().await;
        let expired = self.store.expired_localizations(now_ms(), limit).await?;
        let n = expired.len();
        for p in expired {
            let assessment: PendingAssessment =
                self.open(&aad::pending(&p.gateway, p.batch_id), &p.pending)?;
            let batch = ReceivedBatch::decode(Bytes::from(assessment.batch.clone()))
                .map_err(|e| ServiceError::Internal(format!("stored batch: {e}")))?;
            let stored = LoggedVerdict {
                request_hash: p.batch_hash,
                answer: p.verdict.clone(),
                pending: Some(assessment),
            };
            let gateway = batch.batch().gateway_id;
            let batch_id = p.batch_id;
            self.metrics
                .gateway_misbehaviour
                .get(crate::telemetry::MisbehaviourKind::TagReplyTimeout)
                .inc();
            self.judge(
                batch_ctx(&batch, false),
                Some(stored),
                |v, st, reg, log, now| v.localization_expired(gateway, batch_id, st, reg, log, now),
            )
            .await?;
        }
        Ok(n)
    }

    /// Deletes downlink records, readings and final verdicts past their
    /// retention, at most once an hour (the deletes scan their tables, and
    /// retentions are days). Returns what it deleted, or `None` when it
    /// was not due. Each of the three deletes runs whatever the others
    /// did; the first failure is returned, and all three are tried again
    /// an hour on.
    pub async fn trim_history(&self, now_ms: u64) -> Result<Option<Trimmed>, ServiceError> {
        use std::sync::atomic::Ordering;
        let last = self.last_trim_ms.load(Ordering::Relaxed);
        if last != 0 && now_ms < last.saturating_add(TRIM_EVERY_MS) {
            return Ok(None);
        }
        self.last_trim_ms.store(now_ms.max(1), Ordering::Relaxed);
        let mut first: Option<ServiceError> = None;
        let mut keep = |r: Result<u64, store::StoreError>| {
            r.unwrap_or_else(|e| {
                first.get_or_insert(e.into());
                0
            })
        };
        let before = |keep_ms: u64| now_ms.saturating_sub(keep_ms);
        let downlink = keep(
            self.store
                .trim_downlink(before(crate::udc::rounds::DOWNLINK_RETENTION_MS))
                .await,
        );
        let readings = match self.retention.readings_ms {
            Some(ms) => keep(self.store.trim_readings(before(ms)).await),
            None => 0,
        };
        let verdicts = match self.retention.verdicts_ms {
            Some(ms) => keep(self.store.trim_verdicts(before(ms)).await),
            None => 0,
        };
        if downlink + readings + verdicts > 0 {
            tracing::info!(
                downlink,
                readings,
                verdicts,
                "history past its retention deleted"
            );
        }
        match first {
            Some(e) => Err(e),
            None => Ok(Some(Trimmed {
                downlink,
                readings,
                verdicts,
            })),
        }
    }

    /// Closes every open round whose deadline is at or before `now_ms`.
    /// Returns how many were closed.
    /// Also drops this process's cached state of rounds that are no longer
    /// open in the store (closed by another UDC process): with it goes the
    /// round's `e_V` secret, which the design erases at the close.
    pub async fn close_due_rounds(&self, now_ms: u64) -> Result<usize, ServiceError> {
        let open = self.store.open_rounds().await?;
        self.close_due_rounds_of(open, now_ms).await
    }

    /// [`Self::close_due_rounds`] on `open`, every open round as read from
    /// the store (the background pass reads them with the rest of its
    /// work: [`crate::udc::store::Store::due_work`]).
    pub async fn close_due_rounds_of(
        &self,
        open: Vec<RoundRow>,
        now_ms: u64,
    ) -> Result<usize, ServiceError> {
        // Not under the batch lock: a round this process opened after the
        // read is dropped too, which costs only a rebuild from its sealed
        // row and the members' slots at its next batch (as after a
        // restart).
        let still: std::collections::HashSet<(u32, u64)> =
            open.iter().map(|r| (r.group, r.round)).collect();
        self.rounds.lock().await.retain(|k, _| still.contains(k));
        let due: Vec<(u32, u64)> = open
            .into_iter()
            .filter(|r| r.closes_at_ms.is_some_and(|t| t <= now_ms))
            .map(|r| (r.group, r.round))
            .collect();
        for (g, r) in &due {
            self.close_round(*g, *r).await?;
        }
        Ok(due.len())
    }

    /// Closes a round: no more responses are accepted and its sealed state
    /// (e_V in psk-ecdhe) is erased. False if it was not open.
    pub async fn close_round(&self, group: u32, round: u64) -> Result<bool, ServiceError> {
        let _guard = self.lock.lock().await;
        let Some(row) = self.store.round(group, round).await? else {
            return Ok(false);
        };
        if row.status != RoundStatus::Open {
            // Closed by another process: this one's copy goes too.
            self.rounds.lock().await.remove(&(group, round));
            return Ok(false);
        }
        self.apply(BatchWrite {
            now_ms: now_ms(),
            closed_rounds: vec![(group, round)],
            ..BatchWrite::default()
        })
        .await?;
        self.rounds.lock().await.remove(&(group, round));
        let outcome = match self.store.round_report(group, round).await? {
            Some(rep) if rep.missing == 0 && rep.unverified == 0 && rep.rejected.is_empty() => {
                crate::telemetry::UdcRoundOutcome::Complete
            }
            Some(rep) if rep.accepted > 0 => crate::telemetry::UdcRoundOutcome::Partial,
            _ => crate::telemetry::UdcRoundOutcome::Expired,
        };
        self.metrics.rounds.get(outcome).inc();
        Ok(true)
    }

    /// Signs and queues a configuration update for `group` (fan-out to
    /// every subscribed gateway). Returns its seq.
    pub async fn publish_update(
        &self,
        group: u32,
        payload: &[u8],
        valid_through_round: Option<u64>,
    ) -> Result<u64, ServiceError> {
        let _guard = self.lock.lock().await;
        let now = now_ms();
        let (mut state, row) = self.load_group(group).await?;
        let valid = valid_through_round.unwrap_or(u64::MAX);
        let msg = self
            .verifier
            .group_message(&mut state, payload, valid, &mut rng())
            .map_err(|e| ServiceError::BadRequest(e.to_string()))?;
        let seq = state.latest_seq;
        self.apply(BatchWrite {
            now_ms: now,
            groups: vec![self.group_row(&state, row.version)?],
            group_messages: vec![store::GroupMessageRow {
                group,
                seq,
                epoch: state.epoch,
                bytes: msg.to_vec(),
                payload_hash: sha2::Digest::finalize(sha2::Digest::chain_update(
                    <sha2::Sha256 as sha2::Digest>::new(),
                    payload,
                ))
                .into(),
                created_at_ms: now,
            }],
            downlink: vec![DownlinkPush {
                target: DownlinkTarget::Subscribers,
                records: vec![DownlinkRecord {
                    audience: Audience::Group,
                    group,
                    message: msg.to_vec(),
                }],
            }],
            ..BatchWrite::default()
        })
        .await?;
        self.metrics.group_updates.inc();
        Ok(seq)
    }

    /// Registers members (provisioning from the `dapgw keys members`
    /// import file), in transactions of 10,000, without a rekey unless a
    /// group they join has sealed a group message under its current key:
    /// that group gets a new epoch in the same transaction (backward
    /// secrecy, as [`Self::add_member`] gives).
    /// Returns how many were registered and how many were skipped because
    /// their id is registered already: an import never changes a member
    /// (running it again, say with a file that names members revoked
    /// since, must not bring them back or roll back a key version; changes
    /// go through [`Self::add_member`] and [`Self::revoke_member`], which
    /// rekey).
    ///
    /// An imported key (sealed by `dapgw keys import-vendor`) must open
    /// under this UDC's storage key as the member's key of version `kv`;
    /// otherwise nothing is imported (400).
    pub async fn import_members(
        &self,
        rows: Vec<store::MemberRow>,
    ) -> Result<(usize, usize), ServiceError> {
        // One row per member: the stores would disagree on a member named
        // twice in one write (PostgreSQL refuses it, SQLite keeps the last).
        let mut seen = std::collections::HashSet::with_capacity(rows.len());
        if let Some(dup) = rows.iter().find(|r| !seen.insert(r.id)) {
            return Err(ServiceError::BadRequest(format!(
                "member {} is named twice",
                dup.id
            )));
        }
        for row in &rows {
            if let store::KeySource::Imported(sealed) = &row.key_source {
                // The same opening `registry_from` does for a stored row.
                let opened =
                    self.open::<crate::protocol::verifier::KeySource>(&member_aad(row.id), sealed);
                match opened {
                    Ok(crate::protocol::verifier::KeySource::Imported { kv, .. })
                        if kv == row.kv => {}
                    _ => {
                        return Err(ServiceError::BadRequest(format!(
                            "member {}: sealed_key does not open under this UDC's storage key as its key version {}",
                            row.id, row.kv
                        )));
                    }
                }
            }
        }
        let _guard = self.lock.lock().await;
        let (mut imported, mut skipped) = (0, 0);
        let mut rows = rows.into_iter().peekable();
        while rows.peek().is_some() {
            let mut chunk: Vec<_> = rows.by_ref().take(10_000).collect();
            let stored = self
                .store
                .members(chunk.iter().map(|r| r.id).collect())
                .await?;
            let before = chunk.len();
            let mut known = stored.iter().map(Option::is_some);
            chunk.retain(|_| !known.next().unwrap_or(false));
            skipped += before - chunk.len();
            imported += chunk.len();
            if chunk.is_empty() {
                continue;
            }
            let mut groups: Vec<u32> = chunk.iter().flat_map(|r| r.groups.clone()).collect();
            groups.sort_unstable();
            groups.dedup();
            // Insert only: a member another process registers between the
            // read above and this write is not replaced (busy; the retry
            // counts it as skipped).
            let mut write = BatchWrite {
                now_ms: now_ms(),
                members: chunk,
                members_new_only: true,
                ..BatchWrite::default()
            };
            // Backward secrecy: a new member's first confirm hands it the
            // current group key, which must not open a group message sent
            // before it joined. Where one was sealed under that key, the
            // group moves to a new epoch in the same transaction (the
            // members with a session are rekeyed); elsewhere provisioning
            // costs no rekey.
            let mut delta = 0;
            for g in groups {
                match self.sealed_in_current_epoch(g).await? {
                    (true, ..) => self.rekey_into(&mut write, &mut delta, g, None).await?,
                    // Written back unchanged at the version read: a message
                    // another process publishes meanwhile fails this write
                    // (busy, retried), and the retry rekeys.
                    (false, state, version) => {
                        write.groups.push(self.group_row(&state, version)?);
                    }
                }
            }
            self.pre_import_write.run().await;
            self.apply(write).await?;
            self.metrics.sessions_active.add(delta);
        }
        Ok((imported, skipped))
    }

    /// Whether `group`'s current group key has sealed a group message
    /// (the latest one sent is of the current epoch), with the state and
    /// row version read.
    async fn sealed_in_current_epoch(
        &self,
        group: u32,
    ) -> Result<(bool, GroupState, u64), ServiceError> {
        // A group with no state yet is created now, as on any first use:
        // written back at its version, it is compared like any other, so
        // a process that publishes into it between this read and the
        // import's write fails the import (with no row there would be
        // nothing to compare against).
        let (state, row) = self.load_group(group).await?;
        let sealed = state.sent.last().is_some_and(|m| m.epoch == state.epoch);
        Ok((sealed, state, row.version))
    }

    /// Every session slot of `group`'s active members, with what was read.
    async fn group_sessions(
        &self,
        group: u32,
    ) -> Result<(SessionTable, SlotVersions, Vec<u64>), ServiceError> {
        let mut table = SessionTable::new();
        let mut versions = SlotVersions::default();
        let mut sessionless = Vec::new();
        let mut after = None;
        loop {
            let ids = self.store.group_members(group, after, 10_000).await?;
            let Some(last) = ids.last() else { break };
            after = Some(*last);
            let ids: Vec<MemberId> = ids.into_iter().map(MemberId).collect();
            let (mut part, v) = self.load_sessions(group, &ids).await?;
            for id in ids {
                match part.remove_boxed(GroupId(group), id) {
                    Some(slot) if !slot.is_empty() => table.insert_boxed(GroupId(group), id, slot),
                    _ => sessionless.push(id.0),
                }
            }
            versions.0.extend(v.0);
        }
        Ok((table, versions, sessionless))
    }

    /// Adds (or re-adds) member `id` to `groups` and starts a new epoch in
    /// each, rekeying every member with a session, all in one transaction.
    /// A re-added member keeps its key version unless `kv` names another
    /// (a new member starts at 1), keeps an imported key of that version,
    /// and each group it no longer names gets a new epoch without it. A
    /// `kv` named other than the one version accepted so far also erases
    /// the member's sessions (they came from the old key) and rekeys the
    /// others without it.
    pub async fn add_member(
        &self,
        id: u64,
        mut groups: Vec<u32>,
        kv: Option<u32>,
    ) -> Result<(), ServiceError> {
        // One rekey per group: a group named twice would be two
        // compare-and-set writes of the same group row.
        groups.sort_unstable();
        groups.dedup();
        let _guard = self.lock.lock().await;
        let now = now_ms();
        let stored = self.store.members(vec![id]).await?.pop().flatten();
        let named_kv = kv;
        // Unnamed, the key version stays what it is (1 for a new member).
        let kv = kv.or(stored.as_ref().map(|row| row.kv)).unwrap_or(1);
        // A re-added member keeps an imported (vendor) key of the same key
        // version: replaced by a derived one, the meter could no longer
        // authenticate.
        let key_source = match &stored {
            Some(row) if row.kv == kv => row.key_source.clone(),
            _ => store::KeySource::Derived,
        };
        // An active member re-added without a version keeps the versions
        // still accepted (a key update may be under way). A version named,
        // or a revoked member made active again (perhaps because a key
        // leaked), is a credential accepted alone.
        let min_kv = match &stored {
            Some(row) if named_kv.is_none() && row.status == store::MemberStatus::Active => {
                row.min_kv
            }
            _ => kv,
        };
        // The groups it leaves get a new epoch without it, as for a
        // revocation in that group: its sessions there are erased and it
        // cannot read what the group is sent next.
        // (A revoked member was taken out of all its groups already.)
        let left: Vec<u32> = stored
            .as_ref()
            .filter(|row| row.status != store::MemberStatus::Revoked)
            .map(|row| {
                row.groups
                    .iter()
                    .copied()
                    .filter(|g| groups.binary_search(g).is_err())
                    .collect()
            })
            .unwrap_or_default();
        let mut write = BatchWrite {
            now_ms: now,
            members: vec![store::MemberRow {
                id,
                groups: groups.clone(),
                key_source,
                kv,
                min_kv,
                status: store::MemberStatus::Active,
                added_at_ms: stored.as_ref().map_or(now, |row| row.added_at_ms),
            }],
            ..BatchWrite::default()
        };
        // The row is replaced whole: if another process changed the key
        // versions since they were read (a key update, its confirmation),
        // this write fails (busy, retried) instead of undoing that.
        if let Some(row) = &stored {
            write.key_versions.push(store::KeyVersionChange::Expected {
                member: id,
                kv: row.kv,
                min_kv: row.min_kv,
            });
        }
        // A version named that is not the one (or the only one) accepted so
        // far replaces the key: the member's sessions, derived from the
        // old one, go with the new epoch, as for a revocation (whoever
        // holds the old key holds them too), and it joins again with its
        // next answer under the new version.
        let old_key_sessions = named_kv.is_some()
            && stored.as_ref().is_some_and(|row| {
                row.status == store::MemberStatus::Active && (row.kv != kv || row.min_kv != kv)
            });
        let own = old_key_sessions.then_some(MemberId(id));
        let mut delta = 0;
        for g in groups {
            self.rekey_into(&mut write, &mut delta, g, own).await?;
        }
        for g in left {
            self.rekey_into(&mut write, &mut delta, g, Some(MemberId(id)))
                .await?;
        }
        self.pre_rekey_write.run().await;
        self.apply(write).await?;
        self.metrics.sessions_active.add(delta);
        Ok(())
    }

    /// Revokes member `id`: its status, its sessions, and a new epoch in
    /// each of its groups with rekeys to every other member. False if the
    /// member is unknown.
    pub async fn revoke_member(&self, id: u64) -> Result<bool, ServiceError> {
        let _guard = self.lock.lock().await;
        let Some(Some(mut row)) = self.store.members(vec![id]).await?.pop() else {
            return Ok(false);
        };
        if row.status == store::MemberStatus::Revoked {
            // Done before (its sessions erased, its groups rekeyed): a
            // repeated request (an operator retrying a timed-out call)
            // starts no further epoch.
            return Ok(true);
        }
        row.status = store::MemberStatus::Revoked;
        let groups = row.groups.clone();
        let mut write = BatchWrite {
            now_ms: now_ms(),
            // Replaced whole: the key versions read must still be stored.
            key_versions: vec![store::KeyVersionChange::Expected {
                member: id,
                kv: row.kv,
                min_kv: row.min_kv,
            }],
            members: vec![row],
            ..BatchWrite::default()
        };
        let mut delta = 0;
        for g in groups {
            self.rekey_into(&mut write, &mut delta, g, Some(MemberId(id)))
                .await?;
        }
        self.pre_rekey_write.run().await;
        self.apply(write).await?;
        self.metrics.sessions_active.add(delta);
        Ok(true)
    }

    /// Moves member `id`'s root key to the next version: `K_i(kv+1)`
    /// (derived from the master secret) sealed under `k_down` of each of its
    /// psk-ecdhe sessions, in every group where it has one. The new version
    /// is stored and the messages queued in one transaction (persisted
    /// before anything is sent); the old version stays accepted until the
    /// member answers a round under the new one (docs/protocol.md, "Key
    /// rotation"). With `expect_kv`, nothing is issued unless the stored
    /// version is that one ([`KeyUpdateOutcome::KvChanged`]), so a caller
    /// that repeats a call whose answer it lost does not rotate twice.
    pub async fn update_member_key(
        &self,
        id: u64,
        expect_kv: Option<u32>,
    ) -> Result<KeyUpdateOutcome, ServiceError> {
        use crate::protocol::verifier::UsageError;
        let _guard = self.lock.lock().await;
        let Some(Some(row)) = self.store.members(vec![id]).await?.pop() else {
            return Ok(KeyUpdateOutcome::UnknownMember);
        };
        if row.status == store::MemberStatus::Revoked {
            return Ok(KeyUpdateOutcome::Revoked);
        }
        // Checked against the row read here; the write's compare-and-set on
        // that row's version catches another process changing it after.
        if expect_kv.is_some_and(|kv| kv != row.kv) {
            return Ok(KeyUpdateOutcome::KvChanged { kv: row.kv });
        }
        let LoadedRegistry(mut records) = self.registry_from(vec![Some(row.clone())])?;
        let record = records
            .remove(&MemberId(id))
            .ok_or_else(|| ServiceError::Internal("member record vanished".into()))?;
        let mut write = BatchWrite {
            now_ms: now_ms(),
            ..BatchWrite::default()
        };
        let mut issued_kv = None;
        let mut sent_in = Vec::new();
        for &group in &row.groups {
            let (mut sessions, versions) = self.load_sessions(group, &[MemberId(id)]).await?;
            let Some(slot) = sessions.get_mut(GroupId(group), MemberId(id)) else {
                continue;
            };
            // The member opens a key update only in its current session,
            // which is the newest one once it has opened its latest
            // confirm: if that one is psk, an update sealed in an older
            // psk-ecdhe session would most likely be refused.
            let newest = slot.pending.as_ref().or(slot.current.as_ref());
            if newest.is_none_or(|s| s.mode != Mode::PskEcdhe) {
                continue;
            }
            let issued = match self.verifier.key_update(slot, &record, &mut rng()) {
                Ok(issued) => issued,
                // No session here, only psk ones, or every psk-ecdhe
                // session's downlink counter spent: another group may
                // carry it.
                Err(
                    UsageError::NoSession(_)
                    | UsageError::KeyUpdateNeedsEcdhe(_)
                    | UsageError::CounterExhausted,
                ) => continue,
                Err(UsageError::KeyVersionExhausted(_)) => {
                    return Err(ServiceError::Conflict(format!(
                        "member {id}'s key version cannot be raised further"
                    )));
                }
                Err(e) => return Err(ServiceError::Internal(e.to_string())),
            };
            issued_kv = Some(issued.record.kv);
            let mut slots = SlotWrites::new(group, &versions);
            if let Some(slot) = sessions.get(GroupId(group), MemberId(id)) {
                self.push_slot(&mut slots, MemberId(id), slot, None);
            }
            write.sessions.append(&mut slots.rows);
            // The pending session's confirm first, if the update is sealed
            // under it: the member opens no key update before that confirm.
            let confirm = sessions
                .get(GroupId(group), MemberId(id))
                .and_then(SessionSlot::confirm_before_key_update);
            write.downlink.push(DownlinkPush {
                target: DownlinkTarget::Subscribers,
                records: confirm
                    .map(|c| c.to_bytes())
                    .into_iter()
                    .chain(issued.updates.iter().map(|u| u.to_bytes()))
                    .map(|message| DownlinkRecord::to_member(id, group, &message))
                    .collect(),
            });
            sent_in.push(group);
        }
        let Some(kv) = issued_kv else {
            return Ok(KeyUpdateOutcome::NeedsEcdhe);
        };
        // Compare-and-set on the version read: a key update or re-add by
        // another process meanwhile fails this one (busy, retried).
        write.key_versions.push(store::KeyVersionChange::Issued {
            member: id,
            from_kv: row.kv,
            to_kv: kv,
        });
        self.apply(write).await?;
        self.metrics
            .key_updates
            .get(crate::telemetry::KeyUpdateEvent::Issued)
            .inc();
        tracing::info!(member = id, kv, groups = ?sent_in, "key update issued");
        Ok(KeyUpdateOutcome::Issued {
            kv,
            min_kv: row.min_kv.min(row.kv),
            groups: sent_in,
        })
    }

    /// Adds a new epoch of `group` (revoking `revoked` if given) to `write`:
    /// the group row, the changed session slots and the rekeys.
    async fn rekey_into(
        &self,
        write: &mut BatchWrite,
        active_delta: &mut i64,
        group: u32,
        revoked: Option<MemberId>,
    ) -> Result<(), ServiceError> {
        let (mut state, row) = self.load_group(group).await?;
        let (mut sessions, mut versions, mut sessionless) = self.group_sessions(group).await?;
        if let Some(r) = revoked
            && !versions.0.contains_key(&r)
        {
            // Its sessions may exist even though it is no longer listed
            // as active: load them so they are erased too.
            let (extra, v) = self.load_sessions(group, &[r]).await?;
            if let Some(slot) = extra.get(GroupId(group), r) {
                sessions.insert(GroupId(group), r, slot.clone());
            }
            versions.0.extend(v.0);
        }
        let rekeys = match revoked {
            Some(r) => self
                .verifier
                .revoke(&mut state, r, &mut sessions, &mut rng()),
            None => self
                .verifier
                .add_member(&mut state, &mut sessions, &mut rng()),
        }
        .map_err(|e| ServiceError::Internal(e.to_string()))?;
        let mut slots = SlotWrites::new(group, &versions);
        for id in sessions.members_of(GroupId(group)) {
            if let Some(slot) = sessions.get(GroupId(group), id)
                && Some(id) != revoked
            {
                self.push_slot(&mut slots, id, slot, None);
            }
        }
        if let Some(r) = revoked {
            // An empty slot replaces the revoked member's sessions. Written
            // also when it had no slot when read: an insert then, which
            // fails (a conflict, retried) if a batch another process judged
            // before the revocation has given it its first session since.
            self.push_slot(&mut slots, r, &SessionSlot::default(), None);
        }
        write.sessions.append(&mut slots.rows);
        *active_delta += slots.active_delta;
        write.groups.push(self.group_row(&state, row.version)?);
        // Members with no session got no rekey: if a batch another process
        // judged before this epoch gives one of them its first session
        // before this write commits, that session holds the old group key
        // (which a revoked member knows), so the write fails (busy, retried
        // with the member rekeyed). The revoked member's own slot is
        // written (above) and checked that way.
        sessionless.retain(|m| Some(MemberId(*m)) != revoked);
        if !sessionless.is_empty() {
            write.sessionless.push((group, sessionless));
        }
        // A member's rekeys are consecutive; the confirm of a session it
        // may not have opened yet goes right before them (the gateway takes
        // a verdict's confirms from the verdict, on its own schedule).
        let mut records = Vec::with_capacity(rekeys.len());
        let mut last = None;
        for k in &rekeys {
            if last != Some(k.id) {
                last = Some(k.id);
                if let Some(c) = sessions
                    .get(GroupId(group), k.id)
                    .and_then(SessionSlot::confirm_before_rekey)
                {
                    records.push(DownlinkRecord::to_member(k.id.0, group, &c.to_bytes()));
                }
            }
            records.push(DownlinkRecord::to_member(k.id.0, group, &k.to_bytes()));
        }
        if !records.is_empty() {
            write.downlink.push(DownlinkPush {
                target: DownlinkTarget::Subscribers,
                records,
            });
        }
        Ok(())
    }

    /// The store (for read-only listings).
    pub fn store(&self) -> &AnyStore {
        &self.store
    }

    fn seal<T: serde::Serialize>(&self, aad: &[u8], value: &T) -> Result<Sealed, ServiceError> {
        let plain = zeroize::Zeroizing::new(
            serde_json::to_vec(value).map_err(|e| ServiceError::Internal(e.to_string()))?,
        );
        Ok(Sealed::new(self.storage.seal_row(&mut rng(), aad, &plain)))
    }

    /// Seals a session slot in its compact binary form.
    fn seal_slot(&self, rng: &mut BufferedRng, aad: &[u8], slot: &SessionSlot) -> Sealed {
        Sealed::new(
            self.storage
                .seal_row_with(rng, aad, slot.encoded_len(), |out| slot.encode_into(out)),
        )
    }

    /// Opens a session slot sealed by [`Self::seal_slot`] (or as JSON, the
    /// form written before the binary one; JSON starts with `{`).
    fn open_slot(&self, aad: &[u8], sealed: &Sealed) -> Result<SessionSlot, ServiceError> {
        let plain = self
            .storage
            .open_row(aad, sealed.as_bytes())
            .map_err(|_| ServiceError::Internal("a sealed row does not open".into()))?;
        if plain.first() == Some(&b'{') {
            return serde_json::from_slice(&plain)
                .map_err(|e| ServiceError::Internal(e.to_string()));
        }
        SessionSlot::decode(&plain)
            .map_err(|e| ServiceError::Internal(format!("stored session slot: {e}")))
    }

    fn open<T: serde::de::DeserializeOwned>(
        &self,
        aad: &[u8],
        sealed: &Sealed,
    ) -> Result<T, ServiceError> {
        let plain = self
            .storage
            .open_row(aad, sealed.as_bytes())
            .map_err(|_| ServiceError::Internal("a sealed row does not open".into()))?;
        serde_json::from_slice(&plain).map_err(|e| ServiceError::Internal(e.to_string()))
    }

    /// Loads a group's state and its row (for the compare-and-set version);
    /// creates the group on first use.
    async fn load_group(&self, group: u32) -> Result<(GroupState, GroupRow), ServiceError> {
        if let Some(row) = self.store.group(group).await? {
            let state: GroupState = self.open(&aad::group(group), &row.state)?;
            return Ok((state, row));
        }
        // Above the recovery floor: the group may have been used after the
        // backup this store was restored from (docs/udc.md, "Restoring a
        // backup").
        let floor = self.store.recovery_state().await?.floor;
        let state = GroupState::starting_above(GroupId(group), floor, &mut rng())
            .map_err(|e| ServiceError::Conflict(format!("group {group}: {e}")))?;
        let row = self.group_row(&state, 1)?;
        match self.store.insert_group(row.clone()).await {
            Ok(()) | Err(StoreError::Conflict(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let row = self
            .store
            .group(group)
            .await?
            .ok_or_else(|| ServiceError::Internal("group vanished".into()))?;
        let state: GroupState = self.open(&aad::group(group), &row.state)?;
        Ok((state, row))
    }

    /// The row that stores `state`, sealed, with the compare-and-set
    /// `version` it is written against (1 for a new group, the version
    /// read for an update).
    fn group_row(&self, state: &GroupState, version: u64) -> Result<GroupRow, ServiceError> {
        let group = state.group.0;
        Ok(GroupRow {
            group,
            epoch: state.epoch,
            next_round: state.next_round,
            seq: state.latest_seq,
            config_hash: state.config_hash,
            state: self.seal(&aad::group(group), state)?,
            version,
        })
    }

    /// Opens the next round of `group` and queues its challenge for every
    /// subscribed gateway, in one transaction. Returns the round number.
    pub async fn open_round(
        &self,
        group: u32,
        mode: Mode,
        purpose: Purpose,
        duration_ms: Option<u64>,
    ) -> Result<u64, ServiceError> {
        self.open_round_claiming(group, mode, purpose, duration_ms, None)
            .await?
            .ok_or_else(|| ServiceError::Internal("a round without a claim was not opened".into()))
    }

    /// [`Self::open_round`] for a schedule: the write that opens the round
    /// also claims the schedule's due slot (`claim`), so the slot is spent
    /// if and only if the round opens (a crash or a failed write leaves it
    /// due). `None` when another process claimed the slot first.
    pub async fn open_scheduled_round(
        &self,
        group: u32,
        mode: Mode,
        purpose: Purpose,
        duration_ms: Option<u64>,
        claim: store::ScheduleClaim,
    ) -> Result<Option<u64>, ServiceError> {
        self.open_round_claiming(group, mode, purpose, duration_ms, Some(claim))
            .await
    }

    async fn open_round_claiming(
        &self,
        group: u32,
        mode: Mode,
        purpose: Purpose,
        duration_ms: Option<u64>,
        claim: Option<store::ScheduleClaim>,
    ) -> Result<Option<u64>, ServiceError> {
        let _guard = self.lock.lock().await;
        let now = now_ms();
        let (mut state, row) = self.load_group(group).await?;
        let not_after = duration_ms.map(|d| (now + d) / 1000);
        let store_purpose = match purpose {
            Purpose::Auth => store::RoundPurpose::Auth,
            Purpose::Read(_) => store::RoundPurpose::Read,
        };
        let (round, challenge) = self
            .verifier
            .open_round(&mut state, mode, purpose, not_after, &mut rng())
            .map_err(|e| ServiceError::BadRequest(e.to_string()))?;
        let write = BatchWrite {
            now_ms: now,
            groups: vec![self.group_row(&state, row.version)?],
            new_rounds: vec![RoundRow {
                group,
                round: round.round,
                opened_at_ms: now,
                closes_at_ms: duration_ms.map(|d| now.saturating_add(d)),
                mode,
                purpose: store_purpose,
                challenge: challenge.to_vec(),
                state: self.seal(&aad::round(group, round.round), &round)?,
                status: RoundStatus::Open,
            }],
            downlink: vec![DownlinkPush {
                target: DownlinkTarget::Subscribers,
                records: vec![DownlinkRecord {
                    audience: Audience::Group,
                    group,
                    message: challenge.to_vec(),
                }],
            }],
            schedule_claim: claim,
            ..BatchWrite::default()
        };
        self.pre_round_write.run().await;
        match self.apply_store(write).await {
            Ok(_) => {}
            Err(StoreError::Conflict("schedule")) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let no = round.round;
        self.rounds.lock().await.insert((group, no), round);
        Ok(Some(no))
    }

    async fn apply(&self, write: BatchWrite) -> Result<store::Applied, ServiceError> {
        Ok(self.apply_store(write).await?)
    }

    /// Applies a write set, timed; wakes downlink long polls.
    async fn apply_store(&self, write: BatchWrite) -> Result<store::Applied, StoreError> {
        let t = Instant::now();
        let has_downlink = !write.downlink.is_empty();
        let applied = self.store.apply_batch(write).await;
        self.metrics
            .store
            .get(StoreOp::Write)
            .observe(t.elapsed().as_secs_f64());
        let applied = applied?;
        if has_downlink {
            self.wake_downlink(applied.downlink_heads.iter().map(|(g, _)| g.as_str()));
        }
        Ok(applied)
    }

    /// What a long poll of `gateway`'s downlink waits on: notified after
    /// each write of this process that appends to that gateway's queue.
    #[doc(hidden)]
    pub fn downlink_waker(&self, gateway: &str) -> Arc<Notify> {
        let mut map = self
            .downlink_wakers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.entry(gateway.to_string()).or_default().clone()
    }

    fn wake_downlink<'a>(&self, gateways: impl IntoIterator<Item = &'a str>) {
        let map = self
            .downlink_wakers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for g in gateways {
            if let Some(n) = map.get(g) {
                n.notify_waiters();
            }
        }
    }

    /// Applies the write of a judged batch. `Some(answer)` when another UDC
    /// process sharing the store filed a verdict for the same (gateway,
    /// batch id) first: the same batch gets that process's answer (nothing
    /// of this judgement is written), another batch a conflict.
    async fn apply_verdict(
        &self,
        write: BatchWrite,
        gateway: &str,
        ctx: &Ctx,
    ) -> Result<Option<Bytes>, ServiceError> {
        match self.apply_store(write).await {
            Ok(_) => Ok(None),
            Err(StoreError::VerdictExists { batch_hash, .. }) if batch_hash == ctx.hash => {
                let stored = self.store.verdict(gateway, ctx.log_batch_id).await?;
                let v = stored.ok_or_else(|| ServiceError::Busy("verdict vanished".into()))?;
                Ok(Some(Bytes::from(v.verdict)))
            }
            Err(StoreError::VerdictExists { .. }) => Err(ServiceError::Conflict(format!(
                "batch id {} was already used for a different batch",
                ctx.batch_id
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// Stored member rows as verifier records.
    fn registry_from(
        &self,
        rows: Vec<Option<store::MemberRow>>,
    ) -> Result<LoadedRegistry, ServiceError> {
        let mut map = BTreeMap::new();
        for row in rows.into_iter().flatten() {
            let groups = row.groups.iter().map(|g| GroupId(*g)).collect();
            let mut rec = match &row.key_source {
                store::KeySource::Derived => {
                    MemberRecord::derived(MemberId(row.id), row.kv, groups)
                }
                store::KeySource::Imported(sealed) => {
                    let key: crate::protocol::verifier::KeySource =
                        self.open(&member_aad(row.id), sealed)?;
                    let mut r = MemberRecord::derived(MemberId(row.id), row.kv, groups);
                    r.key = key;
                    r
                }
            };
            rec.min_kv = row.min_kv.min(row.kv);
            if row.status == store::MemberStatus::Revoked {
                rec.status = crate::protocol::verifier::MemberStatus::Revoked;
            }
            map.insert(MemberId(row.id), rec);
        }
        Ok(LoadedRegistry(map))
    }

    /// The records of a batch's members `ids`: the `rows` a batch read
    /// returned (all of them, or the ones the cache missed, as `of` says),
    /// completed from the cache, which keeps the new ones.
    fn registry_for(
        &self,
        ids: &[MemberId],
        version: u64,
        of: store::MembersOf,
        rows: Vec<Option<store::MemberRow>>,
    ) -> Result<LoadedRegistry, ServiceError> {
        let LoadedRegistry(mut map) = self.registry_from(rows)?;
        // The rows just read are the ones the copy lacks (or all of them,
        // for a new copy): the copy keeps them, and gives the batch the rest.
        let fresh: Vec<(MemberId, MemberRecord)> =
            map.iter().map(|(id, rec)| (*id, rec.clone())).collect();
        let mut hits = 0u64;
        let mut cache = self
            .registry_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match of {
            store::MembersOf::All => {
                cache.records.clear();
                cache.version = Some(version);
            }
            // Batches are judged one at a time (`self.lock`), so the copy
            // the fetch was computed from is still the one here.
            store::MembersOf::Missing if cache.version != Some(version) => {
                cache.records.clear();
                cache.version = None;
                return Err(ServiceError::Busy("member registry copy changed".into()));
            }
            store::MembersOf::Missing => {
                for id in ids {
                    if let std::collections::btree_map::Entry::Vacant(e) = map.entry(*id)
                        && let Some(rec) = cache.records.get(id)
                    {
                        hits += 1;
                        e.insert(rec.clone());
                    }
                }
            }
        }
        self.metrics
            .count_cache(UdcCache::Registry, hits, ids.len() as u64 - hits);
        if cache.records.len() + fresh.len() > REGISTRY_CACHE_MAX {
            cache.records.clear();
        }
        cache.records.extend(fresh);
        Ok(LoadedRegistry(map))
    }

    /// Session slots of (member, group), opened, with what was read.
    async fn load_sessions(
        &self,
        group: u32,
        ids: &[MemberId],
    ) -> Result<(SessionTable, SlotVersions), ServiceError> {
        let keys = ids.iter().map(|m| (m.0, group)).collect();
        let stored = BatchSlot::from_stored(self.store.sessions(keys).await?);
        self.sessions_from(group, ids, stored)
    }

    /// Stored session slots of `ids` (in that order), opened.
    fn sessions_from(
        &self,
        group: u32,
        ids: &[MemberId],
        stored: impl IntoIterator<Item = Option<BatchSlot>>,
    ) -> Result<(SessionTable, SlotVersions), ServiceError> {
        let mut table = SessionTable::with_capacity(ids.len());
        let mut versions = SlotVersions::with_capacity(ids.len());
        let mut cache = self.slot_cache.lock().unwrap_or_else(|p| p.into_inner());
        let (mut hits, mut misses) = (0, 0);
        for (id, row) in ids.iter().zip(stored) {
            let cached = cache.0.remove(&(id.0, group));
            let Some(row) = row else { continue };
            let mark = row.state.as_ref().and_then(|s| SealMark::of(s.as_bytes()));
            let slot = match &row.state {
                Some(sealed) => match cached {
                    Some((m, used, slot)) if Some(m) == mark && used == row.used => {
                        hits += 1;
                        Some(slot)
                    }
                    _ => {
                        misses += 1;
                        let mut slot = self.open_slot(&aad::session(id.0, group), sealed)?;
                        if let Some(u) = &row.used
                            && !slot.apply_use(
                                SessionId(u.sid),
                                ReplayWindow {
                                    top: u.top,
                                    seen: u.seen,
                                },
                            )
                        {
                            // Written only against this sealing: a use
                            // that does not fit it is damage, and judging
                            // without it would reopen its window.
                            return Err(ServiceError::Internal(format!(
                                "the stored session use of member {} in group {group} names a \
                                 session its slot does not hold",
                                id.0
                            )));
                        }
                        Some(Box::new(slot))
                    }
                },
                None => None,
            };
            let active = slot.as_ref().is_some_and(|s| !s.is_empty());
            versions.0.insert(
                *id,
                SlotRead {
                    version: row.version,
                    rounds: row.rounds,
                    active,
                    used: row.used,
                    mark,
                },
            );
            if let Some(slot) = slot {
                table.insert_boxed(GroupId(group), *id, slot);
            }
        }
        drop(cache);
        self.metrics.count_cache(UdcCache::Slot, hits, misses);
        Ok((table, versions))
    }

    /// Keeps the slots of `group` a committed batch wrote (`marks`), moved
    /// out of the batch's `sessions`, in the [`SlotCache`].
    fn keep_slots(
        &self,
        group: u32,
        marks: Vec<(MemberId, SealMark, Option<SlotUse>)>,
        sessions: &mut SessionTable,
    ) {
        let mut cache = self.slot_cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.0.len() + marks.len() > SLOT_CACHE_MAX {
            cache.0.clear();
        }
        for (id, mark, used) in marks {
            if let Some(slot) = sessions.remove_boxed(GroupId(group), id) {
                cache.0.insert((id.0, group), (mark, used, slot));
            }
        }
    }

    /// The round a batch answers, from its stored row, if not closed.
    async fn round_from(
        &self,
        group: u32,
        round: u64,
        row: Option<RoundRow>,
    ) -> Result<Option<(RoundState, RoundRow)>, ServiceError> {
        let Some(row) = row else {
            return Ok(None);
        };
        if row.status != RoundStatus::Open || row.state.as_bytes().is_empty() {
            // Closed (perhaps by another process): a copy cached here goes.
            self.rounds.lock().await.remove(&(group, round));
            return Ok(None);
        }
        // Taken out of the cache (no copy of the accepted set); `judge`
        // puts it back after a successful write. On an error it is rebuilt
        // from the store on the next call.
        if let Some(st) = self.rounds.lock().await.remove(&(group, round)) {
            return Ok(Some((st, row)));
        }
        // Cache miss (restart, or another process judged batches): the
        // accepted set starts empty; `judge` adds the batch's members that
        // their session slots say were accepted in this round.
        let st: RoundState = self.open(&aad::round(group, round), &row.state)?;
        Ok(Some((st, row)))
    }

    /// Handles `POST /v1/batches` from gateway `cert_gateway`.
    pub async fn handle_batch(
        &self,
        cert_gateway: &str,
        body: Bytes,
    ) -> Result<Bytes, ServiceError> {
        let batch = ReceivedBatch::decode(body).map_err(|e| {
            self.metrics
                .batches
                .get(EntryKind::Response, UdcBatchOutcome::Rejected)
                .inc();
            ServiceError::BadRequest(e.to_string())
        })?;
        let b = batch.batch();
        let gateway = b.gateway_id.as_str().to_owned();
        if gateway != cert_gateway {
            return Err(ServiceError::WrongGateway {
                batch: gateway,
                cert: cert_gateway.to_owned(),
            });
        }
        let kind = match batch.round() {
            Some(_) => EntryKind::Response,
            None => EntryKind::Uplink,
        };
        // Structural faults refuse the batch before anything is read or
        // opened (and before the lock every other batch waits on); a
        // stored batch passed this check, so a retry is not refused here.
        if let Err(e) = b.check_structure() {
            self.metrics
                .batches
                .get(kind, UdcBatchOutcome::Rejected)
                .inc();
            return Err(map_verifier_error(VerifierError::Peer(e.into())));
        }
        let _guard = self.lock.lock().await;
        let stored = self.stored_log(&gateway, b.batch_id).await?;
        let res = self
            .judge(batch_ctx(&batch, true), stored, |v, st, reg, log, now| {
                v.handle_batch(&batch, st, reg, log, now)
            })
            .await;
        self.count_batch(kind, &res);
        res
    }

    /// Handles `POST /v1/tags` from gateway `cert_gateway`.
    pub async fn handle_tags(
        &self,
        cert_gateway: &str,
        body: Bytes,
    ) -> Result<Bytes, ServiceError> {
        let reply = TagReply::decode(&body).map_err(|e| ServiceError::BadRequest(e.to_string()))?;
        let gateway = reply.gateway_id.as_str().to_owned();
        if gateway != cert_gateway {
            return Err(ServiceError::WrongGateway {
                batch: gateway,
                cert: cert_gateway.to_owned(),
            });
        }
        let _guard = self.lock.lock().await;
        let pending = self
            .store
            .pending_localization(&gateway, reply.batch_id)
            .await?
            .ok_or_else(|| {
                ServiceError::NotFound(format!(
                    "no localization is pending for batch {}",
                    reply.batch_id
                ))
            })?;
        if pending.batch_hash != reply.batch_hash {
            return Err(ServiceError::Conflict(format!(
                "the tag reply names another batch hash than batch {}",
                reply.batch_id
            )));
        }
        let assessment: PendingAssessment =
            self.open(&aad::pending(&gateway, reply.batch_id), &pending.pending)?;
        let batch = ReceivedBatch::decode(Bytes::from(assessment.batch.clone()))
            .map_err(|e| ServiceError::Internal(format!("stored batch: {e}")))?;
        let stored = LoggedVerdict {
            request_hash: pending.batch_hash,
            answer: pending.verdict.clone(),
            pending: Some(assessment),
        };
        let res = self
            .judge(
                batch_ctx(&batch, true),
                Some(stored),
                |v, st, reg, log, now| v.handle_tag_reply(&reply, st, reg, log, now),
            )
            .await;
        if res.is_ok() {
            self.metrics.localizations.inc();
        }
        res
    }

    /// Handles `POST /v1/direct`: a member's Response or Uplink judged as
    /// a batch of one. Answers a Verdict for that batch (gateway id
    /// `direct`, batch id 0, batch hash = SHA-256 of the inner message);
    /// anything not accepted is [`ServiceError::BadRequest`] so the server
    /// can answer unauthenticated submitters uniformly.
    pub async fn handle_direct(&self, body: Bytes) -> Result<Bytes, ServiceError> {
        let direct = Direct::decode(&body).map_err(|e| ServiceError::BadRequest(e.to_string()))?;
        let inner = direct
            .inner_message()
            .map_err(|e| ServiceError::BadRequest(e.to_string()))?;
        let hash: [u8; 32] = sha2::Digest::finalize(sha2::Digest::chain_update(
            <sha2::Sha256 as sha2::Digest>::new(),
            &direct.inner,
        ))
        .into();
        let (id, group, round, mode) = match &inner {
            DirectInner::Response(r) => (r.id, r.group.0, Some(r.round), r.mode()),
            DirectInner::Uplink(u) => (u.id, u.group.0, None, Mode::Psk),
        };
        // Filed apart from every gateway: ':' is not a gateway id character
        // (`GatewayId`), so no certificate can name this record's key.
        let log_gateway = format!("direct:{}:{group}", id.0);
        let key = match round {
            Some(round) => LogKey::Direct {
                member: id,
                group: GroupId(group),
                round,
            },
            None => LogKey::Direct {
                member: id,
                group: GroupId(group),
                round: u64::MAX,
            },
        };
        let ctx = Ctx {
            via: None,
            answered: true,
            log_gateway: log_gateway.clone(),
            log_batch_id: round.unwrap_or(u64::MAX),
            batch_id: 0,
            group,
            ids: vec![id],
            round,
            mode,
            hash,
            key,
        };
        let _guard = self.lock.lock().await;
        let stored = match round {
            Some(r) => self.stored_log(&log_gateway, r).await?,
            None => None,
        };
        let accepted = std::sync::atomic::AtomicBool::new(false);
        let answer = self
            .judge(ctx, stored, |v, st, reg, log, now| {
                let out = v.handle_direct(&direct, st, reg, log, now)?;
                accepted.store(
                    out.outcome == Outcome::Accepted,
                    std::sync::atomic::Ordering::Relaxed,
                );
                let confirm = out.confirm.as_ref().and_then(|c| Confirm::decode(c).ok());
                Ok(crate::protocol::verifier::BatchOutput {
                    answer: direct_verdict(hash, out.outcome, confirm),
                    event: out.event,
                })
            })
            .await?;
        if accepted.load(std::sync::atomic::Ordering::Relaxed) {
            // Another process filed this response first: its stored record
            // is the bare Confirm (the direct log keeps that), answered in
            // the Verdict a fresh judgement gives, byte for byte.
            if let Ok(crate::protocol::wire::Message::Confirm(c)) =
                crate::protocol::wire::Message::decode(&answer)
            {
                return Ok(direct_verdict(hash, Outcome::Accepted, Some(c)));
            }
            Ok(answer)
        } else {
            Err(ServiceError::BadRequest("not accepted".into()))
        }
    }

    fn count_batch(&self, kind: EntryKind, res: &Result<Bytes, ServiceError>) {
        let outcome = match res {
            Ok(_) => UdcBatchOutcome::Accepted,
            Err(ServiceError::Internal(_) | ServiceError::Busy(_)) => UdcBatchOutcome::Error,
            Err(_) => UdcBatchOutcome::Rejected,
        };
        self.metrics.batches.get(kind, outcome).inc();
    }

    /// The stored verdict of (gateway, batch id), as a log record.
    async fn stored_log(
        &self,
        gateway: &str,
        batch_id: u64,
    ) -> Result<Option<LoggedVerdict>, ServiceError> {
        let Some(v) = self.store.verdict(gateway, batch_id).await? else {
            return Ok(None);
        };
        Ok(Some(LoggedVerdict {
            request_hash: v.batch_hash,
            answer: v.verdict,
            pending: None,
        }))
    }

    /// Loads the state a request is judged against, runs `call`, and
    /// persists everything it changed in one transaction before returning
    /// the answer.
    async fn judge<F>(
        &self,
        ctx: Ctx,
        stored: Option<LoggedVerdict>,
        call: F,
    ) -> Result<Bytes, ServiceError>
    where
        F: FnOnce(
            &Verifier,
            BatchState<'_>,
            &LoadedRegistry,
            &mut OneLog,
            u64,
        ) -> Result<crate::protocol::verifier::BatchOutput, VerifierError>,
    {
        let group = ctx.group;
        let ids = ctx.ids.clone();
        let gateway = ctx.log_gateway.clone();
        let mut log = OneLog {
            stored: stored.map(|s| (ctx.key, s)),
            filed: None,
        };
        // A retry of a final batch verdict needs no state at all.
        if ctx.via.is_some()
            && let Some((_, rec)) = &log.stored
            && rec.pending.is_none()
        {
            if rec.request_hash == ctx.hash {
                return Ok(Bytes::from(rec.answer.clone()));
            }
            return Err(ServiceError::Conflict(format!(
                "batch id {} was already used for a different batch",
                ctx.batch_id
            )));
        }
        let t_read = Instant::now();
        // Uplinks are judged on the session slots alone (the verifier looks
        // no member up for them), so they ask the registry for no member:
        // with a current copy the read fetches none, and the batch gets
        // none. A stale copy is read again whole, as for any batch.
        let asked: &[MemberId] = if ctx.round.is_none() { &[] } else { &ids };
        let fetch = self
            .registry_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .fetch(asked);
        let read = self
            .store
            .batch_reads(group, ids.iter().map(|m| m.0).collect(), ctx.round, fetch)
            .await?;
        let (group_state, group_row) = match read.group {
            Some(row) => (self.open(&aad::group(group), &row.state)?, row),
            // A direct submission (no certificate) creates nothing: in a
            // group that was never used no entry can be accepted.
            None if ctx.via.is_none() => {
                return Err(ServiceError::BadRequest("no such group".into()));
            }
            // First use: created.
            None => self.load_group(group).await?,
        };
        let registry =
            self.registry_for(asked, read.registry_version, read.members_of, read.members)?;
        let (mut sessions, versions) = self.sessions_from(group, &ids, read.sessions)?;
        let mut round = match ctx.round {
            Some(r) => self.round_from(group, r, read.round).await?,
            None => None,
        };
        // The store's truth of who was accepted in this round is each
        // member's slot (another process may have accepted some since this
        // process cached the round); the write is compare-and-set on it.
        if let Some((rs, _)) = round.as_mut() {
            for (id, read) in &versions.0 {
                if read.rounds.contains(rs.round) {
                    rs.accepted.insert(*id);
                }
            }
        }
        self.metrics
            .store
            .get(StoreOp::Read)
            .observe(t_read.elapsed().as_secs_f64());
        let now_ms = now_ms();
        let t_verify = Instant::now();
        let out = call(
            &self.verifier,
            BatchState {
                group: &group_state,
                round: round.as_mut().map(|(s, _)| s),
                sessions: &mut sessions,
            },
            &registry,
            &mut log,
            now_ms / 1000,
        );
        let out = match out {
            Ok(out) => out,
            Err(e) => {
                // Refused as a whole, nothing changed: the round state goes
                // back into the cache (a hostile gateway's bad batches must
                // not force a rebuild from the store each time).
                if let (VerifierError::Peer(_), Some((rs, _))) = (&e, round.take()) {
                    self.rounds.lock().await.insert((group, rs.round), rs);
                }
                return Err(map_verifier_error(e));
            }
        };
        self.metrics
            .batch_verify
            .observe(t_verify.elapsed().as_secs_f64());
        let answer = out.answer.clone();
        let mut slots = SlotWrites::new(group, &versions);
        let mut counts = BatchCounts::default();
        let mut write = BatchWrite {
            now_ms,
            ..BatchWrite::default()
        };
        let mut via = Via {
            gateway: ctx.via.clone().unwrap_or_default(),
            batches: u64::from(stored_is_none(&log)),
            entries: ids.len() as u64,
            ..Via::default()
        };
        let filed = log.filed.take();
        if matches!(
            out.event,
            BatchEvent::Replayed | BatchEvent::TagsRequested { .. }
        ) && let Some((rs, _)) = round.take()
        {
            // Unchanged: back into the cache.
            self.rounds.lock().await.insert((group, rs.round), rs);
        }
        match out.event {
            BatchEvent::Replayed => return Ok(answer),
            BatchEvent::TagsRequested { chunks } => {
                let Some((_, rec)) = filed else {
                    return Err(ServiceError::Internal("nothing filed".into()));
                };
                let pending = rec
                    .pending
                    .as_ref()
                    .ok_or_else(|| ServiceError::Internal("tag request without pending".into()))?;
                write.verdict = Some(VerdictWrite {
                    gateway: gateway.clone(),
                    batch_id: ctx.log_batch_id,
                    batch_hash: rec.request_hash,
                    verdict: rec.answer.clone(),
                    pending: Some(PendingWrite {
                        pending: self.seal(&aad::pending(&gateway, ctx.log_batch_id), pending)?,
                        expires_at_ms: now_ms + self.localize_timeout_ms,
                    }),
                });
                via.localizations = chunks.len() as u64;
                if let Some(r) = ctx.round {
                    write.round_localizations.push(store::RoundLocalizations {
                        group,
                        round: r,
                        chunks: chunks.len() as u64,
                    });
                }
                via.entries = 0;
                write.via = ctx.via.is_some().then_some(via);
                if let Some(stored) = self.apply_verdict(write, &gateway, &ctx).await? {
                    return Ok(stored);
                }
                return Ok(answer);
            }
            BatchEvent::Responses(v) => {
                let outcomes = match &v.verdict.body {
                    crate::protocol::wire::VerdictBody::Final { outcomes, .. } => outcomes.clone(),
                    crate::protocol::wire::VerdictBody::TagsRequested { .. } => Vec::new(),
                };
                let round_no = ctx.round.unwrap_or(0);
                let mode = ctx.mode;
                write.outcomes.reserve_exact(outcomes.len());
                for (id, o) in ids.iter().zip(&outcomes) {
                    counts.outcomes.push((*o, mode));
                    // A direct submission comes without a certificate:
                    // anyone can send one naming any member and round, so
                    // only its acceptance is recorded (a refusal would
                    // grow the store and show in the round's report).
                    if ctx.via.is_none() && *o != Outcome::Accepted {
                        continue;
                    }
                    let kind = match o {
                        Outcome::Accepted => OutcomeKind::Accepted,
                        Outcome::UnverifiedViaGateway => OutcomeKind::Unverified,
                        _ => OutcomeKind::Rejected,
                    };
                    write.outcomes.push(OutcomeRow {
                        group,
                        round: round_no,
                        member: id.0,
                        kind,
                        reason: std::borrow::Cow::Borrowed(outcome_reason(*o)),
                        // The store fills it from `write.via` (no copy
                        // of the gateway id per member).
                        gateway: None,
                    });
                }
                via.accepted = u64::from(v.counters.count(Outcome::Accepted));
                via.unverified = u64::from(v.counters.unverified());
                for reading in &v.readings {
                    write.readings.push(ReadingRow {
                        member: reading.id.0,
                        group,
                        sid: [0; 8],
                        ctr: round_no,
                        ts_ms: now_ms,
                        kind: 0,
                        payload: reading.payload.clone(),
                    });
                }
                counts.readings += v.readings.len() as u64;
                counts.ecdhe_missed.clone_from(&v.ecdhe_missed);
                // Members seen answering under a key version a key update
                // issued: the older versions are no longer accepted.
                counts.kv_confirmed = v.kv_confirmed.len() as u64;
                write
                    .key_versions
                    .extend(v.kv_confirmed.iter().map(|(id, kv)| {
                        store::KeyVersionChange::Confirmed {
                            member: id.0,
                            kv: *kv,
                        }
                    }));
                // Touched = accepted: each slot write records the round.
                for id in &v.touched {
                    if let Some(slot) = sessions.get(GroupId(group), *id) {
                        self.push_slot(&mut slots, *id, slot, Some((now_ms, round_no)));
                    }
                }
                // The confirms go down to the member through its gateway,
                // in the verdict it answers to the gateway. Only a verdict
                // finalized here on the UDC's own (a localization that
                // expired) also queues them on the gateway's downlink; the
                // gateway, which keeps the batch until a final verdict,
                // gets them in the stored verdict as well. A confirm still
                // goes ahead of any rekey or key update issued after it: the
                // session slot keeps the pending session's confirm, and
                // `rekey_into` and `key_update` queue it again right before
                // those (docs/protocol.md, "Confirm before rekey").
                if let crate::protocol::wire::VerdictBody::Final { confirms, .. } = &v.verdict.body
                    && !ctx.answered
                {
                    let records = confirms
                        .iter()
                        .map(|c| DownlinkRecord::to_member(c.id.0, group, &c.to_bytes()))
                        .collect::<Vec<_>>();
                    if let (false, Some(gw)) = (records.is_empty(), &ctx.via) {
                        write.downlink.push(DownlinkPush {
                            target: DownlinkTarget::Gateway(gw.clone()),
                            records,
                        });
                    }
                }
            }
            BatchEvent::Uplinks(v) => {
                if let VerdictBody::Final { outcomes, .. } = &v.verdict.body {
                    via.accepted =
                        outcomes.iter().filter(|o| **o == Outcome::Accepted).count() as u64;
                    // Rejected uplinks count by reason; accepted ones are
                    // not authentications.
                    for o in outcomes.iter().filter(|o| **o != Outcome::Accepted) {
                        counts.outcomes.push((*o, Mode::Psk));
                    }
                }
                write.readings.reserve_exact(v.messages.len());
                for m in &v.messages {
                    write.readings.push(ReadingRow {
                        member: m.id.0,
                        group,
                        sid: m.sid.0,
                        ctr: m.ctr,
                        ts_ms: now_ms,
                        kind: m.kind.code(),
                        payload: m.payload.clone(),
                    });
                }
                counts.readings += v.messages.len() as u64;
                for a in &v.acks {
                    write.acks.push(store::AckRow {
                        group: a.group.0,
                        seq: a.seq,
                        member: a.member.0,
                        at_ms: now_ms,
                    });
                }
                counts.acks += v.acks.len() as u64;
                // Slots whose window moved are written back: as a use
                // beside the sealed slot when every accepted entry of the
                // member came under one session (the usual case: a batch
                // holds one or two readings per member), else resealed
                // whole. The others named (every entry of theirs refused)
                // are only checked: rewritten, their versions would move
                // for an entry anyone can send, and honest batches judged
                // elsewhere meanwhile would conflict.
                for (id, sid) in v.touched.iter().zip(&v.sole_sid) {
                    if let Some(slot) = sessions.get(GroupId(group), *id) {
                        match sid {
                            Some(sid) => self.push_use(&mut slots, *id, slot, *sid),
                            None => self.push_slot(&mut slots, *id, slot, None),
                        }
                    }
                }
                // In id order, as the batch's entries (a structural rule).
                let touched = &v.touched;
                debug_assert!(touched.is_sorted());
                let mut seen: Vec<MemberId> = ids.clone();
                seen.sort_unstable();
                seen.dedup();
                for id in seen {
                    if touched.binary_search(&id).is_err()
                        && let Some(read) = versions.0.get(&id)
                        && read.version > 0
                    {
                        write.slot_checks.push(store::SlotCheck {
                            member: id.0,
                            group,
                            version: read.version,
                        });
                    }
                }
            }
        }
        if let Some((_, rec)) = filed {
            write.verdict = Some(VerdictWrite {
                gateway: gateway.clone(),
                batch_id: ctx.log_batch_id,
                batch_hash: rec.request_hash,
                verdict: rec.answer,
                pending: None,
            });
        }
        // Judged against this epoch: a revocation or rekey that another
        // process committed since the read fails the write (busy, retry).
        write.group_epochs.push((group, group_row.epoch));
        // Judged as open: closed by another process meanwhile, the write
        // fails (busy) and the retry refuses the entries as late.
        if let Some((rs, _)) = &round {
            write.open_rounds.push((group, rs.round));
        }
        write.via = ctx.via.is_some().then_some(via);
        write.sessions = std::mem::take(&mut slots.rows);
        write.slot_uses = std::mem::take(&mut slots.uses);
        self.pre_write.run().await;
        if let Some(stored) = self.apply_verdict(write, &gateway, &ctx).await? {
            // Another process judged this batch first: its answer stands,
            // and this process's view of the round is stale.
            self.rounds
                .lock()
                .await
                .remove(&(group, ctx.round.unwrap_or(0)));
            return Ok(stored);
        }
        // Counted once the write has committed: a write that fails is
        // answered 503 and judged again on the gateway's retry.
        self.metrics.sessions_active.add(slots.active_delta);
        self.metrics.readings.inc_by(counts.readings);
        self.metrics.acks.inc_by(counts.acks);
        self.metrics
            .key_updates
            .get(crate::telemetry::KeyUpdateEvent::Confirmed)
            .inc_by(counts.kv_confirmed);
        for (o, mode) in counts.outcomes {
            self.count_outcome(o, mode);
        }
        if !counts.ecdhe_missed.is_empty() {
            // psk-ecdhe rounds they did not answer, then a psk round they
            // did: their gateway may be dropping psk-ecdhe challenges to
            // keep them off forward secrecy.
            self.metrics
                .gateway_misbehaviour
                .get(crate::telemetry::MisbehaviourKind::DroppedEcdhe)
                .inc_by(counts.ecdhe_missed.len() as u64);
            let shown: Vec<_> = counts.ecdhe_missed.iter().take(8).collect();
            tracing::warn!(
                gateway = %gateway,
                group,
                members = counts.ecdhe_missed.len(),
                first = ?shown,
                "members answered a psk round after missing psk-ecdhe rounds in a row (member, rounds missed); their gateway may be dropping psk-ecdhe challenges"
            );
        }
        self.keep_slots(group, std::mem::take(&mut slots.marks), &mut sessions);
        // The accepted set lives in the hot cache; the members' session
        // slots (accepted rounds) are its truth (see `judge`'s read).
        if let Some((rs, _)) = round {
            self.rounds.lock().await.insert((group, rs.round), rs);
        }
        Ok(answer)
    }

    fn count_outcome(&self, o: Outcome, mode: Mode) {
        use crate::telemetry::RejectReason as R;
        let reason = match o {
            Outcome::Accepted => {
                let label = match mode {
                    Mode::Psk => ModeLabel::Psk,
                    Mode::PskEcdhe => ModeLabel::PskEcdhe,
                };
                self.metrics.members_authenticated.get(label).inc();
                return;
            }
            Outcome::UnknownMember | Outcome::NotInGroup | Outcome::Revoked => R::UnknownMember,
            Outcome::RoundNotOpen | Outcome::StaleKeyVersion => R::StaleRound,
            Outcome::AlreadyAccepted | Outcome::ReplayedCounter => R::Replay,
            Outcome::UnverifiedViaGateway => R::BadTag,
            Outcome::UnknownSession | Outcome::MalformedPayload => R::Malformed,
        };
        self.metrics.entries_rejected.get(reason).inc();
    }

    /// Seals `slot` of member `id` into `w`, compare-and-set against the
    /// version and accepted rounds it was read at. `accepted`: the member
    /// was just accepted (at this time, in this round).
    fn push_slot(
        &self,
        w: &mut SlotWrites<'_>,
        id: MemberId,
        slot: &SessionSlot,
        accepted: Option<(u64, u64)>,
    ) {
        let read = w.versions.0.get(&id).copied().unwrap_or_default();
        let newest = slot.pending.as_ref().or(slot.current.as_ref());
        let state = match newest {
            Some(_) => self.seal_slot(&mut w.rng, &aad::session(id.0, w.group), slot),
            None => Sealed::default(),
        };
        if let Some(mark) = SealMark::of(state.as_bytes()) {
            w.marks.push((id, mark, None));
        }
        w.active_delta += i64::from(newest.is_some()) - i64::from(read.active);
        w.rows.push(SessionRow {
            member: id.0,
            group: w.group,
            sid: newest.map(|s| s.sid.0),
            state,
            round: newest.map_or(0, |s| s.round),
            authenticated_at_ms: accepted.map(|a| a.0),
            version: read.version,
            rounds: read.rounds,
            accepted_in: accepted.map(|a| a.1),
            use_read: read.used,
        });
    }

    /// Records what accepted uplinks all under `sid` changed in member
    /// `id`'s stored slot as a use ([`SlotUse`]) in `w`, leaving the sealed
    /// state as read; or, when that cannot stand for the change (no stored
    /// slot, or `sid` not in it), seals the whole slot with
    /// [`Self::push_slot`].
    fn push_use(&self, w: &mut SlotWrites<'_>, id: MemberId, slot: &SessionSlot, sid: SessionId) {
        let read = w.versions.0.get(&id).copied().unwrap_or_default();
        // A mark means a stored sealing, so a version of at least 1.
        let (Some(mark), Some(session)) = (read.mark, slot.by_sid(sid)) else {
            return self.push_slot(w, id, slot, None);
        };
        let new = SlotUse {
            sid: sid.0,
            top: session.window.top,
            seen: session.window.seen,
        };
        w.marks.push((id, mark, Some(new)));
        w.uses.push(UseWrite {
            member: id.0,
            group: w.group,
            base: read.version,
            read: read.used,
            new,
        });
    }

    /// Replaces gateway `gateway`'s group subscriptions. For each group
    /// newly added, the challenge of every open round of that group is
    /// queued to the gateway in the same store transaction (the round's
    /// fan-out reached only the subscribers of its time). A member handed
    /// the same challenge twice re-sends its stored response byte for byte
    /// (src/protocol/member, `Challenged::Resend`).
    pub async fn subscribe(&self, gateway: &str, groups: Vec<u32>) -> Result<(), ServiceError> {
        let queued = self
            .store
            .set_subscriptions(gateway, groups, now_ms())
            .await?;
        if queued > 0 {
            self.wake_downlink([gateway]);
        }
        Ok(())
    }

    /// Records of `gateway`'s queue after `after`, framed (HTTP.md records
    /// framing). Empty when none.
    pub async fn downlink(&self, gateway: &str, after: u64) -> Result<Vec<u8>, ServiceError> {
        let records = self.store.read_downlink(gateway, after, 1024).await?;
        let mut out = Vec::new();
        for r in records {
            out.extend_from_slice(&r.cursor.to_be_bytes());
            let (aud, member) = match r.record.audience {
                Audience::Group => (1u8, 0u64),
                Audience::Member(m) => (2u8, m),
            };
            out.push(aud);
            out.extend_from_slice(&r.record.group.to_be_bytes());
            out.extend_from_slice(&member.to_be_bytes());
            out.extend_from_slice(&(r.record.message.len() as u32).to_be_bytes());
            out.extend_from_slice(&r.record.message);
        }
        Ok(out)
    }
}

/// The Verdict answering a direct submission: a batch of one of gateway
/// `direct`, batch id 0, whose hash is that of the inner message.
fn direct_verdict(hash: [u8; 32], outcome: Outcome, confirm: Option<Confirm>) -> Bytes {
    Verdict {
        gateway_id: crate::protocol::verifier::direct_gateway_id(),
        batch_id: 0,
        batch_hash: hash,
        body: VerdictBody::Final {
            outcomes: vec![outcome],
            confirms: confirm.into_iter().collect(),
        },
    }
    .to_bytes()
}

/// The judging context of a gateway's batch.
fn batch_ctx(batch: &ReceivedBatch, answered: bool) -> Ctx {
    let b = batch.batch();
    let gateway = b.gateway_id.as_str().to_owned();
    Ctx {
        via: Some(gateway.clone()),
        answered,
        log_gateway: gateway,
        log_batch_id: b.batch_id,
        batch_id: b.batch_id,
        group: b.group.0,
        ids: batch.member_ids(),
        round: batch.round(),
        mode: match b.body {
            BatchBody::Responses { mode, .. } => mode,
            BatchBody::Uplinks { .. } => Mode::Psk,
        },
        hash: batch.hash(),
        key: batch.log_key(),
    }
}

/// The reason code stored with an outcome (its variant name).
fn outcome_reason(o: Outcome) -> &'static str {
    match o {
        Outcome::Accepted => "Accepted",
        Outcome::UnknownMember => "UnknownMember",
        Outcome::NotInGroup => "NotInGroup",
        Outcome::RoundNotOpen => "RoundNotOpen",
        Outcome::AlreadyAccepted => "AlreadyAccepted",
        Outcome::Revoked => "Revoked",
        Outcome::UnverifiedViaGateway => "UnverifiedViaGateway",
        Outcome::StaleKeyVersion => "StaleKeyVersion",
        Outcome::ReplayedCounter => "ReplayedCounter",
        Outcome::UnknownSession => "UnknownSession",
        Outcome::MalformedPayload => "MalformedPayload",
    }
}

fn stored_is_none(log: &OneLog) -> bool {
    log.stored.is_none()
}

/// The sealing identity of an imported member key.
pub(crate) fn member_aad(id: u64) -> Vec<u8> {
    let mut v = b"members\0".to_vec();
    v.extend_from_slice(&id.to_be_bytes());
    v
}

fn map_verifier_error(e: VerifierError) -> ServiceError {
    use crate::protocol::verifier::BatchError as B;
    match e {
        VerifierError::Peer(B::BatchIdReused { batch_id, .. }) => ServiceError::Conflict(format!(
            "batch id {batch_id} was already used for a different batch"
        )),
        VerifierError::Peer(B::TagReplyMismatch { batch_id }) => ServiceError::Conflict(format!(
            "the tag reply names another batch hash than batch {batch_id}"
        )),
        VerifierError::Peer(B::UnknownBatch { batch_id, .. }) => {
            ServiceError::NotFound(format!("no localization is pending for batch {batch_id}"))
        }
        VerifierError::Peer(other) => ServiceError::BadRequest(other.to_string()),
        VerifierError::Usage(u) => ServiceError::Internal(u.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_days_zero_keeps_forever() {
        let r = Retention::from_days(400, 0);
        assert_eq!(r.readings_ms, Some(400 * 86_400_000));
        assert_eq!(r.verdicts_ms, None);
        assert_eq!(
            Retention::from_days(u64::MAX, 1).readings_ms,
            Some(u64::MAX)
        );
    }

    #[test]
    fn buffered_rng_hands_each_byte_out_once() {
        use rand_core::Rng as _;
        let mut r = BufferedRng::new();
        let mut seen = Vec::new();
        // Across several refills, in odd-sized pieces.
        for n in [12, 500, 7, 512, 1, 1000] {
            let mut b = vec![0u8; n];
            r.fill_bytes(&mut b);
            seen.push(b);
        }
        let all: Vec<u8> = seen.concat();
        assert_eq!(all.len(), 2032);
        // 16-byte windows of fresh randomness never repeat.
        let mut windows: Vec<&[u8]> = all.chunks(16).collect();
        windows.sort_unstable();
        windows.dedup();
        assert_eq!(windows.len(), all.len().div_ceil(16));
        // What was handed out is wiped from the buffer.
        assert!(r.buf[..r.used].iter().all(|b| *b == 0));
        assert_ne!(r.next_u64(), r.next_u64());
    }
}
