//! The ways brains reach sessions, side by side. Each connector turns its own
//! protocol into sessions of the registry (`crate::session::registry`) and calls
//! through the one call pipeline (`Session::submit`); none reaches into the
//! sandbox or the session helper's wire.
//!
//! - [`hands_v1`]: the `hands.v1.Sandbox` gRPC service, served on the worker's
//!   outbound tunnel to a gateway (the worker dials, then serves) and on the
//!   loopback debug listener;
//! - [`cma`]: Claude Managed Agents' environment-worker contract: the worker
//!   polls the work queue, leases items, follows each session's event stream
//!   and posts results;
//! - [`mcp`]: the Model Context Protocol, the six tools as an MCP server for
//!   agents that speak it (`hands mcp` over stdio).
//!
//! Outbound networking they share (TLS configurations, the CONNECT-proxy
//! dial) is `crate::net`.

pub mod cma;
pub mod hands_v1;
pub mod mcp;
