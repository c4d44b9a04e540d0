//! The OpenAPI document at `GET /v1/openapi.json` against the router that serves
//! it. The list of routes comes from `api::routes()`, from which `api::app` builds
//! its router, so no test here keeps its own list. Probing the app then shows that
//! every documented operation is routed, and that a documented path answers 405
//! to every method the document does not give it.

use std::collections::{BTreeMap, BTreeSet};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use serde_json::Value;
use tempfile::TempDir;
use tower::ServiceExt;
use twofold_control::api;
use twofold_control::config::Config;
use twofold_control::state::{AppState, Clock};
use twofold_control::store::Store;
use twofold_core::seal::{Keyring, MasterKey};

/// Methods probed on each documented path. HEAD is left out: axum answers it
/// wherever GET is routed.
const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

/// The app over a fresh store; the directory must outlive it.
fn app() -> (Router, TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(&dir.path().join("control.db")).expect("open store");
    let config = Config::new(Keyring::new(MasterKey::generate().expect("master key")));
    let state = AppState::new(
        store,
        config,
        Clock::system(),
        tokio_util::sync::CancellationToken::new(),
    );
    (api::app(state), dir)
}

/// Send a request without credentials and return the status and JSON body
/// (`Null` when the body is not JSON).
async fn call(app: &Router, method: &str, path: &str) -> (StatusCode, Value) {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{}"))
        .expect("request");
    let response = app.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("body");
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn served_document(app: &Router) -> Value {
    let (status, doc) = call(app, "GET", "/v1/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    doc
}

/// The document the router was built with, as JSON.
fn router_document() -> Value {
    serde_json::to_value(api::routes().into_openapi()).expect("document serialises")
}

/// Every operation of a document: (METHOD, path) -> operation object.
fn operations(doc: &Value) -> BTreeMap<(String, String), Value> {
    let paths = doc["paths"].as_object().expect("paths is an object");
    let mut ops = BTreeMap::new();
    for (path, item) in paths {
        let item = item.as_object().expect("path item is an object");
        for (method, op) in item {
            let method = method.to_ascii_uppercase();
            if METHODS.contains(&method.as_str())
                || ["HEAD", "OPTIONS", "TRACE"].contains(&&*method)
            {
                ops.insert((method, path.clone()), op.clone());
            }
        }
    }
    ops
}

/// A concrete path for a templated one: each `{param}` becomes `x`.
fn concrete(path: &str) -> String {
    let mut out = String::new();
    let mut in_param = false;
    for c in path.chars() {
        match c {
            '{' => {
                in_param = true;
                out.push('x');
            }
            '}' => in_param = false,
            _ if in_param => {}
            _ => out.push(c),
        }
    }
    out
}

fn path_params(path: &str) -> BTreeSet<String> {
    path.split('/')
        .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
        .map(str::to_owned)
        .collect()
}

/// The router's fallback, as opposed to a handler's own 404.
fn is_unrouted(status: StatusCode, body: &Value) -> bool {
    status == StatusCode::METHOD_NOT_ALLOWED
        || (status == StatusCode::NOT_FOUND && body["error"]["message"] == "route not found")
}

#[tokio::test]
async fn document_lists_every_route_of_the_router() {
    let (app, _dir) = app();
    let served = operations(&served_document(&app).await);
    let routed = operations(&router_document());
    assert!(
        routed.contains_key(&("GET".to_owned(), "/v1/openapi.json".to_owned())),
        "the document describes itself"
    );
    let served: BTreeSet<_> = served.into_keys().collect();
    let routed: BTreeSet<_> = routed.into_keys().collect();
    let missing: Vec<_> = routed.difference(&served).collect();
    let extra: Vec<_> = served.difference(&routed).collect();
    assert!(
        missing.is_empty(),
        "routes missing from the document: {missing:?}"
    );
    assert!(
        extra.is_empty(),
        "documented operations not routed: {extra:?}"
    );
}

#[tokio::test]
async fn every_documented_operation_is_routed() {
    let (app, _dir) = app();
    for (method, path) in operations(&served_document(&app).await).into_keys() {
        let (status, body) = call(&app, &method, &concrete(&path)).await;
        assert!(
            !is_unrouted(status, &body),
            "{method} {path} is documented but not routed: {status} {body}"
        );
    }
}

#[tokio::test]
async fn documented_paths_answer_405_to_undocumented_methods() {
    let (app, _dir) = app();
    let ops = operations(&served_document(&app).await);
    let paths: BTreeSet<&String> = ops.keys().map(|(_, path)| path).collect();
    for path in paths {
        for method in METHODS {
            if ops.contains_key(&(method.to_owned(), path.clone())) {
                continue;
            }
            let (status, body) = call(&app, method, &concrete(path)).await;
            assert_eq!(
                status,
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path} is routed but not documented: {body}"
            );
        }
    }
}

#[tokio::test]
async fn every_operation_declares_its_answers() {
    let (app, _dir) = app();
    let doc = served_document(&app).await;
    assert_eq!(doc["openapi"].as_str().map(|v| &v[..2]), Some("3."));
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let mut ids = BTreeSet::new();
    for ((method, path), op) in operations(&doc) {
        let what = format!("{method} {path}");
        let id = op["operationId"].as_str().expect("operationId");
        assert!(
            ids.insert(id.to_owned()),
            "{what}: operationId {id} is not unique"
        );

        let declared: BTreeSet<String> = op["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["in"] == "path")
            .filter_map(|p| p["name"].as_str().map(str::to_owned))
            .collect();
        assert_eq!(declared, path_params(&path), "{what}: path parameters");

        let responses = op["responses"].as_object().expect("responses");
        let statuses: Vec<u16> = responses.keys().filter_map(|s| s.parse().ok()).collect();
        assert!(
            statuses.iter().any(|s| (200..300).contains(s)),
            "{what}: no 2xx answer"
        );
        for (status, response) in responses {
            if status.starts_with(['4', '5']) {
                assert_eq!(
                    response["content"]["application/json"]["schema"]["$ref"],
                    "#/components/schemas/ErrorBody",
                    "{what}: {status} is not an ErrorBody"
                );
            }
        }

        let secured = op["security"]
            .as_array()
            .is_some_and(|s| s.iter().any(|r| r.get("bearer").is_some()));
        if secured {
            assert!(
                statuses.iter().any(|s| (400..500).contains(s)),
                "{what}: no 4xx answer"
            );
            for needed in [401, 403] {
                assert!(statuses.contains(&needed), "{what}: no {needed} answer");
            }
        } else {
            // Only the operational endpoints take no credential, and they have
            // no client error to answer.
            let tags = op["tags"].as_array().expect("tags");
            assert!(
                tags.iter().any(|t| t == "ops"),
                "{what}: documented without the bearer credential, yet not an ops endpoint"
            );
        }
    }
}

#[tokio::test]
async fn documented_error_body_matches_a_real_error() {
    let (app, _dir) = app();
    let doc = served_document(&app).await;
    let schemas = &doc["components"]["schemas"];
    let keys = |v: &Value| -> BTreeSet<String> {
        v.as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    };

    let (status, body) = call(&app, "GET", "/v1/tenants").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let error_body = &schemas["ErrorBody"];
    assert_eq!(keys(&error_body["properties"]), keys(&body));
    assert_eq!(
        error_body["properties"]["error"]["$ref"],
        "#/components/schemas/ErrorDetail"
    );
    let detail = &schemas["ErrorDetail"];
    assert_eq!(keys(&detail["properties"]), keys(&body["error"]));
    for field in ["code", "message"] {
        assert_eq!(detail["properties"][field]["type"], "string");
        assert!(body["error"][field].is_string());
        assert!(
            detail["required"]
                .as_array()
                .expect("required")
                .contains(&Value::from(field)),
            "ErrorDetail.{field} is required"
        );
    }
}

#[tokio::test]
async fn every_schema_reference_resolves() {
    fn refs(v: &Value, out: &mut BTreeSet<String>) {
        match v {
            Value::Object(o) => {
                if let Some(Value::String(r)) = o.get("$ref") {
                    out.insert(r.clone());
                }
                o.values().for_each(|v| refs(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let (app, _dir) = app();
    let doc = served_document(&app).await;
    let mut found = BTreeSet::new();
    refs(&doc, &mut found);
    assert!(!found.is_empty());
    for r in found {
        let name = r
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("{r} is not a schema reference"));
        assert!(
            doc["components"]["schemas"].get(name).is_some(),
            "{r} does not resolve"
        );
    }
}
