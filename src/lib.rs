//! credbroker: a hardened credential broker. It keeps every third-party secret of an agent
//! platform in an encrypted store and serves a narrow gRPC API over mutual TLS, so that callers
//! never handle refresh tokens, client secrets or passwords.
//!
//! Layers, bottom up (DESIGN.md §3): [`vault`] (keys and envelopes) → [`store`] (durable,
//! encrypted records) → [`model`] (connectors and connections).

pub mod audit;
pub mod model;
pub mod pki;
pub mod policy;
pub mod store;
pub mod tls;
pub mod vault;
