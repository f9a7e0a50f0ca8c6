//! The HTTPS listener for browsers and probes: `/healthz`, Prometheus `/metrics`, the OAuth start
//! link `/oauth/start` (binds the browser, see [`crate::oauth::binding`]) and the redirect target
//! `/oauth/callback`. It uses the gRPC server certificate but asks for no client certificate.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Extension, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::api::Services;
use crate::audit::{AuditEvent, Outcome};
use crate::oauth::{OAuthError, PendingConnect, binding};
use axum::http::StatusCode;

/// The address a connection came from, given to each of its requests.
#[derive(Debug, Clone, Copy)]
struct Remote(std::net::SocketAddr);

#[derive(Deserialize)]
struct CallbackParams {
    state: Option<String>,
    code: Option<String>,
    error: Option<String>,
    /// RFC 9207: the issuer of the authorization response.
    iss: Option<String>,
}

#[derive(Deserialize)]
struct StartParams {
    state: Option<String>,
}

fn router(services: Arc<Services>, metrics_token: Option<String>) -> Router {
    let scrapes = Arc::new(Scrapes {
        services: services.clone(),
        token: metrics_token,
        connections: tokio::sync::Mutex::default(),
    });
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(binding::START_PATH, get(start))
        .route(binding::CALLBACK_PATH, get(callback))
        .with_state(services)
        .merge(
            Router::new()
                .route("/metrics", get(metrics))
                .with_state(scrapes),
        )
}

/// What `/metrics` needs. Invariant: the connections table (whose count decrypts every
/// connection record) is counted by one scrape at a time, and again only after a connection was
/// written: concurrent and repeated scrapes share one count, so unauthenticated GETs cannot make
/// the broker decrypt its store in a loop.
struct Scrapes {
    services: Arc<Services>,
    /// A bearer token scrapers must present, when `[http] metrics_token_file` is set.
    token: Option<String>,
    /// The last count, with the connections table's generation it was taken at.
    connections: tokio::sync::Mutex<Option<(u64, ConnectionCounts)>>,
}

type ConnectionCounts = std::collections::BTreeMap<&'static str, u64>;

impl Scrapes {
    async fn connection_counts(&self) -> ConnectionCounts {
        let mut cached = self.connections.lock().await;
        let registry = &self.services.registry;
        let generation = registry.connections_generation();
        if let Some((counted_at, counts)) = cached.as_ref()
            && *counted_at == generation
        {
            return counts.clone();
        }
        match registry.count_connections().await {
            Ok(counts) => {
                // Kept only if no write began while counting.
                if registry.connections_generation() == generation {
                    *cached = Some((generation, counts.clone()));
                }
                counts
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics: cannot count connections");
                ConnectionCounts::new()
            }
        }
    }

    /// True if no token is configured or the request carries it (compared in constant time).
    fn authorized(&self, headers: &axum::http::HeaderMap) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let given = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        crate::vault::constant_time_eq(given.as_bytes(), token.as_bytes())
    }
}

/// Prometheus text format. Counters and histograms live in [`crate::metrics`]; gauges are read
/// now, except connection counts (see [`Scrapes`]).
async fn metrics(State(scrapes): State<Arc<Scrapes>>, headers: axum::http::HeaderMap) -> Response {
    if !scrapes.authorized(&headers) {
        return (StatusCode::UNAUTHORIZED, "a bearer token is required\n").into_response();
    }
    let services = &scrapes.services;
    let key = services.registry.key_status();
    let gauges = crate::metrics::Gauges {
        audit_queue_depth: services.audit.queue_depth(),
        connections: scrapes.connection_counts().await,
        key_term: key.current_term,
        key_term_encryptions: key.term_encryptions,
        store_free_bytes: services.disk.free(),
    };
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(&gauges),
    )
        .into_response()
}

/// A refusal page for a browser that may not go on, if this address is over its rate.
fn over_rate(services: &Services, remote: std::net::SocketAddr) -> Option<Response> {
    services
        .callback_rate
        .allow(&remote.ip().to_string())
        .err()?;
    Some(
        (
            StatusCode::TOO_MANY_REQUESTS,
            "Too many requests from this address; try again in a moment.\n",
        )
            .into_response(),
    )
}

/// An audit event for a browser's request (the browser is the caller, `what` says where).
fn browser_event(operation: &str, what: &str) -> AuditEvent {
    AuditEvent {
        caller: format!("browser ({what})"),
        operation: operation.into(),
        request_id: hex::encode(crate::vault::random_bytes::<8>()),
        ..AuditEvent::default()
    }
}

/// Names the pending connection a state stands for in the audit event.
fn note(event: &mut AuditEvent, pending: &PendingConnect) {
    event.workspace = pending.workspace.clone();
    event.connector = pending.connector_id.clone();
    event.user_id = pending.user_id.clone();
}

/// The binding cookie the browser presented, if any.
fn cookie(headers: &axum::http::HeaderMap) -> Option<&str> {
    binding::from_headers(
        headers
            .get_all(axum::http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    )
}

/// A refused start or callback. Another browser presenting someone's state is audited in full
/// (it names the connection); junk and spent states are summarised, not written one by one.
async fn refuse(
    services: &Services,
    remote: std::net::SocketAddr,
    operation: &'static str,
    mut event: AuditEvent,
    e: OAuthError,
) -> Response {
    let status = if matches!(e, OAuthError::OtherBrowser) {
        event.outcome = Some(Outcome::Denied);
        event.reason = e.to_string();
        if let Err(response) = audit(services, event).await {
            return response;
        }
        StatusCode::FORBIDDEN
    } else {
        services
            .refusals
            .refuse(operation, remote.ip(), e.to_string())
            .await;
        StatusCode::BAD_REQUEST
    };
    let page = format!("{e}\nReturn to the application and connect the account again.\n");
    (
        status,
        [(axum::http::header::CACHE_CONTROL, "no-store")],
        page,
    )
        .into_response()
}

/// BeginConnect's link: binds this browser to the state (a cookie) and sends it to the
/// provider. Audited; a second browser is refused.
async fn start(
    State(services): State<Arc<Services>>,
    Extension(Remote(remote)): Extension<Remote>,
    headers: axum::http::HeaderMap,
    Query(params): Query<StartParams>,
) -> Response {
    if let Some(response) = over_rate(&services, remote) {
        return response;
    }
    let operation = crate::audit::label::OAUTH_START;
    let mut event = browser_event(operation, "oauth start");
    let state = params.state.as_deref().unwrap_or_default();
    let opened = services
        .oauth
        .open_start(state, cookie(&headers), |p| note(&mut event, p))
        .await;
    let opened = match opened {
        Ok(opened) => opened,
        Err(e) => return refuse(&services, remote, operation, event, e).await,
    };
    event.outcome = Some(Outcome::Ok);
    if let Err(response) = audit(&services, event).await {
        return response;
    }
    (
        StatusCode::SEE_OTHER,
        [
            (axum::http::header::LOCATION, opened.location),
            (
                axum::http::header::SET_COOKIE,
                binding::set_cookie(&opened.cookie),
            ),
            (axum::http::header::CACHE_CONTROL, "no-store".into()),
        ],
    )
        .into_response()
}

/// The provider sends the browser here after consent. The state names the pending connection,
/// which only the browser that opened the start link may finish (another is refused and the
/// state kept); the outcome is audited and the browser goes on to the return URL given at
/// BeginConnect with `status=connected` or `status=error&error=…`.
async fn callback(
    State(services): State<Arc<Services>>,
    Extension(Remote(remote)): Extension<Remote>,
    headers: axum::http::HeaderMap,
    Query(params): Query<CallbackParams>,
) -> Response {
    if let Some(response) = over_rate(&services, remote) {
        return response;
    }
    let operation = crate::audit::label::OAUTH_CALLBACK;
    let mut event = browser_event(operation, "oauth callback");
    let state = params.state.as_deref().unwrap_or_default();
    let taken = services
        .oauth
        .take_state_if(state, |p| {
            note(&mut event, p);
            p.check_browser(cookie(&headers))
        })
        .await;
    let pending = match taken {
        Ok(pending) => pending,
        Err(e) => return refuse(&services, remote, operation, event, e).await,
    };
    let return_url = pending.return_url.clone();
    let outcome = match (params.error, params.code) {
        (Some(error), _) => Err(provider_error_code(&error)),
        (None, Some(code)) => services
            .oauth
            .complete(pending, &code, params.iss.as_deref())
            .await
            .map_err(|e| e.to_string()),
        (None, None) => Err("the provider returned neither a code nor an error".into()),
    };
    let pairs: Vec<(&str, String)> = match &outcome {
        Ok(done) => {
            event.connector = format!("{} ({})", done.connector.name, done.connector.id);
            event.outcome = Some(Outcome::Ok);
            vec![
                ("status", "connected".into()),
                ("connector", done.connector.name.clone()),
            ]
        }
        Err(why) => {
            event.outcome = Some(Outcome::Error);
            event.reason = why.clone();
            vec![("status", "error".into()), ("error", why.clone())]
        }
    };
    if let Err(response) = audit(&services, event).await {
        return response;
    }
    redirect_with(&return_url, &pairs)
}

/// Keeps only the error code a provider sent (`access_denied`), never arbitrary text.
fn provider_error_code(error: &str) -> String {
    let code: String = error
        .chars()
        .take(64)
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    format!("the provider returned {code}")
}

/// Writes the callback's audit record; the browser gets an error page if that fails.
async fn audit(services: &Services, event: AuditEvent) -> Result<(), Response> {
    services.audit.record(event).await.map(drop).map_err(|e| {
        tracing::error!(error = %e, "audit failed: refusing the OAuth callback");
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "The audit log cannot be written; the connection was not completed.\n",
        )
            .into_response()
    })
}

/// Sends the browser to the return URL with the outcome, or shows it when there is none.
fn redirect_with(return_url: &str, pairs: &[(&str, String)]) -> Response {
    let mut url = match reqwest::Url::parse(return_url) {
        Ok(url) => url,
        Err(_) => {
            let connected = pairs
                .iter()
                .any(|(k, v)| *k == "status" && v == "connected");
            let text = if connected {
                "Connected: you may close this window.\n"
            } else {
                "The account could not be connected. Return to the application and try again.\n"
            };
            return (StatusCode::OK, text).into_response();
        }
    };
    url.query_pairs_mut().extend_pairs(pairs);
    Redirect::to(url.as_str()).into_response()
}

/// Serves until the listener fails; each connection is handled on its own task.
/// What one connection may take: see [`crate::config::HttpConfig`].
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub max_connection: Duration,
}

impl From<&crate::config::HttpConfig> for ConnectionLimits {
    fn from(http: &crate::config::HttpConfig) -> Self {
        Self {
            max_connections: http.max_connections.max(1),
            header_timeout: Duration::from_secs(http.header_timeout_secs.max(1)),
            max_connection: Duration::from_secs(http.max_connection_secs.max(1)),
        }
    }
}

/// Serves the listener forever. Invariants: at most `max_connections` connections are held (a
/// connection over the cap is closed at accept, before TLS); each must finish its handshake and
/// headers within `header_timeout` and is closed after `max_connection` whatever it does.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    limits: ConnectionLimits,
    services: Arc<Services>,
    metrics_token: Option<String>,
) {
    let app = router(services, metrics_token);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "http accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            crate::metrics::http_connection_refused();
            drop(tcp);
            continue;
        };
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(app.clone().layer(Extension(Remote(remote))));
        tokio::spawn(async move {
            let _slot = slot;
            let Ok(Ok(tls)) =
                tokio::time::timeout(limits.header_timeout, acceptor.accept(tcp)).await
            else {
                return;
            };
            // The protocol is the one ALPN chose: no sniffing of the first bytes, which would
            // wait on a silent client before any timeout applies.
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder = if h2 {
                builder.http2_only()
            } else {
                builder.http1_only()
            };
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout);
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_concurrent_streams(16);
            let connection = builder.serve_connection(TokioIo::new(tls), service);
            let _ = tokio::time::timeout(limits.max_connection, connection).await;
        });
    }
}
