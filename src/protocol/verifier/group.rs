//! Group management on V's side: signed group messages, new epochs on
//! membership changes (rekeys), and member key rotation (key updates).
//!
//! Data flow: the UDC calls these with the group's [`GroupState`] and the
//! session slots of the members concerned; each returns the messages to
//! hand to the gateway after the caller persisted the changed state (the
//! new seq, epoch and key, and every incremented `down_ctr`). Every
//! multi-use key here (`GK_e`, `k_down`) takes a fresh random nonce.

use bytes::Bytes;
use rand_core::CryptoRng;
use sha2::{Digest, Sha256};

use super::registry::MemberRecord;
use super::state::{GroupState, SentMessage, SessionSlot, SessionTable};
use super::{UsageError, Verifier};
use crate::protocol::suite::{Gcm, Key16};
use crate::protocol::wire::{
    GroupMessage, KeyUpdate, MAX_GROUP_PAYLOAD, MemberId, Mode, Rekey, key_update_aad, rekey_aad,
};

/// The key updates V issued to one member and its registry record after.
#[derive(Debug)]
#[must_use]
pub struct KeyUpdateIssued {
    /// One KeyUpdate per psk-ecdhe session of the member (the member accepts
    /// the one for the session it is in).
    pub updates: Vec<KeyUpdate>,
    /// The record to store before sending: `kv` raised, the old version
    /// still accepted until the member answers under the new one.
    pub record: MemberRecord,
}

impl Verifier {
    /// Seals and signs a group message carrying `payload` (a configuration)
    /// under the current `GK_e`, with the next seq.
    ///
    /// Updates `group.latest_seq`, `group.config_hash` and the remembered
    /// sent messages (for acks): persist the group state before sending.
    pub fn group_message(
        &self,
        group: &mut GroupState,
        payload: &[u8],
        valid_through_round: u64,
        rng: &mut impl CryptoRng,
    ) -> Result<Bytes, UsageError> {
        if payload.len() > MAX_GROUP_PAYLOAD {
            return Err(UsageError::PayloadTooLong(payload.len()));
        }
        let seq = group
            .latest_seq
            .checked_add(1)
            .ok_or(UsageError::CounterExhausted)?;
        let mut nonce = [0u8; 12];
        rng.fill_bytes(&mut nonce);
        let mut msg = GroupMessage {
            group: group.group,
            epoch: group.epoch,
            seq,
            valid_through_round,
            nonce,
            c: Bytes::new(),
            key_id: self.key_id,
            signature: [0; 64],
        };
        let mut c = payload.to_vec();
        let tag = Gcm::new(group.gk.expose()).seal_in_place(&nonce, &msg.aad(), &mut c);
        c.extend_from_slice(&tag);
        msg.c = Bytes::from(c);
        msg.signature = self.online.sign(&msg.signed_bytes());
        let bytes = msg.to_bytes();

        group.latest_seq = seq;
        // The hash of the message, not of the payload: challenges travel
        // in the clear, and a hash of a low-entropy configuration would let
        // the gateway confirm a guess of it (deviation 17).
        let hash: [u8; 32] = Sha256::digest(&bytes).into();
        group.config_hash = hash;
        group.remember_sent(SentMessage {
            seq,
            epoch: group.epoch,
            hash,
        });
        Ok(bytes)
    }

    /// Revokes `member` from the group: deletes its sessions, starts epoch
    /// e+1 with a fresh `GK_{e+1}`, and returns a rekey for every session of
    /// every remaining member in `sessions`. `GK_e` is dropped from the
    /// group state, so nothing more is sealed under it.
    ///
    /// `sessions` must hold every slot of the group; a member whose slot is
    /// missing gets the new key only from its next confirm. The caller also
    /// marks the member revoked (or removes the group) in the registry, and
    /// persists the group state and all slots before sending.
    pub fn revoke(
        &self,
        group: &mut GroupState,
        member: MemberId,
        sessions: &mut SessionTable,
        rng: &mut impl CryptoRng,
    ) -> Result<Vec<Rekey>, UsageError> {
        // Check the epoch before deleting anything, so a failure changes
        // nothing.
        group
            .epoch
            .checked_add(1)
            .ok_or(UsageError::CounterExhausted)?;
        // Dropped in its box: the keys are zeroized where they lie.
        drop(sessions.remove_boxed(group.group, member));
        self.new_epoch(group, sessions, rng)
    }

    /// Starts epoch e+1 for a member joining the group, so the newcomer
    /// (who gets `GK_{e+1}` in its first confirm) cannot read earlier group
    /// messages. Returns a rekey for every session in `sessions` (which must
    /// hold every slot of the group); persist as for [`Self::revoke`].
    pub fn add_member(
        &self,
        group: &mut GroupState,
        sessions: &mut SessionTable,
        rng: &mut impl CryptoRng,
    ) -> Result<Vec<Rekey>, UsageError> {
        self.new_epoch(group, sessions, rng)
    }

    /// Draws `GK_{e+1}` and seals it for every session of the group.
    fn new_epoch(
        &self,
        group: &mut GroupState,
        sessions: &mut SessionTable,
        rng: &mut impl CryptoRng,
    ) -> Result<Vec<Rekey>, UsageError> {
        let new_epoch = group
            .epoch
            .checked_add(1)
            .ok_or(UsageError::CounterExhausted)?;
        let new_gk = Key16::random(rng);
        let mut rekeys = Vec::new();
        for id in sessions.members_of(group.group) {
            let Some(slot) = sessions.get_mut(group.group, id) else {
                continue;
            };
            // A member may be in any kept session (it switches when it
            // opens a confirm, which may be lost), so each gets the key; it
            // accepts the one for its own.
            for s in slot.sessions_mut() {
                let Some(down_ctr) = s.down_ctr.checked_add(1) else {
                    continue;
                };
                s.down_ctr = down_ctr;
                let mut nonce = [0u8; 12];
                rng.fill_bytes(&mut nonce);
                let aad = rekey_aad(group.group, new_epoch, id, s.sid, down_ctr);
                let mut buf = *new_gk.expose();
                let tag = Gcm::new(s.k_down.expose()).seal_in_place(&nonce, &aad, &mut buf);
                let mut c = [0u8; 32];
                c[..16].copy_from_slice(&buf);
                c[16..].copy_from_slice(&tag);
                rekeys.push(Rekey {
                    group: group.group,
                    id,
                    sid: s.sid,
                    new_epoch,
                    down_ctr,
                    nonce,
                    c,
                });
            }
        }
        group.epoch = new_epoch;
        // The old key is dropped (and zeroized) here.
        group.gk = new_gk;
        Ok(rekeys)
    }

    /// Moves a member's root key to version `kv + 1`: `K_i(kv+1)` (derived
    /// from MS) sealed under `k_down` of each psk-ecdhe session in `slot`.
    ///
    /// Refused unless the member has a psk-ecdhe session: under a psk session
    /// whoever held the old `K_i` could derive `k_down` and read the new key.
    /// Persist the slot (incremented `down_ctr`) and the returned record
    /// before sending.
    pub fn key_update(
        &self,
        slot: &mut SessionSlot,
        record: &MemberRecord,
        rng: &mut impl CryptoRng,
    ) -> Result<KeyUpdateIssued, UsageError> {
        if slot.is_empty() {
            return Err(UsageError::NoSession(record.id));
        }
        if slot.sessions_mut().any(|s| s.id != record.id) {
            return Err(UsageError::NoSession(record.id));
        }
        if !slot.sessions_mut().any(|s| s.mode == Mode::PskEcdhe) {
            return Err(UsageError::KeyUpdateNeedsEcdhe(record.id));
        }
        let new_kv = record
            .kv
            .checked_add(1)
            .ok_or(UsageError::KeyVersionExhausted(record.id))?;
        let new_key = self.deriver.member_key(record.id.0, new_kv);
        let mut updates = Vec::new();
        for s in slot.sessions_mut().filter(|s| s.mode == Mode::PskEcdhe) {
            let Some(down_ctr) = s.down_ctr.checked_add(1) else {
                continue;
            };
            s.down_ctr = down_ctr;
            let mut nonce = [0u8; 12];
            rng.fill_bytes(&mut nonce);
            let aad = key_update_aad(s.group, s.id, s.sid, new_kv, down_ctr);
            let mut buf = *new_key.expose();
            let tag = Gcm::new(s.k_down.expose()).seal_in_place(&nonce, &aad, &mut buf);
            let mut c = [0u8; 48];
            c[..32].copy_from_slice(&buf);
            c[32..].copy_from_slice(&tag);
            updates.push(KeyUpdate {
                group: s.group,
                id: s.id,
                sid: s.sid,
                new_kv,
                down_ctr,
                nonce,
                c,
            });
        }
        if updates.is_empty() {
            return Err(UsageError::CounterExhausted);
        }
        Ok(KeyUpdateIssued {
            updates,
            record: record.after_key_update(new_kv),
        })
    }
}
