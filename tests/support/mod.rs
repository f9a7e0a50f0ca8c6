//! Shared helpers of the integration tests: the real daemon process ([`daemon`]) and the real
//! peers it talks to ([`peers`]).
pub mod daemon;
pub mod oauth;
pub mod peers;
