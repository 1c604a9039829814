//! Pairing benchmark: wa-pair against the bare `whatsapp-rust` library, side
//! by side in one run, with the fake WhatsApp in its own process.
//!
//! Run with `cargo bench --bench pairing` (release build). It prints:
//! - request -> code, one phone at a time: the bare library's cold path (a
//!   client built exactly as `src/link/whatsapp/client.rs` builds it:
//!   SQLite store, connect, handshake, login, code request), the service
//!   with the warm pool off, and the service as it ships (warm pool on);
//!   medians of several rounds, and the ratios to the bare library;
//! - a burst of phones at once, both ways;
//! - resident memory per pending session at `BENCH_SESSIONS` (default 1000)
//!   open sessions, the service in this process and the bare library in a
//!   child process of its own; and the bare library once more on
//!   whatsapp-rust's in-memory store instead of SQLite, which says how much
//!   of a pending client is its SQLite device store (the service keeps a
//!   pending device in memory until it links).
//!
//! The fake runs in a child process (this same binary, re-executed with
//! `WA_PAIR_BENCH_ROLE=fake`), so its CPU and memory are not counted as the
//! service's. Every code costs one PBKDF2-HMAC-SHA256 with 131,072 rounds
//! inside the client on both sides; that is WhatsApp's protocol, not ours.

mod common;
mod fake_process;
mod proc_stats;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fake_process::{FakeProcess, ROLE, run_fake};
use wa_pair::config::Config;
use wa_pair::link::http_client::ReqwestHttpClient;
use wa_pair::link::tasks::{ClientRuntime, TaskScope};
use wacore::store::traits::Backend;
use wacore::store::{DevicePropsOverride, InMemoryBackend};
use waproto::whatsapp::device_props::PlatformType;
use whatsapp_rust::Client;
use whatsapp_rust::bot::{Bot, EventDelivery};
use whatsapp_rust::pair_code::PairCodeOptions;
use whatsapp_rust_sqlite_storage::SqliteStore;
use whatsapp_rust_tokio_transport::TokioWebSocketTransportFactory;

/// Rounds of the sequential comparison; the report gives the median of the
/// rounds' medians, so one noisy round cannot move it.
const ROUNDS: usize = 5;
/// Phones per side per round.
const PER_ROUND: usize = 10;
/// Pause between two sequential requests: people do not arrive
/// back-to-back, and the warm pool refills in the background meanwhile.
const BETWEEN_REQUESTS: Duration = Duration::from_millis(150);
/// Phones paired at once for the burst figures.
const BURST: usize = 100;
/// The warm pool's recommended size, measured against the bare library.
const WARM_CLIENTS: usize = 2;
/// Default number of open sessions for the memory figure.
const DEFAULT_SESSIONS: usize = 1000;

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match std::env::var(ROLE).as_deref() {
        Ok("fake") => runtime.block_on(run_fake()),
        Ok("bare-memory") => runtime.block_on(run_bare_memory()),
        _ => runtime.block_on(run_report()),
    }
}

/// Environment variable telling a `bare-memory` child which store to use:
/// `memory` for whatsapp-rust's `InMemoryBackend`, else SQLite.
const BARE_STORE: &str = "WA_PAIR_BENCH_BARE_STORE";

/// The device store of a bare client.
#[derive(Clone, Copy, PartialEq, Eq)]
enum BareStore {
    /// One SQLite file per client, as the service does.
    Sqlite,
    /// whatsapp-rust's in-memory store.
    Memory,
}

/// A bare library client, built as the service builds its clients.
struct BareClient {
    client: Arc<Client>,
    run_loop: tokio::task::JoinHandle<()>,
    tasks: TaskScope,
    path: std::path::PathBuf,
}

/// The bare library's cold path for `phone`: store, client, connect, code.
async fn bare_code(dir: &Path, ws_url: &str, phone: String) -> BareClient {
    bare_code_on(BareStore::Sqlite, dir, ws_url, phone).await
}

/// [`bare_code`] on a store of the caller's choice.
async fn bare_code_on(store: BareStore, dir: &Path, ws_url: &str, phone: String) -> BareClient {
    let path = dir.join(format!("{phone}.db"));
    let backend: Arc<dyn Backend> = match store {
        BareStore::Sqlite => Arc::new(
            SqliteStore::new_for_device(path.to_str().expect("UTF-8 path"), 1)
                .await
                .expect("store"),
        ),
        BareStore::Memory => Arc::new(InMemoryBackend::new()),
    };
    let (runtime, tasks) = ClientRuntime::new();
    let bot = Bot::builder()
        .with_backend_arc(backend)
        .with_runtime(runtime)
        .with_transport_factory(TokioWebSocketTransportFactory::new().with_url(ws_url.to_owned()))
        .with_http_client(ReqwestHttpClient::new().expect("http"))
        .with_device_props(
            DevicePropsOverride::new()
                .with_os("Linux")
                .with_platform_type(PlatformType::CHROME),
        )
        .skip_history_sync()
        .with_event_delivery(EventDelivery::Ordered { capacity: 64 })
        .on_event(|_, _| async {})
        .with_version(common::PINNED_VERSION)
        .build()
        .await
        .expect("bot");
    let client = bot.client();
    let run_loop = tokio::spawn(bot.spawn());
    client
        .wait_for_socket(Duration::from_secs(25))
        .await
        .expect("connected");
    client
        .pair_with_code(PairCodeOptions {
            phone_number: phone,
            show_push_notification: true,
            ..Default::default()
        })
        .await
        .expect("code");
    BareClient {
        client,
        run_loop,
        tasks,
        path,
    }
}

impl BareClient {
    async fn close(self) {
        self.client.disconnect().await;
        let _ = self.run_loop.await;
        self.tasks.close();
        drop(self.client);
        for suffix in ["", "-wal", "-shm"] {
            let _ = tokio::fs::remove_file(format!("{}{suffix}", self.path.display())).await;
        }
    }
}

/// Child process: `BENCH_SESSIONS` bare clients with a live code each;
/// prints the RSS they added, in KiB per client.
async fn run_bare_memory() {
    let ws_url = std::env::var("WA_WS_URL").expect("fake URL");
    let store = match std::env::var(BARE_STORE).as_deref() {
        Ok("memory") => BareStore::Memory,
        _ => BareStore::Sqlite,
    };
    // Numbers of their own, so the two children never share a phone.
    let (warm_up, series) = match store {
        BareStore::Sqlite => (phone(1, 0), 7),
        BareStore::Memory => (phone(9, 0), 8),
    };
    let sessions = sessions();
    let dir = tempfile::tempdir().expect("temp dir");
    // Warm-up: lazy statics, the r2d2 thread pool, the first connection.
    bare_code_on(store, dir.path(), &ws_url, warm_up)
        .await
        .close()
        .await;
    let before = rss_kib();
    let mut clients = Vec::with_capacity(sessions);
    for chunk in (0..sessions).collect::<Vec<_>>().chunks(50) {
        let opened = futures::future::join_all(
            chunk
                .iter()
                .map(|n| bare_code_on(store, dir.path(), &ws_url, phone(series, *n))),
        )
        .await;
        clients.extend(opened);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib();
    println!("{}", after.saturating_sub(before) as f64 / sessions as f64);
    std::io::stdout().flush().expect("stdout");
    std::process::exit(0);
}

fn sessions() -> usize {
    std::env::var("BENCH_SESSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_SESSIONS)
}

/// The `n`th test phone of `series` (distinct numbers per measurement).
fn phone(series: u32, n: usize) -> String {
    format!("62812{series}{n:07}")
}

async fn run_report() {
    let fake = FakeProcess::spawn();
    let http = reqwest::Client::new();
    let bare_dir = tempfile::tempdir().expect("temp dir");
    let cold_dir = tempfile::tempdir().expect("temp dir");
    let warm_dir = tempfile::tempdir().expect("temp dir");
    let cold = common::serve(&config(cold_dir.path(), 0), &fake.ws_url).await;
    let warm = common::serve(&config(warm_dir.path(), WARM_CLIENTS), &fake.ws_url).await;
    // Warm-up on every side: lazy statics, SQLite, first connections.
    bare_code(bare_dir.path(), &fake.ws_url, phone(1, 1))
        .await
        .close()
        .await;
    pair_and_cancel(&http, &cold.base, phone(2, 1)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    pair_and_cancel(&http, &warm.base, phone(3, 1)).await;

    let mut rounds = Vec::with_capacity(ROUNDS);
    let mut all = Samples::default();
    for round in 0..ROUNDS {
        let mut samples = Samples::default();
        for i in 0..PER_ROUND {
            let n = 1000 + round * PER_ROUND + i;
            tokio::time::sleep(BETWEEN_REQUESTS).await;
            let started = Instant::now();
            let client = bare_code(bare_dir.path(), &fake.ws_url, phone(1, n)).await;
            samples.bare.push(started.elapsed());
            client.close().await;
            tokio::time::sleep(BETWEEN_REQUESTS).await;
            samples
                .cold
                .push(pair_and_cancel(&http, &cold.base, phone(2, n)).await);
            tokio::time::sleep(BETWEEN_REQUESTS).await;
            samples
                .warm
                .push(pair_and_cancel(&http, &warm.base, phone(3, n)).await);
        }
        all.extend(&samples);
        rounds.push(samples.medians());
    }

    println!("wa-pair pairing benchmark (release build; fake WhatsApp in its own process)");
    println!(
        "request -> code, one phone at a time ({ROUNDS} rounds x {PER_ROUND} phones per side):"
    );
    let median_of = |pick: fn(&[f64; 3]) -> f64| {
        let mut values: Vec<f64> = rounds.iter().map(pick).collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let bare = median_of(|r| r[0]);
    let cold_p50 = median_of(|r| r[1]);
    let warm_p50 = median_of(|r| r[2]);
    let mut ratios_cold: Vec<f64> = rounds.iter().map(|r| r[1] / r[0]).collect();
    let mut ratios_warm: Vec<f64> = rounds.iter().map(|r| r[2] / r[0]).collect();
    ratios_cold.sort_by(f64::total_cmp);
    ratios_warm.sort_by(f64::total_cmp);
    println!(
        "  bare whatsapp-rust, cold       p50 {bare:6.1} ms   p95 {:6.1} ms   1.000x",
        p95(&mut all.bare)
    );
    println!(
        "  wa-pair, PAIR_WARM_CLIENTS=0   p50 {cold_p50:6.1} ms   p95 {:6.1} ms   {:.3}x",
        p95(&mut all.cold),
        ratios_cold[ratios_cold.len() / 2]
    );
    println!(
        "  wa-pair, PAIR_WARM_CLIENTS=2   p50 {warm_p50:6.1} ms   p95 {:6.1} ms   {:.3}x  (target <= 0.8x)",
        p95(&mut all.warm),
        ratios_warm[ratios_warm.len() / 2]
    );

    let started = Instant::now();
    let bare_burst = futures::future::join_all(
        (0..BURST).map(|n| bare_code(bare_dir.path(), &fake.ws_url, phone(4, n))),
    )
    .await;
    let bare_elapsed = started.elapsed();
    futures::future::join_all(bare_burst.into_iter().map(BareClient::close)).await;
    let started = Instant::now();
    futures::future::join_all((0..BURST).map(|n| pair_and_cancel(&http, &warm.base, phone(5, n))))
        .await;
    let warm_elapsed = started.elapsed();
    println!("burst of {BURST} phones at once, until every one has its code:");
    println!(
        "  bare whatsapp-rust {:.2} s, wa-pair {:.2} s ({:.3}x)",
        bare_elapsed.as_secs_f64(),
        warm_elapsed.as_secs_f64(),
        warm_elapsed.as_secs_f64() / bare_elapsed.as_secs_f64()
    );
    let _ = cold.stop.send(());
    let _ = cold.server.await;

    // Memory: this process holds only the warm service from here on.
    let sessions = sessions();
    let bare_kib = bare_memory(&fake.ws_url, BareStore::Sqlite);
    let in_memory_kib = bare_memory(&fake.ws_url, BareStore::Memory);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = rss_kib();
    for chunk in (0..sessions).collect::<Vec<_>>().chunks(50) {
        futures::future::join_all(chunk.iter().map(|n| pair(&http, &warm.base, phone(6, *n))))
            .await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib();
    let service_kib = after.saturating_sub(before) as f64 / sessions as f64;
    println!("resident memory per pending session, {sessions} open:");
    println!(
        "  bare whatsapp-rust {bare_kib:.0} KiB, wa-pair {service_kib:.0} KiB ({:.3}x; target <= 270 KiB)",
        service_kib / bare_kib
    );
    println!(
        "  bare whatsapp-rust on its in-memory store {in_memory_kib:.0} KiB: the SQLite device store is {:.0} KiB of a pending client",
        bare_kib - in_memory_kib
    );
    let _ = warm.stop.send(());
    let _ = warm.server.await;
}

/// Runs the bare-library memory measurement in a child process.
fn bare_memory(ws_url: &str, store: BareStore) -> f64 {
    let output = Command::new(std::env::current_exe().expect("own path"))
        .env(ROLE, "bare-memory")
        .env(
            BARE_STORE,
            if store == BareStore::Memory {
                "memory"
            } else {
                "sqlite"
            },
        )
        .env("WA_WS_URL", ws_url)
        .stderr(Stdio::inherit())
        .output()
        .expect("bare memory process runs");
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .expect("bare memory figure")
}

fn config(data_dir: &Path, warm_clients: usize) -> Config {
    Config {
        port: 0,
        data_dir: data_dir.to_path_buf(),
        warm_clients,
        // One client pairs every phone: per-caller limits would stop the
        // benchmark, not measure it.
        starts_per_minute: 100_000_000,
        reads_per_minute: 100_000_000,
        codes_per_hour: 100_000_000,
        ..Config::default()
    }
}

#[derive(Default)]
struct Samples {
    bare: Vec<Duration>,
    cold: Vec<Duration>,
    warm: Vec<Duration>,
}

impl Samples {
    fn medians(&self) -> [f64; 3] {
        [median(&self.bare), median(&self.cold), median(&self.warm)]
    }

    fn extend(&mut self, other: &Samples) {
        self.bare.extend(&other.bare);
        self.cold.extend(&other.cold);
        self.warm.extend(&other.warm);
    }
}

fn median(samples: &[Duration]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort();
    ms(sorted[sorted.len() / 2])
}

fn p95(samples: &mut [Duration]) -> f64 {
    samples.sort();
    ms(samples[((samples.len() - 1) as f64 * 0.95).round() as usize])
}

/// `POST /pair` for `phone`; returns how long until the answer with a code.
async fn pair(http: &reqwest::Client, base: &str, phone: String) -> Duration {
    let started = Instant::now();
    let response = http
        .post(format!("{base}/pair"))
        .json(&serde_json::json!({ "phone": phone }))
        .send()
        .await
        .expect("request");
    let elapsed = started.elapsed();
    assert_eq!(response.status(), 201, "phone {phone}");
    elapsed
}

/// [`pair`], then ends the session (not timed) so sessions do not pile up.
async fn pair_and_cancel(http: &reqwest::Client, base: &str, phone: String) -> Duration {
    let elapsed = pair(http, base, phone.clone()).await;
    let response = http
        .delete(format!("{base}/pair/{phone}"))
        .send()
        .await
        .expect("delete");
    assert_eq!(response.status(), 200, "cancel {phone}");
    elapsed
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Resident set size of this process in KiB.
fn rss_kib() -> u64 {
    proc_stats::rss_kib(std::process::id())
}
