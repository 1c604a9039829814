//! The pairing page in a real browser (Debian's Chromium driven through
//! chromedriver) against the sandbox build: what a person sees and does,
//! step by step, with a screenshot of each step kept under
//! `target/tmp/browser-artifacts/`.
//!
//! These tests need `chromium` and `chromedriver` on the machine, so they
//! are ignored by the README's test command and run by `.ci/browser` (which
//! `.ci/run` calls after installing both). Run by hand:
//! `cargo nextest run --features sandbox --run-ignored only -E 'test(browser::)'`.
//! Without a browser they fail, loudly; they never pass without one.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::helpers::{TestApp, decode_qr_png};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
/// A phone-sized window: the page must work there.
const WINDOW: &str = "--window-size=412,1000";
/// How long the page may take to show what the API already has.
const PAGE_WAIT: Duration = Duration::from_secs(20);
/// The bound from the phone typing the code to the page saying so.
const LINKED_SHOWN_WITHIN: Duration = Duration::from_secs(2);

/// Chromium under chromedriver, stopped when dropped.
struct Browser {
    client: Client,
    _driver: Child,
    artifacts: PathBuf,
}

impl Browser {
    async fn start(name: &str) -> Self {
        assert!(
            std::path::Path::new(CHROMEDRIVER).exists() && std::path::Path::new(CHROMIUM).exists(),
            "the browser tests need {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", WINDOW, "--lang=en-US"],
            }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        let client = loop {
            // chromedriver speaks plain HTTP on loopback: no TLS stack needed.
            let mut builder = ClientBuilder::new(HttpConnector::new());
            builder.capabilities(capabilities.clone());
            match builder.connect(&url).await {
                Ok(client) => break client,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("chromedriver did not take a session: {e}"),
            }
        };
        let artifacts = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join("browser-artifacts")
            .join(name);
        std::fs::create_dir_all(&artifacts).expect("artifacts dir");
        Self {
            client,
            _driver: driver,
            artifacts,
        }
    }

    /// Keeps a screenshot of the page as `<step>.png`.
    async fn snap(&self, step: &str) -> Vec<u8> {
        let png = self.client.screenshot().await.expect("screenshot");
        std::fs::write(self.artifacts.join(format!("{step}.png")), &png).expect("saved");
        png
    }

    async fn js(&self, script: &str) -> Value {
        self.client
            .execute(script, Vec::new())
            .await
            .expect("script runs")
    }

    /// Waits until `script` returns something truthy; returns it.
    async fn until(&self, what: &str, script: &str) -> Value {
        let deadline = Instant::now() + PAGE_WAIT;
        loop {
            let value = self.js(script).await;
            let truthy = match &value {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return value;
            }
            assert!(Instant::now() < deadline, "the page never showed {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn type_into(&self, id: &str, text: &str) {
        let field = self.client.find(Locator::Id(id)).await.expect("field");
        field.clear().await.expect("cleared");
        field.send_keys(text).await.expect("typed");
    }

    async fn click(&self, id: &str) {
        self.client
            .find(Locator::Id(id))
            .await
            .expect("button")
            .click()
            .await
            .expect("clicked");
    }

    async fn stop(self) {
        let _ = self.client.close().await;
    }
}

/// The text of element `id`, or `""`.
fn text_of(id: &str) -> String {
    format!(
        "const e = document.getElementById('{id}'); return e && !e.hidden && e.offsetParent !== null ? e.textContent.trim() : '';"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium and chromedriver: run by .ci/browser"]
async fn browser_a_person_links_a_number_by_code_watching_it_live() {
    // Arrange
    let mut app = TestApp::spawn_sandbox().await;
    let browser = Browser::start("by-code").await;
    browser
        .client
        .goto(&format!("{}/?lang=en", app.base))
        .await
        .expect("page loads");

    // Act 1: a number typed the way people do gets the suggestion.
    browser.type_into("phone", "+62 812-345-6789").await;
    let suggestion = browser
        .until("the suggestion", &text_of("suggestion"))
        .await;
    browser.snap("1-suggestion").await;
    browser.click("use-suggestion").await;
    let phone = browser
        .js("return document.getElementById('phone').value")
        .await;

    // Assert 1
    assert_eq!(suggestion, "628123456789");
    assert_eq!(phone, "628123456789");

    // Act 2: connect; the code and the QR appear side by side.
    browser.click("connect").await;
    let code = browser.until("a code", &text_of("code")).await;
    browser
        .until(
            "the QR picture",
            "const q = document.getElementById('qr'); return !q.hidden && q.complete && q.naturalWidth > 0;",
        )
        .await;
    browser.snap("2-code-and-qr").await;
    browser
        .js("document.getElementById('qr').scrollIntoView({block: 'center'}); return true;")
        .await;
    let qr_picture = browser
        .client
        .find(Locator::Id("qr"))
        .await
        .expect("the QR")
        .screenshot()
        .await
        .expect("QR screenshot");
    std::fs::write(browser.artifacts.join("2-qr-element.png"), &qr_picture).expect("saved");
    let state = app.get_json("/pair/628123456789").await;

    // Assert 2
    let code = code.as_str().unwrap().to_owned();
    assert_eq!(
        code,
        state["code_display"].as_str().unwrap(),
        "the code shown is the live one"
    );
    assert!(code.len() == 9 && code.as_bytes()[4] == b'-', "{code}");
    assert_eq!(
        decode_qr_png(&qr_picture),
        state["qr"].as_str().unwrap(),
        "the QR on screen is the state's"
    );
    let countdown = browser.until("the countdown", &text_of("countdown")).await;
    assert!(countdown.as_str().unwrap().contains(':'), "{countdown}");

    // Act 3: "Refresh Kode" shows a new code.
    tokio::time::sleep(wa_pair::session::MANUAL_REFRESH_DEBOUNCE).await;
    browser.click("refresh").await;
    let refreshed = browser
        .until(
            "a new code",
            &format!(
                "const c = document.getElementById('code').textContent.trim(); return c !== '{code}' ? c : '';"
            ),
        )
        .await;
    browser.snap("3-refreshed").await;

    // Assert 3
    let refreshed = refreshed.as_str().unwrap().to_owned();
    assert_ne!(refreshed, code);

    // Act 4: the phone types the code; the page says so without a reload.
    let entered = app
        .post_json(
            "/sandbox/phones/628123456789/enter-code",
            json!({ "code": refreshed }),
        )
        .await;
    let typed_at = Instant::now();
    let outcome = browser.until("the outcome", &text_of("outcome-text")).await;
    let shown_after = typed_at.elapsed();
    browser.snap("4-linked").await;
    let status = browser
        .js("return document.getElementById('outcome').dataset.status")
        .await;

    // Assert 4
    assert_eq!(entered.status(), reqwest::StatusCode::OK);
    assert_eq!(status, "linked");
    assert!(outcome.as_str().unwrap().starts_with("Linked"), "{outcome}");
    assert!(
        shown_after <= LINKED_SHOWN_WITHIN,
        "linked shown {shown_after:?} after the code was typed"
    );
    browser.stop().await;
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium and chromedriver: run by .ci/browser"]
async fn browser_the_indonesian_page_has_no_english_left_and_links_by_qr() {
    // Arrange: the English words that have an Indonesian counterpart.
    let mut app = TestApp::spawn_sandbox().await;
    let browser = Browser::start("indonesian").await;
    let english: Vec<&str> = wa_pair::http::ui::STRINGS
        .iter()
        .filter(|s| s.en != s.id)
        .map(|s| s.en)
        .collect();
    browser
        .client
        .goto(&format!("{}/?lang=id", app.base))
        .await
        .expect("page loads");

    // Act: a wrong number, then a session, then a scan of the QR.
    browser.type_into("phone", "0812 345").await;
    browser.until("the error", &text_of("phone-error")).await;
    let with_error = browser.js("return document.body.innerText").await;
    browser.snap("1-error").await;
    browser.type_into("phone", "628123450000").await;
    browser.click("connect").await;
    browser.until("a code", &text_of("code")).await;
    browser
        .until(
            "the QR picture",
            "const q = document.getElementById('qr'); return !q.hidden && q.complete && q.naturalWidth > 0;",
        )
        .await;
    let pending = browser.js("return document.body.innerText").await;
    browser.snap("2-pending").await;
    let qr = app.get_json("/pair/628123450000").await["qr"].clone();
    let scanned = app
        .post_json("/sandbox/phones/628123450000/scan-qr", json!({ "qr": qr }))
        .await;
    browser.until("the outcome", &text_of("outcome-text")).await;
    let linked = browser.js("return document.body.innerText").await;
    browser.snap("3-linked").await;

    // Assert
    assert_eq!(scanned.status(), reqwest::StatusCode::OK);
    for page in [&with_error, &pending, &linked] {
        let text = page.as_str().unwrap();
        for words in &english {
            assert!(
                !text.contains(words),
                "English on the Indonesian page: {words:?} in {text}"
            );
        }
    }
    assert!(linked.as_str().unwrap().contains("Berhasil"), "{linked}");
    browser.stop().await;
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium and chromedriver: run by .ci/browser"]
async fn browser_a_passkey_account_shows_the_verification_code_and_links_on_its_button() {
    // Arrange: the account has a passkey; a host app will answer for it.
    let mut app = TestApp::spawn_sandbox().await;
    let browser = Browser::start("passkey").await;
    let created = app
        .post_json("/sandbox/phones/628123457777/passkey", json!({}))
        .await;
    browser
        .client
        .goto(&format!("{}/?lang=en", app.base))
        .await
        .expect("page loads");

    // Act 1: the page says WhatsApp asks for the passkey, and shows no code.
    browser.type_into("phone", "628123457777").await;
    browser.click("connect").await;
    let asked = browser
        .until(
            "the passkey request",
            "return document.getElementById('session').dataset.status === 'action_required' ? document.getElementById('status-text').textContent : '';",
        )
        .await;
    browser.snap("1-passkey-required").await;
    let code_hidden = browser
        .js("return document.getElementById('ways').offsetParent === null")
        .await;

    // Act 2: the host app answers; the page shows the verification code.
    let assertion: Value = app
        .post_json("/sandbox/phones/628123457777/passkey/assertion", json!({}))
        .await
        .json()
        .await
        .expect("an assertion");
    let sent = app.post_json("/pair/628123457777/passkey", assertion).await;
    let shown = browser
        .until("the verification code", &text_of("verification-code"))
        .await;
    browser.snap("2-verification-code").await;
    let phone_shows =
        app.get_json("/sandbox/phones/628123457777").await["verification_code"].clone();

    // Act 3: the person confirms; the page shows the link.
    browser.click("confirm-passkey").await;
    let outcome = browser.until("the outcome", &text_of("outcome-text")).await;
    browser.snap("3-linked").await;

    // Assert
    assert_eq!(created.status(), reqwest::StatusCode::NO_CONTENT);
    assert!(asked.as_str().unwrap().contains("passkey"), "{asked}");
    assert_eq!(code_hidden, true, "no code or QR box for a passkey account");
    assert_eq!(sent.status(), reqwest::StatusCode::OK);
    assert_eq!(
        shown.as_str().unwrap().replace('-', ""),
        phone_shows.as_str().unwrap(),
        "the page shows the phone's code"
    );
    assert!(outcome.as_str().unwrap().starts_with("Linked"), "{outcome}");
    browser.stop().await;
    app.shutdown().await;
}
