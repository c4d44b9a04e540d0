//! Scenario `bootstrap`: a new data plane becomes ready from a control plane
//! holding F active factors; then the same data plane restarts from its own
//! replica with the control plane down. Reports time to ready (from spawning
//! the process to the first `200` on `/readyz`), peak RSS (`VmHWM`), RSS at
//! ready (`VmRSS`) and RSS bytes per factor over an empty data plane measured
//! the same way.
//!
//! The control plane runs on the load generator's core here: in production it
//! is another machine, and the bench only polls.

use std::path::Path as FsPath;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Args;
use hyper::StatusCode;
use serde_json::json;

use crate::cluster::{self, Cluster};
use crate::http::{self, Conn};
use crate::machine::{self, Memory};
use crate::procs::Proc;
use crate::scenarios::{Env, print_processes};
use crate::seed;
use crate::stats::{Table, mib, rate};
use crate::totp;
use crate::users::user_name;

#[derive(Debug, Args)]
pub struct BootstrapArgs {
    /// Active factors in the control plane (one per user).
    #[arg(long, default_value_t = 100_000)]
    factors: usize,
    /// Longest wait for a data plane to become ready.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "600s")]
    ready_timeout: Duration,
}

/// One start of a data plane.
struct Start {
    phase: &'static str,
    factors: usize,
    ready_in: Duration,
    /// CPU time until ready: the data plane's, and the control plane's meanwhile.
    cpu: (Option<Duration>, Option<Duration>),
    at_ready: Memory,
    settled: Memory,
}

pub async fn run(env: &Env, args: &BootstrapArgs) -> anyhow::Result<()> {
    println!(
        "\n== bootstrap: data plane ready from a control plane with {} factors, then restart with it down",
        args.factors
    );
    // The control plane takes the bench's core: see the module documentation.
    let mut cluster = Cluster::start(env.cluster_options(), env.pinning.client.clone()).await?;
    let server = env.pinning.server.clone();

    let (empty, _) = start_and_wait(&mut cluster, None, server.clone(), args).await?;
    let baseline = measured(&empty, "empty (tenant and keys only)", 0).await?;
    empty.proc.terminate(Duration::from_secs(20)).await?;

    cluster.stop_control().await?;
    let secrets = seed::random_secrets(args.factors)?;
    let probe = secrets.first().copied();
    let (db, keyring, tenant) = (
        cluster.control_db(),
        cluster.keyring.clone(),
        cluster.tenant.id.clone(),
    );
    let seeded =
        tokio::task::spawn_blocking(move || seed::insert_factors(&db, &keyring, &tenant, &secrets))
            .await??;
    println!(
        "seeded {} active factors into control.db in {:.1} s ({}/s); control.db is {}",
        seeded.factors,
        seeded.took.as_secs_f64(),
        rate(seeded.factors as f64 / seeded.took.as_secs_f64().max(1e-9)),
        file_size(&cluster.control_db())
    );
    cluster.start_control().await?;

    let (fresh, dir) = start_and_wait(&mut cluster, None, server.clone(), args).await?;
    print_processes(&[
        ("control", cluster.control()?.pid()),
        ("data", fresh.proc.pid()),
        ("twofold-bench", std::process::id()),
    ]);
    let applied = cluster::data_applied(&mut Conn::new(fresh.proc.addr()))
        .await?
        .unwrap_or(0);
    if applied != seeded.head {
        bail!(
            "the data plane is ready at seq {applied}, not at the head {}",
            seeded.head
        );
    }
    let bootstrap = measured(&fresh, "bootstrap from the control plane", args.factors).await?;
    println!(
        "replica.db is {} for {} factors",
        file_size(&dir.join("replica.db")),
        args.factors
    );

    // Control plane down, then the same data plane restarts from its replica.
    cluster.control = None;
    fresh.proc.terminate(Duration::from_secs(30)).await?;
    let (restarted, _) = start_and_wait(&mut cluster, Some(dir.clone()), server, args).await?;
    let restart = measured(
        &restarted,
        "restart from its replica, control plane down",
        args.factors,
    )
    .await?;
    if let Some(secret) = probe {
        check_verifies(&cluster, &restarted.proc, &secret).await?;
        println!(
            "check: after the restart, user {} verifies with its current code",
            user_name(0)
        );
    }

    let mut table = Table::new(&[
        "phase",
        "factors",
        "time to ready",
        "data CPU",
        "control CPU",
        "peak RSS (VmHWM)",
        "RSS at ready",
        "RSS +1 s",
        "RSS bytes/factor",
        "peak bytes/factor",
    ]);
    for start in [&baseline, &bootstrap, &restart] {
        let per = |now: u64, base: u64| {
            if start.factors == 0 {
                "-".to_owned()
            } else {
                format!(
                    "{:.0}",
                    now.saturating_sub(base) as f64 / start.factors as f64
                )
            }
        };
        table.row(vec![
            start.phase.to_owned(),
            start.factors.to_string(),
            format!("{:.3} s", start.ready_in.as_secs_f64()),
            secs(start.cpu.0),
            secs(start.cpu.1),
            mib(start.at_ready.peak.max(start.settled.peak)),
            mib(start.at_ready.rss),
            mib(start.settled.rss),
            per(start.settled.rss, baseline.settled.rss),
            per(
                start.at_ready.peak.max(start.settled.peak),
                baseline.settled.peak,
            ),
        ]);
    }
    println!("\n{}", table.render());
    println!(
        "time to ready: from spawning the process to the first 200 on /readyz (polled every 5 ms)"
    );
    println!(
        "CPU: the data plane's from start to ready, and the control plane's over the same time (it serves the snapshot)"
    );
    println!(
        "bytes/factor: (RSS 1 s after ready - the empty data plane's) / factors; peak likewise with VmHWM"
    );
    let per_factor = if args.factors > 0 {
        bootstrap.settled.rss.saturating_sub(baseline.settled.rss) as f64 / args.factors as f64
    } else {
        0.0
    };
    println!("\ngoals (this run, {} factors):", args.factors);
    println!(
        "  - bootstrap to ready {:.2} s (goal for 1M: <= 5 s)",
        bootstrap.ready_in.as_secs_f64()
    );
    println!(
        "  - restart to ready, control plane down {:.2} s (goal for 1M: <= 2 s)",
        restart.ready_in.as_secs_f64()
    );
    println!("  - data-plane memory {per_factor:.0} bytes RSS per factor (goal <= 200)");
    Ok(())
}

/// A data plane being measured.
struct Started {
    proc: Proc,
    ready_in: Duration,
    cpu: (Option<Duration>, Option<Duration>),
    at_ready: Memory,
}

/// Start a data plane (in `dir`, or a new directory) and wait until it is
/// ready, reading its memory at once.
async fn start_and_wait(
    cluster: &mut Cluster,
    dir: Option<std::path::PathBuf>,
    cpus: Option<String>,
    args: &BootstrapArgs,
) -> anyhow::Result<(Started, std::path::PathBuf)> {
    let control = cluster.control.as_ref().map(Proc::pid);
    let control_before = control.and_then(machine::cpu_time);
    let spawned = Instant::now();
    let (proc, dir) = match dir {
        Some(dir) => (cluster.start_data_in(&dir, cpus, "data").await?, dir),
        None => cluster.start_data(cpus).await?,
    };
    let mut conn = Conn::new(proc.addr());
    let deadline = spawned + args.ready_timeout;
    loop {
        if let Ok(Some(_)) = cluster::data_applied(&mut conn).await {
            break;
        }
        if Instant::now() >= deadline {
            bail!(
                "the data plane was not ready within {:?}; last output:\n{}",
                args.ready_timeout,
                proc.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ready_in = spawned.elapsed();
    let at_ready = machine::memory(proc.pid())?;
    let control_cpu = control
        .and_then(machine::cpu_time)
        .zip(control_before)
        .map(|(after, before)| after.saturating_sub(before));
    Ok((
        Started {
            cpu: (machine::cpu_time(proc.pid()), control_cpu),
            proc,
            ready_in,
            at_ready,
        },
        dir,
    ))
}

/// The figures of a start, with memory read again a second after ready.
async fn measured(started: &Started, phase: &'static str, factors: usize) -> anyhow::Result<Start> {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let settled = machine::memory(started.proc.pid())?;
    println!(
        "  {phase}: ready in {:.3} s, VmHWM {}, VmRSS {} (+1 s: {})",
        started.ready_in.as_secs_f64(),
        mib(started.at_ready.peak.max(settled.peak)),
        mib(started.at_ready.rss),
        mib(settled.rss)
    );
    Ok(Start {
        phase,
        factors,
        ready_in: started.ready_in,
        cpu: started.cpu,
        at_ready: started.at_ready,
        settled,
    })
}

/// User 0's current code is accepted: the sealed secrets opened after loading.
async fn check_verifies(cluster: &Cluster, plane: &Proc, secret: &[u8; 20]) -> anyhow::Result<()> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let code = totp::format(totp::code(secret, totp::step_at(now)));
    let reply = Conn::new(plane.addr())
        .post(
            "/v1/verify",
            Some(&http::bearer(&cluster.tenant.verify_key)?),
            &json!({"user": user_name(0), "code": code}),
        )
        .await?;
    let body: serde_json::Value = reply.json(StatusCode::OK)?;
    if body.get("valid") != Some(&json!(true)) {
        bail!(
            "user {} was not verified after the restart: {body}",
            user_name(0)
        );
    }
    Ok(())
}

fn secs(d: Option<Duration>) -> String {
    d.map_or_else(|| "-".to_owned(), |d| format!("{:.2} s", d.as_secs_f64()))
}

fn file_size(path: &FsPath) -> String {
    std::fs::metadata(path)
        .map(|m| mib(m.len()))
        .with_context(|| format!("{}", path.display()))
        .unwrap_or_else(|_| "?".to_owned())
}
