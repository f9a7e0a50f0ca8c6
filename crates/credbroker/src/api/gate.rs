//! What a gRPC request must pass before its body is read: a tower layer in front of the
//! Broker and Admin services ([`GateLayer`]).
//!
//! Invariants, for every request whose path is a row of the RPC table ([`Rpc`]):
//! - the caller's rate limit and the coarse policy check ([`Services::admit`]: is the caller
//!   granted this RPC's operation anywhere, or admin of some workspace) run on the headers
//!   alone; a refused caller gets its status without one byte of its body being read;
//! - the body is read through [`Limited`], which refuses with RESOURCE_EXHAUSTED as soon as the
//!   message's length prefix, or the bytes received, pass the RPC's own bound
//!   ([`Rpc::max_request_bytes`]): at most one HTTP/2 frame past the bound is ever buffered;
//! - a message larger than [`SMALL_REQUEST_BYTES`] is read only while the broker-wide budget
//!   of large request bytes in flight has room for its declared length (held until its body
//!   is dropped, once decoded); past it the request is refused with RESOURCE_EXHAUSTED, so
//!   admitted callers together cannot make the daemon buffer more than the budget;
//! - an admitted request carries [`Admitted`], so the combinator does not charge the rate
//!   limit a second time.
//!
//! Other paths (health, reflection) pass untouched, under tonic's own per-service limit.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use hyper::body::{Body as HttpBody, Bytes, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;
use tonic::body::Body;

use super::rpc::SMALL_REQUEST_BYTES;
use super::{PeerInfo, Rpc, Services};

/// The 5-byte gRPC message prefix: a compression flag and a big-endian length.
const PREFIX: usize = 5;

/// Marks a request the gate admitted (rate limit charged, coarse policy passed).
#[derive(Debug, Clone, Copy)]
pub struct Admitted;

/// The large request bytes in flight, in KiB permits.
#[derive(Clone)]
pub struct Budget {
    kib: Arc<Semaphore>,
    bytes: usize,
}

impl Budget {
    pub fn new(bytes: usize) -> Self {
        let kib = (bytes / 1024).clamp(1, Semaphore::MAX_PERMITS);
        Self {
            kib: Arc::new(Semaphore::new(kib)),
            bytes,
        }
    }

    /// Room for a message of `length` bytes, or the refusal.
    fn take(&self, rpc: Rpc, length: usize) -> Result<OwnedSemaphorePermit, Status> {
        let kib = u32::try_from(length.div_ceil(1024)).unwrap_or(u32::MAX);
        self.kib.clone().try_acquire_many_owned(kib).map_err(|_| {
            crate::metrics::rpc(rpc, tonic::Code::ResourceExhausted, Default::default());
            Status::resource_exhausted(format!(
                "large requests in flight fill the broker's budget of {} bytes; retry later",
                self.bytes
            ))
        })
    }
}

/// Puts [`Gate`] in front of a service.
#[derive(Clone)]
pub struct GateLayer {
    services: Arc<Services>,
    budget: Budget,
}

impl GateLayer {
    /// `budget`: the large request bytes all callers together may have in flight.
    pub fn new(services: Arc<Services>, budget: usize) -> Self {
        Self {
            services,
            budget: Budget::new(budget),
        }
    }
}

impl<S> tower::Layer<S> for GateLayer {
    type Service = Gate<S>;
    fn layer(&self, inner: S) -> Gate<S> {
        Gate {
            inner,
            services: self.services.clone(),
            budget: self.budget.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Gate<S> {
    inner: S,
    services: Arc<Services>,
    budget: Budget,
}

impl<S> tower::Service<http::Request<Body>> for Gate<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let Some(rpc) = Rpc::from_path(request.uri().path()) else {
            return Box::pin(self.inner.call(request));
        };
        // The ready service takes this request; its clone waits for the next one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (services, budget) = (self.services.clone(), self.budget.clone());
        Box::pin(async move {
            let peer = request.extensions().get::<PeerInfo>().cloned();
            if let Err(status) = services.admit(rpc, peer.as_ref()).await {
                return Ok(status.into_http());
            }
            let limit = rpc.max_request_bytes(services.limits.max_request_bytes);
            if let Some(status) = declared_too_large(&request, rpc, limit) {
                return Ok(status.into_http());
            }
            let limited = |body| Body::new(Limited::new(body, rpc, limit, budget));
            let mut request = request.map(limited);
            request.extensions_mut().insert(Admitted);
            inner.call(request).await
        })
    }
}

fn too_large(rpc: Rpc, size: impl std::fmt::Display, limit: usize) -> Status {
    crate::metrics::rpc(
        rpc,
        tonic::Code::ResourceExhausted,
        std::time::Duration::ZERO,
    );
    Status::resource_exhausted(format!(
        "{} accepts requests of at most {limit} bytes; this one is {size}",
        rpc.method()
    ))
}

/// A `content-length` header (gRPC clients rarely send one) past the RPC's bound.
fn declared_too_large(request: &http::Request<Body>, rpc: Rpc, limit: usize) -> Option<Status> {
    let length: usize = request
        .headers()
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    (length > limit + PREFIX).then(|| too_large(rpc, format!("{length} bytes"), limit))
}

/// A request body that fails once its message says, or its bytes show, that it is larger
/// than `limit`.
pub struct Limited {
    inner: Body,
    rpc: Rpc,
    limit: usize,
    /// Bytes received so far.
    seen: usize,
    /// The first bytes, until the prefix is complete.
    prefix: Vec<u8>,
    budget: Budget,
    /// A large message's share of the budget, held while its body is read.
    _room: Option<OwnedSemaphorePermit>,
}

impl Limited {
    fn new(inner: Body, rpc: Rpc, limit: usize, budget: Budget) -> Self {
        Self {
            inner,
            rpc,
            limit,
            seen: 0,
            prefix: Vec::with_capacity(PREFIX),
            budget,
            _room: None,
        }
    }

    /// Counts `data`; the refusal if the request is now known to be too large.
    fn check(&mut self, data: &[u8]) -> Result<(), Status> {
        if self.prefix.len() < PREFIX {
            let take = (PREFIX - self.prefix.len()).min(data.len());
            self.prefix.extend_from_slice(&data[..take]);
            if self.prefix.len() == PREFIX {
                let length = u32::from_be_bytes(self.prefix[1..].try_into().expect("4 bytes"));
                let length = length as usize;
                if length > self.limit {
                    return Err(too_large(self.rpc, format!("{length} bytes"), self.limit));
                }
                if length > SMALL_REQUEST_BYTES {
                    self._room = Some(self.budget.take(self.rpc, length)?);
                }
            }
        }
        self.seen = self.seen.saturating_add(data.len());
        if self.seen > self.limit + PREFIX {
            return Err(too_large(
                self.rpc,
                format!("over {} bytes", self.limit),
                self.limit,
            ));
        }
        Ok(())
    }
}

impl HttpBody for Limited {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(frame)) = &frame
            && let Some(data) = frame.data_ref()
            && let Err(status) = self.check(data)
        {
            tracing::info!(
                rpc = self.rpc.method(),
                limit = self.limit,
                "request too large: refused"
            );
            return Poll::Ready(Some(Err(status)));
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(length: u32) -> Vec<u8> {
        let mut m = vec![0u8];
        m.extend_from_slice(&length.to_be_bytes());
        m
    }

    fn limited(rpc: Rpc, limit: usize, budget: &Budget) -> Limited {
        Limited::new(Body::empty(), rpc, limit, budget.clone())
    }

    #[test]
    fn the_prefix_refuses_before_the_body_arrives() {
        let mut body = limited(Rpc::ResolveCredential, 100, &Budget::new(1 << 20));
        // The prefix split over two frames, declaring 101 bytes.
        let prefix = message(101);
        assert!(body.check(&prefix[..2]).is_ok());
        let refused = body.check(&prefix[2..]).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused.message().contains("ResolveCredential"),
            "{refused:?}"
        );
    }

    #[test]
    fn bytes_past_the_bound_are_refused_whatever_the_prefix_says() {
        let mut body = limited(Rpc::ResolveCredential, 100, &Budget::new(1 << 20));
        assert!(body.check(&message(100)).is_ok());
        assert!(body.check(&[0; 100]).is_ok());
        assert!(body.check(&[0]).is_err());
    }

    #[test]
    fn large_messages_wait_for_room_in_the_budget() {
        let budget = Budget::new(3 << 20);
        let large = 1 << 20;
        let mut held: Vec<Limited> = (0..3)
            .map(|_| limited(Rpc::SendEmail, 4 << 20, &budget))
            .collect();
        for body in &mut held {
            assert!(body.check(&message(large)).is_ok());
        }
        // A fourth megabyte does not fit; a small message needs no room.
        let mut fourth = limited(Rpc::SendEmail, 4 << 20, &budget);
        let refused = fourth.check(&message(large)).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            limited(Rpc::SendEmail, 4 << 20, &budget)
                .check(&message(100))
                .is_ok()
        );
        // Room comes back when a body is dropped.
        held.pop();
        let mut fifth = limited(Rpc::SendEmail, 4 << 20, &budget);
        assert!(fifth.check(&message(large)).is_ok());
    }
}
