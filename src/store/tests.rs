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
    let (_, last): (String, String) = store.last(Table::Audit, "").unwrap().unwrap();
    assert_eq!(last, "record 4");
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
