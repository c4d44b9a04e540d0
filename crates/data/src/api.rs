//! The data plane's HTTP API: `POST /v1/verify`, and the operational endpoints.
//! Nothing here calls the control plane or a remote database: a request reads
//! the in-memory index and writes this node's local outbox.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::json;
use twofold_core::feed::{BackupCodeUse, UsageEvent};
use twofold_core::ids::{API_KEY_HASH_DOMAIN, UserId};

use crate::index::{LocalEvent, user_key};
use crate::metrics::OutcomeLabels;
use crate::node::Node;
use crate::report;
use crate::verify::{Attempt, Outcome};

/// Longest code input looked at; anything longer is refused as malformed.
const MAX_CODE_LEN: usize = 64;

/// An error answered as `{"error":{"code":...,"message":...}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or invalid API key",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyRequest {
    user: String,
    code: String,
}

impl std::fmt::Debug for VerifyRequest {
    /// The code never appears in debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyRequest")
            .field("user", &self.user)
            .field("code", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Serialize)]
struct VerifyResponse {
    valid: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    factor: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    factor_id: Option<String>,
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn parse_request(headers: &HeaderMap, body: &[u8]) -> Result<VerifyRequest, ApiError> {
    let json = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "expected content-type application/json",
        ));
    }
    let request: VerifyRequest = serde_json::from_slice(body).map_err(|e| {
        // serde's message names the problem and position, never the secret value
        // of a well-typed field; the body is never logged.
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("invalid request body: {e}"),
        )
    })?;
    UserId::try_new(request.user.as_str())
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_user", e.to_string()))?;
    if request.code.len() > MAX_CODE_LEN {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_code",
            format!("code must be at most {MAX_CODE_LEN} bytes"),
        ));
    }
    Ok(request)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `POST /v1/verify`.
async fn verify(State(node): State<Arc<Node>>, request: Request) -> Response {
    let started = Instant::now();
    // The headers are taken out rather than extracted, which would copy them.
    let (mut parts, body) = request.into_parts();
    let headers = std::mem::take(&mut parts.headers);
    // The request's extensions carry the body limit.
    let body = Bytes::from_request(Request::from_parts(parts, body), &()).await;
    let result = match body {
        Ok(body) => verify_inner(&node, &headers, &body).await,
        Err(rejection) => Err(ApiError::new(
            rejection.status(),
            "invalid_body",
            rejection.body_text(),
        )),
    };
    let (label, response) = match result {
        Ok((label, response)) => (label, response),
        Err(e) => ("error", e.into_response()),
    };
    node.metrics
        .verifications
        .get_or_create(&OutcomeLabels { outcome: label })
        .inc();
    node.metrics
        .verify_latency
        .observe(started.elapsed().as_secs_f64());
    response
}

async fn verify_inner(
    node: &Node,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(&'static str, Response), ApiError> {
    let token = bearer(headers).ok_or_else(ApiError::unauthorized)?;
    let hash = node
        .config
        .keyring
        .hash_key()
        .hash(API_KEY_HASH_DOMAIN, token.as_bytes());
    let request = parse_request(headers, body)?;
    let (mut outcome, mut events) = {
        let index = node.index();
        let key = index.key(&hash).ok_or_else(ApiError::unauthorized)?;
        let attempt = Attempt {
            tenant: &key.tenant,
            user: &request.user,
            code: &request.code,
            now: now_secs(),
        };
        index
            .with_user(&key.tenant, &request.user, |user| {
                node.verifier
                    .attempt(user, attempt, &mut || node.next_event_id())
            })
            .unwrap_or_else(|| {
                let ukey = user_key(&key.tenant, &request.user);
                (node.verifier.attempt_unknown(&ukey, attempt), Vec::new())
            })
    };
    // The events' ids stay in flight until the events reach the outbox (or are
    // dropped), so the reporter never sends a later id before an earlier one.
    let mut in_flight = InFlight {
        node,
        ids: events.iter().map(|(id, _)| *id).collect(),
    };
    if node.config.strict_backup_codes
        && let Some(code) = backup_use(&events)
    {
        match report::confirm_backup_code(node, &code).await {
            Ok(ack) if ack.accepted => {}
            Ok(_) => {
                // Used on another node already: the same answer as any wrong
                // code, and counted as one.
                outcome = Outcome::Invalid;
                events = fail_instead(node, &code, &events);
                in_flight.ids.extend(events.iter().map(|(id, _)| *id));
            }
            Err(e) => {
                tracing::warn!(error = %e, "strict mode: no control plane confirmed a backup code");
                unmark_backup(node, &code, &events);
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "control_plane_unavailable",
                    "backup codes need the control plane in strict mode, and it is unreachable; retry",
                ));
            }
        }
    }
    if !events.is_empty() {
        // Replay protection must survive a crash before a code is reported valid,
        // so a success waits for the outbox to commit, and fails closed if it
        // cannot. A failure only counts towards throttling: it is queued for a
        // group commit about `outbox::LINGER` later, without holding the answer
        // (a crash in between forgets those few milliseconds of failures).
        let recorded = if matches!(outcome, Outcome::Valid { .. }) {
            let submitted = node.outbox.submit(events);
            drop(in_flight);
            match submitted {
                Ok(committed) => committed.await,
                Err(e) => Err(e),
            }
        } else {
            let recorded = node.outbox.record(events);
            drop(in_flight);
            recorded
        };
        if let Err(e) = recorded {
            tracing::error!(error = %e, "cannot record usage; refusing the attempt");
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the node cannot record this attempt; retry",
            ));
        }
        node.report_wake.notify_one();
    }
    Ok(match outcome {
        Outcome::Valid { kind, factor_id } => (
            "valid",
            Json(VerifyResponse {
                valid: true,
                factor: Some(kind.as_str()),
                factor_id: Some(factor_id),
            })
            .into_response(),
        ),
        Outcome::Invalid => (
            "invalid",
            Json(VerifyResponse {
                valid: false,
                factor: None,
                factor_id: None,
            })
            .into_response(),
        ),
        Outcome::Throttled { retry_after } => {
            let mut response = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "throttled",
                "too many failed attempts for this user; retry later",
            )
            .into_response();
            if let Ok(value) = HeaderValue::from_str(&retry_after.max(1).to_string()) {
                response.headers_mut().insert(RETRY_AFTER, value);
            }
            ("throttled", response)
        }
        Outcome::Locked => (
            "locked",
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "locked",
                "too many failed attempts; the user is locked until unlocked on the control plane",
            )
            .into_response(),
        ),
    })
}

/// Event ids handed out for one attempt, released when dropped: after the
/// events are submitted to the outbox, or on any early return.
struct InFlight<'a> {
    node: &'a Node,
    ids: Vec<u64>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.node.release_events(self.ids.drain(..));
    }
}

/// The backup-code use among an attempt's events, if any.
fn backup_use(events: &[(u64, UsageEvent)]) -> Option<BackupCodeUse> {
    events.iter().find_map(|(_, event)| match event {
        UsageEvent::BackupCodeUsed {
            tenant,
            user,
            set_id,
            index,
        } => Some(BackupCodeUse {
            tenant: tenant.clone(),
            user: user.clone(),
            set_id: set_id.clone(),
            index: *index,
        }),
        _ => None,
    })
}

/// Strict mode could not confirm a use: give the code back on this node, so the
/// user can try it again once the control plane answers, and forget the success
/// the attempt recorded here, which would otherwise reset the user's failures.
fn unmark_backup(node: &Node, code: &BackupCodeUse, events: &[(u64, UsageEvent)]) {
    node.index().with_user(&code.tenant, &code.user, |user| {
        for (id, _) in events {
            user.forget_event(*id);
        }
        if let Some(set) = user
            .backup_mut()
            .filter(|s| &*s.set_id == code.set_id.as_str())
            && let Some(used) = set.used.get_mut(code.index as usize)
        {
            *used = false;
        }
    });
}

/// Strict mode found the code used elsewhere: forget the success the attempt
/// recorded here and count a failure instead, as for any wrong code.
fn fail_instead(
    node: &Node,
    code: &BackupCodeUse,
    events: &[(u64, UsageEvent)],
) -> Vec<(u64, UsageEvent)> {
    node.index()
        .with_user(&code.tenant, &code.user, |user| {
            for (id, _) in events {
                user.forget_event(*id);
            }
            let at = now_secs();
            let id = node.next_event_id();
            user.push_event(id, LocalEvent::Failure { at });
            vec![(
                id,
                UsageEvent::Failure {
                    tenant: code.tenant.clone(),
                    user: code.user.clone(),
                    at,
                },
            )]
        })
        .unwrap_or_default()
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Ready once a replica is loaded, whether or not a control plane is reachable.
async fn readyz(State(node): State<Arc<Node>>) -> Response {
    let applied = node.sync.applied.load(Ordering::SeqCst);
    if node.sync.ready.load(Ordering::SeqCst) {
        Json(json!({"status": "ready", "applied_seq": applied})).into_response()
    } else {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "no replica loaded yet; waiting for the first sync",
        )
        .into_response()
    }
}

async fn metrics(State(node): State<Arc<Node>>) -> Response {
    node.metrics.outbox_depth.set(node.outbox.unacked());
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        node.metrics.render(&node.sync),
    )
        .into_response()
}

/// `GET /v1/replica/digest`: the digest of the replica on disk, comparable with
/// the control plane's `GET /v1/feed/digest`.
async fn digest(State(node): State<Arc<Node>>) -> Response {
    let dir = node.config.data_dir.clone();
    let result = tokio::task::spawn_blocking(move || crate::replica::digest_of(&dir)).await;
    match result {
        Ok(Ok((seq, digest))) => {
            Json(json!({"seq": seq, "count": digest.count(), "digest": digest.to_hex()}))
                .into_response()
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "cannot compute the replica digest");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error; see the server log",
            )
            .into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "digest task failed");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error; see the server log",
            )
            .into_response()
        }
    }
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "route not found")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method",
    )
}

/// The data-plane application.
pub fn app(node: Arc<Node>) -> Router {
    Router::new()
        .route("/v1/verify", post(verify))
        .route("/v1/replica/digest", get(digest))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(node.config.body_limit))
        .with_state(node)
}
