//! Sandbox only (`--features sandbox`, `WA_SANDBOX=1`): the phone's side of
//! the in-process fake WhatsApp, so the whole flow runs with no phone.

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use fake_wa::{EnterCodeError, PhoneRecord};
use serde::Deserialize;
use serde_json::{Value, json};

use super::extract::{ApiJson, PhonePath};
use super::{ApiError, AppState};

/// The `/sandbox` routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/sandbox/phones/{phone}", get(show))
        .route("/sandbox/phones/{phone}/enter-code", post(enter_code))
}

/// `POST /sandbox/phones/{phone}/enter-code` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnterCode {
    /// The code as shown, `ABCD1234` or `ABCD-1234`.
    code: String,
}

/// Plays the person typing `code` into WhatsApp on the phone.
async fn enter_code(
    State(app): State<AppState>,
    PhonePath(phone): PhonePath,
    ApiJson(body): ApiJson<EnterCode>,
) -> Result<Json<Value>, ApiError> {
    let fake = app.sandbox.as_ref().ok_or(ApiError::RouteNotFound)?;
    let code: String = body
        .code
        .chars()
        .filter(|c| *c != '-' && !c.is_whitespace())
        .collect();
    match fake.enter_code(phone.as_str(), &code).await {
        Ok(linked) => Ok(Json(json!({"linked": true, "jid": linked.jid}))),
        Err(EnterCodeError::WrongCode | EnterCodeError::MalformedCode) => Err(ApiError::WrongCode),
        Err(EnterCodeError::NoCodeRequested) => Err(ApiError::NoCodeRequested),
        Err(EnterCodeError::CompanionGone) => Err(ApiError::CompanionGone),
        Err(other) => {
            tracing::warn!(phone = %phone, error = %other, "the fake phone could not link");
            Err(ApiError::CompanionUnavailable)
        }
    }
}

/// What the fake WhatsApp recorded for the phone.
async fn show(
    State(app): State<AppState>,
    PhonePath(phone): PhonePath,
) -> Result<Json<PhoneRecord>, ApiError> {
    let fake = app.sandbox.as_ref().ok_or(ApiError::RouteNotFound)?;
    fake.record(phone.as_str())
        .map(Json)
        .ok_or(ApiError::SessionNotFound)
}
