//! The access policy file: `Policy::parse` (TOML plus connector glob patterns) accepts or
//! refuses any text, and a parsed policy answers every check without panicking.

#![no_main]

use credbroker::policy::{Operation, Policy};
use libfuzzer_sys::fuzz_target;

const CALLERS: [&str; 3] = [
    "spiffe://credbroker.dev/admin",
    "spiffe://credbroker.dev/agent-runtime",
    "",
];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(policy) = Policy::parse(text) else {
        return;
    };
    for caller in CALLERS {
        let _ = policy.check_admin(caller, "acme");
        for op in Operation::ALL {
            let _ = policy.check(caller, op, "acme", "Google-Mail", "cn_1", "u1");
            let _ = policy.check(caller, op, "", "", "", "");
        }
    }
});
