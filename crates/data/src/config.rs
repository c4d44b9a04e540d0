//! Data-plane settings, with their defaults. The `twofold` binary fills them from
//! flags, the environment and a file; tests build them directly.

use std::path::PathBuf;
use std::time::Duration;

use twofold_core::otp::Skew;
use twofold_core::seal::Keyring;
use twofold_core::throttle::ThrottlePolicy;

/// A change stream silent for this long is dead (three missed heartbeats).
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(15);
/// First reconnect delay; doubles on each failure up to the maximum.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(100);
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Largest verify request body.
pub const DEFAULT_BODY_LIMIT: usize = 16 * 1024;
/// Largest feed line accepted; a longer one is refused without being applied.
pub const DEFAULT_MAX_LINE: usize = 1024 * 1024;
/// How long a strict backup-code use waits for the control plane.
pub const DEFAULT_STRICT_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything a data plane needs to run, apart from where it listens.
pub struct Config {
    /// Where `replica.db` and `local.db` live.
    pub data_dir: PathBuf,
    /// Base URLs of control planes; any one will do.
    pub control_urls: Vec<String>,
    /// A node key (scope `replicate`) for the feed and usage reports.
    pub node_token: String,
    /// Opens sealed secrets and keys the hashes of API keys and backup codes; the
    /// same keys as the control plane's.
    pub keyring: Keyring,
    pub skew: Skew,
    pub throttle: ThrottlePolicy,
    pub heartbeat_timeout: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub body_limit: usize,
    pub max_line: usize,
    /// Make each backup-code use wait for the control plane's acknowledgement,
    /// failing closed while it is down. Off by default: availability first.
    pub strict_backup_codes: bool,
    pub strict_timeout: Duration,
    /// PEM bundle whose certificates are the only roots trusted for `https://`
    /// control URLs; the system's roots when `None`.
    pub control_ca: Option<PathBuf>,
    /// TLS and connection limits of the HTTP server.
    pub http: twofold_serve::Config,
}

impl Config {
    pub fn new(
        data_dir: PathBuf,
        control_urls: Vec<String>,
        node_token: String,
        keyring: Keyring,
    ) -> Config {
        Config {
            data_dir,
            control_urls,
            node_token,
            keyring,
            skew: Skew::default(),
            throttle: ThrottlePolicy::default(),
            heartbeat_timeout: DEFAULT_HEARTBEAT_TIMEOUT,
            backoff_base: DEFAULT_BACKOFF_BASE,
            backoff_max: DEFAULT_BACKOFF_MAX,
            body_limit: DEFAULT_BODY_LIMIT,
            max_line: DEFAULT_MAX_LINE,
            strict_backup_codes: false,
            strict_timeout: DEFAULT_STRICT_TIMEOUT,
            control_ca: None,
            http: twofold_serve::Config::default(),
        }
    }
}

impl std::fmt::Debug for Config {
    /// Everything but the node token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("data_dir", &self.data_dir)
            .field("control_urls", &self.control_urls)
            .field("node_token", &"<redacted>")
            .field("keyring", &self.keyring)
            .field("skew", &self.skew)
            .field("throttle", &self.throttle)
            .field("heartbeat_timeout", &self.heartbeat_timeout)
            .field("backoff_base", &self.backoff_base)
            .field("backoff_max", &self.backoff_max)
            .field("body_limit", &self.body_limit)
            .field("max_line", &self.max_line)
            .field("strict_backup_codes", &self.strict_backup_codes)
            .field("strict_timeout", &self.strict_timeout)
            .field("control_ca", &self.control_ca)
            .field("http", &self.http)
            .finish()
    }
}
