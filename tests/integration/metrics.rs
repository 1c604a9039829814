//! `GET /metrics` after real flows: the numbers move as sessions start,
//! get codes, link and end; no phone number reaches a label; callers are
//! checked like on the rest of the API.

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use wa_pair::config::Secret;
use wa_pair::store::MemoryStore;

use crate::helpers::TestApp;
use crate::supabase_auth::{Project, SigningKey};

const LINKED: &str = "628123456781";
const CANCELLED: &str = "628123456782";

/// The value of the sample `name` (with its labels, as printed), if any.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.parse().ok())
}

#[tokio::test]
async fn metrics_count_a_linked_and_a_cancelled_session_and_name_no_phone() {
    // Arrange
    let app = TestApp::spawn().await;
    let before = app.get("/metrics").await.text().await.unwrap();

    // Act
    let first: serde_json::Value = app.post_pair(LINKED).await.json().await.unwrap();
    // A refresh right after a code returns that code; past the debounce it
    // asks WhatsApp for a new one.
    tokio::time::sleep(wa_pair::session::MANUAL_REFRESH_DEBOUNCE + Duration::from_millis(100))
        .await;
    let refreshed = app.refresh_json(LINKED).await;
    assert_ne!(first["code"], refreshed["code"]);
    app.fake()
        .enter_code(LINKED, refreshed["code"].as_str().unwrap())
        .await
        .expect("links");
    app.wait_for_state(LINKED, |s| s["status"] == "linked")
        .await;
    assert_eq!(app.post_pair(CANCELLED).await.status(), StatusCode::CREATED);
    assert_eq!(
        app.delete(&format!("/pair/{CANCELLED}")).await.status(),
        StatusCode::OK
    );
    app.until_released().await;
    let scrape = app.get("/metrics").await;
    let content_type = scrape.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    let after = scrape.text().await.unwrap();

    // Assert
    assert_eq!(sample(&before, "wa_pair_sessions_started_total"), Some(0.0));
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let expected = [
        ("wa_pair_sessions_started_total", 2.0),
        (r#"wa_pair_codes_issued_total{trigger="first"}"#, 2.0),
        (r#"wa_pair_codes_issued_total{trigger="manual"}"#, 1.0),
        ("wa_pair_links_total", 1.0),
        (
            r#"wa_pair_sessions_ended_total{status="linked",reason="none"}"#,
            1.0,
        ),
        (
            r#"wa_pair_sessions_ended_total{status="cancelled",reason="cancelled"}"#,
            1.0,
        ),
        ("wa_pair_code_wait_seconds_count", 2.0),
        ("wa_pair_open_sessions", 0.0),
        ("wa_pair_warm_clients", 0.0),
    ];
    for (name, value) in expected {
        assert_eq!(sample(&after, name), Some(value), "{name} in:\n{after}");
    }
    let writes = sample(&after, r#"wa_pair_store_seconds_count{op="set"}"#).unwrap_or(0.0);
    assert!(
        writes >= 4.0,
        "every state change is a timed store write:\n{after}"
    );
    assert_eq!(
        sample(&after, r#"wa_pair_store_errors_total{op="set"}"#),
        None
    );
    for phone in [LINKED, CANCELLED] {
        assert!(
            !after.contains(&phone[4..]),
            "a phone in the metrics:\n{after}"
        );
    }
}

#[tokio::test]
async fn whatsapp_refusals_are_counted_by_status() {
    // Arrange
    let app = TestApp::spawn().await;
    app.fake()
        .push_fault(Some(LINKED), fake_wa::Fault::Refuse { code: 403 });

    // Act
    let refused = app.post_pair(LINKED).await;
    app.until_released().await;
    let text = app.get("/metrics").await.text().await.unwrap();

    // Assert
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        sample(&text, r#"wa_pair_whatsapp_refusals_total{status="403"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"wa_pair_sessions_ended_total{status="failed",reason="whatsapp_refused"}"#
        ),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test]
async fn with_callers_configured_metrics_need_a_server_caller() {
    // Arrange
    const KEY: &str = "a-server-key-of-at-least-32-characters";
    let key = SigningKey::es256("ec-1");
    let project = Project::publishing(&[&key]).await;
    let url = project.url();
    let app = TestApp::spawn_with(Arc::new(MemoryStore::new()), move |config| {
        config.supabase_url = Some(url);
        config.api_keys = vec![Secret::new(KEY)];
    })
    .await;
    let user = key.sign(&project.user_claims("alice"));
    let metrics = || app.http.get(format!("{}/metrics", app.base));

    // Act
    let anonymous = metrics().send().await.unwrap();
    let signed_in = metrics().bearer_auth(&user).send().await.unwrap();
    let server = metrics().bearer_auth(KEY).send().await.unwrap();

    // Assert
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(signed_in.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        signed_in.json::<serde_json::Value>().await.unwrap()["error"],
        "forbidden"
    );
    assert_eq!(server.status(), StatusCode::OK);
}
