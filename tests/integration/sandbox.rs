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

#[tokio::test]
async fn sandbox_scan_qr_links_by_qr_and_refuses_a_qr_whatsapp_does_not_show() {
    // Arrange
    let mut app = TestApp::spawn_sandbox().await;
    let scan_path = format!("/sandbox/phones/{PHONE}/scan-qr");
    let pair: Value = app.post_pair(PHONE).await.json().await.unwrap();
    let qr = pair["qr"].as_str().expect("a QR").to_owned();
    let (reference, rest) = qr.split_once(',').unwrap();
    let unknown = format!("{reference}x,{rest}");

    // Act
    let refused = app.post_json(&scan_path, json!({ "qr": unknown })).await;
    let scanned = app.post_json(&scan_path, json!({ "qr": qr })).await;
    let scanned_status = scanned.status();
    let scanned: Value = scanned.json().await.unwrap();
    let state = app.wait_for_state(PHONE, |s| s["status"] == "linked").await;
    let record = app.get_json(&format!("/sandbox/phones/{PHONE}")).await;

    // Assert
    assert_eq!(refused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        refused.json::<Value>().await.unwrap()["error"],
        "unknown_qr"
    );
    assert_eq!(scanned_status, StatusCode::OK);
    assert_eq!(state["jid"], scanned["jid"]);
    assert_eq!(record["linked"]["via"], "qr");
    assert_eq!(record["unknown_qrs"], 1);
    app.shutdown().await;
}

#[tokio::test]
async fn sandbox_scan_qr_as_another_phone_plays_a_wrong_account_scan() {
    // Arrange
    let mut app = TestApp::spawn_sandbox().await;
    let pair: Value = app.post_pair(PHONE).await.json().await.unwrap();

    // Act
    let scanned = app
        .post_json(
            &format!("/sandbox/phones/{PHONE}/scan-qr"),
            json!({ "qr": pair["qr"], "as_phone": "628111111111" }),
        )
        .await;
    let state = app.wait_for_state(PHONE, |s| s["status"] == "failed").await;

    // Assert
    assert_eq!(scanned.status(), StatusCode::OK);
    assert_eq!(state["reason"], "wrong_account");
    app.shutdown().await;
}

#[tokio::test]
async fn sandbox_plays_a_passkey_account_and_the_host_app_that_answers_for_it() {
    // Arrange
    let app = TestApp::spawn_sandbox().await;
    let phone = "628123457777";
    let created = app
        .post_json(&format!("/sandbox/phones/{phone}/passkey"), json!({}))
        .await;
    let too_early = app
        .post_json(
            &format!("/sandbox/phones/{phone}/passkey/assertion"),
            json!({}),
        )
        .await;

    // Act
    app.post_pair(phone).await;
    app.wait_for_state(phone, |s| s["reason"] == "passkey_required")
        .await;
    let typed = app
        .post_json(
            &format!("/sandbox/phones/{phone}/enter-code"),
            json!({ "code": "ABCD1234" }),
        )
        .await;
    let assertion: Value = app
        .post_json(
            &format!("/sandbox/phones/{phone}/passkey/assertion"),
            json!({}),
        )
        .await
        .json()
        .await
        .unwrap();
    let sent = app
        .post_json(&format!("/pair/{phone}/passkey"), assertion)
        .await;
    app.wait_for_state(phone, |s| s["reason"] == "passkey_confirmation")
        .await;
    let confirmed = app
        .post_json(&format!("/pair/{phone}/passkey/confirm"), json!({}))
        .await;
    let linked = app.wait_for_state(phone, |s| s["status"] == "linked").await;
    let record = app.get_json(&format!("/sandbox/phones/{phone}")).await;

    // Assert
    assert_eq!(created.status(), StatusCode::NO_CONTENT);
    assert_eq!(too_early.status(), StatusCode::CONFLICT);
    assert_eq!(typed.status(), StatusCode::CONFLICT, "no code links it");
    assert_eq!(sent.status(), StatusCode::OK);
    assert_eq!(confirmed.status(), StatusCode::OK);
    assert_eq!(record["linked"]["via"], "passkey");
    assert_eq!(linked["jid"], record["linked"]["jid"]);
}
