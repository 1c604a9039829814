//! Liveness and readiness.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::ErrorBody;
use super::{ApiError, AppState};
use crate::store;

/// Readiness gives the store this long to answer: probes must be quick.
pub const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET /healthz` and `GET /readyz`.
pub fn routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
}

/// `GET /healthz` answer.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Health {
    /// Always `ok`.
    #[schema(example = "ok")]
    status: &'static str,
}

/// `GET /readyz` answer.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Ready {
    /// Always `ready`.
    #[schema(example = "ready")]
    status: &'static str,
    /// The store that answered: `memory` or `upstash`.
    #[schema(example = "upstash")]
    store: &'static str,
}

/// Liveness: the process answers. Touches no dependency, so a store outage
/// never gets the service restarted.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, description = "The process answers", body = Health)),
)]
async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Readiness: the store answers.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "The store answers", body = Ready),
        (status = 503, description = "`store_unavailable`", body = ErrorBody),
    ),
)]
async fn readyz(State(app): State<Arc<AppState>>) -> Result<Json<Ready>, ApiError> {
    let store = app.sessions.store();
    if store::probe(store.as_ref(), READY_TIMEOUT).await {
        Ok(Json(Ready {
            status: "ready",
            store: store.kind(),
        }))
    } else {
        Err(ApiError::StoreUnavailable)
    }
}
