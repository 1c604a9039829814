//! The real link client (whatsapp-rust) against the loopback fake WhatsApp.

use std::time::Duration;

use fake_wa::{Fault, LinkAttemptError};
use futures::future::join_all;
use wa_pair::link::{Invalidation, LinkError, LinkEvent, Linker};
use wacore::store::traits::{ProtocolStore, SignalStore};
use whatsapp_rust::store::persistence_manager::PersistenceManager;
use whatsapp_rust_sqlite_storage::SqliteStore;

use crate::helpers::{
    FLOW_TIMEOUT, LinkHarness, fds_into, fds_into_after_close, files_in, next_event, open_fds,
    phone,
};

#[tokio::test]
async fn code_links_when_typed_on_the_phone_and_the_device_is_persisted() {
    // Arrange
    let harness = LinkHarness::start().await;
    let phone = phone(1);
    let mut session = harness.linker().open(&phone).await.expect("session opens");

    // Act
    let issued = session.handle.request_code().await.expect("code issued");
    let record = harness
        .fake
        .record(phone.as_str())
        .expect("fake saw the request");
    let linked = harness
        .fake
        .enter_code(phone.as_str(), issued.code.expose())
        .await
        .expect("the returned code links");
    let event = next_event(&mut session.events, |e| matches!(e, LinkEvent::Linked(_))).await;

    // Assert
    assert_eq!(issued.code.expose().len(), 8);
    assert!(issued.valid_for > Duration::from_secs(150));
    assert_eq!(record.jid, format!("{}@s.whatsapp.net", phone.as_str()));
    assert!(record.show_push_notification);
    assert_eq!(record.platform_display, "Chrome (Linux)");
    assert_eq!(linked.code.as_deref(), Some(issued.code.expose()));
    let LinkEvent::Linked(account) = event else {
        unreachable!()
    };
    assert_eq!(account.jid, linked.jid);
    assert!(
        harness
            .fake
            .wait_for(phone.as_str(), FLOW_TIMEOUT, |r| r.logged_in)
            .await
            .is_some(),
        "the new device logs in after the 515"
    );

    // The new device uploads pre-keys at its first login; wait for them
    // to be stored (in the device's file: it left memory at the link).
    let path = wa_pair::link::whatsapp::WhatsAppLinker::store_path(harness.data_dir.path(), &phone);
    let reader = SqliteStore::new_for_device(path.to_str().unwrap(), 1)
        .await
        .expect("the device's file exists once linked");
    let deadline = std::time::Instant::now() + FLOW_TIMEOUT;
    while reader.get_max_prekey_id().await.unwrap_or(0) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no pre-keys stored after the login"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(reader);

    session.handle.shutdown().await;
    assert!(harness.fake.wait_for_no_connections(FLOW_TIMEOUT).await);
    let reopened = SqliteStore::new_for_device(path.to_str().unwrap(), 1)
        .await
        .expect("store reopens");
    // What the library stored at and after the link, not only the keys:
    // the device moved to disk from memory without losing any of it.
    let mappings = reopened.get_all_lid_mappings().await.expect("mappings");
    assert!(reopened.get_max_prekey_id().await.expect("pre-keys") > 0);
    assert!(
        mappings.iter().any(|m| m.phone_number == phone.as_str()),
        "the account's own LID mapping, stored at pair-success, is in the file"
    );
    let manager = PersistenceManager::new(std::sync::Arc::new(reopened))
        .await
        .expect("device loads");
    let device = manager.get_device_snapshot();
    assert!(device.is_registered(), "the linked device is on disk");
    assert_eq!(device.pn.as_ref().map(|j| j.to_string()), Some(linked.jid));
}

#[tokio::test]
async fn wrong_code_does_not_link_and_the_right_one_still_does() {
    // Arrange
    let harness = LinkHarness::start().await;
    let phone = phone(2);
    let mut session = harness.linker().open(&phone).await.expect("session opens");
    let issued = session.handle.request_code().await.expect("code issued");
    let wrong = if issued.code.expose() == "ZZZZZZZZ" {
        "YYYYYYYY"
    } else {
        "ZZZZZZZZ"
    };

    // Act
    let wrong_attempt = harness.fake.enter_code(phone.as_str(), wrong).await;
    let right_attempt = harness
        .fake
        .enter_code(phone.as_str(), issued.code.expose())
        .await;

    // Assert
    assert_eq!(wrong_attempt, Err(LinkAttemptError::WrongCode));
    assert!(right_attempt.is_ok(), "{right_attempt:?}");
    next_event(&mut session.events, |e| matches!(e, LinkEvent::Linked(_))).await;
    session.handle.shutdown().await;
}

#[tokio::test]
async fn rate_overlimit_is_refused_with_whatsapps_backoff_and_a_retry_succeeds() {
    // Arrange
    let harness = LinkHarness::start().await;
    let phone = phone(3);
    harness.fake.push_fault(
        Some(phone.as_str()),
        Fault::RateOverlimit { backoff_secs: 42 },
    );
    let session = harness.linker().open(&phone).await.expect("session opens");

    // Act
    let refused = session.handle.request_code().await;
    let retried = session.handle.request_code().await;

    // Assert
    let Err(LinkError::Refused {
        status, backoff, ..
    }) = refused
    else {
        panic!("expected a refusal, got {refused:?}");
    };
    assert_eq!(status, 429);
    assert_eq!(backoff, Some(Duration::from_secs(42)));
    assert!(retried.is_ok(), "{retried:?}");
    session.handle.shutdown().await;
}

#[tokio::test]
async fn dropped_connection_invalidates_the_code_and_a_fresh_one_links() {
    // Arrange
    let harness = LinkHarness::start().await;
    let phone = phone(4);
    let mut session = harness.linker().open(&phone).await.expect("session opens");
    let first = session.handle.request_code().await.expect("code issued");

    // Act
    assert!(harness.fake.drop_connection(phone.as_str()));
    let event = next_event(&mut session.events, |e| {
        matches!(e, LinkEvent::CodeInvalidated(_))
    })
    .await;
    let second = session.handle.request_code().await.expect("fresh code");
    let linked = harness
        .fake
        .enter_code(phone.as_str(), second.code.expose())
        .await;

    // Assert
    assert_eq!(
        event,
        LinkEvent::CodeInvalidated(Invalidation::Disconnected)
    );
    assert_ne!(first.code, second.code);
    assert!(linked.is_ok(), "{linked:?}");
    session.handle.shutdown().await;
}

#[tokio::test]
async fn refresh_request_invalidates_the_code_and_the_session_issues_another() {
    // Arrange
    let harness = LinkHarness::start().await;
    let phone = phone(5);
    let mut session = harness.linker().open(&phone).await.expect("session opens");
    let first = session.handle.request_code().await.expect("code issued");

    // Act
    assert!(harness.fake.request_code_refresh(phone.as_str()));
    let event = next_event(&mut session.events, |e| {
        matches!(e, LinkEvent::CodeInvalidated(_))
    })
    .await;
    let second = session.handle.request_code().await.expect("fresh code");

    // Assert
    assert_eq!(
        event,
        LinkEvent::CodeInvalidated(Invalidation::RefreshRequested)
    );
    assert_ne!(first.code, second.code);
    assert_eq!(
        harness.fake.record(phone.as_str()).unwrap().code_requests,
        2
    );
    session.handle.shutdown().await;
}

#[tokio::test]
async fn twenty_sessions_in_one_process_each_get_their_own_code() {
    // Arrange
    let harness = LinkHarness::start().await;
    let linker = harness.linker();
    let phones: Vec<_> = (100..120).map(phone).collect();

    // Act
    let results = join_all(phones.iter().map(|p| {
        let linker = linker.clone();
        async move {
            let session = linker.open(p).await?;
            let code = session.handle.request_code().await;
            session.handle.shutdown().await;
            code
        }
    }))
    .await;

    // Assert
    let mut codes: Vec<String> = results
        .into_iter()
        .map(|r| {
            r.expect("every session gets a code")
                .code
                .expose()
                .to_owned()
        })
        .collect();
    codes.sort();
    codes.dedup();
    assert_eq!(codes.len(), 20, "codes are distinct");
    for p in &phones {
        let record = harness
            .fake
            .record(p.as_str())
            .expect("fake saw each phone");
        assert_eq!(record.jid, format!("{}@s.whatsapp.net", p.as_str()));
        assert_eq!(record.code_requests, 1);
    }
    assert!(harness.fake.wait_for_no_connections(FLOW_TIMEOUT).await);
}

#[tokio::test]
async fn an_unanswered_code_request_times_out_and_the_next_one_succeeds() {
    // Arrange
    let harness = LinkHarness::start().await;
    let phone = phone(6);
    harness
        .fake
        .push_fault(Some(phone.as_str()), Fault::NeverAnswer);
    let session = harness
        .linker_with_timeout(Some(Duration::from_secs(2)))
        .open(&phone)
        .await
        .expect("session opens");

    // Act
    let started = std::time::Instant::now();
    let unanswered = session.handle.request_code().await;
    let waited = started.elapsed();
    let next = session.handle.request_code().await;

    // Assert
    assert!(
        matches!(unanswered, Err(LinkError::Timeout(_))),
        "{unanswered:?}"
    );
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    assert!(next.is_ok(), "{next:?}");
    session.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_the_device_store_and_deletes_an_unlinked_devices_files() {
    // Arrange: one session first, so lazily opened process-wide resources
    // (the shared r2d2 thread pool, reqwest's pool) are in the baseline.
    let harness = LinkHarness::start().await;
    let linker = harness.linker();
    let warm = linker.open(&phone(7)).await.expect("session opens");
    warm.handle.request_code().await.expect("code issued");
    warm.handle.shutdown().await;
    let baseline = open_fds();

    // Act
    let mut slowest = Duration::ZERO;
    for n in 0..10 {
        let session = linker.open(&phone(200 + n)).await.expect("session opens");
        session.handle.request_code().await.expect("code issued");
        let started = std::time::Instant::now();
        session.handle.shutdown().await;
        slowest = slowest.max(started.elapsed());
    }

    // Assert: nothing waits for a timer; shutdown has released it all.
    assert!(harness.fake.wait_for_no_connections(FLOW_TIMEOUT).await);
    assert_eq!(
        fds_into_after_close(harness.data_dir.path()).await,
        Vec::<std::path::PathBuf>::new()
    );
    assert_eq!(files_in(harness.data_dir.path()), Vec::<String>::new());
    assert!(
        slowest < wa_pair::link::whatsapp::RELEASE_WAIT,
        "a shutdown waited out the release bound ({slowest:?}): something still held the client"
    );
    let now = open_fds();
    assert!(
        now <= baseline + 2,
        "open fds grew from {baseline} to {now} over ten ended sessions"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_keeps_a_linked_devices_files_but_closes_them() {
    // Arrange
    let harness = LinkHarness::start().await;
    let phone = phone(8);
    let mut session = harness.linker().open(&phone).await.expect("session opens");
    let issued = session.handle.request_code().await.expect("code issued");
    harness
        .fake
        .enter_code(phone.as_str(), issued.code.expose())
        .await
        .expect("the code links");
    next_event(&mut session.events, |e| matches!(e, LinkEvent::Linked(_))).await;

    // Act
    session.handle.shutdown().await;

    // Assert
    let db = format!("{}.db", phone.as_str());
    assert!(
        files_in(harness.data_dir.path()).contains(&db),
        "the linked device's store stays"
    );
    assert_eq!(
        fds_into_after_close(harness.data_dir.path()).await,
        Vec::<std::path::PathBuf>::new()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_dropped_without_shutdown_still_releases_its_client() {
    // Arrange
    let harness = LinkHarness::start().await;
    let session = harness
        .linker()
        .open(&phone(9))
        .await
        .expect("session opens");
    session.handle.request_code().await.expect("code issued");

    // Act
    drop(session);

    // Assert
    let deadline = std::time::Instant::now() + FLOW_TIMEOUT;
    while !(fds_into(harness.data_dir.path()).is_empty()
        && files_in(harness.data_dir.path()).is_empty())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "client never released"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(harness.fake.wait_for_no_connections(FLOW_TIMEOUT).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_session_after_shutdown_leaves_the_next_sessions_files_alone() {
    // Arrange: a session shut down, then the number's next device store
    // appears before the old handle is dropped.
    let harness = LinkHarness::start().await;
    let phone = phone(10);
    let session = harness.linker().open(&phone).await.expect("session opens");
    session.handle.request_code().await.expect("code issued");
    session.handle.shutdown().await;
    let path = wa_pair::link::whatsapp::WhatsAppLinker::store_path(harness.data_dir.path(), &phone);
    std::fs::write(&path, b"the next session's store").expect("file written");

    // Act
    drop(session);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Assert
    assert!(path.exists(), "the next session's device store was deleted");
}

/// A version source that counts its fetches.
struct CountingVersions(std::sync::Arc<std::sync::atomic::AtomicU32>);

#[async_trait::async_trait]
impl wa_pair::link::version::VersionSource for CountingVersions {
    async fn fetch(&self) -> anyhow::Result<(u32, u32, u32)> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(crate::helpers::PINNED_VERSION)
    }
}

#[tokio::test]
async fn without_a_version_pin_clients_share_one_version_fetch() {
    // Arrange
    let harness = LinkHarness::start().await;
    let fetches = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let linker = wa_pair::link::whatsapp::WhatsAppLinker::with_version_source(
        wa_pair::link::whatsapp::WhatsAppSettings {
            data_dir: harness.data_dir.path().to_path_buf(),
            ws_url: Some(harness.fake.ws_url()),
            version: None,
            code_request_timeout: None,
            ..Default::default()
        },
        wa_pair::link::http_client::ReqwestHttpClient::new().expect("HTTP client"),
        CountingVersions(std::sync::Arc::clone(&fetches)),
    );

    // Act
    let codes = join_all((0..3).map(|n| {
        let linker = &linker;
        async move {
            let session = linker.open(&phone(n)).await.expect("opens");
            let code = session.handle.request_code().await;
            session.handle.shutdown().await;
            code
        }
    }))
    .await;

    // Assert
    assert!(codes.iter().all(Result::is_ok), "{codes:?}");
    assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 1);
}
