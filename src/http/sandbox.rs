//! Sandbox only (`--features sandbox`, `WA_SANDBOX=1`): the phone's side of
//! the in-process fake WhatsApp, so the whole flow runs with no phone.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use fake_wa::{LinkAttemptError, LinkedDevice, PhoneRecord};
use serde::{Deserialize, Serialize};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::ErrorBody;
use super::extract::{ApiJson, PhoneParam, PhonePath};
use super::{ApiError, AppState};
use crate::phone::PhoneNumber;

/// How long `enter-code` and `scan-qr` wait for the link client to answer the fake
/// phone before answering `504 companion_unavailable`: the link client
/// answers in well under a second, or (after several wrong codes in a row)
/// not until it has given the phone a minute, and nobody should stare at a
/// spinner for the fake's own 30 s stage timeout.
pub const ENTER_CODE_WAIT: Duration = Duration::from_secs(10);

/// The `/sandbox` routes.
pub fn routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(routes!(show))
        .routes(routes!(enter_code))
        .routes(routes!(scan_qr))
        .routes(routes!(create_passkey))
        .routes(routes!(answer_passkey))
}

/// Gives the number's WhatsApp account a passkey, kept on its fake phone:
/// from now on WhatsApp asks a companion for it instead of linking by code
/// or QR (start the pairing after this).
#[utoipa::path(
    post,
    path = "/sandbox/phones/{phone}/passkey",
    tag = "sandbox",
    params(PhoneParam),
    responses(
        (status = 204, description = "The account has a passkey"),
        (status = 422, description = "`invalid_phone`", body = ErrorBody),
    ),
)]
async fn create_passkey(
    State(app): State<Arc<AppState>>,
    PhonePath(phone): PhonePath,
) -> Result<StatusCode, ApiError> {
    let fake = app.sandbox.as_ref().ok_or(ApiError::RouteNotFound)?;
    fake.create_passkey(phone.as_str());
    Ok(StatusCode::NO_CONTENT)
}

/// Plays a host app that can sign in with the account's passkey: the
/// WebAuthn assertion (`AuthenticationResponseJSON`) for the request
/// WhatsApp sent, to post to `POST /pair/{phone}/passkey`.
#[utoipa::path(
    post,
    path = "/sandbox/phones/{phone}/passkey/assertion",
    tag = "sandbox",
    params(PhoneParam),
    responses(
        (status = 200, description = "The assertion", body = Object),
        (status = 409, description = "`passkey_out_of_order`: WhatsApp has not asked for this number's passkey", body = ErrorBody),
        (status = 422, description = "`invalid_phone`", body = ErrorBody),
    ),
)]
async fn answer_passkey(
    State(app): State<Arc<AppState>>,
    PhonePath(phone): PhonePath,
) -> Result<Json<serde_json::Value>, ApiError> {
    let fake = app.sandbox.as_ref().ok_or(ApiError::RouteNotFound)?;
    fake.answer_passkey(phone.as_str())
        .map(Json)
        .ok_or(ApiError::PasskeyOutOfOrder(
            "WhatsApp has not asked for this number's passkey (POST /sandbox/phones/{phone}/passkey, then POST /pair)",
        ))
}

/// `POST /sandbox/phones/{phone}/scan-qr` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ScanQr {
    /// The QR string, as the state's `qr` carries it.
    qr: String,
    /// Scan with another account's phone instead (digits, country code
    /// first): plays a person scanning someone else's QR code.
    #[serde(default)]
    #[schema(pattern = r"^[1-9][0-9]{7,14}$", example = "628111111111")]
    as_phone: Option<String>,
}

/// Plays a person scanning the QR code with the phone (`phone`, or
/// `as_phone` when given) in WhatsApp > Linked devices > Link a device.
#[utoipa::path(
    post,
    path = "/sandbox/phones/{phone}/scan-qr",
    tag = "sandbox",
    params(PhoneParam),
    request_body = ScanQr,
    responses(
        (status = 200, description = "The phone linked (to the account that scanned)", body = Entered),
        (status = 400, description = "`invalid_json`", body = ErrorBody),
        (status = 409, description = "`companion_gone`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody),
        (status = 422, description = "`invalid_phone` or `unknown_qr`", body = ErrorBody),
        (status = 504, description = "`companion_unavailable`: the link client did not answer the fake phone", body = ErrorBody),
    ),
)]
async fn scan_qr(
    State(app): State<Arc<AppState>>,
    PhonePath(phone): PhonePath,
    ApiJson(body): ApiJson<ScanQr>,
) -> Result<Json<Entered>, ApiError> {
    let fake = app.sandbox.as_ref().ok_or(ApiError::RouteNotFound)?;
    let scanner = match body.as_phone.as_deref() {
        Some(other) => PhoneNumber::parse(other).map_err(ApiError::InvalidPhone)?,
        None => phone,
    };
    play(&scanner, fake.scan_qr(scanner.as_str(), &body.qr)).await
}

/// `POST /sandbox/phones/{phone}/enter-code` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct EnterCode {
    /// The code as shown, `ABCD1234` or `ABCD-1234`.
    #[schema(pattern = "^[A-Za-z0-9]{4}-?[A-Za-z0-9]{4}$", example = "ABCD-1234")]
    code: String,
}

/// `POST /sandbox/phones/{phone}/enter-code` answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct Entered {
    /// Always `true`: a code that does not link is an error.
    linked: bool,
    /// The linked device's JID.
    jid: String,
}

/// Plays the person typing `code` into WhatsApp on the phone.
#[utoipa::path(
    post,
    path = "/sandbox/phones/{phone}/enter-code",
    tag = "sandbox",
    params(PhoneParam),
    request_body = EnterCode,
    responses(
        (status = 200, description = "The phone linked", body = Entered),
        (status = 400, description = "`invalid_json`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 409, description = "`no_code_requested` or `companion_gone`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody),
        (status = 422, description = "`invalid_phone` or `wrong_code`", body = ErrorBody),
        (status = 504, description = "`companion_unavailable`: the link client did not answer the fake phone", body = ErrorBody),
    ),
)]
async fn enter_code(
    State(app): State<Arc<AppState>>,
    PhonePath(phone): PhonePath,
    ApiJson(body): ApiJson<EnterCode>,
) -> Result<Json<Entered>, ApiError> {
    let fake = app.sandbox.as_ref().ok_or(ApiError::RouteNotFound)?;
    let code: String = body
        .code
        .chars()
        .filter(|c| *c != '-' && !c.is_whitespace())
        .collect();
    play(&phone, fake.enter_code(phone.as_str(), &code)).await
}

/// Waits (at most [`ENTER_CODE_WAIT`]) for what the fake phone of `phone`
/// did (typed a code, scanned a QR), and answers with it.
async fn play(
    phone: &PhoneNumber,
    attempt: impl Future<Output = Result<LinkedDevice, LinkAttemptError>>,
) -> Result<Json<Entered>, ApiError> {
    let played = tokio::time::timeout(ENTER_CODE_WAIT, attempt)
        .await
        .unwrap_or(Err(LinkAttemptError::CompanionSilent(ENTER_CODE_WAIT)));
    match played {
        Ok(linked) => Ok(Json(Entered {
            linked: true,
            jid: linked.jid,
        })),
        Err(LinkAttemptError::WrongCode | LinkAttemptError::MalformedCode) => {
            Err(ApiError::WrongCode)
        }
        Err(LinkAttemptError::UnknownQr | LinkAttemptError::MalformedQr) => {
            Err(ApiError::UnknownQr)
        }
        Err(LinkAttemptError::NoCodeRequested) => Err(ApiError::NoCodeRequested),
        Err(LinkAttemptError::CompanionGone) => Err(ApiError::CompanionGone),
        Err(LinkAttemptError::PasskeyRequired) => Err(ApiError::PasskeyOutOfOrder(
            "this account links only with its passkey",
        )),
        Err(other) => {
            tracing::warn!(phone = %phone, error = %other, "the fake phone could not link");
            Err(ApiError::CompanionUnavailable)
        }
    }
}

/// What the fake WhatsApp recorded for the phone.
#[utoipa::path(
    get,
    path = "/sandbox/phones/{phone}",
    tag = "sandbox",
    params(PhoneParam),
    responses(
        (status = 200, description = "The fake phone's record (the companion's hello, the code typed, the link)", body = Object),
        (status = 404, description = "`not_found`: the fake has no record of this phone", body = ErrorBody),
        (status = 422, description = "`invalid_phone`", body = ErrorBody),
    ),
)]
async fn show(
    State(app): State<Arc<AppState>>,
    PhonePath(phone): PhonePath,
) -> Result<Json<PhoneRecord>, ApiError> {
    let fake = app.sandbox.as_ref().ok_or(ApiError::RouteNotFound)?;
    fake.record(phone.as_str())
        .map(Json)
        .ok_or(ApiError::SessionNotFound)
}
