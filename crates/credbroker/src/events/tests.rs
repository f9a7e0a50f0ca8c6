use std::collections::BTreeSet;
use std::time::Duration;

use super::webhook::{self, SignatureError, backoff, sign, verify};
use super::*;
use crate::model::{Kind, Mode};

async fn journal() -> (tempfile::TempDir, Arc<Events>) {
    let (dir, registry) = crate::model::Registry::temporary(&crate::driver::DRIVERS).await;
    (dir, registry.events().clone())
}

fn connector(workspace: &str) -> Connector {
    Connector {
        id: "cn_test".into(),
        workspace: workspace.into(),
        name: "Team Mail".into(),
        ..Connector::for_tests(Kind::Oauth2, Mode::Personal, &[])
    }
}

async fn emit_n(events: &Events, n: usize) -> Vec<Event> {
    let mut out = Vec::new();
    for i in 0..n {
        let user = format!("u{i}");
        let e = events
            .append(
                EventKind::Refreshed,
                &connector("acme"),
                &user,
                Detail::NONE,
            )
            .await
            .unwrap();
        out.push(e);
    }
    out
}

#[test]
fn a_signature_verifies_and_any_change_is_refused() {
    let secret = b"0123456789abcdef0123456789abcdef";
    let body = br#"{"id":"ev_1","kind":"expired"}"#;
    let header = sign(secret, 1_700_000_000, body);
    assert!(header.starts_with("t=1700000000,v1="), "{header}");
    assert_eq!(verify(secret, &header, body, 1_700_000_010, 300), Ok(()));
    // Another body, another secret, another time: each refused.
    let refused = [
        verify(secret, &header, br#"{"id":"ev_2"}"#, 1_700_000_010, 300),
        verify(
            b"another secret entirely, 32 chars",
            &header,
            body,
            1_700_000_010,
            300,
        ),
        verify(
            secret,
            &header.replace("t=1700000000", "t=1700000001"),
            body,
            1_700_000_010,
            300,
        ),
    ];
    assert!(
        refused.iter().all(|r| *r == Err(SignatureError::Mismatch)),
        "{refused:?}"
    );
    // Outside the replay window, either way.
    assert_eq!(
        verify(secret, &header, body, 1_700_000_301, 300),
        Err(SignatureError::Stale { age_secs: 301 })
    );
    assert!(matches!(
        verify(secret, &header, body, 1_699_999_000, 300),
        Err(SignatureError::Stale { .. })
    ));
    for bad in ["", "t=1", "v1=00", "t=x,v1=00", "t=1,v1=zz"] {
        assert_eq!(
            verify(secret, bad, body, 1, 300),
            Err(SignatureError::Malformed),
            "{bad}"
        );
    }
}

/// The tag is HMAC-SHA256 of `"{t}.{body}"`, as the README tells receivers: computed here from
/// that construction alone, not through the module's own code.
#[test]
fn the_signature_is_hmac_sha256_over_timestamp_dot_body() {
    let (secret, t, body) = (b"key".as_slice(), 42, b"hello".as_slice());
    let mut mac = <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(secret).unwrap();
    hmac::Mac::update(&mut mac, b"42.hello");
    let want = hex::encode(hmac::Mac::finalize(mac).into_bytes());
    assert_eq!(sign(secret, t, body), format!("t=42,v1={want}"));
}

#[test]
fn backoff_doubles_from_the_first_wait_up_to_the_cap() {
    let (first, max) = (Duration::from_secs(1), Duration::from_secs(60));
    let schedule: Vec<u64> = (1..=9).map(|a| backoff(first, max, a).as_secs()).collect();
    assert_eq!(schedule, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    // No overflow however many attempts.
    assert_eq!(backoff(first, max, u32::MAX), max);
    let fast = backoff(Duration::from_millis(200), Duration::from_secs(2), 3);
    assert_eq!(fast, Duration::from_millis(800));
}

#[tokio::test]
async fn cursors_increase_by_one_and_survive_a_reopen() {
    let (_dir, events) = journal().await;
    let first = emit_n(&events, 3).await;
    let cursors: Vec<u64> = first.iter().map(|e| e.cursor).collect();
    assert_eq!(cursors, [1, 2, 3]);
    let ids: BTreeSet<&str> = first.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids.len(), 3, "ids are unique");
    // A new journal on the same store (a restart) goes on from the newest.
    let again = Events::new(events.store.clone());
    let next = again
        .append(EventKind::Expired, &connector("acme"), "u9", Detail::NONE)
        .await
        .unwrap();
    assert_eq!(next.cursor, 4);
    assert_eq!(again.after(2, 10).await.unwrap().len(), 2);
}

async fn take(watch: &mut Watch, n: usize) -> Vec<u64> {
    let mut got = Vec::new();
    while got.len() < n {
        let next = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("an event within 10 s")
            .expect("the stream goes on")
            .unwrap();
        got.push(next.cursor);
    }
    got
}

#[tokio::test]
async fn a_stream_resumes_after_its_cursor_then_follows_live_events() {
    let (_dir, events) = journal().await;
    emit_n(&events, 5).await;
    let mut watch = events
        .watch(WatchQuery {
            after: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(take(&mut watch, 3).await, [3, 4, 5]);
    emit_n(&events, 2).await;
    assert_eq!(take(&mut watch, 2).await, [6, 7]);
    // Filters: kinds and workspace.
    events
        .append(EventKind::Expired, &connector("other"), "u1", Detail::NONE)
        .await
        .unwrap();
    events
        .append(
            EventKind::Expired,
            &connector("acme"),
            "u1",
            Detail::new("invalid_grant", "x"),
        )
        .await
        .unwrap();
    let mut expired = events
        .watch(WatchQuery {
            kinds: [EventKind::Expired].into(),
            workspace: Some("acme".into()),
            backlog_only: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let only = expired.next().await.unwrap().unwrap();
    assert_eq!((only.cursor, only.class.as_str()), (9, "invalid_grant"));
    assert!(
        expired.next().await.is_none(),
        "backlog_only ends the stream"
    );
}

#[tokio::test]
async fn a_slow_consumer_holds_only_its_place_and_streams_are_capped() {
    let (_dir, events) = journal().await;
    events.configure(
        &EventsConfig {
            max_streams: 2,
            ..Default::default()
        },
        &[],
    );
    // 500 events, far more than the channel holds, to a consumer that reads none yet.
    emit_n(&events, 500).await;
    let mut slow = events.watch(WatchQuery::default()).await.unwrap();
    let _other = events.watch(WatchQuery::default()).await.unwrap();
    let refused = events.watch(WatchQuery::default()).await.err().unwrap();
    assert!(
        matches!(refused, EventsError::TooManyStreams(2)),
        "{refused}"
    );
    // Writers are not held up by it.
    emit_n(&events, 10).await;
    let got = take(&mut slow, 510).await;
    assert_eq!(got, (1..=510).collect::<Vec<u64>>());
    drop(slow);
    // Its place is given back once its task sees the receiver gone.
    let mut reopened = None;
    for _ in 0..100 {
        if let Ok(w) = events.watch(WatchQuery::default()).await {
            reopened = Some(w);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(reopened.is_some(), "the slot came back");
}

#[tokio::test]
async fn retention_keeps_the_newest_and_a_stale_cursor_is_told() {
    let (_dir, events) = journal().await;
    emit_n(&events, 20).await;
    let config = EventsConfig {
        retain_events: 5,
        ..Default::default()
    };
    assert_eq!(events.prune(&config, Utc::now()).await.unwrap(), 15);
    let kept: Vec<u64> = events
        .after(0, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.cursor)
        .collect();
    assert_eq!(kept, [16, 17, 18, 19, 20]);
    // By age: everything is older than "0 days" but the newest stays, so cursors never repeat.
    let by_age = EventsConfig {
        retain_days: 0,
        ..Default::default()
    };
    let later = Utc::now() + chrono::TimeDelta::seconds(1);
    assert_eq!(events.prune(&by_age, later).await.unwrap(), 4);
    let next = emit_n(&events, 1).await;
    assert_eq!(next[0].cursor, 21);
    let err = events
        .watch(WatchQuery {
            after: 3,
            ..Default::default()
        })
        .await
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            EventsError::Pruned {
                after: 3,
                oldest: 20
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("resume from cursor 19"), "{err}");
    // Resuming at the edge is fine.
    let mut edge = events
        .watch(WatchQuery {
            after: 19,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(take(&mut edge, 2).await, [20, 21]);
}

fn secret_file(dir: &std::path::Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("hook.secret");
    std::fs::write(&path, text).unwrap();
    path
}

fn hook_config(url: &str, secret_file: Option<std::path::PathBuf>) -> WebhookConfig {
    WebhookConfig {
        url: url.into(),
        secret_file,
        secret_credential: None,
        events: vec![EventKind::Expired],
        ca_file: None,
    }
}

#[tokio::test]
async fn outbox_rows_follow_each_webhooks_filter_in_the_same_batch() {
    let (dir, events) = journal().await;
    let secret = secret_file(dir.path(), &"s".repeat(40));
    let expired_only =
        Webhook::load(&hook_config("https://a.example/hook", Some(secret.clone()))).unwrap();
    let all = Webhook::load(&WebhookConfig {
        events: vec![],
        ..hook_config("https://b.example/hook", Some(secret))
    })
    .unwrap();
    events.configure(&EventsConfig::default(), &[expired_only, all]);
    let keys: Vec<String> = events.routes().iter().map(|r| r.key.clone()).collect();
    emit_n(&events, 2).await;
    events
        .append(EventKind::Expired, &connector("acme"), "u1", Detail::NONE)
        .await
        .unwrap();
    let a: Vec<u64> = events
        .outbox(&keys[0], 10)
        .await
        .unwrap()
        .iter()
        .map(|e| e.cursor)
        .collect();
    let b: Vec<u64> = events
        .outbox(&keys[1], 10)
        .await
        .unwrap()
        .iter()
        .map(|e| e.cursor)
        .collect();
    assert_eq!((a, b), (vec![3], vec![1, 2, 3]));
    events.delivered(&keys[1], 1).await.unwrap();
    assert_eq!(events.outbox(&keys[1], 10).await.unwrap()[0].cursor, 2);
    // The first webhook leaves the configuration: its deliveries go, the other's stay.
    assert_eq!(events.drop_orphans(&[&keys[1]]).await.unwrap(), 1);
    assert!(events.outbox(&keys[0], 10).await.unwrap().is_empty());
    assert_eq!(events.outbox(&keys[1], 10).await.unwrap().len(), 2);
}

#[test]
fn a_bad_webhook_secret_or_url_is_refused_naming_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let short = secret_file(dir.path(), "too-short-canary");
    let why = |config: WebhookConfig| Webhook::load(&config).unwrap_err().to_string();
    let missing = why(hook_config(
        "https://a.example/h",
        Some(dir.path().join("nope")),
    ));
    assert!(
        missing.contains("cannot read the secret file") && missing.contains("nope"),
        "{missing}"
    );
    let too_short = why(hook_config("https://a.example/h", Some(short)));
    assert!(
        too_short.contains("16 characters; at least 32"),
        "{too_short}"
    );
    assert!(
        !too_short.contains("too-short-canary"),
        "the secret in an error"
    );
    assert!(why(hook_config("https://a.example/h", None)).contains("exactly one of"));
    let plain = why(hook_config(
        "http://a.example/h",
        Some(dir.path().join("x")),
    ));
    assert!(plain.contains("must be https"), "{plain}");
    // A token in the URL's path is not repeated in errors.
    let tokened = why(hook_config("https://a.example/T0KEN-canary", None));
    assert!(!tokened.contains("T0KEN-canary"), "{tokened}");
}

#[test]
fn a_webhooks_debug_shows_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let canary = "webhook-secret-canary-0123456789abcdef";
    let hook = Webhook::load(&hook_config(
        "https://a.example/path-canary",
        Some(secret_file(dir.path(), canary)),
    ))
    .unwrap();
    let shown = format!("{hook:?}");
    assert!(
        !shown.contains(canary) && !shown.contains("path-canary"),
        "{shown}"
    );
    assert_eq!(webhook::MIN_SECRET_CHARS, 32);
}

#[test]
fn kinds_parse_by_their_wire_names() {
    for kind in EventKind::ALL {
        assert_eq!(EventKind::parse("kinds", kind.name()).unwrap(), kind);
        let json = serde_json::to_string(&kind).unwrap();
        assert_eq!(json, format!("\"{}\"", kind.name()));
    }
    let err = EventKind::parse("kinds", "exploded").unwrap_err();
    assert!(err.to_string().contains("refresh_failed"), "{err}");
}

/// A refresh that fails for a reason that may pass is one `refresh_failed` event naming its
/// class (not one per retry), without the refresh token in it.
#[tokio::test]
async fn a_transient_refresh_failure_is_one_refresh_failed_event() {
    use crate::model::{Connection, ConnectionSecrets, ConnectionStatus, Secret};
    let (_dir, registry) = crate::model::Registry::temporary(&crate::driver::DRIVERS).await;
    let registry = Arc::new(registry);
    let connector = Connector::for_tests(
        Kind::Oauth2,
        Mode::Personal,
        &[
            ("client_id", "c"),
            ("auth_url", "https://127.0.0.1:9/auth"),
            ("token_url", "https://127.0.0.1:9/token"),
        ],
    );
    let mut connection = Connection::new(&connector.id, "u1");
    connection.status = ConnectionStatus::Connected;
    connection.connected_at = Some(Utc::now());
    connection.access_expires_at = Some(Utc::now() - chrono::TimeDelta::seconds(1));
    let canary = "refresh-token-canary-5e2a";
    let mut secrets = ConnectionSecrets::default();
    secrets
        .slots
        .insert("refresh_token".into(), Secret::new(canary));
    registry
        .save_connection(&connection, Some(&secrets), None)
        .await
        .unwrap();
    let oauth = crate::oauth::OAuth::new(registry.clone(), String::new(), Duration::from_secs(2));
    for _ in 0..3 {
        let refused = oauth
            .access_token(&connector, "u1", Duration::from_secs(1))
            .await;
        assert!(refused.is_err());
    }
    let events = registry.events().after(0, 10).await.unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    let failed = &events[0];
    assert_eq!(
        (failed.kind, failed.user_id.as_str()),
        (EventKind::RefreshFailed, "u1")
    );
    // Loopback is refused by the built-in egress policy unless a test installed another.
    assert!(
        ["egress", "unreachable"].contains(&failed.class.as_str()),
        "{failed:?}"
    );
    assert!(!format!("{failed:?}").contains(canary));
    // Its success would be `recovered`, a first success `refreshed`.
    assert_eq!(
        EventKind::after_refresh(ConnectionStatus::Error),
        EventKind::Recovered
    );
    assert_eq!(
        EventKind::after_refresh(ConnectionStatus::Connected),
        EventKind::Refreshed
    );
}
