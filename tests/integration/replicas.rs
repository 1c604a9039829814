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
