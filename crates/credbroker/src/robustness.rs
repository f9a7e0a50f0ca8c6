//! Garbage in, errors out: seeded mutations of valid inputs through every parser that reads
//! untrusted bytes — envelopes, the configuration, the policy, the provider catalog's label
//! paths, iCalendar and MIME — must return (an error or a value), never panic. These seeded
//! mutations are the cheap, always-on check in `cargo test`; the coverage-guided cargo-fuzz
//! targets for the same parsers live in `fuzz/` (nightly only, see fuzz/README.md).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Mutations per input: flips, insertions, deletions, truncations and splices of random bytes.
const ROUNDS: usize = 3000;

fn mutate(rng: &mut StdRng, valid: &[u8]) -> Vec<u8> {
    let mut bytes = valid.to_vec();
    for _ in 0..rng.random_range(1..8) {
        let at = rng.random_range(0..=bytes.len());
        match rng.random_range(0..5) {
            0 if at < bytes.len() => bytes[at] ^= 1 << rng.random_range(0..8),
            1 => bytes.insert(at, rng.random()),
            2 if at < bytes.len() => {
                bytes.remove(at);
            }
            3 => bytes.truncate(at),
            _ => {
                let from = rng.random_range(0..=valid.len());
                let to = rng.random_range(from..=valid.len());
                let piece = valid[from..to].to_vec();
                bytes.splice(at..at, piece);
            }
        }
    }
    bytes
}

fn each_mutation(seed: u64, valid: &[u8], mut check: impl FnMut(&[u8])) {
    let mut rng = StdRng::seed_from_u64(seed);
    check(valid);
    for _ in 0..ROUNDS {
        check(&mutate(&mut rng, valid));
    }
}

#[test]
fn envelopes_never_panic() {
    let keyring = crate::vault::Keyring::generate();
    let vault = crate::vault::Vault::new(keyring, 0, Box::new(|_, _| Ok(())));
    let sealed = vault
        .seal(b"connections\0cn_1/u1", b"{\"api_key\":\"k\"}")
        .unwrap();
    each_mutation(1, &sealed, |bytes| {
        let _ = vault.open(b"connections\0cn_1/u1", bytes);
        let _ = crate::vault::Vault::term_of(bytes);
    });
}

/// The TOML example in a module's first comment, starting at the line that starts with `first`.
fn documented_toml(source: &str, first: &str) -> String {
    source
        .lines()
        .filter_map(|l| l.strip_prefix("//! "))
        .skip_while(|l| !l.starts_with(first))
        .take_while(|l| !l.starts_with("```"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn configuration_and_policy_never_panic() {
    let config = documented_toml(include_str!("config.rs"), "[store]");
    let policy = documented_toml(include_str!("policy/rules.rs"), "[[callers]]");
    // The unmutated inputs are valid, so the mutations start from the parsers' real paths.
    toml::from_str::<crate::config::Config>(&config).expect("the documented config parses");
    crate::policy::Policy::parse(&policy).expect("the documented policy parses");
    each_mutation(2, config.as_bytes(), |bytes| {
        let _ = toml::from_str::<crate::config::Config>(&String::from_utf8_lossy(bytes));
    });
    each_mutation(3, policy.as_bytes(), |bytes| {
        let _ = crate::policy::Policy::parse(&String::from_utf8_lossy(bytes));
    });
}

#[test]
fn calendar_data_never_panics() {
    let event = "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//x//y//EN\r\nBEGIN:VEVENT\r\n\
UID:a@b\r\nDTSTAMP:20260101T000000Z\r\nDTSTART;TZID=Europe/Paris:20260105T090000\r\n\
DTEND;TZID=Europe/Paris:20260105T100000\r\nRRULE:FREQ=WEEKLY;COUNT=10\r\n\
EXDATE;TZID=Europe/Paris:20260112T090000\r\nSUMMARY:Standup\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n";
    assert!(crate::calendar::ical::parse(event).is_ok());
    each_mutation(4, event.as_bytes(), |bytes| {
        let _ = crate::calendar::ical::parse(&String::from_utf8_lossy(bytes));
    });
}

#[test]
fn mail_never_panics() {
    let message = b"From: Alice <alice@x.test>\r\nTo: bob@x.test\r\nSubject: =?UTF-8?B?SMOpbGxv?=\r\n\
Message-ID: <1@x.test>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n\
--b\r\nContent-Type: text/plain; charset=iso-8859-1\r\n\r\nh\xe9llo\r\n--b\r\n\
Content-Type: application/pdf; name=a.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERi0=\r\n--b--\r\n";
    each_mutation(5, message, |bytes| {
        let _ = crate::mail::message::parse(bytes, true);
    });
}

#[test]
fn identity_documents_never_panic() {
    let doc = br#"{"ok":true,"team":{"name":"Acme"},"email":"a@x.test","portalId":42}"#;
    each_mutation(6, doc, |bytes| {
        if let Ok(value) = serde_json::from_slice::<serde_json::Value>(bytes) {
            for path in ["team.name", "email", "portalId", "app.name", ""] {
                let _ = crate::oauth::catalog::label_at(&value, path);
            }
        }
    });
}
