//! What a client written against the published contract relies on, through the gRPC API as such a
//! client uses it: reflection in both versions generic tools speak, the budgets, and one answer
//! for bad input — INVALID_ARGUMENT naming the field, before anything is sent upstream.

mod support;

use credbroker::api::proto::{self, admin_client::AdminClient, broker_client::BrokerClient};
use support::daemon::{Daemon, conn, new_connector, reason, secrets};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic_types::StatusExt;

/// The services reflection lists, asked through v1 (grpcurl, Postman) or v1alpha
/// (Python's grpcio-reflection, older tools), and whether it serves Broker's descriptor.
macro_rules! reflect {
    ($version:ident, $channel:expr) => {{
        use tonic_reflection::pb::$version::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let ask = |request| ServerReflectionRequest {
            host: String::new(),
            message_request: Some(request),
        };
        let requests = vec![
            ask(MessageRequest::ListServices(String::new())),
            ask(MessageRequest::FileContainingSymbol(
                "credbroker.v1.Broker".into(),
            )),
        ];
        let mut client = ServerReflectionClient::new($channel);
        let mut replies = client
            .server_reflection_info(tokio_stream::iter(requests))
            .await
            .expect("reflection answers")
            .into_inner();
        let (mut services, mut descriptors) = (Vec::new(), 0);
        while let Some(reply) = replies.next().await {
            match reply.expect("a reflection reply").message_response {
                Some(MessageResponse::ListServicesResponse(list)) => {
                    services.extend(list.service.into_iter().map(|s| s.name))
                }
                Some(MessageResponse::FileDescriptorResponse(files)) => {
                    descriptors += files.file_descriptor_proto.len()
                }
                other => panic!("unexpected reflection reply {other:?}"),
            }
        }
        (services, descriptors)
    }};
}

#[tokio::test]
async fn reflection_answers_in_v1_and_v1alpha() {
    let daemon = Daemon::start();
    let channel = daemon.channel_as("agent").await.unwrap();
    let (v1, v1_files) = reflect!(v1, channel.clone());
    let (v1alpha, v1alpha_files) = reflect!(v1alpha, channel);
    for services in [&v1, &v1alpha] {
        for wanted in [
            "credbroker.v1.Broker",
            "credbroker.v1.Admin",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ] {
            assert!(
                services.iter().any(|s| s == wanted),
                "{wanted} missing from {services:?}"
            );
        }
    }
    assert!(
        v1_files > 0 && v1alpha_files > 0,
        "Broker's descriptor is served by both"
    );
}

/// A shared API-key connector every user of the workspace resolves through.
async fn shared_api_key(daemon: &Daemon, name: &str) {
    let mut admin = daemon.admin().await;
    admin
        .create_connector(proto::CreateConnectorRequest {
            secrets: secrets(&[("api_key", "pat-na1-contract")]),
            ..new_connector(
                name,
                proto::ConnectorKind::ApiKey,
                proto::ConnectorMode::Shared,
            )
        })
        .await
        .expect("create the connector");
}

async fn resolve(
    agent: &mut BrokerClient<Channel>,
    connector: &str,
    user: &str,
) -> Result<(), tonic::Status> {
    let req = proto::ResolveCredentialRequest {
        connection: conn(connector, user),
        min_ttl_seconds: 0,
        ..Default::default()
    };
    agent.resolve_credential(req).await.map(|_| ())
}

#[tokio::test]
async fn one_runtime_resolving_for_many_users_fits_the_default_budgets() {
    let daemon = Daemon::start();
    shared_api_key(&daemon, "HubSpot").await;
    let agent = daemon.agent().await;
    // 16 workers in a closed loop, as the Python client that was refused 76% of the time,
    // each acting for its own users.
    let workers = (0..16).map(|worker| {
        let mut agent = agent.clone();
        tokio::spawn(async move {
            let mut refused = 0;
            for call in 0..100 {
                let user = format!("user-{worker}-{}", call % 5);
                if let Err(e) = resolve(&mut agent, "HubSpot", &user).await {
                    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
                    refused += 1;
                }
            }
            refused
        })
    });
    let refused: usize = futures::future::join_all(workers)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .sum();
    assert_eq!(refused, 0, "calls refused under the default budgets");
}

#[tokio::test]
async fn a_user_over_its_budget_is_told_when_to_retry_and_others_go_on() {
    let daemon = Daemon::start_with_config("[limits]\nuser_rate_per_sec = 0.5\nuser_burst = 3\n");
    shared_api_key(&daemon, "HubSpot").await;
    let mut agent = daemon.agent().await;
    for _ in 0..3 {
        resolve(&mut agent, "HubSpot", "alice").await.unwrap();
    }
    let refused = resolve(&mut agent, "HubSpot", "alice").await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert!(
        refused.message().contains("\"alice\""),
        "{}",
        refused.message()
    );
    let (why, _) = support::daemon::reason(&refused);
    assert_eq!(why, "RATE_LIMITED");
    let retry = refused
        .get_error_details()
        .retry_info()
        .and_then(|r| r.retry_delay)
        .expect("RetryInfo with a delay");
    assert!(
        retry > std::time::Duration::ZERO && retry <= std::time::Duration::from_secs(2),
        "one token at 0.5/s is at most 2 s away: {retry:?}"
    );
    // The same runtime acting for another user is not held back by alice's budget.
    resolve(&mut agent, "HubSpot", "bob").await.unwrap();
}

/// The field a refusal names; it must be INVALID_ARGUMENT.
fn invalid_field(status: &tonic::Status) -> String {
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let (why, metadata) = reason(status);
    assert_eq!(why, "INVALID_ARGUMENT");
    metadata.get("field").cloned().unwrap_or_default()
}

/// A listener that counts nothing but whether anyone connected to it.
struct Upstream(std::net::TcpListener);

impl Upstream {
    fn new() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        Upstream(listener)
    }

    fn addr(&self) -> std::net::SocketAddr {
        self.0.local_addr().unwrap()
    }

    fn contacted(&self) -> bool {
        self.0.accept().is_ok()
    }
}

#[tokio::test]
async fn a_caldav_url_that_is_not_an_https_url_is_invalid_argument_and_nothing_is_saved() {
    let daemon = Daemon::start();
    let mut admin = daemon.admin().await;
    admin
        .create_connector(new_connector(
            "Calendar",
            proto::ConnectorKind::Caldav,
            proto::ConnectorMode::Personal,
        ))
        .await
        .expect("a CalDAV connector whose users give the server URL");
    let upstream = Upstream::new();
    let plain_http = format!("http://{}/dav/", upstream.addr());
    let credentialed = format!("https://alice:canary-pw@{}/dav/", upstream.addr());
    for url in [
        "",
        "dav/calendars/",
        "ftp://dav.corp/",
        &plain_http,
        &credentialed,
    ] {
        let settings = [
            ("url".to_string(), url.to_string()),
            ("username".to_string(), "alice".to_string()),
        ];
        let password = secrets(&[("password", "canary-pw")]);
        let tested = admin
            .test_connection(proto::TestConnectionRequest {
                connection: conn("Calendar", "u-alice"),
                settings: settings.clone().into(),
                secrets: password.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            invalid_field(&tested),
            "settings.url",
            "{url:?}: {tested:?}"
        );
        let connected = admin
            .connect_with_credentials(proto::ConnectWithCredentialsRequest {
                connection: conn("Calendar", "u-alice"),
                settings: settings.into(),
                secrets: password,
                save_on_failure: true,
            })
            .await
            .unwrap_err();
        assert_eq!(invalid_field(&connected), "settings.url", "{url:?}");
        for refusal in [&tested, &connected] {
            assert!(!refusal.message().contains("canary"), "{refusal:?}");
        }
    }
    assert!(!upstream.contacted(), "nothing was sent upstream");
    let connection = admin
        .get_connection(proto::GetConnectionRequest {
            connection: conn("Calendar", "u-alice"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        connection.status,
        proto::ConnectionStatus::NotConnected as i32,
        "nothing saved, even with save_on_failure"
    );
}

/// The OAuth connector every endpoint test starts from: https endpoints that are never called.
fn oauth_config() -> std::collections::HashMap<String, String> {
    [
        ("client_id", "broker"),
        ("auth_url", "https://idp.test/auth"),
        ("token_url", "https://idp.test/token"),
        ("revocation_url", "https://idp.test/revoke"),
        ("userinfo_url", "https://idp.test/me"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .into()
}

async fn connector_config(
    admin: &mut AdminClient<Channel>,
    name: &str,
) -> std::collections::HashMap<String, String> {
    let req = proto::GetConnectorRequest {
        connector: name.into(),
        ..Default::default()
    };
    admin.get_connector(req).await.unwrap().into_inner().config
}

#[tokio::test]
async fn an_oauth_endpoint_that_is_not_https_is_refused_when_saved() {
    let daemon = Daemon::start();
    let mut admin = daemon.admin().await;
    let bad = [
        "http://idp.test/x",
        "https://broker:canary-pw@idp.test/x",
        "idp.test/x",
    ];
    for key in ["token_url", "auth_url", "revocation_url", "userinfo_url"] {
        for url in bad {
            let mut config = oauth_config();
            config.insert(key.into(), url.into());
            let refused = admin
                .create_connector(proto::CreateConnectorRequest {
                    config,
                    ..new_connector(
                        "Idp",
                        proto::ConnectorKind::Oauth2,
                        proto::ConnectorMode::Personal,
                    )
                })
                .await
                .unwrap_err();
            assert_eq!(invalid_field(&refused), format!("config.{key}"), "{url}");
            assert!(!refused.message().contains("idp.test"), "{refused:?}");
        }
    }
    let none = proto::ListConnectorsRequest::default();
    let listed = admin.list_connectors(none).await.unwrap().into_inner();
    assert!(listed.connectors.is_empty(), "nothing was created");

    admin
        .create_connector(proto::CreateConnectorRequest {
            config: oauth_config(),
            ..new_connector(
                "Idp",
                proto::ConnectorKind::Oauth2,
                proto::ConnectorMode::Personal,
            )
        })
        .await
        .expect("https endpoints are accepted");
    for url in bad {
        let refused = admin
            .update_connector(proto::UpdateConnectorRequest {
                connector: "Idp".into(),
                config: [("token_url".to_string(), url.to_string())].into(),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["config.token_url".into()],
                }),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(invalid_field(&refused), "config.token_url", "{url}");
        assert!(!refused.message().contains("canary"), "{refused:?}");
    }
    assert_eq!(
        connector_config(&mut admin, "Idp").await,
        oauth_config(),
        "the connector is unchanged"
    );
}
