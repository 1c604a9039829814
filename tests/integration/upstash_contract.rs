//! Contract tests: `UpstashStore` against a fake Upstash REST endpoint.
//!
//! Each test pins the exact request that Upstash expects and the error a
//! given reply maps to, including how many HTTP requests were spent.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wa_pair::retry::Backoff;
use wa_pair::store::{PairingStore, StoreError, UpstashSettings, UpstashStore};
use wiremock::matchers::{body_json, body_string_contains, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const TOKEN: &str = "test-token";
const KEY: &str = "wa:pair:628123456789";
const VALUE: &str = r#"{"status":"pending"}"#;
const TEN_MINUTES: Duration = Duration::from_secs(600);

/// Backoff small enough that retry tests finish in milliseconds.
const FAST_BACKOFF: Backoff = Backoff::new(Duration::from_millis(1), Duration::from_millis(5));

/// Settings pointing at `server`, with fast retries.
fn settings_for(server: &MockServer) -> UpstashSettings {
    UpstashSettings {
        max_retries: 3,
        backoff: FAST_BACKOFF,
        ..UpstashSettings::new(server.uri(), TOKEN)
    }
}

fn store_for(server: &MockServer) -> UpstashStore {
    UpstashStore::new(settings_for(server)).expect("valid settings")
}

fn reply(status: u16, body: serde_json::Value) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_json(body)
}

async fn requests_received(server: &MockServer) -> usize {
    server
        .received_requests()
        .await
        .map_or(0, |requests| requests.len())
}

#[tokio::test]
async fn set_posts_the_exact_command_array_with_the_bearer_token() {
    // Arrange
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/"))
        .and(header("authorization", "Bearer test-token"))
        .and(header("content-type", "application/json"))
        .and(body_json(json!([
            "SET",
            "wa:pair:628123456789",
            "{\"status\":\"pending\"}",
            "EX",
            "600"
        ])))
        .respond_with(reply(200, json!({ "result": "OK" })))
        .expect(1)
        .mount(&server)
        .await;
    let store = store_for(&server);

    // Act
    let outcome = store.set(KEY, VALUE, TEN_MINUTES).await;

    // Assert
    assert!(outcome.is_ok(), "{outcome:?}");
    assert_eq!(requests_received(&server).await, 1);
}

#[tokio::test]
async fn a_trailing_slash_in_the_base_url_is_trimmed() {
    // Arrange
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/redis"))
        .respond_with(reply(200, json!({ "result": "PONG" })))
        .expect(1)
        .mount(&server)
        .await;
    let settings = UpstashSettings::new(format!("{}/redis/", server.uri()), TOKEN);
    let store = UpstashStore::new(settings).expect("valid settings");

    // Act
    let outcome = store.ping().await;

    // Assert
    assert!(outcome.is_ok(), "{outcome:?}");
}

#[tokio::test]
async fn get_returns_the_stored_string() {
    // Arrange
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(body_json(json!(["GET", KEY])))
        .respond_with(reply(200, json!({ "result": VALUE })))
        .expect(1)
        .mount(&server)
        .await;
    let store = store_for(&server);

    // Act
    let read = store.get(KEY).await;

    // Assert
    assert_eq!(read.ok().flatten().as_deref(), Some(VALUE));
}

#[tokio::test]
async fn get_of_a_missing_key_returns_none() {
    // Arrange
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(body_json(json!(["GET", KEY])))
        .respond_with(reply(200, json!({ "result": null })))
        .expect(1)
        .mount(&server)
        .await;
    let store = store_for(&server);

    // Act
    let read = store.get(KEY).await;

    // Assert
    assert!(matches!(read, Ok(None)), "{read:?}");
}

#[tokio::test]
async fn delete_posts_del_and_accepts_the_count() {
    // Arrange
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(body_json(json!(["DEL", KEY])))
        .respond_with(reply(200, json!({ "result": 1 })))
        .expect(1)
        .mount(&server)
        .await;
    let store = store_for(&server);

    // Act
    let outcome = store.delete(KEY).await;

    // Assert
    assert!(outcome.is_ok(), "{outcome:?}");
}

#[tokio::test]
async fn ping_posts_a_bare_ping_command() {
    // Arrange
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/"))
        .and(header("authorization", "Bearer test-token"))
        .and(body_json(json!(["PING"])))
        .respond_with(reply(200, json!({ "result": "PONG" })))
        .expect(1)
        .mount(&server)
        .await;
    let store = store_for(&server);

    // Act
    let outcome = store.ping().await;

    // Assert
    assert!(outcome.is_ok(), "{outcome:?}");
}

#[tokio::test]
async fn ping_is_tried_once_even_when_the_error_is_transient() {
    // Arrange
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(reply(503, json!({ "error": "unavailable" })))
        .mount(&server)
        .await;
    let store = store_for(&server);

    // Act
    let outcome = store.ping().await;

    // Assert
    assert!(
        matches!(outcome, Err(StoreError::Server { status: 503, .. })),
        "{outcome:?}"
    );
    assert_eq!(requests_received(&server).await, 1);
}

#[tokio::test]
async fn a_bad_token_is_unauthorized_after_one_request_and_the_error_hides_the_token() {
    // Arrange
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(reply(
            401,
            json!({ "error": "WRONGPASS invalid or missing auth token" }),
        ))
        .mount(&server)
        .await;
    let store = store_for(&server);

    // Act
    let outcome = store.set(KEY, VALUE, TEN_MINUTES).await;

    // Assert
    let error = outcome.expect_err("a 401 must fail");
    assert!(matches!(error, StoreError::Unauthorized), "{error:?}");
    assert!(!error.to_string().contains(TOKEN), "{error}");
    assert!(!format!("{error:?}").contains(TOKEN), "{error:?}");
    assert_eq!(requests_received(&server).await, 1);
}

#[tokio::test]
async fn server_errors_are_retried_until_the_command_succeeds() {
    // Arrange
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(reply(500, json!({ "error": "ERR internal" })))
        .up_to_n_times(2)
        .expect(2)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(reply(200, json!({ "result": "OK" })))
        .expect(1)
        .mount(&server)
        .await;
    let store = store_for(&server);

    // Act
    let outcome = store.set(KEY, VALUE, TEN_MINUTES).await;

    // Assert
    assert!(outcome.is_ok(), "{outcome:?}");
    assert_eq!(requests_received(&server).await, 3);
}

#[tokio::test]
async fn server_errors_are_returned_once_retries_are_exhausted() {
    // Arrange
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(reply(500, json!({ "error": "ERR internal" })))
        .mount(&server)
        .await;
    let store = store_for(&server);

    // Act
    let outcome = store.get(KEY).await;

    // Assert
    assert!(
        matches!(outcome, Err(StoreError::Server { status: 500, ref message }) if message == "ERR internal"),
        "{outcome:?}"
    );
    assert_eq!(requests_received(&server).await, 4);
}

#[tokio::test]
async fn a_rate_limit_with_retry_after_is_waited_out_then_the_command_succeeds() {
    // Arrange
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            reply(429, json!({ "error": "ERR too many requests" }))
                .insert_header("Retry-After", "1"),
        )
        .up_to_n_times(1)
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(reply(200, json!({ "result": "OK" })))
        .expect(1)
        .mount(&server)
        .await;
    let store = store_for(&server);
    let started = Instant::now();

    // Act
    let outcome = store.set(KEY, VALUE, TEN_MINUTES).await;

    // Assert
    assert!(outcome.is_ok(), "{outcome:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After of 1 s was not honoured: {:?}",
        started.elapsed()
    );
    assert_eq!(requests_received(&server).await, 2);
}

#[tokio::test]
async fn a_rate_limit_is_returned_with_its_hint_once_retries_are_exhausted() {
    // Arrange
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            reply(429, json!({ "error": "ERR too many requests" }))
                .insert_header("Retry-After", "0"),
        )
        .mount(&server)
        .await;
    let store = UpstashStore::new(UpstashSettings {
        max_retries: 1,
        ..settings_for(&server)
    })
    .expect("valid settings");

    // Act
    let outcome = store.set(KEY, VALUE, TEN_MINUTES).await;

    // Assert
    assert!(
        matches!(
            outcome,
            Err(StoreError::RateLimited {
                retry_after: Some(wait)
            }) if wait.is_zero()
        ),
        "{outcome:?}"
    );
    assert_eq!(requests_received(&server).await, 2);
}

#[tokio::test]
async fn a_retry_after_beyond_the_wait_limit_is_handed_back_without_waiting() {
    // Arrange
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            reply(429, json!({ "error": "ERR too many requests" }))
                .insert_header("Retry-After", "3600"),
        )
        .mount(&server)
        .await;
    let store = store_for(&server);
    let started = Instant::now();

    // Act
    let outcome = store.get(KEY).await;

    // Assert
    assert_eq!(
        outcome.err().and_then(|error| error.retry_after()),
        Some(Duration::from_secs(3600))
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(requests_received(&server).await, 1);
}

#[tokio::test]
async fn an_exhausted_daily_quota_is_not_retried() {
    // Arrange
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(reply(
            429,
            json!({ "error": "ERR max daily request limit exceeded" }),
        ))
        .mount(&server)
        .await;
    let store = store_for(&server);

    // Act
    let outcome = store.set(KEY, VALUE, TEN_MINUTES).await;

    // Assert
    assert!(
        matches!(outcome, Err(StoreError::RateLimited { .. })),
        "{outcome:?}"
    );
    assert_eq!(requests_received(&server).await, 1);
}

#[tokio::test]
async fn a_slow_reply_times_out_long_before_it_arrives() {
    // Arrange
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(reply(200, json!({ "result": "OK" })).set_delay(Duration::from_secs(2)))
        .mount(&server)
        .await;
    let store = UpstashStore::new(UpstashSettings {
        request_timeout: Duration::from_millis(200),
        max_retries: 0,
        ..settings_for(&server)
    })
    .expect("valid settings");
    let started = Instant::now();

    // Act
    let outcome = store.set(KEY, VALUE, TEN_MINUTES).await;

    // Assert
    let elapsed = started.elapsed();
    assert!(matches!(outcome, Err(StoreError::Timeout)), "{outcome:?}");
    assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
}

#[tokio::test]
async fn an_error_inside_a_200_reply_is_rejected_without_retrying() {
    // Arrange
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(reply(200, json!({ "error": "ERR syntax" })))
        .mount(&server)
        .await;
    let store = store_for(&server);

    // Act
    let outcome = store.set(KEY, VALUE, TEN_MINUTES).await;

    // Assert
    assert!(
        matches!(outcome, Err(StoreError::Rejected { status: 200, ref message }) if message == "ERR syntax"),
        "{outcome:?}"
    );
    assert_eq!(requests_received(&server).await, 1);
}

#[tokio::test]
async fn a_client_error_status_is_rejected_without_retrying() {
    // Arrange
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(reply(
            400,
            json!({ "error": "ERR wrong number of arguments" }),
        ))
        .mount(&server)
        .await;
    let store = store_for(&server);

    // Act
    let outcome = store.delete(KEY).await;

    // Assert
    assert!(
        matches!(outcome, Err(StoreError::Rejected { status: 400, .. })),
        "{outcome:?}"
    );
    assert_eq!(requests_received(&server).await, 1);
}

#[tokio::test]
async fn a_garbage_body_is_a_protocol_error() {
    // Arrange
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_string("<html>not json</html>"))
        .mount(&server)
        .await;
    let store = store_for(&server);

    // Act
    let outcome = store.get(KEY).await;

    // Assert
    assert!(
        matches!(outcome, Err(StoreError::Protocol(_))),
        "{outcome:?}"
    );
    assert_eq!(requests_received(&server).await, 1);
}

#[tokio::test]
async fn a_result_of_the_wrong_type_is_a_protocol_error() {
    // Arrange
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(reply(200, json!({ "result": 42 })))
        .mount(&server)
        .await;
    let store = store_for(&server);

    // Act
    let outcome = store.get(KEY).await;

    // Assert
    assert!(
        matches!(outcome, Err(StoreError::Protocol(_))),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn a_refused_connection_is_a_transport_error() {
    // Arrange
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let address = listener.local_addr().expect("local address");
    drop(listener);
    let store = UpstashStore::new(UpstashSettings {
        max_retries: 0,
        ..UpstashSettings::new(format!("http://{address}"), TOKEN)
    })
    .expect("valid settings");

    // Act
    let outcome = store.get(KEY).await;

    // Assert
    match outcome {
        Err(StoreError::Transport(message)) => assert!(!message.contains(TOKEN), "{message}"),
        other => panic!("expected a transport error, got {other:?}"),
    }
}

/// A stand-in for Upstash's counter: every `EVAL` of the count script adds
/// one, as Redis would, whichever client sends it.
struct Counter(std::sync::atomic::AtomicU64);

impl wiremock::Respond for Counter {
    fn respond(&self, _: &wiremock::Request) -> ResponseTemplate {
        let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        reply(200, json!({ "result": [n, 3599] }))
    }
}

#[tokio::test]
async fn count_sends_one_eval_with_the_key_and_window_and_reads_count_and_ttl() {
    // Arrange
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(body_string_contains("\"EVAL\""))
        .respond_with(Counter(Default::default()))
        .mount(&server)
        .await;
    let before_restart = store_for(&server);
    let after_restart = store_for(&server);

    // Act
    let first = before_restart.count(KEY, Duration::from_secs(3600)).await;
    let second = after_restart.count(KEY, Duration::from_secs(3600)).await;

    // Assert
    assert_eq!(first.unwrap().count, 1);
    let second = second.unwrap();
    assert_eq!(
        second.count, 2,
        "the count lives in the store, not the client"
    );
    assert_eq!(second.window_left, Duration::from_secs(3599));
    let sent: Vec<Value> = server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .map(|r| serde_json::from_slice(&r.body).unwrap())
        .collect();
    assert_eq!(sent.len(), 2, "one command per count, no retry");
    assert_eq!(sent[0][0], "EVAL");
    assert_eq!(sent[0][2], "1");
    assert_eq!(sent[0][3], KEY);
    assert_eq!(sent[0][4], "3600");
    let script = sent[0][1].as_str().unwrap();
    assert!(
        script.contains("INCR") && script.contains("EXPIRE"),
        "{script}"
    );
}

#[tokio::test]
async fn count_refuses_a_reply_that_is_not_count_and_ttl() {
    // Arrange
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(reply(200, json!({ "result": "OK" })))
        .mount(&server)
        .await;
    let store = store_for(&server);

    // Act
    let counted = store.count(KEY, Duration::from_secs(3600)).await;

    // Assert
    assert!(
        matches!(counted, Err(StoreError::Protocol(_))),
        "{counted:?}"
    );
}
