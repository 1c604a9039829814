//! The fake WhatsApp as a standalone loopback process, for clients that do
//! not run in our test process (another language's WhatsApp Web client, or
//! several service processes sharing one fake).
//!
//! It prints one JSON line, `{"ws_url": "ws://127.0.0.1:<port>/ws/chat"}`,
//! then takes one JSON command per line on stdin and answers each with one
//! JSON line on stdout:
//!
//! - `{"cmd": "enter_code", "phone": "<digits>", "code": "ABCD1234"}`: the
//!   phone types the code; `{"ok": true, "linked": {...}}` once the device
//!   is linked, else `{"ok": false, "error": "..."}`.
//! - `{"cmd": "scan_qr", "phone": "<digits>", "qr": "<the QR string>"}`: the
//!   phone `phone` scans a companion's QR; answered like `enter_code`.
//! - `{"cmd": "record", "phone": "<digits>"}`: what the fake saw for that
//!   phone, `{"ok": true, "record": {...} | null}`.
//! - `{"cmd": "connections"}`: client connections accepted since the start
//!   and open now, `{"ok": true, "accepted": n, "open": n}`.
//!
//! It listens on 127.0.0.1 only and exits when stdin closes.

use fake_wa::FakeWhatsApp;
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// One line of the control protocol.
#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
enum Control {
    EnterCode { phone: String, code: String },
    ScanQr { phone: String, qr: String },
    Record { phone: String },
    Connections,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let fake = FakeWhatsApp::start().await?;
    let mut stdout = tokio::io::stdout();
    write_line(&mut stdout, &json!({ "ws_url": fake.ws_url() })).await?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        if line.trim().is_empty() {
            continue;
        }
        let answer = match serde_json::from_str::<Control>(&line) {
            Ok(command) => run(&fake, command).await,
            Err(e) => json!({ "ok": false, "error": format!("not a command: {e}") }),
        };
        write_line(&mut stdout, &answer).await?;
    }
    fake.shutdown();
    Ok(())
}

async fn run(fake: &FakeWhatsApp, command: Control) -> serde_json::Value {
    match command {
        Control::EnterCode { phone, code } => match fake.enter_code(&phone, &code).await {
            Ok(linked) => json!({ "ok": true, "linked": linked }),
            Err(e) => json!({ "ok": false, "error": e.to_string() }),
        },
        Control::ScanQr { phone, qr } => match fake.scan_qr(&phone, &qr).await {
            Ok(linked) => json!({ "ok": true, "linked": linked }),
            Err(e) => json!({ "ok": false, "error": e.to_string() }),
        },
        Control::Record { phone } => json!({ "ok": true, "record": fake.record(&phone) }),
        Control::Connections => json!({
            "ok": true,
            "accepted": fake.accepted_connections(),
            "open": fake.open_connections(),
        }),
    }
}

async fn write_line(out: &mut tokio::io::Stdout, value: &serde_json::Value) -> std::io::Result<()> {
    out.write_all(format!("{value}\n").as_bytes()).await?;
    out.flush().await
}
