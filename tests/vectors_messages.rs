//! Known-answer vectors for every message type, in both modes
//! (`tests/vectors/messages_psk.json`, `tests/vectors/messages_psk_ecdhe.json`).
//!
//! The files come from one deterministic run of the in-memory network of
//! `tests/common` (members, aggregator, verifier; SplitMix64 seeded with 7,
//! MS = 0x42 x 32, root key seed 0x01 x 32, online key seed 0x02 x 32, key id
//! 5, group 1, members 1..=3, gateway `gw-test`, chunk size 2).
//!
//! - `message_vectors_match_the_code` replays the run and compares every
//!   byte and value.
//! - `message_vectors_match_an_independent_computation` takes each vector on
//!   its own: decodes and re-encodes it with the codec, verifies every
//!   signature with plain `ed25519-dalek` (strict), opens every AEAD with
//!   plain `aes-gcm` using the keys in the vector and AAD assembled here
//!   from docs/protocol.md, re-derives the keys with `hkdf`, and recomputes
//!   every aggregate and hash with `sha2`.
//! - The ignored `generate_message_vectors` wrote the files.

mod common;

use std::collections::BTreeMap;

use aes_gcm::aead::AeadInOut;
use aes_gcm::{Aes128Gcm, KeyInit};
use bytes::Bytes;
use common::*;
use dapgw::protocol::aggregator::answer_tag_request;
use dapgw::protocol::keys::{
    MasterSecret, MemberKeyDeriver, response_keys, session_keys, sign_key_certificate,
    transcript_hash,
};
use dapgw::protocol::member::{MemberError, direct};
use dapgw::protocol::suite::{EphemeralKeyPair, Gcm, SigningKey};
use dapgw::protocol::verifier::{BatchEvent, BatchState, MemberStatus};
use dapgw::protocol::wire::{
    AckPayload, Batch, BatchBody, Challenge, Direct, GroupId, KeyCertificate, KeyUpdate, MemberId,
    Message, Mode, Purpose, Response, Uplink, UplinkKind, Verdict, VerdictBody,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const G: u32 = 1;
const IDS: [u64; 3] = [1, 2, 3];

fn path(mode: Mode) -> String {
    let name = match mode {
        Mode::Psk => "messages_psk.json",
        Mode::PskEcdhe => "messages_psk_ecdhe.json",
    };
    format!("{}/tests/vectors/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn h(b: impl AsRef<[u8]>) -> String {
    hex::encode(b)
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Psk => "psk",
        Mode::PskEcdhe => "psk-ecdhe",
    }
}

/// Wraps the run's generator and remembers every `fill_bytes` request, so
/// the member's ephemeral secret (drawn inside `respond`) can be recorded.
struct Recorder<'a> {
    inner: &'a mut TestRng,
    fills: Vec<Vec<u8>>,
}

impl rand_core::TryRng for Recorder<'_> {
    type Error = core::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        self.inner.try_next_u32()
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        self.inner.try_next_u64()
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        self.inner.try_fill_bytes(dst)?;
        self.fills.push(dst.to_vec());
        Ok(())
    }
}
impl rand_core::TryCryptoRng for Recorder<'_> {}

/// Session secrets by (member, sid), filled as responses are sealed.
type Sessions = BTreeMap<(u64, [u8; 8]), Value>;

/// One vector.
fn vector(name: &str, bytes: &[u8], fields: Value, secrets: Value) -> Value {
    json!({ "name": name, "hex": h(bytes), "fields": fields, "secrets": secrets })
}

/// The member's answer, with the ephemeral secret it drew (psk-ecdhe).
fn answer(w: &mut World, id: u64, challenge: &Bytes) -> (Bytes, Option<[u8; 32]>) {
    let node = w.nodes.get_mut(&id).unwrap();
    let mut rec = Recorder {
        inner: &mut w.rng,
        fills: Vec::new(),
    };
    let dapgw::protocol::member::Challenged::Answer(a) =
        node.member.handle_challenge(challenge, None).unwrap()
    else {
        panic!("fresh challenge expected");
    };
    let payload = if a.read_request().is_some() {
        node.reading.clone()
    } else {
        Vec::new()
    };
    let out = a.respond(&payload, &mut rec).unwrap();
    if let Some(s) = out.state() {
        node.disk = Some(s.to_vec());
    }
    let bytes = out.persisted();
    let e_i = Response::decode(&bytes).unwrap().e_i;
    let secret = e_i.map(|public| {
        rec.fills
            .iter()
            .filter_map(|f| <[u8; 32]>::try_from(f.as_slice()).ok())
            .find(|s| EphemeralKeyPair::from_secret_bytes(s).public() == public)
            .expect("e_i drawn through fill_bytes")
    });
    (bytes, secret)
}

/// A Response vector and its session's secrets.
fn response_vector(
    name: &str,
    bytes: &Bytes,
    ch: &Bytes,
    e_v_secret: Option<[u8; 32]>,
    e_i_secret: Option<[u8; 32]>,
    payload: &[u8],
    sessions: &mut Sessions,
) -> Value {
    let r = Response::decode(bytes).unwrap();
    let ch_hash: [u8; 32] = Sha256::digest(ch).into();
    let k_i = MemberKeyDeriver::new(&MasterSecret::from_bytes(MS)).member_key(r.id.0, r.kv);
    let th = transcript_hash(&ch_hash, r.id.0, r.kv, &r.n_i, r.e_i.as_ref());
    let (rk, prk0) = response_keys(&k_i, &th);
    let shared = e_v_secret.map(|s| {
        EphemeralKeyPair::from_secret_bytes(&s)
            .diffie_hellman(&r.e_i.unwrap())
            .unwrap()
    });
    let sk = session_keys(&prk0, shared.as_ref());
    let session = json!({
        "k_conf": h(sk.k_conf.expose()), "iv_conf": h(sk.iv_conf.expose()),
        "k_up": h(sk.k_up.expose()), "iv_up": h(sk.iv_up.expose()),
        "k_down": h(sk.k_down.expose()), "sid": h(sk.sid),
    });
    sessions.insert((r.id.0, sk.sid), session.clone());
    let mut secrets = json!({
        "k_i": h(k_i.expose()), "th": h(th), "prk0": h(prk0.expose()),
        "k_resp": h(rk.k_resp.expose()), "iv_resp": h(rk.iv_resp.expose()),
        "e_i_secret": e_i_secret.map(h),
        "shared_secret": shared.as_ref().map(|s| h(s.expose())),
    });
    secrets
        .as_object_mut()
        .unwrap()
        .extend(session.as_object().unwrap().clone());
    vector(
        name,
        bytes,
        json!({
            "id": r.id.0, "kv": r.kv, "group": r.group.0, "round": r.round,
            "mode": mode_name(r.mode()), "n_i": h(r.n_i), "e_i": r.e_i.map(h),
            "ch_hash": h(ch_hash), "payload": h(payload), "tag": h(r.tag),
        }),
        secrets,
    )
}

fn challenge_vector(name: &str, bytes: &Bytes, e_v_secret: Option<[u8; 32]>) -> Value {
    let c = Challenge::decode(bytes).unwrap();
    let read_req = match &c.purpose {
        Purpose::Auth => None,
        Purpose::Read(r) => Some(h(r)),
    };
    vector(
        name,
        bytes,
        json!({
            "group": c.group.0, "round": c.round, "epoch": c.epoch, "nonce_v": h(c.nonce_v),
            "e_v": c.e_v.map(h), "read_req": read_req, "group_seq": c.group_seq,
            "config_hash": h(c.config_hash), "not_after": c.not_after,
            "key_cert": c.key_cert.map(|k| h(k.to_bytes())), "key_id": c.key_id,
            "ch_hash": h(Sha256::digest(bytes)),
        }),
        json!({ "e_v_secret": e_v_secret.map(h) }),
    )
}

fn batch_vector(name: &str, bytes: &Bytes, tags: &[[u8; 16]]) -> Value {
    let b = Batch::decode(bytes).unwrap();
    let (kind, round, mode, count) = match &b.body {
        BatchBody::Responses {
            round,
            mode,
            entries,
        } => (
            "responses",
            Some(*round),
            Some(mode_name(*mode)),
            entries.len(),
        ),
        BatchBody::Uplinks { entries } => ("uplinks", None, None, entries.len()),
    };
    vector(
        name,
        bytes,
        json!({
            "gateway_id": b.gateway_id.as_str(), "batch_id": b.batch_id, "kind": kind,
            "group": b.group.0, "round": round, "mode": mode, "chunk_size": b.chunk_size,
            "count": count, "aggregates": b.aggregates.iter().map(h).collect::<Vec<_>>(),
            "batch_hash": h(Sha256::digest(bytes)),
        }),
        json!({ "gateway_tags": tags.iter().map(h).collect::<Vec<_>>() }),
    )
}

fn verdict_vector(name: &str, bytes: &[u8], batch: &str) -> Value {
    let v = Verdict::decode(&Bytes::copy_from_slice(bytes)).unwrap();
    let body = match &v.body {
        VerdictBody::Final { outcomes, confirms } => json!({
            "status": "final",
            "outcomes": outcomes.iter().map(|o| o.code()).collect::<Vec<_>>(),
            "confirms": confirms.iter().map(|c| h(c.to_bytes())).collect::<Vec<_>>(),
        }),
        VerdictBody::TagsRequested { chunks } => json!({
            "status": "tags requested", "chunks": chunks,
        }),
    };
    let mut fields = json!({
        "of_batch": batch, "gateway_id": v.gateway_id.as_str(), "batch_id": v.batch_id,
        "batch_hash": h(v.batch_hash),
    });
    fields
        .as_object_mut()
        .unwrap()
        .extend(body.as_object().unwrap().clone());
    vector(name, bytes, fields, json!({}))
}

fn uplink_vector(name: &str, bytes: &Bytes, payload: &[u8], sessions: &Sessions) -> Value {
    let u = Uplink::decode(bytes).unwrap();
    let s = &sessions[&(u.id.0, u.sid.0)];
    let mut fields = json!({
        "group": u.group.0, "id": u.id.0, "sid": h(u.sid.0), "kind": u.kind.code(),
        "ctr": u.ctr, "payload": h(payload), "tag": h(u.tag),
    });
    if u.kind == UplinkKind::Ack {
        let a = AckPayload::decode(payload).unwrap();
        fields["ack"] = json!({
            "group": a.group.0, "epoch": a.epoch, "seq": a.seq, "message_hash": h(a.message_hash),
        });
    }
    vector(
        name,
        bytes,
        fields,
        json!({ "k_up": s["k_up"], "iv_up": s["iv_up"] }),
    )
}

fn gk(w: &World) -> [u8; 16] {
    *w.udc.groups[&GroupId(G)].gk.expose()
}

fn e_v_secret_of(w: &World, round: u64) -> Option<[u8; 32]> {
    let rs = &w.udc.rounds[&(GroupId(G), round)];
    rs.e_v_secret.as_ref().map(|s| {
        let v: Vec<u8> = serde_json::from_value(serde_json::to_value(s).unwrap()).unwrap();
        v.try_into().unwrap()
    })
}

/// Sends a batch to V, answering tag requests from `kept`; every answer.
fn submit_with(
    w: &mut World,
    bytes: Bytes,
    kept: &dapgw::protocol::aggregator::KeptTags,
) -> (Vec<Bytes>, Vec<Bytes>) {
    let mut answers = vec![w.udc.handle_batch(bytes).unwrap()];
    let mut replies = Vec::new();
    while let Some(req) = tag_request(answers.last().unwrap()) {
        let reply = answer_tag_request(kept, &req).unwrap();
        replies.push(reply.to_bytes());
        answers.push(w.udc.handle_tag_reply(&reply).unwrap());
    }
    (answers.into_iter().map(|a| a.answer).collect(), replies)
}

/// The whole deterministic run of one mode.
fn compute(mode: Mode) -> Value {
    let mut w = World::with_members(2, &[G], IDS);
    let mut out = Vec::new();
    let mut sessions = Sessions::new();
    let g = GroupId(G);

    // The online key's certificate, as the verifier embeds it.
    let online = SigningKey::from_seed(&[2; 32]).verifying_key().to_bytes();
    let cert = KeyCertificate {
        key_id: KEY_ID,
        key_version: 1,
        public_key: online,
        root_sig: sign_key_certificate(&w.root, KEY_ID, 1, &online),
    };
    out.push(vector(
        "key_certificate",
        &cert.to_bytes(),
        json!({ "key_id": KEY_ID, "key_version": 1, "public_key": h(online) }),
        json!({ "root_seed": h([1u8; 32]), "online_seed": h([2u8; 32]) }),
    ));

    // Flow C, purpose auth: challenge, three responses, one batch of two
    // chunks, the final verdict with three confirms.
    let gk1 = gk(&w);
    let (ch, round1) = w.open_round(G, mode, Purpose::Auth);
    let e_v1 = e_v_secret_of(&w, round1);
    out.push(challenge_vector("challenge_auth", &ch, e_v1));
    let mut tags = Vec::new();
    for id in IDS {
        let (bytes, e_i) = answer(&mut w, id, &ch);
        tags.push(Response::decode(&bytes).unwrap().tag);
        let name = format!("response_auth_{id}");
        out.push(response_vector(
            &name,
            &bytes,
            &ch,
            e_v1,
            e_i,
            &[],
            &mut sessions,
        ));
        w.collect(&bytes);
    }
    let batches = w.flush();
    assert_eq!(batches.len(), 1);
    out.push(batch_vector("batch_responses", &batches[0].bytes, &tags));
    let outs = w.submit(batches[0].bytes.clone()).unwrap();
    assert_eq!(outs.len(), 1, "an honest batch is final at once");
    out.push(verdict_vector(
        "verdict_final",
        &outs[0].answer,
        "batch_responses",
    ));
    let verdict = final_verdict(&outs[0]);
    let VerdictBody::Final { confirms, .. } = &verdict.body else {
        unreachable!()
    };
    for c in confirms.clone() {
        let s = &sessions[&(c.id.0, c.sid.0)];
        out.push(vector(
            &format!("confirm_{}", c.id.0),
            &c.to_bytes(),
            json!({ "group": c.group.0, "round": c.round, "epoch": c.epoch, "id": c.id.0, "sid": h(c.sid.0) }),
            json!({ "k_conf": s["k_conf"], "iv_conf": s["iv_conf"], "gk": h(gk1) }),
        ));
        w.node(c.id.0).confirm(&c.to_bytes()).unwrap();
    }

    // Uplinks: a reading, an alarm; a group message and its three acks; one
    // batch of all five.
    let mut up_tags = BTreeMap::new();
    let mut collect_up =
        |w: &mut World, out: &mut Vec<Value>, name: &str, bytes: &Bytes, p: &[u8]| {
            let u = Uplink::decode(bytes).unwrap();
            up_tags.insert((u.id.0, u.sid.0, u.ctr), u.tag);
            out.push(uplink_vector(name, bytes, p, &sessions));
            w.collect(bytes);
        };
    let reading = b"A+ 0042.17 kWh".to_vec();
    let up = w.node(1).uplink(g, UplinkKind::Reading, &reading).unwrap();
    collect_up(&mut w, &mut out, "uplink_reading", &up, &reading);
    let alarm = b"tamper: cover open".to_vec();
    let up = w.node(2).uplink(g, UplinkKind::Alarm, &alarm).unwrap();
    collect_up(&mut w, &mut out, "uplink_alarm", &up, &alarm);
    let update = b"tariff: peak 17-20h".to_vec();
    let gm = w
        .udc
        .verifier
        .group_message(
            w.udc.groups.get_mut(&g).unwrap(),
            &update,
            round1,
            &mut w.rng,
        )
        .unwrap();
    let m = dapgw::protocol::wire::GroupMessage::decode(&gm).unwrap();
    out.push(vector(
        "group_message",
        &gm,
        json!({
            "group": m.group.0, "epoch": m.epoch, "seq": m.seq,
            "valid_through_round": m.valid_through_round, "nonce": h(m.nonce),
            "key_id": m.key_id, "payload": h(&update),
        }),
        json!({ "gk": h(gk1) }),
    ));
    for id in IDS {
        let (_, ack) = w.node(id).group_message(&gm).unwrap();
        let u = Uplink::decode(&ack).unwrap();
        let s = &sessions[&(id, u.sid.0)];
        let plain = open_uplink(s, &u);
        collect_up(&mut w, &mut out, &format!("uplink_ack_{id}"), &ack, &plain);
    }
    w.advance(w.gateway.config().uplink_linger);
    let batches = w.flush();
    assert_eq!(batches.len(), 1);
    let b = Batch::decode(&batches[0].bytes).unwrap();
    let BatchBody::Uplinks { entries } = &b.body else {
        unreachable!()
    };
    let tags: Vec<[u8; 16]> = entries
        .iter()
        .map(|e| up_tags[&(e.id.0, e.sid.0, e.ctr)])
        .collect();
    out.push(batch_vector("batch_uplinks", &batches[0].bytes, &tags));
    let outs = w.submit(batches[0].bytes.clone()).unwrap();
    assert_eq!(outs.len(), 1);
    out.push(verdict_vector(
        "verdict_uplinks",
        &outs[0].answer,
        "batch_uplinks",
    ));

    // Revocation of member 3: a new epoch, one rekey per session of 1 and 2.
    let rekeys = w
        .udc
        .verifier
        .revoke(
            w.udc.groups.get_mut(&g).unwrap(),
            MemberId(3),
            &mut w.udc.sessions,
            &mut w.rng,
        )
        .unwrap();
    w.udc.registry.get_mut(MemberId(3)).unwrap().status = MemberStatus::Revoked;
    let gk2 = gk(&w);
    for r in &rekeys {
        let s = &sessions[&(r.id.0, r.sid.0)];
        out.push(vector(
            &format!("rekey_{}", r.id.0),
            &r.to_bytes(),
            json!({
                "group": r.group.0, "id": r.id.0, "sid": h(r.sid.0), "new_epoch": r.new_epoch,
                "down_ctr": r.down_ctr, "nonce": h(r.nonce),
            }),
            json!({ "k_down": s["k_down"], "gk_new": h(gk2) }),
        ));
        assert_eq!(w.node(r.id.0).rekey(&r.to_bytes()), Ok(2));
    }

    // Flow C, purpose read, through a gateway that alters member 1's entry:
    // V asks for chunk 0's tags, the gateway answers, V sets entry 1 aside
    // as unverified via gateway, accepts member 2 and refuses revoked 3.
    let (ch, round2) = w.open_round(G, mode, Purpose::Read(Bytes::from_static(b"A+ kWh")));
    let e_v2 = e_v_secret_of(&w, round2);
    out.push(challenge_vector("challenge_read", &ch, e_v2));
    for id in IDS {
        let (bytes, e_i) = answer(&mut w, id, &ch);
        let reading = w.node(id).reading.clone();
        out.push(response_vector(
            &format!("response_read_{id}"),
            &bytes,
            &ch,
            e_v2,
            e_i,
            &reading,
            &mut sessions,
        ));
        w.collect(&bytes);
    }
    let honest = w.flush().pop().unwrap();
    let mut altered = Batch::decode(&honest.bytes).unwrap();
    let BatchBody::Responses { entries, .. } = &mut altered.body else {
        unreachable!()
    };
    let mut c = entries[0].c.to_vec();
    c[0] ^= 1;
    entries[0].c = Bytes::from(c);
    let (bytes, kept) = reseal(&altered, &honest.tags.tags);
    out.push(batch_vector("batch_read_altered", &bytes, &kept.tags));
    let (answers, replies) = submit_with(&mut w, bytes, &kept);
    assert_eq!((answers.len(), replies.len()), (2, 1));
    out.push(verdict_vector(
        "verdict_tags_requested",
        &answers[0],
        "batch_read_altered",
    ));
    let reply = dapgw::protocol::wire::TagReply::decode(&replies[0]).unwrap();
    out.push(vector(
        "tag_reply",
        &replies[0],
        json!({
            "gateway_id": reply.gateway_id.as_str(), "batch_id": reply.batch_id,
            "batch_hash": h(reply.batch_hash),
            "chunks": reply.chunks.iter().map(|c| json!({
                "chunk": c.chunk, "tags": c.tags.iter().map(h).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        }),
        json!({}),
    ));
    out.push(verdict_vector(
        "verdict_read_final",
        &answers[1],
        "batch_read_altered",
    ));
    let v = Verdict::decode(&answers[1]).unwrap();
    let VerdictBody::Final { confirms, .. } = &v.body else {
        unreachable!()
    };
    assert_eq!(confirms.len(), 1);
    let c = &confirms[0];
    let s = &sessions[&(c.id.0, c.sid.0)];
    out.push(vector(
        &format!("confirm_read_{}", c.id.0),
        &c.to_bytes(),
        json!({ "group": c.group.0, "round": c.round, "epoch": c.epoch, "id": c.id.0, "sid": h(c.sid.0) }),
        json!({ "k_conf": s["k_conf"], "iv_conf": s["iv_conf"], "gk": h(gk2) }),
    ));
    w.node(c.id.0).confirm(&c.to_bytes()).unwrap();

    // Key update of member 1 (its session of the auth round).
    let record = w.udc.registry.get_mut(MemberId(1)).unwrap().clone();
    let slot = w.udc.sessions.get_mut(g, MemberId(1)).unwrap();
    let issued = w.udc.verifier.key_update(slot, &record, &mut w.rng);
    let k_i2 = MemberKeyDeriver::new(&MasterSecret::from_bytes(MS)).member_key(1, 2);
    match mode {
        Mode::PskEcdhe => {
            let issued = issued.unwrap();
            assert_eq!(issued.updates.len(), 1);
            let k = &issued.updates[0];
            let s = &sessions[&(1, k.sid.0)];
            out.push(vector(
                "key_update",
                &k.to_bytes(),
                json!({
                    "group": k.group.0, "id": k.id.0, "sid": h(k.sid.0), "new_kv": k.new_kv,
                    "down_ctr": k.down_ctr, "nonce": h(k.nonce),
                }),
                json!({ "k_down": s["k_down"], "k_i_new": h(k_i2.expose()) }),
            ));
            assert_eq!(w.node(1).key_update(&k.to_bytes()), Ok(2));
        }
        Mode::Psk => {
            // V refuses to issue one; a key update sealed anyway under the
            // psk session's k_down is refused by the member.
            let refusal = issued.expect_err("refused in psk").to_string();
            let current = slot.current.as_ref().unwrap();
            let (sid, down_ctr) = (current.sid, current.down_ctr + 1);
            let s = sessions[&(1, sid.0)].clone();
            let mut nonce = [0u8; 12];
            rand_core::Rng::fill_bytes(&mut w.rng, &mut nonce);
            let mut k = KeyUpdate {
                group: g,
                id: MemberId(1),
                sid,
                new_kv: 2,
                down_ctr,
                nonce,
                c: [0; 48],
            };
            let mut buf = *k_i2.expose();
            let k_down: [u8; 16] = hex::decode(s["k_down"].as_str().unwrap())
                .unwrap()
                .try_into()
                .unwrap();
            let tag = Gcm::new(&k_down).seal_in_place(&nonce, &k.aad(), &mut buf);
            k.c[..32].copy_from_slice(&buf);
            k.c[32..].copy_from_slice(&tag);
            let member = w.node(1).key_update(&k.to_bytes());
            assert_eq!(member, Err(MemberError::KeyUpdateInPskSession));
            out.push(vector(
                "key_update_refused",
                &k.to_bytes(),
                json!({
                    "group": k.group.0, "id": k.id.0, "sid": h(k.sid.0), "new_kv": k.new_kv,
                    "down_ctr": k.down_ctr, "nonce": h(k.nonce),
                    "refused_by_verifier": refusal,
                    "refused_by_member": format!("{:?}", member.unwrap_err()),
                }),
                json!({ "k_down": s["k_down"], "k_i_new": h(k_i2.expose()) }),
            ));
        }
    }

    // Flow A: member 2 sends a reading straight to V in its read-round
    // session.
    let reading = b"A+ 0042.18 kWh".to_vec();
    let up = w.node(2).uplink(g, UplinkKind::Reading, &reading).unwrap();
    let d = direct(&up).unwrap();
    let res = w
        .udc
        .verifier
        .handle_direct(
            &Direct::decode(&d).unwrap(),
            BatchState {
                group: &w.udc.groups[&g],
                round: None,
                sessions: &mut w.udc.sessions,
            },
            &w.udc.registry,
            &mut w.udc.log,
            NOW,
        )
        .unwrap();
    assert!(matches!(res.event, BatchEvent::Uplinks(_)));
    let u = Uplink::decode(&up).unwrap();
    let s = &sessions[&(2, u.sid.0)];
    out.push(vector(
        "direct_uplink",
        &d,
        json!({
            "inner": h(&up), "aggregate": h(Direct::decode(&d).unwrap().aggregate),
            "inner_kind": u.kind.code(), "inner_ctr": u.ctr, "inner_sid": h(u.sid.0),
            "payload": h(&reading), "outcome": res.outcome.code(),
        }),
        json!({ "k_up": s["k_up"], "iv_up": s["iv_up"] }),
    ));

    json!({
        "description": "dapgw v1 messages (docs/protocol.md, Messages and Known-answer vectors). \
            One deterministic run of tests/common's in-memory network; hex is the complete \
            message. fields are decoded values (integers as numbers, byte strings as \
            lowercase hex, outcome/kind/mode codes as on the wire); secrets are what an \
            independent implementation needs to check the vector.",
        "mode": mode_name(mode),
        "ms": h(MS),
        "root_public": h(w.root.verifying_key().to_bytes()),
        "online_public": h(online),
        "key_id": KEY_ID,
        "group": G,
        "gk": { "1": h(gk1), "2": h(gk2) },
        "vectors": out,
    })
}

/// Opens an uplink with the session's keys (the generator's own view).
fn open_uplink(s: &Value, u: &Uplink) -> Vec<u8> {
    let key = unhex(&s["k_up"]);
    let mut nonce: [u8; 12] = unhex(&s["iv_up"]).try_into().unwrap();
    for (n, c) in nonce[4..].iter_mut().zip(u.ctr.to_be_bytes()) {
        *n ^= c;
    }
    let mut buf = u.c.to_vec();
    Aes128Gcm::new_from_slice(&key)
        .unwrap()
        .decrypt_inout_detached(
            &nonce.into(),
            &u.aad(),
            buf.as_mut_slice().into(),
            &u.tag.into(),
        )
        .unwrap();
    buf
}

fn load(mode: Mode) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path(mode)).unwrap()).unwrap()
}

#[test]
#[ignore = "writes tests/vectors/messages_*.json; run once, then review and commit"]
fn generate_message_vectors() {
    for mode in [Mode::Psk, Mode::PskEcdhe] {
        let text = serde_json::to_string_pretty(&compute(mode)).unwrap();
        std::fs::write(path(mode), text + "\n").unwrap();
    }
}

#[test]
fn message_vectors_match_the_code() {
    for mode in [Mode::Psk, Mode::PskEcdhe] {
        let (file, now) = (load(mode), compute(mode));
        // Vector by vector first, so a mismatch names the message.
        let (a, b) = (
            file["vectors"].as_array().unwrap(),
            now["vectors"].as_array().unwrap(),
        );
        assert_eq!(a.len(), b.len(), "{}", mode_name(mode));
        for (x, y) in a.iter().zip(b) {
            assert_eq!(x, y, "{} {}", mode_name(mode), x["name"]);
        }
        assert_eq!(file, now, "{}", mode_name(mode));
    }
}

fn unhex(v: &Value) -> Vec<u8> {
    hex::decode(v.as_str().unwrap()).unwrap()
}

// ---- the independent side: nothing below uses dapgw except the codec ----

fn arr<const N: usize>(v: &Value) -> [u8; N] {
    unhex(v).try_into().unwrap()
}

fn num(v: &Value) -> u64 {
    v.as_u64().unwrap()
}

fn be32(v: &Value) -> [u8; 4] {
    u32::try_from(num(v)).unwrap().to_be_bytes()
}

fn be64(v: &Value) -> [u8; 8] {
    num(v).to_be_bytes()
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn hkdf_extract(salt: &[u8], ikm: &[u8]) -> Vec<u8> {
    hkdf::Hkdf::<Sha256>::extract(Some(salt), ikm).0.to_vec()
}

fn hkdf_expand(prk: &[u8], info: &[u8], len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    hkdf::Hkdf::<Sha256>::from_prk(prk)
        .unwrap()
        .expand(info, &mut out)
        .unwrap();
    out
}

/// K_i from MS, as in the key schedule section.
fn member_key(ms: &[u8], id: u64, kv: u32) -> Vec<u8> {
    let prk = hkdf_extract(b"dapgw v1 member root", ms);
    let info = cat(&[b"dapgw v1 member", &id.to_be_bytes(), &kv.to_be_bytes()]);
    hkdf_expand(&prk, &info, 32)
}

/// AES-128-GCM open of `ct || tag` with the plain `aes-gcm` crate.
fn gcm_open(key: &[u8], nonce: &[u8], aad: &[u8], ct_tag: &[u8]) -> Vec<u8> {
    let (ct, tag) = ct_tag.split_at(ct_tag.len() - 16);
    let mut buf = ct.to_vec();
    let nonce: [u8; 12] = nonce.try_into().unwrap();
    let tag: [u8; 16] = tag.try_into().unwrap();
    Aes128Gcm::new_from_slice(key)
        .unwrap()
        .decrypt_inout_detached(&nonce.into(), aad, buf.as_mut_slice().into(), &tag.into())
        .expect("AEAD opens");
    buf
}

fn verify_sig(public: &[u8], label: &[u8], signed: &[u8], sig: &[u8]) {
    let key = ed25519_dalek::VerifyingKey::from_bytes(&public.try_into().unwrap()).unwrap();
    let sig = ed25519_dalek::Signature::from_bytes(&sig.try_into().unwrap());
    key.verify_strict(&cat(&[label, signed]), &sig)
        .expect("signature verifies");
}

fn aggregate_of(tags: &[Vec<u8>]) -> Vec<u8> {
    let mut hsh = Sha256::new();
    hsh.update(b"dapgw v1 aggregate");
    for t in tags {
        hsh.update(t);
    }
    hsh.finalize()[..16].to_vec()
}

/// An unsigned LEB128 varint at `at`, minimal: the value and the offset
/// after it.
fn leb128(b: &[u8], mut at: usize) -> (u64, usize) {
    let (mut v, mut shift) = (0u64, 0);
    loop {
        let byte = b[at];
        at += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            assert!(byte != 0 || shift == 0, "non-minimal varint");
            return (v, at);
        }
        shift += 7;
    }
}

/// Parses a batch's header and entries (docs/protocol.md, "Batch") and
/// rebuilds each entry's Response or Uplink message with its tag.
fn batch_entries_as_messages(b: &[u8], f: &Value, tags: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let gw = usize::from(b[2]);
    let mut at = 3 + gw + 8;
    let kind = b[at];
    let group = &b[at + 1..at + 5];
    assert_eq!(group, be32(&f["group"]));
    at += 5;
    let (round, mode) = if kind == 1 {
        let r = &b[at..at + 8];
        at += 9;
        (Some(r), b[at - 1])
    } else {
        (None, 0)
    };
    let count = u32::from_be_bytes(b[at + 2..at + 6].try_into().unwrap()) as usize;
    at += 6;
    let (mut prev_id, mut prev_kv) = (0u64, 0u64);
    let mut out = Vec::new();
    for tag in tags.iter().take(count) {
        let (z, next) = leb128(b, at);
        // ZigZag delta from the previous id, modulo 2^64.
        let delta = ((z >> 1) as i64) ^ -((z & 1) as i64);
        let id = prev_id.wrapping_add(delta as u64);
        prev_id = id;
        at = next;
        let mut m = vec![1u8];
        if let Some(round) = round {
            let (len_kv, next) = leb128(b, at);
            at = next;
            if len_kv & 1 == 1 {
                let (kv, next) = leb128(b, at);
                assert_ne!(kv, prev_kv);
                (prev_kv, at) = (kv, next);
            }
            let len = (len_kv >> 1) as usize;
            let fixed = 16 + if mode == 2 { 32 } else { 0 };
            m.push(0x02);
            m.extend(id.to_be_bytes());
            m.extend(u32::try_from(prev_kv).unwrap().to_be_bytes());
            m.extend(group);
            m.extend(round);
            m.push(mode);
            m.extend(&b[at..at + fixed]);
            m.extend(u16::try_from(len).unwrap().to_be_bytes());
            m.extend(&b[at + fixed..at + fixed + len]);
            at += fixed + len;
        } else {
            let sid = &b[at..at + 8];
            let (ctr, next) = leb128(b, at + 8);
            let (len_kind, next) = leb128(b, next);
            let len = (len_kind >> 2) as usize;
            m.push(0x03);
            m.extend(group);
            m.extend(id.to_be_bytes());
            m.extend(sid);
            m.push((len_kind & 3) as u8);
            m.extend(ctr.to_be_bytes());
            m.extend(u16::try_from(len).unwrap().to_be_bytes());
            m.extend(&b[next..next + len]);
            at = next + len;
        }
        m.extend(tag);
        out.push(m);
    }
    // Only the aggregates follow.
    assert_eq!(
        b.len() - at,
        16 * count.div_ceil(num(&f["chunk_size"]) as usize)
    );
    out
}

/// `vec16` at `at`: the bytes and the offset after them.
fn vec16(b: &[u8], at: usize) -> (&[u8], usize) {
    let n = usize::from(u16::from_be_bytes([b[at], b[at + 1]]));
    (&b[at + 2..at + 2 + n], at + 2 + n)
}

fn x25519_public(secret: [u8; 32]) -> [u8; 32] {
    x25519_dalek::x25519(secret, x25519_dalek::X25519_BASEPOINT_BYTES)
}

/// Checks one file on its own.
fn check_file(v: &Value) {
    let ms = unhex(&v["ms"]);
    let vectors = v["vectors"].as_array().unwrap();
    let by_name: BTreeMap<&str, &Value> = vectors
        .iter()
        .map(|x| (x["name"].as_str().unwrap(), x))
        .collect();
    let ecdhe = v["mode"] == "psk-ecdhe";
    let root_public = unhex(&v["root_public"]);
    let online_public = unhex(&v["online_public"]);
    let mut types = std::collections::BTreeSet::new();
    // Tags sealed by members, for the batch checks.
    let member_tags: Vec<Vec<u8>> = vectors
        .iter()
        .filter(|x| matches!(unhex(&x["hex"])[1], 0x02 | 0x03))
        .map(|x| unhex(&x["fields"]["tag"]))
        .collect();
    for x in vectors {
        let name = x["name"].as_str().unwrap();
        let b = unhex(&x["hex"]);
        let (f, s) = (&x["fields"], &x["secrets"]);
        // The codec decodes it and re-encodes it byte for byte.
        let bytes = Bytes::from(b.clone());
        let msg = Message::decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(msg.to_bytes(), bytes, "{name}: re-encoding");
        assert_eq!(b[0], 1, "{name}: version");
        types.insert(b[1]);
        match b[1] {
            0x0C => {
                assert_eq!(b.len(), 106);
                assert_eq!(b[2..6], be32(&f["key_id"]));
                assert_eq!(b[6..10], be32(&f["key_version"]));
                assert_eq!(b[10..42], unhex(&f["public_key"]));
                verify_sig(
                    &root_public,
                    b"dapgw v1 key certificate",
                    &b[..42],
                    &b[42..],
                );
                let seed = |k: &str| arr::<32>(&s[k]);
                let pk = |sd: [u8; 32]| {
                    ed25519_dalek::SigningKey::from_bytes(&sd)
                        .verifying_key()
                        .to_bytes()
                };
                assert_eq!(pk(seed("root_seed")).as_slice(), root_public);
                assert_eq!(pk(seed("online_seed")).as_slice(), online_public);
            }
            0x01 => {
                let n = b.len();
                assert_eq!(b[n - 68..n - 64], be32(&f["key_id"]));
                verify_sig(
                    &online_public,
                    b"dapgw v1 challenge",
                    &b[..n - 64],
                    &b[n - 64..],
                );
                assert_eq!(unhex(&f["ch_hash"]), Sha256::digest(&b).to_vec());
                assert_eq!(b[2..6], be32(&f["group"]));
                assert_eq!(b[6..14], be64(&f["round"]));
                assert_eq!(b[14..22], be64(&f["epoch"]));
                assert_eq!(b[22..38], unhex(&f["nonce_v"]));
                assert_eq!(b[38], if ecdhe { 2 } else { 1 });
                if ecdhe {
                    let e_v = x25519_public(arr(&s["e_v_secret"]));
                    assert_eq!(unhex(&f["e_v"]), e_v);
                    assert_eq!(b[39..71], e_v);
                }
                // The embedded certificate is the complete message.
                let cert = unhex(&f["key_cert"]);
                assert!(b.windows(cert.len()).any(|w| w == cert.as_slice()));
                verify_sig(
                    &root_public,
                    b"dapgw v1 key certificate",
                    &cert[..42],
                    &cert[42..],
                );
                assert_eq!(cert[10..42], online_public);
            }
            0x02 => {
                let (id, kv) = (num(&f["id"]), u32::try_from(num(&f["kv"])).unwrap());
                assert_eq!(b[2..10], id.to_be_bytes());
                assert_eq!(b[10..14], kv.to_be_bytes());
                assert_eq!(b[14..18], be32(&f["group"]));
                assert_eq!(b[18..26], be64(&f["round"]));
                assert_eq!(b[27..43], unhex(&f["n_i"]));
                let k_i = member_key(&ms, id, kv);
                assert_eq!(unhex(&s["k_i"]), k_i);
                // The challenge of the same round.
                let ch = vectors
                    .iter()
                    .find(|c| unhex(&c["hex"])[1] == 0x01 && c["fields"]["round"] == f["round"])
                    .unwrap();
                assert_eq!(f["ch_hash"], ch["fields"]["ch_hash"]);
                let mut th = cat(&[b"dapgw v1 th", &unhex(&f["ch_hash"]), &b[2..14], &b[27..43]]);
                let mut at = 43;
                let mut shared = None;
                if ecdhe {
                    assert_eq!(b[26], 2);
                    let e_i_secret = arr::<32>(&s["e_i_secret"]);
                    assert_eq!(b[43..75], x25519_public(e_i_secret));
                    let e_v: [u8; 32] = arr(&ch["fields"]["e_v"]);
                    let ss = x25519_dalek::x25519(e_i_secret, e_v);
                    let e_v_secret = arr::<32>(&ch["secrets"]["e_v_secret"]);
                    assert_eq!(ss, x25519_dalek::x25519(e_v_secret, arr(&f["e_i"])));
                    assert_eq!(unhex(&s["shared_secret"]), ss);
                    th.extend_from_slice(&b[43..75]);
                    shared = Some(ss);
                    at = 75;
                } else {
                    assert_eq!(b[26], 1);
                    assert!(s["e_i_secret"].is_null() && s["shared_secret"].is_null());
                }
                let th = Sha256::digest(&th).to_vec();
                assert_eq!(unhex(&s["th"]), th);
                let prk0 = hkdf_extract(&k_i, &th);
                assert_eq!(unhex(&s["prk0"]), prk0);
                let k_resp = hkdf_expand(&prk0, b"dapgw v1 response key", 16);
                let iv_resp = hkdf_expand(&prk0, b"dapgw v1 response iv", 12);
                assert_eq!(unhex(&s["k_resp"]), k_resp);
                assert_eq!(unhex(&s["iv_resp"]), iv_resp);
                let prk = shared.map_or(prk0.clone(), |ss| hkdf_extract(&prk0, &ss));
                for (k, label, len) in [
                    ("k_conf", "dapgw v1 confirm key", 16),
                    ("iv_conf", "dapgw v1 confirm iv", 12),
                    ("k_up", "dapgw v1 uplink key", 16),
                    ("iv_up", "dapgw v1 uplink iv", 12),
                    ("k_down", "dapgw v1 downlink key", 16),
                    ("sid", "dapgw v1 session id", 8),
                ] {
                    assert_eq!(
                        unhex(&s[k]),
                        hkdf_expand(&prk, label.as_bytes(), len),
                        "{name}: {k}"
                    );
                }
                let (c, end) = vec16(&b, at);
                assert_eq!(end + 16, b.len());
                assert_eq!(b[end..], unhex(&f["tag"]));
                let ct_tag = cat(&[c, &b[end..]]);
                assert_eq!(
                    gcm_open(&k_resp, &iv_resp, &th, &ct_tag),
                    unhex(&f["payload"])
                );
            }
            0x03 => {
                let (kind, ctr) = (u8::try_from(num(&f["kind"])).unwrap(), num(&f["ctr"]));
                let aad = cat(&[
                    b"dapgw v1 up",
                    &[kind],
                    &be32(&f["group"]),
                    &be64(&f["id"]),
                    &unhex(&f["sid"]),
                    &ctr.to_be_bytes(),
                ]);
                // The header fields in wire order: group, id, sid, kind, ctr.
                assert_eq!(b[2..6], aad[12..16]);
                assert_eq!(b[6..22], aad[16..32]);
                assert_eq!((b[22], &b[23..31]), (kind, &ctr.to_be_bytes()[..]));
                let mut nonce = unhex(&s["iv_up"]);
                for (n, c) in nonce[4..].iter_mut().zip(ctr.to_be_bytes()) {
                    *n ^= c;
                }
                let (c, end) = vec16(&b, 31);
                assert_eq!(b[end..], unhex(&f["tag"]));
                let plain = gcm_open(&unhex(&s["k_up"]), &nonce, &aad, &cat(&[c, &b[end..]]));
                assert_eq!(plain, unhex(&f["payload"]));
                if kind == 3 {
                    let gm = unhex(&by_name["group_message"]["hex"]);
                    let a = &f["ack"];
                    let expect = cat(&[
                        &be32(&a["group"]),
                        &be64(&a["epoch"]),
                        &be64(&a["seq"]),
                        &Sha256::digest(&gm),
                    ]);
                    assert_eq!(plain, expect);
                }
            }
            0x04 => {
                let (count, c) = (num(&f["count"]) as usize, num(&f["chunk_size"]) as usize);
                let tags: Vec<Vec<u8>> = s["gateway_tags"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(unhex)
                    .collect();
                assert_eq!(tags.len(), count);
                for t in &tags {
                    assert!(member_tags.contains(t), "{name}: a tag no member sealed");
                }
                let aggs: Vec<Vec<u8>> = tags.chunks(c).map(aggregate_of).collect();
                assert_eq!(aggs.len(), count.div_ceil(c));
                assert_eq!(b[b.len() - 16 * aggs.len()..], aggs.concat());
                let listed: Vec<Vec<u8>> = f["aggregates"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(unhex)
                    .collect();
                assert_eq!(listed, aggs);
                assert_eq!(unhex(&f["batch_hash"]), Sha256::digest(&b).to_vec());
                // The entries, parsed from the layout in docs/protocol.md:
                // each one with its gateway tag must be a member's message
                // in the file, byte for byte (but the one the gateway
                // altered).
                let members: Vec<Vec<u8>> = vectors
                    .iter()
                    .map(|x| unhex(&x["hex"]))
                    .filter(|m| matches!(m[1], 0x02 | 0x03))
                    .collect();
                let rebuilt = batch_entries_as_messages(&b, f, &tags);
                assert_eq!(rebuilt.len(), count, "{name}");
                let found = rebuilt.iter().filter(|m| members.contains(m)).count();
                let altered = usize::from(name == "batch_read_altered");
                assert_eq!(found, count - altered, "{name}: entries");
            }
            0x05 | 0x06 => {
                let batch = if b[1] == 0x05 {
                    unhex(&by_name[f["of_batch"].as_str().unwrap()]["hex"])
                } else {
                    // A tag reply answers the one tag request in the file.
                    let req = &by_name["verdict_tags_requested"]["fields"];
                    unhex(&by_name[req["of_batch"].as_str().unwrap()]["hex"])
                };
                let hash = Sha256::digest(&batch).to_vec();
                assert_eq!(unhex(&f["batch_hash"]), hash);
                let gw = f["gateway_id"].as_str().unwrap().as_bytes();
                let head = cat(&[
                    &[u8::try_from(gw.len()).unwrap()],
                    gw,
                    &be64(&f["batch_id"]),
                    &hash,
                ]);
                assert_eq!(b[2..2 + head.len()], head);
                if b[1] == 0x05 && f["status"] == "final" {
                    for c in f["confirms"].as_array().unwrap() {
                        let c = cat(&[&[0, 70], &unhex(c)]);
                        assert!(b.windows(c.len()).any(|w| w == c.as_slice()));
                    }
                }
                if b[1] == 0x06 {
                    let bf = &by_name["batch_read_altered"]["fields"]["aggregates"];
                    for ch in f["chunks"].as_array().unwrap() {
                        let tags: Vec<Vec<u8>> =
                            ch["tags"].as_array().unwrap().iter().map(unhex).collect();
                        let k = num(&ch["chunk"]) as usize;
                        assert_eq!(aggregate_of(&tags), unhex(&bf[k]), "{name}: chunk {k}");
                    }
                }
            }
            0x07 => {
                let fields = cat(&[
                    &be32(&f["group"]),
                    &be64(&f["round"]),
                    &be64(&f["epoch"]),
                    &be64(&f["id"]),
                    &unhex(&f["sid"]),
                ]);
                assert_eq!(b[2..38], fields);
                let aad = cat(&[b"dapgw v1 confirm", &fields]);
                let gk = gcm_open(
                    &unhex(&s["k_conf"]),
                    &unhex(&s["iv_conf"]),
                    &aad,
                    &b[38..70],
                );
                assert_eq!(gk, unhex(&s["gk"]));
                assert_eq!(s["gk"], v["gk"][num(&f["epoch"]).to_string()]);
            }
            0x08 => {
                let n = b.len();
                assert_eq!(b[n - 68..n - 64], be32(&f["key_id"]));
                verify_sig(
                    &online_public,
                    b"dapgw v1 group message",
                    &b[..n - 64],
                    &b[n - 64..],
                );
                let fields = cat(&[
                    &be32(&f["group"]),
                    &be64(&f["epoch"]),
                    &be64(&f["seq"]),
                    &be64(&f["valid_through_round"]),
                ]);
                assert_eq!(b[2..30], fields);
                assert_eq!(b[30..42], unhex(&f["nonce"]));
                let len = u32::from_be_bytes(b[42..46].try_into().unwrap()) as usize;
                assert_eq!(46 + len + 68, n);
                let aad = cat(&[b"dapgw v1 group message", &fields]);
                let plain = gcm_open(&unhex(&s["gk"]), &b[30..42], &aad, &b[46..46 + len]);
                assert_eq!(plain, unhex(&f["payload"]));
            }
            0x09 => {
                assert_eq!(b.len(), 82);
                let (g, id, sid) = (be32(&f["group"]), be64(&f["id"]), unhex(&f["sid"]));
                let (e, d) = (be64(&f["new_epoch"]), be64(&f["down_ctr"]));
                assert_eq!(b[2..38], cat(&[&g, &id, &sid, &e, &d]));
                let aad = cat(&[b"dapgw v1 rekey", &g, &e, &id, &sid, &d]);
                let gk = gcm_open(&unhex(&s["k_down"]), &b[38..50], &aad, &b[50..82]);
                assert_eq!(gk, unhex(&s["gk_new"]));
                assert_eq!(s["gk_new"], v["gk"][num(&f["new_epoch"]).to_string()]);
            }
            0x0A => {
                assert_eq!(b.len(), 94);
                let (g, id, sid) = (be32(&f["group"]), be64(&f["id"]), unhex(&f["sid"]));
                let (kv, d) = (be32(&f["new_kv"]), be64(&f["down_ctr"]));
                assert_eq!(b[2..34], cat(&[&g, &id, &sid, &kv, &d]));
                let aad = cat(&[b"dapgw v1 key update", &g, &id, &sid, &kv, &d]);
                let key = gcm_open(&unhex(&s["k_down"]), &b[34..46], &aad, &b[46..94]);
                let new_kv = u32::try_from(num(&f["new_kv"])).unwrap();
                assert_eq!(key, member_key(&ms, num(&f["id"]), new_kv));
                assert_eq!(key, unhex(&s["k_i_new"]));
                // In psk the file records a refusal by both sides instead.
                assert_eq!(f["refused_by_member"].is_string(), !ecdhe, "{name}");
                assert_eq!(
                    name,
                    if ecdhe {
                        "key_update"
                    } else {
                        "key_update_refused"
                    }
                );
            }
            0x0B => {
                let (inner, end) = vec16(&b, 2);
                assert_eq!(end + 16, b.len());
                assert_eq!(inner, unhex(&f["inner"]));
                let tag = inner[inner.len() - 16..].to_vec();
                assert_eq!(b[end..], aggregate_of(&[tag]));
                assert_eq!(unhex(&f["aggregate"]), b[end..]);
                // The inner uplink opens under its session.
                let ctr = num(&f["inner_ctr"]);
                let aad = cat(&[
                    b"dapgw v1 up",
                    &[inner[22]],
                    &inner[2..6],
                    &inner[6..14],
                    &inner[14..22],
                    &ctr.to_be_bytes(),
                ]);
                let mut nonce = unhex(&s["iv_up"]);
                for (n, c) in nonce[4..].iter_mut().zip(ctr.to_be_bytes()) {
                    *n ^= c;
                }
                let (c, e) = vec16(inner, 31);
                let plain = gcm_open(&unhex(&s["k_up"]), &nonce, &aad, &cat(&[c, &inner[e..]]));
                assert_eq!(plain, unhex(&f["payload"]));
            }
            t => panic!("{name}: unexpected type {t:#x}"),
        }
    }
    // Every message type is in the file.
    assert_eq!(types, (0x01..=0x0C).collect(), "{}", v["mode"]);
}

#[test]
fn message_vectors_match_an_independent_computation() {
    for mode in [Mode::Psk, Mode::PskEcdhe] {
        check_file(&load(mode));
    }
}
