//! Memory kept per ended session, with and without the warm pool: the
//! service in this process on jemalloc, the fake WhatsApp in a child
//! process (this binary again), and jemalloc's own count of allocated bytes
//! (not RSS, which also holds freed pages) before and after.
//!
//! Run with `cargo bench --bench retention`.

use std::time::Duration;

use tikv_jemalloc_ctl::{epoch, stats};

use fake_process::{FakeProcess, ROLE, run_fake};

mod common;
mod fake_process;
mod proc_stats;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Sessions per measurement.
const SESSIONS: usize = 600;
/// Sessions at once.
const CONCURRENCY: usize = 16;

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match std::env::var(ROLE).as_deref() {
        Ok("fake") => runtime.block_on(run_fake()),
        _ => runtime.block_on(run_report()),
    }
}

fn allocated_kib() -> f64 {
    epoch::advance().expect("jemalloc epoch");
    stats::allocated::read().expect("allocated") as f64 / 1024.0
}

async fn run_report() {
    println!(
        "memory kept per ended session ({SESSIONS} sessions, {CONCURRENCY} at a time, cancelled)"
    );
    // `RETENTION_FAKE=in-process` runs the fake inside this process, as the
    // sandbox (and so the soak) does, to see what it keeps.
    let in_process = std::env::var("RETENTION_FAKE").as_deref() == Ok("in-process");
    for warm in [0usize, 2, 0, 2] {
        let (_child, _inner, ws_url) = if in_process {
            let fake = fake_wa::FakeWhatsApp::start().await.expect("fake whatsapp");
            let url = fake.ws_url();
            (None, Some(fake), url)
        } else {
            let fake = FakeProcess::spawn();
            let url = fake.ws_url.clone();
            (Some(fake), None, url)
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let config = wa_pair::config::Config {
            port: 0,
            data_dir: dir.path().to_path_buf(),
            warm_clients: warm,
            starts_per_minute: 100_000_000,
            reads_per_minute: 100_000_000,
            codes_per_hour: 100_000_000,
            ..wa_pair::config::Config::default()
        };
        let service = common::serve(&config, &ws_url).await;
        let http = reqwest::Client::new();
        run(&http, &service.base, 0, 40).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let before = allocated_kib();
        let rss_before = proc_stats::rss_kib(std::process::id());
        run(&http, &service.base, 1000, SESSIONS).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let after = allocated_kib();
        let rss_after = proc_stats::rss_kib(std::process::id());
        println!(
            "  PAIR_WARM_CLIENTS={warm}: allocated {:+.0} KiB ({:+.2} KiB per session), RSS {:+.0} KiB",
            after - before,
            (after - before) / SESSIONS as f64,
            rss_after as f64 - rss_before as f64
        );
        let _ = service.stop.send(());
        let _ = service.server.await;
    }
}

async fn run(http: &reqwest::Client, base: &str, offset: usize, count: usize) {
    use futures::StreamExt;
    futures::stream::iter(offset..offset + count)
        .map(|n| {
            let http = http.clone();
            let base = base.to_owned();
            async move {
                let phone = format!("628129{n:07}");
                let response = http
                    .post(format!("{base}/pair"))
                    .json(&serde_json::json!({ "phone": phone }))
                    .send()
                    .await
                    .expect("post");
                assert_eq!(response.status(), 201);
                let response = http
                    .delete(format!("{base}/pair/{phone}"))
                    .send()
                    .await
                    .expect("delete");
                assert_eq!(response.status(), 200);
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
}
