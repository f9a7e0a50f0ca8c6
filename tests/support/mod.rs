//! Shared helpers of the integration tests: the real daemon process ([`daemon`]).
pub mod daemon;
