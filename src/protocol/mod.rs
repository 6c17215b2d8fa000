//! The sans-IO protocol core: everything a meter, a gateway or a UDC needs to
//! speak dapgw version 1, with no I/O, no clock reads and no async runtime.

pub mod codec;
pub mod keys;
pub mod suite;
pub mod verifier;
pub mod wire;
