//! Settings: command-line flags, then `TWOFOLD_*` environment variables (both
//! parsed by clap), then an optional TOML file, then the documented defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use serde::Deserialize;
use twofold_control::store::Database;
use twofold_core::otp::Skew;
use twofold_core::throttle::ThrottlePolicy;
use twofold_serve::Tls;

pub const DEFAULT_DATA_DIR: &str = "./twofold-data";
pub const DEFAULT_CONTROL_LISTEN: &str = "127.0.0.1:7070";
pub const DEFAULT_DATA_LISTEN: &str = "127.0.0.1:7071";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Settings every command takes.
#[derive(Debug, Args)]
pub struct CommonArgs {
    /// TOML file with settings; flags and environment variables override it.
    #[arg(long, env = "TWOFOLD_CONFIG")]
    pub config: Option<PathBuf>,

    /// Directory for databases and the master key file [default: ./twofold-data].
    #[arg(long, env = "TWOFOLD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// File holding the base64 master keys, one per line: the first keys the
    /// hashes, the last seals new secrets, all open. Created with one key and
    /// mode 0600 on first start if missing [default: DATA_DIR/master.key].
    /// TWOFOLD_MASTER_KEY may carry the keys themselves, comma-separated.
    #[arg(long, env = "TWOFOLD_MASTER_KEY_FILE")]
    pub master_key_file: Option<PathBuf>,

    /// Log format [default: text]. The level is set with TWOFOLD_LOG (for example
    /// `info` or `twofold_data=debug`).
    #[arg(long, env = "TWOFOLD_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
}

/// Control-plane settings.
#[derive(Debug, Args)]
pub struct ControlArgs {
    /// Address the control plane listens on [default: 127.0.0.1:7070].
    #[arg(long, env = "TWOFOLD_CONTROL_LISTEN")]
    pub listen: Option<SocketAddr>,

    /// Operator token (starts with `tfo_`). If unset, one is generated on first
    /// start, printed once, and only its hash is stored.
    #[arg(long, env = "TWOFOLD_OPERATOR_TOKEN", hide_env_values = true)]
    pub operator_token: Option<String>,

    /// Where the control plane keeps its state: a PostgreSQL URL
    /// (`postgres://USER@HOST/DB`), which several control-plane replicas may
    /// share, or `sqlite:PATH` [default: sqlite:DATA_DIR/control.db].
    #[arg(long, env = "TWOFOLD_DATABASE_URL", hide_env_values = true)]
    pub database: Option<String>,

    /// Changes kept in the log, counted back from the head [default: 1000000].
    #[arg(long, env = "TWOFOLD_RETAIN_CHANGES")]
    pub retain_changes: Option<u64>,

    /// Seconds a change is kept in the log [default: 604800, 7 days].
    #[arg(long, env = "TWOFOLD_RETAIN_SECS")]
    pub retain_secs: Option<u64>,

    /// Seconds between two compactions of the change log, which drop what the
    /// two limits above no longer keep; the first runs at start [default: 60].
    #[arg(long, env = "TWOFOLD_COMPACT_EVERY_SECS")]
    pub compact_every_secs: Option<u64>,

    #[command(flatten)]
    pub tls: TlsArgs,
}

/// Serving HTTPS; both or neither.
#[derive(Debug, Args, Default)]
pub struct TlsArgs {
    /// PEM certificate chain (leaf first) to serve HTTPS with; needs --tls-key.
    /// Without both, the plane serves plain HTTP.
    #[arg(long, env = "TWOFOLD_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of --tls-cert.
    #[arg(long, env = "TWOFOLD_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
}

/// Data-plane settings.
#[derive(Debug, Args)]
pub struct DataArgs {
    /// Address the data plane listens on [default: 127.0.0.1:7071].
    #[arg(long, env = "TWOFOLD_DATA_LISTEN")]
    pub listen: Option<SocketAddr>,

    /// Control-plane base URL to replicate from; repeat, or separate with commas,
    /// for several (any one will do).
    #[arg(
        long = "control-url",
        env = "TWOFOLD_CONTROL_URLS",
        value_delimiter = ','
    )]
    pub control_urls: Vec<String>,

    /// Node key (scope replicate) for the feed, from `POST /v1/node-keys`.
    #[arg(long, env = "TWOFOLD_NODE_TOKEN", hide_env_values = true)]
    pub node_token: Option<String>,

    /// Make each backup-code use wait for the control plane's acknowledgement,
    /// failing closed while it is down [default: false].
    #[arg(long, env = "TWOFOLD_STRICT_BACKUP_CODES")]
    pub strict_backup_codes: Option<bool>,

    /// Time steps a TOTP code may be behind or ahead of the verifier's clock,
    /// 0 to 10 [default: 1].
    #[arg(long, env = "TWOFOLD_SKEW_STEPS")]
    pub skew_steps: Option<u8>,

    /// PEM bundle of the CA certificates to trust for https:// control URLs,
    /// instead of the system's roots.
    #[arg(long, env = "TWOFOLD_CONTROL_CA")]
    pub control_ca: Option<PathBuf>,

    #[command(flatten)]
    pub tls: TlsArgs,

    #[command(flatten)]
    pub throttle: ThrottleArgs,
}

/// Throttling and lockout; must match the control plane's.
#[derive(Debug, Args, Default)]
pub struct ThrottleArgs {
    /// Consecutive failures allowed before attempts are throttled [default: 5].
    #[arg(long, env = "TWOFOLD_THROTTLE_FREE_FAILURES")]
    pub free_failures: Option<u32>,

    /// First throttle delay in seconds; doubles per failure [default: 30].
    #[arg(long, env = "TWOFOLD_THROTTLE_BASE_SECS")]
    pub backoff_base_secs: Option<u64>,

    /// Longest throttle delay in seconds [default: 900].
    #[arg(long, env = "TWOFOLD_THROTTLE_MAX_SECS")]
    pub backoff_max_secs: Option<u64>,

    /// Consecutive failures after which a user is locked until unlocked on the
    /// control plane [default: 100].
    #[arg(long, env = "TWOFOLD_LOCK_AFTER")]
    pub lock_after: Option<u32>,
}

/// The TOML file. Every key is optional; unknown keys are an error.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    data_dir: Option<PathBuf>,
    master_key_file: Option<PathBuf>,
    log_format: Option<LogFormat>,
    #[serde(default)]
    control: ControlFile,
    #[serde(default)]
    data: DataFile,
    #[serde(default)]
    throttle: ThrottleFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ControlFile {
    listen: Option<SocketAddr>,
    database: Option<String>,
    operator_token: Option<String>,
    retain_changes: Option<u64>,
    retain_secs: Option<u64>,
    compact_every_secs: Option<u64>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DataFile {
    listen: Option<SocketAddr>,
    #[serde(default)]
    control_urls: Vec<String>,
    node_token: Option<String>,
    strict_backup_codes: Option<bool>,
    skew_steps: Option<u8>,
    control_ca: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ThrottleFile {
    free_failures: Option<u32>,
    backoff_base_secs: Option<u64>,
    backoff_max_secs: Option<u64>,
    lock_after: Option<u32>,
}

impl File {
    pub fn load(path: Option<&Path>) -> anyhow::Result<File> {
        let Some(path) = path else {
            return Ok(File::default());
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read settings file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid settings file {}", path.display()))
    }
}

/// Settings both planes share, resolved.
#[derive(Debug)]
pub struct Common {
    pub data_dir: PathBuf,
    pub master_key_file: Option<PathBuf>,
    pub log_format: LogFormat,
}

pub fn common(args: &CommonArgs, file: &File) -> Common {
    Common {
        data_dir: args
            .data_dir
            .clone()
            .or_else(|| file.data_dir.clone())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
        master_key_file: args
            .master_key_file
            .clone()
            .or_else(|| file.master_key_file.clone()),
        log_format: args
            .log_format
            .or(file.log_format)
            .unwrap_or(LogFormat::Text),
    }
}

fn default_addr(text: &str) -> SocketAddr {
    // The defaults are literal loopback addresses.
    text.parse()
        .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)))
}

/// Listen addresses and operator token of `twofold up`.
pub fn up(
    control_listen: Option<SocketAddr>,
    data_listen: Option<SocketAddr>,
    operator_token: Option<String>,
    file: &File,
) -> (SocketAddr, SocketAddr, Option<String>) {
    (
        control_listen
            .or(file.control.listen)
            .unwrap_or_else(|| default_addr(DEFAULT_CONTROL_LISTEN)),
        data_listen
            .or(file.data.listen)
            .unwrap_or_else(|| default_addr(DEFAULT_DATA_LISTEN)),
        operator_token.or_else(|| file.control.operator_token.clone()),
    )
}

/// The certificate and key to serve HTTPS with, from flags, environment and
/// file; `None` for plain HTTP. One without the other is an error.
fn tls(
    args: &TlsArgs,
    file_cert: Option<&PathBuf>,
    file_key: Option<&PathBuf>,
) -> anyhow::Result<Option<Tls>> {
    let cert = args.tls_cert.as_ref().or(file_cert);
    let key = args.tls_key.as_ref().or(file_key);
    match (cert, key) {
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => Ok(Some(
            Tls::from_pem_files(cert, key).context("cannot set up TLS")?,
        )),
        (Some(_), None) => bail!(
            "a TLS certificate was given without its key: give --tls-key (TWOFOLD_TLS_KEY) too, \
             or neither for plain HTTP"
        ),
        (None, Some(_)) => bail!(
            "a TLS key was given without its certificate: give --tls-cert (TWOFOLD_TLS_CERT) too, \
             or neither for plain HTTP"
        ),
    }
}

/// Control-plane settings, resolved.
#[derive(Debug)]
pub struct Control {
    pub listen: SocketAddr,
    /// `None`: SQLite in the data directory.
    pub database: Option<Database>,
    pub tls: Option<Tls>,
    pub operator_token: Option<String>,
    pub retain_changes: Option<u64>,
    pub retain_age: Option<Duration>,
    pub compact_every: Option<Duration>,
}

pub fn control(args: &ControlArgs, file: &File) -> anyhow::Result<Control> {
    let operator_token = args
        .operator_token
        .clone()
        .or_else(|| file.control.operator_token.clone());
    if let Some(token) = &operator_token
        && (!token.starts_with("tfo_") || token.len() < 24)
    {
        bail!("the operator token must start with tfo_ and be at least 24 characters long");
    }
    let compact_every_secs = args.compact_every_secs.or(file.control.compact_every_secs);
    if compact_every_secs == Some(0) {
        bail!("compact_every_secs must be at least 1");
    }
    Ok(Control {
        listen: args
            .listen
            .or(file.control.listen)
            .unwrap_or_else(|| default_addr(DEFAULT_CONTROL_LISTEN)),
        tls: tls(
            &args.tls,
            file.control.tls_cert.as_ref(),
            file.control.tls_key.as_ref(),
        )?,
        operator_token,
        database: args
            .database
            .as_deref()
            .or(file.control.database.as_deref())
            .map(Database::parse),
        retain_changes: args.retain_changes.or(file.control.retain_changes),
        retain_age: args
            .retain_secs
            .or(file.control.retain_secs)
            .map(Duration::from_secs),
        compact_every: compact_every_secs.map(Duration::from_secs),
    })
}

/// Data-plane settings, resolved.
#[derive(Debug)]
pub struct Data {
    pub listen: SocketAddr,
    pub tls: Option<Tls>,
    pub control_ca: Option<PathBuf>,
    pub control_urls: Vec<String>,
    pub node_token: Option<String>,
    pub strict_backup_codes: bool,
    pub skew: Skew,
}

pub fn data(args: &DataArgs, file: &File) -> anyhow::Result<Data> {
    let steps = args.skew_steps.or(file.data.skew_steps).unwrap_or(1);
    let skew = Skew::try_new(steps, steps).context("invalid skew_steps")?;
    Ok(Data {
        listen: args
            .listen
            .or(file.data.listen)
            .unwrap_or_else(|| default_addr(DEFAULT_DATA_LISTEN)),
        tls: tls(
            &args.tls,
            file.data.tls_cert.as_ref(),
            file.data.tls_key.as_ref(),
        )?,
        control_ca: args
            .control_ca
            .clone()
            .or_else(|| file.data.control_ca.clone()),
        control_urls: if args.control_urls.is_empty() {
            file.data.control_urls.clone()
        } else {
            args.control_urls.clone()
        },
        node_token: args
            .node_token
            .clone()
            .or_else(|| file.data.node_token.clone()),
        strict_backup_codes: args
            .strict_backup_codes
            .or(file.data.strict_backup_codes)
            .unwrap_or(false),
        skew,
    })
}

/// The throttle policy, from flags, environment, file and defaults.
pub fn throttle(args: &ThrottleArgs, file: &File) -> anyhow::Result<ThrottlePolicy> {
    let default = ThrottlePolicy::default();
    let f = &file.throttle;
    ThrottlePolicy::try_new(
        args.free_failures
            .or(f.free_failures)
            .unwrap_or(default.free_failures()),
        args.backoff_base_secs
            .or(f.backoff_base_secs)
            .unwrap_or(default.base_secs()),
        args.backoff_max_secs
            .or(f.backoff_max_secs)
            .unwrap_or(default.max_secs()),
        args.lock_after
            .or(f.lock_after)
            .unwrap_or(default.lock_after()),
    )
    .context("invalid throttle settings")
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Probe {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        data: DataArgs,
    }

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let file: File = toml::from_str(
            r#"
            data_dir = "/from/file"
            [data]
            listen = "127.0.0.1:9000"
            control_urls = ["http://a:1"]
            [throttle]
            lock_after = 50
            "#,
        )
        .unwrap();
        let probe = Probe::parse_from(["probe", "--listen", "127.0.0.1:9001"]);
        let common = common(&probe.common, &file);
        assert_eq!(common.data_dir, PathBuf::from("/from/file"));
        assert_eq!(common.log_format, LogFormat::Text);
        let data = data(&probe.data, &file).unwrap();
        assert_eq!(data.skew, Skew::default());
        assert_eq!(data.listen, "127.0.0.1:9001".parse().unwrap());
        assert_eq!(data.control_urls, vec!["http://a:1".to_owned()]);
        assert!(!data.strict_backup_codes);
        let policy = throttle(&probe.data.throttle, &file).unwrap();
        assert_eq!(policy.lock_after(), 50);
        assert_eq!(policy.free_failures(), 5);
    }

    #[derive(Debug, Parser)]
    struct ControlProbe {
        #[command(flatten)]
        control: ControlArgs,
    }

    #[test]
    fn compaction_runs_every_so_many_seconds_but_never_zero() {
        let file: File = toml::from_str("[control]\ncompact_every_secs = 5").unwrap();
        let probe = ControlProbe::parse_from(["probe"]);
        let resolved = control(&probe.control, &file).unwrap();
        assert_eq!(resolved.compact_every, Some(Duration::from_secs(5)));
        let probe = ControlProbe::parse_from(["probe", "--compact-every-secs", "0"]);
        assert!(control(&probe.control, &file).is_err());
        let probe = ControlProbe::parse_from(["probe"]);
        let none = control(&probe.control, &File::default()).unwrap();
        assert_eq!(none.compact_every, None);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        assert!(toml::from_str::<File>("colour = 1").is_err());
        assert!(toml::from_str::<File>("[data]\nlisten = \"nowhere\"").is_err());
        let file: File = toml::from_str("[throttle]\nlock_after = 500").unwrap();
        assert!(throttle(&ThrottleArgs::default(), &file).is_err());
    }
}
