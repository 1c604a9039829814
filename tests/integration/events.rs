//! `GET /pair/{phone}/events`: the state pushed as Server-Sent Events, read
//! the way a browser's `EventSource` reads them. Real link client against
//! the fake WhatsApp.

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use wa_pair::config::Secret;
use wa_pair::store::MemoryStore;

use crate::helpers::{FLOW_TIMEOUT, TestApp};

const PHONE: &str = "628123456789";
const KEY: &str = "0123456789abcdef0123456789abcdef";

/// What one read of the stream brought.
#[derive(Debug, PartialEq)]
enum Sse {
    /// `event: state` with its JSON.
    State(Value),
    /// A comment line (`: keep-alive`).
    Comment(String),
    /// The server ended the stream.
    End,
}

/// Reads an event stream block by block (blocks end with a blank line).
pub(crate) struct SseReader {
    body: reqwest::Response,
    buffer: String,
}

impl SseReader {
    pub(crate) fn new(response: reqwest::Response) -> Self {
        Self {
            body: response,
            buffer: String::new(),
        }
    }

    async fn next(&mut self) -> Sse {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                return parse_block(block.trim_end());
            }
            match tokio::time::timeout(FLOW_TIMEOUT, self.body.chunk())
                .await
                .expect("the stream says something in time")
                .expect("the stream reads")
            {
                Some(chunk) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
                None => return Sse::End,
            }
        }
    }

    /// The next state, skipping keep-alives; `None` when the stream ended.
    pub(crate) async fn next_state(&mut self) -> Option<Value> {
        loop {
            match self.next().await {
                Sse::State(state) => return Some(state),
                Sse::Comment(_) => continue,
                Sse::End => return None,
            }
        }
    }
}

fn parse_block(block: &str) -> Sse {
    let mut event = None;
    let mut data = String::new();
    for line in block.lines() {
        if let Some(comment) = line.strip_prefix(':') {
            return Sse::Comment(comment.trim().to_owned());
        }
        if let Some(name) = line.strip_prefix("event:") {
            event = Some(name.trim().to_owned());
        }
        if let Some(chunk) = line.strip_prefix("data:") {
            data.push_str(chunk.trim_start());
        }
    }
    assert_eq!(event.as_deref(), Some("state"), "{block}");
    Sse::State(serde_json::from_str(&data).expect("the data is the state JSON"))
}

async fn open(app: &TestApp, phone: &str) -> reqwest::Response {
    app.get(&format!("/pair/{phone}/events")).await
}

#[tokio::test]
async fn events_stream_the_current_state_then_each_change_and_end_after_the_link() {
    // Arrange
    let app = TestApp::spawn().await;
    let posted: Value = app.post_pair(PHONE).await.json().await.unwrap();

    // Act
    let response = open(&app, PHONE).await;
    let headers = response.headers().clone();
    let mut events = SseReader::new(response);
    let first = events.next_state().await.expect("the current state");
    let code = first["code"].as_str().expect("a code").to_owned();
    app.fake()
        .enter_code(PHONE, &code)
        .await
        .expect("the code links");
    let mut after = Vec::new();
    while let Some(state) = events.next_state().await {
        after.push(state);
    }

    // Assert
    assert_eq!(headers["content-type"], "text/event-stream");
    assert_eq!(headers["cache-control"], "no-cache");
    assert_eq!(headers["x-accel-buffering"], "no");
    assert_eq!(first["status"], "pending");
    assert_eq!(first["code"], posted["code"]);
    let last = after.last().expect("the outcome came");
    assert_eq!(last["status"], "linked", "{after:?}");
    assert!(
        after[..after.len() - 1]
            .iter()
            .all(|s| s["status"] == "pending"),
        "in order, the outcome last: {after:?}"
    );
}

#[tokio::test]
async fn a_reconnecting_client_gets_the_current_state_first() {
    // Arrange: a client saw the first code, then lost its connection.
    let app = TestApp::spawn().await;
    app.post_pair(PHONE).await;
    let mut before = SseReader::new(open(&app, PHONE).await);
    let first = before.next_state().await.unwrap();
    drop(before);
    tokio::time::sleep(wa_pair::session::MANUAL_REFRESH_DEBOUNCE).await;
    let refreshed = app.refresh_json(PHONE).await;

    // Act
    let mut again = SseReader::new(open(&app, PHONE).await);
    let current = again.next_state().await.unwrap();

    // Assert
    assert_eq!(first["attempt"], 1);
    assert_eq!(current["attempt"], 2);
    assert_eq!(current["code"], refreshed["code"]);
}

#[tokio::test]
async fn an_ended_session_streams_its_outcome_once_and_ends() {
    // Arrange
    let app = TestApp::spawn().await;
    app.post_pair(PHONE).await;
    app.delete(&format!("/pair/{PHONE}")).await;
    app.until_released().await;

    // Act
    let mut events = SseReader::new(open(&app, PHONE).await);
    let outcome = events.next_state().await;
    let then = events.next_state().await;

    // Assert
    assert_eq!(outcome.expect("the outcome")["status"], "cancelled");
    assert_eq!(then, None, "the stream ended");
}

#[tokio::test]
async fn an_idle_stream_gets_keep_alive_comments() {
    // Arrange
    let app = TestApp::spawn_with(Arc::new(MemoryStore::new()), |config| {
        config.sse_keepalive = Duration::from_secs(1);
    })
    .await;
    app.post_pair(PHONE).await;
    let mut events = SseReader::new(open(&app, PHONE).await);
    events.next_state().await.expect("the current state");

    // Act
    let started = std::time::Instant::now();
    let next = events.next().await;

    // Assert
    assert_eq!(next, Sse::Comment("keep-alive".into()));
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn events_for_a_phone_without_a_session_are_404() {
    let app = TestApp::spawn().await;

    let response = open(&app, PHONE).await;

    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "not_found");
}

#[tokio::test]
async fn events_and_qr_pictures_take_the_token_from_the_query_and_other_routes_do_not() {
    // Arrange: callers configured; an EventSource cannot send headers.
    let app = TestApp::spawn_with(Arc::new(MemoryStore::new()), |config| {
        config.api_keys = vec![Secret::new(KEY)];
    })
    .await;
    let posted = app
        .http
        .post(format!("{}/pair", app.base))
        .bearer_auth(KEY)
        .json(&serde_json::json!({ "phone": PHONE }))
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), StatusCode::CREATED);
    let get = |path: String| app.http.get(format!("{}{path}", app.base)).send();

    // Act
    let without = get(format!("/pair/{PHONE}/events")).await.unwrap();
    let wrong = get(format!("/pair/{PHONE}/events?access_token=nope"))
        .await
        .unwrap();
    let with = get(format!("/pair/{PHONE}/events?access_token={KEY}"))
        .await
        .unwrap();
    let picture = get(format!("/pair/{PHONE}/qr.svg?access_token={KEY}"))
        .await
        .unwrap();
    let state = get(format!("/pair/{PHONE}?access_token={KEY}"))
        .await
        .unwrap();

    // Assert
    assert_eq!(without.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(with.status(), StatusCode::OK);
    assert_eq!(
        SseReader::new(with).next_state().await.unwrap()["status"],
        "pending"
    );
    assert_eq!(picture.status(), StatusCode::OK);
    assert_eq!(
        state.status(),
        StatusCode::UNAUTHORIZED,
        "the header is the way for everything else"
    );
}
