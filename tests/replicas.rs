//! Several broker replicas on one PostgreSQL database (the `postgres` test peer, over TLS), each
//! its own process, folder and audit log, sharing the store and its key: one refresh per token
//! across all of them (counted at the real OAuth server), a write on one seen on the others
//! (measured over 1,000 trials), SIGKILLs of random replicas under mixed load (no acknowledged
//! write lost, every node log verifies), and PostgreSQL stopped under load (UNAVAILABLE, no
//! hang, recovery).
//!
//! The tests that count refreshes at the shared OAuth server run one at a time ([`SERIAL`]).

mod support;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use credbroker::api::proto::{self, admin_client::AdminClient, broker_client::BrokerClient};
use support::daemon::{Daemon, conn, metric, new_connector, reason, secrets};
use support::oauth::{connect, create_connector};
use support::peers::{self, peers};
use support::postgres::{Postgres, postgres};
use support::webhook::{Receiver, assert_signed};
use tonic::Code;
use tonic::transport::Channel;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const OAUTH: &str = "Team Mail";
const KEYS: &str = "Keys";
/// Every call's deadline: above the store's own bound on a call (connect 2 s + statement 5 s).
const DEADLINE: Duration = Duration::from_secs(10);

/// A PostgreSQL schema of this test's own in `pg`'s database.
fn store_toml(pg: &Postgres) -> String {
    let mut bytes = [0u8; 6];
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .unwrap();
    pg.store_toml(&format!("replicas_{}", hex::encode(bytes)))
}

async fn resolve(
    agent: &mut BrokerClient<Channel>,
    connector: &str,
    user: &str,
) -> Result<proto::ResolveCredentialResponse, tonic::Status> {
    let mut request = tonic::Request::new(proto::ResolveCredentialRequest {
        connection: conn(connector, user),
        min_ttl_seconds: 1,
        ..Default::default()
    });
    request.set_timeout(DEADLINE);
    agent
        .resolve_credential(request)
        .await
        .map(|r| r.into_inner())
}

/// Saves API key `value` for `user` of [`KEYS`]: acknowledged once durable.
async fn save_key(
    admin: &mut AdminClient<Channel>,
    user: &str,
    value: &str,
) -> Result<(), tonic::Status> {
    let mut request = tonic::Request::new(proto::ConnectWithCredentialsRequest {
        connection: conn(KEYS, user),
        secrets: secrets(&[("api_key", value)]),
        ..Default::default()
    });
    request.set_timeout(DEADLINE);
    let saved = admin.connect_with_credentials(request).await?.into_inner();
    assert!(saved.saved, "{saved:?}");
    Ok(())
}

async fn create_keys(admin: &mut AdminClient<Channel>) {
    admin
        .create_connector(new_connector(
            KEYS,
            proto::ConnectorKind::ApiKey,
            proto::ConnectorMode::Personal,
        ))
        .await
        .unwrap();
}

/// Milliseconds at the given quantiles of `samples` (sorted here).
fn quantiles(samples: &mut [f64]) -> String {
    samples.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    format!(
        "n={} min={:.2}ms p50={:.2}ms p90={:.2}ms p99={:.2}ms max={:.2}ms",
        samples.len(),
        at(0.0),
        at(0.5),
        at(0.9),
        at(0.99),
        at(1.0)
    )
}

#[tokio::test]
async fn two_hundred_resolves_over_three_replicas_cause_one_refresh() {
    let _serial = SERIAL.lock().await;
    let replicas = Daemon::start_replicas(3, &store_toml(postgres()), "");
    let mut admin = replicas[0].admin().await;
    create_connector(&mut admin, OAUTH, &[]).await;
    // Connected through replica 0's callback; every replica serves it.
    connect(&replicas[0], &mut admin, OAUTH, "u1", "").await;
    let mut agents = Vec::new();
    for replica in &replicas {
        for _ in 0..3 {
            agents.push(replica.agent().await);
        }
    }
    let mut first = HashSet::new();
    for agent in agents.iter_mut().step_by(3) {
        first.insert(resolve(agent, OAUTH, "u1").await.unwrap().secret);
    }
    tokio::time::sleep(Duration::from_secs(peers::ACCESS_TTL_SECS + 1)).await;

    let before = peers().oauth_stats().await;
    let calls = (0..200).map(|i| {
        // Spread over the replicas: call i goes to replica i % 3.
        let mut agent = agents[(i % 3) * 3 + (i / 3) % 3].clone();
        async move { resolve(&mut agent, OAUTH, "u1").await }
    });
    let results = futures::future::join_all(calls).await;
    let after = peers().oauth_stats().await;
    let failures: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    let tokens: HashSet<_> = results.into_iter().map(|r| r.unwrap().secret).collect();
    println!(
        "expired tokens served again: {}",
        tokens.intersection(&first).count()
    );
    println!(
        "200 resolves over 3 replicas: {} refresh(es) at the OAuth server, {} distinct token(s)",
        after.refresh_token - before.refresh_token,
        tokens.len()
    );
    assert_eq!(
        after.refresh_token - before.refresh_token,
        1,
        "{before:?} -> {after:?}"
    );
    // Every caller got the refreshed token: none the expired one, which a replica could join
    // to the new expiry when it read the connection and its secrets apart (issue 19's defect).
    assert_eq!(tokens.len(), 1, "distinct tokens served");
    assert!(tokens.is_disjoint(&first), "an expired token served again");
    let mut refreshes = 0.0;
    for replica in &replicas {
        let (_, metrics) = replica.http_get("/metrics").await;
        refreshes += metric(&metrics, "credbroker_token_refresh_total{outcome=\"ok\"}");
    }
    assert_eq!(refreshes, 1.0, "one replica refreshed, once");
}

/// Replicas keep one event journal: every event gets a cursor of its own whichever replica
/// appends it (none overwrites another's), and a live stream on one replica follows the
/// events the other appends.
#[tokio::test]
async fn replicas_append_to_one_event_journal() {
    let replicas = Daemon::start_replicas(2, &store_toml(postgres()), "");
    let mut admins = [replicas[0].admin().await, replicas[1].admin().await];
    create_keys(&mut admins[0]).await;
    let watch = |backlog_only| proto::WatchEventsRequest {
        kinds: vec!["connected".into()],
        backlog_only,
        ..Default::default()
    };
    let mut live = admins[1]
        .watch_events(watch(false))
        .await
        .unwrap()
        .into_inner();
    // The last on replica 0: replica 1's stream must wake for it with no append of its own.
    let users = ["u1", "u2", "u3", "u4", "u5"];
    for (i, user) in users.iter().enumerate() {
        save_key(&mut admins[i % 2], user, "k").await.unwrap();
    }
    let mut backlog = admins[0]
        .watch_events(watch(true))
        .await
        .unwrap()
        .into_inner();
    let mut journal = Vec::new();
    while let Some(event) = backlog.message().await.unwrap() {
        journal.push((event.cursor, event.user_id));
    }
    let appended: Vec<_> = journal.iter().map(|(_, u)| u.as_str()).collect();
    assert_eq!(appended, users, "the journal, in cursor order: {journal:?}");
    assert!(
        journal.windows(2).all(|w| w[1].0 == w[0].0 + 1),
        "cursors grow by one: {journal:?}"
    );
    let mut followed = Vec::new();
    while followed.len() < users.len() {
        let next = tokio::time::timeout(DEADLINE, live.message()).await;
        let event = next
            .unwrap_or_else(|_| panic!("replica 1's stream stopped after {followed:?}"))
            .unwrap()
            .unwrap();
        followed.push(event.user_id);
    }
    assert_eq!(followed, users, "replica 1 followed every event, in order");
}

/// With replicas, one of them delivers each webhook: every event once and in cursor order (one
/// delivery in flight), whichever replica appended it.
#[tokio::test]
async fn one_replica_delivers_each_webhook() {
    let receiver = Receiver::start().await;
    let replicas = Daemon::start_replicas(2, &store_toml(postgres()), &receiver.config(""));
    let mut admins = [replicas[0].admin().await, replicas[1].admin().await];
    create_keys(&mut admins[0]).await;
    let users = ["u1", "u2", "u3", "u4", "u5", "u6"];
    for (i, user) in users.iter().enumerate() {
        save_key(&mut admins[i % 2], user, "k").await.unwrap();
    }
    receiver
        .wait_for("a delivery of every event", |d| d.len() >= users.len())
        .await;
    // Time for a second deliverer's copies, if there were one.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let got = receiver.deliveries();
    got.iter().for_each(assert_signed);
    let delivered: Vec<_> = got
        .iter()
        .map(|d| {
            (
                d.json()["cursor"].as_u64().unwrap(),
                d.json()["user_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        got.len(),
        users.len(),
        "each event delivered once: {delivered:?}"
    );
    assert!(
        delivered.windows(2).all(|w| w[1].0 == w[0].0 + 1),
        "in cursor order: {delivered:?}"
    );
}

/// Replica B has the key cached (it just served it); replica A writes. How long until B serves
/// the new value (or, for a delete, refuses)? Counted over 1,000 trials; the distribution is
/// printed. Only convergence is asserted: every trial must see the write.
#[tokio::test]
async fn a_write_on_one_replica_is_seen_on_another_within_the_bound() {
    let replicas = Daemon::start_replicas(2, &store_toml(postgres()), "");
    let mut admin_a = replicas[0].admin().await;
    let mut agent_b = replicas[1].agent().await;
    create_keys(&mut admin_a).await;
    const TRIALS: usize = 1000;
    const GIVE_UP: Duration = Duration::from_secs(10);
    let (mut writes, mut deletes) = (Vec::new(), Vec::new());
    let mut polls = 0u64;
    save_key(&mut admin_a, "u", "v-start").await.unwrap();
    for trial in 0..TRIALS {
        // B serves the current value (now in its cache).
        let current = resolve(&mut agent_b, KEYS, "u").await;
        let delete = trial % 10 == 9;
        let value = format!("v-{trial}");
        let acked = if delete {
            admin_a
                .disconnect(proto::DisconnectRequest {
                    connection: conn(KEYS, "u"),
                })
                .await
                .unwrap();
            Instant::now()
        } else {
            save_key(&mut admin_a, "u", &value).await.unwrap();
            Instant::now()
        };
        loop {
            polls += 1;
            let seen = resolve(&mut agent_b, KEYS, "u").await;
            let converged = match &seen {
                Ok(r) => !delete && r.secret == value,
                Err(status) => delete && reason(status).0 == "NOT_CONNECTED",
            };
            if converged {
                let ms = acked.elapsed().as_secs_f64() * 1000.0;
                if delete { &mut deletes } else { &mut writes }.push(ms);
                break;
            }
            assert!(
                acked.elapsed() < GIVE_UP,
                "trial {trial}: replica B still answers {seen:?} (before the write: {current:?})"
            );
        }
        if delete {
            save_key(&mut admin_a, "u", "v-again").await.unwrap();
        }
    }
    assert_eq!(writes.len() + deletes.len(), TRIALS);
    println!(
        "a write on A seen by B: {}\na Disconnect on A refused by B: {}\n({polls} resolves on B)",
        quantiles(&mut writes),
        quantiles(&mut deletes)
    );
}

/// One burst of mixed load: writes of fresh keys and resolves, over every live replica.
/// Returns the acknowledged writes (user → value).
async fn burst(
    clients: Vec<(AdminClient<Channel>, BrokerClient<Channel>)>,
    round: usize,
) -> BTreeMap<String, String> {
    let calls = (0..30).map(|i| {
        let (mut admin, mut agent) = clients[i % clients.len()].clone();
        async move {
            let user = format!("r{round}-{i}");
            let value = format!("key-{round}-{i}");
            let saved = save_key(&mut admin, &user, &value).await.is_ok();
            let _ = resolve(&mut agent, KEYS, "steady").await;
            saved.then_some((user, value))
        }
    });
    futures::future::join_all(calls)
        .await
        .into_iter()
        .flatten()
        .collect()
}

fn random_below(n: usize) -> usize {
    let mut bytes = [0u8; 8];
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .unwrap();
    (u64::from_le_bytes(bytes) % n as u64) as usize
}

/// SIGKILLs of random replicas under mixed load (`CREDBROKER_REPLICA_KILLS`, default 100).
#[tokio::test]
async fn sigkills_of_random_replicas_lose_no_acknowledged_write() {
    let kills: usize = std::env::var("CREDBROKER_REPLICA_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let mut replicas = Daemon::start_replicas(3, &store_toml(postgres()), "");
    create_keys(&mut replicas[0].admin().await).await;
    save_key(&mut replicas[0].admin().await, "steady", "s")
        .await
        .unwrap();
    let mut acknowledged = BTreeMap::new();
    for round in 0..kills {
        let mut clients = Vec::new();
        for replica in &replicas {
            clients.push((replica.admin().await, replica.agent().await));
        }
        let load = tokio::spawn(burst(clients, round));
        tokio::time::sleep(Duration::from_millis(random_below(40) as u64)).await;
        let victim = random_below(replicas.len());
        replicas[victim].kill();
        acknowledged.extend(load.await.unwrap());
        replicas[victim].respawn();
    }
    // Every acknowledged write is there, whichever replica is asked.
    let mut agents = Vec::new();
    for replica in &replicas {
        agents.push(replica.agent().await);
    }
    let mut missing = Vec::new();
    for (i, (user, value)) in acknowledged.iter().enumerate() {
        let got = resolve(&mut agents[i % 3], KEYS, user).await;
        if got.as_ref().ok().map(|r| &r.secret) != Some(value) {
            missing.push((user.clone(), got.map(|r| r.secret)));
        }
    }
    println!(
        "{kills} SIGKILLs under load: {} acknowledged writes, {} missing",
        acknowledged.len(),
        missing.len()
    );
    assert!(missing.is_empty(), "{missing:?}");
    assert!(acknowledged.len() >= kills * 10, "the load ran");
    // Every node's log verifies, together.
    for replica in &mut replicas {
        replica.stop();
    }
    let mut args = vec![
        "audit".to_string(),
        "verify".into(),
        "--config".into(),
        replicas[0].config().display().to_string(),
    ];
    for replica in &replicas {
        args.push("--node-log".into());
        args.push(replica.path("store/audit").display().to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let verified = replicas[0].cli(&args);
    let out = String::from_utf8_lossy(&verified.stdout);
    assert!(
        verified.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&verified.stderr)
    );
    assert!(out.contains("3 node logs verified together"), "{out}");
    println!("{out}");
}

#[derive(Default)]
struct Outcomes {
    ok: u64,
    unavailable: u64,
    deadline: u64,
    other: Vec<String>,
}

impl std::fmt::Debug for Outcomes {
    /// Counts, and the first two other errors only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ok {}, UNAVAILABLE {}, DEADLINE_EXCEEDED {}, other {} {:?}",
            self.ok,
            self.unavailable,
            self.deadline,
            self.other.len(),
            &self.other[..self.other.len().min(2)]
        )
    }
}

/// PostgreSQL stopped for 10 s under load: calls fail UNAVAILABLE, none runs into its deadline,
/// and calls succeed again once it is back.
#[tokio::test]
async fn postgres_stopped_under_load_is_unavailable_then_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let pg = Postgres::private(dir.path());
    let replicas = Daemon::start_replicas(2, &store_toml(&pg), "");
    create_keys(&mut replicas[0].admin().await).await;
    save_key(&mut replicas[0].admin().await, "steady", "s")
        .await
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let outcomes = std::sync::Arc::new(std::sync::Mutex::new(Outcomes::default()));
    let mut workers = Vec::new();
    for (i, replica) in replicas.iter().enumerate() {
        for w in 0..4 {
            let (mut admin, mut agent) = (replica.admin().await, replica.agent().await);
            let (stop, outcomes) = (stop.clone(), outcomes.clone());
            workers.push(tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n += 1;
                    let outcome = if n % 2 == 0 {
                        save_key(&mut admin, &format!("w{i}-{w}-{n}"), "x").await
                    } else {
                        resolve(&mut agent, KEYS, "steady").await.map(drop)
                    };
                    {
                        let mut seen = outcomes.lock().unwrap();
                        match outcome {
                            Ok(()) => seen.ok += 1,
                            Err(s) if s.code() == Code::Unavailable => seen.unavailable += 1,
                            Err(s) if s.code() == Code::DeadlineExceeded => seen.deadline += 1,
                            Err(s) => seen.other.push(format!("{:?}: {}", s.code(), s.message())),
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }));
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg.stop();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let during = std::mem::take(&mut *outcomes.lock().unwrap());
    pg.start();
    // Back within seconds: successes again (the wait is a bound, not a measure).
    let back = Instant::now();
    while outcomes.lock().unwrap().ok < 20 && back.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    let after = outcomes.lock().unwrap();
    println!(
        "PostgreSQL stopped 10 s: {during:?}; after it came back: {after:?} (first 20 successes after {:.1}s)",
        back.elapsed().as_secs_f64()
    );
    assert!(during.unavailable > 0, "the outage was noticed: {during:?}");
    assert_eq!(during.deadline, 0, "no call hung into its deadline");
    assert!(during.other.is_empty(), "{during:?}");
    assert_eq!(after.deadline, 0);
    assert!(after.other.is_empty(), "{after:?}");
    assert!(after.ok >= 20, "calls succeed again: {after:?}");
}

/// Two stores in this process on one schema (two replicas, as the store sees them).
async fn two_stores(
    pg: &Postgres,
) -> (
    tempfile::TempDir,
    credbroker::store::Store,
    credbroker::store::Store,
    String,
) {
    use credbroker::vault::{KeySource, generate_key_file};
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    generate_key_file(&key).unwrap();
    let toml = store_toml(pg);
    let schema = toml
        .lines()
        .find_map(|l| l.strip_prefix("schema = \""))
        .unwrap()
        .trim_end_matches('"')
        .to_string();
    let mut config = credbroker::config::StoreConfig::at(dir.path().join("local"));
    config.backend = "postgres".into();
    config.url = Some(credbroker::store::PgUrl::new(pg.url()));
    config.password_file = Some(pg.password_file());
    config.ca_file = Some(pg.ca_file());
    config.schema = schema.clone();
    config.pool_size = 4;
    let source = KeySource::KeyFile(key);
    let a = credbroker::store::Store::create(&config, &source)
        .await
        .unwrap();
    let b = credbroker::store::Store::open(&config, &source)
        .await
        .unwrap();
    (dir, a, b, schema)
}

/// Runs `statement` on the database of schema `schema` (through a backend's pool).
async fn sql(schema: &str, statement: String) {
    let pg = postgres();
    let mut config = credbroker::config::StoreConfig::at("/nonexistent".into());
    config.backend = "postgres".into();
    config.url = Some(credbroker::store::PgUrl::new(pg.url()));
    config.password_file = Some(pg.password_file());
    config.ca_file = Some(pg.ca_file());
    config.schema = schema.to_string();
    let backend = credbroker::store::open_backend(&config, credbroker::store::Intent::Existing)
        .await
        .unwrap();
    let pg_backend = backend
        .as_any()
        .downcast_ref::<credbroker::store::PgBackend>()
        .unwrap();
    pg_backend
        .run(move |s| async move { s.execute(&statement, &[]).await.map(drop) })
        .await
        .unwrap();
}

/// The read cache is in use on PostgreSQL, and what keeps it true is the notification: with
/// the trigger off, replica B keeps serving what it cached; with it on, B sees A's write.
#[tokio::test]
async fn the_read_cache_follows_notifications_from_other_replicas() {
    use credbroker::store::{Batch, Table};
    const T: Table = Table::cached("replica_test");
    let (_dir, a, b, schema) = two_stores(postgres()).await;
    let put = |value: &str| {
        let mut batch = Batch::new();
        batch.put(T, "k", &value.to_string());
        batch
    };
    let read_until = |want: &'static str| {
        let b = &b;
        async move {
            for _ in 0..500 {
                if b.get::<String>(T, "k").await.unwrap().as_deref() == Some(want) {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            false
        }
    };
    a.commit(put("v1")).await.unwrap();
    assert!(read_until("v1").await);
    // B follows changes once it listens: give it the time to.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        b.get::<String>(T, "k").await.unwrap().as_deref(),
        Some("v1")
    );
    sql(
        &schema,
        format!("ALTER TABLE {schema}.records DISABLE TRIGGER record_changed"),
    )
    .await;
    a.commit(put("v2")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        b.get::<String>(T, "k").await.unwrap().as_deref(),
        Some("v1"),
        "without the notification B serves its cache"
    );
    sql(
        &schema,
        format!("ALTER TABLE {schema}.records ENABLE TRIGGER record_changed"),
    )
    .await;
    a.commit(put("v3")).await.unwrap();
    assert!(read_until("v3").await, "with it, B sees A's write");
}

/// Leases across two stores: one holder; a lapsed holder's fenced write is refused; counters
/// reserved by both never overlap; a job is held by one.
#[tokio::test]
async fn leases_fence_and_counters_add_up_across_replicas() {
    use credbroker::store::{Batch, Table};
    const T: Table = Table::cached("replica_test");
    let (_dir, a, b, _) = two_stores(postgres()).await;
    let short = Duration::from_millis(300);
    let first = a.try_lease("refresh/x", short).await.unwrap().unwrap();
    assert!(b.try_lease("refresh/x", short).await.unwrap().is_none());
    tokio::time::sleep(short * 2).await;
    let second = b.try_lease("refresh/x", short).await.unwrap().unwrap();
    assert!(second.token > first.token);
    let put = |value: &str| {
        let mut batch = Batch::new();
        batch.put(T, "fenced", &value.to_string());
        batch
    };
    assert!(!a.commit_fenced(put("stale"), &first).await.unwrap());
    assert!(b.commit_fenced(put("fresh"), &second).await.unwrap());
    assert_eq!(
        a.get::<String>(T, "fenced").await.unwrap().as_deref(),
        Some("fresh")
    );
    b.release(&second).await.unwrap();
    assert!(a.try_lease("refresh/x", short).await.unwrap().is_some());
    let job = a.job("keyring", false).await.unwrap().unwrap();
    assert!(b.job("keyring", false).await.unwrap().is_none());
    drop(job);
    let mut taken = false;
    for _ in 0..50 {
        if b.job("keyring", false).await.unwrap().is_some() {
            taken = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(taken, "a dropped job frees");
    // Both seal (each reserves its own range of the one counter).
    for i in 0..10 {
        a.commit(put(&format!("a{i}"))).await.unwrap();
        b.commit(put(&format!("b{i}"))).await.unwrap();
    }
    assert!(
        a.vault().encryptions() >= 65_536 || b.vault().encryptions() >= 65_536,
        "the second range starts past the first: {} {}",
        a.vault().encryptions(),
        b.vault().encryptions()
    );
}
