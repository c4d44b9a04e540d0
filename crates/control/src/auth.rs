//! Who is calling: the operator (bootstrap token) or an API key with scopes.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use twofold_core::ids::Scope;

use crate::error::ApiError;
use crate::state::AppState;
use crate::store::{Actor, KeyRow};

/// Hash domains keep an operator token from ever matching an API key's hash.
pub const OPERATOR_DOMAIN: &str = "operator-token";
pub const API_KEY_DOMAIN: &str = twofold_core::ids::API_KEY_HASH_DOMAIN;
/// Token prefixes tell a reader what a leaked string is.
pub const OPERATOR_PREFIX: &str = "tfo_";
pub const API_KEY_PREFIX: &str = "tfk_";

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub enum Caller {
    Operator,
    Key(KeyRow),
}

impl Caller {
    pub fn actor(&self) -> Actor {
        match self {
            Caller::Operator => Actor::Operator,
            Caller::Key(key) => Actor::Key(key.id.clone()),
        }
    }

    pub fn require_operator(&self) -> Result<(), ApiError> {
        match self {
            Caller::Operator => Ok(()),
            Caller::Key(_) => Err(ApiError::forbidden()),
        }
    }

    /// The tenant of a key holding `scope`.
    pub fn tenant_with(&self, scope: Scope) -> Result<&str, ApiError> {
        match self {
            Caller::Key(KeyRow {
                tenant: Some(tenant),
                scopes,
                ..
            }) if scopes.contains(&scope) => Ok(tenant),
            _ => Err(ApiError::forbidden()),
        }
    }

    /// The operator, or a node key holding `replicate`.
    pub fn require_replicate(&self) -> Result<(), ApiError> {
        match self {
            Caller::Operator => Ok(()),
            Caller::Key(key) if key.scopes.contains(&Scope::Replicate) => Ok(()),
            Caller::Key(_) => Err(ApiError::forbidden()),
        }
    }
}

fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Caller, ApiError> {
        let token = bearer(parts).ok_or_else(ApiError::unauthorized)?;
        if token.is_empty() || token.len() > 256 {
            return Err(ApiError::unauthorized());
        }
        let hash_key = state.config.keyring.hash_key();
        if token.starts_with(OPERATOR_PREFIX) {
            let stored = state
                .blocking(|s| Ok(s.store.operator_token_hash()?))
                .await?;
            let stored: Option<[u8; 32]> = stored.and_then(|h| h.try_into().ok());
            return match stored {
                Some(stored) if hash_key.verify(OPERATOR_DOMAIN, token.as_bytes(), &stored) => {
                    Ok(Caller::Operator)
                }
                _ => Err(ApiError::unauthorized()),
            };
        }
        let hash = hash_key.hash(API_KEY_DOMAIN, token.as_bytes());
        let key = state
            .blocking(move |s| Ok(s.store.key_by_hash(&hash)?))
            .await?;
        key.map(Caller::Key).ok_or_else(ApiError::unauthorized)
    }
}
