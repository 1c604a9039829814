//! `/pair/{phone}/passkey`: answer WhatsApp's passkey request and confirm
//! the verification code, for accounts that link only with their passkey
//! (see `link::passkey` for what a page on another origin can and cannot
//! do).

use std::sync::Arc;

use axum::Json;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Caller;
use super::error::ErrorBody;
use super::extract::{ApiJson, PhoneParam, PhonePath};
use super::pair::actor;
use super::{ApiError, AppState};
use crate::link::passkey::{AuthenticationResponseJson, PasskeyAssertion};
use crate::session::{PairState, Reason};

/// Largest passkey body accepted. An assertion is a few hundred bytes of
/// base64url; WebAuthn allows credential ids up to 1,023 bytes, which
/// `id` and `rawId` each carry, so this leaves room for the longest.
pub const PASSKEY_MAX_BODY_BYTES: usize = 8 * 1024;

/// The passkey routes, each with its description.
pub fn routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(routes!(send_passkey))
        .routes(routes!(confirm_passkey))
        .layer(DefaultBodyLimit::max(PASSKEY_MAX_BODY_BYTES))
}

/// Answers WhatsApp's passkey request (the session is `action_required`
/// with `reason: passkey_required`) with a WebAuthn assertion made from
/// its `passkey_options`.
#[utoipa::path(
    post,
    path = "/pair/{phone}/passkey",
    tag = "pairing",
    params(PhoneParam),
    request_body = AuthenticationResponseJson,
    responses(
        (status = 200, description = "WhatsApp accepted the passkey: `pending` with `reason: passkey_accepted` (or already the verification code)", body = PairState),
        (status = 202, description = "WhatsApp has not answered yet (still `passkey_required`); follow `GET /pair/{phone}`", body = PairState),
        (status = 400, description = "`invalid_json`", body = ErrorBody),
        (status = 403, description = "`forbidden`: another caller started this session", body = ErrorBody),
        (status = 404, description = "`not_found`: no open session for this phone", body = ErrorBody),
        (status = 409, description = "`passkey_out_of_order` (not waiting for a passkey), `session_ended` or `already_linked`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody),
        (status = 422, description = "`invalid_phone`, `invalid_passkey` (not an assertion) or `passkey_refused` (WhatsApp did not accept it; the session still asks)", body = ErrorBody),
        (status = 503, description = "`store_unavailable`, `shutting_down` or `busy`", body = ErrorBody),
    ),
    security((), ("bearer" = [])),
)]
async fn send_passkey(
    State(app): State<Arc<AppState>>,
    caller: Caller,
    PhonePath(phone): PhonePath,
    body: Result<ApiJson<AuthenticationResponseJson>, ApiError>,
) -> Result<(StatusCode, Json<PairState>), ApiError> {
    let ApiJson(response) = body.map_err(|error| match error {
        ApiError::PayloadTooLarge(_) => ApiError::PayloadTooLarge(PASSKEY_MAX_BODY_BYTES),
        other => other,
    })?;
    let assertion =
        PasskeyAssertion::parse(&response).map_err(|e| ApiError::InvalidPasskey(e.to_string()))?;
    let state = app
        .sessions
        .send_passkey(&phone, &actor(&app, &caller, None), assertion)
        .await?;
    Ok(answer(state, Reason::PasskeyRequired))
}

/// Confirms that the phone shows the same verification code as the
/// session (`action_required` with `reason: passkey_confirmation`); the
/// phone then finishes the link.
#[utoipa::path(
    post,
    path = "/pair/{phone}/passkey/confirm",
    tag = "pairing",
    params(PhoneParam),
    responses(
        (status = 200, description = "Confirmed: `pending` with `reason: passkey_confirmed`, `linked` follows", body = PairState),
        (status = 202, description = "WhatsApp has not answered yet (still `passkey_confirmation`); follow `GET /pair/{phone}`", body = PairState),
        (status = 403, description = "`forbidden`: another caller started this session", body = ErrorBody),
        (status = 404, description = "`not_found`: no open session for this phone", body = ErrorBody),
        (status = 409, description = "`passkey_out_of_order` (no code to confirm), `session_ended` (the link broke off) or `already_linked`", body = ErrorBody),
        (status = 422, description = "`invalid_phone`", body = ErrorBody),
        (status = 503, description = "`store_unavailable`, `shutting_down` or `busy`", body = ErrorBody),
    ),
    security((), ("bearer" = [])),
)]
async fn confirm_passkey(
    State(app): State<Arc<AppState>>,
    caller: Caller,
    PhonePath(phone): PhonePath,
) -> Result<(StatusCode, Json<PairState>), ApiError> {
    let state = app
        .sessions
        .confirm_passkey(&phone, &actor(&app, &caller, None))
        .await?;
    Ok(answer(state, Reason::PasskeyConfirmation))
}

/// `200` with the state once the step went through; `202` while the
/// session is still at the stage the step leaves (WhatsApp has not
/// answered within the command's wait).
fn answer(state: PairState, before: Reason) -> (StatusCode, Json<PairState>) {
    let status = if state.reason == Some(before) {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    (status, Json(state))
}
