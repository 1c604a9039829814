//! The HTTP API end to end: real router and sessions, the real link client
//! against the fake WhatsApp, MemoryStore or a wiremock Upstash.

use std::sync::Arc;
use std::time::Duration;

use fake_wa::Fault;
use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::{Value, json};
use wa_pair::store::{MemoryStore, PairingStore, UpstashSettings, UpstashStore};
use wiremock::matchers::{body_string_contains, method};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{FLOW_TIMEOUT, TestApp, as_shown};

const PHONE: &str = "628123456789";

async fn json(response: reqwest::Response) -> Value {
    response.json().await.expect("JSON body")
}

#[tokio::test]
async fn pair_rejects_plus_sign_with_format_hint_and_suggestion() {
    let app = TestApp::spawn().await;

    let response = app.post_pair("+62 812-345-6789").await;

    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body = json(response).await;
    assert_eq!(body["error"], "invalid_phone");
    assert_eq!(body["suggestion"], "628123456789");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains('+') && message.contains("628123456789"),
        "{message}"
    );
}

#[tokio::test]
async fn pair_returns_the_code_stores_it_for_ten_minutes_and_reports_the_link() {
    // Arrange
    let store = Arc::new(MemoryStore::new());
    let app = TestApp::spawn_with(store.clone(), |_| {}).await;

    // Act
    let response = app.post_pair(PHONE).await;
    let status = response.status();
    let body = json(response).await;
    let code = body["code"].as_str().expect("a code").to_owned();
    let stored = as_shown(&store.get("wa:pair:628123456789").await.unwrap().unwrap());
    let ttl = store.ttl_of("wa:pair:628123456789").unwrap();
    let linked = app.fake().enter_code(PHONE, &code).await;
    let after = app.wait_for_state(PHONE, |s| s["status"] == "linked").await;

    // Assert
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(body["status"], "pending");
    assert_eq!(body["phone"], PHONE);
    assert_eq!(body["attempt"], 1);
    assert_eq!(
        body["code_display"],
        format!("{}-{}", &code[..4], &code[4..])
    );
    for field in ["issued_at", "expires_at", "refresh_at", "updated_at"] {
        assert!(body[field].is_string(), "{field}");
    }
    assert_eq!(
        stored, body,
        "the store holds exactly what the API answered"
    );
    assert!(
        ttl > Duration::from_secs(590) && ttl <= Duration::from_secs(600),
        "{ttl:?}"
    );
    let linked = linked.expect("the fake phone links with the returned code");
    assert_eq!(linked.code, Some(code));
    assert_eq!(after["jid"], linked.jid);
    assert!(after["code"].is_null(), "no code once linked");
}

#[tokio::test]
async fn pair_again_for_a_pending_phone_returns_200_with_the_same_code() {
    let app = TestApp::spawn().await;
    let first = json(app.post_pair(PHONE).await).await;

    let again = app.post_pair(PHONE).await;

    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(json(again).await["code"], first["code"]);
    assert_eq!(app.fake().record(PHONE).unwrap().code_requests, 1);
}

#[tokio::test]
async fn fifty_concurrent_posts_for_one_phone_make_one_whatsapp_session_and_one_code() {
    let app = TestApp::spawn().await;

    let responses = join_all((0..50).map(|_| app.post_pair(PHONE))).await;

    let mut created = 0;
    let mut codes = Vec::new();
    for response in responses {
        match response.status() {
            StatusCode::CREATED => created += 1,
            StatusCode::OK => {}
            other => panic!("unexpected status {other}"),
        }
        codes.push(json(response).await["code"].as_str().unwrap().to_owned());
    }
    codes.dedup();
    assert_eq!(created, 1);
    assert_eq!(codes.len(), 1, "everyone got the same code");
    assert_eq!(app.fake().record(PHONE).unwrap().code_requests, 1);
    assert_eq!(app.fake().open_connections(), 1, "one WhatsApp connection");
}

#[tokio::test]
async fn an_invalidated_code_is_replaced_in_the_store_before_it_dies() {
    // Arrange
    let store = Arc::new(MemoryStore::new());
    let app = TestApp::spawn_with(store.clone(), |_| {}).await;
    let first = json(app.post_pair(PHONE).await).await;
    let read = || async {
        let json = store.get("wa:pair:628123456789").await.unwrap().unwrap();
        serde_json::from_str::<Value>(&json).unwrap()
    };

    // Act
    assert!(app.fake().request_code_refresh(PHONE));
    let replaced = tokio::time::timeout(FLOW_TIMEOUT, async {
        loop {
            let current = read().await;
            if current["attempt"] == 2 {
                return current;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("a new code is stored");

    // Assert
    assert_eq!(replaced["status"], "pending");
    assert_ne!(replaced["code"], first["code"]);
    let old_dies = time::OffsetDateTime::parse(
        first["expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert!(time::OffsetDateTime::now_utc() < old_dies);
    assert_eq!(app.fake().record(PHONE).unwrap().code_requests, 2);
    assert!(
        app.fake()
            .enter_code(PHONE, replaced["code"].as_str().unwrap())
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn whatsapp_rate_limit_answers_429_with_retry_after_and_keeps_trying() {
    let app = TestApp::spawn().await;
    app.fake()
        .push_fault(Some(PHONE), Fault::RateOverlimit { backoff_secs: 30 });

    let response = app.post_pair(PHONE).await;

    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&retry_after), "{retry_after}");
    let body = json(response).await;
    assert_eq!(body["error"], "rate_limited");
    assert!(body["message"].as_str().unwrap().contains("limiting"));
    let state = app.get_json(&format!("/pair/{PHONE}")).await;
    assert_eq!(state["status"], "starting");
    assert_eq!(state["whatsapp_status"], 429);
}

#[tokio::test]
async fn refresh_issues_a_new_code_and_is_refused_once_linked() {
    let app = TestApp::spawn().await;
    let first = json(app.post_pair(PHONE).await).await;
    let refresh_url = format!("{}/pair/{PHONE}/refresh", app.base);
    // A refresh right after a new code is a double click: it returns that code.
    let debounced = json(app.http.post(&refresh_url).send().await.unwrap()).await;
    tokio::time::sleep(wa_pair::session::MANUAL_REFRESH_DEBOUNCE).await;

    let refreshed = app.http.post(&refresh_url).send().await.unwrap();
    let refreshed_status = refreshed.status();
    let refreshed = json(refreshed).await;
    app.fake()
        .enter_code(PHONE, refreshed["code"].as_str().unwrap())
        .await
        .expect("the refreshed code links");
    app.wait_for_state(PHONE, |s| s["status"] == "linked").await;
    let after_link = app.http.post(&refresh_url).send().await.unwrap();

    assert_eq!(debounced["code"], first["code"]);
    assert_eq!(refreshed_status, StatusCode::OK);
    assert_eq!(refreshed["attempt"], 2);
    assert_ne!(refreshed["code"], first["code"]);
    assert_eq!(after_link.status(), StatusCode::CONFLICT);
    assert_eq!(json(after_link).await["error"], "already_linked");
}

#[tokio::test]
async fn delete_cancels_a_pending_session() {
    let app = TestApp::spawn().await;
    app.post_pair(PHONE).await;
    let url = format!("{}/pair/{PHONE}", app.base);

    let cancelled = app.http.delete(&url).send().await.unwrap();
    let cancelled_status = cancelled.status();
    let cancelled = json(cancelled).await;
    let again = app.http.delete(&url).send().await.unwrap();
    let shown = app.get_json(&format!("/pair/{PHONE}")).await;

    assert_eq!(cancelled_status, StatusCode::OK);
    assert_eq!(cancelled["status"], "cancelled");
    assert!(cancelled["code"].is_null());
    assert_eq!(again.status(), StatusCode::CONFLICT);
    assert_eq!(shown["status"], "cancelled");
    assert!(
        app.fake().wait_for_no_connections(FLOW_TIMEOUT).await,
        "link closed"
    );
}

#[tokio::test]
async fn unknown_phone_and_unknown_route_are_404_json() {
    let app = TestApp::spawn().await;

    let phone = app.get(&format!("/pair/{PHONE}")).await;
    let route = app.get("/nope").await;
    let delete = app.delete(&format!("/pair/{PHONE}")).await;

    assert_eq!(phone.status(), StatusCode::NOT_FOUND);
    assert_eq!(json(phone).await["error"], "not_found");
    assert_eq!(route.status(), StatusCode::NOT_FOUND);
    assert_eq!(json(route).await["error"], "not_found");
    assert_eq!(delete.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn malformed_requests_get_json_errors_with_the_right_status() {
    let app = TestApp::spawn().await;
    let url = format!("{}/pair", app.base);
    let post = |body: &'static str, content_type: Option<&'static str>| {
        let mut request = app.http.post(&url).body(body);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        request.send()
    };

    let cases = [
        (
            post("{not json", Some("application/json")).await.unwrap(),
            400,
            "invalid_json",
        ),
        (
            post("{}", Some("application/json")).await.unwrap(),
            400,
            "invalid_json",
        ),
        (
            post(r#"{"phone":628123456789}"#, Some("application/json"))
                .await
                .unwrap(),
            400,
            "invalid_json",
        ),
        (
            post(r#"{"phone":"628123456789"}"#, None).await.unwrap(),
            415,
            "unsupported_media_type",
        ),
        (
            post(r#"{"phone":"628123456789"}"#, Some("text/plain"))
                .await
                .unwrap(),
            415,
            "unsupported_media_type",
        ),
        (
            app.http.put(&url).send().await.unwrap(),
            405,
            "method_not_allowed",
        ),
        (
            app.http
                .post(&url)
                .header("content-type", "application/json")
                .body(format!(r#"{{"phone":"{}"}}"#, "6".repeat(4096)))
                .send()
                .await
                .unwrap(),
            413,
            "payload_too_large",
        ),
        (app.get("/pair/0812345678").await, 422, "invalid_phone"),
    ];

    for (response, status, code) in cases {
        assert_eq!(response.status().as_u16(), status, "{code}");
        assert_eq!(json(response).await["error"], code);
    }
}

#[tokio::test]
async fn health_is_always_ok_and_readiness_follows_the_store() {
    let upstash = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(401).set_body_json(json!({"error": "WRONGPASS"})))
        .mount(&upstash)
        .await;
    let bad_store: Arc<dyn PairingStore> =
        Arc::new(UpstashStore::new(UpstashSettings::new(upstash.uri(), "bad-token")).unwrap());
    let healthy = TestApp::spawn().await;
    let broken = TestApp::spawn_with(bad_store, |_| {}).await;

    let health = broken.get("/healthz").await;
    let ready = healthy.get("/readyz").await;
    let not_ready = broken.get("/readyz").await;

    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(json(health).await, json!({"status": "ok"}));
    assert_eq!(ready.status(), StatusCode::OK);
    assert_eq!(
        json(ready).await,
        json!({"status": "ready", "store": "memory"})
    );
    assert_eq!(not_ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json(not_ready).await["error"], "store_unavailable");
}

#[tokio::test]
async fn request_ids_are_propagated_or_generated() {
    let app = TestApp::spawn().await;

    let given = app
        .http
        .get(format!("{}/healthz", app.base))
        .header("x-request-id", "req-123")
        .send()
        .await
        .unwrap();
    let generated = app.get("/healthz").await;

    assert_eq!(given.headers()["x-request-id"], "req-123");
    assert!(!generated.headers()["x-request-id"].is_empty());
}

#[tokio::test]
async fn an_overlong_or_unprintable_request_id_is_replaced_not_logged() {
    let app = TestApp::spawn().await;
    let with_id = |id: &str| {
        app.http
            .get(format!("{}/healthz", app.base))
            .header("x-request-id", id)
            .send()
    };

    let long = with_id(&"a".repeat(65)).await.unwrap();
    let odd = with_id("req 1;<script>").await.unwrap();
    let longest_kept = with_id(&"b".repeat(64)).await.unwrap();

    for replaced in [&long, &odd] {
        let id = replaced.headers()["x-request-id"].to_str().unwrap();
        assert_eq!(id.len(), 36, "a fresh UUID: {id}");
    }
    assert_eq!(
        longest_kept.headers()["x-request-id"],
        "b".repeat(64).as_str()
    );
}

#[tokio::test]
async fn an_upstash_backed_pair_reads_once_takes_its_lease_writes_one_command_per_state_change_and_counts_its_code_once()
 {
    // Arrange
    let upstash = MockServer::start().await;
    Mock::given(method("POST"))
        .and(body_string_contains("'take'"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"result": 1})))
        .with_priority(1)
        .mount(&upstash)
        .await;
    Mock::given(method("POST"))
        .and(body_string_contains("INCR"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"result": [1, 3600]})))
        .with_priority(2)
        .mount(&upstash)
        .await;
    Mock::given(method("POST"))
        .and(body_string_contains("ZRANGE"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"result": []})))
        .with_priority(1)
        .mount(&upstash)
        .await;
    Mock::given(method("POST"))
        .and(body_string_contains("ARGV[3]"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"result": -1})))
        .with_priority(2)
        .mount(&upstash)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"result": "OK"})))
        .mount(&upstash)
        .await;
    let store: Arc<dyn PairingStore> =
        Arc::new(UpstashStore::new(UpstashSettings::new(upstash.uri(), "token")).unwrap());
    let app = TestApp::spawn_with(store, |_| {}).await;

    // Act
    let body = json(app.post_pair(PHONE).await).await;

    // Assert: a look for a recent outcome, the phone's lease taken,
    // `starting`, the code counted, then `pending` with the code; nothing
    // else. Each state goes out as the set-state script, numbered above
    // the one before, checking and renewing the lease in the same command.
    let requests = upstash.received_requests().await.unwrap();
    // The process's own subscription, for commands other processes relay.
    let (subscriptions, requests): (Vec<_>, Vec<_>) = requests
        .into_iter()
        .partition(|r| r.url.path().starts_with("/subscribe/"));
    assert!(subscriptions.len() <= 1, "{subscriptions:?}");
    let all: Vec<Vec<String>> = requests
        .iter()
        .map(|r| {
            assert_eq!(r.headers["authorization"], "Bearer token");
            serde_json::from_slice(&r.body).unwrap()
        })
        .collect();
    // The process's own look for sessions handed over to it, at its start.
    let (looks, commands): (Vec<_>, Vec<_>) = all
        .into_iter()
        .partition(|command| command.iter().any(|arg| arg == "wa:pair:handed_over"));
    assert_eq!(looks.len(), 1, "{looks:?}");
    assert_eq!(commands.len(), 5, "{commands:?}");
    assert_eq!(
        commands[0],
        ["GET", "wa:pair:628123456789"],
        "a recent outcome?"
    );
    assert_eq!(commands[1][0], "EVAL");
    assert_eq!(
        commands[1][2..6],
        [
            "2",
            "wa:pair:lease:628123456789",
            "wa:pair:lease:628123456789:epoch",
            "take"
        ]
    );
    assert_eq!(commands[1][8], "75000", "the lease's TTL");
    let holder = commands[1][6].clone();
    assert_eq!(commands[3][0], "EVAL");
    assert_eq!(
        commands[3][2..],
        ["1", "wa:pair:budget:628123456789", "3600"]
    );
    let states: Vec<Value> = [&commands[2], &commands[4]]
        .iter()
        .map(|command| {
            assert_eq!(command[0], "EVAL");
            assert!(command[1].contains("seq"), "the set-state script");
            assert_eq!(
                command[2..5],
                ["2", "wa:pair:628123456789", "wa:pair:lease:628123456789"]
            );
            let state = as_shown(&command[5]);
            assert_eq!(command[6], state["seq"].to_string(), "its own number");
            assert_eq!(command[7], "600");
            assert_eq!(
                command[8],
                format!("{holder}|1"),
                "while it holds the lease"
            );
            assert_eq!(command[9], "75000");
            state
        })
        .collect();
    assert_eq!(states[0]["status"], "starting");
    assert!(states[0]["code"].is_null());
    assert_eq!(states[1], body);
    assert!(states[1]["seq"].as_u64() > states[0]["seq"].as_u64());
}

#[tokio::test]
async fn a_store_outage_does_not_hold_back_the_code() {
    let upstash = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500).set_body_json(json!({"error": "down"})))
        .mount(&upstash)
        .await;
    let store: Arc<dyn PairingStore> = Arc::new(
        UpstashStore::new(UpstashSettings {
            max_retries: 1,
            ..UpstashSettings::new(upstash.uri(), "token")
        })
        .unwrap(),
    );
    let app = TestApp::spawn_with(store, |_| {}).await;

    let response = app.post_pair(PHONE).await;

    assert_eq!(response.status(), StatusCode::CREATED);
    let body = json(response).await;
    assert!(body["code"].is_string());
    let shown = app.get_json(&format!("/pair/{PHONE}")).await;
    assert_eq!(shown["code"], body["code"], "the session keeps its code");
}

#[tokio::test]
async fn shutdown_stores_pending_sessions_as_interrupted_and_finishes_in_time() {
    let store = Arc::new(MemoryStore::new());
    let mut app = TestApp::spawn_with(store.clone(), |_| {}).await;
    app.post_pair(PHONE).await;

    let took = app.shutdown().await;

    assert!(took < app.config.shutdown_grace, "{took:?}");
    let stored = as_shown(&store.get("wa:pair:628123456789").await.unwrap().unwrap());
    assert_eq!(stored["status"], "failed");
    assert_eq!(stored["reason"], "interrupted");
    assert!(stored["code"].is_null());
    assert!(app.fake().wait_for_no_connections(FLOW_TIMEOUT).await);
}

#[tokio::test]
async fn pair_answers_202_starting_with_retry_after_while_whatsapp_is_silent() {
    let mut app = TestApp::spawn_with(Arc::new(MemoryStore::new()), |config| {
        config.code_wait = Duration::from_secs(1);
    })
    .await;
    app.fake().push_fault(Some(PHONE), Fault::NeverAnswer);

    let response = app.post_pair(PHONE).await;

    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(response.headers()["retry-after"], "2");
    let body = json(response).await;
    assert_eq!(body["status"], "starting");
    assert!(body["code"].is_null());
    let took = app.shutdown().await;
    assert!(
        took < app.config.shutdown_grace,
        "a stop does not wait for WhatsApp: {took:?}"
    );
}

#[tokio::test]
async fn a_pending_state_left_by_another_process_reads_as_interrupted() {
    // Arrange: what a crashed process leaves behind.
    let store = Arc::new(MemoryStore::new());
    let left_behind = json!({
        "phone": PHONE, "status": "pending", "code": "ABCD1234", "code_display": "ABCD-1234",
        "issued_at": "2026-01-01T00:00:00Z", "expires_at": "2026-01-01T00:03:00Z",
        "refresh_at": "2026-01-01T00:02:45Z", "attempt": 1, "updated_at": "2026-01-01T00:00:00Z"
    });
    store
        .set(
            "wa:pair:628123456789",
            &left_behind.to_string(),
            Duration::from_secs(600),
        )
        .await
        .unwrap();
    let app = TestApp::spawn_with(store, |_| {}).await;

    // Act
    let state = app.get_json(&format!("/pair/{PHONE}")).await;

    // Assert
    assert_eq!(state["status"], "failed");
    assert_eq!(state["reason"], "interrupted");
    assert!(state["code"].is_null(), "a dead code is not shown");
}

#[tokio::test]
async fn whatsapp_forbidden_answers_403() {
    let app = TestApp::spawn().await;
    app.fake()
        .push_fault(Some(PHONE), Fault::Refuse { code: 403 });

    let response = app.post_pair(PHONE).await;

    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(json(response).await["error"], "whatsapp_forbidden");
}

#[tokio::test]
async fn a_dropped_whatsapp_connection_replaces_the_code_in_the_store() {
    // Arrange
    let store = Arc::new(MemoryStore::new());
    let app = TestApp::spawn_with(store.clone(), |_| {}).await;
    let first = json(app.post_pair(PHONE).await).await;

    // Act
    assert!(app.fake().drop_connection(PHONE));
    let replaced = app
        .wait_for_state(PHONE, |s| s["attempt"] == 2 && s["status"] == "pending")
        .await;

    // Assert
    assert_ne!(replaced["code"], first["code"]);
    let stored = as_shown(&store.get("wa:pair:628123456789").await.unwrap().unwrap());
    assert_eq!(stored, replaced);
    let linked = app
        .fake()
        .enter_code(PHONE, replaced["code"].as_str().unwrap())
        .await;
    assert!(linked.is_ok(), "{linked:?}");
}

#[tokio::test]
async fn a_whatsapp_connection_that_drops_after_every_code_gives_up_after_max_attempts() {
    // Arrange: a flapping connection (code, drop, code, drop) must not make
    // WhatsApp notify the phone again every few seconds.
    let app = TestApp::spawn_with(Arc::new(MemoryStore::new()), |config| {
        config.max_attempts = 2;
        config.backoff_base = Duration::from_millis(50);
    })
    .await;
    json(app.post_pair(PHONE).await).await;

    // Act
    assert!(app.fake().drop_connection(PHONE));
    app.wait_for_state(PHONE, |s| s["attempt"] == 2 && s["status"] == "pending")
        .await;
    assert!(app.fake().drop_connection(PHONE));
    let ended = app.wait_for_state(PHONE, |s| s["status"] == "failed").await;

    // Assert
    assert_eq!(ended["reason"], "gave_up");
    assert_eq!(ended["attempt"], 2);
}

#[tokio::test]
async fn pair_answers_409_session_ended_when_a_delete_lands_while_it_waits_for_the_first_code() {
    // Arrange: WhatsApp stays silent, so the POST is still waiting.
    let app = TestApp::spawn_with(Arc::new(MemoryStore::new()), |config| {
        config.code_wait = Duration::from_secs(20);
    })
    .await;
    app.fake().push_fault(Some(PHONE), Fault::NeverAnswer);
    let post = {
        let http = app.http.clone();
        let url = format!("{}/pair", app.base);
        tokio::spawn(async move {
            http.post(url)
                .json(&json!({ "phone": PHONE }))
                .send()
                .await
                .expect("request sent")
        })
    };
    app.wait_for_state(PHONE, |s| s["status"] == "starting")
        .await;

    // Act
    let deleted = app.delete(&format!("/pair/{PHONE}")).await;
    let posted = post.await.expect("POST task");

    // Assert
    assert_eq!(deleted.status(), StatusCode::OK);
    assert_eq!(posted.status(), StatusCode::CONFLICT);
    let body = json(posted).await;
    assert_eq!(body["error"], "session_ended");
    assert!(
        body["message"].as_str().unwrap().contains("cancelled"),
        "{body}"
    );
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    // Arrange
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::spawn_with(Arc::new(MemoryStore::new()), |config| {
        config.header_timeout = Duration::from_secs(1);
    })
    .await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    let mut slow = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connects");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("writes");

    // Act
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut rest)).await;

    // Assert
    assert!(closed.is_ok(), "still connected after 5 s");
    assert!(
        !String::from_utf8_lossy(&rest).contains("200 OK"),
        "{}",
        String::from_utf8_lossy(&rest)
    );
}

#[tokio::test]
async fn connections_past_the_limit_wait_until_an_idle_one_is_cut_off() {
    // Arrange
    let app = TestApp::spawn_with(Arc::new(MemoryStore::new()), |config| {
        config.header_timeout = Duration::from_secs(1);
        config.max_connections = 2;
    })
    .await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    let _idle = [
        tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connects"),
        tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connects"),
    ];
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Act
    let started = std::time::Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(10), app.get("/healthz"))
        .await
        .expect("answered once an idle connection was cut off");

    // Assert
    assert_eq!(answer.status(), StatusCode::OK);
    assert!(
        started.elapsed() >= Duration::from_millis(700),
        "answered after {:?}, while both slots were held",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_linked_number_whose_outcome_is_gone_is_not_relinked_unless_forced() {
    // Arrange: link the number, then stop the service. The next one starts
    // on an empty store, as after PAIR_OUTCOME_TTL_SECS (within it, a POST
    // joins the stored `linked` outcome).
    let mut before = TestApp::spawn_with(Arc::new(MemoryStore::new()), |_| {}).await;
    let code = json(before.post_pair(PHONE).await).await["code"]
        .as_str()
        .expect("a code")
        .to_owned();
    before.fake().enter_code(PHONE, &code).await.expect("links");
    before
        .wait_for_state(PHONE, |s| s["status"] == "linked")
        .await;
    before.shutdown().await;
    let data_dir = before.data_dir().to_path_buf();

    // Act
    let after = TestApp::spawn_with(Arc::new(MemoryStore::new()), move |config| {
        config.data_dir = data_dir;
    })
    .await;
    let plain = after.post_pair(PHONE).await;
    let plain_status = plain.status();
    let plain_body = json(plain).await;
    let forced = after
        .post_json("/pair", json!({ "phone": PHONE, "force": true }))
        .await;

    // Assert
    assert_eq!(plain_status, StatusCode::CONFLICT);
    assert_eq!(plain_body["error"], "already_linked");
    assert!(
        plain_body["message"].as_str().unwrap().contains("force"),
        "{plain_body}"
    );
    assert_eq!(forced.status(), StatusCode::CREATED);
    let kept: Vec<String> = std::fs::read_dir(before.data_dir())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        kept.iter()
            .any(|name| name.starts_with("628123456789.db.replaced-")),
        "the old device's credentials are set aside: {kept:?}"
    );
}

#[tokio::test]
async fn set_aside_devices_past_their_retention_are_deleted_at_startup() {
    // Arrange
    let dir = tempfile::tempdir().expect("temp dir");
    let week_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 8 * 24 * 3600;
    let old = dir
        .path()
        .join(format!("628111111111.db.replaced-{week_ago}"));
    let linked = dir.path().join("628222222222.db");
    std::fs::write(&old, b"old credentials").unwrap();
    std::fs::write(&linked, b"a linked device").unwrap();
    let data_dir = dir.path().to_path_buf();

    // Act
    let _app = TestApp::spawn_with(Arc::new(MemoryStore::new()), move |config| {
        config.data_dir = data_dir;
    })
    .await;
    let swept = tokio::time::timeout(Duration::from_secs(5), async {
        while old.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // Assert
    assert!(swept.is_ok(), "the old backup is still there");
    assert!(linked.exists(), "a linked device is never swept");
}
