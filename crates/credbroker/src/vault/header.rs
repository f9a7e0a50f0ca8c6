//! The store header: format version, how to derive the KEK, a check value that tells a wrong key
//! from a damaged store, and the keyring wrapped under the KEK. It is stored in the clear (it
//! holds nothing secret) so that a store can be unlocked before anything else is read.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use serde::{Deserialize, Serialize};

use super::kek::{Kek, KeySource, new_kek};
use super::keyring::Keyring;
use super::{VaultError, random_bytes};

/// The on-disk format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// argon2id cost for passphrases: 64 MiB, 3 passes, 1 lane (the floor DESIGN.md §3 sets).
pub const ARGON2_PARAMS: (u32, u32, u32) = (64 * 1024, 3, 1);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Kdf {
    KeyFile,
    Argon2id {
        salt: String,
        m_kib: u32,
        t: u32,
        p: u32,
    },
}

impl Kdf {
    pub fn kind(&self) -> &'static str {
        match self {
            Kdf::KeyFile => "key file",
            Kdf::Argon2id { .. } => "passphrase",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Header {
    pub format_version: u32,
    /// Random id of this store, bound into the check value and the keyring's AAD.
    pub store_id: String,
    pub kdf: Kdf,
    /// nonce ‖ AES-GCM(KEK, 32 zero bytes): opens only under the right KEK.
    check: String,
    /// nonce ‖ AES-GCM(KEK, keyring).
    keyring: String,
}

fn seal(kek: &Kek, aad: &[u8], plaintext: &[u8]) -> String {
    let nonce: [u8; 12] = random_bytes();
    let cipher = Aes256Gcm::new(&Key::<Aes256Gcm>::from(*kek.bytes()));
    let ct = cipher
        .encrypt(
            &Nonce::from(nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .expect("small plaintext seals");
    hex::encode([&nonce[..], &ct].concat())
}

fn open(kek: &Kek, aad: &[u8], sealed_hex: &str) -> Option<zeroize::Zeroizing<Vec<u8>>> {
    let sealed = hex::decode(sealed_hex).ok()?;
    if sealed.len() < 12 + 16 {
        return None;
    }
    let nonce: [u8; 12] = sealed[..12].try_into().ok()?;
    let cipher = Aes256Gcm::new(&Key::<Aes256Gcm>::from(*kek.bytes()));
    cipher
        .decrypt(
            &Nonce::from(nonce),
            Payload {
                msg: &sealed[12..],
                aad,
            },
        )
        .ok()
        .map(zeroize::Zeroizing::new)
}

impl Header {
    /// A header for a new store, with a fresh keyring.
    pub fn create(source: &KeySource) -> Result<(Header, Keyring), VaultError> {
        Self::create_with_params(source, ARGON2_PARAMS)
    }

    /// As [`Header::create`], with explicit argon2id cost (tests use the floor; nothing lower is
    /// accepted for passphrases).
    pub fn create_with_params(
        source: &KeySource,
        params: (u32, u32, u32),
    ) -> Result<(Header, Keyring), VaultError> {
        let (kek, kdf) = new_kek(source, params)?;
        let keyring = Keyring::generate();
        let store_id = hex::encode(random_bytes::<16>());
        let header = Header::seal_keyring(&kek, kdf, store_id, &keyring);
        Ok((header, keyring))
    }

    fn seal_keyring(kek: &Kek, kdf: Kdf, store_id: String, keyring: &Keyring) -> Header {
        let check = seal(
            kek,
            format!("credbroker/check/{store_id}").as_bytes(),
            &[0u8; 32],
        );
        let wrapped = seal(
            kek,
            format!("credbroker/keyring/{store_id}").as_bytes(),
            &keyring.to_bytes(),
        );
        Header {
            format_version: FORMAT_VERSION,
            store_id,
            kdf,
            check,
            keyring: wrapped,
        }
    }

    /// The same header with `keyring` wrapped again under the same KEK (after a rotation).
    pub fn with_keyring(
        &self,
        source: &KeySource,
        keyring: &Keyring,
    ) -> Result<Header, VaultError> {
        let kek = self.check_key(source)?;
        Ok(Header::seal_keyring(
            &kek,
            self.kdf.clone(),
            self.store_id.clone(),
            keyring,
        ))
    }

    /// The same header with `keyring` wrapped again under an already unlocked KEK.
    pub fn with_keyring_kek(&self, kek: &Kek, keyring: &Keyring) -> Header {
        Header::seal_keyring(kek, self.kdf.clone(), self.store_id.clone(), keyring)
    }

    /// Unlocks the keyring and keeps the KEK, for a daemon that will rewrap the keyring later
    /// (key rotation) without asking for the key again.
    pub fn unlock_with_kek(&self, source: &KeySource) -> Result<(Kek, Keyring), VaultError> {
        let kek = self.check_key(source)?;
        let keyring = self.open_keyring(&kek)?;
        Ok((kek, keyring))
    }

    /// The same keyring wrapped under a new key source (passphrase change, key file replacement).
    pub fn rewrapped(&self, old: &KeySource, new: &KeySource) -> Result<Header, VaultError> {
        let keyring = self.unlock(old)?;
        let (kek, kdf) = new_kek(new, ARGON2_PARAMS)?;
        Ok(Header::seal_keyring(
            &kek,
            kdf,
            self.store_id.clone(),
            &keyring,
        ))
    }

    pub fn check_version(&self) -> Result<(), VaultError> {
        if self.format_version > FORMAT_VERSION {
            return Err(VaultError::NewerFormat {
                found: self.format_version,
                supported: FORMAT_VERSION,
            });
        }
        Ok(())
    }

    fn check_key(&self, source: &KeySource) -> Result<Kek, VaultError> {
        self.check_version()?;
        let kek = Kek::derive(source, &self.kdf)?;
        open(
            &kek,
            format!("credbroker/check/{}", self.store_id).as_bytes(),
            &self.check,
        )
        .ok_or(VaultError::WrongKey)?;
        Ok(kek)
    }

    /// Unlocks the keyring: a wrong key is reported as such, a damaged keyring as damage.
    pub fn unlock(&self, source: &KeySource) -> Result<Keyring, VaultError> {
        let kek = self.check_key(source)?;
        self.open_keyring(&kek)
    }

    /// The keyring this header wraps, under an already unlocked KEK (a replica taking a
    /// rotation another one persisted).
    pub fn open_keyring(&self, kek: &Kek) -> Result<Keyring, VaultError> {
        let bytes = open(
            kek,
            format!("credbroker/keyring/{}", self.store_id).as_bytes(),
            &self.keyring,
        )
        .ok_or_else(|| {
            VaultError::HeaderCorrupt("the wrapped keyring fails authentication".into())
        })?;
        Keyring::from_bytes(&bytes).map_err(VaultError::HeaderCorrupt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    const FAST: (u32, u32, u32) = (64 * 1024, 3, 1);

    #[test]
    fn passphrase_unlocks_and_wrong_one_is_named() {
        let good = KeySource::Passphrase(SecretString::from("correct horse"));
        let (header, keyring) = Header::create_with_params(&good, FAST).unwrap();
        assert_eq!(
            header.unlock(&good).unwrap().current_term(),
            keyring.current_term()
        );
        let bad = KeySource::Passphrase(SecretString::from("wrong horse"));
        assert!(matches!(header.unlock(&bad), Err(VaultError::WrongKey)));
    }

    #[test]
    fn damaged_keyring_is_not_called_a_wrong_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        super::super::generate_key_file(&path).unwrap();
        let source = KeySource::KeyFile(path);
        let (mut header, _) = Header::create(&source).unwrap();
        let mut bytes = hex::decode(&header.keyring).unwrap();
        bytes[20] ^= 1;
        header.keyring = hex::encode(bytes);
        assert!(matches!(
            header.unlock(&source),
            Err(VaultError::HeaderCorrupt(_))
        ));
    }

    #[test]
    fn newer_format_is_refused_by_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        super::super::generate_key_file(&path).unwrap();
        let source = KeySource::KeyFile(path);
        let (mut header, _) = Header::create(&source).unwrap();
        header.format_version = FORMAT_VERSION + 1;
        assert!(matches!(
            header.unlock(&source),
            Err(VaultError::NewerFormat {
                found: 2,
                supported: 1
            })
        ));
    }

    #[test]
    fn a_header_whose_argon2_cost_was_lowered_or_raised_is_refused() {
        let good = KeySource::Passphrase(SecretString::from("correct horse"));
        let (header, _) = Header::create_with_params(&good, FAST).unwrap();
        for (m, t, p) in [
            (8, 1, 1),
            (64 * 1024, 1, 1),
            (u32::MAX, 3, 1),
            (64 * 1024, 3, 255),
        ] {
            let mut altered = header.clone();
            let Kdf::Argon2id {
                m_kib,
                t: passes,
                p: lanes,
                ..
            } = &mut altered.kdf
            else {
                panic!("a passphrase store uses argon2id");
            };
            (*m_kib, *passes, *lanes) = (m, t, p);
            assert!(
                matches!(altered.unlock(&good), Err(VaultError::KdfOutOfRange { .. })),
                "cost ({m}, {t}, {p}) accepted"
            );
        }
    }
}
