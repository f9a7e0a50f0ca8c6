//! ListCalendar and CreateEvent: policy, request → [`crate::calendar`], errors → statuses.

use std::time::Duration;

use tonic::{Code, Response, Status};

use super::convert;
use super::proto;
use super::{ApiError, BrokerApi, Call};
use crate::calendar::{self, Attendee, CalendarError, Calendars, Event, NewEvent, Window};
use crate::model::ModelError;
use crate::policy::Operation;

impl From<CalendarError> for ApiError {
    fn from(e: CalendarError) -> Self {
        let message = e.to_string();
        let (code, reason) = match e {
            CalendarError::Invalid(f) => return ApiError::Model(ModelError::Invalid(f)),
            CalendarError::Credential(r) => return ApiError::Resolve(r),
            CalendarError::Model(m) => return ApiError::Model(m),
            CalendarError::Config(_) => (Code::FailedPrecondition, "CONFIG"),
            CalendarError::Unsupported(_) => (Code::Unimplemented, "UNSUPPORTED"),
            CalendarError::Unreachable { .. } | CalendarError::ServerError { .. } => {
                (Code::Unavailable, "UPSTREAM_UNAVAILABLE")
            }
            CalendarError::AuthRefused { .. } => {
                (Code::Unauthenticated, "UPSTREAM_UNAUTHENTICATED")
            }
            CalendarError::Forbidden { .. } => (Code::PermissionDenied, "UPSTREAM_FORBIDDEN"),
            CalendarError::NotFound(_) => (Code::NotFound, "NOT_FOUND"),
            CalendarError::Conflict(_) => (Code::AlreadyExists, "ALREADY_EXISTS"),
            CalendarError::Rejected { .. } => (Code::FailedPrecondition, "UPSTREAM_REJECTED"),
            CalendarError::Malformed { .. } => (Code::Internal, "UPSTREAM_MALFORMED"),
            CalendarError::Internal(_) => (Code::Internal, "INTERNAL"),
        };
        ApiError::status(code, reason, message)
    }
}

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
) -> Result<Option<chrono::DateTime<chrono::Utc>>, ApiError> {
    Ok(t.map(|t| convert::from_timestamp(field, &t)).transpose()?)
}

impl BrokerApi {
    fn calendars(&self) -> Calendars<'_> {
        Calendars {
            credentials: self.0.resolver.credentials(),
            timeout: Duration::from_secs(self.0.limits.upstream_timeout_secs.max(1)),
        }
    }

    pub(super) async fn list_calendar_call(
        &self,
        mut call: Call,
        r: proto::ListCalendarRequest,
    ) -> Result<Response<proto::ListCalendarResponse>, Status> {
        let result = async {
            let target = self
                .target(&mut call, Operation::ListCalendar, r.connection)
                .await?;
            let window = Window::new(time("time_min", r.time_min)?, time("time_max", r.time_max)?)?;
            let limit = calendar::limit(r.limit)?;
            let listing = self
                .calendars()
                .list(&target, &r.calendar, window, limit)
                .await?;
            Ok(proto::ListCalendarResponse {
                events: listing.events.into_iter().map(event_to).collect(),
                truncated: listing.truncated,
                warnings: listing.warnings,
            })
        }
        .await;
        self.0.finish(call, result).await
    }

    pub(super) async fn create_event_call(
        &self,
        mut call: Call,
        r: proto::CreateEventRequest,
    ) -> Result<Response<proto::CreateEventResponse>, Status> {
        let result = async {
            let target = self
                .target(&mut call, Operation::CreateEvent, r.connection)
                .await?;
            let e = r
                .event
                .ok_or_else(|| crate::model::FieldError::new("event", "is required"))?;
            let new = NewEvent {
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
                rrule: r.rrule,
            };
            let stored = self.calendars().create(&target, &r.calendar, new).await?;
            Ok(proto::CreateEventResponse {
                event: Some(event_to(stored)),
            })
        }
        .await;
        self.0.finish(call, result).await
    }
}
