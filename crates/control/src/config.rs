//! Control-plane settings, with their defaults. The `twofold` binary fills them
//! from flags, the environment and a file; tests build them directly.

use std::time::Duration;

use twofold_core::seal::Keyring;
use twofold_core::throttle::ThrottlePolicy;

/// How long an enrolled factor may wait for its first code.
pub const DEFAULT_PENDING_TTL: Duration = Duration::from_secs(10 * 60);
/// TOTP factors one user may hold (for example a phone and a spare).
pub const DEFAULT_MAX_TOTP_FACTORS: usize = 5;
/// Changes kept in the log, counted back from the head.
pub const DEFAULT_RETAIN_CHANGES: u64 = 1_000_000;
/// Changes older than this are dropped from the log (the newest is always kept).
pub const DEFAULT_RETAIN_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often the change log is compacted (the first pass runs at start).
pub const DEFAULT_COMPACT_EVERY: Duration = Duration::from_secs(60);
/// Factors re-sealed per write transaction after a key rotation. Each
/// re-sealed active factor is one op of that batch's change (a few hundred
/// bytes), so a batch stays far below a data plane's 1 MiB line limit.
pub const DEFAULT_RESEAL_BATCH: usize = 500;
/// How long re-sealing waits before another pass when a pass could not finish
/// (a secret it cannot open, or the database out of reach).
pub const DEFAULT_RESEAL_RETRY: Duration = Duration::from_secs(30);
/// How often an idle change stream says it is alive.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
/// Largest request body accepted.
pub const DEFAULT_BODY_LIMIT: usize = 64 * 1024;
/// Issuer shown in authenticator apps when enrolment names none.
pub const DEFAULT_ISSUER: &str = "Twofold";

/// Everything the control plane needs to run, apart from where it listens.
pub struct Config {
    /// Seals TOTP secrets and keys the hashes of API keys and backup codes.
    pub keyring: Keyring,
    /// If set, the operator token; its hash replaces any stored one.
    pub operator_token: Option<String>,
    pub pending_ttl: Duration,
    pub max_totp_factors: usize,
    pub retain_changes: u64,
    pub retain_age: Duration,
    /// How often compaction applies the two limits above; must not be zero.
    pub compact_every: Duration,
    pub heartbeat: Duration,
    /// Factors per re-sealing transaction; at least 1.
    pub reseal_batch: usize,
    pub reseal_retry: Duration,
    pub body_limit: usize,
    pub default_issuer: String,
    /// Applied when merging data planes' failure reports; must match theirs.
    pub throttle: ThrottlePolicy,
    /// TLS and connection limits of the HTTP server.
    pub http: twofold_serve::Config,
}

impl Config {
    pub fn new(keyring: Keyring) -> Config {
        Config {
            keyring,
            operator_token: None,
            pending_ttl: DEFAULT_PENDING_TTL,
            max_totp_factors: DEFAULT_MAX_TOTP_FACTORS,
            retain_changes: DEFAULT_RETAIN_CHANGES,
            retain_age: DEFAULT_RETAIN_AGE,
            compact_every: DEFAULT_COMPACT_EVERY,
            heartbeat: DEFAULT_HEARTBEAT,
            reseal_batch: DEFAULT_RESEAL_BATCH,
            reseal_retry: DEFAULT_RESEAL_RETRY,
            body_limit: DEFAULT_BODY_LIMIT,
            default_issuer: DEFAULT_ISSUER.to_owned(),
            throttle: ThrottlePolicy::default(),
            http: twofold_serve::Config::default(),
        }
    }
}

impl std::fmt::Debug for Config {
    /// Everything but the operator token, which is only said to be set or not.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("keyring", &self.keyring)
            .field(
                "operator_token",
                &self.operator_token.as_ref().map(|_| "<redacted>"),
            )
            .field("pending_ttl", &self.pending_ttl)
            .field("max_totp_factors", &self.max_totp_factors)
            .field("retain_changes", &self.retain_changes)
            .field("retain_age", &self.retain_age)
            .field("compact_every", &self.compact_every)
            .field("heartbeat", &self.heartbeat)
            .field("reseal_batch", &self.reseal_batch)
            .field("reseal_retry", &self.reseal_retry)
            .field("body_limit", &self.body_limit)
            .field("default_issuer", &self.default_issuer)
            .field("throttle", &self.throttle)
            .field("http", &self.http)
            .finish()
    }
}
