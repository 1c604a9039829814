//! Liveness and readiness.

use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use super::{ApiError, AppState};
use crate::store;

/// Readiness gives the store this long to answer: probes must be quick.
pub const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET /healthz` and `GET /readyz`.
pub fn routes() -> axum::Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

/// Liveness: the process answers. Touches no dependency, so a store outage
/// never gets the service restarted.
async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Readiness: the store answers.
async fn readyz(State(app): State<AppState>) -> Result<Json<Value>, ApiError> {
    let store = app.sessions.store();
    if store::probe(store.as_ref(), READY_TIMEOUT).await {
        Ok(Json(json!({"status": "ready", "store": store.kind()})))
    } else {
        Err(ApiError::StoreUnavailable)
    }
}
