//! The standalone fake: it starts, says where it listens, answers its
//! control commands line by line, accepts WebSocket connections, and exits
//! when its stdin closes.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

struct Fake {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Fake {
    fn start() -> (Self, serde_json::Value) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fake-wa"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("the fake starts");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut fake = Self {
            child,
            stdin,
            stdout,
        };
        let first = fake.read_line();
        (fake, first)
    }

    fn read_line(&mut self) -> serde_json::Value {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("a line");
        serde_json::from_str(&line).expect("JSON")
    }

    fn ask(&mut self, command: serde_json::Value) -> serde_json::Value {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{command}").expect("command sent");
        self.read_line()
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_standalone_fake_listens_on_loopback_and_answers_its_control_commands() {
    // Arrange
    let (mut fake, first) = Fake::start();
    let url = first["ws_url"].as_str().expect("ws_url").to_owned();
    let addr = url
        .strip_prefix("ws://")
        .and_then(|rest| rest.split('/').next())
        .expect("host:port");

    // Act
    let connects = std::net::TcpStream::connect(addr).is_ok();
    let record = fake.ask(serde_json::json!({ "cmd": "record", "phone": "6281234567890" }));
    let typed = fake.ask(serde_json::json!({
        "cmd": "enter_code", "phone": "6281234567890", "code": "ABCD1234"
    }));
    let garbage = fake.ask(serde_json::json!({ "cmd": "reboot" }));

    // Assert
    assert!(addr.starts_with("127.0.0.1:"), "{url}");
    assert!(connects);
    assert_eq!(record, serde_json::json!({ "ok": true, "record": null }));
    assert_eq!(typed["ok"], false);
    assert_eq!(
        typed["error"],
        "no pairing code was requested for this phone"
    );
    assert_eq!(garbage["ok"], false);
}

#[test]
fn the_standalone_fake_exits_when_its_stdin_closes() {
    let (mut fake, _) = Fake::start();

    drop(fake.stdin.take());

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = fake.child.try_wait().expect("status") {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "still running");
        std::thread::sleep(Duration::from_millis(20));
    }
}
