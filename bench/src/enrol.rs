//! Enrolling users through the control plane's API, as a tenant backend does:
//! `POST /v1/users/{user}/totp` (no QR code), then activation with the current
//! code, computed here from the secret it returned.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use hyper::StatusCode;
use hyper::header::HeaderValue;
use serde::Deserialize;
use serde_json::json;

use crate::http::Conn;
use crate::stats::{Latency, Tally};
use crate::totp;

/// An active factor: its secret and the step its activation used.
#[derive(Debug, Clone, Copy)]
pub struct Enrolled {
    pub secret: [u8; 20],
    pub step: u64,
}

#[derive(Deserialize)]
struct Pending {
    factor_id: String,
    secret: String,
}

/// Enrol `user` and activate the factor. Returns the factor and how long each
/// of the two requests took.
pub async fn enrol(
    conn: &mut Conn,
    auth: &HeaderValue,
    user: &str,
) -> anyhow::Result<(Enrolled, Duration, Duration)> {
    let started = Instant::now();
    let pending: Pending = conn
        .post(
            &format!("/v1/users/{user}/totp"),
            Some(auth),
            &json!({"qr": "none"}),
        )
        .await?
        .json(StatusCode::CREATED)?;
    let enrolled = started.elapsed();
    let bytes = data_encoding::BASE32_NOPAD
        .decode(pending.secret.trim_end_matches('=').as_bytes())
        .context("the secret is not base32")?;
    let secret: [u8; 20] = bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("expected a 20-byte SHA-1 secret"))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let step = totp::step_at(now);
    let started = Instant::now();
    conn.post(
        &format!("/v1/users/{user}/totp/{}/activate", pending.factor_id),
        Some(auth),
        &json!({"code": totp::format(totp::code(&secret, step))}),
    )
    .await?
    .json::<serde_json::Value>(StatusCode::OK)
    .with_context(|| format!("activating {user}"))?;
    Ok((Enrolled { secret, step }, enrolled, started.elapsed()))
}

/// What a batch of enrolments measured.
#[derive(Debug, Default)]
pub struct Batch {
    /// By index, for every user enrolled.
    pub enrolled: Vec<Option<Enrolled>>,
    pub enrol_latency: Latency,
    pub activate_latency: Latency,
    pub errors: Tally,
    pub elapsed: Duration,
}

impl Batch {
    pub fn done(&self) -> usize {
        self.enrolled.iter().filter(|e| e.is_some()).count()
    }
}

/// Enrol users `name(0..count)` with `concurrency` connections, stopping at
/// `deadline` if it comes first.
pub async fn enrol_many(
    addr: std::net::SocketAddr,
    auth: &HeaderValue,
    count: usize,
    concurrency: usize,
    deadline: Option<Instant>,
    name: Arc<dyn Fn(usize) -> String + Send + Sync>,
) -> anyhow::Result<Batch> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (next, auth, name) = (next.clone(), auth.clone(), name.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::new(addr);
            let mut batch = Batch::default();
            let mut mine = Vec::new();
            loop {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    break;
                }
                match enrol(&mut conn, &auth, &name(i)).await {
                    Ok((enrolled, enrol, activate)) => {
                        batch.enrol_latency.record(enrol);
                        batch.activate_latency.record(activate);
                        mine.push((i, enrolled));
                    }
                    Err(e) => {
                        batch.errors.add(&short(&e));
                    }
                }
            }
            (batch, mine)
        }));
    }
    let mut all = Batch {
        enrolled: vec![None; count],
        ..Batch::default()
    };
    for task in tasks {
        let (batch, mine) = task.await?;
        all.enrol_latency.merge(&batch.enrol_latency);
        all.activate_latency.merge(&batch.activate_latency);
        all.errors.merge(&batch.errors);
        for (i, e) in mine {
            all.enrolled[i] = Some(e);
        }
    }
    all.elapsed = started.elapsed();
    Ok(all)
}

/// An error's first line, cut short, for an error tally.
fn short(e: &anyhow::Error) -> String {
    let text = e.to_string();
    let line = text.lines().next().unwrap_or("");
    line.chars().take(60).collect()
}
