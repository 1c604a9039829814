//! The `wa-pair` binary: configuration, telemetry, serve until SIGTERM.

use std::process::ExitCode;

use wa_pair::config::Config;
use wa_pair::startup::{App, shutdown_signal};
use wa_pair::telemetry;

#[tokio::main]
async fn main() -> ExitCode {
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("wa-pair: invalid configuration: {e}");
            return ExitCode::FAILURE;
        }
    };
    telemetry::init(config.log_format, &config.rust_log);
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
