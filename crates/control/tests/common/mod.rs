//! Shared harness of the control plane's tests: a real server on `127.0.0.1:0`
//! with its own database and (optionally) a manual clock, an HTTP client, and an
//! RFC 6238 implementation written apart from `twofold_core::otp` so the tests
//! check the code under test rather than agree with it.

// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use hmac::{Hmac, KeyInit, Mac};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use twofold_control::config::Config;
use twofold_control::state::{AppState, Clock};
use twofold_control::store::Store;
use twofold_core::feed::{ChangeLine, Entity, EntityKey, Op, SnapshotLine, StateDigest};
use twofold_core::seal::{Keyring, MasterKey};

#[path = "pg.rs"]
mod pg;
#[allow(unused_imports)]
pub use pg::{PgSchema, pg_url, skip_postgres};

/// The operator token every test server accepts.
pub const OPERATOR: &str = "tfo_test-operator-token-0123456789abcdefghijklmnop";

/// Where the manual clock starts: 2023-11-14T22:13:20Z, on a 30 s boundary.
pub const START_MS: i64 = 1_700_000_000_000;

/// How long a test waits for something that should happen at once.
pub const WAIT: Duration = Duration::from_secs(10);

/// A running control plane. Shuts down when dropped.
pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
    pub state: AppState,
    /// The manual clock's handle, if the server runs on one.
    pub clock: Option<Arc<AtomicI64>>,
    pub dir: TempDir,
    /// The PostgreSQL schema the server runs on, dropped with the server.
    pub pg: Option<PgSchema>,
    shutdown: CancellationToken,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Which database a test's server runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

tokio::task_local! {
    static BACKEND: Backend;
}

/// The database of the test running on this task (SQLite outside [`on`]).
pub fn backend() -> Backend {
    BACKEND.try_with(|b| *b).unwrap_or(Backend::Sqlite)
}

/// Run `test` with its servers on `backend`. A PostgreSQL run without a test
/// database is skipped.
pub async fn on(backend: Backend, test: impl std::future::Future<Output = ()>) {
    if backend == Backend::Postgres && pg_url().is_none() {
        skip_postgres();
        return;
    }
    BACKEND.scope(backend, test).await;
}

/// Run each listed `async fn` once per database: as `sqlite::NAME` and
/// `postgres::NAME`. Functions under `multi_thread` get a 4-thread runtime.
#[macro_export]
macro_rules! suite {
    ($($name:ident),* $(,)? $(; multi_thread: $($mt:ident),* $(,)?)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    $crate::common::on($crate::common::Backend::Sqlite, super::$name()).await;
                }
            )*
            $($(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $mt() {
                    $crate::common::on($crate::common::Backend::Sqlite, super::$mt()).await;
                }
            )*)?
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    $crate::common::on($crate::common::Backend::Postgres, super::$name()).await;
                }
            )*
            $($(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $mt() {
                    $crate::common::on($crate::common::Backend::Postgres, super::$mt()).await;
                }
            )*)?
        }
    };
}

/// A tenant with a `manage` key.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub id: String,
    pub manage: String,
}

/// A key just created: its id and its secret.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub id: String,
    pub secret: String,
}

/// An enrolled factor: its id and secret (base32 and raw) and its parameters.
#[derive(Debug, Clone)]
pub struct Enrolled {
    pub id: String,
    pub base32: String,
    pub raw: Vec<u8>,
    pub algorithm: String,
    pub digits: u32,
    pub period: u64,
    pub body: Value,
}

impl TestServer {
    /// A server on a manual clock standing at [`START_MS`].
    pub async fn start() -> TestServer {
        let (clock, handle) = Clock::manual(START_MS);
        TestServer::start_with(clock, Some(handle), |_| {}).await
    }

    /// A server on the system clock.
    pub async fn start_system_clock() -> TestServer {
        TestServer::start_with(Clock::system(), None, |_| {}).await
    }

    pub async fn start_with(
        clock: Clock,
        handle: Option<Arc<AtomicI64>>,
        tune: impl FnOnce(&mut Config),
    ) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let (store, pg) = match backend() {
            Backend::Sqlite => (
                Store::open(&dir.path().join("control.db")).expect("open store"),
                None,
            ),
            Backend::Postgres => {
                let schema = PgSchema::create().await;
                let url = schema.url.clone();
                let store = tokio::task::spawn_blocking(move || Store::open_postgres(&url))
                    .await
                    .expect("open task")
                    .expect("open store on PostgreSQL");
                (store, Some(schema))
            }
        };
        let mut config = Config::new(Keyring::new(MasterKey::generate().expect("master key")));
        config.operator_token = Some(OPERATOR.to_owned());
        tune(&mut config);
        let shutdown = CancellationToken::new();
        let state = AppState::new(store, config, clock, shutdown.clone());
        let setup = state.clone();
        tokio::task::spawn_blocking(move || twofold_control::server::ensure_operator_token(&setup))
            .await
            .expect("setup task")
            .expect("operator token");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let server = tokio::spawn(twofold_control::serve(listener, state.clone()));
        TestServer {
            base: format!("http://{addr}"),
            client: reqwest::Client::new(),
            state,
            clock: handle,
            dir,
            pg,
            shutdown,
            server: Some(server),
        }
    }

    /// Shut the server down and wait for it to finish, within [`WAIT`].
    pub async fn shutdown(&mut self) {
        self.shutdown.cancel();
        let server = self.server.take().expect("a running server");
        tokio::time::timeout(WAIT, server)
            .await
            .expect("the server stops within the deadline")
            .expect("the server task")
            .expect("the server ends cleanly");
    }

    /// Call the store directly, off the async threads as the server does.
    pub async fn with_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> T + Send + 'static,
    ) -> T {
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || f(&state.store))
            .await
            .expect("store task")
    }

    pub fn db_path(&self) -> std::path::PathBuf {
        self.dir.path().join("control.db")
    }

    /// The server's time in Unix milliseconds.
    pub fn now_ms(&self) -> i64 {
        match &self.clock {
            Some(clock) => clock.load(Ordering::SeqCst),
            None => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .expect("time after the epoch"),
        }
    }

    /// Move the manual clock forward.
    pub fn advance(&self, by: Duration) {
        self.clock
            .as_ref()
            .expect("a manual clock")
            .fetch_add(by.as_millis() as i64, Ordering::SeqCst);
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A request with an optional bearer token.
    pub fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
    ) -> reqwest::RequestBuilder {
        let builder = self.client.request(method, self.url(path));
        match token {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        }
    }

    /// Send a request and read the answer as JSON (`Null` for an empty body).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut builder = self.request(method, path, token);
        if let Some(body) = body {
            builder = builder.json(&body);
        }
        send(builder).await
    }

    pub async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, Some(token), None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(token), Some(body)).await
    }

    pub async fn delete(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.call(Method::DELETE, path, Some(token), None).await
    }

    pub async fn create_tenant(&self, name: &str) -> String {
        let (status, body) = self
            .post("/v1/tenants", OPERATOR, json!({ "name": name }))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["id"].as_str().expect("tenant id").to_owned()
    }

    pub async fn create_key(&self, tenant: &str, scopes: &[&str]) -> NewKey {
        let (status, body) = self
            .post(
                &format!("/v1/tenants/{tenant}/keys"),
                OPERATOR,
                json!({ "name": "test key", "scopes": scopes }),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        NewKey {
            id: body["id"].as_str().expect("key id").to_owned(),
            secret: body["secret"].as_str().expect("key secret").to_owned(),
        }
    }

    pub async fn create_node_key(&self) -> NewKey {
        let (status, body) = self
            .post("/v1/node-keys", OPERATOR, json!({ "name": "node" }))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        NewKey {
            id: body["id"].as_str().expect("key id").to_owned(),
            secret: body["secret"].as_str().expect("key secret").to_owned(),
        }
    }

    /// A new tenant with a `manage` key.
    pub async fn tenant(&self, name: &str) -> Tenant {
        let id = self.create_tenant(name).await;
        let manage = self.create_key(&id, &["manage"]).await.secret;
        Tenant { id, manage }
    }

    /// Enrol a TOTP factor with `body` (`Null` for no body at all).
    pub async fn try_enroll(&self, key: &str, user: &str, body: Value) -> (StatusCode, Value) {
        let path = format!("/v1/users/{}/totp", enc(user));
        if body.is_null() {
            self.call(Method::POST, &path, Some(key), None).await
        } else {
            self.post(&path, key, body).await
        }
    }

    pub async fn enroll_with(&self, key: &str, user: &str, body: Value) -> Enrolled {
        let (status, body) = self.try_enroll(key, user, body).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let base32 = body["secret"].as_str().expect("secret").to_owned();
        Enrolled {
            id: body["factor_id"].as_str().expect("factor id").to_owned(),
            raw: data_encoding::BASE32_NOPAD
                .decode(base32.as_bytes())
                .expect("base32 secret"),
            base32,
            algorithm: body["algorithm"].as_str().expect("algorithm").to_owned(),
            digits: body["digits"].as_u64().expect("digits") as u32,
            period: body["period"].as_u64().expect("period"),
            body,
        }
    }

    pub async fn enroll(&self, key: &str, user: &str) -> Enrolled {
        self.enroll_with(key, user, Value::Null).await
    }

    /// The current code of a factor, computed by the tests' own RFC 6238.
    pub fn code(&self, factor: &Enrolled) -> String {
        totp(
            &factor.raw,
            &factor.algorithm,
            factor.digits,
            factor.period,
            (self.now_ms() / 1000) as u64,
        )
    }

    pub async fn try_activate(
        &self,
        key: &str,
        user: &str,
        factor: &str,
        code: &str,
    ) -> (StatusCode, Value) {
        self.post(
            &format!("/v1/users/{}/totp/{factor}/activate", enc(user)),
            key,
            json!({ "code": code }),
        )
        .await
    }

    pub async fn activate(&self, key: &str, user: &str, factor: &Enrolled) -> Value {
        let code = self.code(factor);
        let (status, body) = self.try_activate(key, user, &factor.id, &code).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// Enrol and activate a default factor.
    pub async fn active_factor(&self, key: &str, user: &str) -> Enrolled {
        let factor = self.enroll(key, user).await;
        self.activate(key, user, &factor).await;
        factor
    }

    pub async fn backup_codes(&self, key: &str, user: &str) -> Vec<String> {
        let (status, body) = self
            .call(
                Method::POST,
                &format!("/v1/users/{}/backup-codes", enc(user)),
                Some(key),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["codes"]
            .as_array()
            .expect("codes")
            .iter()
            .map(|c| c.as_str().expect("code").to_owned())
            .collect()
    }

    /// The log's head as `/v1/feed/digest` reports it.
    pub async fn head(&self) -> u64 {
        let (status, body) = self.get("/v1/feed/digest", OPERATOR).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["seq"].as_u64().expect("seq")
    }

    /// A whole snapshot, parsed line by line.
    pub async fn snapshot(&self, token: &str) -> Vec<SnapshotLine> {
        let response = self
            .request(Method::GET, "/v1/feed/snapshot", Some(token))
            .send()
            .await
            .expect("snapshot request");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("application/x-ndjson")
        );
        let text = tokio::time::timeout(WAIT, response.text())
            .await
            .expect("snapshot within the deadline")
            .expect("snapshot body");
        text.lines()
            .map(|line| serde_json::from_str(line).expect("a snapshot line"))
            .collect()
    }

    /// Open `GET /v1/feed/changes?after=...`.
    pub async fn changes(&self, token: &str, after: u64) -> ChangeStream {
        let response = self
            .request(
                Method::GET,
                &format!("/v1/feed/changes?after={after}"),
                Some(token),
            )
            .send()
            .await
            .expect("changes request");
        assert_eq!(response.status(), StatusCode::OK);
        ChangeStream::new(response)
    }

    /// Every change after `after` up to the current head, read from a fresh stream.
    pub async fn changes_until_head(&self, after: u64) -> Vec<twofold_core::feed::Change> {
        let head = self.head().await;
        let mut stream = self.changes(OPERATOR, after).await;
        stream.changes_through(head).await
    }
}

/// Send and read the answer as JSON (`Null` for an empty body).
pub async fn send(builder: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let response = builder.send().await.expect("request sent");
    let status = response.status();
    let text = response.text().await.expect("response body");
    if text.is_empty() {
        return (status, Value::Null);
    }
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("status {status}: body is not JSON ({e}): {text}"));
    (status, body)
}

/// Percent-encode a path segment.
pub fn enc(segment: &str) -> String {
    let mut out = String::new();
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Check an error answer: its status, and the body `{"error":{"code","message"}}`
/// with this code and a non-empty message.
#[track_caller]
pub fn assert_error(got: &(StatusCode, Value), status: StatusCode, code: &str) {
    let (got_status, body) = got;
    assert_eq!(*got_status, status, "{body}");
    assert_error_shape(body);
    assert_eq!(body["error"]["code"], code, "{body}");
}

/// The body is `{"error":{"code":"...","message":"..."}}` and nothing else.
#[track_caller]
pub fn assert_error_shape(body: &Value) {
    let object = body.as_object().expect("an error object");
    assert_eq!(object.len(), 1, "{body}");
    let error = body["error"].as_object().expect("an error member");
    assert_eq!(error.len(), 2, "{body}");
    assert!(
        error["code"].as_str().is_some_and(|c| !c.is_empty()),
        "{body}"
    );
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

/// RFC 6238 TOTP, written directly on HMAC (RFC 2104) and dynamic truncation
/// (RFC 4226 §5.3).
pub fn totp(secret: &[u8], algorithm: &str, digits: u32, period: u64, unix_time: u64) -> String {
    let counter = (unix_time / period).to_be_bytes();
    let hash = match algorithm {
        "SHA1" => hmac_of::<Hmac<sha1::Sha1>>(secret, &counter),
        "SHA256" => hmac_of::<Hmac<sha2::Sha256>>(secret, &counter),
        "SHA512" => hmac_of::<Hmac<sha2::Sha512>>(secret, &counter),
        other => panic!("unknown algorithm {other}"),
    };
    let offset = usize::from(hash[hash.len() - 1] & 0x0f);
    let binary = (u32::from(hash[offset] & 0x7f) << 24)
        | (u32::from(hash[offset + 1]) << 16)
        | (u32::from(hash[offset + 2]) << 8)
        | u32::from(hash[offset + 3]);
    let value = binary % 10u32.pow(digits);
    format!("{value:0width$}", width = digits as usize)
}

fn hmac_of<M: Mac + KeyInit>(key: &[u8], message: &[u8]) -> Vec<u8> {
    let mut mac = <M as KeyInit>::new_from_slice(key).expect("hmac takes any key");
    mac.update(message);
    mac.finalize().into_bytes().to_vec()
}

/// A well-formed code that is wrong for every step near `unix_time`.
pub fn wrong_code(factor: &Enrolled, unix_time: u64) -> String {
    let near: Vec<String> = (0..=4)
        .map(|i| {
            totp(
                &factor.raw,
                &factor.algorithm,
                factor.digits,
                factor.period,
                unix_time + i * factor.period - 2 * factor.period,
            )
        })
        .collect();
    (0u64..)
        .map(|i| {
            totp(
                &factor.raw,
                &factor.algorithm,
                factor.digits,
                factor.period,
                unix_time.saturating_sub((1000 + i) * factor.period),
            )
        })
        .find(|code| !near.contains(code))
        .expect("some code differs")
}

/// An open change stream, read line by line with deadlines.
pub struct ChangeStream {
    body: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: Vec<u8>,
    pub log_id: Option<String>,
}

impl ChangeStream {
    pub fn new(response: reqwest::Response) -> ChangeStream {
        let log_id = response
            .headers()
            .get("twofold-log-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        ChangeStream {
            body: response.bytes_stream().boxed(),
            buf: Vec::new(),
            log_id,
        }
    }

    /// The next line, or `None` if none came within `wait` or the stream ended.
    pub async fn next_within(&mut self, wait: Duration) -> Option<ChangeLine> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                return Some(serde_json::from_slice(&line).expect("a change line"));
            }
            match tokio::time::timeout_at(deadline, self.body.next()).await {
                Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk.expect("stream chunk")),
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// The next line; panics if none comes within [`WAIT`].
    pub async fn next_line(&mut self) -> ChangeLine {
        self.next_within(WAIT)
            .await
            .expect("a line within the deadline")
    }

    /// The next change, skipping heartbeats.
    pub async fn next_change(&mut self) -> twofold_core::feed::Change {
        loop {
            if let ChangeLine::Change(change) = self.next_line().await {
                return change;
            }
        }
    }

    /// Changes up to and including `head`, skipping heartbeats.
    pub async fn changes_through(&mut self, head: u64) -> Vec<twofold_core::feed::Change> {
        let mut changes = Vec::new();
        let mut last = 0;
        while last < head {
            let change = self.next_change().await;
            last = change.seq;
            changes.push(change);
        }
        changes
    }
}

/// A replica in miniature: entities by key, with changes applied in order.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Replica {
    pub entities: std::collections::BTreeMap<EntityKey, Entity>,
}

impl Replica {
    pub fn from_snapshot(lines: &[SnapshotLine]) -> (u64, Replica) {
        let mut seq = None;
        let mut replica = Replica::default();
        for line in lines {
            match line {
                SnapshotLine::Begin { seq: s } => seq = Some(*s),
                SnapshotLine::Entity { entity } => {
                    assert!(
                        replica
                            .entities
                            .insert(entity.key(), entity.clone())
                            .is_none(),
                        "an entity appears twice in a snapshot"
                    );
                }
                SnapshotLine::End { .. } => {}
            }
        }
        (seq.expect("a Begin line"), replica)
    }

    pub fn apply(&mut self, ops: &[Op]) {
        for op in ops {
            match op {
                Op::Put { entity } => {
                    self.entities.insert(entity.key(), entity.clone());
                }
                Op::Delete { key } => {
                    self.entities.remove(key);
                }
            }
        }
    }

    pub fn digest(&self) -> StateDigest {
        let mut digest = StateDigest::default();
        self.entities.values().for_each(|e| digest.add(e));
        digest
    }
}

/// Poll `check` until it returns `Some`, or panic after [`WAIT`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
