//! Arbitrary bytes as the body of the data plane's `POST /v1/verify`, sent
//! through the real router (`api::app` over a real node with its outbox) with a
//! verify key of a tenant whose user `alice` has a TOTP factor and backup codes.
//! The answer must never be a 5xx, and every 4xx must be in the API's error
//! shape.
//!
//! Input: the first byte picks the credential and content type sent; the rest is
//! the body. In the body, `TOTPCODE` is replaced by alice's current TOTP code and
//! `BACKUPCODE` by one of her backup codes, so the fuzzer reaches the accepting
//! paths too. Every 64 inputs the fixture plays the control plane: it
//! acknowledges the node's events and resets alice's throttle, so a locked user
//! does not end the exploration.
#![no_main]

#[path = "answer.rs"]
mod answer;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, header};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt as _;
use twofold_core::backup::BackupCodes;
use twofold_core::feed::{
    ApiKeyRecord, BackupCodeEntry, BackupCodesRecord, Entity, TotpRecord, UsageAck,
    UserStateRecord,
};
use twofold_core::ids::API_KEY_HASH_DOMAIN;
use twofold_core::otp::{self, Algorithm, TotpParams};
use twofold_core::seal::{Binding, Keyring, MasterKey};
use twofold_core::secret::Secret;
use twofold_data::config::Config;
use twofold_data::index::{Index, prepare_put};
use twofold_data::node::Node;
use twofold_data::outbox::Outbox;

const TENANT: &str = "tn_fuzz";
const USER: &str = "alice";
const FACTOR: &str = "fa_fuzz";
const VERIFY_KEY: &str = "tfk_fuzz-verify-key-0123456789abcdefghijklmnopq";

struct Fixture {
    rt: tokio::runtime::Runtime,
    node: Arc<Node>,
    app: Router,
    secret: Secret,
    backup: Vec<String>,
    /// Alice's backup codes, all unused, to give back what the fuzzer used up.
    fresh_backup: Entity,
    runs: AtomicU64,
    seq: AtomicU64,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn alice_state() -> Entity {
    Entity::UserState(UserStateRecord {
        tenant: TENANT.into(),
        user: USER.into(),
        failures: 0,
        locked: false,
        throttled_until: None,
    })
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("twofold-fuzz-data-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a fixture directory");
        let keyring = Keyring::new(MasterKey::generate().expect("a master key"));
        let secret = Secret::generate(Algorithm::Sha1).expect("a secret");
        let binding = Binding {
            tenant: TENANT,
            user: USER,
            factor: FACTOR,
        };
        let sealed = keyring.seal_secret(&secret, &binding).expect("sealed");
        let codes = BackupCodes::generate().expect("backup codes");
        let hash_key = keyring.hash_key();
        let entities = [
            Entity::ApiKey(ApiKeyRecord {
                id: "ak_fuzz".into(),
                tenant: TENANT.into(),
                hash: hash_key
                    .hash(API_KEY_HASH_DOMAIN, VERIFY_KEY.as_bytes())
                    .to_vec(),
                scopes: vec!["verify".into()],
            }),
            Entity::Totp(TotpRecord {
                id: FACTOR.into(),
                tenant: TENANT.into(),
                user: USER.into(),
                algorithm: "SHA1".into(),
                digits: 6,
                period: 30,
                sealed: sealed.into_bytes(),
                last_step: None,
            }),
            Entity::BackupCodes(BackupCodesRecord {
                tenant: TENANT.into(),
                user: USER.into(),
                set_id: "fa_set".into(),
                codes: codes
                    .hashes(hash_key)
                    .into_iter()
                    .map(|hash| BackupCodeEntry {
                        hash: hash.to_vec(),
                        used: false,
                    })
                    .collect(),
            }),
        ];
        let fresh_backup = entities[2].clone();
        let index = Index::default();
        index.apply(
            entities
                .iter()
                .map(|e| prepare_put(e).expect("a valid record"))
                .collect(),
        );
        let backup = codes
            .as_slice()
            .iter()
            .map(|c| c.expose().to_owned())
            .collect();
        let config = Config::new(
            dir.clone(),
            vec!["http://127.0.0.1:9".into()],
            "tfk_unused-node-token".into(),
            keyring,
        );
        let opened = Outbox::open(&dir).expect("an outbox");
        let node = Node::new(
            config,
            index,
            0,
            opened,
            tokio_util::sync::CancellationToken::new(),
        )
        .expect("a node");
        let app = twofold_data::api::app(node.clone());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        Fixture {
            rt,
            node,
            app,
            secret,
            backup,
            fresh_backup,
            runs: AtomicU64::new(0),
            seq: AtomicU64::new(0),
        }
    })
}

fn replace(body: &[u8], mark: &[u8], with: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len());
    let mut rest = body;
    while let Some(at) = rest.windows(mark.len()).position(|w| w == mark) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(with.as_bytes());
        rest = &rest[at + mark.len()..];
    }
    out.extend_from_slice(rest);
    out
}

/// What the control plane would do in time: acknowledge every event the node
/// has recorded, apply the merged change, and (as an unlock and a new set of
/// backup codes) reset alice.
fn play_control_plane(fx: &Fixture) {
    let seq = fx.seq.fetch_add(1, Ordering::SeqCst) + 1;
    let through = fx.node.reportable_below().saturating_sub(1);
    let ack = UsageAck {
        through,
        seq,
        counted_from: Some(seq),
        retried: None,
    };
    let events = fx
        .rt
        .block_on(fx.node.outbox.unsent(usize::MAX, through.saturating_add(1)))
        .expect("the outbox answers");
    fx.node.record_ack(&ack, &events);
    fx.node.index().apply(vec![
        prepare_put(&alice_state())
            .expect("a valid record")
            .at(seq),
        prepare_put(&fx.fresh_backup).expect("a valid record"),
    ]);
    fx.node.set_applied(seq);
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let fx = fixture();
    if fx.runs.fetch_add(1, Ordering::Relaxed) % 64 == 63 {
        play_control_plane(fx);
    }
    let token = match selector & 0b11 {
        0 | 1 => Some(VERIFY_KEY),
        2 => Some("tfk_not-a-key"),
        _ => None,
    };
    let content_type = match (selector >> 2) & 0b11 {
        0 | 1 => Some("application/json"),
        2 => Some("application/json; charset=utf-8"),
        _ => None,
    };
    let code = otp::totp(&fx.secret, now(), TotpParams::default());
    let backup = &fx.backup[usize::from(selector >> 4) % fx.backup.len()];
    let body = replace(&replace(body, b"TOTPCODE", &code), b"BACKUPCODE", backup);
    let mut request = Request::builder().method(Method::POST).uri("/v1/verify");
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    if let Some(content_type) = content_type {
        request = request.header(header::CONTENT_TYPE, content_type);
    }
    let request = request.body(Body::from(body)).expect("a valid request");
    let (status, answered_type, bytes) = fx.rt.block_on(async {
        let response = fx.app.clone().oneshot(request).await.expect("infallible");
        let status = response.status();
        let answered_type = answer::content_type(response.headers()).map(str::to_owned);
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("a body");
        (status, answered_type, bytes)
    });
    answer::check("/v1/verify", status, answered_type.as_deref(), &bytes);
});
