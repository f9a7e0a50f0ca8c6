//! Recurrence expansion: the instances of a calendar object that fall inside a window. RRULE
//! (with the `rrule` crate, iterated in the event's local time so that a 9:00 meeting stays at
//! 9:00 across DST changes), RDATE, EXDATE and RECURRENCE-ID overrides; times resolved through
//! their TZID and returned in UTC; all-day events kept as dates.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeDelta, TimeZone, Utc};

use super::ical::{Component, Moment, Zone};
use super::{CalendarError, Event, Window};

/// At most this many occurrences are generated per recurring event (an old daily event still
/// reaches a window years later; a per-minute rule over decades is cut short and reported).
pub const MAX_STEPS: usize = 100_000;

/// How an occurrence is matched against EXDATE and RECURRENCE-ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    Date(NaiveDate),
    At(DateTime<Utc>),
}

fn keys(m: Moment) -> [Key; 2] {
    match m {
        Moment::Date(d) => [Key::Date(d), Key::Date(d)],
        Moment::Local(t, zone) => [Key::At(zone.to_utc(t)), Key::Date(t.date())],
    }
}

/// The instance's (start, end) in UTC from its local start.
fn span(start: Moment, duration: Duration) -> (DateTime<Utc>, DateTime<Utc>) {
    match (start, duration) {
        (Moment::Date(d), Duration::Days(n)) => {
            let s = Moment::Date(d).to_utc();
            (s, s + TimeDelta::days(n))
        }
        (Moment::Local(t, zone), Duration::Local(delta)) => {
            (zone.to_utc(t), zone.to_utc(t + delta))
        }
        (Moment::Local(t, zone), Duration::Days(n)) => {
            (zone.to_utc(t), zone.to_utc(t + TimeDelta::days(n)))
        }
        (Moment::Date(d), Duration::Local(delta)) => {
            let s = Moment::Date(d).to_utc();
            (s, s + delta)
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Duration {
    /// All-day events: whole days.
    Days(i64),
    /// Wall-clock length, kept across DST changes.
    Local(TimeDelta),
}

fn duration_of(c: &Component) -> Duration {
    match (c.start, c.end, c.duration) {
        (Moment::Date(s), Some(Moment::Date(e)), _) => Duration::Days((e - s).num_days().max(1)),
        (Moment::Date(_), _, Some(d)) => Duration::Days((d.num_days()).max(1)),
        (Moment::Date(_), _, None) => Duration::Days(1),
        (Moment::Local(s, sz), Some(Moment::Local(e, ez)), _) => {
            if sz == ez {
                Duration::Local((e - s).max(TimeDelta::zero()))
            } else {
                Duration::Local((ez.to_utc(e) - sz.to_utc(s)).max(TimeDelta::zero()))
            }
        }
        (Moment::Local(..), Some(Moment::Date(e)), _) => {
            Duration::Local((Moment::Date(e).to_utc() - c.start.to_utc()).max(TimeDelta::zero()))
        }
        (Moment::Local(..), None, Some(d)) => Duration::Local(d.max(TimeDelta::zero())),
        (Moment::Local(..), None, None) => Duration::Local(TimeDelta::zero()),
    }
}

fn intersects(start: DateTime<Utc>, end: DateTime<Utc>, w: &Window) -> bool {
    if end <= start {
        start >= w.min && start < w.max
    } else {
        start < w.max && end > w.min
    }
}

fn event(
    c: &Component,
    calendar: &str,
    start: Moment,
    duration: Duration,
    recurrence_id: Option<DateTime<Utc>>,
) -> Event {
    let (s, e) = span(start, duration);
    let (start_date, end_date) = match start {
        Moment::Date(d) => (Some(d), e.date_naive().into()),
        Moment::Local(..) => (None, None),
    };
    let time_zone = match start {
        Moment::Local(_, zone) => zone.iana().unwrap_or_default().to_string(),
        Moment::Date(_) => String::new(),
    };
    Event {
        uid: c.uid.clone(),
        calendar: calendar.to_string(),
        summary: c.summary.clone(),
        description: c.description.clone(),
        location: c.location.clone(),
        start: s,
        end: e,
        all_day: start.is_date(),
        start_date,
        end_date,
        organizer: c.organizer.clone(),
        attendees: c.attendees.clone(),
        status: c.status.clone(),
        recurrence_id,
        time_zone,
    }
}

/// Rewrites UNTIL into the floating form the local-time iteration uses: the local time in the
/// event's zone, written with a `Z` (the iteration runs in "UTC" on local wall-clock times).
fn floating_rule(rule: &str, start: Moment) -> String {
    rule.split(';')
        .map(|part| {
            let Some(value) = part
                .strip_prefix("UNTIL=")
                .or_else(|| part.strip_prefix("until="))
            else {
                return part.to_string();
            };
            let local = if value.len() == 8 {
                NaiveDate::parse_from_str(value, "%Y%m%d").ok().map(|d| {
                    if start.is_date() {
                        d.and_hms_opt(0, 0, 0).unwrap_or_default()
                    } else {
                        d.and_hms_opt(23, 59, 59).unwrap_or_default()
                    }
                })
            } else if let Some(utc) = value.strip_suffix('Z') {
                NaiveDateTime::parse_from_str(utc, "%Y%m%dT%H%M%S")
                    .ok()
                    .map(|t| match start {
                        Moment::Local(_, Zone::Named(tz)) => {
                            t.and_utc().with_timezone(&tz).naive_local()
                        }
                        Moment::Local(_, Zone::Fixed(offset)) => {
                            t.and_utc().with_timezone(&offset).naive_local()
                        }
                        _ => t,
                    })
            } else {
                NaiveDateTime::parse_from_str(value, "%Y%m%dT%H%M%S").ok()
            };
            match local {
                Some(t) => format!("UNTIL={}", t.format("%Y%m%dT%H%M%SZ")),
                None => part.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(";")
}

fn with_naive(m: Moment, t: NaiveDateTime) -> Moment {
    match m {
        Moment::Date(_) => Moment::Date(t.date()),
        Moment::Local(_, zone) => Moment::Local(t, zone),
    }
}

/// Outcome of expanding one object.
#[derive(Debug, Default)]
pub struct Expansion {
    pub events: Vec<Event>,
    /// Set when a rule produced more than [`MAX_STEPS`] occurrences before the window ended.
    pub capped: bool,
}

/// A VEVENT (the master, without RECURRENCE-ID) and the instances that override it, by UID.
type ByUid<'a> = BTreeMap<&'a str, (Option<&'a Component>, Vec<&'a Component>)>;

fn by_uid(components: &[Component]) -> ByUid<'_> {
    let mut by_uid: ByUid<'_> = BTreeMap::new();
    for c in components {
        let slot = by_uid.entry(c.uid.as_str()).or_default();
        if c.recurrence_id.is_some() {
            slot.1.push(c);
        } else if slot.0.is_none() {
            slot.0 = Some(c);
        }
    }
    by_uid
}

/// The instances of one calendar object resource that intersect the window.
pub fn expand(
    components: &[Component],
    calendar: &str,
    window: &Window,
) -> Result<Expansion, CalendarError> {
    let mut out = Expansion::default();
    for (_, (master, overrides)) in by_uid(components) {
        let overridden = expand_overrides(master, &overrides, calendar, window, &mut out);
        if let Some(master) = master {
            expand_master(master, &overridden, calendar, window, &mut out)?;
        }
    }
    Ok(out)
}

/// Adds the overriding instances that intersect the window (an override without an end or a
/// duration lasts as long as its master); returns the keys of the instances they replace.
fn expand_overrides(
    master: Option<&Component>,
    overrides: &[&Component],
    calendar: &str,
    window: &Window,
    out: &mut Expansion,
) -> HashSet<Key> {
    let master_duration = master.map(duration_of);
    let mut overridden = HashSet::new();
    for o in overrides {
        let Some(rid) = o.recurrence_id else { continue };
        overridden.insert(keys(rid)[0]);
        let duration = if o.end.is_some() || o.duration.is_some() {
            duration_of(o)
        } else {
            master_duration.unwrap_or_else(|| duration_of(o))
        };
        let (s, e) = span(o.start, duration);
        if intersects(s, e, window) {
            out.events
                .push(event(o, calendar, o.start, duration, Some(rid.to_utc())));
        }
    }
    overridden
}

/// An RRULE the expander cannot use.
fn unusable_rule(uid: &str, e: impl std::fmt::Display) -> CalendarError {
    CalendarError::Malformed {
        what: "iCalendar object",
        why: format!("VEVENT {uid:?} has an RRULE that cannot be used: {e}"),
    }
}

/// The master's occurrences: its RRULE (or its start alone) and its RDATEs, iterated in
/// floating local time.
fn recurrence_set(master: &Component) -> Result<rrule::RRuleSet, CalendarError> {
    let floating_start = rrule::Tz::UTC.from_utc_datetime(&master.start.naive());
    let mut set = match &master.rrule {
        Some(rule) => {
            let rule: rrule::RRule<rrule::Unvalidated> = floating_rule(rule, master.start)
                .parse()
                .map_err(|e: rrule::RRuleError| unusable_rule(&master.uid, e))?;
            rule.build(floating_start)
                .map_err(|e| unusable_rule(&master.uid, e))?
        }
        None => rrule::RRuleSet::new(floating_start).rdate(floating_start),
    };
    for r in &master.rdates {
        set = set.rdate(rrule::Tz::UTC.from_utc_datetime(&r.naive()));
    }
    Ok(set.limit())
}

/// Adds the master's instances that intersect the window, less those overridden or excluded
/// by EXDATE; at most [`MAX_STEPS`] occurrences are looked at.
fn expand_master(
    master: &Component,
    overridden: &HashSet<Key>,
    calendar: &str,
    window: &Window,
    out: &mut Expansion,
) -> Result<(), CalendarError> {
    let duration = duration_of(master);
    if master.rrule.is_none() && master.rdates.is_empty() {
        let (s, e) = span(master.start, duration);
        if intersects(s, e, window) && !overridden.contains(&keys(master.start)[0]) {
            out.events
                .push(event(master, calendar, master.start, duration, None));
        }
        return Ok(());
    }
    // EXDATE values match instances by instant, or by local date when written as dates.
    let excluded: HashSet<Key> = master.exdates.iter().map(|m| keys(*m)[0]).collect();
    let set = recurrence_set(master)?;
    // Local times run at most 14 hours away from UTC: stop a day past the window.
    let stop = window.max.naive_utc() + TimeDelta::days(1);
    let mut steps = 0;
    for occurrence in &set {
        steps += 1;
        if steps > MAX_STEPS {
            out.capped = true;
            break;
        }
        let local = occurrence.naive_utc();
        if local > stop {
            break;
        }
        let start = with_naive(master.start, local);
        let key = keys(start);
        if overridden.contains(&key[0]) || excluded.contains(&key[0]) || excluded.contains(&key[1])
        {
            continue;
        }
        let (s, e) = span(start, duration);
        if intersects(s, e, window) {
            out.events
                .push(event(master, calendar, start, duration, Some(s)));
        }
    }
    Ok(())
}

/// Checks that a rule can be expanded from `start` (CreateEvent validates before writing).
pub fn check_rule(rule: &str, start: Moment) -> Result<(), String> {
    let floating = rrule::Tz::UTC.from_utc_datetime(&start.naive());
    let parsed: rrule::RRule<rrule::Unvalidated> = floating_rule(rule, start)
        .parse()
        .map_err(|e: rrule::RRuleError| e.to_string())?;
    parsed
        .validate(floating)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The event as stored: the master VEVENT itself, not expanded.
pub fn as_stored(components: &[Component], calendar: &str) -> Option<Event> {
    let master = components
        .iter()
        .find(|c| c.recurrence_id.is_none())
        .or_else(|| components.first())?;
    let duration = duration_of(master);
    Some(event(master, calendar, master.start, duration, None))
}
