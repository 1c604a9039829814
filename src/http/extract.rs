//! Extractors whose rejections are [`ApiError`]s, so a malformed request
//! gets the same JSON error shape as everything else.

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::{ApiError, MAX_BODY_BYTES};
use crate::phone::PhoneNumber;

/// `axum::Json` with JSON errors.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(request, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => ApiError::UnsupportedMediaType,
        JsonRejection::JsonDataError(e) => ApiError::InvalidJson(format!(
            "the JSON does not have the expected shape: {}",
            e.body_text()
        )),
        JsonRejection::JsonSyntaxError(_) => {
            ApiError::InvalidJson("the body is not valid JSON".into())
        }
        other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::PayloadTooLarge(MAX_BODY_BYTES)
        }
        _ => ApiError::InvalidJson("the body could not be read".into()),
    }
}

/// The `{phone}` path segment, parsed.
pub struct PhonePath(pub PhoneNumber);

/// How the OpenAPI document describes the `{phone}` path segment.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[expect(dead_code, reason = "read only by the OpenAPI derive")]
pub struct PhoneParam {
    /// Digits only, country code first, no `+` (8 to 15 digits; the
    /// country calling code must exist, which no pattern says).
    #[param(pattern = r"^[1-9][0-9]{7,14}$", example = "628123456789")]
    phone: String,
}

impl<S: Send + Sync> FromRequestParts<S> for PhonePath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Path(raw) =
            axum::extract::Path::<String>::from_request_parts(parts, state)
                .await
                .map_err(|_: PathRejection| ApiError::RouteNotFound)?;
        PhoneNumber::parse(&raw)
            .map(Self)
            .map_err(ApiError::InvalidPhone)
    }
}
