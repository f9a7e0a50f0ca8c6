//! What a client written against the published contract relies on, through the gRPC API as such a
//! client uses it: reflection in both versions generic tools speak, and the answers it gets.

mod support;

use support::daemon::Daemon;
use tokio_stream::StreamExt;

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
