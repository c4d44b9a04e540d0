//! The state one data-plane node shares between its request handlers, its sync
//! loop and its usage reporter.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use twofold_core::feed::{NumberedEvent, UsageAck, UsageEvent};

use crate::config::Config;
use crate::index::{Index, LocalEvent};
use crate::metrics::Metrics;
use crate::outbox::{Opened, Outbox, Stored};
use crate::verify::Verifier;

/// How long a connection to a control plane may take to open.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long an idle connection to a control plane is kept for reuse: below the
/// control plane's header-read timeout (`twofold_serve`, 10 s), which also
/// closes kept-alive connections, so a report rarely meets one just closed.
const POOL_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Usage-event ids: the next one, and those handed out but not yet passed to
/// the outbox. Attempts number their events under their shard lock but reach the
/// outbox later, so ids can arrive there out of order.
#[derive(Debug)]
struct EventIds {
    next: u64,
    in_flight: BTreeSet<u64>,
}

/// Where the node's replica stands, for readiness, metrics and reports.
#[derive(Debug, Default)]
pub struct SyncStatus {
    pub applied: AtomicU64,
    pub head: AtomicU64,
    /// Unix milliseconds of the last line read from a control plane.
    pub last_contact_ms: AtomicI64,
    /// Set once a replica is loaded; never cleared.
    pub ready: AtomicBool,
    pub bootstraps: AtomicU64,
    pub resumes: AtomicU64,
    /// Changes applied from change streams (not snapshots).
    pub changes_applied: AtomicU64,
    /// Batches refused because a seq was skipped or repeated.
    pub out_of_order: AtomicU64,
}

/// Shared node state. Handlers reach it through an `Arc`.
#[derive(Debug)]
pub struct Node {
    pub config: Config,
    index: RwLock<Arc<Index>>,
    pub verifier: Verifier,
    pub outbox: Outbox,
    pub node_id: String,
    event_ids: Mutex<EventIds>,
    /// Acknowledged reports not yet covered by the replica: (through id, seq).
    acks: Mutex<Vec<(u64, u64)>>,
    /// This node's events with ids up to this are reflected in the replica.
    covered_through: AtomicU64,
    pub sync: SyncStatus,
    /// The one HTTP client for the feed, usage reports and strict mode.
    pub http: reqwest::Client,
    pub metrics: Metrics,
    /// Wakes the usage reporter when new events are recorded.
    pub report_wake: Notify,
    pub shutdown: CancellationToken,
}

/// The one client for talking to control planes. With `control_ca` set, only
/// its certificates are trusted for `https://` URLs.
fn feed_client(config: &Config) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .pool_idle_timeout(POOL_IDLE_TIMEOUT);
    if let Some(path) = &config.control_ca {
        let pem = std::fs::read(path).map_err(|e| {
            format!(
                "cannot read the control-plane CA file {}: {e}",
                path.display()
            )
        })?;
        let roots = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("invalid control-plane CA file {}: {e}", path.display()))?;
        if roots.is_empty() {
            return Err(format!("no certificate in {}", path.display()));
        }
        builder = builder.tls_certs_only(roots);
    }
    builder
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// Wall-clock Unix milliseconds: only the edges read the clock.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Node {
    /// A node serving `index` (loaded from the replica at `applied`), with the
    /// outbox's stored events replayed over it.
    pub fn new(
        config: Config,
        index: Index,
        applied: u64,
        opened: Opened,
        shutdown: CancellationToken,
    ) -> Result<Arc<Node>, String> {
        let verifier = Verifier::new(config.keyring.clone(), config.skew, config.throttle)?;
        let Opened {
            outbox,
            node_id,
            stored,
            next_id,
        } = opened;
        let covered = stored
            .iter()
            .filter(|s| s.acked_seq.is_some_and(|seq| seq <= applied))
            .map(|s| s.event.id)
            .max()
            .unwrap_or(0);
        let acks = stored
            .iter()
            .filter_map(|s| {
                s.acked_seq
                    .filter(|&seq| seq > applied)
                    .map(|seq| (s.event.id, seq))
            })
            .collect();
        replay_local(&index, &stored, covered);
        if covered > 0 {
            // Events the replica covered before this start.
            outbox.prune(covered);
        }
        let http = feed_client(&config)?;
        let node = Node {
            config,
            index: RwLock::new(Arc::new(index)),
            verifier,
            outbox,
            node_id,
            event_ids: Mutex::new(EventIds {
                next: next_id,
                in_flight: BTreeSet::new(),
            }),
            acks: Mutex::new(acks),
            covered_through: AtomicU64::new(covered),
            sync: SyncStatus::default(),
            http,
            metrics: Metrics::default(),
            report_wake: Notify::new(),
            shutdown,
        };
        node.sync.applied.store(applied, Ordering::SeqCst);
        Ok(Arc::new(node))
    }

    /// The index, held for a synchronous piece of work. Bootstrap swaps the index
    /// under the write lock, so work done under this guard is never lost.
    pub fn index(&self) -> RwLockReadGuard<'_, Arc<Index>> {
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Install a freshly bootstrapped index, carrying over this node's runtime
    /// state from the one it replaces.
    pub fn swap_index(&self, fresh: Index) {
        let mut slot = self.index.write().unwrap_or_else(|p| p.into_inner());
        fresh.adopt_local_state(&slot);
        fresh.shrink();
        *slot = Arc::new(fresh);
    }

    /// A new usage-event id, in flight until [`Node::release_events`]: handed out
    /// but not yet passed to the outbox.
    pub fn next_event_id(&self) -> u64 {
        let mut ids = self.event_ids.lock().unwrap_or_else(|p| p.into_inner());
        let id = ids.next;
        ids.next += 1;
        ids.in_flight.insert(id);
        id
    }

    /// These ids have been passed to the outbox (or will never be).
    pub fn release_events(&self, ids: impl IntoIterator<Item = u64>) {
        let mut in_flight = self.event_ids.lock().unwrap_or_else(|p| p.into_inner());
        for id in ids {
            in_flight.in_flight.remove(&id);
        }
    }

    /// Every event with an id below this has been passed to the outbox, so the
    /// reporter may send them: the control plane merges a node's events in id
    /// order and skips any id at or below one it has merged.
    pub fn reportable_below(&self) -> u64 {
        let ids = self.event_ids.lock().unwrap_or_else(|p| p.into_inner());
        ids.in_flight.first().copied().unwrap_or(ids.next)
    }

    /// The control plane merged `events` (up to `ack.through`), publishing
    /// what it did at or before `ack.seq`: the outbox may drop them once the
    /// replica has applied that far, and each user's published state counts
    /// an event from `ack.counted_from(id)` on.
    pub fn record_ack(&self, ack: &UsageAck, events: &[NumberedEvent]) {
        let (through, seq) = (ack.through, ack.seq);
        let index = self.index();
        for numbered in events.iter().filter(|e| e.id <= through) {
            if let UsageEvent::Failure { tenant, user, .. } | UsageEvent::Success { tenant, user } =
                &numbered.event
            {
                let counted_from = ack.counted_from(numbered.id);
                index.with_user(tenant, user, |u| u.mark_counted(numbered.id, counted_from));
            }
        }
        drop(index);
        if let Some(retried) = ack.retried {
            self.outbox.ack(retried.through, seq, retried.counted_from);
        }
        self.outbox.ack(through, seq, ack.counted_from(through));
        self.acks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((through, seq));
        self.advance_covered();
    }

    /// The replica has applied `applied`.
    pub fn set_applied(&self, applied: u64) {
        self.sync.applied.store(applied, Ordering::SeqCst);
        self.advance_covered();
    }

    /// Move `covered_through` past every ack whose change the replica has
    /// applied; the outbox no longer needs the events it covers.
    fn advance_covered(&self) {
        let applied = self.sync.applied.load(Ordering::SeqCst);
        let mut acks = self.acks.lock().unwrap_or_else(|p| p.into_inner());
        let mut covered = self.covered_through.load(Ordering::SeqCst);
        acks.retain(|&(through, seq)| {
            if seq <= applied {
                covered = covered.max(through);
                false
            } else {
                true
            }
        });
        if covered > self.covered_through.swap(covered, Ordering::SeqCst) {
            self.outbox.prune(covered);
        }
    }

    pub fn mark_contact(&self) {
        self.sync.last_contact_ms.store(now_ms(), Ordering::SeqCst);
    }
}

/// Re-apply this node's stored usage events over a replica loaded from disk:
/// accepted steps and used codes always (they only grow), throttle events unless
/// the replica already reflects them.
fn replay_local(index: &Index, stored: &[Stored], covered: u64) {
    for s in stored {
        match &s.event.event {
            UsageEvent::TotpAccepted {
                tenant,
                user,
                factor,
                step,
            } => {
                index.with_user(tenant, user, |u| {
                    let position = u.factors().position(|f| f.id == factor.as_str());
                    if let Some(i) = position {
                        u.accept_step(i, *step);
                    }
                });
            }
            UsageEvent::BackupCodeUsed {
                tenant,
                user,
                set_id,
                index: i,
            } => {
                index.with_user(tenant, user, |u| {
                    if let Some(set) = u.backup_mut().filter(|b| &*b.set_id == set_id.as_str())
                        && let Some(used) = set.used.get_mut(*i as usize)
                    {
                        *used = true;
                    }
                });
            }
            UsageEvent::Failure { tenant, user, at } if s.event.id > covered => {
                index.with_user(tenant, user, |u| {
                    u.push_event(s.event.id, LocalEvent::Failure { at: *at });
                    mark_replayed(u, s);
                });
            }
            UsageEvent::Success { tenant, user } if s.event.id > covered => {
                index.with_user(tenant, user, |u| {
                    u.push_event(s.event.id, LocalEvent::Success);
                    mark_replayed(u, s);
                });
            }
            UsageEvent::Failure { .. } | UsageEvent::Success { .. } => {}
        }
    }
}

/// An event merged before the restart, in a change the replica had not
/// applied, counts here until a state published from its `counted_from` on
/// arrives. An outbox written before `counted_from` was kept has only the ack's
/// seq; a state published after that surely counts the event.
fn mark_replayed(user: &mut crate::index::User, stored: &Stored) {
    if let Some(seq) = stored.acked_seq {
        let counted_from = stored.counted_from.unwrap_or(seq.saturating_add(1));
        user.mark_counted(stored.event.id, counted_from);
    }
}

#[cfg(test)]
mod tests {
    use twofold_core::seal::{Keyring, MasterKey};

    use super::*;

    fn node(dir: &std::path::Path) -> Arc<Node> {
        let config = Config::new(
            dir.to_owned(),
            vec!["http://127.0.0.1:9".into()],
            "tfk_test".into(),
            Keyring::new(MasterKey::generate().unwrap()),
        );
        let opened = crate::outbox::Outbox::open(dir).unwrap();
        Node::new(
            config,
            Index::default(),
            0,
            opened,
            CancellationToken::new(),
        )
        .unwrap()
    }

    #[test]
    fn an_ack_leaves_events_counted_here_until_a_state_published_from_its_seq() {
        use twofold_core::throttle::{Throttle, ThrottlePolicy};

        use crate::index::Prepared;

        let dir = tempfile::tempdir().unwrap();
        let node = node(dir.path());
        let put = |failures, seq| Prepared::PutThrottle {
            tenant: "tn_a".into(),
            user: "alice".into(),
            throttle: Throttle {
                failures,
                locked: false,
                throttled_until: Some(99),
            },
            seq,
        };
        let failures = || {
            node.index()
                .with_user("tn_a", "alice", |u| {
                    u.throttle(&ThrottlePolicy::default()).failures
                })
                .unwrap()
        };
        node.index().apply(vec![put(5, 1)]);
        let id = node.next_event_id();
        node.index().with_user("tn_a", "alice", |u| {
            u.push_event(id, LocalEvent::Failure { at: 10 })
        });
        assert_eq!(failures(), 6);
        let event = NumberedEvent {
            id,
            event: UsageEvent::Failure {
                tenant: "tn_a".into(),
                user: "alice".into(),
                at: 10,
            },
        };
        let ack = UsageAck {
            through: id,
            seq: 2,
            counted_from: Some(3),
            retried: None,
        };
        node.record_ack(&ack, &[event]);
        // Published at 2, before the merge: this node's failure is not in it.
        node.index().apply(vec![put(5, 2)]);
        assert_eq!(failures(), 6);
        // Published at 3 or later: it is.
        node.index().apply(vec![put(7, 3)]);
        assert_eq!(failures(), 7);
    }

    #[test]
    fn events_are_reportable_only_below_the_oldest_id_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let node = node(dir.path());
        assert_eq!(node.reportable_below(), 1);
        let a = node.next_event_id();
        let b = node.next_event_id();
        assert_eq!((a, b), (1, 2));
        // b reaches the outbox first: nothing may be reported while a is out.
        node.release_events([b]);
        assert_eq!(node.reportable_below(), a);
        node.release_events([a]);
        assert_eq!(node.reportable_below(), 3);
    }
}
