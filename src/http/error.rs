//! The one error type at the HTTP edge. Each variant has a status and a
//! message that is safe to show a client; internal detail is logged where
//! the error is produced, never put in the response.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::phone::PhoneError;
use crate::session::SessionError;

/// An error answer: `{"error":"snake_code","message":"..."}`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The phone number is not in the required format.
    #[error("{}", .0.message())]
    InvalidPhone(PhoneError),
    /// The body is not the JSON we expect.
    #[error("{0}")]
    InvalidJson(String),
    /// The body is not declared as JSON.
    #[error("send the body as JSON with `Content-Type: application/json`")]
    UnsupportedMediaType,
    /// The body is larger than any valid request.
    #[error("the request body is too large (limit {0} bytes)")]
    PayloadTooLarge(usize),
    /// No such route.
    #[error("no route for this path; see the README for the API")]
    RouteNotFound,
    /// The route exists but not with this method.
    #[error("this method is not allowed on this path")]
    MethodNotAllowed,
    /// No valid credentials (missing, malformed or unknown).
    #[error(
        "send `Authorization: Bearer <API key or Supabase access token>`; see \"Securing the service\" in the README"
    )]
    Unauthorized,
    /// Authenticated, but the session was started by another caller.
    #[error("this pairing session was started by another account")]
    Forbidden,
    /// A signed-in user asked for something only server callers may read.
    #[error("only server callers (an API key) may read this")]
    ServerCallersOnly,
    /// The caller has as many sessions open as it may.
    #[error(
        "you have {0} pairing sessions open already; finish or cancel one (DELETE /pair/{{phone}}) first"
    )]
    TooManySessions(usize),
    /// The request took longer than its deadline.
    #[error("the request took too long and was abandoned; try again")]
    RequestTimeout,
    /// No pairing session for this phone.
    #[error("no pairing session for this phone; POST /pair to start one")]
    SessionNotFound,
    /// The session shows no QR code now (connecting, ended, or the last one
    /// expired before the next arrived).
    #[error(
        "no QR code is showing for this phone right now; GET /pair/{{phone}} says why, and a new one comes with the next connection"
    )]
    NoQr,
    /// The phone is linked already.
    #[error(
        "this phone is already linked; to link it again on purpose, a server caller sends \"force\": true (see the README)"
    )]
    AlreadyLinked,
    /// The session is over; start a new one.
    #[error("this pairing session has ended ({0}); POST /pair to start a new one")]
    SessionEnded(&'static str),
    /// WhatsApp is throttling codes for this number; the session retries.
    #[error("{message}")]
    RateLimited {
        /// When to look again.
        retry_after: Duration,
        /// What is going on, for a person.
        message: String,
    },
    /// The phone had all its codes for this hour.
    #[error(
        "this number has had as many pairing codes this hour as WhatsApp allows without blocking it; try again after Retry-After"
    )]
    CodeBudgetExhausted(Duration),
    /// WhatsApp 452: phone-number linking is not available for the account.
    #[error(
        "phone-number linking is not available for this WhatsApp account; link with a QR code instead"
    )]
    PairingUnavailable,
    /// WhatsApp 403.
    #[error("WhatsApp refused to link this number")]
    WhatsAppForbidden,
    /// WhatsApp cannot be reached or kept failing.
    #[error("{0}")]
    WhatsAppUnavailable(String),
    /// The state store does not answer.
    #[error("the state store is not reachable")]
    StoreUnavailable,
    /// No linked device of this phone is saved (or no device database is
    /// configured).
    #[error(
        "no linked device of this phone is saved here (devices are saved when DATABASE_URL is set)"
    )]
    DeviceNotFound,
    /// The device database does not answer.
    #[error("the device database is not reachable")]
    DevicesUnavailable,
    /// The service is stopping.
    #[error("the service is shutting down; try again in a moment")]
    ShuttingDown,
    /// The session is busy with other requests.
    #[error("the pairing session is busy; try again in a moment")]
    Busy,
    /// Too many sessions are open on this server.
    #[error("too many pairing sessions are open on this server; try again in a minute")]
    AtCapacity,
    /// A bug or an unexpected failure on our side.
    #[error("internal error; the request id in the response headers helps us find it")]
    Internal,
    /// The body is JSON but not a WebAuthn assertion (the text says why).
    #[error("not a WebAuthn assertion (AuthenticationResponseJSON): {0}")]
    InvalidPasskey(String),
    /// A passkey step that does not fit where the session is.
    #[error("{0}; GET /pair/{{phone}} says where the session is")]
    PasskeyOutOfOrder(&'static str),
    /// WhatsApp did not accept the assertion.
    #[error(
        "WhatsApp did not accept this passkey assertion; make a new one with the session's current passkey_options"
    )]
    PasskeyRefused,
    /// Sandbox: the typed code does not match.
    #[error("wrong code: it does not match the code the companion displays")]
    WrongCode,
    /// Sandbox: no code has been requested for this phone.
    #[error("no pairing code was requested for this phone; POST /pair first")]
    NoCodeRequested,
    /// Sandbox: the link client that asked for the code is gone (the
    /// session was cancelled, linked or replaced).
    #[error("the link client that asked for this code is gone; POST /pair for a new one")]
    CompanionGone,
    /// Sandbox: the scanned QR is not one WhatsApp shows now.
    #[error(
        "this QR code is not (or no longer) one WhatsApp shows; GET /pair/{{phone}} for the current one"
    )]
    UnknownQr,
    /// Sandbox: the link client did not answer the fake phone.
    #[error("the link client did not answer the fake phone")]
    CompanionUnavailable,
}

/// The JSON of every error answer.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody {
    /// Stable snake-case code (`invalid_phone`, `rate_limited`, ...), for
    /// programs; the README's error table lists them all.
    #[schema(value_type = String, example = "invalid_phone")]
    error: &'static str,
    /// What went wrong and what to do, for people.
    message: String,
    /// A corrected phone number, when one is likely (`invalid_phone` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    suggestion: Option<String>,
}

impl ApiError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidPhone(_)
            | Self::PairingUnavailable
            | Self::WrongCode
            | Self::UnknownQr
            | Self::InvalidPasskey(_)
            | Self::PasskeyRefused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::InvalidJson(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden | Self::ServerCallersOnly => StatusCode::FORBIDDEN,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RouteNotFound | Self::SessionNotFound | Self::NoQr | Self::DeviceNotFound => {
                StatusCode::NOT_FOUND
            }
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::AlreadyLinked
            | Self::SessionEnded(_)
            | Self::NoCodeRequested
            | Self::CompanionGone
            | Self::PasskeyOutOfOrder(_) => StatusCode::CONFLICT,
            Self::RateLimited { .. } | Self::TooManySessions(_) | Self::CodeBudgetExhausted(_) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::WhatsAppForbidden => StatusCode::FORBIDDEN,
            Self::WhatsAppUnavailable(_)
            | Self::StoreUnavailable
            | Self::DevicesUnavailable
            | Self::ShuttingDown
            | Self::Busy
            | Self::AtCapacity => StatusCode::SERVICE_UNAVAILABLE,
            Self::CompanionUnavailable => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable snake-case code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidPhone(_) => "invalid_phone",
            Self::InvalidJson(_) => "invalid_json",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden | Self::ServerCallersOnly => "forbidden",
            Self::RequestTimeout => "request_timeout",
            Self::TooManySessions(_) => "too_many_sessions",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::PayloadTooLarge(_) => "payload_too_large",
            Self::RouteNotFound | Self::SessionNotFound | Self::DeviceNotFound => "not_found",
            Self::NoQr => "no_qr",
            Self::UnknownQr => "unknown_qr",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::AlreadyLinked => "already_linked",
            Self::SessionEnded(_) => "session_ended",
            Self::RateLimited { .. } => "rate_limited",
            Self::CodeBudgetExhausted(_) => "code_budget_exhausted",
            Self::PairingUnavailable => "pairing_unavailable",
            Self::WhatsAppForbidden => "whatsapp_forbidden",
            Self::WhatsAppUnavailable(_) => "whatsapp_unavailable",
            Self::StoreUnavailable => "store_unavailable",
            Self::DevicesUnavailable => "devices_unavailable",
            Self::ShuttingDown => "shutting_down",
            Self::Busy => "busy",
            Self::AtCapacity => "at_capacity",
            Self::Internal => "internal",
            Self::InvalidPasskey(_) => "invalid_passkey",
            Self::PasskeyOutOfOrder(_) => "passkey_out_of_order",
            Self::PasskeyRefused => "passkey_refused",
            Self::WrongCode => "wrong_code",
            Self::NoCodeRequested => "no_code_requested",
            Self::CompanionGone => "companion_gone",
            Self::CompanionUnavailable => "companion_unavailable",
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after, .. } | Self::CodeBudgetExhausted(retry_after) => {
                Some(*retry_after)
            }
            Self::Busy | Self::ShuttingDown => Some(Duration::from_secs(1)),
            Self::AtCapacity | Self::TooManySessions(_) => Some(Duration::from_secs(60)),
            Self::StoreUnavailable | Self::DevicesUnavailable | Self::WhatsAppUnavailable(_) => {
                Some(Duration::from_secs(5))
            }
            _ => None,
        }
    }
}

impl From<SessionError> for ApiError {
    fn from(error: SessionError) -> Self {
        match error {
            SessionError::NotFound => Self::SessionNotFound,
            SessionError::AlreadyLinked => Self::AlreadyLinked,
            SessionError::Ended(status) => Self::SessionEnded(status),
            SessionError::ShuttingDown => Self::ShuttingDown,
            SessionError::Busy => Self::Busy,
            SessionError::AtCapacity => Self::AtCapacity,
            SessionError::Forbidden => Self::Forbidden,
            SessionError::StoreUnavailable => Self::StoreUnavailable,
            SessionError::TooManySessions { limit } => Self::TooManySessions(limit),
            SessionError::CodeBudget { retry_after } => Self::CodeBudgetExhausted(retry_after),
            SessionError::PasskeyOutOfOrder(why) => Self::PasskeyOutOfOrder(why),
            SessionError::PasskeyRefused => Self::PasskeyRefused,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let suggestion = match &self {
            Self::InvalidPhone(e) => e.suggestion().map(str::to_owned),
            _ => None,
        };
        let body = ErrorBody {
            error: self.code(),
            message: self.to_string(),
            suggestion,
        };
        let mut response = (self.status(), Json(body)).into_response();
        if let Some(after) = self.retry_after() {
            set_retry_after(&mut response, after);
        }
        if matches!(self, Self::Unauthorized) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Sets `Retry-After` in whole seconds, at least 1.
pub(super) fn set_retry_after(response: &mut Response, after: Duration) {
    let secs = after.as_secs().max(1).to_string();
    if let Ok(value) = HeaderValue::from_str(&secs) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phone::PhoneNumber;
    use http_body_util::BodyExt;

    async fn body_json(response: Response) -> serde_json::Value {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn invalid_phone_carries_code_message_and_suggestion() {
        let error = PhoneNumber::parse("+62 812-345-6789").unwrap_err();

        let response = ApiError::InvalidPhone(error).into_response();

        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let body = body_json(response).await;
        assert_eq!(body["error"], "invalid_phone");
        assert_eq!(body["suggestion"], "628123456789");
        assert!(body["message"].as_str().unwrap().contains('+'));
    }

    #[tokio::test]
    async fn rate_limited_sets_retry_after_in_whole_seconds() {
        let response = ApiError::RateLimited {
            retry_after: Duration::from_millis(41_500),
            message: "slow down".into(),
        }
        .into_response();

        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "41");
    }

    #[tokio::test]
    async fn internal_error_does_not_leak_details() {
        let body = body_json(ApiError::Internal.into_response()).await;

        assert_eq!(body["error"], "internal");
        assert!(body.get("suggestion").is_none());
    }
}
