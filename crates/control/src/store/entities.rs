//! Rows of the control plane's tables, and the feed entities built from them.
//!
//! Each replicated entity is built by one function here, used both when a
//! mutation publishes it and when a snapshot streams it, so the two can never
//! disagree.

use rusqlite::{Connection, OptionalExtension, Row, params};
use twofold_core::feed::{
    ApiKeyRecord, BackupCodeEntry, BackupCodesRecord, Entity, TenantRecord, TotpRecord,
    UserStateRecord,
};
use twofold_core::ids::Scope;

use super::{FactorRow, FactorStatus, KeyRow, Result, StoreError, TenantRow, UserStateRow};

pub(super) const FACTOR_COLUMNS: &str = "id, tenant, user, label, issuer, algorithm, digits, period, sealed, \
     status, created_ms, expires_ms, activated_ms, last_step";

pub(super) fn tenant_row(r: &Row<'_>) -> rusqlite::Result<TenantRow> {
    Ok(TenantRow {
        id: r.get(0)?,
        name: r.get(1)?,
        created_ms: r.get(2)?,
    })
}

pub(super) fn tenant(row: &TenantRow) -> Entity {
    Entity::Tenant(TenantRecord {
        id: row.id.clone(),
        name: row.name.clone(),
    })
}

pub(super) fn scopes_text(scopes: &[Scope]) -> String {
    scopes
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

pub(super) fn key_row(r: &Row<'_>) -> rusqlite::Result<KeyRow> {
    let scopes: String = r.get(4)?;
    Ok(KeyRow {
        id: r.get(0)?,
        tenant: r.get(1)?,
        name: r.get(2)?,
        hash: r.get(3)?,
        scopes: scopes.split(',').filter_map(|s| s.parse().ok()).collect(),
        created_ms: r.get(5)?,
        revoked_ms: r.get(6)?,
    })
}

/// Data planes see only live tenant keys that may verify.
pub(super) fn api_key(row: &KeyRow) -> Option<Entity> {
    let tenant = row.tenant.clone()?;
    if row.revoked_ms.is_some() || !row.scopes.contains(&Scope::Verify) {
        return None;
    }
    Some(Entity::ApiKey(ApiKeyRecord {
        id: row.id.clone(),
        tenant,
        hash: row.hash.clone(),
        scopes: vec![Scope::Verify.as_str().to_owned()],
    }))
}

pub(super) fn factor_row(r: &Row<'_>) -> rusqlite::Result<FactorRow> {
    let status: String = r.get(9)?;
    let last_step: Option<i64> = r.get(13)?;
    Ok(FactorRow {
        id: r.get(0)?,
        tenant: r.get(1)?,
        user: r.get(2)?,
        label: r.get(3)?,
        issuer: r.get(4)?,
        algorithm: r.get(5)?,
        digits: r.get(6)?,
        period: r.get(7)?,
        sealed: r.get(8)?,
        status: if status == "active" {
            FactorStatus::Active
        } else {
            FactorStatus::Pending
        },
        created_ms: r.get(10)?,
        expires_ms: r.get(11)?,
        activated_ms: r.get(12)?,
        last_step: last_step.map(|s| s as u64),
    })
}

pub(super) fn insert_factor(conn: &Connection, row: &FactorRow) -> Result<()> {
    conn.execute(
        &format!("INSERT INTO totp_factors ({FACTOR_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"),
        params![
            row.id,
            row.tenant,
            row.user,
            row.label,
            row.issuer,
            row.algorithm,
            row.digits,
            row.period,
            row.sealed,
            match row.status {
                FactorStatus::Active => "active",
                FactorStatus::Pending => "pending",
            },
            row.created_ms,
            row.expires_ms,
            row.activated_ms,
            row.last_step.map(|s| s as i64),
        ],
    )?;
    Ok(())
}

pub(super) fn factor(
    conn: &Connection,
    tenant: &str,
    user: &str,
    id: &str,
) -> Result<Option<FactorRow>> {
    conn.query_row(
        &format!(
            "SELECT {FACTOR_COLUMNS} FROM totp_factors WHERE id = ? AND tenant = ? AND user = ?"
        ),
        params![id, tenant, user],
        factor_row,
    )
    .optional()
    .map_err(StoreError::from)
}

pub(super) fn factors_of(conn: &Connection, tenant: &str, user: &str) -> Result<Vec<FactorRow>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {FACTOR_COLUMNS} FROM totp_factors WHERE tenant = ? AND user = ? ORDER BY created_ms, id"
    ))?;
    let rows = stmt.query_map(params![tenant, user], factor_row)?;
    rows.collect::<rusqlite::Result<_>>()
        .map_err(StoreError::from)
}

pub(super) fn totp(row: &FactorRow) -> Entity {
    Entity::Totp(TotpRecord {
        id: row.id.clone(),
        tenant: row.tenant.clone(),
        user: row.user.clone(),
        algorithm: row.algorithm.clone(),
        digits: row.digits,
        period: row.period,
        sealed: row.sealed.clone(),
        last_step: row.last_step,
    })
}

pub(super) fn codes_text(codes: &[BackupCodeEntry]) -> Result<String> {
    serde_json::to_string(codes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

pub(super) fn parse_codes(text: &str) -> rusqlite::Result<Vec<BackupCodeEntry>> {
    serde_json::from_str(text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

/// The user's set id and codes, if they have a set.
pub(super) fn backup_codes_of(
    conn: &Connection,
    tenant: &str,
    user: &str,
) -> Result<Option<(String, Vec<BackupCodeEntry>)>> {
    conn.query_row(
        "SELECT set_id, codes FROM backup_codes WHERE tenant = ? AND user = ?",
        params![tenant, user],
        |r| {
            Ok((
                r.get::<_, String>(0)?,
                parse_codes(&r.get::<_, String>(1)?)?,
            ))
        },
    )
    .optional()
    .map_err(StoreError::from)
}

pub(super) fn backup_codes(
    tenant: &str,
    user: &str,
    set_id: &str,
    codes: Vec<BackupCodeEntry>,
) -> Entity {
    Entity::BackupCodes(BackupCodesRecord {
        tenant: tenant.to_owned(),
        user: user.to_owned(),
        set_id: set_id.to_owned(),
        codes,
    })
}

pub(super) fn user_state_of(
    conn: &Connection,
    tenant: &str,
    user: &str,
) -> Result<Option<UserStateRow>> {
    conn.query_row(
        "SELECT failures, locked, throttled_until FROM user_state WHERE tenant = ? AND user = ?",
        params![tenant, user],
        user_state_row,
    )
    .optional()
    .map_err(StoreError::from)
}

pub(super) fn user_state_row(r: &Row<'_>) -> rusqlite::Result<UserStateRow> {
    let until: Option<i64> = r.get(2)?;
    Ok(UserStateRow {
        failures: r.get(0)?,
        locked: r.get(1)?,
        throttled_until: until.map(|u| u as u64),
    })
}

pub(super) fn put_user_state(
    conn: &Connection,
    tenant: &str,
    user: &str,
    state: &UserStateRow,
) -> Result<()> {
    conn.execute(
        "INSERT INTO user_state (tenant, user, failures, locked, throttled_until) VALUES (?, ?, ?, ?, ?)
         ON CONFLICT (tenant, user) DO UPDATE
         SET failures = excluded.failures, locked = excluded.locked, throttled_until = excluded.throttled_until",
        params![
            tenant,
            user,
            state.failures,
            state.locked,
            state.throttled_until.map(|u| u as i64)
        ],
    )?;
    Ok(())
}

pub(super) fn user_state(tenant: &str, user: &str, state: &UserStateRow) -> Entity {
    Entity::UserState(UserStateRecord {
        tenant: tenant.to_owned(),
        user: user.to_owned(),
        failures: state.failures,
        locked: state.locked,
        throttled_until: state.throttled_until,
    })
}

/// Does Twofold know this user: any factor, backup codes or runtime state?
pub(super) fn user_exists(conn: &Connection, tenant: &str, user: &str) -> Result<bool> {
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM totp_factors WHERE tenant = ?1 AND user = ?2)
             OR EXISTS (SELECT 1 FROM backup_codes WHERE tenant = ?1 AND user = ?2)
             OR EXISTS (SELECT 1 FROM user_state WHERE tenant = ?1 AND user = ?2)",
        params![tenant, user],
        |r| r.get(0),
    )
    .map_err(StoreError::from)
}
