//! The data plane.
pub mod sniff;
