//! The member state machine: what runs in a meter.
//!
//! Data flow: challenges, confirms, group messages, rekeys and key updates
//! arrive from V through the gateway and go into the `handle_*` methods;
//! responses and uplinks come out sealed, ready for the gateway to batch.
//! This is the `member --seal-->` end of the pipeline and the receiving end
//! of everything V sends back. Sans-IO: no clock (time is an optional
//! argument), no storage (state goes out as bytes), randomness comes in.
//!
//! # Persist before send
//!
//! Every call that changes state returns an [`Outbox`]. Nothing has happened
//! yet: the caller stores [`Outbox::state`] durably, then calls
//! [`Outbox::persisted`], which commits the change in memory and hands out
//! the message. Dropping the outbox instead abandons the change (the member
//! stays as it was). The outbox borrows the member mutably, so states are
//! produced and committed strictly one at a time, in order.
//!
//! ```no_run
//! # use dapgw::protocol::member::{Challenged, Member, MemberError};
//! # fn store(_: &[u8]) {}
//! # fn send(_: &[u8]) {}
//! # fn run(member: &mut Member, bytes: &[u8], rng: &mut impl rand_core::CryptoRng) -> Result<(), MemberError> {
//! match member.handle_challenge(bytes, None)? {
//!     // Same challenge as last time: the identical response again.
//!     Challenged::Resend(response) => send(&response),
//!     Challenged::Answer(answer) => {
//!         let reading: &[u8] = match answer.read_request() {
//!             Some(_request) => b"reading", // read the meter
//!             None => b"",
//!         };
//!         let out = answer.respond(reading, rng)?;
//!         if let Some(state) = out.state() {
//!             store(state); // durably, before anything is sent
//!         }
//!         send(&out.persisted());
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! # Call order
//!
//! 1. [`Member::new`] from the credential (first boot, or after losing the
//!    state), or [`Member::restore`] from the last state stored.
//! 2. For each round: [`Member::handle_challenge`], then (if V accepted the
//!    response) [`Member::handle_confirm`]; the confirm opens the session.
//! 3. Within a session, in any order: [`Member::seal_uplink`],
//!    [`Member::handle_group_message`] (whose outbox carries the ack uplink),
//!    [`Member::handle_rekey`], [`Member::handle_key_update`].
//!
//! # Lost state
//!
//! A member that lost its state starts again from its credential with
//! [`Member::new`]: it holds no session (uplinks are refused until the next
//! round's confirm), knows no online key until a challenge carries a key
//! certificate (of at least the credential's `min_online_key_version`: an
//! online key retired before the credential was written, for example
//! because it leaked, cannot sign challenges to it), and may answer a replayed old challenge, which V refuses
//! because the round is closed. It applies no group message below the seq
//! the next challenge announces, so a superseded update cannot be pushed on
//! it. If its root key was rotated by a key update, the credential's key is
//! the old one and V refuses its responses as a stale key version: such a
//! meter needs a new credential.

mod error;
mod state;
#[cfg(test)]
mod tests;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

pub use error::{ErrorCause, MemberError};
pub use state::MemberState;
use state::{Answered, MAX_GROUPS, OnlineKey, Pending, Session};

use super::keys::{
    MemberCredential, MemberKey, response_keys, session_keys, transcript_hash, uplink_nonce,
    verify_key_certificate,
};
use super::suite::{EphemeralKeyPair, Gcm, Secret, VerifyingKey, aggregate, ct_eq};
use super::wire::{
    AckPayload, CONFIRM_LEN, Challenge, Confirm, Direct, DirectInner, GroupId, GroupMessage,
    KEY_CERTIFICATE_LEN, KEY_UPDATE_LEN, KeyUpdate, MAX_DIRECT_INNER, MAX_GROUP_CIPHERTEXT,
    MAX_PAYLOAD, MAX_READ_REQUEST, MemberId, Mode, Purpose, REKEY_LEN, Rekey, Response, SessionId,
    TAG_LEN, Uplink, UplinkKind,
};

/// Uplink counters reserved per persisted high-water mark: one state write
/// covers this many uplinks.
pub const COUNTER_BLOCK: u64 = 32;

/// Longest possible Challenge (psk-ecdhe, full read request, expiry and key
/// certificate); anything longer is refused before it is copied or parsed.
const MAX_CHALLENGE_LEN: usize = 2
    + 4
    + 8
    + 8
    + 16
    + 1
    + 32
    + (1 + 2 + MAX_READ_REQUEST)
    + 8
    + 32
    + (1 + 8)
    + (1 + KEY_CERTIFICATE_LEN)
    + 4
    + 64;
/// Longest possible GroupMessage.
const MAX_GROUP_MESSAGE_LEN: usize = 2 + 4 + 8 + 8 + 8 + 12 + 4 + MAX_GROUP_CIPHERTEXT + 4 + 64;

/// One meter's side of dapgw: answers challenges, holds its sessions, seals
/// uplinks and applies what V sends.
///
/// See the [module documentation](self) for the call order and the
/// persist-before-send rule. Debug output names the member, never a key.
pub struct Member {
    /// V's offline root key, pinned by the credential.
    root: VerifyingKey,
    /// The credential's lowest trusted online key version.
    min_online: u32,
    /// The committed state: what the caller last persisted (or could derive
    /// from the credential), plus the in-memory uplink counters.
    state: MemberState,
}

impl core::fmt::Debug for Member {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Member")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// What a checked challenge asks of the member.
#[derive(Debug)]
#[must_use = "a checked challenge must be answered or re-sent"]
pub enum Challenged<'m> {
    /// The challenge is the one already answered: send these bytes again,
    /// exactly as they are. Nothing changed and nothing needs persisting.
    Resend(Bytes),
    /// A fresh, verified challenge: answer it with [`Answer::respond`].
    Answer(Answer<'m>),
}

/// A verified challenge waiting for the member's answer (and, for purpose
/// read, its reading). Dropping it changes nothing.
#[must_use = "an unanswered challenge changes nothing"]
pub struct Answer<'m> {
    member: &'m mut Member,
    /// Boxed: the challenge is large and `Challenged` is passed by value.
    challenge: Box<Challenge>,
    ch_hash: [u8; 32],
    /// The online key a certificate in the challenge introduced, stored with
    /// the response.
    new_online: Option<Box<OnlineKey>>,
}

impl core::fmt::Debug for Answer<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Answer")
            .field("group", &self.challenge.group)
            .field("round", &self.challenge.round)
            .finish_non_exhaustive()
    }
}

/// A state change and the message it covers, released in that order.
///
/// 1. [`Outbox::state`]: if `Some`, store these bytes durably (they replace
///    any earlier state).
/// 2. [`Outbox::event`] may be read at any time (for example, to apply a
///    group update before persisting that it was applied).
/// 3. [`Outbox::persisted`]: commits the change and returns the message `M`
///    to send (or the result to act on).
///
/// Dropped without `persisted`, nothing changes.
#[must_use = "the change happens, and the message is released, only through persisted()"]
pub struct Outbox<'m, M, E = ()> {
    member: &'m mut Member,
    /// The state that replaces the member's on commit; `None` when nothing
    /// persistent changes.
    next: Option<Box<MemberState>>,
    state: Option<Zeroizing<Vec<u8>>>,
    message: M,
    event: E,
}

impl<M, E: core::fmt::Debug> core::fmt::Debug for Outbox<'_, M, E> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Outbox")
            .field("state_len", &self.state.as_ref().map(|s| s.len()))
            .field("event", &self.event)
            .finish_non_exhaustive()
    }
}

impl<'m, M, E> Outbox<'m, M, E> {
    fn new(member: &'m mut Member, next: Option<Box<MemberState>>, message: M, event: E) -> Self {
        let state = next.as_ref().map(|s| s.to_bytes());
        Self {
            member,
            next,
            state,
            message,
            event,
        }
    }

    /// The new state to store before [`Outbox::persisted`], or `None` when
    /// nothing that must survive a reboot changed. Contains secrets.
    pub fn state(&self) -> Option<&[u8]> {
        self.state.as_deref().map(Vec::as_slice)
    }

    /// What happened, readable before the state is stored.
    pub fn event(&self) -> &E {
        &self.event
    }

    /// Declares that [`Outbox::state`] (if any) is durably stored; commits
    /// the change and returns the message to send.
    pub fn persisted(self) -> M {
        if let Some(next) = self.next {
            self.member.state = *next;
        }
        self.message
    }
}

/// A confirm was opened: the member is in a new session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Confirmed {
    /// The group.
    pub group: GroupId,
    /// The round the confirm belongs to.
    pub round: u64,
    /// The group epoch the member now holds: the confirm's, or a higher one
    /// a rekey of the previous session brought first.
    pub epoch: u64,
    /// The new session.
    pub sid: SessionId,
}

/// A group message that verified and decrypted.
#[derive(Clone, PartialEq, Eq)]
pub struct GroupUpdate {
    /// The group.
    pub group: GroupId,
    /// The epoch it was sealed in.
    pub epoch: u64,
    /// Its seq, now the last applied.
    pub seq: u64,
    /// The plaintext update (configuration), to apply idempotently; empty
    /// when `resent`.
    pub payload: Zeroizing<Vec<u8>>,
    /// The last message applied, delivered again (a downlink replayed
    /// after a crash, a gateway re-sending): nothing to apply, nothing
    /// changes, and the message to send is the ack sent for it the first
    /// time, byte for byte.
    pub resent: bool,
}

impl core::fmt::Debug for GroupUpdate {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("GroupUpdate")
            .field("group", &self.group)
            .field("epoch", &self.epoch)
            .field("seq", &self.seq)
            .field("payload_len", &self.payload.len())
            .field("resent", &self.resent)
            .finish()
    }
}

/// A rekey was applied: a new group epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rekeyed {
    /// The group.
    pub group: GroupId,
    /// The new epoch.
    pub epoch: u64,
}

/// A key update was applied: the member's root key moved to a new version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyUpdated {
    /// The new key version, used by the next responses.
    pub kv: u32,
}

impl Member {
    /// A member with no history, from its credential: first boot, or after
    /// losing its state (see "Lost state" in the module doc).
    pub fn new(credential: &MemberCredential) -> Result<Self, MemberError> {
        let root = VerifyingKey::from_bytes(&credential.root_public_key)
            .map_err(|_| MemberError::InvalidCredential("root public key"))?;
        let groups = credential.groups.iter().map(|g| GroupId(*g));
        let state = MemberState::fresh(
            MemberId(credential.id),
            credential.kv,
            credential.key.clone(),
            credential.root_public_key,
            groups,
        );
        if state.groups.len() > MAX_GROUPS {
            return Err(MemberError::InvalidCredential("too many groups"));
        }
        Ok(Self {
            root,
            min_online: credential.min_online_key_version,
            state,
        })
    }

    /// A member continuing from the state it last persisted.
    ///
    /// The state must belong to this credential's member and root key, with
    /// a key version no older than the credential's (the same key if the
    /// same version). Groups follow the credential: a group added there
    /// starts fresh, a group removed there is forgotten. Uplink counters
    /// continue above the persisted high-water mark.
    ///
    /// `persisted` must be the newest state the caller persisted: the
    /// member cannot tell an older one (a storage rollback, an image
    /// restored from a backup), and counters above that state's high-water
    /// mark may already have sealed uplinks, so restoring it would reuse
    /// an AES-GCM nonce under `k_up`. A device that cannot rule a rollback
    /// out treats it as lost state: [`Member::new`] (no session; the next
    /// round gives a new one).
    ///
    /// Every session's uplink counter, and the first counter of a session
    /// a stored answer will open, jump forward by a random amount between
    /// 2^32 and 2^33 (`rng`). The contract stays that an older copy is
    /// never restored (deviation 14), but if one is, the counters it would
    /// reuse under the same `k_up` (the sessions of the copy, and the
    /// session its answer's confirm rebuilds when V's stored confirm is
    /// delivered again) are skipped: two restores of one copy reuse a
    /// nonce only if their jumps land within the uplinks sent after them,
    /// a chance of about their number over 2^32. V's replay window takes
    /// any counter above the last it accepted; uplinks sent before the
    /// restore and delivered after the first one following it fall more
    /// than 64 below and are refused as replays.
    pub fn restore(
        credential: &MemberCredential,
        persisted: &[u8],
        rng: &mut impl rand_core::CryptoRng,
    ) -> Result<Self, MemberError> {
        let fresh = Self::new(credential)?;
        let mut state = MemberState::decode(persisted)?;
        if state.id.0 != credential.id {
            return Err(MemberError::StateMismatch("member id"));
        }
        if !ct_eq(&state.root_public, &credential.root_public_key) {
            return Err(MemberError::StateMismatch("root public key"));
        }
        if state.kv < credential.kv
            || (state.kv == credential.kv && state.root_key != credential.key)
        {
            return Err(MemberError::StateMismatch("member key version"));
        }
        let mut groups = fresh.state.groups;
        for (g, s) in groups.iter_mut() {
            if let Some(old) = state.groups.remove(g) {
                *s = old;
            }
            if let Some(session) = s.session.as_mut() {
                session.ctr_reserved = session.ctr_reserved.saturating_add(restore_jump(rng));
                session.ctr_used = session.ctr_reserved;
            }
            if let Some(pending) = s.answered.as_mut().and_then(|a| a.pending.as_mut()) {
                pending.ctr_start = restore_jump(rng);
            }
        }
        state.groups = groups;
        // A credential issued after the online key the state trusts was
        // retired: forget that key (the next challenge certifies the
        // current one).
        if state
            .online
            .is_some_and(|k| k.key_version < fresh.min_online)
        {
            state.online = None;
        }
        Ok(Self {
            root: fresh.root,
            min_online: fresh.min_online,
            state,
        })
    }

    /// The member id.
    pub fn id(&self) -> MemberId {
        self.state.id
    }

    /// The current root key version (sent in responses).
    pub fn kv(&self) -> u32 {
        self.state.kv
    }

    /// The committed state's encoding, for an initial or periodic save.
    pub fn state_bytes(&self) -> Zeroizing<Vec<u8>> {
        self.state.to_bytes()
    }

    /// The current session of `group`: its id and group epoch.
    pub fn session(&self, group: GroupId) -> Option<(SessionId, u64)> {
        let s = self.state.groups.get(&group)?.session.as_ref()?;
        Some((s.sid, s.epoch))
    }

    /// The last round answered in `group`.
    pub fn last_round(&self, group: GroupId) -> Option<u64> {
        Some(self.state.groups.get(&group)?.answered.as_ref()?.round)
    }

    /// The online signing key currently trusted: `(key_id, key_version)`.
    pub fn online_key(&self) -> Option<(u32, u32)> {
        self.state.online.map(|k| (k.key_id, k.key_version))
    }

    /// Checks a challenge: cheap checks first (size, decoding, group, round
    /// against the last answered), then the key certificate if present, the
    /// signature, and `not_after` if the caller has a clock (`now`, Unix
    /// seconds). Changes nothing; the state changes when the returned
    /// [`Answer`] is answered and persisted.
    pub fn handle_challenge(
        &mut self,
        bytes: &[u8],
        now: Option<u64>,
    ) -> Result<Challenged<'_>, MemberError> {
        let bytes = copy_capped(bytes, MAX_CHALLENGE_LEN, "challenge")?;
        let ch = Challenge::decode(&bytes)?;
        let group = self
            .state
            .groups
            .get(&ch.group)
            .ok_or(MemberError::NotOurGroup(ch.group))?;
        let ch_hash: [u8; 32] = Sha256::digest(&bytes).into();
        if let Some(a) = &group.answered {
            if ch.round < a.round {
                return Err(MemberError::StaleRound {
                    group: ch.group,
                    round: ch.round,
                    answered: a.round,
                });
            }
            if ch.round == a.round {
                return if ch_hash == a.ch_hash {
                    Ok(Challenged::Resend(a.response.clone()))
                } else {
                    Err(MemberError::ConflictingChallenge {
                        group: ch.group,
                        round: ch.round,
                    })
                };
            }
        }
        let new_online = self.check_key_certificate(&ch)?;
        let online = new_online
            .as_deref()
            .copied()
            .or(self.state.online)
            .ok_or(MemberError::UnknownKeyId(ch.key_id))?;
        if online.key_id != ch.key_id {
            return Err(MemberError::UnknownKeyId(ch.key_id));
        }
        online
            .key
            .verify(&ch.signed_bytes(), &ch.signature)
            .map_err(|_| MemberError::BadSignature)?;
        if let (Some(now), Some(not_after)) = (now, ch.not_after)
            && now > not_after
        {
            return Err(MemberError::Expired { not_after, now });
        }
        Ok(Challenged::Answer(Answer {
            member: self,
            challenge: Box::new(ch),
            ch_hash,
            new_online,
        }))
    }

    /// The online key a challenge's certificate introduces: `None` without a
    /// certificate or for the one already known; refused if the root did not
    /// sign it, its version is not above the known one, or it is below the
    /// credential's `min_online_key_version`.
    fn check_key_certificate(&self, ch: &Challenge) -> Result<Option<Box<OnlineKey>>, MemberError> {
        let Some(cert) = &ch.key_cert else {
            return Ok(None);
        };
        if cert.key_version < self.min_online {
            return Err(MemberError::StaleKeyCertificate {
                version: cert.key_version,
                known: self.min_online,
            });
        }
        if let Some(known) = &self.state.online {
            let same = cert.key_id == known.key_id
                && cert.key_version == known.key_version
                && cert.public_key == known.key.to_bytes();
            if same {
                return Ok(None);
            }
            if cert.key_version <= known.key_version {
                return Err(MemberError::StaleKeyCertificate {
                    version: cert.key_version,
                    known: known.key_version,
                });
            }
        }
        let key = verify_key_certificate(
            &self.root,
            cert.key_id,
            cert.key_version,
            &cert.public_key,
            &cert.root_sig,
        )
        .map_err(MemberError::BadKeyCertificate)?;
        Ok(Some(Box::new(OnlineKey {
            key_id: cert.key_id,
            key_version: cert.key_version,
            key,
        })))
    }

    /// Opens V's confirm for the pending round of its group: on success the
    /// member has authenticated V and switches to the new session, holding
    /// the group key the confirm carries, or the one it already holds when
    /// a rekey that overtook the confirm moved it to a higher epoch.
    /// Anything else is refused and changes nothing.
    pub fn handle_confirm(&mut self, bytes: &[u8]) -> Result<Outbox<'_, Confirmed>, MemberError> {
        let bytes = copy_capped(bytes, CONFIRM_LEN, "confirm")?;
        let c = Confirm::decode(&bytes)?;
        let group = self
            .state
            .groups
            .get(&c.group)
            .ok_or(MemberError::NotOurGroup(c.group))?;
        if c.id != self.state.id {
            return Err(MemberError::NotForUs(c.id));
        }
        let no_pending = MemberError::NoPendingRound {
            group: c.group,
            round: c.round,
        };
        let (answered, pending) = match &group.answered {
            Some(a) if a.round == c.round => (a, a.pending.as_ref().ok_or(no_pending)?),
            _ => return Err(no_pending),
        };
        if c.sid.0 != pending.keys.sid {
            return Err(MemberError::WrongSession);
        }
        // W = GK_e [16] || tag [16] under the single-use k_conf / iv_conf.
        let mut gk = Zeroizing::new([0u8; 16]);
        gk.copy_from_slice(&c.w[..16]);
        let mut tag = [0u8; 16];
        tag.copy_from_slice(&c.w[16..]);
        Gcm::new(pending.keys.k_conf.expose())
            .open_in_place(
                pending.keys.iv_conf.expose(),
                &c.aad(),
                gk.as_mut_slice(),
                &tag,
            )
            .map_err(|_| MemberError::BadTag("confirm"))?;
        // A revocation rekey of the old session can overtake the confirm on
        // the downlink. Both came from V, so the higher epoch wins: going
        // back to GK_e would hold the key of an ended epoch (one a revoked
        // member knows) and refuse the next group messages.
        let (epoch, gk) = match &group.session {
            Some(s) if s.epoch > c.epoch => (s.epoch, s.gk.clone()),
            _ => (c.epoch, Secret::from_bytes(*gk)),
        };
        let session = Session {
            round: answered.round,
            mode: pending.mode,
            sid: c.sid,
            k_up: pending.keys.k_up.clone(),
            iv_up: pending.keys.iv_up.clone(),
            k_down: pending.keys.k_down.clone(),
            epoch,
            gk,
            ctr_reserved: pending.ctr_start,
            ctr_used: pending.ctr_start,
            down_ctr: None,
        };
        let mut next = Box::new(self.state.clone());
        if let Some(g) = next.groups.get_mut(&c.group) {
            // k_conf has done its one job; erase it with the pending keys.
            if let Some(a) = g.answered.as_mut() {
                a.pending = None;
            }
            g.session = Some(session);
        }
        let confirmed = Confirmed {
            group: c.group,
            round: c.round,
            epoch,
            sid: c.sid,
        };
        Ok(Outbox::new(self, Some(next), confirmed, ()))
    }

    /// Seals a reading or an alarm for V in the current session of `group`.
    ///
    /// Counters increase strictly from 1. When the next counter passes the
    /// persisted high-water mark, the outbox carries a state reserving the
    /// next [`COUNTER_BLOCK`] counters; otherwise it carries none.
    pub fn seal_uplink(
        &mut self,
        group: GroupId,
        kind: UplinkKind,
        payload: &[u8],
    ) -> Result<Outbox<'_, Bytes>, MemberError> {
        if kind == UplinkKind::Ack {
            return Err(MemberError::AckNotAllowed);
        }
        if payload.len() > MAX_PAYLOAD {
            return Err(MemberError::PayloadTooLong(payload.len()));
        }
        let id = self.state.id;
        let session = self
            .state
            .groups
            .get_mut(&group)
            .and_then(|g| g.session.as_mut())
            .ok_or(MemberError::SealWithoutSession(group))?;
        let ctr = next_counter(session, group)?;
        let msg = seal_uplink_in(session, id, group, kind, ctr, payload);
        // Burned in memory at once: no counter is sealed twice, even if
        // this outbox is dropped.
        session.ctr_used = ctr;
        let next = (ctr > session.ctr_reserved).then(|| {
            let mut next = Box::new(self.state.clone());
            if let Some(s) = next.groups.get_mut(&group).and_then(|g| g.session.as_mut()) {
                reserve_counter(s, ctr);
            }
            next
        });
        Ok(Outbox::new(self, next, msg, ()))
    }

    /// Checks a group message in the design's order (group, epoch, seq
    /// against the last applied and the announced, validity round,
    /// signature), then decrypts it with `GK_e`.
    ///
    /// The outbox's event is the update; its message is the ack uplink; its
    /// state records the seq as applied (and reserves counters if needed).
    /// Apply the update (idempotently) before persisting, so a crash in
    /// between makes the member apply it again rather than lose it.
    ///
    /// The last message applied, delivered again byte for byte, is not
    /// refused as stale: its event says `resent` (nothing to apply), no
    /// state changes, and its message is the ack sent the first time, so
    /// an ack lost before it reached V is sent again unchanged.
    pub fn handle_group_message(
        &mut self,
        bytes: &[u8],
    ) -> Result<Outbox<'_, Bytes, GroupUpdate>, MemberError> {
        let bytes = copy_capped(bytes, MAX_GROUP_MESSAGE_LEN, "group_message")?;
        let m = GroupMessage::decode(&bytes)?;
        let group = self
            .state
            .groups
            .get(&m.group)
            .ok_or(MemberError::NotOurGroup(m.group))?;
        // The last message applied, byte for byte (so authentic: it was
        // verified when applied): its ack again, as first sealed. An ack
        // lost to a crash before it left, or to failed sends, is not lost
        // for good; no counter is used. (Hashed only for that seq.)
        if let (Some(seq), Some(sent)) = (group.applied_seq, &group.applied_ack)
            && seq == m.seq
            && sent.message_hash == <[u8; 32]>::from(Sha256::digest(&bytes))
        {
            let ack = sent.ack.clone();
            let update = GroupUpdate {
                group: m.group,
                epoch: m.epoch,
                seq: m.seq,
                payload: Zeroizing::new(Vec::new()),
                resent: true,
            };
            return Ok(Outbox::new(self, None, ack, update));
        }
        let session = group
            .session
            .as_ref()
            .ok_or(MemberError::NoSession(m.group))?;
        if m.epoch != session.epoch {
            return Err(MemberError::EpochMismatch {
                epoch: m.epoch,
                current: session.epoch,
            });
        }
        if let Some(applied) = group.applied_seq
            && m.seq <= applied
        {
            return Err(MemberError::StaleSeq {
                seq: m.seq,
                applied,
            });
        }
        if m.seq < group.announced_seq {
            return Err(MemberError::SupersededSeq {
                seq: m.seq,
                announced: group.announced_seq,
            });
        }
        let answered = group.answered.as_ref().map_or(0, |a| a.round);
        if m.valid_through_round < answered {
            return Err(MemberError::StaleValidity {
                valid_through_round: m.valid_through_round,
                answered,
            });
        }
        let online = self
            .state
            .online
            .filter(|k| k.key_id == m.key_id)
            .ok_or(MemberError::UnknownKeyId(m.key_id))?;
        online
            .key
            .verify(&m.signed_bytes(), &m.signature)
            .map_err(|_| MemberError::BadSignature)?;
        // The decoder guarantees at least a tag's worth of ciphertext.
        let split = m.c.len().saturating_sub(TAG_LEN);
        let mut payload = Zeroizing::new(m.c[..split].to_vec());
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&m.c[split..]);
        Gcm::new(session.gk.expose())
            .open_in_place(&m.nonce, &m.aad(), &mut payload, &tag)
            .map_err(|_| MemberError::BadTag("group message"))?;

        let ctr = next_counter(session, m.group)?;
        let message_hash: [u8; 32] = Sha256::digest(&bytes).into();
        let ack = AckPayload {
            group: m.group,
            epoch: m.epoch,
            seq: m.seq,
            message_hash,
        };
        let msg = seal_uplink_in(
            session,
            self.state.id,
            m.group,
            UplinkKind::Ack,
            ctr,
            &ack.to_array(),
        );
        // Burn the counter in memory at once (as in `seal_uplink`).
        if let Some(s) = self
            .state
            .groups
            .get_mut(&m.group)
            .and_then(|g| g.session.as_mut())
        {
            s.ctr_used = ctr;
        }
        let mut next = Box::new(self.state.clone());
        if let Some(g) = next.groups.get_mut(&m.group) {
            g.applied_seq = Some(m.seq);
            g.applied_ack = Some(state::AppliedAck {
                message_hash,
                ack: msg.clone(),
            });
            if let Some(s) = g.session.as_mut() {
                reserve_counter(s, ctr);
            }
        }
        let update = GroupUpdate {
            group: m.group,
            epoch: m.epoch,
            seq: m.seq,
            payload,
            resent: false,
        };
        Ok(Outbox::new(self, Some(next), msg, update))
    }

    /// Applies a rekey: only for the current session, with a down_ctr above
    /// the last seen and a new epoch above the current one; `GK_{e+1}`
    /// replaces `GK_e`.
    pub fn handle_rekey(&mut self, bytes: &[u8]) -> Result<Outbox<'_, Rekeyed>, MemberError> {
        let bytes = copy_capped(bytes, REKEY_LEN, "rekey")?;
        let m = Rekey::decode(&bytes)?;
        let session = self.downlink_session(m.group, m.id, m.sid, m.down_ctr)?;
        if m.new_epoch <= session.epoch {
            return Err(MemberError::StaleEpoch {
                new_epoch: m.new_epoch,
                current: session.epoch,
            });
        }
        let mut gk = Zeroizing::new([0u8; 16]);
        open_downlink(
            session,
            &m.nonce,
            &m.aad(),
            &m.c,
            gk.as_mut_slice(),
            "rekey",
        )?;
        let mut next = Box::new(self.state.clone());
        if let Some(s) = next
            .groups
            .get_mut(&m.group)
            .and_then(|g| g.session.as_mut())
        {
            s.gk = Secret::from_bytes(*gk);
            s.epoch = m.new_epoch;
            s.down_ctr = Some(m.down_ctr);
        }
        let event = Rekeyed {
            group: m.group,
            epoch: m.new_epoch,
        };
        Ok(Outbox::new(self, Some(next), event, ()))
    }

    /// Applies a key update: same session and down_ctr checks as a rekey,
    /// only in a psk-ecdhe session, only to a higher key version. The next
    /// responses use the new key and version.
    pub fn handle_key_update(
        &mut self,
        bytes: &[u8],
    ) -> Result<Outbox<'_, KeyUpdated>, MemberError> {
        let bytes = copy_capped(bytes, KEY_UPDATE_LEN, "key_update")?;
        let m = KeyUpdate::decode(&bytes)?;
        let session = self.downlink_session(m.group, m.id, m.sid, m.down_ctr)?;
        if session.mode != Mode::PskEcdhe {
            return Err(MemberError::KeyUpdateInPskSession);
        }
        if m.new_kv <= self.state.kv {
            return Err(MemberError::StaleKeyVersion {
                new_kv: m.new_kv,
                kv: self.state.kv,
            });
        }
        let mut key = Zeroizing::new([0u8; 32]);
        open_downlink(
            session,
            &m.nonce,
            &m.aad(),
            &m.c,
            key.as_mut_slice(),
            "key update",
        )?;
        let mut next = Box::new(self.state.clone());
        next.kv = m.new_kv;
        next.root_key = MemberKey::from_bytes(*key);
        if let Some(s) = next
            .groups
            .get_mut(&m.group)
            .and_then(|g| g.session.as_mut())
        {
            s.down_ctr = Some(m.down_ctr);
        }
        let event = KeyUpdated { kv: m.new_kv };
        Ok(Outbox::new(self, Some(next), event, ()))
    }

    /// The session a rekey or key update is for, after the checks they
    /// share: group, member, current session, fresh down_ctr.
    fn downlink_session(
        &self,
        group: GroupId,
        id: MemberId,
        sid: SessionId,
        down_ctr: u64,
    ) -> Result<&Session, MemberError> {
        let g = self
            .state
            .groups
            .get(&group)
            .ok_or(MemberError::NotOurGroup(group))?;
        if id != self.state.id {
            return Err(MemberError::NotForUs(id));
        }
        let session = g.session.as_ref().ok_or(MemberError::NoSession(group))?;
        if sid != session.sid {
            return Err(MemberError::WrongSession);
        }
        if let Some(last) = session.down_ctr
            && down_ctr <= last
        {
            return Err(MemberError::ReplayedDownCounter { down_ctr, last });
        }
        Ok(session)
    }
}

impl<'m> Answer<'m> {
    /// The challenge's group.
    pub fn group(&self) -> GroupId {
        self.challenge.group
    }

    /// The challenge's round.
    pub fn round(&self) -> u64 {
        self.challenge.round
    }

    /// The read request, for purpose read; `None` for purpose auth (answer
    /// with an empty payload).
    pub fn read_request(&self) -> Option<&[u8]> {
        match &self.challenge.purpose {
            Purpose::Auth => None,
            Purpose::Read(req) => Some(req),
        }
    }

    /// Seals the response: fresh `N_i` (and `e_i` in psk-ecdhe), the
    /// transcript hash, the response and session keys, and AES-128-GCM over
    /// `payload` (empty for purpose auth, the reading for purpose read).
    ///
    /// The outbox's state records the round, the challenge hash, the exact
    /// response bytes, the pending session keys and the newly announced seq;
    /// store it before sending the response.
    pub fn respond(
        self,
        payload: &[u8],
        rng: &mut impl rand_core::CryptoRng,
    ) -> Result<Outbox<'m, Bytes>, MemberError> {
        let ch = &self.challenge;
        if matches!(ch.purpose, Purpose::Auth) && !payload.is_empty() {
            return Err(MemberError::PayloadNotRequested);
        }
        if payload.len() > MAX_PAYLOAD {
            return Err(MemberError::PayloadTooLong(payload.len()));
        }
        let state = &self.member.state;
        let mut n_i = [0u8; 16];
        rng.fill_bytes(&mut n_i);
        // psk-ecdhe: a fresh e_i, used once right here and dropped (erased)
        // at the end of this call; the session keys are what persists.
        let ephemeral = ch.e_v.map(|e_v| (EphemeralKeyPair::generate(rng), e_v));
        let e_i = ephemeral.as_ref().map(|(e, _)| e.public());
        let dh = match &ephemeral {
            Some((e, e_v)) => Some(e.diffie_hellman(e_v).map_err(MemberError::KeyExchange)?),
            None => None,
        };
        drop(ephemeral);
        let th = transcript_hash(&self.ch_hash, state.id.0, state.kv, &n_i, e_i.as_ref());
        let (resp, prk0) = response_keys(&state.root_key, &th);
        let keys = session_keys(&prk0, dh.as_ref());
        drop((prk0, dh));

        let mut c = payload.to_vec();
        let tag = Gcm::new(resp.k_resp.expose()).seal_in_place(resp.iv_resp.expose(), &th, &mut c);
        let response = Response {
            id: state.id,
            kv: state.kv,
            group: ch.group,
            round: ch.round,
            n_i,
            e_i,
            c: Bytes::from(c),
            tag,
        }
        .to_bytes();

        let mut next = Box::new(state.clone());
        if let Some(online) = self.new_online {
            next.online = Some(*online);
        }
        if let Some(g) = next.groups.get_mut(&ch.group) {
            g.announced_seq = g.announced_seq.max(ch.group_seq);
            g.answered = Some(Answered {
                round: ch.round,
                ch_hash: self.ch_hash,
                response: response.clone(),
                pending: Some(Pending {
                    mode: ch.mode(),
                    keys,
                    ctr_start: 0,
                }),
            });
        }
        n_i.zeroize();
        Ok(Outbox::new(self.member, Some(next), response, ()))
    }
}

/// Wraps a response or uplink sealed by a member for the direct path (flow
/// A, when its gateway is down): a Direct message, a batch of one whose
/// aggregate the member computes over its own tag. Send the result to V
/// after the outbox that produced `sealed` was persisted.
pub fn direct(sealed: &[u8]) -> Result<Bytes, MemberError> {
    let bytes = copy_capped(sealed, MAX_DIRECT_INNER, "direct.inner")?;
    let inner = DirectInner::decode(&bytes)?;
    let tag = match &inner {
        DirectInner::Response(r) => r.tag,
        DirectInner::Uplink(u) => u.tag,
    };
    Ok(Direct::new(&inner, aggregate([&tag])).to_bytes())
}

/// Copies an input after checking it against the largest valid message, so
/// an oversized input costs neither an allocation nor a parse.
fn copy_capped(bytes: &[u8], cap: usize, what: &'static str) -> Result<Bytes, MemberError> {
    if bytes.len() > cap {
        return Err(MemberError::Malformed(
            crate::protocol::codec::DecodeError::TooLong(what),
        ));
    }
    Ok(Bytes::copy_from_slice(bytes))
}

/// How far [`Member::restore`] moves uplink counters: 2^32 plus a uniform
/// draw below 2^32.
fn restore_jump(rng: &mut impl rand_core::CryptoRng) -> u64 {
    (1u64 << 32) + (rng.next_u64() >> 32)
}

/// The counter the session's next uplink uses.
fn next_counter(session: &Session, group: GroupId) -> Result<u64, MemberError> {
    session
        .ctr_used
        .checked_add(1)
        .ok_or(MemberError::CounterExhausted(group))
}

/// Reserves the block starting at `ctr` when `ctr` passes the mark.
fn reserve_counter(session: &mut Session, ctr: u64) {
    if ctr > session.ctr_reserved {
        session.ctr_reserved = ctr.saturating_add(COUNTER_BLOCK - 1);
    }
}

/// Seals one uplink under the session's `k_up` with nonce `iv_up XOR ctr`.
fn seal_uplink_in(
    session: &Session,
    id: MemberId,
    group: GroupId,
    kind: UplinkKind,
    ctr: u64,
    payload: &[u8],
) -> Bytes {
    let mut c = payload.to_vec();
    let aad = super::wire::uplink_aad(kind, group, id, session.sid, ctr);
    let tag = Gcm::new(session.k_up.expose()).seal_in_place(
        &uplink_nonce(&session.iv_up, ctr),
        &aad,
        &mut c,
    );
    Uplink {
        group,
        id,
        sid: session.sid,
        kind,
        ctr,
        c: Bytes::from(c),
        tag,
    }
    .to_bytes()
}

/// Opens a fixed-size secret (a group key or a root key) sealed under the
/// session's `k_down`: `sealed` is ciphertext followed by the tag, `out`
/// receives the plaintext.
fn open_downlink(
    session: &Session,
    nonce: &[u8; 12],
    aad: &[u8],
    sealed: &[u8],
    out: &mut [u8],
    what: &'static str,
) -> Result<(), MemberError> {
    let (ct, tag) = sealed.split_at(out.len());
    let tag: &[u8; TAG_LEN] = tag.try_into().map_err(|_| MemberError::BadTag(what))?;
    out.copy_from_slice(ct);
    Gcm::new(session.k_down.expose())
        .open_in_place(nonce, aad, out, tag)
        .map_err(|_| MemberError::BadTag(what))
}
