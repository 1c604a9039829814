//! The fake WhatsApp is as strict as WhatsApp where our tests lean on it:
//! a device logs in only as what it linked as. Checked with the real client
//! (whatsapp-rust) so the fake cannot silently become permissive again.

use std::sync::Arc;
use std::time::Duration;

use wa_pair::link::http_client::ReqwestHttpClient;
use wa_pair::link::tasks::ClientRuntime;
use wa_pair::link::{LinkEvent, Linker};
use wacore::store::traits::DeviceStore;
use wacore::store::{Device, InMemoryBackend};
use wacore::types::events::Event;
use whatsapp_rust::bot::{Bot, EventDelivery};
use whatsapp_rust_sqlite_storage::SqliteStore;
use whatsapp_rust_tokio_transport::TokioWebSocketTransportFactory;

use crate::helpers::{FLOW_TIMEOUT, LinkHarness, PINNED_VERSION, next_event, phone};

/// Starts a bare client for `device` against the fake and lets it try to
/// log in; returns once the fake has answered the login (or `FLOW_TIMEOUT`).
async fn log_in_as(harness: &LinkHarness, device: Device, phone: &str) {
    // The fake speaks only the full (XX) handshake, not the resumed one a
    // client with WhatsApp's cached certificate chain tries first.
    let device = Device {
        server_cert_chain: None,
        ..device
    };
    let backend = Arc::new(InMemoryBackend::new());
    backend.save(&device).await.expect("device stored");
    let (runtime, tasks) = ClientRuntime::new();
    let bot = Bot::builder()
        .with_backend_arc(backend)
        .with_runtime(runtime)
        .with_transport_factory(
            TokioWebSocketTransportFactory::new().with_url(harness.fake.ws_url()),
        )
        .with_http_client(ReqwestHttpClient::new().expect("http"))
        .skip_history_sync()
        .with_event_delivery(EventDelivery::Ordered { capacity: 64 })
        .on_event(|_, _| async {})
        .with_version(PINNED_VERSION)
        .build()
        .await
        .expect("bot");
    let before = harness.fake.record(phone).unwrap_or_default();
    let client = bot.client();
    let run_loop = tokio::spawn(bot.spawn());
    harness
        .fake
        .wait_for(phone, FLOW_TIMEOUT, |r| {
            r.refused_logins > before.refused_logins || r.logins > before.logins
        })
        .await;
    client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), run_loop).await;
    tasks.close();
}

/// Links `phone` through the service's linker and returns its device as
/// stored on disk.
async fn linked_device(harness: &LinkHarness, phone: &wa_pair::phone::PhoneNumber) -> Device {
    let linker = harness.linker();
    let mut session = linker.open(phone).await.expect("opens");
    let issued = session.handle.request_code().await.expect("code issued");
    harness
        .fake
        .enter_code(phone.as_str(), issued.code.expose())
        .await
        .expect("links");
    next_event(&mut session.events, |e| matches!(e, LinkEvent::Linked(_))).await;
    session.handle.shutdown().await;
    let path = wa_pair::link::whatsapp::WhatsAppLinker::store_path(harness.data_dir.path(), phone);
    SqliteStore::new_for_device(path.to_str().unwrap(), 1)
        .await
        .expect("store")
        .load()
        .await
        .expect("loads")
        .expect("a device")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_never_linked_is_refused_at_login() {
    // Arrange: a registered-looking device the fake never linked.
    let harness = LinkHarness::start().await;
    let number = phone(40);
    let mut device = Device::new();
    device.pn = Some(
        format!("{}:1@s.whatsapp.net", number.as_str())
            .parse()
            .unwrap(),
    );

    // Act
    log_in_as(&harness, device, number.as_str()).await;

    // Assert
    let record = harness
        .fake
        .record(number.as_str())
        .expect("the fake saw it");
    assert_eq!(record.refused_logins, 1);
    assert!(!record.logged_in);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_device_logging_in_with_another_noise_key_is_refused() {
    // Arrange
    let harness = LinkHarness::start().await;
    let number = phone(41);
    let mut device = linked_device(&harness, &number).await;
    device.noise_key = Device::new().noise_key;

    // Act
    log_in_as(&harness, device, number.as_str()).await;

    // Assert
    let record = harness.fake.record(number.as_str()).unwrap();
    assert_eq!(record.refused_logins, 1);
    assert_eq!(record.logins, 1, "only the login right after the link");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_device_logging_in_as_another_device_number_is_refused() {
    // Arrange
    let harness = LinkHarness::start().await;
    let number = phone(42);
    let mut device = linked_device(&harness, &number).await;
    device.pn = Some(
        format!("{}:7@s.whatsapp.net", number.as_str())
            .parse()
            .unwrap(),
    );

    // Act
    log_in_as(&harness, device, number.as_str()).await;

    // Assert
    assert_eq!(
        harness.fake.record(number.as_str()).unwrap().refused_logins,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_linked_device_itself_logs_in_again() {
    // Arrange: the control for the refusals above.
    let harness = LinkHarness::start().await;
    let number = phone(43);
    let device = linked_device(&harness, &number).await;

    // Act
    log_in_as(&harness, device, number.as_str()).await;

    // Assert
    let record = harness.fake.record(number.as_str()).unwrap();
    assert_eq!(record.refused_logins, 0);
    assert_eq!(record.logins, 2, "once after the link, once now");
}

/// A bare client registering a new device against the fake, reporting the
/// QR strings it shows and whether it paired.
struct Registering {
    client: Arc<whatsapp_rust::Client>,
    backend: Arc<InMemoryBackend>,
    qrs: tokio::sync::mpsc::UnboundedReceiver<String>,
    paired: tokio::sync::watch::Receiver<bool>,
    run_loop: tokio::task::JoinHandle<()>,
    tasks: wa_pair::link::tasks::TaskScope,
}

impl Registering {
    async fn start(harness: &LinkHarness) -> Self {
        let backend = Arc::new(InMemoryBackend::new());
        let (qr_tx, qrs) = tokio::sync::mpsc::unbounded_channel();
        let (paired_tx, paired) = tokio::sync::watch::channel(false);
        let paired_tx = Arc::new(paired_tx);
        let (runtime, tasks) = ClientRuntime::new();
        let bot = Bot::builder()
            .with_backend_arc(Arc::clone(&backend) as _)
            .with_runtime(runtime)
            .with_transport_factory(
                TokioWebSocketTransportFactory::new().with_url(harness.fake.ws_url()),
            )
            .with_http_client(ReqwestHttpClient::new().expect("http"))
            .skip_history_sync()
            .with_event_delivery(EventDelivery::Ordered { capacity: 64 })
            .on_event(move |event, _| {
                let qr_tx = qr_tx.clone();
                let paired_tx = Arc::clone(&paired_tx);
                async move {
                    match &*event {
                        Event::PairingQrCode(qr) => {
                            let _ = qr_tx.send(qr.code.clone());
                        }
                        Event::PairSuccess(_) => {
                            let _ = paired_tx.send(true);
                        }
                        _ => {}
                    }
                }
            })
            .with_version(PINNED_VERSION)
            .build()
            .await
            .expect("bot");
        let client = bot.client();
        let run_loop = tokio::spawn(bot.spawn());
        Self {
            client,
            backend,
            qrs,
            paired,
            run_loop,
            tasks,
        }
    }

    async fn next_qr(&mut self) -> String {
        tokio::time::timeout(FLOW_TIMEOUT, self.qrs.recv())
            .await
            .expect("a QR in time")
            .expect("the client is running")
    }

    async fn stop(self) {
        self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.run_loop).await;
        self.tasks.close();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scanned_qr_links_the_account_that_scanned_it() {
    // Arrange
    let harness = LinkHarness::start().await;
    let number = phone(44);
    let mut companion = Registering::start(&harness).await;
    let qr = companion.next_qr().await;

    // Act
    let linked = harness.fake.scan_qr(number.as_str(), &qr).await;

    // Assert
    let linked = linked.expect("the QR links");
    assert_eq!(linked.via, fake_wa::LinkedVia::Qr);
    assert!(linked.jid.starts_with(&format!("{}:", number.as_str())));
    tokio::time::timeout(FLOW_TIMEOUT, companion.paired.wait_for(|p| *p))
        .await
        .expect("paired in time")
        .expect("client running");
    let record = harness
        .fake
        .wait_for(number.as_str(), FLOW_TIMEOUT, |r| r.logins == 1)
        .await
        .expect("the new device logged in after 515");
    assert_eq!(record.qr_scans, 1);
    companion.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qr_naming_another_noise_key_than_its_connections_is_refused() {
    // Arrange: the ref is live, but the Noise key is not the connection's.
    let harness = LinkHarness::start().await;
    let number = phone(45);
    let mut companion = Registering::start(&harness).await;
    let qr = companion.next_qr().await;
    let mut fields: Vec<String> = qr.split(',').map(str::to_owned).collect();
    fields[1] = fields[2].clone();
    let forged = fields.join(",");

    // Act
    let forged_scan = harness.fake.scan_qr(number.as_str(), &forged).await;
    let garbage_scan = harness.fake.scan_qr(number.as_str(), "not,a,qr").await;

    // Assert
    assert_eq!(forged_scan, Err(fake_wa::LinkAttemptError::UnknownQr));
    assert_eq!(garbage_scan, Err(fake_wa::LinkAttemptError::MalformedQr));
    let record = harness.fake.record(number.as_str()).unwrap();
    assert_eq!((record.unknown_qrs, record.qr_scans), (1, 0));
    assert!(!*companion.paired.borrow(), "nothing linked");
    companion.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_logged_itself_out_is_removed_and_refused_at_its_next_login() {
    // Arrange: linked by QR and logged in.
    let harness = LinkHarness::start().await;
    let number = phone(46);
    let mut companion = Registering::start(&harness).await;
    let qr = companion.next_qr().await;
    harness
        .fake
        .scan_qr(number.as_str(), &qr)
        .await
        .expect("links");
    harness
        .fake
        .wait_for(number.as_str(), FLOW_TIMEOUT, |r| r.logins == 1)
        .await
        .expect("logged in");
    for _ in 0..100 {
        if companion.client.is_logged_in() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Act
    companion.client.logout().await;

    // Assert
    let record = harness
        .fake
        .wait_for(number.as_str(), FLOW_TIMEOUT, |r| r.devices_removed == 1)
        .await
        .expect("the device was removed");
    assert_eq!(record.devices_removed, 1);
    let device = companion
        .backend
        .load()
        .await
        .expect("loads")
        .expect("the device");
    companion.stop().await;
    log_in_as(&harness, device, number.as_str()).await;
    assert_eq!(
        harness.fake.record(number.as_str()).unwrap().refused_logins,
        1,
        "a removed device is unknown to WhatsApp"
    );
}
