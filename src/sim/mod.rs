//! Simulated members and the side-by-side benchmark (feature `service`).

pub mod bench;
