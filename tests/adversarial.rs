//! The design's adversarial suite ("Adversarial suite" in the design), each
//! attack its own test, each asserting exactly which members V accepts and
//! what members accept. The gateway is the honest aggregator until a test
//! takes its output and tampers with it; V and the members are the real
//! state machines.

mod common;

use std::collections::BTreeSet;

use bytes::Bytes;
use common::*;
use dapgw::protocol::aggregator::{CollectError, Collected, KeptTags, answer_tag_request};
use dapgw::protocol::member::MemberError;
use dapgw::protocol::verifier::{
    BatchError, BatchEvent, BatchState, InMemoryVerdictLog, ReceivedBatch, VerifierError,
};
use dapgw::protocol::wire::{
    Batch, BatchBody, BatchStructureError, ChunkTags, Confirm, GroupId, GroupMessage, MemberId,
    Mode, Outcome, Purpose, Rekey, ResponseEntry, Verdict, VerdictBody,
};

const G: u32 = 1;
/// Member ids far apart, so a flipped id bit makes an unknown member rather
/// than an unsorted batch.
const IDS: [u64; 4] = [0x10, 0x20, 0x30, 0x40];

/// A world with `IDS` in group G and one read round answered by all of them;
/// returns the honest batch (not yet sent) and its tags.
fn answered_round(mode: Mode, chunk_size: u16) -> (World, Batch, Vec<[u8; 16]>) {
    let mut w = World::with_members(chunk_size, &[G], IDS);
    let (challenge, _) = w.open_round(G, mode, Purpose::Read(Bytes::from_static(b"kWh")));
    w.answer_all(&IDS, &challenge);
    let ready = w.flush().pop().unwrap();
    let batch = Batch::decode(&ready.bytes).unwrap();
    (w, batch, ready.tags.tags)
}

fn entries(batch: &Batch) -> &Vec<ResponseEntry> {
    match &batch.body {
        BatchBody::Responses { entries, .. } => entries,
        BatchBody::Uplinks { .. } => panic!("not a response batch"),
    }
}

fn entries_mut(batch: &mut Batch) -> &mut Vec<ResponseEntry> {
    match &mut batch.body {
        BatchBody::Responses { entries, .. } => entries,
        BatchBody::Uplinks { .. } => panic!("not a response batch"),
    }
}

/// Encoded length of a response entry (docs/protocol.md, Batch).
/// Bytes of a response batch before its first entry (docs/protocol.md,
/// "Batch"): header, gateway id, batch id, kind, group, round, mode, chunk
/// size, count.
fn header_len(b: &Batch) -> usize {
    2 + 1 + b.gateway_id.as_str().len() + 8 + 1 + 4 + 8 + 1 + 2 + 4
}

/// Sends a (tampered) batch whose tags the gateway keeps as `kept`; V's tag
/// requests are answered from `kept`. The final verdict.
fn send(w: &mut World, bytes: Bytes, kept: KeptTags) -> Result<Verdict, VerifierError> {
    w.kept.insert(kept.batch_id, kept);
    let outs = w.submit(bytes)?;
    Ok(final_verdict(outs.last().unwrap()))
}

/// A tampered copy of `batch` under a fresh batch id, resealed over `tags`.
fn tampered(w: &mut World, batch: &Batch, tags: &[[u8; 16]]) -> (Bytes, KeptTags) {
    let mut b = batch.clone();
    b.batch_id = w.next_batch_id;
    w.next_batch_id += 1;
    reseal(&b, tags)
}

/// Judges `bytes` against a copy of V's current state (so every call starts
/// from the same state), the gateway answering tag requests from `tags`.
/// `Err` when V refuses the batch as a whole.
fn judge_fresh(w: &World, bytes: &Bytes, tags: &[[u8; 16]]) -> Result<Verdict, String> {
    let mut rounds = w.udc.rounds.clone();
    let mut sessions = w.udc.sessions.clone();
    let mut log = InMemoryVerdictLog::new();
    let rb = ReceivedBatch::decode(bytes.clone()).map_err(|e| e.to_string())?;
    let group = rb.batch().group;
    let gs = w.udc.groups.get(&group).ok_or("unknown group")?;
    let key = rb.round().map(|r| (group, r));
    let v = &w.udc.verifier;
    let out = v
        .handle_batch(
            &rb,
            BatchState {
                group: gs,
                round: key.and_then(|k| rounds.get_mut(&k)),
                sessions: &mut sessions,
            },
            &w.udc.registry,
            &mut log,
            NOW,
        )
        .map_err(|e| e.to_string())?;
    let Some(request) = tag_request(&out) else {
        return Ok(final_verdict(&out));
    };
    let kept = KeptTags::from_sealed(bytes, tags.to_vec()).unwrap();
    let reply = answer_tag_request(&kept, &request).unwrap();
    let out = v
        .handle_tag_reply(
            &reply,
            BatchState {
                group: gs,
                round: key.and_then(|k| rounds.get_mut(&k)),
                sessions: &mut sessions,
            },
            &w.udc.registry,
            &mut log,
            NOW,
        )
        .map_err(|e| e.to_string())?;
    Ok(final_verdict(&out))
}

/// Members whose honest entry appears unchanged in `bytes`.
fn intact(honest: &Batch, bytes: &Bytes) -> BTreeSet<u64> {
    let Ok(b) = Batch::decode(bytes) else {
        return BTreeSet::new();
    };
    let same_round = match (&b.body, &honest.body) {
        (
            BatchBody::Responses { round, mode, .. },
            BatchBody::Responses {
                round: r0,
                mode: m0,
                ..
            },
        ) => round == r0 && mode == m0,
        _ => false,
    };
    if b.group != honest.group || !same_round {
        return BTreeSet::new();
    }
    entries(honest)
        .iter()
        .filter(|e| entries(&b).contains(e))
        .map(|e| e.id.0)
        .collect()
}

/// The confirms of a final verdict go exactly to its accepted entries.
fn assert_confirms_match(bytes: &Bytes, verdict: &Verdict) {
    let VerdictBody::Final { confirms, .. } = &verdict.body else {
        unreachable!()
    };
    let to: Vec<u64> = confirms.iter().map(|c| c.id.0).collect();
    assert_eq!(to, accepted(bytes, verdict));
}

// ---------------------------------------------------------------------------
// Batches: the gateway tampers with what it sends to V
// ---------------------------------------------------------------------------

/// Every byte of every entry and every aggregate, flipped in turn (three
/// different flips each): V accepts exactly the entries left intact, or
/// refuses the batch as a whole (a structural fault); never the altered
/// entry, never fewer of the intact ones.
#[test]
fn gateway_alters_any_byte_of_any_entry_or_aggregate() {
    for mode in [Mode::Psk, Mode::PskEcdhe] {
        let (w, honest, tags) = answered_round(mode, 2);
        let bytes = honest.to_bytes();
        let all: BTreeSet<u64> = IDS.into_iter().collect();
        assert_eq!(
            judge_fresh(&w, &bytes, &tags).map(|v| accepted(&bytes, &v)),
            Ok(IDS.to_vec())
        );
        // Everything after the header: entries, then aggregates.
        let start = header_len(&honest);
        let (mut refused, mut judged) = (0, 0);
        for i in start..bytes.len() {
            for flip in [0x01u8, 0x80, 0xFF] {
                let mut t = bytes.to_vec();
                t[i] ^= flip;
                let t = Bytes::from(t);
                let expect = intact(&honest, &t);
                match judge_fresh(&w, &t, &tags) {
                    Ok(verdict) => {
                        judged += 1;
                        let got: BTreeSet<u64> = accepted(&t, &verdict).into_iter().collect();
                        assert_eq!(got, expect, "{mode:?}: byte {i} ^ {flip:#04x}");
                        assert_confirms_match(&t, &verdict);
                        if i >= bytes.len() - 16 * honest.aggregates.len() {
                            // An altered aggregate costs a tag request, nothing else.
                            assert_eq!(got, all, "aggregate byte {i}");
                        }
                    }
                    Err(_) => refused += 1,
                }
            }
        }
        // Most flips land in ciphertexts, nonces and aggregates: judged.
        assert!(
            judged > refused,
            "{mode:?}: judged {judged}, refused {refused}"
        );
    }
}

/// Flipping header bytes (gateway id, batch id, kind, group, round, mode,
/// chunk size, count) never makes V accept anything it should not.
#[test]
fn gateway_alters_header_bytes_never_gains_acceptance() {
    let (w, honest, tags) = answered_round(Mode::Psk, 2);
    let bytes = honest.to_bytes();
    for i in 0..header_len(&honest) {
        for flip in [0x01u8, 0x80, 0xFF] {
            let mut t = bytes.to_vec();
            t[i] ^= flip;
            let t = Bytes::from(t);
            if let Ok(verdict) = judge_fresh(&w, &t, &tags) {
                let got: BTreeSet<u64> = accepted(&t, &verdict).into_iter().collect();
                assert!(
                    got.is_subset(&intact(&honest, &t)),
                    "byte {i} ^ {flip:#04x}: {got:?}"
                );
            }
        }
    }
}

/// Dropping an entry: everyone else is accepted; the dropped member gets no
/// confirm and no session, and answers normally next round.
#[test]
fn gateway_drops_an_entry() {
    let (mut w, honest, tags) = answered_round(Mode::Psk, 2);
    let mut b = honest.clone();
    entries_mut(&mut b).remove(1);
    let mut t = tags.clone();
    t.remove(1);
    let (bytes, kept) = tampered(&mut w, &b, &t);
    let verdict = send(&mut w, bytes.clone(), kept).unwrap();
    assert_eq!(accepted(&bytes, &verdict), vec![0x10, 0x30, 0x40]);
    let confirmed: Vec<u64> = w.deliver_confirms(&verdict).into_keys().collect();
    assert_eq!(confirmed, vec![0x10, 0x30, 0x40]);
    assert_eq!(w.node(0x20).member.session(GroupId(G)), None);
    w.close_round(G, 1);
    let (acc, _) = w.full_round(G, Mode::Psk, Purpose::Auth, &IDS);
    assert_eq!(acc, IDS.to_vec());
}

/// A duplicated entry in a batch is a structural fault: the whole batch is
/// refused before any cryptography and nothing changes; sent again in a
/// later batch, an accepted entry is "already accepted" and gets no second
/// confirm or session.
#[test]
fn gateway_duplicates_entries() {
    let (mut w, honest, tags) = answered_round(Mode::Psk, 2);
    let mut b = honest.clone();
    let dup = entries(&b)[1].clone();
    entries_mut(&mut b).insert(1, dup);
    let mut t = tags.clone();
    t.insert(1, tags[1]);
    let (bytes, kept) = tampered(&mut w, &b, &t);
    assert_eq!(
        send(&mut w, bytes, kept).unwrap_err(),
        VerifierError::Peer(BatchError::Structure(BatchStructureError::NotSorted(2)))
    );
    assert!(w.udc.rounds[&(GroupId(G), 1)].accepted.is_empty());

    let (bytes, kept) = tampered(&mut w, &honest, &tags);
    let first = send(&mut w, bytes.clone(), kept).unwrap();
    assert_eq!(accepted(&bytes, &first), IDS.to_vec());
    let sid_before = w
        .udc
        .sessions
        .get(GroupId(G), MemberId(0x20))
        .unwrap()
        .clone();
    let mut again = honest.clone();
    entries_mut(&mut again).retain(|e| e.id.0 == 0x20);
    let (bytes, kept) = tampered(&mut w, &again, &tags[1..2]);
    let second = send(&mut w, bytes.clone(), kept).unwrap();
    assert_eq!(outcomes(&bytes, &second)[&0x20], Outcome::AlreadyAccepted);
    let VerdictBody::Final { confirms, .. } = &second.body else {
        unreachable!()
    };
    assert!(confirms.is_empty());
    let sid_after = w.udc.sessions.get(GroupId(G), MemberId(0x20)).unwrap();
    assert_eq!(format!("{sid_after:?}"), format!("{sid_before:?}"));
}

/// Reordered entries: a structural fault, the batch refused as a whole.
#[test]
fn gateway_reorders_entries() {
    let (mut w, honest, tags) = answered_round(Mode::Psk, 2);
    let mut b = honest.clone();
    entries_mut(&mut b).swap(0, 3);
    let mut t = tags.clone();
    t.swap(0, 3);
    let (bytes, kept) = tampered(&mut w, &b, &t);
    assert!(matches!(
        send(&mut w, bytes, kept),
        Err(VerifierError::Peer(BatchError::Structure(
            BatchStructureError::NotSorted(_)
        )))
    ));
    assert!(w.udc.rounds[&(GroupId(G), 1)].accepted.is_empty());
}

/// Swapping two members' tags (in the aggregates and in the tag reply): the
/// two are unverified via the gateway, the others accepted.
#[test]
fn gateway_swaps_tags_between_entries() {
    let (mut w, honest, tags) = answered_round(Mode::Psk, 2);
    let mut t = tags.clone();
    t.swap(1, 2); // across the chunk boundary (c = 2)
    let (bytes, kept) = tampered(&mut w, &honest, &t);
    let verdict = send(&mut w, bytes.clone(), kept).unwrap();
    let out = outcomes(&bytes, &verdict);
    assert_eq!(accepted(&bytes, &verdict), vec![0x10, 0x40]);
    assert_eq!(out[&0x20], Outcome::UnverifiedViaGateway);
    assert_eq!(out[&0x30], Outcome::UnverifiedViaGateway);
}

/// Member A's response moved under member B's id (B's own dropped, or
/// swapped with A's): B is never accepted on A's answer.
#[test]
fn gateway_moves_a_response_under_another_id() {
    let (mut w, honest, tags) = answered_round(Mode::PskEcdhe, 2);
    // 0x20's content under 0x30's id, with 0x20's tag; 0x30's own is gone.
    let mut b = honest.clone();
    let moved = ResponseEntry {
        id: MemberId(0x30),
        ..entries(&b)[1].clone()
    };
    entries_mut(&mut b)[2] = moved;
    let mut t = tags.clone();
    t[2] = tags[1];
    let (bytes, kept) = tampered(&mut w, &b, &t);
    let verdict = send(&mut w, bytes.clone(), kept).unwrap();
    assert_eq!(
        outcomes(&bytes, &verdict)[&0x30],
        Outcome::UnverifiedViaGateway
    );
    assert_eq!(accepted(&bytes, &verdict), vec![0x10, 0x20, 0x40]);

    // Swapping the ids of two entries (keeping the order): neither accepted.
    let (mut w, honest, tags) = answered_round(Mode::PskEcdhe, 2);
    let mut b = honest.clone();
    let e = entries_mut(&mut b);
    let (c0, c1) = (e[0].clone(), e[1].clone());
    e[0] = ResponseEntry {
        id: MemberId(0x10),
        ..c1
    };
    e[1] = ResponseEntry {
        id: MemberId(0x20),
        ..c0
    };
    let (bytes, kept) = tampered(&mut w, &b, &[tags[1], tags[0], tags[2], tags[3]]);
    let verdict = send(&mut w, bytes.clone(), kept).unwrap();
    let out = outcomes(&bytes, &verdict);
    assert_eq!(out[&0x10], Outcome::UnverifiedViaGateway);
    assert_eq!(out[&0x20], Outcome::UnverifiedViaGateway);
    assert_eq!(accepted(&bytes, &verdict), vec![0x30, 0x40]);
}

/// Entries for members that never answered (a registered member, an
/// unknown id): never accepted; the honest entries are.
#[test]
fn gateway_injects_members_that_never_answered() {
    let mut w = World::with_members(2, &[G], IDS);
    w.add_member(0x50, &[G]);
    let (challenge, _) = w.open_round(G, Mode::Psk, Purpose::Auth);
    w.answer_all(&IDS, &challenge);
    let ready = w.flush_all().pop().unwrap();
    assert_eq!(ready.missing, vec![MemberId(0x50)]);
    let honest = Batch::decode(&ready.bytes).unwrap();
    let mut b = honest.clone();
    let mut t = ready.tags.tags.clone();
    let forged = |id| ResponseEntry {
        id: MemberId(id),
        kv: 1,
        n_i: [7; 16],
        e_i: None,
        c: Bytes::new(),
    };
    entries_mut(&mut b).extend([forged(0x50), forged(0x99)]);
    t.extend([[0x55; 16], [0x99; 16]]);
    let (bytes, kept) = tampered(&mut w, &b, &t);
    let verdict = send(&mut w, bytes.clone(), kept).unwrap();
    let out = outcomes(&bytes, &verdict);
    assert_eq!(out[&0x50], Outcome::UnverifiedViaGateway);
    assert_eq!(out[&0x99], Outcome::UnknownMember);
    assert_eq!(accepted(&bytes, &verdict), IDS.to_vec());
    assert_eq!(w.node(0x50).member.session(GroupId(G)), None);
}

/// Chunk boundaries chosen by the gateway (every c from 1 to beyond the
/// batch) around a forged entry: V always accepts exactly the honest
/// entries.
#[test]
fn gateway_chooses_chunk_boundaries_adversarially() {
    let (w, honest, tags) = answered_round(Mode::Psk, 2);
    let mut forged = honest.clone();
    let mut c = entries(&forged)[2].c.to_vec();
    c[0] ^= 1;
    entries_mut(&mut forged)[2].c = Bytes::from(c);
    for c in [1u16, 2, 3, 4, 5, 1024] {
        let mut b = forged.clone();
        b.chunk_size = c;
        let (bytes, _) = reseal(&b, &tags);
        let verdict = judge_fresh(&w, &bytes, &tags).unwrap();
        assert_eq!(
            accepted(&bytes, &verdict),
            vec![0x10, 0x20, 0x40],
            "c = {c}"
        );
        assert_eq!(
            outcomes(&bytes, &verdict)[&0x30],
            Outcome::UnverifiedViaGateway
        );
    }
}

/// A response from an earlier round, replayed into a later round's batch,
/// is never accepted; the earlier round's batch sent again after the round
/// closed accepts nobody.
#[test]
fn gateway_replays_a_response_from_an_earlier_round() {
    let (mut w, round1, tags1) = answered_round(Mode::Psk, 2);
    let (bytes, kept) = tampered(&mut w, &round1, &tags1);
    send(&mut w, bytes, kept).unwrap();
    w.close_round(G, 1);
    w.flush_all();

    let (challenge, r2) = w.open_round(G, Mode::Psk, Purpose::Auth);
    w.answer_all(&[0x20, 0x30, 0x40], &challenge);
    let ready = w.flush_all().pop().unwrap();
    let mut b = Batch::decode(&ready.bytes).unwrap();
    // 0x10's round-1 entry (its reading and tag) under round 2.
    entries_mut(&mut b).insert(0, entries(&round1)[0].clone());
    let mut t = ready.tags.tags.clone();
    t.insert(0, tags1[0]);
    let (bytes, kept) = tampered(&mut w, &b, &t);
    let verdict = send(&mut w, bytes.clone(), kept).unwrap();
    assert_eq!(
        outcomes(&bytes, &verdict)[&0x10],
        Outcome::UnverifiedViaGateway
    );
    assert_eq!(accepted(&bytes, &verdict), vec![0x20, 0x30, 0x40]);
    assert!(
        !w.udc.rounds[&(GroupId(G), r2)]
            .accepted
            .contains(&MemberId(0x10))
    );

    // The whole round-1 batch under a new id: round 1 is closed.
    let (bytes, kept) = tampered(&mut w, &round1, &tags1);
    let verdict = send(&mut w, bytes.clone(), kept).unwrap();
    assert!(
        outcomes(&bytes, &verdict)
            .values()
            .all(|o| *o == Outcome::RoundNotOpen)
    );
}

/// A member's response in one group, replayed into another group's batch
/// (same round number, member in both groups): never accepted there.
#[test]
fn gateway_replays_a_response_from_another_group() {
    let mut w = World::with_members(2, &[1, 2], IDS);
    let (ch1, r1) = w.open_round(1, Mode::Psk, Purpose::Auth);
    let (ch2, r2) = w.open_round(2, Mode::Psk, Purpose::Auth);
    assert_eq!(r1, r2);
    w.answer_all(&IDS, &ch1);
    w.answer_all(&[0x20, 0x30, 0x40], &ch2);
    let batches = w.flush();
    let g1 = batches.iter().find(|b| b.group == GroupId(1)).unwrap();
    let g2 = w
        .flush_all()
        .into_iter()
        .find(|b| b.group == GroupId(2))
        .unwrap();
    let one = Batch::decode(&g1.bytes).unwrap();
    let mut b = Batch::decode(&g2.bytes).unwrap();
    entries_mut(&mut b).insert(0, entries(&one)[0].clone());
    let mut t = g2.tags.tags.clone();
    t.insert(0, g1.tags.tags[0]);
    let (bytes, kept) = tampered(&mut w, &b, &t);
    let verdict = send(&mut w, bytes.clone(), kept).unwrap();
    assert_eq!(
        outcomes(&bytes, &verdict)[&0x10],
        Outcome::UnverifiedViaGateway
    );
    assert_eq!(accepted(&bytes, &verdict), vec![0x20, 0x30, 0x40]);
}

/// Tag requests: the gateway omits a chunk, omits a tag, forges tags, or
/// answers with another chunk's tags; or never answers. Only entries whose
/// own tag comes back and verifies are accepted; the rest are unverified via
/// the gateway (not held against the member: it is accepted next round).
#[test]
fn gateway_omits_or_forges_tags_on_a_tag_request() {
    type Lie = fn(&mut Vec<ChunkTags>);
    let lies: [(&str, Lie, &[u64]); 5] = [
        ("omit the chunk", |c| c.clear(), &[0x10, 0x20]),
        (
            "omit the honest tag",
            |c| {
                c[0].tags.remove(0);
            },
            &[0x10, 0x20],
        ),
        (
            "forge the honest tag",
            |c| c[0].tags[0] = [0xAB; 16],
            &[0x10, 0x20],
        ),
        (
            "forge the bad entry's tag only",
            |c| c[0].tags[1] = [0xAB; 16],
            &[0x10, 0x20, 0x30],
        ),
        ("another chunk's tags", |c| c[0].chunk = 0, &[0x10, 0x20]),
    ];
    for (what, lie, want) in lies {
        let (mut w, honest, tags) = answered_round(Mode::Psk, 2);
        // The gateway alters 0x40's reading, so chunk 1 (0x30, 0x40) fails.
        let mut b = honest.clone();
        let mut c = entries(&b)[3].c.to_vec();
        c[0] ^= 1;
        entries_mut(&mut b)[3].c = Bytes::from(c);
        let (bytes, kept) = tampered(&mut w, &b, &tags);
        let out = w.udc.handle_batch(bytes.clone()).unwrap();
        let request = tag_request(&out).expect("a failing chunk is localized");
        assert_eq!(request.body, VerdictBody::TagsRequested { chunks: vec![1] });
        let mut reply = answer_tag_request(&kept, &request).unwrap();
        lie(&mut reply.chunks);
        let verdict = final_verdict(&w.udc.handle_tag_reply(&reply).unwrap());
        assert_eq!(accepted(&bytes, &verdict), want.to_vec(), "{what}");
        assert_eq!(
            outcomes(&bytes, &verdict)[&0x40],
            Outcome::UnverifiedViaGateway,
            "{what}"
        );
        // Not held against the honest member: next round it is accepted.
        w.close_round(G, 1);
        w.flush_all();
        let (acc, _) = w.full_round(G, Mode::Psk, Purpose::Auth, &IDS);
        assert_eq!(acc, IDS.to_vec(), "{what}");
    }

    // No answer at all until V's deadline.
    let (mut w, honest, tags) = answered_round(Mode::Psk, 2);
    let mut b = honest.clone();
    entries_mut(&mut b)[3].n_i[0] ^= 1;
    let (bytes, _) = tampered(&mut w, &b, &tags);
    let out = w.udc.handle_batch(bytes.clone()).unwrap();
    assert!(tag_request(&out).is_some());
    let b = Batch::decode(&bytes).unwrap();
    let verdict = final_verdict(&w.udc.localization_expired(b.batch_id).unwrap());
    assert_eq!(accepted(&bytes, &verdict), vec![0x10, 0x20]);
    let out = outcomes(&bytes, &verdict);
    assert_eq!(
        (out[&0x30], out[&0x40]),
        (Outcome::UnverifiedViaGateway, Outcome::UnverifiedViaGateway)
    );
}

/// A retried batch gets the same verdict byte for byte and has no second
/// effect (no new sessions, the same confirms).
#[test]
fn gateway_retries_a_batch() {
    let (mut w, honest, tags) = answered_round(Mode::PskEcdhe, 2);
    let (bytes, kept) = tampered(&mut w, &honest, &tags);
    w.kept.insert(kept.batch_id, kept);
    let first = w.udc.handle_batch(bytes.clone()).unwrap();
    let sessions_before = format!("{:?}", w.udc.sessions);
    for _ in 0..3 {
        let again = w.udc.handle_batch(bytes.clone()).unwrap();
        assert_eq!(again.answer, first.answer);
        assert!(matches!(again.event, BatchEvent::Replayed));
    }
    assert_eq!(format!("{:?}", w.udc.sessions), sessions_before);
    let verdict = final_verdict(&first);
    let confirmed = w.deliver_confirms(&verdict);
    assert!(confirmed.values().all(Result::is_ok));
    assert_eq!(confirmed.len(), 4);
}

/// The same batch id for other content is refused as a whole, and the first
/// verdict stands.
#[test]
fn gateway_reuses_a_batch_id_for_other_content() {
    let (mut w, honest, tags) = answered_round(Mode::Psk, 2);
    let (bytes, kept) = tampered(&mut w, &honest, &tags);
    let id = kept.batch_id;
    let first = send(&mut w, bytes.clone(), kept).unwrap();
    let mut other = honest.clone();
    other.batch_id = id;
    entries_mut(&mut other).truncate(2);
    let (other_bytes, _) = reseal(&other, &tags[..2]);
    assert_eq!(
        w.udc.handle_batch(other_bytes).unwrap_err(),
        VerifierError::Peer(BatchError::BatchIdReused {
            gateway: gateway_id(),
            batch_id: id
        })
    );
    let again = final_verdict(&w.udc.handle_batch(bytes).unwrap());
    assert_eq!(again, first);
}

/// The gateway drops every psk-ecdhe challenge, so members only ever answer
/// psk rounds: V's warning names every member once it missed enough
/// psk-ecdhe rounds.
#[test]
fn gateway_drops_every_psk_ecdhe_challenge() {
    let mut w = World::with_members(2, &[G], IDS);
    let (acc, _) = w.full_round(G, Mode::PskEcdhe, Purpose::Auth, &IDS);
    assert_eq!(acc, IDS.to_vec());
    let warn = w.udc.verifier.config().ecdhe_miss_warning;
    let mut warned = Vec::new();
    for n in 1..=warn {
        // A psk-ecdhe round the gateway never relays.
        let (_, r) = w.open_round(G, Mode::PskEcdhe, Purpose::Auth);
        w.close_round(G, r);
        w.flush_all();
        // A psk round it relays.
        let (challenge, _) = w.open_round(G, Mode::Psk, Purpose::Auth);
        w.answer_all(&IDS, &challenge);
        let b = w.flush().pop().unwrap();
        let outs = w.submit(b.bytes.clone()).unwrap();
        let BatchEvent::Responses(v) = &outs.last().unwrap().event else {
            panic!("expected a response verdict");
        };
        assert_eq!(
            accepted(&b.bytes, &final_verdict(outs.last().unwrap())),
            IDS.to_vec()
        );
        warned.push((n, v.ecdhe_missed.clone()));
    }
    for (n, missed) in &warned[..warned.len() - 1] {
        assert!(
            missed.is_empty(),
            "warned after {n} missed rounds: {missed:?}"
        );
    }
    let last = &warned.last().unwrap().1;
    let expect: Vec<(MemberId, u64)> = IDS.iter().map(|&id| (MemberId(id), warn)).collect();
    assert_eq!(last, &expect);
}

// ---------------------------------------------------------------------------
// Uplinks: the gateway tampers with session traffic
// ---------------------------------------------------------------------------

fn uplink_entries_mut(batch: &mut Batch) -> &mut Vec<dapgw::protocol::wire::UplinkEntry> {
    match &mut batch.body {
        BatchBody::Uplinks { entries } => entries,
        BatchBody::Responses { .. } => panic!("not an uplink batch"),
    }
}

/// Altered, replayed and re-attributed uplinks: V accepts exactly the
/// untouched entries, each once, and never credits one member's uplink to
/// another.
#[test]
fn gateway_alters_replays_or_moves_uplinks() {
    let mut w = World::with_members(2, &[G], IDS);
    w.full_round(G, Mode::Psk, Purpose::Auth, &IDS);
    for &id in &IDS {
        let up = w
            .node(id)
            .uplink(
                GroupId(G),
                dapgw::protocol::wire::UplinkKind::Reading,
                &[id as u8],
            )
            .unwrap();
        w.collect(&up);
    }
    w.advance(w.gateway.config().uplink_linger);
    let ready = w.flush().pop().unwrap();
    let honest = Batch::decode(&ready.bytes).unwrap();
    let tags = ready.tags.tags.clone();
    let key = |id: u64| id << 32 | 1;

    // 0x20's ciphertext altered.
    let mut b = honest.clone();
    let mut c = uplink_entries_mut(&mut b)[1].c.to_vec();
    c[0] ^= 1;
    uplink_entries_mut(&mut b)[1].c = Bytes::from(c);
    let (bytes, _) = reseal(&b, &tags);
    let verdict = judge_fresh(&w, &bytes, &tags).unwrap();
    assert_eq!(
        accepted(&bytes, &verdict),
        vec![key(0x10), key(0x30), key(0x40)]
    );
    assert_eq!(
        outcomes(&bytes, &verdict)[&key(0x20)],
        Outcome::UnverifiedViaGateway
    );

    // 0x10's uplink (content and tag) under 0x20's id and session.
    let mut b = honest.clone();
    let e = uplink_entries_mut(&mut b);
    e[1] = dapgw::protocol::wire::UplinkEntry {
        id: MemberId(0x20),
        sid: e[1].sid,
        ..e[0].clone()
    };
    e.remove(0);
    let (bytes, _) = reseal(&b, &[tags[0], tags[2], tags[3]]);
    let verdict = judge_fresh(&w, &bytes, &[tags[0], tags[2], tags[3]]).unwrap();
    assert_eq!(accepted(&bytes, &verdict), vec![key(0x30), key(0x40)]);
    assert_eq!(
        outcomes(&bytes, &verdict)[&key(0x20)],
        Outcome::UnverifiedViaGateway
    );
    // ... or under 0x20's id with 0x10's session: no such session for 0x20.
    let mut b = honest.clone();
    let e = uplink_entries_mut(&mut b);
    e[1] = dapgw::protocol::wire::UplinkEntry {
        id: MemberId(0x20),
        ..e[0].clone()
    };
    e.remove(0);
    let (bytes, _) = reseal(&b, &[tags[0], tags[2], tags[3]]);
    let verdict = judge_fresh(&w, &bytes, &[tags[0], tags[2], tags[3]]).unwrap();
    assert_eq!(accepted(&bytes, &verdict), vec![key(0x30), key(0x40)]);
    assert_ne!(outcomes(&bytes, &verdict)[&key(0x20)], Outcome::Accepted);

    // Honest once, then the same entries replayed under a new batch id.
    let verdict = w.submit_final(ready.bytes.clone());
    assert_eq!(accepted(&ready.bytes, &verdict).len(), 4);
    let (bytes, kept) = tampered(&mut w, &honest, &tags);
    let verdict = send(&mut w, bytes.clone(), kept).unwrap();
    assert!(
        outcomes(&bytes, &verdict)
            .values()
            .all(|o| *o == Outcome::ReplayedCounter)
    );
}

// ---------------------------------------------------------------------------
// Members: the gateway serves them what V did not send, or not when V sent it
// ---------------------------------------------------------------------------

/// Stale, forged and cross-group challenges are refused before the member
/// persists or seals anything; the genuine next challenge is answered.
#[test]
fn gateway_serves_stale_forged_or_cross_group_challenges() {
    let mut w = World::new(2);
    w.add_group(1);
    w.add_group(2);
    w.add_member(0x10, &[1, 2]);
    w.add_member(0x20, &[1]);
    let (ch1, _) = w.full_round_challenge(1);
    let (_, r2) = w.full_round_challenge(1);
    let g = GroupId(1);

    // Stale: the previous round's challenge.
    assert_eq!(
        w.answer(0x20, &ch1),
        Err(MemberError::StaleRound {
            group: g,
            round: 1,
            answered: r2
        })
    );
    // Replayed current challenge: the stored response again, nothing new.
    let disk = w.node(0x20).disk.clone();
    let (ch3, _) = w.open_round(1, Mode::Psk, Purpose::Auth);
    let first = w.answer(0x20, &ch3).unwrap();
    assert_eq!(w.answer(0x20, &ch3).unwrap(), first);
    assert_ne!(w.node(0x20).disk, disk);
    let disk = w.node(0x20).disk.clone();

    let (ch4, _) = w.open_round(1, Mode::PskEcdhe, Purpose::Auth);
    // Forged: any signed byte changed (nonce, mode, group seq), the
    // signature changed, or signed by a key that is not V's online key.
    for i in [12usize, 30, ch4.len() - 1] {
        let mut t = ch4.to_vec();
        t[i] ^= 1;
        assert!(
            matches!(
                w.answer(0x20, &t),
                Err(MemberError::BadSignature | MemberError::Malformed(_))
            ),
            "byte {i}"
        );
    }
    let mut c = challenge(&ch4);
    c.signature = dapgw::protocol::suite::SigningKey::from_seed(&[9; 32]).sign(&c.signed_bytes());
    assert_eq!(
        w.answer(0x20, &c.to_bytes()),
        Err(MemberError::BadSignature)
    );
    // Another group's challenge: not ours, or (relabelled) not signed.
    let (other, _) = w.open_round(2, Mode::Psk, Purpose::Auth);
    assert_eq!(
        w.answer(0x20, &other),
        Err(MemberError::NotOurGroup(GroupId(2)))
    );
    w.open_round(2, Mode::Psk, Purpose::Auth);
    // Relabelled to group 1 with a round above the one 0x10 answered there,
    // so the cheap checks pass and the signature decides.
    let (other, r) = w.open_round(2, Mode::Psk, Purpose::Auth);
    assert!(r > r2);
    let mut c = challenge(&other);
    c.group = g;
    assert_eq!(
        w.answer(0x10, &c.to_bytes()),
        Err(MemberError::BadSignature)
    );
    // Nothing of the above was persisted,
    assert_eq!(w.node(0x20).disk, disk);
    // and the genuine challenge is answered.
    assert!(w.answer(0x20, &ch4).is_ok());
}

impl World {
    /// A full honest round in group `g` (psk, auth) by its attached
    /// members; the challenge and round.
    fn full_round_challenge(&mut self, g: u32) -> (Bytes, u64) {
        let (challenge, round) = self.open_round(g, Mode::Psk, Purpose::Auth);
        let ids: Vec<u64> = self.attached[&GroupId(g)].iter().map(|m| m.0).collect();
        self.answer_all(&ids, &challenge);
        for b in self.flush_all() {
            let v = self.submit_final(b.bytes.clone());
            for (_, r) in self.deliver_confirms(&v) {
                r.unwrap();
            }
        }
        self.close_round(g, round);
        (challenge, round)
    }
}

/// Confirms: another member's, forged, fabricated, altered, stale or
/// replayed ones are refused and change nothing; the genuine one opens once.
#[test]
fn gateway_serves_stale_forged_or_foreign_confirms() {
    let mut w = World::with_members(2, &[G], IDS);
    let g = GroupId(G);
    let (challenge, _) = w.open_round(G, Mode::PskEcdhe, Purpose::Auth);
    w.answer_all(&IDS, &challenge);
    let b = w.flush().pop().unwrap();
    let verdict = w.submit_final(b.bytes.clone());
    let VerdictBody::Final { confirms, .. } = &verdict.body else {
        unreachable!()
    };
    let mine = confirms.iter().find(|c| c.id.0 == 0x20).unwrap();
    let other = confirms.iter().find(|c| c.id.0 == 0x10).unwrap();
    let disk = w.node(0x20).disk.clone();

    assert_eq!(
        w.node(0x20).confirm(&other.to_bytes()),
        Err(MemberError::NotForUs(MemberId(0x10)))
    );
    let forged = |f: &dyn Fn(&mut Confirm)| {
        let mut c = *mine;
        f(&mut c);
        c.to_bytes()
    };
    for (what, bytes) in [
        ("gk byte", forged(&|c| c.w[0] ^= 1)),
        ("tag byte", forged(&|c| c.w[31] ^= 1)),
        ("fabricated", forged(&|c| c.w = [0x5A; 32])),
        ("epoch", forged(&|c| c.epoch += 1)),
    ] {
        assert_eq!(
            w.node(0x20).confirm(&bytes),
            Err(MemberError::BadTag("confirm")),
            "{what}"
        );
    }
    assert_eq!(
        w.node(0x20).confirm(&forged(&|c| c.sid.0[0] ^= 1)),
        Err(MemberError::WrongSession)
    );
    assert!(matches!(
        w.node(0x20).confirm(&forged(&|c| c.round += 1)),
        Err(MemberError::NoPendingRound { .. })
    ));
    assert_eq!(w.node(0x20).disk, disk, "no refusal persisted anything");
    assert_eq!(w.node(0x20).member.session(g), None);

    let opened = w.node(0x20).confirm(&mine.to_bytes()).unwrap();
    let session = w.node(0x20).member.session(g);
    assert_eq!(session, Some((opened.sid, 1)));
    // Replayed: the pending keys are gone; nothing changes.
    assert!(matches!(
        w.node(0x20).confirm(&mine.to_bytes()),
        Err(MemberError::NoPendingRound { .. })
    ));
    // Stale: after answering the next round, the old confirm is refused and
    // the new one opens.
    w.close_round(G, 1);
    w.flush_all();
    let (challenge, _) = w.open_round(G, Mode::Psk, Purpose::Auth);
    w.answer_all(&IDS, &challenge);
    let b = w.flush().pop().unwrap();
    let verdict2 = w.submit_final(b.bytes.clone());
    assert!(matches!(
        w.node(0x20).confirm(&mine.to_bytes()),
        Err(MemberError::NoPendingRound { .. })
    ));
    assert_eq!(w.node(0x20).member.session(g), session);
    let results = w.deliver_confirms(&verdict2);
    assert!(results.values().all(Result::is_ok));
    assert_ne!(w.node(0x20).member.session(g), session);
}

/// Rekeys: forged, foreign, replayed or stale (for a superseded session)
/// ones are refused; the genuine one moves the member to the new epoch once.
#[test]
fn gateway_serves_stale_forged_or_foreign_rekeys() {
    let mut w = World::with_members(2, &[G], IDS);
    let g = GroupId(G);
    w.full_round(G, Mode::Psk, Purpose::Auth, &IDS);
    let rekeys = w
        .udc
        .verifier
        .revoke(
            w.udc.groups.get_mut(&g).unwrap(),
            MemberId(0x40),
            &mut w.udc.sessions,
            &mut w.rng,
        )
        .unwrap();
    let mine = *rekeys.iter().find(|r| r.id.0 == 0x10).unwrap();
    let other = *rekeys.iter().find(|r| r.id.0 == 0x20).unwrap();
    assert_eq!(
        w.node(0x10).rekey(&other.to_bytes()),
        Err(MemberError::NotForUs(MemberId(0x20)))
    );
    // A revoked member gets no rekey; handed another's, it refuses it.
    assert!(w.node(0x40).rekey(&mine.to_bytes()).is_err());
    let forged = |f: &dyn Fn(&mut Rekey)| {
        let mut r = mine;
        f(&mut r);
        r.to_bytes()
    };
    for (what, bytes) in [
        ("key byte", forged(&|r| r.c[0] ^= 1)),
        ("tag byte", forged(&|r| r.c[31] ^= 1)),
        ("nonce", forged(&|r| r.nonce[0] ^= 1)),
        ("epoch", forged(&|r| r.new_epoch += 1)),
        ("down_ctr", forged(&|r| r.down_ctr += 1)),
    ] {
        assert_eq!(
            w.node(0x10).rekey(&bytes),
            Err(MemberError::BadTag("rekey")),
            "{what}"
        );
    }
    assert_eq!(
        w.node(0x10).rekey(&forged(&|r| r.sid.0[0] ^= 1)),
        Err(MemberError::WrongSession)
    );
    assert_eq!(w.node(0x10).member.session(g).unwrap().1, 1);
    assert_eq!(w.node(0x10).rekey(&mine.to_bytes()), Ok(2));
    assert!(w.node(0x10).rekey(&mine.to_bytes()).is_err(), "replayed");
    assert_eq!(w.node(0x10).member.session(g).unwrap().1, 2);

    // 0x30's rekey is withheld until after its next session: then stale.
    let withheld = *rekeys.iter().find(|r| r.id.0 == 0x30).unwrap();
    w.close_round(G, 1);
    w.flush_all();
    w.full_round(G, Mode::Psk, Purpose::Auth, &[0x10, 0x20, 0x30]);
    assert_eq!(w.node(0x30).member.session(g).unwrap().1, 2);
    assert!(w.node(0x30).rekey(&withheld.to_bytes()).is_err());
}

/// Group messages: forged (any byte, another key), or another group's, are
/// refused; only V's signed message is applied.
#[test]
fn gateway_forges_or_misroutes_group_messages() {
    let mut w = World::new(2);
    w.add_group(1);
    w.add_group(2);
    for id in IDS {
        w.add_member(id, &[1]);
    }
    w.add_member(0x50, &[2]);
    let (_, round) = w.full_round(1, Mode::Psk, Purpose::Auth, &IDS);
    w.full_round(2, Mode::Psk, Purpose::Auth, &[0x50]);
    let msg = w
        .udc
        .verifier
        .group_message(
            w.udc.groups.get_mut(&GroupId(1)).unwrap(),
            b"config v2",
            round,
            &mut w.rng,
        )
        .unwrap();
    let for_two = w
        .udc
        .verifier
        .group_message(
            w.udc.groups.get_mut(&GroupId(2)).unwrap(),
            b"other",
            round,
            &mut w.rng,
        )
        .unwrap();
    for i in 0..msg.len() {
        let mut t = msg.to_vec();
        t[i] ^= 0x01;
        let r = w.node(0x10).group_message(&t);
        assert!(r.is_err(), "byte {i} accepted");
    }
    let mut m = GroupMessage::decode(&msg).unwrap();
    m.signature = dapgw::protocol::suite::SigningKey::from_seed(&[9; 32]).sign(&m.signed_bytes());
    assert!(matches!(
        w.node(0x10).group_message(&m.to_bytes()),
        Err(MemberError::BadSignature)
    ));
    assert!(matches!(
        w.node(0x10).group_message(&for_two),
        Err(MemberError::NotOurGroup(GroupId(2)))
    ));
    let (update, _) = w.node(0x10).group_message(&msg).unwrap();
    assert_eq!(update.payload.as_slice(), b"config v2");
}

/// The gateway withholds an update and delivers a superseded one later:
/// refused once a newer one was applied, once a challenge announced a newer
/// seq, or once its validity round has passed.
#[test]
fn gateway_withholds_an_update_and_delivers_a_superseded_one_later() {
    let mut w = World::with_members(2, &[G], IDS);
    let g = GroupId(G);
    let (_, r1) = w.full_round(G, Mode::Psk, Purpose::Auth, &IDS);
    let gs = w.udc.groups.get_mut(&g).unwrap();
    let m1 = w
        .udc
        .verifier
        .group_message(gs, b"v1", r1, &mut w.rng)
        .unwrap();
    let m2 = w
        .udc
        .verifier
        .group_message(gs, b"v2", r1 + 10, &mut w.rng)
        .unwrap();

    // Out of order: the newer one first, then the older one is stale.
    w.node(0x10).group_message(&m2).unwrap();
    assert_eq!(
        w.node(0x10).group_message(&m1).map(|(u, _)| u.seq),
        Err(MemberError::StaleSeq { seq: 1, applied: 2 })
    );
    // 0x20 gets neither; the next round's challenge announces seq 2.
    w.close_round(G, r1);
    w.flush_all();
    w.full_round(G, Mode::Psk, Purpose::Auth, &IDS);
    assert_eq!(
        w.node(0x20).group_message(&m1).map(|(u, _)| u.seq),
        Err(MemberError::SupersededSeq {
            seq: 1,
            announced: 2
        })
    );
    let (u, _) = w.node(0x20).group_message(&m2).unwrap();
    assert_eq!(u.payload.as_slice(), b"v2");

    // A message valid through round r, delivered after the member answered
    // a later round.
    let gs = w.udc.groups.get_mut(&g).unwrap();
    let r2 = gs.next_round - 1;
    let m3 = w
        .udc
        .verifier
        .group_message(gs, b"v3", r2, &mut w.rng)
        .unwrap();
    w.close_round(G, r2);
    w.flush_all();
    let (_, r3) = w.full_round(G, Mode::Psk, Purpose::Auth, &IDS);
    assert_eq!(
        w.node(0x30).group_message(&m3).map(|(u, _)| u.seq),
        Err(MemberError::StaleValidity {
            valid_through_round: r2,
            answered: r3
        })
    );
}

// ---------------------------------------------------------------------------
// Members that reboot or lose their state
// ---------------------------------------------------------------------------

/// A member reboots from persisted state while the gateway replays the
/// challenge: it re-sends the identical response (never seals a second
/// one), is accepted once, and opens the confirm.
#[test]
fn member_reboots_from_persisted_state() {
    let mut w = World::with_members(2, &[G], IDS);
    let (challenge, _) = w.open_round(G, Mode::PskEcdhe, Purpose::Read(Bytes::from_static(b"r")));
    let first = w.answer(0x30, &challenge).unwrap();
    for _ in 0..3 {
        w.node(0x30).reboot();
        assert_eq!(w.answer(0x30, &challenge).unwrap(), first);
    }
    w.collect(&first);
    w.answer_all(&[0x10, 0x20, 0x40], &challenge);
    let b = w.flush().pop().unwrap();
    let verdict = w.submit_final(b.bytes.clone());
    assert_eq!(accepted(&b.bytes, &verdict), IDS.to_vec());
    w.node(0x30).reboot();
    assert!(w.deliver_confirms(&verdict).values().all(Result::is_ok));
}

/// A member that loses its state answers a re-relayed challenge with a new
/// response: the gateway holds it as an alternative (it cannot tell which is
/// real) and sends it in a follow-up batch, where V sets it aside as already
/// accepted; V accepted the first one, and the member cannot open its
/// confirm; it has no session until the next round, which works normally. A
/// replayed old challenge it answers is refused by V.
#[test]
fn member_loses_its_state() {
    let mut w = World::with_members(2, &[G], IDS);
    let g = GroupId(G);
    let (old, r1) = w.full_round_challenge(G);
    let (challenge, r2) = w.open_round(G, Mode::Psk, Purpose::Auth);
    w.answer_all(&IDS, &challenge);
    w.node(0x20).lose_state();
    let again = w.answer(0x20, &challenge).unwrap();
    assert_eq!(
        w.gateway.handle_bytes(&again, (), w.now),
        Ok(Collected::New)
    );
    let mut batches = w.flush();
    assert_eq!(batches.len(), 2, "main batch and a follow-up");
    let follow_up = batches.pop().unwrap();
    let b = batches.pop().unwrap();
    let verdict = w.submit_final(b.bytes.clone());
    assert_eq!(accepted(&b.bytes, &verdict), IDS.to_vec());
    let v2 = w.submit_final(follow_up.bytes.clone());
    assert_eq!(
        outcomes(&follow_up.bytes, &v2)[&0x20],
        Outcome::AlreadyAccepted
    );
    assert!(w.deliver_confirms(&v2).is_empty());
    let results = w.deliver_confirms(&verdict);
    assert_eq!(results[&0x20], Err(MemberError::WrongSession));
    assert_eq!(w.node(0x20).member.session(g), None);
    assert_eq!(
        w.node(0x20)
            .uplink(g, dapgw::protocol::wire::UplinkKind::Reading, b"x"),
        Err(MemberError::SealWithoutSession(g))
    );

    // The gateway replays round 1's challenge to the amnesiac member: it
    // answers (it cannot know better), and V refuses the answer.
    w.close_round(G, r2);
    w.flush_all();
    w.node(0x20).lose_state();
    let stale = w.answer(0x20, &old).unwrap();
    let mut b = Batch::decode(&b.bytes).unwrap();
    b.body = BatchBody::Responses {
        round: r1,
        mode: Mode::Psk,
        entries: vec![
            dapgw::protocol::wire::Response::decode(&stale)
                .unwrap()
                .entry(),
        ],
    };
    let tag = dapgw::protocol::wire::Response::decode(&stale).unwrap().tag;
    let (bytes, kept) = tampered(&mut w, &b, &[tag]);
    let verdict = send(&mut w, bytes.clone(), kept).unwrap();
    assert_eq!(outcomes(&bytes, &verdict)[&0x20], Outcome::RoundNotOpen);

    let (acc, _) = w.full_round(G, Mode::Psk, Purpose::Auth, &IDS);
    assert_eq!(acc, IDS.to_vec());
    assert!(w.node(0x20).member.session(g).is_some());
}

// ---------------------------------------------------------------------------
// What the gateway ever holds
// ---------------------------------------------------------------------------

/// Everything that passes through the gateway in a full life cycle (round
/// in both modes, confirms, uplinks, a group message and its acks, a
/// revocation's rekeys) contains no 12- or 16-byte piece of any member root
/// key, session key, uplink IV or group key; the aggregator holds only these
/// bytes (its API names no key type). The service-level test scans the
/// gateway process's memory; this checks the protocol gives it nothing to
/// hold.
#[test]
fn gateway_never_holds_a_key() {
    let mut w = World::with_members(2, &[G], IDS);
    let g = GroupId(G);
    let mut seen: Vec<Bytes> = Vec::new();
    let mut secrets: Vec<Vec<u8>> = Vec::new();
    secrets.push(w.udc.groups[&g].gk.expose().to_vec());
    for mode in [Mode::PskEcdhe, Mode::Psk] {
        let (challenge, round) = w.open_round(G, mode, Purpose::Read(Bytes::from_static(b"q")));
        seen.push(challenge.clone());
        for id in IDS {
            let r = w.answer(id, &challenge).unwrap();
            w.collect(&r);
            seen.push(r);
        }
        for b in w.flush_all() {
            seen.push(b.bytes.clone());
            seen.extend(b.tags.tags.iter().map(|t| Bytes::copy_from_slice(t)));
            let outs = w.submit(b.bytes.clone()).unwrap();
            seen.extend(outs.iter().map(|o| o.answer.clone()));
            let verdict = final_verdict(outs.last().unwrap());
            let VerdictBody::Final { confirms, .. } = &verdict.body else {
                unreachable!()
            };
            seen.extend(confirms.iter().map(Confirm::to_bytes));
            assert!(w.deliver_confirms(&verdict).values().all(Result::is_ok));
        }
        w.close_round(G, round);
    }
    for id in IDS {
        let up = w
            .node(id)
            .uplink(g, dapgw::protocol::wire::UplinkKind::Alarm, b"door")
            .unwrap();
        w.collect(&up);
        seen.push(up);
    }
    let round = w.udc.groups[&g].next_round - 1;
    let gs = w.udc.groups.get_mut(&g).unwrap();
    let msg = w
        .udc
        .verifier
        .group_message(gs, b"config", round, &mut w.rng)
        .unwrap();
    seen.push(msg.clone());
    for id in IDS {
        let (_, ack) = w.node(id).group_message(&msg).unwrap();
        w.collect(&ack);
        seen.push(ack);
    }
    w.advance(w.gateway.config().uplink_linger);
    for b in w.flush() {
        seen.push(b.bytes.clone());
        let outs = w.submit(b.bytes.clone()).unwrap();
        seen.extend(outs.iter().map(|o| o.answer.clone()));
    }
    // Session keys as V holds them, before the revocation drops 0x40's.
    for id in IDS {
        let (sid, _) = w.node(id).member.session(g).unwrap();
        let slot = w.udc.sessions.get(g, MemberId(id)).unwrap();
        let s = slot.by_sid(sid).unwrap();
        secrets.extend([
            s.k_up.expose().to_vec(),
            s.k_down.expose().to_vec(),
            s.iv_up.expose().to_vec(),
        ]);
        let k_i = dapgw::protocol::keys::MemberKeyDeriver::new(
            &dapgw::protocol::keys::MasterSecret::from_bytes(MS),
        )
        .member_key(id, 1);
        secrets.extend(k_i.expose().chunks(16).map(<[u8]>::to_vec));
    }
    let rekeys = w
        .udc
        .verifier
        .revoke(
            w.udc.groups.get_mut(&g).unwrap(),
            MemberId(0x40),
            &mut w.udc.sessions,
            &mut w.rng,
        )
        .unwrap();
    secrets.push(w.udc.groups[&g].gk.expose().to_vec());
    for r in &rekeys {
        seen.push(r.to_bytes());
        assert_eq!(w.node(r.id.0).rekey(&r.to_bytes()), Ok(2));
    }

    assert_eq!(secrets.len(), 2 + IDS.len() * 5);
    for secret in &secrets {
        assert!(secret.len() >= 12);
        for s in &seen {
            assert!(
                !s.windows(secret.len()).any(|win| win == secret.as_slice()),
                "a secret appears in what the gateway handled"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Pre-emption on the member side
// ---------------------------------------------------------------------------

/// A device on the member side sends garbage under a victim's id right after
/// the challenge, before the victim answers. The gateway cannot tell which
/// is real, so it holds the victim's real response as an alternative and
/// sends it in a follow-up batch: V sets the forgery aside and accepts the
/// real one, whose confirm the victim opens.
#[test]
fn forged_response_sent_first_does_not_pre_empt_the_member() {
    use dapgw::protocol::wire::Response;
    let mut w = World::with_members(2, &[G], IDS);
    let (challenge, _) = w.open_round(G, Mode::Psk, Purpose::Auth);
    let real = w.answer(0x20, &challenge).unwrap();
    let mut forged = Response::decode(&real).unwrap();
    forged.tag[0] ^= 1;
    forged.n_i = [0xAA; 16];
    assert_eq!(
        w.gateway.handle_response(forged, (), w.now),
        Ok(Collected::New)
    );
    for &id in &IDS {
        let r = w.answer(id, &challenge).unwrap();
        assert_eq!(w.collect(&r), Collected::New, "member {id:#x}");
    }
    // The real response again is absorbed, not held a third time.
    assert_eq!(w.collect(&real), Collected::Duplicate);
    let batches = w.flush();
    assert_eq!(batches.len(), 2, "main batch and a follow-up");
    let mut accepted_ids = Vec::new();
    for b in batches {
        let verdict = w.submit_final(b.bytes.clone());
        accepted_ids.extend(accepted(&b.bytes, &verdict));
        for (_, r) in w.deliver_confirms(&verdict) {
            r.unwrap();
        }
    }
    accepted_ids.sort();
    assert_eq!(accepted_ids, IDS.to_vec());
    assert!(w.node(0x20).member.session(GroupId(G)).is_some());
}

/// The same for uplinks: garbage under a victim's next counter does not
/// burn it; the real uplink goes out in a follow-up batch and is accepted.
#[test]
fn forged_uplink_at_the_next_counter_does_not_burn_it() {
    use dapgw::protocol::wire::{Uplink, UplinkKind};
    let mut w = World::with_members(2, &[G], IDS);
    w.full_round(G, Mode::Psk, Purpose::Auth, &IDS);
    let g = GroupId(G);
    let first = w.node(0x20).uplink(g, UplinkKind::Reading, b"1").unwrap();
    w.collect(&first);
    w.advance(w.gateway.config().uplink_linger);
    let b = w.flush().pop().unwrap();
    w.submit_final(b.bytes.clone());

    // The forger saw ctr 1 go by and pre-empts ctr 2.
    let mut forged = Uplink::decode(&first).unwrap();
    forged.ctr = 2;
    forged.tag[0] ^= 1;
    assert_eq!(
        w.gateway.handle_uplink(forged, (), w.now),
        Ok(Collected::New)
    );
    let real = w
        .node(0x20)
        .uplink(g, UplinkKind::Alarm, b"tamper")
        .unwrap();
    assert_eq!(Uplink::decode(&real).unwrap().ctr, 2);
    assert_eq!(w.collect(&real), Collected::New);
    assert_eq!(w.collect(&real), Collected::Duplicate);
    w.advance(w.gateway.config().uplink_linger);
    let batches = w.flush();
    assert_eq!(batches.len(), 2, "main batch and a follow-up");
    let mut accepted_keys = Vec::new();
    for b in batches {
        let verdict = w.submit_final(b.bytes.clone());
        accepted_keys.extend(accepted(&b.bytes, &verdict));
    }
    assert_eq!(accepted_keys, vec![0x20 << 32 | 2]);
}

/// Alternatives are bounded: past the cap per id, a conflicting response
/// is refused.
#[test]
fn alternatives_per_member_are_capped() {
    use dapgw::protocol::aggregator::MAX_VARIANTS;
    use dapgw::protocol::wire::Response;
    let mut w = World::with_members(2, &[G], IDS);
    let (challenge, round) = w.open_round(G, Mode::Psk, Purpose::Auth);
    let real = Response::decode(&w.answer(0x20, &challenge).unwrap()).unwrap();
    for i in 0..MAX_VARIANTS {
        let mut f = real.clone();
        f.n_i = [i as u8; 16];
        assert_eq!(w.gateway.handle_response(f, (), w.now), Ok(Collected::New));
    }
    assert_eq!(
        w.gateway.handle_response(real, (), w.now),
        Err(CollectError::ConflictingResponse {
            id: MemberId(0x20),
            group: GroupId(G),
            round
        })
    );
}
