//! Day-two operations against the real daemon: Prometheus metrics, JSON logs with request ids,
//! backup and restore, key rotation.

mod support;

use std::collections::HashMap;

use credbroker::api::proto::{self, admin_client::AdminClient};
use support::daemon::{Daemon, OPEN_POLICY};
use tonic::transport::Channel;

const CANARY_SECRET: &str = "canary-secret-6d0b1e";
const CANARY_USER: &str = "canary-user-e81f3c";

fn secret(v: &str) -> proto::SecretValue {
    proto::SecretValue { value: v.into() }
}

fn conn(connector: &str, user: &str) -> Option<proto::ConnectionRef> {
    Some(proto::ConnectionRef {
        workspace: String::new(),
        connector: connector.into(),
        user_id: user.into(),
    })
}

async fn api_key_connector(
    admin: &mut AdminClient<Channel>,
    name: &str,
    mode: proto::ConnectorMode,
    secrets: &[(&str, &str)],
) {
    admin
        .create_connector(proto::CreateConnectorRequest {
            name: name.into(),
            kind: proto::ConnectorKind::ApiKey as i32,
            mode: mode as i32,
            secrets: secrets
                .iter()
                .map(|(k, v)| (k.to_string(), secret(v)))
                .collect(),
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn connect_user(admin: &mut AdminClient<Channel>, connector: &str, user: &str, key: &str) {
    let resp = admin
        .connect_with_credentials(proto::ConnectWithCredentialsRequest {
            connection: conn(connector, user),
            secrets: HashMap::from([("api_key".to_string(), secret(key))]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.saved, "{resp:?}");
}

/// The value of the sample line `name{labels}` in a Prometheus text body (0 when absent).
fn sample(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_move_and_json_logs_carry_request_ids_but_no_canary() {
    let daemon = Daemon::start_with_args(OPEN_POLICY, "", &["--log-format", "json"]);
    let mut admin = daemon.admin().await;
    let mut agent = daemon.agent().await;
    let ok_resolves = "credbroker_rpc_total{method=\"ResolveCredential\",code=\"OK\"}";
    let missing = "credbroker_rpc_total{method=\"ResolveCredential\",code=\"NOT_FOUND\"}";

    let (status, before) = daemon.http_get("/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(sample(&before, ok_resolves), 0.0);

    api_key_connector(
        &mut admin,
        "Shared",
        proto::ConnectorMode::Shared,
        &[("api_key", CANARY_SECRET)],
    )
    .await;
    api_key_connector(&mut admin, "Personal", proto::ConnectorMode::Personal, &[]).await;
    connect_user(&mut admin, "Personal", CANARY_USER, CANARY_SECRET).await;

    let mut request_ids = Vec::new();
    for (connector, user) in [("Shared", ""), ("Personal", CANARY_USER), ("Shared", "")] {
        let resp = agent
            .resolve_credential(proto::ResolveCredentialRequest {
                connection: conn(connector, user),
                min_ttl_seconds: 0,
            })
            .await
            .unwrap();
        let id = resp.metadata().get("x-request-id").unwrap();
        request_ids.push(id.to_str().unwrap().to_string());
        assert_eq!(resp.into_inner().secret, CANARY_SECRET);
    }
    let err = agent
        .resolve_credential(proto::ResolveCredentialRequest {
            connection: conn("Nope", CANARY_USER),
            min_ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    let (_, after) = daemon.http_get("/metrics").await;
    assert_eq!(sample(&after, ok_resolves), 3.0, "{after}");
    assert_eq!(sample(&after, missing), 1.0, "{after}");
    assert_eq!(
        sample(
            &after,
            "credbroker_rpc_duration_seconds_count{method=\"ResolveCredential\"}"
        ),
        4.0
    );
    assert_eq!(
        sample(&after, "credbroker_connections{status=\"connected\"}"),
        2.0,
        "{after}"
    );
    assert!(sample(&after, "credbroker_audit_records_total") >= 7.0);
    assert!(sample(&after, "credbroker_audit_flush_duration_seconds_count") >= 1.0);
    assert!(sample(&after, "credbroker_store_sync_duration_seconds_count") >= 1.0);
    assert!(after.contains("# TYPE credbroker_audit_queue_depth gauge"));
    assert_eq!(sample(&after, "credbroker_key_term"), 1.0);
    assert!(sample(&after, "credbroker_token_refresh_total{outcome=\"ok\"}") == 0.0);
    for body in [&before, &after] {
        assert!(!body.contains(CANARY_SECRET) && !body.contains(CANARY_USER));
        assert!(
            !body.contains("spiffe://"),
            "caller identities stay out of metrics"
        );
    }

    // JSON logs: every line parses; one `rpc` line per call, with the request id the client
    // saw and the audit record holds.
    let audit = admin
        .query_audit(proto::QueryAuditRequest {
            limit: 1000,
            operation: "ResolveCredential".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    let logs = daemon.logs();
    assert!(!logs.contains(CANARY_SECRET), "secret in logs");
    assert!(!logs.contains(CANARY_USER), "end-user id in logs");
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    for id in &request_ids {
        let line = lines
            .iter()
            .find(|v| v["fields"]["request_id"] == id.as_str())
            .unwrap_or_else(|| panic!("no log line for request {id}:\n{logs}"));
        assert_eq!(line["fields"]["message"], "rpc");
        assert_eq!(line["fields"]["op"], "ResolveCredential");
        assert_eq!(line["fields"]["caller"], support::daemon::AGENT);
        assert_eq!(line["fields"]["outcome"], "ok");
        assert_eq!(line["fields"]["code"], "OK");
        assert!(line["fields"]["elapsed_us"].is_u64());
        assert_eq!(line["level"], "INFO");
        assert!(
            audit.iter().any(|r| &r.request_id == id),
            "request {id} not in the audit log"
        );
    }
}
