//! Sandbox mode as a person uses it: the service starts its own fake
//! WhatsApp and the phone's side is an HTTP call.

use reqwest::StatusCode;
use serde_json::{Value, json};
use wa_pair::config::Config;
use wa_pair::startup::App;

const PHONE: &str = "628123456789";

#[tokio::test]
async fn sandbox_walkthrough_links_a_phone_with_no_phone_and_no_internet() {
    // Arrange
    crate::helpers::init_logs();
    let data_dir = tempfile::tempdir().unwrap();
    let config = Config {
        port: 0,
        wa_sandbox: true,
        data_dir: data_dir.path().to_path_buf(),
        ..Config::default()
    };
    let app = App::build(&config).await.expect("sandbox starts");
    let base = format!("http://{}", app.local_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.serve(async move {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::new();
    let enter = |code: String| {
        http.post(format!("{base}/sandbox/phones/{PHONE}/enter-code"))
            .json(&json!({ "code": code }))
            .send()
    };

    // Act
    let before = enter("ABCD1234".into()).await.unwrap();
    let pair: Value = http
        .post(format!("{base}/pair"))
        .json(&json!({ "phone": PHONE }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let code = pair["code"].as_str().expect("a code").to_owned();
    let wrong = enter(
        if code == "ZZZZZZZZ" {
            "YYYYYYYY"
        } else {
            "ZZZZZZZZ"
        }
        .into(),
    )
    .await
    .unwrap();
    let right = enter(pair["code_display"].as_str().unwrap().to_owned())
        .await
        .unwrap();
    let right_status = right.status();
    let right: Value = right.json().await.unwrap();
    let record: Value = http
        .get(format!("{base}/sandbox/phones/{PHONE}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();

    // Assert
    assert_eq!(before.status(), StatusCode::CONFLICT);
    assert_eq!(wrong.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(wrong.json::<Value>().await.unwrap()["error"], "wrong_code");
    assert_eq!(right_status, StatusCode::OK);
    assert_eq!(right["linked"], true);
    assert_eq!(record["platform_display"], "Chrome (Linux)");
    assert_eq!(record["linked"]["code"], code);
    let state = tokio::time::timeout(crate::helpers::FLOW_TIMEOUT, async {
        loop {
            let state: Value = http
                .get(format!("{base}/pair/{PHONE}"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if state["status"] == "linked" {
                return state;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("linked in time");
    assert_eq!(state["jid"], right["jid"]);
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
