//! The key-encryption key: 32 bytes from a key file, or derived from a passphrase with argon2id.

use std::io::Write;
use std::path::{Path, PathBuf};

use argon2::{Algorithm, Argon2, Params, Version};
use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

use super::VaultError;
use super::header::Kdf;
use super::locked::LockedKey;

/// Fills an array from the thread-local CSPRNG (ChaCha, seeded and reseeded from the OS).
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    rand::fill(&mut out);
    out
}

/// Whether two bearer values are equal, in time that depends on their length only.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// Where the KEK comes from. Its Debug output never shows the passphrase.
#[derive(Debug, Clone)]
pub enum KeySource {
    KeyFile(PathBuf),
    Passphrase(SecretString),
}

impl KeySource {
    pub fn kind(&self) -> &'static str {
        match self {
            KeySource::KeyFile(_) => "key file",
            KeySource::Passphrase(_) => "passphrase",
        }
    }
}

/// The unlocked key-encryption key: locked in memory where allowed, wiped on drop.
pub struct Kek(LockedKey);

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek(<redacted>)")
    }
}

impl Kek {
    pub fn bytes(&self) -> &[u8; 32] {
        self.0.bytes()
    }

    /// Derives the KEK that `kdf` (from the store's header) describes.
    pub fn derive(source: &KeySource, kdf: &Kdf) -> Result<Self, VaultError> {
        match (source, kdf) {
            (KeySource::KeyFile(path), Kdf::KeyFile) => read_key_file(path),
            (KeySource::Passphrase(phrase), Kdf::Argon2id { salt, m_kib, t, p }) => {
                let salt = hex::decode(salt)
                    .map_err(|_| VaultError::HeaderCorrupt("argon2 salt is not hex".into()))?;
                argon2id(phrase, &salt, *m_kib, *t, *p)
            }
            (given, expected) => Err(VaultError::WrongKeyKind {
                expected: expected.kind(),
                given: given.kind(),
            }),
        }
    }
}

/// The argon2id cost accepted from a header, (m KiB, t, p): the floor DESIGN.md §3 sets…
const ARGON2_MIN: (u32, u32, u32) = (64 * 1024, 3, 1);
/// …and a ceiling no legitimate store uses.
const ARGON2_MAX: (u32, u32, u32) = (4 * 1024 * 1024, 64, 16);

fn argon2id(
    phrase: &SecretString,
    salt: &[u8],
    m_kib: u32,
    t: u32,
    p: u32,
) -> Result<Kek, VaultError> {
    if phrase.expose_secret().is_empty() {
        return Err(VaultError::EmptyPassphrase);
    }
    // The cost comes from the header, which sits unencrypted on disk: a lowered cost would make a
    // stolen store cheap to brute-force from then on (a passphrase change rewrites it), and a
    // raised one would make opening it exhaust the host's memory.
    if !(ARGON2_MIN.0..=ARGON2_MAX.0).contains(&m_kib)
        || !(ARGON2_MIN.1..=ARGON2_MAX.1).contains(&t)
        || !(ARGON2_MIN.2..=ARGON2_MAX.2).contains(&p)
    {
        return Err(VaultError::KdfOutOfRange { m_kib, t, p });
    }
    let params = Params::new(m_kib, t, p, Some(32)).map_err(|e| VaultError::Kdf(e.to_string()))?;
    let mut out = Zeroizing::new([0u8; 32]);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(phrase.expose_secret().as_bytes(), salt, out.as_mut())
        .map_err(|e| VaultError::Kdf(e.to_string()))?;
    Ok(Kek(LockedKey::new(&out)))
}

fn read_key_file(path: &Path) -> Result<Kek, VaultError> {
    let shown = path.display().to_string();
    let raw =
        Zeroizing::new(
            std::fs::read(path).map_err(|source| VaultError::KeyFileUnreadable {
                path: shown.clone(),
                source,
            })?,
        );
    let mut key = Zeroizing::new([0u8; 32]);
    if raw.len() == 32 {
        key.copy_from_slice(&raw);
        return Ok(Kek(LockedKey::new(&key)));
    }
    // Also accept 64 hex digits (e.g. a systemd credential written with a text editor).
    let text = std::str::from_utf8(&raw).unwrap_or("").trim();
    if text.len() == 64 && hex::decode_to_slice(text, key.as_mut()).is_ok() {
        return Ok(Kek(LockedKey::new(&key)));
    }
    Err(VaultError::KeyFileMalformed {
        path: shown,
        found: raw.len(),
    })
}

/// Writes a new key file of 32 random bytes, readable by its owner only. Refuses to overwrite.
pub fn generate_key_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let key = Zeroizing::new(random_bytes::<32>());
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(key.as_ref())?;
    file.sync_all()
}

/// A fresh KEK for a new store, with the header's description of how to derive it again.
pub(super) fn new_kek(
    source: &KeySource,
    kdf_params: (u32, u32, u32),
) -> Result<(Kek, Kdf), VaultError> {
    match source {
        KeySource::KeyFile(path) => Ok((read_key_file(path)?, Kdf::KeyFile)),
        KeySource::Passphrase(phrase) => {
            let salt: [u8; 16] = random_bytes();
            let (m_kib, t, p) = kdf_params;
            let kek = argon2id(phrase, &salt, m_kib, t, p)?;
            Ok((
                kek,
                Kdf::Argon2id {
                    salt: hex::encode(salt),
                    m_kib,
                    t,
                    p,
                },
            ))
        }
    }
}
