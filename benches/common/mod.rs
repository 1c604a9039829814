//! What the in-process benchmarks share: the service built as `main` builds
//! it, with the real `whatsapp-rust` link client pointed at the fake.

use std::sync::Arc;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use wa_pair::config::Config;
use wa_pair::link::whatsapp::{WhatsAppLinker, WhatsAppSettings};
use wa_pair::startup::App;
use wa_pair::store::MemoryStore;

/// The WhatsApp Web version the fake accepts, so no version page is fetched.
pub const PINNED_VERSION: (u32, u32, u32) = (2, 3000, 1_023_456_789);

/// A running service: where it listens, how to stop it, its task.
pub struct Service {
    pub base: String,
    pub stop: oneshot::Sender<()>,
    pub server: JoinHandle<std::io::Result<()>>,
}

/// Starts the service with `config` (memory store) against the fake
/// WhatsApp at `ws_url`.
pub async fn serve(config: &Config, ws_url: &str) -> Service {
    let linker = WhatsAppLinker::new(WhatsAppSettings {
        data_dir: config.data_dir.clone(),
        ws_url: Some(ws_url.to_owned()),
        version: Some(PINNED_VERSION),
        code_request_timeout: None,
        warm_clients: config.warm_clients,
        ..Default::default()
    })
    .expect("linker");
    let app = App::build_with(
        config,
        Arc::new(linker),
        Arc::new(MemoryStore::new()),
        Default::default(),
    )
    .await
    .expect("app");
    let base = format!("http://{}", app.local_addr());
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(app.serve(async move {
        let _ = stopped.await;
    }));
    Service { base, stop, server }
}
