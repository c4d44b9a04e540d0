//! The control plane on PostgreSQL, with real processes: several replicas
//! sharing one database under concurrent writers, a database outage, and the
//! move of an installation from SQLite.
//!
//! Each test takes a schema of its own on `TWOFOLD_TEST_DATABASE_URL` and drops
//! it after; without the variable they print one line and pass.
//!
//! The outage is made by a TCP proxy between the control plane and PostgreSQL
//! that the test cuts and restores: to the control plane it is the database
//! going away (connections reset, new ones refused) and coming back, without
//! stopping the shared PostgreSQL service other tests use. To stop and start the
//! real service instead, name its cluster and run that test alone:
//!
//! ```sh
//! TWOFOLD_TEST_PG_CLUSTER="15 main" cargo test -p twofold --test postgres outage
//! ```
//!
//! which runs `pg_ctlcluster 15 main stop` and `... start` around the outage.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use reqwest::StatusCode;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

const REPLICAS: usize = 3;
const WRITERS: usize = 8;
const CHANGES: usize = 10_000;

fn database_args(url: &str) -> Vec<String> {
    vec!["--database".to_owned(), url.to_owned()]
}

/// A data plane's gauge, read now.
async fn gauge(data: &DataPlane, name: &str) -> u64 {
    data.metric(name).await.expect(name) as u64
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_under_concurrent_writers_give_every_data_plane_the_same_state() {
    if pg_url().is_none() {
        skip_postgres();
        return;
    }
    let schema = PgSchema::create().await;
    let master_key = new_master_key();
    let mut replicas = Vec::new();
    for _ in 0..REPLICAS {
        replicas
            .push(ControlPlane::start_with(master_key.clone(), database_args(&schema.url)).await);
    }
    let first = &replicas[0];
    let tenant = first.tenant("acme").await;
    let node_key = first.create_node_key().await;
    // Each data plane follows a different replica first; any will do.
    let bases: Vec<String> = replicas.iter().map(|r| r.base().to_owned()).collect();
    let mut planes = Vec::new();
    for d in 0..2 {
        let mut options = DataOptions::new(first, &node_key.secret);
        options.control_urls = (0..REPLICAS)
            .map(|i| bases[(i + d) % REPLICAS].clone())
            .collect();
        planes.push(DataPlane::start(options).await);
    }
    let start_head = first.head().await;
    let mut applied_before = Vec::new();
    for data in &planes {
        data.wait_ready().await;
        data.wait_applied(start_head).await;
        applied_before.push(gauge(data, "twofold_data_changes_applied").await);
    }

    // Eight writers, spread over the replicas, each commit one change per call:
    // a new tenant or a new set of backup codes.
    let apis: Vec<Api> = replicas.iter().map(|r| r.api.clone()).collect();
    let manage = tenant.manage.secret.clone();
    let per_writer = CHANGES / WRITERS;
    let began = Instant::now();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let api = apis[w % REPLICAS].clone();
            let manage = manage.clone();
            tokio::spawn(async move {
                for i in 0..per_writer {
                    if i % 2 == 0 {
                        api.create_tenant(&format!("w{w}-{i}")).await;
                    } else {
                        api.backup_codes(&manage, &format!("user-{w}-{}", i % 20))
                            .await;
                    }
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("writer");
    }
    let took = began.elapsed();
    // One seq per committed change, and every replica learns the last one
    // (through LISTEN/NOTIFY) whichever replica committed it.
    let head = start_head + CHANGES as u64;
    for replica in &replicas {
        wait_for("every replica to know the head", WAIT, || async {
            let got = replica.head().await;
            assert!(got <= head, "head {got} beyond the {CHANGES} changes");
            (got == head).then_some(())
        })
        .await;
    }
    eprintln!(
        "{CHANGES} changes through {REPLICAS} replicas in {took:?} ({:.0}/s)",
        CHANGES as f64 / took.as_secs_f64()
    );

    for (d, data) in planes.iter().enumerate() {
        for replica in &replicas {
            assert_same_state(data, replica, &node_key.secret).await;
        }
        // Read as the data plane read it: every seq applied once, none refused
        // as skipped or repeated, and no second snapshot to paper over a gap.
        let applied = gauge(data, "twofold_data_changes_applied").await - applied_before[d];
        assert_eq!(
            applied, CHANGES as u64,
            "data plane {d} applied each change once"
        );
        assert_eq!(gauge(data, "twofold_data_feed_out_of_order").await, 0);
        assert_eq!(gauge(data, "twofold_data_bootstraps").await, 1);
    }
}

/// A TCP proxy to PostgreSQL that can be cut (open connections reset, new ones
/// closed at once) and restored.
struct Proxy {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let up = Arc::new(AtomicBool::new(true));
        let links: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let accept = {
            let (up, links) = (up.clone(), links.clone());
            tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if !up.load(Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    let link = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    links.lock().expect("links").push(link.abort_handle());
                }
            })
            .abort_handle()
        };
        Proxy {
            addr,
            up,
            links,
            accept,
        }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for link in self.links.lock().expect("links").drain(..) {
            link.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// Where `host:port` sits in a `postgres://user@host:port/db?...` URL.
fn host_span(url: &str) -> (usize, usize) {
    let start = url
        .find('@')
        .map_or_else(|| url.find("://").expect("a URL") + 3, |i| i + 1);
    let end = url[start..]
        .find(['/', '?'])
        .map_or(url.len(), |i| start + i);
    (start, end)
}

/// How the test takes the database away: the proxy, or the real service.
enum Outage {
    Proxy(Proxy),
    /// `pg_ctlcluster` version and name, from `TWOFOLD_TEST_PG_CLUSTER`.
    Service(Vec<String>),
}

impl Outage {
    async fn start(url: &str) -> Outage {
        match std::env::var("TWOFOLD_TEST_PG_CLUSTER") {
            Ok(cluster) if !cluster.trim().is_empty() => {
                Outage::Service(cluster.split_whitespace().map(str::to_owned).collect())
            }
            _ => Outage::Proxy(Proxy::start(target_of(url)).await),
        }
    }

    /// The URL the control plane should use.
    fn url(&self, url: &str) -> String {
        match self {
            Outage::Proxy(proxy) => through(url, proxy.addr),
            Outage::Service(_) => url.to_owned(),
        }
    }

    fn pg_ctlcluster(cluster: &[String], action: &str) {
        let status = std::process::Command::new("pg_ctlcluster")
            .args(cluster)
            .arg(action)
            .status()
            .expect("run pg_ctlcluster");
        assert!(
            status.success(),
            "pg_ctlcluster {cluster:?} {action}: {status}"
        );
    }

    fn cut(&self) {
        match self {
            Outage::Proxy(proxy) => proxy.cut(),
            Outage::Service(cluster) => Outage::pg_ctlcluster(cluster, "stop"),
        }
    }

    fn restore(&self) {
        match self {
            Outage::Proxy(proxy) => proxy.restore(),
            Outage::Service(cluster) => Outage::pg_ctlcluster(cluster, "start"),
        }
    }
}

impl Drop for Outage {
    fn drop(&mut self) {
        // Never leave the shared service stopped, even when the test failed
        // half-way; starting a running cluster only complains.
        if let Outage::Service(cluster) = self {
            let _ = std::process::Command::new("pg_ctlcluster")
                .args(cluster.iter())
                .arg("start")
                .status();
        }
    }
}

/// `url` with its `host:port` replaced by `addr`.
fn through(url: &str, addr: SocketAddr) -> String {
    let (start, end) = host_span(url);
    format!("{}{addr}{}", &url[..start], &url[end..])
}

/// The address of the PostgreSQL server `url` names.
fn target_of(url: &str) -> SocketAddr {
    let (start, end) = host_span(url);
    let host = url[start..end].replace("localhost", "127.0.0.1");
    let host = if host.contains(':') {
        host
    } else {
        format!("{host}:5432")
    };
    host.parse()
        .unwrap_or_else(|e| panic!("PostgreSQL address {host}: {e}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn data_planes_verify_through_a_database_outage_and_the_control_plane_heals() {
    if pg_url().is_none() {
        skip_postgres();
        return;
    }
    let schema = PgSchema::create().await;
    let outage = Outage::start(&schema.url).await;
    let control =
        ControlPlane::start_with(new_master_key(), database_args(&outage.url(&schema.url))).await;
    let tenant = control.tenant("acme").await;
    let node_key = control.create_node_key().await;
    let factor = control.active_factor(&tenant.manage.secret, "alice").await;
    let backup = control.backup_codes(&tenant.manage.secret, "alice").await;
    let data = control.data_plane(&node_key.secret).await;
    data.wait_synced(&control).await;

    outage.cut();
    // The control plane answers 503 in the error format, promptly.
    let began = Instant::now();
    let (status, body) = control
        .post("/v1/tenants", OPERATOR, &json!({"name": "during"}))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "database_unavailable", "{body}");
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "answered in {:?}",
        began.elapsed()
    );
    let (status, body) = control.get("/v1/tenants", OPERATOR).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let ready = control.get("/readyz", OPERATOR).await;
    assert_eq!(ready.0, StatusCode::SERVICE_UNAVAILABLE, "{}", ready.1);

    // Verification does not notice.
    let verify = &tenant.verify.secret;
    for code in &backup.codes[..3] {
        let (status, body) = data.verify(verify, "alice", code).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["valid"], true, "{body}");
    }
    let (status, body) = data
        .verify(verify, "alice", &factor.fresh_code().await)
        .await;
    assert_eq!(
        (status, body["valid"].clone()),
        (StatusCode::OK, json!(true)),
        "{body}"
    );
    let (_, body) = data.verify(verify, "alice", &factor.wrong_code()).await;
    assert_eq!(body["valid"], false, "{body}");

    // Back: ready again, writes go through, data planes follow, and the usage
    // of the outage is merged.
    outage.restore();
    wait_for("the control plane to be ready again", WAIT, || async {
        (control.get("/readyz", OPERATOR).await.0 == StatusCode::OK).then_some(())
    })
    .await;
    control.create_tenant("after").await;
    data.wait_reported().await;
    assert_same_state(&data, &control, &node_key.secret).await;
    let (_, codes) = control
        .get("/v1/users/alice/backup-codes", &tenant.manage.secret)
        .await;
    assert_eq!(codes["remaining"], backup.codes.len() - 3, "{codes}");
    // A used code stays used after the outage.
    let (_, body) = data.verify(verify, "alice", &backup.codes[0]).await;
    assert_eq!(body["valid"], false, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_installation_moves_from_sqlite_to_postgresql_whole() {
    if pg_url().is_none() {
        skip_postgres();
        return;
    }
    let schema = PgSchema::create().await;
    let mut old = ControlPlane::start().await;
    let tenant = old.tenant("acme").await;
    let node_key = old.create_node_key().await;
    let factor = old.active_factor(&tenant.manage.secret, "alice").await;
    let backup = old.backup_codes(&tenant.manage.secret, "alice").await;
    old.active_factor(&tenant.manage.secret, "bob").await;
    let before = old.feed_digest(&node_key.secret).await;
    let (_, keys_before) = old
        .get(&format!("/v1/tenants/{}/keys", tenant.id), OPERATOR)
        .await;
    old.terminate().await;

    let from = format!("sqlite:{}", old.dir().join("control.db").display());
    let migrate = |extra: &[&str]| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_twofold"));
        command
            .args(["control", "migrate", "--from", &from, "--to", &schema.url])
            .args(extra);
        command.output().expect("run twofold control migrate")
    };
    let out = migrate(&[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("totp_factors: 2 rows"), "{stdout}");
    // A second run refuses to overwrite what it just wrote, unless told to.
    let again = migrate(&[]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("--overwrite"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(migrate(&["--overwrite"]).status.success());

    let new =
        ControlPlane::start_with(old.master_key().to_owned(), database_args(&schema.url)).await;
    // The same log, seqs and state: data planes resume rather than bootstrap.
    assert_eq!(new.feed_digest(&node_key.secret).await, before);
    let (_, keys_after) = new
        .get(&format!("/v1/tenants/{}/keys", tenant.id), OPERATOR)
        .await;
    assert_eq!(keys_after, keys_before);
    let (_, factors) = new
        .get("/v1/users/bob/factors", &tenant.manage.secret)
        .await;
    assert_eq!(factors["factors"][0]["status"], "active", "{factors}");

    // A data plane of the new control plane verifies against the moved state,
    // with the old keys, factor secrets and backup codes.
    let data = new.data_plane(&node_key.secret).await;
    assert_same_state(&data, &new, &node_key.secret).await;
    let verify = &tenant.verify.secret;
    let (_, body) = data
        .verify(verify, "alice", &factor.fresh_code().await)
        .await;
    assert_eq!(body["valid"], true, "{body}");
    let (_, body) = data.verify(verify, "alice", &backup.codes[0]).await;
    assert_eq!(body["valid"], true, "{body}");
    // New writes continue the log.
    new.create_tenant("after-the-move").await;
    assert!(new.head().await > before["seq"].as_u64().expect("seq"));
}
