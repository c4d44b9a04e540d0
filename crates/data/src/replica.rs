//! The durable replica: every entity the feed published, with the seq applied
//! and the id of the log it came from, in `replica.db` (SQLite).
//!
//! Each batch of changes is one transaction together with its seq, so a kill -9
//! at any moment leaves a replica at some batch boundary. A bootstrap loads the
//! snapshot into `replica.db.next` and renames it over `replica.db` only once it
//! is complete and checked, so a torn bootstrap leaves the old replica in place.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};
use twofold_core::feed::{Change, Entity, EntityKey, Op, StateDigest};

use crate::index::{Index, RecordError, prepare_put};

const FILE: &str = "replica.db";
const STAGING: &str = "replica.db.next";

/// Bumped whenever the stored layout changes; a replica of another format is
/// discarded and bootstrapped again.
const FORMAT: &str = "2";

/// Entities per batch handed from the reading thread to the applying one.
const LOAD_BATCH: usize = 4096;
/// Batches in flight between them: enough to keep both busy, few enough that
/// the queue stays a few megabytes.
const LOAD_QUEUE: usize = 4;

/// Threads that load a replica into the index (see [`Replica::load_into`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LoadThreads {
    One,
    Two,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
CREATE TABLE IF NOT EXISTS entities (key TEXT NOT NULL, body BLOB NOT NULL) STRICT;
";

/// Built after a bulk load rather than during it: sorting once is much faster
/// than inserting a million random keys into a B-tree.
const KEY_INDEX: &str = "CREATE UNIQUE INDEX IF NOT EXISTS entities_by_key ON entities (key);";

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("replica database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("replica file: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("stored entity is not valid: {0}")]
    Corrupt(String),
}

pub type Result<T, E = ReplicaError> = std::result::Result<T, E>;

/// Where the replica stands in the feed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Position {
    /// The log the replica came from; `None` for an empty replica.
    pub log_id: Option<String>,
    /// The last seq applied.
    pub applied: u64,
}

/// The stored form of a key: its parts joined by U+001F, a control character no
/// id or user id can contain.
pub fn key_text(key: &EntityKey) -> String {
    match key {
        EntityKey::Tenant { id } => joined("tenant", &[id]),
        EntityKey::ApiKey { id } => joined("api_key", &[id]),
        EntityKey::Totp { tenant, user, id } => joined("totp", &[tenant, user, id]),
        EntityKey::BackupCodes { tenant, user } => joined("backup_codes", &[tenant, user]),
        EntityKey::UserState { tenant, user } => joined("user_state", &[tenant, user]),
    }
}

/// `key_text(&entity.key())`, without copying the key's parts first: a
/// bootstrap makes one per entity.
pub fn entity_key_text(entity: &Entity) -> String {
    match entity {
        Entity::Tenant(t) => joined("tenant", &[&t.id]),
        Entity::ApiKey(k) => joined("api_key", &[&k.id]),
        Entity::Totp(f) => joined("totp", &[&f.tenant, &f.user, &f.id]),
        Entity::BackupCodes(b) => joined("backup_codes", &[&b.tenant, &b.user]),
        Entity::UserState(u) => joined("user_state", &[&u.tenant, &u.user]),
    }
}

fn joined(kind: &str, parts: &[&str]) -> String {
    const SEP: char = '\u{1f}';
    let len = kind.len()
        + parts
            .iter()
            .map(|p| p.len() + SEP.len_utf8())
            .sum::<usize>();
    let mut text = String::with_capacity(len);
    text.push_str(kind);
    for part in parts {
        text.push(SEP);
        text.push_str(part);
    }
    text
}

/// A row of the replica: the key's stored form and the entity's canonical bytes.
pub type Row = (String, Vec<u8>);

fn open_conn(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // NORMAL in WAL mode survives a process crash with every committed batch; a
    // power cut may lose the last few, which the feed sends again.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(SCHEMA)?;
    conn.execute_batch(KEY_INDEX)?;
    Ok(conn)
}

fn read_position(conn: &Connection) -> Result<Position> {
    let get = |key: &str| -> Result<Option<String>> {
        Ok(conn
            .query_row("SELECT value FROM meta WHERE key = ?", [key], |r| r.get(0))
            .optional()?)
    };
    let applied = match get("applied")? {
        Some(v) => v
            .parse()
            .map_err(|_| ReplicaError::Corrupt("applied seq".into()))?,
        None => 0,
    };
    Ok(Position {
        log_id: get("log_id")?,
        applied,
    })
}

fn write_meta(conn: &Connection, key: &str, value: &str) -> Result<()> {
    // Cached: every change applied writes its seq here.
    conn.prepare_cached(
        "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )?
    .execute([key, value])?;
    Ok(())
}

/// The replica file of a node.
#[derive(Debug)]
pub struct Replica {
    dir: PathBuf,
    conn: Connection,
    position: Position,
}

impl Replica {
    /// Open the replica in `dir`, creating an empty one if there is none. A
    /// staging file left by an interrupted bootstrap is removed.
    pub fn open(dir: &Path) -> Result<Replica> {
        remove_if_exists(&dir.join(STAGING))?;
        let live = dir.join(FILE);
        let mut conn = open_conn(&live)?;
        let mut position = read_position(&conn)?;
        let format: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'format'", [], |r| {
                r.get(0)
            })
            .optional()?;
        if position.log_id.is_some() && format.as_deref() != Some(FORMAT) {
            tracing::warn!(found = ?format, "replica written in another format; discarding it to bootstrap again");
            conn.close().map_err(|(_, e)| e)?;
            for suffix in ["", "-wal", "-shm"] {
                remove_if_exists(&dir.join(format!("{FILE}{suffix}")))?;
            }
            conn = open_conn(&live)?;
            position = Position::default();
        }
        Ok(Replica {
            dir: dir.to_owned(),
            conn,
            position,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn position(&self) -> &Position {
        &self.position
    }

    /// Has this replica ever been synced?
    pub fn is_empty(&self) -> bool {
        self.position.log_id.is_none()
    }

    /// Load every stored entity into `index`. Returns how many were loaded.
    ///
    /// With a second core, reading and parsing the rows runs on this thread
    /// while another checks them and applies them to `index`: a restart then
    /// takes about as long as the parsing alone (BENCHMARKS.md). With one core,
    /// where a second thread only adds hand-overs, both run here.
    pub fn load_into(&self, index: &Index) -> Result<u64> {
        let threads = match std::thread::available_parallelism().map_or(1, usize::from) {
            1 => LoadThreads::One,
            _ => LoadThreads::Two,
        };
        self.load_with(index, threads)
    }

    fn load_with(&self, index: &Index, threads: LoadThreads) -> Result<u64> {
        let applied = self.position.applied;
        let apply = |batch: &[Entity]| -> Result<()> {
            let prepared = batch
                .iter()
                .map(|entity| Ok(prepare_put(entity)?.at(applied)))
                .collect::<Result<Vec<_>>>()?;
            index.apply(prepared);
            Ok(())
        };
        if threads == LoadThreads::One {
            let mut failed = None;
            let count = self.read_entities(|batch| {
                failed = apply(&batch).err();
                failed.is_none()
            })?;
            return failed.map_or(Ok(count), Err);
        }
        let (batches, received) = std::sync::mpsc::sync_channel::<Vec<Entity>>(LOAD_QUEUE);
        // Applied batches go back to be dropped where they were allocated: the
        // allocator frees another thread's memory much more slowly.
        let (done, returned) = std::sync::mpsc::channel::<Vec<Entity>>();
        std::thread::scope(|scope| {
            let applier = std::thread::Builder::new()
                .name("twofold-load".into())
                .spawn_scoped(scope, move || -> Result<()> {
                    for batch in received {
                        apply(&batch)?;
                        let _ = done.send(batch);
                    }
                    Ok(())
                })?;
            // A failed check ends the applier, which closes the channel, and the
            // reading stops at its next send. A failed read closes the channel
            // too: the applier finishes the batches already queued, then stops.
            let read = self.read_entities(|batch| {
                returned.try_iter().for_each(drop);
                batches.send(batch).is_ok()
            });
            drop(batches);
            let applied = applier
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            // The applier's error first: its batch came before the row the
            // reading may have failed on, as on one thread.
            applied?;
            read
        })
    }

    /// Parse every stored entity, handing them to `take` in batches until it
    /// returns false. Returns how many were read.
    fn read_entities(&self, mut take: impl FnMut(Vec<Entity>) -> bool) -> Result<u64> {
        let mut stmt = self.conn.prepare("SELECT body FROM entities")?;
        let mut rows = stmt.query([])?;
        let mut count = 0;
        let mut batch = Vec::with_capacity(LOAD_BATCH);
        while let Some(row) = rows.next()? {
            let body = row
                .get_ref(0)?
                .as_blob()
                .map_err(|e| ReplicaError::Corrupt(e.to_string()))?;
            batch.push(
                serde_json::from_slice(body).map_err(|e| ReplicaError::Corrupt(e.to_string()))?,
            );
            count += 1;
            if batch.len() == LOAD_BATCH
                && !take(std::mem::replace(
                    &mut batch,
                    Vec::with_capacity(LOAD_BATCH),
                ))
            {
                return Ok(count);
            }
        }
        take(batch);
        Ok(count)
    }

    /// Apply a batch of consecutive changes in one transaction with the new seq.
    pub fn apply(&mut self, changes: &[Change]) -> Result<()> {
        let Some(last) = changes.last() else {
            return Ok(());
        };
        let tx = self.conn.transaction()?;
        {
            // An update in place where the key exists: one lookup in the key
            // index, where REPLACE deletes the row and inserts it again.
            let mut put = tx.prepare_cached(
                "INSERT INTO entities (key, body) VALUES (?, ?)
                 ON CONFLICT (key) DO UPDATE SET body = excluded.body",
            )?;
            let mut delete = tx.prepare_cached("DELETE FROM entities WHERE key = ?")?;
            for op in changes.iter().flat_map(|c| &c.ops) {
                match op {
                    Op::Put { entity } => {
                        put.execute(params![entity_key_text(entity), entity.canonical_bytes()])?;
                    }
                    Op::Delete { key } => {
                        delete.execute([key_text(key)])?;
                    }
                }
            }
        }
        write_meta(&tx, "applied", &last.seq.to_string())?;
        tx.commit()?;
        self.position.applied = last.seq;
        Ok(())
    }

    /// Replace this replica with a completed staging file.
    pub fn swap_in(self, staged: Staged) -> Result<Replica> {
        let Replica { dir, conn, .. } = self;
        // Closing the last connection checkpoints the WAL and removes it, so no
        // old WAL can be replayed into the new file.
        conn.close().map_err(|(_, e)| e)?;
        let live = dir.join(FILE);
        remove_if_exists(&dir.join(format!("{FILE}-wal")))?;
        remove_if_exists(&dir.join(format!("{FILE}-shm")))?;
        std::fs::rename(&staged.path, &live)?;
        sync_dir(&dir)?;
        Replica::open(&dir)
    }
}

/// The digest of the replica in `dir`, read through its own connection in one
/// read transaction, so the seq and the entities agree.
pub fn digest_of(dir: &Path) -> Result<(u64, StateDigest)> {
    let conn =
        Connection::open_with_flags(dir.join(FILE), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    digest_in(&conn)
}

fn digest_in(conn: &Connection) -> Result<(u64, StateDigest)> {
    let tx = conn.unchecked_transaction()?;
    let applied = read_position(&tx)?.applied;
    let mut digest = StateDigest::default();
    let mut stmt = tx.prepare("SELECT body FROM entities")?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let body: Vec<u8> = row.get(0)?;
        digest.add_canonical(&body);
    }
    Ok((applied, digest))
}

/// A replica being loaded from a snapshot.
#[derive(Debug)]
pub struct Staging {
    path: PathBuf,
    conn: Connection,
}

/// A staging file that is complete and durable, ready to swap in.
#[derive(Debug)]
pub struct Staged {
    path: PathBuf,
}

impl Staging {
    pub fn create(dir: &Path) -> Result<Staging> {
        let path = dir.join(STAGING);
        remove_if_exists(&path)?;
        let conn = Connection::open(&path)?;
        // Nothing here needs to survive a crash until `finish`: an interrupted
        // bootstrap starts over. So no journal and no syncs while loading.
        conn.pragma_update(None, "journal_mode", "OFF")?;
        conn.pragma_update(None, "synchronous", "OFF")?;
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch("BEGIN")?;
        Ok(Staging { path, conn })
    }

    pub fn insert(&mut self, rows: &[Row]) -> Result<()> {
        let mut put = self
            .conn
            .prepare_cached("INSERT INTO entities (key, body) VALUES (?, ?)")?;
        for (key, body) in rows {
            put.execute(params![key, body])?;
        }
        Ok(())
    }

    /// Record the position, commit, and make the file durable.
    pub fn finish(self, position: &Position) -> Result<Staged> {
        let Staging { path, conn } = self;
        // A snapshot holds each key once; a duplicate fails here and the
        // bootstrap starts over.
        conn.execute_batch(KEY_INDEX)?;
        write_meta(&conn, "format", FORMAT)?;
        write_meta(&conn, "applied", &position.applied.to_string())?;
        if let Some(log_id) = &position.log_id {
            write_meta(&conn, "log_id", log_id)?;
        }
        conn.execute_batch("COMMIT")?;
        conn.close().map_err(|(_, e)| e)?;
        std::fs::File::open(&path)?.sync_all()?;
        Ok(Staged { path })
    }
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use twofold_core::feed::{
        ApiKeyRecord, BackupCodesRecord, TenantRecord, TotpRecord, UserStateRecord,
    };

    use super::*;

    fn tenant(id: &str) -> Entity {
        Entity::Tenant(TenantRecord {
            id: id.into(),
            name: "acme".into(),
        })
    }

    fn row(entity: &Entity) -> Row {
        (key_text(&entity.key()), entity.canonical_bytes())
    }

    fn change(seq: u64, ops: Vec<Op>) -> Change {
        Change { seq, at_ms: 0, ops }
    }

    fn totp(n: usize) -> Entity {
        Entity::Totp(TotpRecord {
            id: format!("fa_{n}"),
            tenant: "tn_a".into(),
            user: format!("u{n}"),
            algorithm: "SHA1".into(),
            digits: 6,
            period: 30,
            sealed: crate::index::tests::sealed(),
            last_step: None,
        })
    }

    #[test]
    fn an_entity_key_is_stored_as_its_key_text() {
        let (tenant_id, user) = ("tn_a".to_owned(), "u1".to_owned());
        let entities = [
            tenant("tn_a"),
            Entity::ApiKey(ApiKeyRecord {
                id: "ak_1".into(),
                tenant: tenant_id.clone(),
                hash: vec![1; 32],
                scopes: vec!["verify".into()],
            }),
            totp(1),
            Entity::BackupCodes(BackupCodesRecord {
                tenant: tenant_id.clone(),
                user: user.clone(),
                set_id: "bs_1".into(),
                codes: Vec::new(),
            }),
            Entity::UserState(UserStateRecord {
                tenant: tenant_id,
                user,
                failures: 2,
                locked: false,
                throttled_until: None,
            }),
        ];
        for entity in &entities {
            assert_eq!(entity_key_text(entity), key_text(&entity.key()));
        }
        // Replicas on disk hold keys in this form.
        assert_eq!(
            entity_key_text(&totp(1)),
            "totp\u{1f}tn_a\u{1f}u1\u{1f}fa_1"
        );
        assert_eq!(entity_key_text(&tenant("tn_a")), "tenant\u{1f}tn_a");
    }

    /// A replica holding `rows`, swapped in from a staging file at seq 7.
    fn replica_of(dir: &Path, rows: &[Row]) -> Replica {
        let replica = Replica::open(dir).unwrap();
        let mut staging = Staging::create(dir).unwrap();
        staging.insert(rows).unwrap();
        let staged = staging
            .finish(&Position {
                log_id: Some("log".into()),
                applied: 7,
            })
            .unwrap();
        replica.swap_in(staged).unwrap()
    }

    const BOTH: [LoadThreads; 2] = [LoadThreads::One, LoadThreads::Two];

    #[test]
    fn a_load_applies_every_batch_on_one_thread_or_two() {
        let dir = tempfile::tempdir().unwrap();
        // More batches than the queue holds, so the reading waits on it.
        let count = LOAD_BATCH * (LOAD_QUEUE + 3) + 5;
        let rows: Vec<Row> = (0..count).map(|n| row(&totp(n))).collect();
        let replica = replica_of(dir.path(), &rows);
        for threads in BOTH {
            let index = Index::default();
            assert_eq!(replica.load_with(&index, threads).unwrap(), count as u64);
            assert_eq!(index.factor_count(), count, "{threads:?}");
            assert_eq!(index.user_count(), count);
            let last = format!("u{}", count - 1);
            assert_eq!(
                index.with_user("tn_a", &last, |u| u.factors().count()),
                Some(1)
            );
        }
    }

    #[test]
    fn a_bad_row_fails_the_load_on_one_thread_or_two() {
        let at = LOAD_BATCH + 1;
        let mut bad_digits = totp(at);
        if let Entity::Totp(t) = &mut bad_digits {
            t.digits = 99;
        }
        // Not an entity at all: the reading fails.
        let not_json = (key_text(&totp(at).key()), b"{not json".to_vec());
        // An entity the index refuses: the applying fails, early enough that
        // the reading is still filling the queue and must stop.
        let refused = row(&bad_digits);
        for (bad, corrupt) in [(not_json, true), (refused, false)] {
            let dir = tempfile::tempdir().unwrap();
            let mut rows: Vec<Row> = (0..LOAD_BATCH * (LOAD_QUEUE + 3))
                .map(|n| row(&totp(n)))
                .collect();
            rows[at] = bad;
            let replica = replica_of(dir.path(), &rows);
            for threads in BOTH {
                let result = replica.load_with(&Index::default(), threads);
                if corrupt {
                    assert!(
                        matches!(result, Err(ReplicaError::Corrupt(_))),
                        "{threads:?}: {result:?}"
                    );
                } else {
                    assert!(
                        matches!(result, Err(ReplicaError::Record(_))),
                        "{threads:?}: {result:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn batches_persist_with_their_seq() {
        let dir = tempfile::tempdir().unwrap();
        let mut replica = Replica::open(dir.path()).unwrap();
        assert!(replica.is_empty());
        replica
            .apply(&[
                change(
                    1,
                    vec![Op::Put {
                        entity: tenant("tn_a"),
                    }],
                ),
                change(
                    2,
                    vec![Op::Put {
                        entity: tenant("tn_b"),
                    }],
                ),
            ])
            .unwrap();
        replica
            .apply(&[change(
                3,
                vec![Op::Delete {
                    key: EntityKey::Tenant { id: "tn_a".into() },
                }],
            )])
            .unwrap();
        drop(replica);
        let replica = Replica::open(dir.path()).unwrap();
        assert_eq!(replica.position().applied, 3);
        let mut expected = StateDigest::default();
        expected.add(&tenant("tn_b"));
        assert_eq!(digest_of(dir.path()).unwrap(), (3, expected));
    }

    #[test]
    fn a_finished_staging_file_replaces_the_replica() {
        let dir = tempfile::tempdir().unwrap();
        let mut replica = Replica::open(dir.path()).unwrap();
        replica
            .apply(&[change(
                1,
                vec![Op::Put {
                    entity: tenant("tn_old"),
                }],
            )])
            .unwrap();
        let mut staging = Staging::create(dir.path()).unwrap();
        staging.insert(&[row(&tenant("tn_new"))]).unwrap();
        let staged = staging
            .finish(&Position {
                log_id: Some("log2".into()),
                applied: 40,
            })
            .unwrap();
        let replica = replica.swap_in(staged).unwrap();
        assert_eq!(
            replica.position(),
            &Position {
                log_id: Some("log2".into()),
                applied: 40
            }
        );
        let mut expected = StateDigest::default();
        expected.add(&tenant("tn_new"));
        assert_eq!(digest_of(dir.path()).unwrap().1, expected);
        assert!(!dir.path().join(STAGING).exists());
    }

    #[test]
    fn an_unfinished_staging_file_is_discarded_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut replica = Replica::open(dir.path()).unwrap();
        replica
            .apply(&[change(
                1,
                vec![Op::Put {
                    entity: tenant("tn_a"),
                }],
            )])
            .unwrap();
        let mut staging = Staging::create(dir.path()).unwrap();
        staging.insert(&[row(&tenant("tn_b"))]).unwrap();
        drop(staging);
        drop(replica);
        let replica = Replica::open(dir.path()).unwrap();
        assert_eq!(replica.position().applied, 1);
        assert_eq!(digest_of(dir.path()).unwrap().1.count(), 1);
        assert!(!dir.path().join(STAGING).exists());
    }
}
