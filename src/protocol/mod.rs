//! The sans-IO protocol core: everything a meter, a gateway or a UDC needs to
//! speak dapgw version 1, with no I/O, no clock reads and no async runtime.

/// Most distinct groups one gateway subscribes to (one `PUT
/// /v1/subscriptions` may name): the UDC refuses a longer list, and the
/// gateway refuses an attach that would take its subscription past it
/// (docs/udc.md, docs/gateway.md). A substation's gateway serves a handful.
pub const MAX_SUBSCRIBED_GROUPS: usize = 4096;

pub mod aggregator;
pub mod codec;
pub mod keys;
pub mod member;
pub mod suite;
pub mod verifier;
pub mod wire;
