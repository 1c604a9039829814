//! Accounts that link only with their passkey: the fake WhatsApp asks for
//! it, the caller answers with an assertion made by a software
//! authenticator holding the account's passkey, both screens show the
//! verification code, the caller confirms, the phone links. Real link
//! client against the fake.

use fake_wa::passkey::{ORIGIN, RP_ID, SoftwareAuthenticator};
use fake_wa::{LinkAttemptError, LinkedVia};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::flow_logs::capture;
use crate::helpers::TestApp;

const PHONE: &str = "628123456789";

async fn json(response: reqwest::Response) -> Value {
    response.json().await.expect("JSON body")
}

/// Registers a passkey for [`PHONE`] at the fake, starts a pairing and
/// waits until WhatsApp asks for the passkey.
async fn asked_for_passkey(app: &TestApp) -> (SoftwareAuthenticator, Value) {
    let authenticator = SoftwareAuthenticator::generate();
    app.fake()
        .require_passkey(PHONE, authenticator.credential());
    let _ = app.post_pair(PHONE).await;
    let asked = app
        .wait_for_state(PHONE, |s| s["reason"] == "passkey_required")
        .await;
    (authenticator, asked)
}

fn assertion(authenticator: &SoftwareAuthenticator, asked: &Value) -> Value {
    authenticator.assert(&asked["passkey_options"].to_string(), ORIGIN)
}

#[tokio::test]
async fn a_passkey_account_links_with_an_assertion_and_the_confirmed_verification_code() {
    // Arrange
    let (logs, _guard) = capture("debug");
    let app = TestApp::spawn().await;
    let (authenticator, asked) = asked_for_passkey(&app).await;

    // Act
    let sent = app
        .post_json(
            &format!("/pair/{PHONE}/passkey"),
            assertion(&authenticator, &asked),
        )
        .await;
    let sent_status = sent.status();
    let sent = json(sent).await;
    let shown = app
        .wait_for_state(PHONE, |s| s["reason"] == "passkey_confirmation")
        .await;
    let confirmed = app
        .post_json(&format!("/pair/{PHONE}/passkey/confirm"), json!({}))
        .await;
    let confirmed_status = confirmed.status();
    let linked = app.wait_for_state(PHONE, |s| s["status"] == "linked").await;
    let record = app.fake().record(PHONE).expect("recorded");
    let logs = logs.contents();

    // Assert
    assert_eq!(asked["status"], "action_required");
    assert!(asked["code"].is_null(), "no code can link this account");
    assert!(asked["qr"].is_null(), "nor a QR code");
    assert_eq!(asked["passkey_options"]["rpId"], RP_ID);
    assert_eq!(sent_status, StatusCode::OK);
    assert!(
        matches!(
            sent["reason"].as_str(),
            Some("passkey_accepted" | "passkey_confirmation")
        ),
        "{sent}"
    );
    let code = shown["verification_code"]
        .as_str()
        .expect("a code to compare");
    assert_eq!(shown["status"], "action_required");
    assert_eq!(
        Some(code.replace('-', "")),
        record.verification_code,
        "the page shows the code the phone shows"
    );
    assert_eq!(confirmed_status, StatusCode::OK);
    let device = record.linked.expect("the phone linked");
    assert_eq!(device.via, LinkedVia::Passkey);
    assert_eq!(linked["jid"], device.jid);
    assert!(linked["verification_code"].is_null());
    assert_eq!(record.passkey_assertions, 1);
    assert_eq!(record.passkey_refusals, 0);
    assert!(
        app.data_dir().join(format!("{PHONE}.db")).exists(),
        "the device is kept"
    );
    assert!(
        !logs.contains(code),
        "the verification code is never logged"
    );
    assert!(!logs.contains(&code.replace('-', "")));
}

#[tokio::test]
async fn an_assertion_from_another_passkey_is_refused_and_the_session_still_asks() {
    // Arrange
    let app = TestApp::spawn().await;
    let (authenticator, asked) = asked_for_passkey(&app).await;
    let stranger = SoftwareAuthenticator::generate();
    let mut forged = assertion(&stranger, &asked);
    forged["id"] = assertion(&authenticator, &asked)["id"].clone();
    forged["rawId"] = forged["id"].clone();

    // Act
    let refused = app
        .post_json(&format!("/pair/{PHONE}/passkey"), forged)
        .await;
    let refused_status = refused.status();
    let refused = json(refused).await;
    let after = app.get_json(&format!("/pair/{PHONE}")).await;
    let typed = app.fake().enter_code(PHONE, "ABCD1234").await;
    let retried = app
        .post_json(
            &format!("/pair/{PHONE}/passkey"),
            assertion(&authenticator, &after),
        )
        .await;

    // Assert
    assert_eq!(refused_status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(refused["error"], "passkey_refused");
    assert_eq!(after["reason"], "passkey_required");
    assert!(after["passkey_options"].is_object());
    assert_eq!(app.fake().record(PHONE).unwrap().passkey_refusals, 1);
    assert_eq!(typed, Err(LinkAttemptError::PasskeyRequired));
    assert_eq!(
        retried.status(),
        StatusCode::OK,
        "the account's own passkey still works"
    );
}

#[tokio::test]
async fn passkey_steps_out_of_order_or_malformed_are_refused_with_what_to_do() {
    // Arrange: an ordinary account, showing a code.
    let app = TestApp::spawn().await;
    app.post_pair(PHONE).await;
    let authenticator = SoftwareAuthenticator::generate();
    let options = json!({ "challenge": "AAAA", "rpId": RP_ID }).to_string();
    let answer = authenticator.assert(&options, ORIGIN);
    let mut malformed = answer.clone();
    malformed["response"]["signature"] = "not base64url!".into();

    // Act
    let unasked = app
        .post_json(&format!("/pair/{PHONE}/passkey"), answer)
        .await;
    let unasked_status = unasked.status();
    let unasked = json(unasked).await;
    let early = app
        .post_json(&format!("/pair/{PHONE}/passkey/confirm"), json!({}))
        .await;
    let early_status = early.status();
    let bad = app
        .post_json(&format!("/pair/{PHONE}/passkey"), malformed)
        .await;
    let bad_status = bad.status();
    let bad = json(bad).await;

    // Assert
    assert_eq!(unasked_status, StatusCode::CONFLICT);
    assert_eq!(unasked["error"], "passkey_out_of_order");
    assert_eq!(early_status, StatusCode::CONFLICT);
    assert_eq!(bad_status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(bad["error"], "invalid_passkey");
    assert!(bad["message"].as_str().unwrap().contains("signature"));
    assert_eq!(
        app.get_json(&format!("/pair/{PHONE}")).await["status"],
        "pending",
        "the code stays"
    );
}
