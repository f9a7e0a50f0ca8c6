//! Signed statements about the log: a checkpoint ("node N's log had record S with hash H at
//! time T") and a prune anchor ("records up to S, the last with hash H, were exported and
//! removed"). Both are Ed25519-signed with the keyring's audit key over a fixed text form, so
//! whoever holds one (a witness, a security team) can later prove the log still extends it.
//!
//! Invariants: the signed text names the kind, so an anchor cannot pass for a checkpoint; the
//! local copies (`checkpoint.json`, `anchor.json`) are replaced atomically (write, sync,
//! rename, sync the folder).

use std::io::Write;
use std::path::Path;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::AuditError;
use crate::vault::{Vault, verify_signature};

/// What a signed statement says about the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The log had record `seq` with hash `hash`.
    Checkpoint,
    /// Records up to `seq` (hash `hash`) were pruned; the log continues after it.
    Pruned,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub kind: Kind,
    pub node: String,
    pub seq: u64,
    /// Hex chain hash of record `seq`.
    pub hash: String,
    pub time: DateTime<Utc>,
    /// Hex Ed25519 public key that signed it.
    pub public_key: String,
    /// Hex Ed25519 signature of [`Checkpoint::message`].
    pub signature: String,
}

impl Checkpoint {
    /// Signs a statement of `kind` with the vault's audit key.
    pub fn sign(
        vault: &Vault,
        kind: Kind,
        node: &str,
        seq: u64,
        hash: &str,
        time: DateTime<Utc>,
    ) -> Result<Checkpoint, AuditError> {
        let mut cp = Checkpoint {
            kind,
            node: node.to_string(),
            seq,
            hash: hash.to_string(),
            time,
            public_key: vault.audit_public_key().map_err(AuditError::Keys)?,
            signature: String::new(),
        };
        cp.signature = vault.audit_sign(&cp.message()).map_err(AuditError::Keys)?;
        Ok(cp)
    }

    /// The text that is signed.
    pub fn message(&self) -> Vec<u8> {
        let kind = match self.kind {
            Kind::Checkpoint => "checkpoint",
            Kind::Pruned => "pruned",
        };
        format!(
            "credbroker-audit/1\n{kind}\n{}\n{}\n{}\n{}\n",
            self.node,
            self.seq,
            self.hash,
            self.time
                .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
        )
        .into_bytes()
    }

    /// Whether the signature is good and made by `public_key` (hex).
    pub fn signed_by(&self, public_key: &str) -> bool {
        self.public_key == public_key
            && verify_signature(public_key, &self.message(), &self.signature)
    }

    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("checkpoint serializes")
    }

    /// Every checkpoint in `text`: one JSON object per line (a witness file), blank lines
    /// skipped.
    pub fn parse_lines(text: &str) -> Result<Vec<Checkpoint>, String> {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l)
                    .map_err(|e| format!("line {}: not a checkpoint: {e}", i + 1))
            })
            .collect()
    }

    /// Reads the one checkpoint kept at `path`, if the file exists.
    pub(crate) fn load(path: &Path) -> Result<Option<Checkpoint>, AuditError> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| AuditError::Damaged(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(AuditError::io(path, e)),
        }
    }

    /// Replaces the file at `path` with this checkpoint, durably.
    pub(crate) fn store(&self, path: &Path) -> Result<(), AuditError> {
        let tmp = path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(self.to_line().as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&tmp, path)?;
            super::segment::sync_dir(path.parent().unwrap_or(Path::new(".")))
        };
        write().map_err(|e| AuditError::io(path, e))
    }

    /// Appends this checkpoint as one line to a witness file, durably.
    pub(crate) fn witness(&self, path: &Path) -> Result<(), AuditError> {
        let append = || -> std::io::Result<()> {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            file.write_all(format!("{}\n", self.to_line()).as_bytes())?;
            file.sync_data()
        };
        append().map_err(|e| AuditError::io(path, e))
    }
}
