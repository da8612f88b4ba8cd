//! The Claude Managed Agents connector: hands as the environment worker of a
//! `self_hosted` environment (contract: `anthropic-environment-worker.md`).
//! It polls the environment's work queue, holds each item's lease, follows
//! the session's event stream and runs every `agent.tool_use` of the six tools
//! in that item's own sandbox session.
//!
//! Built so far: the event-stream framing ([`sse`]) and the credentials
//! ([`secret`]). The worker loop, the lease, the tool runner, skills and
//! memory stores come next.

pub mod http;
pub mod secret;
pub mod sse;
