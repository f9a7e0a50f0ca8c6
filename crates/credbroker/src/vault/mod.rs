//! The vault owns every key: it unlocks the key-encryption key (KEK) from a key file or a
//! passphrase, unwraps the keyring of data keys, and seals and opens the AES-256-GCM envelopes
//! that every stored value travels in. Nothing outside this module sees a data key.
//!
//! Invariants:
//! - the KEK only wraps the keyring (and the header's check value), never records;
//! - every envelope is bound to its record's full key and its term (AAD), so a ciphertext moved
//!   to another record, or re-labelled with another term, fails to open;
//! - encryptions under one term are counted and refused past [`keyring::TERM_LIMIT`], well before
//!   GCM's 2^32 random-nonce bound — counted across every process sharing the store: each
//!   reserves ranges of the count from one shared counter ([`Vault::with_ranges`]), so the
//!   bound on random 96-bit nonces under one key holds for all replicas together.

mod audit_keys;
mod envelope;
mod header;
mod kek;
mod keyring;
mod locked;

pub use audit_keys::{SegmentSealer, verify_signature};
pub use envelope::{ENVELOPE_OVERHEAD, Envelope};
pub use header::{ARGON2_PARAMS, FORMAT_VERSION, Header, Kdf};
pub use kek::{Kek, KeySource, constant_time_eq, generate_key_file, random_bytes};
pub use keyring::{AuditKeys, Keyring, TERM_LIMIT};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use zeroize::Zeroizing;

/// Everything that can go wrong unlocking or using keys. Messages name the problem and what to
/// do; none contains key material.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("cannot read key file {path}: {source}")]
    KeyFileUnreadable {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "key file {path} must hold exactly 32 bytes (raw) or 64 hex digits, found {found} bytes"
    )]
    KeyFileMalformed { path: String, found: usize },
    #[error("the key file or passphrase does not unlock this store (wrong key)")]
    WrongKey,
    #[error("this store is unlocked with a {expected}, but a {given} was given")]
    WrongKeyKind {
        expected: &'static str,
        given: &'static str,
    },
    #[error("the passphrase is empty")]
    EmptyPassphrase,
    #[error(
        "store format version {found} is newer than this credbroker supports ({supported}); upgrade credbroker"
    )]
    NewerFormat { found: u32, supported: u32 },
    #[error("the store header is damaged: {0}")]
    HeaderCorrupt(String),
    #[error(
        "record {record} failed authentication: it was tampered with or moved from another record"
    )]
    Tampered { record: String },
    #[error("record {record} is not a valid envelope: {why}")]
    Malformed { record: String, why: &'static str },
    #[error("record {record} is sealed under key term {term}, which this keyring does not hold")]
    UnknownTerm { record: String, term: u32 },
    #[error(
        "key term {term} has reached its encryption limit; rotate the key (credbroker rotate-key)"
    )]
    TermExhausted { term: u32 },
    #[error("key derivation failed: {0}")]
    Kdf(String),
    #[error(
        "the store header asks for argon2id cost m={m_kib} KiB, t={t}, p={p}, outside the accepted range (m 64 MiB–4 GiB, t 3–64, p 1–16): the header was altered"
    )]
    KdfOutOfRange { m_kib: u32, t: u32, p: u32 },
    #[error("cannot reserve encryptions: {0}")]
    Reservation(String),
}

/// Persists how many encryptions of a term may be used, before they are used, so that a crash
/// never lets the counter go back (see [`Vault::seal`]): called with the absolute count.
pub type ReservationSink = Box<dyn Fn(u32, u64) -> Result<(), String> + Send + Sync>;

/// Reserves `count` more encryptions of a term, atomically across every process sharing the
/// store, and returns the new total: this vault may then use the range `total - count ..
/// total`, which no other process ever gets.
pub type RangeSink = Box<dyn Fn(u32, u64) -> Result<u64, String> + Send + Sync>;

/// The range of the current term's encryption count this vault may use: `next + 1 ..= end`.
#[derive(Default)]
struct Range {
    next: u64,
    end: u64,
}

/// How many encryptions one reservation covers: one durable header write per 64 Ki writes.
const RESERVATION_BLOCK: u64 = 1 << 16;

/// Encryptions under one term after which the store rotates on its own: half of
/// [`TERM_LIMIT`], so rotation (and a rewrap) happens long before the limit refuses writes.
pub const AUTO_ROTATE_AT: u64 = 1 << 31;

/// The unlocked keyring plus the counter of encryptions under its current term.
pub struct Vault {
    keyring: RwLock<Keyring>,
    /// Encryptions under the current term that call for a rotation ([`Vault::needs_rotation`]).
    rotate_at: AtomicU64,
    /// The highest encryption number this vault used under the current term: every process's
    /// encryptions count, since ranges are handed out in order across processes.
    used: AtomicU64,
    /// The range reserved and not used up yet; a seal past its end reserves another first.
    reserved: Mutex<Range>,
    sink: RangeSink,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("current_term", &self.current_term())
            .field("used", &self.used.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Vault {
    /// `reserved` is the last persisted reservation of the current term: counting restarts there,
    /// so encryptions done before a crash are never counted twice as unused. For a vault alone
    /// on its store: `sink` persists absolute counts this vault alone computes.
    pub fn new(keyring: Keyring, reserved: u64, sink: ReservationSink) -> Self {
        let counted = Mutex::new((keyring.current_term(), reserved));
        Self::with_ranges(
            keyring,
            reserved,
            Box::new(move |term, count| {
                let mut counted = counted.lock().unwrap_or_else(|p| p.into_inner());
                if counted.0 != term {
                    *counted = (term, 0);
                }
                let total = counted.1.saturating_add(count);
                sink(term, total)?;
                counted.1 = total;
                Ok(total)
            }),
        )
    }

    /// A vault whose encryptions are counted by `sink` across every process sharing the store;
    /// `reserved` is the term's count when it opened (where [`Vault::encryptions`] starts).
    pub fn with_ranges(keyring: Keyring, reserved: u64, sink: RangeSink) -> Self {
        Self {
            keyring: RwLock::new(keyring),
            rotate_at: AtomicU64::new(AUTO_ROTATE_AT),
            used: AtomicU64::new(reserved),
            reserved: Mutex::new(Range::default()),
            sink,
        }
    }

    fn keyring(&self) -> std::sync::RwLockReadGuard<'_, Keyring> {
        self.keyring.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn current_term(&self) -> u32 {
        self.keyring().current_term()
    }

    /// Every term the keyring holds, oldest first.
    pub fn terms(&self) -> Vec<u32> {
        self.keyring().terms().collect()
    }

    /// Whether the current term has been used enough to rotate.
    pub fn needs_rotation(&self) -> bool {
        self.encryptions() >= self.rotate_at.load(Ordering::Relaxed)
    }

    /// Test hook: rotate automatically after `n` encryptions under one term.
    #[doc(hidden)]
    pub fn set_rotate_at(&self, n: u64) {
        self.rotate_at.store(n.min(TERM_LIMIT), Ordering::Relaxed);
    }

    /// Adds a term and makes it current. `persist` must make the new keyring durable (the
    /// wrapped header) before it returns: only then do seals use the new term.
    pub fn rotate<E>(&self, persist: impl FnOnce(&Keyring) -> Result<(), E>) -> Result<u32, E> {
        let mut keyring = self.keyring.write().unwrap_or_else(|p| p.into_inner());
        let mut next = keyring.clone();
        let term = next.add_term();
        persist(&next)?;
        *keyring = next;
        self.restart_count();
        Ok(term)
    }

    /// Counting restarts for a new term; its reservations start at zero (another process's
    /// first reservation of the term included).
    fn restart_count(&self) {
        let mut reserved = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        *reserved = Range::default();
        self.used.store(0, Ordering::Relaxed);
    }

    /// Takes `keyring` as another process persisted it (a rotation or a retirement there).
    /// Returns whether the current term changed.
    pub fn adopt(&self, keyring: Keyring) -> bool {
        let mut held = self.keyring.write().unwrap_or_else(|p| p.into_inner());
        let moved = held.current_term() != keyring.current_term();
        *held = keyring;
        if moved {
            self.restart_count();
        }
        moved
    }

    /// Forgets `terms` (never the current one) once `persist` has made the smaller keyring
    /// durable. Returns the terms actually removed.
    pub fn retire<E>(
        &self,
        terms: &[u32],
        persist: impl FnOnce(&Keyring) -> Result<(), E>,
    ) -> Result<Vec<u32>, E> {
        let mut keyring = self.keyring.write().unwrap_or_else(|p| p.into_inner());
        let mut next = keyring.clone();
        let removed: Vec<u32> = terms.iter().copied().filter(|t| next.retire(*t)).collect();
        if removed.is_empty() {
            return Ok(removed);
        }
        persist(&next)?;
        *keyring = next;
        Ok(removed)
    }

    /// Encryptions counted under the current term.
    pub fn encryptions(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Seals `plaintext` for the record named `record_key`.
    pub fn seal(&self, record_key: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, VaultError> {
        let keyring = self.keyring();
        let term = keyring.current_term();
        let n = self.take_number(term)?;
        if n > TERM_LIMIT {
            return Err(VaultError::TermExhausted { term });
        }
        Envelope::seal(
            term,
            keyring.key(term).expect("current term is held"),
            record_key,
            plaintext,
        )
    }

    /// The term an envelope was sealed under, without opening it.
    pub fn term_of(sealed: &[u8]) -> Option<u32> {
        Envelope::parse(sealed).ok().map(|e| e.term)
    }

    /// Opens an envelope read from the record named `record_key`.
    pub fn open(&self, record_key: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        let record = || String::from_utf8_lossy(record_key).replace('\0', "/");
        let envelope = Envelope::parse(sealed).map_err(|why| VaultError::Malformed {
            record: record(),
            why,
        })?;
        let keyring = self.keyring();
        let key = keyring
            .key(envelope.term)
            .ok_or_else(|| VaultError::UnknownTerm {
                record: record(),
                term: envelope.term,
            })?;
        envelope
            .open(key, record_key)
            .ok_or_else(|| VaultError::Tampered { record: record() })
    }

    /// The number of this encryption under `term`, counted across every process: the next of
    /// this vault's reserved range, reserving another range (durably) when it is used up.
    fn take_number(&self, term: u32) -> Result<u64, VaultError> {
        let mut range = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        if range.next >= range.end {
            if range.end >= TERM_LIMIT {
                return Err(VaultError::TermExhausted { term });
            }
            let end = (self.sink)(term, RESERVATION_BLOCK).map_err(VaultError::Reservation)?;
            *range = Range {
                next: end.saturating_sub(RESERVATION_BLOCK),
                end,
            };
        }
        range.next += 1;
        self.used.fetch_max(range.next, Ordering::Relaxed);
        Ok(range.next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn vault_with(sink_log: Arc<Mutex<Vec<u64>>>) -> Vault {
        let keyring = Keyring::generate();
        let log = sink_log.clone();
        Vault::new(
            keyring,
            0,
            Box::new(move |_, n| {
                log.lock().unwrap().push(n);
                Ok(())
            }),
        )
    }

    #[test]
    fn seal_open_round_trip_and_binding() {
        let vault = vault_with(Arc::default());
        let sealed = vault.seal(b"connectors\0a", b"hello").unwrap();
        assert_eq!(&*vault.open(b"connectors\0a", &sealed).unwrap(), b"hello");
        assert!(matches!(
            vault.open(b"connectors\0b", &sealed),
            Err(VaultError::Tampered { .. })
        ));
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let vault = vault_with(Arc::default());
        let sealed = vault.seal(b"t\0k", b"canary-secret-value").unwrap();
        for i in 0..sealed.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = sealed.clone();
                bad[i] ^= bit;
                assert!(
                    vault.open(b"t\0k", &bad).is_err(),
                    "flip at byte {i} went unnoticed"
                );
            }
        }
        assert!(vault.open(b"t\0k", &sealed[..sealed.len() - 1]).is_err());
        assert!(vault.open(b"t\0k", &[]).is_err());
    }

    #[test]
    fn reservations_are_persisted_before_use() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let vault = vault_with(log.clone());
        for _ in 0..(RESERVATION_BLOCK + 2) {
            vault.seal(b"t\0k", b"x").unwrap();
        }
        let log = log.lock().unwrap();
        assert_eq!(log.as_slice(), &[RESERVATION_BLOCK, 2 * RESERVATION_BLOCK]);
    }

    /// Three vaults on one shared counter (as three replicas on one database): the numbers they
    /// use never meet, and each one's count includes the others' reservations.
    #[test]
    fn vaults_sharing_a_counter_use_disjoint_ranges() {
        let total = Arc::new(Mutex::new(0u64));
        let keyring = Keyring::generate();
        let vaults: Vec<Vault> = (0..3)
            .map(|_| {
                let total = total.clone();
                Vault::with_ranges(
                    keyring.clone(),
                    0,
                    Box::new(move |_, count| {
                        let mut total = total.lock().unwrap();
                        *total += count;
                        Ok(*total)
                    }),
                )
            })
            .collect();
        let term = keyring.current_term();
        let mut seen = std::collections::HashSet::new();
        for round in 0..(RESERVATION_BLOCK + 10) {
            for vault in &vaults {
                let n = vault.take_number(term).unwrap();
                assert!(seen.insert(n), "number {n} used twice (round {round})");
            }
        }
        assert_eq!(*total.lock().unwrap(), 6 * RESERVATION_BLOCK);
        assert!(
            vaults
                .iter()
                .any(|v| v.encryptions() > 4 * RESERVATION_BLOCK)
        );
    }

    #[test]
    fn failed_reservation_refuses_to_seal() {
        let vault = Vault::new(
            Keyring::generate(),
            0,
            Box::new(|_, _| Err("disk full".into())),
        );
        assert!(matches!(
            vault.seal(b"t\0k", b"x"),
            Err(VaultError::Reservation(_))
        ));
    }
}
