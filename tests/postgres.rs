//! The PostgreSQL backend against a real server (the `postgres` test peer, over TLS): the
//! store conformance suite (the same one sled passes), the durability and secrecy checks of
//! opening, and the behaviour while the server is down.

mod support;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use credbroker::api::proto;
use credbroker::config::StoreConfig;
use credbroker::store::tests::Fixture;
use credbroker::store::{Batch, PgUrl, Store, StoreError};
use credbroker::vault::KeySource;
use support::daemon::{Daemon, conn, new_connector, reason, secrets};
use support::postgres::{Postgres, postgres};

/// Each fixture's stores live in PostgreSQL schemas of their own in the shared server.
struct PgFixture {
    id: String,
}

impl PgFixture {
    fn new() -> Self {
        let mut bytes = [0u8; 6];
        use std::io::Read;
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut bytes))
            .unwrap();
        PgFixture {
            id: hex::encode(bytes),
        }
    }
}

/// A `[store]` selecting `pg`, in PostgreSQL schema `schema`.
fn store_config(pg: &Postgres, schema: &str) -> StoreConfig {
    let mut config = StoreConfig::at("/nonexistent/credbroker-local-state".into());
    config.backend = "postgres".into();
    config.url = Some(PgUrl::new(pg.url()));
    config.password_file = Some(pg.password_file());
    config.ca_file = Some(pg.ca_file());
    config.schema = schema.into();
    config.pool_size = 4;
    config
}

impl Fixture for PgFixture {
    fn config_at(&self, name: &str) -> StoreConfig {
        store_config(postgres(), &format!("t{}_{name}", self.id))
    }
}

credbroker::conformance_suite!(conformance, super::PgFixture::new());

/// A `[store]` of `pg` with the role's password written into the URL (as some operators do).
fn with_password_in_url(pg: &Postgres, url_tail: &str) -> StoreConfig {
    let mut config = store_config(pg, "canary");
    config.password_file = None;
    config.url = Some(PgUrl::new(format!(
        "postgres://{}:{}@127.0.0.1:{url_tail}",
        support::postgres::ROLE,
        pg.password()
    )));
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_password_never_shows() {
    let pg = postgres();
    let password = pg.password();
    let key = KeySource::Passphrase("canary passphrase".to_string().into());
    // Refusals that name the connection: a database that does not exist, a closed port, a
    // wrong password file; and the configuration's Debug.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let wrong_password = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(wrong_password.path(), format!("{password}-not")).unwrap();
    let mut wrong = store_config(pg, "canary");
    wrong.password_file = Some(wrong_password.path().to_path_buf());
    let cases = [
        with_password_in_url(pg, &format!("{}/no_such_db", pg.port)),
        with_password_in_url(pg, &format!("{closed_port}/credbroker")),
        wrong,
    ];
    for config in cases {
        let shown = format!("{config:?}");
        assert!(!shown.contains(&password), "Debug shows it: {shown}");
        let err = Store::create(&config, &key).await.unwrap_err();
        let shown = format!("{err} / {err:?} / {:?}", std::error::Error::source(&err));
        assert!(!shown.contains(&password), "the error shows it: {shown}");
        assert!(
            shown.contains("127.0.0.1"),
            "the error names the server: {shown}"
        );
    }
    // And the same URL works: the password was really in it.
    let config = with_password_in_url(pg, &format!("{}/credbroker", pg.port));
    let mut config = config;
    config.schema = format!("canary_{}", PgFixture::new().id);
    Store::create(&config, &key).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_asynchronous_commit_is_refused_unless_allowed() {
    let pg = postgres();
    let key = KeySource::Passphrase("durability passphrase".to_string().into());
    let schema = format!("async_{}", PgFixture::new().id);
    let mut config = store_config(pg, &schema);
    // The session's setting is what counts: a role's, a database's or (here) the URL's.
    for setting in ["off", "local"] {
        config.url = Some(PgUrl::new(format!(
            "{}?options=-c%20synchronous_commit%3D{setting}",
            pg.url()
        )));
        let refused = Store::create(&config, &key).await.unwrap_err();
        assert!(
            matches!(&refused, StoreError::AsyncCommit { setting: s, .. } if s == setting),
            "{refused:?}"
        );
        assert!(
            refused.to_string().contains("allow_async_commit"),
            "{refused}"
        );
    }
    config.allow_async_commit = true;
    let store = Store::create(&config, &key).await.unwrap();
    let table = credbroker::store::Table::cached("records");
    let mut batch = Batch::new();
    batch.put(table, "a", &"kept".to_string());
    store.commit(batch).await.unwrap();
    drop(store);
    config.allow_async_commit = false;
    config.url = Some(PgUrl::new(pg.url()));
    let store = Store::open(&config, &key).await.unwrap();
    let kept: Option<String> = store.get(table, "a").await.unwrap();
    assert_eq!(kept.as_deref(), Some("kept"));
}

/// Outcomes of a phase of calls, by gRPC code.
#[derive(Debug, Default)]
struct Outcomes {
    ok: usize,
    unavailable: usize,
    other: Vec<String>,
}

impl Outcomes {
    fn count(&mut self, outcome: Result<(), tonic::Status>) {
        match outcome {
            Ok(()) => self.ok += 1,
            Err(s) if s.code() == tonic::Code::Unavailable => {
                assert_eq!(reason(&s).0, "STORAGE_UNAVAILABLE", "{s:?}");
                self.unavailable += 1
            }
            Err(s) => self.other.push(format!("{:?}: {}", s.code(), s.message())),
        }
    }
}

/// Every call of the load carries this deadline: one that ran past it would be counted as
/// DEADLINE_EXCEEDED, not UNAVAILABLE.
const CALL_DEADLINE: Duration = Duration::from_secs(5);

/// How long each outage lasts: more than twice the backend's deadline of a call (3 s).
const OUTAGE: Duration = Duration::from_secs(7);

/// One write (a new user's key) and one read (an existing user's), each under the deadline.
async fn one_round(daemon: &Daemon, n: usize, outcomes: &mut Outcomes) {
    let (mut admin, mut agent) = (daemon.admin().await, daemon.agent().await);
    let mut write = tonic::Request::new(proto::ConnectWithCredentialsRequest {
        connection: conn("Keys", &format!("u{n}")),
        secrets: secrets(&[("api_key", &format!("key-{n}"))]),
        ..Default::default()
    });
    write.set_timeout(CALL_DEADLINE);
    outcomes.count(admin.connect_with_credentials(write).await.map(drop));
    let mut read = tonic::Request::new(proto::ResolveCredentialRequest {
        connection: conn("Keys", "u0"),
        min_ttl_seconds: 0,
    });
    read.set_timeout(CALL_DEADLINE);
    outcomes.count(agent.resolve_credential(read).await.map(drop));
}

/// `rounds` rounds from each of `tasks` concurrent clients, or fewer once `stop` is set.
async fn load_until(
    daemon: &Arc<Daemon>,
    base: usize,
    tasks: usize,
    rounds: usize,
    stop: Arc<AtomicBool>,
) -> Outcomes {
    let mut set = tokio::task::JoinSet::new();
    for t in 0..tasks {
        let (daemon, stop) = (daemon.clone(), stop.clone());
        set.spawn(async move {
            let mut outcomes = Outcomes::default();
            for r in 0..rounds {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                one_round(&daemon, base + t * 100_000 + r, &mut outcomes).await;
            }
            outcomes
        });
    }
    let mut all = Outcomes::default();
    while let Some(done) = set.join_next().await {
        let done = done.unwrap();
        all.ok += done.ok;
        all.unavailable += done.unavailable;
        all.other.extend(done.other);
    }
    all
}

async fn load(daemon: &Arc<Daemon>, base: usize, tasks: usize, rounds: usize) -> Outcomes {
    load_until(daemon, base, tasks, rounds, Arc::default()).await
}

/// Load from 4 clients while `outage` lasts (it returns when the outage is over).
async fn load_during(
    daemon: &Arc<Daemon>,
    base: usize,
    outage: impl Future<Output = ()>,
) -> Outcomes {
    let stop = Arc::new(AtomicBool::new(false));
    let running = tokio::spawn({
        let (daemon, stop) = (daemon.clone(), stop.clone());
        async move { load_until(&daemon, base, 4, usize::MAX, stop).await }
    });
    outage.await;
    stop.store(true, Ordering::Relaxed);
    running.await.unwrap()
}

/// Calls until one round fully succeeds: how many rounds that took (never an error but
/// UNAVAILABLE meanwhile).
async fn rounds_until_success(daemon: &Daemon, base: usize) -> usize {
    for attempt in 0..100 {
        let mut probe = Outcomes::default();
        one_round(daemon, base + attempt, &mut probe).await;
        assert!(probe.other.is_empty(), "{:?}", probe.other);
        if probe.ok == 2 {
            return attempt + 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("success never resumed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_answers_unavailable_and_recovers_by_itself() {
    let dir = tempfile::tempdir_in(support::peers::peers().dir()).unwrap();
    let pg = Postgres::private(dir.path());
    let store = format!(
        "{}connect_timeout_ms = 1000\nstatement_timeout_ms = 2000\n",
        pg.store_toml("credbroker")
    );
    let daemon = Arc::new(Daemon::start_with_store(&store, ""));
    let mut admin = daemon.admin().await;
    let req = new_connector(
        "Keys",
        proto::ConnectorKind::ApiKey,
        proto::ConnectorMode::Personal,
    );
    admin.create_connector(req).await.unwrap();
    let mut first = Outcomes::default();
    one_round(&daemon, 0, &mut first).await;
    assert_eq!((first.ok, first.unavailable), (2, 0), "{first:?}");

    let before = load(&daemon, 10_000, 4, 5).await;
    assert_eq!((before.ok, before.unavailable), (40, 0), "{before:?}");
    // Stopped: connections are refused at once.
    let stopped = load_during(&daemon, 200_000, async {
        pg.stop();
        tokio::time::sleep(OUTAGE).await;
        pg.start();
    })
    .await;
    let after_stop = rounds_until_success(&daemon, 300_000).await;
    // Frozen (SIGSTOP): connections hang, so only the backend's deadline ends the calls.
    let frozen = load_during(&daemon, 400_000, async {
        pg.freeze(true);
        tokio::time::sleep(OUTAGE).await;
        pg.freeze(false);
    })
    .await;
    let after_freeze = rounds_until_success(&daemon, 500_000).await;
    for (what, down) in [("stopped", &stopped), ("frozen", &frozen)] {
        // Every call answered within its deadline, and every failure was UNAVAILABLE; no
        // write could succeed (reads may, from the store's cache).
        assert!(down.other.is_empty(), "{what}: {:?}", down.other);
        assert!(down.unavailable >= 4, "{what}: {down:?}");
        println!(
            "{what}: {} ok, {} UNAVAILABLE, {} other",
            down.ok,
            down.unavailable,
            down.other.len()
        );
    }
    println!("rounds until success: {after_stop} after the stop, {after_freeze} after the freeze");
    let after = load(&daemon, 600_000, 4, 5).await;
    assert_eq!((after.ok, after.unavailable), (40, 0), "{after:?}");
    let logs = daemon.logs();
    assert!(
        !logs.contains(&pg.password()),
        "the daemon logged the password"
    );
}
