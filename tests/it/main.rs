//! The integration suite: one binary, run as root on a kernel with landlock,
//! seccomp, cgroups and namespaces. Under `CI=true` a missing kernel feature is a
//! failure, never a skip.

mod audit;
mod cli;
mod cma;
mod cma_differential;
mod conformance;
mod daemon;
mod differential;
mod egress;
mod escapes;
mod isolation;
mod limits;
mod mcp;
mod mcp_conformance;
mod metrics;
mod netpeer;
mod pki;
mod service;
mod sessions;
mod tunnel;
mod util;
mod worker;
