//! The node's durable outbox of usage events (`local.db`), written by one
//! writer that commits every queued event in one transaction (group commit):
//! its thread, or an accepted code's request that finds it idle.
//!
//! An event stays in the outbox after the control plane acknowledges it, until
//! the replica has applied the change that carries its merged result. So after a
//! restart, replaying the outbox over the replica restores everything this node
//! accepted, and a code accepted just before a crash is still refused after it.
//!
//! Two ways in: [`Outbox::submit`] resolves once committed (an accepted code
//! waits for it): the caller commits itself when the writer is idle, and
//! otherwise wakes the writer thread; [`Outbox::record`] only queues, and the
//! events join the next commit, at most [`LINGER`] later. Failures take the
//! second way, so a flood of wrong codes costs one wake-up and one transaction
//! per [`LINGER`], not one per attempt.
//!
//! Each commit stores its events as one row (`batches`), so a commit costs one
//! insert however many failed codes it carries; a row goes once every event in
//! it is covered by the replica.
//!
//! The writer keeps the committed events not yet acknowledged in memory (up to
//! [`MAX_QUEUED`]), so the reporter reads them without a query; acknowledgements
//! are rows of their own (`acks`), one per report rather than one update per
//! event. Acknowledgements and prunes wait, like failures, for the next commit
//! (at most [`LINGER`]), so under a load of failures one transaction per
//! report carries them all; after an accepted code's commit, which carries its
//! events only, they take one transaction of their own. Losing one in a crash
//! is losing a report's answer: the events are sent again, and the control
//! plane's answer says they were merged before.
//!
//! No commit runs SQLite's automatic checkpoint: an accepted code waits for
//! its commit, and a checkpoint (copying the WAL into the database and syncing
//! it) would make that code wait milliseconds, and on a request's worker hold
//! every other request too. A second thread, on a connection of its own,
//! checkpoints every [`CHECKPOINT_EVERY`] while commits go on. Past
//! [`WRITER_CHECKPOINT_PAGES`] the writer thread checkpoints after its commit,
//! by then a short copy, so that the WAL starts over; meanwhile submits go
//! through the thread.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;
use twofold_core::feed::{NumberedEvent, UsageEvent};

const FILE: &str = "local.db";

/// How long the writer, woken by the first recorded (not submitted) event of a
/// batch, or by an acknowledgement or a prune, waits for more to join its
/// commit. A crash forgets what is being gathered; a graceful shutdown commits
/// it ([`Outbox::flush`]).
pub const LINGER: Duration = Duration::from_millis(5);

/// How often the checkpoint thread copies the WAL into the database.
pub const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// WAL pages (4 KiB each) past which the writer checkpoints after all: the
/// WAL's size under a steady load, about 40 MB.
const WRITER_CHECKPOINT_PAGES: i64 = 10_000;

/// Unacknowledged events kept in memory for the reporter. Past it (a control
/// plane down for long under load) they are read back from the file instead,
/// until acknowledgements catch up.
pub const MAX_QUEUED: usize = 100_000;

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
    /// The first seq whose published user states count the event, if the
    /// control plane said (see `UsageAck`).
    pub counted_from: Option<u64>,
}

type Events = Vec<(u64, UsageEvent)>;

enum Command {
    /// Submitted events are waiting: commit them now.
    Commit,
    /// Recorded events are waiting.
    Flush,
    Unsent(usize, u64, oneshot::Sender<Result<Vec<NumberedEvent>>>),
    Ack {
        through: u64,
        seq: u64,
        counted_from: u64,
    },
    Prune {
        through: u64,
    },
}

impl Command {
    /// Whether a caller waits for this command: it ends the writer's linger.
    fn is_urgent(&self) -> bool {
        matches!(self, Command::Commit | Command::Unsent(..))
    }
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command")
    }
}

/// Events waiting for the next commit, and the submitters waiting for it.
#[derive(Debug, Default)]
struct Pending {
    events: Events,
    replies: Vec<oneshot::Sender<Result<()>>>,
}

/// What the handles and the writer thread share.
#[derive(Debug)]
struct Shared {
    /// Events recorded or submitted since the writer last took them.
    pending: Mutex<Pending>,
    /// Events recorded or submitted and not yet acknowledged.
    unacked: AtomicU64,
    /// Cleared when the writer thread ends.
    alive: AtomicBool,
}

impl Shared {
    fn count(&self, events: usize) {
        self.unacked.fetch_add(events as u64, Ordering::SeqCst);
    }

    /// No longer waiting for `events`.
    fn uncount(&self, events: u64) {
        let _ = self
            .unacked
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                Some(n.saturating_sub(events))
            });
    }
}

/// Handle to the outbox thread. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    /// The writer, held by whoever commits: its thread, or a submit that
    /// finds it idle.
    writer: Arc<Mutex<Writer>>,
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
    let mut conn = Connection::open(dir.join(FILE))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    // A batch holds the events of one commit, `[[id, event], ...]`. Ids are
    // handed out before events are recorded, so batches may interleave: every
    // id of a batch lies between its `first` and `last`, no more. Queries find
    // batches by `first` (the rowid) alone: an index on `last` would add a
    // page to every commit, which an accepted code waits for, and the table
    // only holds events not yet covered by the replica, so a range of `first`
    // from the start reads few batches it skips.
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
         CREATE TABLE IF NOT EXISTS batches (
             first INTEGER PRIMARY KEY,
             last INTEGER NOT NULL,
             body TEXT NOT NULL
         ) STRICT;
         DROP INDEX IF EXISTS batches_by_last;
         CREATE TABLE IF NOT EXISTS acks (
             through INTEGER PRIMARY KEY,
             seq INTEGER NOT NULL,
             counted_from INTEGER
         ) STRICT;",
    )?;
    migrate_acked_column(&mut conn)?;
    migrate_event_rows(&mut conn)?;
    if !exists(
        &conn,
        "SELECT count(*) > 0 FROM pragma_table_info('acks') WHERE name = 'counted_from'",
    )? {
        conn.execute_batch("ALTER TABLE acks ADD COLUMN counted_from INTEGER")?;
    }
    Ok(conn)
}

/// Whether `query`, a `SELECT count(*) > 0 ...`, finds anything.
fn exists(conn: &Connection, query: &str) -> Result<bool> {
    Ok(conn.query_row(query, [], |r| r.get(0))?)
}

/// Outboxes written before the `acks` table kept each event's acknowledgement
/// in a column of its own: turn those into `acks` rows (the highest id merged
/// in each change) and drop the column.
fn migrate_acked_column(conn: &mut Connection) -> Result<()> {
    if !exists(
        conn,
        "SELECT count(*) > 0 FROM pragma_table_info('outbox') WHERE name = 'acked_seq'",
    )? {
        return Ok(());
    }
    let tx = conn.transaction()?;
    tx.execute_batch(
        "INSERT OR IGNORE INTO acks (through, seq)
             SELECT max(id), acked_seq FROM outbox WHERE acked_seq IS NOT NULL GROUP BY acked_seq;
         ALTER TABLE outbox DROP COLUMN acked_seq;",
    )?;
    tx.commit()?;
    Ok(())
}

/// Outboxes written before `batches` kept one row per event (`outbox`): move
/// those into batches of [`MIGRATED_BATCH`] and drop the table.
fn migrate_event_rows(conn: &mut Connection) -> Result<()> {
    if !exists(
        conn,
        "SELECT count(*) > 0 FROM sqlite_schema WHERE type = 'table' AND name = 'outbox'",
    )? {
        return Ok(());
    }
    let tx = conn.transaction()?;
    let mut events = Vec::new();
    {
        let mut stmt = tx.prepare("SELECT id, body FROM outbox ORDER BY id")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let id = row.get::<_, i64>(0)? as u64;
            let body: String = row.get(1)?;
            let event: UsageEvent =
                serde_json::from_str(&body).map_err(|_| OutboxError::Corrupt(id))?;
            events.push((id, event));
        }
    }
    for chunk in events.chunks(MIGRATED_BATCH) {
        insert_batch(&tx, chunk)?;
    }
    tx.execute_batch("DROP TABLE outbox")?;
    tx.commit()?;
    Ok(())
}

/// Events per batch when rows of the per-event layout are moved.
const MIGRATED_BATCH: usize = 1000;

/// Store `events` as one batch; no row if there are none.
fn insert_batch(conn: &Connection, events: &[(u64, UsageEvent)]) -> Result<()> {
    let (Some(first), Some(last)) = (
        events.iter().map(|(id, _)| *id).min(),
        events.iter().map(|(id, _)| *id).max(),
    ) else {
        return Ok(());
    };
    let body = serde_json::to_string(events).map_err(|_| OutboxError::Corrupt(first))?;
    conn.prepare_cached("INSERT INTO batches (first, last, body) VALUES (?, ?, ?)")?
        .execute(params![first as i64, last as i64, body])?;
    Ok(())
}

/// The events of a stored batch; `first` names it in errors.
fn decode_batch(first: u64, body: &str) -> Result<Events> {
    serde_json::from_str(body).map_err(|_| OutboxError::Corrupt(first))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Outbox {
    /// Open (or create) the outbox in `dir` and start its thread.
    pub fn open(dir: &Path) -> Result<Opened> {
        Outbox::open_with(dir, MAX_QUEUED)
    }

    fn open_with(dir: &Path, max_queued: usize) -> Result<Opened> {
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
        let acks: Vec<(u64, u64, Option<u64>)> = {
            let mut stmt =
                conn.prepare("SELECT through, seq, counted_from FROM acks ORDER BY through")?;
            stmt.query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, Option<i64>>(2)?.map(|c| c as u64),
                ))
            })?
            .collect::<rusqlite::Result<_>>()?
        };
        // The highest id pruned: a batch stays until all of its events are, so
        // it may still hold some at or below this.
        let pruned: u64 = conn
            .query_row("SELECT value FROM meta WHERE key = 'max_id'", [], |r| {
                r.get::<_, String>(0)
            })
            .optional()?
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut events = Vec::new();
        {
            let mut stmt = conn.prepare("SELECT first, body FROM batches")?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let first = row.get::<_, i64>(0)? as u64;
                let body: String = row.get(1)?;
                events.extend(
                    decode_batch(first, &body)?
                        .into_iter()
                        .filter(|(id, _)| *id > pruned),
                );
            }
        }
        events.sort_unstable_by_key(|(id, _)| *id);
        // An event's acknowledgement is the first one whose `through` reaches it.
        let mut next_ack = acks.iter().peekable();
        let stored: Vec<Stored> = events
            .into_iter()
            .map(|(id, event)| {
                while next_ack.next_if(|(through, ..)| *through < id).is_some() {}
                Stored {
                    event: NumberedEvent { id, event },
                    acked_seq: next_ack.peek().map(|(_, seq, _)| *seq),
                    counted_from: next_ack.peek().and_then(|(.., counted)| *counted),
                }
            })
            .collect();
        let max_id: Option<i64> =
            conn.query_row("SELECT max(last) FROM batches", [], |r| r.get(0))?;
        let next_id = max_id.map_or(0, |m| m as u64).max(pruned) + 1;
        let unsent: BTreeMap<u64, UsageEvent> = stored
            .iter()
            .filter(|s| s.acked_seq.is_none())
            .map(|s| (s.event.id, s.event.event.clone()))
            .collect();
        let shared = Arc::new(Shared {
            pending: Mutex::default(),
            unacked: AtomicU64::new(unsent.len() as u64),
            alive: AtomicBool::new(true),
        });
        let complete = unsent.len() <= max_queued;
        let mut writer = Writer {
            conn,
            max_queued,
            committed: unsent.len() as u64,
            shared: shared.clone(),
            // Pruned events were acknowledged, though a prune may have
            // deleted every ack row that said so.
            acked_through: acks.last().map_or(0, |(through, ..)| *through).max(pruned),
            unwritten_prune: None,
            queue: if complete { unsent } else { BTreeMap::new() },
            complete,
            wal_pages: Arc::new(AtomicI64::new(0)),
        };
        // Replaces SQLite's automatic checkpoint: the writer checkpoints on its
        // thread only, never on a request's worker (`checkpoint_if_large`).
        let wal_pages = writer.wal_pages.clone();
        writer.conn.wal_hook(Some(
            move |_: &mut rusqlite::hooks::Wal, pages: std::ffi::c_int| {
                wal_pages.store(pages.into(), Ordering::Relaxed);
                Ok(())
            },
        ))?;
        let checkpoints = Connection::open(dir.join(FILE))?;
        // Ends the checkpoint thread when the writer thread ends.
        let (stop, stopped) = mpsc::channel::<()>();
        thread::Builder::new()
            .name("twofold-checkpoint".into())
            .spawn(move || checkpoint_until_stopped(&checkpoints, &stopped))
            .map_err(|e| OutboxError::Other(e.to_string()))?;
        let writer = Arc::new(Mutex::new(writer));
        let (tx, rx) = mpsc::channel();
        let thread_writer = writer.clone();
        let thread_alive = shared.clone();
        thread::Builder::new()
            .name("twofold-outbox".into())
            .spawn(move || {
                let _stop = stop;
                let _alive = Alive(&thread_alive.alive);
                run(&thread_writer, &rx)
            })
            .map_err(|e| OutboxError::Other(e.to_string()))?;
        Ok(Opened {
            outbox: Outbox { tx, shared, writer },
            node_id,
            stored,
            next_id,
        })
    }

    /// Commit events now. The returned future resolves once they are
    /// committed.
    ///
    /// They are committed when the future is first polled, after one yield to
    /// the runtime: the other requests the worker has ready submit theirs
    /// meanwhile, and the first to resume commits them all. If the writer is
    /// idle, that caller commits on its own worker (a write to the WAL, not
    /// synced), which saves waking the writer thread and the switches to it
    /// and back; if it is busy, the caller wakes the thread and waits for its
    /// next commit, so a worker never waits for another's write. A future
    /// dropped after its first poll still has its events committed; one never
    /// polled leaves them to the next commit.
    pub fn submit(&self, events: Events) -> Result<impl Future<Output = Result<()>> + use<>> {
        let (reply, done) = oneshot::channel();
        self.add_pending(events, Some(reply))?;
        let outbox = self.clone();
        Ok(async move {
            let commit = CommitOnDrop(&outbox);
            tokio::task::yield_now().await;
            drop(commit);
            done.await.map_err(|_| OutboxError::Closed)?
        })
    }

    /// Commit what is pending: here if the writer is idle, else by its thread.
    fn commit_pending(&self) {
        // The thread commits if the writer is busy; if its WAL is large (the
        // thread checkpoints after its commit, and that copy and its syncs
        // must not hold a request's worker); or if the lock is poisoned by a
        // panic, and then the send fails if the thread is gone.
        if let Ok(mut writer) = self.writer.try_lock()
            && !writer.wal_is_large()
        {
            writer.handle(Vec::new());
        } else if self.tx.send(Command::Commit).is_err() {
            let lost = std::mem::take(&mut *lock(&self.shared.pending));
            self.shared.uncount(lost.events.len() as u64);
            // Dropping the replies answers their submitters: closed.
        }
    }

    /// Commit everything queued so far and wait for it; for shutdown.
    pub async fn flush(&self) -> Result<()> {
        self.submit(Vec::new())?.await
    }

    /// Queue events for a commit about [`LINGER`] later, without waiting for it.
    pub fn record(&self, events: Events) -> Result<()> {
        // Only the first event of a batch wakes the writer.
        if self.add_pending(events, None)? {
            self.tx
                .send(Command::Flush)
                .map_err(|_| OutboxError::Closed)?;
        }
        Ok(())
    }

    /// Add events, and a submitter's reply, to the next commit. Returns
    /// whether nothing was pending before.
    fn add_pending(
        &self,
        events: Events,
        reply: Option<oneshot::Sender<Result<()>>>,
    ) -> Result<bool> {
        if !self.shared.alive.load(Ordering::SeqCst) {
            return Err(OutboxError::Closed);
        }
        let mut pending = lock(&self.shared.pending);
        // Counted under the lock, before the writer can take and commit them,
        // so their acknowledgement never comes before the count.
        self.shared.count(events.len());
        let first = pending.events.is_empty() && pending.replies.is_empty();
        pending.events.extend(events);
        pending.replies.extend(reply);
        Ok(first)
    }

    /// Up to `limit` events not yet acknowledged with ids below `below`, oldest
    /// first. Events recorded before the call are included.
    pub async fn unsent(&self, limit: usize, below: u64) -> Result<Vec<NumberedEvent>> {
        let (reply, done) = oneshot::channel();
        self.tx
            .send(Command::Unsent(limit, below, reply))
            .map_err(|_| OutboxError::Closed)?;
        done.await.map_err(|_| OutboxError::Closed)?
    }

    /// How many events the control plane has not acknowledged yet. An event
    /// counts from its `record` or `submit` until its `ack` is processed, so a
    /// node whose count is 0 has reported every attempt it answered.
    pub fn unacked(&self) -> u64 {
        self.shared.unacked.load(Ordering::SeqCst)
    }

    /// The control plane merged events up to `through`, publishing at or
    /// before `seq`; user states published from `counted_from` on count them.
    pub fn ack(&self, through: u64, seq: u64, counted_from: u64) {
        let _ = self.tx.send(Command::Ack {
            through,
            seq,
            counted_from,
        });
    }

    /// Events up to `through` are covered by the applied replica (the node
    /// decides this from its acks) and are no longer needed.
    pub fn prune(&self, through: u64) {
        let _ = self.tx.send(Command::Prune { through });
    }
}

/// Commits what is pending when dropped: a submitter's future, after its
/// yield or when dropped during it.
struct CommitOnDrop<'a>(&'a Outbox);

impl Drop for CommitOnDrop<'_> {
    fn drop(&mut self) {
        self.0.commit_pending();
    }
}

/// Clears `alive` when the writer thread ends, however it ends.
struct Alive<'a>(&'a AtomicBool);

impl Drop for Alive<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// Checkpoint the WAL every [`CHECKPOINT_EVERY`] until `stopped` disconnects.
///
/// Under a steady stream of commits a pass never reaches the end of the WAL
/// (commits go on while it copies), so the WAL is not started over and grows
/// until the writer's own checkpoint at [`WRITER_CHECKPOINT_PAGES`]. By then
/// this thread has copied all but the last [`CHECKPOINT_EVERY`] of it, so that
/// checkpoint is short, and the WAL then starts over.
fn checkpoint_until_stopped(conn: &Connection, stopped: &mpsc::Receiver<()>) {
    while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(CHECKPOINT_EVERY) {
        // PASSIVE never waits for the writer or readers.
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "outbox checkpoint failed; retrying");
        }
    }
}

fn run(writer: &Mutex<Writer>, rx: &mpsc::Receiver<Command>) {
    while let Ok(first) = rx.recv() {
        let mut commands = vec![first];
        if !commands[0].is_urgent() {
            // Let the attempts, acknowledgements and prunes of the next few
            // milliseconds join this commit; a command someone waits for ends
            // the wait.
            let until = Instant::now() + LINGER;
            while let Ok(cmd) = rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
                let urgent = cmd.is_urgent();
                commands.push(cmd);
                if urgent {
                    break;
                }
            }
        }
        commands.extend(rx.try_iter());
        let mut writer = lock(writer);
        writer.handle(commands);
        writer.checkpoint_if_large();
    }
}

/// The writer's state.
#[derive(Debug)]
struct Writer {
    conn: Connection,
    shared: Arc<Shared>,
    /// Committed events not yet acknowledged, while `complete`.
    queue: BTreeMap<u64, UsageEvent>,
    /// The most `queue` holds.
    max_queued: usize,
    /// Whether `queue` holds every committed event not yet acknowledged; if
    /// not, the reporter's events are read from the file.
    complete: bool,
    /// Committed events not yet acknowledged. Unlike the shared count, not
    /// those still waiting to be committed: once this is 0, `queue` (empty)
    /// is complete again, however many attempts are recorded meanwhile.
    committed: u64,
    /// The highest event id acknowledged.
    acked_through: u64,
    /// A prune whose write failed, tried again with the next one: the node
    /// sends a prune only when it covers more.
    unwritten_prune: Option<u64>,
    /// Pages in the WAL after the last commit.
    wal_pages: Arc<AtomicI64>,
}

impl Writer {
    /// Carry out `commands`: commit the events recorded or submitted, write
    /// the acknowledgements and prunes (with the events if nobody waits for
    /// them), then answer the reads.
    fn handle(&mut self, commands: Vec<Command>) {
        let Pending { events, replies } = std::mem::take(&mut *lock(&self.shared.pending));
        let mut acks = Vec::new();
        let mut prunes = self.unwritten_prune.take();
        let mut reads = Vec::new();
        for cmd in commands {
            match cmd {
                Command::Commit | Command::Flush => {}
                Command::Ack {
                    through,
                    seq,
                    counted_from,
                } => acks.push((through, seq, counted_from)),
                Command::Prune { through } => prunes = prunes.max(Some(through)),
                Command::Unsent(limit, below, reply) => reads.push((limit, below, reply)),
            }
        }
        // Acknowledgements only grow; one older than an earlier one (a retried
        // report's answer) changes nothing.
        let mut highest = self.acked_through;
        acks.retain(|&(through, ..)| {
            let newer = through > highest;
            highest = highest.max(through);
            newer
        });
        let count = events.len();
        // The events that the acknowledgements, and the prune, newly cover
        // (a node prunes only what was acknowledged, though that ack's own
        // write may have failed). Counted before anything is written: a prune
        // written with them deletes their batches, and the file's count is
        // then short, which would leave them counted as unacknowledged.
        let covered = acks
            .iter()
            .map(|&(through, ..)| through)
            .chain(prunes)
            .max()
            .filter(|&through| through > self.acked_through)
            .map(|through| (through, self.covered_by(through)));
        // Whether the acknowledgements and the prune are written.
        let mut bookkept = acks.is_empty() && prunes.is_none();
        // An accepted code waits for its commit, which carries events only;
        // the acknowledgements and the prune follow once it is answered.
        // Failures, which nobody waits for, share one transaction with them,
        // and if that fails (the fault may be theirs) are written on their own.
        let written = if events.is_empty() {
            Ok(())
        } else if replies.is_empty()
            && !bookkept
            && self
                .write(&events, &acks, prunes)
                .inspect_err(|e| tracing::error!(error = %e, "cannot write usage events with acknowledgements"))
                .is_ok()
        {
            bookkept = true;
            Ok(())
        } else {
            self.write(&events, &[], None)
        };
        match &written {
            Ok(()) => self.committed(events),
            Err(e) => {
                tracing::error!(error = %e, "cannot write usage events to the outbox");
                // Lost, so never acknowledged: no longer waiting for them.
                self.shared.uncount(count as u64);
            }
        }
        for reply in replies {
            let _ = reply.send(match &written {
                Ok(()) => Ok(()),
                Err(e) => Err(OutboxError::Other(e.to_string())),
            });
        }
        if !bookkept {
            match self.write(&[], &acks, prunes) {
                Ok(()) => bookkept = true,
                Err(e) => {
                    // A lost acknowledgement's events are reported again; the
                    // prune is tried again with the next write.
                    tracing::error!(error = %e, "cannot write usage acknowledgements");
                    self.unwritten_prune = prunes;
                }
            }
        }
        if bookkept {
            match covered {
                Some((through, Ok(newly))) => self.acked(through, newly),
                Some((_, Err(e))) => {
                    tracing::error!(error = %e, "cannot count acknowledged usage events");
                }
                None => {}
            }
        }
        for (limit, below, reply) in reads {
            let _ = reply.send(self.unsent(limit, below));
        }
    }

    fn wal_is_large(&self) -> bool {
        self.wal_pages.load(Ordering::Relaxed) >= WRITER_CHECKPOINT_PAGES
    }

    /// Checkpoint a WAL the checkpoint thread could not start over (see
    /// [`checkpoint_until_stopped`]): after this, the next commit does.
    fn checkpoint_if_large(&self) {
        if self.wal_is_large()
            && let Err(e) = self
                .conn
                .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
        {
            tracing::warn!(error = %e, "outbox checkpoint failed; retrying");
        }
    }

    /// Write events, acknowledgements and a prune in one transaction.
    fn write(
        &mut self,
        events: &[(u64, UsageEvent)],
        acks: &[(u64, u64, u64)],
        prune: Option<u64>,
    ) -> Result<()> {
        let tx = self.conn.transaction()?;
        insert_batch(&tx, events)?;
        for &(through, seq, counted_from) in acks {
            // A row may be there already: written, but its count failed.
            tx.prepare_cached(
                "INSERT INTO acks (through, seq, counted_from) VALUES (?, ?, ?)
                 ON CONFLICT (through) DO NOTHING",
            )?
            .execute(params![through as i64, seq as i64, counted_from as i64])?;
        }
        if let Some(through) = prune {
            // Remember the highest id pruned: ids keep growing after a restart
            // that finds the outbox empty, and a batch that outlives this prune
            // (some of its events are newer) has its older events skipped at
            // open. Kept here rather than with every batch: an accepted code
            // waits for its commit, and this is a page less.
            tx.prepare_cached(
                "INSERT INTO meta (key, value) VALUES ('max_id', ?1)
                 ON CONFLICT (key) DO UPDATE
                 SET value = max(CAST(value AS INTEGER), CAST(?1 AS INTEGER))",
            )?
            .execute([through.to_string()])?;
            tx.prepare_cached("DELETE FROM batches WHERE first <= ?1 AND last <= ?1")?
                .execute([through as i64])?;
            tx.prepare_cached("DELETE FROM acks WHERE through <= ?")?
                .execute([through as i64])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Keep committed events for the reporter.
    fn committed(&mut self, events: Events) {
        let count = events.len();
        self.committed += count as u64;
        if self.complete && self.queue.len() + count <= self.max_queued {
            self.queue.extend(events);
        } else if self.complete {
            self.queue.clear();
            self.complete = false;
        }
    }

    fn unsent(&self, limit: usize, below: u64) -> Result<Vec<NumberedEvent>> {
        if self.complete {
            return Ok(self
                .queue
                .range(..below)
                .take(limit)
                .map(|(id, event)| NumberedEvent {
                    id: *id,
                    event: event.clone(),
                })
                .collect());
        }
        let mut stmt = self.conn.prepare_cached(
            "SELECT first, body FROM batches WHERE last > ? AND first < ? ORDER BY first",
        )?;
        let below_sql = i64::try_from(below).unwrap_or(i64::MAX);
        let mut rows = stmt.query(params![self.acked_through as i64, below_sql])?;
        let mut events: Vec<NumberedEvent> = Vec::new();
        while let Some(row) = rows.next()? {
            let first = row.get::<_, i64>(0)? as u64;
            if events.len() >= limit {
                // Holding the `limit` lowest ids read so far, all below this
                // batch's first: no later batch has a lower one.
                events.sort_unstable_by_key(|e| e.id);
                events.truncate(limit);
                if events.last().is_some_and(|e| e.id < first) {
                    break;
                }
            }
            let body: String = row.get(1)?;
            events.extend(
                decode_batch(first, &body)?
                    .into_iter()
                    .filter(|(id, _)| *id > self.acked_through && *id < below)
                    .map(|(id, event)| NumberedEvent { id, event }),
            );
        }
        events.sort_unstable_by_key(|e| e.id);
        events.truncate(limit);
        Ok(events)
    }

    /// Committed events with ids in `(after, through]`, counted from the file.
    fn count_stored(&self, after: u64, through: u64) -> Result<u64> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT first, body FROM batches WHERE last > ? AND first <= ?")?;
        let mut rows = stmt.query(params![after as i64, through as i64])?;
        let mut count = 0;
        while let Some(row) = rows.next()? {
            let first = row.get::<_, i64>(0)? as u64;
            let body: String = row.get(1)?;
            count += decode_batch(first, &body)?
                .iter()
                .filter(|(id, _)| *id > after && *id <= through)
                .count() as u64;
        }
        Ok(count)
    }

    /// Committed events past the last acknowledgement, up to `through`.
    fn covered_by(&self, through: u64) -> Result<u64> {
        if self.complete {
            Ok(self.queue.range(..=through).count() as u64)
        } else {
            self.count_stored(self.acked_through, through)
        }
    }

    /// Events up to `through`, `newly` of them not acknowledged before, are
    /// acknowledged, as written: no longer waited for.
    fn acked(&mut self, through: u64, newly: u64) {
        if through <= self.acked_through {
            return;
        }
        if self.complete {
            self.queue = self.queue.split_off(&through.saturating_add(1));
        }
        self.acked_through = through;
        self.shared.uncount(newly);
        self.committed = self.committed.saturating_sub(newly);
        if !self.complete && self.committed == 0 {
            self.complete = true;
        }
    }
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
        opened.outbox.ack(2, 50, 49);
        assert_eq!(opened.outbox.unsent(10, u64::MAX).await.unwrap().len(), 1);
        assert_eq!(opened.outbox.unacked(), 1);
        drop(opened);

        let opened = Outbox::open(dir.path()).unwrap();
        assert_eq!(opened.node_id, node);
        assert_eq!(opened.next_id, 4);
        assert_eq!(opened.stored.len(), 3);
        assert_eq!(opened.stored[1].acked_seq, Some(50));
        assert_eq!(opened.stored[1].counted_from, Some(49));
        assert_eq!(opened.stored[2].acked_seq, None);
        assert_eq!(opened.outbox.unacked(), 1);
        // The node prunes once the change of seq 50 is applied: through id 2.
        opened.outbox.prune(2);
        assert_eq!(opened.outbox.unsent(10, u64::MAX).await.unwrap()[0].id, 3);
        drop(opened);

        let opened = Outbox::open(dir.path()).unwrap();
        assert_eq!(opened.stored.len(), 1);
        assert_eq!(opened.next_id, 4, "ids never go back after pruning");
        opened.outbox.ack(3, 51, 51);
        opened.outbox.prune(3);
        assert!(opened.outbox.unsent(10, u64::MAX).await.unwrap().is_empty());
        drop(opened);

        let opened = Outbox::open(dir.path()).unwrap();
        assert!(opened.stored.is_empty());
        assert_eq!(opened.next_id, 4, "nor once the outbox is empty");
    }

    #[tokio::test]
    async fn the_wal_is_copied_into_the_database_off_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let opened = Outbox::open(dir.path()).unwrap();
        let db_size = || std::fs::metadata(dir.path().join(FILE)).unwrap().len();
        let before = db_size();
        // Far below the writer's own checkpoint threshold.
        for id in 1..=200 {
            opened
                .outbox
                .submit(vec![(id, failure(id))])
                .unwrap()
                .await
                .unwrap();
        }
        let deadline = Instant::now() + CHECKPOINT_EVERY * 50;
        while db_size() <= before && Instant::now() < deadline {
            std::thread::sleep(CHECKPOINT_EVERY / 4);
        }
        assert!(
            db_size() > before,
            "the checkpoint thread copied the committed pages into {FILE}"
        );
    }

    /// Batches committed to the file, read on a connection of its own.
    fn batches_in_file(dir: &Path) -> i64 {
        Connection::open(dir.join(FILE))
            .unwrap()
            .query_row("SELECT count(*) FROM batches", [], |r| r.get(0))
            .unwrap()
    }

    #[tokio::test]
    async fn submits_ready_together_share_one_commit() {
        let dir = tempfile::tempdir().unwrap();
        let opened = Outbox::open(dir.path()).unwrap();
        opened.outbox.record(vec![(1, failure(10))]).unwrap();
        // Polled in turn by one task, as a worker runs the requests it has
        // ready: each submits, yields, and the first to resume commits all.
        let outbox = &opened.outbox;
        let submit = |id| async move { outbox.submit(vec![(id, failure(id))])?.await };
        let (a, b, c) = tokio::join!(submit(2), submit(3), submit(4));
        a.and(b).and(c).unwrap();
        assert_eq!(
            batches_in_file(dir.path()),
            1,
            "one commit, with the recorded event"
        );
        assert_eq!(
            numbered(&opened.outbox.unsent(10, u64::MAX).await.unwrap()),
            [1, 2, 3, 4]
        );
    }

    #[tokio::test]
    async fn a_submit_dropped_while_it_yields_is_still_committed() {
        use futures_util::FutureExt;
        let dir = tempfile::tempdir().unwrap();
        let opened = Outbox::open(dir.path()).unwrap();
        let mut committed = Box::pin(opened.outbox.submit(vec![(1, failure(10))]).unwrap());
        assert!((&mut committed).now_or_never().is_none(), "yielding");
        assert_eq!(batches_in_file(dir.path()), 0);
        drop(committed);
        assert_eq!(batches_in_file(dir.path()), 1);
        assert_eq!(opened.outbox.unacked(), 1, "and waits for its report");
    }

    #[tokio::test]
    async fn a_large_wal_is_left_to_the_writer_thread() {
        use futures_util::FutureExt;
        let dir = tempfile::tempdir().unwrap();
        let opened = Outbox::open(dir.path()).unwrap();
        let wal_pages = lock(&opened.outbox.writer).wal_pages.clone();
        // Resumed after its yield: done at once if committed by the caller.
        let committed_here = |id| {
            let mut committed = Box::pin(opened.outbox.submit(vec![(id, failure(id))]).unwrap());
            assert!((&mut committed).now_or_never().is_none(), "yielding");
            ((&mut committed).now_or_never().is_some(), committed)
        };
        wal_pages.store(WRITER_CHECKPOINT_PAGES, Ordering::Relaxed);
        let (here, committed) = committed_here(1);
        assert!(!here, "sent to the thread");
        committed.await.unwrap();
        // It answers, then checkpoints: wait for it to let the writer go.
        drop(lock(&opened.outbox.writer));
        assert!(
            wal_pages.load(Ordering::Relaxed) < WRITER_CHECKPOINT_PAGES,
            "each commit reports the WAL's pages"
        );
        let (here, _) = committed_here(2);
        assert!(here, "committed by the caller again");
        assert_eq!(batches_in_file(dir.path()), 2);
    }

    #[tokio::test]
    // Holding the writer across the wait is the point: it stands for a commit
    // in progress on the writer thread.
    #[allow(clippy::await_holding_lock)]
    async fn a_submit_to_a_busy_writer_waits_for_its_thread() {
        let dir = tempfile::tempdir().unwrap();
        let opened = Outbox::open(dir.path()).unwrap();
        let busy = lock(&opened.outbox.writer);
        let mut committed = Box::pin(opened.outbox.submit(vec![(1, failure(10))]).unwrap());
        assert!(
            tokio::time::timeout(LINGER, &mut committed).await.is_err(),
            "not committed while the writer is held"
        );
        assert_eq!(batches_in_file(dir.path()), 0);
        drop(busy);
        committed.await.unwrap();
        assert_eq!(batches_in_file(dir.path()), 1);
    }

    fn numbered(events: &[NumberedEvent]) -> Vec<u64> {
        events.iter().map(|e| e.id).collect()
    }

    /// Each stored event's id with the seq of its acknowledgement.
    fn acked(opened: &Opened) -> Vec<(u64, Option<u64>)> {
        opened
            .stored
            .iter()
            .map(|s| (s.event.id, s.acked_seq))
            .collect()
    }

    #[tokio::test]
    async fn recorded_events_are_committed_without_a_submit() {
        let dir = tempfile::tempdir().unwrap();
        let opened = Outbox::open(dir.path()).unwrap();
        opened.outbox.record(vec![(1, failure(10))]).unwrap();
        // Waiting for acknowledgement from the moment it is recorded, before
        // the linger commits it: a depth of 0 means every attempt is reported.
        assert_eq!(opened.outbox.unacked(), 1);
        opened.outbox.record(vec![(2, failure(11))]).unwrap();
        // Asking for unsent events takes everything recorded before the call.
        let unsent = opened.outbox.unsent(10, u64::MAX).await.unwrap();
        assert_eq!(numbered(&unsent), [1, 2]);
        assert_eq!(opened.outbox.unacked(), 2);
        // And the linger alone commits them: they are on disk after a restart.
        opened.outbox.record(vec![(3, failure(12))]).unwrap();
        std::thread::sleep(LINGER * 20);
        assert_eq!(opened.outbox.unacked(), 3);
        // A flush commits what is queued at once.
        opened.outbox.record(vec![(4, failure(13))]).unwrap();
        opened.outbox.flush().await.unwrap();
        assert_eq!(opened.outbox.unacked(), 4);
        drop(opened);
        let opened = Outbox::open(dir.path()).unwrap();
        assert_eq!(
            numbered(&opened.outbox.unsent(10, u64::MAX).await.unwrap()),
            [1, 2, 3, 4]
        );
        assert_eq!(opened.next_id, 5);
    }

    #[tokio::test]
    async fn past_the_memory_cap_unsent_events_are_read_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let opened = Outbox::open_with(dir.path(), 3).unwrap();
        let outbox = &opened.outbox;
        outbox
            .submit(vec![(1, failure(1)), (2, failure(2))])
            .unwrap()
            .await
            .unwrap();
        outbox
            .submit(vec![(3, failure(3)), (4, failure(4))])
            .unwrap()
            .await
            .unwrap();
        assert_eq!(
            numbered(&outbox.unsent(10, u64::MAX).await.unwrap()),
            [1, 2, 3, 4]
        );
        assert_eq!(numbered(&outbox.unsent(2, 4).await.unwrap()), [1, 2]);
        outbox.ack(3, 7, 7);
        assert_eq!(numbered(&outbox.unsent(10, u64::MAX).await.unwrap()), [4]);
        assert_eq!(outbox.unacked(), 1);
        // Once everything is acknowledged, memory holds the unsent events again.
        outbox.ack(4, 8, 8);
        outbox.submit(vec![(5, failure(5))]).unwrap().await.unwrap();
        assert_eq!(numbered(&outbox.unsent(10, u64::MAX).await.unwrap()), [5]);
        assert_eq!(outbox.unacked(), 1);
        outbox.prune(3); // the change of seq 7 is applied
        outbox.unsent(1, 0).await.unwrap(); // the writer is done with the prune
        drop(opened);
        let opened = Outbox::open(dir.path()).unwrap();
        assert_eq!(acked(&opened), [(4, Some(8)), (5, None)]);
    }

    #[tokio::test]
    async fn batches_that_interleave_give_events_in_id_order() {
        let dir = tempfile::tempdir().unwrap();
        // No memory queue: unsent events come from the file.
        let opened = Outbox::open_with(dir.path(), 0).unwrap();
        let outbox = &opened.outbox;
        // Ids are handed out before events are recorded: 1 and 4 commit after 2, 3
        // and 5.
        outbox
            .submit(vec![(2, failure(2)), (5, failure(5)), (3, failure(3))])
            .unwrap()
            .await
            .unwrap();
        outbox
            .submit(vec![(4, failure(4)), (1, failure(1))])
            .unwrap()
            .await
            .unwrap();
        outbox.submit(vec![(6, failure(6))]).unwrap().await.unwrap();
        assert_eq!(numbered(&outbox.unsent(2, u64::MAX).await.unwrap()), [1, 2]);
        assert_eq!(numbered(&outbox.unsent(4, 5).await.unwrap()), [1, 2, 3, 4]);
        outbox.ack(2, 9, 9);
        assert_eq!(
            numbered(&outbox.unsent(3, u64::MAX).await.unwrap()),
            [3, 4, 5]
        );
        assert_eq!(outbox.unacked(), 4, "counted from the file");
        drop(opened);
        let opened = Outbox::open(dir.path()).unwrap();
        assert_eq!(
            acked(&opened),
            [
                (1, Some(9)),
                (2, Some(9)),
                (3, None),
                (4, None),
                (5, None),
                (6, None)
            ]
        );
        assert_eq!(opened.next_id, 7);
    }

    #[tokio::test]
    async fn a_batch_pruned_in_part_keeps_only_its_newer_events() {
        let dir = tempfile::tempdir().unwrap();
        let opened = Outbox::open(dir.path()).unwrap();
        let events = vec![(1, failure(1)), (2, failure(2)), (3, failure(3))];
        opened.outbox.submit(events).unwrap().await.unwrap();
        opened.outbox.ack(2, 7, 7);
        opened.outbox.prune(2); // the change of seq 7 is applied
        opened.outbox.unsent(1, 0).await.unwrap(); // the writer is done with the prune
        drop(opened);
        let opened = Outbox::open(dir.path()).unwrap();
        assert_eq!(acked(&opened), [(3, None)]);
        assert_eq!(
            numbered(&opened.outbox.unsent(10, u64::MAX).await.unwrap()),
            [3]
        );
        opened.outbox.ack(3, 8, 8);
        opened.outbox.prune(3);
        opened.outbox.unsent(1, 0).await.unwrap();
        let count: i64 = Connection::open(dir.path().join(FILE))
            .unwrap()
            .query_row("SELECT count(*) FROM batches", [], |r| r.get(0))
            .unwrap();
        assert_eq!(count, 0, "the batch goes once all of it is pruned");
        drop(opened);
        let opened = Outbox::open(dir.path()).unwrap();
        assert!(opened.stored.is_empty());
        assert_eq!(opened.next_id, 4);
    }

    #[tokio::test]
    async fn acknowledgements_and_prunes_are_written_without_a_read() {
        let dir = tempfile::tempdir().unwrap();
        let opened = Outbox::open(dir.path()).unwrap();
        let outbox = &opened.outbox;
        let events = vec![(1, failure(1)), (2, failure(2)), (3, failure(3))];
        outbox.submit(events).unwrap().await.unwrap();
        outbox.ack(2, 9, 9);
        outbox.prune(1);
        // Nothing waits for them: the linger alone writes them.
        let deadline = Instant::now() + LINGER * 200;
        while outbox.unacked() != 1 && Instant::now() < deadline {
            std::thread::sleep(LINGER);
        }
        // Counted once written, with the prune in the same transaction.
        assert_eq!(outbox.unacked(), 1, "events 1 and 2 are acknowledged");
        drop(opened);
        let opened = Outbox::open(dir.path()).unwrap();
        // Event 1 is pruned; its batch stays for the others.
        assert_eq!(acked(&opened), [(2, Some(9)), (3, None)]);
        assert_eq!(opened.outbox.unacked(), 1);
    }

    #[tokio::test]
    async fn pruned_events_are_not_read_again_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let opened = Outbox::open(dir.path()).unwrap();
        let events = vec![(1, failure(1)), (2, failure(2)), (3, failure(3))];
        opened.outbox.submit(events).unwrap().await.unwrap();
        opened.outbox.ack(2, 9, 9);
        // The prune deletes the ack row; the batch stays for event 3.
        opened.outbox.prune(2);
        assert_eq!(
            numbered(&opened.outbox.unsent(10, u64::MAX).await.unwrap()),
            [3]
        );
        drop(opened);
        // No memory queue: unsent events come from the file.
        let opened = Outbox::open_with(dir.path(), 0).unwrap();
        assert_eq!(
            numbered(&opened.outbox.unsent(10, u64::MAX).await.unwrap()),
            [3]
        );
        assert_eq!(opened.outbox.unacked(), 1);
    }

    #[tokio::test]
    async fn an_acknowledgement_that_cannot_be_written_holds_no_commit_back() {
        let dir = tempfile::tempdir().unwrap();
        let opened = Outbox::open(dir.path()).unwrap();
        opened
            .outbox
            .submit(vec![(1, failure(1))])
            .unwrap()
            .await
            .unwrap();
        // Make every acknowledgement fail to write.
        Connection::open(dir.path().join(FILE))
            .unwrap()
            .execute_batch("DROP TABLE acks")
            .unwrap();
        opened.outbox.ack(1, 5, 5);
        opened
            .outbox
            .submit(vec![(2, failure(2))])
            .unwrap()
            .await
            .expect("the events are committed without the acknowledgement");
        // A failure nobody waits for shares a transaction with the
        // acknowledgement, and is written again on its own when it fails.
        opened.outbox.record(vec![(3, failure(3))]).unwrap();
        opened.outbox.ack(2, 6, 6);
        // The acknowledgements were lost, so events 1 and 2 are reported again.
        assert_eq!(
            numbered(&opened.outbox.unsent(10, u64::MAX).await.unwrap()),
            [1, 2, 3]
        );
        assert_eq!(opened.outbox.unacked(), 3);
        // Once the file can be written again, a prune is: the node prunes
        // only what it was told was merged, so the prune says so too, though
        // no acknowledgement could be written.
        Connection::open(dir.path().join(FILE))
            .unwrap()
            .execute_batch(
                "CREATE TABLE acks (through INTEGER PRIMARY KEY, seq INTEGER NOT NULL,
                                    counted_from INTEGER) STRICT",
            )
            .unwrap();
        opened.outbox.prune(2);
        assert_eq!(
            numbered(&opened.outbox.unsent(10, u64::MAX).await.unwrap()),
            [3]
        );
        assert_eq!(opened.outbox.unacked(), 1);
        drop(opened);
        let opened = Outbox::open(dir.path()).unwrap();
        assert_eq!(acked(&opened), [(3, None)]);
    }

    #[tokio::test]
    async fn events_pruned_with_their_acknowledgement_are_not_counted_as_waiting() {
        let dir = tempfile::tempdir().unwrap();
        // No memory queue: acknowledged events are counted from the file.
        let opened = Outbox::open_with(dir.path(), 0).unwrap();
        let outbox = &opened.outbox;
        let events = vec![(1, failure(1)), (2, failure(2))];
        outbox.submit(events).unwrap().await.unwrap();
        outbox.submit(vec![(3, failure(3))]).unwrap().await.unwrap();
        assert_eq!(outbox.unacked(), 3);
        // The replica applied the acknowledged change before the writer took
        // the acknowledgement: one write carries it and the prune (the read
        // ends the linger that gathers them).
        outbox.ack(3, 9, 9);
        outbox.prune(3);
        assert!(outbox.unsent(10, u64::MAX).await.unwrap().is_empty());
        assert_eq!(outbox.unacked(), 0, "every event is acknowledged");
        outbox.submit(vec![(4, failure(4))]).unwrap().await.unwrap();
        assert_eq!(numbered(&outbox.unsent(10, u64::MAX).await.unwrap()), [4]);
        assert_eq!(outbox.unacked(), 1);
    }

    #[tokio::test]
    async fn a_stale_acknowledgement_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        // No memory queue: unsent events come from the file, past acks count.
        let opened = Outbox::open_with(dir.path(), 0).unwrap();
        let outbox = &opened.outbox;
        let events = vec![(1, failure(1)), (2, failure(2)), (3, failure(3))];
        outbox.submit(events).unwrap().await.unwrap();
        outbox.ack(2, 9, 9);
        // A retried report's answer: nothing new merged.
        outbox.ack(1, 12, 12);
        assert_eq!(numbered(&outbox.unsent(10, u64::MAX).await.unwrap()), [3]);
        assert_eq!(outbox.unacked(), 1);
        drop(opened);
        let opened = Outbox::open(dir.path()).unwrap();
        assert_eq!(acked(&opened), [(1, Some(9)), (2, Some(9)), (3, None)]);
    }

    #[tokio::test]
    async fn an_outbox_of_the_earlier_layout_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(dir.path().join(FILE)).unwrap();
            conn.execute_batch(
                "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
                 CREATE TABLE outbox (
                     id INTEGER PRIMARY KEY,
                     body TEXT NOT NULL,
                     acked_seq INTEGER
                 ) STRICT;
                 INSERT INTO meta VALUES ('node_id', 'node_old');",
            )
            .unwrap();
            for (id, acked) in [(1, Some(5)), (2, Some(5)), (3, Some(6)), (4, None)] {
                let body = serde_json::to_string(&failure(id)).unwrap();
                conn.execute(
                    "INSERT INTO outbox (id, body, acked_seq) VALUES (?, ?, ?)",
                    params![id as i64, body, acked],
                )
                .unwrap();
            }
        }
        let opened = Outbox::open(dir.path()).unwrap();
        let old_table: i64 = Connection::open(dir.path().join(FILE))
            .unwrap()
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE name = 'outbox'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(old_table, 0, "the per-event rows moved into batches");
        assert_eq!(opened.node_id, "node_old");
        assert_eq!(
            acked(&opened),
            [(1, Some(5)), (2, Some(5)), (3, Some(6)), (4, None)]
        );
        assert_eq!(opened.outbox.unacked(), 1);
        assert_eq!(
            numbered(&opened.outbox.unsent(10, u64::MAX).await.unwrap()),
            [4]
        );
        opened.outbox.prune(2); // the change of seq 5 is applied
        opened.outbox.unsent(1, 0).await.unwrap(); // the writer is done with the prune
        drop(opened);
        let opened = Outbox::open(dir.path()).unwrap();
        assert_eq!(
            numbered(
                &opened
                    .stored
                    .iter()
                    .map(|s| s.event.clone())
                    .collect::<Vec<_>>()
            ),
            [3, 4]
        );
        assert_eq!(opened.next_id, 5);
    }

    #[tokio::test]
    async fn acks_written_before_counted_from_was_kept_are_read() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(dir.path().join(FILE)).unwrap();
            conn.execute_batch(
                "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
                 CREATE TABLE outbox (id INTEGER PRIMARY KEY, body TEXT NOT NULL) STRICT;
                 CREATE TABLE acks (through INTEGER PRIMARY KEY, seq INTEGER NOT NULL) STRICT;
                 INSERT INTO meta VALUES ('node_id', 'node_old');
                 INSERT INTO acks VALUES (1, 5);",
            )
            .unwrap();
            for id in 1..=2 {
                let body = serde_json::to_string(&failure(id)).unwrap();
                conn.execute(
                    "INSERT INTO outbox (id, body) VALUES (?, ?)",
                    params![id as i64, body],
                )
                .unwrap();
            }
        }
        let opened = Outbox::open(dir.path()).unwrap();
        assert_eq!(acked(&opened), [(1, Some(5)), (2, None)]);
        assert_eq!(opened.stored[0].counted_from, None);
        opened.outbox.ack(2, 7, 6);
        opened.outbox.unsent(1, 0).await.unwrap(); // the writer is done with the ack
        drop(opened);
        let opened = Outbox::open(dir.path()).unwrap();
        assert_eq!(acked(&opened), [(1, Some(5)), (2, Some(7))]);
        assert_eq!(opened.stored[1].counted_from, Some(6));
    }
}
