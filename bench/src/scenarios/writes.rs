//! Scenario `writes`: control-plane write throughput, as enrolments per second
//! (enrol, then activate with the current code) from C concurrent clients.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;

use crate::cluster::Cluster;
use crate::enrol;
use crate::http;
use crate::machine::{CpuMeter, percent};
use crate::scenarios::{Env, print_processes};
use crate::stats::{Table, rate};

#[derive(Debug, Args)]
pub struct WritesArgs {
    /// Concurrent clients, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    concurrency: Vec<usize>,
    /// Time per level.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    duration: Duration,
    /// Most enrolments per level, whatever the duration.
    #[arg(long, default_value_t = 100_000)]
    max_users: usize,
    /// Also measure the control plane on this PostgreSQL database (it must be
    /// empty; for example a fresh one made with `createdb`).
    #[arg(long)]
    postgres: Option<String>,
}

pub async fn run(env: &Env, args: &WritesArgs) -> anyhow::Result<()> {
    run_on(env, args, None).await?;
    if let Some(url) = &args.postgres {
        run_on(env, args, Some(url.clone())).await?;
    }
    Ok(())
}

async fn run_on(env: &Env, args: &WritesArgs, database: Option<String>) -> anyhow::Result<()> {
    let (engine, how) = if database.is_some() {
        (
            "PostgreSQL",
            "one replica; writes serialised on the log_head row",
        )
    } else {
        ("SQLite", "synchronous=FULL, one write connection")
    };
    println!("\n== writes: control-plane enrolments/s (enrol + activate), {engine}");
    let mut options = env.cluster_options();
    options.database = database;
    let cluster = Cluster::start(options, env.pinning.server.clone()).await?;
    let control = cluster.control()?;
    print_processes(&[
        ("control", control.pid()),
        ("twofold-bench", std::process::id()),
    ]);
    let auth = http::bearer(&cluster.tenant.manage_key)?;
    let mut table = Table::new(&[
        "clients",
        "enrolments/s",
        "writes/s",
        "enrol p50",
        "p99",
        "activate p50",
        "p99",
        "enrolled",
        "errors",
        "control CPU",
    ]);
    for &c in &args.concurrency {
        let started = Instant::now();
        let meter = CpuMeter::start(&[control.pid()]);
        let batch = enrol::enrol_many(
            control.addr(),
            &auth,
            args.max_users,
            c,
            Some(started + args.duration),
            Arc::new(move |i| format!("w{c}-{i:07}")),
        )
        .await?;
        let cpu = meter.shares(started.elapsed());
        let per_sec = batch.done() as f64 / batch.elapsed.as_secs_f64().max(1e-9);
        let [ep50, ep99, _, _] = batch.enrol_latency.cells();
        let [ap50, ap99, _, _] = batch.activate_latency.cells();
        println!("  {c} clients: {} enrolments/s", rate(per_sec));
        table.row(vec![
            c.to_string(),
            rate(per_sec),
            rate(per_sec * 2.0),
            ep50,
            ep99,
            ap50,
            ap99,
            batch.done().to_string(),
            batch.errors.errors_except(""),
            percent(cpu.first().copied().flatten()),
        ]);
    }
    println!("\n{engine} ({how})\n{}", table.render());
    println!("writes/s counts the two transactions of an enrolment (enrol, activate)");
    Ok(())
}
