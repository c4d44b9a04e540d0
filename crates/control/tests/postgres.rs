//! What only PostgreSQL can get wrong: several control-plane replicas writing to
//! one database must still give the feed a gap-free sequence whose order is the
//! commit order, and a database outage must answer 503 and heal by itself.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use common::{PgSchema, pg_url, skip_postgres};
use twofold_control::store::{Actor, Store, TenantRow};

const WRITERS: usize = 8;
const WRITES_EACH: usize = 40;

/// Make every insert into `table` sleep up to 15 ms: a wide window between the
/// moment a row takes its seq and the moment its transaction commits, in which
/// a later seq can commit first unless the store prevents it.
fn slow_down_inserts(schema: &PgSchema, table: &str) {
    schema
        .admin()
        .batch_execute(&format!(
            "CREATE OR REPLACE FUNCTION slow_insert() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN PERFORM pg_sleep(random() * 0.015); RETURN NEW; END $$;
             CREATE TRIGGER slow_{table} BEFORE INSERT ON {table}
             FOR EACH ROW EXECUTE FUNCTION slow_insert();"
        ))
        .expect("install the slow trigger");
}

/// Follow a log the way a data plane does, by polling for the rows after the
/// last seq seen, while `write` runs in `WRITERS` threads. Returns every seq the
/// follower saw, in order.
fn follow_while_writing(
    poll: impl Fn(u64) -> Vec<u64> + Send + 'static,
    write: impl Fn(usize, usize) + Send + Sync + 'static,
) -> Vec<u64> {
    let done = Arc::new(AtomicBool::new(false));
    let follower = {
        let done = done.clone();
        thread::spawn(move || {
            let mut seen = Vec::new();
            let mut cursor = 0;
            loop {
                // Read `done` before polling: the last poll starts after every
                // writer committed.
                let finished = done.load(Ordering::SeqCst);
                let batch = poll(cursor);
                if let Some(last) = batch.last() {
                    cursor = *last;
                }
                seen.extend(batch);
                if finished {
                    return seen;
                }
                thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let write = Arc::new(write);
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let write = write.clone();
            thread::spawn(move || {
                for i in 0..WRITES_EACH {
                    write(w, i);
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().expect("writer");
    }
    done.store(true, Ordering::SeqCst);
    follower.join().expect("follower")
}

#[test]
fn seq_order_is_commit_order_across_replicas() {
    if pg_url().is_none() {
        skip_postgres();
        return;
    }
    let schema = PgSchema::create_blocking();
    let replicas: Vec<Arc<Store>> = (0..3)
        .map(|_| Arc::new(Store::open_postgres(&schema.url).expect("open a replica")))
        .collect();
    slow_down_inserts(&schema, "changes");

    let reader = replicas[0].clone();
    let writers = replicas.clone();
    let seen = follow_while_writing(
        move |after| {
            reader
                .changes_after(after, 1_000)
                .expect("read the log")
                .iter()
                .map(|c| c.seq)
                .collect()
        },
        move |w, i| {
            let row = TenantRow {
                id: format!("tn_w{w}i{i}"),
                name: format!("writer {w} #{i}"),
                created_ms: 0,
            };
            writers[w % writers.len()]
                .create_tenant(0, &Actor::Operator, &row)
                .expect("write through a replica");
        },
    );
    let total = (WRITERS * WRITES_EACH) as u64;
    let expected: Vec<u64> = (1..=total).collect();
    assert_eq!(
        seen, expected,
        "the follower saw every seq once, in order, with none committed behind it"
    );
    for replica in &replicas {
        let head = replica.head();
        assert!(head <= total, "head {head} beyond the log");
    }
    // Every replica learns the final head (through LISTEN/NOTIFY or the poll).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while replicas.iter().any(|r| r.head() != total) {
        assert!(
            std::time::Instant::now() < deadline,
            "replicas' heads: {:?}",
            replicas.iter().map(|r| r.head()).collect::<Vec<_>>()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// The check above can fail: the same follower over a log numbered by a plain
/// PostgreSQL sequence, with the same writers and the same slow inserts, misses
/// seqs that commit behind ones it has already passed.
#[test]
fn the_follower_catches_a_log_numbered_by_a_sequence() {
    if pg_url().is_none() {
        skip_postgres();
        return;
    }
    let schema = PgSchema::create_blocking();
    schema
        .admin()
        .batch_execute("CREATE TABLE naive_log (seq BIGSERIAL PRIMARY KEY, body TEXT NOT NULL)")
        .expect("create the naive log");
    slow_down_inserts(&schema, "naive_log");
    let reader_url = schema.url.clone();
    let writer_url = schema.url.clone();
    let seen = follow_while_writing(
        move |after| {
            let mut client = postgres::Client::connect(&reader_url, postgres::NoTls)
                .expect("connect the follower");
            client
                .query(
                    "SELECT seq FROM naive_log WHERE seq > $1 ORDER BY seq",
                    &[&(after as i64)],
                )
                .expect("read the naive log")
                .iter()
                .map(|row| row.get::<_, i64>(0) as u64)
                .collect()
        },
        move |w, i| {
            let mut client =
                postgres::Client::connect(&writer_url, postgres::NoTls).expect("connect a writer");
            client
                .execute(
                    "INSERT INTO naive_log (body) VALUES ($1)",
                    &[&format!("{w}/{i}")],
                )
                .expect("insert");
        },
    );
    let total = (WRITERS * WRITES_EACH) as u64;
    assert!(
        seen.len() < total as usize,
        "a sequence-numbered log should lose seqs to a follower; it saw all {total}"
    );
}
