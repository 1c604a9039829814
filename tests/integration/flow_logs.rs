//! The logs of a whole pairing flow never contain a pairing code or a full
//! phone number (the library logs both under `Client/PairCode`).

use wa_pair::telemetry::capture_subscriber_with_filter;

use crate::helpers::TestApp;

const PHONE: &str = "628123456789";

/// Runs a full flow (code, refresh, wrong code, link) and returns the logs
/// captured at `filter`.
async fn flow_logs(filter: &str) -> (String, Vec<String>) {
    let (subscriber, logs) = capture_subscriber_with_filter(filter);
    // nextest runs each test in its own process: there the capture can be
    // global and also sees logs from blocking threads. Under `cargo test`
    // (shared process) it is thread-local; on a current-thread runtime every
    // task this flow spawns is polled on this thread, so it sees those.
    let own_process = std::env::var("NEXTEST_EXECUTION_MODE").as_deref() == Ok("process-per-test");
    let _guard = if own_process {
        tracing::subscriber::set_global_default(subscriber)
            .expect("first subscriber in this process");
        None
    } else {
        Some(tracing::subscriber::set_default(subscriber))
    };
    let codes = async {
        let app = TestApp::spawn().await;
        let first: serde_json::Value = app.post_pair(PHONE).await.json().await.unwrap();
        let refreshed: serde_json::Value = app
            .http
            .post(format!("{}/pair/{PHONE}/refresh", app.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let code = refreshed["code"].as_str().unwrap().to_owned();
        let _ = app.fake().enter_code(PHONE, "ZZZZZZZZ").await;
        app.fake().enter_code(PHONE, &code).await.expect("links");
        app.wait_for_state(PHONE, |s| s["status"] == "linked").await;
        vec![first["code"].as_str().unwrap().to_owned(), code]
    }
    .await;
    (logs.contents(), codes)
}

#[tokio::test(flavor = "current_thread")]
async fn a_full_flow_logs_neither_codes_nor_the_phone_number() {
    let (logs, codes) = flow_logs("info").await;

    assert!(
        logs.contains("pairing code issued"),
        "the flow was captured"
    );
    assert!(logs.contains("phone linked"));
    assert!(logs.contains("6281****6789"), "phones appear masked");
    let request_line = logs
        .lines()
        .find(|l| l.contains("request completed") && l.contains(r#""route":"/pair""#))
        .expect("a request line for POST /pair");
    // Flat, as Railway reads it: every field at the top level.
    let request: serde_json::Value = serde_json::from_str(request_line).expect("a JSON line");
    assert_eq!(request["level"], "info", "{request_line}");
    assert_eq!(request["message"], "request completed", "{request_line}");
    assert_eq!(request["method"], "POST", "{request_line}");
    assert_eq!(request["status"], 201, "{request_line}");
    assert!(request["request_id"].is_string(), "{request_line}");
    assert!(request["latency_ms"].is_u64(), "{request_line}");
    assert_no_secrets(&logs, &codes);
}

#[tokio::test(flavor = "current_thread")]
async fn even_at_trace_level_a_full_flow_logs_neither_codes_nor_the_phone_number() {
    let (logs, codes) = flow_logs("trace").await;

    assert!(
        logs.contains("pairing code issued"),
        "the flow was captured"
    );
    assert_no_secrets(&logs, &codes);
}

/// Neither a code (in either form) nor the full phone number is in `logs`.
fn assert_no_secrets(logs: &str, codes: &[String]) {
    for code in codes {
        assert!(!logs.contains(code.as_str()), "code {code} leaked");
        let display = format!("{}-{}", &code[..4], &code[4..]);
        assert!(!logs.contains(&display), "code {display} leaked");
    }
    let leaked: Vec<&str> = logs.lines().filter(|l| l.contains(PHONE)).collect();
    assert!(leaked.is_empty(), "full phone number in: {leaked:#?}");
}
