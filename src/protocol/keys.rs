//! The suite 1 key schedule (docs/protocol.md, "Key schedule"), member
//! provisioning, key certificates, and the storage-key AEAD.
//!
//! Data flow: V turns its master secret into member keys
//! ([`MemberKeyDeriver`]), a member and V both turn a member key and a
//! transcript hash into response keys and then session keys
//! ([`response_keys`], [`session_keys`]), and V keeps sessions and group
//! keys at rest under a [`StorageKey`]. The primitives come from
//! [`super::suite`]; nothing here touches the wire codec.

use hkdf::Hkdf;
use rand_core::CryptoRng;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::suite::{
    CryptoError, Gcm, Iv12, Key16, Key32, Secret, SharedSecret, SigningKey, VerifyingKey,
};

/// Salt of the extract over the master secret.
const MEMBER_ROOT_LABEL: &[u8] = b"dapgw v1 member root";
/// Info prefix of a member key expand.
const MEMBER_LABEL: &[u8] = b"dapgw v1 member";
/// Salt and info prefix for vendor key import.
const IMPORT_LABEL: &[u8] = b"dapgw v1 import";
/// Prefix of the transcript hash.
const TH_LABEL: &[u8] = b"dapgw v1 th";
const RESPONSE_KEY_LABEL: &[u8] = b"dapgw v1 response key";
const RESPONSE_IV_LABEL: &[u8] = b"dapgw v1 response iv";
const CONFIRM_KEY_LABEL: &[u8] = b"dapgw v1 confirm key";
const CONFIRM_IV_LABEL: &[u8] = b"dapgw v1 confirm iv";
const UPLINK_KEY_LABEL: &[u8] = b"dapgw v1 uplink key";
const UPLINK_IV_LABEL: &[u8] = b"dapgw v1 uplink iv";
const DOWNLINK_KEY_LABEL: &[u8] = b"dapgw v1 downlink key";
const SESSION_ID_LABEL: &[u8] = b"dapgw v1 session id";
/// Prefix of the AAD of every row sealed under the storage key.
const STORAGE_LABEL: &[u8] = b"dapgw v1 storage";
/// Prefix of the message the root key signs in a key certificate.
const KEY_CERT_LABEL: &[u8] = b"dapgw v1 key certificate";
/// Wire header of a KeyCertificate: version 1, type 0x0C.
const KEY_CERT_HEADER: [u8; 2] = [0x01, 0x0C];

/// The `format` value of a member credential file.
pub const CREDENTIAL_FORMAT: &str = "dapgw-member-credentials-v1";

/// Expands `N` bytes from a PRK state. `N` is at most 32 here, far inside
/// HKDF-SHA256's limit of 8,160 bytes, so the expand cannot fail.
fn expand<const N: usize>(prk: &Hkdf<Sha256>, info: &[&[u8]]) -> [u8; N] {
    let mut out = [0u8; N];
    prk.expand_multi_info(info, &mut out)
        .unwrap_or_else(|_| unreachable!("HKDF-SHA256 output of {N} bytes is within the limit"));
    out
}

/// The master secret MS from which V derives every member key.
///
/// Loaded from a file or a key-management hook, never stored in the
/// database, zeroized on drop, and deliberately neither `Debug` nor
/// `Display`.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MasterSecret(Key32);

impl MasterSecret {
    /// Wraps 32 secret bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Secret::from_bytes(bytes))
    }

    /// Draws a fresh master secret (what `dapgw keys` does once per V).
    pub fn generate(rng: &mut impl CryptoRng) -> Self {
        Self(Key32::random(rng))
    }

    /// The secret bytes, for writing MS to its protected file.
    pub fn expose(&self) -> &[u8; 32] {
        self.0.expose()
    }
}

/// A member root key `K_i` (32 bytes), zeroized on drop and never printed.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct MemberKey(Key32);

impl core::fmt::Debug for MemberKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("MemberKey(<redacted>)")
    }
}

impl MemberKey {
    /// Wraps 32 key bytes (a member loading its provisioned credential).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Secret::from_bytes(bytes))
    }

    /// The key bytes.
    pub fn expose(&self) -> &[u8; 32] {
        self.0.expose()
    }
}

/// Derives member keys from MS without storing any per-member secret.
///
/// Holds `PRK_MS = HKDF-Extract("dapgw v1 member root", MS)` as a keyed HMAC
/// state (inner and outer pads already hashed), so each
/// [`MemberKeyDeriver::member_key`] costs one HMAC over a 28-byte input.
#[derive(Clone)]
pub struct MemberKeyDeriver {
    prk_ms: Hkdf<Sha256>,
}

impl core::fmt::Debug for MemberKeyDeriver {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("MemberKeyDeriver(<redacted>)")
    }
}

impl MemberKeyDeriver {
    /// Extracts PRK_MS from the master secret.
    pub fn new(ms: &MasterSecret) -> Self {
        let (mut prk, prk_ms) = Hkdf::<Sha256>::extract(Some(MEMBER_ROOT_LABEL), ms.expose());
        prk.as_mut_slice().zeroize();
        Self { prk_ms }
    }

    /// `K_i = HKDF-Expand(PRK_MS, "dapgw v1 member" || id || kv, 32)`.
    pub fn member_key(&self, id: u64, kv: u32) -> MemberKey {
        MemberKey(Secret::from_bytes(expand(
            &self.prk_ms,
            &[MEMBER_LABEL, &id.to_be_bytes(), &kv.to_be_bytes()],
        )))
    }
}

/// A member key imported from a meter vendor: the vendor's key is never used
/// raw, only through
/// `HKDF-Expand(HKDF-Extract("dapgw v1 import", vendor_key), "dapgw v1 import" || id || kv, 32)`.
pub fn import_member_key(vendor_key: &[u8], id: u64, kv: u32) -> MemberKey {
    let prk = Hkdf::<Sha256>::new(Some(IMPORT_LABEL), vendor_key);
    MemberKey(Secret::from_bytes(expand(
        &prk,
        &[IMPORT_LABEL, &id.to_be_bytes(), &kv.to_be_bytes()],
    )))
}

/// `th_i = SHA-256("dapgw v1 th" || ch_hash || id || kv || n_i || e_i)`,
/// with `e_i` present only in psk-ecdhe.
pub fn transcript_hash(
    ch_hash: &[u8; 32],
    id: u64,
    kv: u32,
    n_i: &[u8; 16],
    e_i: Option<&[u8; 32]>,
) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(TH_LABEL);
    h.update(ch_hash);
    h.update(id.to_be_bytes());
    h.update(kv.to_be_bytes());
    h.update(n_i);
    if let Some(e_i) = e_i {
        h.update(e_i);
    }
    h.finalize().into()
}

/// `PRK0 = HKDF-Extract(salt = K_i, IKM = th_i)`, kept between the response
/// check and the session derivation.
///
/// Holds both the bytes (the salt of the psk-ecdhe extract) and the keyed
/// HMAC state (the psk expands), so neither is recomputed.
#[derive(Clone)]
pub struct Prk0 {
    bytes: Key32,
    state: Hkdf<Sha256>,
}

impl core::fmt::Debug for Prk0 {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Prk0(<redacted>)")
    }
}

impl Prk0 {
    /// The PRK0 bytes (known-answer vectors).
    pub fn expose(&self) -> &[u8; 32] {
        self.bytes.expose()
    }
}

/// The single-use key and nonce that seal one response.
#[derive(Clone, Debug)]
pub struct ResponseKeys {
    /// `k_resp`: the AES-128-GCM key of the response.
    pub k_resp: Key16,
    /// `iv_resp`: the nonce of the response.
    pub iv_resp: Iv12,
}

/// The keys of a (member, group) session after a round.
#[derive(Clone, Debug)]
pub struct SessionKeys {
    /// `k_conf`: single-use key of the confirm V sends this member.
    pub k_conf: Key16,
    /// `iv_conf`: nonce of the confirm.
    pub iv_conf: Iv12,
    /// `k_up`: member-to-V key for uplinks, nonce `iv_up XOR ctr`.
    pub k_up: Key16,
    /// `iv_up`: base of the uplink nonces (see [`uplink_nonce`]).
    pub iv_up: Iv12,
    /// `k_down`: V-to-member key for rekeys and key updates (random nonces).
    pub k_down: Key16,
    /// `sid`: public session id, named in uplinks, confirms and rekeys.
    pub sid: [u8; 8],
}

/// Derives `PRK0` and the response key and nonce from it.
pub fn response_keys(k_i: &MemberKey, th: &[u8; 32]) -> (ResponseKeys, Prk0) {
    let (mut prk, state) = Hkdf::<Sha256>::extract(Some(k_i.expose()), th);
    let mut bytes = [0u8; 32];
    bytes.copy_from_slice(&prk);
    prk.as_mut_slice().zeroize();
    let keys = ResponseKeys {
        k_resp: Secret::from_bytes(expand(&state, &[RESPONSE_KEY_LABEL])),
        iv_resp: Secret::from_bytes(expand(&state, &[RESPONSE_IV_LABEL])),
    };
    let prk0 = Prk0 {
        bytes: Secret::from_bytes(bytes),
        state,
    };
    bytes.zeroize();
    (keys, prk0)
}

/// Derives the session keys: from `PRK = PRK0` in psk mode (`dh = None`),
/// or from `PRK = HKDF-Extract(salt = PRK0, IKM = X25519(e_i, E_V))` in
/// psk-ecdhe.
pub fn session_keys(prk0: &Prk0, dh: Option<&SharedSecret>) -> SessionKeys {
    let ecdhe;
    let prk = match dh {
        None => &prk0.state,
        Some(dh) => {
            let (mut bytes, state) =
                Hkdf::<Sha256>::extract(Some(prk0.bytes.expose()), dh.expose());
            bytes.as_mut_slice().zeroize();
            ecdhe = state;
            &ecdhe
        }
    };
    SessionKeys {
        k_conf: Secret::from_bytes(expand(prk, &[CONFIRM_KEY_LABEL])),
        iv_conf: Secret::from_bytes(expand(prk, &[CONFIRM_IV_LABEL])),
        k_up: Secret::from_bytes(expand(prk, &[UPLINK_KEY_LABEL])),
        iv_up: Secret::from_bytes(expand(prk, &[UPLINK_IV_LABEL])),
        k_down: Secret::from_bytes(expand(prk, &[DOWNLINK_KEY_LABEL])),
        sid: expand(prk, &[SESSION_ID_LABEL]),
    }
}

/// The nonce of uplink `ctr`: `iv_up XOR (0u32 || ctr u64 big-endian)`.
pub fn uplink_nonce(iv_up: &Iv12, ctr: u64) -> [u8; 12] {
    let mut nonce = *iv_up.expose();
    for (n, c) in nonce[4..].iter_mut().zip(ctr.to_be_bytes()) {
        *n ^= c;
    }
    nonce
}

/// The key that seals V's sessions and group keys at rest.
///
/// Separate from MS. Each row is `nonce [12] || ciphertext || tag [16]` with
/// AAD `"dapgw v1 storage" || identity`, where the identity names the row
/// (table, group, epoch, member, sid): a row copied under another identity
/// fails to open. The caller must encode the identity canonically
/// (fixed-width or length-prefixed fields, a table name first), or two
/// identities could share one byte string.
///
/// The nonce is NIST SP 800-38D's deterministic construction: a random
/// 8-byte field, drawn at the first seal of this key value (and its clones,
/// which share the sequence) and again after every 2^32 seals, followed by
/// a 32-bit count of the seals under that field. Twelve random bytes per
/// row would reach the 2^32 rows SP 800-38D allows a key in weeks at
/// millions of members (until session 24 every reading re-sealed a slot);
/// with this
/// construction a nonce repeats only if two processes, or two runs of
/// 2^32 seals, draw the same 8-byte field.
#[derive(Clone, Debug)]
pub struct StorageKey {
    gcm: Gcm,
    nonces: std::sync::Arc<std::sync::Mutex<NonceSeq>>,
}

/// The storage nonces' fixed field and the count under it (not secret:
/// both are in every sealed row).
#[derive(Debug, Default)]
struct NonceSeq {
    fixed: Option<[u8; 8]>,
    next: u32,
}

/// Bytes a sealed row adds to its plaintext (nonce and tag).
pub const STORAGE_OVERHEAD: usize = 12 + 16;

impl StorageKey {
    /// The storage key for 16 key bytes.
    pub fn from_bytes(key: &Key16) -> Self {
        Self {
            gcm: Gcm::new(key.expose()),
            nonces: Default::default(),
        }
    }

    /// The next nonce: the fixed field (drawn from `rng` when there is
    /// none yet, or the count under it is spent) and the count.
    fn next_nonce(&self, rng: &mut impl CryptoRng) -> [u8; 12] {
        let mut seq = self
            .nonces
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let fixed = match seq.fixed {
            Some(f) => f,
            None => {
                let mut f = [0u8; 8];
                rng.fill_bytes(&mut f);
                seq.fixed = Some(f);
                seq.next = 0;
                f
            }
        };
        let count = seq.next;
        match count.checked_add(1) {
            Some(n) => seq.next = n,
            // 2^32 seals under this field: the next one draws another.
            None => seq.fixed = None,
        }
        let mut nonce = [0u8; 12];
        nonce[..8].copy_from_slice(&fixed);
        nonce[8..].copy_from_slice(&count.to_be_bytes());
        nonce
    }

    /// Sets the count under the current field (tests of the field's renewal).
    #[cfg(test)]
    fn set_nonce_count(&self, rng: &mut impl CryptoRng, count: u32) {
        let _ = self.next_nonce(rng);
        self.nonces
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .next = count;
    }

    /// Seals one row under the next nonce (see the type's doc; `rng`
    /// draws the nonces' fixed field when a new one is due).
    ///
    /// # Panics
    ///
    /// If `plaintext` is longer than AES-GCM allows (about 64 GiB).
    pub fn seal_row(
        &self,
        rng: &mut impl CryptoRng,
        identity_aad: &[u8],
        plaintext: &[u8],
    ) -> Vec<u8> {
        self.seal_row_with(rng, identity_aad, plaintext.len(), |out| {
            out.copy_from_slice(plaintext);
        })
    }

    /// Seals one row whose plaintext of exactly `len` bytes `fill` writes
    /// into the slice it is given: the plaintext is written straight into
    /// the output buffer (allocated once, at its final size) and encrypted
    /// there, so it is never copied.
    ///
    /// # Panics
    ///
    /// If `fill` panics (for example by writing past the slice); the buffer
    /// is wiped as the panic unwinds. Or if `len` is longer than AES-GCM
    /// allows (about 64 GiB).
    pub fn seal_row_with(
        &self,
        rng: &mut impl CryptoRng,
        identity_aad: &[u8],
        len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> Vec<u8> {
        let nonce = self.next_nonce(rng);
        // Wiped if `fill` panics; emptied (nothing left to wipe) once sealed.
        let mut out = Zeroizing::new(vec![0u8; len + STORAGE_OVERHEAD]);
        out[..12].copy_from_slice(&nonce);
        let (body, tag_out) = out[12..].split_at_mut(len);
        fill(body);
        let tag = with_storage_aad(identity_aad, |aad| {
            self.gcm.seal_in_place(&nonce, aad, body)
        });
        tag_out.copy_from_slice(&tag);
        std::mem::take(&mut *out)
    }

    /// Opens a row sealed under the same identity.
    pub fn open_row(
        &self,
        identity_aad: &[u8],
        blob: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        if blob.len() < STORAGE_OVERHEAD {
            return Err(CryptoError::TooShort);
        }
        let (nonce, rest) = blob.split_at(12);
        let (ct, tag) = rest.split_at(rest.len() - 16);
        let nonce: &[u8; 12] = nonce.try_into().map_err(|_| CryptoError::TooShort)?;
        let tag: &[u8; 16] = tag.try_into().map_err(|_| CryptoError::TooShort)?;
        let mut buf = Zeroizing::new(ct.to_vec());
        with_storage_aad(identity_aad, |aad| {
            self.gcm.open_in_place(nonce, aad, &mut buf, tag)
        })?;
        Ok(buf)
    }
}

/// Runs `f` on `"dapgw v1 storage" || identity`, built on the stack for
/// the short row identities the UDC uses (no allocation per sealed row).
fn with_storage_aad<R>(identity: &[u8], f: impl FnOnce(&[u8]) -> R) -> R {
    const STACK: usize = 128;
    let n = STORAGE_LABEL.len() + identity.len();
    if n <= STACK {
        let mut buf = [0u8; STACK];
        buf[..STORAGE_LABEL.len()].copy_from_slice(STORAGE_LABEL);
        buf[STORAGE_LABEL.len()..n].copy_from_slice(identity);
        return f(&buf[..n]);
    }
    let mut aad = Vec::with_capacity(n);
    aad.extend_from_slice(STORAGE_LABEL);
    aad.extend_from_slice(identity);
    f(&aad)
}

/// The message the root key signs in a key certificate:
/// `"dapgw v1 key certificate" || 0x01 || 0x0C || key_id || key_version || public_key`.
fn key_certificate_message(key_id: u32, key_version: u32, online_public: &[u8; 32]) -> [u8; 66] {
    let mut msg = [0u8; KEY_CERT_LABEL.len() + 42];
    let (label, body) = msg.split_at_mut(KEY_CERT_LABEL.len());
    label.copy_from_slice(KEY_CERT_LABEL);
    body[..2].copy_from_slice(&KEY_CERT_HEADER);
    body[2..6].copy_from_slice(&key_id.to_be_bytes());
    body[6..10].copy_from_slice(&key_version.to_be_bytes());
    body[10..].copy_from_slice(online_public);
    msg
}

/// The root's signature over an online key's certificate (docs/protocol.md,
/// KeyCertificate).
pub fn sign_key_certificate(
    root: &SigningKey,
    key_id: u32,
    key_version: u32,
    online_public: &[u8; 32],
) -> [u8; 64] {
    root.sign(&key_certificate_message(key_id, key_version, online_public))
}

/// Checks a key certificate against the pinned root key and returns the
/// certified online key, which must itself be a valid, non-weak key.
///
/// Version ordering (only a higher `key_version` replaces the current key)
/// is the caller's state, not checked here.
pub fn verify_key_certificate(
    root: &VerifyingKey,
    key_id: u32,
    key_version: u32,
    online_public: &[u8; 32],
    root_sig: &[u8; 64],
) -> Result<VerifyingKey, CryptoError> {
    root.verify(
        &key_certificate_message(key_id, key_version, online_public),
        root_sig,
    )?;
    VerifyingKey::from_bytes(online_public)
}

/// What a meter factory injects into one member: its identity, its root key
/// and the UDC's root public key. Written by `dapgw keys` as JSON with byte
/// fields in lowercase hex.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberCredential {
    /// Member id.
    pub id: u64,
    /// Version of `key`.
    pub kv: u32,
    /// The member root key `K_i` (hex, 64 digits).
    #[serde(with = "hex_member_key")]
    pub key: MemberKey,
    /// Groups the member belongs to.
    pub groups: Vec<u32>,
    /// V's offline root Ed25519 public key, which the member pins (hex).
    #[serde(with = "hex_32")]
    pub root_public_key: [u8; 32],
    /// The lowest online key version the member trusts when it has no
    /// state of its own (first boot, or after losing its state): the
    /// version certified when the credential was written. Without it a
    /// member that lost its state would accept any root-signed online key,
    /// including one retired because it leaked. 0 (credentials written
    /// before this field) trusts any version.
    #[serde(default)]
    pub min_online_key_version: u32,
}

/// A file of member credentials, `{"format": "dapgw-member-credentials-v1",
/// "members": [...]}`. Deserializing any other format string fails.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialFile {
    /// Always [`CREDENTIAL_FORMAT`].
    pub format: CredentialFormat,
    /// One entry per member.
    pub members: Vec<MemberCredential>,
}

impl CredentialFile {
    /// A file holding `members`.
    pub fn new(members: Vec<MemberCredential>) -> Self {
        Self {
            format: CredentialFormat,
            members,
        }
    }
}

/// The format marker of a [`CredentialFile`]; (de)serializes as
/// [`CREDENTIAL_FORMAT`] and rejects anything else.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CredentialFormat;

impl Serialize for CredentialFormat {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(CREDENTIAL_FORMAT)
    }
}

impl<'de> Deserialize<'de> for CredentialFormat {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == CREDENTIAL_FORMAT {
            Ok(Self)
        } else {
            Err(serde::de::Error::custom(format_args!(
                "unsupported credential format {s:?}, expected {CREDENTIAL_FORMAT:?}"
            )))
        }
    }
}

/// Serde for `[u8; 32]` as 64 hex digits.
mod hex_32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(&s, &mut out)
            .map_err(|e| serde::de::Error::custom(format_args!("expected 64 hex digits: {e}")))?;
        Ok(out)
    }
}

/// Serde for [`MemberKey`] as 64 hex digits; our own copies of the text are
/// zeroized (the serializer's buffers are the caller's to protect).
mod hex_member_key {
    use super::MemberKey;
    use serde::{Deserialize, Deserializer, Serializer};
    use zeroize::Zeroizing;

    pub(super) fn serialize<S: Serializer>(k: &MemberKey, s: S) -> Result<S::Ok, S::Error> {
        let text = Zeroizing::new(hex::encode(k.expose()));
        s.serialize_str(&text)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<MemberKey, D::Error> {
        let text = Zeroizing::new(String::deserialize(d)?);
        let mut out = Zeroizing::new([0u8; 32]);
        // The hex error names a position or length, never the digits.
        hex::decode_to_slice(text.as_bytes(), out.as_mut_slice()).map_err(|e| {
            serde::de::Error::custom(format_args!("member key: expected 64 hex digits: {e}"))
        })?;
        Ok(MemberKey::from_bytes(*out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::suite::EphemeralKeyPair;

    /// A deterministic generator for reproducible tests (not for keys).
    struct CountingRng(u8);

    impl rand_core::TryRng for CountingRng {
        type Error = core::convert::Infallible;
        fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
            Ok(u32::from(self.next()))
        }
        fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
            Ok(u64::from(self.next()))
        }
        fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
            dst.iter_mut().for_each(|b| *b = self.next());
            Ok(())
        }
    }
    impl rand_core::TryCryptoRng for CountingRng {}
    impl CountingRng {
        fn next(&mut self) -> u8 {
            self.0 = self.0.wrapping_add(1);
            self.0
        }
    }

    fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
        use hmac::{KeyInit, Mac};
        let mut m = hmac::Hmac::<Sha256>::new_from_slice(key).unwrap();
        for p in parts {
            m.update(p);
        }
        m.finalize().into_bytes().into()
    }

    #[test]
    fn member_key_is_hkdf_with_labels() {
        let ms = MasterSecret::from_bytes([0x11; 32]);
        let d = MemberKeyDeriver::new(&ms);
        // HKDF by hand: one extract, one expand block (T(1)).
        let prk = hmac(b"dapgw v1 member root", &[&[0x11; 32]]);
        let mut info = b"dapgw v1 member".to_vec();
        info.extend_from_slice(&42u64.to_be_bytes());
        info.extend_from_slice(&7u32.to_be_bytes());
        let expected = hmac(&prk, &[&info, &[1]]);
        assert_eq!(d.member_key(42, 7).expose(), &expected);
        assert_ne!(d.member_key(42, 8), d.member_key(42, 7));
        assert_ne!(d.member_key(43, 7), d.member_key(42, 7));
        let other = MemberKeyDeriver::new(&MasterSecret::from_bytes([0x12; 32]));
        assert_ne!(other.member_key(42, 7), d.member_key(42, 7));
    }

    #[test]
    fn import_member_key_never_uses_vendor_key_raw() {
        let vendor = [0x22u8; 32];
        let k = import_member_key(&vendor, 5, 1);
        assert_ne!(k.expose(), &vendor);
        let prk = hmac(b"dapgw v1 import", &[&vendor]);
        let mut info = b"dapgw v1 import".to_vec();
        info.extend_from_slice(&5u64.to_be_bytes());
        info.extend_from_slice(&1u32.to_be_bytes());
        assert_eq!(k.expose(), &hmac(&prk, &[&info, &[1]]));
        assert_ne!(import_member_key(&vendor, 6, 1), k);
    }

    #[test]
    fn transcript_hash_covers_every_field() {
        let base = transcript_hash(&[1; 32], 2, 3, &[4; 16], None);
        let mut h = Sha256::new();
        h.update(b"dapgw v1 th");
        h.update([1u8; 32]);
        h.update(2u64.to_be_bytes());
        h.update(3u32.to_be_bytes());
        h.update([4u8; 16]);
        assert_eq!(base, <[u8; 32]>::from(h.finalize()));
        for other in [
            transcript_hash(&[9; 32], 2, 3, &[4; 16], None),
            transcript_hash(&[1; 32], 9, 3, &[4; 16], None),
            transcript_hash(&[1; 32], 2, 9, &[4; 16], None),
            transcript_hash(&[1; 32], 2, 3, &[9; 16], None),
            transcript_hash(&[1; 32], 2, 3, &[4; 16], Some(&[5; 32])),
        ] {
            assert_ne!(other, base);
        }
    }

    #[test]
    fn response_and_session_keys_follow_the_schedule() {
        let k_i = MemberKey::from_bytes([0x33; 32]);
        let th = [0x44u8; 32];
        let (resp, prk0) = response_keys(&k_i, &th);
        let prk0_hand = hmac(&[0x33; 32], &[&th]);
        assert_eq!(prk0.expose(), &prk0_hand);
        let t1 = |prk: &[u8; 32], label: &[u8]| hmac(prk, &[label, &[1]]);
        assert_eq!(
            resp.k_resp.expose()[..],
            t1(&prk0_hand, b"dapgw v1 response key")[..16]
        );
        assert_eq!(
            resp.iv_resp.expose()[..],
            t1(&prk0_hand, b"dapgw v1 response iv")[..12]
        );

        let check = |s: &SessionKeys, prk: &[u8; 32]| {
            assert_eq!(
                s.k_conf.expose()[..],
                t1(prk, b"dapgw v1 confirm key")[..16]
            );
            assert_eq!(
                s.iv_conf.expose()[..],
                t1(prk, b"dapgw v1 confirm iv")[..12]
            );
            assert_eq!(s.k_up.expose()[..], t1(prk, b"dapgw v1 uplink key")[..16]);
            assert_eq!(s.iv_up.expose()[..], t1(prk, b"dapgw v1 uplink iv")[..12]);
            assert_eq!(
                s.k_down.expose()[..],
                t1(prk, b"dapgw v1 downlink key")[..16]
            );
            assert_eq!(s.sid[..], t1(prk, b"dapgw v1 session id")[..8]);
        };
        let psk = session_keys(&prk0, None);
        check(&psk, &prk0_hand);

        let a = EphemeralKeyPair::from_secret_bytes(&[0x55; 32]);
        let b = EphemeralKeyPair::from_secret_bytes(&[0x66; 32]);
        let dh = a.diffie_hellman(&b.public()).unwrap();
        let ecdhe = session_keys(&prk0, Some(&dh));
        check(&ecdhe, &hmac(&prk0_hand, &[dh.expose()]));
        assert_ne!(ecdhe.sid, psk.sid);
        assert_ne!(ecdhe.k_up, psk.k_up);
    }

    #[test]
    fn uplink_nonce_xors_the_counter_into_the_low_bytes() {
        let iv = Iv12::from_bytes([0xF0; 12]);
        assert_eq!(uplink_nonce(&iv, 0), [0xF0; 12]);
        let n = uplink_nonce(&iv, 0x0102_0304_0506_0708);
        assert_eq!(n[..4], [0xF0; 4]);
        assert_eq!(n[4..], [0xF1, 0xF2, 0xF3, 0xF4, 0xF5, 0xF6, 0xF7, 0xF8]);
        assert_ne!(uplink_nonce(&iv, 1), uplink_nonce(&iv, 2));
    }

    #[test]
    fn storage_rows_open_only_under_their_identity() {
        let key = StorageKey::from_bytes(&Key16::from_bytes([0x77; 16]));
        let mut rng = CountingRng(0);
        let row_a = key.seal_row(&mut rng, b"session|g=1|id=1", b"secret session a");
        let row_b = key.seal_row(&mut rng, b"session|g=1|id=2", b"secret session b");
        assert_eq!(row_a.len(), 16 + STORAGE_OVERHEAD);
        assert_ne!(row_a[..12], row_b[..12], "fresh nonce per row");
        assert_eq!(
            key.open_row(b"session|g=1|id=1", &row_a)
                .unwrap()
                .as_slice(),
            b"secret session a"
        );
        // Swapping rows between identities fails.
        assert_eq!(
            key.open_row(b"session|g=1|id=1", &row_b),
            Err(CryptoError::BadTag)
        );
        assert_eq!(
            key.open_row(b"session|g=1|id=2", &row_a),
            Err(CryptoError::BadTag)
        );
        let mut tampered = row_a.clone();
        tampered[14] ^= 1;
        assert!(key.open_row(b"session|g=1|id=1", &tampered).is_err());
        assert_eq!(key.open_row(b"x", &row_a[..27]), Err(CryptoError::TooShort));
        let empty = key.seal_row(&mut rng, b"e", b"");
        assert!(key.open_row(b"e", &empty).unwrap().is_empty());
        let other = StorageKey::from_bytes(&Key16::from_bytes([0x78; 16]));
        assert!(other.open_row(b"session|g=1|id=1", &row_a).is_err());
    }

    #[test]
    fn storage_nonces_count_under_a_random_field() {
        let key = StorageKey::from_bytes(&Key16::from_bytes([0x77; 16]));
        let mut rng = CountingRng(0);
        let nonce = |row: &[u8]| <[u8; 12]>::try_from(&row[..12]).unwrap();
        let a = nonce(&key.seal_row(&mut rng, b"r", b"a"));
        // A clone (another handle in the same process) continues the count.
        let b = nonce(&key.clone().seal_row(&mut rng, b"r", b"b"));
        assert_eq!(a[..8], b[..8], "one field");
        assert_eq!((&a[8..], &b[8..]), (&[0, 0, 0, 0][..], &[0, 0, 0, 1][..]));
        // Another process with the same key draws a field of its own.
        let other = StorageKey::from_bytes(&Key16::from_bytes([0x77; 16]));
        let c = nonce(&other.seal_row(&mut rng, b"r", b"c"));
        assert_ne!(c[..8], a[..8]);
        assert_eq!(c[8..], [0, 0, 0, 0]);
        // After 2^32 seals under a field, the next seal draws another.
        key.set_nonce_count(&mut rng, u32::MAX);
        let last = nonce(&key.seal_row(&mut rng, b"r", b"d"));
        let renewed = nonce(&key.seal_row(&mut rng, b"r", b"e"));
        assert_eq!(last[..8], a[..8]);
        assert_eq!(last[8..], [0xFF; 4]);
        assert_ne!(renewed[..8], a[..8]);
        assert_eq!(renewed[8..], [0, 0, 0, 0]);
        assert_eq!(
            key.open_row(b"r", &key.seal_row(&mut rng, b"r", b"f"))
                .unwrap()
                .as_slice(),
            b"f"
        );
    }

    #[test]
    fn key_certificate_round_trip_and_layout() {
        let root = SigningKey::from_seed(&[0x88; 32]);
        let online = SigningKey::from_seed(&[0x99; 32])
            .verifying_key()
            .to_bytes();
        let sig = sign_key_certificate(&root, 3, 9, &online);
        let mut msg = b"dapgw v1 key certificate".to_vec();
        msg.extend_from_slice(&[1, 0x0C, 0, 0, 0, 3, 0, 0, 0, 9]);
        msg.extend_from_slice(&online);
        root.verifying_key().verify(&msg, &sig).unwrap();

        let vk = verify_key_certificate(&root.verifying_key(), 3, 9, &online, &sig).unwrap();
        assert_eq!(vk.to_bytes(), online);
        for (id, ver) in [(4, 9), (3, 10)] {
            assert_eq!(
                verify_key_certificate(&root.verifying_key(), id, ver, &online, &sig),
                Err(CryptoError::BadSignature)
            );
        }
        let not_root = SigningKey::from_seed(&[0x89; 32]).verifying_key();
        assert!(verify_key_certificate(&not_root, 3, 9, &online, &sig).is_err());
        // A certificate over a weak key is refused even if the root signed it.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let sig = sign_key_certificate(&root, 3, 9, &identity);
        assert_eq!(
            verify_key_certificate(&root.verifying_key(), 3, 9, &identity, &sig),
            Err(CryptoError::WeakKey)
        );
    }

    #[test]
    fn credential_file_json_round_trip() {
        let cred = MemberCredential {
            id: 1001,
            kv: 1,
            key: MemberKey::from_bytes([0xAB; 32]),
            groups: vec![7, 8],
            root_public_key: [0xCD; 32],
            min_online_key_version: 3,
        };
        let file = CredentialFile::new(vec![cred.clone()]);
        let json = serde_json::to_string(&file).unwrap();
        assert!(json.contains("\"format\":\"dapgw-member-credentials-v1\""));
        assert!(json.contains(&"ab".repeat(32)));
        assert!(json.contains(&"cd".repeat(32)));
        let back: CredentialFile = serde_json::from_str(&json).unwrap();
        assert_eq!(back, file);

        let text = format!("{cred:?}");
        assert!(
            text.contains("redacted") && !text.contains("171, 171"),
            "{text}"
        );

        let wrong_format = json.replace("credentials-v1", "credentials-v2");
        assert!(serde_json::from_str::<CredentialFile>(&wrong_format).is_err());
        let short_key = json.replace(&"ab".repeat(32), &"ab".repeat(31));
        let err = serde_json::from_str::<CredentialFile>(&short_key).unwrap_err();
        assert!(!err.to_string().contains("abab"), "{err}");
        let not_hex = json.replace(&"ab".repeat(32), &"zz".repeat(32));
        assert!(serde_json::from_str::<CredentialFile>(&not_hex).is_err());
    }

    #[test]
    fn key_types_are_redacted() {
        let ms = MasterSecret::from_bytes([0xAB; 32]);
        let d = MemberKeyDeriver::new(&ms);
        let (resp, prk0) = response_keys(&d.member_key(1, 1), &[0; 32]);
        let s = session_keys(&prk0, None);
        for text in [
            format!("{d:?}"),
            format!("{prk0:?}"),
            format!("{resp:?}"),
            format!("{s:?}"),
            format!(
                "{:?}",
                StorageKey::from_bytes(&Key16::from_bytes([0xAB; 16]))
            ),
        ] {
            assert!(text.contains("redacted"), "{text}");
            assert!(!text.to_lowercase().contains("abab"), "{text}");
        }
    }
}
