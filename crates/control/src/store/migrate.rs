//! Moving an installation from SQLite to PostgreSQL.
//!
//! Every row is copied as it is, in one PostgreSQL transaction: tenants, keys,
//! factors, backup codes, runtime state, the audit log, the change log with its
//! seqs, and the log's id. Data planes that followed the SQLite control plane
//! therefore resume from the PostgreSQL one where they stood, with no
//! re-bootstrap.

use std::path::Path;

use super::sql::{Arg, Conn, Owned, Value, args};
use super::{Result, Store, StoreError, pg};

/// Tables in the order they can be filled (referenced tables first), with the
/// columns to copy.
const TABLES: &[(&str, &str)] = &[
    ("meta", "key, value"),
    ("tenants", "id, name, created_ms"),
    (
        "api_keys",
        "id, tenant, name, hash, scopes, created_ms, revoked_ms",
    ),
    (
        "totp_factors",
        "id, tenant, user_id, label, issuer, algorithm, digits, period, sealed, status, \
         created_ms, expires_ms, activated_ms, last_step, activation_failures",
    ),
    ("backup_codes", "tenant, user_id, set_id, codes, created_ms"),
    (
        "user_state",
        "tenant, user_id, failures, locked, throttled_until",
    ),
    ("unpublished_failures", "tenant, user_id, failures"),
    ("audit", "id, at_ms, actor, tenant, action, user_id, target"),
    ("changes", "seq, at_ms, ops"),
    ("usage_cursors", "node, through, counted_from"),
];

/// What a migration copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    /// Rows per table, in copy order.
    pub rows: Vec<(&'static str, u64)>,
    /// The head seq, the same on both sides.
    pub head: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(
        "the target database already holds a Twofold installation (head seq {head}, {tenants} tenants); \
         give --overwrite to replace it"
    )]
    NotEmpty { head: u64, tenants: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Copy the SQLite installation at `from` into the PostgreSQL database at `to`.
/// The target must hold no Twofold data unless `overwrite` is set, in which case
/// its data is replaced. The SQLite file is first brought to the current schema.
pub fn sqlite_to_postgres(from: &Path, to: &str, overwrite: bool) -> Result<Copied, MigrateError> {
    if !from.exists() {
        return Err(
            StoreError::Corrupt(format!("no SQLite database at {}", from.display())).into(),
        );
    }
    let source = Store::open(from)?;
    let target = Store::open_postgres(to)?;
    let super::Backend::Postgres(pool) = &target.backend else {
        return Err(StoreError::Corrupt("the target is not PostgreSQL".into()).into());
    };
    let mut client = pool.get()?;
    let mut tx = client.transaction().map_err(StoreError::from)?;
    tx.execute("SELECT seq FROM log_head WHERE id = 0 FOR UPDATE", &[])
        .map_err(StoreError::from)?;
    {
        let mut conn = Conn::PgTx(&mut tx);
        let head = super::read_head(&mut conn)?;
        let tenants: i64 = conn.query_one("SELECT count(*) FROM tenants", args![], |r| r.get(0))?;
        let audit: i64 = conn.query_one("SELECT count(*) FROM audit", args![], |r| r.get(0))?;
        if (head > 0 || tenants > 0 || audit > 0) && !overwrite {
            return Err(MigrateError::NotEmpty {
                head,
                tenants: tenants as u64,
            });
        }
        let names: Vec<&str> = TABLES.iter().map(|(name, _)| *name).collect();
        conn.execute(&format!("TRUNCATE {} CASCADE", names.join(", ")), args![])?;
    }
    let copied = source.read_consistent(|lite| {
        let mut rows = Vec::new();
        for (table, columns) in TABLES {
            rows.push((*table, copy_table(lite, &mut tx, table, columns)?));
        }
        let head = super::read_head(lite)?;
        Ok(Copied { rows, head })
    })?;
    let mut conn = Conn::PgTx(&mut tx);
    conn.execute(
        "UPDATE log_head SET seq = ? WHERE id = 0",
        args![copied.head as i64],
    )?;
    // New audit records continue after the copied ones.
    conn.execute(
        "SELECT setval(pg_get_serial_sequence('audit', 'id'), coalesce(max(id), 0) + 1, false) FROM audit",
        args![],
    )?;
    conn.execute(
        &format!("SELECT pg_notify('{}', ?)", pg::CHANNEL),
        args![copied.head.to_string()],
    )?;
    tx.commit().map_err(StoreError::from)?;
    Ok(copied)
}

/// Copy every row of one table; returns how many.
fn copy_table(
    from: &mut Conn<'_, '_>,
    to: &mut postgres::Transaction<'_>,
    table: &str,
    columns: &str,
) -> Result<u64> {
    let width = columns.split(',').count();
    let placeholders: Vec<String> = (1..=width).map(|i| format!("${i}")).collect();
    let insert = to.prepare(&format!(
        "INSERT INTO {table} ({columns}) VALUES ({})",
        placeholders.join(", ")
    ))?;
    let mut copied = 0;
    from.for_each(
        &format!("SELECT {columns} FROM {table}"),
        args![],
        &mut |row| {
            let values = (0..width)
                .map(|i| row.owned(i))
                .collect::<Result<Vec<Owned>>>()?;
            let values: Vec<Value<'_>> = values.iter().map(Arg::value).collect();
            let args: Vec<&(dyn postgres::types::ToSql + Sync)> = values
                .iter()
                .map(|v| v as &(dyn postgres::types::ToSql + Sync))
                .collect();
            to.execute(&insert, &args)?;
            copied += 1;
            Ok(true)
        },
    )?;
    Ok(copied)
}
