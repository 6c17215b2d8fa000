//! The verifier: what the UDC runs to judge batches, keep sessions and
//! manage groups (design steps 1, 3-5 and everything after).
//!
//! ```text
//! gateway --Batch--> handle_batch --Verdict (final | tags requested)--> gateway
//! gateway --TagReply--> handle_tag_reply --Verdict (final)--> gateway
//! member --Direct--> handle_direct --Confirm--> member
//! UDC --open_round / group_message / revoke / add_member / key_update--> members
//! ```
//!
//! This is a functional core. A [`Verifier`] holds only long-lived secrets
//! and configuration: the member key deriver over MS, the online signing key
//! and its certificate. Every piece of mutable protocol state is an explicit
//! value from [`state`] that the caller loads, passes in by `&mut`, and
//! stores afterwards, together with the [`VerdictLog`] record, in one
//! transaction per call. No call reads a clock (time comes in as `now`,
//! Unix seconds) or does I/O; randomness comes in as an argument.
//!
//! # Call order for a batch
//!
//! 1. [`ReceivedBatch::decode`] the request body; read its group, round and
//!    [`ReceivedBatch::member_ids`] to load the [`GroupState`], the
//!    [`RoundState`] of that round (response batches; `None` if there is no
//!    such round) and the members' [`SessionSlot`]s into a [`SessionTable`].
//! 2. [`Verifier::handle_batch`]; send [`BatchOutput::answer`]; persist the
//!    changed state and the log record.
//! 3. If the answer requested tags: [`Verifier::handle_tag_reply`] when the
//!    gateway answers, or [`Verifier::localization_expired`] when the
//!    caller's deadline passes, with the state loaded as in step 1.
//!
//! # Outcomes beyond their names
//!
//! - [`Outcome::MalformedPayload`] is also given to an entry that verified
//!   but cannot be used: a psk-ecdhe `E_i` whose X25519 result is all zero,
//!   a non-empty payload in an auth round, an ack that does not bind a group
//!   message V sent (or is not 52 bytes). The member itself sealed these, so
//!   they are not "unverified via gateway".
//! - [`Outcome::UnverifiedViaGateway`] covers every entry of a failing chunk
//!   that could have been accepted but whose individual tag did not come
//!   back equal to V's (omitted, forged, wrong count, chunk not requested
//!   because over the bound, or expiry). Count it per gateway, never per
//!   member.
//! - A confirm carries the group's *current* epoch and key, which is newer
//!   than the challenge's epoch if a rekey happened while the round was
//!   open; nothing is ever sealed under an ended epoch's key.

mod assess;
mod dh;
mod group;
mod kdf;
mod log;
mod registry;
mod round;
mod session;
pub mod state;

use bytes::Bytes;
use sha2::{Digest, Sha256};

pub use self::group::KeyUpdateIssued;
pub use self::log::{InMemoryVerdictLog, LogKey, LoggedVerdict, PendingAssessment, VerdictLog};
pub use self::registry::{InMemoryRegistry, KeySource, MemberRecord, MemberStatus, Registry};
pub use self::round::Reading;
pub use self::session::{AckLedger, AppliedAck, UplinkMessage, UplinkVerdict};
pub use self::state::{
    ConfirmSeal, GroupState, ReplayWindow, RoundPurpose, RoundState, SessionSlot, SessionState,
    SessionTable,
};

use self::assess::{Assessment, TagSource};
use self::kdf::FastDeriver;
use crate::protocol::codec::DecodeError;
use crate::protocol::keys::MasterSecret;
use crate::protocol::suite::{SigningKey, aggregate, ct_eq16};
use crate::protocol::wire::{
    Batch, BatchBody, BatchStructureError, ChunkTags, Confirm, Direct, DirectInner, GatewayId,
    KeyCertificate, MAX_TAG_REQUEST_CHUNKS, MemberId, Mode, Outcome, SessionId, TagReply, Verdict,
    VerdictBody,
};

/// Tunables of the verifier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifierConfig {
    /// Most chunks named in one tag request (1..=1024); failing chunks
    /// beyond it are finalized as unverified via gateway.
    pub max_tag_request_chunks: usize,
    /// A member accepted in a psk round after missing this many psk-ecdhe
    /// rounds in a row is reported (a gateway may be dropping psk-ecdhe
    /// challenges to keep it on psk).
    pub ecdhe_miss_warning: u64,
}

impl Default for VerifierConfig {
    fn default() -> Self {
        Self {
            max_tag_request_chunks: MAX_TAG_REQUEST_CHUNKS,
            ecdhe_miss_warning: 3,
        }
    }
}

/// The verifier's long-lived secrets and configuration.
///
/// Holds no protocol state (see the module docs). Secrets are zeroized on
/// drop and `Debug` prints only the key id.
pub struct Verifier {
    deriver: FastDeriver,
    online: SigningKey,
    key_id: u32,
    key_cert: Option<KeyCertificate>,
    config: VerifierConfig,
}

impl core::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Verifier")
            .field("key_id", &self.key_id)
            .field("secrets", &"<redacted>")
            .field("config", &self.config)
            .finish()
    }
}

impl Verifier {
    /// A verifier over master secret `ms`, signing with the online key
    /// `online` named `key_id`. `key_cert` (the root's certificate for the
    /// online key) is put in every challenge so members that missed a key
    /// rotation catch up.
    pub fn new(
        ms: &MasterSecret,
        online: SigningKey,
        key_id: u32,
        key_cert: Option<KeyCertificate>,
        config: VerifierConfig,
    ) -> Self {
        Self {
            deriver: FastDeriver::new(ms),
            online,
            key_id,
            key_cert,
            config: VerifierConfig {
                max_tag_request_chunks: config
                    .max_tag_request_chunks
                    .clamp(1, MAX_TAG_REQUEST_CHUNKS),
                ..config
            },
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &VerifierConfig {
        &self.config
    }
}

/// A peer sent something that is refused as a whole (nothing was judged,
/// nothing changed).
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// The message does not decode. Usually a buggy or hostile gateway, or a
    /// truncated body.
    #[error("undecodable message: {0}")]
    Decode(#[from] DecodeError),
    /// The batch is structurally unfit (empty, over the caps, not strictly
    /// sorted or holding a duplicate, wrong number of aggregates). Usually a
    /// buggy or hostile gateway; rejected before any cryptography.
    #[error("malformed batch: {0}")]
    Structure(#[from] BatchStructureError),
    /// A response batch claims another mode than its round's. Usually a
    /// gateway tampering with the mode byte.
    #[error("batch mode {batch:?} does not match the round's mode {round:?}")]
    ModeMismatch {
        /// The round's mode.
        round: Mode,
        /// The batch's.
        batch: Mode,
    },
    /// The gateway reused a batch id for different content. Usually a
    /// gateway that lost its batch-id counter; it must move past the id.
    #[error("batch id {batch_id} of gateway {gateway} was already used for another batch")]
    BatchIdReused {
        /// The gateway.
        gateway: GatewayId,
        /// The reused id.
        batch_id: u64,
    },
    /// A tag reply (or expiry) names a batch V has no verdict for. Usually a
    /// reply to a batch whose log record expired, or a confused gateway.
    #[error("no verdict for batch {batch_id} of gateway {gateway}")]
    UnknownBatch {
        /// The gateway.
        gateway: GatewayId,
        /// The batch id.
        batch_id: u64,
    },
    /// A tag reply's batch hash differs from the batch under that id.
    /// Usually a gateway answering for a different batch.
    #[error("tag reply for batch {batch_id} names another batch hash")]
    TagReplyMismatch {
        /// The batch id.
        batch_id: u64,
    },
    /// A direct message's aggregate is not the aggregate of its own tag.
    /// Usually a buggy member implementation or tampering.
    #[error("direct message aggregate does not match its tag")]
    DirectAggregate,
}

/// The caller used the verifier wrongly; nothing changed.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsageError {
    /// The group state passed in is for another group than the batch's or
    /// the operation's. Load the state of the group the input names.
    #[error("group state is for another group than the input")]
    WrongGroupState,
    /// The round state passed in is for another (group, round) than the
    /// batch's. Load the state of the round the batch names, or pass none.
    #[error("round state is for another round than the batch")]
    WrongRoundState,
    /// A read request over the 256-byte cap.
    #[error("read request of {0} bytes is over the 256-byte cap")]
    ReadRequestTooLong(usize),
    /// A group-message payload over the 65,536-byte cap.
    #[error("group message payload of {0} bytes is over the 65,536-byte cap")]
    PayloadTooLong(usize),
    /// A round, epoch, seq or downlink counter would overflow. Only reachable
    /// after about 2^64 uses; the group needs a fresh id.
    #[error("a protocol counter is exhausted")]
    CounterExhausted,
    /// A stored pending assessment does not decode. The record is corrupt;
    /// finalize the batch with `localization_expired` after restoring it, or
    /// drop it.
    #[error("stored pending assessment is corrupt: {0}")]
    CorruptPending(DecodeError),
    /// The member has no session in the group to carry the message. Wait for
    /// the member's next round.
    #[error("member {0} has no session in this group")]
    NoSession(MemberId),
    /// A key update was asked for a member with no psk-ecdhe session: whoever
    /// held the old key could read it in a psk session. Run a psk-ecdhe round
    /// first.
    #[error("key update for member {0} needs a psk-ecdhe session")]
    KeyUpdateNeedsEcdhe(MemberId),
    /// The member's key version cannot be raised further.
    #[error("member {0} key version is exhausted")]
    KeyVersionExhausted(MemberId),
}

/// Any failure of a verifier call, kept apart by cause.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifierError {
    /// The peer's input is refused as a whole.
    #[error(transparent)]
    Peer(#[from] BatchError),
    /// The caller's misuse.
    #[error(transparent)]
    Usage(#[from] UsageError),
}

/// A decoded batch with the bytes it came from and their hash.
#[derive(Clone, Debug)]
pub struct ReceivedBatch {
    bytes: Bytes,
    batch: Batch,
    hash: [u8; 32],
}

impl ReceivedBatch {
    /// Decodes a Batch message and hashes it (`batch_hash`). Structural
    /// checks beyond the codec's caps happen in [`Verifier::handle_batch`].
    pub fn decode(bytes: Bytes) -> Result<Self, BatchError> {
        let batch = Batch::decode(&bytes)?;
        let hash = Sha256::digest(&bytes).into();
        Ok(Self { bytes, batch, hash })
    }

    /// The batch.
    pub fn batch(&self) -> &Batch {
        &self.batch
    }

    /// `batch_hash = SHA-256(batch bytes)`.
    pub fn hash(&self) -> [u8; 32] {
        self.hash
    }

    /// The member ids of the entries, in batch order (for prefetching
    /// records and session slots).
    pub fn member_ids(&self) -> Vec<MemberId> {
        match &self.batch.body {
            BatchBody::Responses { entries, .. } => entries.iter().map(|e| e.id).collect(),
            BatchBody::Uplinks { entries } => entries.iter().map(|e| e.id).collect(),
        }
    }

    /// The round a response batch answers.
    pub fn round(&self) -> Option<u64> {
        match &self.batch.body {
            BatchBody::Responses { round, .. } => Some(*round),
            BatchBody::Uplinks { .. } => None,
        }
    }

    /// Where this batch's verdict is filed.
    pub fn log_key(&self) -> LogKey {
        LogKey::Batch {
            gateway: self.batch.gateway_id,
            batch_id: self.batch.batch_id,
        }
    }
}

/// The state a batch (or direct message) is judged against; see the module
/// docs for what to load.
#[derive(Debug)]
pub struct BatchState<'a> {
    /// The batch's group.
    pub group: &'a GroupState,
    /// The round a response batch answers, if V has it; `None` for uplinks
    /// (and for a round V does not know: every entry is then
    /// [`Outcome::RoundNotOpen`]).
    pub round: Option<&'a mut RoundState>,
    /// The session slots of the batch's members.
    pub sessions: &'a mut SessionTable,
}

/// Counts of one verdict, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerdictCounters {
    /// Entries per outcome, indexed by the outcome's wire code.
    pub by_outcome: [u32; 16],
    /// Entries accepted on their individual tag after localization.
    pub localized: u32,
}

impl VerdictCounters {
    /// Entries with `outcome`.
    pub fn count(&self, outcome: Outcome) -> u32 {
        self.by_outcome
            .get(usize::from(outcome.code()))
            .copied()
            .unwrap_or(0)
    }

    /// Entries that could not be verified through the gateway (count them per
    /// gateway; never held against the member).
    pub fn unverified(&self) -> u32 {
        self.count(Outcome::UnverifiedViaGateway)
    }
}

/// The final verdict of a response batch and everything it changed.
#[derive(Debug)]
#[must_use]
pub struct ResponseVerdict {
    /// The wire verdict (outcomes in batch order, confirms).
    pub verdict: Verdict,
    /// Readings of accepted members (read rounds), in batch order.
    pub readings: Vec<Reading>,
    /// Members whose session slot changed (a new pending session): write
    /// these slots back.
    pub touched: Vec<MemberId>,
    /// Members seen answering under a key version above their record's
    /// `min_kv`: apply [`MemberRecord::after_kv_confirmed`].
    pub kv_confirmed: Vec<(MemberId, u32)>,
    /// Members accepted in a psk round after missing this many psk-ecdhe
    /// rounds (at least [`VerifierConfig::ecdhe_miss_warning`]): warn.
    pub ecdhe_missed: Vec<(MemberId, u64)>,
    /// Counts for metrics.
    pub counters: VerdictCounters,
}

/// What [`Verifier::handle_batch`] and friends decided.
#[derive(Debug)]
#[must_use]
pub enum BatchEvent {
    /// A retry: the stored answer is re-sent; nothing changed.
    Replayed,
    /// The tags of these chunks were requested; nothing changed yet except
    /// the log record holding the pending assessment.
    TagsRequested {
        /// Chunk indices.
        chunks: Vec<u32>,
    },
    /// A response batch was judged.
    Responses(ResponseVerdict),
    /// An uplink batch was judged.
    Uplinks(UplinkVerdict),
}

/// The answer to send and what happened.
#[derive(Debug)]
#[must_use]
pub struct BatchOutput {
    /// The complete Verdict message for the gateway, byte for byte the same
    /// on every retry.
    pub answer: Bytes,
    /// What was decided.
    pub event: BatchEvent,
}

/// Where a direct message's rate limit applies (per source, in the UDC
/// service): `(id, g, r)` for a response, `(id, sid, ctr)` for an uplink.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RateKey {
    /// A direct response.
    Response {
        /// Claimed member.
        id: MemberId,
        /// Group.
        group: crate::protocol::wire::GroupId,
        /// Round.
        round: u64,
    },
    /// A direct uplink.
    Uplink {
        /// Claimed member.
        id: MemberId,
        /// Session.
        sid: SessionId,
        /// Counter.
        ctr: u64,
    },
}

/// The rate-limit key of a direct message, read before any cryptography.
pub fn direct_rate_key(direct: &Direct) -> Result<RateKey, BatchError> {
    Ok(match direct.inner_message()? {
        DirectInner::Response(r) => RateKey::Response {
            id: r.id,
            group: r.group,
            round: r.round,
        },
        DirectInner::Uplink(u) => RateKey::Uplink {
            id: u.id,
            sid: u.sid,
            ctr: u.ctr,
        },
    })
}

/// What [`Verifier::handle_direct`] decided.
#[derive(Debug)]
#[must_use]
pub struct DirectOutput {
    /// The single entry's outcome. Answer unauthenticated submitters
    /// uniformly: only `Accepted` deserves a specific answer.
    pub outcome: Outcome,
    /// For an accepted response: the Confirm message for the member (the
    /// same bytes on every retry).
    pub confirm: Option<Bytes>,
    /// The verdict details (`None` for a replayed accepted response).
    pub event: BatchEvent,
}

/// A judged batch before it is logged.
enum Judged {
    NeedTags(Vec<u32>),
    Responses(ResponseVerdict),
    Uplinks(UplinkVerdict),
}

impl Verifier {
    /// Judges a batch: structural checks first, then per entry, then chunk
    /// aggregates. Either the final verdict (state changed accordingly) or a
    /// tag request (state unchanged; the pending assessment is in the log).
    ///
    /// A retried identical batch gets the stored answer and changes nothing;
    /// a different batch under a used (gateway, batch id) is
    /// [`BatchError::BatchIdReused`].
    pub fn handle_batch(
        &self,
        batch: &ReceivedBatch,
        state: BatchState<'_>,
        registry: &impl Registry,
        log: &mut impl VerdictLog,
        now: u64,
    ) -> Result<BatchOutput, VerifierError> {
        let key = batch.log_key();
        if let Some(record) = log.get(&key) {
            return if record.request_hash == batch.hash {
                Ok(BatchOutput {
                    answer: Bytes::from(record.answer),
                    event: BatchEvent::Replayed,
                })
            } else {
                Err(BatchError::BatchIdReused {
                    gateway: batch.batch.gateway_id,
                    batch_id: batch.batch.batch_id,
                }
                .into())
            };
        }
        batch.batch.check_structure().map_err(BatchError::from)?;
        let source = TagSource::FirstPass {
            max_requested: self.config.max_tag_request_chunks,
        };
        let judged = self.judge(&batch.batch, batch.hash, state, registry, now, source)?;
        let pending = |requested: &[u32]| PendingAssessment {
            batch: batch.bytes.to_vec(),
            requested: requested.to_vec(),
        };
        Ok(self.file(key, batch.hash, judged, pending, log))
    }

    /// Finishes a batch whose verdict requested tags, with the gateway's
    /// reply: candidates in requested chunks are accepted exactly when the
    /// returned tag equals the recomputed one; everything unresolved is
    /// unverified via gateway. The batch is judged against the state passed
    /// now (loaded as for the batch).
    ///
    /// A retried reply after the verdict became final gets the final answer
    /// again ([`BatchEvent::Replayed`]).
    pub fn handle_tag_reply(
        &self,
        reply: &TagReply,
        state: BatchState<'_>,
        registry: &impl Registry,
        log: &mut impl VerdictLog,
        now: u64,
    ) -> Result<BatchOutput, VerifierError> {
        let (key, record) = self.pending_record(reply.gateway_id, reply.batch_id, log)?;
        if record.request_hash != reply.batch_hash {
            return Err(BatchError::TagReplyMismatch {
                batch_id: reply.batch_id,
            }
            .into());
        }
        let Some(pending) = record.pending else {
            return Ok(BatchOutput {
                answer: Bytes::from(record.answer),
                event: BatchEvent::Replayed,
            });
        };
        let source = TagSource::Reply {
            requested: &pending.requested,
            tags: &reply.chunks,
        };
        self.finish_pending(
            key,
            record.request_hash,
            &pending,
            state,
            registry,
            log,
            now,
            source,
        )
    }

    /// Finishes a batch whose tag request went unanswered until the caller's
    /// deadline: every unresolved entry is unverified via gateway.
    pub fn localization_expired(
        &self,
        gateway: GatewayId,
        batch_id: u64,
        state: BatchState<'_>,
        registry: &impl Registry,
        log: &mut impl VerdictLog,
        now: u64,
    ) -> Result<BatchOutput, VerifierError> {
        let (key, record) = self.pending_record(gateway, batch_id, log)?;
        let Some(pending) = record.pending else {
            return Ok(BatchOutput {
                answer: Bytes::from(record.answer),
                event: BatchEvent::Replayed,
            });
        };
        let hash = record.request_hash;
        self.finish_pending(
            key,
            hash,
            &pending,
            state,
            registry,
            log,
            now,
            TagSource::Expired,
        )
    }

    /// Accepts a member's direct message (flow A) as a batch of one: the
    /// same checks, with the member's own tag standing in for a tag reply.
    /// An accepted response is logged under (member, group, round) so a
    /// retry gets the same confirm.
    pub fn handle_direct(
        &self,
        direct: &Direct,
        state: BatchState<'_>,
        registry: &impl Registry,
        log: &mut impl VerdictLog,
        now: u64,
    ) -> Result<DirectOutput, VerifierError> {
        let inner = direct.inner_message().map_err(BatchError::from)?;
        let tag = match &inner {
            DirectInner::Response(r) => r.tag,
            DirectInner::Uplink(u) => u.tag,
        };
        if !ct_eq16(&aggregate([&tag]), &direct.aggregate) {
            return Err(BatchError::DirectAggregate.into());
        }
        let request_hash: [u8; 32] = Sha256::digest(&direct.inner).into();
        let (body, group, log_key) = match inner {
            DirectInner::Response(r) => {
                let key = LogKey::Direct {
                    member: r.id,
                    group: r.group,
                    round: r.round,
                };
                if let Some(record) = log.get(&key).filter(|rec| rec.request_hash == request_hash) {
                    return Ok(DirectOutput {
                        outcome: Outcome::Accepted,
                        confirm: Some(Bytes::from(record.answer)),
                        event: BatchEvent::Replayed,
                    });
                }
                let body = BatchBody::Responses {
                    round: r.round,
                    mode: r.mode(),
                    entries: vec![r.entry()],
                };
                (body, r.group, Some(key))
            }
            DirectInner::Uplink(u) => (
                BatchBody::Uplinks {
                    entries: vec![u.entry()],
                },
                u.group,
                None,
            ),
        };
        let batch = Batch {
            gateway_id: direct_gateway_id(),
            batch_id: 0,
            group,
            chunk_size: 1,
            body,
            aggregates: vec![direct.aggregate],
        };
        let tags = [ChunkTags {
            chunk: 0,
            tags: vec![tag],
        }];
        let source = TagSource::Reply {
            requested: &[0],
            tags: &tags,
        };
        let judged = self.judge(&batch, request_hash, state, registry, now, source)?;
        let (outcome, confirm, event) = match judged {
            Judged::Responses(v) => {
                let (outcome, confirm) = match &v.verdict.body {
                    VerdictBody::Final { outcomes, confirms } => (
                        outcomes
                            .first()
                            .copied()
                            .unwrap_or(Outcome::UnverifiedViaGateway),
                        confirms.first().map(Confirm::to_bytes),
                    ),
                    VerdictBody::TagsRequested { .. } => (Outcome::UnverifiedViaGateway, None),
                };
                (outcome, confirm, BatchEvent::Responses(v))
            }
            Judged::Uplinks(v) => {
                let outcome = match &v.verdict.body {
                    VerdictBody::Final { outcomes, .. } => outcomes
                        .first()
                        .copied()
                        .unwrap_or(Outcome::UnverifiedViaGateway),
                    VerdictBody::TagsRequested { .. } => Outcome::UnverifiedViaGateway,
                };
                (outcome, None, BatchEvent::Uplinks(v))
            }
            // A tag source that already holds the tag never asks for it.
            Judged::NeedTags(chunks) => (
                Outcome::UnverifiedViaGateway,
                None,
                BatchEvent::TagsRequested { chunks },
            ),
        };
        if let (Some(key), Some(confirm), Outcome::Accepted) = (log_key, &confirm, outcome) {
            log.put(
                key,
                LoggedVerdict {
                    request_hash,
                    answer: confirm.to_vec(),
                    pending: None,
                },
            );
        }
        Ok(DirectOutput {
            outcome,
            confirm,
            event,
        })
    }

    /// The log record of a batch awaiting (or past) localization.
    fn pending_record(
        &self,
        gateway: GatewayId,
        batch_id: u64,
        log: &impl VerdictLog,
    ) -> Result<(LogKey, LoggedVerdict), BatchError> {
        let key = LogKey::Batch { gateway, batch_id };
        let record = log
            .get(&key)
            .ok_or(BatchError::UnknownBatch { gateway, batch_id })?;
        Ok((key, record))
    }

    /// Re-judges a pending batch with `source` and files the final verdict.
    #[allow(clippy::too_many_arguments)]
    fn finish_pending(
        &self,
        key: LogKey,
        hash: [u8; 32],
        pending: &PendingAssessment,
        state: BatchState<'_>,
        registry: &impl Registry,
        log: &mut impl VerdictLog,
        now: u64,
        source: TagSource<'_>,
    ) -> Result<BatchOutput, VerifierError> {
        let bytes = Bytes::copy_from_slice(&pending.batch);
        let batch = Batch::decode(&bytes).map_err(UsageError::CorruptPending)?;
        let judged = self.judge(&batch, hash, state, registry, now, source)?;
        let no_pending = |_: &[u32]| PendingAssessment {
            batch: Vec::new(),
            requested: Vec::new(),
        };
        Ok(self.file(key, hash, judged, no_pending, log))
    }

    /// Encodes the verdict, files it in the log and builds the output.
    fn file(
        &self,
        key: LogKey,
        hash: [u8; 32],
        judged: Judged,
        pending: impl FnOnce(&[u32]) -> PendingAssessment,
        log: &mut impl VerdictLog,
    ) -> BatchOutput {
        let (answer, pending, event) = match judged {
            Judged::NeedTags(chunks) => {
                let LogKey::Batch { gateway, batch_id } = key else {
                    unreachable!("only batches are filed through here")
                };
                let verdict = Verdict {
                    gateway_id: gateway,
                    batch_id,
                    batch_hash: hash,
                    body: VerdictBody::TagsRequested {
                        chunks: chunks.clone(),
                    },
                };
                let p = pending(&chunks);
                (
                    verdict.to_bytes(),
                    Some(p),
                    BatchEvent::TagsRequested { chunks },
                )
            }
            Judged::Responses(v) => (v.verdict.to_bytes(), None, BatchEvent::Responses(v)),
            Judged::Uplinks(v) => (v.verdict.to_bytes(), None, BatchEvent::Uplinks(v)),
        };
        log.put(
            key,
            LoggedVerdict {
                request_hash: hash,
                answer: answer.to_vec(),
                pending,
            },
        );
        BatchOutput { answer, event }
    }

    /// Judges a structurally sound batch against `state`.
    fn judge(
        &self,
        batch: &Batch,
        hash: [u8; 32],
        state: BatchState<'_>,
        registry: &impl Registry,
        now: u64,
        source: TagSource<'_>,
    ) -> Result<Judged, VerifierError> {
        if state.group.group != batch.group {
            return Err(UsageError::WrongGroupState.into());
        }
        let chunk_size = usize::from(batch.chunk_size);
        match &batch.body {
            BatchBody::Responses {
                round: round_no,
                mode,
                entries,
            } => {
                let round = state.round;
                if let Some(r) = round.as_deref() {
                    if r.group != batch.group || r.round != *round_no {
                        return Err(UsageError::WrongRoundState.into());
                    }
                    if r.mode != *mode {
                        return Err(BatchError::ModeMismatch {
                            round: r.mode,
                            batch: *mode,
                        }
                        .into());
                    }
                }
                let ids: Vec<MemberId> = entries.iter().map(|e| e.id).collect();
                let records = round::align_records(entries, registry.members(&ids));
                let (screened, mut keys) =
                    round::screen(self, batch.group, round.as_deref(), entries, &records, now);
                let judgement =
                    match assess::assess(&screened, chunk_size, &batch.aggregates, source) {
                        Assessment::NeedTags(chunks) => return Ok(Judged::NeedTags(chunks)),
                        Assessment::Final(j) => j,
                    };
                let mut outcomes = judgement.outcomes;
                let fin = match round {
                    Some(r) => Some(round::finalize(
                        self,
                        state.group,
                        r,
                        entries,
                        &records,
                        &mut keys,
                        &mut outcomes,
                        state.sessions,
                    )),
                    None => None,
                };
                let fin = fin.unwrap_or_else(|| round::Finalized {
                    confirms: Vec::new(),
                    readings: Vec::new(),
                    touched: Vec::new(),
                    kv_confirmed: Vec::new(),
                    ecdhe_missed: Vec::new(),
                });
                let counters = round::count(&outcomes, judgement.localized);
                Ok(Judged::Responses(ResponseVerdict {
                    verdict: Verdict {
                        gateway_id: batch.gateway_id,
                        batch_id: batch.batch_id,
                        batch_hash: hash,
                        body: VerdictBody::Final {
                            outcomes,
                            confirms: fin.confirms,
                        },
                    },
                    readings: fin.readings,
                    touched: fin.touched,
                    kv_confirmed: fin.kv_confirmed,
                    ecdhe_missed: fin.ecdhe_missed,
                    counters,
                }))
            }
            BatchBody::Uplinks { entries } => {
                let screen = session::screen(batch.group, entries, state.sessions);
                let judgement =
                    match assess::assess(&screen.screened, chunk_size, &batch.aggregates, source) {
                        Assessment::NeedTags(chunks) => return Ok(Judged::NeedTags(chunks)),
                        Assessment::Final(j) => j,
                    };
                let verdict = session::finalize(
                    batch,
                    hash,
                    entries,
                    screen,
                    state.group,
                    state.sessions,
                    judgement,
                );
                Ok(Judged::Uplinks(verdict))
            }
        }
    }
}

/// The gateway id that direct messages are judged under (never sent).
pub(crate) fn direct_gateway_id() -> GatewayId {
    GatewayId::new("direct").unwrap_or_else(|_| unreachable!("\"direct\" is a valid gateway id"))
}

#[cfg(test)]
mod tests;
