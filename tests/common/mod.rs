//! An in-memory dapgw network for the protocol-level suites: real members
//! ([`Member`]), a real aggregator in the gateway's place, and a real
//! verifier with in-memory state, all on a virtual clock. Nothing here
//! checks anything; the test files make the assertions.
//!
//! The gateway is honest unless a test takes its output ([`ReadyBatch`],
//! tag replies, downlink bytes) and tampers with it before handing it on.
#![allow(dead_code)] // each test binary uses a different part

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dapgw::protocol::aggregator::{
    Aggregator, AggregatorConfig, Collected, KeptTags, ReadyBatch, RoundSpec, answer_tag_request,
};
use dapgw::protocol::keys::{
    MasterSecret, MemberCredential, MemberKeyDeriver, sign_key_certificate,
};
use dapgw::protocol::member::{Challenged, Confirmed, GroupUpdate, Member, MemberError};
use dapgw::protocol::suite::{SigningKey, aggregate};
use dapgw::protocol::verifier::{
    AckLedger, BatchEvent, BatchOutput, BatchState, GroupState, InMemoryRegistry,
    InMemoryVerdictLog, MemberRecord, ReceivedBatch, RoundState, SessionTable, Verifier,
    VerifierConfig, VerifierError,
};
use dapgw::protocol::wire::{
    Batch, BatchBody, Challenge, GatewayId, GroupId, KeyCertificate, MemberId, Mode, Outcome,
    Purpose, TagReply, UplinkKind, Verdict, VerdictBody,
};
use sha2::{Digest, Sha256};

/// A deterministic generator (SplitMix64) so every run is reproducible.
/// Never for real keys.
pub struct TestRng(pub u64);

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

/// Master secret of the test deployment.
pub const MS: [u8; 32] = [0x42; 32];
/// Online key id.
pub const KEY_ID: u32 = 5;
/// The verifier's clock (Unix seconds); rounds carry no `not_after`.
pub const NOW: u64 = 1_000_000;
/// How long a round stays open at the gateway.
pub const ROUND_WINDOW: Duration = Duration::from_secs(30);

/// The gateway id every batch carries.
pub fn gateway_id() -> GatewayId {
    GatewayId::new("gw-test").unwrap()
}

/// One meter: its credential, its state machine and its "flash".
pub struct Node {
    pub cred: MemberCredential,
    pub member: Member,
    /// The last state the member asked to persist.
    pub disk: Option<Vec<u8>>,
    /// The reading it reports in read rounds.
    pub reading: Vec<u8>,
}

impl Node {
    fn store(disk: &mut Option<Vec<u8>>, state: Option<&[u8]>) {
        if let Some(s) = state {
            *disk = Some(s.to_vec());
        }
    }

    /// Answers a challenge (persisting before the bytes come out), or re-sends
    /// the stored response for the same challenge.
    pub fn answer(&mut self, challenge: &[u8], rng: &mut TestRng) -> Result<Bytes, MemberError> {
        match self.member.handle_challenge(challenge, None)? {
            Challenged::Resend(bytes) => Ok(bytes),
            Challenged::Answer(answer) => {
                let payload = if answer.read_request().is_some() {
                    self.reading.clone()
                } else {
                    Vec::new()
                };
                let out = answer.respond(&payload, rng)?;
                Self::store(&mut self.disk, out.state());
                Ok(out.persisted())
            }
        }
    }

    /// Opens a confirm.
    pub fn confirm(&mut self, bytes: &[u8]) -> Result<Confirmed, MemberError> {
        let out = self.member.handle_confirm(bytes)?;
        Self::store(&mut self.disk, out.state());
        Ok(out.persisted())
    }

    /// Seals a reading or alarm.
    pub fn uplink(
        &mut self,
        group: GroupId,
        kind: UplinkKind,
        payload: &[u8],
    ) -> Result<Bytes, MemberError> {
        let out = self.member.seal_uplink(group, kind, payload)?;
        Self::store(&mut self.disk, out.state());
        Ok(out.persisted())
    }

    /// Applies a group message; returns the update and the ack uplink.
    pub fn group_message(&mut self, bytes: &[u8]) -> Result<(GroupUpdate, Bytes), MemberError> {
        let out = self.member.handle_group_message(bytes)?;
        let update = out.event().clone();
        Self::store(&mut self.disk, out.state());
        Ok((update, out.persisted()))
    }

    /// Applies a rekey; returns the new epoch.
    pub fn rekey(&mut self, bytes: &[u8]) -> Result<u64, MemberError> {
        let out = self.member.handle_rekey(bytes)?;
        Self::store(&mut self.disk, out.state());
        Ok(out.persisted().epoch)
    }

    /// Applies a key update; returns the new key version.
    pub fn key_update(&mut self, bytes: &[u8]) -> Result<u32, MemberError> {
        let out = self.member.handle_key_update(bytes)?;
        Self::store(&mut self.disk, out.state());
        Ok(out.persisted().kv)
    }

    /// Power cycle: the member comes back from what it last persisted.
    pub fn reboot(&mut self) {
        self.member = match &self.disk {
            Some(disk) => Member::restore(&self.cred, disk, &mut TestRng(99)).unwrap(),
            None => Member::new(&self.cred).unwrap(),
        };
    }

    /// The flash is wiped: the member starts again from its credential.
    pub fn lose_state(&mut self) {
        self.disk = None;
        self.member = Member::new(&self.cred).unwrap();
    }
}

/// The data center: the verifier and the state a UDC would keep in its store.
pub struct Udc {
    pub verifier: Verifier,
    pub registry: InMemoryRegistry,
    pub groups: BTreeMap<GroupId, GroupState>,
    pub rounds: BTreeMap<(GroupId, u64), RoundState>,
    pub sessions: SessionTable,
    pub log: InMemoryVerdictLog,
    pub acks: AckLedger,
    /// Group and round of every batch V has seen, to load state for a tag
    /// reply as the UDC service would.
    pub batches: BTreeMap<u64, (GroupId, Option<u64>)>,
    pub root_public: [u8; 32],
}

impl Udc {
    /// Judges a batch against the state it names.
    pub fn handle_batch(&mut self, bytes: Bytes) -> Result<BatchOutput, VerifierError> {
        let rb = ReceivedBatch::decode(bytes)?;
        let group = rb.batch().group;
        let round = rb.round();
        self.batches.insert(rb.batch().batch_id, (group, round));
        let out = {
            let gs = self.groups.get(&group).expect("batch for an unknown group");
            let rs = round.and_then(|r| self.rounds.get_mut(&(group, r)));
            self.verifier.handle_batch(
                &rb,
                BatchState {
                    group: gs,
                    round: rs,
                    sessions: &mut self.sessions,
                },
                &self.registry,
                &mut self.log,
                NOW,
            )?
        };
        self.apply(&out);
        Ok(out)
    }

    /// Finishes a batch with a gateway's tag reply.
    pub fn handle_tag_reply(&mut self, reply: &TagReply) -> Result<BatchOutput, VerifierError> {
        let (group, round) = self.batches[&reply.batch_id];
        let out = {
            let gs = &self.groups[&group];
            let rs = round.and_then(|r| self.rounds.get_mut(&(group, r)));
            self.verifier.handle_tag_reply(
                reply,
                BatchState {
                    group: gs,
                    round: rs,
                    sessions: &mut self.sessions,
                },
                &self.registry,
                &mut self.log,
                NOW,
            )?
        };
        self.apply(&out);
        Ok(out)
    }

    /// Finishes a batch whose tag request the gateway never answered.
    pub fn localization_expired(&mut self, batch_id: u64) -> Result<BatchOutput, VerifierError> {
        let (group, round) = self.batches[&batch_id];
        let gs = &self.groups[&group];
        let rs = round.and_then(|r| self.rounds.get_mut(&(group, r)));
        self.verifier.localization_expired(
            gateway_id(),
            batch_id,
            BatchState {
                group: gs,
                round: rs,
                sessions: &mut self.sessions,
            },
            &self.registry,
            &mut self.log,
            NOW,
        )
    }

    /// What the UDC service does with a final verdict besides sending it.
    fn apply(&mut self, out: &BatchOutput) {
        match &out.event {
            BatchEvent::Responses(v) => {
                for &(id, kv) in &v.kv_confirmed {
                    let rec = self.registry.get_mut(id).unwrap();
                    *rec = rec.after_kv_confirmed(kv);
                }
            }
            BatchEvent::Uplinks(v) => self.acks.record(&v.acks),
            BatchEvent::Replayed | BatchEvent::TagsRequested { .. } => {}
        }
    }
}

/// Everything, wired together on a virtual clock.
pub struct World {
    pub rng: TestRng,
    pub udc: Udc,
    pub gateway: Aggregator<()>,
    /// The gateway's batch-id counter (persisted, in a real gateway).
    pub next_batch_id: u64,
    /// Tags of batches awaiting a final verdict, by batch id.
    pub kept: BTreeMap<u64, KeptTags>,
    pub nodes: BTreeMap<u64, Node>,
    /// Which members attach to the gateway in each group.
    pub attached: BTreeMap<GroupId, Vec<MemberId>>,
    /// The gateway's clock.
    pub now: Instant,
    pub root: SigningKey,
}

impl World {
    /// A deployment with chunk size `chunk_size` at the gateway and no
    /// members yet.
    pub fn new(chunk_size: u16) -> Self {
        let mut rng = TestRng(7);
        let root = SigningKey::from_seed(&[1; 32]);
        let online = SigningKey::from_seed(&[2; 32]);
        let online_pub = online.verifying_key().to_bytes();
        let cert = KeyCertificate {
            key_id: KEY_ID,
            key_version: 1,
            public_key: online_pub,
            root_sig: sign_key_certificate(&root, KEY_ID, 1, &online_pub),
        };
        let verifier = Verifier::new(
            &MasterSecret::from_bytes(MS),
            online,
            KEY_ID,
            Some(cert),
            VerifierConfig::default(),
        );
        let config = AggregatorConfig {
            chunk_size,
            ..AggregatorConfig::new(gateway_id())
        };
        let root_public = root.verifying_key().to_bytes();
        let _ = &mut rng;
        Self {
            rng,
            udc: Udc {
                verifier,
                registry: InMemoryRegistry::new(),
                groups: BTreeMap::new(),
                rounds: BTreeMap::new(),
                sessions: SessionTable::new(),
                log: InMemoryVerdictLog::new(),
                acks: AckLedger::new(),
                batches: BTreeMap::new(),
                root_public,
            },
            gateway: Aggregator::new(config).unwrap(),
            next_batch_id: 1,
            kept: BTreeMap::new(),
            nodes: BTreeMap::new(),
            attached: BTreeMap::new(),
            now: Instant::now(),
            root,
        }
    }

    /// Creates group `g` at V.
    pub fn add_group(&mut self, g: u32) {
        let state = GroupState::new(GroupId(g), &mut self.rng);
        self.udc.groups.insert(GroupId(g), state);
    }

    /// Enrolls member `id` in `groups` (registry, credential, attachment).
    pub fn add_member(&mut self, id: u64, groups: &[u32]) {
        let gids: Vec<GroupId> = groups.iter().map(|&g| GroupId(g)).collect();
        self.udc
            .registry
            .insert(MemberRecord::derived(MemberId(id), 1, gids.clone()));
        let cred = MemberCredential {
            id,
            kv: 1,
            key: MemberKeyDeriver::new(&MasterSecret::from_bytes(MS)).member_key(id, 1),
            groups: groups.to_vec(),
            root_public_key: self.udc.root_public,
            min_online_key_version: 1,
        };
        let member = Member::new(&cred).unwrap();
        let reading = format!("meter {id}: 0042.{id} kWh").into_bytes();
        self.nodes.insert(
            id,
            Node {
                cred,
                member,
                disk: None,
                reading,
            },
        );
        for g in gids {
            self.attached.entry(g).or_default().push(MemberId(id));
        }
    }

    /// A world with groups `groups` and members `ids` in all of them.
    pub fn with_members(
        chunk_size: u16,
        groups: &[u32],
        ids: impl IntoIterator<Item = u64>,
    ) -> Self {
        let mut w = Self::new(chunk_size);
        for &g in groups {
            w.add_group(g);
        }
        for id in ids {
            w.add_member(id, groups);
        }
        w
    }

    pub fn node(&mut self, id: u64) -> &mut Node {
        self.nodes.get_mut(&id).expect("no such member")
    }

    /// V opens a round; the gateway relays it (expects the attached
    /// members). Returns the challenge bytes and the round number.
    pub fn open_round(&mut self, g: u32, mode: Mode, purpose: Purpose) -> (Bytes, u64) {
        let group = GroupId(g);
        let (rs, challenge) = self
            .udc
            .verifier
            .open_round(
                self.udc.groups.get_mut(&group).unwrap(),
                mode,
                purpose,
                None,
                &mut self.rng,
            )
            .unwrap();
        let round = rs.round;
        self.udc.rounds.insert((group, round), rs);
        let members = self.attached.get(&group).cloned().unwrap_or_default();
        self.gateway
            .expect(
                RoundSpec {
                    group,
                    round,
                    mode,
                    members,
                    deadline: self.now + ROUND_WINDOW,
                },
                self.now,
            )
            .unwrap();
        (challenge, round)
    }

    /// V closes a round (erasing `e_V`).
    pub fn close_round(&mut self, g: u32, round: u64) {
        self.udc
            .rounds
            .get_mut(&(GroupId(g), round))
            .unwrap()
            .close();
    }

    /// Member `id` answers `challenge`; the response bytes.
    pub fn answer(&mut self, id: u64, challenge: &[u8]) -> Result<Bytes, MemberError> {
        let node = self.nodes.get_mut(&id).expect("no such member");
        node.answer(challenge, &mut self.rng)
    }

    /// The gateway collects a member message.
    pub fn collect(&mut self, bytes: &Bytes) -> Collected {
        self.gateway.handle_bytes(bytes, (), self.now).unwrap()
    }

    /// Every member in `ids` answers and the gateway collects the answers.
    pub fn answer_all(&mut self, ids: &[u64], challenge: &[u8]) {
        for &id in ids {
            let r = self.answer(id, challenge).unwrap();
            self.collect(&r);
        }
    }

    /// Moves the gateway clock.
    pub fn advance(&mut self, by: Duration) {
        self.now += by;
    }

    /// Every batch the gateway cuts now, its tags kept.
    pub fn flush(&mut self) -> Vec<ReadyBatch<()>> {
        let mut out = Vec::new();
        let mut next = self.next_batch_id;
        while let Some(b) = self
            .gateway
            .poll_batch(self.now, &mut || {
                let id = next;
                next += 1;
                id
            })
            .unwrap()
        {
            self.kept.insert(b.batch_id, b.tags.clone());
            out.push(b);
        }
        self.next_batch_id = next;
        out
    }

    /// Waits out every linger and round deadline, then flushes.
    pub fn flush_all(&mut self) -> Vec<ReadyBatch<()>> {
        self.advance(ROUND_WINDOW + Duration::from_secs(1));
        self.flush()
    }

    /// Sends batch bytes to V and, if V asks for tags, answers honestly from
    /// the kept tags. Returns every answer V gave (the last one is final).
    pub fn submit(&mut self, bytes: Bytes) -> Result<Vec<BatchOutput>, VerifierError> {
        let first = self.udc.handle_batch(bytes)?;
        let mut outs = vec![first];
        while let Some(verdict) = tag_request(&outs[outs.len() - 1]) {
            let kept = &self.kept[&verdict.batch_id];
            let reply = answer_tag_request(kept, &verdict).unwrap();
            outs.push(self.udc.handle_tag_reply(&reply)?);
        }
        Ok(outs)
    }

    /// Submits a batch and returns its final verdict.
    pub fn submit_final(&mut self, bytes: Bytes) -> Verdict {
        let outs = self.submit(bytes).unwrap();
        final_verdict(outs.last().unwrap())
    }

    /// Delivers every confirm of a final verdict to its member; the result
    /// per member.
    pub fn deliver_confirms(
        &mut self,
        verdict: &Verdict,
    ) -> BTreeMap<u64, Result<Confirmed, MemberError>> {
        let VerdictBody::Final { confirms, .. } = &verdict.body else {
            panic!("not a final verdict");
        };
        confirms
            .iter()
            .map(|c| (c.id.0, self.node(c.id.0).confirm(&c.to_bytes())))
            .collect()
    }

    /// A complete honest round: challenge, answers from `ids`, batches,
    /// verdicts, confirms. Returns the accepted members and the round.
    pub fn full_round(
        &mut self,
        g: u32,
        mode: Mode,
        purpose: Purpose,
        ids: &[u64],
    ) -> (Vec<u64>, u64) {
        let (challenge, round) = self.open_round(g, mode, purpose);
        self.answer_all(ids, &challenge);
        let mut accepted = Vec::new();
        for b in self.flush_all() {
            let verdict = self.submit_final(b.bytes.clone());
            for (id, r) in self.deliver_confirms(&verdict) {
                r.unwrap();
                accepted.push(id);
            }
        }
        accepted.sort();
        (accepted, round)
    }
}

/// The verdict inside a batch answer.
pub fn verdict_of(out: &BatchOutput) -> Verdict {
    Verdict::decode(&out.answer).unwrap()
}

/// The tag request in a batch answer, if it is one.
pub fn tag_request(out: &BatchOutput) -> Option<Verdict> {
    let v = verdict_of(out);
    matches!(v.body, VerdictBody::TagsRequested { .. }).then_some(v)
}

/// The final verdict in a batch answer (panics on a tag request).
pub fn final_verdict(out: &BatchOutput) -> Verdict {
    let v = verdict_of(out);
    assert!(
        matches!(v.body, VerdictBody::Final { .. }),
        "not final: {v:?}"
    );
    v
}

/// Each entry's outcome, keyed by the entry's member id (response batches)
/// or `(id, ctr)` packed as `id << 32 | ctr` (uplink batches; small ids and
/// counters in tests: a member restored from its state counts above 2^32,
/// so read such counters from the batch).
pub fn outcomes(batch: &Bytes, verdict: &Verdict) -> BTreeMap<u64, Outcome> {
    let batch = Batch::decode(batch).unwrap();
    let VerdictBody::Final { outcomes, .. } = &verdict.body else {
        panic!("not a final verdict");
    };
    let keys: Vec<u64> = match &batch.body {
        BatchBody::Responses { entries, .. } => entries.iter().map(|e| e.id.0).collect(),
        BatchBody::Uplinks { entries } => entries.iter().map(|e| e.id.0 << 32 | e.ctr).collect(),
    };
    assert_eq!(keys.len(), outcomes.len());
    keys.into_iter().zip(outcomes.iter().copied()).collect()
}

/// The member ids whose entry was accepted.
pub fn accepted(batch: &Bytes, verdict: &Verdict) -> Vec<u64> {
    outcomes(batch, verdict)
        .into_iter()
        .filter(|(_, o)| *o == Outcome::Accepted)
        .map(|(k, _)| k)
        .collect()
}

/// What a (dishonest) gateway does to send a batch it altered: recompute the
/// aggregates over `tags`, encode, and keep `tags` for tag requests.
pub fn reseal(batch: &Batch, tags: &[[u8; 16]]) -> (Bytes, KeptTags) {
    let mut batch = batch.clone();
    batch.aggregates = tags
        .chunks(usize::from(batch.chunk_size))
        .map(aggregate)
        .collect();
    let bytes = batch.to_bytes();
    let kept = KeptTags {
        gateway_id: batch.gateway_id,
        batch_id: batch.batch_id,
        batch_hash: Sha256::digest(&bytes).into(),
        chunk_size: batch.chunk_size,
        tags: tags.to_vec(),
    };
    (bytes, kept)
}

/// The decoded challenge.
pub fn challenge(bytes: &Bytes) -> Challenge {
    Challenge::decode(bytes).unwrap()
}
