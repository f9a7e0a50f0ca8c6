//! Broker.Call: the one place a request is sent with a stored credential. The caller names a
//! method, a path relative to the connector's API base, query pairs, headers and a body; the
//! broker sends it to the API with the connection's credential injected and returns the
//! status, an allow-list of response headers and the body. The caller never holds the secret.
//!
//! Invariants:
//! - a request goes only to the connector's `api_base` (its config, else its provider's
//!   preset): the path is refused if it could leave it (`..`, `//host`, an absolute URL, a
//!   backslash, a percent-encoded `.`, `/`, `\` or `%`, anything outside RFC 3986's path
//!   characters), and the joined URL's origin is checked again;
//! - the caller's `Authorization`, `Cookie`, `Proxy-Authorization`, the connector's API-key
//!   header (or query parameter) and hop-by-hop headers are dropped; the credential goes only
//!   where the connector says (bearer, API-key header or query parameter), marked sensitive;
//! - redirects are not followed: a 3xx on the base's origin is returned as is, one whose
//!   `Location` leaves it is refused ([`CallError::Redirected`]);
//! - request and response bodies are bounded ([`CallLimits`]); the upstream deadline is the
//!   broker's one for every upstream; HTTPS clients are kept per extra CA (connections are
//!   reused; no cookie is ever stored);
//! - the streaming form ([`Proxy::open`], [`Download`]) is the same request, sent the same way
//!   (one [`Proxy::respond`] for both); its body is read piece by piece, never whole, only as
//!   fast as the caller takes it (a bounded channel, [`Download::pump`]), up to its own cap
//!   ([`CallLimits::stream_bytes`]), each piece within the upstream deadline and the whole
//!   within [`CallLimits::stream_time`]; how it ended ([`Ending`]) is the audit's;
//! - an OAuth connection's 401 refreshes its token once (or, for a client-credentials
//!   connector, asks for a new one once) and retries once;
//! - errors and the [`Exchange`] summary (the audit's) never hold a header, a body, a query
//!   value or the credential; a transport error is described without its URL (which may carry
//!   an API key as a query parameter).

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::time::Instant;
use url::Url;

use crate::driver::{Credential, CredentialError, Credentials, Form};
use crate::model::{Connector, FieldError, Kind, Secret, Target};

/// The credential is asked for with this much life left, as a ResolveCredential would.
const MIN_TTL: Duration = Duration::from_secs(60);

/// Methods a call may use.
const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"];

/// Request headers never forwarded: credentials, cookies and hop-by-hop headers (and those the
/// HTTP client sets itself).
const DROPPED: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "cookie2",
    "host",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "expect",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
];

/// Response headers returned to the caller; anything else (`set-cookie` above all) is not.
const RETURNED: &[&str] = &[
    "content-type",
    "content-length",
    "content-encoding",
    "content-language",
    "content-disposition",
    "content-range",
    "accept-ranges",
    "etag",
    "last-modified",
    "cache-control",
    "expires",
    "retry-after",
    "location",
    "link",
];

/// Response header prefixes returned as well: rate-limit information.
const RETURNED_PREFIXES: &[&str] = &["x-ratelimit-", "ratelimit-"];

/// The largest piece of a streamed body handed on at once.
pub const STREAM_PIECE_BYTES: usize = 64 * 1024;

/// How large a call's bodies may be (`[limits] max_call_request_bytes`,
/// `max_call_response_bytes`), and a stream's (`max_call_stream_bytes`,
/// `call_stream_timeout_secs`).
#[derive(Debug, Clone, Copy)]
pub struct CallLimits {
    pub request_bytes: usize,
    pub response_bytes: usize,
    /// The body a CallStream reads back, in all.
    pub stream_bytes: u64,
    /// A CallStream's whole life, from sending the request.
    pub stream_time: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error(transparent)]
    Credential(#[from] CredentialError),
    #[error(
        "connector {connector:?} has no API base: set config.api_base to the API's https base URL"
    )]
    NoBase { connector: String },
    #[error("the request body is {size} bytes; at most {limit} (limits.max_call_request_bytes)")]
    RequestTooLarge { size: usize, limit: usize },
    #[error("{host} answered more than {limit} bytes (limits.{setting})")]
    ResponseTooLarge {
        host: String,
        limit: u64,
        setting: &'static str,
    },
    #[error("{host} did not answer in time ({what} is {seconds}s)")]
    Timeout {
        host: String,
        seconds: u64,
        what: &'static str,
    },
    #[error("cannot reach {host}: {why}")]
    Unreachable { host: String, why: String },
    #[error(
        "{host} answered {status} redirecting to another host ({to}); redirects off the API base are not followed"
    )]
    Redirected {
        host: String,
        status: u16,
        to: String,
    },
}

/// A call as the caller asked for it.
#[derive(Default)]
pub struct CallRequest {
    pub method: String,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Names and sizes only: the caller's headers may carry its own credentials (which are
/// dropped, never sent) and its query and body are its data, not ours to print.
impl fmt::Debug for CallRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallRequest")
            .field("method", &self.method)
            .field("path", &self.path)
            .field(
                "query",
                &self.query.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field(
                "headers",
                &self.headers.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("body_bytes", &self.body.len())
            .finish()
    }
}

/// What the API answered, filtered.
#[derive(Debug)]
pub struct CallResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// What the audit records of a call: method, host, the path reached (the base's and the
/// call's), the query's names (never its values), status and bytes each way.
#[derive(Debug, Clone, Default)]
pub struct Exchange {
    pub method: String,
    pub host: String,
    pub path: String,
    pub query_names: Vec<String>,
    pub status: Option<u16>,
    pub bytes_out: usize,
    pub bytes_in: usize,
}

impl fmt::Display for Exchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}{}", self.method, self.host, self.path)?;
        for (i, name) in self.query_names.iter().enumerate() {
            write!(f, "{}{name}=", if i == 0 { '?' } else { '&' })?;
        }
        match self.status {
            Some(status) => write!(f, " -> {status}")?,
            None => f.write_str(" -> no answer")?,
        }
        write!(
            f,
            "; {} bytes out, {} bytes in",
            self.bytes_out, self.bytes_in
        )
    }
}

/// A call checked and addressed, not yet sent: what policy decides on.
#[derive(Debug)]
pub struct Prepared {
    pub method: reqwest::Method,
    /// The path relative to the API base, as checked.
    pub path: String,
    url: Url,
    headers: HeaderMap,
    query: Vec<(String, String)>,
    body: Vec<u8>,
    pub exchange: Exchange,
}

pub struct Proxy {
    credentials: Credentials,
    timeout: Duration,
    limits: CallLimits,
    /// HTTPS clients by the SHA-256 of the extra CA they trust, kept so that calls reuse
    /// connections (a handshake per call was most of a call's cost).
    clients: Mutex<HashMap<[u8; 32], reqwest::Client>>,
}

/// Clients kept at most; past it the cache starts over.
const MAX_CLIENTS: usize = 64;

impl Proxy {
    pub fn new(credentials: Credentials, timeout: Duration, limits: CallLimits) -> Self {
        Self {
            credentials,
            timeout,
            limits,
            clients: Mutex::default(),
        }
    }

    /// The HTTPS client trusting `ca_pem` besides the public roots; never follows redirects.
    fn client(&self, ca_pem: Option<&str>) -> Result<reqwest::Client, crate::tls::TlsError> {
        let key: [u8; 32] = Sha256::digest(ca_pem.unwrap_or_default().as_bytes()).into();
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(client) = clients.get(&key) {
            return Ok(client.clone());
        }
        let client = crate::tls::http_client(ca_pem, self.timeout)?;
        if clients.len() >= MAX_CLIENTS {
            clients.clear();
        }
        clients.insert(key, client.clone());
        Ok(client)
    }

    /// Checks a call and addresses it at the connector's API base; nothing is sent.
    pub fn prepare(&self, connector: &Connector, r: CallRequest) -> Result<Prepared, CallError> {
        let base = api_base(connector)?;
        let method = method(&r.method)?;
        let path = relative_path(&r.path)?;
        if r.body.len() > self.limits.request_bytes {
            return Err(CallError::RequestTooLarge {
                size: r.body.len(),
                limit: self.limits.request_bytes,
            });
        }
        let url = join(&base, &path)?;
        let key = api_key_place(connector);
        let headers = forwarded_headers(&r.headers, key.header.as_deref())?;
        let query: Vec<(String, String)> = r
            .query
            .into_iter()
            .filter(|(name, _)| key.query.as_deref() != Some(name.as_str()))
            .collect();
        let exchange = Exchange {
            method: method.to_string(),
            host: host_of(&url),
            path: url.path().to_string(),
            query_names: query.iter().map(|(n, _)| n.clone()).collect(),
            ..Exchange::default()
        };
        Ok(Prepared {
            method,
            path,
            url,
            headers,
            query,
            body: r.body,
            exchange,
        })
    }

    /// Sends a prepared call with the target's credential and reads the whole answer (up to
    /// [`CallLimits::response_bytes`]). `exchange` is filled in as it goes, for the audit,
    /// whatever the outcome.
    pub async fn send(
        &self,
        target: &Target,
        call: &Prepared,
        exchange: &mut Exchange,
    ) -> Result<CallResponse, CallError> {
        let response = self.respond(target, call, exchange, None).await?;
        let answer = self.answer(call, response).await;
        if let Ok(a) = &answer {
            exchange.bytes_in = a.body.len();
        }
        answer
    }

    /// Sends a prepared call as [`Proxy::send`] does and returns the answer's status and
    /// headers once they arrive (within the upstream deadline), its body still to be read
    /// ([`Download`]): bounded by [`CallLimits::stream_bytes`] and [`CallLimits::stream_time`].
    pub async fn open(
        &self,
        target: &Target,
        call: &Prepared,
        exchange: &mut Exchange,
    ) -> Result<Download, CallError> {
        let life = self.limits.stream_time;
        let started = Instant::now();
        let host = host_of(&call.url);
        let response = tokio::time::timeout(
            self.timeout,
            self.respond(target, call, exchange, Some(life)),
        )
        .await
        .map_err(|_| CallError::Timeout {
            host: host.clone(),
            seconds: self.timeout.as_secs(),
            what: UPSTREAM_DEADLINE,
        })??;
        let limit = self.limits.stream_bytes;
        if response.content_length().is_some_and(|n| n > limit) {
            return Err(stream_too_large(host, limit));
        }
        Ok(Download {
            status: response.status().as_u16(),
            headers: returned_headers(response.headers()),
            response,
            host,
            limit,
            idle: self.timeout,
            life,
            deadline: started + life,
            received: 0,
        })
    }

    /// The API's answer to a prepared call, its body unread: sent with the target's
    /// credential; on a 401 for an OAuth connection, the token refreshed once (a new one
    /// asked for, for a client-credentials connector) and the call sent once more; a redirect
    /// off the base refused. `timeout` replaces the client's whole-request deadline (a stream's
    /// life). The one way both forms of Call send a request.
    async fn respond(
        &self,
        target: &Target,
        call: &Prepared,
        exchange: &mut Exchange,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, CallError> {
        let client = self
            .client(target.connector.setting("ca_pem"))
            .map_err(|e| CallError::Unreachable {
                host: exchange.host.clone(),
                why: e.to_string(),
            })?;
        let credential = self.credentials.resolvable(target, MIN_TTL).await?;
        exchange.bytes_out = call.body.len();
        let send = async |credential: &Credential| {
            self.attempt(&client, target, call, credential, timeout)
                .await
        };
        let mut response = send(&credential).await?;
        if response.status() == reqwest::StatusCode::UNAUTHORIZED
            && credential.form == Form::Bearer
            && self
                .credentials
                .replace_rejected(target, &credential.secret)
                .await?
        {
            let fresh = self.credentials.resolvable(target, MIN_TTL).await?;
            response = send(&fresh).await?;
        }
        let status = response.status().as_u16();
        exchange.status = Some(status);
        if response.status().is_redirection() {
            check_redirect(&call.url, status, response.headers())?;
        }
        Ok(response)
    }

    async fn attempt(
        &self,
        client: &reqwest::Client,
        target: &Target,
        call: &Prepared,
        credential: &Credential,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, CallError> {
        let mut url = call.url.clone();
        let mut headers = call.headers.clone();
        inject(
            &target.connector,
            credential,
            &mut url,
            &mut headers,
            &call.query,
        )?;
        let mut request = client
            .request(call.method.clone(), url)
            .headers(headers)
            .body(call.body.clone());
        if let Some(timeout) = timeout {
            request = request.timeout(timeout);
        }
        request
            .send()
            .await
            .map_err(|e| self.transport(&call.url, e))
    }

    /// The response as returned to the caller: the headers filtered, the body read up to the
    /// limit.
    async fn answer(
        &self,
        call: &Prepared,
        mut response: reqwest::Response,
    ) -> Result<CallResponse, CallError> {
        let status = response.status().as_u16();
        let host = host_of(&call.url);
        let limit = self.limits.response_bytes;
        let too_large = || CallError::ResponseTooLarge {
            host: host.clone(),
            limit: limit as u64,
            setting: "max_call_response_bytes",
        };
        // The body's announced size (none for a HEAD answer, whatever its Content-Length).
        if response.content_length().is_some_and(|n| n > limit as u64) {
            return Err(too_large());
        }
        let headers = returned_headers(response.headers());
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| self.transport(&call.url, e))?
        {
            if body.len() + chunk.len() > limit {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(CallResponse {
            status,
            headers,
            body,
        })
    }

    /// A transport error, described without its URL.
    fn transport(&self, url: &Url, e: reqwest::Error) -> CallError {
        transport(host_of(url), (self.timeout, UPSTREAM_DEADLINE), e)
    }
}

/// An answer being streamed: its status and the headers returned, its body still upstream,
/// read by [`Download::pump`].
pub struct Download {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    response: reqwest::Response,
    host: String,
    limit: u64,
    /// The longest wait for the API's next piece, and for the caller to take one.
    idle: Duration,
    life: Duration,
    deadline: Instant,
    /// Body bytes read from the API so far.
    received: u64,
}

/// How a stream ended, for its audit record.
#[derive(Debug)]
pub enum Ending {
    /// The whole body was handed on.
    Complete,
    /// The caller went away before the end.
    HungUp,
    /// The caller took nothing for this many seconds (the upstream deadline).
    Stalled { seconds: u64 },
    /// The API's side failed, the body passed its cap or the stream its life: the caller was
    /// told this error.
    Failed(CallError),
}

impl fmt::Display for Ending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ending::Complete => f.write_str("complete"),
            Ending::HungUp => f.write_str("the caller hung up before the end"),
            Ending::Stalled { seconds } => {
                write!(f, "the caller took nothing for {seconds}s; ended")
            }
            Ending::Failed(e) => write!(f, "cut off: {e}"),
        }
    }
}

impl Download {
    /// Hands the body on into `tx` as `wrap(piece)`, in pieces of at most
    /// [`STREAM_PIECE_BYTES`], reading the API only when the channel has room (its capacity
    /// bounds what is held), until the end, an error (returned, for the caller to hand on),
    /// the caller gone or not taking pieces. Returns how it ended and the body bytes handed on.
    pub async fn pump<T>(
        mut self,
        tx: &mpsc::Sender<T>,
        wrap: impl Fn(Vec<u8>) -> T,
    ) -> (Ending, u64) {
        let mut sent = 0u64;
        loop {
            let next = tokio::select! {
                next = self.next() => next,
                () = tx.closed() => return (Ending::HungUp, sent),
            };
            let chunk = match next {
                Ok(Some(chunk)) => chunk,
                Ok(None) => return (Ending::Complete, sent),
                Err(e) => return (Ending::Failed(e), sent),
            };
            for piece in chunk.chunks(STREAM_PIECE_BYTES) {
                match tx.send_timeout(wrap(piece.to_vec()), self.idle).await {
                    Ok(()) => sent += piece.len() as u64,
                    Err(mpsc::error::SendTimeoutError::Closed(_)) => {
                        return (Ending::HungUp, sent);
                    }
                    Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                        let seconds = self.idle.as_secs();
                        return (Ending::Stalled { seconds }, sent);
                    }
                }
            }
        }
    }

    /// The API's next chunk, within the idle wait and the stream's life, the total within
    /// the cap; `None` at the end.
    async fn next(&mut self) -> Result<Option<prost::bytes::Bytes>, CallError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        let (wait, named) = if left < self.idle {
            (left, (self.life, STREAM_LIFE))
        } else {
            (self.idle, (self.idle, STREAM_IDLE))
        };
        let chunk = tokio::time::timeout(wait, self.response.chunk())
            .await
            .map_err(|_| CallError::Timeout {
                host: self.host.clone(),
                seconds: named.0.as_secs(),
                what: named.1,
            })?
            .map_err(|e| transport(self.host.clone(), (self.life, STREAM_LIFE), e))?;
        let Some(chunk) = chunk else {
            return Ok(None);
        };
        self.received += chunk.len() as u64;
        if self.received > self.limit {
            return Err(stream_too_large(self.host.clone(), self.limit));
        }
        Ok(Some(chunk))
    }
}

/// What [`CallError::Timeout`] names for a request's deadline.
const UPSTREAM_DEADLINE: &str = "the upstream deadline (limits.upstream_timeout_secs)";
/// …for a stream's piece that does not come.
const STREAM_IDLE: &str =
    "the longest a stream may wait for its next piece (limits.upstream_timeout_secs)";
/// …for a stream's whole life.
const STREAM_LIFE: &str = "a stream's longest life (limits.call_stream_timeout_secs)";

fn stream_too_large(host: String, limit: u64) -> CallError {
    CallError::ResponseTooLarge {
        host,
        limit,
        setting: "max_call_stream_bytes",
    }
}

/// A transport error, described without its URL; a timeout names `deadline`.
fn transport(host: String, deadline: (Duration, &'static str), e: reqwest::Error) -> CallError {
    if e.is_timeout() {
        return CallError::Timeout {
            host,
            seconds: deadline.0.as_secs(),
            what: deadline.1,
        };
    }
    let mut why = if e.is_connect() {
        "connection failed".to_string()
    } else {
        "request failed".to_string()
    };
    let e = e.without_url();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        why.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    CallError::Unreachable { host, why }
}

/// The connector's API base, checked as when it was set.
fn api_base(connector: &Connector) -> Result<Url, CallError> {
    let base = crate::oauth::catalog::api_base(connector).ok_or_else(|| CallError::NoBase {
        connector: connector.name.clone(),
    })?;
    Ok(crate::driver::api_base_url("config.api_base", &base)?)
}

fn method(method: &str) -> Result<reqwest::Method, FieldError> {
    let upper = method.trim().to_ascii_uppercase();
    if !METHODS.contains(&upper.as_str()) {
        return Err(FieldError::new(
            "method",
            format!("{method:?} is not one of {}", METHODS.join(", ")),
        ));
    }
    reqwest::Method::from_bytes(upper.as_bytes()).map_err(|_| FieldError::new("method", "invalid"))
}

/// A path relative to the API base that cannot leave it: starts with one `/`, only RFC 3986
/// path characters, no `.` or `..` segment, no backslash, and no percent-encoded `.`, `/`,
/// `\`, `%` or NUL (which a server might decode into one of those).
pub fn relative_path(path: &str) -> Result<String, FieldError> {
    let bad = |why: &str| FieldError::new("path", why.to_string());
    if !path.starts_with('/') {
        return Err(bad(
            "must start with / and be relative to the API base (no scheme or host)",
        ));
    }
    if path.starts_with("//") {
        return Err(bad("must not start with // (a host)"));
    }
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/%".contains(&b);
    if let Some(b) = path.bytes().find(|b| !allowed(*b)) {
        return Err(bad(&match b {
            b'?' => "must not carry a query: give it in query".to_string(),
            b'\\' => "must not contain a backslash".to_string(),
            b if b.is_ascii_graphic() => format!("must not contain {:?}", b as char),
            _ => "must contain only ASCII path characters (percent-encode the rest)".into(),
        }));
    }
    let bytes = path.as_bytes();
    for (i, _) in path.match_indices('%') {
        let hex = bytes
            .get(i + 1..i + 3)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
            .ok_or_else(|| bad("has a % not followed by two hex digits"))?;
        let decoded = u8::from_str_radix(std::str::from_utf8(hex).unwrap_or("00"), 16).unwrap_or(0);
        if matches!(decoded, b'.' | b'/' | b'\\' | b'%' | 0) {
            return Err(bad(
                "must not percent-encode '.', '/', '\\', '%' or NUL (a way out of the API base)",
            ));
        }
    }
    if path.split('/').any(|s| s == "." || s == "..") {
        return Err(bad("must not contain . or .. segments"));
    }
    Ok(path.to_string())
}

/// The base's path (without its trailing `/`) followed by `path`; the origin must stay the
/// base's.
fn join(base: &Url, path: &str) -> Result<Url, FieldError> {
    let mut url = base.clone();
    url.set_path(&format!("{}{path}", base.path().trim_end_matches('/')));
    if url.origin() != base.origin() || !url.path().starts_with(base.path().trim_end_matches('/')) {
        return Err(FieldError::new("path", "leaves the API base"));
    }
    Ok(url)
}

fn host_of(url: &Url) -> String {
    match url.port() {
        Some(port) => format!("{}:{port}", url.host_str().unwrap_or_default()),
        None => url.host_str().unwrap_or_default().to_string(),
    }
}

/// Where an API-key connector sends its key: a query parameter (`query_param`), else its
/// header. OAuth connectors send a bearer token in `Authorization`.
struct KeyPlace {
    header: Option<String>,
    query: Option<String>,
}

fn api_key_place(connector: &Connector) -> KeyPlace {
    if connector.kind != Kind::ApiKey {
        return KeyPlace {
            header: None,
            query: None,
        };
    }
    match connector.setting("query_param") {
        Some(param) => KeyPlace {
            header: None,
            query: Some(param.to_string()),
        },
        None => KeyPlace {
            header: connector
                .setting("header_name")
                .map(str::to_ascii_lowercase),
            query: None,
        },
    }
}

/// The caller's headers, less credentials, cookies, hop-by-hop headers and `key_header`.
fn forwarded_headers(
    given: &[(String, String)],
    key_header: Option<&str>,
) -> Result<HeaderMap, FieldError> {
    let mut headers = HeaderMap::new();
    for (i, (name, value)) in given.iter().enumerate() {
        let name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| {
            FieldError::new(format!("headers[{i}].name"), "is not an HTTP header name")
        })?;
        if DROPPED.contains(&name.as_str()) || key_header == Some(name.as_str()) {
            continue;
        }
        let value = HeaderValue::from_str(value).map_err(|_| {
            FieldError::new(
                format!("headers[{i}].value"),
                "is not a valid HTTP header value",
            )
        })?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// Puts the credential where the connector says, and the caller's query after the base's.
fn inject(
    connector: &Connector,
    credential: &Credential,
    url: &mut Url,
    headers: &mut HeaderMap,
    query: &[(String, String)],
) -> Result<(), CallError> {
    let place = api_key_place(connector);
    {
        let mut pairs = url.query_pairs_mut();
        for (name, value) in query {
            pairs.append_pair(name, value);
        }
        if let Some(param) = &place.query {
            pairs.append_pair(param, credential.secret.expose());
        }
    }
    if url.query() == Some("") {
        url.set_query(None);
    }
    if place.query.is_none() {
        let (name, value) = credential_header(credential)?;
        headers.insert(name, value);
    }
    Ok(())
}

/// The credential as a header, marked sensitive (never logged by the HTTP stack).
fn credential_header(credential: &Credential) -> Result<(HeaderName, HeaderValue), CallError> {
    let name = HeaderName::from_bytes(credential.header_name.as_bytes())
        .map_err(|_| FieldError::new("config.header_name", "is not an HTTP header name"))?;
    let secret = Secret::new(format!(
        "{}{}",
        credential.header_prefix,
        credential.secret.expose()
    ));
    let mut value = HeaderValue::from_str(secret.expose())
        .map_err(|_| FieldError::new("secrets.api_key", "cannot be sent in an HTTP header"))?;
    value.set_sensitive(true);
    Ok((name, value))
}

/// A 3xx whose `Location` leaves the request's origin is refused (the target's host, never
/// the rest of the URL, is named).
fn check_redirect(request: &Url, status: u16, headers: &HeaderMap) -> Result<(), CallError> {
    let Some(location) = headers
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
    else {
        return Ok(());
    };
    let to = request.join(location).ok();
    if to
        .as_ref()
        .is_some_and(|to| to.origin() == request.origin())
    {
        return Ok(());
    }
    Err(CallError::Redirected {
        host: host_of(request),
        status,
        to: to
            .as_ref()
            .map(host_of)
            .unwrap_or_else(|| "an invalid URL".into()),
    })
}

/// The allow-listed response headers.
fn returned_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(name, _)| {
            let name = name.as_str();
            RETURNED.contains(&name) || RETURNED_PREFIXES.iter().any(|p| name.starts_with(p))
        })
        .filter_map(|(name, value)| Some((name.to_string(), value.to_str().ok()?.to_string())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Mode;

    #[test]
    fn a_call_request_debug_shows_no_header_query_or_body_value() {
        let request = CallRequest {
            method: "GET".into(),
            path: "/drive/v3/files".into(),
            query: vec![("q".into(), "query-canary".into())],
            headers: vec![("authorization".into(), "Bearer header-canary".into())],
            body: b"body-canary".to_vec(),
        };
        let printed = format!("{request:?}");
        assert!(
            printed.contains("authorization") && printed.contains("\"q\""),
            "{printed}"
        );
        for canary in ["query-canary", "header-canary", "body-canary"] {
            assert!(!printed.contains(canary), "{printed}");
        }
    }

    #[test]
    fn paths_that_could_leave_the_base_are_refused() {
        for bad in [
            "drive/v3/files",
            "https://evil.test/x",
            "//evil.test/x",
            "/a/../b",
            "/..",
            "/a/./b",
            "/a\\b",
            "/a/%2e%2e/b",
            "/a/%2E./b",
            "/a%2fb",
            "/a%5cb",
            "/a%252e%252e",
            "/a%00",
            "/a%zz",
            "/a%4",
            "/a?q=1",
            "/a#f",
            "/a b",
            "/caf\u{e9}",
        ] {
            let err = relative_path(bad).unwrap_err();
            assert_eq!(err.field, "path", "{bad}");
        }
        for good in [
            "/",
            "/drive/v3/files",
            "/chat.postMessage",
            "/a/b%20c/d:e@f",
            "/a..b/.x",
        ] {
            assert_eq!(relative_path(good).unwrap(), good);
        }
    }

    /// `%XX` decoded once, as a server would.
    fn percent_decoded(path: &str) -> String {
        let (bytes, mut out, mut i) = (path.as_bytes(), Vec::new(), 0);
        while i < bytes.len() {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                Some(b) if bytes[i] == b'%' => {
                    out.push(b);
                    i += 3;
                }
                _ => {
                    out.push(bytes[i]);
                    i += 1;
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Every path of up to six characters from an alphabet of traversal material: whatever is
    /// accepted stays under the base, and no accepted path decodes to a `.` or `..` segment.
    #[test]
    fn no_accepted_path_climbs_out_of_the_base() {
        let alphabet = [b'/', b'.', b'%', b'2', b'e', b'f', b'5', b'c', b'\\', b'a'];
        let base = Url::parse("https://api.test/v1").unwrap();
        let mut accepted = 0;
        let mut stack: Vec<Vec<u8>> = vec![b"/".to_vec()];
        while let Some(path) = stack.pop() {
            if path.len() < 7 {
                for c in alphabet {
                    stack.push([path.as_slice(), &[c]].concat());
                }
            }
            let path = String::from_utf8(path).unwrap();
            let Ok(ok) = relative_path(&path) else {
                continue;
            };
            accepted += 1;
            let url = join(&base, &ok).unwrap();
            assert!(url.path().starts_with("/v1/"), "{path} -> {url}");
            let decoded = percent_decoded(url.path());
            assert!(
                !decoded.split('/').any(|s| s == "." || s == ".."),
                "{path} decodes to {decoded}"
            );
        }
        assert!(accepted > 1000, "only {accepted} paths accepted");
    }

    #[test]
    fn paths_join_under_the_base() {
        let base = Url::parse("https://slack.com/api").unwrap();
        assert_eq!(
            join(&base, "/chat.postMessage").unwrap().as_str(),
            "https://slack.com/api/chat.postMessage"
        );
        let root = Url::parse("https://www.googleapis.com/").unwrap();
        assert_eq!(
            join(&root, "/drive/v3/files").unwrap().as_str(),
            "https://www.googleapis.com/drive/v3/files"
        );
    }

    #[test]
    fn credentials_cookies_and_hop_by_hop_headers_are_dropped() {
        let given: Vec<(String, String)> = [
            ("Authorization", "Bearer mine"),
            ("proxy-authorization", "x"),
            ("Cookie", "s=1"),
            ("Connection", "close"),
            ("Transfer-Encoding", "chunked"),
            ("X-Api-Key", "mine"),
            ("Content-Type", "application/json"),
            ("X-Custom", "kept"),
        ]
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
        let headers = forwarded_headers(&given, Some("x-api-key")).unwrap();
        let names: Vec<&str> = headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["content-type", "x-custom"]);
        let err = forwarded_headers(&[("bad name".into(), "v".into())], None).unwrap_err();
        assert_eq!(err.field, "headers[0].name");
    }

    #[test]
    fn redirects_off_the_origin_are_refused_naming_only_the_host() {
        let request = Url::parse("https://api.test/v1/x").unwrap();
        let with = |location: &str| {
            let mut h = HeaderMap::new();
            h.insert(reqwest::header::LOCATION, location.parse().unwrap());
            check_redirect(&request, 302, &h)
        };
        assert!(with("/v1/y").is_ok());
        assert!(with("https://api.test/v2").is_ok());
        let err = with("https://evil.test/steal?token=canary").unwrap_err();
        assert!(err.to_string().contains("evil.test"), "{err}");
        assert!(!err.to_string().contains("canary"), "{err}");
        assert!(with("http://api.test/v1/y").is_err(), "a downgrade to http");
        assert!(with("https://api.test:8443/").is_err(), "another port");
    }

    #[test]
    fn only_allow_listed_response_headers_are_returned() {
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("set-cookie", "s=1"),
            ("content-type", "application/json"),
            ("x-ratelimit-remaining", "9"),
            ("www-authenticate", "Bearer"),
            ("etag", "\"1\""),
        ] {
            h.insert(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        let names: Vec<String> = returned_headers(&h).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["content-type", "x-ratelimit-remaining", "etag"]);
    }

    #[test]
    fn api_keys_go_in_their_header_or_query_parameter() {
        let key = Credential {
            kind: Kind::ApiKey,
            form: Form::ApiKey,
            secret: Secret::new("k1"),
            expires_at: None,
            scopes: Vec::new(),
            account_label: String::new(),
            header_name: "X-Api-Key".into(),
            header_prefix: String::new(),
            connection: None,
        };
        let query = vec![("q".to_string(), "a b".to_string())];
        let run = |config: &[(&str, &str)]| {
            let c = Connector::for_tests(Kind::ApiKey, Mode::Shared, config);
            let mut url = Url::parse("https://api.test/x").unwrap();
            let mut headers = HeaderMap::new();
            inject(&c, &key, &mut url, &mut headers, &query).unwrap();
            (url.to_string(), headers)
        };
        let (url, headers) = run(&[("header_name", "X-Api-Key")]);
        assert_eq!(url, "https://api.test/x?q=a+b");
        assert_eq!(headers["x-api-key"], "k1");
        assert!(headers["x-api-key"].is_sensitive());
        let (url, headers) = run(&[("query_param", "key")]);
        assert_eq!(url, "https://api.test/x?q=a+b&key=k1");
        assert!(headers.is_empty());
    }

    fn download(body: Vec<u8>, limit: u64, idle: Duration) -> Download {
        let response = reqwest::Response::from(http::Response::new(reqwest::Body::from(body)));
        let life = Duration::from_secs(60);
        Download {
            status: 200,
            headers: Vec::new(),
            response,
            host: "api.test".into(),
            limit,
            idle,
            life,
            deadline: Instant::now() + life,
            received: 0,
        }
    }

    /// Pumps `body` into a channel of `capacity`, read by `read` (which may drop it).
    async fn pumped(
        d: Download,
        capacity: usize,
        read: impl AsyncFnOnce(mpsc::Receiver<Vec<u8>>),
    ) -> (Ending, u64) {
        let (tx, rx) = mpsc::channel(capacity);
        let pump = tokio::spawn(async move { d.pump(&tx, |piece| piece).await });
        read(rx).await;
        pump.await.unwrap()
    }

    #[tokio::test]
    async fn a_stream_hands_its_body_on_whole_in_bounded_pieces() {
        let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut got = Vec::new();
        let mut pieces = 0;
        let d = download(body.clone(), 1 << 20, Duration::from_secs(10));
        let (ending, sent) = pumped(d, 1, async |mut rx| {
            while let Some(piece) = rx.recv().await {
                assert!(piece.len() <= STREAM_PIECE_BYTES);
                pieces += 1;
                got.extend(piece);
            }
        })
        .await;
        assert!(matches!(ending, Ending::Complete), "{ending}");
        assert_eq!((sent, pieces), (200_000, 4));
        assert!(got == body, "the body arrived changed");
    }

    #[tokio::test]
    async fn a_stream_past_its_cap_a_caller_gone_or_stalled_ends_saying_so() {
        let body = vec![7u8; 200_000];
        let idle = Duration::from_secs(10);
        let d = download(body.clone(), 100_000, idle);
        let (ending, sent) = pumped(d, 8, async |mut rx| while rx.recv().await.is_some() {}).await;
        let Ending::Failed(e) = &ending else {
            panic!("{ending}")
        };
        assert!(
            e.to_string().contains("limits.max_call_stream_bytes"),
            "{e}"
        );
        assert_eq!(sent, 0);
        assert!(
            ending
                .to_string()
                .starts_with("cut off: api.test answered more")
        );

        let d = download(body.clone(), 1 << 20, idle);
        let (ending, sent) = pumped(d, 1, async |rx| drop(rx)).await;
        assert!(matches!(ending, Ending::HungUp), "{ending}");
        assert_eq!(sent, 0);

        // A caller that keeps the stream open and takes nothing: one piece fits the channel.
        let d = download(body, 1 << 20, Duration::from_millis(50));
        let (tx, rx) = mpsc::channel(1);
        let (ending, sent) = d.pump(&tx, |piece| piece).await;
        assert!(matches!(ending, Ending::Stalled { .. }), "{ending}");
        assert_eq!(sent, STREAM_PIECE_BYTES as u64);
        drop(rx);
    }

    #[test]
    fn the_audit_summary_names_query_names_never_values() {
        let e = Exchange {
            method: "GET".into(),
            host: "api.test".into(),
            path: "/files".into(),
            query_names: vec!["q".into(), "pageSize".into()],
            status: Some(200),
            bytes_out: 0,
            bytes_in: 12,
        };
        assert_eq!(
            e.to_string(),
            "GET api.test/files?q=&pageSize= -> 200; 0 bytes out, 12 bytes in"
        );
    }
}
