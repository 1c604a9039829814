//! The per-phone code budget: every code is a notification on somebody's
//! phone and counts toward WhatsApp's own throttle, so no caller, loop or
//! restart gets more than `PAIR_CODES_PER_HOUR` codes for one number.

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use wa_pair::store::{MemoryStore, PairingStore};

use crate::helpers::TestApp;

const PHONE: &str = "628123456789";
const BUDGET: u32 = 3;

async fn app_with_budget(store: Arc<dyn PairingStore>) -> TestApp {
    TestApp::spawn_with(store, |config| config.codes_per_hour = BUDGET).await
}

/// POST then DELETE, as a loop in a script would; the POST's answer.
async fn post_then_delete(app: &TestApp) -> reqwest::Response {
    let answer = app.post_pair(PHONE).await;
    app.delete(&format!("/pair/{PHONE}")).await;
    app.until_released().await;
    answer
}

fn codes_whatsapp_issued(app: &TestApp) -> u32 {
    app.fake()
        .record(PHONE)
        .map_or(0, |record| record.code_requests)
}

#[tokio::test]
async fn a_post_delete_loop_gets_no_more_codes_than_the_budget() {
    // Arrange
    let app = app_with_budget(Arc::new(MemoryStore::new())).await;

    // Act
    let mut statuses = Vec::new();
    let mut last = None;
    for _ in 0..6 {
        let answer = post_then_delete(&app).await;
        statuses.push(answer.status());
        last = Some(answer);
    }

    // Assert
    assert_eq!(
        statuses,
        [
            StatusCode::CREATED,
            StatusCode::CREATED,
            StatusCode::CREATED,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::TOO_MANY_REQUESTS,
        ]
    );
    assert_eq!(codes_whatsapp_issued(&app), BUDGET);
    let last = last.expect("six answers");
    let retry_after: u64 = last.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((3500..=3600).contains(&retry_after), "{retry_after}");
    let body: Value = last.json().await.expect("JSON");
    assert_eq!(body["error"], "code_budget_exhausted");
}

#[tokio::test]
async fn the_budget_survives_a_restart_of_the_service() {
    // Arrange
    let store: Arc<dyn PairingStore> = Arc::new(MemoryStore::new());
    let mut before = app_with_budget(Arc::clone(&store)).await;
    for _ in 0..BUDGET {
        assert_eq!(
            post_then_delete(&before).await.status(),
            StatusCode::CREATED
        );
    }
    before.shutdown().await;

    // Act
    let after = app_with_budget(store).await;
    let answer = after.post_pair(PHONE).await;
    let state = after.get_json(&format!("/pair/{PHONE}")).await;

    // Assert
    assert_eq!(answer.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(codes_whatsapp_issued(&after), 0, "WhatsApp was not asked");
    assert_eq!(state["status"], "starting");
    assert_eq!(state["reason"], "code_budget");
    assert!(state["retry_at"].is_string(), "{state}");
}

#[tokio::test]
async fn a_refresh_past_the_budget_is_refused_while_the_live_code_stays_usable() {
    // Arrange
    let app = app_with_budget(Arc::new(MemoryStore::new())).await;
    let first: Value = app.post_pair(PHONE).await.json().await.expect("JSON");
    let refresh = || async {
        // Past the double-click debounce, so each refresh asks again.
        tokio::time::sleep(Duration::from_millis(2100)).await;
        app.post_json(&format!("/pair/{PHONE}/refresh"), serde_json::json!({}))
            .await
    };

    // Act
    let second = refresh().await;
    let third = refresh().await;
    let refused = refresh().await;
    let state = app.get_json(&format!("/pair/{PHONE}")).await;

    // Assert
    assert!(first["code"].is_string());
    assert_eq!(second.status(), StatusCode::OK);
    assert_eq!(third.status(), StatusCode::OK);
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(state["status"], "pending", "{state}");
    assert!(state["code"].is_string(), "the last code is still shown");
    assert_eq!(state["reason"], "code_budget");
    assert_eq!(codes_whatsapp_issued(&app), BUDGET);
}
