//! No secret is kept or logged in the clear: TOTP secrets, backup codes, API
//! keys and the operator token are absent from the database files (main, WAL and
//! shared memory) and from everything the process logs.
//!
//! This binary installs a global `tracing` subscriber, so it holds one test.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::{OPERATOR, TestServer, wrong_code};
use data_encoding::{BASE64, HEXLOWER};
use reqwest::{Method, StatusCode};
use serde_json::json;

/// Log output, gathered from every thread of the process.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn install() -> Captured {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
        captured
    }

    fn bytes(&self) -> Vec<u8> {
        self.0.lock().expect("log buffer").clone()
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_disk_or_the_log() {
    let logs = Captured::install();
    let s = TestServer::start().await;
    let tenant = s.tenant("acme").await;
    let verify = s.create_key(&tenant.id, &["verify"]).await;
    let node = s.create_node_key().await;
    let revoked = s.create_key(&tenant.id, &["manage"]).await;
    let (status, _) = s
        .delete(
            &format!("/v1/tenants/{}/keys/{}", tenant.id, revoked.id),
            OPERATOR,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    let mut secrets: Vec<(String, Vec<u8>)> = Vec::new();
    let mut add = |name: &str, bytes: &[u8]| secrets.push((name.to_owned(), bytes.to_vec()));
    for key in [
        &tenant.manage,
        &verify.secret,
        &node.secret,
        &revoked.secret,
    ] {
        add("api key", key.as_bytes());
        add("api key body", &key.as_bytes()["tfk_".len()..]);
    }
    add("operator token", OPERATOR.as_bytes());

    let now = (common::START_MS / 1000) as u64;
    let mut factors = Vec::new();
    for (user, body) in [
        ("alice", json!({})),
        ("alice", json!({"algorithm": "SHA256", "digits": 8})),
        ("bob", json!({"algorithm": "SHA512", "qr": "png"})),
        ("carol", json!({"period": 60})),
        ("dave", json!({})),
    ] {
        let factor = s.enroll_with(&tenant.manage, user, body).await;
        // A wrong code first, so the failure path runs too.
        let wrong = wrong_code(&factor, now);
        let (status, _) = s
            .try_activate(&tenant.manage, user, &factor.id, &wrong)
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        add("wrong code", wrong.as_bytes());
        factors.push((user, factor));
    }
    // All but the last are activated; the last stays pending.
    for (user, factor) in &factors[..4] {
        let code = s.code(factor);
        let (status, body) = s
            .try_activate(&tenant.manage, user, &factor.id, &code)
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        add("activation code", code.as_bytes());
    }
    for (_, factor) in &factors {
        add("raw secret", &factor.raw);
        add("base32 secret", factor.base32.as_bytes());
        add("base32 secret", factor.base32.to_lowercase().as_bytes());
        add("base64 secret", BASE64.encode(&factor.raw).as_bytes());
        add("hex secret", HEXLOWER.encode(&factor.raw).as_bytes());
        let uri = factor.body["otpauth_uri"].as_str().expect("uri");
        add("otpauth uri", uri.as_bytes());
    }
    for user in ["alice", "bob", "erin"] {
        for code in s.backup_codes(&tenant.manage, user).await {
            add("backup code", code.as_bytes());
            add("backup code", code.replace('-', "").as_bytes());
        }
    }
    // Deleted things must not linger either.
    let (status, _) = s
        .delete(
            &format!("/v1/users/alice/factors/{}", factors[0].1.id),
            &tenant.manage,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = s.delete("/v1/users/bob", &tenant.manage).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = s
        .call(
            Method::POST,
            "/v1/users/carol/unlock",
            Some(&tenant.manage),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // Read the feed too, so its code paths log whatever they log.
    let lines = s.snapshot(OPERATOR).await;
    assert!(lines.len() > 2);
    let head = s.head().await;
    let changes = s.changes_until_head(0).await;
    assert_eq!(changes.len() as u64, head);

    let files = |label: &str| {
        let mut found = Vec::new();
        for suffix in ["", "-wal", "-shm"] {
            let path = s.dir.path().join(format!("control.db{suffix}"));
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            for (name, secret) in &secrets {
                if contains(&bytes, secret) {
                    found.push(format!("{label}: {name} in {}", path.display()));
                }
            }
        }
        found
    };
    // The scan does see what is stored: ids are there in the clear.
    let db = std::fs::read(s.db_path()).expect("database file");
    let wal = std::fs::read(s.dir.path().join("control.db-wal")).expect("wal file");
    let stored = |id: &str| contains(&db, id.as_bytes()) || contains(&wal, id.as_bytes());
    assert!(
        stored(&tenant.id) && stored(&factors[1].1.id),
        "ids are stored"
    );
    let mut found = files("live");
    // Move the WAL into the main file and look again.
    let conn = rusqlite::Connection::open(s.db_path()).expect("reader");
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .expect("checkpoint");
    drop(conn);
    found.extend(files("checkpointed"));

    let log = logs.bytes();
    assert!(
        contains(&log, b"totp factor activated"),
        "the server's logs were captured"
    );
    for (name, secret) in &secrets {
        if contains(&log, secret) {
            found.push(format!("{name} in the log"));
        }
    }
    assert!(found.is_empty(), "{found:#?}");
}
