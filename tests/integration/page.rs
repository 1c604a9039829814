//! The pairing page's routes over HTTP: the page in the right language with
//! its security headers, its assets, `UI_ENABLED=false`, and the number
//! check it calls as people type. (What a person sees and does in a real
//! browser: `browser.rs`.)

use std::sync::Arc;

use reqwest::StatusCode;
use serde_json::Value;
use wa_pair::store::MemoryStore;

use crate::helpers::TestApp;

async fn page(app: &TestApp, query: &str, accept_language: &str) -> reqwest::Response {
    app.http
        .get(format!("{}/{query}", app.base))
        .header("accept-language", accept_language)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_page_speaks_the_browsers_language_unless_asked_for_another() {
    // Arrange
    let app = TestApp::spawn().await;

    // Act
    let indonesian = page(&app, "", "id-ID,id;q=0.9,en;q=0.8").await;
    let headers = indonesian.headers().clone();
    let indonesian = indonesian.text().await.unwrap();
    let english = page(&app, "?lang=en", "id-ID").await.text().await.unwrap();

    // Assert
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    assert!(
        headers["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("script-src 'self'")
    );
    assert!(indonesian.contains("<html lang=\"id\">") && indonesian.contains("Hubungkan"));
    assert!(english.contains("<html lang=\"en\">") && english.contains("Connect"));
}

#[tokio::test]
async fn the_pages_script_and_style_are_served_by_the_service() {
    let app = TestApp::spawn().await;

    let script = app.get("/ui/app.js").await;
    let style = app.get("/ui/app.css").await;

    assert_eq!(script.status(), StatusCode::OK);
    assert_eq!(
        script.headers()["content-type"],
        "text/javascript; charset=utf-8"
    );
    assert!(script.text().await.unwrap().contains("EventSource"));
    assert_eq!(style.headers()["content-type"], "text/css; charset=utf-8");
}

#[tokio::test]
async fn ui_enabled_false_leaves_the_page_out_and_the_api_in() {
    let app = TestApp::spawn_with(Arc::new(MemoryStore::new()), |config| {
        config.ui_enabled = false;
    })
    .await;

    let page = app.get("/").await;
    let api = app.get("/validate-phone?phone=628123456789").await;

    assert_eq!(page.status(), StatusCode::NOT_FOUND);
    assert_eq!(api.status(), StatusCode::OK);
}

#[tokio::test]
async fn validate_phone_answers_the_canonical_number_or_the_suggestion_and_starts_nothing() {
    // Arrange
    let app = TestApp::spawn().await;

    // Act
    let valid = app.get("/validate-phone?phone=628123456789").await;
    let typed = app.get("/validate-phone?phone=%2B62%20812-345-6789").await;
    let typed_status = typed.status();
    let typed: Value = typed.json().await.unwrap();
    let missing = app.get("/validate-phone").await;
    let missing_status = missing.status();
    let missing: Value = missing.json().await.unwrap();

    // Assert
    assert_eq!(
        valid.json::<Value>().await.unwrap()["phone"],
        "628123456789"
    );
    assert_eq!(typed_status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(typed["error"], "invalid_phone");
    assert_eq!(typed["suggestion"], "628123456789");
    assert_eq!(missing_status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(missing["error"], "invalid_phone", "JSON, like every error");
    assert!(
        app.fake().record("628123456789").is_none(),
        "no session, no WhatsApp"
    );
}
