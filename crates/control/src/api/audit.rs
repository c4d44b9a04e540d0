//! Paging through the audit log. The operator sees every tenant; a `manage` key
//! sees its own tenant only.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use twofold_core::ids::Scope;
use utoipa::{IntoParams, ToSchema};

use super::ApiQuery;
use super::openapi::ErrorBody;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::{AppState, rfc3339};
use crate::store::AuditRow;

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Return records after this id (0 for the first page).
    #[serde(default)]
    after: i64,
    /// Records per page; 100 by default.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// Only this user's records.
    user: Option<String>,
    /// Operator only: one tenant's records.
    tenant: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditRecord {
    id: i64,
    at: String,
    actor: String,
    tenant: Option<String>,
    action: String,
    user: Option<String>,
    target: Option<String>,
}

impl From<AuditRow> for AuditRecord {
    fn from(row: AuditRow) -> AuditRecord {
        AuditRecord {
            id: row.id,
            at: rfc3339(row.at_ms),
            actor: row.actor,
            tenant: row.tenant,
            action: row.action,
            user: row.user,
            target: row.target,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditPage {
    records: Vec<AuditRecord>,
    /// Pass as `after` for the next page; absent on the last page.
    next_after: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/v1/audit",
    tag = "audit",
    operation_id = "audit_page",
    security(("bearer" = [])),
    params(AuditQuery),
    responses(
        (status = 200, description = "one page of records, oldest first", body = AuditPage),
        (status = 400, description = "invalid_query", body = ErrorBody),
        (status = 401, description = "missing or invalid credentials", body = ErrorBody),
        (status = 403, description = "the caller is neither the operator nor a key with the `manage` scope", body = ErrorBody),
    ),
)]
pub async fn page(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<AuditQuery>,
) -> Result<Json<AuditPage>, ApiError> {
    let tenant = match &caller {
        Caller::Operator => query.tenant,
        Caller::Key(_) => Some(caller.tenant_with(Scope::Manage)?.to_owned()),
    };
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("limit must be 1 to {MAX_LIMIT}"),
        ));
    }
    let (after, user) = (query.after, query.user);
    let rows = state
        .blocking(move |s| {
            Ok(s.store
                .audit_page(tenant.as_deref(), user.as_deref(), after, limit)?)
        })
        .await?;
    let next_after = (rows.len() == limit)
        .then(|| rows.last().map(|r| r.id))
        .flatten();
    Ok(Json(AuditPage {
        records: rows.into_iter().map(AuditRecord::from).collect(),
        next_after,
    }))
}
