//! The hands.v1 connector: the `hands.v1.Sandbox` gRPC service
//! (proto/hands/v1/sandbox.proto) over the session registry, and the two ways
//! a brain reaches it — the worker's outbound mTLS [`tunnel`] to a gateway,
//! and the loopback debug [`listener`].

pub mod listener;
pub mod service;
pub mod tunnel;

pub use service::{detect_isolation, status, SandboxService, MAX_MESSAGE, REASON};
