//! Merging data planes' usage reports into the replicated state.
//!
//! Merges are order-independent where the data allows it: a factor's last step
//! only grows (max), used backup codes stay used (union). Failure counts combine
//! the nodes' failures, and a success resets them, through the same throttle
//! policy the data planes apply. Each node's events are numbered; a cursor per
//! node skips events already merged, so a retried report changes nothing.
//!
//! A user's state is published only when it changes what the user may do: a
//! backoff that starts or grows, a lock, or a reset of failures. A failure
//! below the backoff threshold is counted (`unpublished`) but not sent to every
//! data plane; each node counts its own until a published state counts them
//! (`UsageAck::counted_from`), and the state published when the threshold is
//! crossed carries the whole count.

use std::collections::BTreeMap;

use twofold_core::feed::{
    BackupCodeUse, BackupCodeUseAck, Entity, EntityKey, NumberedEvent, Op, RetriedMerge, UsageAck,
    UsageEvent,
};
use twofold_core::throttle::{Throttle, ThrottlePolicy};

use super::entities::{
    self, backup_codes_of, failure_state, put_unpublished, put_user_state, whole_user_state,
};
use super::sql::args;
use super::{Actor, Result, Store, UserStateRow, Write};

/// A user's whole state, published or not.
fn throttle_of(row: &UserStateRow) -> Throttle {
    Throttle {
        failures: row.all_failures(),
        locked: row.locked,
        throttled_until: row.throttled_until,
    }
}

/// `t` as published.
fn published(t: Throttle) -> UserStateRow {
    UserStateRow {
        failures: t.failures,
        locked: t.locked,
        throttled_until: t.throttled_until,
        unpublished: 0,
    }
}

impl Store {
    /// Merge the events of `node` it has not merged before, in one transaction.
    /// Returns the highest event id merged, the head seq after the merge, which
    /// holds every resulting change, and the first seq whose published states
    /// count the merged events.
    pub fn apply_usage(
        &self,
        now_ms: i64,
        node: &str,
        events: &[NumberedEvent],
        policy: &ThrottlePolicy,
    ) -> Result<UsageAck> {
        let actor = Actor::Key(node.to_owned());
        let (through, counted_from, retried) = self.write(now_ms, &actor, None, |w| {
            // Writers are serialised, so the change this merge publishes, if
            // any, takes the next seq, and any later one counts the merge.
            let counted_from =
                w.tx.query_one("SELECT seq FROM log_head WHERE id = 0", args![], |r| {
                    r.int::<u64>(0)
                })? + 1;
            let (cursor, cursor_counted_from): (u64, u64) =
                w.tx.query_opt(
                    "SELECT through, counted_from FROM usage_cursors WHERE node = ?",
                    args![node],
                    |r| Ok((r.int(0)?, r.int(1)?)),
                )?
                .unwrap_or((0, 0));
            // Events this node sent before, in a report whose answer it lost. A
            // cursor written before counted_from was kept says 0: unknown.
            let retried = events
                .first()
                .filter(|e| e.id <= cursor && cursor_counted_from > 0)
                .map(|_| RetriedMerge {
                    through: cursor,
                    counted_from: cursor_counted_from,
                });
            // Entities touched, by key: each is published once, in its final state.
            let mut touched: BTreeMap<EntityKey, Entity> = BTreeMap::new();
            let mut through = cursor;
            for numbered in events.iter().filter(|e| e.id > cursor) {
                merge(w, &numbered.event, policy, &mut touched)?;
                through = through.max(numbered.id);
            }
            if through > cursor {
                w.tx.execute(
                    "INSERT INTO usage_cursors (node, through, counted_from) VALUES (?, ?, ?)
                     ON CONFLICT (node) DO UPDATE
                     SET through = excluded.through, counted_from = excluded.counted_from",
                    args![node, through as i64, counted_from as i64],
                )?;
            }
            for entity in touched.into_values() {
                w.publish(Op::Put { entity });
            }
            // Nothing new merged: the whole report was merged before.
            let counted_from = if through > cursor {
                counted_from
            } else {
                retried.map_or(counted_from, |r| r.counted_from)
            };
            Ok((through, counted_from, retried))
        })?;
        // `write` publishes the new head before returning, so this covers the
        // change just committed.
        Ok(UsageAck {
            through,
            seq: self.head(),
            counted_from: Some(counted_from),
            retried,
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
            let accepted = touched
                .values()
                .any(|e| matches!(e, Entity::BackupCodes(_)));
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
            // One statement: every accepted code a node reports comes here.
            let Some(row) = entities::advance_last_step(&mut w.tx, tenant, user, factor, *step)?
            else {
                return Ok(());
            };
            let entity = entities::totp(&row);
            touched.insert(entity.key(), entity);
            succeed(w, tenant, user, touched)?;
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
            succeed(w, tenant, user, touched)?;
        }
        UsageEvent::Failure { tenant, user, at } => {
            let Some(state) = failure_state(&mut w.tx, tenant, user)? else {
                // Not a user Twofold knows: nothing to count.
                return Ok(());
            };
            let next = policy.fail(&throttle_of(&state), *at);
            let key = EntityKey::UserState {
                tenant: tenant.clone(),
                user: user.clone(),
            };
            // Once this report publishes the user's state, that state must count
            // every one of the report's events for the user: the answer gives
            // them all the same `counted_from`.
            if next.locked == state.locked
                && next.throttled_until == state.throttled_until
                && !touched.contains_key(&key)
            {
                // What the user may do is unchanged: count it, publish nothing.
                put_unpublished(&mut w.tx, tenant, user, state.unpublished.saturating_add(1))?;
            } else {
                let next = published(next);
                put_user_state(&mut w.tx, tenant, user, &next)?;
                let entity = entities::user_state(tenant, user, &next);
                touched.insert(entity.key(), entity);
            }
        }
        UsageEvent::Success { tenant, user } => succeed(w, tenant, user, touched)?,
    }
    Ok(())
}

/// A code was accepted: reset the user's failures. A node sends `Success` only
/// when it knows of failures, and it may not know of failures merged but not
/// published, so an accepted code resets them too.
fn succeed(
    w: &mut Write<'_, '_>,
    tenant: &str,
    user: &str,
    touched: &mut BTreeMap<EntityKey, Entity>,
) -> Result<()> {
    let Some(state) = whole_user_state(&mut w.tx, tenant, user)? else {
        return Ok(());
    };
    // Published whenever failures are reset, counted or not: every node then
    // drops its own failures that this state counts.
    let next = published(throttle_of(&state).succeed());
    if next != state {
        put_user_state(&mut w.tx, tenant, user, &next)?;
        let entity = entities::user_state(tenant, user, &next);
        touched.insert(entity.key(), entity);
    }
    Ok(())
}
