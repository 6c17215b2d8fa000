//! The whole protocol in memory, honest everywhere: members
//! (`protocol::member`), the gateway's aggregator and the verifier, on a
//! virtual clock. Each test follows one flow of the design end to end and
//! checks both sides agree.

mod common;

use std::collections::BTreeSet;

use bytes::Bytes;
use common::*;
use dapgw::protocol::aggregator::{BatchTrigger, Collected};
use dapgw::protocol::member::MemberError;
use dapgw::protocol::verifier::{BatchEvent, MemberStatus};
use dapgw::protocol::wire::{
    Batch, BatchBody, GroupId, MemberId, Mode, Outcome, Purpose, UplinkKind,
};

const G: u32 = 1;

/// Members and V hold the same session after a round, in both modes.
#[test]
fn round_establishes_matching_sessions_in_both_modes() {
    for mode in [Mode::Psk, Mode::PskEcdhe] {
        let ids: Vec<u64> = (1..=10).collect();
        let mut w = World::with_members(3, &[G], ids.clone());
        let (challenge, round) = w.open_round(G, mode, Purpose::Auth);
        w.answer_all(&ids, &challenge);
        // Every expected member answered: the batch goes out at once.
        let batches = w.flush();
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].trigger, BatchTrigger::AllAnswered);
        assert!(batches[0].missing.is_empty());
        let verdict = w.submit_final(batches[0].bytes.clone());
        assert_eq!(accepted(&batches[0].bytes, &verdict), ids);
        for (id, confirmed) in w.deliver_confirms(&verdict) {
            let confirmed = confirmed.unwrap();
            assert_eq!((confirmed.group, confirmed.round), (GroupId(G), round));
            let (sid, epoch) = w.node(id).member.session(GroupId(G)).unwrap();
            assert_eq!((sid, epoch), (confirmed.sid, 1));
            let slot = w.udc.sessions.get(GroupId(G), MemberId(id)).unwrap();
            let v_session = slot.by_sid(sid).expect("V holds the member's session");
            assert_eq!(v_session.mode, mode);
            assert_eq!(v_session.round, round);
        }
        // The round closes at its deadline with nothing left and nobody
        // missing.
        w.advance(ROUND_WINDOW);
        assert!(w.flush().is_empty());
        let closed = w.gateway.poll_closed_round().unwrap();
        assert!(closed.missing.is_empty());
    }
}

/// A read round authenticates the group and collects every reading.
#[test]
fn group_read_collects_every_reading() {
    let ids: Vec<u64> = (1..=7).collect();
    let mut w = World::with_members(2, &[G], ids.clone());
    let (challenge, _) = w.open_round(
        G,
        Mode::PskEcdhe,
        Purpose::Read(Bytes::from_static(b"A+ kWh")),
    );
    w.answer_all(&[3, 1, 6, 2], &challenge);
    // Members 4, 5 and 7 never answer: the deadline cuts the batch.
    let batches = w.flush_all();
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].trigger, BatchTrigger::Deadline);
    assert_eq!(
        batches[0].missing,
        vec![MemberId(4), MemberId(5), MemberId(7)]
    );
    let outs = w.submit(batches[0].bytes.clone()).unwrap();
    let BatchEvent::Responses(v) = &outs.last().unwrap().event else {
        panic!("expected a response verdict");
    };
    let readings: Vec<(u64, Vec<u8>)> = v
        .readings
        .iter()
        .map(|r| (r.id.0, r.payload.clone()))
        .collect();
    let expected: Vec<(u64, Vec<u8>)> = [1, 2, 3, 6]
        .iter()
        .map(|&id| (id, w.node(id).reading.clone()))
        .collect();
    assert_eq!(readings, expected);
}

/// Uplinks in a session reach V decrypted, in batch order, with every
/// member's counters strictly increasing.
#[test]
fn uplinks_reach_the_verifier() {
    let ids: Vec<u64> = (1..=5).collect();
    let mut w = World::with_members(4, &[G], ids.clone());
    w.full_round(G, Mode::Psk, Purpose::Auth, &ids);
    let mut sent = BTreeSet::new();
    for n in 0..3u8 {
        for &id in ids.iter().rev() {
            let kind = if n == 2 {
                UplinkKind::Alarm
            } else {
                UplinkKind::Reading
            };
            let payload = vec![id as u8, n];
            let up = w.node(id).uplink(GroupId(G), kind, &payload).unwrap();
            assert_eq!(w.collect(&up), Collected::New);
            sent.insert((id, u64::from(n) + 1, kind, payload));
        }
    }
    let batches = w.flush();
    assert!(batches.is_empty(), "uplinks linger first");
    w.advance(w.gateway.config().uplink_linger);
    let batches = w.flush();
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].trigger, BatchTrigger::Linger);
    let outs = w.submit(batches[0].bytes.clone()).unwrap();
    let BatchEvent::Uplinks(v) = &outs.last().unwrap().event else {
        panic!("expected an uplink verdict");
    };
    let got: BTreeSet<(u64, u64, UplinkKind, Vec<u8>)> = v
        .messages
        .iter()
        .map(|m| (m.id.0, m.ctr, m.kind, m.payload.clone()))
        .collect();
    assert_eq!(got, sent);
    // Batch order is (id, sid, ctr).
    let order: Vec<(u64, u64)> = v.messages.iter().map(|m| (m.id.0, m.ctr)).collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted);
}

/// A signed group message reaches every member; their acks come back in one
/// aggregated batch and V learns exactly who applied it.
#[test]
fn group_message_with_aggregated_acks() {
    let ids: Vec<u64> = (1..=9).collect();
    let mut w = World::with_members(4, &[G], ids.clone());
    let (_, round) = w.full_round(G, Mode::Psk, Purpose::Auth, &ids);
    let update = b"tariff: peak 17-20h".to_vec();
    let msg = w
        .udc
        .verifier
        .group_message(
            w.udc.groups.get_mut(&GroupId(G)).unwrap(),
            &update,
            round,
            &mut w.rng,
        )
        .unwrap();
    // Member 9 is offline for this one.
    let mut first_ack = None;
    for &id in &ids[..8] {
        let (applied, ack) = w.node(id).group_message(&msg).unwrap();
        assert_eq!(
            (applied.seq, applied.payload.as_slice(), applied.resent),
            (1, update.as_slice(), false)
        );
        first_ack.get_or_insert(ack.clone());
        w.collect(&ack);
    }
    w.advance(w.gateway.config().uplink_linger);
    let batches = w.flush();
    assert_eq!(batches.len(), 1);
    let verdict = w.submit_final(batches[0].bytes.clone());
    assert!(
        outcomes(&batches[0].bytes, &verdict)
            .values()
            .all(|o| *o == Outcome::Accepted)
    );
    let acked: Vec<u64> = w
        .udc
        .acks
        .acked(GroupId(G), 1)
        .unwrap()
        .iter()
        .map(|m| m.0)
        .collect();
    assert_eq!(acked, (1..=8).collect::<Vec<_>>());
    // The same message again (a re-delivered downlink record, the first
    // ack perhaps lost): nothing to apply, and the ack first sent, byte for
    // byte. The gateway absorbs it as a byte-identical re-send (had the
    // first been lost, this copy would be the one V accepts; a copy that
    // reaches V after the first is refused as a replayed counter, for that
    // entry alone).
    let (again, ack) = w.node(1).group_message(&msg).unwrap();
    assert!(again.resent && again.payload.is_empty());
    assert_eq!(Some(&ack), first_ack.as_ref());
    w.collect(&ack);
    w.advance(w.gateway.config().uplink_linger);
    assert!(w.flush().is_empty(), "a byte-identical re-send is absorbed");
}

/// Revocation: a new epoch reaches the remaining members by rekey; the
/// revoked member cannot read the next update (forward secrecy of the
/// group) and is refused in the next round.
#[test]
fn revocation_rekey_and_forward_secrecy() {
    let ids: Vec<u64> = (1..=4).collect();
    let mut w = World::with_members(2, &[G], ids.clone());
    let (_, round) = w.full_round(G, Mode::Psk, Purpose::Auth, &ids);
    let g = GroupId(G);

    let rekeys = w
        .udc
        .verifier
        .revoke(
            w.udc.groups.get_mut(&g).unwrap(),
            MemberId(4),
            &mut w.udc.sessions,
            &mut w.rng,
        )
        .unwrap();
    w.udc.registry.get_mut(MemberId(4)).unwrap().status = MemberStatus::Revoked;
    let to: BTreeSet<u64> = rekeys.iter().map(|r| r.id.0).collect();
    assert_eq!(to, BTreeSet::from([1, 2, 3]));
    for r in &rekeys {
        // A rekey for another member is refused by member 4, too.
        assert!(w.node(4).rekey(&r.to_bytes()).is_err());
        assert_eq!(w.node(r.id.0).rekey(&r.to_bytes()), Ok(2));
    }

    let update = b"after revocation".to_vec();
    let msg = w
        .udc
        .verifier
        .group_message(
            w.udc.groups.get_mut(&g).unwrap(),
            &update,
            round,
            &mut w.rng,
        )
        .unwrap();
    for id in 1..=3 {
        let (applied, _) = w.node(id).group_message(&msg).unwrap();
        assert_eq!(
            (applied.epoch, applied.payload.as_slice()),
            (2, update.as_slice())
        );
    }
    assert_eq!(
        w.node(4).group_message(&msg).map(|(u, _)| u.seq),
        Err(MemberError::EpochMismatch {
            epoch: 2,
            current: 1
        })
    );

    // Next round: the revoked member's response is set aside, the others
    // get the new epoch's key in their confirm.
    let (challenge, _) = w.open_round(G, Mode::Psk, Purpose::Auth);
    w.answer_all(&ids, &challenge);
    let b = w.flush().pop().unwrap();
    let verdict = w.submit_final(b.bytes.clone());
    let out = outcomes(&b.bytes, &verdict);
    assert_eq!(out[&4], Outcome::Revoked);
    assert_eq!(accepted(&b.bytes, &verdict), vec![1, 2, 3]);
    for (id, c) in w.deliver_confirms(&verdict) {
        assert_eq!(c.unwrap().epoch, 2, "member {id}");
    }
}

/// Join: the newcomer's epoch starts after every update sealed before it
/// joined, so it cannot read them (backward secrecy), but reads the next.
#[test]
fn joined_member_cannot_read_earlier_updates() {
    let mut w = World::with_members(2, &[G], 1..=3);
    let g = GroupId(G);
    let (_, round) = w.full_round(G, Mode::Psk, Purpose::Auth, &[1, 2, 3]);
    let before = w
        .udc
        .verifier
        .group_message(
            w.udc.groups.get_mut(&g).unwrap(),
            b"before the join",
            round,
            &mut w.rng,
        )
        .unwrap();
    for id in 1..=3 {
        w.node(id).group_message(&before).unwrap();
    }

    w.add_member(9, &[G]);
    let rekeys = w
        .udc
        .verifier
        .add_member(
            w.udc.groups.get_mut(&g).unwrap(),
            &mut w.udc.sessions,
            &mut w.rng,
        )
        .unwrap();
    assert_eq!(rekeys.len(), 3);
    for r in &rekeys {
        assert_eq!(w.node(r.id.0).rekey(&r.to_bytes()), Ok(2));
    }
    let (acc, round) = w.full_round(G, Mode::Psk, Purpose::Auth, &[1, 2, 3, 9]);
    assert_eq!(acc, vec![1, 2, 3, 9]);
    assert_eq!(w.node(9).member.session(g).unwrap().1, 2);

    // The update from before the join: sealed under GK_1, which member 9
    // never held.
    assert_eq!(
        w.node(9).group_message(&before).map(|(u, _)| u.seq),
        Err(MemberError::EpochMismatch {
            epoch: 1,
            current: 2
        })
    );
    let after = w
        .udc
        .verifier
        .group_message(
            w.udc.groups.get_mut(&g).unwrap(),
            b"after the join",
            round,
            &mut w.rng,
        )
        .unwrap();
    for id in [1, 2, 3, 9] {
        let (u, _) = w.node(id).group_message(&after).unwrap();
        assert_eq!(u.payload.as_slice(), b"after the join");
    }
}

/// A member that reboots mid-round re-sends its stored response byte for
/// byte (the gateway absorbs it), opens the confirm with its restored
/// state, and continues its uplink counters above the persisted mark.
#[test]
fn member_reboot_mid_round_from_persisted_state() {
    for mode in [Mode::Psk, Mode::PskEcdhe] {
        let mut w = World::with_members(2, &[G], 1..=3);
        let g = GroupId(G);
        let (challenge, _) = w.open_round(G, mode, Purpose::Auth);
        let first = w.answer(2, &challenge).unwrap();
        w.collect(&first);
        w.node(2).reboot();
        let again = w.answer(2, &challenge).unwrap();
        assert_eq!(again, first, "the stored response, byte for byte");
        assert_eq!(w.collect(&again), Collected::Duplicate);
        w.answer_all(&[1, 3], &challenge);
        let b = w.flush().pop().unwrap();
        let verdict = w.submit_final(b.bytes.clone());
        assert_eq!(accepted(&b.bytes, &verdict), vec![1, 2, 3]);
        // Reboot again between the verdict and the confirm.
        w.node(2).reboot();
        let confirms = w.deliver_confirms(&verdict);
        assert!(confirms.values().all(Result::is_ok));

        // Uplinks: one before a reboot, one after; the counter never
        // repeats and V accepts both.
        let u1 = w.node(2).uplink(g, UplinkKind::Reading, b"one").unwrap();
        w.node(2).reboot();
        let u2 = w.node(2).uplink(g, UplinkKind::Reading, b"two").unwrap();
        w.collect(&u1);
        w.collect(&u2);
        w.advance(w.gateway.config().uplink_linger);
        let b = w.flush().pop().unwrap();
        let verdict = w.submit_final(b.bytes.clone());
        let out = outcomes(&b.bytes, &verdict);
        assert_eq!(out.len(), 2);
        assert!(out.values().all(|o| *o == Outcome::Accepted), "{out:?}");
        // Each restore jumped the counter by 2^32 or more (deviation 14),
        // past what `outcomes` packs into its keys: read them from the batch.
        let BatchBody::Uplinks { entries } = Batch::decode(&b.bytes).unwrap().body else {
            panic!("an uplink batch");
        };
        let ctrs: Vec<u64> = entries.iter().map(|e| e.ctr).collect();
        assert!(ctrs[0] > 1 << 32 && ctrs[1] > ctrs[0], "{ctrs:?}");
    }
}

/// A root-key rotation in a psk-ecdhe session: the member answers the next
/// round under the new key version and V accepts it.
#[test]
fn key_update_then_round_under_the_new_version() {
    let mut w = World::with_members(2, &[G], 1..=2);
    let g = GroupId(G);
    w.full_round(G, Mode::PskEcdhe, Purpose::Auth, &[1, 2]);
    let record = w.udc.registry.get_mut(MemberId(1)).unwrap().clone();
    let slot = w.udc.sessions.get_mut(g, MemberId(1)).unwrap();
    let issued = w
        .udc
        .verifier
        .key_update(slot, &record, &mut w.rng)
        .unwrap();
    *w.udc.registry.get_mut(MemberId(1)).unwrap() = issued.record.clone();
    assert_eq!(issued.updates.len(), 1);
    assert_eq!(w.node(1).key_update(&issued.updates[0].to_bytes()), Ok(2));
    assert_eq!(w.node(1).member.kv(), 2);
    let (acc, _) = w.full_round(G, Mode::Psk, Purpose::Auth, &[1, 2]);
    assert_eq!(acc, vec![1, 2]);
    // V now holds the member to version 2.
    assert!(!w.udc.registry.get_mut(MemberId(1)).unwrap().accepts_kv(1));
    // Restarting from the stored state keeps the new key.
    w.node(1).reboot();
    assert_eq!(w.node(1).member.kv(), 2);
}
