//! Rounds: the signed challenge, the screening of a response batch, and the
//! finalization of accepted responses into sessions, readings and confirms
//! (design steps 1, 4 and 5).
//!
//! Data flow: [`Verifier::open_round`] turns a [`GroupState`] into a
//! challenge and a [`RoundState`]. For a response batch, [`screen`] derives
//! each known member's response key and recomputes its tag (never seeing
//! the tag itself); `assess.rs` judges the chunks; [`finalize`] then runs
//! X25519 (psk-ecdhe) for accepted entries only, derives the sessions,
//! decrypts readings and seals each confirm exactly once.

use bytes::Bytes;
use rand_core::CryptoRng;
use sha2::{Digest, Sha256};
use zeroize::Zeroize;

use super::assess::Screened;
use super::dh::RoundDh;
use super::kdf::{FastPrk0, response_keys, session_keys, transcript_hash};
use super::registry::{MemberRecord, MemberStatus};
use super::state::{
    ConfirmSeal, EphemeralSecret, GroupState, RoundPurpose, RoundState, SessionState, SessionTable,
};
use super::{UsageError, VerdictCounters, Verifier};
use crate::protocol::keys::ResponseKeys;
use crate::protocol::suite::{EphemeralKeyPair, Gcm, Iv12, Key16};
use crate::protocol::wire::{
    Challenge, Confirm, GroupId, MAX_READ_REQUEST, MemberId, Mode, Outcome, Purpose, ResponseEntry,
    SessionId, confirm_aad,
};

impl Verifier {
    /// Opens round `group.next_round` for `group` and returns its state and
    /// the signed challenge to broadcast.
    ///
    /// Advances `group.next_round` (and, in psk-ecdhe, `group.ecdhe_rounds`):
    /// the caller persists the group state and the round state before the
    /// challenge leaves. In psk-ecdhe a fresh `E_V` is drawn; its secret
    /// lives in the round state until [`RoundState::close`].
    pub fn open_round(
        &self,
        group: &mut GroupState,
        mode: Mode,
        purpose: Purpose,
        not_after: Option<u64>,
        rng: &mut impl CryptoRng,
    ) -> Result<(RoundState, Bytes), UsageError> {
        let round_purpose = match &purpose {
            Purpose::Auth => RoundPurpose::Auth,
            Purpose::Read(req) if req.len() > MAX_READ_REQUEST => {
                return Err(UsageError::ReadRequestTooLong(req.len()));
            }
            Purpose::Read(_) => RoundPurpose::Read,
        };
        let round = group.next_round;
        let next = round.checked_add(1).ok_or(UsageError::CounterExhausted)?;
        let mut nonce_v = [0u8; 16];
        rng.fill_bytes(&mut nonce_v);
        let e_v = (mode == Mode::PskEcdhe).then(|| EphemeralKeyPair::generate(rng));

        let mut challenge = Challenge {
            group: group.group,
            round,
            epoch: group.epoch,
            nonce_v,
            e_v: e_v.as_ref().map(EphemeralKeyPair::public),
            purpose,
            group_seq: group.latest_seq,
            config_hash: group.config_hash,
            not_after,
            key_cert: self.key_cert,
            key_id: self.key_id,
            signature: [0; 64],
        };
        challenge.signature = self.online.sign(&challenge.signed_bytes());
        let bytes = challenge.to_bytes();

        group.next_round = next;
        if e_v.is_some() {
            group.ecdhe_rounds = group.ecdhe_rounds.saturating_add(1);
        }
        let state = RoundState {
            group: group.group,
            round,
            epoch: group.epoch,
            mode,
            purpose: round_purpose,
            ch_hash: Sha256::digest(&bytes).into(),
            not_after,
            open: true,
            e_v_secret: e_v.map(|p| EphemeralSecret(p.secret_bytes())),
            accepted: Default::default(),
        };
        Ok((state, bytes))
    }
}

/// Key material of a screened candidate, kept for its finalization.
pub(crate) struct CandidateKeys {
    prk0: FastPrk0,
    resp: ResponseKeys,
}

/// Lines a registry's answer up with a batch's entries: entry `i` gets
/// record `i` only if it names the entry's id. Anything else (a record of
/// another member, too few or too many records: a store bug) makes the
/// entry an unknown member, never another member's key, never a panic.
pub(crate) fn align_records(
    entries: &[ResponseEntry],
    records: Vec<Option<MemberRecord>>,
) -> Vec<Option<MemberRecord>> {
    let mut records = records.into_iter();
    entries
        .iter()
        .map(|e| records.next().flatten().filter(|r| r.id == e.id))
        .collect()
}

/// Screens every entry of a response batch.
///
/// Returns the screened entries and, for candidates, the keys derived while
/// recomputing their tags (so finalization does not derive them again).
pub(crate) fn screen(
    verifier: &Verifier,
    group: GroupId,
    round: Option<&RoundState>,
    entries: &[ResponseEntry],
    records: &[Option<MemberRecord>],
    now: u64,
) -> (Vec<Screened>, Vec<Option<CandidateKeys>>) {
    let open = round.filter(|r| r.is_open_at(now));
    let mut screened = Vec::with_capacity(entries.len());
    let mut keys = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        // A record for another id (or none at this index) is a store bug;
        // using it would check the entry under another member's key.
        let rec = records
            .get(i)
            .and_then(Option::as_ref)
            .filter(|r| r.id == e.id);
        let Some(rec) = rec else {
            screened.push(Screened {
                set_aside: Some(Outcome::UnknownMember),
                tag: None,
            });
            keys.push(None);
            continue;
        };
        let set_aside = if rec.status == MemberStatus::Revoked {
            Some(Outcome::Revoked)
        } else if !rec.in_group(group) {
            Some(Outcome::NotInGroup)
        } else if open.is_none() {
            Some(Outcome::RoundNotOpen)
        } else if open.is_some_and(|r| r.accepted.contains(&e.id)) {
            Some(Outcome::AlreadyAccepted)
        } else if !rec.accepts_kv(e.kv) {
            Some(Outcome::StaleKeyVersion)
        } else {
            None
        };
        // Nothing can be accepted in a round that is not open, so no tag is
        // worth computing; otherwise every known member's tag is recomputed,
        // set aside or not, so that it does not fail its chunk.
        let derived = open.and_then(|r| {
            let k_i = rec.key_for(e.kv, &verifier.deriver)?;
            let th = transcript_hash(&r.ch_hash, e.id.0, e.kv, &e.n_i, e.e_i.as_ref());
            let (resp, prk0) = response_keys(&k_i, &th);
            let tag = Gcm::new(resp.k_resp.expose()).tag(resp.iv_resp.expose(), &th, &e.c);
            Some((tag, CandidateKeys { prk0, resp }))
        });
        match derived {
            Some((tag, k)) => {
                screened.push(Screened {
                    set_aside,
                    tag: Some(tag),
                });
                keys.push(set_aside.is_none().then_some(k));
            }
            None => {
                screened.push(Screened {
                    set_aside,
                    tag: None,
                });
                keys.push(None);
            }
        }
    }
    (screened, keys)
}

/// A reading collected in a read round. `Debug` shows the payload's length
/// only: meter readings are personal data.
#[derive(Clone, PartialEq, Eq)]
pub struct Reading {
    /// The member.
    pub id: MemberId,
    /// The decrypted payload.
    pub payload: Vec<u8>,
}

impl core::fmt::Debug for Reading {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Reading")
            .field("id", &self.id)
            .field("payload", &Redacted(self.payload.len()))
            .finish()
    }
}

/// Prints `<N bytes redacted>` in place of a plaintext payload.
pub(crate) struct Redacted(pub(crate) usize);

impl core::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "<{} bytes redacted>", self.0)
    }
}

/// What finalizing the accepted entries produced.
pub(crate) struct Finalized {
    pub(crate) confirms: Vec<Confirm>,
    pub(crate) readings: Vec<Reading>,
    pub(crate) touched: Vec<MemberId>,
    pub(crate) kv_confirmed: Vec<(MemberId, u32)>,
    pub(crate) ecdhe_missed: Vec<(MemberId, u64)>,
}

/// Turns every `Accepted` outcome into a session, a confirm and (in a read
/// round) a reading, or demotes it when its key share or payload is bad.
///
/// Mutates `outcomes` (demotions), `round.accepted` and the session slots.
#[allow(clippy::too_many_arguments)]
pub(crate) fn finalize(
    verifier: &Verifier,
    group: &GroupState,
    round: &mut RoundState,
    entries: &[ResponseEntry],
    records: &[Option<MemberRecord>],
    keys: &mut [Option<CandidateKeys>],
    outcomes: &mut [Outcome],
    sessions: &mut SessionTable,
) -> Finalized {
    let mut out = Finalized {
        confirms: Vec::new(),
        readings: Vec::new(),
        touched: Vec::new(),
        kv_confirmed: Vec::new(),
        ecdhe_missed: Vec::new(),
    };
    // `e_V` is restored once for the whole batch.
    let e_v = match (&round.mode, &round.e_v_secret) {
        (Mode::PskEcdhe, Some(EphemeralSecret(s))) => RoundDh::new(s).ok(),
        _ => None,
    };
    for (i, e) in entries.iter().enumerate() {
        if outcomes[i] != Outcome::Accepted {
            continue;
        }
        let rec = records
            .get(i)
            .and_then(Option::as_ref)
            .filter(|r| r.id == e.id);
        let (Some(k), Some(rec)) = (keys.get_mut(i).and_then(Option::take), rec) else {
            // Screening keeps keys for every candidate; without them the
            // entry cannot be finalized, so it is not accepted.
            outcomes[i] = Outcome::UnverifiedViaGateway;
            continue;
        };
        // X25519 only now, for entries whose psk tag verified.
        let dh = match (round.mode, &e_v, &e.e_i) {
            (Mode::Psk, _, _) => None,
            (Mode::PskEcdhe, Some(pair), Some(e_i)) => match pair.agree(e_i) {
                Ok(dh) => Some(dh),
                Err(_) => {
                    outcomes[i] = Outcome::MalformedPayload;
                    continue;
                }
            },
            (Mode::PskEcdhe, None, _) => {
                outcomes[i] = Outcome::RoundNotOpen;
                continue;
            }
            (Mode::PskEcdhe, Some(_), None) => {
                outcomes[i] = Outcome::MalformedPayload;
                continue;
            }
        };
        // The tag (or chunk aggregate) verified: decrypt without checking.
        match round.purpose {
            RoundPurpose::Auth if !e.c.is_empty() => {
                outcomes[i] = Outcome::MalformedPayload;
                continue;
            }
            RoundPurpose::Auth => {}
            RoundPurpose::Read => {
                let mut payload = e.c.to_vec();
                Gcm::new(k.resp.k_resp.expose())
                    .decrypt_in_place(k.resp.iv_resp.expose(), &mut payload);
                out.readings.push(Reading { id: e.id, payload });
            }
        }

        let s = session_keys(&k.prk0, dh.as_deref());
        let sid = SessionId(s.sid);
        let confirm = seal_confirm(group, round.round, e.id, sid, &s.k_conf, &s.iv_conf);
        let seal = ConfirmSeal::of(&confirm);
        out.confirms.push(confirm);

        let (slot, fresh_slot) = sessions.entry_new(group.group, e.id);
        if fresh_slot || round.mode == Mode::PskEcdhe {
            slot.ecdhe_mark = group.ecdhe_rounds;
        } else {
            let missed = group.ecdhe_rounds.saturating_sub(slot.ecdhe_mark);
            if missed >= verifier.config.ecdhe_miss_warning {
                out.ecdhe_missed.push((e.id, missed));
            }
        }
        slot.install(
            SessionState {
                group: group.group,
                id: e.id,
                sid,
                round: round.round,
                mode: round.mode,
                k_up: s.k_up.clone(),
                iv_up: s.iv_up.clone(),
                k_down: s.k_down.clone(),
                window: Default::default(),
                down_ctr: 0,
            },
            Some(seal),
        );
        round.accepted.insert(e.id);
        out.touched.push(e.id);
        if e.kv > rec.min_kv {
            out.kv_confirmed.push((e.id, e.kv));
        }
    }
    out
}

/// `W_i = AES-128-GCM(k_conf, iv_conf, aad, GK_e)` as a Confirm message.
fn seal_confirm(
    group: &GroupState,
    round: u64,
    id: MemberId,
    sid: SessionId,
    k_conf: &Key16,
    iv_conf: &Iv12,
) -> Confirm {
    let aad = confirm_aad(group.group, round, group.epoch, id, sid);
    let mut buf = *group.gk.expose();
    let tag = Gcm::new(k_conf.expose()).seal_in_place(iv_conf.expose(), &aad, &mut buf);
    let mut w = [0u8; 32];
    w[..16].copy_from_slice(&buf);
    w[16..].copy_from_slice(&tag);
    // `buf` holds ciphertext now; clear it anyway so no copy of GK_e's
    // keystream-masked form lingers.
    buf.zeroize();
    Confirm {
        group: group.group,
        round,
        epoch: group.epoch,
        id,
        sid,
        w,
    }
}

/// Counts outcomes for metrics.
pub(crate) fn count(outcomes: &[Outcome], localized: u32) -> VerdictCounters {
    let mut c = VerdictCounters {
        localized,
        ..Default::default()
    };
    for o in outcomes {
        if let Some(n) = c.by_outcome.get_mut(usize::from(o.code())) {
            *n += 1;
        }
    }
    c
}
