//! Uplinks within a session: screening against the replay window, the same
//! chunk machinery as responses, decryption, and ack accounting.
//!
//! Data flow: an uplink batch's entries are looked up by (group, entry id,
//! sid) in the [`SessionTable`], so the key that verifies an entry is always
//! the session key of the id the entry names (an entry moved under another
//! id fails). `assess.rs` judges the chunks; [`finalize`] decrypts accepted
//! entries, advances each session's replay window, promotes a pending
//! session on its first use, and matches acks to group messages V sent.

use std::collections::{BTreeMap, BTreeSet};

use super::VerdictCounters;
use super::assess::{Judgement, Screened};
use super::round::count;
use super::state::{GroupState, SessionTable};
use crate::protocol::keys::uplink_nonce;
use crate::protocol::suite::{Gcm, ct_eq};
use crate::protocol::wire::{
    AckPayload, Batch, GroupId, MemberId, Outcome, SessionId, UplinkEntry, UplinkKind, Verdict,
    VerdictBody, uplink_aad,
};

/// A decrypted reading or alarm from an accepted uplink. `Debug` shows the
/// payload's length only.
#[derive(Clone, PartialEq, Eq)]
pub struct UplinkMessage {
    /// The member.
    pub id: MemberId,
    /// The session it came in.
    pub sid: SessionId,
    /// Reading or alarm.
    pub kind: UplinkKind,
    /// Its counter.
    pub ctr: u64,
    /// The plaintext.
    pub payload: Vec<u8>,
}

impl core::fmt::Debug for UplinkMessage {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("UplinkMessage")
            .field("id", &self.id)
            .field("sid", &self.sid)
            .field("kind", &self.kind)
            .field("ctr", &self.ctr)
            .field("payload", &super::round::Redacted(self.payload.len()))
            .finish()
    }
}

/// "Member `member` applied group message `seq` of `group`", from a verified
/// ack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct AppliedAck {
    /// The group.
    pub group: GroupId,
    /// The group message's seq.
    pub seq: u64,
    /// The member that applied it.
    pub member: MemberId,
}

/// The final verdict of an uplink batch and everything it changed.
#[derive(Debug)]
#[must_use]
pub struct UplinkVerdict {
    /// The wire verdict (outcomes in batch order, no confirms).
    pub verdict: Verdict,
    /// Accepted readings and alarms, in batch order.
    pub messages: Vec<UplinkMessage>,
    /// Accepted acks (apply them to an [`AckLedger`] or the store).
    pub acks: Vec<AppliedAck>,
    /// Members whose session slot changed (window advanced, pending session
    /// promoted): write these slots back.
    pub touched: Vec<MemberId>,
    /// For each member of `touched`, in the same order: the one session its
    /// accepted entries came under, or `None` when they came under more
    /// than one. With one session the slot's change is exactly
    /// [`SessionSlot::apply_use`] of that session and its new window, which
    /// a store may keep apart from the sealed slot.
    ///
    /// [`SessionSlot::apply_use`]: super::state::SessionSlot::apply_use
    pub sole_sid: Vec<Option<SessionId>>,
    /// Counts for metrics.
    pub counters: VerdictCounters,
}

/// Per (group, seq), the members that acked the group message.
#[derive(Clone, Debug, Default)]
pub struct AckLedger {
    acks: BTreeMap<(GroupId, u64), BTreeSet<MemberId>>,
}

impl AckLedger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records verified acks; a repeated ack counts once.
    pub fn record(&mut self, acks: &[AppliedAck]) {
        for a in acks {
            self.acks
                .entry((a.group, a.seq))
                .or_default()
                .insert(a.member);
        }
    }

    /// The members that applied `seq` of `group`.
    pub fn acked(&self, group: GroupId, seq: u64) -> Option<&BTreeSet<MemberId>> {
        self.acks.get(&(group, seq))
    }
}

/// Screened entries and, for entries with a known session, the cipher of
/// its uplink key (reused to decrypt accepted entries).
pub(crate) struct UplinkScreen {
    pub(crate) screened: Vec<Screened>,
    ciphers: Vec<Option<Gcm>>,
}

/// Screens every entry of an uplink batch: unknown sessions cannot be
/// checked (their chunk is localized), replayed counters are set aside but
/// still have their tag recomputed.
pub(crate) fn screen(
    group: GroupId,
    entries: &[UplinkEntry],
    sessions: &SessionTable,
) -> UplinkScreen {
    let mut screened = Vec::with_capacity(entries.len());
    let mut ciphers = Vec::with_capacity(entries.len());
    for e in entries {
        let session = sessions
            .get(group, e.id)
            .and_then(|slot| slot.by_sid(e.sid));
        let Some(s) = session else {
            screened.push(Screened {
                set_aside: Some(Outcome::UnknownSession),
                tag: None,
            });
            ciphers.push(None);
            continue;
        };
        let set_aside = (!s.window.is_fresh(e.ctr)).then_some(Outcome::ReplayedCounter);
        let gcm = Gcm::new(s.k_up.expose());
        let aad = uplink_aad(e.kind, group, e.id, e.sid, e.ctr);
        let tag = gcm.tag(&uplink_nonce(&s.iv_up, e.ctr), &aad, &e.c);
        screened.push(Screened {
            set_aside,
            tag: Some(tag),
        });
        ciphers.push(Some(gcm));
    }
    UplinkScreen { screened, ciphers }
}

/// Applies a judgement: decrypts accepted entries, checks acks, advances
/// windows and promotes sessions.
pub(crate) fn finalize(
    batch: &Batch,
    hash: [u8; 32],
    entries: &[UplinkEntry],
    screen: UplinkScreen,
    group: &GroupState,
    sessions: &mut SessionTable,
    judgement: Judgement,
) -> UplinkVerdict {
    let mut outcomes = judgement.outcomes;
    let mut messages = Vec::new();
    let mut acks = Vec::new();
    let mut used: Vec<(MemberId, SessionId)> = Vec::new();
    for ((e, outcome), gcm) in entries.iter().zip(outcomes.iter_mut()).zip(&screen.ciphers) {
        if *outcome != Outcome::Accepted {
            continue;
        }
        let (Some(gcm), Some(slot)) = (gcm, sessions.get_mut(group.group, e.id)) else {
            *outcome = Outcome::UnknownSession;
            continue;
        };
        let Some(session) = slot.by_sid_mut(e.sid) else {
            *outcome = Outcome::UnknownSession;
            continue;
        };
        // The tag (or chunk aggregate) verified: decrypt without checking.
        let mut payload = e.c.to_vec();
        gcm.decrypt_in_place(&uplink_nonce(&session.iv_up, e.ctr), &mut payload);
        if e.kind == UplinkKind::Ack {
            match check_ack(group, &payload) {
                Some(seq) => acks.push(AppliedAck {
                    group: group.group,
                    seq,
                    member: e.id,
                }),
                None => {
                    *outcome = Outcome::MalformedPayload;
                    continue;
                }
            }
        } else {
            messages.push(UplinkMessage {
                id: e.id,
                sid: e.sid,
                kind: e.kind,
                ctr: e.ctr,
                payload,
            });
        }
        session.window.accept(e.ctr);
        used.push((e.id, e.sid));
    }
    // Promote after the whole batch, so entries under the old session that
    // sort after the new one still find it.
    let mut touched: Vec<MemberId> = Vec::with_capacity(used.len());
    let mut sole_sid: Vec<Option<SessionId>> = Vec::with_capacity(used.len());
    for (id, sid) in used {
        if let Some(slot) = sessions.get_mut(group.group, id) {
            slot.mark_used(sid);
        }
        if touched.last() != Some(&id) {
            touched.push(id);
            sole_sid.push(Some(sid));
        } else if let Some(last) = sole_sid.last_mut()
            && *last != Some(sid)
        {
            *last = None;
        }
    }
    let counters = count(&outcomes, judgement.localized);
    UplinkVerdict {
        verdict: Verdict {
            gateway_id: batch.gateway_id,
            batch_id: batch.batch_id,
            batch_hash: hash,
            body: VerdictBody::Final {
                outcomes,
                confirms: Vec::new(),
            },
        },
        messages,
        acks,
        touched,
        sole_sid,
        counters,
    }
}

/// The seq an ack names, if it binds (group, epoch, seq, message hash) of a
/// group message V sent and still remembers.
fn check_ack(group: &GroupState, plaintext: &[u8]) -> Option<u64> {
    let ack = AckPayload::decode(plaintext).ok()?;
    let sent = group.sent_message(ack.seq)?;
    let binds =
        ack.group == group.group && ack.epoch == sent.epoch && ct_eq(&ack.message_hash, &sent.hash);
    binds.then_some(ack.seq)
}
