//! Every dapgw v1 message as a Rust value, and its byte layout
//! (`docs/protocol.md`, sections Conventions, Caps and Messages).
//!
//! This sits between the transport and the rest of the core: the gateway
//! decodes what members send and encodes batches for the verifier; the
//! verifier and the members decode and encode the rest. Nothing here does
//! cryptography: signatures, tags and ciphertexts are opaque byte strings,
//! and [`Challenge::signed_bytes`], the `*_aad` builders and the `LABEL_*`
//! constants give the crypto code the exact bytes it must sign, check or
//! authenticate.
//!
//! Decoding is canonical: whenever `decode(x)` succeeds, encoding the result
//! gives back `x` byte for byte. Variable-length fields (ciphertexts, the read
//! request, the inner message of a [`Direct`]) are [`Bytes`] slices of the
//! input, so relaying them never copies.
//!
//! Encoding trusts the caller: a value whose fields break a cap (a payload
//! over [`MAX_PAYLOAD`], a batch whose entries disagree with its mode) still
//! encodes, and the peer's decoder refuses it. Only a length that cannot be
//! expressed at all (over `u16::MAX` in a `vec16`) panics.

use core::fmt;
use core::ops::Range;
use core::str::FromStr;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use super::codec::{
    DecodeError, FixedWriter, Reader, len16, len32, put_opt_flag, put_varint, put_vec8, put_vec16,
    put_vec32, unzigzag, varint_len, zigzag,
};

/// The protocol version byte that starts every message.
pub const VERSION: u8 = 1;

// ---------------------------------------------------------------------------
// Caps
// ---------------------------------------------------------------------------

/// Largest response payload (a reading) and uplink payload, in bytes.
pub const MAX_PAYLOAD: usize = 1024;
/// Largest read request carried in a challenge, in bytes.
pub const MAX_READ_REQUEST: usize = 256;
/// Largest group-message payload (plaintext), in bytes.
pub const MAX_GROUP_PAYLOAD: usize = 65_536;
/// Largest group-message ciphertext: payload plus the GCM tag.
pub const MAX_GROUP_CIPHERTEXT: usize = MAX_GROUP_PAYLOAD + TAG_LEN;
/// Most entries in one batch (and outcomes and confirms in one verdict).
pub const MAX_BATCH_ENTRIES: usize = 16_384;
/// Largest chunk size `c` of a batch (the smallest is 1).
pub const MAX_CHUNK_SIZE: usize = 1024;
/// Most chunks named in one tag request, and answered in one tag reply.
pub const MAX_TAG_REQUEST_CHUNKS: usize = 1024;
/// Longest gateway id, in bytes.
pub const MAX_GATEWAY_ID: usize = 64;
/// Largest inner message of a [`Direct`]: a psk-ecdhe Response carrying a
/// full payload (the largest Response or Uplink there is).
pub const MAX_DIRECT_INNER: usize = 2 + RESPONSE_FIXED_LEN + 32 + MAX_PAYLOAD;

/// Length of a GCM tag, an aggregate `A_k` and a stripped entry tag.
pub const TAG_LEN: usize = 16;
/// Length of a complete [`KeyCertificate`] message.
pub const KEY_CERTIFICATE_LEN: usize = 106;
/// Length of a complete [`Confirm`] message.
pub const CONFIRM_LEN: usize = 70;
/// Length of a complete [`Rekey`] message.
pub const REKEY_LEN: usize = 82;
/// Length of a complete [`KeyUpdate`] message.
pub const KEY_UPDATE_LEN: usize = 94;
/// Length of an ack's plaintext ([`AckPayload`]).
pub const ACK_PAYLOAD_LEN: usize = 52;

/// Response body bytes other than `e_i` and the payload.
const RESPONSE_FIXED_LEN: usize = 8 + 4 + 4 + 8 + 1 + 16 + 2 + TAG_LEN;
/// Uplink body bytes other than the payload.
const UPLINK_FIXED_LEN: usize = 4 + 8 + 8 + 1 + 8 + 2 + TAG_LEN;
/// Smallest response entry in a batch (psk, empty payload, kv as before):
/// one-byte id delta, one-byte length, `n_i`.
const RESPONSE_ENTRY_MIN_LEN: usize = 1 + 1 + 16;
/// Smallest uplink entry in a batch (empty payload): one-byte id delta,
/// `sid`, one-byte counter, one-byte length and kind.
const UPLINK_ENTRY_MIN_LEN: usize = 1 + 8 + 1 + 1;

// ---------------------------------------------------------------------------
// Labels: the single place for every domain-separation string of the protocol.
// Some are used only by the crypto modules (suite, member, verifier).
// ---------------------------------------------------------------------------

/// Signature label of a [`Challenge`].
pub(crate) const LABEL_CHALLENGE: &[u8] = b"dapgw v1 challenge";
/// Signature label of a [`GroupMessage`], and the first bytes of its AAD.
pub(crate) const LABEL_GROUP_MESSAGE: &[u8] = b"dapgw v1 group message";
/// Signature label of a [`KeyCertificate`].
pub(crate) const LABEL_KEY_CERTIFICATE: &[u8] = b"dapgw v1 key certificate";
/// Transcript hash `th_i` label.
#[allow(dead_code)]
pub(crate) const LABEL_TH: &[u8] = b"dapgw v1 th";
/// Chunk aggregate `A_k` label.
#[allow(dead_code)]
pub(crate) const LABEL_AGGREGATE: &[u8] = b"dapgw v1 aggregate";
/// Confirm AAD label.
pub(crate) const LABEL_CONFIRM: &[u8] = b"dapgw v1 confirm";
/// Uplink AAD label.
pub(crate) const LABEL_UP: &[u8] = b"dapgw v1 up";
/// Rekey AAD label.
pub(crate) const LABEL_REKEY: &[u8] = b"dapgw v1 rekey";
/// Key-update AAD label.
pub(crate) const LABEL_KEY_UPDATE: &[u8] = b"dapgw v1 key update";
/// Salt and info prefix for imported vendor keys.
#[allow(dead_code)]
pub(crate) const LABEL_IMPORT: &[u8] = b"dapgw v1 import";
/// Salt of `PRK_MS`.
#[allow(dead_code)]
pub(crate) const LABEL_MEMBER_ROOT: &[u8] = b"dapgw v1 member root";
/// Info prefix of a member root key `K_i`.
#[allow(dead_code)]
pub(crate) const LABEL_MEMBER: &[u8] = b"dapgw v1 member";
/// Info of `k_resp`.
#[allow(dead_code)]
pub(crate) const LABEL_RESPONSE_KEY: &[u8] = b"dapgw v1 response key";
/// Info of `iv_resp`.
#[allow(dead_code)]
pub(crate) const LABEL_RESPONSE_IV: &[u8] = b"dapgw v1 response iv";
/// Info of `k_conf`.
#[allow(dead_code)]
pub(crate) const LABEL_CONFIRM_KEY: &[u8] = b"dapgw v1 confirm key";
/// Info of `iv_conf`.
#[allow(dead_code)]
pub(crate) const LABEL_CONFIRM_IV: &[u8] = b"dapgw v1 confirm iv";
/// Info of `k_up`.
#[allow(dead_code)]
pub(crate) const LABEL_UPLINK_KEY: &[u8] = b"dapgw v1 uplink key";
/// Info of `iv_up`.
#[allow(dead_code)]
pub(crate) const LABEL_UPLINK_IV: &[u8] = b"dapgw v1 uplink iv";
/// Info of `k_down`.
#[allow(dead_code)]
pub(crate) const LABEL_DOWNLINK_KEY: &[u8] = b"dapgw v1 downlink key";
/// Info of the session id `sid`.
#[allow(dead_code)]
pub(crate) const LABEL_SESSION_ID: &[u8] = b"dapgw v1 session id";

// ---------------------------------------------------------------------------
// Vocabulary: identifiers and small enums
// ---------------------------------------------------------------------------

/// A member (meter) id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MemberId(pub u64);

/// A group id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct GroupId(pub u32);

/// A session id, derived from the key schedule; public (it travels in clear).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SessionId(pub [u8; 8]);

impl fmt::Display for MemberId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

/// A gateway id: 1 to 64 bytes from `[a-z0-9._-]`.
///
/// Stored inline so it is `Copy`; ordered and compared as its bytes.
#[derive(Clone, Copy, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct GatewayId {
    len: u8,
    /// The id in `bytes[..len]`; the rest is always zero.
    bytes: [u8; MAX_GATEWAY_ID],
}

/// A string is not a valid [`GatewayId`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a gateway id must be 1 to 64 characters from [a-z0-9._-]")]
pub struct GatewayIdError;

impl GatewayId {
    /// Validates `id`.
    pub fn new(id: &str) -> Result<Self, GatewayIdError> {
        Self::from_bytes(id.as_bytes())
    }

    /// Validates raw bytes (as found on the wire).
    pub fn from_bytes(id: &[u8]) -> Result<Self, GatewayIdError> {
        let ok_char = |b: &u8| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-');
        if id.is_empty() || id.len() > MAX_GATEWAY_ID || !id.iter().all(ok_char) {
            return Err(GatewayIdError);
        }
        let mut bytes = [0u8; MAX_GATEWAY_ID];
        bytes[..id.len()].copy_from_slice(id);
        Ok(Self {
            len: id.len() as u8,
            bytes,
        })
    }

    /// The id as bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// The id as text (always ASCII).
    pub fn as_str(&self) -> &str {
        core::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }

    fn read(r: &mut Reader<'_>, what: &'static str) -> Result<Self, DecodeError> {
        let raw = r.vec8(MAX_GATEWAY_ID, what)?;
        Self::from_bytes(raw).map_err(|_| DecodeError::Invalid(what))
    }

    fn encode(&self, out: &mut BytesMut) {
        put_vec8(out, self.as_bytes());
    }

    fn encoded_len(&self) -> usize {
        1 + usize::from(self.len)
    }
}

impl PartialEq for GatewayId {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for GatewayId {}

impl PartialOrd for GatewayId {
    fn partial_cmp(&self, other: &Self) -> Option<core::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for GatewayId {
    fn cmp(&self, other: &Self) -> core::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl core::hash::Hash for GatewayId {
    fn hash<H: core::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl fmt::Display for GatewayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for GatewayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GatewayId({:?})", self.as_str())
    }
}

impl FromStr for GatewayId {
    type Err = GatewayIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for GatewayId {
    type Error = GatewayIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(&s)
    }
}

impl From<GatewayId> for String {
    fn from(id: GatewayId) -> Self {
        id.as_str().to_owned()
    }
}

/// Declares a one-byte code enum with `code()` and `from_code()`.
macro_rules! code_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $var:ident = $code:literal,)+ }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        #[repr(u8)]
        pub enum $name {
            $($(#[$vm])* $var = $code,)+
        }

        impl $name {
            /// The wire code.
            pub const fn code(self) -> u8 {
                self as u8
            }

            /// The value for a wire code, if the code is defined.
            pub const fn from_code(code: u8) -> Option<Self> {
                match code {
                    $($code => Some(Self::$var),)+
                    _ => None,
                }
            }

            #[allow(dead_code)] // not every enum is read as a plain byte
            fn read(r: &mut Reader<'_>, what: &'static str) -> Result<Self, DecodeError> {
                Self::from_code(r.u8(what)?).ok_or(DecodeError::Invalid(what))
            }
        }
    };
}

code_enum! {
    /// The type byte of a message (second byte of every message).
    MessageType {
        /// [`Challenge`].
        Challenge = 0x01,
        /// [`Response`].
        Response = 0x02,
        /// [`Uplink`].
        Uplink = 0x03,
        /// [`Batch`].
        Batch = 0x04,
        /// [`Verdict`].
        Verdict = 0x05,
        /// [`TagReply`].
        TagReply = 0x06,
        /// [`Confirm`].
        Confirm = 0x07,
        /// [`GroupMessage`].
        GroupMessage = 0x08,
        /// [`Rekey`].
        Rekey = 0x09,
        /// [`KeyUpdate`].
        KeyUpdate = 0x0A,
        /// [`Direct`].
        Direct = 0x0B,
        /// [`KeyCertificate`].
        KeyCertificate = 0x0C,
    }
}

code_enum! {
    /// Key-exchange mode of a round.
    Mode {
        /// Pre-shared key only.
        Psk = 1,
        /// Pre-shared key plus an X25519 exchange (forward secrecy).
        PskEcdhe = 2,
    }
}

code_enum! {
    /// What an uplink carries.
    UplinkKind {
        /// A meter reading.
        Reading = 1,
        /// An alarm.
        Alarm = 2,
        /// An acknowledgement of a group message ([`AckPayload`]).
        Ack = 3,
    }
}

code_enum! {
    /// What a batch carries.
    BatchKind {
        /// Responses to a challenge.
        Responses = 1,
        /// Session uplinks.
        Uplinks = 2,
    }
}

code_enum! {
    /// The verifier's judgement of one batch entry.
    Outcome {
        /// Accepted.
        Accepted = 0,
        /// No such member.
        UnknownMember = 1,
        /// The member is not in the batch's group.
        NotInGroup = 2,
        /// The round is not open.
        RoundNotOpen = 3,
        /// The member was already accepted in this round.
        AlreadyAccepted = 4,
        /// The member is revoked.
        Revoked = 5,
        /// The tag did not verify as relayed by the gateway; not held against
        /// the member.
        UnverifiedViaGateway = 6,
        /// The member used a key version that is no longer current.
        StaleKeyVersion = 7,
        /// The uplink counter was already seen or is outside the window.
        ReplayedCounter = 8,
        /// No such session.
        UnknownSession = 9,
        /// The payload decrypted but is not well formed.
        MalformedPayload = 10,
    }
}

// ---------------------------------------------------------------------------
// Shared machinery of all messages
// ---------------------------------------------------------------------------

fn put_header(out: &mut BytesMut, t: MessageType) {
    out.put_u8(VERSION);
    out.put_u8(t.code());
}

/// Reads the version and type bytes, returning the type.
fn read_any_header(r: &mut Reader<'_>) -> Result<MessageType, DecodeError> {
    let version = r.u8("header.version")?;
    if version != VERSION {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    let t = r.u8("header.type")?;
    MessageType::from_code(t).ok_or(DecodeError::UnknownType(t))
}

/// Reads the header, requiring type `want`.
fn read_header(r: &mut Reader<'_>, want: MessageType) -> Result<(), DecodeError> {
    match read_any_header(r)? {
        t if t == want => Ok(()),
        t => Err(DecodeError::WrongType(t.code())),
    }
}

/// The body (everything after the header) of one message type.
trait Body: Sized {
    const TYPE: MessageType;
    /// Context for `TrailingBytes`.
    const NAME: &'static str;
    fn encode_body(&self, out: &mut BytesMut);
    fn read_body(r: &mut Reader<'_>) -> Result<Self, DecodeError>;
    fn body_len(&self) -> usize;
}

/// Reads a complete message of type `T` (header and body) from `r`.
fn read_message<T: Body>(r: &mut Reader<'_>) -> Result<T, DecodeError> {
    read_header(r, T::TYPE)?;
    T::read_body(r)
}

/// Gives a [`Body`] type the public `encode` / `to_bytes` / `decode` /
/// `encoded_len` methods every message has.
macro_rules! message_methods {
    ($($t:ident),+ $(,)?) => {$(
        impl $t {
            /// Appends the complete encoding (header included) to `out`.
            pub fn encode(&self, out: &mut BytesMut) {
                put_header(out, <Self as Body>::TYPE);
                self.encode_body(out);
            }

            /// The complete encoding in a buffer of exactly the right size.
            pub fn to_bytes(&self) -> Bytes {
                let mut out = BytesMut::with_capacity(self.encoded_len());
                self.encode(&mut out);
                out.freeze()
            }

            /// Length in bytes of the complete encoding.
            pub fn encoded_len(&self) -> usize {
                2 + self.body_len()
            }

            /// Decodes one complete message, header included. Trailing bytes
            /// are rejected; variable-length fields share `input`'s memory.
            pub fn decode(input: &Bytes) -> Result<Self, DecodeError> {
                let mut r = Reader::new(input);
                let msg = read_message::<Self>(&mut r)?;
                r.expect_end(<Self as Body>::NAME)?;
                Ok(msg)
            }
        }
    )+};
}

message_methods!(
    KeyCertificate,
    Challenge,
    Response,
    Uplink,
    Batch,
    Verdict,
    TagReply,
    Confirm,
    GroupMessage,
    Rekey,
    KeyUpdate,
    Direct,
);

/// Starts a signed encoding: `label || header`.
fn signed_prefix(label: &[u8], t: MessageType, body_len: usize) -> BytesMut {
    let mut out = BytesMut::with_capacity(label.len() + 2 + body_len);
    out.put_slice(label);
    put_header(&mut out, t);
    out
}

// ---------------------------------------------------------------------------
// KeyCertificate
// ---------------------------------------------------------------------------

/// The offline root key's certificate for an online signing key (0x0C).
/// Embedded in a [`Challenge`] to roll members onto a new online key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyCertificate {
    /// Online key id, named by every signature the key makes.
    pub key_id: u32,
    /// Strictly increasing across rotations.
    pub key_version: u32,
    /// Ed25519 public key of the online signing key.
    pub public_key: [u8; 32],
    /// Ed25519 signature by the root key over [`Self::signed_bytes`].
    pub root_sig: [u8; 64],
}

impl KeyCertificate {
    /// What the root key signs: `"dapgw v1 key certificate"` followed by the
    /// first 42 bytes of the message (everything before `root_sig`).
    pub fn signed_bytes(&self) -> BytesMut {
        let mut out = signed_prefix(LABEL_KEY_CERTIFICATE, Self::TYPE, 40);
        self.encode_unsigned(&mut out);
        out
    }

    fn encode_unsigned(&self, out: &mut BytesMut) {
        out.put_u32(self.key_id);
        out.put_u32(self.key_version);
        out.put_slice(&self.public_key);
    }
}

impl Body for KeyCertificate {
    const TYPE: MessageType = MessageType::KeyCertificate;
    const NAME: &'static str = "key_certificate";

    fn encode_body(&self, out: &mut BytesMut) {
        self.encode_unsigned(out);
        out.put_slice(&self.root_sig);
    }

    fn read_body(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self {
            key_id: r.u32("key_certificate.key_id")?,
            key_version: r.u32("key_certificate.key_version")?,
            public_key: r.array("key_certificate.public_key")?,
            root_sig: r.array("key_certificate.root_sig")?,
        })
    }

    fn body_len(&self) -> usize {
        KEY_CERTIFICATE_LEN - 2
    }
}

// ---------------------------------------------------------------------------
// Challenge
// ---------------------------------------------------------------------------

/// What a round asks of the members.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// Authenticate only; responses carry an empty payload.
    Auth,
    /// Authenticate and return a reading; carries the read request (at most
    /// [`MAX_READ_REQUEST`] bytes).
    Read(Bytes),
}

/// V's signed call for a round (0x01), relayed by the gateway to every member
/// of the group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    /// The group the round is for.
    pub group: GroupId,
    /// Round number, strictly increasing per group.
    pub round: u64,
    /// Current group epoch.
    pub epoch: u64,
    /// V's nonce `N_V`.
    pub nonce_v: [u8; 16],
    /// V's ephemeral X25519 public key `E_V`: present exactly in psk-ecdhe
    /// mode (see [`Challenge::mode`]).
    pub e_v: Option<[u8; 32]>,
    /// Auth only, or auth plus a read.
    pub purpose: Purpose,
    /// Latest group-message seq of this group.
    pub group_seq: u64,
    /// SHA-256 of the complete GroupMessage (header and signature
    /// included) that carried the current configuration; zeros if none.
    pub config_hash: [u8; 32],
    /// Optional expiry, Unix seconds.
    pub not_after: Option<u64>,
    /// A new online key, certified by the root key.
    pub key_cert: Option<KeyCertificate>,
    /// Id of the online key that signed.
    pub key_id: u32,
    /// Ed25519 signature over [`Self::signed_bytes`].
    pub signature: [u8; 64],
}

impl Challenge {
    /// The round's mode: psk-ecdhe exactly when `e_v` is present.
    pub fn mode(&self) -> Mode {
        if self.e_v.is_some() {
            Mode::PskEcdhe
        } else {
            Mode::Psk
        }
    }

    /// What the online key signs: `"dapgw v1 challenge"` followed by every
    /// byte of the message before `signature`.
    pub fn signed_bytes(&self) -> BytesMut {
        let mut out = signed_prefix(LABEL_CHALLENGE, Self::TYPE, self.body_len() - 64);
        self.encode_unsigned(&mut out);
        out
    }

    fn encode_unsigned(&self, out: &mut BytesMut) {
        out.put_u32(self.group.0);
        out.put_u64(self.round);
        out.put_u64(self.epoch);
        out.put_slice(&self.nonce_v);
        out.put_u8(self.mode().code());
        if let Some(e_v) = &self.e_v {
            out.put_slice(e_v);
        }
        match &self.purpose {
            Purpose::Auth => out.put_u8(1),
            Purpose::Read(req) => {
                out.put_u8(2);
                put_vec16(out, req);
            }
        }
        out.put_u64(self.group_seq);
        out.put_slice(&self.config_hash);
        put_opt_flag(out, self.not_after.is_some());
        if let Some(t) = self.not_after {
            out.put_u64(t);
        }
        put_opt_flag(out, self.key_cert.is_some());
        if let Some(cert) = &self.key_cert {
            cert.encode(out);
        }
        out.put_u32(self.key_id);
    }
}

impl Body for Challenge {
    const TYPE: MessageType = MessageType::Challenge;
    const NAME: &'static str = "challenge";

    fn encode_body(&self, out: &mut BytesMut) {
        self.encode_unsigned(out);
        out.put_slice(&self.signature);
    }

    fn read_body(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let group = GroupId(r.u32("challenge.group")?);
        let round = r.u64("challenge.round")?;
        let epoch = r.u64("challenge.epoch")?;
        let nonce_v = r.array("challenge.nonce_v")?;
        let e_v = match Mode::read(r, "challenge.mode")? {
            Mode::Psk => None,
            Mode::PskEcdhe => Some(r.array("challenge.e_v")?),
        };
        let purpose = match r.u8("challenge.purpose")? {
            1 => Purpose::Auth,
            2 => Purpose::Read(r.vec16(MAX_READ_REQUEST, "challenge.read_req")?),
            _ => return Err(DecodeError::Invalid("challenge.purpose")),
        };
        let group_seq = r.u64("challenge.group_seq")?;
        let config_hash = r.array("challenge.config_hash")?;
        let not_after = if r.opt_flag("challenge.not_after")? {
            Some(r.u64("challenge.not_after")?)
        } else {
            None
        };
        let key_cert = if r.opt_flag("challenge.key_cert")? {
            Some(read_message::<KeyCertificate>(r)?)
        } else {
            None
        };
        Ok(Self {
            group,
            round,
            epoch,
            nonce_v,
            e_v,
            purpose,
            group_seq,
            config_hash,
            not_after,
            key_cert,
            key_id: r.u32("challenge.key_id")?,
            signature: r.array("challenge.signature")?,
        })
    }

    fn body_len(&self) -> usize {
        let e_v = if self.e_v.is_some() { 32 } else { 0 };
        let purpose = match &self.purpose {
            Purpose::Auth => 1,
            Purpose::Read(req) => 3 + req.len(),
        };
        let not_after = if self.not_after.is_some() { 9 } else { 1 };
        let cert = if self.key_cert.is_some() {
            1 + KEY_CERTIFICATE_LEN
        } else {
            1
        };
        4 + 8 + 8 + 16 + 1 + e_v + purpose + 8 + 32 + not_after + cert + 4 + 64
    }
}

// ---------------------------------------------------------------------------
// Response and its batch entry
// ---------------------------------------------------------------------------

/// A member's answer to a challenge (0x02).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// The answering member.
    pub id: MemberId,
    /// Version of the member's root key.
    pub kv: u32,
    /// The challenge's group.
    pub group: GroupId,
    /// The challenge's round.
    pub round: u64,
    /// The member's nonce `N_i`.
    pub n_i: [u8; 16],
    /// The member's X25519 public key `E_i`: present exactly in psk-ecdhe
    /// mode (see [`Response::mode`]).
    pub e_i: Option<[u8; 32]>,
    /// Ciphertext of the payload (at most [`MAX_PAYLOAD`] bytes).
    pub c: Bytes,
    /// GCM tag.
    pub tag: [u8; 16],
}

impl Response {
    /// The mode this response was made in: psk-ecdhe exactly when `e_i` is
    /// present.
    pub fn mode(&self) -> Mode {
        if self.e_i.is_some() {
            Mode::PskEcdhe
        } else {
            Mode::Psk
        }
    }

    /// The batch entry for this response (the tag stripped).
    pub fn entry(&self) -> ResponseEntry {
        ResponseEntry {
            id: self.id,
            kv: self.kv,
            n_i: self.n_i,
            e_i: self.e_i,
            c: self.c.clone(),
        }
    }

    /// Rebuilds a response from a batch entry, the batch's group and round,
    /// and the entry's tag (the inverse of [`Response::entry`]).
    pub fn from_entry(entry: ResponseEntry, group: GroupId, round: u64, tag: [u8; 16]) -> Self {
        Self {
            id: entry.id,
            kv: entry.kv,
            group,
            round,
            n_i: entry.n_i,
            e_i: entry.e_i,
            c: entry.c,
            tag,
        }
    }
}

impl Body for Response {
    const TYPE: MessageType = MessageType::Response;
    const NAME: &'static str = "response";

    fn encode_body(&self, out: &mut BytesMut) {
        out.put_u64(self.id.0);
        out.put_u32(self.kv);
        out.put_u32(self.group.0);
        out.put_u64(self.round);
        out.put_u8(self.mode().code());
        out.put_slice(&self.n_i);
        if let Some(e_i) = &self.e_i {
            out.put_slice(e_i);
        }
        put_vec16(out, &self.c);
        out.put_slice(&self.tag);
    }

    fn read_body(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let id = MemberId(r.u64("response.id")?);
        let kv = r.u32("response.kv")?;
        let group = GroupId(r.u32("response.group")?);
        let round = r.u64("response.round")?;
        let mode = Mode::read(r, "response.mode")?;
        let n_i = r.array("response.n_i")?;
        let e_i = match mode {
            Mode::Psk => None,
            Mode::PskEcdhe => Some(r.array("response.e_i")?),
        };
        Ok(Self {
            id,
            kv,
            group,
            round,
            n_i,
            e_i,
            c: r.vec16(MAX_PAYLOAD, "response.c")?,
            tag: r.array("response.tag")?,
        })
    }

    fn body_len(&self) -> usize {
        RESPONSE_FIXED_LEN + if self.e_i.is_some() { 32 } else { 0 } + self.c.len()
    }
}

/// A response in a batch: the tag stripped, group and round and mode taken
/// from the batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseEntry {
    /// The answering member; entries are strictly increasing by id.
    pub id: MemberId,
    /// Version of the member's root key.
    pub kv: u32,
    /// The member's nonce `N_i`.
    pub n_i: [u8; 16],
    /// `E_i`, present exactly when the batch's mode is psk-ecdhe.
    pub e_i: Option<[u8; 32]>,
    /// Ciphertext of the payload.
    pub c: Bytes,
}

impl ResponseEntry {
    /// The key batch entries are strictly increasing by.
    pub fn sort_key(&self) -> MemberId {
        self.id
    }

    /// The `len_kv` field: payload length and whether `kv` follows.
    fn len_kv(&self, base: EntryBase) -> u64 {
        ((self.c.len() as u64) << 1) | u64::from(self.kv != base.kv)
    }

    /// Appends the compact encoding relative to the previous entry `base`,
    /// then moves `base` to this entry.
    fn encode(&self, base: &mut EntryBase, out: &mut BytesMut) {
        put_varint(out, base.id_delta(self.id));
        put_varint(out, self.len_kv(*base));
        if self.kv != base.kv {
            put_varint(out, u64::from(self.kv));
        }
        out.put_slice(&self.n_i);
        if let Some(e_i) = &self.e_i {
            out.put_slice(e_i);
        }
        out.put_slice(&self.c);
        *base = EntryBase {
            id: self.id.0,
            kv: self.kv,
        };
    }

    fn read(r: &mut Reader<'_>, mode: Mode, base: &mut EntryBase) -> Result<Self, DecodeError> {
        let id = base.apply_delta(r.varint("batch.entry.id")?);
        let len_kv = r.varint("batch.entry.len_kv")?;
        let len = payload_len(len_kv >> 1, "batch.entry.c")?;
        let kv = if len_kv & 1 == 1 {
            // Present only when it differs: one encoding per value.
            match r.varint_u32("batch.entry.kv")? {
                kv if kv == base.kv => return Err(DecodeError::Invalid("batch.entry.kv")),
                kv => kv,
            }
        } else {
            base.kv
        };
        let n_i = r.array("batch.entry.n_i")?;
        let e_i = match mode {
            Mode::Psk => None,
            Mode::PskEcdhe => Some(r.array("batch.entry.e_i")?),
        };
        let c = r.take_bytes(len, "batch.entry.c")?;
        *base = EntryBase { id: id.0, kv };
        Ok(Self {
            id,
            kv,
            n_i,
            e_i,
            c,
        })
    }

    /// Length of the compact encoding after the entry `base`.
    fn encoded_len(&self, base: EntryBase) -> usize {
        let kv = if self.kv != base.kv {
            varint_len(u64::from(self.kv))
        } else {
            0
        };
        varint_len(base.id_delta(self.id))
            + varint_len(self.len_kv(base))
            + kv
            + 16
            + if self.e_i.is_some() { 32 } else { 0 }
            + self.c.len()
    }
}

/// What a batch entry's compact encoding is relative to: the previous
/// entry's member id and (response batches) key version, both zero before
/// the first entry.
#[derive(Clone, Copy, Debug, Default)]
struct EntryBase {
    id: u64,
    kv: u32,
}

impl EntryBase {
    /// The `id` field of an entry: ZigZag of the difference to the previous
    /// id, modulo 2^64. Every sequence of ids has one encoding, so an
    /// unsorted batch or one with a duplicate still decodes, for the
    /// verifier to refuse as a structural fault.
    fn id_delta(self, id: MemberId) -> u64 {
        zigzag(id.0.wrapping_sub(self.id) as i64)
    }

    /// The inverse of [`EntryBase::id_delta`].
    fn apply_delta(self, z: u64) -> MemberId {
        MemberId(self.id.wrapping_add(unzigzag(z) as u64))
    }
}

/// A payload length read from a batch entry, checked against
/// [`MAX_PAYLOAD`] before anything is taken (the bytes themselves are then
/// checked against what remains).
fn payload_len(len: u64, what: &'static str) -> Result<usize, DecodeError> {
    match usize::try_from(len) {
        Ok(n) if n <= MAX_PAYLOAD => Ok(n),
        _ => Err(DecodeError::TooLong(what)),
    }
}

// ---------------------------------------------------------------------------
// Uplink and its batch entry
// ---------------------------------------------------------------------------

/// A member's message within a session (0x03): a reading, an alarm or an ack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uplink {
    /// The session's group.
    pub group: GroupId,
    /// The sending member.
    pub id: MemberId,
    /// The session.
    pub sid: SessionId,
    /// What the payload is.
    pub kind: UplinkKind,
    /// Counter, from 1, strictly increasing per session.
    pub ctr: u64,
    /// Ciphertext of the payload (at most [`MAX_PAYLOAD`] bytes).
    pub c: Bytes,
    /// GCM tag.
    pub tag: [u8; 16],
}

impl Uplink {
    /// The batch entry for this uplink (tag and group stripped).
    pub fn entry(&self) -> UplinkEntry {
        UplinkEntry {
            id: self.id,
            sid: self.sid,
            kind: self.kind,
            ctr: self.ctr,
            c: self.c.clone(),
        }
    }

    /// Rebuilds an uplink from a batch entry, the batch's group and the
    /// entry's tag (the inverse of [`Uplink::entry`]).
    pub fn from_entry(entry: UplinkEntry, group: GroupId, tag: [u8; 16]) -> Self {
        Self {
            group,
            id: entry.id,
            sid: entry.sid,
            kind: entry.kind,
            ctr: entry.ctr,
            c: entry.c,
            tag,
        }
    }

    /// This uplink's AAD (see [`uplink_aad`]).
    pub fn aad(&self) -> [u8; UPLINK_AAD_LEN] {
        uplink_aad(self.kind, self.group, self.id, self.sid, self.ctr)
    }
}

impl Body for Uplink {
    const TYPE: MessageType = MessageType::Uplink;
    const NAME: &'static str = "uplink";

    fn encode_body(&self, out: &mut BytesMut) {
        out.put_u32(self.group.0);
        out.put_u64(self.id.0);
        out.put_slice(&self.sid.0);
        out.put_u8(self.kind.code());
        out.put_u64(self.ctr);
        put_vec16(out, &self.c);
        out.put_slice(&self.tag);
    }

    fn read_body(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self {
            group: GroupId(r.u32("uplink.group")?),
            id: MemberId(r.u64("uplink.id")?),
            sid: SessionId(r.array("uplink.sid")?),
            kind: UplinkKind::read(r, "uplink.kind")?,
            ctr: r.u64("uplink.ctr")?,
            c: r.vec16(MAX_PAYLOAD, "uplink.c")?,
            tag: r.array("uplink.tag")?,
        })
    }

    fn body_len(&self) -> usize {
        UPLINK_FIXED_LEN + self.c.len()
    }
}

/// An uplink in a batch: tag stripped, group taken from the batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UplinkEntry {
    /// The sending member.
    pub id: MemberId,
    /// The session.
    pub sid: SessionId,
    /// What the payload is.
    pub kind: UplinkKind,
    /// Session counter.
    pub ctr: u64,
    /// Ciphertext of the payload.
    pub c: Bytes,
}

impl UplinkEntry {
    /// The key batch entries are strictly increasing by: `(id, sid, ctr)`.
    pub fn sort_key(&self) -> (MemberId, SessionId, u64) {
        (self.id, self.sid, self.ctr)
    }

    /// The `len_kind` field: payload length and kind in one number.
    fn len_kind(&self) -> u64 {
        ((self.c.len() as u64) << 2) | u64::from(self.kind.code())
    }

    /// Appends the compact encoding relative to the previous entry `base`,
    /// then moves `base` to this entry.
    fn encode(&self, base: &mut EntryBase, out: &mut BytesMut) {
        put_varint(out, base.id_delta(self.id));
        out.put_slice(&self.sid.0);
        put_varint(out, self.ctr);
        put_varint(out, self.len_kind());
        out.put_slice(&self.c);
        base.id = self.id.0;
    }

    fn read(r: &mut Reader<'_>, base: &mut EntryBase) -> Result<Self, DecodeError> {
        let id = base.apply_delta(r.varint("batch.entry.id")?);
        let sid = SessionId(r.array("batch.entry.sid")?);
        let ctr = r.varint("batch.entry.ctr")?;
        let len_kind = r.varint("batch.entry.len_kind")?;
        // The low two bits are the kind code (1..=3; 0 is no kind).
        let kind = UplinkKind::from_code((len_kind & 3) as u8)
            .ok_or(DecodeError::Invalid("batch.entry.kind"))?;
        let len = payload_len(len_kind >> 2, "batch.entry.c")?;
        let c = r.take_bytes(len, "batch.entry.c")?;
        base.id = id.0;
        Ok(Self {
            id,
            sid,
            kind,
            ctr,
            c,
        })
    }

    /// Length of the compact encoding after the entry `base`.
    fn encoded_len(&self, base: EntryBase) -> usize {
        varint_len(base.id_delta(self.id))
            + 8
            + varint_len(self.ctr)
            + varint_len(self.len_kind())
            + self.c.len()
    }
}

// ---------------------------------------------------------------------------
// Batch
// ---------------------------------------------------------------------------

/// The kind-specific part of a [`Batch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BatchBody {
    /// Responses to one round's challenge.
    Responses {
        /// The round answered.
        round: u64,
        /// The round's mode; every entry carries `e_i` exactly in psk-ecdhe.
        mode: Mode,
        /// Entries, strictly increasing by id.
        entries: Vec<ResponseEntry>,
    },
    /// Session uplinks.
    Uplinks {
        /// Entries, strictly increasing by `(id, sid, ctr)`.
        entries: Vec<UplinkEntry>,
    },
}

/// The gateway's aggregate of many responses or uplinks of one group (0x04).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// The sending gateway.
    pub gateway_id: GatewayId,
    /// Unique and strictly increasing per gateway, across restarts.
    pub batch_id: u64,
    /// The group of every entry.
    pub group: GroupId,
    /// Chunk size `c`, 1..=[`MAX_CHUNK_SIZE`].
    pub chunk_size: u16,
    /// The entries.
    pub body: BatchBody,
    /// One aggregate `A_k` per chunk, `chunk_count()` of them.
    pub aggregates: Vec<[u8; 16]>,
}

/// A batch is structurally unfit for verification; the verifier rejects the
/// whole batch before any cryptography.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BatchStructureError {
    /// No entries. A decoded batch is never empty.
    #[error("batch is empty")]
    Empty,
    /// More than [`MAX_BATCH_ENTRIES`] entries.
    #[error("batch has {0} entries, over the cap")]
    TooManyEntries(usize),
    /// Chunk size outside 1..=[`MAX_CHUNK_SIZE`].
    #[error("chunk size {0} is outside 1..=1024")]
    ChunkSize(u16),
    /// The number of aggregates is not one per chunk.
    #[error("batch has {found} aggregates, expected {expected}")]
    AggregateCount {
        /// One per chunk.
        expected: usize,
        /// As built.
        found: usize,
    },
    /// A response entry's `e_i` presence disagrees with the batch mode
    /// (index of the first such entry). Only a batch built in memory can have
    /// this; a decoded one cannot.
    #[error("entry {0} does not match the batch mode")]
    ModeMismatch(usize),
    /// Entry `i` is not strictly greater than entry `i - 1` (the first such
    /// `i`): the batch is unsorted or holds a duplicate.
    #[error("entry {0} is not strictly greater than the entry before it")]
    NotSorted(usize),
}

impl Batch {
    /// Responses or uplinks.
    pub fn kind(&self) -> BatchKind {
        match self.body {
            BatchBody::Responses { .. } => BatchKind::Responses,
            BatchBody::Uplinks { .. } => BatchKind::Uplinks,
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        match &self.body {
            BatchBody::Responses { entries, .. } => entries.len(),
            BatchBody::Uplinks { entries } => entries.len(),
        }
    }

    /// Whether the batch has no entries (never true for a decoded batch).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of chunks, `ceil(len / chunk_size)` (0 if the chunk size is 0).
    pub fn chunk_count(&self) -> usize {
        chunk_count(self.len(), self.chunk_size)
    }

    /// Entry indices of chunk `k`: `k*c .. min((k+1)*c, len)`.
    pub fn chunk_range(&self, k: usize) -> Option<Range<usize>> {
        let c = usize::from(self.chunk_size);
        (k < self.chunk_count()).then(|| k * c..((k + 1) * c).min(self.len()))
    }

    /// Entry index ranges of every chunk, in order.
    pub fn chunks(&self) -> impl ExactSizeIterator<Item = Range<usize>> + use<> {
        let (c, len) = (usize::from(self.chunk_size), self.len());
        (0..self.chunk_count()).map(move |k| k * c..((k + 1) * c).min(len))
    }

    /// The structural checks the verifier runs before any cryptography:
    /// non-empty, within caps, valid chunk size, one aggregate per chunk,
    /// entries agree with the mode, entries strictly increasing.
    ///
    /// `decode` enforces the caps but not the order, so that the verifier can
    /// report an unsorted batch as such.
    pub fn check_structure(&self) -> Result<(), BatchStructureError> {
        let len = self.len();
        if len == 0 {
            return Err(BatchStructureError::Empty);
        }
        if len > MAX_BATCH_ENTRIES {
            return Err(BatchStructureError::TooManyEntries(len));
        }
        if !(1..=MAX_CHUNK_SIZE).contains(&usize::from(self.chunk_size)) {
            return Err(BatchStructureError::ChunkSize(self.chunk_size));
        }
        if self.aggregates.len() != self.chunk_count() {
            return Err(BatchStructureError::AggregateCount {
                expected: self.chunk_count(),
                found: self.aggregates.len(),
            });
        }
        match &self.body {
            BatchBody::Responses { mode, entries, .. } => {
                let ecdhe = *mode == Mode::PskEcdhe;
                if let Some(i) = entries.iter().position(|e| e.e_i.is_some() != ecdhe) {
                    return Err(BatchStructureError::ModeMismatch(i));
                }
                first_unsorted(entries, ResponseEntry::sort_key)
            }
            BatchBody::Uplinks { entries } => first_unsorted(entries, UplinkEntry::sort_key),
        }
        .map_or(Ok(()), |i| Err(BatchStructureError::NotSorted(i)))
    }

    /// Checks the entry count against the cap and the remaining input, then
    /// reads `count` entries into one `Vec`.
    fn read_entries<T>(
        r: &mut Reader<'_>,
        count: usize,
        min_len: usize,
        mut read: impl FnMut(&mut Reader<'_>) -> Result<T, DecodeError>,
    ) -> Result<Vec<T>, DecodeError> {
        r.check_count(count, MAX_BATCH_ENTRIES, min_len, "batch.count")?;
        let mut entries = Vec::with_capacity(count);
        for _ in 0..count {
            entries.push(read(r)?);
        }
        Ok(entries)
    }
}

fn chunk_count(len: usize, chunk_size: u16) -> usize {
    match usize::from(chunk_size) {
        0 => 0,
        c => len.div_ceil(c),
    }
}

/// Index of the first entry not strictly greater than its predecessor.
fn first_unsorted<T, K: Ord>(entries: &[T], key: impl Fn(&T) -> K) -> Option<usize> {
    entries
        .windows(2)
        .position(|w| key(&w[0]) >= key(&w[1]))
        .map(|i| i + 1)
}

impl Body for Batch {
    const TYPE: MessageType = MessageType::Batch;
    const NAME: &'static str = "batch";

    fn encode_body(&self, out: &mut BytesMut) {
        self.gateway_id.encode(out);
        out.put_u64(self.batch_id);
        out.put_u8(self.kind().code());
        out.put_u32(self.group.0);
        if let BatchBody::Responses { round, mode, .. } = &self.body {
            out.put_u64(*round);
            out.put_u8(mode.code());
        }
        out.put_u16(self.chunk_size);
        out.put_u32(len32(self.len()));
        let mut base = EntryBase::default();
        match &self.body {
            BatchBody::Responses { entries, .. } => {
                entries.iter().for_each(|e| e.encode(&mut base, out));
            }
            BatchBody::Uplinks { entries } => {
                entries.iter().for_each(|e| e.encode(&mut base, out));
            }
        }
        for a in &self.aggregates {
            out.put_slice(a);
        }
    }

    fn read_body(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let gateway_id = GatewayId::read(r, "batch.gateway_id")?;
        let batch_id = r.u64("batch.batch_id")?;
        let kind = BatchKind::read(r, "batch.kind")?;
        let group = GroupId(r.u32("batch.group")?);
        let round_mode = match kind {
            BatchKind::Responses => Some((r.u64("batch.round")?, Mode::read(r, "batch.mode")?)),
            BatchKind::Uplinks => None,
        };
        let chunk_size = r.u16("batch.chunk_size")?;
        match usize::from(chunk_size) {
            0 => return Err(DecodeError::Invalid("batch.chunk_size")),
            c if c > MAX_CHUNK_SIZE => return Err(DecodeError::TooLong("batch.chunk_size")),
            _ => {}
        }
        let count = r.u32("batch.count")? as usize;
        if count == 0 {
            return Err(DecodeError::Invalid("batch.count"));
        }
        let mut base = EntryBase::default();
        let body = match round_mode {
            Some((round, mode)) => {
                let min_len = RESPONSE_ENTRY_MIN_LEN + if mode == Mode::PskEcdhe { 32 } else { 0 };
                let entries = Self::read_entries(r, count, min_len, |r| {
                    ResponseEntry::read(r, mode, &mut base)
                })?;
                BatchBody::Responses {
                    round,
                    mode,
                    entries,
                }
            }
            None => BatchBody::Uplinks {
                entries: Self::read_entries(r, count, UPLINK_ENTRY_MIN_LEN, |r| {
                    UplinkEntry::read(r, &mut base)
                })?,
            },
        };
        let chunks = chunk_count(count, chunk_size);
        r.check_count(chunks, MAX_BATCH_ENTRIES, TAG_LEN, "batch.aggregates")?;
        let mut aggregates = Vec::with_capacity(chunks);
        for _ in 0..chunks {
            aggregates.push(r.array("batch.aggregates")?);
        }
        Ok(Self {
            gateway_id,
            batch_id,
            group,
            chunk_size,
            body,
            aggregates,
        })
    }

    fn body_len(&self) -> usize {
        // Each entry's length depends on the one before it.
        let (head, entries) = match &self.body {
            BatchBody::Responses { entries, .. } => (
                9,
                entries
                    .iter()
                    .scan(EntryBase::default(), |base, e| {
                        let len = e.encoded_len(*base);
                        *base = EntryBase {
                            id: e.id.0,
                            kv: e.kv,
                        };
                        Some(len)
                    })
                    .sum::<usize>(),
            ),
            BatchBody::Uplinks { entries } => (
                0,
                entries
                    .iter()
                    .scan(EntryBase::default(), |base, e| {
                        let len = e.encoded_len(*base);
                        base.id = e.id.0;
                        Some(len)
                    })
                    .sum(),
            ),
        };
        self.gateway_id.encoded_len()
            + 8
            + 1
            + 4
            + head
            + 2
            + 4
            + entries
            + TAG_LEN * self.aggregates.len()
    }
}

// ---------------------------------------------------------------------------
// Verdict
// ---------------------------------------------------------------------------

const VERDICT_FINAL: u8 = 1;
const VERDICT_TAGS_REQUESTED: u8 = 2;

/// What the verifier decided about a batch so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VerdictBody {
    /// The verdict is final.
    Final {
        /// One outcome per entry, in batch order.
        outcomes: Vec<Outcome>,
        /// One confirm per accepted response (none for uplink batches).
        confirms: Vec<Confirm>,
    },
    /// The verifier needs the individual tags of some chunks first.
    TagsRequested {
        /// Chunk indices, strictly increasing, 1..=[`MAX_TAG_REQUEST_CHUNKS`]
        /// of them.
        chunks: Vec<u32>,
    },
}

/// The verifier's answer to a batch (0x05).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// The gateway that sent the batch.
    pub gateway_id: GatewayId,
    /// The batch answered.
    pub batch_id: u64,
    /// SHA-256 of the whole batch message.
    pub batch_hash: [u8; 32],
    /// Final outcomes, or a tag request.
    pub body: VerdictBody,
}

impl Body for Verdict {
    const TYPE: MessageType = MessageType::Verdict;
    const NAME: &'static str = "verdict";

    fn encode_body(&self, out: &mut BytesMut) {
        self.gateway_id.encode(out);
        out.put_u64(self.batch_id);
        out.put_slice(&self.batch_hash);
        match &self.body {
            VerdictBody::Final { outcomes, confirms } => {
                out.put_u8(VERDICT_FINAL);
                out.put_u32(len32(outcomes.len()));
                outcomes.iter().for_each(|o| out.put_u8(o.code()));
                out.put_u32(len32(confirms.len()));
                for c in confirms {
                    out.put_u16(len16(CONFIRM_LEN));
                    c.encode(out);
                }
            }
            VerdictBody::TagsRequested { chunks } => {
                out.put_u8(VERDICT_TAGS_REQUESTED);
                out.put_u16(len16(chunks.len()));
                chunks.iter().for_each(|k| out.put_u32(*k));
            }
        }
    }

    fn read_body(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let gateway_id = GatewayId::read(r, "verdict.gateway_id")?;
        let batch_id = r.u64("verdict.batch_id")?;
        let batch_hash = r.array("verdict.batch_hash")?;
        let body = match r.u8("verdict.status")? {
            VERDICT_FINAL => {
                let count = r.u32("verdict.count")? as usize;
                if count == 0 {
                    return Err(DecodeError::Invalid("verdict.count"));
                }
                r.check_count(count, MAX_BATCH_ENTRIES, 1, "verdict.count")?;
                let outcomes = r
                    .take(count, "verdict.outcomes")?
                    .iter()
                    .map(|&b| Outcome::from_code(b).ok_or(DecodeError::Invalid("verdict.outcomes")))
                    .collect::<Result<Vec<_>, _>>()?;
                let n = r.u32("verdict.confirms")? as usize;
                r.check_count(n, count, 2 + CONFIRM_LEN, "verdict.confirms")?;
                let mut confirms = Vec::with_capacity(n);
                for _ in 0..n {
                    let mut sub = r.vec16_reader(CONFIRM_LEN, "verdict.confirm")?;
                    confirms.push(read_message::<Confirm>(&mut sub)?);
                    sub.expect_end("verdict.confirm")?;
                }
                VerdictBody::Final { outcomes, confirms }
            }
            VERDICT_TAGS_REQUESTED => {
                let n = usize::from(r.u16("verdict.n")?);
                if n == 0 {
                    return Err(DecodeError::Invalid("verdict.n"));
                }
                r.check_count(n, MAX_TAG_REQUEST_CHUNKS, 4, "verdict.n")?;
                let mut chunks = Vec::with_capacity(n);
                for _ in 0..n {
                    let k = r.u32("verdict.chunks")?;
                    if chunks.last().is_some_and(|&prev| prev >= k) {
                        return Err(DecodeError::Invalid("verdict.chunks"));
                    }
                    chunks.push(k);
                }
                VerdictBody::TagsRequested { chunks }
            }
            _ => return Err(DecodeError::Invalid("verdict.status")),
        };
        Ok(Self {
            gateway_id,
            batch_id,
            batch_hash,
            body,
        })
    }

    fn body_len(&self) -> usize {
        let body = match &self.body {
            VerdictBody::Final { outcomes, confirms } => {
                4 + outcomes.len() + 4 + confirms.len() * (2 + CONFIRM_LEN)
            }
            VerdictBody::TagsRequested { chunks } => 2 + 4 * chunks.len(),
        };
        self.gateway_id.encoded_len() + 8 + 32 + 1 + body
    }
}

// ---------------------------------------------------------------------------
// TagReply
// ---------------------------------------------------------------------------

/// The individual tags of one chunk, in batch order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkTags {
    /// Chunk index.
    pub chunk: u32,
    /// The tags of the chunk's entries (at most [`MAX_CHUNK_SIZE`]).
    pub tags: Vec<[u8; 16]>,
}

/// The gateway's answer to a tag request (0x06).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TagReply {
    /// The answering gateway.
    pub gateway_id: GatewayId,
    /// The batch the tags belong to.
    pub batch_id: u64,
    /// SHA-256 of the whole batch message.
    pub batch_hash: [u8; 32],
    /// The chunks answered (at most [`MAX_TAG_REQUEST_CHUNKS`]).
    pub chunks: Vec<ChunkTags>,
}

impl Body for TagReply {
    const TYPE: MessageType = MessageType::TagReply;
    const NAME: &'static str = "tag_reply";

    fn encode_body(&self, out: &mut BytesMut) {
        self.gateway_id.encode(out);
        out.put_u64(self.batch_id);
        out.put_slice(&self.batch_hash);
        out.put_u16(len16(self.chunks.len()));
        for c in &self.chunks {
            out.put_u32(c.chunk);
            out.put_u16(len16(c.tags.len()));
            c.tags.iter().for_each(|t| out.put_slice(t));
        }
    }

    fn read_body(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let gateway_id = GatewayId::read(r, "tag_reply.gateway_id")?;
        let batch_id = r.u64("tag_reply.batch_id")?;
        let batch_hash = r.array("tag_reply.batch_hash")?;
        let n = usize::from(r.u16("tag_reply.n")?);
        r.check_count(n, MAX_TAG_REQUEST_CHUNKS, 4 + 2, "tag_reply.n")?;
        let mut chunks = Vec::with_capacity(n);
        for _ in 0..n {
            let chunk = r.u32("tag_reply.chunk")?;
            let count = usize::from(r.u16("tag_reply.count")?);
            r.check_count(count, MAX_CHUNK_SIZE, TAG_LEN, "tag_reply.count")?;
            let mut tags = Vec::with_capacity(count);
            for _ in 0..count {
                tags.push(r.array("tag_reply.tags")?);
            }
            chunks.push(ChunkTags { chunk, tags });
        }
        Ok(Self {
            gateway_id,
            batch_id,
            batch_hash,
            chunks,
        })
    }

    fn body_len(&self) -> usize {
        let chunks: usize = self.chunks.iter().map(|c| 6 + TAG_LEN * c.tags.len()).sum();
        self.gateway_id.encoded_len() + 8 + 32 + 2 + chunks
    }
}

// ---------------------------------------------------------------------------
// Confirm
// ---------------------------------------------------------------------------

/// V's key confirmation to one accepted member (0x07), carrying `GK_e`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Confirm {
    /// The round's group.
    pub group: GroupId,
    /// The round.
    pub round: u64,
    /// The group epoch whose key `w` carries.
    pub epoch: u64,
    /// The accepted member.
    pub id: MemberId,
    /// The new session.
    pub sid: SessionId,
    /// `AES-128-GCM(k_conf, iv_conf, aad, GK_e)`: ciphertext and tag.
    pub w: [u8; 32],
}

impl Confirm {
    /// This confirm's AAD (see [`confirm_aad`]).
    pub fn aad(&self) -> [u8; CONFIRM_AAD_LEN] {
        confirm_aad(self.group, self.round, self.epoch, self.id, self.sid)
    }
}

impl Body for Confirm {
    const TYPE: MessageType = MessageType::Confirm;
    const NAME: &'static str = "confirm";

    fn encode_body(&self, out: &mut BytesMut) {
        out.put_u32(self.group.0);
        out.put_u64(self.round);
        out.put_u64(self.epoch);
        out.put_u64(self.id.0);
        out.put_slice(&self.sid.0);
        out.put_slice(&self.w);
    }

    fn read_body(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self {
            group: GroupId(r.u32("confirm.group")?),
            round: r.u64("confirm.round")?,
            epoch: r.u64("confirm.epoch")?,
            id: MemberId(r.u64("confirm.id")?),
            sid: SessionId(r.array("confirm.sid")?),
            w: r.array("confirm.w")?,
        })
    }

    fn body_len(&self) -> usize {
        CONFIRM_LEN - 2
    }
}

// ---------------------------------------------------------------------------
// GroupMessage
// ---------------------------------------------------------------------------

/// A signed, encrypted update for every member of a group (0x08).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupMessage {
    /// The group.
    pub group: GroupId,
    /// The epoch whose key `GK_e` encrypts the payload.
    pub epoch: u64,
    /// Strictly increasing per group.
    pub seq: u64,
    /// Members ignore the message once they answered a later round.
    pub valid_through_round: u64,
    /// Random GCM nonce.
    pub nonce: [u8; 12],
    /// Ciphertext and tag: 16..=[`MAX_GROUP_CIPHERTEXT`] bytes.
    pub c: Bytes,
    /// Id of the online key that signed.
    pub key_id: u32,
    /// Ed25519 signature over [`Self::signed_bytes`].
    pub signature: [u8; 64],
}

impl GroupMessage {
    /// What the online key signs: `"dapgw v1 group message"` followed by
    /// every byte of the message before `signature`.
    pub fn signed_bytes(&self) -> BytesMut {
        let mut out = signed_prefix(LABEL_GROUP_MESSAGE, Self::TYPE, self.body_len() - 64);
        self.encode_unsigned(&mut out);
        out
    }

    /// This message's AAD (see [`group_message_aad`]).
    pub fn aad(&self) -> [u8; GROUP_MESSAGE_AAD_LEN] {
        group_message_aad(self.group, self.epoch, self.seq, self.valid_through_round)
    }

    fn encode_unsigned(&self, out: &mut BytesMut) {
        out.put_u32(self.group.0);
        out.put_u64(self.epoch);
        out.put_u64(self.seq);
        out.put_u64(self.valid_through_round);
        out.put_slice(&self.nonce);
        put_vec32(out, &self.c);
        out.put_u32(self.key_id);
    }
}

impl Body for GroupMessage {
    const TYPE: MessageType = MessageType::GroupMessage;
    const NAME: &'static str = "group_message";

    fn encode_body(&self, out: &mut BytesMut) {
        self.encode_unsigned(out);
        out.put_slice(&self.signature);
    }

    fn read_body(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let group = GroupId(r.u32("group_message.group")?);
        let epoch = r.u64("group_message.epoch")?;
        let seq = r.u64("group_message.seq")?;
        let valid_through_round = r.u64("group_message.valid_through_round")?;
        let nonce = r.array("group_message.nonce")?;
        let c = r.vec32(MAX_GROUP_CIPHERTEXT, "group_message.c")?;
        // Shorter than a GCM tag cannot be a ciphertext.
        if c.len() < TAG_LEN {
            return Err(DecodeError::Invalid("group_message.c"));
        }
        Ok(Self {
            group,
            epoch,
            seq,
            valid_through_round,
            nonce,
            c,
            key_id: r.u32("group_message.key_id")?,
            signature: r.array("group_message.signature")?,
        })
    }

    fn body_len(&self) -> usize {
        4 + 8 + 8 + 8 + 12 + 4 + self.c.len() + 4 + 64
    }
}

// ---------------------------------------------------------------------------
// Rekey and KeyUpdate
// ---------------------------------------------------------------------------

/// A new group key for one member, under its session's `k_down` (0x09).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rekey {
    /// The group.
    pub group: GroupId,
    /// The member.
    pub id: MemberId,
    /// The member's current session.
    pub sid: SessionId,
    /// The epoch the new key starts.
    pub new_epoch: u64,
    /// Downlink counter, strictly increasing per session.
    pub down_ctr: u64,
    /// Random GCM nonce.
    pub nonce: [u8; 12],
    /// `GK_new` encrypted, and the tag.
    pub c: [u8; 32],
}

impl Rekey {
    /// This rekey's AAD (see [`rekey_aad`]).
    pub fn aad(&self) -> [u8; REKEY_AAD_LEN] {
        rekey_aad(self.group, self.new_epoch, self.id, self.sid, self.down_ctr)
    }
}

impl Body for Rekey {
    const TYPE: MessageType = MessageType::Rekey;
    const NAME: &'static str = "rekey";

    fn encode_body(&self, out: &mut BytesMut) {
        out.put_u32(self.group.0);
        out.put_u64(self.id.0);
        out.put_slice(&self.sid.0);
        out.put_u64(self.new_epoch);
        out.put_u64(self.down_ctr);
        out.put_slice(&self.nonce);
        out.put_slice(&self.c);
    }

    fn read_body(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self {
            group: GroupId(r.u32("rekey.group")?),
            id: MemberId(r.u64("rekey.id")?),
            sid: SessionId(r.array("rekey.sid")?),
            new_epoch: r.u64("rekey.new_epoch")?,
            down_ctr: r.u64("rekey.down_ctr")?,
            nonce: r.array("rekey.nonce")?,
            c: r.array("rekey.c")?,
        })
    }

    fn body_len(&self) -> usize {
        REKEY_LEN - 2
    }
}

/// A new root key version for one member, under a psk-ecdhe session's
/// `k_down` (0x0A).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyUpdate {
    /// The session's group.
    pub group: GroupId,
    /// The member.
    pub id: MemberId,
    /// The member's current session.
    pub sid: SessionId,
    /// The new key version.
    pub new_kv: u32,
    /// Downlink counter, strictly increasing per session.
    pub down_ctr: u64,
    /// Random GCM nonce.
    pub nonce: [u8; 12],
    /// `K_i(new_kv)` encrypted, and the tag.
    pub c: [u8; 48],
}

impl KeyUpdate {
    /// This key update's AAD (see [`key_update_aad`]).
    pub fn aad(&self) -> [u8; KEY_UPDATE_AAD_LEN] {
        key_update_aad(self.group, self.id, self.sid, self.new_kv, self.down_ctr)
    }
}

impl Body for KeyUpdate {
    const TYPE: MessageType = MessageType::KeyUpdate;
    const NAME: &'static str = "key_update";

    fn encode_body(&self, out: &mut BytesMut) {
        out.put_u32(self.group.0);
        out.put_u64(self.id.0);
        out.put_slice(&self.sid.0);
        out.put_u32(self.new_kv);
        out.put_u64(self.down_ctr);
        out.put_slice(&self.nonce);
        out.put_slice(&self.c);
    }

    fn read_body(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self {
            group: GroupId(r.u32("key_update.group")?),
            id: MemberId(r.u64("key_update.id")?),
            sid: SessionId(r.array("key_update.sid")?),
            new_kv: r.u32("key_update.new_kv")?,
            down_ctr: r.u64("key_update.down_ctr")?,
            nonce: r.array("key_update.nonce")?,
            c: r.array("key_update.c")?,
        })
    }

    fn body_len(&self) -> usize {
        KEY_UPDATE_LEN - 2
    }
}

// ---------------------------------------------------------------------------
// Direct
// ---------------------------------------------------------------------------

/// The message inside a [`Direct`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DirectInner {
    /// A response, tag included.
    Response(Response),
    /// An uplink, tag included.
    Uplink(Uplink),
}

impl DirectInner {
    /// The complete encoding of the inner message.
    pub fn to_bytes(&self) -> Bytes {
        match self {
            Self::Response(m) => m.to_bytes(),
            Self::Uplink(m) => m.to_bytes(),
        }
    }

    /// Decodes a complete Response or Uplink; any other type is `WrongType`.
    pub fn decode(input: &Bytes) -> Result<Self, DecodeError> {
        match Message::decode(input)? {
            Message::Response(m) => Ok(Self::Response(m)),
            Message::Uplink(m) => Ok(Self::Uplink(m)),
            other => Err(DecodeError::WrongType(other.message_type().code())),
        }
    }
}

/// A member's response or uplink sent straight to V (0x0B, flow A): a batch
/// of one whose aggregate the member computes itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Direct {
    /// The complete inner Response or Uplink message, tag included (at most
    /// [`MAX_DIRECT_INNER`] bytes). A decoded `Direct` always holds a valid
    /// one; see [`Direct::inner_message`].
    pub inner: Bytes,
    /// `A` over the single tag.
    pub aggregate: [u8; 16],
}

impl Direct {
    /// Wraps an inner message.
    pub fn new(inner: &DirectInner, aggregate: [u8; 16]) -> Self {
        Self {
            inner: inner.to_bytes(),
            aggregate,
        }
    }

    /// Decodes the inner message (its payload shares `inner`'s memory).
    pub fn inner_message(&self) -> Result<DirectInner, DecodeError> {
        DirectInner::decode(&self.inner)
    }
}

impl Body for Direct {
    const TYPE: MessageType = MessageType::Direct;
    const NAME: &'static str = "direct";

    fn encode_body(&self, out: &mut BytesMut) {
        put_vec16(out, &self.inner);
        out.put_slice(&self.aggregate);
    }

    fn read_body(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let inner = r.vec16(MAX_DIRECT_INNER, "direct.inner")?;
        DirectInner::decode(&inner)?;
        Ok(Self {
            inner,
            aggregate: r.array("direct.aggregate")?,
        })
    }

    fn body_len(&self) -> usize {
        2 + self.inner.len() + 16
    }
}

// ---------------------------------------------------------------------------
// Any message
// ---------------------------------------------------------------------------

/// Any dapgw v1 message, for endpoints that accept several types.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)]
pub enum Message {
    /// 0x01.
    Challenge(Challenge),
    /// 0x02.
    Response(Response),
    /// 0x03.
    Uplink(Uplink),
    /// 0x04.
    Batch(Batch),
    /// 0x05.
    Verdict(Verdict),
    /// 0x06.
    TagReply(TagReply),
    /// 0x07.
    Confirm(Confirm),
    /// 0x08.
    GroupMessage(GroupMessage),
    /// 0x09.
    Rekey(Rekey),
    /// 0x0A.
    KeyUpdate(KeyUpdate),
    /// 0x0B.
    Direct(Direct),
    /// 0x0C.
    KeyCertificate(KeyCertificate),
}

/// Applies `$f` to the message inside any `Message` variant.
macro_rules! each_message {
    ($m:expr, $v:ident => $e:expr) => {
        match $m {
            Message::Challenge($v) => $e,
            Message::Response($v) => $e,
            Message::Uplink($v) => $e,
            Message::Batch($v) => $e,
            Message::Verdict($v) => $e,
            Message::TagReply($v) => $e,
            Message::Confirm($v) => $e,
            Message::GroupMessage($v) => $e,
            Message::Rekey($v) => $e,
            Message::KeyUpdate($v) => $e,
            Message::Direct($v) => $e,
            Message::KeyCertificate($v) => $e,
        }
    };
}

impl Message {
    /// Decodes one complete message of any type, dispatching on the type
    /// byte. Trailing bytes are rejected.
    pub fn decode(input: &Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(input);
        let msg = match read_any_header(&mut r)? {
            MessageType::Challenge => Self::Challenge(Challenge::read_body(&mut r)?),
            MessageType::Response => Self::Response(Response::read_body(&mut r)?),
            MessageType::Uplink => Self::Uplink(Uplink::read_body(&mut r)?),
            MessageType::Batch => Self::Batch(Batch::read_body(&mut r)?),
            MessageType::Verdict => Self::Verdict(Verdict::read_body(&mut r)?),
            MessageType::TagReply => Self::TagReply(TagReply::read_body(&mut r)?),
            MessageType::Confirm => Self::Confirm(Confirm::read_body(&mut r)?),
            MessageType::GroupMessage => Self::GroupMessage(GroupMessage::read_body(&mut r)?),
            MessageType::Rekey => Self::Rekey(Rekey::read_body(&mut r)?),
            MessageType::KeyUpdate => Self::KeyUpdate(KeyUpdate::read_body(&mut r)?),
            MessageType::Direct => Self::Direct(Direct::read_body(&mut r)?),
            MessageType::KeyCertificate => Self::KeyCertificate(KeyCertificate::read_body(&mut r)?),
        };
        r.expect_end(each_message!(&msg, m => body_name(m)))?;
        Ok(msg)
    }

    /// Appends the complete encoding to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        each_message!(self, m => m.encode(out))
    }

    /// The complete encoding in a buffer of exactly the right size.
    pub fn to_bytes(&self) -> Bytes {
        each_message!(self, m => m.to_bytes())
    }

    /// Length in bytes of the complete encoding.
    pub fn encoded_len(&self) -> usize {
        each_message!(self, m => m.encoded_len())
    }

    /// The type byte.
    pub fn message_type(&self) -> MessageType {
        each_message!(self, m => body_type(m))
    }
}

fn body_name<T: Body>(_: &T) -> &'static str {
    T::NAME
}

fn body_type<T: Body>(_: &T) -> MessageType {
    T::TYPE
}

// ---------------------------------------------------------------------------
// AADs and the ack payload
// ---------------------------------------------------------------------------

/// Length of [`uplink_aad`].
pub const UPLINK_AAD_LEN: usize = LABEL_UP.len() + 1 + 4 + 8 + 8 + 8;
/// Length of [`confirm_aad`].
pub const CONFIRM_AAD_LEN: usize = LABEL_CONFIRM.len() + 4 + 8 + 8 + 8 + 8;
/// Length of [`rekey_aad`].
pub const REKEY_AAD_LEN: usize = LABEL_REKEY.len() + 4 + 8 + 8 + 8 + 8;
/// Length of [`key_update_aad`].
pub const KEY_UPDATE_AAD_LEN: usize = LABEL_KEY_UPDATE.len() + 4 + 8 + 8 + 4 + 8;
/// Length of [`group_message_aad`].
pub const GROUP_MESSAGE_AAD_LEN: usize = LABEL_GROUP_MESSAGE.len() + 4 + 8 + 8 + 8;

/// `"dapgw v1 up" || kind || group || id || sid || ctr`.
pub fn uplink_aad(
    kind: UplinkKind,
    group: GroupId,
    id: MemberId,
    sid: SessionId,
    ctr: u64,
) -> [u8; UPLINK_AAD_LEN] {
    FixedWriter::new()
        .put(LABEL_UP)
        .put(&[kind.code()])
        .put(&group.0.to_be_bytes())
        .put(&id.0.to_be_bytes())
        .put(&sid.0)
        .put(&ctr.to_be_bytes())
        .finish()
}

/// `"dapgw v1 confirm" || group || round || epoch || id || sid`.
pub fn confirm_aad(
    group: GroupId,
    round: u64,
    epoch: u64,
    id: MemberId,
    sid: SessionId,
) -> [u8; CONFIRM_AAD_LEN] {
    FixedWriter::new()
        .put(LABEL_CONFIRM)
        .put(&group.0.to_be_bytes())
        .put(&round.to_be_bytes())
        .put(&epoch.to_be_bytes())
        .put(&id.0.to_be_bytes())
        .put(&sid.0)
        .finish()
}

/// `"dapgw v1 rekey" || group || new_epoch || id || sid || down_ctr`.
pub fn rekey_aad(
    group: GroupId,
    new_epoch: u64,
    id: MemberId,
    sid: SessionId,
    down_ctr: u64,
) -> [u8; REKEY_AAD_LEN] {
    FixedWriter::new()
        .put(LABEL_REKEY)
        .put(&group.0.to_be_bytes())
        .put(&new_epoch.to_be_bytes())
        .put(&id.0.to_be_bytes())
        .put(&sid.0)
        .put(&down_ctr.to_be_bytes())
        .finish()
}

/// `"dapgw v1 key update" || group || id || sid || new_kv || down_ctr`.
pub fn key_update_aad(
    group: GroupId,
    id: MemberId,
    sid: SessionId,
    new_kv: u32,
    down_ctr: u64,
) -> [u8; KEY_UPDATE_AAD_LEN] {
    FixedWriter::new()
        .put(LABEL_KEY_UPDATE)
        .put(&group.0.to_be_bytes())
        .put(&id.0.to_be_bytes())
        .put(&sid.0)
        .put(&new_kv.to_be_bytes())
        .put(&down_ctr.to_be_bytes())
        .finish()
}

/// `"dapgw v1 group message" || group || epoch || seq || valid_through_round`.
pub fn group_message_aad(
    group: GroupId,
    epoch: u64,
    seq: u64,
    valid_through_round: u64,
) -> [u8; GROUP_MESSAGE_AAD_LEN] {
    FixedWriter::new()
        .put(LABEL_GROUP_MESSAGE)
        .put(&group.0.to_be_bytes())
        .put(&epoch.to_be_bytes())
        .put(&seq.to_be_bytes())
        .put(&valid_through_round.to_be_bytes())
        .finish()
}

/// The plaintext of an uplink of kind ack: which group message the member
/// applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AckPayload {
    /// The group message's group.
    pub group: GroupId,
    /// Its epoch.
    pub epoch: u64,
    /// Its seq.
    pub seq: u64,
    /// SHA-256 of the complete group message bytes.
    pub message_hash: [u8; 32],
}

impl AckPayload {
    /// The 52-byte encoding.
    pub fn to_array(&self) -> [u8; ACK_PAYLOAD_LEN] {
        FixedWriter::new()
            .put(&self.group.0.to_be_bytes())
            .put(&self.epoch.to_be_bytes())
            .put(&self.seq.to_be_bytes())
            .put(&self.message_hash)
            .finish()
    }

    /// Decodes exactly 52 bytes (a decrypted ack payload).
    pub fn decode(plaintext: &[u8]) -> Result<Self, DecodeError> {
        let b: &[u8; ACK_PAYLOAD_LEN] = match plaintext.try_into() {
            Ok(b) => b,
            Err(_) if plaintext.len() < ACK_PAYLOAD_LEN => {
                return Err(DecodeError::Truncated("ack"));
            }
            Err(_) => return Err(DecodeError::TrailingBytes("ack")),
        };
        // Fixed offsets inside a 52-byte array: no read can go out of bounds.
        fn at<const N: usize>(b: &[u8; ACK_PAYLOAD_LEN], start: usize) -> [u8; N] {
            let mut out = [0u8; N];
            out.copy_from_slice(&b[start..start + N]);
            out
        }
        Ok(Self {
            group: GroupId(u32::from_be_bytes(at(b, 0))),
            epoch: u64::from_be_bytes(at(b, 4)),
            seq: u64::from_be_bytes(at(b, 12)),
            message_hash: at(b, 20),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gw() -> GatewayId {
        GatewayId::new("gw-1.sub_a").unwrap()
    }

    fn cert() -> KeyCertificate {
        KeyCertificate {
            key_id: 7,
            key_version: 3,
            public_key: [0x11; 32],
            root_sig: [0x22; 64],
        }
    }

    fn challenge(ecdhe: bool) -> Challenge {
        Challenge {
            group: GroupId(9),
            round: 100,
            epoch: 4,
            nonce_v: [1; 16],
            e_v: ecdhe.then_some([2; 32]),
            purpose: if ecdhe {
                Purpose::Read(Bytes::from_static(b"obis 1.8.0"))
            } else {
                Purpose::Auth
            },
            group_seq: 12,
            config_hash: [3; 32],
            not_after: ecdhe.then_some(1_700_000_000),
            key_cert: ecdhe.then(cert),
            key_id: 7,
            signature: [4; 64],
        }
    }

    fn response(id: u64, ecdhe: bool) -> Response {
        Response {
            id: MemberId(id),
            kv: 1,
            group: GroupId(9),
            round: 100,
            n_i: [5; 16],
            e_i: ecdhe.then_some([6; 32]),
            c: Bytes::from_static(b"reading"),
            tag: [7; 16],
        }
    }

    fn uplink(ctr: u64) -> Uplink {
        Uplink {
            group: GroupId(9),
            id: MemberId(42),
            sid: SessionId([8; 8]),
            kind: UplinkKind::Alarm,
            ctr,
            c: Bytes::from_static(b"fire"),
            tag: [9; 16],
        }
    }

    fn response_batch(n: u64, c: u16, mode: Mode) -> Batch {
        let entries: Vec<_> = (1..=n)
            .map(|i| response(i, mode == Mode::PskEcdhe).entry())
            .collect();
        let aggregates = vec![[0xaa; 16]; chunk_count(entries.len(), c)];
        Batch {
            gateway_id: gw(),
            batch_id: 5,
            group: GroupId(9),
            chunk_size: c,
            body: BatchBody::Responses {
                round: 100,
                mode,
                entries,
            },
            aggregates,
        }
    }

    fn uplink_batch() -> Batch {
        Batch {
            gateway_id: gw(),
            batch_id: 6,
            group: GroupId(9),
            chunk_size: 2,
            body: BatchBody::Uplinks {
                entries: (1..=3).map(|ctr| uplink(ctr).entry()).collect(),
            },
            aggregates: vec![[1; 16], [2; 16]],
        }
    }

    fn confirm() -> Confirm {
        Confirm {
            group: GroupId(9),
            round: 100,
            epoch: 4,
            id: MemberId(42),
            sid: SessionId([8; 8]),
            w: [0xcc; 32],
        }
    }

    fn group_message() -> GroupMessage {
        GroupMessage {
            group: GroupId(9),
            epoch: 4,
            seq: 13,
            valid_through_round: 120,
            nonce: [1; 12],
            c: Bytes::from(vec![0x5a; 40]),
            key_id: 7,
            signature: [4; 64],
        }
    }

    fn samples() -> Vec<Message> {
        vec![
            Message::KeyCertificate(cert()),
            Message::Challenge(challenge(false)),
            Message::Challenge(challenge(true)),
            Message::Response(response(42, false)),
            Message::Response(response(42, true)),
            Message::Uplink(uplink(1)),
            Message::Batch(response_batch(5, 2, Mode::Psk)),
            Message::Batch(response_batch(3, 3, Mode::PskEcdhe)),
            Message::Batch(uplink_batch()),
            Message::Verdict(Verdict {
                gateway_id: gw(),
                batch_id: 5,
                batch_hash: [1; 32],
                body: VerdictBody::Final {
                    outcomes: vec![
                        Outcome::Accepted,
                        Outcome::MalformedPayload,
                        Outcome::Revoked,
                    ],
                    confirms: vec![confirm(), confirm()],
                },
            }),
            Message::Verdict(Verdict {
                gateway_id: gw(),
                batch_id: 5,
                batch_hash: [1; 32],
                body: VerdictBody::TagsRequested {
                    chunks: vec![0, 3, 9],
                },
            }),
            Message::TagReply(TagReply {
                gateway_id: gw(),
                batch_id: 5,
                batch_hash: [1; 32],
                chunks: vec![
                    ChunkTags {
                        chunk: 0,
                        tags: vec![[1; 16], [2; 16]],
                    },
                    ChunkTags {
                        chunk: 3,
                        tags: vec![],
                    },
                ],
            }),
            Message::Confirm(confirm()),
            Message::GroupMessage(group_message()),
            Message::Rekey(Rekey {
                group: GroupId(9),
                id: MemberId(42),
                sid: SessionId([8; 8]),
                new_epoch: 5,
                down_ctr: 2,
                nonce: [3; 12],
                c: [4; 32],
            }),
            Message::KeyUpdate(KeyUpdate {
                group: GroupId(9),
                id: MemberId(42),
                sid: SessionId([8; 8]),
                new_kv: 2,
                down_ctr: 3,
                nonce: [3; 12],
                c: [4; 48],
            }),
            Message::Direct(Direct::new(
                &DirectInner::Response(response(42, true)),
                [0xdd; 16],
            )),
            Message::Direct(Direct::new(&DirectInner::Uplink(uplink(3)), [0xdd; 16])),
        ]
    }

    /// Decodes `b`, expecting an error.
    fn err(b: &[u8]) -> DecodeError {
        Message::decode(&Bytes::copy_from_slice(b)).unwrap_err()
    }

    fn patched(msg: &Message, at: usize, bytes: &[u8]) -> Vec<u8> {
        let mut v = msg.to_bytes().to_vec();
        v[at..at + bytes.len()].copy_from_slice(bytes);
        v
    }

    #[test]
    fn every_sample_round_trips_byte_for_byte() {
        for msg in samples() {
            let bytes = msg.to_bytes();
            assert_eq!(bytes.len(), msg.encoded_len(), "{msg:?}");
            assert_eq!(bytes[0], VERSION);
            assert_eq!(bytes[1], msg.message_type().code());
            let back = Message::decode(&bytes).unwrap();
            assert_eq!(back, msg);
            assert_eq!(back.to_bytes(), bytes);
            let mut out = BytesMut::new();
            msg.encode(&mut out);
            assert_eq!(out.freeze(), bytes);
        }
    }

    #[test]
    fn typed_decode_matches_message_decode() {
        let r = response(42, true);
        assert_eq!(Response::decode(&r.to_bytes()).unwrap(), r);
        let u = uplink(9);
        assert_eq!(Uplink::decode(&u.to_bytes()).unwrap(), u);
        let b = response_batch(4, 3, Mode::Psk);
        assert_eq!(Batch::decode(&b.to_bytes()).unwrap(), b);
        assert_eq!(
            Challenge::decode(&challenge(true).to_bytes()).unwrap(),
            challenge(true)
        );
    }

    #[test]
    fn fixed_lengths_match_the_doc() {
        assert_eq!(cert().to_bytes().len(), KEY_CERTIFICATE_LEN);
        assert_eq!(KEY_CERTIFICATE_LEN, 106);
        assert_eq!(confirm().to_bytes().len(), CONFIRM_LEN);
        for m in samples() {
            match m {
                Message::Rekey(m) => assert_eq!(m.to_bytes().len(), REKEY_LEN),
                Message::KeyUpdate(m) => assert_eq!(m.to_bytes().len(), KEY_UPDATE_LEN),
                _ => {}
            }
        }
        // The largest possible Response is exactly the Direct inner cap.
        let mut r = response(1, true);
        r.c = Bytes::from(vec![0; MAX_PAYLOAD]);
        assert_eq!(r.to_bytes().len(), MAX_DIRECT_INNER);
        assert_eq!(MAX_DIRECT_INNER, 1117);
    }

    #[test]
    fn response_layout_is_byte_exact() {
        let r = Response {
            id: MemberId(0x0102030405060708),
            kv: 0x0a0b0c0d,
            group: GroupId(0x11121314),
            round: 0x2122232425262728,
            n_i: [0x33; 16],
            e_i: None,
            c: Bytes::from_static(&[0xee, 0xef]),
            tag: [0x44; 16],
        };
        let mut want = vec![
            1, 2, 1, 2, 3, 4, 5, 6, 7, 8, 0x0a, 0x0b, 0x0c, 0x0d, 0x11, 0x12, 0x13, 0x14,
        ];
        want.extend([0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28, 1]);
        want.extend([0x33; 16]);
        want.extend([0, 2, 0xee, 0xef]);
        want.extend([0x44; 16]);
        assert_eq!(&r.to_bytes()[..], &want[..]);
    }

    #[test]
    fn uplink_layout_is_byte_exact() {
        let u = uplink(0x0102);
        let mut want = vec![1, 3, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 42];
        want.extend([8; 8]);
        want.extend([2, 0, 0, 0, 0, 0, 0, 1, 2, 0, 4]);
        want.extend(b"fire");
        want.extend([9; 16]);
        assert_eq!(&u.to_bytes()[..], &want[..]);
    }

    #[test]
    fn signed_bytes_are_label_then_everything_before_the_signature() {
        let c = cert();
        let bytes = c.to_bytes();
        assert_eq!(
            &c.signed_bytes()[..],
            &[LABEL_KEY_CERTIFICATE, &bytes[..42]].concat()[..]
        );

        for ch in [challenge(false), challenge(true)] {
            let bytes = ch.to_bytes();
            let want = [LABEL_CHALLENGE, &bytes[..bytes.len() - 64]].concat();
            assert_eq!(&ch.signed_bytes()[..], &want[..]);
        }
        let g = group_message();
        let bytes = g.to_bytes();
        let want = [LABEL_GROUP_MESSAGE, &bytes[..bytes.len() - 64]].concat();
        assert_eq!(&g.signed_bytes()[..], &want[..]);
    }

    #[test]
    fn payloads_are_slices_of_the_input() {
        let b = response_batch(50, 7, Mode::PskEcdhe).to_bytes();
        let range = b.as_ptr_range();
        let Ok(Message::Batch(batch)) = Message::decode(&b) else {
            panic!()
        };
        let BatchBody::Responses { entries, .. } = &batch.body else {
            panic!()
        };
        for e in entries {
            assert!(range.contains(&e.c.as_ptr()));
        }
        let d = Direct::new(&DirectInner::Uplink(uplink(1)), [0; 16]).to_bytes();
        let direct = Direct::decode(&d).unwrap();
        assert!(d.as_ptr_range().contains(&direct.inner.as_ptr()));
        let DirectInner::Uplink(inner) = direct.inner_message().unwrap() else {
            panic!()
        };
        assert!(d.as_ptr_range().contains(&inner.c.as_ptr()));
    }

    #[test]
    fn every_strict_prefix_is_truncated() {
        for msg in samples() {
            let bytes = msg.to_bytes();
            for n in 0..bytes.len() {
                let e = Message::decode(&bytes.slice(..n)).unwrap_err();
                assert!(
                    matches!(e, DecodeError::Truncated(_)),
                    "{msg:?} cut at {n}: {e:?}"
                );
            }
        }
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        for msg in samples() {
            let mut v = msg.to_bytes().to_vec();
            v.push(0);
            assert!(matches!(err(&v), DecodeError::TrailingBytes(_)), "{msg:?}");
        }
        // Inside a length-prefixed confirm too: a 71-byte confirm is over its cap.
        let ok = Message::Verdict(Verdict {
            gateway_id: gw(),
            batch_id: 1,
            batch_hash: [0; 32],
            body: VerdictBody::Final {
                outcomes: vec![Outcome::Accepted],
                confirms: vec![confirm()],
            },
        });
        let bytes = ok.to_bytes();
        let at = 2 + 11 + 8 + 32 + 1 + 4 + 1 + 4;
        assert_eq!(
            err(&patched(&ok, at, &[0, 71])),
            DecodeError::TooLong("verdict.confirm")
        );
        assert_eq!(bytes.len(), at + 2 + CONFIRM_LEN);
        // Direct: an inner Response followed by one stray byte.
        let inner = [response(1, false).to_bytes().to_vec(), vec![0]].concat();
        let mut d = vec![1, 0x0b, 0, inner.len() as u8];
        d.extend(&inner);
        d.extend([0; 16]);
        assert_eq!(err(&d), DecodeError::TrailingBytes("response"));
        assert_eq!(
            ack_err(&[0; ACK_PAYLOAD_LEN + 1]),
            DecodeError::TrailingBytes("ack")
        );
    }

    fn ack_err(b: &[u8]) -> DecodeError {
        AckPayload::decode(b).unwrap_err()
    }

    #[test]
    fn header_errors() {
        assert_eq!(err(&[]), DecodeError::Truncated("header.version"));
        assert_eq!(err(&[1]), DecodeError::Truncated("header.type"));
        assert_eq!(err(&[2, 2]), DecodeError::UnsupportedVersion(2));
        assert_eq!(err(&[0, 2]), DecodeError::UnsupportedVersion(0));
        assert_eq!(err(&[1, 0]), DecodeError::UnknownType(0));
        assert_eq!(err(&[1, 0x0d]), DecodeError::UnknownType(0x0d));
        let u = uplink(1).to_bytes();
        assert_eq!(Response::decode(&u), Err(DecodeError::WrongType(0x03)));
        // A challenge whose embedded certificate has the wrong type byte.
        let ch = challenge(true);
        let b = ch.to_bytes();
        let cert_at = b.len() - 64 - 4 - KEY_CERTIFICATE_LEN;
        let mut v = b.to_vec();
        v[cert_at + 1] = 0x07;
        assert_eq!(err(&v), DecodeError::WrongType(0x07));
        // A Direct may carry only a Response or an Uplink.
        let inner = confirm().to_bytes();
        let mut d = vec![1, 0x0b, 0, inner.len() as u8];
        d.extend(&inner);
        d.extend([0; 16]);
        assert_eq!(err(&d), DecodeError::WrongType(0x07));
    }

    #[test]
    fn enum_codes_out_of_range_are_invalid() {
        let r = Message::Response(response(1, false));
        assert_eq!(
            err(&patched(&r, 26, &[3])),
            DecodeError::Invalid("response.mode")
        );
        assert_eq!(
            err(&patched(&r, 26, &[0])),
            DecodeError::Invalid("response.mode")
        );
        let u = Message::Uplink(uplink(1));
        assert_eq!(
            err(&patched(&u, 22, &[0])),
            DecodeError::Invalid("uplink.kind")
        );
        assert_eq!(
            err(&patched(&u, 22, &[4])),
            DecodeError::Invalid("uplink.kind")
        );
        let ch = Message::Challenge(challenge(false));
        // header 2 | group 4 | round 8 | epoch 8 | nonce 16 => mode at 38, purpose at 39.
        assert_eq!(
            err(&patched(&ch, 38, &[9])),
            DecodeError::Invalid("challenge.mode")
        );
        assert_eq!(
            err(&patched(&ch, 39, &[0])),
            DecodeError::Invalid("challenge.purpose")
        );
        // purpose auth: group_seq 8, config_hash 32 => not_after flag at 80, key_cert flag at 81.
        assert_eq!(
            err(&patched(&ch, 80, &[2])),
            DecodeError::Invalid("challenge.not_after")
        );
        assert_eq!(
            err(&patched(&ch, 81, &[0xff])),
            DecodeError::Invalid("challenge.key_cert")
        );
        let b = Message::Batch(uplink_batch());
        // gateway id is 1 + 10 bytes: batch_id at 13, kind at 21.
        assert_eq!(
            err(&patched(&b, 21, &[3])),
            DecodeError::Invalid("batch.kind")
        );
        let rb = Message::Batch(response_batch(2, 1, Mode::Psk));
        assert_eq!(
            err(&patched(&rb, 34, &[0])),
            DecodeError::Invalid("batch.mode")
        );
    }

    #[test]
    fn batch_field_errors() {
        let b = Message::Batch(uplink_batch());
        // kind 21 | group 22..26 | chunk_size 26..28 | count 28..32 | entries.
        assert_eq!(
            err(&patched(&b, 26, &[0, 0])),
            DecodeError::Invalid("batch.chunk_size")
        );
        assert_eq!(
            err(&patched(&b, 26, &[4, 1])),
            DecodeError::TooLong("batch.chunk_size")
        );
        assert_eq!(
            err(&patched(&b, 28, &[0, 0, 0, 0])),
            DecodeError::Invalid("batch.count")
        );
        assert_eq!(
            err(&patched(&b, 28, &[0, 0, 0x40, 1])),
            DecodeError::TooLong("batch.count")
        );
        // Under the cap but more entries than the input could hold.
        assert_eq!(
            err(&patched(&b, 28, &[0, 0, 0x40, 0])),
            DecodeError::Truncated("batch.count")
        );
        // One entry too many: the fourth is read from the first aggregate's
        // bytes, and the aggregates then run off the end.
        assert_eq!(
            err(&patched(&b, 28, &[0, 0, 0, 4])),
            DecodeError::Truncated("batch.aggregates")
        );
        // Gateway ids: empty, over 64, bad character.
        assert_eq!(
            err(&patched(&b, 2, &[0])),
            DecodeError::Invalid("batch.gateway_id")
        );
        assert_eq!(
            err(&patched(&b, 2, &[65])),
            DecodeError::TooLong("batch.gateway_id")
        );
        assert_eq!(
            err(&patched(&b, 3, b"G")),
            DecodeError::Invalid("batch.gateway_id")
        );
    }

    #[test]
    fn payload_caps_are_enforced() {
        let mut r = response(1, false);
        r.c = Bytes::from(vec![0; MAX_PAYLOAD]);
        Response::decode(&r.to_bytes()).unwrap();
        r.c = Bytes::from(vec![0; MAX_PAYLOAD + 1]);
        assert_eq!(
            Response::decode(&r.to_bytes()),
            Err(DecodeError::TooLong("response.c"))
        );

        let mut u = uplink(1);
        u.c = Bytes::from(vec![0; MAX_PAYLOAD + 1]);
        assert_eq!(
            Uplink::decode(&u.to_bytes()),
            Err(DecodeError::TooLong("uplink.c"))
        );

        let mut ch = challenge(false);
        ch.purpose = Purpose::Read(Bytes::from(vec![0; MAX_READ_REQUEST]));
        Challenge::decode(&ch.to_bytes()).unwrap();
        ch.purpose = Purpose::Read(Bytes::from(vec![0; MAX_READ_REQUEST + 1]));
        assert_eq!(
            Challenge::decode(&ch.to_bytes()),
            Err(DecodeError::TooLong("challenge.read_req"))
        );

        let mut g = group_message();
        g.c = Bytes::from(vec![0; MAX_GROUP_CIPHERTEXT]);
        GroupMessage::decode(&g.to_bytes()).unwrap();
        g.c = Bytes::from(vec![0; MAX_GROUP_CIPHERTEXT + 1]);
        assert_eq!(
            GroupMessage::decode(&g.to_bytes()),
            Err(DecodeError::TooLong("group_message.c"))
        );
        g.c = Bytes::from(vec![0; TAG_LEN - 1]);
        assert_eq!(
            GroupMessage::decode(&g.to_bytes()),
            Err(DecodeError::Invalid("group_message.c"))
        );

        let mut b = response_batch(1, 1, Mode::Psk);
        if let BatchBody::Responses { entries, .. } = &mut b.body {
            entries[0].c = Bytes::from(vec![0; MAX_PAYLOAD + 1]);
        }
        assert_eq!(
            Batch::decode(&b.to_bytes()),
            Err(DecodeError::TooLong("batch.entry.c"))
        );

        // An inner message over the Direct cap is refused before it is parsed.
        let d = Direct {
            inner: Bytes::from(vec![0; MAX_DIRECT_INNER + 1]),
            aggregate: [0; 16],
        };
        assert_eq!(
            Direct::decode(&d.to_bytes()),
            Err(DecodeError::TooLong("direct.inner"))
        );
    }

    /// The compact entry layout byte for byte (docs/protocol.md, "Batch").
    #[test]
    fn batch_entries_are_compact_deltas_and_varints() {
        let b = response_batch(2, 64, Mode::Psk);
        let bytes = b.to_bytes();
        // Header 2 | gateway id 11 | batch id 8 | kind 1 | group 4 | round 8
        // | mode 1 | chunk size 2 | count 4 = 41.
        let entries = &bytes[41..bytes.len() - 16];
        let mut want = vec![2, (7 << 1) | 1, 1]; // id 1 = 0 + 1; len 7, kv 1 follows
        want.extend([5; 16]);
        want.extend(b"reading");
        want.extend([2, 7 << 1]); // id 2 = 1 + 1; len 7, kv as before
        want.extend([5; 16]);
        want.extend(b"reading");
        assert_eq!(entries, &want[..]);

        let u = uplink_batch().to_bytes();
        // Header 2 | gateway id 11 | batch id 8 | kind 1 | group 4 | chunk
        // size 2 | count 4 = 32.
        let entries = &u[32..u.len() - 32];
        let mut want = Vec::new();
        for (delta, ctr) in [(84u8, 1u8), (0, 2), (0, 3)] {
            want.push(delta); // zigzag(42 - 0) = 84, then zigzag(0)
            want.extend([8; 8]);
            want.push(ctr);
            want.push((4 << 2) | UplinkKind::Alarm.code()); // len 4, kind 2
            want.extend(b"fire");
        }
        assert_eq!(entries, &want[..]);
    }

    #[test]
    fn unsorted_duplicate_and_extreme_ids_decode_for_the_verifier_to_judge() {
        let mut b = response_batch(3, 2, Mode::PskEcdhe);
        let BatchBody::Responses { entries, .. } = &mut b.body else {
            panic!()
        };
        entries[0].id = MemberId(u64::MAX);
        entries[1].id = MemberId(0);
        entries[2].id = MemberId(0);
        entries[1].kv = u32::MAX;
        let back = Batch::decode(&b.to_bytes()).unwrap();
        assert_eq!(back, b);
        assert_eq!(back.to_bytes(), b.to_bytes());
        assert_eq!(
            back.check_structure(),
            Err(BatchStructureError::NotSorted(1))
        );

        let mut u = uplink_batch();
        let BatchBody::Uplinks { entries } = &mut u.body else {
            panic!()
        };
        entries[1].ctr = u64::MAX;
        entries[2].id = MemberId(1u64 << 63);
        entries.swap(0, 1);
        let back = Batch::decode(&u.to_bytes()).unwrap();
        assert_eq!(back, u);
        assert_eq!(
            back.check_structure(),
            Err(BatchStructureError::NotSorted(1))
        );
    }

    #[test]
    fn compact_entry_fields_are_strict() {
        let b = Message::Batch(response_batch(2, 64, Mode::Psk));
        // First entry at 41: id 02 | len_kv 0f | kv 01 | n_i [16] | c [7].
        // A non-minimal id delta (02 as 82 00) shifts everything: refuse it.
        let mut v = b.to_bytes().to_vec();
        v.splice(41..42, [0x82, 0x00]);
        assert_eq!(err(&v), DecodeError::Invalid("batch.entry.id"));
        // kv flagged although equal to the previous entry's kv (second entry
        // at 41 + 26: id 02 | len_kv 0e): a second encoding of kv 1.
        let mut v = b.to_bytes().to_vec();
        v.splice(68..69, [0x0f, 0x01]);
        assert_eq!(err(&v), DecodeError::Invalid("batch.entry.kv"));
        // kv over u32::MAX.
        let mut v = b.to_bytes().to_vec();
        v.splice(43..44, [0x80, 0x80, 0x80, 0x80, 0x10]);
        assert_eq!(err(&v), DecodeError::Invalid("batch.entry.kv"));
        // A payload length over the cap, before the bytes are looked at.
        let mut v = b.to_bytes().to_vec();
        v.splice(42..43, [0x83, 0x10]); // (1025 << 1) | 1
        assert_eq!(err(&v), DecodeError::TooLong("batch.entry.c"));
        // A length within the cap but longer than the input.
        let mut v = b.to_bytes().to_vec();
        v.splice(42..43, [0x81, 0x10]); // (1024 << 1) | 1
        assert_eq!(err(&v), DecodeError::Truncated("batch.entry.c"));

        let u = Message::Batch(uplink_batch());
        // First uplink entry at 32: id | sid [8] | ctr | len_kind | c.
        assert_eq!(
            err(&patched(&u, 42, &[4 << 2])),
            DecodeError::Invalid("batch.entry.kind")
        );
        let mut v = u.to_bytes().to_vec();
        v.splice(41..42, [0x81, 0x00]);
        assert_eq!(err(&v), DecodeError::Invalid("batch.entry.ctr"));
        let mut v = u.to_bytes().to_vec();
        v.splice(42..43, [0x86, 0x40]); // (1025 << 2) | 2
        assert_eq!(err(&v), DecodeError::TooLong("batch.entry.c"));
    }

    #[test]
    fn batch_at_the_entry_cap_decodes_and_one_more_does_not() {
        let mut b = uplink_batch();
        b.chunk_size = 1024;
        let BatchBody::Uplinks { entries } = &mut b.body else {
            panic!()
        };
        let e = entries[0].clone();
        *entries = (0..MAX_BATCH_ENTRIES as u64)
            .map(|ctr| UplinkEntry { ctr, ..e.clone() })
            .collect();
        b.aggregates = vec![[0; 16]; b.chunk_count()];
        let decoded = Batch::decode(&b.to_bytes()).unwrap();
        assert_eq!(decoded.len(), MAX_BATCH_ENTRIES);
        decoded.check_structure().unwrap();

        let BatchBody::Uplinks { entries } = &mut b.body else {
            panic!()
        };
        entries.push(UplinkEntry { ctr: u64::MAX, ..e });
        b.aggregates = vec![[0; 16]; b.chunk_count()];
        assert_eq!(
            Batch::decode(&b.to_bytes()),
            Err(DecodeError::TooLong("batch.count"))
        );
        assert_eq!(
            b.check_structure(),
            Err(BatchStructureError::TooManyEntries(MAX_BATCH_ENTRIES + 1))
        );
    }

    #[test]
    fn verdict_errors() {
        let tags = Message::Verdict(Verdict {
            gateway_id: GatewayId::new("g").unwrap(),
            batch_id: 1,
            batch_hash: [0; 32],
            body: VerdictBody::TagsRequested { chunks: vec![1, 2] },
        });
        // gateway 2 | batch_id 8 | hash 32 => status at 44, n at 45, chunks at 47.
        assert_eq!(
            err(&patched(&tags, 44, &[3])),
            DecodeError::Invalid("verdict.status")
        );
        assert_eq!(
            err(&patched(&tags, 45, &[0, 0])),
            DecodeError::Invalid("verdict.n")
        );
        assert_eq!(
            err(&patched(&tags, 45, &[4, 1])),
            DecodeError::TooLong("verdict.n")
        );
        assert_eq!(
            err(&patched(&tags, 47, &[0, 0, 0, 2])),
            DecodeError::Invalid("verdict.chunks")
        );
        assert_eq!(
            err(&patched(&tags, 47, &[0, 0, 0, 3])),
            DecodeError::Invalid("verdict.chunks")
        );

        let fin = Message::Verdict(Verdict {
            gateway_id: GatewayId::new("g").unwrap(),
            batch_id: 1,
            batch_hash: [0; 32],
            body: VerdictBody::Final {
                outcomes: vec![Outcome::Accepted, Outcome::UnknownSession],
                confirms: vec![confirm()],
            },
        });
        // count at 45..49, outcomes at 49..51, confirm count at 51..55.
        assert_eq!(
            err(&patched(&fin, 45, &[0, 0, 0, 0])),
            DecodeError::Invalid("verdict.count")
        );
        assert_eq!(
            err(&patched(&fin, 45, &[0, 0, 0x40, 1])),
            DecodeError::TooLong("verdict.count")
        );
        assert_eq!(
            err(&patched(&fin, 50, &[11])),
            DecodeError::Invalid("verdict.outcomes")
        );
        // More confirms than entries.
        assert_eq!(
            err(&patched(&fin, 51, &[0, 0, 0, 3])),
            DecodeError::TooLong("verdict.confirms")
        );
        assert_eq!(
            err(&patched(&fin, 51, &[0, 0, 0, 2])),
            DecodeError::Truncated("verdict.confirms")
        );
        // A confirm shorter than 70 bytes inside its length prefix.
        assert_eq!(
            err(&patched(&fin, 55, &[0, 69])),
            DecodeError::Truncated("confirm.w")
        );
    }

    #[test]
    fn tag_reply_caps() {
        let t = Message::TagReply(TagReply {
            gateway_id: GatewayId::new("g").unwrap(),
            batch_id: 1,
            batch_hash: [0; 32],
            chunks: vec![ChunkTags {
                chunk: 0,
                tags: vec![[1; 16]],
            }],
        });
        // n at 44..46, chunk at 46..50, count at 50..52.
        assert_eq!(
            err(&patched(&t, 44, &[4, 1])),
            DecodeError::TooLong("tag_reply.n")
        );
        assert_eq!(
            err(&patched(&t, 50, &[4, 1])),
            DecodeError::TooLong("tag_reply.count")
        );
        assert_eq!(
            err(&patched(&t, 50, &[0, 2])),
            DecodeError::Truncated("tag_reply.count")
        );
    }

    #[test]
    fn chunks_cover_the_batch_in_order() {
        let b = response_batch(5, 2, Mode::Psk);
        assert_eq!(b.chunk_count(), 3);
        assert_eq!(b.chunks().collect::<Vec<_>>(), vec![0..2, 2..4, 4..5]);
        assert_eq!(b.chunks().len(), 3);
        assert_eq!(b.chunk_range(2), Some(4..5));
        assert_eq!(b.chunk_range(3), None);
        let b = response_batch(4, 4, Mode::Psk);
        assert_eq!(b.chunks().collect::<Vec<_>>(), vec![0..4]);
        let mut zero = b.clone();
        zero.chunk_size = 0;
        assert_eq!(zero.chunk_count(), 0);
        assert_eq!(zero.chunks().count(), 0);
    }

    #[test]
    fn structure_checks_report_the_first_fault() {
        let ok = response_batch(4, 2, Mode::PskEcdhe);
        ok.check_structure().unwrap();
        uplink_batch().check_structure().unwrap();

        // Unsorted and duplicate entries decode fine and are reported here.
        let mut b = ok.clone();
        if let BatchBody::Responses { entries, .. } = &mut b.body {
            entries.swap(2, 3);
        }
        let decoded = Batch::decode(&b.to_bytes()).unwrap();
        assert_eq!(
            decoded.check_structure(),
            Err(BatchStructureError::NotSorted(3))
        );
        let mut b = uplink_batch();
        if let BatchBody::Uplinks { entries } = &mut b.body {
            entries[1] = entries[0].clone();
        }
        assert_eq!(b.check_structure(), Err(BatchStructureError::NotSorted(1)));

        let mut b = ok.clone();
        if let BatchBody::Responses { entries, .. } = &mut b.body {
            entries[1].e_i = None;
        }
        assert_eq!(
            b.check_structure(),
            Err(BatchStructureError::ModeMismatch(1))
        );

        let mut b = ok.clone();
        b.aggregates.pop();
        assert_eq!(
            b.check_structure(),
            Err(BatchStructureError::AggregateCount {
                expected: 2,
                found: 1
            })
        );
        let mut b = ok.clone();
        b.chunk_size = 1025;
        assert_eq!(
            b.check_structure(),
            Err(BatchStructureError::ChunkSize(1025))
        );
        let mut b = ok;
        b.body = BatchBody::Uplinks { entries: vec![] };
        assert_eq!(b.check_structure(), Err(BatchStructureError::Empty));
        assert!(b.is_empty());
    }

    #[test]
    fn entries_convert_back_to_messages() {
        let r = response(42, true);
        assert_eq!(Response::from_entry(r.entry(), r.group, r.round, r.tag), r);
        let u = uplink(3);
        assert_eq!(Uplink::from_entry(u.entry(), u.group, u.tag), u);
        assert_eq!(u.entry().sort_key(), (MemberId(42), SessionId([8; 8]), 3));
    }

    #[test]
    fn aads_are_byte_exact() {
        let sid = SessionId([0xab; 8]);
        let a = uplink_aad(UplinkKind::Ack, GroupId(1), MemberId(2), sid, 3);
        assert_eq!(a.len(), 40);
        assert_eq!(
            &a[..],
            &[
                b"dapgw v1 up".as_slice(),
                &[3],
                &[0, 0, 0, 1],
                &[0, 0, 0, 0, 0, 0, 0, 2],
                &[0xab; 8],
                &[0, 0, 0, 0, 0, 0, 0, 3]
            ]
            .concat()[..]
        );
        let c = confirm();
        let a = c.aad();
        assert_eq!(a.len(), 52);
        assert_eq!(&a[..16], b"dapgw v1 confirm");
        // group || round || epoch || id || sid, exactly as in the message body.
        assert_eq!(&a[16..], &c.to_bytes()[2..38]);

        let r = rekey_aad(GroupId(1), 5, MemberId(2), sid, 7);
        assert_eq!(r.len(), 50);
        assert_eq!(&r[14..18], &[0, 0, 0, 1]);
        assert_eq!(&r[18..26], &5u64.to_be_bytes());
        assert_eq!(&r[26..34], &2u64.to_be_bytes());
        assert_eq!(&r[34..42], &[0xab; 8]);
        assert_eq!(&r[42..], &7u64.to_be_bytes());

        let k = key_update_aad(GroupId(1), MemberId(2), sid, 9, 7);
        assert_eq!(k.len(), 51);
        assert_eq!(&k[..19], b"dapgw v1 key update");
        assert_eq!(&k[39..43], &9u32.to_be_bytes());

        let g = group_message();
        let a = g.aad();
        assert_eq!(a.len(), 50);
        assert_eq!(&a[..22], b"dapgw v1 group message");
        // group || epoch || seq || valid_through_round, as in the message.
        assert_eq!(&a[22..], &g.to_bytes()[2..30]);
        assert_eq!(uplink(5).aad()[11], UplinkKind::Alarm.code());
    }

    #[test]
    fn ack_payload_round_trips() {
        let ack = AckPayload {
            group: GroupId(9),
            epoch: 4,
            seq: 13,
            message_hash: [0x77; 32],
        };
        let b = ack.to_array();
        assert_eq!(&b[..4], &[0, 0, 0, 9]);
        assert_eq!(&b[20..], &[0x77; 32]);
        assert_eq!(AckPayload::decode(&b), Ok(ack));
        assert_eq!(ack_err(&b[..51]), DecodeError::Truncated("ack"));
    }

    #[test]
    fn gateway_ids_are_validated() {
        for ok in ["a", "gw-01.site_7", &"x".repeat(64)] {
            let id = GatewayId::new(ok).unwrap();
            assert_eq!(id.as_str(), ok);
            assert_eq!(ok.parse::<GatewayId>().unwrap(), id);
        }
        for bad in ["", "GW", "gw 1", "gw/1", "é", &"x".repeat(65)] {
            assert_eq!(GatewayId::new(bad), Err(GatewayIdError), "{bad:?}");
        }
        let a = GatewayId::new("ab").unwrap();
        let b = GatewayId::new("b").unwrap();
        assert!(a < b, "ordered as bytes, not by length");
        assert_eq!(format!("{a:?}"), "GatewayId(\"ab\")");
    }

    #[test]
    fn codes_round_trip() {
        for code in 0..=u8::MAX {
            if let Some(o) = Outcome::from_code(code) {
                assert_eq!(o.code(), code);
            }
            if let Some(t) = MessageType::from_code(code) {
                assert_eq!(t.code(), code);
            }
        }
        assert_eq!(Outcome::from_code(10), Some(Outcome::MalformedPayload));
        assert_eq!(Outcome::from_code(11), None);
        assert_eq!(
            format!("{:?}", SessionId([1, 2, 3, 4, 5, 6, 7, 0xff])),
            "SessionId(01020304050607ff)"
        );
    }

    #[test]
    fn decode_error_messages_name_the_field() {
        assert_eq!(
            DecodeError::Truncated("response.c").to_string(),
            "message truncated at response.c"
        );
        assert_eq!(
            DecodeError::UnknownType(0x0d).to_string(),
            "unknown message type 0x0d"
        );
    }
}
