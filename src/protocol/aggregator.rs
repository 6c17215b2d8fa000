//! The gateway's collector and batcher: the middle of
//! `member --seal--> gateway --aggregate--> udc --verify`.
//!
//! The gateway (DAP) receives each member's [`Response`] or [`Uplink`],
//! collects them per `(group, round)` and per group uplink stream, and cuts
//! [`Batch`]es for the verifier: entries sorted strictly increasing, tags
//! stripped, one `suite::aggregate` per chunk of `c` entries. It keeps the
//! individual tags ([`KeptTags`]) until the verdict, and answers the
//! verifier's tag requests from them ([`answer_tag_request`]).
//!
//! Nothing here holds or names a key: the aggregator sees only public bytes
//! (ciphertexts, tags, ids). A gateway that misbehaves can delay or drop, and
//! the verifier's checks catch everything else; this module exists so that an
//! honest gateway produces batches the verifier accepts in one pass.
//!
//! # Conflicting entries
//!
//! Holding no keys, the gateway cannot tell a member's message from garbage
//! another device on the member side sent under the member's id. So it never
//! lets the first message for a member id (responses) or for an
//! `(id, sid, ctr)` (uplinks) stand alone: a different message for the same
//! key is held as an alternative, up to [`MAX_VARIANTS`] per key (each
//! counted in `max_held_entries`), and sent in a later batch, since a batch
//! carries each key once. V judges each on its own tag; its already-accepted
//! check and replay window keep a second valid one from having an effect.
//! A pending alternative makes its round due after `uplink_linger` (a
//! follow-up batch right after the main one, with its own batch id);
//! uplink alternatives linger like any uplink. Byte-identical re-sends are
//! absorbed. Past the cap, [`CollectError::ConflictingResponse`] /
//! [`CollectError::ConflictingUplink`].
//!
//! Sans-IO, quinn style: time comes in as `now`, batch ids come from a
//! caller-provided [`BatchIdSource`], and outputs are plain values.
//!
//! # Call order
//!
//! 1. When the gateway relays a challenge: [`Aggregator::expect`] with the
//!    round's group, number, mode, the members attached, and a deadline.
//! 2. For every member message: [`Aggregator::handle_response`] /
//!    [`Aggregator::handle_uplink`] (or [`Aggregator::handle_bytes`]). The
//!    caller spools the entry durably *before* acknowledging the member; the
//!    per-entry `handle` (e.g. the spool's entry id) comes back in the batch.
//! 3. After every `handle_*` call and whenever [`Aggregator::poll_timeout`]
//!    passes: call [`Aggregator::poll_batch`] until it returns `None`, then
//!    [`Aggregator::poll_closed_round`] until it returns `None`.
//! 4. Seal each [`ReadyBatch`] in the spool (bytes and tags) before sending
//!    it; on a verdict asking for tags, [`answer_tag_request`].
//! 5. After a restart: [`Aggregator::restore`] from the spool's unbatched
//!    entries and the rounds still open.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};

use super::codec::DecodeError;
use super::suite;
use super::wire::{
    Batch, BatchBody, BatchKind, ChunkTags, GatewayId, GroupId, MAX_BATCH_ENTRIES, MAX_CHUNK_SIZE,
    MAX_PAYLOAD, MAX_TAG_REQUEST_CHUNKS, MemberId, Message, Mode, Response, SessionId, TagReply,
    Uplink, Verdict, VerdictBody,
};

/// Most distinct messages held for one response key (member id in a round)
/// or uplink key `(id, sid, ctr)`: the first plus alternatives (see the
/// module doc, "Conflicting entries").
pub const MAX_VARIANTS: usize = 4;

/// How the aggregator cuts batches and bounds its memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AggregatorConfig {
    /// This gateway's id, written into every batch.
    pub gateway_id: GatewayId,
    /// Chunk size `c`: entries per aggregate, 1..=[`MAX_CHUNK_SIZE`]. Smaller
    /// chunks localize a bad entry with fewer tags; larger chunks send fewer
    /// aggregates.
    pub chunk_size: u16,
    /// Size cap: a batch is cut as soon as this many entries are pending,
    /// 1..=[`MAX_BATCH_ENTRIES`].
    pub max_batch_entries: usize,
    /// How long the first pending uplink of a group waits for company.
    pub uplink_linger: Duration,
    /// How long a batched uplink is remembered, so that a member's
    /// byte-identical re-send is absorbed instead of batched again.
    pub uplink_dedup_window: Duration,
    /// Most open rounds at once, and apart from them most uplink streams
    /// at once (bounds what hostile group ids can make the gateway
    /// allocate). Two budgets: uplinks for made-up groups, which any
    /// member-side client can send, cannot take the room of the rounds the
    /// UDC opens.
    pub max_collectors: usize,
    /// Most entries held at once (pending, plus remembered for duplicate
    /// detection); new entries beyond it are refused with
    /// [`CollectError::Full`].
    pub max_held_entries: usize,
}

impl AggregatorConfig {
    /// Defaults: `c = 64`, the protocol's entry cap, 200 ms linger, 60 s
    /// de-duplication window, 4,096 collectors, 65,536 held entries.
    pub fn new(gateway_id: GatewayId) -> Self {
        Self {
            gateway_id,
            chunk_size: 64,
            max_batch_entries: MAX_BATCH_ENTRIES,
            uplink_linger: Duration::from_millis(200),
            uplink_dedup_window: Duration::from_secs(60),
            max_collectors: 4096,
            max_held_entries: 4 * MAX_BATCH_ENTRIES,
        }
    }

    /// Checks every field against its range, naming the first bad one.
    pub fn validate(&self) -> Result<(), UsageError> {
        if !(1..=MAX_CHUNK_SIZE).contains(&usize::from(self.chunk_size)) {
            return Err(UsageError::Config("chunk_size must be 1..=1024"));
        }
        if !(1..=MAX_BATCH_ENTRIES).contains(&self.max_batch_entries) {
            return Err(UsageError::Config("max_batch_entries must be 1..=16384"));
        }
        if self.max_collectors == 0 {
            return Err(UsageError::Config("max_collectors must be at least 1"));
        }
        if self.max_held_entries < self.max_batch_entries {
            return Err(UsageError::Config(
                "max_held_entries must be at least max_batch_entries",
            ));
        }
        Ok(())
    }
}

/// A member message could not be collected. The entry is not held; the
/// gateway answers the member with an error and drops the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CollectError {
    /// The bytes are not a Response or Uplink, or break a cap (a payload over
    /// [`MAX_PAYLOAD`]). Usually a buggy or hostile member.
    #[error("malformed member message: {0}")]
    Malformed(#[from] DecodeError),
    /// No round `(group, round)` is expected: the gateway did not relay that
    /// challenge, or the response names a group this gateway does not serve.
    /// Usually a member answering a challenge it got elsewhere, or forging.
    #[error("no round {round} of group {group} is open at this gateway")]
    UnknownRound {
        /// As named by the response.
        group: GroupId,
        /// As named by the response.
        round: u64,
    },
    /// The round's deadline has passed and its entries were sent. Usually a
    /// slow member.
    #[error("round {round} of group {group} is closed")]
    RoundClosed {
        /// As named by the response.
        group: GroupId,
        /// As named by the response.
        round: u64,
    },
    /// The response's mode (psk or psk-ecdhe) is not the round's. Collecting
    /// it would make the whole batch structurally invalid.
    #[error("response mode does not match round {round} of group {group}")]
    ModeMismatch {
        /// As named by the response.
        group: GroupId,
        /// As named by the response.
        round: u64,
    },
    /// [`MAX_VARIANTS`] different responses are already held under this
    /// member id for this round. A member seals one response per round, so
    /// all but one are forgeries (or from a member that lost its state);
    /// the held ones all go to V, which judges each.
    #[error("member {id} already sent a different response for round {round} of group {group}")]
    ConflictingResponse {
        /// The member.
        id: MemberId,
        /// The group.
        group: GroupId,
        /// The round.
        round: u64,
    },
    /// [`MAX_VARIANTS`] different uplinks are already held with this member,
    /// session and counter. A member never reuses a counter, so all but one
    /// are forgeries; the held ones all go to V, which judges each.
    #[error("member {id} already sent a different uplink with counter {ctr} in session {sid}")]
    ConflictingUplink {
        /// The member.
        id: MemberId,
        /// The session.
        sid: SessionId,
        /// The counter.
        ctr: u64,
    },
    /// The aggregator holds `max_held_entries` entries. Usually the upstream
    /// is slow or down; the member should retry later.
    #[error("the aggregator holds {0} entries, its cap; retry later")]
    Full(usize),
    /// A new uplink stream would exceed `max_collectors` uplink streams.
    /// Usually uplinks for many bogus group ids.
    #[error("{0} uplink streams are open, the cap")]
    TooManyCollectors(usize),
}

/// The gateway code called the aggregator wrongly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UsageError {
    /// An [`AggregatorConfig`] field is out of range (named in the message).
    #[error("invalid aggregator config: {0}")]
    Config(&'static str),
    /// The [`BatchIdSource`] returned an id not above the last one used.
    /// Usually a batch-id high-water mark that was not persisted or was
    /// restored from an old backup; sending would make the verifier refuse
    /// the batch as a reused id.
    #[error("batch id source returned {got}, not above the last id {last}")]
    BatchIdNotIncreasing {
        /// The last id used.
        last: u64,
        /// The id returned.
        got: u64,
    },
    /// [`Aggregator::expect`] for a round at or below one already closed for
    /// that group. Usually a challenge relayed twice after its deadline.
    #[error("round {round} of group {group} is already closed")]
    RoundClosed {
        /// The group.
        group: GroupId,
        /// The round.
        round: u64,
    },
    /// [`Aggregator::expect`] again for an open round, with another mode.
    #[error("round {round} of group {group} is open with another mode")]
    ModeMismatch {
        /// The group.
        group: GroupId,
        /// The round.
        round: u64,
    },
    /// A new round would exceed `max_collectors` open rounds.
    #[error("{0} rounds are open, the cap")]
    TooManyCollectors(usize),
}

/// A verifier's tag request cannot be answered from these tags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TagRequestError {
    /// The sealed batch bytes given to [`KeptTags::from_sealed`] do not
    /// decode. Usually a corrupted spool.
    #[error("sealed batch does not decode: {0}")]
    Malformed(#[from] DecodeError),
    /// The number of kept tags is not the batch's entry count. Usually a
    /// corrupted spool.
    #[error("{found} tags kept for a batch of {expected} entries")]
    TagCount {
        /// Entries in the batch.
        expected: usize,
        /// Tags kept.
        found: usize,
    },
    /// The verdict names another gateway, batch id or batch hash. Usually a
    /// verdict routed to the wrong batch.
    #[error("the verdict is for another batch")]
    WrongBatch,
    /// The verdict is final; it requests no tags.
    #[error("the verdict is final and requests no tags")]
    NotATagRequest,
    /// The verdict names a chunk the batch does not have.
    #[error("chunk {0} is out of range")]
    ChunkOutOfRange(u32),
    /// The verdict names no chunk, too many, or not strictly increasing.
    #[error("the tag request's chunk list is empty, too long or not strictly increasing")]
    InvalidRequest,
}

/// Whether a collected message was new or an absorbed re-send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Collected {
    /// A new entry; it will be in a batch. Spool it.
    New,
    /// A byte-identical re-send of an entry already held; nothing changed
    /// (its handle is the first one's).
    Duplicate,
}

/// A round the gateway relays a challenge for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoundSpec {
    /// The challenge's group.
    pub group: GroupId,
    /// The challenge's round.
    pub round: u64,
    /// The challenge's mode; responses in the other mode are refused.
    pub mode: Mode,
    /// Members expected to answer (those attached when the challenge was
    /// relayed). Others may answer too; the verifier judges them.
    pub members: Vec<MemberId>,
    /// When to send what arrived and close the round.
    pub deadline: Instant,
}

/// A member message held in the gateway's spool, for [`Aggregator::restore`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpooledEntry {
    /// A response.
    Response(Response),
    /// An uplink.
    Uplink(Uplink),
}

/// Hands out batch ids: strictly increasing per gateway across restarts,
/// persisted by the caller before it returns one (a block reservation is
/// fine). Called only when a batch is actually cut.
pub trait BatchIdSource {
    /// The next batch id.
    fn next_batch_id(&mut self) -> u64;
}

impl<F: FnMut() -> u64> BatchIdSource for F {
    fn next_batch_id(&mut self) -> u64 {
        self()
    }
}

/// Why a batch was cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BatchTrigger {
    /// Every expected member of the round has answered.
    AllAnswered,
    /// The round's deadline passed (this batch closes the round).
    Deadline,
    /// The first pending uplink waited the linger time.
    Linger,
    /// `max_batch_entries` entries were pending.
    SizeCap,
    /// A conflicting response held as an alternative waited `uplink_linger`
    /// (a follow-up batch; see the module doc, "Conflicting entries").
    Alternatives,
}

/// A batch ready to seal in the spool and send to the verifier.
#[must_use = "a cut batch is no longer held by the aggregator"]
#[derive(Clone, Debug)]
pub struct ReadyBatch<H> {
    /// The encoded [`Batch`] message.
    pub bytes: Bytes,
    /// Its batch id (from the [`BatchIdSource`]).
    pub batch_id: u64,
    /// SHA-256 of `bytes`, as the verifier names the batch.
    pub batch_hash: [u8; 32],
    /// Responses or uplinks.
    pub kind: BatchKind,
    /// The group.
    pub group: GroupId,
    /// The round, for a response batch.
    pub round: Option<u64>,
    /// The caller's handle of each entry, in batch order.
    pub handles: Vec<H>,
    /// The individual tags, to keep until the verdict.
    pub tags: KeptTags,
    /// Members expected in the round that never answered; non-empty only in
    /// the batch that closes a round (trigger [`BatchTrigger::Deadline`]).
    /// Each round reports its missing members exactly once: here, or in a
    /// [`ClosedRound`] when nothing was left to send.
    pub missing: Vec<MemberId>,
    /// Why it was cut.
    pub trigger: BatchTrigger,
}

/// A round that reached its deadline with nothing left to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClosedRound {
    /// The group.
    pub group: GroupId,
    /// The round.
    pub round: u64,
    /// Members expected that never answered, sorted.
    pub missing: Vec<MemberId>,
}

/// The individual tags of a sent batch, kept until its final verdict to
/// answer tag requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeptTags {
    /// The gateway that sent the batch.
    pub gateway_id: GatewayId,
    /// The batch id.
    pub batch_id: u64,
    /// SHA-256 of the batch bytes.
    pub batch_hash: [u8; 32],
    /// The batch's chunk size `c`.
    pub chunk_size: u16,
    /// One tag per entry, in batch order.
    pub tags: Vec<[u8; 16]>,
}

impl KeptTags {
    /// Rebuilds kept tags from a sealed batch's exact bytes and its tags in
    /// batch order (what the spool keeps across a restart).
    pub fn from_sealed(batch: &Bytes, tags: Vec<[u8; 16]>) -> Result<Self, TagRequestError> {
        let decoded = Batch::decode(batch)?;
        if decoded.len() != tags.len() {
            return Err(TagRequestError::TagCount {
                expected: decoded.len(),
                found: tags.len(),
            });
        }
        Ok(Self {
            gateway_id: decoded.gateway_id,
            batch_id: decoded.batch_id,
            batch_hash: Sha256::digest(batch).into(),
            chunk_size: decoded.chunk_size,
            tags,
        })
    }

    /// Number of chunks, `ceil(tags / c)`.
    pub fn chunk_count(&self) -> usize {
        match usize::from(self.chunk_size) {
            0 => 0,
            c => self.tags.len().div_ceil(c),
        }
    }

    /// The tags of chunk `k`, if the batch has it.
    pub fn chunk(&self, k: usize) -> Option<&[[u8; 16]]> {
        let c = usize::from(self.chunk_size);
        (k < self.chunk_count()).then(|| &self.tags[k * c..((k + 1) * c).min(self.tags.len())])
    }
}

/// Answers a verdict that requests tags: the kept tags of exactly the named
/// chunks, in the order named. Refuses a verdict for another batch, a final
/// verdict, and chunk indices out of range.
pub fn answer_tag_request(kept: &KeptTags, verdict: &Verdict) -> Result<TagReply, TagRequestError> {
    if verdict.gateway_id != kept.gateway_id
        || verdict.batch_id != kept.batch_id
        || verdict.batch_hash != kept.batch_hash
    {
        return Err(TagRequestError::WrongBatch);
    }
    let VerdictBody::TagsRequested { chunks } = &verdict.body else {
        return Err(TagRequestError::NotATagRequest);
    };
    // A decoded verdict already guarantees this; one built in memory may not.
    if chunks.is_empty()
        || chunks.len() > MAX_TAG_REQUEST_CHUNKS
        || chunks.windows(2).any(|w| w[0] >= w[1])
    {
        return Err(TagRequestError::InvalidRequest);
    }
    let answered = chunks
        .iter()
        .map(|&k| {
            let tags = usize::try_from(k)
                .ok()
                .and_then(|i| kept.chunk(i))
                .ok_or(TagRequestError::ChunkOutOfRange(k))?;
            Ok(ChunkTags {
                chunk: k,
                tags: tags.to_vec(),
            })
        })
        .collect::<Result<Vec<_>, TagRequestError>>()?;
    Ok(TagReply {
        gateway_id: kept.gateway_id,
        batch_id: kept.batch_id,
        batch_hash: kept.batch_hash,
        chunks: answered,
    })
}

/// The duplicate key of an uplink.
type UplinkKey = (MemberId, SessionId, u64);

/// The responses of one round.
#[derive(Debug)]
struct RoundCollector<H> {
    mode: Mode,
    deadline: Instant,
    /// Members attached when the challenge was relayed.
    expected: HashSet<MemberId>,
    /// How many of `expected` are in `answered`.
    expected_answered: usize,
    /// Every response collected in the round (pending or already batched),
    /// per member the first and its alternatives in arrival order (at most
    /// [`MAX_VARIANTS`]), kept until the round closes so re-sends are
    /// absorbed.
    answered: HashMap<MemberId, Vec<Response>>,
    /// Responses in `answered` that are in no batch yet: member, index in
    /// its list, and the caller's handle (small, so sorting moves little
    /// memory).
    pending: Vec<(MemberId, usize, H)>,
    /// When pending alternatives make the round due (arrival plus linger,
    /// or at once for those a cut held back).
    alternatives_at: Option<Instant>,
    /// Responses in `answered`, all variants counted.
    held: usize,
    /// Set once every expected member has answered and all of them are in
    /// batches; later stragglers wait for the deadline instead of going one
    /// by one.
    all_answered_cut: bool,
    /// Opened by [`Aggregator::expect`] (a challenge this gateway relayed),
    /// not only by [`Aggregator::restore`] for a spooled response whose
    /// round was not recorded. Only a relayed round closes its group's
    /// rounds up to its number when it closes: the round number of a
    /// restored response is whatever its sender wrote, and a response for
    /// round 2^64 - 1 left in the spool by a crash would otherwise close
    /// every later round of its group.
    relayed: bool,
    /// When a batch became due without a timer (size cap, all answered).
    ready_at: Option<Instant>,
}

impl<H> RoundCollector<H> {
    fn all_answered(&self) -> bool {
        !self.expected.is_empty() && self.expected_answered == self.expected.len()
    }

    /// Whether a batch is due without waiting for the deadline.
    fn due_now(&self, cap: usize) -> bool {
        self.pending.len() >= cap
            || (!self.pending.is_empty() && self.all_answered() && !self.all_answered_cut)
    }

    fn due(&self, now: Instant, cap: usize) -> Option<BatchTrigger> {
        if self.pending.len() >= cap {
            Some(BatchTrigger::SizeCap)
        } else if now >= self.deadline {
            Some(BatchTrigger::Deadline)
        } else if self.due_now(cap) {
            Some(BatchTrigger::AllAnswered)
        } else if self.alternatives_at.is_some_and(|t| now >= t) {
            Some(BatchTrigger::Alternatives)
        } else {
            None
        }
    }

    fn missing(&self) -> Vec<MemberId> {
        let mut missing: Vec<MemberId> = self
            .expected
            .iter()
            .filter(|id| !self.answered.contains_key(id))
            .copied()
            .collect();
        missing.sort_unstable();
        missing
    }
}

/// The uplinks of one group.
#[derive(Debug)]
struct UplinkStream<H> {
    /// Uplinks in `seen` that are in no batch yet, with the caller's handle
    /// (the value too, as `seen` forgets batched variants from the front).
    pending: Vec<(UplinkKey, Uplink, H)>,
    /// When the oldest pending uplink arrived (the linger clock).
    first_at: Option<Instant>,
    /// When a batch became due by the size cap.
    ready_at: Option<Instant>,
    /// Pending and recently batched uplinks, for duplicate detection: per
    /// key, the batched ones (in batch order) then the pending ones, at
    /// most [`MAX_VARIANTS`].
    seen: HashMap<UplinkKey, Vec<Uplink>>,
    /// Batched uplinks in `seen`, oldest first, with when to forget them
    /// (one entry per batched variant).
    forget: VecDeque<(Instant, UplinkKey)>,
}

impl<H> UplinkStream<H> {
    fn due(&self, now: Instant, cap: usize, linger: Duration) -> Option<BatchTrigger> {
        if self.pending.len() >= cap {
            Some(BatchTrigger::SizeCap)
        } else if self.first_at.is_some_and(|t| now >= t + linger) {
            Some(BatchTrigger::Linger)
        } else {
            None
        }
    }

    /// Forgets batched uplinks whose de-duplication window ended; returns how
    /// many.
    fn prune(&mut self, now: Instant) -> usize {
        let mut n = 0;
        while let Some(&(at, key)) = self.forget.front() {
            if at > now {
                break;
            }
            self.forget.pop_front();
            // Variants are batched in arrival order, so the oldest batched
            // one is the first.
            if let Some(variants) = self.seen.get_mut(&key) {
                if !variants.is_empty() {
                    variants.remove(0);
                    n += 1;
                }
                if variants.is_empty() {
                    self.seen.remove(&key);
                }
            }
        }
        n
    }
}

/// The gateway's collector and batcher (see the module doc for the call
/// order). `H` is the caller's handle for each entry (e.g. its spool id),
/// returned in batch order in [`ReadyBatch::handles`].
#[derive(Debug)]
pub struct Aggregator<H = ()> {
    config: AggregatorConfig,
    rounds: BTreeMap<(GroupId, u64), RoundCollector<H>>,
    streams: BTreeMap<GroupId, UplinkStream<H>>,
    /// Highest round closed per group, so late responses and late `expect`s
    /// get a precise answer instead of opening the round again.
    closed: HashMap<GroupId, u64>,
    /// Rounds closed with nothing to send, for [`Aggregator::poll_closed_round`].
    closed_rounds: VecDeque<ClosedRound>,
    /// Entries held: every round's `answered` plus every stream's `seen`.
    held: usize,
    /// The last batch id used, to refuse a source that goes backwards.
    last_batch_id: Option<u64>,
}

impl<H> Aggregator<H> {
    /// An empty aggregator.
    pub fn new(config: AggregatorConfig) -> Result<Self, UsageError> {
        config.validate()?;
        Ok(Self {
            config,
            rounds: BTreeMap::new(),
            streams: BTreeMap::new(),
            closed: HashMap::new(),
            closed_rounds: VecDeque::new(),
            held: 0,
            last_batch_id: None,
        })
    }

    /// Rebuilds an aggregator after a restart: the rounds the gateway still
    /// relays, and the entries its spool holds that are in no batch yet (with
    /// their handles). A spooled response whose round is not in `rounds` gets
    /// a round with no expected members and deadline `now`, so it goes out on
    /// the next [`Aggregator::poll_batch`]. Spooled uplinks linger from `now`.
    ///
    /// Entries that cannot be collected (a corrupt spool: conflicts, a mode
    /// that disagrees with the round) are returned with their error and
    /// handle, not collected.
    #[allow(clippy::type_complexity)]
    pub fn restore(
        config: AggregatorConfig,
        rounds: impl IntoIterator<Item = RoundSpec>,
        entries: impl IntoIterator<Item = (SpooledEntry, H)>,
        now: Instant,
    ) -> Result<(Self, Vec<(CollectError, H)>), UsageError> {
        let mut agg = Self::new(config)?;
        for spec in rounds {
            agg.expect(spec, now)?;
        }
        let mut refused = Vec::new();
        for (entry, handle) in entries {
            let result = match entry {
                SpooledEntry::Response(r) => {
                    let key = (r.group, r.round);
                    if !agg.rounds.contains_key(&key) {
                        agg.open_round(key, r.mode(), now);
                    }
                    agg.collect_response(r, handle, now)
                }
                SpooledEntry::Uplink(u) => agg.collect_uplink(u, handle, now),
            };
            if let Err((e, h)) = result {
                refused.push((e, h));
            }
        }
        Ok((agg, refused))
    }

    /// The configuration in force.
    pub fn config(&self) -> &AggregatorConfig {
        &self.config
    }

    /// Entries held (pending, or remembered for duplicate detection).
    pub fn held(&self) -> usize {
        self.held
    }

    /// Entries waiting for a batch.
    pub fn pending(&self) -> usize {
        self.rounds.values().map(|r| r.pending.len()).sum::<usize>()
            + self
                .streams
                .values()
                .map(|s| s.pending.len())
                .sum::<usize>()
    }

    /// Opens round `spec` (the gateway is relaying its challenge). Calling it
    /// again for an open round adds members and moves the deadline.
    pub fn expect(&mut self, spec: RoundSpec, now: Instant) -> Result<(), UsageError> {
        let key = (spec.group, spec.round);
        if self
            .closed
            .get(&spec.group)
            .is_some_and(|&r| spec.round <= r)
        {
            return Err(UsageError::RoundClosed {
                group: spec.group,
                round: spec.round,
            });
        }
        if !self.rounds.contains_key(&key) {
            if self.rounds.len() >= self.config.max_collectors {
                return Err(UsageError::TooManyCollectors(self.rounds.len()));
            }
            self.open_round(key, spec.mode, spec.deadline);
        }
        let Some(round) = self.rounds.get_mut(&key) else {
            return Ok(());
        };
        if round.mode != spec.mode {
            return Err(UsageError::ModeMismatch {
                group: spec.group,
                round: spec.round,
            });
        }
        round.deadline = spec.deadline;
        round.relayed = true;
        // Size the tables once for the members expected (bounded by the cap,
        // so a huge member list cannot make the gateway allocate more).
        let room = spec.members.len().min(self.config.max_held_entries);
        round.expected.reserve(room);
        round
            .answered
            .reserve(room.saturating_sub(round.answered.len()));
        round
            .pending
            .reserve(room.min(self.config.max_batch_entries));
        for id in spec.members {
            if round.expected.insert(id) && round.answered.contains_key(&id) {
                round.expected_answered += 1;
            }
        }
        if round.due_now(self.config.max_batch_entries) {
            round.ready_at.get_or_insert(now);
        }
        Ok(())
    }

    /// Collects a member's response (the caller has spooled it, or does so
    /// when this returns [`Collected::New`]).
    pub fn handle_response(
        &mut self,
        response: Response,
        handle: H,
        now: Instant,
    ) -> Result<Collected, CollectError> {
        self.collect_response(response, handle, now)
            .map_err(|(e, _)| e)
    }

    /// Collects a member's uplink. `now` may be when the uplink arrived
    /// rather than the present (the linger of its group's batch counts from
    /// the oldest pending uplink's `now`), but never later than the present.
    pub fn handle_uplink(
        &mut self,
        uplink: Uplink,
        handle: H,
        now: Instant,
    ) -> Result<Collected, CollectError> {
        self.collect_uplink(uplink, handle, now).map_err(|(e, _)| e)
    }

    /// Decodes a member's message (a Response or an Uplink) and collects it.
    pub fn handle_bytes(
        &mut self,
        bytes: &Bytes,
        handle: H,
        now: Instant,
    ) -> Result<Collected, CollectError> {
        match Message::decode(bytes)? {
            Message::Response(r) => self.handle_response(r, handle, now),
            Message::Uplink(u) => self.handle_uplink(u, handle, now),
            other => Err(DecodeError::WrongType(other.message_type().code()).into()),
        }
    }

    /// When [`Aggregator::poll_batch`] should next be called, if anything is
    /// pending or a round is open: a deadline, a linger end, or the time a
    /// batch became due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let rounds = self.rounds.values().map(|r| {
            [r.ready_at, r.alternatives_at]
                .into_iter()
                .flatten()
                .fold(r.deadline, Instant::min)
        });
        let linger = self.config.uplink_linger;
        let streams = self.streams.values().filter_map(|s| {
            let linger_end = s.first_at.map(|t| t + linger);
            match (s.ready_at, linger_end) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        });
        rounds.chain(streams).min()
    }

    /// Cuts the next due batch, if any: sorted, tags stripped, aggregated per
    /// chunk, encoded, with a batch id from `ids` (asked only when a batch is
    /// cut). Rounds whose deadline passed with nothing to send are closed on
    /// the way (see [`Aggregator::poll_closed_round`]). Call until `None`.
    pub fn poll_batch(
        &mut self,
        now: Instant,
        ids: &mut impl BatchIdSource,
    ) -> Result<Option<ReadyBatch<H>>, UsageError> {
        self.prune(now);
        let cap = self.config.max_batch_entries;
        while let Some((key, trigger)) = self
            .rounds
            .iter()
            .find_map(|(k, r)| r.due(now, cap).map(|t| (*k, t)))
        {
            let Some(round) = self.rounds.get_mut(&key) else {
                break;
            };
            if round.pending.is_empty() {
                // Only a deadline makes an empty round due: close it.
                let missing = round.missing();
                self.close_round(key);
                self.closed_rounds.push_back(ClosedRound {
                    group: key.0,
                    round: key.1,
                    missing,
                });
                continue;
            }
            let batch_id = self.take_batch_id(ids)?;
            return Ok(self.cut_round(key, trigger, batch_id, now));
        }
        let linger = self.config.uplink_linger;
        let due = self
            .streams
            .iter()
            .find_map(|(g, s)| s.due(now, cap, linger).map(|t| (*g, t)));
        if let Some((group, trigger)) = due {
            let batch_id = self.take_batch_id(ids)?;
            return Ok(self.cut_stream(group, trigger, batch_id, now));
        }
        Ok(None)
    }

    /// A round that closed at its deadline with nothing left to send, with
    /// its missing members (for metrics). Call after `poll_batch`.
    #[must_use]
    pub fn poll_closed_round(&mut self) -> Option<ClosedRound> {
        self.closed_rounds.pop_front()
    }

    fn open_round(&mut self, key: (GroupId, u64), mode: Mode, deadline: Instant) {
        self.rounds.insert(
            key,
            RoundCollector {
                mode,
                deadline,
                expected: HashSet::new(),
                expected_answered: 0,
                answered: HashMap::new(),
                pending: Vec::new(),
                alternatives_at: None,
                held: 0,
                all_answered_cut: false,
                ready_at: None,
                relayed: false,
            },
        );
    }

    /// Collects a response; on refusal hands back the handle (for restore).
    fn collect_response(
        &mut self,
        response: Response,
        handle: H,
        now: Instant,
    ) -> Result<Collected, (CollectError, H)> {
        let (group, round_no, id) = (response.group, response.round, response.id);
        // A value built in memory may break a cap that decoding enforces;
        // batching it would make the verifier refuse the whole batch.
        if response.c.len() > MAX_PAYLOAD {
            return Err((DecodeError::TooLong("response.c").into(), handle));
        }
        let Some(round) = self.rounds.get_mut(&(group, round_no)) else {
            let e = if self.closed.get(&group).is_some_and(|&r| round_no <= r) {
                CollectError::RoundClosed {
                    group,
                    round: round_no,
                }
            } else {
                CollectError::UnknownRound {
                    group,
                    round: round_no,
                }
            };
            return Err((e, handle));
        };
        if response.mode() != round.mode {
            let e = CollectError::ModeMismatch {
                group,
                round: round_no,
            };
            return Err((e, handle));
        }
        let known = round.answered.get(&id).map_or(&[][..], Vec::as_slice);
        if known.contains(&response) {
            return Ok(Collected::Duplicate);
        }
        if known.len() >= MAX_VARIANTS {
            let e = CollectError::ConflictingResponse {
                id,
                group,
                round: round_no,
            };
            return Err((e, handle));
        }
        if self.held >= self.config.max_held_entries {
            return Err((CollectError::Full(self.held), handle));
        }
        self.held += 1;
        round.held += 1;
        let variants = round.answered.entry(id).or_default();
        let index = variants.len();
        variants.push(response);
        if index == 0 {
            if round.expected.contains(&id) {
                round.expected_answered += 1;
            }
        } else {
            // Another message under a known id: the gateway cannot tell which
            // is real, so this one goes to V too, soon.
            let at = now + self.config.uplink_linger;
            round.alternatives_at = Some(round.alternatives_at.map_or(at, |t| t.min(at)));
        }
        round.pending.push((id, index, handle));
        if round.due_now(self.config.max_batch_entries) {
            round.ready_at.get_or_insert(now);
        }
        Ok(Collected::New)
    }

    /// Collects an uplink; on refusal hands back the handle (for restore).
    fn collect_uplink(
        &mut self,
        uplink: Uplink,
        handle: H,
        now: Instant,
    ) -> Result<Collected, (CollectError, H)> {
        if uplink.c.len() > MAX_PAYLOAD {
            return Err((DecodeError::TooLong("uplink.c").into(), handle));
        }
        let streams = self.streams.len();
        if !self.streams.contains_key(&uplink.group) && streams >= self.config.max_collectors {
            return Err((CollectError::TooManyCollectors(streams), handle));
        }
        let stream = self
            .streams
            .entry(uplink.group)
            .or_insert_with(|| UplinkStream {
                pending: Vec::new(),
                first_at: None,
                ready_at: None,
                seen: HashMap::new(),
                forget: VecDeque::new(),
            });
        self.held -= stream.prune(now);
        let key = (uplink.id, uplink.sid, uplink.ctr);
        let known = stream.seen.get(&key).map_or(&[][..], Vec::as_slice);
        if known.contains(&uplink) {
            return Ok(Collected::Duplicate);
        }
        if known.len() >= MAX_VARIANTS {
            let e = CollectError::ConflictingUplink {
                id: uplink.id,
                sid: uplink.sid,
                ctr: uplink.ctr,
            };
            return Err((e, handle));
        }
        if self.held >= self.config.max_held_entries {
            let e = CollectError::Full(self.held);
            if stream.seen.is_empty() {
                self.streams.remove(&uplink.group);
            }
            return Err((e, handle));
        }
        self.held += 1;
        stream.seen.entry(key).or_default().push(uplink.clone());
        stream.pending.push((key, uplink, handle));
        // Callers may date an uplink by its arrival, and uplinks can reach
        // the aggregator out of that order: the clock runs from the oldest.
        stream.first_at = Some(stream.first_at.map_or(now, |t| t.min(now)));
        if stream.pending.len() >= self.config.max_batch_entries {
            stream.ready_at.get_or_insert(now);
        }
        Ok(Collected::New)
    }

    /// Forgets batched uplinks past their window and drops idle streams.
    fn prune(&mut self, now: Instant) {
        let mut freed = 0;
        self.streams.retain(|_, s| {
            freed += s.prune(now);
            !(s.pending.is_empty() && s.seen.is_empty())
        });
        self.held -= freed;
    }

    fn take_batch_id(&mut self, ids: &mut impl BatchIdSource) -> Result<u64, UsageError> {
        let got = ids.next_batch_id();
        if let Some(last) = self.last_batch_id
            && got <= last
        {
            return Err(UsageError::BatchIdNotIncreasing { last, got });
        }
        self.last_batch_id = Some(got);
        Ok(got)
    }

    fn close_round(&mut self, key: (GroupId, u64)) {
        if let Some(round) = self.rounds.remove(&key) {
            self.held -= round.held;
            if round.relayed {
                let closed = self.closed.entry(key.0).or_insert(key.1);
                *closed = (*closed).max(key.1);
            }
        }
    }

    /// Cuts up to `max_batch_entries` of a round's pending responses (the
    /// lowest ids) into a batch; closes the round when its deadline has
    /// passed and nothing remains.
    fn cut_round(
        &mut self,
        key: (GroupId, u64),
        trigger: BatchTrigger,
        batch_id: u64,
        now: Instant,
    ) -> Option<ReadyBatch<H>> {
        let cap = self.config.max_batch_entries;
        let round = self.rounds.get_mut(&key)?;
        // Lowest ids first, each id once (its oldest pending variant); the
        // other variants wait for a follow-up batch.
        round
            .pending
            .sort_unstable_by_key(|(id, index, _)| (*id, *index));
        let mut rest = Vec::new();
        let mut tags = Vec::new();
        let mut handles = Vec::new();
        let mut entries = Vec::new();
        let mut last = None;
        for (id, index, h) in std::mem::take(&mut round.pending) {
            if entries.len() >= cap || last == Some(id) {
                rest.push((id, index, h));
                continue;
            }
            // Every pending (id, index) is in `answered` (inserted together).
            let Some(r) = round.answered.get(&id).and_then(|v| v.get(index)) else {
                continue;
            };
            last = Some(id);
            tags.push(r.tag);
            handles.push(h);
            entries.push(r.entry());
        }
        round.pending = rest;
        // Alternatives held back have waited already: due at once.
        round.alternatives_at = round
            .pending
            .iter()
            .any(|(_, index, _)| *index > 0)
            .then_some(now);
        let body = BatchBody::Responses {
            round: key.1,
            mode: round.mode,
            entries,
        };
        // Everything that came before the last expected member is out now.
        if round.all_answered() && round.pending.is_empty() {
            round.all_answered_cut = true;
        }
        round.ready_at = round.due_now(cap).then_some(now);
        let closing = now >= round.deadline && round.pending.is_empty();
        let missing = if closing {
            let missing = round.missing();
            self.close_round(key);
            missing
        } else {
            Vec::new()
        };
        Some(self.finish(
            key.0,
            Some(key.1),
            body,
            tags,
            handles,
            missing,
            trigger,
            batch_id,
        ))
    }

    /// Cuts up to `max_batch_entries` of a group's pending uplinks (the
    /// lowest `(id, sid, ctr)`) into a batch.
    fn cut_stream(
        &mut self,
        group: GroupId,
        trigger: BatchTrigger,
        batch_id: u64,
        now: Instant,
    ) -> Option<ReadyBatch<H>> {
        let cap = self.config.max_batch_entries;
        let forget_at = now + self.config.uplink_dedup_window;
        let stream = self.streams.get_mut(&group)?;
        // Lowest keys first, each key once (its oldest pending variant: the
        // sort is stable); the other variants wait for a follow-up batch.
        stream.pending.sort_by_key(|(key, _, _)| *key);
        let mut rest = Vec::new();
        let mut tags = Vec::new();
        let mut handles = Vec::new();
        let mut entries = Vec::new();
        let mut last = None;
        for (key, u, h) in std::mem::take(&mut stream.pending) {
            if entries.len() >= cap || last == Some(key) {
                rest.push((key, u, h));
                continue;
            }
            last = Some(key);
            tags.push(u.tag);
            handles.push(h);
            entries.push(u.entry());
            stream.forget.push_back((forget_at, key));
        }
        stream.pending = rest;
        // Entries left over from a size cap have waited as long as the cut
        // ones; they keep the linger clock.
        if stream.pending.is_empty() {
            stream.first_at = None;
        }
        stream.ready_at = (stream.pending.len() >= cap).then_some(now);
        self.prune(now);
        let body = BatchBody::Uplinks { entries };
        Some(self.finish(
            group,
            None,
            body,
            tags,
            handles,
            Vec::new(),
            trigger,
            batch_id,
        ))
    }

    /// Aggregates per chunk, encodes, hashes.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        group: GroupId,
        round: Option<u64>,
        body: BatchBody,
        tags: Vec<[u8; 16]>,
        handles: Vec<H>,
        missing: Vec<MemberId>,
        trigger: BatchTrigger,
        batch_id: u64,
    ) -> ReadyBatch<H> {
        let chunk_size = self.config.chunk_size;
        let aggregates = tags
            .chunks(usize::from(chunk_size))
            .map(suite::aggregate)
            .collect();
        let batch = Batch {
            gateway_id: self.config.gateway_id,
            batch_id,
            group,
            chunk_size,
            body,
            aggregates,
        };
        debug_assert_eq!(batch.check_structure(), Ok(()));
        let mut out = BytesMut::with_capacity(batch.encoded_len());
        batch.encode(&mut out);
        let bytes = out.freeze();
        let batch_hash: [u8; 32] = Sha256::digest(&bytes).into();
        ReadyBatch {
            kind: batch.kind(),
            bytes,
            batch_id,
            batch_hash,
            group,
            round,
            handles,
            tags: KeptTags {
                gateway_id: self.config.gateway_id,
                batch_id,
                batch_hash,
                chunk_size,
                tags,
            },
            missing,
            trigger,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::wire::{Outcome, UplinkKind};

    const G: GroupId = GroupId(7);

    fn gw() -> GatewayId {
        GatewayId::new("gw-1").unwrap()
    }

    fn cfg(chunk_size: u16, cap: usize) -> AggregatorConfig {
        AggregatorConfig {
            chunk_size,
            max_batch_entries: cap,
            ..AggregatorConfig::new(gw())
        }
    }

    /// A distinct, recognisable tag per (id, salt).
    fn tag(id: u64, salt: u8) -> [u8; 16] {
        let mut t = [salt; 16];
        t[..8].copy_from_slice(&id.to_be_bytes());
        t
    }

    fn resp(id: u64, round: u64, mode: Mode) -> Response {
        Response {
            id: MemberId(id),
            kv: 1,
            group: G,
            round,
            n_i: [id as u8; 16],
            e_i: (mode == Mode::PskEcdhe).then_some([0xEE; 32]),
            c: Bytes::from(vec![id as u8; (id % 5) as usize]),
            tag: tag(id, 0xA0),
        }
    }

    fn upl(id: u64, sid: u8, ctr: u64) -> Uplink {
        Uplink {
            group: G,
            id: MemberId(id),
            sid: SessionId([sid; 8]),
            kind: UplinkKind::Reading,
            ctr,
            c: Bytes::from_static(b"reading"),
            tag: tag(id ^ (ctr << 32) ^ u64::from(sid) << 56, 0xB0),
        }
    }

    fn spec(round: u64, members: impl IntoIterator<Item = u64>, deadline: Instant) -> RoundSpec {
        RoundSpec {
            group: G,
            round,
            mode: Mode::Psk,
            members: members.into_iter().map(MemberId).collect(),
            deadline,
        }
    }

    /// A batch id source counting from 1.
    fn ids() -> impl FnMut() -> u64 {
        let mut next = 0;
        move || {
            next += 1;
            next
        }
    }

    /// Decodes a ready batch and checks everything the verifier relies on:
    /// structure, hash, kept tags, and each aggregate over the right tags.
    fn check(ready: &ReadyBatch<u64>, c: u16) -> Batch {
        let batch = Batch::decode(&ready.bytes).unwrap();
        assert_eq!(batch.check_structure(), Ok(()));
        assert_eq!(batch.gateway_id, gw());
        assert_eq!(batch.batch_id, ready.batch_id);
        assert_eq!(batch.chunk_size, c);
        assert_eq!(batch.group, ready.group);
        assert_eq!(batch.kind(), ready.kind);
        let hash: [u8; 32] = Sha256::digest(&ready.bytes).into();
        assert_eq!(ready.batch_hash, hash);
        assert_eq!(ready.tags.batch_hash, hash);
        assert_eq!(ready.tags.batch_id, ready.batch_id);
        assert_eq!(ready.tags.tags.len(), batch.len());
        assert_eq!(ready.handles.len(), batch.len());
        assert_eq!(batch.aggregates.len(), batch.chunk_count());
        for (k, range) in batch.chunks().enumerate() {
            assert_eq!(
                batch.aggregates[k],
                suite::aggregate(&ready.tags.tags[range]),
                "chunk {k}"
            );
        }
        batch
    }

    fn response_ids(batch: &Batch) -> Vec<u64> {
        match &batch.body {
            BatchBody::Responses { entries, .. } => entries.iter().map(|e| e.id.0).collect(),
            BatchBody::Uplinks { .. } => panic!("not a response batch"),
        }
    }

    #[test]
    fn responses_sorted_by_id_tags_stripped_and_kept_in_order() {
        let t0 = Instant::now();
        let mut agg = Aggregator::new(cfg(4, 100)).unwrap();
        let order = [9u64, 3, 12, 1, 7, 5, 11, 2, 10, 4];
        agg.expect(spec(1, order, t0 + Duration::from_secs(5)), t0)
            .unwrap();
        for id in order {
            assert_eq!(
                agg.handle_response(resp(id, 1, Mode::Psk), id * 100, t0),
                Ok(Collected::New)
            );
        }
        let ready = agg.poll_batch(t0, &mut ids()).unwrap().unwrap();
        assert_eq!(ready.trigger, BatchTrigger::AllAnswered);
        assert_eq!(ready.round, Some(1));
        assert!(ready.missing.is_empty());
        let batch = check(&ready, 4);
        let mut sorted = order.to_vec();
        sorted.sort();
        assert_eq!(response_ids(&batch), sorted);
        // Handles and tags follow batch order, and each entry is exactly the
        // member's response without its tag.
        let BatchBody::Responses {
            entries,
            round,
            mode,
        } = &batch.body
        else {
            unreachable!()
        };
        assert_eq!((*round, *mode), (1, Mode::Psk));
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(ready.handles[i], e.id.0 * 100);
            assert_eq!(ready.tags.tags[i], tag(e.id.0, 0xA0));
            assert_eq!(*e, resp(e.id.0, 1, Mode::Psk).entry());
        }
        assert_eq!(
            agg.poll_batch(t0, &mut ids()).unwrap().map(|b| b.batch_id),
            None
        );
    }

    #[test]
    fn psk_ecdhe_entries_carry_e_i() {
        let t0 = Instant::now();
        let mut agg = Aggregator::new(cfg(2, 100)).unwrap();
        let mut s = spec(4, [1, 2, 3], t0 + Duration::from_secs(1));
        s.mode = Mode::PskEcdhe;
        agg.expect(s, t0).unwrap();
        for id in [3, 1, 2] {
            agg.handle_response(resp(id, 4, Mode::PskEcdhe), id, t0)
                .unwrap();
        }
        // A psk response in a psk-ecdhe round would break the batch's
        // structure: refused.
        let mut other = resp(4, 4, Mode::Psk);
        other.id = MemberId(4);
        assert_eq!(
            agg.handle_response(other, 4, t0),
            Err(CollectError::ModeMismatch { group: G, round: 4 })
        );
        let ready = agg.poll_batch(t0, &mut ids()).unwrap().unwrap();
        let batch = check(&ready, 2);
        let BatchBody::Responses { mode, entries, .. } = &batch.body else {
            unreachable!()
        };
        assert_eq!(*mode, Mode::PskEcdhe);
        assert!(entries.iter().all(|e| e.e_i == Some([0xEE; 32])));
    }

    #[test]
    fn chunking_remainders_c_one_and_c_above_count() {
        let t0 = Instant::now();
        for (count, c) in [
            (10u64, 3u16),
            (9, 3),
            (10, 1),
            (1, 1),
            (5, 64),
            (64, 64),
            (65, 64),
        ] {
            let mut agg = Aggregator::new(cfg(c, MAX_BATCH_ENTRIES)).unwrap();
            agg.expect(spec(1, 1..=count, t0 + Duration::from_secs(1)), t0)
                .unwrap();
            for id in (1..=count).rev() {
                agg.handle_response(resp(id, 1, Mode::Psk), id, t0).unwrap();
            }
            let ready = agg.poll_batch(t0, &mut ids()).unwrap().unwrap();
            let batch = check(&ready, c);
            assert_eq!(batch.len() as u64, count);
            let expected_chunks = count.div_ceil(u64::from(c)) as usize;
            assert_eq!(
                batch.aggregates.len(),
                expected_chunks,
                "count {count} c {c}"
            );
            // The last chunk holds the remainder.
            let last = batch.chunk_range(expected_chunks - 1).unwrap();
            let rem = (count % u64::from(c)) as usize;
            assert_eq!(last.len(), if rem == 0 { usize::from(c) } else { rem });
            // Aggregates are over the right members' tags in id order.
            for (k, range) in batch.chunks().enumerate() {
                let want: Vec<[u8; 16]> = range.map(|i| tag(i as u64 + 1, 0xA0)).collect();
                assert_eq!(batch.aggregates[k], suite::aggregate(&want));
            }
        }
    }

    #[test]
    fn uplinks_sorted_by_id_sid_ctr_and_linger_trigger() {
        let t0 = Instant::now();
        let linger = Duration::from_millis(200);
        let mut agg = Aggregator::new(cfg(3, 100)).unwrap();
        let input = [
            (5u64, 2u8, 3u64),
            (1, 9, 1),
            (5, 1, 7),
            (5, 2, 1),
            (1, 9, 2),
            (2, 0, 1),
        ];
        for (i, &(id, sid, ctr)) in input.iter().enumerate() {
            let at = t0 + Duration::from_millis(10 * i as u64);
            agg.handle_uplink(upl(id, sid, ctr), i as u64, at).unwrap();
        }
        assert_eq!(agg.poll_timeout(), Some(t0 + linger));
        assert!(
            agg.poll_batch(t0 + linger - Duration::from_millis(1), &mut ids())
                .unwrap()
                .is_none()
        );
        let ready = agg.poll_batch(t0 + linger, &mut ids()).unwrap().unwrap();
        assert_eq!(ready.trigger, BatchTrigger::Linger);
        assert_eq!((ready.kind, ready.round), (BatchKind::Uplinks, None));
        let batch = check(&ready, 3);
        let BatchBody::Uplinks { entries } = &batch.body else {
            unreachable!()
        };
        let keys: Vec<(u64, u8, u64)> = entries
            .iter()
            .map(|e| (e.id.0, e.sid.0[0], e.ctr))
            .collect();
        let mut want = input.to_vec();
        want.sort();
        assert_eq!(keys, want);
        for (i, e) in entries.iter().enumerate() {
            let u = upl(e.id.0, e.sid.0[0], e.ctr);
            assert_eq!(*e, u.entry());
            assert_eq!(ready.tags.tags[i], u.tag);
            let pos = input
                .iter()
                .position(|&k| k == (e.id.0, e.sid.0[0], e.ctr))
                .unwrap();
            assert_eq!(ready.handles[i], pos as u64);
        }
        // Nothing pending: no timer for uplinks any more.
        assert_eq!(agg.poll_timeout(), None);
    }

    /// Uplinks dated by their arrival can reach the aggregator out of
    /// order: the linger runs from the oldest date, not the first handed in.
    #[test]
    fn the_linger_runs_from_the_oldest_uplink_not_the_first_collected() {
        let t0 = Instant::now();
        let linger = Duration::from_millis(200);
        let mut agg = Aggregator::new(cfg(3, 100)).unwrap();
        let late = t0 + Duration::from_millis(30);
        agg.handle_uplink(upl(1, 1, 1), 0u64, late).unwrap();
        assert_eq!(agg.poll_timeout(), Some(late + linger));
        agg.handle_uplink(upl(2, 1, 1), 1, t0).unwrap();
        assert_eq!(agg.poll_timeout(), Some(t0 + linger));
        // A newer one does not move it forward again.
        agg.handle_uplink(upl(3, 1, 1), 2, late).unwrap();
        assert_eq!(agg.poll_timeout(), Some(t0 + linger));
        let ready = agg.poll_batch(t0 + linger, &mut ids()).unwrap().unwrap();
        assert_eq!(ready.trigger, BatchTrigger::Linger);
        assert_eq!(ready.handles.len(), 3);
    }

    #[test]
    fn deadline_trigger_reports_missing_once() {
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(2);
        let mut agg = Aggregator::new(cfg(8, 100)).unwrap();
        agg.expect(spec(3, [1, 2, 3, 4, 5], deadline), t0).unwrap();
        for id in [4, 2] {
            agg.handle_response(resp(id, 3, Mode::Psk), id, t0).unwrap();
        }
        // An unexpected member may answer too; the verifier judges it.
        agg.handle_response(resp(99, 3, Mode::Psk), 99, t0).unwrap();
        assert_eq!(agg.poll_timeout(), Some(deadline));
        assert!(
            agg.poll_batch(deadline - Duration::from_millis(1), &mut ids())
                .unwrap()
                .is_none()
        );
        let ready = agg.poll_batch(deadline, &mut ids()).unwrap().unwrap();
        assert_eq!(ready.trigger, BatchTrigger::Deadline);
        assert_eq!(ready.missing, vec![MemberId(1), MemberId(3), MemberId(5)]);
        assert_eq!(response_ids(&check(&ready, 8)), vec![2, 4, 99]);
        // The round is closed and forgotten: no ClosedRound (it was reported
        // in the batch), late answers refused, nothing held.
        assert_eq!(agg.poll_closed_round(), None);
        assert_eq!(agg.poll_timeout(), None);
        assert_eq!(agg.held(), 0);
        assert_eq!(
            agg.handle_response(resp(1, 3, Mode::Psk), 1, deadline),
            Err(CollectError::RoundClosed { group: G, round: 3 })
        );
        assert_eq!(
            agg.expect(spec(3, [1], deadline), deadline),
            Err(UsageError::RoundClosed { group: G, round: 3 })
        );
    }

    #[test]
    fn round_without_answers_closes_with_missing_members() {
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(1);
        let mut agg = Aggregator::<u64>::new(cfg(8, 100)).unwrap();
        agg.expect(spec(1, [3, 1, 2], deadline), t0).unwrap();
        assert!(agg.poll_batch(deadline, &mut ids()).unwrap().is_none());
        assert_eq!(
            agg.poll_closed_round(),
            Some(ClosedRound {
                group: G,
                round: 1,
                missing: vec![MemberId(1), MemberId(2), MemberId(3)],
            })
        );
        assert_eq!(agg.poll_closed_round(), None);
    }

    #[test]
    fn stragglers_after_all_answered_wait_for_the_deadline() {
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(1);
        let mut agg = Aggregator::new(cfg(8, 100)).unwrap();
        let mut ids = ids();
        agg.expect(spec(1, [1, 2], deadline), t0).unwrap();
        agg.handle_response(resp(1, 1, Mode::Psk), 1, t0).unwrap();
        assert!(agg.poll_batch(t0, &mut ids).unwrap().is_none());
        agg.handle_response(resp(2, 1, Mode::Psk), 2, t0).unwrap();
        assert_eq!(agg.poll_timeout(), Some(t0));
        let first = agg.poll_batch(t0, &mut ids).unwrap().unwrap();
        assert_eq!(first.trigger, BatchTrigger::AllAnswered);
        // Re-sends of batched responses are absorbed while the round is open.
        assert_eq!(
            agg.handle_response(resp(2, 1, Mode::Psk), 2, t0),
            Ok(Collected::Duplicate)
        );
        agg.handle_response(resp(8, 1, Mode::Psk), 8, t0).unwrap();
        agg.handle_response(resp(6, 1, Mode::Psk), 6, t0).unwrap();
        assert!(agg.poll_batch(t0, &mut ids).unwrap().is_none());
        let second = agg.poll_batch(deadline, &mut ids).unwrap().unwrap();
        assert_eq!(second.trigger, BatchTrigger::Deadline);
        assert!(second.missing.is_empty());
        assert_eq!(response_ids(&check(&second, 8)), vec![6, 8]);
        assert!(second.batch_id > first.batch_id);
    }

    #[test]
    fn size_cap_cuts_lowest_ids_first_and_keeps_the_rest() {
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(1);
        let mut agg = Aggregator::new(cfg(2, 5)).unwrap();
        let mut ids = ids();
        agg.expect(spec(1, 1..=12, deadline), t0).unwrap();
        for id in (1..=12).rev() {
            agg.handle_response(resp(id, 1, Mode::Psk), id, t0).unwrap();
        }
        let mut got = Vec::new();
        while let Some(b) = agg.poll_batch(t0, &mut ids).unwrap() {
            got.push((b.trigger, response_ids(&check(&b, 2))));
        }
        assert_eq!(
            got,
            vec![
                (BatchTrigger::SizeCap, vec![1, 2, 3, 4, 5]),
                (BatchTrigger::SizeCap, vec![6, 7, 8, 9, 10]),
                (BatchTrigger::AllAnswered, vec![11, 12]),
            ]
        );
        // Uplinks: the cap cuts without waiting for the linger time.
        for ctr in 1..=7 {
            agg.handle_uplink(upl(1, 1, ctr), ctr, t0).unwrap();
        }
        let b = agg.poll_batch(t0, &mut ids).unwrap().unwrap();
        assert_eq!(
            (b.trigger, b.handles.clone()),
            (BatchTrigger::SizeCap, vec![1, 2, 3, 4, 5])
        );
        assert!(agg.poll_batch(t0, &mut ids).unwrap().is_none());
        let b = agg
            .poll_batch(t0 + agg.config().uplink_linger, &mut ids)
            .unwrap()
            .unwrap();
        assert_eq!(
            (b.trigger, b.handles.clone()),
            (BatchTrigger::Linger, vec![6, 7])
        );
    }

    #[test]
    fn expect_later_members_and_deadline_move() {
        let t0 = Instant::now();
        let mut agg = Aggregator::new(cfg(8, 100)).unwrap();
        agg.expect(spec(1, [1], t0 + Duration::from_secs(1)), t0)
            .unwrap();
        agg.handle_response(resp(2, 1, Mode::Psk), 2, t0).unwrap();
        // Member 2 attaches after relaying: it had already answered, member 1
        // has not, so nothing is due yet.
        agg.expect(spec(1, [2], t0 + Duration::from_secs(3)), t0)
            .unwrap();
        assert_eq!(agg.poll_timeout(), Some(t0 + Duration::from_secs(3)));
        agg.handle_response(resp(1, 1, Mode::Psk), 1, t0).unwrap();
        let b = agg.poll_batch(t0, &mut ids()).unwrap().unwrap();
        assert_eq!(b.trigger, BatchTrigger::AllAnswered);
        let mut ecdhe = spec(1, [3], t0);
        ecdhe.mode = Mode::PskEcdhe;
        assert_eq!(
            agg.expect(ecdhe, t0),
            Err(UsageError::ModeMismatch { group: G, round: 1 })
        );
    }

    #[test]
    fn duplicates_absorbed_conflicts_held_as_alternatives_up_to_the_cap() {
        let t0 = Instant::now();
        let mut agg = Aggregator::new(cfg(8, 100)).unwrap();
        agg.expect(spec(1, [1, 2], t0 + Duration::from_secs(1)), t0)
            .unwrap();
        agg.handle_response(resp(1, 1, Mode::Psk), 10, t0).unwrap();
        assert_eq!(
            agg.handle_response(resp(1, 1, Mode::Psk), 11, t0),
            Ok(Collected::Duplicate)
        );
        // Every field that differs makes it a different response.
        let variants: [fn(&mut Response); 5] = [
            |r| r.n_i[0] ^= 1,
            |r| r.kv += 1,
            |r| r.tag[15] ^= 1,
            |r| r.c = Bytes::from_static(b"x"),
            |r| r.c = Bytes::new(),
        ];
        let mut held = 1;
        for (i, change) in variants.into_iter().enumerate() {
            let mut r = resp(1, 1, Mode::Psk);
            change(&mut r);
            if r == resp(1, 1, Mode::Psk) {
                continue;
            }
            let got = agg.handle_response(r.clone(), 12 + i as u32, t0);
            if held < MAX_VARIANTS {
                assert_eq!(got, Ok(Collected::New));
                held += 1;
                // A re-sent alternative is absorbed too.
                assert_eq!(agg.handle_response(r, 0, t0), Ok(Collected::Duplicate));
            } else {
                assert_eq!(
                    got,
                    Err(CollectError::ConflictingResponse {
                        id: MemberId(1),
                        group: G,
                        round: 1
                    })
                );
            }
        }
        assert_eq!(held, MAX_VARIANTS);
        assert_eq!(agg.held(), MAX_VARIANTS);
        assert_eq!(agg.pending(), MAX_VARIANTS);
        // Alternatives go out after a linger, one variant per batch, each
        // batch with its own id, the first arrived first.
        let mut ids = ids();
        assert!(agg.poll_batch(t0, &mut ids).unwrap().is_none());
        let at = t0 + agg.config().uplink_linger;
        assert_eq!(agg.poll_timeout(), Some(at));
        let mut handles = Vec::new();
        while let Some(b) = agg.poll_batch(at, &mut ids).unwrap() {
            assert_eq!(b.trigger, BatchTrigger::Alternatives);
            assert_eq!(response_ids(&Batch::decode(&b.bytes).unwrap()), [1]);
            handles.extend(b.handles);
        }
        assert_eq!(handles, [10, 12, 13, 14]);
        assert_eq!(agg.pending(), 0);

        agg.handle_uplink(upl(1, 1, 1), 20, t0).unwrap();
        assert_eq!(
            agg.handle_uplink(upl(1, 1, 1), 21, t0),
            Ok(Collected::Duplicate)
        );
        for n in 1..MAX_VARIANTS {
            let mut other = upl(1, 1, 1);
            other.kind = UplinkKind::Alarm;
            other.tag[0] = n as u8;
            assert_eq!(
                agg.handle_uplink(other, 21 + n as u32, t0),
                Ok(Collected::New)
            );
        }
        let mut other = upl(1, 1, 1);
        other.kind = UplinkKind::Alarm;
        other.tag[0] = 0xEE;
        assert_eq!(
            agg.handle_uplink(other, 29, t0),
            Err(CollectError::ConflictingUplink {
                id: MemberId(1),
                sid: SessionId([1; 8]),
                ctr: 1
            })
        );
        // Another session or counter is another entry.
        assert_eq!(agg.handle_uplink(upl(1, 2, 1), 30, t0), Ok(Collected::New));
        assert_eq!(agg.handle_uplink(upl(1, 1, 2), 31, t0), Ok(Collected::New));
        // Each batch carries (1, 1, 1) once; the alternatives follow at once.
        let mut sizes = Vec::new();
        let mut handles = Vec::new();
        while let Some(b) = agg
            .poll_batch(at + agg.config().uplink_linger, &mut ids)
            .unwrap()
        {
            sizes.push(b.handles.len());
            handles.extend(b.handles);
        }
        assert_eq!(sizes, [3, 1, 1, 1]);
        assert_eq!(handles, [20, 31, 30, 22, 23, 24]);
    }

    #[test]
    fn uplink_resend_absorbed_within_window_then_forgotten() {
        let t0 = Instant::now();
        let mut c = cfg(8, 100);
        c.uplink_dedup_window = Duration::from_secs(10);
        let linger = c.uplink_linger;
        let mut agg = Aggregator::new(c).unwrap();
        let mut ids = ids();
        agg.handle_uplink(upl(1, 1, 1), 1, t0).unwrap();
        let b = agg.poll_batch(t0 + linger, &mut ids).unwrap().unwrap();
        assert_eq!(b.handles, vec![1]);
        let t1 = t0 + linger + Duration::from_secs(9);
        assert_eq!(
            agg.handle_uplink(upl(1, 1, 1), 2, t1),
            Ok(Collected::Duplicate)
        );
        assert_eq!(agg.held(), 1);
        assert!(agg.poll_batch(t1 + linger, &mut ids).unwrap().is_none());
        // After the window the stream is dropped and memory freed.
        let t2 = t0 + linger + Duration::from_secs(10);
        assert!(agg.poll_batch(t2, &mut ids).unwrap().is_none());
        assert_eq!(agg.held(), 0);
        assert_eq!(agg.handle_uplink(upl(1, 1, 1), 3, t2), Ok(Collected::New));
    }

    #[test]
    fn unknown_round_caps_and_bounds() {
        let t0 = Instant::now();
        let mut c = cfg(8, 2);
        c.max_held_entries = 3;
        c.max_collectors = 2;
        let mut agg = Aggregator::new(c).unwrap();
        assert_eq!(
            agg.handle_response(resp(1, 1, Mode::Psk), 1, t0),
            Err(CollectError::UnknownRound { group: G, round: 1 })
        );
        agg.expect(spec(1, [], t0 + Duration::from_secs(1)), t0)
            .unwrap();
        let mut big = resp(1, 1, Mode::Psk);
        big.c = Bytes::from(vec![0; MAX_PAYLOAD + 1]);
        assert_eq!(
            agg.handle_response(big, 1, t0),
            Err(CollectError::Malformed(DecodeError::TooLong("response.c")))
        );
        let mut big = upl(1, 1, 1);
        big.c = Bytes::from(vec![0; MAX_PAYLOAD + 1]);
        assert_eq!(
            agg.handle_uplink(big, 1, t0),
            Err(CollectError::Malformed(DecodeError::TooLong("uplink.c")))
        );
        for id in 1..=3 {
            agg.handle_response(resp(id, 1, Mode::Psk), id, t0).unwrap();
        }
        assert_eq!(
            agg.handle_response(resp(4, 1, Mode::Psk), 4, t0),
            Err(CollectError::Full(3))
        );
        assert_eq!(
            agg.handle_uplink(upl(4, 1, 1), 4, t0),
            Err(CollectError::Full(3))
        );
        let mut u = upl(4, 1, 1);
        u.group = GroupId(99);
        assert_eq!(agg.handle_uplink(u, 4, t0), Err(CollectError::Full(3)));
        // A second collector fits, a third does not.
        agg.expect(spec(2, [], t0 + Duration::from_secs(1)), t0)
            .unwrap();
        let mut s = spec(3, [], t0);
        s.group = GroupId(8);
        assert_eq!(agg.expect(s, t0), Err(UsageError::TooManyCollectors(2)));
        // Uplink streams have a budget of their own (below); here the
        // held-entries cap refuses first.
        let mut u = upl(4, 1, 1);
        u.group = GroupId(99);
        assert_eq!(agg.handle_uplink(u, 4, t0), Err(CollectError::Full(3)));
    }

    /// Uplinks for made-up groups (which any member-side client can send)
    /// fill the uplink streams' budget only: the rounds the UDC opens have
    /// their own, and the reverse.
    #[test]
    fn uplink_streams_cannot_take_the_rounds_room() {
        let t0 = Instant::now();
        let mut c = cfg(8, 2);
        c.max_collectors = 2;
        let mut agg = Aggregator::new(c).unwrap();
        let in_group = |g: u32, id: u64| {
            let mut u = upl(id, 1, 1);
            u.group = GroupId(g);
            u
        };
        for (g, id) in [(50, 1), (51, 2)] {
            assert_eq!(
                agg.handle_uplink(in_group(g, id), id, t0),
                Ok(Collected::New)
            );
        }
        assert_eq!(
            agg.handle_uplink(in_group(52, 3), 3, t0),
            Err(CollectError::TooManyCollectors(2))
        );
        for r in 1..=2 {
            agg.expect(spec(r, [], t0 + Duration::from_secs(1)), t0)
                .unwrap();
        }
        assert_eq!(
            agg.expect(spec(3, [], t0 + Duration::from_secs(1)), t0),
            Err(UsageError::TooManyCollectors(2))
        );
        // An existing stream still takes uplinks.
        assert_eq!(
            agg.handle_uplink(in_group(50, 4), 4, t0),
            Ok(Collected::New)
        );
    }

    #[test]
    fn config_is_validated() {
        let bad = [
            AggregatorConfig {
                chunk_size: 0,
                ..cfg(1, 1)
            },
            AggregatorConfig {
                chunk_size: 1025,
                ..cfg(1, 1)
            },
            AggregatorConfig {
                max_batch_entries: 0,
                ..cfg(1, 1)
            },
            AggregatorConfig {
                max_batch_entries: MAX_BATCH_ENTRIES + 1,
                ..cfg(1, 1)
            },
            AggregatorConfig {
                max_collectors: 0,
                ..cfg(1, 1)
            },
            AggregatorConfig {
                max_held_entries: 4,
                ..cfg(1, 5)
            },
        ];
        for c in bad {
            assert!(matches!(
                Aggregator::<()>::new(c),
                Err(UsageError::Config(_))
            ));
        }
        assert!(Aggregator::<()>::new(cfg(1024, MAX_BATCH_ENTRIES)).is_ok());
    }

    #[test]
    fn batch_ids_asked_only_on_cut_and_must_increase() {
        let t0 = Instant::now();
        let mut agg = Aggregator::new(cfg(8, 100)).unwrap();
        let mut asked = 0;
        let mut source = || {
            asked += 1;
            5
        };
        assert!(agg.poll_batch(t0, &mut source).unwrap().is_none());
        agg.handle_uplink(upl(1, 1, 1), 1, t0).unwrap();
        let linger = agg.config().uplink_linger;
        assert!(agg.poll_batch(t0, &mut source).unwrap().is_none());
        assert_eq!(
            agg.poll_batch(t0 + linger, &mut source)
                .unwrap()
                .unwrap()
                .batch_id,
            5
        );
        agg.handle_uplink(upl(1, 1, 2), 2, t0 + linger).unwrap();
        // The source repeats itself: refused, and the entry stays pending.
        assert_eq!(
            agg.poll_batch(t0 + 2 * linger, &mut source)
                .map(|b| b.map(|b| b.batch_id)),
            Err(UsageError::BatchIdNotIncreasing { last: 5, got: 5 })
        );
        assert_eq!(asked, 2);
        assert_eq!(agg.pending(), 1);
        let b = agg.poll_batch(t0 + 2 * linger, &mut || 6).unwrap().unwrap();
        assert_eq!((b.batch_id, b.handles), (6, vec![2]));
    }

    fn tag_request(kept: &KeptTags, chunks: Vec<u32>) -> Verdict {
        Verdict {
            gateway_id: kept.gateway_id,
            batch_id: kept.batch_id,
            batch_hash: kept.batch_hash,
            body: VerdictBody::TagsRequested { chunks },
        }
    }

    #[test]
    fn tag_replies_name_exactly_the_requested_chunks() {
        let t0 = Instant::now();
        let mut agg = Aggregator::new(cfg(3, 100)).unwrap();
        agg.expect(spec(1, 1..=10, t0), t0).unwrap();
        for id in 1..=10 {
            agg.handle_response(resp(id, 1, Mode::Psk), id, t0).unwrap();
        }
        let ready = agg.poll_batch(t0, &mut ids()).unwrap().unwrap();
        let kept = &ready.tags;
        assert_eq!(kept.chunk_count(), 4);
        let reply = answer_tag_request(kept, &tag_request(kept, vec![0, 3])).unwrap();
        assert_eq!(
            (reply.gateway_id, reply.batch_id, reply.batch_hash),
            (gw(), ready.batch_id, ready.batch_hash)
        );
        assert_eq!(
            reply.chunks,
            vec![
                ChunkTags {
                    chunk: 0,
                    tags: (1..=3).map(|i| tag(i, 0xA0)).collect()
                },
                ChunkTags {
                    chunk: 3,
                    tags: vec![tag(10, 0xA0)]
                },
            ]
        );
        // Round trip through the wire.
        assert_eq!(TagReply::decode(&reply.to_bytes()).unwrap(), reply);
        assert_eq!(
            answer_tag_request(kept, &tag_request(kept, vec![1, 4])),
            Err(TagRequestError::ChunkOutOfRange(4))
        );
        assert_eq!(
            answer_tag_request(kept, &tag_request(kept, vec![u32::MAX])),
            Err(TagRequestError::ChunkOutOfRange(u32::MAX))
        );
        for chunks in [
            vec![],
            vec![2, 1],
            vec![1, 1],
            vec![0; MAX_TAG_REQUEST_CHUNKS + 1],
        ] {
            assert_eq!(
                answer_tag_request(kept, &tag_request(kept, chunks)),
                Err(TagRequestError::InvalidRequest)
            );
        }
        let mut other = tag_request(kept, vec![0]);
        other.batch_hash[0] ^= 1;
        assert_eq!(
            answer_tag_request(kept, &other),
            Err(TagRequestError::WrongBatch)
        );
        let mut other = tag_request(kept, vec![0]);
        other.batch_id += 1;
        assert_eq!(
            answer_tag_request(kept, &other),
            Err(TagRequestError::WrongBatch)
        );
        let mut other = tag_request(kept, vec![0]);
        other.gateway_id = GatewayId::new("gw-2").unwrap();
        assert_eq!(
            answer_tag_request(kept, &other),
            Err(TagRequestError::WrongBatch)
        );
        let mut fin = tag_request(kept, vec![0]);
        fin.body = VerdictBody::Final {
            outcomes: vec![Outcome::Accepted; 10],
            confirms: vec![],
        };
        assert_eq!(
            answer_tag_request(kept, &fin),
            Err(TagRequestError::NotATagRequest)
        );

        // After a restart, the spool's bytes and tags rebuild the same value.
        assert_eq!(
            KeptTags::from_sealed(&ready.bytes, kept.tags.clone()),
            Ok(kept.clone())
        );
        assert_eq!(
            KeptTags::from_sealed(&ready.bytes, kept.tags[1..].to_vec()),
            Err(TagRequestError::TagCount {
                expected: 10,
                found: 9
            })
        );
        assert!(matches!(
            KeptTags::from_sealed(&ready.bytes.slice(1..), kept.tags.clone()),
            Err(TagRequestError::Malformed(_))
        ));
    }

    #[test]
    fn restore_rebuilds_pending_entries_with_handles() {
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(30);
        let entries = vec![
            (SpooledEntry::Response(resp(3, 5, Mode::Psk)), 103),
            (SpooledEntry::Response(resp(1, 5, Mode::Psk)), 101),
            // Round 6 is not in the restored rounds: sent at once.
            (SpooledEntry::Response(resp(2, 6, Mode::Psk)), 202),
            (SpooledEntry::Uplink(upl(4, 4, 9)), 304),
            // A corrupt spool: a response in the other mode.
            (SpooledEntry::Response(resp(5, 5, Mode::PskEcdhe)), 999),
        ];
        let (mut agg, refused) =
            Aggregator::restore(cfg(8, 100), [spec(5, [1, 3, 4], deadline)], entries, t0).unwrap();
        assert_eq!(
            refused,
            vec![(CollectError::ModeMismatch { group: G, round: 5 }, 999)]
        );
        assert_eq!(agg.pending(), 4);
        let mut ids = ids();
        let b = agg.poll_batch(t0, &mut ids).unwrap().unwrap();
        assert_eq!(
            (b.round, b.trigger, b.handles.clone()),
            (Some(6), BatchTrigger::Deadline, vec![202])
        );
        assert!(agg.poll_batch(t0, &mut ids).unwrap().is_none());
        agg.handle_response(resp(4, 5, Mode::Psk), 104, t0).unwrap();
        let b = agg.poll_batch(t0, &mut ids).unwrap().unwrap();
        assert_eq!(
            (b.trigger, b.handles.clone()),
            (BatchTrigger::AllAnswered, vec![101, 103, 104])
        );
        let b = agg
            .poll_batch(t0 + agg.config().uplink_linger, &mut ids)
            .unwrap()
            .unwrap();
        assert_eq!(b.handles, vec![304]);
    }

    /// A spooled response of a round that was never recorded goes out at
    /// restore, but its round number (the sender's choice) closes nothing:
    /// a relayed round of its group below it still opens and collects.
    #[test]
    fn a_restored_unrecorded_round_closes_no_relayed_round() {
        let t0 = Instant::now();
        let entries = vec![(SpooledEntry::Response(resp(2, u64::MAX, Mode::Psk)), 7)];
        let (mut agg, refused) =
            Aggregator::restore(cfg(8, 100), Vec::<RoundSpec>::new(), entries, t0).unwrap();
        assert!(refused.is_empty());
        let mut ids = ids();
        let b = agg.poll_batch(t0, &mut ids).unwrap().unwrap();
        assert_eq!((b.round, b.handles.clone()), (Some(u64::MAX), vec![7]));
        assert!(agg.poll_batch(t0, &mut ids).unwrap().is_none());
        // The relayed round 5 of the same group opens and takes responses.
        agg.expect(spec(5, [1], t0 + Duration::from_secs(30)), t0)
            .unwrap();
        assert_eq!(
            agg.handle_response(resp(1, 5, Mode::Psk), 1, t0).unwrap(),
            Collected::New
        );
        let b = agg.poll_batch(t0, &mut ids).unwrap().unwrap();
        assert_eq!((b.round, b.handles), (Some(5), vec![1]));
        // Past its deadline the relayed round closes, and with it the
        // group's rounds at or below it.
        assert!(
            agg.poll_batch(t0 + Duration::from_secs(31), &mut ids)
                .unwrap()
                .is_none()
        );
        assert_eq!(
            agg.expect(spec(4, [1], t0 + Duration::from_secs(30)), t0),
            Err(UsageError::RoundClosed { group: G, round: 4 })
        );
    }

    #[test]
    fn hostile_bytes_never_panic_and_are_typed_errors() {
        let t0 = Instant::now();
        let mut agg = Aggregator::new(cfg(8, 100)).unwrap();
        agg.expect(spec(1, [1], t0 + Duration::from_secs(1)), t0)
            .unwrap();
        let good = resp(1, 1, Mode::Psk).to_bytes();
        let up = upl(1, 1, 1).to_bytes();
        // Every truncation and every single-byte change of a valid response
        // and uplink, plus other message types.
        for msg in [&good, &up] {
            for cut in 0..msg.len() {
                let r = agg.handle_bytes(&msg.slice(..cut), 0, t0);
                assert!(
                    matches!(r, Err(CollectError::Malformed(_))),
                    "cut {cut}: {r:?}"
                );
            }
            for i in 0..msg.len() {
                for x in [0x01u8, 0x80, 0xFF] {
                    let mut m = msg.to_vec();
                    m[i] ^= x;
                    let _ = agg.handle_bytes(&Bytes::from(m), 0, t0);
                }
            }
        }
        let mut trailing = good.to_vec();
        trailing.push(0);
        assert!(matches!(
            agg.handle_bytes(&Bytes::from(trailing), 0, t0),
            Err(CollectError::Malformed(DecodeError::TrailingBytes(_)))
        ));
        let confirm = crate::protocol::wire::Confirm {
            group: G,
            round: 1,
            epoch: 0,
            id: MemberId(1),
            sid: SessionId([0; 8]),
            w: [0; 32],
        };
        assert_eq!(
            agg.handle_bytes(&confirm.to_bytes(), 0, t0),
            Err(CollectError::Malformed(DecodeError::WrongType(0x07)))
        );
        // Whatever was collected still makes a valid batch.
        let mut ids = ids();
        while let Some(b) = agg
            .poll_batch(t0 + Duration::from_secs(1), &mut ids)
            .unwrap()
        {
            check(&b, 8);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Any interleaving of responses, re-sends and uplinks at any times:
        /// every new entry comes out in exactly one structurally valid batch
        /// with correct aggregates, and nothing is left held at the end.
        #[test]
        fn every_collected_entry_is_batched_exactly_once(
            c in 1u16..6,
            cap in 1usize..9,
            ops in proptest::collection::vec((0u8..4, 0u64..12, 0u64..3, 0u64..400), 1..80),
        ) {
            let t0 = Instant::now();
            let mut agg = Aggregator::new(cfg(c, cap)).unwrap();
            let mut next_id = 0;
            let mut ids = || { next_id += 1; next_id };
            for round in 1..=2 {
                agg.expect(spec(round, 0..6, t0 + Duration::from_millis(300 * round)), t0).unwrap();
            }
            let mut new = Vec::new();
            let mut out = Vec::new();
            let mut now = t0;
            for (n, (op, id, x, dt)) in ops.into_iter().enumerate() {
                now += Duration::from_millis(dt / 8);
                let handle = n as u64;
                let r = match op {
                    0 | 1 => agg.handle_response(resp(id, 1 + x % 2, Mode::Psk), handle, now),
                    2 => agg.handle_uplink(upl(id, x as u8, 1 + dt % 3), handle, now),
                    _ => Ok(Collected::Duplicate),
                };
                if r == Ok(Collected::New) {
                    new.push(handle);
                }
                while let Some(b) = agg.poll_batch(now, &mut ids).unwrap() {
                    proptest::prop_assert!(b.handles.len() <= cap);
                    check(&b, c);
                    out.extend(b.handles);
                }
            }
            let end = now + Duration::from_secs(3600);
            while let Some(b) = agg.poll_batch(end, &mut ids).unwrap() {
                check(&b, c);
                out.extend(b.handles);
            }
            out.sort();
            proptest::prop_assert_eq!(out, new);
            // Batched uplinks are remembered for the de-duplication window.
            proptest::prop_assert!(agg.poll_batch(end + Duration::from_secs(61), &mut ids).unwrap().is_none());
            proptest::prop_assert_eq!(agg.held(), 0);
            proptest::prop_assert_eq!(agg.poll_timeout(), None);
        }
    }
}
