//! Scenario `propagation`: from a change committed on the control plane until
//! it is visible on each of K data planes.
//!
//! Each change creates a `verify` API key for the tenant
//! (`POST /v1/tenants/{t}/keys`); it is committed when that request returns. The
//! bench is the only writer, so the i-th change has seq `head + i` (checked
//! against the head at the end). Visibility is observed through each data
//! plane's API: a poller per plane reads `GET /readyz`, whose `applied_seq`
//! (also exported as the metric `twofold_data_applied_seq`) moves only after a
//! change is in both the replica and the in-memory index, so a verify with the
//! new key is answered from then on. The time a seq is first seen is the time
//! the poll's answer arrived: latencies are upper bounds, by at most one poll
//! interval plus one round trip. At the end, a verify with the newest key is
//! sent to every plane and must not be refused as unauthorised.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use hyper::StatusCode;
use serde_json::json;

use crate::cluster::{self, Cluster};
use crate::http::{self, Conn};
use crate::procs::Proc;
use crate::scenarios::{Env, print_processes};
use crate::stats::{Latency, Table, ms, rate};

#[derive(Debug, Args)]
pub struct PropagationArgs {
    /// Numbers of data planes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    planes: Vec<usize>,
    /// Changes per (planes, rate) pair.
    #[arg(long, default_value_t = 200)]
    changes: usize,
    /// Change rates per second, comma-separated; 0 = one after another, as fast
    /// as the control plane commits.
    #[arg(long, value_delimiter = ',', default_value = "20,200")]
    rates: Vec<f64>,
    /// Pause between two polls of one data plane's /readyz.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1ms")]
    poll: Duration,
}

/// What one (planes, rate) pair measured.
struct Measured {
    planes: usize,
    target: f64,
    achieved: f64,
    each: Latency,
    all: Latency,
    early: u64,
    polls_per_sec: f64,
}

pub async fn run(env: &Env, args: &PropagationArgs) -> anyhow::Result<()> {
    println!(
        "\n== propagation: change committed on the control plane -> visible on each data plane"
    );
    if args.changes == 0 {
        bail!("--changes must be at least 1");
    }
    let mut cluster = Cluster::start(env.cluster_options(), env.pinning.server.clone()).await?;
    let mut planes: Vec<Proc> = Vec::new();
    let mut levels = args.planes.clone();
    levels.sort_unstable();
    levels.dedup();
    let mut results = Vec::new();
    for &k in &levels {
        while planes.len() < k {
            let (proc, _) = cluster.start_data(env.pinning.server.clone()).await?;
            planes.push(proc);
        }
        let refs: Vec<&Proc> = planes.iter().collect();
        cluster
            .wait_synced(&refs, false, Duration::from_secs(120))
            .await?;
        let mut listed = vec![("control", cluster.control()?.pid())];
        listed.extend(planes.iter().map(|p| (p.name.as_str(), p.pid())));
        listed.push(("twofold-bench", std::process::id()));
        print_processes(&listed);
        for &r in &args.rates {
            let m = measure(&cluster, &refs, r, args).await?;
            println!(
                "  K={k} rate {}: p50 {} / p99 {} on each plane, p99 {} on all",
                rate_label(m.target),
                ms(m.each.at(0.5)),
                ms(m.each.at(0.99)),
                ms(m.all.at(0.99))
            );
            results.push(m);
        }
    }
    let mut table = Table::new(&[
        "planes",
        "rate (target)",
        "rate (achieved)",
        "changes",
        "each plane p50",
        "p99",
        "max",
        "all planes p50",
        "p99",
        "max",
        "poll period",
    ]);
    for m in &results {
        let [ep50, ep99, _, emax] = m.each.cells();
        let [ap50, ap99, _, amax] = m.all.cells();
        table.row(vec![
            m.planes.to_string(),
            rate_label(m.target),
            format!("{}/s", rate(m.achieved)),
            (m.all.count()).to_string(),
            ep50,
            ep99,
            emax,
            ap50,
            ap99,
            amax,
            format!(
                "{:.1} ms",
                1000.0 * m.planes as f64 / m.polls_per_sec.max(1e-9)
            ),
        ]);
    }
    println!("\n{}", table.render());
    let early: u64 = results.iter().map(|m| m.early).sum();
    if early > 0 {
        println!(
            "{early} observations came before the POST's answer reached the bench (counted as 0 ms)"
        );
    }
    println!(
        "resolution: latencies are upper bounds by up to one poll period of a plane (--poll {:?} pause plus a /readyz round trip; tokio's timer has 1 ms granularity)",
        args.poll
    );
    if let Some(m) = results.iter().filter(|m| m.planes == 8).max_by(|a, b| {
        a.all
            .at(0.99)
            .unwrap_or(0)
            .cmp(&b.all.at(0.99).unwrap_or(0))
    }) {
        let p99 = m.all.at(0.99);
        println!(
            "\ngoal: change -> visible on all 8 data planes p99 <= 50 ms: worst p99 over rates {} ({})",
            ms(p99),
            if p99.is_some_and(|p| p <= 50_000_000) {
                "met"
            } else {
                "NOT met"
            }
        );
    }
    Ok(())
}

fn rate_label(r: f64) -> String {
    if r > 0.0 {
        format!("{}/s", rate(r))
    } else {
        "max (sequential)".to_owned()
    }
}

/// Poll a plane's `/readyz` until `stop`, keeping each new applied seq with the
/// time it was first seen.
async fn poll(
    addr: std::net::SocketAddr,
    pause: Duration,
    stop: Arc<AtomicBool>,
) -> (Vec<(Instant, u64)>, u64) {
    let mut conn = Conn::new(addr);
    let mut seen: Vec<(Instant, u64)> = Vec::new();
    let mut polls = 0u64;
    let mut last_round = false;
    while !last_round {
        // One more poll after `stop`: the plane may have applied the last
        // change after this poller's previous look, seen only by `wait_synced`.
        last_round = stop.load(Ordering::Relaxed);
        if let Ok(Some(applied)) = cluster::data_applied(&mut conn).await {
            polls += 1;
            if seen.last().is_none_or(|(_, last)| applied > *last) {
                seen.push((Instant::now(), applied));
            }
        }
        if pause.is_zero() {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(pause).await;
        }
    }
    (seen, polls)
}

async fn measure(
    cluster: &Cluster,
    planes: &[&Proc],
    target: f64,
    args: &PropagationArgs,
) -> anyhow::Result<Measured> {
    let head = cluster.head().await?;
    let stop = Arc::new(AtomicBool::new(false));
    let pollers: Vec<_> = planes
        .iter()
        .map(|p| tokio::spawn(poll(p.addr(), args.poll, stop.clone())))
        .collect();
    // Let every poller see the current state before the first change.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut conn = cluster.control_conn()?;
    let path = format!("/v1/tenants/{}/keys", cluster.tenant.id);
    let body = json!({"scopes": ["verify"], "name": "propagation"});
    let mut committed = Vec::with_capacity(args.changes);
    let mut last_key = String::new();
    let started = Instant::now();
    for i in 0..args.changes {
        if target > 0.0 {
            let due = started + Duration::from_secs_f64(i as f64 / target);
            tokio::time::sleep_until(due.into()).await;
        }
        last_key = cluster::new_key(&mut conn, Some(&cluster.operator), &path, &body)
            .await
            .with_context(|| format!("change {i}"))?;
        committed.push(Instant::now());
    }
    let achieved = args.changes as f64 / started.elapsed().as_secs_f64().max(1e-9);
    let end = cluster.head().await?;
    if end != head + args.changes as u64 {
        stop.store(true, Ordering::Relaxed);
        bail!(
            "the head moved from {head} to {end} for {} changes: another writer was active, so seqs cannot be matched to changes",
            args.changes
        );
    }
    cluster
        .wait_synced(planes, false, Duration::from_secs(60))
        .await?;
    stop.store(true, Ordering::Relaxed);
    let mut each = Latency::default();
    let mut all = Latency::default();
    let mut early = 0u64;
    let mut worst = vec![Duration::ZERO; args.changes];
    let mut polls = 0u64;
    for poller in pollers {
        let (seen, n) = poller.await?;
        polls += n;
        for (i, at) in committed.iter().enumerate() {
            let seq = head + 1 + i as u64;
            let (visible, _) = seen
                .iter()
                .find(|(_, applied)| *applied >= seq)
                .context("a plane never showed a change it has applied")?;
            let latency = visible.saturating_duration_since(*at);
            if *visible < *at {
                early += 1;
            }
            each.record(latency);
            worst[i] = worst[i].max(latency);
        }
    }
    for w in worst {
        all.record(w);
    }
    // Visible through the verify API too: the newest key is accepted.
    let auth = http::bearer(&last_key)?;
    for plane in planes {
        let reply = Conn::new(plane.addr())
            .post(
                "/v1/verify",
                Some(&auth),
                &json!({"user": "propagation-probe", "code": "000000"}),
            )
            .await?;
        if reply.status == StatusCode::UNAUTHORIZED {
            bail!(
                "{} refused the newest key after applying its seq",
                plane.name
            );
        }
    }
    let polled_for = started.elapsed().as_secs_f64().max(1e-9);
    Ok(Measured {
        planes: planes.len(),
        target,
        achieved,
        each,
        all,
        early,
        polls_per_sec: polls as f64 / polled_for,
    })
}
