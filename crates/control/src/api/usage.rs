//! `POST /v1/feed/usage`: data planes report the runtime state they produce
//! (accepted steps, used backup codes, failures), which is merged and published
//! through the feed to every node.

use axum::Json;
use axum::extract::State;
use twofold_core::feed::{BackupCodeUse, BackupCodeUseAck, UsageAck, UsageEvent, UsageReport};
use twofold_core::ids::UserId;

use super::ApiJson;
use super::openapi::ErrorBody;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::AppState;

/// Most events in one report.
pub const MAX_EVENTS: usize = 1000;
/// Largest report body; far above the default body limit, since one report
/// carries many events.
pub const BODY_LIMIT: usize = 1024 * 1024;

/// Who reports, as cursors and audit records name it.
fn caller_name(caller: &Caller) -> String {
    match caller {
        Caller::Operator => "operator".to_owned(),
        Caller::Key(key) => key.id.clone(),
    }
}

fn check(report: &UsageReport) -> Result<(), ApiError> {
    let bad = |message: &str| Err(ApiError::bad_request("invalid_report", message.to_owned()));
    if report.node.is_empty() || report.node.len() > 64 {
        return bad("node must be 1 to 64 bytes");
    }
    if report.events.len() > MAX_EVENTS {
        return bad("too many events in one report");
    }
    for numbered in &report.events {
        if i64::try_from(numbered.id).is_err() {
            return bad("event ids must be below 2^63");
        }
        let (tenant, user) = match &numbered.event {
            UsageEvent::TotpAccepted { tenant, user, .. }
            | UsageEvent::BackupCodeUsed { tenant, user, .. }
            | UsageEvent::Failure { tenant, user, .. }
            | UsageEvent::Success { tenant, user } => (tenant, user),
        };
        if tenant.is_empty() || tenant.len() > 64 || UserId::try_new(user.as_str()).is_err() {
            return bad("an event names an invalid tenant or user");
        }
    }
    Ok(())
}

#[utoipa::path(
    post,
    path = "/v1/feed/usage",
    tag = "feed",
    operation_id = "feed_usage",
    security(("bearer" = [])),
    request_body(content = Object, description = "a usage report: `{\"node\": ..., \"events\": [{\"id\": n, \"type\": \"totp_accepted\" | \"backup_code_used\" | \"failure\" | \"success\", ...}]}` (see docs/feed.md)"),
    responses(
        (status = 200, description = "`{\"through\": id, \"seq\": seq, \"counted_from\": seq}`: events up to `through` are merged, what the merge published is in the log at or before `seq`, and users' states published from `counted_from` on count the events", body = Object),
        (status = 400, description = "invalid_report or invalid_json", body = ErrorBody),
        (status = 401, description = "missing or invalid credentials", body = ErrorBody),
        (status = 403, description = "the caller is neither the operator nor a key with the `replicate` scope", body = ErrorBody),
        (status = 413, description = "body_too_large", body = ErrorBody),
    ),
)]
pub async fn report(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(report): ApiJson<UsageReport>,
) -> Result<Json<UsageAck>, ApiError> {
    caller.require_replicate()?;
    check(&report)?;
    // The cursor belongs to the reporting key as well as the node id it gives,
    // so one key cannot move another's cursor past events it has not sent.
    let cursor = format!("{}/{}", caller_name(&caller), report.node);
    let now = state.clock.now_ms();
    let ack = state
        .blocking(move |s| {
            Ok(s.store
                .apply_usage(now, &cursor, &report.events, &s.config.throttle)?)
        })
        .await?;
    Ok(Json(ack))
}

#[utoipa::path(
    post,
    path = "/v1/feed/backup-code-use",
    tag = "feed",
    operation_id = "feed_backup_code_use",
    security(("bearer" = [])),
    request_body(content = Object, description = "`{\"tenant\", \"user\", \"set_id\", \"index\"}`: a data plane in strict mode asks to mark this backup code used before accepting it"),
    responses(
        (status = 200, description = "`{\"accepted\": bool, \"seq\": seq}`: `accepted` is false when the code was already used or its set replaced", body = Object),
        (status = 400, description = "invalid_report or invalid_json", body = ErrorBody),
        (status = 401, description = "missing or invalid credentials", body = ErrorBody),
        (status = 403, description = "the caller is neither the operator nor a key with the `replicate` scope", body = ErrorBody),
    ),
)]
pub async fn use_backup_code(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(code): ApiJson<BackupCodeUse>,
) -> Result<Json<BackupCodeUseAck>, ApiError> {
    caller.require_replicate()?;
    if code.tenant.is_empty()
        || code.tenant.len() > 64
        || UserId::try_new(code.user.as_str()).is_err()
    {
        return Err(ApiError::bad_request(
            "invalid_report",
            "invalid tenant or user",
        ));
    }
    let node = caller_name(&caller);
    let now = state.clock.now_ms();
    let ack = state
        .blocking(move |s| Ok(s.store.use_backup_code(now, &node, &code)?))
        .await?;
    Ok(Json(ack))
}
