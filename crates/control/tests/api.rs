//! The control plane's HTTP API, exercised over a real socket: authentication
//! and scopes, tenants and keys, TOTP enrolment and activation, backup codes,
//! users, the audit log, tenant isolation, and the operational endpoints.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{
    OPERATOR, START_MS, TestServer, assert_error, assert_error_shape, enc, send, totp, wrong_code,
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

suite! {
    requests_without_valid_credentials_are_401,
    operator_routes_refuse_other_credentials,
    user_routes_need_a_manage_key,
    the_feed_needs_the_operator_or_a_node_key,
    tenants_are_created_listed_and_shown,
    tenant_names_are_validated,
    unknown_and_malformed_tenants_are_404,
    bad_bodies_are_refused_in_the_error_format,
    keys_are_created_listed_and_revoked,
    key_scopes_and_names_are_validated,
    node_keys_are_created_listed_and_revoked,
    enrolment_has_safe_defaults,
    enrolment_takes_parameters,
    qr_codes_come_as_svg_or_png,
    invalid_totp_parameters_are_400,
    user_ids_are_validated,
    activation_checks_the_code_once,
    a_code_two_steps_away_is_refused,
    pending_factors_expire_after_ten_minutes,
    a_user_holds_at_most_five_factors,
    listing_factors_never_shows_a_secret,
    factors_and_users_are_deleted,
    backup_codes_are_generated_and_replaced,
    unlock_needs_a_known_user,
    every_change_is_audited_without_secrets,
    another_tenants_users_look_missing,
    unknown_routes_and_methods_answer_in_json,
    health_readiness_and_metrics,
    enrolment_body_must_be_json_when_present,
    five_wrong_activation_codes_cancel_the_enrolment,
    names_too_long_for_a_qr_code_are_a_bad_request,
    ; multi_thread:
    concurrent_activations_succeed_once,
    concurrent_enrolments_respect_the_limit,
}

#[test]
fn totp_helper_matches_rfc6238() {
    let sha1 = b"12345678901234567890";
    let sha256 = b"12345678901234567890123456789012";
    let sha512 = b"1234567890123456789012345678901234567890123456789012345678901234";
    let table: &[(&[u8], &str, u64, &str)] = &[
        (sha1, "SHA1", 59, "94287082"),
        (sha256, "SHA256", 59, "46119246"),
        (sha512, "SHA512", 59, "90693936"),
        (sha1, "SHA1", 1_111_111_109, "07081804"),
        (sha256, "SHA256", 1_111_111_109, "68084774"),
        (sha512, "SHA512", 1_111_111_109, "25091201"),
        (sha1, "SHA1", 20_000_000_000, "65353130"),
        (sha512, "SHA512", 20_000_000_000, "47863826"),
    ];
    for (secret, algorithm, time, expected) in table {
        assert_eq!(
            totp(secret, algorithm, 8, 30, *time),
            *expected,
            "{algorithm} at {time}"
        );
    }
}

// ----- authentication and scopes -----

async fn requests_without_valid_credentials_are_401() {
    let s = TestServer::start().await;
    let tenant = s.tenant("acme").await;
    let revoked = s.create_key(&tenant.id, &["manage"]).await;
    let (status, _) = s
        .delete(
            &format!("/v1/tenants/{}/keys/{}", tenant.id, revoked.id),
            OPERATOR,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    let paths = [
        (Method::GET, "/v1/tenants".to_owned()),
        (Method::GET, "/v1/users/alice/factors".to_owned()),
        (Method::GET, "/v1/feed/digest".to_owned()),
        (Method::GET, "/v1/feed/snapshot".to_owned()),
        (Method::GET, "/v1/feed/changes?after=0".to_owned()),
        (Method::GET, "/v1/audit".to_owned()),
    ];
    for (method, path) in &paths {
        let none = s.call(method.clone(), path, None, None).await;
        assert_error(&none, StatusCode::UNAUTHORIZED, "unauthorized");
        for token in [
            "tfk_not-a-real-key",
            "tfo_not-the-operator-token",
            "nonsense",
            &revoked.secret,
            &"tfk_a".repeat(100),
        ] {
            let got = s.call(method.clone(), path, Some(token), None).await;
            assert_error(&got, StatusCode::UNAUTHORIZED, "unauthorized");
        }
        for header in [
            "Basic b3BlcmF0b3I6c2VjcmV0".to_owned(),
            "Bearer".to_owned(),
            "Bearer ".to_owned(),
            format!("Token {OPERATOR}"),
        ] {
            let got = send(
                s.client
                    .request(method.clone(), s.url(path))
                    .header("authorization", header),
            )
            .await;
            assert_error(&got, StatusCode::UNAUTHORIZED, "unauthorized");
        }
    }
    // A 401 names the scheme to use (RFC 9110 §15.5.2), and a 405 the methods.
    let response = s
        .request(Method::GET, "/v1/tenants", None)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        response
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer")
    );
    let response = s
        .request(Method::PUT, "/v1/tenants", Some(OPERATOR))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        response
            .headers()
            .get("allow")
            .and_then(|v| v.to_str().ok()),
        Some("POST,GET,HEAD")
    );
    // The scheme is case-insensitive.
    let got = send(
        s.client
            .get(s.url("/v1/tenants"))
            .header("authorization", format!("bearer {OPERATOR}")),
    )
    .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
}

async fn operator_routes_refuse_other_credentials() {
    let s = TestServer::start().await;
    let tenant = s.tenant("acme").await;
    let verify = s.create_key(&tenant.id, &["verify"]).await;
    let both = s.create_key(&tenant.id, &["manage", "verify"]).await;
    let node = s.create_node_key().await;
    let t = &tenant.id;
    let calls: Vec<(Method, String, Option<Value>)> = vec![
        (
            Method::POST,
            "/v1/tenants".into(),
            Some(json!({"name": "x"})),
        ),
        (Method::GET, "/v1/tenants".into(), None),
        (Method::GET, format!("/v1/tenants/{t}"), None),
        (
            Method::POST,
            format!("/v1/tenants/{t}/keys"),
            Some(json!({"scopes": ["manage"]})),
        ),
        (Method::GET, format!("/v1/tenants/{t}/keys"), None),
        (
            Method::DELETE,
            format!("/v1/tenants/{t}/keys/{}", verify.id),
            None,
        ),
        (Method::POST, "/v1/node-keys".into(), Some(json!({}))),
        (Method::GET, "/v1/node-keys".into(), None),
        (Method::DELETE, format!("/v1/node-keys/{}", node.id), None),
    ];
    for (method, path, body) in &calls {
        for token in [&tenant.manage, &verify.secret, &both.secret, &node.secret] {
            let got = s
                .call(method.clone(), path, Some(token), body.clone())
                .await;
            assert_error(&got, StatusCode::FORBIDDEN, "forbidden");
        }
    }
    // Nothing was revoked by the refused calls.
    let (_, keys) = s.get(&format!("/v1/tenants/{t}/keys"), OPERATOR).await;
    assert!(
        keys["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .all(|k| k["revoked_at"].is_null()),
        "{keys}"
    );
}

async fn user_routes_need_a_manage_key() {
    let s = TestServer::start().await;
    let tenant = s.tenant("acme").await;
    let factor = s.enroll(&tenant.manage, "alice").await;
    let verify = s.create_key(&tenant.id, &["verify"]).await;
    let node = s.create_node_key().await;
    let f = &factor.id;
    let calls: Vec<(Method, String, Option<Value>)> = vec![
        (Method::POST, "/v1/users/alice/totp".into(), None),
        (
            Method::POST,
            format!("/v1/users/alice/totp/{f}/activate"),
            Some(json!({"code": "123456"})),
        ),
        (Method::GET, "/v1/users/alice/factors".into(), None),
        (Method::DELETE, format!("/v1/users/alice/factors/{f}"), None),
        (Method::DELETE, "/v1/users/alice".into(), None),
        (Method::POST, "/v1/users/alice/backup-codes".into(), None),
        (Method::GET, "/v1/users/alice/backup-codes".into(), None),
        (Method::POST, "/v1/users/alice/unlock".into(), None),
        (Method::GET, "/v1/audit".into(), None),
    ];
    for (method, path, body) in &calls {
        // The operator manages tenants, not their users; a verify key only
        // verifies; a node key only replicates.
        for token in [OPERATOR, &verify.secret, &node.secret] {
            if token == OPERATOR && path == "/v1/audit" {
                continue;
            }
            let got = s
                .call(method.clone(), path, Some(token), body.clone())
                .await;
            assert_error(&got, StatusCode::FORBIDDEN, "forbidden");
        }
    }
    // The pending factor is untouched.
    let (status, body) = s.get("/v1/users/alice/factors", &tenant.manage).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["factors"][0]["status"], "pending");
}

async fn the_feed_needs_the_operator_or_a_node_key() {
    let s = TestServer::start().await;
    let tenant = s.tenant("acme").await;
    let verify = s.create_key(&tenant.id, &["verify"]).await;
    let both = s.create_key(&tenant.id, &["manage", "verify"]).await;
    let node = s.create_node_key().await;
    for path in [
        "/v1/feed/snapshot",
        "/v1/feed/changes?after=0",
        "/v1/feed/digest",
    ] {
        for token in [&tenant.manage, &verify.secret, &both.secret] {
            let got = s.get(path, token).await;
            assert_error(&got, StatusCode::FORBIDDEN, "forbidden");
        }
    }
    let (status, digest) = s.get("/v1/feed/digest", &node.secret).await;
    assert_eq!(status, StatusCode::OK, "{digest}");
    let lines = s.snapshot(&node.secret).await;
    assert!(lines.len() >= 2);
    let mut stream = s.changes(&node.secret, 0).await;
    assert!(matches!(
        stream.next_line().await,
        twofold_core::feed::ChangeLine::Heartbeat { .. }
    ));
}

// ----- tenants -----

async fn tenants_are_created_listed_and_shown() {
    let s = TestServer::start().await;
    let (status, created) = s
        .post("/v1/tenants", OPERATOR, json!({"name": "Acme Corp"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().expect("id").to_owned();
    assert!(id.starts_with("tn_"), "{id}");
    assert_eq!(created["name"], "Acme Corp");
    assert_eq!(created["created_at"], "2023-11-14T22:13:20.000Z");
    let other = s.create_tenant("Ünïcødé Ltd").await;

    let (status, list) = s.get("/v1/tenants", OPERATOR).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let ids: BTreeSet<&str> = list["tenants"]
        .as_array()
        .expect("tenants")
        .iter()
        .map(|t| t["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, BTreeSet::from([id.as_str(), other.as_str()]));

    let (status, shown) = s.get(&format!("/v1/tenants/{id}"), OPERATOR).await;
    assert_eq!(status, StatusCode::OK, "{shown}");
    assert_eq!(shown, created);
}

async fn tenant_names_are_validated() {
    let s = TestServer::start().await;
    for name in [
        String::new(),
        "   ".to_owned(),
        "a".repeat(129),
        "é".repeat(65),
        "line\nbreak".to_owned(),
        "nul\0".to_owned(),
        "del\u{7f}".to_owned(),
        "tab\there".to_owned(),
    ] {
        let got = s
            .post("/v1/tenants", OPERATOR, json!({ "name": name }))
            .await;
        assert_error(&got, StatusCode::BAD_REQUEST, "invalid_name");
    }
    s.create_tenant(&"a".repeat(128)).await;
    let (_, list) = s.get("/v1/tenants", OPERATOR).await;
    assert_eq!(list["tenants"].as_array().expect("tenants").len(), 1);
}

async fn unknown_and_malformed_tenants_are_404() {
    let s = TestServer::start().await;
    s.create_tenant("acme").await;
    for tenant in [
        "tn_aaaaaaaaaaaaaaaa",
        "nope",
        "tn_AAAAAAAAAAAAAAAA",
        "tn_",
        "%20",
    ] {
        let got = s.get(&format!("/v1/tenants/{tenant}"), OPERATOR).await;
        assert_error(&got, StatusCode::NOT_FOUND, "not_found");
        let got = s.get(&format!("/v1/tenants/{tenant}/keys"), OPERATOR).await;
        assert_error(&got, StatusCode::NOT_FOUND, "not_found");
        let got = s
            .post(
                &format!("/v1/tenants/{tenant}/keys"),
                OPERATOR,
                json!({"scopes": ["manage"]}),
            )
            .await;
        assert_error(&got, StatusCode::NOT_FOUND, "not_found");
        let got = s
            .delete(
                &format!("/v1/tenants/{tenant}/keys/key_aaaaaaaaaaaaaaaa"),
                OPERATOR,
            )
            .await;
        assert_error(&got, StatusCode::NOT_FOUND, "not_found");
    }
}

async fn bad_bodies_are_refused_in_the_error_format() {
    let s = TestServer::start().await;
    let tenant = s.tenant("acme").await;
    let post = |path: &str, token: &str| s.request(Method::POST, path, Some(token));
    let paths = [
        ("/v1/tenants".to_owned(), OPERATOR.to_owned()),
        (
            format!("/v1/tenants/{}/keys", tenant.id),
            OPERATOR.to_owned(),
        ),
        ("/v1/node-keys".to_owned(), OPERATOR.to_owned()),
    ];
    for (path, token) in &paths {
        // An unknown field.
        let got = send(
            post(path, token).json(&json!({"name": "x", "scopes": ["manage"], "admin": true})),
        )
        .await;
        assert_eq!(got.0, StatusCode::BAD_REQUEST, "{path}");
        assert_error_shape(&got.1);
        assert_eq!(got.1["error"]["code"], "invalid_json", "{path}");
        assert!(
            got.1["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("admin")),
            "{}",
            got.1
        );
        // The wrong content type, and none at all.
        let got = send(
            post(path, token)
                .header("content-type", "text/plain")
                .body(r#"{"name":"x"}"#),
        )
        .await;
        assert_error(
            &got,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        );
        let got = send(post(path, token).body(r#"{"name":"x"}"#)).await;
        assert_error(
            &got,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        );
        // Not JSON, and empty.
        for text in ["{\"name\":", "not json", ""] {
            let got = send(
                post(path, token)
                    .header("content-type", "application/json")
                    .body(text),
            )
            .await;
            assert_error(&got, StatusCode::BAD_REQUEST, "invalid_json");
        }
        // A field of the wrong type: the message says where.
        let got = send(post(path, token).json(&json!({"name": 42, "scopes": "manage"}))).await;
        assert_error(&got, StatusCode::BAD_REQUEST, "invalid_json");
        assert!(
            got.1["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("name: invalid type")),
            "{}",
            got.1
        );
        // Over the 64 KiB limit.
        let big = json!({ "name": "x".repeat(64 * 1024) });
        let got = send(post(path, token).json(&big)).await;
        assert_error(&got, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large");
    }
    // Enrolment takes an optional body; a bad one is refused the same way.
    let enroll = "/v1/users/alice/totp";
    for text in [
        "{\"issuer\":",
        "[]",
        "{\"admin\":true}",
        "{\"digits\":\"six\"}",
    ] {
        let got = send(
            post(enroll, &tenant.manage)
                .header("content-type", "application/json")
                .body(text),
        )
        .await;
        assert_error(&got, StatusCode::BAD_REQUEST, "invalid_json");
    }
    let big = json!({ "issuer": "x".repeat(64 * 1024) });
    let got = send(post(enroll, &tenant.manage).json(&big)).await;
    assert_error(&got, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large");
    // Activation needs its code.
    let factor = s.enroll(&tenant.manage, "alice").await;
    let path = format!("/v1/users/alice/totp/{}/activate", factor.id);
    let got = send(post(&path, &tenant.manage).json(&json!({}))).await;
    assert!(got.0.is_client_error(), "{}", got.0);
    assert_error_shape(&got.1);
    let got = send(post(&path, &tenant.manage).body("123456")).await;
    assert_error(
        &got,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    // Nothing was created by any of it.
    let (_, list) = s.get("/v1/tenants", OPERATOR).await;
    assert_eq!(list["tenants"].as_array().expect("tenants").len(), 1);
    // JSON with parameters, or as a `+json` type, is JSON.
    for content_type in [
        "application/json; charset=utf-8",
        "application/vnd.api+json",
    ] {
        let got = send(
            post("/v1/tenants", OPERATOR)
                .header("content-type", content_type)
                .body(r#"{"name":"typed"}"#),
        )
        .await;
        assert_eq!(got.0, StatusCode::CREATED, "{content_type}: {}", got.1);
    }
}

// ----- keys -----

async fn keys_are_created_listed_and_revoked() {
    let s = TestServer::start().await;
    let tenant = s.create_tenant("acme").await;
    let keys_path = format!("/v1/tenants/{tenant}/keys");
    let (status, created) = s
        .post(
            &keys_path,
            OPERATOR,
            json!({"name": "backend", "scopes": ["verify", "manage", "verify"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().expect("id").to_owned();
    let secret = created["secret"].as_str().expect("secret").to_owned();
    assert!(id.starts_with("key_"), "{id}");
    assert!(secret.starts_with("tfk_") && secret.len() > 40, "{secret}");
    assert_eq!(created["scopes"], json!(["manage", "verify"]));
    assert_eq!(created["tenant"], tenant.as_str());
    assert_eq!(created["name"], "backend");
    assert!(created["revoked_at"].is_null());

    // The secret works, and is never shown again.
    let (status, _) = s.get("/v1/users/nobody/factors", &secret).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let response = s
        .request(Method::GET, &keys_path, Some(OPERATOR))
        .send()
        .await
        .expect("list keys");
    let text = response.text().await.expect("body");
    assert!(!text.contains(&secret), "{text}");
    assert!(!text.contains(&secret["tfk_".len()..]), "{text}");
    let list: Value = serde_json::from_str(&text).expect("json");
    let listed = &list["keys"][0];
    assert!(listed.get("secret").is_none(), "{listed}");
    assert!(listed.get("hash").is_none(), "{listed}");
    assert_eq!(listed["id"], id.as_str());
    assert_eq!(list["keys"].as_array().expect("keys").len(), 1);

    // A key without a name.
    let (status, unnamed) = s
        .post(&keys_path, OPERATOR, json!({"scopes": ["verify"]}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{unnamed}");
    assert_eq!(unnamed["name"], "");

    // Revoke: 204, the key stops working, revoking again is fine.
    let key_path = format!("{keys_path}/{id}");
    for _ in 0..2 {
        let (status, body) = s.delete(&key_path, OPERATOR).await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
        assert!(body.is_null());
        let got = s.get("/v1/users/nobody/factors", &secret).await;
        assert_error(&got, StatusCode::UNAUTHORIZED, "unauthorized");
    }
    let (_, list) = s.get(&keys_path, OPERATOR).await;
    let revoked = list["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .find(|k| k["id"] == id.as_str())
        .expect("revoked key still listed");
    assert_eq!(revoked["revoked_at"], "2023-11-14T22:13:20.000Z");

    // Unknown keys, and keys of another tenant, are not found.
    let other = s.create_tenant("other").await;
    let unnamed_id = unnamed["id"].as_str().expect("id");
    for path in [
        format!("{keys_path}/key_aaaaaaaaaaaaaaaa"),
        format!("{keys_path}/garbage"),
        format!("/v1/tenants/{other}/keys/{unnamed_id}"),
        format!("/v1/node-keys/{unnamed_id}"),
    ] {
        let got = s.delete(&path, OPERATOR).await;
        assert_error(&got, StatusCode::NOT_FOUND, "not_found");
    }
    let (_, list) = s.get(&format!("/v1/tenants/{other}/keys"), OPERATOR).await;
    assert_eq!(list["keys"], json!([]));
}

async fn key_scopes_and_names_are_validated() {
    let s = TestServer::start().await;
    let tenant = s.create_tenant("acme").await;
    let path = format!("/v1/tenants/{tenant}/keys");
    for scopes in [
        json!(["replicate"]),
        json!(["manage", "replicate"]),
        json!(["admin"]),
        json!(["Manage"]),
        json!([]),
    ] {
        let got = s.post(&path, OPERATOR, json!({ "scopes": scopes })).await;
        assert_error(&got, StatusCode::BAD_REQUEST, "invalid_scope");
    }
    for name in ["a".repeat(129), "bad\nname".to_owned(), " ".to_owned()] {
        let got = s
            .post(
                &path,
                OPERATOR,
                json!({ "name": name, "scopes": ["verify"] }),
            )
            .await;
        assert_error(&got, StatusCode::BAD_REQUEST, "invalid_name");
    }
    let (_, list) = s.get(&path, OPERATOR).await;
    assert_eq!(list["keys"], json!([]));
}

async fn node_keys_are_created_listed_and_revoked() {
    let s = TestServer::start().await;
    let tenant = s.tenant("acme").await;
    let (status, created) = s
        .post("/v1/node-keys", OPERATOR, json!({"name": "eu-west-1a"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().expect("id").to_owned();
    let secret = created["secret"].as_str().expect("secret").to_owned();
    assert_eq!(created["scopes"], json!(["replicate"]));
    assert!(created.get("tenant").is_none(), "{created}");

    let (status, list) = s.get("/v1/node-keys", OPERATOR).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let keys = list["keys"].as_array().expect("keys");
    assert_eq!(keys.len(), 1, "tenant keys are not node keys: {list}");
    assert_eq!(keys[0]["id"], id.as_str());
    assert!(keys[0].get("secret").is_none());
    let (_, tenant_keys) = s
        .get(&format!("/v1/tenants/{}/keys", tenant.id), OPERATOR)
        .await;
    assert!(
        tenant_keys["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .all(|k| k["id"] != id.as_str())
    );

    // A node key replicates, but manages nothing.
    let (status, _) = s.get("/v1/feed/digest", &secret).await;
    assert_eq!(status, StatusCode::OK);
    let got = s.get("/v1/users/alice/factors", &secret).await;
    assert_error(&got, StatusCode::FORBIDDEN, "forbidden");

    // Revoked through the tenant route: not found. Through its own: gone.
    let got = s
        .delete(&format!("/v1/tenants/{}/keys/{id}", tenant.id), OPERATOR)
        .await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found");
    for _ in 0..2 {
        let (status, _) = s.delete(&format!("/v1/node-keys/{id}"), OPERATOR).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
    let got = s.get("/v1/feed/digest", &secret).await;
    assert_error(&got, StatusCode::UNAUTHORIZED, "unauthorized");
    let (_, list) = s.get("/v1/node-keys", OPERATOR).await;
    assert_eq!(list["keys"][0]["revoked_at"], "2023-11-14T22:13:20.000Z");

    // A body is optional in content but required in form.
    let (status, unnamed) = s.post("/v1/node-keys", OPERATOR, json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{unnamed}");
}

// ----- TOTP -----

async fn enrolment_has_safe_defaults() {
    let s = TestServer::start().await;
    let tenant = s.tenant("acme").await;
    let factor = s.enroll(&tenant.manage, "alice").await;
    let body = &factor.body;
    assert!(factor.id.starts_with("fa_"), "{body}");
    assert_eq!(body["status"], "pending");
    assert_eq!(body["algorithm"], "SHA1");
    assert_eq!(body["digits"], 6);
    assert_eq!(body["period"], 30);
    assert_eq!(factor.raw.len(), 20, "a SHA-1 secret is 160 bits");
    assert_eq!(body["expires_at"], "2023-11-14T22:23:20.000Z");
    let uri = body["otpauth_uri"].as_str().expect("uri");
    assert!(uri.starts_with("otpauth://totp/Twofold:alice?"), "{uri}");
    assert!(uri.contains(&format!("secret={}", factor.base32)), "{uri}");
    assert!(uri.contains("issuer=Twofold"), "{uri}");
    let svg = body["qr_svg"].as_str().expect("svg");
    assert!(svg.contains("<svg"), "{svg}");
    assert!(body.get("qr_png").is_none());

    // Two enrolments never share a secret.
    let again = s.enroll(&tenant.manage, "alice").await;
    assert_ne!(again.raw, factor.raw);
    assert_ne!(again.id, factor.id);
}

async fn enrolment_takes_parameters() {
    let s = TestServer::start().await;
    let tenant = s.tenant("acme").await;
    let factor = s
        .enroll_with(
            &tenant.manage,
            "alice",
            json!({
                "issuer": "Acme & Co",
                "account": "alice@acme.test",
                "algorithm": "sha256",
                "digits": 8,
                "period": 60,
                "qr": "none",
            }),
        )
        .await;
    let body = &factor.body;
    assert_eq!(body["algorithm"], "SHA256");
    assert_eq!(body["digits"], 8);
    assert_eq!(body["period"], 60);
    assert_eq!(factor.raw.len(), 32);
    assert!(
        body.get("qr_svg").is_none() && body.get("qr_png").is_none(),
        "{body}"
    );
    let uri = body["otpauth_uri"].as_str().expect("uri");
    assert!(
        uri.starts_with("otpauth://totp/Acme%20%26%20Co:alice%40acme.test?"),
        "{uri}"
    );
    for part in ["algorithm=SHA256", "digits=8", "period=60"] {
        assert!(uri.contains(part), "{uri}");
    }
    let code = s.code(&factor);
    assert_eq!(code.len(), 8);
    let (status, active) = s
        .try_activate(&tenant.manage, "alice", &factor.id, &code)
        .await;
    assert_eq!(status, StatusCode::OK, "{active}");
    assert_eq!(active["algorithm"], "SHA256");
    assert_eq!(active["label"], "alice@acme.test");
    assert_eq!(active["issuer"], "Acme & Co");

    let sha512 = s
        .enroll_with(
            &tenant.manage,
            "bob",
            json!({"algorithm": "SHA-512", "digits": 7, "period": 15}),
        )
        .await;
    assert_eq!(sha512.raw.len(), 64);
    s.activate(&tenant.manage, "bob", &sha512).await;
}

async fn qr_codes_come_as_svg_or_png() {
    let s = TestServer::start().await;
    let tenant = s.tenant("acme").await;
    let factor = s
        .enroll_with(&tenant.manage, "alice", json!({"qr": "png"}))
        .await;
    let png = factor.body["qr_png"].as_str().expect("png");
    let bytes = data_encoding::BASE64
        .decode(png.as_bytes())
        .expect("base64");
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "PNG signature");
    assert!(factor.body.get("qr_svg").is_none());
    let factor = s
        .enroll_with(&tenant.manage, "alice", json!({"qr": "svg"}))
        .await;
    assert!(factor.body["qr_svg"].as_str().is_some());
    let got = s
        .try_enroll(&tenant.manage, "alice", json!({"qr": "gif"}))
        .await;
    assert_error(&got, StatusCode::BAD_REQUEST, "invalid_parameter");
}

async fn invalid_totp_parameters_are_400() {
    let s = TestServer::start().await;
    let tenant = s.tenant("acme").await;
    for body in [
        json!({"algorithm": "MD5"}),
        json!({"algorithm": ""}),
        json!({"digits": 5}),
        json!({"digits": 9}),
        json!({"digits": 0}),
        json!({"digits": 262}),
        json!({"period": 0}),
        json!({"period": 14}),
        json!({"period": 301}),
        json!({"issuer": ""}),
        json!({"issuer": "Acme\nCorp"}),
        json!({"issuer": "a".repeat(257)}),
        json!({"account": "al\u{0}ice"}),
        json!({"account": ""}),
    ] {
        let got = s.try_enroll(&tenant.manage, "alice", body.clone()).await;
        assert_error(&got, StatusCode::BAD_REQUEST, "invalid_parameter");
    }
    for body in [
        json!({"digits": -1}),
        json!({"period": 1.5}),
        json!({"digits": "6"}),
    ] {
        let got = s.try_enroll(&tenant.manage, "alice", body).await;
        assert_error(&got, StatusCode::BAD_REQUEST, "invalid_json");
    }
    let got = s.get("/v1/users/alice/factors", &tenant.manage).await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found");
}

async fn user_ids_are_validated() {
    let s = TestServer::start().await;
    let tenant = s.tenant("acme").await;
    for user in [
        "a".repeat(257),
        "bob\n".to_owned(),
        "\u{7}".to_owned(),
        "x\u{7f}".to_owned(),
    ] {
        let got = s.try_enroll(&tenant.manage, &user, Value::Null).await;
        assert_error(&got, StatusCode::BAD_REQUEST, "invalid_user");
        let got = s
            .get(&format!("/v1/users/{}/factors", enc(&user)), &tenant.manage)
            .await;
        assert_error(&got, StatusCode::BAD_REQUEST, "invalid_user");
    }
    // Not UTF-8 once decoded.
    let got = s.get("/v1/users/%FF%FE/factors", &tenant.manage).await;
    assert_eq!(got.0, StatusCode::BAD_REQUEST, "{}", got.1);
    assert_error_shape(&got.1);

    // Any other text is the tenant's business, '/' included.
    for user in [
        "a".repeat(256),
        "team/alice".to_owned(),
        "ünï cødé ?#%".to_owned(),
        "Corp:alice".to_owned(),
        " padded ".to_owned(),
    ] {
        let factor = s.enroll(&tenant.manage, &user).await;
        let (status, body) = s
            .get(&format!("/v1/users/{}/factors", enc(&user)), &tenant.manage)
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["user"], user.as_str());
        assert_eq!(body["factors"][0]["id"], factor.id.as_str());
        s.activate(&tenant.manage, &user, &factor).await;
    }
}

async fn activation_checks_the_code_once() {
    let s = TestServer::start().await;
    let tenant = s.tenant("acme").await;
    let factor = s.enroll(&tenant.manage, "alice").await;
    let now = (START_MS / 1000) as u64;

    let wrong = wrong_code(&factor, now);
    let got = s
        .try_activate(&tenant.manage, "alice", &factor.id, &wrong)
        .await;
    assert_error(&got, StatusCode::UNPROCESSABLE_ENTITY, "invalid_code");
    for malformed in ["abc", "12345", "1234567", "", "12345a", "１２３４５６"] {
        let got = s
            .try_activate(&tenant.manage, "alice", &factor.id, malformed)
            .await;
        assert_error(&got, StatusCode::BAD_REQUEST, "malformed_code");
    }
    for missing in ["fa_aaaaaaaaaaaaaaaa", "garbage"] {
        let got = s
            .try_activate(&tenant.manage, "alice", missing, &s.code(&factor))
            .await;
        assert_error(&got, StatusCode::NOT_FOUND, "not_found");
    }
    // Another user's path does not reach the factor.
    let got = s
        .try_activate(&tenant.manage, "bob", &factor.id, &s.code(&factor))
        .await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found");

    // The code of the previous step is accepted (one step of skew), typed with
    // spaces.
    let previous = totp(&factor.raw, "SHA1", 6, 30, now - 30);
    let spaced = format!("{} {}", &previous[..3], &previous[3..]);
    let (status, active) = s
        .try_activate(&tenant.manage, "alice", &factor.id, &spaced)
        .await;
    assert_eq!(status, StatusCode::OK, "{active}");
    assert_eq!(active["id"], factor.id.as_str());
    assert_eq!(active["type"], "totp");
    assert_eq!(active["status"], "active");
    assert_eq!(active["activated_at"], "2023-11-14T22:13:20.000Z");
    assert!(active.get("expires_at").is_none(), "{active}");
    assert!(active.get("secret").is_none(), "{active}");

    let got = s
        .try_activate(&tenant.manage, "alice", &factor.id, &s.code(&factor))
        .await;
    assert_error(&got, StatusCode::CONFLICT, "factor_already_active");
    let got = s
        .try_activate(&tenant.manage, "alice", &factor.id, &wrong)
        .await;
    assert_error(&got, StatusCode::CONFLICT, "factor_already_active");
}

async fn a_code_two_steps_away_is_refused() {
    let s = TestServer::start().await;
    let tenant = s.tenant("acme").await;
    let factor = s.enroll(&tenant.manage, "alice").await;
    let now = (START_MS / 1000) as u64;
    let near: Vec<String> = [now - 30, now, now + 30]
        .iter()
        .map(|t| totp(&factor.raw, "SHA1", 6, 30, *t))
        .collect();
    for far in [now - 60, now + 60] {
        let code = totp(&factor.raw, "SHA1", 6, 30, far);
        if near.contains(&code) {
            continue;
        }
        let got = s
            .try_activate(&tenant.manage, "alice", &factor.id, &code)
            .await;
        assert_error(&got, StatusCode::UNPROCESSABLE_ENTITY, "invalid_code");
    }
}

async fn pending_factors_expire_after_ten_minutes() {
    let s = TestServer::start().await;
    let tenant = s.tenant("acme").await;
    let first = s.enroll(&tenant.manage, "alice").await;
    let second = s.enroll(&tenant.manage, "alice").await;
    let lonely = s.enroll(&tenant.manage, "bob").await;

    s.advance(Duration::from_secs(10 * 60 - 1));
    s.activate(&tenant.manage, "alice", &first).await;
    s.advance(Duration::from_secs(1));

    let got = s
        .try_activate(&tenant.manage, "alice", &second.id, &s.code(&second))
        .await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found");
    let (status, list) = s.get("/v1/users/alice/factors", &tenant.manage).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let ids: Vec<&str> = list["factors"]
        .as_array()
        .expect("factors")
        .iter()
        .map(|f| f["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, [first.id.as_str()]);

    // A user whose only factor expired is unknown again.
    let got = s
        .try_activate(&tenant.manage, "bob", &lonely.id, &s.code(&lonely))
        .await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found");
    let got = s.get("/v1/users/bob/factors", &tenant.manage).await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found");
}

async fn a_user_holds_at_most_five_factors() {
    let s = TestServer::start().await;
    let tenant = s.tenant("acme").await;
    let mut factors = Vec::new();
    for _ in 0..5 {
        factors.push(s.enroll(&tenant.manage, "alice").await);
    }
    s.activate(&tenant.manage, "alice", &factors[0]).await;
    let got = s.try_enroll(&tenant.manage, "alice", Value::Null).await;
    assert_error(&got, StatusCode::CONFLICT, "too_many_factors");
    // Other users are not affected.
    s.enroll(&tenant.manage, "bob").await;

    // Deleting one makes room.
    let (status, _) = s
        .delete(
            &format!("/v1/users/alice/factors/{}", factors[1].id),
            &tenant.manage,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    s.enroll(&tenant.manage, "alice").await;
    let got = s.try_enroll(&tenant.manage, "alice", Value::Null).await;
    assert_error(&got, StatusCode::CONFLICT, "too_many_factors");

    // Expired pending factors do not count.
    s.advance(Duration::from_secs(10 * 60));
    for _ in 0..4 {
        s.enroll(&tenant.manage, "alice").await;
    }
    let got = s.try_enroll(&tenant.manage, "alice", Value::Null).await;
    assert_error(&got, StatusCode::CONFLICT, "too_many_factors");
    let (_, list) = s.get("/v1/users/alice/factors", &tenant.manage).await;
    assert_eq!(list["factors"].as_array().expect("factors").len(), 5);
}

async fn listing_factors_never_shows_a_secret() {
    let s = TestServer::start().await;
    let tenant = s.tenant("acme").await;
    let active = s.active_factor(&tenant.manage, "alice").await;
    s.advance(Duration::from_millis(1));
    let pending = s
        .enroll_with(&tenant.manage, "alice", json!({"algorithm": "SHA512"}))
        .await;
    let response = s
        .request(Method::GET, "/v1/users/alice/factors", Some(&tenant.manage))
        .send()
        .await
        .expect("list");
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.text().await.expect("body");
    for factor in [&active, &pending] {
        assert!(!text.contains(&factor.base32), "{text}");
        assert!(!text.contains(&factor.base32.to_lowercase()), "{text}");
        assert!(
            !text.contains(&data_encoding::BASE64.encode(&factor.raw)),
            "{text}"
        );
    }
    for word in ["secret", "sealed", "otpauth", "last_step"] {
        assert!(!text.contains(word), "{word} in {text}");
    }
    let list: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(list["user"], "alice");
    assert_eq!(list["locked"], false);
    assert_eq!(list["failures"], 0);
    assert!(list["backup_codes"].is_null());
    let factors = list["factors"].as_array().expect("factors");
    assert_eq!(factors.len(), 2);
    assert_eq!(factors[0]["id"], active.id.as_str());
    assert_eq!(factors[0]["status"], "active");
    assert_eq!(factors[1]["status"], "pending");
    assert_eq!(factors[1]["algorithm"], "SHA512");
    assert_eq!(factors[1]["expires_at"], "2023-11-14T22:23:20.001Z");
}

async fn factors_and_users_are_deleted() {
    let s = TestServer::start().await;
    let tenant = s.tenant("acme").await;
    let key = &tenant.manage;
    let active = s.active_factor(key, "alice").await;
    let pending = s.enroll(key, "alice").await;

    for factor in [&active, &pending] {
        let path = format!("/v1/users/alice/factors/{}", factor.id);
        let (status, body) = s.delete(&path, key).await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
        let got = s.delete(&path, key).await;
        assert_error(&got, StatusCode::NOT_FOUND, "not_found");
    }
    let got = s.delete("/v1/users/alice/factors/garbage", key).await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found");
    let got = s.get("/v1/users/alice/factors", key).await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found");

    // Deleting a user erases factors, backup codes and runtime state.
    s.active_factor(key, "bob").await;
    s.enroll(key, "bob").await;
    s.backup_codes(key, "bob").await;
    let (status, _) = s
        .call(Method::POST, "/v1/users/bob/unlock", Some(key), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = s.delete("/v1/users/bob", key).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    for path in ["/v1/users/bob/factors", "/v1/users/bob/backup-codes"] {
        let got = s.get(path, key).await;
        assert_error(&got, StatusCode::NOT_FOUND, "not_found");
    }
    let got = s
        .call(Method::POST, "/v1/users/bob/unlock", Some(key), None)
        .await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found");
    let got = s.delete("/v1/users/bob", key).await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found");
    let got = s.delete("/v1/users/nobody", key).await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found");
    // A deleted user can start again.
    s.active_factor(key, "bob").await;
}

// ----- backup codes, unlock -----

async fn backup_codes_are_generated_and_replaced() {
    let s = TestServer::start().await;
    let tenant = s.tenant("acme").await;
    let key = &tenant.manage;
    let got = s.get("/v1/users/alice/backup-codes", key).await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found");

    let (status, body) = s
        .call(
            Method::POST,
            "/v1/users/alice/backup-codes",
            Some(key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let first: Vec<String> = body["codes"]
        .as_array()
        .expect("codes")
        .iter()
        .map(|c| c.as_str().expect("code").to_owned())
        .collect();
    let set_id = body["set_id"].as_str().expect("set id").to_owned();
    assert_eq!(first.len(), 10);
    assert_eq!(first.iter().collect::<BTreeSet<_>>().len(), 10, "distinct");
    for code in &first {
        let groups: Vec<&str> = code.split('-').collect();
        assert_eq!(groups.len(), 3, "{code}");
        assert!(groups.iter().all(|g| g.len() == 4), "{code}");
        assert!(
            code.chars()
                .all(|c| c == '-' || (c.is_ascii_alphanumeric() && !c.is_ascii_uppercase())),
            "{code}"
        );
    }
    let (status, summary) = s.get("/v1/users/alice/backup-codes", key).await;
    assert_eq!(status, StatusCode::OK, "{summary}");
    assert_eq!(summary, json!({"remaining": 10, "total": 10}));
    let (_, list) = s.get("/v1/users/alice/factors", key).await;
    assert_eq!(list["backup_codes"], json!({"remaining": 10, "total": 10}));
    assert_eq!(list["factors"], json!([]));

    let (status, again) = s
        .call(
            Method::POST,
            "/v1/users/alice/backup-codes",
            Some(key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_ne!(again["set_id"], set_id.as_str());
    let second: BTreeSet<&str> = again["codes"]
        .as_array()
        .expect("codes")
        .iter()
        .map(|c| c.as_str().expect("code"))
        .collect();
    assert_eq!(second.len(), 10);
    assert!(first.iter().all(|c| !second.contains(c.as_str())));
    let (_, summary) = s.get("/v1/users/alice/backup-codes", key).await;
    assert_eq!(summary, json!({"remaining": 10, "total": 10}));

    let got = s.get("/v1/users/nobody/backup-codes", key).await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found");
    let got = s
        .call(
            Method::POST,
            &format!("/v1/users/{}/backup-codes", "a".repeat(257)),
            Some(key),
            None,
        )
        .await;
    assert_error(&got, StatusCode::BAD_REQUEST, "invalid_user");
}

async fn unlock_needs_a_known_user() {
    let s = TestServer::start().await;
    let tenant = s.tenant("acme").await;
    let key = &tenant.manage;
    let got = s
        .call(Method::POST, "/v1/users/alice/unlock", Some(key), None)
        .await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found");
    s.active_factor(key, "alice").await;
    for _ in 0..2 {
        let (status, body) = s
            .call(Method::POST, "/v1/users/alice/unlock", Some(key), None)
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    }
    let (_, list) = s.get("/v1/users/alice/factors", key).await;
    assert_eq!(list["locked"], false);
    assert_eq!(list["failures"], 0);
}

// ----- audit -----

async fn audit_all(s: &TestServer, token: &str, query: &str) -> Vec<Value> {
    let mut records = Vec::new();
    let mut after = 0;
    loop {
        let (status, page) = s
            .get(&format!("/v1/audit?after={after}&limit=3{query}"), token)
            .await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let got = page["records"].as_array().expect("records");
        assert!(got.len() <= 3);
        records.extend(got.iter().cloned());
        match page["next_after"].as_i64() {
            Some(next) => {
                assert_eq!(got.len(), 3);
                assert_eq!(got.last().expect("a record")["id"], next);
                after = next;
            }
            None => return records,
        }
    }
}

async fn every_change_is_audited_without_secrets() {
    let s = TestServer::start().await;
    let acme = s.create_tenant("acme").await;
    let manage = s.create_key(&acme, &["manage"]).await;
    let verify = s.create_key(&acme, &["verify"]).await;
    let node = s.create_node_key().await;
    let other = s.tenant("other").await;
    let key = &manage.secret;

    let factor = s.enroll(key, "alice").await;
    let activation_code = s.code(&factor);
    let (status, _) = s
        .try_activate(key, "alice", &factor.id, &activation_code)
        .await;
    assert_eq!(status, StatusCode::OK);
    let codes = s.backup_codes(key, "alice").await;
    let spare = s.enroll(key, "alice").await;
    let (status, _) = s
        .delete(&format!("/v1/users/alice/factors/{}", spare.id), key)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = s
        .call(Method::POST, "/v1/users/alice/unlock", Some(key), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    s.active_factor(key, "bob").await;
    let (status, _) = s.delete("/v1/users/bob", key).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = s
        .delete(&format!("/v1/tenants/{acme}/keys/{}", verify.id), OPERATOR)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    s.enroll(&other.manage, "carol").await;
    // Refused calls leave no record.
    let got = s.try_enroll(key, "alice", json!({"digits": 9})).await;
    assert_eq!(got.0, StatusCode::BAD_REQUEST);
    let got = s
        .try_activate(key, "alice", &factor.id, &activation_code)
        .await;
    assert_eq!(got.0, StatusCode::CONFLICT);

    // The operator sees everything, in order, page by page.
    let all = audit_all(&s, OPERATOR, "").await;
    let summary: Vec<(String, String, Option<String>, Option<String>)> = all
        .iter()
        .map(|r| {
            (
                r["actor"].as_str().expect("actor").to_owned(),
                r["action"].as_str().expect("action").to_owned(),
                r["user"].as_str().map(str::to_owned),
                r["target"].as_str().map(str::to_owned),
            )
        })
        .collect();
    let op = "operator".to_owned();
    let by_key = manage.id.clone();
    let some = |s: &str| Some(s.to_owned());
    let expected_prefix = [
        (op.clone(), "tenant.create".to_owned(), None, some(&acme)),
        (
            op.clone(),
            "api_key.create".to_owned(),
            None,
            some(&manage.id),
        ),
        (
            op.clone(),
            "api_key.create".to_owned(),
            None,
            some(&verify.id),
        ),
        (
            op.clone(),
            "api_key.create".to_owned(),
            None,
            some(&node.id),
        ),
    ];
    assert_eq!(summary[..4], expected_prefix[..]);
    let actions: Vec<&str> = summary.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(
        actions,
        [
            "tenant.create",
            "api_key.create",
            "api_key.create",
            "api_key.create",
            "tenant.create",
            "api_key.create",
            "totp.enroll",
            "totp.activate",
            "backup_codes.generate",
            "totp.enroll",
            "totp.delete",
            "user.unlock",
            "totp.enroll",
            "totp.activate",
            "user.delete",
            "api_key.revoke",
            "totp.enroll",
        ]
    );
    assert_eq!(
        summary[7],
        (
            by_key.clone(),
            "totp.activate".to_owned(),
            some("alice"),
            some(&factor.id)
        )
    );
    assert_eq!(summary[10].3, some(&spare.id));
    assert_eq!(
        summary[15],
        (
            op.clone(),
            "api_key.revoke".to_owned(),
            None,
            some(&verify.id)
        )
    );
    let ids: Vec<i64> = all.iter().map(|r| r["id"].as_i64().expect("id")).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    for record in &all {
        assert_eq!(record["at"], "2023-11-14T22:13:20.000Z");
    }
    for record in all.iter().filter(|r| r["user"].is_string()) {
        let tenant = record["tenant"].as_str().expect("tenant of a user record");
        assert!(tenant == acme || tenant == other.id, "{record}");
    }

    // Filters.
    let alice = audit_all(&s, OPERATOR, "&user=alice").await;
    assert_eq!(alice.len(), 6);
    assert!(alice.iter().all(|r| r["user"] == "alice"));
    let of_other = audit_all(&s, OPERATOR, &format!("&tenant={}", other.id)).await;
    assert_eq!(of_other.len(), 3, "{of_other:?}");

    // A tenant's manage key sees its own tenant only, whatever it asks for.
    let own = audit_all(&s, key, "").await;
    assert!(!own.is_empty());
    assert!(own.iter().all(|r| r["tenant"] == acme.as_str()), "{own:?}");
    let sneaky = audit_all(&s, key, &format!("&tenant={}", other.id)).await;
    assert_eq!(sneaky, own);
    let carol = audit_all(&s, key, "&user=carol").await;
    assert!(carol.is_empty());
    let theirs = audit_all(&s, &other.manage, "").await;
    assert!(theirs.iter().all(|r| r["tenant"] == other.id.as_str()));
    assert_eq!(theirs.len(), 3);

    // Bad queries.
    for query in ["limit=0", "limit=1001", "limit=-1", "after=x", "bogus=1"] {
        let got = s.get(&format!("/v1/audit?{query}"), OPERATOR).await;
        assert_error(&got, StatusCode::BAD_REQUEST, "invalid_query");
    }

    // Nothing secret in the log.
    let response = s
        .request(Method::GET, "/v1/audit?limit=1000", Some(OPERATOR))
        .send()
        .await
        .expect("audit");
    let text = response.text().await.expect("body");
    let mut secrets = vec![
        manage.secret.clone(),
        verify.secret.clone(),
        node.secret.clone(),
        other.manage.clone(),
        factor.base32.clone(),
        spare.base32.clone(),
        activation_code.clone(),
        OPERATOR.to_owned(),
    ];
    for code in &codes {
        secrets.push(code.clone());
        secrets.push(code.replace('-', ""));
    }
    for secret in &secrets {
        assert!(!text.contains(secret.as_str()), "{secret} in {text}");
    }
}

// ----- tenant isolation -----

async fn another_tenants_users_look_missing() {
    let s = TestServer::start().await;
    let a = s.tenant("a").await;
    let b = s.tenant("b").await;
    let active = s.active_factor(&b.manage, "bob").await;
    // Factors are listed oldest first; a millisecond apart orders them.
    s.advance(Duration::from_millis(1));
    let pending = s.enroll(&b.manage, "bob").await;
    s.backup_codes(&b.manage, "bob").await;
    // Tenant A has a user "alice" of its own, with a factor, to compare against.
    let own = s.enroll(&a.manage, "alice").await;

    let missing_factor = "fa_aaaaaaaaaaaaaaaa";
    let code = s.code(&pending);
    let checks: Vec<(Method, String, String, Option<Value>)> = vec![
        (
            Method::GET,
            "/v1/users/bob/factors".into(),
            "/v1/users/ghost/factors".into(),
            None,
        ),
        (
            Method::GET,
            "/v1/users/bob/backup-codes".into(),
            "/v1/users/ghost/backup-codes".into(),
            None,
        ),
        (
            Method::POST,
            "/v1/users/bob/unlock".into(),
            "/v1/users/ghost/unlock".into(),
            None,
        ),
        (
            Method::DELETE,
            "/v1/users/bob".into(),
            "/v1/users/ghost".into(),
            None,
        ),
        (
            Method::DELETE,
            format!("/v1/users/bob/factors/{}", active.id),
            format!("/v1/users/ghost/factors/{missing_factor}"),
            None,
        ),
        (
            Method::DELETE,
            format!("/v1/users/alice/factors/{}", active.id),
            format!("/v1/users/alice/factors/{missing_factor}"),
            None,
        ),
        (
            Method::POST,
            format!("/v1/users/bob/totp/{}/activate", pending.id),
            format!("/v1/users/ghost/totp/{missing_factor}/activate"),
            Some(json!({ "code": code })),
        ),
        (
            Method::POST,
            format!("/v1/users/alice/totp/{}/activate", pending.id),
            format!("/v1/users/alice/totp/{missing_factor}/activate"),
            Some(json!({ "code": code })),
        ),
    ];
    for (method, theirs, missing, body) in &checks {
        let got = s
            .call(method.clone(), theirs, Some(&a.manage), body.clone())
            .await;
        let expected = s
            .call(method.clone(), missing, Some(&a.manage), body.clone())
            .await;
        assert_eq!(got.0, StatusCode::NOT_FOUND, "{method} {theirs}: {}", got.1);
        assert_eq!(got, expected, "{method} {theirs}");
    }

    // B's user is untouched.
    let (status, list) = s.get("/v1/users/bob/factors", &b.manage).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let statuses: Vec<&str> = list["factors"]
        .as_array()
        .expect("factors")
        .iter()
        .map(|f| f["status"].as_str().expect("status"))
        .collect();
    assert_eq!(statuses, ["active", "pending"]);
    assert_eq!(list["backup_codes"]["total"], 10);
    s.activate(&b.manage, "bob", &pending).await;
    s.activate(&a.manage, "alice", &own).await;
}

// ----- routes and operations -----

async fn unknown_routes_and_methods_answer_in_json() {
    let s = TestServer::start().await;
    for path in ["/", "/v1", "/v1/nothing", "/v2/tenants", "/v1/users/alice"] {
        let got = s.get(path, OPERATOR).await;
        if path == "/v1/users/alice" {
            assert_error(&got, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
        } else {
            assert_error(&got, StatusCode::NOT_FOUND, "not_found");
        }
    }
    let got = s.call(Method::GET, "/nowhere", None, None).await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found");
    for (method, path) in [
        (Method::PUT, "/v1/tenants"),
        (Method::DELETE, "/v1/tenants"),
        (Method::POST, "/healthz"),
        (Method::GET, "/v1/users/alice/totp"),
        (Method::PATCH, "/v1/node-keys"),
        (Method::POST, "/v1/feed/snapshot"),
        (Method::GET, "/v1/users/alice/unlock"),
    ] {
        let got = s.call(method.clone(), path, Some(OPERATOR), None).await;
        assert_error(&got, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    }
}

async fn health_readiness_and_metrics() {
    let s = TestServer::start().await;
    let (status, body) = s.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "ok");
    let (status, body) = s.call(Method::GET, "/readyz", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "ready");
    assert_eq!(body["head_seq"], 0);

    let tenant = s.tenant("acme").await;
    s.active_factor(&tenant.manage, "secret-user-name").await;
    let (_, body) = s.call(Method::GET, "/readyz", None, None).await;
    assert_eq!(body["head_seq"], 2);

    let response = s
        .request(Method::GET, "/metrics", None)
        .send()
        .await
        .expect("metrics");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/plain"))
    );
    let text = response.text().await.expect("body");
    assert!(text.contains("twofold_control_http_requests"), "{text}");
    assert!(text.contains("twofold_control_feed_head_seq 2"), "{text}");
    assert!(text.contains("route=\"/v1/users/{user}/totp\""), "{text}");
    // Routes are counted by template, so a user id never becomes a label.
    assert!(!text.contains("secret-user-name"), "{text}");
}

// ----- races -----

async fn concurrent_activations_succeed_once() {
    let s = std::sync::Arc::new(TestServer::start().await);
    let tenant = s.tenant("acme").await;
    let factor = s.enroll(&tenant.manage, "alice").await;
    let code = s.code(&factor);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (s, key, id, code) = (
                s.clone(),
                tenant.manage.clone(),
                factor.id.clone(),
                code.clone(),
            );
            tokio::spawn(async move { s.try_activate(&key, "alice", &id, &code).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for task in tasks {
        let got = task.await.expect("task");
        if got.0 != StatusCode::OK {
            assert_error(&got, StatusCode::CONFLICT, "factor_already_active");
        }
        statuses.push(got.0);
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == StatusCode::OK).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(s.head().await, 2, "one tenant, one activation");
}

async fn concurrent_enrolments_respect_the_limit() {
    let s = std::sync::Arc::new(TestServer::start().await);
    let tenant = s.tenant("acme").await;
    let tasks: Vec<_> = (0..12)
        .map(|_| {
            let (s, key) = (s.clone(), tenant.manage.clone());
            tokio::spawn(async move { s.try_enroll(&key, "alice", Value::Null).await })
        })
        .collect();
    let mut created = 0;
    for task in tasks {
        let got = task.await.expect("task");
        if got.0 == StatusCode::CREATED {
            created += 1;
        } else {
            assert_error(&got, StatusCode::CONFLICT, "too_many_factors");
        }
    }
    assert_eq!(created, 5);
    let (_, list) = s.get("/v1/users/alice/factors", &tenant.manage).await;
    assert_eq!(list["factors"].as_array().expect("factors").len(), 5);
}

async fn enrolment_body_must_be_json_when_present() {
    let server = TestServer::start().await;
    let tenant = server.tenant("acme").await;
    let path = format!("/v1/users/{}/totp", enc("alice"));
    let got = send(
        server
            .request(Method::POST, &path, Some(&tenant.manage))
            .header("content-type", "text/plain")
            .body(r#"{"digits": 8}"#),
    )
    .await;
    assert_error(
        &got,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    // No body at all enrols with the defaults.
    let got = send(server.request(Method::POST, &path, Some(&tenant.manage))).await;
    assert_eq!(got.0, StatusCode::CREATED, "{}", got.1);
    assert_eq!(got.1["digits"], 6);
}

async fn five_wrong_activation_codes_cancel_the_enrolment() {
    let server = TestServer::start().await;
    let tenant = server.tenant("acme").await;
    let factor = server.enroll(&tenant.manage, "alice").await;
    let wrong = wrong_code(&factor, (server.now_ms() / 1000) as u64);
    for attempt in 1..=5 {
        let got = server
            .try_activate(&tenant.manage, "alice", &factor.id, &wrong)
            .await;
        let expected = if attempt < 5 {
            "invalid_code"
        } else {
            "too_many_wrong_codes"
        };
        assert_error(&got, StatusCode::UNPROCESSABLE_ENTITY, expected);
    }
    // The right code no longer helps: the pending factor is gone.
    let right = server.code(&factor);
    let got = server
        .try_activate(&tenant.manage, "alice", &factor.id, &right)
        .await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found");
    // A fresh enrolment works as usual.
    server.active_factor(&tenant.manage, "alice").await;
}

async fn names_too_long_for_a_qr_code_are_a_bad_request() {
    let server = TestServer::start().await;
    let tenant = server.tenant("acme").await;
    let long = "€".repeat(85);
    let (status, body) = server
        .try_enroll(
            &tenant.manage,
            "alice",
            json!({"issuer": long, "account": long}),
        )
        .await;
    assert_error(
        &(status, body),
        StatusCode::BAD_REQUEST,
        "invalid_parameter",
    );
}
