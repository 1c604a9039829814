//! Linked devices in PostgreSQL (`DATABASE_URL`) against a real server
//! (`DATABASE_TEST_URL`, else
//! `postgres://postgres@127.0.0.1:5432/test?sslmode=disable`):
//! a link saves the device's store, a process with an empty `DATA_DIR`
//! still knows it, and server callers fetch it. A test that cannot reach
//! the server fails; it never passes without one.

use std::sync::Arc;

use base64::Engine as _;
use reqwest::StatusCode;
use serde_json::{Value, json};
use wa_pair::config::Secret;
use wa_pair::devices::DeviceVault;
use wa_pair::phone::PhoneNumber;
use wa_pair::store::{MemoryStore, PairingStore};

use crate::helpers::TestApp;

const KEY: &str = "devices-test-key-0123456789abcdef";

/// The test database's URL.
fn database_url() -> String {
    std::env::var("DATABASE_TEST_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test?sslmode=disable".to_owned())
}

/// A phone no other test uses (rows outlive the test).
fn fresh_phone() -> String {
    let n = uuid::Uuid::new_v4().as_u128() % 100_000_000;
    format!("62812{n:08}")
}

/// The service on `store`, saving devices in the test database, with a
/// server key.
async fn app_with_devices(store: Arc<dyn PairingStore>) -> TestApp {
    let url = database_url();
    if let Err(e) = DeviceVault::connect(&url, None).await {
        panic!(
            "no PostgreSQL at {url} ({e}): start one (apt-get install postgresql) or set DATABASE_TEST_URL"
        );
    }
    TestApp::spawn_with(store, |config| {
        config.database_url = Some(Secret::new(url));
        config.api_keys = vec![Secret::new(KEY)];
    })
    .await
}

/// `POST /pair` with the server key, then the phone types the code.
async fn link(app: &TestApp, phone: &str) -> Value {
    let posted: Value = app
        .http
        .post(format!("{}/pair", app.base))
        .bearer_auth(KEY)
        .json(&json!({ "phone": phone }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let code = posted["code"].as_str().expect("a code");
    app.fake().enter_code(phone, code).await.expect("links");
    wait_for_saved(phone).await
}

/// Waits until the device of `phone` is saved; returns its row as JSON.
async fn wait_for_saved(phone: &str) -> Value {
    let vault = DeviceVault::connect(&database_url(), None).await.unwrap();
    let phone = PhoneNumber::parse(phone).unwrap();
    for _ in 0..200 {
        if let Some(saved) = vault.load(&phone).await.unwrap() {
            return json!({
                "jid": saved.jid,
                "bytes": saved.device.len(),
                "header": String::from_utf8_lossy(&saved.device[..16.min(saved.device.len())]),
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the device was not saved");
}

#[tokio::test]
async fn a_link_saves_the_whole_device_store_in_postgres() {
    // Arrange
    let app = app_with_devices(Arc::new(MemoryStore::new())).await;
    let phone = fresh_phone();

    // Act
    let saved = link(&app, &phone).await;

    // Assert: a SQLite database holding the linked device, account
    // included (written at the link, so in SQLite's log at first: a copy of
    // the main file alone had only its header).
    assert!(
        saved["jid"].as_str().unwrap().starts_with(&phone),
        "{saved}"
    );
    assert_eq!(
        saved["header"], "SQLite format 3\u{0}",
        "a SQLite database file"
    );
    let devices = devices_in(&saved_device(&phone).await);
    assert_eq!(devices.len(), 1, "{devices:?}");
    assert!(devices[0].pn.starts_with(&phone), "{devices:?}");
    assert!(devices[0].linked, "the account is saved: {devices:?}");
}

/// A device row of a saved store.
#[derive(Debug, diesel::QueryableByName)]
struct DeviceRow {
    #[diesel(sql_type = diesel::sql_types::Text)]
    pn: String,
    /// Whether the account (set when the phone links) is there.
    #[diesel(sql_type = diesel::sql_types::Bool)]
    linked: bool,
}

/// The devices in the SQLite database `store`.
fn devices_in(store: &[u8]) -> Vec<DeviceRow> {
    use diesel::{Connection as _, RunQueryDsl as _};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("saved.db");
    std::fs::write(&path, store).unwrap();
    let mut connection = diesel::SqliteConnection::establish(path.to_str().unwrap()).unwrap();
    diesel::sql_query("SELECT pn, account IS NOT NULL AS linked FROM device")
        .load(&mut connection)
        .unwrap()
}

/// The saved store of `phone`'s device.
async fn saved_device(phone: &str) -> Vec<u8> {
    let vault = DeviceVault::connect(&database_url(), None).await.unwrap();
    let phone = PhoneNumber::parse(phone).unwrap();
    vault.load(&phone).await.unwrap().expect("saved").device
}

#[tokio::test]
async fn a_process_with_an_empty_data_dir_still_knows_a_device_saved_in_postgres() {
    // Arrange: linked on one process; another starts with nothing on disk.
    let store: Arc<dyn PairingStore> = Arc::new(MemoryStore::new());
    let first = app_with_devices(Arc::clone(&store)).await;
    let phone = fresh_phone();
    link(&first, &phone).await;
    // The outcome in the store ages out; the device does not.
    store.delete(&format!("wa:pair:{phone}")).await.unwrap();
    let second = app_with_devices(Arc::new(MemoryStore::new())).await;

    // Act
    let again = second
        .http
        .post(format!("{}/pair", second.base))
        .bearer_auth(KEY)
        .json(&json!({ "phone": phone }))
        .send()
        .await
        .unwrap();
    let status = again.status();
    let body: Value = again.json().await.unwrap();

    // Assert
    assert!(
        !second.data_dir().join(format!("{phone}.db")).exists(),
        "nothing on this process's disk"
    );
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "already_linked");
    assert_eq!(
        second.fake().record(&phone).map_or(0, |r| r.code_requests),
        0,
        "WhatsApp was not asked again"
    );
}

#[tokio::test]
async fn a_server_caller_fetches_the_saved_device_and_no_one_else_does() {
    // Arrange
    let app = app_with_devices(Arc::new(MemoryStore::new())).await;
    let phone = fresh_phone();
    link(&app, &phone).await;
    let url = format!("{}/devices/{phone}", app.base);

    // Act
    let fetched = app.http.get(&url).bearer_auth(KEY).send().await.unwrap();
    let fetched_status = fetched.status();
    let cache_control = fetched.headers()["cache-control"].to_owned();
    let body: Value = fetched.json().await.unwrap();
    let without_key = app.http.get(&url).send().await.unwrap().status();
    let unknown = app
        .http
        .get(format!("{}/devices/{}", app.base, fresh_phone()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();

    // Assert
    assert_eq!(fetched_status, StatusCode::OK, "{body}");
    assert_eq!(body["phone"], phone);
    let device = base64::engine::general_purpose::STANDARD
        .decode(body["device"].as_str().unwrap())
        .unwrap();
    assert_eq!(
        device,
        saved_device(&phone).await,
        "the saved store, byte for byte"
    );
    assert_eq!(devices_in(&device).len(), 1, "a store with its device");
    assert_eq!(cache_control, "no-store");
    assert_eq!(without_key, StatusCode::UNAUTHORIZED);
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
}
