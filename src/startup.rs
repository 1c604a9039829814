//! Assembling the service from its configuration, serving it, and stopping
//! it gracefully.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{Config, StoreConfig, webhook_key};
use crate::devices::DeviceVault;
use crate::http::auth::Callers;
use crate::http::auth::supabase::SupabaseTokens;
use crate::http::limits::{Budgets, CallerLimits};
use crate::http::server::ConnectionLimits;
use crate::http::{AppState, router};
use crate::link::Linker;
use crate::link::whatsapp::{WhatsAppLinker, WhatsAppSettings};
use crate::session::{SessionSettings, Sessions};
use crate::store::{MemoryStore, PairingStore, RedisStore, UpstashSettings, UpstashStore};
use crate::webhook::{self, Deliverer, WebhookSettings, Webhooks};

/// Version pinned in sandbox mode when `WA_VERSION` is unset: the sandbox
/// must never reach out to WhatsApp to learn it.
pub const SANDBOX_VERSION: (u32, u32, u32) = (2, 3000, 1_023_456_789);
/// How long the startup store check waits; it only informs the log.
const STARTUP_STORE_CHECK: Duration = Duration::from_secs(3);
/// Share of the shutdown grace given to sessions to write their final state;
/// the rest is for in-flight requests to finish.
const SESSION_SHARE_OF_GRACE: f64 = 0.7;

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address we tried.
        addr: SocketAddr,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The store client could not be built.
    #[error("store: {0}")]
    Store(String),
    /// The link client could not be built.
    #[error("WhatsApp link client: {0}")]
    Link(String),
    /// Sandbox settings that must not run.
    #[error("{0}")]
    Sandbox(String),
    /// The webhook sender could not be built.
    #[error("webhook: {0}")]
    Webhook(String),
    /// `DATABASE_URL` is set but its database did not answer or its table
    /// could not be made: linked devices would not be kept, so the service
    /// does not start (a deploy that cannot keep them fails its check).
    #[error("device database (DATABASE_URL): {0}")]
    Devices(String),
}

/// `DATABASE_CA_CERT` as PEM: the text itself, or the file it names.
async fn database_ca(setting: Option<&str>) -> Result<Option<String>, StartupError> {
    let Some(setting) = setting else {
        return Ok(None);
    };
    if setting.trim_start().starts_with("-----BEGIN") {
        return Ok(Some(setting.to_owned()));
    }
    tokio::fs::read_to_string(setting)
        .await
        .map(Some)
        .map_err(|e| StartupError::Devices(format!("DATABASE_CA_CERT names {setting:?}: {e}")))
}

/// The webhook sender and its deliverer, when `WEBHOOK_URL` is set.
fn webhooks(config: &Config) -> Result<Option<(Webhooks, Deliverer)>, StartupError> {
    let Some(webhook) = &config.webhook else {
        return Ok(None);
    };
    let key = webhook_key(webhook.secret.expose())
        .ok_or_else(|| StartupError::Webhook("WEBHOOK_SECRET is not a usable key".into()))?;
    let settings = WebhookSettings {
        url: webhook.url.clone(),
        key,
        backoff: webhook::RETRY_BACKOFF,
        give_up_after: webhook::GIVE_UP_AFTER,
    };
    let built = Webhooks::new(settings).map_err(|e| StartupError::Webhook(e.to_string()))?;
    tracing::info!(
        event = "webhook_enabled",
        "session outcomes are POSTed to WEBHOOK_URL"
    );
    Ok(Some(built))
}

/// Who may call the API, said once at every start.
fn callers(config: &Config) -> Callers {
    let tokens = config
        .supabase_url
        .as_deref()
        .map(|url| SupabaseTokens::new(url, config.supabase_jwt_secret.as_ref()));
    let callers = Callers::new(
        &config.api_keys,
        config.supabase_service_role_key.as_ref(),
        tokens,
    );
    if callers.required() {
        tracing::info!(
            api_keys = config.api_keys.len(),
            service_role_key = config.supabase_service_role_key.is_some(),
            supabase_users = config.supabase_url.is_some(),
            supabase_shared_secret = config.supabase_jwt_secret.is_some(),
            "API callers need credentials"
        );
    } else if !config.host.is_loopback() {
        tracing::warn!(
            host = %config.host,
            "ALLOW_UNAUTHENTICATED=true: anyone who reaches this address can make WhatsApp \
             notify any phone; set API_KEYS or SUPABASE_URL"
        );
    }
    callers
}

/// A built service, bound and ready to serve.
pub struct App {
    listener: TcpListener,
    router: Router,
    sessions: Arc<Sessions>,
    /// Kept for its warm pool, which `serve` runs until shutdown.
    linker: Arc<dyn Linker>,
    grace: Duration,
    data_dir: std::path::PathBuf,
    backup_retention: Duration,
    connection_limits: ConnectionLimits,
    /// Kept until the sessions have stopped: in sandbox mode their link
    /// clients talk to it until the very end.
    sandbox_guard: Sandbox,
    /// Delivers outcomes to `WEBHOOK_URL` while `serve` runs.
    deliverer: Option<Deliverer>,
    /// The store is shared with other processes: sessions are handed over
    /// on shutdown, this process resumes the ones handed over to it, and
    /// listens for commands the others relay.
    hands_over: bool,
}

impl App {
    /// Builds the real service: the configured store and the WhatsApp linker
    /// (or, in sandbox mode, the in-process fake WhatsApp).
    pub async fn build(config: &Config) -> Result<Self, StartupError> {
        let store: Arc<dyn PairingStore> = match &config.store {
            StoreConfig::Memory => {
                tracing::warn!(
                    "no UPSTASH_REDIS_REST_URL/TOKEN set: codes live in this process only"
                );
                Arc::new(MemoryStore::new())
            }
            StoreConfig::Upstash { url, token } => Arc::new(
                UpstashStore::new(UpstashSettings::new(url.clone(), token.expose()))
                    .map_err(|e| StartupError::Store(e.to_string()))?,
            ),
            StoreConfig::Redis { url } => Arc::new(
                RedisStore::new(url.expose()).map_err(|e| StartupError::Store(e.to_string()))?,
            ),
        };
        check_store(store.as_ref()).await;
        let mut settings = WhatsAppSettings {
            data_dir: config.data_dir.clone(),
            ws_url: config.wa_ws_url.clone(),
            version: config.wa_version_parts(),
            code_request_timeout: None,
            warm_clients: config.warm_clients,
            warm_max_age: None,
        };
        let sandbox = sandbox::start(config, &mut settings).await?;
        let linker: Arc<dyn Linker> =
            Arc::new(WhatsAppLinker::new(settings).map_err(|e| StartupError::Link(e.to_string()))?);
        let app = Self::build_with(config, linker, store, sandbox).await?;
        Ok(app)
    }

    /// Builds the service around a given linker and store (tests use this).
    pub async fn build_with(
        config: &Config,
        linker: Arc<dyn Linker>,
        store: Arc<dyn PairingStore>,
        sandbox: Sandbox,
    ) -> Result<Self, StartupError> {
        let (webhooks, deliverer) = webhooks(config)?.unzip();
        let sessions = Sessions::new(
            SessionSettings::from_config(config),
            Arc::clone(&linker),
            Arc::clone(&store),
        );
        let sessions = match webhooks {
            Some(webhooks) => sessions.announcing_to(webhooks),
            None => sessions,
        };
        let devices = match &config.database_url {
            Some(url) => {
                let ca = database_ca(config.database_ca_cert.as_deref()).await?;
                Some(Arc::new(
                    DeviceVault::connect(url.expose(), ca.as_deref())
                        .await
                        .map_err(|e| StartupError::Devices(e.to_string()))?,
                ))
            }
            None => None,
        };
        let sessions = match &devices {
            Some(devices) => sessions.keeping_devices_in(Arc::clone(devices)),
            None => sessions,
        };
        // A store that outlives this process (Upstash, Redis) lets the next
        // process go on with its sessions; the memory store dies with it.
        let hands_over = store.kind() != "memory";
        let sessions = Arc::new(match hands_over {
            true => sessions.handing_over_on_stop(),
            false => sessions,
        });
        let state = AppState {
            sessions: Arc::clone(&sessions),
            code_wait: config.code_wait,
            sse_keepalive: config.sse_keepalive,
            ui_enabled: config.ui_enabled,
            callers: callers(config),
            sessions_per_user: config.sessions_per_user,
            limits: Arc::new(CallerLimits::new(
                Budgets {
                    starts_per_minute: config.starts_per_minute,
                    reads_per_minute: config.reads_per_minute,
                },
                config.trust_proxy,
            )),
            cors_allowed_origins: config.cors_allowed_origins.clone().into(),
            devices,
            #[cfg(feature = "sandbox")]
            sandbox: sandbox.0.clone(),
        };
        let addr = config.listen_addr();
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartupError::Bind { addr, source })?;
        Ok(Self {
            listener,
            router: router(state),
            sessions,
            linker,
            grace: config.shutdown_grace,
            data_dir: config.data_dir.clone(),
            backup_retention: config.backup_retention,
            connection_limits: ConnectionLimits {
                header_read_timeout: config.header_timeout,
                max_connections: config.max_connections,
            },
            sandbox_guard: sandbox,
            deliverer,
            hands_over,
        })
    }

    /// The registry of pairing sessions (for soak tests and diagnostics).
    pub fn sessions(&self) -> &Arc<Sessions> {
        &self.sessions
    }

    /// The service's router, to drive without a socket (tests check its
    /// routes against the OpenAPI document).
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Serves until `shutdown` completes, then stops accepting, interrupts
    /// the sessions (pending ones are handed over to the next process when
    /// the store is shared, else stored as `failed`/`interrupted`),
    /// lets in-flight requests finish, and returns within the grace period.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let _sandbox_guard = self.sandbox_guard;
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!("shutdown requested: no new requests, ending sessions");
            let _ = stop_tx.send(true);
        });
        let sweeper = tokio::spawn(crate::link::backups::sweep_until_stopped(
            self.data_dir.clone(),
            self.backup_retention,
            stop_rx.clone(),
        ));
        let linker = Arc::clone(&self.linker);
        let warm_stop = stop_rx.clone();
        let warm_pool = tokio::spawn(async move { linker.keep_warm(warm_stop).await });

        let resumer = self.hands_over.then(|| {
            let sessions = Arc::clone(&self.sessions);
            let stop = stop_rx.clone();
            tokio::spawn(async move { sessions.resume_handed_over_for(stop).await })
        });
        // Commands other processes relay to the sessions running here.
        let relay = self
            .hands_over
            .then(|| tokio::spawn(Arc::clone(&self.sessions).relay_commands(stop_rx.clone())));
        let sessions = Arc::clone(&self.sessions);
        let session_grace = self.grace.mul_f64(SESSION_SHARE_OF_GRACE);
        let mut sessions_stop = stop_rx.clone();
        // The webhook stops after the sessions: the outcomes of the sessions
        // a shutdown interrupts are the last it is given.
        let (sessions_ended_tx, sessions_ended) = watch::channel(false);
        let sessions_done = tokio::spawn(async move {
            let _ = sessions_stop.wait_for(|stop| *stop).await;
            sessions.shutdown(session_grace).await;
            let _ = sessions_ended_tx.send(true);
        });
        let webhooks = self
            .deliverer
            .map(|deliverer| tokio::spawn(Webhooks::run(deliverer, sessions_ended)));
        let server = crate::http::server::serve(
            self.listener,
            self.router,
            self.connection_limits,
            stop_rx.clone(),
        );
        let mut deadline_stop = stop_rx;
        let grace = self.grace;
        let hard_deadline = async move {
            let _ = deadline_stop.wait_for(|stop| *stop).await;
            tokio::time::sleep(grace).await;
        };
        tokio::select! {
            () = async {
                server.await;
                let _ = sessions_done.await;
                let _ = sweeper.await;
                let _ = warm_pool.await;
                if let Some(resumer) = resumer {
                    let _ = resumer.await;
                }
                if let Some(relay) = relay {
                    let _ = relay.await;
                }
                if let Some(webhooks) = webhooks {
                    let _ = webhooks.await;
                }
            } => {}
            _ = hard_deadline => {
                tracing::warn!("shutdown grace of {grace:?} ran out; exiting anyway");
            }
        };
        tracing::info!("stopped");
        Ok(())
    }
}

/// Logs once at startup whether the store answers. Never fatal: a store
/// outage must not keep the service (and the codes it can still hand out)
/// down; `/readyz` reports it from then on.
async fn check_store(store: &dyn PairingStore) {
    if crate::store::probe(store, STARTUP_STORE_CHECK).await {
        tracing::info!(store = store.kind(), "store reachable");
    }
}

/// Resolves when the process receives ctrl-c or SIGTERM (Railway's stop).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}

pub use sandbox::Sandbox;

#[cfg(feature = "sandbox")]
mod sandbox {
    //! Sandbox mode: the fake WhatsApp runs in-process on loopback.

    use std::sync::Arc;

    use super::{SANDBOX_VERSION, StartupError};
    use crate::config::Config;
    use crate::link::whatsapp::WhatsAppSettings;

    /// The in-process fake WhatsApp, when sandbox mode is on.
    #[derive(Default, Clone)]
    pub struct Sandbox(pub Option<Arc<fake_wa::FakeWhatsApp>>);

    /// A sandbox build skips WhatsApp's certificate check, so it only runs
    /// in sandbox mode and only ever talks to loopback.
    pub async fn start(
        config: &Config,
        settings: &mut WhatsAppSettings,
    ) -> Result<Sandbox, StartupError> {
        if !config.wa_sandbox {
            return Err(StartupError::Sandbox(
                "this binary was built with the `sandbox` feature, which skips WhatsApp's \
                 certificate check; it only runs with WA_SANDBOX=1. Build without \
                 `--features sandbox` for real use."
                    .into(),
            ));
        }
        if let Some(url) = &config.wa_ws_url
            && !is_loopback_url(url)
        {
            return Err(StartupError::Sandbox(format!(
                "WA_WS_URL must point at loopback in a sandbox build, got {url}"
            )));
        }
        let fake = fake_wa::FakeWhatsApp::start()
            .await
            .map_err(|e| StartupError::Sandbox(format!("cannot start the fake WhatsApp: {e}")))?;
        if settings.ws_url.is_none() {
            settings.ws_url = Some(fake.ws_url());
        }
        if settings.version.is_none() {
            settings.version = Some(SANDBOX_VERSION);
        }
        tracing::warn!(
            fake_whatsapp = %fake.ws_url(),
            "SANDBOX MODE: no real WhatsApp. Codes are linked by POST /sandbox/phones/{{phone}}/enter-code"
        );
        Ok(Sandbox(Some(Arc::new(fake))))
    }

    /// Whether `url`'s host is a loopback address or `localhost`.
    pub fn is_loopback_url(url: &str) -> bool {
        let Ok(parsed) = url::Url::parse(url) else {
            return false;
        };
        match parsed.host() {
            Some(url::Host::Domain(domain)) => domain.eq_ignore_ascii_case("localhost"),
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            None => false,
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn loopback_urls_are_recognised_and_others_refused() {
            assert!(is_loopback_url("ws://127.0.0.1:9000/ws/chat"));
            assert!(is_loopback_url("ws://localhost:9000/ws/chat"));
            assert!(is_loopback_url("ws://[::1]:9000/ws/chat"));
            assert!(!is_loopback_url("wss://web.whatsapp.com/ws/chat"));
            assert!(!is_loopback_url("ws://10.0.0.5/ws/chat"));
        }

        #[tokio::test]
        async fn a_sandbox_build_refuses_to_run_outside_sandbox_mode() {
            let config = Config::default();
            let mut settings = WhatsAppSettings::default();

            let result = start(&config, &mut settings).await;

            assert!(matches!(result, Err(StartupError::Sandbox(_))));
        }

        #[tokio::test]
        async fn a_sandbox_build_refuses_a_non_loopback_ws_url() {
            let config = Config {
                wa_sandbox: true,
                wa_ws_url: Some("wss://web.whatsapp.com/ws/chat".into()),
                ..Config::default()
            };
            let mut settings = WhatsAppSettings::default();

            let result = start(&config, &mut settings).await;

            assert!(matches!(result, Err(StartupError::Sandbox(m)) if m.contains("loopback")));
        }
    }
}

#[cfg(not(feature = "sandbox"))]
mod sandbox {
    //! Without the `sandbox` feature there is no fake to start.

    use super::StartupError;
    use crate::config::Config;
    use crate::link::whatsapp::WhatsAppSettings;

    /// Placeholder: sandbox mode needs the `sandbox` feature.
    #[derive(Default)]
    pub struct Sandbox;

    /// Refuses `WA_SANDBOX=1` in a build without the feature.
    pub async fn start(
        config: &Config,
        _settings: &mut WhatsAppSettings,
    ) -> Result<Sandbox, StartupError> {
        if config.wa_sandbox {
            return Err(StartupError::Sandbox(
                "WA_SANDBOX=1 needs a binary built with `--features sandbox`".into(),
            ));
        }
        Ok(Sandbox)
    }
}
