//! Two processes of the service on one store and one WhatsApp, as
//! replicas (or the old and new deployment during a deploy) are: one owner
//! per phone, and the other answers from the store.

use std::sync::Arc;

use futures::future::join_all;
use wa_pair::store::{MemoryStore, PairingStore};

use crate::helpers::{TestApp, redis_store};

const PHONE: &str = "628123456789";

#[tokio::test]
async fn concurrent_starts_on_two_replicas_open_one_whatsapp_pairing_and_both_show_its_code() {
    // Arrange: one store shared by two processes.
    let store: Arc<dyn PairingStore> = Arc::new(MemoryStore::new());
    let first = TestApp::spawn_with(Arc::clone(&store), |_| {}).await;
    let second = first.spawn_replica(Arc::clone(&store)).await;

    // Act: ten POST /pair for one phone, spread over both.
    let posts = (0..10).map(|n| {
        let app = if n % 2 == 0 { &first } else { &second };
        app.post_pair(PHONE)
    });
    let answers = join_all(posts).await;
    let on_first = first
        .wait_for_state(PHONE, |s| s["status"] == "pending")
        .await;
    let on_second = second
        .wait_for_state(PHONE, |s| s["status"] == "pending")
        .await;
    let record = first.fake().record(PHONE).expect("asked");

    // Assert
    for answer in &answers {
        assert!(answer.status().is_success(), "{}", answer.status());
    }
    assert_eq!(
        record.code_requests, 1,
        "one WhatsApp pairing for the phone"
    );
    assert_eq!(
        on_first["code"], on_second["code"],
        "both show the owner's code"
    );
    assert!(on_first["code"].is_string());
    let running = first.sessions.counts().live + second.sessions.counts().live;
    assert_eq!(running, 1, "one process runs the session");
}

#[tokio::test]
async fn a_start_while_another_process_holds_the_lease_is_not_answered_with_an_earlier_outcome() {
    // Arrange: an earlier session's outcome is stored, and another process
    // has just taken the phone's lease (its first write has not landed).
    let store: Arc<dyn PairingStore> = Arc::new(MemoryStore::new());
    let earlier = serde_json::json!({
        "phone": PHONE, "status": "cancelled", "code": null, "code_display": null,
        "issued_at": null, "expires_at": null, "refresh_at": null, "attempt": 1,
        "updated_at": "2026-01-01T00:00:00Z", "seq": 1, "reason": "cancelled"
    });
    store
        .set(
            &format!("wa:pair:{PHONE}"),
            &earlier.to_string(),
            std::time::Duration::from_secs(600),
        )
        .await
        .unwrap();
    store
        .lease(
            &format!("wa:pair:lease:{PHONE}"),
            wa_pair::store::LeaseStep::Take { holder: "another" },
            std::time::Duration::from_secs(60),
        )
        .await
        .unwrap();
    let app = TestApp::spawn_with(Arc::clone(&store), |_| {}).await;

    // Act
    let answer = app.post_pair(PHONE).await;
    let status = answer.status();
    let body: serde_json::Value = answer.json().await.unwrap();

    // Assert
    assert_eq!(status, reqwest::StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["status"], "starting");
    assert_eq!(
        app.fake().record(PHONE).map_or(0, |r| r.code_requests),
        0,
        "this process does not pair the phone"
    );
}

/// Two processes on one Redis (keys under a prefix of their own), both
/// listening for relayed commands; the first runs `PHONE`'s session and
/// answered `POST /pair` with the returned state.
async fn owner_and_replica_on_redis() -> (
    TestApp,
    TestApp,
    Arc<dyn PairingStore>,
    String,
    serde_json::Value,
) {
    let (store, prefix) = redis_store().await;
    let store: Arc<dyn PairingStore> = Arc::new(store);
    let owner = TestApp::spawn_with(Arc::clone(&store), |config| {
        config.key_prefix = prefix.clone();
    })
    .await;
    let other = owner.spawn_replica(Arc::clone(&store)).await;
    owner.sessions.until_relaying().await;
    other.sessions.until_relaying().await;
    let first: serde_json::Value = owner.post_pair(PHONE).await.json().await.unwrap();
    (owner, other, store, prefix, first)
}

#[tokio::test]
async fn a_stopping_replica_hands_its_session_over_and_the_other_stores_a_new_code_unasked() {
    // Arrange: two processes on one Redis; the first runs the phone's
    // session and shows a code.
    let (mut old, new, store, prefix, first) = owner_and_replica_on_redis().await;
    let key = format!("{prefix}{PHONE}");

    // Act: the first process stops (a deploy); nobody asks the second.
    let stopped_at = std::time::Instant::now();
    old.shutdown().await;
    let handed: serde_json::Value =
        serde_json::from_str(&store.get(&key).await.unwrap().expect("stored")).unwrap();
    let resumed = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        loop {
            let stored: serde_json::Value =
                serde_json::from_str(&store.get(&key).await.unwrap().expect("stored")).unwrap();
            if stored["status"] == "pending" {
                return stored;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("a new code stored");
    let took = stopped_at.elapsed();
    eprintln!("SIGTERM of the owner to a new code in the store: {took:?}");

    // Assert
    assert_eq!(first["status"], "pending");
    assert_eq!(handed["status"], "starting", "{handed}");
    assert_eq!(handed["reason"], "handed_over");
    assert!(
        handed["code"].is_null(),
        "the old connection's code is gone"
    );
    assert_eq!(resumed["attempt"], 2, "the same session goes on");
    assert_eq!(resumed["deadline"], first["deadline"]);
    assert_ne!(resumed["code"], first["code"]);
    assert!(
        took < wa_pair::session::RESUME_LOOK_EVERY + std::time::Duration::from_secs(15),
        "{took:?}"
    );
    assert_eq!(new.sessions.counts().live, 1, "the other process runs it");
    let shown = new.get_json(&format!("/pair/{PHONE}")).await;
    assert_eq!(shown["code"], resumed["code"]);
}

#[tokio::test]
async fn refresh_and_cancel_sent_to_the_replica_that_does_not_run_the_session_reach_the_owner() {
    // Arrange: two processes on one Redis; the first runs the session.
    let (owner, other, _store, _prefix, first) = owner_and_replica_on_redis().await;
    // A refresh right after a code answers that code.
    tokio::time::sleep(wa_pair::session::MANUAL_REFRESH_DEBOUNCE * 2).await;

    // Act
    let refreshed = other
        .post_json(&format!("/pair/{PHONE}/refresh"), serde_json::json!({}))
        .await;
    let refreshed_status = refreshed.status();
    let refreshed: serde_json::Value = refreshed.json().await.unwrap();
    let cancelled = other.delete(&format!("/pair/{PHONE}")).await;
    let cancelled_status = cancelled.status();
    let cancelled: serde_json::Value = cancelled.json().await.unwrap();
    let on_owner = owner.get_json(&format!("/pair/{PHONE}")).await;

    // Assert
    assert!(
        refreshed_status.is_success(),
        "{refreshed_status} {refreshed}"
    );
    assert_eq!(refreshed["status"], "pending");
    assert_eq!(refreshed["attempt"], 2, "the owner asked WhatsApp again");
    assert_ne!(refreshed["code"], first["code"]);
    assert!(
        cancelled_status.is_success(),
        "{cancelled_status} {cancelled}"
    );
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(on_owner["status"], "cancelled");
    assert_eq!(
        other.sessions.counts().live,
        0,
        "the other process ran nothing"
    );
    assert_eq!(
        owner.fake().record(PHONE).expect("asked").code_requests,
        2,
        "one WhatsApp pairing, two codes"
    );
}

#[tokio::test]
async fn the_event_stream_on_the_replica_that_does_not_run_the_session_follows_the_owner() {
    // Arrange: two processes on one Redis; the first runs the session; a
    // page watches it through the second.
    let (owner, other, _store, _prefix, first) = owner_and_replica_on_redis().await;
    let mut events =
        crate::events::SseReader::new(other.get(&format!("/pair/{PHONE}/events")).await);
    let shown_first = events.next_state().await.expect("the current state");
    tokio::time::sleep(wa_pair::session::MANUAL_REFRESH_DEBOUNCE * 2).await;

    // Act: the owner gets a new code, then the session is cancelled.
    let refreshed = owner.refresh_json(PHONE).await;
    let shown_refreshed = loop {
        let state = events.next_state().await.expect("a change");
        if state["code"] == refreshed["code"] {
            break state;
        }
    };
    owner.delete(&format!("/pair/{PHONE}")).await;
    let shown_last = loop {
        let state = events.next_state().await.expect("the outcome");
        if state["status"] != "pending" {
            break state;
        }
    };
    let after = events.next_state().await;

    // Assert
    assert_eq!(shown_first["code"], first["code"]);
    assert_eq!(shown_refreshed["attempt"], 2);
    assert_eq!(shown_last["status"], "cancelled");
    assert!(after.is_none(), "the stream ends after the outcome");
    assert_eq!(other.sessions.counts().live, 0, "followed, not run");
}

#[tokio::test]
async fn a_followed_event_stream_ends_without_an_outcome_when_its_process_stops() {
    // Arrange: a page follows the owner's session through the other process.
    let (owner, mut other, _store, _prefix, _first) = owner_and_replica_on_redis().await;
    let mut events =
        crate::events::SseReader::new(other.get(&format!("/pair/{PHONE}/events")).await);
    events.next_state().await.expect("the current state");

    // Act: the other process stops (a deploy).
    let took = other.shutdown().await;
    let after = events.next_state().await;
    let on_owner = owner.get_json(&format!("/pair/{PHONE}")).await;

    // Assert
    assert!(after.is_none(), "no made-up outcome: {after:?}");
    assert!(
        took < std::time::Duration::from_secs(5),
        "the stream does not hold the shutdown: {took:?}"
    );
    assert_eq!(on_owner["status"], "pending", "the session goes on");
}
