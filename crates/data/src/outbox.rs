//! The node's durable outbox of usage events (`local.db`), written by one thread
//! that commits every queued event in one transaction (group commit).
//!
//! An event stays in the outbox after the control plane acknowledges it, until
//! the replica has applied the change that carries its merged result. So after a
//! restart, replaying the outbox over the replica restores everything this node
//! accepted, and a code accepted just before a crash is still refused after it.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;
use twofold_core::feed::{NumberedEvent, UsageEvent};

const FILE: &str = "local.db";

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("outbox is closed")]
    Closed,
    #[error("outbox row {0} is not a valid event")]
    Corrupt(u64),
    #[error("outbox: {0}")]
    Other(String),
}

pub type Result<T, E = OutboxError> = std::result::Result<T, E>;

/// A stored event, with the seq of the change that merged it once acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub event: NumberedEvent,
    pub acked_seq: Option<u64>,
}

enum Command {
    Record(Vec<(u64, UsageEvent)>, oneshot::Sender<Result<()>>),
    Unsent(usize, u64, oneshot::Sender<Result<Vec<NumberedEvent>>>),
    Ack { through: u64, seq: u64 },
    Prune { applied: u64 },
}

/// Handle to the outbox thread. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Command>,
    /// Events stored and not yet acknowledged, kept by the outbox thread.
    unacked: Arc<AtomicU64>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command")
    }
}

/// What the outbox held at start.
#[derive(Debug)]
pub struct Opened {
    pub outbox: Outbox,
    /// This node's id, created with the outbox and kept for its life.
    pub node_id: String,
    /// Every stored event, oldest first, to replay over the replica.
    pub stored: Vec<Stored>,
    /// The id the next event gets.
    pub next_id: u64,
}

fn connect(dir: &Path) -> Result<Connection> {
    let conn = Connection::open(dir.join(FILE))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
         CREATE TABLE IF NOT EXISTS outbox (
             id INTEGER PRIMARY KEY,
             body TEXT NOT NULL,
             acked_seq INTEGER
         ) STRICT;",
    )?;
    Ok(conn)
}

impl Outbox {
    /// Open (or create) the outbox in `dir` and start its thread.
    pub fn open(dir: &Path) -> Result<Opened> {
        let conn = connect(dir)?;
        let node_id = match conn
            .query_row("SELECT value FROM meta WHERE key = 'node_id'", [], |r| {
                r.get::<_, String>(0)
            })
            .optional()?
        {
            Some(id) => id,
            None => {
                let mut bytes = [0u8; 10];
                getrandom::fill(&mut bytes).map_err(|e| OutboxError::Other(e.to_string()))?;
                let id = format!("node_{}", data_encoding::HEXLOWER.encode(&bytes));
                conn.execute("INSERT INTO meta (key, value) VALUES ('node_id', ?)", [&id])?;
                id
            }
        };
        let mut stored = Vec::new();
        {
            let mut stmt = conn.prepare("SELECT id, body, acked_seq FROM outbox ORDER BY id")?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let id: i64 = row.get(0)?;
                let body: String = row.get(1)?;
                let acked: Option<i64> = row.get(2)?;
                let event: UsageEvent =
                    serde_json::from_str(&body).map_err(|_| OutboxError::Corrupt(id as u64))?;
                stored.push(Stored {
                    event: NumberedEvent {
                        id: id as u64,
                        event,
                    },
                    acked_seq: acked.map(|s| s as u64),
                });
            }
        }
        let max_id: Option<i64> = conn.query_row("SELECT max(id) FROM outbox", [], |r| r.get(0))?;
        let seen: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'max_id'", [], |r| {
                r.get(0)
            })
            .optional()?;
        let next_id = max_id
            .map_or(0, |m| m as u64)
            .max(seen.and_then(|s| s.parse().ok()).unwrap_or(0))
            + 1;
        let unacked = Arc::new(AtomicU64::new(
            stored.iter().filter(|s| s.acked_seq.is_none()).count() as u64,
        ));
        let (tx, rx) = mpsc::channel();
        thread::Builder::new()
            .name("twofold-outbox".into())
            .spawn({
                let unacked = unacked.clone();
                move || run(conn, rx, &unacked)
            })
            .map_err(|e| OutboxError::Other(e.to_string()))?;
        Ok(Opened {
            outbox: Outbox { tx, unacked },
            node_id,
            stored,
            next_id,
        })
    }

    /// Queue events for the next group commit. Returns at once; the returned
    /// future resolves once they are committed, and may be dropped.
    pub fn submit(
        &self,
        events: Vec<(u64, UsageEvent)>,
    ) -> Result<impl Future<Output = Result<()>> + use<>> {
        let (reply, done) = oneshot::channel();
        self.tx
            .send(Command::Record(events, reply))
            .map_err(|_| OutboxError::Closed)?;
        Ok(async move { done.await.map_err(|_| OutboxError::Closed)? })
    }

    /// Up to `limit` events not yet acknowledged with ids below `below`, oldest
    /// first.
    pub async fn unsent(&self, limit: usize, below: u64) -> Result<Vec<NumberedEvent>> {
        let (reply, done) = oneshot::channel();
        self.tx
            .send(Command::Unsent(limit, below, reply))
            .map_err(|_| OutboxError::Closed)?;
        done.await.map_err(|_| OutboxError::Closed)?
    }

    /// How many stored events the control plane has not acknowledged yet. An
    /// event counts from its commit until its `ack` is processed.
    pub fn unacked(&self) -> u64 {
        self.unacked.load(Ordering::SeqCst)
    }

    /// The control plane merged events up to `through` in change `seq`.
    pub fn ack(&self, through: u64, seq: u64) {
        let _ = self.tx.send(Command::Ack { through, seq });
    }

    /// The replica has applied `applied`: acknowledged events merged at or before
    /// it are no longer needed.
    pub fn prune(&self, applied: u64) {
        let _ = self.tx.send(Command::Prune { applied });
    }
}

fn run(mut conn: Connection, rx: mpsc::Receiver<Command>, unacked: &AtomicU64) {
    while let Ok(first) = rx.recv() {
        // Gather every record command already queued into one transaction.
        let mut records = Vec::new();
        let mut others = Vec::new();
        for cmd in std::iter::once(first).chain(rx.try_iter()) {
            match cmd {
                Command::Record(events, reply) => records.push((events, reply)),
                other => others.push(other),
            }
        }
        if !records.is_empty() {
            let result = insert(&mut conn, records.iter().flat_map(|(events, _)| events));
            if result.is_ok() {
                let count: usize = records.iter().map(|(events, _)| events.len()).sum();
                unacked.fetch_add(count as u64, Ordering::SeqCst);
            }
            for (_, reply) in records {
                let _ = reply.send(match &result {
                    Ok(()) => Ok(()),
                    Err(e) => Err(OutboxError::Other(e.to_string())),
                });
            }
            if let Err(e) = result {
                tracing::error!(error = %e, "cannot write usage events to the outbox");
            }
        }
        for cmd in others {
            if let Err(e) = handle(&conn, cmd, unacked) {
                tracing::error!(error = %e, "outbox command failed");
            }
        }
    }
}

fn insert<'a>(
    conn: &mut Connection,
    events: impl Iterator<Item = &'a (u64, UsageEvent)>,
) -> Result<()> {
    let tx = conn.transaction()?;
    let mut max = 0;
    {
        let mut stmt = tx.prepare_cached("INSERT INTO outbox (id, body) VALUES (?, ?)")?;
        for (id, event) in events {
            let body = serde_json::to_string(event).map_err(|_| OutboxError::Corrupt(*id))?;
            stmt.execute(params![*id as i64, body])?;
            max = max.max(*id);
        }
    }
    // Remember the highest id ever used, so ids keep growing after pruning.
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('max_id', ?1)
         ON CONFLICT (key) DO UPDATE SET value = max(CAST(value AS INTEGER), CAST(?1 AS INTEGER))",
        [max.to_string()],
    )?;
    tx.commit()?;
    Ok(())
}

fn handle(conn: &Connection, cmd: Command, unacked: &AtomicU64) -> Result<()> {
    match cmd {
        Command::Record(..) => Ok(()),
        Command::Unsent(limit, below, reply) => {
            let result = unsent(conn, limit, below);
            let _ = reply.send(result);
            Ok(())
        }
        Command::Ack { through, seq } => {
            let acked = conn.execute(
                "UPDATE outbox SET acked_seq = ? WHERE id <= ? AND acked_seq IS NULL",
                params![seq as i64, through as i64],
            )?;
            let _ = unacked.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                Some(n.saturating_sub(acked as u64))
            });
            Ok(())
        }
        Command::Prune { applied } => {
            conn.execute("DELETE FROM outbox WHERE acked_seq <= ?", [applied as i64])?;
            Ok(())
        }
    }
}

fn unsent(conn: &Connection, limit: usize, below: u64) -> Result<Vec<NumberedEvent>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, body FROM outbox WHERE acked_seq IS NULL AND id < ? ORDER BY id LIMIT ?",
    )?;
    let below = i64::try_from(below).unwrap_or(i64::MAX);
    let mut rows = stmt.query(params![below, limit as i64])?;
    let mut events = Vec::new();
    while let Some(row) = rows.next()? {
        let id: i64 = row.get(0)?;
        let body: String = row.get(1)?;
        let event = serde_json::from_str(&body).map_err(|_| OutboxError::Corrupt(id as u64))?;
        events.push(NumberedEvent {
            id: id as u64,
            event,
        });
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(at: u64) -> UsageEvent {
        UsageEvent::Failure {
            tenant: "tn_a".into(),
            user: "alice".into(),
            at,
        }
    }

    #[tokio::test]
    async fn events_survive_a_restart_until_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let opened = Outbox::open(dir.path()).unwrap();
        assert_eq!(opened.next_id, 1);
        let node = opened.node_id.clone();
        opened
            .outbox
            .submit(vec![(1, failure(10)), (2, failure(11))])
            .unwrap()
            .await
            .unwrap();
        opened
            .outbox
            .submit(vec![(3, failure(12))])
            .unwrap()
            .await
            .unwrap();
        assert_eq!(opened.outbox.unacked(), 3, "counted once recorded");
        opened.outbox.ack(2, 50);
        assert_eq!(opened.outbox.unsent(10, u64::MAX).await.unwrap().len(), 1);
        assert_eq!(opened.outbox.unacked(), 1);
        drop(opened);

        let opened = Outbox::open(dir.path()).unwrap();
        assert_eq!(opened.node_id, node);
        assert_eq!(opened.next_id, 4);
        assert_eq!(opened.stored.len(), 3);
        assert_eq!(opened.stored[1].acked_seq, Some(50));
        assert_eq!(opened.stored[2].acked_seq, None);
        assert_eq!(opened.outbox.unacked(), 1);
        opened.outbox.prune(49);
        opened.outbox.prune(50);
        assert_eq!(opened.outbox.unsent(10, u64::MAX).await.unwrap()[0].id, 3);
        drop(opened);

        let opened = Outbox::open(dir.path()).unwrap();
        assert_eq!(opened.stored.len(), 1);
        assert_eq!(opened.next_id, 4, "ids never go back after pruning");
    }
}
