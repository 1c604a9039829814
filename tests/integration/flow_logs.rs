//! The logs of a whole pairing flow never contain a pairing code or a full
//! phone number (the library logs both under `Client/PairCode`).

use std::time::Duration;

use wa_pair::store::{UpstashSettings, UpstashStore};
use wa_pair::telemetry::{CapturedLogs, capture_subscriber_with_filter};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::TestApp;

const PHONE: &str = "628123456789";

/// Captures this process's logs at `filter` from now on; keep the guard.
pub(crate) fn capture(filter: &str) -> (CapturedLogs, Option<tracing::subscriber::DefaultGuard>) {
    let (subscriber, logs) = capture_subscriber_with_filter(filter);
    // nextest runs each test in its own process: there the capture can be
    // global and also sees logs from blocking threads. Under `cargo test`
    // (shared process) it is thread-local; on a current-thread runtime every
    // task this flow spawns is polled on this thread, so it sees those.
    let own_process = std::env::var("NEXTEST_EXECUTION_MODE").as_deref() == Ok("process-per-test");
    let guard = if own_process {
        tracing::subscriber::set_global_default(subscriber)
            .expect("first subscriber in this process");
        None
    } else {
        Some(tracing::subscriber::set_default(subscriber))
    };
    (logs, guard)
}

/// A full flow (code, refresh, wrong code, link); returns the codes and
/// QR codes shown.
async fn run_flow() -> Vec<String> {
    let app = TestApp::spawn().await;
    let first: serde_json::Value = app.post_pair(PHONE).await.json().await.unwrap();
    let refreshed = app.refresh_json(PHONE).await;
    let code = refreshed["code"].as_str().unwrap().to_owned();
    let _ = app.fake().enter_code(PHONE, "ZZZZZZZZ").await;
    app.fake().enter_code(PHONE, &code).await.expect("links");
    app.wait_for_state(PHONE, |s| s["status"] == "linked").await;
    let qrs = [&first, &refreshed]
        .into_iter()
        .filter_map(|state| state["qr"].as_str().map(str::to_owned));
    let mut secrets = vec![first["code"].as_str().unwrap().to_owned(), code];
    secrets.extend(qrs);
    assert!(secrets.len() > 2, "the flow showed a QR");
    secrets
}

/// Runs a full flow and returns the logs captured at `filter`.
async fn flow_logs(filter: &str) -> (String, Vec<String>) {
    let (logs, _guard) = capture(filter);
    let codes = run_flow().await;
    (logs.contents(), codes)
}

/// The filters the README gives for `railway logs --filter`.
fn readme_filters() -> Vec<String> {
    include_str!("../../README.md")
        .lines()
        .filter_map(|line| line.trim().strip_prefix("railway logs --filter '"))
        .filter_map(|rest| rest.split_once('\'').map(|(filter, _)| filter.to_owned()))
        .collect()
}

/// Railway's `@key:value` filter on one line: the line is a JSON object
/// whose top-level `key` is `value` (a quoted value is taken literally).
fn railway_matches(line: &str, filter: &str) -> bool {
    let Some((key, value)) = filter.strip_prefix('@').and_then(|f| f.split_once(':')) else {
        panic!("not an attribute filter: {filter}");
    };
    let value = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value);
    let Ok(json) = serde_json::from_str::<serde_json::Value>(line) else {
        return false;
    };
    match &json[key] {
        serde_json::Value::String(s) => s == value,
        serde_json::Value::Number(n) => n.to_string() == value,
        _ => false,
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_readmes_railway_filters_pick_the_lines_they_promise() {
    // Arrange: a full flow, and an error of ours (a store that refuses our
    // token, found by the readiness probe).
    let (logs, _guard) = capture("info");
    run_flow().await;
    let upstash = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(401))
        .mount(&upstash)
        .await;
    let store = UpstashStore::new(UpstashSettings::new(upstash.uri(), "t0ken")).unwrap();
    assert!(!wa_pair::store::probe(&store, Duration::from_secs(5)).await);
    let captured = logs.contents();
    let lines: Vec<&str> = captured.lines().collect();
    let select = |filter: &str| -> Vec<serde_json::Value> {
        lines
            .iter()
            .filter(|line| railway_matches(line, filter))
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    };

    // Act
    let filters = readme_filters();
    let errors = select(&filters[0]);
    let one_phone = select(&filters[1]);
    let links = select(&filters[2]);

    // Assert
    assert_eq!(
        filters,
        ["@level:error", r#"@phone:"6281****6789""#, "@event:linked"]
    );
    assert!(!errors.is_empty(), "the store's refusal is an error line");
    assert!(
        errors
            .iter()
            .all(|e| e["level"] == "error" && e["message"].is_string())
    );
    let events: Vec<&str> = one_phone
        .iter()
        .filter_map(|e| e["event"].as_str())
        .collect();
    for event in ["session_started", "code_issued", "linked"] {
        assert!(events.contains(&event), "{event} missing from {events:?}");
    }
    assert!(one_phone.iter().all(|e| e["phone"] == "6281****6789"));
    assert_eq!(links.len(), 1, "{links:?}");
    assert_eq!(links[0]["message"], "phone linked");
    assert_eq!(links[0]["phone"], "6281****6789");
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

/// Neither a code (in either form), nor a QR string, nor the full phone
/// number is in `logs`.
fn assert_no_secrets(logs: &str, secrets: &[String]) {
    for secret in secrets {
        assert!(!logs.contains(secret.as_str()), "secret {secret} leaked");
        if secret.len() == 8 {
            let display = format!("{}-{}", &secret[..4], &secret[4..]);
            assert!(!logs.contains(&display), "code {display} leaked");
        } else {
            // A QR string's secret part: the ADV key, base64.
            let adv = secret.split(',').nth(3).unwrap_or_default();
            assert!(adv.is_empty() || !logs.contains(adv), "QR secret leaked");
        }
    }
    let leaked: Vec<&str> = logs.lines().filter(|l| l.contains(PHONE)).collect();
    assert!(leaked.is_empty(), "full phone number in: {leaked:#?}");
}
