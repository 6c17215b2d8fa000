//! The gateway (DAP): member-facing server -> collectors/batcher -> spool ->
//! upstream client, and the downlink relay back to members.
//!
//! The gateway holds no keys. Everything it keeps is opaque bytes plus the
//! routing fields needed to batch them and to relay answers, stored in the
//! [`spool`] until the UDC has answered for them.

pub mod spool;
