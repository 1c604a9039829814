//! The `wa-pair` binary: configuration, telemetry, serve until SIGTERM.

use std::process::ExitCode;

use wa_pair::config::Config;
use wa_pair::startup::{App, shutdown_signal};
use wa_pair::telemetry;

/// jemalloc rather than glibc's malloc. Every link client does its SQLite
/// and PBKDF2 work on tokio's blocking threads; glibc gives those threads
/// arenas of their own and keeps what is freed there, so the process kept
/// growing although what it still used did not (the soak benchmark,
/// `benches/soak.rs`, measured +22 MiB of RSS over 2,000 ended sessions with
/// glibc; a heap profile showed 1.6 KiB per session still allocated).
///
/// jemalloc's `malloc` is unprefixed, so the bundled SQLite's own (C)
/// allocations come here too: left on glibc, they grew the soak by +10 MiB
/// with the warm pool on (it opens stores on more threads), against +2 to
/// +4 MiB with glibc held to one arena (`MALLOC_ARENA_MAX=1`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("wa-pair: invalid configuration: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Dropped when this body returns: what was logged is written; lines
    // logged while the runtime then shuts down are written directly.
    let _flusher = telemetry::init(config.log_format, &config.rust_log);
    // jemalloc returns freed pages to the system only when an allocation
    // comes by, or from its background threads: an idle service would keep
    // the memory of every session it ever ran.
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::warn!(error = %e, "could not start jemalloc's background purging");
    }
    let app = match App::build(&config).await {
        Ok(app) => app,
        Err(e) => {
            tracing::error!(error = %e, "startup failed");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(addr = %app.local_addr(), "wa-pair listening");
    match app.serve(shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "server failed");
            ExitCode::FAILURE
        }
    }
}
