//! Operational endpoints: liveness, readiness, metrics, the OpenAPI document.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde_json::json;

use super::openapi::ErrorBody;
use crate::error::ApiError;
use crate::state::AppState;

/// Answers while the process is up.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "ops",
    responses((status = 200, description = "the process is up", body = Object, example = json!({"status": "ok"}))),
)]
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Answers 200 when the database is reachable, 503 otherwise.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "ops",
    responses(
        (status = 200, description = "the database is reachable", body = Object,
            example = json!({"status": "ready", "head_seq": 42})),
        (status = 503, description = "database_unavailable", body = ErrorBody),
    ),
)]
pub async fn readyz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    state
        .blocking(|s| {
            s.store.ping().map_err(|e| {
                tracing::warn!(error = %e, "database not reachable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "database_unavailable",
                    "the database is not reachable",
                )
            })
        })
        .await?;
    Ok(Json(
        json!({"status": "ready", "head_seq": state.store.head()}),
    ))
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "ops",
    responses((status = 200, description = "Prometheus text exposition format",
        content_type = "text/plain; version=0.0.4; charset=utf-8", body = String)),
)]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    state.metrics.head_seq.set(state.store.head());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("route")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method",
    )
}
