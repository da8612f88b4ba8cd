//! The Claude Managed Agents connector: hands as the environment worker of a
//! `self_hosted` environment (the contract as hands implements it:
//! `docs/claude-managed-agents.md`; the `§` numbers in this module's comments are
//! those of the official SDK worker's contract it was written from).
//! It polls the environment's work queue, holds each item's lease, follows
//! the session's event stream and runs every `agent.tool_use` of the six tools
//! in that item's own sandbox session.
//!
//! Modules: the poll loop and item flow ([`worker`]), the tool runner
//! ([`runner`]), the lease arithmetic ([`lease`]), the API client with the
//! contract's retry classes ([`http`]), the event-stream framing ([`sse`]),
//! the credentials ([`secret`]), skills ([`skills`]), memory stores
//! ([`memory`]) and anchored host-side file access in the workspace
//! ([`beneath`]).

pub mod beneath;
pub mod config;
pub mod http;
pub mod lease;
pub mod memory;
pub mod runner;
pub mod secret;
pub mod skills;
pub mod sse;
pub mod worker;
