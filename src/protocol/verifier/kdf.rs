//! The suite 1 key schedule on the verifier's hot path.
//!
//! Data flow: screening a response derives `K_i`, `th_i`, `PRK0` and the
//! response key for every entry, and finalizing derives the session keys of
//! every accepted one: about 26 SHA-256 compressions per member, which is
//! most of the verifier's cost. `keys.rs` computes the same values through
//! the `hkdf` and `hmac` crates; this module computes them with keyed HMAC
//! states whose pads are hashed once, and with every message fitting one
//! padded block handed straight to the compression function, so nothing is
//! buffered, cloned or re-padded per call. The tests check it against
//! `keys.rs` value for value.

use sha2::block_api::compress256;
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::protocol::keys::{MasterSecret, MemberKey, ResponseKeys, SessionKeys};
use crate::protocol::suite::{Iv12, Key16, Secret};

/// SHA-256 initial hash value (FIPS 180-4, 5.3.3).
const IV: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

const MEMBER_ROOT_LABEL: &[u8] = b"dapgw v1 member root";
const MEMBER_LABEL: &[u8] = b"dapgw v1 member";
const TH_LABEL: &[u8] = b"dapgw v1 th";
const RESPONSE_KEY_LABEL: &[u8] = b"dapgw v1 response key";
const RESPONSE_IV_LABEL: &[u8] = b"dapgw v1 response iv";
const CONFIRM_KEY_LABEL: &[u8] = b"dapgw v1 confirm key";
const CONFIRM_IV_LABEL: &[u8] = b"dapgw v1 confirm iv";
const UPLINK_KEY_LABEL: &[u8] = b"dapgw v1 uplink key";
const UPLINK_IV_LABEL: &[u8] = b"dapgw v1 uplink iv";
const DOWNLINK_KEY_LABEL: &[u8] = b"dapgw v1 downlink key";
const SESSION_ID_LABEL: &[u8] = b"dapgw v1 session id";

/// The padded inner block of `HKDF-Expand(PRK, label, N <= 32)`: `label ||
/// 0x01`, SHA-256 padding, and the bit length of `ipad || label || 0x01`.
/// Built at compile time, so an expand copies no message bytes.
const fn expand_block(label: &[u8]) -> [u8; 64] {
    let mut block = [0u8; 64];
    let mut i = 0;
    while i < label.len() {
        block[i] = label[i];
        i += 1;
    }
    block[i] = 1;
    block[i + 1] = 0x80;
    let bits = ((64 + label.len() + 1) as u64) * 8;
    let len = bits.to_be_bytes();
    let mut j = 0;
    while j < 8 {
        block[56 + j] = len[j];
        j += 1;
    }
    block
}

const RESPONSE_KEY_BLOCK: [u8; 64] = expand_block(RESPONSE_KEY_LABEL);
const RESPONSE_IV_BLOCK: [u8; 64] = expand_block(RESPONSE_IV_LABEL);
const CONFIRM_KEY_BLOCK: [u8; 64] = expand_block(CONFIRM_KEY_LABEL);
const CONFIRM_IV_BLOCK: [u8; 64] = expand_block(CONFIRM_IV_LABEL);
const UPLINK_KEY_BLOCK: [u8; 64] = expand_block(UPLINK_KEY_LABEL);
const UPLINK_IV_BLOCK: [u8; 64] = expand_block(UPLINK_IV_LABEL);
const DOWNLINK_KEY_BLOCK: [u8; 64] = expand_block(DOWNLINK_KEY_LABEL);
const SESSION_ID_BLOCK: [u8; 64] = expand_block(SESSION_ID_LABEL);

/// Longest message that fits one block after a 64-byte pad: 64 minus the
/// `0x80` byte and the 8-byte length.
const ONE_BLOCK: usize = 55;

/// An HMAC-SHA256 key as the two states after hashing its padded key
/// blocks. Zeroized on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub(crate) struct HmacKey {
    inner: [u32; 8],
    outer: [u32; 8],
}

impl core::fmt::Debug for HmacKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("HmacKey(<redacted>)")
    }
}

impl HmacKey {
    /// Keys HMAC with `key` (at most 64 bytes, which every key here is).
    fn new(key: &[u8]) -> Self {
        debug_assert!(key.len() <= 64, "HMAC keys here are at most 64 bytes");
        let mut ipad = [0x36u8; 64];
        let mut opad = [0x5cu8; 64];
        for ((i, o), k) in ipad.iter_mut().zip(opad.iter_mut()).zip(key) {
            *i ^= k;
            *o ^= k;
        }
        let (mut inner, mut outer) = (IV, IV);
        compress256(&mut inner, core::slice::from_ref(&ipad));
        compress256(&mut outer, core::slice::from_ref(&opad));
        ipad.zeroize();
        opad.zeroize();
        Self { inner, outer }
    }

    /// `HMAC(key, parts)` for a message of at most [`ONE_BLOCK`] bytes: one
    /// compression for the inner hash, one for the outer.
    fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut out = [0u8; 32];
        self.mac_into(parts, &mut out);
        out
    }

    /// [`Self::mac`] truncated to `out.len()` bytes, written into `out`.
    fn mac_into(&self, parts: &[&[u8]], out: &mut [u8]) {
        let mut block = [0u8; 64];
        let len = fill(&mut block, parts);
        pad_block(&mut block, len, 64 + len);
        self.finish(&mut block, out);
    }

    /// Runs the inner hash over `block` (one padded message block), then the
    /// outer hash, writing the first `out.len()` bytes of the MAC.
    ///
    /// The outer hash reuses `block`, rewriting every byte (inner digest,
    /// then padding), so a secret message never outlives the call; only the
    /// inner digest's 32 bytes need wiping after (byte-wise volatile writes
    /// are a real cost at 26 HMACs per member).
    fn finish(&self, block: &mut [u8; 64], out: &mut [u8]) {
        let mut state = self.inner;
        compress256(&mut state, core::slice::from_ref(block));
        for (o, w) in block[..32].chunks_exact_mut(4).zip(&state) {
            o.copy_from_slice(&w.to_be_bytes());
        }
        pad_block(block, 32, 64 + 32);
        state = self.outer;
        compress256(&mut state, core::slice::from_ref(block));
        block[..32].zeroize();
        for (o, w) in out.chunks_mut(4).zip(&state) {
            o.copy_from_slice(&w.to_be_bytes()[..o.len()]);
        }
        state.zeroize();
    }

    /// `HKDF-Expand(PRK = this key, info, N)` for `N <= 32` and `info` with
    /// its block prepared by [`expand_block`]: `T(1)` truncated.
    fn expand<const N: usize>(&self, info_block: &[u8; 64]) -> [u8; N] {
        let mut block = *info_block;
        let mut out = [0u8; N];
        self.finish(&mut block, &mut out);
        out
    }
}

/// Copies `parts` into the start of `block` and returns their length.
fn fill(block: &mut [u8; 64], parts: &[&[u8]]) -> usize {
    let mut len = 0;
    for p in parts {
        block[len..len + p.len()].copy_from_slice(p);
        len += p.len();
    }
    debug_assert!(len <= ONE_BLOCK, "one-block message");
    len
}

/// Appends SHA-256 padding to a block holding `len` message bytes, for a
/// message of `total` bytes so far (including earlier blocks).
fn pad_block(block: &mut [u8; 64], len: usize, total: usize) {
    block[len] = 0x80;
    block[len + 1..56].fill(0);
    block[56..].copy_from_slice(&((total as u64) * 8).to_be_bytes());
}

fn state_bytes(state: &[u32; 8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (o, w) in out.chunks_exact_mut(4).zip(state) {
        o.copy_from_slice(&w.to_be_bytes());
    }
    out
}

/// `th_i = SHA-256("dapgw v1 th" || ch_hash || id || kv || n_i || e_i)`:
/// 71 bytes (psk) or 103 (psk-ecdhe), two blocks either way.
pub(crate) fn transcript_hash(
    ch_hash: &[u8; 32],
    id: u64,
    kv: u32,
    n_i: &[u8; 16],
    e_i: Option<&[u8; 32]>,
) -> [u8; 32] {
    let mut buf = [0u8; 128];
    let mut len = 0;
    let e_i: &[u8] = e_i.map_or(&[], |e| e.as_slice());
    for p in [
        TH_LABEL,
        ch_hash.as_slice(),
        &id.to_be_bytes(),
        &kv.to_be_bytes(),
        n_i.as_slice(),
        e_i,
    ] {
        buf[len..len + p.len()].copy_from_slice(p);
        len += p.len();
    }
    let (first, second) = buf.split_at_mut(64);
    let second: &mut [u8; 64] = second.try_into().unwrap_or_else(|_| unreachable!());
    pad_block(second, len - 64, len);
    let first: [u8; 64] = first.try_into().unwrap_or_else(|_| unreachable!());
    let mut state = IV;
    compress256(&mut state, &[first, *second]);
    state_bytes(&state)
}

/// The verifier's member key deriver: `PRK_MS` as a keyed HMAC state.
#[derive(Clone)]
pub(crate) struct FastDeriver {
    prk_ms: HmacKey,
}

impl core::fmt::Debug for FastDeriver {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("FastDeriver(<redacted>)")
    }
}

impl FastDeriver {
    /// `PRK_MS = HKDF-Extract(salt = "dapgw v1 member root", IKM = MS)`.
    pub(crate) fn new(ms: &MasterSecret) -> Self {
        let mut prk = HmacKey::new(MEMBER_ROOT_LABEL).mac(&[ms.expose()]);
        let prk_ms = HmacKey::new(&prk);
        prk.zeroize();
        Self { prk_ms }
    }

    /// `K_i = HKDF-Expand(PRK_MS, "dapgw v1 member" || id || kv, 32)`.
    pub(crate) fn member_key(&self, id: u64, kv: u32) -> MemberKey {
        let mut t1 = self
            .prk_ms
            .mac(&[MEMBER_LABEL, &id.to_be_bytes(), &kv.to_be_bytes(), &[1]]);
        let key = MemberKey::from_bytes(t1);
        t1.zeroize();
        key
    }
}

/// `PRK0` of one response, kept from screening to finalization.
#[derive(Clone, Debug)]
pub(crate) struct FastPrk0 {
    /// `PRK0` as a keyed HMAC state: the psk session PRK, and the salt of
    /// the psk-ecdhe extract (an HMAC keyed by `PRK0`).
    key: HmacKey,
}

/// `PRK0 = HKDF-Extract(salt = K_i, IKM = th_i)` and the response key and
/// nonce expanded from it.
pub(crate) fn response_keys(k_i: &MemberKey, th: &[u8; 32]) -> (ResponseKeys, FastPrk0) {
    let mut prk0 = HmacKey::new(k_i.expose()).mac(&[th]);
    let key = HmacKey::new(&prk0);
    prk0.zeroize();
    let keys = ResponseKeys {
        k_resp: Key16::from_bytes(key.expand(&RESPONSE_KEY_BLOCK)),
        iv_resp: Iv12::from_bytes(key.expand(&RESPONSE_IV_BLOCK)),
    };
    (keys, FastPrk0 { key })
}

/// The session keys from `PRK = PRK0` (psk) or
/// `PRK = HKDF-Extract(salt = PRK0, IKM = X25519)` (psk-ecdhe).
pub(crate) fn session_keys(prk0: &FastPrk0, dh: Option<&[u8; 32]>) -> SessionKeys {
    let ecdhe;
    let prk = match dh {
        None => &prk0.key,
        Some(dh) => {
            let mut bytes = prk0.key.mac(&[dh]);
            ecdhe = HmacKey::new(&bytes);
            bytes.zeroize();
            &ecdhe
        }
    };
    SessionKeys {
        k_conf: Secret::from_bytes(prk.expand(&CONFIRM_KEY_BLOCK)),
        iv_conf: Secret::from_bytes(prk.expand(&CONFIRM_IV_BLOCK)),
        k_up: Secret::from_bytes(prk.expand(&UPLINK_KEY_BLOCK)),
        iv_up: Secret::from_bytes(prk.expand(&UPLINK_IV_BLOCK)),
        k_down: Secret::from_bytes(prk.expand(&DOWNLINK_KEY_BLOCK)),
        sid: prk.expand(&SESSION_ID_BLOCK),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::keys;
    use crate::protocol::suite::EphemeralKeyPair;

    #[test]
    fn matches_the_reference_key_schedule() {
        let mut rng = super::super::tests::TestRng(11);
        for round in 0..200u64 {
            let mut ms = [0u8; 32];
            rand_core::Rng::fill_bytes(&mut rng, &mut ms);
            let ms = MasterSecret::from_bytes(ms);
            let id = rand_core::Rng::next_u64(&mut rng);
            let kv = rand_core::Rng::next_u32(&mut rng);
            let reference = keys::MemberKeyDeriver::new(&ms).member_key(id, kv);
            let fast = FastDeriver::new(&ms).member_key(id, kv);
            assert_eq!(fast, reference, "member key, round {round}");

            let mut ch_hash = [0u8; 32];
            let mut n_i = [0u8; 16];
            rand_core::Rng::fill_bytes(&mut rng, &mut ch_hash);
            rand_core::Rng::fill_bytes(&mut rng, &mut n_i);
            let e = EphemeralKeyPair::generate(&mut rng);
            let e_i = (round % 2 == 0).then(|| e.public());
            let th = transcript_hash(&ch_hash, id, kv, &n_i, e_i.as_ref());
            assert_eq!(
                th,
                keys::transcript_hash(&ch_hash, id, kv, &n_i, e_i.as_ref()),
                "th, round {round}"
            );

            let (r_ref, p_ref) = keys::response_keys(&reference, &th);
            let (r_fast, p_fast) = response_keys(&fast, &th);
            assert_eq!(r_fast.k_resp, r_ref.k_resp);
            assert_eq!(r_fast.iv_resp, r_ref.iv_resp);
            let other = EphemeralKeyPair::generate(&mut rng);
            let dh = e.diffie_hellman(&other.public()).unwrap();
            for dh in [None, Some(&dh)] {
                let a = keys::session_keys(&p_ref, dh);
                let b = session_keys(&p_fast, dh.map(|d| d.expose()));
                assert_eq!(
                    (a.sid, &a.k_conf, &a.iv_conf, &a.k_up, &a.iv_up, &a.k_down),
                    (b.sid, &b.k_conf, &b.iv_conf, &b.k_up, &b.iv_up, &b.k_down),
                    "session keys, round {round}"
                );
            }
        }
    }

    #[test]
    fn prepared_expand_blocks_equal_the_generic_path() {
        let key = HmacKey::new(&[0x0b; 32]);
        for label in [RESPONSE_KEY_LABEL, SESSION_ID_LABEL, DOWNLINK_KEY_LABEL] {
            let block = expand_block(label);
            assert_eq!(key.expand::<32>(&block), key.mac(&[label, &[1]]));
        }
    }

    #[test]
    fn hmac_matches_rfc4231_case_2() {
        // RFC 4231 test case 2: key "Jefe".
        let mac = HmacKey::new(b"Jefe").mac(&[b"what do ya want ", b"for nothing?"]);
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert!(format!("{:?}", HmacKey::new(b"k")).contains("redacted"));
    }
}
