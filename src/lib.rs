//! hands: the self-hosted hands of an AI agent.
//!
//! Data flows one way: connector → sessions → sandbox → tools, results back up
//! the same path. The crate's only `unsafe` lives in [`sandbox::sys`].
#![deny(unsafe_code)]

pub mod audit;
pub mod cli;
pub mod cma;
pub mod configfile;
pub mod conformance;
pub mod gateway;
pub mod pki;
pub mod policy;
pub mod proto;
pub mod sandbox;
pub mod service;
pub mod session;
pub mod tls;
pub mod tools;
pub mod tunnel;
pub mod util;
pub mod worker;
pub mod workspace;
