//! Starting a node: load the replica from disk, replay the outbox, then run the
//! sync loop, the usage reporter and the HTTP server until shutdown.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::index::Index;
use crate::node::Node;
use crate::outbox::Outbox;
use crate::replica::Replica;
use crate::{api, report, sync};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Replica(#[from] crate::replica::ReplicaError),
    #[error(transparent)]
    Outbox(#[from] crate::outbox::OutboxError),
    #[error("{0}")]
    Other(String),
}

/// Load the node's state from `config.data_dir`. A replica that was synced before
/// makes the node ready at once, with no control plane needed.
pub fn load(
    config: Config,
    shutdown: CancellationToken,
) -> Result<(Arc<Node>, Replica), StartError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|e| StartError::Other(e.to_string()))?;
    let replica = Replica::open(&config.data_dir)?;
    let index = Index::default();
    let started = std::time::Instant::now();
    let loaded = replica.load_into(&index)?;
    let load_ms = started.elapsed().as_millis();
    let opened = Outbox::open(&config.data_dir)?;
    let applied = replica.position().applied;
    let synced = !replica.is_empty();
    let node = Node::new(config, index, applied, opened, shutdown).map_err(StartError::Other)?;
    if synced {
        node.sync.ready.store(true, Ordering::SeqCst);
        node.sync.head.store(applied, Ordering::SeqCst);
        tracing::info!(
            applied,
            entities = loaded,
            load_ms,
            "replica loaded; serving from it"
        );
    } else {
        tracing::info!("empty replica; not ready until the first snapshot is loaded");
    }
    Ok((node, replica))
}

/// Serve a loaded node on `listener` (HTTPS if `config.http` has a certificate)
/// until `node.shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    node: Arc<Node>,
    replica: Replica,
) -> std::io::Result<()> {
    let syncer = tokio::spawn(sync::run(node.clone(), replica));
    let reporter = tokio::spawn(report::run(node.clone()));
    let shutdown = node.shutdown.clone();
    tracing::info!(addr = %listener.local_addr()?, "data plane listening");
    let http = node.config.http.clone();
    let node_outbox = node.outbox.clone();
    let result = twofold_serve::serve(listener, api::app(node), &http, shutdown).await;
    let _ = syncer.await;
    let _ = reporter.await;
    // Failures still queued for a group commit are kept for the next start.
    if let Err(e) = node_outbox.flush().await {
        tracing::error!(error = %e, "cannot commit the last usage events at shutdown");
    }
    result
}
