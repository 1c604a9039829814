//! The fake WhatsApp in a child process of its own, so its CPU and memory
//! are not counted as the service's: the bench binary re-executes itself
//! with [`ROLE`] set to `fake`, and the child prints its WebSocket URL.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};

/// Which part a bench process plays (unset: the report).
pub const ROLE: &str = "WA_PAIR_BENCH_ROLE";

/// Child process: the fake WhatsApp, until the parent closes our stdin.
pub async fn run_fake() {
    let fake = fake_wa::FakeWhatsApp::start().await.expect("fake whatsapp");
    println!("{}", fake.ws_url());
    std::io::stdout().flush().expect("stdout");
    tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        while std::io::stdin().read_line(&mut sink).unwrap_or(0) > 0 {}
    })
    .await
    .expect("stdin watcher");
}

/// The fake WhatsApp in a child process; killed when dropped.
pub struct FakeProcess {
    child: Child,
    /// Where the fake listens.
    pub ws_url: String,
}

impl FakeProcess {
    /// Starts this binary again as the fake and reads its URL.
    pub fn spawn() -> Self {
        let mut child = Command::new(std::env::current_exe().expect("own path"))
            .env(ROLE, "fake")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("fake process starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("fake prints its URL");
        Self {
            child,
            ws_url: line.trim().to_owned(),
        }
    }
}

impl Drop for FakeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
