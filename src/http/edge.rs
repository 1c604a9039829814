//! What every routed request passes through first, in one layer: its
//! request id, its deadline and its log line.
//!
//! One hand-written service rather than a stack of `from_fn` and
//! `tower-http` layers: each layer of that stack cloned a boxed service and
//! boxed a future of its own on every request. This layer, with the two
//! caller checks merged into one (`http::admit`), cut `GET /pair/{phone}`
//! from 70k to 59k instructions (callgrind; docs/BENCHMARKS.md).
//!
//! In order, for each request:
//! 1. **Request id.** A client's `x-request-id` is kept when it is short
//!    and printable (it goes into every log line of the request); otherwise
//!    a random UUID replaces it. The answer carries the same id.
//! 2. **Deadline.** A request not answered by its deadline gets
//!    `408 request_timeout` (the handler is dropped; a session it started
//!    goes on). `POST /pair` gets the code wait on top, since waiting for
//!    the code is its job.
//! 3. **Log line.** One line per request when the answer is ready:
//!    `request_id`, `method`, the *matched* route (never the raw path:
//!    `/pair/{phone}` must not put a phone number in the logs), `status` and
//!    `latency_ms`, under the target `wa_pair::http` (what `RUST_LOG`
//!    directives and log filters name).
//!
//! No span per request at the default level: creating, entering and leaving
//! one on every poll cost more than the line itself. With
//! `RUST_LOG=wa_pair=debug` a `request` span with the same fields wraps the
//! request, so debug lines carry them; the few warnings about a request
//! (refused, over budget, too slow) name its `request_id` themselves.

use std::convert::Infallible;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderValue, Method};
use axum::response::{IntoResponse, Response};
use futures::future::BoxFuture;
use tower::{Layer, Service};
use tracing::Instrument;

use super::{ApiError, MAX_REQUEST_ID_LEN, REQUEST_ID_HEADER};
use crate::session::PREVIOUS_SESSION_WAIT;

/// The target of the request lines, as before they came from this module.
const LOG_TARGET: &str = "wa_pair::http";

/// Longest time any request but `POST /pair` may take. A refresh waits up
/// to `COMMAND_REPLY_TIMEOUT` (20 s) for its session, so this is above it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The deadline of each kind of request.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    /// Any request but `POST /pair`.
    pub default: Duration,
    /// `POST /pair`: reading the body, waiting for a previous session of the
    /// number to let go, then for the first code.
    pub pair: Duration,
}

impl Deadlines {
    /// The deadlines for a service whose `POST /pair` waits `code_wait`.
    pub fn for_code_wait(code_wait: Duration) -> Self {
        Self {
            default: REQUEST_TIMEOUT,
            pair: REQUEST_TIMEOUT + PREVIOUS_SESSION_WAIT + code_wait,
        }
    }

    fn of(&self, request: &Request) -> Duration {
        if request.method() == Method::POST && request.uri().path() == "/pair" {
            self.pair
        } else {
            self.default
        }
    }
}

/// Wraps each route in an [`Edge`].
#[derive(Debug, Clone, Copy)]
pub struct EdgeLayer {
    deadlines: Deadlines,
}

impl EdgeLayer {
    /// Requests get `deadlines`.
    pub fn new(deadlines: Deadlines) -> Self {
        Self { deadlines }
    }
}

impl<S> Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, inner: S) -> Edge<S> {
        Edge {
            inner,
            deadlines: self.deadlines,
        }
    }
}

/// The service [`EdgeLayer`] puts in front of a route.
#[derive(Debug, Clone)]
pub struct Edge<S> {
    inner: S,
    deadlines: Deadlines,
}

impl<S> Service<Request> for Edge<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let started = Instant::now();
        let request_id = assign_request_id(&mut request);
        let method = request.method().clone();
        let route = request.extensions().get::<MatchedPath>().cloned();
        let deadline = self.deadlines.of(&request);
        let span = tracing::debug_span!(
            "request",
            request_id = log_text(&request_id),
            method = method.as_str(),
            route = route_text(route.as_ref()),
        );
        // Calling the route here, not in the future, spares cloning it: our
        // `poll_ready` readied it for exactly this call.
        let answer = span.in_scope(|| self.inner.call(request));
        Box::pin(async move {
            let request_id_text = log_text(&request_id);
            let mut response = match tokio::time::timeout(deadline, answer)
                .instrument(span)
                .await
            {
                Ok(Ok(response)) => response,
                Ok(Err(never)) => match never {},
                Err(_) => {
                    tracing::warn!(
                        target: LOG_TARGET,
                        request_id = request_id_text,
                        deadline_ms = deadline.as_millis() as u64,
                        "request deadline passed"
                    );
                    ApiError::RequestTimeout.into_response()
                }
            };
            tracing::info!(
                target: LOG_TARGET,
                request_id = request_id_text,
                method = method.as_str(),
                route = route_text(route.as_ref()),
                status = response.status().as_u16(),
                latency_ms = started.elapsed().as_millis() as u64,
                "request completed"
            );
            response
                .headers_mut()
                .entry(REQUEST_ID_HEADER)
                .or_insert(request_id);
            Ok(response)
        })
    }
}

/// Keeps the client's request id when it is fit for the logs, otherwise
/// sets a fresh one; returns it.
fn assign_request_id(request: &mut Request) -> HeaderValue {
    if let Some(id) = request.headers().get(REQUEST_ID_HEADER)
        && fit_request_id(id.as_bytes())
    {
        return id.clone();
    }
    let id = fresh_request_id();
    request.headers_mut().insert(REQUEST_ID_HEADER, id.clone());
    id
}

/// A client's request id is kept when it is 1 to [`MAX_REQUEST_ID_LEN`]
/// letters, digits and `-_.:`.
fn fit_request_id(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= MAX_REQUEST_ID_LEN
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(b))
}

/// A random (v4) UUID. From the thread's generator, not the operating
/// system's: asking the kernel cost a system call per request.
fn fresh_request_id() -> HeaderValue {
    let uuid = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    // A hyphenated UUID is always a valid header value; the fallback only
    // keeps a panic off the request path.
    HeaderValue::from_str(uuid.hyphenated().encode_lower(&mut text)).unwrap_or(
        HeaderValue::from_static("00000000-0000-0000-0000-000000000000"),
    )
}

/// A request id as the log shows it (ids are checked printable ASCII).
fn log_text(id: &HeaderValue) -> &str {
    id.to_str().unwrap_or("")
}

fn route_text(route: Option<&MatchedPath>) -> &str {
    route.map_or("unmatched", MatchedPath::as_str)
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::body::Body;
    use axum::routing::{get, post};
    use tower::ServiceExt;

    use super::*;

    fn slow_routes(deadlines: Deadlines) -> Router {
        async fn slow() -> &'static str {
            tokio::time::sleep(Duration::from_secs(5)).await;
            "done"
        }
        Router::new()
            .route("/pair", post(slow))
            .route("/slow", get(slow))
            .fallback(|| async { axum::http::StatusCode::NOT_FOUND })
            .layer(EdgeLayer::new(deadlines))
    }

    fn request(method: Method, path: &str) -> Request {
        Request::builder()
            .method(method)
            .uri(path)
            .body(Body::empty())
            .expect("request")
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_past_its_deadline_answers_408_and_pair_gets_longer() {
        let routes = slow_routes(Deadlines {
            default: Duration::from_secs(2),
            pair: Duration::from_secs(10),
        });

        let slow = routes
            .clone()
            .oneshot(request(Method::GET, "/slow"))
            .await
            .expect("answered");
        let pair = routes
            .oneshot(request(Method::POST, "/pair"))
            .await
            .expect("answered");

        assert_eq!(slow.status(), axum::http::StatusCode::REQUEST_TIMEOUT);
        assert_eq!(pair.status(), axum::http::StatusCode::OK);
    }

    #[tokio::test(start_paused = true)]
    async fn every_answer_carries_a_request_id_and_one_request_line() {
        // Arrange
        let routes = slow_routes(Deadlines {
            default: Duration::from_secs(2),
            pair: Duration::from_secs(10),
        });
        let (subscriber, logs) = crate::telemetry::capture_subscriber();
        let _logging = tracing::subscriber::set_default(subscriber);
        let mut kept = request(Method::GET, "/unknown");
        kept.headers_mut()
            .insert(REQUEST_ID_HEADER, HeaderValue::from_static("client-id.1"));
        let mut unfit = request(Method::GET, "/slow");
        unfit
            .headers_mut()
            .insert(REQUEST_ID_HEADER, HeaderValue::from_static("no spaces"));

        // Act
        let not_found = routes.clone().oneshot(kept).await.expect("answered");
        let timed_out = routes.oneshot(unfit).await.expect("answered");

        // Assert
        assert_eq!(not_found.headers()[REQUEST_ID_HEADER], "client-id.1");
        let fresh = timed_out.headers()[REQUEST_ID_HEADER].to_str().unwrap();
        assert!(uuid::Uuid::parse_str(fresh).is_ok(), "{fresh}");
        let lines: Vec<serde_json::Value> = logs
            .contents()
            .lines()
            .map(|line| serde_json::from_str(line).expect("JSON"))
            .filter(|line: &serde_json::Value| line["message"] == "request completed")
            .collect();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[0]["target"], "wa_pair::http");
        assert_eq!(lines[0]["request_id"], "client-id.1");
        assert_eq!(lines[0]["route"], "unmatched");
        assert_eq!(lines[0]["status"], 404);
        assert_eq!(lines[1]["request_id"], fresh);
        assert_eq!(lines[1]["route"], "/slow");
        assert_eq!(lines[1]["status"], 408);
    }

    #[test]
    fn pair_waits_for_its_code_on_top_of_the_default() {
        let deadlines = Deadlines::for_code_wait(Duration::from_secs(20));

        assert_eq!(deadlines.default, REQUEST_TIMEOUT);
        assert_eq!(
            deadlines.pair,
            REQUEST_TIMEOUT + PREVIOUS_SESSION_WAIT + Duration::from_secs(20)
        );
    }
}
