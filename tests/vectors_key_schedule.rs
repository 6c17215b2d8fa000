//! Known-answer vectors for the suite 1 key schedule
//! (`tests/vectors/key_schedule.json`), the vendor-key import derivation
//! (`K_import`) included.
//!
//! `key_schedule_vectors_match_the_code` recomputes every value with
//! `dapgw::protocol::keys`; `key_schedule_vectors_match_an_independent_computation`
//! recomputes them from the labels in docs/protocol.md with the plain `hkdf`,
//! `sha2`, `x25519-dalek` and `aes-gcm` crates, so the file is not only
//! checked against the code that wrote it. The file was produced once by the
//! ignored test `generate_key_schedule_vectors`.

use aes_gcm::aead::AeadInOut;
use aes_gcm::{Aes128Gcm, KeyInit};
use dapgw::protocol::keys::{
    MasterSecret, MemberKeyDeriver, import_member_key, response_keys, session_keys,
    transcript_hash, uplink_nonce,
};
use dapgw::protocol::suite::{EphemeralKeyPair, Gcm};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/vectors/key_schedule.json"
);

/// Fixed inputs: byte patterns anyone can retype.
fn pattern<const N: usize>(start: u8) -> [u8; N] {
    core::array::from_fn(|i| start.wrapping_add(i as u8))
}

const ID: u64 = 0x0000_0001_0000_03E9;
const KV: u32 = 2;
const PAYLOAD_9: &[u8; 9] = b"kWh=12345";

/// A meter vendor's per-member key (16 bytes, as an AES-128 meter key),
/// the input of the import derivation.
fn vendor_key() -> [u8; 16] {
    pattern(0xC0)
}

/// The fixed inputs of both cases.
struct Inputs {
    ms: [u8; 32],
    ch_hash: [u8; 32],
    n_i: [u8; 16],
    e_i_secret: [u8; 32],
    e_v_secret: [u8; 32],
}

fn inputs() -> Inputs {
    Inputs {
        ms: pattern(0x00),
        ch_hash: pattern(0xA0),
        n_i: pattern(0x40),
        e_i_secret: pattern(0x60),
        e_v_secret: pattern(0x80),
    }
}

/// Every value of one mode, computed with dapgw's own API.
fn compute_with_dapgw(ecdhe: bool) -> Value {
    let Inputs {
        ms,
        ch_hash,
        n_i,
        e_i_secret,
        e_v_secret,
    } = inputs();
    let deriver = MemberKeyDeriver::new(&MasterSecret::from_bytes(ms));
    let k_i = deriver.member_key(ID, KV);
    let (e_i, e_v) = (
        EphemeralKeyPair::from_secret_bytes(&e_i_secret),
        EphemeralKeyPair::from_secret_bytes(&e_v_secret),
    );
    let e_i_public = e_i.public();
    let th = transcript_hash(&ch_hash, ID, KV, &n_i, ecdhe.then_some(&e_i_public));
    let (resp, prk0) = response_keys(&k_i, &th);
    let shared = ecdhe.then(|| e_i.diffie_hellman(&e_v.public()).unwrap());
    // The verifier's side of the exchange gives the same secret.
    if let Some(s) = &shared {
        assert_eq!(
            e_v.diffie_hellman(&e_i_public).unwrap().expose(),
            s.expose()
        );
    }
    let s = session_keys(&prk0, shared.as_ref());

    let gcm = Gcm::new(resp.k_resp.expose());
    let tag_empty = gcm.seal_in_place(resp.iv_resp.expose(), &th, &mut []);
    let mut c_9 = *PAYLOAD_9;
    let tag_9 = gcm.seal_in_place(resp.iv_resp.expose(), &th, &mut c_9);

    json!({
        "mode": if ecdhe { "psk-ecdhe" } else { "psk" },
        "e_i_secret": ecdhe.then(|| hex::encode(e_i_secret)),
        "e_i_public": ecdhe.then(|| hex::encode(e_i_public)),
        "e_v_secret": ecdhe.then(|| hex::encode(e_v_secret)),
        "e_v_public": ecdhe.then(|| hex::encode(e_v.public())),
        "k_i": hex::encode(k_i.expose()),
        "th": hex::encode(th),
        "prk0": hex::encode(prk0.expose()),
        "k_resp": hex::encode(resp.k_resp.expose()),
        "iv_resp": hex::encode(resp.iv_resp.expose()),
        "shared_secret": shared.as_ref().map(|s| hex::encode(s.expose())),
        "k_conf": hex::encode(s.k_conf.expose()),
        "iv_conf": hex::encode(s.iv_conf.expose()),
        "k_up": hex::encode(s.k_up.expose()),
        "iv_up": hex::encode(s.iv_up.expose()),
        "k_down": hex::encode(s.k_down.expose()),
        "sid": hex::encode(s.sid),
        "uplink_nonce_ctr_1": hex::encode(uplink_nonce(&s.iv_up, 1)),
        "response_tag_empty": hex::encode(tag_empty),
        "response_c_9": hex::encode(c_9),
        "response_tag_9": hex::encode(tag_9),
    })
}

fn compute_file_with_dapgw() -> Value {
    let Inputs {
        ms, ch_hash, n_i, ..
    } = inputs();
    json!({
        "description": "dapgw v1 suite 1 key schedule (docs/protocol.md, Key schedule). \
                        Byte strings are lowercase hex; id and kv are integers, encoded \
                        big-endian (u64, u32) wherever they are hashed. The response is \
                        AES-128-GCM(k_resp, iv_resp, aad = th, payload).",
        "ms": hex::encode(ms),
        "id": ID,
        "kv": KV,
        "ch_hash": hex::encode(ch_hash),
        "n_i": hex::encode(n_i),
        "payload_9": hex::encode(PAYLOAD_9),
        "cases": [compute_with_dapgw(false), compute_with_dapgw(true)],
        "import": {
            "vendor_key": hex::encode(vendor_key()),
            "k_import": hex::encode(import_member_key(&vendor_key(), ID, KV).expose()),
        },
    })
}

fn load() -> Value {
    let text = std::fs::read_to_string(PATH).expect("tests/vectors/key_schedule.json");
    serde_json::from_str(&text).unwrap()
}

#[test]
#[ignore = "writes tests/vectors/key_schedule.json; run once, then review and commit"]
fn generate_key_schedule_vectors() {
    let text = serde_json::to_string_pretty(&compute_file_with_dapgw()).unwrap();
    std::fs::write(PATH, text + "\n").unwrap();
}

#[test]
fn key_schedule_vectors_match_the_code() {
    assert_eq!(load(), compute_file_with_dapgw());
}

fn unhex(v: &Value) -> Vec<u8> {
    hex::decode(v.as_str().unwrap()).unwrap()
}

fn arr<const N: usize>(v: &Value) -> [u8; N] {
    unhex(v).try_into().unwrap()
}

/// HKDF-Expand with a label from the doc, via the plain `hkdf` crate.
fn expand(prk: &[u8], label: &str, len: usize) -> Vec<u8> {
    let hk = hkdf::Hkdf::<Sha256>::from_prk(prk).unwrap();
    let mut out = vec![0u8; len];
    hk.expand(label.as_bytes(), &mut out).unwrap();
    out
}

fn extract(salt: &[u8], ikm: &[u8]) -> Vec<u8> {
    hkdf::Hkdf::<Sha256>::extract(Some(salt), ikm).0.to_vec()
}

#[test]
fn key_schedule_vectors_match_an_independent_computation() {
    let v = load();
    let ms = unhex(&v["ms"]);
    let id = v["id"].as_u64().unwrap();
    let kv = u32::try_from(v["kv"].as_u64().unwrap()).unwrap();
    let ch_hash = unhex(&v["ch_hash"]);
    let n_i = unhex(&v["n_i"]);
    let payload = unhex(&v["payload_9"]);
    assert_eq!(payload.len(), 9);

    let prk_ms = extract(b"dapgw v1 member root", &ms);
    let mut info = b"dapgw v1 member".to_vec();
    info.extend_from_slice(&id.to_be_bytes());
    info.extend_from_slice(&kv.to_be_bytes());
    let hk = hkdf::Hkdf::<Sha256>::from_prk(&prk_ms).unwrap();
    let mut k_i = [0u8; 32];
    hk.expand(&info, &mut k_i).unwrap();

    let cases = v["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 2);
    for case in cases {
        let ecdhe = match case["mode"].as_str().unwrap() {
            "psk" => false,
            "psk-ecdhe" => true,
            other => panic!("unknown mode {other}"),
        };
        assert_eq!(unhex(&case["k_i"]), k_i);

        let mut th = Sha256::new();
        th.update(b"dapgw v1 th");
        th.update(&ch_hash);
        th.update(id.to_be_bytes());
        th.update(kv.to_be_bytes());
        th.update(&n_i);
        let mut shared = None;
        if ecdhe {
            let e_i_secret = arr::<32>(&case["e_i_secret"]);
            let e_v_secret = arr::<32>(&case["e_v_secret"]);
            let base = x25519_dalek::X25519_BASEPOINT_BYTES;
            let e_i_public = x25519_dalek::x25519(e_i_secret, base);
            let e_v_public = x25519_dalek::x25519(e_v_secret, base);
            assert_eq!(unhex(&case["e_i_public"]), e_i_public);
            assert_eq!(unhex(&case["e_v_public"]), e_v_public);
            th.update(e_i_public);
            let s = x25519_dalek::x25519(e_i_secret, e_v_public);
            assert_eq!(s, x25519_dalek::x25519(e_v_secret, e_i_public));
            assert_eq!(unhex(&case["shared_secret"]), s);
            shared = Some(s);
        } else {
            for field in [
                "e_i_secret",
                "e_i_public",
                "e_v_secret",
                "e_v_public",
                "shared_secret",
            ] {
                assert!(case[field].is_null(), "{field} must be null in psk");
            }
        }
        let th: [u8; 32] = th.finalize().into();
        assert_eq!(unhex(&case["th"]), th);

        let prk0 = extract(&k_i, &th);
        assert_eq!(unhex(&case["prk0"]), prk0);
        let k_resp = expand(&prk0, "dapgw v1 response key", 16);
        let iv_resp = expand(&prk0, "dapgw v1 response iv", 12);
        assert_eq!(unhex(&case["k_resp"]), k_resp);
        assert_eq!(unhex(&case["iv_resp"]), iv_resp);

        let prk = match shared {
            None => prk0.clone(),
            Some(s) => extract(&prk0, &s),
        };
        for (field, label, len) in [
            ("k_conf", "dapgw v1 confirm key", 16),
            ("iv_conf", "dapgw v1 confirm iv", 12),
            ("k_up", "dapgw v1 uplink key", 16),
            ("iv_up", "dapgw v1 uplink iv", 12),
            ("k_down", "dapgw v1 downlink key", 16),
            ("sid", "dapgw v1 session id", 8),
        ] {
            assert_eq!(unhex(&case[field]), expand(&prk, label, len), "{field}");
        }
        let mut nonce = unhex(&case["iv_up"]);
        nonce[11] ^= 1;
        assert_eq!(unhex(&case["uplink_nonce_ctr_1"]), nonce);

        let aead = Aes128Gcm::new_from_slice(&k_resp).unwrap();
        let iv = <[u8; 12]>::try_from(iv_resp.as_slice()).unwrap();
        let tag = aead
            .encrypt_inout_detached(&iv.into(), &th, (&mut [][..]).into())
            .unwrap();
        assert_eq!(unhex(&case["response_tag_empty"]), tag.as_slice());
        let mut c = payload.clone();
        let tag = aead
            .encrypt_inout_detached(&iv.into(), &th, c.as_mut_slice().into())
            .unwrap();
        assert_eq!(unhex(&case["response_c_9"]), c);
        assert_eq!(unhex(&case["response_tag_9"]), tag.as_slice());
    }
    // K_import: the vendor key through the import KDF, for the same id
    // and kv, never the vendor key itself nor the derived K_i.
    let vendor = unhex(&v["import"]["vendor_key"]);
    assert_eq!(vendor.len(), 16);
    let prk_import = extract(b"dapgw v1 import", &vendor);
    let mut info = b"dapgw v1 import".to_vec();
    info.extend_from_slice(&id.to_be_bytes());
    info.extend_from_slice(&kv.to_be_bytes());
    let hk = hkdf::Hkdf::<Sha256>::from_prk(&prk_import).unwrap();
    let mut k_import = [0u8; 32];
    hk.expand(&info, &mut k_import).unwrap();
    assert_eq!(unhex(&v["import"]["k_import"]), k_import);
    assert_ne!(k_import, k_i);

    // The two modes must not share any derived value.
    for field in ["th", "prk0", "k_resp", "k_conf", "k_up", "k_down", "sid"] {
        assert_ne!(cases[0][field], cases[1][field], "{field}");
    }
}
