//! Two processes of the service on one store and one WhatsApp, as
//! replicas (or the old and new deployment during a deploy) are: one owner
//! per phone, and the other answers from the store.

use std::sync::Arc;

use futures::future::join_all;
use wa_pair::store::{MemoryStore, PairingStore};

use crate::helpers::TestApp;

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
