//! Why a member refused an input or a call: [`MemberError`].
//!
//! Every refusal leaves the member exactly as it was, so the caller may log
//! the error and carry on with the next message.

use crate::protocol::codec::DecodeError;
use crate::protocol::suite::CryptoError;
use crate::protocol::wire::{GroupId, MemberId};

/// The broad cause of a [`MemberError`], for metrics and log levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCause {
    /// The input does not parse, or is not addressed to this member.
    Malformed,
    /// A signature, certificate, tag or key exchange did not check out.
    Crypto,
    /// The input is well formed and authentic (or would be), but old: a
    /// replay, a superseded message, or one for a session this member does
    /// not hold.
    Stale,
    /// The calling code used the member wrongly (or handed it a credential
    /// or state that does not fit).
    Misuse,
}

/// A member refused an input or a call. Nothing changed.
///
/// Messages name groups, rounds, counters and key ids (all public on the
/// wire), never key material or payloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MemberError {
    // ---- malformed input ------------------------------------------------
    /// The bytes are not the expected dapgw v1 message. Usually a damaged
    /// transfer, a message sent to the wrong handler, or tampering on the
    /// path.
    #[error("malformed message: {0}")]
    Malformed(#[from] DecodeError),
    /// The message is for a group this member does not belong to. Usually a
    /// gateway delivering another group's traffic (by mistake or on purpose).
    #[error("message for group {0}, which this member is not in")]
    NotOurGroup(GroupId),
    /// The message names another member. Usually a gateway delivering one
    /// member's confirm, rekey or key update to another.
    #[error("message addressed to member {0}")]
    NotForUs(MemberId),
    /// The persisted state handed to [`super::Member::restore`] does not
    /// decode: truncated, garbled (checksum mismatch), or not a member state
    /// at all. The string names the field where decoding stopped.
    #[error("persisted member state is invalid at {0}")]
    BadState(&'static str),

    // ---- cryptographic failure -----------------------------------------
    /// A key certificate in a challenge is not signed by the pinned root
    /// key, or certifies an invalid key. Usually a forged challenge.
    #[error("key certificate rejected: {0}")]
    BadKeyCertificate(CryptoError),
    /// The message names an online key id this member does not know (or it
    /// knows no online key yet). Usually a challenge that should have
    /// carried a key certificate, or a forgery.
    #[error("unknown online key id {0}")]
    UnknownKeyId(u32),
    /// A challenge or group message signature did not verify under the
    /// online key. Usually tampering on the path or a forgery.
    #[error("signature does not verify")]
    BadSignature,
    /// An AES-GCM tag did not verify (the string names the message).
    /// Usually tampering, a forgery, or a message sealed for another
    /// session or member.
    #[error("authentication tag mismatch in {0}")]
    BadTag(&'static str),
    /// The challenge's ephemeral key `E_V` is invalid (small order): the
    /// exchange would not depend on the member's secret. A broken or hostile
    /// verifier.
    #[error("key exchange failed: {0}")]
    KeyExchange(CryptoError),
    /// A key update arrived in a psk session. Key updates are only accepted
    /// in psk-ecdhe sessions, where an old root key does not reveal the new
    /// one.
    #[error("key update refused in a psk session")]
    KeyUpdateInPskSession,

    // ---- stale or replayed ---------------------------------------------
    /// The challenge's round is below the last round this member answered
    /// for the group. Usually a gateway replaying an old challenge.
    #[error("stale challenge: round {round} of group {group}, already answered {answered}")]
    StaleRound {
        /// The group.
        group: GroupId,
        /// The challenge's round.
        round: u64,
        /// The last round answered.
        answered: u64,
    },
    /// A different challenge for the round this member already answered.
    /// The member never seals a second response for a round.
    #[error("conflicting challenge for answered round {round} of group {group}")]
    ConflictingChallenge {
        /// The group.
        group: GroupId,
        /// The round.
        round: u64,
    },
    /// The challenge carries a key certificate of a lower version than the
    /// online key the member knows, or the same version for another key, or
    /// of a version below its credential's `min_online_key_version` (then
    /// `known` is that minimum). Usually a replayed old challenge.
    #[error("stale key certificate version {version}, known {known}")]
    StaleKeyCertificate {
        /// The certificate's version.
        version: u32,
        /// The known online key's version.
        known: u32,
    },
    /// The challenge's `not_after` is in the past of the clock the caller
    /// supplied. Usually a delayed challenge.
    #[error("challenge expired at {not_after}, now {now}")]
    Expired {
        /// The challenge's expiry, Unix seconds.
        not_after: u64,
        /// The caller's time, Unix seconds.
        now: u64,
    },
    /// A confirm for a round that is not pending: not answered, superseded
    /// by a later round, or already confirmed. Usually a retried or replayed
    /// confirm.
    #[error("no pending round {round} in group {group}")]
    NoPendingRound {
        /// The group.
        group: GroupId,
        /// The confirm's round.
        round: u64,
    },
    /// A group message, rekey or key update for a group in which this member
    /// holds no session (it has not completed a round, or lost its state).
    /// It waits for the next round.
    #[error("no session in group {0}")]
    NoSession(GroupId),
    /// The message names a session other than the current one (or the
    /// pending one, for a confirm). Usually a message for a superseded
    /// session.
    #[error("message for another session")]
    WrongSession,
    /// A group message for an epoch other than the current one. Below: a
    /// superseded message; above: this member missed a rekey.
    #[error("group message for epoch {epoch}, current {current}")]
    EpochMismatch {
        /// The message's epoch.
        epoch: u64,
        /// The member's current epoch.
        current: u64,
    },
    /// A rekey whose new epoch is not above the current one. Usually a
    /// replayed rekey.
    #[error("rekey to epoch {new_epoch}, current {current}")]
    StaleEpoch {
        /// The rekey's epoch.
        new_epoch: u64,
        /// The member's current epoch.
        current: u64,
    },
    /// A group message whose seq is not above the last one applied.
    /// Usually a replay or a duplicate delivery.
    #[error("group message seq {seq} already applied (last {applied})")]
    StaleSeq {
        /// The message's seq.
        seq: u64,
        /// The last applied seq.
        applied: u64,
    },
    /// A group message whose seq is below the latest seq a challenge
    /// announced: it has been superseded. Usually a gateway withholding an
    /// update and delivering an old one.
    #[error("group message seq {seq} superseded (announced {announced})")]
    SupersededSeq {
        /// The message's seq.
        seq: u64,
        /// The latest announced seq.
        announced: u64,
    },
    /// A group message valid only through a round below the last round this
    /// member answered. Usually a delayed message.
    #[error("group message valid through round {valid_through_round}, answered {answered}")]
    StaleValidity {
        /// The message's last valid round.
        valid_through_round: u64,
        /// The last round answered.
        answered: u64,
    },
    /// A rekey or key update whose down_ctr is not above the last seen in
    /// the session. Usually a replay.
    #[error("replayed downlink counter {down_ctr} (last {last})")]
    ReplayedDownCounter {
        /// The message's counter.
        down_ctr: u64,
        /// The last counter accepted.
        last: u64,
    },
    /// A key update to a version not above the current one. Usually a
    /// replay.
    #[error("stale key version {new_kv}, current {kv}")]
    StaleKeyVersion {
        /// The update's version.
        new_kv: u32,
        /// The current version.
        kv: u32,
    },

    // ---- caller misuse --------------------------------------------------
    /// The payload is longer than a response or uplink can carry
    /// ([`crate::protocol::wire::MAX_PAYLOAD`]).
    #[error("payload of {0} bytes is over the cap")]
    PayloadTooLong(usize),
    /// A non-empty payload for a challenge of purpose auth, whose response
    /// must be empty.
    #[error("the challenge requested no reading")]
    PayloadNotRequested,
    /// [`super::Member::seal_uplink`] was asked for an ack; acks are made
    /// only by [`super::Member::handle_group_message`].
    #[error("acks are sealed by handle_group_message")]
    AckNotAllowed,
    /// An uplink for a group where this member holds no session (or is not
    /// a member). Wait for the next round's confirm.
    #[error("no session in group {0} to seal an uplink")]
    SealWithoutSession(GroupId),
    /// The session's uplink counter is exhausted. Wait for the next round.
    #[error("uplink counter exhausted in group {0}")]
    CounterExhausted(GroupId),
    /// The credential cannot be used (the string says why).
    #[error("invalid member credential: {0}")]
    InvalidCredential(&'static str),
    /// The persisted state belongs to another member, another root key or
    /// an older credential (the string says which). Use the right state, or
    /// start fresh with [`super::Member::new`].
    #[error("persisted state does not match the credential: {0}")]
    StateMismatch(&'static str),
}

impl MemberError {
    /// The broad cause of this error.
    pub fn cause(&self) -> ErrorCause {
        use MemberError::*;
        match self {
            Malformed(_) | NotOurGroup(_) | NotForUs(_) | BadState(_) => ErrorCause::Malformed,
            BadKeyCertificate(_)
            | UnknownKeyId(_)
            | BadSignature
            | BadTag(_)
            | KeyExchange(_)
            | KeyUpdateInPskSession => ErrorCause::Crypto,
            StaleRound { .. }
            | ConflictingChallenge { .. }
            | StaleKeyCertificate { .. }
            | Expired { .. }
            | NoPendingRound { .. }
            | NoSession(_)
            | WrongSession
            | EpochMismatch { .. }
            | StaleEpoch { .. }
            | StaleSeq { .. }
            | SupersededSeq { .. }
            | StaleValidity { .. }
            | ReplayedDownCounter { .. }
            | StaleKeyVersion { .. } => ErrorCause::Stale,
            PayloadTooLong(_)
            | PayloadNotRequested
            | AckNotAllowed
            | SealWithoutSession(_)
            | CounterExhausted(_)
            | InvalidCredential(_)
            | StateMismatch(_) => ErrorCause::Misuse,
        }
    }
}
