//! Which master keys seal the stored TOTP secrets, and re-sealing them under
//! another key. The store does no cryptography: the caller decides, row by row,
//! what the new blob is.

use std::collections::BTreeMap;

use twofold_core::feed::Op;
use twofold_core::seal::KeyId;

use super::entities::{self, FACTOR_COLUMNS};
use super::sql::args;
use super::{Actor, AuditEntry, FactorRow, FactorStatus, Result, Store, StoreError, insert_audit};

/// Re-sealing as the audit log shows it: one record per batch.
pub const RESEAL_ACTION: &str = "keys.reseal";

impl Store {
    /// How many stored TOTP secrets, pending or active, each key id seals. The
    /// id is bytes 1 to 4 of the blob (see `twofold_core::seal`), read by the
    /// database so no secret leaves it.
    pub fn sealed_by_key(&self) -> Result<BTreeMap<KeyId, u64>> {
        let rows = self.read(|conn| {
            conn.query(
                "SELECT substr(sealed, 2, 4), count(*) FROM totp_factors GROUP BY 1",
                args![],
                |r| Ok((r.get::<Vec<u8>>(0)?, r.int::<u64>(1)?)),
            )
        })?;
        let mut counts = BTreeMap::new();
        for (id, count) in rows {
            let id: [u8; 4] = id
                .as_slice()
                .try_into()
                .map_err(|_| StoreError::Corrupt("sealed secret without a key id".into()))?;
            *counts
                .entry(KeyId::from(u32::from_be_bytes(id)))
                .or_default() += count;
        }
        Ok(counts)
    }

    /// Up to `limit` factors after the id `after`, in id order, as (id, sealed
    /// blob). Read outside any write transaction, to find what needs re-sealing.
    pub fn sealed_page(&self, after: &str, limit: usize) -> Result<Vec<(String, Vec<u8>)>> {
        self.read(|conn| {
            conn.query(
                "SELECT id, sealed FROM totp_factors WHERE id > ? ORDER BY id LIMIT ?",
                args![after, limit as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
        })
    }

    /// Re-seal, in one write transaction, the factors with ids in `(after,
    /// through]`. Each row is read again inside the transaction, so a row
    /// changed or deleted since it was looked at is seen as it is now;
    /// `reseal` returns the row's new blob, or `None` to leave it. Each changed
    /// active factor is published in full (a `Put` with its current last step),
    /// so data planes get the new blob; pending factors are not in the feed. One
    /// audit record (`keys.reseal`, by the operator, target `audit_target`) is
    /// written when anything changed. Returns how many rows changed.
    pub fn reseal_factors(
        &self,
        now_ms: i64,
        after: &str,
        through: &str,
        audit_target: &str,
        reseal: &mut dyn FnMut(&FactorRow) -> Option<Vec<u8>>,
    ) -> Result<usize> {
        self.write(now_ms, &Actor::Operator, None, |w| {
            let rows = w.tx.query(
                &format!(
                    "SELECT {FACTOR_COLUMNS} FROM totp_factors WHERE id > ? AND id <= ? ORDER BY id"
                ),
                args![after, through],
                entities::factor_row,
            )?;
            let mut changed = 0;
            for mut row in rows {
                let Some(sealed) = reseal(&row) else {
                    continue;
                };
                // Inside the write transaction nothing else can change the row,
                // but the old blob in the condition keeps this from ever
                // overwriting a blob it did not open.
                let updated = w.tx.execute(
                    "UPDATE totp_factors SET sealed = ? WHERE id = ? AND sealed = ?",
                    args![sealed, row.id, row.sealed],
                )?;
                if updated == 0 {
                    continue;
                }
                changed += 1;
                row.sealed = sealed;
                if row.status == FactorStatus::Active {
                    w.publish(Op::Put {
                        entity: entities::totp(&row),
                    });
                }
            }
            if changed > 0 {
                let audit = AuditEntry {
                    action: RESEAL_ACTION,
                    tenant: None,
                    user: None,
                    target: Some(audit_target),
                };
                insert_audit(&mut w.tx, now_ms, &Actor::Operator, &audit)?;
            }
            Ok(changed)
        })
    }
}
