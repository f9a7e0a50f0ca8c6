//! The gRPC services. Each handler is one call of [`Services::handle`] (see [`call`]), which
//! names the caller, applies the rate limit, admits the caller per the RPC's row in [`rpc`],
//! audits the outcome (the reply waits for it), counts it and tags the reply, success or
//! error, with its `x-request-id`. Handlers only map the request to the domain and back;
//! domain errors become statuses in [`status`].

mod admin;
mod broker;
mod calendar;
mod call;
mod convert;
pub mod gate;
mod redact;
mod rpc;
mod status;
mod through;

pub use call::Call;
pub use rpc::{Access, Effect, Rpc, SETTINGS_REQUEST_BYTES};
pub use status::{ApiError, Reason};

use std::sync::Arc;

use crate::audit::AuditLog;
use crate::config::Limits;
use crate::connect::Connect;
use crate::model::Registry;
use crate::oauth::OAuth;
use crate::policy::{Caller, PolicyHandle};
use crate::resolve::Resolver;

/// The generated protobuf and gRPC code of `proto/credbroker/v1`.
pub mod proto {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("credbroker.v1");

    /// For gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("credbroker_descriptor");
}

/// What the TLS layer learned about the peer, attached to every request of the connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub caller: Caller,
    pub remote: Option<std::net::SocketAddr>,
}

/// Everything the handlers need, shared by both services.
pub struct Services {
    pub registry: Arc<Registry>,
    pub audit: Arc<AuditLog>,
    pub policy: Arc<PolicyHandle>,
    pub resolver: Resolver,
    pub proxy: crate::proxy::Proxy,
    pub connect: Connect,
    pub mail: Arc<crate::mail::Mail>,
    pub oauth: Arc<OAuth>,
    pub rate: crate::policy::Budgets,
    pub limits: Limits,
    /// Refusals of unauthenticated callers (handshakes, OAuth callbacks), summarised.
    pub refusals: Arc<crate::refusals::Refusals>,
    /// OAuth callbacks one source address may send, per second.
    pub callback_rate: crate::policy::RateLimiter,
    /// Free space on the store's disk.
    pub disk: Arc<crate::disk::DiskWatch>,
}

pub use admin::AdminApi;
pub use broker::BrokerApi;
