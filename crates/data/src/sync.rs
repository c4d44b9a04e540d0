//! The sync loop: one background task per node that keeps the replica up to
//! date. It never runs on a request path.
//!
//! An empty replica, or a `410 Gone` from the feed, means a bootstrap: the
//! snapshot loads into a staging file and a fresh index while the node keeps
//! serving the old state, and both are swapped in once the trailer checks out.
//! Otherwise the node tails `changes?after=<applied>`. Every batch is checked in
//! full before any of it is applied. Reconnects use capped exponential backoff
//! with full jitter, rotating through the configured control planes.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures_util::StreamExt;
use reqwest::StatusCode;
use tokio_util::sync::CancellationToken;
use twofold_core::feed::{Change, ChangeLine, SnapshotLine, StateDigest};

use crate::index::{Index, Prepared, RecordError, prepare, prepare_put};
use crate::node::Node;
use crate::replica::{Position, Replica, ReplicaError, Row, Staging, entity_key_text};

/// Entities written to the staging file per chunk. Each row held until its
/// chunk is written sits in the heap between long-lived index records; with
/// 10,000 a 1M-factor bootstrap left about 20 B of RSS per factor more than a
/// restart does, with 1,000 about 10 to 16 (BENCHMARKS.md).
const SNAPSHOT_BATCH: usize = 1_000;
/// Header naming the change log (see docs/feed.md).
const LOG_HEADER: &str = "twofold-log-id";

/// An error with all its causes, `outer: inner: ...`: reqwest's own message
/// names only the URL, while the reason (a refused certificate, say) is below.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("the feed no longer holds the changes after our seq")]
    Gone,
    #[error("control plane answered {0}")]
    Status(StatusCode),
    #[error("request failed: {}", error_chain(.0))]
    Http(#[from] reqwest::Error),
    #[error("no line from the control plane for {0:?}")]
    Silent(Duration),
    #[error("the stream ended")]
    Ended,
    #[error("malformed feed line: {0}")]
    Malformed(String),
    #[error("feed line longer than {0} bytes")]
    LineTooLong(usize),
    #[error("expected seq {expected}, got {got}")]
    OutOfOrder { expected: u64, got: u64 },
    #[error("snapshot check failed: {0}")]
    Snapshot(String),
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    #[error("replica worker stopped: {0}")]
    Worker(String),
}

/// Capped exponential backoff with full jitter: the n-th delay is uniform in
/// `[0, min(max, base * 2^n))`.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max,
            attempt: 0,
        }
    }

    /// The next delay, given a uniform random fraction in `[0, 1)`.
    pub fn next_with(&mut self, fraction: f64) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32.checked_shl(self.attempt).unwrap_or(u32::MAX))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1).min(31);
        ceiling.mul_f64(fraction.clamp(0.0, 1.0))
    }

    /// The next delay, jittered from the OS random source.
    pub fn next_delay(&mut self) -> Duration {
        let mut bytes = [0u8; 4];
        let fraction = match getrandom::fill(&mut bytes) {
            Ok(()) => f64::from(u32::from_le_bytes(bytes)) / (f64::from(u32::MAX) + 1.0),
            Err(_) => 0.5,
        };
        self.next_with(fraction)
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Splits a byte stream into lines, refusing any line longer than `max`.
#[derive(Debug)]
pub struct LineBuffer {
    buf: BytesMut,
    max: usize,
}

impl LineBuffer {
    pub fn new(max: usize) -> LineBuffer {
        LineBuffer {
            buf: BytesMut::new(),
            max,
        }
    }

    /// Add a chunk and return the complete lines it finished.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<BytesMut>, SyncError> {
        self.buf.extend_from_slice(chunk);
        let mut lines = Vec::new();
        while let Some(end) = memchr::memchr(b'\n', &self.buf) {
            let mut line = self.buf.split_to(end + 1);
            line.truncate(end);
            if line.len() > self.max {
                return Err(SyncError::LineTooLong(self.max));
            }
            lines.push(line);
        }
        if self.buf.len() > self.max {
            return Err(SyncError::LineTooLong(self.max));
        }
        Ok(lines)
    }

    /// Bytes of an unfinished line.
    pub fn pending(&self) -> usize {
        self.buf.remaining()
    }
}

/// Check a run of changes: consecutive after `applied`, every op valid. Nothing is
/// applied unless the whole run passes.
pub fn check_batch(applied: u64, changes: &[Change]) -> Result<Vec<Prepared>, SyncError> {
    let mut prepared = Vec::new();
    for (expected, change) in (applied + 1..).zip(changes) {
        if change.seq != expected {
            return Err(SyncError::OutOfOrder {
                expected,
                got: change.seq,
            });
        }
        for op in &change.ops {
            prepared.push(prepare(op)?.at(change.seq));
        }
    }
    Ok(prepared)
}

/// The sync loop. Runs until the node shuts down.
pub async fn run(node: Arc<Node>, replica: Replica) {
    let client = node.http.clone();
    let mut replica = Some(replica);
    let mut backoff = Backoff::new(node.config.backoff_base, node.config.backoff_max);
    let mut url_index = 0usize;
    let mut must_bootstrap = replica.as_ref().is_some_and(Replica::is_empty);
    while !node.shutdown.is_cancelled() {
        let urls = &node.config.control_urls;
        let Some(url) = urls.get(url_index % urls.len().max(1)) else {
            tracing::error!("no control plane configured; sync is off");
            return;
        };
        let url = url.trim_end_matches('/').to_owned();
        let result = if must_bootstrap {
            bootstrap(&node, &client, &url, &mut replica).await
        } else {
            tail(&node, &client, &url, &mut replica, &mut backoff).await
        };
        match result {
            Ok(()) => {
                must_bootstrap = false;
                backoff.reset();
                continue;
            }
            Err(SyncError::Gone) => {
                tracing::info!(url, "feed position gone; bootstrapping from a snapshot");
                must_bootstrap = true;
                continue;
            }
            Err(e) => {
                tracing::warn!(url, error = %e, "sync interrupted");
                url_index += 1;
            }
        }
        if replica.is_none() {
            // A swap or a replica task failed half-way: whatever file is in
            // place (old or new, both complete) is opened again.
            match Replica::open(&node.config.data_dir) {
                Ok(reopened) => {
                    tracing::warn!("replica reopened after a failed swap; bootstrapping again");
                    replica = Some(reopened);
                    must_bootstrap = true;
                }
                Err(e) => tracing::error!(error = %e, "cannot reopen the replica; will retry"),
            }
        }
        let delay = backoff.next_delay();
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = node.shutdown.cancelled() => return,
        }
    }
}

/// Parse a run of change-stream lines, check the changes in it, and apply them
/// to the replica, then to the index. Returns the last seq applied and how many
/// changes, or `None` for heartbeats only.
fn apply_lines(
    node: &Node,
    replica: &mut Replica,
    applied: u64,
    lines: &[BytesMut],
) -> Result<Option<(u64, u64)>, SyncError> {
    let mut changes = Vec::new();
    for line in lines {
        match serde_json::from_slice::<ChangeLine>(line)
            .map_err(|e| SyncError::Malformed(e.to_string()))?
        {
            ChangeLine::Heartbeat { head } => {
                node.sync.head.fetch_max(head, Ordering::SeqCst);
            }
            ChangeLine::Change(change) => changes.push(change),
        }
    }
    let Some(last) = changes.last().map(|c| c.seq) else {
        return Ok(None);
    };
    let prepared = check_batch(applied, &changes).inspect_err(|e| {
        if matches!(e, SyncError::OutOfOrder { .. }) {
            node.sync.out_of_order.fetch_add(1, Ordering::SeqCst);
        }
    })?;
    replica.apply(&changes)?;
    node.index().apply(prepared);
    Ok(Some((last, changes.len() as u64)))
}

/// Run `f` on the replica off the async threads, giving it back afterwards.
async fn with_replica<T: Send + 'static>(
    slot: &mut Option<Replica>,
    f: impl FnOnce(&mut Replica) -> Result<T, ReplicaError> + Send + 'static,
) -> Result<T, SyncError> {
    let mut replica = slot
        .take()
        .ok_or_else(|| SyncError::Worker("replica missing".into()))?;
    let (replica, result) = tokio::task::spawn_blocking(move || {
        let result = f(&mut replica);
        (replica, result)
    })
    .await
    .map_err(|e| SyncError::Worker(e.to_string()))?;
    *slot = Some(replica);
    Ok(result?)
}

/// Read the next chunk, or fail if the stream stays silent for `silence`.
/// `Ok(None)` means the node is shutting down.
async fn next_chunk<S>(
    silence: Duration,
    shutdown: &CancellationToken,
    body: &mut S,
) -> Result<Option<bytes::Bytes>, SyncError>
where
    S: futures_util::Stream<Item = Result<bytes::Bytes, reqwest::Error>> + Unpin,
{
    tokio::select! {
        chunk = tokio::time::timeout(silence, body.next()) => match chunk {
            Err(_) => Err(SyncError::Silent(silence)),
            Ok(None) => Err(SyncError::Ended),
            Ok(Some(Err(e))) => Err(SyncError::Http(e)),
            Ok(Some(Ok(bytes))) => Ok(Some(bytes)),
        },
        () = shutdown.cancelled() => Ok(None),
    }
}

async fn tail(
    node: &Arc<Node>,
    client: &reqwest::Client,
    url: &str,
    replica: &mut Option<Replica>,
    backoff: &mut Backoff,
) -> Result<(), SyncError> {
    let position = replica
        .as_ref()
        .map(|r| r.position().clone())
        .ok_or_else(|| SyncError::Worker("replica missing".into()))?;
    // Log ids are generated in lowercase base32, so they need no escaping; one
    // that came from elsewhere is left out and the server answers as for none.
    let mut target = format!("{url}/v1/feed/changes?after={}", position.applied);
    if let Some(log) = position
        .log_id
        .as_deref()
        .filter(|l| l.bytes().all(|b| b.is_ascii_alphanumeric()))
    {
        target.push_str("&log=");
        target.push_str(log);
    }
    let request = client.get(target).bearer_auth(&node.config.node_token);
    let response = request.send().await?;
    match response.status() {
        StatusCode::OK => {}
        StatusCode::GONE => return Err(SyncError::Gone),
        status => return Err(SyncError::Status(status)),
    }
    node.sync.resumes.fetch_add(1, Ordering::SeqCst);
    node.mark_contact();
    tracing::info!(url, after = position.applied, "tailing the change log");
    let mut body = response.bytes_stream();
    let mut lines = LineBuffer::new(node.config.max_line);
    let mut applied = position.applied;
    loop {
        let Some(chunk) =
            next_chunk(node.config.heartbeat_timeout, &node.shutdown, &mut body).await?
        else {
            return Ok(());
        };
        node.mark_contact();
        let lines = lines.push(&chunk)?;
        if lines.is_empty() {
            continue;
        }
        // Parsing, checking and applying a batch (up to a report's worth of
        // users each) run on the replica's thread, not on the request threads.
        let worker = node.clone();
        let outcome = with_replica(replica, move |r| {
            Ok(apply_lines(&worker, r, applied, &lines))
        })
        .await?;
        let Some((last, count)) = outcome? else {
            continue;
        };
        node.sync.changes_applied.fetch_add(count, Ordering::SeqCst);
        applied = last;
        node.sync.head.fetch_max(last, Ordering::SeqCst);
        node.set_applied(last);
        backoff.reset();
    }
}

async fn bootstrap(
    node: &Arc<Node>,
    client: &reqwest::Client,
    url: &str,
    replica: &mut Option<Replica>,
) -> Result<(), SyncError> {
    let response = client
        .get(format!("{url}/v1/feed/snapshot"))
        .bearer_auth(&node.config.node_token)
        .send()
        .await?;
    if response.status() != StatusCode::OK {
        return Err(SyncError::Status(response.status()));
    }
    let log_id = response
        .headers()
        .get(LOG_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| SyncError::Snapshot("no log id header".into()))?;
    node.mark_contact();
    tracing::info!(url, "bootstrapping from a snapshot");
    let dir = node_dir(replica)?;
    let mut staging = Some(
        tokio::task::spawn_blocking(move || Staging::create(&dir))
            .await
            .map_err(|e| SyncError::Worker(e.to_string()))??,
    );
    let fresh = Index::default();
    let mut digest = StateDigest::default();
    let mut begin: Option<u64> = None;
    let mut end: Option<(u64, u64, String)> = None;
    let mut batch: Vec<Row> = Vec::with_capacity(SNAPSHOT_BATCH);
    let mut prepared: Vec<Prepared> = Vec::with_capacity(SNAPSHOT_BATCH);
    let mut body = response.bytes_stream();
    let mut lines = LineBuffer::new(node.config.max_line);
    // With a second core, a batch is written on a blocking thread while this
    // task parses the next one (one insert in flight). On one core the two
    // would only take turns, at the cost of switching between them.
    let overlap = std::thread::available_parallelism().is_ok_and(|n| n.get() > 1);
    let mut inserting = None;
    while end.is_none() {
        let Some(chunk) =
            next_chunk(node.config.heartbeat_timeout, &node.shutdown, &mut body).await?
        else {
            return Err(SyncError::Snapshot("shutting down".into()));
        };
        node.mark_contact();
        for line in lines.push(&chunk)? {
            if end.is_some() {
                return Err(SyncError::Snapshot("data after the trailer".into()));
            }
            match serde_json::from_slice::<SnapshotLine>(&line)
                .map_err(|e| SyncError::Malformed(e.to_string()))?
            {
                SnapshotLine::Begin { seq } if begin.is_none() => begin = Some(seq),
                SnapshotLine::Entity { entity } if begin.is_some() => {
                    // The entity's canonical bytes, which feed the digest and the
                    // replica, are on the line as the control plane wrote them
                    // (docs/feed.md); the trailer's digest checks that they are.
                    let body = SnapshotLine::entity_bytes(&line)
                        .map_or_else(|| entity.canonical_bytes(), <[u8]>::to_vec);
                    digest.add_canonical(&body);
                    prepared.push(prepare_put(&entity)?.at(begin.unwrap_or_default()));
                    batch.push((entity_key_text(&entity), body));
                }
                SnapshotLine::End { seq, count, digest } if begin.is_some() => {
                    end = Some((seq, count, digest))
                }
                _ => return Err(SyncError::Snapshot("lines out of order".into())),
            }
        }
        if batch.len() >= SNAPSHOT_BATCH || end.is_some() {
            let rows = std::mem::take(&mut batch);
            let mut stage = match inserting.take() {
                Some(previous) => inserted(previous).await?,
                None => staging
                    .take()
                    .ok_or_else(|| SyncError::Worker("staging missing".into()))?,
            };
            let insert = tokio::task::spawn_blocking(move || {
                let result = stage.insert(&rows);
                (stage, result)
            });
            if overlap {
                inserting = Some(insert);
            } else {
                staging = Some(inserted(insert).await?);
            }
            fresh.apply(std::mem::take(&mut prepared));
        }
    }
    if let Some(last) = inserting.take() {
        staging = Some(inserted(last).await?);
    }
    let (seq, count, expected) = end.ok_or_else(|| SyncError::Snapshot("no trailer".into()))?;
    if Some(seq) != begin || count != digest.count() || expected != digest.to_hex() {
        return Err(SyncError::Snapshot(format!(
            "trailer says {count} entities with digest {expected}, received {} with {}",
            digest.count(),
            digest.to_hex()
        )));
    }
    let stage = staging
        .take()
        .ok_or_else(|| SyncError::Worker("staging missing".into()))?;
    let position = Position {
        log_id: Some(log_id),
        applied: seq,
    };
    // Finish the staging file first: if that fails, the live replica is
    // untouched and the next attempt starts over.
    let staged = tokio::task::spawn_blocking(move || stage.finish(&position))
        .await
        .map_err(|e| SyncError::Worker(e.to_string()))??;
    let old = replica
        .take()
        .ok_or_else(|| SyncError::Worker("replica missing".into()))?;
    let swapped = tokio::task::spawn_blocking(move || old.swap_in(staged))
        .await
        .map_err(|e| SyncError::Worker(e.to_string()))?;
    *replica = Some(swapped?);
    node.swap_index(fresh);
    // Not `fetch_max`: the snapshot may come from a shorter log (a replaced or
    // restored database), and the old log's head would show as lag forever.
    node.sync.head.store(seq, Ordering::SeqCst);
    node.set_applied(seq);
    node.sync.bootstraps.fetch_add(1, Ordering::SeqCst);
    node.sync.ready.store(true, Ordering::SeqCst);
    tracing::info!(seq, entities = count, "bootstrap complete");
    Ok(())
}

/// The staging file back from a batch insert, once the insert succeeded.
async fn inserted(
    insert: tokio::task::JoinHandle<(Staging, Result<(), ReplicaError>)>,
) -> Result<Staging, SyncError> {
    let (stage, result) = insert.await.map_err(|e| SyncError::Worker(e.to_string()))?;
    result?;
    Ok(stage)
}

fn node_dir(replica: &Option<Replica>) -> Result<std::path::PathBuf, SyncError> {
    replica
        .as_ref()
        .map(|r| r.dir().to_owned())
        .ok_or_else(|| SyncError::Worker("replica missing".into()))
}

#[cfg(test)]
mod tests {
    use twofold_core::feed::{Entity, Op, TenantRecord};

    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_full_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let ceilings: Vec<Duration> = (0..6).map(|_| b.next_with(0.999_999)).collect();
        let ms: Vec<u128> = ceilings.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, vec![99, 199, 399, 799, 999, 999]);
        assert_eq!(b.next_with(0.0), Duration::ZERO);
        b.reset();
        assert_eq!(b.next_with(0.5), Duration::from_millis(50));
        let mut long = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        for _ in 0..100 {
            assert!(long.next_with(1.0) <= Duration::from_secs(10));
        }
    }

    #[test]
    fn lines_split_across_chunks_and_long_lines_are_refused() {
        let mut buf = LineBuffer::new(16);
        assert!(buf.push(b"{\"a\":").unwrap().is_empty());
        let lines = buf.push(b"1}\n{\"b\":2}\n{\"c").unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(&lines[0][..], b"{\"a\":1}");
        assert_eq!(buf.pending(), 3);
        assert!(matches!(
            buf.push(&[b'x'; 20]),
            Err(SyncError::LineTooLong(16))
        ));
    }

    fn change(seq: u64, id: &str) -> Change {
        Change {
            seq,
            at_ms: 0,
            ops: vec![Op::Put {
                entity: Entity::Tenant(TenantRecord {
                    id: id.into(),
                    name: "n".into(),
                }),
            }],
        }
    }

    type Chunk = Result<bytes::Bytes, reqwest::Error>;

    #[tokio::test(start_paused = true)]
    async fn a_silent_stream_is_dead_after_the_timeout() {
        let silence = Duration::from_secs(15);
        let shutdown = CancellationToken::new();
        let mut quiet = futures_util::stream::pending::<Chunk>();
        let started = tokio::time::Instant::now();
        let result = next_chunk(silence, &shutdown, &mut quiet).await;
        assert!(matches!(result, Err(SyncError::Silent(d)) if d == silence));
        // The clock is paused: it moved exactly as far as the timeout.
        assert_eq!(started.elapsed(), silence);

        let mut chatty = futures_util::stream::iter(vec![Ok::<_, reqwest::Error>(
            bytes::Bytes::from_static(b"x"),
        )]);
        assert_eq!(
            next_chunk(silence, &shutdown, &mut chatty)
                .await
                .unwrap()
                .unwrap(),
            "x"
        );
        assert!(matches!(
            next_chunk(silence, &shutdown, &mut chatty).await,
            Err(SyncError::Ended)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_a_wait_without_error() {
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let mut quiet = futures_util::stream::pending::<Chunk>();
        assert!(
            next_chunk(Duration::from_secs(15), &shutdown, &mut quiet)
                .await
                .unwrap()
                .is_none()
        );
    }

    proptest::proptest! {
        /// However the bytes are split into chunks, the same lines come out.
        #[test]
        fn lines_do_not_depend_on_chunking(
            lines in proptest::collection::vec("[a-z{}\":0-9]{0,40}", 0..20),
            cuts in proptest::collection::vec(0usize..2000, 0..10),
        ) {
            let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (text.len() + 1)).collect();
            cuts.sort_unstable();
            let mut buf = LineBuffer::new(64);
            let mut got = Vec::new();
            let mut start = 0;
            for cut in cuts.into_iter().chain([text.len()]) {
                for line in buf.push(&text.as_bytes()[start..cut]).unwrap() {
                    got.push(String::from_utf8(line.to_vec()).unwrap());
                }
                start = cut;
            }
            proptest::prop_assert_eq!(got, lines);
            proptest::prop_assert_eq!(buf.pending(), 0);
        }

        /// A run is accepted exactly when its seqs follow on from `applied`.
        #[test]
        fn only_consecutive_runs_are_accepted(applied in 0u64..1000, gaps in proptest::collection::vec(0u64..3, 1..10)) {
            let mut seq = applied;
            let changes: Vec<Change> = gaps.iter().map(|g| { seq += 1 + g; change(seq, "t") }).collect();
            let consecutive = gaps.iter().all(|g| *g == 0);
            proptest::prop_assert_eq!(check_batch(applied, &changes).is_ok(), consecutive);
        }
    }

    #[test]
    fn batches_must_be_consecutive_and_valid() {
        assert_eq!(
            check_batch(4, &[change(5, "a"), change(6, "b")])
                .unwrap()
                .len(),
            2
        );
        assert!(matches!(
            check_batch(4, &[change(5, "a"), change(7, "b")]),
            Err(SyncError::OutOfOrder {
                expected: 6,
                got: 7
            })
        ));
        assert!(matches!(
            check_batch(4, &[change(4, "a")]),
            Err(SyncError::OutOfOrder {
                expected: 5,
                got: 4
            })
        ));
        assert!(matches!(
            check_batch(4, &[change(5, "")]),
            Err(SyncError::Record(_))
        ));
    }
}
