//! Domain tests: parsing, expansion (RRULE, EXDATE, overrides, TZID, all-day), writing,
//! validation, and the multistatus reader, including malformed input from a server.

use chrono::{DateTime, NaiveDate, TimeZone, Utc};

use super::caldav::parse_multistatus;
use super::ical::{self, Moment, Zone};
use super::{Attendee, CalendarError, Event, NewEvent, Window, expand};

fn utc(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn window(a: &str, b: &str) -> Window {
    Window::new(Some(utc(a)), Some(utc(b))).unwrap()
}

fn list(ics: &str, w: &Window) -> Vec<Event> {
    let components = ical::parse(ics).unwrap();
    let mut events = expand::expand(&components, "/cal/", w).unwrap().events;
    events.sort_by_key(|e| e.start);
    events
}

const PARIS_WEEKLY: &str = "BEGIN:VCALENDAR\nVERSION:2.0\nPRODID:-//test//EN\n\
BEGIN:VTIMEZONE\nTZID:Europe/Paris\nBEGIN:STANDARD\nDTSTART:19701025T030000\n\
RRULE:FREQ=YEARLY;BYMONTH=10;BYDAY=-1SU\nTZOFFSETFROM:+0200\nTZOFFSETTO:+0100\nEND:STANDARD\n\
BEGIN:DAYLIGHT\nDTSTART:19700329T020000\nRRULE:FREQ=YEARLY;BYMONTH=3;BYDAY=-1SU\n\
TZOFFSETFROM:+0100\nTZOFFSETTO:+0200\nEND:DAYLIGHT\nEND:VTIMEZONE\n\
BEGIN:VEVENT\nUID:weekly-1\nDTSTAMP:20250101T000000Z\nSUMMARY:Standup\n\
DTSTART;TZID=Europe/Paris:20250317T090000\nDTEND;TZID=Europe/Paris:20250317T093000\n\
RRULE:FREQ=WEEKLY;COUNT=4\nEXDATE;TZID=Europe/Paris:20250324T090000\nEND:VEVENT\n\
BEGIN:VEVENT\nUID:weekly-1\nDTSTAMP:20250101T000000Z\nSUMMARY:Standup (moved)\n\
RECURRENCE-ID;TZID=Europe/Paris:20250331T090000\n\
DTSTART;TZID=Europe/Paris:20250331T110000\nDTEND;TZID=Europe/Paris:20250331T113000\n\
END:VEVENT\nEND:VCALENDAR\n";

#[test]
fn weekly_rule_with_exdate_and_override_across_dst() {
    let events = list(
        PARIS_WEEKLY,
        &window("2025-03-01T00:00:00Z", "2025-05-01T00:00:00Z"),
    );
    let got: Vec<_> = events
        .iter()
        .map(|e| (e.start, e.end, e.summary.as_str(), e.recurrence_id))
        .collect();
    assert_eq!(
        got,
        vec![
            // CET (+1): 09:00 local is 08:00 UTC.
            (
                utc("2025-03-17T08:00:00Z"),
                utc("2025-03-17T08:30:00Z"),
                "Standup",
                Some(utc("2025-03-17T08:00:00Z"))
            ),
            // 24 March is excluded; 31 March (CEST, +2) is moved to 11:00 local.
            (
                utc("2025-03-31T09:00:00Z"),
                utc("2025-03-31T09:30:00Z"),
                "Standup (moved)",
                Some(utc("2025-03-31T07:00:00Z"))
            ),
            (
                utc("2025-04-07T07:00:00Z"),
                utc("2025-04-07T07:30:00Z"),
                "Standup",
                Some(utc("2025-04-07T07:00:00Z"))
            ),
        ]
    );
    assert!(
        events
            .iter()
            .all(|e| e.time_zone == "Europe/Paris" && !e.all_day)
    );
    // A window holding only the excluded instance holds nothing.
    assert!(
        list(
            PARIS_WEEKLY,
            &window("2025-03-24T00:00:00Z", "2025-03-25T00:00:00Z")
        )
        .is_empty()
    );
}

#[test]
fn all_day_events_stay_dates() {
    let ics = "BEGIN:VCALENDAR\nVERSION:2.0\nBEGIN:VEVENT\nUID:day\nSUMMARY:Holiday\n\
DTSTART;VALUE=DATE:20250704\nDTEND;VALUE=DATE:20250706\nEND:VEVENT\nEND:VCALENDAR\n";
    let events = list(ics, &window("2025-07-05T12:00:00Z", "2025-07-05T13:00:00Z"));
    assert_eq!(events.len(), 1);
    let e = &events[0];
    assert!(e.all_day);
    assert_eq!(e.start_date, NaiveDate::from_ymd_opt(2025, 7, 4));
    assert_eq!(e.end_date, NaiveDate::from_ymd_opt(2025, 7, 6));
    assert_eq!(e.start, utc("2025-07-04T00:00:00Z"));
    assert_eq!(e.end, utc("2025-07-06T00:00:00Z"));
    assert_eq!(e.recurrence_id, None);
    assert!(list(ics, &window("2025-07-06T00:00:00Z", "2025-07-07T00:00:00Z")).is_empty());
}

#[test]
fn endless_daily_rule_from_long_ago_yields_only_the_window() {
    let ics = "BEGIN:VCALENDAR\nVERSION:2.0\nBEGIN:VEVENT\nUID:daily\nSUMMARY:Pills\n\
DTSTART:20000101T070000Z\nDURATION:PT5M\nRRULE:FREQ=DAILY\nEXDATE;VALUE=DATE:20250102\n\
END:VEVENT\nEND:VCALENDAR\n";
    let events = list(ics, &window("2025-01-01T00:00:00Z", "2025-01-08T00:00:00Z"));
    let starts: Vec<_> = events.iter().map(|e| e.start.to_rfc3339()).collect();
    assert_eq!(
        starts,
        [1, 3, 4, 5, 6, 7]
            .iter()
            .map(|d| Utc
                .with_ymd_and_hms(2025, 1, *d, 7, 0, 0)
                .unwrap()
                .to_rfc3339())
            .collect::<Vec<_>>()
    );
    assert!(
        events
            .iter()
            .all(|e| e.end - e.start == chrono::TimeDelta::minutes(5))
    );
}

#[test]
fn until_in_utc_is_honoured_in_the_events_zone() {
    // 18:00 in New York (EST, -5) is 23:00 UTC; UNTIL at 23:00Z on the 3rd keeps 3 instances.
    let ics = "BEGIN:VCALENDAR\nVERSION:2.0\nBEGIN:VEVENT\nUID:ny\nSUMMARY:Call\n\
DTSTART;TZID=America/New_York:20250101T180000\nDTEND;TZID=America/New_York:20250101T190000\n\
RRULE:FREQ=DAILY;UNTIL=20250103T230000Z\nEND:VEVENT\nEND:VCALENDAR\n";
    let events = list(ics, &window("2024-12-01T00:00:00Z", "2025-02-01T00:00:00Z"));
    assert_eq!(
        events.iter().map(|e| e.start).collect::<Vec<_>>(),
        vec![
            utc("2025-01-01T23:00:00Z"),
            utc("2025-01-02T23:00:00Z"),
            utc("2025-01-03T23:00:00Z")
        ]
    );
}

#[test]
fn floating_and_fixed_offset_times() {
    let ics = "BEGIN:VCALENDAR\nVERSION:2.0\nBEGIN:VEVENT\nUID:f\nSUMMARY:Floating\n\
DTSTART:20250301T100000\nDTEND:20250301T110000\nEND:VEVENT\nEND:VCALENDAR\n";
    let events = list(ics, &window("2025-03-01T00:00:00Z", "2025-03-02T00:00:00Z"));
    assert_eq!(events[0].start, utc("2025-03-01T10:00:00Z"));
    assert_eq!(events[0].time_zone, "");
}

#[test]
fn malformed_icalendar_is_an_error_not_a_panic() {
    for (bad, why) in [
        ("", "empty"),
        ("hello world", "VCALENDAR"),
        (
            "BEGIN:VCALENDAR\nBEGIN:VEVENT\nUID:x\nSUMMARY:no start\nEND:VEVENT\nEND:VCALENDAR\n",
            "DTSTART",
        ),
        (
            "BEGIN:VCALENDAR\nBEGIN:VEVENT\nUID:x\nDTSTART;TZID=Mars/Olympus:20250101T100000\nEND:VEVENT\nEND:VCALENDAR\n",
            "time zone",
        ),
        (
            "BEGIN:VCALENDAR\nBEGIN:VEVENT\nDTSTART:20250101T100000Z\nEND:VEVENT\nEND:VCALENDAR\n",
            "UID",
        ),
        (
            "BEGIN:VCALENDAR\nBEGIN:VTODO\nUID:t\nEND:VTODO\nEND:VCALENDAR\n",
            "no VEVENT",
        ),
        (
            "BEGIN:VCALENDAR\nBEGIN:VEVENT\nUID:x\nDTSTART:2025",
            "DTSTART",
        ),
    ] {
        let err = ical::parse(bad).unwrap_err();
        assert!(
            matches!(err, CalendarError::Malformed { .. }) && err.to_string().contains(why),
            "{bad:?}: {err}"
        );
    }
    // A rule the expander cannot use is reported, not a panic.
    let ics = "BEGIN:VCALENDAR\nBEGIN:VEVENT\nUID:r\nDTSTART:20250101T100000Z\n\
RRULE:FREQ=WEEKLY;INTERVAL=0\nEND:VEVENT\nEND:VCALENDAR\n";
    let components = ical::parse(ics).unwrap();
    let w = window("2025-01-01T00:00:00Z", "2025-02-01T00:00:00Z");
    match expand::expand(&components, "/c/", &w) {
        Err(e) => assert!(e.to_string().contains("RRULE"), "{e}"),
        Ok(x) => assert!(x.events.len() <= 5, "{x:?}"),
    }
}

#[test]
fn written_events_read_back_the_same() {
    let event = NewEvent {
        summary: "Review; budget, Q3".into(),
        description: "Line one\nLine two with a long tail that needs folding because it is much longer than seventy-five octets — ünïcödé".into(),
        location: "Room 4".into(),
        start: Some(utc("2025-06-02T07:00:00Z")),
        end: Some(utc("2025-06-02T08:00:00Z")),
        time_zone: "Europe/Paris".into(),
        attendees: vec![Attendee {
            email: "bob@example.org".into(),
            name: "Bob B".into(),
            status: String::new(),
        }],
        rrule: "FREQ=WEEKLY;COUNT=3".into(),
        ..Default::default()
    }
    .validate()
    .unwrap();
    let text = ical::write("uid-1@credbroker", &event, Utc::now()).unwrap();
    assert!(text.contains("BEGIN:VTIMEZONE"), "{text}");
    assert!(
        text.contains("DTSTART;TZID=Europe/Paris:20250602T090000"),
        "{text}"
    );
    assert!(text.split("\r\n").all(|l| l.len() <= 75), "{text}");
    let parsed = ical::parse(&text).unwrap();
    assert_eq!(parsed.len(), 1);
    let c = &parsed[0];
    assert_eq!(c.summary, "Review; budget, Q3");
    assert_eq!(c.description, event.description);
    assert_eq!(c.attendees[0].email, "bob@example.org");
    assert_eq!(c.attendees[0].name, "Bob B");
    assert_eq!(c.attendees[0].status, "NEEDS-ACTION");
    let w = window("2025-06-01T00:00:00Z", "2025-07-01T00:00:00Z");
    let events = expand::expand(&parsed, "/c/", &w).unwrap().events;
    assert_eq!(events.len(), 3);
    assert_eq!(events[1].start, utc("2025-06-09T07:00:00Z"));
}

/// A one-hour UTC event that passes validation.
fn base() -> NewEvent {
    NewEvent {
        summary: "ok".into(),
        start: Some(utc("2025-01-01T10:00:00Z")),
        end: Some(utc("2025-01-01T11:00:00Z")),
        ..Default::default()
    }
}

#[test]
fn validation_names_the_field() {
    let with = |change: fn(&mut NewEvent)| {
        let mut event = base();
        change(&mut event);
        event
    };
    let cases: Vec<(NewEvent, &str)> = vec![
        (with(|e| e.summary = "".into()), "event.summary"),
        (
            with(|e| e.summary = "x\r\nATTENDEE:mailto:evil@example.org".into()),
            "event.summary",
        ),
        (with(|e| e.summary = "x".repeat(256)), "event.summary"),
        (with(|e| e.location = "a\nb".into()), "event.location"),
        (with(|e| e.description = "a\rb".into()), "event.description"),
        (
            with(|e| e.end = Some(utc("2025-01-01T09:00:00Z"))),
            "event.end",
        ),
        (with(|e| e.start = None), "event.start"),
        (
            with(|e| e.time_zone = "Mars/Olympus".into()),
            "event.time_zone",
        ),
        (with(|e| e.rrule = "FREQ=SOMETIMES".into()), "rrule"),
        (with(|e| e.rrule = "FREQ=DAILY\r\nX:y".into()), "rrule"),
        (with(|e| e.status = "MAYBE".into()), "event.status"),
        (
            with(|e| e.organizer = "not-an-email".into()),
            "event.organizer",
        ),
        (
            with(|e| {
                e.attendees = vec![Attendee {
                    email: "a@b.c\r\nX".into(),
                    name: String::new(),
                    status: String::new(),
                }]
            }),
            "event.attendees[0].email",
        ),
        (
            with(|e| {
                e.all_day = true;
                e.start = None;
                e.end = None;
                e.start_date = "2025-01-02".into();
                e.end_date = "2025-01-01".into();
            }),
            "event.end_date",
        ),
        (
            with(|e| {
                e.all_day = true;
                e.start_date = "2 Jan".into();
            }),
            "event.start_date",
        ),
    ];
    for (event, field) in cases {
        let err = event.clone().validate().unwrap_err();
        assert_eq!(err.field, field, "{event:?}: {err}");
    }
}

#[test]
fn valid_events_keep_their_zone_and_an_all_day_one_lasts_a_day() {
    let all_day = NewEvent {
        all_day: true,
        start: None,
        end: None,
        start_date: "2025-01-02".into(),
        ..base()
    }
    .validate()
    .unwrap();
    assert_eq!(
        (all_day.start, all_day.end),
        (
            Moment::Date(NaiveDate::from_ymd_opt(2025, 1, 2).unwrap()),
            Moment::Date(NaiveDate::from_ymd_opt(2025, 1, 3).unwrap())
        )
    );
    assert_eq!(base().validate().unwrap().start_zone(), Zone::Utc);
}

#[test]
fn window_bounds() {
    let t = utc("2025-01-01T00:00:00Z");
    assert_eq!(Window::new(None, Some(t)).unwrap_err().field, "time_min");
    assert_eq!(Window::new(Some(t), None).unwrap_err().field, "time_max");
    assert_eq!(Window::new(Some(t), Some(t)).unwrap_err().field, "time_max");
    let far = t + chrono::TimeDelta::days(367);
    assert!(
        Window::new(Some(t), Some(far))
            .unwrap_err()
            .problem
            .contains("366")
    );
    assert!(Window::new(Some(t), Some(t + chrono::TimeDelta::days(366))).is_ok());
    assert_eq!(super::limit(0).unwrap(), super::DEFAULT_LIMIT);
    assert_eq!(super::limit(2501).unwrap_err().field, "limit");
}

const MULTISTATUS: &str = r#"<?xml version='1.0' encoding='utf-8'?>
<multistatus xmlns="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav"><response><href>/alice/work/a.ics</href><propstat><prop><getetag>"1"</getetag><C:calendar-data>BEGIN:VCALENDAR&#13;
VERSION:2.0
BEGIN:VEVENT
UID:a
SUMMARY:Tom &amp; Jerry &lt;3
DTSTART:20250101T100000Z
END:VEVENT
END:VCALENDAR
</C:calendar-data></prop><status>HTTP/1.1 200 OK</status></propstat></response><response><href>/alice/work/</href><propstat><prop><resourcetype><collection /><C:calendar /></resourcetype><displayname>Work</displayname></prop><status>HTTP/1.1 200 OK</status></propstat><propstat><prop><C:calendar-home-set /></prop><status>HTTP/1.1 404 Not Found</status></propstat></response></multistatus>"#;

#[test]
fn multistatus_is_read_with_entities_and_statuses() {
    let responses = parse_multistatus(MULTISTATUS).unwrap();
    assert_eq!(responses.len(), 2);
    let data = responses[0].prop(true, "calendar-data").unwrap();
    assert!(
        data.text.contains("SUMMARY:Tom & Jerry <3"),
        "{:?}",
        data.text
    );
    let parsed = ical::parse(&data.text).unwrap();
    assert_eq!(parsed[0].summary, "Tom & Jerry <3");
    let cal = &responses[1];
    assert_eq!(cal.href, "/alice/work/");
    let rt = cal.prop(false, "resourcetype").unwrap();
    assert_eq!(rt.children, vec!["collection", "calendar"]);
    assert_eq!(cal.prop(false, "displayname").unwrap().text, "Work");
    // A property in a 404 propstat is not taken as present.
    assert!(cal.prop(true, "calendar-home-set").is_none());
}

#[test]
fn malformed_xml_is_an_error_not_a_panic() {
    for bad in [
        "",
        "not xml at all",
        "<html><body>502 Bad Gateway</body></html>",
        "<multistatus xmlns=\"DAV:\"><response><href>/a</href>",
        "<multistatus xmlns=\"DAV:\"><response><href>/a</wrong></response></multistatus>",
        "<multistatus xmlns=\"DAV:\"><response><href>&bogus;</href></response></multistatus>",
        "<multistatus xmlns=\"DAV:\"><response><propstat/></response></multistatus>",
    ] {
        let err = parse_multistatus(bad).unwrap_err();
        assert!(
            matches!(err, CalendarError::Malformed { .. }),
            "{bad:?}: {err:?}"
        );
    }
}

#[test]
fn hrefs_never_leave_the_servers_origin() {
    use super::caldav::{Account, Settings};
    let account = Account::new(
        Settings {
            url: "https://dav.example.org:8443/dav/".parse().unwrap(),
            username: "alice".into(),
            password: crate::model::Secret::new("pw"),
            ca_pem: None,
        },
        std::time::Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(
        account.url("/alice/work/").unwrap().as_str(),
        "https://dav.example.org:8443/alice/work/"
    );
    assert_eq!(
        account.url("cal/").unwrap().as_str(),
        "https://dav.example.org:8443/dav/cal/"
    );
    for outside in [
        "https://evil.example/alice/",
        "//evil.example/alice/",
        "http://dav.example.org:8443/alice/",
        "https://dav.example.org/alice/",
    ] {
        let err = account.url(outside).unwrap_err();
        assert!(
            matches!(err, CalendarError::Malformed { .. }),
            "{outside}: {err:?}"
        );
    }
}
