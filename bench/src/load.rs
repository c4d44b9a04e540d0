//! The load generator for `POST /v1/verify`: one keep-alive HTTP/1.1
//! connection per worker, latencies in an HDR histogram.
//!
//! - *Closed loop* (`concurrency` workers): each worker sends its next request
//!   as soon as the previous one is answered; throughput is what the server
//!   sustains, latency is per request.
//! - *Open loop* (`rate`): request `k` is due at `start + k / rate`, whatever
//!   happened before, over up to `connections` connections. When every
//!   connection is busy a due request waits, and its latency is counted from when
//!   it was due (no coordinated omission). When a connection is free early it
//!   waits until the request is due and counts from when it is sent. tokio's
//!   timer has a 1 ms resolution, so where the load generator has cores of its
//!   own the wait ends by yielding until the due instant ([`pace_until`]): with
//!   the timer alone, every request due in the same millisecond went out at
//!   once, a burst of `rate / 1000` requests queueing in the server (the bare
//!   endpoint's p50 at 33k req/s: 0.23 ms that way, 0.03–0.04 ms paced). A
//!   wait that ends more than 1 ms late counts as `started late`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hyper::header::HeaderValue;
use hyper::{Method, StatusCode};

use crate::http::{Conn, Reply};
use crate::stats::{Latency, Tally};
use crate::totp;
use crate::users::Users;

/// What each request asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// The bare endpoint: a constant body.
    Ceiling,
    /// A wrong code for an existing user.
    Reject,
    /// The current code of a user not yet accepted in this step.
    Accept,
}

impl Path {
    pub fn name(self) -> &'static str {
        match self {
            Path::Ceiling => "ceiling",
            Path::Reject => "reject",
            Path::Accept => "accept",
        }
    }

    /// The outcome every request should have.
    pub fn expected(self) -> &'static str {
        match self {
            Path::Ceiling | Path::Reject => "200 invalid",
            Path::Accept => "200 valid",
        }
    }
}

/// How requests are paced.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    Closed { concurrency: usize },
    Open { rate: f64, connections: usize },
}

impl Mode {
    fn connections(self) -> usize {
        match self {
            Mode::Closed { concurrency } => concurrency,
            Mode::Open { connections, .. } => connections,
        }
        .max(1)
    }
}

/// Where requests go and as whom.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub auth: HeaderValue,
    pub users: Arc<Users>,
}

/// One run.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    pub path: Path,
    pub mode: Mode,
    /// Sent but not counted, before the measured part.
    pub warmup: Duration,
    pub duration: Duration,
    /// Open loop: end each wait by yielding until the due instant
    /// ([`pace_until`]). Only for a load generator on cores of its own: it
    /// spins meanwhile.
    pub spin: bool,
}

/// What a run measured.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub latency: Latency,
    pub tally: Tally,
    /// The measured span: the duration, or less if users ran out.
    pub elapsed: Duration,
    /// Users ran out (reject budget or accept step) before the end.
    pub exhausted: bool,
    /// Open loop: requests that could not start when due (all connections busy).
    pub late: u64,
}

impl Outcome {
    /// Answers per second, whatever they were.
    pub fn rps(&self) -> f64 {
        self.tally.total() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// State every worker of a run shares.
#[derive(Debug)]
struct Shared {
    target: Target,
    run: Run,
    measure_from: Instant,
    deadline: Instant,
    stop: AtomicBool,
    /// When users ran out, as nanoseconds after `measure_from`.
    exhausted_at: AtomicU64,
    /// Open loop: the next request's index.
    next: AtomicU64,
}

/// Run `run` against `target` and gather what every worker measured.
pub async fn run(target: &Target, run: Run) -> anyhow::Result<Outcome> {
    let step = totp::step_at(unix_now());
    let users = target.users.clone();
    tokio::task::spawn_blocking(move || users.prepare(step)).await?;
    let mut conns = Vec::new();
    for _ in 0..run.mode.connections() {
        let mut conn = Conn::new(target.addr);
        conn.connect().await?;
        conns.push(conn);
    }
    let start = Instant::now();
    let shared = Arc::new(Shared {
        target: target.clone(),
        run,
        measure_from: start + run.warmup,
        deadline: start + run.warmup + run.duration,
        stop: AtomicBool::new(false),
        exhausted_at: AtomicU64::new(u64::MAX),
        next: AtomicU64::new(0),
    });
    let workers: Vec<_> = conns
        .into_iter()
        .map(|conn| tokio::spawn(worker(shared.clone(), conn, start)))
        .collect();
    let mut outcome = Outcome::default();
    for w in workers {
        let (latency, tally, late) = w.await?;
        outcome.latency.merge(&latency);
        outcome.tally.merge(&tally);
        outcome.late += late;
    }
    let exhausted_at = shared.exhausted_at.load(Ordering::SeqCst);
    outcome.exhausted = exhausted_at != u64::MAX;
    outcome.elapsed = if outcome.exhausted {
        Duration::from_nanos(exhausted_at).min(run.duration)
    } else {
        run.duration
    };
    Ok(outcome)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The body of the next request and the user it is for, or `None` when users
/// ran out.
fn next_request(target: &Target, path: Path) -> Option<(Bytes, Option<usize>)> {
    let users = &target.users;
    let job = match path {
        Path::Ceiling => return Some((Bytes::from_static(CEILING_BODY), None)),
        Path::Reject => users.next_reject(totp::step_at(unix_now()))?,
        Path::Accept => users.next_accept(totp::step_at(unix_now()))?,
    };
    let (i, code) = job;
    let body = format!(
        r#"{{"user":"{}","code":"{}"}}"#,
        users.name(i),
        totp::format(code)
    );
    Some((Bytes::from(body), Some(i)))
}

/// The ceiling gets a request of the same shape and size as a reject.
const CEILING_BODY: &[u8] = br#"{"user":"u0000000","code":"000000"}"#;

/// Name an answer: `200 valid`, `200 invalid`, another status, or `io error`.
fn classify(result: &anyhow::Result<Reply>) -> &'static str {
    match result {
        Ok(reply) if reply.status == StatusCode::OK => {
            let valid = reply.body.windows(12).any(|w| w == br#""valid":true"#);
            if valid { "200 valid" } else { "200 invalid" }
        }
        Ok(reply) => match reply.status.as_u16() {
            400 => "400",
            401 => "401",
            429 => "429",
            500 => "500",
            503 => "503",
            _ => "other status",
        },
        Err(_) => "io error",
    }
}

async fn worker(shared: Arc<Shared>, mut conn: Conn, start: Instant) -> (Latency, Tally, u64) {
    let mut latency = Latency::default();
    let mut tally = Tally::default();
    let mut late = 0u64;
    let run = shared.run;
    let interval = match run.mode {
        Mode::Open { rate, .. } => Some(Duration::from_secs_f64(1.0 / rate.max(1e-3))),
        Mode::Closed { .. } => None,
    };
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        // When this request counts from, and whether it counts at all.
        let begin = match interval {
            None => {
                let now = Instant::now();
                if now >= shared.deadline {
                    break;
                }
                now
            }
            Some(interval) => {
                let k = shared.next.fetch_add(1, Ordering::Relaxed);
                let due = start + interval.mul_f64(k as f64);
                if due >= shared.deadline {
                    break;
                }
                // A connection free early waits for the due instant and counts
                // from when it sends; one free late counts from the due instant.
                let early = due > Instant::now();
                if early && run.spin {
                    pace_until(due).await;
                } else if early {
                    tokio::time::sleep_until(due.into()).await;
                }
                let now = Instant::now();
                // Started this late (for the timer, beyond its own rounding up
                // to its next tick), a request either found no connection free
                // or the load generator's core was taken: counted either way.
                let slack = Duration::from_millis(if early && !run.spin { 2 } else { 1 });
                if now - due > slack && due >= shared.measure_from {
                    late += 1;
                }
                if early { now } else { due }
            }
        };
        let Some((body, user)) = next_request(&shared.target, run.path) else {
            let at = Instant::now().saturating_duration_since(shared.measure_from);
            shared
                .exhausted_at
                .fetch_min(at.as_nanos() as u64, Ordering::SeqCst);
            shared.stop.store(true, Ordering::Relaxed);
            break;
        };
        let result = conn
            .send(
                Method::POST,
                "/v1/verify",
                Some(&shared.target.auth),
                Some(body),
            )
            .await;
        let end = Instant::now();
        let outcome = classify(&result);
        if let (Path::Accept, Some(i)) = (run.path, user) {
            match outcome {
                "200 valid" => shared.target.users.accepted(i),
                "200 invalid" => shared.target.users.refused(i),
                _ => {}
            }
        }
        if begin >= shared.measure_from {
            latency.record(end - begin);
            tally.add(outcome);
        }
        if result.is_err() {
            // Do not spin on a dead server.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    (latency, tally, late)
}

/// Wait until `due`, to within the time one round of the runtime's tasks
/// takes: the timer to within its resolution, then yield until `due`. The
/// load generator's core spins meanwhile, which is what it is pinned to a core
/// of its own for.
async fn pace_until(due: Instant) {
    const TIMER_RESOLUTION: Duration = Duration::from_millis(1);
    if let Some(early) = due.checked_sub(TIMER_RESOLUTION)
        && early > Instant::now()
    {
        tokio::time::sleep_until(early.into()).await;
    }
    while Instant::now() < due {
        tokio::task::yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_named_by_status_and_validity() {
        let reply = |status: u16, body: &'static str| {
            Ok(Reply {
                status: StatusCode::from_u16(status).unwrap(),
                body: Bytes::from_static(body.as_bytes()),
            })
        };
        assert_eq!(classify(&reply(200, r#"{"valid":false}"#)), "200 invalid");
        assert_eq!(
            classify(&reply(200, r#"{"valid":true,"factor":"totp"}"#)),
            "200 valid"
        );
        assert_eq!(classify(&reply(429, "{}")), "429");
        assert_eq!(classify(&Err(anyhow::anyhow!("reset"))), "io error");
    }
}
