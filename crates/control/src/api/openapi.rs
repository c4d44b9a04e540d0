//! The OpenAPI 3 document of the control plane, served at `GET /v1/openapi.json`.
//!
//! Each operation is described on its handler with `#[utoipa::path]`.
//! [`super::routes`] registers every handler with the router and with the
//! document from one list, so neither can hold a route the other lacks. This
//! module adds what all operations share: the bearer scheme, the error body and
//! the server errors that any authenticated call may answer.

use std::sync::OnceLock;

use axum::Json;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{self, Content, Ref, RefOr, Response};
use utoipa::{Modify, OpenApi};

/// The error body, `{"error":{"code":...,"message":...}}`, as `ApiError` writes it.
pub type ErrorBody = crate::error::Body<'static>;

/// Name of the security scheme that operations refer to.
pub const BEARER: &str = "bearer";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Twofold control API",
        description = "Every change to Twofold's state: tenants and their keys, node keys, \
            users' TOTP factors and backup codes, the audit log, and the feed that data \
            planes replicate from. Errors answer `{\"error\":{\"code\":...,\"message\":...}}`; \
            programs should match on `code`.",
    ),
    // `Enroll` is here because its handler refers to it by name (see there).
    components(schemas(ErrorBody, super::users::Enroll)),
    modifiers(&BearerScheme),
    tags(
        (name = "tenants", description = "Tenants and their API keys (operator only)"),
        (name = "node-keys", description = "Keys that data planes replicate with (operator only)"),
        (name = "users", description = "A tenant's users, with a `manage` key"),
        (name = "audit", description = "The audit log"),
        (name = "keys", description = "Master keys by id, and re-sealing after a rotation (operator only)"),
        (name = "feed", description = "What data planes replicate from (operator or `replicate` key)"),
        (name = "ops", description = "Liveness, readiness, metrics and this document; no credentials"),
    ),
)]
struct Base;

/// Registers the bearer scheme: the operator token (`tfo_...`) or an API key (`tfk_...`).
struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, doc: &mut openapi::OpenApi) {
        let mut http = Http::new(HttpAuthScheme::Bearer);
        http.description = Some(
            "the operator token (`tfo_...`) or an API key (`tfk_...`) with the needed scope"
                .to_owned(),
        );
        doc.components
            .get_or_insert_with(Default::default)
            .add_security_scheme(BEARER, SecurityScheme::Http(http));
    }
}

/// What the document holds before any route is added.
pub(super) fn base() -> openapi::OpenApi {
    Base::openapi()
}

/// Add the answers that every authenticated operation may give because it reads
/// the store to check the credential: `500 internal` and `503
/// database_unavailable` (also the request timeout). They are added here once
/// rather than on each handler.
pub(super) fn add_server_errors(doc: &mut openapi::OpenApi) {
    for item in doc.paths.paths.values_mut() {
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.options,
            &mut item.head,
            &mut item.patch,
            &mut item.trace,
        ];
        for op in operations.into_iter().flatten() {
            if op.security.as_ref().is_none_or(Vec::is_empty) {
                continue;
            }
            let answers = &mut op.responses.responses;
            answers
                .entry("500".to_owned())
                .or_insert_with(|| error_response("internal error; details are in the server log"));
            answers.entry("503".to_owned()).or_insert_with(|| {
                error_response(
                    "database_unavailable: the database is busy, or the request timed out",
                )
            });
        }
    }
}

fn error_response(description: &str) -> RefOr<Response> {
    let mut response = Response::new(description);
    response.content.insert(
        "application/json".to_owned(),
        Content::new(Some(Ref::from_schema_name("ErrorBody"))),
    );
    RefOr::T(response)
}

/// The whole document, as served.
pub fn document() -> openapi::OpenApi {
    super::routes().into_openapi()
}

/// `GET /v1/openapi.json`: this API's OpenAPI 3 document.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "ops",
    operation_id = "openapi",
    responses((status = 200, description = "the OpenAPI 3 document of this API", body = Object)),
)]
pub async fn serve() -> Json<&'static openapi::OpenApi> {
    // Built once: the document only changes with the code.
    static DOCUMENT: OnceLock<openapi::OpenApi> = OnceLock::new();
    Json(DOCUMENT.get_or_init(document))
}
