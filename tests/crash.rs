//! SIGKILL at random points under write load — connector changes, connections saved, OAuth
//! token refreshes, and the audit record of every call — a hundred times. After each kill the
//! audit chain verifies on the closed store (a torn last batch allowed: it was never
//! acknowledged), and after each restart every write the daemon acknowledged before the kill is
//! there, and each connection saved has its lifecycle event (the connect in flight: both or
//! neither). The audit log's segments are small, so kills also land mid-roll.
//!
//! The pauses before the kills come from a seeded generator. The test prints its seed first
//! (`crash test seed: N`, shown with the output of a failing test); to replay a failing run,
//! with every round's pause the same as in that run, the failing round's included:
//!
//! ```text
//! CRASH_SEED=N cargo test --test crash -- --nocapture
//! ```
//!
//! Without `CRASH_SEED` the seed is random. (The pauses replay exactly; how far each writer
//! got when the kill came still depends on the machine's timing.)

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use credbroker::api::proto::{self, admin_client::AdminClient, broker_client::BrokerClient};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::daemon::{Daemon, conn, new_connector, secrets};
use support::oauth::{connect, with_connection};
use tonic::transport::Channel;

const KILLS: usize = 100;
const OAUTH: &str = "Team Mail";
const KEYS: &str = "Personal Keys";
/// Segments of 64 KiB: a roll every ~150 records.
const AUDIT: &str = "[audit]\nsegment_bytes = 65536\n";
/// The environment variable that replays a run's pauses (see the module's comment).
const SEED_VAR: &str = "CRASH_SEED";

/// The seed of the pauses: `CRASH_SEED` if set, else a random one; printed either way.
fn seed() -> u64 {
    let seed = match std::env::var(SEED_VAR) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{SEED_VAR}={v:?} is not a u64: {e}")),
        Err(_) => rand::random(),
    };
    eprintln!("crash test seed: {seed} (replay with {SEED_VAR}={seed})");
    seed
}

#[derive(Default)]
struct Acked {
    connectors: Vec<String>,
    keys: Vec<(String, String)>,
    refreshes: usize,
}

/// Starts the round's writers on the daemon: connectors created, personal keys saved, OAuth
/// refreshes forced; each records in `acked` what the daemon acknowledged, until a call fails.
async fn spawn_load(
    daemon: &Daemon,
    round: usize,
    acked: &Arc<Mutex<Acked>>,
) -> tokio::task::JoinSet<()> {
    let mut load = tokio::task::JoinSet::new();
    let (admin, agent) = (daemon.admin().await, daemon.agent().await);
    {
        let (mut admin, acked) = (admin.clone(), acked.clone());
        load.spawn(async move {
            for i in 0.. {
                let name = format!("r{round}-c{i}");
                let req = new_connector(
                    &name,
                    proto::ConnectorKind::ApiKey,
                    proto::ConnectorMode::Shared,
                );
                if admin.create_connector(req).await.is_err() {
                    return;
                }
                acked.lock().unwrap().connectors.push(name);
            }
        });
    }
    {
        let (mut admin, acked) = (admin.clone(), acked.clone());
        load.spawn(async move {
            for i in 0.. {
                let (user, key) = (format!("r{round}-u{i}"), format!("key-{round}-{i}"));
                let req = proto::ConnectWithCredentialsRequest {
                    connection: conn(KEYS, &user),
                    secrets: secrets(&[("api_key", &key)]),
                    ..Default::default()
                };
                if admin.connect_with_credentials(req).await.is_err() {
                    return;
                }
                acked.lock().unwrap().keys.push((user, key));
            }
        });
    }
    {
        let (mut agent, acked) = (agent.clone(), acked.clone());
        load.spawn(async move {
            loop {
                // A minimum lifetime longer than any token forces a refresh on every call.
                let req = proto::ResolveCredentialRequest {
                    connection: conn(OAUTH, "u1"),
                    min_ttl_seconds: 3600,
                    ..Default::default()
                };
                if agent.resolve_credential(req).await.is_err() {
                    return;
                }
                acked.lock().unwrap().refreshes += 1;
            }
        });
    }
    load
}

/// Every connector and key acknowledged in `round` is there after the restart.
async fn assert_acked_kept(
    admin: &mut AdminClient<Channel>,
    agent: &mut BrokerClient<Channel>,
    round: usize,
    acked: &Acked,
) {
    let listed = admin
        .list_connectors(proto::ListConnectorsRequest::default())
        .await
        .unwrap()
        .into_inner();
    for name in &acked.connectors {
        assert!(
            listed.connectors.iter().any(|c| &c.name == name),
            "round {round}: acknowledged connector {name} lost"
        );
    }
    for (user, key) in &acked.keys {
        let got = agent
            .resolve_credential(proto::ResolveCredentialRequest {
                connection: conn(KEYS, user),
                min_ttl_seconds: 0,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("round {round}: acknowledged key of {user} lost: {e:?}"));
        assert_eq!(&got.into_inner().secret, key, "round {round}");
    }
}

/// A connection and its `connected` event are one write: after the kill, every acknowledged
/// key has its event, and the connect that was in flight left both or neither. Returns the
/// newest cursor read, to read on from.
async fn assert_events_match(
    admin: &mut AdminClient<Channel>,
    agent: &mut BrokerClient<Channel>,
    round: usize,
    acked: &Acked,
    after: u64,
) -> u64 {
    let mut stream = admin
        .watch_events(proto::WatchEventsRequest {
            after_cursor: after,
            kinds: vec!["connected".into()],
            backlog_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (mut newest, mut users) = (after, std::collections::BTreeSet::new());
    while let Some(event) = stream.message().await.unwrap() {
        newest = event.cursor;
        if event.connector == KEYS {
            users.insert(event.user_id);
        }
    }
    for (user, _) in &acked.keys {
        assert!(
            users.contains(user),
            "round {round}: {user} connected without its event"
        );
    }
    let in_flight = format!("r{round}-u{}", acked.keys.len());
    let stored = agent
        .resolve_credential(proto::ResolveCredentialRequest {
            connection: conn(KEYS, &in_flight),
            ..Default::default()
        })
        .await
        .is_ok();
    assert_eq!(
        stored,
        users.contains(&in_flight),
        "round {round}: the connect in flight at the kill stored its connection ({stored}) but not its event, or the reverse"
    );
    assert!(
        users.len() <= acked.keys.len() + 1,
        "round {round}: events of connections never made: {users:?}"
    );
    newest
}

/// Every acknowledged call was answered only after its audit record was durable: the log
/// holds at least as many records as calls were acknowledged.
async fn assert_audit_covers(admin: &mut AdminClient<Channel>, round: usize, acked_calls: u64) {
    let head = admin
        .get_audit_head(proto::GetAuditHeadRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        head.seq >= acked_calls,
        "round {round}: the audit log holds {} records, but {acked_calls} calls were acknowledged",
        head.seq
    );
}

/// Whether the kill of `round` lost a token rotation. A kill between the provider rotating the
/// refresh token and the store saving it loses the rotation (nobody was answered, so no
/// acknowledged write is lost); the provider then sees the old token reused and revokes the
/// grant. The connection must say so (EXPIRED), and reconnecting restores it.
async fn rotation_lost(
    admin: &mut AdminClient<Channel>,
    agent: &mut BrokerClient<Channel>,
    round: usize,
) -> bool {
    let status = admin
        .get_connection(proto::GetConnectionRequest {
            connection: conn(OAUTH, "u1"),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    let probe = agent
        .resolve_credential(proto::ResolveCredentialRequest {
            connection: conn(OAUTH, "u1"),
            min_ttl_seconds: 3600,
            ..Default::default()
        })
        .await;
    let lost = status == proto::ConnectionStatus::Expired as i32 || probe.is_err();
    if lost {
        let err = probe.expect_err("an expired connection must not resolve");
        assert_eq!(
            support::daemon::reason(&err).0,
            "EXPIRED",
            "round {round}: {err:?}"
        );
    }
    lost
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_sigkills_under_write_load_lose_no_acknowledged_write() {
    let seed = seed();
    let mut pauses = StdRng::seed_from_u64(seed);
    let (mut daemon, mut admin, _) =
        with_connection(Daemon::start_with_config(AUDIT), OAUTH, "u1").await;
    let keys = new_connector(
        KEYS,
        proto::ConnectorKind::ApiKey,
        proto::ConnectorMode::Personal,
    );
    admin.create_connector(keys).await.unwrap();

    let config = daemon.config();
    let mut rotations_lost = 0;
    let mut acked_total = (0, 0, 0);
    let mut events_read = 0;
    for round in 0..KILLS {
        let acked = Arc::new(Mutex::new(Acked::default()));
        let load = spawn_load(&daemon, round, &acked).await;
        let pause = pauses.random_range(20..300);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        daemon.kill();
        load.join_all().await;

        let verify = daemon.cli(&["audit", "verify", "--config", config.to_str().unwrap()]);
        assert!(
            verify.status.success(),
            "round {round}: audit verify failed: {}",
            String::from_utf8_lossy(&verify.stderr)
        );
        daemon.respawn();

        let acked = std::mem::take(&mut *acked.lock().unwrap());
        let (mut admin, mut agent) = (daemon.admin().await, daemon.agent().await);
        assert_acked_kept(&mut admin, &mut agent, round, &acked).await;
        events_read = assert_events_match(&mut admin, &mut agent, round, &acked, events_read).await;
        acked_total.0 += acked.connectors.len();
        acked_total.1 += acked.keys.len();
        acked_total.2 += acked.refreshes;
        let acked_calls = acked_total.0 + acked_total.1 + acked_total.2;
        assert_audit_covers(&mut admin, round, acked_calls as u64).await;

        if rotation_lost(&mut admin, &mut agent, round).await {
            rotations_lost += 1;
            connect(&daemon, &mut admin, OAUTH, "u1", "").await;
        }
    }
    eprintln!(
        "{KILLS} kills: {} connectors, {} connections and {} refreshes acknowledged and kept; {rotations_lost} in-flight rotations lost",
        acked_total.0, acked_total.1, acked_total.2
    );
    assert!(
        acked_total.0 > 0 && acked_total.1 > 0 && acked_total.2 > 0,
        "the load did not run"
    );
}
