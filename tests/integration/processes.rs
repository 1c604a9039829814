//! Three service processes, as a deploy or a replicated service runs them:
//! the binary itself (the sandbox build, as `WA_SANDBOX=1` starts it), each
//! with its own port and data directory, all on one Redis and one fake
//! WhatsApp, itself a process of its own (`crates/fake-wa`'s binary, on
//! loopback, asked through its stdin/stdout protocol), behaving as one
//! service. Processes are stopped with real signals: SIGTERM (a deploy) and
//! SIGKILL (a crash).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::future::join_all;
use serde_json::{Value, json};
use tempfile::TempDir;
use wa_pair::store::PairingStore;

use crate::helpers::{redis_store, redis_test_url};

const PHONE: &str = "628123456789";
/// How long a process may take to answer `/healthz` after its start.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The fake WhatsApp as its own process; killed when dropped.
struct FakeProcess {
    _child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    answers: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    ws_url: String,
}

impl FakeProcess {
    /// Starts `fake-wa` (built beside the service binary by the workspace
    /// test command) and reads the address it listens on.
    async fn start() -> Self {
        use tokio::io::AsyncBufReadExt as _;
        let binary = std::path::Path::new(env!("CARGO_BIN_EXE_wa-pair")).with_file_name("fake-wa");
        assert!(
            binary.exists(),
            "{} is missing: run the tests with --workspace, which builds it",
            binary.display()
        );
        let mut child = tokio::process::Command::new(binary)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("the fake starts");
        let stdin = child.stdin.take().expect("stdin");
        let mut answers = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        let first = answers.next_line().await.unwrap().expect("its address");
        let ws_url = serde_json::from_str::<Value>(&first).unwrap()["ws_url"]
            .as_str()
            .expect("ws_url")
            .to_owned();
        Self {
            _child: child,
            stdin,
            answers,
            ws_url,
        }
    }

    /// One command of its control protocol, and its answer.
    async fn ask(&mut self, command: Value) -> Value {
        use tokio::io::AsyncWriteExt as _;
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await
            .unwrap();
        let line = self.answers.next_line().await.unwrap().expect("an answer");
        let answer: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(answer["ok"], true, "{answer}");
        answer
    }

    /// Codes the fake handed out for `PHONE`.
    async fn code_requests(&mut self) -> u64 {
        let answer = self.ask(json!({ "cmd": "record", "phone": PHONE })).await;
        answer["record"]["code_requests"].as_u64().unwrap_or(0)
    }

    /// Client connections the fake accepted.
    async fn accepted_connections(&mut self) -> u64 {
        let answer = self.ask(json!({ "cmd": "connections" })).await;
        answer["accepted"].as_u64().expect("accepted")
    }
}

/// One service process; killed when dropped.
struct Process {
    child: Child,
    base: String,
    _data: TempDir,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    /// Starts the service binary against `fake` and the test Redis, its keys
    /// under `prefix`, and waits until it answers.
    async fn start(fake_ws_url: &str, prefix: &str) -> Self {
        let data = tempfile::tempdir().expect("temp dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new(env!("CARGO_BIN_EXE_wa-pair"))
            // Nothing of the test's environment (a store, keys) leaks in.
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .current_dir(data.path())
            .env("WA_SANDBOX", "1")
            .env("WA_WS_URL", fake_ws_url)
            .env("REDIS_URL", redis_test_url())
            .env("PAIR_KEY_PREFIX", prefix)
            .env("HOST", "127.0.0.1")
            .env("PORT", port.to_string())
            .env("DATA_DIR", data.path())
            .env("PAIR_WARM_CLIENTS", "0")
            .env("PAIR_CODES_PER_HOUR", "1000")
            .env("RATE_LIMIT_STARTS_PER_MIN", "1000000")
            .env("RATE_LIMIT_READS_PER_MIN", "1000000")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the service binary starts");
        let process = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            _data: data,
        };
        let started = Instant::now();
        loop {
            if let Ok(answer) = reqwest::get(format!("{}/healthz", process.base)).await
                && answer.status().is_success()
            {
                return process;
            }
            assert!(
                started.elapsed() < START_TIMEOUT,
                "the service did not come up"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends `signal` (`TERM`, `KILL`) to the process.
    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// Waits (at most `timeout`) for the process to exit.
    async fn exited_within(&mut self, timeout: Duration) -> bool {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    async fn post_pair(&self) -> reqwest::Response {
        reqwest::Client::new()
            .post(format!("{}/pair", self.base))
            .json(&json!({ "phone": PHONE }))
            .send()
            .await
            .expect("request sent")
    }

    async fn state(&self) -> Value {
        reqwest::get(format!("{}/pair/{PHONE}", self.base))
            .await
            .expect("request sent")
            .json()
            .await
            .expect("JSON")
    }
}

/// Three processes on one Redis (keys under a prefix of their own) and one
/// fake WhatsApp.
async fn three_processes() -> (
    FakeProcess,
    Vec<Process>,
    wa_pair::store::RedisStore,
    String,
) {
    let fake = FakeProcess::start().await;
    let (store, prefix) = redis_store().await;
    let processes = join_all((0..3).map(|_| Process::start(&fake.ws_url, &prefix))).await;
    (fake, processes, store, prefix)
}

/// The phone's state as the store has it, once `check` holds (at most
/// `timeout`); `None` if it never did.
async fn stored_once(
    store: &wa_pair::store::RedisStore,
    key: &str,
    timeout: Duration,
    check: impl Fn(&Value) -> bool,
) -> Option<Value> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if let Some(json) = store.get(key).await.unwrap() {
            let state: Value = serde_json::from_str(&json).unwrap();
            if check(&state) {
                return Some(state);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

#[tokio::test]
async fn fifty_concurrent_starts_spread_over_three_processes_open_one_whatsapp_connection() {
    // Arrange
    let (mut fake, processes, _store, _prefix) = three_processes().await;

    // Act
    let answers = join_all((0..50).map(|n| processes[n % 3].post_pair())).await;
    let mut shown = Vec::new();
    for process in &processes {
        let started = Instant::now();
        loop {
            let state = process.state().await;
            if state["status"] == "pending" {
                shown.push(state);
                break;
            }
            assert!(started.elapsed() < START_TIMEOUT, "{state}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // Assert
    for answer in &answers {
        assert!(answer.status().is_success(), "{}", answer.status());
    }
    assert_eq!(
        fake.accepted_connections().await,
        1,
        "one WhatsApp connection"
    );
    assert_eq!(fake.code_requests().await, 1);
    assert!(
        shown.iter().all(|state| state["code"] == shown[0]["code"]),
        "every process shows the owner's code"
    );
}

#[tokio::test]
async fn a_sigterm_of_the_owner_hands_its_session_to_another_process_which_stores_a_new_code_and_a_late_write_is_refused()
 {
    // Arrange: the first process runs the phone's session.
    let (mut fake, mut processes, store, prefix) = three_processes().await;
    let first: Value = processes[0].post_pair().await.json().await.unwrap();
    let key = format!("{prefix}{PHONE}");

    // Act: a deploy stops the owner; nobody asks the others anything.
    let stopped_at = Instant::now();
    processes[0].signal("TERM");
    let resumed = stored_once(&store, &key, Duration::from_secs(30), |state| {
        state["status"] == "pending" && state["attempt"] == 2
    })
    .await;
    let took = stopped_at.elapsed();
    eprintln!("SIGTERM of the owner process to a new code in the store: {took:?}");
    // The old owner's first state, written again late (a retry that was
    // still on its way): refused, the new code stays.
    let replayed = store
        .set_state(
            &key,
            &first.to_string(),
            first["seq"].as_u64().expect("seq"),
            Duration::from_secs(600),
            None,
        )
        .await
        .unwrap();
    let after_replay: Value =
        serde_json::from_str(&store.get(&key).await.unwrap().expect("stored")).unwrap();
    let exited = processes[0].exited_within(Duration::from_secs(15)).await;
    // Then commands sent to both others work: one runs it, one relays.
    tokio::time::sleep(wa_pair::session::MANUAL_REFRESH_DEBOUNCE * 2).await;
    let refresh = reqwest::Client::new()
        .post(format!("{}/pair/{PHONE}/refresh", processes[1].base))
        .send()
        .await
        .unwrap();
    let refresh_status = refresh.status();
    let refreshed: Value = refresh.json().await.unwrap();
    let cancel = reqwest::Client::new()
        .delete(format!("{}/pair/{PHONE}", processes[2].base))
        .send()
        .await
        .unwrap();
    let cancel_status = cancel.status();
    let cancelled: Value = cancel.json().await.unwrap();

    // Assert
    assert_eq!(first["status"], "pending");
    let resumed = resumed.expect("a new code stored by another process");
    assert_ne!(resumed["code"], first["code"]);
    assert_eq!(resumed["deadline"], first["deadline"]);
    assert!(
        matches!(replayed, wa_pair::store::Written::Stale { .. }),
        "{replayed:?}"
    );
    assert_eq!(
        after_replay["code"], resumed["code"],
        "the late write changed nothing"
    );
    assert!(
        took < wa_pair::session::RESUME_LOOK_EVERY + Duration::from_secs(15),
        "{took:?}"
    );
    assert!(exited, "the old process exits within its grace");
    assert!(refresh_status.is_success(), "{refresh_status} {refreshed}");
    assert_eq!(refreshed["attempt"], 3);
    assert!(cancel_status.is_success(), "{cancel_status} {cancelled}");
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(fake.code_requests().await, 3);
}

#[tokio::test]
async fn a_killed_owner_s_session_is_taken_over_once_its_lease_expires() {
    // Arrange: the first process runs the phone's session, then dies
    // without a word (SIGKILL: no hand-over, its lease left to expire).
    let (mut fake, mut processes, _store, _prefix) = three_processes().await;
    let first: Value = processes[0].post_pair().await.json().await.unwrap();
    processes[0].signal("KILL");
    assert!(processes[0].exited_within(Duration::from_secs(5)).await);
    let killed_at = Instant::now();

    // Act: the page keeps asking another process.
    let before_expiry = processes[1].state().await;
    let taken_over = loop {
        let state = processes[1].state().await;
        if state["status"] == "pending" && state["attempt"] == 2 {
            break state;
        }
        assert!(
            killed_at.elapsed() < wa_pair::session::LEASE_TTL + Duration::from_secs(20),
            "not taken over: {state}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let took = killed_at.elapsed();
    eprintln!("SIGKILL of the owner process to a new code: {took:?}");

    // Assert
    assert_eq!(
        before_expiry["code"], first["code"],
        "the owner's, while leased"
    );
    assert_ne!(taken_over["code"], first["code"]);
    assert!(
        took > wa_pair::session::LEASE_TTL / 2,
        "not before the lease could expire: {took:?}"
    );
    assert_eq!(fake.code_requests().await, 2);
}
