//! `twofold-bench`: the benchmarks of Twofold's services (see bench/README.md
//! and BENCHMARKS.md). Each scenario starts real `twofold` processes on
//! 127.0.0.1, drives them over HTTP, prints its figures with the machine facts,
//! and stops every process it started, on success, error, panic or Ctrl-C.
//!
//! # Layout
//!
//! - `machine`: cores, `taskset` pinning, CPU time and RSS from `/proc`.
//! - `procs`: child processes with a kill-on-drop guard; `cluster`: a control
//!   plane with a tenant and its keys, and data planes.
//! - `seed`: active factors written straight into a stopped control plane's
//!   database; `enrol`: enrolments through the API.
//! - `users`: the ledger that keeps throttling and replay protection on;
//!   `totp`: RFC 6238 codes computed here; `load`: the load generator;
//!   `http`: its HTTP/1.1 client; `stats`: histograms and tables.
//! - `ceiling`: the bare axum endpoint; `scenarios`: verify, propagation,
//!   bootstrap and writes.

mod ceiling;
mod cluster;
mod enrol;
mod http;
mod load;
mod machine;
mod procs;
mod scenarios;
mod seed;
mod stats;
mod totp;
mod users;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::machine::{Facts, Pinning};
use crate::scenarios::Env;

/// Benchmarks of Twofold's services, against real `twofold` processes on
/// 127.0.0.1. Build the server first: `cargo build --release -p twofold`.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Args)]
struct Global {
    /// The twofold binary [default: `twofold` next to this executable, i.e.
    /// target/release/twofold].
    #[arg(long, global = true)]
    twofold: Option<PathBuf>,
    /// Cores for the servers (taskset -c list).
    #[arg(long, global = true, default_value = "0")]
    server_cpus: String,
    /// Cores for this process, the load generator (taskset -c list).
    #[arg(long, global = true, default_value = "1")]
    client_cpus: String,
    /// Do not pin processes to cores.
    #[arg(long, global = true)]
    no_pin: bool,
    /// Where the temporary working directory goes [default: the system's].
    #[arg(long, global = true)]
    work_dir: Option<PathBuf>,
    /// TWOFOLD_LOG of the servers.
    #[arg(long, global = true, default_value = "warn")]
    server_log: String,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Verify throughput and latency (reject and accept paths) against a bare
    /// endpoint as the ceiling.
    Verify(scenarios::verify::VerifyArgs),
    /// Change -> visible on K data planes, at a low and a high change rate.
    Propagation(scenarios::propagation::PropagationArgs),
    /// Data-plane bootstrap and restart: time to ready and memory per factor.
    Bootstrap(scenarios::bootstrap::BootstrapArgs),
    /// Control-plane write throughput: enrolments per second.
    Writes(scenarios::writes::WritesArgs),
    /// The bare ceiling server (started by `verify`).
    #[command(hide = true)]
    CeilingServer,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Scenario::CeilingServer = cli.scenario {
        return ceiling::serve();
    }
    let twofold = procs::find_twofold(cli.global.twofold.as_deref())?;
    // Before pinning, which narrows what this process sees.
    let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pinning = Pinning::apply(
        &cli.global.server_cpus,
        &cli.global.client_cpus,
        !cli.global.no_pin,
    );
    // Built after pinning: one worker per core this process may use.
    let client_threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(client_threads)
        .enable_all()
        .build()?;
    let facts = Facts::gather(nproc, &twofold);
    facts.print(&pinning);
    let env = Env {
        pinning,
        options: cluster::Options {
            twofold,
            server_log: cli.global.server_log.clone(),
            work_dir: cli.global.work_dir.clone(),
            database: None,
            control_idle: false,
        },
        client_threads,
    };
    let started = std::time::Instant::now();
    runtime.block_on(async {
        let scenario = async {
            match &cli.scenario {
                Scenario::Verify(args) => scenarios::verify::run(&env, args).await,
                Scenario::Propagation(args) => scenarios::propagation::run(&env, args).await,
                Scenario::Bootstrap(args) => scenarios::bootstrap::run(&env, args).await,
                Scenario::Writes(args) => scenarios::writes::run(&env, args).await,
                Scenario::CeilingServer => Ok(()),
            }
        };
        // Ctrl-C drops the scenario, and with it every process guard.
        tokio::select! {
            result = scenario => result,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        }
    })?;
    println!("\ndone in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
