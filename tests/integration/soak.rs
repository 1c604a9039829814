//! Soak: hundreds of sessions that end every way a session can end, against
//! the real link client and the fake WhatsApp, watched through event
//! streams and announced by webhook, and afterwards nothing is left of
//! them: open file descriptors, tasks, registry entries and device files
//! are back where they started.

use std::collections::BTreeSet;
use std::time::Duration;

use fake_wa::Fault;
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::Value;
use wa_pair::store::MemoryStore;

use crate::helpers::{TestApp, files_in, open_fds, webhook_receiver};

/// Sessions per way of ending; eight ways (the last, shutdown, fewer).
const CYCLES_PER_WAY: u32 = 40;
/// Sessions in flight at once.
const CONCURRENCY: usize = 8;
/// Open at the final shutdown.
const AT_SHUTDOWN: u32 = 10;
/// Slack for descriptors the runtime opens lazily (a blocking thread's
/// eventfd, say): the bound.
const FD_SLACK: usize = 5;
/// How long sockets that are closing may take before the counts are read.
const SETTLE: Duration = Duration::from_secs(5);
/// How long an event stream may stay open after its session linked.
const STREAM_END: Duration = Duration::from_secs(30);
/// Outcomes are kept this long in the soak, so their ageing is seen too.
const OUTCOME_TTL: Duration = Duration::from_secs(4);

/// How a soak session ends.
#[derive(Debug, Clone, Copy)]
enum Way {
    Cancelled,
    Linked,
    Expired,
    Refused,
    GaveUp,
    /// Linked by scanning the QR instead of typing the code.
    LinkedByQr,
    /// The QR scanned by another account: its device is discarded.
    WrongAccount,
}

const WAYS: [Way; 7] = [
    Way::Cancelled,
    Way::Linked,
    Way::Expired,
    Way::Refused,
    Way::GaveUp,
    Way::LinkedByQr,
    Way::WrongAccount,
];

fn phone(n: u32) -> String {
    format!("62813{n:08}")
}

async fn body(response: reqwest::Response) -> Value {
    response.json().await.expect("JSON body")
}

/// Runs one session for `phone` to its end by `way`.
async fn cycle(app: &TestApp, way: Way, phone: &str) {
    match way {
        Way::Cancelled => {
            let posted = app.post_pair(phone).await;
            assert_eq!(posted.status(), StatusCode::CREATED, "{way:?}");
            let deleted = app.delete(&format!("/pair/{phone}")).await;
            assert_eq!(body(deleted).await["status"], "cancelled");
        }
        Way::Linked => {
            let posted = body(app.post_pair(phone).await).await;
            let code = posted["code"].as_str().expect("a code");
            // Someone watches it live: the stream must end with the session.
            let mut events = app.get(&format!("/pair/{phone}/events")).await;
            app.fake()
                .enter_code(phone, code)
                .await
                .expect("the code links");
            let mut streamed = String::new();
            while let Some(chunk) = tokio::time::timeout(STREAM_END, events.chunk())
                .await
                .expect("the stream ends after the outcome")
                .expect("the stream reads")
            {
                streamed.push_str(&String::from_utf8_lossy(&chunk));
            }
            assert!(streamed.contains("\"linked\""), "{streamed}");
            app.wait_for_state(phone, |s| s["status"] == "linked").await;
        }
        Way::Expired => {
            let posted = app.post_pair(phone).await;
            assert_eq!(posted.status(), StatusCode::CREATED, "{way:?}");
            app.wait_for_state(phone, |s| s["status"] == "expired")
                .await;
        }
        Way::Refused => {
            app.fake()
                .push_fault(Some(phone), Fault::Refuse { code: 403 });
            let posted = app.post_pair(phone).await;
            assert_eq!(posted.status(), StatusCode::FORBIDDEN);
        }
        Way::LinkedByQr => {
            let posted = body(app.post_pair(phone).await).await;
            let qr = posted["qr"].as_str().expect("a QR");
            app.fake().scan_qr(phone, qr).await.expect("the QR links");
            app.wait_for_state(phone, |s| s["status"] == "linked").await;
        }
        Way::WrongAccount => {
            let posted = body(app.post_pair(phone).await).await;
            let qr = posted["qr"].as_str().expect("a QR");
            let stranger = format!("9{phone}");
            app.fake()
                .scan_qr(&stranger, qr)
                .await
                .expect("WhatsApp links it");
            app.wait_for_state(phone, |s| s["reason"] == "wrong_account")
                .await;
        }
        Way::GaveUp => {
            for _ in 0..2 {
                app.fake()
                    .push_fault(Some(phone), Fault::Refuse { code: 500 });
            }
            app.post_pair(phone).await;
            app.wait_for_state(phone, |s| s["reason"] == "gave_up")
                .await;
        }
    }
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_that_ended_every_way_leave_no_descriptor_task_entry_or_file_behind() {
    // Arrange: expiry in seconds, gave-up after two quick failures, a
    // webhook receiving every outcome, and a client that keeps no idle
    // connections (they would count as fds).
    let (hook_url, mut hooks_received) = webhook_receiver(Vec::new()).await;
    let mut app = TestApp::spawn_with(std::sync::Arc::new(MemoryStore::new()), |config| {
        config.webhook = Some(wa_pair::config::WebhookConfig {
            url: hook_url,
            secret: wa_pair::config::Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        });
        config.session_max = Duration::from_secs(3);
        config.outcome_ttl = OUTCOME_TTL;
        config.max_attempts = 2;
        config.backoff_base = Duration::from_millis(10);
        config.backoff_cap = Duration::from_millis(50);
    })
    .await
    .without_idle_connections();
    // One of each first: lazily created process-wide parts (the SQLite
    // pools' shared thread pool, blocking threads) belong in the baseline.
    for (n, way) in WAYS.iter().enumerate() {
        cycle(&app, *way, &phone(900 + n as u32)).await;
    }
    app.until_released().await;
    let fds_before = open_fds();
    let tasks_before = alive_tasks();

    // Act
    let plan: Vec<(Way, String)> = (0..CYCLES_PER_WAY)
        .flat_map(|n| {
            WAYS.iter()
                .enumerate()
                .map(move |(w, way)| (*way, phone(n * WAYS.len() as u32 + w as u32)))
        })
        .collect();
    futures::stream::iter(plan.iter())
        .for_each_concurrent(CONCURRENCY, |(way, phone)| cycle(&app, *way, phone))
        .await;
    for n in 0..AT_SHUTDOWN {
        let posted = app.post_pair(&phone(5_000 + n)).await;
        assert_eq!(posted.status(), StatusCode::CREATED);
    }
    app.shutdown().await;
    app.until_released().await;

    // Assert: connections the fake WhatsApp and the HTTP server are still
    // closing get a moment to finish.
    let deadline = std::time::Instant::now() + SETTLE;
    while (open_fds() > fds_before + FD_SLACK || alive_tasks() > tasks_before)
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fds_after = open_fds();
    assert!(
        fds_after <= fds_before + FD_SLACK,
        "open fds went from {fds_before} to {fds_after}"
    );
    let tasks_after = alive_tasks();
    assert!(
        tasks_after <= tasks_before,
        "tokio tasks went from {tasks_before} to {tasks_after}"
    );
    let linked: BTreeSet<String> = plan
        .iter()
        .filter(|(way, _)| matches!(way, Way::Linked | Way::LinkedByQr))
        .map(|(_, phone)| phone.clone())
        .chain([phone(901), phone(905)])
        .collect();
    let stray: Vec<String> = files_in(app.data_dir())
        .into_iter()
        .filter(|file| !linked.iter().any(|phone| file.starts_with(phone.as_str())))
        .collect();
    assert_eq!(
        stray,
        Vec::<String>::new(),
        "only linked devices keep files"
    );
    let counts = app.sessions.counts();
    assert_eq!(counts.live, 0, "ended sessions leave the registry");
    assert_eq!(counts.owners, 0, "and their owners' counts");
    let mut hooks = 0;
    while hooks_received.try_recv().is_ok() {
        hooks += 1;
    }
    assert!(
        hooks >= WAYS.len() + plan.len(),
        "every outcome announced: {hooks} webhooks for {} sessions",
        WAYS.len() + plan.len()
    );
}
