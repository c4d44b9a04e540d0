//! Merging data planes' usage reports: steps by max, used codes by union,
//! failures through the throttle policy, retries harmless; strict backup-code use.

mod common;

use common::{NewKey, OPERATOR, Tenant, TestServer, enc};
use reqwest::StatusCode;
use serde_json::{Value, json};
use twofold_control::store::Actor;
use twofold_core::feed::{Entity, SnapshotLine};

suite! {
    reports_merge_and_retries_change_nothing,
    an_accepted_code_moves_only_its_own_active_factor_forward,
    a_published_state_counts_every_event_of_its_report,
    a_retried_report_is_answered_with_its_first_merge,
    a_refused_code_resets_nothing,
    a_failure_counts_for_any_user_twofold_knows,
    a_user_with_only_unpublished_failures_can_be_deleted,
    failures_from_several_nodes_combine_into_a_throttle,
    reports_are_validated_and_may_exceed_the_default_body_limit,
    strict_backup_code_use_is_accepted_once,
}

fn event(id: u64, body: Value) -> Value {
    let mut event = body;
    event["id"] = json!(id);
    event
}

/// The entities of the current snapshot.
async fn entities(server: &TestServer) -> Vec<Entity> {
    server
        .snapshot(OPERATOR)
        .await
        .into_iter()
        .filter_map(|line| match line {
            SnapshotLine::Entity { entity } => Some(entity),
            _ => None,
        })
        .collect()
}

/// The id of the one backup set in the current snapshot.
async fn backup_set_id(server: &TestServer) -> String {
    entities(server)
        .await
        .into_iter()
        .find_map(|e| match e {
            Entity::BackupCodes(b) => Some(b.set_id),
            _ => None,
        })
        .expect("a backup set")
}

fn failure_of(t: &str, user: &str) -> Value {
    json!({"type": "failure", "tenant": t, "user": user, "at": 1_700_000_000u64})
}

/// Failures of `user`, numbered `ids`.
fn failures(t: &str, user: &str, ids: std::ops::RangeInclusive<u64>) -> Vec<Value> {
    ids.map(|id| event(id, failure_of(t, user))).collect()
}

/// Send `events` as `node`'s usage report; the control plane must take it.
async fn report(server: &TestServer, node: &str, events: Vec<Value>) -> Value {
    let (status, ack) = server
        .post(
            "/v1/feed/usage",
            OPERATOR,
            json!({"node": node, "events": events}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{ack}");
    ack
}

/// The published failure count of `user`, from a snapshot.
async fn published_failures(server: &TestServer, user: &str) -> Option<u32> {
    entities(server).await.into_iter().find_map(|e| match e {
        Entity::UserState(u) if u.user == user => Some(u.failures),
        _ => None,
    })
}

/// `user`'s failures as the users API lists them, published or not.
async fn listed_failures(server: &TestServer, token: &str, user: &str) -> Option<u64> {
    server
        .get(&format!("/v1/users/{}/factors", enc(user)), token)
        .await
        .1["failures"]
        .as_u64()
}

/// A first failure counts for a user with an active factor, a pending one, or
/// backup codes only, and not for a user Twofold does not know; a second
/// failure adds to the first.
async fn a_failure_counts_for_any_user_twofold_knows() {
    let server = TestServer::start().await;
    let tenant = server.tenant("acme").await;
    let m = &tenant.manage;
    server.active_factor(m, "alice").await;
    server.enroll(m, "bob").await;
    server.backup_codes(m, "carol").await;
    let t = &tenant.id;
    let users = ["alice", "bob", "carol", "nobody"];
    let first = users
        .iter()
        .zip(1..)
        .map(|(user, id)| event(id, failure_of(t, user)))
        .collect();
    report(&server, "node_a", first).await;
    report(&server, "node_a", failures(t, "carol", 5..=5)).await;

    let tenant_id = tenant.id.clone();
    let counted = server
        .with_store(move |store| {
            users.map(|user| {
                store
                    .user_state(&tenant_id, user)
                    .expect("user state")
                    .all_failures()
            })
        })
        .await;
    assert_eq!(counted, [1, 1, 2, 0]);
    let nobody = tenant.id.clone();
    let exists = server
        .with_store(move |store| store.unlock_user(0, &Actor::Operator, &nobody, "nobody"))
        .await;
    assert!(
        exists.is_err(),
        "the unknown user's failure left no trace: {exists:?}"
    );
}

async fn reports_merge_and_retries_change_nothing() {
    let server = TestServer::start().await;
    let tenant = server.tenant("acme").await;
    let factor = server.active_factor(&tenant.manage, "alice").await;
    server.backup_codes(&tenant.manage, "alice").await;
    let set_id = backup_set_id(&server).await;

    let t = &tenant.id;
    let mixed = json!({"node": "node_a", "events": [
        event(1, json!({"type": "totp_accepted", "tenant": t, "user": "alice", "factor": factor.id, "step": 99_000_000_000u64})),
        event(2, json!({"type": "totp_accepted", "tenant": t, "user": "alice", "factor": factor.id, "step": 5})),
        event(3, json!({"type": "backup_code_used", "tenant": t, "user": "alice", "set_id": set_id, "index": 4})),
        event(4, json!({"type": "failure", "tenant": t, "user": "alice", "at": 1_700_000_000u64})),
        event(5, json!({"type": "failure", "tenant": t, "user": "nobody", "at": 1_700_000_000u64})),
    ]});
    let head_before = server.head().await;
    let (status, ack) = server.post("/v1/feed/usage", OPERATOR, mixed.clone()).await;
    assert_eq!(status, StatusCode::OK, "{ack}");
    assert_eq!(ack["through"], 5);
    let head = ack["seq"].as_u64().expect("seq");
    assert_eq!(head, head_before + 1, "one change for the whole report");

    let state = entities(&server).await;
    let last_step = state.iter().find_map(|e| match e {
        Entity::Totp(f) if f.id == factor.id => f.last_step,
        _ => None,
    });
    assert_eq!(last_step, Some(99_000_000_000), "steps merge by max");
    let used: Vec<bool> = state
        .iter()
        .find_map(|e| match e {
            Entity::BackupCodes(b) => Some(b.codes.iter().map(|c| c.used).collect()),
            _ => None,
        })
        .expect("codes");
    assert_eq!(used.iter().filter(|u| **u).count(), 1);
    assert!(used[4]);
    assert!(
        !state.iter().any(|e| matches!(e, Entity::UserState(_))),
        "a failure that starts no backoff is counted, not published"
    );
    assert_eq!(
        ack["counted_from"].as_u64(),
        Some(head),
        "the change of this merge is the first to count its events"
    );
    let m = &tenant.manage;
    assert_eq!(listed_failures(&server, m, "alice").await, Some(1));
    let (status, _) = server
        .get(
            &format!("/v1/users/{}/factors", enc("nobody")),
            &tenant.manage,
        )
        .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "unknown users are not recorded"
    );
    let (_, summary) = server
        .get(
            &format!("/v1/users/{}/backup-codes", enc("alice")),
            &tenant.manage,
        )
        .await;
    assert_eq!(summary["remaining"], 9);

    // The same report again (a retry after a lost answer) changes nothing.
    let (status, again) = server.post("/v1/feed/usage", OPERATOR, mixed).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again["through"], 5);
    assert_eq!(
        server.head().await,
        head,
        "a retried report publishes nothing"
    );

    // A second failure, from another node: counted, still nothing published,
    // and its ack says the next change is the first to count it.
    let ack = report(&server, "node_b", failures(t, "alice", 1..=1)).await;
    assert_eq!(server.head().await, head, "nothing published");
    assert_eq!(ack["seq"].as_u64(), Some(head));
    assert_eq!(ack["counted_from"].as_u64(), Some(head + 1));
    assert_eq!(listed_failures(&server, m, "alice").await, Some(2));

    // A success resets the count, and the reset is published so that every
    // node drops the failures it counts on its own.
    let success = json!({"type": "success", "tenant": t, "user": "alice"});
    let ack = report(&server, "node_a", vec![event(6, success)]).await;
    assert_eq!(ack["seq"].as_u64(), Some(head + 1));
    assert_eq!(published_failures(&server, "alice").await, Some(0));
    assert_eq!(listed_failures(&server, m, "alice").await, Some(0));

    // An accepted code resets failures too: a node that did not know of the
    // unpublished ones sends no `success`.
    report(&server, "node_b", failures(t, "alice", 2..=2)).await;
    assert_eq!(listed_failures(&server, m, "alice").await, Some(1));
    let accepted = json!({"type": "totp_accepted", "tenant": t, "user": "alice", "factor": factor.id, "step": 99_000_000_001u64});
    report(&server, "node_a", vec![event(7, accepted)]).await;
    assert_eq!(listed_failures(&server, m, "alice").await, Some(0));

    // Nor was the unknown user's failure kept: enrolled now, they have none.
    server.active_factor(m, "nobody").await;
    assert_eq!(
        listed_failures(&server, m, "nobody").await,
        Some(0),
        "failures of unknown users are not recorded"
    );
}

async fn an_accepted_code_moves_only_its_own_active_factor_forward() {
    let server = TestServer::start().await;
    let tenant = server.tenant("acme").await;
    let active = server.active_factor(&tenant.manage, "alice").await;
    let pending = server.enroll(&tenant.manage, "bob").await;
    let last_step = |state: Vec<Entity>| {
        state.into_iter().find_map(|e| match e {
            Entity::Totp(f) if f.id == active.id => Some(f.last_step),
            _ => None,
        })
    };
    let t = &tenant.id;
    let accepted = |id: u64, user: &str, factor: &str, step: u64| {
        event(
            id,
            json!({"type": "totp_accepted", "tenant": t, "user": user, "factor": factor, "step": step}),
        )
    };
    let before = last_step(entities(&server).await).expect("alice's factor is listed");
    let head = server.head().await;

    // A pending factor, and a factor reported under a user it is not of.
    let ack = report(
        &server,
        "node_a",
        vec![
            accepted(1, "bob", &pending.id, 99_000_000_000),
            accepted(2, "bob", &active.id, 99_000_000_000),
        ],
    )
    .await;
    assert_eq!(ack["through"], 2);
    assert_eq!(server.head().await, head, "nothing to publish");
    assert_eq!(last_step(entities(&server).await), Some(before));

    let ack = report(
        &server,
        "node_a",
        vec![accepted(3, "alice", &active.id, 99_000_000_000)],
    )
    .await;
    assert_eq!(ack["seq"], head + 1);
    assert_eq!(
        last_step(entities(&server).await),
        Some(Some(99_000_000_000))
    );

    // The same step again, from another node: already there.
    report(
        &server,
        "node_b",
        vec![accepted(1, "alice", &active.id, 99_000_000_000)],
    )
    .await;
    assert_eq!(server.head().await, head + 1, "a step already merged");
}

async fn failures_from_several_nodes_combine_into_a_throttle() {
    let server = TestServer::start().await;
    let tenant = server.tenant("acme").await;
    server.active_factor(&tenant.manage, "alice").await;
    for node in ["node_a", "node_b"] {
        report(&server, node, failures(&tenant.id, "alice", 1..=3)).await;
    }
    let state = entities(&server)
        .await
        .into_iter()
        .find_map(|e| match e {
            Entity::UserState(u) => Some(u),
            _ => None,
        })
        .expect("user state");
    assert_eq!(state.failures, 6, "each node's cursor is its own");
    assert_eq!(state.throttled_until, Some(1_700_000_000 + 60));
    assert_eq!(
        listed_failures(&server, &tenant.manage, "alice").await,
        Some(6)
    );
}

async fn reports_are_validated_and_may_exceed_the_default_body_limit() {
    let server = TestServer::start().await;
    let tenant = server.tenant("acme").await;
    let manage_only = server.create_key(&tenant.id, &["manage"]).await;
    let (status, _) = server
        .post(
            "/v1/feed/usage",
            &manage_only.secret,
            json!({"node": "n", "events": []}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    for bad in [
        json!({"node": "", "events": []}),
        json!({"node": "n", "events": [event(1, json!({"type": "failure", "tenant": tenant.id, "user": "a\u{0}b", "at": 1}))]}),
        json!({"node": "n", "events": [event(1, json!({"type": "teleport", "tenant": tenant.id, "user": "a"}))]}),
        json!({"node": "n", "events": [], "extra": 1}),
    ] {
        let (status, body) = server.post("/v1/feed/usage", OPERATOR, bad.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad} -> {body}");
    }
    // 900 events with long user ids: well over the 64 KiB default limit.
    let long_user = "u".repeat(200);
    let events: Vec<Value> = (1..=900)
        .map(|id| {
            event(
                id,
                json!({"type": "success", "tenant": tenant.id, "user": long_user}),
            )
        })
        .collect();
    let report = json!({"node": "big", "events": events});
    assert!(report.to_string().len() > 64 * 1024);
    let (status, ack) = server.post("/v1/feed/usage", OPERATOR, report).await;
    assert_eq!(status, StatusCode::OK, "{ack}");
    assert_eq!(ack["through"], 900);
}

/// Bob's backup code 2, used once through the strict path.
struct UsedCode {
    tenant: Tenant,
    node: NewKey,
    set_id: String,
    /// The request that used it.
    body: Value,
}

async fn use_bobs_code(server: &TestServer) -> UsedCode {
    let tenant = server.tenant("acme").await;
    server.backup_codes(&tenant.manage, "bob").await;
    let set_id = backup_set_id(server).await;
    let node = server.create_node_key().await;
    let body = json!({"tenant": tenant.id, "user": "bob", "set_id": set_id, "index": 2});
    let (status, first) = server
        .post("/v1/feed/backup-code-use", &node.secret, body.clone())
        .await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(first["accepted"], true);
    UsedCode {
        tenant,
        node,
        set_id,
        body,
    }
}

async fn strict_backup_code_use_is_accepted_once() {
    let server = TestServer::start().await;
    let UsedCode {
        tenant, node, body, ..
    } = use_bobs_code(&server).await;
    let (_, second) = server
        .post("/v1/feed/backup-code-use", &node.secret, body)
        .await;
    assert_eq!(
        second["accepted"], false,
        "a code is used once, on any node"
    );
    let (_, other_set) = server
        .post(
            "/v1/feed/backup-code-use",
            &node.secret,
            json!({"tenant": tenant.id, "user": "bob", "set_id": "fa_aaaaaaaaaaaaaaaa", "index": 3}),
        )
        .await;
    assert_eq!(
        other_set["accepted"], false,
        "a code of a replaced set is not accepted"
    );
}

async fn a_published_state_counts_every_event_of_its_report() {
    let server = TestServer::start().await;
    let tenant = server.tenant("acme").await;
    server.active_factor(&tenant.manage, "alice").await;
    let t = &tenant.id;
    // Two failures, a success (published: it resets them), then a failure: the
    // state published by this report must count that last one too, since the
    // node is told that the change counts all of its events.
    let mut events = failures(t, "alice", 1..=2);
    events.push(event(
        3,
        json!({"type": "success", "tenant": t, "user": "alice"}),
    ));
    events.push(event(4, failure_of(t, "alice")));
    let ack = report(&server, "node_a", events).await;
    assert_eq!(ack["counted_from"], ack["seq"]);
    assert_eq!(published_failures(&server, "alice").await, Some(1));
}

async fn a_retried_report_is_answered_with_its_first_merge() {
    let server = TestServer::start().await;
    let tenant = server.tenant("acme").await;
    server.active_factor(&tenant.manage, "alice").await;
    server.active_factor(&tenant.manage, "bob").await;
    let t = &tenant.id;
    let ack = report(&server, "node_a", failures(t, "alice", 1..=1)).await;
    let counted_from = ack["counted_from"].as_u64().expect("counted_from");
    assert!(ack.get("retried").is_none(), "{ack}");
    // Another node's report publishes something in between.
    let bob_success = json!({"type": "success", "tenant": t, "user": "bob"});
    let between = vec![
        event(1, bob_success.clone()),
        event(2, failure_of(t, "bob")),
        event(3, bob_success),
    ];
    report(&server, "node_b", between).await;
    // The answer to the first was lost: node_a sends event 1 again, with 2.
    let ack = report(&server, "node_a", failures(t, "alice", 1..=2)).await;
    assert_eq!(ack["retried"]["through"], 1);
    assert_eq!(ack["retried"]["counted_from"], counted_from);
    let second = ack["counted_from"].as_u64().expect("counted_from");
    assert!(second > counted_from, "{ack}");
    // Everything merged before: the answer is the last merge's.
    let again = report(&server, "node_a", failures(t, "alice", 1..=2)).await;
    assert_eq!(again["counted_from"], second);
}

async fn a_refused_code_resets_nothing() {
    let server = TestServer::start().await;
    let UsedCode {
        tenant,
        node,
        set_id,
        body,
    } = use_bobs_code(&server).await;
    report(&server, "node_a", failures(&tenant.id, "bob", 1..=3)).await;
    let m = &tenant.manage;
    assert_eq!(listed_failures(&server, m, "bob").await, Some(3));
    // The used code again, strict and reported: refused, and no reset.
    let (_, again) = server
        .post("/v1/feed/backup-code-use", &node.secret, body)
        .await;
    assert_eq!(again["accepted"], false);
    let used = json!({"type": "backup_code_used", "tenant": tenant.id, "user": "bob", "set_id": set_id, "index": 2});
    report(&server, "node_a", vec![event(4, used)]).await;
    assert_eq!(listed_failures(&server, m, "bob").await, Some(3));
}

async fn a_user_with_only_unpublished_failures_can_be_deleted() {
    let server = TestServer::start().await;
    let tenant = server.tenant("acme").await;
    let factor = server.active_factor(&tenant.manage, "carol").await;
    report(&server, "node_a", failures(&tenant.id, "carol", 1..=2)).await;
    let (status, _) = server
        .delete(
            &format!("/v1/users/{}/factors/{}", enc("carol"), factor.id),
            &tenant.manage,
        )
        .await;
    assert!(status.is_success(), "{status}");
    let head = server.head().await;
    let (status, body) = server
        .delete(&format!("/v1/users/{}", enc("carol")), &tenant.manage)
        .await;
    assert!(status.is_success(), "{status} {body}");
    assert_eq!(
        server.head().await,
        head + 1,
        "nodes are told to drop their count"
    );
    let (status, _) = server
        .post(
            &format!("/v1/users/{}/unlock", enc("carol")),
            &tenant.manage,
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "nothing is left of carol");
}
