//! Tenants, their API keys, and node keys (operator only).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use twofold_core::ids::{ApiKeyId, Scope, TenantId};
use twofold_core::secret::random_token;
use utoipa::ToSchema;

use super::openapi::ErrorBody;
use super::{ApiJson, ApiPath};
use crate::auth::{API_KEY_DOMAIN, API_KEY_PREFIX, Caller};
use crate::error::ApiError;
use crate::state::{AppState, rfc3339};
use crate::store::{KeyRow, TenantRow};

/// Longest tenant or key name, in bytes.
const MAX_NAME_LEN: usize = 128;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    /// 1 to 128 bytes, without control characters.
    name: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Tenant {
    id: String,
    name: String,
    created_at: String,
}

impl From<TenantRow> for Tenant {
    fn from(row: TenantRow) -> Tenant {
        Tenant {
            id: row.id,
            name: row.name,
            created_at: rfc3339(row.created_ms),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TenantList {
    tenants: Vec<Tenant>,
}

fn check_name(name: &str, what: &str) -> Result<(), ApiError> {
    if name.trim().is_empty() || name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "invalid_name",
            format!("{what} must be 1 to {MAX_NAME_LEN} bytes without control characters"),
        ));
    }
    Ok(())
}

/// A tenant id from the path; a malformed one is as missing as an unknown one.
fn tenant_id(raw: &str) -> Result<TenantId, ApiError> {
    raw.parse().map_err(|_| ApiError::not_found("tenant"))
}

#[utoipa::path(
    post,
    path = "/v1/tenants",
    tag = "tenants",
    operation_id = "create_tenant",
    security(("bearer" = [])),
    request_body = CreateTenant,
    responses(
        (status = 201, description = "the tenant was created", body = Tenant),
        (status = 400, description = "invalid_name or invalid_json", body = ErrorBody),
        (status = 401, description = "missing or invalid credentials", body = ErrorBody),
        (status = 403, description = "the caller is not the operator", body = ErrorBody),
        (status = 413, description = "body_too_large", body = ErrorBody),
        (status = 415, description = "the body is not declared as application/json", body = ErrorBody),
        (status = 422, description = "the body does not match the schema", body = ErrorBody),
    ),
)]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateTenant>,
) -> Result<(StatusCode, Json<Tenant>), ApiError> {
    caller.require_operator()?;
    check_name(&body.name, "name")?;
    let row = TenantRow {
        id: TenantId::generate()
            .map_err(ApiError::internal)?
            .to_string(),
        name: body.name,
        created_ms: state.clock.now_ms(),
    };
    let actor = caller.actor();
    let row = state
        .blocking(move |s| {
            s.store.create_tenant(row.created_ms, &actor, &row)?;
            Ok(row)
        })
        .await?;
    tracing::info!(tenant = %row.id, "tenant created");
    Ok((StatusCode::CREATED, Json(row.into())))
}

#[utoipa::path(
    get,
    path = "/v1/tenants",
    tag = "tenants",
    operation_id = "list_tenants",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "every tenant", body = TenantList),
        (status = 401, description = "missing or invalid credentials", body = ErrorBody),
        (status = 403, description = "the caller is not the operator", body = ErrorBody),
    ),
)]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<TenantList>, ApiError> {
    caller.require_operator()?;
    let rows = state.blocking(|s| Ok(s.store.list_tenants()?)).await?;
    Ok(Json(TenantList {
        tenants: rows.into_iter().map(Tenant::from).collect(),
    }))
}

#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant}",
    tag = "tenants",
    operation_id = "show_tenant",
    security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant id")),
    responses(
        (status = 200, description = "the tenant", body = Tenant),
        (status = 401, description = "missing or invalid credentials", body = ErrorBody),
        (status = 403, description = "the caller is not the operator", body = ErrorBody),
        (status = 404, description = "no such tenant", body = ErrorBody),
    ),
)]
pub async fn show(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(tenant): ApiPath<String>,
) -> Result<Json<Tenant>, ApiError> {
    caller.require_operator()?;
    let tenant = tenant_id(&tenant)?;
    let row = state
        .blocking(move |s| Ok(s.store.tenant(tenant.as_str())?))
        .await?;
    Ok(Json(row.into()))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    #[serde(default)]
    name: Option<String>,
    /// `manage`, `verify` or both.
    #[schema(example = json!(["verify"]))]
    scopes: Vec<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateNodeKey {
    #[serde(default)]
    name: Option<String>,
}

/// A key as listed: never its secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct Key {
    id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    tenant: Option<String>,
    name: String,
    scopes: Vec<&'static str>,
    created_at: String,
    revoked_at: Option<String>,
}

impl From<KeyRow> for Key {
    fn from(row: KeyRow) -> Key {
        Key {
            id: row.id,
            tenant: row.tenant,
            name: row.name,
            scopes: row.scopes.iter().map(|s| s.as_str()).collect(),
            created_at: rfc3339(row.created_ms),
            revoked_at: row.revoked_ms.map(rfc3339),
        }
    }
}

/// A key just created: the only time its secret is shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct NewKey {
    #[serde(flatten)]
    key: Key,
    secret: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KeyList {
    keys: Vec<Key>,
}

fn parse_scopes(raw: &[String]) -> Result<Vec<Scope>, ApiError> {
    let mut scopes = Vec::new();
    for s in raw {
        let scope: Scope = s.parse().map_err(|e: twofold_core::ids::IdError| {
            ApiError::bad_request("invalid_scope", e.to_string())
        })?;
        if scope == Scope::Replicate {
            return Err(ApiError::bad_request(
                "invalid_scope",
                "replicate keys belong to nodes, not tenants; create one with POST /v1/node-keys",
            ));
        }
        if !scopes.contains(&scope) {
            scopes.push(scope);
        }
    }
    if scopes.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_scope",
            "give at least one scope: manage or verify",
        ));
    }
    scopes.sort();
    Ok(scopes)
}

async fn issue_key(
    state: &AppState,
    caller: &Caller,
    tenant: Option<String>,
    name: Option<String>,
    scopes: Vec<Scope>,
) -> Result<(StatusCode, Json<NewKey>), ApiError> {
    let name = name.unwrap_or_default();
    if !name.is_empty() {
        check_name(&name, "name")?;
    }
    let secret = random_token(API_KEY_PREFIX).map_err(ApiError::internal)?;
    let row = KeyRow {
        id: ApiKeyId::generate()
            .map_err(ApiError::internal)?
            .to_string(),
        tenant,
        name,
        hash: state
            .config
            .keyring
            .hash_key()
            .hash(API_KEY_DOMAIN, secret.as_bytes())
            .to_vec(),
        scopes,
        created_ms: state.clock.now_ms(),
        revoked_ms: None,
    };
    let actor = caller.actor();
    let row = state
        .blocking(move |s| {
            s.store.create_api_key(row.created_ms, &actor, &row)?;
            Ok(row)
        })
        .await?;
    tracing::info!(key = %row.id, tenant = ?row.tenant, "api key created");
    Ok((
        StatusCode::CREATED,
        Json(NewKey {
            key: row.into(),
            secret: secret.to_string(),
        }),
    ))
}

#[utoipa::path(
    post,
    path = "/v1/tenants/{tenant}/keys",
    tag = "tenants",
    operation_id = "create_tenant_key",
    security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant id")),
    request_body = CreateKey,
    responses(
        (status = 201, description = "the key was created; its secret is shown only now", body = NewKey),
        (status = 400, description = "invalid_scope, invalid_name or invalid_json", body = ErrorBody),
        (status = 401, description = "missing or invalid credentials", body = ErrorBody),
        (status = 403, description = "the caller is not the operator", body = ErrorBody),
        (status = 404, description = "no such tenant", body = ErrorBody),
        (status = 413, description = "body_too_large", body = ErrorBody),
        (status = 415, description = "the body is not declared as application/json", body = ErrorBody),
        (status = 422, description = "the body does not match the schema", body = ErrorBody),
    ),
)]
pub async fn create_key(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(tenant): ApiPath<String>,
    ApiJson(body): ApiJson<CreateKey>,
) -> Result<(StatusCode, Json<NewKey>), ApiError> {
    caller.require_operator()?;
    let tenant = tenant_id(&tenant)?;
    let scopes = parse_scopes(&body.scopes)?;
    issue_key(&state, &caller, Some(tenant.to_string()), body.name, scopes).await
}

#[utoipa::path(
    post,
    path = "/v1/node-keys",
    tag = "node-keys",
    security(("bearer" = [])),
    request_body = CreateNodeKey,
    responses(
        (status = 201, description = "the node key (scope `replicate`) was created; its secret is shown only now", body = NewKey),
        (status = 400, description = "invalid_name or invalid_json", body = ErrorBody),
        (status = 401, description = "missing or invalid credentials", body = ErrorBody),
        (status = 403, description = "the caller is not the operator", body = ErrorBody),
        (status = 413, description = "body_too_large", body = ErrorBody),
        (status = 415, description = "the body is not declared as application/json", body = ErrorBody),
        (status = 422, description = "the body does not match the schema", body = ErrorBody),
    ),
)]
pub async fn create_node_key(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateNodeKey>,
) -> Result<(StatusCode, Json<NewKey>), ApiError> {
    caller.require_operator()?;
    issue_key(&state, &caller, None, body.name, vec![Scope::Replicate]).await
}

async fn keys_of(state: &AppState, tenant: Option<String>) -> Result<Json<KeyList>, ApiError> {
    let rows = state
        .blocking(move |s| Ok(s.store.list_api_keys(tenant.as_deref())?))
        .await?;
    Ok(Json(KeyList {
        keys: rows.into_iter().map(Key::from).collect(),
    }))
}

#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant}/keys",
    tag = "tenants",
    operation_id = "list_tenant_keys",
    security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant id")),
    responses(
        (status = 200, description = "the tenant's keys, revoked ones included", body = KeyList),
        (status = 401, description = "missing or invalid credentials", body = ErrorBody),
        (status = 403, description = "the caller is not the operator", body = ErrorBody),
        (status = 404, description = "no such tenant", body = ErrorBody),
    ),
)]
pub async fn list_keys(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(tenant): ApiPath<String>,
) -> Result<Json<KeyList>, ApiError> {
    caller.require_operator()?;
    keys_of(&state, Some(tenant_id(&tenant)?.to_string())).await
}

#[utoipa::path(
    get,
    path = "/v1/node-keys",
    tag = "node-keys",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "every node key, revoked ones included", body = KeyList),
        (status = 401, description = "missing or invalid credentials", body = ErrorBody),
        (status = 403, description = "the caller is not the operator", body = ErrorBody),
    ),
)]
pub async fn list_node_keys(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<KeyList>, ApiError> {
    caller.require_operator()?;
    keys_of(&state, None).await
}

async fn revoke(
    state: &AppState,
    caller: &Caller,
    tenant: Option<String>,
    key: String,
) -> Result<StatusCode, ApiError> {
    let now = state.clock.now_ms();
    let actor = caller.actor();
    state
        .blocking(move |s| {
            Ok(s.store
                .revoke_api_key(now, &actor, tenant.as_deref(), &key)?)
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    delete,
    path = "/v1/tenants/{tenant}/keys/{key}",
    tag = "tenants",
    operation_id = "revoke_tenant_key",
    security(("bearer" = [])),
    params(
        ("tenant" = String, Path, description = "tenant id"),
        ("key" = String, Path, description = "key id"),
    ),
    responses(
        (status = 204, description = "the key is revoked (revoking twice is not an error)"),
        (status = 401, description = "missing or invalid credentials", body = ErrorBody),
        (status = 403, description = "the caller is not the operator", body = ErrorBody),
        (status = 404, description = "no such tenant, or no such key in it", body = ErrorBody),
    ),
)]
pub async fn revoke_key(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((tenant, key)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    caller.require_operator()?;
    revoke(&state, &caller, Some(tenant_id(&tenant)?.to_string()), key).await
}

#[utoipa::path(
    delete,
    path = "/v1/node-keys/{key}",
    tag = "node-keys",
    security(("bearer" = [])),
    params(("key" = String, Path, description = "node key id")),
    responses(
        (status = 204, description = "the node key is revoked (revoking twice is not an error)"),
        (status = 401, description = "missing or invalid credentials", body = ErrorBody),
        (status = 403, description = "the caller is not the operator", body = ErrorBody),
        (status = 404, description = "no such node key", body = ErrorBody),
    ),
)]
pub async fn revoke_node_key(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(key): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    caller.require_operator()?;
    revoke(&state, &caller, None, key).await
}
