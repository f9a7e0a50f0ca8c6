//! Envelopes read back from the store: `Vault::term_of` and `Vault::open` on arbitrary bytes
//! return an error, never panic, and nothing forged opens. The input is also sealed as a
//! plaintext: it must open back to itself, and not with one bit flipped or under another record.

#![no_main]

use std::sync::LazyLock;

use credbroker::vault::{Keyring, Vault};
use libfuzzer_sys::fuzz_target;

const RECORD: &[u8] = b"connections\0cn_1/u1";

static VAULT: LazyLock<Vault> =
    LazyLock::new(|| Vault::new(Keyring::generate(), 0, Box::new(|_, _| Ok(()))));

fuzz_target!(|data: &[u8]| {
    let vault = &*VAULT;
    let _ = Vault::term_of(data);
    assert!(
        vault.open(RECORD, data).is_err(),
        "bytes not sealed by this vault opened"
    );

    let sealed = vault.seal(RECORD, data).expect("seal");
    assert_eq!(Vault::term_of(&sealed), Some(vault.current_term()));
    assert_eq!(&vault.open(RECORD, &sealed).expect("round trip")[..], data);
    assert!(vault.open(b"connections\0cn_1/u2", &sealed).is_err());
    let mut tampered = sealed.clone();
    let at = data.first().map_or(0, |b| *b as usize) % tampered.len();
    tampered[at] ^= 1 << (data.len() % 8);
    assert!(
        vault.open(RECORD, &tampered).is_err(),
        "a flipped bit opened"
    );
});
