//! Every request has a deadline, so no client (slow body, stuck session)
//! holds a connection and a handler forever. `POST /pair` gets the code
//! wait on top, since waiting for the code is its job.

use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;

use super::ApiError;
use crate::session::PREVIOUS_SESSION_WAIT;

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
}

/// Middleware: answers 408 `request_timeout` when the request is not
/// answered by its deadline (the handler is dropped; a session it started
/// goes on).
pub async fn enforce(
    State(deadlines): State<Deadlines>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let deadline = if request.method() == Method::POST && request.uri().path() == "/pair" {
        deadlines.pair
    } else {
        deadlines.default
    };
    let request_id = crate::http::request_id(&request).to_owned();
    tokio::time::timeout(deadline, next.run(request))
        .await
        .map_err(|_| {
            tracing::warn!(
                request_id,
                deadline_ms = deadline.as_millis() as u64,
                "request deadline passed"
            );
            ApiError::RequestTimeout
        })
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
            .layer(axum::middleware::from_fn_with_state(deadlines, enforce))
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
