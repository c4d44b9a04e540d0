//! PostgreSQL for tests: the server named by `TWOFOLD_TEST_DATABASE_URL`, a
//! schema of its own per test, and the one line printed when there is none.
//! Shared by the control plane's tests and the binary's.

use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

/// The PostgreSQL server tests may use, from `TWOFOLD_TEST_DATABASE_URL`.
pub fn pg_url() -> Option<String> {
    std::env::var("TWOFOLD_TEST_DATABASE_URL")
        .ok()
        .filter(|url| !url.is_empty())
}

/// Say once per test binary, past the output capture, that PostgreSQL tests are
/// skipped.
pub fn skip_postgres() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "skipping the PostgreSQL tests: TWOFOLD_TEST_DATABASE_URL is not set"
        );
    });
}

/// A schema of its own on the test PostgreSQL server, dropped with it.
#[derive(Debug)]
pub struct PgSchema {
    pub name: String,
    /// The test server's URL, with this schema as the search path.
    pub url: String,
    base: String,
}

impl PgSchema {
    pub async fn create() -> PgSchema {
        tokio::task::spawn_blocking(PgSchema::create_blocking)
            .await
            .expect("create task")
    }

    /// [`PgSchema::create`], for a test that runs no async code.
    pub fn create_blocking() -> PgSchema {
        let base = pg_url().expect("TWOFOLD_TEST_DATABASE_URL");
        let name = unique_name();
        let separator = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{separator}options=-c%20search_path%3D{name}");
        let schema = PgSchema { name, url, base };
        schema
            .admin()
            .batch_execute(&format!("CREATE SCHEMA {}", schema.name))
            .expect("create schema");
        schema
    }

    /// A blocking client on this schema.
    pub fn admin(&self) -> postgres::Client {
        postgres::Client::connect(&self.url, postgres::NoTls).expect("connect to the test schema")
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let (admin, schema) = (self.base.clone(), self.name.clone());
        // A blocking client may not run on an async thread: use one of its own.
        let dropped = std::thread::spawn(move || {
            let mut client = postgres::Client::connect(&admin, postgres::NoTls)?;
            client.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test schema {}", self.name);
        }
    }
}

/// A schema name no other test, in this process or another, is using.
fn unique_name() -> String {
    use std::sync::atomic::AtomicU64;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "tf_{}_{}_{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}
