//! The QR code beside the code: in the state, as a picture, scanned by the
//! fake phone (the right account or another one), and as the only way where
//! WhatsApp offers no code (452). Real link client against the fake.

use fake_wa::{Fault, LinkedVia};
use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{TestApp, decode_qr_png};

const PHONE: &str = "628123456789";
const STRANGER: &str = "628111111111";

async fn json(response: reqwest::Response) -> Value {
    response.json().await.expect("JSON body")
}

#[tokio::test]
async fn pair_answers_with_a_qr_beside_the_code_and_scanning_it_links_the_phone() {
    // Arrange
    let app = TestApp::spawn().await;

    // Act
    let posted = json(app.post_pair(PHONE).await).await;
    let qr = posted["qr"]
        .as_str()
        .expect("a QR beside the code")
        .to_owned();
    let linked = app.fake().scan_qr(PHONE, &qr).await;
    let after = app.wait_for_state(PHONE, |s| s["status"] == "linked").await;

    // Assert
    assert!(posted["code"].is_string());
    assert!(posted["qr_expires_at"].is_string());
    let linked = linked.expect("the QR links");
    assert_eq!(linked.via, LinkedVia::Qr);
    assert_eq!(after["jid"], linked.jid);
    assert!(after["qr"].is_null(), "no QR once linked");
    assert!(
        app.data_dir().join(format!("{PHONE}.db")).exists(),
        "the device is kept"
    );
}

#[tokio::test]
async fn feature_not_available_answers_pending_with_the_qr_code_alone_and_the_qr_links() {
    // Arrange: WhatsApp refuses codes for this account (452).
    let app = TestApp::spawn().await;
    app.fake()
        .push_fault(Some(PHONE), Fault::Refuse { code: 452 });

    // Act
    let response = app.post_pair(PHONE).await;
    let status = response.status();
    let posted = json(response).await;
    let qr = app.wait_for_state(PHONE, |s| s["qr"].is_string()).await["qr"]
        .as_str()
        .unwrap()
        .to_owned();
    let linked = app.fake().scan_qr(PHONE, &qr).await;
    let after = app.wait_for_state(PHONE, |s| s["status"] == "linked").await;

    // Assert
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(posted["status"], "pending");
    assert_eq!(posted["reason"], "code_unavailable");
    assert_eq!(posted["whatsapp_status"], 452);
    assert!(posted["code"].is_null());
    assert!(posted["message"].as_str().unwrap().contains("QR"));
    linked.expect("the QR links");
    assert_eq!(after["status"], "linked");
    assert_eq!(
        app.fake().record(PHONE).unwrap().code_requests,
        1,
        "no code asked after the 452"
    );
}

#[tokio::test]
async fn a_qr_scanned_by_another_account_is_logged_out_removed_and_fails_the_session() {
    // Arrange
    let app = TestApp::spawn().await;
    let posted = json(app.post_pair(PHONE).await).await;
    let qr = posted["qr"].as_str().expect("a QR").to_owned();

    // Act: someone else's phone scans it.
    let linked = app.fake().scan_qr(STRANGER, &qr).await;
    let after = app.wait_for_state(PHONE, |s| s["status"] == "failed").await;

    // Assert
    assert!(linked.expect("WhatsApp links it").jid.starts_with(STRANGER));
    assert_eq!(after["reason"], "wrong_account");
    assert!(
        after.get("jid").is_none(),
        "the stranger's device is not shown"
    );
    let stranger = app
        .fake()
        .wait_for(STRANGER, crate::helpers::FLOW_TIMEOUT, |r| {
            r.devices_removed == 1
        })
        .await
        .expect("the device logged itself out");
    assert_eq!(stranger.devices_removed, 1);
    app.until_released().await;
    assert!(
        !app.data_dir().join(format!("{PHONE}.db")).exists(),
        "no stranger's device is kept under this number"
    );
}

#[tokio::test]
async fn qr_pictures_encode_the_current_qr_and_are_404_once_there_is_none() {
    // Arrange
    let app = TestApp::spawn().await;
    json(app.post_pair(PHONE).await).await;

    // Act
    let svg = app.get(&format!("/pair/{PHONE}/qr.svg")).await;
    let svg_type = svg.headers()["content-type"].clone();
    let svg_body = svg.text().await.unwrap();
    let png = app.get(&format!("/pair/{PHONE}/qr.png")).await;
    let png_type = png.headers()["content-type"].clone();
    let png_cache = png.headers()["cache-control"].clone();
    let png_body = png.bytes().await.unwrap();
    let shown = app.get_json(&format!("/pair/{PHONE}")).await;
    app.delete(&format!("/pair/{PHONE}")).await;
    let after_cancel = app.get(&format!("/pair/{PHONE}/qr.png")).await;
    let unknown = app.get("/pair/628999999999/qr.svg").await;

    // Assert
    assert_eq!(svg_type, "image/svg+xml");
    assert!(svg_body.contains("<svg"), "{svg_body:.80}");
    assert_eq!(png_type, "image/png");
    assert_eq!(png_cache, "no-store");
    assert_eq!(decode_qr_png(&png_body), shown["qr"].as_str().unwrap());
    assert_eq!(after_cancel.status(), StatusCode::NOT_FOUND);
    assert_eq!(json(after_cancel).await["error"], "no_qr");
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    assert_eq!(json(unknown).await["error"], "not_found");
}
