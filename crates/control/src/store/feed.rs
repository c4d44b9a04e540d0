//! Reading the change log and the replicated state: changes after a seq,
//! consistent snapshots, the state digest and log compaction.

use rusqlite::{Connection, params};
use twofold_core::feed::{Change, Entity, Op, SnapshotLine, StateDigest};

use super::entities::{self, FACTOR_COLUMNS};
use super::{Result, Store, StoreError, get_meta, head_of, meta_u64, set_meta};

/// Where a reader asking for the changes after a seq stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedPosition {
    /// Every change after it is still in the log.
    Resumable,
    /// Changes after it were compacted away, it names a seq beyond the head, or it
    /// belongs to another log: the reader must take a snapshot.
    Gone,
}

/// Receives snapshot lines in order; returns `false` to stop early (the client
/// went away).
pub type SnapshotSink<'a> = dyn FnMut(SnapshotLine) -> bool + 'a;

pub(super) fn changes_after(conn: &Connection, after: u64, limit: usize) -> Result<Vec<Change>> {
    let mut stmt = conn
        .prepare_cached("SELECT seq, at_ms, ops FROM changes WHERE seq > ? ORDER BY seq LIMIT ?")?;
    let rows = stmt.query_map(params![after as i64, limit as i64], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, String>(2)?,
        ))
    })?;
    let mut changes = Vec::new();
    for row in rows {
        let (seq, at_ms, ops) = row?;
        let ops: Vec<Op> = serde_json::from_str(&ops)
            .map_err(|e| StoreError::Corrupt(format!("change {seq}: {e}")))?;
        changes.push(Change {
            seq: seq as u64,
            at_ms: at_ms as u64,
            ops,
        });
    }
    Ok(changes)
}

/// Call `each` with every replicated entity as of the connection's current read
/// transaction. Stops early, returning `false`, when `each` does.
fn for_each_entity(conn: &Connection, each: &mut dyn FnMut(Entity) -> bool) -> Result<bool> {
    let mut stmt = conn.prepare("SELECT id, name, created_ms FROM tenants ORDER BY id")?;
    for row in stmt.query_map([], entities::tenant_row)? {
        if !each(entities::tenant(&row?)) {
            return Ok(false);
        }
    }
    let mut stmt = conn.prepare(
        "SELECT id, tenant, name, hash, scopes, created_ms, revoked_ms FROM api_keys
         WHERE tenant IS NOT NULL AND revoked_ms IS NULL ORDER BY id",
    )?;
    for row in stmt.query_map([], entities::key_row)? {
        if let Some(entity) = entities::api_key(&row?)
            && !each(entity)
        {
            return Ok(false);
        }
    }
    let mut stmt = conn.prepare(&format!(
        "SELECT {FACTOR_COLUMNS} FROM totp_factors WHERE status = 'active' ORDER BY id"
    ))?;
    for row in stmt.query_map([], entities::factor_row)? {
        if !each(entities::totp(&row?)) {
            return Ok(false);
        }
    }
    let mut stmt =
        conn.prepare("SELECT tenant, user, set_id, codes FROM backup_codes ORDER BY tenant, user")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            entities::parse_codes(&r.get::<_, String>(3)?)?,
        ))
    })?;
    for row in rows {
        let (tenant, user, set_id, codes) = row?;
        if !each(entities::backup_codes(&tenant, &user, &set_id, codes)) {
            return Ok(false);
        }
    }
    let mut stmt = conn.prepare(
        "SELECT failures, locked, throttled_until, tenant, user FROM user_state ORDER BY tenant, user",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            entities::user_state_row(r)?,
            r.get::<_, String>(3)?,
            r.get::<_, String>(4)?,
        ))
    })?;
    for row in rows {
        let (state, tenant, user) = row?;
        if !each(entities::user_state(&tenant, &user, &state)) {
            return Ok(false);
        }
    }
    Ok(true)
}

impl Store {
    /// Can a reader of log `log_id` that has applied `after` resume from the log?
    pub fn feed_position(&self, log_id: Option<&str>, after: u64) -> Result<FeedPosition> {
        if log_id.is_some_and(|id| id != self.log_id) {
            return Ok(FeedPosition::Gone);
        }
        let conn = self.reader()?;
        let compacted = meta_u64(&conn, "compacted_through")?;
        if after < compacted || after > head_of(&conn)? {
            return Ok(FeedPosition::Gone);
        }
        Ok(FeedPosition::Resumable)
    }

    /// Stream a consistent snapshot through `sink`: a `Begin` line with the seq it
    /// is as of, every entity, and an `End` line with their count and digest. Rows
    /// are read one at a time, so memory does not grow with the state.
    pub fn snapshot(&self, sink: &mut SnapshotSink<'_>) -> Result<()> {
        let mut conn = self.reader()?;
        // One read transaction: every SELECT below sees the same committed state,
        // and the head read first is the seq that state is as of.
        let tx = conn.transaction()?;
        let seq = head_of(&tx)?;
        if !sink(SnapshotLine::Begin { seq }) {
            return Ok(());
        }
        let mut digest = StateDigest::default();
        let complete = for_each_entity(&tx, &mut |entity| {
            digest.add(&entity);
            sink(SnapshotLine::Entity { entity })
        })?;
        if complete {
            sink(SnapshotLine::End {
                seq,
                count: digest.count(),
                digest: digest.to_hex(),
            });
        }
        Ok(())
    }

    /// The digest of the replicated state, with the seq it is as of.
    pub fn digest(&self) -> Result<(u64, StateDigest)> {
        let mut conn = self.reader()?;
        let tx = conn.transaction()?;
        let seq = head_of(&tx)?;
        let mut digest = StateDigest::default();
        for_each_entity(&tx, &mut |entity| {
            digest.add(&entity);
            true
        })?;
        Ok((seq, digest))
    }

    /// Drop changes beyond the retention limits: more than `keep` behind the head,
    /// or older than `min_at_ms`. The newest change is always kept. Returns how
    /// many were dropped.
    pub fn compact(&self, keep: u64, min_at_ms: i64) -> Result<usize> {
        let conn = self.lock();
        let tx = conn.unchecked_transaction()?;
        let head = head_of(&tx)?;
        // `max(1)`: even `keep = 0` keeps the newest change, as documented.
        let by_count = head.saturating_sub(keep.max(1));
        let by_age: Option<i64> = tx.query_row(
            "SELECT max(seq) FROM changes WHERE at_ms < ? AND seq < ?",
            params![min_at_ms, head as i64],
            |r| r.get(0),
        )?;
        let through = by_count.max(by_age.unwrap_or(0) as u64);
        let previous = meta_u64(&tx, "compacted_through")?;
        if through <= previous {
            return Ok(0);
        }
        let dropped = tx.execute("DELETE FROM changes WHERE seq <= ?", [through as i64])?;
        set_meta(&tx, "compacted_through", &through.to_string())?;
        tx.commit()?;
        Ok(dropped)
    }

    /// The highest seq dropped by compaction (0 if none).
    pub fn compacted_through(&self) -> Result<u64> {
        let conn = self.reader()?;
        get_meta(&conn, "compacted_through")?.map_or(Ok(0), |v| {
            v.parse()
                .map_err(|_| StoreError::Corrupt("compacted_through".into()))
        })
    }
}
