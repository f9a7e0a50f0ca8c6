//! The witness sink for a URL (`[audit] witness_url`): each signed checkpoint is POSTed as JSON
//! to a server on another host, which can later prove the log still extends it.
//!
//! Invariants:
//! - requests go through the guarded HTTP client ([`crate::tls::http_client`]): HTTPS only,
//!   the `[egress]` policy and the upstream caps apply as to any upstream call;
//! - nothing on the record path waits for the witness: the checkpointer only replaces the
//!   latest checkpoint to send ([`tokio::sync::watch`]); a failed POST is retried with
//!   exponential backoff (up to [`MAX_BACKOFF`]) until it succeeds or a newer checkpoint
//!   supersedes it (a newer checkpoint covers the older one, so a witness that was away gets
//!   the latest, not every one);
//! - a checkpoint counts as delivered only on a 2xx answer.

use std::time::Duration;

use tokio::sync::watch;

use super::{AuditError, Checkpoint};

/// The longest wait between two tries of one checkpoint.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The wait before the first retry.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// One POST's whole-request timeout.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Where the checkpointer hands checkpoints to the sink.
pub(crate) type Handoff = watch::Sender<Option<Checkpoint>>;

/// Starts the sink task for `url` (trusting `ca_pem` beside the system roots, if given);
/// returns where to hand it checkpoints. Must run inside the daemon's runtime.
pub(crate) fn start(url: &str, ca_pem: Option<&str>) -> Result<Handoff, AuditError> {
    let bad = |why: String| AuditError::Witness(format!("{url:?}: {why}"));
    let parsed = reqwest::Url::parse(url).map_err(|e| bad(e.to_string()))?;
    if parsed.scheme() != "https" {
        return Err(bad("the witness must be an https:// URL".into()));
    }
    let client = crate::tls::http_client(ca_pem, TIMEOUT).map_err(|e| bad(e.to_string()))?;
    let (tx, rx) = watch::channel(None);
    tokio::spawn(run(client, parsed, rx));
    Ok(tx)
}

/// Sends each checkpoint handed over, until the handoff's sender is gone.
async fn run(
    client: reqwest::Client,
    url: reqwest::Url,
    mut rx: watch::Receiver<Option<Checkpoint>>,
) {
    while rx.changed().await.is_ok() {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let Some(cp) = rx.borrow_and_update().clone() else {
                break;
            };
            match post(&client, &url, &cp).await {
                Ok(()) => break,
                Err(why) => {
                    tracing::warn!(seq = cp.seq, url = %url, error = %why, "audit witness: checkpoint not delivered; retrying");
                }
            }
            // A newer checkpoint replaces this one at once; otherwise retry after the backoff.
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

/// One POST of `cp`; `Err` names why it did not count as delivered.
async fn post(client: &reqwest::Client, url: &reqwest::Url, cp: &Checkpoint) -> Result<(), String> {
    let response = client
        .post(url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(cp.to_line())
        .send()
        .await
        .map_err(|e| {
            crate::upstream::refusal(&e).map_or_else(|| e.to_string(), |r| r.to_string())
        })?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("the witness answered {status}"))
    }
}
