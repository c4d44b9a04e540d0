//! The data plane's own API over real HTTP: real `twofold control` and `twofold
//! data` processes, checked through their APIs only (see `common` for the
//! harness). Availability under failures (restarts, kills, compaction, several
//! nodes) is the end-to-end suite's, in `e2e.rs`.

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn a_code_computed_apart_from_the_server_verifies() {
    let cluster = Cluster::start().await;
    let factor = cluster
        .control
        .active_factor(cluster.manage(), "alice@example.com")
        .await;
    cluster.sync().await;

    let code = factor.fresh_code().await;
    let reply = cluster
        .data
        .verify_reply(cluster.verify_key(), "alice@example.com", &code)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(reply.json(), valid("totp", &factor.id));

    // Other parameters travel through the feed, and a user may hold several
    // factors: each code names the factor it matched.
    let manage = cluster.manage();
    let mut factors = Vec::new();
    for settings in [
        json!({ "algorithm": "SHA256", "digits": 8 }),
        json!({ "algorithm": "SHA512", "digits": 7, "period": 60 }),
        json!({}),
    ] {
        let factor = cluster
            .control
            .enroll_with(manage, "mallory", settings)
            .await;
        cluster.control.activate(manage, &factor).await;
        factors.push(factor);
    }
    cluster.sync().await;
    for factor in &factors {
        let code = factor.fresh_code().await;
        assert_eq!(code.len(), factor.digits as usize);
        assert_eq!(
            cluster
                .data
                .verify(cluster.verify_key(), "mallory", &code)
                .await,
            (StatusCode::OK, valid("totp", &factor.id)),
            "{} {} digits {} s",
            factor.algorithm,
            factor.digits,
            factor.period
        );
    }

    // User ids are the tenant's, byte for byte: spaces at the ends, any script.
    let odd = " Zoë 🙂 von Ürsel ";
    let factor = cluster.control.active_factor(cluster.manage(), odd).await;
    cluster.sync().await;
    let code = factor.fresh_code().await;
    assert_eq!(
        cluster
            .data
            .verify(cluster.verify_key(), odd.trim(), &code)
            .await,
        (StatusCode::OK, invalid()),
        "another user"
    );
    assert_eq!(
        cluster.data.verify(cluster.verify_key(), odd, &code).await,
        (StatusCode::OK, valid("totp", &factor.id))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_code_is_accepted_once_on_any_node_whatever_its_spacing() {
    let cluster = Cluster::start().await;
    let other = cluster.another_data_plane().await;
    let factor = cluster.control.active_factor(cluster.manage(), "bob").await;
    cluster.sync().await;
    other.wait_synced(&cluster.control).await;

    let code = factor.fresh_code().await;
    let key = cluster.verify_key();
    assert_eq!(
        cluster.data.verify(key, "bob", &code).await,
        (StatusCode::OK, valid("totp", &factor.id))
    );
    let spaced = format!(" {} {} ", &code[..3], &code[3..]);
    for replay in [code.as_str(), spaced.as_str(), &format!("{code}\t")] {
        assert_eq!(
            cluster.data.verify(key, "bob", replay).await,
            (StatusCode::OK, invalid()),
            "replay {replay:?} on the node that accepted it"
        );
    }

    // The other node learns of the accepted step through the control plane.
    cluster.data.wait_reported().await;
    other.wait_synced(&cluster.control).await;
    for replay in [code.as_str(), spaced.as_str()] {
        assert_eq!(
            other.verify(key, "bob", replay).await,
            (StatusCode::OK, invalid()),
            "replay {replay:?} on another node"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn backup_codes_are_single_use_however_they_are_typed() {
    let cluster = Cluster::start().await;
    let set = cluster
        .control
        .backup_codes(cluster.manage(), "carol")
        .await;
    assert_eq!(set.codes.len(), 10);
    cluster.sync().await;
    let key = cluster.verify_key();

    assert_eq!(
        cluster.data.verify(key, "carol", &set.codes[0]).await,
        (StatusCode::OK, valid("backup", &set.set_id))
    );
    assert_eq!(
        cluster.data.verify(key, "carol", &set.codes[0]).await,
        (StatusCode::OK, invalid())
    );

    // Typed in upper case with spaces instead of dashes: the same code.
    let typed = set.codes[1].to_uppercase().replace('-', " ");
    assert_ne!(typed, set.codes[1]);
    assert_eq!(
        cluster.data.verify(key, "carol", &typed).await,
        (StatusCode::OK, valid("backup", &set.set_id))
    );
    for again in [typed.as_str(), set.codes[1].as_str()] {
        assert_eq!(
            cluster.data.verify(key, "carol", again).await,
            (StatusCode::OK, invalid()),
            "{again:?} again"
        );
    }

    // The control plane counts them used.
    cluster.data.wait_reported().await;
    let factors = cluster
        .control
        .user_factors(cluster.manage(), "carol")
        .await;
    assert_eq!(
        factors["backup_codes"],
        json!({ "remaining": 8, "total": 10 }),
        "{factors}"
    );

    // A new set replaces the old one: its unused codes stop working.
    let new = cluster
        .control
        .backup_codes(cluster.manage(), "carol")
        .await;
    assert_ne!(new.set_id, set.set_id);
    cluster.sync().await;
    assert_eq!(
        cluster.data.verify(key, "carol", &set.codes[2]).await,
        (StatusCode::OK, invalid())
    );
    assert_eq!(
        cluster.data.verify(key, "carol", &new.codes[2]).await,
        (StatusCode::OK, valid("backup", &new.set_id))
    );
}

/// Fire `n` wrong attempts for `user` at once; returns (answered `valid:false`,
/// throttled) and checks every answer is one of the two.
async fn burst(data: &DataPlane, key: &str, user: &str, code: &str, n: usize) -> (usize, usize) {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let client = data.client.clone();
        let url = data.url("/v1/verify");
        let (key, body) = (key.to_owned(), json!({ "user": user, "code": code }));
        tasks.spawn(async move { send(client.post(url).bearer_auth(key).json(&body)).await });
    }
    let (mut failed, mut throttled) = (0, 0);
    while let Some(reply) = tasks.join_next().await {
        let reply = reply.expect("task");
        match reply.status {
            StatusCode::OK => {
                assert_eq!(reply.json(), invalid());
                failed += 1;
            }
            StatusCode::TOO_MANY_REQUESTS => {
                assert_error(&reply, StatusCode::TOO_MANY_REQUESTS, "throttled");
                let retry: u64 = reply
                    .header("retry-after")
                    .expect("a Retry-After header")
                    .parse()
                    .expect("Retry-After in seconds");
                assert!((1..=30).contains(&retry), "Retry-After {retry}");
                throttled += 1;
            }
            other => panic!("unexpected {other}: {}", reply.text),
        }
    }
    (failed, throttled)
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_failures_cannot_slip_past_the_throttle() {
    let cluster = Cluster::start().await;
    let factor = cluster
        .control
        .active_factor(cluster.manage(), "dave")
        .await;
    cluster.sync().await;
    let key = cluster.verify_key();

    let (failed, throttled) = burst(&cluster.data, key, "dave", &factor.wrong_code(), 20).await;
    assert_eq!(
        (failed, throttled),
        (5, 15),
        "5 free failures, then every attempt is throttled"
    );
    // Even the right code is refused while throttled.
    let refused = cluster
        .data
        .verify_reply(key, "dave", &factor.peek_code())
        .await;
    assert_error(&refused, StatusCode::TOO_MANY_REQUESTS, "throttled");

    // An unknown user is throttled the same way.
    let (failed, throttled) = burst(&cluster.data, key, "nobody", "123456", 20).await;
    assert_eq!((failed, throttled), (5, 15), "unknown user");

    // Failures on one node count on every node, once reported: the control
    // plane adds them up and publishes the backoff when the sum starts one.
    let other = cluster.another_data_plane().await;
    let erin = cluster
        .control
        .active_factor(cluster.manage(), "erin")
        .await;
    cluster.sync().await;
    for _ in 0..3 {
        assert_eq!(
            cluster.data.verify(key, "erin", &erin.wrong_code()).await,
            (StatusCode::OK, invalid())
        );
    }
    cluster.data.wait_reported().await;
    for _ in 0..2 {
        assert_eq!(
            other.verify(key, "erin", &erin.wrong_code()).await,
            (StatusCode::OK, invalid())
        );
    }
    other.wait_reported().await;
    other.wait_synced(&cluster.control).await;
    cluster.data.wait_synced(&cluster.control).await;
    // Each node saw fewer than the 5 free failures, and both now refuse.
    for node in [&cluster.data, &other] {
        let reply = node.verify_reply(key, "erin", &erin.wrong_code()).await;
        assert_error(&reply, StatusCode::TOO_MANY_REQUESTS, "throttled");
    }

    // The failures reach the control plane; unlocking there lifts the throttle.
    cluster.data.wait_reported().await;
    let factors = cluster.control.user_factors(cluster.manage(), "dave").await;
    assert_eq!(factors["failures"], 5, "{factors}");
    cluster.control.unlock(cluster.manage(), "dave").await;
    cluster.sync().await;
    assert_eq!(
        cluster
            .data
            .verify(key, "dave", &factor.fresh_code().await)
            .await,
        (StatusCode::OK, valid("totp", &factor.id))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_key_stops_verifying_once_the_change_arrives() {
    let cluster = Cluster::start().await;
    let factor = cluster
        .control
        .active_factor(cluster.manage(), "erin")
        .await;
    cluster.sync().await;
    let key = &cluster.tenant.verify;
    assert_eq!(
        cluster
            .data
            .verify(&key.secret, "erin", &factor.wrong_code())
            .await,
        (StatusCode::OK, invalid())
    );

    cluster
        .control
        .revoke_key(&cluster.tenant.id, &key.id)
        .await;
    cluster.sync().await;
    let reply = cluster
        .data
        .verify_reply(&key.secret, "erin", &factor.peek_code())
        .await;
    assert_error(&reply, StatusCode::UNAUTHORIZED, "unauthorized");

    // A manage key never verifies, and another verify key still does.
    let reply = cluster
        .data
        .verify_reply(cluster.manage(), "erin", &factor.peek_code())
        .await;
    assert_error(&reply, StatusCode::UNAUTHORIZED, "unauthorized");
    let fresh = cluster
        .control
        .create_key(&cluster.tenant.id, &["verify"])
        .await;
    cluster.sync().await;
    assert_eq!(
        cluster
            .data
            .verify(&fresh.secret, "erin", &factor.fresh_code().await)
            .await,
        (StatusCode::OK, valid("totp", &factor.id))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_users_and_wrong_codes_get_the_same_answer() {
    let cluster = Cluster::start().await;
    let manage = cluster.manage();
    let known = cluster.control.active_factor(manage, "frank").await;
    // Only a pending factor: never published to data planes.
    let pending = cluster.control.enroll(manage, "grace").await;
    // A factor enrolled, activated and deleted again.
    let deleted = cluster.control.active_factor(manage, "heidi").await;
    cluster
        .control
        .delete_factor(manage, "heidi", &deleted.id)
        .await;
    // A user deleted with everything they had.
    let gone = cluster.control.active_factor(manage, "judy").await;
    let gone_codes = cluster.control.backup_codes(manage, "judy").await;
    cluster.control.delete_user(manage, "judy").await;
    cluster.sync().await;

    let key = cluster.verify_key();
    let wrong = known.wrong_code();
    let answers = [
        (
            "a wrong code",
            cluster.data.verify_reply(key, "frank", &wrong).await,
        ),
        (
            "an unknown user",
            cluster.data.verify_reply(key, "ivan", &wrong).await,
        ),
        (
            "a user with only a pending factor (its right code)",
            cluster
                .data
                .verify_reply(key, "grace", &pending.fresh_code().await)
                .await,
        ),
        (
            "a user whose factor was deleted (its right code)",
            cluster
                .data
                .verify_reply(key, "heidi", &deleted.fresh_code().await)
                .await,
        ),
        (
            "a deleted user (their right code)",
            cluster
                .data
                .verify_reply(key, "judy", &gone.fresh_code().await)
                .await,
        ),
        (
            "a deleted user (their backup code)",
            cluster
                .data
                .verify_reply(key, "judy", &gone_codes.codes[0])
                .await,
        ),
        (
            "a malformed code",
            cluster.data.verify_reply(key, "frank", "12ab").await,
        ),
    ];
    for (what, reply) in &answers {
        assert_eq!(reply.status, StatusCode::OK, "{what}: {}", reply.text);
        assert_eq!(reply.text, answers[0].1.text, "{what}");
        assert_eq!(reply.json(), invalid(), "{what}");
        assert_eq!(
            reply.header("content-type"),
            answers[0].1.header("content-type"),
            "{what}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replaced_control_plane_database_is_followed() {
    // The operator token may replicate too, and survives a new database.
    let mut control = ControlPlane::start().await;
    let old = control.tenant("old").await;
    let factor = control.active_factor(&old.manage.secret, "oscar").await;
    for i in 0..10 {
        control
            .backup_codes(&old.manage.secret, &format!("filler-{i}"))
            .await;
    }
    let data = control.data_plane(OPERATOR).await;
    let old_head = data.wait_synced(&control).await;
    assert_eq!(
        data.verify(&old.verify.secret, "oscar", &factor.fresh_code().await)
            .await,
        (StatusCode::OK, valid("totp", &factor.id))
    );

    // The control plane comes back on an empty database (same keys and port):
    // another change log, shorter than the old one, which the node must follow
    // rather than resume or merge with.
    control.kill();
    for file in ["control.db", "control.db-wal", "control.db-shm"] {
        let path = control.dir().join(file);
        if path.exists() {
            std::fs::remove_file(&path).expect("remove the database");
        }
    }
    control.restart().await;
    let new = control.tenant("new").await;
    let fresh = control.active_factor(&new.manage.secret, "oscar").await;
    assert!(control.head().await < old_head);
    assert_same_state(&data, &control, OPERATOR).await;

    let reply = data
        .verify_reply(&old.verify.secret, "oscar", &factor.peek_code())
        .await;
    assert_error(&reply, StatusCode::UNAUTHORIZED, "unauthorized");
    assert_eq!(
        data.verify(&new.verify.secret, "oscar", &fresh.fresh_code().await)
            .await,
        (StatusCode::OK, valid("totp", &fresh.id))
    );
    // Caught up with the new log: no lag left over from the old one.
    wait_for("the node to report no lag", WAIT, || async {
        let lag = data.metric("twofold_data_lag_changes").await?;
        (lag == 0.0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn strict_backup_codes_wait_for_the_control_plane() {
    let mut control = ControlPlane::start().await;
    let tenant = control.tenant("strict").await;
    let node_key = control.create_node_key().await;
    let manage = tenant.manage.secret.clone();
    let key = tenant.verify.secret.clone();
    let strict = {
        let mut options = DataOptions::new(&control, &node_key.secret);
        options.extra_args = vec!["--strict-backup-codes".to_owned(), "true".to_owned()];
        options
    };
    let a = DataPlane::start(strict.clone()).await;
    let b = DataPlane::start(strict).await;
    let set = control.backup_codes(&manage, "pat").await;
    let factor = control.active_factor(&manage, "quinn").await;
    a.wait_synced(&control).await;
    b.wait_synced(&control).await;

    // Used on one node: refused on another at once, whether or not the change
    // has reached it, and counted as a failure like any wrong code.
    assert_eq!(
        a.verify(&key, "pat", &set.codes[0]).await,
        (StatusCode::OK, valid("backup", &set.set_id))
    );
    assert_eq!(
        b.verify(&key, "pat", &set.codes[0]).await,
        (StatusCode::OK, invalid())
    );
    b.wait_reported().await;
    a.wait_synced(&control).await;

    // Two more failures, then the control plane goes away.
    for _ in 0..2 {
        assert_eq!(
            a.verify(&key, "pat", "0000-0000-0000").await,
            (StatusCode::OK, invalid())
        );
    }
    control.kill();
    let reply = a.verify_reply(&key, "pat", &set.codes[1]).await;
    assert_error(
        &reply,
        StatusCode::SERVICE_UNAVAILABLE,
        "control_plane_unavailable",
    );
    // TOTP does not need the control plane.
    assert_eq!(
        a.verify(&key, "quinn", &factor.fresh_code().await).await,
        (StatusCode::OK, valid("totp", &factor.id))
    );
    // The unconfirmed code counted neither as a success nor as a failure: after
    // its own two failures, this node allows three more, not five (a success)
    // nor two (a failure). The failure on the other node started no backoff,
    // so it was counted on the control plane but not published here.
    let (failed, throttled) = burst(&a, &key, "pat", "0000-0000-0000", 20).await;
    assert_eq!((failed, throttled), (3, 17));

    // Back again: once unlocked, the code given back is good.
    control.restart().await;
    a.wait_reported().await;
    control.unlock(&manage, "pat").await;
    a.wait_synced(&control).await;
    assert_eq!(
        a.verify(&key, "pat", &set.codes[1]).await,
        (StatusCode::OK, valid("backup", &set.set_id))
    );
    assert_eq!(
        a.verify(&key, "pat", &set.codes[1]).await,
        (StatusCode::OK, invalid())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_json_errors() {
    let cluster = Cluster::start().await;
    let data = &cluster.data;
    let key = cluster.verify_key();
    let json_type = Some("application/json");
    let good = br#"{"user":"alice","code":"123456"}"#.to_vec();

    let cases: Vec<(&str, Reply, StatusCode, &str)> = vec![
        (
            "no credentials",
            data.post_verify(None, json_type, good.clone()).await,
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            "an unknown key",
            data.post_verify(Some("tfk_not-a-key"), json_type, good.clone())
                .await,
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            "the operator token",
            data.post_verify(Some(OPERATOR), json_type, good.clone())
                .await,
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            "a text body",
            data.post_verify(Some(key), Some("text/plain"), good.clone())
                .await,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            "no content type",
            data.post_verify(Some(key), None, good.clone()).await,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            "invalid JSON",
            data.post_verify(Some(key), json_type, b"{\"user\":".to_vec())
                .await,
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "an empty body",
            data.post_verify(Some(key), json_type, Vec::new()).await,
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "an unknown field",
            data.post_verify(
                Some(key),
                json_type,
                br#"{"user":"alice","code":"123456","remember":true}"#.to_vec(),
            )
            .await,
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "a missing field",
            data.post_verify(Some(key), json_type, br#"{"user":"alice"}"#.to_vec())
                .await,
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "a number for a code",
            data.post_verify(
                Some(key),
                json_type,
                br#"{"user":"alice","code":123456}"#.to_vec(),
            )
            .await,
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "a user too long",
            data.verify_reply(key, &"u".repeat(257), "123456").await,
            StatusCode::BAD_REQUEST,
            "invalid_user",
        ),
        (
            "an empty user",
            data.verify_reply(key, "", "123456").await,
            StatusCode::BAD_REQUEST,
            "invalid_user",
        ),
        (
            "a user with a control character",
            data.verify_reply(key, "ali\nce", "123456").await,
            StatusCode::BAD_REQUEST,
            "invalid_user",
        ),
        (
            "a user with a NUL",
            data.verify_reply(key, "ali\u{0}ce", "123456").await,
            StatusCode::BAD_REQUEST,
            "invalid_user",
        ),
        (
            "a code too long",
            data.verify_reply(key, "alice", &"1".repeat(65)).await,
            StatusCode::BAD_REQUEST,
            "invalid_code",
        ),
        (
            "a body too large",
            data.verify_reply(key, "alice", &"1".repeat(20 * 1024))
                .await,
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_body",
        ),
        (
            "an unknown route",
            data.get("/v1/nothing-here").await,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "GET on verify",
            data.get("/v1/verify").await,
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
    ];
    for (what, reply, status, code) in &cases {
        assert_eq!(reply.status, *status, "{what}: {}", reply.text);
        assert_error(reply, *status, code);
    }
    // A user of exactly the longest length is fine.
    assert_eq!(
        data.verify(key, &"u".repeat(256), "123456").await,
        (StatusCode::OK, invalid())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn any_configured_control_plane_will_do() {
    let control = ControlPlane::start().await;
    let tenant = control.tenant("acme").await;
    let node_key = control.create_node_key().await;
    let mut options = DataOptions::new(&control, &node_key.secret);
    // The first one listed is down.
    options.control_urls = vec![
        format!("http://127.0.0.1:{}", free_port()),
        control.base().to_owned(),
    ];
    let data = DataPlane::start(options).await;
    data.wait_ready().await;
    let set = control.backup_codes(&tenant.manage.secret, "kim").await;
    data.wait_synced(&control).await;
    assert_eq!(
        data.verify(&tenant.verify.secret, "kim", &set.codes[0])
            .await,
        (StatusCode::OK, valid("backup", &set.set_id))
    );
    data.wait_reported().await;
    let summary = control.user_factors(&tenant.manage.secret, "kim").await;
    assert_eq!(summary["backup_codes"]["remaining"], 9, "{summary}");
}

#[tokio::test(flavor = "multi_thread")]
async fn not_ready_before_the_first_sync_but_alive() {
    // A control-plane address where nothing listens.
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let data = DataPlane::start(DataOptions {
        control_urls: vec![nowhere],
        node_token: "tfk_no-such-node-key".to_owned(),
        master_key: new_master_key(),
        port: Port::Any,
        extra_args: Vec::new(),
    })
    .await;
    assert_eq!(
        data.get("/healthz").await.pair(),
        (StatusCode::OK, json!({"status": "ok"}))
    );
    let reply = data.get("/readyz").await;
    assert_error(&reply, StatusCode::SERVICE_UNAVAILABLE, "not_ready");
    let metrics = data.metrics().await.expect("metrics");
    assert!(metrics.contains("twofold_data_applied_seq 0"), "{metrics}");
    assert!(metrics.contains("twofold_data_bootstraps 0"), "{metrics}");
    // Verification refuses every key: there are none yet.
    let reply = data.verify_reply("tfk_anything", "alice", "123456").await;
    assert_error(&reply, StatusCode::UNAUTHORIZED, "unauthorized");
}
