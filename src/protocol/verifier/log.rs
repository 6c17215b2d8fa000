//! The verdict log: what makes batch handling idempotent.
//!
//! Data flow: every verdict the verifier produces (final, or a tag request
//! with its pending assessment) is put here under (gateway, batch id)
//! together with the batch hash, in the same transaction as the state it
//! changed. A retried identical batch is answered from the log, byte for
//! byte and with no second effect; a different batch under a used id is
//! refused. Accepted direct responses are logged under (member, group,
//! round) so a member retrying gets its confirm again.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::state::{byte_array, byte_vec};
use crate::protocol::wire::{GatewayId, GroupId, MemberId};

/// Where a verdict is filed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum LogKey {
    /// A gateway's batch.
    Batch {
        /// The sending gateway.
        gateway: GatewayId,
        /// Its batch id.
        batch_id: u64,
    },
    /// A member's direct response (flow A) that was accepted.
    Direct {
        /// The member.
        member: MemberId,
        /// The group.
        group: GroupId,
        /// The round.
        round: u64,
    },
}

/// A batch whose verdict waits for the gateway's tag reply.
///
/// Holds no secret: the batch bytes (ciphertexts and public fields) and the
/// chunks asked for. At the reply (or on expiry) the verifier judges the
/// batch again against the state of that moment, using the returned tags
/// for the requested chunks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingAssessment {
    /// The complete batch message.
    #[serde(with = "byte_vec")]
    pub batch: Vec<u8>,
    /// Chunk indices whose tags were requested, strictly increasing.
    pub requested: Vec<u32>,
}

/// One log record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggedVerdict {
    /// SHA-256 of the complete batch (or direct) message it answers.
    #[serde(with = "byte_array")]
    pub request_hash: [u8; 32],
    /// The answer, byte for byte: a Verdict message (final or tags
    /// requested), or for a direct response its Confirm message.
    #[serde(with = "byte_vec")]
    pub answer: Vec<u8>,
    /// Present while the verdict is a tag request.
    pub pending: Option<PendingAssessment>,
}

/// Storage for verdicts, keyed by [`LogKey`].
///
/// The UDC implements this over its store (one row per key, written in the
/// same transaction as the state the verdict changed).
pub trait VerdictLog {
    /// The record under `key`.
    fn get(&self, key: &LogKey) -> Option<LoggedVerdict>;
    /// Files (or replaces, when a pending verdict becomes final) a record.
    fn put(&mut self, key: LogKey, record: LoggedVerdict);
}

/// A verdict log held in memory.
#[derive(Clone, Debug, Default)]
pub struct InMemoryVerdictLog {
    records: BTreeMap<LogKey, LoggedVerdict>,
}

impl InMemoryVerdictLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether the log is empty.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

impl VerdictLog for InMemoryVerdictLog {
    fn get(&self, key: &LogKey) -> Option<LoggedVerdict> {
        self.records.get(key).cloned()
    }

    fn put(&mut self, key: LogKey, record: LoggedVerdict) {
        self.records.insert(key, record);
    }
}
