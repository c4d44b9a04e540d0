//! The control plane's state on SQLite, and its change log.
//!
//! Every mutation runs in one write transaction that also appends its audit
//! records and, when it changes what data planes see, one row of the change log
//! with the next sequence number (a transactional outbox). SQLite has a single
//! writer, and this store keeps a single write connection, so sequence numbers are
//! assigned and committed in the same order: a reader that has seen seq N never
//! later finds a committed change below N. See ARCHITECTURE.md.
//!
//! Methods are blocking; the HTTP layer calls them from `spawn_blocking`.

mod entities;
mod feed;
mod usage;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use tokio::sync::watch;
use twofold_core::feed::{BackupCodeEntry, Change, EntityKey, Op};
use twofold_core::ids::Scope;

pub use feed::{FeedPosition, SnapshotSink};

/// Schema migrations, applied in order; `PRAGMA user_version` holds how many ran.
const MIGRATIONS: &[&str] = &[
    include_str!("schema.sql"),
    include_str!("usage.sql"),
    include_str!("activation.sql"),
];

/// How long a connection waits for another one's lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(&'static str),
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("corrupt row: {0}")]
    Corrupt(String),
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

/// A user's runtime state as the control plane knows it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UserStateRow {
    pub failures: u32,
    pub locked: bool,
    pub throttled_until: Option<u64>,
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
struct Write<'c> {
    tx: Transaction<'c>,
    ops: Vec<Op>,
}

impl Write<'_> {
    fn publish(&mut self, op: Op) {
        self.ops.push(op);
    }
}

/// The SQLite-backed control-plane store.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    writer: Mutex<Connection>,
    log_id: String,
    head: watch::Sender<u64>,
}

impl Store {
    /// Open (creating if needed) the database at `path`, run migrations, and make
    /// sure the change log has an id.
    pub fn open(path: &Path) -> Result<Store> {
        let mut conn = connect(path)?;
        migrate(&mut conn)?;
        let log_id = match get_meta(&conn, "log_id")? {
            Some(id) => id,
            None => {
                let id = twofold_core::ids::TenantId::generate()
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?
                    .as_str()
                    .trim_start_matches(twofold_core::ids::TenantId::PREFIX)
                    .to_owned();
                set_meta(&conn, "log_id", &id)?;
                id
            }
        };
        let head = head_of(&conn)?;
        Ok(Store {
            path: path.to_owned(),
            writer: Mutex::new(conn),
            log_id,
            head: watch::Sender::new(head),
        })
    }

    /// The change log's identity. A data plane that replicated another log (a
    /// reset or replaced database) is told to re-bootstrap.
    pub fn log_id(&self) -> &str {
        &self.log_id
    }

    /// The head seq, updated after each commit.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    pub fn head(&self) -> u64 {
        *self.head.borrow()
    }

    /// A fresh read connection, for long reads (snapshots, feed streams) that must
    /// not hold up writers. WAL mode gives it a consistent view per transaction.
    pub fn reader(&self) -> Result<Connection> {
        connect(&self.path)
    }

    /// Is the database usable?
    pub fn ping(&self) -> Result<()> {
        self.reader()?
            .query_row("SELECT 1", [], |_| Ok(()))
            .map_err(StoreError::from)
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves the connection usable: SQLite rolls
        // back the unfinished transaction when it is dropped.
        self.writer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Run `f` in one write transaction. Audit records and, if `f` published any
    /// ops, one change with the next seq are committed with it.
    fn write<'a, T>(
        &self,
        now_ms: i64,
        actor: &Actor,
        audit: impl Into<Option<AuditEntry<'a>>>,
        f: impl FnOnce(&mut Write<'_>) -> Result<T>,
    ) -> Result<T> {
        let mut conn = self.lock();
        let (value, new_head) = Self::commit_write(&mut conn, now_ms, actor, audit.into(), f)?;
        drop(conn);
        if let Some(seq) = new_head {
            // Writers reach this point after releasing the lock, so possibly out of
            // commit order: the published head only ever moves forward.
            self.head.send_if_modified(|head| {
                let newer = seq > *head;
                if newer {
                    *head = seq;
                }
                newer
            });
        }
        Ok(value)
    }

    fn commit_write<T>(
        conn: &mut Connection,
        now_ms: i64,
        actor: &Actor,
        audit: Option<AuditEntry<'_>>,
        f: impl FnOnce(&mut Write<'_>) -> Result<T>,
    ) -> Result<(T, Option<u64>)> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut write = Write {
            tx,
            ops: Vec::new(),
        };
        let value = f(&mut write)?;
        let Write { tx, ops } = write;
        if let Some(audit) = audit {
            tx.execute(
                "INSERT INTO audit (at_ms, actor, tenant, action, user, target) VALUES (?, ?, ?, ?, ?, ?)",
                params![now_ms, actor.as_str(), audit.tenant, audit.action, audit.user, audit.target],
            )?;
        }
        let mut new_head = None;
        if !ops.is_empty() {
            // The head lives in `meta` rather than being max(seq), so compaction can
            // empty the log without the next seq going backwards.
            let seq = head_of(&tx)? + 1;
            let body =
                serde_json::to_string(&ops).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            tx.execute(
                "INSERT INTO changes (seq, at_ms, ops) VALUES (?, ?, ?)",
                params![seq as i64, now_ms, body],
            )?;
            set_meta(&tx, "head", &seq.to_string())?;
            new_head = Some(seq);
        }
        tx.commit()?;
        Ok((value, new_head))
    }

    // ----- operator token -----

    pub fn operator_token_hash(&self) -> Result<Option<Vec<u8>>> {
        let conn = self.lock();
        get_meta(&conn, "operator_hash")?
            .map(|hex| decode_hex(&hex))
            .transpose()
    }

    pub fn set_operator_token_hash(&self, hash: &[u8]) -> Result<()> {
        let conn = self.lock();
        set_meta(
            &conn,
            "operator_hash",
            &data_encoding::HEXLOWER.encode(hash),
        )
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
                params![row.id, row.name, row.created_ms],
            )?;
            w.publish(Op::Put {
                entity: entities::tenant(row),
            });
            Ok(())
        })
    }

    pub fn list_tenants(&self) -> Result<Vec<TenantRow>> {
        let conn = self.lock();
        let mut stmt =
            conn.prepare("SELECT id, name, created_ms FROM tenants ORDER BY created_ms, id")?;
        let rows = stmt.query_map([], entities::tenant_row)?;
        rows.collect::<Result<_, _>>().map_err(StoreError::from)
    }

    pub fn tenant(&self, id: &str) -> Result<TenantRow> {
        let conn = self.lock();
        conn.query_row(
            "SELECT id, name, created_ms FROM tenants WHERE id = ?",
            [id],
            entities::tenant_row,
        )
        .optional()?
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
                ensure_tenant(&w.tx, tenant)?;
            }
            w.tx.execute(
                "INSERT INTO api_keys (id, tenant, name, hash, scopes, created_ms) VALUES (?, ?, ?, ?, ?, ?)",
                params![
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
        let conn = self.lock();
        if let Some(tenant) = tenant {
            ensure_tenant(&conn, tenant)?;
        }
        let mut stmt = conn.prepare(
            "SELECT id, tenant, name, hash, scopes, created_ms, revoked_ms FROM api_keys
             WHERE tenant IS ? ORDER BY created_ms, id",
        )?;
        let rows = stmt.query_map([tenant], entities::key_row)?;
        rows.collect::<Result<_, _>>().map_err(StoreError::from)
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
            let found =
                w.tx.query_row(
                    "SELECT id, tenant, name, hash, scopes, created_ms, revoked_ms FROM api_keys
                     WHERE id = ? AND tenant IS ?",
                    params![id, tenant],
                    entities::key_row,
                )
                .optional()?;
            match found {
                None => Err(StoreError::NotFound("api key")),
                Some(row) if row.revoked_ms.is_some() => Ok(()),
                Some(row) => {
                    w.tx.execute(
                        "UPDATE api_keys SET revoked_ms = ? WHERE id = ?",
                        params![now_ms, id],
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
        let conn = self.lock();
        let found = conn
            .query_row(
                "SELECT 1 FROM api_keys WHERE id = ? AND revoked_ms IS NULL",
                [id],
                |_| Ok(()),
            )
            .optional()?;
        Ok(found.is_some())
    }

    /// The unrevoked key with this hash, if any.
    pub fn key_by_hash(&self, hash: &[u8]) -> Result<Option<KeyRow>> {
        let conn = self.lock();
        conn.query_row(
            "SELECT id, tenant, name, hash, scopes, created_ms, revoked_ms FROM api_keys
             WHERE hash = ? AND revoked_ms IS NULL",
            [hash],
            entities::key_row,
        )
        .optional()
        .map_err(StoreError::from)
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
                "DELETE FROM totp_factors WHERE tenant = ? AND user = ? AND status = 'pending' AND expires_ms <= ?",
                params![row.tenant, row.user, now_ms],
            )?;
            let held: i64 = w.tx.query_row(
                "SELECT count(*) FROM totp_factors WHERE tenant = ? AND user = ?",
                params![row.tenant, row.user],
                |r| r.get(0),
            )?;
            if held as usize >= max_factors {
                return Err(StoreError::Conflict("too_many_factors"));
            }
            entities::insert_factor(&w.tx, row)?;
            Ok(())
        })
    }

    /// A factor of this user, pending or active.
    pub fn factor(&self, tenant: &str, user: &str, id: &str) -> Result<FactorRow> {
        let conn = self.lock();
        entities::factor(&conn, tenant, user, id)?.ok_or(StoreError::NotFound("factor"))
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
            let failures: Option<u32> =
                w.tx.query_row(
                    "UPDATE totp_factors SET activation_failures = activation_failures + 1
                     WHERE id = ? AND tenant = ? AND user = ? AND status = 'pending'
                     RETURNING activation_failures",
                    params![id, tenant, user],
                    |r| r.get(0),
                )
                .optional()?;
            let dropped = failures.is_some_and(|f| f >= limit);
            if dropped {
                w.tx.execute("DELETE FROM totp_factors WHERE id = ?", [id])?;
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
            let mut row = entities::factor(&w.tx, tenant, user, id)?.ok_or(StoreError::NotFound("factor"))?;
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
                params![now_ms, step as i64, id],
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
        let conn = self.lock();
        entities::factors_of(&conn, tenant, user).map(|rows| {
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
            let row =
                entities::factor(&w.tx, tenant, user, id)?.ok_or(StoreError::NotFound("factor"))?;
            w.tx.execute("DELETE FROM totp_factors WHERE id = ?", [id])?;
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
            let factors = entities::factors_of(&w.tx, tenant, user)?;
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
                "DELETE FROM totp_factors WHERE tenant = ? AND user = ?",
                params![tenant, user],
            )?;
            if w.tx.execute(
                "DELETE FROM backup_codes WHERE tenant = ? AND user = ?",
                params![tenant, user],
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
            if w.tx.execute(
                "DELETE FROM user_state WHERE tenant = ? AND user = ?",
                params![tenant, user],
            )? > 0
            {
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
                "INSERT INTO backup_codes (tenant, user, set_id, codes, created_ms) VALUES (?, ?, ?, ?, ?)
                 ON CONFLICT (tenant, user) DO UPDATE
                 SET set_id = excluded.set_id, codes = excluded.codes, created_ms = excluded.created_ms",
                params![tenant, user, set_id, entities::codes_text(&codes)?, now_ms],
            )?;
            w.publish(Op::Put {
                entity: entities::backup_codes(tenant, user, set_id, codes),
            });
            Ok(())
        })
    }

    pub fn backup_summary(&self, tenant: &str, user: &str) -> Result<Option<BackupSummary>> {
        let conn = self.lock();
        let Some((_, codes)) = entities::backup_codes_of(&conn, tenant, user)? else {
            return Ok(None);
        };
        Ok(Some(BackupSummary {
            remaining: codes.iter().filter(|c| !c.used).count(),
            total: codes.len(),
        }))
    }

    // ----- runtime state -----

    pub fn user_state(&self, tenant: &str, user: &str) -> Result<UserStateRow> {
        let conn = self.lock();
        entities::user_state_of(&conn, tenant, user).map(Option::unwrap_or_default)
    }

    /// Clear a user's failures, throttle and lock. Fails with `NotFound` for a
    /// user Twofold does not know.
    pub fn unlock_user(&self, now_ms: i64, actor: &Actor, tenant: &str, user: &str) -> Result<()> {
        let audit = AuditEntry::on_user("user.unlock", tenant, user, None);
        self.write(now_ms, actor, audit, |w| {
            if !entities::user_exists(&w.tx, tenant, user)? {
                return Err(StoreError::NotFound("user"));
            }
            let cleared = UserStateRow::default();
            entities::put_user_state(&w.tx, tenant, user, &cleared)?;
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
        let conn = self.lock();
        let mut stmt = conn.prepare(
            "SELECT id, at_ms, actor, tenant, action, user, target FROM audit
             WHERE id > ?1 AND (?2 IS NULL OR tenant = ?2) AND (?3 IS NULL OR user = ?3)
             ORDER BY id LIMIT ?4",
        )?;
        let rows = stmt.query_map(params![after, tenant, user, limit as i64], |r| {
            Ok(AuditRow {
                id: r.get(0)?,
                at_ms: r.get(1)?,
                actor: r.get(2)?,
                tenant: r.get(3)?,
                action: r.get(4)?,
                user: r.get(5)?,
                target: r.get(6)?,
            })
        })?;
        rows.collect::<Result<_, _>>().map_err(StoreError::from)
    }

    /// Changes after `after`, in seq order, at most `limit`.
    pub fn changes_after(conn: &Connection, after: u64, limit: usize) -> Result<Vec<Change>> {
        feed::changes_after(conn, after, limit)
    }
}

fn connect(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // With WAL, NORMAL loses no committed transaction on a process crash; FULL
    // also survives power loss, which is what a change log needs.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    for (i, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.execute_batch(migration)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
    }
    tx.commit()?;
    Ok(())
}

fn get_meta(conn: &Connection, key: &str) -> Result<Option<String>> {
    conn.query_row("SELECT value FROM meta WHERE key = ?", [key], |r| r.get(0))
        .optional()
        .map_err(StoreError::from)
}

fn set_meta(conn: &Connection, key: &str, value: &str) -> Result<()> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [key, value],
    )?;
    Ok(())
}

fn meta_u64(conn: &Connection, key: &str) -> Result<u64> {
    match get_meta(conn, key)? {
        None => Ok(0),
        Some(v) => v
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("meta {key}"))),
    }
}

fn head_of(conn: &Connection) -> Result<u64> {
    meta_u64(conn, "head")
}

fn ensure_tenant(conn: &Connection, tenant: &str) -> Result<()> {
    let found = conn
        .query_row("SELECT 1 FROM tenants WHERE id = ?", [tenant], |_| Ok(()))
        .optional()?;
    found.ok_or(StoreError::NotFound("tenant"))
}

fn decode_hex(hex: &str) -> Result<Vec<u8>> {
    data_encoding::HEXLOWER
        .decode(hex.as_bytes())
        .map_err(|_| StoreError::Corrupt("hex".into()))
}
