//! The control plane's HTTP API under `/v1`, and the router that serves it.

mod audit;
mod feed;
mod keys;
pub mod openapi;
mod ops;
mod tenants;
mod usage;
mod users;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, StatusCode};
use serde::de::DeserializeOwned;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::ApiError;
use crate::state::AppState;

/// A JSON body whose rejections answer in the API's error format.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    /// The same answers as `axum::Json`, for less work. `axum::Json` tracks the
    /// path to every value as it parses, so that an error can name where it is;
    /// on the usage reports that data planes send for every failed code, that
    /// took 15% of the control plane's CPU (BENCHMARKS.md). A body is parsed
    /// plainly first, and only one that fails is parsed again by `axum::Json`,
    /// for its message.
    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        if !plain_json(request.headers()) {
            // Missing or other JSON content types: `axum::Json` decides.
            let axum::Json(value) = axum::Json::<T>::from_request(request, state).await?;
            return Ok(ApiJson(value));
        }
        let body = Bytes::from_request(request, state)
            .await
            .map_err(|e| ApiError::from(JsonRejection::from(e)))?;
        match serde_json::from_slice(&body) {
            Ok(value) => Ok(ApiJson(value)),
            Err(_) => {
                let axum::Json(value) = axum::Json::<T>::from_bytes(&body)?;
                Ok(ApiJson(value))
            }
        }
    }
}

/// Whether the content type is `application/json`, with or without parameters.
fn plain_json(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("application/json"))
        .is_some_and(|rest| rest.is_empty() || rest.trim_start().starts_with(';'))
}

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

/// Answer `503 timeout` in the API's error format when a request takes longer
/// than [`REQUEST_TIMEOUT`] (for example while the database is locked).
async fn time_limit(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => axum::response::IntoResponse::into_response(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            "the request took too long; retry later",
        )),
    }
}

/// Every route with its OpenAPI operation. The router and the document are both
/// built from this one list, so neither can hold a route the other lacks; add a
/// route here with `routes!`, never with a bare `route`.
pub fn routes() -> OpenApiRouter<AppState> {
    let api = OpenApiRouter::new()
        .routes(routes!(tenants::create, tenants::list))
        .routes(routes!(tenants::show))
        .routes(routes!(tenants::create_key, tenants::list_keys))
        .routes(routes!(tenants::revoke_key))
        .routes(routes!(tenants::create_node_key, tenants::list_node_keys))
        .routes(routes!(tenants::revoke_node_key))
        .routes(routes!(users::delete_user))
        .routes(routes!(users::enroll))
        .routes(routes!(users::activate))
        .routes(routes!(users::list_factors))
        .routes(routes!(users::delete_factor))
        .routes(routes!(
            users::generate_backup_codes,
            users::backup_codes_summary
        ))
        .routes(routes!(users::unlock))
        .routes(routes!(audit::page))
        .routes(routes!(keys::list))
        .routes(routes!(feed::digest))
        .routes({
            // Usage reports carry many events; they get a larger body limit.
            let (schemas, paths, router) = routes!(usage::report);
            (
                schemas,
                paths,
                router.layer(DefaultBodyLimit::max(usage::BODY_LIMIT)),
            )
        })
        .routes(routes!(usage::use_backup_code))
        .layer(axum::middleware::from_fn(time_limit));
    // Feed streams are long-lived, so they sit outside the request timeout.
    let streams = OpenApiRouter::new()
        .routes(routes!(feed::snapshot))
        .routes(routes!(feed::changes));
    let mut all = OpenApiRouter::with_openapi(openapi::base())
        .merge(api)
        .merge(streams)
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::readyz))
        .routes(routes!(ops::metrics))
        .routes(routes!(openapi::serve));
    openapi::add_server_errors(all.get_openapi_mut());
    all
}

/// The whole control-plane application. Tests call it directly; `serve` puts it
/// on a socket.
pub fn app(state: AppState) -> Router {
    let (router, _document) = routes().split_for_parts();
    router
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::metrics::track,
        ))
        .layer(DefaultBodyLimit::max(state.config.body_limit))
        .with_state(state)
}
