//! The warm pool against the fake WhatsApp: sessions take ready clients,
//! the pool refills and recycles within its size, linked devices land in
//! the phone's store, and nothing the pool opened outlives it.

use std::time::Duration;

use reqwest::StatusCode;
use tokio::sync::watch;
use wa_pair::link::Linker;
use wa_pair::link::whatsapp::warm::{WARM_DIR, WarmStep};

use crate::helpers::{
    FLOW_TIMEOUT, LinkHarness, TestApp, fds_into_after_close, files_in, next_event, open_fds, phone,
};
use wa_pair::link::LinkEvent;

/// Long enough that no client ages out during a test that does not want it.
const NEVER: Duration = Duration::from_secs(3600);

async fn warm_app(size: usize) -> TestApp {
    let app = TestApp::spawn_with(
        std::sync::Arc::new(wa_pair::store::MemoryStore::new()),
        |config| config.warm_clients = size,
    )
    .await;
    assert!(
        app.fake()
            .wait_for_open_connections(size, FLOW_TIMEOUT)
            .await,
        "the pool connects {size} clients"
    );
    app
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_session_takes_a_ready_client_instead_of_connecting() {
    // Arrange
    let app = warm_app(2).await;
    let accepted_before = app.fake().accepted_connections();
    let number = phone(1);

    // Act
    let response = app.post_pair(number.as_str()).await;
    let accepted_at_answer = app.fake().accepted_connections();

    // Assert: the code came over a connection that was already there; the
    // pool then connects a replacement.
    assert_eq!(response.status(), StatusCode::CREATED);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(body["code"].is_string(), "{body}");
    assert_eq!(app.fake().record(number.as_str()).unwrap().code_requests, 1);
    assert!(
        accepted_at_answer <= accepted_before + 1,
        "at most the pool's refill connected meanwhile ({accepted_before} -> {accepted_at_answer})"
    );
    assert!(
        app.fake().wait_for_open_connections(3, FLOW_TIMEOUT).await,
        "the session's client and two ready ones"
    );
    assert_eq!(
        files_in(app.data_dir()),
        Vec::<String>::new(),
        "pending and warm clients keep their devices in memory"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_taking_a_warm_client_shows_the_qr_its_connection_already_has() {
    // Arrange: the ready client got its QR codes when it connected, before
    // anyone asked.
    let app = warm_app(1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let number = phone(7);

    // Act
    let body: serde_json::Value = app.post_pair(number.as_str()).await.json().await.unwrap();
    let qr = body["qr"]
        .as_str()
        .expect("the warm connection's QR")
        .to_owned();
    let scanned = app.fake().scan_qr(number.as_str(), &qr).await;

    // Assert
    assert!(body["code"].is_string(), "{body}");
    scanned.expect("the QR handed over is one WhatsApp shows");
    app.wait_for_state(number.as_str(), |s| s["status"] == "linked")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_client_that_links_stores_its_device_under_the_phone_and_nothing_else_is_written() {
    // Arrange
    let app = warm_app(1).await;
    let linked = phone(2);
    let cancelled = phone(3);
    let issued: serde_json::Value = app.post_pair(linked.as_str()).await.json().await.unwrap();
    app.post_pair(cancelled.as_str()).await;

    // Act
    app.fake()
        .enter_code(linked.as_str(), issued["code"].as_str().unwrap())
        .await
        .expect("the code links");
    app.wait_for_state(linked.as_str(), |s| s["status"] == "linked")
        .await;
    let cancel = app.delete(&format!("/pair/{}", cancelled.as_str())).await;
    assert_eq!(cancel.status(), StatusCode::OK);
    app.until_released().await;

    // Assert: the linked device is home, and it is the only device file.
    let home = format!("{}.db", linked.as_str());
    let data = files_in(app.data_dir());
    assert!(data.contains(&home), "{data:?}");
    assert!(
        data.iter().all(|f| f.starts_with(&home)),
        "only the linked device's store (and SQLite's side files): {data:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_fills_to_its_size_and_no_further() {
    // Arrange
    let harness = LinkHarness::start().await;
    let linker = harness.warm_linker(2, NEVER);
    let pool = linker.warm_pool().expect("a pool").clone();

    // Act
    let first = pool.step().await;
    let second = pool.step().await;
    let third = pool.step().await;

    // Assert
    assert!(matches!(first, WarmStep::Added), "{first:?}");
    assert!(matches!(second, WarmStep::Added), "{second:?}");
    assert!(matches!(third, WarmStep::Full { .. }), "{third:?}");
    assert_eq!(pool.ready(), 2);
    assert!(
        harness
            .fake
            .wait_for_open_connections(2, FLOW_TIMEOUT)
            .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_replaces_clients_older_than_their_max_age() {
    // Arrange
    let harness = LinkHarness::start().await;
    let linker = harness.warm_linker(2, Duration::from_millis(500));
    let pool = linker.warm_pool().expect("a pool").clone();
    pool.step().await;
    pool.step().await;

    // Act
    tokio::time::sleep(Duration::from_millis(600)).await;
    let retired = pool.step().await;
    let refilled = (pool.step().await, pool.step().await);

    // Assert
    assert!(matches!(retired, WarmStep::Retired(2)), "{retired:?}");
    assert!(
        matches!(refilled, (WarmStep::Added, WarmStep::Added)),
        "{refilled:?}"
    );
    assert_eq!(pool.ready(), 2);
    assert!(
        harness
            .fake
            .wait_for_open_connections(2, FLOW_TIMEOUT)
            .await,
        "the old connections closed"
    );
    assert_eq!(harness.fake.accepted_connections(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_client_pairs_like_a_cold_one() {
    // Arrange
    let harness = LinkHarness::start().await;
    let linker = harness.warm_linker(1, NEVER);
    let pool = linker.warm_pool().expect("a pool").clone();
    pool.step().await;
    let number = phone(4);

    // Act
    let mut link = linker.open(&number).await.expect("opens");
    let issued = link.handle.request_code().await.expect("code issued");
    let accepted_for_the_code = harness.fake.accepted_connections();
    harness
        .fake
        .enter_code(number.as_str(), issued.code.expose())
        .await
        .expect("the code links");
    next_event(&mut link.events, |e| matches!(e, LinkEvent::Linked(_))).await;
    link.handle.shutdown().await;

    // Assert
    assert_eq!(accepted_for_the_code, 1, "no connect on open");
    assert_eq!(pool.ready(), 0);
    assert!(linker.has_linked_device(&number).await);
    assert_eq!(
        fds_into_after_close(harness.data_dir.path()).await,
        Vec::<std::path::PathBuf>::new(),
        "the store lets go of its files (SQLite removes -wal and -shm then)"
    );
    assert_eq!(
        files_in(harness.data_dir.path()),
        vec![format!("{}.db", number.as_str())],
        "the linked device's store, closed, and nothing else"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_pool_closes_every_client_and_deletes_its_directory() {
    // Arrange: one round first, so process-wide lazies are in the baseline.
    let harness = LinkHarness::start().await;
    let linker = harness.warm_linker(2, NEVER);
    let (stop, stopped) = watch::channel(false);
    let warm = {
        let linker = linker.clone();
        let stopped = stopped.clone();
        tokio::spawn(async move { linker.keep_warm(stopped).await })
    };
    assert!(
        harness
            .fake
            .wait_for_open_connections(2, FLOW_TIMEOUT)
            .await
    );
    let baseline = open_fds();

    // Act: ten sessions through the pool, then stop it.
    for n in 0..10 {
        let link = linker.open(&phone(100 + n)).await.expect("opens");
        link.handle.request_code().await.expect("code issued");
        link.handle.shutdown().await;
    }
    let _ = stop.send(true);
    warm.await.expect("the pool's task ends");

    // Assert
    assert!(harness.fake.wait_for_no_connections(FLOW_TIMEOUT).await);
    assert_eq!(
        fds_into_after_close(harness.data_dir.path()).await,
        Vec::<std::path::PathBuf>::new()
    );
    assert_eq!(files_in(harness.data_dir.path()), Vec::<String>::new());
    let now = open_fds();
    assert!(
        now <= baseline,
        "open fds grew from {baseline} to {now} over ten pooled sessions"
    );
    assert!(linker.warm_pool().unwrap().ready() == 0);
    assert!(
        linker.open(&phone(200)).await.is_ok(),
        "cold path still works"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_linked_before_a_crash_is_moved_into_place_at_the_next_start() {
    // Arrange: a store the pool left behind with its home marker.
    let harness = LinkHarness::start().await;
    let warm_dir = harness.data_dir.path().join(WARM_DIR);
    std::fs::create_dir_all(&warm_dir).unwrap();
    std::fs::write(warm_dir.join("1-0.db"), b"linked device").unwrap();
    std::fs::write(warm_dir.join("1-0.db.home"), b"6281200000005.db").unwrap();
    std::fs::write(warm_dir.join("1-1.db"), b"unlinked device").unwrap();
    let linker = harness.warm_linker(1, NEVER);
    let (stop, stopped) = watch::channel(false);

    // Act
    let warm = {
        let linker = linker.clone();
        tokio::spawn(async move { linker.keep_warm(stopped).await })
    };
    assert!(
        harness
            .fake
            .wait_for_open_connections(1, FLOW_TIMEOUT)
            .await
    );
    let _ = stop.send(true);
    warm.await.unwrap();

    // Assert
    assert!(linker.has_linked_device(&phone(5)).await);
    assert_eq!(
        std::fs::read(harness.data_dir.path().join("6281200000005.db")).unwrap(),
        b"linked device"
    );
    assert_eq!(
        files_in(harness.data_dir.path()),
        vec!["6281200000005.db".to_owned()]
    );
}
