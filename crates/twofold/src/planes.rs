//! Building each plane from resolved settings, shared by `twofold control`,
//! `twofold data` and `twofold up`.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use twofold_control::config::Config as ControlConfig;
use twofold_control::server::ensure_operator_token;
use twofold_control::state::{AppState, Clock};
use twofold_control::store::{Database, Store};
use twofold_core::seal::Keyring;
use twofold_core::throttle::ThrottlePolicy;
use twofold_data::config::Config as DataConfig;
use twofold_data::node::Node;
use twofold_data::replica::Replica;
use zeroize::Zeroizing;

use crate::settings;

/// Domain of the master key's fingerprint, which the control-plane database
/// keeps to refuse a replica started with another key.
const KEY_CHECK_DOMAIN: &str = "twofold/key-check/v1";

/// The control plane's state (in `data_dir` unless a database is configured),
/// and the operator token if one was just generated (to be shown once). Blocks
/// on the database: call it off the async threads.
pub fn control(
    data_dir: &Path,
    keyring: Keyring,
    settings: settings::Control,
    throttle: ThrottlePolicy,
    shutdown: CancellationToken,
) -> anyhow::Result<(AppState, Option<Zeroizing<String>>)> {
    let database = match settings.database {
        Some(database) => database,
        None => {
            std::fs::create_dir_all(data_dir)
                .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
            Database::Sqlite(data_dir.join("control.db"))
        }
    };
    let store = Store::connect(&database).context("cannot open the control-plane database")?;
    // Replicas sharing one database must share the master key too: refuse to
    // seal with another one.
    let fingerprint = keyring.hash_key().hash(KEY_CHECK_DOMAIN, b"");
    if !store.check_key(&fingerprint)? {
        anyhow::bail!(
            "the database was written with another master key; give this replica the same key \
             (--master-key-file or TWOFOLD_MASTER_KEY)"
        );
    }
    // A keyring that cannot open every stored secret would fail activations and
    // leave re-sealing undone: refuse it before anything is written.
    twofold_control::reseal::check_keys(&store, &keyring)?;
    let mut config = ControlConfig::new(keyring);
    config.operator_token = settings.operator_token;
    config.throttle = throttle;
    config.http.tls = settings.tls;
    if let Some(keep) = settings.retain_changes {
        config.retain_changes = keep;
    }
    if let Some(age) = settings.retain_age {
        config.retain_age = age;
    }
    if let Some(every) = settings.compact_every {
        config.compact_every = every;
    }
    let state = AppState::new(store, config, Clock::system(), shutdown);
    let token = ensure_operator_token(&state)?;
    Ok((state, token))
}

/// A data-plane node loaded from `data_dir`.
pub fn data(
    data_dir: &Path,
    keyring: Keyring,
    settings: settings::Data,
    throttle: ThrottlePolicy,
    shutdown: CancellationToken,
) -> anyhow::Result<(Arc<Node>, Replica)> {
    if settings.control_urls.is_empty() {
        anyhow::bail!(
            "give at least one control-plane URL (--control-url or TWOFOLD_CONTROL_URLS)"
        );
    }
    let node_token = settings.node_token.context(
        "give the node key (--node-token or TWOFOLD_NODE_TOKEN), from POST /v1/node-keys",
    )?;
    let mut config = DataConfig::new(
        data_dir.to_owned(),
        settings.control_urls,
        node_token,
        keyring,
    );
    config.throttle = throttle;
    config.strict_backup_codes = settings.strict_backup_codes;
    config.skew = settings.skew;
    config.control_ca = settings.control_ca;
    config.http.tls = settings.tls;
    twofold_data::server::load(config, shutdown).context("cannot load the replica")
}
