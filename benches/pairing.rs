//! Pairing benchmark: the whole service in-process (router, sessions, the
//! real `whatsapp-rust` link client) against the loopback fake WhatsApp.
//!
//! Run with `cargo bench --bench pairing`. It prints a report:
//! - time from `POST /pair` to the answer with a code, one phone at a time
//!   (p50 / p95 / max): what a person waits for;
//! - the same for a burst of concurrent phones, and the throughput;
//! - resident memory per pending session (each holds a live WhatsApp
//!   connection and an SQLite device store).
//!
//! Every code costs one PBKDF2-HMAC-SHA256 with 131,072 rounds inside the
//! client; that dominates the latency and is WhatsApp's protocol, not ours.

mod common;

use std::time::{Duration, Instant};

use fake_wa::FakeWhatsApp;
use wa_pair::config::Config;

/// Phones paired one after the other for the latency figures.
const SEQUENTIAL: usize = 30;
/// Phones paired at once for the burst and memory figures.
const BURST: usize = 100;

#[tokio::main]
async fn main() {
    let fake = FakeWhatsApp::start().await.expect("fake whatsapp");
    let data_dir = tempfile::tempdir().expect("temp dir");
    let config = Config {
        port: 0,
        data_dir: data_dir.path().to_path_buf(),
        // One client pairs every phone: per-caller limits would stop the
        // benchmark, not measure it.
        starts_per_minute: 100_000_000,
        reads_per_minute: 100_000_000,
        ..Config::default()
    };
    let common::Service { base, stop, server } = common::serve(&config, &fake).await;
    let http = reqwest::Client::new();

    // Warm-up: first connection, lazy statics, SQLite.
    pair(&http, &base, 0).await;

    let mut sequential = Vec::with_capacity(SEQUENTIAL);
    for n in 1..=SEQUENTIAL {
        sequential.push(pair(&http, &base, n).await);
    }

    let rss_before = rss_kib();
    let burst_started = Instant::now();
    let burst = futures::future::join_all((0..BURST).map(|n| pair(&http, &base, 10_000 + n))).await;
    let burst_elapsed = burst_started.elapsed();
    // Let the sessions settle into their steady state before measuring.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after = rss_kib();

    println!("wa-pair pairing benchmark (release build, loopback fake WhatsApp)");
    report("POST /pair -> code, sequential", &mut sequential);
    let mut burst = burst;
    report(&format!("POST /pair -> code, {BURST} at once"), &mut burst);
    println!(
        "  burst throughput: {:.1} codes/s ({BURST} codes in {:.2} s)",
        BURST as f64 / burst_elapsed.as_secs_f64(),
        burst_elapsed.as_secs_f64()
    );
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        println!(
            "  resident memory: {:.1} MiB before the burst, {:.1} MiB with {BURST} more pending sessions ({:.0} KiB per session)",
            before as f64 / 1024.0,
            after as f64 / 1024.0,
            after.saturating_sub(before) as f64 / BURST as f64
        );
    }

    let _ = stop.send(());
    let _ = server.await;
}

/// One `POST /pair` for the `n`th test phone; returns how long it took.
async fn pair(http: &reqwest::Client, base: &str, n: usize) -> Duration {
    let phone = format!("62812{n:08}");
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

fn report(label: &str, samples: &mut [Duration]) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    println!(
        "  {label}: p50 {:.1} ms, p95 {:.1} ms, max {:.1} ms (n = {})",
        ms(at(0.5)),
        ms(at(0.95)),
        ms(at(1.0)),
        samples.len()
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Resident set size of this process, from /proc (Linux only).
fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
