//! Feeds arbitrary bytes to the wire decoder and checks the codec's
//! invariants, not only that it does not panic:
//!
//! - whenever `Message::decode` accepts an input, encoding the result gives
//!   back exactly that input (decoding is canonical) and `encoded_len` agrees;
//! - the decoder for the message's own type accepts it with the same value;
//! - a decoded batch's chunk ranges tile its entries.
//!
//! Run with `cargo fuzz run decode` from the repository root.
#![no_main]

use bytes::Bytes;
use dapgw::protocol::wire::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let input = Bytes::copy_from_slice(data);
    let Ok(msg) = Message::decode(&input) else {
        return;
    };
    assert_eq!(
        msg.to_bytes(),
        input,
        "decode then encode changed the bytes"
    );
    assert_eq!(msg.encoded_len(), input.len());
    assert_eq!(msg.message_type().code(), data[1]);

    macro_rules! typed {
        ($t:ident, $m:expr) => {
            assert_eq!(&$t::decode(&input).expect("typed decoder refused"), $m)
        };
    }
    match &msg {
        Message::Challenge(m) => typed!(Challenge, m),
        Message::Response(m) => typed!(Response, m),
        Message::Uplink(m) => typed!(Uplink, m),
        Message::Batch(m) => {
            typed!(Batch, m);
            let mut next = 0;
            for r in m.chunks() {
                assert_eq!(r.start, next);
                next = r.end;
            }
            assert_eq!(next, m.len());
            assert_eq!(m.aggregates.len(), m.chunk_count());
            // Sortedness is the verifier's check, but it must not panic.
            let _ = m.check_structure();
        }
        Message::Verdict(m) => typed!(Verdict, m),
        Message::TagReply(m) => typed!(TagReply, m),
        Message::Confirm(m) => typed!(Confirm, m),
        Message::GroupMessage(m) => typed!(GroupMessage, m),
        Message::Rekey(m) => typed!(Rekey, m),
        Message::KeyUpdate(m) => typed!(KeyUpdate, m),
        Message::Direct(m) => {
            typed!(Direct, m);
            let inner = m
                .inner_message()
                .expect("a decoded Direct holds a valid inner message");
            assert_eq!(inner.to_bytes(), m.inner);
        }
        Message::KeyCertificate(m) => typed!(KeyCertificate, m),
    }
});
