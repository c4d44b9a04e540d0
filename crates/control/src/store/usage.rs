//! Merging data planes' usage reports into the replicated state.
//!
//! Merges are order-independent where the data allows it: a factor's last step
//! only grows (max), used backup codes stay used (union). Failure counts combine
//! the nodes' failures, and a success resets them, through the same throttle
//! policy the data planes apply. Each node's events are numbered; a cursor per
//! node skips events already merged, so a retried report changes nothing.

use std::collections::BTreeMap;

use twofold_core::feed::{
    BackupCodeUse, BackupCodeUseAck, Entity, EntityKey, NumberedEvent, Op, UsageAck, UsageEvent,
};
use twofold_core::throttle::{Throttle, ThrottlePolicy};

use super::entities::{self, backup_codes_of, put_user_state, user_exists, user_state_of};
use super::sql::args;
use super::{Actor, FactorStatus, Result, Store, UserStateRow, Write};

fn throttle_of(row: &UserStateRow) -> Throttle {
    Throttle {
        failures: row.failures,
        locked: row.locked,
        throttled_until: row.throttled_until,
    }
}

fn row_of(t: Throttle) -> UserStateRow {
    UserStateRow {
        failures: t.failures,
        locked: t.locked,
        throttled_until: t.throttled_until,
    }
}

impl Store {
    /// Merge the events of `node` it has not merged before, in one transaction.
    /// Returns the highest event id merged and the head seq after the merge, which
    /// holds every resulting change.
    pub fn apply_usage(
        &self,
        now_ms: i64,
        node: &str,
        events: &[NumberedEvent],
        policy: &ThrottlePolicy,
    ) -> Result<UsageAck> {
        let actor = Actor::Key(node.to_owned());
        let through = self.write(now_ms, &actor, None, |w| {
            let cursor: u64 =
                w.tx.query_opt(
                    "SELECT through FROM usage_cursors WHERE node = ?",
                    args![node],
                    |r| r.int(0),
                )?
                .unwrap_or(0);
            // Entities touched, by key: each is published once, in its final state.
            let mut touched: BTreeMap<EntityKey, Entity> = BTreeMap::new();
            let mut through = cursor;
            for numbered in events.iter().filter(|e| e.id > cursor) {
                merge(w, &numbered.event, policy, &mut touched)?;
                through = through.max(numbered.id);
            }
            if through > cursor {
                w.tx.execute(
                    "INSERT INTO usage_cursors (node, through) VALUES (?, ?)
                     ON CONFLICT (node) DO UPDATE SET through = excluded.through",
                    args![node, through as i64],
                )?;
            }
            for entity in touched.into_values() {
                w.publish(Op::Put { entity });
            }
            Ok(through)
        })?;
        // `write` publishes the new head before returning, so this covers the
        // change just committed.
        Ok(UsageAck {
            through,
            seq: self.head(),
        })
    }
}

impl Store {
    /// Mark one backup code used, if it is not already. Returns whether this call
    /// used it, and the head seq after.
    pub fn use_backup_code(
        &self,
        now_ms: i64,
        node: &str,
        code: &BackupCodeUse,
    ) -> Result<BackupCodeUseAck> {
        let actor = Actor::Key(node.to_owned());
        let accepted = self.write(now_ms, &actor, None, |w| {
            let event = UsageEvent::BackupCodeUsed {
                tenant: code.tenant.clone(),
                user: code.user.clone(),
                set_id: code.set_id.clone(),
                index: code.index,
            };
            let mut touched = BTreeMap::new();
            merge(w, &event, &ThrottlePolicy::default(), &mut touched)?;
            let accepted = !touched.is_empty();
            for entity in touched.into_values() {
                w.publish(Op::Put { entity });
            }
            Ok(accepted)
        })?;
        Ok(BackupCodeUseAck {
            accepted,
            seq: self.head(),
        })
    }
}

fn merge(
    w: &mut Write<'_, '_>,
    event: &UsageEvent,
    policy: &ThrottlePolicy,
    touched: &mut BTreeMap<EntityKey, Entity>,
) -> Result<()> {
    match event {
        UsageEvent::TotpAccepted {
            tenant,
            user,
            factor,
            step,
        } => {
            let Some(mut row) = entities::factor(&mut w.tx, tenant, user, factor)? else {
                return Ok(());
            };
            if row.status != FactorStatus::Active || row.last_step.is_some_and(|s| s >= *step) {
                return Ok(());
            }
            w.tx.execute(
                "UPDATE totp_factors SET last_step = ? WHERE id = ?",
                args![*step as i64, factor],
            )?;
            row.last_step = Some(*step);
            let entity = entities::totp(&row);
            touched.insert(entity.key(), entity);
        }
        UsageEvent::BackupCodeUsed {
            tenant,
            user,
            set_id,
            index,
        } => {
            let Some((current, mut codes)) = backup_codes_of(&mut w.tx, tenant, user)? else {
                return Ok(());
            };
            let Some(code) = codes.get_mut(*index as usize) else {
                return Ok(());
            };
            if current != *set_id || code.used {
                return Ok(());
            }
            code.used = true;
            w.tx.execute(
                "UPDATE backup_codes SET codes = ? WHERE tenant = ? AND user_id = ?",
                args![entities::codes_text(&codes)?, tenant, user],
            )?;
            let entity = entities::backup_codes(tenant, user, &current, codes);
            touched.insert(entity.key(), entity);
        }
        UsageEvent::Failure { tenant, user, at } => {
            // A user with throttle state exists; only a first failure needs the
            // wider check.
            let state = match user_state_of(&mut w.tx, tenant, user)? {
                Some(state) => state,
                None if user_exists(&mut w.tx, tenant, user)? => UserStateRow::default(),
                None => return Ok(()),
            };
            let next = row_of(policy.fail(&throttle_of(&state), *at));
            put_user_state(&mut w.tx, tenant, user, &next)?;
            let entity = entities::user_state(tenant, user, &next);
            touched.insert(entity.key(), entity);
        }
        UsageEvent::Success { tenant, user } => {
            let Some(state) = user_state_of(&mut w.tx, tenant, user)? else {
                return Ok(());
            };
            let next = row_of(throttle_of(&state).succeed());
            if next != state {
                put_user_state(&mut w.tx, tenant, user, &next)?;
                let entity = entities::user_state(tenant, user, &next);
                touched.insert(entity.key(), entity);
            }
        }
    }
    Ok(())
}
