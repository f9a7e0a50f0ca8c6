//! What a client written against the published contract relies on, through the gRPC API as such a
//! client uses it: reflection in both versions generic tools speak, and the answers it gets.

mod support;

use credbroker::api::proto::{self, broker_client::BrokerClient};
use support::daemon::{Daemon, conn, secrets};
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
            name: name.into(),
            kind: proto::ConnectorKind::ApiKey as i32,
            mode: proto::ConnectorMode::Shared as i32,
            secrets: secrets(&[("api_key", "pat-na1-contract")]),
            ..Default::default()
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
    let daemon = Daemon::start_with(
        support::daemon::OPEN_POLICY,
        "[limits]\nuser_rate_per_sec = 0.5\nuser_burst = 3\n",
    );
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
