//! The shared harness: a fake WhatsApp, linkers pointed at it, and waits
//! with deadlines so a broken flow fails instead of hanging.

use std::time::Duration;

use fake_wa::FakeWhatsApp;
use tempfile::TempDir;
use tokio::sync::mpsc;
use wa_pair::link::LinkEvent;
use wa_pair::link::whatsapp::{WhatsAppLinker, WhatsAppSettings};
use wa_pair::phone::PhoneNumber;

/// A web client version to pin so no test ever fetches WhatsApp's `sw.js`.
pub const PINNED_VERSION: (u32, u32, u32) = (2, 3000, 1_023_456_789);
/// Deadline for anything that involves the link client (handshakes, PBKDF2).
pub const FLOW_TIMEOUT: Duration = Duration::from_secs(60);

/// Logs to the test output when `RUST_LOG` is set (silent otherwise).
pub fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// A fake WhatsApp and a data directory for device stores.
pub struct LinkHarness {
    pub fake: FakeWhatsApp,
    pub data_dir: TempDir,
}

impl LinkHarness {
    pub async fn start() -> Self {
        init_logs();
        Self {
            fake: FakeWhatsApp::start().await.expect("fake whatsapp binds"),
            data_dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// The real linker, pointed at the fake.
    pub fn linker(&self) -> WhatsAppLinker {
        WhatsAppLinker::new(WhatsAppSettings {
            data_dir: self.data_dir.path().to_path_buf(),
            ws_url: Some(self.fake.ws_url()),
            version: Some(PINNED_VERSION),
        })
        .expect("linker")
    }
}

/// A valid Indonesian number ending in `n`.
pub fn phone(n: u32) -> PhoneNumber {
    PhoneNumber::parse(&format!("62812{n:08}")).expect("test phone parses")
}

/// Waits for the first event that `matches`, skipping others.
pub async fn next_event(
    events: &mut mpsc::UnboundedReceiver<LinkEvent>,
    matches: impl Fn(&LinkEvent) -> bool,
) -> LinkEvent {
    tokio::time::timeout(FLOW_TIMEOUT, async {
        loop {
            match events.recv().await {
                Some(event) if matches(&event) => return event,
                Some(_) => continue,
                None => panic!("event stream ended"),
            }
        }
    })
    .await
    .expect("event arrived in time")
}
