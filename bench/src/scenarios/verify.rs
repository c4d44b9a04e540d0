//! Scenario `verify`: throughput and latency of `POST /v1/verify` on one data
//! plane, with a bare axum endpoint measured side by side as the ceiling.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};

use crate::cluster::{self, Cluster};
use crate::enrol;
use crate::http;
use crate::load::{self, Mode, Outcome, Path, Run, Target};
use crate::machine::{CpuMeter, percent};
use crate::procs::{Proc, Spawn};
use crate::scenarios::{Env, print_processes};
use crate::seed;
use crate::stats::{Table, ms, rate};
use crate::users::{MAX_FAILURES, Users};
use crate::{ceiling, totp, users};

/// How users are seeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SeedMode {
    /// Rows written into the stopped control plane's database (fast).
    Db,
    /// Enrol and activate through the API (about 2 fsyncs per user).
    Api,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Users seeded, each with one active TOTP factor.
    #[arg(long, default_value_t = 20_000)]
    users: usize,
    /// How users are seeded.
    #[arg(long, value_enum, default_value_t = SeedMode::Db)]
    seed: SeedMode,
    /// Concurrent connections when seeding with --seed api.
    #[arg(long, default_value_t = 8)]
    seed_concurrency: usize,
    /// Closed-loop concurrency levels (connections), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "16,64,256")]
    concurrency: Vec<usize>,
    /// Measured time per run.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    duration: Duration,
    /// Unmeasured time before each run.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    warmup: Duration,
    /// Paths to measure, comma-separated: reject, accept.
    #[arg(long, value_delimiter = ',', default_value = "reject,accept")]
    paths: Vec<PathArg>,
    /// Open loop only: send at this many requests per second (per path)
    /// instead of the closed-loop levels.
    #[arg(long)]
    rate: Option<f64>,
    /// Connections available to the open loop.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Skip the latency runs: 1 connection, and the open loop at half the best
    /// closed-loop throughput.
    #[arg(long)]
    skip_latency: bool,
    /// Longest wait for the data plane to report and apply the previous run's
    /// usage events before the next run.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "300s")]
    settle_timeout: Duration,
    /// Cores of the control plane [default: --server-cpus]. It merges the usage
    /// events every verify produces; `--control-cpus 1` moves that work off the
    /// data plane's core (onto the load generator's) to see its share.
    #[arg(long)]
    control_cpus: Option<String>,
    /// Run the control plane at `SCHED_IDLE` (`chrt --idle 0`), so that on a
    /// shared core the data plane's wake-ups preempt its merges at once rather
    /// than after its time slice. A deployment choice for a machine both planes
    /// share; reported as its own split.
    #[arg(long)]
    control_idle: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PathArg {
    Reject,
    Accept,
}

impl PathArg {
    fn path(self) -> Path {
        match self {
            PathArg::Reject => Path::Reject,
            PathArg::Accept => Path::Accept,
        }
    }
}

/// One measured run, as a table row.
struct Row {
    label: String,
    path: Path,
    outcome: Outcome,
    /// CPU shares: the data plane (or the ceiling), the control plane, the bench.
    cpu: [Option<f64>; 3],
    ratio: Option<f64>,
    /// Changes the control plane committed during the run (usage reports
    /// merged), all of which every data plane applies.
    changes: u64,
}

impl Row {
    fn cells(&self) -> Vec<String> {
        let [p50, p99, p999, max] = self.outcome.latency.cells();
        let mut errors = self.outcome.tally.errors_except(self.path.expected());
        if self.outcome.exhausted {
            errors.push_str(" (users ran out)");
        }
        if self.outcome.late > 0 {
            errors.push_str(&format!(" ({} started late)", self.outcome.late));
        }
        vec![
            self.label.clone(),
            self.path.name().to_owned(),
            rate(self.outcome.rps()),
            p50,
            p99,
            p999,
            max,
            self.outcome.tally.total().to_string(),
            errors,
            percent(self.cpu[0]),
            percent(self.cpu[1]),
            percent(self.cpu[2]),
            self.changes.to_string(),
            self.ratio
                .map_or_else(|| "-".to_owned(), |r| format!("{:.0}%", r * 100.0)),
        ]
    }
}

const HEADER: &[&str] = &[
    "load",
    "path",
    "req/s",
    "p50",
    "p99",
    "p99.9",
    "max",
    "answers",
    "errors",
    "server CPU",
    "control CPU",
    "bench CPU",
    "feed changes",
    "vs ceiling",
];

struct Bench<'a> {
    args: &'a VerifyArgs,
    cluster: Cluster,
    data: Proc,
    ceiling: Proc,
    twofold: Target,
    bare: Target,
    /// Whether the open loop may spin to pace requests (see `load::Run`).
    spin: bool,
}

pub async fn run(env: &Env, args: &VerifyArgs) -> anyhow::Result<()> {
    println!("\n== verify: POST /v1/verify on one data plane, bare axum endpoint as the ceiling");
    if args.users == 0 {
        bail!("--users must be at least 1");
    }
    let control_cpus = match (&args.control_cpus, &env.pinning.server) {
        // Pinning is off (or taskset missing): nothing is pinned.
        (_, None) => None,
        (Some(cpus), Some(_)) => Some(cpus.clone()),
        (None, Some(server)) => Some(server.clone()),
    };
    let options = cluster::Options {
        control_idle: args.control_idle,
        ..env.cluster_options()
    };
    let mut cluster = Cluster::start(options, control_cpus.clone()).await?;
    let users = seed(&mut cluster, args).await?;
    let (data, _) = cluster.start_data(env.pinning.server.clone()).await?;
    let synced = cluster
        .wait_synced(&[&data], false, Duration::from_secs(600))
        .await
        .context("waiting for the data plane's first sync")?;
    println!(
        "data plane ready with {} factors in {:.1} s",
        users.len(),
        synced.as_secs_f64()
    );
    let ceiling = Proc::start(&Spawn {
        name: "ceiling".into(),
        exe: std::env::current_exe()?,
        args: vec!["ceiling-server".into()],
        envs: Vec::new(),
        cpus: env.pinning.server.clone(),
        idle: false,
        ready_prefix: ceiling::READY_PREFIX.into(),
    })
    .await?;
    print_processes(&[
        ("control", cluster.control()?.pid()),
        ("data", data.pid()),
        ("ceiling", ceiling.pid()),
        ("twofold-bench", std::process::id()),
    ]);
    println!(
        "load generator: {} tokio worker thread(s), one HTTP/1.1 keep-alive connection per worker task",
        env.client_threads
    );
    let users = Arc::new(users);
    let twofold = Target {
        addr: data.addr(),
        auth: http::bearer(&cluster.tenant.verify_key)?,
        users: users.clone(),
    };
    let bare = Target {
        addr: ceiling.addr(),
        auth: http::bearer("ceiling")?,
        users,
    };
    // The open loop paces by spinning only where that takes no CPU from the
    // planes or the ceiling; elsewhere it sleeps on tokio's 1 ms timer.
    let spin = env
        .pinning
        .client_alone(&[env.pinning.server.as_deref(), control_cpus.as_deref()]);
    if !spin {
        println!(
            "open loop paced by tokio's 1 ms timer: the load generator shares a core with a server or is not pinned"
        );
    }
    let mut bench = Bench {
        args,
        cluster,
        data,
        ceiling,
        twofold,
        bare,
        spin,
    };
    bench.measure().await
}

/// Seed `args.users` users with an active factor.
async fn seed(cluster: &mut Cluster, args: &VerifyArgs) -> anyhow::Result<Users> {
    let started = Instant::now();
    match args.seed {
        SeedMode::Db => {
            cluster.stop_control().await?;
            let secrets = seed::random_secrets(args.users)?;
            let (db, keyring, tenant) = (
                cluster.control_db(),
                cluster.keyring.clone(),
                cluster.tenant.id.clone(),
            );
            let moved = secrets.clone();
            let seeded = tokio::task::spawn_blocking(move || {
                seed::insert_factors(&db, &keyring, &tenant, &moved)
            })
            .await??;
            cluster.start_control().await?;
            println!(
                "seeded {} active factors into control.db directly in {:.1} s (head seq {})",
                seeded.factors,
                started.elapsed().as_secs_f64(),
                seeded.head
            );
            let n = secrets.len();
            Ok(Users::new(secrets, vec![seeded.activated_step; n]))
        }
        SeedMode::Api => {
            let auth = http::bearer(&cluster.tenant.manage_key)?;
            let batch = enrol::enrol_many(
                cluster.control()?.addr(),
                &auth,
                args.users,
                args.seed_concurrency,
                None,
                Arc::new(users::user_name),
            )
            .await?;
            if batch.done() != args.users {
                bail!(
                    "seeding through the API enrolled {} of {} users: {}",
                    batch.done(),
                    args.users,
                    batch.errors.errors_except("")
                );
            }
            println!(
                "seeded {} users through the API in {:.1} s ({} enrolments/s with {} connections)",
                args.users,
                batch.elapsed.as_secs_f64(),
                rate(args.users as f64 / batch.elapsed.as_secs_f64()),
                args.seed_concurrency
            );
            let (secrets, steps) = batch
                .enrolled
                .into_iter()
                .flatten()
                .map(|e| (e.secret, e.step))
                .unzip();
            Ok(Users::new(secrets, steps))
        }
    }
}

impl Bench<'_> {
    async fn measure(&mut self) -> anyhow::Result<()> {
        let args = self.args;
        let paths: Vec<Path> = dedup(args.paths.iter().map(|p| p.path()).collect());
        let mut rows = Vec::new();
        if let Some(r) = args.rate {
            let mode = Mode::Open {
                rate: r,
                connections: args.connections,
            };
            let label = format!("{} req/s", rate(r));
            for &path in &paths {
                // The ceiling at the same rate just before: what the machine and
                // the load generator add to the latency on their own.
                rows.push(self.one(label.clone(), Path::Ceiling, mode, None).await?);
                rows.push(self.one(label.clone(), path, mode, None).await?);
            }
            print_table("open loop at a fixed rate", &rows);
            return self.print_ledger();
        }
        let mut best = [0.0f64; 3];
        for &c in &args.concurrency {
            let mode = Mode::Closed { concurrency: c };
            let label = format!("c={c}");
            let bare = self.one(label.clone(), Path::Ceiling, mode, None).await?;
            let ceiling_rps = bare.outcome.rps();
            best[0] = best[0].max(ceiling_rps);
            rows.push(bare);
            for &path in &paths {
                let row = self
                    .one(label.clone(), path, mode, Some(ceiling_rps))
                    .await?;
                let slot = if path == Path::Reject { 1 } else { 2 };
                best[slot] = best[slot].max(row.outcome.rps());
                rows.push(row);
            }
        }
        print_table("closed loop: throughput by concurrency", &rows);
        let mut goals = Vec::new();
        if best[0] > 0.0 && best[1] > 0.0 {
            let ratio = best[1] / best[0];
            goals.push(format!(
                "reject path at {:.0}% of the ceiling (best {} vs {} req/s; goal >= 60%): {}",
                ratio * 100.0,
                rate(best[1]),
                rate(best[0]),
                if ratio >= 0.6 { "met" } else { "NOT met" }
            ));
        }
        let single_goal = |row: &Row| {
            format!(
                "{} p99 at 1 connection {} (goal <= 1 ms): {}",
                row.path.name(),
                ms(row.outcome.latency.at(0.99)),
                verdict(row.outcome.latency.at(0.99), 1_000_000)
            )
        };
        // `--concurrency 1` measured it already.
        let single_done = args.concurrency.contains(&1);
        if single_done {
            for row in rows
                .iter()
                .filter(|r| r.label == "c=1" && r.path != Path::Ceiling)
            {
                goals.push(single_goal(row));
            }
        }
        if !args.skip_latency {
            let mut latency_rows = Vec::new();
            let single = Mode::Closed { concurrency: 1 };
            if !single_done {
                latency_rows.push(self.one("c=1".into(), Path::Ceiling, single, None).await?);
                for &path in &paths {
                    let row = self.one("c=1".into(), path, single, None).await?;
                    goals.push(single_goal(&row));
                    latency_rows.push(row);
                }
            }
            for &path in &paths {
                let max = if path == Path::Reject {
                    best[1]
                } else {
                    best[2]
                };
                if max <= 0.0 {
                    continue;
                }
                let half = max / 2.0;
                let mode = Mode::Open {
                    rate: half,
                    connections: args.connections,
                };
                let label = format!("open {} req/s (half max)", rate(half));
                // The ceiling at the same rate, side by side: the latency the
                // machine and the load generator add without Twofold.
                latency_rows.push(self.one(label.clone(), Path::Ceiling, mode, None).await?);
                let row = self.one(label, path, mode, None).await?;
                goals.push(format!(
                    "{} p99 at half of max throughput ({} req/s) {} (goal <= 2 ms): {}",
                    path.name(),
                    rate(half),
                    ms(row.outcome.latency.at(0.99)),
                    verdict(row.outcome.latency.at(0.99), 2_000_000)
                ));
                latency_rows.push(row);
            }
            print_table(
                "latency: 1 connection, and open loop at half the best closed-loop throughput",
                &latency_rows,
            );
        }
        println!("\ngoals (this run):");
        for goal in goals {
            println!("  - {goal}");
        }
        self.print_ledger()
    }

    /// Wait for the planes to settle, then measure one run.
    async fn one(
        &mut self,
        label: String,
        path: Path,
        mode: Mode,
        ceiling_rps: Option<f64>,
    ) -> anyhow::Result<Row> {
        // The previous run's usage events are still being reported, merged and
        // replicated back: let that finish so it does not steal the core.
        let settled = self
            .cluster
            .wait_synced(&[&self.data], true, self.args.settle_timeout)
            .await;
        match settled {
            Ok(t) if t > Duration::from_millis(100) => println!(
                "  (waited {:.1} s for the data plane to report and apply the previous run's usage events)",
                t.as_secs_f64()
            ),
            Ok(_) => {}
            Err(e) => println!("  warning: planes did not settle: {e:#}"),
        }
        if path == Path::Accept {
            let span = self.args.warmup + self.args.duration;
            let wait = accept_wait(
                self.twofold.users.last_accepted_step(),
                span,
                unix_now_f64(),
            );
            if wait > Duration::from_millis(100) {
                println!(
                    "  (waiting {:.1} s for fresh TOTP steps: replay protection accepts each user once per step)",
                    wait.as_secs_f64()
                );
            }
            tokio::time::sleep(wait).await;
        }
        let control = self.cluster.control()?.pid();
        let (target, pids) = match path {
            Path::Ceiling => (&self.bare, [self.ceiling.pid(), control]),
            _ => (&self.twofold, [self.data.pid(), control]),
        };
        let run = Run {
            path,
            mode,
            warmup: self.args.warmup,
            duration: self.args.duration,
            spin: self.spin,
        };
        let head = self.cluster.head().await?;
        let started = Instant::now();
        let meter = CpuMeter::start(&[pids[0], pids[1], std::process::id()]);
        let outcome = load::run(target, run).await?;
        let shares = meter.shares(started.elapsed());
        let changes = self.cluster.head().await?.saturating_sub(head);
        let measured = outcome.tally.total() > 0;
        let share = |i: usize| shares.get(i).copied().flatten().filter(|_| measured);
        let row = Row {
            label,
            path,
            cpu: [share(0), share(1), share(2)],
            changes,
            ratio: ceiling_rps
                .filter(|c| *c > 0.0 && path == Path::Reject)
                .map(|c| outcome.rps() / c),
            outcome,
        };
        let cells = row.cells();
        println!(
            "  {} {}: {} req/s, p50 {}, p99 {}, errors {}, CPU data/ceiling {} control {} bench {}",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            cells[4],
            cells[8],
            cells[9],
            cells[10],
            cells[11]
        );
        Ok(row)
    }

    fn print_ledger(&self) -> anyhow::Result<()> {
        let users = &self.twofold.users;
        println!(
            "\nusers: {} seeded; wrong codes still allowed by the ledger: {} (at most {} per user between accepted codes)",
            users.len(),
            users.reject_budget(),
            MAX_FAILURES
        );
        println!(
            "server CPU = the data plane (or the ceiling process); CPU figures are shares of one core over the run, warm-up included"
        );
        println!(
            "feed changes = changes the control plane committed during the run (merged usage reports), each applied by every data plane"
        );
        Ok(())
    }
}

fn print_table(title: &str, rows: &[Row]) {
    let mut table = Table::new(HEADER);
    for row in rows {
        table.row(row.cells());
    }
    println!("\n{title}\n{}", table.render());
}

fn unix_now_f64() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// How long to wait before an accept run lasting `span`, so that a step
/// boundary falls in its middle (each user can then be accepted once before
/// and once after it) and its first step is one no earlier run used.
fn accept_wait(last_used_step: u64, span: Duration, now: f64) -> Duration {
    let period = totp::PERIOD as f64;
    let half = (span.as_secs_f64() / 2.0).min(period / 2.0);
    let mut step = totp::step_at(now as u64).max(last_used_step + 1);
    loop {
        let start = (step + 1) as f64 * period - half;
        if start >= now {
            return Duration::from_secs_f64(start - now);
        }
        step += 1;
    }
}

/// Whether a latency (nanoseconds) is within `goal`, if one was measured.
fn verdict(measured: Option<u64>, goal: u64) -> &'static str {
    match measured {
        Some(p) if p <= goal => "met",
        Some(_) => "NOT met",
        None => "not measured (no answers)",
    }
}

fn dedup(mut paths: Vec<Path>) -> Vec<Path> {
    let mut seen = Vec::new();
    paths.retain(|p| {
        let new = !seen.contains(p);
        seen.push(*p);
        new
    });
    paths
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_runs_straddle_a_boundary_in_a_fresh_step() {
        let span = Duration::from_secs(10);
        // At 100 s (step 3, boundary at 120 s): start at 115 s.
        assert_eq!(accept_wait(0, span, 100.0), Duration::from_secs(15));
        // Too late for this boundary: the next one, at 150 s.
        assert_eq!(accept_wait(0, span, 117.0), Duration::from_secs(28));
        // Step 3 was used already: start in step 4, at 145 s.
        assert_eq!(accept_wait(3, span, 100.0), Duration::from_secs(45));
    }
}
