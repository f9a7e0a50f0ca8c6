//! Assembles and runs the daemon: opens the store, starts the audit writer, loads the policy,
//! and serves gRPC over mutual TLS (plus health and reflection) and the HTTPS listener.
//!
//! The TLS handshake happens here, not in tonic, so that the caller's identity is taken from
//! the verified certificate once per connection and attached to every request on it
//! ([`PeerInfo`]), and so that refused handshakes are audited like any other refusal.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use crate::api::proto::{admin_server::AdminServer, broker_server::BrokerServer};
use crate::api::{AdminApi, BrokerApi, PeerInfo, Services};
use crate::audit::AuditLog;
use crate::config::Config;
use crate::connect::Connect;
use crate::model::Registry;
use crate::oauth::OAuth;
use crate::policy::{PolicyHandle, RateLimiter, caller_from_cert};
use crate::refusals::Refusals;
use crate::resolve::Resolver;
use crate::store::Store;
use crate::vault::KeySource;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error(transparent)]
    Webhook(#[from] crate::events::WebhookError),
    #[error("[http] metrics_token_file {path}: {why}")]
    MetricsToken { path: String, why: String },
}

/// The bearer token `/metrics` requires, read from `[http] metrics_token_file`.
fn metrics_token(config: &Config) -> Result<Option<String>, ServeError> {
    let Some(path) = &config.http.metrics_token_file else {
        return Ok(None);
    };
    let invalid = |why: String| ServeError::MetricsToken {
        path: path.display().to_string(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| invalid(e.to_string()))?;
    let token = text.trim();
    if token.len() < 16 {
        return Err(invalid("the token must be at least 16 characters".into()));
    }
    Ok(Some(token.to_string()))
}

/// Where the daemon ended up listening (ports chosen by the OS when configured as 0).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub grpc: SocketAddr,
    pub http: Option<SocketAddr>,
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, ServeError> {
    std::fs::read(path).map_err(|e| ServeError::Tls(format!("{}: {e}", path.display())))
}

fn certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, ServeError> {
    let pem = read(path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ServeError::Tls(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(ServeError::Tls(format!(
            "{}: no certificate found",
            path.display()
        )));
    }
    Ok(certs)
}

fn private_key(path: &std::path::Path) -> Result<PrivateKeyDer<'static>, ServeError> {
    let pem = read(path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| ServeError::Tls(format!("{}: {e}", path.display())))?
        .ok_or_else(|| ServeError::Tls(format!("{}: no private key found", path.display())))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn versions(allow_tls12: bool) -> &'static [&'static rustls::SupportedProtocolVersion] {
    static TLS13_ONLY: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
    if allow_tls12 {
        rustls::ALL_VERSIONS
    } else {
        &TLS13_ONLY
    }
}

/// The gRPC listener's TLS: client certificates required, chained to the client CA, checked
/// against the CRLs; TLS 1.3 unless 1.2 is allowed.
fn grpc_tls(config: &Config) -> Result<rustls::ServerConfig, ServeError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs(&config.grpc.client_ca)? {
        roots
            .add(cert)
            .map_err(|e| ServeError::Tls(format!("client CA: {e}")))?;
    }
    let mut crls = Vec::new();
    for path in &config.grpc.crl {
        let pem = read(path)?;
        for crl in rustls_pemfile::crls(&mut pem.as_slice()) {
            crls.push(crl.map_err(|e| ServeError::Tls(format!("{}: {e}", path.display())))?);
        }
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .with_crls(crls)
        .build()
        .map_err(|e| ServeError::Tls(format!("client verifier: {e}")))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions(config.grpc.allow_tls12))
        .map_err(|e| ServeError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&config.grpc.cert)?, private_key(&config.grpc.key)?)
        .map_err(|e| ServeError::Tls(format!("server certificate: {e}")))?;
    tls.alpn_protocols = vec![b"h2".to_vec()];
    Ok(tls)
}

/// The HTTPS listener's TLS: same server certificate, no client certificate; TLS 1.3 unless
/// `[http] allow_tls12`.
fn http_tls(config: &Config) -> Result<rustls::ServerConfig, ServeError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions(config.http.allow_tls12))
        .map_err(|e| ServeError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs(&config.grpc.cert)?, private_key(&config.grpc.key)?)
        .map_err(|e| ServeError::Tls(format!("server certificate: {e}")))?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tls)
}

/// The gRPC connections held, per remote address and in all. A connection past either cap is
/// closed as soon as it is accepted, before its handshake, so one peer cannot take the
/// descriptors every other caller needs.
struct Slots {
    per_peer: usize,
    total: usize,
    /// Remote address → connections held; the sum of its values is the total.
    held: std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>,
}

/// One connection's place in [`Slots`], given back when the connection is dropped.
struct Slot {
    slots: Arc<Slots>,
    ip: IpAddr,
}

impl Slots {
    fn new(config: &crate::config::GrpcConfig) -> Arc<Self> {
        Arc::new(Self {
            per_peer: config.max_connections_per_peer.max(1),
            total: config.max_connections.max(1),
            held: Default::default(),
        })
    }

    /// A place for a connection from `ip`, or why there is none.
    fn take(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, String> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let total: usize = held.values().sum();
        let mine = held.get(&ip).copied().unwrap_or(0);
        if mine >= self.per_peer {
            return Err(format!(
                "{} gRPC connections from this address already open; closed at accept",
                self.per_peer
            ));
        }
        if total >= self.total {
            return Err(format!(
                "{} gRPC connections already open; closed at accept",
                self.total
            ));
        }
        held.insert(ip, mine + 1);
        Ok(Slot {
            slots: self.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.slots.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.ip);
            }
        }
    }
}

/// A verified mTLS connection, carrying its caller to every request (tonic puts
/// `connect_info()` into each request's extensions).
struct TlsConnection {
    stream: TlsStream<TcpStream>,
    peer: PeerInfo,
    /// Held for as long as the connection is open.
    _slot: Slot,
}

impl Connected for TlsConnection {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accepts TCP connections and completes each TLS handshake on its own task, so a slow
/// client cannot hold up others. Refusals are audited through [`Refusals`] (a flood of them
/// is summarised, not written one by one).
async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    (slots, refusals): (Arc<Slots>, Arc<Refusals>),
    out: tokio::sync::mpsc::Sender<Result<TlsConnection, std::io::Error>>,
) {
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let slot = match slots.take(remote.ip()) {
            Ok(slot) => slot,
            Err(why) => {
                drop(tcp);
                tracing::info!(%remote, "{why}");
                let refusals = refusals.clone();
                tokio::spawn(async move {
                    let label = crate::audit::label::TLS_HANDSHAKE;
                    refusals.refuse(label, remote.ip(), why).await
                });
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, refusals, out) = (acceptor.clone(), refusals.clone(), out.clone());
        tokio::spawn(handshake(tcp, remote, slot, (acceptor, refusals), out));
    }
}

/// Completes one connection's TLS handshake and hands it, with its caller, to the server;
/// a refused handshake is audited through [`Refusals`].
async fn handshake(
    tcp: TcpStream,
    remote: SocketAddr,
    slot: Slot,
    (acceptor, refusals): (TlsAcceptor, Arc<Refusals>),
    out: tokio::sync::mpsc::Sender<Result<TlsConnection, std::io::Error>>,
) {
    let refuse =
        |reason: String| refusals.refuse(crate::audit::label::TLS_HANDSHAKE, remote.ip(), reason);
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::info!(%remote, error = %e, "TLS handshake refused");
            refuse(e.to_string()).await;
            return;
        }
        Err(_) => {
            refuse("TLS handshake timed out".into()).await;
            return;
        }
    };
    let leaf = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first());
    let caller = match leaf.map(|der| caller_from_cert(der)) {
        Some(Ok(caller)) => caller,
        Some(Err(e)) => {
            refuse(e.to_string()).await;
            return;
        }
        None => {
            refuse("no client certificate".into()).await;
            return;
        }
    };
    let _ = out
        .send(Ok(TlsConnection {
            stream,
            peer: PeerInfo {
                caller,
                remote: Some(remote),
            },
            _slot: slot,
        }))
        .await;
}

/// Opens everything else the configuration names over `store` and builds the shared services.
/// The audit log gets its own handle on the store; every other service goes through the
/// registry.
pub async fn open_services(
    config: &Config,
    store: Arc<Store>,
) -> Result<Arc<Services>, ServeError> {
    let policy = Arc::new(PolicyHandle::load(&config.policy.file)?);
    let audit = Arc::new(
        AuditLog::start(
            store.clone(),
            crate::audit::LogSettings::from_config(config),
        )
        .await?,
    );
    let refusals = Refusals::start(audit.clone());
    let registry = Arc::new(Registry::new(store, &crate::driver::DRIVERS));
    crate::events::start(config, registry.events()).await?;
    let timeout = config.upstream_timeout();
    let callback = format!(
        "{}/oauth/callback",
        config
            .http
            .public_url
            .clone()
            .unwrap_or_default()
            .trim_end_matches('/')
    );
    // Checked when the configuration was loaded; were it not, no return URL is accepted.
    let origins = config.http.return_origins().unwrap_or_default();
    let oauth =
        Arc::new(OAuth::new(registry.clone(), callback, timeout).with_return_origins(origins));
    oauth.start_state_sweep();
    let mail = Arc::new(crate::mail::Mail::new(
        registry.clone(),
        oauth.clone(),
        timeout,
        config.limits.max_watch_streams,
        // Checked when the configuration was loaded.
        config.limits.mail_caps().unwrap_or_default(),
    ));
    Ok(Arc::new(Services {
        resolver: Resolver::new(registry.clone(), oauth.clone()),
        proxy: crate::proxy::Proxy::new(
            crate::driver::Credentials::new(registry.clone(), oauth.clone()),
            timeout,
            crate::proxy::CallLimits {
                request_bytes: config.limits.max_call_request_bytes,
                response_bytes: config.limits.max_call_response_bytes,
                stream_bytes: config.limits.max_call_stream_bytes,
                stream_time: Duration::from_secs(config.limits.call_stream_timeout_secs.max(1)),
            },
        ),
        connect: Connect::new(
            crate::driver::Credentials::new(registry.clone(), oauth.clone()),
            timeout,
        ),
        mail,
        registry,
        audit,
        policy,
        oauth,
        rate: crate::policy::Budgets::new(
            RateLimiter::new(
                config.limits.caller_rate_per_sec,
                config.limits.caller_burst,
            ),
            RateLimiter::new(config.limits.user_rate_per_sec, config.limits.user_burst),
        ),
        limits: config.limits.clone(),
        refusals,
        disk: crate::disk::DiskWatch::start(
            config.store.path.clone(),
            config.limits.free_disk_warn_bytes,
        ),
        callback_rate: RateLimiter::new(CALLBACK_RATE_PER_SOURCE, 2.0 * CALLBACK_RATE_PER_SOURCE),
    }))
}

/// OAuth callbacks per second one source address may send (a browser sends one per consent).
const CALLBACK_RATE_PER_SOURCE: f64 = 10.0;

/// How long a stopping daemon waits for in-flight calls before it exits.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Binds `addr`, returning the listener and the address it got (port 0 picks one).
async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), ServeError> {
    let listen = |source| ServeError::Listen { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(listen)?;
    let bound = listener.local_addr().map_err(listen)?;
    Ok((listener, bound))
}

/// Starts the HTTPS listener (OAuth callback, probes, metrics) when one is configured.
async fn start_http(
    config: &Config,
    services: &Arc<Services>,
) -> Result<Option<SocketAddr>, ServeError> {
    let Some(addr) = config.http.listen else {
        return Ok(None);
    };
    let (listener, bound) = bind(addr).await?;
    let acceptor = TlsAcceptor::from(Arc::new(http_tls(config)?));
    tokio::spawn(crate::http::serve(
        listener,
        acceptor,
        crate::http::ConnectionLimits::from(&config.http),
        services.clone(),
        metrics_token(config)?,
    ));
    Ok(Some(bound))
}

/// Every gRPC service the listener serves: health, reflection (v1 and v1alpha: grpcurl and
/// Postman speak v1, Python's grpcio-reflection and older tools only v1alpha), Broker and
/// Admin, beside `extra`.
async fn grpc_routes(
    config: &Config,
    services: &Arc<Services>,
    extra: tonic::service::Routes,
) -> Result<tonic::service::Routes, ServeError> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<BrokerServer<BrokerApi>>()
        .await;
    health_reporter.set_serving::<AdminServer<AdminApi>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::api::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // Each version lists both reflection services, not only itself.
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
    };
    let reflection_err =
        |e: tonic_reflection::server::Error| ServeError::Tls(format!("reflection: {e}"));
    // The services' own bounds are their largest method's; the gate holds each method to its
    // own before the body is read ([`crate::api::gate`]).
    let max = config.limits.max_request_bytes;
    let mut routes = tonic::service::RoutesBuilder::from(extra);
    routes
        .add_service(health)
        .add_service(reflection().build_v1().map_err(reflection_err)?)
        .add_service(reflection().build_v1alpha().map_err(reflection_err)?)
        .add_service(BrokerServer::new(BrokerApi(services.clone())).max_decoding_message_size(max))
        .add_service(
            AdminServer::new(AdminApi(services.clone()))
                .max_decoding_message_size(max.min(crate::api::SETTINGS_REQUEST_BYTES)),
        );
    Ok(routes.routes())
}

/// Runs the daemon until `shutdown` completes. `on_ready` is told where it listens. `extra`
/// holds services served beside the broker's on the same listener and TLS (the benchmark's
/// Echo baseline); the daemon itself adds none.
pub async fn run(
    config: Config,
    key: KeySource,
    extra: tonic::service::Routes,
    on_ready: impl FnOnce(Bound),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    crate::tls::install_crypto_provider();
    // Checked when the configuration was loaded; were it not, the built-in deny stays.
    if let Ok(upstream) = config.upstream() {
        crate::upstream::install(upstream);
    }
    let store = Arc::new(Store::open(&config.store, &key).await?);
    let services = open_services(&config, store.clone()).await?;
    let (grpc_listener, grpc_addr) = bind(config.grpc.listen).await?;
    let acceptor = TlsAcceptor::from(Arc::new(grpc_tls(&config)?));
    let (tx, rx) = tokio::sync::mpsc::channel(128);
    tokio::spawn(accept_loop(
        grpc_listener,
        acceptor,
        (Slots::new(&config.grpc), services.refusals.clone()),
        tx,
    ));
    let http_addr = start_http(&config, &services).await?;
    spawn_policy_reload(services.policy.clone());
    spawn_rewrap(
        store,
        config.limits.rewrap_batch,
        Duration::from_millis(config.limits.rewrap_pause_ms),
    );

    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .timeout(Duration::from_secs(120))
        .max_concurrent_streams(Some(config.grpc.max_concurrent_streams))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .layer(crate::api::gate::GateLayer::new(
            services.clone(),
            // Room for at least one message of the largest size.
            (config.limits.max_inflight_request_bytes).max(config.limits.max_request_bytes),
        ))
        .add_routes(grpc_routes(&config, &services, extra).await?)
        .serve_with_incoming_shutdown(tokio_stream::wrappers::ReceiverStream::new(rx), async {
            drain_rx.await.ok();
        });
    on_ready(Bound {
        grpc: grpc_addr,
        http: http_addr,
    });
    crate::systemd::notify("READY=1");
    crate::systemd::spawn_watchdog();
    tokio::pin!(server);
    tokio::select! {
        served = &mut server => served?,
        () = shutdown => {
            crate::systemd::notify("STOPPING=1");
            drain_tx.send(()).ok();
            // In-flight calls finish (their audit records are durable before they answer);
            // idle client connections must not keep the process alive.
            if tokio::time::timeout(DRAIN_GRACE, &mut server).await.is_err() {
                tracing::warn!(grace = ?DRAIN_GRACE, "connections still open after the grace period; closing them");
            }
        }
    }
    Ok(())
}

/// The background rewrap after a key rotation: resumes an unfinished one at startup, then
/// waits for the next rotation. Steps run on the blocking pool, `pause` apart.
fn spawn_rewrap(store: Arc<Store>, batch: usize, pause: Duration) {
    use crate::store::RewrapStep;
    tokio::spawn(async move {
        loop {
            let step = {
                let store = store.clone();
                crate::store::run_blocking(async move { store.rewrap_step(batch).await }).await
            };
            match step {
                Ok(Ok(RewrapStep::Progress(_))) => tokio::time::sleep(pause).await,
                Ok(Ok(RewrapStep::Finished(_))) => {}
                Ok(Ok(RewrapStep::Idle)) => {
                    // A rotation notifies; the timeout is a safety net only.
                    let _ =
                        tokio::time::timeout(Duration::from_secs(60), store.rewrap_wanted()).await;
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "key rewrap step failed; retrying in 30s");
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
                Err(e) => {
                    tracing::error!(error = %e, "key rewrap task failed; retrying in 30s");
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
            }
        }
    });
}

/// SIGHUP re-reads the policy; a file that fails to parse keeps the old policy and says why.
fn spawn_policy_reload(policy: Arc<PolicyHandle>) {
    let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
    else {
        tracing::warn!("cannot listen for SIGHUP: policy reload disabled");
        return;
    };
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            match policy.reload() {
                Ok(()) => tracing::info!("policy reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "policy reload failed; keeping the previous policy")
                }
            }
        }
    });
}
