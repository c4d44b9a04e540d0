//! Seeding a stopped control plane's SQLite database directly with active TOTP
//! factors: a million enrolments through the API would take far too long (each
//! is two fsynced transactions).
//!
//! The rows are what `Store::insert_pending_totp` then `Store::activate_totp`
//! would leave (crates/control/src/store), with secrets sealed exactly as the
//! control plane seals them (`Keyring::seal_secret`, bound to tenant, user and
//! factor), and the change log advanced by one change, so the head moves and
//! the log is not empty. A snapshot reads every active factor whatever the log
//! holds, so a data plane that bootstraps sees them all.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use rusqlite::{Connection, TransactionBehavior, params};
use twofold_core::feed::{Entity, Op, TotpRecord};
use twofold_core::ids::FactorId;
use twofold_core::seal::{Binding, Keyring};
use twofold_core::secret::Secret;

use crate::users::user_name;

/// Secrets drawn from the OS per call.
const SECRET_BATCH: usize = 4096;

/// Random 20-byte secrets (SHA-1 size) for `count` users.
pub fn random_secrets(count: usize) -> anyhow::Result<Vec<[u8; 20]>> {
    let mut secrets = Vec::with_capacity(count);
    let mut buf = vec![0u8; SECRET_BATCH * 20];
    while secrets.len() < count {
        getrandom::fill(&mut buf).map_err(|e| anyhow::anyhow!("OS random source: {e}"))?;
        for chunk in buf.chunks_exact(20).take(count - secrets.len()) {
            let mut secret = [0u8; 20];
            secret.copy_from_slice(chunk);
            secrets.push(secret);
        }
    }
    Ok(secrets)
}

/// What seeding did.
#[derive(Debug, Clone, Copy)]
pub struct Seeded {
    pub factors: usize,
    pub head: u64,
    pub took: Duration,
}

/// Insert one active SHA-1/6-digit/30 s factor for each of users
/// `0..secrets.len()` of `tenant`, in one transaction, into the database at
/// `db`. The control plane must be stopped.
pub fn insert_factors(
    db: &Path,
    keyring: &Keyring,
    tenant: &str,
    secrets: &[[u8; 20]],
) -> anyhow::Result<Seeded> {
    let started = std::time::Instant::now();
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let mut conn = Connection::open(db).with_context(|| format!("cannot open {}", db.display()))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut last: Option<TotpRecord> = None;
    {
        // label = the user id (the default account name); issuer = the default.
        let mut insert = tx.prepare(
            "INSERT INTO totp_factors (id, tenant, user_id, label, issuer, algorithm, digits, period, \
             sealed, status, created_ms, expires_ms, activated_ms, last_step) \
             VALUES (?1, ?2, ?3, ?3, 'Twofold', 'SHA1', 6, 30, ?4, 'active', ?5, NULL, ?5, NULL)",
        )?;
        for (i, secret) in secrets.iter().enumerate() {
            let user = user_name(i);
            let id = FactorId::generate().map_err(|e| anyhow::anyhow!("factor id: {e}"))?;
            let secret = Secret::from_bytes(secret).map_err(|e| anyhow::anyhow!("secret: {e}"))?;
            let binding = Binding {
                tenant,
                user: &user,
                factor: id.as_str(),
            };
            let sealed = keyring
                .seal_secret(&secret, &binding)
                .map_err(|e| anyhow::anyhow!("sealing: {e}"))?
                .into_bytes();
            insert.execute(params![id.as_str(), tenant, user, sealed, now_ms])?;
            if i + 1 == secrets.len() {
                last = Some(TotpRecord {
                    id: id.to_string(),
                    tenant: tenant.to_owned(),
                    user,
                    algorithm: "SHA1".into(),
                    digits: 6,
                    period: 30,
                    sealed,
                    last_step: None,
                });
            }
        }
    }
    // One change, as a mutation would commit: the next seq from the counter
    // row, carrying the full state of the last factor (a put is idempotent).
    let seq: i64 = tx.query_row(
        "UPDATE log_head SET seq = seq + 1 WHERE id = 0 RETURNING seq",
        [],
        |r| r.get(0),
    )?;
    let seq = seq as u64;
    let ops: Vec<Op> = last
        .map(|record| Op::Put {
            entity: Entity::Totp(record),
        })
        .into_iter()
        .collect();
    tx.execute(
        "INSERT INTO changes (seq, at_ms, ops) VALUES (?, ?, ?)",
        params![seq as i64, now_ms, serde_json::to_string(&ops)?],
    )?;
    tx.commit()?;
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")?;
    Ok(Seeded {
        factors: secrets.len(),
        head: seq,
        took: started.elapsed(),
    })
}
