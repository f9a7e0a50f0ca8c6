//! Calendars on a user's behalf: ListCalendar and CreateEvent over CalDAV (discovery, REPORT
//! calendar-query, PUT) or the Google Calendar REST API, and the CalDAV credential test behind
//! ConnectWithCredentials. This module owns the event model, the validation of what callers
//! send, iCalendar reading and writing ([`ical`]), recurrence expansion ([`expand`]) and the
//! mapping of upstream failures to [`CalendarError`]. Every upstream exchange runs under one
//! deadline (`limits.upstream_timeout_secs`); secrets never appear in errors or logs.

pub mod caldav;
pub mod expand;
pub mod google;
pub mod ical;

use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};

use crate::driver::{
    ConnectionError, CredentialError, Credentials, Service, driver, expire_refused,
};
use crate::model::{FieldError, ModelError, Stage, Target};
use ical::{Moment, Zone};

/// Widest ListCalendar window.
pub const MAX_WINDOW_DAYS: i64 = 366;
pub const DEFAULT_LIMIT: usize = 250;
pub const MAX_LIMIT: usize = 2500;
const MAX_SUMMARY_CHARS: usize = 255;
const MAX_LOCATION_CHARS: usize = 255;
const MAX_DESCRIPTION_CHARS: usize = 8000;
const MAX_ATTENDEES: usize = 100;
const MAX_RRULE_BYTES: usize = 512;
const MAX_EVENT_DAYS: i64 = 366;
/// The OAuth provider preset served by [`google`].
pub const GOOGLE_PROVIDER: &str = "google-calendar";
pub const GOOGLE_BASE_URL: &str = "https://www.googleapis.com/calendar/v3";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attendee {
    pub email: String,
    pub name: String,
    /// NEEDS-ACTION, ACCEPTED, DECLINED, TENTATIVE.
    pub status: String,
}

/// One event, or one instance of a recurring event, as returned to callers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub uid: String,
    /// The calendar's id: its collection path on a CalDAV server, its id at Google.
    pub calendar: String,
    pub summary: String,
    pub description: String,
    pub location: String,
    /// UTC; midnight UTC of the first day for all-day events.
    pub start: DateTime<Utc>,
    /// UTC, exclusive.
    pub end: DateTime<Utc>,
    pub all_day: bool,
    pub start_date: Option<NaiveDate>,
    /// The day after the last (exclusive), for all-day events.
    pub end_date: Option<NaiveDate>,
    pub organizer: String,
    pub attendees: Vec<Attendee>,
    /// CONFIRMED, TENTATIVE, CANCELLED.
    pub status: String,
    /// For instances of a recurring event: the instance's original start.
    pub recurrence_id: Option<DateTime<Utc>>,
    /// IANA zone the event was written in, empty for UTC, floating or all-day.
    pub time_zone: String,
}

/// A ListCalendar result.
#[derive(Debug, Default)]
pub struct Listing {
    pub events: Vec<Event>,
    pub truncated: bool,
    /// Objects the server returned that could not be read, each "where: why".
    pub warnings: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CalendarError {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error(transparent)]
    Credential(#[from] CredentialError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{server}: {why}")]
    Unreachable {
        server: String,
        stage: Stage,
        why: String,
    },
    #[error("{server} refused the credentials (HTTP {status})")]
    AuthRefused { server: String, status: u16 },
    #[error(
        "{server} refused access to {path} (HTTP 403): it belongs to another account or is not shared with this one"
    )]
    Forbidden { server: String, path: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{server} rejected the request (HTTP {status}): {why}")]
    Rejected {
        server: String,
        status: u16,
        why: String,
    },
    #[error("{server} is failing (HTTP {status}); try again later")]
    ServerError { server: String, status: u16 },
    #[error("the server sent a malformed {what}: {why}")]
    Malformed { what: &'static str, why: String },
    #[error("{0}")]
    Internal(String),
    /// The egress policy refused the server, or the upstream connection caps are reached.
    #[error(transparent)]
    Egress(crate::upstream::UpstreamError),
}

/// A validated ListCalendar window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub min: DateTime<Utc>,
    pub max: DateTime<Utc>,
}

impl Window {
    pub fn new(
        min: Option<DateTime<Utc>>,
        max: Option<DateTime<Utc>>,
    ) -> Result<Window, FieldError> {
        let min = min.ok_or_else(|| FieldError::new("time_min", "is required"))?;
        let max = max.ok_or_else(|| FieldError::new("time_max", "is required"))?;
        if max <= min {
            return Err(FieldError::new("time_max", "must be after time_min"));
        }
        if max - min > chrono::TimeDelta::days(MAX_WINDOW_DAYS) {
            return Err(FieldError::new(
                "time_max",
                format!(
                    "is {} days after time_min; the window is at most {MAX_WINDOW_DAYS} days",
                    (max - min).num_days()
                ),
            ));
        }
        Ok(Window { min, max })
    }
}

/// ListCalendar's `limit`: 0 means the default.
pub fn limit(n: u32) -> Result<usize, FieldError> {
    match n as usize {
        0 => Ok(DEFAULT_LIMIT),
        n if n <= MAX_LIMIT => Ok(n),
        n => Err(FieldError::new(
            "limit",
            format!("is {n}; at most {MAX_LIMIT}"),
        )),
    }
}

/// An event as a caller describes it, before validation.
#[derive(Debug, Clone, Default)]
pub struct NewEvent {
    pub summary: String,
    pub description: String,
    pub location: String,
    pub start: Option<DateTime<Utc>>,
    pub end: Option<DateTime<Utc>>,
    pub all_day: bool,
    /// YYYY-MM-DD, for all-day events.
    pub start_date: String,
    pub end_date: String,
    /// IANA zone to write the times in; empty for UTC.
    pub time_zone: String,
    pub organizer: String,
    pub attendees: Vec<Attendee>,
    pub status: String,
    pub rrule: String,
}

/// An event that passed validation: safe to write as iCalendar or send to Google.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidEvent {
    pub summary: String,
    pub description: String,
    pub location: String,
    pub start: Moment,
    pub end: Moment,
    pub organizer: String,
    pub attendees: Vec<Attendee>,
    pub status: String,
    pub rrule: Option<String>,
}

impl ValidEvent {
    pub fn start_zone(&self) -> Zone {
        match self.start {
            Moment::Local(_, zone) => zone,
            Moment::Date(_) => Zone::Floating,
        }
    }
}

fn plain_text(field: &str, value: &str, max: usize, multiline: bool) -> Result<String, FieldError> {
    let chars = value.chars().count();
    if chars > max {
        return Err(FieldError::new(
            field,
            format!("is {chars} characters long; at most {max}"),
        ));
    }
    let bad = |c: char| c.is_control() && !(multiline && (c == '\n' || c == '\t'));
    if value.chars().any(bad) {
        return Err(FieldError::new(
            field,
            if multiline {
                "must not contain control characters other than line feeds and tabs"
            } else {
                "must not contain line breaks or other control characters"
            },
        ));
    }
    Ok(value.to_string())
}

fn email(field: &str, value: &str) -> Result<String, FieldError> {
    let ok = value.len() <= 254
        && value
            .split_once('@')
            .is_some_and(|(l, d)| !l.is_empty() && !d.is_empty() && !d.contains('@'))
        && !value
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || "\"<>,;:\\()[]".contains(c));
    if ok {
        Ok(value.to_string())
    } else {
        Err(FieldError::new(
            field,
            "must be an email address (name@domain)",
        ))
    }
}

fn date(field: &str, value: &str) -> Result<NaiveDate, FieldError> {
    NaiveDate::parse_from_str(value, "%Y-%m-%d")
        .map_err(|_| FieldError::new(field, "must be a date written YYYY-MM-DD"))
}

/// The zone an event's times are written in: UTC for "", "UTC" and "Etc/UTC", else an IANA name.
fn zone(name: &str) -> Result<Zone, FieldError> {
    Ok(match name {
        "" | "UTC" | "Etc/UTC" => Zone::Utc,
        name => Zone::Named(name.parse::<chrono_tz::Tz>().map_err(|_| {
            FieldError::new(
                "event.time_zone",
                "must be an IANA time zone such as Europe/Paris",
            )
        })?),
    })
}

/// An attendee: a name without double quotes, a participation status, an email address.
fn attendee(i: usize, a: Attendee) -> Result<Attendee, FieldError> {
    let name = plain_text(&format!("event.attendees[{i}].name"), &a.name, 128, false)?;
    if name.contains('"') {
        return Err(FieldError::new(
            format!("event.attendees[{i}].name"),
            "must not contain double quotes",
        ));
    }
    let status = match a.status.to_ascii_uppercase().as_str() {
        "" => "NEEDS-ACTION".to_string(),
        s @ ("NEEDS-ACTION" | "ACCEPTED" | "DECLINED" | "TENTATIVE") => s.to_string(),
        _ => {
            return Err(FieldError::new(
                format!("event.attendees[{i}].status"),
                "must be NEEDS-ACTION, ACCEPTED, DECLINED or TENTATIVE",
            ));
        }
    };
    Ok(Attendee {
        email: email(&format!("event.attendees[{i}].email"), &a.email)?,
        name,
        status,
    })
}

/// At most [`MAX_ATTENDEES`], each checked by [`attendee`].
fn attendees(list: Vec<Attendee>) -> Result<Vec<Attendee>, FieldError> {
    if list.len() > MAX_ATTENDEES {
        return Err(FieldError::new(
            "event.attendees",
            format!("has {} entries; at most {MAX_ATTENDEES}", list.len()),
        ));
    }
    list.into_iter()
        .enumerate()
        .map(|(i, a)| attendee(i, a))
        .collect()
}

/// The event's status, CONFIRMED when none is given.
fn event_status(status: &str) -> Result<String, FieldError> {
    match status.to_ascii_uppercase().as_str() {
        "" => Ok("CONFIRMED".to_string()),
        s @ ("CONFIRMED" | "TENTATIVE" | "CANCELLED") => Ok(s.to_string()),
        _ => Err(FieldError::new(
            "event.status",
            "must be CONFIRMED, TENTATIVE or CANCELLED",
        )),
    }
}

/// An RRULE (with or without its "RRULE:" prefix), upper-cased, of a restricted alphabet, and
/// one the expander can run from `start`; None when empty.
fn rrule(rule: &str, start: Moment) -> Result<Option<String>, FieldError> {
    let rule = match rule.trim() {
        "" => return Ok(None),
        rule => rule
            .strip_prefix("RRULE:")
            .unwrap_or(rule)
            .to_ascii_uppercase(),
    };
    if rule.len() > MAX_RRULE_BYTES
        || !rule
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "=;,+-".contains(c))
    {
        return Err(FieldError::new(
            "rrule",
            format!(
                "must be an RFC 5545 rule such as FREQ=WEEKLY;COUNT=10 (letters, digits, = ; , + -; at most {MAX_RRULE_BYTES} bytes)"
            ),
        ));
    }
    expand::check_rule(&rule, start)
        .map_err(|why| FieldError::new("rrule", format!("is not usable: {why}")))?;
    Ok(Some(rule))
}

impl NewEvent {
    /// Checks every field in turn (summary, description, location, zone, times, organizer,
    /// attendees, status, rule): the first bad one is the one named.
    pub fn validate(self) -> Result<ValidEvent, FieldError> {
        let summary = plain_text(
            "event.summary",
            self.summary.trim(),
            MAX_SUMMARY_CHARS,
            false,
        )?;
        if summary.is_empty() {
            return Err(FieldError::new("event.summary", "is required"));
        }
        let description = plain_text(
            "event.description",
            &self.description,
            MAX_DESCRIPTION_CHARS,
            true,
        )?;
        let location = plain_text("event.location", &self.location, MAX_LOCATION_CHARS, false)?;
        let zone = zone(&self.time_zone)?;
        let (start, end) = if self.all_day {
            self.dates()?
        } else {
            self.times(zone)?
        };
        let organizer = match self.organizer.as_str() {
            "" => String::new(),
            o => email("event.organizer", o)?,
        };
        let attendees = attendees(self.attendees)?;
        let status = event_status(&self.status)?;
        let rrule = rrule(&self.rrule, start)?;
        Ok(ValidEvent {
            summary,
            description,
            location,
            start,
            end,
            organizer,
            attendees,
            status,
            rrule,
        })
    }

    /// An all-day event's first day and the day after its last: from start_date and end_date,
    /// else from the dates of start and end, else one day.
    fn dates(&self) -> Result<(Moment, Moment), FieldError> {
        let start = match (self.start_date.as_str(), self.start) {
            ("", Some(t)) => t.date_naive(),
            ("", None) => {
                return Err(FieldError::new(
                    "event.start_date",
                    "is required for an all-day event",
                ));
            }
            (d, _) => date("event.start_date", d)?,
        };
        let end = match (self.end_date.as_str(), self.end) {
            ("", Some(t)) if self.start_date.is_empty() => t.date_naive(),
            ("", _) => start + chrono::Days::new(1),
            (d, _) => date("event.end_date", d)?,
        };
        if end <= start {
            return Err(FieldError::new(
                "event.end_date",
                "must be after event.start_date (it is the day after the last day)",
            ));
        }
        if (end - start).num_days() > MAX_EVENT_DAYS {
            return Err(FieldError::new(
                "event.end_date",
                format!("the event lasts more than {MAX_EVENT_DAYS} days"),
            ));
        }
        Ok((Moment::Date(start), Moment::Date(end)))
    }

    /// A timed event's start and end, as local times in `zone`.
    fn times(&self, zone: Zone) -> Result<(Moment, Moment), FieldError> {
        if !self.start_date.is_empty() || !self.end_date.is_empty() {
            return Err(FieldError::new(
                "event.start_date",
                "is only for all-day events (set all_day, or use start and end)",
            ));
        }
        let start = self
            .start
            .ok_or_else(|| FieldError::new("event.start", "is required"))?;
        let end = self
            .end
            .ok_or_else(|| FieldError::new("event.end", "is required"))?;
        if end <= start {
            return Err(FieldError::new("event.end", "must be after event.start"));
        }
        if end - start > chrono::TimeDelta::days(MAX_EVENT_DAYS) {
            return Err(FieldError::new(
                "event.end",
                format!("the event lasts more than {MAX_EVENT_DAYS} days"),
            ));
        }
        let local = |t: DateTime<Utc>| match zone {
            Zone::Named(tz) => t.with_timezone(&tz).naive_local(),
            _ => t.naive_utc(),
        };
        Ok((
            Moment::Local(local(start), zone),
            Moment::Local(local(end), zone),
        ))
    }
}

/// A fresh, unguessable UID.
pub fn new_uid() -> String {
    format!(
        "{}@credbroker",
        hex::encode(crate::vault::random_bytes::<16>())
    )
}

/// Runs `f` under the upstream deadline.
async fn deadline<T>(
    timeout: Duration,
    server: &str,
    f: impl Future<Output = Result<T, CalendarError>>,
) -> Result<T, CalendarError> {
    match tokio::time::timeout(timeout, f).await {
        Ok(r) => r,
        Err(_) => Err(CalendarError::Unreachable {
            server: server.to_string(),
            stage: Stage::Timeout,
            why: format!("did not answer within {}s", timeout.as_secs()),
        }),
    }
}

impl From<ConnectionError> for CalendarError {
    fn from(e: ConnectionError) -> Self {
        CalendarError::Credential(e.into())
    }
}

/// The calendar domain for one call: borrows what it needs from the daemon's services.
pub struct Calendars<'a> {
    pub credentials: &'a Credentials,
    pub timeout: Duration,
}

enum Backend {
    Caldav(caldav::Account),
    Google {
        client: reqwest::Client,
        base: String,
        token: crate::model::Secret,
    },
}

impl Calendars<'_> {
    /// The google-calendar preset is served by the Google Calendar API; every other calendar
    /// connector speaks CalDAV.
    async fn backend(&self, target: &Target) -> Result<Backend, CalendarError> {
        let connector = &target.connector;
        if !driver(connector.kind).serves(connector, Service::Calendar) {
            return Err(CalendarError::Config(format!(
                "connector {:?} is a {}{} connector: it has no calendar (use a caldav or google-calendar connector)",
                connector.name,
                connector.kind.name(),
                if connector.provider.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", connector.provider)
                }
            )));
        }
        if connector.provider == GOOGLE_PROVIDER {
            let credential = self
                .credentials
                .credential(target, Duration::from_secs(60))
                .await?;
            let client = crate::tls::http_client(connector.setting("ca_pem"), self.timeout)
                .map_err(|e| CalendarError::Config(e.to_string()))?;
            return Ok(Backend::Google {
                client,
                base: connector
                    .setting("base_url")
                    .unwrap_or(GOOGLE_BASE_URL)
                    .to_string(),
                token: credential.secret,
            });
        }
        if connector.setting("oauth_connector").is_some() {
            return Err(CalendarError::Unsupported(
                "CalDAV over OAuth (oauth_connector) is not available in this build".into(),
            ));
        }
        // The server the password was given for: the settings read with it.
        let credential = self.credentials.credential(target, self.timeout).await?;
        let connection = credential
            .connection
            .ok_or_else(|| ConnectionError::not_connected(connector, &target.connection_user))?;
        let settings =
            caldav::Settings::new(connector, &connection.settings, Some(credential.secret))?;
        Ok(Backend::Caldav(caldav::Account::new(
            settings,
            self.timeout,
        )?))
    }

    /// Records the use of a connection that worked when its driver says so (OAuth ones are
    /// recorded when their token is served). A stored password the server refuses marks the
    /// connection EXPIRED ([`expire_refused`]): the user must reconnect, and callers are told
    /// so instead of retrying.
    async fn settle<T>(
        &self,
        target: &Target,
        password: bool,
        result: Result<T, CalendarError>,
    ) -> Result<T, CalendarError> {
        let connector = &target.connector;
        let user = &target.connection_user;
        let registry = self.credentials.registry();
        if result.is_ok() && !driver(connector.kind).resolvable() {
            registry.record_use(connector, user).await;
        }
        let Err(CalendarError::AuthRefused { server, status }) = &result else {
            return result;
        };
        if password {
            let why = format!(
                "{server} refused the stored password (HTTP {status}): reconnect the account"
            );
            if let Some(expired) = expire_refused(registry, connector, user, why, false).await? {
                return Err(expired.into());
            }
        }
        result
    }

    /// Runs one call on the target's backend under the upstream deadline, then settles its
    /// outcome ([`Self::settle`]).
    async fn call<T>(
        &self,
        target: &Target,
        on_caldav: impl AsyncFnOnce(&caldav::Account) -> Result<T, CalendarError>,
        on_google: impl AsyncFnOnce(
            &reqwest::Client,
            &str,
            &crate::model::Secret,
        ) -> Result<T, CalendarError>,
    ) -> Result<T, CalendarError> {
        let backend = self.backend(target).await?;
        let password = matches!(backend, Backend::Caldav(_));
        let result = match backend {
            Backend::Caldav(account) => {
                let server = account.server();
                deadline(self.timeout, &server, on_caldav(&account)).await
            }
            Backend::Google {
                client,
                base,
                token,
            } => deadline(self.timeout, &base, on_google(&client, &base, &token)).await,
        };
        self.settle(target, password, result).await
    }

    pub async fn list(
        &self,
        target: &Target,
        calendar: &str,
        window: Window,
        limit: usize,
    ) -> Result<Listing, CalendarError> {
        self.call(
            target,
            async |account| account.list(calendar, &window, limit).await,
            async |client, base, token| {
                google::list(client, base, token, calendar, &window, limit).await
            },
        )
        .await
    }

    pub async fn create(
        &self,
        target: &Target,
        calendar: &str,
        event: NewEvent,
    ) -> Result<Event, CalendarError> {
        let event = event.validate()?;
        self.call(
            target,
            async |account| account.create(calendar, &event).await,
            async |client, base, token| google::insert(client, base, token, calendar, &event).await,
        )
        .await
    }
}

#[cfg(test)]
mod tests;
