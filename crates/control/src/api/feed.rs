//! The feed data planes replicate from: a consistent snapshot, then a resumable
//! stream of changes, both as NDJSON (see docs/feed.md). Also the digest of the
//! replicated state, for checking a replica against its source.

use std::convert::Infallible;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use twofold_core::feed::ChangeLine;
use utoipa::{IntoParams, ToSchema};

use super::ApiQuery;
use super::openapi::ErrorBody;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::FeedPosition;

/// Lines are gathered into chunks of about this size before they are sent.
const CHUNK: usize = 64 * 1024;
/// Changes read from the log per query.
const BATCH: usize = 512;
/// Header naming the change log, so a node can tell it has moved to another one.
pub const LOG_HEADER: &str = "twofold-log-id";

const NDJSON: &str = "application/x-ndjson";

/// Counts an open stream in the metrics for as long as it lives.
struct Subscriber(AppState);

impl Subscriber {
    fn new(state: &AppState) -> Subscriber {
        state.metrics.feed_subscribers.inc();
        Subscriber(state.clone())
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.0.metrics.feed_subscribers.dec();
    }
}

fn push_line<T: Serialize>(buf: &mut BytesMut, line: &T) {
    // Serialising feed types into memory cannot fail.
    let _ = serde_json::to_writer((&mut *buf).writer(), line);
    buf.put_u8(b'\n');
}

/// A streaming NDJSON response fed by `rx`, holding `guard` until it ends.
fn ndjson(state: &AppState, rx: mpsc::Receiver<Bytes>) -> Response {
    let guard = Subscriber::new(state);
    let stream = futures_util::stream::unfold((rx, guard), |(mut rx, guard)| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, Infallible>(chunk), (rx, guard)))
    });
    (
        [
            (header::CONTENT_TYPE, NDJSON.to_owned()),
            (
                header::HeaderName::from_static(LOG_HEADER),
                state.store.log_id().to_owned(),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

/// `GET /v1/feed/snapshot`: every replicated entity as of one seq, streamed from a
/// single read transaction, ending with a trailer that holds the count and digest.
#[utoipa::path(
    get,
    path = "/v1/feed/snapshot",
    tag = "feed",
    operation_id = "feed_snapshot",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "NDJSON, one snapshot line each (see docs/feed.md); a stream without its `end` trailer is incomplete",
            content_type = "application/x-ndjson", body = String,
            headers(("twofold-log-id" = String, description = "the change log this snapshot belongs to"))),
        (status = 401, description = "missing or invalid credentials", body = ErrorBody),
        (status = 403, description = "the caller is neither the operator nor a key with the `replicate` scope", body = ErrorBody),
    ),
)]
pub async fn snapshot(State(state): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    caller.require_replicate()?;
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    let worker = state.clone();
    tokio::task::spawn_blocking(move || {
        let mut buf = BytesMut::with_capacity(CHUNK);
        let mut open = true;
        let result = worker.store.snapshot(&mut |line: &[u8]| {
            buf.extend_from_slice(line);
            buf.put_u8(b'\n');
            if buf.len() >= CHUNK {
                open = tx.blocking_send(buf.split().freeze()).is_ok();
            }
            open
        });
        match result {
            Ok(()) if open && !buf.is_empty() => {
                let _ = tx.blocking_send(buf.freeze());
            }
            Ok(()) => {}
            // On an error the stream ends without its trailer, which tells the
            // node the snapshot is incomplete.
            Err(e) => tracing::error!(error = %e, "snapshot failed"),
        }
    });
    Ok(ndjson(&state, rx))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ChangesQuery {
    /// The last seq the node has applied.
    after: u64,
    /// The log id the node replicated from, if it knows one.
    log: Option<String>,
}

/// `GET /v1/feed/changes?after=S`: the changes after S in order, then new ones as
/// they commit, with a heartbeat carrying the head when idle. `410 Gone` if the
/// changes after S are no longer all in the log.
#[utoipa::path(
    get,
    path = "/v1/feed/changes",
    tag = "feed",
    operation_id = "feed_changes",
    security(("bearer" = [])),
    params(ChangesQuery),
    responses(
        (status = 200, description = "NDJSON, one change or heartbeat line each (see docs/feed.md), open until the client leaves",
            content_type = "application/x-ndjson", body = String,
            headers(("twofold-log-id" = String, description = "the change log these changes belong to"))),
        (status = 400, description = "invalid_query", body = ErrorBody),
        (status = 401, description = "missing or invalid credentials", body = ErrorBody),
        (status = 403, description = "the caller is neither the operator nor a key with the `replicate` scope", body = ErrorBody),
        (status = 410, description = "feed_gone: the changes after this seq are no longer in the log; take a snapshot", body = ErrorBody),
    ),
)]
pub async fn changes(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<ChangesQuery>,
) -> Result<Response, ApiError> {
    caller.require_replicate()?;
    let after = query.after;
    let log = query.log;
    let position = state
        .blocking(move |s| Ok(s.store.feed_position(log.as_deref(), after)?))
        .await?;
    if position == FeedPosition::Gone {
        return Err(ApiError::new(
            StatusCode::GONE,
            "feed_gone",
            "the changes after this seq are no longer in the log; take a snapshot",
        ));
    }
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    let key = match &caller {
        Caller::Operator => None,
        Caller::Key(key) => Some(key.id.clone()),
    };
    tokio::spawn(stream_changes(state.clone(), after, key, tx));
    Ok(ndjson(&state, rx))
}

/// Feed `tx` with the changes after `cursor` until the client goes away or the
/// server shuts down.
async fn stream_changes(
    state: AppState,
    mut cursor: u64,
    key: Option<String>,
    tx: mpsc::Sender<Bytes>,
) {
    let mut head = state.store.subscribe();
    let heartbeat = state.config.heartbeat;
    let mut buf = BytesMut::new();
    let mut line = Vec::new();
    // Tell the node where the head is straight away.
    push_line(
        &mut buf,
        &ChangeLine::Heartbeat {
            head: *head.borrow_and_update(),
        },
    );
    if tx.send(buf.split().freeze()).await.is_err() {
        return;
    }
    let mut checked = tokio::time::Instant::now();
    loop {
        // A node key revoked while its stream is open loses the stream within a
        // heartbeat interval, not only at its next connection.
        if let Some(id) = key.clone()
            && checked.elapsed() >= heartbeat
        {
            checked = tokio::time::Instant::now();
            let active = state
                .blocking(move |s| Ok(s.store.key_is_active(&id)?))
                .await;
            if !matches!(active, Ok(true)) {
                tracing::info!("closing a change stream whose key was revoked");
                return;
            }
        }
        let worker = state.clone();
        let read =
            tokio::task::spawn_blocking(move || worker.store.changes_after(cursor, BATCH)).await;
        let changes = match read {
            Ok(Ok(changes)) => changes,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "reading the change log failed; closing the stream");
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "change log reader panicked");
                return;
            }
        };
        if !changes.is_empty() {
            for change in changes {
                if change.seq != cursor + 1 {
                    // Compaction removed changes this stream had not sent yet. End
                    // it; the node reconnects, is told 410 and takes a snapshot.
                    tracing::warn!(
                        expected = cursor + 1,
                        found = change.seq,
                        "gap in the change log; closing the stream"
                    );
                    return;
                }
                cursor = change.seq;
                line.clear();
                ChangeLine::write_change(change.seq, change.at_ms, &change.ops, &mut line);
                buf.extend_from_slice(&line);
                buf.put_u8(b'\n');
            }
            if tx.send(buf.split().freeze()).await.is_err() {
                return;
            }
            continue;
        }
        tokio::select! {
            changed = head.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep(heartbeat) => {
                push_line(&mut buf, &ChangeLine::Heartbeat { head: *head.borrow() });
                if tx.send(buf.split().freeze()).await.is_err() {
                    return;
                }
            }
            () = tx.closed() => return,
            () = state.shutdown.cancelled() => return,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Digest {
    seq: u64,
    count: u64,
    digest: String,
}

/// `GET /v1/feed/digest`: the digest of the replicated state and the seq it is as
/// of. A replica at the same seq computes the same value.
#[utoipa::path(
    get,
    path = "/v1/feed/digest",
    tag = "feed",
    operation_id = "feed_digest",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "the digest of the replicated state and the seq it is as of", body = Digest),
        (status = 401, description = "missing or invalid credentials", body = ErrorBody),
        (status = 403, description = "the caller is neither the operator nor a key with the `replicate` scope", body = ErrorBody),
    ),
)]
pub async fn digest(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Digest>, ApiError> {
    caller.require_replicate()?;
    let (seq, digest) = state.blocking(|s| Ok(s.store.digest()?)).await?;
    Ok(Json(Digest {
        seq,
        count: digest.count(),
        digest: digest.to_hex(),
    }))
}
