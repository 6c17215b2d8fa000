//! What a member persists between boots: [`MemberState`] and its canonical
//! binary encoding.
//!
//! The member state machine (`super`) changes a copy of this state, hands
//! the encoding to its caller to store, and only then lets the message that
//! the new state covers out. Restoring decodes the last stored encoding.

use std::collections::BTreeMap;

use bytes::{BufMut, Bytes, BytesMut};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

use super::MemberError;
use crate::protocol::codec::{DecodeError, Reader, put_opt_flag, put_vec16};
use crate::protocol::keys::{MemberKey, SessionKeys};
use crate::protocol::suite::{Iv12, Key16, Secret, VerifyingKey, ct_eq};
use crate::protocol::wire::{
    ACK_PAYLOAD_LEN, GroupId, MAX_DIRECT_INNER, MemberId, Mode, Response, SessionId, Uplink,
    UplinkKind,
};

/// First bytes of every encoded state.
const MAGIC: &[u8; 4] = b"dgms";
/// Version of the state encoding described on [`MemberState`]. Format 1
/// (no stored ack) is still read.
const FORMAT: u8 = 2;
/// Length of a stored ack: an Uplink (type and version bytes, group u32,
/// id u64, sid [8], kind u8, ctr u64, length u16, tag [16]) of an ack's
/// 52-byte payload.
pub(super) const ACK_UPLINK_LEN: usize = 2 + 4 + 8 + 8 + 1 + 8 + 2 + 16 + ACK_PAYLOAD_LEN;
/// Label hashed in front of the state to form its checksum.
const CHECKSUM_LABEL: &[u8] = b"dapgw v1 member state";
/// Length of the trailing checksum.
const CHECKSUM_LEN: usize = 16;
/// Most groups one member may belong to.
pub(crate) const MAX_GROUPS: usize = 256;
/// Longest stored response: a psk-ecdhe Response with a full payload (the
/// same bound as the inner message of a Direct).
pub(super) const MAX_RESPONSE_LEN: usize = MAX_DIRECT_INNER;

/// Everything a member must keep across reboots, and nothing else.
///
/// Secrets (the root key, session keys, group keys) are zeroized on drop and
/// never printed; the encoding holds them in the clear, so the caller stores
/// it where the meter keeps its root key.
///
/// # Encoding, format 2
///
/// Big-endian integers, `opt<T>` a `u8` flag 0/1 then `T`, `vec16` a `u16`
/// length then bytes, as in docs/protocol.md. The encoding is canonical:
/// decoding then encoding gives the same bytes (for format 2; a format-1
/// state is written as format 2 at its next change, which older builds
/// cannot read).
///
/// ```text
/// magic        [4]   "dgms"
/// format       u8    = 2 (1 is read too: no applied_ack)
/// id           u64   member id
/// kv           u32   version of root_key
/// root_key     [32]  current member root key K_i (secret)
/// root_public  [32]  V's pinned root public key (from the credential)
/// online       opt<OnlineKey>   online signing key learned from a certificate
/// n_groups     u16   0..=256
/// groups       n_groups x GroupState, strictly increasing by group
/// checksum     [16]  SHA-256("dapgw v1 member state" || all bytes before)[0..16]
///
/// OnlineKey    = key_id u32 | key_version u32 | public_key [32]
/// GroupState   = group u32
///              | applied_seq   opt<u64>   last group-message seq applied
///              | applied_ack   opt<AppliedAck>  (format 2; only with applied_seq)
///              | announced_seq u64        highest group_seq in an answered challenge
///              | answered      opt<Answered>
///              | session       opt<Session>
/// AppliedAck   = message_hash [32]      SHA-256 of that group message
///              | ack vec16                the exact ack Uplink sent (101 bytes)
/// Answered     = round u64                last round answered
///              | ch_hash [32]             SHA-256 of that challenge
///              | response vec16           the exact Response sent (cap 1,117)
///              | pending opt<Pending>     present until the confirm is opened
/// Pending      = mode u8 (1 psk, 2 psk-ecdhe) | sid [8]
///              | k_conf [16] | iv_conf [12] | k_up [16] | iv_up [12] | k_down [16]
/// Session      = round u64 | mode u8 | sid [8]
///              | k_up [16] | iv_up [12] | k_down [16]
///              | epoch u64 | gk [16]      current group epoch and GK_e
///              | ctr_reserved u64         uplink counters up to this may have been used
///              | down_ctr opt<u64>        last rekey / key-update counter accepted
/// ```
///
/// The pending session keys are derived when the response is sealed (in
/// psk-ecdhe the member's ephemeral secret is used then and erased at
/// once), so no ephemeral secret is ever persisted.
#[derive(Clone)]
pub struct MemberState {
    pub(super) id: MemberId,
    pub(super) kv: u32,
    pub(super) root_key: MemberKey,
    pub(super) root_public: [u8; 32],
    pub(super) online: Option<OnlineKey>,
    pub(super) groups: BTreeMap<GroupId, GroupState>,
}

impl core::fmt::Debug for MemberState {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MemberState")
            .field("id", &self.id)
            .field("kv", &self.kv)
            .field("groups", &self.groups.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// V's current online signing key, as certified by the root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct OnlineKey {
    /// Id named by the signatures it makes.
    pub(crate) key_id: u32,
    /// Only a certificate with a higher version replaces it.
    pub(crate) key_version: u32,
    /// The parsed key (valid and not weak).
    pub(crate) key: VerifyingKey,
}

/// The member's view of one group.
#[derive(Clone, Debug, Default)]
pub(crate) struct GroupState {
    /// Last group-message seq applied; only a higher one is accepted.
    pub(crate) applied_seq: Option<u64>,
    /// The message of `applied_seq` (its hash) and the ack sent for it:
    /// the same message again gets the same ack bytes again.
    pub(crate) applied_ack: Option<AppliedAck>,
    /// Highest seq announced by a verified challenge: older group messages
    /// are superseded even if never applied.
    pub(crate) announced_seq: u64,
    /// The last round answered, for byte-for-byte re-sends and the
    /// strictly-increasing round rule.
    pub(crate) answered: Option<Answered>,
    /// The current session, from the last confirm opened.
    pub(crate) session: Option<Session>,
}

/// The last group message applied and the ack sealed for it.
#[derive(Clone, Debug)]
pub(crate) struct AppliedAck {
    /// SHA-256 of the group message's bytes.
    pub(crate) message_hash: [u8; 32],
    /// The ack Uplink, byte for byte.
    pub(crate) ack: Bytes,
}

/// The last round a member answered in a group.
#[derive(Clone, Debug)]
pub(crate) struct Answered {
    pub(crate) round: u64,
    pub(crate) ch_hash: [u8; 32],
    /// The exact Response bytes sent, re-sent if the same challenge returns.
    pub(crate) response: Bytes,
    /// The session keys awaiting V's confirm of this round.
    pub(crate) pending: Option<Pending>,
}

/// Session keys derived with a response, waiting for the confirm.
#[derive(Clone, Debug)]
pub(crate) struct Pending {
    pub(crate) mode: Mode,
    pub(crate) keys: SessionKeys,
    /// The session's counters start above this (memory only: 0 for a
    /// fresh answer, a random jump for one read back by
    /// [`Member::restore`](super::Member::restore), which may be an older
    /// copy whose confirm already opened a session that sent uplinks).
    pub(crate) ctr_start: u64,
}

/// A session the member switched to by opening a confirm.
#[derive(Clone, Debug)]
pub(crate) struct Session {
    /// The round whose confirm opened it.
    pub(crate) round: u64,
    /// Key updates are accepted only in psk-ecdhe sessions.
    pub(crate) mode: Mode,
    pub(crate) sid: SessionId,
    pub(crate) k_up: Key16,
    pub(crate) iv_up: Iv12,
    pub(crate) k_down: Key16,
    /// Current group epoch and its key GK_e.
    pub(crate) epoch: u64,
    pub(crate) gk: Key16,
    /// Persisted high-water mark: counters up to here may have been used.
    pub(crate) ctr_reserved: u64,
    /// Last counter used (memory only; restored as `ctr_reserved`, so a
    /// reboot continues above anything that may have been sent).
    pub(crate) ctr_used: u64,
    /// Last down_ctr accepted in a rekey or key update.
    pub(crate) down_ctr: Option<u64>,
}

impl MemberState {
    /// A fresh state: no online key, no rounds, no sessions.
    pub(crate) fn fresh(
        id: MemberId,
        kv: u32,
        root_key: MemberKey,
        root_public: [u8; 32],
        groups: impl IntoIterator<Item = GroupId>,
    ) -> Self {
        Self {
            id,
            kv,
            root_key,
            root_public,
            online: None,
            groups: groups
                .into_iter()
                .map(|g| (g, GroupState::default()))
                .collect(),
        }
    }

    /// The canonical encoding (see the type's doc). Holds secrets.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        self.encode(FORMAT)
    }

    /// The encoding in `format` (1 drops the stored acks; for tests of
    /// reading format 1).
    pub(super) fn encode(&self, format: u8) -> Zeroizing<Vec<u8>> {
        let mut out = BytesMut::with_capacity(self.encoded_len_hint());
        out.put_slice(MAGIC);
        out.put_u8(format);
        out.put_u64(self.id.0);
        out.put_u32(self.kv);
        out.put_slice(self.root_key.expose());
        out.put_slice(&self.root_public);
        put_opt_flag(&mut out, self.online.is_some());
        if let Some(k) = &self.online {
            out.put_u32(k.key_id);
            out.put_u32(k.key_version);
            out.put_slice(&k.key.to_bytes());
        }
        // The group count is capped at construction and decoding.
        out.put_u16(self.groups.len() as u16);
        for (g, s) in &self.groups {
            encode_group(&mut out, *g, s, format);
        }
        let sum = checksum(&out);
        out.put_slice(&sum);
        // Move the bytes out without leaving an unzeroized copy behind.
        let mut v = Zeroizing::new(Vec::with_capacity(out.len()));
        v.extend_from_slice(&out);
        out.as_mut().zeroize();
        v
    }

    fn encoded_len_hint(&self) -> usize {
        120 + self.groups.len() * 400
    }

    /// Decodes a state written by [`MemberState::to_bytes`], checking its
    /// checksum and every structural rule.
    pub fn decode(bytes: &[u8]) -> Result<Self, MemberError> {
        let Some(body_len) = bytes.len().checked_sub(CHECKSUM_LEN) else {
            return Err(MemberError::BadState("checksum"));
        };
        let (body, sum) = bytes.split_at(body_len);
        if !ct_eq(&checksum(body), sum) {
            return Err(MemberError::BadState("checksum"));
        }
        // The codec reads from `Bytes`; wipe this copy of the secrets after.
        let src = Bytes::from(body.to_vec());
        let result = decode_body(&src).map_err(|e| MemberError::BadState(decode_where(e)));
        if let Ok(mut b) = src.try_into_mut() {
            b.as_mut().zeroize();
        }
        result
    }
}

/// `SHA-256("dapgw v1 member state" || body)[0..16]`: catches truncation and
/// storage corruption (it is not a MAC; the state is the meter's secret).
fn checksum(body: &[u8]) -> [u8; CHECKSUM_LEN] {
    let h: [u8; 32] = Sha256::new()
        .chain_update(CHECKSUM_LABEL)
        .chain_update(body)
        .finalize()
        .into();
    let mut out = [0u8; CHECKSUM_LEN];
    out.copy_from_slice(&h[..CHECKSUM_LEN]);
    out
}

fn decode_where(e: DecodeError) -> &'static str {
    match e {
        DecodeError::Truncated(w)
        | DecodeError::TooLong(w)
        | DecodeError::Invalid(w)
        | DecodeError::TrailingBytes(w) => w,
        _ => "state",
    }
}

fn encode_group(out: &mut BytesMut, g: GroupId, s: &GroupState, format: u8) {
    out.put_u32(g.0);
    put_opt_flag(out, s.applied_seq.is_some());
    if let Some(seq) = s.applied_seq {
        out.put_u64(seq);
    }
    if format >= 2 {
        let ack = s.applied_ack.as_ref().filter(|_| s.applied_seq.is_some());
        put_opt_flag(out, ack.is_some());
        if let Some(a) = ack {
            out.put_slice(&a.message_hash);
            put_vec16(out, &a.ack);
        }
    }
    out.put_u64(s.announced_seq);
    put_opt_flag(out, s.answered.is_some());
    if let Some(a) = &s.answered {
        out.put_u64(a.round);
        out.put_slice(&a.ch_hash);
        put_vec16(out, &a.response);
        put_opt_flag(out, a.pending.is_some());
        if let Some(p) = &a.pending {
            out.put_u8(p.mode.code());
            out.put_slice(&p.keys.sid);
            out.put_slice(p.keys.k_conf.expose());
            out.put_slice(p.keys.iv_conf.expose());
            out.put_slice(p.keys.k_up.expose());
            out.put_slice(p.keys.iv_up.expose());
            out.put_slice(p.keys.k_down.expose());
        }
    }
    put_opt_flag(out, s.session.is_some());
    if let Some(s) = &s.session {
        out.put_u64(s.round);
        out.put_u8(s.mode.code());
        out.put_slice(&s.sid.0);
        out.put_slice(s.k_up.expose());
        out.put_slice(s.iv_up.expose());
        out.put_slice(s.k_down.expose());
        out.put_u64(s.epoch);
        out.put_slice(s.gk.expose());
        out.put_u64(s.ctr_reserved);
        put_opt_flag(out, s.down_ctr.is_some());
        if let Some(d) = s.down_ctr {
            out.put_u64(d);
        }
    }
}

fn decode_body(src: &Bytes) -> Result<MemberState, DecodeError> {
    let mut r = Reader::new(src);
    if r.take(4, "state.magic")? != MAGIC {
        return Err(DecodeError::Invalid("state.magic"));
    }
    let format = r.u8("state.format")?;
    if format != FORMAT && format != 1 {
        return Err(DecodeError::Invalid("state.format"));
    }
    let id = MemberId(r.u64("state.id")?);
    let kv = r.u32("state.kv")?;
    let root_key = MemberKey::from_bytes(r.array("state.root_key")?);
    let root_public = r.array("state.root_public")?;
    let online = if r.opt_flag("state.online")? {
        let key_id = r.u32("state.online.key_id")?;
        let key_version = r.u32("state.online.key_version")?;
        let key = VerifyingKey::from_bytes(&r.array("state.online.public_key")?)
            .map_err(|_| DecodeError::Invalid("state.online.public_key"))?;
        Some(OnlineKey {
            key_id,
            key_version,
            key,
        })
    } else {
        None
    };
    let n = usize::from(r.u16("state.n_groups")?);
    if n > MAX_GROUPS {
        return Err(DecodeError::TooLong("state.n_groups"));
    }
    let mut groups = BTreeMap::new();
    let mut last: Option<GroupId> = None;
    for _ in 0..n {
        let (g, s) = decode_group(&mut r, id, format)?;
        if last.is_some_and(|l| g <= l) {
            return Err(DecodeError::Invalid("state.group order"));
        }
        last = Some(g);
        groups.insert(g, s);
    }
    r.expect_end("state")?;
    Ok(MemberState {
        id,
        kv,
        root_key,
        root_public,
        online,
        groups,
    })
}

fn read_mode(r: &mut Reader<'_>, what: &'static str) -> Result<Mode, DecodeError> {
    Mode::from_code(r.u8(what)?).ok_or(DecodeError::Invalid(what))
}

fn read_opt_u64(r: &mut Reader<'_>, what: &'static str) -> Result<Option<u64>, DecodeError> {
    if r.opt_flag(what)? {
        Ok(Some(r.u64(what)?))
    } else {
        Ok(None)
    }
}

fn decode_group(
    r: &mut Reader<'_>,
    id: MemberId,
    format: u8,
) -> Result<(GroupId, GroupState), DecodeError> {
    let g = GroupId(r.u32("state.group")?);
    let applied_seq = read_opt_u64(r, "state.group.applied_seq")?;
    let applied_ack = if format >= 2 && r.opt_flag("state.group.applied_ack")? {
        let message_hash = r.array("state.applied_ack.message_hash")?;
        let ack = Bytes::copy_from_slice(&r.vec16(ACK_UPLINK_LEN, "state.applied_ack.ack")?);
        let sent =
            Uplink::decode(&ack).map_err(|_| DecodeError::Invalid("state.applied_ack.ack"))?;
        if applied_seq.is_none()
            || sent.id != id
            || sent.group != g
            || sent.kind != UplinkKind::Ack
            || sent.ctr == 0
            || sent.c.len() != ACK_PAYLOAD_LEN
        {
            return Err(DecodeError::Invalid("state.applied_ack"));
        }
        Some((AppliedAck { message_hash, ack }, sent.sid, sent.ctr))
    } else {
        None
    };
    let announced_seq = r.u64("state.group.announced_seq")?;
    let answered = if r.opt_flag("state.group.answered")? {
        let round = r.u64("state.answered.round")?;
        let ch_hash = r.array("state.answered.ch_hash")?;
        // Copied out, so no slice keeps the buffer holding secrets alive.
        let response =
            Bytes::copy_from_slice(&r.vec16(MAX_RESPONSE_LEN, "state.answered.response")?);
        let sent = Response::decode(&response)
            .map_err(|_| DecodeError::Invalid("state.answered.response"))?;
        if sent.id != id || sent.group != g || sent.round != round {
            return Err(DecodeError::Invalid("state.answered.response"));
        }
        let pending = if r.opt_flag("state.answered.pending")? {
            let mode = read_mode(r, "state.pending.mode")?;
            if mode != sent.mode() {
                return Err(DecodeError::Invalid("state.pending.mode"));
            }
            let sid = r.array("state.pending.sid")?;
            let keys = SessionKeys {
                k_conf: Secret::from_bytes(r.array("state.pending.k_conf")?),
                iv_conf: Secret::from_bytes(r.array("state.pending.iv_conf")?),
                k_up: Secret::from_bytes(r.array("state.pending.k_up")?),
                iv_up: Secret::from_bytes(r.array("state.pending.iv_up")?),
                k_down: Secret::from_bytes(r.array("state.pending.k_down")?),
                sid,
            };
            Some(Pending {
                mode,
                keys,
                ctr_start: 0,
            })
        } else {
            None
        };
        Some(Answered {
            round,
            ch_hash,
            response,
            pending,
        })
    } else {
        None
    };
    let (applied_ack, ack_sid_ctr) = match applied_ack {
        Some((a, sid, ctr)) => (Some(a), Some((sid, ctr))),
        None => (None, None),
    };
    let session = if r.opt_flag("state.group.session")? {
        let round = r.u64("state.session.round")?;
        let mode = read_mode(r, "state.session.mode")?;
        let sid = SessionId(r.array("state.session.sid")?);
        let k_up = Secret::from_bytes(r.array("state.session.k_up")?);
        let iv_up = Secret::from_bytes(r.array("state.session.iv_up")?);
        let k_down = Secret::from_bytes(r.array("state.session.k_down")?);
        let epoch = r.u64("state.session.epoch")?;
        let gk = Secret::from_bytes(r.array("state.session.gk")?);
        let ctr_reserved = r.u64("state.session.ctr_reserved")?;
        let down_ctr = read_opt_u64(r, "state.session.down_ctr")?;
        // A session comes from a round this member answered.
        if answered.as_ref().is_none_or(|a| a.round < round) {
            return Err(DecodeError::Invalid("state.session.round"));
        }
        // A stored ack of this session used a counter the state reserved:
        // otherwise the member could seal a new uplink with that counter
        // under the same key (a GCM nonce used twice).
        if ack_sid_ctr.is_some_and(|(s, ctr)| s == sid && ctr > ctr_reserved) {
            return Err(DecodeError::Invalid("state.applied_ack.ctr"));
        }
        Some(Session {
            round,
            mode,
            sid,
            k_up,
            iv_up,
            k_down,
            epoch,
            gk,
            ctr_reserved,
            ctr_used: ctr_reserved,
            down_ctr,
        })
    } else {
        None
    };
    Ok((
        g,
        GroupState {
            applied_seq,
            applied_ack,
            announced_seq,
            answered,
            session,
        },
    ))
}
