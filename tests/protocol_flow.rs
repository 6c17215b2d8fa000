//! The whole protocol in memory: members, the aggregator (gateway) and the
//! verifier on a virtual clock, honest everywhere.

mod common;

use common::*;
use dapgw::protocol::wire::{Mode, Purpose};

#[test]
fn smoke() {
    let mut w = World::with_members(2, &[1], 1..=5);
    let (acc, _) = w.full_round(1, Mode::Psk, Purpose::Auth, &[1, 2, 3, 4, 5]);
    assert_eq!(acc, vec![1, 2, 3, 4, 5]);
}
