//! The Google Calendar REST API (v3) with a connection's OAuth access token: events.list
//! (timeMin/timeMax, singleEvents=true so Google expands recurrences, orderBy=startTime,
//! paginated) and events.insert. The base URL comes from the connector's `base_url`, so tests
//! can serve the documented JSON locally. An empty calendar means the account's `primary`.

use chrono::{DateTime, NaiveDate, Utc};
use reqwest::Url;
use serde::Deserialize;
use serde_json::json;

use super::ical::Moment;
use super::{Attendee, CalendarError, Event, Listing, ValidEvent, Window};
use crate::model::Secret;

/// Google answers at most 2500 items a page.
const PAGE_MAX: usize = 2500;
const MAX_PAGES: usize = 20;

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct GTime {
    date: Option<String>,
    date_time: Option<String>,
    time_zone: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct GPerson {
    email: String,
    display_name: String,
    response_status: String,
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct GEvent {
    id: String,
    i_cal_u_i_d: String,
    status: String,
    summary: String,
    description: String,
    location: String,
    start: Option<GTime>,
    end: Option<GTime>,
    organizer: Option<GPerson>,
    attendees: Vec<GPerson>,
    original_start_time: Option<GTime>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct GList {
    items: Vec<GEvent>,
    next_page_token: Option<String>,
}

fn malformed(why: impl Into<String>) -> CalendarError {
    CalendarError::Malformed {
        what: "Google Calendar response",
        why: why.into(),
    }
}

fn calendar_id(calendar: &str) -> &str {
    match calendar.trim() {
        "" => "primary",
        c => c,
    }
}

fn events_url(base: &str, calendar: &str) -> Result<Url, CalendarError> {
    // The value is not echoed: a malformed URL may still carry credentials.
    let mut url = Url::parse(base.trim_end_matches('/'))
        .map_err(|e| CalendarError::Config(format!("base_url is not a URL: {e}")))?;
    url.path_segments_mut()
        .map_err(|_| CalendarError::Config("base_url cannot take a path".into()))?
        .push("calendars")
        .push(calendar_id(calendar))
        .push("events");
    Ok(url)
}

/// (start, date) of a Google time.
fn time(t: &GTime, what: &str) -> Result<(DateTime<Utc>, Option<NaiveDate>), CalendarError> {
    if let Some(dt) = &t.date_time {
        if let Ok(t) = DateTime::parse_from_rfc3339(dt) {
            return Ok((t.with_timezone(&Utc), None));
        }
        // Without an offset the time is local to `timeZone` (as Google accepts on input).
        let zone = t
            .time_zone
            .as_deref()
            .and_then(|z| z.parse::<chrono_tz::Tz>().ok());
        let local = chrono::NaiveDateTime::parse_from_str(dt, "%Y-%m-%dT%H:%M:%S").ok();
        return match (zone, local) {
            (Some(tz), Some(local)) => Ok((super::ical::Zone::Named(tz).to_utc(local), None)),
            _ => Err(malformed(format!(
                "{what}.dateTime {dt:?} is not RFC 3339 and has no usable timeZone"
            ))),
        };
    }
    if let Some(d) = &t.date {
        let day = NaiveDate::parse_from_str(d, "%Y-%m-%d")
            .map_err(|_| malformed(format!("{what}.date {d:?} is not YYYY-MM-DD")))?;
        return Ok((Moment::Date(day).to_utc(), Some(day)));
    }
    Err(malformed(format!("{what} has neither date nor dateTime")))
}

fn partstat(s: &str) -> String {
    match s {
        "accepted" => "ACCEPTED",
        "declined" => "DECLINED",
        "tentative" => "TENTATIVE",
        _ => "NEEDS-ACTION",
    }
    .to_string()
}

fn event(g: GEvent, calendar: &str) -> Result<Event, CalendarError> {
    let start = g
        .start
        .as_ref()
        .ok_or_else(|| malformed(format!("event {:?} has no start", g.id)))?;
    let end = g
        .end
        .as_ref()
        .ok_or_else(|| malformed(format!("event {:?} has no end", g.id)))?;
    let (s, start_date) = time(start, "start")?;
    let (e, end_date) = time(end, "end")?;
    let recurrence_id = match &g.original_start_time {
        Some(t) => Some(time(t, "originalStartTime")?.0),
        None => None,
    };
    Ok(Event {
        uid: if g.i_cal_u_i_d.is_empty() {
            g.id
        } else {
            g.i_cal_u_i_d
        },
        calendar: calendar_id(calendar).to_string(),
        summary: g.summary,
        description: g.description,
        location: g.location,
        start: s,
        end: e,
        all_day: start_date.is_some(),
        start_date,
        end_date,
        organizer: g.organizer.map(|o| o.email).unwrap_or_default(),
        attendees: g
            .attendees
            .into_iter()
            .map(|a| Attendee {
                email: a.email,
                name: a.display_name,
                status: partstat(&a.response_status),
            })
            .collect(),
        status: match g.status.as_str() {
            "" => "CONFIRMED".to_string(),
            s => s.to_ascii_uppercase(),
        },
        recurrence_id,
        time_zone: if start_date.is_some() {
            String::new()
        } else {
            start.time_zone.clone().unwrap_or_default()
        },
    })
}

async fn send(
    req: reqwest::RequestBuilder,
    server: &str,
) -> Result<serde_json::Value, CalendarError> {
    let resp = req
        .send()
        .await
        .map_err(|e| super::caldav::transport_error(server, &e, std::time::Duration::ZERO))?;
    let status = resp.status().as_u16();
    let body = super::caldav::read_bounded(resp, server, std::time::Duration::ZERO).await?;
    match status {
        200..=299 => serde_json::from_slice(&body)
            .map_err(|e| malformed(format!("the body is not JSON: {e}"))),
        401 => Err(CalendarError::AuthRefused {
            server: server.to_string(),
            status,
        }),
        403 => Err(CalendarError::Forbidden {
            server: server.to_string(),
            path: "this calendar".into(),
        }),
        404 => Err(CalendarError::NotFound(format!(
            "{server} has no such calendar"
        ))),
        409 => Err(CalendarError::Conflict(format!(
            "{server}: the event already exists"
        ))),
        429 | 500.. => Err(CalendarError::ServerError {
            server: server.to_string(),
            status,
        }),
        _ => Err(CalendarError::Rejected {
            server: server.to_string(),
            status,
            why: String::from_utf8_lossy(&body).chars().take(200).collect(),
        }),
    }
}

fn server_of(url: &Url) -> String {
    url.host_str().unwrap_or_default().to_string()
}

/// events.list over the window, recurring events expanded by Google (singleEvents=true).
pub async fn list(
    client: &reqwest::Client,
    base: &str,
    token: &Secret,
    calendar: &str,
    window: &Window,
    limit: usize,
) -> Result<Listing, CalendarError> {
    let url = events_url(base, calendar)?;
    let server = server_of(&url);
    let mut listing = Listing::default();
    let mut page_token: Option<String> = None;
    for _ in 0..MAX_PAGES {
        let mut query = vec![
            ("timeMin", window.min.to_rfc3339()),
            ("timeMax", window.max.to_rfc3339()),
            ("singleEvents", "true".to_string()),
            ("orderBy", "startTime".to_string()),
            ("maxResults", (limit + 1).min(PAGE_MAX).to_string()),
        ];
        if let Some(t) = &page_token {
            query.push(("pageToken", t.clone()));
        }
        let mut page_url = url.clone();
        page_url.query_pairs_mut().extend_pairs(&query);
        let req = client.get(page_url).bearer_auth(token.expose());
        let value = send(req, &server).await?;
        let page: GList =
            serde_json::from_value(value).map_err(|e| malformed(format!("events.list: {e}")))?;
        for item in page.items {
            if item.status == "cancelled" {
                continue;
            }
            match event(item, calendar) {
                Ok(e) => listing.events.push(e),
                Err(e) => listing.warnings.push(e.to_string()),
            }
        }
        if listing.events.len() > limit {
            break;
        }
        match page.next_page_token {
            Some(t) if !t.is_empty() => page_token = Some(t),
            _ => break,
        }
    }
    if listing.events.len() > limit {
        listing.events.truncate(limit);
        listing.truncated = true;
    }
    Ok(listing)
}

fn g_time(m: Moment) -> serde_json::Value {
    match m {
        Moment::Date(d) => json!({ "date": d.format("%Y-%m-%d").to_string() }),
        Moment::Local(t, zone) => match zone.iana() {
            Some(name) => {
                let utc = zone.to_utc(t);
                let local = match zone {
                    super::ical::Zone::Named(tz) => utc.with_timezone(&tz).to_rfc3339(),
                    _ => utc.to_rfc3339(),
                };
                json!({ "dateTime": local, "timeZone": name })
            }
            None => json!({ "dateTime": zone.to_utc(t).to_rfc3339() }),
        },
    }
}

/// events.insert; returns the event as Google stored it.
pub async fn insert(
    client: &reqwest::Client,
    base: &str,
    token: &Secret,
    calendar: &str,
    e: &ValidEvent,
) -> Result<Event, CalendarError> {
    let url = events_url(base, calendar)?;
    let server = server_of(&url);
    let mut body = json!({
        "iCalUID": super::new_uid(),
        "summary": e.summary,
        "start": g_time(e.start),
        "end": g_time(e.end),
        "status": e.status.to_ascii_lowercase(),
    });
    if !e.description.is_empty() {
        body["description"] = json!(e.description);
    }
    if !e.location.is_empty() {
        body["location"] = json!(e.location);
    }
    if let Some(rule) = &e.rrule {
        body["recurrence"] = json!([format!("RRULE:{rule}")]);
    }
    if !e.attendees.is_empty() {
        body["attendees"] = e
            .attendees
            .iter()
            .map(|a| {
                json!({
                    "email": a.email,
                    "displayName": a.name,
                    "responseStatus": match a.status.as_str() {
                        "ACCEPTED" => "accepted",
                        "DECLINED" => "declined",
                        "TENTATIVE" => "tentative",
                        _ => "needsAction",
                    },
                })
            })
            .collect();
    }
    let req = client.post(url).bearer_auth(token.expose()).json(&body);
    let value = send(req, &server).await?;
    let stored: GEvent =
        serde_json::from_value(value).map_err(|e| malformed(format!("events.insert: {e}")))?;
    event(stored, calendar)
}
