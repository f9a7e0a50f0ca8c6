//! Day-two operations against the real daemon: Prometheus metrics, JSON logs with request ids,
//! backup and restore, key rotation.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use credbroker::api::proto::{self, admin_client::AdminClient};
use support::daemon::{Daemon, OPEN_POLICY, conn, metric, new_connector, secrets};
use support::wait;
use tonic::transport::Channel;

const CANARY_SECRET: &str = "canary-secret-6d0b1e";
const CANARY_USER: &str = "canary-user-e81f3c";
/// Calls the write load makes before a test counts it as under way.
const LOAD_UNDER_WAY: u64 = 40;

async fn api_key_connector(
    admin: &mut AdminClient<Channel>,
    name: &str,
    mode: proto::ConnectorMode,
    slots: &[(&str, &str)],
) {
    admin
        .create_connector(proto::CreateConnectorRequest {
            secrets: secrets(slots),
            ..new_connector(name, proto::ConnectorKind::ApiKey, mode)
        })
        .await
        .unwrap();
}

/// The API-key connector "Shared" holding [`CANARY_SECRET`].
async fn shared_canary_connector(admin: &mut AdminClient<Channel>) {
    let slots = [("api_key", CANARY_SECRET)];
    api_key_connector(admin, "Shared", proto::ConnectorMode::Shared, &slots).await;
}

async fn connect_user(admin: &mut AdminClient<Channel>, connector: &str, user: &str, key: &str) {
    let resp = admin
        .connect_with_credentials(proto::ConnectWithCredentialsRequest {
            connection: conn(connector, user),
            secrets: secrets(&[("api_key", key)]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.saved, "{resp:?}");
}

/// JSON logs: every line parses; one `rpc` line per call, with the request id the client saw
/// (`request_ids`) and the audit record holds; neither the canary secret nor its user.
fn assert_json_logs(logs: &str, request_ids: &[String], audit: &[proto::AuditRecord]) {
    assert!(!logs.contains(CANARY_SECRET), "secret in logs");
    assert!(!logs.contains(CANARY_USER), "end-user id in logs");
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    for id in request_ids {
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

#[tokio::test]
async fn metrics_move_and_json_logs_carry_request_ids_but_no_canary() {
    let daemon = Daemon::start_with_args(OPEN_POLICY, "", &["--log-format", "json"]);
    let mut admin = daemon.admin().await;
    let mut agent = daemon.agent().await;
    let ok_resolves = "credbroker_rpc_total{method=\"ResolveCredential\",code=\"OK\"}";
    let missing = "credbroker_rpc_total{method=\"ResolveCredential\",code=\"NOT_FOUND\"}";

    let (status, before) = daemon.http_get("/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(metric(&before, ok_resolves), 0.0);

    shared_canary_connector(&mut admin).await;
    api_key_connector(&mut admin, "Personal", proto::ConnectorMode::Personal, &[]).await;
    connect_user(&mut admin, "Personal", CANARY_USER, CANARY_SECRET).await;

    let mut request_ids = Vec::new();
    for (connector, user) in [("Shared", ""), ("Personal", CANARY_USER), ("Shared", "")] {
        let resp = agent
            .resolve_credential(proto::ResolveCredentialRequest {
                connection: conn(connector, user),
                min_ttl_seconds: 0,
                ..Default::default()
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
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    let (_, after) = daemon.http_get("/metrics").await;
    assert_eq!(metric(&after, ok_resolves), 3.0, "{after}");
    assert_eq!(metric(&after, missing), 1.0, "{after}");
    assert_eq!(
        metric(
            &after,
            "credbroker_rpc_duration_seconds_count{method=\"ResolveCredential\"}"
        ),
        4.0
    );
    assert_eq!(
        metric(&after, "credbroker_connections{status=\"connected\"}"),
        2.0,
        "{after}"
    );
    assert!(metric(&after, "credbroker_audit_records_total") >= 7.0);
    assert!(metric(&after, "credbroker_audit_flush_duration_seconds_count") >= 1.0);
    assert!(metric(&after, "credbroker_store_sync_duration_seconds_count") >= 1.0);
    assert!(after.contains("# TYPE credbroker_audit_queue_depth gauge"));
    assert_eq!(metric(&after, "credbroker_key_term"), 1.0);
    assert!(metric(&after, "credbroker_token_refresh_total{outcome=\"ok\"}") == 0.0);
    for body in [&before, &after] {
        assert!(!body.contains(CANARY_SECRET) && !body.contains(CANARY_USER));
        assert!(
            !body.contains("spiffe://"),
            "caller identities stay out of metrics"
        );
    }

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
    assert_json_logs(&daemon.logs(), &request_ids, &audit);
}

/// A configuration like the daemon's, for another store folder (same key file).
fn config_for(daemon: &Daemon, store: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(daemon.config()).unwrap();
    let path = daemon.path(&format!("{store}.toml"));
    support::daemon::write(
        &path,
        &text.replace("path = \"store\"", &format!("path = \"{store}\"")),
    );
    path
}

fn cli_ok(daemon: &Daemon, args: &[&str]) -> String {
    let out = daemon.cli(args);
    assert!(
        out.status.success(),
        "credbroker {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writers that keep the store busy ([`spawn_load`]).
struct Load {
    stop: Arc<AtomicBool>,
    /// Calls that succeeded so far, over all writers.
    calls: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// Waits until the writers have made `more` calls beyond those made so far.
    async fn run_for(&self, more: u64) {
        let target = self.calls.load(Ordering::Relaxed) + more;
        let reached = wait::until(Duration::from_secs(30), async || {
            (self.calls.load(Ordering::Relaxed) >= target).then_some(())
        })
        .await;
        assert!(
            reached.is_some(),
            "the load made fewer than {more} calls in 30 s"
        );
    }

    /// Stops the writers; how many calls succeeded. A writer that failed fails the test with
    /// `what`.
    async fn finish(self, what: &str) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect(what);
        }
        self.calls.load(Ordering::Relaxed)
    }
}

/// Writers that keep the store busy (connector updates and resolves, each audited) until
/// [`Load::finish`]. Any failure fails the test.
async fn spawn_load(daemon: &Daemon, writers: usize) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (stop, calls) = (stop.clone(), calls.clone());
        let mut admin = daemon.admin().await;
        let mut agent = daemon.agent().await;
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            while !stop.load(Ordering::Relaxed) {
                admin
                    .update_connector(proto::UpdateConnectorRequest {
                        connector: "Shared".into(),
                        config: HashMap::from([(
                            "description".to_string(),
                            format!("w{w}-{done}"),
                        )]),
                        update_mask: Some(prost_types::FieldMask {
                            paths: vec!["config.description".into()],
                        }),
                        ..Default::default()
                    })
                    .await
                    .expect("update under load");
                let cred = agent
                    .resolve_credential(proto::ResolveCredentialRequest {
                        connection: conn("Shared", ""),
                        min_ttl_seconds: 0,
                        ..Default::default()
                    })
                    .await
                    .expect("resolve under load")
                    .into_inner();
                assert_eq!(cred.secret, CANARY_SECRET);
                done += 2;
                calls.fetch_add(2, Ordering::Relaxed);
            }
        }));
    }
    Load { stop, calls, tasks }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backup_under_write_load_restores_and_verifies() {
    let daemon = Daemon::start();
    let mut admin = daemon.admin().await;
    shared_canary_connector(&mut admin).await;
    let load = spawn_load(&daemon, 4).await;
    load.run_for(LOAD_UNDER_WAY).await;

    let mut args = daemon.admin_args();
    args.extend(["backup".into(), "--out".into(), "backup.cbk".into()]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = tokio::task::block_in_place(|| cli_ok(&daemon, &argv));
    assert!(out.contains("records"), "{out}");
    // A second backup to the same file is refused, not overwritten.
    assert!(
        !tokio::task::block_in_place(|| daemon.cli(&argv))
            .status
            .success()
    );
    let calls = load.finish("a writer failed during the backup").await;
    assert!(calls > 0);
    let raw = std::fs::read(daemon.path("backup.cbk")).unwrap();
    println!("{calls} writes and resolves under load; {out}");
    assert!(
        !raw.windows(CANARY_SECRET.len())
            .any(|w| w == CANARY_SECRET.as_bytes()),
        "the backup holds a secret in the clear"
    );

    let restored = config_for(&daemon, "restored");
    let restored_arg = restored.to_str().unwrap();
    let out = cli_ok(
        &daemon,
        &["restore", "--from", "backup.cbk", "--config", restored_arg],
    );
    assert!(out.contains("restored"), "{out}");
    let verified = cli_ok(&daemon, &["audit", "verify", "--config", restored_arg]);
    assert!(verified.contains("audit chain intact"), "{verified}");

    // Never over an existing store, live or not.
    let again = daemon.cli(&["restore", "--from", "backup.cbk", "--config", restored_arg]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));
    let live = daemon.config();
    let over_live = daemon.cli(&[
        "restore",
        "--from",
        "backup.cbk",
        "--config",
        live.to_str().unwrap(),
    ]);
    assert!(!over_live.status.success());

    // The restored store opens with the same key and holds the secret.
    let key = credbroker::vault::KeySource::KeyFile(daemon.path("store.key"));
    let store = std::sync::Arc::new(
        credbroker::store::Store::open(
            &credbroker::config::StoreConfig::at(daemon.path("restored")),
            &key,
        )
        .await
        .unwrap(),
    );
    let registry = credbroker::model::Registry::new(store.clone(), &credbroker::driver::DRIVERS);
    let connector = registry.find_connector("default", "Shared").await.unwrap();
    let secrets = registry.connector_secrets(&connector).await.unwrap();
    assert_eq!(
        secrets.slots.get("api_key").unwrap().expose(),
        CANARY_SECRET
    );
    // The audit log lives beside the store, not in it: a backup does not carry it (its
    // segments are copied, or exported, on their own), so the restored store starts a new one.
    let summary = credbroker::audit::verify(&store, &daemon.path("restored/audit"))
        .await
        .unwrap();
    assert_eq!(summary.records, 0, "{summary:?}");
}

const SLOW_REWRAP: &str = "[limits]\nrewrap_batch = 4\nrewrap_pause_ms = 150\n";

async fn status(admin: &mut AdminClient<Channel>) -> proto::StoreStatus {
    admin
        .get_status(proto::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Polls GetStatus until `done` holds (at most 90 s).
async fn wait_status(
    admin: &mut AdminClient<Channel>,
    what: &str,
    done: impl Fn(&proto::StoreStatus) -> bool,
) -> proto::StoreStatus {
    let mut last = None;
    let reached = wait::until(Duration::from_secs(90), async || {
        let s = status(admin).await;
        let reached = done(&s).then(|| s.clone());
        last = Some(s);
        reached
    })
    .await;
    reached.unwrap_or_else(|| panic!("timed out waiting for {what}: {last:?}"))
}

fn rewrap_finished(s: &proto::StoreStatus) -> bool {
    s.rewrap.as_ref().is_some_and(|r| r.finished)
}

/// Connectors and connections, so the store has records of every kind to rewrap.
async fn populate(admin: &mut AdminClient<Channel>, users: usize) {
    shared_canary_connector(admin).await;
    api_key_connector(admin, "Personal", proto::ConnectorMode::Personal, &[]).await;
    for u in 0..users {
        connect_user(admin, "Personal", &format!("user-{u}"), CANARY_SECRET).await;
    }
}

async fn open_offline(daemon: &Daemon) -> std::sync::Arc<credbroker::store::Store> {
    let key = credbroker::vault::KeySource::KeyFile(daemon.path("store.key"));
    std::sync::Arc::new(
        credbroker::store::Store::open(
            &credbroker::config::StoreConfig::at(daemon.path("store")),
            &key,
        )
        .await
        .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotate_key_under_concurrent_resolves() {
    let mut daemon = Daemon::start_with(
        OPEN_POLICY,
        "[limits]\nrewrap_batch = 16\nrewrap_pause_ms = 20\n",
    );
    let mut admin = daemon.admin().await;
    populate(&mut admin, 20).await;
    let before = status(&mut admin).await;
    assert_eq!((before.current_term, before.terms.clone()), (1, vec![1]));
    assert!(before.rewrap.is_none());

    let load = spawn_load(&daemon, 4).await;
    load.run_for(LOAD_UNDER_WAY).await;
    let rotated = admin
        .rotate_key(proto::RotateKeyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rotated.current_term, 2);
    assert_eq!(
        rotated.terms,
        vec![1, 2],
        "term 1 stays until the rewrap is done"
    );
    let done = wait_status(&mut admin, "the rewrap", rewrap_finished).await;
    // Keep the load going a little past the retirement too.
    load.run_for(LOAD_UNDER_WAY).await;
    let calls = load.finish("no request failed during the rotation").await;
    let r = done.rewrap.clone().unwrap();
    println!(
        "{calls} calls under load, none failed; rewrap: {} scanned, {} re-sealed, {} pass(es)",
        r.scanned,
        r.rewrapped,
        r.pass + 1
    );
    assert_eq!(done.terms, vec![2]);
    assert_eq!(r.retired, vec![1]);
    assert!(r.rewrapped > 20, "{r:?}");
    let (_, metrics) = daemon.http_get("/metrics").await;
    assert_eq!(metric(&metrics, "credbroker_key_term"), 2.0);
    let mut args = daemon.admin_args();
    args.push("status".into());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let shown = tokio::task::block_in_place(|| cli_ok(&daemon, &argv));
    assert!(shown.contains("key term 2 (keyring holds [2])"), "{shown}");
    assert!(shown.contains("retired terms [1]"), "{shown}");

    daemon.stop();
    let store = open_offline(&daemon).await;
    let terms = store.terms_in_use().await.unwrap();
    assert_eq!(
        terms.keys().copied().collect::<Vec<_>>(),
        vec![2],
        "{terms:?}"
    );
    assert_eq!(store.vault().terms(), vec![2], "term 1's data key is gone");
    credbroker::audit::verify(&store, &daemon.path("store/audit"))
        .await
        .unwrap();
    let registry = credbroker::model::Registry::new(store.clone(), &credbroker::driver::DRIVERS);
    let connector = registry.find_connector("default", "Shared").await.unwrap();
    assert_eq!(
        registry
            .connector_secrets(&connector)
            .await
            .unwrap()
            .slots
            .get("api_key")
            .unwrap()
            .expose(),
        CANARY_SECRET
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_rewrap_resumes_where_it_stopped() {
    let mut daemon = Daemon::start_with(OPEN_POLICY, SLOW_REWRAP);
    let mut admin = daemon.admin().await;
    populate(&mut admin, 15).await;
    let mut args = daemon.admin_args();
    args.push("rotate-key".into());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = tokio::task::block_in_place(|| cli_ok(&daemon, &argv));
    assert!(out.contains("new writes use key term 2"), "{out}");

    let mid = wait_status(&mut admin, "a rewrap under way", |s| {
        s.rewrap.as_ref().is_some_and(|r| r.scanned >= 8)
    })
    .await;
    daemon.kill();
    drop(admin);
    let at_kill = {
        let store = open_offline(&daemon).await;
        let state = store.rewrap_state().await.unwrap().unwrap();
        assert!(!state.finished, "killed too late: {state:?}");
        assert_eq!(store.vault().terms(), vec![1, 2]);
        assert!(store.records_below(2).await.unwrap() > 0);
        state
    };
    assert!(at_kill.scanned >= mid.rewrap.unwrap().scanned);

    daemon.respawn();
    let mut admin = daemon.admin().await;
    let resumed = status(&mut admin).await.rewrap.unwrap();
    assert!(
        resumed.scanned >= at_kill.scanned,
        "progress went back: {resumed:?} after {at_kill:?}"
    );
    let done = wait_status(&mut admin, "the resumed rewrap", rewrap_finished).await;
    let r = done.rewrap.unwrap();
    assert_eq!(r.retired, vec![1]);
    assert_eq!(done.terms, vec![2]);
    daemon.stop();
    let store = open_offline(&daemon).await;
    let terms = store.terms_in_use().await.unwrap();
    assert_eq!(terms.keys().copied().collect::<Vec<_>>(), vec![2]);
    let records: u64 = terms.values().sum();
    // One pass from where it stopped: a restart from the beginning would have scanned the
    // records before the kill twice.
    assert_eq!(r.pass, 0, "{r:?}");
    assert!(
        r.scanned <= records,
        "scanned {} of {records} records",
        r.scanned
    );
    assert_eq!(store.vault().terms(), vec![2]);
    credbroker::audit::verify(&store, &daemon.path("store/audit"))
        .await
        .unwrap();
}
