//! CORS for browser callers: exact origins from `CORS_ALLOWED_ORIGINS`,
//! the methods and headers the API uses, nothing at all when unset.
//!
//! The layer wraps the whole router, so a preflight is answered before any
//! caller check (browsers send it without credentials), and errors carry
//! the CORS headers too, so a page can read why it was refused.

use std::time::Duration;

use axum::http::{HeaderName, HeaderValue, Method, header};
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::REQUEST_ID_HEADER;

/// How long a browser may cache a preflight answer: the API's methods and
/// headers change only with a deploy.
pub const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(600);

/// The CORS layer for `origins` (already validated as exact origins).
pub fn layer(origins: &[String]) -> CorsLayer {
    let origins: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    let request_id = HeaderName::from_static(REQUEST_ID_HEADER);
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([Method::GET, Method::POST, Method::DELETE])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            request_id.clone(),
        ])
        .expose_headers([header::RETRY_AFTER, header::WWW_AUTHENTICATE, request_id])
        .max_age(PREFLIGHT_MAX_AGE)
}
