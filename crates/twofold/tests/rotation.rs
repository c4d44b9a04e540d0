//! Master-key rotation with real processes: `twofold keys rotate` on a key
//! file, verification that never stops while the control plane restarts with a
//! new key and re-seals every secret through the feed, and a control plane that
//! refuses to start without a key its stored secrets need.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use hmac::{Hmac, KeyInit, Mac};
use reqwest::StatusCode;
use serde_json::Value;

/// The id of a base64 master key, computed here apart from `twofold_core`: the
/// first four bytes of HMAC-SHA256(key, "twofold/key-id/v1"), in hex.
fn key_id(key: &str) -> String {
    let bytes = data_encoding::BASE64
        .decode(key.trim().as_bytes())
        .expect("base64 key");
    let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&bytes).expect("hmac key");
    mac.update(b"twofold/key-id/v1");
    let tag = mac.finalize().into_bytes();
    data_encoding::HEXLOWER.encode(&tag[..4])
}

/// Secrets `id` seals according to `GET /v1/keys` (0 for a key not listed).
fn seals(keys: &Value, id: &str) -> u64 {
    keys["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .find(|k| k["id"] == id)
        .map_or(0, |k| k["secrets"].as_u64().expect("secrets"))
}

async fn keys(control: &Api) -> Value {
    let (status, body) = control.get("/v1/keys", OPERATOR).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

/// The `twofold` binary with an environment cleared of `TWOFOLD_*`.
fn twofold() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_twofold"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("TWOFOLD_") {
            command.env_remove(&key);
        }
    }
    command
}

#[test]
fn keys_rotate_appends_a_new_active_key_to_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("master.key");
    let first = new_master_key();
    std::fs::write(&path, format!("{first}\n")).expect("write key file");

    let out = twofold()
        .args(["keys", "rotate", "--master-key-file"])
        .arg(&path)
        .output()
        .expect("run twofold keys rotate");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");

    let text = std::fs::read_to_string(&path).expect("read key file");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(lines[0], first, "the primary key stays first, unchanged");
    let new = lines[1];
    assert_eq!(
        data_encoding::BASE64
            .decode(new.as_bytes())
            .expect("base64")
            .len(),
        32
    );
    assert!(
        stdout.contains(&format!("key id: {}", key_id(new))),
        "prints the new key id: {stdout}"
    );
    assert!(
        !stdout.contains(new) && !stderr.contains(new),
        "never the key"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path)
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(left.len(), 1, "no temporary file left behind: {left:?}");

    // A file that does not exist is not created by a rotation.
    let missing = dir.path().join("missing.key");
    let out = twofold()
        .args(["keys", "rotate", "--master-key-file"])
        .arg(&missing)
        .output()
        .expect("run twofold keys rotate");
    assert!(!out.status.success());
    assert!(!missing.exists());
}

/// Verifies continuously on a data plane until stopped: each user's TOTP code
/// once per step (replay protection allows no more), and backup codes one by
/// one. Every answer must be `valid`.
struct Verifier {
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    totp_accepted: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    /// Ends with the last step used per factor.
    task: tokio::task::JoinHandle<Vec<Option<u64>>>,
}

impl Verifier {
    fn start(
        base: String,
        verify_key: String,
        factors: Vec<Arc<Totp>>,
        backup: Vec<(String, Vec<String>)>,
    ) -> Verifier {
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let totp_accepted = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let (s, a, t, f) = (
            stop.clone(),
            accepted.clone(),
            totp_accepted.clone(),
            failures.clone(),
        );
        let task = tokio::spawn(async move {
            let client = client();
            // Activation used a code already.
            let mut used: Vec<Option<u64>> = factors.iter().map(|f| f.last_used_step()).collect();
            let mut codes: Vec<(String, String)> = backup
                .into_iter()
                .flat_map(|(user, codes)| codes.into_iter().map(move |c| (user.clone(), c)))
                .collect();
            codes.reverse();
            let mut round = 0u64;
            while !s.load(Ordering::SeqCst) {
                round += 1;
                let mut attempts = Vec::new();
                for (i, factor) in factors.iter().enumerate() {
                    let step = factor.now_step();
                    if used[i].is_some_and(|u| u >= step) {
                        continue;
                    }
                    used[i] = Some(step);
                    attempts.push((factor.user.clone(), factor.code_at_step(step), "totp"));
                }
                // Spread the backup codes over the run.
                if round.is_multiple_of(4)
                    && let Some((user, code)) = codes.pop()
                {
                    attempts.push((user, code, "backup"));
                }
                for (user, code, kind) in attempts {
                    let reply = send(
                        client
                            .post(format!("{base}/v1/verify"))
                            .bearer_auth(&verify_key)
                            .json(&serde_json::json!({ "user": user, "code": code })),
                    )
                    .await;
                    let body = reply.json();
                    if reply.status == StatusCode::OK && body["valid"] == true {
                        a.fetch_add(1, Ordering::SeqCst);
                        if kind == "totp" {
                            t.fetch_add(1, Ordering::SeqCst);
                        }
                    } else {
                        f.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(format!("{kind} for {user}: {} {body}", reply.status));
                    }
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            used
        });
        Verifier {
            stop,
            accepted,
            totp_accepted,
            failures,
            task,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Wait until `more` further verifications passed.
    async fn wait_more(&self, more: usize) {
        let target = self.accepted() + more;
        wait_for(
            &format!("{more} more accepted verifications"),
            WAIT + Duration::from_secs(30),
            || async { (self.accepted() >= target).then_some(()) },
        )
        .await;
    }

    /// Wait until every factor has verified once more (the next TOTP step,
    /// within a period).
    async fn wait_totp_round(&self, factors: usize) {
        let target = self.totp_accepted.load(Ordering::SeqCst) + factors;
        wait_for(
            "every factor to verify in a later step",
            WAIT + Duration::from_secs(30),
            || async { (self.totp_accepted.load(Ordering::SeqCst) >= target).then_some(()) },
        )
        .await;
    }

    /// Stop; returns the failures and the last step used per factor.
    async fn stop(self) -> (Vec<String>, Vec<Option<u64>>) {
        self.stop.store(true, Ordering::SeqCst);
        let failures = self.failures.clone();
        let used = self.task.await.expect("verifier task");
        let failures = failures.lock().unwrap_or_else(|p| p.into_inner()).clone();
        (failures, used)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_never_stops_while_the_control_plane_rotates_its_key() {
    let (k1, k2) = (new_master_key(), new_master_key());
    let (id1, id2) = (key_id(&k1), key_id(&k2));
    let mut control = ControlPlane::start_with(k1.clone(), Vec::new()).await;
    let tenant = control.tenant("acme").await;
    let manage = tenant.manage.secret.clone();
    let node = control.create_node_key().await;
    // Data planes get the new key first: they only open with it.
    let data = DataPlane::start(DataOptions {
        master_key: format!("{k1},{k2}"),
        ..DataOptions::new(&control, &node.secret)
    })
    .await;
    data.wait_ready().await;

    let users: Vec<String> = (0..8).map(|i| format!("user-{i}")).collect();
    let factors: Vec<Arc<Totp>> = active_factors_for(&control.api, &manage, users.clone(), 4)
        .await
        .into_iter()
        .map(Arc::new)
        .collect();
    let sets = backup_codes_for(&control.api, &manage, users.clone(), 4).await;
    // A pending factor is re-sealed too, though the feed never carries it.
    let _pending = control.enroll(&manage, "user-pending").await;
    data.wait_synced(&control.api).await;

    let before = keys(&control.api).await;
    assert_eq!(before["active"], id1.as_str(), "{before}");
    assert_eq!(before["primary"], id1.as_str(), "{before}");
    assert_eq!(seals(&before, &id1), 9, "{before}");
    assert_eq!(before["resealed"], true, "{before}");

    let verifier = Verifier::start(
        data.base(),
        tenant.verify.secret.clone(),
        factors.to_vec(),
        users
            .iter()
            .cloned()
            .zip(sets.into_iter().map(|s| s.codes))
            .collect(),
    );
    verifier.wait_more(10).await;

    // The control plane restarts with K1,K2: K2 becomes active and every secret
    // is re-sealed under it, through the feed, while the data plane verifies.
    control
        .process
        .set_env("TWOFOLD_MASTER_KEY", &format!("{k1},{k2}"));
    control
        .process
        .set_env("TWOFOLD_LOG", "warn,twofold_control::reseal=info");
    control.restart().await;
    let after = wait_for("every secret to be re-sealed under K2", WAIT, || async {
        let keys = keys(&control.api).await;
        (seals(&keys, &id1) == 0).then_some(keys)
    })
    .await;
    assert_eq!(after["active"], id2.as_str(), "{after}");
    assert_eq!(after["primary"], id1.as_str(), "the primary stays: {after}");
    assert_eq!(seals(&after, &id2), 9, "{after}");
    assert_eq!(after["resealed"], true, "{after}");
    assert_eq!(
        after["removable"],
        serde_json::json!([]),
        "K1 is the primary and stays: {after}"
    );
    wait_for("the completion line in the log", WAIT, || async {
        control
            .process
            .logs()
            .contains("re-sealing complete")
            .then_some(())
    })
    .await;

    // The re-sealed records reach the data plane, which keeps verifying: every
    // factor once more, now opened with K2.
    data.wait_synced(&control.api).await;
    verifier.wait_totp_round(factors.len()).await;
    let (failures, used) = verifier.stop().await;
    assert!(failures.is_empty(), "failed verifications: {failures:#?}");

    // The re-seal Puts carried the control plane's last steps, which may be
    // behind the data plane's: a code already accepted is still refused.
    let replay = factors[0].code_at_step(used[0].expect("user-0 verified"));
    let (status, body) = data
        .verify(&tenant.verify.secret, &factors[0].user, &replay)
        .await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, invalid()),
        "a replayed code"
    );

    // One audit record per batch, by the operator.
    let (status, audit) = control.get("/v1/audit?limit=1000", OPERATOR).await;
    assert_eq!(status, StatusCode::OK);
    let reseals: Vec<&Value> = audit["records"]
        .as_array()
        .expect("records")
        .iter()
        .filter(|r| r["action"] == "keys.reseal")
        .collect();
    assert_eq!(reseals.len(), 1, "{audit}");
    assert_eq!(reseals[0]["actor"], "operator");

    data.wait_reported().await;
    assert_same_state(&data, &control, &node.secret).await;

    // A factor enrolled after the rotation is sealed under K2 and verifies.
    let late = control.active_factor(&manage, "late").await;
    data.wait_synced(&control.api).await;
    let (status, body) = data
        .verify(&tenant.verify.secret, "late", &late.fresh_code().await)
        .await;
    assert_eq!((status, body), (StatusCode::OK, valid("totp", &late.id)));
    assert_eq!(seals(&keys(&control.api).await, &id2), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_missing_a_key_its_secrets_need_refuses_to_start() {
    let (k1, k2) = (new_master_key(), new_master_key());
    let mut control = ControlPlane::start_with(k1.clone(), Vec::new()).await;
    let tenant = control.tenant("acme").await;
    let factor = control.active_factor(&tenant.manage.secret, "alice").await;
    control
        .process
        .set_env("TWOFOLD_MASTER_KEY", &format!("{k1},{k2}"));
    control.restart().await;
    wait_for("the secret to be re-sealed under K2", WAIT, || async {
        (seals(&keys(&control.api).await, &key_id(&k2)) == 1).then_some(())
    })
    .await;
    let digest = control.feed_digest(OPERATOR).await;
    control.terminate().await;

    // Started with K1 only (K2 removed by mistake): it must say which key is
    // missing and exit, without writing anything.
    let out = twofold()
        .arg("control")
        .args(control.process.args())
        .args(["--listen", "127.0.0.1:0"])
        .env("TWOFOLD_MASTER_KEY", &k1)
        .env("TWOFOLD_OPERATOR_TOKEN", OPERATOR)
        .output()
        .expect("run twofold control");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("sealed under master key {}", key_id(&k2))),
        "{stderr}"
    );
    assert!(!stderr.contains(&k1) && !stderr.contains(&k2), "{stderr}");

    // With the right keys everything is as it was, and the factor still works
    // (the control plane opens it to activate; here it re-enrols a second one).
    control.process.ensure_started().await;
    assert_eq!(control.feed_digest(OPERATOR).await, digest);
    let listed = control.user_factors(&tenant.manage.secret, "alice").await;
    assert!(listed.to_string().contains(&factor.id), "{listed}");
}
