//! Soak benchmark: the release binary in sandbox mode, in its own process,
//! driven over HTTP like a frontend would, for thousands of pairing sessions
//! that end (cancelled, linked, expired). Prints the process's resident
//! memory, open file descriptors and device files before and after, once
//! idle, and fails (exit code 1) when they grew:
//! RSS by more than 10 MiB, descriptors by more than 5, or any file of an
//! unlinked device left behind.
//!
//! Run with `cargo bench --bench soak --features sandbox` (Linux: it reads
//! `/proc/<pid>`). `SOAK_CYCLES` overrides the number of sessions.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod proc_stats;

use futures::StreamExt;
use serde_json::{Value, json};

/// Sessions run unless `SOAK_CYCLES` says otherwise.
const CYCLES: usize = 2000;
/// Sessions in flight at once.
const CONCURRENCY: usize = 16;
/// Sessions run before the baseline is taken (lazy statics, pools, caches).
const WARM_UP: usize = 40;
/// `PAIR_SESSION_MAX_SECS` in the soak: the expiring sessions end this fast.
const SESSION_MAX_SECS: u64 = 2;
/// `PAIR_OUTCOME_TTL_SECS` in the soak, so outcomes age out while idle.
const OUTCOME_TTL_SECS: u64 = 5;
/// Idle time before each measurement: longer than the outcome TTL.
const IDLE: Duration = Duration::from_secs(OUTCOME_TTL_SECS + 10);
/// The bounds.
const RSS_SLACK_KIB: u64 = 10 * 1024;
const FD_SLACK: usize = 5;

/// How one soak session ends.
#[derive(Debug, Clone, Copy)]
enum Way {
    Cancelled,
    Linked,
    Expired,
}

fn way(n: usize) -> Way {
    match n % 10 {
        0 => Way::Linked,
        1 => Way::Expired,
        _ => Way::Cancelled,
    }
}

fn phone(n: usize) -> String {
    format!("62814{n:08}")
}

struct Service {
    child: Child,
    base: String,
    http: reqwest::Client,
}

impl Service {
    fn start(data_dir: &Path) -> Self {
        // A free port: bind, read, release.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new(env!("CARGO_BIN_EXE_wa-pair"))
            .env_clear()
            // Allocator tuning under test (e.g. glibc's MALLOC_ARENA_MAX).
            .envs(std::env::vars().filter(|(k, _)| k.starts_with("MALLOC_")))
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOST", "127.0.0.1")
            .env("PORT", port.to_string())
            .env("WA_SANDBOX", "1")
            .env("RUST_LOG", "error")
            .env("DATA_DIR", data_dir)
            .env("PAIR_SESSION_MAX_SECS", SESSION_MAX_SECS.to_string())
            .env("PAIR_OUTCOME_TTL_SECS", OUTCOME_TTL_SECS.to_string())
            // One client drives every session: per-caller limits would
            // stop the soak, not measure it.
            .env("RATE_LIMIT_STARTS_PER_MIN", "1000000")
            // The warm pool's size (the service's default unless set), so
            // a run can compare.
            .env("PAIR_WARM_CLIENTS", pool_size().to_string())
            .env("RATE_LIMIT_READS_PER_MIN", "1000000")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("wa-pair starts");
        Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            // No idle keep-alive connections: they would count as the
            // service's descriptors.
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .expect("http client"),
        }
    }

    async fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(r) = self.http.get(format!("{}/healthz", self.base)).send().await
                && r.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("wa-pair did not become healthy");
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> (u16, Value) {
        let response = request.send().await.expect("request sent");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn state(&self, phone: &str) -> Value {
        self.send(self.http.get(format!("{}/pair/{phone}", self.base)))
            .await
            .1
    }

    /// One session for `phone`, run to its end.
    async fn cycle(&self, way: Way, phone: &str) {
        let (status, body) = self
            .send(
                self.http
                    .post(format!("{}/pair", self.base))
                    .json(&json!({ "phone": phone })),
            )
            .await;
        assert_eq!(status, 201, "POST /pair: {body}");
        match way {
            Way::Cancelled => {
                let (status, body) = self
                    .send(self.http.delete(format!("{}/pair/{phone}", self.base)))
                    .await;
                assert_eq!(status, 200, "DELETE: {body}");
            }
            Way::Linked => {
                let code = body["code"].as_str().expect("a code").to_owned();
                let (status, body) = self
                    .send(
                        self.http
                            .post(format!("{}/sandbox/phones/{phone}/enter-code", self.base))
                            .json(&json!({ "code": code })),
                    )
                    .await;
                assert_eq!(status, 200, "enter-code: {body}");
                self.until(phone, "linked").await;
            }
            Way::Expired => self.until(phone, "expired").await,
        }
    }

    async fn until(&self, phone: &str, status: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.state(phone).await["status"] != status {
            assert!(Instant::now() < deadline, "{phone} never became {status}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn run(&self, range: std::ops::Range<usize>) {
        futures::stream::iter(range)
            .for_each_concurrent(CONCURRENCY, |n| async move {
                self.cycle(way(n), &phone(n)).await;
            })
            .await;
    }

    fn measure(&self, data_dir: &Path) -> Sample {
        let pid = self.child.id();
        let rss_kib = proc_stats::rss_kib(pid);
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("fd dir")
            .count();
        let names = |dir: &Path| -> Vec<String> {
            std::fs::read_dir(dir)
                .map(|entries| {
                    entries
                        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default()
        };
        // Warm and pending clients have no files: everything here must be
        // a linked device.
        let files = names(data_dir);
        Sample {
            rss_kib,
            fds,
            files,
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Sample {
    rss_kib: u64,
    fds: usize,
    files: Vec<String>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cycles = std::env::var("SOAK_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CYCLES);
    let data_dir = tempfile::tempdir().expect("temp dir");
    let service = Service::start(data_dir.path());
    service.wait_healthy().await;
    let fresh = service.measure(data_dir.path());

    service.run(0..WARM_UP).await;
    tokio::time::sleep(IDLE).await;
    let before = service.measure(data_dir.path());

    let started = Instant::now();
    service.run(WARM_UP..WARM_UP + cycles).await;
    let took = started.elapsed();
    let peak = service.measure(data_dir.path());
    tokio::time::sleep(IDLE).await;
    // One more session, as a user would start after a quiet spell.
    service.run(WARM_UP + cycles..WARM_UP + cycles + 1).await;
    tokio::time::sleep(IDLE).await;
    let after = service.measure(data_dir.path());

    let linked = (0..WARM_UP + cycles + 1)
        .filter(|n| matches!(way(*n), Way::Linked))
        .map(phone)
        .collect::<std::collections::HashSet<_>>();
    let stray: Vec<&String> = after
        .files
        .iter()
        .filter(|f| !linked.iter().any(|p| f.starts_with(p.as_str())))
        .collect();
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "soak: {cycles} sessions (8/10 cancelled, 1/10 linked, 1/10 expired), {CONCURRENCY} at a time, in {:.1} s",
        took.as_secs_f64()
    );
    for (label, sample) in [
        ("fresh process:", &fresh),
        ("baseline (warm, idle):", &before),
        ("right after the soak:", &peak),
        ("after, idle:", &after),
    ] {
        println!(
            "{label:<23} RSS {:6.1} MiB, {:4} fds, {:4} files",
            mib(sample.rss_kib),
            sample.fds,
            sample.files.len(),
        );
    }
    println!(
        "devices left: {} linked, {} stray",
        linked.len(),
        stray.len()
    );
    let rss_ok = after.rss_kib <= before.rss_kib + RSS_SLACK_KIB;
    let fds_ok = after.fds <= before.fds + FD_SLACK;
    let files_ok = stray.is_empty();
    println!(
        "RSS growth {:+.1} MiB (bound 10), fds {:+} (bound 5), stray files {}: {}",
        mib(after.rss_kib) - mib(before.rss_kib),
        after.fds as i64 - before.fds as i64,
        stray.len(),
        if rss_ok && fds_ok && files_ok {
            "PASS"
        } else {
            "FAIL"
        }
    );
    // Returned, not `process::exit`: the service's `Drop` must still stop it.
    if rss_ok && fds_ok && files_ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

/// `PAIR_WARM_CLIENTS` for the service under test: this process's own
/// setting, else the service's default.
fn pool_size() -> usize {
    std::env::var("PAIR_WARM_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(wa_pair::config::DEFAULT_WARM_CLIENTS)
}
