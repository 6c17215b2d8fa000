//! The verifier's mutable protocol state, as plain serializable values the
//! caller loads before a call and stores after it.
//!
//! Data flow: the UDC keeps one [`GroupState`] per group, one [`RoundState`]
//! per open round, and one [`SessionSlot`] per (member, group). It loads the
//! ones a batch or an operation needs, lets the verifier change them in
//! memory, and writes them back in the same transaction as the verdict. The
//! verifier itself keeps nothing between calls.
//!
//! # Encoding
//!
//! Every state type derives serde with the field names below; byte strings
//! (keys, nonces, hashes) are serialized with `serialize_bytes`, enums as
//! their names, ids as plain integers. The encoding is stable for protocol
//! version 1: fields are only ever added with a default. Values that hold
//! secrets ([`GroupState::gk`], [`RoundState`]'s `E_V` secret, the keys of a
//! [`SessionState`]) must be sealed under the storage key
//! ([`StorageKey`](crate::protocol::keys::StorageKey)) with the row's
//! identity in the AAD before they touch a disk.

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use super::UsageError;
use crate::protocol::codec::{DecodeError, SliceWriter};
use crate::protocol::suite::{Iv12, Key16, Key32};
use crate::protocol::wire::{Confirm, GroupId, MemberId, Mode, SessionId};

/// Size of the uplink replay window, in counters.
pub const REPLAY_WINDOW: u64 = 64;

/// How many recent group messages a [`GroupState`] remembers for checking
/// acks.
pub const SENT_MESSAGES_KEPT: usize = 32;

/// Added to round, epoch and seq by [`GroupState::after_restore`].
pub const RESTORE_OFFSET: u64 = 1 << 32;

/// A group message V sent, as an ack must name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentMessage {
    /// Its seq.
    pub seq: u64,
    /// The epoch whose key sealed it.
    pub epoch: u64,
    /// SHA-256 of the complete message bytes.
    #[serde(with = "byte_array")]
    pub hash: [u8; 32],
}

/// The long-lived state of one group.
///
/// Holds the current group key `GK_e` (zeroized on drop, redacted in
/// `Debug`). Ended epochs' keys are not kept: after a rekey nothing more is
/// sealed under them.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GroupState {
    /// The group.
    pub group: GroupId,
    /// Current epoch `e`.
    pub epoch: u64,
    /// `GK_e`, sent to members in confirms and rekeys.
    #[serde(with = "secret_bytes")]
    pub gk: Key16,
    /// The round number the next challenge gets (strictly increasing).
    pub next_round: u64,
    /// Seq of the latest group message (0: none yet).
    pub latest_seq: u64,
    /// SHA-256 of the latest group message (all its bytes; zeros if none),
    /// announced in challenges. Not of the payload, which the gateway must
    /// not be able to test guesses against.
    #[serde(with = "byte_array")]
    pub config_hash: [u8; 32],
    /// psk-ecdhe rounds opened so far; a member's
    /// [`SessionSlot::ecdhe_mark`] is compared against it to notice members
    /// that keep missing psk-ecdhe rounds.
    pub ecdhe_rounds: u64,
    /// The last [`SENT_MESSAGES_KEPT`] group messages, oldest first, so an
    /// ack can be matched to a message V actually sent.
    pub sent: Vec<SentMessage>,
}

impl GroupState {
    /// A new group at epoch 1 with a fresh group key; its first round is 1.
    pub fn new(group: GroupId, rng: &mut impl rand_core::CryptoRng) -> Self {
        Self {
            group,
            epoch: 1,
            gk: Key16::random(rng),
            next_round: 1,
            latest_seq: 0,
            config_hash: [0; 32],
            ecdhe_rounds: 0,
            sent: Vec::new(),
        }
    }

    /// A new group whose round, epoch and seq start above `floor` (V's
    /// recovery floor after a restore: a group first used after the backup
    /// has no state to raise, and its members may hold counters up to
    /// just under the floor): epoch and first round `floor + 1`, seq
    /// `floor`. `floor` 0 gives [`GroupState::new`].
    ///
    /// Refused with [`UsageError::CounterExhausted`] if `floor + 1` would
    /// pass `u64::MAX`.
    pub fn starting_above(
        group: GroupId,
        floor: u64,
        rng: &mut impl rand_core::CryptoRng,
    ) -> Result<Self, UsageError> {
        let first = floor.checked_add(1).ok_or(UsageError::CounterExhausted)?;
        let mut state = Self::new(group, rng);
        state.epoch = first;
        state.next_round = first;
        state.latest_seq = floor;
        Ok(state)
    }

    /// Recovery after V restored this state from a backup: raises the round,
    /// epoch and seq counters by 2^32 and draws a fresh group key, so nothing
    /// members persisted since the backup can be replayed and no counter
    /// repeats.
    ///
    /// The caller must also drop every session of the group (the backup's
    /// sessions may have been superseded, and their `down_ctr` may be
    /// behind), forget the group's open rounds, and then open a psk-ecdhe
    /// round.
    ///
    /// Refused with [`UsageError::CounterExhausted`], changing nothing, if
    /// a counter would pass `u64::MAX`: saturating would repeat values
    /// members already hold.
    pub fn after_restore(&mut self, rng: &mut impl rand_core::CryptoRng) -> Result<(), UsageError> {
        let raise = |v: u64| {
            v.checked_add(RESTORE_OFFSET)
                .ok_or(UsageError::CounterExhausted)
        };
        let (next_round, epoch, latest_seq) = (
            raise(self.next_round)?,
            raise(self.epoch)?,
            raise(self.latest_seq)?,
        );
        self.next_round = next_round;
        self.epoch = epoch;
        self.latest_seq = latest_seq;
        self.gk = Key16::random(rng);
        self.sent.clear();
        Ok(())
    }

    /// The sent message with `seq`, if still remembered.
    pub fn sent_message(&self, seq: u64) -> Option<&SentMessage> {
        self.sent.iter().find(|m| m.seq == seq)
    }

    /// Remembers a sent message, forgetting the oldest beyond the bound.
    pub(crate) fn remember_sent(&mut self, msg: SentMessage) {
        self.sent.push(msg);
        if self.sent.len() > SENT_MESSAGES_KEPT {
            let excess = self.sent.len() - SENT_MESSAGES_KEPT;
            self.sent.drain(..excess);
        }
    }
}

/// Whether a round collects readings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RoundPurpose {
    /// Authentication only: responses carry an empty payload.
    Auth,
    /// Authentication and a reading per member.
    Read,
}

/// The state of one round, from [`Verifier::open_round`](super::Verifier::open_round)
/// until the caller deletes it.
///
/// In psk-ecdhe it holds V's ephemeral secret `e_V` (zeroized on drop,
/// redacted in `Debug`), erased by [`RoundState::close`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoundState {
    /// The group.
    pub group: GroupId,
    /// The round number.
    pub round: u64,
    /// The group epoch when the challenge was signed.
    pub epoch: u64,
    /// psk or psk-ecdhe.
    #[serde(with = "mode_code")]
    pub mode: Mode,
    /// Auth or read.
    pub purpose: RoundPurpose,
    /// SHA-256 of the challenge bytes, hashed once when the round opens.
    #[serde(with = "byte_array")]
    pub ch_hash: [u8; 32],
    /// The challenge's expiry (Unix seconds), if any.
    pub not_after: Option<u64>,
    /// Whether responses are still accepted.
    pub open: bool,
    /// `e_V`, present while a psk-ecdhe round is open.
    pub e_v_secret: Option<EphemeralSecret>,
    /// Members accepted in this round ("already accepted" is detected here).
    pub accepted: BTreeSet<MemberId>,
}

impl RoundState {
    /// Closes the round: no more responses are accepted and `e_V` is erased.
    pub fn close(&mut self) {
        self.open = false;
        self.e_v_secret = None;
    }

    /// Whether a response arriving at `now` (Unix seconds) may be accepted.
    pub fn is_open_at(&self, now: u64) -> bool {
        self.open && self.not_after.is_none_or(|t| now <= t)
    }
}

/// V's ephemeral X25519 secret of a psk-ecdhe round.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EphemeralSecret(#[serde(with = "secret_bytes")] pub(crate) Key32);

/// A 64-counter sliding window over uplink counters.
///
/// `top` is the highest accepted counter (0: none yet); bit `i` of `seen`
/// says counter `top - i` was accepted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayWindow {
    /// Highest accepted counter.
    pub top: u64,
    /// Bitmap of accepted counters below and at `top`.
    pub seen: u64,
}

impl ReplayWindow {
    /// Whether `ctr` is fresh: counters start at 1, and a counter at or below
    /// `top - 64`, or already accepted, is not.
    pub fn is_fresh(&self, ctr: u64) -> bool {
        if ctr == 0 {
            return false;
        }
        if ctr > self.top {
            return true;
        }
        let back = self.top - ctr;
        back < REPLAY_WINDOW && self.seen & (1 << back) == 0
    }

    /// Marks `ctr` accepted (call only after [`Self::is_fresh`] and the tag
    /// check).
    pub fn accept(&mut self, ctr: u64) {
        if ctr > self.top {
            let shift = ctr - self.top;
            self.seen = if shift >= REPLAY_WINDOW {
                0
            } else {
                self.seen << shift
            };
            self.seen |= 1;
            self.top = ctr;
        } else {
            let back = self.top - ctr;
            if back < REPLAY_WINDOW {
                self.seen |= 1 << back;
            }
        }
    }
}

/// One (member, group) session on V's side.
///
/// The keys are zeroized on drop and redacted in `Debug`. `down_ctr` is the
/// last downlink counter used; V increments it (and the caller persists the
/// slot) before a rekey or key update goes out.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SessionState {
    /// The group.
    pub group: GroupId,
    /// The member.
    pub id: MemberId,
    /// Session id.
    #[serde(with = "session_id")]
    pub sid: SessionId,
    /// The round that created the session.
    pub round: u64,
    /// The mode of that round (key updates need psk-ecdhe).
    #[serde(with = "mode_code")]
    pub mode: Mode,
    /// Member-to-V key.
    #[serde(with = "secret_bytes")]
    pub k_up: Key16,
    /// Base of the uplink nonces.
    #[serde(with = "secret_bytes")]
    pub iv_up: Iv12,
    /// V-to-member key (random nonces).
    #[serde(with = "secret_bytes")]
    pub k_down: Key16,
    /// Uplink replay window.
    pub window: ReplayWindow,
    /// Last downlink counter used (0: none yet).
    pub down_ctr: u64,
}

/// Most unused sessions a [`SessionSlot`] keeps behind its `pending` one.
pub const UNCONFIRMED_KEPT: usize = 2;

/// The sessions of one (member, group).
///
/// A round gives the member a new session, but the member switches to it
/// only when it opens the confirm, which the gateway may never deliver, and
/// V learns that it did only from the first uplink under the new sid. So V
/// installs the new session as `pending` and keeps `current` until an
/// uplink under a newer sid verifies. A newer round moves an unused
/// pending session into `unconfirmed` (at most [`UNCONFIRMED_KEPT`], the
/// oldest dropped first): a member that opened that round's confirm but
/// not the next one's still uplinks and gets rekeys under it. The first
/// session seen in use becomes current; the current one and every session
/// older than the used one are deleted, the newer ones are kept.
///
/// Encoding: `unconfirmed` (a list of [`SessionState`], newest first) was
/// added with a default of empty, so slots stored before it decode.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SessionSlot {
    /// The session the member was last seen using.
    pub current: Option<SessionState>,
    /// The newest session, not yet seen in use.
    pub pending: Option<SessionState>,
    /// Older sessions not yet seen in use, newest first, newer than
    /// `current`; at most [`UNCONFIRMED_KEPT`].
    #[serde(default)]
    pub unconfirmed: Vec<SessionState>,
    /// [`GroupState::ecdhe_rounds`] when the member was last accepted in a
    /// psk-ecdhe round (or first accepted at all).
    pub ecdhe_mark: u64,
    /// The confirm that opens `pending`, kept until `pending` is seen in
    /// use, so that it can be queued again right before a rekey or key
    /// update sealed under `pending` (see [`Self::confirm_before_rekey`]).
    /// Added with a default of none: slots stored before it decode.
    #[serde(default)]
    pub pending_confirm: Option<ConfirmSeal>,
}

/// What a [`Confirm`] adds to its session: the epoch it carries and `W`.
/// With the pending session's group, round, member and sid it rebuilds the
/// confirm byte for byte. Not secret: `W` is sealed under `k_conf`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfirmSeal {
    /// The group epoch whose key `w` carries.
    pub epoch: u64,
    /// `AES-128-GCM(k_conf, iv_conf, aad, GK_e)`: ciphertext and tag.
    #[serde(with = "byte_array")]
    pub w: [u8; 32],
}

impl ConfirmSeal {
    /// The part of `c` the slot keeps.
    pub fn of(c: &Confirm) -> Self {
        Self {
            epoch: c.epoch,
            w: c.w,
        }
    }
}

impl SessionSlot {
    /// The session with `sid`: current, pending or unconfirmed.
    pub fn by_sid(&self, sid: SessionId) -> Option<&SessionState> {
        self.current
            .iter()
            .chain(&self.pending)
            .chain(&self.unconfirmed)
            .find(|s| s.sid == sid)
    }

    /// The session with `sid`, for changing it.
    pub fn by_sid_mut(&mut self, sid: SessionId) -> Option<&mut SessionState> {
        self.sessions_mut().find(|s| s.sid == sid)
    }

    /// Installs a session a round just created, with the confirm that
    /// opens it; an unused pending one moves to `unconfirmed`, dropping the
    /// oldest beyond [`UNCONFIRMED_KEPT`] (its confirm is dropped: a member
    /// holds the keys to open only its latest round's confirm).
    pub fn install(&mut self, session: SessionState, confirm: Option<ConfirmSeal>) {
        if let Some(old) = self.pending.replace(session) {
            self.unconfirmed.insert(0, old);
            self.unconfirmed.truncate(UNCONFIRMED_KEPT);
        }
        self.pending_confirm = confirm;
    }

    /// The confirm of the pending session, rebuilt byte for byte as the
    /// verdict carried it.
    pub fn pending_confirm(&self) -> Option<Confirm> {
        let (p, seal) = (self.pending.as_ref()?, self.pending_confirm?);
        Some(Confirm {
            group: p.group,
            round: p.round,
            epoch: seal.epoch,
            id: p.id,
            sid: p.sid,
            w: seal.w,
        })
    }

    /// The confirm to queue right before this slot's rekeys: the pending
    /// session's, whenever one is kept.
    ///
    /// A member refuses a rekey for a session whose confirm it has not
    /// opened, and the gateway delivers a verdict's confirms on its own
    /// schedule, so a rekey issued after the verdict can reach the member
    /// first. V cannot tell which session the member holds: it may hold
    /// none (a first round), or one V no longer keeps (opened, never used,
    /// then pushed out by [`UNCONFIRMED_KEPT`] newer rounds whose confirms
    /// are still on their way), even when V has seen an older one in use.
    /// Opening the pending confirm first moves the member to the pending
    /// session, which gets its own rekey after it. A member that opened it
    /// already refuses the copy as stale; one that answered a newer round
    /// V has not judged refuses it too, and is no worse off than without it.
    pub fn confirm_before_rekey(&self) -> Option<Confirm> {
        self.pending_confirm()
    }

    /// The confirm to queue right before this slot's key updates: the
    /// pending session's, when that session is psk-ecdhe (a key update is
    /// sealed under it). A member in a psk session, or in one V no longer
    /// keeps, gets no key update it can open until it opens that confirm.
    /// A psk pending session gets no key update, so its confirm would only
    /// move the member off a session that does.
    pub fn confirm_before_key_update(&self) -> Option<Confirm> {
        match &self.pending {
            Some(p) if p.mode == Mode::PskEcdhe => self.pending_confirm(),
            _ => None,
        }
    }

    /// An uplink under `sid` verified: if `sid` is a session not yet seen in
    /// use, it becomes current, and the old current session and every
    /// unconfirmed one older than `sid` are deleted.
    pub fn mark_used(&mut self, sid: SessionId) {
        if self.pending.as_ref().is_some_and(|p| p.sid == sid) {
            self.current = self.pending.take();
            self.pending_confirm = None;
            self.unconfirmed.clear();
        } else if let Some(i) = self.unconfirmed.iter().position(|s| s.sid == sid) {
            // Newest first: the ones after `i` are older than `sid`.
            self.unconfirmed.truncate(i + 1);
            self.current = self.unconfirmed.pop();
        }
    }

    /// Applies a session use kept apart from the sealed slot: what
    /// accepted uplinks all under `sid` changed, namely [`Self::mark_used`]
    /// of `sid` and its replay window moved to `window`. Returns `false`,
    /// changing nothing, if the slot holds no session `sid`.
    ///
    /// For a slot `s` and a session `sid` it holds, uplinks under `sid`
    /// alone leave `s` as `s.apply_use(sid, w)` does, `w` the window they
    /// left; and after `s.apply_use(a, wa)`, uplinks under `b` alone leave
    /// the slot as `s.apply_use(b, wb)` does (for `b == a` trivially;
    /// otherwise `b` is newer than `a`, and marking it used drops `a` and
    /// everything `a`'s mark dropped). So one use per slot records any
    /// number of such batches.
    pub fn apply_use(&mut self, sid: SessionId, window: ReplayWindow) -> bool {
        if self.by_sid(sid).is_none() {
            return false;
        }
        self.mark_used(sid);
        if let Some(s) = self.by_sid_mut(sid) {
            s.window = window;
        }
        true
    }

    /// Every session kept, current first.
    pub fn sessions_mut(&mut self) -> impl Iterator<Item = &mut SessionState> {
        self.current
            .iter_mut()
            .chain(&mut self.pending)
            .chain(&mut self.unconfirmed)
    }

    /// Whether the slot holds no session.
    pub fn is_empty(&self) -> bool {
        self.current.is_none() && self.pending.is_none() && self.unconfirmed.is_empty()
    }
}

/// First byte of [`SessionSlot::encode`]'s output: the format version.
///
/// Format 2 added the pending session's confirm (presence bit 2); format 1
/// slots (without it) still decode. A JSON encoding (the format before
/// both) starts with `{` and is told apart by that byte.
pub const SLOT_FORMAT: u8 = 2;

/// Bytes of the pending confirm in [`SessionSlot::encode`]'s output.
const CONFIRM_SEAL_BYTES: usize = 8 + 32;

/// Bytes of one session in [`SessionSlot::encode`]'s output.
const SESSION_BYTES: usize = 4 + 8 + 8 + 8 + 1 + 16 + 12 + 16 + 8 + 8 + 8;

impl SessionSlot {
    /// The compact binary form of the slot, for sealing (the JSON form is
    /// more than three times larger and much slower to build):
    ///
    /// ```text
    /// slot    := format u8 (= 2) | ecdhe_mark u64
    ///            | present u8 (bit 0 current, bit 1 pending, bit 2 pending confirm)
    ///            | n_unconfirmed u8 | [current] | [pending] | unconfirmed{n}
    ///            | [confirm_epoch u64 | w [32]]
    /// session := group u32 | id u64 | sid [8] | round u64 | mode u8 | k_up [16]
    ///            | iv_up [12] | k_down [16] | window.top u64 | window.seen u64 | down_ctr u64
    /// ```
    ///
    /// Bit 2 is set only with bit 1 (a confirm without its pending session
    /// is not written). Format 1 is the same without bit 2.
    ///
    /// Integers are big-endian. The output holds keys: it lives in a
    /// zeroizing buffer and must be sealed before it is stored.
    pub fn encode(&self) -> zeroize::Zeroizing<Vec<u8>> {
        let mut out = zeroize::Zeroizing::new(vec![0u8; self.encoded_len()]);
        self.encode_into(&mut out);
        out
    }

    /// Length of [`Self::encode`]'s output.
    pub fn encoded_len(&self) -> usize {
        let n = usize::from(self.current.is_some())
            + usize::from(self.pending.is_some())
            + self.encoded_unconfirmed().len();
        11 + n * SESSION_BYTES + self.encoded_confirm().map_or(0, |_| CONFIRM_SEAL_BYTES)
    }

    /// The pending confirm the encoding carries: only with its session.
    fn encoded_confirm(&self) -> Option<&ConfirmSeal> {
        self.pending.as_ref().and(self.pending_confirm.as_ref())
    }

    /// The unconfirmed sessions the encoding carries: at most
    /// [`UNCONFIRMED_KEPT`] by construction; a longer list is cut at what
    /// its one-byte count can say rather than wrapping the count.
    fn encoded_unconfirmed(&self) -> &[SessionState] {
        &self.unconfirmed[..self.unconfirmed.len().min(usize::from(u8::MAX))]
    }

    /// Writes [`Self::encode`]'s output into `out`, for a caller that seals
    /// it in place.
    ///
    /// # Panics
    ///
    /// If `out` is not exactly [`Self::encoded_len`] bytes long (before
    /// writing past its end).
    pub fn encode_into(&self, out: &mut [u8]) {
        assert_eq!(out.len(), self.encoded_len(), "session slot buffer length");
        let mut w = SliceWriter::new(out);
        w.put(&[SLOT_FORMAT]);
        w.put(&self.ecdhe_mark.to_be_bytes());
        let confirm = self.encoded_confirm();
        w.put(&[u8::from(self.current.is_some())
            | u8::from(self.pending.is_some()) << 1
            | u8::from(confirm.is_some()) << 2]);
        let unconfirmed = self.encoded_unconfirmed();
        w.put(&[unconfirmed.len() as u8]);
        for s in self.current.iter().chain(&self.pending).chain(unconfirmed) {
            w.put(&s.group.0.to_be_bytes());
            w.put(&s.id.0.to_be_bytes());
            w.put(&s.sid.0);
            w.put(&s.round.to_be_bytes());
            w.put(&[s.mode.code()]);
            w.put(s.k_up.expose());
            w.put(s.iv_up.expose());
            w.put(s.k_down.expose());
            w.put(&s.window.top.to_be_bytes());
            w.put(&s.window.seen.to_be_bytes());
            w.put(&s.down_ctr.to_be_bytes());
        }
        if let Some(c) = confirm {
            w.put(&c.epoch.to_be_bytes());
            w.put(&c.w);
        }
        w.finish();
    }

    /// Decodes [`Self::encode`]'s output (format 2, or format 1 written
    /// before it). Trailing bytes, another format, unknown presence bits (a
    /// confirm without a pending session among them), more than
    /// [`UNCONFIRMED_KEPT`] unconfirmed sessions or a bad mode code are
    /// refused.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = SliceReader(bytes);
        let known = match r.u8("slot format")? {
            1 => 0b11,
            SLOT_FORMAT => 0b111,
            _ => return Err(DecodeError::Invalid("slot format")),
        };
        let ecdhe_mark = r.u64("slot ecdhe_mark")?;
        let present = r.u8("slot presence")?;
        if present & !known != 0 || present & 0b110 == 0b100 {
            return Err(DecodeError::Invalid("slot presence"));
        }
        let n = usize::from(r.u8("slot unconfirmed count")?);
        if n > UNCONFIRMED_KEPT {
            return Err(DecodeError::TooLong("slot unconfirmed count"));
        }
        let current = (present & 1 != 0).then(|| r.session()).transpose()?;
        let pending = (present & 2 != 0).then(|| r.session()).transpose()?;
        let unconfirmed = (0..n).map(|_| r.session()).collect::<Result<_, _>>()?;
        let pending_confirm = if present & 4 != 0 {
            Some(ConfirmSeal {
                epoch: r.u64("slot confirm epoch")?,
                w: r.array("slot confirm w")?,
            })
        } else {
            None
        };
        if !r.0.is_empty() {
            return Err(DecodeError::Invalid("slot trailing bytes"));
        }
        Ok(Self {
            current,
            pending,
            unconfirmed,
            ecdhe_mark,
            pending_confirm,
        })
    }
}

/// A cursor over a plaintext slot (which must not be copied into `Bytes`:
/// that buffer would not be zeroized).
struct SliceReader<'a>(&'a [u8]);

impl SliceReader<'_> {
    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let (head, rest) = self
            .0
            .split_first_chunk::<N>()
            .ok_or(DecodeError::Truncated(what))?;
        self.0 = rest;
        Ok(*head)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }
    fn session(&mut self) -> Result<SessionState, DecodeError> {
        let group = GroupId(u32::from_be_bytes(self.array("session group")?));
        let id = MemberId(self.u64("session id")?);
        let sid = SessionId(self.array("session sid")?);
        let round = self.u64("session round")?;
        let mode = Mode::from_code(self.u8("session mode")?)
            .ok_or(DecodeError::Invalid("session mode"))?;
        let k_up = Key16::from_bytes(self.array("session k_up")?);
        let iv_up = Iv12::from_bytes(self.array("session iv_up")?);
        let k_down = Key16::from_bytes(self.array("session k_down")?);
        let window = ReplayWindow {
            top: self.u64("session window")?,
            seen: self.u64("session window")?,
        };
        let down_ctr = self.u64("session down_ctr")?;
        Ok(SessionState {
            group,
            id,
            sid,
            round,
            mode,
            k_up,
            iv_up,
            k_down,
            window,
            down_ctr,
        })
    }
}

/// The session slots a call works on, keyed by (group, member).
///
/// The UDC loads the slots of a batch's members (or of a whole group, for a
/// rekey) into one table, passes it in, and writes back the slots named in
/// the output as touched.
///
/// A hash map: a batch's slots are looked up several times each while it is
/// judged, and a B-tree of a few thousand slots cost more per lookup and
/// per insert (node splits) than hashing the (group, member) key.
///
/// The hasher is foldhash's, not std's SipHash (a few instructions per key
/// instead of a few dozen). Its safety rests on who chooses the keys, not
/// on its seed (which is only weakly random): member ids come from the
/// gateway, but a slot is created only for a member whose response
/// verified against its registry record, and loaded only for ids with a
/// stored row, so a gateway picks among provisioned ids and cannot mint
/// colliding ones. A batch's table holds at most 16,384 entries (the wire
/// cap); a rekey's holds the group's members, from the store.
///
/// Slots are boxed: a slot with three sessions is a few hundred bytes,
/// and the UDC moves each one from its slot cache into a batch's table and
/// back ([`Self::insert_boxed`], [`Self::remove_boxed`]); boxed, a move is
/// a pointer and the table's buckets stay small.
#[derive(Clone, Debug, Default)]
pub struct SessionTable {
    slots: HashMap<(GroupId, MemberId), Box<SessionSlot>, foldhash::fast::RandomState>,
}

impl SessionTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty table with room for `n` slots (a batch's members).
    pub fn with_capacity(n: usize) -> Self {
        Self {
            slots: HashMap::with_capacity_and_hasher(n, Default::default()),
        }
    }

    /// The slot of (group, member), if loaded.
    pub fn get(&self, group: GroupId, id: MemberId) -> Option<&SessionSlot> {
        self.slots.get(&(group, id)).map(|s| &**s)
    }

    /// The slot of (group, member), for changing it.
    pub fn get_mut(&mut self, group: GroupId, id: MemberId) -> Option<&mut SessionSlot> {
        self.slots.get_mut(&(group, id)).map(|s| &mut **s)
    }

    /// The slot of (group, member), created empty if absent.
    pub fn entry(&mut self, group: GroupId, id: MemberId) -> &mut SessionSlot {
        self.slots.entry((group, id)).or_default()
    }

    /// The slot of (group, member), created empty if absent, and whether it
    /// was just created (one search instead of two).
    pub(crate) fn entry_new(&mut self, group: GroupId, id: MemberId) -> (&mut SessionSlot, bool) {
        use std::collections::hash_map::Entry;
        match self.slots.entry((group, id)) {
            Entry::Occupied(o) => (o.into_mut(), false),
            Entry::Vacant(v) => (v.insert(Box::default()), true),
        }
    }

    /// Adds or replaces a loaded slot.
    pub fn insert(&mut self, group: GroupId, id: MemberId, slot: SessionSlot) {
        self.insert_boxed(group, id, Box::new(slot));
    }

    /// Adds or replaces a loaded slot that is already boxed (moved in
    /// without copying it).
    pub fn insert_boxed(&mut self, group: GroupId, id: MemberId, slot: Box<SessionSlot>) {
        self.slots.insert((group, id), slot);
    }

    /// Removes a slot (a revoked member's, or all of them after a restore).
    pub fn remove(&mut self, group: GroupId, id: MemberId) -> Option<SessionSlot> {
        self.remove_boxed(group, id).map(|s| *s)
    }

    /// Removes a slot and returns it boxed (moved out without copying it).
    pub fn remove_boxed(&mut self, group: GroupId, id: MemberId) -> Option<Box<SessionSlot>> {
        self.slots.remove(&(group, id))
    }

    /// Members of `group` that have a slot, in id order.
    pub fn members_of(&self, group: GroupId) -> Vec<MemberId> {
        let mut ids: Vec<MemberId> = self
            .slots
            .keys()
            .filter(|(g, _)| *g == group)
            .map(|(_, id)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Drops every slot of `group` (recovery after a restore).
    pub fn drop_group(&mut self, group: GroupId) {
        self.slots.retain(|(g, _), _| *g != group);
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

/// Serde for fixed-size secrets as raw bytes; the deserialized copy lives
/// only in zeroizing buffers.
pub(crate) mod secret_bytes {
    use core::fmt;
    use core::marker::PhantomData;

    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};
    use zeroize::Zeroizing;

    use crate::protocol::suite::Secret;

    pub(crate) fn serialize<S: Serializer, const N: usize>(
        v: &Secret<N>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v.expose())
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        d: D,
    ) -> Result<Secret<N>, D::Error> {
        let bytes = d.deserialize_bytes(ArrayVisitor::<N>(PhantomData))?;
        Ok(Secret::from_bytes(*bytes))
    }

    /// Accepts a byte string or a sequence of exactly `N` bytes.
    pub(crate) struct ArrayVisitor<const N: usize>(pub(crate) PhantomData<()>);

    impl<'de, const N: usize> Visitor<'de> for ArrayVisitor<N> {
        type Value = Zeroizing<[u8; N]>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "{N} bytes")
        }

        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Self::Value, E> {
            let mut out = Zeroizing::new([0u8; N]);
            if v.len() != N {
                return Err(E::invalid_length(v.len(), &self));
            }
            out.copy_from_slice(v);
            Ok(out)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Zeroizing::new([0u8; N]);
            for (i, b) in out.iter_mut().enumerate() {
                *b = seq
                    .next_element()?
                    .ok_or_else(|| A::Error::invalid_length(i, &self))?;
            }
            if seq.next_element::<u8>()?.is_some() {
                return Err(A::Error::invalid_length(N + 1, &self));
            }
            Ok(out)
        }
    }
}

/// Serde for public fixed-size byte arrays (hashes) as raw bytes.
pub(crate) mod byte_array {
    use core::marker::PhantomData;

    use serde::{Deserializer, Serializer};

    use super::secret_bytes::ArrayVisitor;

    pub(crate) fn serialize<S: Serializer, const N: usize>(
        v: &[u8; N],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        d: D,
    ) -> Result<[u8; N], D::Error> {
        Ok(*d.deserialize_bytes(ArrayVisitor::<N>(PhantomData))?)
    }
}

/// Serde for a [`SessionId`] as 8 raw bytes.
pub(crate) mod session_id {
    use serde::{Deserializer, Serializer};

    use crate::protocol::wire::SessionId;

    pub(crate) fn serialize<S: Serializer>(v: &SessionId, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&v.0)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SessionId, D::Error> {
        super::byte_array::deserialize(d).map(SessionId)
    }
}

/// Serde for a [`Mode`] as its wire code.
pub(crate) mod mode_code {
    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::protocol::wire::Mode;

    pub(crate) fn serialize<S: Serializer>(v: &Mode, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(v.code())
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Mode, D::Error> {
        let code = u8::deserialize(d)?;
        Mode::from_code(code).ok_or_else(|| D::Error::custom("mode must be 1 or 2"))
    }
}

/// Serde for byte vectors as one byte string (not a sequence of numbers).
pub(crate) mod byte_vec {
    use core::fmt;

    use serde::de::{SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(VecVisitor)
    }

    struct VecVisitor;

    impl<'de> Visitor<'de> for VecVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a byte string")
        }

        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Self::Value, E> {
            Ok(v)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            // A size hint from the peer is only a hint: cap the reservation.
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
            while let Some(b) = seq.next_element()? {
                out.push(b);
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_window_accepts_each_counter_once_within_64() {
        let mut w = ReplayWindow::default();
        assert!(!w.is_fresh(0), "counters start at 1");
        assert!(w.is_fresh(1));
        w.accept(1);
        assert!(!w.is_fresh(1));
        // Out of order inside the window is fine, once.
        w.accept(5);
        assert!(w.is_fresh(3));
        w.accept(3);
        assert!(!w.is_fresh(3) && !w.is_fresh(5) && w.is_fresh(4) && w.is_fresh(2));
        // Slide far ahead: 64 back is outside, 63 back inside.
        w.accept(100);
        assert!(!w.is_fresh(36), "top - 64 is too old");
        assert!(w.is_fresh(37));
        w.accept(37);
        assert!(!w.is_fresh(37));
        // A jump of more than the window clears the bitmap.
        w.accept(1000);
        assert_eq!(w.seen, 1);
        assert!(!w.is_fresh(1000) && w.is_fresh(999) && !w.is_fresh(100));
        w.accept(u64::MAX);
        assert!(!w.is_fresh(u64::MAX));
    }

    /// Session `sid` of member 2 in group 1, created by round `sid`, with
    /// fresh keys and an empty window.
    fn session_of(sid: u8, mode: Mode) -> SessionState {
        let mut rng = rand_core::UnwrapErr(getrandom::SysRng);
        SessionState {
            group: GroupId(1),
            id: MemberId(2),
            sid: SessionId([sid; 8]),
            round: u64::from(sid),
            mode,
            k_up: Key16::random(&mut rng),
            iv_up: Iv12::random(&mut rng),
            k_down: Key16::random(&mut rng),
            window: ReplayWindow::default(),
            down_ctr: 0,
        }
    }

    #[test]
    fn slot_promotes_pending_on_first_use() {
        let mk = |sid: u8| session_of(sid, Mode::Psk);
        let mut slot = SessionSlot::default();
        slot.install(mk(1), None);
        slot.mark_used(SessionId([1; 8]));
        assert_eq!(slot.current.as_ref().unwrap().sid, SessionId([1; 8]));
        slot.install(mk(2), None);
        assert!(slot.by_sid(SessionId([1; 8])).is_some());
        assert!(slot.by_sid(SessionId([2; 8])).is_some());
        // Using the old session keeps both.
        slot.mark_used(SessionId([1; 8]));
        assert!(slot.pending.is_some());
        // A newer round keeps the unused pending session behind the new one.
        slot.install(mk(3), None);
        assert!(slot.by_sid(SessionId([2; 8])).is_some());
        assert_eq!(slot.sessions_mut().count(), 3);
        slot.mark_used(SessionId([3; 8]));
        assert!(
            slot.by_sid(SessionId([1; 8])).is_none(),
            "old session deleted"
        );
        assert!(slot.by_sid(SessionId([2; 8])).is_none(), "older unused");
        assert_eq!(slot.current.as_ref().unwrap().sid, SessionId([3; 8]));
        assert!(slot.pending.is_none());
    }

    /// A use kept beside the sealed slot stands for what uplinks under one
    /// session change (the session marked used, its window moved), also
    /// after an earlier use: for every pair of sessions of a slot holding
    /// all four kinds (current, pending with its confirm, two unconfirmed),
    /// applying the use of the second to the sealed slot gives byte for
    /// byte what uplinks under the first, then under the second, give.
    #[test]
    fn a_use_stands_for_uplinks_under_one_session() {
        let mk = |sid: u8| session_of(sid, Mode::PskEcdhe);
        let seal = ConfirmSeal {
            epoch: 9,
            w: [9; 32],
        };
        let mut sealed = SessionSlot::default();
        sealed.install(mk(1), None);
        sealed.mark_used(SessionId([1; 8]));
        sealed
            .by_sid_mut(SessionId([1; 8]))
            .unwrap()
            .window
            .accept(5);
        for n in 2..=4 {
            sealed.install(mk(n), Some(seal));
        }
        assert_eq!(sealed.unconfirmed.len(), 2);
        // What the verifier does with accepted uplinks under `sid`.
        let uplinks = |slot: &SessionSlot, sid: u8, ctrs: &[u64]| {
            let mut out = slot.clone();
            let s = out.by_sid_mut(SessionId([sid; 8]))?;
            for c in ctrs {
                s.window.accept(*c);
            }
            out.mark_used(SessionId([sid; 8]));
            Some(out)
        };
        let window = |slot: &SessionSlot, sid: u8| slot.by_sid(SessionId([sid; 8])).unwrap().window;
        let used = |slot: &SessionSlot, sid: u8| {
            let mut out = sealed.clone();
            assert!(out.apply_use(SessionId([sid; 8]), window(slot, sid)));
            out
        };
        let mut pairs = 0;
        for a in 1..=4u8 {
            let after_a = uplinks(&sealed, a, &[7, 6]).unwrap();
            assert_eq!(*used(&after_a, a).encode(), *after_a.encode(), "use of {a}");
            for b in 1..=4u8 {
                // Sessions older than `a` are gone once `a` is used.
                let Some(after_b) = uplinks(&after_a, b, &[8, 70]) else {
                    assert!(b < a, "{a} then {b}");
                    continue;
                };
                pairs += 1;
                assert_eq!(
                    *used(&after_b, b).encode(),
                    *after_b.encode(),
                    "use of {a}, then uplinks under {b}"
                );
            }
        }
        assert_eq!(
            pairs, 10,
            "1 then any, 2 then 2 to 4, 3 then 3 or 4, 4 then 4"
        );
        // A use naming a session the slot does not hold changes nothing.
        let mut other = sealed.clone();
        assert!(!other.apply_use(SessionId([5; 8]), ReplayWindow { top: 1, seen: 1 }));
        assert_eq!(*other.encode(), *sealed.encode());
    }

    /// The confirm that goes again ahead of a rekey or key update: the
    /// pending session's, for a rekey whenever one is kept, for a key
    /// update while the pending session is psk-ecdhe; never once the
    /// pending session is in use.
    #[test]
    fn slot_names_the_confirm_to_resend_before_a_rekey() {
        let mk = session_of;
        let seal = |n: u8| ConfirmSeal {
            epoch: u64::from(n),
            w: [n; 32],
        };
        let mut slot = SessionSlot::default();
        slot.install(mk(1, Mode::Psk), Some(seal(1)));
        let c = slot.confirm_before_rekey().expect("no session seen in use");
        assert_eq!(
            (c.group, c.round, c.epoch, c.id, c.sid, c.w),
            (GroupId(1), 1, 1, MemberId(2), SessionId([1; 8]), [1; 32])
        );
        assert!(slot.confirm_before_key_update().is_none(), "psk pending");
        // A newer round's confirm replaces it; the older session's cannot
        // be opened by the member any more.
        slot.install(mk(2, Mode::PskEcdhe), Some(seal(2)));
        assert_eq!(slot.confirm_before_rekey().unwrap().sid, SessionId([2; 8]));
        assert_eq!(
            slot.confirm_before_key_update().unwrap().sid,
            SessionId([2; 8])
        );
        // The older session seen in use: the member may still hold a
        // session V no longer keeps (opened, never used, pushed out by newer
        // rounds), so the pending confirm still goes first.
        slot.mark_used(SessionId([1; 8]));
        for sid in 3..=5 {
            slot.install(mk(sid, Mode::PskEcdhe), Some(seal(sid)));
        }
        assert!(slot.by_sid(SessionId([2; 8])).is_none(), "pushed out");
        assert!(slot.current.is_some());
        assert_eq!(slot.confirm_before_rekey().unwrap().sid, SessionId([5; 8]));
        assert_eq!(slot.confirm_before_rekey().unwrap().epoch, 5);
        assert!(slot.confirm_before_key_update().is_some());
        // The pending session in use: its confirm is dropped.
        slot.mark_used(SessionId([5; 8]));
        assert!(slot.pending_confirm.is_none());
        assert!(slot.confirm_before_rekey().is_none());
        assert!(slot.confirm_before_key_update().is_none());
        slot.install(mk(6, Mode::PskEcdhe), None);
        assert!(slot.confirm_before_key_update().is_none(), "none kept");
    }

    #[test]
    fn slot_keeps_a_bounded_number_of_unused_sessions() {
        let mk = |sid: u8| session_of(sid, Mode::Psk);
        let mut slot = SessionSlot::default();
        for sid in 1..=5 {
            slot.install(mk(sid), None);
        }
        // Pending 5, unconfirmed 4 and 3; 1 and 2 dropped.
        let kept: Vec<u8> = slot.sessions_mut().map(|s| s.sid.0[0]).collect();
        assert_eq!(kept, [5, 4, 3]);
        // Using 4 makes it current, deletes 3 and keeps the newer 5.
        slot.mark_used(SessionId([4; 8]));
        let kept: Vec<u8> = slot.sessions_mut().map(|s| s.sid.0[0]).collect();
        assert_eq!(kept, [4, 5]);
        assert!(slot.unconfirmed.is_empty());
        // A slot stored before `unconfirmed` existed still decodes.
        let mut json: serde_json::Value = serde_json::to_value(&slot).unwrap();
        json.as_object_mut().unwrap().remove("unconfirmed");
        let back: SessionSlot = serde_json::from_value(json).unwrap();
        assert_eq!(back.pending.unwrap().sid, SessionId([5; 8]));
    }

    #[test]
    fn slot_binary_encoding_round_trips_and_refuses_damage() {
        let mut rng = rand_core::UnwrapErr(getrandom::SysRng);
        let mut mk = |sid: u8| SessionState {
            group: GroupId(0x0102_0304),
            id: MemberId(u64::MAX - u64::from(sid)),
            sid: SessionId([sid; 8]),
            round: u64::from(sid) << 40,
            mode: if sid.is_multiple_of(2) {
                Mode::Psk
            } else {
                Mode::PskEcdhe
            },
            k_up: Key16::random(&mut rng),
            iv_up: Iv12::random(&mut rng),
            k_down: Key16::random(&mut rng),
            window: ReplayWindow {
                top: 1000 + u64::from(sid),
                seen: 0xF0F0_0000_0000_0001,
            },
            down_ctr: u64::from(sid) * 3,
        };
        let same = |a: &SessionState, b: &SessionState| {
            a.group == b.group
                && a.id == b.id
                && a.sid == b.sid
                && a.round == b.round
                && a.mode == b.mode
                && a.k_up == b.k_up
                && a.iv_up == b.iv_up
                && a.k_down == b.k_down
                && a.window == b.window
                && a.down_ctr == b.down_ctr
        };
        let empty = SessionSlot::default();
        let back = SessionSlot::decode(&empty.encode()).unwrap();
        assert!(back.is_empty() && back.ecdhe_mark == 0);

        let mut slot = SessionSlot {
            ecdhe_mark: 77,
            ..SessionSlot::default()
        };
        for sid in 1..=4 {
            slot.install(mk(sid), None);
        }
        slot.current = Some(mk(9));
        let bytes = slot.encode();
        assert_eq!(bytes.len(), 11 + 4 * SESSION_BYTES);
        let json = serde_json::to_vec(&slot).unwrap();
        assert!(
            json.len() > 3 * bytes.len(),
            "{} vs {}",
            json.len(),
            bytes.len()
        );
        let back = SessionSlot::decode(&bytes).unwrap();
        assert_eq!(back.ecdhe_mark, 77);
        assert!(same(
            back.current.as_ref().unwrap(),
            slot.current.as_ref().unwrap()
        ));
        assert!(same(
            back.pending.as_ref().unwrap(),
            slot.pending.as_ref().unwrap()
        ));
        assert_eq!(back.unconfirmed.len(), 2);
        for (a, b) in back.unconfirmed.iter().zip(&slot.unconfirmed) {
            assert!(same(a, b));
        }
        // Pending only (a member between its confirm and its first uplink),
        // with the confirm that opens it.
        let seal = ConfirmSeal {
            epoch: 0x0A0B_0C0D,
            w: [0x5A; 32],
        };
        let mut fresh = SessionSlot::default();
        fresh.install(mk(5), Some(seal));
        let enc = fresh.encode();
        assert_eq!(enc.len(), 11 + SESSION_BYTES + CONFIRM_SEAL_BYTES);
        let back = SessionSlot::decode(&enc).unwrap();
        assert!(back.current.is_none() && back.unconfirmed.is_empty());
        assert!(same(
            back.pending.as_ref().unwrap(),
            fresh.pending.as_ref().unwrap()
        ));
        assert_eq!(back.pending_confirm, Some(seal));
        // A format-1 slot (written before the confirm was kept) decodes; a
        // format-1 byte cannot carry a confirm, nor can any slot without a
        // pending session.
        let mut v1 = bytes.to_vec();
        v1[0] = 1;
        let back = SessionSlot::decode(&v1).unwrap();
        assert!(back.pending.is_some() && back.pending_confirm.is_none());
        let mut bad = enc.to_vec();
        bad[0] = 1;
        assert!(SessionSlot::decode(&bad).is_err(), "confirm in format 1");
        let mut bad = enc.to_vec();
        bad[9] &= !2;
        assert!(SessionSlot::decode(&bad).is_err(), "confirm, no pending");

        // Every shape a slot can take (current or not, pending or not, 0 to
        // 2 unconfirmed): the length is what the sealer allocates, and the
        // encoding decodes back.
        // A confirm with no pending session is not written.
        for shape in 0..24u8 {
            let mut s = SessionSlot::default();
            for i in 0..(shape % 12 / 4) {
                s.unconfirmed.push(mk(20 + i));
            }
            if shape & 1 == 1 {
                s.current = Some(mk(30));
            }
            if shape & 2 == 2 {
                s.pending = Some(mk(31));
            }
            if shape >= 12 {
                s.pending_confirm = Some(seal);
            }
            let enc = s.encode();
            assert_eq!(enc.len(), s.encoded_len(), "shape {shape}");
            let back = SessionSlot::decode(&enc).unwrap();
            assert_eq!(back.current.is_some(), s.current.is_some(), "shape {shape}");
            assert_eq!(back.pending.is_some(), s.pending.is_some(), "shape {shape}");
            assert_eq!(back.unconfirmed.len(), s.unconfirmed.len(), "shape {shape}");
            let kept = (shape >= 12 && s.pending.is_some()).then_some(seal);
            assert_eq!(back.pending_confirm, kept, "shape {shape}");
        }

        // Every truncation, trailing bytes, bad codes: errors, no panic.
        for cut in 0..bytes.len() {
            assert!(SessionSlot::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = bytes.to_vec();
        long.push(0);
        assert!(SessionSlot::decode(&long).is_err());
        let mut bad = bytes.to_vec();
        bad[0] = b'{';
        assert!(SessionSlot::decode(&bad).is_err(), "format byte");
        let mut bad = bytes.to_vec();
        bad[9] |= 8;
        assert!(SessionSlot::decode(&bad).is_err(), "presence bits");
        let mut bad = bytes.to_vec();
        bad[10] = 3;
        assert!(SessionSlot::decode(&bad).is_err(), "too many unconfirmed");
        let mut bad = bytes.to_vec();
        bad[11 + 28] = 9;
        assert!(SessionSlot::decode(&bad).is_err(), "mode code");
    }

    #[test]
    fn state_round_trips_through_serde_and_debug_is_redacted() {
        let mut rng = rand_core::UnwrapErr(getrandom::SysRng);
        let g = GroupState::new(GroupId(9), &mut rng);
        let json = serde_json::to_string(&g).unwrap();
        let back: GroupState = serde_json::from_str(&json).unwrap();
        assert_eq!(back.gk, g.gk);
        assert_eq!(back.group, g.group);
        let dbg = format!("{g:?}");
        assert!(dbg.contains("redacted"), "{dbg}");

        let s = SessionState {
            group: GroupId(1),
            id: MemberId(2),
            sid: SessionId([7; 8]),
            round: 3,
            mode: Mode::PskEcdhe,
            k_up: Key16::from_bytes([0xAB; 16]),
            iv_up: Iv12::from_bytes([0xAB; 12]),
            k_down: Key16::from_bytes([0xAB; 16]),
            window: ReplayWindow { top: 5, seen: 3 },
            down_ctr: 4,
        };
        let dbg = format!("{s:?}");
        assert!(
            !dbg.contains("171") && !dbg.to_lowercase().contains("abab"),
            "{dbg}"
        );
        let json = serde_json::to_string(&s).unwrap();
        let back: SessionState = serde_json::from_str(&json).unwrap();
        assert_eq!(back.k_up, s.k_up);
        assert_eq!(back.sid, s.sid);
        assert_eq!(back.mode, Mode::PskEcdhe);
        assert_eq!(back.window, s.window);
        // A short key is refused, not padded.
        let short = json.replacen("171,", "", 1);
        assert!(serde_json::from_str::<SessionState>(&short).is_err());
    }
}
