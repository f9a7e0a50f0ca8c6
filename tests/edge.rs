//! The edge under floods: what a client that is not welcome, or too eager, can hold of the
//! broker. Each test counts outcomes (connections held, refused, closed), never timings.

mod support;

use std::sync::Arc;
use std::time::Duration;

use credbroker::api::proto;
use support::daemon::{Daemon, new_connector, raise_own_nofile, unit_nofile};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Adds `keys` at the top of the configuration's `[section]` and restarts the daemon on it.
fn reconfigure(daemon: &mut Daemon, section: &str, keys: &str) {
    let path = daemon.config();
    let text = std::fs::read_to_string(&path).unwrap();
    let header = format!("[{section}]\n");
    assert!(text.contains(&header), "no {header} in the test config");
    std::fs::write(&path, text.replace(&header, &format!("{header}{keys}\n"))).unwrap();
    daemon.restart();
}

/// A TLS client of the HTTPS listener trusting the test CA, limited to `versions`.
fn https_client(
    daemon: &Daemon,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut daemon.ca.cert_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    TlsConnector::from(Arc::new(config))
}

/// The gRPC listener answers an agent: a resolve of a connector that does not exist is
/// NOT_FOUND (an answer from the broker, not a refused or hung connection).
async fn assert_grpc_answers(daemon: &Daemon) {
    let missing = daemon
        .agent()
        .await
        .resolve_credential(proto::ResolveCredentialRequest {
            connection: Some(proto::ConnectionRef {
                connector: "nothing-here".into(),
                ..Default::default()
            }),
            min_ttl_seconds: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");
}

#[tokio::test]
async fn idle_https_connections_are_capped_closed_and_never_starve_grpc() {
    let mut daemon = Daemon::start();
    reconfigure(
        &mut daemon,
        "http",
        "max_connections = 8\nheader_timeout_secs = 5\nmax_connection_secs = 10",
    );
    let addr = daemon.http.expect("http listener");
    let tls13 = https_client(&daemon, &[&rustls::version::TLS13]);
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();

    // 24 clients finish a handshake and then say nothing, as a slowloris would.
    let (mut held, mut refused) = (Vec::new(), 0);
    for _ in 0..24 {
        let tcp = TcpStream::connect(addr).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(5), tls13.connect(name.clone(), tcp)).await {
            Ok(Ok(tls)) => held.push(tls),
            _ => refused += 1,
        }
    }
    assert!(
        held.len() <= 8,
        "{} connections held past the cap of 8",
        held.len()
    );
    assert!(refused >= 16, "only {refused} of 24 refused at a cap of 8");

    // While they are held, the gRPC listener answers as usual.
    assert_grpc_answers(&daemon).await;

    // The broker closes every silent connection itself.
    for mut tls in held {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(60), tls.read(&mut byte))
            .await
            .expect("the broker closes a connection that sends no request");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }

    // Served again once they are gone, and the refusals are counted.
    let (status, metrics) = daemon.http_get("/metrics").await;
    assert_eq!(status, 200);
    let counted = support::daemon::metric(&metrics, "credbroker_http_connections_refused_total");
    assert!(counted >= 16.0, "{counted} refusals counted");

    // TLS 1.2 is not offered unless configured.
    let tls12 = https_client(&daemon, &[&rustls::version::TLS12]);
    let tcp = TcpStream::connect(addr).await.unwrap();
    assert!(
        tls12.connect(name, tcp).await.is_err(),
        "a TLS 1.2 handshake succeeded"
    );
}

async fn audit_head(daemon: &Daemon) -> u64 {
    let mut admin = daemon.admin().await;
    let head = admin.get_audit_head(proto::GetAuditHeadRequest {}).await;
    head.unwrap().into_inner().seq
}

#[tokio::test]
async fn floods_of_junk_callbacks_and_refused_handshakes_write_a_few_records() {
    let mut daemon = Daemon::start();
    let before = audit_head(&daemon).await;

    // 10,000 OAuth callbacks with states the broker never issued.
    let https = daemon.https();
    let http = daemon.http.expect("http listener");
    let (mut refused, mut limited) = (0, 0);
    for i in 0..10_000 {
        let url = format!("https://{http}/oauth/callback?state=junk{i}&code=x");
        match https.get(url).send().await.unwrap().status().as_u16() {
            400 => refused += 1,
            429 => limited += 1,
            other => panic!("a junk callback answered {other}"),
        }
    }
    assert_eq!(refused + limited, 10_000);

    // 2,000 TLS handshakes without a client certificate on the gRPC port.
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let anonymous = https_client(&daemon, &[&rustls::version::TLS13]);
    let mut handshakes = Vec::new();
    for _ in 0..16 {
        let (anonymous, name, grpc) = (anonymous.clone(), name.clone(), daemon.grpc);
        handshakes.push(tokio::spawn(async move {
            for _ in 0..125 {
                let tcp = TcpStream::connect(grpc).await.unwrap();
                // The server may finish its side before it refuses; either way nothing is served.
                if let Ok(mut tls) = anonymous.connect(name.clone(), tcp).await {
                    let mut byte = [0u8; 1];
                    let _ = tls.read(&mut byte).await;
                }
            }
        }));
    }
    for task in handshakes {
        task.await.unwrap();
    }

    // Legitimate callers are served throughout, and the audit log grew by a handful.
    assert_grpc_answers(&daemon).await;
    let grown = audit_head(&daemon).await - before;
    assert!(grown <= 20, "12,000 refusals wrote {grown} audit records");

    // The summaries are written at the window's end; the chain verifies with them.
    daemon.stop();
    let config = daemon.config();
    let verify = daemon.cli(&["audit", "verify", "--config", config.to_str().unwrap()]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    println!("callbacks refused {refused}, rate-limited {limited}; audit grew by {grown}");
}

#[tokio::test]
async fn metrics_can_require_a_bearer_token() {
    let mut daemon = Daemon::start();
    let token = "scrape-token-0123456789";
    std::fs::write(daemon.path("metrics.token"), format!("{token}\n")).unwrap();
    reconfigure(
        &mut daemon,
        "http",
        "metrics_token_file = \"metrics.token\"",
    );
    let url = format!("https://{}/metrics", daemon.http.expect("http listener"));
    let https = daemon.https();
    let anonymous = https.get(&url).send().await.unwrap();
    assert_eq!(anonymous.status().as_u16(), 401);
    let wrong = https
        .get(&url)
        .bearer_auth("scrape-token-0123456788")
        .send();
    assert_eq!(wrong.await.unwrap().status().as_u16(), 401);
    let scraped = https.get(&url).bearer_auth(token).send().await.unwrap();
    assert_eq!(scraped.status().as_u16(), 200);
    assert!(
        scraped
            .text()
            .await
            .unwrap()
            .contains("credbroker_rpc_total")
    );
    // Probes need no token.
    assert_eq!(daemon.http_get("/healthz").await.0, 200);
    // The store's free disk space is watched and shown.
    let free = support::wait::until(Duration::from_secs(30), async || {
        let body = https.get(&url).bearer_auth(token).send().await.ok()?;
        let free = support::daemon::metric(&body.text().await.ok()?, "credbroker_store_free_bytes");
        (free > 0.0).then_some(free)
    })
    .await;
    assert!(
        free.is_some(),
        "credbroker_store_free_bytes never became positive"
    );
}

/// The limit the issue measured the latch under; tighter than the unit's, so the test runs at
/// the lower of the two.
const ISSUE_NOFILE: u64 = 1024;

/// A process's `Max open files` soft limit, from /proc.
fn nofile_of(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files"));
    let fields: Vec<&str> = line.unwrap().split_whitespace().collect();
    fields[3].parse().unwrap()
}

/// What a flood of idle HTTPS clients got: handshakes finished (held until the broker closed
/// them) and connections refused (closed at accept, or the handshake failed).
#[derive(Default)]
struct Flood {
    held: std::sync::atomic::AtomicU64,
    refused: std::sync::atomic::AtomicU64,
}

/// One idle client of the flood: connects, finishes the handshake and says nothing until the
/// broker closes the connection, then comes back, until `stop`.
async fn idle_client(
    addr: std::net::SocketAddr,
    tls: TlsConnector,
    flood: Arc<Flood>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    while !*stop.borrow() {
        let attempt = async {
            let tcp = TcpStream::connect(addr).await.ok()?;
            tls.connect(name.clone(), tcp).await.ok()
        };
        let Some(mut held) = tokio::time::timeout(Duration::from_secs(15), attempt)
            .await
            .ok()
            .flatten()
        else {
            flood.refused.fetch_add(1, Relaxed);
            // Paces the retries of a refused client (not a measurement).
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        flood.held.fetch_add(1, Relaxed);
        let mut byte = [0u8; 1];
        tokio::select! {
            _ = held.read(&mut byte) => {}
            _ = stop.changed() => return,
        }
    }
}

/// OAuth callbacks while the listener is flooded: each is served (400/429) or refused
/// cleanly (the connection closed); none may hang. Returns (served, refused, hung).
async fn callbacks(daemon: &Daemon, n: usize) -> (usize, usize, usize) {
    let http = daemon.http.expect("http listener");
    let (mut served, mut refused, mut hung) = (0, 0, 0);
    for i in 0..n {
        let url = format!("https://{http}/oauth/callback?state=flood{i}&code=x");
        match daemon.https().get(url).send().await {
            Ok(r) if [400, 429].contains(&r.status().as_u16()) => served += 1,
            Ok(r) => panic!("a junk callback answered {}", r.status()),
            Err(e) if e.is_timeout() => hung += 1,
            Err(_) => refused += 1,
        }
    }
    (served, refused, hung)
}

/// `n` resolves of the shared key over `channels` fresh connections: how many succeeded.
async fn resolves(daemon: &Daemon, channels: usize, n: usize) -> usize {
    let mut ok = 0;
    for _ in 0..channels {
        let Ok(channel) = daemon.channel_as("agent").await else {
            continue;
        };
        let mut agent = proto::broker_client::BrokerClient::new(channel);
        for _ in 0..n {
            let req = proto::ResolveCredentialRequest {
                connection: support::daemon::conn("Key", ""),
                min_ttl_seconds: 0,
                ..Default::default()
            };
            ok += usize::from(agent.resolve_credential(req).await.is_ok());
        }
    }
    ok
}

/// Creates a shared API-key connector `name` (connected: its key comes with it).
async fn key_connector(
    admin: &mut proto::admin_client::AdminClient<tonic::transport::Channel>,
    name: &str,
) -> Result<tonic::Response<proto::Connector>, tonic::Status> {
    let secrets = support::daemon::secrets(&[("api_key", "k-123")]);
    let req = proto::CreateConnectorRequest {
        secrets,
        ..new_connector(
            name,
            proto::ConnectorKind::ApiKey,
            proto::ConnectorMode::Shared,
        )
    };
    admin.create_connector(req).await
}

#[tokio::test]
async fn idle_tls_floods_under_the_units_descriptor_limit_leave_the_broker_serving() {
    // The test holds the 1,100 client sockets itself, beside the peers' and the daemon's pipes.
    raise_own_nofile(4096);
    let mut daemon = Daemon::start();
    let unit = unit_nofile();
    assert!(
        unit >= ISSUE_NOFILE,
        "the unit gives only {unit} descriptors"
    );
    daemon.limit_descriptors(unit.min(ISSUE_NOFILE));
    let pid = daemon.pid();
    assert_eq!(nofile_of(pid), unit.min(ISSUE_NOFILE));
    let mut admin = daemon.admin().await;
    let created = key_connector(&mut admin, "Key").await;
    created.expect("create the key connector");

    // 1,100 idle TLS clients on the HTTPS port, each coming back when it is closed.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let flood = Arc::new(Flood::default());
    let tls13 = https_client(&daemon, &[&rustls::version::TLS13]);
    let http = daemon.http.expect("http listener");
    let clients: Vec<_> = (0..1_100)
        .map(|_| {
            tokio::spawn(idle_client(
                http,
                tls13.clone(),
                flood.clone(),
                stopped.clone(),
            ))
        })
        .collect();
    support::wait::until(Duration::from_secs(60), async || {
        let seen = flood.held.load(std::sync::atomic::Ordering::Relaxed)
            + flood.refused.load(std::sync::atomic::Ordering::Relaxed);
        (seen >= 1_100).then_some(())
    })
    .await
    .expect("the flood's clients never all connected");

    // While it lasts: every resolve succeeds, over new connections too, and the callback is
    // served or refused cleanly.
    let during = resolves(&daemon, 10, 5).await;
    let (served, refused, hung) = callbacks(&daemon, 50).await;
    stop.send(true).unwrap();
    for client in clients {
        client.await.unwrap();
    }
    let held = flood.held.load(std::sync::atomic::Ordering::Relaxed);
    let flood_refused = flood.refused.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "flood: {held} handshakes held, {flood_refused} refused; resolves {during}/50; \
         callbacks served {served}, refused {refused}, hung {hung}"
    );
    assert_eq!(during, 50, "resolves failed under the flood");
    assert_eq!(hung, 0, "callbacks hung under the flood");
    assert!(flood_refused > 0, "the cap never refused the flood");

    // Once it is gone: served as usual, writes included, by the same process.
    assert_eq!(resolves(&daemon, 2, 5).await, 10);
    assert_eq!(daemon.http_get("/healthz").await.0, 200);
    assert_eq!(callbacks(&daemon, 1).await, (1, 0, 0));
    let after = key_connector(&mut admin, "Key after").await;
    assert!(after.is_ok(), "the store refuses writes: {after:?}");
    assert_eq!(daemon.pid(), pid);
}

/// The daemon's resident and peak resident memory, in KiB (`VmRSS`, `VmHWM`).
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        let line = status.lines().find_map(|l| l.strip_prefix(name)).unwrap();
        line.trim().trim_end_matches("kB").trim().parse().unwrap()
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// A TLS client of the gRPC listener speaking raw HTTP/2 as `name`.
async fn raw_h2(daemon: &Daemon, name: &str) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut daemon.ca.cert_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let files = daemon.files(name);
    let certs = rustls_pemfile::certs(&mut std::fs::read(&files.cert).unwrap().as_slice())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pemfile::private_key(&mut std::fs::read(&files.key).unwrap().as_slice())
        .unwrap()
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(daemon.grpc).await.unwrap();
    let server = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    TlsConnector::from(Arc::new(config))
        .connect(server, tcp)
        .await
        .unwrap()
}

/// An HTTP/2 frame: 9-byte header, then the payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A HEADERS block of literal fields without indexing (HPACK §6.2.2), no Huffman coding.
fn hpack(headers: &[(&str, &str)]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in headers {
        block.push(0);
        for s in [name, value] {
            assert!(
                s.len() < 127,
                "a header this long needs a multi-byte length"
            );
            block.push(s.len() as u8);
            block.extend_from_slice(s.as_bytes());
        }
    }
    block
}

/// Reads one frame: (type, flags, stream, payload).
async fn read_frame(
    tls: &mut tokio_rustls::client::TlsStream<TcpStream>,
) -> std::io::Result<(u8, u8, u32, Vec<u8>)> {
    let mut header = [0u8; 9];
    tls.read_exact(&mut header).await?;
    let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
    let stream = u32::from_be_bytes(header[5..9].try_into().unwrap()) & 0x7fff_ffff;
    let mut payload = vec![0u8; length];
    tls.read_exact(&mut payload).await?;
    Ok((header[3], header[4], stream, payload))
}

/// Opens `n` ResolveCredential streams on one connection without waiting for the server's
/// leave, each with headers only; returns how many the server refused (RST_STREAM
/// REFUSED_STREAM), and whether it ended the connection (GOAWAY).
async fn open_streams(daemon: &Daemon, n: u32) -> (u32, bool) {
    use tokio::io::AsyncWriteExt;
    const SETTINGS: u8 = 0x4;
    const HEADERS: u8 = 0x1;
    const RST_STREAM: u8 = 0x3;
    const GOAWAY: u8 = 0x7;
    const REFUSED_STREAM: u32 = 0x7;
    let mut tls = raw_h2(daemon, "agent").await;
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    tls.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    let block = hpack(&[
        (":method", "POST"),
        (":scheme", "https"),
        (":path", "/credbroker.v1.Broker/ResolveCredential"),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]);
    let mut burst = Vec::new();
    for i in 0..n {
        // END_HEADERS, not END_STREAM: each stream stays open, waiting for its body.
        burst.extend(frame(HEADERS, 0x4, 2 * i + 1, &block));
    }
    tls.write_all(&burst).await.unwrap();
    let (mut refused, mut goaway) = (std::collections::BTreeSet::new(), false);
    let reading = async {
        while let Ok((kind, flags, stream, payload)) = read_frame(&mut tls).await {
            match kind {
                SETTINGS if flags & 1 == 0 => {
                    tls.write_all(&frame(SETTINGS, 1, 0, &[])).await.unwrap();
                }
                RST_STREAM
                    if u32::from_be_bytes(payload[..4].try_into().unwrap()) == REFUSED_STREAM =>
                {
                    refused.insert(stream);
                }
                GOAWAY => {
                    goaway = true;
                    return;
                }
                _ => {}
            }
            if refused.len() as u32 + STREAMS >= n {
                return;
            }
        }
    };
    // A safety net only: the outcome is what was counted.
    let _ = tokio::time::timeout(Duration::from_secs(30), reading).await;
    (refused.len() as u32, goaway)
}

/// `[grpc] max_concurrent_streams` in the stream test.
const STREAMS: u32 = 16;

/// Eight concurrent requests of almost 32 MiB, each on its own connection: the agent's
/// ResolveCredential (allowed, but not that large) and the stranger's SendEmail (a caller in no
/// policy). Returns (index, code, message) of each refusal.
async fn huge_requests(daemon: &Daemon) -> Vec<(usize, tonic::Code, String)> {
    // Just under the old 32 MiB limit, so an unfixed broker would read and decode them all.
    let huge = "x".repeat(32 * 1024 * 1024 - 1024);
    let mut calls = Vec::new();
    for i in 0..8 {
        let (channel, huge) = (
            daemon.channel_as(if i % 2 == 0 { "agent" } else { "stranger" }),
            huge.clone(),
        );
        let channel = channel.await.unwrap();
        calls.push(tokio::spawn(async move {
            let mut broker = proto::broker_client::BrokerClient::new(channel);
            let refused = if i % 2 == 0 {
                // The agent may resolve, but not with 32 MiB.
                let req = proto::ResolveCredentialRequest {
                    connection: support::daemon::conn(&huge, ""),
                    min_ttl_seconds: 0,
                    ..Default::default()
                };
                broker.resolve_credential(req).await.unwrap_err()
            } else {
                // The stranger is in no policy: refused before its message is read.
                let req = proto::SendEmailRequest {
                    connection: support::daemon::conn("Mail", ""),
                    text_body: huge,
                    ..Default::default()
                };
                broker.send_email(req).await.unwrap_err()
            };
            (i, refused.code(), refused.message().to_string())
        }));
    }
    let mut outcomes = Vec::new();
    for call in calls {
        outcomes.push(call.await.unwrap());
    }
    outcomes
}

#[tokio::test]
async fn oversized_requests_and_excess_streams_are_refused_before_memory_grows() {
    let mut daemon = Daemon::start();
    reconfigure(
        &mut daemon,
        "grpc",
        &format!("max_concurrent_streams = {STREAMS}"),
    );
    daemon.issue("spiffe://test/stranger", "stranger");
    let pid = daemon.pid();
    assert_grpc_answers(&daemon).await;
    let (rss_before, hwm_before) = memory_kib(pid);

    let outcomes = huge_requests(&daemon).await;
    let (_, hwm_requests) = memory_kib(pid);

    // More streams than allowed on one connection: the excess is refused, none served.
    let (refused, goaway) = open_streams(&daemon, 4 * STREAMS).await;

    let (rss_after, hwm_after) = memory_kib(pid);
    let mib = |kib: u64| kib.saturating_sub(hwm_before) / 1024;
    let codes: Vec<_> = outcomes.iter().map(|(_, code, _)| *code).collect();
    println!(
        "8 requests of 32 MiB: {codes:?}; streams refused {refused} (goaway {goaway}); \
         VmRSS {rss_before} → {rss_after} KiB, VmHWM {hwm_before} → {hwm_after} KiB \
         (+{} MiB after the requests, +{} MiB in all)",
        mib(hwm_requests),
        mib(hwm_after)
    );
    for (i, code, message) in &outcomes {
        let expected = if i % 2 == 0 {
            tonic::Code::ResourceExhausted
        } else {
            tonic::Code::PermissionDenied
        };
        assert_eq!(*code, expected, "call {i}: {message}");
    }
    assert!(
        goaway || refused >= 3 * STREAMS,
        "{refused} of {} excess streams refused",
        3 * STREAMS
    );
    // The bound: a sixteenth of what was sent (256 MiB), less than one message.
    assert!(
        mib(hwm_after) <= 16,
        "the daemon's peak memory grew by {} MiB",
        mib(hwm_after)
    );
    assert_grpc_answers(&daemon).await;
    assert_eq!(daemon.pid(), pid);
}

#[tokio::test]
async fn grpc_connections_from_one_peer_are_capped_and_given_back() {
    let mut daemon = Daemon::start();
    reconfigure(&mut daemon, "grpc", "max_connections_per_peer = 4");
    let (mut held, mut refused) = (Vec::new(), 0);
    for _ in 0..8 {
        match daemon.channel_as("agent").await {
            Ok(channel) => held.push(channel),
            Err(_) => refused += 1,
        }
    }
    assert_eq!((held.len(), refused), (4, 4), "connections held, refused");
    // The connections held are served as usual.
    for channel in &held {
        let mut agent = proto::broker_client::BrokerClient::new(channel.clone());
        let req = proto::ResolveCredentialRequest {
            connection: support::daemon::conn("nothing-here", ""),
            min_ttl_seconds: 0,
            ..Default::default()
        };
        let missing = agent.resolve_credential(req).await.unwrap_err();
        assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");
    }
    // Closed, they give their places back.
    drop(held);
    let back = support::wait::until(Duration::from_secs(30), async || {
        let channels: Vec<_> =
            futures::future::join_all((0..4).map(|_| daemon.channel_as("agent")))
                .await
                .into_iter()
                .filter_map(Result::ok)
                .collect();
        (channels.len() == 4).then_some(channels)
    })
    .await;
    assert!(
        back.is_some(),
        "the places of closed connections never came back"
    );
}
