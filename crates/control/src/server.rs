//! Running the control plane: operator token set-up, log compaction and
//! re-sealing (`crate::reseal`) in the background, and the HTTP(S) server (`twofold_serve`) with graceful shutdown.

use tokio::net::TcpListener;
use twofold_core::secret::random_token;
use zeroize::Zeroizing;

use crate::api;
use crate::auth::{OPERATOR_DOMAIN, OPERATOR_PREFIX};
use crate::state::AppState;
use crate::store::StoreError;

/// Make sure an operator token exists. A token given in the configuration
/// replaces the stored hash. Otherwise, on first start, a token is generated and
/// returned so the caller can show it once; only its hash is kept.
pub fn ensure_operator_token(state: &AppState) -> Result<Option<Zeroizing<String>>, StoreError> {
    let hash_key = state.config.keyring.hash_key();
    if let Some(token) = &state.config.operator_token {
        state
            .store
            .set_operator_token_hash(&hash_key.hash(OPERATOR_DOMAIN, token.as_bytes()))?;
        return Ok(None);
    }
    if state.store.operator_token_hash()?.is_some() {
        return Ok(None);
    }
    let token = random_token(OPERATOR_PREFIX).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    // Replicas starting together on one new database each generate a token; the
    // first one stored wins, and only its replica shows it.
    let kept = state
        .store
        .init_operator_token_hash(&hash_key.hash(OPERATOR_DOMAIN, token.as_bytes()))?;
    Ok(kept.then_some(token))
}

/// Drop changes beyond the retention limits, at start and then every
/// `compact_every` (once a minute by default), until shutdown.
async fn compact_forever(state: AppState) {
    // `interval` panics on a zero period; the binary refuses zero anyway.
    let every = state
        .config
        .compact_every
        .max(std::time::Duration::from_millis(1));
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = state.shutdown.cancelled() => return,
        }
        let min_at = state.clock.now_ms() - state.config.retain_age.as_millis() as i64;
        let keep = state.config.retain_changes;
        let worker = state.clone();
        match tokio::task::spawn_blocking(move || worker.store.compact(keep, min_at)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(dropped)) => tracing::info!(dropped, "change log compacted"),
            Ok(Err(e)) => tracing::warn!(error = %e, "change log compaction failed"),
            Err(e) => tracing::error!(error = %e, "change log compaction panicked"),
        }
    }
}

/// Serve the control plane on `listener` (HTTPS if `config.http` has a
/// certificate) until `state.shutdown` is cancelled, then finish in-flight
/// requests and return.
pub async fn serve(listener: TcpListener, state: AppState) -> std::io::Result<()> {
    let compactor = tokio::spawn(compact_forever(state.clone()));
    let resealer = tokio::spawn(crate::reseal::reseal_forever(state.clone()));
    let shutdown = state.shutdown.clone();
    tracing::info!(addr = %listener.local_addr()?, head = state.store.head(), "control plane listening");
    let http = state.config.http.clone();
    let result = twofold_serve::serve(listener, api::app(state), &http, shutdown).await;
    compactor.abort();
    resealer.abort();
    result
}
