//! A deliberately dishonest gateway, for demonstrations (`DAPGW_MISBEHAVE`).
//!
//! ```text
//! member --response--> server --[tamper]--> spool --> collector --> batch --> UDC
//!                                 |
//!                                 +--invented response--> spool --> collector
//! ```
//!
//! With `DAPGW_MISBEHAVE=tamper:<member-id>` the gateway does, in every
//! round, what a compromised DAP would try: it alters the first response it
//! relays (one bit of the ciphertext; the member's tag is kept, since the
//! gateway cannot compute a new one) and invents a response on behalf of
//! `<member-id>`, a member that never answered. Both go upstream through
//! the ordinary path, chunk aggregates included, and the gateway answers the
//! UDC's tag requests from what it holds, like an honest one.
//!
//! This grants nothing a compromised gateway does not already have (the
//! gateway holds no key), which is exactly the point: `dapgw demo` turns it
//! on to show the UDC localizing and rejecting those two entries while every
//! honest member passes. Off by default; the gateway logs a warning at start
//! when it is on.

use std::collections::HashSet;
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};

use crate::protocol::wire::{MemberId, Response};

/// The value `DAPGW_MISBEHAVE` takes: `tamper:<member-id>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MisbehaveSpec {
    /// The member a response is invented for.
    pub invent: MemberId,
}

impl MisbehaveSpec {
    /// Parses `tamper:<member-id>`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let id = s
            .strip_prefix("tamper:")
            .ok_or_else(|| "expected tamper:<member-id>".to_string())?;
        let id: u64 = id
            .parse()
            .map_err(|_| format!("`{id}` is not a member id (an unsigned 64-bit integer)"))?;
        Ok(Self {
            invent: MemberId(id),
        })
    }
}

/// The tampering state: which rounds were already tampered with.
#[derive(Debug)]
pub(crate) struct Misbehave {
    spec: MisbehaveSpec,
    done: Mutex<HashSet<(u32, u64)>>,
}

impl Misbehave {
    pub(crate) fn new(spec: MisbehaveSpec) -> Self {
        Self {
            spec,
            done: Mutex::new(HashSet::new()),
        }
    }

    /// For the first response relayed in its round (other than one from the
    /// invented member): that response altered, and a response invented
    /// for the configured member. `None` for every other message.
    pub(crate) fn tamper(&self, r: &Response) -> Option<(Response, Response)> {
        if r.id == self.spec.invent {
            return None;
        }
        let first = self
            .done
            .lock()
            .map(|mut d| d.insert((r.group.0, r.round)))
            .unwrap_or(false);
        if !first {
            return None;
        }
        // Alter what the tag covers: the ciphertext, or for an empty
        // payload (an auth round in psk mode) the member's nonce.
        let mut altered = r.clone();
        if r.c.is_empty() {
            altered.n_i[15] ^= 1;
        } else {
            altered.c = flip_last_bit(&r.c);
        }
        // A plausible forgery: same shape as a real response, fresh-looking
        // nonce and ciphertext, a tag the gateway has no key to compute.
        let mut invented = r.clone();
        invented.id = self.spec.invent;
        invented.n_i = r.n_i.map(|b| b ^ 0xa5);
        invented.c = Bytes::from(r.c.iter().map(|b| b ^ 0x5a).collect::<Vec<u8>>());
        invented.tag = r.tag.map(|b| b ^ 0x3c);
        Some((altered, invented))
    }
}

fn flip_last_bit(c: &Bytes) -> Bytes {
    let mut b = BytesMut::from(&c[..]);
    if let Some(last) = b.last_mut() {
        *last ^= 1;
    }
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::wire::GroupId;

    fn response(id: u64, round: u64) -> Response {
        Response {
            id: MemberId(id),
            kv: 1,
            group: GroupId(7),
            round,
            n_i: [1; 16],
            e_i: None,
            c: Bytes::from_static(b"ciphertext"),
            tag: [2; 16],
        }
    }

    #[test]
    fn spec_parses_and_refuses_junk() {
        assert_eq!(
            MisbehaveSpec::parse("tamper:42"),
            Ok(MisbehaveSpec {
                invent: MemberId(42)
            })
        );
        assert!(MisbehaveSpec::parse("tamper:").is_err());
        assert!(MisbehaveSpec::parse("tamper:-1").is_err());
        assert!(MisbehaveSpec::parse("42").is_err());
    }

    #[test]
    fn tampers_once_per_round_keeping_the_tag() {
        let m = Misbehave::new(MisbehaveSpec::parse("tamper:99").unwrap());
        let r = response(5, 1);
        let (altered, invented) = m.tamper(&r).expect("first response of round 1");
        assert_eq!(altered.id, r.id);
        assert_eq!(altered.tag, r.tag, "the gateway cannot recompute a tag");
        assert_ne!(altered.c, r.c);
        assert_eq!(altered.c.len(), r.c.len());
        let empty = Response {
            c: Bytes::new(),
            ..response(8, 4)
        };
        let (altered, _) = m.tamper(&empty).expect("an empty payload is tampered too");
        assert_ne!(altered.n_i, empty.n_i, "then the nonce is altered");
        assert_eq!(invented.id, MemberId(99));
        assert_eq!((invented.group, invented.round), (r.group, r.round));
        assert!(m.tamper(&response(6, 1)).is_none(), "once per round");
        assert!(
            m.tamper(&response(6, 2)).is_some(),
            "again in the next round"
        );
        assert!(
            m.tamper(&response(99, 3)).is_none(),
            "never the invented id"
        );
    }
}
