//! dapgw: group authentication for smart-metering networks through a gateway
//! that cannot cheat.
//!
//! ```text
//! member --seal--> gateway --aggregate--> udc --verify
//!   ^                                      |
//!   +------- confirm / rekey / group ------+
//! ```
//!
//! - [`protocol`] is the sans-IO core (wire codec, suite 1, member,
//!   aggregator, verifier). It has no sockets, no clock and no async runtime,
//!   and builds alone with `--no-default-features`.
//! - `gateway`, `udc` and `sim` (feature `service`) drive it over HTTPS.
#![warn(missing_docs, unreachable_pub)]
#![forbid(unsafe_code)]

#[cfg(feature = "service")]
pub mod gateway;
pub mod protocol;

#[cfg(feature = "service")]
pub mod admin;
#[cfg(feature = "service")]
pub mod config;
#[cfg(feature = "service")]
pub mod demo;
#[cfg(feature = "service")]
mod limits;
#[cfg(feature = "service")]
pub mod sim;
#[cfg(feature = "service")]
pub mod telemetry;
#[cfg(feature = "service")]
pub mod tls;
#[cfg(feature = "service")]
pub mod udc;
