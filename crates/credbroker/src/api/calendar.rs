//! ListCalendar and CreateEvent: request → [`crate::calendar`] → reply.

use std::time::Duration;

use super::proto;
use super::{ApiError, BrokerApi, convert};
use crate::calendar::{self, Attendee, Calendars, Event, NewEvent, Window};
use crate::model::{FieldError, Target};

fn event_to(e: Event) -> proto::CalendarEvent {
    proto::CalendarEvent {
        uid: e.uid,
        calendar: e.calendar,
        summary: e.summary,
        description: e.description,
        location: e.location,
        start: Some(convert::timestamp(e.start)),
        end: Some(convert::timestamp(e.end)),
        all_day: e.all_day,
        organizer: e.organizer,
        attendees: e
            .attendees
            .into_iter()
            .map(|a| proto::Attendee {
                email: a.email,
                name: a.name,
                status: a.status,
            })
            .collect(),
        status: e.status,
        recurrence_id: convert::opt_timestamp(e.recurrence_id),
        start_date: e.start_date.map(|d| d.to_string()).unwrap_or_default(),
        end_date: e.end_date.map(|d| d.to_string()).unwrap_or_default(),
        time_zone: e.time_zone,
    }
}

fn time(
    field: &str,
    t: Option<prost_types::Timestamp>,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, FieldError> {
    t.map(|t| convert::from_timestamp(field, &t)).transpose()
}

fn new_event(e: proto::CalendarEvent, rrule: String) -> Result<NewEvent, FieldError> {
    Ok(NewEvent {
        summary: e.summary,
        description: e.description,
        location: e.location,
        start: time("event.start", e.start)?,
        end: time("event.end", e.end)?,
        all_day: e.all_day,
        start_date: e.start_date,
        end_date: e.end_date,
        time_zone: e.time_zone,
        organizer: e.organizer,
        attendees: e
            .attendees
            .into_iter()
            .map(|a| Attendee {
                email: a.email,
                name: a.name,
                status: a.status,
            })
            .collect(),
        status: e.status,
        rrule,
    })
}

impl BrokerApi {
    fn calendars(&self) -> Calendars<'_> {
        Calendars {
            credentials: self.0.resolver.credentials(),
            timeout: Duration::from_secs(self.0.limits.upstream_timeout_secs.max(1)),
        }
    }

    pub(super) async fn listing(
        &self,
        target: &Target,
        r: proto::ListCalendarRequest,
    ) -> Result<proto::ListCalendarResponse, ApiError> {
        let window = Window::new(time("time_min", r.time_min)?, time("time_max", r.time_max)?)?;
        let limit = calendar::limit(r.limit)?;
        let listing = self
            .calendars()
            .list(target, &r.calendar, window, limit)
            .await?;
        Ok(proto::ListCalendarResponse {
            events: listing.events.into_iter().map(event_to).collect(),
            truncated: listing.truncated,
            warnings: listing.warnings,
        })
    }

    pub(super) async fn new_event(
        &self,
        target: &Target,
        r: proto::CreateEventRequest,
    ) -> Result<proto::CreateEventResponse, ApiError> {
        let e = r
            .event
            .ok_or_else(|| FieldError::new("event", "is required"))?;
        let new = new_event(e, r.rrule)?;
        let stored = self.calendars().create(target, &r.calendar, new).await?;
        Ok(proto::CreateEventResponse {
            event: Some(event_to(stored)),
        })
    }
}
