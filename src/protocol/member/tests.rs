//! Unit tests of the member state machine. The verifier is played by
//! [`TestV`], built from `suite`, `keys` and `wire` directly, so these tests
//! also cross-check the member against the key schedule.

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::*;
use crate::protocol::keys::{SessionKeys, sign_key_certificate};
use crate::protocol::suite::{EphemeralKeyPair, Key16, SigningKey};
use crate::protocol::wire::{KeyCertificate, Purpose};

/// A deterministic generator for reproducible tests: SHA-256 in counter
/// mode over a seed.
struct TestRng {
    seed: u8,
    ctr: u64,
}

impl TestRng {
    fn new(seed: u8) -> Self {
        Self { seed, ctr: 0 }
    }
}

impl rand_core::TryRng for TestRng {
    type Error = core::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut b = [0u8; 4];
        self.try_fill_bytes(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut b = [0u8; 8];
        self.try_fill_bytes(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        for chunk in dst.chunks_mut(32) {
            self.ctr += 1;
            let block = Sha256::new()
                .chain_update([self.seed])
                .chain_update(self.ctr.to_be_bytes())
                .finalize();
            chunk.copy_from_slice(&block[..chunk.len()]);
        }
        Ok(())
    }
}
impl rand_core::TryCryptoRng for TestRng {}

const G: GroupId = GroupId(7);
const G2: GroupId = GroupId(8);
const ID: u64 = 1001;

fn member_key(id: u64, kv: u32) -> MemberKey {
    let mut b = [0u8; 32];
    b[..8].copy_from_slice(&id.to_be_bytes());
    b[8..12].copy_from_slice(&kv.to_be_bytes());
    b[31] = 0x5A;
    MemberKey::from_bytes(b)
}

/// The verifier's side, by hand.
struct TestV {
    root: SigningKey,
    online: SigningKey,
    key_id: u32,
    key_version: u32,
    rng: TestRng,
}

/// A challenge before signing, with the test's defaults.
fn challenge(group: GroupId, round: u64) -> Challenge {
    Challenge {
        group,
        round,
        epoch: 1,
        nonce_v: [round as u8; 16],
        e_v: None,
        purpose: Purpose::Auth,
        group_seq: 0,
        config_hash: [0; 32],
        not_after: None,
        key_cert: None,
        key_id: 0,
        signature: [0; 64],
    }
}

impl TestV {
    fn new() -> Self {
        Self {
            root: SigningKey::from_seed(&[0x01; 32]),
            online: SigningKey::from_seed(&[0x02; 32]),
            key_id: 10,
            key_version: 1,
            rng: TestRng::new(0xEE),
        }
    }

    fn credential(&self, id: u64, groups: &[u32]) -> MemberCredential {
        MemberCredential {
            id,
            kv: 1,
            key: member_key(id, 1),
            groups: groups.to_vec(),
            root_public_key: self.root.verifying_key().to_bytes(),
            min_online_key_version: 0,
        }
    }

    fn cert(&self) -> KeyCertificate {
        let public_key = self.online.verifying_key().to_bytes();
        KeyCertificate {
            key_id: self.key_id,
            key_version: self.key_version,
            public_key,
            root_sig: sign_key_certificate(&self.root, self.key_id, self.key_version, &public_key),
        }
    }

    /// Signs `ch` with the online key (carrying its certificate).
    fn sign(&self, mut ch: Challenge) -> Bytes {
        ch.key_cert = Some(self.cert());
        self.sign_as_is(ch)
    }

    /// Signs `ch` with the online key, certificate and key id as given.
    fn sign_as_is(&self, mut ch: Challenge) -> Bytes {
        if ch.key_id == 0 {
            ch.key_id = self.key_id;
        }
        ch.signature = self.online.sign(&ch.signed_bytes());
        ch.to_bytes()
    }

    /// Checks a response as V would (tag under K_i) and derives the session.
    fn accept(
        &self,
        ch_bytes: &Bytes,
        resp_bytes: &Bytes,
        key: &MemberKey,
        e_v: Option<&EphemeralKeyPair>,
    ) -> (Response, Vec<u8>, SessionKeys) {
        let resp = Response::decode(resp_bytes).unwrap();
        let ch_hash: [u8; 32] = Sha256::digest(ch_bytes).into();
        let th = transcript_hash(&ch_hash, resp.id.0, resp.kv, &resp.n_i, resp.e_i.as_ref());
        let (rk, prk0) = response_keys(key, &th);
        let mut plain = resp.c.to_vec();
        Gcm::new(rk.k_resp.expose())
            .open_in_place(rk.iv_resp.expose(), &th, &mut plain, &resp.tag)
            .expect("response tag verifies under K_i");
        let dh = e_v.map(|e| e.diffie_hellman(&resp.e_i.unwrap()).unwrap());
        let keys = session_keys(&prk0, dh.as_ref());
        (resp, plain, keys)
    }

    fn confirm(
        &self,
        group: GroupId,
        round: u64,
        epoch: u64,
        id: u64,
        keys: &SessionKeys,
        gk: &[u8; 16],
    ) -> Bytes {
        let mut c = Confirm {
            group,
            round,
            epoch,
            id: MemberId(id),
            sid: SessionId(keys.sid),
            w: [0; 32],
        };
        let mut buf = *gk;
        let tag =
            Gcm::new(keys.k_conf.expose()).seal_in_place(keys.iv_conf.expose(), &c.aad(), &mut buf);
        c.w[..16].copy_from_slice(&buf);
        c.w[16..].copy_from_slice(&tag);
        c.to_bytes()
    }

    fn group_message(
        &mut self,
        group: GroupId,
        epoch: u64,
        seq: u64,
        valid_through_round: u64,
        gk: &[u8; 16],
        payload: &[u8],
    ) -> Bytes {
        let mut nonce = [0u8; 12];
        rand_core::Rng::fill_bytes(&mut self.rng, &mut nonce);
        let mut m = GroupMessage {
            group,
            epoch,
            seq,
            valid_through_round,
            nonce,
            c: Bytes::new(),
            key_id: self.key_id,
            signature: [0; 64],
        };
        let mut c = payload.to_vec();
        let tag = Gcm::new(gk).seal_in_place(&nonce, &m.aad(), &mut c);
        c.extend_from_slice(&tag);
        m.c = Bytes::from(c);
        m.signature = self.online.sign(&m.signed_bytes());
        m.to_bytes()
    }

    fn rekey(
        &mut self,
        keys: &SessionKeys,
        group: GroupId,
        id: u64,
        new_epoch: u64,
        down_ctr: u64,
        gk: &[u8; 16],
    ) -> Bytes {
        let mut nonce = [0u8; 12];
        rand_core::Rng::fill_bytes(&mut self.rng, &mut nonce);
        let mut m = Rekey {
            group,
            id: MemberId(id),
            sid: SessionId(keys.sid),
            new_epoch,
            down_ctr,
            nonce,
            c: [0; 32],
        };
        let mut buf = *gk;
        let tag = Gcm::new(keys.k_down.expose()).seal_in_place(&nonce, &m.aad(), &mut buf);
        m.c[..16].copy_from_slice(&buf);
        m.c[16..].copy_from_slice(&tag);
        m.to_bytes()
    }

    fn key_update(
        &mut self,
        keys: &SessionKeys,
        group: GroupId,
        id: u64,
        new_kv: u32,
        down_ctr: u64,
        key: &MemberKey,
    ) -> Bytes {
        let mut nonce = [0u8; 12];
        rand_core::Rng::fill_bytes(&mut self.rng, &mut nonce);
        let mut m = KeyUpdate {
            group,
            id: MemberId(id),
            sid: SessionId(keys.sid),
            new_kv,
            down_ctr,
            nonce,
            c: [0; 48],
        };
        let mut buf = *key.expose();
        let tag = Gcm::new(keys.k_down.expose()).seal_in_place(&nonce, &m.aad(), &mut buf);
        m.c[..32].copy_from_slice(&buf);
        m.c[32..].copy_from_slice(&tag);
        m.to_bytes()
    }
}

/// Opens an uplink as V would.
fn open_uplink(keys: &SessionKeys, bytes: &Bytes) -> (Uplink, Vec<u8>) {
    let up = Uplink::decode(bytes).unwrap();
    assert_eq!(up.sid.0, keys.sid);
    let mut plain = up.c.to_vec();
    Gcm::new(keys.k_up.expose())
        .open_in_place(
            &uplink_nonce(&keys.iv_up, up.ctr),
            &up.aad(),
            &mut plain,
            &up.tag,
        )
        .expect("uplink tag verifies under k_up");
    (up, plain)
}

/// Stands for the meter's flash: the caller side of the outbox protocol.
#[derive(Default)]
struct Disk {
    state: Option<Vec<u8>>,
    writes: usize,
}

impl Disk {
    fn commit<M, E>(&mut self, out: Outbox<'_, M, E>) -> M {
        if let Some(s) = out.state() {
            self.state = Some(s.to_vec());
            self.writes += 1;
        }
        out.persisted()
    }
}

fn answer(member: &mut Member, ch: &Bytes, rng: &mut TestRng, disk: &mut Disk) -> Bytes {
    match member.handle_challenge(ch, None).unwrap() {
        Challenged::Answer(a) => disk.commit(a.respond(b"", rng).unwrap()),
        Challenged::Resend(_) => panic!("expected a fresh answer"),
    }
}

fn answer_err(member: &mut Member, ch: &Bytes) -> MemberError {
    member.handle_challenge(ch, None).map(|_| ()).unwrap_err()
}

/// A member with a session in `G` after round 1 (mode per `ecdhe`), the
/// session keys as V holds them, and the group key.
struct Fixture {
    v: TestV,
    member: Member,
    disk: Disk,
    rng: TestRng,
    keys: SessionKeys,
    gk: [u8; 16],
}

fn fixture(ecdhe: bool) -> Fixture {
    let v = TestV::new();
    let cred = v.credential(ID, &[G.0, G2.0]);
    let mut member = Member::new(&cred).unwrap();
    let mut disk = Disk::default();
    let mut rng = TestRng::new(1);
    let e_v = ecdhe.then(|| EphemeralKeyPair::from_secret_bytes(&[0x33; 32]));
    let mut ch = challenge(G, 1);
    ch.e_v = e_v.as_ref().map(|e| e.public());
    let ch = v.sign(ch);
    let resp = answer(&mut member, &ch, &mut rng, &mut disk);
    let (_, _, keys) = v.accept(&ch, &resp, &cred.key, e_v.as_ref());
    let gk = [0x47; 16];
    let conf = v.confirm(G, 1, 1, ID, &keys, &gk);
    let confirmed = disk.commit(member.handle_confirm(&conf).unwrap());
    assert_eq!(confirmed.sid.0, keys.sid);
    Fixture {
        v,
        member,
        disk,
        rng,
        keys,
        gk,
    }
}

// ---------------------------------------------------------------------------
// Challenge, response, confirm
// ---------------------------------------------------------------------------

fn round_trip(ecdhe: bool) {
    let v = TestV::new();
    let cred = v.credential(ID, &[G.0]);
    let mut member = Member::new(&cred).unwrap();
    let mut rng = TestRng::new(1);
    let mut disk = Disk::default();
    let e_v = ecdhe.then(|| EphemeralKeyPair::from_secret_bytes(&[0x33; 32]));
    let mut ch = challenge(G, 5);
    ch.e_v = e_v.as_ref().map(|e| e.public());
    ch.group_seq = 4;
    let ch = v.sign(ch);

    let resp = answer(&mut member, &ch, &mut rng, &mut disk);
    assert_eq!(
        disk.writes, 1,
        "the response is covered by a persisted state"
    );
    let (r, plain, keys) = v.accept(&ch, &resp, &cred.key, e_v.as_ref());
    assert_eq!((r.id, r.kv, r.group, r.round), (MemberId(ID), 1, G, 5));
    assert_eq!(r.e_i.is_some(), ecdhe);
    assert!(plain.is_empty());
    assert_eq!(member.last_round(G), Some(5));
    assert_eq!(member.online_key(), Some((10, 1)));
    assert_eq!(member.session(G), None, "no session before the confirm");

    let conf = v.confirm(G, 5, 3, ID, &keys, &[0x47; 16]);
    let out = member.handle_confirm(&conf).unwrap();
    assert!(out.state().is_some());
    assert_eq!(member_session_before_commit(&out), None);
    let c = disk.commit(out);
    assert_eq!(c.sid.0, keys.sid);
    assert_eq!((c.group, c.round, c.epoch), (G, 5, 3));
    assert_eq!(member.session(G), Some((SessionId(keys.sid), 3)));

    // The session works both ways: V opens the member's uplink.
    let up = disk.commit(
        member
            .seal_uplink(G, UplinkKind::Reading, b"42 kWh")
            .unwrap(),
    );
    let (u, plain) = open_uplink(&keys, &up);
    assert_eq!(
        (u.ctr, u.kind, plain.as_slice()),
        (1, UplinkKind::Reading, &b"42 kWh"[..])
    );
}

/// The session as the member sees it while an outbox is still open.
fn member_session_before_commit<M, E>(out: &Outbox<'_, M, E>) -> Option<(SessionId, u64)> {
    out.member.session(G)
}

#[test]
fn psk_round_authenticates_both_ways() {
    round_trip(false);
}

#[test]
fn psk_ecdhe_round_authenticates_both_ways() {
    round_trip(true);
}

#[test]
fn psk_and_psk_ecdhe_sessions_differ_for_the_same_transcript() {
    // Same member, same challenge nonce, same rng: only E_V differs, and the
    // ecdhe session keys are not the psk ones.
    let a = fixture(false);
    let b = fixture(true);
    assert_ne!(a.keys.sid, b.keys.sid);
    assert_ne!(a.keys.k_up, b.keys.k_up);
}

#[test]
fn read_purpose_carries_the_reading_and_auth_refuses_one() {
    let v = TestV::new();
    let cred = v.credential(ID, &[G.0]);
    let mut member = Member::new(&cred).unwrap();
    let mut rng = TestRng::new(1);

    let ch_auth = v.sign(challenge(G, 1));
    let Challenged::Answer(a) = member.handle_challenge(&ch_auth, None).unwrap() else {
        panic!()
    };
    assert_eq!(a.read_request(), None);
    assert_eq!(
        a.respond(b"x", &mut rng).unwrap_err(),
        MemberError::PayloadNotRequested
    );

    let mut ch = challenge(G, 2);
    ch.purpose = Purpose::Read(Bytes::from_static(b"register 1.8.0"));
    let ch = v.sign(ch);
    let Challenged::Answer(a) = member.handle_challenge(&ch, None).unwrap() else {
        panic!()
    };
    assert_eq!((a.group(), a.round()), (G, 2));
    assert_eq!(a.read_request(), Some(&b"register 1.8.0"[..]));
    let too_long = vec![0u8; MAX_PAYLOAD + 1];
    let err = a.respond(&too_long, &mut rng).unwrap_err();
    assert_eq!(err, MemberError::PayloadTooLong(MAX_PAYLOAD + 1));
    assert_eq!(err.cause(), ErrorCause::Misuse);

    let Challenged::Answer(a) = member.handle_challenge(&ch, None).unwrap() else {
        panic!("a refused answer changes nothing")
    };
    let resp = Disk::default().commit(a.respond(b"1.8.0=00123.4", &mut rng).unwrap());
    let (_, plain, _) = v.accept(&ch, &resp, &cred.key, None);
    assert_eq!(plain, b"1.8.0=00123.4");
}

#[test]
fn forged_and_misaddressed_challenges_are_refused() {
    let v = TestV::new();
    let mut member = Member::new(&v.credential(ID, &[G.0])).unwrap();
    let before = member.state_bytes();

    // A signature byte flipped.
    let mut bad = v.sign(challenge(G, 1)).to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert_eq!(
        answer_err(&mut member, &Bytes::from(bad)),
        MemberError::BadSignature
    );

    // Signed by a key that is not the certified online key.
    let mut impostor = TestV::new();
    impostor.online = SigningKey::from_seed(&[0x66; 32]);
    let mut ch = challenge(G, 1);
    ch.key_cert = Some(v.cert());
    let forged = impostor.sign_as_is(ch);
    assert_eq!(answer_err(&mut member, &forged), MemberError::BadSignature);

    // A key id other than the one the certificate names.
    let mut ch = challenge(G, 1);
    ch.key_cert = Some(v.cert());
    ch.key_id = 11;
    let err = answer_err(&mut member, &v.sign_as_is(ch));
    assert_eq!(err, MemberError::UnknownKeyId(11));
    assert_eq!(err.cause(), ErrorCause::Crypto);

    // First contact without a certificate: no online key is known.
    assert_eq!(
        answer_err(&mut member, &v.sign_as_is(challenge(G, 1))),
        MemberError::UnknownKeyId(10)
    );

    // Another group's challenge.
    let err = answer_err(&mut member, &v.sign(challenge(G2, 1)));
    assert_eq!(err, MemberError::NotOurGroup(G2));
    assert_eq!(err.cause(), ErrorCause::Malformed);

    // Garbage and oversized input.
    assert!(matches!(
        answer_err(&mut member, &Bytes::from_static(&[1, 1, 0])),
        MemberError::Malformed(_)
    ));
    assert!(matches!(
        answer_err(&mut member, &Bytes::from(vec![0u8; 4096])),
        MemberError::Malformed(DecodeError::TooLong("challenge"))
    ));

    assert_eq!(member.state_bytes(), before, "refusals change nothing");
    assert_eq!(member.online_key(), None);
}

use crate::protocol::codec::DecodeError;

#[test]
fn rounds_strictly_increase_and_a_replay_gets_the_same_bytes() {
    let v = TestV::new();
    let cred = v.credential(ID, &[G.0]);
    let mut member = Member::new(&cred).unwrap();
    let mut rng = TestRng::new(1);
    let mut disk = Disk::default();

    let ch5 = v.sign(challenge(G, 5));
    let resp5 = answer(&mut member, &ch5, &mut rng, &mut disk);
    let writes = disk.writes;

    // The same challenge again: the stored bytes, nothing new to persist.
    match member.handle_challenge(&ch5, None).unwrap() {
        Challenged::Resend(b) => assert_eq!(b, resp5),
        Challenged::Answer(_) => panic!("sealed a second response for round 5"),
    }
    assert_eq!(disk.writes, writes);

    // A different challenge for the same round (new nonce): refused.
    let mut other = challenge(G, 5);
    other.nonce_v = [0xAB; 16];
    assert_eq!(
        answer_err(&mut member, &v.sign(other)),
        MemberError::ConflictingChallenge { group: G, round: 5 }
    );

    // An older round: refused, before the signature is even checked.
    let mut old = v.sign(challenge(G, 4)).to_vec();
    let last = old.len() - 1;
    old[last] ^= 1;
    let err = answer_err(&mut member, &Bytes::from(old));
    assert_eq!(
        err,
        MemberError::StaleRound {
            group: G,
            round: 4,
            answered: 5
        }
    );
    assert_eq!(err.cause(), ErrorCause::Stale);

    // After a reboot the replay still gets the same bytes.
    let mut rebooted =
        Member::restore(&cred, disk.state.as_ref().unwrap(), &mut TestRng::new(77)).unwrap();
    match rebooted.handle_challenge(&ch5, None).unwrap() {
        Challenged::Resend(b) => assert_eq!(b, resp5),
        Challenged::Answer(_) => panic!("sealed a second response after reboot"),
    }

    // A later round is answered afresh.
    let ch6 = v.sign(challenge(G, 6));
    let resp6 = answer(&mut rebooted, &ch6, &mut rng, &mut disk);
    assert_ne!(resp6, resp5);
    assert_eq!(rebooted.last_round(G), Some(6));
}

#[test]
fn dropping_an_outbox_or_answer_changes_nothing() {
    let v = TestV::new();
    let cred = v.credential(ID, &[G.0]);
    let mut member = Member::new(&cred).unwrap();
    let mut rng = TestRng::new(1);
    let ch = v.sign(challenge(G, 1));
    let before = member.state_bytes();

    let Challenged::Answer(a) = member.handle_challenge(&ch, None).unwrap() else {
        panic!()
    };
    drop(a);
    assert_eq!(member.state_bytes(), before);

    let Challenged::Answer(a) = member.handle_challenge(&ch, None).unwrap() else {
        panic!()
    };
    let out = a.respond(b"", &mut rng).unwrap();
    let state = out.state().unwrap().to_vec();
    drop(out);
    assert_eq!(member.state_bytes(), before, "not persisted, not committed");
    assert_eq!(member.last_round(G), None);

    // Committing is what makes the change, and the state handed out is the
    // one the member then holds.
    let resp = answer(&mut member, &ch, &mut rng, &mut Disk::default());
    assert_eq!(member.last_round(G), Some(1));
    assert_ne!(&state[..], &member.state_bytes()[..], "fresh N_i each time");
    let Challenged::Resend(again) = member.handle_challenge(&ch, None).unwrap() else {
        panic!()
    };
    assert_eq!(again, resp);
}

#[test]
fn not_after_is_checked_only_with_a_clock() {
    let v = TestV::new();
    let mut member = Member::new(&v.credential(ID, &[G.0])).unwrap();
    let mut ch = challenge(G, 1);
    ch.not_after = Some(1_000);
    let ch = v.sign(ch);
    assert_eq!(
        member.handle_challenge(&ch, Some(1_001)).map(|_| ()),
        Err(MemberError::Expired {
            not_after: 1_000,
            now: 1_001
        })
    );
    assert!(member.handle_challenge(&ch, Some(1_000)).is_ok());
    assert!(member.handle_challenge(&ch, None).is_ok());
}

/// A member without state (first boot, or state lost) trusts no online key
/// below its credential's `min_online_key_version`, even one the root
/// certified: a key retired before the credential was written (say, because
/// it leaked) cannot sign challenges to it. A restored state that trusts
/// such a key forgets it.
#[test]
fn credential_minimum_refuses_retired_online_keys() {
    let retired = TestV::new();
    let mut v = TestV::new();
    v.online = SigningKey::from_seed(&[0x03; 32]);
    v.key_id = 20;
    v.key_version = 2;
    let mut cred = v.credential(ID, &[G.0]);
    let mut rng = TestRng::new(1);
    let mut disk = Disk::default();

    // Before the minimum existed, a fresh member took the retired key.
    let mut old = Member::new(&cred).unwrap();
    answer(
        &mut old,
        &retired.sign(challenge(G, 1)),
        &mut rng,
        &mut disk,
    );
    assert_eq!(old.online_key(), Some((10, 1)));
    let persisted = disk.state.clone().unwrap();

    cred.min_online_key_version = 2;
    let mut fresh = Member::new(&cred).unwrap();
    assert_eq!(
        answer_err(&mut fresh, &retired.sign(challenge(G, 1))),
        MemberError::StaleKeyCertificate {
            version: 1,
            known: 2
        }
    );
    assert_eq!(fresh.online_key(), None);
    answer(&mut fresh, &v.sign(challenge(G, 1)), &mut rng, &mut disk);
    assert_eq!(fresh.online_key(), Some((20, 2)));

    // The state that trusted version 1, restored under the new credential.
    let mut restored = Member::restore(&cred, &persisted, &mut TestRng::new(77)).unwrap();
    assert_eq!(restored.online_key(), None);
    assert_eq!(
        answer_err(&mut restored, &retired.sign_as_is(challenge(G, 2))),
        MemberError::UnknownKeyId(10)
    );
    answer(&mut restored, &v.sign(challenge(G, 2)), &mut rng, &mut disk);
    assert_eq!(restored.online_key(), Some((20, 2)));
}

#[test]
fn key_certificates_only_move_forward() {
    let mut v = TestV::new();
    let cred = v.credential(ID, &[G.0]);
    let mut member = Member::new(&cred).unwrap();
    let mut rng = TestRng::new(1);
    let mut disk = Disk::default();
    answer(&mut member, &v.sign(challenge(G, 1)), &mut rng, &mut disk);
    assert_eq!(member.online_key(), Some((10, 1)));

    // Without a certificate, the known key verifies.
    answer(
        &mut member,
        &v.sign_as_is(challenge(G, 2)),
        &mut rng,
        &mut disk,
    );

    // Rotation: version 2, new id, new key, signed by the root.
    let old = TestV::new();
    v.online = SigningKey::from_seed(&[0x03; 32]);
    v.key_id = 20;
    v.key_version = 2;
    answer(&mut member, &v.sign(challenge(G, 3)), &mut rng, &mut disk);
    assert_eq!(member.online_key(), Some((20, 2)));

    // The old key, even with its valid old certificate, is refused now.
    let err = answer_err(&mut member, &old.sign(challenge(G, 4)));
    assert_eq!(
        err,
        MemberError::StaleKeyCertificate {
            version: 1,
            known: 2
        }
    );
    assert_eq!(
        answer_err(&mut member, &old.sign_as_is(challenge(G, 4))),
        MemberError::UnknownKeyId(10)
    );

    // Same version, another key: refused.
    let mut twin = TestV::new();
    twin.online = SigningKey::from_seed(&[0x04; 32]);
    twin.key_id = 20;
    twin.key_version = 2;
    assert!(matches!(
        answer_err(&mut member, &twin.sign(challenge(G, 4))),
        MemberError::StaleKeyCertificate { .. }
    ));

    // A higher version not signed by the root: refused.
    let mut rogue = TestV::new();
    rogue.root = SigningKey::from_seed(&[0x77; 32]);
    rogue.online = SigningKey::from_seed(&[0x05; 32]);
    rogue.key_id = 30;
    rogue.key_version = 3;
    assert_eq!(
        answer_err(&mut member, &rogue.sign(challenge(G, 4))),
        MemberError::BadKeyCertificate(crate::protocol::suite::CryptoError::BadSignature)
    );
    assert_eq!(member.online_key(), Some((20, 2)));

    // The rotated key survives a reboot.
    let rebooted =
        Member::restore(&cred, disk.state.as_ref().unwrap(), &mut TestRng::new(77)).unwrap();
    assert_eq!(rebooted.online_key(), Some((20, 2)));
}

#[test]
fn a_certificate_in_a_refused_challenge_is_not_learned() {
    let mut v = TestV::new();
    let mut member = Member::new(&v.credential(ID, &[G.0])).unwrap();
    answer(
        &mut member,
        &v.sign(challenge(G, 1)),
        &mut TestRng::new(1),
        &mut Disk::default(),
    );
    let good_online = v.online.clone();
    v.online = SigningKey::from_seed(&[0x03; 32]);
    v.key_id = 20;
    v.key_version = 2;
    // A valid certificate, but the challenge is signed by the old key.
    let mut ch = challenge(G, 2);
    ch.key_cert = Some(v.cert());
    ch.key_id = 20;
    ch.signature = good_online.sign(&ch.signed_bytes());
    assert_eq!(
        answer_err(&mut member, &ch.to_bytes()),
        MemberError::BadSignature
    );
    assert_eq!(member.online_key(), Some((10, 1)));
}

#[test]
fn confirms_open_only_for_the_pending_round_of_this_member() {
    for ecdhe in [false, true] {
        let v = TestV::new();
        let cred = v.credential(ID, &[G.0]);
        let other_cred = v.credential(ID + 1, &[G.0]);
        let mut member = Member::new(&cred).unwrap();
        let mut other = Member::new(&other_cred).unwrap();
        let mut rng = TestRng::new(1);
        let mut disk = Disk::default();
        let e_v = ecdhe.then(|| EphemeralKeyPair::from_secret_bytes(&[0x33; 32]));
        let mut ch = challenge(G, 1);
        ch.e_v = e_v.as_ref().map(|e| e.public());
        let ch = v.sign(ch);
        let resp = answer(&mut member, &ch, &mut rng, &mut disk);
        let other_resp = answer(&mut other, &ch, &mut rng, &mut Disk::default());
        let (_, _, keys) = v.accept(&ch, &resp, &cred.key, e_v.as_ref());
        let (_, _, other_keys) = v.accept(&ch, &other_resp, &other_cred.key, e_v.as_ref());
        let gk = [0x47; 16];
        let before = member.state_bytes();

        // Forged: W altered.
        let mut forged = v.confirm(G, 1, 1, ID, &keys, &gk).to_vec();
        forged[40] ^= 1;
        assert_eq!(
            member.handle_confirm(&forged).map(|_| ()),
            Err(MemberError::BadTag("confirm"))
        );
        // Forged: the right sid but sealed under another key.
        let mut wrong_key = keys.clone();
        wrong_key.k_conf = Key16::from_bytes([9; 16]);
        let conf = v.confirm(G, 1, 1, ID, &wrong_key, &gk);
        assert_eq!(
            member.handle_confirm(&conf).map(|_| ()),
            Err(MemberError::BadTag("confirm"))
        );
        // The epoch is authenticated too.
        let mut conf = Confirm::decode(&v.confirm(G, 1, 1, ID, &keys, &gk)).unwrap();
        conf.epoch = 2;
        assert_eq!(
            member.handle_confirm(&conf.to_bytes()).map(|_| ()),
            Err(MemberError::BadTag("confirm"))
        );
        // Another member's confirm, as addressed, and re-addressed to us.
        let theirs = v.confirm(G, 1, 1, ID + 1, &other_keys, &gk);
        assert_eq!(
            member.handle_confirm(&theirs).map(|_| ()),
            Err(MemberError::NotForUs(MemberId(ID + 1)))
        );
        let mut readdressed = Confirm::decode(&theirs).unwrap();
        readdressed.id = MemberId(ID);
        assert_eq!(
            member.handle_confirm(&readdressed.to_bytes()).map(|_| ()),
            Err(MemberError::WrongSession)
        );
        // Wrong round, wrong group.
        assert_eq!(
            member
                .handle_confirm(&v.confirm(G, 2, 1, ID, &keys, &gk))
                .map(|_| ()),
            Err(MemberError::NoPendingRound { group: G, round: 2 })
        );
        assert_eq!(
            member
                .handle_confirm(&v.confirm(G2, 1, 1, ID, &keys, &gk))
                .map(|_| ()),
            Err(MemberError::NotOurGroup(G2))
        );
        assert_eq!(
            member.state_bytes(),
            before,
            "refused confirms change nothing"
        );

        // The good one, once.
        let good = v.confirm(G, 1, 1, ID, &keys, &gk);
        disk.commit(member.handle_confirm(&good).unwrap());
        assert_eq!(
            member.handle_confirm(&good).map(|_| ()),
            Err(MemberError::NoPendingRound { group: G, round: 1 })
        );

        // A confirm for a round superseded by a newer answer is refused.
        let ch2 = v.sign(challenge(G, 2));
        let resp2 = answer(&mut member, &ch2, &mut rng, &mut disk);
        let (_, _, keys2) = v.accept(&ch2, &resp2, &cred.key, None);
        let ch3 = v.sign(challenge(G, 3));
        answer(&mut member, &ch3, &mut rng, &mut disk);
        assert_eq!(
            member
                .handle_confirm(&v.confirm(G, 2, 1, ID, &keys2, &gk))
                .map(|_| ()),
            Err(MemberError::NoPendingRound { group: G, round: 2 })
        );
        // ...and the session from round 1 is still the current one.
        assert_eq!(member.session(G), Some((SessionId(keys.sid), 1)));
    }
}

#[test]
fn a_small_order_ephemeral_key_is_refused() {
    let v = TestV::new();
    let mut member = Member::new(&v.credential(ID, &[G.0])).unwrap();
    let mut ch = challenge(G, 1);
    ch.e_v = Some([0; 32]);
    let ch = v.sign(ch);
    let Challenged::Answer(a) = member.handle_challenge(&ch, None).unwrap() else {
        panic!()
    };
    assert!(matches!(
        a.respond(b"", &mut TestRng::new(1)),
        Err(MemberError::KeyExchange(_))
    ));
    assert_eq!(member.last_round(G), None);
}

// ---------------------------------------------------------------------------
// Uplinks and counters
// ---------------------------------------------------------------------------

#[test]
fn uplink_counters_increase_and_are_reserved_in_blocks() {
    let mut f = fixture(false);
    let mut writes_at = vec![];
    for want in 1..=(2 * COUNTER_BLOCK + 1) {
        let out = f
            .member
            .seal_uplink(G, UplinkKind::Reading, &want.to_be_bytes())
            .unwrap();
        if out.state().is_some() {
            writes_at.push(want);
        }
        let bytes = f.disk.commit(out);
        let (u, plain) = open_uplink(&f.keys, &bytes);
        assert_eq!(u.ctr, want);
        assert_eq!(plain, want.to_be_bytes());
    }
    assert_eq!(
        writes_at,
        vec![1, COUNTER_BLOCK + 1, 2 * COUNTER_BLOCK + 1],
        "one state write per block"
    );
    let alarm = f.disk.commit(
        f.member
            .seal_uplink(G, UplinkKind::Alarm, b"tamper")
            .unwrap(),
    );
    let (u, _) = open_uplink(&f.keys, &alarm);
    assert_eq!(u.kind, UplinkKind::Alarm);
}

#[test]
fn reboot_continues_above_the_high_water_mark() {
    let mut f = fixture(true);
    let cred = f.v.credential(ID, &[G.0, G2.0]);
    // Counter 1 reserves 1..=32 and is persisted; 2..=5 are sent without a
    // write; then the meter loses power.
    for _ in 1..=5 {
        f.disk
            .commit(f.member.seal_uplink(G, UplinkKind::Reading, b"r").unwrap());
    }
    // A restore also jumps the counter by 2^32 to 2^33 (deviation 14).
    let jumped = |ctr: u64, reserved: u64| {
        let jump = ctr - 1 - reserved;
        (1 << 32..1 << 33).contains(&jump)
    };
    let mut rebooted =
        Member::restore(&cred, f.disk.state.as_ref().unwrap(), &mut TestRng::new(77)).unwrap();
    let out = rebooted.seal_uplink(G, UplinkKind::Reading, b"r").unwrap();
    assert!(out.state().is_some(), "a new block is reserved first");
    let (u, _) = open_uplink(&f.keys, &f.disk.commit(out));
    assert!(jumped(u.ctr, COUNTER_BLOCK), "{}", u.ctr);

    // Even a crash right after sealing the first counter of a reserved block
    // (never persisted as used) cannot repeat it.
    let first = u.ctr;
    let mut again =
        Member::restore(&cred, f.disk.state.as_ref().unwrap(), &mut TestRng::new(78)).unwrap();
    let (u, _) = open_uplink(
        &f.keys,
        &f.disk
            .commit(again.seal_uplink(G, UplinkKind::Reading, b"r").unwrap()),
    );
    assert!(jumped(u.ctr, first + COUNTER_BLOCK - 1), "{}", u.ctr);
}

/// Restoring an older copy of the state breaks the contract (deviation
/// 14), but the restore's counter jump keeps the copy from sealing under
/// a nonce already used: a copy saved between answering and the confirm,
/// handed V's stored confirm again, rebuilds the very session (same k_up,
/// same iv_up) that already sent uplinks; and a copy saved in that
/// session continues it. Neither starts where the first run did.
#[test]
fn a_restored_older_copy_does_not_reuse_uplink_counters() {
    let v = TestV::new();
    let cred = v.credential(ID, &[G.0, G2.0]);
    let mut member = Member::new(&cred).unwrap();
    let (mut disk, mut rng) = (Disk::default(), TestRng::new(1));
    let ch = v.sign(challenge(G, 1));
    let resp = answer(&mut member, &ch, &mut rng, &mut disk);
    let answered = disk.state.clone().unwrap();
    let (_, _, keys) = v.accept(&ch, &resp, &cred.key, None);
    let conf = v.confirm(G, 1, 1, ID, &keys, &[0x47; 16]);
    disk.commit(member.handle_confirm(&conf).unwrap());
    let in_session = disk.state.clone().unwrap();
    let sent: Vec<u64> = (0..3)
        .map(|_| {
            let up = disk.commit(member.seal_uplink(G, UplinkKind::Reading, b"r").unwrap());
            open_uplink(&keys, &up).0.ctr
        })
        .collect();
    assert_eq!(sent, vec![1, 2, 3]);

    let mut old = Member::restore(&cred, &answered, &mut TestRng::new(5)).unwrap();
    old.handle_confirm(&conf).unwrap().persisted();
    let up = old
        .seal_uplink(G, UplinkKind::Reading, b"r")
        .unwrap()
        .persisted();
    let (u, _) = open_uplink(&keys, &up);
    assert!(u.ctr > 1 << 32, "the rebuilt session starts at {}", u.ctr);

    let mut old = Member::restore(&cred, &in_session, &mut TestRng::new(6)).unwrap();
    let up = old
        .seal_uplink(G, UplinkKind::Reading, b"r")
        .unwrap()
        .persisted();
    let (u, _) = open_uplink(&keys, &up);
    assert!(
        u.ctr > 1 << 32,
        "the restored session continues at {}",
        u.ctr
    );
}

#[test]
fn a_dropped_uplink_still_burns_its_counter() {
    let mut f = fixture(false);
    let first = f.member.seal_uplink(G, UplinkKind::Reading, b"a").unwrap();
    assert!(first.state().is_some());
    drop(first);
    // Counter 1 was sealed (though never released): it is not sealed again,
    // and the block is still reserved before counter 2 goes out.
    let out = f.member.seal_uplink(G, UplinkKind::Reading, b"b").unwrap();
    assert!(out.state().is_some());
    let (u, _) = open_uplink(&f.keys, &f.disk.commit(out));
    assert_eq!(u.ctr, 2);
}

#[test]
fn uplinks_need_a_session_and_never_forge_acks() {
    let v = TestV::new();
    let mut member = Member::new(&v.credential(ID, &[G.0])).unwrap();
    assert_eq!(
        member.seal_uplink(G, UplinkKind::Reading, b"x").map(|_| ()),
        Err(MemberError::SealWithoutSession(G))
    );
    assert_eq!(
        member
            .seal_uplink(G2, UplinkKind::Reading, b"x")
            .map(|_| ()),
        Err(MemberError::SealWithoutSession(G2))
    );
    let mut f = fixture(false);
    assert_eq!(
        f.member.seal_uplink(G, UplinkKind::Ack, b"x").map(|_| ()),
        Err(MemberError::AckNotAllowed)
    );
    assert_eq!(
        f.member
            .seal_uplink(G, UplinkKind::Reading, &[0; MAX_PAYLOAD + 1])
            .map(|_| ()),
        Err(MemberError::PayloadTooLong(MAX_PAYLOAD + 1))
    );
}

// ---------------------------------------------------------------------------
// Group messages
// ---------------------------------------------------------------------------

fn with_bad_signature(m: Bytes) -> Bytes {
    let mut m = m.to_vec();
    let last = m.len() - 1;
    m[last] ^= 1;
    Bytes::from(m)
}

#[test]
fn group_messages_are_checked_in_order_and_acked() {
    let mut f = fixture(false);
    let gk = f.gk;
    // Round 1 was answered; a challenge for round 2 announces seq 3.
    let mut ch = challenge(G, 2);
    ch.group_seq = 3;
    let ch = f.v.sign(ch);
    answer(&mut f.member, &ch, &mut f.rng, &mut f.disk);

    // Wrong epoch (every later check would also fail: epoch comes first).
    let m = f.v.group_message(G, 2, 1, 0, &[0; 16], b"cfg");
    assert_eq!(
        f.member.handle_group_message(&m).map(|_| ()),
        Err(MemberError::EpochMismatch {
            epoch: 2,
            current: 1
        })
    );
    // Below the announced seq (and stale validity, and a bad signature):
    // superseded is reported.
    let m = with_bad_signature(f.v.group_message(G, 1, 2, 0, &gk, b"cfg"));
    assert_eq!(
        f.member.handle_group_message(&m).map(|_| ()),
        Err(MemberError::SupersededSeq {
            seq: 2,
            announced: 3
        })
    );
    // Valid only through round 1, but round 2 was answered (and a bad
    // signature, checked later).
    let m = with_bad_signature(f.v.group_message(G, 1, 3, 1, &gk, b"cfg"));
    assert_eq!(
        f.member.handle_group_message(&m).map(|_| ()),
        Err(MemberError::StaleValidity {
            valid_through_round: 1,
            answered: 2
        })
    );
    // Bad signature (and sealed under another key, checked later).
    let m = with_bad_signature(f.v.group_message(G, 1, 3, 2, &[1; 16], b"cfg"));
    assert_eq!(
        f.member.handle_group_message(&m).map(|_| ()),
        Err(MemberError::BadSignature)
    );
    // Signed correctly, sealed under another group key (a member forging
    // cannot sign; this is V's own mistake, still refused).
    let m = f.v.group_message(G, 1, 3, 2, &[1; 16], b"cfg");
    assert_eq!(
        f.member.handle_group_message(&m).map(|_| ()),
        Err(MemberError::BadTag("group message"))
    );
    // Cross-group.
    let m = f.v.group_message(GroupId(99), 1, 3, 2, &gk, b"cfg");
    assert_eq!(
        f.member.handle_group_message(&m).map(|_| ()),
        Err(MemberError::NotOurGroup(GroupId(99)))
    );

    // Good.
    let m = f.v.group_message(G, 1, 3, 2, &gk, b"tariff=2");
    let out = f.member.handle_group_message(&m).unwrap();
    assert_eq!(out.event().payload.as_slice(), b"tariff=2");
    assert_eq!((out.event().seq, out.event().epoch), (3, 1));
    assert!(out.state().is_some(), "the applied seq is persisted first");
    let first_ack = f.disk.commit(out);
    let (u, plain) = open_uplink(&f.keys, &first_ack);
    assert_eq!(u.kind, UplinkKind::Ack);
    let ack = AckPayload::decode(&plain).unwrap();
    assert_eq!((ack.group, ack.epoch, ack.seq), (G, 1, 3));
    assert_eq!(ack.message_hash, <[u8; 32]>::from(Sha256::digest(&m)));

    // The same message again (a replayed downlink, the first ack lost):
    // the first ack, byte for byte, with no state change and no counter.
    let again = f.member.handle_group_message(&m).unwrap();
    assert!(again.event().resent && again.event().payload.is_empty());
    assert!(again.state().is_none(), "nothing changes");
    assert_eq!(again.persisted(), first_ack);
    // An older seq is still stale. Then the next seq works, and uses the
    // next ctr.
    let m2 = f.v.group_message(G, 1, 2, 2, &gk, b"tariff=1");
    assert!(matches!(
        f.member.handle_group_message(&m2),
        Err(MemberError::StaleSeq { seq: 2, applied: 3 })
    ));
    let m4 = f.v.group_message(G, 1, 4, 2, &gk, b"tariff=3");
    let m4_ack = f.disk.commit(f.member.handle_group_message(&m4).unwrap());
    let (u, _) = open_uplink(&f.keys, &m4_ack);
    assert_eq!(u.ctr, 2);
    // A reboot remembers the applied seq and its ack: m4 again gets m4's
    // ack, m (older) is stale.
    let cred = f.v.credential(ID, &[G.0, G2.0]);
    let mut rebooted =
        Member::restore(&cred, f.disk.state.as_ref().unwrap(), &mut TestRng::new(77)).unwrap();
    assert_eq!(
        rebooted.handle_group_message(&m4).unwrap().persisted(),
        m4_ack
    );
    assert!(matches!(
        rebooted.handle_group_message(&m),
        Err(MemberError::StaleSeq { .. })
    ));
    // A state stored in format 1 (before acks were kept) still restores:
    // the applied seq is kept, and the same message is then stale.
    let old = rebooted.state.encode(1);
    let mut from_v1 = Member::restore(&cred, &old, &mut TestRng::new(77)).unwrap();
    assert!(matches!(
        from_v1.handle_group_message(&m4),
        Err(MemberError::StaleSeq { .. })
    ));
}

#[test]
fn group_messages_need_a_session_and_a_known_key() {
    let v = TestV::new();
    let mut member = Member::new(&v.credential(ID, &[G.0])).unwrap();
    let mut v2 = TestV::new();
    let m = v2.group_message(G, 1, 1, 0, &[0x47; 16], b"x");
    assert_eq!(
        member.handle_group_message(&m).map(|_| ()),
        Err(MemberError::NoSession(G))
    );
    let mut f = fixture(false);
    let mut m = GroupMessage::decode(&f.v.group_message(G, 1, 1, 1, &f.gk, b"x")).unwrap();
    m.key_id = 99;
    assert_eq!(
        f.member.handle_group_message(&m.to_bytes()).map(|_| ()),
        Err(MemberError::UnknownKeyId(99))
    );
}

// ---------------------------------------------------------------------------
// Rekey and key update
// ---------------------------------------------------------------------------

#[test]
fn rekeys_move_the_epoch_forward_in_the_current_session_only() {
    let mut f = fixture(false);
    let new_gk = [0x48; 16];
    let before = f.member.state_bytes();

    let other_keys = {
        let mut k = f.keys.clone();
        k.sid = [0xFF; 8];
        k
    };
    let m = f.v.rekey(&other_keys, G, ID, 2, 1, &new_gk);
    assert_eq!(
        f.member.handle_rekey(&m).map(|_| ()),
        Err(MemberError::WrongSession)
    );
    let m = f.v.rekey(&f.keys, G, ID + 1, 2, 1, &new_gk);
    assert_eq!(
        f.member.handle_rekey(&m).map(|_| ()),
        Err(MemberError::NotForUs(MemberId(ID + 1)))
    );
    let m = f.v.rekey(&f.keys, G, ID, 1, 1, &new_gk);
    assert_eq!(
        f.member.handle_rekey(&m).map(|_| ()),
        Err(MemberError::StaleEpoch {
            new_epoch: 1,
            current: 1
        })
    );
    let mut bad_key = f.keys.clone();
    bad_key.k_down = Key16::from_bytes([3; 16]);
    let m = f.v.rekey(&bad_key, G, ID, 2, 1, &new_gk);
    assert_eq!(
        f.member.handle_rekey(&m).map(|_| ()),
        Err(MemberError::BadTag("rekey"))
    );
    assert_eq!(f.member.state_bytes(), before);

    let m = f.v.rekey(&f.keys, G, ID, 2, 5, &new_gk);
    let r = f.disk.commit(f.member.handle_rekey(&m).unwrap());
    assert_eq!(r, Rekeyed { group: G, epoch: 2 });
    assert_eq!(f.member.session(G), Some((SessionId(f.keys.sid), 2)));
    // Replayed, or an older counter with a newer epoch: refused.
    assert_eq!(
        f.member.handle_rekey(&m).map(|_| ()),
        Err(MemberError::ReplayedDownCounter {
            down_ctr: 5,
            last: 5
        })
    );
    let m = f.v.rekey(&f.keys, G, ID, 3, 4, &new_gk);
    assert!(matches!(
        f.member.handle_rekey(&m),
        Err(MemberError::ReplayedDownCounter { .. })
    ));

    // Group messages now need epoch 2 and GK_2.
    let old = f.v.group_message(G, 1, 1, 1, &f.gk, b"old");
    assert!(matches!(
        f.member.handle_group_message(&old),
        Err(MemberError::EpochMismatch { .. })
    ));
    let new = f.v.group_message(G, 2, 1, 1, &new_gk, b"new");
    let out = f.member.handle_group_message(&new).unwrap();
    assert_eq!(out.event().payload.as_slice(), b"new");
    f.disk.commit(out);
}

#[test]
fn key_updates_only_in_psk_ecdhe_sessions_and_only_upward() {
    let mut psk = fixture(false);
    let new_key = member_key(ID, 2);
    let m = psk.v.key_update(&psk.keys, G, ID, 2, 1, &new_key);
    assert_eq!(
        psk.member.handle_key_update(&m).map(|_| ()),
        Err(MemberError::KeyUpdateInPskSession)
    );

    let mut f = fixture(true);
    let m = f.v.key_update(&f.keys, G, ID, 1, 1, &new_key);
    assert_eq!(
        f.member.handle_key_update(&m).map(|_| ()),
        Err(MemberError::StaleKeyVersion { new_kv: 1, kv: 1 })
    );
    let mut bad = f.keys.clone();
    bad.k_down = Key16::from_bytes([3; 16]);
    let m = f.v.key_update(&bad, G, ID, 2, 1, &new_key);
    assert_eq!(
        f.member.handle_key_update(&m).map(|_| ()),
        Err(MemberError::BadTag("key update"))
    );
    assert_eq!(f.member.kv(), 1);

    let m = f.v.key_update(&f.keys, G, ID, 2, 1, &new_key);
    let u = f.disk.commit(f.member.handle_key_update(&m).unwrap());
    assert_eq!(u, KeyUpdated { kv: 2 });
    assert_eq!(f.member.kv(), 2);
    assert!(matches!(
        f.member.handle_key_update(&m),
        Err(MemberError::ReplayedDownCounter { .. })
    ));
    // Rekeys share the down counter.
    let r = f.v.rekey(&f.keys, G, ID, 2, 1, &[0x48; 16]);
    assert!(matches!(
        f.member.handle_rekey(&r),
        Err(MemberError::ReplayedDownCounter { .. })
    ));

    // The next response uses kv 2 and the new key, in every group, also
    // after a reboot.
    let cred = f.v.credential(ID, &[G.0, G2.0]);
    let mut rebooted =
        Member::restore(&cred, f.disk.state.as_ref().unwrap(), &mut TestRng::new(77)).unwrap();
    assert_eq!(rebooted.kv(), 2);
    let ch = f.v.sign(challenge(G2, 1));
    let resp = answer(&mut rebooted, &ch, &mut f.rng, &mut f.disk);
    let (r, _, _) = f.v.accept(&ch, &resp, &new_key, None);
    assert_eq!(r.kv, 2);
}

// ---------------------------------------------------------------------------
// Persistent state
// ---------------------------------------------------------------------------

/// A state with every optional part present: online key, answered round
/// with pending keys (G2), session with down counter and applied seq (G).
fn rich_state() -> (MemberCredential, Vec<u8>) {
    let mut f = fixture(true);
    let r = f.v.rekey(&f.keys, G, ID, 2, 1, &[0x48; 16]);
    f.disk.commit(f.member.handle_rekey(&r).unwrap());
    let m = f.v.group_message(G, 2, 1, 1, &[0x48; 16], b"cfg");
    f.disk.commit(f.member.handle_group_message(&m).unwrap());
    let mut ch = challenge(G2, 4);
    ch.purpose = Purpose::Read(Bytes::from_static(b"q"));
    ch.e_v = Some(EphemeralKeyPair::from_secret_bytes(&[0x34; 32]).public());
    let ch = f.v.sign(ch);
    let Challenged::Answer(a) = f.member.handle_challenge(&ch, None).unwrap() else {
        panic!()
    };
    f.disk.commit(a.respond(b"reading", &mut f.rng).unwrap());
    (
        f.v.credential(ID, &[G.0, G2.0]),
        f.disk.state.clone().unwrap(),
    )
}

#[test]
fn state_encoding_round_trips_canonically() {
    let (cred, bytes) = rich_state();
    let state = MemberState::decode(&bytes).unwrap();
    assert_eq!(&state.to_bytes()[..], &bytes[..]);
    let member = Member::restore(&cred, &bytes, &mut TestRng::new(77)).unwrap();
    // The restore moved the session's counter mark up (deviation 14), and
    // nothing else.
    let mut expected = state.clone();
    let restored = MemberState::decode(&member.state_bytes()).unwrap();
    for (g, grp) in expected.groups.iter_mut() {
        if let (Some(s), Some(r)) = (grp.session.as_mut(), restored.groups[g].session.as_ref()) {
            assert!(r.ctr_reserved - s.ctr_reserved >= 1 << 32);
            s.ctr_reserved = r.ctr_reserved;
        }
    }
    assert_eq!(&member.state_bytes()[..], &expected.to_bytes()[..]);
    assert_eq!(member.last_round(G2), Some(4));
    assert_eq!(member.session(G).map(|s| s.1), Some(2));
    // A fresh member's state round-trips too.
    let fresh = Member::new(&cred).unwrap().state_bytes();
    assert_eq!(
        &MemberState::decode(&fresh).unwrap().to_bytes()[..],
        &fresh[..]
    );
}

#[test]
fn truncated_or_garbled_state_is_refused() {
    let (cred, bytes) = rich_state();
    for len in 0..bytes.len() {
        assert!(
            matches!(
                Member::restore(&cred, &bytes[..len], &mut TestRng::new(77)),
                Err(MemberError::BadState(_))
            ),
            "truncated to {len}"
        );
    }
    for i in 0..bytes.len() {
        let mut garbled = bytes.clone();
        garbled[i] ^= 0x40;
        assert!(
            matches!(
                Member::restore(&cred, &garbled, &mut TestRng::new(77)),
                Err(MemberError::BadState(_))
            ),
            "byte {i} flipped"
        );
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(Member::restore(&cred, &longer, &mut TestRng::new(77)).is_err());
}

/// Re-seals a state body with a valid checksum, to reach the structural
/// checks behind it.
fn with_checksum(mut body: Vec<u8>) -> Vec<u8> {
    let h = Sha256::new()
        .chain_update(b"dapgw v1 member state")
        .chain_update(&body)
        .finalize();
    body.extend_from_slice(&h[..16]);
    body
}

#[test]
fn structurally_invalid_state_is_refused_even_with_a_good_checksum() {
    let (cred, bytes) = rich_state();
    let body = &bytes[..bytes.len() - 16];
    // Format version 3 (1 and 2 are read).
    let mut b = body.to_vec();
    b[4] = 3;
    assert_eq!(
        Member::restore(&cred, &with_checksum(b), &mut TestRng::new(77)).map(|_| ()),
        Err(MemberError::BadState("state.format"))
    );
    // Online flag 2.
    let online_flag = 4 + 1 + 8 + 4 + 32 + 32;
    let mut b = body.to_vec();
    b[online_flag] = 2;
    assert_eq!(
        Member::restore(&cred, &with_checksum(b), &mut TestRng::new(77)).map(|_| ()),
        Err(MemberError::BadState("state.online"))
    );
    // Trailing byte.
    let mut b = body.to_vec();
    b.push(0);
    assert_eq!(
        Member::restore(&cred, &with_checksum(b), &mut TestRng::new(77)).map(|_| ()),
        Err(MemberError::BadState("state"))
    );
}

#[test]
fn state_must_match_the_credential() {
    let (cred, bytes) = rich_state();
    let mut other = cred.clone();
    other.id += 1;
    assert_eq!(
        Member::restore(&other, &bytes, &mut TestRng::new(77)).map(|_| ()),
        Err(MemberError::StateMismatch("member id"))
    );
    let mut other = cred.clone();
    other.root_public_key = SigningKey::from_seed(&[9; 32]).verifying_key().to_bytes();
    assert_eq!(
        Member::restore(&other, &bytes, &mut TestRng::new(77)).map(|_| ()),
        Err(MemberError::StateMismatch("root public key"))
    );
    let mut other = cred.clone();
    other.key = member_key(ID, 9);
    assert_eq!(
        Member::restore(&other, &bytes, &mut TestRng::new(77)).map(|_| ()),
        Err(MemberError::StateMismatch("member key version"))
    );
    // Groups follow the credential: G2 removed, G3 added.
    let mut regrouped = cred.clone();
    regrouped.groups = vec![G.0, 9];
    let m = Member::restore(&regrouped, &bytes, &mut TestRng::new(77)).unwrap();
    assert!(m.session(G).is_some());
    assert_eq!(m.last_round(G2), None);
    assert_eq!(m.last_round(GroupId(9)), None);
}

#[test]
fn a_member_that_lost_its_state_waits_for_the_next_round() {
    let mut f = fixture(false);
    let cred = f.v.credential(ID, &[G.0, G2.0]);
    let old_ch = f.v.sign(challenge(G, 1));
    let mut fresh = Member::new(&cred).unwrap();
    assert_eq!(
        fresh.seal_uplink(G, UplinkKind::Reading, b"x").map(|_| ()),
        Err(MemberError::SealWithoutSession(G))
    );
    // It answers the replayed round-1 challenge again (V refuses it: the
    // round is closed); it cannot avoid that without its state.
    let mut disk = Disk::default();
    answer(&mut fresh, &old_ch, &mut f.rng, &mut disk);
    // A newer challenge announces seq 5; a withheld seq-4 update is refused.
    let mut ch = challenge(G, 2);
    ch.group_seq = 5;
    let resp = answer(&mut fresh, &f.v.sign(ch.clone()), &mut f.rng, &mut disk);
    let ch = f.v.sign(ch);
    let (_, _, keys) = f.v.accept(&ch, &resp, &cred.key, None);
    disk.commit(
        fresh
            .handle_confirm(&f.v.confirm(G, 2, 1, ID, &keys, &f.gk))
            .unwrap(),
    );
    let m4 = f.v.group_message(G, 1, 4, 2, &f.gk, b"old");
    assert!(matches!(
        fresh.handle_group_message(&m4),
        Err(MemberError::SupersededSeq {
            seq: 4,
            announced: 5
        })
    ));
    // The member that kept its state refuses nothing it should accept.
    let m5 = f.v.group_message(G, 1, 5, 2, &f.gk, b"new");
    assert!(fresh.handle_group_message(&m5).is_ok());
}

#[test]
fn secrets_never_appear_in_debug_output() {
    let mut f = fixture(true);
    let key_hex = hex::encode(member_key(ID, 1).expose());
    let gk_hex = hex::encode(f.gk);
    let k_up_hex = hex::encode(f.keys.k_up.expose());
    let state = MemberState::decode(f.disk.state.as_ref().unwrap()).unwrap();
    let m = f.v.group_message(G, 1, 1, 1, &f.gk, b"secret-config");
    let out = f.member.handle_group_message(&m).unwrap();
    let out_text = format!("{out:?}");
    drop(out);
    let texts = [
        out_text,
        format!("{:?}", f.member.seal_uplink(G, UplinkKind::Reading, b"x")),
        format!("{state:?}"),
        format!("{:?}", state.groups),
        format!("{:?}", f.member),
    ];
    for t in &texts {
        for secret in [&key_hex, &gk_hex, &k_up_hex] {
            assert!(!t.contains(secret.as_str()), "{t}");
        }
        assert!(!t.contains("secret-config"), "{t}");
    }
}

#[test]
fn direct_wraps_a_sealed_message_as_a_batch_of_one() {
    let mut f = fixture(false);
    let up = f
        .disk
        .commit(f.member.seal_uplink(G, UplinkKind::Reading, b"r").unwrap());
    let d = crate::protocol::wire::Direct::decode(&direct(&up).unwrap()).unwrap();
    assert_eq!(d.inner, up);
    let tag = Uplink::decode(&up).unwrap().tag;
    assert_eq!(d.aggregate, crate::protocol::suite::aggregate([&tag]));
    let ch = f.v.sign(challenge(G, 2));
    let resp = answer(&mut f.member, &ch, &mut f.rng, &mut f.disk);
    let d = crate::protocol::wire::Direct::decode(&direct(&resp).unwrap()).unwrap();
    assert_eq!(d.inner, resp);
    // Only a Response or an Uplink can go direct.
    assert!(matches!(direct(&ch), Err(MemberError::Malformed(_))));
}

#[test]
fn input_caps_are_the_largest_valid_messages() {
    let v = TestV::new();
    let mut ch = challenge(G, 1);
    ch.e_v = Some([9; 32]);
    ch.purpose = Purpose::Read(Bytes::from(vec![
        0u8;
        crate::protocol::wire::MAX_READ_REQUEST
    ]));
    ch.not_after = Some(1);
    let ch = v.sign(ch);
    assert_eq!(ch.len(), MAX_CHALLENGE_LEN);
    let mut m =
        GroupMessage::decode(&TestV::new().group_message(G, 1, 1, 1, &[0; 16], b"")).unwrap();
    m.c = Bytes::from(vec![0u8; crate::protocol::wire::MAX_GROUP_CIPHERTEXT]);
    assert_eq!(m.encoded_len(), MAX_GROUP_MESSAGE_LEN);
    assert_eq!(
        state::MAX_RESPONSE_LEN,
        Response {
            id: MemberId(1),
            kv: 1,
            group: G,
            round: 1,
            n_i: [0; 16],
            e_i: Some([0; 32]),
            c: Bytes::from(vec![0u8; MAX_PAYLOAD]),
            tag: [0; 16],
        }
        .encoded_len()
    );
}

#[test]
fn unusable_credentials_are_refused() {
    let v = TestV::new();
    let mut cred = v.credential(ID, &[G.0]);
    cred.root_public_key = [0; 32];
    assert_eq!(
        Member::new(&cred).map(|_| ()),
        Err(MemberError::InvalidCredential("root public key"))
    );
    let cred = v.credential(ID, &(0..=256).collect::<Vec<u32>>());
    assert_eq!(
        Member::new(&cred).map(|_| ()),
        Err(MemberError::InvalidCredential("too many groups"))
    );
    // Duplicate groups collapse; the most a state can hold still restores.
    let cred = v.credential(ID, &[(0..256).collect::<Vec<u32>>(), vec![0]].concat());
    let m = Member::new(&cred).unwrap();
    assert!(Member::restore(&cred, &m.state_bytes(), &mut TestRng::new(77)).is_ok());
}

#[test]
fn a_confirm_overtaken_by_a_rekey_keeps_the_newer_epoch() {
    // Session S1 in epoch 1; the member answers round 2 (pending S2). V
    // confirms round 2 in epoch 1, then a revocation rekeys S1 to epoch 2;
    // the rekey arrives first.
    let mut f = fixture(false);
    let cred = f.v.credential(ID, &[G.0, G2.0]);
    let ch = f.v.sign(challenge(G, 2));
    let resp = answer(&mut f.member, &ch, &mut f.rng, &mut f.disk);
    let (_, _, keys2) = f.v.accept(&ch, &resp, &cred.key, None);
    let conf = f.v.confirm(G, 2, 1, ID, &keys2, &f.gk);
    let gk2 = [0x49; 16];
    let rekey = f.v.rekey(&f.keys, G, ID, 2, 1, &gk2);
    f.disk.commit(f.member.handle_rekey(&rekey).unwrap());
    assert_eq!(f.member.session(G), Some((SessionId(f.keys.sid), 2)));

    // The late confirm switches the session but not back to the ended epoch.
    f.disk.commit(f.member.handle_confirm(&conf).unwrap());
    assert_eq!(f.member.session(G), Some((SessionId(keys2.sid), 2)));
    let m = f.v.group_message(G, 2, 1, 2, &gk2, b"after revocation");
    let out = f.member.handle_group_message(&m).unwrap();
    assert_eq!(out.event().payload.as_slice(), b"after revocation");
    f.disk.commit(out);
    // The kept epoch survives a reboot.
    let restored = Member::restore(
        &cred,
        f.disk.state.as_deref().unwrap(),
        &mut TestRng::new(77),
    )
    .unwrap();
    assert_eq!(restored.session(G), Some((SessionId(keys2.sid), 2)));
}

/// A stored ack must be this member's ack in that group, and its counter
/// one the state reserved (else the member could seal a new uplink with
/// it under the same key): a state breaking either is refused, checksum
/// notwithstanding.
#[test]
fn a_stored_ack_must_fit_its_group_and_its_reserved_counters() {
    let (cred, bytes) = rich_state();
    let state = MemberState::decode(&bytes).unwrap();
    assert!(
        state.groups[&G].applied_ack.is_some(),
        "the fixture holds an ack"
    );
    // Its counter above what the state reserved.
    let mut st = state.clone();
    st.groups
        .get_mut(&G)
        .unwrap()
        .session
        .as_mut()
        .unwrap()
        .ctr_reserved = 0;
    assert_eq!(
        Member::restore(&cred, &st.to_bytes(), &mut TestRng::new(77)).map(|_| ()),
        Err(MemberError::BadState("state.applied_ack.ctr"))
    );
    // Another group's ack.
    let mut st = state.clone();
    let g = st.groups.get_mut(&G).unwrap();
    let a = g.applied_ack.as_mut().unwrap();
    let mut ack = a.ack.to_vec();
    ack[2..6].copy_from_slice(&G2.0.to_be_bytes());
    a.ack = Bytes::from(ack);
    assert_eq!(
        Member::restore(&cred, &st.to_bytes(), &mut TestRng::new(77)).map(|_| ()),
        Err(MemberError::BadState("state.applied_ack"))
    );
}
