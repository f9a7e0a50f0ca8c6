//! Calendars against a real Radicale server over TLS (DESIGN.md §4) through the real daemon:
//! CalDAV connections tested before saving, events created through CreateEvent and listed back
//! as exactly the expected UTC instances, refusals, deadlines and bad input. Google Calendar is
//! tested against a small local server speaking its documented JSON (no Google here).

mod support;

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use credbroker::api::proto::{self, admin_client::AdminClient, broker_client::BrokerClient};
use support::daemon::{
    Daemon, assert_refused, conn, get_connection, new_connector, reason, secrets,
};
use support::peers::peers;
use tonic::Code;
use tonic::transport::Channel;

const ALICE: (&str, &str) = ("alice", "secret1");
const BOB: (&str, &str) = ("bob", "secret2");
/// The window most tests list.
const JANUARY: (&str, &str) = ("2031-01-01T00:00:00Z", "2031-02-01T00:00:00Z");
/// No call may take longer than this, whatever the server does.
const HANG_GUARD: Duration = Duration::from_secs(60);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        hex::encode(credbroker::vault::random_bytes::<6>())
    )
}

fn utc(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn ts(s: &str) -> Option<prost_types::Timestamp> {
    let t = utc(s);
    Some(prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: 0,
    })
}

fn at(t: &Option<prost_types::Timestamp>) -> String {
    let t = t.as_ref().expect("a timestamp");
    DateTime::from_timestamp(t.seconds, t.nanos as u32)
        .unwrap()
        .format("%Y-%m-%dT%H:%MZ")
        .to_string()
}

/// A request to Radicale as `user`, straight (as the user's own client would send it).
fn radicale(method: &str, href: &str, user: (&str, &str)) -> reqwest::RequestBuilder {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let url = format!("https://127.0.0.1:{}{href}", peers().ports().caldav);
    peers()
        .http()
        .request(method, url)
        .basic_auth(user.0, Some(user.1))
}

/// Creates a calendar collection as `user` directly at Radicale (as the user's own client would).
async fn mkcalendar(user: (&str, &str), name: &str) -> String {
    let href = format!("/{}/{name}/", user.0);
    let resp = radicale("MKCALENDAR", &href, user).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 201, "MKCALENDAR {href}");
    href
}

async fn caldav_connector(admin: &mut AdminClient<Channel>, name: &str, url: &str) {
    admin
        .create_connector(proto::CreateConnectorRequest {
            config: HashMap::from([
                ("url".to_string(), url.to_string()),
                ("ca_pem".to_string(), peers().ca_pem.clone()),
            ]),
            ..new_connector(
                name,
                proto::ConnectorKind::Caldav,
                proto::ConnectorMode::Personal,
            )
        })
        .await
        .unwrap();
}

/// A daemon and its clients with a personal CalDAV connector "Calendar" at Radicale.
async fn with_calendar_connector() -> (Daemon, AdminClient<Channel>, BrokerClient<Channel>) {
    let (daemon, mut admin, agent) = Daemon::start().with_clients().await;
    caldav_connector(&mut admin, "Calendar", &peers().caldav_url()).await;
    (daemon, admin, agent)
}

/// A new calendar of alice's named after `prefix`, and alice connected as "u-alice" to the
/// "Calendar" connector; returns the calendar's path.
async fn connected_with_calendar(admin: &mut AdminClient<Channel>, prefix: &str) -> String {
    let calendar = mkcalendar(ALICE, &unique(prefix)).await;
    assert!(
        connect(admin, "Calendar", "u-alice", ALICE, false)
            .await
            .saved
    );
    calendar
}

async fn connect(
    admin: &mut AdminClient<Channel>,
    connector: &str,
    user_id: &str,
    login: (&str, &str),
    save_on_failure: bool,
) -> proto::ConnectWithCredentialsResponse {
    admin
        .connect_with_credentials(proto::ConnectWithCredentialsRequest {
            connection: conn(connector, user_id),
            settings: HashMap::from([("username".to_string(), login.0.to_string())]),
            secrets: secrets(&[("password", login.1)]),
            save_on_failure,
        })
        .await
        .unwrap()
        .into_inner()
}

async fn list(
    agent: &mut BrokerClient<Channel>,
    connector: &str,
    user: &str,
    calendar: &str,
    window: (&str, &str),
    limit: u32,
) -> Result<proto::ListCalendarResponse, tonic::Status> {
    let req = proto::ListCalendarRequest {
        connection: conn(connector, user),
        calendar: calendar.into(),
        time_min: ts(window.0),
        time_max: ts(window.1),
        limit,
    };
    tokio::time::timeout(HANG_GUARD, agent.list_calendar(req))
        .await
        .expect("ListCalendar hung")
        .map(|r| r.into_inner())
}

async fn create(
    agent: &mut BrokerClient<Channel>,
    connector: &str,
    user: &str,
    calendar: &str,
    event: proto::CalendarEvent,
    rrule: &str,
) -> Result<proto::CalendarEvent, tonic::Status> {
    let req = proto::CreateEventRequest {
        connection: conn(connector, user),
        calendar: calendar.into(),
        event: Some(event),
        rrule: rrule.into(),
    };
    tokio::time::timeout(HANG_GUARD, agent.create_event(req))
        .await
        .expect("CreateEvent hung")
        .map(|r| r.into_inner().event.unwrap())
}

/// Asserts that alice's `calendar` has no event in `window`.
async fn assert_no_events(agent: &mut BrokerClient<Channel>, calendar: &str, window: (&str, &str)) {
    let listed = list(agent, "Calendar", "u-alice", calendar, window, 0)
        .await
        .unwrap();
    assert!(listed.events.is_empty(), "{:?}", rows(&listed.events));
}

/// An hour-long event on 5 January 2031.
fn on_jan_5(summary: &str) -> proto::CalendarEvent {
    timed(summary, "2031-01-05T10:00:00Z", "2031-01-05T11:00:00Z", "")
}

fn timed(summary: &str, start: &str, end: &str, zone: &str) -> proto::CalendarEvent {
    proto::CalendarEvent {
        summary: summary.into(),
        start: ts(start),
        end: ts(end),
        time_zone: zone.into(),
        ..Default::default()
    }
}

/// (summary, start, end, all-day dates, recurrence id) of an event, for exact comparisons.
type Row = (String, String, String, String, String);

/// The [`Row`] of each event.
fn rows(events: &[proto::CalendarEvent]) -> Vec<Row> {
    events
        .iter()
        .map(|e| {
            (
                e.summary.clone(),
                at(&e.start),
                at(&e.end),
                format!("{}..{}", e.start_date, e.end_date),
                e.recurrence_id
                    .as_ref()
                    .map(|_| at(&e.recurrence_id))
                    .unwrap_or_default(),
            )
        })
        .collect()
}

/// An instance of a weekly event: its recurrence id is its start.
fn weekly(start: &str, end: &str) -> Row {
    row("Weekly", start, end, "..", start)
}

fn row(s: &str, start: &str, end: &str, dates: &str, rid: &str) -> Row {
    (s.into(), start.into(), end.into(), dates.into(), rid.into())
}

/// Edits a stored event the way another client would: adds an EXDATE and an overridden
/// instance (RFC 5545 RECURRENCE-ID), then PUTs it back with If-Match.
async fn add_exception_and_override(href: &str) {
    let resp = radicale("GET", href, ALICE).send().await.unwrap();
    assert!(resp.status().is_success(), "GET {href}: {}", resp.status());
    let etag = resp.headers()["etag"].to_str().unwrap().to_string();
    let body = resp.text().await.unwrap();
    let nl = if body.contains("\r\n") { "\r\n" } else { "\n" };
    let uid = body
        .lines()
        .find_map(|l| l.strip_prefix("UID:"))
        .unwrap()
        .trim()
        .to_string();
    let body = body.replacen(
        &format!("END:VEVENT{nl}"),
        &format!("EXDATE;TZID=Europe/Paris:20310317T090000{nl}END:VEVENT{nl}"),
        1,
    );
    let over = [
        "BEGIN:VEVENT".to_string(),
        format!("UID:{uid}"),
        "DTSTAMP:20310101T000000Z".into(),
        "RECURRENCE-ID;TZID=Europe/Paris:20310324T090000".into(),
        "DTSTART;TZID=Europe/Paris:20310324T140000".into(),
        "DTEND;TZID=Europe/Paris:20310324T150000".into(),
        "SUMMARY:Weekly (moved)".into(),
        "END:VEVENT".into(),
        "END:VCALENDAR".into(),
    ]
    .join(nl);
    let body = body.replace("END:VCALENDAR", &over);
    let resp = radicale("PUT", href, ALICE)
        .header("If-Match", etag)
        .header("Content-Type", "text/calendar")
        .body(body)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "PUT {href}: {}", resp.status());
}

/// Creates one event of each kind in alice's `work` calendar, by its name or its path: a single
/// event with attendees, an all-day one, and a weekly one in Paris to which another client then
/// adds an exception and an override. Returns the weekly event's UID.
async fn create_work_events(
    agent: &mut BrokerClient<Channel>,
    work: &str,
    work_name: &str,
) -> String {
    let single = create(
        agent,
        "Calendar",
        "u-alice",
        work_name,
        proto::CalendarEvent {
            description: "Agenda:\n1. budget; 2. hiring, later".into(),
            location: "Room 4".into(),
            attendees: vec![proto::Attendee {
                email: "bob@example.org".into(),
                name: "Bob".into(),
                status: "ACCEPTED".into(),
            }],
            ..timed("Single", "2031-03-10T14:00:00Z", "2031-03-10T15:00:00Z", "")
        },
        "",
    )
    .await
    .unwrap();
    assert!(single.uid.ends_with("@credbroker"), "{single:?}");
    assert_eq!(single.calendar, work);
    assert_eq!(single.description, "Agenda:\n1. budget; 2. hiring, later");
    assert_eq!(single.attendees[0].email, "bob@example.org");
    assert_eq!(single.attendees[0].status, "ACCEPTED");
    assert_eq!(single.status, "CONFIRMED");
    let all_day = create(
        agent,
        "Calendar",
        "u-alice",
        work,
        proto::CalendarEvent {
            summary: "Offsite".into(),
            all_day: true,
            start_date: "2031-03-12".into(),
            end_date: "2031-03-14".into(),
            ..Default::default()
        },
        "",
    )
    .await
    .unwrap();
    assert!(all_day.all_day);
    assert_eq!(
        (all_day.start_date.as_str(), all_day.end_date.as_str()),
        ("2031-03-12", "2031-03-14")
    );
    // 09:00 in Paris (CET, +1) every Monday; DST starts on 30 March 2031.
    let weekly = create(
        agent,
        "Calendar",
        "u-alice",
        work,
        timed(
            "Weekly",
            "2031-03-03T08:00:00Z",
            "2031-03-03T08:30:00Z",
            "Europe/Paris",
        ),
        "FREQ=WEEKLY;COUNT=5",
    )
    .await
    .unwrap();
    assert_eq!(weekly.time_zone, "Europe/Paris");
    add_exception_and_override(&format!("{work}{}.ics", weekly.uid.replace('@', "-"))).await;
    weekly.uid
}

/// 10:00 in Tokyo on 11 March 2031, in alice's calendar `home`.
async fn create_tokyo_call(agent: &mut BrokerClient<Channel>, home: &str) {
    let tokyo = create(
        agent,
        "Calendar",
        "u-alice",
        home,
        timed(
            "Tokyo call",
            "2031-03-11T01:00:00Z",
            "2031-03-11T01:30:00Z",
            "Asia/Tokyo",
        ),
        "",
    )
    .await
    .unwrap();
    assert_eq!(
        (tokyo.time_zone.as_str(), at(&tokyo.start).as_str()),
        ("Asia/Tokyo", "2031-03-11T01:00Z")
    );
}

/// The instances of [`create_work_events`]'s events in March 2031, in order.
fn march_at_work() -> Vec<Row> {
    vec![
        weekly("2031-03-03T08:00Z", "2031-03-03T08:30Z"),
        weekly("2031-03-10T08:00Z", "2031-03-10T08:30Z"),
        row("Single", "2031-03-10T14:00Z", "2031-03-10T15:00Z", "..", ""),
        row(
            "Offsite",
            "2031-03-12T00:00Z",
            "2031-03-14T00:00Z",
            "2031-03-12..2031-03-14",
            "",
        ),
        // 17 March is excluded; 24 March moved to 14:00 Paris.
        row(
            "Weekly (moved)",
            "2031-03-24T13:00Z",
            "2031-03-24T14:00Z",
            "..",
            "2031-03-24T08:00Z",
        ),
        // After the DST change 09:00 Paris is 07:00 UTC.
        weekly("2031-03-31T07:00Z", "2031-03-31T07:30Z"),
    ]
}

#[tokio::test]
async fn events_created_through_the_api_list_back_as_exact_utc_instances() {
    let (daemon, mut admin, mut agent) = with_calendar_connector().await;
    let work = mkcalendar(ALICE, &unique("work")).await;
    let home = mkcalendar(ALICE, &unique("home")).await;

    let connected = connect(&mut admin, "Calendar", "u-alice", ALICE, false).await;
    let test = connected.test.unwrap();
    assert!(connected.saved && test.ok, "{test:?}");
    assert_eq!(test.account_label, "alice");
    let found = test.checks.iter().find(|c| c.name == "calendars").unwrap();
    let work_name = work.trim_matches('/').rsplit('/').next().unwrap();
    assert!(found.message.contains(work_name), "{found:?}");
    assert_eq!(
        connected.connection.unwrap().status,
        proto::ConnectionStatus::Connected as i32
    );

    let weekly = create_work_events(&mut agent, &work, work_name).await;
    create_tokyo_call(&mut agent, &home).await;

    let march = ("2031-03-01T00:00:00Z", "2031-04-01T00:00:00Z");
    let listed = list(&mut agent, "Calendar", "u-alice", &work, march, 0)
        .await
        .unwrap();
    assert!(listed.warnings.is_empty(), "{:?}", listed.warnings);
    assert!(!listed.truncated);
    let expected = march_at_work();
    assert_eq!(rows(&listed.events), expected);
    assert!(listed.events.iter().all(|e| e.calendar == work));
    let offsite = &listed.events[3];
    assert!(offsite.all_day && offsite.time_zone.is_empty());
    assert_eq!(listed.events[2].location, "Room 4");
    assert_eq!(listed.events[0].uid, weekly);

    // Every calendar of the account: the same, plus Tokyo from the other calendar.
    let everything = list(&mut agent, "Calendar", "u-alice", "", march, 0)
        .await
        .unwrap();
    let mine: Vec<_> = everything
        .events
        .iter()
        .filter(|e| e.calendar == work || e.calendar == home)
        .cloned()
        .collect();
    let mut with_tokyo = expected.clone();
    with_tokyo.insert(
        3,
        row(
            "Tokyo call",
            "2031-03-11T01:00Z",
            "2031-03-11T01:30Z",
            "..",
            "",
        ),
    );
    assert_eq!(rows(&mine), with_tokyo);

    // A narrow window holding only the excluded instance; a limit.
    let excluded = ("2031-03-17T00:00:00Z", "2031-03-18T00:00:00Z");
    assert_no_events(&mut agent, &work, excluded).await;
    let limited = list(&mut agent, "Calendar", "u-alice", &work, march, 2)
        .await
        .unwrap();
    assert_eq!(rows(&limited.events), expected[..2].to_vec());
    assert!(limited.truncated);

    assert!(
        !daemon.logs().contains(ALICE.1),
        "the password reached the daemon log"
    );
}

#[tokio::test]
async fn another_users_calendar_is_refused() {
    let (_daemon, mut admin, mut agent) = with_calendar_connector().await;
    let bobs = mkcalendar(BOB, &unique("bob-private")).await;
    assert!(
        connect(&mut admin, "Calendar", "u-alice", ALICE, false)
            .await
            .saved
    );
    let window = JANUARY;

    let err = list(&mut agent, "Calendar", "u-alice", &bobs, window, 0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(reason(&err).0, "UPSTREAM_FORBIDDEN");
    let err = create(
        &mut agent,
        "Calendar",
        "u-alice",
        &bobs,
        on_jan_5("Intrusion"),
        "",
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // Bob's calendar is intact: nothing was written to it.
    let bob_listing = radicale("PROPFIND", &bobs, BOB)
        .header("Depth", "1")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!bob_listing.contains(".ics"), "{bob_listing}");
    // A calendar name the account does not have.
    let err = list(
        &mut agent,
        "Calendar",
        "u-alice",
        "no-such-calendar",
        window,
        0,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
}

#[tokio::test]
async fn wrong_password_fails_the_test_with_an_auth_reason_and_saves_nothing() {
    let (daemon, mut admin, mut agent) = with_calendar_connector().await;
    let canary = unique("canary-password");
    let window = JANUARY;

    let refused = connect(&mut admin, "Calendar", "u-alice", (ALICE.0, &canary), false).await;
    let test = refused.test.unwrap();
    assert!(!refused.saved && !test.ok, "{test:?}");
    let auth = test.checks.iter().find(|c| !c.ok).unwrap();
    assert_eq!(auth.stage, "auth", "{auth:?}");
    assert!(auth.message.contains("username or password"), "{auth:?}");
    let connection = get_connection(&mut admin, conn("Calendar", "u-alice")).await;
    assert_eq!(
        connection.status,
        proto::ConnectionStatus::NotConnected as i32
    );
    let err = list(&mut agent, "Calendar", "u-alice", "", window, 0)
        .await
        .unwrap_err();
    assert_refused(&err, Code::FailedPrecondition, "NOT_CONNECTED");

    // Saved anyway, the refused password marks the connection EXPIRED at first use.
    let saved = connect(&mut admin, "Calendar", "u-alice", (ALICE.0, &canary), true).await;
    assert!(saved.saved);
    assert_eq!(
        saved.connection.unwrap().status,
        proto::ConnectionStatus::Error as i32
    );
    let err = list(&mut agent, "Calendar", "u-alice", "", window, 0)
        .await
        .unwrap_err();
    assert_refused(&err, Code::FailedPrecondition, "EXPIRED");
    let connection = get_connection(&mut admin, conn("Calendar", "u-alice")).await;
    assert_eq!(connection.status, proto::ConnectionStatus::Expired as i32);
    assert!(connection.last_error.contains("refused"), "{connection:?}");
    let err = create(&mut agent, "Calendar", "u-alice", "", on_jan_5("x"), "")
        .await
        .unwrap_err();
    assert_eq!(reason(&err).0, "EXPIRED");

    let logs = daemon.logs();
    assert!(
        logs.contains("ListCalendar"),
        "the daemon log is not the one expected"
    );
    assert!(
        !logs.contains(&canary),
        "the password reached the daemon log"
    );
}

#[tokio::test]
async fn unreachable_server_is_unavailable_within_the_deadline() {
    let daemon = Daemon::start_with_config("[limits]\nupstream_timeout_secs = 2\n");
    let (_daemon, mut admin, mut agent) = daemon.with_clients().await;
    // A closed port, and a port that accepts connections but never answers.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    caldav_connector(
        &mut admin,
        "Closed",
        &format!("https://127.0.0.1:{closed}/"),
    )
    .await;
    caldav_connector(
        &mut admin,
        "Silent",
        &format!("https://127.0.0.1:{silent_port}/"),
    )
    .await;
    let window = JANUARY;
    for (connector, stage) in [("Closed", "tcp"), ("Silent", "timeout")] {
        let tested =
            tokio::time::timeout(HANG_GUARD, connect(&mut admin, connector, "u", ALICE, true))
                .await
                .expect("the connection test hung");
        let check = tested
            .test
            .unwrap()
            .checks
            .into_iter()
            .find(|c| !c.ok)
            .unwrap();
        assert_eq!(check.stage, stage, "{connector}: {check:?}");
        let err = list(&mut agent, connector, "u", "", window, 0)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{connector}: {err:?}");
        assert_eq!(reason(&err).0, "UPSTREAM_UNAVAILABLE");
        let err = create(&mut agent, connector, "u", "", on_jan_5("x"), "")
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{connector}: {err:?}");
    }
    drop(silent);
}

/// (window, limit, the field named) of ListCalendar requests that are refused.
const BAD_WINDOWS: [((&str, &str), u32, &str); 4] = [
    (
        ("2031-02-01T00:00:00Z", "2031-01-01T00:00:00Z"),
        0,
        "time_max",
    ),
    (
        ("2031-01-01T00:00:00Z", "2031-01-01T00:00:00Z"),
        0,
        "time_max",
    ),
    (
        ("2031-01-01T00:00:00Z", "2032-02-01T00:00:00Z"),
        0,
        "time_max",
    ),
    (
        ("2031-01-01T00:00:00Z", "2031-02-01T00:00:00Z"),
        100_000,
        "limit",
    ),
];

/// (event, rrule, the field named) of CreateEvent requests that are refused.
fn bad_events() -> Vec<(proto::CalendarEvent, &'static str, &'static str)> {
    let ok = || on_jan_5("Fine");
    vec![
        (
            proto::CalendarEvent {
                summary: "x\r\nATTENDEE:mailto:evil@example.org".into(),
                ..ok()
            },
            "",
            "event.summary",
        ),
        (
            proto::CalendarEvent {
                summary: String::new(),
                ..ok()
            },
            "",
            "event.summary",
        ),
        (
            proto::CalendarEvent {
                location: "a\nb".into(),
                ..ok()
            },
            "",
            "event.location",
        ),
        (
            proto::CalendarEvent {
                end: ts("2031-01-05T09:00:00Z"),
                ..ok()
            },
            "",
            "event.end",
        ),
        (
            proto::CalendarEvent {
                time_zone: "Mars/Olympus".into(),
                ..ok()
            },
            "",
            "event.time_zone",
        ),
        (
            proto::CalendarEvent {
                start: Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: -1,
                }),
                ..ok()
            },
            "",
            "event.start",
        ),
        (
            proto::CalendarEvent {
                attendees: vec![proto::Attendee {
                    email: "x@y.z>\r\nBCC".into(),
                    ..Default::default()
                }],
                ..ok()
            },
            "",
            "event.attendees[0].email",
        ),
        (ok(), "FREQ=WEEKLY\r\nEXDATE:x", "rrule"),
        (ok(), "FREQ=FORTNIGHTLY", "rrule"),
    ]
}

#[tokio::test]
async fn bad_input_is_invalid_argument_naming_the_field() {
    let (_daemon, mut admin, mut agent) = with_calendar_connector().await;
    let cal = connected_with_calendar(&mut admin, "inputs").await;

    let field = |err: &tonic::Status| {
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        reason(err).1.get("field").cloned().unwrap_or_default()
    };
    for (window, limit, name) in BAD_WINDOWS {
        let err = list(&mut agent, "Calendar", "u-alice", &cal, window, limit)
            .await
            .unwrap_err();
        assert_eq!(field(&err), name, "{window:?}");
    }
    let err = agent
        .list_calendar(proto::ListCalendarRequest {
            connection: conn("Calendar", "u-alice"),
            time_max: ts("2031-02-01T00:00:00Z"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(field(&err), "time_min");

    for (event, rrule, name) in bad_events() {
        let err = create(&mut agent, "Calendar", "u-alice", &cal, event, rrule)
            .await
            .unwrap_err();
        assert_eq!(field(&err), name);
    }
    // Nothing reached the calendar.
    assert_no_events(&mut agent, &cal, JANUARY).await;
}

#[tokio::test]
async fn unreadable_calendar_data_from_the_server_is_reported_not_fatal() {
    let (_daemon, mut admin, mut agent) = with_calendar_connector().await;
    let cal = connected_with_calendar(&mut admin, "odd").await;
    create(
        &mut agent,
        "Calendar",
        "u-alice",
        &cal,
        timed(
            "Readable",
            "2031-05-05T10:00:00Z",
            "2031-05-05T11:00:00Z",
            "",
        ),
        "",
    )
    .await
    .unwrap();
    // Radicale accepts a TZID it has no definition for; we cannot place it in time.
    let bad = "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//other client//EN\r\nBEGIN:VEVENT\r\n\
UID:mars-1\r\nDTSTAMP:20310101T000000Z\r\nDTSTART;TZID=Mars/Olympus:20310506T100000\r\n\
SUMMARY:On Mars\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n";
    let resp = radicale("PUT", &format!("{cal}mars-1.ics"), ALICE)
        .header("Content-Type", "text/calendar")
        .body(bad)
        .send()
        .await
        .unwrap();
    assert!(
        resp.status().is_success(),
        "Radicale refused the object: {}",
        resp.status()
    );
    let listed = list(
        &mut agent,
        "Calendar",
        "u-alice",
        &cal,
        ("2031-05-01T00:00:00Z", "2031-06-01T00:00:00Z"),
        0,
    )
    .await
    .unwrap();
    assert_eq!(
        rows(&listed.events)
            .into_iter()
            .map(|r| r.0)
            .collect::<Vec<_>>(),
        vec!["Readable"]
    );
    assert_eq!(listed.warnings.len(), 1, "{:?}", listed.warnings);
    assert!(
        listed.warnings[0].contains("mars-1.ics") && listed.warnings[0].contains("Mars/Olympus"),
        "{:?}",
        listed.warnings
    );
}

// ---- Google Calendar -----------------------------------------------------------------------

mod google_fake {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use axum::Json;
    use axum::extract::{Path, Query, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::get;
    use serde_json::{Value, json};

    #[derive(Default)]
    pub struct Seen {
        pub queries: Vec<HashMap<String, String>>,
        pub inserted: Vec<Value>,
    }

    type Shared = Arc<Mutex<Seen>>;

    /// "tok-123" for the direct tests; through the daemon, any token the OAuth server issued
    /// (recorded, so the test can check it came from there).
    fn authorized(headers: &HeaderMap) -> bool {
        let value = headers.get("authorization").and_then(|v| v.to_str().ok());
        match value.and_then(|v| v.strip_prefix("Bearer ")) {
            Some("tok-123") => true,
            Some(token) => token.len() >= 20,
            None => false,
        }
    }

    async fn list(
        State(seen): State<Shared>,
        Path(calendar): Path<String>,
        headers: HeaderMap,
        Query(q): Query<HashMap<String, String>>,
    ) -> (StatusCode, String) {
        if !authorized(&headers) {
            return (
                StatusCode::UNAUTHORIZED,
                json!({"error": {"code": 401}}).to_string(),
            );
        }
        let mut q = q;
        if let Some(v) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
            q.insert("authorization".into(), v.to_string());
        }
        seen.lock().unwrap().queries.push(q.clone());
        if calendar == "broken" {
            return (StatusCode::OK, "{\"items\": [".to_string());
        }
        let page = if q.get("pageToken").map(String::as_str) == Some("p2") {
            json!({"items": [{
                "id": "rec_20310310", "iCalUID": "rec@google.com", "status": "confirmed",
                "summary": "Weekly", "recurringEventId": "rec",
                "start": {"dateTime": "2031-03-10T09:00:00+01:00", "timeZone": "Europe/Paris"},
                "end": {"dateTime": "2031-03-10T09:30:00+01:00", "timeZone": "Europe/Paris"},
                "originalStartTime": {"dateTime": "2031-03-10T09:00:00+01:00"}
            }, {
                "id": "gone", "status": "cancelled"
            }]})
        } else {
            json!({"items": [{
                "id": "ev1", "iCalUID": "ev1@google.com", "status": "tentative",
                "summary": "Offsite", "description": "d", "location": "Lyon",
                "start": {"date": "2031-03-03"}, "end": {"date": "2031-03-05"},
                "organizer": {"email": "alice@example.org"},
                "attendees": [{"email": "bob@example.org", "displayName": "Bob", "responseStatus": "accepted"}]
            }], "nextPageToken": "p2"})
        };
        (StatusCode::OK, page.to_string())
    }

    async fn insert(
        State(seen): State<Shared>,
        headers: HeaderMap,
        Json(body): Json<Value>,
    ) -> (StatusCode, Json<Value>) {
        if !authorized(&headers) {
            return (StatusCode::UNAUTHORIZED, Json(json!({})));
        }
        seen.lock().unwrap().inserted.push(body.clone());
        let mut stored = body;
        stored["id"] = json!("new1");
        stored["organizer"] = json!({"email": "alice@example.org", "self": true});
        (StatusCode::OK, Json(stored))
    }

    fn app(seen: &Shared) -> axum::Router {
        axum::Router::new()
            .route("/calendar/v3/calendars/{id}/events", get(list).post(insert))
            .with_state(seen.clone())
    }

    /// Serves `/calendar/v3/calendars/{id}/events` over plain HTTP on a free loopback port.
    pub async fn start() -> (String, Shared) {
        let seen = Shared::default();
        let app = app(&seen);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://{addr}/calendar/v3"), seen)
    }

    /// The same over HTTPS with a certificate from its own CA; returns (base URL, CA PEM, log).
    pub async fn start_tls() -> (String, String, Shared) {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        use hyper_util::server::conn::auto;
        use hyper_util::service::TowerToHyperService;

        let ca = credbroker_devpki::CertAuthority::generate("fake Google CA").unwrap();
        let acceptor = crate::support::daemon::tls_acceptor(&ca);
        let seen = Shared::default();
        let app = app(&seen);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let service = TowerToHyperService::new(app.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        let _ = auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(tls), service)
                            .await;
                    }
                });
            }
        });
        (format!("https://{addr}/calendar/v3"), ca.cert_pem, seen)
    }
}

/// The two events [`google_fake`] lists (over two pages) as the daemon reads them.
fn assert_the_documented_listing(listing: &credbroker::calendar::Listing) {
    let got: Vec<_> = listing
        .events
        .iter()
        .map(|e| {
            (
                e.uid.as_str(),
                e.summary.as_str(),
                e.start.to_rfc3339(),
                e.end.to_rfc3339(),
                e.all_day,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "ev1@google.com",
                "Offsite",
                "2031-03-03T00:00:00+00:00".to_string(),
                "2031-03-05T00:00:00+00:00".to_string(),
                true
            ),
            (
                "rec@google.com",
                "Weekly",
                "2031-03-10T08:00:00+00:00".to_string(),
                "2031-03-10T08:30:00+00:00".to_string(),
                false
            ),
        ]
    );
    let offsite = &listing.events[0];
    assert_eq!(offsite.start_date.unwrap().to_string(), "2031-03-03");
    assert_eq!(
        (offsite.status.as_str(), offsite.organizer.as_str()),
        ("TENTATIVE", "alice@example.org")
    );
    assert_eq!(offsite.attendees[0].status, "ACCEPTED");
    assert_eq!(offsite.calendar, "primary");
    assert_eq!(listing.events[1].time_zone, "Europe/Paris");
    assert_eq!(
        listing.events[1].recurrence_id,
        Some(utc("2031-03-10T08:00:00Z"))
    );
}

/// Inserts a weekly event in Paris into a named calendar: the stored event comes back in UTC,
/// and the body sent carries the local time, its zone and the rule.
async fn insert_planning(
    client: &reqwest::Client,
    base: &str,
    token: &credbroker::model::Secret,
    seen: &std::sync::Mutex<google_fake::Seen>,
) {
    use credbroker::calendar::{NewEvent, google};
    let event = NewEvent {
        summary: "Planning".into(),
        start: Some(utc("2031-03-12T08:00:00Z")),
        end: Some(utc("2031-03-12T09:00:00Z")),
        time_zone: "Europe/Paris".into(),
        rrule: "FREQ=WEEKLY;COUNT=2".into(),
        ..Default::default()
    }
    .validate()
    .unwrap();
    let stored = google::insert(
        client,
        base,
        token,
        "team@group.calendar.google.com",
        &event,
    )
    .await
    .unwrap();
    assert_eq!(
        (
            stored.summary.as_str(),
            stored.start,
            stored.time_zone.as_str()
        ),
        ("Planning", utc("2031-03-12T08:00:00Z"), "Europe/Paris")
    );
    assert_eq!(stored.calendar, "team@group.calendar.google.com");
    {
        let seen = seen.lock().unwrap();
        let body = &seen.inserted[0];
        assert_eq!(body["start"]["dateTime"], "2031-03-12T09:00:00+01:00");
        assert_eq!(body["start"]["timeZone"], "Europe/Paris");
        assert_eq!(body["recurrence"][0], "RRULE:FREQ=WEEKLY;COUNT=2");
    }
}

#[tokio::test]
async fn google_calendar_rest_against_its_documented_json() {
    use credbroker::calendar::{CalendarError, Window, google};
    use credbroker::model::Secret;

    credbroker::tls::install_crypto_provider();
    let (base, seen) = google_fake::start().await;
    // The fake speaks plain HTTP on loopback; the daemon's own client is HTTPS-only.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let token = Secret::new("tok-123");
    let window = Window::new(
        Some(utc("2031-03-01T00:00:00Z")),
        Some(utc("2031-04-01T00:00:00Z")),
    )
    .unwrap();

    let listing = google::list(&client, &base, &token, "", &window, 250)
        .await
        .unwrap();
    assert_the_documented_listing(&listing);
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.queries.len(), 2, "two pages");
        let q = &seen.queries[0];
        assert_eq!(q["singleEvents"], "true");
        assert_eq!(q["orderBy"], "startTime");
        assert_eq!(utc(&q["timeMin"]), window.min);
        assert_eq!(utc(&q["timeMax"]), window.max);
    }
    // The limit cuts and says so.
    let one = google::list(&client, &base, &token, "primary", &window, 1)
        .await
        .unwrap();
    assert_eq!((one.events.len(), one.truncated), (1, true));

    insert_planning(&client, &base, &token, &seen).await;

    // A refused token, and a body that is not the documented JSON.
    let err = google::list(&client, &base, &Secret::new("stale"), "", &window, 10)
        .await
        .unwrap_err();
    assert!(
        matches!(err, CalendarError::AuthRefused { status: 401, .. }),
        "{err:?}"
    );
    assert!(!err.to_string().contains("stale"));
    let err = google::list(&client, &base, &token, "broken", &window, 10)
        .await
        .unwrap_err();
    assert!(matches!(err, CalendarError::Malformed { .. }), "{err:?}");
}

/// A google-calendar connector "Google" whose token comes from the test OAuth server (client
/// credentials keep a browser out of the test) and whose API base is the local fake at `base`,
/// trusted with `fake_ca`.
async fn google_connector(admin: &mut AdminClient<Channel>, base: &str, fake_ca: &str) {
    use support::peers::{OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET};
    let issuer = peers().oauth_issuer();
    admin
        .create_connector(proto::CreateConnectorRequest {
            provider: "google-calendar".into(),
            config: HashMap::from([
                ("client_id".to_string(), OAUTH_CLIENT_ID.to_string()),
                ("token_url".to_string(), format!("{issuer}/token")),
                ("token_auth".to_string(), "basic".to_string()),
                ("grant_type".to_string(), "client_credentials".to_string()),
                ("scopes".to_string(), "mail.read".to_string()),
                ("base_url".to_string(), base.to_string()),
                (
                    "ca_pem".to_string(),
                    format!("{}\n{fake_ca}", peers().ca_pem),
                ),
            ]),
            secrets: secrets(&[("client_secret", OAUTH_CLIENT_SECRET)]),
            ..new_connector(
                "Google",
                proto::ConnectorKind::Oauth2,
                proto::ConnectorMode::Shared,
            )
        })
        .await
        .unwrap();
}

/// [`google_fake`]'s two events in March 2031 as the daemon lists them.
fn google_fake_rows() -> Vec<Row> {
    vec![
        row(
            "Offsite",
            "2031-03-03T00:00Z",
            "2031-03-05T00:00Z",
            "2031-03-03..2031-03-05",
            "",
        ),
        weekly("2031-03-10T08:00Z", "2031-03-10T08:30Z"),
    ]
}

#[tokio::test]
async fn google_calendar_through_the_daemon_with_an_oauth_token() {
    use support::peers::OAUTH_CLIENT_SECRET;

    let (base, fake_ca, seen) = google_fake::start_tls().await;
    let (daemon, mut admin, mut agent) = Daemon::start().with_clients().await;
    google_connector(&mut admin, &base, &fake_ca).await;

    let listed = list(
        &mut agent,
        "Google",
        "",
        "",
        ("2031-03-01T00:00:00Z", "2031-04-01T00:00:00Z"),
        0,
    )
    .await
    .unwrap();
    assert_eq!(rows(&listed.events), google_fake_rows());
    let token = seen.lock().unwrap().queries[0]["authorization"].clone();
    assert!(
        token.starts_with("Bearer ") && !token.contains(OAUTH_CLIENT_SECRET),
        "{token}"
    );

    let stored = create(
        &mut agent,
        "Google",
        "",
        "",
        timed(
            "Planning",
            "2031-03-12T08:00:00Z",
            "2031-03-12T09:00:00Z",
            "Europe/Paris",
        ),
        "FREQ=WEEKLY;COUNT=2",
    )
    .await
    .unwrap();
    assert_eq!(
        (
            stored.summary.as_str(),
            at(&stored.start).as_str(),
            stored.calendar.as_str()
        ),
        ("Planning", "2031-03-12T08:00Z", "primary")
    );
    assert_eq!(seen.lock().unwrap().inserted.len(), 1);
    // Bad input never reaches Google.
    let err = create(
        &mut agent,
        "Google",
        "",
        "",
        timed("x\ny", "2031-03-12T08:00:00Z", "2031-03-12T09:00:00Z", ""),
        "",
    )
    .await
    .unwrap_err();
    assert_eq!(
        reason(&err).1.get("field").map(String::as_str),
        Some("event.summary")
    );
    assert_eq!(seen.lock().unwrap().inserted.len(), 1);
    assert!(!daemon.logs().contains(OAUTH_CLIENT_SECRET));
}
