//! The feed data planes replicate from, over a real socket: snapshots and their
//! digest, the change stream, exactly-once delivery under concurrent writers, a
//! snapshot taken during writes, and `410 Gone` after compaction.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{OPERATOR, Replica, TestServer, WAIT, assert_error, eventually};
use reqwest::{Method, StatusCode};
use serde_json::json;
use twofold_control::state::Clock;
use twofold_core::feed::{Change, ChangeLine, Entity, EntityKey, Op, SnapshotLine, StateDigest};

suite! {
    a_snapshot_carries_the_replicated_state_and_its_digest,
    changes_stream_in_order_and_follow_new_commits,
    an_idle_stream_sends_heartbeats,
    bad_change_queries_are_400,
    compacted_changes_are_gone,
    open_streams_are_counted_and_end_at_shutdown,
    a_revoked_node_key_loses_its_open_stream,
    ; multi_thread:
    concurrent_writes_reach_the_feed_exactly_once_in_order,
    a_snapshot_during_writes_plus_later_changes_is_the_final_state,
}

/// A tenant with users in every state the feed knows, and a few that it must
/// not see (a pending factor, a manage-only key, a node key, a revoked key).
async fn populate(s: &TestServer) -> Populated {
    let tenant = s.tenant("acme").await;
    let verify = s.create_key(&tenant.id, &["verify"]).await;
    let revoked = s.create_key(&tenant.id, &["verify", "manage"]).await;
    let (status, _) = s
        .delete(
            &format!("/v1/tenants/{}/keys/{}", tenant.id, revoked.id),
            OPERATOR,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    s.create_node_key().await;
    let alice = s.active_factor(&tenant.manage, "alice").await;
    let pending = s.enroll(&tenant.manage, "alice").await;
    s.backup_codes(&tenant.manage, "alice").await;
    let bob = s.active_factor(&tenant.manage, "bob").await;
    let (status, _) = s
        .call(
            Method::POST,
            "/v1/users/bob/unlock",
            Some(&tenant.manage),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    Populated {
        tenant: tenant.id,
        manage: tenant.manage,
        verify: verify.id,
        active: vec![alice.id, bob.id],
        pending: pending.id,
        secrets: vec![alice.base32, bob.base32, pending.base32],
    }
}

struct Populated {
    tenant: String,
    manage: String,
    verify: String,
    active: Vec<String>,
    pending: String,
    secrets: Vec<String>,
}

fn kinds(entities: &BTreeMap<EntityKey, Entity>) -> BTreeMap<&'static str, usize> {
    let mut kinds = BTreeMap::new();
    for entity in entities.values() {
        let kind = match entity {
            Entity::Tenant(_) => "tenant",
            Entity::ApiKey(_) => "api_key",
            Entity::Totp(_) => "totp",
            Entity::BackupCodes(_) => "backup_codes",
            Entity::UserState(_) => "user_state",
        };
        *kinds.entry(kind).or_default() += 1;
    }
    kinds
}

async fn a_snapshot_carries_the_replicated_state_and_its_digest() {
    let s = TestServer::start().await;
    let empty = s.snapshot(OPERATOR).await;
    assert_eq!(empty.len(), 2, "{empty:?}");
    assert_eq!(empty[0], SnapshotLine::Begin { seq: 0 });
    assert_eq!(
        empty[1],
        SnapshotLine::End {
            seq: 0,
            count: 0,
            digest: StateDigest::default().to_hex()
        }
    );

    let p = populate(&s).await;
    let response = s
        .request(Method::GET, "/v1/feed/snapshot", Some(OPERATOR))
        .send()
        .await
        .expect("snapshot");
    let log_id = response
        .headers()
        .get("twofold-log-id")
        .and_then(|v| v.to_str().ok())
        .expect("log id header")
        .to_owned();
    assert_eq!(log_id, s.state.store.log_id());
    let text = response.text().await.expect("body");
    for secret in &p.secrets {
        assert!(!text.contains(secret.as_str()), "a secret in the snapshot");
    }
    let lines: Vec<SnapshotLine> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a snapshot line"))
        .collect();

    let head = s.head().await;
    assert_eq!(
        head, 8,
        "tenant, 2 verify keys, revoke, 2 activations, codes, unlock"
    );
    assert_eq!(lines[0], SnapshotLine::Begin { seq: head });
    let (seq, replica) = Replica::from_snapshot(&lines);
    assert_eq!(seq, head);
    let digest = replica.digest();
    match lines.last().expect("a trailer") {
        SnapshotLine::End {
            seq,
            count,
            digest: sent,
        } => {
            assert_eq!(*seq, head);
            assert_eq!(*count, digest.count());
            assert_eq!(*count as usize, lines.len() - 2);
            assert_eq!(*sent, digest.to_hex());
        }
        other => panic!("the last line is {other:?}"),
    }
    let (status, reported) = s.get("/v1/feed/digest", OPERATOR).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        reported,
        json!({"seq": head, "count": digest.count(), "digest": digest.to_hex()})
    );

    // What a data plane needs, and nothing it must not see.
    assert_eq!(
        kinds(&replica.entities),
        BTreeMap::from([
            ("tenant", 1),
            ("api_key", 1),
            ("totp", 2),
            ("backup_codes", 1),
            ("user_state", 1),
        ])
    );
    let key = replica
        .entities
        .get(&EntityKey::ApiKey {
            id: p.verify.clone(),
        })
        .expect("the verify key");
    match key {
        Entity::ApiKey(k) => {
            assert_eq!(k.tenant, p.tenant);
            assert_eq!(k.scopes, ["verify"]);
            assert_eq!(k.hash.len(), 32);
        }
        other => panic!("{other:?}"),
    }
    let totp_ids: BTreeSet<&str> = replica
        .entities
        .values()
        .filter_map(|e| match e {
            Entity::Totp(f) => Some(f.id.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(totp_ids, p.active.iter().map(String::as_str).collect());
    assert!(!totp_ids.contains(p.pending.as_str()));
    for entity in replica.entities.values() {
        if let Entity::Totp(f) = entity {
            assert_eq!(f.tenant, p.tenant);
            assert_eq!((f.algorithm.as_str(), f.digits, f.period), ("SHA1", 6, 30));
            assert_eq!(f.last_step, Some(1_700_000_000 / 30));
        }
        if let Entity::BackupCodes(b) = entity {
            assert_eq!(b.user, "alice");
            assert_eq!(b.codes.len(), 10);
            assert!(b.codes.iter().all(|c| !c.used && c.hash.len() == 32));
        }
    }
}

async fn changes_stream_in_order_and_follow_new_commits() {
    let s = TestServer::start().await;
    let p = populate(&s).await;
    let head = s.head().await;

    let mut stream = s.changes(OPERATOR, 0).await;
    assert_eq!(stream.log_id.as_deref(), Some(s.state.store.log_id()));
    assert_eq!(stream.next_line().await, ChangeLine::Heartbeat { head });
    let changes = stream.changes_through(head).await;
    let seqs: Vec<u64> = changes.iter().map(|c| c.seq).collect();
    assert_eq!(seqs, (1..=head).collect::<Vec<_>>());
    assert!(changes.iter().all(|c| c.at_ms == common::START_MS as u64));
    // Replaying the whole log gives the snapshot's state.
    let mut replayed = Replica::default();
    changes.iter().for_each(|c| replayed.apply(&c.ops));
    let (_, snapshot) = Replica::from_snapshot(&s.snapshot(OPERATOR).await);
    assert_eq!(replayed, snapshot);
    // The pending factor never appeared.
    let text = serde_json::to_string(&changes).expect("json");
    assert!(!text.contains(&p.pending));

    // A new commit reaches the open stream. Enrolling publishes nothing, so the
    // next change is the activation.
    let factor = s.enroll(&p.manage, "carol").await;
    s.activate(&p.manage, "carol", &factor).await;
    let change = stream.next_change().await;
    assert_eq!(change.seq, head + 1);
    assert!(
        matches!(&change.ops[..], [Op::Put { entity: Entity::Totp(f) }] if f.id == factor.id && f.user == "carol"),
        "{change:?}"
    );

    // Revoking a verify key publishes its removal.
    let (status, _) = s
        .delete(
            &format!("/v1/tenants/{}/keys/{}", p.tenant, p.verify),
            OPERATOR,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let change = stream.next_change().await;
    assert_eq!(change.seq, head + 2);
    assert_eq!(
        change.ops,
        [Op::Delete {
            key: EntityKey::ApiKey {
                id: p.verify.clone()
            }
        }]
    );
    // Revoking it again changes nothing, and neither does creating or revoking a
    // key the feed never carries (manage only, or a node's).
    let (status, _) = s
        .delete(
            &format!("/v1/tenants/{}/keys/{}", p.tenant, p.verify),
            OPERATOR,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let manage_only = s.create_key(&p.tenant, &["manage"]).await;
    let node = s.create_node_key().await;
    for path in [
        format!("/v1/tenants/{}/keys/{}", p.tenant, manage_only.id),
        format!("/v1/node-keys/{}", node.id),
    ] {
        let (status, _) = s.delete(&path, OPERATOR).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
    assert_eq!(
        s.head().await,
        head + 2,
        "no change for keys the feed lacks"
    );

    // Deleting an active factor, then a user, publishes tombstones.
    let (status, _) = s
        .delete(&format!("/v1/users/carol/factors/{}", factor.id), &p.manage)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let change = stream.next_change().await;
    assert_eq!(change.seq, head + 3);
    assert_eq!(
        change.ops,
        [Op::Delete {
            key: EntityKey::Totp {
                tenant: p.tenant.clone(),
                user: "carol".into(),
                id: factor.id.clone()
            }
        }]
    );
    let (status, _) = s.delete("/v1/users/bob", &p.manage).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let change = stream.next_change().await;
    assert_eq!(change.seq, head + 4, "{change:?}");
    let deleted: BTreeSet<EntityKey> = change
        .ops
        .iter()
        .map(|op| match op {
            Op::Delete { key } => key.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        deleted,
        BTreeSet::from([
            EntityKey::Totp {
                tenant: p.tenant.clone(),
                user: "bob".into(),
                id: p.active[1].clone()
            },
            EntityKey::UserState {
                tenant: p.tenant.clone(),
                user: "bob".into()
            },
        ])
    );
    assert_eq!(s.head().await, head + 4);

    // A stream that starts at the head waits for new changes.
    let mut tail = s.changes(OPERATOR, head + 4).await;
    assert_eq!(
        tail.next_line().await,
        ChangeLine::Heartbeat { head: head + 4 }
    );
    s.backup_codes(&p.manage, "alice").await;
    let change = tail.next_change().await;
    assert_eq!(change.seq, head + 5);
    assert_eq!(stream.next_change().await, change);
}

async fn an_idle_stream_sends_heartbeats() {
    let (clock, handle) = twofold_control::state::Clock::manual(common::START_MS);
    let s = TestServer::start_with(clock, Some(handle), |config| {
        config.heartbeat = Duration::from_millis(50);
    })
    .await;
    s.create_tenant("acme").await;
    let mut stream = s.changes(OPERATOR, 0).await;
    assert_eq!(stream.next_line().await, ChangeLine::Heartbeat { head: 1 });
    assert_eq!(stream.next_change().await.seq, 1);
    for _ in 0..2 {
        assert_eq!(stream.next_line().await, ChangeLine::Heartbeat { head: 1 });
    }
}

async fn bad_change_queries_are_400() {
    let s = TestServer::start().await;
    for query in ["", "?after=", "?after=-1", "?after=x", "?after=0&bogus=1"] {
        let got = s.get(&format!("/v1/feed/changes{query}"), OPERATOR).await;
        assert_error(&got, StatusCode::BAD_REQUEST, "invalid_query");
    }
}

/// What one writer's mutation should put in the feed, named by something unique
/// to it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Expected {
    PutKey(String),
    DeleteKey(String),
    PutTotp(String),
    PutBackup(String),
    PutState(String),
}

fn published(change: &Change) -> Vec<Expected> {
    change
        .ops
        .iter()
        .map(|op| match op {
            Op::Put {
                entity: Entity::ApiKey(k),
            } => Expected::PutKey(k.id.clone()),
            Op::Delete {
                key: EntityKey::ApiKey { id },
            } => Expected::DeleteKey(id.clone()),
            Op::Put {
                entity: Entity::Totp(f),
            } => Expected::PutTotp(f.id.clone()),
            Op::Put {
                entity: Entity::BackupCodes(b),
            } => Expected::PutBackup(b.set_id.clone()),
            Op::Put {
                entity: Entity::UserState(u),
            } => Expected::PutState(u.user.clone()),
            other => panic!("unexpected op {other:?}"),
        })
        .collect()
}

const WRITERS: usize = 8;
const MUTATIONS: usize = 25;

/// Run `WRITERS` tasks of `MUTATIONS` mutations each against one tenant. Returns
/// what each writer expects to see published, in its own commit order.
async fn run_writers(
    s: &Arc<TestServer>,
    tenant: &common::Tenant,
    progress: &Arc<AtomicUsize>,
) -> Vec<Vec<Expected>> {
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let s = s.clone();
        let tenant = tenant.clone();
        let progress = progress.clone();
        tasks.push(tokio::spawn(async move {
            let mut expected = Vec::new();
            let mut keys = Vec::new();
            let mut done = 0;
            let mut round = 0;
            while done < MUTATIONS {
                let user = format!("w{w}-u{round}");
                match round % 5 {
                    0 => {
                        let key = s.create_key(&tenant.id, &["verify"]).await;
                        expected.push(Expected::PutKey(key.id.clone()));
                        keys.push(key.id);
                        done += 1;
                    }
                    1 => {
                        // Enrolling publishes nothing; activating does.
                        let factor = s.enroll(&tenant.manage, &user).await;
                        s.activate(&tenant.manage, &user, &factor).await;
                        expected.push(Expected::PutTotp(factor.id));
                        done += 2;
                    }
                    2 => {
                        let (status, body) = s
                            .call(
                                Method::POST,
                                &format!("/v1/users/{user}/backup-codes"),
                                Some(&tenant.manage),
                                None,
                            )
                            .await;
                        assert_eq!(status, StatusCode::CREATED, "{body}");
                        let set = body["set_id"].as_str().expect("set id").to_owned();
                        expected.push(Expected::PutBackup(set));
                        done += 1;
                    }
                    3 => {
                        let key = keys.pop().expect("a key to revoke");
                        let (status, body) = s
                            .delete(&format!("/v1/tenants/{}/keys/{key}", tenant.id), OPERATOR)
                            .await;
                        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
                        expected.push(Expected::DeleteKey(key));
                        done += 1;
                    }
                    _ => {
                        let known = format!("w{w}-u{}", round - 2);
                        let (status, body) = s
                            .call(
                                Method::POST,
                                &format!("/v1/users/{known}/unlock"),
                                Some(&tenant.manage),
                                None,
                            )
                            .await;
                        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
                        expected.push(Expected::PutState(known));
                        done += 1;
                    }
                }
                round += 1;
                progress.fetch_add(1, Ordering::SeqCst);
            }
            expected
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.push(task.await.expect("writer task"));
    }
    all
}

async fn concurrent_writes_reach_the_feed_exactly_once_in_order() {
    let s = Arc::new(TestServer::start().await);
    let tenant = s.tenant("acme").await;
    let base = s.head().await;
    assert_eq!(base, 1);
    // A stream opened before the writers start sees every change as it commits.
    let mut live = s.changes(OPERATOR, base).await;
    assert_eq!(live.next_line().await, ChangeLine::Heartbeat { head: base });

    let progress = Arc::new(AtomicUsize::new(0));
    let writers = run_writers(&s, &tenant, &progress).await;
    let head = s.head().await;
    let expected: usize = writers.iter().map(Vec::len).sum();
    assert_eq!(head, base + expected as u64);
    let (status, ready) = s.call(Method::GET, "/readyz", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        ready["head_seq"], head,
        "the published head is the last commit"
    );

    let streamed = live.changes_through(head).await;
    let replayed = s.changes_until_head(base).await;
    assert_eq!(streamed, replayed, "a live stream and a later read agree");

    let seqs: Vec<u64> = streamed.iter().map(|c| c.seq).collect();
    assert_eq!(seqs, (base + 1..=head).collect::<Vec<_>>(), "contiguous");
    let mut seen: BTreeMap<Expected, u64> = BTreeMap::new();
    for change in &streamed {
        let ops = published(change);
        assert_eq!(ops.len(), 1, "{change:?}");
        for op in ops {
            assert!(
                seen.insert(op.clone(), change.seq).is_none(),
                "{op:?} twice"
            );
        }
    }
    for (w, mine) in writers.iter().enumerate() {
        let mut last = base;
        for op in mine {
            let seq = *seen
                .get(op)
                .unwrap_or_else(|| panic!("writer {w}: {op:?} never published"));
            assert!(seq > last, "writer {w}: {op:?} at {seq} after {last}");
            last = seq;
        }
    }
    assert_eq!(seen.len(), expected);
    // No commit is left out of the digest either.
    let mut replica = Replica::default();
    s.changes_until_head(0)
        .await
        .iter()
        .for_each(|c| replica.apply(&c.ops));
    let (_, digest) = s.get("/v1/feed/digest", OPERATOR).await;
    assert_eq!(digest["digest"], replica.digest().to_hex());
}

async fn a_snapshot_during_writes_plus_later_changes_is_the_final_state() {
    let s = Arc::new(TestServer::start().await);
    let tenant = s.tenant("acme").await;
    let progress = Arc::new(AtomicUsize::new(0));
    let writers = {
        let (s, tenant, progress) = (s.clone(), tenant.clone(), progress.clone());
        tokio::spawn(async move { run_writers(&s, &tenant, &progress).await })
    };
    let total = WRITERS * MUTATIONS;
    eventually("writers under way", || {
        let done = progress.load(Ordering::SeqCst);
        async move { (done >= total / 8).then_some(()) }
    })
    .await;
    let lines = s.snapshot(OPERATOR).await;
    let writes_after_snapshot = progress.load(Ordering::SeqCst);
    writers.await.expect("writers");

    let (seq, mut replica) = Replica::from_snapshot(&lines);
    let SnapshotLine::End { digest, count, .. } = lines.last().expect("trailer") else {
        panic!("no trailer");
    };
    assert_eq!(*digest, replica.digest().to_hex());
    assert_eq!(*count as usize, replica.entities.len());

    let head = s.head().await;
    assert!(
        seq < head,
        "the snapshot ({seq}) was taken before the last write ({head}); \
         {writes_after_snapshot} rounds were done when it finished"
    );
    for change in s.changes_until_head(seq).await {
        replica.apply(&change.ops);
    }
    let (_, final_snapshot) = Replica::from_snapshot(&s.snapshot(OPERATOR).await);
    assert_eq!(replica, final_snapshot);
    let (status, reported) = s.get("/v1/feed/digest", OPERATOR).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(reported["seq"], head);
    assert_eq!(reported["digest"], replica.digest().to_hex());
    assert_eq!(reported["count"], replica.entities.len());
}

async fn compacted_changes_are_gone() {
    let s = TestServer::start().await;
    let tenant = s.tenant("acme").await;
    for i in 0..9 {
        s.backup_codes(&tenant.manage, &format!("user{i}")).await;
    }
    let head = s.head().await;
    assert_eq!(head, 10);
    let log = s.state.store.log_id().to_owned();

    // Keep the last three changes.
    let dropped = s
        .with_store(|store| store.compact(3, 0))
        .await
        .expect("compact");
    assert_eq!(dropped, 7);
    assert_eq!(
        s.with_store(|store| store.compacted_through())
            .await
            .expect("compacted"),
        7
    );
    for after in [0, 1, 6] {
        let got = s
            .get(&format!("/v1/feed/changes?after={after}"), OPERATOR)
            .await;
        assert_error(&got, StatusCode::GONE, "feed_gone");
    }
    // Beyond the head is as unknown as compacted.
    let got = s
        .get(&format!("/v1/feed/changes?after={}", head + 1), OPERATOR)
        .await;
    assert_error(&got, StatusCode::GONE, "feed_gone");

    let mut stream = s.changes(OPERATOR, 7).await;
    assert_eq!(stream.next_line().await, ChangeLine::Heartbeat { head });
    let seqs: Vec<u64> = stream
        .changes_through(head)
        .await
        .iter()
        .map(|c| c.seq)
        .collect();
    assert_eq!(seqs, [8, 9, 10]);
    let mut at_head = s.changes(OPERATOR, head).await;
    assert_eq!(at_head.next_line().await, ChangeLine::Heartbeat { head });

    // Another log's position is gone; this log's is resumable.
    let got = s
        .get(
            &format!("/v1/feed/changes?after={head}&log=someotherlog"),
            OPERATOR,
        )
        .await;
    assert_error(&got, StatusCode::GONE, "feed_gone");
    let response = s
        .request(
            Method::GET,
            &format!("/v1/feed/changes?after={head}&log={log}"),
            Some(OPERATOR),
        )
        .send()
        .await
        .expect("changes");
    assert_eq!(response.status(), StatusCode::OK);

    // Compacting by age keeps the newest change, and new changes follow on.
    s.advance(Duration::from_secs(60));
    s.backup_codes(&tenant.manage, "late").await;
    let dropped = s
        .with_store(|store| store.compact(1_000, common::START_MS + 1))
        .await
        .expect("compact by age");
    assert_eq!(dropped, 3);
    assert_eq!(
        s.with_store(|store| store.compacted_through())
            .await
            .expect("compacted"),
        head
    );
    let got = s
        .get(&format!("/v1/feed/changes?after={}", head - 1), OPERATOR)
        .await;
    assert_error(&got, StatusCode::GONE, "feed_gone");
    let mut stream = s.changes(OPERATOR, head).await;
    assert_eq!(
        stream.next_line().await,
        ChangeLine::Heartbeat { head: head + 1 }
    );
    assert_eq!(stream.next_change().await.seq, head + 1);
    s.backup_codes(&tenant.manage, "later").await;
    assert_eq!(stream.next_change().await.seq, head + 2);

    // Even keeping nothing by count, the newest change stays, so a node one
    // change behind can still resume.
    s.with_store(|store| store.compact(0, i64::MAX))
        .await
        .expect("compact everything");
    assert_eq!(
        s.with_store(|store| store.compacted_through())
            .await
            .expect("compacted"),
        head + 1
    );
    let mut stream = s.changes(OPERATOR, head + 1).await;
    assert_eq!(
        stream.next_line().await,
        ChangeLine::Heartbeat { head: head + 2 }
    );
    assert_eq!(stream.next_change().await.seq, head + 2);

    // A snapshot still holds everything.
    let (seq, replica) = Replica::from_snapshot(&s.snapshot(OPERATOR).await);
    assert_eq!(seq, head + 2);
    assert_eq!(kinds(&replica.entities)["backup_codes"], 11);
}

fn subscribers(metrics: &str) -> Option<i64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("twofold_control_feed_subscribers "))
        .and_then(|v| v.trim().parse().ok())
}

async fn open_streams_are_counted_and_end_at_shutdown() {
    let mut s = TestServer::start().await;
    s.create_tenant("acme").await;
    let metrics = || async {
        let response = s
            .request(Method::GET, "/metrics", None)
            .send()
            .await
            .expect("metrics");
        subscribers(&response.text().await.expect("body"))
    };
    assert_eq!(metrics().await, Some(0));
    let mut first = s.changes(OPERATOR, 0).await;
    let mut second = s.changes(OPERATOR, 1).await;
    assert_eq!(first.next_line().await, ChangeLine::Heartbeat { head: 1 });
    assert_eq!(second.next_line().await, ChangeLine::Heartbeat { head: 1 });
    assert_eq!(metrics().await, Some(2));
    drop(second);
    eventually("a closed stream to be uncounted", || async {
        (metrics().await == Some(1)).then_some(())
    })
    .await;

    // Shutting down ends the open stream, and the server returns.
    s.shutdown().await;
    assert_eq!(first.next_change().await.seq, 1);
    assert_eq!(first.next_within(common::WAIT).await, None);
}

async fn a_revoked_node_key_loses_its_open_stream() {
    let server = TestServer::start_with(Clock::system(), None, |config| {
        config.heartbeat = Duration::from_millis(100);
    })
    .await;
    let node = server.create_node_key().await;
    let mut stream = server.changes(&node.secret, 0).await;
    assert!(matches!(
        stream.next_within(WAIT).await,
        Some(ChangeLine::Heartbeat { .. })
    ));
    let (status, _) = server
        .delete(&format!("/v1/node-keys/{}", node.id), OPERATOR)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // Heartbeats may still arrive until the next check; then the stream ends.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "stream still open after revocation"
        );
        let asked = tokio::time::Instant::now();
        match stream.next_within(Duration::from_secs(2)).await {
            // With heartbeats every 100 ms, silence this long is a timeout, not
            // an end.
            None if asked.elapsed() >= Duration::from_secs(2) => {
                panic!("stream went silent without closing")
            }
            None => break,
            Some(ChangeLine::Heartbeat { .. }) => continue,
            Some(other) => panic!("unexpected line {other:?}"),
        }
    }
}
