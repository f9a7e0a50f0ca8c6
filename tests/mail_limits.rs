//! What bounds mail reading, against real servers (dovecot and postfix, through the real
//! daemon): a WatchMail stream lives only as long as its grant and its connection (a policy
//! reload, a Disconnect or a deleted connector end it with a status the client can act on, and
//! the end is audited), and FetchMail and WatchMail read at most `[limits]
//! max_mail_message_bytes` per message and `max_mail_response_bytes` per response from the IMAP
//! server. The mailboxes are shared, so each test marks its messages with a random subject.

mod support;

use std::time::Duration;

use credbroker::api::proto;
use support::daemon::{Daemon, OPEN_POLICY, assert_refused, audit_records, conn, write};
use support::mail::{
    DELIVERY, Servers, connected_alice, connected_bob, fetch, plain, token, wait_for,
};
use tonic::Code;

/// The longest a stream may outlive what revoked it.
const REVOKED: Duration = Duration::from_secs(30);

type Admin = proto::admin_client::AdminClient<tonic::transport::Channel>;
type Broker = proto::broker_client::BrokerClient<tonic::transport::Channel>;

/// Bob (read over implicit TLS) and Alice (over STARTTLS) connected.
async fn bob_and_alice(admin: &mut Admin) {
    connected_bob(admin, "Bob", &Servers::implicit_imap_starttls_smtp()).await;
    connected_alice(admin, "Alice", &Servers::starttls_imap_implicit_smtp()).await;
}

/// Bob and Alice connected, and a WatchMail stream on Bob's INBOX.
async fn bob_watched(admin: &mut Admin, agent: &mut Broker) -> tonic::Streaming<proto::MailEvent> {
    bob_and_alice(admin).await;
    agent
        .watch_mail(proto::WatchMailRequest {
            connection: conn("Bob", ""),
            ..Default::default()
        })
        .await
        .expect("WatchMail")
        .into_inner()
}

/// The status the stream ends with (messages other tests deliver meanwhile are skipped), after
/// which it yields nothing.
async fn end_of(mut stream: tonic::Streaming<proto::MailEvent>) -> tonic::Status {
    let deadline = tokio::time::Instant::now() + REVOKED;
    let status = loop {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Err(_) => panic!("the stream was still open {REVOKED:?} after its revocation"),
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => panic!("the stream ended without a status"),
            Ok(Err(status)) => break status,
        }
    };
    let after = tokio::time::timeout(REVOKED, stream.message()).await;
    assert!(
        matches!(after, Ok(Ok(None))),
        "the stream went on after its end: {after:?}"
    );
    status
}

/// The audit records of WatchMail, oldest first.
async fn watch_audit(admin: &mut Admin) -> Vec<proto::AuditRecord> {
    let mut records = audit_records(admin).await;
    records.retain(|r| r.operation == "WatchMail");
    records
}

/// The stream's end was audited: a second record under the request id of its opening.
async fn assert_end_audited(admin: &mut Admin, outcome: &str) {
    let records = watch_audit(admin).await;
    let opened = records.first().expect("the opening was not audited");
    let ends: Vec<&proto::AuditRecord> = records
        .iter()
        .skip(1)
        .filter(|r| r.request_id == opened.request_id)
        .collect();
    assert_eq!(ends.len(), 1, "{records:?}");
    assert_eq!(ends[0].outcome, outcome, "{:?}", ends[0]);
    assert!(ends[0].reason.contains("stream ended"), "{:?}", ends[0]);
}

#[tokio::test]
async fn watch_mail_ends_when_a_policy_reload_removes_the_grant() {
    let (daemon, mut admin, mut agent) = Daemon::start().with_clients().await;
    let stream = bob_watched(&mut admin, &mut agent).await;

    // The agent keeps every other operation; watch_mail is gone.
    write(
        &daemon.path("policy.toml"),
        &OPEN_POLICY.replace("\"watch_mail\", ", ""),
    );
    daemon.hangup();
    let status = end_of(stream).await;
    assert_refused(&status, Code::PermissionDenied, "POLICY");
    assert!(status.message().contains("watch_mail"), "{status:?}");
    assert_end_audited(&mut admin, "denied").await;

    // Opening it again is refused too; reading is still allowed.
    let again = agent
        .watch_mail(proto::WatchMailRequest {
            connection: conn("Bob", ""),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::PermissionDenied);
    fetch(&mut agent, conn("Bob", ""), |r| r.limit = 1)
        .await
        .expect("FetchMail is still granted");
}

#[tokio::test]
async fn a_reload_that_keeps_the_grant_keeps_the_stream() {
    let (daemon, mut admin, mut agent) = Daemon::start().with_clients().await;
    let mut stream = bob_watched(&mut admin, &mut agent).await;
    // The same grants under another caller's entry: a reload, with the agent's rights intact.
    write(
        &daemon.path("policy.toml"),
        &format!("{OPEN_POLICY}\n[[callers]]\nid = \"spiffe://test/other\"\n"),
    );
    daemon.hangup();
    let reloaded = support::wait::until(REVOKED, async || {
        daemon.logs().contains("policy reloaded").then_some(())
    })
    .await;
    assert!(reloaded.is_some(), "the policy was not reloaded");
    let subject = format!("still watching {}", token());
    send_to_bob(&mut agent, &subject, 1).await;
    support::mail::next_with_subject(&mut stream, &subject).await;
}

/// Bob watched, then `revoke` run as the admin: the stream ends with `code` and `why`, and the
/// end is audited as an error.
async fn ends_after(revoke: impl AsyncFnOnce(&mut Admin), code: Code, why: &str) {
    let (_daemon, mut admin, mut agent) = Daemon::start().with_clients().await;
    let stream = bob_watched(&mut admin, &mut agent).await;
    revoke(&mut admin).await;
    assert_refused(&end_of(stream).await, code, why);
    assert_end_audited(&mut admin, "error").await;
}

#[tokio::test]
async fn watch_mail_ends_on_disconnect_as_not_connected() {
    let disconnect = async |admin: &mut Admin| {
        let request = proto::DisconnectRequest {
            connection: conn("Bob", ""),
        };
        admin.disconnect(request).await.expect("Disconnect");
    };
    ends_after(disconnect, Code::FailedPrecondition, "NOT_CONNECTED").await;
}

#[tokio::test]
async fn watch_mail_ends_when_its_connector_is_deleted() {
    let delete = async |admin: &mut Admin| {
        let request = proto::DeleteConnectorRequest {
            connector: "Bob".into(),
            ..Default::default()
        };
        admin
            .delete_connector(request)
            .await
            .expect("DeleteConnector");
    };
    ends_after(delete, Code::NotFound, "NOT_FOUND").await;
}

#[tokio::test]
async fn a_stream_the_client_closes_is_audited_as_ended() {
    let (_daemon, mut admin, mut agent) = Daemon::start().with_clients().await;
    let stream = bob_watched(&mut admin, &mut agent).await;
    drop(stream);
    let ended = support::wait::until(REVOKED, async || {
        (watch_audit(&mut admin).await.len() >= 2).then_some(())
    })
    .await;
    assert!(ended.is_some(), "the end was not audited");
    assert_end_audited(&mut admin, "ok").await;
}

/// Bob and Alice connected, under `[limits]` caps of `message` and `response` bytes.
async fn capped(message: u32, response: u64) -> (Daemon, Admin, Broker) {
    let daemon = Daemon::start_with_config(&format!(
        "[limits]\nmax_mail_message_bytes = {message}\nmax_mail_response_bytes = {response}\n"
    ));
    let (daemon, mut admin, agent) = daemon.with_clients().await;
    bob_and_alice(&mut admin).await;
    (daemon, admin, agent)
}

/// Alice sends Bob a message whose text is `lines` lines of 64 characters.
async fn send_to_bob(agent: &mut Broker, subject: &str, lines: usize) {
    let line = format!("{:-<63}\n", "");
    let text = format!("first line\n{}last line\n", line.repeat(lines));
    let request = plain(conn("Alice", ""), "bob@x.test", subject, &text);
    agent.send_email(request).await.expect("SendEmail");
}

const KIB: u32 = 1024;

#[tokio::test]
async fn a_message_over_the_cap_comes_back_truncated_with_its_size_from_fetch_and_watch() {
    let (_daemon, _admin, mut agent) = capped(64 * KIB, 1024 * 1024).await;
    let mark = token();
    let (big, small) = (format!("big {mark}"), format!("small {mark}"));
    send_to_bob(&mut agent, &big, 5000).await;
    send_to_bob(&mut agent, &small, 10).await;
    wait_for(&mut agent, conn("Bob", ""), &small, false).await;
    let big_message = wait_for(&mut agent, conn("Bob", ""), &big, false).await;
    assert!(big_message.truncated, "{:?}", big_message.size);
    assert!(big_message.size > 5000 * 64, "{}", big_message.size);
    assert!(big_message.text_body.starts_with("first line"));
    assert!(big_message.text_body.len() < 64 * KIB as usize);
    assert!(!big_message.text_body.contains("last line"));
    let small_message = wait_for(&mut agent, conn("Bob", ""), &small, false).await;
    assert!(!small_message.truncated);
    assert!(small_message.text_body.contains("last line"));
    assert!(small_message.size > 10 * 64 && small_message.size < 64 * u64::from(KIB));

    // WatchMail reads it the same way.
    let mut stream = agent
        .watch_mail(proto::WatchMailRequest {
            connection: conn("Bob", ""),
            since_uid: big_message.uid - 1,
            ..Default::default()
        })
        .await
        .expect("WatchMail")
        .into_inner();
    let first = tokio::time::timeout(DELIVERY, stream.message())
        .await
        .expect("nothing streamed")
        .expect("the stream failed")
        .expect("the stream ended")
        .message
        .unwrap();
    assert_eq!((first.uid, first.truncated), (big_message.uid, true));
    assert_eq!(first.size, big_message.size);
}

/// The bytes a reply read: each message up to the per-message cap.
fn read_bytes(r: &proto::FetchMailResponse, message_cap: u32) -> u64 {
    r.messages
        .iter()
        .map(|m| m.size.min(u64::from(message_cap)))
        .sum()
}

/// The subjects ending in `mark`.
fn marked(r: &proto::FetchMailResponse, mark: &str) -> Vec<String> {
    r.messages
        .iter()
        .filter(|m| m.subject.ends_with(mark))
        .map(|m| m.subject.clone())
        .collect()
}

#[tokio::test]
async fn a_response_holds_at_most_its_cap_and_paging_reaches_every_message() {
    let (message_cap, response) = (128 * KIB, 200 * u64::from(KIB));
    let (_daemon, _admin, mut agent) = capped(message_cap, response).await;
    let before = fetch(&mut agent, conn("Bob", ""), |r| r.limit = 1)
        .await
        .expect("FetchMail")
        .highest_uid;
    let mark = token();
    let mut subjects: Vec<String> = (0..3).map(|i| format!("page {i} {mark}")).collect();
    for subject in &subjects {
        // About 90 KiB each: two fit under the cap, three do not.
        send_to_bob(&mut agent, subject, 1400).await;
    }

    // Paging forward from before them reaches all three, each page within the cap.
    let (mut largest, mut capped_pages) = (0, 0);
    let seen = support::wait::until(DELIVERY, async || {
        let (mut after, mut seen) = (before, Vec::new());
        loop {
            let page = fetch(&mut agent, conn("Bob", ""), |r| r.since_uid = after)
                .await
                .expect("FetchMail");
            largest = largest.max(read_bytes(&page, message_cap));
            capped_pages += usize::from(page.response_cap_reached);
            seen.extend(marked(&page, &mark));
            match page.messages.last() {
                Some(last) => after = last.uid,
                None => break,
            }
        }
        seen.sort();
        (seen.len() >= 3).then_some(seen)
    })
    .await
    .expect("the three messages were not delivered");
    subjects.sort();
    assert_eq!(seen, subjects, "each message exactly once");
    assert!(largest <= response, "a page read {largest} bytes");
    assert!(capped_pages >= 1, "no page reached the cap");

    // Without since_uid: the newest messages, as many as fit.
    let newest = fetch(&mut agent, conn("Bob", ""), |_| {}).await.unwrap();
    assert!(newest.response_cap_reached);
    assert!(read_bytes(&newest, message_cap) <= response);
    assert!(
        marked(&newest, &mark).len() < 3,
        "{:?}",
        marked(&newest, &mark)
    );
}

#[tokio::test]
async fn new_credentials_make_the_stream_reconnect_with_them_and_go_on() {
    let (daemon, mut admin, mut agent) = Daemon::start().with_clients().await;
    let mut stream = bob_watched(&mut admin, &mut agent).await;
    // The user connects the account again: the record changes, the connection stays usable.
    let again = support::mail::credentials("Bob", "bob@x.test", "secret2", &[], false);
    let saved = admin
        .connect_with_credentials(again)
        .await
        .expect("ConnectWithCredentials");
    assert!(saved.into_inner().saved);
    let reconnected = support::wait::until(REVOKED, async || {
        daemon
            .logs()
            .contains("WatchMail reconnects with it")
            .then_some(())
    })
    .await;
    assert!(
        reconnected.is_some(),
        "the stream did not notice the new credentials"
    );
    let subject = format!("after reconnecting {}", token());
    send_to_bob(&mut agent, &subject, 1).await;
    support::mail::next_with_subject(&mut stream, &subject).await;
}
