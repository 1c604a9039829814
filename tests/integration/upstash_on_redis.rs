//! The Upstash REST store against real Redis semantics: a small front that
//! speaks Upstash's REST protocol (`POST /` with the command as a JSON
//! array, `Authorization: Bearer <token>`, `{"result": …}` or
//! `{"error": …}`) over a real Redis server, so the store's commands, and
//! its counting script above all, run on Redis itself (wiremock cannot run
//! Lua). Needs the same server as `redis_store.rs`; fails without one.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};
use wa_pair::store::{PairingStore, StoreError, UpstashSettings, UpstashStore};

use crate::helpers::{
    assert_a_hand_over_writes_lists_and_releases_at_once, assert_a_lost_lease_fences_writes,
    assert_leases_go_to_one_holder_at_a_time,
    assert_messages_reach_the_subscribers_of_their_channel, assert_refuses_a_late_state,
    redis_test_url,
};

const TOKEN: &str = "upstash-front-token";

/// Redis's reply as Upstash's REST API writes it.
fn as_json(value: redis::Value) -> Value {
    match value {
        redis::Value::Nil => Value::Null,
        redis::Value::Int(n) => json!(n),
        redis::Value::BulkString(bytes) => json!(String::from_utf8_lossy(&bytes)),
        redis::Value::SimpleString(text) => json!(text),
        redis::Value::Okay => json!("OK"),
        redis::Value::Array(items) | redis::Value::Set(items) => {
            Value::Array(items.into_iter().map(as_json).collect())
        }
        other => json!(format!("{other:?}")),
    }
}

/// Starts the front on a loopback port; returns its URL.
async fn upstash_front() -> String {
    let client = redis::Client::open(redis_test_url()).unwrap();
    let connection = match client.get_multiplexed_async_connection().await {
        Ok(connection) => connection,
        Err(e) => panic!(
            "no Redis server at {} ({e}): start one (apt-get install redis-server) or set REDIS_TEST_URL",
            redis_test_url()
        ),
    };
    let app = axum::Router::new().route(
        "/",
        axum::routing::post(
            move |headers: HeaderMap, Json(command): Json<Vec<String>>| {
                let mut connection = connection.clone();
                async move {
                    let bearer = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("Bearer "));
                    if bearer != Some(TOKEN) {
                        return (
                            StatusCode::UNAUTHORIZED,
                            Json(json!({ "error": "Unauthorized" })),
                        );
                    }
                    let Some((name, args)) = command.split_first() else {
                        return (
                            StatusCode::BAD_REQUEST,
                            Json(json!({ "error": "empty command" })),
                        );
                    };
                    let reply: redis::RedisResult<redis::Value> = redis::cmd(name)
                        .arg(args)
                        .query_async(&mut connection)
                        .await;
                    match reply {
                        Ok(value) => (StatusCode::OK, Json(json!({ "result": as_json(value) }))),
                        Err(e) => (
                            StatusCode::BAD_REQUEST,
                            Json(json!({ "error": e.to_string() })),
                        ),
                    }
                }
            },
        ),
    );
    // Upstash's REST subscription: an event stream, `subscribe,<channel>,1`
    // first, then `message,<channel>,<message>` per message.
    let app = app.route(
        "/subscribe/{channel}",
        axum::routing::post(
            |headers: HeaderMap, axum::extract::Path(channel): axum::extract::Path<String>| async move {
                use axum::response::IntoResponse as _;
                use futures::StreamExt as _;
                let bearer = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "));
                if bearer != Some(TOKEN) {
                    return StatusCode::UNAUTHORIZED.into_response();
                }
                let client = redis::Client::open(redis_test_url()).unwrap();
                let mut pubsub = client.get_async_pubsub().await.unwrap();
                pubsub.subscribe(&channel).await.unwrap();
                let first = format!("data: subscribe,{channel},1\n\n");
                let messages = pubsub.into_on_message().map(move |message| {
                    let payload: String = message.get_payload().unwrap_or_default();
                    Ok::<_, std::convert::Infallible>(format!(
                        "data: message,{channel},{payload}\n\n"
                    ))
                });
                let events = futures::stream::once(async move { Ok(first) }).chain(messages);
                (
                    [(axum::http::header::CONTENT_TYPE, "text/event-stream")],
                    axum::body::Body::from_stream(events),
                )
                    .into_response()
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

fn key(name: &str) -> String {
    format!("test:{}:{name}", uuid::Uuid::new_v4().simple())
}

#[tokio::test]
async fn the_upstash_store_keeps_its_semantics_on_real_redis() {
    // Arrange
    let store = UpstashStore::new(UpstashSettings::new(upstash_front().await, TOKEN)).unwrap();
    let state = key("628123456789");

    // Act
    store.ping().await.expect("PING");
    store
        .set(&state, r#"{"status":"pending"}"#, Duration::from_secs(600))
        .await
        .expect("SET");
    let read = store.get(&state).await.expect("GET");
    store.delete(&state).await.expect("DEL");
    let gone = store.get(&state).await.expect("GET");

    // Assert
    assert_eq!(read.as_deref(), Some(r#"{"status":"pending"}"#));
    assert_eq!(gone, None);
}

#[tokio::test]
async fn the_upstash_counting_script_runs_on_real_redis_in_a_fixed_window() {
    // Arrange
    let store = UpstashStore::new(UpstashSettings::new(upstash_front().await, TOKEN)).unwrap();
    let budget = key("budget:628123456789");
    let window = Duration::from_secs(2);

    // Act
    let first = store.count(&budget, window).await.expect("EVAL");
    let second = store.count(&budget, window).await.expect("EVAL");
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    let after = store.count(&budget, window).await.expect("EVAL");

    // Assert
    assert_eq!((first.count, second.count, after.count), (1, 2, 1));
    assert!(first.window_left <= window && !first.window_left.is_zero());
    store.delete(&budget).await.unwrap();
}

#[tokio::test]
async fn a_wrong_upstash_token_is_unauthorized() {
    let store =
        UpstashStore::new(UpstashSettings::new(upstash_front().await, "not-the-token")).unwrap();

    let error = store.ping().await.unwrap_err();

    assert!(matches!(error, StoreError::Unauthorized), "{error:?}");
}

#[tokio::test]
async fn a_phones_lease_goes_to_one_process_at_a_time_through_upstash_eval() {
    let store = UpstashStore::new(UpstashSettings::new(upstash_front().await, TOKEN)).unwrap();

    assert_leases_go_to_one_holder_at_a_time(&store, &key("lease:628123456789")).await;
}

#[tokio::test]
async fn a_write_after_the_lease_was_taken_over_is_refused_through_upstash_eval() {
    let store = UpstashStore::new(UpstashSettings::new(upstash_front().await, TOKEN)).unwrap();

    assert_a_lost_lease_fences_writes(&store, &key("628123456789"), &key("lease:628123456789"))
        .await;
}

#[tokio::test]
async fn a_hand_over_writes_lists_and_gives_the_lease_up_through_upstash_eval() {
    let store = UpstashStore::new(UpstashSettings::new(upstash_front().await, TOKEN)).unwrap();

    assert_a_hand_over_writes_lists_and_releases_at_once(&store, &key("")).await;
}

#[tokio::test]
async fn messages_reach_subscribers_through_upstash_publish_and_its_event_stream() {
    let store = UpstashStore::new(UpstashSettings::new(upstash_front().await, TOKEN)).unwrap();

    assert_messages_reach_the_subscribers_of_their_channel(&store, &key("process:a")).await;
}

#[tokio::test]
async fn a_state_older_than_the_stored_one_is_refused_through_upstash_eval() {
    let store = UpstashStore::new(UpstashSettings::new(upstash_front().await, TOKEN)).unwrap();

    assert_refuses_a_late_state(&store, &key("628123456789")).await;
}
