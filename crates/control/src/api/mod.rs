//! The control plane's HTTP API under `/v1`, and the router that serves it.

mod audit;
mod feed;
mod ops;
mod tenants;
mod users;

use axum::Router;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use tower_http::timeout::TimeoutLayer;

use crate::error::ApiError;
use crate::state::AppState;

/// A JSON body whose rejections answer in the API's error format.
#[derive(Debug, FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

/// A path whose rejections answer in the API's error format.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

/// A query string whose rejections answer in the API's error format.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> ApiError {
        ApiError::bad_request("invalid_path", r.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> ApiError {
        ApiError::bad_request("invalid_query", r.body_text())
    }
}

/// How long a plain (non-streaming) request may take before it is answered 503.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The whole control-plane application. Tests call it directly; `serve` puts it
/// on a socket.
pub fn app(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/tenants", post(tenants::create).get(tenants::list))
        .route("/v1/tenants/{tenant}", get(tenants::show))
        .route(
            "/v1/tenants/{tenant}/keys",
            post(tenants::create_key).get(tenants::list_keys),
        )
        .route(
            "/v1/tenants/{tenant}/keys/{key}",
            delete(tenants::revoke_key),
        )
        .route(
            "/v1/node-keys",
            post(tenants::create_node_key).get(tenants::list_node_keys),
        )
        .route("/v1/node-keys/{key}", delete(tenants::revoke_node_key))
        .route("/v1/users/{user}", delete(users::delete_user))
        .route("/v1/users/{user}/totp", post(users::enroll))
        .route(
            "/v1/users/{user}/totp/{factor}/activate",
            post(users::activate),
        )
        .route("/v1/users/{user}/factors", get(users::list_factors))
        .route(
            "/v1/users/{user}/factors/{factor}",
            delete(users::delete_factor),
        )
        .route(
            "/v1/users/{user}/backup-codes",
            post(users::generate_backup_codes).get(users::backup_codes_summary),
        )
        .route("/v1/users/{user}/unlock", post(users::unlock))
        .route("/v1/audit", get(audit::page))
        .route("/v1/feed/digest", get(feed::digest))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            REQUEST_TIMEOUT,
        ));
    // Feed streams are long-lived, so they sit outside the request timeout.
    let streams = Router::new()
        .route("/v1/feed/snapshot", get(feed::snapshot))
        .route("/v1/feed/changes", get(feed::changes));
    Router::new()
        .merge(api)
        .merge(streams)
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::metrics::track,
        ))
        .layer(DefaultBodyLimit::max(state.config.body_limit))
        .with_state(state)
}
