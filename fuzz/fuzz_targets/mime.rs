//! Incoming mail: `mail::message::parse` turns any bytes an IMAP server returns into a
//! `MailMessage` (possibly empty), never a panic, with and without the HTML body.

#![no_main]

use credbroker::mail::message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = message::parse(data, true);
    let _ = message::parse(data, false);
});
