//! Twofold data plane: answers verifications from a local replica, and never
//! waits on the control plane to do so.
//!
//! # Layout
//!
//! - [`replica`]: the durable replica (`replica.db`), applied batch by batch with
//!   its seq, and bootstraps swapped in whole.
//! - [`index`]: the in-memory index verification reads, built from the replica.
//! - [`verify`]: one attempt: throttling, TOTP with replay protection, backup
//!   codes, and the usage events it produces.
//! - [`outbox`]: this node's durable usage events (`local.db`), group-committed.
//! - [`sync`]: the background loop that bootstraps and tails the feed.
//! - [`report`]: the background loop that sends usage events to the control plane.
//! - [`api`]: `POST /v1/verify` and the operational endpoints.
//! - [`node`], [`config`], [`metrics`], [`server`]: shared state, settings,
//!   Prometheus metrics, start-up.
//!
//! This crate never depends on `twofold-control`: both speak the feed protocol in
//! `twofold-core`.

pub mod api;
pub mod config;
pub mod index;
pub mod metrics;
pub mod node;
pub mod outbox;
pub mod replica;
pub mod report;
pub mod server;
pub mod sync;
pub mod verify;
