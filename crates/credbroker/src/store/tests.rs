//! The backend conformance suite: every store test, run against a backend given by a
//! [`Fixture`]. [`conformance_suite!`] instantiates the whole suite for one backend; it is
//! invoked below for sled, and by `tests/postgres.rs` for PostgreSQL (through the `test-util`
//! feature, which makes this module public), the same suite for each.

use super::*;
use crate::vault::generate_key_file;

/// Where one test keeps its store, on the backend under test; dropping it removes the store.
pub trait Fixture: Send + Sync {
    /// The configuration that opens (and reopens) the test's store named `name`: each name is
    /// its own, initially empty, place.
    fn config_at(&self, name: &str) -> StoreConfig;
}

/// The sled backend: a store in a temporary folder.
#[cfg(test)]
pub(crate) struct SledFixture(tempfile::TempDir);

#[cfg(test)]
impl SledFixture {
    pub(crate) fn new() -> Self {
        Self(tempfile::tempdir().unwrap())
    }
}

#[cfg(test)]
impl Fixture for SledFixture {
    fn config_at(&self, name: &str) -> StoreConfig {
        let mut config = StoreConfig::at(self.0.path().join(name));
        config.backend = sled_backend::NAME.into();
        config
    }
}

/// One test's backend location and key.
struct Env {
    fixture: Box<dyn Fixture>,
    key: KeySource,
    key_dir: tempfile::TempDir,
}

impl Env {
    fn new(fixture: impl Fixture + 'static) -> Env {
        let key_dir = tempfile::tempdir().unwrap();
        let key = key_dir.path().join("key");
        generate_key_file(&key).unwrap();
        Env {
            fixture: Box::new(fixture),
            key: KeySource::KeyFile(key),
            key_dir,
        }
    }

    fn config(&self) -> StoreConfig {
        self.fixture.config_at("db")
    }

    async fn create(&self) -> Store {
        Store::create(&self.config(), &self.key).await.unwrap()
    }

    async fn reopen(&self) -> Store {
        Store::open(&self.config(), &self.key).await.unwrap()
    }
}

/// A table the read cache keeps, and one it does not: the store treats every table alike
/// otherwise.
const CACHED: Table = Table::cached("records");
const LOG: Table = Table::uncached("log");

/// Runs every test of the suite against the backend `$fixture` (an expression evaluated
/// afresh for each test, yielding a [`Fixture`]), in a module named `$name`.
#[macro_export]
macro_rules! conformance_suite {
    ($name:ident, $fixture:expr) => {
        mod $name {
            $crate::conformance_suite!(@each $fixture;
                backend_keeps_its_invariants,
                calls_work_outside_any_runtime,
                opening_checks_what_is_there,
                round_trip_scan_and_last,
                moved_or_flipped_values_are_reported_not_returned,
                concurrent_commits_share_flushes_and_all_land,
                several_keys_are_read_as_of_one_moment,
                rotation_rewraps_everything_then_retires_the_old_term,
                rewrap_resumes_from_its_persisted_position,
                worn_term_rotates_by_itself,
                change_key_rewraps_the_keyring_only,
                every_record_type_round_trips,
                an_unsynced_update_loses_to_a_concurrent_write,
                a_snapshot_restores_into_an_empty_place,
            );
        }
    };
    (@each $fixture:expr; $($test:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                $crate::store::tests::$test($fixture).await;
            }
        )*
    };
}
#[cfg(test)]
crate::conformance_suite!(sled, super::SledFixture::new());

#[cfg(test)]
#[test]
fn an_unknown_backend_is_named_in_the_error() {
    let mut config = StoreConfig::at("unused".into());
    config.backend = "floppy".into();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let err = runtime
        .block_on(open_backend(&config, Intent::Existing))
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("[store] backend = \"floppy\""),
        "{err}"
    );
}

pub async fn backend_keeps_its_invariants(fixture: impl Fixture + 'static) {
    let backend = open_backend(&fixture.config_at("db"), Intent::Create)
        .await
        .unwrap();
    let key = |k: &str| k.as_bytes().to_vec();
    // One batch: out of order, a key written twice (the later op wins), a delete.
    backend
        .apply(vec![
            (key("t\0c"), Some(b"3".to_vec())),
            (key("t\0a"), Some(b"1".to_vec())),
            (key("tt\0x"), Some(b"other table".to_vec())),
            (key("t\0b"), Some(b"first".to_vec())),
            (key("t\0b"), Some(b"2".to_vec())),
            (key("t\0d"), Some(b"gone".to_vec())),
            (key("t\0d"), None),
        ])
        .await
        .unwrap();
    // Read your writes, before any sync.
    assert_eq!(backend.get(b"t\0b").await.unwrap(), Some(b"2".to_vec()));
    assert_eq!(backend.get(b"t\0d").await.unwrap(), None);
    backend.sync().await.unwrap();
    let keys = |rows: Vec<RawEntry>| rows.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    let all = backend.scan_prefix(b"t\0", None, 100).await.unwrap();
    assert_eq!(keys(all), [key("t\0a"), key("t\0b"), key("t\0c")]);
    let after = backend.scan_prefix(b"t\0", Some(b"t\0a"), 1).await.unwrap();
    assert_eq!(keys(after), [key("t\0b")]);
    let every = backend.scan_prefix(b"", None, usize::MAX).await.unwrap();
    assert_eq!(every.len(), 4, "the empty prefix is every record");
    let last = backend.last_with_prefix(b"t\0", None).await.unwrap();
    assert_eq!(last.map(|(k, _)| k), Some(key("t\0c")));
    let at_most = backend
        .last_with_prefix(b"t\0", Some(b"t\0bz"))
        .await
        .unwrap();
    assert_eq!(at_most.map(|(k, _)| k), Some(key("t\0b")));
    assert_eq!(backend.last_with_prefix(b"u\0", None).await.unwrap(), None);
    // Compare-and-swap: only over the value read; a deleted key stays deleted.
    assert!(
        !backend
            .replace_if(b"t\0a", b"stale", b"x".to_vec())
            .await
            .unwrap()
    );
    assert!(
        backend
            .replace_if(b"t\0a", b"1", b"one".to_vec())
            .await
            .unwrap()
    );
    assert_eq!(backend.get(b"t\0a").await.unwrap(), Some(b"one".to_vec()));
    assert!(
        !backend
            .replace_if(b"t\0d", b"gone", b"x".to_vec())
            .await
            .unwrap()
    );
    assert_eq!(backend.get(b"t\0d").await.unwrap(), None);
    // Metadata lives apart from records, in key order.
    backend.meta_put("m2", b"two").await.unwrap();
    backend.meta_put("m1", b"one").await.unwrap();
    assert_eq!(backend.meta_get("m1").await.unwrap(), Some(b"one".to_vec()));
    let meta = backend.meta_scan().await.unwrap();
    assert_eq!(
        meta.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        ["m1", "m2"]
    );
    let every = backend.scan_prefix(b"", None, usize::MAX).await.unwrap();
    assert_eq!(every.len(), 4, "metadata is not a record");
    backend.sync().await.unwrap();
}

/// The synchronous callers (the vault's reservation hook, the group-commit thread) wait for
/// backend calls on threads outside any runtime, with [`wait_inline`].
pub async fn calls_work_outside_any_runtime(fixture: impl Fixture + 'static) {
    let backend = open_backend(&fixture.config_at("db"), Intent::Create)
        .await
        .unwrap();
    let outside = std::thread::spawn(move || {
        wait_inline(async {
            backend.meta_put("reserved/1", b"64").await?;
            backend.sync().await?;
            backend
                .apply(vec![(b"t\0a".to_vec(), Some(b"1".to_vec()))])
                .await?;
            backend.sync().await?;
            backend.get(b"t\0a").await
        })
    });
    assert_eq!(outside.join().unwrap().unwrap(), Some(b"1".to_vec()));
}

pub async fn opening_checks_what_is_there(fixture: impl Fixture + 'static) {
    let env = Env::new(fixture);
    let opened = Store::open(&env.config(), &env.key).await;
    assert!(
        matches!(opened, Err(StoreError::NotInitialized { .. })),
        "{opened:?}"
    );
    let store = env.create().await;
    store.commit(one(CACHED, "a", &"x")).await.unwrap();
    drop(store);
    let again = Store::create(&env.config(), &env.key).await;
    assert!(
        matches!(again, Err(StoreError::AlreadyExists { .. })),
        "{again:?}"
    );
    let empty = open_backend(&env.config(), Intent::Empty).await;
    assert!(
        matches!(empty, Err(StoreError::NotEmpty { .. })),
        "{:?}",
        empty.err()
    );
    let v: String = env.reopen().await.get(CACHED, "a").await.unwrap().unwrap();
    assert_eq!(v, "x");
}

fn one<T: Serialize>(table: Table, path: &str, value: &T) -> Batch {
    let mut batch = Batch::new();
    batch.put(table, path, value);
    batch
}

pub async fn a_snapshot_restores_into_an_empty_place(fixture: impl Fixture + 'static) {
    let env = Env::new(fixture);
    let store = env.create().await;
    fill(&store, 20).await;
    store.commit(one(LOG, "0001", &"logged")).await.unwrap();
    let snapshot = store.snapshot().await.unwrap();
    assert_eq!(snapshot.records.len(), 21);
    // Not over a store that exists.
    let over = restore(&env.config(), &snapshot, &env.key).await;
    assert!(
        matches!(over, Err(BackupError::TargetNotEmpty { .. })),
        "{over:?}"
    );
    let elsewhere = env.fixture.config_at("restored");
    restore(&elsewhere, &snapshot, &env.key).await.unwrap();
    let restored = Store::open(&elsewhere, &env.key).await.unwrap();
    assert_eq!(restored.header().store_id, store.header().store_id);
    let v: String = restored
        .get(CACHED, "default/cn_0007")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v, "value 7");
    let v: Option<String> = restored.get(LOG, "0001").await.unwrap();
    assert_eq!(v.as_deref(), Some("logged"));
}

pub async fn round_trip_scan_and_last(fixture: impl Fixture + 'static) {
    let env = Env::new(fixture);
    let store = env.create().await;
    let mut batch = Batch::new();
    for i in 0..5 {
        batch.put(LOG, format!("{i:020}"), &format!("record {i}"));
    }
    batch.put(CACHED, "default/cn_1", &"other table");
    store.commit(batch).await.unwrap();
    let rows: Vec<(String, String)> = store.scan(LOG, "", None, 100).await.unwrap();
    assert_eq!(rows.len(), 5);
    assert_eq!(rows[4], (format!("{:020}", 4), "record 4".to_string()));
    let after: Vec<(String, String)> = store
        .scan(LOG, "", Some(&format!("{:020}", 2)), 1)
        .await
        .unwrap();
    assert_eq!(after[0].1, "record 3");
    let (_, last): (String, String) = store.last(LOG, "", None).await.unwrap().unwrap();
    assert_eq!(last, "record 4");
    let at_most = async |path: &str| -> Option<String> {
        let found: Option<(String, String)> = store.last(LOG, "", Some(path)).await.unwrap();
        found.map(|(_, value)| value)
    };
    assert_eq!(
        at_most(&format!("{:020}", 2)).await.as_deref(),
        Some("record 2")
    );
    assert_eq!(
        at_most(&format!("{:019}5", 0)).await.as_deref(),
        Some("record 4")
    );
    assert_eq!(
        at_most("0").await.as_deref(),
        None,
        "nothing sorts at or before \"0\""
    );
}

pub async fn moved_or_flipped_values_are_reported_not_returned(fixture: impl Fixture + 'static) {
    let env = Env::new(fixture);
    let store = env.create().await;
    let mut batch = Batch::new();
    batch
        .put(CACHED, "cn_a/alice", &"canary-a")
        .put(CACHED, "cn_a/bob", &"canary-b");
    store.commit(batch).await.unwrap();
    let sealed = store.raw_get(CACHED, "cn_a/alice").await.unwrap().unwrap();
    store
        .raw_put(CACHED, "cn_a/bob", Some(sealed.clone()))
        .await
        .unwrap();
    let err = store.get::<String>(CACHED, "cn_a/bob").await.unwrap_err();
    assert!(err.to_string().contains("tampered"), "{err}");
    assert!(err.to_string().contains("records/cn_a/bob"), "{err}");
    for i in 0..sealed.len() {
        let mut bad = sealed.clone();
        bad[i] ^= 0x40;
        store
            .raw_put(CACHED, "cn_a/alice", Some(bad))
            .await
            .unwrap();
        assert!(
            store.get::<String>(CACHED, "cn_a/alice").await.is_err(),
            "byte {i}"
        );
    }
}

pub async fn concurrent_commits_share_flushes_and_all_land(fixture: impl Fixture + 'static) {
    let env = Env::new(fixture);
    let store = env.create().await;
    let store = std::sync::Arc::new(store);
    let mut tasks = Vec::new();
    for t in 0..16 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                let mut batch = Batch::new();
                batch.put(LOG, format!("{t:02}-{i:03}"), &i);
                store.commit(batch).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let rows: Vec<(String, u32)> = store.scan(LOG, "", None, usize::MAX).await.unwrap();
    assert_eq!(rows.len(), 16 * 50);
}

/// Invariant 7: while batches rewrite two keys together, a `get_many` of both never returns
/// one from before a batch and the other from after it (two `get`s can: a connection's new
/// expiry joined to its old token).
pub async fn several_keys_are_read_as_of_one_moment(fixture: impl Fixture + 'static) {
    let backend = open_backend(&fixture.config_at("db"), Intent::Create)
        .await
        .unwrap();
    let keys = [b"t\0pair/a".to_vec(), b"t\0pair/b".to_vec()];
    let write = {
        let keys = keys.clone();
        move |v: u32| {
            let value = Some(v.to_be_bytes().to_vec());
            vec![(keys[0].clone(), value.clone()), (keys[1].clone(), value)]
        }
    };
    backend.apply(write(0)).await.unwrap();
    let writer = {
        let backend = backend.clone();
        tokio::spawn(async move {
            for v in 1..=2_000u32 {
                backend.apply(write(v)).await.unwrap();
            }
        })
    };
    let mut seen = std::collections::BTreeSet::new();
    while !writer.is_finished() {
        let values = backend.get_many(&keys).await.unwrap();
        assert_eq!(values[0], values[1], "read across a batch");
        seen.insert(values[0].clone());
    }
    writer.await.unwrap();
    assert!(
        seen.len() > 10,
        "the reads ran beside the writes: {} versions seen",
        seen.len()
    );
    let last = backend.get_many(&keys).await.unwrap();
    assert_eq!(
        last,
        [
            Some(2_000u32.to_be_bytes().to_vec()),
            Some(2_000u32.to_be_bytes().to_vec())
        ]
    );
    let absent = backend
        .get_many(&[b"t\0none".to_vec(), keys[0].clone()])
        .await
        .unwrap();
    assert_eq!(absent[0], None);
}

async fn fill(store: &Store, n: usize) {
    let mut batch = Batch::new();
    for i in 0..n {
        batch.put(CACHED, format!("default/cn_{i:04}"), &format!("value {i}"));
    }
    store.commit(batch).await.unwrap();
}

async fn run_rewrap(store: &Store) -> RewrapState {
    for _ in 0..10_000 {
        match store.rewrap_step(7).await.unwrap() {
            RewrapStep::Finished(state) => return state,
            RewrapStep::Progress(_) => {}
            RewrapStep::Idle => panic!("rewrap idle before finishing"),
        }
    }
    panic!("rewrap never finished")
}

pub async fn rotation_rewraps_everything_then_retires_the_old_term(
    fixture: impl Fixture + 'static,
) {
    let env = Env::new(fixture);
    let store = env.create().await;
    fill(&store, 50).await;
    assert_eq!(store.rotate_key().await.unwrap(), 2);
    // New writes use the new term at once; old records still open.
    fill(&store, 3).await;
    assert_eq!(store.terms_in_use().await.unwrap().get(&2), Some(&3));
    let v: String = store.get(CACHED, "default/cn_0040").await.unwrap().unwrap();
    assert_eq!(v, "value 40");
    // A record sealed under term 1 that lands mid-rewrap (as from a stalled writer) is caught
    // by the check pass.
    let late = store
        .raw_get(CACHED, "default/cn_0004")
        .await
        .unwrap()
        .unwrap();
    let stale = store
        .raw_get(CACHED, "default/cn_0010")
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(
        store.rewrap_step(7).await.unwrap(),
        RewrapStep::Progress(_)
    ));
    store
        .raw_put(CACHED, "default/cn_0004", Some(late))
        .await
        .unwrap();
    let state = run_rewrap(&store).await;
    assert_eq!(state.pass, 1, "a second pass caught the late record");
    assert_eq!(state.retired, vec![1]);
    assert_eq!(state.to_term, 2);
    assert_eq!(store.vault().terms(), vec![2]);
    assert_eq!(store.records_below(2).await.unwrap(), 0);
    assert!(matches!(
        store.rewrap_step(7).await.unwrap(),
        RewrapStep::Idle
    ));
    // After retirement, a term-1 envelope no longer opens: its key is gone.
    store
        .raw_put(CACHED, "default/cn_0010", Some(stale))
        .await
        .unwrap();
    let read = store.get::<String>(CACHED, "default/cn_0010").await;
    assert!(
        matches!(
            read,
            Err(StoreError::Vault(VaultError::UnknownTerm { term: 1, .. }))
        ),
        "{read:?}"
    );
    // Reopened, the store holds term 2 only and every other record reads back.
    drop(store);
    let store = env.reopen().await;
    assert_eq!(store.vault().terms(), vec![2]);
    let v: String = store.get(CACHED, "default/cn_0049").await.unwrap().unwrap();
    assert_eq!(v, "value 49");
    let v: String = store.get(CACHED, "default/cn_0004").await.unwrap().unwrap();
    assert_eq!(v, "value 4");
}

pub async fn rewrap_resumes_from_its_persisted_position(fixture: impl Fixture + 'static) {
    let env = Env::new(fixture);
    let store = env.create().await;
    fill(&store, 40).await;
    store.rotate_key().await.unwrap();
    for _ in 0..3 {
        store.rewrap_step(5).await.unwrap();
    }
    let before = store.rewrap_state().await.unwrap().unwrap();
    assert_eq!(before.scanned, 15);
    drop(store);
    let store = env.reopen().await;
    let RewrapStep::Progress(next) = store.rewrap_step(5).await.unwrap() else {
        panic!("not resumed")
    };
    assert_eq!(
        next.scanned, 20,
        "resumed where it stopped, not from the start"
    );
    let done = run_rewrap(&store).await;
    assert_eq!(done.retired, vec![1]);
    assert_eq!(
        store
            .terms_in_use()
            .await
            .unwrap()
            .keys()
            .copied()
            .collect::<Vec<_>>(),
        vec![2]
    );
}

pub async fn worn_term_rotates_by_itself(fixture: impl Fixture + 'static) {
    let env = Env::new(fixture);
    let store = env.create().await;
    store.vault().set_rotate_at(20);
    for _ in 0..4 {
        fill(&store, 6).await;
    }
    assert_eq!(store.vault().current_term(), 2);
    assert!(store.vault().encryptions() < 20);
    assert!(
        store
            .rewrap_state()
            .await
            .unwrap()
            .is_some_and(|s| !s.finished)
    );
}

pub async fn change_key_rewraps_the_keyring_only(fixture: impl Fixture + 'static) {
    let env = Env::new(fixture);
    let store = env.create().await;
    fill(&store, 5).await;
    drop(store);
    let db = env.config();
    let old = env.key.clone();
    let new_path = env.key_dir.path().join("new-key");
    generate_key_file(&new_path).unwrap();
    let new = KeySource::KeyFile(new_path);
    // The wrong current key changes nothing.
    assert!(matches!(
        change_key(&db, &new, &old).await,
        Err(StoreError::Vault(VaultError::WrongKey))
    ));
    change_key(&db, &old, &new).await.unwrap();
    assert!(matches!(
        Store::open(&db, &old).await,
        Err(StoreError::Vault(VaultError::WrongKey))
    ));
    let store = Store::open(&db, &new).await.unwrap();
    let v: String = store.get(CACHED, "default/cn_0004").await.unwrap().unwrap();
    assert_eq!(v, "value 4");
    assert_eq!(store.vault().terms(), vec![1]);
}

/// Writes `value` at `table`/some/path and reads it back: the same JSON both ways.
async fn round_trips<T: serde::Serialize + Record>(store: &Store, table: Table, value: &T) {
    let mut batch = Batch::new();
    batch.put(table, "some/path", value);
    store.commit(batch).await.unwrap();
    let back: T = store.get(table, "some/path").await.unwrap().unwrap();
    assert_eq!(
        serde_json::to_value(&back).unwrap(),
        serde_json::to_value(value).unwrap(),
        "{table:?}"
    );
}

/// A connector with every field set.
fn full_connector(now: chrono::DateTime<chrono::Utc>) -> crate::model::Connector {
    use crate::model::{Connector, Kind, Mode};
    Connector {
        id: "cn_1".into(),
        workspace: "acme".into(),
        name: "Gmail".into(),
        kind: Kind::Oauth2,
        mode: Mode::Personal,
        provider: "google-mail".into(),
        config: [("client_id".to_string(), "abc".to_string())].into(),
        secrets_set: ["client_secret".to_string()].into(),
        created_at: now,
        updated_at: now,
        destinations_at: Some(now),
    }
}

/// A connection with every field set.
fn full_connection(now: chrono::DateTime<chrono::Utc>) -> crate::model::Connection {
    use crate::model::{Connection, ConnectionStatus};
    let mut connection = Connection::new("cn_1", "u1");
    connection.status = ConnectionStatus::Expired;
    connection.account_label = "alice@x.test".into();
    connection.connected_at = Some(now);
    connection.last_used_at = Some(now);
    connection.last_refreshed_at = Some(now);
    connection.access_expires_at = Some(now);
    connection.expired_reason = Some(crate::model::Expiry::Refused);
    connection.last_error = "invalid_grant".into();
    connection.scopes = vec!["openid".into()];
    connection.settings = [("imap_host".to_string(), "imap.x.test".to_string())].into();
    connection
}

/// An audit record with every field set.
fn full_audit_record(now: chrono::DateTime<chrono::Utc>) -> crate::audit::AuditRecord {
    use crate::audit::{AuditEvent, AuditRecord, Outcome};
    let event = AuditEvent {
        caller: "spiffe://x/agent".into(),
        operation: "ResolveCredential".into(),
        workspace: "acme".into(),
        connector: "Gmail (cn_1)".into(),
        user_id: "u1".into(),
        outcome: Some(Outcome::Denied),
        reason: "no grant".into(),
        request_id: "00ff".into(),
        detail: "GET api.test/x -> 200; 0 bytes out, 2 bytes in".into(),
    };
    AuditRecord {
        seq: 7,
        time: now,
        node: "n1".into(),
        event,
        hash: "ab".repeat(32),
    }
}

pub async fn every_record_type_round_trips(fixture: impl Fixture + 'static) {
    use crate::audit::AuditHead;
    use crate::model::{ConnectionSecrets, ConnectorSecrets, Secret};
    let env = Env::new(fixture);
    let store = env.create().await;
    let now = chrono::Utc::now();
    round_trips(&store, CACHED, &full_connector(now)).await;
    round_trips(&store, CACHED, &"cn_1".to_string()).await;
    let slots = [("client_secret".to_string(), Secret::new("s3cr3t"))].into();
    round_trips(&store, CACHED, &ConnectorSecrets { slots }).await;
    round_trips(&store, CACHED, &full_connection(now)).await;
    let slots = [("refresh_token".to_string(), Secret::new("rt"))].into();
    round_trips(&store, CACHED, &ConnectionSecrets { slots }).await;
    round_trips(&store, LOG, &vec![full_audit_record(now)]).await;
    let head = AuditHead {
        seq: 7,
        hash: "ab".repeat(32),
        time: Some(now),
    };
    round_trips(&store, LOG, &head).await;
}

pub async fn an_unsynced_update_loses_to_a_concurrent_write(fixture: impl Fixture + 'static) {
    let env = Env::new(fixture);
    let store = env.create().await;
    let mut batch = Batch::new();
    batch.put(CACHED, "cn_1/u1", &"first".to_string());
    store.commit(batch).await.unwrap();

    let written = store
        .update_unsynced(CACHED, "cn_1/u1", |v: &mut String| {
            *v = "hint".into();
            true
        })
        .await
        .unwrap();
    assert!(written);
    let now: String = store.get(CACHED, "cn_1/u1").await.unwrap().unwrap();
    assert_eq!(now, "hint", "readers see the update at once");

    // Another writer (a disconnect) lands between the update's read and its write.
    let key = CACHED.key("cn_1/u1");
    let written = store
        .update_unsynced(CACHED, "cn_1/u1", |v: &mut String| {
            wait_inline(store.backend.apply(vec![(key.clone(), None)])).unwrap();
            *v = "stale".into();
            true
        })
        .await
        .unwrap();
    assert!(!written);
    let gone: Option<String> = store.get(CACHED, "cn_1/u1").await.unwrap();
    assert_eq!(gone, None, "the concurrent delete wins");
    // A record that does not exist is not created.
    assert!(
        !store
            .update_unsynced(CACHED, "cn_1/u1", |_: &mut String| true)
            .await
            .unwrap()
    );
}
