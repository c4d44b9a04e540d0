//! Prometheus metrics of a data-plane node: replication progress and lag,
//! verifications by outcome, latency and outbox depth.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::node::{SyncStatus, now_ms};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub verifications: Family<OutcomeLabels, Counter>,
    pub verify_latency: Histogram,
    pub outbox_depth: Gauge<u64, AtomicU64>,
    applied: Gauge<u64, AtomicU64>,
    head: Gauge<u64, AtomicU64>,
    lag_changes: Gauge<u64, AtomicU64>,
    lag_seconds: Gauge<f64, AtomicU64>,
    bootstraps: Gauge<u64, AtomicU64>,
    resumes: Gauge<u64, AtomicU64>,
    changes_applied: Gauge<u64, AtomicU64>,
    out_of_order: Gauge<u64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("twofold_data");
        let verifications = Family::<OutcomeLabels, Counter>::default();
        // 25 µs to about 0.4 s.
        let verify_latency = Histogram::new(exponential_buckets(0.000_025, 2.0, 15));
        let outbox_depth = Gauge::<u64, AtomicU64>::default();
        let applied = Gauge::<u64, AtomicU64>::default();
        let head = Gauge::<u64, AtomicU64>::default();
        let lag_changes = Gauge::<u64, AtomicU64>::default();
        let lag_seconds = Gauge::<f64, AtomicU64>::default();
        let bootstraps = Gauge::<u64, AtomicU64>::default();
        let resumes = Gauge::<u64, AtomicU64>::default();
        let changes_applied = Gauge::<u64, AtomicU64>::default();
        let out_of_order = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "verifications",
            "Verifications by outcome",
            verifications.clone(),
        );
        registry.register(
            "verify_duration_seconds",
            "Verification latency, from request to answer",
            verify_latency.clone(),
        );
        registry.register(
            "outbox_depth",
            "Usage events not yet acknowledged by the control plane",
            outbox_depth.clone(),
        );
        registry.register(
            "applied_seq",
            "Last change applied to the replica",
            applied.clone(),
        );
        registry.register(
            "head_seq",
            "Newest change the control plane announced",
            head.clone(),
        );
        registry.register(
            "lag_changes",
            "Changes announced but not yet applied",
            lag_changes.clone(),
        );
        registry.register(
            "lag_seconds",
            "Seconds since the last line from a control plane",
            lag_seconds.clone(),
        );
        registry.register(
            "bootstraps",
            "Snapshots loaded since start",
            bootstraps.clone(),
        );
        registry.register(
            "resumes",
            "Change streams resumed since start",
            resumes.clone(),
        );
        registry.register(
            "changes_applied",
            "Changes applied from change streams since start",
            changes_applied.clone(),
        );
        registry.register(
            "feed_out_of_order",
            "Change batches refused since start for a skipped or repeated seq",
            out_of_order.clone(),
        );
        Metrics {
            registry,
            verifications,
            verify_latency,
            outbox_depth,
            applied,
            head,
            lag_changes,
            lag_seconds,
            bootstraps,
            resumes,
            changes_applied,
            out_of_order,
        }
    }
}

impl Metrics {
    /// The Prometheus text of every metric, with replication figures read now.
    pub fn render(&self, sync: &SyncStatus) -> String {
        let applied = sync.applied.load(Ordering::SeqCst);
        let head = sync.head.load(Ordering::SeqCst).max(applied);
        self.applied.set(applied);
        self.head.set(head);
        self.lag_changes.set(head - applied);
        let contact = sync.last_contact_ms.load(Ordering::SeqCst);
        let since = if contact == 0 {
            f64::INFINITY
        } else {
            (now_ms() - contact).max(0) as f64 / 1000.0
        };
        self.lag_seconds.set(since);
        self.bootstraps.set(sync.bootstraps.load(Ordering::SeqCst));
        self.resumes.set(sync.resumes.load(Ordering::SeqCst));
        self.changes_applied
            .set(sync.changes_applied.load(Ordering::SeqCst));
        self.out_of_order
            .set(sync.out_of_order.load(Ordering::SeqCst));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
