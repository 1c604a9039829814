//! `GET /devices/{phone}`: a linked device saved in PostgreSQL
//! (`DATABASE_URL`, see [`crate::devices`]), for whatever runs the account
//! next. Server callers only (an API key): the store holds the device's
//! keys, which give full use of the WhatsApp account.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::header;
use base64::Engine as _;
use serde::Serialize;
use time::OffsetDateTime;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Caller;
use super::error::ErrorBody;
use super::extract::{PhoneParam, PhonePath};
use super::{ApiError, AppState};

/// The `/devices` route.
pub fn routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new().routes(routes!(fetch))
}

/// A saved linked device.
#[derive(Serialize, utoipa::ToSchema)]
pub struct DeviceAnswer {
    /// The phone number, digits only.
    phone: String,
    /// The linked device's JID.
    jid: String,
    /// When it was saved (right after the link).
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    linked_at: OffsetDateTime,
    /// The device's store, a SQLite database file as whatsapp-rust writes
    /// it, base64 (standard alphabet, padded): write it to `<phone>.db` and
    /// open it with whatsapp-rust's SQLite store.
    device: String,
}

/// The linked device saved for `phone`.
#[utoipa::path(
    get,
    path = "/devices/{phone}",
    tag = "devices",
    params(PhoneParam),
    responses(
        (status = 200, description = "The saved device, its store in base64", body = DeviceAnswer),
        (status = 401, description = "`unauthorized`: no API key (even where no callers are configured)", body = ErrorBody),
        (status = 403, description = "`forbidden`: only server callers (an API key) may read devices", body = ErrorBody),
        (status = 404, description = "`not_found`: no device saved for this phone, or no DATABASE_URL", body = ErrorBody),
        (status = 422, description = "`invalid_phone`", body = ErrorBody),
        (status = 503, description = "`devices_unavailable`: the database does not answer", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn fetch(
    State(app): State<Arc<AppState>>,
    caller: Caller,
    PhonePath(phone): PhonePath,
) -> Result<([(header::HeaderName, &'static str); 1], Json<DeviceAnswer>), ApiError> {
    // Not even an anonymous caller on loopback: the keys are the account.
    match caller {
        Caller::Server { .. } => {}
        Caller::User { .. } => return Err(ApiError::ServerCallersOnly),
        Caller::Anonymous => return Err(ApiError::Unauthorized),
    }
    let devices = app.devices.as_ref().ok_or(ApiError::DeviceNotFound)?;
    let saved = devices.load(&phone).await.map_err(|e| {
        tracing::warn!(phone = %phone, error = %e, "device database read failed");
        ApiError::DevicesUnavailable
    })?;
    let saved = saved.ok_or(ApiError::DeviceNotFound)?;
    let key_id = match &caller {
        Caller::Server { key_id } => key_id.as_str(),
        _ => "",
    };
    tracing::info!(phone = %phone, key_id, event = "device_fetched", "saved device handed to a server caller");
    let answer = Json(DeviceAnswer {
        phone: saved.phone,
        jid: saved.jid,
        linked_at: saved.linked_at,
        device: base64::engine::general_purpose::STANDARD.encode(&saved.device),
    });
    // The account's keys: no cache keeps a copy.
    Ok(([(header::CACHE_CONTROL, "no-store")], answer))
}
