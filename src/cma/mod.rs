//! The Claude Managed Agents connector: hands as the environment worker of a
//! `self_hosted` environment (contract: `anthropic-environment-worker.md`).
//! It polls the environment's work queue, holds each item's lease, follows
//! the session's event stream and runs every `agent.tool_use` of the six tools
//! in that item's own sandbox session.
//!
//! Built so far: the event-stream framing ([`sse`]), the credentials
//! ([`secret`]), the API client with the contract's retry classes ([`http`])
//! and the lease arithmetic ([`lease`]). The poll loop, the tool runner,
//! skills and memory stores come next.

pub mod config;
pub mod http;
pub mod lease;
pub mod runner;
pub mod secret;
pub mod sse;
pub mod worker;
