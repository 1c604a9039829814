//! The HTTP edge: `router(state)` assembles the routes each module
//! contributes, puts [`edge`] (request ids, deadlines, one log line per
//! request) in front of each, and answers JSON for every error (including
//! axum's own rejections and unknown routes).

pub mod auth;
mod cors;
mod devices;
mod edge;
mod error;
mod events;
mod extract;
mod health;
pub mod limits;
mod metrics;
pub mod openapi;
mod pair;
mod passkey;
mod qr;
#[cfg(feature = "sandbox")]
pub mod sandbox;
pub mod server;
pub mod ui;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;

pub use error::ApiError;

use crate::session::Sessions;

/// Largest request body we accept. A valid body is `{"phone":"…"}`.
pub const MAX_BODY_BYTES: usize = 1024;
/// Header carrying the request id, taken from the client when present.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Longest request id taken from a client (a UUID is 36 characters); a
/// longer or unprintable one is replaced, since it goes into every log line
/// of the request.
pub const MAX_REQUEST_ID_LEN: usize = 64;

/// What the handlers share. The router holds it in an `Arc`, so a handler
/// call clones one pointer rather than each field.
pub struct AppState {
    /// Every pairing session of the process.
    pub sessions: Arc<Sessions>,
    /// How long `POST /pair` waits for the first code before answering 202.
    pub code_wait: Duration,
    /// How often an idle event stream gets a keep-alive comment.
    pub sse_keepalive: Duration,
    /// Whether `GET /` serves the pairing page.
    pub ui_enabled: bool,
    /// Who may call the API.
    pub callers: auth::Callers,
    /// Request budgets per caller.
    pub limits: Arc<limits::CallerLimits>,
    /// Most sessions one signed-in user may have open (`PAIR_SESSIONS_PER_USER`).
    pub sessions_per_user: usize,
    /// Browser origins allowed to call the API (CORS).
    pub cors_allowed_origins: Arc<[String]>,
    /// Linked devices saved in PostgreSQL, when `DATABASE_URL` is set
    /// (`GET /devices/{phone}`).
    pub devices: Option<Arc<crate::devices::DeviceVault>>,
    /// The in-process fake WhatsApp, in sandbox mode.
    #[cfg(feature = "sandbox")]
    pub sandbox: Option<Arc<fake_wa::FakeWhatsApp>>,
}

/// The whole API as a router over `state`, serving at `/openapi.json` the
/// OpenAPI document of exactly the routes it has.
pub fn router(state: AppState) -> Router {
    let state = Arc::new(state);
    let cors = match state.cors_allowed_origins.is_empty() {
        // No origin allowed: no CORS headers to send, so no layer to pay
        // for on every request.
        true => None,
        false => Some(cors::layer(&state.cors_allowed_origins)),
    };
    // Only the API routes need a caller: health checks stay open, and an
    // unknown route is a 404 whoever asks.
    let api = pair::routes()
        .merge(qr::routes())
        .merge(passkey::routes())
        .merge(events::routes())
        .merge(metrics::routes())
        .merge(devices::routes())
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            admit,
        ));
    // Filled in below, once the document of all the routes is known.
    let rendered = Arc::new(std::sync::OnceLock::new());
    let routes = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(api)
        .merge(health::routes())
        .merge(openapi::routes(Arc::clone(&rendered)));
    #[cfg(feature = "sandbox")]
    let routes = match state.sandbox.is_some() {
        true => routes.merge(sandbox::routes()),
        false => routes,
    };
    let routes = match state.ui_enabled {
        true => routes.merge(ui::routes()),
        false => routes,
    };
    let (routes, mut document) = routes.split_for_parts();
    openapi::add_shared_answers(&mut document);
    // The document is built from our own types; if it ever fails to
    // serialize, the route still answers rather than the service refusing
    // to start.
    let json = document.to_json().unwrap_or_else(|e| {
        tracing::error!(error = %e, "the OpenAPI document does not serialize");
        "{}".to_owned()
    });
    let _ = rendered.set(bytes::Bytes::from(json));
    let deadlines = edge::Deadlines::for_code_wait(state.code_wait);
    routes
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
        .layer(edge::EdgeLayer::new(deadlines))
        .layer(tower::util::option_layer(cors))
}

/// The request id in a request's headers (set or checked by [`edge`]
/// before anything else runs), for log lines about it.
pub fn request_id(headers: &axum::http::HeaderMap) -> &str {
    headers
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Middleware for the API routes: who is calling (or 401), then its budget
/// (or 429), in that order, so a refused caller spends no one's budget. The
/// request goes on with its [`auth::Caller`] (and the client address
/// charged, [`limits::ClientIp`]) in the extensions. One middleware, not
/// two: each `from_fn` layer clones a boxed service and boxes a future per
/// request.
async fn admit(
    axum::extract::State(app): axum::extract::State<Arc<AppState>>,
    request: Request,
    next: axum::middleware::Next,
) -> Result<axum::response::Response, ApiError> {
    // The parts alone, since a body cannot be shared across an await.
    let (mut parts, body) = request.into_parts();
    let caller = auth::identify(&app.callers, &parts).await?;
    let client_ip = limits::charge(&app.limits, &caller, &parts)?;
    parts.extensions.insert(caller);
    if let Some(client_ip) = client_ip {
        parts.extensions.insert(client_ip);
    }
    Ok(next.run(Request::from_parts(parts, body)).await)
}

async fn route_not_found() -> ApiError {
    ApiError::RouteNotFound
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
