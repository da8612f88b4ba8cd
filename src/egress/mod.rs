//! Egress networking of a session in the `egress` network mode: the services
//! the worker offers inside a session's own network namespace. [`dns`] is the
//! session resolver, which answers only the names the environment's policy
//! allows and never forwards any other name upstream.

pub mod dns;
