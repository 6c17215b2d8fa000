//! Tests of the verifier, driving it with members built from `suite` and
//! `keys` directly (independent of the member state machine).

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::*;
use crate::protocol::keys::{
    MemberKey, MemberKeyDeriver, Prk0, SessionKeys, response_keys, session_keys,
    sign_key_certificate, transcript_hash, uplink_nonce,
};
use crate::protocol::suite::{EphemeralKeyPair, Gcm, VerifyingKey};
use crate::protocol::wire::{
    AckPayload, Challenge, ChunkTags, GroupId, GroupMessage, KeyCertificate, KeyUpdate, Purpose,
    Rekey, ResponseEntry, UplinkEntry, UplinkKind, uplink_aad,
};

/// A deterministic generator for reproducible tests (not for keys).
pub(super) struct TestRng(pub(super) u64);

impl rand_core::TryRng for TestRng {
    type Error = core::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        Ok(self.try_next_u64()? as u32)
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Ok(z ^ (z >> 31))
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        for chunk in dst.chunks_mut(8) {
            let v = self.try_next_u64()?.to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        Ok(())
    }
}
impl rand_core::TryCryptoRng for TestRng {}

const G: GroupId = GroupId(7);
const MS: [u8; 32] = [0x42; 32];

/// A member as a test sees it: its key and, after a response, what it
/// needs to check the confirm and use the session.
struct TestMember {
    id: MemberId,
    kv: u32,
    key: MemberKey,
}

/// One sealed response, with the member-side material to follow it up.
struct Sealed {
    entry: ResponseEntry,
    tag: [u8; 16],
    payload: Vec<u8>,
    prk0: Prk0,
    e_i: Option<EphemeralKeyPair>,
}

impl Sealed {
    /// The member's session keys once it knows `E_V`.
    fn session(&self, challenge: &Challenge) -> SessionKeys {
        let dh = match (&self.e_i, challenge.e_v) {
            (Some(e_i), Some(e_v)) => Some(e_i.diffie_hellman(&e_v).unwrap()),
            _ => None,
        };
        session_keys(&self.prk0, dh.as_ref())
    }
}

impl TestMember {
    fn derived(id: u64, kv: u32) -> Self {
        let d = MemberKeyDeriver::new(&MasterSecret::from_bytes(MS));
        Self {
            id: MemberId(id),
            kv,
            key: d.member_key(id, kv),
        }
    }

    /// Answers `challenge_bytes` as the design's step 2 says.
    fn respond(&self, challenge_bytes: &Bytes, payload: &[u8], rng: &mut TestRng) -> Sealed {
        let ch = Challenge::decode(challenge_bytes).unwrap();
        let ch_hash: [u8; 32] = Sha256::digest(challenge_bytes).into();
        let mut n_i = [0u8; 16];
        rand_core::Rng::fill_bytes(rng, &mut n_i);
        let e_i = ch.e_v.map(|_| EphemeralKeyPair::generate(rng));
        let e_pub = e_i.as_ref().map(EphemeralKeyPair::public);
        let th = transcript_hash(&ch_hash, self.id.0, self.kv, &n_i, e_pub.as_ref());
        let (resp, prk0) = response_keys(&self.key, &th);
        let mut c = payload.to_vec();
        let tag = Gcm::new(resp.k_resp.expose()).seal_in_place(resp.iv_resp.expose(), &th, &mut c);
        Sealed {
            entry: ResponseEntry {
                id: self.id,
                kv: self.kv,
                n_i,
                e_i: e_pub,
                c: Bytes::from(c),
            },
            tag,
            payload: payload.to_vec(),
            prk0,
            e_i,
        }
    }
}

struct Fixture {
    verifier: Verifier,
    online: VerifyingKey,
    root: VerifyingKey,
    registry: InMemoryRegistry,
    group: GroupState,
    sessions: SessionTable,
    log: InMemoryVerdictLog,
    rng: TestRng,
    next_batch: u64,
}

impl Fixture {
    fn new() -> Self {
        let mut rng = TestRng(1);
        let root = SigningKey::from_seed(&[1; 32]);
        let online = SigningKey::from_seed(&[2; 32]);
        let online_pub = online.verifying_key();
        let cert = KeyCertificate {
            key_id: 5,
            key_version: 1,
            public_key: online_pub.to_bytes(),
            root_sig: sign_key_certificate(&root, 5, 1, &online_pub.to_bytes()),
        };
        let verifier = Verifier::new(
            &MasterSecret::from_bytes(MS),
            online,
            5,
            Some(cert),
            VerifierConfig::default(),
        );
        let group = GroupState::new(G, &mut rng);
        Self {
            verifier,
            online: online_pub,
            root: root.verifying_key(),
            registry: InMemoryRegistry::new(),
            group,
            sessions: SessionTable::new(),
            log: InMemoryVerdictLog::new(),
            rng,
            next_batch: 1,
        }
    }

    /// Registers members 1..=n (derived keys, kv 1) in group G.
    fn members(&mut self, ids: impl IntoIterator<Item = u64>) -> Vec<TestMember> {
        ids.into_iter()
            .map(|id| {
                self.registry
                    .insert(MemberRecord::derived(MemberId(id), 1, vec![G]));
                TestMember::derived(id, 1)
            })
            .collect()
    }

    fn open(&mut self, mode: Mode, purpose: Purpose) -> (RoundState, Bytes) {
        self.verifier
            .open_round(&mut self.group, mode, purpose, None, &mut self.rng)
            .unwrap()
    }

    /// A response batch as an honest gateway builds it.
    fn batch(&mut self, round: &RoundState, sealed: &[&Sealed], chunk: u16) -> Batch {
        let mut sorted: Vec<&Sealed> = sealed.to_vec();
        sorted.sort_by_key(|s| s.entry.id);
        let tags: Vec<[u8; 16]> = sorted.iter().map(|s| s.tag).collect();
        let batch_id = self.next_batch;
        self.next_batch += 1;
        Batch {
            gateway_id: GatewayId::new("gw-1").unwrap(),
            batch_id,
            group: G,
            chunk_size: chunk,
            body: BatchBody::Responses {
                round: round.round,
                mode: round.mode,
                entries: sorted.iter().map(|s| s.entry.clone()).collect(),
            },
            aggregates: tags.chunks(usize::from(chunk)).map(aggregate).collect(),
        }
    }

    fn handle(&mut self, batch: &Batch, round: Option<&mut RoundState>) -> BatchOutput {
        self.try_handle(batch, round).unwrap()
    }

    fn try_handle(
        &mut self,
        batch: &Batch,
        round: Option<&mut RoundState>,
    ) -> Result<BatchOutput, VerifierError> {
        let rb = ReceivedBatch::decode(batch.to_bytes())?;
        self.verifier.handle_batch(
            &rb,
            BatchState {
                group: &self.group,
                round,
                sessions: &mut self.sessions,
            },
            &self.registry,
            &mut self.log,
            1_000,
        )
    }

    fn reply(
        &mut self,
        batch: &Batch,
        chunks: Vec<ChunkTags>,
        round: Option<&mut RoundState>,
    ) -> BatchOutput {
        let reply = TagReply {
            gateway_id: batch.gateway_id,
            batch_id: batch.batch_id,
            batch_hash: Sha256::digest(batch.to_bytes()).into(),
            chunks,
        };
        self.verifier
            .handle_tag_reply(
                &reply,
                BatchState {
                    group: &self.group,
                    round,
                    sessions: &mut self.sessions,
                },
                &self.registry,
                &mut self.log,
                1_000,
            )
            .unwrap()
    }
}

fn responses(out: BatchOutput) -> (Bytes, ResponseVerdict) {
    match out.event {
        BatchEvent::Responses(v) => (out.answer, v),
        other => panic!("expected a response verdict, got {other:?}"),
    }
}

fn tags_requested(out: &BatchOutput) -> Vec<u32> {
    match &out.event {
        BatchEvent::TagsRequested { chunks } => chunks.clone(),
        other => panic!("expected a tag request, got {other:?}"),
    }
}

fn outcomes(v: &Verdict) -> &[Outcome] {
    match &v.body {
        VerdictBody::Final { outcomes, .. } => outcomes,
        VerdictBody::TagsRequested { .. } => panic!("not final"),
    }
}

fn confirms(v: &Verdict) -> &[Confirm] {
    match &v.body {
        VerdictBody::Final { confirms, .. } => confirms,
        VerdictBody::TagsRequested { .. } => panic!("not final"),
    }
}

/// Opens a confirm as the member would: returns GK_e.
fn open_confirm(c: &Confirm, keys: &SessionKeys) -> [u8; 16] {
    assert_eq!(c.sid.0, keys.sid, "confirm names the member's new session");
    let mut buf = [0u8; 16];
    buf.copy_from_slice(&c.w[..16]);
    let tag: [u8; 16] = c.w[16..].try_into().unwrap();
    Gcm::new(keys.k_conf.expose())
        .open_in_place(keys.iv_conf.expose(), &c.aad(), &mut buf, &tag)
        .expect("confirm opens under the member's k_conf");
    buf
}

fn all_tags(sealed: &[&Sealed], chunk: usize, k: usize) -> ChunkTags {
    let mut sorted: Vec<&Sealed> = sealed.to_vec();
    sorted.sort_by_key(|s| s.entry.id);
    ChunkTags {
        chunk: k as u32,
        tags: sorted
            .iter()
            .skip(k * chunk)
            .take(chunk)
            .map(|s| s.tag)
            .collect(),
    }
}

// ---------------------------------------------------------------------------
// Rounds and responses
// ---------------------------------------------------------------------------

#[test]
fn challenge_is_signed_hashed_once_and_rounds_increase() {
    let mut f = Fixture::new();
    let (r1, b1) = f.open(Mode::Psk, Purpose::Auth);
    let (r2, b2) = f.open(Mode::PskEcdhe, Purpose::Read(Bytes::from_static(b"kwh")));
    assert!(r2.round > r1.round);
    assert_eq!(f.group.next_round, r2.round + 1);
    assert_eq!(f.group.ecdhe_rounds, 1);
    for (r, b) in [(&r1, &b1), (&r2, &b2)] {
        let ch = Challenge::decode(b).unwrap();
        assert_eq!(r.ch_hash, <[u8; 32]>::from(Sha256::digest(b)));
        let mut signed = b"dapgw v1 challenge".to_vec();
        signed.extend_from_slice(&b[..b.len() - 64]);
        f.online.verify(&signed, &ch.signature).unwrap();
        assert_eq!(ch.key_id, 5);
        let cert = ch.key_cert.unwrap();
        crate::protocol::keys::verify_key_certificate(
            &f.root,
            cert.key_id,
            cert.key_version,
            &cert.public_key,
            &cert.root_sig,
        )
        .unwrap();
        assert_eq!((ch.group, ch.round, ch.epoch), (G, r.round, f.group.epoch));
    }
    assert!(r1.e_v_secret.is_none());
    let ch2 = Challenge::decode(&b2).unwrap();
    let secret = r2.e_v_secret.as_ref().unwrap();
    assert_eq!(
        EphemeralKeyPair::from_secret_bytes(secret.0.expose()).public(),
        ch2.e_v.unwrap()
    );
    let mut r2 = r2;
    r2.close();
    assert!(r2.e_v_secret.is_none() && !r2.open);
    let too_long = Purpose::Read(Bytes::from(vec![0; 257]));
    assert_eq!(
        f.verifier
            .open_round(&mut f.group, Mode::Psk, too_long, None, &mut f.rng)
            .unwrap_err(),
        UsageError::ReadRequestTooLong(257)
    );
}

#[test]
fn honest_psk_batch_is_accepted_with_confirms_sessions_and_readings() {
    let mut f = Fixture::new();
    let members = f.members(1..=10);
    let (mut round, ch) = f.open(Mode::Psk, Purpose::Read(Bytes::from_static(b"kwh")));
    let sealed: Vec<Sealed> = members
        .iter()
        .map(|m| m.respond(&ch, format!("reading {}", m.id).as_bytes(), &mut f.rng))
        .collect();
    let refs: Vec<&Sealed> = sealed.iter().collect();
    let batch = f.batch(&round, &refs, 4);
    let (answer, v) = responses(f.handle(&batch, Some(&mut round)));

    assert_eq!(outcomes(&v.verdict), [Outcome::Accepted; 10]);
    assert_eq!(v.counters.count(Outcome::Accepted), 10);
    assert_eq!(v.counters.localized, 0);
    assert_eq!(Verdict::decode(&answer).unwrap(), v.verdict);
    let challenge = Challenge::decode(&ch).unwrap();
    for (s, c) in sealed.iter().zip(confirms(&v.verdict)) {
        let keys = s.session(&challenge);
        assert_eq!(c.id, s.entry.id);
        assert_eq!((c.group, c.round, c.epoch), (G, round.round, f.group.epoch));
        assert_eq!(&open_confirm(c, &keys), f.group.gk.expose());
        let slot = f.sessions.get(G, s.entry.id).unwrap();
        let pending = slot.pending.as_ref().unwrap();
        assert_eq!(pending.sid.0, keys.sid);
        assert_eq!(pending.k_up, keys.k_up);
        assert_eq!(pending.k_down, keys.k_down);
        assert!(slot.current.is_none());
    }
    let readings: Vec<_> = v
        .readings
        .iter()
        .map(|r| (r.id, r.payload.clone()))
        .collect();
    let expected: Vec<_> = sealed
        .iter()
        .map(|s| (s.entry.id, s.payload.clone()))
        .collect();
    assert_eq!(readings, expected);
    assert_eq!(round.accepted.len(), 10);
    assert_eq!(v.touched.len(), 10);
    assert!(v.kv_confirmed.is_empty() && v.ecdhe_missed.is_empty());
}

#[test]
fn every_set_aside_reason_is_reported_per_entry() {
    let mut f = Fixture::new();
    let members = f.members(1..=6);
    // 2: revoked; 3: in another group only; 4: answers under a stale kv;
    // 5: accepted earlier in this round; 6: honest.
    f.registry.get_mut(MemberId(2)).unwrap().status = MemberStatus::Revoked;
    f.registry.get_mut(MemberId(3)).unwrap().groups = vec![GroupId(99)];
    {
        let r = f.registry.get_mut(MemberId(4)).unwrap();
        r.kv = 3;
        r.min_kv = 2;
    }
    let (mut round, ch) = f.open(Mode::Psk, Purpose::Auth);
    let sealed: Vec<Sealed> = members
        .iter()
        .map(|m| m.respond(&ch, b"", &mut f.rng))
        .collect();
    let first = f.batch(&round, &[&sealed[4]], 64);
    let (_, v) = responses(f.handle(&first, Some(&mut round)));
    assert_eq!(outcomes(&v.verdict), [Outcome::Accepted]);

    let refs: Vec<&Sealed> = sealed.iter().collect();
    let batch = f.batch(&round, &refs, 64);
    let (_, v) = responses(f.handle(&batch, Some(&mut round)));
    use Outcome::*;
    assert_eq!(
        outcomes(&v.verdict),
        [
            Accepted,
            Revoked,
            NotInGroup,
            StaleKeyVersion,
            AlreadyAccepted,
            Accepted
        ]
    );
    // Set-aside entries' tags were recomputed: the chunk matched, nothing
    // needed localizing.
    assert_eq!(v.counters.localized, 0);
    assert_eq!(confirms(&v.verdict).len(), 2);

    // Round closed, or expired, or unknown to V: every entry RoundNotOpen.
    let fresh = TestMember::derived(6, 1);
    let late = fresh.respond(&ch, b"", &mut f.rng);
    let mut closed = round.clone();
    closed.accepted.clear();
    closed.close();
    let b = f.batch(&round, &[&late], 64);
    let (_, v) = responses(f.handle(&b, Some(&mut closed)));
    assert_eq!(outcomes(&v.verdict), [RoundNotOpen]);
    let b = f.batch(&round, &[&late], 64);
    let (_, v) = responses(f.handle(&b, None));
    assert_eq!(outcomes(&v.verdict), [RoundNotOpen]);
    let mut expiring = round.clone();
    expiring.accepted.clear();
    expiring.not_after = Some(999);
    let b = f.batch(&round, &[&late], 64);
    let (_, v) = responses(f.handle(&b, Some(&mut expiring)));
    assert_eq!(
        outcomes(&v.verdict),
        [RoundNotOpen],
        "now = 1000 > not_after"
    );
}

#[test]
fn new_key_version_is_accepted_and_reported_once_issued() {
    let mut f = Fixture::new();
    f.members([1]);
    let r = f.registry.get_mut(MemberId(1)).unwrap();
    *r = r.after_key_update(2);
    let (mut round, ch) = f.open(Mode::Psk, Purpose::Auth);
    let old = TestMember::derived(1, 1).respond(&ch, b"", &mut f.rng);
    let b = f.batch(&round, &[&old], 8);
    let (_, v) = responses(f.handle(&b, Some(&mut round)));
    assert_eq!(
        outcomes(&v.verdict),
        [Outcome::Accepted],
        "old kv still accepted"
    );
    assert!(v.kv_confirmed.is_empty());

    let (mut round, ch) = f.open(Mode::Psk, Purpose::Auth);
    let new = TestMember::derived(1, 2).respond(&ch, b"", &mut f.rng);
    let b = f.batch(&round, &[&new], 8);
    let (_, v) = responses(f.handle(&b, Some(&mut round)));
    assert_eq!(outcomes(&v.verdict), [Outcome::Accepted]);
    assert_eq!(v.kv_confirmed, [(MemberId(1), 2)]);
    let r = f.registry.get_mut(MemberId(1)).unwrap();
    *r = r.after_kv_confirmed(2);
    assert!(!r.accepts_kv(1));
}

#[test]
fn imported_keys_verify_and_unknown_old_versions_are_localized() {
    let mut f = Fixture::new();
    let vendor = crate::protocol::keys::import_member_key(b"vendor secret", 9, 4);
    f.registry.insert(MemberRecord::imported(
        MemberId(9),
        4,
        vendor.clone(),
        vec![G],
    ));
    let m = TestMember {
        id: MemberId(9),
        kv: 4,
        key: vendor,
    };
    let (mut round, ch) = f.open(Mode::Psk, Purpose::Auth);
    let s = m.respond(&ch, b"", &mut f.rng);
    let b = f.batch(&round, &[&s], 8);
    let (_, v) = responses(f.handle(&b, Some(&mut round)));
    assert_eq!(outcomes(&v.verdict), [Outcome::Accepted]);

    // An answer under a version below the imported one: V cannot know that
    // key, so the entry's chunk is localized; the honest neighbour is still
    // accepted and the old version is set aside.
    let honest = f.members([1]).remove(0);
    let (mut round, ch) = f.open(Mode::Psk, Purpose::Auth);
    let old = TestMember {
        id: MemberId(9),
        kv: 3,
        key: MemberKey::from_bytes([3; 32]),
    }
    .respond(&ch, b"", &mut f.rng);
    let h = honest.respond(&ch, b"", &mut f.rng);
    let refs = [&h, &old];
    let b = f.batch(&round, &refs, 8);
    assert_eq!(tags_requested(&f.handle(&b, Some(&mut round))), [0]);
    let (_, v) = responses(f.reply(&b, vec![all_tags(&refs, 8, 0)], Some(&mut round)));
    assert_eq!(
        outcomes(&v.verdict),
        [Outcome::Accepted, Outcome::StaleKeyVersion]
    );
}

#[test]
fn altered_ciphertext_is_localized_to_exactly_that_entry() {
    let mut f = Fixture::new();
    let members = f.members(1..=8);
    let (mut round, ch) = f.open(Mode::Psk, Purpose::Read(Bytes::new()));
    let sealed: Vec<Sealed> = members
        .iter()
        .map(|m| m.respond(&ch, b"0042 kWh", &mut f.rng))
        .collect();
    let refs: Vec<&Sealed> = sealed.iter().collect();
    let mut batch = f.batch(&round, &refs, 4);
    // The gateway flips one byte of member 6's ciphertext (chunk 1).
    let BatchBody::Responses { entries, .. } = &mut batch.body else {
        unreachable!()
    };
    let mut c = entries[5].c.to_vec();
    c[0] ^= 0x80;
    entries[5].c = Bytes::from(c);

    let out = f.handle(&batch, Some(&mut round));
    assert_eq!(tags_requested(&out), [1]);
    assert!(
        round.accepted.is_empty(),
        "no effect before the final verdict"
    );
    let req = Verdict::decode(&out.answer).unwrap();
    assert_eq!(req.body, VerdictBody::TagsRequested { chunks: vec![1] });

    let out = f.reply(&batch, vec![all_tags(&refs, 4, 1)], Some(&mut round));
    let (_, v) = responses(out);
    use Outcome::*;
    assert_eq!(
        outcomes(&v.verdict),
        [
            Accepted,
            Accepted,
            Accepted,
            Accepted,
            Accepted,
            UnverifiedViaGateway,
            Accepted,
            Accepted
        ]
    );
    assert_eq!(v.counters.localized, 3);
    assert_eq!(v.counters.unverified(), 1);
    assert_eq!(confirms(&v.verdict).len(), 7);
    assert!(!round.accepted.contains(&MemberId(6)));
    assert_eq!(v.readings.len(), 7);
    assert!(v.readings.iter().all(|r| r.payload == b"0042 kWh"));
}

#[test]
fn altered_aggregate_swapped_tags_and_injected_member_are_localized() {
    let mut f = Fixture::new();
    let members = f.members(1..=4);
    let (mut round, ch) = f.open(Mode::Psk, Purpose::Auth);
    let sealed: Vec<Sealed> = members
        .iter()
        .map(|m| m.respond(&ch, b"", &mut f.rng))
        .collect();
    let refs: Vec<&Sealed> = sealed.iter().collect();

    // Altered aggregate: honest tags on request accept everyone.
    let mut batch = f.batch(&round, &refs, 2);
    batch.aggregates[0][3] ^= 1;
    assert_eq!(tags_requested(&f.handle(&batch, Some(&mut round))), [0]);
    let (_, v) = responses(f.reply(&batch, vec![all_tags(&refs, 2, 0)], Some(&mut round)));
    assert_eq!(outcomes(&v.verdict), [Outcome::Accepted; 4]);
    assert_eq!(v.counters.localized, 2);

    // Swapped tags: the gateway aggregates (and returns) tags 1 and 2 in
    // the wrong order; neither entry is accepted, the other chunk is.
    let (mut round, ch) = f.open(Mode::Psk, Purpose::Auth);
    let sealed: Vec<Sealed> = members
        .iter()
        .map(|m| m.respond(&ch, b"", &mut f.rng))
        .collect();
    let refs: Vec<&Sealed> = sealed.iter().collect();
    let mut batch = f.batch(&round, &refs, 2);
    batch.aggregates[0] = aggregate([&sealed[1].tag, &sealed[0].tag]);
    assert_eq!(tags_requested(&f.handle(&batch, Some(&mut round))), [0]);
    let swapped = ChunkTags {
        chunk: 0,
        tags: vec![sealed[1].tag, sealed[0].tag],
    };
    let (_, v) = responses(f.reply(&batch, vec![swapped], Some(&mut round)));
    use Outcome::*;
    assert_eq!(
        outcomes(&v.verdict),
        [
            UnverifiedViaGateway,
            UnverifiedViaGateway,
            Accepted,
            Accepted
        ]
    );

    // Injected member that never answered (unknown id 50, made-up tag).
    let (mut round, ch) = f.open(Mode::Psk, Purpose::Auth);
    let mut sealed: Vec<Sealed> = members
        .iter()
        .map(|m| m.respond(&ch, b"", &mut f.rng))
        .collect();
    let mut ghost = TestMember::derived(50, 1).respond(&ch, b"", &mut f.rng);
    ghost.tag = [0xEE; 16];
    sealed.push(ghost);
    let refs: Vec<&Sealed> = sealed.iter().collect();
    let batch = f.batch(&round, &refs, 4);
    // Chunk 0 holds members 1-4 and matches; chunk 1 holds only the ghost,
    // which cannot be accepted, so nothing is requested.
    let (_, v) = responses(f.handle(&batch, Some(&mut round)));
    assert_eq!(
        outcomes(&v.verdict),
        [Accepted, Accepted, Accepted, Accepted, UnknownMember]
    );
    // Injected into the same chunk as honest members: localized.
    let (mut round, ch) = f.open(Mode::Psk, Purpose::Auth);
    let mut sealed: Vec<Sealed> = members
        .iter()
        .map(|m| m.respond(&ch, b"", &mut f.rng))
        .collect();
    let mut ghost = TestMember::derived(3, 1).respond(&ch, b"", &mut f.rng);
    ghost.entry.id = MemberId(0);
    sealed.push(ghost);
    let refs: Vec<&Sealed> = sealed.iter().collect();
    let batch = f.batch(&round, &refs, 8);
    assert_eq!(tags_requested(&f.handle(&batch, Some(&mut round))), [0]);
    let (_, v) = responses(f.reply(&batch, vec![all_tags(&refs, 8, 0)], Some(&mut round)));
    assert_eq!(
        outcomes(&v.verdict),
        [UnknownMember, Accepted, Accepted, Accepted, Accepted]
    );
}

#[test]
fn response_moved_under_another_id_is_not_accepted_for_either() {
    let mut f = Fixture::new();
    let members = f.members(1..=3);
    let (mut round, ch) = f.open(Mode::Psk, Purpose::Auth);
    let a = members[0].respond(&ch, b"", &mut f.rng);
    let mut moved = members[0].respond(&ch, b"", &mut f.rng);
    moved.entry.id = MemberId(2);
    let c = members[2].respond(&ch, b"", &mut f.rng);
    let batch = f.batch(&round, &[&a, &moved, &c], 4);
    assert_eq!(tags_requested(&f.handle(&batch, Some(&mut round))), [0]);
    let (_, v) = responses(f.reply(
        &batch,
        vec![ChunkTags {
            chunk: 0,
            tags: vec![a.tag, moved.tag, c.tag],
        }],
        Some(&mut round),
    ));
    use Outcome::*;
    assert_eq!(
        outcomes(&v.verdict),
        [Accepted, UnverifiedViaGateway, Accepted]
    );
    assert!(!round.accepted.contains(&MemberId(2)));
}

#[test]
fn duplicated_or_unsorted_entries_reject_the_whole_batch() {
    let mut f = Fixture::new();
    let members = f.members(1..=3);
    let (mut round, ch) = f.open(Mode::Psk, Purpose::Auth);
    let s: Vec<Sealed> = members
        .iter()
        .map(|m| m.respond(&ch, b"", &mut f.rng))
        .collect();
    let mut batch = f.batch(&round, &[&s[0], &s[1], &s[2]], 4);
    let BatchBody::Responses { entries, .. } = &mut batch.body else {
        unreachable!()
    };
    entries[2] = entries[1].clone();
    batch.aggregates[0] = aggregate([&s[0].tag, &s[1].tag, &s[1].tag]);
    let err = f.try_handle(&batch, Some(&mut round)).unwrap_err();
    assert_eq!(
        err,
        VerifierError::Peer(BatchError::Structure(BatchStructureError::NotSorted(2)))
    );
    let BatchBody::Responses { entries, .. } = &mut batch.body else {
        unreachable!()
    };
    entries.swap(0, 2);
    assert!(matches!(
        f.try_handle(&batch, Some(&mut round)),
        Err(VerifierError::Peer(BatchError::Structure(
            BatchStructureError::NotSorted(_)
        )))
    ));
    // Wrong number of aggregates.
    let mut batch = f.batch(&round, &[&s[0], &s[1], &s[2]], 2);
    batch.aggregates.pop();
    assert!(matches!(
        f.try_handle(&batch, Some(&mut round)),
        Err(VerifierError::Peer(BatchError::Decode(_)))
    ));
    assert!(round.accepted.is_empty() && f.log.is_empty());
}

#[test]
fn omitted_and_forged_tags_and_expiry_leave_entries_unverified() {
    let mut f = Fixture::new();
    let members = f.members(1..=6);
    let (mut round, ch) = f.open(Mode::Psk, Purpose::Auth);
    let sealed: Vec<Sealed> = members
        .iter()
        .map(|m| m.respond(&ch, b"", &mut f.rng))
        .collect();
    let refs: Vec<&Sealed> = sealed.iter().collect();
    let mut batch = f.batch(&round, &refs, 2);
    for a in &mut batch.aggregates {
        a[0] ^= 1;
    }
    assert_eq!(
        tags_requested(&f.handle(&batch, Some(&mut round))),
        [0, 1, 2]
    );
    // Chunk 0 omitted; chunk 1 with a forged tag; chunk 2 honest.
    let mut forged = all_tags(&refs, 2, 1);
    forged.tags[1] = [0x55; 16];
    let (_, v) = responses(f.reply(
        &batch,
        vec![forged, all_tags(&refs, 2, 2)],
        Some(&mut round),
    ));
    use Outcome::*;
    assert_eq!(
        outcomes(&v.verdict),
        [
            UnverifiedViaGateway,
            UnverifiedViaGateway,
            Accepted,
            UnverifiedViaGateway,
            Accepted,
            Accepted
        ]
    );
    assert_eq!(v.counters.unverified(), 3);

    // Expiry: nothing unresolved is accepted.
    let (mut round, ch) = f.open(Mode::Psk, Purpose::Auth);
    let sealed: Vec<Sealed> = members
        .iter()
        .map(|m| m.respond(&ch, b"", &mut f.rng))
        .collect();
    let refs: Vec<&Sealed> = sealed.iter().collect();
    let mut batch = f.batch(&round, &refs, 3);
    batch.aggregates[1][0] ^= 1;
    assert_eq!(tags_requested(&f.handle(&batch, Some(&mut round))), [1]);
    let out = f
        .verifier
        .localization_expired(
            batch.gateway_id,
            batch.batch_id,
            BatchState {
                group: &f.group,
                round: Some(&mut round),
                sessions: &mut f.sessions,
            },
            &f.registry,
            &mut f.log,
            1_000,
        )
        .unwrap();
    let (answer, v) = responses(out);
    assert_eq!(
        outcomes(&v.verdict),
        [
            Accepted,
            Accepted,
            Accepted,
            UnverifiedViaGateway,
            UnverifiedViaGateway,
            UnverifiedViaGateway
        ]
    );
    // A late reply gets the final answer again, and changes nothing.
    let late = f.reply(&batch, vec![all_tags(&refs, 3, 1)], Some(&mut round));
    assert!(matches!(late.event, BatchEvent::Replayed));
    assert_eq!(late.answer, answer);
    assert_eq!(round.accepted.len(), 3);
}

#[test]
fn tag_requests_are_bounded_and_the_rest_is_unverified() {
    let mut f = Fixture::new();
    f.verifier.config.max_tag_request_chunks = 2;
    let members = f.members(1..=5);
    let (mut round, ch) = f.open(Mode::Psk, Purpose::Auth);
    let sealed: Vec<Sealed> = members
        .iter()
        .map(|m| m.respond(&ch, b"", &mut f.rng))
        .collect();
    let refs: Vec<&Sealed> = sealed.iter().collect();
    let mut batch = f.batch(&round, &refs, 1);
    for a in &mut batch.aggregates {
        a[0] ^= 1;
    }
    assert_eq!(tags_requested(&f.handle(&batch, Some(&mut round))), [0, 1]);
    // The gateway also answers chunk 4, which was not requested: ignored.
    let reply = (0..5).map(|k| all_tags(&refs, 1, k)).collect();
    let (_, v) = responses(f.reply(&batch, reply, Some(&mut round)));
    use Outcome::*;
    assert_eq!(
        outcomes(&v.verdict),
        [
            Accepted,
            Accepted,
            UnverifiedViaGateway,
            UnverifiedViaGateway,
            UnverifiedViaGateway
        ]
    );
}

#[test]
fn retried_batch_gets_the_same_bytes_and_no_second_effect() {
    let mut f = Fixture::new();
    let members = f.members(1..=5);
    let (mut round, ch) = f.open(Mode::Psk, Purpose::Auth);
    let sealed: Vec<Sealed> = members
        .iter()
        .map(|m| m.respond(&ch, b"", &mut f.rng))
        .collect();
    let refs: Vec<&Sealed> = sealed.iter().collect();
    let batch = f.batch(&round, &refs, 2);
    let (answer, _) = responses(f.handle(&batch, Some(&mut round)));
    let slots_before: Vec<_> = (1..=5)
        .map(|i| {
            f.sessions
                .get(G, MemberId(i))
                .unwrap()
                .pending
                .as_ref()
                .unwrap()
                .sid
        })
        .collect();

    let again = f.handle(&batch, Some(&mut round));
    assert!(matches!(again.event, BatchEvent::Replayed));
    assert_eq!(again.answer, answer, "byte for byte");
    let slots_after: Vec<_> = (1..=5)
        .map(|i| {
            f.sessions
                .get(G, MemberId(i))
                .unwrap()
                .pending
                .as_ref()
                .unwrap()
                .sid
        })
        .collect();
    assert_eq!(slots_before, slots_after);
    assert_eq!(f.log.len(), 1);

    // A pending (tags requested) verdict is re-sent identically too.
    let (mut round, ch) = f.open(Mode::Psk, Purpose::Auth);
    let sealed: Vec<Sealed> = members
        .iter()
        .map(|m| m.respond(&ch, b"", &mut f.rng))
        .collect();
    let refs: Vec<&Sealed> = sealed.iter().collect();
    let mut batch = f.batch(&round, &refs, 2);
    batch.aggregates[2][0] ^= 1;
    let first = f.handle(&batch, Some(&mut round));
    let again = f.handle(&batch, Some(&mut round));
    assert_eq!(first.answer, again.answer);
    assert!(matches!(again.event, BatchEvent::Replayed));
    // The final verdict after the reply is what later retries get.
    let (final_answer, _) =
        responses(f.reply(&batch, vec![all_tags(&refs, 2, 2)], Some(&mut round)));
    assert_eq!(f.handle(&batch, Some(&mut round)).answer, final_answer);
}

#[test]
fn used_batch_id_with_other_content_is_refused() {
    let mut f = Fixture::new();
    let members = f.members(1..=2);
    let (mut round, ch) = f.open(Mode::Psk, Purpose::Auth);
    let a = members[0].respond(&ch, b"", &mut f.rng);
    let b = members[1].respond(&ch, b"", &mut f.rng);
    let first = f.batch(&round, &[&a], 4);
    let _ = f.handle(&first, Some(&mut round));
    let mut second = f.batch(&round, &[&b], 4);
    second.batch_id = first.batch_id;
    let err = f.try_handle(&second, Some(&mut round)).unwrap_err();
    assert_eq!(
        err,
        VerifierError::Peer(BatchError::BatchIdReused {
            gateway: first.gateway_id,
            batch_id: first.batch_id
        })
    );
    assert!(!round.accepted.contains(&MemberId(2)));
    // A tag reply for a batch V never saw, or naming another hash.
    let reply = TagReply {
        gateway_id: first.gateway_id,
        batch_id: 999,
        batch_hash: [0; 32],
        chunks: vec![],
    };
    let state = BatchState {
        group: &f.group,
        round: Some(&mut round),
        sessions: &mut f.sessions,
    };
    assert!(matches!(
        f.verifier
            .handle_tag_reply(&reply, state, &f.registry, &mut f.log, 0),
        Err(VerifierError::Peer(BatchError::UnknownBatch { .. }))
    ));
    let reply = TagReply {
        batch_id: first.batch_id,
        ..reply
    };
    let state = BatchState {
        group: &f.group,
        round: Some(&mut round),
        sessions: &mut f.sessions,
    };
    assert!(matches!(
        f.verifier
            .handle_tag_reply(&reply, state, &f.registry, &mut f.log, 0),
        Err(VerifierError::Peer(BatchError::TagReplyMismatch { .. }))
    ));
}

#[test]
fn psk_ecdhe_sessions_match_and_bad_key_shares_are_rejected() {
    let mut f = Fixture::new();
    let members = f.members(1..=4);
    let (mut round, ch) = f.open(Mode::PskEcdhe, Purpose::Auth);
    let challenge = Challenge::decode(&ch).unwrap();
    let mut sealed: Vec<Sealed> = members
        .iter()
        .map(|m| m.respond(&ch, b"", &mut f.rng))
        .collect();
    // Member 4 sends a small-order E_i (all-zero shared secret) but seals
    // honestly over it: its tag verifies, X25519 must reject it.
    {
        let m = &members[3];
        let ch_hash: [u8; 32] = Sha256::digest(&ch).into();
        let n_i = [4u8; 16];
        let e_i = [0u8; 32];
        let th = transcript_hash(&ch_hash, m.id.0, m.kv, &n_i, Some(&e_i));
        let (resp, prk0) = response_keys(&m.key, &th);
        let tag = Gcm::new(resp.k_resp.expose()).seal_in_place(resp.iv_resp.expose(), &th, &mut []);
        sealed[3] = Sealed {
            entry: ResponseEntry {
                id: m.id,
                kv: m.kv,
                n_i,
                e_i: Some(e_i),
                c: Bytes::new(),
            },
            tag,
            payload: vec![],
            prk0,
            e_i: None,
        };
    }
    let refs: Vec<&Sealed> = sealed.iter().collect();
    let batch = f.batch(&round, &refs, 64);
    let (_, v) = responses(f.handle(&batch, Some(&mut round)));
    use Outcome::*;
    assert_eq!(
        outcomes(&v.verdict),
        [Accepted, Accepted, Accepted, MalformedPayload]
    );
    for (s, c) in sealed[..3].iter().zip(confirms(&v.verdict)) {
        let keys = s.session(&challenge);
        assert_eq!(&open_confirm(c, &keys), f.group.gk.expose());
        let psk_only = session_keys(&s.prk0, None);
        assert_ne!(psk_only.sid, keys.sid, "the session depends on X25519");
        let pending = f
            .sessions
            .get(G, s.entry.id)
            .unwrap()
            .pending
            .clone()
            .unwrap();
        assert_eq!(pending.mode, Mode::PskEcdhe);
        assert_eq!(pending.k_down, keys.k_down);
    }
    assert!(!round.accepted.contains(&MemberId(4)));

    // A psk batch for a psk-ecdhe round is refused as a whole.
    let psk_entry = ResponseEntry {
        e_i: None,
        ..sealed[0].entry.clone()
    };
    let bad = Batch {
        body: BatchBody::Responses {
            round: round.round,
            mode: Mode::Psk,
            entries: vec![psk_entry],
        },
        aggregates: vec![[0; 16]],
        batch_id: 77,
        ..batch.clone()
    };
    assert_eq!(
        f.try_handle(&bad, Some(&mut round)).unwrap_err(),
        VerifierError::Peer(BatchError::ModeMismatch {
            round: Mode::PskEcdhe,
            batch: Mode::Psk
        })
    );
    // After close, E_V's secret is gone and nothing more is accepted.
    round.close();
    assert!(round.e_v_secret.is_none());
}

#[test]
fn members_missing_ecdhe_rounds_are_reported() {
    let mut f = Fixture::new();
    let members = f.members(1..=2);
    let run = |f: &mut Fixture, mode: Mode, who: &[usize]| {
        let (mut round, ch) = f.open(mode, Purpose::Auth);
        let sealed: Vec<Sealed> = who
            .iter()
            .map(|&i| members[i].respond(&ch, b"", &mut f.rng))
            .collect();
        let refs: Vec<&Sealed> = sealed.iter().collect();
        let batch = f.batch(&round, &refs, 64);
        responses(f.handle(&batch, Some(&mut round))).1
    };
    let _ = run(&mut f, Mode::PskEcdhe, &[0, 1]);
    // Member 2's psk-ecdhe responses are "lost" three times in a row.
    for _ in 0..3 {
        let _ = run(&mut f, Mode::PskEcdhe, &[0]);
    }
    let v = run(&mut f, Mode::Psk, &[0, 1]);
    assert_eq!(v.ecdhe_missed, [(MemberId(2), 3)]);
}

#[test]
fn direct_response_is_a_batch_of_one_and_retries_get_the_same_confirm() {
    let mut f = Fixture::new();
    let members = f.members(1..=2);
    let (mut round, ch) = f.open(Mode::Psk, Purpose::Auth);
    let s = members[0].respond(&ch, b"", &mut f.rng);
    let inner = DirectInner::Response(crate::protocol::wire::Response::from_entry(
        s.entry.clone(),
        G,
        round.round,
        s.tag,
    ));
    let direct = Direct::new(&inner, aggregate([&s.tag]));
    assert_eq!(
        direct_rate_key(&direct).unwrap(),
        RateKey::Response {
            id: MemberId(1),
            group: G,
            round: round.round
        }
    );
    let call = |f: &mut Fixture, d: &Direct, round: &mut RoundState| {
        f.verifier.handle_direct(
            d,
            BatchState {
                group: &f.group,
                round: Some(round),
                sessions: &mut f.sessions,
            },
            &f.registry,
            &mut f.log,
            1_000,
        )
    };
    let out = call(&mut f, &direct, &mut round).unwrap();
    assert_eq!(out.outcome, Outcome::Accepted);
    let confirm = out.confirm.unwrap();
    let keys = s.session(&Challenge::decode(&ch).unwrap());
    assert_eq!(
        &open_confirm(&Confirm::decode(&confirm).unwrap(), &keys),
        f.group.gk.expose()
    );
    // Retried: the same confirm bytes, even after the epoch moved on.
    let _ = f
        .verifier
        .add_member(&mut f.group, &mut f.sessions, &mut f.rng)
        .unwrap();
    let again = call(&mut f, &direct, &mut round).unwrap();
    assert!(matches!(again.event, BatchEvent::Replayed));
    assert_eq!(again.confirm.unwrap(), confirm);

    // Forged tag from an unauthenticated submitter: not accepted, not logged.
    let forged_s = members[1].respond(&ch, b"", &mut f.rng);
    let forged_tag = [9u8; 16];
    let forged = Direct::new(
        &DirectInner::Response(crate::protocol::wire::Response::from_entry(
            forged_s.entry.clone(),
            G,
            round.round,
            forged_tag,
        )),
        aggregate([&forged_tag]),
    );
    let out = call(&mut f, &forged, &mut round).unwrap();
    assert_eq!(out.outcome, Outcome::UnverifiedViaGateway);
    assert!(out.confirm.is_none());
    // The honest one still gets through afterwards.
    let honest = Direct::new(
        &DirectInner::Response(crate::protocol::wire::Response::from_entry(
            forged_s.entry.clone(),
            G,
            round.round,
            forged_s.tag,
        )),
        aggregate([&forged_s.tag]),
    );
    assert_eq!(
        call(&mut f, &honest, &mut round).unwrap().outcome,
        Outcome::Accepted
    );
    // An aggregate that is not over the message's own tag is refused.
    let bad = Direct {
        aggregate: [0; 16],
        ..honest
    };
    assert_eq!(
        call(&mut f, &bad, &mut round).unwrap_err(),
        VerifierError::Peer(BatchError::DirectAggregate)
    );
}

#[test]
fn verifier_debug_is_redacted() {
    let f = Fixture::new();
    let text = format!("{:?}", f.verifier);
    assert!(text.contains("redacted"), "{text}");
    let text = format!("{:?}", f.group);
    assert!(text.contains("redacted"), "{text}");
}

// ---------------------------------------------------------------------------
// Sessions, uplinks and acks
// ---------------------------------------------------------------------------

/// A member's side of a session, as far as the tests need it.
struct MemberSession {
    id: MemberId,
    keys: SessionKeys,
    gk: [u8; 16],
}

impl MemberSession {
    fn sid(&self) -> SessionId {
        SessionId(self.keys.sid)
    }

    /// Seals uplink `ctr` as a member does.
    fn uplink(&self, kind: UplinkKind, ctr: u64, payload: &[u8]) -> (UplinkEntry, [u8; 16]) {
        let aad = uplink_aad(kind, G, self.id, self.sid(), ctr);
        let mut c = payload.to_vec();
        let tag = Gcm::new(self.keys.k_up.expose()).seal_in_place(
            &uplink_nonce(&self.keys.iv_up, ctr),
            &aad,
            &mut c,
        );
        let entry = UplinkEntry {
            id: self.id,
            sid: self.sid(),
            kind,
            ctr,
            c: Bytes::from(c),
        };
        (entry, tag)
    }

    /// Opens a rekey for this session: the new group key.
    fn open_rekey(&self, r: &Rekey) -> Option<[u8; 16]> {
        let mut buf: [u8; 16] = r.c[..16].try_into().unwrap();
        let tag: [u8; 16] = r.c[16..].try_into().unwrap();
        Gcm::new(self.keys.k_down.expose())
            .open_in_place(&r.nonce, &r.aad(), &mut buf, &tag)
            .ok()?;
        Some(buf)
    }
}

/// Runs one round in `mode` for `members` and returns their sessions.
fn establish(f: &mut Fixture, members: &[TestMember], mode: Mode) -> Vec<MemberSession> {
    let (mut round, ch) = f.open(mode, Purpose::Auth);
    let challenge = Challenge::decode(&ch).unwrap();
    let sealed: Vec<Sealed> = members
        .iter()
        .map(|m| m.respond(&ch, b"", &mut f.rng))
        .collect();
    let refs: Vec<&Sealed> = sealed.iter().collect();
    let batch = f.batch(&round, &refs, 64);
    let (_, v) = responses(f.handle(&batch, Some(&mut round)));
    assert!(outcomes(&v.verdict).iter().all(|o| *o == Outcome::Accepted));
    sealed
        .iter()
        .zip(confirms(&v.verdict))
        .map(|(s, c)| {
            let keys = s.session(&challenge);
            let gk = open_confirm(c, &keys);
            MemberSession {
                id: s.entry.id,
                keys,
                gk,
            }
        })
        .collect()
}

impl Fixture {
    fn uplink_batch(&mut self, items: &[(UplinkEntry, [u8; 16])], chunk: u16) -> Batch {
        let mut sorted = items.to_vec();
        sorted.sort_by_key(|(e, _)| e.sort_key());
        let tags: Vec<[u8; 16]> = sorted.iter().map(|(_, t)| *t).collect();
        let batch_id = self.next_batch;
        self.next_batch += 1;
        Batch {
            gateway_id: GatewayId::new("gw-1").unwrap(),
            batch_id,
            group: G,
            chunk_size: chunk,
            body: BatchBody::Uplinks {
                entries: sorted.into_iter().map(|(e, _)| e).collect(),
            },
            aggregates: tags.chunks(usize::from(chunk)).map(aggregate).collect(),
        }
    }
}

fn uplinks(out: BatchOutput) -> UplinkVerdict {
    match out.event {
        BatchEvent::Uplinks(v) => v,
        other => panic!("expected an uplink verdict, got {other:?}"),
    }
}

fn sorted_tags(items: &[(UplinkEntry, [u8; 16])], chunk: usize, k: usize) -> ChunkTags {
    let mut sorted = items.to_vec();
    sorted.sort_by_key(|(e, _)| e.sort_key());
    ChunkTags {
        chunk: k as u32,
        tags: sorted
            .iter()
            .skip(k * chunk)
            .take(chunk)
            .map(|(_, t)| *t)
            .collect(),
    }
}

#[test]
fn uplinks_are_accepted_decrypted_and_promote_the_pending_session() {
    let mut f = Fixture::new();
    let members = f.members(1..=3);
    let s = establish(&mut f, &members, Mode::Psk);
    let items = vec![
        s[0].uplink(UplinkKind::Reading, 1, b"r1"),
        s[0].uplink(UplinkKind::Alarm, 2, b"door open"),
        s[2].uplink(UplinkKind::Reading, 1, b"r3"),
    ];
    let batch = f.uplink_batch(&items, 2);
    let v = uplinks(f.handle(&batch, None));
    assert_eq!(outcomes(&v.verdict), [Outcome::Accepted; 3]);
    assert!(confirms(&v.verdict).is_empty());
    let got: Vec<_> = v
        .messages
        .iter()
        .map(|m| (m.id, m.kind, m.ctr, m.payload.clone()))
        .collect();
    assert_eq!(
        got,
        [
            (MemberId(1), UplinkKind::Reading, 1, b"r1".to_vec()),
            (MemberId(1), UplinkKind::Alarm, 2, b"door open".to_vec()),
            (MemberId(3), UplinkKind::Reading, 1, b"r3".to_vec()),
        ]
    );
    assert_eq!(v.touched, [MemberId(1), MemberId(3)]);
    let slot = f.sessions.get(G, MemberId(1)).unwrap();
    assert_eq!(slot.current.as_ref().unwrap().sid, s[0].sid());
    assert!(slot.pending.is_none());
    assert_eq!(slot.current.as_ref().unwrap().window.top, 2);
    // Member 2 sent nothing: its session stays pending.
    assert!(f.sessions.get(G, MemberId(2)).unwrap().pending.is_some());
}

#[test]
fn replay_window_sets_aside_duplicates_and_old_counters_and_only_accepted_advance_it() {
    let mut f = Fixture::new();
    let members = f.members(1..=1);
    let s = establish(&mut f, &members, Mode::Psk);
    let first = vec![s[0].uplink(UplinkKind::Reading, 100, b"a")];
    let b = f.uplink_batch(&first, 8);
    assert_eq!(
        outcomes(&uplinks(f.handle(&b, None)).verdict),
        [Outcome::Accepted]
    );

    // The same uplink again (a new batch id): replayed, no effect.
    let b = f.uplink_batch(&first, 8);
    let v = uplinks(f.handle(&b, None));
    assert_eq!(outcomes(&v.verdict), [Outcome::ReplayedCounter]);
    assert!(v.messages.is_empty() && v.touched.is_empty());

    // 36 = 100 - 64 is too old; 37 is inside the window and fresh.
    let items = vec![
        s[0].uplink(UplinkKind::Reading, 36, b"old"),
        s[0].uplink(UplinkKind::Reading, 37, b"late"),
    ];
    let b = f.uplink_batch(&items, 8);
    let v = uplinks(f.handle(&b, None));
    assert_eq!(
        outcomes(&v.verdict),
        [Outcome::ReplayedCounter, Outcome::Accepted]
    );

    // A forged entry at ctr 101 does not advance the window: the honest
    // 101 is still accepted afterwards.
    let (mut forged, tag) = s[0].uplink(UplinkKind::Reading, 101, b"x");
    forged.c = Bytes::from_static(b"y");
    let items = vec![(forged, tag)];
    let b = f.uplink_batch(&items, 8);
    assert_eq!(tags_requested(&f.handle(&b, None)), [0]);
    let v = uplinks(f.reply(&b, vec![sorted_tags(&items, 8, 0)], None));
    assert_eq!(outcomes(&v.verdict), [Outcome::UnverifiedViaGateway]);
    let honest = vec![s[0].uplink(UplinkKind::Reading, 101, b"x")];
    let b = f.uplink_batch(&honest, 8);
    assert_eq!(
        outcomes(&uplinks(f.handle(&b, None)).verdict),
        [Outcome::Accepted]
    );
    let w = f
        .sessions
        .get(G, MemberId(1))
        .unwrap()
        .current
        .as_ref()
        .unwrap()
        .window;
    assert_eq!(w.top, 101);
}

#[test]
fn unknown_sessions_and_moved_uplinks_are_localized_and_not_accepted() {
    let mut f = Fixture::new();
    let members = f.members(1..=2);
    let s = establish(&mut f, &members, Mode::Psk);
    // Member 1's uplink relabelled as member 2's (same sid bytes), and an
    // uplink under a sid V never issued.
    let (mut moved, moved_tag) = s[0].uplink(UplinkKind::Reading, 1, b"m");
    moved.id = MemberId(2);
    let (mut unknown, unknown_tag) = s[1].uplink(UplinkKind::Reading, 2, b"u");
    unknown.sid = SessionId([0xFF; 8]);
    let honest = s[1].uplink(UplinkKind::Reading, 1, b"h");
    let items = vec![(moved, moved_tag), honest, (unknown, unknown_tag)];
    let b = f.uplink_batch(&items, 8);
    assert_eq!(tags_requested(&f.handle(&b, None)), [0]);
    let v = uplinks(f.reply(&b, vec![sorted_tags(&items, 8, 0)], None));
    let mut by_entry: Vec<(MemberId, SessionId, Outcome)> = match &b.body {
        BatchBody::Uplinks { entries } => entries
            .iter()
            .zip(outcomes(&v.verdict))
            .map(|(e, o)| (e.id, e.sid, *o))
            .collect(),
        _ => unreachable!(),
    };
    let mut expected = vec![
        (MemberId(2), s[0].sid(), Outcome::UnknownSession),
        (MemberId(2), s[1].sid(), Outcome::Accepted),
        (MemberId(2), SessionId([0xFF; 8]), Outcome::UnknownSession),
    ];
    by_entry.sort_by_key(|(id, sid, _)| (*id, *sid));
    expected.sort_by_key(|(id, sid, _)| (*id, *sid));
    assert_eq!(by_entry, expected);
    assert_eq!(v.messages.len(), 1);
    assert_eq!(v.messages[0].payload, b"h");
}

#[test]
fn previous_session_is_kept_until_the_new_one_is_first_used() {
    let mut f = Fixture::new();
    let members = f.members(1..=1);
    let old = establish(&mut f, &members, Mode::Psk).remove(0);
    let b = f.uplink_batch(&[old.uplink(UplinkKind::Reading, 1, b"o1")], 8);
    assert_eq!(
        outcomes(&uplinks(f.handle(&b, None)).verdict),
        [Outcome::Accepted]
    );
    // A new round; the member may or may not have opened the confirm.
    let new = establish(&mut f, &members, Mode::Psk).remove(0);
    let b = f.uplink_batch(&[old.uplink(UplinkKind::Reading, 2, b"o2")], 8);
    assert_eq!(
        outcomes(&uplinks(f.handle(&b, None)).verdict),
        [Outcome::Accepted]
    );
    // Old and new in one batch: both accepted, then the new one is current.
    let items = vec![
        old.uplink(UplinkKind::Reading, 3, b"o3"),
        new.uplink(UplinkKind::Reading, 1, b"n1"),
    ];
    let b = f.uplink_batch(&items, 8);
    assert_eq!(
        outcomes(&uplinks(f.handle(&b, None)).verdict),
        [Outcome::Accepted; 2]
    );
    let slot = f.sessions.get(G, MemberId(1)).unwrap();
    assert_eq!(slot.current.as_ref().unwrap().sid, new.sid());
    assert!(slot.pending.is_none());
    // From now on the old session is gone.
    let b = f.uplink_batch(&[old.uplink(UplinkKind::Reading, 4, b"o4")], 8);
    let v = uplinks(f.handle(&b, None));
    assert_eq!(outcomes(&v.verdict), [Outcome::UnknownSession]);
}

/// Checks a group message as a member would and returns its plaintext.
fn open_group_message(f: &Fixture, bytes: &Bytes, gk: &[u8; 16]) -> Option<Vec<u8>> {
    let m = GroupMessage::decode(bytes).unwrap();
    let mut signed = b"dapgw v1 group message".to_vec();
    signed.extend_from_slice(&bytes[..bytes.len() - 64]);
    f.online.verify(&signed, &m.signature).ok()?;
    let (ct, tag) = m.c.split_at(m.c.len() - 16);
    let mut buf = ct.to_vec();
    Gcm::new(gk)
        .open_in_place(&m.nonce, &m.aad(), &mut buf, tag.try_into().unwrap())
        .ok()?;
    Some(buf)
}

#[test]
fn group_messages_are_signed_sealed_under_gk_and_acks_are_accounted() {
    let mut f = Fixture::new();
    let members = f.members(1..=3);
    let s = establish(&mut f, &members, Mode::Psk);
    let bytes = f
        .verifier
        .group_message(&mut f.group, b"tariff=2", 50, &mut f.rng)
        .unwrap();
    let m = GroupMessage::decode(&bytes).unwrap();
    assert_eq!(
        (m.group, m.epoch, m.seq, m.key_id),
        (G, f.group.epoch, 1, 5)
    );
    assert_eq!(f.group.latest_seq, 1);
    // Challenges announce the hash of the whole message, which the gateway
    // sees anyway; a hash of the payload would let it test guesses.
    assert_eq!(
        f.group.config_hash,
        <[u8; 32]>::from(Sha256::digest(&bytes))
    );
    assert_ne!(
        f.group.config_hash,
        <[u8; 32]>::from(Sha256::digest(b"tariff=2"))
    );
    assert_eq!(
        open_group_message(&f, &bytes, &s[0].gk).unwrap(),
        b"tariff=2"
    );
    let second = f
        .verifier
        .group_message(&mut f.group, b"tariff=3", 50, &mut f.rng)
        .unwrap();
    let m2 = GroupMessage::decode(&second).unwrap();
    assert_eq!(m2.seq, 2);
    assert_ne!(m2.nonce, m.nonce, "fresh random nonce under GK_e");

    let ack = |seq: u64, hash: [u8; 32]| {
        AckPayload {
            group: G,
            epoch: f.group.epoch,
            seq,
            message_hash: hash,
        }
        .to_array()
    };
    let h1: [u8; 32] = Sha256::digest(&bytes).into();
    let h2: [u8; 32] = Sha256::digest(&second).into();
    let items = vec![
        s[0].uplink(UplinkKind::Ack, 1, &ack(1, h1)),
        s[0].uplink(UplinkKind::Ack, 2, &ack(2, h2)),
        s[1].uplink(UplinkKind::Ack, 1, &ack(1, h1)),
        // Wrong hash, unknown seq, not 52 bytes.
        s[2].uplink(UplinkKind::Ack, 1, &ack(1, h2)),
        s[2].uplink(UplinkKind::Ack, 2, &ack(9, h1)),
        s[2].uplink(UplinkKind::Ack, 3, b"short"),
    ];
    let b = f.uplink_batch(&items, 4);
    let v = uplinks(f.handle(&b, None));
    use Outcome::*;
    assert_eq!(
        outcomes(&v.verdict),
        [
            Accepted,
            Accepted,
            Accepted,
            MalformedPayload,
            MalformedPayload,
            MalformedPayload
        ]
    );
    let mut ledger = AckLedger::new();
    ledger.record(&v.acks);
    ledger.record(&v.acks);
    let ids = |seq| {
        ledger
            .acked(G, seq)
            .unwrap()
            .iter()
            .copied()
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(1), [MemberId(1), MemberId(2)]);
    assert_eq!(ids(2), [MemberId(1)]);
    assert!(ledger.acked(G, 3).is_none());
    assert!(v.messages.is_empty(), "acks are not readings");

    let too_big = vec![0u8; crate::protocol::wire::MAX_GROUP_PAYLOAD + 1];
    assert!(matches!(
        f.verifier
            .group_message(&mut f.group, &too_big, 1, &mut f.rng),
        Err(UsageError::PayloadTooLong(_))
    ));
}

#[test]
fn revocation_rekeys_the_others_and_locks_the_revoked_member_out() {
    let mut f = Fixture::new();
    let members = f.members(1..=3);
    let s = establish(&mut f, &members, Mode::Psk);
    let old_gk = *f.group.gk.expose();
    let old_epoch = f.group.epoch;
    assert!(s.iter().all(|m| m.gk == old_gk));

    let rekeys = f
        .verifier
        .revoke(&mut f.group, MemberId(2), &mut f.sessions, &mut f.rng)
        .unwrap();
    f.registry.get_mut(MemberId(2)).unwrap().status = MemberStatus::Revoked;
    assert_eq!(f.group.epoch, old_epoch + 1);
    assert_ne!(f.group.gk.expose(), &old_gk, "GK_e dropped");
    assert!(f.sessions.get(G, MemberId(2)).is_none());
    let ids: Vec<_> = rekeys.iter().map(|r| r.id).collect();
    assert_eq!(ids, [MemberId(1), MemberId(3)]);
    for (r, m) in rekeys.iter().zip([&s[0], &s[2]]) {
        assert_eq!(r.new_epoch, old_epoch + 1);
        assert_eq!(r.down_ctr, 1);
        assert_eq!(r.sid, m.sid());
        assert_eq!(&m.open_rekey(r).unwrap(), f.group.gk.expose());
        // The revoked member's k_down opens none of them.
        assert!(s[1].open_rekey(r).is_none());
        let slot = f.sessions.get(G, m.id).unwrap();
        assert_eq!(
            slot.pending.as_ref().unwrap().down_ctr,
            1,
            "down_ctr persisted"
        );
        assert_eq!(Rekey::decode(&r.to_bytes()).unwrap(), *r);
    }
    // Forward secrecy of the group: later messages are under GK_{e+1}.
    let later = f
        .verifier
        .group_message(&mut f.group, b"after revocation", 99, &mut f.rng)
        .unwrap();
    assert_eq!(GroupMessage::decode(&later).unwrap().epoch, old_epoch + 1);
    assert!(open_group_message(&f, &later, &s[1].gk).is_none());
    let new_gk = s[0].open_rekey(&rekeys[0]).unwrap();
    assert_eq!(
        open_group_message(&f, &later, &new_gk).unwrap(),
        b"after revocation"
    );
    // The revoked member's responses are set aside from now on.
    let (mut round, ch) = f.open(Mode::Psk, Purpose::Auth);
    let r = members[1].respond(&ch, b"", &mut f.rng);
    let b = f.batch(&round, &[&r], 4);
    let (_, v) = responses(f.handle(&b, Some(&mut round)));
    assert_eq!(outcomes(&v.verdict), [Outcome::Revoked]);
    // Its old session no longer verifies uplinks.
    let b = f.uplink_batch(&[s[1].uplink(UplinkKind::Reading, 1, b"x")], 4);
    assert_eq!(
        outcomes(&uplinks(f.handle(&b, None)).verdict),
        [Outcome::UnknownSession]
    );
}

#[test]
fn a_new_member_cannot_read_earlier_group_messages() {
    let mut f = Fixture::new();
    let members = f.members(1..=2);
    let s = establish(&mut f, &members[..1], Mode::Psk);
    let before = f
        .verifier
        .group_message(&mut f.group, b"before join", 10, &mut f.rng)
        .unwrap();
    // Member 2 joins: new epoch first, then its first round.
    let rekeys = f
        .verifier
        .add_member(&mut f.group, &mut f.sessions, &mut f.rng)
        .unwrap();
    assert_eq!(rekeys.len(), 1);
    assert_eq!(&s[0].open_rekey(&rekeys[0]).unwrap(), f.group.gk.expose());
    let joined = establish(&mut f, &members[1..], Mode::Psk).remove(0);
    assert_eq!(&joined.gk, f.group.gk.expose());
    assert!(open_group_message(&f, &before, &joined.gk).is_none());
    assert_eq!(
        open_group_message(&f, &before, &s[0].gk).unwrap(),
        b"before join"
    );
    // Both sessions of a member with a pending one get the rekey: member 1
    // used its session (so it is current), then answered another round.
    let b = f.uplink_batch(&[s[0].uplink(UplinkKind::Reading, 1, b"u")], 4);
    assert_eq!(
        outcomes(&uplinks(f.handle(&b, None)).verdict),
        [Outcome::Accepted]
    );
    let _ = establish(&mut f, &members[..1], Mode::Psk);
    let rekeys = f
        .verifier
        .add_member(&mut f.group, &mut f.sessions, &mut f.rng)
        .unwrap();
    let for_1: Vec<_> = rekeys.iter().filter(|r| r.id == MemberId(1)).collect();
    assert_eq!(for_1.len(), 2);
    assert_ne!(for_1[0].nonce, for_1[1].nonce);
}

#[test]
fn key_update_needs_a_psk_ecdhe_session() {
    let mut f = Fixture::new();
    let members = f.members(1..=1);
    let record = f.registry.member(MemberId(1)).unwrap();
    let mut empty = SessionSlot::default();
    assert_eq!(
        f.verifier
            .key_update(&mut empty, &record, &mut f.rng)
            .unwrap_err(),
        UsageError::NoSession(MemberId(1))
    );
    let _ = establish(&mut f, &members, Mode::Psk);
    let slot = f.sessions.get_mut(G, MemberId(1)).unwrap();
    assert_eq!(
        f.verifier
            .key_update(slot, &record, &mut f.rng)
            .unwrap_err(),
        UsageError::KeyUpdateNeedsEcdhe(MemberId(1))
    );
    assert_eq!(
        slot.pending.as_ref().unwrap().down_ctr,
        0,
        "nothing changed"
    );

    let s = establish(&mut f, &members, Mode::PskEcdhe).remove(0);
    let slot = f.sessions.get_mut(G, MemberId(1)).unwrap();
    let issued = f.verifier.key_update(slot, &record, &mut f.rng).unwrap();
    assert_eq!(issued.updates.len(), 1);
    let u: KeyUpdate = issued.updates[0];
    assert_eq!(
        (u.id, u.sid, u.new_kv, u.down_ctr),
        (MemberId(1), s.sid(), 2, 1)
    );
    let mut buf: [u8; 32] = u.c[..32].try_into().unwrap();
    let tag: [u8; 16] = u.c[32..].try_into().unwrap();
    Gcm::new(s.keys.k_down.expose())
        .open_in_place(&u.nonce, &u.aad(), &mut buf, &tag)
        .unwrap();
    assert_eq!(&buf, TestMember::derived(1, 2).key.expose());
    assert_eq!((issued.record.kv, issued.record.min_kv), (2, 1));
    assert_eq!(slot.pending.as_ref().unwrap().down_ctr, 1);
}

#[test]
fn after_restore_raises_counters_and_draws_a_new_group_key() {
    let mut f = Fixture::new();
    let members = f.members(1..=1);
    let _ = establish(&mut f, &members, Mode::Psk);
    let _ = f.verifier.group_message(&mut f.group, b"c", 1, &mut f.rng);
    let before = f.group.clone();
    f.group.after_restore(&mut f.rng).unwrap();
    f.sessions.drop_group(G);
    assert_eq!(f.group.next_round, before.next_round + (1 << 32));
    assert_eq!(f.group.epoch, before.epoch + (1 << 32));
    assert_eq!(f.group.latest_seq, before.latest_seq + (1 << 32));
    assert_ne!(f.group.gk, before.gk);
    assert!(f.sessions.is_empty());
    let (round, _) = f.open(Mode::PskEcdhe, Purpose::Auth);
    assert_eq!(round.round, before.next_round + (1 << 32));
}

#[test]
fn after_restore_refuses_counters_that_would_overflow() {
    let mut rng = TestRng(3);
    for field in 0..3 {
        let mut g = GroupState::new(G, &mut rng);
        match field {
            0 => g.next_round = u64::MAX - 5,
            1 => g.epoch = u64::MAX - (1 << 32) + 1,
            _ => g.latest_seq = u64::MAX,
        }
        let before = g.clone();
        assert_eq!(g.after_restore(&mut rng), Err(UsageError::CounterExhausted));
        // Nothing changed, the key included.
        assert_eq!(
            (g.next_round, g.epoch, g.latest_seq),
            (before.next_round, before.epoch, before.latest_seq)
        );
        assert_eq!(g.gk.expose(), before.gk.expose());
    }
    let mut g = GroupState::new(G, &mut rng);
    g.epoch = u64::MAX - (1 << 32);
    assert_eq!(g.after_restore(&mut rng), Ok(()));
    assert_eq!(g.epoch, u64::MAX);
}

#[test]
fn a_group_starting_above_a_floor_opens_its_first_round_above_it() {
    let mut f = Fixture::new();
    let floor = 3 << 32;
    f.group = GroupState::starting_above(G, floor, &mut f.rng).unwrap();
    assert_eq!(
        (f.group.epoch, f.group.latest_seq),
        (floor + 1, floor),
        "epoch above the floor, no message yet"
    );
    let (round, _) = f.open(Mode::PskEcdhe, Purpose::Auth);
    assert_eq!(round.round, floor + 1);
    let zero = GroupState::starting_above(G, 0, &mut f.rng).unwrap();
    assert_eq!((zero.next_round, zero.epoch, zero.latest_seq), (1, 1, 0));
    assert_eq!(
        GroupState::starting_above(G, u64::MAX, &mut f.rng).map(|_| ()),
        Err(UsageError::CounterExhausted)
    );
}

#[test]
fn direct_uplink_is_checked_like_a_batch_of_one() {
    let mut f = Fixture::new();
    let members = f.members(1..=1);
    let s = establish(&mut f, &members, Mode::Psk).remove(0);
    let (entry, tag) = s.uplink(UplinkKind::Reading, 1, b"direct");
    let up = crate::protocol::wire::Uplink::from_entry(entry, G, tag);
    let direct = Direct::new(&DirectInner::Uplink(up), aggregate([&tag]));
    assert_eq!(
        direct_rate_key(&direct).unwrap(),
        RateKey::Uplink {
            id: MemberId(1),
            sid: s.sid(),
            ctr: 1
        }
    );
    let call = |f: &mut Fixture| {
        f.verifier
            .handle_direct(
                &direct,
                BatchState {
                    group: &f.group,
                    round: None,
                    sessions: &mut f.sessions,
                },
                &f.registry,
                &mut f.log,
                0,
            )
            .unwrap()
    };
    let out = call(&mut f);
    assert_eq!(out.outcome, Outcome::Accepted);
    let BatchEvent::Uplinks(v) = out.event else {
        panic!()
    };
    assert_eq!(v.messages[0].payload, b"direct");
    assert_eq!(call(&mut f).outcome, Outcome::ReplayedCounter);
}

#[test]
fn an_unused_pending_session_survives_a_newer_round_until_one_is_used() {
    let mut f = Fixture::new();
    let members = f.members(1..=2);
    // Round r: member 1 opens the confirm (S_r) but sends nothing.
    let s_r = establish(&mut f, &members, Mode::Psk).remove(0);
    // Round r+1: accepted again, but its confirm never reaches the member.
    let s_next = establish(&mut f, &members, Mode::Psk).remove(0);
    assert_ne!(s_r.sid(), s_next.sid());

    // A revocation reaches the member through S_r.
    let rekeys = f
        .verifier
        .revoke(&mut f.group, MemberId(2), &mut f.sessions, &mut f.rng)
        .unwrap();
    let for_r: Vec<_> = rekeys.iter().filter(|r| r.sid == s_r.sid()).collect();
    assert_eq!(for_r.len(), 1, "a rekey for S_r: {rekeys:?}");
    assert_eq!(&s_r.open_rekey(for_r[0]).unwrap(), f.group.gk.expose());

    // Its alarm under S_r is accepted, and makes S_r current; S_{r+1}
    // stays pending for a late confirm.
    let b = f.uplink_batch(&[s_r.uplink(UplinkKind::Alarm, 1, b"tamper")], 8);
    assert_eq!(
        outcomes(&uplinks(f.handle(&b, None)).verdict),
        [Outcome::Accepted]
    );
    let slot = f.sessions.get(G, MemberId(1)).unwrap();
    assert_eq!(slot.current.as_ref().unwrap().sid, s_r.sid());
    assert_eq!(slot.pending.as_ref().unwrap().sid, s_next.sid());
    let b = f.uplink_batch(&[s_next.uplink(UplinkKind::Reading, 1, b"n1")], 8);
    assert_eq!(
        outcomes(&uplinks(f.handle(&b, None)).verdict),
        [Outcome::Accepted]
    );
}

/// A store whose batch lookup is broken: records swapped or missing.
struct BrokenRegistry {
    inner: InMemoryRegistry,
    swap: bool,
}

impl Registry for BrokenRegistry {
    fn member(&self, id: MemberId) -> Option<MemberRecord> {
        self.inner.member(id)
    }

    fn members(&self, ids: &[MemberId]) -> Vec<Option<MemberRecord>> {
        let mut records: Vec<_> = ids.iter().map(|&id| self.inner.member(id)).collect();
        if self.swap {
            records.reverse();
        } else {
            records.pop();
        }
        records
    }
}

#[test]
fn a_registry_returning_the_wrong_records_never_substitutes_identities() {
    for swap in [true, false] {
        let mut f = Fixture::new();
        let members = f.members(1..=2);
        let (mut round, ch) = f.open(Mode::Psk, Purpose::Auth);
        // Swapped: member 2 seals a response under its own key but names
        // member 1, which the store would look up as member 2's record.
        // Missing: member 2's record is not returned at all.
        let first = if swap {
            let m2_as_1 = TestMember {
                id: MemberId(1),
                kv: 1,
                key: members[1].key.clone(),
            };
            m2_as_1.respond(&ch, b"", &mut f.rng)
        } else {
            members[0].respond(&ch, b"", &mut f.rng)
        };
        let second = members[1].respond(&ch, b"", &mut f.rng);
        let batch = f.batch(&round, &[&first, &second], 64);
        let registry = BrokenRegistry {
            inner: f.registry.clone(),
            swap,
        };
        let rb = ReceivedBatch::decode(batch.to_bytes()).unwrap();
        let out = f
            .verifier
            .handle_batch(
                &rb,
                BatchState {
                    group: &f.group,
                    round: Some(&mut round),
                    sessions: &mut f.sessions,
                },
                &registry,
                &mut f.log,
                1_000,
            )
            .unwrap();
        // Entries V cannot check fail their chunk: answer honestly.
        let out = if !matches!(out.event, BatchEvent::TagsRequested { .. }) {
            out
        } else {
            let reply = TagReply {
                gateway_id: batch.gateway_id,
                batch_id: batch.batch_id,
                batch_hash: Sha256::digest(batch.to_bytes()).into(),
                chunks: vec![all_tags(&[&first, &second], 64, 0)],
            };
            f.verifier
                .handle_tag_reply(
                    &reply,
                    BatchState {
                        group: &f.group,
                        round: Some(&mut round),
                        sessions: &mut f.sessions,
                    },
                    &registry,
                    &mut f.log,
                    1_000,
                )
                .unwrap()
        };
        let (_, v) = responses(out);
        let got = outcomes(&v.verdict).to_vec();
        if swap {
            assert_eq!(got, [Outcome::UnknownMember; 2]);
            assert!(round.accepted.is_empty());
        } else {
            assert_eq!(got, [Outcome::Accepted, Outcome::UnknownMember]);
        }
    }
}

#[test]
fn readings_and_uplink_messages_redact_their_payloads_in_debug() {
    let reading = Reading {
        id: MemberId(7),
        payload: b"kWh 4242".to_vec(),
    };
    let up = UplinkMessage {
        id: MemberId(7),
        sid: SessionId([1; 8]),
        kind: UplinkKind::Alarm,
        ctr: 3,
        payload: b"kWh 4242".to_vec(),
    };
    for s in [format!("{reading:?}"), format!("{up:?}")] {
        assert!(s.contains("MemberId(7)"), "{s}");
        assert!(s.contains("<8 bytes redacted>"), "{s}");
        assert!(!s.contains("4242") && !s.contains("107, 87"), "{s}");
    }
}
