//! Broker.Call against a fake HTTPS API shaped like Google Drive (`GET /drive/v3/files`) and
//! Slack (`POST /api/chat.postMessage`). The fake checks each bearer token as a resource server
//! does, at the real OAuth test server's userinfo endpoint, and records every request it gets,
//! so the tests see exactly what reached the API: the agent gets the data without holding a
//! token, its own Authorization header never arrives, a path outside its grant sends nothing, a
//! redirect to another host is not followed, and a 401 is retried once after one refresh. Every
//! token the API saw is a canary: none may appear in a reply, a log line or an audit record.
//! The streaming form (CallStream) downloads `GET /drive/v3/files/big-N` (N bytes sent in
//! chunks without a Content-Length, made as they are read): whole past Call's cap, cut off at
//! its own, audited however it ends.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use credbroker::api::proto::{self, admin_client::AdminClient, broker_client::BrokerClient};
use support::daemon::{AGENT, Daemon, assert_refused, audit_records, conn, new_connector, secrets};
use support::https::serve_https;
use support::oauth::{connect, create_connector};
use support::peers::{OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET, peers};
use tonic::Code;
use tonic::transport::Channel;

const INSPECTOR: &str = "spiffe://test/inspector";
/// The shared API key of the `Keyed` connectors, and a canary.
const API_KEY: &str = "key-canary-5b1f0c9e2d7a4e38";

/// The agent may call two Drive and one Slack request shapes, nothing else (and may not
/// resolve); the inspector may resolve, to learn what the tokens are.
const POLICY: &str = r#"
[[callers]]
id = "spiffe://test/admin"
admin_workspaces = ["*"]

[[callers]]
id = "spiffe://test/agent"
[[callers.grants]]
workspace = "*"
connectors = ["Drive", "Slack"]
operations = ["call"]
users = ["*"]
calls = ["GET /drive/v3/files*", "POST /chat.postMessage"]
[[callers.grants]]
workspace = "*"
connectors = ["Keyed*"]
operations = ["call"]
calls = ["* /keyed/*"]
[[callers.grants]]
workspace = "*"
connectors = ["Service"]
operations = ["call"]
calls = ["GET /drive/v3/files"]

[[callers]]
id = "spiffe://test/inspector"
[[callers.grants]]
workspace = "*"
connectors = ["*"]
operations = ["resolve"]
users = ["*"]
"#;

/// One request as the fake API received it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    query: String,
    headers: HeaderMap,
    token: String,
}

#[derive(Default)]
struct Api {
    seen: Mutex<Vec<Seen>>,
    /// Answer this many next requests 401, whatever their token (an API that revoked it).
    refuse: Mutex<u32>,
    port: Mutex<u16>,
}

impl Api {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// Whether the OAuth test server takes `token` as one of its live access tokens: its userinfo
/// endpoint accepts a user's; its introspection endpoint says a client-credentials one (which
/// has no user) is active.
async fn valid(token: &str) -> bool {
    let http = credbroker::tls::unchecked_http_client(
        Some(&peers().ca_pem),
        std::time::Duration::from_secs(10),
    )
    .unwrap();
    let issuer = peers().oauth_issuer();
    let me = http.get(format!("{issuer}/me")).bearer_auth(token).send();
    if me.await.is_ok_and(|r| r.status().is_success()) {
        return true;
    }
    let introspected = http
        .post(format!("{issuer}/token/introspection"))
        .basic_auth(OAUTH_CLIENT_ID, Some(OAUTH_CLIENT_SECRET))
        .form(&[("token", token)])
        .send()
        .await;
    match introspected {
        Ok(r) => r
            .json::<serde_json::Value>()
            .await
            .is_ok_and(|v| v["active"] == true),
        Err(_) => false,
    }
}

/// `/drive/v3/files/stall`: 1,000 bytes, then nothing, never ending; `/drive/v3/files/drip`:
/// a byte every 200 ms, never ending.
fn slow_body(path: &str) -> Option<Body> {
    use futures::StreamExt;
    let first = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from(vec![b's'; 1000]))]);
    match path {
        "/drive/v3/files/stall" => Some(Body::from_stream(first.chain(futures::stream::pending()))),
        "/drive/v3/files/drip" => {
            Some(Body::from_stream(futures::stream::unfold((), async |()| {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                Some((Ok::<_, std::io::Error>(Bytes::from_static(b"d")), ()))
            })))
        }
        _ => None,
    }
}

/// Byte `i` of every big download.
fn big_byte(i: u64) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8
}

/// A body of `size` bytes ([`big_byte`]) in chunks of 100,000, made as they are read; no
/// Content-Length.
fn big_body(size: u64) -> Body {
    const CHUNK: u64 = 100_000;
    let chunks = futures::stream::unfold(0u64, move |at| async move {
        if at >= size {
            return None;
        }
        let end = (at + CHUNK).min(size);
        let chunk: Vec<u8> = (at..end).map(big_byte).collect();
        Some((Ok::<_, std::io::Error>(Bytes::from(chunk)), end))
    });
    Body::from_stream(chunks)
}

async fn handle(
    api: Arc<Api>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_string();
    api.seen.lock().unwrap().push(Seen {
        method: method.to_string(),
        path: uri.path().to_string(),
        query: uri.query().unwrap_or_default().to_string(),
        headers: headers.clone(),
        token: token.clone(),
    });
    if uri.path().starts_with("/keyed/") {
        return keyed(&api, &uri, &headers).into_response();
    }
    let refuse = {
        let mut left = api.refuse.lock().unwrap();
        let refuse = *left > 0;
        *left = left.saturating_sub(1);
        refuse
    };
    let mut out = HeaderMap::new();
    if refuse || !valid(&token).await {
        out.insert(
            "www-authenticate",
            "Bearer error=\"invalid_token\"".parse().unwrap(),
        );
        let refused: (_, _, String) = (
            StatusCode::UNAUTHORIZED,
            out,
            r#"{"error":"invalid_token"}"#.into(),
        );
        return refused.into_response();
    }
    out.insert("content-type", "application/json".parse().unwrap());
    out.insert("set-cookie", "session=s3cr3t; Secure".parse().unwrap());
    out.insert("x-ratelimit-remaining", "99".parse().unwrap());
    let big = uri.path().strip_prefix("/drive/v3/files/big-");
    if let Some(size) = big.and_then(|n| n.parse::<u64>().ok()) {
        out.insert("content-type", "application/octet-stream".parse().unwrap());
        return (StatusCode::OK, out, big_body(size)).into_response();
    }
    if let Some(body) = slow_body(uri.path()) {
        return (StatusCode::OK, out, body).into_response();
    }
    let answer: (_, _, String) = match (method.as_str(), uri.path()) {
        ("GET", "/drive/v3/files") => {
            let doc = r#"{"kind":"drive#fileList","files":[{"id":"f1","name":"Report.pdf","mimeType":"application/pdf"}]}"#;
            (StatusCode::OK, out, doc.into())
        }
        ("GET", "/drive/v3/files/moved") => {
            let port = *api.port.lock().unwrap();
            let to = format!("https://localhost:{port}/steal?from=drive");
            out.insert("location", to.parse().unwrap());
            (StatusCode::FOUND, out, String::new())
        }
        ("POST", "/api/chat.postMessage") => {
            let msg: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let doc = serde_json::json!({"ok": true, "channel": msg["channel"], "ts": "1700000000.000100", "message": {"text": msg["text"]}});
            (StatusCode::OK, out, doc.to_string())
        }
        _ => (
            StatusCode::NOT_FOUND,
            out,
            r#"{"error":"not_found"}"#.into(),
        ),
    };
    answer.into_response()
}

/// The API-key routes: the key in `X-Api-Key` or in the `key` query parameter, exactly once;
/// `/keyed/big` answers 200 bytes.
fn keyed(api: &Api, uri: &Uri, headers: &HeaderMap) -> (StatusCode, HeaderMap, String) {
    let mut keys: Vec<String> = headers
        .get_all("x-api-key")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect();
    keys.extend(
        uri.query()
            .unwrap_or_default()
            .split('&')
            .filter_map(|pair| pair.strip_prefix("key="))
            .map(str::to_string),
    );
    api.seen.lock().unwrap().last_mut().unwrap().token = keys.join(",");
    if keys != [API_KEY] {
        return (StatusCode::FORBIDDEN, HeaderMap::new(), "{}".into());
    }
    let body = match uri.path() {
        "/keyed/big" => "x".repeat(200),
        _ => r#"{"ok":true}"#.into(),
    };
    (StatusCode::OK, HeaderMap::new(), body)
}

/// The fake API on a free port; returns it and its CA.
async fn fake_api() -> (Arc<Api>, u16, String) {
    let ca = credbroker_devpki::CertAuthority::generate("fake API CA").unwrap();
    let api = Arc::new(Api::default());
    let shared = api.clone();
    let app = axum::Router::new().fallback(
        move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            handle(shared.clone(), method, uri, headers, body)
        },
    );
    let port = serve_https(&ca, app).await.port();
    *api.port.lock().unwrap() = port;
    (api, port, ca.cert_pem)
}

struct Setup {
    daemon: Daemon,
    admin: AdminClient<Channel>,
    agent: BrokerClient<Channel>,
    inspector: BrokerClient<Channel>,
    api: Arc<Api>,
    port: u16,
    /// The CAs of the OAuth test server and of the fake API.
    cas: String,
}

/// A daemon with Drive (API base the fake's root) and Slack (its `/api`) OAuth connectors at
/// the OAuth test server, both connected for u1.
async fn setup() -> Setup {
    setup_with("").await
}

/// [`setup`] with `config` appended to the daemon's configuration.
async fn setup_with(config: &str) -> Setup {
    let (api, port, api_ca) = fake_api().await;
    let daemon = Daemon::start_with(POLICY, config);
    daemon.issue(INSPECTOR, "inspector");
    let (daemon, mut admin, agent) = daemon.with_clients().await;
    let cas = format!("{}\n{api_ca}", peers().ca_pem);
    for (name, base) in [
        ("Drive", format!("https://127.0.0.1:{port}")),
        ("Slack", format!("https://127.0.0.1:{port}/api")),
    ] {
        create_connector(&mut admin, name, &[("api_base", &base), ("ca_pem", &cas)]).await;
        connect(&daemon, &mut admin, name, "u1", "").await;
    }
    let inspector = BrokerClient::new(daemon.channel_as("inspector").await.unwrap());
    Setup {
        daemon,
        admin,
        agent,
        inspector,
        api,
        port,
        cas,
    }
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

fn request(connector: &str, method: &str, path: &str) -> proto::CallRequest {
    proto::CallRequest {
        connection: conn(connector, "u1"),
        method: method.into(),
        path: path.into(),
        ..Default::default()
    }
}

fn list_files() -> proto::CallRequest {
    let query = pairs(&[("q", "name contains 'Report'"), ("pageSize", "10")]);
    let headers = pairs(&[
        ("Authorization", "Bearer agent-own-token"),
        ("Cookie", "sid=agent"),
        ("X-Trace", "t-1"),
    ]);
    proto::CallRequest {
        query: query
            .into_iter()
            .map(|(name, value)| proto::QueryParam { name, value })
            .collect(),
        headers: headers
            .into_iter()
            .map(|(name, value)| proto::HttpHeader { name, value })
            .collect(),
        ..request("Drive", "GET", "/drive/v3/files")
    }
}

async fn call(
    agent: &mut BrokerClient<Channel>,
    r: proto::CallRequest,
) -> Result<proto::CallResponse, tonic::Status> {
    agent.call(r).await.map(|r| r.into_inner())
}

fn header<'a>(r: &'a proto::CallResponse, name: &str) -> Option<&'a str> {
    r.headers
        .iter()
        .find(|h| h.name == name)
        .map(|h| h.value.as_str())
}

/// The current access token of `connector` for u1, as the inspector resolves it.
async fn token(inspector: &mut BrokerClient<Channel>, connector: &str) -> String {
    let r = proto::ResolveCredentialRequest {
        connection: conn(connector, "u1"),
        min_ttl_seconds: 0,
    };
    inspector
        .resolve_credential(r)
        .await
        .unwrap()
        .into_inner()
        .secret
}

#[tokio::test]
async fn an_agent_lists_drive_files_and_posts_to_slack_without_holding_a_token() {
    let mut s = setup().await;
    let files = call(&mut s.agent, list_files()).await.unwrap();
    assert_eq!(files.status, 200);
    let body = String::from_utf8(files.body.clone()).unwrap();
    assert!(body.contains("Report.pdf"), "{body}");
    assert_eq!(header(&files, "content-type"), Some("application/json"));
    assert_eq!(header(&files, "x-ratelimit-remaining"), Some("99"));
    assert_eq!(header(&files, "set-cookie"), None);
    let seen = s.api.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let drive = &seen[0];
    assert_eq!(drive.path, "/drive/v3/files");
    assert!(drive.query.contains("pageSize=10"), "{}", drive.query);
    assert_ne!(
        drive.token, "agent-own-token",
        "the agent's own header reached the API"
    );
    assert_eq!(drive.headers.get_all("authorization").iter().count(), 1);
    assert!(drive.headers.get("cookie").is_none());
    assert_eq!(drive.headers["x-trace"], "t-1");

    let mut post = request("Slack", "POST", "/chat.postMessage");
    post.headers = vec![proto::HttpHeader {
        name: "Content-Type".into(),
        value: "application/json".into(),
    }];
    post.body = br#"{"channel":"C123","text":"Quarterly report is in Drive"}"#.to_vec();
    let sent = post.body.len();
    let posted = call(&mut s.agent, post).await.unwrap();
    assert_eq!(posted.status, 200);
    let doc: serde_json::Value = serde_json::from_slice(&posted.body).unwrap();
    assert_eq!(doc["ok"], true);
    assert_eq!(doc["channel"], "C123");
    let seen = s.api.seen();
    assert_eq!(
        (seen[1].method.as_str(), seen[1].path.as_str()),
        ("POST", "/api/chat.postMessage")
    );
    assert_ne!(
        seen[1].token, seen[0].token,
        "each connection has its own token"
    );

    refusals_send_nothing(&mut s).await;
    let canaries: Vec<String> = s.api.seen().into_iter().map(|r| r.token).collect();
    assert_no_canary(&mut s, &canaries, &[files, posted]).await;
    audit_says_what_was_called(&mut s, sent).await;
}

/// Outside the grant, a climbing path, a redirect off the base: refused, nothing (more) sent.
async fn refusals_send_nothing(s: &mut Setup) {
    let before = s.api.seen().len();
    for (method, path) in [("DELETE", "/drive/v3/files/f1"), ("GET", "/drive/v2/about")] {
        let err = call(&mut s.agent, request("Drive", method, path))
            .await
            .unwrap_err();
        assert_refused(&err, Code::PermissionDenied, "POLICY");
        assert!(err.message().contains(path), "{}", err.message());
    }
    // The grant's glob would cover these paths: the path check comes first.
    for path in [
        "/drive/v3/files/../../admin",
        "/drive/v3/files/%2e%2e/x",
        "//evil.test/x",
    ] {
        let err = call(&mut s.agent, request("Drive", "GET", path))
            .await
            .unwrap_err();
        assert_refused(&err, Code::InvalidArgument, "INVALID_ARGUMENT");
    }
    // Resolving is not granted to the agent: it cannot get the token another way.
    let resolve = proto::ResolveCredentialRequest {
        connection: conn("Drive", "u1"),
        min_ttl_seconds: 0,
    };
    let err = s.agent.resolve_credential(resolve).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(s.api.seen().len(), before, "a refused call reached the API");

    let err = call(
        &mut s.agent,
        request("Drive", "GET", "/drive/v3/files/moved"),
    )
    .await
    .unwrap_err();
    assert_refused(&err, Code::FailedPrecondition, "UPSTREAM_REJECTED");
    assert!(err.message().contains("localhost"), "{}", err.message());
    assert!(!err.message().contains("steal"), "{}", err.message());
    let paths: Vec<String> = s.api.seen().into_iter().map(|r| r.path).collect();
    assert!(
        paths.ends_with(&["/drive/v3/files/moved".to_string()]),
        "{paths:?}"
    );
    assert!(
        !paths.iter().any(|p| p == "/steal"),
        "the redirect was followed"
    );
}

/// No token the API saw (nor the current ones) is in a reply, a log line or an audit record.
async fn assert_no_canary(s: &mut Setup, seen: &[String], replies: &[proto::CallResponse]) {
    let mut canaries = seen.to_vec();
    for connector in ["Drive", "Slack"] {
        canaries.push(token(&mut s.inspector, connector).await);
    }
    let replies = format!("{replies:?}");
    let logs = s.daemon.logs();
    let audit = format!("{:?}", audit_records(&mut s.admin).await);
    assert!(!logs.is_empty(), "the daemon logged nothing");
    for canary in canaries.iter().filter(|c| !c.is_empty()) {
        assert!(canary.len() >= 20, "not a token: {canary:?}");
        assert!(
            !replies.contains(canary.as_str()),
            "a token in a Call reply"
        );
        assert!(
            !logs.contains(canary.as_str()),
            "a token in the daemon's log"
        );
        assert!(!audit.contains(canary.as_str()), "a token in the audit log");
    }
}

/// Each call's record names method, host, path and query names, status and bytes; denied
/// ones say so; never a query value.
async fn audit_says_what_was_called(s: &mut Setup, posted_bytes: usize) {
    let records = audit_records(&mut s.admin).await;
    let calls: Vec<&proto::AuditRecord> =
        records.iter().filter(|r| r.operation == "Call").collect();
    let host = format!("127.0.0.1:{}", s.port);
    let listed = calls
        .iter()
        .find(|r| r.outcome == "ok" && r.detail.contains("/drive/v3/files?"))
        .expect("the file listing is audited");
    assert!(
        listed.detail.starts_with(&format!(
            "GET {host}/drive/v3/files?q=&pageSize= -> 200; 0 bytes out, "
        )),
        "{}",
        listed.detail
    );
    assert_eq!(listed.caller, AGENT);
    assert!(calls.iter().any(|r| r.outcome == "ok"
        && r.detail.starts_with(&format!(
            "POST {host}/api/chat.postMessage -> 200; {posted_bytes} bytes out"
        ))));
    assert!(calls.iter().any(|r| {
        r.outcome == "denied"
            && r.detail
                .starts_with(&format!("DELETE {host}/drive/v3/files/f1 -> no answer"))
    }));
    let all = format!("{calls:?}");
    assert!(!all.contains("Report'"), "a query value in the audit log");
    assert!(!all.contains("Quarterly"), "a body in the audit log");
}

#[tokio::test]
async fn a_refused_token_is_refreshed_once_and_the_call_retried_once() {
    let mut s = setup().await;
    *s.api.refuse.lock().unwrap() = 1;
    let files = call(&mut s.agent, list_files()).await.unwrap();
    assert_eq!(
        files.status,
        200,
        "{:?}",
        String::from_utf8_lossy(&files.body)
    );
    let seen = s.api.seen();
    assert_eq!(seen.len(), 2, "one refused request, one retry: {seen:?}");
    assert_ne!(
        seen[0].token, seen[1].token,
        "the retry did not use a refreshed token"
    );
    assert_eq!(seen[1].token, token(&mut s.inspector, "Drive").await);
    // An API that keeps refusing gets one retry, and its 401 is returned as is.
    *s.api.refuse.lock().unwrap() = 5;
    let refused = call(&mut s.agent, request("Slack", "POST", "/chat.postMessage"))
        .await
        .unwrap();
    assert_eq!(refused.status, 401);
    assert_eq!(header(&refused, "www-authenticate"), None);
    let seen = s.api.seen();
    assert_eq!(seen.len(), 4, "more than one retry: {seen:?}");
    assert_ne!(seen[2].token, seen[3].token);
}

/// A shared API-key connector with the key [`API_KEY`] going where `place` says.
async fn keyed_connector(
    admin: &mut AdminClient<Channel>,
    name: &str,
    place: (&str, &str),
    base: &str,
    ca: &str,
) {
    let config: HashMap<String, String> = [
        place,
        ("header_prefix", ""),
        ("api_base", base),
        ("ca_pem", ca),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let shared = proto::ConnectorMode::Shared;
    admin
        .create_connector(proto::CreateConnectorRequest {
            config,
            secrets: secrets(&[("api_key", API_KEY)]),
            ..new_connector(name, proto::ConnectorKind::ApiKey, shared)
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn api_keys_go_in_their_header_or_query_parameter_and_bodies_are_bounded() {
    let (api, port, api_ca) = fake_api().await;
    let limits = "[limits]\nmax_call_request_bytes = 100\nmax_call_response_bytes = 120\n\
                  max_call_stream_bytes = 150\n";
    let (daemon, mut admin, mut agent) = Daemon::start_with(POLICY, limits).with_clients().await;
    let base = format!("https://127.0.0.1:{port}");
    for (name, place) in [
        ("Keyed", ("header_name", "X-Api-Key")),
        ("KeyedQ", ("query_param", "key")),
    ] {
        keyed_connector(&mut admin, name, place, &base, &api_ca).await;
        // The agent's own guess at the key, where this connector puts it, is dropped.
        let mut r = request(name, "GET", "/keyed/ping");
        r.connection = conn(name, "");
        if place.0 == "header_name" {
            r.headers.push(proto::HttpHeader {
                name: "x-api-key".into(),
                value: "agent-guess".into(),
            });
        } else {
            r.query.push(proto::QueryParam {
                name: "key".into(),
                value: "agent-guess".into(),
            });
        }
        let answer = call(&mut agent, r).await.unwrap();
        assert_eq!(answer.status, 200, "{name}: {:?}", api.seen().last());
        assert_eq!(api.seen().last().unwrap().token, API_KEY, "{name}");
    }
    keyed_streams(&mut agent).await;
    let big = proto::CallRequest {
        connection: conn("Keyed", ""),
        ..request("Keyed", "GET", "/keyed/big")
    };
    let err = call(&mut agent, big).await.unwrap_err();
    assert_refused(&err, Code::ResourceExhausted, "MESSAGE_TOO_LARGE");
    // HEAD of the same: its Content-Length announces no body, and is not refused for it.
    let mut head = request("Keyed", "HEAD", "/keyed/big");
    head.connection = conn("Keyed", "");
    let head = call(&mut agent, head).await.unwrap();
    assert_eq!((head.status, head.body.len()), (200, 0));
    assert_eq!(header(&head, "content-length"), Some("200"));
    let before = api.seen().len();
    let mut upload = proto::CallRequest {
        connection: conn("Keyed", ""),
        ..request("Keyed", "POST", "/keyed/upload")
    };
    upload.body = vec![b'x'; 101];
    let err = call(&mut agent, upload).await.unwrap_err();
    assert_refused(&err, Code::ResourceExhausted, "MESSAGE_TOO_LARGE");
    assert_eq!(api.seen().len(), before, "an oversized body was sent");
    // An API that cannot be reached: the error names the host, never the URL with the key.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let down = format!("https://{closed}");
    keyed_connector(
        &mut admin,
        "KeyedDown",
        ("query_param", "key"),
        &down,
        &api_ca,
    )
    .await;
    let mut r = request("KeyedDown", "GET", "/keyed/ping");
    r.connection = conn("KeyedDown", "");
    let err = call(&mut agent, r).await.unwrap_err();
    assert_refused(&err, Code::Unavailable, "UPSTREAM_UNAVAILABLE");
    assert!(
        err.message().contains(&closed.to_string()),
        "{}",
        err.message()
    );
    assert!(!err.message().contains(API_KEY), "{}", err.message());
    let everything = format!("{}{:?}", daemon.logs(), audit_records(&mut admin).await);
    assert!(
        !everything.contains(API_KEY),
        "the API key in a log line or audit record"
    );
}

/// CallStream with an API key: injected as for Call; a body whose Content-Length passes
/// `max_call_stream_bytes` is refused before any of it is streamed.
async fn keyed_streams(agent: &mut BrokerClient<Channel>) {
    let keyed = |path: &str| proto::CallRequest {
        connection: conn("KeyedQ", ""),
        ..request("KeyedQ", "GET", path)
    };
    let ping = stream(agent, keyed("/keyed/ping")).await.unwrap();
    assert_eq!(
        (ping.head.status, ping.body.as_slice()),
        (200, &br#"{"ok":true}"#[..])
    );
    let Err(err) = stream(agent, keyed("/keyed/big")).await else {
        panic!("a body announced past the stream's cap was streamed");
    };
    assert_refused(&err, Code::ResourceExhausted, "MESSAGE_TOO_LARGE");
    assert!(
        err.message().contains("limits.max_call_stream_bytes"),
        "{}",
        err.message()
    );
}

/// The documented example (`clients/python/examples/call.py`): Drive files posted to Slack,
/// and a file past Call's cap downloaded through the client's CallStream, the agent never
/// seeing a token. The script runs while this test's runtime serves the fake API, so the
/// runtime has threads of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_lists_drive_files_posts_to_slack_and_streams_a_download() {
    const SIZE: u64 = 6_000_000;
    let (python, client) = support::python::client_build("python-client-call");
    let mut s = setup().await;
    let out = support::python::run_example(
        (&python, &client),
        "call.py",
        &s.daemon.grpc.to_string(),
        s.daemon.dir.path(),
        &[
            "--user",
            "u1",
            "--channel",
            "C123",
            "--download",
            &format!("big-{SIZE}"),
        ],
    );
    assert!(
        out.contains("listed 1 files; Slack answered 200 ok=True"),
        "{out}"
    );
    let sha = hex::encode(expected_hash(SIZE));
    assert!(
        out.contains(&format!("downloaded {SIZE} bytes sha256={sha}")),
        "{out}"
    );
    let seen = s.api.seen();
    let paths: Vec<&str> = seen.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/drive/v3/files",
            "/api/chat.postMessage",
            &big(SIZE) as &str
        ]
    );
    assert_eq!(seen[2].query, "alt=media");
    let canaries: Vec<String> = seen.iter().map(|r| r.token.clone()).collect();
    for canary in &canaries {
        assert!(
            !out.contains(canary.as_str()),
            "the example printed a token"
        );
    }
    assert_no_canary(&mut s, &canaries, &[]).await;
}

/// What a CallStream delivered: its head (status and headers), the body, how many pieces and
/// the largest, and the error it ended with, if any.
struct Streamed {
    head: proto::CallChunk,
    body: Vec<u8>,
    pieces: usize,
    largest: usize,
    error: Option<tonic::Status>,
}

/// Runs a CallStream to its end. Only the first message has a status or headers.
async fn stream(
    agent: &mut BrokerClient<Channel>,
    r: proto::CallRequest,
) -> Result<Streamed, tonic::Status> {
    let mut messages = agent.call_stream(r).await?.into_inner();
    let head = messages.message().await?.expect("a head message");
    assert!(head.data.is_empty(), "data in the head message");
    let (mut body, mut pieces, mut largest) = (Vec::new(), 0, 0);
    let error = loop {
        match messages.message().await {
            Ok(Some(piece)) => {
                assert_eq!((piece.status, piece.headers.len()), (0, 0));
                pieces += 1;
                largest = largest.max(piece.data.len());
                body.extend(piece.data);
            }
            Ok(None) => break None,
            Err(e) => break Some(e),
        }
    };
    Ok(Streamed {
        head,
        body,
        pieces,
        largest,
        error,
    })
}

fn big(size: u64) -> String {
    format!("/drive/v3/files/big-{size}")
}

fn expected_hash(size: u64) -> Vec<u8> {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    for i in 0..size {
        hash.update([big_byte(i)]);
    }
    hash.finalize().to_vec()
}

/// The CallStream records of the audit log whose reason contains `what`.
async fn stream_ends(admin: &mut AdminClient<Channel>, what: &str) -> Vec<proto::AuditRecord> {
    audit_records(admin)
        .await
        .into_iter()
        .filter(|r| r.operation == "CallStream" && r.reason.contains(what))
        .collect()
}

/// Past Call's cap (which refuses it), a download streams whole and byte-identical, after one
/// refused token refreshed before streaming starts; refusals send nothing; a caller hanging up
/// mid-stream is audited; no token is in a message, a log line or an audit record.
#[tokio::test]
async fn a_streamed_download_past_calls_cap_arrives_whole_and_every_end_is_audited() {
    const SIZE: u64 = 10_000_000;
    let mut s = setup().await;
    let err = call(&mut s.agent, request("Drive", "GET", &big(SIZE)))
        .await
        .unwrap_err();
    assert_refused(&err, Code::ResourceExhausted, "MESSAGE_TOO_LARGE");
    assert!(err.message().contains("max_call_response_bytes"), "{err:?}");

    *s.api.refuse.lock().unwrap() = 1;
    let before = s.api.seen().len();
    let mut r = request("Drive", "GET", &big(SIZE));
    r.headers = vec![proto::HttpHeader {
        name: "Authorization".into(),
        value: "Bearer agent-own-token".into(),
    }];
    let got = stream(&mut s.agent, r).await.unwrap();
    assert!(got.error.is_none(), "{:?}", got.error);
    assert_eq!(got.head.status, 200);
    let names: Vec<&str> = got.head.headers.iter().map(|h| h.name.as_str()).collect();
    assert!(names.contains(&"content-type"), "{names:?}");
    assert!(!names.contains(&"set-cookie"), "{names:?}");
    assert_eq!(got.body.len() as u64, SIZE);
    use sha2::Digest;
    assert!(
        sha2::Sha256::digest(&got.body).to_vec() == expected_hash(SIZE),
        "the streamed body differs from what the API sent"
    );
    assert!(got.largest <= 64 * 1024, "a piece of {} bytes", got.largest);
    assert!(got.pieces as u64 >= SIZE / (64 * 1024));
    let seen = s.api.seen()[before..].to_vec();
    assert_eq!(seen.len(), 2, "one refused request, one retry: {seen:?}");
    assert_ne!(seen[0].token, seen[1].token, "the retry's token is not new");
    assert!(seen.iter().all(|r| r.token != "agent-own-token"));

    stream_refusals_send_nothing(&mut s).await;

    a_hang_up_is_audited(&mut s).await;
    let host = format!("127.0.0.1:{}", s.port);
    let complete = stream_ends(&mut s.admin, "stream ended: complete").await;
    assert!(
        complete.iter().any(|r| r.detail
            == format!(
                "GET {host}/drive/v3/files/big-{SIZE} -> 200; 0 bytes out, {SIZE} bytes in"
            )),
        "{complete:?}"
    );

    let canaries: Vec<String> = s.api.seen().into_iter().map(|r| r.token).collect();
    for canary in canaries.iter().filter(|c| !c.is_empty()) {
        let bytes = canary.as_bytes();
        assert!(
            !got.body.windows(bytes.len()).any(|w| w == bytes),
            "a token in the body"
        );
    }
    let head = proto::CallResponse {
        status: got.head.status,
        headers: got.head.headers,
        body: Vec::new(),
    };
    assert_no_canary(&mut s, &canaries, &[head]).await;
}

/// A path outside the grant or climbing out of the base: refused, nothing sent.
async fn stream_refusals_send_nothing(s: &mut Setup) {
    let before = s.api.seen().len();
    for (method, path, code, reason) in [
        (
            "DELETE",
            "/drive/v3/files/f1",
            Code::PermissionDenied,
            "POLICY",
        ),
        ("GET", "/drive/v2/about", Code::PermissionDenied, "POLICY"),
        (
            "GET",
            "/drive/v3/files/../../admin",
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        ),
    ] {
        let Err(err) = stream(&mut s.agent, request("Drive", method, path)).await else {
            panic!("{method} {path} was streamed");
        };
        assert_refused(&err, code, reason);
    }
    assert_eq!(
        s.api.seen().len(),
        before,
        "a refused stream reached the API"
    );
}

/// A caller that takes a few pieces of a 1 GB download and hangs up: the stream's end is
/// audited, with the bytes handed on (a few pieces, not the download).
async fn a_hang_up_is_audited(s: &mut Setup) {
    let r = request("Drive", "GET", &big(1_000_000_000));
    let mut hung = s.agent.call_stream(r).await.unwrap().into_inner();
    for _ in 0..4 {
        hung.message().await.unwrap().expect("a piece");
    }
    drop(hung);
    let mut admin = s.admin.clone();
    let within = std::time::Duration::from_secs(20);
    let ended = support::wait::until(within, async || {
        stream_ends(&mut admin, "hung up").await.pop()
    })
    .await
    .expect("no audit record of the caller hanging up");
    let host = format!("127.0.0.1:{}", s.port);
    let prefix = format!("GET {host}/drive/v3/files/big-1000000000 -> 200; 0 bytes out, ");
    assert!(ended.detail.starts_with(&prefix), "{}", ended.detail);
    let handed: u64 = ended.detail[prefix.len()..]
        .trim_end_matches(" bytes in")
        .parse()
        .unwrap();
    assert!(
        (3 * 64 * 1024..100_000_000).contains(&handed),
        "{handed} bytes handed on"
    );
    assert!(
        ended
            .reason
            .starts_with("stream ended: the caller hung up before the end"),
        "{}",
        ended.reason
    );
    assert_eq!(ended.outcome, "ok");
    eprintln!("a hang-up after 3 pieces taken: {handed} bytes handed on");
}

/// A stream whose body passes `max_call_stream_bytes` stops with RESOURCE_EXHAUSTED naming it,
/// having handed on no more than the cap, and its audit record says it was cut off there.
#[tokio::test]
async fn a_stream_past_its_own_cap_stops_with_a_clear_error_and_the_audit_says_so() {
    const CAP: u64 = 1_000_000;
    let mut s = setup_with(&format!("[limits]\nmax_call_stream_bytes = {CAP}\n")).await;
    let under = stream(&mut s.agent, request("Drive", "GET", &big(CAP)))
        .await
        .unwrap();
    assert!(under.error.is_none(), "{:?}", under.error);
    assert_eq!(under.body.len() as u64, CAP);

    let over = stream(&mut s.agent, request("Drive", "GET", &big(3 * CAP)))
        .await
        .unwrap();
    assert_eq!(over.head.status, 200);
    let err = over
        .error
        .expect("a stream past its cap ended without an error");
    assert_refused(&err, Code::ResourceExhausted, "MESSAGE_TOO_LARGE");
    assert!(
        err.message().contains("limits.max_call_stream_bytes")
            && err.message().contains(&CAP.to_string()),
        "{}",
        err.message()
    );
    assert!(
        over.body.len() as u64 <= CAP,
        "{} bytes past the cap",
        over.body.len()
    );
    let expected: Vec<u8> = (0..over.body.len() as u64).map(big_byte).collect();
    assert!(over.body == expected, "the part handed on differs");
    let cut = stream_ends(&mut s.admin, "cut off").await;
    assert_eq!(cut.len(), 1, "{cut:?}");
    assert!(
        cut[0].reason.contains("limits.max_call_stream_bytes"),
        "{}",
        cut[0].reason
    );
    assert_eq!(cut[0].outcome, "error");
    assert!(
        cut[0]
            .detail
            .ends_with(&format!("; 0 bytes out, {} bytes in", over.body.len())),
        "{}",
        cut[0].detail
    );
}

/// A client-credentials connector (no user, no refresh token) whose token the API refuses: a
/// new one is asked of the real OAuth test server once, and the call sent once more.
#[tokio::test]
async fn a_refused_client_credentials_token_is_replaced_once_and_the_call_retried_once() {
    let mut s = setup().await;
    let base = format!("https://127.0.0.1:{}", s.port);
    let settings = [
        ("grant_type", "client_credentials"),
        ("scopes", "mail.read"),
        ("api_base", base.as_str()),
        ("ca_pem", s.cas.as_str()),
    ];
    create_connector(&mut s.admin, "Service", &settings).await;
    let list = || proto::CallRequest {
        connection: conn("Service", ""),
        ..request("Service", "GET", "/drive/v3/files")
    };
    let ok = call(&mut s.agent, list()).await.unwrap();
    assert_eq!(ok.status, 200, "{:?}", String::from_utf8_lossy(&ok.body));

    *s.api.refuse.lock().unwrap() = 1;
    let (before, asked) = (s.api.seen().len(), peers().oauth_stats().await);
    let files = call(&mut s.agent, list()).await.unwrap();
    assert_eq!(
        files.status,
        200,
        "{:?}",
        String::from_utf8_lossy(&files.body)
    );
    let seen = s.api.seen()[before..].to_vec();
    assert_eq!(seen.len(), 2, "one refused request, one retry: {seen:?}");
    assert_ne!(
        seen[0].token, seen[1].token,
        "the retry did not use a new token"
    );
    let now = peers().oauth_stats().await;
    assert!(
        now.client_credentials > asked.client_credentials,
        "no new token was asked for"
    );

    // An API that keeps refusing gets one retry, and its 401 is returned as is.
    *s.api.refuse.lock().unwrap() = 5;
    let before = s.api.seen().len();
    let refused = call(&mut s.agent, list()).await.unwrap();
    assert_eq!(refused.status, 401);
    assert_eq!(s.api.seen().len() - before, 2, "more than one retry");
    *s.api.refuse.lock().unwrap() = 0;
    let canaries: Vec<String> = s.api.seen().into_iter().map(|r| r.token).collect();
    assert_no_canary(&mut s, &canaries, &[ok, files, refused]).await;
}

/// An API that stops sending mid-body is cut off after `upstream_timeout_secs`; one that keeps
/// dripping is cut off at `call_stream_timeout_secs`; each error and audit record names its key.
#[tokio::test]
async fn a_stream_that_idles_or_outlives_its_deadline_is_cut_off_naming_it() {
    let limits = "[limits]\nupstream_timeout_secs = 3\ncall_stream_timeout_secs = 6\n";
    let mut s = setup_with(limits).await;
    for (path, key, least) in [
        (
            "/drive/v3/files/stall",
            "limits.upstream_timeout_secs",
            1000,
        ),
        ("/drive/v3/files/drip", "limits.call_stream_timeout_secs", 1),
    ] {
        let got = stream(&mut s.agent, request("Drive", "GET", path))
            .await
            .unwrap();
        assert_eq!(got.head.status, 200);
        let err = got.error.expect("a stalled stream ended without an error");
        assert_refused(&err, Code::Unavailable, "UPSTREAM_UNAVAILABLE");
        assert!(err.message().contains(key), "{path}: {}", err.message());
        assert!(got.body.len() >= least, "{path}: {} bytes", got.body.len());
        let cut = stream_ends(&mut s.admin, key).await;
        assert_eq!(cut.len(), 1, "{path}: {cut:?}");
        assert!(
            cut[0].reason.starts_with("stream ended: cut off: "),
            "{}",
            cut[0].reason
        );
    }
}
