//! Property tests of the wire codec (`dapgw::protocol::wire`): every message
//! round-trips, decoding is canonical on arbitrary and mutated input, and no
//! input makes the decoder panic.

use bytes::Bytes;
use dapgw::protocol::codec::DecodeError;
use dapgw::protocol::wire::*;
use proptest::collection::vec;
use proptest::prelude::*;

// ---------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------

/// Byte strings up to `max`, with the cap itself drawn now and then.
fn payload(max: usize) -> impl Strategy<Value = Bytes> {
    prop_oneof![
        8 => vec(any::<u8>(), 0..48),
        1 => vec(any::<u8>(), max..=max),
    ]
    .prop_map(Bytes::from)
}

fn gateway_id() -> impl Strategy<Value = GatewayId> {
    "[a-z0-9._-]{1,64}".prop_map(|s| GatewayId::new(&s).unwrap())
}

/// Member ids: anywhere in `u64`, or dense (batches then hold the one-byte
/// deltas of a real deployment's ids, and duplicates).
fn member_id() -> impl Strategy<Value = MemberId> {
    prop_oneof![any::<u64>(), 0u64..48, (u64::MAX - 8)..=u64::MAX].prop_map(MemberId)
}

/// Key versions: anywhere, or the few a deployment uses (batch entries
/// then repeat the previous entry's kv, which the compact layout leaves off).
fn key_version() -> impl Strategy<Value = u32> {
    prop_oneof![any::<u32>(), 0u32..3]
}

/// Uplink counters: anywhere, or small.
fn counter() -> impl Strategy<Value = u64> {
    prop_oneof![any::<u64>(), 0u64..300]
}

fn group_id() -> impl Strategy<Value = GroupId> {
    any::<u32>().prop_map(GroupId)
}

fn session_id() -> impl Strategy<Value = SessionId> {
    any::<[u8; 8]>().prop_map(SessionId)
}

fn mode() -> impl Strategy<Value = Mode> {
    prop_oneof![Just(Mode::Psk), Just(Mode::PskEcdhe)]
}

fn uplink_kind() -> impl Strategy<Value = UplinkKind> {
    prop_oneof![
        Just(UplinkKind::Reading),
        Just(UplinkKind::Alarm),
        Just(UplinkKind::Ack)
    ]
}

fn outcome() -> impl Strategy<Value = Outcome> {
    (0u8..=10).prop_map(|c| Outcome::from_code(c).unwrap())
}

prop_compose! {
    fn key_certificate()(
        key_id in any::<u32>(),
        key_version in any::<u32>(),
        public_key in any::<[u8; 32]>(),
        root_sig in any::<[u8; 64]>(),
    ) -> KeyCertificate {
        KeyCertificate { key_id, key_version, public_key, root_sig }
    }
}

prop_compose! {
    fn challenge()(
        (group, round, epoch, nonce_v) in (group_id(), any::<u64>(), any::<u64>(), any::<[u8; 16]>()),
        e_v in proptest::option::of(any::<[u8; 32]>()),
        purpose in prop_oneof![
            Just(Purpose::Auth),
            payload(MAX_READ_REQUEST).prop_map(Purpose::Read),
        ],
        (group_seq, config_hash) in (any::<u64>(), any::<[u8; 32]>()),
        not_after in proptest::option::of(any::<u64>()),
        key_cert in proptest::option::of(key_certificate()),
        key_id in any::<u32>(),
        signature in any::<[u8; 64]>(),
    ) -> Challenge {
        Challenge {
            group, round, epoch, nonce_v, e_v, purpose, group_seq, config_hash,
            not_after, key_cert, key_id, signature,
        }
    }
}

prop_compose! {
    fn response_entry(mode: Mode)(
        id in member_id(),
        kv in key_version(),
        n_i in any::<[u8; 16]>(),
        e_i in any::<[u8; 32]>(),
        c in payload(MAX_PAYLOAD),
    ) -> ResponseEntry {
        ResponseEntry { id, kv, n_i, e_i: (mode == Mode::PskEcdhe).then_some(e_i), c }
    }
}

prop_compose! {
    fn response()(
        mode in mode(),
    )(
        entry in response_entry(mode),
        group in group_id(),
        round in any::<u64>(),
        tag in any::<[u8; 16]>(),
    ) -> Response {
        Response::from_entry(entry, group, round, tag)
    }
}

prop_compose! {
    fn uplink_entry()(
        id in member_id(),
        sid in session_id(),
        kind in uplink_kind(),
        ctr in counter(),
        c in payload(MAX_PAYLOAD),
    ) -> UplinkEntry {
        UplinkEntry { id, sid, kind, ctr, c }
    }
}

prop_compose! {
    fn uplink()(entry in uplink_entry(), group in group_id(), tag in any::<[u8; 16]>()) -> Uplink {
        Uplink::from_entry(entry, group, tag)
    }
}

/// A batch body: sorted and deduplicated, as an honest gateway builds it.
fn batch_body() -> impl Strategy<Value = BatchBody> {
    let responses = (any::<u64>(), mode()).prop_flat_map(|(round, mode)| {
        vec(response_entry(mode), 1..24).prop_map(move |mut entries| {
            entries.sort_by_key(ResponseEntry::sort_key);
            entries.dedup_by_key(|e| e.sort_key());
            BatchBody::Responses {
                round,
                mode,
                entries,
            }
        })
    });
    let uplinks = vec(uplink_entry(), 1..24).prop_map(|mut entries| {
        entries.sort_by_key(UplinkEntry::sort_key);
        entries.dedup_by_key(|e| e.sort_key());
        BatchBody::Uplinks { entries }
    });
    prop_oneof![responses, uplinks]
}

prop_compose! {
    fn batch()(
        gateway_id in gateway_id(),
        batch_id in any::<u64>(),
        group in group_id(),
        chunk_size in prop_oneof![4 => 1u16..=8, 1 => 1u16..=1024],
        body in batch_body(),
        seed in any::<[u8; 16]>(),
    ) -> Batch {
        let mut b = Batch { gateway_id, batch_id, group, chunk_size, body, aggregates: vec![] };
        b.aggregates = (0..b.chunk_count()).map(|k| {
            let mut a = seed;
            a[0] ^= k as u8;
            a
        }).collect();
        b
    }
}

prop_compose! {
    fn confirm()(
        (group, round, epoch) in (group_id(), any::<u64>(), any::<u64>()),
        (id, sid, w) in (member_id(), session_id(), any::<[u8; 32]>()),
    ) -> Confirm {
        Confirm { group, round, epoch, id, sid, w }
    }
}

fn verdict_body() -> impl Strategy<Value = VerdictBody> {
    let fin = vec(outcome(), 1..40).prop_flat_map(|outcomes| {
        let max = outcomes.len().min(4);
        vec(confirm(), 0..=max).prop_map(move |confirms| VerdictBody::Final {
            outcomes: outcomes.clone(),
            confirms,
        })
    });
    let tags = proptest::collection::btree_set(any::<u32>(), 1..40).prop_map(|s| {
        VerdictBody::TagsRequested {
            chunks: s.into_iter().collect(),
        }
    });
    prop_oneof![fin, tags]
}

prop_compose! {
    fn verdict()(
        gateway_id in gateway_id(),
        batch_id in any::<u64>(),
        batch_hash in any::<[u8; 32]>(),
        body in verdict_body(),
    ) -> Verdict {
        Verdict { gateway_id, batch_id, batch_hash, body }
    }
}

prop_compose! {
    fn tag_reply()(
        gateway_id in gateway_id(),
        batch_id in any::<u64>(),
        batch_hash in any::<[u8; 32]>(),
        chunks in vec(
            (any::<u32>(), vec(any::<[u8; 16]>(), 0..10))
                .prop_map(|(chunk, tags)| ChunkTags { chunk, tags }),
            0..8,
        ),
    ) -> TagReply {
        TagReply { gateway_id, batch_id, batch_hash, chunks }
    }
}

prop_compose! {
    fn group_message()(
        (group, epoch, seq, valid_through_round) in
            (group_id(), any::<u64>(), any::<u64>(), any::<u64>()),
        nonce in any::<[u8; 12]>(),
        c in prop_oneof![
            8 => vec(any::<u8>(), TAG_LEN..80),
            1 => vec(any::<u8>(), MAX_GROUP_CIPHERTEXT..=MAX_GROUP_CIPHERTEXT),
        ],
        key_id in any::<u32>(),
        signature in any::<[u8; 64]>(),
    ) -> GroupMessage {
        GroupMessage {
            group, epoch, seq, valid_through_round, nonce, c: Bytes::from(c), key_id, signature,
        }
    }
}

prop_compose! {
    fn rekey()(
        (group, id, sid) in (group_id(), member_id(), session_id()),
        (new_epoch, down_ctr) in (any::<u64>(), any::<u64>()),
        (nonce, c) in (any::<[u8; 12]>(), any::<[u8; 32]>()),
    ) -> Rekey {
        Rekey { group, id, sid, new_epoch, down_ctr, nonce, c }
    }
}

prop_compose! {
    fn key_update()(
        (group, id, sid) in (group_id(), member_id(), session_id()),
        (new_kv, down_ctr) in (any::<u32>(), any::<u64>()),
        (nonce, c) in (any::<[u8; 12]>(), any::<[u8; 48]>()),
    ) -> KeyUpdate {
        KeyUpdate { group, id, sid, new_kv, down_ctr, nonce, c }
    }
}

prop_compose! {
    fn direct()(
        inner in prop_oneof![
            response().prop_map(DirectInner::Response),
            uplink().prop_map(DirectInner::Uplink),
        ],
        aggregate in any::<[u8; 16]>(),
    ) -> Direct {
        Direct::new(&inner, aggregate)
    }
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        challenge().prop_map(Message::Challenge),
        response().prop_map(Message::Response),
        uplink().prop_map(Message::Uplink),
        batch().prop_map(Message::Batch),
        verdict().prop_map(Message::Verdict),
        tag_reply().prop_map(Message::TagReply),
        confirm().prop_map(Message::Confirm),
        group_message().prop_map(Message::GroupMessage),
        rekey().prop_map(Message::Rekey),
        key_update().prop_map(Message::KeyUpdate),
        direct().prop_map(Message::Direct),
        key_certificate().prop_map(Message::KeyCertificate),
    ]
}

/// Ways to damage a valid encoding.
#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, xor: u8 },
    Set { at: usize, to: u8 },
    Truncate { len: usize },
    Insert { at: usize, byte: u8 },
    Remove { at: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    // Positions are reduced modulo the message length when applied.
    prop_oneof![
        (any::<usize>(), 1u8..).prop_map(|(at, xor)| Mutation::Flip { at, xor }),
        (
            any::<usize>(),
            prop_oneof![Just(0u8), Just(1), Just(2), Just(0xff), any::<u8>()]
        )
            .prop_map(|(at, to)| Mutation::Set { at, to }),
        any::<usize>().prop_map(|len| Mutation::Truncate { len }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Insert { at, byte }),
        any::<usize>().prop_map(|at| Mutation::Remove { at }),
    ]
}

fn apply(mut v: Vec<u8>, m: &Mutation) -> Vec<u8> {
    let n = v.len();
    if n == 0 {
        return v;
    }
    match *m {
        Mutation::Flip { at, xor } => v[at % n] ^= xor,
        Mutation::Set { at, to } => v[at % n] = to,
        Mutation::Truncate { len } => v.truncate(len % n),
        Mutation::Insert { at, byte } => v.insert(at % (v.len() + 1), byte),
        Mutation::Remove { at } => {
            v.remove(at % n);
        }
    }
    v
}

// ---------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------

/// Decodes `bytes` as any message; if it decodes, re-encoding must give the
/// same bytes and the typed decoder must agree.
fn assert_canonical(bytes: &[u8]) -> Result<Option<Message>, TestCaseError> {
    let input = Bytes::copy_from_slice(bytes);
    match Message::decode(&input) {
        Ok(msg) => {
            prop_assert_eq!(&msg.to_bytes()[..], bytes);
            prop_assert_eq!(msg.encoded_len(), bytes.len());
            Ok(Some(msg))
        }
        Err(_) => Ok(None),
    }
}

/// Checks the typed decoder of `msg`'s type gives back the same value.
fn typed_round_trip(msg: &Message, bytes: &Bytes) -> Result<(), TestCaseError> {
    macro_rules! check {
        ($t:ident, $m:expr) => {{
            let back = $t::decode(bytes).map_err(|e| TestCaseError::fail(format!("{e}")))?;
            prop_assert_eq!(&back, $m);
        }};
    }
    match msg {
        Message::Challenge(m) => check!(Challenge, m),
        Message::Response(m) => check!(Response, m),
        Message::Uplink(m) => check!(Uplink, m),
        Message::Batch(m) => check!(Batch, m),
        Message::Verdict(m) => check!(Verdict, m),
        Message::TagReply(m) => check!(TagReply, m),
        Message::Confirm(m) => check!(Confirm, m),
        Message::GroupMessage(m) => check!(GroupMessage, m),
        Message::Rekey(m) => check!(Rekey, m),
        Message::KeyUpdate(m) => check!(KeyUpdate, m),
        Message::Direct(m) => check!(Direct, m),
        Message::KeyCertificate(m) => check!(KeyCertificate, m),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_message_round_trips(msg in message()) {
        let bytes = msg.to_bytes();
        prop_assert_eq!(bytes.len(), msg.encoded_len());
        prop_assert_eq!(bytes[1], msg.message_type().code());
        let back = Message::decode(&bytes).map_err(|e| TestCaseError::fail(format!("{e}")))?;
        prop_assert_eq!(&back, &msg);
        typed_round_trip(&msg, &bytes)?;
        // Every strict prefix is refused, and never with a panic.
        let cut = bytes.len() / 2;
        prop_assert!(matches!(Message::decode(&bytes.slice(..cut)), Err(DecodeError::Truncated(_))));
    }

    #[test]
    fn honest_batches_pass_the_structure_check(b in batch()) {
        prop_assert_eq!(b.check_structure(), Ok(()));
        // The chunks tile 0..len in order, each at most chunk_size long.
        let mut next = 0;
        for r in b.chunks() {
            prop_assert_eq!(r.start, next);
            prop_assert!(!r.is_empty() && r.len() <= usize::from(b.chunk_size));
            next = r.end;
        }
        prop_assert_eq!(next, b.len());
        prop_assert_eq!(b.chunks().len(), b.chunk_count());
    }

    /// The compact entries (id deltas, kv left off when repeated) carry any
    /// order: an unsorted batch or one with a duplicate decodes to the same
    /// value, and the verifier's structure check names the first entry out
    /// of order.
    #[test]
    fn batches_in_any_entry_order_round_trip_and_disorder_is_found(
        b in batch(),
        order in vec(any::<prop::sample::Index>(), 1..24),
    ) {
        let mut b = b;
        fn shuffle<T: Clone>(entries: &mut Vec<T>, order: &[prop::sample::Index]) {
            // Picks with replacement: duplicates included.
            let picked: Vec<T> = order.iter().map(|i| entries[i.index(entries.len())].clone()).collect();
            *entries = picked;
        }
        let keys: Vec<(MemberId, SessionId, u64)> = match &mut b.body {
            BatchBody::Responses { entries, .. } => {
                shuffle(entries, &order);
                entries.iter().map(|e| (e.id, SessionId([0; 8]), 0)).collect()
            }
            BatchBody::Uplinks { entries } => {
                shuffle(entries, &order);
                entries.iter().map(UplinkEntry::sort_key).collect()
            }
        };
        b.aggregates = vec![[3; 16]; b.chunk_count()];
        let bytes = b.to_bytes();
        prop_assert_eq!(bytes.len(), b.encoded_len());
        let back = Batch::decode(&bytes).map_err(|e| TestCaseError::fail(format!("{e}")))?;
        prop_assert_eq!(&back, &b);
        prop_assert_eq!(back.to_bytes(), bytes);
        let first_bad = keys.windows(2).position(|w| w[0] >= w[1]).map(|i| i + 1);
        prop_assert_eq!(
            back.check_structure(),
            first_bad.map_or(Ok(()), |i| Err(BatchStructureError::NotSorted(i)))
        );
    }

    #[test]
    fn responses_and_uplinks_survive_batching(r in response(), u in uplink()) {
        prop_assert_eq!(Response::from_entry(r.entry(), r.group, r.round, r.tag), r.clone());
        prop_assert_eq!(Uplink::from_entry(u.entry(), u.group, u.tag), u);
    }

    #[test]
    fn mutated_messages_decode_canonically_or_not_at_all(
        msg in message(),
        mutations in vec(mutation(), 1..4),
    ) {
        let mut v = msg.to_bytes().to_vec();
        for m in &mutations {
            v = apply(v, m);
        }
        assert_canonical(&v)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Every position of a message, set to the values most likely to slip
    /// through a loose decoder (0, 1, 2, 0xff, low and high bit flipped).
    #[test]
    fn every_single_byte_change_decodes_canonically_or_not_at_all(msg in message()) {
        let bytes = msg.to_bytes().to_vec();
        // Long messages (big payloads) are sampled with a stride.
        let stride = (bytes.len() / 1024).max(1);
        for at in (0..bytes.len()).step_by(stride) {
            let b = bytes[at];
            for to in [0, 1, 2, 0xff, b ^ 0x01, b ^ 0x80] {
                let mut v = bytes.clone();
                v[at] = to;
                assert_canonical(&v)?;
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn arbitrary_bytes_decode_canonically_or_not_at_all(bytes in vec(any::<u8>(), 0..256)) {
        assert_canonical(&bytes)?;
    }

    #[test]
    fn arbitrary_bodies_under_a_valid_header_decode_canonically_or_not_at_all(
        t in 1u8..=12,
        // Random lengths, plus the exact body lengths of the fixed-size
        // messages so that those decode often.
        body in prop_oneof![
            3 => vec(any::<u8>(), 0..320),
            1 => proptest::sample::select(vec![68usize, 80, 92, 104])
                .prop_flat_map(|n| vec(any::<u8>(), n)),
        ],
    ) {
        let mut bytes = vec![VERSION, t];
        bytes.extend(body);
        if let Some(msg) = assert_canonical(&bytes)? {
            prop_assert_eq!(msg.message_type().code(), t);
        }
    }

    #[test]
    fn ack_payloads_round_trip(
        group in group_id(), epoch in any::<u64>(), seq in any::<u64>(), message_hash in any::<[u8; 32]>(),
        junk in vec(any::<u8>(), 0..80),
    ) {
        let ack = AckPayload { group, epoch, seq, message_hash };
        prop_assert_eq!(AckPayload::decode(&ack.to_array()), Ok(ack));
        if let Ok(a) = AckPayload::decode(&junk) {
            prop_assert_eq!(&a.to_array()[..], &junk[..]);
        }
    }
}
