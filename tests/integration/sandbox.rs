//! Sandbox mode as a person uses it: the service starts its own fake
//! WhatsApp and the phone's side is an HTTP call.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::TestApp;

const PHONE: &str = "628123456789";

#[tokio::test]
async fn sandbox_walkthrough_links_a_phone_with_no_phone_and_no_internet() {
    // Arrange
    let mut app = TestApp::spawn_sandbox().await;
    let enter_path = format!("/sandbox/phones/{PHONE}/enter-code");
    let enter_code = |code: &str| app.post_json(&enter_path, json!({ "code": code }));

    // Act
    let before = enter_code("ABCD1234").await;
    let pair: Value = app.post_pair(PHONE).await.json().await.unwrap();
    let code = pair["code"].as_str().expect("a code").to_owned();
    let wrong = enter_code(if code == "ZZZZZZZZ" {
        "YYYYYYYY"
    } else {
        "ZZZZZZZZ"
    })
    .await;
    let right = enter_code(pair["code_display"].as_str().unwrap()).await;
    let right_status = right.status();
    let right: Value = right.json().await.unwrap();
    let record = app.get_json(&format!("/sandbox/phones/{PHONE}")).await;
    let state = app.wait_for_state(PHONE, |s| s["status"] == "linked").await;

    // Assert
    assert_eq!(before.status(), StatusCode::CONFLICT);
    assert_eq!(wrong.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(wrong.json::<Value>().await.unwrap()["error"], "wrong_code");
    assert_eq!(right_status, StatusCode::OK);
    assert_eq!(right["linked"], true);
    assert_eq!(record["platform_display"], "Chrome (Linux)");
    assert_eq!(record["linked"]["code"], code);
    assert_eq!(state["jid"], right["jid"]);
    app.shutdown().await;
}
