//! `RedisStore` against a real Redis server (`REDIS_TEST_URL`, else
//! `redis://127.0.0.1:6379`): the same semantics as the other stores,
//! including the counting script, which here runs on real Redis. A test
//! that cannot reach the server fails; it never passes without one.

use std::sync::Arc;
use std::time::Duration;

use wa_pair::store::{PairingStore, RedisStore, StoreError, Written};

use crate::helpers::{
    TestApp, as_shown, assert_a_hand_over_writes_lists_and_releases_at_once,
    assert_a_lost_lease_fences_writes, assert_leases_go_to_one_holder_at_a_time,
    assert_messages_reach_the_subscribers_of_their_channel, assert_refuses_a_late_state,
    redis_store, redis_test_url,
};

/// A store on the test server, with a key prefix of its own.
async fn store() -> (RedisStore, String) {
    redis_store().await
}

/// The key's TTL in seconds as the server has it.
async fn ttl_of(key: &str) -> i64 {
    let client = redis::Client::open(redis_test_url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("TTL")
        .arg(key)
        .query_async(&mut connection)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_value_is_stored_with_its_ttl_read_back_and_deleted() {
    // Arrange
    let (store, prefix) = store().await;
    let key = format!("{prefix}628123456789");

    // Act
    store
        .set(
            &key,
            r#"{"status":"pending"}"#,
            Duration::from_millis(600_001),
        )
        .await
        .unwrap();
    let read = store.get(&key).await.unwrap();
    let ttl = ttl_of(&key).await;
    store.delete(&key).await.unwrap();
    let after = store.get(&key).await.unwrap();
    let delete_again = store.delete(&key).await;

    // Assert
    assert_eq!(read.as_deref(), Some(r#"{"status":"pending"}"#));
    assert!(
        (599..=601).contains(&ttl),
        "rounded up to whole seconds: {ttl}"
    );
    assert_eq!(after, None);
    assert!(delete_again.is_ok(), "deleting a missing key is no error");
    assert_eq!(store.kind(), "redis");
}

#[tokio::test]
async fn the_counting_script_counts_in_a_fixed_window_that_does_not_slide() {
    // Arrange
    let (store, prefix) = store().await;
    let key = format!("{prefix}budget:628123456789");
    let window = Duration::from_secs(2);

    // Act
    let first = store.count(&key, window).await.unwrap();
    let second = store.count(&key, window).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    let after_window = store.count(&key, window).await.unwrap();

    // Assert
    assert_eq!((first.count, second.count), (1, 2));
    assert!(second.window_left <= window, "{second:?}");
    assert_eq!(after_window.count, 1, "a new window opens");
    store.delete(&key).await.unwrap();
}

#[tokio::test]
async fn an_unreachable_server_is_a_transport_error_not_a_hang() {
    // Arrange: nothing listens on port 1.
    let store = RedisStore::new("redis://127.0.0.1:1").unwrap();

    // Act
    let started = std::time::Instant::now();
    let error = store.get("wa:pair:628123456789").await.unwrap_err();

    // Assert
    assert!(
        matches!(error, StoreError::Transport(_) | StoreError::Timeout),
        "{error:?}"
    );
    assert!(error.is_retryable());
    assert!(started.elapsed() < Duration::from_secs(6));
}

#[tokio::test]
async fn a_pairing_flow_on_redis_stores_exactly_what_the_api_answers() {
    // Arrange
    let (store, prefix) = store().await;
    let store = Arc::new(store);
    let app = TestApp::spawn_with(store.clone(), |config| {
        config.key_prefix = prefix.clone();
    })
    .await;

    // Act
    let posted: serde_json::Value = app.post_pair("628123456789").await.json().await.unwrap();
    let stored = store
        .get(&format!("{prefix}628123456789"))
        .await
        .unwrap()
        .expect("stored");
    app.fake()
        .enter_code("628123456789", posted["code"].as_str().unwrap())
        .await
        .expect("links");
    let linked = app
        .wait_for_state("628123456789", |s| s["status"] == "linked")
        .await;

    // Assert
    assert_eq!(as_shown(&stored), posted);
    assert_eq!(linked["status"], "linked");
    let budget = store
        .get(&format!("{prefix}budget:628123456789"))
        .await
        .unwrap();
    assert_eq!(
        budget.as_deref(),
        Some("1"),
        "the code budget counted on Redis"
    );
    for key in ["", "budget:"] {
        store
            .delete(&format!("{prefix}{key}628123456789"))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_state_older_than_the_stored_one_is_refused_by_the_script_on_redis() {
    let (store, prefix) = store().await;

    assert_refuses_a_late_state(&store, &format!("{prefix}628123456789")).await;
}

#[tokio::test]
async fn a_phones_lease_goes_to_one_process_at_a_time_on_redis() {
    let (store, prefix) = store().await;

    assert_leases_go_to_one_holder_at_a_time(&store, &format!("{prefix}lease:628123456789")).await;
}

#[tokio::test]
async fn a_write_after_the_lease_was_taken_over_is_refused_on_redis() {
    let (store, prefix) = store().await;

    assert_a_lost_lease_fences_writes(
        &store,
        &format!("{prefix}628123456789"),
        &format!("{prefix}lease:628123456789"),
    )
    .await;
}

#[tokio::test]
async fn a_hand_over_writes_lists_and_gives_the_lease_up_in_one_script_on_redis() {
    let (store, prefix) = store().await;

    assert_a_hand_over_writes_lists_and_releases_at_once(&store, &prefix).await;
}

#[tokio::test]
async fn messages_published_on_redis_reach_the_subscribers_of_their_channel() {
    let (store, prefix) = store().await;

    assert_messages_reach_the_subscribers_of_their_channel(&store, &format!("{prefix}process:a"))
        .await;
}

#[tokio::test]
async fn the_memory_store_relays_messages_as_redis_does() {
    let store = wa_pair::store::MemoryStore::new();

    assert_messages_reach_the_subscribers_of_their_channel(&store, "wa:pair:process:a").await;
}

#[tokio::test]
async fn the_memory_store_hands_over_as_redis_does() {
    let store = wa_pair::store::MemoryStore::new();

    assert_a_hand_over_writes_lists_and_releases_at_once(&store, "wa:pair:").await;
}

#[tokio::test]
async fn a_seq_inside_the_message_text_does_not_fool_the_script() {
    // Arrange: the state's own seq comes first; free text after it quotes
    // a higher one.
    let (store, prefix) = store().await;
    let key = format!("{prefix}628123456789");
    let ttl = Duration::from_secs(60);
    let stored = r#"{"status":"failed","seq":100,"message":"see \"seq\":999"}"#;
    store.set_state(&key, stored, 100, ttl, None).await.unwrap();

    // Act
    let newer = store
        .set_state(&key, r#"{"status":"starting","seq":200}"#, 200, ttl, None)
        .await
        .unwrap();

    // Assert
    assert_eq!(newer, Written::Stored);
    store.delete(&key).await.unwrap();
}

#[tokio::test]
async fn the_memory_store_keeps_leases_and_fences_writes_as_redis_does() {
    let store = wa_pair::store::MemoryStore::new();

    assert_leases_go_to_one_holder_at_a_time(&store, "wa:pair:lease:628123456789").await;
    assert_a_lost_lease_fences_writes(&store, "wa:pair:628123456789", "wa:pair:lease:628123456789")
        .await;
}
