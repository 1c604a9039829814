//! `/pair`: start or join a pairing session, read it, refresh its code,
//! cancel it.

use std::time::Duration;

use axum::Extension;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use time::OffsetDateTime;

use super::auth::Caller;
use super::error::set_retry_after;
use super::extract::{ApiJson, PhonePath};
use super::limits::ClientIp;
use super::{ApiError, AppState};
use crate::phone::PhoneNumber;
use crate::session::{Actor, Joined, Owner, PairState, Reason, Status};

/// `Retry-After` for a session still connecting with nothing to report yet.
pub const STARTING_RETRY_AFTER: Duration = Duration::from_secs(2);

/// The `/pair` routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/pair", post(create))
        .route("/pair/{phone}", get(show).delete(cancel))
        .route("/pair/{phone}/refresh", post(refresh))
}

/// `POST /pair` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairRequest {
    /// Digits only, country code first, no `+`.
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
fn actor(app: &AppState, caller: &Caller, client: Option<ClientIp>) -> Actor {
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
async fn create(
    State(app): State<AppState>,
    caller: Caller,
    client: Option<Extension<ClientIp>>,
    ApiJson(request): ApiJson<PairRequest>,
) -> Result<Response, ApiError> {
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
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    answer(state, created)
}

/// The phone's current state: this process's running session, else the
/// store (an ended session, or one from before a restart).
async fn show(
    State(app): State<AppState>,
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
async fn refresh(
    State(app): State<AppState>,
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
async fn cancel(
    State(app): State<AppState>,
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
        Status::Pending => Ok((with_code, Json(state)).into_response()),
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
