//! Rows of the control plane's tables, and the feed entities built from them.
//!
//! Each replicated entity is built by one function here, used both when a
//! mutation publishes it and when a snapshot streams it, so the two can never
//! disagree.

use twofold_core::feed::{
    ApiKeyRecord, BackupCodeEntry, BackupCodesRecord, Entity, TenantRecord, TotpRecord,
    UserStateRecord,
};
use twofold_core::ids::Scope;

use super::sql::{Conn, Row, args};
use super::{FactorRow, FactorStatus, KeyRow, Result, StoreError, TenantRow, UserStateRow};

pub(super) const FACTOR_COLUMNS: &str = "id, tenant, user_id, label, issuer, algorithm, digits, period, sealed, \
     status, created_ms, expires_ms, activated_ms, last_step";

pub(super) fn tenant_row(r: &Row<'_, '_>) -> Result<TenantRow> {
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

pub(super) fn key_row(r: &Row<'_, '_>) -> Result<KeyRow> {
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

pub(super) fn factor_row(r: &Row<'_, '_>) -> Result<FactorRow> {
    let status: String = r.get(9)?;
    Ok(FactorRow {
        id: r.get(0)?,
        tenant: r.get(1)?,
        user: r.get(2)?,
        label: r.get(3)?,
        issuer: r.get(4)?,
        algorithm: r.get(5)?,
        digits: r.int(6)?,
        period: r.int(7)?,
        sealed: r.get(8)?,
        status: if status == "active" {
            FactorStatus::Active
        } else {
            FactorStatus::Pending
        },
        created_ms: r.get(10)?,
        expires_ms: r.get(11)?,
        activated_ms: r.get(12)?,
        last_step: r.opt_int(13)?,
    })
}

pub(super) fn insert_factor(conn: &mut Conn<'_, '_>, row: &FactorRow) -> Result<()> {
    conn.execute(
        &format!("INSERT INTO totp_factors ({FACTOR_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"),
        args![
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
    conn: &mut Conn<'_, '_>,
    tenant: &str,
    user: &str,
    id: &str,
) -> Result<Option<FactorRow>> {
    conn.query_opt(
        &format!(
            "SELECT {FACTOR_COLUMNS} FROM totp_factors WHERE id = ? AND tenant = ? AND user_id = ?"
        ),
        args![id, tenant, user],
        factor_row,
    )
}

/// Move an active factor's last step forward to `step`, if it is behind, in
/// one statement. Returns the factor as updated, or `None` if it is missing,
/// not active, or already at or past `step`.
pub(super) fn advance_last_step(
    conn: &mut Conn<'_, '_>,
    tenant: &str,
    user: &str,
    id: &str,
    step: u64,
) -> Result<Option<FactorRow>> {
    let step = step as i64;
    conn.query_opt(
        &format!(
            "UPDATE totp_factors SET last_step = ?
             WHERE id = ? AND tenant = ? AND user_id = ? AND status = 'active'
               AND (last_step IS NULL OR last_step < ?)
             RETURNING {FACTOR_COLUMNS}"
        ),
        args![step, id, tenant, user, step],
        factor_row,
    )
}

pub(super) fn factors_of(
    conn: &mut Conn<'_, '_>,
    tenant: &str,
    user: &str,
) -> Result<Vec<FactorRow>> {
    conn.query(
        &format!(
            "SELECT {FACTOR_COLUMNS} FROM totp_factors WHERE tenant = ? AND user_id = ? ORDER BY created_ms, id"
        ),
        args![tenant, user],
        factor_row,
    )
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

pub(super) fn parse_codes(text: &str) -> Result<Vec<BackupCodeEntry>> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("backup codes: {e}")))
}

/// The user's set id and codes, if they have a set.
pub(super) fn backup_codes_of(
    conn: &mut Conn<'_, '_>,
    tenant: &str,
    user: &str,
) -> Result<Option<(String, Vec<BackupCodeEntry>)>> {
    conn.query_opt(
        "SELECT set_id, codes FROM backup_codes WHERE tenant = ? AND user_id = ?",
        args![tenant, user],
        |r| Ok((r.get(0)?, parse_codes(&r.get::<String>(1)?)?)),
    )
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

/// The `FROM` of the statements reading a user's whole state (`?1` the tenant,
/// `?2` the user): one row, with the published state as `s` and the failures
/// merged since as `u`, each there or not.
macro_rules! user_state_joins {
    () => {
        "
         FROM (SELECT 1) AS one
         LEFT JOIN user_state s ON s.tenant = ?1 AND s.user_id = ?2
         LEFT JOIN unpublished_failures u ON u.tenant = ?1 AND u.user_id = ?2"
    };
}

/// A user's state as published, with its failures merged since, if it has any,
/// in one statement. Every accepted code a node reports reads it.
pub(super) fn whole_user_state(
    conn: &mut Conn<'_, '_>,
    tenant: &str,
    user: &str,
) -> Result<Option<UserStateRow>> {
    conn.query_one(
        concat!(
            "SELECT s.failures, s.locked, s.throttled_until, u.failures",
            user_state_joins!()
        ),
        args![tenant, user],
        state_of,
    )
}

/// The state a failure is merged into: the user's whole state, a clean one for
/// a user with factors or backup codes but no state yet, or `None` for a user
/// Twofold does not know (the test of [`user_exists`]). One statement, as every
/// failure a node reports reads it; the existence checks run only for a user
/// with no state (a first failure), in order, each only if the one before
/// found nothing.
pub(super) fn failure_state(
    conn: &mut Conn<'_, '_>,
    tenant: &str,
    user: &str,
) -> Result<Option<UserStateRow>> {
    conn.query_one(
        concat!(
            "SELECT s.failures, s.locked, s.throttled_until, u.failures,
                CASE WHEN s.failures IS NOT NULL OR u.failures IS NOT NULL THEN TRUE
                     WHEN EXISTS (SELECT 1 FROM totp_factors WHERE tenant = ?1 AND user_id = ?2) THEN TRUE
                     ELSE EXISTS (SELECT 1 FROM backup_codes WHERE tenant = ?1 AND user_id = ?2)
                END",
            user_state_joins!()
        ),
        args![tenant, user],
        |r| match state_of(r)? {
            Some(state) => Ok(Some(state)),
            None if r.get::<bool>(4)? => Ok(Some(UserStateRow::default())),
            None => Ok(None),
        },
    )
}

/// Columns 0 to 3 of the two statements above: `None` if neither row is there.
fn state_of(r: &Row<'_, '_>) -> Result<Option<UserStateRow>> {
    let published = r.opt_int::<u32>(0)?;
    let unpublished = r.opt_int::<u32>(3)?;
    if published.is_none() && unpublished.is_none() {
        return Ok(None);
    }
    Ok(Some(UserStateRow {
        failures: published.unwrap_or(0),
        locked: r.get::<Option<bool>>(1)?.unwrap_or(false),
        throttled_until: r.opt_int(2)?,
        unpublished: unpublished.unwrap_or(0),
    }))
}

/// Count failures merged but not published.
pub(super) fn put_unpublished(
    conn: &mut Conn<'_, '_>,
    tenant: &str,
    user: &str,
    failures: u32,
) -> Result<()> {
    conn.execute(
        "INSERT INTO unpublished_failures (tenant, user_id, failures) VALUES (?, ?, ?)
         ON CONFLICT (tenant, user_id) DO UPDATE SET failures = excluded.failures",
        args![tenant, user, failures],
    )?;
    Ok(())
}

/// The published part of a user's state, from columns 0 to 2.
pub(super) fn user_state_row(r: &Row<'_, '_>) -> Result<UserStateRow> {
    Ok(UserStateRow {
        failures: r.int(0)?,
        locked: r.get(1)?,
        throttled_until: r.opt_int(2)?,
        unpublished: 0,
    })
}

pub(super) fn put_user_state(
    conn: &mut Conn<'_, '_>,
    tenant: &str,
    user: &str,
    state: &UserStateRow,
) -> Result<()> {
    conn.execute(
        "INSERT INTO user_state (tenant, user_id, failures, locked, throttled_until) VALUES (?, ?, ?, ?, ?)
         ON CONFLICT (tenant, user_id) DO UPDATE
         SET failures = excluded.failures, locked = excluded.locked, throttled_until = excluded.throttled_until",
        args![
            tenant,
            user,
            state.failures,
            state.locked,
            state.throttled_until.map(|u| u as i64)
        ],
    )?;
    // What is published counts every failure merged so far.
    conn.execute(
        "DELETE FROM unpublished_failures WHERE tenant = ? AND user_id = ?",
        args![tenant, user],
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
pub(super) fn user_exists(conn: &mut Conn<'_, '_>, tenant: &str, user: &str) -> Result<bool> {
    conn.query_one(
        "SELECT EXISTS (SELECT 1 FROM totp_factors WHERE tenant = ?1 AND user_id = ?2)
             OR EXISTS (SELECT 1 FROM backup_codes WHERE tenant = ?1 AND user_id = ?2)
             OR EXISTS (SELECT 1 FROM user_state WHERE tenant = ?1 AND user_id = ?2)
             OR EXISTS (SELECT 1 FROM unpublished_failures WHERE tenant = ?1 AND user_id = ?2)",
        args![tenant, user],
        |r| r.get(0),
    )
}
