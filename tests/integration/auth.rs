//! Callers: with `API_KEYS` set, the API answers only requests that carry
//! one of them, while health checks stay open.

use std::sync::Arc;

use reqwest::StatusCode;
use serde_json::{Value, json};
use wa_pair::config::Secret;
use wa_pair::store::MemoryStore;

use crate::helpers::TestApp;

const KEY: &str = "0123456789abcdef0123456789abcdef";
const PHONE: &str = "628123456789";

async fn app_with_key() -> TestApp {
    TestApp::spawn_with(Arc::new(MemoryStore::new()), |config| {
        config.api_keys = vec![Secret::new(KEY)];
    })
    .await
}

#[tokio::test]
async fn api_routes_without_credentials_answer_401_with_www_authenticate() {
    // Arrange
    let app = app_with_key().await;
    let url = |path: &str| format!("{}{path}", app.base);

    // Act
    let answers = [
        app.http.post(url("/pair")).json(&json!({ "phone": PHONE })),
        app.http.get(url(&format!("/pair/{PHONE}"))),
        app.http.post(url(&format!("/pair/{PHONE}/refresh"))),
        app.http.delete(url(&format!("/pair/{PHONE}"))),
    ]
    .map(|request| request.send());
    let answers = futures::future::join_all(answers).await;

    // Assert
    for answer in answers {
        let answer = answer.expect("request sent");
        assert_eq!(answer.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(answer.headers()["www-authenticate"], "Bearer");
        let body: Value = answer.json().await.expect("JSON body");
        assert_eq!(body["error"], "unauthorized");
    }
    assert!(
        app.fake().record(PHONE).is_none(),
        "WhatsApp was never asked for a code"
    );
}

#[tokio::test]
async fn an_unknown_key_is_refused_and_a_configured_key_pairs() {
    // Arrange
    let app = app_with_key().await;
    let pair = |token: &str| {
        app.http
            .post(format!("{}/pair", app.base))
            .bearer_auth(token)
            .json(&json!({ "phone": PHONE }))
            .send()
    };

    // Act
    let unknown = pair("ffffffffffffffffffffffffffffffff")
        .await
        .expect("sent");
    let known = pair(KEY).await.expect("sent");

    // Assert
    assert_eq!(unknown.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(known.status(), StatusCode::CREATED);
    let body: Value = known.json().await.expect("JSON body");
    assert_eq!(body["status"], "pending");
}

#[tokio::test]
async fn health_checks_and_unknown_routes_need_no_credentials() {
    // Arrange
    let app = app_with_key().await;

    // Act
    let healthz = app.get("/healthz").await;
    let readyz = app.get("/readyz").await;
    let unknown = app.get("/nope").await;

    // Assert
    assert_eq!(healthz.status(), StatusCode::OK);
    assert_eq!(readyz.status(), StatusCode::OK);
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
}

const FRONTEND: &str = "https://app.example.com";

async fn app_with_key_and_origin() -> TestApp {
    TestApp::spawn_with(Arc::new(MemoryStore::new()), |config| {
        config.api_keys = vec![Secret::new(KEY)];
        config.cors_allowed_origins = vec![FRONTEND.to_owned()];
    })
    .await
}

fn preflight(app: &TestApp, origin: &str) -> reqwest::RequestBuilder {
    app.http
        .request(reqwest::Method::OPTIONS, format!("{}/pair", app.base))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type",
        )
}

#[tokio::test]
async fn a_preflight_from_an_allowed_origin_is_answered_without_credentials() {
    // Arrange
    let app = app_with_key_and_origin().await;

    // Act
    let answer = preflight(&app, FRONTEND).send().await.expect("sent");

    // Assert
    assert!(answer.status().is_success(), "{}", answer.status());
    let headers = answer.headers();
    assert_eq!(headers["access-control-allow-origin"], FRONTEND);
    let methods = headers["access-control-allow-methods"].to_str().unwrap();
    assert!(
        methods.contains("POST") && methods.contains("DELETE"),
        "{methods}"
    );
    let allowed = headers["access-control-allow-headers"].to_str().unwrap();
    assert!(allowed.contains("authorization"), "{allowed}");
}

#[tokio::test]
async fn a_refused_origin_gets_no_cors_headers_and_errors_stay_readable_for_allowed_ones() {
    // Arrange
    let app = app_with_key_and_origin().await;

    // Act
    let refused = preflight(&app, "https://evil.example")
        .send()
        .await
        .expect("sent");
    let unauthorized = app
        .http
        .post(format!("{}/pair", app.base))
        .header("origin", FRONTEND)
        .json(&json!({ "phone": PHONE }))
        .send()
        .await
        .expect("sent");

    // Assert
    assert!(
        refused
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
    assert_eq!(unauthorized.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        unauthorized.headers()["access-control-allow-origin"],
        FRONTEND
    );
}

#[tokio::test]
async fn with_no_origin_configured_no_origin_is_allowed() {
    // Arrange
    let app = app_with_key().await;

    // Act
    let answer = preflight(&app, FRONTEND).send().await.expect("sent");

    // Assert
    assert!(
        answer
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
}

#[tokio::test]
async fn with_no_origin_configured_answers_carry_no_cors_headers_and_preflights_are_not_answered() {
    // Arrange
    let app = app_with_key().await;

    // Act
    let plain = app
        .http
        .get(format!("{}/healthz", app.base))
        .send()
        .await
        .expect("sent");
    let preflight = preflight(&app, FRONTEND).send().await.expect("sent");

    // Assert
    for answer in [&plain, &preflight] {
        let cors: Vec<_> = answer
            .headers()
            .keys()
            .filter(|name| name.as_str().starts_with("access-control-") || *name == "vary")
            .collect();
        assert!(cors.is_empty(), "{cors:?}");
    }
    assert_eq!(preflight.status(), StatusCode::METHOD_NOT_ALLOWED);
}

async fn pair_from(app: &TestApp, client_ip: &str, phone: &str) -> reqwest::Response {
    app.http
        .post(format!("{}/pair", app.base))
        .header("x-forwarded-for", format!("198.51.100.200, {client_ip}"))
        .json(&json!({ "phone": phone }))
        .send()
        .await
        .expect("request sent")
}

#[tokio::test]
async fn a_thousand_posts_from_one_address_cannot_lock_out_another_address() {
    // Arrange
    let app = TestApp::spawn_with(Arc::new(MemoryStore::new()), |config| {
        config.starts_per_minute = 10;
        config.sessions_per_user = 1000;
        config.trust_proxy = true;
    })
    .await;

    // Act
    let mut answers = Vec::new();
    for n in 0..1000 {
        let answer = pair_from(&app, "203.0.113.1", &format!("6281{n:08}")).await;
        answers.push((
            answer.status(),
            answer.headers().get("retry-after").cloned(),
        ));
    }
    let other = pair_from(&app, "203.0.113.2", "628999999999").await;

    // Assert
    let created = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::CREATED)
        .count();
    let limited: Vec<_> = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::TOO_MANY_REQUESTS)
        .collect();
    assert_eq!(created, 10, "the whole minute's budget, no more");
    assert_eq!(limited.len(), 990);
    assert!(limited.iter().all(|(_, retry_after)| retry_after.is_some()));
    assert_eq!(other.status(), StatusCode::CREATED);
    assert_eq!(app.sessions.counts().live, 11);
}

#[tokio::test]
async fn an_anonymous_address_has_at_most_the_per_user_open_sessions() {
    // Arrange: no callers configured, clients behind a trusted proxy.
    let app = TestApp::spawn_with(Arc::new(MemoryStore::new()), |config| {
        config.sessions_per_user = 2;
        config.trust_proxy = true;
    })
    .await;

    // Act
    let mut statuses = Vec::new();
    for phone in ["628100000001", "628100000002", "628100000003"] {
        statuses.push(pair_from(&app, "203.0.113.1", phone).await.status());
    }
    let refused = pair_from(&app, "203.0.113.1", "628100000004").await;
    let other = pair_from(&app, "203.0.113.2", "628100000005").await;

    // Assert
    assert_eq!(
        statuses,
        [
            StatusCode::CREATED,
            StatusCode::CREATED,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    assert_eq!(refused.headers()["retry-after"], "60");
    let body: Value = refused.json().await.expect("JSON body");
    assert_eq!(body["error"], "too_many_sessions");
    assert_eq!(other.status(), StatusCode::CREATED);
    assert_eq!(app.sessions.counts().live, 3);
}

#[tokio::test]
async fn reads_have_their_own_budget_and_the_answer_says_when_to_retry() {
    // Arrange
    let app = TestApp::spawn_with(Arc::new(MemoryStore::new()), |config| {
        config.reads_per_minute = 3;
    })
    .await;

    // Act
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(app.get(&format!("/pair/{PHONE}")).await);
    }
    let limited = statuses.pop().expect("four answers");
    let started = app.post_pair(PHONE).await;

    // Assert
    assert!(statuses.iter().all(|s| s.status() == StatusCode::NOT_FOUND));
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((15..=20).contains(&retry_after), "{retry_after}");
    let body: Value = limited.json().await.expect("JSON");
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(
        started.status(),
        StatusCode::CREATED,
        "starts are counted apart"
    );
    assert!(
        app.get("/healthz").await.status().is_success(),
        "health checks are never limited"
    );
}
