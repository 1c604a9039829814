//! `GET /metrics`: the service's Prometheus metrics (see
//! [`crate::metrics`]). Behind the caller check like the API: with callers
//! configured, only server callers may read it (a signed-in user gets
//! 403); with none (loopback), it is open.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Caller;
use super::error::ErrorBody;
use super::{ApiError, AppState};

/// The `/metrics` route.
pub fn routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new().routes(routes!(scrape))
}

/// The metrics in the OpenMetrics text format, which Prometheus reads.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "Counters, histograms and gauges; no phone numbers or callers in labels", content_type = "application/openmetrics-text", body = String),
        (status = 403, description = "`forbidden`: signed-in users may not read metrics; use an API key", body = ErrorBody),
    ),
    security((), ("bearer" = [])),
)]
async fn scrape(State(app): State<Arc<AppState>>, caller: Caller) -> Result<Response, ApiError> {
    if matches!(caller, Caller::User { .. }) {
        return Err(ApiError::ServerCallersOnly);
    }
    let sessions = &app.sessions;
    let text = sessions
        .metrics()
        .render(sessions.counts().live, sessions.warm_clients());
    Ok(([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
}
