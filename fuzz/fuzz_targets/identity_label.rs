//! Provider identity documents (JSON from a userinfo endpoint) read through the catalog's dotted
//! label paths. The first line of the input is the path, the rest the document.

#![no_main]

use credbroker::oauth::catalog::label_at;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (path, document) = match data.iter().position(|b| *b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (&b"team.name"[..], data),
    };
    let Ok(path) = std::str::from_utf8(path) else {
        return;
    };
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(document) else {
        return;
    };
    for path in [path, "team.name", "email", "portalId", ""] {
        let _ = label_at(&value, path);
    }
});
