//! Paging through the audit log. The operator sees every tenant; a `manage` key
//! sees its own tenant only.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use twofold_core::ids::Scope;

use super::ApiQuery;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::{AppState, rfc3339};
use crate::store::AuditRow;

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Return records after this id (0 for the first page).
    #[serde(default)]
    after: i64,
    limit: Option<usize>,
    user: Option<String>,
    /// Operator only: one tenant's records.
    tenant: Option<String>,
}

#[derive(Debug, Serialize)]
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

#[derive(Debug, Serialize)]
pub struct AuditPage {
    records: Vec<AuditRecord>,
    /// Pass as `after` for the next page; absent on the last page.
    next_after: Option<i64>,
}

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
