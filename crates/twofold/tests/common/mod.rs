//! Process-level test harness: real `twofold control` and `twofold data`
//! processes of the built binary, each on `127.0.0.1` with its own data directory,
//! driven and checked through HTTP only.
//!
//! - [`Process`] starts the binary, reads its `twofold <plane> listening on
//!   http://ADDR` (or `https://`) line within a deadline, drains its output in background threads
//!   (keeping the last lines for failure reports), and can `kill` (SIGKILL),
//!   `terminate` (SIGTERM) and `restart` it. It is SIGKILLed on drop, so a failing
//!   or panicking test leaves no process behind.
//! - [`ControlPlane`] and [`DataPlane`] wrap a process with its data directory
//!   and the API helpers tests need; [`Api`] is the control plane's HTTP API as a
//!   cheap, cloneable handle (for concurrent requests from spawned tasks).
//! - [`Totp`] computes codes with its own RFC 6238 (hmac + sha1), apart from
//!   `twofold_core::otp`, so the tests check the code under test instead of
//!   agreeing with it.
//! - [`wait_for`] polls a condition every few milliseconds until a deadline:
//!   tests never sleep and hope.
//! - [`in_parallel`], [`backup_codes_for`] and [`active_factors_for`] set up many
//!   users at once; [`assert_same_state`] compares a replica with its source.
//!
//! A control plane keeps its port across restarts (data planes already point at
//! it); a data plane takes a new one unless started with [`Port::Pick`].

// Each test binary uses a different part of this module.
#![allow(dead_code)]

#[path = "../../../control/tests/common/pg.rs"]
mod pg;
#[allow(unused_imports)]
pub use pg::{PgSchema, pg_url, skip_postgres};

use std::collections::VecDeque;
use std::future::Future;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tempfile::TempDir;

/// The operator token every control plane started here accepts.
pub const OPERATOR: &str = "tfo_harness-operator-token-0123456789abcdefghijkl";

/// How long a process may take to say where it listens.
pub const START_WAIT: Duration = Duration::from_secs(20);
/// How long a test waits for something that should happen promptly (a change to
/// reach a data plane, a process to exit after SIGTERM).
pub const WAIT: Duration = Duration::from_secs(20);
/// How often [`wait_for`] looks again.
pub const POLL: Duration = Duration::from_millis(15);
/// Per-request timeout of the harness's HTTP client.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Output lines kept per process for failure reports.
const LOG_LINES: usize = 300;

// ---------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------

/// Poll `probe` every [`POLL`] until it returns `Some`, or panic after `within`
/// naming `what` was awaited.
pub async fn wait_for<T, Fut>(what: &str, within: Duration, mut probe: impl FnMut() -> Fut) -> T
where
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Unix time in seconds, from the system clock (the processes use the same).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("time after the epoch")
        .as_secs()
}

/// Random bytes from the OS.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).expect("OS random source");
    bytes
}

/// A uniformly random number below `bound`.
pub fn random_below(bound: u64) -> u64 {
    u64::from_le_bytes(random_bytes::<8>()) % bound.max(1)
}

/// A new master key: base64 of 32 random bytes, as `TWOFOLD_MASTER_KEY` takes.
pub fn new_master_key() -> String {
    data_encoding::BASE64.encode(&random_bytes::<32>())
}

/// Run `f` on every item, `parallel` at a time; the results come back in the
/// items' order. A panic in `f` fails the caller.
pub async fn in_parallel<T, R, F, Fut>(items: Vec<T>, parallel: usize, f: F) -> Vec<R>
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = R> + Send + 'static,
{
    let total = items.len();
    let queue: Arc<Mutex<VecDeque<(usize, T)>>> =
        Arc::new(Mutex::new(items.into_iter().enumerate().collect()));
    let f = Arc::new(f);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..parallel.max(1) {
        let (queue, f) = (queue.clone(), f.clone());
        workers.spawn(async move {
            let mut done = Vec::new();
            loop {
                let next = queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
                let Some((i, item)) = next else {
                    return done;
                };
                done.push((i, f(item).await));
            }
        });
    }
    let mut results: Vec<Option<R>> = (0..total).map(|_| None).collect();
    while let Some(done) = workers.join_next().await {
        for (i, result) in done.unwrap_or_else(|e| panic!("a parallel task failed: {e}")) {
            results[i] = Some(result);
        }
    }
    results
        .into_iter()
        .map(|r| r.expect("every item was done"))
        .collect()
}

/// A port that was free a moment ago, for a process that must keep its port.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

/// Where a process listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// Port 0: a new port on every start.
    Any,
    /// Pick a free port at first start and keep it across restarts.
    Pick,
}

type Log = Arc<Mutex<VecDeque<String>>>;

fn push_log(log: &Log, line: String) {
    let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
    if log.len() == LOG_LINES {
        log.pop_front();
    }
    log.push_back(line);
}

/// One process of the built `twofold` binary.
pub struct Process {
    plane: &'static str,
    /// Arguments after the subcommand, without `--listen`.
    args: Vec<String>,
    envs: Vec<(String, String)>,
    port: Port,
    /// The port kept across restarts, once chosen.
    kept: Option<u16>,
    child: Option<Child>,
    addr: Option<SocketAddr>,
    /// `http` or `https`, as the process announced.
    scheme: &'static str,
    readers: Vec<JoinHandle<()>>,
    log: Log,
    /// Successful starts.
    starts: u32,
    /// Spawns, successful or not; tags output lines.
    launches: u32,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("plane", &self.plane)
            .field("pid", &self.pid())
            .field("addr", &self.addr)
            .finish()
    }
}

impl Process {
    /// Start `twofold <plane> <args> --listen ...` with `envs` (on top of an
    /// environment cleared of every other `TWOFOLD_*` variable), and wait until it
    /// says where it listens.
    pub async fn start(
        plane: &'static str,
        args: Vec<String>,
        envs: Vec<(String, String)>,
        port: Port,
    ) -> Process {
        let mut process = Process {
            plane,
            args,
            envs,
            port,
            kept: None,
            child: None,
            addr: None,
            scheme: "http",
            readers: Vec::new(),
            log: Arc::new(Mutex::new(VecDeque::new())),
            starts: 0,
            launches: 0,
        };
        process.launch().await;
        process
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => child.try_wait().map(|s| s.is_none()).unwrap_or(false),
            None => false,
        }
    }

    /// Where the process listens; panics if it is not running.
    pub fn addr(&self) -> SocketAddr {
        self.addr
            .unwrap_or_else(|| panic!("the {} process is not running", self.plane))
    }

    /// `http://ADDR` or `https://ADDR`.
    pub fn base(&self) -> String {
        format!("{}://{}", self.scheme, self.addr())
    }

    /// The port this process keeps across restarts, if it keeps one.
    pub fn kept_port(&self) -> Option<u16> {
        self.kept
    }

    /// How many times the process has been started.
    pub fn starts(&self) -> u32 {
        self.starts
    }

    /// The last lines the process wrote, stdout and stderr interleaved.
    pub fn logs(&self) -> String {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// SIGKILL the process and reap it. Does nothing if it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // `kill` fails only if the process was already reaped; wait anyway.
            let _ = child.kill();
            let _ = child.wait();
        }
        self.after_exit();
    }

    /// SIGTERM the process and wait (within [`WAIT`]) for it to exit; returns its
    /// exit status. Panics (after a SIGKILL) if it does not exit in time.
    pub async fn terminate(&mut self) -> ExitStatus {
        let pid = self
            .pid()
            .unwrap_or_else(|| panic!("the {} process is not running", self.plane));
        let sent = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill -TERM");
        assert!(sent.success(), "kill -TERM {pid} failed: {sent}");
        let deadline = Instant::now() + WAIT;
        loop {
            let child = self.child.as_mut().expect("a child process");
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                self.after_exit();
                return status;
            }
            if Instant::now() >= deadline {
                self.kill();
                panic!(
                    "the {} process did not exit within {WAIT:?} of SIGTERM; last output:\n{}",
                    self.plane,
                    self.logs()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Start the process again with the same arguments, environment and data
    /// directory (and the same port if it keeps one), SIGKILLing it first if it
    /// still runs.
    pub async fn restart(&mut self) {
        self.kill();
        self.launch().await;
    }

    /// Set (or replace) an environment variable for the next start, as an
    /// operator changes a unit's environment before restarting it.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.envs.retain(|(k, _)| k != key);
        self.envs.push((key.to_owned(), value.to_owned()));
    }

    /// The arguments after the subcommand (without `--listen`).
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// Start again if stopped; nothing if running.
    pub async fn ensure_started(&mut self) {
        if !self.is_running() {
            self.restart().await;
        }
    }

    fn after_exit(&mut self) {
        self.addr = None;
        // The readers end at EOF, which comes once the process is gone; joining
        // them makes its last lines part of `logs()`.
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }

    async fn launch(&mut self) {
        // A picked port may be taken by someone else between our check and the
        // bind: try another at first start, and retry the same one for a moment
        // on a restart, where the port must stay the same.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let port = match (self.port, self.kept) {
                (Port::Any, _) => 0,
                (Port::Pick, Some(port)) => port,
                (Port::Pick, None) => *self.kept.insert(free_port()),
            };
            match self.spawn_once(port).await {
                Ok((scheme, addr)) => {
                    self.scheme = scheme;
                    self.addr = Some(addr);
                    self.starts += 1;
                    return;
                }
                Err(Failure::PortBusy) if self.port == Port::Pick && attempts < 40 => {
                    if self.starts == 0 {
                        self.kept = None;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(failure) => panic!(
                    "the {} process did not start ({failure:?}); last output:\n{}",
                    self.plane,
                    self.logs()
                ),
            }
        }
    }

    async fn spawn_once(&mut self, port: u16) -> Result<(&'static str, SocketAddr), Failure> {
        let mut command = Command::new(env!("CARGO_BIN_EXE_twofold"));
        command
            .arg(self.plane)
            .args(&self.args)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"));
        // Only what the test sets: nothing from the developer's environment.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("TWOFOLD_") {
                command.env_remove(&key);
            }
        }
        // TWOFOLD_TEST_LOG=debug (say) shows more of the processes' logs.
        let level = std::env::var("TWOFOLD_TEST_LOG").unwrap_or_else(|_| "warn".to_owned());
        command
            .env("TWOFOLD_LOG", level)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().map_err(|e| Failure::Spawn(e.to_string()))?;
        self.launches += 1;
        let (tx, rx) = tokio::sync::oneshot::channel::<(&'static str, SocketAddr)>();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let prefix = format!("twofold {} listening on ", self.plane);
        let tag = format!("{}#{}", self.plane, self.launches);
        self.readers.push(reader(
            stdout,
            format!("[{tag} out]"),
            self.log.clone(),
            Some((prefix, tx)),
        ));
        self.readers.push(reader(
            stderr,
            format!("[{tag} err]"),
            self.log.clone(),
            None,
        ));
        self.child = Some(child);
        match tokio::time::timeout(START_WAIT, rx).await {
            Ok(Ok(announced)) => Ok(announced),
            Ok(Err(_)) => {
                self.kill();
                let busy = format!("[{tag} err]");
                let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
                if log
                    .iter()
                    .any(|l| l.starts_with(&busy) && l.contains("cannot listen"))
                {
                    Err(Failure::PortBusy)
                } else {
                    Err(Failure::Exited)
                }
            }
            Err(_) => {
                self.kill();
                Err(Failure::Silent)
            }
        }
    }
}

/// Why a start failed.
#[derive(Debug)]
enum Failure {
    Spawn(String),
    /// The process could not bind its port.
    PortBusy,
    /// It exited before saying where it listens.
    Exited,
    /// No listening line within [`START_WAIT`].
    Silent,
}

/// `http://ADDR` or `https://ADDR` as (scheme, address).
fn parse_announced(url: &str) -> Option<(&'static str, SocketAddr)> {
    let (scheme, addr) = if let Some(addr) = url.strip_prefix("https://") {
        ("https", addr)
    } else {
        ("http", url.strip_prefix("http://")?)
    };
    Some((scheme, addr.trim().parse().ok()?))
}

/// Drain `stream` line by line into `log` until EOF; if `announce` is given,
/// send the scheme and address of the first line starting with its prefix.
fn reader(
    stream: impl Read + Send + 'static,
    tag: String,
    log: Log,
    announce: Option<(
        String,
        tokio::sync::oneshot::Sender<(&'static str, SocketAddr)>,
    )>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut announce = announce;
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if let Some((prefix, _)) = &announce
                && let Some(url) = line.strip_prefix(prefix.as_str())
                && let Some(announced) = parse_announced(url)
                && let Some((_, tx)) = announce.take()
            {
                let _ = tx.send(announced);
            }
            push_log(&log, format!("{tag} {line}"));
        }
    })
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() && self.starts > 0 {
            eprintln!(
                "----- last output of the {} process -----\n{}\n-----",
                self.plane,
                self.logs()
            );
        }
    }
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

/// An HTTP client for the tests: no connection pooling, so a restarted server
/// never meets a stale connection, and a timeout on every request.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .pool_max_idle_per_host(0)
        .build()
        .expect("HTTP client")
}

/// An answer: status, headers and body text.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub text: String,
}

impl Reply {
    /// The body as JSON (`Null` for an empty body); panics if it is not JSON.
    pub fn json(&self) -> Value {
        if self.text.is_empty() {
            return Value::Null;
        }
        serde_json::from_str(&self.text).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {}",
                self.status, self.text
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Status and JSON body.
    pub fn pair(&self) -> (StatusCode, Value) {
        (self.status, self.json())
    }
}

/// Send a request and read the whole answer.
pub async fn send(builder: reqwest::RequestBuilder) -> Reply {
    let response = builder.send().await.expect("request sent");
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().await.expect("response body");
    Reply {
        status,
        headers,
        text,
    }
}

/// Send a request; `None` if it could not be sent or read (server down).
pub async fn try_send(builder: reqwest::RequestBuilder) -> Option<Reply> {
    let response = builder.send().await.ok()?;
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().await.ok()?;
    Some(Reply {
        status,
        headers,
        text,
    })
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

/// The answer of a verification that matched `kind` (`totp` or `backup`).
pub fn valid(kind: &str, factor_id: &str) -> Value {
    json!({ "valid": true, "factor": kind, "factor_id": factor_id })
}

/// The answer of a verification that did not match, whatever the reason.
pub fn invalid() -> Value {
    json!({ "valid": false })
}

/// Check an error answer: its status, and a body that is exactly
/// `{"error":{"code":CODE,"message":"..."}}` with a non-empty message.
#[track_caller]
pub fn assert_error(reply: &Reply, status: StatusCode, code: &str) {
    assert_eq!(reply.status, status, "{}", reply.text);
    assert_eq!(
        reply.header("content-type"),
        Some("application/json"),
        "{}",
        reply.text
    );
    let body = reply.json();
    assert_error_shape(&body);
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

// ---------------------------------------------------------------------------
// TOTP, computed apart from the code under test
// ---------------------------------------------------------------------------

/// RFC 6238 TOTP, written directly on HMAC (RFC 2104) and dynamic truncation
/// (RFC 4226 §5.3).
pub fn totp_at_step(secret: &[u8], algorithm: &str, digits: u32, step: u64) -> String {
    let counter = step.to_be_bytes();
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
    let mut mac = <M as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(message);
    mac.finalize().into_bytes().to_vec()
}

/// An enrolled TOTP factor, as the test's authenticator app: it remembers the
/// last step it gave a code for, so it never hands out a code twice.
#[derive(Debug)]
pub struct Totp {
    pub id: String,
    pub user: String,
    secret: Vec<u8>,
    pub algorithm: String,
    pub digits: u32,
    pub period: u64,
    last_step: Mutex<Option<u64>>,
}

impl Totp {
    /// From an enrolment answer (`POST /v1/users/{user}/totp`).
    pub fn from_enrolment(user: &str, body: &Value) -> Totp {
        let base32 = body["secret"].as_str().expect("secret");
        Totp {
            id: body["factor_id"].as_str().expect("factor id").to_owned(),
            user: user.to_owned(),
            secret: data_encoding::BASE32_NOPAD
                .decode(base32.trim_end_matches('=').as_bytes())
                .expect("base32 secret"),
            algorithm: body["algorithm"].as_str().expect("algorithm").to_owned(),
            digits: u32::try_from(body["digits"].as_u64().expect("digits")).expect("digits"),
            period: body["period"].as_u64().expect("period"),
            last_step: Mutex::new(None),
        }
    }

    /// The last step this app gave a code for, if any.
    pub fn last_used_step(&self) -> Option<u64> {
        *self.last_step.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn now_step(&self) -> u64 {
        unix_now() / self.period
    }

    pub fn code_at_step(&self, step: u64) -> String {
        totp_at_step(&self.secret, &self.algorithm, self.digits, step)
    }

    /// The step [`fresh_code`] would use now, if it need not wait.
    ///
    /// [`fresh_code`]: Totp::fresh_code
    fn next_step(&self, last: Option<u64>) -> Option<u64> {
        let now = self.now_step();
        let step = last.map_or(now, |used| now.max(used + 1));
        (step <= now + 1).then_some(step)
    }

    /// A code never given before: the current step's, or the next one's (within
    /// the ±1 step the servers accept) when the current one was already used.
    /// Waits for the clock only if both were used.
    pub async fn fresh_code(&self) -> String {
        let within = Duration::from_secs(self.period) + WAIT;
        let step = wait_for("a TOTP step not used yet", within, || async {
            let mut last = self.last_step.lock().unwrap_or_else(|p| p.into_inner());
            let step = self.next_step(*last)?;
            *last = Some(step);
            Some(step)
        })
        .await;
        self.code_at_step(step)
    }

    /// The code [`fresh_code`] would give now, without using it up: a right code
    /// for a check that must fail for another reason.
    ///
    /// [`fresh_code`]: Totp::fresh_code
    pub fn peek_code(&self) -> String {
        let last = *self.last_step.lock().unwrap_or_else(|p| p.into_inner());
        let step = self.next_step(last).unwrap_or_else(|| self.now_step() + 1);
        self.code_at_step(step)
    }

    /// A well-formed code that matches no step near now.
    pub fn wrong_code(&self) -> String {
        let now = self.now_step();
        let near: Vec<String> = (now.saturating_sub(3)..=now + 3)
            .map(|step| self.code_at_step(step))
            .collect();
        (0u32..)
            .map(|n| format!("{n:0width$}", width = self.digits as usize))
            .find(|code| !near.contains(code))
            .expect("some code differs")
    }
}

// ---------------------------------------------------------------------------
// The control plane's API
// ---------------------------------------------------------------------------

/// A key just created: its id and its secret.
#[derive(Debug, Clone)]
pub struct Key {
    pub id: String,
    pub secret: String,
}

/// A tenant with a `manage` key and a `verify` key.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub id: String,
    pub manage: Key,
    pub verify: Key,
}

/// A user's set of backup codes.
#[derive(Debug, Clone)]
pub struct BackupCodes {
    pub set_id: String,
    pub codes: Vec<String>,
}

/// The control plane's HTTP API at a fixed base URL. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Api {
    pub base: String,
    pub client: reqwest::Client,
}

impl Api {
    pub fn new(base: String) -> Api {
        Api {
            base,
            client: client(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

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

    /// Send a request with an optional JSON body.
    pub async fn reply(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Reply {
        let mut builder = self.request(method, path, token);
        if let Some(body) = body {
            builder = builder.json(body);
        }
        send(builder).await
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> (StatusCode, Value) {
        self.reply(method, path, token, body).await.pair()
    }

    pub async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, Some(token), None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: &Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(token), Some(body)).await
    }

    pub async fn delete(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.call(Method::DELETE, path, Some(token), None).await
    }

    /// Call and insist on `expected`; returns the body.
    #[track_caller]
    fn expect_status(what: &str, got: (StatusCode, Value), expected: StatusCode) -> Value {
        let (status, body) = got;
        assert_eq!(status, expected, "{what}: {body}");
        body
    }

    pub async fn create_tenant(&self, name: &str) -> String {
        let got = self
            .post("/v1/tenants", OPERATOR, &json!({ "name": name }))
            .await;
        let body = Api::expect_status("create tenant", got, StatusCode::CREATED);
        body["id"].as_str().expect("tenant id").to_owned()
    }

    pub async fn create_key(&self, tenant: &str, scopes: &[&str]) -> Key {
        let got = self
            .post(
                &format!("/v1/tenants/{tenant}/keys"),
                OPERATOR,
                &json!({ "name": "test key", "scopes": scopes }),
            )
            .await;
        let body = Api::expect_status("create key", got, StatusCode::CREATED);
        Key {
            id: body["id"].as_str().expect("key id").to_owned(),
            secret: body["secret"].as_str().expect("key secret").to_owned(),
        }
    }

    /// A node key (scope `replicate`) for data planes.
    pub async fn create_node_key(&self) -> Key {
        let got = self
            .post("/v1/node-keys", OPERATOR, &json!({ "name": "node" }))
            .await;
        let body = Api::expect_status("create node key", got, StatusCode::CREATED);
        Key {
            id: body["id"].as_str().expect("key id").to_owned(),
            secret: body["secret"].as_str().expect("key secret").to_owned(),
        }
    }

    /// A new tenant with a `manage` and a `verify` key.
    pub async fn tenant(&self, name: &str) -> Tenant {
        let id = self.create_tenant(name).await;
        let manage = self.create_key(&id, &["manage"]).await;
        let verify = self.create_key(&id, &["verify"]).await;
        Tenant { id, manage, verify }
    }

    /// Revoke a tenant's key.
    pub async fn revoke_key(&self, tenant: &str, key: &str) {
        let got = self
            .delete(&format!("/v1/tenants/{tenant}/keys/{key}"), OPERATOR)
            .await;
        Api::expect_status("revoke key", got, StatusCode::NO_CONTENT);
    }

    /// Enrol a default TOTP factor (pending until activated).
    pub async fn enroll(&self, manage: &str, user: &str) -> Totp {
        self.enroll_with(manage, user, json!({})).await
    }

    /// Enrol a TOTP factor with these settings (`algorithm`, `digits`, ...).
    pub async fn enroll_with(&self, manage: &str, user: &str, settings: Value) -> Totp {
        let mut body = settings;
        body["qr"] = json!("none");
        let got = self
            .post(&format!("/v1/users/{}/totp", enc(user)), manage, &body)
            .await;
        let body = Api::expect_status("enrol", got, StatusCode::CREATED);
        Totp::from_enrolment(user, &body)
    }

    /// Activate a pending factor with a fresh code.
    pub async fn activate(&self, manage: &str, factor: &Totp) {
        let code = factor.fresh_code().await;
        let got = self
            .post(
                &format!(
                    "/v1/users/{}/totp/{}/activate",
                    enc(&factor.user),
                    factor.id
                ),
                manage,
                &json!({ "code": code }),
            )
            .await;
        let body = Api::expect_status("activate", got, StatusCode::OK);
        assert_eq!(body["status"], "active", "{body}");
    }

    /// Enrol and activate a default TOTP factor.
    pub async fn active_factor(&self, manage: &str, user: &str) -> Totp {
        let factor = self.enroll(manage, user).await;
        self.activate(manage, &factor).await;
        factor
    }

    /// A new set of backup codes, replacing any earlier one.
    pub async fn backup_codes(&self, manage: &str, user: &str) -> BackupCodes {
        let got = self
            .call(
                Method::POST,
                &format!("/v1/users/{}/backup-codes", enc(user)),
                Some(manage),
                None,
            )
            .await;
        let body = Api::expect_status("backup codes", got, StatusCode::CREATED);
        BackupCodes {
            set_id: body["set_id"].as_str().expect("set id").to_owned(),
            codes: body["codes"]
                .as_array()
                .expect("codes")
                .iter()
                .map(|c| c.as_str().expect("code").to_owned())
                .collect(),
        }
    }

    pub async fn delete_factor(&self, manage: &str, user: &str, factor: &str) {
        let got = self
            .delete(&format!("/v1/users/{}/factors/{factor}", enc(user)), manage)
            .await;
        Api::expect_status("delete factor", got, StatusCode::NO_CONTENT);
    }

    pub async fn delete_user(&self, manage: &str, user: &str) {
        let got = self
            .delete(&format!("/v1/users/{}", enc(user)), manage)
            .await;
        Api::expect_status("delete user", got, StatusCode::NO_CONTENT);
    }

    pub async fn unlock(&self, manage: &str, user: &str) {
        let got = self
            .call(
                Method::POST,
                &format!("/v1/users/{}/unlock", enc(user)),
                Some(manage),
                None,
            )
            .await;
        Api::expect_status("unlock", got, StatusCode::NO_CONTENT);
    }

    /// `GET /v1/users/{user}/factors`: factors, backup summary, lock state.
    pub async fn user_factors(&self, manage: &str, user: &str) -> Value {
        let got = self
            .get(&format!("/v1/users/{}/factors", enc(user)), manage)
            .await;
        Api::expect_status("list factors", got, StatusCode::OK)
    }

    /// The log's head seq, from `/readyz`.
    pub async fn head(&self) -> u64 {
        let (status, body) = self.call(Method::GET, "/readyz", None, None).await;
        assert_eq!(status, StatusCode::OK, "control /readyz: {body}");
        body["head_seq"].as_u64().expect("head_seq")
    }

    /// The status of `GET /v1/feed/changes?after=AFTER` (the stream itself is
    /// dropped unread): 410 once compaction has passed `after`.
    pub async fn changes_status(&self, after: u64) -> StatusCode {
        self.request(
            Method::GET,
            &format!("/v1/feed/changes?after={after}"),
            Some(OPERATOR),
        )
        .send()
        .await
        .expect("changes request")
        .status()
    }

    /// `GET /v1/feed/digest` with `token` (a node key or the operator).
    pub async fn feed_digest(&self, token: &str) -> Value {
        let got = self.get("/v1/feed/digest", token).await;
        Api::expect_status("feed digest", got, StatusCode::OK)
    }
}

// ---------------------------------------------------------------------------
// Planes
// ---------------------------------------------------------------------------

/// A running `twofold control` with its own data directory. Keeps its port
/// across restarts.
pub struct ControlPlane {
    // Declared first so the process dies before its directory is removed.
    pub process: Process,
    pub api: Api,
    master_key: String,
    dir: TempDir,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("process", &self.process)
            .finish()
    }
}

impl std::ops::Deref for ControlPlane {
    type Target = Api;

    fn deref(&self) -> &Api {
        &self.api
    }
}

impl ControlPlane {
    /// A control plane with a new master key and an empty database.
    pub async fn start() -> ControlPlane {
        ControlPlane::start_with(new_master_key(), Vec::new()).await
    }

    /// A control plane with this master key and extra arguments.
    pub async fn start_with(master_key: String, extra_args: Vec<String>) -> ControlPlane {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut args = vec!["--data-dir".to_owned(), dir.path().display().to_string()];
        args.extend(extra_args);
        let envs = vec![
            ("TWOFOLD_MASTER_KEY".to_owned(), master_key.clone()),
            ("TWOFOLD_OPERATOR_TOKEN".to_owned(), OPERATOR.to_owned()),
        ];
        let process = Process::start("control", args, envs, Port::Pick).await;
        let api = Api::new(process.base());
        ControlPlane {
            process,
            api,
            master_key,
            dir,
        }
    }

    pub fn master_key(&self) -> &str {
        &self.master_key
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The base URL, stable across restarts.
    pub fn base(&self) -> &str {
        &self.api.base
    }

    pub fn kill(&mut self) {
        self.process.kill();
    }

    pub async fn terminate(&mut self) -> ExitStatus {
        self.process.terminate().await
    }

    /// Start again on the same port, with the same database.
    pub async fn restart(&mut self) {
        self.process.restart().await;
        assert_eq!(
            self.process.base(),
            self.api.base,
            "a control plane keeps its port"
        );
    }

    /// A data plane of this control plane, started with `node_token`.
    pub async fn data_plane(&self, node_token: &str) -> DataPlane {
        DataPlane::start(DataOptions::new(self, node_token)).await
    }
}

/// How to start a data plane.
#[derive(Debug, Clone)]
pub struct DataOptions {
    pub control_urls: Vec<String>,
    pub node_token: String,
    pub master_key: String,
    pub port: Port,
    pub extra_args: Vec<String>,
}

impl DataOptions {
    /// Replicating from `control` with `node_token`, on a new port each start.
    pub fn new(control: &ControlPlane, node_token: &str) -> DataOptions {
        DataOptions {
            control_urls: vec![control.base().to_owned()],
            node_token: node_token.to_owned(),
            master_key: control.master_key().to_owned(),
            port: Port::Any,
            extra_args: Vec::new(),
        }
    }
}

/// A running `twofold data` with its own data directory.
pub struct DataPlane {
    // Declared first so the process dies before its directory is removed.
    pub process: Process,
    pub client: reqwest::Client,
    dir: TempDir,
}

impl std::fmt::Debug for DataPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPlane")
            .field("process", &self.process)
            .finish()
    }
}

impl DataPlane {
    /// Start a data plane; it is not necessarily ready yet (see [`wait_ready`]).
    ///
    /// [`wait_ready`]: DataPlane::wait_ready
    pub async fn start(options: DataOptions) -> DataPlane {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut args = vec![
            "--data-dir".to_owned(),
            dir.path().display().to_string(),
            "--node-token".to_owned(),
            options.node_token.clone(),
        ];
        for url in &options.control_urls {
            args.push("--control-url".to_owned());
            args.push(url.clone());
        }
        args.extend(options.extra_args.iter().cloned());
        let envs = vec![("TWOFOLD_MASTER_KEY".to_owned(), options.master_key.clone())];
        let process = Process::start("data", args, envs, options.port).await;
        DataPlane {
            process,
            client: client(),
            dir,
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The base URL of the current run (a restart may change the port).
    pub fn base(&self) -> String {
        self.process.base()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base())
    }

    pub fn kill(&mut self) {
        self.process.kill();
    }

    pub async fn terminate(&mut self) -> ExitStatus {
        self.process.terminate().await
    }

    pub async fn restart(&mut self) {
        self.process.restart().await;
    }

    pub async fn get(&self, path: &str) -> Reply {
        send(self.client.get(self.url(path))).await
    }

    /// `POST /v1/verify` exactly as given: optional bearer token and content type,
    /// and raw body bytes.
    pub async fn post_verify(
        &self,
        token: Option<&str>,
        content_type: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> Reply {
        let mut builder = self.client.post(self.url("/v1/verify")).body(body);
        if let Some(token) = token {
            builder = builder.bearer_auth(token);
        }
        if let Some(content_type) = content_type {
            builder = builder.header("content-type", content_type);
        }
        send(builder).await
    }

    /// `POST /v1/verify` with `{"user","code"}`.
    pub async fn verify_reply(&self, key: &str, user: &str, code: &str) -> Reply {
        let body = serde_json::to_vec(&json!({ "user": user, "code": code })).expect("json");
        self.post_verify(Some(key), Some("application/json"), body)
            .await
    }

    pub async fn verify(&self, key: &str, user: &str, code: &str) -> (StatusCode, Value) {
        self.verify_reply(key, user, code).await.pair()
    }

    /// The Prometheus text, or `None` if the node does not answer.
    pub async fn metrics(&self) -> Option<String> {
        let reply = try_send(self.client.get(self.url("/metrics"))).await?;
        (reply.status == StatusCode::OK).then_some(reply.text)
    }

    /// One unlabelled metric's value.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let text = self.metrics().await?;
        text.lines().find_map(|line| {
            let (metric, value) = line.split_once(' ')?;
            (metric == name).then(|| value.trim().parse().ok())?
        })
    }

    /// `twofold_data_bootstraps`: snapshots loaded since the process started.
    pub async fn bootstraps(&self) -> Option<u64> {
        self.metric("twofold_data_bootstraps")
            .await
            .map(|v| v as u64)
    }

    /// `twofold_data_resumes`: change streams opened since the process started.
    pub async fn resumes(&self) -> Option<u64> {
        self.metric("twofold_data_resumes").await.map(|v| v as u64)
    }

    /// `twofold_data_applied_seq`.
    pub async fn applied_seq(&self) -> Option<u64> {
        self.metric("twofold_data_applied_seq")
            .await
            .map(|v| v as u64)
    }

    /// The `/readyz` status, or `None` if the node does not answer.
    pub async fn readyz(&self) -> Option<StatusCode> {
        try_send(self.client.get(self.url("/readyz")))
            .await
            .map(|r| r.status)
    }

    /// Wait until `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        wait_for("the data plane to be ready", WAIT, || async {
            (self.readyz().await == Some(StatusCode::OK)).then_some(())
        })
        .await;
    }

    /// Wait until the replica has applied `seq`.
    pub async fn wait_applied(&self, seq: u64) {
        wait_for(
            &format!("the data plane to apply seq {seq}"),
            WAIT,
            || async {
                self.applied_seq()
                    .await
                    .is_some_and(|a| a >= seq)
                    .then_some(())
            },
        )
        .await;
    }

    /// Wait until the replica has applied the control plane's head as of now.
    pub async fn wait_synced(&self, control: &Api) -> u64 {
        let head = control.head().await;
        self.wait_applied(head).await;
        head
    }

    /// Wait until every usage event of this node is acknowledged by the control
    /// plane (`twofold_data_outbox_depth` is 0).
    pub async fn wait_reported(&self) {
        wait_for("the data plane's usage to be reported", WAIT, || async {
            self.metric("twofold_data_outbox_depth")
                .await
                .is_some_and(|depth| depth == 0.0)
                .then_some(())
        })
        .await;
    }

    /// `GET /v1/replica/digest`, if it answers 200.
    pub async fn replica_digest_raw(&self) -> Option<Value> {
        let reply = try_send(self.client.get(self.url("/v1/replica/digest"))).await?;
        (reply.status == StatusCode::OK).then(|| reply.json())
    }

    /// `GET /v1/replica/digest`.
    pub async fn replica_digest(&self) -> Value {
        let reply = self.get("/v1/replica/digest").await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        reply.json()
    }
}

/// The usual set-up: a control plane, a tenant, a node key, and one data plane
/// that has loaded its first snapshot.
pub struct Cluster {
    // Data planes first: they go down before the control plane they follow.
    pub data: DataPlane,
    pub node_key: Key,
    pub tenant: Tenant,
    pub control: ControlPlane,
}

impl Cluster {
    pub async fn start() -> Cluster {
        let control = ControlPlane::start().await;
        let tenant = control.tenant("acme").await;
        let node_key = control.create_node_key().await;
        let data = control.data_plane(&node_key.secret).await;
        data.wait_ready().await;
        Cluster {
            data,
            node_key,
            tenant,
            control,
        }
    }

    /// Another data plane of the same control plane, ready.
    pub async fn another_data_plane(&self) -> DataPlane {
        let data = self.control.data_plane(&self.node_key.secret).await;
        data.wait_ready().await;
        data
    }

    /// Wait until the data plane has every change made so far.
    pub async fn sync(&self) {
        self.data.wait_synced(&self.control.api).await;
    }

    pub fn manage(&self) -> &str {
        &self.tenant.manage.secret
    }

    pub fn verify_key(&self) -> &str {
        &self.tenant.verify.secret
    }
}

// ---------------------------------------------------------------------------
// Bulk set-up and state checks
// ---------------------------------------------------------------------------

/// Give each of `users` a set of backup codes, `parallel` requests at a time;
/// the sets come back in the users' order.
pub async fn backup_codes_for(
    api: &Api,
    manage: &str,
    users: Vec<String>,
    parallel: usize,
) -> Vec<BackupCodes> {
    let (api, manage) = (api.clone(), manage.to_owned());
    in_parallel(users, parallel, move |user| {
        let (api, manage) = (api.clone(), manage.clone());
        async move { api.backup_codes(&manage, &user).await }
    })
    .await
}

/// Enrol and activate a TOTP factor for each of `users`, `parallel` users at a
/// time; the factors come back in the users' order.
pub async fn active_factors_for(
    api: &Api,
    manage: &str,
    users: Vec<String>,
    parallel: usize,
) -> Vec<Totp> {
    let (api, manage) = (api.clone(), manage.to_owned());
    in_parallel(users, parallel, move |user| {
        let (api, manage) = (api.clone(), manage.clone());
        async move { api.active_factor(&manage, &user).await }
    })
    .await
}

/// Wait until the node serves the control plane's current seq (possibly lower
/// than before, after a new log), and compare the states at that seq. The
/// control plane may still be merging the node's usage, so the seq is read
/// again until the node has caught up with it.
pub async fn assert_same_state(data: &DataPlane, control: &ControlPlane, node_token: &str) {
    data.wait_ready().await;
    let (expected, got) = wait_for(
        "the node to serve the control plane's seq",
        WAIT,
        || async {
            let expected = control.feed_digest(node_token).await;
            let seq = expected["seq"].as_u64().expect("seq");
            // The applied seq moves once the in-memory index is swapped too, after
            // the replica file.
            if data.applied_seq().await != Some(seq) {
                return None;
            }
            let got = data.replica_digest().await;
            (got["seq"] == expected["seq"]).then_some((expected, got))
        },
    )
    .await;
    assert_eq!(
        got, expected,
        "the replica matches the control plane at seq {}",
        expected["seq"]
    );
}
