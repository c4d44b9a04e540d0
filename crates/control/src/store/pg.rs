//! The PostgreSQL side of the store: a small connection pool, migrations that
//! several replicas may run at once, and the watcher that follows the head of
//! the log through LISTEN/NOTIFY.

use std::str::FromStr;
use std::sync::{Mutex, Weak};
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, NoTls};
use tokio::sync::watch;

use super::sql::Conn;
use super::{MAX_IDLE, Result, StoreError, advance, read_head};

/// PostgreSQL migrations, applied in order; `schema_version` holds how many ran.
const MIGRATIONS: &[&str] = &[
    include_str!("postgres.sql"),
    include_str!("postgres_unpublished.sql"),
];

/// The channel every commit with a change notifies.
pub(super) const CHANNEL: &str = "twofold_changes";

/// How long opening a connection may take when the URL does not say.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The head is re-read this often even without a notification, in case one is
/// lost (for example while the watcher reconnects).
const POLL: Duration = Duration::from_secs(1);

/// Any key; it only has to be the same for every replica.
const MIGRATION_LOCK: i64 = 0x0074_776f_666f_6c64;

/// Open connections for reuse. A connection is taken for one store call and
/// given back after; one that broke is dropped, so a restarted database is
/// reconnected to on the next call.
pub(super) struct Pool {
    config: postgres::Config,
    idle: Mutex<Vec<Client>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password.
        f.debug_struct("Pool").finish_non_exhaustive()
    }
}

impl Pool {
    pub(super) fn new(url: &str) -> Result<Pool> {
        let mut config = postgres::Config::from_str(url)?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("twofold-control");
        }
        Ok(Pool {
            config,
            idle: Mutex::new(Vec::new()),
        })
    }

    fn connect(&self) -> Result<Client> {
        Ok(self.config.connect(NoTls)?)
    }

    pub(super) fn get(&self) -> Result<Pooled<'_>> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .pop();
        let client = match idle {
            Some(client) if !client.is_closed() => client,
            _ => self.connect()?,
        };
        Ok(Pooled {
            pool: self,
            client: Some(client),
        })
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Closing a client blocks on its own runtime, which panics on an async
        // thread, and the last handle on the store may be dropped on one.
        let idle = std::mem::take(
            self.idle
                .get_mut()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        if !idle.is_empty() {
            let _ = std::thread::Builder::new()
                .name("twofold-pool-close".into())
                .spawn(move || drop(idle));
        }
    }
}

/// A connection taken from the pool; goes back when dropped.
pub(super) struct Pooled<'p> {
    pool: &'p Pool,
    client: Option<Client>,
}

impl std::ops::Deref for Pooled<'_> {
    type Target = Client;

    fn deref(&self) -> &Client {
        // Only `drop` takes the client out.
        self.client.as_ref().unwrap_or_else(|| unreachable!())
    }
}

impl std::ops::DerefMut for Pooled<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        self.client.as_mut().unwrap_or_else(|| unreachable!())
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        if client.is_closed() {
            return;
        }
        let mut idle = self
            .pool
            .idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(client);
        }
    }
}

/// Errors that mean the database is out of reach rather than the statement
/// wrong: no connection, a connection lost, or the server shutting down or
/// starting up.
pub(super) fn is_unavailable(e: &postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        // Errors from the connection itself (refused, reset, timed out) carry no
        // SQLSTATE.
        None => true,
        Some(code) => {
            let code = code.code();
            // Class 08: connection exception; 57P01-57P03: admin shutdown, crash
            // shutdown, cannot connect now.
            code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03")
        }
    }
}

/// Run the migrations not run yet, then `init`, in one transaction that holds
/// an advisory lock, so replicas starting together migrate one after another.
pub(super) fn migrate<T>(
    client: &mut Client,
    init: impl FnOnce(&mut Conn<'_, '_>) -> Result<T>,
) -> Result<T> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")?;
    let version: Option<i64> = tx
        .query_opt("SELECT version FROM schema_version", &[])?
        .map(|row| row.try_get(0))
        .transpose()?;
    let version = version.unwrap_or(0);
    if version == 0 {
        tx.execute("INSERT INTO schema_version (version) VALUES (0)", &[])?;
    }
    let done = usize::try_from(version).unwrap_or(usize::MAX);
    if done > MIGRATIONS.len() {
        return Err(StoreError::Corrupt(format!(
            "the database's schema version {version} is newer than this build knows"
        )));
    }
    for (i, migration) in MIGRATIONS.iter().enumerate().skip(done) {
        tx.batch_execute(migration)?;
        tx.execute(
            "UPDATE schema_version SET version = $1",
            &[&((i + 1) as i64)],
        )?;
    }
    let value = init(&mut Conn::PgTx(&mut tx))?;
    tx.commit()?;
    Ok(value)
}

/// Follow the head of the log from a thread of its own: LISTEN for commits of
/// any replica, re-read the head on each, and every [`POLL`] anyway. Reconnects
/// with backoff while the database is away; ends when the store is dropped.
pub(super) fn watch_head(pool: &Pool, head: Weak<watch::Sender<u64>>) -> Result<()> {
    let config = pool.config.clone();
    std::thread::Builder::new()
        .name("twofold-head-watch".into())
        .spawn(move || {
            let mut backoff = Duration::from_millis(100);
            while head.strong_count() > 0 {
                match listen(&config, &head) {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "watching the log head failed; retrying");
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        })
        .map_err(|e| StoreError::Corrupt(format!("cannot start the head watcher: {e}")))?;
    Ok(())
}

/// One connection's worth of watching. Returns `Ok` once the store is gone.
fn listen(config: &postgres::Config, head: &Weak<watch::Sender<u64>>) -> Result<()> {
    let mut client = config.connect(NoTls)?;
    client.batch_execute(&format!("LISTEN {CHANNEL}"))?;
    loop {
        let Some(sender) = head.upgrade() else {
            return Ok(());
        };
        let seq = read_head(&mut Conn::Pg(&mut client))?;
        advance(&sender, seq);
        drop(sender);
        // Wait for a notification or the poll interval, then drain the rest: one
        // read of the head covers them all.
        let mut notifications = client.notifications();
        let woken = notifications.timeout_iter(POLL).next()?.is_some();
        if woken {
            let mut pending = notifications.iter();
            while pending.next()?.is_some() {}
        }
    }
}
