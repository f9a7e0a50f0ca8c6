//! The envelope format of every stored value:
//!
//! ```text
//! version (1 byte = 1) | term (u32 BE) | nonce (12 bytes, random) | AES-256-GCM ciphertext + tag
//! ```
//!
//! The associated data is the record's full key followed by the term, so an envelope opens only
//! under the record it was written for, and its term byte cannot be swapped.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};

use super::VaultError;
use super::keyring::DataKey;

const VERSION: u8 = 1;
const HEADER_LEN: usize = 1 + 4 + 12;
const TAG_LEN: usize = 16;

/// Bytes an envelope adds to its plaintext.
pub const ENVELOPE_OVERHEAD: usize = HEADER_LEN + TAG_LEN;

/// A parsed (not yet authenticated) envelope.
pub struct Envelope<'a> {
    pub term: u32,
    nonce: [u8; 12],
    ciphertext: &'a [u8],
}

fn aad(record_key: &[u8], term: u32) -> Vec<u8> {
    let mut aad = Vec::with_capacity(record_key.len() + 4);
    aad.extend_from_slice(record_key);
    aad.extend_from_slice(&term.to_be_bytes());
    aad
}

fn cipher(key: &DataKey) -> Aes256Gcm {
    Aes256Gcm::new(&Key::<Aes256Gcm>::from(*key.bytes()))
}

impl<'a> Envelope<'a> {
    pub fn seal(
        term: u32,
        key: &DataKey,
        record_key: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, VaultError> {
        let nonce: [u8; 12] = super::random_bytes();
        let ciphertext = cipher(key)
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: plaintext,
                    aad: &aad(record_key, term),
                },
            )
            .map_err(|_| VaultError::Malformed {
                record: String::new(),
                why: "plaintext too long",
            })?;
        let mut out = Vec::with_capacity(HEADER_LEN + ciphertext.len());
        out.push(VERSION);
        out.extend_from_slice(&term.to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        Ok(out)
    }

    pub fn parse(bytes: &'a [u8]) -> Result<Self, &'static str> {
        if bytes.len() < HEADER_LEN + TAG_LEN {
            return Err("shorter than an envelope");
        }
        if bytes[0] != VERSION {
            return Err("unknown envelope version");
        }
        let term = u32::from_be_bytes(bytes[1..5].try_into().expect("4 bytes"));
        let nonce = bytes[5..17].try_into().expect("12 bytes");
        Ok(Self {
            term,
            nonce,
            ciphertext: &bytes[HEADER_LEN..],
        })
    }

    pub fn open(&self, key: &DataKey, record_key: &[u8]) -> Option<zeroize::Zeroizing<Vec<u8>>> {
        cipher(key)
            .decrypt(
                &Nonce::from(self.nonce),
                Payload {
                    msg: self.ciphertext,
                    aad: &aad(record_key, self.term),
                },
            )
            .ok()
            .map(zeroize::Zeroizing::new)
    }
}
