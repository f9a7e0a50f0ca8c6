//! Shared helpers of the integration tests: the real daemon process ([`daemon`]), the real
//! peers it talks to ([`peers`]) and what tests do with them ([`mail`], [`oauth`]), and the one
//! way a test waits for a condition ([`wait`]); fake HTTPS APIs are served by [`https`], webhooks received by [`webhook`], the Python client built by [`python`].
pub mod daemon;
pub mod https;
pub mod mail;
pub mod oauth;
pub mod peers;
pub mod postgres;
pub mod python;
pub mod wait;
pub mod webhook;
