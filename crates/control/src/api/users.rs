//! A tenant's users: TOTP enrolment and activation, backup codes, listing,
//! deletion and unlocking. Callers are keys with the `manage` scope; the tenant is
//! always the key's own.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use data_encoding::BASE64;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use twofold_core::backup::BackupCodes;
use twofold_core::ids::{FactorId, Scope, UserId};
use twofold_core::otp::{self, Algorithm, Digits, Period, Skew, TotpParams, Verdict};
use twofold_core::qr;
use twofold_core::seal::{Binding, Sealed};
use twofold_core::secret::Secret;
use twofold_core::uri::{KeyUri, Kind};
use utoipa::ToSchema;

use super::openapi::ErrorBody;
use super::{ApiJson, ApiPath};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::{AppState, rfc3339};
use crate::store::{Actor, FactorRow, FactorStatus};

fn user_id(raw: String) -> Result<UserId, ApiError> {
    UserId::try_new(raw).map_err(|e| ApiError::bad_request("invalid_user", e.to_string()))
}

/// The user a `manage` key acts on: the key's tenant, the validated user id, who
/// acts, and when.
struct Target {
    tenant: String,
    user: UserId,
    actor: Actor,
    now: i64,
}

fn target(state: &AppState, caller: &Caller, user: String) -> Result<Target, ApiError> {
    Ok(Target {
        tenant: caller.tenant_with(Scope::Manage)?.to_owned(),
        user: user_id(user)?,
        actor: caller.actor(),
        now: state.clock.now_ms(),
    })
}

/// Long issuer and account names can make a URI too long for a QR code: that is
/// the caller's input, not a server fault.
fn qr_error(e: qr::QrError) -> ApiError {
    match e {
        qr::QrError::TooLong => ApiError::bad_request(
            "invalid_parameter",
            "issuer and account are too long to fit in a QR code; shorten them or ask for qr: none",
        ),
        other => ApiError::internal(other),
    }
}

/// Wrong codes a pending factor takes before it is dropped: enough for a
/// mistyped code or a clock a step off, far too few to guess a 6-digit code.
const MAX_ACTIVATION_FAILURES: u32 = 5;

/// A factor id from the path; a malformed one is as missing as an unknown one.
fn factor_id(raw: &str) -> Result<FactorId, ApiError> {
    raw.parse().map_err(|_| ApiError::not_found("factor"))
}

/// A JSON body that may be left out entirely; when present it must be sent as
/// JSON, as on every other route.
fn optional_json<T: DeserializeOwned + Default>(
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Expected request with `Content-Type: application/json`",
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("invalid request body: {e}")))
}

/// Every field is optional, and so is the whole body.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Enroll {
    /// Shown in the authenticator app; the server's default issuer if absent.
    issuer: Option<String>,
    /// Shown in the authenticator app; the user id if absent.
    account: Option<String>,
    /// `SHA1` (the default), `SHA256` or `SHA512`.
    algorithm: Option<String>,
    /// 6 (the default) to 8.
    #[schema(minimum = 6, maximum = 8)]
    digits: Option<u32>,
    /// Seconds per code; 30 by default.
    #[schema(minimum = 15, maximum = 300)]
    period: Option<u32>,
    /// `svg` (the default), `png` (base64) or `none`.
    qr: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Enrolled {
    factor_id: String,
    status: &'static str,
    secret: String,
    otpauth_uri: String,
    algorithm: &'static str,
    digits: u8,
    period: u32,
    expires_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    qr_svg: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    qr_png: Option<String>,
}

fn params_of(body: &Enroll) -> Result<TotpParams, ApiError> {
    let bad = |e: otp::ParamError| ApiError::bad_request("invalid_parameter", e.to_string());
    let mut params = TotpParams::default();
    if let Some(a) = &body.algorithm {
        params.algorithm = a.parse::<Algorithm>().map_err(bad)?;
    }
    if let Some(d) = body.digits {
        let d = u8::try_from(d).map_err(|_| bad(otp::ParamError::Digits))?;
        params.digits = Digits::try_new(d).map_err(bad)?;
    }
    if let Some(p) = body.period {
        params.period = Period::try_new(p).map_err(bad)?;
    }
    Ok(params)
}

#[utoipa::path(
    post,
    path = "/v1/users/{user}/totp",
    tag = "users",
    operation_id = "enroll_totp",
    security(("bearer" = [])),
    params(("user" = String, Path, description = "the user, as the tenant names it")),
    // A reference rather than `Option<Enroll>`, which would offer `null`: the body
    // is either absent or an object. `openapi.rs` registers the schema.
    request_body(
        content = ref("#/components/schemas/Enroll"),
        description = "optional; an empty body takes every default",
        content_type = "application/json",
    ),
    responses(
        (status = 201, description = "a pending factor; activate it with a code within the pending TTL", body = Enrolled),
        (status = 400, description = "invalid_user, invalid_parameter or invalid_json", body = ErrorBody),
        (status = 401, description = "missing or invalid credentials", body = ErrorBody),
        (status = 403, description = "the caller is not a key with the `manage` scope", body = ErrorBody),
        (status = 409, description = "too_many_factors", body = ErrorBody),
        (status = 413, description = "body_too_large", body = ErrorBody),
    ),
)]
pub async fn enroll(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(user): ApiPath<String>,
    headers: HeaderMap,
    // Taken as a `Result` so an oversized body answers in the API's error format.
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Enrolled>), ApiError> {
    let tenant = caller.tenant_with(Scope::Manage)?.to_owned();
    let user = user_id(user)?;
    let body: Enroll = optional_json(&headers, &body?)?;
    let params = params_of(&body)?;
    let qr_format = body.qr.as_deref().unwrap_or("svg");
    if !["svg", "png", "none"].contains(&qr_format) {
        return Err(ApiError::bad_request(
            "invalid_parameter",
            "qr must be svg, png or none",
        ));
    }
    let issuer = body
        .issuer
        .clone()
        .unwrap_or_else(|| state.config.default_issuer.clone());
    // A user id may carry spaces at its ends, which an account name may not.
    let account = body
        .account
        .clone()
        .unwrap_or_else(|| user.as_str().trim().to_owned());
    let secret = Secret::generate(params.algorithm).map_err(ApiError::internal)?;
    let uri = KeyUri::try_new(
        Some(issuer.clone()),
        account.clone(),
        secret.clone(),
        Kind::Totp(params),
    )
    .map_err(|e| ApiError::bad_request("invalid_parameter", e.to_string()))?;
    let id = FactorId::generate().map_err(ApiError::internal)?;
    let binding = Binding {
        tenant: &tenant,
        user: user.as_str(),
        factor: id.as_str(),
    };
    let sealed = state
        .config
        .keyring
        .seal_secret(&secret, &binding)
        .map_err(ApiError::internal)?;
    let uri_text = uri.to_uri();
    let (qr_svg, qr_png) = match qr_format {
        "svg" => (Some(qr::svg(&uri_text).map_err(qr_error)?), None),
        "png" => (
            None,
            Some(BASE64.encode(&qr::png(&uri_text).map_err(qr_error)?)),
        ),
        _ => (None, None),
    };

    let now = state.clock.now_ms();
    let expires = now + state.config.pending_ttl.as_millis() as i64;
    let row = FactorRow {
        id: id.to_string(),
        tenant,
        user: user.to_string(),
        label: account,
        issuer: Some(issuer),
        algorithm: params.algorithm.as_str().to_owned(),
        digits: params.digits.get(),
        period: params.period.seconds(),
        sealed: sealed.into_bytes(),
        status: FactorStatus::Pending,
        created_ms: now,
        expires_ms: Some(expires),
        activated_ms: None,
        last_step: None,
    };
    let actor = caller.actor();
    let max = state.config.max_totp_factors;
    state
        .blocking(move |s| Ok(s.store.insert_pending_totp(now, &actor, &row, max)?))
        .await?;
    tracing::info!(tenant = %caller.tenant_with(Scope::Manage)?, factor = %id, "totp factor enrolled");
    Ok((
        StatusCode::CREATED,
        Json(Enrolled {
            factor_id: id.to_string(),
            status: "pending",
            secret: secret.to_base32(),
            otpauth_uri: uri_text,
            algorithm: params.algorithm.as_str(),
            digits: params.digits.get(),
            period: params.period.seconds(),
            expires_at: rfc3339(expires),
            qr_svg,
            qr_png,
        }),
    ))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Activate {
    /// The current code from the authenticator app.
    #[schema(example = "123456")]
    code: String,
}

impl std::fmt::Debug for Activate {
    /// The code never appears in debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Activate { code: <redacted> }")
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Factor {
    id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    status: &'static str,
    label: String,
    issuer: Option<String>,
    algorithm: String,
    digits: u8,
    period: u32,
    created_at: String,
    activated_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<String>,
}

impl From<FactorRow> for Factor {
    fn from(row: FactorRow) -> Factor {
        Factor {
            id: row.id,
            kind: "totp",
            status: match row.status {
                FactorStatus::Active => "active",
                FactorStatus::Pending => "pending",
            },
            label: row.label,
            issuer: row.issuer,
            algorithm: row.algorithm,
            digits: row.digits,
            period: row.period,
            created_at: rfc3339(row.created_ms),
            activated_at: row.activated_ms.map(rfc3339),
            expires_at: row.expires_ms.map(rfc3339),
        }
    }
}

/// TOTP parameters of a stored factor; rows are only written from valid ones.
fn stored_params(row: &FactorRow) -> Result<TotpParams, ApiError> {
    Ok(TotpParams {
        algorithm: row.algorithm.parse().map_err(ApiError::internal)?,
        digits: Digits::try_new(row.digits).map_err(ApiError::internal)?,
        period: Period::try_new(row.period).map_err(ApiError::internal)?,
    })
}

#[utoipa::path(
    post,
    path = "/v1/users/{user}/totp/{factor}/activate",
    tag = "users",
    operation_id = "activate_totp",
    security(("bearer" = [])),
    params(("user" = String, Path, description = "the user, as the tenant names it"),
        ("factor" = String, Path, description = "factor id"),
    ),
    request_body = Activate,
    responses(
        (status = 200, description = "the factor is active", body = Factor),
        (status = 400, description = "invalid_user, malformed_code or invalid_json", body = ErrorBody),
        (status = 401, description = "missing or invalid credentials", body = ErrorBody),
        (status = 403, description = "the caller is not a key with the `manage` scope", body = ErrorBody),
        (status = 404, description = "no such factor, or its enrolment expired", body = ErrorBody),
        (status = 409, description = "factor_already_active", body = ErrorBody),
        (status = 413, description = "body_too_large", body = ErrorBody),
        (status = 415, description = "the body is not declared as application/json", body = ErrorBody),
        (status = 422, description = "invalid_code; too_many_wrong_codes when the fifth wrong code cancels the enrolment", body = ErrorBody),
    ),
)]
pub async fn activate(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((user, factor)): ApiPath<(String, String)>,
    ApiJson(body): ApiJson<Activate>,
) -> Result<Json<Factor>, ApiError> {
    let tenant = caller.tenant_with(Scope::Manage)?.to_owned();
    let user = user_id(user)?;
    let factor = factor_id(&factor)?;
    let now = state.clock.now_ms();
    let row = {
        let (tenant, user, factor) = (tenant.clone(), user.clone(), factor.clone());
        state
            .blocking(move |s| Ok(s.store.factor(&tenant, user.as_str(), factor.as_str())?))
            .await?
    };
    match row.status {
        FactorStatus::Active => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "factor_already_active",
                "the factor is already active",
            ));
        }
        FactorStatus::Pending if row.expires_ms.is_some_and(|e| e <= now) => {
            return Err(ApiError::not_found("factor"));
        }
        FactorStatus::Pending => {}
    }
    let params = stored_params(&row)?;
    let sealed = Sealed::from_bytes(&row.sealed).map_err(ApiError::internal)?;
    let binding = Binding {
        tenant: &tenant,
        user: user.as_str(),
        factor: factor.as_str(),
    };
    let secret = state
        .config
        .keyring
        .open_secret(&sealed, &binding)
        .map_err(ApiError::internal)?;
    let step = match otp::verify_totp(
        &secret,
        &body.code,
        (now / 1000) as u64,
        params,
        Skew::default(),
        None,
    ) {
        Verdict::Valid { step } => step,
        Verdict::Invalid => {
            let limit = MAX_ACTIVATION_FAILURES;
            let (actor, tenant, user, factor) =
                (caller.actor(), tenant.clone(), user.clone(), factor.clone());
            let dropped = state
                .blocking(move |s| {
                    Ok(s.store.fail_activation(
                        now,
                        &actor,
                        &tenant,
                        user.as_str(),
                        factor.as_str(),
                        limit,
                    )?)
                })
                .await?;
            return Err(if dropped {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "too_many_wrong_codes",
                    "too many wrong codes: the enrolment is cancelled; enrol again",
                )
            } else {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_code",
                    "the code does not match; check the device's clock and try the current code",
                )
            });
        }
        Verdict::Malformed => {
            return Err(ApiError::bad_request(
                "malformed_code",
                format!("the code must be {} digits", params.digits.get()),
            ));
        }
    };
    let actor = caller.actor();
    let row = state
        .blocking(move |s| {
            Ok(s.store
                .activate_totp(now, &actor, &tenant, user.as_str(), factor.as_str(), step)?)
        })
        .await?;
    tracing::info!(factor = %row.id, "totp factor activated");
    Ok(Json(row.into()))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BackupSummary {
    remaining: usize,
    total: usize,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UserFactors {
    user: String,
    factors: Vec<Factor>,
    backup_codes: Option<BackupSummary>,
    locked: bool,
    failures: u32,
}

#[utoipa::path(
    get,
    path = "/v1/users/{user}/factors",
    tag = "users",
    security(("bearer" = [])),
    params(("user" = String, Path, description = "the user, as the tenant names it")),
    responses(
        (status = 200, description = "the user's factors, backup codes and lock state", body = UserFactors),
        (status = 400, description = "invalid_user", body = ErrorBody),
        (status = 401, description = "missing or invalid credentials", body = ErrorBody),
        (status = 403, description = "the caller is not a key with the `manage` scope", body = ErrorBody),
        (status = 404, description = "the user has no factors and no backup codes", body = ErrorBody),
    ),
)]
pub async fn list_factors(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(user): ApiPath<String>,
) -> Result<Json<UserFactors>, ApiError> {
    let tenant = caller.tenant_with(Scope::Manage)?.to_owned();
    let user = user_id(user)?;
    let now = state.clock.now_ms();
    let (factors, backup, user_state) = {
        let user = user.clone();
        state
            .blocking(move |s| {
                let factors = s.store.list_factors(now, &tenant, user.as_str())?;
                let backup = s.store.backup_summary(&tenant, user.as_str())?;
                let user_state = s.store.user_state(&tenant, user.as_str())?;
                Ok((factors, backup, user_state))
            })
            .await?
    };
    if factors.is_empty() && backup.is_none() {
        return Err(ApiError::not_found("user"));
    }
    Ok(Json(UserFactors {
        user: user.to_string(),
        factors: factors.into_iter().map(Factor::from).collect(),
        backup_codes: backup.map(|b| BackupSummary {
            remaining: b.remaining,
            total: b.total,
        }),
        locked: user_state.locked,
        failures: user_state.all_failures(),
    }))
}

#[utoipa::path(
    delete,
    path = "/v1/users/{user}/factors/{factor}",
    tag = "users",
    security(("bearer" = [])),
    params(("user" = String, Path, description = "the user, as the tenant names it"),
        ("factor" = String, Path, description = "factor id"),
    ),
    responses(
        (status = 204, description = "the factor is deleted"),
        (status = 400, description = "invalid_user", body = ErrorBody),
        (status = 401, description = "missing or invalid credentials", body = ErrorBody),
        (status = 403, description = "the caller is not a key with the `manage` scope", body = ErrorBody),
        (status = 404, description = "no such factor", body = ErrorBody),
    ),
)]
pub async fn delete_factor(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((user, factor)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let t = target(&state, &caller, user)?;
    let factor = factor_id(&factor)?;
    state
        .blocking(move |s| {
            Ok(s.store.delete_factor(
                t.now,
                &t.actor,
                &t.tenant,
                t.user.as_str(),
                factor.as_str(),
            )?)
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    delete,
    path = "/v1/users/{user}",
    tag = "users",
    security(("bearer" = [])),
    params(("user" = String, Path, description = "the user, as the tenant names it")),
    responses(
        (status = 204, description = "the user's factors, backup codes and state are deleted"),
        (status = 400, description = "invalid_user", body = ErrorBody),
        (status = 401, description = "missing or invalid credentials", body = ErrorBody),
        (status = 403, description = "the caller is not a key with the `manage` scope", body = ErrorBody),
        (status = 404, description = "no such user", body = ErrorBody),
    ),
)]
pub async fn delete_user(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(user): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let t = target(&state, &caller, user)?;
    state
        .blocking(move |s| {
            Ok(s.store
                .delete_user(t.now, &t.actor, &t.tenant, t.user.as_str())?)
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A new set of backup codes: the only time the codes are shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct NewBackupCodes {
    set_id: String,
    codes: Vec<String>,
}

#[utoipa::path(
    post,
    path = "/v1/users/{user}/backup-codes",
    tag = "users",
    security(("bearer" = [])),
    params(("user" = String, Path, description = "the user, as the tenant names it")),
    responses(
        (status = 201, description = "a new set replaces any earlier one; the codes are shown only now", body = NewBackupCodes),
        (status = 400, description = "invalid_user", body = ErrorBody),
        (status = 401, description = "missing or invalid credentials", body = ErrorBody),
        (status = 403, description = "the caller is not a key with the `manage` scope", body = ErrorBody),
    ),
)]
pub async fn generate_backup_codes(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(user): ApiPath<String>,
) -> Result<(StatusCode, Json<NewBackupCodes>), ApiError> {
    let t = target(&state, &caller, user)?;
    let codes = BackupCodes::generate().map_err(ApiError::internal)?;
    let hashes = codes.hashes(state.config.keyring.hash_key());
    let set_id = FactorId::generate()
        .map_err(ApiError::internal)?
        .to_string();
    let id = set_id.clone();
    state
        .blocking(move |s| {
            let user = t.user.as_str();
            Ok(s.store
                .replace_backup_codes(t.now, &t.actor, &t.tenant, user, &id, hashes)?)
        })
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(NewBackupCodes {
            set_id,
            codes: codes
                .as_slice()
                .iter()
                .map(|c| c.expose().to_owned())
                .collect(),
        }),
    ))
}

#[utoipa::path(
    get,
    path = "/v1/users/{user}/backup-codes",
    tag = "users",
    security(("bearer" = [])),
    params(("user" = String, Path, description = "the user, as the tenant names it")),
    responses(
        (status = 200, description = "how many of the user's backup codes are left", body = BackupSummary),
        (status = 400, description = "invalid_user", body = ErrorBody),
        (status = 401, description = "missing or invalid credentials", body = ErrorBody),
        (status = 403, description = "the caller is not a key with the `manage` scope", body = ErrorBody),
        (status = 404, description = "the user has no backup codes", body = ErrorBody),
    ),
)]
pub async fn backup_codes_summary(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(user): ApiPath<String>,
) -> Result<Json<BackupSummary>, ApiError> {
    let tenant = caller.tenant_with(Scope::Manage)?.to_owned();
    let user = user_id(user)?;
    let summary = state
        .blocking(move |s| Ok(s.store.backup_summary(&tenant, user.as_str())?))
        .await?
        .ok_or_else(|| ApiError::not_found("backup codes"))?;
    Ok(Json(BackupSummary {
        remaining: summary.remaining,
        total: summary.total,
    }))
}

#[utoipa::path(
    post,
    path = "/v1/users/{user}/unlock",
    tag = "users",
    operation_id = "unlock_user",
    security(("bearer" = [])),
    params(("user" = String, Path, description = "the user, as the tenant names it")),
    responses(
        (status = 204, description = "the user's failures, throttle and lock are cleared"),
        (status = 400, description = "invalid_user", body = ErrorBody),
        (status = 401, description = "missing or invalid credentials", body = ErrorBody),
        (status = 403, description = "the caller is not a key with the `manage` scope", body = ErrorBody),
        (status = 404, description = "no such user", body = ErrorBody),
    ),
)]
pub async fn unlock(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(user): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let t = target(&state, &caller, user)?;
    state
        .blocking(move |s| {
            Ok(s.store
                .unlock_user(t.now, &t.actor, &t.tenant, t.user.as_str())?)
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
