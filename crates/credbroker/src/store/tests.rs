use super::*;
use crate::vault::generate_key_file;

fn new_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    generate_key_file(&key).unwrap();
    let store = Store::create(&dir.path().join("db"), &KeySource::KeyFile(key)).unwrap();
    (dir, store)
}

#[test]
fn round_trip_scan_and_last() {
    let (_dir, store) = new_store();
    let mut batch = Batch::new();
    for i in 0..5 {
        batch.put(Table::Audit, format!("{i:020}"), &format!("record {i}"));
    }
    batch.put(Table::Connectors, "default/cn_1", &"other table");
    store.commit_blocking(batch).unwrap();
    let rows: Vec<(String, String)> = store.scan(Table::Audit, "", None, 100).unwrap();
    assert_eq!(rows.len(), 5);
    assert_eq!(rows[4], (format!("{:020}", 4), "record 4".to_string()));
    let after: Vec<(String, String)> = store
        .scan(Table::Audit, "", Some(&format!("{:020}", 2)), 1)
        .unwrap();
    assert_eq!(after[0].1, "record 3");
    let (_, last): (String, String) = store.last(Table::Audit, "", None).unwrap().unwrap();
    assert_eq!(last, "record 4");
    let at_most = |path: &str| -> Option<String> {
        let found: Option<(String, String)> = store.last(Table::Audit, "", Some(path)).unwrap();
        found.map(|(_, value)| value)
    };
    assert_eq!(at_most(&format!("{:020}", 2)).as_deref(), Some("record 2"));
    assert_eq!(at_most(&format!("{:019}5", 0)).as_deref(), Some("record 4"));
    assert_eq!(
        at_most("0").as_deref(),
        None,
        "nothing sorts at or before \"0\""
    );
}

#[test]
fn moved_or_flipped_values_are_reported_not_returned() {
    let (_dir, store) = new_store();
    let mut batch = Batch::new();
    batch
        .put(Table::ConnectionSecrets, "cn_a/alice", &"canary-a")
        .put(Table::ConnectionSecrets, "cn_a/bob", &"canary-b");
    store.commit_blocking(batch).unwrap();
    let sealed = store
        .raw_get(Table::ConnectionSecrets, "cn_a/alice")
        .unwrap()
        .unwrap();
    store
        .raw_put(Table::ConnectionSecrets, "cn_a/bob", Some(sealed.clone()))
        .unwrap();
    let err = store
        .get::<String>(Table::ConnectionSecrets, "cn_a/bob")
        .unwrap_err();
    assert!(err.to_string().contains("tampered"), "{err}");
    assert!(
        err.to_string().contains("connection_secrets/cn_a/bob"),
        "{err}"
    );
    for i in 0..sealed.len() {
        let mut bad = sealed.clone();
        bad[i] ^= 0x40;
        store
            .raw_put(Table::ConnectionSecrets, "cn_a/alice", Some(bad))
            .unwrap();
        assert!(
            store
                .get::<String>(Table::ConnectionSecrets, "cn_a/alice")
                .is_err(),
            "byte {i}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commits_share_flushes_and_all_land() {
    let (_dir, store) = new_store();
    let store = std::sync::Arc::new(store);
    let mut tasks = Vec::new();
    for t in 0..16 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                let mut batch = Batch::new();
                batch.put(Table::Audit, format!("{t:02}-{i:03}"), &i);
                store.commit(batch).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let rows: Vec<(String, u32)> = store.scan(Table::Audit, "", None, usize::MAX).unwrap();
    assert_eq!(rows.len(), 16 * 50);
}

fn fill(store: &Store, n: usize) {
    let mut batch = Batch::new();
    for i in 0..n {
        batch.put(
            Table::Connectors,
            format!("default/cn_{i:04}"),
            &format!("value {i}"),
        );
    }
    store.commit_blocking(batch).unwrap();
}

fn run_rewrap(store: &Store) -> RewrapState {
    for _ in 0..10_000 {
        match store.rewrap_step(7).unwrap() {
            RewrapStep::Finished(state) => return state,
            RewrapStep::Progress(_) => {}
            RewrapStep::Idle => panic!("rewrap idle before finishing"),
        }
    }
    panic!("rewrap never finished")
}

#[test]
fn rotation_rewraps_everything_then_retires_the_old_term() {
    let (dir, store) = new_store();
    fill(&store, 50);
    assert_eq!(store.rotate_key().unwrap(), 2);
    // New writes use the new term at once; old records still open.
    fill(&store, 3);
    assert_eq!(store.terms_in_use().unwrap().get(&2), Some(&3));
    let v: String = store
        .get(Table::Connectors, "default/cn_0040")
        .unwrap()
        .unwrap();
    assert_eq!(v, "value 40");
    // A record sealed under term 1 that lands mid-rewrap (as from a stalled writer) is caught
    // by the check pass.
    let late = store
        .raw_get(Table::Connectors, "default/cn_0004")
        .unwrap()
        .unwrap();
    let stale = store
        .raw_get(Table::Connectors, "default/cn_0010")
        .unwrap()
        .unwrap();
    assert!(matches!(
        store.rewrap_step(7).unwrap(),
        RewrapStep::Progress(_)
    ));
    store
        .raw_put(Table::Connectors, "default/cn_0004", Some(late))
        .unwrap();
    let state = run_rewrap(&store);
    assert_eq!(state.pass, 1, "a second pass caught the late record");
    assert_eq!(state.retired, vec![1]);
    assert_eq!(state.to_term, 2);
    assert_eq!(store.vault().terms(), vec![2]);
    assert_eq!(store.records_below(2).unwrap(), 0);
    assert!(matches!(store.rewrap_step(7).unwrap(), RewrapStep::Idle));
    // After retirement, a term-1 envelope no longer opens: its key is gone.
    store
        .raw_put(Table::Connectors, "default/cn_0010", Some(stale))
        .unwrap();
    let read = store.get::<String>(Table::Connectors, "default/cn_0010");
    assert!(
        matches!(
            read,
            Err(StoreError::Vault(VaultError::UnknownTerm { term: 1, .. }))
        ),
        "{read:?}"
    );
    // Reopened, the store holds term 2 only and every other record reads back.
    drop(store);
    let store = Store::open(
        &dir.path().join("db"),
        &KeySource::KeyFile(dir.path().join("key")),
    )
    .unwrap();
    assert_eq!(store.vault().terms(), vec![2]);
    let v: String = store
        .get(Table::Connectors, "default/cn_0049")
        .unwrap()
        .unwrap();
    assert_eq!(v, "value 49");
    let v: String = store
        .get(Table::Connectors, "default/cn_0004")
        .unwrap()
        .unwrap();
    assert_eq!(v, "value 4");
}

#[test]
fn rewrap_resumes_from_its_persisted_position() {
    let (dir, store) = new_store();
    fill(&store, 40);
    store.rotate_key().unwrap();
    for _ in 0..3 {
        store.rewrap_step(5).unwrap();
    }
    let before = store.rewrap_state().unwrap().unwrap();
    assert_eq!(before.scanned, 15);
    drop(store);
    let store = Store::open(
        &dir.path().join("db"),
        &KeySource::KeyFile(dir.path().join("key")),
    )
    .unwrap();
    let RewrapStep::Progress(next) = store.rewrap_step(5).unwrap() else {
        panic!("not resumed")
    };
    assert_eq!(
        next.scanned, 20,
        "resumed where it stopped, not from the start"
    );
    let done = run_rewrap(&store);
    assert_eq!(done.retired, vec![1]);
    assert_eq!(
        store
            .terms_in_use()
            .unwrap()
            .keys()
            .copied()
            .collect::<Vec<_>>(),
        vec![2]
    );
}

#[test]
fn worn_term_rotates_by_itself() {
    let (_dir, store) = new_store();
    store.vault().set_rotate_at(20);
    for _ in 0..4 {
        fill(&store, 6);
    }
    assert_eq!(store.vault().current_term(), 2);
    assert!(store.vault().encryptions() < 20);
    assert!(store.rewrap_state().unwrap().is_some_and(|s| !s.finished));
}

#[test]
fn change_key_rewraps_the_keyring_only() {
    let (dir, store) = new_store();
    fill(&store, 5);
    drop(store);
    let db = dir.path().join("db");
    let old = KeySource::KeyFile(dir.path().join("key"));
    let new_path = dir.path().join("new-key");
    generate_key_file(&new_path).unwrap();
    let new = KeySource::KeyFile(new_path);
    // The wrong current key changes nothing.
    assert!(matches!(
        change_key(&db, &new, &old),
        Err(StoreError::Vault(VaultError::WrongKey))
    ));
    change_key(&db, &old, &new).unwrap();
    assert!(matches!(
        Store::open(&db, &old),
        Err(StoreError::Vault(VaultError::WrongKey))
    ));
    let store = Store::open(&db, &new).unwrap();
    let v: String = store
        .get(Table::Connectors, "default/cn_0004")
        .unwrap()
        .unwrap();
    assert_eq!(v, "value 4");
    assert_eq!(store.vault().terms(), vec![1]);
}

#[test]
fn every_record_type_round_trips() {
    use crate::audit::{AuditEvent, AuditHead, AuditRecord, Outcome};
    use crate::model::{
        Connection, ConnectionSecrets, ConnectionStatus, Connector, ConnectorSecrets, Kind, Mode,
        Secret,
    };
    fn check<T: serde::Serialize + Record>(store: &Store, table: Table, value: &T) {
        let mut batch = Batch::new();
        batch.put(table, "some/path", value);
        store.commit_blocking(batch).unwrap();
        let back: T = store.get(table, "some/path").unwrap().unwrap();
        assert_eq!(
            serde_json::to_value(&back).unwrap(),
            serde_json::to_value(value).unwrap(),
            "{table:?}"
        );
    }
    let (_dir, store) = new_store();
    let now = chrono::Utc::now();
    let connector = Connector {
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
    };
    check(&store, Table::Connectors, &connector);
    check(&store, Table::ConnectorNames, &"cn_1".to_string());
    check(
        &store,
        Table::ConnectorSecrets,
        &ConnectorSecrets {
            slots: [("client_secret".to_string(), Secret::new("s3cr3t"))].into(),
        },
    );
    let mut connection = Connection::new("cn_1", "u1");
    connection.status = ConnectionStatus::Expired;
    connection.account_label = "alice@x.test".into();
    connection.connected_at = Some(now);
    connection.last_used_at = Some(now);
    connection.last_refreshed_at = Some(now);
    connection.access_expires_at = Some(now);
    connection.last_error = "invalid_grant".into();
    connection.scopes = vec!["openid".into()];
    connection.settings = [("imap_host".to_string(), "imap.x.test".to_string())].into();
    check(&store, Table::Connections, &connection);
    check(
        &store,
        Table::ConnectionSecrets,
        &ConnectionSecrets {
            slots: [("refresh_token".to_string(), Secret::new("rt"))].into(),
        },
    );
    let event = AuditEvent {
        caller: "spiffe://x/agent".into(),
        operation: "ResolveCredential".into(),
        workspace: "acme".into(),
        connector: "Gmail (cn_1)".into(),
        user_id: "u1".into(),
        outcome: Some(Outcome::Denied),
        reason: "no grant".into(),
        request_id: "00ff".into(),
    };
    check(
        &store,
        Table::Audit,
        &vec![AuditRecord {
            seq: 7,
            time: now,
            event,
            hash: "ab".repeat(32),
        }],
    );
    check(
        &store,
        Table::Audit,
        &AuditHead {
            seq: 7,
            hash: "ab".repeat(32),
            time: Some(now),
        },
    );
}

#[test]
fn an_unsynced_update_loses_to_a_concurrent_write() {
    let (_dir, store) = new_store();
    let mut batch = Batch::new();
    batch.put(Table::Connections, "cn_1/u1", &"first".to_string());
    store.commit_blocking(batch).unwrap();

    let written = store
        .update_unsynced(Table::Connections, "cn_1/u1", |v: &mut String| {
            *v = "hint".into();
            true
        })
        .unwrap();
    assert!(written);
    let now: String = store.get(Table::Connections, "cn_1/u1").unwrap().unwrap();
    assert_eq!(now, "hint", "readers see the update at once");

    // Another writer (a disconnect) lands between the update's read and its write.
    let key = Table::Connections.key("cn_1/u1");
    let written = store
        .update_unsynced(Table::Connections, "cn_1/u1", |v: &mut String| {
            store.backend.apply(vec![(key.clone(), None)]).unwrap();
            *v = "stale".into();
            true
        })
        .unwrap();
    assert!(!written);
    let gone: Option<String> = store.get(Table::Connections, "cn_1/u1").unwrap();
    assert_eq!(gone, None, "the concurrent delete wins");
    // A record that does not exist is not created.
    assert!(
        !store
            .update_unsynced(Table::Connections, "cn_1/u1", |_: &mut String| true)
            .unwrap()
    );
}
