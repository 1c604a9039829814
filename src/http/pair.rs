//! `/pair`: start or join a pairing session, read it, refresh its code,
//! cancel it.

use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use time::OffsetDateTime;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Caller;
use super::error::{ErrorBody, set_retry_after};
use super::extract::{ApiJson, PhoneParam, PhonePath};
use super::limits::ClientIp;
use super::{ApiError, AppState};
use crate::phone::PhoneNumber;
use crate::session::{Actor, Joined, Owner, PairState, Reason, Status};

/// `Retry-After` for a session still connecting with nothing to report yet.
pub const STARTING_RETRY_AFTER: Duration = Duration::from_secs(2);

/// The `/pair` routes, each with its description.
pub fn routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(routes!(create))
        .routes(routes!(show, cancel))
        .routes(routes!(refresh))
        .routes(routes!(validate_phone))
}

/// `GET /validate-phone` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ValidatePhone {
    /// The number as typed, e.g. `+62 812-345-6789`.
    #[serde(default)]
    phone: String,
}

/// `GET /validate-phone` answer.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ValidPhone {
    /// The canonical number, as `POST /pair` takes it.
    #[schema(example = "628123456789")]
    phone: String,
}

/// Checks a number as typed, with the same rules as `POST /pair`, and
/// nothing else: no session starts. For forms that validate as people type.
#[utoipa::path(
    get,
    path = "/validate-phone",
    tag = "pairing",
    params(ValidatePhone),
    responses(
        (status = 200, description = "The number is canonical", body = ValidPhone),
        (status = 422, description = "`invalid_phone`, with `suggestion` when one is likely", body = ErrorBody),
    ),
    security((), ("bearer" = [])),
)]
async fn validate_phone(
    axum::extract::Query(query): axum::extract::Query<ValidatePhone>,
) -> Result<Json<ValidPhone>, ApiError> {
    let phone = PhoneNumber::parse(&query.phone).map_err(ApiError::InvalidPhone)?;
    Ok(Json(ValidPhone {
        phone: phone.as_str().to_owned(),
    }))
}

/// `POST /pair` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PairRequest {
    /// Digits only, country code first, no `+`.
    #[schema(pattern = r"^[1-9][0-9]{7,14}$", example = "628123456789")]
    phone: String,
    /// Link the number again although a device is linked for it already
    /// (the old device's credentials are set aside). Server callers only.
    #[serde(default)]
    force: bool,
}

/// What the registry knows of `caller`: users are held to their own
/// sessions and `PAIR_SESSIONS_PER_USER` of them; server callers (and
/// everyone, when no caller is configured) act on any. Anonymous callers
/// from a non-loopback address (`ALLOW_UNAUTHENTICATED=true`) have the
/// users' cap per address, so one address cannot take the service-wide
/// cap; on loopback (a developer, the tests) only the service-wide cap
/// holds.
pub(super) fn actor(app: &AppState, caller: &Caller, client: Option<ClientIp>) -> Actor {
    match caller {
        Caller::User { id } => Actor::restricted(Owner::user(id), app.sessions_per_user),
        Caller::Server { key_id } => Actor::trusted(Owner::server(key_id)),
        Caller::Anonymous => match client {
            Some(ClientIp(ip)) if !ip.is_loopback() => {
                Actor::counted(Owner::client(ip), app.sessions_per_user)
            }
            _ => Actor::trusted(Owner::anonymous()),
        },
    }
}

/// Starts (or joins) the phone's session and answers with its first code,
/// waiting up to `PAIR_CODE_WAIT_SECS` for it.
#[utoipa::path(
    post,
    path = "/pair",
    tag = "pairing",
    request_body = PairRequest,
    responses(
        (status = 201, description = "A new session, with its first code", body = PairState),
        (status = 200, description = "The phone's session was open already (joined), or has just ended", body = PairState),
        (status = 202, description = "No code yet (WhatsApp is slow, or a retry is scheduled); `Retry-After` says when to look again with GET", body = PairState),
        (status = 400, description = "`invalid_json`", body = ErrorBody),
        (status = 403, description = "`forbidden` (`force` from a signed-in user) or `whatsapp_forbidden`", body = ErrorBody),
        (status = 409, description = "`already_linked` or `session_ended`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody),
        (status = 422, description = "`invalid_phone` (with `suggestion` when one is likely) or `pairing_unavailable`", body = ErrorBody),
        (status = 429, description = "`rate_limited`, `code_budget_exhausted` or `too_many_sessions` (`Retry-After`)", body = ErrorBody),
        (status = 503, description = "`whatsapp_unavailable`, `store_unavailable`, `shutting_down`, `busy` or `at_capacity` (`Retry-After`)", body = ErrorBody),
    ),
    security((), ("bearer" = [])),
)]
async fn create(
    State(app): State<Arc<AppState>>,
    caller: Caller,
    client: Option<Extension<ClientIp>>,
    ApiJson(request): ApiJson<PairRequest>,
) -> Result<Response, ApiError> {
    let started = std::time::Instant::now();
    let phone = PhoneNumber::parse(&request.phone).map_err(ApiError::InvalidPhone)?;
    let actor = actor(&app, &caller, client.map(|Extension(ip)| ip));
    if request.force && !actor.sees_all {
        tracing::warn!(phone = %phone, "a user asked to force a re-link; only server callers may");
        return Err(ApiError::Forbidden);
    }
    let (joined, mut states) = app
        .sessions
        .start_or_join(&phone, &actor, request.force)
        .await?;
    // Something worth answering: a code, an outcome, or a failed attempt.
    let _ = tokio::time::timeout(
        app.code_wait,
        states.wait_for(|s| s.status != Status::Starting || s.retry_at.is_some()),
    )
    .await;
    let state = states.borrow().clone();
    if matches!(state.status, Status::Cancelled | Status::Expired) {
        // Ended while this request waited for its first code (a DELETE
        // landed meanwhile): the caller asked to pair and nothing is
        // pairing, so that is an error, not a success.
        return Err(ApiError::SessionEnded(state.status.as_str()));
    }
    let created = if joined == Joined::Created {
        if state.status == Status::Pending {
            app.sessions.metrics().code_waited(started.elapsed());
        }
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    answer(state, created)
}

/// The phone's current state: this process's running session, else the
/// store (an ended session, or one from before a restart).
#[utoipa::path(
    get,
    path = "/pair/{phone}",
    tag = "pairing",
    params(PhoneParam),
    responses(
        (status = 200, description = "The session's state", body = PairState),
        (status = 403, description = "`forbidden`: another account started this session", body = ErrorBody),
        (status = 404, description = "`not_found`: no session for this phone", body = ErrorBody),
        (status = 422, description = "`invalid_phone`", body = ErrorBody),
        (status = 503, description = "`store_unavailable`", body = ErrorBody),
    ),
    security((), ("bearer" = [])),
)]
async fn show(
    State(app): State<Arc<AppState>>,
    caller: Caller,
    PhonePath(phone): PhonePath,
) -> Result<Json<PairState>, ApiError> {
    let actor = actor(&app, &caller, None);
    match app.sessions.get(&phone, &actor).await? {
        Some(state) => Ok(Json(state)),
        None => Err(ApiError::SessionNotFound),
    }
}

/// A new code now ("Refresh Kode").
#[utoipa::path(
    post,
    path = "/pair/{phone}/refresh",
    tag = "pairing",
    params(PhoneParam),
    responses(
        (status = 200, description = "The session with its new code (or the one issued in the last seconds)", body = PairState),
        (status = 202, description = "No code yet; `Retry-After` says when to look again", body = PairState),
        (status = 403, description = "`forbidden` or `whatsapp_forbidden`", body = ErrorBody),
        (status = 404, description = "`not_found`: no open session for this phone", body = ErrorBody),
        (status = 409, description = "`session_ended`, or `already_linked` when the session linked", body = ErrorBody),
        (status = 422, description = "`invalid_phone` or `pairing_unavailable`", body = ErrorBody),
        (status = 429, description = "`rate_limited` or `code_budget_exhausted` (`Retry-After`)", body = ErrorBody),
        (status = 503, description = "`whatsapp_unavailable`, `store_unavailable`, `shutting_down` or `busy` (`Retry-After`)", body = ErrorBody),
    ),
    security((), ("bearer" = [])),
)]
async fn refresh(
    State(app): State<Arc<AppState>>,
    caller: Caller,
    PhonePath(phone): PhonePath,
) -> Result<Response, ApiError> {
    let state = app
        .sessions
        .refresh(&phone, &actor(&app, &caller, None))
        .await?;
    answer(state, StatusCode::OK)
}

/// Cancels the phone's pending session.
#[utoipa::path(
    delete,
    path = "/pair/{phone}",
    tag = "pairing",
    params(PhoneParam),
    responses(
        (status = 200, description = "The session, now `cancelled`", body = PairState),
        (status = 403, description = "`forbidden`: another account started this session", body = ErrorBody),
        (status = 404, description = "`not_found`: no open session for this phone", body = ErrorBody),
        (status = 409, description = "`session_ended` (it ended before the cancel), or `already_linked` when it linked", body = ErrorBody),
        (status = 422, description = "`invalid_phone`", body = ErrorBody),
        (status = 503, description = "`store_unavailable`, `shutting_down` or `busy`", body = ErrorBody),
    ),
    security((), ("bearer" = [])),
)]
async fn cancel(
    State(app): State<Arc<AppState>>,
    caller: Caller,
    PhonePath(phone): PhonePath,
) -> Result<Json<PairState>, ApiError> {
    Ok(Json(
        app.sessions
            .cancel(&phone, &actor(&app, &caller, None))
            .await?,
    ))
}

/// Turns a session state into the answer for a request that wanted a code.
fn answer(state: PairState, with_code: StatusCode) -> Result<Response, ApiError> {
    match state.status {
        // A code, a QR code, or (action_required) what the person must do.
        Status::Pending | Status::ActionRequired => Ok((with_code, Json(state)).into_response()),
        Status::Linked | Status::Expired | Status::Cancelled => {
            Ok((StatusCode::OK, Json(state)).into_response())
        }
        Status::Starting => {
            let retry_after = state
                .retry_at
                .map(|at| {
                    let secs = (at - OffsetDateTime::now_utc()).whole_seconds().max(1);
                    Duration::from_secs(secs.unsigned_abs())
                })
                .unwrap_or(STARTING_RETRY_AFTER);
            if state.reason == Some(Reason::CodeBudget) {
                return Err(ApiError::CodeBudgetExhausted(retry_after));
            }
            if matches!(state.whatsapp_status, Some(400 | 429)) {
                return Err(ApiError::RateLimited {
                    retry_after,
                    message: format!(
                        "{}. The service keeps trying; GET /pair/{{phone}} to follow.",
                        state
                            .message
                            .as_deref()
                            .unwrap_or("WhatsApp is limiting pairing codes for this number")
                    ),
                });
            }
            let mut response = (StatusCode::ACCEPTED, Json(state)).into_response();
            set_retry_after(&mut response, retry_after);
            Ok(response)
        }
        Status::Failed => Err(failure(&state)),
    }
}

fn failure(state: &PairState) -> ApiError {
    let message = state
        .message
        .clone()
        .unwrap_or_else(|| "WhatsApp could not issue a code".into());
    match (state.reason, state.whatsapp_status) {
        (Some(Reason::WhatsappRefused), Some(452)) => ApiError::PairingUnavailable,
        (Some(Reason::WhatsappRefused), Some(403)) => ApiError::WhatsAppForbidden,
        (Some(Reason::Interrupted), _) => ApiError::ShuttingDown,
        (Some(Reason::Storage), _) => ApiError::Internal,
        _ => ApiError::WhatsAppUnavailable(message),
    }
}
