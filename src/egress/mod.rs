//! Egress of `egress` sessions (temporary module root; merged with the rules).

pub mod proxy;
pub mod sniff;
