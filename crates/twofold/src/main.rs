//! The `twofold` command. It only resolves settings, prepares the data directory
//! and its key file, and hands over to the planes.

mod keyfile;
mod planes;
mod settings;
mod up;

use std::net::SocketAddr;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use twofold_control::store::Database;

use crate::settings::{CommonArgs, ControlArgs, DataArgs, File, LogFormat, ThrottleArgs};

/// glibc's malloc took about a tenth of the data plane's cycles on the verify
/// path (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Twofold: multi-factor authentication (TOTP and backup codes) that keeps
/// verifying when everything around it fails.
///
/// Settings come from flags, then TWOFOLD_* environment variables, then the TOML
/// file given with --config, then the defaults shown.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a control plane and one data plane together, on embedded defaults.
    Up {
        #[command(flatten)]
        common: CommonArgs,
        /// Address of the control plane [default: 127.0.0.1:7070].
        #[arg(long, env = "TWOFOLD_CONTROL_LISTEN")]
        control_listen: Option<SocketAddr>,
        /// Address of the data plane [default: 127.0.0.1:7071].
        #[arg(long, env = "TWOFOLD_DATA_LISTEN")]
        data_listen: Option<SocketAddr>,
        /// Operator token; by default one is generated on first start.
        #[arg(long, env = "TWOFOLD_OPERATOR_TOKEN", hide_env_values = true)]
        operator_token: Option<String>,
        #[command(flatten)]
        throttle: ThrottleArgs,
    },
    /// Run the control plane: tenants, keys, factors, audit log and the feed.
    #[command(args_conflicts_with_subcommands = true)]
    Control {
        #[command(subcommand)]
        action: Option<ControlAction>,
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        control: ControlArgs,
        #[command(flatten)]
        throttle: ThrottleArgs,
    },
    /// Run a data plane: verification from a local replica of the feed.
    Data {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        data: DataArgs,
    },
    /// Manage the master keys in the key file.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
}

#[derive(Debug, Subcommand)]
enum KeysAction {
    /// Append a new master key to the key file; it seals everything new once a
    /// plane restarts with the file. The first key stays: it keys the hashes of
    /// API keys and backup codes. Roll the file to the data planes first, then to
    /// the control plane, which re-seals every secret (see the README).
    Rotate {
        #[command(flatten)]
        common: CommonArgs,
    },
}

#[derive(Debug, Subcommand)]
enum ControlAction {
    /// Copy a SQLite installation into PostgreSQL: every tenant, key, factor,
    /// backup code, audit record and change, with the same seqs and log id, so
    /// data planes carry on from where they stood.
    Migrate {
        /// The SQLite database to copy, as `sqlite:PATH` or a path (for example
        /// sqlite:./twofold-data/control.db). Stop its control plane first.
        #[arg(long)]
        from: String,
        /// The PostgreSQL database to fill, as `postgres://USER@HOST/DB`.
        #[arg(long)]
        to: String,
        /// Replace what the target already holds instead of refusing.
        #[arg(long)]
        overwrite: bool,
    },
}

/// `twofold control migrate`.
fn migrate(from: &str, to: &str, overwrite: bool) -> anyhow::Result<()> {
    let Database::Sqlite(path) = Database::parse(from) else {
        anyhow::bail!("--from must be a SQLite database (sqlite:PATH)");
    };
    let Database::Postgres(url) = Database::parse(to) else {
        anyhow::bail!("--to must be a PostgreSQL URL (postgres://...)");
    };
    let copied = twofold_control::store::migrate::sqlite_to_postgres(&path, &url, overwrite)?;
    for (table, rows) in &copied.rows {
        println!("{table}: {rows} rows");
    }
    println!(
        "migrated {} to PostgreSQL at head seq {}; data planes resume from it",
        path.display(),
        copied.head
    );
    Ok(())
}

/// `twofold keys rotate`. Prints key ids, never keys.
fn rotate_keys(common: &CommonArgs) -> anyhow::Result<()> {
    let file = File::load(common.config.as_deref())?;
    let common = settings::common(common, &file);
    let rotated = keyfile::rotate(&common.data_dir, common.master_key_file.as_deref())?;
    println!(
        "new master key {} appended to {} ({} keys); it seals everything new once a plane \
         restarts with this file. The primary key {} stays first: it keys the hashes.",
        rotated.active,
        rotated.path.display(),
        rotated.count,
        rotated.primary
    );
    println!("key id: {}", rotated.active);
    Ok(())
}

fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TWOFOLD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Cancel `token` on Ctrl-C or SIGTERM.
pub(crate) fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = ctrl_c => {}
                        _ = term.recv() => {}
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    let _ = ctrl_c.await;
                }
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutting down");
        token.cancel();
    });
}

/// Say on stdout where a plane listens, in one stable line (`twofold <plane>
/// listening on http://ADDR`, or `https://`), so scripts and tests can use port 0.
fn announce(plane: &str, listener: &TcpListener, tls: bool) -> anyhow::Result<()> {
    let scheme = if tls { "https" } else { "http" };
    println!(
        "twofold {plane} listening on {scheme}://{}",
        listener.local_addr()?
    );
    Ok(())
}

async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
}

async fn run_control(
    common: CommonArgs,
    args: ControlArgs,
    throttle: ThrottleArgs,
) -> anyhow::Result<()> {
    let file = File::load(common.config.as_deref())?;
    let common = settings::common(&common, &file);
    init_logging(common.log_format, "info");
    let control = settings::control(&args, &file)?;
    let throttle = settings::throttle(&throttle, &file)?;
    let keyring = keyfile::load_keyring(&common.data_dir, common.master_key_file.as_deref())?;
    let shutdown = CancellationToken::new();
    let listen = control.listen;
    let tls = control.tls.is_some();
    let (state, token) = tokio::task::block_in_place(|| {
        planes::control(
            &common.data_dir,
            keyring,
            control,
            throttle,
            shutdown.clone(),
        )
    })?;
    if let Some(token) = token {
        // Printed once, to the terminal, never to the log.
        println!(
            "Operator token (shown once; keep it safe): {}",
            token.as_str()
        );
    }
    let listener = bind(listen).await?;
    announce("control", &listener, tls)?;
    cancel_on_signal(shutdown);
    twofold_control::serve(listener, state).await?;
    Ok(())
}

async fn run_data(common: CommonArgs, args: DataArgs) -> anyhow::Result<()> {
    let file = File::load(common.config.as_deref())?;
    let common = settings::common(&common, &file);
    init_logging(common.log_format, "info");
    let throttle = settings::throttle(&args.throttle, &file)?;
    let data = settings::data(&args, &file)?;
    let keyring = keyfile::load_keyring(&common.data_dir, common.master_key_file.as_deref())?;
    let shutdown = CancellationToken::new();
    let listen = data.listen;
    let tls = data.tls.is_some();
    let (node, replica) =
        planes::data(&common.data_dir, keyring, data, throttle, shutdown.clone())?;
    let listener = bind(listen).await?;
    announce("data", &listener, tls)?;
    cancel_on_signal(shutdown);
    twofold_data::server::serve(listener, node, replica).await?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Up {
            common,
            control_listen,
            data_listen,
            operator_token,
            throttle,
        } => {
            let file = File::load(common.config.as_deref())?;
            let common = settings::common(&common, &file);
            // Keep the terminal for the banner: only warnings unless asked.
            init_logging(common.log_format, "warn");
            let throttle = settings::throttle(&throttle, &file)?;
            let (control_listen, data_listen, operator_token) =
                settings::up(control_listen, data_listen, operator_token, &file);
            up::run(
                common,
                control_listen,
                data_listen,
                operator_token,
                throttle,
            )
            .await
        }
        Command::Control {
            action:
                Some(ControlAction::Migrate {
                    from,
                    to,
                    overwrite,
                }),
            ..
        } => tokio::task::block_in_place(|| migrate(&from, &to, overwrite)),
        Command::Control {
            action: None,
            common,
            control,
            throttle,
        } => run_control(common, control, throttle).await,
        Command::Data { common, data } => run_data(common, data).await,
        Command::Keys {
            action: KeysAction::Rotate { common },
        } => rotate_keys(&common),
    }
}
