//! credbroker: a hardened credential broker. It keeps every third-party secret of an agent
//! platform in an encrypted store and serves a narrow gRPC API over mutual TLS, so that callers
//! never handle refresh tokens, client secrets or passwords.
//!
//! Layers, bottom up (DESIGN.md §3): [`vault`] (keys and envelopes) → [`store`] (durable,
//! encrypted records) → [`model`] (connectors and connections) → [`driver`] (what each connector
//! kind does, and the credentials service) → [`oauth`], [`mail`], [`calendar`], [`connect`] →
//! the use cases ([`resolve`], [`proxy`]) and the API.

pub mod api;
pub mod audit;
pub mod calendar;
pub mod client;
pub mod config;
pub mod connect;
pub mod disk;
pub mod driver;
pub mod events;
pub mod http;
pub mod intent;
pub mod mail;
pub mod metrics;
pub mod model;
pub mod oauth;
pub mod policy;
pub mod proxy;
pub mod refusals;
pub mod resolve;
pub mod server;
pub mod store;
pub mod systemd;
pub mod tls;
pub mod upstream;
pub mod vault;

#[cfg(test)]
mod robustness;
