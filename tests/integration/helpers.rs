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
    // The service's own telemetry, so test output is redacted like production.
    if let Ok(filter) = std::env::var("RUST_LOG") {
        // Dropped at once: a test's lines are written as they are logged.
        drop(wa_pair::telemetry::init(
            wa_pair::config::LogFormat::Pretty,
            &filter,
        ));
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
        self.linker_with_timeout(None)
    }

    /// The real linker, pointed at the fake, with a code-request bound.
    pub fn linker_with_timeout(&self, timeout: Option<Duration>) -> WhatsAppLinker {
        WhatsAppLinker::new(WhatsAppSettings {
            data_dir: self.data_dir.path().to_path_buf(),
            ws_url: Some(self.fake.ws_url()),
            version: Some(PINNED_VERSION),
            code_request_timeout: timeout,
            ..Default::default()
        })
        .expect("linker")
    }

    /// The real linker with a warm pool of `size` clients replaced at
    /// `max_age`.
    pub fn warm_linker(&self, size: usize, max_age: Duration) -> WhatsAppLinker {
        WhatsAppLinker::new(WhatsAppSettings {
            data_dir: self.data_dir.path().to_path_buf(),
            ws_url: Some(self.fake.ws_url()),
            version: Some(PINNED_VERSION),
            warm_clients: size,
            warm_max_age: Some(max_age),
            ..Default::default()
        })
        .expect("linker")
    }
}

/// A configuration for tests (random port, temporary data directory).
fn test_config() -> (wa_pair::config::Config, TempDir) {
    init_logs();
    let data_dir = tempfile::tempdir().expect("temp dir");
    let config = wa_pair::config::Config {
        port: 0,
        data_dir: data_dir.path().to_path_buf(),
        // Tests fire many requests from one address on purpose; the tests
        // of the limits set their own.
        starts_per_minute: 1_000_000,
        reads_per_minute: 1_000_000,
        codes_per_hour: 1000,
        // Most tests count the fake's connections per session; the warm
        // pool's own connections would blur that. `tests/integration/warm.rs`
        // runs the service with the pool on.
        warm_clients: 0,
        ..wa_pair::config::Config::default()
    };
    (config, data_dir)
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

/// The whole service on a random port: real router, real sessions, the real
/// link client pointed at a fake WhatsApp, and a store of the test's choice.
pub struct TestApp {
    pub base: String,
    pub http: reqwest::Client,
    pub config: wa_pair::config::Config,
    /// The service's session registry, to count what it holds.
    pub sessions: std::sync::Arc<wa_pair::session::Sessions>,
    fake: Option<std::sync::Arc<FakeWhatsApp>>,
    _data_dir: TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl TestApp {
    /// Spawns the service with an in-memory store.
    pub async fn spawn() -> Self {
        Self::spawn_with(
            std::sync::Arc::new(wa_pair::store::MemoryStore::new()),
            |_| {},
        )
        .await
    }

    /// Spawns the service with `store`, after `tweak`ing its configuration.
    pub async fn spawn_with(
        store: std::sync::Arc<dyn wa_pair::store::PairingStore>,
        tweak: impl FnOnce(&mut wa_pair::config::Config),
    ) -> Self {
        let fake = std::sync::Arc::new(FakeWhatsApp::start().await.expect("fake binds"));
        Self::spawn_on(store, fake, tweak).await
    }

    /// Another process of the same service: this one's store and fake
    /// WhatsApp, its own data directory and registry (a replica).
    pub async fn spawn_replica(
        &self,
        store: std::sync::Arc<dyn wa_pair::store::PairingStore>,
    ) -> Self {
        let fake = std::sync::Arc::clone(self.fake.as_ref().expect("a test-owned fake"));
        let prefix = self.config.key_prefix.clone();
        Self::spawn_on(store, fake, |config| config.key_prefix = prefix).await
    }

    async fn spawn_on(
        store: std::sync::Arc<dyn wa_pair::store::PairingStore>,
        fake: std::sync::Arc<FakeWhatsApp>,
        tweak: impl FnOnce(&mut wa_pair::config::Config),
    ) -> Self {
        let (mut config, data_dir) = test_config();
        tweak(&mut config);
        let linker = WhatsAppLinker::new(WhatsAppSettings {
            data_dir: config.data_dir.clone(),
            ws_url: Some(fake.ws_url()),
            version: Some(PINNED_VERSION),
            code_request_timeout: None,
            warm_clients: config.warm_clients,
            ..Default::default()
        })
        .expect("linker");
        let app = wa_pair::startup::App::build_with(
            &config,
            std::sync::Arc::new(linker),
            store,
            Default::default(),
        )
        .await
        .expect("app builds");
        Self::serve(app, config, data_dir, Some(fake))
    }

    /// Spawns the service exactly as `WA_SANDBOX=1` starts it: its own
    /// in-process fake WhatsApp, driven through the `/sandbox` routes.
    #[cfg(feature = "sandbox")]
    pub async fn spawn_sandbox() -> Self {
        let (mut config, data_dir) = test_config();
        config.wa_sandbox = true;
        let app = wa_pair::startup::App::build(&config)
            .await
            .expect("sandbox starts");
        Self::serve(app, config, data_dir, None)
    }

    fn serve(
        app: wa_pair::startup::App,
        config: wa_pair::config::Config,
        data_dir: TempDir,
        fake: Option<std::sync::Arc<FakeWhatsApp>>,
    ) -> Self {
        let base = format!("http://{}", app.local_addr());
        let sessions = std::sync::Arc::clone(app.sessions());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(app.serve(async move {
            let _ = stopped.await;
        }));
        Self {
            base,
            http: reqwest::Client::new(),
            config,
            sessions,
            fake,
            _data_dir: data_dir,
            stop: Some(stop),
            server: Some(server),
        }
    }

    /// The directory holding the device stores.
    pub fn data_dir(&self) -> &std::path::Path {
        self._data_dir.path()
    }

    /// The fake WhatsApp the test drives (not in sandbox mode, where the
    /// service owns it).
    pub fn fake(&self) -> &FakeWhatsApp {
        self.fake
            .as_deref()
            .expect("this app has a test-owned fake")
    }

    /// `POST {path}` with a JSON body.
    pub async fn post_json(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .expect("request sent")
    }

    /// `GET {path}`, answered with JSON.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        self.get(path).await.json().await.expect("JSON body")
    }

    /// `POST /pair` with `{"phone": phone}`.
    pub async fn post_pair(&self, phone: &str) -> reqwest::Response {
        self.post_json("/pair", serde_json::json!({ "phone": phone }))
            .await
    }

    /// `POST /pair/{phone}/refresh`, answered with JSON.
    pub async fn refresh_json(&self, phone: &str) -> serde_json::Value {
        self.http
            .post(format!("{}/pair/{phone}/refresh", self.base))
            .send()
            .await
            .expect("request sent")
            .json()
            .await
            .expect("JSON body")
    }

    /// `DELETE {path}`.
    pub async fn delete(&self, path: &str) -> reqwest::Response {
        self.http
            .delete(format!("{}{path}", self.base))
            .send()
            .await
            .expect("request sent")
    }

    /// Closes each HTTP connection after its answer: idle keep-alive
    /// connections would count as open descriptors in leak checks.
    pub fn without_idle_connections(mut self) -> Self {
        self.http = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .expect("client");
        self
    }

    /// Waits until no session task is left in the service.
    pub async fn until_released(&self) {
        tokio::time::timeout(FLOW_TIMEOUT, async {
            while self.sessions.counts().live > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("every session task ended");
    }

    /// `GET {path}`.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("request sent")
    }

    /// Polls `GET /pair/{phone}` until `check` holds.
    pub async fn wait_for_state(
        &self,
        phone: &str,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        tokio::time::timeout(FLOW_TIMEOUT, async {
            loop {
                let response = self.get(&format!("/pair/{phone}")).await;
                if response.status().is_success() {
                    let body: serde_json::Value = response.json().await.expect("JSON body");
                    if check(&body) {
                        return body;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("state reached in time")
    }

    /// Sends the shutdown signal and waits for the server to stop.
    pub async fn shutdown(&mut self) -> Duration {
        let started = std::time::Instant::now();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.expect("server task").expect("server ran");
        }
        started.elapsed()
    }
}

/// File descriptors this process has open right now.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd is readable (Linux)")
        .count()
}

/// Open file descriptors of this process that point into `dir`.
pub fn fds_into(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd is readable (Linux)")
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target.starts_with(dir))
        .collect()
}

/// How long a closed device store may take to let go of its files.
///
/// r2d2 opens SQLite connections on a shared background thread that holds
/// the pool for the moment it takes to open one; when that open races with
/// our shutdown, the last reference (and so the files) is dropped on that
/// thread a few milliseconds after `shutdown` returns.
pub const FILES_CLOSE_WITHIN: std::time::Duration = std::time::Duration::from_secs(1);

/// Waits up to [`FILES_CLOSE_WITHIN`] until no descriptor of this process
/// points into `dir`; returns those still open then (empty when all closed).
pub async fn fds_into_after_close(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let deadline = std::time::Instant::now() + FILES_CLOSE_WITHIN;
    loop {
        let open = fds_into(dir);
        if open.is_empty() || std::time::Instant::now() >= deadline {
            return open;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Names of the files in `dir`, sorted.
pub fn files_in(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("directory is readable")
        .map(|entry| {
            entry
                .expect("directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// Open file descriptors once at most `limit` are open, or after `patience`:
/// sockets still closing get a moment before the count is read.
pub async fn settled_fds(limit: usize, patience: Duration) -> usize {
    let deadline = std::time::Instant::now() + patience;
    while open_fds() > limit && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    open_fds()
}

/// A stored state as the API shows it: the store also keeps a one-way tag
/// of who started the session, which no answer carries.
pub fn as_shown(stored: &str) -> serde_json::Value {
    let mut state: serde_json::Value = serde_json::from_str(stored).expect("stored JSON");
    if let Some(fields) = state.as_object_mut() {
        fields.remove("owner");
    }
    state
}

/// Decodes the one QR code in a PNG (greyscale, RGB or RGBA: each pixel
/// made grey), as a phone's camera would read it.
pub fn decode_qr_png(png: &[u8]) -> String {
    let decoder = png::Decoder::new(std::io::Cursor::new(png.to_vec()));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut pixels = vec![0; reader.output_buffer_size().expect("sized")];
    let frame = reader.next_frame(&mut pixels).expect("a frame");
    let (width, height) = (frame.width as usize, frame.height as usize);
    let channels = frame.color_type.samples();
    let mut image = rqrr::PreparedImage::prepare_from_greyscale(width, height, |x, y| {
        let at = (y * width + x) * channels;
        let colour = &pixels[at..at + channels.min(3)];
        (colour.iter().map(|&c| u32::from(c)).sum::<u32>() / colour.len() as u32) as u8
    });
    let grids = image.detect_grids();
    assert_eq!(grids.len(), 1, "one QR code in the picture");
    grids[0].decode().expect("the QR decodes").1
}

/// A store on the test Redis server, checked to answer (a test that needs
/// one fails without it); and a key prefix of its own, so tests running at
/// once never share a key.
pub async fn redis_store() -> (wa_pair::store::RedisStore, String) {
    use wa_pair::store::PairingStore as _;
    let store = wa_pair::store::RedisStore::new(&redis_test_url()).expect("a Redis URL");
    if let Err(e) = store.ping().await {
        panic!(
            "no Redis server at {} ({e}): start one (apt-get install redis-server) or set REDIS_TEST_URL",
            redis_test_url()
        );
    }
    (store, format!("test:{}:", uuid::Uuid::new_v4().simple()))
}

/// The Redis server the store tests use: `REDIS_TEST_URL`, else the local
/// one.
pub fn redis_test_url() -> String {
    std::env::var("REDIS_TEST_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// Writes numbered states to `store` under `key` as a late writer and a
/// newer one would, and checks that the late one does not go back in time.
pub async fn assert_refuses_a_late_state(store: &dyn wa_pair::store::PairingStore, key: &str) {
    use wa_pair::store::Written;
    let ttl = Duration::from_secs(60);
    let newer = r#"{"seq":1700000000000002,"status":"linked"}"#;
    let older = r#"{"seq":1700000000000001,"status":"pending"}"#;
    assert_eq!(
        store
            .set_state(key, older, 1_700_000_000_000_001, ttl, None)
            .await
            .unwrap(),
        Written::Stored
    );
    assert_eq!(
        store
            .set_state(key, newer, 1_700_000_000_000_002, ttl, None)
            .await
            .unwrap(),
        Written::Stored
    );
    assert_eq!(
        store
            .set_state(key, older, 1_700_000_000_000_001, ttl, None)
            .await
            .unwrap(),
        Written::Stale {
            current: 1_700_000_000_000_002
        },
        "a late write does not go back in time"
    );
    assert_eq!(store.get(key).await.unwrap().as_deref(), Some(newer));
    store.delete(key).await.unwrap();
}

/// Takes, renews and releases the lease `key` on `store` as two processes
/// would, and checks who gets it and with which epoch.
pub async fn assert_leases_go_to_one_holder_at_a_time(
    store: &dyn wa_pair::store::PairingStore,
    key: &str,
) {
    use wa_pair::store::LeaseStep::{Release, Renew, Take};
    let ttl = Duration::from_secs(30);
    let short = Duration::from_millis(200);

    let first = store.lease(key, Take { holder: "a" }, ttl).await.unwrap();
    let again = store.lease(key, Take { holder: "a" }, ttl).await.unwrap();
    let other = store.lease(key, Take { holder: "b" }, ttl).await.unwrap();
    let epoch = first.expect("a free lease is taken");
    let renewed = store
        .lease(key, Renew { holder: "a", epoch }, ttl)
        .await
        .unwrap();
    let renewed_by_other = store
        .lease(key, Renew { holder: "b", epoch }, ttl)
        .await
        .unwrap();
    let released = store
        .lease(key, Release { holder: "a", epoch }, ttl)
        .await
        .unwrap();
    let taken_over = store.lease(key, Take { holder: "b" }, short).await.unwrap();
    let stale_renew = store
        .lease(key, Renew { holder: "a", epoch }, ttl)
        .await
        .unwrap();
    tokio::time::sleep(short * 2).await;
    let after_expiry = store.lease(key, Take { holder: "a" }, ttl).await.unwrap();

    assert_eq!(again, Some(epoch), "its holder takes it again, same epoch");
    assert_eq!(other, None, "nobody else gets a held lease");
    assert_eq!(renewed, Some(epoch));
    assert_eq!(renewed_by_other, None);
    assert_eq!(released, Some(epoch));
    let taken_over = taken_over.expect("a released lease is free");
    assert!(taken_over > epoch, "a new holder, a new epoch");
    assert_eq!(stale_renew, None, "the old holder lost it");
    assert!(
        after_expiry.expect("an expired lease is free") > taken_over,
        "each take-over numbers above the last"
    );
    store
        .lease(
            key,
            Release {
                holder: "a",
                epoch: after_expiry.unwrap(),
            },
            ttl,
        )
        .await
        .unwrap();
    store.delete(&format!("{key}:epoch")).await.unwrap();
}

/// Writes states to `store` under `key` while holding the lease
/// `lease_key`, and after another process took it: the first write renews
/// the lease, the later one writes nothing.
pub async fn assert_a_lost_lease_fences_writes(
    store: &dyn wa_pair::store::PairingStore,
    key: &str,
    lease_key: &str,
) {
    use wa_pair::store::LeaseStep::{Release, Take};
    use wa_pair::store::{HeldLease, Written};
    let ttl = Duration::from_secs(60);
    let short = Duration::from_millis(300);
    let epoch = store
        .lease(lease_key, Take { holder: "a" }, short)
        .await
        .unwrap()
        .expect("a free lease");
    let held = HeldLease {
        key: lease_key,
        holder: "a",
        epoch,
        ttl: Duration::from_secs(30),
    };
    let state = r#"{"seq":1700000000000001,"status":"pending"}"#;

    let written = store
        .set_state(key, state, 1_700_000_000_000_001, ttl, Some(held))
        .await
        .unwrap();
    tokio::time::sleep(short * 2).await;
    let still_held = store
        .lease(lease_key, Take { holder: "b" }, ttl)
        .await
        .unwrap();
    store
        .lease(lease_key, Release { holder: "a", epoch }, ttl)
        .await
        .unwrap();
    let taken = store
        .lease(lease_key, Take { holder: "b" }, ttl)
        .await
        .unwrap()
        .expect("a released lease is free");
    let late = r#"{"seq":1700000000000002,"status":"failed"}"#;
    let fenced = store
        .set_state(key, late, 1_700_000_000_000_002, ttl, Some(held))
        .await
        .unwrap();

    assert_eq!(written, Written::Stored);
    assert_eq!(
        still_held, None,
        "the write renewed the lease past its first TTL"
    );
    assert!(taken > epoch);
    assert_eq!(fenced, Written::LeaseLost);
    assert_eq!(store.get(key).await.unwrap().as_deref(), Some(state));
    store.delete(key).await.unwrap();
    store.delete(lease_key).await.unwrap();
    store.delete(&format!("{lease_key}:epoch")).await.unwrap();
}

/// The pub/sub contract every store keeps: a subscriber gets what is
/// published on its channel (commas and quotes intact), in order, and
/// nothing of another channel; publishing counts the subscribers; a
/// dropped subscription stops counting. `channel` must be unique.
pub async fn assert_messages_reach_the_subscribers_of_their_channel(
    store: &dyn wa_pair::store::PairingStore,
    channel: &str,
) {
    let other = format!("{channel}:other");
    let nobody = store
        .publish(channel, "before anyone listens")
        .await
        .unwrap();
    let mut subscription = store.subscribe(channel).await.unwrap();
    // The subscription may take a moment to be in place on the server.
    let mut received = 0;
    for _ in 0..100 {
        received = store.publish(channel, "ready?").await.unwrap();
        if received > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elsewhere = store.publish(&other, "not for it").await.unwrap();
    let json = r#"{"id":"1","body":{"kind":"answer","text":"a, b \"c\""}}"#;
    store.publish(channel, json).await.unwrap();
    store.publish(channel, "last").await.unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        let message = tokio::time::timeout(Duration::from_secs(5), subscription.recv())
            .await
            .expect("a message in time")
            .expect("the subscription stays open");
        if message != "ready?" {
            got.push(message);
        }
    }
    drop(subscription);
    let mut after_drop = 1;
    for _ in 0..100 {
        after_drop = store.publish(channel, "anyone?").await.unwrap();
        if after_drop == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    assert_eq!(nobody, 0);
    assert_eq!(received, 1, "one subscriber");
    assert_eq!(elsewhere, 0, "another channel has none");
    assert_eq!(got, vec![json.to_owned(), "last".to_owned()]);
    assert_eq!(after_drop, 0, "a dropped subscription ends");
}

/// The hand-over contract every store keeps: one command writes the
/// state, lists the phone in the index and gives the lease up; a lost
/// lease or a newer state stops all three; the index lists by deadline and
/// forgets what is unlisted. `prefix` names the keys.
pub async fn assert_a_hand_over_writes_lists_and_releases_at_once(
    store: &dyn wa_pair::store::PairingStore,
    prefix: &str,
) {
    use wa_pair::store::LeaseStep::Take;
    use wa_pair::store::{HandOver, HeldLease, Written};
    let ttl = Duration::from_secs(60);
    let index = format!("{prefix}handed_over");
    let (first, second) = ("628123456789", "628123456780");
    let key = |phone: &str| format!("{prefix}{phone}");
    let lease_key = |phone: &str| format!("{prefix}lease:{phone}");
    let now_ms = u64::try_from(time::OffsetDateTime::now_utc().unix_timestamp() * 1000).unwrap();
    let mut results = Vec::new();
    for (phone, deadline_ms) in [(first, now_ms + 200_000), (second, now_ms + 100_000)] {
        let lease = lease_key(phone);
        let epoch = store
            .lease(&lease, Take { holder: "old" }, ttl)
            .await
            .unwrap()
            .expect("a free lease");
        let state_key = key(phone);
        let handover = HandOver {
            key: &state_key,
            value: r#"{"seq":1700000000000005,"status":"starting","reason":"handed_over"}"#,
            seq: 1_700_000_000_000_005,
            ttl,
            lease: Some(HeldLease {
                key: &lease,
                holder: "old",
                epoch,
                ttl,
            }),
            index: &index,
            phone,
            deadline_ms,
        };
        results.push(store.hand_over(handover).await.unwrap());
        // Again, as a retry after a lost answer: the lease is gone now.
        results.push(store.hand_over(handover).await.unwrap());
    }
    let listed = store.handed_over(&index).await.unwrap();
    let lease_after = store.get(&lease_key(first)).await.unwrap();
    let retaken = store
        .lease(&lease_key(first), Take { holder: "new" }, ttl)
        .await
        .unwrap();
    // A stale hand-over (a newer state is stored) changes nothing.
    let stale_key = key("628123456781");
    store
        .set(&stale_key, r#"{"seq":1700000000000009}"#, ttl)
        .await
        .unwrap();
    let stale = store
        .hand_over(HandOver {
            key: &stale_key,
            value: r#"{"seq":1700000000000008}"#,
            seq: 1_700_000_000_000_008,
            ttl,
            lease: None,
            index: &index,
            phone: "628123456781",
            deadline_ms: now_ms,
        })
        .await
        .unwrap();
    store.unlist(&index, second).await.unwrap();
    let after_unlist = store.handed_over(&index).await.unwrap();

    assert_eq!(results[0], Written::Stored);
    assert_eq!(
        results[1],
        Written::LeaseLost,
        "a retry finds the lease given up and writes nothing more"
    );
    assert_eq!(
        listed,
        vec![second.to_owned(), first.to_owned()],
        "the soonest deadline first"
    );
    assert_eq!(lease_after, None, "the lease was given up");
    assert!(retaken.is_some(), "the next process can take it");
    assert_eq!(
        stale,
        Written::Stale {
            current: 1_700_000_000_000_009
        }
    );
    assert_eq!(
        after_unlist,
        vec![first.to_owned()],
        "the stale one is not listed"
    );
    assert!(
        store
            .get(&key(first))
            .await
            .unwrap()
            .is_some_and(|state| state.contains("handed_over"))
    );
    for phone in [first, second, "628123456781"] {
        store.delete(&key(phone)).await.unwrap();
        store.delete(&lease_key(phone)).await.unwrap();
        store
            .delete(&format!("{}:epoch", lease_key(phone)))
            .await
            .unwrap();
    }
    store.delete(&index).await.unwrap();
}

/// One POST the webhook receiver got.
#[derive(Debug)]
pub struct ReceivedWebhook {
    pub id: String,
    pub timestamp: String,
    pub signature: String,
    pub body: Vec<u8>,
}

/// A webhook receiver on a loopback port: answers each POST with the next
/// scripted status (then 200), and hands what it got to the test.
pub async fn webhook_receiver(
    script: Vec<axum::http::StatusCode>,
) -> (
    String,
    tokio::sync::mpsc::UnboundedReceiver<ReceivedWebhook>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let script = std::sync::Arc::new(std::sync::Mutex::new(std::collections::VecDeque::from(
        script,
    )));
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let tx = tx.clone();
                let script = std::sync::Arc::clone(&script);
                async move {
                    let header = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned()
                    };
                    let _ = tx.send(ReceivedWebhook {
                        id: header("webhook-id"),
                        timestamp: header("webhook-timestamp"),
                        signature: header("webhook-signature"),
                        body: body.to_vec(),
                    });
                    script
                        .lock()
                        .unwrap()
                        .pop_front()
                        .unwrap_or(axum::http::StatusCode::OK)
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, rx)
}
