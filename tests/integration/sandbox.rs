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

#[tokio::test]
async fn a_link_client_that_stops_answering_the_phone_gets_504_within_the_sandbox_wait() {
    // Arrange: found by the fuzzer. After three wrong codes in a row the
    // link client stops answering the phone for a while; the fake would
    // wait out its 30 s stage timeout and the request its deadline.
    let mut app = TestApp::spawn_sandbox().await;
    let enter_path = format!("/sandbox/phones/{PHONE}/enter-code");
    let pair: Value = app.post_pair(PHONE).await.json().await.unwrap();
    let wrong = if pair["code"] == "ZZZZZZZZ" {
        "YYYYYYYY"
    } else {
        "ZZZZZZZZ"
    };
    for _ in 0..3 {
        let answer = app.post_json(&enter_path, json!({ "code": wrong })).await;
        assert_eq!(answer.status(), StatusCode::UNPROCESSABLE_ENTITY);
    }

    // Act
    let started = std::time::Instant::now();
    let silent = app.post_json(&enter_path, json!({ "code": wrong })).await;
    let waited = started.elapsed();

    // Assert
    assert_eq!(silent.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        silent.json::<Value>().await.unwrap()["error"],
        "companion_unavailable"
    );
    let wait = wa_pair::http::sandbox::ENTER_CODE_WAIT;
    assert!(
        waited >= wait && waited < wait + std::time::Duration::from_secs(5),
        "{waited:?}"
    );
    app.shutdown().await;
}
