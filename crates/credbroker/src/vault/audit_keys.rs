//! The audit log's key use: sealing its segments and signing its checkpoints.
//!
//! - Each segment is sealed under its own key, `HMAC-SHA256(audit master, label ‖ salt)` with
//!   the segment's random salt, in the same [`Envelope`] format as every stored value. A
//!   segment holds far fewer batches than GCM's random-nonce bound, so no counter is needed,
//!   and the master never seals anything itself.
//! - Checkpoints are signed with Ed25519 from the keyring's seed; anyone holding the public
//!   key (printed by `credbroker status`) can check them without any secret.
//!
//! Invariant: neither key ever leaves this module; callers get a sealer or a signature.

use ed25519_dalek::{Signer as _, SigningKey, Verifier as _, VerifyingKey};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::envelope::Envelope;
use super::keyring::{AuditKeys, DataKey};
use super::{Vault, VaultError};

const SEGMENT_LABEL: &[u8] = b"credbroker/audit-segment/1/";

/// The envelope term audit batches carry: segment keys are not keyring terms.
const AUDIT_TERM: u32 = 0;

/// Seals and opens the batches of one audit segment.
#[derive(Clone)]
pub struct SegmentSealer {
    key: DataKey,
}

impl std::fmt::Debug for SegmentSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SegmentSealer")
    }
}

impl SegmentSealer {
    /// Seals `plaintext`, bound to `aad` (the batch's place in the log).
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, VaultError> {
        Envelope::seal(AUDIT_TERM, &self.key, aad, plaintext)
    }

    /// Opens a sealed batch; `None` if it was altered, moved or torn.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        let envelope = Envelope::parse(sealed).ok()?;
        if envelope.term != AUDIT_TERM {
            return None;
        }
        envelope.open(&self.key, aad)
    }
}

/// Checks a checkpoint signature against a hex Ed25519 public key.
pub fn verify_signature(public_key_hex: &str, message: &[u8], signature_hex: &str) -> bool {
    let (mut key, mut sig) = ([0u8; 32], [0u8; 64]);
    if hex::decode_to_slice(public_key_hex, &mut key).is_err()
        || hex::decode_to_slice(signature_hex, &mut sig).is_err()
    {
        return false;
    }
    let Ok(key) = VerifyingKey::from_bytes(&key) else {
        return false;
    };
    key.verify(message, &ed25519_dalek::Signature::from_bytes(&sig))
        .is_ok()
}

impl Vault {
    fn audit_keys(&self) -> Result<AuditKeys, VaultError> {
        self.keyring()
            .audit_keys()
            .cloned()
            .ok_or_else(|| VaultError::HeaderCorrupt("the keyring holds no audit keys".into()))
    }

    /// The sealer of the segment whose salt is `salt`.
    pub fn audit_sealer(&self, salt: &[u8; 32]) -> Result<SegmentSealer, VaultError> {
        let keys = self.audit_keys()?;
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(keys.seal.bytes())
            .expect("HMAC takes any key length");
        mac.update(SEGMENT_LABEL);
        mac.update(salt);
        let mut derived: [u8; 32] = mac.finalize().into_bytes().into();
        Ok(SegmentSealer {
            key: DataKey::new(std::mem::take(&mut derived)),
        })
    }

    /// The signing key (it wipes itself on drop).
    fn signing_key(&self) -> Result<SigningKey, VaultError> {
        Ok(SigningKey::from_bytes(self.audit_keys()?.sign.bytes()))
    }

    /// Hex of the Ed25519 public key checkpoints are signed with.
    pub fn audit_public_key(&self) -> Result<String, VaultError> {
        Ok(hex::encode(self.signing_key()?.verifying_key().as_bytes()))
    }

    /// Hex of the Ed25519 signature of `message` under the audit signing key.
    pub fn audit_sign(&self, message: &[u8]) -> Result<String, VaultError> {
        Ok(hex::encode(self.signing_key()?.sign(message).to_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vault::Keyring;

    fn new_vault() -> Vault {
        Vault::new(Keyring::generate(), 0, Box::new(|_, _| Ok(())))
    }

    #[test]
    fn segment_keys_differ_by_salt_and_bind_their_place() {
        let vault = new_vault();
        let a = vault.audit_sealer(&[1; 32]).unwrap();
        let b = vault.audit_sealer(&[2; 32]).unwrap();
        let sealed = a.seal(b"n/1", b"records").unwrap();
        assert_eq!(&*a.open(b"n/1", &sealed).unwrap(), b"records");
        assert!(a.open(b"n/2", &sealed).is_none(), "moved batch opens");
        assert!(
            b.open(b"n/1", &sealed).is_none(),
            "other segment's key opens"
        );
    }

    #[test]
    fn signatures_verify_with_the_public_key_only() {
        let vault = new_vault();
        let key = vault.audit_public_key().unwrap();
        let sig = vault.audit_sign(b"checkpoint").unwrap();
        assert!(verify_signature(&key, b"checkpoint", &sig));
        assert!(!verify_signature(&key, b"checkpoinT", &sig));
        let other = new_vault().audit_public_key().unwrap();
        assert!(!verify_signature(&other, b"checkpoint", &sig));
    }

    #[test]
    fn a_keyring_from_before_gets_audit_keys_once() {
        let old = format!(r#"{{"current":1,"keys":{{"1":"{}"}}}}"#, "11".repeat(32));
        let mut keyring = Keyring::from_bytes(old.as_bytes()).unwrap();
        assert!(keyring.audit_keys().is_none());
        assert!(keyring.ensure_audit_keys());
        assert!(!keyring.ensure_audit_keys(), "generated once");
        let again = Keyring::from_bytes(&keyring.to_bytes()).unwrap();
        let (a, b) = (
            keyring.audit_keys().unwrap().sign.bytes(),
            again.audit_keys().unwrap().sign.bytes(),
        );
        assert_eq!(a, b, "kept across a round trip");
    }
}
