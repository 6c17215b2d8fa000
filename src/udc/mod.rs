//! The UDC (utility data center): the verifier's home. Gateways post batches
//! here, the sans-IO verifier (`protocol::verifier`) decides, and [`store`]
//! persists what it decided so that several UDC processes can share one
//! registry, one round state and one downlink queue.

pub mod store;
