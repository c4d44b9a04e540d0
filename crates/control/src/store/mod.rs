//! The control plane's state, and its change log, on SQLite or PostgreSQL.
//!
//! Every mutation runs in one write transaction that also appends its audit
//! records and, when it changes what data planes see, one row of the change log
//! with the next sequence number (a transactional outbox). The next number comes
//! from a single counter row, `log_head`, updated inside the writing
//! transaction. On SQLite the one write connection already serialises writers;
//! on PostgreSQL every write transaction first locks that row, so writers from
//! every replica take seqs and commit in the same order: a reader that has seen
//! seq N never later finds a committed change below N. See ARCHITECTURE.md.
//!
//! The statements are written once for both databases, through [`sql::Conn`].
//! Methods are blocking; the HTTP layer calls them from `spawn_blocking`.

mod entities;
mod feed;
mod keys;
pub mod migrate;
mod pg;
mod sql;
mod usage;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::watch;
use twofold_core::feed::{BackupCodeEntry, EntityKey, Op};
use twofold_core::ids::Scope;

pub use feed::{FeedPosition, SnapshotSink, StoredChange};
use sql::{Conn, args};

/// SQLite schema migrations, applied in order; `PRAGMA user_version` holds how
/// many ran.
const MIGRATIONS: &[&str] = &[
    include_str!("schema.sql"),
    include_str!("usage.sql"),
    include_str!("activation.sql"),
    include_str!("log_head.sql"),
    include_str!("unpublished.sql"),
    include_str!("without_rowid.sql"),
];

/// How long a connection waits for another one's lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Idle read connections kept for reuse.
const MAX_IDLE: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(&'static str),
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database: {0}")]
    Postgres(#[from] postgres::Error),
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Is the database out of reach (down, restarting, busy) rather than the
    /// request or the data wrong? Such errors pass once the database is back.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Sqlite(e) => matches!(
                e.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
            ),
            StoreError::Postgres(e) => pg::is_unavailable(e),
            _ => false,
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Who made a change, as the audit log records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    Operator,
    Key(String),
}

impl Actor {
    fn as_str(&self) -> &str {
        match self {
            Actor::Operator => "operator",
            Actor::Key(id) => id,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantRow {
    pub id: String,
    pub name: String,
    pub created_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRow {
    pub id: String,
    pub tenant: Option<String>,
    pub name: String,
    pub hash: Vec<u8>,
    pub scopes: Vec<Scope>,
    pub created_ms: i64,
    pub revoked_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FactorStatus {
    Pending,
    Active,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FactorRow {
    pub id: String,
    pub tenant: String,
    pub user: String,
    pub label: String,
    pub issuer: Option<String>,
    pub algorithm: String,
    pub digits: u8,
    pub period: u32,
    pub sealed: Vec<u8>,
    pub status: FactorStatus,
    pub created_ms: i64,
    pub expires_ms: Option<i64>,
    pub activated_ms: Option<i64>,
    pub last_step: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    pub id: i64,
    pub at_ms: i64,
    pub actor: String,
    pub tenant: Option<String>,
    pub action: String,
    pub user: Option<String>,
    pub target: Option<String>,
}

/// A user's runtime state as the control plane knows it: as last published,
/// and the failures merged since that did not change what the user may do.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UserStateRow {
    pub failures: u32,
    pub locked: bool,
    pub throttled_until: Option<u64>,
    pub unpublished: u32,
}

impl UserStateRow {
    /// Consecutive failures, published or not.
    pub fn all_failures(&self) -> u32 {
        self.failures.saturating_add(self.unpublished)
    }
}

/// Remaining and total backup codes of a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupSummary {
    pub remaining: usize,
    pub total: usize,
}

/// One audit record to write with a mutation.
struct AuditEntry<'a> {
    action: &'static str,
    tenant: Option<&'a str>,
    user: Option<&'a str>,
    target: Option<&'a str>,
}

impl<'a> AuditEntry<'a> {
    /// A change to one user of a tenant.
    fn on_user(
        action: &'static str,
        tenant: &'a str,
        user: &'a str,
        target: Option<&'a str>,
    ) -> AuditEntry<'a> {
        AuditEntry {
            action,
            tenant: Some(tenant),
            user: Some(user),
            target,
        }
    }
}

/// A write transaction in progress: the ops it publishes and what it audits.
struct Write<'a, 'b> {
    tx: Conn<'a, 'b>,
    ops: Vec<Op>,
}

impl Write<'_, '_> {
    fn publish(&mut self, op: Op) {
        self.ops.push(op);
    }
}

/// Where the control plane keeps its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// A SQLite file: one control-plane process.
    Sqlite(PathBuf),
    /// A PostgreSQL URL: any number of control-plane replicas.
    Postgres(String),
}

impl Database {
    /// `postgres://…` or `postgresql://…` is PostgreSQL; `sqlite:PATH` or a bare
    /// path is a SQLite file.
    pub fn parse(text: &str) -> Database {
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            Database::Postgres(text.to_owned())
        } else {
            Database::Sqlite(PathBuf::from(text.strip_prefix("sqlite:").unwrap_or(text)))
        }
    }
}

/// The control-plane store, on either database.
#[derive(Debug)]
pub struct Store {
    backend: Backend,
    log_id: String,
    head: Arc<watch::Sender<u64>>,
}

#[derive(Debug)]
enum Backend {
    Sqlite(Sqlite),
    Postgres(pg::Pool),
}

/// One write connection, and read connections for reads that must not wait for
/// writers. WAL mode gives each read transaction a consistent view.
#[derive(Debug)]
struct Sqlite {
    path: PathBuf,
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
}

impl Store {
    /// Open the database, run migrations, and make sure the change log has an id.
    pub fn connect(database: &Database) -> Result<Store> {
        match database {
            Database::Sqlite(path) => Store::open(path),
            Database::Postgres(url) => Store::open_postgres(url),
        }
    }

    /// Open (creating if needed) the SQLite database at `path`.
    pub fn open(path: &Path) -> Result<Store> {
        let mut conn = connect(path)?;
        migrate_sqlite(&mut conn)?;
        let tx = conn.unchecked_transaction()?;
        let log_id = ensure_log_id(&mut Conn::Lite(&tx))?;
        let head = read_head(&mut Conn::Lite(&tx))?;
        tx.commit()?;
        Ok(Store {
            backend: Backend::Sqlite(Sqlite {
                path: path.to_owned(),
                writer: Mutex::new(conn),
                readers: Mutex::new(Vec::new()),
            }),
            log_id,
            head: Arc::new(watch::Sender::new(head)),
        })
    }

    /// Connect to PostgreSQL at `url` and run migrations; several replicas may do
    /// so at once. New changes of every replica reach [`Store::subscribe`]
    /// through LISTEN/NOTIFY, with a slow poll as a safety net.
    pub fn open_postgres(url: &str) -> Result<Store> {
        let pool = pg::Pool::new(url)?;
        let mut client = pool.get()?;
        let (log_id, head) = pg::migrate(&mut client, |conn| {
            Ok((ensure_log_id(conn)?, read_head(conn)?))
        })?;
        drop(client);
        let head = Arc::new(watch::Sender::new(head));
        pg::watch_head(&pool, Arc::downgrade(&head))?;
        Ok(Store {
            backend: Backend::Postgres(pool),
            log_id,
            head,
        })
    }

    /// The change log's identity. A data plane that replicated another log (a
    /// reset or replaced database) is told to re-bootstrap.
    pub fn log_id(&self) -> &str {
        &self.log_id
    }

    /// The head seq, updated after each commit (of any replica, on PostgreSQL).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    pub fn head(&self) -> u64 {
        *self.head.borrow()
    }

    /// Is the database usable?
    pub fn ping(&self) -> Result<()> {
        self.read(|conn| conn.query_one("SELECT 1", args![], |_| Ok(())))
    }

    /// Run `f` on a read connection, outside any write transaction.
    fn read<T>(&self, f: impl FnOnce(&mut Conn<'_, '_>) -> Result<T>) -> Result<T> {
        match &self.backend {
            Backend::Sqlite(lite) => {
                let conn = lite.reader()?;
                let value = f(&mut Conn::Lite(&conn));
                lite.give_back(conn);
                value
            }
            Backend::Postgres(pool) => f(&mut Conn::Pg(&mut *pool.get()?)),
        }
    }

    /// Run `f` in one read-only transaction that sees a single committed state.
    fn read_consistent<T>(&self, f: impl FnOnce(&mut Conn<'_, '_>) -> Result<T>) -> Result<T> {
        match &self.backend {
            Backend::Sqlite(lite) => {
                let conn = lite.reader()?;
                let value = {
                    let tx = conn.unchecked_transaction()?;
                    f(&mut Conn::Lite(&tx))
                };
                lite.give_back(conn);
                value
            }
            Backend::Postgres(pool) => {
                let mut client = pool.get()?;
                let mut tx = client
                    .build_transaction()
                    .isolation_level(postgres::IsolationLevel::RepeatableRead)
                    .read_only(true)
                    .start()?;
                let value = f(&mut Conn::PgTx(&mut tx))?;
                tx.commit()?;
                Ok(value)
            }
        }
    }

    /// Run `f` in one write transaction, serialised with every other writer.
    fn transact<T>(&self, f: impl FnOnce(&mut Conn<'_, '_>) -> Result<T>) -> Result<T> {
        match &self.backend {
            Backend::Sqlite(lite) => {
                let mut conn = lite.lock();
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let value = f(&mut Conn::Lite(&tx))?;
                tx.commit()?;
                Ok(value)
            }
            Backend::Postgres(pool) => {
                let mut client = pool.get()?;
                let mut tx = client.transaction()?;
                // Every writer of every replica queues on the counter row here, so
                // write transactions run one at a time, as on SQLite, and commit
                // in the order they take seqs.
                tx.execute("SELECT seq FROM log_head WHERE id = 0 FOR UPDATE", &[])?;
                let value = f(&mut Conn::PgTx(&mut tx))?;
                tx.commit()?;
                Ok(value)
            }
        }
    }

    /// Run `f` in one write transaction. Audit records and, if `f` published any
    /// ops, one change with the next seq are committed with it.
    fn write<'a, T>(
        &self,
        now_ms: i64,
        actor: &Actor,
        audit: impl Into<Option<AuditEntry<'a>>>,
        f: impl FnOnce(&mut Write<'_, '_>) -> Result<T>,
    ) -> Result<T> {
        let audit = audit.into();
        let (value, new_head) = self.transact(|tx| {
            let mut write = Write {
                tx: tx.reborrow(),
                ops: Vec::new(),
            };
            let value = f(&mut write)?;
            let Write { mut tx, ops } = write;
            if let Some(audit) = audit {
                insert_audit(&mut tx, now_ms, actor, &audit)?;
            }
            let mut new_head = None;
            if !ops.is_empty() {
                // A counter row rather than max(seq), so compaction can empty the
                // log without the next seq going backwards.
                let seq: i64 = tx.query_one(
                    "UPDATE log_head SET seq = seq + 1 WHERE id = 0 RETURNING seq",
                    args![],
                    |r| r.get(0),
                )?;
                let body =
                    serde_json::to_string(&ops).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                tx.execute(
                    "INSERT INTO changes (seq, at_ms, ops) VALUES (?, ?, ?)",
                    args![seq, now_ms, &body],
                )?;
                if tx.is_postgres() {
                    // Delivered on commit, to every replica's head watcher.
                    tx.execute(
                        "SELECT pg_notify('twofold_changes', ?)",
                        args![seq.to_string()],
                    )?;
                }
                new_head = Some(seq as u64);
            }
            Ok((value, new_head))
        })?;
        if let Some(seq) = new_head {
            advance(&self.head, seq);
        }
        Ok(value)
    }

    // ----- operator token -----

    pub fn operator_token_hash(&self) -> Result<Option<Vec<u8>>> {
        self.read(|conn| get_meta(conn, "operator_hash"))?
            .map(|hex| decode_hex(&hex))
            .transpose()
    }

    pub fn set_operator_token_hash(&self, hash: &[u8]) -> Result<()> {
        let hex = data_encoding::HEXLOWER.encode(hash);
        self.transact(|tx| set_meta(tx, "operator_hash", &hex))
    }

    /// Does `fingerprint` match the master key's fingerprint the database keeps?
    /// The first replica to ask stores its own.
    pub fn check_key(&self, fingerprint: &[u8]) -> Result<bool> {
        let hex = data_encoding::HEXLOWER.encode(fingerprint);
        let stored = self.transact(|tx| {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('key_check', ?) ON CONFLICT (key) DO NOTHING",
                args![hex],
            )?;
            get_meta(tx, "key_check")
        })?;
        Ok(stored.as_deref() == Some(hex.as_str()))
    }

    /// Store the operator token's hash unless one is stored already (another
    /// replica may have just stored its own). Returns whether this one was kept.
    pub fn init_operator_token_hash(&self, hash: &[u8]) -> Result<bool> {
        let hex = data_encoding::HEXLOWER.encode(hash);
        let added = self.transact(|tx| {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('operator_hash', ?) ON CONFLICT (key) DO NOTHING",
                args![hex],
            )
        })?;
        Ok(added == 1)
    }

    // ----- tenants -----

    pub fn create_tenant(&self, now_ms: i64, actor: &Actor, row: &TenantRow) -> Result<()> {
        let audit = AuditEntry {
            action: "tenant.create",
            tenant: Some(&row.id),
            user: None,
            target: Some(&row.id),
        };
        self.write(now_ms, actor, audit, |w| {
            w.tx.execute(
                "INSERT INTO tenants (id, name, created_ms) VALUES (?, ?, ?)",
                args![row.id, row.name, row.created_ms],
            )?;
            w.publish(Op::Put {
                entity: entities::tenant(row),
            });
            Ok(())
        })
    }

    pub fn list_tenants(&self) -> Result<Vec<TenantRow>> {
        self.read(|conn| {
            conn.query(
                "SELECT id, name, created_ms FROM tenants ORDER BY created_ms, id",
                args![],
                entities::tenant_row,
            )
        })
    }

    pub fn tenant(&self, id: &str) -> Result<TenantRow> {
        self.read(|conn| {
            conn.query_opt(
                "SELECT id, name, created_ms FROM tenants WHERE id = ?",
                args![id],
                entities::tenant_row,
            )
        })?
        .ok_or(StoreError::NotFound("tenant"))
    }

    // ----- API keys -----

    pub fn create_api_key(&self, now_ms: i64, actor: &Actor, row: &KeyRow) -> Result<()> {
        let audit = AuditEntry {
            action: "api_key.create",
            tenant: row.tenant.as_deref(),
            user: None,
            target: Some(&row.id),
        };
        self.write(now_ms, actor, audit, |w| {
            if let Some(tenant) = &row.tenant {
                ensure_tenant(&mut w.tx, tenant)?;
            }
            w.tx.execute(
                "INSERT INTO api_keys (id, tenant, name, hash, scopes, created_ms) VALUES (?, ?, ?, ?, ?, ?)",
                args![
                    row.id,
                    row.tenant,
                    row.name,
                    row.hash,
                    entities::scopes_text(&row.scopes),
                    row.created_ms
                ],
            )?;
            if let Some(entity) = entities::api_key(row) {
                w.publish(Op::Put { entity });
            }
            Ok(())
        })
    }

    /// Keys of one tenant, or the node keys when `tenant` is `None`.
    pub fn list_api_keys(&self, tenant: Option<&str>) -> Result<Vec<KeyRow>> {
        self.read(|conn| {
            if let Some(tenant) = tenant {
                ensure_tenant(conn, tenant)?;
            }
            conn.query(
                "SELECT id, tenant, name, hash, scopes, created_ms, revoked_ms FROM api_keys
                 WHERE tenant IS NOT DISTINCT FROM ? ORDER BY created_ms, id",
                args![tenant],
                entities::key_row,
            )
        })
    }

    /// Revoke a key of `tenant` (or a node key). Revoking twice is not an error.
    pub fn revoke_api_key(
        &self,
        now_ms: i64,
        actor: &Actor,
        tenant: Option<&str>,
        id: &str,
    ) -> Result<()> {
        let audit = AuditEntry {
            action: "api_key.revoke",
            tenant,
            user: None,
            target: Some(id),
        };
        self.write(now_ms, actor, audit, |w| {
            let found = w.tx.query_opt(
                "SELECT id, tenant, name, hash, scopes, created_ms, revoked_ms FROM api_keys
                 WHERE id = ? AND tenant IS NOT DISTINCT FROM ?",
                args![id, tenant],
                entities::key_row,
            )?;
            match found {
                None => Err(StoreError::NotFound("api key")),
                Some(row) if row.revoked_ms.is_some() => Ok(()),
                Some(row) => {
                    w.tx.execute(
                        "UPDATE api_keys SET revoked_ms = ? WHERE id = ?",
                        args![now_ms, id],
                    )?;
                    // Only a key the feed carries needs a tombstone there.
                    if entities::api_key(&row).is_some() {
                        w.publish(Op::Delete {
                            key: EntityKey::ApiKey { id: id.to_owned() },
                        });
                    }
                    Ok(())
                }
            }
        })
    }

    /// Does a key with this id exist, unrevoked?
    pub fn key_is_active(&self, id: &str) -> Result<bool> {
        let found = self.read(|conn| {
            conn.query_opt(
                "SELECT 1 FROM api_keys WHERE id = ? AND revoked_ms IS NULL",
                args![id],
                |_| Ok(()),
            )
        })?;
        Ok(found.is_some())
    }

    /// The unrevoked key with this hash, if any.
    pub fn key_by_hash(&self, hash: &[u8]) -> Result<Option<KeyRow>> {
        self.read(|conn| {
            conn.query_opt(
                "SELECT id, tenant, name, hash, scopes, created_ms, revoked_ms FROM api_keys
                 WHERE hash = ? AND revoked_ms IS NULL",
                args![hash],
                entities::key_row,
            )
        })
    }

    // ----- TOTP factors -----

    /// Store a pending factor, unless the user already holds `max_factors`
    /// factors (active or pending and unexpired). Expired pending factors of the
    /// user are purged on the way.
    pub fn insert_pending_totp(
        &self,
        now_ms: i64,
        actor: &Actor,
        row: &FactorRow,
        max_factors: usize,
    ) -> Result<()> {
        let audit = AuditEntry::on_user("totp.enroll", &row.tenant, &row.user, Some(&row.id));
        self.write(now_ms, actor, audit, |w| {
            w.tx.execute(
                "DELETE FROM totp_factors WHERE tenant = ? AND user_id = ? AND status = 'pending' AND expires_ms <= ?",
                args![row.tenant, row.user, now_ms],
            )?;
            let held: i64 = w.tx.query_one(
                "SELECT count(*) FROM totp_factors WHERE tenant = ? AND user_id = ?",
                args![row.tenant, row.user],
                |r| r.get(0),
            )?;
            if held as usize >= max_factors {
                return Err(StoreError::Conflict("too_many_factors"));
            }
            entities::insert_factor(&mut w.tx, row)?;
            Ok(())
        })
    }

    /// A factor of this user, pending or active.
    pub fn factor(&self, tenant: &str, user: &str, id: &str) -> Result<FactorRow> {
        self.read(|conn| entities::factor(conn, tenant, user, id))?
            .ok_or(StoreError::NotFound("factor"))
    }

    /// Count a wrong activation code for a pending factor; at `limit` wrong codes
    /// the factor is dropped. Returns whether it was dropped.
    pub fn fail_activation(
        &self,
        now_ms: i64,
        actor: &Actor,
        tenant: &str,
        user: &str,
        id: &str,
        limit: u32,
    ) -> Result<bool> {
        let audit = AuditEntry::on_user("totp.activation_failed", tenant, user, Some(id));
        self.write(now_ms, actor, audit, |w| {
            let failures: Option<u32> = w.tx.query_opt(
                "UPDATE totp_factors SET activation_failures = activation_failures + 1
                     WHERE id = ? AND tenant = ? AND user_id = ? AND status = 'pending'
                     RETURNING activation_failures",
                args![id, tenant, user],
                |r| r.int(0),
            )?;
            let dropped = failures.is_some_and(|f| f >= limit);
            if dropped {
                w.tx.execute("DELETE FROM totp_factors WHERE id = ?", args![id])?;
            }
            Ok(dropped)
        })
    }

    /// Activate a pending factor whose code verified at `step`. Fails with
    /// `NotFound` if the factor is gone or expired, `Conflict` if already active.
    pub fn activate_totp(
        &self,
        now_ms: i64,
        actor: &Actor,
        tenant: &str,
        user: &str,
        id: &str,
        step: u64,
    ) -> Result<FactorRow> {
        let audit = AuditEntry::on_user("totp.activate", tenant, user, Some(id));
        self.write(now_ms, actor, audit, |w| {
            let mut row = entities::factor(&mut w.tx, tenant, user, id)?.ok_or(StoreError::NotFound("factor"))?;
            match row.status {
                FactorStatus::Active => return Err(StoreError::Conflict("factor_already_active")),
                FactorStatus::Pending if row.expires_ms.is_some_and(|e| e <= now_ms) => {
                    return Err(StoreError::NotFound("factor"));
                }
                FactorStatus::Pending => {}
            }
            w.tx.execute(
                "UPDATE totp_factors SET status = 'active', activated_ms = ?, expires_ms = NULL, last_step = ?
                 WHERE id = ?",
                args![now_ms, step as i64, id],
            )?;
            row.status = FactorStatus::Active;
            row.activated_ms = Some(now_ms);
            row.expires_ms = None;
            row.last_step = Some(step);
            w.publish(Op::Put {
                entity: entities::totp(&row),
            });
            Ok(row)
        })
    }

    /// The user's factors, oldest first. Expired pending factors are left out.
    pub fn list_factors(&self, now_ms: i64, tenant: &str, user: &str) -> Result<Vec<FactorRow>> {
        self.read(|conn| entities::factors_of(conn, tenant, user))
            .map(|rows| {
                rows.into_iter()
                    .filter(|f| {
                        f.status == FactorStatus::Active || f.expires_ms.is_some_and(|e| e > now_ms)
                    })
                    .collect()
            })
    }

    pub fn delete_factor(
        &self,
        now_ms: i64,
        actor: &Actor,
        tenant: &str,
        user: &str,
        id: &str,
    ) -> Result<()> {
        let audit = AuditEntry::on_user("totp.delete", tenant, user, Some(id));
        self.write(now_ms, actor, audit, |w| {
            let row = entities::factor(&mut w.tx, tenant, user, id)?
                .ok_or(StoreError::NotFound("factor"))?;
            w.tx.execute("DELETE FROM totp_factors WHERE id = ?", args![id])?;
            if row.status == FactorStatus::Active {
                w.publish(Op::Delete {
                    key: EntityKey::Totp {
                        tenant: tenant.to_owned(),
                        user: user.to_owned(),
                        id: id.to_owned(),
                    },
                });
            }
            Ok(())
        })
    }

    /// Erase everything of a user: factors, backup codes, runtime state.
    pub fn delete_user(&self, now_ms: i64, actor: &Actor, tenant: &str, user: &str) -> Result<()> {
        let audit = AuditEntry::on_user("user.delete", tenant, user, None);
        self.write(now_ms, actor, audit, |w| {
            let factors = entities::factors_of(&mut w.tx, tenant, user)?;
            let mut found = !factors.is_empty();
            for f in factors.iter().filter(|f| f.status == FactorStatus::Active) {
                w.publish(Op::Delete {
                    key: EntityKey::Totp {
                        tenant: tenant.to_owned(),
                        user: user.to_owned(),
                        id: f.id.clone(),
                    },
                });
            }
            w.tx.execute(
                "DELETE FROM totp_factors WHERE tenant = ? AND user_id = ?",
                args![tenant, user],
            )?;
            if w.tx.execute(
                "DELETE FROM backup_codes WHERE tenant = ? AND user_id = ?",
                args![tenant, user],
            )? > 0
            {
                found = true;
                w.publish(Op::Delete {
                    key: EntityKey::BackupCodes {
                        tenant: tenant.to_owned(),
                        user: user.to_owned(),
                    },
                });
            }
            // Nodes count their own unpublished failures: a delete tells them
            // to drop those too.
            let unpublished = w.tx.execute(
                "DELETE FROM unpublished_failures WHERE tenant = ? AND user_id = ?",
                args![tenant, user],
            )? > 0;
            let published = w.tx.execute(
                "DELETE FROM user_state WHERE tenant = ? AND user_id = ?",
                args![tenant, user],
            )? > 0;
            if unpublished || published {
                found = true;
                w.publish(Op::Delete {
                    key: EntityKey::UserState {
                        tenant: tenant.to_owned(),
                        user: user.to_owned(),
                    },
                });
            }
            if found {
                Ok(())
            } else {
                Err(StoreError::NotFound("user"))
            }
        })
    }

    // ----- backup codes -----

    /// Replace the user's backup codes with a new set of hashes.
    pub fn replace_backup_codes(
        &self,
        now_ms: i64,
        actor: &Actor,
        tenant: &str,
        user: &str,
        set_id: &str,
        hashes: Vec<[u8; 32]>,
    ) -> Result<()> {
        let audit = AuditEntry::on_user("backup_codes.generate", tenant, user, Some(set_id));
        self.write(now_ms, actor, audit, |w| {
            let codes: Vec<BackupCodeEntry> = hashes
                .into_iter()
                .map(|h| BackupCodeEntry {
                    hash: h.to_vec(),
                    used: false,
                })
                .collect();
            w.tx.execute(
                "INSERT INTO backup_codes (tenant, user_id, set_id, codes, created_ms) VALUES (?, ?, ?, ?, ?)
                 ON CONFLICT (tenant, user_id) DO UPDATE
                 SET set_id = excluded.set_id, codes = excluded.codes, created_ms = excluded.created_ms",
                args![tenant, user, set_id, entities::codes_text(&codes)?, now_ms],
            )?;
            w.publish(Op::Put {
                entity: entities::backup_codes(tenant, user, set_id, codes),
            });
            Ok(())
        })
    }

    pub fn backup_summary(&self, tenant: &str, user: &str) -> Result<Option<BackupSummary>> {
        let Some((_, codes)) = self.read(|conn| entities::backup_codes_of(conn, tenant, user))?
        else {
            return Ok(None);
        };
        Ok(Some(BackupSummary {
            remaining: codes.iter().filter(|c| !c.used).count(),
            total: codes.len(),
        }))
    }

    // ----- runtime state -----

    pub fn user_state(&self, tenant: &str, user: &str) -> Result<UserStateRow> {
        self.read(|conn| entities::whole_user_state(conn, tenant, user))
            .map(Option::unwrap_or_default)
    }

    /// Clear a user's failures, throttle and lock. Fails with `NotFound` for a
    /// user Twofold does not know.
    pub fn unlock_user(&self, now_ms: i64, actor: &Actor, tenant: &str, user: &str) -> Result<()> {
        let audit = AuditEntry::on_user("user.unlock", tenant, user, None);
        self.write(now_ms, actor, audit, |w| {
            if !entities::user_exists(&mut w.tx, tenant, user)? {
                return Err(StoreError::NotFound("user"));
            }
            let cleared = UserStateRow::default();
            entities::put_user_state(&mut w.tx, tenant, user, &cleared)?;
            w.publish(Op::Put {
                entity: entities::user_state(tenant, user, &cleared),
            });
            Ok(())
        })
    }

    // ----- audit -----

    /// Audit records after `after` (an id), oldest first, optionally of one tenant
    /// and one user.
    pub fn audit_page(
        &self,
        tenant: Option<&str>,
        user: Option<&str>,
        after: i64,
        limit: usize,
    ) -> Result<Vec<AuditRow>> {
        self.read(|conn| {
            conn.query(
                "SELECT id, at_ms, actor, tenant, action, user_id, target FROM audit
                 WHERE id > ?1 AND (CAST(?2 AS TEXT) IS NULL OR tenant = ?2)
                   AND (CAST(?3 AS TEXT) IS NULL OR user_id = ?3)
                 ORDER BY id LIMIT ?4",
                args![after, tenant, user, limit as i64],
                |r| {
                    Ok(AuditRow {
                        id: r.get(0)?,
                        at_ms: r.get(1)?,
                        actor: r.get(2)?,
                        tenant: r.get(3)?,
                        action: r.get(4)?,
                        user: r.get(5)?,
                        target: r.get(6)?,
                    })
                },
            )
        })
    }

    /// Changes after `after`, in seq order, at most `limit`.
    pub fn changes_after(&self, after: u64, limit: usize) -> Result<Vec<StoredChange>> {
        self.read(|conn| feed::changes_after(conn, after, limit))
    }
}

impl Sqlite {
    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves the connection usable: SQLite rolls
        // back the unfinished transaction when it is dropped.
        self.writer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn reader(&self) -> Result<Connection> {
        let idle = self
            .readers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .pop();
        match idle {
            Some(conn) => Ok(conn),
            None => connect(&self.path),
        }
    }

    fn give_back(&self, conn: Connection) {
        let mut idle = self
            .readers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }
}

fn connect(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.set_prepared_statement_cache_capacity(64);
    // Plans never depend on bound values. Without this, SQLite may flag a
    // cached statement for compiling again whenever a parameter's value
    // changes: a join reading a user's state was, on every step (BENCHMARKS.md).
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // With WAL, NORMAL loses no committed transaction on a process crash; FULL
    // also survives power loss, which is what a change log needs.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

fn migrate_sqlite(conn: &mut Connection) -> Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    for (i, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.execute_batch(migration)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
    }
    tx.commit()?;
    Ok(())
}

/// Append one audit record.
fn insert_audit(
    tx: &mut Conn<'_, '_>,
    now_ms: i64,
    actor: &Actor,
    audit: &AuditEntry<'_>,
) -> Result<()> {
    tx.execute(
        "INSERT INTO audit (at_ms, actor, tenant, action, user_id, target) VALUES (?, ?, ?, ?, ?, ?)",
        args![now_ms, actor.as_str(), audit.tenant, audit.action, audit.user, audit.target],
    )?;
    Ok(())
}

/// Move the published head forward to `seq`. Writers (and, on PostgreSQL, the
/// head watcher) get here in any order; the head never goes back.
fn advance(head: &watch::Sender<u64>, seq: u64) {
    head.send_if_modified(|head| {
        let newer = seq > *head;
        if newer {
            *head = seq;
        }
        newer
    });
}

/// The log's id, created on first open. Replicas opening a new database at once
/// agree on the first one written.
fn ensure_log_id(conn: &mut Conn<'_, '_>) -> Result<String> {
    if let Some(id) = get_meta(conn, "log_id")? {
        return Ok(id);
    }
    let id = twofold_core::ids::TenantId::generate()
        .map_err(|e| StoreError::Corrupt(e.to_string()))?
        .as_str()
        .trim_start_matches(twofold_core::ids::TenantId::PREFIX)
        .to_owned();
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('log_id', ?) ON CONFLICT (key) DO NOTHING",
        args![&id],
    )?;
    get_meta(conn, "log_id")?.ok_or_else(|| StoreError::Corrupt("log_id".into()))
}

fn read_head(conn: &mut Conn<'_, '_>) -> Result<u64> {
    conn.query_one("SELECT seq FROM log_head WHERE id = 0", args![], |r| {
        r.int(0)
    })
}

fn get_meta(conn: &mut Conn<'_, '_>, key: &str) -> Result<Option<String>> {
    conn.query_opt("SELECT value FROM meta WHERE key = ?", args![key], |r| {
        r.get(0)
    })
}

fn set_meta(conn: &mut Conn<'_, '_>, key: &str, value: &str) -> Result<()> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        args![key, value],
    )?;
    Ok(())
}

fn meta_u64(conn: &mut Conn<'_, '_>, key: &str) -> Result<u64> {
    match get_meta(conn, key)? {
        None => Ok(0),
        Some(v) => v
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("meta {key}"))),
    }
}

fn ensure_tenant(conn: &mut Conn<'_, '_>, tenant: &str) -> Result<()> {
    let found = conn.query_opt("SELECT 1 FROM tenants WHERE id = ?", args![tenant], |_| {
        Ok(())
    })?;
    found.ok_or(StoreError::NotFound("tenant"))
}

fn decode_hex(hex: &str) -> Result<Vec<u8>> {
    data_encoding::HEXLOWER
        .decode(hex.as_bytes())
        .map_err(|_| StoreError::Corrupt("hex".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether SQLite keeps `table` without rowids.
    fn without_rowid(conn: &Connection, table: &str) -> bool {
        conn.query_row(
            "SELECT wr FROM pragma_table_list WHERE name = ?",
            [table],
            |r| r.get(0),
        )
        .unwrap()
    }

    #[test]
    fn version_6_keeps_user_states_and_unpublished_failures() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.db");
        {
            // A database as schema version 5 left it, holding runtime state.
            let mut conn = connect(&path).unwrap();
            let tx = conn.transaction().unwrap();
            for migration in &MIGRATIONS[..5] {
                tx.execute_batch(migration).unwrap();
            }
            tx.pragma_update(None, "user_version", 5).unwrap();
            tx.execute_batch(
                "INSERT INTO tenants (id, name, created_ms) VALUES ('tn_a', 'a', 0);
                 INSERT INTO user_state VALUES ('tn_a', 'alice', 5, 0, 1700000030);
                 INSERT INTO user_state VALUES ('tn_a', 'bob', 10, 1, NULL);
                 INSERT INTO unpublished_failures VALUES ('tn_a', 'carol', 3);",
            )
            .unwrap();
            tx.commit().unwrap();
            assert!(!without_rowid(&conn, "user_state"));
        }
        drop(Store::open(&path).unwrap());
        let conn = connect(&path).unwrap();
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        assert!(without_rowid(&conn, "user_state"));
        assert!(without_rowid(&conn, "unpublished_failures"));
        let states: Vec<(String, i64, i64, Option<i64>)> = conn
            .prepare("SELECT user_id, failures, locked, throttled_until FROM user_state ORDER BY user_id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(
            states,
            [
                ("alice".to_owned(), 5, 0, Some(1_700_000_030)),
                ("bob".to_owned(), 10, 1, None)
            ]
        );
        let unpublished: (String, i64) = conn
            .query_row(
                "SELECT user_id, failures FROM unpublished_failures",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(unpublished, ("carol".to_owned(), 3));
        // The tenant reference still holds.
        let orphan = conn.execute(
            "INSERT INTO user_state VALUES ('tn_missing', 'dave', 1, 0, NULL)",
            [],
        );
        assert!(orphan.is_err());
    }
}
