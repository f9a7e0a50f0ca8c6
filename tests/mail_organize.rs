//! Mail organisation against dovecot over TLS, through the real daemon: MoveMessages, SetFlags,
//! DeleteMessages (to Trash, and expunged) and ListFolders, each checked with plain IMAP
//! outside the broker (Python's imaplib over implicit TLS, logging in as the account itself).
//! Every test works in folders of its own (Bob's account is shared between tests and runs),
//! filled by IMAP APPEND, so it sees only its own messages.

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use credbroker::api::proto::{self, broker_client::BrokerClient};
use support::daemon::{ADMIN, AGENT, Daemon, assert_refused, audit_records, conn, reason};
use support::mail::{Servers, connected, connected_bob, fetch, token};
use support::peers::peers;
use tonic::Code;
use tonic::transport::Channel;

const READER: &str = "spiffe://test/reader";

/// The agent may read and organise mail; the reader may only read it.
fn policy() -> String {
    format!(
        "[[callers]]\nid = \"{ADMIN}\"\nadmin_workspaces = [\"*\"]\n\n\
         [[callers]]\nid = \"{AGENT}\"\n[[callers.grants]]\nworkspace = \"*\"\n\
         connectors = [\"*\"]\noperations = [\"fetch_mail\", \"organize_mail\"]\nusers = [\"*\"]\n\n\
         [[callers]]\nid = \"{READER}\"\n[[callers.grants]]\nworkspace = \"*\"\n\
         connectors = [\"*\"]\noperations = [\"fetch_mail\"]\nusers = [\"*\"]\n"
    )
}

/// The daemon with Bob's account connected as "Bob", and the agent's client.
async fn setup() -> (Daemon, BrokerClient<Channel>) {
    let daemon = Daemon::start_with(&policy(), "");
    daemon.issue(READER, "reader");
    let (daemon, mut admin, agent) = daemon.with_clients().await;
    connected_bob(&mut admin, "Bob", &Servers::implicit_imap_starttls_smtp()).await;
    (daemon, agent)
}

/// Plain IMAP as Bob, outside the broker: `create BOX`, `delete BOX`, `append BOX SUBJECT`, `list BOX` (one
/// JSON line: UIDVALIDITY and each message's UID, flags and subject).
const IMAP: &str = r#"
import imaplib, json, re, ssl, sys
port, ca, cmd, box = sys.argv[1:5]
m = imaplib.IMAP4_SSL("127.0.0.1", int(port), ssl_context=ssl.create_default_context(cafile=ca))
m.login("bob@x.test", "secret2")
name = '"' + box.replace('\\', '\\\\').replace('"', '\\"') + '"'
def ok(r):
    assert r[0] == "OK", r
    return r[1]
if cmd == "create":
    ok(m.create(name))
elif cmd == "delete":
    ok(m.delete(name))
elif cmd == "append":
    s = sys.argv[5]
    msg = f"From: t@x.test\r\nTo: bob@x.test\r\nSubject: {s}\r\n\r\nthe body of {s}\r\n"
    ok(m.append(name, None, None, msg.encode()))
elif cmd == "list":
    count = int(ok(m.select(name, readonly=True))[0])
    validity = int(m.response("UIDVALIDITY")[1][0])
    out = []
    if count:
        data = ok(m.uid("FETCH", "1:*", "(UID FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])"))
        for part in data:
            if not isinstance(part, tuple):
                continue
            head = part[0].decode()
            flags = re.search(r"FLAGS \(([^)]*)\)", head).group(1).split()
            subject = part[1].decode().strip().removeprefix("Subject: ")
            out.append({"uid": int(re.search(r"UID (\d+)", head).group(1)), "flags": sorted(flags), "subject": subject})
    print(json.dumps({"uid_validity": validity, "messages": out}))
m.logout()
"#;

fn ca_file() -> &'static PathBuf {
    static CA: OnceLock<PathBuf> = OnceLock::new();
    CA.get_or_init(|| {
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("mail-organize-ca.pem");
        std::fs::write(&path, &peers().ca_pem).expect("write the peers' CA");
        path
    })
}

/// The Python client (and the interpreter imaplib runs in), built once for this binary.
fn python() -> &'static (PathBuf, PathBuf) {
    static BUILT: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BUILT.get_or_init(|| support::python::client_build("python-client-organize"))
}

fn imap(args: &[&str]) -> String {
    let port = peers().ports().imaps.to_string();
    support::python::run(
        Command::new(&python().0)
            .args(["-c", IMAP, &port])
            .arg(ca_file())
            .args(args),
        &format!("plain IMAP {args:?}"),
    )
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Plain {
    uid_validity: u32,
    /// Subject → (UID, flags).
    messages: Vec<(String, u32, Vec<String>)>,
}

impl Plain {
    fn subjects(&self) -> BTreeSet<&str> {
        self.messages.iter().map(|m| m.0.as_str()).collect()
    }

    fn uid(&self, subject: &str) -> u32 {
        self.find(subject).1
    }

    fn flags(&self, subject: &str) -> Vec<String> {
        self.find(subject).2.clone()
    }

    fn find(&self, subject: &str) -> &(String, u32, Vec<String>) {
        self.messages
            .iter()
            .find(|m| m.0 == subject)
            .unwrap_or_else(|| panic!("{subject:?} is not in {self:?}"))
    }
}

/// What plain IMAP sees in `mailbox`.
fn plain(mailbox: &str) -> Plain {
    let out = imap(&["list", mailbox]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("imaplib's JSON");
    let messages = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let flags = m["flags"].as_array().unwrap();
            (
                m["subject"].as_str().unwrap().to_string(),
                m["uid"].as_u64().unwrap() as u32,
                flags
                    .iter()
                    .map(|f| f.as_str().unwrap().to_string())
                    .filter(|f| f != "\\Recent")
                    .collect(),
            )
        })
        .collect();
    Plain {
        uid_validity: v["uid_validity"].as_u64().unwrap() as u32,
        messages,
    }
}

/// A folder of Bob's that a test made; deleted when the test ends, so that runs do not pile
/// folders up in the shared account.
struct TestFolder(String);

impl std::ops::Deref for TestFolder {
    type Target = String;
    fn deref(&self) -> &String {
        &self.0
    }
}

impl Drop for TestFolder {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            imap(&["delete", &self.0]);
        }
    }
}

/// A new folder of Bob's holding one message per subject (`{mark} {name}`).
fn folder_with(mark: &str, prefix: &str, names: &[&str]) -> TestFolder {
    let folder = format!("{prefix}-{mark}");
    imap(&["create", &folder]);
    for name in names {
        imap(&["append", &folder, &format!("{mark} {name}")]);
    }
    TestFolder(folder)
}

fn selection(mailbox: &str, uid_validity: u32, uids: Vec<u32>) -> Option<proto::MailSelection> {
    Some(proto::MailSelection {
        mailbox: mailbox.into(),
        uid_validity,
        uids,
    })
}

fn move_to(sel: Option<proto::MailSelection>, destination: &str) -> proto::MoveMessagesRequest {
    proto::MoveMessagesRequest {
        connection: conn("Bob", ""),
        selection: sel,
        destination: destination.into(),
    }
}

fn flags(
    sel: Option<proto::MailSelection>,
    add: &[proto::MailFlag],
    remove: &[proto::MailFlag],
) -> proto::SetFlagsRequest {
    proto::SetFlagsRequest {
        connection: conn("Bob", ""),
        selection: sel,
        add: add.iter().map(|f| *f as i32).collect(),
        remove: remove.iter().map(|f| *f as i32).collect(),
        ..Default::default()
    }
}

fn delete(sel: Option<proto::MailSelection>, expunge: bool) -> proto::DeleteMessagesRequest {
    proto::DeleteMessagesRequest {
        connection: conn("Bob", ""),
        selection: sel,
        expunge,
    }
}

/// ListFolders of Bob's account; it must succeed.
async fn list_folders(client: &mut BrokerClient<Channel>) -> proto::ListFoldersResponse {
    let request = proto::ListFoldersRequest {
        connection: conn("Bob", ""),
    };
    let listed = client.list_folders(request).await;
    listed.expect("ListFolders").into_inner()
}

fn strings(l: &[&str]) -> Vec<String> {
    l.iter().map(|s| s.to_string()).collect()
}

/// Moves two messages, flags and unflags a third, deletes it to Trash and expunges a fourth;
/// after each step plain IMAP sees exactly that.
async fn organise(agent: &mut BrokerClient<Channel>, mark: &str, src: &str, dst: &str) {
    let before = plain(src);
    let (a, b, c, d) = (
        format!("{mark} a"),
        format!("{mark} b"),
        format!("{mark} c"),
        format!("{mark} d"),
    );
    // The agent reads the UIDs and the UIDVALIDITY through FetchMail, as it would.
    let read = fetch(agent, conn("Bob", ""), |r| r.mailbox = src.into())
        .await
        .expect("FetchMail of the folder");
    assert_eq!(read.uid_validity, before.uid_validity);
    let sel = |uids: Vec<u32>| selection(src, read.uid_validity, uids);

    let moved = agent
        .move_messages(move_to(sel(vec![before.uid(&a), before.uid(&b)]), dst))
        .await
        .expect("MoveMessages")
        .into_inner();
    assert_eq!(moved.uids, [before.uid(&a), before.uid(&b)]);
    assert_eq!(moved.destination, dst);
    assert_eq!(
        plain(src).subjects(),
        BTreeSet::from([c.as_str(), d.as_str()])
    );
    let there = plain(dst);
    assert_eq!(there.subjects(), BTreeSet::from([a.as_str(), b.as_str()]));
    // Where they went, as the server said (COPYUID), is what plain IMAP sees.
    assert_eq!(moved.destination_uids, [there.uid(&a), there.uid(&b)]);
    assert_eq!(moved.destination_uid_validity, there.uid_validity);

    use proto::MailFlag::{Flagged, Seen};
    agent
        .set_flags(flags(sel(vec![before.uid(&c)]), &[Seen, Flagged], &[]))
        .await
        .expect("SetFlags adding");
    assert_eq!(plain(src).flags(&c), strings(&["\\Flagged", "\\Seen"]));
    assert_eq!(plain(src).flags(&d), Vec::<String>::new(), "d is untouched");
    agent
        .set_flags(flags(sel(vec![before.uid(&c)]), &[], &[Flagged]))
        .await
        .expect("SetFlags removing");
    assert_eq!(plain(src).flags(&c), strings(&["\\Seen"]));
    trash_and_expunge(agent, src, &before, &c, &d).await;
}

/// Deletes `c` of `src` to Trash and expunges it from there, then expunges `d` (twice).
async fn trash_and_expunge(
    agent: &mut BrokerClient<Channel>,
    src: &str,
    before: &Plain,
    c: &str,
    d: &str,
) {
    let sel = |uids: Vec<u32>| selection(src, before.uid_validity, uids);
    let trashed = agent
        .delete_messages(delete(sel(vec![before.uid(c)]), false))
        .await
        .expect("DeleteMessages to Trash")
        .into_inner();
    assert_eq!(
        (trashed.destination.as_str(), trashed.expunged),
        ("Trash", false)
    );
    assert_eq!(plain(src).subjects(), BTreeSet::from([d]));
    let trash = plain("Trash");
    assert_eq!(trash.flags(c), strings(&["\\Seen"]));
    assert_eq!(trashed.destination_uids, [trash.uid(c)]);
    // From Trash itself, only expunging removes a message (for good).
    let in_trash = || selection("Trash", trash.uid_validity, vec![trash.uid(c)]);
    let status = agent
        .delete_messages(delete(in_trash(), false))
        .await
        .unwrap_err();
    assert_refused(&status, Code::InvalidArgument, "INVALID_ARGUMENT");
    assert_eq!(reason(&status).1["field"], "expunge");
    agent
        .delete_messages(delete(in_trash(), true))
        .await
        .expect("DeleteMessages expunging from Trash");
    assert!(!plain("Trash").subjects().contains(c));

    // Expunged, then asked again: the second time nothing is done, and the answer says so.
    let mut answers = Vec::new();
    for _ in 0..2 {
        let expunge_d = delete(sel(vec![before.uid(d)]), true);
        let answer = agent.delete_messages(expunge_d).await;
        answers.push(answer.expect("DeleteMessages expunging").into_inner());
    }
    assert!(answers[0].expunged && answers[0].destination.is_empty());
    assert_eq!(answers[0].uids, [before.uid(d)]);
    assert!(plain(src).messages.is_empty());
    assert!(!plain("Trash").subjects().contains(d));
    let again = &answers[1];
    assert_eq!(
        (&again.uids[..], &again.missing[..]),
        (&[][..], &[before.uid(d)][..])
    );
}

#[tokio::test]
async fn messages_are_moved_flagged_trashed_and_expunged_as_plain_imap_sees() {
    let (daemon, mut agent) = setup().await;
    let mark = token();
    let src = folder_with(&mark, "Src", &["a", "b", "c", "d"]);
    let dst = folder_with(&mark, "Dst", &[]);

    let listed = list_folders(&mut agent).await;
    let names: Vec<&str> = listed.folders.iter().map(|f| f.name.as_str()).collect();
    for want in ["INBOX", src.as_str(), dst.as_str()] {
        assert!(names.contains(&want), "{want} not in {names:?}");
    }
    // dovecot marks no folder \Trash and has no Gmail labels.
    assert_eq!((listed.trash.as_str(), listed.labels), ("Trash", false));

    organise(&mut agent, &mark, &src, &dst).await;

    // Labels: dovecot has no X-GM-EXT-1, so the request is refused before anything changes.
    let there = plain(&dst);
    let uid = there.uid(&format!("{mark} a"));
    let labels = agent
        .set_flags(proto::SetFlagsRequest {
            add: vec![proto::MailFlag::Seen as i32],
            add_labels: vec!["Receipts".into()],
            ..flags(selection(&dst, there.uid_validity, vec![uid]), &[], &[])
        })
        .await
        .unwrap_err();
    assert_refused(&labels, Code::Unimplemented, "UNSUPPORTED");
    assert!(labels.message().contains("no labels"), "{labels:?}");
    assert_eq!(plain(&dst), there, "nothing changed");

    assert_audited(&daemon, &mark, &src, &dst).await;
}

/// Each call is audited, with what was asked and never anything of the messages.
async fn assert_audited(daemon: &Daemon, mark: &str, src: &str, dst: &str) {
    let records = audit_records(&mut daemon.admin().await).await;
    // The changing RPCs wrote an intent record before they acted; ListFolders only reads.
    let intents = |op: &str| {
        records
            .iter()
            .filter(|r| r.operation == op && r.outcome == "allowed")
            .count()
    };
    assert_eq!(
        [
            intents("ListFolders"),
            intents("MoveMessages"),
            intents("DeleteMessages")
        ],
        [0, 1, 5]
    );
    for op in ["ListFolders", "MoveMessages", "SetFlags", "DeleteMessages"] {
        assert!(
            records
                .iter()
                .any(|r| r.operation == op && r.outcome == "ok" && r.caller == AGENT),
            "no ok record of {op}"
        );
    }
    let moved = records
        .iter()
        .find(|r| r.operation == "MoveMessages" && r.outcome == "ok")
        .unwrap();
    assert!(
        moved
            .detail
            .starts_with(&format!("move to {dst:?}: 2 UIDs of {src:?}")),
        "{}",
        moved.detail
    );
    for r in &records {
        let text = format!("{} {} {}", r.reason, r.detail, r.connector);
        assert!(
            !text.contains(&format!("{mark} ")) && !text.contains("the body of"),
            "message content in the audit record {r:?}"
        );
    }
}

/// Whatever `act` tries, the folder is as it was.
async fn refused_unchanged(
    folder: &str,
    act: impl AsyncFnOnce(&Plain) -> tonic::Status,
) -> tonic::Status {
    let before = plain(folder);
    let status = act(&before).await;
    assert_eq!(plain(folder), before, "the folder changed: {status:?}");
    status
}

#[tokio::test]
async fn a_reader_may_list_and_read_but_not_move_flag_or_delete() {
    let (daemon, _agent) = setup().await;
    let mut reader = BrokerClient::new(daemon.channel_as("reader").await.expect("reader"));
    let mark = token();
    let src = folder_with(&mark, "Read", &["x"]);
    list_folders(&mut reader).await;
    let read = fetch(&mut reader, conn("Bob", ""), |r| r.mailbox = src.clone())
        .await
        .expect("FetchMail");
    let sel = || selection(&src, read.uid_validity, vec![read.messages[0].uid]);
    let status = refused_unchanged(&src, async |_| {
        reader
            .move_messages(move_to(sel(), "INBOX"))
            .await
            .unwrap_err()
    })
    .await;
    assert_refused(&status, Code::PermissionDenied, "POLICY");
    assert!(status.message().contains("organize_mail"), "{status:?}");
    let status = refused_unchanged(&src, async |_| {
        reader
            .delete_messages(delete(sel(), true))
            .await
            .unwrap_err()
    })
    .await;
    assert_refused(&status, Code::PermissionDenied, "POLICY");
    let status = refused_unchanged(&src, async |_| {
        let seen = flags(sel(), &[proto::MailFlag::Seen], &[]);
        reader.set_flags(seen).await.unwrap_err()
    })
    .await;
    assert_refused(&status, Code::PermissionDenied, "POLICY");
    let records = audit_records(&mut daemon.admin().await).await;
    let denied = records
        .iter()
        .filter(|r| r.caller == READER && r.outcome == "denied")
        .count();
    assert_eq!(denied, 3, "{records:?}");
}

#[tokio::test]
async fn a_stale_uidvalidity_a_missing_folder_or_too_many_uids_change_nothing() {
    let (_daemon, mut agent) = setup().await;
    let mark = token();
    let src = folder_with(&mark, "Stale", &["x", "y"]);
    let status = refused_unchanged(&src, async |before| {
        let stale = selection(&src, before.uid_validity + 1, vec![before.messages[0].1]);
        agent
            .delete_messages(delete(stale, true))
            .await
            .unwrap_err()
    })
    .await;
    assert_refused(&status, Code::FailedPrecondition, "FAILED_PRECONDITION");
    assert_eq!(reason(&status).1["mailbox"], src.as_str());
    assert!(
        status.message().contains(src.as_str()) && status.message().contains("UIDVALIDITY"),
        "{status:?}"
    );

    let status = refused_unchanged(&src, async |before| {
        let sel = selection(&src, before.uid_validity, vec![before.messages[0].1]);
        let nowhere = format!("Nowhere-{mark}");
        agent
            .move_messages(move_to(sel, &nowhere))
            .await
            .unwrap_err()
    })
    .await;
    assert_refused(&status, Code::NotFound, "MAILBOX_NOT_FOUND");

    let status = refused_unchanged(&src, async |before| {
        let sel = selection(&src, before.uid_validity, (1..=1001).collect());
        agent
            .set_flags(flags(sel, &[proto::MailFlag::Seen], &[]))
            .await
            .unwrap_err()
    })
    .await;
    assert_refused(&status, Code::InvalidArgument, "INVALID_ARGUMENT");
    assert_eq!(reason(&status).1["field"], "selection.uids");
    assert!(status.message().contains("at most 1000"), "{status:?}");
}

#[tokio::test]
async fn a_connection_names_its_own_trash_folder_created_on_first_use() {
    let daemon = Daemon::start_with(&policy(), "");
    let (_daemon, mut admin, mut agent) = daemon.with_clients().await;
    let mark = token();
    let bin = TestFolder(format!("Bin-{mark}"));
    let servers = Servers::implicit_imap_starttls_smtp();
    let setting = [("trash_mailbox", bin.as_str())];
    connected(
        &mut admin,
        "Bob",
        &servers,
        "bob@x.test",
        "secret2",
        &setting,
    )
    .await;
    let src = folder_with(&mark, "Own", &["x"]);
    let listed = list_folders(&mut agent).await;
    assert_eq!(listed.trash, *bin);
    assert!(
        !listed.folders.iter().any(|f| f.name == *bin),
        "not yet made"
    );
    let before = plain(&src);
    let sel = selection(
        &src,
        before.uid_validity,
        vec![before.uid(&format!("{mark} x"))],
    );
    let trashed = agent
        .delete_messages(delete(sel, false))
        .await
        .expect("DeleteMessages to the connection's trash")
        .into_inner();
    assert_eq!(trashed.destination, *bin);
    assert_eq!(
        plain(&bin).subjects(),
        BTreeSet::from([format!("{mark} x").as_str()])
    );
    assert!(plain(&src).messages.is_empty());
}

/// The documented example (`clients/python/examples/organize_mail.py`): an agent flags and
/// files its messages through the Python client.
#[tokio::test]
async fn the_python_example_flags_and_moves_messages() {
    let (daemon, _agent) = setup().await;
    let mark = token();
    let src = folder_with(&mark, "Py", &["invoice 1", "note", "invoice 2"]);
    let dst = folder_with(&mark, "Receipts", &[]);
    let (python, client) = python();
    let out = support::python::run_example(
        (python.as_path(), client.as_path()),
        "organize_mail.py",
        &daemon.grpc.to_string(),
        daemon.dir.path(),
        &[
            "--connector",
            "Bob",
            "--mailbox",
            &src,
            "--subject-contains",
            "invoice",
            "--move-to",
            &dst,
        ],
    );
    assert!(out.contains("labels: False"), "{out}");
    let filed = plain(&dst);
    let invoices = [format!("{mark} invoice 1"), format!("{mark} invoice 2")];
    assert_eq!(
        filed.subjects(),
        invoices.iter().map(String::as_str).collect::<BTreeSet<_>>()
    );
    for s in &invoices {
        assert_eq!(filed.flags(s), strings(&["\\Flagged", "\\Seen"]));
    }
    let left = plain(&src);
    let note = format!("{mark} note");
    assert_eq!(left.subjects(), BTreeSet::from([note.as_str()]));
    // The client's delete_messages, expunging the note for good.
    let script = "import sys, credbroker\n\
        from credbroker.v1 import common_pb2\n\
        addr, ca, cert, key, box, validity, uid = sys.argv[1:]\n\
        with credbroker.connect(addr, ca=ca, cert=cert, key=key) as cb:\n\
        \x20   r = cb.delete_messages(common_pb2.ConnectionRef(connector='Bob'), box, int(validity), [int(uid)], expunge=True)\n\
        \x20   print(r.expunged, list(r.uids))\n";
    let files = daemon.files("agent");
    let out = support::python::run(
        Command::new(python)
            .env("PYTHONPATH", client)
            .args(["-c", script, &daemon.grpc.to_string()])
            .arg(daemon.path("ca.pem"))
            .arg(&files.cert)
            .arg(&files.key)
            .args([
                &src,
                &left.uid_validity.to_string(),
                &left.uid(&note).to_string(),
            ]),
        "credbroker.Client.delete_messages",
    );
    assert_eq!(out.trim(), format!("True [{}]", left.uid(&note)));
    assert!(plain(&src).messages.is_empty());
}
