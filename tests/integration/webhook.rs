//! The webhook, received by a real HTTP receiver in the test: outcomes
//! arrive signed the Standard Webhooks way (checked here with HMAC-SHA256
//! directly, not with the service's own signer), a refused delivery is
//! retried with the same id, and one that keeps failing is given up.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use sha2::Sha256;
use tokio::sync::{mpsc, watch};
use wa_pair::config::{Secret, WebhookConfig};
use wa_pair::retry::Backoff;
use wa_pair::session::PairState;
use wa_pair::store::MemoryStore;
use wa_pair::webhook::{WebhookSettings, Webhooks};

use crate::helpers::{FLOW_TIMEOUT, ReceivedWebhook, TestApp, webhook_receiver};

const PHONE: &str = "628123456789";
/// The Standard Webhooks spec's example secret.
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Verifies a delivery as a receiver following the spec does.
fn verify(received: &ReceivedWebhook) -> bool {
    let key = base64::engine::general_purpose::STANDARD
        .decode(SECRET.trim_start_matches("whsec_"))
        .unwrap();
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&key).unwrap();
    mac.update(format!("{}.{}.", received.id, received.timestamp).as_bytes());
    mac.update(&received.body);
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    received
        .signature
        .split(' ')
        .any(|sig| sig.strip_prefix("v1,") == Some(expected.as_str()))
}

async fn next(rx: &mut mpsc::UnboundedReceiver<ReceivedWebhook>) -> ReceivedWebhook {
    tokio::time::timeout(FLOW_TIMEOUT, rx.recv())
        .await
        .expect("a delivery in time")
        .expect("receiver running")
}

fn key() -> Vec<u8> {
    wa_pair::config::webhook_key(SECRET).unwrap()
}

fn linked_state() -> PairState {
    serde_json::from_value(serde_json::json!({
        "phone": PHONE, "status": "linked", "code": null, "code_display": null,
        "issued_at": null, "expires_at": null, "refresh_at": null, "attempt": 1,
        "updated_at": "2026-11-26T21:40:00Z", "jid": "628123456789:1@s.whatsapp.net"
    }))
    .unwrap()
}

#[tokio::test]
async fn a_linked_session_posts_its_outcome_signed_the_standard_webhooks_way() {
    // Arrange
    let (url, mut deliveries) = webhook_receiver(Vec::new()).await;
    let app = TestApp::spawn_with(Arc::new(MemoryStore::new()), |config| {
        config.webhook = Some(WebhookConfig {
            url,
            secret: Secret::new(SECRET),
        });
    })
    .await;

    // Act
    let posted: Value = app.post_pair(PHONE).await.json().await.unwrap();
    app.fake()
        .enter_code(PHONE, posted["code"].as_str().unwrap())
        .await
        .expect("links");
    let received = next(&mut deliveries).await;

    // Assert
    assert!(verify(&received), "{received:?}");
    assert!(received.id.starts_with("msg_"), "{}", received.id);
    let sent_at: i64 = received.timestamp.parse().unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!((now - sent_at).abs() < 60);
    let body: Value = serde_json::from_slice(&received.body).unwrap();
    assert_eq!(body["status"], "linked");
    assert_eq!(body["phone"], PHONE);
    assert!(
        body.get("owner").is_none(),
        "the API's JSON, not the store's"
    );
}

#[tokio::test]
async fn a_delivery_the_receiver_refuses_twice_is_retried_with_the_same_id_until_it_lands() {
    // Arrange
    let (url, mut deliveries) = webhook_receiver(vec![
        StatusCode::INTERNAL_SERVER_ERROR,
        StatusCode::SERVICE_UNAVAILABLE,
    ])
    .await;
    let (webhooks, deliverer) = Webhooks::new(WebhookSettings {
        url,
        key: key(),
        backoff: Backoff::new(Duration::from_millis(20), Duration::from_millis(100)),
        give_up_after: Duration::from_secs(60),
    })
    .unwrap();
    let (stop_tx, stop) = watch::channel(false);
    let running = tokio::spawn(Webhooks::run(deliverer, stop));

    // Act
    webhooks.notify(&linked_state());
    let attempts = [
        next(&mut deliveries).await,
        next(&mut deliveries).await,
        next(&mut deliveries).await,
    ];
    let fourth = tokio::time::timeout(Duration::from_millis(500), deliveries.recv()).await;

    // Assert
    assert!(attempts.iter().all(verify), "{attempts:?}");
    assert!(attempts.iter().all(|a| a.id == attempts[0].id), "one id");
    assert!(fourth.is_err(), "delivered on the third: no fourth attempt");
    let _ = stop_tx.send(true);
    running.await.unwrap();
}

#[tokio::test]
async fn a_delivery_that_keeps_failing_is_given_up_after_its_time() {
    // Arrange
    let (url, mut deliveries) =
        webhook_receiver(vec![StatusCode::INTERNAL_SERVER_ERROR; 1000]).await;
    let settings = WebhookSettings {
        url,
        key: key(),
        backoff: Backoff::new(Duration::from_millis(20), Duration::from_millis(50)),
        give_up_after: Duration::from_millis(300),
    };
    let (webhooks, deliverer) = Webhooks::new(settings).unwrap();
    let (stop_tx, stop) = watch::channel(false);
    let running = tokio::spawn(Webhooks::run(deliverer, stop));

    // Act
    webhooks.notify(&linked_state());
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut tried = 0;
    while deliveries.try_recv().is_ok() {
        tried += 1;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Assert
    assert!(tried >= 2, "retried before giving up ({tried})");
    assert!(deliveries.try_recv().is_err(), "no attempt after giving up");
    let _ = stop_tx.send(true);
    running.await.unwrap();
}

#[tokio::test]
async fn only_outcomes_are_announced() {
    // Arrange
    let (url, mut deliveries) = webhook_receiver(Vec::new()).await;
    let (webhooks, deliverer) = Webhooks::new(WebhookSettings {
        url,
        key: key(),
        backoff: Backoff::new(Duration::from_millis(20), Duration::from_millis(50)),
        give_up_after: Duration::from_secs(5),
    })
    .unwrap();
    let (stop_tx, stop) = watch::channel(false);
    let running = tokio::spawn(Webhooks::run(deliverer, stop));
    let mut pending = linked_state();
    pending.status = wa_pair::session::Status::Pending;

    // Act
    webhooks.notify(&pending);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Assert
    assert!(deliveries.try_recv().is_err());
    let _ = stop_tx.send(true);
    running.await.unwrap();
}
