//! The HTTP edge: `router(state)` assembles the routes each module
//! contributes, plus request ids, one log line per request and JSON for every
//! error (including axum's own rejections and unknown routes).

pub mod auth;
mod cors;
mod deadline;
mod devices;
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
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::HeaderName;
use axum::response::Response;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tracing::Instrument;
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

/// What the handlers share.
#[derive(Clone)]
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
    let request_id = HeaderName::from_static(REQUEST_ID_HEADER);
    let cors = cors::layer(&state.cors_allowed_origins);
    // Only the API routes need a caller: health checks stay open, and an
    // unknown route is a 404 whoever asks.
    // Layers run outside in: the caller is known before its budget is
    // charged.
    let api = pair::routes()
        .merge(qr::routes())
        .merge(passkey::routes())
        .merge(events::routes())
        .merge(metrics::routes())
        .merge(devices::routes())
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state.limits),
            limits::enforce,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            state.callers.clone(),
            auth::require_caller,
        ));
    let routes = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(api)
        .merge(health::routes())
        .routes(utoipa_axum::routes!(openapi::document));
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
    let rendered = match document.to_json() {
        Ok(json) => bytes::Bytes::from(json),
        // The document is built from our own types; if it ever fails to
        // serialize, the route still answers rather than the service
        // refusing to start.
        Err(e) => {
            tracing::error!(error = %e, "the OpenAPI document does not serialize");
            bytes::Bytes::from_static(b"{}")
        }
    };
    let deadlines = deadline::Deadlines::for_code_wait(state.code_wait);
    routes
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::Extension(openapi::Rendered(rendered)))
        .layer(axum::middleware::from_fn_with_state(
            deadlines,
            deadline::enforce,
        ))
        .with_state(state)
        .layer(
            ServiceBuilder::new()
                .map_request(drop_unfit_request_id)
                .layer(SetRequestIdLayer::new(request_id.clone(), MakeRequestUuid))
                .layer(axum::middleware::from_fn(log_request))
                .layer(PropagateRequestIdLayer::new(request_id)),
        )
        .layer(cors)
}

/// Removes a client's request id that is too long or has characters other
/// than letters, digits and `-_.:`, so a fresh one is generated instead.
fn drop_unfit_request_id(mut request: Request) -> Request {
    let fit = request.headers().get(REQUEST_ID_HEADER).is_none_or(|id| {
        let id = id.as_bytes();
        !id.is_empty()
            && id.len() <= MAX_REQUEST_ID_LEN
            && id
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(b))
    });
    if !fit {
        request.headers_mut().remove(REQUEST_ID_HEADER);
    }
    request
}

/// The request id a request carries (set or checked by the request-id
/// layer before anything else runs), for log lines about it.
pub fn request_id(request: &Request) -> &str {
    request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// One line per request, written when the answer is ready: `request_id`,
/// `method`, the *matched* route (never the raw path: `/pair/{phone}` must
/// not put a phone number in the logs), `status` and `latency_ms`.
///
/// No span per request at the default level: creating, entering and
/// leaving one on every poll cost more than the line itself. With
/// `RUST_LOG=wa_pair=debug` a `request` span with the same fields wraps the
/// request, so debug lines carry them; the few warnings about a request
/// (refused, over budget, too slow) name its `request_id` themselves.
async fn log_request(request: Request, next: axum::middleware::Next) -> Response {
    let started = std::time::Instant::now();
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let request_id = request_id(&request).to_owned();
    let span = tracing::debug_span!("request", request_id, method = %method, route);
    let response = next.run(request).instrument(span).await;
    tracing::info!(
        request_id,
        method = %method,
        route,
        status = response.status().as_u16(),
        latency_ms = started.elapsed().as_millis() as u64,
        "request completed"
    );
    response
}

async fn route_not_found() -> ApiError {
    ApiError::RouteNotFound
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
