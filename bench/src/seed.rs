//! Seeding a stopped control plane's SQLite database directly with active TOTP
//! factors: a million enrolments through the API would take far too long (each
//! is two fsynced transactions).
//!
//! The rows are what `Store::insert_pending_totp` then `Store::activate_totp`
//! would leave (crates/control/src/store), activated [`ACTIVATED_STEPS_AGO`]
//! steps before seeding, with the activation's step as the last step used (as
//! activation records it), with secrets sealed exactly as the
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

use crate::totp::{PERIOD, step_at};
use crate::users::user_name;

/// Secrets drawn from the OS per call.
const SECRET_BATCH: usize = 4096;

/// How long before seeding the factors were activated, in 30 s steps: long
/// enough that the codes of the steps a benchmark runs in are all fresh.
pub const ACTIVATED_STEPS_AGO: u64 = 100;

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
    /// The step every factor was activated at, its last step used.
    pub activated_step: u64,
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
    // A factor is never active without a step: activation checks a code and
    // keeps its step, so the first code the benchmark sends updates a step
    // rather than setting one.
    let activated_step = step_at(now_ms as u64 / 1000).saturating_sub(ACTIVATED_STEPS_AGO);
    let activated_ms = (activated_step * PERIOD * 1000) as i64;
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
             VALUES (?1, ?2, ?3, ?3, 'Twofold', 'SHA1', 6, ?7, ?4, 'active', ?5, NULL, ?5, ?6)",
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
            insert.execute(params![
                id.as_str(),
                tenant,
                user,
                sealed,
                activated_ms,
                activated_step as i64,
                PERIOD as i64
            ])?;
            if i + 1 == secrets.len() {
                last = Some(TotpRecord {
                    id: id.to_string(),
                    tenant: tenant.to_owned(),
                    user,
                    algorithm: "SHA1".into(),
                    digits: 6,
                    period: PERIOD as u32,
                    sealed,
                    last_step: Some(activated_step),
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
        activated_step,
        took: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use twofold_control::store::{Actor, FactorRow, FactorStatus, Store, TenantRow};
    use twofold_core::seal::MasterKey;

    use super::*;

    /// A seeded factor is what enrolment then activation at the seeded step
    /// leave, apart from its id, user, secret and times.
    #[test]
    fn a_seeded_factor_is_an_activated_one() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let db = dir.path().join("control.db");
        let keyring = Keyring::new(MasterKey::generate().expect("master key"));
        let tenant = "t_seed";
        let store = Store::open(&db).expect("store");
        let row = TenantRow {
            id: tenant.into(),
            name: "seed".into(),
            created_ms: 1,
        };
        store
            .create_tenant(1, &Actor::Operator, &row)
            .expect("tenant");
        drop(store);

        let secrets = [[7u8; 20], [9u8; 20]];
        let seeded = insert_factors(&db, &keyring, tenant, &secrets).expect("seeding");
        assert_eq!(seeded.factors, 2);
        let now_step = step_at(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("clock")
                .as_secs(),
        );
        assert!(now_step.abs_diff(seeded.activated_step + ACTIVATED_STEPS_AGO) <= 1);

        let store = Store::open(&db).expect("store");
        let user = user_name(1);
        let factors = store.list_factors(0, tenant, &user).expect("factors");
        let [seeded_row] = factors.as_slice() else {
            panic!("one factor expected, got {factors:?}");
        };
        let binding = Binding {
            tenant,
            user: &user,
            factor: &seeded_row.id,
        };
        let sealed = twofold_core::seal::Sealed::from_bytes(&seeded_row.sealed).expect("sealed");
        let opened = keyring.open_secret(&sealed, &binding).expect("opens");
        assert_eq!(opened, Secret::from_bytes(&secrets[1]).expect("secret"));

        // The same factor through the store's own enrolment and activation.
        let activated_ms = seeded_row.activated_ms.expect("activated");
        let id = FactorId::generate().expect("id").to_string();
        let pending = FactorRow {
            id: id.clone(),
            user: "enrolled".into(),
            label: "enrolled".into(),
            status: FactorStatus::Pending,
            expires_ms: Some(activated_ms + 600_000),
            activated_ms: None,
            last_step: None,
            ..seeded_row.clone()
        };
        store
            .insert_pending_totp(activated_ms, &Actor::Operator, &pending, 5)
            .expect("enrolment");
        let activated = store
            .activate_totp(
                activated_ms,
                &Actor::Operator,
                tenant,
                "enrolled",
                &id,
                seeded.activated_step,
            )
            .expect("activation");
        assert_eq!(
            FactorRow {
                id: seeded_row.id.clone(),
                user: seeded_row.user.clone(),
                label: seeded_row.label.clone(),
                ..activated
            },
            *seeded_row
        );
        assert_eq!(seeded_row.last_step, Some(seeded.activated_step));
    }
}
