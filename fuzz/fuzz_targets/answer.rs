//! The property both request-body targets check on every answer: never a 5xx,
//! and every 4xx in the API's error shape, `{"error":{"code":...,"message":...}}`
//! with non-empty strings and nothing else.

use axum::http::{StatusCode, header};
use serde_json::Value;

/// Check one answer; panics (a finding) when the property does not hold.
pub fn check(route: &str, status: StatusCode, content_type: Option<&str>, body: &[u8]) {
    assert!(
        !status.is_server_error(),
        "{route}: answered {status}: {}",
        String::from_utf8_lossy(body)
    );
    if !status.is_client_error() {
        return;
    }
    assert_eq!(
        content_type,
        Some("application/json"),
        "{route}: a {status} must be JSON"
    );
    let value: Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{route}: a {status} body is not JSON ({e})"));
    let shape_ok = value.as_object().is_some_and(|o| o.len() == 1)
        && value["error"].as_object().is_some_and(|e| e.len() == 2)
        && value["error"]["code"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
        && value["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty());
    assert!(
        shape_ok,
        "{route}: a {status} without the error shape: {value}"
    );
}

/// The content type of a response, if it is valid text.
pub fn content_type(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers.get(header::CONTENT_TYPE)?.to_str().ok()
}
