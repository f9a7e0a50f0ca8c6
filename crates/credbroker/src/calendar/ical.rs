//! iCalendar in and out. Reading goes through `calcard` (a maintained RFC 5545 parser) and keeps
//! only what the API returns plus what recurrence expansion needs; writing produces one VEVENT
//! with escaped, folded text and the VTIMEZONE its TZID needs.

use calcard::common::timezone::Tz as CalTz;
use calcard::common::{IanaString, PartialDateTime};
use calcard::icalendar::timezone::TzResolver;
use calcard::icalendar::{
    ICalendar, ICalendarComponent, ICalendarComponentType, ICalendarEntry, ICalendarParameterName,
    ICalendarProperty, ICalendarValue,
};
use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime, TimeDelta, TimeZone, Utc};

use super::{Attendee, CalendarError, ValidEvent};

/// Where a local time is anchored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Zone {
    Utc,
    /// No TZID and no `Z`: read as UTC (the server's and our only neutral choice).
    Floating,
    Named(chrono_tz::Tz),
    Fixed(FixedOffset),
}

/// A DTSTART/DTEND/EXDATE/RECURRENCE-ID value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Moment {
    Date(NaiveDate),
    Local(NaiveDateTime, Zone),
}

impl Zone {
    /// The UTC instant of a local time here. A time skipped by a DST change is moved forward by
    /// the gap; an ambiguous one takes the earlier instant.
    pub fn to_utc(self, local: NaiveDateTime) -> DateTime<Utc> {
        fn pick<T: TimeZone>(tz: &T, local: NaiveDateTime) -> DateTime<Utc> {
            match tz.from_local_datetime(&local).earliest() {
                Some(t) => t.with_timezone(&Utc),
                None => tz
                    .from_local_datetime(&(local + TimeDelta::hours(1)))
                    .earliest()
                    .map(|t| t.with_timezone(&Utc))
                    .unwrap_or_else(|| local.and_utc()),
            }
        }
        match self {
            Zone::Utc | Zone::Floating => local.and_utc(),
            Zone::Named(tz) => pick(&tz, local),
            Zone::Fixed(offset) => pick(&offset, local),
        }
    }

    /// The IANA name, for named zones other than UTC.
    pub fn iana(self) -> Option<&'static str> {
        match self {
            Zone::Named(tz) if tz != chrono_tz::UTC => Some(tz.name()),
            _ => None,
        }
    }
}

impl Moment {
    /// Midnight UTC for dates.
    pub fn to_utc(self) -> DateTime<Utc> {
        match self {
            Moment::Date(d) => d.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc(),
            Moment::Local(t, zone) => zone.to_utc(t),
        }
    }

    pub fn naive(self) -> NaiveDateTime {
        match self {
            Moment::Date(d) => d.and_hms_opt(0, 0, 0).unwrap_or_default(),
            Moment::Local(t, _) => t,
        }
    }

    pub fn is_date(self) -> bool {
        matches!(self, Moment::Date(_))
    }
}

/// One VEVENT as read from the server.
#[derive(Debug, Clone, PartialEq)]
pub struct Component {
    pub uid: String,
    pub summary: String,
    pub description: String,
    pub location: String,
    pub organizer: String,
    pub attendees: Vec<Attendee>,
    pub status: String,
    pub start: Moment,
    pub end: Option<Moment>,
    pub duration: Option<TimeDelta>,
    pub rrule: Option<String>,
    pub rdates: Vec<Moment>,
    pub exdates: Vec<Moment>,
    pub recurrence_id: Option<Moment>,
}

fn malformed(why: impl Into<String>) -> CalendarError {
    CalendarError::Malformed {
        what: "iCalendar object",
        why: why.into(),
    }
}

fn text(comp: &ICalendarComponent, prop: ICalendarProperty) -> String {
    comp.property(&prop)
        .map(|e| {
            e.values
                .iter()
                .filter_map(|v| v.as_text())
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

fn strip_mailto(value: &str) -> String {
    match value.split_once(':') {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("mailto") => rest.to_string(),
        _ => value.to_string(),
    }
}

fn moment(
    pdt: &PartialDateTime,
    entry: &ICalendarEntry,
    resolver: &TzResolver<&str>,
) -> Result<Moment, CalendarError> {
    let name = entry.name.as_str();
    let dt = pdt
        .to_date_time()
        .ok_or_else(|| malformed(format!("{name} is not a valid date or time")))?;
    if pdt.hour.is_none() {
        return Ok(Moment::Date(dt.date_time.date()));
    }
    let zone = if let Some(offset) = dt.offset {
        if offset.local_minus_utc() == 0 {
            Zone::Utc
        } else {
            Zone::Fixed(offset)
        }
    } else if let Some(tzid) = entry.tz_id() {
        match resolver.resolve(tzid) {
            Some(CalTz::Tz(tz)) if tz == chrono_tz::UTC => Zone::Utc,
            Some(CalTz::Tz(tz)) => Zone::Named(tz),
            Some(CalTz::Fixed(offset)) => Zone::Fixed(offset),
            Some(CalTz::Floating) => Zone::Floating,
            None => {
                return Err(malformed(format!(
                    "{name} names an unknown time zone {tzid:?}"
                )));
            }
        }
    } else {
        Zone::Floating
    };
    Ok(Moment::Local(dt.date_time, zone))
}

fn moments(
    entry: &ICalendarEntry,
    resolver: &TzResolver<&str>,
) -> Result<Vec<Moment>, CalendarError> {
    entry
        .values
        .iter()
        .filter_map(|v| match v {
            ICalendarValue::PartialDateTime(p) => Some(moment(p, entry, resolver)),
            _ => None,
        })
        .collect()
}

fn one_moment(
    comp: &ICalendarComponent,
    prop: ICalendarProperty,
    resolver: &TzResolver<&str>,
) -> Result<Option<Moment>, CalendarError> {
    match comp.property(&prop) {
        None => Ok(None),
        Some(entry) => match moments(entry, resolver)?.into_iter().next() {
            Some(m) => Ok(Some(m)),
            None => Err(malformed(format!(
                "{} has no date-time value",
                prop.as_str()
            ))),
        },
    }
}

/// Every value of every `prop` line (RDATE, EXDATE).
fn all_moments(
    comp: &ICalendarComponent,
    prop: ICalendarProperty,
    resolver: &TzResolver<&str>,
) -> Result<Vec<Moment>, CalendarError> {
    let mut out = Vec::new();
    for e in comp.properties(&prop) {
        out.extend(moments(e, resolver)?);
    }
    Ok(out)
}

/// The DURATION, when there is one; one that is not a duration is an error.
fn duration(comp: &ICalendarComponent, uid: &str) -> Result<Option<TimeDelta>, CalendarError> {
    let Some(e) = comp.property(&ICalendarProperty::Duration) else {
        return Ok(None);
    };
    let bad = || malformed(format!("VEVENT {uid:?} has a bad DURATION"));
    match e.values.first() {
        Some(ICalendarValue::Duration(d)) => Ok(Some(d.to_time_delta().ok_or_else(bad)?)),
        _ => Err(bad()),
    }
}

/// The RRULE, when there is one, as text.
fn rrule(comp: &ICalendarComponent, uid: &str) -> Result<Option<String>, CalendarError> {
    match comp.property(&ICalendarProperty::Rrule) {
        None => Ok(None),
        Some(e) => match e.values.first() {
            Some(ICalendarValue::RecurrenceRule(rule)) => Ok(Some(rule.to_string())),
            _ => Err(malformed(format!("VEVENT {uid:?} has a bad RRULE"))),
        },
    }
}

/// The ATTENDEE lines: address without `mailto:`, CN, PARTSTAT (NEEDS-ACTION by default).
fn attendees(comp: &ICalendarComponent) -> Vec<Attendee> {
    comp.properties(&ICalendarProperty::Attendee)
        .map(|e| Attendee {
            email: e
                .values
                .first()
                .and_then(|v| v.as_text())
                .map(strip_mailto)
                .unwrap_or_default(),
            name: e
                .parameter(&ICalendarParameterName::Cn)
                .and_then(|v| v.as_text())
                .unwrap_or_default()
                .to_string(),
            status: e
                .parameter(&ICalendarParameterName::Partstat)
                .and_then(|v| v.as_text())
                .unwrap_or("NEEDS-ACTION")
                .to_ascii_uppercase(),
        })
        .collect()
}

/// One VEVENT: a UID and a DTSTART are required.
fn component(
    comp: &ICalendarComponent,
    resolver: &TzResolver<&str>,
) -> Result<Component, CalendarError> {
    let uid = comp
        .uid()
        .filter(|u| !u.is_empty())
        .ok_or_else(|| malformed("a VEVENT has no UID"))?
        .to_string();
    let start = one_moment(comp, ICalendarProperty::Dtstart, resolver)?
        .ok_or_else(|| malformed(format!("VEVENT {uid:?} has no DTSTART")))?;
    let end = one_moment(comp, ICalendarProperty::Dtend, resolver)?;
    let duration = duration(comp, &uid)?;
    let rrule = rrule(comp, &uid)?;
    let rdates = all_moments(comp, ICalendarProperty::Rdate, resolver)?;
    let exdates = all_moments(comp, ICalendarProperty::Exdate, resolver)?;
    Ok(Component {
        summary: text(comp, ICalendarProperty::Summary),
        description: text(comp, ICalendarProperty::Description),
        location: text(comp, ICalendarProperty::Location),
        organizer: strip_mailto(&text(comp, ICalendarProperty::Organizer)),
        status: comp
            .status()
            .map(|s| s.as_str().to_ascii_uppercase())
            .unwrap_or_else(|| "CONFIRMED".into()),
        attendees: attendees(comp),
        recurrence_id: one_moment(comp, ICalendarProperty::RecurrenceId, resolver)?,
        uid,
        start,
        end,
        duration,
        rrule,
        rdates,
        exdates,
    })
}

/// Parses one calendar object resource (a VCALENDAR with one UID's VEVENTs).
pub fn parse(data: &str) -> Result<Vec<Component>, CalendarError> {
    if data.trim().is_empty() {
        return Err(malformed("empty calendar data"));
    }
    let ical = ICalendar::parse(data).map_err(|_| malformed("not a VCALENDAR"))?;
    let resolver = ical.build_tz_resolver();
    let out = ical
        .components
        .iter()
        .filter(|comp| comp.component_type == ICalendarComponentType::VEvent)
        .map(|comp| component(comp, &resolver))
        .collect::<Result<Vec<_>, _>>()?;
    if out.is_empty() {
        return Err(malformed("no VEVENT in the object"));
    }
    Ok(out)
}

/// RFC 5545 TEXT escaping.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            ';' => out.push_str("\\;"),
            ',' => out.push_str("\\,"),
            '\n' => out.push_str("\\n"),
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

/// Folds a content line at 75 octets, never inside a UTF-8 sequence.
fn fold(line: &str, out: &mut String) {
    let mut width = 0;
    for c in line.chars() {
        let n = c.len_utf8();
        if width + n > 75 {
            out.push_str("\r\n ");
            width = 1;
        }
        out.push(c);
        width += n;
    }
    out.push_str("\r\n");
}

fn utc_stamp(t: DateTime<Utc>) -> String {
    t.format("%Y%m%dT%H%M%SZ").to_string()
}

/// The iCalendar object for a new event (one VEVENT, plus the VTIMEZONE its TZID needs).
pub fn write(uid: &str, event: &ValidEvent, now: DateTime<Utc>) -> Result<String, CalendarError> {
    let mut lines = vec![
        "BEGIN:VCALENDAR".to_string(),
        "VERSION:2.0".to_string(),
        concat!("PRODID:-//credbroker//", env!("CARGO_PKG_VERSION"), "//EN").to_string(),
        "BEGIN:VEVENT".to_string(),
        format!("UID:{}", escape(uid)),
        format!("DTSTAMP:{}", utc_stamp(now)),
    ];
    match (&event.start, &event.end) {
        (Moment::Date(s), Moment::Date(e)) => {
            lines.push(format!("DTSTART;VALUE=DATE:{}", s.format("%Y%m%d")));
            lines.push(format!("DTEND;VALUE=DATE:{}", e.format("%Y%m%d")));
        }
        (Moment::Local(s, zone), Moment::Local(e, _)) => match zone.iana() {
            Some(name) => {
                lines.push(format!("DTSTART;TZID={name}:{}", s.format("%Y%m%dT%H%M%S")));
                lines.push(format!("DTEND;TZID={name}:{}", e.format("%Y%m%dT%H%M%S")));
            }
            None => {
                lines.push(format!("DTSTART:{}", utc_stamp(zone.to_utc(*s))));
                lines.push(format!("DTEND:{}", utc_stamp(zone.to_utc(*e))));
            }
        },
        _ => {
            return Err(CalendarError::Invalid(crate::model::FieldError::new(
                "event.end",
                "must be of the same kind (date or time) as event.start",
            )));
        }
    }
    lines.push(format!("SUMMARY:{}", escape(&event.summary)));
    if !event.description.is_empty() {
        lines.push(format!("DESCRIPTION:{}", escape(&event.description)));
    }
    if !event.location.is_empty() {
        lines.push(format!("LOCATION:{}", escape(&event.location)));
    }
    lines.push(format!("STATUS:{}", event.status));
    if let Some(rule) = &event.rrule {
        lines.push(format!("RRULE:{rule}"));
    }
    if !event.organizer.is_empty() {
        lines.push(format!("ORGANIZER:mailto:{}", event.organizer));
    }
    for a in &event.attendees {
        let mut line = "ATTENDEE".to_string();
        if !a.name.is_empty() {
            line.push_str(&format!(";CN=\"{}\"", a.name));
        }
        line.push_str(&format!(";PARTSTAT={}:mailto:{}", a.status, a.email));
        lines.push(line);
    }
    lines.push("END:VEVENT".to_string());
    lines.push("END:VCALENDAR".to_string());
    let mut text = String::new();
    for line in &lines {
        fold(line, &mut text);
    }
    if event.start_zone().iana().is_none() {
        return Ok(text);
    }
    // A TZID must be defined by a VTIMEZONE in the same object (RFC 5545 §3.2.19).
    let mut ical = ICalendar::parse(&text)
        .map_err(|_| CalendarError::Internal("the event written could not be read back".into()))?;
    ical.add_missing_timezones();
    Ok(ical.to_string())
}
