//! After a master-key rotation: re-sealing every TOTP secret under the active
//! key, and reporting which keys still seal anything.
//!
//! Re-sealing runs in the background after start, a batch of factors per write
//! transaction, and goes *through the change log*: each batch publishes the
//! re-sealed active factors, so data planes (which got the new key by
//! configuration first) replace their blobs too. Requests are never blocked for
//! longer than one batch's transaction. Rows are read again inside that
//! transaction, so a concurrent change is never overwritten. A secret that
//! cannot be opened is left exactly as it is and logged; the pass then retries
//! later instead of finishing.
//!
//! Only the sealing keys rotate. The hash key comes from the primary key (the
//! first of the key file) and stays, because the hashes of API keys and backup
//! codes cannot be recomputed.

use std::collections::BTreeMap;

use twofold_core::seal::{Binding, KeyId, Keyring, Sealed};

use crate::state::{AppState, Inner};
use crate::store::{FactorRow, Store, StoreError};

/// Pause between two batches, so other writers get the database between them.
const PAUSE: std::time::Duration = std::time::Duration::from_millis(5);

/// Why a control plane may not start with a keyring.
#[derive(Debug, thiserror::Error)]
pub enum KeyCheckError {
    #[error(
        "{count} stored secrets are sealed under master key {id}, which this keyring does not \
         hold; add that key to the key file (or TWOFOLD_MASTER_KEY) and start again"
    )]
    Missing { id: KeyId, count: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Refuse a keyring that cannot open every stored secret: a control plane
/// started with it could not activate factors, and would leave re-sealing
/// half done. Checked by key id, without opening anything.
pub fn check_keys(store: &Store, keyring: &Keyring) -> Result<(), KeyCheckError> {
    for (id, count) in store.sealed_by_key()? {
        if !keyring.ids().any(|k| k == id) {
            return Err(KeyCheckError::Missing { id, count });
        }
    }
    Ok(())
}

/// One key as [`report`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyUse {
    pub id: KeyId,
    /// Stored TOTP secrets, pending or active, sealed under it.
    pub secrets: u64,
    pub in_keyring: bool,
}

/// Which keys seal the stored secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyReport {
    pub active: KeyId,
    pub primary: KeyId,
    /// Every key of the keyring, and any other key a stored secret names, by id.
    pub keys: Vec<KeyUse>,
}

impl KeyReport {
    /// Does every stored secret use the active key?
    pub fn resealed(&self) -> bool {
        self.keys
            .iter()
            .all(|k| k.id == self.active || k.secrets == 0)
    }

    /// Keys of the keyring that seal nothing, are not active and are not the
    /// primary: they may be removed from the key files.
    pub fn removable(&self) -> Vec<KeyId> {
        self.keys
            .iter()
            .filter(|k| {
                k.in_keyring && k.secrets == 0 && k.id != self.active && k.id != self.primary
            })
            .map(|k| k.id)
            .collect()
    }
}

/// Count the secrets each key seals. Blocking.
pub fn report(store: &Store, keyring: &Keyring) -> Result<KeyReport, StoreError> {
    let counts = store.sealed_by_key()?;
    let mut keys: BTreeMap<KeyId, KeyUse> = keyring
        .ids()
        .map(|id| {
            (
                id,
                KeyUse {
                    id,
                    secrets: 0,
                    in_keyring: true,
                },
            )
        })
        .collect();
    for (id, secrets) in counts {
        keys.entry(id)
            .or_insert(KeyUse {
                id,
                secrets: 0,
                in_keyring: false,
            })
            .secrets = secrets;
    }
    Ok(KeyReport {
        active: keyring.active_id(),
        primary: keyring.primary_id(),
        keys: keys.into_values().collect(),
    })
}

/// What one batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// The last factor id looked at; `None` once every factor has been.
    pub next: Option<String>,
    pub resealed: usize,
    /// Secrets that could not be opened (or are malformed), left unchanged.
    pub skipped: usize,
}

fn key_id_of(blob: &[u8]) -> Option<KeyId> {
    Sealed::from_bytes(blob).ok().map(|s| s.key_id())
}

/// The row's secret sealed again under the active key, or `None` if it already
/// is, or cannot be opened (counted in `skipped`).
fn reseal_row(keyring: &Keyring, row: &FactorRow, skipped: &mut usize) -> Option<Vec<u8>> {
    let sealed = match Sealed::from_bytes(&row.sealed) {
        Ok(sealed) => sealed,
        Err(e) => {
            *skipped += 1;
            tracing::error!(factor = %row.id, error = %e, "a stored secret is malformed; left as it is");
            return None;
        }
    };
    if sealed.key_id() == keyring.active_id() {
        return None;
    }
    // The owner the secret was sealed for at enrolment; the data plane opens it
    // with the same one.
    let binding = Binding {
        tenant: &row.tenant,
        user: &row.user,
        factor: &row.id,
    };
    let resealed = keyring
        .open(&sealed, &binding)
        .and_then(|plain| keyring.seal(&plain, &binding));
    match resealed {
        Ok(blob) => Some(blob.into_bytes()),
        Err(e) => {
            *skipped += 1;
            tracing::error!(factor = %row.id, key_id = %sealed.key_id(), error = %e,
                "cannot re-seal a stored secret; left as it is");
            None
        }
    }
}

/// Re-seal the factors of the next page after the id `after` ("" for the
/// first) that the active key does not seal. Blocking.
pub fn reseal_batch(state: &Inner, after: &str) -> Result<Batch, StoreError> {
    let keyring = &state.config.keyring;
    let active = keyring.active_id();
    let limit = state.config.reseal_batch.max(1);
    let page = state.store.sealed_page(after, limit)?;
    let Some((through, _)) = page.last() else {
        return Ok(Batch::default());
    };
    let mut batch = Batch {
        next: (page.len() == limit).then(|| through.clone()),
        ..Batch::default()
    };
    // Most pages of a store already re-sealed, or never rotated, need no write.
    if page.iter().all(|(_, blob)| key_id_of(blob) == Some(active)) {
        return Ok(batch);
    }
    let mut skipped = 0;
    batch.resealed = state.store.reseal_factors(
        state.clock.now_ms(),
        after,
        through,
        &active.to_string(),
        &mut |row| reseal_row(keyring, row, &mut skipped),
    )?;
    batch.skipped = skipped;
    Ok(batch)
}

/// One pass over every factor; returns how many were re-sealed and skipped, or
/// `None` if shutdown came first.
async fn pass(state: &AppState) -> Result<Option<(usize, usize)>, StoreError> {
    let (mut resealed, mut skipped) = (0, 0);
    let mut after = String::new();
    loop {
        let worker = state.clone();
        let from = after.clone();
        let batch = tokio::task::spawn_blocking(move || reseal_batch(&worker, &from))
            .await
            .map_err(|e| StoreError::Corrupt(format!("re-sealing panicked: {e}")))??;
        resealed += batch.resealed;
        skipped += batch.skipped;
        if batch.resealed > 0 {
            tracing::debug!(resealed = batch.resealed, "re-sealed a batch of secrets");
        }
        let Some(next) = batch.next else {
            return Ok(Some((resealed, skipped)));
        };
        after = next;
        tokio::select! {
            () = tokio::time::sleep(PAUSE) => {}
            () = state.shutdown.cancelled() => return Ok(None),
        }
    }
}

/// Re-seal every secret the active key does not seal, then log which keys may
/// be removed, and stop. A pass that could not finish is tried again after
/// `reseal_retry`. Nothing to do with a single key.
pub async fn reseal_forever(state: AppState) {
    let keyring = state.config.keyring.clone();
    if keyring.ids().count() < 2 {
        return;
    }
    loop {
        let outcome = match pass(&state).await {
            Ok(None) => return,
            Ok(Some((resealed, skipped))) => {
                let worker = state.clone();
                let ring = keyring.clone();
                match tokio::task::spawn_blocking(move || report(&worker.store, &ring)).await {
                    Ok(Ok(report)) => Ok((resealed, skipped, report)),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(e) => Err(e.to_string()),
                }
            }
            Err(e) => Err(e.to_string()),
        };
        match outcome {
            Ok((resealed, _, report)) if report.resealed() => {
                let removable: Vec<String> =
                    report.removable().iter().map(KeyId::to_string).collect();
                tracing::info!(
                    resealed,
                    active = %report.active,
                    primary = %report.primary,
                    removable = %removable.join(","),
                    "re-sealing complete: every secret is sealed under the active key; the \
                     removable keys seal nothing and may be removed from the key files (the \
                     primary stays: it keys the hashes of API keys and backup codes)"
                );
                return;
            }
            Ok((resealed, skipped, report)) => {
                let left: u64 = report
                    .keys
                    .iter()
                    .filter(|k| k.id != report.active)
                    .map(|k| k.secrets)
                    .sum();
                tracing::warn!(
                    resealed,
                    skipped,
                    left,
                    retry_in = ?state.config.reseal_retry,
                    "re-sealing could not finish; secrets under other keys remain"
                );
            }
            Err(e) => tracing::warn!(error = %e, retry_in = ?state.config.reseal_retry,
                "re-sealing failed; will try again"),
        }
        tokio::select! {
            () = tokio::time::sleep(state.config.reseal_retry) => {}
            () = state.shutdown.cancelled() => return,
        }
    }
}
