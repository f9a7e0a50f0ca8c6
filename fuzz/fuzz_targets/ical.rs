//! Calendar object resources as a CalDAV server returns them: `ical::parse`, then what
//! ListCalendar does with the result (recurrence expansion over a month) and what CreateEvent
//! reads back (`as_stored`). Any text gives events or a typed error, never a panic.

#![no_main]

use chrono::{TimeZone, Utc};
use credbroker::calendar::Window;
use credbroker::calendar::{expand, ical};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(components) = ical::parse(&text) else {
        return;
    };
    let window = Window::new(
        Some(Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()),
        Some(Utc.with_ymd_and_hms(2026, 2, 1, 0, 0, 0).unwrap()),
    )
    .expect("a valid window");
    let _ = expand::expand(&components, "/cal/", &window);
    let _ = expand::as_stored(&components, "/cal/");
});
