//! Twofold control plane: every change goes here.
//!
//! # Layout
//!
//! - [`store`]: SQLite state and the change log, written in one transaction per
//!   mutation (a transactional outbox) so seq order equals commit order.
//! - [`api`]: the HTTP API under `/v1` ([`api::app`] builds the router), including
//!   the feed that data planes replicate from.
//! - [`auth`]: the operator token and API keys with scopes.
//! - [`reseal`]: after a master-key rotation, re-sealing every TOTP secret
//!   under the active key, in the background and through the change log.
//! - [`config`], [`state`], [`error`], [`metrics`]: settings, shared handler
//!   state, the one HTTP error type, Prometheus metrics.
//!
//! [`serve`] runs the whole plane on a listener until shutdown.

pub mod api;
pub mod auth;
pub mod config;
pub mod error;
pub mod metrics;
pub mod reseal;
pub mod server;
pub mod state;
pub mod store;

pub use server::serve;
