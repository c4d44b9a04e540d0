//! Reading the change log and the replicated state: changes after a seq,
//! consistent snapshots, the state digest and log compaction.

use twofold_core::feed::{Entity, SnapshotLine, StateDigest};

use super::entities::{self, FACTOR_COLUMNS};
use super::sql::{Conn, args};
use super::{Result, Store, meta_u64, read_head, set_meta};

/// Where a reader asking for the changes after a seq stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedPosition {
    /// Every change after it is still in the log.
    Resumable,
    /// Changes after it were compacted away, it names a seq beyond the head, or it
    /// belongs to another log: the reader must take a snapshot.
    Gone,
}

/// Receives the JSON of each snapshot line in order, without its newline;
/// returns `false` to stop early (the client went away).
pub type SnapshotSink<'a> = dyn FnMut(&[u8]) -> bool + 'a;

/// A change as the log stores it: its ops are the JSON array written at commit,
/// sent on as they are (see `ChangeLine::write_change`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredChange {
    pub seq: u64,
    pub at_ms: u64,
    pub ops: String,
}

pub(super) fn changes_after(
    conn: &mut Conn<'_, '_>,
    after: u64,
    limit: usize,
) -> Result<Vec<StoredChange>> {
    conn.query(
        "SELECT seq, at_ms, ops FROM changes WHERE seq > ? ORDER BY seq LIMIT ?",
        args![after as i64, limit as i64],
        |r| {
            Ok(StoredChange {
                seq: r.int(0)?,
                at_ms: r.int(1)?,
                ops: r.get(2)?,
            })
        },
    )
}

fn line_json(line: &SnapshotLine) -> Vec<u8> {
    // Serialising feed types into memory cannot fail.
    serde_json::to_vec(line).unwrap_or_default()
}

/// Call `each` with every replicated entity as of the connection's current read
/// transaction. Stops early, returning `false`, when `each` does. The order is
/// the tables' own: the digest does not depend on it, and reading in an index's
/// order would look up every row through the index.
fn for_each_entity(conn: &mut Conn<'_, '_>, each: &mut dyn FnMut(Entity) -> bool) -> Result<bool> {
    let complete = conn.for_each(
        "SELECT id, name, created_ms FROM tenants",
        args![],
        &mut |r| Ok(each(entities::tenant(&entities::tenant_row(r)?))),
    )? && conn.for_each(
        "SELECT id, tenant, name, hash, scopes, created_ms, revoked_ms FROM api_keys
         WHERE tenant IS NOT NULL AND revoked_ms IS NULL",
        args![],
        &mut |r| Ok(entities::api_key(&entities::key_row(r)?).is_none_or(&mut *each)),
    )? && conn.for_each(
        &format!("SELECT {FACTOR_COLUMNS} FROM totp_factors WHERE status = 'active'"),
        args![],
        &mut |r| Ok(each(entities::totp(&entities::factor_row(r)?))),
    )? && conn.for_each(
        "SELECT tenant, user_id, set_id, codes FROM backup_codes",
        args![],
        &mut |r| {
            let codes = entities::parse_codes(&r.get::<String>(3)?)?;
            let tenant: String = r.get(0)?;
            let user: String = r.get(1)?;
            let set_id: String = r.get(2)?;
            Ok(each(entities::backup_codes(&tenant, &user, &set_id, codes)))
        },
    )? && conn.for_each(
        "SELECT failures, locked, throttled_until, tenant, user_id FROM user_state",
        args![],
        &mut |r| {
            let state = entities::user_state_row(r)?;
            let tenant: String = r.get(3)?;
            let user: String = r.get(4)?;
            Ok(each(entities::user_state(&tenant, &user, &state)))
        },
    )?;
    Ok(complete)
}

impl Store {
    /// Can a reader of log `log_id` that has applied `after` resume from the log?
    pub fn feed_position(&self, log_id: Option<&str>, after: u64) -> Result<FeedPosition> {
        if log_id.is_some_and(|id| id != self.log_id) {
            return Ok(FeedPosition::Gone);
        }
        self.read_consistent(|conn| {
            let compacted = meta_u64(conn, "compacted_through")?;
            if after < compacted || after > read_head(conn)? {
                return Ok(FeedPosition::Gone);
            }
            Ok(FeedPosition::Resumable)
        })
    }

    /// Stream a consistent snapshot through `sink`: a `Begin` line with the seq it
    /// is as of, every entity, and an `End` line with their count and digest. Rows
    /// are read one at a time, so memory does not grow with the state.
    pub fn snapshot(&self, sink: &mut SnapshotSink<'_>) -> Result<()> {
        // One read transaction: every SELECT below sees the same committed state,
        // and the head read first is the seq that state is as of.
        self.read_consistent(|tx| {
            let seq = read_head(tx)?;
            if !sink(&line_json(&SnapshotLine::Begin { seq })) {
                return Ok(());
            }
            let mut digest = StateDigest::default();
            let mut line = Vec::new();
            let complete = for_each_entity(tx, &mut |entity| {
                // Serialised once, for the digest and the line.
                let bytes = entity.canonical_bytes();
                digest.add_canonical(&bytes);
                line.clear();
                SnapshotLine::write_entity_line(&bytes, &mut line);
                sink(&line)
            })?;
            if complete {
                sink(&line_json(&SnapshotLine::End {
                    seq,
                    count: digest.count(),
                    digest: digest.to_hex(),
                }));
            }
            Ok(())
        })
    }

    /// The digest of the replicated state, with the seq it is as of.
    pub fn digest(&self) -> Result<(u64, StateDigest)> {
        self.read_consistent(|tx| {
            let seq = read_head(tx)?;
            let mut digest = StateDigest::default();
            for_each_entity(tx, &mut |entity| {
                digest.add(&entity);
                true
            })?;
            Ok((seq, digest))
        })
    }

    /// Drop changes beyond the retention limits: more than `keep` behind the head,
    /// or older than `min_at_ms`. The newest change is always kept. Returns how
    /// many were dropped.
    pub fn compact(&self, keep: u64, min_at_ms: i64) -> Result<usize> {
        self.transact(|tx| {
            let head = read_head(tx)?;
            // `max(1)`: even `keep = 0` keeps the newest change, as documented.
            let by_count = head.saturating_sub(keep.max(1));
            let by_age: Option<u64> = tx.query_one(
                "SELECT max(seq) FROM changes WHERE at_ms < ? AND seq < ?",
                args![min_at_ms, head as i64],
                |r| r.opt_int(0),
            )?;
            let through = by_count.max(by_age.unwrap_or(0));
            let previous = meta_u64(tx, "compacted_through")?;
            if through <= previous {
                return Ok(0);
            }
            let dropped =
                tx.execute("DELETE FROM changes WHERE seq <= ?", args![through as i64])?;
            set_meta(tx, "compacted_through", &through.to_string())?;
            Ok(dropped as usize)
        })
    }

    /// The highest seq dropped by compaction (0 if none).
    pub fn compacted_through(&self) -> Result<u64> {
        self.read(|conn| meta_u64(conn, "compacted_through"))
    }
}
