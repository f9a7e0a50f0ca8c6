//! Verifying the logs of several replicas together (`credbroker audit verify --node-log DIR`,
//! once per replica): replicas sharing a store each write a log of their own, named by their
//! node id (`[audit] node`, by default the hostname).
//!
//! Each log is verified as [`verify_against`] does (its chain, its own latest checkpoint), and
//! against the given checkpoints that name its node. The set holds together only if: every log
//! names one node, no node appears twice (two replicas writing under one id would fork its
//! chain), and every given checkpoint names a node whose log was given (a missing log is named,
//! not skipped).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use super::checkpoint::Checkpoint;
use super::log::{ANCHOR_FILE, CHECKPOINT_FILE};
use super::segment::{SegmentHeader, list_segments};
use super::verify::{VerifyError, VerifySummary, verify_against};
use crate::store::Store;

/// One node's log, verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSummary {
    pub node: String,
    pub dir: PathBuf,
    pub summary: VerifySummary,
}

/// Why a set of node logs does not verify, naming the log or node.
#[derive(Debug, thiserror::Error)]
pub enum NodesError {
    #[error("the audit log of node {node:?} in {dir}: {source}")]
    Log {
        node: String,
        dir: String,
        #[source]
        source: VerifyError,
    },
    #[error("{dir} holds no audit log (no segment, checkpoint or anchor names a node)")]
    NoLog { dir: String },
    #[error("{dir} cannot be read: {why}")]
    Unreadable { dir: String, why: String },
    #[error(
        "node {node:?} has two logs, {first} and {second}: every replica needs its own node id"
    )]
    SameNode {
        node: String,
        first: String,
        second: String,
    },
    #[error("a checkpoint names node {node:?} (record {seq}), but no log of that node was given")]
    MissingLog { node: String, seq: u64 },
}

/// The node a log's folder belongs to: its newest segment's header, else its checkpoint or
/// its prune anchor.
pub fn node_of(dir: &Path) -> Result<String, NodesError> {
    let shown = || dir.display().to_string();
    let unreadable = |why: String| NodesError::Unreadable { dir: shown(), why };
    let segments = match list_segments(dir) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(unreadable(e.to_string())),
    };
    if let Some((_, newest)) = segments.last() {
        let file = File::open(newest).map_err(|e| unreadable(e.to_string()))?;
        return SegmentHeader::read(&file)
            .map(|h| h.node)
            .map_err(|why| unreadable(format!("{}: {why}", newest.display())));
    }
    for name in [CHECKPOINT_FILE, ANCHOR_FILE] {
        let found = Checkpoint::load(&dir.join(name)).map_err(|e| unreadable(e.to_string()))?;
        if let Some(cp) = found {
            return Ok(cp.node);
        }
    }
    Err(NodesError::NoLog { dir: shown() })
}

/// Verifies every log in `dirs` and the `checkpoints` (of any of their nodes) together.
pub async fn verify_nodes(
    store: &Store,
    dirs: &[PathBuf],
    checkpoints: &[Checkpoint],
) -> Result<Vec<NodeSummary>, NodesError> {
    let mut nodes: BTreeMap<String, PathBuf> = BTreeMap::new();
    for dir in dirs {
        let node = node_of(dir)?;
        if let Some(first) = nodes.insert(node.clone(), dir.clone()) {
            return Err(NodesError::SameNode {
                node,
                first: first.display().to_string(),
                second: dir.display().to_string(),
            });
        }
    }
    if let Some(cp) = checkpoints.iter().find(|cp| !nodes.contains_key(&cp.node)) {
        return Err(NodesError::MissingLog {
            node: cp.node.clone(),
            seq: cp.seq,
        });
    }
    let mut verified = Vec::with_capacity(nodes.len());
    for (node, dir) in nodes {
        let own: Vec<Checkpoint> = checkpoints
            .iter()
            .filter(|cp| cp.node == node)
            .cloned()
            .collect();
        let summary =
            verify_against(store, &dir, &own)
                .await
                .map_err(|source| NodesError::Log {
                    node: node.clone(),
                    dir: dir.display().to_string(),
                    source,
                })?;
        verified.push(NodeSummary { node, dir, summary });
    }
    Ok(verified)
}

#[cfg(test)]
mod tests {
    use super::super::AuditEvent;
    use super::super::log::Appender;
    use super::*;
    use crate::vault::{KeySource, generate_key_file};

    fn event(i: usize) -> AuditEvent {
        AuditEvent {
            caller: "c".into(),
            operation: format!("op{i}"),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_set_of_node_logs_verifies_together_and_a_missing_or_doubled_node_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let key = tmp.path().join("key");
        generate_key_file(&key).unwrap();
        let config = crate::config::StoreConfig::at(tmp.path().join("db"));
        let store = Store::create(&config, &KeySource::KeyFile(key))
            .await
            .unwrap();
        let mut dirs = Vec::new();
        for (n, node) in ["a", "b", "c"].iter().enumerate() {
            let dir = tmp.path().join(format!("audit-{node}"));
            let mut log = Appender::open(&dir, store.vault(), Some(node), 1 << 20).unwrap();
            for i in 0..=n {
                log.append(store.vault(), &[event(i)]).unwrap();
            }
            dirs.push(dir);
        }
        let verified = verify_nodes(&store, &dirs, &[]).await.unwrap();
        let records: Vec<(String, u64)> = verified
            .iter()
            .map(|v| (v.node.clone(), v.summary.records))
            .collect();
        assert_eq!(records, [("a".into(), 1), ("b".into(), 2), ("c".into(), 3)]);
        // A checkpoint of a node whose log is left out.
        let cp = Checkpoint::sign(
            store.vault(),
            super::super::CheckpointKind::Checkpoint,
            "c",
            3,
            &verified[2].summary.head,
            chrono::Utc::now(),
        )
        .unwrap();
        let err = verify_nodes(&store, &dirs[..2], std::slice::from_ref(&cp))
            .await
            .unwrap_err();
        assert!(
            matches!(err, NodesError::MissingLog { ref node, seq: 3 } if node == "c"),
            "{err}"
        );
        verify_nodes(&store, &dirs, &[cp]).await.unwrap();
        // Two folders of one node.
        let err = verify_nodes(&store, &[dirs[0].clone(), dirs[0].clone()], &[])
            .await
            .unwrap_err();
        assert!(matches!(err, NodesError::SameNode { .. }), "{err}");
    }
}
