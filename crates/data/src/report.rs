//! The usage reporter: sends this node's outbox to the control plane in batches,
//! retrying with backoff while it is down, so runtime state reaches every node
//! through the feed.

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::CONTENT_TYPE;
use twofold_core::feed::{BackupCodeUse, BackupCodeUseAck, UsageAck, UsageReport};

use crate::node::Node;
use crate::sync::Backoff;

/// Events sent per report at most: the most the control plane takes in one.
const BATCH: usize = 1000;
/// Reports start at least this far apart. The control plane's cost is mostly
/// per report (one transaction writing the pages its users' rows sit on, one
/// change that every data plane applies), so under load each report should
/// carry many events. An event that finds the reporter idle is sent at once;
/// otherwise it waits at most this long, which the cross-node window adds up.
/// 25 ms batched a little more but made the changes, and the stall of applying
/// each one, larger. 10 ms, on a core shared with the control plane, let each
/// merge hold the core ~1 ms at a time, which set the p99 of accepted codes at
/// one connection; at 4 ms each merge is 2.5 times smaller, for about 0.4 µs
/// more control-plane CPU per reported failure (BENCHMARKS.md, 2026-12-06).
const INTERVAL: Duration = Duration::from_millis(4);
/// Even without a wake-up, look at the outbox this often.
const IDLE_POLL: Duration = Duration::from_secs(1);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("request failed: {}", crate::sync::error_chain(.0))]
    Http(#[from] reqwest::Error),
    #[error("control plane answered {0}")]
    Status(StatusCode),
    #[error("malformed acknowledgement: {0}")]
    Ack(String),
}

/// Send one report to `url` and return the acknowledgement.
pub async fn send(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    report: &UsageReport,
) -> Result<UsageAck, ReportError> {
    let body = serde_json::to_vec(report).map_err(|e| ReportError::Ack(e.to_string()))?;
    let response = client
        .post(format!("{}/v1/feed/usage", url.trim_end_matches('/')))
        .bearer_auth(token)
        .header(CONTENT_TYPE, "application/json")
        .timeout(REQUEST_TIMEOUT)
        .body(body)
        .send()
        .await?;
    if response.status() != StatusCode::OK {
        return Err(ReportError::Status(response.status()));
    }
    let bytes = response.bytes().await?;
    serde_json::from_slice(&bytes).map_err(|e| ReportError::Ack(e.to_string()))
}

/// Strict mode: ask a control plane to mark a backup code used, trying each
/// configured one in turn within the strict timeout.
pub async fn confirm_backup_code(
    node: &Node,
    code: &BackupCodeUse,
) -> Result<BackupCodeUseAck, ReportError> {
    let body = serde_json::to_vec(code).map_err(|e| ReportError::Ack(e.to_string()))?;
    let mut last = ReportError::Status(StatusCode::SERVICE_UNAVAILABLE);
    for url in &node.config.control_urls {
        let sent = node
            .http
            .post(format!(
                "{}/v1/feed/backup-code-use",
                url.trim_end_matches('/')
            ))
            .bearer_auth(&node.config.node_token)
            .header(CONTENT_TYPE, "application/json")
            .timeout(node.config.strict_timeout)
            .body(body.clone())
            .send()
            .await;
        match sent {
            Ok(response) if response.status() == StatusCode::OK => {
                let bytes = response.bytes().await?;
                return serde_json::from_slice(&bytes).map_err(|e| ReportError::Ack(e.to_string()));
            }
            Ok(response) => last = ReportError::Status(response.status()),
            Err(e) => last = ReportError::Http(e),
        }
    }
    Err(last)
}

/// Report until shutdown.
pub async fn run(node: Arc<Node>) {
    let client = node.http.clone();
    let mut backoff = Backoff::new(node.config.backoff_base, node.config.backoff_max);
    let mut url_index = 0usize;
    let mut last_start: Option<tokio::time::Instant> = None;
    let mut backlog = false;
    loop {
        // A full report leaves a backlog: the next one goes at once.
        if let Some(start) = last_start.filter(|_| !backlog) {
            tokio::select! {
                () = tokio::time::sleep_until(start + INTERVAL) => {}
                () = node.shutdown.cancelled() => return,
            }
        }
        let events = match node.outbox.unsent(BATCH, node.reportable_below()).await {
            Ok(events) => events,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the outbox; will retry");
                tokio::select! {
                    () = tokio::time::sleep(backoff.next_delay()) => continue,
                    () = node.shutdown.cancelled() => return,
                }
            }
        };
        if events.is_empty() {
            tokio::select! {
                () = node.report_wake.notified() => continue,
                () = tokio::time::sleep(IDLE_POLL) => continue,
                () = node.shutdown.cancelled() => return,
            }
        }
        let urls = &node.config.control_urls;
        let Some(url) = urls.get(url_index % urls.len().max(1)) else {
            return;
        };
        last_start = Some(tokio::time::Instant::now());
        backlog = events.len() == BATCH;
        let report = UsageReport {
            node: node.node_id.clone(),
            events,
        };
        match send(&client, url, &node.config.node_token, &report).await {
            Ok(ack) => {
                node.record_ack(&ack, &report.events);
                backoff.reset();
            }
            Err(e) => {
                tracing::warn!(url, error = %e, "usage report failed; will retry");
                url_index += 1;
                tokio::select! {
                    () = tokio::time::sleep(backoff.next_delay()) => {}
                    () = node.shutdown.cancelled() => return,
                }
            }
        }
    }
}
