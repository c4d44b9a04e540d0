//! The end-to-end availability suite: real `twofold control` and `twofold data`
//! processes on loopback, killed, restarted and compacted under the tests' feet,
//! and checked through HTTP only (see `common` for the harness).
//!
//! One test per scenario:
//!
//! 1. enrol, activate and verify, with codes computed apart from the server;
//! 2. verification goes on, without one failure, while the control plane is
//!    killed;
//! 3. a data plane restarted while the control plane is down serves from its
//!    replica;
//! 4. a data plane that was down resumes the feed, and one that fell behind the
//!    retained log bootstraps again by itself while it keeps serving;
//! 5. a TOTP code, a backup code and throttling count on every data plane within
//!    a second;
//! 6. a data plane killed again and again during a large sync always comes back
//!    with a loadable replica that ends up equal to the control plane's state;
//! 7. a revoked key and a deleted factor stop working everywhere within a second;
//! 8. data planes resume, rather than bootstrap, after the control plane
//!    restarts.
//!
//! Deadlines for convergence are generous (`WAIT`); the one-second bounds the
//! scenarios promise are measured from the event and asserted on their own.

mod common;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use reqwest::StatusCode;
use serde_json::{Value, json};

/// How fast a change must reach every data plane (scenarios 5 and 7).
const PROPAGATION: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------
// A verification load
// ---------------------------------------------------------------------------

/// A credential the data plane is expected to accept, once.
#[derive(Debug, Clone)]
enum Credential {
    /// The factor's next unused code, computed when it is sent.
    Totp(Arc<Totp>),
    Backup {
        user: String,
        set_id: String,
        code: String,
    },
}

impl Credential {
    fn backup(user: &str, set: &BackupCodes, index: usize) -> Credential {
        Credential::Backup {
            user: user.to_owned(),
            set_id: set.set_id.clone(),
            code: set.codes[index].clone(),
        }
    }

    fn user(&self) -> &str {
        match self {
            Credential::Totp(factor) => &factor.user,
            Credential::Backup { user, .. } => user,
        }
    }

    async fn code(&self) -> String {
        match self {
            Credential::Totp(factor) => factor.fresh_code().await,
            Credential::Backup { code, .. } => code.clone(),
        }
    }

    fn expected(&self) -> Value {
        match self {
            Credential::Totp(factor) => valid("totp", &factor.id),
            Credential::Backup { set_id, .. } => valid("backup", set_id),
        }
    }
}

/// What a running verification load has done so far.
#[derive(Debug, Default)]
struct Load {
    /// Attempts sent (or about to be).
    started: AtomicUsize,
    /// Attempts answered, well or not.
    answered: AtomicUsize,
    /// Every answer other than the expected `valid: true`, errors included.
    failures: Mutex<Vec<String>>,
    stop: AtomicBool,
}

impl Load {
    fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }

    fn answered(&self) -> usize {
        self.answered.load(Ordering::SeqCst)
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    fn failures(&self) -> Vec<String> {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Verify each credential once on `data`, `parallel` requests at a time, until
/// they run out or the load is stopped.
fn spawn_load(
    data: &DataPlane,
    key: &str,
    credentials: Vec<Credential>,
    parallel: usize,
    load: Arc<Load>,
) -> tokio::task::JoinHandle<()> {
    let client = data.client.clone();
    let url = data.url("/v1/verify");
    let key = key.to_owned();
    let queue = Arc::new(Mutex::new(VecDeque::from(credentials)));
    tokio::spawn(async move {
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..parallel {
            let (client, url, key) = (client.clone(), url.clone(), key.clone());
            let (queue, load) = (queue.clone(), load.clone());
            workers.spawn(async move {
                while !load.stop.load(Ordering::SeqCst) {
                    let next = queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
                    let Some(credential) = next else { return };
                    load.started.fetch_add(1, Ordering::SeqCst);
                    let body =
                        json!({ "user": credential.user(), "code": credential.code().await });
                    let request = client.post(&url).bearer_auth(&key).json(&body);
                    let failure = match try_send(request).await {
                        Some(reply)
                            if reply.status == StatusCode::OK
                                && serde_json::from_str::<Value>(&reply.text).ok()
                                    == Some(credential.expected()) =>
                        {
                            None
                        }
                        Some(reply) => Some(format!(
                            "{}: {} {}",
                            credential.user(),
                            reply.status,
                            reply.text
                        )),
                        None => Some(format!("{}: no answer", credential.user())),
                    };
                    if let Some(failure) = failure {
                        load.failures
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(failure);
                    }
                    load.answered.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        while let Some(done) = workers.join_next().await {
            done.expect("a verifier task");
        }
    })
}

/// Wait until every node in `from` has had its usage acknowledged and every node
/// in `to` has applied the control plane's head as of then.
async fn propagated(control: &Api, from: &[&DataPlane], to: &[&DataPlane]) {
    for node in from {
        node.wait_reported().await;
    }
    let head = control.head().await;
    for node in to {
        node.wait_applied(head).await;
    }
}

#[track_caller]
fn assert_within(what: &str, took: Duration) {
    assert!(
        took < PROPAGATION,
        "{what} took {took:?}, more than {PROPAGATION:?}"
    );
}

/// The value of `name` in a URI's query, as an authenticator app reads it.
fn query_param<'a>(uri: &'a str, name: &str) -> Option<&'a str> {
    let (_, query) = uri.split_once('?')?;
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
}

// ---------------------------------------------------------------------------
// The scenarios
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn scenario_1_enrol_activate_and_verify_with_independent_codes() {
    let cluster = Cluster::start().await;
    let (manage, key) = (cluster.manage(), cluster.verify_key());

    let (status, body) = cluster
        .control
        .post("/v1/users/alice/totp", manage, &json!({ "qr": "none" }))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // The app reads the otpauth URI; it holds the secret the answer shows.
    let uri = body["otpauth_uri"].as_str().expect("otpauth_uri");
    assert!(uri.starts_with("otpauth://totp/"), "{uri}");
    assert_eq!(query_param(uri, "secret"), body["secret"].as_str(), "{uri}");
    let factor = Totp::from_enrolment("alice", &body);
    assert_eq!(
        (factor.algorithm.as_str(), factor.digits, factor.period),
        ("SHA1", 6, 30)
    );

    // Pending until activated: data planes never see it.
    cluster.sync().await;
    assert_eq!(
        cluster.data.verify(key, "alice", &factor.peek_code()).await,
        (StatusCode::OK, invalid()),
        "a pending factor"
    );

    cluster.control.activate(manage, &factor).await;
    cluster.sync().await;
    let code = factor.fresh_code().await;
    assert_eq!(
        cluster.data.verify(key, "alice", &code).await,
        (StatusCode::OK, valid("totp", &factor.id))
    );
    assert_eq!(
        cluster.data.verify(key, "alice", &code).await,
        (StatusCode::OK, invalid()),
        "the same code again"
    );
    assert_eq!(
        cluster
            .data
            .verify(key, "alice", &factor.wrong_code())
            .await,
        (StatusCode::OK, invalid()),
        "a wrong code"
    );

    let set = cluster.control.backup_codes(manage, "alice").await;
    cluster.sync().await;
    assert_eq!(
        cluster.data.verify(key, "alice", &set.codes[4]).await,
        (StatusCode::OK, valid("backup", &set.set_id))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn scenario_2_no_verification_fails_while_the_control_plane_is_killed() {
    // Each user's TOTP code once and every backup code once, so replay
    // protection and throttling have no reason to refuse a legitimate attempt.
    const USERS: usize = 110;
    const BEFORE_KILL: usize = 50;
    let mut cluster = Cluster::start().await;
    let manage = cluster.manage().to_owned();
    let users: Vec<String> = (0..USERS).map(|i| format!("user-{i:03}")).collect();
    let started = Instant::now();
    let factors = active_factors_for(&cluster.control.api, &manage, users.clone(), 8).await;
    let sets = backup_codes_for(&cluster.control.api, &manage, users.clone(), 8).await;
    eprintln!("{USERS} users enrolled in {:?}", started.elapsed());
    cluster.sync().await;

    let mut credentials = Vec::new();
    for ((user, factor), set) in users.iter().zip(factors).zip(&sets) {
        credentials.push(Credential::Totp(Arc::new(factor)));
        credentials.extend((0..set.codes.len()).map(|i| Credential::backup(user, set, i)));
    }
    let total = credentials.len();
    let load = Arc::new(Load::default());
    let running = spawn_load(
        &cluster.data,
        cluster.verify_key(),
        credentials,
        4,
        load.clone(),
    );
    wait_for("verifications before the kill", WAIT, || async {
        (load.answered() >= BEFORE_KILL).then_some(())
    })
    .await;
    cluster.control.kill();
    let outage_from = load.started();
    let outage = Instant::now();
    running.await.expect("the verification load");
    let during = load.started() - outage_from;
    eprintln!(
        "{during} verifications during the outage in {:?}",
        outage.elapsed()
    );
    let failures = load.failures();
    assert!(
        failures.is_empty(),
        "{} of {total} verifications failed: {failures:#?}",
        failures.len()
    );
    assert_eq!(load.answered(), total);
    assert!(
        during >= 1000,
        "only {during} verifications during the outage"
    );

    // Back again: what the node accepted meanwhile reaches the control plane.
    cluster.control.restart().await;
    cluster.data.wait_reported().await;
    let summary = cluster.control.user_factors(&manage, &users[0]).await;
    assert_eq!(
        summary["backup_codes"],
        json!({ "remaining": 0, "total": 10 }),
        "{summary}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn scenario_3_a_restart_without_the_control_plane_still_verifies() {
    let mut cluster = Cluster::start().await;
    let factor = cluster
        .control
        .active_factor(cluster.manage(), "judy")
        .await;
    let set = cluster.control.backup_codes(cluster.manage(), "judy").await;
    let applied = cluster.data.wait_synced(&cluster.control).await;

    cluster.control.kill();
    let status = cluster.data.terminate().await;
    assert!(
        status.success(),
        "the data plane exits cleanly on SIGTERM: {status}"
    );
    cluster.data.restart().await;
    // Ready from the replica on disk, with no control plane to ask.
    assert_eq!(cluster.data.readyz().await, Some(StatusCode::OK));
    assert_eq!(cluster.data.get("/healthz").await.status, StatusCode::OK);
    assert_eq!(cluster.data.applied_seq().await, Some(applied));
    assert_eq!(
        cluster.data.bootstraps().await,
        Some(0),
        "no snapshot taken"
    );

    let key = cluster.tenant.verify.secret.clone();
    let key = key.as_str();
    let code = factor.fresh_code().await;
    assert_eq!(
        cluster.data.verify(key, "judy", &code).await,
        (StatusCode::OK, valid("totp", &factor.id))
    );
    assert_eq!(
        cluster.data.verify(key, "judy", &set.codes[0]).await,
        (StatusCode::OK, valid("backup", &set.set_id))
    );

    // Accepted while the control plane was down, and kept across a kill -9,
    // after which the node is ready at once again and still verifies.
    cluster.data.restart().await;
    assert_eq!(cluster.data.readyz().await, Some(StatusCode::OK));
    assert_eq!(cluster.data.applied_seq().await, Some(applied));
    assert_eq!(
        cluster.data.verify(key, "judy", &code).await,
        (StatusCode::OK, invalid())
    );
    assert_eq!(
        cluster.data.verify(key, "judy", &set.codes[0]).await,
        (StatusCode::OK, invalid())
    );
    assert_eq!(
        cluster.data.verify(key, "judy", &set.codes[1]).await,
        (StatusCode::OK, valid("backup", &set.set_id))
    );

    // The control plane comes back on its port: the node reports what it
    // accepted, and changes flow again.
    cluster.control.restart().await;
    cluster.data.wait_reported().await;
    let factors = cluster.control.user_factors(cluster.manage(), "judy").await;
    assert_eq!(factors["backup_codes"]["remaining"], 8, "{factors}");
    cluster
        .control
        .revoke_key(&cluster.tenant.id, &cluster.tenant.verify.id)
        .await;
    cluster.sync().await;
    let reply = cluster.data.verify_reply(key, "judy", "123456").await;
    assert_error(&reply, StatusCode::UNAUTHORIZED, "unauthorized");
}

#[tokio::test(flavor = "multi_thread")]
async fn scenario_4_a_data_plane_that_was_down_catches_up() {
    // Enough state that a snapshot takes a while to load, and a log compacted
    // every second that keeps the last 500 changes. Not much less: the node's
    // own usage reports during its bootstrap (some 80 here) are changes too, and
    // if the log dropped them before the node could tail them, it would have to
    // bootstrap once more.
    const BULK: usize = 2000;
    const KEPT: usize = 500;
    let kept = KEPT.to_string();
    let args = ["--retain-changes", &kept, "--compact-every-secs", "1"];
    let control =
        ControlPlane::start_with(new_master_key(), args.map(str::to_owned).to_vec()).await;
    let tenant = control.tenant("acme").await;
    let node_key = control.create_node_key().await;
    let (manage, key) = (tenant.manage.secret.clone(), tenant.verify.secret.clone());
    let bulk: Vec<String> = (0..BULK).map(|i| format!("bulk-{i:04}")).collect();
    let started = Instant::now();
    let bulk_sets = backup_codes_for(&control.api, &manage, bulk.clone(), 16).await;
    eprintln!("{BULK} users created in {:?}", started.elapsed());
    let doomed = control.active_factor(&manage, "doomed").await;
    let spare = control.create_key(&tenant.id, &["verify"]).await;

    let mut data = control.data_plane(&node_key.secret).await;
    data.wait_ready().await;
    data.wait_synced(&control).await;
    assert_eq!(data.bootstraps().await, Some(1));
    assert_eq!(
        data.verify(&spare.secret, "nobody", "123456").await,
        (StatusCode::OK, invalid()),
        "the spare key verifies"
    );

    // Act 1: a few changes while the node is down, all still in the log.
    data.kill();
    let late = control.active_factor(&manage, "late").await;
    let late_set = control.backup_codes(&manage, "late").await;
    control.delete_factor(&manage, "doomed", &doomed.id).await;
    control.revoke_key(&tenant.id, &spare.id).await;
    let head = control.head().await;
    data.restart().await;
    assert_eq!(data.readyz().await, Some(StatusCode::OK), "ready at once");
    data.wait_applied(head).await;
    assert_eq!(
        data.bootstraps().await,
        Some(0),
        "caught up without a snapshot"
    );
    assert!(
        data.resumes().await.is_some_and(|r| r >= 1),
        "caught up by resuming the change stream"
    );
    assert_eq!(
        data.verify(&key, "late", &late.fresh_code().await).await,
        (StatusCode::OK, valid("totp", &late.id))
    );
    assert_eq!(
        data.verify(&key, "late", &late_set.codes[0]).await,
        (StatusCode::OK, valid("backup", &late_set.set_id))
    );
    assert_eq!(
        data.verify(&key, "doomed", &doomed.fresh_code().await)
            .await,
        (StatusCode::OK, invalid()),
        "a factor deleted while the node was down (its unused code)"
    );
    let reply = data.verify_reply(&spare.secret, "doomed", "123456").await;
    assert_error(&reply, StatusCode::UNAUTHORIZED, "unauthorized");

    // Act 2: more changes while it is down than the log keeps. It comes back
    // serving its old replica, is told the feed is gone, and bootstraps again
    // by itself, answering every verification meanwhile.
    let behind = data.applied_seq().await.expect("applied seq");
    data.kill();
    let later: Vec<String> = (0..KEPT + 20).map(|i| format!("later-{i:03}")).collect();
    let later_sets = backup_codes_for(&control.api, &manage, later.clone(), 16).await;
    wait_for("compaction to pass the node", WAIT, || async {
        (control.changes_status(behind).await == StatusCode::GONE).then_some(())
    })
    .await;
    data.restart().await;
    let mut credentials = Vec::new();
    for index in 0..10 {
        for (user, set) in bulk.iter().zip(&bulk_sets) {
            credentials.push(Credential::backup(user, set, index));
        }
    }
    let load = Arc::new(Load::default());
    let running = spawn_load(&data, &key, credentials, 4, load.clone());
    // Answers counted before a look at the metrics that still showed no
    // bootstrap were given while the node was bootstrapping.
    let deadline = Instant::now() + WAIT;
    let mut during = 0;
    loop {
        let answered = load.answered();
        assert_eq!(
            data.readyz().await,
            Some(StatusCode::OK),
            "ready throughout"
        );
        match data.bootstraps().await.expect("metrics") {
            0 => during = answered,
            _ => break,
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for the node to bootstrap again"
        );
        tokio::time::sleep(POLL).await;
    }
    let after = load.answered();
    wait_for("verifications after the bootstrap", WAIT, || async {
        (load.answered() >= after + 50).then_some(())
    })
    .await;
    load.stop();
    running.await.expect("the verification load");
    eprintln!(
        "{during} verifications answered while bootstrapping, {} in all",
        load.answered()
    );
    let failures = load.failures();
    assert!(
        failures.is_empty(),
        "{} of {} verifications failed: {failures:#?}",
        failures.len(),
        load.answered()
    );
    assert!(during > 0, "no verification answered during the bootstrap");

    assert_same_state(&data, &control, &node_key.secret).await;
    assert_eq!(data.bootstraps().await, Some(1));
    assert_eq!(
        data.verify(&key, "later-000", &later_sets[0].codes[0])
            .await,
        (StatusCode::OK, valid("backup", &later_sets[0].set_id))
    );
    assert_eq!(
        data.verify(&key, "late", &late_set.codes[1]).await,
        (StatusCode::OK, valid("backup", &late_set.set_id))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn scenario_5_usage_on_one_data_plane_counts_on_the_other_within_a_second() {
    let cluster = Cluster::start().await;
    let b = cluster.another_data_plane().await;
    let a = &cluster.data;
    let control = &cluster.control.api;
    let (manage, key) = (cluster.manage(), cluster.verify_key());
    let tom = cluster.control.active_factor(manage, "tom").await;
    let bea = cluster.control.backup_codes(manage, "bea").await;
    let theo = cluster.control.active_factor(manage, "theo").await;
    cluster.sync().await;
    b.wait_synced(control).await;

    // A TOTP code accepted on A...
    let code = tom.fresh_code().await;
    assert_eq!(
        a.verify(key, "tom", &code).await,
        (StatusCode::OK, valid("totp", &tom.id))
    );
    let accepted = Instant::now();
    // ...is refused on B once A's report has come back through the feed.
    propagated(control, &[a], &[&b]).await;
    assert_eq!(
        b.verify(key, "tom", &code).await,
        (StatusCode::OK, invalid())
    );
    let totp_took = accepted.elapsed();

    // A backup code used on B is refused on A.
    assert_eq!(
        b.verify(key, "bea", &bea.codes[0]).await,
        (StatusCode::OK, valid("backup", &bea.set_id))
    );
    let used = Instant::now();
    propagated(control, &[&b], &[a]).await;
    assert_eq!(
        a.verify(key, "bea", &bea.codes[0]).await,
        (StatusCode::OK, invalid())
    );
    let backup_took = used.elapsed();

    // Three failures on A and two on B: five in all, so the next attempt on
    // either is throttled, even with the right code.
    let wrong = theo.wrong_code();
    for (node, times) in [(a, 3), (&b, 2)] {
        for _ in 0..times {
            assert_eq!(
                node.verify(key, "theo", &wrong).await,
                (StatusCode::OK, invalid())
            );
        }
    }
    let failed = Instant::now();
    propagated(control, &[a, &b], &[a, &b]).await;
    for node in [a, &b] {
        let reply = node.verify_reply(key, "theo", &theo.peek_code()).await;
        assert_error(&reply, StatusCode::TOO_MANY_REQUESTS, "throttled");
        assert!(reply.header("retry-after").is_some(), "{reply:?}");
    }
    let throttle_took = failed.elapsed();

    eprintln!(
        "refused on the other node after: TOTP {totp_took:?}, backup code {backup_took:?}, \
         throttle {throttle_took:?}"
    );
    assert_within("a TOTP code's use reaching the other node", totp_took);
    assert_within("a backup code's use reaching the other node", backup_took);
    assert_within("failures reaching both nodes", throttle_took);
}

#[tokio::test(flavor = "multi_thread")]
async fn scenario_6_a_data_plane_killed_during_a_large_sync_always_restarts() {
    const USERS: usize = 2000;
    // The log keeps only its newest change and is compacted every second, so a
    // node that falls behind must bootstrap again: kills land in first
    // bootstraps, in tails and in re-bootstraps.
    let args = ["--retain-changes", "1", "--compact-every-secs", "1"];
    let mut control =
        ControlPlane::start_with(new_master_key(), args.map(str::to_owned).to_vec()).await;
    let tenant = control.tenant("big").await;
    let node_key = control.create_node_key().await;
    let manage = tenant.manage.secret.clone();
    let key = tenant.verify.secret.clone();
    let users: Vec<String> = (0..USERS).map(|i| format!("user-{i:04}")).collect();
    let started = Instant::now();
    backup_codes_for(&control.api, &manage, users.clone(), 16).await;
    let kept = control.backup_codes(&manage, "kept").await;
    let factor = control.active_factor(&manage, "kept").await;
    eprintln!("{USERS} users created in {:?}", started.elapsed());

    // Act 1: a new node, killed at random moments as changes keep coming.
    let stop = Arc::new(AtomicBool::new(false));
    let mutator = {
        let (api, manage, stop) = (control.api.clone(), manage.clone(), stop.clone());
        let users = users.clone();
        tokio::spawn(async move {
            let mut made = 0;
            while !stop.load(Ordering::SeqCst) {
                let user = &users[random_below(USERS as u64) as usize];
                api.backup_codes(&manage, user).await;
                made += 1;
            }
            made
        })
    };
    let mut data = control.data_plane(&node_key.secret).await;
    // TWOFOLD_TEST_KILLS=100 soaks it longer.
    let rounds: u32 = std::env::var("TWOFOLD_TEST_KILLS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20);
    // Whether the node is known to have loaded a snapshot once: from then on it
    // must come back ready from its replica, whenever it is killed.
    let mut bootstrapped = false;
    let mut kills = Vec::new();
    for round in 0..rounds {
        // Fault injection, not waiting: the point is a random moment.
        let delay = Duration::from_millis(random_below(700));
        tokio::time::sleep(delay).await;
        let ready = data.readyz().await == Some(StatusCode::OK);
        let applied = data.applied_seq().await;
        bootstrapped |= ready;
        data.kill();
        data.restart().await;
        let back = data.readyz().await == Some(StatusCode::OK);
        kills.push(format!(
            "after {delay:?}: {}, applied {applied:?}; back {}",
            if ready {
                "synced once"
            } else {
                "first bootstrap"
            },
            if back { "ready" } else { "not ready" }
        ));
        assert!(
            back || !bootstrapped,
            "kill {round}: a node that had loaded a snapshot came back not ready: {kills:#?}"
        );
        bootstrapped |= back;
    }
    stop.store(true, Ordering::SeqCst);
    let made = mutator.await.expect("mutator");
    eprintln!("act 1 kills: {kills:#?}; {made} changes made meanwhile");
    // Ready (bootstrapping now if it never finished before) and equal to the
    // control plane's state.
    assert_same_state(&data, &control, &node_key.secret).await;
    assert!(
        data.replica_digest().await["count"]
            .as_u64()
            .expect("count")
            > USERS as u64
    );
    assert_eq!(
        data.verify(&key, "kept", &kept.codes[3]).await,
        (StatusCode::OK, valid("backup", &kept.set_id))
    );

    // Act 2: the node uses a code while the control plane is down, goes down
    // itself, and comes back after compaction passed it: it serves from its old
    // replica at once and bootstraps again, killed during that too.
    control.kill();
    assert_eq!(
        data.verify(&key, "kept", &kept.codes[5]).await,
        (StatusCode::OK, valid("backup", &kept.set_id))
    );
    let behind = data.applied_seq().await.expect("applied seq");
    data.kill();
    control.restart().await;
    backup_codes_for(&control.api, &manage, users[..20].to_vec(), 4).await;
    wait_for("compaction to pass the node", WAIT, || async {
        (control.changes_status(behind).await == StatusCode::GONE).then_some(())
    })
    .await;
    let mut kills = Vec::new();
    for _ in 0..5 {
        data.restart().await;
        assert_eq!(
            data.readyz().await,
            Some(StatusCode::OK),
            "ready from the old replica at once"
        );
        if kills.is_empty() {
            for used in [3, 5] {
                assert_eq!(
                    data.verify(&key, "kept", &kept.codes[used]).await,
                    (StatusCode::OK, invalid()),
                    "code {used} stays used"
                );
            }
        }
        // Fault injection, not waiting: the point is a random moment.
        let delay = Duration::from_millis(random_below(700));
        tokio::time::sleep(delay).await;
        let applied = data.applied_seq().await;
        data.kill();
        kills.push(format!("after {delay:?}: applied {applied:?}"));
    }
    eprintln!("act 2 kills (behind at {behind}): {kills:#?}");
    data.restart().await;
    assert_same_state(&data, &control, &node_key.secret).await;

    // It serves from what it loaded, and the control plane knows both codes used.
    for used in [3, 5] {
        assert_eq!(
            data.verify(&key, "kept", &kept.codes[used]).await,
            (StatusCode::OK, invalid()),
            "code {used} stays used"
        );
    }
    assert_eq!(
        data.verify(&key, "kept", &kept.codes[7]).await,
        (StatusCode::OK, valid("backup", &kept.set_id))
    );
    assert_eq!(
        data.verify(&key, "kept", &factor.fresh_code().await).await,
        (StatusCode::OK, valid("totp", &factor.id))
    );
    data.wait_reported().await;
    let summary = control.user_factors(&manage, "kept").await;
    assert_eq!(summary["backup_codes"]["remaining"], 7, "{summary}");
}

#[tokio::test(flavor = "multi_thread")]
async fn scenario_7_revocation_and_deletion_reach_every_data_plane_within_a_second() {
    let cluster = Cluster::start().await;
    let b = cluster.another_data_plane().await;
    let a = &cluster.data;
    let nodes = [a, &b];
    let control = &cluster.control;
    let (manage, key) = (cluster.manage(), cluster.verify_key());
    let spare = control.create_key(&cluster.tenant.id, &["verify"]).await;
    let vic = control.active_factor(manage, "vic").await;
    cluster.sync().await;
    b.wait_synced(control).await;
    for node in nodes {
        assert_eq!(
            node.verify(&spare.secret, "nobody", "123456").await,
            (StatusCode::OK, invalid()),
            "the key verifies before it is revoked"
        );
    }

    // Revoke the key; ask each node with it until it is refused. Each probe
    // names another unknown user, so no throttle gets in the way.
    control.revoke_key(&cluster.tenant.id, &spare.id).await;
    let revoked = Instant::now();
    let probes = AtomicUsize::new(0);
    let mut revoke_took = Vec::new();
    for node in nodes {
        let took = wait_for("the revoked key to be refused", WAIT, || async {
            let user = format!("probe-{}", probes.fetch_add(1, Ordering::SeqCst));
            let reply = node.verify_reply(&spare.secret, &user, "123456").await;
            match reply.status {
                StatusCode::UNAUTHORIZED => {
                    assert_error(&reply, StatusCode::UNAUTHORIZED, "unauthorized");
                    Some(revoked.elapsed())
                }
                StatusCode::OK => {
                    assert_eq!(reply.json(), invalid());
                    None
                }
                other => panic!("unexpected {other}: {}", reply.text),
            }
        })
        .await;
        revoke_took.push(took);
    }

    // Delete the factor: once both nodes have the change, its next code, which
    // no one has used, is refused on both.
    control.delete_factor(manage, "vic", &vic.id).await;
    let deleted = Instant::now();
    let head = control.head().await;
    for node in nodes {
        node.wait_applied(head).await;
    }
    let code = vic.fresh_code().await;
    for node in nodes {
        assert_eq!(
            node.verify(key, "vic", &code).await,
            (StatusCode::OK, invalid()),
            "a deleted factor"
        );
    }
    let delete_took = deleted.elapsed();

    // The tenant's other key is untouched.
    for node in nodes {
        assert_eq!(
            node.verify(key, "nobody", "123456").await,
            (StatusCode::OK, invalid())
        );
    }
    eprintln!("revocation refused after {revoke_took:?}; deletion after {delete_took:?}");
    for took in revoke_took {
        assert_within("a revocation reaching a node", took);
    }
    assert_within("a deletion reaching both nodes", delete_took);
}

#[tokio::test(flavor = "multi_thread")]
async fn scenario_8_data_planes_resume_after_the_control_plane_restarts() {
    let mut cluster = Cluster::start().await;
    let b = cluster.another_data_plane().await;
    let manage = cluster.manage().to_owned();
    let key = cluster.verify_key().to_owned();
    for node in [&cluster.data, &b] {
        assert_eq!(node.bootstraps().await, Some(1));
    }

    for (round, graceful) in [(1, true), (2, false)] {
        let user = format!("user-{round}");
        let set = cluster.control.backup_codes(&manage, &user).await;
        let head = cluster.control.head().await;
        let mut resumes = Vec::new();
        for node in [&cluster.data, &b] {
            node.wait_applied(head).await;
            resumes.push(node.resumes().await.expect("resumes"));
        }

        if graceful {
            let status = cluster.control.terminate().await;
            assert!(
                status.success(),
                "the control plane exits on SIGTERM: {status}"
            );
        } else {
            cluster.control.kill();
        }
        // Both keep verifying meanwhile.
        for (i, node) in [&cluster.data, &b].into_iter().enumerate() {
            assert_eq!(
                node.verify(&key, &user, &set.codes[i]).await,
                (StatusCode::OK, valid("backup", &set.set_id)),
                "round {round}, node {i}, control plane down"
            );
        }
        cluster.control.restart().await;

        // Both open a new change stream where they left off...
        for (node, before) in [&cluster.data, &b].into_iter().zip(resumes) {
            wait_for("the node to resume the change stream", WAIT, || async {
                node.resumes()
                    .await
                    .is_some_and(|r| r > before)
                    .then_some(())
            })
            .await;
        }
        // ...and changes made from now on reach both.
        let after = format!("{user}-after");
        let fresh = cluster.control.backup_codes(&manage, &after).await;
        let head = cluster.control.head().await;
        for (i, node) in [&cluster.data, &b].into_iter().enumerate() {
            node.wait_applied(head).await;
            assert_eq!(
                node.verify(&key, &after, &fresh.codes[i]).await,
                (StatusCode::OK, valid("backup", &fresh.set_id)),
                "round {round}, node {i}, after the restart"
            );
            assert_eq!(
                node.bootstraps().await,
                Some(1),
                "round {round}, node {i}: resumed, not bootstrapped again"
            );
            node.wait_reported().await;
        }
        let summary = cluster.control.user_factors(&manage, &user).await;
        assert_eq!(summary["backup_codes"]["remaining"], 8, "{summary}");
    }
}
