//! Byte-level reading and writing for the wire messages in [`super::wire`].
//!
//! This is the bottom of the protocol core: every byte a peer sends passes
//! through a `Reader` before any other code looks at it. The reader checks
//! each length against its cap and against the remaining input *before*
//! anything is allocated, hands variable-length fields out as [`Bytes`]
//! slices of the input (never copies), and rejects trailing bytes. Failures
//! are a small `Copy` [`DecodeError`] naming the field, so hostile input costs
//! no allocation. Writing goes into a [`BytesMut`] through the `put_*`
//! helpers, or into fixed-size arrays through `FixedWriter` for AADs.

use bytes::{BufMut, Bytes, BytesMut};

/// Why a byte string is not a valid dapgw v1 message.
///
/// Each variant carries where decoding stopped, as `"message.field"` (for
/// example `"response.c"`), so a log line says which field of which message
/// was wrong without echoing peer bytes. Creating one never allocates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ended inside the named field, or a length or count promises
    /// more bytes than remain. Usually a cut-off transfer, a body read with
    /// the wrong length, or a peer lying about a length.
    #[error("message truncated at {0}")]
    Truncated(&'static str),
    /// A length or count is over the cap the protocol sets for the named
    /// field (for example more than 16,384 batch entries or a payload over
    /// 1,024 bytes). Usually a misbehaving or hostile peer, or a peer built
    /// with different caps.
    #[error("{0} is over its cap")]
    TooLong(&'static str),
    /// The named field holds a value the layout does not allow: an enum code
    /// out of range, an `opt` flag other than 0 or 1, a zero count where one
    /// is required, a malformed gateway id, indices not strictly increasing.
    /// Usually a buggy encoder or tampering on the path.
    #[error("invalid value in {0}")]
    Invalid(&'static str),
    /// The type byte names no dapgw v1 message. Usually garbage sent to the
    /// endpoint, or a peer speaking a newer protocol revision.
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
    /// The type byte names a known message, but not the one this endpoint or
    /// field expects (for example a Challenge posted where a Response is
    /// due). Usually a peer sending to the wrong endpoint.
    #[error("unexpected message type {0:#04x}")]
    WrongType(u8),
    /// The version byte is not 1. Usually a peer running another protocol
    /// version, or bytes that are not a dapgw message at all.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// Bytes are left over after the last field of the named message or
    /// length-prefixed part. Usually two messages concatenated, or padding
    /// added on the path; rejected so every accepted value has exactly one
    /// encoding.
    #[error("trailing bytes after {0}")]
    TrailingBytes(&'static str),
}

/// A cursor over a received message.
///
/// It borrows the [`Bytes`] handle of the whole input so that variable-length
/// fields come out as [`Bytes::slice`]s sharing the input's allocation. A
/// bounded sub-reader (from [`Reader::sub`] or [`Reader::vec16_reader`]) sees
/// only its own part, so a length-prefixed part can never read past its end.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    src: &'a Bytes,
    /// Absolute offset of the next unread byte in `src`.
    pos: usize,
    /// Absolute offset one past the last byte this reader may read.
    end: usize,
}

impl<'a> Reader<'a> {
    /// A reader over all of `src`.
    pub(crate) fn new(src: &'a Bytes) -> Self {
        Self {
            src,
            pos: 0,
            end: src.len(),
        }
    }

    /// Bytes left for this reader.
    pub(crate) fn remaining(&self) -> usize {
        self.end - self.pos
    }

    /// Whether every byte has been consumed.
    pub(crate) fn is_empty(&self) -> bool {
        self.pos == self.end
    }

    /// Fails with `TrailingBytes(what)` unless every byte has been consumed.
    pub(crate) fn expect_end(&self, what: &'static str) -> Result<(), DecodeError> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes(what))
        }
    }

    /// The next `n` bytes as a borrowed slice.
    pub(crate) fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if n > self.remaining() {
            return Err(DecodeError::Truncated(what));
        }
        let src: &'a Bytes = self.src;
        let out = src
            .get(self.pos..self.pos + n)
            .ok_or(DecodeError::Truncated(what))?;
        self.pos += n;
        Ok(out)
    }

    /// The next `n` bytes as a shared slice of the input (no copy).
    pub(crate) fn take_bytes(
        &mut self,
        n: usize,
        what: &'static str,
    ) -> Result<Bytes, DecodeError> {
        if n > self.remaining() {
            return Err(DecodeError::Truncated(what));
        }
        let out = self.src.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(out)
    }

    /// A reader over the next `n` bytes; this reader skips past them.
    pub(crate) fn sub(&mut self, n: usize, what: &'static str) -> Result<Reader<'a>, DecodeError> {
        if n > self.remaining() {
            return Err(DecodeError::Truncated(what));
        }
        let sub = Reader {
            src: self.src,
            pos: self.pos,
            end: self.pos + n,
        };
        self.pos += n;
        Ok(sub)
    }

    /// A fixed-width field.
    pub(crate) fn array<const N: usize>(
        &mut self,
        what: &'static str,
    ) -> Result<[u8; N], DecodeError> {
        let s = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Ok(out)
    }

    /// A `u8`.
    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    /// A big-endian `u16`.
    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        self.array(what).map(u16::from_be_bytes)
    }

    /// A big-endian `u32`.
    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.array(what).map(u32::from_be_bytes)
    }

    /// A big-endian `u64`.
    pub(crate) fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        self.array(what).map(u64::from_be_bytes)
    }

    /// An `opt<T>` flag: `0` is absent, `1` is present, anything else is
    /// `Invalid(what)`.
    pub(crate) fn opt_flag(&mut self, what: &'static str) -> Result<bool, DecodeError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::Invalid(what)),
        }
    }

    /// Checks a length read from the wire: over `cap` is `TooLong`, more than
    /// what remains is `Truncated`.
    fn check_len(&self, len: usize, cap: usize, what: &'static str) -> Result<(), DecodeError> {
        if len > cap {
            Err(DecodeError::TooLong(what))
        } else if len > self.remaining() {
            Err(DecodeError::Truncated(what))
        } else {
            Ok(())
        }
    }

    /// A `vec8`: a `u8` length (at most `cap`) and that many bytes.
    pub(crate) fn vec8(&mut self, cap: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = usize::from(self.u8(what)?);
        self.check_len(len, cap, what)?;
        self.take(len, what)
    }

    /// A `vec16`: a `u16` length (at most `cap`) and that many bytes, as a
    /// slice of the input.
    pub(crate) fn vec16(&mut self, cap: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        let len = usize::from(self.u16(what)?);
        self.check_len(len, cap, what)?;
        self.take_bytes(len, what)
    }

    /// A `vec16` read as a bounded sub-reader, for a nested message.
    pub(crate) fn vec16_reader(
        &mut self,
        cap: usize,
        what: &'static str,
    ) -> Result<Reader<'a>, DecodeError> {
        let len = usize::from(self.u16(what)?);
        self.check_len(len, cap, what)?;
        self.sub(len, what)
    }

    /// A `vec32`: a `u32` length (at most `cap`) and that many bytes, as a
    /// slice of the input.
    pub(crate) fn vec32(&mut self, cap: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        let len = usize::try_from(self.u32(what)?).map_err(|_| DecodeError::TooLong(what))?;
        self.check_len(len, cap, what)?;
        self.take_bytes(len, what)
    }

    /// A canonical unsigned LEB128 varint (see [`put_varint`]): seven bits
    /// a byte, least significant group first, the high bit set on every
    /// byte but the last. At most [`MAX_VARINT_LEN`] bytes; a value over
    /// `u64::MAX` and a non-minimal encoding (a last byte of zero after
    /// another byte) are `Invalid(what)`, so every value has one encoding.
    pub(crate) fn varint(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for i in 0..MAX_VARINT_LEN {
            let at = self.pos + i;
            let b = match self.src.get(at) {
                Some(&b) if at < self.end => b,
                _ => return Err(DecodeError::Truncated(what)),
            };
            // The tenth byte holds bit 63 only.
            if i == MAX_VARINT_LEN - 1 && b > 1 {
                return Err(DecodeError::Invalid(what));
            }
            value |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                if i > 0 && b == 0 {
                    return Err(DecodeError::Invalid(what));
                }
                self.pos += i + 1;
                return Ok(value);
            }
        }
        Err(DecodeError::Invalid(what))
    }

    /// A canonical varint that must fit a `u32` (`Invalid(what)` above).
    pub(crate) fn varint_u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let start = self.pos;
        let v = self.varint(what)?;
        u32::try_from(v).map_err(|_| {
            self.pos = start;
            DecodeError::Invalid(what)
        })
    }

    /// Checks a count of items read from the wire before a `Vec` is sized
    /// for it: over `cap` is `TooLong`; if even `count` items of the
    /// smallest encoding (`min_item_len` bytes) cannot fit in what remains,
    /// `Truncated`. After this, `Vec::with_capacity(count)` is bounded by the
    /// input size.
    pub(crate) fn check_count(
        &self,
        count: usize,
        cap: usize,
        min_item_len: usize,
        what: &'static str,
    ) -> Result<(), DecodeError> {
        if count > cap {
            return Err(DecodeError::TooLong(what));
        }
        match count.checked_mul(min_item_len) {
            Some(need) if need <= self.remaining() => Ok(()),
            _ => Err(DecodeError::Truncated(what)),
        }
    }
}

/// Longest varint: ten bytes carry 64 bits.
pub(crate) const MAX_VARINT_LEN: usize = 10;

/// Writes `v` as a canonical unsigned LEB128 varint (the shortest one):
/// 0..=127 in one byte, below 2^14 in two, up to ten bytes.
pub(crate) fn put_varint(out: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        out.put_u8((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.put_u8(v as u8);
}

/// Length in bytes of [`put_varint`]'s encoding of `v`.
pub(crate) fn varint_len(v: u64) -> usize {
    // Bits needed (at least one), seven per byte.
    let bits = 64 - (v | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// ZigZag: a signed difference as an unsigned varint value (0, -1, 1, -2,
/// ... become 0, 1, 2, 3, ...). A bijection between `i64` and `u64`.
pub(crate) fn zigzag(d: i64) -> u64 {
    ((d << 1) ^ (d >> 63)) as u64
}

/// The inverse of [`zigzag`].
pub(crate) fn unzigzag(z: u64) -> i64 {
    ((z >> 1) as i64) ^ -((z & 1) as i64)
}

/// Writes a `vec8`.
///
/// # Panics
///
/// If `v` is longer than 255 bytes: the caller built a value the layout
/// cannot express (silently truncating the length would corrupt the message).
pub(crate) fn put_vec8(out: &mut BytesMut, v: &[u8]) {
    let len = u8::try_from(v.len()).expect("vec8 field longer than 255 bytes");
    out.put_u8(len);
    out.put_slice(v);
}

/// Writes a `vec16`.
///
/// # Panics
///
/// If `v` is longer than 65,535 bytes (see [`put_vec8`]).
pub(crate) fn put_vec16(out: &mut BytesMut, v: &[u8]) {
    out.put_u16(len16(v.len()));
    out.put_slice(v);
}

/// A `vec16` length prefix for a part of `len` bytes.
///
/// # Panics
///
/// If `len` is over 65,535 (see [`put_vec8`]).
pub(crate) fn len16(len: usize) -> u16 {
    u16::try_from(len).expect("vec16 field longer than 65535 bytes")
}

/// Writes a `vec32`.
///
/// # Panics
///
/// If `v` is longer than `u32::MAX` bytes (see [`put_vec8`]).
pub(crate) fn put_vec32(out: &mut BytesMut, v: &[u8]) {
    out.put_u32(len32(v.len()));
    out.put_slice(v);
}

/// A `u32` count or length for `len`.
///
/// # Panics
///
/// If `len` is over `u32::MAX` (see [`put_vec8`]).
pub(crate) fn len32(len: usize) -> u32 {
    u32::try_from(len).expect("u32 count or length overflow")
}

/// Writes an `opt<T>` flag.
pub(crate) fn put_opt_flag(out: &mut BytesMut, present: bool) {
    out.put_u8(u8::from(present));
}

/// Fills a fixed-size array field by field, for AADs and other encodings
/// whose length is known at compile time (no allocation).
pub(crate) struct FixedWriter<const N: usize> {
    buf: [u8; N],
    pos: usize,
}

impl<const N: usize> FixedWriter<N> {
    /// An empty writer.
    pub(crate) fn new() -> Self {
        Self {
            buf: [0u8; N],
            pos: 0,
        }
    }

    /// Appends `bytes`.
    ///
    /// # Panics
    ///
    /// If the array would overflow: the AAD length constants are wrong.
    pub(crate) fn put(mut self, bytes: &[u8]) -> Self {
        self.buf[self.pos..self.pos + bytes.len()].copy_from_slice(bytes);
        self.pos += bytes.len();
        self
    }

    /// The filled array.
    ///
    /// # Panics
    ///
    /// If it is not completely filled: the AAD length constants are wrong.
    pub(crate) fn finish(self) -> [u8; N] {
        assert_eq!(self.pos, N, "fixed-size encoding not completely filled");
        self.buf
    }
}

/// Fills a borrowed slice field by field, for encodings whose length is
/// known before they are written ([`FixedWriter`]'s twin for a length known
/// at run time: no allocation, the caller owns the buffer).
pub(crate) struct SliceWriter<'a> {
    out: &'a mut [u8],
    pos: usize,
}

impl<'a> SliceWriter<'a> {
    /// A writer at the start of `out`.
    pub(crate) fn new(out: &'a mut [u8]) -> Self {
        Self { out, pos: 0 }
    }

    /// Appends `bytes`.
    ///
    /// # Panics
    ///
    /// If the slice would overflow (before writing anything past it): the
    /// caller's length is wrong.
    pub(crate) fn put(&mut self, bytes: &[u8]) {
        self.out[self.pos..self.pos + bytes.len()].copy_from_slice(bytes);
        self.pos += bytes.len();
    }

    /// Checks the slice is completely filled.
    ///
    /// # Panics
    ///
    /// If it is not: the caller's length is wrong.
    pub(crate) fn finish(self) {
        assert_eq!(self.pos, self.out.len(), "encoding not completely filled");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(v: &[u8]) -> Bytes {
        Bytes::copy_from_slice(v)
    }

    #[test]
    fn integers_are_big_endian() {
        let b = bytes(&[1, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 4]);
        let mut r = Reader::new(&b);
        assert_eq!(r.u8("a").unwrap(), 1);
        assert_eq!(r.u16("b").unwrap(), 2);
        assert_eq!(r.u32("c").unwrap(), 3);
        assert_eq!(r.u64("d").unwrap(), 4);
        r.expect_end("x").unwrap();
    }

    #[test]
    fn truncation_names_the_field() {
        let b = bytes(&[0, 0, 0]);
        let mut r = Reader::new(&b);
        assert_eq!(r.u32("f.x"), Err(DecodeError::Truncated("f.x")));
        // A failed read consumes nothing.
        assert_eq!(r.remaining(), 3);
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let b = bytes(&[1, 2]);
        let mut r = Reader::new(&b);
        r.u8("a").unwrap();
        assert_eq!(r.expect_end("m"), Err(DecodeError::TrailingBytes("m")));
    }

    #[test]
    fn vec_lengths_checked_against_cap_before_remaining() {
        // Length 5 with cap 4: TooLong even though the bytes are absent.
        let b = bytes(&[0, 5]);
        assert_eq!(
            Reader::new(&b).vec16(4, "v"),
            Err(DecodeError::TooLong("v"))
        );
        // Length 5 within cap but only 2 bytes follow: Truncated.
        let b = bytes(&[0, 5, 1, 2]);
        assert_eq!(
            Reader::new(&b).vec16(8, "v"),
            Err(DecodeError::Truncated("v"))
        );
        // A u32 length near u32::MAX is refused by the cap without allocating.
        let b = bytes(&[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(
            Reader::new(&b).vec32(1024, "v"),
            Err(DecodeError::TooLong("v"))
        );
        let b = bytes(&[3, b'a', b'b']);
        assert_eq!(
            Reader::new(&b).vec8(64, "v"),
            Err(DecodeError::Truncated("v"))
        );
    }

    #[test]
    fn vec16_is_a_slice_of_the_input() {
        let b = bytes(&[0, 3, 7, 8, 9, 1]);
        let mut r = Reader::new(&b);
        let v = r.vec16(16, "v").unwrap();
        assert_eq!(&v[..], &[7, 8, 9]);
        // Same memory, not a copy.
        assert_eq!(v.as_ptr(), b[2..].as_ptr());
        assert_eq!(r.remaining(), 1);
    }

    #[test]
    fn sub_reader_is_bounded() {
        let b = bytes(&[0, 2, 1, 2, 3]);
        let mut r = Reader::new(&b);
        let mut sub = r.vec16_reader(16, "s").unwrap();
        assert_eq!(sub.u16("in").unwrap(), 0x0102);
        assert_eq!(sub.u8("in"), Err(DecodeError::Truncated("in")));
        sub.expect_end("s").unwrap();
        assert_eq!(r.u8("out").unwrap(), 3);
    }

    #[test]
    fn opt_flag_is_zero_or_one() {
        for (flag, want) in [
            (0u8, Ok(false)),
            (1, Ok(true)),
            (2, Err(DecodeError::Invalid("o"))),
        ] {
            let b = bytes(&[flag]);
            assert_eq!(Reader::new(&b).opt_flag("o"), want);
        }
    }

    #[test]
    fn counts_checked_against_cap_and_remaining() {
        let b = bytes(&[0; 10]);
        let r = Reader::new(&b);
        assert_eq!(r.check_count(5, 4, 1, "n"), Err(DecodeError::TooLong("n")));
        assert_eq!(
            r.check_count(3, 4, 4, "n"),
            Err(DecodeError::Truncated("n"))
        );
        assert_eq!(
            r.check_count(usize::MAX, usize::MAX, 2, "n"),
            Err(DecodeError::Truncated("n"))
        );
        r.check_count(2, 4, 5, "n").unwrap();
    }

    #[test]
    fn writers_round_trip() {
        let mut out = BytesMut::new();
        put_vec8(&mut out, b"gw");
        put_vec16(&mut out, b"abc");
        put_vec32(&mut out, b"");
        put_opt_flag(&mut out, true);
        let b = out.freeze();
        let mut r = Reader::new(&b);
        assert_eq!(r.vec8(64, "a").unwrap(), b"gw");
        assert_eq!(&r.vec16(64, "b").unwrap()[..], b"abc");
        assert!(r.vec32(64, "c").unwrap().is_empty());
        assert!(r.opt_flag("d").unwrap());
        r.expect_end("e").unwrap();
    }

    #[test]
    #[should_panic(expected = "vec8 field longer than 255 bytes")]
    fn oversized_vec8_panics_instead_of_truncating() {
        put_vec8(&mut BytesMut::new(), &[0; 256]);
    }

    #[test]
    fn varints_round_trip_at_every_length_boundary() {
        let mut values = vec![
            0u64,
            1,
            127,
            128,
            300,
            16_383,
            16_384,
            u64::MAX,
            u64::MAX - 1,
        ];
        values.extend((1..64).flat_map(|s| [(1u64 << s) - 1, 1u64 << s]));
        for v in values {
            let mut out = BytesMut::new();
            put_varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v), "{v}");
            let b = out.freeze();
            let mut r = Reader::new(&b);
            assert_eq!(r.varint("v").unwrap(), v);
            r.expect_end("v").unwrap();
        }
        assert_eq!(varint_len(0), 1);
        assert_eq!(varint_len(127), 1);
        assert_eq!(varint_len(128), 2);
        assert_eq!(varint_len(u64::MAX), MAX_VARINT_LEN);
    }

    #[test]
    fn non_canonical_and_overflowing_varints_are_refused() {
        for bad in [
            &[0x80, 0x00][..],                                             // 0 in two bytes
            &[0xff, 0x00],                                                 // 127 in two bytes
            &[0x80, 0x80, 0x00],                                           // padded
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02], // 2^64
            &[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80], // 11 bytes
        ] {
            let b = bytes(bad);
            assert_eq!(
                Reader::new(&b).varint("v"),
                Err(DecodeError::Invalid("v")),
                "{bad:?}"
            );
        }
        // Cut off inside the varint, including by a sub-reader's end.
        let b = bytes(&[0x80]);
        assert_eq!(
            Reader::new(&b).varint("v"),
            Err(DecodeError::Truncated("v"))
        );
        let b = bytes(&[0, 1, 0x80, 0x01]);
        let mut r = Reader::new(&b);
        let mut sub = r.vec16_reader(8, "s").unwrap();
        assert_eq!(sub.varint("v"), Err(DecodeError::Truncated("v")));
        // u32 bound.
        let b = bytes(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert_eq!(Reader::new(&b).varint_u32("v").unwrap(), u32::MAX);
        let b = bytes(&[0x80, 0x80, 0x80, 0x80, 0x10]);
        assert_eq!(
            Reader::new(&b).varint_u32("v"),
            Err(DecodeError::Invalid("v"))
        );
    }

    #[test]
    fn zigzag_is_a_bijection_around_zero_and_at_the_extremes() {
        for (d, z) in [
            (0i64, 0u64),
            (-1, 1),
            (1, 2),
            (-2, 3),
            (i64::MAX, u64::MAX - 1),
            (i64::MIN, u64::MAX),
        ] {
            assert_eq!(zigzag(d), z);
            assert_eq!(unzigzag(z), d);
        }
    }

    #[test]
    fn fixed_writer_fills_exactly() {
        let a: [u8; 3] = FixedWriter::new().put(&[1]).put(&[2, 3]).finish();
        assert_eq!(a, [1, 2, 3]);
    }
}
