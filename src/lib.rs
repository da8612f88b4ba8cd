//! hands: the self-hosted hands of an AI agent.
//!
//! Data flows one way: [`connectors`] → [`session`] (the one call pipeline,
//! `Session::submit`) → [`sandbox`] → [`tools`], results back up the same
//! path, every call recorded in the [`audit`] log. Connectors share outbound
//! networking ([`net`]) and reach sessions only through the registry; the
//! tools know nothing of the sandbox. The crate's only `unsafe` lives in
//! [`sandbox::sys`].
#![deny(unsafe_code)]

pub mod audit;
pub mod cli;
pub mod configfile;
pub mod conformance;
pub mod connectors;
pub mod egress;
pub mod gateway;
pub mod net;
pub mod pki;
pub mod policy;
pub mod proto;
pub mod sandbox;
pub mod session;
pub mod tools;
pub mod util;
pub mod worker;
pub mod workspace;
