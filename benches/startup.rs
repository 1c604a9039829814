//! Startup benchmark: how long from `exec` of the release binary until
//! `GET /healthz` answers 200, and how much memory the idle service holds.
//!
//! Run with `cargo bench --bench startup`. It first builds the binary as it
//! ships (`cargo build --release --bin wa-pair`: the binary `cargo bench`
//! itself builds has the tests' whatsapp-rust features unified in, so other
//! symbol names and none of `release/symbol-order.txt`'s layout; with
//! `--target` or `--profile`, the bench measures the one it built). Each run
//! starts that binary with default settings on a free loopback port, polls
//! `/healthz` every 200 µs, then reads the process's resident memory after
//! it has sat idle for a second. WhatsApp is unreachable here
//! (the WebSocket URL points at a closed port), so the warm pool's
//! connects fail and back off: the idle figure with `PAIR_WARM_CLIENTS=0`
//! is the service without WhatsApp connections, the default one adds what
//! the pool keeps while it cannot connect. Medians of [`RUNS`] runs.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod proc_stats;

/// Runs per configuration.
const RUNS: usize = 15;
/// How long the service sits idle before its memory is read.
const IDLE: Duration = Duration::from_secs(1);
/// Give up on a run after this long.
const PATIENCE: Duration = Duration::from_secs(10);

fn main() {
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--release",
            "--locked",
            "--quiet",
            "--bin",
            "wa-pair",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo runs");
    assert!(
        status.success(),
        "cargo build --release --bin wa-pair failed"
    );
    println!("wa-pair startup benchmark (release binary, {RUNS} runs each, medians)");
    for warm in ["2", "0"] {
        let mut ready = Vec::with_capacity(RUNS);
        let mut idle_rss = Vec::with_capacity(RUNS);
        for _ in 0..RUNS {
            let (elapsed, rss) = one_run(warm);
            ready.push(elapsed);
            idle_rss.push(rss);
        }
        ready.sort();
        idle_rss.sort();
        println!(
            "  PAIR_WARM_CLIENTS={warm}: exec -> /healthz 200 p50 {:.1} ms (max {:.1} ms; target <= 20 ms), idle RSS p50 {:.1} MiB (target <= 12 MiB)",
            ready[RUNS / 2].as_secs_f64() * 1000.0,
            ready[RUNS - 1].as_secs_f64() * 1000.0,
            idle_rss[RUNS / 2] as f64 / 1024.0,
        );
    }
}

/// Starts the binary, waits for `/healthz`, reads its idle RSS, stops it.
fn one_run(warm_clients: &str) -> (Duration, u64) {
    let port = free_port();
    let data_dir = tempfile::tempdir().expect("temp dir");
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_wa-pair"))
        .env_clear()
        .env("HOST", "127.0.0.1")
        .env("PORT", port.to_string())
        .env("DATA_DIR", data_dir.path())
        .env("WA_VERSION", "2.3000.1023456789")
        .env(
            "WA_WS_URL",
            format!("ws://127.0.0.1:{}/ws/chat", free_port()),
        )
        .env("PAIR_WARM_CLIENTS", warm_clients)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the release binary starts");
    let elapsed = loop {
        if healthz(port) {
            break started.elapsed();
        }
        assert!(started.elapsed() < PATIENCE, "never became healthy");
        std::thread::sleep(Duration::from_micros(200));
    };
    std::thread::sleep(IDLE);
    let rss = proc_stats::rss_kib(child.id());
    stop(&mut child);
    (elapsed, rss)
}

fn healthz(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let request = "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.1 200")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}
