//! The keyring: data keys by term (1, 2, …). New writes use the current (highest) term; older
//! terms stay until a rewrap has moved every record off them.
//!
//! Beside the terms it holds the audit log's two keys, which never rotate with the terms (the
//! log is append-only, so nothing could rewrap it): the master from which each audit segment's
//! sealing key is derived, and the Ed25519 seed that signs the log's checkpoints.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use super::locked::LockedKey;

/// Encryptions allowed under one term: 2^32 minus a margin, the NIST bound for random 96-bit
/// nonces under one AES-GCM key.
pub const TERM_LIMIT: u64 = (1 << 32) - (1 << 20);

/// One 256-bit data key: locked in memory where allowed, wiped on drop and never printed.
#[derive(Clone)]
pub struct DataKey(LockedKey);

impl DataKey {
    /// Takes `bytes` and wipes them once they are in a locked page.
    pub(super) fn new(mut bytes: [u8; 32]) -> Self {
        let key = Self(LockedKey::new(&bytes));
        bytes.zeroize();
        key
    }

    pub fn bytes(&self) -> &[u8; 32] {
        self.0.bytes()
    }
}

#[derive(Serialize, Deserialize)]
struct StoredKeyring {
    current: u32,
    keys: BTreeMap<u32, String>,
    /// Absent in keyrings written before the audit log had keys of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    audit_seal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    audit_sign: Option<String>,
}

impl Drop for StoredKeyring {
    fn drop(&mut self) {
        for key in self.keys.values_mut() {
            key.zeroize();
        }
        for key in [&mut self.audit_seal, &mut self.audit_sign]
            .into_iter()
            .flatten()
        {
            key.zeroize();
        }
    }
}

/// The audit log's keys (see the module comment).
#[derive(Clone)]
pub struct AuditKeys {
    /// Master of the per-segment sealing keys.
    pub(super) seal: DataKey,
    /// Ed25519 seed of the checkpoint signing key.
    pub(super) sign: DataKey,
}

impl AuditKeys {
    fn generate() -> Self {
        Self {
            seal: DataKey::new(super::random_bytes()),
            sign: DataKey::new(super::random_bytes()),
        }
    }
}

#[derive(Clone)]
pub struct Keyring {
    current: u32,
    keys: BTreeMap<u32, DataKey>,
    audit: Option<AuditKeys>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("current", &self.current)
            .field("terms", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Keyring {
    /// A keyring with one fresh key, term 1.
    pub fn generate() -> Self {
        let mut keys = BTreeMap::new();
        keys.insert(1, DataKey::new(super::random_bytes()));
        Self {
            current: 1,
            keys,
            audit: Some(AuditKeys::generate()),
        }
    }

    /// The audit log's keys; `None` only in a keyring written before they existed, until
    /// [`Keyring::ensure_audit_keys`] has run.
    pub fn audit_keys(&self) -> Option<&AuditKeys> {
        self.audit.as_ref()
    }

    /// Generates the audit log's keys if this keyring lacks them; true if it did (the keyring
    /// must then be persisted before anything uses them).
    pub fn ensure_audit_keys(&mut self) -> bool {
        if self.audit.is_some() {
            return false;
        }
        self.audit = Some(AuditKeys::generate());
        true
    }

    pub fn current_term(&self) -> u32 {
        self.current
    }

    pub fn terms(&self) -> impl Iterator<Item = u32> + '_ {
        self.keys.keys().copied()
    }

    pub fn key(&self, term: u32) -> Option<&DataKey> {
        self.keys.get(&term)
    }

    /// Adds a fresh key as the new current term.
    pub fn add_term(&mut self) -> u32 {
        self.current += 1;
        self.keys
            .insert(self.current, DataKey::new(super::random_bytes()));
        self.current
    }

    /// Forgets a term that no record uses any more. The current term cannot be retired.
    pub fn retire(&mut self, term: u32) -> bool {
        term != self.current && self.keys.remove(&term).is_some()
    }

    pub(super) fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let stored = StoredKeyring {
            current: self.current,
            keys: self
                .keys
                .iter()
                .map(|(t, k)| (*t, hex::encode(k.bytes())))
                .collect(),
            audit_seal: self.audit.as_ref().map(|a| hex::encode(a.seal.bytes())),
            audit_sign: self.audit.as_ref().map(|a| hex::encode(a.sign.bytes())),
        };
        Zeroizing::new(serde_json::to_vec(&stored).expect("keyring serializes"))
    }

    pub(super) fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        let stored: StoredKeyring = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let mut keys = BTreeMap::new();
        for (term, hex_key) in &stored.keys {
            let mut key = [0u8; 32];
            hex::decode_to_slice(hex_key, &mut key)
                .map_err(|_| format!("key of term {term} is malformed"))?;
            keys.insert(*term, DataKey::new(key));
            key.zeroize();
        }
        if !keys.contains_key(&stored.current) {
            return Err(format!("current term {} has no key", stored.current));
        }
        let audit = match (&stored.audit_seal, &stored.audit_sign) {
            (Some(seal), Some(sign)) => Some(AuditKeys {
                seal: decode_key(seal, "the audit sealing key")?,
                sign: decode_key(sign, "the audit signing key")?,
            }),
            (None, None) => None,
            _ => return Err("the keyring holds only one of the two audit keys".into()),
        };
        Ok(Self {
            current: stored.current,
            keys,
            audit,
        })
    }
}

fn decode_key(hex_key: &str, what: &str) -> Result<DataKey, String> {
    let mut key = [0u8; 32];
    hex::decode_to_slice(hex_key, &mut key).map_err(|_| format!("{what} is malformed"))?;
    let locked = DataKey::new(key);
    key.zeroize();
    Ok(locked)
}
