//! Arbitrary bytes as the body of every POST route of the control plane, sent
//! through the real router (`api::app` over a real store) with a credential that
//! may make the call. The answer must never be a 5xx, and every 4xx must be in
//! the API's error shape.
//!
//! Input: the first byte picks the route (and the content type sent); the rest is
//! the body. `TENANT` in a body is replaced by the fixture tenant's id, so usage
//! reports can name a real tenant (the ids are random per run).
//!
//! The route table is checked at start against the POST operations of the
//! OpenAPI document, which is built from the same list as the router: a new POST
//! route makes this target fail until it is added here.
#![no_main]

#[path = "answer.rs"]
mod answer;

use std::collections::BTreeSet;
use std::sync::{Mutex, OnceLock};

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};
use tower::ServiceExt;
use twofold_control::api;
use twofold_control::config::Config;
use twofold_control::state::{AppState, Clock};
use twofold_control::store::Store;
use twofold_core::seal::{Keyring, MasterKey};

const OPERATOR: &str = "tfo_fuzz-operator-token-0123456789abcdefghijklmno";
/// The user whose enrolments, backup codes and unlocks the fuzzer drives.
const USER: &str = "fuzz-user";
/// The user holding the pending factor the activation route is fuzzed on.
const ACTIVATE_USER: &str = "fuzz-activate";

#[derive(Clone, Copy)]
enum Who {
    Operator,
    Manage,
    Node,
}

/// Every POST route of the control plane, as the OpenAPI document names it, and
/// the credential that may call it.
const ROUTES: [(&str, Who); 9] = [
    ("/v1/tenants", Who::Operator),
    ("/v1/tenants/{tenant}/keys", Who::Operator),
    ("/v1/node-keys", Who::Operator),
    ("/v1/users/{user}/totp", Who::Manage),
    ("/v1/users/{user}/totp/{factor}/activate", Who::Manage),
    ("/v1/users/{user}/backup-codes", Who::Manage),
    ("/v1/users/{user}/unlock", Who::Manage),
    ("/v1/feed/usage", Who::Node),
    ("/v1/feed/backup-code-use", Who::Node),
];

struct Fixture {
    rt: tokio::runtime::Runtime,
    app: Router,
    tenant: String,
    manage: String,
    node: String,
    /// The pending factor of [`ACTIVATE_USER`]; renewed when wrong codes drop it.
    pending: Mutex<String>,
}

/// Send one request through the router: status, content type and body.
async fn call(
    app: &Router,
    path: &str,
    token: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (StatusCode, Option<String>, Vec<u8>) {
    let mut request = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(header::AUTHORIZATION, format!("Bearer {token}"));
    if let Some(content_type) = content_type {
        request = request.header(header::CONTENT_TYPE, content_type);
    }
    let request = request.body(Body::from(body)).expect("a valid request");
    let response = app.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let content_type = answer::content_type(response.headers()).map(str::to_owned);
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("a body");
    (status, content_type, bytes.to_vec())
}

/// A set-up call that must succeed; returns the JSON answer.
async fn setup(app: &Router, path: &str, token: &str, body: Value) -> Value {
    let (status, _, bytes) = call(
        app,
        path,
        token,
        Some("application/json"),
        body.to_string().into_bytes(),
    )
    .await;
    assert!(
        status.is_success(),
        "set-up {path}: {status} {}",
        String::from_utf8_lossy(&bytes)
    );
    serde_json::from_slice(&bytes).unwrap_or(Value::Null)
}

async fn enrol_pending(app: &Router, manage: &str) -> String {
    let body = setup(
        app,
        &format!("/v1/users/{ACTIVATE_USER}/totp"),
        manage,
        json!({"qr": "none"}),
    )
    .await;
    body["factor_id"].as_str().expect("a factor id").to_owned()
}

/// The POST operations of the OpenAPI document.
fn documented_posts() -> BTreeSet<String> {
    let doc = serde_json::to_value(api::openapi::document()).expect("the document serialises");
    doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .filter(|(_, item)| item.get("post").is_some())
        .map(|(path, _)| path.clone())
        .collect()
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let covered: BTreeSet<String> = ROUTES.iter().map(|(p, _)| (*p).to_owned()).collect();
        assert_eq!(
            covered,
            documented_posts(),
            "the route table must hold exactly the documented POST routes"
        );
        let dir = std::env::temp_dir().join(format!("twofold-fuzz-control-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a fixture directory");
        let store = Store::open(&dir.join("control.db")).expect("a store");
        let mut config = Config::new(Keyring::new(MasterKey::generate().expect("a master key")));
        config.operator_token = Some(OPERATOR.to_owned());
        let state = AppState::new(
            store,
            config,
            Clock::system(),
            tokio_util::sync::CancellationToken::new(),
        );
        twofold_control::server::ensure_operator_token(&state).expect("the operator token");
        let app = api::app(state);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let (tenant, manage, node, pending) = rt.block_on(async {
            let tenant = setup(&app, "/v1/tenants", OPERATOR, json!({"name": "fuzz"})).await;
            let tenant = tenant["id"].as_str().expect("a tenant id").to_owned();
            let manage = setup(
                &app,
                &format!("/v1/tenants/{tenant}/keys"),
                OPERATOR,
                json!({"scopes": ["manage"]}),
            )
            .await;
            let manage = manage["secret"].as_str().expect("a key").to_owned();
            let node = setup(&app, "/v1/node-keys", OPERATOR, json!({})).await;
            let node = node["secret"].as_str().expect("a key").to_owned();
            // Backup codes make the user exist, so usage events about it merge.
            setup(
                &app,
                &format!("/v1/users/{USER}/backup-codes"),
                &manage,
                Value::Null,
            )
            .await;
            let pending = enrol_pending(&app, &manage).await;
            (tenant, manage, node, pending)
        });
        Fixture {
            rt,
            app,
            tenant,
            manage,
            node,
            pending: Mutex::new(pending),
        }
    })
}

/// `TENANT` replaced by the fixture tenant's id.
fn substitute(body: &[u8], tenant: &str) -> Vec<u8> {
    const MARK: &[u8] = b"TENANT";
    let mut out = Vec::with_capacity(body.len());
    let mut rest = body;
    while let Some(at) = rest.windows(MARK.len()).position(|w| w == MARK) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(tenant.as_bytes());
        rest = &rest[at + MARK.len()..];
    }
    out.extend_from_slice(rest);
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let fx = fixture();
    let (template, who) = ROUTES[usize::from(selector) % ROUTES.len()];
    let content_type = match (usize::from(selector) / ROUTES.len()) % 4 {
        0 | 1 => Some("application/json"),
        2 => Some("text/plain"),
        _ => None,
    };
    let token = match who {
        Who::Operator => OPERATOR,
        Who::Manage => fx.manage.as_str(),
        Who::Node => fx.node.as_str(),
    };
    let user = if template.contains("{factor}") {
        ACTIVATE_USER
    } else {
        USER
    };
    let factor = fx.pending.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let path = template
        .replace("{tenant}", &fx.tenant)
        .replace("{user}", user)
        .replace("{factor}", &factor);
    let body = substitute(body, &fx.tenant);
    let (status, answered_type, bytes) =
        fx.rt
            .block_on(call(&fx.app, &path, token, content_type, body));
    answer::check(template, status, answered_type.as_deref(), &bytes);
    if template.contains("{factor}") && status == StatusCode::NOT_FOUND {
        // Five wrong codes (or the pending TTL) dropped the factor: enrol again.
        let fresh = fx.rt.block_on(enrol_pending(&fx.app, &fx.manage));
        *fx.pending.lock().unwrap_or_else(|p| p.into_inner()) = fresh;
    }
});
