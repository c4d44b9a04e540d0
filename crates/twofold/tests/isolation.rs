//! Tenant isolation over every route of both planes, through real `twofold
//! control` and `twofold data` processes.
//!
//! Tenant A's keys try to read, change or verify tenant B's things (users,
//! factors, backup codes, keys, audit records, throttle). Every attempt must be
//! answered exactly as the same request about something that does not exist
//! (same status, same error code), and tenant B's state must be the same
//! afterwards. Keys of the wrong scope are refused on every route.
//!
//! The control plane's routes come from its OpenAPI document: the test fails if
//! the document has an operation the table below does not cover, so a new route
//! cannot escape it. The data plane has no route listing; its five routes are
//! listed by hand in [`DATA_ROUTES`].

mod common;

use std::collections::BTreeSet;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// Well-formed ids that name nothing.
const MISSING_TENANT: &str = "tn_aaaaaaaaaaaaaaaa";
const MISSING_KEY: &str = "key_aaaaaaaaaaaaaaaa";
const MISSING_FACTOR: &str = "fa_aaaaaaaaaaaaaaaa";
/// A user no tenant has. Each probe that would create it uses its own name.
const GHOST: &str = "ghost-user";

/// Tenant B's users; the names are unusual so they can be searched for.
const BOB: &str = "bob-of-tenant-b";
const CAROL: &str = "carol-of-tenant-b";
/// Tenant A's own user.
const ALICE: &str = "alice-of-tenant-a";

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// No credential at all.
    Public,
    Operator,
    /// A tenant key with `manage`.
    Manage,
    /// A `manage` key (its own tenant only) or the operator (any tenant).
    ManageOrOperator,
    /// A node key (`replicate`) or the operator.
    Replicate,
}

/// Every operation of the control API, and who may call it.
const CONTROL_ROUTES: &[(&str, &str, Access)] = &[
    ("POST", "/v1/tenants", Access::Operator),
    ("GET", "/v1/tenants", Access::Operator),
    ("GET", "/v1/tenants/{tenant}", Access::Operator),
    ("POST", "/v1/tenants/{tenant}/keys", Access::Operator),
    ("GET", "/v1/tenants/{tenant}/keys", Access::Operator),
    (
        "DELETE",
        "/v1/tenants/{tenant}/keys/{key}",
        Access::Operator,
    ),
    ("POST", "/v1/node-keys", Access::Operator),
    ("GET", "/v1/node-keys", Access::Operator),
    ("DELETE", "/v1/node-keys/{key}", Access::Operator),
    ("GET", "/v1/keys", Access::Operator),
    ("DELETE", "/v1/users/{user}", Access::Manage),
    ("POST", "/v1/users/{user}/totp", Access::Manage),
    (
        "POST",
        "/v1/users/{user}/totp/{factor}/activate",
        Access::Manage,
    ),
    ("GET", "/v1/users/{user}/factors", Access::Manage),
    (
        "DELETE",
        "/v1/users/{user}/factors/{factor}",
        Access::Manage,
    ),
    ("POST", "/v1/users/{user}/backup-codes", Access::Manage),
    ("GET", "/v1/users/{user}/backup-codes", Access::Manage),
    ("POST", "/v1/users/{user}/unlock", Access::Manage),
    ("GET", "/v1/audit", Access::ManageOrOperator),
    ("GET", "/v1/feed/snapshot", Access::Replicate),
    ("GET", "/v1/feed/changes", Access::Replicate),
    ("GET", "/v1/feed/digest", Access::Replicate),
    ("POST", "/v1/feed/usage", Access::Replicate),
    ("POST", "/v1/feed/backup-code-use", Access::Replicate),
    ("GET", "/healthz", Access::Public),
    ("GET", "/readyz", Access::Public),
    ("GET", "/metrics", Access::Public),
    ("GET", "/v1/openapi.json", Access::Public),
];

/// Every route of the data plane (`twofold_data::api::app`).
const DATA_ROUTES: &[(&str, &str)] = &[
    ("POST", "/v1/verify"),
    ("GET", "/v1/replica/digest"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
];

/// Everything the test sets up: two tenants with users, a node key and a data
/// plane.
struct World {
    data: DataPlane,
    control: ControlPlane,
    node: Key,
    a: Tenant,
    b: Tenant,
    /// B's bob: an active factor, a pending one and backup codes.
    bob_factor: Totp,
    bob_pending: Totp,
    bob_codes: BackupCodes,
    /// B's carol: backup codes only.
    carol_codes: BackupCodes,
}

/// What went wrong, gathered so one run reports every leak at once.
#[derive(Default)]
struct Findings(Vec<String>);

impl Findings {
    fn fail(&mut self, what: String) {
        self.0.push(what);
    }

    /// `reply` is an error in the API's shape; returns its status and code.
    fn error_of(&mut self, what: &str, reply: &Reply) -> Option<(StatusCode, String)> {
        if !(reply.status.is_client_error() || reply.status.is_server_error()) {
            self.fail(format!(
                "{what}: not refused: {} {}",
                reply.status, reply.text
            ));
            return None;
        }
        let body: Value = serde_json::from_str(&reply.text).unwrap_or(Value::Null);
        let shaped = body.as_object().is_some_and(|o| o.len() == 1)
            && body["error"].as_object().is_some_and(|e| e.len() == 2)
            && body["error"]["code"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
            && body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty());
        if !shaped {
            self.fail(format!(
                "{what}: not the error shape: {} {}",
                reply.status, reply.text
            ));
            return None;
        }
        Some((reply.status, body["error"]["code"].as_str()?.to_owned()))
    }

    /// `cross` (about tenant B's thing) is refused exactly as `missing` (about
    /// nothing).
    fn same_refusal(&mut self, what: &str, cross: &Reply, missing: &Reply) {
        let (Some(cross_error), Some(missing_error)) = (
            self.error_of(&format!("{what} (tenant B's)"), cross),
            self.error_of(&format!("{what} (missing)"), missing),
        ) else {
            return;
        };
        if cross_error != missing_error {
            self.fail(format!(
                "{what}: tenant B's thing answers {cross_error:?}, a missing one {missing_error:?}"
            ));
        }
    }

    /// The same answer, status and body, whether or not it is an error.
    fn same_answer(&mut self, what: &str, cross: &Reply, missing: &Reply) {
        if cross.status != missing.status {
            self.fail(format!(
                "{what}: tenant B's thing answers {}, a missing one {}",
                cross.status, missing.status
            ));
        }
        if cross.status.is_client_error() {
            self.same_refusal(what, cross, missing);
        }
    }

    /// Refused as a key of the wrong scope is.
    fn refused(&mut self, what: &str, reply: &Reply, status: StatusCode, code: &str) {
        if let Some(got) = self.error_of(what, reply)
            && got != (status, code.to_owned())
        {
            self.fail(format!("{what}: expected {status} {code}, got {got:?}"));
        }
    }

    /// `text` says nothing about tenant B.
    fn no_trace_of_b(&mut self, what: &str, text: &str, w: &World) {
        let mut names = vec![
            w.b.id.as_str(),
            w.b.manage.id.as_str(),
            w.b.verify.id.as_str(),
            // Not carol: A creates a user of that name, which is A's to see.
            BOB,
            w.bob_factor.id.as_str(),
            w.bob_pending.id.as_str(),
            w.bob_codes.set_id.as_str(),
            w.carol_codes.set_id.as_str(),
        ];
        names.extend(w.bob_codes.codes.iter().map(String::as_str));
        for name in names {
            if text.contains(name) {
                self.fail(format!("{what}: the answer names tenant B's {name:?}"));
            }
        }
    }
}

impl World {
    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Reply {
        let method = Method::from_bytes(method.as_bytes()).expect("an HTTP method");
        self.control
            .api
            .reply(method, path, token, body.as_ref())
            .await
    }

    /// Tenant B's state as its own keys and the operator see it.
    async fn b_state(&self) -> Value {
        let manage = &self.b.manage.secret;
        let mut state = serde_json::Map::new();
        for user in [BOB, CAROL] {
            for what in ["factors", "backup-codes"] {
                let (status, body) = self
                    .control
                    .get(&format!("/v1/users/{}/{what}", enc(user)), manage)
                    .await;
                state.insert(format!("{user} {what}"), json!([status.as_u16(), body]));
            }
        }
        let b = &self.b.id;
        for path in [
            format!("/v1/tenants/{b}"),
            format!("/v1/tenants/{b}/keys"),
            format!("/v1/audit?tenant={b}&limit=1000"),
        ] {
            let (status, body) = self.control.get(&path, OPERATOR).await;
            state.insert(path, json!([status.as_u16(), body]));
        }
        Value::Object(state)
    }

    /// A request body a route takes, so refusals are about the credential or the
    /// target, never about the body.
    fn body_for(&self, method: &str, path: &str) -> Option<Value> {
        if method != "POST" {
            return None;
        }
        Some(match path {
            "/v1/tenants" => json!({ "name": "intruder" }),
            "/v1/tenants/{tenant}/keys" => json!({ "scopes": ["manage", "verify"] }),
            "/v1/node-keys" => json!({ "name": "intruder" }),
            "/v1/users/{user}/totp" => json!({ "qr": "none" }),
            "/v1/users/{user}/totp/{factor}/activate" => {
                json!({ "code": self.bob_pending.peek_code() })
            }
            "/v1/feed/usage" => json!({
                "node": "intruder",
                "events": [{ "id": 1, "type": "failure", "tenant": self.b.id, "user": BOB, "at": unix_now() }],
            }),
            "/v1/feed/backup-code-use" => json!({
                "tenant": self.b.id, "user": BOB, "set_id": self.bob_codes.set_id, "index": 0,
            }),
            _ => return None,
        })
    }

    /// A route's path with tenant B's ids filled in.
    fn b_path(&self, path: &str) -> String {
        path.replace("{tenant}", &self.b.id)
            .replace("{key}", &self.b.verify.id)
            .replace("{user}", BOB)
            .replace("{factor}", &self.bob_factor.id)
            .replace("/v1/feed/changes", "/v1/feed/changes?after=0")
    }
}

/// Set up tenants A and B, B's users, and a data plane that has all of it.
async fn world() -> World {
    let control = ControlPlane::start().await;
    let a = control.tenant("tenant-a").await;
    let b = control.tenant("tenant-b").await;
    let node = control.create_node_key().await;
    let b_manage = &b.manage.secret;
    let bob_factor = control.active_factor(b_manage, BOB).await;
    let bob_pending = control.enroll(b_manage, BOB).await;
    let bob_codes = control.backup_codes(b_manage, BOB).await;
    let carol_codes = control.backup_codes(b_manage, CAROL).await;
    control.active_factor(&a.manage.secret, ALICE).await;
    let data = control.data_plane(&node.secret).await;
    data.wait_ready().await;
    data.wait_synced(&control.api).await;
    // Two failures for bob, so an unlock by A would show.
    for _ in 0..2 {
        let (status, body) = data
            .verify(&b.verify.secret, BOB, &bob_factor.wrong_code())
            .await;
        assert_eq!((status, body), (StatusCode::OK, invalid()));
    }
    data.wait_reported().await;
    wait_for("bob's failures on the control plane", WAIT, || async {
        let listed = control.user_factors(b_manage, BOB).await;
        (listed["failures"] == 2).then_some(())
    })
    .await;
    data.wait_synced(&control.api).await;
    World {
        data,
        control,
        node,
        a,
        b,
        bob_factor,
        bob_pending,
        bob_codes,
        carol_codes,
    }
}

/// The control plane's operations, from its OpenAPI document.
async fn documented_routes(control: &ControlPlane) -> BTreeSet<(String, String)> {
    let (status, doc) = control
        .call(Method::GET, "/v1/openapi.json", None, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{doc}");
    let mut routes = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("a path item").keys() {
            let method = method.to_ascii_uppercase();
            if [
                "GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE",
            ]
            .contains(&method.as_str())
            {
                routes.insert((method, path.clone()));
            }
        }
    }
    routes
}

/// Keys of the wrong scope are refused on every route of the control plane.
async fn wrong_scopes(w: &World, findings: &mut Findings) {
    let a = &w.a;
    let credentials = [
        ("A's manage key", a.manage.secret.as_str()),
        ("A's verify key", a.verify.secret.as_str()),
        ("a node key", w.node.secret.as_str()),
        ("the operator", OPERATOR),
    ];
    for &(method, route, access) in CONTROL_ROUTES {
        for (who, token) in credentials {
            let allowed = match access {
                Access::Public => true,
                Access::Operator => who == "the operator",
                Access::Manage => who == "A's manage key",
                Access::ManageOrOperator => who == "A's manage key" || who == "the operator",
                Access::Replicate => who == "a node key" || who == "the operator",
            };
            if allowed {
                continue;
            }
            // Aimed at tenant B's things: a refused scope must not depend on them.
            let path = w.b_path(route);
            let reply = w
                .call(method, &path, Some(token), w.body_for(method, route))
                .await;
            findings.refused(
                &format!("{who} on {method} {route}"),
                &reply,
                StatusCode::FORBIDDEN,
                "forbidden",
            );
        }
    }
}

/// Tenant A's manage key (and, for operator routes, the operator through
/// tenant A's paths) against tenant B's things, compared with missing ones.
async fn cross_tenant_control(w: &World, findings: &mut Findings) {
    let manage = w.a.manage.secret.as_str();
    let (a, b) = (&w.a, &w.b);
    for &(method, route, _) in CONTROL_ROUTES {
        let what = format!("{method} {route}");
        let body = w.body_for(method, route);
        let call = async |path: String, token: &str| -> Reply {
            w.call(method, &path, Some(token), body.clone()).await
        };
        match route {
            // Operator routes: A's key is refused the same about B and about
            // nothing (scopes are checked in `wrong_scopes`); through tenant A's
            // paths, the operator cannot reach B's keys.
            "/v1/tenants" | "/v1/node-keys" | "/v1/keys" => {
                let reply = call(route.to_owned(), manage).await;
                findings.refused(&what, &reply, StatusCode::FORBIDDEN, "forbidden");
                if method == "GET" {
                    let listed = call(route.to_owned(), OPERATOR).await;
                    if route == "/v1/node-keys" {
                        findings.no_trace_of_b(&format!("{what} (operator)"), &listed.text, w);
                    }
                }
            }
            "/v1/tenants/{tenant}" | "/v1/tenants/{tenant}/keys" => {
                let cross = call(route.replace("{tenant}", &b.id), manage).await;
                let missing = call(route.replace("{tenant}", MISSING_TENANT), manage).await;
                findings.same_refusal(&what, &cross, &missing);
                if method == "GET" && route.ends_with("/keys") {
                    let listed = call(route.replace("{tenant}", &a.id), OPERATOR).await;
                    findings.no_trace_of_b(&format!("{what} of A (operator)"), &listed.text, w);
                }
            }
            "/v1/tenants/{tenant}/keys/{key}" => {
                let path = |tenant: &str, key: &str| {
                    route.replace("{tenant}", tenant).replace("{key}", key)
                };
                let cross = call(path(&b.id, &b.verify.id), manage).await;
                let missing = call(path(&b.id, MISSING_KEY), manage).await;
                findings.same_refusal(&what, &cross, &missing);
                // The operator, through tenant A's path, with B's key id.
                let cross = call(path(&a.id, &b.verify.id), OPERATOR).await;
                let missing = call(path(&a.id, MISSING_KEY), OPERATOR).await;
                findings.same_refusal(&format!("{what} via tenant A (operator)"), &cross, &missing);
            }
            "/v1/node-keys/{key}" => {
                let cross = call(route.replace("{key}", &w.node.id), manage).await;
                let missing = call(route.replace("{key}", MISSING_KEY), manage).await;
                findings.same_refusal(&what, &cross, &missing);
                // A tenant key is not a node key, even to the operator.
                let cross = call(route.replace("{key}", &b.verify.id), OPERATOR).await;
                let missing = call(route.replace("{key}", MISSING_KEY), OPERATOR).await;
                findings.same_refusal(&format!("{what} with B's key (operator)"), &cross, &missing);
            }
            "/v1/users/{user}"
            | "/v1/users/{user}/factors"
            | "/v1/users/{user}/backup-codes"
            | "/v1/users/{user}/unlock"
                if method != "POST" || route.ends_with("/unlock") =>
            {
                let cross = call(route.replace("{user}", &enc(BOB)), manage).await;
                let missing = call(route.replace("{user}", GHOST), manage).await;
                findings.same_refusal(&what, &cross, &missing);
            }
            // These create: for A, a user named like B's is A's own new user.
            // The answer must be the one for a user no one has, and B's user
            // must be untouched (checked with B's state afterwards).
            "/v1/users/{user}/totp" | "/v1/users/{user}/backup-codes" => {
                let cross = call(route.replace("{user}", &enc(CAROL)), manage).await;
                let fresh = format!("{GHOST}-{}", route.len());
                let missing = call(route.replace("{user}", &fresh), manage).await;
                findings.same_answer(&what, &cross, &missing);
                if cross.status.is_success() {
                    let created = cross.json();
                    findings.no_trace_of_b(&what, &created.to_string(), w);
                }
            }
            "/v1/users/{user}/totp/{factor}/activate" | "/v1/users/{user}/factors/{factor}" => {
                let factor = if route.ends_with("/activate") {
                    &w.bob_pending.id
                } else {
                    &w.bob_factor.id
                };
                for user in [BOB, ALICE] {
                    let path = |f: &str| route.replace("{user}", &enc(user)).replace("{factor}", f);
                    let cross = call(path(factor), manage).await;
                    let missing = call(path(MISSING_FACTOR), manage).await;
                    findings.same_refusal(&format!("{what} as {user}"), &cross, &missing);
                }
            }
            "/v1/audit" => {
                // A key sees its own tenant's records whatever it asks for.
                for (query, missing) in [
                    (
                        format!("tenant={}", b.id),
                        format!("tenant={MISSING_TENANT}"),
                    ),
                    (format!("user={}", enc(BOB)), format!("user={GHOST}")),
                ] {
                    let cross = call(format!("{route}?{query}&limit=1000"), manage).await;
                    let missing = call(format!("{route}?{missing}&limit=1000"), manage).await;
                    if cross.status != StatusCode::OK || cross.text != missing.text {
                        findings.fail(format!(
                            "{what}?{query}: {} {} differs from a missing one's {} {}",
                            cross.status, cross.text, missing.status, missing.text
                        ));
                    }
                    findings.no_trace_of_b(&format!("{what}?{query}"), &cross.text, w);
                }
            }
            // Feed routes carry every tenant's data: A's key is refused, and the
            // body naming B changes nothing (checked with B's state afterwards).
            "/v1/feed/snapshot"
            | "/v1/feed/digest"
            | "/v1/feed/usage"
            | "/v1/feed/backup-code-use" => {
                let reply = call(route.to_owned(), manage).await;
                findings.refused(&what, &reply, StatusCode::FORBIDDEN, "forbidden");
            }
            "/v1/feed/changes" => {
                let reply = call(format!("{route}?after=0"), manage).await;
                findings.refused(&what, &reply, StatusCode::FORBIDDEN, "forbidden");
            }
            "/healthz" | "/readyz" | "/metrics" | "/v1/openapi.json" => {
                let reply = w.call(method, route, None, None).await;
                if reply.status != StatusCode::OK {
                    findings.fail(format!("{what}: {} {}", reply.status, reply.text));
                }
                findings.no_trace_of_b(&what, &reply.text, w);
            }
            _ => findings.fail(format!("{what}: no cross-tenant probe for this route")),
        }
    }
}

/// Tenant A's verify key against tenant B's users on the data plane.
async fn cross_tenant_data(w: &World, findings: &mut Findings) {
    let data = &w.data;
    let a_verify = w.a.verify.secret.as_str();
    // B's right codes, from A's key: the answer for a user nobody has.
    let totp = w.bob_factor.peek_code();
    let backup = &w.bob_codes.codes[0];
    for (what, code) in [
        ("B's TOTP code", totp.as_str()),
        ("B's backup code", backup),
    ] {
        let cross = data.verify_reply(a_verify, BOB, code).await;
        let missing = data.verify_reply(a_verify, GHOST, code).await;
        if cross.pair() != (StatusCode::OK, invalid()) || cross.pair() != missing.pair() {
            findings.fail(format!(
                "verify with {what} from A's key: {} {} (a missing user: {} {})",
                cross.status, cross.text, missing.status, missing.text
            ));
        }
    }
    // A body cannot choose the tenant.
    let body = json!({ "user": BOB, "code": totp, "tenant": w.b.id }).to_string();
    let reply = data
        .post_verify(Some(a_verify), Some("application/json"), body)
        .await;
    findings.refused(
        "verify naming tenant B in the body",
        &reply,
        StatusCode::BAD_REQUEST,
        "invalid_json",
    );
    // A's wrong codes for bob are throttled as for a user nobody has, and do not
    // reach bob's throttle.
    let wrong = w.bob_factor.wrong_code();
    let attempts = FREE_FAILURES + 3;
    let mut cross = Vec::new();
    let mut missing = Vec::new();
    for _ in 0..attempts {
        cross.push(answer_of(&data.verify_reply(a_verify, BOB, &wrong).await));
        missing.push(answer_of(
            // GHOST took the same two failures above as bob did from A.
            &data.verify_reply(a_verify, GHOST, &wrong).await,
        ));
    }
    if cross != missing {
        findings.fail(format!(
            "A's wrong codes for bob answer {cross:?}, for a missing user {missing:?}"
        ));
    }
    if !cross.iter().any(|(_, code)| code == "throttled") {
        findings.fail(format!(
            "{attempts} wrong codes from A were never throttled: {cross:?}"
        ));
    }
    // Keys that may not verify are refused as an unknown key is.
    let bogus = data.verify_reply("tfk_not-a-key-at-all", BOB, &totp).await;
    for (who, token) in [
        ("A's manage key", w.a.manage.secret.as_str()),
        ("a node key", w.node.secret.as_str()),
        ("the operator", OPERATOR),
    ] {
        let reply = data.verify_reply(token, BOB, &totp).await;
        findings.refused(
            &format!("{who} on POST /v1/verify"),
            &reply,
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        );
        findings.same_refusal(&format!("{who} on POST /v1/verify"), &reply, &bogus);
    }
    // The data plane's other routes take no credential and name no tenant's
    // users or secrets.
    for &(method, route) in DATA_ROUTES {
        if route == "/v1/verify" {
            continue;
        }
        assert_eq!(method, "GET");
        let reply = data.get(route).await;
        if reply.status != StatusCode::OK {
            findings.fail(format!(
                "data {method} {route}: {} {}",
                reply.status, reply.text
            ));
        }
        findings.no_trace_of_b(&format!("data {method} {route}"), &reply.text, w);
    }
}

/// Failures before the default throttle (`ThrottlePolicy::default()`) refuses.
const FREE_FAILURES: usize = 5;

/// A verify answer without its timing: status and error code, or the body.
fn answer_of(reply: &Reply) -> (u16, String) {
    let body = reply.json();
    let code = body["error"]["code"]
        .as_str()
        .map_or_else(|| body.to_string(), str::to_owned);
    (reply.status.as_u16(), code)
}

#[tokio::test(flavor = "multi_thread")]
async fn tenant_a_cannot_reach_tenant_b_on_any_route() {
    let w = world().await;

    // Every documented operation is in the table, and the table holds no more.
    let documented = documented_routes(&w.control).await;
    let covered: BTreeSet<(String, String)> = CONTROL_ROUTES
        .iter()
        .map(|(m, p, _)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    let uncovered: Vec<_> = documented.difference(&covered).collect();
    assert!(
        uncovered.is_empty(),
        "routes without an isolation check: {uncovered:?}; add them to CONTROL_ROUTES"
    );
    let stale: Vec<_> = covered.difference(&documented).collect();
    assert!(stale.is_empty(), "routes the API no longer has: {stale:?}");

    let before = w.b_state().await;
    let mut findings = Findings::default();
    wrong_scopes(&w, &mut findings).await;
    cross_tenant_control(&w, &mut findings).await;
    cross_tenant_data(&w, &mut findings).await;
    // Whatever A's attempts produced on the data plane has reached the control
    // plane by now.
    w.data.wait_reported().await;
    w.data.wait_synced(&w.control.api).await;
    let after = w.b_state().await;
    if before != after {
        findings.fail(format!(
            "tenant B's state changed:\nbefore: {before:#}\nafter: {after:#}"
        ));
    }
    assert!(
        findings.0.is_empty(),
        "isolation failures:\n{}",
        findings.0.join("\n")
    );

    // And B's own keys still do everything A's attempts aimed at: bob's next
    // TOTP code and first backup code verify (A spent neither, nor throttled or
    // locked bob), carol's backup codes are hers, bob's pending factor activates.
    let (data, b) = (&w.data, &w.b);
    let code = w.bob_factor.fresh_code().await;
    assert_eq!(
        data.verify(&b.verify.secret, BOB, &code).await,
        (StatusCode::OK, valid("totp", &w.bob_factor.id))
    );
    assert_eq!(
        data.verify(&b.verify.secret, BOB, &w.bob_codes.codes[0])
            .await,
        (StatusCode::OK, valid("backup", &w.bob_codes.set_id))
    );
    assert_eq!(
        data.verify(&b.verify.secret, CAROL, &w.carol_codes.codes[0])
            .await,
        (StatusCode::OK, valid("backup", &w.carol_codes.set_id))
    );
    w.control.activate(&b.manage.secret, &w.bob_pending).await;
}
