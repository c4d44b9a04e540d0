//! The master keys as the operator sees them during a rotation: which key is
//! active, which is primary, and how many stored secrets each seals. Ids only;
//! keys never leave the key file.

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use super::openapi::ErrorBody;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::reseal;
use crate::state::AppState;

/// One master key, by id.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyUse {
    /// The key id, as in sealed blobs and logs (8 hex digits).
    id: String,
    /// Stored TOTP secrets, pending or active, sealed under this key.
    secrets: u64,
    active: bool,
    primary: bool,
    /// Whether this control plane's keyring holds the key.
    in_keyring: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Keys {
    /// The key that seals everything new (the last of the key file).
    active: String,
    /// The key of the hashes of API keys and backup codes (the first of the key
    /// file). It is never rotated, so it stays in the key file.
    primary: String,
    /// Whether every stored secret is sealed under the active key.
    resealed: bool,
    /// Keys that seal nothing and are neither active nor primary: they may be
    /// removed from the key files.
    removable: Vec<String>,
    keys: Vec<KeyUse>,
}

/// `GET /v1/keys`: the master keys by id, and what each seals.
#[utoipa::path(
    get,
    path = "/v1/keys",
    tag = "keys",
    operation_id = "keys_list",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "the active and primary key ids, and the secrets each key seals", body = Keys),
        (status = 401, description = "missing or invalid credentials", body = ErrorBody),
        (status = 403, description = "the caller is not the operator", body = ErrorBody),
    ),
)]
pub async fn list(State(state): State<AppState>, caller: Caller) -> Result<Json<Keys>, ApiError> {
    caller.require_operator()?;
    let report = state
        .blocking(|s| Ok(reseal::report(&s.store, &s.config.keyring)?))
        .await?;
    Ok(Json(Keys {
        active: report.active.to_string(),
        primary: report.primary.to_string(),
        resealed: report.resealed(),
        removable: report.removable().iter().map(|k| k.to_string()).collect(),
        keys: report
            .keys
            .iter()
            .map(|k| KeyUse {
                id: k.id.to_string(),
                secrets: k.secrets,
                active: k.id == report.active,
                primary: k.id == report.primary,
                in_keyring: k.in_keyring,
            })
            .collect(),
    }))
}
