//! `GET /pair/{phone}/events`: the session's state pushed as Server-Sent
//! Events, so a page shows the code, the QR and the outcome as they happen
//! instead of polling.
//!
//! Each event is `event: state` with the same JSON as `GET /pair/{phone}`.
//! The current state comes first (so a client that reconnects is up to date
//! at once), then one event per change; after a final state the stream
//! ends. States that change faster than a client reads are coalesced: the
//! client always gets the newest. While nothing changes, a keep-alive
//! comment goes out every `SSE_KEEPALIVE_SECS`.
//!
//! `EventSource` cannot set headers, so this route (like the QR pictures)
//! also takes the caller's token as `?access_token=` (see `auth`).

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderName, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use futures::stream::{self, StreamExt as _};
use tokio::sync::watch;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Caller;
use super::error::ErrorBody;
use super::extract::{PhoneParam, PhonePath};
use super::pair::actor;
use super::{ApiError, AppState};
use crate::phone::PhoneNumber;
use crate::session::{Actor, PairState, SessionError, Sessions, StateFeed};

/// The SSE event name of a state.
pub const STATE_EVENT: &str = "state";
/// The reconnection delay sent with a final state: `EventSource` reconnects
/// by itself whenever a stream ends, and after the outcome there is nothing
/// more to hear (a page should `close()` it; this is for one that does not).
pub const AFTER_FINAL_RETRY: std::time::Duration = std::time::Duration::from_secs(86_400);

/// How often an event stream on a process that does not run the session
/// reads the session's state from the store (a `GET` and an attempt at the
/// lease: about what a client that reconnected after every event would
/// cost, without the reconnects).
pub const FOLLOW_EVERY: std::time::Duration = std::time::Duration::from_secs(3);

/// The event stream route.
pub fn routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new().routes(routes!(events))
}

/// The session's state as Server-Sent Events.
#[utoipa::path(
    get,
    path = "/pair/{phone}/events",
    tag = "pairing",
    params(
        PhoneParam,
        ("access_token" = Option<String>, Query, description = "The caller's token, for clients that cannot send `Authorization` (`EventSource`)"),
    ),
    responses(
        (status = 200, description = "`text/event-stream`: `event: state` with the state JSON, the current state first, one per change, ending after a final state", content_type = "text/event-stream", body = String),
        (status = 403, description = "`forbidden`: another account started this session", body = ErrorBody),
        (status = 404, description = "`not_found`: no session for this phone", body = ErrorBody),
        (status = 422, description = "`invalid_phone`", body = ErrorBody),
        (status = 503, description = "`store_unavailable`", body = ErrorBody),
    ),
    security((), ("bearer" = [])),
)]
async fn events(
    State(app): State<Arc<AppState>>,
    caller: Caller,
    PhonePath(phone): PhonePath,
) -> Result<Response, ApiError> {
    let actor = actor(&app, &caller, None);
    let feed = app.sessions.watch(&phone, &actor).await?;
    let states = match feed {
        StateFeed::Live(states) => live(states).boxed(),
        // Another process runs it: followed through the store.
        StateFeed::Stored(state) if !state.status.is_terminal() => {
            followed(Arc::clone(&app.sessions), phone, actor, *state).boxed()
        }
        StateFeed::Stored(state) => stream::once(async move { *state }).boxed(),
    };
    let events = states.map(|state| Ok::<_, Infallible>(state_event(&state)));
    let mut response = Sse::new(events)
        .keep_alive(
            KeepAlive::new()
                .interval(app.sse_keepalive)
                .text("keep-alive"),
        )
        .into_response();
    // Proxies that buffer (nginx and its kin) would hold events back.
    response.headers_mut().insert(
        HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    Ok(response)
}

/// The states of a running session: the current one, then each change,
/// ending after a final one (or when the session is gone).
fn live(states: watch::Receiver<PairState>) -> impl Stream<Item = PairState> {
    stream::unfold(
        (states, true, false),
        |(mut states, first, ended)| async move {
            if ended || (!first && states.changed().await.is_err()) {
                return None;
            }
            let state = states.borrow_and_update().clone();
            let ended = state.status.is_terminal();
            Some((state, (states, false, ended)))
        },
    )
}

/// The states of a session another process runs, as the store has them:
/// `first`, then a look every [`FOLLOW_EVERY`], one event per new state,
/// ending after a final one, when the session is gone from the store, or
/// (without a final event: the page reconnects elsewhere) when this process
/// stops. A look the store does not answer is tried again at the next.
/// Should the session come to run here meanwhile (its process stopped),
/// the looks read it here.
fn followed(
    sessions: Arc<Sessions>,
    phone: PhoneNumber,
    actor: Actor,
    first: PairState,
) -> impl Stream<Item = PairState> {
    let following = Following {
        stopping: sessions.stopping(),
        sessions,
        phone,
        actor,
        pending: Some(first),
        last_seq: None,
        ended: false,
    };
    stream::unfold(following, |mut f| async move {
        if f.ended {
            return None;
        }
        loop {
            if let Some(state) = f.pending.take()
                && f.last_seq != Some(state.seq)
            {
                f.last_seq = Some(state.seq);
                f.ended = state.status.is_terminal();
                return Some((state, f));
            }
            tokio::select! {
                () = tokio::time::sleep(FOLLOW_EVERY) => {}
                _ = f.stopping.wait_for(|stop| *stop) => return None,
            }
            match f.sessions.follow(&f.phone, &f.actor).await {
                Ok(Some(state)) => f.pending = Some(state),
                Ok(None) | Err(SessionError::Forbidden | SessionError::NotFound) => {
                    return None;
                }
                // The store did not answer: the next look.
                Err(_) => {}
            }
        }
    })
}

/// What [`followed`] carries from one look to the next.
struct Following {
    sessions: Arc<Sessions>,
    phone: PhoneNumber,
    actor: Actor,
    /// Whether this process is stopping.
    stopping: watch::Receiver<bool>,
    /// A state read but not yet sent.
    pending: Option<PairState>,
    /// The `seq` of the last state sent: the same state is not sent twice.
    last_seq: Option<u64>,
    /// A final state was sent: nothing follows it.
    ended: bool,
}

fn state_event(state: &PairState) -> Event {
    let event = Event::default()
        .event(STATE_EVENT)
        .json_data(state)
        // Serializing our own state cannot fail; if it ever did, the
        // client still learns that something changed.
        .unwrap_or_else(|_| Event::default().event(STATE_EVENT).data("{}"));
    match state.status.is_terminal() {
        true => event.retry(AFTER_FINAL_RETRY),
        false => event,
    }
}
