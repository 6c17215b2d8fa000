//! Suite 1 primitives: AES-128-GCM, the chunk aggregate, Ed25519 and X25519.
//!
//! Everything above this module (the key schedule in `keys`, the member, the
//! aggregator and the verifier) reaches cryptography only through the types
//! here. A member seals with [`Gcm`], the gateway folds tags with
//! [`aggregate`], and the verifier recomputes tags of aggregated entries with
//! [`Gcm::tag`] (it never sees the individual tags unless it asks for them),
//! then decrypts with [`Gcm::decrypt_in_place`] once the chunk has matched.
//!
//! Randomness always comes in as `&mut impl rand_core::CryptoRng`. A caller
//! outside the sans-IO core uses the operating system's generator through
//! `rand_core::UnwrapErr(getrandom::SysRng)`: `SysRng` only implements the
//! fallible `TryCryptoRng`, and `UnwrapErr` turns it into a `CryptoRng` that
//! panics if the kernel cannot supply randomness (the only sane reaction).

use aes::Aes128Enc;
use aes::cipher::{BlockCipherEncrypt, KeyInit};
use ghash::GHash;
use ghash::universal_hash::UniversalHash;
use rand_core::CryptoRng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Label hashed in front of the tags of a chunk (docs/protocol.md, Batch).
const AGGREGATE_LABEL: &[u8] = b"dapgw v1 aggregate";

/// The largest plaintext AES-GCM may encrypt under one nonce (NIST SP
/// 800-38D: 2^32 - 2 blocks). Messages in dapgw are capped far below this.
const GCM_MAX_LEN: u64 = (1 << 36) - 32;

/// Counter blocks encrypted per call into AES, so the hardware pipelines them.
const PAR_BLOCKS: usize = 8;

/// A cryptographic operation failed.
///
/// Messages never contain key material or the data being checked.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// An AES-GCM tag (or a chunk aggregate) did not match. Usually the
    /// ciphertext, the associated data or the tag was altered in transit, or
    /// the sender used a different key (wrong member key version, another
    /// session) or nonce.
    #[error("authentication tag mismatch")]
    BadTag,
    /// An Ed25519 signature did not verify under strict rules. Usually the
    /// message was altered, it was signed by another key, or the signature is
    /// malleated (non-canonical S, small-order R).
    #[error("signature verification failed")]
    BadSignature,
    /// A public key does not decode to a point on the curve, or is not in its
    /// canonical encoding. Usually corrupted key material or a typo in a
    /// configured key.
    #[error("invalid public key encoding")]
    InvalidKey,
    /// An Ed25519 public key has small order, so signatures under it would
    /// prove nothing. Usually an attacker offering a crafted key.
    #[error("weak (small-order) public key")]
    WeakKey,
    /// An X25519 exchange gave the all-zero shared secret: the peer sent a
    /// small-order point, so the result would not depend on our secret.
    /// Usually an attacker (or a broken peer) offering a crafted ephemeral key.
    #[error("non-contributory key exchange")]
    NonContributory,
    /// A sealed blob is shorter than its nonce and tag. Usually truncated
    /// storage or a value that was never sealed.
    #[error("sealed data too short")]
    TooShort,
    /// A ciphertext is longer than AES-GCM allows under one nonce. Only a
    /// caller bug or hostile input that bypassed the codec's caps.
    #[error("data too long for AES-GCM")]
    TooLong,
}

/// Fixed-size secret bytes, zeroized on drop and printed as `<redacted>`.
///
/// Equality is constant time.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Secret<const N: usize>([u8; N]);

/// A 128-bit AES key.
pub type Key16 = Secret<16>;
/// A 256-bit key or pseudorandom key.
pub type Key32 = Secret<32>;
/// A 96-bit AES-GCM nonce base from the key schedule.
pub type Iv12 = Secret<12>;

impl<const N: usize> Secret<N> {
    /// Wraps secret bytes. The caller should zeroize its own copy.
    pub fn from_bytes(bytes: [u8; N]) -> Self {
        Self(bytes)
    }

    /// Draws fresh secret bytes from `rng`.
    pub fn random(rng: &mut impl CryptoRng) -> Self {
        let mut bytes = [0u8; N];
        rng.fill_bytes(&mut bytes);
        Self(bytes)
    }

    /// The secret bytes. Keep the borrow short and never copy them out
    /// unprotected.
    pub fn expose(&self) -> &[u8; N] {
        &self.0
    }
}

impl<const N: usize> PartialEq for Secret<N> {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl<const N: usize> Eq for Secret<N> {}

impl<const N: usize> core::fmt::Debug for Secret<N> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Secret<{N}>(<redacted>)")
    }
}

/// Compares two 16-byte tags in constant time.
pub fn ct_eq16(a: &[u8; 16], b: &[u8; 16]) -> bool {
    a.ct_eq(b).into()
}

/// Compares two byte strings in constant time (the length is not secret).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// The aggregate of a chunk:
/// `SHA-256("dapgw v1 aggregate" || tag_1 || ... || tag_c)[0..16]`.
///
/// Hashing (unlike XOR) binds the order and the multiplicity of the tags.
pub fn aggregate<'a>(tags: impl IntoIterator<Item = &'a [u8; 16]>) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(AGGREGATE_LABEL);
    for tag in tags {
        h.update(tag);
    }
    let digest = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

type Block = aes::Block;

/// AES-128-GCM with 96-bit nonces and 16-byte tags.
///
/// Built from the AES block cipher and GHASH directly (not the `aes-gcm`
/// crate) because the verifier needs operations an AEAD interface hides:
/// [`Gcm::tag`] recomputes the tag of a ciphertext whose tag it was never
/// given, and [`Gcm::decrypt_in_place`] decrypts after a chunk aggregate
/// (rather than the individual tag) has been checked. The round keys and
/// the hash key are zeroized on drop.
#[derive(Clone)]
pub struct Gcm {
    cipher: Aes128Enc,
    ghash: GHash,
}

impl core::fmt::Debug for Gcm {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Gcm(<redacted>)")
    }
}

// Both fields wipe themselves on drop (`aes` and `ghash` built with `zeroize`).
impl ZeroizeOnDrop for Gcm {}

impl Gcm {
    /// Expands `key` and derives the GHASH key `H = E_K(0^128)`.
    pub fn new(key: &[u8; 16]) -> Self {
        let cipher = Aes128Enc::new(key.into());
        let mut h = Block::default();
        cipher.encrypt_block(&mut h);
        let ghash = GHash::new(&h);
        h.zeroize();
        Self { cipher, ghash }
    }

    /// Encrypts `buf` in place under `nonce` and returns the tag.
    ///
    /// # Panics
    ///
    /// If `buf` is longer than AES-GCM allows (about 64 GiB); every dapgw
    /// payload is capped far below.
    pub fn seal_in_place(&self, nonce: &[u8; 12], aad: &[u8], buf: &mut [u8]) -> [u8; 16] {
        assert!(
            buf.len() as u64 <= GCM_MAX_LEN,
            "AES-GCM plaintext too long"
        );
        let mask = self.apply_keystream(nonce, buf);
        self.finish_tag(mask, aad, buf)
    }

    /// The tag that sealing some plaintext under `nonce` and `aad` would have
    /// produced, given only the resulting `ciphertext`.
    ///
    /// This is what the verifier runs on aggregated entries:
    /// `GHASH_H(aad, ciphertext, lengths) XOR E_K(J0)`.
    pub fn tag(&self, nonce: &[u8; 12], aad: &[u8], ciphertext: &[u8]) -> [u8; 16] {
        let mut mask = j0(nonce);
        self.cipher.encrypt_block(&mut mask);
        self.finish_tag(mask, aad, ciphertext)
    }

    /// Decrypts `buf` in place (counter mode from `inc32(J0)`), checking
    /// nothing.
    ///
    /// Only for ciphertexts whose tag, or whose chunk aggregate, has
    /// already been verified; otherwise use [`Gcm::open_in_place`].
    ///
    /// # Panics
    ///
    /// If `buf` is longer than AES-GCM allows (about 64 GiB).
    pub fn decrypt_in_place(&self, nonce: &[u8; 12], buf: &mut [u8]) {
        assert!(
            buf.len() as u64 <= GCM_MAX_LEN,
            "AES-GCM ciphertext too long"
        );
        let mut mask = self.apply_keystream(nonce, buf);
        mask.zeroize();
    }

    /// Checks `tag` in constant time, and only then decrypts `buf` in place.
    ///
    /// On failure `buf` is left as it was.
    pub fn open_in_place(
        &self,
        nonce: &[u8; 12],
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8; 16],
    ) -> Result<(), CryptoError> {
        if buf.len() as u64 > GCM_MAX_LEN {
            return Err(CryptoError::TooLong);
        }
        let expected = self.tag(nonce, aad, buf);
        if !ct_eq16(&expected, tag) {
            return Err(CryptoError::BadTag);
        }
        self.decrypt_in_place(nonce, buf);
        Ok(())
    }

    /// `GHASH_H(aad || pad || ct || pad || len(aad) || len(ct)) XOR mask`.
    fn finish_tag(&self, mut mask: Block, aad: &[u8], ct: &[u8]) -> [u8; 16] {
        let mut gh = self.ghash.clone();
        gh.update_padded(aad);
        gh.update_padded(ct);
        let mut lengths = Block::default();
        lengths[..8].copy_from_slice(&((aad.len() as u64) * 8).to_be_bytes());
        lengths[8..].copy_from_slice(&((ct.len() as u64) * 8).to_be_bytes());
        gh.update(&[lengths]);
        let s = gh.finalize();
        let mut tag = [0u8; 16];
        for ((t, a), b) in tag.iter_mut().zip(s.iter()).zip(mask.iter()) {
            *t = a ^ b;
        }
        mask.zeroize();
        tag
    }

    /// XORs the keystream from `inc32(J0)` into `buf` and returns `E_K(J0)`,
    /// computed in the same batch as the first counter blocks.
    fn apply_keystream(&self, nonce: &[u8; 12], buf: &mut [u8]) -> Block {
        let base = j0(nonce);
        let mut blocks = [Block::default(); PAR_BLOCKS];
        // Counter value of blocks[0] in the current batch; J0 has counter 1.
        let mut ctr: u32 = 1;
        let mut mask = None;
        let mut rest = buf;
        loop {
            // The first batch spends one slot on J0 (the tag mask).
            let first = mask.is_none();
            let skip = usize::from(first);
            let need = rest.len().div_ceil(16).min(PAR_BLOCKS - skip) + skip;
            for (i, block) in blocks[..need].iter_mut().enumerate() {
                *block = base;
                block[12..].copy_from_slice(&ctr.wrapping_add(i as u32).to_be_bytes());
            }
            self.cipher.encrypt_blocks(&mut blocks[..need]);
            ctr = ctr.wrapping_add(need as u32);
            if first {
                mask = Some(blocks[0]);
            }
            let take = rest.len().min((need - skip) * 16);
            let (now, later) = rest.split_at_mut(take);
            for (chunk, ks) in now.chunks_mut(16).zip(&blocks[skip..need]) {
                for (b, k) in chunk.iter_mut().zip(ks.iter()) {
                    *b ^= k;
                }
            }
            rest = later;
            if rest.is_empty() {
                break;
            }
        }
        for block in &mut blocks {
            block.as_mut_slice().zeroize();
        }
        mask.unwrap_or_default()
    }
}

/// The pre-counter block `J0 = nonce || 0x00000001` for a 96-bit nonce.
fn j0(nonce: &[u8; 12]) -> Block {
    let mut b = Block::default();
    b[..12].copy_from_slice(nonce);
    b[15] = 1;
    b
}

/// An Ed25519 signing key (the offline root or an online key of V).
///
/// The secret is zeroized on drop and never printed.
#[derive(Clone)]
pub struct SigningKey(ed25519_dalek::SigningKey);

impl core::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("SigningKey(<redacted>)")
    }
}

impl SigningKey {
    /// The key for a 32-byte RFC 8032 seed.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self(ed25519_dalek::SigningKey::from_bytes(seed))
    }

    /// A fresh key from `rng`.
    pub fn generate(rng: &mut impl CryptoRng) -> Self {
        let seed = Key32::random(rng);
        Self::from_seed(seed.expose())
    }

    /// The 32-byte seed, for writing the key to protected storage.
    pub fn to_seed(&self) -> Key32 {
        Secret::from_bytes(self.0.to_bytes())
    }

    /// Signs `msg` (pure Ed25519, no prehash, no context).
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        use ed25519_dalek::Signer;
        self.0.sign(msg).to_bytes()
    }

    /// The matching public key.
    pub fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey(self.0.verifying_key())
    }
}

/// An Ed25519 public key that is canonically encoded and not of small order.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct VerifyingKey(ed25519_dalek::VerifyingKey);

impl core::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "VerifyingKey({})", hex::encode(self.0.as_bytes()))
    }
}

impl VerifyingKey {
    /// Parses a public key, rejecting encodings that are not a curve point
    /// ([`CryptoError::InvalidKey`]), are not canonical (same error), or
    /// have small order ([`CryptoError::WeakKey`]).
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, CryptoError> {
        let key =
            ed25519_dalek::VerifyingKey::from_bytes(bytes).map_err(|_| CryptoError::InvalidKey)?;
        // Decompression accepts some non-reduced y coordinates; re-encoding
        // exposes them, so one key has exactly one accepted encoding.
        if key.to_edwards().compress().as_bytes() != bytes {
            return Err(CryptoError::InvalidKey);
        }
        if key.is_weak() {
            return Err(CryptoError::WeakKey);
        }
        Ok(Self(key))
    }

    /// The 32-byte encoding.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// Verifies `sig` over `msg` strictly: S must be canonical (below the
    /// group order) and R must not have small order, so a signature has
    /// exactly one valid encoding.
    pub fn verify(&self, msg: &[u8], sig: &[u8; 64]) -> Result<(), CryptoError> {
        let sig = ed25519_dalek::Signature::from_bytes(sig);
        self.0
            .verify_strict(msg, &sig)
            .map_err(|_| CryptoError::BadSignature)
    }
}

/// An X25519 key pair: V's per-round `e_V`, or a member's per-response `e_i`.
///
/// The secret is zeroized on drop. It may serve several exchanges (V uses
/// one per round for every member), so erase it by dropping the pair.
pub struct EphemeralKeyPair {
    secret: x25519_dalek::StaticSecret,
    public: [u8; 32],
}

impl core::fmt::Debug for EphemeralKeyPair {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("EphemeralKeyPair")
            .field("public", &hex::encode(self.public))
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl EphemeralKeyPair {
    /// A fresh pair from `rng`.
    pub fn generate(rng: &mut impl CryptoRng) -> Self {
        Self::from_secret(x25519_dalek::StaticSecret::random_from_rng(rng))
    }

    /// The pair for given secret bytes (known-answer vectors, restored state).
    pub fn from_secret_bytes(secret: &[u8; 32]) -> Self {
        Self::from_secret(x25519_dalek::StaticSecret::from(*secret))
    }

    fn from_secret(secret: x25519_dalek::StaticSecret) -> Self {
        let public = x25519_dalek::PublicKey::from(&secret).to_bytes();
        Self { secret, public }
    }

    /// The public key to put on the wire.
    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    /// The secret bytes, for persisting a member's `e_i` with its response.
    pub fn secret_bytes(&self) -> Key32 {
        Secret::from_bytes(self.secret.to_bytes())
    }

    /// X25519 with the peer's public key; an all-zero result (a small-order
    /// peer key) is [`CryptoError::NonContributory`].
    pub fn diffie_hellman(&self, peer: &[u8; 32]) -> Result<SharedSecret, CryptoError> {
        let peer = x25519_dalek::PublicKey::from(*peer);
        let shared = self.secret.diffie_hellman(&peer);
        if bool::from(shared.as_bytes().ct_eq(&[0u8; 32])) {
            return Err(CryptoError::NonContributory);
        }
        Ok(SharedSecret(Secret::from_bytes(shared.to_bytes())))
    }
}

/// An X25519 shared secret, zeroized on drop and never printed.
#[derive(Debug)]
pub struct SharedSecret(Key32);

impl SharedSecret {
    /// The 32 shared bytes (the IKM of the session extract).
    pub fn expose(&self) -> &[u8; 32] {
        self.0.expose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes_gcm::aead::AeadInOut;

    /// A deterministic generator for reproducible tests (not for keys).
    struct TestRng(u64);

    impl rand_core::TryRng for TestRng {
        type Error = core::convert::Infallible;
        fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
            Ok(self.try_next_u64()? as u32)
        }
        fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
            // splitmix64
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

    fn bytes<const N: usize>(rng: &mut TestRng) -> [u8; N] {
        let mut b = [0u8; N];
        rand_core::Rng::fill_bytes(rng, &mut b);
        b
    }

    fn vec(rng: &mut TestRng, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        rand_core::Rng::fill_bytes(rng, &mut v);
        v
    }

    fn len(rng: &mut TestRng, max: u64) -> usize {
        (rand_core::Rng::next_u64(rng) % (max + 1)) as usize
    }

    #[test]
    fn gcm_matches_aes_gcm_crate_on_random_inputs() {
        let mut rng = TestRng(1);
        for round in 0..600 {
            let key: [u8; 16] = bytes(&mut rng);
            let nonce: [u8; 12] = bytes(&mut rng);
            let aad_len = len(&mut rng, 100);
            let aad = vec(&mut rng, aad_len);
            // Mostly short inputs, some long enough for several AES batches.
            let pt_len = if round % 10 == 0 {
                len(&mut rng, 400)
            } else {
                len(&mut rng, 100)
            };
            let pt = vec(&mut rng, pt_len);

            let reference = aes_gcm::Aes128Gcm::new(&key.into());
            let mut expected = pt.clone();
            let expected_tag = reference
                .encrypt_inout_detached(&nonce.into(), &aad, expected.as_mut_slice().into())
                .unwrap();

            let gcm = Gcm::new(&key);
            let mut ct = pt.clone();
            let tag = gcm.seal_in_place(&nonce, &aad, &mut ct);
            assert_eq!(ct, expected, "ciphertext, round {round}");
            assert_eq!(
                tag.as_slice(),
                expected_tag.as_slice(),
                "tag, round {round}"
            );
            assert_eq!(gcm.tag(&nonce, &aad, &ct), tag);

            let mut opened = ct.clone();
            gcm.open_in_place(&nonce, &aad, &mut opened, &tag).unwrap();
            assert_eq!(opened, pt);

            let mut decrypted = ct.clone();
            gcm.decrypt_in_place(&nonce, &mut decrypted);
            assert_eq!(decrypted, pt);

            // Flip one random bit of ciphertext, aad, tag or nonce.
            let which = len(&mut rng, 3);
            let (mut c2, mut a2, mut t2, mut n2) = (ct.clone(), aad.clone(), tag, nonce);
            let target: &mut [u8] = match which {
                0 if !c2.is_empty() => &mut c2,
                1 if !a2.is_empty() => &mut a2,
                2 => &mut n2,
                _ => &mut t2,
            };
            let bit = len(&mut rng, target.len() as u64 * 8 - 1);
            target[bit / 8] ^= 1 << (bit % 8);
            let before = c2.clone();
            assert_eq!(
                gcm.open_in_place(&n2, &a2, &mut c2, &t2),
                Err(CryptoError::BadTag),
                "flipped bit accepted, round {round}"
            );
            assert_eq!(c2, before, "buffer changed on failure");
        }
    }

    #[test]
    fn gcm_every_bit_flip_of_a_short_message_fails() {
        let gcm = Gcm::new(&[7u8; 16]);
        let nonce = [9u8; 12];
        let aad = b"aad bytes";
        let mut ct = *b"nineteen byte plain";
        let tag = gcm.seal_in_place(&nonce, aad, &mut ct);
        for bit in 0..(ct.len() + 16) * 8 {
            let (mut c, mut t) = (ct, tag);
            if bit < ct.len() * 8 {
                c[bit / 8] ^= 1 << (bit % 8);
            } else {
                let b = bit - ct.len() * 8;
                t[b / 8] ^= 1 << (b % 8);
            }
            assert!(gcm.open_in_place(&nonce, aad, &mut c, &t).is_err());
        }
    }

    fn unhex<const N: usize>(s: &str) -> [u8; N] {
        let mut out = [0u8; N];
        hex::decode_to_slice(s, &mut out).unwrap();
        out
    }

    #[test]
    fn gcm_spec_test_cases_2_to_4() {
        // McGrew and Viega, "The Galois/Counter Mode of Operation", test
        // cases 2, 3 and 4 (AES-128, 96-bit IV).
        let gcm = Gcm::new(&[0u8; 16]);
        let mut pt: [u8; 16] = [0u8; 16];
        let tag = gcm.seal_in_place(&[0u8; 12], &[], &mut pt);
        assert_eq!(pt, unhex::<16>("0388dace60b6a392f328c2b971b2fe78"));
        assert_eq!(tag, unhex::<16>("ab6e47d42cec13bdf53a67b21257bddf"));

        let key = unhex::<16>("feffe9928665731c6d6a8f9467308308");
        let iv = unhex::<12>("cafebabefacedbaddecaf888");
        let p3 = unhex::<64>(
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72\
             1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255",
        );
        let c3 = unhex::<64>(
            "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e\
             21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091473f5985",
        );
        let gcm = Gcm::new(&key);
        let mut buf = p3;
        let tag = gcm.seal_in_place(&iv, &[], &mut buf);
        assert_eq!(buf, c3);
        assert_eq!(tag, unhex::<16>("4d5c2af327cd64a62cf35abd2ba6fab4"));

        let aad = unhex::<20>("feedfacedeadbeeffeedfacedeadbeefabaddad2");
        let mut buf = p3[..60].to_vec();
        let tag = gcm.seal_in_place(&iv, &aad, &mut buf);
        assert_eq!(buf, c3[..60]);
        assert_eq!(tag, unhex::<16>("5bc94fbc3221a5db94fae95ae7121a47"));
        assert_eq!(gcm.tag(&iv, &aad, &buf), tag);
        gcm.open_in_place(&iv, &aad, &mut buf, &tag).unwrap();
        assert_eq!(buf, p3[..60]);
    }

    #[test]
    fn aggregate_binds_order_and_multiplicity() {
        let (a, b) = ([1u8; 16], [2u8; 16]);
        let mut h = Sha256::new();
        h.update(b"dapgw v1 aggregate");
        h.update(a);
        h.update(b);
        assert_eq!(aggregate([&a, &b]), h.finalize()[..16]);
        assert_ne!(aggregate([&a, &b]), aggregate([&b, &a]));
        // XOR would cancel a duplicated pair; the hash does not.
        assert_ne!(aggregate([&a, &b, &b]), aggregate([&a]));
        assert_ne!(aggregate(std::iter::empty()), aggregate([&[0u8; 16]]));
        assert!(ct_eq16(&aggregate([&a]), &aggregate(vec![&a])));
        assert!(!ct_eq(b"ab", b"ac"));
        assert!(!ct_eq(b"ab", b"abc"));
    }

    #[test]
    fn ed25519_rfc8032_test_1() {
        let sk = SigningKey::from_seed(&unhex(
            "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        ));
        let pk = unhex::<32>("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a");
        let sig = unhex::<64>(
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155\
             5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
        );
        assert_eq!(sk.verifying_key().to_bytes(), pk);
        assert_eq!(sk.sign(b""), sig);
        let vk = VerifyingKey::from_bytes(&pk).unwrap();
        vk.verify(b"", &sig).unwrap();
        assert_eq!(vk.verify(b"x", &sig), Err(CryptoError::BadSignature));
        assert_eq!(format!("{sk:?}"), "SigningKey(<redacted>)");
    }

    #[test]
    fn ed25519_rejects_small_order_key_and_non_canonical_s() {
        // The identity point (y = 1) has order 1.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert_eq!(
            VerifyingKey::from_bytes(&identity),
            Err(CryptoError::WeakKey)
        );
        // The point of order 2 (y = -1).
        let mut order2 = [0xffu8; 32];
        order2[0] = 0xec;
        order2[31] = 0x7f;
        assert_eq!(VerifyingKey::from_bytes(&order2), Err(CryptoError::WeakKey));
        // y = p + 1 is the identity again, non-canonically encoded.
        let mut non_canonical = [0xffu8; 32];
        non_canonical[0] = 0xee;
        non_canonical[31] = 0x7f;
        assert!(VerifyingKey::from_bytes(&non_canonical).is_err());

        // S + L verifies under the lax equation but must fail strictly.
        let sk = SigningKey::from_seed(&[3u8; 32]);
        let vk = sk.verifying_key();
        let msg = b"dapgw v1 challenge";
        let mut sig = sk.sign(msg);
        vk.verify(msg, &sig).unwrap();
        const L: [u8; 32] = [
            0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9,
            0xde, 0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
        ];
        let mut carry = 0u16;
        for (s, l) in sig[32..].iter_mut().zip(L) {
            let v = u16::from(*s) + u16::from(l) + carry;
            *s = v as u8;
            carry = v >> 8;
        }
        assert_eq!(carry, 0, "S + L fits in 256 bits for this S");
        assert_eq!(vk.verify(msg, &sig), Err(CryptoError::BadSignature));
    }

    #[test]
    fn ed25519_rejects_small_order_r() {
        // R = identity, S = 0 satisfies [S]B = R + [k]A only when A is small
        // order; with a real key it must fail, and strict mode rejects it
        // before the equation anyway.
        let vk = SigningKey::from_seed(&[4u8; 32]).verifying_key();
        let mut sig = [0u8; 64];
        sig[0] = 1;
        assert_eq!(vk.verify(b"m", &sig), Err(CryptoError::BadSignature));
    }

    #[test]
    fn x25519_rfc7748_vector_and_non_contributory() {
        // RFC 7748 section 6.1.
        let alice = EphemeralKeyPair::from_secret_bytes(&unhex(
            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
        ));
        let bob = EphemeralKeyPair::from_secret_bytes(&unhex(
            "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
        ));
        assert_eq!(
            alice.public(),
            unhex::<32>("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
        );
        let k = unhex::<32>("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742");
        assert_eq!(alice.diffie_hellman(&bob.public()).unwrap().expose(), &k);
        assert_eq!(bob.diffie_hellman(&alice.public()).unwrap().expose(), &k);

        // u = 0 and u = 1 are small-order points: the result is all zero.
        for u in [[0u8; 32], {
            let mut one = [0u8; 32];
            one[0] = 1;
            one
        }] {
            assert_eq!(
                alice.diffie_hellman(&u).unwrap_err(),
                CryptoError::NonContributory
            );
        }

        let mut rng = TestRng(5);
        let a = EphemeralKeyPair::generate(&mut rng);
        let b = EphemeralKeyPair::generate(&mut rng);
        assert_eq!(
            a.diffie_hellman(&b.public()).unwrap().expose(),
            b.diffie_hellman(&a.public()).unwrap().expose()
        );
        let restored = EphemeralKeyPair::from_secret_bytes(a.secret_bytes().expose());
        assert_eq!(restored.public(), a.public());
    }

    #[test]
    fn secrets_are_redacted() {
        let s = Key16::from_bytes([0xAB; 16]);
        let pair = EphemeralKeyPair::from_secret_bytes(&[0xCD; 32]);
        let shared = pair.diffie_hellman(&pair.public()).unwrap();
        for text in [
            format!("{s:?}"),
            format!("{:?}", Gcm::new(&[0xAB; 16])),
            format!("{pair:?}"),
            format!("{shared:?}"),
        ] {
            assert!(text.contains("redacted"), "{text}");
            assert!(!text.to_lowercase().contains("abab"), "{text}");
            assert!(!text.to_lowercase().contains("cdcd"), "{text}");
        }
        assert_eq!(s, Key16::from_bytes([0xAB; 16]));
        assert_ne!(s, Key16::from_bytes([0xAC; 16]));
    }

    #[test]
    fn sys_rng_adapter_is_a_crypto_rng() {
        let mut rng = rand_core::UnwrapErr(getrandom::SysRng);
        let a = Key32::random(&mut rng);
        let b = Key32::random(&mut rng);
        assert_ne!(a, b);
    }
}
