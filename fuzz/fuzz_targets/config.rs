//! The daemon's configuration file: any text either deserializes into a `Config` or is refused,
//! and what the daemon derives from a parsed one right after (key source, timeouts, the caller
//! rate limiter) never panics either.

#![no_main]

use credbroker::config::Config;
use credbroker::policy::RateLimiter;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The daemon reads the file with read_to_string: invalid UTF-8 never reaches the parser.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = toml::from_str::<Config>(text) else {
        return;
    };
    let _ = config.upstream_timeout();
    // A passphrase file would be read from disk: the other key sources are pure (or read env).
    if config.store.passphrase_file.is_none() {
        let _ = config.store.key_source();
    }
    let limits = &config.limits;
    let limiter = RateLimiter::new(limits.caller_rate_per_sec, limits.caller_burst);
    let _ = limiter.allow("spiffe://x/a");
    let _ = limiter.allow("spiffe://x/a");
    let _ = std::time::Duration::from_millis(limits.rewrap_pause_ms);
});
